//! Softmax cross-entropy over the lm_head logits, with the gradient written in place so the
//! (N, V) logits buffer is reused for dlogits (no second vocabulary-sized buffer).

use rayon::prelude::*;

/// Forward. logits (N, V), targets (N) → per-row loss (N) and log-partition lse (N).
/// Returns the mean loss (summed in f64, in row order, so it is deterministic).
pub fn cross_entropy_fwd(
    losses: &mut [f32],
    lse: &mut [f32],
    logits: &[f32],
    targets: &[u32],
    v: usize,
) -> f64 {
    losses
        .par_iter_mut()
        .zip(lse.par_iter_mut())
        .zip(logits.par_chunks(v).zip(targets.par_iter()))
        .for_each(|((l, z), (row, &tgt))| {
            let mx = super::max_of(row);
            let mut s = [0f32; 8];
            let ch = row.chunks_exact(8);
            let mut tail = 0f32;
            for &x in ch.remainder() {
                tail += super::fast_exp(x - mx);
            }
            for c in ch {
                for i in 0..8 {
                    s[i] += super::fast_exp(c[i] - mx);
                }
            }
            let lz = mx + (s.iter().sum::<f32>() + tail).ln();
            *z = lz;
            *l = lz - row[tgt as usize];
        });
    losses.iter().map(|&x| x as f64).sum::<f64>() / losses.len().max(1) as f64
}

/// Backward, in place, of the mean of CE + `z_loss`·lse² (PaLM's z-loss keeps the
/// log-partition near 0): logits (N, V) ← scale · (softmax·(1 + 2·z_loss·lse) − onehot).
/// `scale` is 1/N for a mean loss (divided further for gradient accumulation).
pub fn cross_entropy_bwd_inplace(
    logits: &mut [f32],
    lse: &[f32],
    targets: &[u32],
    v: usize,
    scale: f32,
    z_loss: f32,
) {
    logits
        .par_chunks_mut(v)
        .zip(lse.par_iter().zip(targets.par_iter()))
        .for_each(|(row, (&z, &tgt))| {
            let s = scale * (1.0 + 2.0 * z_loss * z);
            for x in row.iter_mut() {
                *x = super::fast_exp(*x - z) * s;
            }
            row[tgt as usize] -= scale;
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testutil::{check_grad, rand_vec};

    #[test]
    fn uniform_logits_give_ln_v() {
        let (n, v) = (3, 50);
        let logits = vec![0.3f32; n * v];
        let (mut l, mut z) = (vec![0f32; n], vec![0f32; n]);
        let loss = cross_entropy_fwd(&mut l, &mut z, &logits, &[0, 7, 49], v);
        assert!((loss - (v as f64).ln()).abs() < 1e-5);
    }

    #[test]
    fn backward_matches_finite_differences() {
        let (n, v) = (4, 9);
        let logits: Vec<f32> = rand_vec(n * v, 1).iter().map(|x| 3.0 * x).collect();
        let targets = [2u32, 0, 8, 2];
        let f = |x: &[f32]| -> f64 {
            let (mut l, mut z) = (vec![0f32; n], vec![0f32; n]);
            cross_entropy_fwd(&mut l, &mut z, x, &targets, v)
        };
        let (mut l, mut z) = (vec![0f32; n], vec![0f32; n]);
        cross_entropy_fwd(&mut l, &mut z, &logits, &targets, v);
        let mut d = logits.clone();
        cross_entropy_bwd_inplace(&mut d, &z, &targets, v, 1.0 / n as f32, 0.0);
        check_grad("dlogits", &mut logits.clone(), &d, f, 1e-2, 1e-3);
    }

    #[test]
    fn z_loss_backward_matches_finite_differences() {
        let (n, v, zc) = (4, 9, 0.3f32);
        // shifted logits: a log-partition far from 0, as z-loss is for
        let logits: Vec<f32> = rand_vec(n * v, 2).iter().map(|x| 2.0 * x + 3.0).collect();
        let targets = [1u32, 5, 8, 0];
        let f = |x: &[f32]| -> f64 {
            let (mut l, mut z) = (vec![0f32; n], vec![0f32; n]);
            let ce = cross_entropy_fwd(&mut l, &mut z, x, &targets, v);
            ce + zc as f64 * z.iter().map(|&q| (q as f64).powi(2)).sum::<f64>() / n as f64
        };
        let (mut l, mut z) = (vec![0f32; n], vec![0f32; n]);
        cross_entropy_fwd(&mut l, &mut z, &logits, &targets, v);
        let mut d = logits.clone();
        cross_entropy_bwd_inplace(&mut d, &z, &targets, v, 1.0 / n as f32, zc);
        check_grad("dlogits", &mut logits.clone(), &d, f, 1e-2, 1e-3);
    }
}
