//! `keel check --sharpness` and `--lr-edge`: the first steps of the run as configured (its
//! data, schedule and optimizer; `train.steps` still sets the schedule) with the sharpness
//! probe (`probe::sharpness`) every few steps, and the LR at Adam's edge of stability that the
//! preconditioned sharpness gives, (2 + 2β₁)/((1 − β₁)·λ_max(P⁻¹H)).
//!
//! What that number is worth was measured, not assumed (docs/check.md#sharpness): on keel's
//! stability grid it sits 96–360× below the LR where training diverges, because Adam trains
//! at its edge of stability (lr/edge ≈ 0.5–1.5 at a good LR) and keeps training far above it.
//! So it is printed as what it is, with `ACCURACY`, and never as a max stable LR.

use crate::config::RunConfig;
use anyhow::{Context, Result};
use serde::Serialize;
use std::path::PathBuf;

/// The route's accuracy as measured on the stability grid (docs/check.md#sharpness); printed
/// beside every result so nobody reads it as more than it is.
pub const ACCURACY: &str = "not a max-stable-LR prediction: on keel's stability grid (widths 64–256, plain and qk-norm; docs/check.md#sharpness) 38/λ after 30 steps at LR 3e-3 was 96–360× below the LR where training diverged (0 of 6 cells within 2×; calibrated by one constant, 5 of 6, where the constant alone gets 6 of 6). It says where Adam's edge of stability is for the LR you train at (lr/edge near 1 is normal for Adam), not where training breaks; for that, sweep the proxies: keel sweep fits the max stable LR across widths and checks the fit on a held-out proxy (docs/sweep.md)";

#[derive(Debug, Clone)]
pub struct EdgeOptions {
    /// Steps of the short run.
    pub steps: u64,
    /// Measure every N steps (and at the last step).
    pub every: u64,
    /// Lanczos iterations per eigenvalue.
    pub iters: usize,
    /// Also λ_max of the plain Hessian.
    pub hessian: bool,
    /// Keep the short run's directory here (default: a temporary one, removed).
    pub out: Option<PathBuf>,
}

impl Default for EdgeOptions {
    fn default() -> Self {
        EdgeOptions {
            steps: 30,
            every: 5,
            iters: 20,
            hessian: false,
            out: None,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct EdgePoint {
    pub step: u64,
    pub lr: f64,
    pub loss: f64,
    pub sharpness: Option<f64>,
    pub sharpness_precond: Option<f64>,
    pub lr_edge: f64,
    pub edge_ratio: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct EdgeReport {
    /// The configured peak LR (`optim.lr`) and warm-up of the short run.
    pub peak_lr: f64,
    pub warmup_steps: u64,
    pub beta1: f64,
    /// (2 + 2β₁)/(1 − β₁): the bound on lr·λ_max(P⁻¹H).
    pub coefficient: f64,
    pub points: Vec<EdgePoint>,
    /// lr_edge at the last measurement: the LR at Adam's edge of stability (not the max
    /// stable LR: see `ACCURACY`).
    pub edge_lr: f64,
    /// lr_edge at the first and last measurement, and their ratio (how it moved).
    pub first_lr_edge: f64,
    pub moved: f64,
    /// The short run's steps, the probe's cost in steps, and both together.
    pub run_steps: u64,
    pub probe_cost_steps: f64,
    pub cost_steps: f64,
    /// The run stopped early (diverged or the guard gave up): why.
    pub stopped: Option<String>,
    pub accuracy: &'static str,
}

/// Run the first `o.steps` steps of `rc` with the probe and read the prediction back from the
/// run's metrics.
pub fn run(rc: &RunConfig, o: &EdgeOptions) -> Result<EdgeReport> {
    let mut cfg = rc.clone();
    let steps = o.steps.max(1);
    if cfg.train.steps < steps {
        cfg.train.steps = steps;
    }
    let every = o.every.clamp(1, steps);
    cfg.telemetry.sharpness_every = every;
    cfg.telemetry.sharpness_iters = o.iters.max(1);
    cfg.telemetry.sharpness_hessian = o.hessian;
    cfg.checkpoint.every = 0;
    cfg.eval.every = 0;
    cfg.train.report = false;
    let (dir, temporary) = match &o.out {
        Some(d) => (d.clone(), false),
        None => (
            std::env::temp_dir().join(format!("keel-lr-edge-{}", std::process::id())),
            true,
        ),
    };
    if temporary {
        let _ = std::fs::remove_dir_all(&dir);
    }
    let result = (|| -> Result<EdgeReport> {
        let summary = crate::train::run(&crate::train::TrainOptions {
            config: cfg.clone(),
            out: dir.clone(),
            config_file: None,
            overrides: Vec::new(),
            progress: false,
            inject: Vec::new(),
            // the last step is measured too, whatever the cadence
            stop_after: Some(steps),
        })?;
        let lines = crate::train::read_jsonl(&dir.join("metrics.jsonl"))
            .with_context(|| format!("{}: the short run's metrics", dir.display()))?;
        let points: Vec<EdgePoint> = lines
            .iter()
            .filter_map(|v| {
                Some(EdgePoint {
                    step: v["step"].as_u64()?,
                    lr: v["lr"].as_f64()?,
                    loss: v["loss"].as_f64()?,
                    sharpness: v["sharpness"].as_f64(),
                    sharpness_precond: v["sharpness_precond"].as_f64(),
                    lr_edge: v["lr_edge"].as_f64()?,
                    edge_ratio: v["edge_ratio"].as_f64()?,
                })
            })
            .collect();
        let (Some(first), Some(last)) = (points.first(), points.last()) else {
            anyhow::bail!(
                "the short run measured no sharpness in {} steps (it stopped at step {}: {}); check the config trains at all with `keel train`",
                steps,
                summary.steps,
                summary.diagnosis.as_deref().unwrap_or("no step was measured")
            );
        };
        let b1 = cfg.optim.beta1;
        let probe: f64 = lines
            .iter()
            .filter_map(|v| v["sharpness_cost_steps"].as_f64())
            .sum();
        Ok(EdgeReport {
            peak_lr: cfg.optim.lr,
            warmup_steps: cfg.schedule.warmup_steps,
            beta1: b1,
            coefficient: (2.0 + 2.0 * b1) / (1.0 - b1),
            edge_lr: last.lr_edge,
            first_lr_edge: first.lr_edge,
            moved: last.lr_edge / first.lr_edge,
            run_steps: summary.steps,
            probe_cost_steps: probe,
            cost_steps: summary.steps as f64 + probe,
            stopped: summary.diagnosis.clone(),
            accuracy: ACCURACY,
            points,
        })
    })();
    if temporary {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

fn g(x: f64) -> String {
    if x.is_finite() && (1e-3..1e4).contains(&x.abs()) {
        format!("{x:.4}")
    } else {
        format!("{x:.3e}")
    }
}

/// The `--sharpness` table.
pub fn print_table(r: &EdgeReport) {
    println!(
        "sharpness over the first {} steps (peak LR {}, warm-up {}, AdamW β₁ {}: stable while lr·λ_max(P⁻¹H) < {:.1})",
        r.run_steps,
        g(r.peak_lr),
        r.warmup_steps,
        r.beta1,
        r.coefficient
    );
    let hess = r.points.iter().any(|p| p.sharpness.is_some());
    print!(
        "{:>6} {:>10} {:>9} {:>12}",
        "step", "lr", "loss", "λ_max(P⁻¹H)"
    );
    if hess {
        print!(" {:>10}", "λ_max(H)");
    }
    println!(" {:>10} {:>10}", "lr_edge", "lr/edge");
    for p in &r.points {
        print!(
            "{:>6} {:>10} {:>9.4} {:>12}",
            p.step,
            g(p.lr),
            p.loss,
            p.sharpness_precond.map(g).unwrap_or_default()
        );
        if hess {
            print!(" {:>10}", p.sharpness.map(g).unwrap_or_default());
        }
        println!(" {:>10} {:>10.3}", g(p.lr_edge), p.edge_ratio);
    }
}

/// The edge-of-stability LR with its movement over the run, cost and accuracy.
pub fn print_prediction(r: &EdgeReport) {
    let last = r.points.last();
    println!(
        "Adam's edge-of-stability LR: {} ({:.0}/λ_max(P⁻¹H) at step {}, where the LR was {} (lr/edge {:.2}); it moved ×{:.2} from {} at step {})",
        g(r.edge_lr),
        r.coefficient,
        last.map_or(0, |p| p.step),
        last.map_or_else(String::new, |p| g(p.lr)),
        last.map_or(f64::NAN, |p| p.edge_ratio),
        r.moved,
        g(r.first_lr_edge),
        r.points.first().map_or(0, |p| p.step),
    );
    println!(
        "  cost: {} steps + {:.0} step-equivalents of Hessian-vector products = {:.0} steps",
        r.run_steps, r.probe_cost_steps, r.cost_steps
    );
    if let Some(why) = &r.stopped {
        println!("  the short run stopped early: {why}");
    }
    println!("  accuracy: {}", r.accuracy);
}
