//! One trial's outcome, read back from its run directory (so trials run elsewhere collect
//! the same way): keel trials' metrics.jsonl, command trials' logs in any format keel reads.

use super::{Plan, Trial};
use crate::train::{num_field, read_jsonl};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use std::path::Path;

/// One trial's outcome.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct TrialResult {
    pub id: String,
    /// Axis key → value.
    pub axes: Map<String, Value>,
    /// finished | diverged | pruned (an Optuna trial stopped for being behind) | incomplete
    /// | failed | not_started
    pub status: String,
    pub steps_planned: u64,
    pub steps_done: u64,
    /// The loss of step 1.
    pub initial_loss: Option<f64>,
    /// The compared metric (`sweep.metric`) at the end of the trial.
    pub final_loss: Option<f64>,
    /// Mean training loss of the last 10 steps.
    pub final_train_loss: Option<f64>,
    /// Last validation loss recorded.
    pub val_loss: Option<f64>,
    /// Lowest 10-step mean of the training loss.
    pub min_loss: Option<f64>,
    pub diverged: bool,
    pub diverged_at: Option<u64>,
    pub diverged_reason: Option<String>,
    /// Max attention logit, mean of the last 10 steps, and its peak over the trial.
    pub max_attn_logit: Option<f64>,
    pub peak_attn_logit: Option<f64>,
    pub final_grad_norm: Option<f64>,
    /// Guard detections (the guard is off in sweeps: they are logged, not acted on).
    pub spikes: usize,
    pub warnings: usize,
    /// Early warning: the first step each passive detector fired (attention logit above
    /// guard.attn_logit_max, output log-partition drift, a loss spike), to set against
    /// `diverged_at`.
    pub first_attn_warning: Option<u64>,
    pub first_logit_warning: Option<u64>,
    pub first_loss_spike: Option<u64>,
    /// Largest |mean output log-partition| over the trial (output-logit divergence).
    pub peak_logit_z: Option<f64>,
    pub wall_s: Option<f64>,
    pub tokens_per_s: Option<f64>,
    /// The sharpness probe's last prediction of the max stable LR (`lr_edge`, when the trial
    /// ran with `telemetry.sharpness_every`) and the first one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lr_edge: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_lr_edge: Option<f64>,
    /// A failed command trial: its exit code (-1: killed by a signal) and the last lines of
    /// its stderr.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// keel stopped the trial when its log diverged (a command trial followed by the sweep).
    #[serde(default)]
    pub stopped_early: bool,
}

/// A trial's metrics lines in keel's fields: keel trials' metrics.jsonl; a command trial's
/// log (any format keel watch reads) mapped to them.
pub fn trial_metrics(dir: &Path, plan: &Plan) -> Vec<Value> {
    match &plan.command {
        None => read_jsonl(&dir.join("metrics.jsonl")).unwrap_or_default(),
        Some(c) => {
            let p = dir.join(&c.metrics);
            if !p.exists() {
                return Vec::new();
            }
            crate::report::runs::RunData::metrics_of(&p, &c.fields).unwrap_or_default()
        }
    }
}

/// The guard's detectors over a command trial's log, fed line by line (a running trial's
/// log as it grows, or a finished one whole).
pub struct LogJudge {
    mon: crate::monitor::Monitor,
    fed: Option<u64>,
    /// The first step's loss, and the steps in a row above it since (keel train's
    /// `stop_if_diverged` rule, which marks keel trials diverged).
    initial: Option<f64>,
    above: u64,
}

impl Default for LogJudge {
    fn default() -> Self {
        Self::new()
    }
}

impl LogJudge {
    pub fn new() -> Self {
        LogJudge {
            mon: crate::monitor::Monitor::new(crate::monitor::GuardConfig::default()),
            fed: None,
            initial: None,
            above: 0,
        }
    }

    /// Feed the lines past the last one fed; the first divergence (or, with `attn`, an
    /// attention-logit warning after the early window) as (step, detector, reason).
    pub fn feed(&mut self, metrics: &[Value], attn: bool) -> Option<(u64, String, String)> {
        let early = self.mon.cfg.early_window;
        for m in metrics {
            let Some(step) = m.get("step").and_then(Value::as_u64) else {
                continue;
            };
            if self.fed.is_some_and(|f| step <= f) {
                continue;
            }
            // validation lines (no loss) are not steps
            let Some(loss) = m.get("loss") else { continue };
            self.fed = Some(step);
            if m.get("skipped").and_then(Value::as_bool) == Some(true) {
                continue;
            }
            let num = |k: &str| m.get(k).and_then(Value::as_f64);
            let sm = crate::monitor::StepMetrics {
                step,
                loss: loss.as_f64().unwrap_or(f64::NAN),
                grad_norm: num("grad_norm"),
                max_attn_logit: num("max_attn_logit"),
                logit_z: num("logit_z"),
                ..Default::default()
            };
            for d in self.mon.observe(&sm) {
                if d.kind == crate::monitor::Severity::Divergence
                    || (attn && d.detector == "attn_logit" && step > early)
                {
                    return Some((step, d.detector.clone(), d.reason.clone()));
                }
            }
            // (no warm-up is known for a command trial: every step counts)
            if sm.loss.is_finite() {
                let why =
                    crate::train::above_initial(&mut self.initial, &mut self.above, sm.loss, true);
                if let Some(why) = why {
                    return Some((step, "above_initial".into(), why));
                }
            }
        }
        None
    }
}

/// The detail of the `diverged` event the judge's verdict stands for.
pub fn diverged_detail(detector: &str, reason: &str) -> Value {
    json!({"reason": format!("{detector}: {reason}"), "detector": detector})
}

/// The last `n` non-empty lines of a file.
pub fn tail_lines(path: &Path, n: usize) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    (!lines.is_empty()).then(|| lines[lines.len().saturating_sub(n)..].join("\n"))
}

pub(crate) fn mean(v: &[f64]) -> Option<f64> {
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

fn axes_json(t: &Trial) -> Map<String, Value> {
    t.assign
        .iter()
        .map(|(k, v)| {
            let j = match v {
                toml::Value::String(s) => json!(s),
                toml::Value::Integer(i) => json!(i),
                toml::Value::Float(x) => json!(x),
                toml::Value::Boolean(b) => json!(b),
                other => json!(other.to_string()),
            };
            (k.clone(), j)
        })
        .collect()
}

/// Read a trial's run directory. `exit` is the process's exit code when the sweep ran it.
pub fn collect_trial(dir: &Path, t: &Trial, plan: &Plan, exit: Option<i32>) -> TrialResult {
    let metrics = trial_metrics(dir, plan);
    let events = read_jsonl(&dir.join("events.jsonl")).unwrap_or_default();
    // (a command trial's directory may hold a config.toml of the script's own)
    let steps_planned = if plan.command.is_some() {
        plan.steps
    } else {
        crate::config::RunConfig::load(Some(&dir.join("config.toml")), &[])
            .map(|c| c.train.steps)
            .unwrap_or(plan.steps)
    };
    let steps_done = metrics
        .last()
        .and_then(|m| m.get("step").and_then(Value::as_u64))
        .unwrap_or(0);
    let mut div = events
        .iter()
        .find(|e| {
            matches!(
                e.get("kind").and_then(Value::as_str),
                Some("diverged") | Some("give_up")
            )
        })
        .cloned();
    // a command trial nobody followed (run from --emit, or with stop_diverged off): its log
    // judged now, by the rule a followed trial is stopped by
    if div.is_none() && plan.command.is_some() {
        if let Some((step, det, reason)) = LogJudge::new().feed(&metrics, false) {
            div = Some(json!({"step": step, "kind": "diverged",
                "detail": diverged_detail(&det, &reason)}));
        }
    }
    let div = div.as_ref();
    // an Optuna trial pruned for being behind (keel.optuna's export): done, not diverged
    let pruned = div.is_none()
        && std::fs::read_to_string(dir.join("optuna_trial.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<Value>(&t).ok())
            .is_some_and(|v| v.get("state").and_then(Value::as_str) == Some("PRUNED"));
    // distinct steps: a resumed trial logs the replayed steps' events again
    let count = |k: &str| {
        let mut steps: Vec<u64> = events
            .iter()
            .filter(|e| e.get("kind").and_then(Value::as_str) == Some(k))
            .filter_map(|e| e.get("step").and_then(Value::as_u64))
            .collect();
        steps.sort_unstable();
        steps.dedup();
        steps.len()
    };
    // a command trial's log in which no loss field was found: nothing can be judged
    let no_loss = plan
        .command
        .as_ref()
        .filter(|_| !metrics.is_empty() && metrics.iter().all(|m| m.get("loss").is_none()));
    let status = if no_loss.is_some() {
        "failed"
    } else if div.is_some() {
        "diverged"
    } else if pruned {
        "pruned"
    } else if steps_done >= steps_planned && steps_done > 0 {
        "finished"
    } else if exit.is_some_and(|c| c != 0 && c != 3) {
        "failed"
    } else if metrics.is_empty() {
        "not_started"
    } else {
        "incomplete"
    };
    let losses: Vec<Option<f64>> = metrics.iter().map(|m| num_field(m, "loss")).collect();
    let finite: Vec<f64> = losses.iter().flatten().copied().collect();
    let tail = |v: &[f64]| mean(&v[v.len().saturating_sub(10)..]);
    let final_train_loss = tail(&finite);
    let val_loss = metrics.iter().rev().find_map(|m| num_field(m, "val_loss"));
    let min_loss = finite
        .windows(10.min(finite.len().max(1)))
        .filter_map(mean)
        .fold(None, |a: Option<f64>, b| Some(a.map_or(b, |a| a.min(b))));
    let final_loss = match (status, plan.settings.metric.as_str()) {
        // stopped for being behind: its last loss is not a final one (stable, but no score)
        ("pruned", _) => None,
        ("finished", "val_loss") => val_loss.or(final_train_loss),
        _ => final_train_loss,
    };
    let attn: Vec<f64> = metrics
        .iter()
        .filter_map(|m| num_field(m, "max_attn_logit"))
        .collect();
    // the first step a detector of the given name fired
    let first = |det: &str| {
        events
            .iter()
            .filter(|e| e.pointer("/detail/detector").and_then(Value::as_str) == Some(det))
            .filter_map(|e| e.get("step").and_then(Value::as_u64))
            .min()
    };
    let mut tps: Vec<f64> = metrics
        .iter()
        .filter_map(|m| num_field(m, "tokens_per_s"))
        .collect();
    TrialResult {
        id: t.id.clone(),
        axes: axes_json(t),
        status: status.into(),
        steps_planned,
        steps_done,
        initial_loss: losses.first().copied().flatten(),
        final_loss,
        final_train_loss,
        val_loss,
        min_loss,
        diverged: div.is_some(),
        diverged_at: div.and_then(|e| e.get("step").and_then(Value::as_u64)),
        diverged_reason: div.and_then(|e| {
            let d = e.get("detail")?;
            d.get("reason")
                .or(d.get("diagnosis"))
                .and_then(Value::as_str)
                .map(str::to_string)
        }),
        max_attn_logit: tail(&attn),
        peak_attn_logit: attn.iter().copied().reduce(f64::max),
        final_grad_norm: metrics.iter().rev().find_map(|m| num_field(m, "grad_norm")),
        spikes: count("spike"),
        warnings: count("warning"),
        first_attn_warning: first("attn_logit"),
        first_logit_warning: first("logit_drift"),
        first_loss_spike: first("loss_spike"),
        peak_logit_z: metrics
            .iter()
            .filter_map(|m| num_field(m, "logit_z"))
            .map(f64::abs)
            .reduce(f64::max),
        wall_s: metrics.last().and_then(|m| num_field(m, "elapsed_s")),
        tokens_per_s: {
            tps.sort_by(f64::total_cmp);
            tps.get(tps.len() / 2).copied()
        },
        lr_edge: metrics.iter().rev().find_map(|m| num_field(m, "lr_edge")),
        first_lr_edge: metrics.iter().find_map(|m| num_field(m, "lr_edge")),
        exit_code: (status == "failed").then_some(exit).flatten(),
        error: match no_loss {
            Some(c) => Some(format!(
                "{}: no loss field in the trial's log (its fields: {}); fix: set trial.fields = [\"loss=NAME\"] in the sweep file",
                dir.join(&c.metrics).display(),
                crate::report::runs::RunData::field_names(&dir.join(&c.metrics)).join(", ")
            )),
            None => (status == "failed")
                .then(|| {
                    tail_lines(&dir.join("stderr.log"), 5)
                        .or_else(|| tail_lines(&dir.join("train.log"), 5))
                })
                .flatten(),
        },
        stopped_early: div.is_some_and(|e| e.pointer("/detail/stopped_by").is_some()),
    }
}

impl TrialResult {
    /// Finished, diverged, or pruned by Optuna for being behind: nothing left to run.
    pub fn done(&self) -> bool {
        matches!(self.status.as_str(), "finished" | "diverged" | "pruned")
    }
}
