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

/// Encodes `values` as `dtype` into `out` (exactly `values.len() * dtype.size()` bytes).
pub fn from_f32(values: &[f32], dtype: Dtype, out: &mut [u8]) {
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
fn bf16_bits(v: f32) -> u16 {
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
