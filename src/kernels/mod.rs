//! CPU compute kernels. Each op has a forward and a backward, a shape comment, and is checked
//! against central finite differences in its tests. Nothing here knows about LLaMA: the model
//! composes these ops. This module is the seam where a CUDA backend plugs in: the model calls
//! only these functions on flat `f32` buffers, so a device backend replaces the functions and
//! the buffers' storage, not the model logic.
//!
//! Buffers are row-major. Backward functions *accumulate* into parameter gradients (so micro-
//! batches can be summed) and *overwrite* activation gradients unless they say otherwise.

pub mod attention;
pub mod embed;
pub mod loss;
pub mod matmul;
pub mod norm;
pub mod rope;
pub mod swiglu;

/// A raw pointer that may be shared between rayon tasks that write provably disjoint parts.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr(pub *mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// Dot product with eight independent accumulators, so it vectorises (FP adds are not
/// reassociated by the compiler on its own).
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0f32; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] = x[i].mul_add(y[i], acc[i]);
        }
    }
    let mut s = 0f32;
    for (x, y) in ra.iter().zip(rb) {
        s = x.mul_add(*y, s);
    }
    (acc[0] + acc[4]) + (acc[1] + acc[5]) + (acc[2] + acc[6]) + (acc[3] + acc[7]) + s
}

/// y += a * x
#[inline(always)]
pub fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    debug_assert_eq!(x.len(), y.len());
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi = xi.mul_add(a, *yi);
    }
}

/// Residual add, in place: x (N) += y (N).
pub fn add_inplace(x: &mut [f32], y: &[f32]) {
    debug_assert_eq!(x.len(), y.len());
    for (a, b) in x.iter_mut().zip(y) {
        *a += *b;
    }
}

/// Residual add with scaling α (DeepNorm; 1 for LLaMA), in place: out (N) ← out + α·skip,
/// out = the branch output, skip = the block input.
pub fn residual_add(out: &mut [f32], skip: &[f32], alpha: f32) {
    if alpha == 1.0 {
        add_inplace(out, skip);
    } else {
        axpy(out, alpha, skip);
    }
}

/// x (N) ← a·x.
pub fn scale_inplace(x: &mut [f32], a: f32) {
    use rayon::prelude::*;
    x.par_chunks_mut(1 << 14)
        .for_each(|c| c.iter_mut().for_each(|v| *v *= a));
}

/// Number of worker threads compute may use (the global rayon pool).
pub fn num_threads() -> usize {
    rayon::current_num_threads()
}

/// Size the global thread pool once, at start-up. `0` means one per core. Later calls keep the
/// pool that exists (rayon's global pool can be set once per process).
pub fn init_threads(n: usize) {
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global();
    // OpenBLAS has its own pool (default: every core): without this `--threads 1` still ran
    // its GEMMs on all cores, and sweep trials oversubscribed the machine
    matmul::set_blas_threads(num_threads());
}

#[cfg(test)]
pub(crate) mod testutil {
    /// Deterministic pseudo-random values in [-1, 1) (SplitMix64), for tests.
    pub fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E3779B97F4A7C15).wrapping_add(1);
        (0..n)
            .map(|_| {
                s = s.wrapping_add(0x9E3779B97F4A7C15);
                let mut z = s;
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
                z ^= z >> 31;
                ((z >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// Central finite-difference check of an analytic gradient.
    /// `f` evaluates the scalar loss in f64 for a given input; `x` is perturbed in place.
    /// Compares every coordinate (or a strided subset for large inputs) within `tol` relative
    /// to max(|analytic|, |numeric|, 1e-2).
    pub fn check_grad(
        name: &str,
        x: &mut [f32],
        analytic: &[f32],
        mut f: impl FnMut(&[f32]) -> f64,
        h: f32,
        tol: f64,
    ) {
        assert_eq!(x.len(), analytic.len());
        // odd stride: visits every column class of interleaved layouts
        let stride = (x.len() / 97).max(1) | 1;
        let mut worst = 0f64;
        for i in (0..x.len()).step_by(stride) {
            let orig = x[i];
            x[i] = orig + h;
            let fp = f(x);
            x[i] = orig - h;
            let fm = f(x);
            x[i] = orig;
            let num = (fp - fm) / (2.0 * (h as f64));
            let ana = analytic[i] as f64;
            let err = (num - ana).abs() / num.abs().max(ana.abs()).max(1e-2);
            worst = worst.max(err);
            assert!(
                err < tol,
                "{name}[{i}]: analytic {ana:.6e} vs numeric {num:.6e} (rel err {err:.2e})"
            );
        }
        assert!(worst.is_finite(), "{name}: non-finite gradient check");
    }
}

/// exp(x) in f32 to ~2 ulp (Cephes-style range reduction and polynomial), branch-free so
/// loops over it vectorise; libm's expf does not. Inputs below −87 flush to 0.
#[inline(always)]
pub fn fast_exp(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    let n = (x * std::f32::consts::LOG2_E + 0.5).floor();
    let r = n.mul_add(-0.693_359_4, x);
    let r = n.mul_add(2.121_944_4e-4, r);
    let mut p = 1.987_569_1e-4f32;
    p = p.mul_add(r, 1.398_199_9e-3);
    p = p.mul_add(r, 8.333_452e-3);
    p = p.mul_add(r, 4.166_579_6e-2);
    p = p.mul_add(r, 1.666_666_5e-1);
    p = p.mul_add(r, 0.5);
    let e = p.mul_add(r * r, r) + 1.0;
    let bits = ((n as i32 + 127) << 23) as u32;
    e * f32::from_bits(bits)
}

/// x ← exp(x − shift) over a slice; returns the sum (eight partial sums, vectorised).
#[inline]
pub fn exp_shift_sum(x: &mut [f32], shift: f32) -> f32 {
    let mut acc = [0f32; 8];
    let mut ch = x.chunks_exact_mut(8);
    for c in &mut ch {
        for i in 0..8 {
            c[i] = fast_exp(c[i] - shift);
            acc[i] += c[i];
        }
    }
    let mut s = 0f32;
    for v in ch.into_remainder() {
        *v = fast_exp(*v - shift);
        s += *v;
    }
    acc.iter().sum::<f32>() + s
}

/// Largest element (−∞ for an empty slice), vectorised.
#[inline]
pub fn max_of(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 8];
    let ch = x.chunks_exact(8);
    let rem = ch.remainder();
    for c in ch {
        for i in 0..8 {
            acc[i] = acc[i].max(c[i]);
        }
    }
    rem.iter()
        .chain(acc.iter())
        .fold(f32::NEG_INFINITY, |a, &b| a.max(b))
}

#[cfg(test)]
mod exp_tests {
    use super::*;

    #[test]
    fn fast_exp_is_accurate() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let e = fast_exp(x) as f64;
            let r = (x as f64).exp();
            worst = worst.max((e - r).abs() / r);
            x += 0.0137;
        }
        assert!(worst < 5e-7, "fast_exp rel err {worst:e}");
        assert!(fast_exp(-200.0) < 1e-37);
        let mut v = vec![0.0f32, 1.0, 2.0, -3.0, 0.5, 0.1, 0.2, 0.3, 0.4, 7.0];
        let s = exp_shift_sum(&mut v, 1.0);
        let r: f32 = [0.0f32, 1.0, 2.0, -3.0, 0.5, 0.1, 0.2, 0.3, 0.4, 7.0]
            .iter()
            .map(|x| (x - 1.0).exp())
            .sum();
        assert!((s - r).abs() / r < 1e-6);
        assert_eq!(max_of(&[1.0, 5.0, -2.0, 3.0, 0.0, 0.0, 0.0, 0.0, 4.9]), 5.0);
    }
}
