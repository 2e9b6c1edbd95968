//! RMSNorm (HF LlamaRMSNorm): y = w ⊙ x · rstd, rstd = 1/√(mean(x²) + eps), in f32.

use rayon::prelude::*;

/// Forward. x (N, C), w (C) → out (N, C), rstd (N) saved for backward.
pub fn rmsnorm_fwd(out: &mut [f32], rstd: &mut [f32], x: &[f32], w: &[f32], c: usize, eps: f32) {
    let n = x.len() / c;
    debug_assert_eq!(out.len(), n * c);
    debug_assert_eq!(rstd.len(), n);
    out.par_chunks_mut(c)
        .zip(rstd.par_iter_mut())
        .zip(x.par_chunks(c))
        .for_each(|((o, r), xr)| {
            let ms = super::dot(xr, xr) / c as f32;
            let rs = 1.0 / (ms + eps).sqrt();
            *r = rs;
            for ((oi, xi), wi) in o.iter_mut().zip(xr).zip(w) {
                *oi = wi * (xi * rs);
            }
        });
}

/// Backward. dout (N, C), x (N, C), w (C), rstd (N) → dx (N, C) *accumulated* (the residual
/// stream's gradient flows around the norm), dw (C) accumulated.
///
/// With g = w ⊙ dout: dx = rstd·g − x·rstd³·(g·x)/C; dw = Σₙ dout ⊙ x·rstd.
pub fn rmsnorm_bwd(
    dx: &mut [f32],
    dw: &mut [f32],
    dout: &[f32],
    x: &[f32],
    w: &[f32],
    rstd: &[f32],
    c: usize,
) {
    let n = x.len() / c;
    // Rows in parallel; each task keeps a private dw partial, summed at the end so the
    // result does not depend on scheduling (fixed chunking by row block).
    let block = n.div_ceil(super::num_threads().max(1) * 4).max(1);
    let partials: Vec<Vec<f32>> = dx
        .par_chunks_mut(block * c)
        .enumerate()
        .map(|(bi, dxb)| {
            let mut dwp = vec![0f32; c];
            let rows = dxb.len() / c;
            for r in 0..rows {
                let row = bi * block + r;
                let xr = &x[row * c..(row + 1) * c];
                let dr = &dout[row * c..(row + 1) * c];
                let rs = rstd[row];
                let mut gx = 0f32;
                for i in 0..c {
                    gx += w[i] * dr[i] * xr[i];
                }
                let coef = rs * rs * rs * gx / c as f32;
                let dxr = &mut dxb[r * c..(r + 1) * c];
                for i in 0..c {
                    dxr[i] += rs * w[i] * dr[i] - xr[i] * coef;
                    dwp[i] += dr[i] * xr[i] * rs;
                }
            }
            dwp
        })
        .collect();
    for p in partials {
        super::add_inplace(dw, &p);
    }
    debug_assert_eq!(dx.len(), n * c);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testutil::{check_grad, rand_vec};

    #[test]
    fn forward_normalises() {
        let c = 16;
        let x = rand_vec(3 * c, 1);
        let w = vec![1.0; c];
        let mut out = vec![0f32; 3 * c];
        let mut r = vec![0f32; 3];
        rmsnorm_fwd(&mut out, &mut r, &x, &w, c, 1e-6);
        for row in out.chunks(c) {
            let ms: f32 = row.iter().map(|v| v * v).sum::<f32>() / c as f32;
            assert!((ms - 1.0).abs() < 1e-4);
        }
    }

    #[test]
    fn backward_matches_finite_differences() {
        let (n, c) = (5, 24);
        let x = rand_vec(n * c, 2);
        let w: Vec<f32> = rand_vec(c, 3).iter().map(|v| 1.0 + 0.5 * v).collect();
        let g = rand_vec(n * c, 4);
        let eps = 1e-5;
        let loss = |x: &[f32], w: &[f32]| -> f64 {
            let mut out = vec![0f32; n * c];
            let mut r = vec![0f32; n];
            rmsnorm_fwd(&mut out, &mut r, x, w, c, eps);
            out.iter().zip(&g).map(|(a, b)| *a as f64 * *b as f64).sum()
        };
        let mut out = vec![0f32; n * c];
        let mut r = vec![0f32; n];
        rmsnorm_fwd(&mut out, &mut r, &x, &w, c, eps);
        let mut dx = vec![0f32; n * c];
        let mut dw = vec![0f32; c];
        rmsnorm_bwd(&mut dx, &mut dw, &g, &x, &w, &r, c);
        let w0 = w.clone();
        check_grad("dx", &mut x.clone(), &dx, |xx| loss(xx, &w0), 1e-2, 1e-2);
        check_grad("dw", &mut w.clone(), &dw, |ww| loss(&x, ww), 1e-2, 1e-2);
    }
}
