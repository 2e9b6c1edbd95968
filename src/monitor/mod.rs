//! Guarded training, the pure part: detectors over a stream of per-step metrics and the
//! escalating recovery policy. No I/O here: `train` (the live guard) and `keel watch` (any
//! trainer's log) feed the same `Monitor`, so both see the same events.
//!
//! Detectors (thresholds in `[guard]`, defaults from the anchors):
//! - `nonfinite`: loss or gradient norm is NaN/inf.
//! - `loss_spike`: robust z-score of the loss ≥ `loss_z` (OLMo-core and Levanter use
//!   mean + 6σ over 128 steps): z = (x − median of the last 16) / σ, σ = 1.4826·MAD of the
//!   successive differences over the last `window` accepted steps / √2 (a downward trend
//!   does not inflate it), floored at `sigma_floor`·median; or loss ≥ `loss_ratio` × the
//!   window mean (llm-foundry's 2×).
//! - `grad_spike` (warning): the same z of ln(gradient norm) over `grad_window` steps
//!   ≥ `grad_z`, and the norm ≥ `grad_ratio` × the median. A warning, not a skip: clipping
//!   bounds the update, and a skipped step leaves the same weights to spike again (measured:
//!   tiny at lr 1e-2 spiked 29× at step 185 and trained on to a better loss unskipped).
//! - `divergence`: the mean of the last `diverge_window` accepted losses exceeds the best such
//!   mean by `diverge_ratio`; or `persist` consecutive steps had a flagged loss (the weights,
//!   not one batch, are bad).
//! - `attn_logit` / `logit_drift` (warnings): max attention logit above `attn_logit_max`;
//!   |mean output log-partition| above `logit_z_max`.
//!
//! Flagged steps never enter the windows (they are skipped by the live guard), so one
//! spike cannot raise the bar for the next.

mod policy;

pub use policy::{Action, Decision, Policy, PolicyState};

/// A factor as people write it: 0.33, 0.037, 0.0012 (two significant digits).
pub fn short_factor(x: f64) -> String {
    if !x.is_finite() || x <= 0.0 {
        return format!("{x}");
    }
    let decimals = (1 - x.log10().floor() as i32).clamp(0, 12) as usize;
    let s = format!("{x:.decimals$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

use serde::{Deserialize, Serialize};
use std::collections::VecDeque;

/// `[guard]`: detector thresholds and policy limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GuardConfig {
    /// Act on detections (skip / LR back-off / rollback / give up). Off: detect and log only.
    pub enabled: bool,
    /// Accepted steps the spike statistics look back over.
    pub window: usize,
    /// Accepted steps needed before the windowed detectors speak.
    pub min_history: usize,
    pub loss_z: f64,
    pub loss_ratio: f64,
    pub grad_z: f64,
    pub grad_ratio: f64,
    pub grad_window: usize,
    /// Floor on the robust σ, relative to the median (keeps a flat series from flagging noise).
    pub sigma_floor: f64,
    pub diverge_window: usize,
    pub diverge_ratio: f64,
    /// Consecutive flagged steps that count as divergence.
    pub persist: usize,
    pub attn_logit_max: f64,
    pub logit_z_max: f64,
    /// Skips within `incident_window` steps before the LR is lowered.
    pub skips_before_backoff: usize,
    pub incident_window: u64,
    /// LR multiplier while backed off, and for how many steps.
    pub lr_backoff: f64,
    /// LR multiplier applied for good at each rollback.
    pub rollback_lr_factor: f64,
    pub backoff_steps: u64,
    /// A safety bound on rollbacks; the LR walk-down (`lr_floor`, `walk_patience`) is what
    /// normally decides when to give up.
    pub max_rollbacks: u32,
    /// The lowest LR multiplier rollbacks walk down to. A divergence at the floor gives up.
    pub lr_floor: f64,
    /// Rollbacks in a row whose restored weights ran no longer before the next divergence
    /// than the previous ones did: lowering the LR stopped helping, so give up.
    pub walk_patience: u32,
    /// The same for the early attention rule: cuts in a row that did not delay the next early
    /// warning before the rule stops acting (it never gives up a run). 1: measured on the HF
    /// example at 30x, a second such cut took the LR to x1/81 and ended 27% above the stable run.
    pub early_patience: u32,
    /// Total skipped steps before giving up.
    pub max_skips: u64,
    /// An attention-logit warning within this many steps of the start (or of the last
    /// rollback) rolls back and multiplies the LR by `early_lr_factor`: in the stability sweep
    /// (docs/sweep.md) that warning came before 34 of 36 degraded plain-model runs, at steps 3–17,
    /// before the loss showed anything. 0 = off.
    pub early_window: u64,
    /// ×1/4 (was 1/3: on the HF example at 100x the walk-down stopped at 1/27, 3.7x the stable
    /// LR, and ended 11.5% above the stable run; at 1/4 it ends within 1%).
    pub early_lr_factor: f64,
    /// After a rollback, this many steps with nothing flagged close the incident (the
    /// restored weights are clean): snapshots and checkpoints resume, so a later incident
    /// rolls back to them instead of throwing these steps away. Without a rollback an
    /// incident closes `incident_window` steps after its last flag.
    pub clean_after_rollback: u64,
    /// `keel train`: a first-step loss above this × ln(vocab) means the init is broken
    /// (σ far too large); every weight matrix is then rescaled to HF's σ 0.02, keeping its
    /// direction, before any update. 0 = off.
    pub init_rescue: f64,
    /// Steps in a row a GradScaler skipped for inf/NaN fp16 gradients that make an incident
    /// (a `scaler_overflow` divergence: fp16 runs diverge this way, with no loss to see); a
    /// warning at half as many. A few at the start are the scaler finding its scale. 0 = off.
    pub scaler_skips: u64,
}

impl Default for GuardConfig {
    fn default() -> Self {
        GuardConfig {
            enabled: true,
            window: 128,
            min_history: 16,
            loss_z: 6.0,
            loss_ratio: 2.0,
            grad_z: 6.0,
            grad_ratio: 5.0,
            grad_window: 32,
            sigma_floor: 0.01,
            diverge_window: 20,
            diverge_ratio: 1.3,
            persist: 3,
            attn_logit_max: 100.0,
            logit_z_max: 50.0,
            skips_before_backoff: 3,
            incident_window: 50,
            lr_backoff: 0.5,
            rollback_lr_factor: 0.5,
            backoff_steps: 100,
            max_rollbacks: 10,
            lr_floor: 0.01,
            walk_patience: 2,
            early_patience: 1,
            max_skips: 200,
            early_window: 30,
            early_lr_factor: 0.25,
            clean_after_rollback: 10,
            init_rescue: 2.0,
            scaler_skips: 10,
        }
    }
}

impl GuardConfig {
    /// Check ranges; the error names the `guard.` key and the fix.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let bad = |k: &str, why: &str| Err((format!("guard.{k}"), why.to_string()));
        if self.window < 4 {
            return bad("window", "must be at least 4 steps");
        }
        if self.min_history < 4 || self.min_history > self.window.min(self.grad_window) {
            return bad(
                "min_history",
                "must be between 4 and the smaller of guard.window and guard.grad_window",
            );
        }
        for (k, v) in [
            ("loss_z", self.loss_z),
            ("grad_z", self.grad_z),
            ("attn_logit_max", self.attn_logit_max),
            ("logit_z_max", self.logit_z_max),
        ] {
            if v.is_nan() || v <= 0.0 {
                return bad(k, "must be a positive number");
            }
        }
        for (k, v) in [
            ("loss_ratio", self.loss_ratio),
            ("grad_ratio", self.grad_ratio),
            ("diverge_ratio", self.diverge_ratio),
        ] {
            if v.is_nan() || v <= 1.0 {
                return bad(k, "must be greater than 1");
            }
        }
        if !(self.lr_backoff > 0.0 && self.lr_backoff < 1.0) {
            return bad("lr_backoff", "must be in (0, 1)");
        }
        if !(self.early_lr_factor > 0.0 && self.early_lr_factor < 1.0) {
            return bad("early_lr_factor", "must be in (0, 1)");
        }
        if !(self.init_rescue == 0.0 || self.init_rescue > 1.0) {
            return bad("init_rescue", "must be 0 (off) or greater than 1");
        }
        if !(self.lr_floor > 0.0 && self.lr_floor <= 1.0) {
            return bad("lr_floor", "must be in (0, 1]");
        }
        if self.walk_patience < 1 {
            return bad("walk_patience", "must be at least 1");
        }
        if self.early_patience < 1 {
            return bad("early_patience", "must be at least 1");
        }
        if !(self.rollback_lr_factor > 0.0 && self.rollback_lr_factor <= 1.0) {
            return bad("rollback_lr_factor", "must be in (0, 1]");
        }
        if self.persist < 2 {
            return bad("persist", "must be at least 2");
        }
        if self.diverge_window < 2 {
            return bad("diverge_window", "must be at least 2");
        }
        if self.skips_before_backoff < 1 {
            return bad("skips_before_backoff", "must be at least 1");
        }
        Ok(())
    }
}

/// One step's scalars, as logged (absent fields are simply not checked).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct StepMetrics {
    pub step: u64,
    /// NaN for a non-finite or missing loss (a logged `null`).
    pub loss: f64,
    pub grad_norm: Option<f64>,
    pub max_attn_logit: Option<f64>,
    /// Mean log-partition of the output logits.
    pub logit_z: Option<f64>,
    /// The scheduled learning rate of this step (the schedule's, before the guard's factor):
    /// the early rule stays on while it rises (warm-up) and for `early_window` steps after it
    /// last rose, and caps the LR at a fraction of the one its warning came at.
    pub lr: Option<f64>,
    /// Set on a step a GradScaler skipped (inf/NaN fp16 gradients, no update): how many
    /// steps in a row it has skipped, this one included. Only the `scaler_overflow` rule
    /// reads such a step; its loss never enters the windows.
    pub scaler_skips: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    /// Early signal: logged, no action.
    Warning,
    /// This step is bad: skip its update.
    Spike,
    /// The run is going wrong beyond one batch.
    Divergence,
}

/// A detector firing: what, at which step, the value, the threshold and the window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Detection {
    pub step: u64,
    pub kind: Severity,
    pub detector: String,
    /// NaN is written as null.
    pub value: f64,
    pub threshold: f64,
    pub window: usize,
    /// The condition in words, e.g. "robust z 9.3 ≥ 6 (median 2.41, σ 0.05)".
    pub reason: String,
}

/// Detector state: windows of accepted values and the flags that stop warnings repeating.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MonitorState {
    pub losses: VecDeque<f64>,
    pub grads: VecDeque<f64>,
    /// Accepted losses for the divergence mean (the last `diverge_window`).
    pub recent: VecDeque<f64>,
    pub best_recent_mean: Option<f64>,
    pub consecutive_flagged: usize,
    pub diverging: bool,
    pub attn_warned: bool,
    pub logit_warned: bool,
    /// The scaler-overflow warning of the current run of skipped steps was given.
    #[serde(default)]
    pub scaler_warned: bool,
}

/// Everything the guard remembers, saved with each checkpoint.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GuardSnapshot {
    pub monitor: MonitorState,
    pub policy: PolicyState,
}

pub struct Monitor {
    pub cfg: GuardConfig,
    pub state: MonitorState,
    scratch: Vec<f64>,
}

/// Robust level and noise of a window, reusing `scratch`: the median of the last 16 values
/// (the current level, not the window's: losses trend down) and σ from the successive
/// differences, 1.4826·MAD(Δ)/√2, which a slow trend does not inflate.
fn robust_stats(w: &VecDeque<f64>, scratch: &mut Vec<f64>) -> (f64, f64) {
    scratch.clear();
    scratch.extend(w.iter().rev().take(16).copied());
    scratch.sort_by(|a, b| a.total_cmp(b));
    let med = median_sorted(scratch);
    scratch.clear();
    scratch.extend(w.iter().zip(w.iter().skip(1)).map(|(a, b)| b - a));
    if scratch.is_empty() {
        return (med, 0.0);
    }
    scratch.sort_by(|a, b| a.total_cmp(b));
    let dmed = median_sorted(scratch);
    for x in scratch.iter_mut() {
        *x = (*x - dmed).abs();
    }
    scratch.sort_by(|a, b| a.total_cmp(b));
    (
        med,
        1.4826 * median_sorted(scratch) / std::f64::consts::SQRT_2,
    )
}

fn median_sorted(s: &[f64]) -> f64 {
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        0.5 * (s[n / 2 - 1] + s[n / 2])
    }
}

fn push_bounded(w: &mut VecDeque<f64>, x: f64, cap: usize) {
    if w.len() == cap {
        w.pop_front();
    }
    w.push_back(x);
}

impl Monitor {
    pub fn new(cfg: GuardConfig) -> Self {
        Monitor {
            scratch: Vec::with_capacity(cfg.window),
            cfg,
            state: MonitorState::default(),
        }
    }

    pub fn with_state(cfg: GuardConfig, state: MonitorState) -> Self {
        let mut m = Monitor::new(cfg);
        m.state = state;
        m
    }

    /// Feed one step; returns what fired (empty on a healthy step).
    pub fn observe(&mut self, m: &StepMetrics) -> Vec<Detection> {
        let c = self.cfg.clone();
        let mut out = Vec::new();
        let det =
            |kind, detector: &str, value: f64, threshold: f64, window, reason: String| Detection {
                step: m.step,
                kind,
                detector: detector.to_string(),
                value,
                threshold,
                window,
                reason,
            };
        if let Some(k) = m.scaler_skips.filter(|&k| k > 0) {
            // a step the GradScaler skipped: no update was made, so its loss and norm say
            // nothing about the weights; only a long run of skips does
            let s = &mut self.state;
            if c.scaler_skips > 0 && k.is_multiple_of(c.scaler_skips) {
                s.scaler_warned = false;
                out.push(det(
                    Severity::Divergence,
                    "scaler_overflow",
                    k as f64,
                    c.scaler_skips as f64,
                    k as usize,
                    format!(
                        "the GradScaler skipped {k} steps in a row (inf/NaN fp16 gradients at every scale it tried): the weights or the LR, not one batch"
                    ),
                ));
            } else if c.scaler_skips > 0
                && 2 * k >= c.scaler_skips
                && k < c.scaler_skips
                && !s.scaler_warned
            {
                s.scaler_warned = true;
                out.push(det(
                    Severity::Warning,
                    "scaler_overflow",
                    k as f64,
                    c.scaler_skips.div_ceil(2) as f64,
                    k as usize,
                    format!("the GradScaler skipped {k} steps in a row (inf/NaN fp16 gradients)"),
                ));
            }
            return out;
        }
        self.state.scaler_warned = false;
        let g = m.grad_norm.unwrap_or(0.0);
        if !m.loss.is_finite() || !g.is_finite() {
            let (what, v) = if !m.loss.is_finite() {
                ("loss", m.loss)
            } else {
                ("gradient norm", g)
            };
            out.push(det(
                Severity::Spike,
                "nonfinite",
                v,
                f64::INFINITY,
                1,
                format!("{what} is not finite"),
            ));
        } else {
            let s = &mut self.state;
            // the ratio rule speaks from the first accepted step (blow-ups can be immediate);
            // the z rule needs a window to estimate σ
            if !s.losses.is_empty() {
                let (med, sd) = robust_stats(&s.losses, &mut self.scratch);
                // the floor keeps a flat series from flagging noise; for a series at zero it
                // is an absolute 1e-6 (a loss of exactly 0 forever, then 1e-9, is not a spike)
                let sd = sd.max(c.sigma_floor * med.abs()).max(1e-6);
                let z = (m.loss - med) / sd;
                let mean = s.losses.iter().sum::<f64>() / s.losses.len() as f64;
                if z >= c.loss_z && s.losses.len() >= c.min_history {
                    out.push(det(
                        Severity::Spike,
                        "loss_spike",
                        m.loss,
                        med + c.loss_z * sd,
                        s.losses.len(),
                        format!(
                            "robust z {z:.1} ≥ {} (median {med:.4}, σ {sd:.4})",
                            c.loss_z
                        ),
                    ));
                } else if mean > 0.0 && m.loss >= c.loss_ratio * mean {
                    // a ratio means nothing for a window at or below zero (a constant-zero or
                    // negative objective): there only the z rule speaks
                    out.push(det(
                        Severity::Spike,
                        "loss_spike",
                        m.loss,
                        c.loss_ratio * mean,
                        s.losses.len(),
                        format!("{:.2}× the running mean {mean:.4}", m.loss / mean),
                    ));
                }
            }
            if let Some(g) = m.grad_norm {
                if s.grads.len() >= c.min_history && g > 0.0 {
                    // the window holds ln(norm)
                    let (lmed, lsd) = robust_stats(&s.grads, &mut self.scratch);
                    let lsd = lsd.max(c.sigma_floor).max(1e-12);
                    let z = (g.ln() - lmed) / lsd;
                    let (med, sd) = (lmed.exp(), lsd);
                    if z >= c.grad_z && g >= c.grad_ratio * med {
                        // an early signal, not a skip: clipping bounds the update, and skipping
                        // leaves the same weights to spike again on the next batch
                        out.push(det(
                            Severity::Warning,
                            "grad_spike",
                            g,
                            (lmed + c.grad_z * sd).exp().max(c.grad_ratio * med),
                            s.grads.len(),
                            format!(
                                "robust z {z:.1} ≥ {} and {:.1}× the median {med:.4}",
                                c.grad_z,
                                g / med
                            ),
                        ));
                    }
                }
            }
        }
        let s = &mut self.state;
        let flagged = out.iter().any(|d| d.kind == Severity::Spike);
        if !flagged {
            s.consecutive_flagged = 0;
            push_bounded(&mut s.losses, m.loss, c.window);
            // a grad-norm outlier stays out of its own window
            let g_out = out.iter().any(|d| d.detector == "grad_spike");
            if let Some(g) = m.grad_norm.filter(|&g| g > 0.0 && !g_out) {
                push_bounded(&mut s.grads, g.ln(), c.grad_window);
            }
            push_bounded(&mut s.recent, m.loss, c.diverge_window);
            if s.recent.len() == c.diverge_window {
                let mean = s.recent.iter().sum::<f64>() / s.recent.len() as f64;
                let best = s.best_recent_mean.map_or(mean, |b| b.min(mean));
                s.best_recent_mean = Some(best);
                // a ratio to the best mean is defined for positive losses only
                if best > 0.0 && mean > c.diverge_ratio * best {
                    if !s.diverging {
                        s.diverging = true;
                        out.push(det(
                            Severity::Divergence,
                            "divergence",
                            mean,
                            c.diverge_ratio * best,
                            c.diverge_window,
                            format!(
                                "mean loss of the last {} steps {mean:.4} is {:.2}× the best {best:.4}",
                                c.diverge_window,
                                mean / best
                            ),
                        ));
                    }
                } else {
                    s.diverging = false;
                }
            }
        } else {
            s.consecutive_flagged += 1;
            if s.consecutive_flagged == c.persist {
                out.push(det(
                    Severity::Divergence,
                    "persistent",
                    s.consecutive_flagged as f64,
                    c.persist as f64,
                    c.persist,
                    format!(
                        "{} consecutive steps flagged: the weights, not one batch, are bad",
                        c.persist
                    ),
                ));
            }
        }
        // warnings fire once per crossing, again only after the value came back below
        let mut warn = |flag: &mut bool, v: Option<f64>, limit: f64, name: &str, why: &str| {
            if let Some(v) = v {
                if v.is_finite() && v.abs() > limit {
                    if !*flag {
                        *flag = true;
                        out.push(det(Severity::Warning, name, v, limit, 1, why.to_string()));
                    }
                } else {
                    *flag = false;
                }
            }
        };
        warn(
            &mut s.attn_warned,
            m.max_attn_logit,
            c.attn_logit_max,
            "attn_logit",
            "max attention logit is growing: softmax saturates (consider qk-norm, lower LR or smaller init)",
        );
        warn(
            &mut s.logit_warned,
            m.logit_z,
            c.logit_z_max,
            "logit_drift",
            "output log-partition drifts from 0 (consider z-loss or a smaller head init)",
        );
        out
    }
}

/// The live guard: the detectors and the policy together, as `keel train` and the Python
/// package (`keel.Guard`) drive them. With `enabled = false` it detects and reports only:
/// no action is ever decided and the LR factor stays 1 (an unguarded baseline).
pub struct Guard {
    pub monitor: Monitor,
    pub policy: Policy,
}

impl Guard {
    pub fn new(cfg: GuardConfig) -> Self {
        Guard::with_snapshot(cfg, GuardSnapshot::default())
    }

    /// Resume from a saved state (a checkpoint's `state.json`, or `Guard.state_dict()`).
    pub fn with_snapshot(cfg: GuardConfig, snap: GuardSnapshot) -> Self {
        Guard {
            monitor: Monitor::with_state(cfg.clone(), snap.monitor),
            policy: Policy::with_state(cfg, snap.policy),
        }
    }

    pub fn enabled(&self) -> bool {
        self.monitor.cfg.enabled
    }

    pub fn snapshot(&self) -> GuardSnapshot {
        GuardSnapshot {
            monitor: self.monitor.state.clone(),
            policy: self.policy.state.clone(),
        }
    }

    /// Start of `step`: a temporary LR back-off that has run its course is lifted.
    pub fn begin_step(&mut self, step: u64) -> Option<Action> {
        let a = self.policy.begin_step(step);
        a.filter(|_| self.enabled())
    }

    /// LR multiplier in force for the step last observed (1 when the guard only watches).
    pub fn lr_factor(&self) -> f64 {
        self.lr_factor_at(self.policy.state.last_lr)
    }

    /// LR multiplier for a step whose scheduled LR is `lr` (the early rule's cap depends on
    /// it; 1 when the guard only watches).
    pub fn lr_factor_at(&self, lr: Option<f64>) -> f64 {
        if self.enabled() {
            self.policy.lr_factor_at(lr)
        } else {
            1.0
        }
    }

    /// Whether an incident is open (checkpoints and snapshots wait for a quiet step, so a
    /// rollback target never holds damaged weights).
    pub fn in_incident(&self) -> bool {
        self.enabled() && self.policy.state.incident_start.is_some()
    }

    /// After a rollback: the detector windows go back to those saved with the restored
    /// state (empty for the initial weights), so the restored weights' losses are judged
    /// against their own history, not against the later weights'. The policy's state (its
    /// rollback count, the lowered LR) carries on.
    pub fn restore_detectors(&mut self, state: MonitorState) {
        self.monitor.state = state;
    }

    /// One step's metrics → what fired and what to do about it.
    pub fn observe(&mut self, m: &StepMetrics) -> (Vec<Detection>, Decision) {
        let detections = self.monitor.observe(m);
        self.policy.note_lr(m.step, m.lr);
        let decision = if self.enabled() {
            self.policy.decide(m.step, &detections)
        } else {
            Decision::default()
        };
        (detections, decision)
    }
}

impl Severity {
    /// The `kind` of its line in events.jsonl.
    pub fn event_kind(self) -> &'static str {
        match self {
            Severity::Warning => "warning",
            Severity::Spike => "spike",
            Severity::Divergence => "divergence",
        }
    }
}

impl Action {
    /// The `kind` and `detail` of its line in events.jsonl (a rollback's detail is the
    /// trainer's: it knows what was restored).
    pub fn event(&self) -> (&'static str, serde_json::Value) {
        use serde_json::json;
        match self {
            Action::Skip => ("skip", json!({})),
            Action::LrBackoff { factor, until_step } if *until_step == u64::MAX => (
                "lr_backoff",
                json!({"factor": factor, "until_step": null, "permanent": true}),
            ),
            Action::LrBackoff { factor, until_step } => (
                "lr_backoff",
                json!({"factor": factor, "until_step": until_step}),
            ),
            Action::LrRestore => ("lr_restore", json!({})),
            Action::Rollback { before_step } => (
                "rollback",
                json!({"reason": format!("incident began at step {before_step}"), "before_step": before_step}),
            ),
            Action::GiveUp { diagnosis } => ("give_up", json!({"diagnosis": diagnosis})),
            Action::EarlyRuleOff { reason } => ("early_rule_off", json!({"reason": reason})),
            Action::LrCap { lr } => ("lr_cap", json!({"lr": lr})),
            Action::BadBatch { steps, reason } => {
                ("bad_batch", json!({"steps": steps, "reason": reason}))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(step: u64, loss: f64, g: f64) -> StepMetrics {
        StepMetrics {
            step,
            loss,
            grad_norm: Some(g),
            max_attn_logit: None,
            logit_z: None,
            ..Default::default()
        }
    }

    #[test]
    fn a_long_run_of_scaler_skips_is_an_incident() {
        let mut m = Monitor::new(GuardConfig::default());
        for i in 1..40 {
            m.observe(&step(i, 3.0, 1.0));
        }
        let skipped = |s, k| StepMetrics {
            scaler_skips: Some(k),
            ..step(s, f64::NAN, f64::INFINITY)
        };
        // the scaler finding its scale: a few skips say nothing, not even the NaN
        for k in 1..5 {
            assert!(m.observe(&skipped(40 + k, k)).is_empty());
        }
        let d = m.observe(&skipped(45, 5));
        assert_eq!(
            (d[0].detector.as_str(), d[0].kind),
            ("scaler_overflow", Severity::Warning)
        );
        for k in 6..10 {
            assert!(m.observe(&skipped(40 + k, k)).is_empty());
        }
        let d = m.observe(&skipped(50, 10));
        assert_eq!(
            (d[0].detector.as_str(), d[0].kind),
            ("scaler_overflow", Severity::Divergence)
        );
        // skipped steps never entered the windows: the next real step is judged as before
        assert!(m.observe(&step(51, 3.0, 1.0)).is_empty());
        assert_eq!(m.state.losses.len(), 40, "39 before the skips, and step 51");
    }

    /// A decreasing noisy loss, as a healthy run gives.
    fn healthy(i: u64) -> (f64, f64) {
        let noise = ((i * 2654435761) % 1000) as f64 / 1000.0 - 0.5;
        (
            2.0 + 3.0 * (-(i as f64) / 50.0).exp() + 0.05 * noise,
            1.0 + 0.1 * noise,
        )
    }

    #[test]
    fn healthy_stream_is_quiet() {
        let mut m = Monitor::new(GuardConfig::default());
        for i in 1..2000 {
            let (l, g) = healthy(i);
            assert!(m.observe(&step(i, l, g)).is_empty(), "false alarm at {i}");
        }
    }

    #[test]
    fn each_detector_fires_on_its_signal() {
        let mut m = Monitor::new(GuardConfig::default());
        for i in 1..200 {
            let (l, g) = healthy(i);
            m.observe(&step(i, l, g));
        }
        let d = m.observe(&step(200, f64::NAN, 1.0));
        assert_eq!(d[0].detector, "nonfinite", "{d:?}");
        let d = m.observe(&step(201, 3.5, 1.0));
        assert_eq!(d[0].detector, "loss_spike", "{d:?}");
        assert!(d[0].reason.contains("robust z"));
        // third consecutive flagged loss: persistent
        let d = m.observe(&step(202, 3.6, 1.0));
        assert!(d.iter().any(|d| d.detector == "persistent"), "{d:?}");
        // a gradient-norm outlier alone is a warning
        let d = m.observe(&step(203, 2.0, 30.0));
        assert_eq!(
            (d[0].detector.as_str(), d[0].kind),
            ("grad_spike", Severity::Warning)
        );
        assert!(m.observe(&step(204, 2.0, 1.0)).is_empty());
        // a slow climb that never spikes is divergence
        let mut fired = false;
        for i in 0..200u64 {
            let d = m.observe(&step(205 + i, 2.0 * 1.003f64.powi(i as i32), 1.0));
            assert!(d.iter().all(|d| d.detector != "loss_spike"), "{d:?}");
            fired |= d.iter().any(|d| d.detector == "divergence");
        }
        assert!(fired);
        let w = m.observe(&StepMetrics {
            max_attn_logit: Some(500.0),
            logit_z: Some(-80.0),
            ..step(500, 2.0, 1.0)
        });
        assert!(w.iter().any(|d| d.detector == "attn_logit"));
        assert!(w.iter().any(|d| d.detector == "logit_drift"));
    }

    #[test]
    fn restored_detectors_judge_restored_weights_by_their_own_history() {
        // trained down to ~2.0; a rollback to the initial weights brings the loss back to ~5
        let mut g = Guard::new(GuardConfig::default());
        let fresh = g.monitor.state.clone();
        for i in 1..300 {
            let (l, gn) = healthy(i);
            g.observe(&step(i, l, gn));
        }
        let (d, _) = g.observe(&step(300, 5.0, 1.0));
        assert!(d.iter().any(|d| d.detector == "loss_spike"), "{d:?}");
        let policy = g.policy.state.clone();
        g.restore_detectors(fresh);
        assert_eq!(g.policy.state, policy); // the policy's memory carries on
        let (d, dec) = g.observe(&step(301, 5.0, 1.0));
        assert!(d.is_empty() && !dec.skip, "{d:?}");
    }

    #[test]
    fn zero_and_negative_losses_are_not_spikes() {
        // a constant-zero objective, a constant negative one, and one drifting below zero
        for base in [0.0, -1.0, -5.0] {
            let mut m = Monitor::new(GuardConfig::default());
            for i in 1..300u64 {
                let d = m.observe(&step(i, base, 1.0));
                assert!(d.is_empty(), "loss {base} at {i}: {d:?}");
            }
        }
        let mut m = Monitor::new(GuardConfig::default());
        for i in 1..300u64 {
            let (l, g) = healthy(i);
            let d = m.observe(&step(i, l - 3.0 - i as f64 * 0.001, g));
            assert!(d.is_empty(), "at {i}: {d:?}");
        }
        // the z rule still speaks below zero
        let mut m = Monitor::new(GuardConfig::default());
        for i in 1..100u64 {
            let (l, g) = healthy(i);
            m.observe(&step(i, l - 10.0, g));
        }
        let d = m.observe(&step(100, 5.0, 1.0));
        assert!(d.iter().any(|d| d.detector == "loss_spike"), "{d:?}");
        assert!(d.iter().all(|d| !d.reason.contains("NaN")), "{d:?}");
    }

    #[test]
    fn ratio_rule_catches_a_spike_in_a_noisy_window() {
        let mut m = Monitor::new(GuardConfig::default());
        for i in 1..=100 {
            // very noisy: z alone would need a huge jump
            m.observe(&step(i, if i % 2 == 0 { 1.0 } else { 3.0 }, 1.0));
        }
        let d = m.observe(&step(101, 4.5, 1.0));
        assert_eq!(d[0].detector, "loss_spike");
        assert!(d[0].reason.contains("running mean"), "{d:?}");
    }
}
