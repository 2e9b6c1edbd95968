//! The LLaMA network (HF `LlamaForCausalLM`): parameters in one buffer, explicit forward and
//! backward over preallocated activations. The model composes `kernels`; it does no I/O.

mod params;

pub use params::{LayerOffsets, ParamLayout, ParamSpec, Role};

use crate::config::ModelConfig;
use crate::kernels::attention::{attention_bwd, attention_fwd, AttnShape};
use crate::kernels::embed::{embed_bwd, embed_fwd};
use crate::kernels::loss::{cross_entropy_bwd_inplace, cross_entropy_fwd};
use crate::kernels::matmul::{linear_bwd_input, linear_bwd_weight, linear_fwd};
use crate::kernels::norm::{headnorm_bwd, headnorm_fwd, rmsnorm_bwd, rmsnorm_fwd};
use crate::kernels::rope::{rope_bwd, rope_fwd, RopeTables};
use crate::kernels::swiglu::{swiglu_bwd, swiglu_fwd};
use crate::kernels::{residual_add, scale_inplace};

/// Activations kept from forward for backward, sized for one (B, T). Per-layer tensors are
/// stacked: layer l's slice of `q` is `q[l*N*C ..][..N*C]`, and so on.
struct Activations {
    b: usize,
    t: usize,
    tokens: Vec<u32>,  // (N)
    targets: Vec<u32>, // (N)
    /// Residual stream, (2L+1) × (N, C): [2l] enters layer l, [2l+1] after its attention,
    /// [2L] enters the final norm.
    resid: Vec<f32>,
    ln1: Vec<f32>,   // L × (N, C)
    rstd1: Vec<f32>, // L × (N)
    /// L × (N, (H+2KV)·D): fused q | k | v projections, q and k after RoPE
    qkv: Vec<f32>,
    /// qk-norm only (else empty): L × (N, (H+KV)·D) q|k before the norm, L × (N, H+KV) rstd
    qk_pre: Vec<f32>,
    qk_rstd: Vec<f32>,
    probs: Vec<f32>, // L × (B, H, T, T)
    atty: Vec<f32>,  // L × (N, C)
    ln2: Vec<f32>,   // L × (N, C)
    rstd2: Vec<f32>, // L × (N)
    gu: Vec<f32>,    // L × (N, 2F): fused gate | up projections
    hid: Vec<f32>,   // L × (N, F) silu(gate) ⊙ up
    lnf: Vec<f32>,   // (N, C)
    rstdf: Vec<f32>, // (N)
    /// (N, V): logits after forward, dlogits after backward.
    logits: Vec<f32>,
    losses: Vec<f32>, // (N)
    lse: Vec<f32>,    // (N)
    // backward scratch, shared by all layers
    dres: Vec<f32>,    // (N, C)
    dln: Vec<f32>,     // (N, C)
    datty: Vec<f32>,   // (N, C)
    dqkv: Vec<f32>,    // (N, (H+2KV)·D)
    dgu: Vec<f32>,     // (N, 2F)
    dhid: Vec<f32>,    // (N, F)
    scratch: Vec<f32>, // (B, KV, T, T)
    /// logits hold dlogits (backward consumed them)
    logits_consumed: bool,
    ready_for_backward: bool,
}

impl Activations {
    fn new(c: &ModelConfig, b: usize, t: usize) -> Self {
        let n = b * t;
        let (l, d, f, v, kv) = (
            c.num_layers,
            c.hidden_size,
            c.intermediate_size,
            c.vocab_size,
            c.kv_dim(),
        );
        let z = |len: usize| vec![0f32; len];
        Activations {
            b,
            t,
            tokens: vec![0; n],
            targets: vec![0; n],
            resid: z((2 * l + 1) * n * d),
            ln1: z(l * n * d),
            rstd1: z(l * n),
            qkv: z(l * n * (d + 2 * kv)),
            qk_pre: z(if c.qk_norm { l * n * (d + kv) } else { 0 }),
            qk_rstd: z(if c.qk_norm {
                l * n * (c.num_heads + c.num_kv_heads)
            } else {
                0
            }),
            probs: z(l * b * c.num_heads * t * t),
            atty: z(l * n * d),
            ln2: z(l * n * d),
            rstd2: z(l * n),
            gu: z(l * n * 2 * f),
            hid: z(l * n * f),
            lnf: z(n * d),
            rstdf: z(n),
            logits: z(n * v),
            losses: z(n),
            lse: z(n),
            dres: z(n * d),
            dln: z(n * d),
            datty: z(n * d),
            dqkv: z(n * (d + 2 * kv)),
            dgu: z(n * 2 * f),
            dhid: z(n * f),
            scratch: z(b * c.num_kv_heads * t * t),
            logits_consumed: false,
            ready_for_backward: false,
        }
    }
}

/// Attention sizes and logit scale (1/√head_dim unless the config overrides it).
fn attn_shape(c: &ModelConfig, b: usize, t: usize) -> AttnShape {
    AttnShape {
        b,
        t,
        heads: c.num_heads,
        kv_heads: c.num_kv_heads,
        head_dim: c.head_dim(),
        scale: c.attn_scale.unwrap_or(1.0 / (c.head_dim() as f64).sqrt()) as f32,
    }
}

/// Cheap statistics gathered by every forward pass (telemetry reads them).
#[derive(Debug, Clone, Default)]
pub struct ForwardStats {
    /// Largest attention logit q·k/√D per layer.
    pub max_attn_logit: Vec<f32>,
    /// Mean and max log-partition (logsumexp of the output logits) over positions.
    pub lse_mean: f32,
    pub lse_max: f32,
    /// RMS of d(loss)/d(residual stream) at its 2L+1 points, filled by `backward` when
    /// `capture_grads` is set (`keel check`); same slots as `residual_rms`.
    pub resid_grad_rms: Vec<f64>,
    pub capture_grads: bool,
    /// Mean of lse² over positions (the z-loss term is `z_loss` × this).
    pub lse_sq_mean: f32,
}

/// Root mean square of a buffer, summed in f64.
pub fn rms(x: &[f32]) -> f64 {
    (x.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / x.len().max(1) as f64).sqrt()
}

/// See `Model::probe_stats`.
#[derive(Debug, Clone, Default)]
pub struct ProbeStats {
    pub attn_out_rms: Vec<f64>,
    pub mlp_out_rms: Vec<f64>,
    pub attn_logit_std: Vec<f64>,
    /// Mean attention entropy (nats) over heads and query positions.
    pub attn_entropy: Vec<f64>,
    /// Std of the output logits over the vocabulary, averaged over positions (NaN-free; 0
    /// once backward consumed the logits).
    pub logit_std: f64,
}

/// Errors of a forward call: bad token ids or shapes (the caller's input).
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("token id {id} at position {pos} is out of range for vocab_size {vocab}")]
    TokenOutOfRange { id: u32, pos: usize, vocab: usize },
    #[error("batch shape mismatch: got {got} tokens, expected batch {b} × seq {t} = {}", b * t)]
    Shape { got: usize, b: usize, t: usize },
    #[error("sequence length {t} exceeds the model's max_seq_len {max}")]
    TooLong { t: usize, max: usize },
    #[error("backward() called without a preceding forward() with targets")]
    NoForward,
}

/// A LLaMA model with its parameters, gradients and activation buffers.
pub struct Model {
    pub cfg: ModelConfig,
    pub layout: ParamLayout,
    /// All parameters, contiguous, in `layout` order (f32 master weights).
    pub params: Vec<f32>,
    /// Gradients, same layout; backward accumulates into them.
    pub grads: Vec<f32>,
    pub stats: ForwardStats,
    /// z-loss coefficient: backward differentiates mean(CE + z_loss·lse²); the loss
    /// `forward` returns stays the cross-entropy (0 = off).
    pub z_loss: f32,
    acts: Activations,
    rope: RopeTables,
}

impl Model {
    /// A zero-initialised model with activations for batch `b` × sequence `t`.
    /// (Use `init::initialize` to fill the weights.)
    pub fn new(cfg: &ModelConfig, b: usize, t: usize) -> Self {
        let layout = ParamLayout::new(cfg);
        let total = layout.total;
        Model {
            cfg: cfg.clone(),
            params: vec![0f32; total],
            grads: vec![0f32; total],
            stats: ForwardStats {
                max_attn_logit: vec![0.0; cfg.num_layers],
                ..Default::default()
            },
            z_loss: 0.0,
            acts: Activations::new(cfg, b, t),
            rope: RopeTables::new(cfg.max_seq_len.max(t), cfg.head_dim(), cfg.rope_theta),
            layout,
        }
    }

    pub fn batch_shape(&self) -> (usize, usize) {
        (self.acts.b, self.acts.t)
    }

    /// Resize the activation buffers for a new (B, T); a no-op when the shape is unchanged.
    pub fn set_batch_shape(&mut self, b: usize, t: usize) {
        if (b, t) != (self.acts.b, self.acts.t) {
            self.acts = Activations::new(&self.cfg, b, t);
            if t > self.rope.cos.len() / self.rope.half.max(1) {
                self.rope = RopeTables::new(t, self.cfg.head_dim(), self.cfg.rope_theta);
            }
        }
    }

    /// View of one named parameter.
    pub fn param(&self, name: &str) -> Option<&[f32]> {
        self.layout
            .get(name)
            .map(|s| &self.params[s.offset..s.offset + s.len])
    }

    pub fn grad(&self, name: &str) -> Option<&[f32]> {
        self.layout
            .get(name)
            .map(|s| &self.grads[s.offset..s.offset + s.len])
    }

    pub fn zero_grad(&mut self) {
        self.grads.fill(0.0);
    }

    /// Logits (B·T, V) of the last forward; `None` once backward has overwritten them.
    pub fn logits(&self) -> Option<&[f32]> {
        (!self.acts.logits_consumed).then_some(&self.acts.logits[..])
    }

    fn check_tokens(&self, tokens: &[u32]) -> Result<(), ModelError> {
        let (b, t) = (self.acts.b, self.acts.t);
        if tokens.len() != b * t {
            return Err(ModelError::Shape {
                got: tokens.len(),
                b,
                t,
            });
        }
        if t > self.cfg.max_seq_len.max(t) {
            return Err(ModelError::TooLong {
                t,
                max: self.cfg.max_seq_len,
            });
        }
        let vocab = self.cfg.vocab_size;
        if let Some(pos) = tokens.iter().position(|&x| x as usize >= vocab) {
            return Err(ModelError::TokenOutOfRange {
                id: tokens[pos],
                pos,
                vocab,
            });
        }
        Ok(())
    }

    /// Forward to the logits. tokens (B·T) → logits (B·T, V), readable with `logits()`.
    pub fn forward_logits(&mut self, tokens: &[u32]) -> Result<(), ModelError> {
        self.check_tokens(tokens)?;
        let c = &self.cfg;
        let a = &mut self.acts;
        let p = &self.params;
        let (b, t) = (a.b, a.t);
        let n = b * t;
        let (d, f, v, kv) = (c.hidden_size, c.intermediate_size, c.vocab_size, c.kv_dim());
        let eps = c.rms_norm_eps as f32;
        let shape = attn_shape(c, b, t);
        let lay = &self.layout;
        let w = |off: usize, len: usize| &p[off..off + len];
        a.tokens.copy_from_slice(tokens);
        a.logits_consumed = false;
        a.ready_for_backward = false;

        let alpha = c.residual_scale as f32;
        embed_fwd(&mut a.resid[..n * d], tokens, w(lay.embed, v * d), d);
        let pl = b * c.num_heads * t * t;
        let qs = d + 2 * kv; // fused q|k|v row
        for (l, lo) in lay.layers.iter().enumerate() {
            let (nd, nf) = (n * d, n * f);
            let (before, after) = a.resid.split_at_mut((2 * l + 1) * nd);
            let x = &before[2 * l * nd..];
            let (xmid, rest) = after.split_at_mut(nd);
            let xout = &mut rest[..nd];
            let ln1 = &mut a.ln1[l * nd..][..nd];
            rmsnorm_fwd(ln1, &mut a.rstd1[l * n..][..n], x, w(lo.ln1, d), d, eps);
            let qkv = &mut a.qkv[l * n * qs..][..n * qs];
            linear_fwd(qkv, ln1, w(lo.q, qs * d), n, d, qs);
            if let Some(qn) = lo.q_norm {
                let (hk, hd) = (c.num_heads + c.num_kv_heads, c.head_dim());
                headnorm_fwd(
                    qkv,
                    &mut a.qk_pre[l * n * hk * hd..][..n * hk * hd],
                    &mut a.qk_rstd[l * n * hk..][..n * hk],
                    w(qn, hd),
                    w(qn + hd, hd),
                    qs,
                    c.num_heads,
                    c.num_kv_heads,
                    eps,
                );
            }
            rope_fwd(qkv, qs, &self.rope, t, c.num_heads);
            rope_fwd(&mut qkv[d..], qs, &self.rope, t, c.num_kv_heads);
            let atty = &mut a.atty[l * nd..][..nd];
            let probs = &mut a.probs[l * pl..][..pl];
            self.stats.max_attn_logit[l] = attention_fwd(atty, probs, qkv, shape);
            linear_fwd(xmid, atty, w(lo.o, d * d), n, d, d);
            residual_add(xmid, x, alpha);
            let ln2 = &mut a.ln2[l * nd..][..nd];
            rmsnorm_fwd(ln2, &mut a.rstd2[l * n..][..n], xmid, w(lo.ln2, d), d, eps);
            let (gu, h) = (
                &mut a.gu[2 * l * nf..][..2 * nf],
                &mut a.hid[l * nf..][..nf],
            );
            linear_fwd(gu, ln2, w(lo.gate, 2 * f * d), n, d, 2 * f);
            swiglu_fwd(h, gu, f);
            linear_fwd(xout, h, w(lo.down, d * f), n, f, d);
            residual_add(xout, xmid, alpha);
        }
        let l2 = 2 * c.num_layers;
        let xl = &a.resid[l2 * n * d..][..n * d];
        rmsnorm_fwd(&mut a.lnf, &mut a.rstdf, xl, w(lay.norm, d), d, eps);
        linear_fwd(&mut a.logits, &a.lnf, w(lay.head, v * d), n, d, v);
        if c.logit_scale != 1.0 {
            scale_inplace(&mut a.logits, c.logit_scale as f32);
        }
        Ok(())
    }

    /// Forward with the loss: mean next-token cross-entropy of `targets` (B·T).
    pub fn forward(&mut self, tokens: &[u32], targets: &[u32]) -> Result<f32, ModelError> {
        if targets.len() != tokens.len() {
            return Err(ModelError::Shape {
                got: targets.len(),
                b: self.acts.b,
                t: self.acts.t,
            });
        }
        self.check_tokens(targets)?;
        self.forward_logits(tokens)?;
        let a = &mut self.acts;
        a.targets.copy_from_slice(targets);
        let loss = cross_entropy_fwd(
            &mut a.losses,
            &mut a.lse,
            &a.logits,
            targets,
            self.cfg.vocab_size,
        );
        let n = a.lse.len() as f32;
        self.stats.lse_mean = a.lse.iter().sum::<f32>() / n;
        self.stats.lse_max = a.lse.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
        self.stats.lse_sq_mean = a.lse.iter().map(|&x| x * x).sum::<f32>() / n;
        a.ready_for_backward = true;
        Ok(loss as f32)
    }

    /// RMS of the residual stream at each of its 2L+1 points (embedding output, after each
    /// attention and each MLP) in the last forward; computed on demand (telemetry, check).
    pub fn residual_rms(&self) -> Vec<f64> {
        let a = &self.acts;
        let nd = a.b * a.t * self.cfg.hidden_size;
        a.resid
            .chunks(nd)
            .map(|x| (x.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / nd as f64).sqrt())
            .collect()
    }

    /// Per-layer statistics of the last forward for `keel check`: output RMS of each attention
    /// and MLP sublayer (the residual increments), attention logit std and entropy (from the
    /// stored probabilities: a row's logits are ln p up to a shift), and the output logits' std.
    pub fn probe_stats(&self) -> ProbeStats {
        let a = &self.acts;
        let c = &self.cfg;
        let (b, t, d) = (a.b, a.t, c.hidden_size);
        let nd = b * t * d;
        let alpha = c.residual_scale as f32;
        let inc = |slot: usize| {
            let (x, y) = (
                &a.resid[(slot - 1) * nd..][..nd],
                &a.resid[slot * nd..][..nd],
            );
            let s: f64 = x
                .iter()
                .zip(y)
                .map(|(&x, &y)| {
                    let v = (y - alpha * x) as f64;
                    v * v
                })
                .sum();
            (s / nd as f64).sqrt()
        };
        let h = c.num_heads;
        let pl = b * h * t * t;
        let mut out = ProbeStats::default();
        for l in 0..c.num_layers {
            out.attn_out_rms.push(inc(2 * l + 1));
            out.mlp_out_rms.push(inc(2 * l + 2));
            let probs = &a.probs[l * pl..][..pl];
            let (mut sd_sum, mut ent_sum, mut rows) = (0f64, 0f64, 0usize);
            for (r, row) in probs.chunks(t).enumerate() {
                let i = r % t; // query position: keys 0..=i
                let row = &row[..=i];
                let mut ent = 0f64;
                let (mut m1, mut m2, mut k) = (0f64, 0f64, 0usize);
                for &p in row {
                    if p > 0.0 {
                        let lp = (p as f64).ln();
                        ent -= p as f64 * lp;
                        m1 += lp;
                        m2 += lp * lp;
                        k += 1;
                    }
                }
                ent_sum += ent;
                if i > 0 && k > 1 {
                    // unbiased variance: early rows have only a few keys
                    let mean = m1 / k as f64;
                    sd_sum += ((m2 - k as f64 * mean * mean) / (k - 1) as f64)
                        .max(0.0)
                        .sqrt();
                    rows += 1;
                }
            }
            out.attn_logit_std.push(sd_sum / rows.max(1) as f64);
            out.attn_entropy.push(ent_sum / (probs.len() / t) as f64);
        }
        if !a.logits_consumed {
            let v = c.vocab_size;
            let mut acc = 0f64;
            for row in a.logits.chunks(v) {
                let mean = row.iter().map(|&x| x as f64).sum::<f64>() / v as f64;
                acc += row.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / v as f64;
            }
            out.logit_std = (acc / (a.logits.len() / v) as f64).sqrt();
        }
        out
    }

    /// Per-position losses (B·T) of the last `forward`.
    pub fn position_losses(&self) -> &[f32] {
        &self.acts.losses
    }

    /// Backward of `grad_scale` × the mean loss of the last `forward`, accumulated into
    /// `grads` (call `zero_grad` between optimizer steps; use 1/accum for accumulation).
    pub fn backward(&mut self, grad_scale: f32) -> Result<(), ModelError> {
        if !self.acts.ready_for_backward {
            return Err(ModelError::NoForward);
        }
        let c = &self.cfg;
        let a = &mut self.acts;
        let p = &self.params;
        let gr = &mut self.grads;
        let (b, t) = (a.b, a.t);
        let n = b * t;
        let (d, f, v, kv) = (c.hidden_size, c.intermediate_size, c.vocab_size, c.kv_dim());
        let shape = attn_shape(c, b, t);
        let lay = &self.layout;
        let w = |off: usize, len: usize| &p[off..off + len];
        let (nd, nf) = (n * d, n * f);
        let qs = d + 2 * kv; // fused q|k|v row
        let pl = b * c.num_heads * t * t;

        a.ready_for_backward = false;
        a.logits_consumed = true;
        // d(raw logits) = logit_scale · d(scaled logits)
        let ce_scale = grad_scale * c.logit_scale as f32 / n as f32;
        cross_entropy_bwd_inplace(&mut a.logits, &a.lse, &a.targets, v, ce_scale, self.z_loss);
        let alpha = c.residual_scale as f32;
        linear_bwd_input(&mut a.dln, &a.logits, w(lay.head, v * d), n, d, v, false);
        linear_bwd_weight(
            &mut gr[lay.head..lay.head + v * d],
            &a.logits,
            &a.lnf,
            n,
            d,
            v,
        );
        a.dres.fill(0.0);
        let l2 = 2 * c.num_layers;
        let (gnorm, _) = (lay.norm, ());
        rmsnorm_bwd(
            &mut a.dres,
            &mut gr[gnorm..gnorm + d],
            &a.dln,
            &a.resid[l2 * nd..][..nd],
            w(lay.norm, d),
            &a.rstdf,
            d,
        );
        let cap = self.stats.capture_grads;
        if cap {
            self.stats.resid_grad_rms = vec![0.0; l2 + 1];
            self.stats.resid_grad_rms[l2] = rms(&a.dres);
        }

        for (l, lo) in lay.layers.iter().enumerate().rev() {
            let x = &a.resid[2 * l * nd..][..nd];
            let xmid = &a.resid[(2 * l + 1) * nd..][..nd];
            let ln1 = &a.ln1[l * nd..][..nd];
            let ln2 = &a.ln2[l * nd..][..nd];
            let (gu, h) = (&a.gu[2 * l * nf..][..2 * nf], &a.hid[l * nf..][..nf]);
            // MLP: dres = d(layer output); the residual passes it straight to xmid.
            linear_bwd_input(&mut a.dhid, &a.dres, w(lo.down, d * f), n, f, d, false);
            linear_bwd_weight(&mut gr[lo.down..lo.down + d * f], &a.dres, h, n, f, d);
            swiglu_bwd(&mut a.dgu, &a.dhid, gu, f);
            linear_bwd_input(
                &mut a.dln,
                &a.dgu,
                w(lo.gate, 2 * f * d),
                n,
                d,
                2 * f,
                false,
            );
            linear_bwd_weight(
                &mut gr[lo.gate..lo.gate + 2 * f * d],
                &a.dgu,
                ln2,
                n,
                d,
                2 * f,
            );
            // the residual path carries α·d(out); the norm path adds below
            if alpha != 1.0 {
                scale_inplace(&mut a.dres, alpha);
            }
            rmsnorm_bwd(
                &mut a.dres,
                &mut gr[lo.ln2..lo.ln2 + d],
                &a.dln,
                xmid,
                w(lo.ln2, d),
                &a.rstd2[l * n..][..n],
                d,
            );
            if cap {
                self.stats.resid_grad_rms[2 * l + 1] = rms(&a.dres);
            }
            // Attention: dres = d(xmid); the residual passes it to x.
            let atty = &a.atty[l * nd..][..nd];
            linear_bwd_input(&mut a.datty, &a.dres, w(lo.o, d * d), n, d, d, false);
            linear_bwd_weight(&mut gr[lo.o..lo.o + d * d], &a.dres, atty, n, d, d);
            let qkv = &a.qkv[l * n * qs..][..n * qs];
            let probs = &a.probs[l * pl..][..pl];
            attention_bwd(&mut a.dqkv, &mut a.scratch, &a.datty, qkv, probs, shape);
            rope_bwd(&mut a.dqkv, qs, &self.rope, t, c.num_heads);
            rope_bwd(&mut a.dqkv[d..], qs, &self.rope, t, c.num_kv_heads);
            if let Some(qn) = lo.q_norm {
                let (hk, hd) = (c.num_heads + c.num_kv_heads, c.head_dim());
                let (dwq, dwk) = gr[qn..qn + 2 * hd].split_at_mut(hd);
                headnorm_bwd(
                    &mut a.dqkv,
                    dwq,
                    dwk,
                    &a.qk_pre[l * n * hk * hd..][..n * hk * hd],
                    &a.qk_rstd[l * n * hk..][..n * hk],
                    w(qn, hd),
                    w(qn + hd, hd),
                    qs,
                    c.num_heads,
                    c.num_kv_heads,
                );
            }
            linear_bwd_input(&mut a.dln, &a.dqkv, w(lo.q, qs * d), n, d, qs, false);
            linear_bwd_weight(&mut gr[lo.q..lo.q + qs * d], &a.dqkv, ln1, n, d, qs);
            // the residual path carries α·d(out); the norm path adds below
            if alpha != 1.0 {
                scale_inplace(&mut a.dres, alpha);
            }
            rmsnorm_bwd(
                &mut a.dres,
                &mut gr[lo.ln1..lo.ln1 + d],
                &a.dln,
                x,
                w(lo.ln1, d),
                &a.rstd1[l * n..][..n],
                d,
            );
            if cap {
                self.stats.resid_grad_rms[2 * l] = rms(&a.dres);
            }
        }
        embed_bwd(&mut gr[lay.embed..lay.embed + v * d], &a.tokens, &a.dres, d);
        Ok(())
    }
}
