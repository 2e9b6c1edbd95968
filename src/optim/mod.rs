//! Optimisation: AdamW (PyTorch semantics, decoupled weight decay, per-group decay), global
//! gradient-norm clipping, and learning-rate schedules.

mod schedule;

pub use schedule::{Schedule, ScheduleKind};

use crate::kernels::SendPtr;
use crate::model::{ParamLayout, Role};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// AdamW hyper-parameters (config section `[optim]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Global gradient-norm clip; 0 disables clipping.
    pub grad_clip: f64,
    /// Apply weight decay to the embedding (and a tied head). Norm weights never decay.
    pub decay_embeddings: bool,
    /// Fully decoupled weight decay (Loshchilov & Hutter; Wortsman et al. 2023): each step
    /// multiplies weights by 1 − weight_decay·(lr_t / lr), following the schedule but not the
    /// peak LR, so changing the LR leaves the decay alone (use a weight_decay ~1e-4). Off:
    /// PyTorch's AdamW, 1 − lr_t·weight_decay.
    pub decoupled_wd: bool,
}

impl Default for OptimConfig {
    fn default() -> Self {
        OptimConfig {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
            grad_clip: 1.0,
            decay_embeddings: true,
            decoupled_wd: false,
        }
    }
}

/// AdamW state: first and second moments in the parameter layout, and the step count.
pub struct AdamW {
    pub cfg: OptimConfig,
    pub m: Vec<f32>,
    pub v: Vec<f32>,
    pub step: u64,
    /// (offset, len, decays, lr multiplier) per tensor
    groups: Vec<(usize, usize, bool, f64)>,
    /// Telemetry of the last update, per tensor: (Σ Δ², Σ w² before the update).
    pub update_sq: Vec<(f64, f64)>,
    /// Gather `update_sq` (on by default; `keel bench` turns it off to price it).
    pub track: bool,
    /// Per-chunk partial sums for `update_sq` (preallocated; chunk c of tensor i at
    /// `chunk_base[i] + c`).
    partial: Vec<(f32, f32)>,
    chunk_base: Vec<usize>,
}

const CH: usize = 1 << 14;

#[derive(Clone, Copy)]
struct PartPtr(*mut (f32, f32));
// SAFETY: writers touch disjoint slots (one per chunk).
unsafe impl Send for PartPtr {}
unsafe impl Sync for PartPtr {}

impl AdamW {
    pub fn new(cfg: OptimConfig, layout: &ParamLayout) -> Self {
        let groups = layout
            .specs
            .iter()
            .map(|s| {
                let decays = match s.role {
                    Role::Norm => false,
                    Role::Embed => cfg.decay_embeddings,
                    _ => true,
                };
                (s.offset, s.len, decays, 1.0)
            })
            .collect();
        let mut chunk_base = Vec::with_capacity(layout.specs.len());
        let mut nchunks = 0;
        for s in &layout.specs {
            chunk_base.push(nchunks);
            nchunks += s.len.div_ceil(CH);
        }
        AdamW {
            m: vec![0.0; layout.total],
            v: vec![0.0; layout.total],
            step: 0,
            update_sq: vec![(0.0, 0.0); layout.specs.len()],
            track: true,
            partial: vec![(0.0, 0.0); nchunks],
            chunk_base,
            groups,
            cfg,
        }
    }

    /// Per-tensor learning-rate multipliers (μP's per-group Adam LR), by role.
    pub fn with_lr_multipliers(mut self, layout: &ParamLayout, f: impl Fn(Role) -> f64) -> Self {
        for (g, s) in self.groups.iter_mut().zip(&layout.specs) {
            g.3 = f(s.role);
        }
        self
    }

    /// The per-element step scale of the next update relative to the base LR: D = lr
    /// multiplier / (√v̂ + ε), v̂ = v / (1 − β₂^t) with t = `step`: the denominator of the
    /// last update, the state the next one starts from (as keel.sharpness reads torch's).
    /// Before any step there is no v̂: then the first update's own denominator, |g| + ε, from
    /// `grads`. Returns whether Adam state was used.
    /// (The sharpness probe iterates D^½ H D^½: Adam at base LR η is stable on a quadratic
    /// while η·λ_max of it stays below (2 + 2β₁)/(1 − β₁).)
    pub fn precond_scale(&self, grads: &[f32], out: &mut [f32]) -> bool {
        let c = &self.cfg;
        let eps = c.eps as f32;
        let have = self.step > 0;
        let bc2_sqrt = if have {
            (1.0 - c.beta2.powi(self.step as i32)).sqrt() as f32
        } else {
            1.0
        };
        for &(off, len, _, mult) in &self.groups {
            let mult = mult as f32;
            let (o, v, g) = (
                &mut out[off..off + len],
                &self.v[off..off + len],
                &grads[off..off + len],
            );
            for i in 0..len {
                let denom = if have {
                    v[i].sqrt() / bc2_sqrt + eps
                } else {
                    g[i].abs() + eps
                };
                o[i] = mult / denom;
            }
        }
        have
    }

    /// One update with learning rate `lr` (the schedule's value for this step).
    /// Mirrors torch.optim.AdamW (single-tensor path) operation by operation in f32.
    pub fn update(&mut self, params: &mut [f32], grads: &[f32], lr: f64) {
        self.step += 1;
        let c = &self.cfg;
        let bc1 = 1.0 - c.beta1.powi(self.step as i32);
        let bc2 = 1.0 - c.beta2.powi(self.step as i32);
        let bc2_sqrt = bc2.sqrt() as f32;
        let (b1, b2, eps) = (c.beta1 as f32, c.beta2 as f32, c.eps as f32);
        let (pp, mp, vp) = (
            SendPtr(params.as_mut_ptr()),
            SendPtr(self.m.as_mut_ptr()),
            SendPtr(self.v.as_mut_ptr()),
        );
        let wd = c.weight_decay;
        // decoupled: the decay follows the schedule (lr_t / peak), not the LR's size
        let decoupled = c.decoupled_wd.then(|| wd * lr / c.lr);
        let part = PartPtr(self.partial.as_mut_ptr());
        let track = self.track;
        // Work items: (offset, len, decay factor), chunked for the pool.
        self.groups.par_iter().zip(&self.chunk_base).for_each(
            |(&(off, len, decays, mult), &base)| {
                let lr = lr * mult;
                let step_size = (lr / bc1) as f32;
                let keep = match (decays, decoupled) {
                    (false, _) => 1.0,
                    (true, Some(d)) => (1.0 - d) as f32,
                    (true, None) => (1.0 - lr * wd) as f32,
                };
                (0..len.div_ceil(CH)).into_par_iter().for_each(|ci| {
                    let s = off + ci * CH;
                    let e = (s + CH).min(off + len);
                    // SAFETY: tensors and chunks are disjoint ranges of the three buffers.
                    let (p, m, v) = unsafe {
                        (
                            std::slice::from_raw_parts_mut({ pp }.0.add(s), e - s),
                            std::slice::from_raw_parts_mut({ mp }.0.add(s), e - s),
                            std::slice::from_raw_parts_mut({ vp }.0.add(s), e - s),
                        )
                    };
                    let g = &grads[s..e];
                    // the update/weight telemetry rides along: two fused sums per element
                    let adam = |p: &mut f32, m: &mut f32, v: &mut f32, g: f32| {
                        *p *= keep;
                        *m += (g - *m) * (1.0 - b1);
                        *v = *v * b2 + g * g * (1.0 - b2);
                        let denom = v.sqrt() / bc2_sqrt + eps;
                        *p -= step_size * (*m / denom);
                    };
                    if !track {
                        for i in 0..p.len() {
                            adam(&mut p[i], &mut m[i], &mut v[i], g[i]);
                        }
                        return;
                    }
                    // Eight independent partial sums so the loop still vectorises (a single
                    // f32 accumulator is a serial dependency the compiler must keep).
                    let (mut du, mut ww) = ([0f32; 8], [0f32; 8]);
                    let n8 = p.len() / 8 * 8;
                    for (((pc, mc), vc), gc) in p[..n8]
                        .chunks_exact_mut(8)
                        .zip(m[..n8].chunks_exact_mut(8))
                        .zip(v[..n8].chunks_exact_mut(8))
                        .zip(g[..n8].chunks_exact(8))
                    {
                        for k in 0..8 {
                            let p0 = pc[k];
                            adam(&mut pc[k], &mut mc[k], &mut vc[k], gc[k]);
                            let dlt = pc[k] - p0;
                            du[k] += dlt * dlt;
                            ww[k] += p0 * p0;
                        }
                    }
                    for i in n8..p.len() {
                        let p0 = p[i];
                        adam(&mut p[i], &mut m[i], &mut v[i], g[i]);
                        let dlt = p[i] - p0;
                        du[0] += dlt * dlt;
                        ww[0] += p0 * p0;
                    }
                    let (du, ww) = (du.iter().sum::<f32>(), ww.iter().sum::<f32>());
                    // SAFETY: one slot per chunk, written by this chunk only.
                    unsafe { *{ part }.0.add(base + ci) = (du, ww) };
                });
            },
        );
        if !track {
            return;
        }
        for (i, (&(_, len, _, _), &base)) in self.groups.iter().zip(&self.chunk_base).enumerate() {
            let mut acc = (0f64, 0f64);
            for &(a, b) in &self.partial[base..base + len.div_ceil(CH)] {
                acc.0 += a as f64;
                acc.1 += b as f64;
            }
            self.update_sq[i] = acc;
        }
    }

    /// (Σ ΔW², Σ W²) of the last update per tensor group (`Role::group`).
    pub fn group_update_sq(
        &self,
        layout: &ParamLayout,
    ) -> std::collections::BTreeMap<&'static str, (f64, f64)> {
        let mut groups = std::collections::BTreeMap::new();
        for (sp, &(d, w)) in layout.specs.iter().zip(&self.update_sq) {
            let e: &mut (f64, f64) = groups.entry(sp.role.group()).or_default();
            e.0 += d;
            e.1 += w;
        }
        groups
    }

    /// ‖ΔW‖ / ‖W‖ over all parameters for the last update.
    pub fn update_ratio(&self) -> f64 {
        let (d, w) = self
            .update_sq
            .iter()
            .fold((0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1));
        (d / w.max(1e-30)).sqrt()
    }
}

/// Sum of squares per tensor of a parameter-layout buffer (deterministic: fixed chunks,
/// each summed in f64). `out` has one slot per tensor.
pub fn tensor_sumsq(buf: &[f32], layout: &ParamLayout, out: &mut [f64]) {
    out.par_iter_mut().zip(&layout.specs).for_each(|(o, s)| {
        *o = buf[s.offset..s.offset + s.len]
            .chunks(1 << 12)
            .map(|c| c.iter().map(|&g| g * g).sum::<f32>() as f64)
            .sum();
    });
}

/// Global L2 norm of the gradients, summed in f64 over fixed chunks (deterministic).
pub fn grad_norm(grads: &[f32]) -> f64 {
    let parts: Vec<f64> = grads
        .par_chunks(1 << 16)
        .map(|c| c.iter().map(|&g| (g as f64) * (g as f64)).sum::<f64>())
        .collect();
    parts.iter().sum::<f64>().sqrt()
}

/// Clip gradients to global norm `max_norm` (as torch.nn.utils.clip_grad_norm_:
/// scale = max_norm / (norm + 1e-6) when below 1). Returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut [f32], max_norm: f64) -> f64 {
    let norm = grad_norm(grads);
    if max_norm > 0.0 {
        let coef = max_norm / (norm + 1e-6);
        if coef < 1.0 {
            let c = coef as f32;
            grads
                .par_chunks_mut(1 << 16)
                .for_each(|ch| ch.iter_mut().for_each(|g| *g *= c));
        }
    }
    norm
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModelConfig;

    #[test]
    fn adamw_first_step_moves_by_lr_against_gradient_sign() {
        let cfg = ModelConfig::preset("micro").unwrap();
        let layout = ParamLayout::new(&cfg);
        let mut opt = AdamW::new(
            OptimConfig {
                weight_decay: 0.0,
                ..Default::default()
            },
            &layout,
        );
        let mut p = vec![0.5f32; layout.total];
        let g: Vec<f32> = (0..layout.total)
            .map(|i| if i % 2 == 0 { 0.3 } else { -2.0 })
            .collect();
        opt.update(&mut p, &g, 0.01);
        // bias-corrected first Adam step is lr·sign(g) (up to eps)
        assert!((p[0] - 0.49).abs() < 1e-6 && (p[1] - 0.51).abs() < 1e-6);
    }

    #[test]
    fn weight_decay_skips_norms() {
        let cfg = ModelConfig::preset("micro").unwrap();
        let layout = ParamLayout::new(&cfg);
        let mut opt = AdamW::new(
            OptimConfig {
                weight_decay: 0.5,
                ..Default::default()
            },
            &layout,
        );
        let mut p = vec![1.0f32; layout.total];
        let g = vec![0.0f32; layout.total];
        opt.update(&mut p, &g, 0.1);
        let norm = layout.get("model.norm.weight").unwrap();
        let q = layout
            .get("model.layers.0.self_attn.q_proj.weight")
            .unwrap();
        assert_eq!(p[norm.offset], 1.0);
        assert!((p[q.offset] - 0.95).abs() < 1e-6);
    }

    #[test]
    fn decoupled_weight_decay_follows_the_schedule_not_the_lr() {
        let cfg = ModelConfig::preset("micro").unwrap();
        let layout = ParamLayout::new(&cfg);
        let q = layout
            .get("model.layers.0.self_attn.q_proj.weight")
            .unwrap()
            .offset;
        let g = vec![0.0f32; layout.total];
        // peak LRs 10× apart, both at half of their peak: the same decay, 1e-2 × 0.5
        for peak in [1e-3, 1e-2] {
            let mut opt = AdamW::new(
                OptimConfig {
                    lr: peak,
                    weight_decay: 1e-2,
                    decoupled_wd: true,
                    ..Default::default()
                },
                &layout,
            );
            let mut p = vec![1.0f32; layout.total];
            opt.update(&mut p, &g, 0.5 * peak);
            assert!(
                (p[q] - (1.0 - 0.5e-2)).abs() < 1e-7,
                "peak {peak}: {}",
                p[q]
            );
        }
    }

    #[test]
    fn clipping_scales_to_max_norm() {
        let mut g = vec![3.0f32, 4.0];
        let n = clip_grad_norm(&mut g, 1.0);
        assert!((n - 5.0).abs() < 1e-9);
        assert!((grad_norm(&g) - 1.0).abs() < 1e-5);
        let mut small = vec![0.3f32, 0.4];
        clip_grad_norm(&mut small, 1.0);
        assert_eq!(small, vec![0.3, 0.4]);
    }
}
