//! One set of end-of-run figures, read from a run's logs, so the terminal summary, `keel
//! report` and a resume of a finished run say the same thing, each figure labelled with how
//! it was taken.

use super::log::{num_field, read_jsonl};
use serde_json::Value;
use std::path::Path;

/// The train-loss mean is over this many last accepted steps (one batch's loss is noisy).
pub const MEAN_OF_LAST: usize = 20;

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Figures {
    /// The last step logged.
    pub steps: u64,
    /// Train loss of the last step the trainer kept (not skipped).
    pub last_loss: Option<f64>,
    /// Mean train loss of the last `mean_n` kept steps (≤ MEAN_OF_LAST).
    pub mean_loss: Option<f64>,
    pub mean_n: usize,
    pub best_val: Option<f64>,
    pub last_val: Option<f64>,
    /// Median tokens/s over every logged step.
    pub median_tps: Option<f64>,
    pub tokens: Option<f64>,
    pub elapsed_s: Option<f64>,
    /// Guard detections and actions (checkpoints, resumes and injections are not counted).
    pub guard_events: usize,
}

/// Events that are bookkeeping, not something the guard saw or did.
pub fn is_bookkeeping(kind: &str) -> bool {
    matches!(
        kind,
        "checkpoint" | "resume" | "inject" | "interrupted" | "config_change"
    )
}

pub fn figures(metrics: &[Value], events: &[Value]) -> Figures {
    let kept: Vec<f64> = metrics
        .iter()
        .filter(|m| m.get("skipped").and_then(Value::as_bool) != Some(true))
        .filter_map(|m| num_field(m, "loss"))
        .filter(|x| x.is_finite())
        .collect();
    let tail = &kept[kept.len().saturating_sub(MEAN_OF_LAST)..];
    let vals: Vec<f64> = metrics
        .iter()
        .filter_map(|m| num_field(m, "val_loss"))
        .filter(|x| x.is_finite())
        .collect();
    let mut tps: Vec<f64> = metrics
        .iter()
        .filter_map(|m| num_field(m, "tokens_per_s"))
        .filter(|x| x.is_finite())
        .collect();
    tps.sort_by(f64::total_cmp);
    let last = metrics.last();
    Figures {
        steps: last.and_then(|m| num_field(m, "step")).unwrap_or(0.0) as u64,
        last_loss: kept.last().copied(),
        mean_loss: (!tail.is_empty()).then(|| tail.iter().sum::<f64>() / tail.len() as f64),
        mean_n: tail.len(),
        best_val: vals.iter().copied().reduce(f64::min),
        last_val: vals.last().copied(),
        median_tps: (!tps.is_empty()).then(|| tps[tps.len() / 2]),
        tokens: last.and_then(|m| num_field(m, "tokens")),
        elapsed_s: last.and_then(|m| num_field(m, "elapsed_s")),
        guard_events: events
            .iter()
            .filter_map(|e| e.get("kind")?.as_str())
            .filter(|k| !is_bookkeeping(k))
            .count(),
    }
}

/// The figures of a run directory (empty logs give empty figures).
pub fn figures_of(run: &Path) -> Figures {
    let m = read_jsonl(&run.join("metrics.jsonl")).unwrap_or_default();
    let e = read_jsonl(&run.join("events.jsonl")).unwrap_or_default();
    figures(&m, &e)
}

impl Figures {
    /// (label, value) rows, as the summary and the report show them.
    pub fn rows(&self) -> Vec<(String, String)> {
        let f = |x: Option<f64>, p: usize| x.map_or("—".to_string(), |v| format!("{v:.p$}"));
        vec![
            ("train loss (last step)".into(), f(self.last_loss, 4)),
            (
                format!("train loss (mean of last {})", self.mean_n.max(1)),
                f(self.mean_loss, 4),
            ),
            ("val loss (best)".into(), f(self.best_val, 4)),
            ("val loss (last)".into(), f(self.last_val, 4)),
            ("tokens/s (median)".into(), f(self.median_tps, 0)),
            ("guard events".into(), self.guard_events.to_string()),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn skipped_and_bookkeeping_lines_do_not_count() {
        let mut m: Vec<Value> = (1..=30)
            .map(|s| json!({"step": s, "loss": 2.0, "tokens_per_s": 100.0 + s as f64}))
            .collect();
        m.push(
            json!({"step": 31, "loss": 9.0, "skipped": true, "tokens_per_s": 1.0, "val_loss": 2.5}),
        );
        let e = vec![
            json!({"kind": "checkpoint"}),
            json!({"kind": "spike"}),
            json!({"kind": "skip"}),
        ];
        let f = figures(&m, &e);
        assert_eq!(
            (f.steps, f.last_loss, f.mean_loss, f.mean_n),
            (31, Some(2.0), Some(2.0), 20)
        );
        assert_eq!(f.guard_events, 2);
        assert_eq!(f.median_tps, Some(115.0));
        assert_eq!(f.best_val, Some(2.5));
    }
}
