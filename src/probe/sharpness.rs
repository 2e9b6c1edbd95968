//! Sharpness in keel's engine: λ_max of the loss Hessian H and of Adam's preconditioned
//! Hessian P⁻¹H on one batch, and the largest stable LR they predict.
//!
//! Hessian-vector products are central finite differences of the engine's exact gradients,
//! Hu ≈ (∇L(θ + hu) − ∇L(θ − hu)) / 2h (two forward+backward passes each; the error is O(h²)
//! from the third derivative plus f32 rounding / h, so h is set relative to the weights:
//! ‖hu‖ = `fd_rel`·‖θ‖; against float64 double backward on the micro fixture the error is
//! 1.2e-2 at fd_rel 1e-3, 1.3e-4 at the default 5e-5 and 3.8e-3 at 1e-6). The top eigenvalue comes from Lanczos on that operator (the largest
//! Ritz value, stopped on its residual bound): network Hessians have clustered top
//! eigenvalues and power iteration, stopped early, under-estimates λ_max, i.e. over-states the
//! safe LR. Under AdamW the operator is D^½ H D^½ with D = lr multiplier / (√v̂ + ε) per
//! element (`AdamW::precond_scale`); its eigenvalues are those of P⁻¹H.
//!
//! The prediction: Adam with a frozen preconditioner is EMA-momentum descent on P⁻¹H, stable
//! while η·λ_max(P⁻¹H) < (2 + 2β₁)/(1 − β₁) (38 at β₁ = 0.9); under full-batch Adam the
//! preconditioned sharpness rises to this threshold and hovers there (Cohen et al., "Adaptive
//! gradient methods at the edge of stability", 2022). So lr_edge = (2 + 2β₁)/((1 − β₁)·λ_P),
//! in units of the base (peak) LR that `optim.lr` sets.
//!
//! Measuring never changes the run: the weights are restored bit for bit, the gradients and
//! the forward statistics are put back, and the random start vector has its own stream.

use crate::init::rng::Stream;
use crate::model::Model;
use crate::optim::AdamW;
use serde::Serialize;
use std::time::Instant;

#[derive(Debug, Clone, Copy)]
pub struct SharpnessOptions {
    /// Most Hessian-vector products per eigenvalue.
    pub iters: usize,
    /// Stop when the Ritz value's residual bound is below `tol`·|λ|.
    pub tol: f64,
    /// Seed of the random start vector.
    pub seed: u64,
    /// Finite-difference step relative to the weights: ‖h·u‖ = fd_rel·‖θ‖.
    pub fd_rel: f64,
    /// Also measure λ_max(H) (without it only the preconditioned sharpness is measured
    /// under Adam, half the cost).
    pub plain: bool,
}

impl Default for SharpnessOptions {
    fn default() -> Self {
        SharpnessOptions {
            iters: 20,
            tol: 1e-3,
            seed: 0,
            fd_rel: 5e-5,
            plain: true,
        }
    }
}

/// One measurement.
#[derive(Debug, Clone, Serialize)]
pub struct Sharpness {
    /// λ_max(H) on the batch (None when not asked for).
    pub lambda_max: Option<f64>,
    /// λ_max(P⁻¹H) under AdamW (P = √v̂ + ε and the per-tensor LR multipliers).
    pub lambda_precond: Option<f64>,
    /// "adam state", or "first-step estimate" before Adam's first step (v̂ = g²), or "none".
    pub preconditioner: &'static str,
    /// The bound on lr·λ: (2 + 2β₁)/(1 − β₁) under Adam, 2 for gradient descent.
    pub coefficient: f64,
    /// Predicted max stable base LR: coefficient / λ (λ_P under Adam, else λ_max(H)).
    pub lr_edge: f64,
    /// The LR in force when measured, and lr / lr_edge (Adam hovers near 1 at the edge).
    pub lr: f64,
    pub edge_ratio: f64,
    pub hvps: usize,
    /// Compute in training steps (forward+backward): 2 per Hessian-vector product.
    pub cost_steps: f64,
    pub seconds: f64,
    /// Every eigenvalue met `tol` within `iters` (else they are lower bounds in practice).
    pub converged: bool,
    /// The batch's loss at the measured weights.
    pub loss: f64,
}

/// Reusable buffers (five vectors of the parameter count).
pub struct Scratch {
    p0: Vec<f32>,
    g0: Vec<f32>,
    gp: Vec<f32>,
    u: Vec<f32>,
    d: Vec<f32>,
}

impl Scratch {
    pub fn new(n: usize) -> Self {
        Scratch {
            p0: vec![0.0; n],
            g0: vec![0.0; n],
            gp: vec![0.0; n],
            u: vec![0.0; n],
            d: vec![0.0; n],
        }
    }
}

/// Lanczos's inner products in f64 (`kernels::dot` sums in f32: too coarse over millions of
/// entries for the residual bound).
fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
}

use crate::optim::grad_norm as norm;

/// Put back what the probe's passes overwrote.
fn restore(model: &mut Model, p0: &[f32], g0: &[f32], stats: crate::model::ForwardStats) {
    model.params.copy_from_slice(p0);
    model.grads.copy_from_slice(g0);
    model.stats = stats;
}

/// H·u on batch (x, y) by a central difference of exact gradients: `out` = (∇L(θ+hu) −
/// ∇L(θ−hu)) / (θ+ − θ−) along u, with ‖hu‖ = `step` (fd_rel·‖θ‖, computed once by the
/// caller). Leaves the weights at `p0` (bit for bit) and the gradients clobbered. Returns the
/// loss at θ+ and θ− averaged (≈ L(θ)).
fn hvp_into(
    model: &mut Model,
    (x, y): (&[u32], &[u32]),
    p0: &[f32],
    u: &[f32],
    step: f64,
    gp: &mut [f32],
    out: &mut [f32],
) -> anyhow::Result<f64> {
    let nu = norm(u);
    if nu == 0.0 {
        out.fill(0.0);
        return Ok(f64::NAN);
    }
    let h = step / nu;
    let (hf, two_h) = (h as f32, 2.0 * h);
    let mut loss = 0.0;
    for (sign, dst) in [(1f32, &mut *gp), (-1f32, &mut *out)] {
        for ((p, &a), &b) in model.params.iter_mut().zip(p0).zip(u) {
            *p = a + sign * hf * b;
        }
        model.zero_grad();
        loss += model.forward(x, y)? as f64 / 2.0;
        model.backward(1.0)?;
        dst.copy_from_slice(&model.grads);
    }
    model.params.copy_from_slice(p0);
    let inv = (1.0 / two_h) as f32;
    for (o, &g) in out.iter_mut().zip(gp.iter()) {
        *o = (g - *o) * inv;
    }
    Ok(loss)
}

/// The finite-difference step's length for weights `p0`.
fn fd_step(p0: &[f32], fd_rel: f64) -> f64 {
    fd_rel * norm(p0).max(1e-3)
}

/// Largest eigenvalue of a symmetric k×k matrix (row-major) and the last component of its
/// eigenvector, by cyclic Jacobi (k is Lanczos's step count, ≤ a few dozen).
fn top_eig(mut a: Vec<f64>, k: usize) -> (f64, f64) {
    let mut v = vec![0.0; k * k];
    for i in 0..k {
        v[i * k + i] = 1.0;
    }
    for _sweep in 0..100 {
        let off: f64 = (0..k)
            .flat_map(|i| (0..k).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| a[i * k + j] * a[i * k + j])
            .sum();
        let scale: f64 = (0..k).map(|i| a[i * k + i] * a[i * k + i]).sum::<f64>();
        if off <= 1e-30 * scale.max(1e-300) {
            break;
        }
        for p in 0..k {
            for q in p + 1..k {
                let apq = a[p * k + q];
                if apq == 0.0 {
                    continue;
                }
                let theta = (a[q * k + q] - a[p * k + p]) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for r in 0..k {
                    let (arp, arq) = (a[r * k + p], a[r * k + q]);
                    a[r * k + p] = c * arp - s * arq;
                    a[r * k + q] = s * arp + c * arq;
                }
                for r in 0..k {
                    let (apr, aqr) = (a[p * k + r], a[q * k + r]);
                    a[p * k + r] = c * apr - s * aqr;
                    a[q * k + r] = s * apr + c * aqr;
                }
                for r in 0..k {
                    let (vrp, vrq) = (v[r * k + p], v[r * k + q]);
                    v[r * k + p] = c * vrp - s * vrq;
                    v[r * k + q] = s * vrp + c * vrq;
                }
            }
        }
    }
    let top = (0..k)
        .max_by(|&i, &j| a[i * k + i].total_cmp(&a[j * k + j]))
        .unwrap_or(0);
    (a[top * k + top], v[(k - 1) * k + top])
}

/// Lanczos for the top eigenvalue of the symmetric operator q ↦ matvec(q) on vectors of
/// length n. Returns (λ, matvecs used, converged).
fn lanczos(
    n: usize,
    o: &SharpnessOptions,
    stream: u64,
    mut matvec: impl FnMut(&[f32], &mut [f32]) -> anyhow::Result<()>,
) -> anyhow::Result<(f64, usize, bool)> {
    let rng = Stream::new(o.seed, stream);
    let mut q: Vec<f32> = (0..n).map(|i| rng.normal_at(i as u64) as f32).collect();
    let nq = norm(&q) as f32;
    q.iter_mut().for_each(|v| *v /= nq);
    let mut q_prev = vec![0f32; n];
    let mut w = vec![0f32; n];
    let (mut alphas, mut betas) = (Vec::new(), Vec::<f64>::new());
    let mut beta = 0.0;
    let mut theta = 0.0;
    for it in 0..o.iters.max(1) {
        matvec(&q, &mut w)?;
        let alpha = dot(&q, &w);
        if !alpha.is_finite() {
            anyhow::bail!(
                "a Hessian-vector product is not finite (the loss or its gradient is NaN/inf at these weights); measure at finite weights"
            );
        }
        for i in 0..n {
            w[i] -= alpha as f32 * q[i] + beta as f32 * q_prev[i];
        }
        alphas.push(alpha);
        let k = alphas.len();
        let mut t = vec![0.0; k * k];
        for i in 0..k {
            t[i * k + i] = alphas[i];
            if i + 1 < k {
                t[i * k + i + 1] = betas[i];
                t[(i + 1) * k + i] = betas[i];
            }
        }
        let (th, ylast) = top_eig(t, k);
        theta = th;
        beta = norm(&w);
        let scale = alphas.iter().fold(theta.abs(), |m, a| m.max(a.abs()));
        if beta * ylast.abs() <= o.tol * theta.abs().max(1e-30) || beta <= 1e-9 * scale {
            return Ok((theta, it + 1, true));
        }
        betas.push(beta);
        std::mem::swap(&mut q_prev, &mut q);
        for i in 0..n {
            q[i] = w[i] / beta as f32;
        }
    }
    Ok((theta, o.iters.max(1), false))
}

/// λ_max(H) and, with an optimizer, λ_max(P⁻¹H) of `model` on the batch (x, y), and the
/// stable-LR prediction at base LR `lr`. The model's weights, gradients and forward
/// statistics are as they were afterwards.
pub fn measure(
    model: &mut Model,
    x: &[u32],
    y: &[u32],
    opt: Option<&AdamW>,
    lr: f64,
    o: &SharpnessOptions,
    scratch: &mut Scratch,
) -> anyhow::Result<Sharpness> {
    let t0 = Instant::now();
    let n = model.params.len();
    if scratch.p0.len() != n {
        *scratch = Scratch::new(n);
    }
    let Scratch { p0, g0, gp, u, d } = scratch;
    p0.copy_from_slice(&model.params);
    g0.copy_from_slice(&model.grads);
    let stats = model.stats.clone();
    let step = fd_step(p0, o.fd_rel);
    let out = (|| -> anyhow::Result<Sharpness> {
        let mut hvps = 0;
        let mut converged = true;
        let mut loss = f64::NAN;
        let mut lam_h = None;
        if o.plain || opt.is_none() {
            let (l, used, c) = lanczos(n, o, 1, |q, w| {
                loss = hvp_into(model, (x, y), p0, q, step, gp, w)?;
                Ok(())
            })?;
            hvps += used;
            converged &= c;
            lam_h = Some(l);
        }
        let (mut lam_p, mut pre) = (None, "none");
        let mut coefficient = 2.0;
        if let Some(opt) = opt {
            // the first-step estimate needs this batch's gradient at θ
            if opt.step == 0 {
                model.zero_grad();
                loss = model.forward(x, y)? as f64;
                model.backward(1.0)?;
                gp.copy_from_slice(&model.grads);
            }
            let have = opt.precond_scale(gp, d);
            pre = if have {
                "adam state"
            } else {
                "first-step estimate"
            };
            d.iter_mut().for_each(|v| *v = v.sqrt());
            let (l, used, c) = lanczos(n, o, 2, |q, w| {
                for i in 0..n {
                    u[i] = d[i] * q[i];
                }
                loss = hvp_into(model, (x, y), p0, u, step, gp, w)?;
                for i in 0..n {
                    w[i] *= d[i];
                }
                Ok(())
            })?;
            hvps += used;
            converged &= c;
            lam_p = Some(l);
            let b1 = opt.cfg.beta1;
            coefficient = (2.0 + 2.0 * b1) / (1.0 - b1);
        }
        let lam = lam_p.or(lam_h).unwrap_or(f64::NAN);
        let lr_edge = if lam > 0.0 {
            coefficient / lam
        } else {
            f64::INFINITY
        };
        Ok(Sharpness {
            lambda_max: lam_h,
            lambda_precond: lam_p,
            preconditioner: pre,
            coefficient,
            lr_edge,
            lr,
            edge_ratio: lr / lr_edge,
            hvps,
            cost_steps: 2.0 * hvps as f64,
            seconds: 0.0,
            converged,
            loss,
        })
    })();
    // put everything back, whatever happened
    restore(model, p0, g0, stats);
    let mut s = out?;
    s.seconds = t0.elapsed().as_secs_f64();
    Ok(s)
}

/// H·v on (x, y) by the same central difference `measure` uses (for tests and tools):
/// `out` gets H·v; the model is restored.
pub fn hessian_vector(
    model: &mut Model,
    x: &[u32],
    y: &[u32],
    v: &[f32],
    fd_rel: f64,
    out: &mut [f32],
) -> anyhow::Result<()> {
    let p0 = model.params.clone();
    let g0 = model.grads.clone();
    let stats = model.stats.clone();
    let mut gp = vec![0f32; p0.len()];
    let r = hvp_into(model, (x, y), &p0, v, fd_step(&p0, fd_rel), &mut gp, out);
    restore(model, &p0, &g0, stats);
    r.map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jacobi_finds_the_top_eigenvalue_and_its_last_component() {
        // [[2,1,0],[1,3,1],[0,1,4]]: eigenvalues 3 - √3, 3, 3 + √3
        let a = vec![2.0, 1.0, 0.0, 1.0, 3.0, 1.0, 0.0, 1.0, 4.0];
        let (l, y) = top_eig(a, 3);
        assert!((l - (3.0 + 3f64.sqrt())).abs() < 1e-12, "{l}");
        // eigenvector (1, 1+√3, 2+√3)/‖·‖: last component
        let v = [1.0, 1.0 + 3f64.sqrt(), 2.0 + 3f64.sqrt()];
        let nv = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        assert!((y.abs() - v[2] / nv).abs() < 1e-10, "{y}");
    }

    #[test]
    fn lanczos_finds_the_top_of_a_clustered_spectrum_with_a_big_negative_one() {
        // diag(−9.9, 10, 9.8, 9.7, then 0.01..): power iteration is slow and sign-confused here
        let n = 400;
        let diag: Vec<f32> = (0..n)
            .map(|i| match i {
                0 => -9.9,
                1 => 10.0,
                2 => 9.8,
                3 => 9.7,
                _ => 0.01 * (i as f32 % 50.0),
            })
            .collect();
        let o = SharpnessOptions {
            iters: 60,
            tol: 1e-6,
            ..Default::default()
        };
        let (l, used, conv) = lanczos(n, &o, 0, |q, w| {
            for i in 0..n {
                w[i] = diag[i] * q[i];
            }
            Ok(())
        })
        .unwrap();
        assert!(conv, "not converged after {used}");
        assert!((l - 10.0).abs() < 1e-4, "{l} after {used}");
    }
}
