//! Float element conversion between stored bytes (F32, F16, BF16, F64; little-endian, any
//! alignment) and `f32` working rows. Every merge computes in `f32` and rounds once, to nearest
//! even, back to the tensor's own dtype (as torch's `.to(dtype)` does).

use half::f16;

use crate::error::{Error, Result};
use crate::io::Dtype;

/// Whether `dtype` is one a merge can compute on.
pub fn is_mergeable(dtype: Dtype) -> bool {
    matches!(dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16 | Dtype::F64)
}

/// Refuses dtypes a merge cannot compute on, naming the tensor.
pub fn check_mergeable(dtype: Dtype, what: &str) -> Result<()> {
    if is_mergeable(dtype) {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "{what}: dtype {dtype} cannot be merged (F32, F16, BF16 or F64 only)"
        )))
    }
}

/// Decodes `out.len()` elements of `dtype` from `bytes` into `out`.
pub fn to_f32(bytes: &[u8], dtype: Dtype, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx2_f16c() {
            // SAFETY: the CPU supports the features the function is compiled for.
            unsafe { to_f32_avx2(bytes, dtype, out) };
            return;
        }
    }
    to_f32_plain(bytes, dtype, out);
}

/// Encodes `values` as `dtype` into `out` (exactly `values.len() * dtype.size()` bytes).
pub fn from_f32(values: &[f32], dtype: Dtype, out: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx2_f16c() {
            // SAFETY: the CPU supports the features the function is compiled for.
            unsafe { from_f32_avx2(values, dtype, out) };
            return;
        }
    }
    from_f32_plain(values, dtype, out);
}

#[cfg(target_arch = "x86_64")]
fn has_avx2_f16c() -> bool {
    std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("f16c")
}

/// [`to_f32_plain`] compiled for AVX2 (the BF16/F32/F64 loops vectorise as written); F16 through
/// the F16C conversion instruction, which is exact (every f16 is an f32).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
unsafe fn to_f32_avx2(bytes: &[u8], dtype: Dtype, out: &mut [f32]) {
    use std::arch::x86_64::*;
    if dtype != Dtype::F16 {
        return to_f32_plain(bytes, dtype, out);
    }
    let n = out.len().min(bytes.len() / 2);
    let body = n / 8 * 8;
    // SAFETY: i + 8 <= body <= n: 16 bytes of `bytes` and 8 floats of `out` in bounds.
    unsafe {
        let mut i = 0;
        while i < body {
            let halves = _mm_loadu_si128(bytes.as_ptr().add(2 * i) as *const __m128i);
            _mm256_storeu_ps(out.as_mut_ptr().add(i), _mm256_cvtph_ps(halves));
            i += 8;
        }
    }
    to_f32_plain(&bytes[2 * body..2 * n], dtype, &mut out[body..n]);
}

/// [`from_f32_plain`] compiled for AVX2 (the BF16 rounding is branch-free and vectorises); F16
/// through the F16C conversion with round-to-nearest-even, as `half` and torch round.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
unsafe fn from_f32_avx2(values: &[f32], dtype: Dtype, out: &mut [u8]) {
    use std::arch::x86_64::*;
    if dtype != Dtype::F16 {
        return from_f32_plain(values, dtype, out);
    }
    let n = values.len().min(out.len() / 2);
    let body = n / 8 * 8;
    // SAFETY: i + 8 <= body <= n: 8 floats of `values` and 16 bytes of `out` in bounds.
    unsafe {
        let mut i = 0;
        while i < body {
            let floats = _mm256_loadu_ps(values.as_ptr().add(i));
            let halves = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(floats);
            _mm_storeu_si128(out.as_mut_ptr().add(2 * i) as *mut __m128i, halves);
            i += 8;
        }
    }
    from_f32_plain(&values[body..n], dtype, &mut out[2 * body..2 * n]);
}

/// The portable loops of [`to_f32`] (plain Rust; vectorised where the caller enables AVX2).
#[inline(always)]
fn to_f32_plain(bytes: &[u8], dtype: Dtype, out: &mut [f32]) {
    match dtype {
        Dtype::F32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        Dtype::BF16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16);
            }
        }
        Dtype::F16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
            }
        }
        Dtype::F64 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(8)) {
                *o = f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32;
            }
        }
        other => unreachable!("to_f32 on {other}: callers check_mergeable first"),
    }
}

/// The portable loops of [`from_f32`] (plain Rust; vectorised where the caller enables AVX2).
#[inline(always)]
fn from_f32_plain(values: &[f32], dtype: Dtype, out: &mut [u8]) {
    match dtype {
        Dtype::F32 => {
            for (v, c) in values.iter().zip(out.chunks_exact_mut(4)) {
                c.copy_from_slice(&v.to_le_bytes());
            }
        }
        Dtype::BF16 => {
            for (v, c) in values.iter().zip(out.chunks_exact_mut(2)) {
                c.copy_from_slice(&bf16_bits(*v).to_le_bytes());
            }
        }
        Dtype::F16 => {
            for (v, c) in values.iter().zip(out.chunks_exact_mut(2)) {
                c.copy_from_slice(&f16::from_f32(*v).to_bits().to_le_bytes());
            }
        }
        Dtype::F64 => {
            for (v, c) in values.iter().zip(out.chunks_exact_mut(8)) {
                c.copy_from_slice(&(*v as f64).to_le_bytes());
            }
        }
        other => unreachable!("from_f32 on {other}: callers check_mergeable first"),
    }
}

/// `f32 -> bf16` rounding to nearest even (NaN stays NaN), branch-free on finite values so the
/// loop vectorises; agrees with `half::bf16::from_f32` (tested below).
#[inline(always)]
pub(crate) fn bf16_bits(v: f32) -> u16 {
    let bits = v.to_bits();
    if v.is_nan() {
        return ((bits >> 16) | 0x0040) as u16;
    }
    let rounding = 0x7fff + ((bits >> 16) & 1);
    (bits.wrapping_add(rounding) >> 16) as u16
}

/// A whole tensor decoded to `f32` (small tensors only: adapter factors, vectors).
pub fn tensor_to_f32(bytes: &[u8], dtype: Dtype) -> Vec<f32> {
    let mut out = vec![0f32; bytes.len() / dtype.size()];
    to_f32(bytes, dtype, &mut out);
    out
}

/// `values` encoded as `dtype`.
pub fn tensor_from_f32(values: &[f32], dtype: Dtype) -> Vec<u8> {
    let mut out = vec![0u8; values.len() * dtype.size()];
    from_f32(values, dtype, &mut out);
    out
}

/// The `bf16` value `half` gives, used as the plain reference for [`bf16_bits`].
#[cfg(test)]
fn bf16_reference(v: f32) -> u16 {
    half::bf16::from_f32(v).to_bits()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounding_matches_half() {
        let mut specials = vec![
            0.0f32,
            -0.0,
            1.0,
            f32::MAX,
            f32::MIN_POSITIVE,
            f32::INFINITY,
            f32::NEG_INFINITY,
            1.0 + f32::EPSILON * 64.0,
        ];
        // ties and near-ties around every rounding boundary of a few exponents
        for base in [0x3f80_0000u32, 0x4100_0000, 0x0080_0000, 0x7f7f_0000] {
            for low in [0x7fffu32, 0x8000, 0x8001, 0x18000, 0x17fff, 0xffff] {
                specials.push(f32::from_bits(base | low));
            }
        }
        let mut state = 0x9e37_79b9u32;
        for _ in 0..100_000 {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            specials.push(f32::from_bits(state));
        }
        for v in specials {
            if v.is_nan() {
                assert!(f32::from_bits((bf16_bits(v) as u32) << 16).is_nan());
            } else {
                assert_eq!(
                    bf16_bits(v),
                    bf16_reference(v),
                    "{v:e} ({:#x})",
                    v.to_bits()
                );
            }
        }
    }

    #[test]
    fn fast_conversions_agree_with_the_plain_loops() {
        let mut state = 0x2545_f491u32;
        let mut bits = || {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            state
        };
        // random bit patterns (NaN, infinities, subnormals included) at lengths around the
        // 8-lane body, as f32 values and as raw 2-byte / 4-byte / 8-byte elements
        for len in [0usize, 1, 7, 8, 9, 31, 1000] {
            let values: Vec<f32> = (0..len).map(|_| f32::from_bits(bits())).collect();
            let raw: Vec<u8> = (0..len * 8).map(|_| bits() as u8).collect();
            for dtype in [Dtype::F32, Dtype::F16, Dtype::BF16, Dtype::F64] {
                let bytes = &raw[..len * dtype.size()];
                let (mut fast, mut plain) = (vec![0f32; len], vec![0f32; len]);
                to_f32(bytes, dtype, &mut fast);
                to_f32_plain(bytes, dtype, &mut plain);
                for (a, b) in fast.iter().zip(&plain) {
                    assert!(
                        a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()),
                        "{dtype}"
                    );
                }
                let size = dtype.size();
                let (mut fast, mut plain) = (vec![0u8; len * size], vec![0u8; len * size]);
                from_f32(&values, dtype, &mut fast);
                from_f32_plain(&values, dtype, &mut plain);
                for ((a, b), v) in fast.chunks(size).zip(plain.chunks(size)).zip(&values) {
                    assert!(a == b || v.is_nan(), "{dtype}: {v:e}");
                }
            }
        }
    }

    #[test]
    fn roundtrips_every_dtype() {
        let values = [0.5f32, -2.25, 1024.0, 3.0e-3];
        for dtype in [Dtype::F32, Dtype::F16, Dtype::BF16, Dtype::F64] {
            let bytes = tensor_from_f32(&values, dtype);
            assert_eq!(bytes.len(), values.len() * dtype.size());
            let back = tensor_to_f32(&bytes, dtype);
            for (a, b) in values.iter().zip(&back) {
                assert!((a - b).abs() <= a.abs() * 1e-2, "{dtype}: {a} -> {b}");
            }
        }
        assert!(check_mergeable(Dtype::I8, "x").is_err());
    }
}
