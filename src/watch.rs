//! `keel watch`: the guard's detectors over any trainer's metrics log (keel's metrics.jsonl,
//! another trainer's JSON lines, or a CSV with a header), printing events as they happen.
//! Exit code 2 on divergence, so it can stop a PyTorch job as a sidecar.

use crate::monitor::{Detection, GuardConfig, Monitor, Severity, StepMetrics};
use anyhow::{bail, Context, Result};
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

/// Which field of a log line holds each metric.
#[derive(Debug, Clone)]
pub struct FieldMap {
    pub step: String,
    pub loss: String,
    pub grad_norm: String,
    pub max_attn_logit: String,
    pub logit_z: String,
}

impl Default for FieldMap {
    fn default() -> Self {
        FieldMap {
            step: "step".into(),
            loss: "loss".into(),
            grad_norm: "grad_norm".into(),
            max_attn_logit: "max_attn_logit".into(),
            logit_z: "logit_z".into(),
        }
    }
}

impl FieldMap {
    /// Apply `NAME=FIELD` overrides.
    pub fn with(mut self, overrides: &[String]) -> Result<Self> {
        for o in overrides {
            let Some((k, v)) = o.split_once('=') else {
                bail!("--field {o}: expected NAME=FIELD, e.g. --field loss=train/loss");
            };
            let slot = match k {
                "step" => &mut self.step,
                "loss" => &mut self.loss,
                "grad_norm" => &mut self.grad_norm,
                "max_attn_logit" => &mut self.max_attn_logit,
                "logit_z" => &mut self.logit_z,
                _ => bail!(
                    "--field {o}: unknown name {k:?}; use step, loss, grad_norm, max_attn_logit or logit_z"
                ),
            };
            *slot = v.to_string();
        }
        Ok(self)
    }
}

/// Parses lines of one log format into step metrics.
pub struct LineParser {
    fields: FieldMap,
    /// CSV column names once the header is read; None for JSON lines.
    csv_header: Option<Vec<String>>,
    is_csv: bool,
    line_no: u64,
}

/// A present value that is null or unparsable counts as non-finite.
fn json_num(v: &serde_json::Value, key: &str) -> Option<f64> {
    v.get(key).map(|x| x.as_f64().unwrap_or(f64::NAN))
}

impl LineParser {
    pub fn new(fields: FieldMap, is_csv: bool) -> Self {
        LineParser {
            fields,
            csv_header: None,
            is_csv,
            line_no: 0,
        }
    }

    /// One line → metrics; None for lines without a loss (header, eval-only lines, blanks).
    pub fn parse(&mut self, line: &str) -> Option<StepMetrics> {
        let line = line.trim();
        if line.is_empty() {
            return None;
        }
        self.line_no += 1;
        let f = &self.fields;
        if self.is_csv {
            let cells: Vec<String> = line
                .split(',')
                .map(|c| c.trim().trim_matches('"').to_string())
                .collect();
            let Some(h) = &self.csv_header else {
                self.csv_header = Some(cells);
                return None;
            };
            let get = |k: &str| {
                h.iter().position(|c| c == k).and_then(|i| {
                    cells
                        .get(i)
                        .filter(|c| !c.is_empty())
                        .map(|c| c.parse::<f64>().unwrap_or(f64::NAN))
                })
            };
            let loss = get(&f.loss)?;
            Some(StepMetrics {
                step: get(&f.step).map_or(self.line_no - 1, |s| s as u64),
                loss,
                grad_norm: get(&f.grad_norm),
                max_attn_logit: get(&f.max_attn_logit),
                logit_z: get(&f.logit_z),
            })
        } else {
            let v: serde_json::Value = serde_json::from_str(line).ok()?;
            let loss = json_num(&v, &f.loss)?;
            Some(StepMetrics {
                step: v
                    .get(&f.step)
                    .and_then(|s| s.as_f64())
                    .map_or(self.line_no, |s| s as u64),
                loss,
                grad_norm: json_num(&v, &f.grad_norm),
                max_attn_logit: json_num(&v, &f.max_attn_logit),
                logit_z: json_num(&v, &f.logit_z),
            })
        }
    }
}

/// Run the detectors over a whole log; the events in order.
pub fn scan(text: &str, fields: FieldMap, is_csv: bool, cfg: GuardConfig) -> Vec<Detection> {
    let mut p = LineParser::new(fields, is_csv);
    let mut m = Monitor::new(cfg);
    text.lines()
        .filter_map(|l| p.parse(l))
        .flat_map(|s| m.observe(&s))
        .collect()
}

pub fn format_detection(d: &Detection) -> String {
    let kind = match d.kind {
        Severity::Warning => "warning",
        Severity::Spike => "spike",
        Severity::Divergence => "DIVERGENCE",
    };
    format!(
        "step {:>7}  {kind:<10} {:<12} value {:<10.4} threshold {:<10.4} window {:>3}  {}",
        d.step, d.detector, d.value, d.threshold, d.window, d.reason
    )
}

pub fn cmd_watch(
    file: &Path,
    follow: bool,
    json: bool,
    fields: &[String],
    sets: &[String],
) -> Result<i32> {
    let fields = FieldMap::default().with(fields)?;
    for s in sets {
        if !s.starts_with("guard.") {
            bail!("--set {s}: keel watch takes only guard.* keys (e.g. --set guard.loss_z=5)");
        }
    }
    let cfg = crate::config::RunConfig::load(None, sets)
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .guard;
    let is_csv = file
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("csv"));
    let mut f = std::fs::File::open(file).with_context(|| {
        format!(
            "{}: cannot open; fix: give the path of a metrics log (JSON lines or CSV)",
            file.display()
        )
    })?;
    crate::train::install_interrupt_handler();
    let mut parser = LineParser::new(fields, is_csv);
    let mut mon = Monitor::new(cfg);
    let mut pending = String::new();
    let mut pos = 0u64;
    let (mut n_lines, mut n_events) = (0u64, 0u64);
    let mut buf = Vec::new();
    loop {
        let len = f
            .metadata()
            .with_context(|| format!("{}: cannot stat", file.display()))?
            .len();
        if len < pos {
            eprintln!(
                "keel watch: {} was truncated; reading from the start",
                file.display()
            );
            pos = 0;
            pending.clear();
        }
        buf.clear();
        f.seek(SeekFrom::Start(pos))?;
        (&mut f).take(len - pos).read_to_end(&mut buf)?;
        pos += buf.len() as u64;
        pending.push_str(&String::from_utf8_lossy(&buf));
        // only whole lines: a writer may be mid-line
        let done = pending.rfind('\n').map_or(0, |i| i + 1);
        let whole: String = pending.drain(..done).collect();
        let at_eof_final = !follow;
        let mut lines: Vec<&str> = whole.lines().collect();
        let tail = pending.clone();
        if at_eof_final && !tail.trim().is_empty() {
            lines.push(&tail);
        }
        for l in lines {
            let Some(m) = parser.parse(l) else { continue };
            n_lines += 1;
            for d in mon.observe(&m) {
                n_events += 1;
                if json {
                    println!("{}", serde_json::to_string(&d)?);
                } else {
                    println!("{}", format_detection(&d));
                }
                if d.kind == Severity::Divergence {
                    if !json {
                        eprintln!(
                            "keel watch: divergence at step {} after {n_lines} steps read; exit 2",
                            d.step
                        );
                    }
                    return Ok(2);
                }
            }
        }
        if !follow || crate::train::interrupted() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
    if !json {
        eprintln!("keel watch: {n_lines} steps read, {n_events} events, no divergence");
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_and_jsonl_with_renamed_fields_parse_alike() {
        let mut j = LineParser::new(
            FieldMap::default()
                .with(&["loss=train/loss".into(), "step=it".into()])
                .unwrap(),
            false,
        );
        let a = j
            .parse(r#"{"it": 7, "train/loss": 2.5, "grad_norm": null}"#)
            .unwrap();
        assert_eq!((a.step, a.loss), (7, 2.5));
        assert!(a.grad_norm.unwrap().is_nan());
        assert!(j.parse(r#"{"it": 8, "val_loss": 2.0}"#).is_none());
        let mut c = LineParser::new(FieldMap::default(), true);
        assert!(c.parse("step,loss,grad_norm").is_none());
        let b = c.parse("7,2.5,nan").unwrap();
        assert_eq!((b.step, b.loss), (7, 2.5));
        assert!(b.grad_norm.unwrap().is_nan() && b.logit_z.is_none());
    }
}
