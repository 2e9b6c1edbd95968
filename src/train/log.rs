//! JSON-lines logs of a run (metrics.jsonl, events.jsonl): appended a whole line at a time.

use anyhow::{Context, Result};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

pub struct JsonlWriter {
    f: File,
    path: PathBuf,
}

impl JsonlWriter {
    pub fn open(path: &Path) -> Result<Self> {
        let f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("{}: cannot open for appending", path.display()))?;
        Ok(JsonlWriter {
            f,
            path: path.to_path_buf(),
        })
    }

    /// The file appended to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// One object per line, written with a single write so a crash cannot interleave lines.
    pub fn write(&mut self, v: &serde_json::Value) -> Result<()> {
        let mut s = serde_json::to_string(v)?;
        s.push('\n');
        self.f
            .write_all(s.as_bytes())
            .with_context(|| format!("{}: write failed (disk full?)", self.path.display()))
    }
}

/// One line of events.jsonl: `{"step", "kind", "detail", "time"}` (seconds since the epoch).
pub fn event_line(step: u64, kind: &str, detail: serde_json::Value) -> serde_json::Value {
    let time = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    serde_json::json!({"step": step, "kind": kind, "detail": detail, "time": time})
}

/// Parse a JSON-lines file, skipping a torn last line.
pub fn read_jsonl(path: &Path) -> Result<Vec<serde_json::Value>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect())
}

/// A numeric field of a log line (`None` when absent, null or not a number).
pub fn num_field(v: &serde_json::Value, key: &str) -> Option<f64> {
    v.get(key).and_then(serde_json::Value::as_f64)
}

/// Keep only the metric lines of steps ≤ `step` (a resume re-runs the rest), atomically.
pub fn truncate_after_step(path: &Path, step: u64) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    let mut keep = String::new();
    for line in text.lines() {
        let ok = serde_json::from_str::<serde_json::Value>(line)
            .ok()
            .and_then(|v| v.get("step").and_then(|s| s.as_u64()))
            .is_some_and(|s| s <= step);
        if ok {
            keep.push_str(line);
            keep.push('\n');
        }
    }
    crate::checkpoint::write_atomic(path, keep.as_bytes())
}

/// The run's logs mirrored into TensorBoard event files (`[telemetry] tensorboard = true`,
/// under `<out>/tensorboard/`): metrics as `train/*` and `val/loss` scalars, per-layer
/// telemetry as `layers/<name>/<i>`, guard events as `keel/<kind>` scalars (1 at the step;
/// an LR back-off gives its factor) and as text under `keel/events`, so a skip or a
/// rollback shows on the charts at its step.
pub struct TbMirror {
    w: crate::tensorboard::EventWriter,
}

/// metrics.jsonl field → TensorBoard tag.
const TB_METRICS: &[(&str, &str)] = &[
    ("loss", "train/loss"),
    ("grad_norm", "train/grad_norm"),
    ("lr", "train/lr"),
    ("max_attn_logit", "train/max_attn_logit"),
    ("logit_z", "train/logit_z"),
    ("update_ratio", "train/update_ratio"),
    ("z_term", "train/z_term"),
    ("tokens_per_s", "perf/tokens_per_s"),
    ("val_loss", "val/loss"),
];

impl TbMirror {
    pub fn create(dir: &Path) -> Result<Self> {
        Ok(TbMirror {
            w: crate::tensorboard::EventWriter::create(dir)?,
        })
    }

    /// One metrics.jsonl line. Non-finite values are written as such (null in the JSON: a
    /// NaN loss), so a diverging run shows as one.
    pub fn metrics(&mut self, line: &serde_json::Value) -> Result<()> {
        let Some(step) = num_field(line, "step") else {
            return Ok(());
        };
        let mut vals: Vec<(&str, f64)> = Vec::new();
        for (field, tag) in TB_METRICS {
            match line.get(*field) {
                Some(serde_json::Value::Null) if *field == "loss" => vals.push((tag, f64::NAN)),
                Some(v) => {
                    if let Some(x) = v.as_f64() {
                        vals.push((tag, x));
                    }
                }
                None => {}
            }
        }
        if line.get("skipped").and_then(serde_json::Value::as_bool) == Some(true) {
            vals.push(("keel/skipped", 1.0));
        }
        self.w.scalars(step as i64, &vals)?;
        self.w.flush()
    }

    /// One events.jsonl line.
    pub fn event(&mut self, line: &serde_json::Value) -> Result<()> {
        let (Some(step), Some(kind)) = (
            num_field(line, "step"),
            line.get("kind").and_then(serde_json::Value::as_str),
        ) else {
            return Ok(());
        };
        let detail = line.get("detail").cloned().unwrap_or_default();
        let tag = format!("keel/{kind}");
        let value = if kind == "lr_backoff" {
            num_field(&detail, "factor").unwrap_or(1.0)
        } else {
            1.0
        };
        self.w.scalars(step as i64, &[(&tag, value)])?;
        let words = ["reason", "diagnosis", "path"]
            .iter()
            .find_map(|k| detail.get(*k).and_then(serde_json::Value::as_str))
            .map(str::to_string)
            .unwrap_or_else(|| detail.to_string());
        let name = detail
            .get("detector")
            .and_then(serde_json::Value::as_str)
            .map_or(String::new(), |d| format!(" ({d})"));
        self.w.text(
            step as i64,
            "keel/events",
            &format!("step {step}: {kind}{name}: {words}"),
        )?;
        self.w.flush()
    }

    /// One telemetry.jsonl line: its per-layer lists and per-group maps.
    pub fn telemetry(&mut self, line: &serde_json::Value) -> Result<()> {
        let Some(step) = num_field(line, "step") else {
            return Ok(());
        };
        let mut tags: Vec<(String, f64)> = Vec::new();
        if let Some(o) = line.as_object() {
            for (k, v) in o {
                match v {
                    serde_json::Value::Array(a) => {
                        for (i, x) in a.iter().enumerate() {
                            if let Some(x) = x.as_f64() {
                                tags.push((format!("layers/{k}/{i:02}"), x));
                            }
                        }
                    }
                    serde_json::Value::Object(m) => {
                        for (g, x) in m {
                            if let Some(x) = x.as_f64() {
                                tags.push((format!("layers/{k}/{g}"), x));
                            }
                        }
                    }
                    v if k != "step" => {
                        if let Some(x) = v.as_f64() {
                            tags.push((format!("telemetry/{k}"), x));
                        }
                    }
                    _ => {}
                }
            }
        }
        let vals: Vec<(&str, f64)> = tags.iter().map(|(t, x)| (t.as_str(), *x)).collect();
        self.w.scalars(step as i64, &vals)?;
        self.w.flush()
    }
}
