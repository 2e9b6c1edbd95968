//! A sweep's outputs: results.jsonl, results.csv, summary.json and the plots, rewritten
//! atomically after every trial.

use super::analysis::{recommend, summarize, Recommendation, Target};
use super::collect::TrialResult;
use super::Plan;
use anyhow::Result;
use serde_json::{json, Value};
use std::path::Path;

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// results.csv: one row per trial, axis keys as columns first.
pub fn to_csv(plan: &Plan, results: &[TrialResult]) -> String {
    let cols = [
        "status",
        "final_loss",
        "min_loss",
        "diverged",
        "diverged_at",
        "steps_done",
        "steps_planned",
        "initial_loss",
        "val_loss",
        "final_train_loss",
        "max_attn_logit",
        "peak_attn_logit",
        "final_grad_norm",
        "spikes",
        "warnings",
        "first_attn_warning",
        "first_logit_warning",
        "first_loss_spike",
        "peak_logit_z",
        "wall_s",
        "tokens_per_s",
        "lr_edge",
        "first_lr_edge",
    ];
    let mut out = String::from("id");
    for a in &plan.axes {
        out.push(',');
        out.push_str(&csv_field(&a.key));
    }
    for c in cols {
        out.push(',');
        out.push_str(c);
    }
    out.push('\n');
    for r in results {
        out.push_str(&csv_field(&r.id));
        for a in &plan.axes {
            out.push(',');
            let v = r.axes.get(&a.key).map_or(String::new(), |v| match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            });
            out.push_str(&csv_field(&v));
        }
        let j = serde_json::to_value(r).unwrap_or(Value::Null);
        for c in cols {
            out.push(',');
            let v = match j.get(c) {
                None | Some(Value::Null) => String::new(),
                Some(Value::String(s)) => s.clone(),
                Some(other) => other.to_string(),
            };
            out.push_str(&csv_field(&v));
        }
        out.push('\n');
    }
    out
}

/// Write results.jsonl, results.csv and summary.json (atomically) and the plots.
pub fn write_all(
    dir: &Path,
    plan: &Plan,
    base_scheme: &str,
    results: &[TrialResult],
    target: &Target,
) -> Result<Recommendation> {
    let mut jsonl = String::new();
    for r in results {
        jsonl.push_str(&serde_json::to_string(r)?);
        jsonl.push('\n');
    }
    crate::checkpoint::write_atomic(&dir.join("results.jsonl"), jsonl.as_bytes())?;
    crate::checkpoint::write_atomic(&dir.join("results.csv"), to_csv(plan, results).as_bytes())?;
    let groups = summarize(plan, results);
    let rec = recommend(plan, base_scheme, results, &groups, target);
    let summary = json!({
        "metric": plan.settings.metric,
        "trials": results.len(),
        "finished": results.iter().filter(|r| r.status == "finished").count(),
        "diverged": results.iter().filter(|r| r.diverged).count(),
        "unfinished": results.iter().filter(|r| !r.done()).count(),
        "compute": compute_saved(results),
        "groups": groups,
        "recommendation": rec,
        "target": target,
    });
    crate::checkpoint::write_atomic(
        &dir.join("summary.json"),
        serde_json::to_string_pretty(&summary)?.as_bytes(),
    )?;
    super::plot::write_all(&dir.join("plots"), plan, base_scheme, &groups, &rec)?;
    Ok(rec)
}

/// Steps the sweep ran against running every trial to the end: a diverged trial stops at
/// its divergence (keel trials by themselves, command trials when the sweep stops them).
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct ComputeSaved {
    /// Trials that stopped at their divergence.
    pub stopped: usize,
    pub steps_run: u64,
    pub steps_planned: u64,
}

impl ComputeSaved {
    /// Fraction of the planned steps not run.
    pub fn fraction(&self) -> f64 {
        if self.steps_planned == 0 {
            0.0
        } else {
            1.0 - self.steps_run as f64 / self.steps_planned as f64
        }
    }
}

pub fn compute_saved(results: &[TrialResult]) -> ComputeSaved {
    let done: Vec<&TrialResult> = results.iter().filter(|r| r.done()).collect();
    ComputeSaved {
        stopped: done
            .iter()
            .filter(|r| r.diverged && r.steps_done < r.steps_planned)
            .count(),
        steps_run: done.iter().map(|r| r.steps_done.min(r.steps_planned)).sum(),
        steps_planned: done.iter().map(|r| r.steps_planned).sum(),
    }
}
