//! `keel sweep`: learning rate × init × depth/width grids on small proxies, each trial an
//! ordinary run directory trained by its own `keel train` process; results, LR sensitivity
//! (Wortsman et al. 2023), stability maps and a recommendation.
//!
//! A trial counts as **diverged** when a training loss is non-finite, or when the loss stays
//! above the first step's loss for `train::DIVERGED_AFTER` (10) consecutive steps after
//! warm-up: trials run with `train.stop_if_diverged = true`, so they stop there (exit 2) and
//! record the step in `events.jsonl`.

pub mod analysis;
pub mod collect;
pub mod optimum;
pub mod output;
pub mod plot;
pub mod run;

use crate::config::set_path;
use crate::config::RunConfig;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The `[sweep]` section of sweep.toml.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SweepSettings {
    /// What trials are compared by: `val_loss` (the final validation loss) or `train_loss`
    /// (mean training loss of the last 10 steps).
    pub metric: String,
    /// The learning-rate axis key.
    pub lr_key: String,
    /// An LR is inside the recommended window when its loss is within this fraction of the
    /// best loss of its group (0.03 = 3 %).
    pub window: f64,
    /// Width to extrapolate the trends to (like `--target`).
    pub target_width: Option<usize>,
    /// Depth to extrapolate to.
    pub target_depth: Option<usize>,
}

impl Default for SweepSettings {
    fn default() -> Self {
        SweepSettings {
            metric: "val_loss".into(),
            lr_key: "optim.lr".into(),
            window: 0.03,
            target_width: None,
            target_depth: None,
        }
    }
}

/// `[trial]` of sweep.toml: each trial runs this command (the user's own training script)
/// instead of `keel train`, and reports through a metrics log in its directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrialCommand {
    /// The argv, with `{axis.key}` for each axis's value, `{dir}` (the trial's directory,
    /// absolute), `{id}` and `{steps}`; also exported as KEEL_TRIAL_DIR, KEEL_TRIAL_ID,
    /// KEEL_TRIAL_STEPS and KEEL_AXIS_<KEY> (e.g. KEEL_AXIS_OPTIM_LR).
    pub command: Vec<String>,
    /// Steps each trial runs: a trial whose log reaches this step has finished.
    pub steps: u64,
    /// The trial's metrics log, relative to its directory: keel's run format (the Python
    /// package's `log_dir=`), or any log keel watch reads (JSON lines, CSV, text, a
    /// TensorBoard directory).
    #[serde(default = "default_metrics")]
    pub metrics: String,
    /// Field names in that log, NAME=FIELD as `keel watch --field` (e.g. "loss=train/loss").
    #[serde(default)]
    pub fields: Vec<String>,
    /// Stop a trial whose log shows a divergence (the guard's detectors), and give its slot
    /// to the next trial.
    #[serde(default = "yes")]
    pub stop_diverged: bool,
    /// Also stop a trial on the early attention warning (max attention logit past
    /// guard.attn_logit_max after guard.early_window steps).
    #[serde(default)]
    pub stop_on_attn_warning: bool,
    /// Seconds between SIGTERM and SIGKILL when a trial is stopped.
    #[serde(default = "grace")]
    pub grace_s: f64,
    /// Extra environment variables for every trial.
    #[serde(default)]
    pub env: std::collections::BTreeMap<String, String>,
}

fn default_metrics() -> String {
    "metrics.jsonl".into()
}
fn yes() -> bool {
    true
}
fn grace() -> f64 {
    10.0
}

/// The environment-variable name of an axis: KEEL_AXIS_OPTIM_LR for optim.lr.
pub fn axis_env(key: &str) -> String {
    let k: String = key
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    format!("KEEL_AXIS_{k}")
}

/// `{name}` placeholders of one argument.
fn placeholders(arg: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = arg;
    while let Some(i) = rest.find('{') {
        let Some(j) = rest[i..].find('}') else { break };
        out.push(rest[i + 1..i + j].to_string());
        rest = &rest[i + j + 1..];
    }
    out
}

impl TrialCommand {
    /// The argv and environment of one trial.
    pub fn resolve(&self, t: &Trial, dir: &Path) -> (Vec<String>, Vec<(String, String)>) {
        let dir_s = dir.display().to_string();
        let value = |name: &str| -> Option<String> {
            match name {
                "dir" => Some(dir_s.clone()),
                "id" => Some(t.id.clone()),
                "steps" => Some(self.steps.to_string()),
                k => t
                    .assign
                    .iter()
                    .find(|(a, _)| a == k)
                    .map(|(_, v)| show_arg(v)),
            }
        };
        let argv = self
            .command
            .iter()
            .map(|a| {
                let mut s = a.clone();
                for p in placeholders(a) {
                    if let Some(v) = value(&p) {
                        s = s.replace(&format!("{{{p}}}"), &v);
                    }
                }
                s
            })
            .collect();
        let mut env: Vec<(String, String)> = self
            .env
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        env.push(("KEEL_TRIAL_DIR".into(), dir_s.clone()));
        env.push(("KEEL_TRIAL_ID".into(), t.id.clone()));
        env.push(("KEEL_TRIAL_STEPS".into(), self.steps.to_string()));
        for (k, v) in &t.assign {
            env.push((axis_env(k), show_arg(v)));
        }
        (argv, env)
    }
}

/// An axis value on a command line: full precision (3e-4 as 0.0003), strings bare.
fn show_arg(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => s.clone(),
        toml::Value::Float(f) => format!("{f}"),
        other => other.to_string(),
    }
}

/// One axis: a run-config key and its values.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Axis {
    pub key: String,
    pub values: Vec<toml::Value>,
}

/// A parsed sweep.toml.
#[derive(Debug, Clone)]
pub struct SweepSpec {
    pub base: toml::Table,
    pub axes: Vec<Axis>,
    pub settings: SweepSettings,
    /// Command trials (`[trial]`) instead of keel trials.
    pub command: Option<TrialCommand>,
    /// What is allowed but probably a mistake (an axis no placeholder uses).
    pub warnings: Vec<String>,
}

/// One trial: its id (the directory name under `trials/`) and axis values.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Trial {
    pub id: String,
    pub assign: Vec<(String, toml::Value)>,
}

/// What `sweep.json` holds: enough to collect results without the original sweep.toml.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub axes: Vec<Axis>,
    pub settings: SweepSettings,
    pub trials: Vec<Trial>,
    /// Steps each trial is planned for.
    pub steps: u64,
    /// The base's init scheme (the scheme of every trial when init is not an axis).
    #[serde(default)]
    pub base_scheme: String,
    /// The `[base]` table as TOML text: resuming with a changed base is refused.
    #[serde(default)]
    pub base: String,
    /// Command trials: what each trial runs (None: `keel train`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<TrialCommand>,
}

fn err(file: &Path, field: &str, what: impl std::fmt::Display, fix: &str) -> anyhow::Error {
    anyhow::anyhow!("{}: {field}: {what}; fix: {fix}", file.display())
}

/// Three significant digits: log-spaced values print as 3.16e-4, not 0.00031622776601683794.
fn round_sig(v: f64) -> f64 {
    if v == 0.0 || !v.is_finite() {
        return v;
    }
    let e = v.abs().log10().floor();
    let f = 10f64.powf(2.0 - e);
    (v * f).round() / f
}

/// Most values one `{ log/linear, points }` axis may have.
const MAX_AXIS_POINTS: i64 = 1000;
/// Most trials one sweep may have.
const MAX_TRIALS: usize = 10_000;

fn axis_values(file: &Path, key: &str, v: &toml::Value) -> Result<Vec<toml::Value>> {
    let fix = "write a list, e.g. [1e-4, 3e-4], or { log = [1e-4, 1e-1], points = 7 }";
    match v {
        toml::Value::Array(a) if !a.is_empty() => Ok(a.clone()),
        toml::Value::Array(_) => Err(err(file, &format!("axes.\"{key}\""), "is empty", fix)),
        toml::Value::Table(t) => {
            let range = t
                .get("log")
                .map(|r| (true, r))
                .or_else(|| t.get("linear").map(|r| (false, r)));
            let Some((log, range)) = range else {
                return Err(err(
                    file,
                    &format!("axes.\"{key}\""),
                    "a table needs `log` or `linear`",
                    fix,
                ));
            };
            let nums: Vec<f64> = range
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|x| x.as_float().or(x.as_integer().map(|i| i as f64)))
                        .collect()
                })
                .unwrap_or_default();
            // `points = 1e11` is a TOML float: read a whole float as the count it means
            let points = t
                .get("points")
                .and_then(|p| {
                    p.as_integer().or(p
                        .as_float()
                        .filter(|f| f.fract() == 0.0 && f.abs() < 9e18)
                        .map(|f| f as i64))
                })
                .unwrap_or(0);
            if nums.len() != 2 || points < 2 || (log && (nums[0] <= 0.0 || nums[1] <= 0.0)) {
                return Err(err(
                    file,
                    &format!("axes.\"{key}\""),
                    "needs two (positive, for log) bounds and points ≥ 2",
                    fix,
                ));
            }
            if points > MAX_AXIS_POINTS {
                return Err(err(
                    file,
                    &format!("axes.\"{key}\".points"),
                    format!("{points} points: each is a training run (at most {MAX_AXIS_POINTS})"),
                    "use a coarser grid, e.g. points = 7",
                ));
            }
            let n = points as usize;
            Ok((0..n)
                .map(|i| {
                    let u = i as f64 / (n - 1) as f64;
                    let x = if log {
                        (nums[0].ln() + u * (nums[1].ln() - nums[0].ln())).exp()
                    } else {
                        nums[0] + u * (nums[1] - nums[0])
                    };
                    toml::Value::Float(round_sig(x))
                })
                .collect())
        }
        other => Err(err(
            file,
            &format!("axes.\"{key}\""),
            format!("is a {}", other.type_str()),
            fix,
        )),
    }
}

impl SweepSpec {
    pub fn load(path: &Path) -> Result<SweepSpec> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("{}: cannot read the sweep file", path.display()))?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<SweepSpec> {
        let mut doc: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            err(path, "(syntax)", e.message(), "fix the TOML syntax")
        })?;
        let base = match doc.remove("base") {
            Some(toml::Value::Table(t)) => t,
            None => toml::Table::new(),
            Some(_) => {
                return Err(err(
                    path,
                    "base",
                    "is not a table",
                    "write [base] with run-config keys",
                ))
            }
        };
        let axes_t =
            match doc.remove("axes") {
                Some(toml::Value::Table(t)) => t,
                _ => return Err(err(
                    path,
                    "axes",
                    "missing",
                    "add [axes] with at least the learning rate: \"optim.lr\" = [1e-3, 3e-3, 1e-2]",
                )),
            };
        let command: Option<TrialCommand> = match doc.remove("trial") {
            Some(v) => Some(v.try_into().map_err(|e: toml::de::Error| {
                err(
                    path,
                    "trial",
                    e.message(),
                    "keys: command (an argv list), steps, metrics, fields, stop_diverged, stop_on_attn_warning, grace_s, env",
                )
            })?),
            None => None,
        };
        let settings: SweepSettings = match doc.remove("sweep") {
            Some(v) => v.try_into().map_err(|e: toml::de::Error| {
                err(
                    path,
                    "sweep",
                    e.message(),
                    "keys: metric, lr_key, window, target_width, target_depth",
                )
            })?,
            None => SweepSettings::default(),
        };
        if let Some(k) = doc.keys().next() {
            return Err(err(
                path,
                k,
                "unknown section",
                "use [base], [axes], [sweep] and [trial]",
            ));
        }
        if !matches!(settings.metric.as_str(), "val_loss" | "train_loss") {
            return Err(err(
                path,
                "sweep.metric",
                format!("'{}'", settings.metric),
                "use val_loss or train_loss",
            ));
        }
        if !(settings.window > 0.0 && settings.window < 1.0) {
            return Err(err(
                path,
                "sweep.window",
                settings.window,
                "use a fraction such as 0.03",
            ));
        }
        let mut axes = Vec::new();
        // dotted keys ("optim.lr" quoted, or optim.lr bare → nested tables) both mean one key
        fn flatten(prefix: &str, t: &toml::Table, out: &mut Vec<(String, toml::Value)>) {
            for (k, v) in t {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                match v {
                    toml::Value::Table(inner)
                        if !inner.contains_key("log") && !inner.contains_key("linear") =>
                    {
                        flatten(&key, inner, out)
                    }
                    _ => out.push((key, v.clone())),
                }
            }
        }
        let mut flat = Vec::new();
        flatten("", &axes_t, &mut flat);
        for (key, v) in flat {
            if axes.iter().any(|a: &Axis| a.key == key) {
                return Err(err(
                    path,
                    &format!("axes.\"{key}\""),
                    "given twice",
                    "keep one",
                ));
            }
            if !key.contains('.') && command.is_none() {
                return Err(err(
                    path,
                    &format!("axes.\"{key}\""),
                    "not a section.key",
                    "write e.g. \"optim.lr\"",
                ));
            }
            axes.push(Axis {
                values: axis_values(path, &key, &v)?,
                key,
            });
        }
        if !axes.iter().any(|a| a.key == settings.lr_key) {
            return Err(err(
                path,
                "axes",
                format!("no learning-rate axis \"{}\"", settings.lr_key),
                "add \"optim.lr\" = { log = [1e-4, 1e-1], points = 7 }",
            ));
        }
        for a in &axes {
            if a.key == settings.lr_key && a.values.iter().any(|v| num(v).is_none_or(|x| x <= 0.0))
            {
                return Err(err(
                    path,
                    &format!("axes.\"{}\"", a.key),
                    "LRs must be positive numbers",
                    "e.g. [1e-3, 3e-3]",
                ));
            }
        }
        // every combination is a training run: refuse a grid no machine will finish before
        // expanding it (two 10,000-point axes once allocated 3.6 GB of trial plans)
        let total = axes.iter().fold(1f64, |n, a| n * a.values.len() as f64);
        if total > MAX_TRIALS as f64 {
            let sizes: Vec<String> = axes
                .iter()
                .map(|a| format!("{} × {}", a.key, a.values.len()))
                .collect();
            return Err(err(
                path,
                "axes",
                format!(
                    "{total:.0} trials ({}), each a training run (at most {MAX_TRIALS})",
                    sizes.join(", ")
                ),
                "sweep fewer values per axis",
            ));
        }
        let mut warnings = Vec::new();
        if let Some(c) = &command {
            if c.command.is_empty() || c.command[0].trim().is_empty() {
                return Err(err(
                    path,
                    "trial.command",
                    "is empty",
                    "give the argv, e.g. [\"python\", \"train.py\", \"--lr\", \"{optim.lr}\", \"--out\", \"{dir}\"]",
                ));
            }
            if c.steps == 0 {
                return Err(err(
                    path,
                    "trial.steps",
                    "missing or 0",
                    "give the steps each trial runs (a trial whose log reaches them has finished)",
                ));
            }
            if !base.is_empty() {
                return Err(err(
                    path,
                    "base",
                    "sets keel train's config, but [trial] runs a command",
                    "pass settings on the command line (or drop [trial] to sweep keel train)",
                ));
            }
            if !(c.grace_s >= 0.0 && c.grace_s.is_finite()) {
                return Err(err(
                    path,
                    "trial.grace_s",
                    c.grace_s,
                    "use seconds ≥ 0, e.g. 10",
                ));
            }
            let mut used = Vec::new();
            for (i, a) in c.command.iter().enumerate() {
                for p in placeholders(a) {
                    let known = matches!(p.as_str(), "dir" | "id" | "steps")
                        || axes.iter().any(|x: &Axis| x.key == p);
                    if !known {
                        let names: Vec<String> =
                            axes.iter().map(|x| format!("{{{}}}", x.key)).collect();
                        return Err(err(
                            path,
                            &format!("trial.command[{i}]"),
                            format!("placeholder {{{p}}} names no axis"),
                            &format!(
                                "use one of {}, {{dir}}, {{id}}, {{steps}}",
                                names.join(", ")
                            ),
                        ));
                    }
                    used.push(p);
                }
            }
            for a in &axes {
                if !used.contains(&a.key) {
                    warnings.push(format!(
                        "{}: axis \"{}\" is in no placeholder of trial.command: the trials differ only by the environment variable {} (add {{{}}} to the command if the script takes it as an argument)",
                        path.display(),
                        a.key,
                        axis_env(&a.key),
                        a.key
                    ));
                }
            }
            if Path::new(&c.metrics).is_absolute() {
                // an absolute metrics path would be shared by every trial
                return Err(err(
                    path,
                    "trial.metrics",
                    "an absolute path: every trial would write the same log",
                    "give a path relative to the trial's directory ({dir})",
                ));
            }
        }
        // the LR axis last: trials of one group run next to each other
        axes.sort_by_key(|a| a.key == settings.lr_key);
        Ok(SweepSpec {
            base,
            axes,
            settings,
            command,
            warnings,
        })
    }

    /// Every combination, in axis order.
    pub fn trials(&self) -> Vec<Trial> {
        let mut out: Vec<Vec<(String, toml::Value)>> = vec![vec![]];
        for a in &self.axes {
            let mut next = Vec::new();
            for partial in &out {
                for v in &a.values {
                    let mut p = partial.clone();
                    p.push((a.key.clone(), v.clone()));
                    next.push(p);
                }
            }
            out = next;
        }
        out.into_iter()
            .enumerate()
            .map(|(i, assign)| Trial {
                id: trial_id(i, &assign),
                assign,
            })
            .collect()
    }

    /// The run configuration of one trial: the base, the sweep's trial defaults (unless the
    /// base sets them), the shared data, then the trial's axis values.
    pub fn trial_table(&self, t: &Trial, data: Option<&SharedData>) -> Result<toml::Table> {
        let mut table = self.base.clone();
        let has = |table: &toml::Table, key: &str| {
            let mut cur = table;
            let parts: Vec<&str> = key.split('.').collect();
            for (i, p) in parts.iter().enumerate() {
                match cur.get(*p) {
                    Some(toml::Value::Table(t)) if i + 1 < parts.len() => cur = t,
                    Some(_) if i + 1 == parts.len() => return true,
                    _ => return false,
                }
            }
            false
        };
        let set = |table: &mut toml::Table, k: &str, v: toml::Value| {
            set_path(table, k, v).map_err(|e| anyhow::anyhow!("{e}"))
        };
        // unguarded: the sweep measures how training behaves, not how the guard rescues it
        for (k, v) in [
            ("guard.enabled", toml::Value::Boolean(false)),
            ("train.stop_if_diverged", toml::Value::Boolean(true)),
            ("checkpoint.keep", toml::Value::Integer(1)),
            ("train.report", toml::Value::Boolean(false)),
        ] {
            if !has(&table, k) {
                set(&mut table, k, v)?;
            }
        }
        if let Some(d) = data {
            set(
                &mut table,
                "data.path",
                toml::Value::String(d.tokens.display().to_string()),
            )?;
            set(
                &mut table,
                "data.format",
                toml::Value::String("shard".into()),
            )?;
            set(
                &mut table,
                "data.tokenizer",
                toml::Value::String(d.tokenizer.display().to_string()),
            )?;
        }
        for (k, v) in &t.assign {
            set(&mut table, k, v.clone())?;
        }
        // a seed axis is a whole seed: the init's too, unless the sweep sets init.seed
        if let Some((_, seed)) = t.assign.iter().find(|(k, _)| k == "train.seed") {
            if !has(&self.base, "init.seed") && !t.assign.iter().any(|(k, _)| k == "init.seed") {
                set(&mut table, "init.seed", seed.clone())?;
            }
        }
        // a width axis scales the MLP with it unless the sweep fixes intermediate_size
        let width_axis = t.assign.iter().find(|(k, _)| k == "model.hidden_size");
        if let Some((_, w)) = width_axis {
            if !has(&self.base, "model.intermediate_size")
                && !t.assign.iter().any(|(k, _)| k == "model.intermediate_size")
            {
                let base_cfg = RunConfig::from_table(self.base.clone())
                    .map_err(|e| anyhow::anyhow!("[base]: {e}"))?;
                let mut plain = base_cfg.clone();
                plain.init = Default::default();
                let mc = plain
                    .model_config()
                    .map_err(|e| anyhow::anyhow!("[base]: {e}"))?;
                if let Some(w) = num(w) {
                    let ratio = mc.intermediate_size as f64 / mc.hidden_size as f64;
                    let inter = ((ratio * w / 4.0).round() * 4.0).max(4.0) as i64;
                    set(
                        &mut table,
                        "model.intermediate_size",
                        toml::Value::Integer(inter),
                    )?;
                }
            }
        }
        Ok(table)
    }
}

/// A number from a TOML value (integer or float).
pub fn num(v: &toml::Value) -> Option<f64> {
    v.as_float().or(v.as_integer().map(|i| i as f64))
}

/// Short display of an axis value: 3e-4, xavier-normal, 4.
pub fn show(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => s.clone(),
        toml::Value::Float(f) => {
            let s = format!("{f:e}");
            let plain = format!("{f}");
            if plain.len() <= s.len() {
                plain
            } else {
                s
            }
        }
        other => other.to_string(),
    }
}

/// A number as axis values print: 3e-4, 0.01.
pub fn show_num(x: f64) -> String {
    show(&toml::Value::Float(x))
}

/// Short name of an axis key: lr, L (layers), d (width), seed, or the key's last part.
pub fn short_key(key: &str) -> String {
    match key {
        "optim.lr" => "lr".into(),
        "model.num_layers" => "L".into(),
        "model.hidden_size" => "d".into(),
        "train.seed" => "seed".into(),
        "init.scheme" => "init".into(),
        k => k.rsplit('.').next().unwrap_or(k).to_string(),
    }
}

fn trial_id(i: usize, assign: &[(String, toml::Value)]) -> String {
    let mut id = format!("{i:03}");
    for (k, v) in assign {
        let val: String = show(v)
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        if k == "init.scheme" {
            id.push_str(&format!("-{val}"));
        } else {
            id.push_str(&format!("-{}{val}", short_key(k)));
        }
    }
    id
}

/// Tokens prepared once for all trials (instead of a tokenizer per trial).
pub struct SharedData {
    pub tokens: PathBuf,
    pub tokenizer: PathBuf,
}

/// Tokenise the base data once into `dir/data/` when every trial reads the same text with
/// the same vocabulary; `None` when the base data is already a shard or the vocabulary varies.
pub fn shared_data(spec: &SweepSpec, dir: &Path, progress: bool) -> Result<Option<SharedData>> {
    if spec.axes.iter().any(|a| {
        a.key.starts_with("data.")
            || a.key == "model.vocab_size"
            || a.key == "model.preset"
            || a.key == "model.hf_config"
    }) {
        return Ok(None);
    }
    let cfg =
        RunConfig::from_table(spec.base.clone()).map_err(|e| anyhow::anyhow!("[base]: {e}"))?;
    if !cfg.data.path.is_empty() {
        let fmt = crate::data::source::detect_format(Path::new(&cfg.data.path), &cfg.data.format)?;
        if fmt == crate::data::source::Format::Shard {
            return Ok(None);
        }
    }
    crate::train::prepare_data(&cfg, dir, progress)?;
    let abs = |p: PathBuf| std::fs::canonicalize(&p).unwrap_or(p);
    Ok(Some(SharedData {
        tokens: abs(dir.join("data").join("tokens.bin")),
        tokenizer: abs(dir.join("tokenizer.json")),
    }))
}

/// Build the plan and every trial's run config (validated now, so a bad axis value fails
/// before anything runs); writes `sweep.json` and `trials/<id>/trial.toml`. A directory
/// holding a different sweep is refused.
pub fn prepare(spec: &SweepSpec, dir: &Path, progress: bool) -> Result<Plan> {
    std::fs::create_dir_all(dir.join("trials"))
        .with_context(|| format!("{}: cannot create the sweep directory", dir.display()))?;
    let trials = spec.trials();
    let (steps, base_scheme) = match &spec.command {
        Some(c) => (c.steps, String::new()),
        None => {
            let base_cfg = RunConfig::from_table(spec.base.clone())
                .map_err(|e| anyhow::anyhow!("[base]: {e}"))?;
            (base_cfg.train.steps, base_cfg.init.scheme.clone())
        }
    };
    let plan = Plan {
        axes: spec.axes.clone(),
        settings: spec.settings.clone(),
        trials: trials.clone(),
        steps,
        base_scheme,
        base: spec.base.to_string(),
        command: spec.command.clone(),
    };
    let plan_path = dir.join("sweep.json");
    if plan_path.exists() {
        let old: Plan = serde_json::from_str(&std::fs::read_to_string(&plan_path)?)
            .with_context(|| format!("{}: not a keel sweep plan", plan_path.display()))?;
        if old.trials != plan.trials
            || old.steps != plan.steps
            || old.base != plan.base
            || old.command.as_ref().map(|c| &c.command) != plan.command.as_ref().map(|c| &c.command)
        {
            bail!(
                "{}: this directory holds a different sweep ({} trials, or another [base] or trial command); fix: resume it with its own sweep.toml, or pick a new --out",
                dir.display(),
                old.trials.len()
            );
        }
    }
    if let Some(c) = &spec.command {
        let exe = &c.command[0];
        if find_program(exe).is_none() {
            bail!(
                "trial.command[0]: {exe:?} is not found{}; fix: give the program's path or install it",
                if exe.contains('/') { "" } else { " on PATH" }
            );
        }
        let root = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
        for t in &trials {
            let tdir = root.join("trials").join(&t.id);
            std::fs::create_dir_all(&tdir).with_context(|| {
                format!(
                    "trial {}: {}: cannot create its directory",
                    t.id,
                    tdir.display()
                )
            })?;
            let (argv, env) = c.resolve(t, &tdir);
            // what the trial runs, as a script (the --emit commands run it)
            let cwd = std::env::current_dir().unwrap_or_default();
            let mut sh = format!(
                "#!/bin/sh\n# keel sweep trial {}\ncd {}\n",
                t.id,
                shell_quote(&cwd.display().to_string())
            );
            for (k, v) in &env {
                sh += &format!("export {k}={}\n", shell_quote(v));
            }
            sh += &format!(
                "exec {}\n",
                argv.iter()
                    .map(|a| shell_quote(a))
                    .collect::<Vec<_>>()
                    .join(" ")
            );
            crate::checkpoint::write_atomic(&tdir.join("run.sh"), sh.as_bytes())
                .with_context(|| format!("trial {}: {} is not writable", t.id, tdir.display()))?;
        }
    } else {
        let data = shared_data(spec, dir, progress)?;
        for t in &trials {
            let table = spec.trial_table(t, data.as_ref())?;
            let cfg = RunConfig::from_table(table.clone())
                .and_then(|c| c.validate().map(|_| c))
                .map_err(|e| anyhow::anyhow!("trial {}: {e}", t.id))?;
            let tdir = dir.join("trials").join(&t.id);
            std::fs::create_dir_all(&tdir)
                .with_context(|| format!("{}: cannot create", tdir.display()))?;
            crate::checkpoint::write_atomic(&tdir.join("trial.toml"), cfg.to_toml().as_bytes())?;
        }
    }
    crate::checkpoint::write_atomic(&plan_path, serde_json::to_string_pretty(&plan)?.as_bytes())?;
    Ok(plan)
}

/// A program as the shell would find it: a path, or a name on PATH.
pub fn find_program(exe: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let runnable = |p: &Path| {
        p.is_file() && std::fs::metadata(p).is_ok_and(|m| m.permissions().mode() & 0o111 != 0)
    };
    if exe.contains('/') {
        let p = PathBuf::from(exe);
        return runnable(&p).then_some(p);
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(exe))
            .find(|p| runnable(p))
    })
}

/// A word for sh: quoted unless it is plainly safe.
pub fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(text: &str) -> Result<SweepSpec> {
        SweepSpec::parse(text, Path::new("sweep.toml"))
    }

    #[test]
    fn log_axis_and_product() {
        let s = spec(
            r#"
[base]
model.preset = "micro"
[axes]
"optim.lr" = { log = [1e-4, 1e-1], points = 4 }
"init.scheme" = ["normal", "xavier-normal"]
"#,
        )
        .unwrap();
        let lrs: Vec<f64> = s
            .axes
            .last()
            .unwrap()
            .values
            .iter()
            .filter_map(num)
            .collect();
        assert_eq!(lrs, vec![1e-4, 1e-3, 1e-2, 1e-1]);
        let t = s.trials();
        assert_eq!(t.len(), 8);
        assert_eq!(t[0].id, "000-normal-lr1e-4");
        assert_eq!(t[7].id, "007-xavier-normal-lr0.1");
        let table = s.trial_table(&t[5], None).unwrap();
        let cfg = RunConfig::from_table(table).unwrap();
        assert_eq!(
            (cfg.optim.lr, cfg.init.scheme.as_str()),
            (1e-3, "xavier-normal")
        );
        assert!(cfg.train.stop_if_diverged && !cfg.guard.enabled);
    }

    #[test]
    fn seed_axis_seeds_the_init_too() {
        let s = spec("[base]\nmodel.preset = \"micro\"\n[axes]\n\"optim.lr\" = [1e-3]\n\"train.seed\" = [0, 3]\n").unwrap();
        let t = s.trial_table(&s.trials()[1], None).unwrap();
        let rc = RunConfig::from_table(t).unwrap();
        assert_eq!((rc.train.seed, rc.init.seed), (3, 3));
        let s = spec("[base]\nmodel.preset = \"micro\"\ninit.seed = 7\n[axes]\n\"optim.lr\" = [1e-3]\n\"train.seed\" = [0, 3]\n").unwrap();
        let rc = RunConfig::from_table(s.trial_table(&s.trials()[1], None).unwrap()).unwrap();
        assert_eq!((rc.train.seed, rc.init.seed), (3, 7));
    }

    #[test]
    fn width_axis_scales_the_mlp() {
        let s = spec(
            "[base]\nmodel.preset = \"tiny\"\n[axes]\n\"optim.lr\" = [1e-3]\n\"model.hidden_size\" = [128, 512]\n",
        )
        .unwrap();
        let t = s.trials();
        let c: Vec<usize> = t
            .iter()
            .map(|t| {
                let cfg = RunConfig::from_table(s.trial_table(t, None).unwrap()).unwrap();
                cfg.model_config().unwrap().intermediate_size
            })
            .collect();
        assert_eq!(c, vec![344, 1376]);
    }

    #[test]
    fn bad_specs_name_the_field() {
        let e = spec("[axes]\n\"init.scheme\" = [\"normal\"]\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("optim.lr"), "{e}");
        let e = spec("[axes]\n\"optim.lr\" = []\n").unwrap_err().to_string();
        assert!(
            e.contains("axes.\"optim.lr\"") && e.contains("empty"),
            "{e}"
        );
        let e = spec("[axes]\n\"optim.lr\" = [1e-3]\n[sweep]\nmetric = \"acc\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("sweep.metric"), "{e}");
        let e = spec("[axes]\n\"optim.lr\" = [-1.0]\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("positive"), "{e}");
        // grids no machine finishes are refused before they are expanded
        let e = spec("[axes]\n\"optim.lr\" = { log = [1e-4, 1e-1], points = 1e11 }\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("axes.\"optim.lr\".points"), "{e}");
        let e = spec("[axes]\n\"optim.lr\" = { log = [1e-4, 1e-1], points = 1000 }\n\"init.std\" = { log = [1e-3, 1e-1], points = 1000 }\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("1000000 trials"), "{e}");
    }
}
