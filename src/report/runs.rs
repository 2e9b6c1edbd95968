//! A run's logs as the report draws them, from a keel run directory (`keel train`, or the
//! Python package's run logger: metrics.jsonl, events.jsonl, telemetry.jsonl, config.toml)
//! or a TensorBoard log directory (torch's SummaryWriter, Lightning, the HF Trainer,
//! torchtitan, keel's own mirror), whose tags are mapped to keel's field names.

use crate::tensorboard::{event_files, EventReader};
use crate::train::read_jsonl;
use crate::watch::parse::{Format, LineParser, Record};
use anyhow::{bail, Context, Result};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub struct RunData {
    pub dir: PathBuf,
    pub metrics: Vec<Value>,
    pub events: Vec<Value>,
    pub telemetry: Vec<Value>,
    pub cfg_text: String,
    pub cfg: Option<crate::config::RunConfig>,
    /// Where the numbers came from, for the page ("metrics.jsonl", "TensorBoard: ...").
    pub source: String,
    /// Notes on what was not read (corrupt records, a torn end).
    pub notes: Vec<String>,
}

/// keel's field → the tags other writers use for it, in order of preference.
const TAGS: &[(&str, &[&str])] = &[
    (
        "loss",
        &[
            "train/loss",
            "loss",
            "train_loss",
            "train_loss_step",
            "train/loss_step",
            "lm loss",
            "train/lm_loss",
            "loss/train",
            "training_loss",
            "loss_metrics/global_avg_loss",
        ],
    ),
    (
        "grad_norm",
        &[
            "train/grad_norm",
            "grad_norm",
            "grad-norm",
            "grad norm",
            "gnorm",
            "optim/total_grad_norm",
        ],
    ),
    (
        "lr",
        &[
            "train/lr",
            "train/learning_rate",
            "lr",
            "learning_rate",
            "lr-AdamW",
            "lr-Adam",
            "lr_scheduler/lr",
        ],
    ),
    (
        "val_loss",
        &[
            "val/loss",
            "eval/loss",
            "val_loss",
            "validation/loss",
            "loss/val",
            "eval_loss",
            "val/lm_loss",
        ],
    ),
    (
        "max_attn_logit",
        &[
            "train/max_attn_logit",
            "max_attn_logit",
            "keel/max_attn_logit",
            "train/keel/max_attn_logit",
        ],
    ),
    (
        "logit_z",
        &[
            "train/logit_z",
            "logit_z",
            "keel/logit_z",
            "train/keel/logit_z",
        ],
    ),
    (
        "update_ratio",
        &[
            "train/update_ratio",
            "update_ratio",
            "keel/update_ratio_max",
            "train/keel/update_ratio_max",
        ],
    ),
    ("tokens_per_s", &["perf/tokens_per_s", "tokens_per_s"]),
    ("elapsed_s", &["elapsed_s"]),
    ("tokens", &["tokens"]),
];

/// Tags under keel/ that are signals, not events.
const KEEL_SIGNALS: &[&str] = &[
    "skipped",
    "skipped_steps",
    "max_attn_logit",
    "logit_z",
    "update_ratio_max",
    "lr_factor",
    "rollbacks",
];

/// A log file's records as `keel watch` parses them (JSON lines, CSV, a text log, HF
/// trainer_state.json), and a CSV's header. A torn last line of a job being written (or
/// killed) is left out, not an error.
fn read_records(path: &Path) -> Result<(Vec<Record>, Option<Vec<String>>)> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read the metrics log", path.display()))?;
    let head = text.as_bytes();
    let fmt = Format::sniff(path, &head[..head.len().min(65536)])?;
    if fmt == Format::HfState {
        return Ok((
            crate::watch::parse::hf_state_records(&text).unwrap_or_default(),
            None,
        ));
    }
    let tsv = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("tsv"));
    let mut p = LineParser::new(fmt, tsv);
    let rows = text
        .lines()
        .filter_map(|l| p.parse(l, path).ok().flatten())
        .collect();
    Ok((rows, p.header().map(<[String]>::to_vec)))
}

impl RunData {
    /// Whether `dir` can be loaded: a keel run or a TensorBoard log directory.
    pub fn is_run(dir: &Path) -> bool {
        dir.join("metrics.jsonl").is_file() || (dir.is_dir() && event_files(dir).is_ok())
    }

    pub fn load(dir: &Path) -> Result<RunData> {
        if dir.join("metrics.jsonl").is_file() {
            let cfg_path = dir.join("config.toml");
            return Ok(RunData {
                dir: dir.to_path_buf(),
                metrics: read_jsonl(&dir.join("metrics.jsonl"))?,
                events: read_jsonl(&dir.join("events.jsonl")).unwrap_or_default(),
                telemetry: read_jsonl(&dir.join("telemetry.jsonl")).unwrap_or_default(),
                cfg_text: std::fs::read_to_string(&cfg_path).unwrap_or_default(),
                cfg: cfg_path
                    .is_file()
                    .then(|| crate::config::RunConfig::load(Some(&cfg_path), &[]).ok())
                    .flatten(),
                source: "metrics.jsonl".into(),
                notes: Vec::new(),
            });
        }
        Self::from_tensorboard(dir)
    }

    /// Any log `keel watch` reads (JSON lines, CSV, a text log; or a directory: keel's run
    /// format or TensorBoard), as keel's metrics lines. `overrides`: `NAME=FIELD` as
    /// `keel watch --field` (step, loss, grad_norm, max_attn_logit, logit_z, or any keel field
    /// such as val_loss or lr).
    pub fn metrics_of(path: &Path, overrides: &[String]) -> Result<Vec<Value>> {
        if path.is_dir() {
            return Ok(Self::load(path)?.metrics);
        }
        if crate::tensorboard::is_event_file(path) {
            let mut d = Self::from_tensorboard(path.parent().unwrap_or(Path::new(".")))?;
            return Ok(std::mem::take(&mut d.metrics));
        }
        let (rows, _) = read_records(path)?;
        let mut chosen: Vec<(String, String)> = Vec::new();
        for o in overrides {
            let Some((k, v)) = o.split_once('=') else {
                bail!("field {o}: expected NAME=FIELD, e.g. loss=train/loss");
            };
            chosen.push((k.to_string(), v.to_string()));
        }
        let present = |tag: &str| rows.iter().any(|r| r.get(tag).is_some());
        let mut slots: Vec<(&str, &[&str])> = vec![("step", crate::watch::parse::STEP)];
        slots.extend(TAGS.iter().map(|(f, t)| (*f, *t)));
        for (field, tags) in slots {
            if chosen.iter().any(|(k, _)| k == field) {
                continue;
            }
            if let Some(t) = std::iter::once(&field)
                .chain(tags.iter())
                .find(|t| present(t))
            {
                chosen.push((field.to_string(), t.to_string()));
            }
        }
        let mut out = Vec::new();
        for (n, r) in rows.iter().enumerate() {
            let mut m = Map::new();
            for (field, tag) in &chosen {
                if let Some(v) = r.get(tag) {
                    let x = if field == "step" && v.is_finite() && v >= 0.0 {
                        json!(v as u64) // an integer, as keel writes it
                    } else if v.is_finite() {
                        json!(v)
                    } else {
                        Value::Null
                    };
                    m.insert(field.clone(), x);
                }
            }
            if m.is_empty() {
                continue;
            }
            if !m.contains_key("step") {
                m.insert("step".into(), json!(n as u64 + 1));
            }
            if r.skipped {
                m.insert("skipped".into(), json!(true));
            }
            out.push(Value::Object(m));
        }
        Ok(out)
    }

    /// The field (or tag) names a log holds, as written: for an error that must say what
    /// to map (`--field loss=NAME`).
    pub fn field_names(path: &Path) -> Vec<String> {
        let Ok((rows, header)) = read_records(path) else {
            return Vec::new();
        };
        let mut names: Vec<String> = Vec::new();
        for r in rows.iter().take(50) {
            for (k, _) in &r.values {
                if !names.contains(k) {
                    names.push(k.clone());
                }
            }
        }
        if names.is_empty() {
            names = header.unwrap_or_default();
        }
        names
    }

    fn from_tensorboard(dir: &Path) -> Result<RunData> {
        let (files, others) = event_files(dir)?;
        let mut notes = Vec::new();
        if !others.is_empty() {
            notes.push(format!(
                "{} other run director{} with event files not drawn (give each as its own directory to compare them)",
                others.len(),
                if others.len() == 1 { "y" } else { "ies" }
            ));
        }
        // step → tag → value (a later value of a tag at a step wins); texts per step
        let mut steps: BTreeMap<i64, BTreeMap<String, f64>> = BTreeMap::new();
        let mut texts: Vec<(i64, String)> = Vec::new();
        let mut t0: Option<f64> = None;
        let mut wall: BTreeMap<i64, f64> = BTreeMap::new();
        for f in &files {
            let (events, problems) = EventReader::open(f)?.poll(true)?;
            notes.extend(problems.iter().map(|p| p.describe(f)));
            for e in events {
                if e.wall_time > 0.0 && !e.scalars.is_empty() {
                    t0 = Some(t0.map_or(e.wall_time, |t: f64| t.min(e.wall_time)));
                    wall.insert(e.step, e.wall_time);
                }
                let row = steps.entry(e.step).or_default();
                for (tag, v) in e.scalars {
                    row.insert(tag, v);
                }
                for (tag, t) in e.texts {
                    if tag.starts_with("keel/") {
                        texts.push((e.step, t));
                    }
                }
            }
        }
        steps.retain(|_, r| !r.is_empty());
        // each field from the first of its tags present anywhere in the log
        let present = |tag: &str| steps.values().any(|r| r.contains_key(tag));
        let chosen: Vec<(&str, &str)> = TAGS
            .iter()
            .filter_map(|(field, tags)| Some((*field, *tags.iter().find(|t| present(t))?)))
            .collect();
        let mut metrics = Vec::new();
        let mut events = Vec::new();
        for (&step, row) in &steps {
            let mut m = Map::new();
            m.insert("step".into(), json!(step));
            for (field, tag) in &chosen {
                if let Some(v) = row.get(*tag) {
                    m.insert(
                        field.to_string(),
                        if v.is_finite() { json!(v) } else { Value::Null },
                    );
                }
            }
            if row.get("keel/skipped") == Some(&1.0) {
                m.insert("skipped".into(), json!(true));
            }
            if let (Some(t), Some(w)) = (t0, wall.get(&step)) {
                m.insert("elapsed_s".into(), json!(w - t));
            }
            if m.len() > 1 + usize::from(m.contains_key("elapsed_s")) {
                metrics.push(Value::Object(m));
            }
            // guard events: keel/<kind> (keel's mirror) or keel/event/<kind> scalars
            for (tag, v) in row {
                let Some(kind) = tag
                    .strip_prefix("train/keel/")
                    .or_else(|| tag.strip_prefix("keel/"))
                    .map(|k| k.strip_prefix("event/").unwrap_or(k))
                else {
                    continue;
                };
                if KEEL_SIGNALS.contains(&kind) || kind.contains('/') {
                    continue;
                }
                // the event's own line of the step's text: "step N: kind: words" (the Python
                // package) or "step N: kind (detector): words" (keel's mirror, whose words
                // are the detail itself as JSON when it has no sentence)
                let prefix = format!("step {step}: {kind}");
                let line = texts
                    .iter()
                    .filter(|(s, _)| *s == step)
                    .flat_map(|(_, t)| t.lines())
                    .find_map(|l| {
                        let rest = l.strip_prefix(&prefix)?;
                        (rest.starts_with(':') || rest.starts_with(" (")).then_some(rest)
                    });
                let mut detail = json!({});
                if let Some(rest) = line {
                    let (det, words) =
                        match rest.strip_prefix(" (").and_then(|r| r.split_once("): ")) {
                            Some((d, w)) => (Some(d), w),
                            None => (None, rest.trim_start_matches(':').trim_start()),
                        };
                    match serde_json::from_str::<Value>(words) {
                        Ok(v @ Value::Object(_)) => detail = v,
                        _ => detail["reason"] = json!(words),
                    }
                    if let Some(d) = det {
                        detail["detector"] = json!(d);
                    }
                }
                if kind == "lr_backoff" && detail.get("factor").is_none() {
                    // keel's mirror writes the factor as the event's value; the Python
                    // package as keel/lr_factor beside a 1
                    let f = ["keel/lr_factor", "train/keel/lr_factor"]
                        .iter()
                        .find_map(|t| row.get(*t))
                        .copied()
                        .unwrap_or(*v);
                    detail["factor"] = json!(f);
                }
                events.push(json!({"step": step, "kind": kind, "detail": detail}));
            }
        }
        if metrics.is_empty() {
            anyhow::bail!(
                "{}: its TensorBoard events hold no training scalars keel knows (no tag among {}); fix: log the loss under one of those tags",
                dir.display(),
                TAGS[0].1.join(", ")
            );
        }
        let run = files[0].parent().unwrap_or(dir);
        Ok(RunData {
            dir: dir.to_path_buf(),
            metrics,
            events,
            telemetry: Vec::new(),
            cfg_text: String::new(),
            cfg: None,
            source: format!(
                "TensorBoard events in {} ({}; {})",
                run.display(),
                if files.len() == 1 {
                    "1 file".to_string()
                } else {
                    format!("{} files", files.len())
                },
                chosen
                    .iter()
                    .map(|(f, t)| format!("{f} ← {t}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            notes,
        })
    }
}
