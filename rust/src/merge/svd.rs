//! Truncated SVD for adapter re-ranking and extraction: `M ≈ U diag(S) Vᵀ` keeping the k largest
//! singular values (Eckart–Young: the best rank-k approximation in Frobenius norm).
//!
//! - Small matrices (≤ `EXACT_ELEMENTS`): the full SVD (nalgebra), truncated.
//! - Large matrices: randomized SVD (Halko, Martinsson & Tropp 2011): Y = M Ω with a Gaussian Ω
//!   (n, k + p), `POWER_ITERATIONS` rounds of Q ← qr(M qr(Mᵀ Q)) to sharpen the spectrum, then the
//!   small SVD of Qᵀ M ((k + p), n). Seeded, so the result is reproducible.
//! - Low-rank products `B A` (B (m, R), A (R, n)): exact through two thin QRs and an (R, R) SVD,
//!   never forming the (m, n) matrix.

use nalgebra::DMatrix;

/// Full SVD below this many elements.
pub const EXACT_ELEMENTS: usize = 1 << 20;
const OVERSAMPLE: usize = 10;
const POWER_ITERATIONS: usize = 3;

/// A rank-k factorisation `M ≈ u diag(s) vt`.
pub struct Truncated {
    /// (m, k)
    pub u: DMatrix<f64>,
    /// (k,), descending
    pub s: Vec<f64>,
    /// (k, n)
    pub vt: DMatrix<f64>,
}

impl Truncated {
    /// `B = U·diag(S)` (m, k) and `A = Vᵀ` (k, n), PEFT's split in `add_weighted_adapter`'s SVD
    /// path, as row-major f32.
    pub fn split_us_vt(&self) -> (Vec<f32>, Vec<f32>) {
        let mut b = self.u.clone();
        for (j, s) in self.s.iter().enumerate() {
            b.column_mut(j).scale_mut(*s);
        }
        (row_major(&b), row_major(&self.vt))
    }

    /// `B = U·diag(√S)` and `A = diag(√S)·Vᵀ`: balanced factors, for adapters meant to train on.
    pub fn split_balanced(&self) -> (Vec<f32>, Vec<f32>) {
        let (mut b, mut a) = (self.u.clone(), self.vt.clone());
        for (j, s) in self.s.iter().enumerate() {
            b.column_mut(j).scale_mut(s.sqrt());
            a.row_mut(j).scale_mut(s.sqrt());
        }
        (row_major(&b), row_major(&a))
    }
}

/// A row-major (rows, cols) f32 slice as a matrix.
pub fn from_row_major(data: &[f32], rows: usize, cols: usize) -> DMatrix<f64> {
    DMatrix::from_fn(rows, cols, |i, j| data[i * cols + j] as f64)
}

/// A matrix as row-major f32.
pub fn row_major(m: &DMatrix<f64>) -> Vec<f32> {
    let mut out = Vec::with_capacity(m.len());
    for i in 0..m.nrows() {
        for j in 0..m.ncols() {
            out.push(m[(i, j)] as f32);
        }
    }
    out
}

/// The full SVD, sorted by descending singular value and cut to rank k.
fn exact(m: &DMatrix<f64>, k: usize) -> Truncated {
    let svd = m.clone().svd(true, true);
    let (u, vt) = (svd.u.expect("requested"), svd.v_t.expect("requested"));
    let mut order: Vec<usize> = (0..svd.singular_values.len()).collect();
    order.sort_by(|&a, &b| svd.singular_values[b].total_cmp(&svd.singular_values[a]));
    order.truncate(k);
    Truncated {
        u: DMatrix::from_fn(u.nrows(), order.len(), |i, j| u[(i, order[j])]),
        s: order.iter().map(|&j| svd.singular_values[j]).collect(),
        vt: DMatrix::from_fn(order.len(), vt.ncols(), |i, j| vt[(order[i], j)]),
    }
}

/// The orthonormal basis of the columns of `m` (thin Q of its QR).
fn orthonormal(m: DMatrix<f64>) -> DMatrix<f64> {
    m.qr().q()
}

/// Standard normal samples (Box–Muller over splitmix64), reproducible from `seed`.
fn gaussian(rows: usize, cols: usize, seed: u64) -> DMatrix<f64> {
    let mut state = seed ^ 0x6a09_e667_f3bc_c909;
    let mut uniform = move || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        ((z >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    DMatrix::from_fn(rows, cols, |_, _| {
        let (a, b) = (uniform(), uniform());
        (-2.0 * a.ln()).sqrt() * (2.0 * std::f64::consts::PI * b).cos()
    })
}

/// The best rank-`k` approximation of `m` (exact when small, randomized when large).
pub fn truncated_svd(m: &DMatrix<f64>, k: usize, seed: u64) -> Truncated {
    truncated_svd_above(m, k, seed, EXACT_ELEMENTS)
}

/// [`truncated_svd`] with the size from which the randomized method is used.
pub fn truncated_svd_above(
    m: &DMatrix<f64>,
    k: usize,
    seed: u64,
    exact_elements: usize,
) -> Truncated {
    let k = k.min(m.nrows()).min(m.ncols());
    let sketch = k + OVERSAMPLE;
    if m.len() <= exact_elements || sketch >= m.nrows().min(m.ncols()) {
        return exact(m, k);
    }
    let omega = gaussian(m.ncols(), sketch, seed); // (n, l)
    let mut q = orthonormal(m * omega); // (m, l)
    for _ in 0..POWER_ITERATIONS {
        let z = orthonormal(m.transpose() * &q); // (n, l)
        q = orthonormal(m * z);
    }
    let small = q.transpose() * m; // (l, n)
    let t = exact(&small, k);
    Truncated {
        u: q * t.u,
        s: t.s,
        vt: t.vt,
    }
}

/// The best rank-`k` approximation of the product `b a` (b (m, R), a (R, n)), exactly.
pub fn truncated_svd_of_product(b: &DMatrix<f64>, a: &DMatrix<f64>, k: usize) -> Truncated {
    let qr_b = b.clone().qr();
    let qr_a = a.transpose().qr();
    let (qb, rb) = (qr_b.q(), qr_b.r()); // (m, R'), (R', R)
    let (qa, ra) = (qr_a.q(), qr_a.r()); // (n, R''), (R'', R)
    let core = rb * ra.transpose(); // (R', R'')
    let t = exact(&core, k);
    Truncated {
        u: qb * t.u,
        s: t.s,
        vt: t.vt * qa.transpose(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reconstruct(t: &Truncated) -> DMatrix<f64> {
        &t.u * DMatrix::from_diagonal(&nalgebra::DVector::from_vec(t.s.clone())) * &t.vt
    }

    #[test]
    fn randomized_svd_recovers_a_low_rank_matrix_and_matches_the_exact_spectrum() {
        // (120, 90) of rank 6 plus small noise, through the randomized path.
        let b = gaussian(120, 6, 1);
        let a = gaussian(6, 90, 2);
        let noise = gaussian(120, 90, 3) * 1e-3;
        let m = &b * &a + noise;
        let fast = truncated_svd_above(&m, 6, 7, 0);
        let reference = exact(&m, 6);
        for (x, y) in fast.s.iter().zip(&reference.s) {
            assert!((x - y).abs() <= 1e-6 * y, "{x} vs {y}");
        }
        let error = (reconstruct(&fast) - &m).norm() / m.norm();
        let best = (reconstruct(&reference) - &m).norm() / m.norm();
        assert!(error <= best * 1.0001 + 1e-12, "{error} vs {best}");
    }

    #[test]
    fn product_svd_is_exact() {
        let b = gaussian(50, 7, 4);
        let a = gaussian(7, 40, 5);
        let t = truncated_svd_of_product(&b, &a, 7);
        assert!((reconstruct(&t) - &b * &a).norm() < 1e-9 * (&b * &a).norm());
        let reference = exact(&(&b * &a), 3);
        let three = truncated_svd_of_product(&b, &a, 3);
        for (x, y) in three.s.iter().zip(&reference.s) {
            assert!((x - y).abs() < 1e-9 * y);
        }
    }
}
