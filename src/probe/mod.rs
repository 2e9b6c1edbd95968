//! `keel check`: signal propagation before the first token. For a config and init scheme:
//! the theory (`theory`), a measured forward + backward at init on random tokens, the first
//! optimizer steps, and gates with a verdict each.
//!
//! Large configs are measured on a proxy: the same depth, vocabulary, head size and
//! sequence length, the width cut to about `proxy_width` (heads, KV heads and the MLP width
//! in proportion), and every weight's σ multiplied by √(fan_in / proxy fan_in) so that each
//! fan_in·σ² — what variance propagation depends on — is the full model's. The proxy's
//! measurements then stand for the full model's and are compared with the full-size theory.

pub mod cli;
pub mod coord;
pub mod edge;
pub mod plot;
pub mod sharpness;
pub mod theory;

use crate::config::ModelConfig;
use crate::init::audit::Verdict;
use crate::init::rng::Stream;
use crate::init::{InitSection, TensorPlan};
use crate::model::{rms, Model, ParamLayout, Role};
use crate::optim::{AdamW, OptimConfig};
use serde::Serialize;
use std::collections::BTreeMap;
use theory::{Sigmas, Theory};

#[derive(Debug, Clone)]
pub struct CheckOptions {
    pub batch: usize,
    pub seq: usize,
    pub seed: u64,
    /// Optimizer steps to run after the init measurement (≥ 1: the step-1 update gate).
    pub steps: usize,
    pub optim: OptimConfig,
    /// Measure a width-reduced proxy when the model has more parameters than this.
    pub proxy_above_params: usize,
    pub proxy_width: usize,
    /// Real tokens instead of random ones (`--data`): consecutive windows from the start.
    pub data: Option<std::sync::Arc<crate::data::shard::TokenFile>>,
    /// Set from another thread to stop the check at its next pass (the Python package's
    /// Ctrl-C); the check then returns an error.
    pub cancel: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
}

impl CheckOptions {
    fn cancelled(&self) -> anyhow::Result<()> {
        if self
            .cancel
            .as_ref()
            .is_some_and(|c| c.load(std::sync::atomic::Ordering::SeqCst))
        {
            anyhow::bail!("keel check was cancelled");
        }
        Ok(())
    }
}

impl Default for CheckOptions {
    fn default() -> Self {
        CheckOptions {
            batch: 4,
            seq: 128,
            seed: 0,
            steps: 1,
            optim: OptimConfig::default(),
            proxy_above_params: 60_000_000,
            proxy_width: 256,
            data: None,
            cancel: None,
        }
    }
}

/// What the forward and backward pass at init measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Measured {
    pub resid_rms: Vec<f64>,
    pub attn_out_rms: Vec<f64>,
    pub mlp_out_rms: Vec<f64>,
    pub attn_logit_std: Vec<f64>,
    pub attn_logit_max: Vec<f64>,
    pub attn_entropy: Vec<f64>,
    pub logit_std: f64,
    pub logz_mean: f64,
    pub loss: f64,
    pub resid_grad_rms: Vec<f64>,
    /// RMS of the gradient over each layer's weight matrices.
    pub layer_grad_rms: Vec<f64>,
    /// The same after the first optimizer step (on the next batch).
    pub layer_grad_rms_step1: Vec<f64>,
    /// Per tensor: (name, gradient RMS).
    pub tensor_grad_rms: Vec<(String, f64)>,
}

/// One optimizer step's health: update/weight ratio per tensor group, logit growth.
#[derive(Debug, Clone, Serialize)]
pub struct StepStats {
    pub step: usize,
    pub loss: f64,
    pub update_ratio: BTreeMap<String, f64>,
    pub max_attn_logit: f64,
    pub logit_std: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Gate {
    pub name: &'static str,
    pub verdict: Verdict,
    pub value: f64,
    pub reason: String,
    /// What to change; none for a passing gate.
    pub suggestion: Option<String>,
    /// PASS up to `pass`, WARN up to `warn` (infinite: the gate never fails), FAIL above.
    pub pass: f64,
    pub warn: f64,
    /// Where the thresholds come from (the calibration in docs/check.md, "Calibration").
    pub basis: &'static str,
}

impl Gate {
    /// "PASS ≤ 0.5, WARN ≤ 3, FAIL above".
    pub fn threshold(&self) -> String {
        let n = |x: f64| {
            if x >= 10.0 || x == x.round() {
                format!("{x:.0}")
            } else {
                format!("{x}")
            }
        };
        if self.warn.is_infinite() {
            format!("PASS ≤ {}, else WARN (never FAIL)", n(self.pass))
        } else {
            format!(
                "PASS ≤ {}, WARN ≤ {}, FAIL above",
                n(self.pass),
                n(self.warn)
            )
        }
    }
}

/// Gate thresholds, calibrated on published recipes that trained at scale (Llama 2 7B/13B/70B,
/// Llama 3 8B/70B, Mistral 7B, Qwen3 8B, an OLMo 2 7B-shaped model, TinyLlama) and on recipes
/// measured to fail (σ = 1; the LR 33× too high of examples/instability): every known-good one
/// passes or warns, every known-bad one fails, with margin on both sides (docs/check.md,
/// "Calibration"; `tests/check.rs::calibration_*`).
pub mod thresholds {
    /// (pass, warn, basis) per gate.
    pub type T = (f64, f64, &'static str);
    pub const INITIAL_LOSS: T = (0.5, 3.0, "|loss − ln V| in nats: published recipes reach +1.7 (Llama 3 70B, σ 0.02 at d 8192), σ = 1 reaches +47 (tiny) to +260 (7B)");
    pub const RESIDUAL_GROWTH: T = (4.0, 16.0, "pre-norm residuals grow ~√L once the branches dominate the embedding: 5.7–8.9 in published recipes (32–80 layers); 16 is √256 layers (the narrow 128-layer model without depth scaling reaches 29)");
    pub const GRADIENT_RATIO: T = (16.0, f64::INFINITY, "informational: Adam normalises each parameter's update by its own gradient scale, and published recipes show 48–315 here (Llama 2 70B: 315) while σ = 1 tiny shows 61; it separates nothing, so it never fails");
    pub const ATTENTION_LOGITS: T = (1.0, 6.0, "attention-logit σ at init: ≤ 3.3 in published recipes (70B: σ 0.02 at d 8192), ≥ 14 with σ = 1");
    pub const OUTPUT_LOGITS: T = (
        1.0,
        5.0,
        "output-logit σ at init: ≤ 1.8 in published recipes, ≥ 16 with σ = 1",
    );
    pub const UPDATE_RATIO: T = (0.1, 1.0, "largest ‖ΔW‖/‖W‖ of step 1 at the peak LR (no warm-up): ≤ 0.15 in recipes that trained (tiny at 3e-3, the published 7B–70B at their peak LRs), 5.0 at the 33×-too-high LR of examples/instability; above 1 the first step outweighs the weights");
}

#[derive(Debug, Clone, Serialize)]
pub struct Proxy {
    pub hidden_size: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub intermediate_size: usize,
    pub params: usize,
    pub how: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct CheckReport {
    pub scheme: String,
    pub params: usize,
    pub layers: usize,
    pub hidden_size: usize,
    pub vocab_size: usize,
    pub batch: usize,
    pub seq: usize,
    pub lr: f64,
    pub proxy: Option<Proxy>,
    pub theory: Theory,
    pub measured: Measured,
    pub steps: Vec<StepStats>,
    pub gates: Vec<Gate>,
    pub verdict: Verdict,
}

/// σ per role and layer from an init plan (a tied head takes the embedding's).
pub fn sigmas(cfg: &ModelConfig, plans: &[TensorPlan]) -> Sigmas {
    let mut s = Sigmas {
        embed: 0.0,
        head: f64::NAN,
        layers: vec![[0.0; 7]; cfg.num_layers],
    };
    for p in plans {
        let slot = match p.role {
            "attn-q" => 0,
            "attn-k" => 1,
            "attn-v" => 2,
            "attn-out" => 3,
            "mlp-gate" => 4,
            "mlp-up" => 5,
            "mlp-out" => 6,
            "embed" => {
                s.embed = p.target_std;
                continue;
            }
            "head" => {
                s.head = p.target_std;
                continue;
            }
            _ => continue,
        };
        if let Some(l) = p.layer {
            s.layers[l][slot] = p.target_std;
        }
    }
    if s.head.is_nan() {
        s.head = s.embed;
    }
    s
}

/// The width-reduced proxy of a config, and the factor by which widths were divided.
pub fn proxy_config(cfg: &ModelConfig, width: usize) -> (ModelConfig, f64) {
    let hd = cfg.head_dim();
    let heads = (width / hd).clamp(1, cfg.num_heads);
    let k = cfg.num_heads as f64 / heads as f64;
    let mut p = cfg.clone();
    p.num_heads = heads;
    p.hidden_size = heads * hd;
    p.num_kv_heads = ((cfg.num_kv_heads as f64 / k).round() as usize).clamp(1, heads);
    while !heads.is_multiple_of(p.num_kv_heads) {
        p.num_kv_heads -= 1;
    }
    p.intermediate_size = ((cfg.intermediate_size as f64 / k).round() as usize).max(1);
    (p, k)
}

/// Proxy σ: each weight's σ times √(fan_in / proxy fan_in) (the embedding keeps its σ).
fn proxy_sigmas(full: &Sigmas, cfg: &ModelConfig, proxy: &ModelConfig) -> Sigmas {
    let rd = (cfg.hidden_size as f64 / proxy.hidden_size as f64).sqrt();
    let rf = (cfg.intermediate_size as f64 / proxy.intermediate_size as f64).sqrt();
    Sigmas {
        embed: full.embed,
        head: full.head * rd,
        layers: full
            .layers
            .iter()
            .map(|w| {
                let mut o = *w;
                for (i, x) in o.iter_mut().enumerate() {
                    *x *= if i == 6 { rf } else { rd };
                }
                o
            })
            .collect(),
    }
}

/// Fill a model with Gaussian weights of the given σ (norm gains 1): the proxy's init.
fn init_gaussian(model: &mut Model, sig: &Sigmas, seed: u64) {
    let specs = model.layout.specs.clone();
    for sp in &specs {
        let s = match (sp.role, sp.layer) {
            (Role::Norm, _) => {
                model.params[sp.offset..sp.offset + sp.len].fill(1.0);
                continue;
            }
            (Role::Embed, _) => sig.embed,
            (Role::Head, _) => sig.head,
            (r, Some(l)) => {
                let i = match r {
                    Role::AttnQ => 0,
                    Role::AttnK => 1,
                    Role::AttnV => 2,
                    Role::AttnO => 3,
                    Role::MlpGate => 4,
                    Role::MlpUp => 5,
                    _ => 6,
                };
                sig.layers[l][i]
            }
            _ => 0.0,
        };
        let st = Stream::new(seed, crate::init::rng::hash_name(&sp.name));
        for (i, w) in model.params[sp.offset..sp.offset + sp.len]
            .iter_mut()
            .enumerate()
        {
            *w = (s * st.normal_at(i as u64)) as f32;
        }
    }
}

/// Batch `step`: windows of `--data` when given, else random tokens.
fn batch(o: &CheckOptions, v: usize, t: usize, step: u64, x: &mut [u32], y: &mut [u32]) {
    if let Some(tf) = &o.data {
        let n = x.len();
        let span = tf.len.saturating_sub(t + 1).max(1);
        for r in 0..n / t {
            let w = (step as usize * (n / t) + r) * t % span;
            tf.read(w, &mut x[r * t..(r + 1) * t]);
            tf.read(w + 1, &mut y[r * t..(r + 1) * t]);
        }
        return;
    }
    random_batch(v, x.len(), o.seed, step, x, y);
}

fn random_batch(v: usize, n: usize, seed: u64, step: u64, x: &mut [u32], y: &mut [u32]) {
    let s = Stream::new(seed, 0xC4EC + step);
    for i in 0..n {
        x[i] = (s.u64_at(2 * i as u64) % v as u64) as u32;
        y[i] = (s.u64_at(2 * i as u64 + 1) % v as u64) as u32;
    }
}

/// RMS of the gradient over each layer's weight matrices (norm gains excluded).
fn layer_grad_rms(model: &Model) -> Vec<f64> {
    let mut acc = vec![(0f64, 0usize); model.cfg.num_layers];
    for sp in &model.layout.specs {
        if let (Some(l), true) = (sp.layer, sp.role != Role::Norm) {
            let g = &model.grads[sp.offset..sp.offset + sp.len];
            acc[l].0 += g.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>();
            acc[l].1 += g.len();
        }
    }
    acc.iter()
        .map(|(s, c)| (s / (*c).max(1) as f64).sqrt())
        .collect()
}

/// Theory, measurement, first steps and gates for one config and init scheme.
pub fn check(cfg: &ModelConfig, ic: &InitSection, o: &CheckOptions) -> anyhow::Result<CheckReport> {
    let layout = ParamLayout::new(cfg);
    let plans = crate::init::plan(cfg, &layout, ic).map_err(|e| anyhow::anyhow!("{e}"))?;
    let full_sig = sigmas(cfg, &plans);
    let t = o.seq.min(cfg.max_seq_len);
    let n = o.batch * t;
    let theory = theory::predict(cfg, &full_sig, t, n);
    let big = cfg.num_params() > o.proxy_above_params;
    let mut proxy_k = None;
    let (mcfg, proxy) = if big {
        let (p, k) = proxy_config(cfg, o.proxy_width);
        proxy_k = Some(k);
        let how = format!(
            "same depth ({}), vocab, head size ({}) and sequence; width {} → {} (÷{k:.0}: {} → {} heads, {} → {} KV heads, MLP {} → {}); σ × √(fan_in/proxy fan_in) so fan_in·σ² is the full model's; gradients ÷ √{k:.0} (the head's fan_out, the vocabulary, is not reduced)",
            cfg.num_layers,
            cfg.head_dim(),
            cfg.hidden_size,
            p.hidden_size,
            cfg.num_heads,
            p.num_heads,
            cfg.num_kv_heads,
            p.num_kv_heads,
            cfg.intermediate_size,
            p.intermediate_size
        );
        let pr = Proxy {
            hidden_size: p.hidden_size,
            num_heads: p.num_heads,
            num_kv_heads: p.num_kv_heads,
            intermediate_size: p.intermediate_size,
            params: p.num_params(),
            how,
        };
        (p, Some(pr))
    } else {
        (cfg.clone(), None)
    };
    // refuse before allocating: a 4M vocabulary or 1,024 layers would abort half-way
    let (bytes, field) = crate::config::memory::train_bytes(&mcfg, o.batch, t);
    crate::config::memory::ensure_fits(
        field,
        if big {
            "measuring the check's proxy"
        } else {
            "measuring this config"
        },
        bytes,
        "check a smaller config (fewer layers, a smaller vocabulary) or a smaller --batch/--seq",
    )
    .map_err(anyhow::Error::new)?;
    let mut model = Model::new(&mcfg, o.batch, t);
    if big {
        init_gaussian(&mut model, &proxy_sigmas(&full_sig, cfg, &mcfg), ic.seed);
    } else {
        crate::init::initialize(&mut model, ic).map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    let (mut x, mut y) = (vec![0u32; n], vec![0u32; n]);
    if let Some(tf) = &o.data {
        if tf.len < t + 1 {
            anyhow::bail!(
                "{}: {} tokens are fewer than one window of {}",
                tf.path.display(),
                tf.len,
                t + 1
            );
        }
        tf.check_vocab(mcfg.vocab_size)?;
    }
    batch(o, mcfg.vocab_size, t, 0, &mut x, &mut y);
    model.stats.capture_grads = true;
    model.zero_grad();
    o.cancelled()?;
    let loss = model.forward(&x, &y)? as f64;
    let ps = model.probe_stats();
    let mut m = Measured {
        resid_rms: model.residual_rms(),
        attn_out_rms: ps.attn_out_rms,
        mlp_out_rms: ps.mlp_out_rms,
        attn_logit_std: ps.attn_logit_std,
        attn_logit_max: model
            .stats
            .max_attn_logit
            .iter()
            .map(|&v| v as f64)
            .collect(),
        attn_entropy: ps.attn_entropy,
        logit_std: ps.logit_std,
        logz_mean: model.stats.lse_mean as f64,
        loss,
        ..Default::default()
    };
    o.cancelled()?;
    model.backward(1.0)?;
    // A proxy's gradients are √k times the full model's: the head's fan_out (the vocabulary)
    // is not reduced while its σ² grew k-fold; every other gain is preserved. Divide it out.
    let gscale = proxy_k.map_or(1.0, |k: f64| 1.0 / k.sqrt());
    m.resid_grad_rms = model
        .stats
        .resid_grad_rms
        .iter()
        .map(|g| g * gscale)
        .collect();
    for sp in &model.layout.specs {
        let g = &model.grads[sp.offset..sp.offset + sp.len];
        m.tensor_grad_rms.push((sp.name.clone(), rms(g) * gscale));
    }
    m.layer_grad_rms = layer_grad_rms(&model).iter().map(|g| g * gscale).collect();

    // the first optimizer steps at the configured LR
    let mut opt = AdamW::new(o.optim.clone(), &model.layout)
        .with_lr_multipliers(&model.layout, |r| crate::init::lr_multiplier(ic, &mcfg, r));
    let mut steps = Vec::new();
    model.stats.capture_grads = false;
    for k in 1..=o.steps.max(1) {
        o.cancelled()?;
        if k > 1 {
            batch(o, mcfg.vocab_size, t, k as u64, &mut x, &mut y);
            model.zero_grad();
            model.forward(&x, &y)?;
            model.backward(1.0)?;
        }
        crate::optim::clip_grad_norm(&mut model.grads, o.optim.grad_clip);
        opt.track = true;
        opt.update(&mut model.params, &model.grads, o.optim.lr);
        let groups = opt.group_update_sq(&model.layout);
        // the state after the update: loss and logits on the next batch
        batch(o, mcfg.vocab_size, t, 1000 + k as u64, &mut x, &mut y);
        let l = model.forward(&x, &y)? as f64;
        let ps = model.probe_stats();
        if k == 1 {
            model.zero_grad();
            model.backward(1.0)?;
            m.layer_grad_rms_step1 = layer_grad_rms(&model).iter().map(|g| g * gscale).collect();
        }
        steps.push(StepStats {
            step: k,
            loss: l,
            update_ratio: groups
                .into_iter()
                .filter(|(_, (_, w))| *w > 0.0)
                .map(|(g, (d, w))| (g.to_string(), (d / w).sqrt()))
                .collect(),
            max_attn_logit: model
                .stats
                .max_attn_logit
                .iter()
                .fold(0f64, |a, &b| a.max(b as f64)),
            logit_std: ps.logit_std,
        });
    }
    let gates = gates(cfg, &m, &steps, o.optim.lr);
    let verdict = gates
        .iter()
        .map(|g| g.verdict)
        .max()
        .unwrap_or(Verdict::Pass);
    Ok(CheckReport {
        scheme: ic.scheme.clone(),
        params: cfg.num_params(),
        layers: cfg.num_layers,
        hidden_size: cfg.hidden_size,
        vocab_size: cfg.vocab_size,
        batch: o.batch,
        seq: t,
        lr: o.optim.lr,
        proxy,
        theory,
        measured: m,
        steps,
        gates,
        verdict,
    })
}

fn grade(x: f64, (pass, warn, _): thresholds::T) -> Verdict {
    if x.is_nan() || x > warn {
        Verdict::Fail
    } else if x > pass {
        Verdict::Warn
    } else {
        Verdict::Pass
    }
}

/// The gates, from the measurement (the theory is shown beside it, not gated).
pub fn gates(cfg: &ModelConfig, m: &Measured, steps: &[StepStats], lr: f64) -> Vec<Gate> {
    let mut g = Vec::new();
    let lnv = (cfg.vocab_size as f64).ln();
    let dl = m.loss - lnv;
    g.push(Gate {
        name: "initial loss",
        verdict: grade(dl.abs(), thresholds::INITIAL_LOSS),
        value: m.loss,
        reason: format!("{:.3} vs ln(vocab) {lnv:.3} ({dl:+.3})", m.loss),
        pass: 0.0,
        warn: 0.0,
        basis: "",
        suggestion: Some("the model is confidently wrong before training: shrink the head (or tied embedding) init so σ_head·√d ≪ 1".into()),
    });
    // growth after the first layer (the embedding's own scale is the init-loss gates' concern)
    let l2 = m.resid_rms.len() - 1;
    let skip = cfg.residual_scale.powi(l2 as i32 - 2);
    let growth = m.resid_rms[l2] / (m.resid_rms[2.min(l2)] * skip).max(1e-30);
    g.push(Gate {
        name: "residual growth",
        verdict: grade(growth.max(1.0 / growth.max(1e-30)), thresholds::RESIDUAL_GROWTH),
        value: growth,
        reason: format!(
            "residual RMS ×{growth:.2} from layer 0's output to layer {}'s{}",
            cfg.num_layers - 1,
            if skip != 1.0 { " (beyond the α skip gains)" } else { "" }
        ),
        pass: 0.0,
        warn: 0.0,
        basis: "",
        suggestion: Some("the branches dominate the embedding as depth grows: scale output projections with depth (depth-scaled, megatron, mitchell) or enlarge the embedding σ".into()),
    });
    // a zero readout (μP) sends no gradient into the layers at init: use step 1's
    let (lg, when) =
        if m.layer_grad_rms.iter().all(|&x| x == 0.0) && !m.layer_grad_rms_step1.is_empty() {
            (
                &m.layer_grad_rms_step1,
                " after step 1 (zero readout at init)",
            )
        } else {
            (&m.layer_grad_rms, "")
        };
    let (first, last) = (lg[0], lg[cfg.num_layers - 1]);
    let ratio = first / last.max(1e-30);
    g.push(Gate {
        name: "gradient ratio",
        verdict: grade(ratio.max(1.0 / ratio.max(1e-30)), thresholds::GRADIENT_RATIO),
        value: ratio,
        reason: format!("weight-gradient RMS layer 0 / layer {} = {ratio:.2}{when}", cfg.num_layers - 1),
        pass: 0.0,
        warn: 0.0,
        basis: "",
        suggestion: Some("layers learn at very different speeds: balance the residual stream (depth scaling) or use per-layer LR".into()),
    });
    let (li, ls) = m
        .attn_logit_std
        .iter()
        .enumerate()
        .fold((0, 0f64), |a, (i, &s)| if s > a.1 { (i, s) } else { a });
    let amax = m.attn_logit_max.iter().fold(0f64, |a, &b| a.max(b));
    g.push(Gate {
        name: "attention logits",
        verdict: grade(ls, thresholds::ATTENTION_LOGITS),
        value: ls,
        reason: format!("logit std {ls:.3} (layer {li}), max {amax:.2}: entropy {:.2} nats at layer {li}", m.attn_entropy.get(li).copied().unwrap_or(f64::NAN)),
        pass: 0.0,
        warn: 0.0,
        basis: "",
        suggestion: Some("attention is peaked before training: smaller q/k init, attention scale 1/√d_head, or qk-norm".into()),
    });
    g.push(Gate {
        name: "output logits",
        verdict: grade(m.logit_std, thresholds::OUTPUT_LOGITS),
        value: m.logit_std,
        reason: format!(
            "logit std {:.3}, mean log-partition {:.3} (ln V {lnv:.3})",
            m.logit_std, m.logz_mean
        ),
        pass: 0.0,
        warn: 0.0,
        basis: "",
        suggestion: Some("shrink the head init (or add a 1/width output multiplier, as μP)".into()),
    });
    if let Some(s) = steps.first() {
        let (gname, r) = s
            .update_ratio
            .iter()
            .filter(|(k, _)| k.as_str() != "norm")
            .fold(("-".to_string(), 0f64), |a, (k, &v)| {
                if v > a.1 {
                    (k.clone(), v)
                } else {
                    a
                }
            });
        g.push(Gate {
            name: "update/weight, step 1",
            verdict: grade(r, thresholds::UPDATE_RATIO),
            value: r,
            reason: format!("largest ‖ΔW‖/‖W‖ {r:.3} ({gname}) at lr {lr:.2e}"),
            pass: 0.0,
        warn: 0.0,
        basis: "",
        suggestion: Some(format!("the first Adam step moves weights by ≈ lr per entry: lower the LR, add warmup, or raise the {gname} init σ")),
        });
    }
    // thresholds and their basis on every gate; no suggestion where nothing is wrong
    for (x, t) in g.iter_mut().zip([
        thresholds::INITIAL_LOSS,
        thresholds::RESIDUAL_GROWTH,
        thresholds::GRADIENT_RATIO,
        thresholds::ATTENTION_LOGITS,
        thresholds::OUTPUT_LOGITS,
        thresholds::UPDATE_RATIO,
    ]) {
        (x.pass, x.warn, x.basis) = t;
        if x.verdict == Verdict::Pass {
            x.suggestion = None;
        }
    }
    g
}
