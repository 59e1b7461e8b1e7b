//! Blockwise 4-bit quantization (NF4 and FP4) and the 8-bit double quantization of its scales,
//! producing byte for byte what bitsandbytes' CUDA kernels produce (the output that fills
//! published 4-bit checkpoints).
//!
//! # The format
//! A tensor of `n` elements, flattened row-major, is cut into blocks of `blocksize` consecutive
//! elements (a power of two, 32..=4096; the last block may be partial). Per block:
//!
//! ```text
//! absmax_b = max |x_i|                                  (fp32, stored)
//! p_i      = x_i * rcp(absmax_b)                        (fp32)
//! code_i   = #{ t in THRESHOLDS : p_i > t }             (NF4: 15 thresholds, 16 codes)
//! byte_k   = code_{2k} << 4 | code_{2k+1}               (first element in the HIGH nibble)
//! x'_i     = CODE[code_i] * absmax_b                    (dequantize, then round to the output type)
//! ```
//!
//! FP4 quantizes `|p|` against 7 thresholds and adds a sign bit (8); its codes are not monotone.
//!
//! # What the CUDA kernel does that a naive implementation does not
//! bitsandbytes is built with `--use_fast_math` and quantizes with a comparison tree, so:
//! - thresholds are the tree's literals (rounded to fp32), compared with a strict `>`: a value
//!   exactly on a threshold takes the LOWER code (this equals `#{t : p > t}`, which is branch-free);
//! - denormals are flushed to zero (inputs and products), so a block of zeros and denormals has
//!   absmax 0, `rcp(0) = inf` and `0 * inf = NaN`, and NaN compares false everywhere: every code of
//!   an all-zero block is 0 (NF4 code 0 is -1.0, dequantizing to -0.0), not 7;
//! - the absmax reduction is `fmaxf`, which skips NaN, starting from `-FLT_MAX`; a partial last
//!   block also folds in the zero padding its loads add; a NaN input quantizes to code 0;
//! - the padding element of an odd element count is quantized as `0 * rcp(absmax)` (NF4 code 7);
//! - every block, partial or not, multiplies by the reciprocal (the CPU fallback divides in a
//!   partial block and clamps absmax to 1e-38, giving code 7 for all-zero blocks).
//!
//! The reciprocal: fast math compiles `1.0f / absmax` to the GPU's approximate reciprocal
//! (`rcp.approx.ftz.f32`, at most 1 ulp from the correctly rounded one). We compute the correctly
//! rounded reciprocal; `bench/nf4_gpu_check.py` measures on the GPU whether any absmax value
//! rounds differently there and reports every mismatch.
//!
//! # Double quantization (`compress_statistics`)
//! `offset = mean(absmax)`, then `absmax - offset` is quantized blockwise (blocks of 256) to 8 bits
//! with bitsandbytes' signed dynamic map ([`dynamic_map_signed`]), using the kernel's binary search
//! with midpoint rounding ([`quantize_dynamic_8bit`]). Dequantized: `CODE8[q] * absmax2 + offset`.

// The tables below are the kernel's decimal literals verbatim: like a C `float` literal, each is
// rounded once to the nearest fp32, which is the value the comparisons must use.
#![allow(clippy::excessive_precision)]

use rayon::prelude::*;

use crate::error::{Error, Result};

/// The 16 NF4 values (bitsandbytes' `quant_map` for `nf4`, also its dequantization table).
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.696_192_800_998_687_7,
    -0.525_073_051_452_636_7,
    -0.394_917_488_098_144_53,
    -0.284_441_381_692_886_35,
    -0.184_773_433_208_465_58,
    -0.091_050_036_251_544_95,
    0.0,
    0.079_580_299_556_255_34,
    0.160_930_201_411_247_25,
    0.246_112_301_945_686_34,
    0.337_915_241_718_292_24,
    0.440_709_829_330_444_34,
    0.562_617_003_917_694_1,
    0.722_956_836_223_602_3,
    1.0,
];

/// The NF4 comparison tree's thresholds, ascending (midpoints of [`NF4_CODE`] as the kernel's
/// double literals, rounded to fp32). `code = #{t : p > t}`.
const NF4_THRESHOLDS: [f32; 15] = [
    -0.848_096_400_499_343_9,
    -0.610_632_926_225_662_2,
    -0.459_995_269_775_390_6,
    -0.339_679_434_895_515_44,
    -0.234_607_405_960_559_84,
    -0.137_911_733_239_889_14,
    -0.045_525_018_125_772_476,
    0.039_790_149_778_127_67,
    0.120_255_250_483_751_3,
    0.203_521_251_678_466_8,
    0.292_013_771_831_989_3,
    0.389_312_535_524_368_3,
    0.501_663_416_624_069_2,
    0.642_786_920_070_648_2,
    0.861_478_418_111_801_1,
];

/// FP4 magnitudes by the low three code bits (sign in bit 3), as the kernel's dequantization table.
const FP4_MAGNITUDE: [f32; 8] = [
    0.0,
    0.005_208_333_333,
    0.666_666_67,
    1.0,
    0.333_333_33,
    0.5,
    0.166_666_67,
    0.25,
];

/// FP4 thresholds on `|p|`, ascending; the count of those exceeded indexes [`FP4_BY_RANK`].
const FP4_THRESHOLDS: [f32; 7] = [
    0.002_604_17,
    0.085_937_5,
    0.208_333_33,
    0.291_666_67,
    0.416_666_7,
    0.583_333,
    0.833_333_3,
];

/// FP4 code (without sign) of the k-th magnitude interval.
const FP4_BY_RANK: [u8; 8] = [0b000, 0b001, 0b110, 0b111, 0b100, 0b101, 0b010, 0b011];

/// Blocks of the nested (double) quantization of absmax.
pub const NESTED_BLOCKSIZE: usize = 256;

/// The 4-bit data type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QuantType {
    Nf4,
    Fp4,
}

impl QuantType {
    /// `"nf4"` or `"fp4"`, as bitsandbytes names them.
    pub fn as_str(self) -> &'static str {
        match self {
            QuantType::Nf4 => "nf4",
            QuantType::Fp4 => "fp4",
        }
    }

    /// Parses `"nf4"` / `"fp4"`.
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "nf4" => Ok(QuantType::Nf4),
            "fp4" => Ok(QuantType::Fp4),
            other => Err(Error::InvalidArgument(format!(
                "quant_type must be \"nf4\" or \"fp4\", got {other:?}"
            ))),
        }
    }

    /// The 16 dequantized values of the codes, as bitsandbytes stores them in `quant_map`
    /// (FP4: `[0, 0.0625, 8, 12, 4, 6, 2, 3, 0, -0.0625, ...] / 12` in fp32; code 8 is +0.0 there,
    /// its Python source writing the integer `-0`).
    pub fn code(self) -> [f32; 16] {
        match self {
            QuantType::Nf4 => NF4_CODE,
            QuantType::Fp4 => {
                let raw: [f32; 8] = [0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0];
                std::array::from_fn(|i| {
                    let v = raw[i % 8] / 12.0;
                    if i > 8 {
                        -v
                    } else {
                        v
                    }
                })
            }
        }
    }

    /// The kernel's dequantization table (for NF4 the code itself; for FP4 `magnitude * sign`).
    fn dequant_table(self) -> [f32; 16] {
        match self {
            QuantType::Nf4 => NF4_CODE,
            QuantType::Fp4 => std::array::from_fn(|i| {
                let sign = if i & 8 != 0 { -1.0 } else { 1.0 };
                FP4_MAGNITUDE[i & 7] * sign
            }),
        }
    }
}

/// Checks a 4-bit blocksize: a power of two from 32 to 4096.
pub fn check_blocksize(blocksize: usize) -> Result<()> {
    if blocksize.is_power_of_two() && (32..=4096).contains(&blocksize) {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "blocksize must be a power of two from 32 to 4096, got {blocksize}"
        )))
    }
}

/// Number of blocks covering `n` elements.
pub fn num_blocks(n: usize, blocksize: usize) -> usize {
    n.div_ceil(blocksize)
}

// ---------------------------------------------------------------------------------------------
// fp32 arithmetic as the fast-math kernel does it
// ---------------------------------------------------------------------------------------------

/// Flush-to-zero: a denormal becomes a zero of the same sign.
#[inline(always)]
fn ftz(x: f32) -> f32 {
    if x.abs() < f32::MIN_POSITIVE {
        f32::from_bits(x.to_bits() & 0x8000_0000)
    } else {
        x
    }
}

/// `1.0f / x` with flushed denormals (input and result); `rcp(0) = inf`.
#[inline(always)]
fn rcp(x: f32) -> f32 {
    ftz(1.0 / ftz(x))
}

/// An element type the quantizer reads.
pub trait Element: Copy + Send + Sync + 'static {
    fn to_f32(self) -> f32;
}

impl Element for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
}

impl Element for half::bf16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }
}

impl Element for half::f16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        half::f16::to_f32(self)
    }
}

/// An element type the dequantizer writes (rounding from fp32 to nearest even).
pub trait OutElement: Copy + Send + Sync + Default + 'static {
    fn from_f32(x: f32) -> Self;
}

impl OutElement for f32 {
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x
    }
}

impl OutElement for half::bf16 {
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        half::bf16::from_bits(f32_to_bf16_bits(x))
    }
}

impl OutElement for half::f16 {
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        if x.is_nan() {
            // The GPU's conversion gives the canonical NaN.
            return half::f16::from_bits(0x7FFF);
        }
        half::f16::from_f32(x)
    }
}

/// fp32 -> bf16 bits, round to nearest even (NaN -> the canonical 0x7FFF, as on the GPU).
#[inline(always)]
pub fn f32_to_bf16_bits(x: f32) -> u16 {
    if x.is_nan() {
        return 0x7FFF;
    }
    let b = x.to_bits();
    ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) as u16
}

// ---------------------------------------------------------------------------------------------
// 4-bit quantization
// ---------------------------------------------------------------------------------------------

/// The result of [`quantize_4bit`]: `packed` holds `ceil(n / 2)` bytes, `absmax` one fp32 per block.
#[derive(Debug, Clone, PartialEq)]
pub struct Quantized4bit {
    pub packed: Vec<u8>,
    pub absmax: Vec<f32>,
}

/// A zeroed vector for a large output; on Linux its pages are asked to be huge pages before they
/// are first touched, so filling it takes hundreds of times fewer page faults.
pub fn output_vec<T: Copy + Default>(n: usize) -> Vec<T> {
    let v = vec![T::default(); n];
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let bytes = n * std::mem::size_of::<T>();
        if bytes >= 4 * HUGE {
            let start = (v.as_ptr() as usize).div_ceil(HUGE) * HUGE;
            let end = (v.as_ptr() as usize + bytes) / HUGE * HUGE;
            // SAFETY: advice on whole pages inside the vector's own allocation; it changes how
            // pages are backed, never their contents (still zero).
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
        }
    }
    v
}

/// Blocks handed to one rayon task (enough work to amortise scheduling).
const ELEMENTS_PER_TASK: usize = 1 << 16;

/// absmax of one block as the kernel reduces it (see the module docs). Eight independent lanes
/// so the loop vectorizes; max is exact, so the order of the reduction does not matter.
#[inline(always)]
fn block_absmax<T: Element>(block: &[T], partial: bool) -> f32 {
    let mut lanes = [-f32::MAX; 8];
    let mut chunks = block.chunks_exact(8);
    for chunk in &mut chunks {
        for (m, &x) in lanes.iter_mut().zip(chunk) {
            let a = ftz(x.to_f32().abs());
            *m = if a > *m { a } else { *m };
        }
    }
    for (m, &x) in lanes.iter_mut().zip(chunks.remainder()) {
        let a = ftz(x.to_f32().abs());
        *m = if a > *m { a } else { *m };
    }
    let mut m = lanes
        .into_iter()
        .fold(-f32::MAX, |m, a| if a > m { a } else { m });
    if partial && m < 0.0 {
        m = 0.0;
    }
    m
}

/// NF4 code of a scaled value: the count of thresholds it exceeds.
#[inline(always)]
fn nf4_code(p: f32) -> u8 {
    let mut c = 0u32;
    for t in NF4_THRESHOLDS {
        c += (p > t) as u32;
    }
    c as u8
}

/// FP4 code of a scaled value: sign bit and the code of its magnitude's interval.
#[inline(always)]
fn fp4_code(p: f32) -> u8 {
    let a = p.abs();
    let mut c = 0u32;
    for t in FP4_THRESHOLDS {
        c += (a > t) as u32;
    }
    FP4_BY_RANK[c as usize] | (((p < 0.0) as u8) << 3)
}

/// Elements coded per inner step: every blocksize is a multiple, and fixed-size arrays let the
/// compiler vectorize the comparisons.
const STEP: usize = 32;

/// Quantizes one block (`block.len()` <= blocksize, even except for the last block of an odd
/// element count) into `out` (`ceil(len / 2)` bytes); returns its absmax.
#[inline(always)]
fn quantize_block<T: Element, const NF4: bool>(block: &[T], partial: bool, out: &mut [u8]) -> f32 {
    let absmax = block_absmax(block, partial);
    let inv = rcp(absmax);
    let code = |x: f32| -> u8 {
        let p = ftz(ftz(x) * inv);
        if NF4 {
            nf4_code(p)
        } else {
            fp4_code(p)
        }
    };
    let whole = block.len() / STEP * STEP;
    let mut codes = [0u8; STEP];
    for (src, dst) in block[..whole]
        .chunks_exact(STEP)
        .zip(out.chunks_exact_mut(STEP / 2))
    {
        for (c, &x) in codes.iter_mut().zip(src) {
            *c = code(x.to_f32());
        }
        for (j, byte) in dst.iter_mut().enumerate() {
            *byte = (codes[2 * j] << 4) | codes[2 * j + 1];
        }
    }
    let rest = &block[whole..];
    let out = &mut out[whole / 2..];
    let pairs = rest.len() / 2;
    for (byte, pair) in out[..pairs].iter_mut().zip(rest.chunks_exact(2)) {
        *byte = (code(pair[0].to_f32()) << 4) | code(pair[1].to_f32());
    }
    if rest.len() % 2 == 1 {
        // The odd last element pairs with the zero the kernel's load pads in.
        out[pairs] = (code(rest[rest.len() - 1].to_f32()) << 4) | code(0.0);
    }
    absmax
}

/// Quantizes a run of whole blocks (the last possibly partial) of `input` into `packed`/`absmax`.
#[inline(always)]
fn quantize_run<T: Element, const NF4: bool>(
    input: &[T],
    blocksize: usize,
    packed: &mut [u8],
    absmax: &mut [f32],
) {
    for ((block, out), a) in input
        .chunks(blocksize)
        .zip(packed.chunks_mut(blocksize / 2))
        .zip(absmax.iter_mut())
    {
        *a = quantize_block::<T, NF4>(block, block.len() < blocksize, out);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn quantize_run_avx2<T: Element, const NF4: bool>(
    input: &[T],
    blocksize: usize,
    packed: &mut [u8],
    absmax: &mut [f32],
) {
    quantize_run::<T, NF4>(input, blocksize, packed, absmax)
}

/// Picks the widest vector instructions this CPU has for a run of blocks.
fn quantize_run_dispatch<T: Element, const NF4: bool>(
    input: &[T],
    blocksize: usize,
    packed: &mut [u8],
    absmax: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU supports AVX2 and FMA (checked just above).
        return unsafe { quantize_run_avx2::<T, NF4>(input, blocksize, packed, absmax) };
    }
    quantize_run::<T, NF4>(input, blocksize, packed, absmax)
}

/// Quantizes `input` (any element count) blockwise to 4 bits, as bitsandbytes' CUDA
/// `quantize_4bit` does: `ceil(n / 2)` packed bytes and one fp32 absmax per block. Parallel.
pub fn quantize_4bit<T: Element>(
    input: &[T],
    blocksize: usize,
    quant_type: QuantType,
) -> Result<Quantized4bit> {
    check_blocksize(blocksize)?;
    let n = input.len();
    let mut packed = output_vec::<u8>(n.div_ceil(2));
    let mut absmax = vec![0f32; num_blocks(n, blocksize)];
    let blocks_per_task = (ELEMENTS_PER_TASK / blocksize).max(1);
    let span = blocks_per_task * blocksize;
    let run = match quant_type {
        QuantType::Nf4 => quantize_run_dispatch::<T, true>,
        QuantType::Fp4 => quantize_run_dispatch::<T, false>,
    };
    input
        .par_chunks(span)
        .zip(packed.par_chunks_mut(span / 2))
        .zip(absmax.par_chunks_mut(blocks_per_task))
        .for_each(|((inp, out), am)| run(inp, blocksize, out, am));
    Ok(Quantized4bit { packed, absmax })
}

/// The per-block absmax alone (what [`quantize_4bit`] stores without double quantization), for
/// computing the double-quantization offset before the codes. Parallel.
pub fn block_absmaxes<T: Element>(input: &[T], blocksize: usize) -> Vec<f32> {
    let mut absmax = vec![0f32; num_blocks(input.len(), blocksize)];
    absmax
        .par_iter_mut()
        .zip(input.par_chunks(blocksize))
        .for_each(|(a, block)| *a = block_absmax(block, block.len() < blocksize));
    absmax
}

// ---------------------------------------------------------------------------------------------
// 4-bit dequantization
// ---------------------------------------------------------------------------------------------

#[inline(always)]
fn dequantize_run<O: OutElement>(
    packed: &[u8],
    absmax: &[f32],
    table: &[f32; 16],
    blocksize: usize,
    out: &mut [O],
) {
    for ((bytes, block_out), &a) in packed
        .chunks(blocksize / 2)
        .zip(out.chunks_mut(blocksize))
        .zip(absmax.iter())
    {
        // The block's 16 possible outputs, rounded once.
        let values: [O; 16] = std::array::from_fn(|c| O::from_f32(ftz(table[c] * a)));
        let pairs = block_out.len() / 2;
        for (pair, &b) in block_out.chunks_exact_mut(2).zip(bytes[..pairs].iter()) {
            pair[0] = values[(b >> 4) as usize];
            pair[1] = values[(b & 15) as usize];
        }
        if block_out.len() % 2 == 1 {
            block_out[2 * pairs] = values[(bytes[pairs] >> 4) as usize];
        }
    }
}

/// Table-lookup expansion with SSSE3 byte shuffles: each output is split into byte planes, and
/// `pshufb` looks up 16 nibbles at once in each plane's 16-entry table.
#[cfg(target_arch = "x86_64")]
mod shuffle {
    use std::arch::x86_64::*;

    /// The 16 table entries' byte `plane` (0 = least significant) as a vector.
    #[inline(always)]
    unsafe fn plane<const W: usize>(table: &[[u8; W]; 16], plane: usize) -> __m128i {
        let bytes: [u8; 16] = std::array::from_fn(|i| table[i][plane]);
        // SAFETY: an unaligned load of 16 bytes from a 16-byte array.
        unsafe { _mm_loadu_si128(bytes.as_ptr().cast()) }
    }

    /// Expands `bytes` (a multiple of 16) into `2 * bytes.len()` outputs of `W` bytes at `out`.
    /// Output `2k` takes the high nibble of byte `k`, output `2k + 1` the low one.
    #[target_feature(enable = "avx2")]
    pub unsafe fn expand<const W: usize>(bytes: &[u8], table: &[[u8; W]; 16], out: *mut u8) {
        // SAFETY (whole body): loads stay inside `bytes`; the caller gives room for
        // `2 * bytes.len() * W` bytes at `out`.
        unsafe {
            let nibble = _mm_set1_epi8(0x0F);
            let planes: [__m128i; W] = std::array::from_fn(|p| plane(table, p));
            for (k, chunk) in bytes.chunks_exact(16).enumerate() {
                let v = _mm_loadu_si128(chunk.as_ptr().cast());
                let high = _mm_and_si128(_mm_srli_epi16::<4>(v), nibble);
                let low = _mm_and_si128(v, nibble);
                // indices of outputs 0..16 and 16..32 of this chunk, in order
                let halves = [_mm_unpacklo_epi8(high, low), _mm_unpackhi_epi8(high, low)];
                for (h, idx) in halves.into_iter().enumerate() {
                    let dst = out.add((k * 32 + h * 16) * W);
                    if W == 2 {
                        let b0 = _mm_shuffle_epi8(planes[0], idx);
                        let b1 = _mm_shuffle_epi8(planes[1], idx);
                        _mm_storeu_si128(dst.cast(), _mm_unpacklo_epi8(b0, b1));
                        _mm_storeu_si128(dst.add(16).cast(), _mm_unpackhi_epi8(b0, b1));
                    } else {
                        let b0 = _mm_shuffle_epi8(planes[0], idx);
                        let b1 = _mm_shuffle_epi8(planes[1], idx);
                        let b2 = _mm_shuffle_epi8(planes[2], idx);
                        let b3 = _mm_shuffle_epi8(planes[3], idx);
                        let (lo01, hi01) = (_mm_unpacklo_epi8(b0, b1), _mm_unpackhi_epi8(b0, b1));
                        let (lo23, hi23) = (_mm_unpacklo_epi8(b2, b3), _mm_unpackhi_epi8(b2, b3));
                        _mm_storeu_si128(dst.cast(), _mm_unpacklo_epi16(lo01, lo23));
                        _mm_storeu_si128(dst.add(16).cast(), _mm_unpackhi_epi16(lo01, lo23));
                        _mm_storeu_si128(dst.add(32).cast(), _mm_unpacklo_epi16(hi01, hi23));
                        _mm_storeu_si128(dst.add(48).cast(), _mm_unpackhi_epi16(hi01, hi23));
                    }
                }
            }
        }
    }
}

/// [`dequantize_run`] with the byte-shuffle expansion for the whole 16-byte groups of each block.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn dequantize_run_shuffle<O: OutElement, const W: usize>(
    packed: &[u8],
    absmax: &[f32],
    table: &[f32; 16],
    blocksize: usize,
    out: &mut [O],
) {
    debug_assert_eq!(std::mem::size_of::<O>(), W);
    for ((bytes, block_out), &a) in packed
        .chunks(blocksize / 2)
        .zip(out.chunks_mut(blocksize))
        .zip(absmax.iter())
    {
        let values: [O; 16] = std::array::from_fn(|c| O::from_f32(ftz(table[c] * a)));
        let pairs = block_out.len() / 2;
        let whole = pairs / 16 * 16;
        if whole > 0 {
            let planes: [[u8; W]; 16] = std::array::from_fn(|c| {
                let mut b = [0u8; W];
                // SAFETY: O is W bytes of plain data (f32, bf16 or f16).
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        (&values[c] as *const O).cast::<u8>(),
                        b.as_mut_ptr(),
                        W,
                    )
                };
                b
            });
            // SAFETY: `block_out` has room for 2 * whole outputs; AVX2 was detected by the caller.
            unsafe {
                shuffle::expand::<W>(&bytes[..whole], &planes, block_out.as_mut_ptr().cast())
            };
        }
        for (pair, &b) in block_out[2 * whole..]
            .chunks_exact_mut(2)
            .zip(bytes[whole..pairs].iter())
        {
            pair[0] = values[(b >> 4) as usize];
            pair[1] = values[(b & 15) as usize];
        }
        if block_out.len() % 2 == 1 {
            block_out[2 * pairs] = values[(bytes[pairs] >> 4) as usize];
        }
    }
}

fn dequantize_run_dispatch<O: OutElement>(
    packed: &[u8],
    absmax: &[f32],
    table: &[f32; 16],
    blocksize: usize,
    out: &mut [O],
) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2 (checked just above); W is O's size.
        match std::mem::size_of::<O>() {
            2 => {
                return unsafe {
                    dequantize_run_shuffle::<O, 2>(packed, absmax, table, blocksize, out)
                }
            }
            4 => {
                return unsafe {
                    dequantize_run_shuffle::<O, 4>(packed, absmax, table, blocksize, out)
                }
            }
            _ => {}
        }
    }
    dequantize_run(packed, absmax, table, blocksize, out)
}

/// Dequantizes `out.len()` elements from `packed` codes and per-block `absmax` (already
/// double-dequantized if nested): `out_i = round(CODE[code_i] * absmax_block)`. Parallel.
pub fn dequantize_4bit_into<O: OutElement>(
    packed: &[u8],
    absmax: &[f32],
    blocksize: usize,
    quant_type: QuantType,
    out: &mut [O],
) -> Result<()> {
    check_blocksize(blocksize)?;
    let n = out.len();
    if packed.len() < n.div_ceil(2) {
        return Err(Error::InvalidArgument(format!(
            "{n} elements need {} packed bytes, got {}",
            n.div_ceil(2),
            packed.len()
        )));
    }
    if absmax.len() < num_blocks(n, blocksize) {
        return Err(Error::InvalidArgument(format!(
            "{n} elements in blocks of {blocksize} need {} absmax values, got {}",
            num_blocks(n, blocksize),
            absmax.len()
        )));
    }
    let table = quant_type.dequant_table();
    let blocks_per_task = (ELEMENTS_PER_TASK / blocksize).max(1);
    let span = blocks_per_task * blocksize;
    out.par_chunks_mut(span)
        .zip(packed.par_chunks(span / 2))
        .zip(absmax.par_chunks(blocks_per_task))
        .for_each(|((o, p), a)| dequantize_run_dispatch(p, a, &table, blocksize, o));
    Ok(())
}

/// [`dequantize_4bit_into`] into a new vector of `n` elements.
pub fn dequantize_4bit<O: OutElement>(
    packed: &[u8],
    absmax: &[f32],
    n: usize,
    blocksize: usize,
    quant_type: QuantType,
) -> Result<Vec<O>> {
    let mut out = output_vec::<O>(n);
    dequantize_4bit_into(packed, absmax, blocksize, quant_type, &mut out)?;
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// 8-bit dynamic quantization (double quantization of absmax)
// ---------------------------------------------------------------------------------------------

/// `torch.linspace(0.1, 1, steps, dtype=float32)` on the CPU: the first half `start + step*i`,
/// the second `end - step*(steps-1-i)`, each one fused multiply-add.
fn linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    let step = (end - start) / (steps - 1) as f32;
    let half = steps / 2;
    (0..steps)
        .map(|i| {
            if i < half {
                step.mul_add(i as f32, start)
            } else {
                (-step).mul_add((steps - 1 - i) as f32, end)
            }
        })
        .collect()
}

/// bitsandbytes' signed 8-bit dynamic map (`create_dynamic_map(signed=True)`): for exponents
/// `e = 0..7`, `2^e` fraction values `10^(e-6) * mean(linspace(0.1, 1))` and their negatives,
/// plus 0 and 1, sorted (256 values).
pub fn dynamic_map_signed() -> [f32; 256] {
    let max_exponent_bits = 7;
    let mut data: Vec<f32> = Vec::with_capacity(256);
    for i in 0..max_exponent_bits {
        let boundaries = linspace_f32(0.1, 1.0, (1 << i) + 1);
        let scale = 10f64.powi(i - (max_exponent_bits - 1)) as f32;
        for w in boundaries.windows(2) {
            let mean = (w[0] + w[1]) / 2.0;
            data.push(scale * mean);
        }
        for w in boundaries.windows(2) {
            let mean = (w[0] + w[1]) / 2.0;
            data.push(-scale * mean);
        }
    }
    data.push(0.0);
    data.push(1.0);
    data.sort_by(f32::total_cmp);
    let mut map = [0f32; 256];
    map.copy_from_slice(&data);
    map
}

/// The kernel's 8-bit code of a scaled value `x`: a 7-step binary search over the sorted map from
/// index 127, then the nearer of the final pivot and its neighbour by midpoint (ties to the pivot).
#[inline]
pub fn quantize_dynamic_8bit(code: &[f32; 256], x: f32) -> u8 {
    let mut pivot = 127usize;
    let mut upper_pivot = 255usize;
    let mut lower_pivot = 0usize;
    let mut lower = -1.0f32;
    let mut upper = 1.0f32;
    let mut val = code[pivot];
    let mut step = 64;
    while step > 0 {
        if x > val {
            lower_pivot = pivot;
            lower = val;
            pivot += step;
        } else {
            upper_pivot = pivot;
            upper = val;
            pivot -= step;
        }
        val = code[pivot];
        step >>= 1;
    }
    if upper_pivot == 255 {
        upper = code[upper_pivot];
    }
    if lower_pivot == 0 {
        lower = code[lower_pivot];
    }
    if x > val {
        let midpoint = (upper + val) * 0.5;
        if x > midpoint {
            upper_pivot as u8
        } else {
            pivot as u8
        }
    } else {
        let midpoint = (lower + val) * 0.5;
        if x < midpoint {
            lower_pivot as u8
        } else {
            pivot as u8
        }
    }
}

/// Blockwise 8-bit quantization of fp32 values with `code` (bitsandbytes' CUDA
/// `quantize_blockwise`): one code per element, one absmax per block.
pub fn quantize_blockwise_8bit(
    input: &[f32],
    code: &[f32; 256],
    blocksize: usize,
) -> (Vec<u8>, Vec<f32>) {
    let mut out = vec![0u8; input.len()];
    let mut absmax = vec![0f32; num_blocks(input.len(), blocksize)];
    out.par_chunks_mut(blocksize)
        .zip(input.par_chunks(blocksize))
        .zip(absmax.par_iter_mut())
        .for_each(|((o, block), a)| {
            *a = block_absmax(block, block.len() < blocksize);
            let inv = rcp(*a);
            for (q, &x) in o.iter_mut().zip(block) {
                *q = quantize_dynamic_8bit(code, ftz(ftz(x) * inv));
            }
        });
    (out, absmax)
}

/// The double-quantized absmax of a 4-bit tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct NestedAbsmax {
    /// One 8-bit code per 4-bit block (`absmax` in bitsandbytes' state dict).
    pub codes: Vec<u8>,
    /// One fp32 scale per 256 codes (`nested_absmax`).
    pub absmax: Vec<f32>,
    /// The subtracted mean (`nested_offset`).
    pub offset: f32,
}

/// `mean(absmax)` as torch's CUDA reduction forms it (`sum * (1.0f / n)`); the sum is taken
/// exactly and rounded once, where the GPU rounds per partial sum (see the module docs).
pub fn absmax_mean(absmax: &[f32]) -> f32 {
    if absmax.is_empty() {
        return f32::NAN;
    }
    let sum: f64 = absmax.iter().map(|&a| a as f64).sum();
    (sum as f32) * (1.0f32 / absmax.len() as f32)
}

/// Double quantization: `absmax - offset` quantized to 8 bits in blocks of 256 with the signed
/// dynamic map. `offset` defaults to [`absmax_mean`].
pub fn quantize_nested(absmax: &[f32], offset: Option<f32>) -> NestedAbsmax {
    let offset = offset.unwrap_or_else(|| absmax_mean(absmax));
    let centred: Vec<f32> = absmax.iter().map(|&a| a - offset).collect();
    let (codes, nested) =
        quantize_blockwise_8bit(&centred, &dynamic_map_signed(), NESTED_BLOCKSIZE);
    NestedAbsmax {
        codes,
        absmax: nested,
        offset,
    }
}

/// The fp32 absmax back from its double quantization: `CODE8[q] * absmax2[block] + offset`.
pub fn dequantize_nested(
    codes: &[u8],
    nested_absmax: &[f32],
    code: &[f32; 256],
    offset: f32,
) -> Result<Vec<f32>> {
    if nested_absmax.len() < num_blocks(codes.len(), NESTED_BLOCKSIZE) {
        return Err(Error::InvalidArgument(format!(
            "{} nested codes need {} nested absmax values, got {}",
            codes.len(),
            num_blocks(codes.len(), NESTED_BLOCKSIZE),
            nested_absmax.len()
        )));
    }
    Ok(codes
        .iter()
        .enumerate()
        .map(|(i, &q)| ftz(code[q as usize] * nested_absmax[i / NESTED_BLOCKSIZE]) + offset)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plain one-element-at-a-time version of the kernel (the comparison tree as nested ifs).
    fn tree_nf4(p: f32) -> u8 {
        let t = NF4_THRESHOLDS;
        if p > t[7] {
            if p > t[11] {
                if p > t[13] {
                    if p > t[14] {
                        15
                    } else {
                        14
                    }
                } else if p > t[12] {
                    13
                } else {
                    12
                }
            } else if p > t[9] {
                if p > t[10] {
                    11
                } else {
                    10
                }
            } else if p > t[8] {
                9
            } else {
                8
            }
        } else if p > t[3] {
            if p > t[5] {
                if p > t[6] {
                    7
                } else {
                    6
                }
            } else if p > t[4] {
                5
            } else {
                4
            }
        } else if p > t[1] {
            if p > t[2] {
                3
            } else {
                2
            }
        } else if p > t[0] {
            1
        } else {
            0
        }
    }

    #[test]
    fn counting_thresholds_equals_the_comparison_tree() {
        let mut probes: Vec<f32> = vec![f32::NAN, 0.0, -0.0, 1.0, -1.0, 2.0, -2.0];
        for t in NF4_THRESHOLDS {
            probes.extend([
                t,
                f32::from_bits(t.to_bits() + 1),
                f32::from_bits(t.to_bits() - 1),
            ]);
        }
        for i in 0..20001 {
            probes.push(-1.0 + i as f32 * 1e-4);
        }
        for p in probes {
            assert_eq!(nf4_code(p), tree_nf4(p), "p = {p:e}");
        }
    }

    #[test]
    fn edge_blocks_follow_the_cuda_kernel() {
        // An all-zero block: absmax 0, every code 0 (NaN compares false).
        let q = quantize_4bit(&[0f32; 64], 64, QuantType::Nf4).unwrap();
        assert_eq!(q.absmax, vec![0.0]);
        assert!(q.packed.iter().all(|&b| b == 0));
        // A value exactly on a threshold takes the lower code.
        let mut x = vec![0f32; 64];
        x[0] = 1.0;
        x[1] = NF4_THRESHOLDS[14];
        let q = quantize_4bit(&x, 64, QuantType::Nf4).unwrap();
        assert_eq!(q.packed[0], 0xFE);
        // Odd count: the padding nibble is code 7 (zero).
        let q = quantize_4bit(&[0.5f32, -1.0, 0.25], 64, QuantType::Nf4).unwrap();
        assert_eq!(q.packed.len(), 2);
        assert_eq!(q.packed[1] & 15, 7);
        assert_eq!(q.absmax, vec![1.0]);
        // Dequantizing the all-zero block gives -0.0.
        let d: Vec<f32> = dequantize_4bit(&[0u8; 32], &[0.0], 64, 64, QuantType::Nf4).unwrap();
        assert!(d.iter().all(|v| *v == 0.0 && v.is_sign_negative()));
    }

    #[test]
    fn roundtrip_error_is_within_half_a_code_step() {
        let x: Vec<f32> = (0..4096)
            .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        for qt in [QuantType::Nf4, QuantType::Fp4] {
            for bs in [32, 64, 128, 4096] {
                let q = quantize_4bit(&x, bs, qt).unwrap();
                let d: Vec<f32> = dequantize_4bit(&q.packed, &q.absmax, x.len(), bs, qt).unwrap();
                for (a, b) in x.iter().zip(&d) {
                    assert!((a - b).abs() <= 0.17, "{qt:?} {bs}: {a} -> {b}");
                }
            }
        }
    }

    #[test]
    fn dynamic_map_is_sorted_symmetric_and_complete() {
        let m = dynamic_map_signed();
        assert!(m.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(m[255], 1.0);
        assert!(m.contains(&0.0));
        for q in [0u8, 1, 17, 127, 128, 200, 254, 255] {
            assert_eq!(quantize_dynamic_8bit(&m, m[q as usize]), q);
        }
    }

    #[test]
    fn nested_roundtrip_is_close() {
        let absmax: Vec<f32> = (0..1000).map(|i| 0.01 + (i % 37) as f32 * 1e-3).collect();
        let n = quantize_nested(&absmax, None);
        assert_eq!(n.absmax.len(), 4);
        let back = dequantize_nested(&n.codes, &n.absmax, &dynamic_map_signed(), n.offset).unwrap();
        for (a, b) in absmax.iter().zip(&back) {
            assert!((a - b).abs() < 2e-4, "{a} {b}");
        }
    }

    #[test]
    fn rejects_bad_blocksizes() {
        for bs in [0, 16, 48, 8192] {
            assert!(quantize_4bit(&[0f32; 4], bs, QuantType::Nf4).is_err());
        }
    }
}
