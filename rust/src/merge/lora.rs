//! The LoRA merge of one weight, row by row in f32:
//!
//!   W' = W + s · B A                       (LoRA; s = alpha / r, or alpha / sqrt(r) for rsLoRA)
//!   W' = m ⊙ (W + s · B A) / ‖W + s · B A‖  (DoRA; the norm of each output row, as PEFT's
//!                                            `get_weight_norm` over dim 1 of the (out, in) weight)
//!
//! Both are written as `W' = f(W + C · P)` with `C` (rows, r) the per-row coefficients and `P`
//! (r, cols) the shared basis, in the stored layout of W: for `nn.Linear` C = s·B and P = A; for
//! transposed layouts (fan_in_fan_out Conv1D, embeddings) C = s·Aᵀ and P = Bᵀ. Each output row is
//! then W_i + Σ_k C_ik P_k: r fused multiply-adds per element, rows in parallel (rayon), the
//! basis small enough to stay in cache. BF16 weights without DoRA skip the f32 working rows: each
//! block of four rows goes from stored bytes to stored bytes in registers (`merge_bf16_rows`),
//! bit for bit the same result. [`merge_reference`] is the plain triple loop beside it.

use rayon::prelude::*;

use super::convert::{bf16_bits, from_f32, to_f32};
use crate::io::Dtype;

/// The low-rank update of one stored weight: `delta = coeff (rows, r) @ basis (r, cols)`.
pub struct LowRank {
    pub rows: usize,
    pub cols: usize,
    pub rank: usize,
    /// (rows, r), row-major, already multiplied by the scaling.
    pub coeff: Vec<f32>,
    /// (r, cols), row-major.
    pub basis: Vec<f32>,
}

impl LowRank {
    /// From `nn.Linear` factors: A (r, in), B (out, r); the weight is (out, in).
    pub fn linear(a: &[f32], b: &[f32], rank: usize, scale: f32) -> Self {
        let (rows, cols) = (b.len() / rank, a.len() / rank);
        LowRank {
            rows,
            cols,
            rank,
            coeff: b.iter().map(|x| x * scale).collect(),
            basis: a.to_vec(),
        }
    }

    /// From factors whose product is stored transposed: weight (rows, cols) += s (B A)ᵀ with
    /// A (r, rows) and B (cols, r).
    pub fn transposed(a: &[f32], b: &[f32], rank: usize, scale: f32) -> Self {
        let (rows, cols) = (a.len() / rank, b.len() / rank);
        let mut coeff = vec![0f32; rows * rank];
        for k in 0..rank {
            for i in 0..rows {
                coeff[i * rank + k] = a[k * rows + i] * scale;
            }
        }
        let mut basis = vec![0f32; rank * cols];
        for j in 0..cols {
            for k in 0..rank {
                basis[k * cols + j] = b[j * rank + k];
            }
        }
        LowRank {
            rows,
            cols,
            rank,
            coeff,
            basis,
        }
    }
}

/// Merges `delta` into the weight `w` (bytes of `dtype`, (rows, cols)), returning the merged
/// weight in the same dtype. With `magnitude` (rows,), applies DoRA's row renormalisation.
pub fn merge_weight(w: &[u8], dtype: Dtype, delta: &LowRank, magnitude: Option<&[f32]>) -> Vec<u8> {
    let mut out = vec![0u8; w.len()];
    merge_weight_into(w, dtype, delta, magnitude, &mut out);
    out
}

/// Output rows (of W) per parallel task: decoded, updated and rounded together.
const ROWS_PER_TASK: usize = 16;
/// Bytes of merged rows [`merge_weight_to`] hands out at a time: pieces this large cost the
/// output file few calls (measured on the 2.2 GB merge: pieces of 16 rows of 4 KiB took 0.3 s
/// longer, in system time), and still fit in a core's cache.
const PIECE_BYTES: usize = 512 << 10;

/// [`merge_weight`] into `out` (bytes of `dtype`, the size of `w`); every byte of `out` is
/// written.
pub fn merge_weight_into(
    w: &[u8],
    dtype: Dtype,
    delta: &LowRank,
    magnitude: Option<&[f32]>,
    out: &mut [u8],
) {
    let row_bytes = delta.cols * dtype.size();
    assert_eq!(
        w.len(),
        delta.rows * row_bytes,
        "weight and update shapes differ"
    );
    assert_eq!(out.len(), w.len(), "output and weight sizes differ");
    if out.is_empty() {
        return;
    }
    out.par_chunks_mut(row_bytes * ROWS_PER_TASK)
        .enumerate()
        .for_each_init(Vec::new, |acc, (task, out_rows)| {
            merge_rows(
                w,
                dtype,
                delta,
                magnitude,
                task * ROWS_PER_TASK,
                out_rows,
                acc,
            )
        });
}

/// [`merge_weight`] handed out in pieces as they are computed: `emit(byte_offset, bytes)` gets
/// the merged weight's rows about [`PIECE_BYTES`] at a time, from the rayon threads, in no
/// particular order, so the whole merged tensor is never held (the output file takes each piece
/// from a buffer still in cache). Stops at the first error `emit` returns.
pub fn merge_weight_to(
    w: &[u8],
    dtype: Dtype,
    delta: &LowRank,
    magnitude: Option<&[f32]>,
    emit: &(dyn Fn(usize, &[u8]) -> crate::error::Result<()> + Sync),
) -> crate::error::Result<()> {
    let row_bytes = delta.cols * dtype.size();
    assert_eq!(
        w.len(),
        delta.rows * row_bytes,
        "weight and update shapes differ"
    );
    // whole blocks of four rows (the fused BF16 kernel's) where a piece holds several
    let rows_per_piece = match PIECE_BYTES / row_bytes.max(1) {
        0 => 1,
        n @ 1..=7 => n,
        n => n / 4 * 4,
    };
    (0..delta.rows.div_ceil(rows_per_piece))
        .into_par_iter()
        .try_for_each_init(
            || (Vec::new(), Vec::new()),
            |(acc, piece): &mut (Vec<f32>, Vec<u8>), task| {
                let first = task * rows_per_piece;
                let here = rows_per_piece.min(delta.rows - first);
                piece.resize(here * row_bytes, 0);
                merge_rows(w, dtype, delta, magnitude, first, piece, acc);
                emit(first * row_bytes, piece)
            },
        )
}

/// Merges the rows of `w` from `first` on into `out_rows` (as many rows as it holds), `acc` the
/// caller's f32 working space.
fn merge_rows(
    w: &[u8],
    dtype: Dtype,
    delta: &LowRank,
    magnitude: Option<&[f32]>,
    mut first: usize,
    mut out_rows: &mut [u8],
    acc: &mut Vec<f32>,
) {
    let (cols, rank) = (delta.cols, delta.rank);
    let row_bytes = cols * dtype.size();
    let mut here = out_rows.len() / row_bytes;
    if magnitude.is_none() && dtype == Dtype::BF16 {
        // Whole blocks of four rows straight from stored bytes to stored bytes.
        let fused = merge_bf16_rows(
            &w[first * row_bytes..(first + here) * row_bytes],
            out_rows,
            cols,
            &delta.coeff[first * rank..(first + here) * rank],
            &delta.basis,
        );
        first += fused;
        here -= fused;
        out_rows = &mut out_rows[fused * row_bytes..];
        if here == 0 {
            return;
        }
    }
    // (here, cols): the rows in f32, updated together so each basis load serves several rows
    acc.resize(here * cols, 0.0);
    to_f32(
        &w[first * row_bytes..(first + here) * row_bytes],
        dtype,
        acc,
    );
    add_combinations(
        acc,
        cols,
        &delta.coeff[first * rank..(first + here) * rank],
        &delta.basis,
    );
    for (offset, (row, out_row)) in acc
        .chunks_exact_mut(cols)
        .zip(out_rows.chunks_exact_mut(row_bytes))
        .enumerate()
    {
        if let Some(m) = magnitude {
            let norm = row.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
            let factor = (m[first + offset] as f64 / norm) as f32;
            row.iter_mut().for_each(|x| *x *= factor);
        }
        from_f32(row, dtype, out_row);
    }
}

/// The LoRA update of BF16 rows `w` (m, n) into `out` without an f32 working copy, for as many
/// whole blocks of four rows as the CPU's kernel takes (AVX2 + FMA; none elsewhere); returns
/// the rows done. Per element the same operations in the same order as `to_f32`, then
/// [`add_combinations`], then `from_f32` (bit for bit, tested): the stored weight decoded, the
/// rank's fused multiply-adds in order, one rounding to nearest even.
fn merge_bf16_rows(w: &[u8], out: &mut [u8], n: usize, coeff: &[f32], basis: &[f32]) -> usize {
    let m = w.len().checked_div(2 * n).unwrap_or(0);
    let rank = basis.len().checked_div(n).unwrap_or(0);
    assert!(w.len() == 2 * m * n && out.len() == w.len());
    assert!(coeff.len() == m * rank && basis.len() == rank * n);
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            let blocks = m / 4;
            for b in 0..blocks {
                // SAFETY: the CPU supports the features; four rows of the checked shapes.
                unsafe {
                    merge_four_bf16_rows_avx2(
                        &w[b * 8 * n..(b + 1) * 8 * n],
                        &mut out[b * 8 * n..(b + 1) * 8 * n],
                        &coeff[b * 4 * rank..(b + 1) * 4 * rank],
                        basis,
                        n,
                        rank,
                    )
                };
            }
            return blocks * 4;
        }
    }
    0
}

/// [`add_four_rows_avx2`] reading the four rows from BF16 bytes and writing them back rounded:
/// 16 columns at a time decoded (a shift), updated over the whole rank in registers, rounded
/// to nearest even (NaN kept quiet, as `bf16_bits`) and packed.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn merge_four_bf16_rows_avx2(
    w: &[u8],
    out: &mut [u8],
    coeff: &[f32],
    basis: &[f32],
    n: usize,
    rank: usize,
) {
    use std::arch::x86_64::*;
    assert!(w.len() == 8 * n && out.len() == 8 * n);
    let (w_ptr, out_ptr) = (w.as_ptr(), out.as_mut_ptr());
    let decode = |at: usize| {
        // SAFETY (at the call): 8 elements (16 bytes) of the checked rows from element `at`.
        let halves = unsafe { _mm_loadu_si128(w_ptr.add(2 * at) as *const __m128i) };
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(halves)))
    };
    let round = |v: __m256| {
        let bits = _mm256_castps_si256(v);
        let odd = _mm256_and_si256(_mm256_srli_epi32::<16>(bits), _mm256_set1_epi32(1));
        let bias = _mm256_add_epi32(_mm256_set1_epi32(0x7fff), odd);
        let rounded = _mm256_srli_epi32::<16>(_mm256_add_epi32(bits, bias));
        let quiet = _mm256_or_si256(_mm256_srli_epi32::<16>(bits), _mm256_set1_epi32(0x40));
        let nan = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_UNORD_Q>(v, v));
        _mm256_blendv_epi8(rounded, quiet, nan)
    };
    // SAFETY: the asserts here and in the core bound every element index to the 4 rows of n.
    unsafe {
        update_four_rows_avx2(
            coeff,
            basis,
            n,
            rank,
            |at| [decode(at), decode(at + 8)],
            |at, pair: [__m256; 2]| {
                // 32-bit lanes holding 16-bit values: pack (per 128-bit half), then reorder
                let packed = _mm256_packus_epi32(round(pair[0]), round(pair[1]));
                let ordered = _mm256_permute4x64_epi64::<0b11_01_10_00>(packed);
                _mm256_storeu_si256(out_ptr.add(2 * at) as *mut __m256i, ordered);
            },
            |at| {
                f32::from_bits(
                    (u16::from_le_bytes([*w_ptr.add(2 * at), *w_ptr.add(2 * at + 1)]) as u32) << 16,
                )
            },
            |at, a| {
                let bytes = bf16_bits(a).to_le_bytes();
                *out_ptr.add(2 * at) = bytes[0];
                *out_ptr.add(2 * at + 1) = bytes[1];
            },
        )
    }
}

/// `rows (m, n) += coeff (m, r) @ basis (r, n)`: row `i` gets `Σ_k coeff[i, k] · basis[k, :]`,
/// summed in [`add_combination`]'s order (so the result is the same, bit for bit).
pub(crate) fn add_combinations(rows: &mut [f32], n: usize, coeff: &[f32], basis: &[f32]) {
    let m = rows.len().checked_div(n).unwrap_or(0);
    let rank = basis.len().checked_div(n).unwrap_or(0);
    assert!(rows.len() == m * n && coeff.len() == m * rank && basis.len() == rank * n);
    let mut i = 0;
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            while i + 4 <= m {
                // SAFETY: the CPU supports the features; the slices are 4 rows of the checked
                // shapes.
                unsafe {
                    add_four_rows_avx2(
                        &mut rows[i * n..(i + 4) * n],
                        &coeff[i * rank..(i + 4) * rank],
                        basis,
                        n,
                        rank,
                    )
                };
                i += 4;
            }
        }
    }
    for i in i..m {
        add_combination(
            &mut rows[i * n..(i + 1) * n],
            &coeff[i * rank..(i + 1) * rank],
            basis,
        );
    }
}

/// Four f32 rows updated in place through [`update_four_rows_avx2`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn add_four_rows_avx2(
    rows: &mut [f32],
    coeff: &[f32],
    basis: &[f32],
    n: usize,
    rank: usize,
) {
    use std::arch::x86_64::*;
    assert!(rows.len() == 4 * n);
    let acc = rows.as_mut_ptr();
    // SAFETY: the asserts here and in the core bound every element index to the 4 rows of n.
    unsafe {
        update_four_rows_avx2(
            coeff,
            basis,
            n,
            rank,
            |at| {
                [
                    _mm256_loadu_ps(acc.add(at)),
                    _mm256_loadu_ps(acc.add(at + 8)),
                ]
            },
            |at, pair: [__m256; 2]| {
                _mm256_storeu_ps(acc.add(at), pair[0]);
                _mm256_storeu_ps(acc.add(at + 8), pair[1]);
            },
            |at| *acc.add(at),
            |at, a| *acc.add(at) = a,
        )
    }
}

/// The core of both four-row kernels: four rows of n columns, 16 columns at a time held in
/// registers across the whole rank (per basis row, two loads and four broadcasts feed eight
/// FMAs, where the one-row loop re-reads and re-writes the row for every pair of basis rows).
/// `load(at)` gives the 16 values from element index `at` (row · n + column) as two 8-lane
/// vectors, `store(at, v)` takes them back; `load1` / `store1` do one element, for the last
/// n mod 16 columns. Every element gets the rank's fused multiply-adds in order k = 0, 1, ….
///
/// SAFETY: `load`, `store`, `load1` and `store1` must be valid for every element index of the
/// four rows (0 ≤ at < 4n; the 16-wide ones at column ≤ n − 16).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
#[allow(clippy::too_many_arguments)]
unsafe fn update_four_rows_avx2(
    coeff: &[f32],
    basis: &[f32],
    n: usize,
    rank: usize,
    load: impl Fn(usize) -> [std::arch::x86_64::__m256; 2],
    mut store: impl FnMut(usize, [std::arch::x86_64::__m256; 2]),
    load1: impl Fn(usize) -> f32,
    mut store1: impl FnMut(usize, f32),
) {
    use std::arch::x86_64::*;
    assert!(coeff.len() == 4 * rank && basis.len() == rank * n);
    let body = n / 16 * 16;
    let basis_ptr = basis.as_ptr();
    // SAFETY: j + 16 <= body <= n within each basis row (the assert); the row accesses are the
    // caller's contract.
    unsafe {
        let mut j = 0;
        while j < body {
            let mut acc = [0, 1, 2, 3].map(|row| load(row * n + j));
            for k in 0..rank {
                let p0 = _mm256_loadu_ps(basis_ptr.add(k * n + j));
                let p1 = _mm256_loadu_ps(basis_ptr.add(k * n + j + 8));
                for (row, pair) in acc.iter_mut().enumerate() {
                    let c = _mm256_broadcast_ss(&coeff[row * rank + k]);
                    pair[0] = _mm256_fmadd_ps(p0, c, pair[0]);
                    pair[1] = _mm256_fmadd_ps(p1, c, pair[1]);
                }
            }
            for (row, pair) in acc.into_iter().enumerate() {
                store(row * n + j, pair);
            }
            j += 16;
        }
    }
    for row in 0..4 {
        for j in body..n {
            let mut a = load1(row * n + j);
            for k in 0..rank {
                a = basis[k * n + j].mul_add(coeff[row * rank + k], a);
            }
            store1(row * n + j, a);
        }
    }
}

/// `acc += Σ_k coeff[k] · basis[k, :]` (basis is (coeff.len(), acc.len())).
pub(crate) fn add_combination(acc: &mut [f32], coeff: &[f32], basis: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports the features the function is compiled for.
            unsafe { add_combination_avx2(acc, coeff, basis) };
            return;
        }
    }
    add_combination_plain(acc, coeff, basis);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn add_combination_avx2(acc: &mut [f32], coeff: &[f32], basis: &[f32]) {
    // The same loop as the plain version; compiled with AVX2+FMA it vectorises 8 lanes wide.
    add_combination_plain(acc, coeff, basis);
}

#[inline(always)]
fn add_combination_plain(acc: &mut [f32], coeff: &[f32], basis: &[f32]) {
    let n = acc.len();
    // Two basis rows per pass halves the traffic on `acc`.
    let mut k = 0;
    while k + 1 < coeff.len() {
        let (c0, c1) = (coeff[k], coeff[k + 1]);
        let (p0, p1) = (&basis[k * n..(k + 1) * n], &basis[(k + 1) * n..(k + 2) * n]);
        for ((a, x0), x1) in acc.iter_mut().zip(p0).zip(p1) {
            *a = x1.mul_add(c1, x0.mul_add(c0, *a));
        }
        k += 2;
    }
    if k < coeff.len() {
        let c0 = coeff[k];
        for (a, x0) in acc.iter_mut().zip(&basis[k * n..(k + 1) * n]) {
            *a = x0.mul_add(c0, *a);
        }
    }
}

/// Plain reference: `delta = B @ A` by the textbook triple loop in f64 on the (out, in) layout,
/// then W + s·delta (and DoRA), transposed back when the layout is transposed.
/// Returns f32 values of the merged weight before rounding to the storage dtype.
pub fn merge_reference(
    w: &[f32],
    a: &[f32],
    b: &[f32],
    rank: usize,
    scale: f64,
    transposed: bool,
    magnitude: Option<&[f32]>,
) -> Vec<f32> {
    // In the reference, (out, in) is the logical layout: for transposed layouts "out" is cols.
    let (out_dim, in_dim) = (b.len() / rank, a.len() / rank);
    let mut merged = vec![0f64; out_dim * in_dim]; // (out, in)
    for o in 0..out_dim {
        for i in 0..in_dim {
            let mut d = 0f64;
            for k in 0..rank {
                d += b[o * rank + k] as f64 * a[k * in_dim + i] as f64;
            }
            let stored = if transposed {
                i * out_dim + o
            } else {
                o * in_dim + i
            };
            merged[o * in_dim + i] = w[stored] as f64 + scale * d;
        }
    }
    if let Some(m) = magnitude {
        // DoRA on the logical (out, in) weight; PEFT does not combine it with transposed layouts.
        for o in 0..out_dim {
            let row = &mut merged[o * in_dim..(o + 1) * in_dim];
            let norm = row.iter().map(|x| x * x).sum::<f64>().sqrt();
            row.iter_mut().for_each(|x| *x *= m[o] as f64 / norm);
        }
    }
    let mut stored = vec![0f32; w.len()];
    for o in 0..out_dim {
        for i in 0..in_dim {
            let at = if transposed {
                i * out_dim + o
            } else {
                o * in_dim + i
            };
            stored[at] = merged[o * in_dim + i] as f32;
        }
    }
    stored
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merge::convert::{tensor_from_f32, tensor_to_f32};
    use crate::merge::test_data::random;

    fn check(rows: usize, cols: usize, rank: usize, transposed: bool, dora: bool, dtype: Dtype) {
        let w = random(rows * cols, 1);
        let (out_dim, in_dim) = if transposed {
            (cols, rows)
        } else {
            (rows, cols)
        };
        let a = random(rank * in_dim, 2);
        let b = random(out_dim * rank, 3);
        let m: Vec<f32> = random(out_dim, 4).iter().map(|x| x + 1.0).collect();
        let magnitude = dora.then_some(&m[..]);
        let scale = 0.75f32;
        let delta = if transposed {
            LowRank::transposed(&a, &b, rank, scale)
        } else {
            LowRank::linear(&a, &b, rank, scale)
        };
        let w_bytes = tensor_from_f32(&w, dtype);
        let w_stored = tensor_to_f32(&w_bytes, dtype);
        let fast = tensor_to_f32(&merge_weight(&w_bytes, dtype, &delta, magnitude), dtype);
        let reference =
            merge_reference(&w_stored, &a, &b, rank, scale as f64, transposed, magnitude);
        let tolerance = match dtype {
            Dtype::F32 => 1e-5,
            _ => 1e-2,
        };
        for (x, y) in fast.iter().zip(&reference) {
            assert!(
                (x - y).abs() <= tolerance * (1.0 + y.abs()),
                "{x} vs {y} ({dtype})"
            );
        }
    }

    #[test]
    fn row_blocks_match_the_one_row_loop_bit_for_bit() {
        for (m, n, rank) in [
            (4, 16, 16),
            (9, 37, 5),
            (8, 2048, 16),
            (3, 20, 1),
            (5, 33, 0),
        ] {
            let coeff = random(m * rank, 5);
            let basis = random(rank * n, 6);
            let mut blocked = random(m * n, 7);
            let mut single = blocked.clone();
            add_combinations(&mut blocked, n, &coeff, &basis);
            for i in 0..m {
                add_combination(
                    &mut single[i * n..][..n],
                    &coeff[i * rank..][..rank],
                    &basis,
                );
            }
            assert!(blocked
                .iter()
                .zip(&single)
                .all(|(a, b)| a.to_bits() == b.to_bits()));
        }
    }

    #[test]
    fn fused_bf16_rows_match_the_f32_working_copy_bit_for_bit() {
        // special values among the weights: signed zeros, infinities, NaN, a subnormal, ties
        let specials: [u16; 8] = [
            0x0000, 0x8000, 0x7f80, 0xff80, 0x7fc1, 0x0001, 0x3f81, 0xbf7f,
        ];
        for (rows, cols, rank) in [
            (4, 16, 16),
            (9, 37, 5),
            (8, 2053, 16),
            (5, 16, 1),
            (4, 7, 3),
        ] {
            let mut w = tensor_from_f32(&random(rows * cols, 11), Dtype::BF16);
            for (i, bits) in specials.iter().enumerate().take(rows * cols) {
                let at = 2 * (i * 7 % (rows * cols));
                w[at..at + 2].copy_from_slice(&bits.to_le_bytes());
            }
            let a = random(rank * cols, 12);
            let b: Vec<f32> = random(rows * rank, 13).iter().map(|x| x * 3.0).collect();
            let delta = LowRank::linear(&a, &b, rank, 0.5);
            let mut fused = vec![0u8; w.len()];
            merge_weight_into(&w, Dtype::BF16, &delta, None, &mut fused);
            // the general path: f32 working rows, one row at a time, rounded by `from_f32`
            let mut expected = vec![0u8; w.len()];
            let mut row = vec![0f32; cols];
            for i in 0..rows {
                to_f32(&w[2 * i * cols..2 * (i + 1) * cols], Dtype::BF16, &mut row);
                add_combination(
                    &mut row,
                    &delta.coeff[i * rank..(i + 1) * rank],
                    &delta.basis,
                );
                from_f32(
                    &row,
                    Dtype::BF16,
                    &mut expected[2 * i * cols..2 * (i + 1) * cols],
                );
            }
            assert!(fused == expected, "{rows}x{cols} rank {rank}");
        }
    }

    #[test]
    fn pieces_assemble_into_the_whole_merge() {
        use std::sync::Mutex;
        // 260 BF16 rows of 2000 bytes a piece; 64 F32 rows of 8000 bytes; one small piece
        for (rows, cols, dtype, dora, expected_pieces) in [
            (530, 1000, Dtype::BF16, false, 3),
            (150, 2000, Dtype::F32, true, 3),
            (40, 24, Dtype::F16, true, 1),
        ] {
            let w = tensor_from_f32(&random(rows * cols, 21), dtype);
            let delta = LowRank::linear(&random(3 * cols, 22), &random(rows * 3, 23), 3, 0.5);
            let m: Vec<f32> = random(rows, 24).iter().map(|x| x + 1.0).collect();
            let magnitude = dora.then_some(&m[..]);
            let whole = merge_weight(&w, dtype, &delta, magnitude);
            let assembled = Mutex::new(vec![0u8; w.len()]);
            let pieces = Mutex::new(0);
            merge_weight_to(&w, dtype, &delta, magnitude, &|at, bytes| {
                assembled.lock().unwrap()[at..at + bytes.len()].copy_from_slice(bytes);
                *pieces.lock().unwrap() += 1;
                Ok(())
            })
            .unwrap();
            assert!(
                assembled.into_inner().unwrap() == whole,
                "{rows}x{cols} {dtype}"
            );
            assert_eq!(
                pieces.into_inner().unwrap(),
                expected_pieces,
                "{rows}x{cols}"
            );
        }
    }

    #[test]
    fn fast_merge_agrees_with_the_reference() {
        for dtype in [Dtype::F32, Dtype::BF16, Dtype::F16] {
            check(37, 53, 5, false, false, dtype);
            check(37, 53, 4, true, false, dtype);
            check(70, 33, 3, false, true, dtype);
        }
        check(1, 1, 1, false, false, Dtype::F32);
    }
}
