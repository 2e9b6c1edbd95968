//! Causal scaled-dot-product attention with grouped-query heads (GQA).
//!
//! Head h reads key/value head h / (H / KV). Probabilities are kept for the backward pass.

use super::{axpy, dot, SendPtr};
use rayon::prelude::*;

/// Sizes of one attention call.
#[derive(Clone, Copy, Debug)]
pub struct AttnShape {
    pub b: usize,
    pub t: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl AttnShape {
    fn group(&self) -> usize {
        self.heads / self.kv_heads
    }
    fn scale(&self) -> f32 {
        1.0 / (self.head_dim as f32).sqrt()
    }
}

/// Forward. q (B·T, H·D), k (B·T, KV·D), v (B·T, KV·D) → y (B·T, H·D),
/// probs (B, H, T, T) (row t holds softmax over keys 0..=t, zeros above the diagonal).
/// Returns the largest pre-softmax logit q·k/√D (a telemetry signal for logit growth).
pub fn attention_fwd(
    y: &mut [f32],
    probs: &mut [f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    s: AttnShape,
) -> f32 {
    let AttnShape { t, heads, head_dim: d, .. } = s;
    let (qs, kvs) = (heads * d, s.kv_heads * d);
    let scale = s.scale();
    let yp = SendPtr(y.as_mut_ptr());
    assert!(y.len() >= s.b * t * qs && probs.len() >= s.b * heads * t * t);
    probs[..s.b * heads * t * t]
        .par_chunks_mut(t * t)
        .enumerate()
        .map(|(bh, p)| {
            let (b, h) = (bh / heads, bh % heads);
            let kvh = h / s.group();
            let mut maxlogit = f32::NEG_INFINITY;
            for ti in 0..t {
                let qrow = &q[(b * t + ti) * qs + h * d..][..d];
                let prow = &mut p[ti * t..(ti + 1) * t];
                let mut mx = f32::NEG_INFINITY;
                for j in 0..=ti {
                    let kr = &k[(b * t + j) * kvs + kvh * d..][..d];
                    let sc = dot(qrow, kr) * scale;
                    prow[j] = sc;
                    mx = mx.max(sc);
                }
                maxlogit = maxlogit.max(mx);
                let mut sum = 0f32;
                for pj in prow[..=ti].iter_mut() {
                    *pj = (*pj - mx).exp();
                    sum += *pj;
                }
                let inv = 1.0 / sum;
                for pj in prow[..=ti].iter_mut() {
                    *pj *= inv;
                }
                prow[ti + 1..].fill(0.0);
                // SAFETY: task (b, h) alone writes head h's slice of rows b·T..b·T+T of y.
                let yrow = unsafe {
                    std::slice::from_raw_parts_mut({ yp }.0.add((b * t + ti) * qs + h * d), d)
                };
                yrow.fill(0.0);
                for j in 0..=ti {
                    let vr = &v[(b * t + j) * kvs + kvh * d..][..d];
                    axpy(yrow, prow[j], vr);
                }
            }
            maxlogit
        })
        .reduce(|| f32::NEG_INFINITY, f32::max)
}

/// Backward. dy (B·T, H·D) with q, k, v, probs from forward → dq (B·T, H·D), dk, dv
/// (B·T, KV·D), all overwritten. `scratch` holds B·KV·T floats.
///
/// dv_j = Σ_t p_tj dy_t;  dp_tj = dy_t·v_j;  ds_tj = p_tj (dp_tj − Σ_j p_tj dp_tj);
/// dq_t = Σ_j ds_tj k_j /√D;  dk_j = Σ_t ds_tj q_t /√D.
#[allow(clippy::too_many_arguments)]
pub fn attention_bwd(
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
    scratch: &mut [f32],
    dy: &[f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    probs: &[f32],
    s: AttnShape,
) {
    let AttnShape { t, heads, kv_heads, head_dim: d, .. } = s;
    let (qs, kvs, g) = (heads * d, kv_heads * d, s.group());
    let scale = s.scale();
    let (dqp, dkp, dvp) = (SendPtr(dq.as_mut_ptr()), SendPtr(dk.as_mut_ptr()), SendPtr(dv.as_mut_ptr()));
    assert!(dq.len() >= s.b * t * qs && dk.len() >= s.b * t * kvs && dv.len() >= s.b * t * kvs);
    scratch[..s.b * kv_heads * t]
        .par_chunks_mut(t)
        .enumerate()
        .for_each(|(bk, ds)| {
            let (b, kvh) = (bk / kv_heads, bk % kv_heads);
            // SAFETY: task (b, kvh) alone touches kv head kvh of batch b in dk/dv and the
            // query heads of its group in dq.
            let row = |p: SendPtr, stride: usize, ti: usize, head: usize| unsafe {
                std::slice::from_raw_parts_mut({ p }.0.add((b * t + ti) * stride + head * d), d)
            };
            for ti in 0..t {
                row(dkp, kvs, ti, kvh).fill(0.0);
                row(dvp, kvs, ti, kvh).fill(0.0);
            }
            for h in kvh * g..(kvh + 1) * g {
                let p = &probs[(b * heads + h) * t * t..][..t * t];
                for ti in 0..t {
                    let prow = &p[ti * t..ti * t + ti + 1];
                    let dyr = &dy[(b * t + ti) * qs + h * d..][..d];
                    let mut sum = 0f32;
                    for j in 0..=ti {
                        let vr = &v[(b * t + j) * kvs + kvh * d..][..d];
                        let dp = dot(dyr, vr);
                        ds[j] = dp;
                        sum += prow[j] * dp;
                        axpy(row(dvp, kvs, j, kvh), prow[j], dyr);
                    }
                    let dqr = row(dqp, qs, ti, h);
                    dqr.fill(0.0);
                    let qr = &q[(b * t + ti) * qs + h * d..][..d];
                    for j in 0..=ti {
                        let dsj = prow[j] * (ds[j] - sum) * scale;
                        let kr = &k[(b * t + j) * kvs + kvh * d..][..d];
                        axpy(dqr, dsj, kr);
                        axpy(row(dkp, kvs, j, kvh), dsj, qr);
                    }
                }
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testutil::{check_grad, rand_vec};

    fn shape() -> AttnShape {
        AttnShape { b: 2, t: 5, heads: 4, kv_heads: 2, head_dim: 8 }
    }

    fn run(q: &[f32], k: &[f32], v: &[f32], s: AttnShape) -> (Vec<f32>, Vec<f32>) {
        let mut y = vec![0f32; s.b * s.t * s.heads * s.head_dim];
        let mut p = vec![0f32; s.b * s.heads * s.t * s.t];
        attention_fwd(&mut y, &mut p, q, k, v, s);
        (y, p)
    }

    #[test]
    fn causal_and_normalised() {
        let s = shape();
        let q = rand_vec(s.b * s.t * s.heads * s.head_dim, 1);
        let k = rand_vec(s.b * s.t * s.kv_heads * s.head_dim, 2);
        let v = rand_vec(s.b * s.t * s.kv_heads * s.head_dim, 3);
        let (y, p) = run(&q, &k, &v, s);
        for row in p.chunks(s.t).enumerate() {
            let ti = row.0 % s.t;
            let sum: f32 = row.1.iter().sum();
            assert!((sum - 1.0).abs() < 1e-5);
            assert!(row.1[ti + 1..].iter().all(|x| *x == 0.0));
        }
        // first position attends only to itself: y_0 = v_0 of its kv head
        let d = s.head_dim;
        for h in 0..s.heads {
            let kvh = h / 2;
            assert_eq!(&y[h * d..(h + 1) * d], &v[kvh * d..(kvh + 1) * d]);
        }
    }

    #[test]
    fn backward_matches_finite_differences() {
        let s = shape();
        let nq = s.b * s.t * s.heads * s.head_dim;
        let nk = s.b * s.t * s.kv_heads * s.head_dim;
        let q: Vec<f32> = rand_vec(nq, 4).iter().map(|x| 2.0 * x).collect();
        let k: Vec<f32> = rand_vec(nk, 5).iter().map(|x| 2.0 * x).collect();
        let v = rand_vec(nk, 6);
        let g = rand_vec(nq, 7);
        let (_, p) = run(&q, &k, &v, s);
        let (mut dq, mut dk, mut dv) = (vec![0f32; nq], vec![9f32; nk], vec![9f32; nk]);
        let mut scratch = vec![0f32; s.b * s.kv_heads * s.t];
        attention_bwd(&mut dq, &mut dk, &mut dv, &mut scratch, &g, &q, &k, &v, &p, s);
        let loss = |q: &[f32], k: &[f32], v: &[f32]| -> f64 {
            let (y, _) = run(q, k, v, s);
            y.iter().zip(&g).map(|(a, b)| *a as f64 * *b as f64).sum()
        };
        check_grad("dq", &mut q.clone(), &dq, |x| loss(x, &k, &v), 1e-2, 1e-2);
        check_grad("dk", &mut k.clone(), &dk, |x| loss(&q, x, &v), 1e-2, 1e-2);
        check_grad("dv", &mut v.clone(), &dv, |x| loss(&q, &k, x), 1e-2, 1e-2);
    }
}
