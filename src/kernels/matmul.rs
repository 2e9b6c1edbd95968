//! Linear layers without bias, HF layout: weight `w` is (out, in) row-major.
//!
//! Linear layers use the system OpenBLAS (`cblas_sgemm`) when the build found it (see
//! build.rs), else the `gemm` crate (runtime-dispatched AVX2/AVX-512 micro-kernels,
//! rayon-parallel). Attention's per-head products always use `gemm` on strided views.
//! Strides express the transposes, so nothing is copied.

use gemm::{gemm, Parallelism};

/// Which library computes the linear layers.
pub const BACKEND: &str = if cfg!(keel_openblas) {
    "openblas"
} else {
    "gemm"
};

/// Match the BLAS thread count to keel's pool (no-op for the `gemm` backend).
pub fn set_blas_threads(n: usize) {
    #[cfg(keel_openblas)]
    // SAFETY: plain setter of OpenBLAS's global thread count.
    unsafe {
        blas::openblas_set_num_threads(n as i32)
    };
    let _ = n;
}

fn par() -> Parallelism {
    Parallelism::Rayon(super::num_threads())
}

/// General row-major product with explicit strides: dst (m, n) = beta·dst + lhs (m, k) · rhs (k, n)
/// where element (i, j) of a matrix X lives at X[i*rs + j*cs].
#[allow(clippy::too_many_arguments)]
fn gemm_strided(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    accumulate: bool,
    lhs: &[f32],
    lhs_rs: usize,
    lhs_cs: usize,
    rhs: &[f32],
    rhs_rs: usize,
    rhs_cs: usize,
) {
    assert!(dst.len() >= m * n, "gemm: dst too small");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            dst[..m * n].fill(0.0);
        }
        return;
    }
    assert!(
        lhs.len() > (m - 1) * lhs_rs + (k - 1) * lhs_cs,
        "gemm: lhs too small"
    );
    assert!(
        rhs.len() > (k - 1) * rhs_rs + (n - 1) * rhs_cs,
        "gemm: rhs too small"
    );
    // SAFETY: bounds asserted above; dst does not alias lhs/rhs (distinct borrows).
    unsafe {
        gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            par(),
        );
    }
}

/// Strided product on raw pointers, for kernels that address sub-matrices of larger buffers
/// (attention heads): dst (m, n; row stride dst_rs) = [dst +] scale · lhs (m, k) · rhs (k, n).
/// `threads` = 1 runs on the calling thread (inside an already-parallel loop).
///
/// # Safety
/// Every addressed element must be in bounds of its allocation, and dst must not overlap lhs
/// or rhs or be written concurrently by another task.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_ptr(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    lhs: *const f32,
    lhs_rs: usize,
    lhs_cs: usize,
    rhs: *const f32,
    rhs_rs: usize,
    rhs_cs: usize,
    scale: f32,
    threads: usize,
) {
    let par = if threads <= 1 {
        Parallelism::None
    } else {
        Parallelism::Rayon(threads)
    };
    gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        accumulate,
        lhs,
        lhs_cs as isize,
        lhs_rs as isize,
        rhs,
        rhs_cs as isize,
        rhs_rs as isize,
        1.0,
        scale,
        false,
        false,
        false,
        par,
    );
}

#[cfg(keel_openblas)]
mod blas {
    extern "C" {
        #[allow(clippy::too_many_arguments)]
        pub fn cblas_sgemm(
            order: i32,
            ta: i32,
            tb: i32,
            m: i32,
            n: i32,
            k: i32,
            alpha: f32,
            a: *const f32,
            lda: i32,
            b: *const f32,
            ldb: i32,
            beta: f32,
            c: *mut f32,
            ldc: i32,
        );
    }
    extern "C" {
        pub fn openblas_set_num_threads(n: i32);
    }
    pub const ROW: i32 = 101;
    pub const N: i32 = 111;
    pub const T: i32 = 112;
}

/// Forward: out (M, N) = x (M, K) · wᵀ, with w (N, K).
pub fn linear_fwd(out: &mut [f32], x: &[f32], w: &[f32], m: usize, k: usize, n: usize) {
    #[cfg(keel_openblas)]
    {
        assert!(out.len() >= m * n && x.len() >= m * k && w.len() >= n * k);
        // SAFETY: bounds asserted; row-major dense operands.
        unsafe {
            blas::cblas_sgemm(
                blas::ROW,
                blas::N,
                blas::T,
                m as i32,
                n as i32,
                k as i32,
                1.0,
                x.as_ptr(),
                k as i32,
                w.as_ptr(),
                k as i32,
                0.0,
                out.as_mut_ptr(),
                n as i32,
            );
        }
        return;
    }
    #[allow(unreachable_code)]
    gemm_strided(m, n, k, out, false, x, k, 1, w, 1, k);
}

/// Backward to the input: dx (M, K) = dout (M, N) · w (N, K); added to dx when `accumulate`.
#[allow(clippy::too_many_arguments)]
pub fn linear_bwd_input(
    dx: &mut [f32],
    dout: &[f32],
    w: &[f32],
    m: usize,
    k: usize,
    n: usize,
    accumulate: bool,
) {
    #[cfg(keel_openblas)]
    {
        assert!(dx.len() >= m * k && dout.len() >= m * n && w.len() >= n * k);
        let beta = if accumulate { 1.0 } else { 0.0 };
        // SAFETY: bounds asserted; row-major dense operands.
        unsafe {
            blas::cblas_sgemm(
                blas::ROW,
                blas::N,
                blas::N,
                m as i32,
                k as i32,
                n as i32,
                1.0,
                dout.as_ptr(),
                n as i32,
                w.as_ptr(),
                k as i32,
                beta,
                dx.as_mut_ptr(),
                k as i32,
            );
        }
        return;
    }
    #[allow(unreachable_code)]
    gemm_strided(m, k, n, dx, accumulate, dout, n, 1, w, k, 1);
}

/// Backward to the weight: dw (N, K) += doutᵀ (N, M) · x (M, K).
pub fn linear_bwd_weight(dw: &mut [f32], dout: &[f32], x: &[f32], m: usize, k: usize, n: usize) {
    #[cfg(keel_openblas)]
    {
        assert!(dw.len() >= n * k && dout.len() >= m * n && x.len() >= m * k);
        // SAFETY: bounds asserted; row-major dense operands.
        unsafe {
            blas::cblas_sgemm(
                blas::ROW,
                blas::T,
                blas::N,
                n as i32,
                k as i32,
                m as i32,
                1.0,
                dout.as_ptr(),
                n as i32,
                x.as_ptr(),
                k as i32,
                1.0,
                dw.as_mut_ptr(),
                k as i32,
            );
        }
        return;
    }
    #[allow(unreachable_code)]
    gemm_strided(n, k, m, dw, true, dout, 1, n, x, k, 1);
}

/// Measured f32 GEMM throughput (FLOP/s) at a square size through the same backend the
/// linear layers use, best of `repeats`: the peak MFU is counted against.
pub fn measure_peak_flops(size: usize, repeats: usize) -> f64 {
    let a: Vec<f32> = (0..size * size).map(|i| ((i % 7) as f32) * 0.1).collect();
    let b: Vec<f32> = (0..size * size).map(|i| ((i % 5) as f32) * 0.1).collect();
    let mut c = vec![0f32; size * size];
    linear_fwd(&mut c, &a, &b, size, size, size); // warm-up: page faults, thread start
    let mut best = f64::INFINITY;
    for _ in 0..repeats.max(1) {
        let t = std::time::Instant::now();
        linear_fwd(&mut c, &a, &b, size, size, size);
        best = best.min(t.elapsed().as_secs_f64());
    }
    2.0 * (size as f64).powi(3) / best
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testutil::{check_grad, rand_vec};

    fn naive(x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f64> {
        let mut out = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k)
                    .map(|p| x[i * k + p] as f64 * w[j * k + p] as f64)
                    .sum();
            }
        }
        out
    }

    #[test]
    fn forward_matches_naive() {
        let (m, k, n) = (37, 53, 29);
        let x = rand_vec(m * k, 1);
        let w = rand_vec(n * k, 2);
        let mut out = vec![0f32; m * n];
        linear_fwd(&mut out, &x, &w, m, k, n);
        let r = naive(&x, &w, m, k, n);
        for (a, b) in out.iter().zip(&r) {
            assert!((*a as f64 - b).abs() < 1e-5 * (1.0 + b.abs()), "{a} vs {b}");
        }
    }

    #[test]
    fn backward_matches_finite_differences() {
        let (m, k, n) = (7, 11, 5);
        let x = rand_vec(m * k, 3);
        let mut w = rand_vec(n * k, 4);
        let g = rand_vec(m * n, 5); // loss = sum(out * g)
        let mut dx = vec![0f32; m * k];
        let mut dw = vec![0f32; n * k];
        linear_bwd_input(&mut dx, &g, &w, m, k, n, false);
        linear_bwd_weight(&mut dw, &g, &x, m, k, n);
        let loss = |x: &[f32], w: &[f32]| -> f64 {
            let mut out = vec![0f32; m * n];
            linear_fwd(&mut out, x, w, m, k, n);
            out.iter().zip(&g).map(|(a, b)| *a as f64 * *b as f64).sum()
        };
        let w0 = w.clone();
        check_grad("dx", &mut x.clone(), &dx, |xx| loss(xx, &w0), 1e-2, 1e-3);
        let x0 = x.clone();
        check_grad("dw", &mut w, &dw, |ww| loss(&x0, ww), 1e-2, 1e-3);
        // accumulation adds, not overwrites
        let dw1 = dw.clone();
        linear_bwd_weight(&mut dw, &g, &x, m, k, n);
        for (a, b) in dw.iter().zip(&dw1) {
            assert!((a - 2.0 * b).abs() < 1e-5);
        }
        let dx1 = dx.clone();
        linear_bwd_input(&mut dx, &g, &w0, m, k, n, true);
        for (a, b) in dx.iter().zip(&dx1) {
            assert!((a - 2.0 * b).abs() < 1e-5);
        }
    }

    #[test]
    fn gemm_crate_path_matches_naive_in_all_three_layouts() {
        // The fallback used when OpenBLAS is absent, tested whatever this build links.
        let (m, k, n) = (33, 70, 21);
        let x = rand_vec(m * k, 8);
        let w = rand_vec(n * k, 9);
        let dy = rand_vec(m * n, 10);
        let mut out = vec![0f32; m * n];
        gemm_strided(m, n, k, &mut out, false, &x, k, 1, &w, 1, k);
        let mut blas_out = vec![0f32; m * n];
        linear_fwd(&mut blas_out, &x, &w, m, k, n);
        let mut dx = vec![0f32; m * k];
        gemm_strided(m, k, n, &mut dx, false, &dy, n, 1, &w, k, 1);
        let mut dw = vec![0f32; n * k];
        gemm_strided(n, k, m, &mut dw, true, &dy, 1, n, &x, k, 1);
        let r = naive(&x, &w, m, k, n);
        for ((a, b), c) in out.iter().zip(&r).zip(&blas_out) {
            assert!((*a as f64 - b).abs() < 1e-5 * (1.0 + b.abs()) && (a - c).abs() < 1e-5);
        }
        for i in 0..m {
            for p in 0..k {
                let e: f64 = (0..n)
                    .map(|j| dy[i * n + j] as f64 * w[j * k + p] as f64)
                    .sum();
                assert!((dx[i * k + p] as f64 - e).abs() < 1e-5 * (1.0 + e.abs()));
            }
        }
        for j in 0..n {
            for p in 0..k {
                let e: f64 = (0..m)
                    .map(|i| dy[i * n + j] as f64 * x[i * k + p] as f64)
                    .sum();
                assert!((dw[j * k + p] as f64 - e).abs() < 1e-5 * (1.0 + e.abs()));
            }
        }
    }

    #[test]
    fn large_parallel_product_matches_naive() {
        let (m, k, n) = (130, 257, 190);
        let x = rand_vec(m * k, 6);
        let w = rand_vec(n * k, 7);
        let mut out = vec![0f32; m * n];
        linear_fwd(&mut out, &x, &w, m, k, n);
        let r = naive(&x, &w, m, k, n);
        for (a, b) in out.iter().zip(&r) {
            assert!((*a as f64 - b).abs() < 1e-4 * (1.0 + b.abs()));
        }
    }
}
