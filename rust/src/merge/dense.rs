//! The f32 arithmetic of the probe's forward pass (`forward.rs`), on row-major matrices:
//!
//!   matmul      yᵀ (out, n) = W (out, in) · xᵀ, W streamed from its stored bytes (BF16, F16,
//!               F32, F64) a few rows at a time, rows in parallel; the n inputs stay in cache
//!   rms_norm    y = w ⊙ x / sqrt(mean(x²) + eps), per row of `dim`
//!   rope        HF's "rotate half": (x1, x2) -> (x1 cos − x2 sin, x2 cos + x1 sin) per head
//!   attention   causal softmax(q kᵀ / sqrt(d)) v with grouped-query heads and an optional window
//!   activation  silu, gelu (erf) and gelu (tanh)
//!
//! [`matmul_reference`] is the plain triple loop in f64 beside the fast matmul.

use rayon::prelude::*;

use super::convert::to_f32;
use crate::io::Dtype;

/// Output rows (of W) per parallel task: converted once to f32, then dotted with every input.
const ROWS_PER_TASK: usize = 8;

/// `out_t[r, t] = Σ_i W[r, i] · x[t, i]` for the `out_t.len() / n` rows of W stored in `w`
/// (bytes of `dtype`, each row `in_dim` elements) and the `n` inputs `x` (n, in_dim).
pub fn matmul_transposed(
    w: &[u8],
    dtype: Dtype,
    in_dim: usize,
    x: &[f32],
    n: usize,
    out_t: &mut [f32],
) {
    let rows = out_t.len().checked_div(n).unwrap_or(0);
    let row_bytes = in_dim * dtype.size();
    assert_eq!(
        w.len(),
        rows * row_bytes,
        "weight bytes and output rows differ"
    );
    assert_eq!(x.len(), n * in_dim, "inputs are not (n, in_dim)");
    if rows == 0 {
        return;
    }
    out_t
        .par_chunks_mut(ROWS_PER_TASK * n)
        .enumerate()
        .for_each_init(Vec::new, |rows_f32: &mut Vec<f32>, (task, out)| {
            let here = out.len() / n;
            let first = task * ROWS_PER_TASK;
            let stored = &w[first * row_bytes..(first + here) * row_bytes];
            if dtype == Dtype::BF16 && dots_bf16(stored, here, in_dim, x, n, out) {
                return;
            }
            rows_f32.resize(here * in_dim, 0.0);
            to_f32(
                &w[first * row_bytes..(first + here) * row_bytes],
                dtype,
                rows_f32,
            );
            dots(rows_f32, here, in_dim, x, n, out);
        });
}

/// `out_t (rows, n) = W (rows, in_dim) · xᵀ` for a weight already in f32 (adapter factors).
pub fn matmul_f32(w: &[f32], in_dim: usize, x: &[f32], n: usize) -> Vec<f32> {
    let rows = w.len() / in_dim.max(1);
    let mut out_t = vec![0f32; rows * n];
    if rows == 0 || n == 0 {
        return out_t;
    }
    out_t
        .par_chunks_mut(ROWS_PER_TASK * n)
        .zip(w.par_chunks(ROWS_PER_TASK * in_dim))
        .for_each(|(out, w_rows)| dots(w_rows, out.len() / n, in_dim, x, n, out));
    out_t
}

/// `out[r * n + t] = w[r] · x[t]` for `rows` rows of `w` and `n` rows of `x`.
fn dots(w: &[f32], rows: usize, in_dim: usize, x: &[f32], n: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports the features the function is compiled for.
            unsafe { dots_avx2(w, rows, in_dim, x, n, out) };
            return;
        }
    }
    dots_plain(w, rows, in_dim, x, n, out);
}

/// [`dots_plain`] with AVX2 + FMA intrinsics (see [`dots_rows_avx2`]).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dots_avx2(w: &[f32], rows: usize, in_dim: usize, x: &[f32], n: usize, out: &mut [f32]) {
    use std::arch::x86_64::*;
    assert!(w.len() >= rows * in_dim && x.len() >= n * in_dim && out.len() >= rows * n);
    // SAFETY: the assert bounds every row pointer (rows · in_dim elements of w); the closures
    // read 8 or 1 elements where the driver says they are readable.
    unsafe {
        dots_rows_avx2(
            |r| w.as_ptr().add(r * in_dim),
            |at| _mm256_loadu_ps(at),
            |at| *at,
            |r| std::borrow::Cow::Borrowed(&w[r * in_dim..(r + 1) * in_dim]),
            rows,
            in_dim,
            x,
            n,
            out,
        )
    }
}

/// [`dots`] on BF16 rows read straight from their stored bytes, each 8-element load decoded
/// in registers (a widening shift, exact) instead of through an f32 copy of the rows, so the
/// weight's first read from memory overlaps the FMAs. The same products summed in the same
/// order as [`dots_avx2`] on the decoded rows. Returns false (nothing done) without AVX2 + FMA.
fn dots_bf16(w: &[u8], rows: usize, in_dim: usize, x: &[f32], n: usize, out: &mut [f32]) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports the features the function is compiled for.
            unsafe { dots_bf16_avx2(w, rows, in_dim, x, n, out) };
            return true;
        }
    }
    let _ = (w, rows, in_dim, x, n, out);
    false
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dots_bf16_avx2(
    w: &[u8],
    rows: usize,
    in_dim: usize,
    x: &[f32],
    n: usize,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    assert!(w.len() >= 2 * rows * in_dim && x.len() >= n * in_dim && out.len() >= rows * n);
    let decoded = |r: usize| {
        let mut row = vec![0f32; in_dim];
        to_f32(
            &w[2 * r * in_dim..2 * (r + 1) * in_dim],
            Dtype::BF16,
            &mut row,
        );
        std::borrow::Cow::Owned(row)
    };
    // SAFETY: the assert bounds every row pointer (rows · in_dim BF16 elements of w); the
    // closures read 8 or 1 elements where the driver says they are readable (any alignment).
    unsafe {
        dots_rows_avx2(
            |r| w.as_ptr().add(2 * r * in_dim) as *const u16,
            |at: *const u16| {
                let halves = _mm_loadu_si128(at as *const __m128i);
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(halves)))
            },
            |at: *const u16| f32::from_bits((at.read_unaligned() as u32) << 16),
            decoded,
            rows,
            in_dim,
            x,
            n,
            out,
        )
    }
}

/// `out[r * n + t] = W[r] · x[t]` for weight rows of element type `E`: `row(r)` points at row r,
/// `eight(p)` reads 8 elements at p as f32 lanes, `one(p)` a single element, `row_f32(r)` is
/// row r in f32 (for the rows past the last whole block of 4). Blocks of 4 weight rows x 3
/// inputs: twelve 8-lane accumulators (enough independent FMA chains to hide their latency), so
/// each weight load serves three inputs and each input load four rows.
///
/// SAFETY: `row(r)` must point at `in_dim` readable elements for every r < rows, and x hold
/// n · in_dim values, out rows · n.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
#[allow(clippy::too_many_arguments)]
unsafe fn dots_rows_avx2<'w, E>(
    row: impl Fn(usize) -> *const E,
    eight: impl Fn(*const E) -> std::arch::x86_64::__m256 + Copy,
    one: impl Fn(*const E) -> f32 + Copy,
    row_f32: impl Fn(usize) -> std::borrow::Cow<'w, [f32]>,
    rows: usize,
    in_dim: usize,
    x: &[f32],
    n: usize,
    out: &mut [f32],
) {
    assert!(x.len() >= n * in_dim && out.len() >= rows * n);
    // SAFETY: the caller's contract on `row`; x and out bounded by the assert.
    unsafe {
        let mut r = 0;
        while r + 4 <= rows {
            let wp = [0, 1, 2, 3].map(|k| row(r + k));
            let mut t = 0;
            while t < n {
                let xp = |j: usize| x.as_ptr().add((t + j) * in_dim);
                t += match n - t {
                    1 => store(
                        block_avx2::<E, 1>(wp, [xp(0)], in_dim, eight, one),
                        out,
                        r,
                        t,
                        n,
                    ),
                    2 => store(
                        block_avx2::<E, 2>(wp, [xp(0), xp(1)], in_dim, eight, one),
                        out,
                        r,
                        t,
                        n,
                    ),
                    _ => store(
                        block_avx2::<E, 3>(wp, [xp(0), xp(1), xp(2)], in_dim, eight, one),
                        out,
                        r,
                        t,
                        n,
                    ),
                };
            }
            r += 4;
        }
        for r in r..rows {
            let weights = row_f32(r);
            for t in 0..n {
                out[r * n + t] = dot(&weights, &x[t * in_dim..][..in_dim]);
            }
        }
    }
}

/// Writes `sums[j][k]` (input t + j, row r + k) into `out` (rows, n); returns T.
#[inline(always)]
fn store<const T: usize>(
    sums: [[f32; 4]; T],
    out: &mut [f32],
    r: usize,
    t: usize,
    n: usize,
) -> usize {
    for (j, column) in sums.iter().enumerate() {
        for (k, s) in column.iter().enumerate() {
            out[(r + k) * n + t + j] = *s;
        }
    }
    T
}

/// The dot products of 4 weight rows `wp` (elements read by `eight` / `one`) with `T` inputs
/// `xp`, each `len` long: `[input][row]`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn block_avx2<E, const T: usize>(
    wp: [*const E; 4],
    xp: [*const f32; T],
    len: usize,
    eight: impl Fn(*const E) -> std::arch::x86_64::__m256,
    one: impl Fn(*const E) -> f32,
) -> [[f32; 4]; T] {
    use std::arch::x86_64::*;
    let body = len / LANES * LANES;
    // SAFETY: the caller guarantees `len` readable elements behind every pointer.
    unsafe {
        let mut acc = [[_mm256_setzero_ps(); 4]; T];
        let mut i = 0;
        while i < body {
            let xs = xp.map(|p| _mm256_loadu_ps(p.add(i)));
            for k in 0..4 {
                let wk = eight(wp[k].add(i));
                for j in 0..T {
                    acc[j][k] = _mm256_fmadd_ps(wk, xs[j], acc[j][k]);
                }
            }
            i += LANES;
        }
        let mut sums = [[0f32; 4]; T];
        for j in 0..T {
            for k in 0..4 {
                let mut s = horizontal_sum(acc[j][k]);
                for i in body..len {
                    s = one(wp[k].add(i)).mul_add(*xp[j].add(i), s);
                }
                sums[j][k] = s;
            }
        }
        sums
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn horizontal_sum(v: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
}

/// Lanes of the partial sums (one AVX vector).
const LANES: usize = 8;

#[inline(always)]
fn dots_plain(w: &[f32], rows: usize, in_dim: usize, x: &[f32], n: usize, out: &mut [f32]) {
    let row = |r: usize| &w[r * in_dim..(r + 1) * in_dim];
    let input = |t: usize| &x[t * in_dim..(t + 1) * in_dim];
    let mut r = 0;
    // Blocks of 4 weight rows x 2 inputs: 8 independent accumulators, 6 loads per 8 FMAs.
    while r + 4 <= rows {
        let w4 = [row(r), row(r + 1), row(r + 2), row(r + 3)];
        let mut t = 0;
        while t + 2 <= n {
            let sums = dot_4x2(w4, [input(t), input(t + 1)]);
            for (k, pair) in sums.iter().enumerate() {
                out[(r + k) * n + t] = pair[0];
                out[(r + k) * n + t + 1] = pair[1];
            }
            t += 2;
        }
        if t < n {
            for (k, w_row) in w4.iter().enumerate() {
                out[(r + k) * n + t] = dot(w_row, input(t));
            }
        }
        r += 4;
    }
    for r in r..rows {
        for t in 0..n {
            out[r * n + t] = dot(row(r), input(t));
        }
    }
}

#[inline(always)]
fn dot_4x2(w: [&[f32]; 4], x: [&[f32]; 2]) -> [[f32; 2]; 4] {
    let len = x[0].len();
    let body = len / LANES * LANES;
    let mut acc = [[[0f32; LANES]; 2]; 4];
    let mut i = 0;
    while i < body {
        let x0: &[f32; LANES] = x[0][i..i + LANES].try_into().expect("lane block");
        let x1: &[f32; LANES] = x[1][i..i + LANES].try_into().expect("lane block");
        for (k, w_row) in w.iter().enumerate() {
            let wk: &[f32; LANES] = w_row[i..i + LANES].try_into().expect("lane block");
            for l in 0..LANES {
                acc[k][0][l] = wk[l].mul_add(x0[l], acc[k][0][l]);
                acc[k][1][l] = wk[l].mul_add(x1[l], acc[k][1][l]);
            }
        }
        i += LANES;
    }
    let mut sums = [[0f32; 2]; 4];
    for k in 0..4 {
        for j in 0..2 {
            let mut s = acc[k][j].iter().sum::<f32>();
            for i in body..len {
                s = w[k][i].mul_add(x[j][i], s);
            }
            sums[k][j] = s;
        }
    }
    sums
}

#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let body = a.len() / LANES * LANES;
    let mut acc = [0f32; LANES];
    let mut i = 0;
    while i < body {
        let (ai, bi): (&[f32; LANES], &[f32; LANES]) = (
            a[i..i + LANES].try_into().expect("lane block"),
            b[i..i + LANES].try_into().expect("lane block"),
        );
        for l in 0..LANES {
            acc[l] = ai[l].mul_add(bi[l], acc[l]);
        }
        i += LANES;
    }
    let mut s = acc.iter().sum::<f32>();
    for i in body..a.len() {
        s = a[i].mul_add(b[i], s);
    }
    s
}

/// Plain reference of [`matmul_transposed`]: the triple loop in f64, W given as f32 (out, in).
pub fn matmul_reference(w: &[f32], in_dim: usize, x: &[f32], n: usize) -> Vec<f32> {
    let rows = w.len() / in_dim;
    let mut out_t = vec![0f32; rows * n];
    for r in 0..rows {
        for t in 0..n {
            let mut s = 0f64;
            for i in 0..in_dim {
                s += w[r * in_dim + i] as f64 * x[t * in_dim + i] as f64;
            }
            out_t[r * n + t] = s as f32;
        }
    }
    out_t
}

/// (rows, cols) -> (cols, rows).
pub fn transpose(m: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; m.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = m[r * cols + c];
        }
    }
    out
}

/// `x (n, dim) <- weight ⊙ x / sqrt(mean(x²) + eps)`, row by row (as HF's RMSNorm, in f32).
pub fn rms_norm(x: &mut [f32], dim: usize, weight: &[f32], eps: f32) {
    for row in x.chunks_exact_mut(dim) {
        let mean_square = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / dim as f64;
        let inverse = (1.0 / (mean_square as f32 + eps).sqrt()) as f64;
        for (v, w) in row.iter_mut().zip(weight) {
            *v = w * (*v as f64 * inverse) as f32;
        }
    }
}

/// Rotary position tables for positions `0..tokens`: (cos, sin), each (tokens, head_dim / 2),
/// angle = position · inv_freq[i] (in f32, as HF).
pub fn rope_tables(inv_freq: &[f32], tokens: usize) -> (Vec<f32>, Vec<f32>) {
    let half = inv_freq.len();
    let (mut cos, mut sin) = (vec![0f32; tokens * half], vec![0f32; tokens * half]);
    for t in 0..tokens {
        for (i, f) in inv_freq.iter().enumerate() {
            let angle = t as f32 * f;
            cos[t * half + i] = angle.cos();
            sin[t * half + i] = angle.sin();
        }
    }
    (cos, sin)
}

/// Rotates every head of `x` (rows, width) in place, `width` a multiple of `head_dim`; row `r`
/// is at position `r % tokens`. Within a head, (x1, x2) are its two halves.
pub fn rope(x: &mut [f32], width: usize, head_dim: usize, tokens: usize, cos: &[f32], sin: &[f32]) {
    let half = head_dim / 2;
    for (r, row) in x.chunks_exact_mut(width).enumerate() {
        let t = r % tokens;
        let (c, s) = (
            &cos[t * half..(t + 1) * half],
            &sin[t * half..(t + 1) * half],
        );
        for head in row.chunks_exact_mut(head_dim) {
            let (x1, x2) = head.split_at_mut(half);
            for i in 0..half {
                let (a, b) = (x1[i], x2[i]);
                x1[i] = a * c[i] - b * s[i];
                x2[i] = b * c[i] + a * s[i];
            }
        }
    }
}

/// Shapes of one attention call: `sequences` rows of `tokens` positions each.
#[derive(Debug, Clone, Copy)]
pub struct AttentionShape {
    pub sequences: usize,
    pub tokens: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Sliding window: query t sees keys j with t - j < window.
    pub window: Option<usize>,
}

/// Causal attention per sequence and head: q (rows, heads · d), k and v (rows, kv_heads · d),
/// rows grouped by sequence (`tokens` each); query head h reads key/value head
/// h / (heads / kv_heads). Returns (rows, heads · d).
pub fn attention(q: &[f32], k: &[f32], v: &[f32], shape: AttentionShape) -> Vec<f32> {
    let AttentionShape {
        sequences,
        tokens,
        heads,
        kv_heads,
        head_dim: d,
        window,
    } = shape;
    let (q_width, kv_width) = (heads * d, kv_heads * d);
    let group = heads / kv_heads;
    let scale = 1.0 / (d as f64).sqrt();
    let mut out = vec![0f32; sequences * tokens * q_width];
    out.par_chunks_mut(tokens * q_width)
        .enumerate()
        .for_each(|(seq, out_seq)| {
            let first = seq * tokens;
            let mut scores = vec![0f64; tokens];
            for h in 0..heads {
                let kv = h / group;
                for t in 0..tokens {
                    let query = &q[(first + t) * q_width + h * d..][..d];
                    let start = window.map_or(0, |w| (t + 1).saturating_sub(w));
                    let mut max = f64::NEG_INFINITY;
                    for j in start..=t {
                        let key = &k[(first + j) * kv_width + kv * d..][..d];
                        let s = query
                            .iter()
                            .zip(key)
                            .map(|(a, b)| *a as f64 * *b as f64)
                            .sum::<f64>()
                            * scale;
                        scores[j] = s;
                        max = max.max(s);
                    }
                    let mut total = 0f64;
                    for s in &mut scores[start..=t] {
                        *s = (*s - max).exp();
                        total += *s;
                    }
                    let o = &mut out_seq[t * q_width + h * d..][..d];
                    let mut acc = vec![0f64; d];
                    for j in start..=t {
                        let p = scores[j] / total;
                        let value = &v[(first + j) * kv_width + kv * d..][..d];
                        for (a, x) in acc.iter_mut().zip(value) {
                            *a += p * *x as f64;
                        }
                    }
                    for (o, a) in o.iter_mut().zip(&acc) {
                        *o = *a as f32;
                    }
                }
            }
        });
    out
}

/// The MLP activations of the Llama family (HF `hidden_act`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// x · sigmoid(x)
    Silu,
    /// x · Φ(x), Φ by erf
    Gelu,
    /// GELU's tanh approximation
    GeluTanh,
}

impl Activation {
    /// From HF's `hidden_act`, or None when the forward pass does not implement it.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "silu" | "swish" => Some(Activation::Silu),
            "gelu" => Some(Activation::Gelu),
            "gelu_pytorch_tanh" => Some(Activation::GeluTanh),
            _ => None,
        }
    }

    pub fn apply(self, x: f32) -> f32 {
        let v = x as f64;
        let y = match self {
            Activation::Silu => v / (1.0 + (-v).exp()),
            Activation::Gelu => 0.5 * v * (1.0 + erf(v / std::f64::consts::SQRT_2)),
            Activation::GeluTanh => {
                let inner = (2.0 / std::f64::consts::PI).sqrt() * (v + 0.044715 * v * v * v);
                0.5 * v * (1.0 + inner.tanh())
            }
        };
        y as f32
    }
}

/// The error function: its Taylor series below 3 (accurate to ~1e-13 there), above 3 one minus
/// the asymptotic series of erfc (erfc(3) = 2.2e-5, the series' error a thousandth of that).
fn erf(x: f64) -> f64 {
    let a = x.abs();
    let value = if a < 3.0 {
        // erf(x) = 2/sqrt(pi) Σ (-1)^n x^(2n+1) / (n! (2n+1))
        let (mut term, mut sum, x2) = (a, a, a * a);
        let mut n = 0.0;
        while term.abs() > 1e-17 * sum.abs() {
            n += 1.0;
            term *= -x2 / n;
            sum += term / (2.0 * n + 1.0);
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    } else {
        // erfc(x) ~ exp(-x²) / (x sqrt(pi)) (1 - 1/(2x²) + 3/(4x⁴) - 15/(8x⁶))
        let inv2 = 1.0 / (a * a);
        let series = 1.0 - 0.5 * inv2 + 0.75 * inv2 * inv2 - 1.875 * inv2 * inv2 * inv2;
        1.0 - (-a * a).exp() / (a * std::f64::consts::PI.sqrt()) * series
    };
    value.copysign(x)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merge::convert::tensor_from_f32;
    use crate::merge::test_data::random;

    #[test]
    fn fast_matmul_agrees_with_the_reference() {
        // row counts and widths that leave remainders in every blocked loop
        for (rows, in_dim, n) in [(37, 53, 5), (8, 16, 2), (4, 8, 1), (1, 3, 3), (70, 200, 7)] {
            let w = random(rows * in_dim, 1);
            let x = random(n * in_dim, 2);
            let reference = matmul_reference(&w, in_dim, &x, n);
            for dtype in [Dtype::F32, Dtype::BF16, Dtype::F16] {
                let bytes = tensor_from_f32(&w, dtype);
                let stored = crate::merge::convert::tensor_to_f32(&bytes, dtype);
                let expected = matmul_reference(&stored, in_dim, &x, n);
                let mut got = vec![0f32; rows * n];
                matmul_transposed(&bytes, dtype, in_dim, &x, n, &mut got);
                for (g, e) in got.iter().zip(&expected) {
                    assert!(
                        (g - e).abs() <= 1e-5 * (1.0 + e.abs()),
                        "{dtype}: {g} vs {e}"
                    );
                }
                if dtype == Dtype::F32 {
                    assert_eq!(expected, reference);
                }
            }
        }
    }

    #[test]
    fn bf16_rows_dot_as_their_decoded_copy_bit_for_bit() {
        for (rows, in_dim, n) in [(9, 53, 9), (8, 16, 4), (5, 40, 3), (4, 8, 1), (12, 200, 32)] {
            let w = tensor_from_f32(&random(rows * in_dim, 5), Dtype::BF16);
            let x = random(n * in_dim, 6);
            let decoded = crate::merge::convert::tensor_to_f32(&w, Dtype::BF16);
            let mut expected = vec![0f32; rows * n];
            dots(&decoded, rows, in_dim, &x, n, &mut expected);
            let mut got = vec![0f32; rows * n];
            if dots_bf16(&w, rows, in_dim, &x, n, &mut got) {
                assert_eq!(got, expected, "{rows}x{in_dim}, {n} inputs");
            }
        }
    }

    #[test]
    fn erf_is_accurate() {
        // values from the closed form's tables (Abramowitz & Stegun 7.1)
        for (x, e) in [
            (0.0, 0.0),
            (0.5, 0.520_499_877_813_046_5),
            (1.0, 0.842_700_792_949_714_9),
            (2.0, 0.995_322_265_018_952_7),
            (2.9, 0.999_958_902_121_900_5),
            (3.5, 0.999_999_256_901_627_7),
            (-1.0, -0.842_700_792_949_714_9),
        ] {
            assert!((erf(x) - e).abs() < 1e-9, "erf({x}) = {} not {e}", erf(x));
        }
    }

    #[test]
    fn attention_of_one_token_returns_its_value() {
        let shape = AttentionShape {
            sequences: 2,
            tokens: 1,
            heads: 4,
            kv_heads: 2,
            head_dim: 3,
            window: None,
        };
        let q = random(2 * 12, 3);
        let (k, v) = (random(2 * 6, 4), random(2 * 6, 5));
        let out = attention(&q, &k, &v, shape);
        for s in 0..2 {
            for h in 0..4 {
                assert_eq!(&out[s * 12 + h * 3..][..3], &v[s * 6 + (h / 2) * 3..][..3]);
            }
        }
    }
}
