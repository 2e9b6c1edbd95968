//! Weight initialisation. Every tensor is filled from its own counter-based stream keyed by
//! (seed, HF name), so values are independent of thread count and of the other tensors.

pub mod audit;
pub mod rng;
mod schemes;

pub use schemes::{
    erf, fans, plan, trunc_std, Dist, InitSection, RoleOverride, TensorPlan, SCHEMES,
};

use crate::model::{Model, Role};
use rayon::prelude::*;
use rng::{hash_name, Stream};

/// Fill `out` with N(0, std²) from the stream of `name`.
pub fn fill_normal(out: &mut [f32], seed: u64, name: &str, std: f64) {
    let s = Stream::new(seed, hash_name(name));
    out.par_chunks_mut(4096).enumerate().for_each(|(ci, ch)| {
        for (j, x) in ch.iter_mut().enumerate() {
            *x = (s.normal_at((ci * 4096 + j) as u64) * std) as f32;
        }
    });
}

/// Hugging Face's default LLaMA init: every linear and embedding N(0, 0.02²), norms 1.
pub fn init_hf_normal(model: &mut Model, seed: u64, std: f64) {
    let specs = model.layout.specs.clone();
    for s in &specs {
        let out = &mut model.params[s.offset..s.offset + s.len];
        match s.role {
            Role::Norm => out.fill(1.0),
            _ => fill_normal(out, seed, &s.name, std),
        }
    }
}

/// The model variants a scheme implies (μP: attention √(base head dim)/head dim and readout
/// 1/width_mult; DeepNorm: residual α = (2L)^(1/4)); plain LLaMA for the others.
pub fn implied_model(cfg: &mut crate::config::ModelConfig, ic: &InitSection) {
    match ic.scheme.as_str() {
        "mup" => {
            let width_mult = cfg.hidden_size as f64 / ic.base_width as f64;
            let base_head = ic.base_width as f64 / cfg.num_heads as f64;
            cfg.attn_scale = Some(base_head.sqrt() / cfg.head_dim() as f64);
            cfg.logit_scale = 1.0 / width_mult;
        }
        "deepnorm" => cfg.residual_scale = (2.0 * cfg.num_layers as f64).powf(0.25),
        _ => {}
    }
}

/// AdamW learning-rate multiplier of a tensor under a scheme: μP scales matrix-like
/// parameters (both dimensions grow with width: the hidden weights) by 1/width_mult, as
/// mup's MuAdam. The readout has one growing dimension (vector-like) and keeps the base LR:
/// its 1/width_mult is the output multiplier (`logit_scale`), as MuReadout. Scaling both
/// made logits shrink as 1/width after the first steps (`keel check --coord-check` caught it).
pub fn lr_multiplier(ic: &InitSection, cfg: &crate::config::ModelConfig, role: Role) -> f64 {
    match (ic.scheme.as_str(), role) {
        ("mup", Role::Embed | Role::Norm | Role::Head) => 1.0,
        ("mup", _) => ic.base_width as f64 / cfg.hidden_size as f64,
        _ => 1.0,
    }
}

/// Refuse an unknown scheme name with the list of known ones.
pub fn check_scheme(name: &str) -> Result<(), crate::config::ConfigError> {
    if SCHEMES.contains(&name) {
        Ok(())
    } else {
        Err(crate::config::ConfigError::new(
            "init.scheme",
            format!("unknown scheme '{name}'"),
            format!("use one of: {}", SCHEMES.join(", ")),
        ))
    }
}

/// Fill `out` from `dist`, with tensor `name`'s own stream (independent of the others and of
/// the thread count). rows × cols is the matrix shape (for orthogonal).
pub fn sample(out: &mut [f32], dist: Dist, seed: u64, name: &str, rows: usize, cols: usize) {
    let s = Stream::new(seed, hash_name(name));
    let n = out.len() as u64;
    match dist {
        Dist::Ones => out.fill(1.0),
        Dist::Zeros => out.fill(0.0),
        Dist::Normal { std } => fill_normal(out, seed, name, std),
        Dist::Uniform { bound } => out.par_chunks_mut(4096).enumerate().for_each(|(ci, ch)| {
            for (j, x) in ch.iter_mut().enumerate() {
                let u = s.uniform_at((ci * 4096 + j) as u64);
                *x = ((2.0 * u - 1.0) * bound) as f32;
            }
        }),
        Dist::TruncNormal {
            std,
            sigma_bound,
            corrected,
        } => {
            let scale = if corrected {
                std / trunc_std(sigma_bound)
            } else {
                std
            };
            out.par_chunks_mut(4096).enumerate().for_each(|(ci, ch)| {
                for (j, x) in ch.iter_mut().enumerate() {
                    let i = (ci * 4096 + j) as u64;
                    // rejection: attempt k of element i uses counter i + k·n
                    let mut k = 0u64;
                    let z = loop {
                        let z = s.normal_at(i + k * n);
                        if z.abs() <= sigma_bound || k > 1000 {
                            break z.clamp(-sigma_bound, sigma_bound);
                        }
                        k += 1;
                    };
                    *x = (z * scale) as f32;
                }
            });
        }
        Dist::Orthogonal { gain } => orthogonal(out, &s, rows, cols, gain),
    }
}

/// (Semi-)orthogonal matrix as torch.nn.init.orthogonal_: QR of a Gaussian matrix in its tall
/// orientation with the signs of R's diagonal folded in, times `gain`. Modified Gram–Schmidt
/// in f64.
fn orthogonal(out: &mut [f32], s: &Stream, rows: usize, cols: usize, gain: f64) {
    let (tall, short) = (rows.max(cols), rows.min(cols));
    // column-major tall matrix A (tall × short): column j contiguous
    let mut a: Vec<f64> = (0..tall * short).map(|i| s.normal_at(i as u64)).collect();
    for k in 0..short {
        let (done, rest) = a.split_at_mut((k + 1) * tall);
        let qk = &mut done[k * tall..];
        let norm = qk.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-300);
        qk.iter_mut().for_each(|x| *x /= norm);
        let qk = &*qk;
        rest.par_chunks_mut(tall).for_each(|col| {
            let dot: f64 = col.iter().zip(qk).map(|(a, b)| a * b).sum();
            col.iter_mut().zip(qk).for_each(|(c, q)| *c -= dot * q);
        });
    }
    // (MGS's R has a positive diagonal, so no sign flip is needed.)
    for r in 0..rows {
        for c in 0..cols {
            let (i, j) = if rows >= cols { (r, c) } else { (c, r) };
            out[r * cols + c] = (gain * a[j * tall + i]) as f32;
        }
    }
}

/// Initialise every parameter as the `[init]` section says; returns the plan used.
pub fn initialize(
    model: &mut Model,
    ic: &InitSection,
) -> Result<Vec<TensorPlan>, crate::config::ConfigError> {
    let plans = plan(&model.cfg, &model.layout, ic)?;
    let specs = model.layout.specs.clone();
    for (s, p) in specs.iter().zip(&plans) {
        let out = &mut model.params[s.offset..s.offset + s.len];
        sample(out, p.dist, ic.seed, &s.name, p.fan_out, p.fan_in);
    }
    Ok(plans)
}

/// `[init]` from a scheme name, a seed and `init.KEY=VALUE` assignments (`--set`), as
/// `keel init` and `keel check --model` take them. Nested keys: `init.roles.head.std=0.001`.
pub fn section(scheme: &str, seed: u64, sets: &[String]) -> anyhow::Result<InitSection> {
    use anyhow::{anyhow, bail};
    let mut t = toml::Table::new();
    let scheme = toml::Value::String(scheme.to_string());
    crate::config::set_path(&mut t, "init.scheme", scheme).map_err(|e| anyhow!("{e}"))?;
    crate::config::set_path(&mut t, "init.seed", toml::Value::Integer(seed as i64))
        .map_err(|e| anyhow!("{e}"))?;
    for s in sets {
        if !s.contains('=') {
            bail!("--set {s}: expected init.KEY=VALUE");
        }
        if !s.trim_start().starts_with("init.") {
            bail!("--set {s}: only init.* keys apply here (e.g. init.gain=0.5, init.roles.head.std=0.001)");
        }
        crate::config::apply_set(&mut t, s).map_err(|e| anyhow!("{e}"))?;
    }
    let init = t
        .remove("init")
        .unwrap_or(toml::Value::Table(toml::Table::new()));
    let doc = toml::Table::from_iter([("init".to_string(), init)]).to_string();
    #[derive(serde::Deserialize)]
    struct Wrap {
        init: InitSection,
    }
    let w: Wrap = toml::from_str(&doc).map_err(|e| anyhow!("init settings: {}", e.message()))?;
    check_scheme(&w.init.scheme).map_err(|e| anyhow!("{e}"))?;
    Ok(w.init)
}

/// `[init]` from JSON (the Python package's keyword arguments): unknown keys and schemes
/// are refused with the valid ones listed.
pub fn section_from_json(v: &serde_json::Value) -> Result<InitSection, crate::config::ConfigError> {
    let ic: InitSection = crate::config::from_json_strict("init", v)?;
    check_scheme(&ic.scheme)?;
    Ok(ic)
}

/// What `keel init --explain` shows: the model variant the scheme implies (μP, DeepNorm) and
/// every tensor's plan. Nothing is allocated, so any size works.
pub fn explain(
    cfg: &crate::config::ModelConfig,
    ic: &InitSection,
) -> Result<(crate::config::ModelConfig, Vec<TensorPlan>), crate::config::ConfigError> {
    let mut cfg = cfg.clone();
    implied_model(&mut cfg, ic);
    let layout = crate::model::ParamLayout::new(&cfg);
    let plans = plan(&cfg, &layout, ic)?;
    Ok((cfg, plans))
}

/// Largest model `initialized` builds in memory (f32 bytes).
pub const MAX_INIT_BYTES: f64 = 64e9;

/// A model of `cfg` (with the variant the scheme implies) initialised as `ic` says: what
/// `keel init --out` writes (`keel.init_` draws the same values tensor by tensor with
/// `sample`, without building the model).
pub fn initialized(cfg: &crate::config::ModelConfig, ic: &InitSection) -> anyhow::Result<Model> {
    let (cfg, _) = explain(cfg, ic).map_err(|e| anyhow::anyhow!("{e}"))?;
    let bytes = 4.0 * cfg.num_params() as f64;
    if bytes > MAX_INIT_BYTES {
        anyhow::bail!(
            "{:.0} GB of f32 weights is too large to build here; use `keel init --explain` (keel.explain) for the plan",
            bytes / 1e9
        );
    }
    // the model holds weights and gradients: refuse what this machine cannot hold
    crate::config::memory::ensure_fits(
        "model",
        "building these weights",
        2.0 * bytes,
        "use `keel init --explain` (keel.explain) for the plan, or a smaller config",
    )
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut model = Model::new(&cfg, 1, 1);
    initialize(&mut model, ic).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(model)
}

/// Rescale every weight matrix (not the norms) to RMS `std`, keeping its direction; returns
/// the largest RMS found before. The guard's rescue of a broken init (`guard.init_rescue`).
pub fn rescale_matrices(model: &mut Model, std: f64) -> f64 {
    let specs = model.layout.specs.clone();
    let mut worst = 0f64;
    for s in specs.iter().filter(|s| s.role != Role::Norm) {
        let w = &mut model.params[s.offset..s.offset + s.len];
        let r = crate::model::rms(w);
        worst = worst.max(r);
        if r > 0.0 && r.is_finite() {
            let k = (std / r) as f32;
            w.iter_mut().for_each(|x| *x *= k);
        }
    }
    worst
}
