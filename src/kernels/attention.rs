//! Causal scaled-dot-product attention with grouped-query heads (GQA).
//!
//! Head h reads key/value head h / (H / KV). Queries, keys and values live in one fused
//! buffer qkv (B·T, (H + 2·KV)·D) — the output of a single projection GEMM — and their
//! gradients are written in the same layout, so the backward projection is one GEMM too. Each (batch, head) is one task; inside it the
//! products are single-threaded GEMMs on strided head views (no copies), and the causal
//! mask is applied to the (T, T) score matrix. Probabilities are kept for the backward pass.

use super::matmul::gemm_ptr;
use super::{dot, exp_shift_sum, max_of, SendPtr};

/// Row/column block of the causal tiling.
const BLK: usize = 64;
use rayon::prelude::*;

/// Sizes of one attention call.
#[derive(Clone, Copy, Debug)]
pub struct AttnShape {
    pub b: usize,
    pub t: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Logit scale (1/√D for LLaMA).
    pub scale: f32,
}

impl AttnShape {
    fn group(&self) -> usize {
        self.heads / self.kv_heads
    }
    /// Row stride of the fused qkv buffer: H·D query, then KV·D key, then KV·D value columns.
    pub fn qkv_stride(&self) -> usize {
        (self.heads + 2 * self.kv_heads) * self.head_dim
    }
    /// Floats of backward scratch: one (T, T) matrix per (batch, kv head) task.
    pub fn scratch_len(&self) -> usize {
        self.b * self.kv_heads * self.t * self.t
    }
}

/// Forward. qkv (B·T, (H+2KV)·D) → y (B·T, H·D), probs (B, H, T, T) (row t holds softmax
/// over keys 0..=t, zeros above the diagonal). Returns the largest pre-softmax logit
/// q·k/√D (a telemetry signal for logit growth).
pub fn attention_fwd(y: &mut [f32], probs: &mut [f32], qkv: &[f32], s: AttnShape) -> f32 {
    let AttnShape {
        t,
        heads,
        head_dim: d,
        ..
    } = s;
    let (ys, rs) = (heads * d, s.qkv_stride());
    let (koff, voff) = (heads * d, (heads + s.kv_heads) * d);
    let scale = s.scale;
    assert!(y.len() >= s.b * t * ys && probs.len() >= s.b * heads * t * t);
    assert!(qkv.len() >= s.b * t * rs);
    let yp = SendPtr(y.as_mut_ptr());
    probs[..s.b * heads * t * t]
        .par_chunks_mut(t * t)
        .enumerate()
        .map(|(bh, p)| {
            let (b, h) = (bh / heads, bh % heads);
            let kvh = h / s.group();
            let base = qkv[(b * t) * rs..].as_ptr();
            // SAFETY: all views below are in bounds (asserted) and p is this task's own chunk.
            let (qh, kh, vh) = unsafe {
                (
                    base.add(h * d),
                    base.add(koff + kvh * d),
                    base.add(voff + kvh * d),
                )
            };
            let mut maxlogit = f32::NEG_INFINITY;
            // Row blocks: block [r0, r1) only sees keys [0, r1), so the masked upper
            // triangle is (almost all) skipped.
            for r0 in (0..t).step_by(BLK) {
                let r1 = (r0 + BLK).min(t);
                unsafe {
                    let pr = p.as_mut_ptr().add(r0 * t);
                    gemm_ptr(
                        r1 - r0,
                        r1,
                        d,
                        pr,
                        t,
                        false,
                        qh.add(r0 * rs),
                        rs,
                        1,
                        kh,
                        1,
                        rs,
                        scale,
                        1,
                    );
                }
                for ti in r0..r1 {
                    let row = &mut p[ti * t..(ti + 1) * t];
                    let mx = max_of(&row[..=ti]);
                    maxlogit = maxlogit.max(mx);
                    let inv = 1.0 / exp_shift_sum(&mut row[..=ti], mx);
                    row[..=ti].iter_mut().for_each(|x| *x *= inv);
                    row[ti + 1..].fill(0.0);
                }
                // SAFETY: task (b, h) alone writes head h's columns of rows b·T..b·T+T of y.
                unsafe {
                    let yh = { yp }.0.add((b * t + r0) * ys + h * d);
                    gemm_ptr(
                        r1 - r0,
                        d,
                        r1,
                        yh,
                        ys,
                        false,
                        p.as_ptr().add(r0 * t),
                        t,
                        1,
                        vh,
                        rs,
                        1,
                        1.0,
                        1,
                    );
                }
            }
            maxlogit
        })
        .reduce(|| f32::NEG_INFINITY, f32::max)
}

/// Backward. dy (B·T, H·D), with qkv and probs from forward → dqkv (B·T, (H+2KV)·D),
/// overwritten. `scratch` holds `s.scratch_len()` floats.
///
/// dV = Pᵀ dY;  dP = dY Vᵀ;  dS = P ⊙ (dP − rowsum(P ⊙ dP)) / √D;  dQ = dS K;  dK = dSᵀ Q.
pub fn attention_bwd(
    dqkv: &mut [f32],
    scratch: &mut [f32],
    dy: &[f32],
    qkv: &[f32],
    probs: &[f32],
    s: AttnShape,
) {
    let AttnShape {
        t,
        heads,
        kv_heads,
        head_dim: d,
        ..
    } = s;
    let (ys, rs, g) = (heads * d, s.qkv_stride(), s.group());
    let (koff, voff) = (heads * d, (heads + kv_heads) * d);
    let scale = s.scale;
    assert!(dqkv.len() >= s.b * t * rs && qkv.len() >= s.b * t * rs && dy.len() >= s.b * t * ys);
    assert!(probs.len() >= s.b * heads * t * t && scratch.len() >= s.scratch_len());
    let dp = SendPtr(dqkv.as_mut_ptr());
    scratch[..s.scratch_len()]
        .par_chunks_mut(t * t)
        .enumerate()
        .for_each(|(bk, ds)| {
            let (b, kvh) = (bk / kv_heads, bk % kv_heads);
            // SAFETY (all products below): views are in bounds (asserted); task (b, kvh) alone
            // writes kv head kvh of batch b in dk/dv and the query heads of its group in dq.
            let base = qkv[(b * t) * rs..].as_ptr();
            let dbase = unsafe { { dp }.0.add((b * t) * rs) };
            let (kh, vh) = unsafe { (base.add(koff + kvh * d), base.add(voff + kvh * d)) };
            let (dkh, dvh) = unsafe { (dbase.add(koff + kvh * d), dbase.add(voff + kvh * d)) };
            for (i, h) in (kvh * g..(kvh + 1) * g).enumerate() {
                let p = &probs[(b * heads + h) * t * t..][..t * t];
                let dyh = dy[(b * t) * ys + h * d..].as_ptr();
                let qh = unsafe { base.add(h * d) };
                let dqh = unsafe { dbase.add(h * d) };
                let first = i == 0;
                for r0 in (0..t).step_by(BLK) {
                    let r1 = (r0 + BLK).min(t);
                    // dP[r0..r1, ..r1] = dY_h[r0..r1] · V[..r1]ᵀ
                    unsafe {
                        let dsr = ds.as_mut_ptr().add(r0 * t);
                        gemm_ptr(
                            r1 - r0,
                            r1,
                            d,
                            dsr,
                            t,
                            false,
                            dyh.add(r0 * ys),
                            ys,
                            1,
                            vh,
                            1,
                            rs,
                            1.0,
                            1,
                        );
                    }
                    for ti in r0..r1 {
                        let pr = &p[ti * t..ti * t + ti + 1];
                        let dr = &mut ds[ti * t..(ti + 1) * t];
                        let sum = dot(pr, &dr[..=ti]);
                        for (x, &pj) in dr[..=ti].iter_mut().zip(pr) {
                            *x = pj * (*x - sum) * scale;
                        }
                        dr[ti + 1..r1].fill(0.0);
                    }
                    // dQ_h[r0..r1] = dS[r0..r1, ..r1] · K[..r1]
                    unsafe {
                        let src = ds.as_ptr().add(r0 * t);
                        gemm_ptr(
                            r1 - r0,
                            d,
                            r1,
                            dqh.add(r0 * rs),
                            rs,
                            false,
                            src,
                            t,
                            1,
                            kh,
                            rs,
                            1,
                            1.0,
                            1,
                        );
                    }
                }
                // Key blocks [c0, c1) receive from query rows [c0, T) only.
                for c0 in (0..t).step_by(BLK) {
                    let c1 = (c0 + BLK).min(t);
                    let (m, kk) = (c1 - c0, t - c0);
                    unsafe {
                        // dV[c0..c1] [+]= P[c0.., c0..c1]ᵀ · dY_h[c0..]
                        let pt = p.as_ptr().add(c0 * t + c0);
                        gemm_ptr(
                            m,
                            d,
                            kk,
                            dvh.add(c0 * rs),
                            rs,
                            !first,
                            pt,
                            1,
                            t,
                            dyh.add(c0 * ys),
                            ys,
                            1,
                            1.0,
                            1,
                        );
                        // dK[c0..c1] [+]= dS[c0.., c0..c1]ᵀ · Q_h[c0..]
                        let st = ds.as_ptr().add(c0 * t + c0);
                        gemm_ptr(
                            m,
                            d,
                            kk,
                            dkh.add(c0 * rs),
                            rs,
                            !first,
                            st,
                            1,
                            t,
                            qh.add(c0 * rs),
                            rs,
                            1,
                            1.0,
                            1,
                        );
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
        AttnShape {
            b: 2,
            t: 5,
            heads: 4,
            kv_heads: 2,
            head_dim: 8,
            scale: 0.35,
        }
    }

    fn run(qkv: &[f32], s: AttnShape) -> (Vec<f32>, Vec<f32>) {
        let mut y = vec![0f32; s.b * s.t * s.heads * s.head_dim];
        let mut p = vec![0f32; s.b * s.heads * s.t * s.t];
        attention_fwd(&mut y, &mut p, qkv, s);
        (y, p)
    }

    #[test]
    fn causal_and_normalised() {
        let s = shape();
        let qkv = rand_vec(s.b * s.t * s.qkv_stride(), 1);
        let (y, p) = run(&qkv, s);
        for row in p.chunks(s.t).enumerate() {
            let ti = row.0 % s.t;
            let sum: f32 = row.1.iter().sum();
            assert!((sum - 1.0).abs() < 1e-5);
            assert!(row.1[ti + 1..].iter().all(|x| *x == 0.0));
        }
        // first position attends only to itself: y_0 = v_0 of its kv head
        let d = s.head_dim;
        let voff = (s.heads + s.kv_heads) * d;
        for h in 0..s.heads {
            let kvh = h / 2;
            assert_eq!(
                &y[h * d..(h + 1) * d],
                &qkv[voff + kvh * d..voff + (kvh + 1) * d]
            );
        }
    }

    #[test]
    fn backward_matches_finite_differences() {
        grad_check(shape());
    }

    #[test]
    fn backward_matches_finite_differences_across_blocks() {
        // T spans three causal blocks, with a ragged last one.
        grad_check(AttnShape {
            b: 1,
            t: 2 * BLK + 3,
            heads: 2,
            kv_heads: 1,
            head_dim: 4,
            scale: 0.5,
        });
    }

    fn grad_check(s: AttnShape) {
        let n = s.b * s.t * s.qkv_stride();
        let qkv: Vec<f32> = rand_vec(n, 4).iter().map(|x| 2.0 * x).collect();
        let g = rand_vec(s.b * s.t * s.heads * s.head_dim, 7);
        let (_, p) = run(&qkv, s);
        let mut dqkv = vec![9f32; n]; // garbage: backward must overwrite every entry
        let mut scratch = vec![0f32; s.scratch_len()];
        attention_bwd(&mut dqkv, &mut scratch, &g, &qkv, &p, s);
        let loss = |x: &[f32]| -> f64 {
            let (y, _) = run(x, s);
            y.iter().zip(&g).map(|(a, b)| *a as f64 * *b as f64).sum()
        };
        check_grad("dqkv", &mut qkv.clone(), &dqkv, loss, 1e-2, 1e-2);
    }
}
