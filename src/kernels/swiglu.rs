//! SwiGLU gate: h = silu(g) ⊙ u, silu(g) = g·σ(g).

use rayon::prelude::*;

const CHUNK: usize = 4096;

#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// Forward. g (N, F), u (N, F) → h (N, F).
pub fn swiglu_fwd(h: &mut [f32], g: &[f32], u: &[f32]) {
    h.par_chunks_mut(CHUNK)
        .zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)))
        .for_each(|(h, (g, u))| {
            for i in 0..h.len() {
                h[i] = g[i] * sigmoid(g[i]) * u[i];
            }
        });
}

/// Backward. dh (N, F) → dg, du (N, F), overwritten.
/// dg = dh ⊙ u ⊙ σ(g)(1 + g(1 − σ(g))), du = dh ⊙ silu(g).
pub fn swiglu_bwd(dg: &mut [f32], du: &mut [f32], dh: &[f32], g: &[f32], u: &[f32]) {
    dg.par_chunks_mut(CHUNK)
        .zip(du.par_chunks_mut(CHUNK))
        .enumerate()
        .for_each(|(ci, (dg, du))| {
            let o = ci * CHUNK;
            for i in 0..dg.len() {
                let (gi, ui, dhi) = (g[o + i], u[o + i], dh[o + i]);
                let s = sigmoid(gi);
                du[i] = dhi * gi * s;
                dg[i] = dhi * ui * s * (1.0 + gi * (1.0 - s));
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testutil::{check_grad, rand_vec};

    #[test]
    fn backward_matches_finite_differences() {
        let n = 300;
        let g: Vec<f32> = rand_vec(n, 1).iter().map(|x| 4.0 * x).collect();
        let u = rand_vec(n, 2);
        let dh = rand_vec(n, 3);
        let loss = |g: &[f32], u: &[f32]| -> f64 {
            let mut h = vec![0f32; n];
            swiglu_fwd(&mut h, g, u);
            h.iter().zip(&dh).map(|(a, b)| *a as f64 * *b as f64).sum()
        };
        let (mut dg, mut du) = (vec![0f32; n], vec![0f32; n]);
        swiglu_bwd(&mut dg, &mut du, &dh, &g, &u);
        check_grad("dg", &mut g.clone(), &dg, |x| loss(x, &u), 1e-2, 1e-2);
        check_grad("du", &mut u.clone(), &du, |x| loss(&g, x), 1e-2, 1e-2);
    }
}
