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
