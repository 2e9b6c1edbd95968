//! Run configuration: the TOML file of `keel train` (sections as in DESIGN.md), `--set`
//! overrides, validation, and the resolved `config.toml` a run directory keeps.

use super::{ConfigError, ModelConfig};
use crate::init::InitSection;
use crate::optim::{OptimConfig, Schedule};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// `[model]`: a preset plus optional overrides of any shape field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSection {
    pub preset: Option<String>,
    /// An HF config.json to take the shape from (instead of a preset).
    pub hf_config: Option<String>,
    pub vocab_size: Option<usize>,
    pub hidden_size: Option<usize>,
    pub num_layers: Option<usize>,
    pub num_heads: Option<usize>,
    pub num_kv_heads: Option<usize>,
    pub intermediate_size: Option<usize>,
    pub rope_theta: Option<f64>,
    pub rms_norm_eps: Option<f64>,
    pub tie_embeddings: Option<bool>,
    pub max_seq_len: Option<usize>,
    /// Stability variants (default: plain LLaMA, or what the init scheme implies).
    pub attn_scale: Option<f64>,
    pub logit_scale: Option<f64>,
    pub residual_scale: Option<f64>,
    /// Per-head RMSNorm on q and k (Qwen3's q_norm/k_norm); checkpoints are written as Qwen3.
    pub qk_norm: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataSection {
    /// Text file or folder, JSONL, Parquet, or token shard; empty = the built-in corpus.
    pub path: String,
    /// auto | text | jsonl | parquet | shard
    pub format: String,
    /// A tokenizer.json to use; empty = train a byte-level BPE of the model's vocab size.
    pub tokenizer: String,
    /// Fraction of the token stream (its end) held out for validation.
    pub val_fraction: f64,
    /// Size of the built-in corpus in bytes (when `path` is empty).
    pub builtin_bytes: usize,
}

impl Default for DataSection {
    fn default() -> Self {
        DataSection {
            path: String::new(),
            format: "auto".into(),
            tokenizer: String::new(),
            val_fraction: 0.05,
            builtin_bytes: 2_000_000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainSection {
    pub steps: u64,
    pub batch_size: usize,
    /// 0 = the model's max_seq_len
    pub seq_len: usize,
    pub grad_accum: usize,
    pub seed: u64,
    /// 0 = one per core
    pub threads: usize,
    /// Print a progress line every N steps when not on a terminal (0 = never).
    pub log_every: u64,
    /// Stop early, as diverged (exit 2), when the loss is non-finite or stays above the
    /// first step's loss for `DIVERGED_AFTER` consecutive steps after warm-up (sweeps set it).
    pub stop_if_diverged: bool,
    /// Write DIR/report.html when the run ends (sweeps turn it off for their trials).
    pub report: bool,
    /// z-loss coefficient: minimise CE + z_loss·logZ² (PaLM: 1e-4), keeping the output
    /// log-partition near 0. The logged loss stays the cross-entropy. 0 = off.
    pub z_loss: f64,
}

impl Default for TrainSection {
    fn default() -> Self {
        TrainSection {
            steps: 300,
            batch_size: 8,
            seq_len: 0,
            grad_accum: 1,
            seed: 0,
            threads: 0,
            log_every: 50,
            stop_if_diverged: false,
            report: true,
            z_loss: 0.0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointSection {
    /// Save every N steps (0 = only at the end).
    pub every: u64,
    /// Keep the newest K checkpoints (at least 1).
    pub keep: usize,
}

impl Default for CheckpointSection {
    fn default() -> Self {
        CheckpointSection {
            every: 100,
            keep: 3,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalSection {
    /// Validation loss every N steps (0 = only at the end).
    pub every: u64,
    /// Batches per validation pass.
    pub batches: usize,
}

impl Default for EvalSection {
    fn default() -> Self {
        EvalSection {
            every: 50,
            batches: 4,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetrySection {
    /// Per-layer statistics every N steps (0 = off).
    pub every: u64,
    /// Also write TensorBoard event files under `<out>/tensorboard/` (metrics, per-layer
    /// telemetry, guard events as scalars and text): `tensorboard --logdir <out>`.
    pub tensorboard: bool,
    /// Measure the sharpness every N steps (0 = off): λ_max of Adam's preconditioned Hessian
    /// on the step's batch after its update, and the max stable LR it predicts
    /// ((2 + 2β₁)/((1 − β₁)·λ)), logged as `sharpness_precond`, `lr_edge` and `edge_ratio`.
    /// Costs about 2·`sharpness_iters` steps of compute per measurement; never changes the run.
    pub sharpness_every: u64,
    /// Most Hessian-vector products per eigenvalue (Lanczos).
    pub sharpness_iters: usize,
    /// Also measure λ_max of the plain Hessian (`sharpness`), doubling the cost.
    pub sharpness_hessian: bool,
}

impl Default for TelemetrySection {
    fn default() -> Self {
        TelemetrySection {
            every: 10,
            tensorboard: false,
            sharpness_every: 0,
            sharpness_iters: 20,
            sharpness_hessian: false,
        }
    }
}

/// Everything `keel train` needs. Serialises to the resolved `config.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct RunConfig {
    pub model: ModelSection,
    pub init: InitSection,
    pub data: DataSection,
    pub train: TrainSection,
    pub optim: OptimConfig,
    pub schedule: Schedule,
    pub checkpoint: CheckpointSection,
    pub eval: EvalSection,
    pub telemetry: TelemetrySection,
    pub guard: crate::monitor::GuardConfig,
}

/// Parse a `--set section.key=value` value: TOML syntax if it parses (numbers, bools,
/// arrays, quoted strings), else a bare string.
fn parse_value(raw: &str) -> toml::Value {
    let doc = format!("v = {raw}");
    match doc.parse::<toml::Table>() {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or(toml::Value::String(raw.to_string())),
        Err(_) => toml::Value::String(raw.to_string()),
    }
}

/// Apply `section.key=value` to a TOML table.
pub fn apply_set(table: &mut toml::Table, assignment: &str) -> Result<(), ConfigError> {
    let (key, raw) = assignment.split_once('=').ok_or_else(|| {
        ConfigError::new(
            "--set",
            format!("'{assignment}' is not key=value"),
            "write e.g. --set optim.lr=3e-4",
        )
    })?;
    set_path(table, key, parse_value(raw.trim()))
}

/// Set the dotted key `section.key` (nested: `init.roles.head.std`) of a TOML table.
pub fn set_path(table: &mut toml::Table, key: &str, value: toml::Value) -> Result<(), ConfigError> {
    let parts: Vec<&str> = key.trim().split('.').collect();
    if parts.len() < 2 || parts.iter().any(|p| p.is_empty()) {
        return Err(ConfigError::new(
            "--set",
            format!("key '{key}' must be section.key"),
            "write e.g. --set train.steps=500",
        ));
    }
    // nested tables (init.roles.head.std) are created on the way
    let mut cur = table;
    for (i, part) in parts[..parts.len() - 1].iter().enumerate() {
        let next = cur
            .entry(part.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        cur = next.as_table_mut().ok_or_else(|| {
            ConfigError::new(
                &parts[..=i].join("."),
                "is not a section",
                "use section.key with a section name from DESIGN.md",
            )
        })?;
    }
    cur.insert(parts[parts.len() - 1].to_string(), value);
    Ok(())
}

/// `section.key` of the TOML line holding byte `pos` of `doc`.
fn key_at(doc: &str, pos: usize) -> Option<String> {
    let mut section = String::new();
    let mut start = 0;
    for line in doc.split_inclusive('\n') {
        let t = line.trim();
        if t.starts_with('[') {
            section = t.trim_matches(|c| c == '[' || c == ']').to_string();
        }
        if pos < start + line.len() {
            let key = t.split('=').next()?.trim().trim_matches('"');
            return Some(if section.is_empty() {
                key.to_string()
            } else {
                format!("{section}.{key}")
            });
        }
        start += line.len();
    }
    None
}

impl RunConfig {
    /// Build from an optional TOML file plus `--set` overrides (applied in order).
    pub fn load(file: Option<&Path>, sets: &[String]) -> Result<Self, ConfigError> {
        let cfg = Self::parse(file, sets)?;
        cfg.validate().map_err(|e| {
            e.in_file(&file.map_or("(command line)".into(), |p| p.display().to_string()))
        })?;
        Ok(cfg)
    }

    /// Parse without the training checks (`keel check` takes 70B shapes it never allocates).
    pub fn parse(file: Option<&Path>, sets: &[String]) -> Result<Self, ConfigError> {
        let (mut table, name) = match file {
            Some(p) => {
                let name = p.display().to_string();
                let text = std::fs::read_to_string(p).map_err(|e| {
                    ConfigError::new(&name, format!("cannot read: {e}"), "check the path")
                })?;
                let t = text.parse::<toml::Table>().map_err(|e| {
                    ConfigError::new(
                        "(syntax)",
                        format!("not valid TOML: {}", e.message()),
                        "fix the TOML syntax",
                    )
                    .in_file(&name)
                })?;
                (t, name)
            }
            None => (toml::Table::new(), "(command line)".to_string()),
        };
        for s in sets {
            apply_set(&mut table, s)?;
        }
        Self::from_table(table).map_err(|e| e.in_file(&name))
    }

    pub fn from_table(table: toml::Table) -> Result<Self, ConfigError> {
        // Round-trip through text so a type error carries a span that names its key.
        let doc = table.to_string();
        let cfg: RunConfig = toml::from_str(&doc).map_err(|e| {
            let msg = e.message().to_string();
            let field = e
                .span()
                .and_then(|sp| key_at(&doc, sp.start))
                .or_else(|| msg.split('`').nth(1).map(str::to_string))
                .unwrap_or_else(|| "(config)".to_string());
            ConfigError::new(
                &field,
                msg,
                "see docs/configuration.md for every [section] key",
            )
        })?;
        Ok(cfg)
    }

    /// The model shape: preset or HF config, then field overrides.
    pub fn model_config(&self) -> Result<ModelConfig, ConfigError> {
        let m = &self.model;
        let mut c = match (&m.preset, &m.hf_config) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::new(
                    "model.hf_config",
                    "both model.preset and model.hf_config are set",
                    "keep one of them",
                ))
            }
            (Some(p), None) => ModelConfig::preset(p)?,
            (None, Some(h)) => ModelConfig::from_hf_json(Path::new(h))?,
            (None, None) => ModelConfig::preset("tiny")?,
        };
        macro_rules! over {
            ($($f:ident),*) => { $( if let Some(v) = m.$f { c.$f = v; } )* };
        }
        over!(
            vocab_size,
            hidden_size,
            num_layers,
            num_heads,
            num_kv_heads,
            intermediate_size
        );
        over!(
            rope_theta,
            rms_norm_eps,
            tie_embeddings,
            max_seq_len,
            qk_norm
        );
        crate::init::implied_model(&mut c, &self.init);
        over!(logit_scale, residual_scale);
        if m.attn_scale.is_some() {
            c.attn_scale = m.attn_scale;
        }
        c.validate()?;
        Ok(c)
    }

    /// Sequence length used for training (train.seq_len, or the model's max).
    pub fn seq_len(&self, mc: &ModelConfig) -> usize {
        if self.train.seq_len == 0 {
            mc.max_seq_len
        } else {
            self.train.seq_len
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let mc = self.model_config()?;
        let t = self.seq_len(&mc);
        if t > mc.max_seq_len {
            return Err(ConfigError::new(
                "train.seq_len",
                format!("{t} exceeds model.max_seq_len {}", mc.max_seq_len),
                "lower train.seq_len or raise model.max_seq_len",
            ));
        }
        let tr = &self.train;
        if tr.batch_size == 0 || tr.grad_accum == 0 {
            return Err(ConfigError::new(
                "train.batch_size",
                "batch_size and grad_accum must be positive",
                "set them to 1 or more",
            ));
        }
        // Refuse a model and batch that cannot fit before anything is allocated.
        let (bytes, field) = super::memory::train_bytes(&mc, tr.batch_size, t);
        super::memory::ensure_fits(
            field,
            "training this model",
            bytes,
            "use a smaller model, train.batch_size or train.seq_len",
        )?;
        if let Err((field, why)) = self.guard.validate() {
            return Err(ConfigError::new(
                &field,
                why,
                "fix the value or remove it to use the default",
            ));
        }
        let o = &self.optim;
        if !(o.lr.is_finite() && o.lr > 0.0) {
            return Err(ConfigError::new(
                "optim.lr",
                format!("must be > 0, got {}", o.lr),
                "use e.g. 1e-3",
            ));
        }
        for (k, v, use_) in [("beta1", o.beta1, "0.9"), ("beta2", o.beta2, "0.95")] {
            if !(0.0..1.0).contains(&v) {
                return Err(ConfigError::new(
                    &format!("optim.{k}"),
                    format!("must be in [0, 1), got {v}"),
                    format!("use {use_}"),
                ));
            }
        }
        for (k, v) in [("eps", o.eps), ("grad_clip", o.grad_clip)] {
            let ok = if k == "eps" { v > 0.0 } else { v >= 0.0 }; // false on NaN too
            if !(ok && v.is_finite()) {
                return Err(ConfigError::new(
                    &format!("optim.{k}"),
                    format!(
                        "must be a finite number {} 0, got {v}",
                        if k == "eps" { ">" } else { "≥" }
                    ),
                    if k == "eps" {
                        "use 1e-8"
                    } else {
                        "use 1.0 (0: no clipping)"
                    },
                ));
            }
        }
        if !(o.weight_decay.is_finite() && o.weight_decay >= 0.0) {
            return Err(ConfigError::new(
                "optim.weight_decay",
                format!("must be a finite number ≥ 0, got {}", o.weight_decay),
                "use 0.1 (or ~1e-4 with optim.decoupled_wd = true)",
            ));
        }
        if !(self.train.z_loss.is_finite() && self.train.z_loss >= 0.0) {
            return Err(ConfigError::new(
                "train.z_loss",
                format!("must be a finite number ≥ 0, got {}", self.train.z_loss),
                "use 1e-4 (PaLM), or 0 for none",
            ));
        }
        let s = &self.schedule;
        for (k, v, use_) in [
            ("min_lr_ratio", s.min_lr_ratio, "0.1"),
            ("decay_fraction", s.decay_fraction, "0.2"),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return Err(ConfigError::new(
                    &format!("schedule.{k}"),
                    format!("must be in [0, 1], got {v}"),
                    format!("use e.g. {use_}"),
                ));
            }
        }
        if !(0.0..0.9).contains(&self.data.val_fraction) {
            return Err(ConfigError::new(
                "data.val_fraction",
                format!("must be in [0, 0.9), got {}", self.data.val_fraction),
                "use e.g. 0.05",
            ));
        }
        if !["auto", "text", "jsonl", "parquet", "shard"].contains(&self.data.format.as_str()) {
            return Err(ConfigError::new(
                "data.format",
                format!("unknown format '{}'", self.data.format),
                "use auto, text, jsonl, parquet or shard",
            ));
        }
        if self.checkpoint.keep == 0 {
            return Err(ConfigError::new(
                "checkpoint.keep",
                "must be at least 1",
                "set checkpoint.keep = 3",
            ));
        }
        crate::init::plan(&mc, &crate::model::ParamLayout::new(&mc), &self.init)?;
        Ok(())
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("RunConfig serialises")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_overrides_and_round_trips() {
        let c = RunConfig::load(
            None,
            &[
                "model.preset=micro".into(),
                "optim.lr=3e-4".into(),
                "train.steps=7".into(),
            ],
        )
        .unwrap();
        assert_eq!(c.model.preset.as_deref(), Some("micro"));
        assert_eq!(c.optim.lr, 3e-4);
        assert_eq!(c.train.steps, 7);
        let back: RunConfig = toml::from_str(&c.to_toml()).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn unknown_key_is_named() {
        let e = RunConfig::load(None, &["optim.learning_rate=1".into()]).unwrap_err();
        assert_eq!(e.field, "optim.learning_rate", "{e}");
        let e = RunConfig::load(None, &["train.steps=\"x\"".into()]).unwrap_err();
        assert_eq!(e.field, "train.steps", "{e}");
    }

    #[test]
    fn bad_shapes_are_refused_with_field() {
        let e = RunConfig::load(
            None,
            &["model.preset=micro".into(), "model.num_heads=3".into()],
        )
        .unwrap_err();
        assert_eq!(e.field, "model.num_heads");
        let e = RunConfig::load(
            None,
            &["model.preset=micro".into(), "model.num_kv_heads=3".into()],
        )
        .unwrap_err();
        assert_eq!(e.field, "model.num_kv_heads");
        let e = RunConfig::load(
            None,
            &[
                "model.preset=micro".into(),
                "model.vocab_size=1000000000000".into(),
            ],
        )
        .unwrap_err();
        assert_eq!(e.field, "model.vocab_size");
        let e = RunConfig::load(
            None,
            &["model.preset=micro".into(), "model.hidden_size=0".into()],
        )
        .unwrap_err();
        assert_eq!(e.field, "model.hidden_size");
        let e = RunConfig::load(None, &["model.preset=nope".into()]).unwrap_err();
        assert_eq!(e.field, "model.preset");
        // each key is named as itself, not as its neighbour
        for (set, field) in [
            ("optim.beta2=1.5", "optim.beta2"),
            ("optim.beta1=-0.1", "optim.beta1"),
            ("schedule.decay_fraction=2.0", "schedule.decay_fraction"),
            ("schedule.min_lr_ratio=-1.0", "schedule.min_lr_ratio"),
            ("optim.eps=0.0", "optim.eps"),
        ] {
            let e = RunConfig::load(None, &[set.into()]).unwrap_err();
            assert_eq!(e.field, field, "{set}: {e}");
        }
    }
}
