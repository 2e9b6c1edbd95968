//! SwiGLU gate: h = silu(g) ⊙ u, silu(g) = g·σ(g). Gate and up come from one fused
//! projection: each row of `gu` (N, 2F) is [g | u].

use rayon::prelude::*;

#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + super::fast_exp(-x))
}

/// Forward. gu (N, 2F) → h (N, F).
pub fn swiglu_fwd(h: &mut [f32], gu: &[f32], f: usize) {
    h.par_chunks_mut(f)
        .zip(gu.par_chunks(2 * f))
        .for_each(|(h, gu)| {
            let (g, u) = gu.split_at(f);
            for i in 0..f {
                h[i] = g[i] * sigmoid(g[i]) * u[i];
            }
        });
}

/// Backward. dh (N, F) → dgu (N, 2F), overwritten:
/// dg = dh ⊙ u ⊙ σ(g)(1 + g(1 − σ(g))), du = dh ⊙ silu(g).
pub fn swiglu_bwd(dgu: &mut [f32], dh: &[f32], gu: &[f32], f: usize) {
    dgu.par_chunks_mut(2 * f)
        .zip(dh.par_chunks(f).zip(gu.par_chunks(2 * f)))
        .for_each(|(dgu, (dh, gu))| {
            let (g, u) = gu.split_at(f);
            let (dg, du) = dgu.split_at_mut(f);
            for i in 0..f {
                let s = sigmoid(g[i]);
                du[i] = dh[i] * g[i] * s;
                dg[i] = dh[i] * u[i] * s * (1.0 + g[i] * (1.0 - s));
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testutil::{check_grad, rand_vec};

    #[test]
    fn backward_matches_finite_differences() {
        let (n, f) = (6, 50);
        let gu: Vec<f32> = rand_vec(n * 2 * f, 1).iter().map(|x| 4.0 * x).collect();
        let dh = rand_vec(n * f, 3);
        let loss = |gu: &[f32]| -> f64 {
            let mut h = vec![0f32; n * f];
            swiglu_fwd(&mut h, gu, f);
            h.iter().zip(&dh).map(|(a, b)| *a as f64 * *b as f64).sum()
        };
        let mut dgu = vec![0f32; n * 2 * f];
        swiglu_bwd(&mut dgu, &dh, &gu, f);
        check_grad("dgu", &mut gu.clone(), &dgu, loss, 1e-2, 1e-2);
    }
}
