//! RMSNorm (HF LlamaRMSNorm): y = w ⊙ x · rstd, rstd = 1/√(mean(x²) + eps), in f32.

use rayon::prelude::*;

/// One vector's RMSNorm: out = w ⊙ x·rstd; returns rstd (shared by rmsnorm and qk-norm).
#[inline]
fn norm_vec(out: &mut [f32], x: &[f32], w: &[f32], eps: f32) -> f32 {
    let rs = 1.0 / (super::dot(x, x) / x.len() as f32 + eps).sqrt();
    for ((o, xi), wi) in out.iter_mut().zip(x).zip(w) {
        *o = wi * (xi * rs);
    }
    rs
}

/// The coupling term of one vector's backward, rstd³·Σ(w ⊙ dout ⊙ x)/C: dx = rstd·w ⊙ dout − x·coef.
#[inline]
fn bwd_coef(dout: &[f32], x: &[f32], w: &[f32], rs: f32) -> f32 {
    let mut gx = 0f32;
    for i in 0..x.len() {
        gx += w[i] * dout[i] * x[i];
    }
    rs * rs * rs * gx / x.len() as f32
}

/// Forward. x (N, C), w (C) → out (N, C), rstd (N) saved for backward.
pub fn rmsnorm_fwd(out: &mut [f32], rstd: &mut [f32], x: &[f32], w: &[f32], c: usize, eps: f32) {
    let n = x.len() / c;
    debug_assert_eq!(out.len(), n * c);
    debug_assert_eq!(rstd.len(), n);
    out.par_chunks_mut(c)
        .zip(rstd.par_iter_mut())
        .zip(x.par_chunks(c))
        .for_each(|((o, r), xr)| *r = norm_vec(o, xr, w, eps));
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
                let coef = bwd_coef(dr, xr, w, rs);
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

/// qk-norm forward (Qwen3's q_norm / k_norm, before RoPE), in place on fused q|k|v rows:
/// qkv (N, qs) holds per row q = `heads` vectors of D then k = `kv_heads` vectors of D. Each
/// head vector x becomes wq ⊙ x·rstd (wk for k heads). The un-normalised q|k go to
/// pre (N, (heads + kv_heads)·D) and the rstd to rstd (N, heads + kv_heads), for backward.
#[allow(clippy::too_many_arguments)]
pub fn headnorm_fwd(
    qkv: &mut [f32],
    pre: &mut [f32],
    rstd: &mut [f32],
    wq: &[f32],
    wk: &[f32],
    qs: usize,
    heads: usize,
    kv_heads: usize,
    eps: f32,
) {
    let d = wq.len();
    let hk = heads + kv_heads;
    qkv.par_chunks_mut(qs)
        .zip(pre.par_chunks_mut(hk * d))
        .zip(rstd.par_chunks_mut(hk))
        .for_each(|((row, pr), rs)| {
            pr.copy_from_slice(&row[..hk * d]);
            for (j, (x, r)) in pr.chunks(d).zip(rs.iter_mut()).enumerate() {
                let w = if j < heads { wq } else { wk };
                *r = norm_vec(&mut row[j * d..(j + 1) * d], x, w, eps);
            }
        });
}

/// qk-norm backward: dqkv's q|k part holds d(normalised q|k) and is replaced, in place, by
/// d(pre-norm q|k); dwq and dwk (D each) are accumulated. Same formulas as `rmsnorm_bwd`
/// per head vector; weight-gradient partials per row block, summed in a fixed order.
#[allow(clippy::too_many_arguments)]
pub fn headnorm_bwd(
    dqkv: &mut [f32],
    dwq: &mut [f32],
    dwk: &mut [f32],
    pre: &[f32],
    rstd: &[f32],
    wq: &[f32],
    wk: &[f32],
    qs: usize,
    heads: usize,
    kv_heads: usize,
) {
    let d = wq.len();
    let hk = heads + kv_heads;
    let n = dqkv.len() / qs;
    let block = n.div_ceil(super::num_threads().max(1) * 4).max(1);
    let partials: Vec<Vec<f32>> = dqkv
        .par_chunks_mut(block * qs)
        .enumerate()
        .map(|(bi, rows)| {
            let mut dw = vec![0f32; 2 * d]; // dwq | dwk
            for (r, row) in rows.chunks_mut(qs).enumerate() {
                let i = bi * block + r;
                for j in 0..hk {
                    let (w, dwp) = if j < heads { (wq, 0) } else { (wk, d) };
                    let x = &pre[(i * hk + j) * d..][..d];
                    let rs = rstd[i * hk + j];
                    let dr = &mut row[j * d..(j + 1) * d];
                    let coef = bwd_coef(dr, x, w, rs);
                    for k in 0..d {
                        dw[dwp + k] += dr[k] * x[k] * rs;
                        dr[k] = rs * w[k] * dr[k] - x[k] * coef;
                    }
                }
            }
            dw
        })
        .collect();
    for p in partials {
        super::add_inplace(dwq, &p[..d]);
        super::add_inplace(dwk, &p[d..]);
    }
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

    #[test]
    fn headnorm_backward_matches_finite_differences() {
        // 3 rows of fused q|k|v: 2 q heads, 1 k head, 1 v head of D = 8 (v untouched)
        let (n, h, kv, d) = (3, 2, 1, 8);
        let qs = (h + 2 * kv) * d;
        let x = rand_vec(n * qs, 5);
        let wq: Vec<f32> = rand_vec(d, 6).iter().map(|v| 1.0 + 0.3 * v).collect();
        let wk: Vec<f32> = rand_vec(d, 7).iter().map(|v| 1.0 + 0.3 * v).collect();
        let g = rand_vec(n * qs, 8);
        let eps = 1e-6;
        let fwd = |x: &[f32], wq: &[f32], wk: &[f32]| {
            let mut y = x.to_vec();
            let mut pre = vec![0f32; n * (h + kv) * d];
            let mut r = vec![0f32; n * (h + kv)];
            headnorm_fwd(&mut y, &mut pre, &mut r, wq, wk, qs, h, kv, eps);
            (y, pre, r)
        };
        let loss = |x: &[f32], wq: &[f32], wk: &[f32]| -> f64 {
            let (y, _, _) = fwd(x, wq, wk);
            y.iter().zip(&g).map(|(a, b)| *a as f64 * *b as f64).sum()
        };
        let (y, pre, r) = fwd(&x, &wq, &wk);
        // every q/k head vector comes out with RMS |w|-weighted 1; v passes through
        for row in 0..n {
            let v = &y[row * qs + (h + kv) * d..][..kv * d];
            assert_eq!(v, &x[row * qs + (h + kv) * d..][..kv * d]);
        }
        let mut dx = g.clone();
        let (mut dwq, mut dwk) = (vec![0f32; d], vec![0f32; d]);
        headnorm_bwd(&mut dx, &mut dwq, &mut dwk, &pre, &r, &wq, &wk, qs, h, kv);
        let (wq0, wk0) = (wq.clone(), wk.clone());
        // the v part of dqkv is left as it was (identity there)
        check_grad(
            "dx",
            &mut x.clone(),
            &dx,
            |xx| loss(xx, &wq0, &wk0),
            1e-2,
            1e-2,
        );
        check_grad(
            "dwq",
            &mut wq.clone(),
            &dwq,
            |w| loss(&x, w, &wk0),
            1e-2,
            1e-2,
        );
        check_grad(
            "dwk",
            &mut wk.clone(),
            &dwk,
            |w| loss(&x, &wq0, w),
            1e-2,
            1e-2,
        );
    }
}
