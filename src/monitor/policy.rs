//! The escalating recovery policy: skip the update → lower the LR for a while → roll back to
//! the last good checkpoint past the bad batches → give up (exit 2) with a diagnosis.
//! Each rung has a limit, so the guard can never loop forever.
//!
//! - every Spike (one bad step) is skipped;
//! - `skips_before_backoff` skips within `incident_window` steps: LR × `lr_backoff` for
//!   `backoff_steps`, then restored;
//! - that many skips again while backed off, or a Divergence: roll back, and lower the LR by
//!   `rollback_lr_factor` (`early_lr_factor` for an early attention warning) for the rest of
//!   the run: the LR walks down at each rollback, to `lr_floor` at the lowest;
//! - a non-finite loss is skipped and held: when the same weights (the update was skipped)
//!   give a finite loss on the next batch, the batch was bad (`BadBatch`): it counts toward
//!   no back-off and opens no incident; two in a row count as any skips do (three in a row
//!   are a `persistent` divergence, as before);
//! - give up when the walk-down stops helping: a divergence at the floor, or `walk_patience`
//!   rollbacks in a row after which the restored weights ran no longer before the next
//!   incident than before the previous cut; also after `max_rollbacks` (a safety bound) or
//!   `max_skips` skips. The early attention rule acts within `early_window` steps of the
//!   start, of a rollback, or of the last step the scheduled LR rose (so through a warm-up
//!   of any length). An early attention warning never ends a run: where the walk-down stops
//!   helping (`early_patience` cuts in a row that did not delay it, or the floor), the early rule stops acting (the warning is still
//!   logged; ignoring it costs nothing the loss detectors would not catch), because an
//!   unguarded run would have trained on (measured: tinyshakespeare with its own BPE at peak
//!   LR 0.2 gave up after three rollbacks at LR 0.011, a rate that trains to within 8% of the
//!   stable run).

use super::{short_factor, Detection, GuardConfig, Severity};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;

/// What the trainer must do at this step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Action {
    Skip,
    LrBackoff {
        factor: f64,
        until_step: u64,
    },
    LrRestore,
    /// Restore the newest checkpoint older than `before_step` (the weights that produced the
    /// first flagged loss of this incident were already suspect).
    Rollback {
        before_step: u64,
    },
    GiveUp {
        diagnosis: String,
    },
    /// Early attention warnings stop rolling back: lowering the LR did not help.
    EarlyRuleOff {
        reason: String,
    },
    /// The early rule capped the LR for good at `lr` (absolute; the schedule goes on below).
    LrCap {
        lr: f64,
    },
    /// Non-finite losses that the same weights followed with a clean step: the batches were
    /// bad, not the LR. Their skips count toward nothing else.
    BadBatch {
        steps: Vec<u64>,
        reason: String,
    },
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Decision {
    /// Do not apply this step's update.
    pub skip: bool,
    pub actions: Vec<Action>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PolicyState {
    pub recent_skips: VecDeque<u64>,
    pub total_skips: u64,
    pub backoff_until: Option<u64>,
    pub lr_factor: f64,
    /// The LR multiplier a temporary back-off returns to (lowered for good by rollbacks;
    /// 0 means 1, for states saved before it existed).
    #[serde(default)]
    pub base_factor: f64,
    pub rollbacks: u32,
    pub incident_start: Option<u64>,
    pub last_flag: Option<u64>,
    /// Step of the last rollback (the early window counts from it; None: from the start).
    #[serde(default)]
    pub restart: Option<u64>,
    /// First flagged step since the last rollback (or the start): how long the weights
    /// restored last ran clean, which says whether lowering the LR helped.
    #[serde(default)]
    pub first_flag: Option<u64>,
    /// Clean steps the previous restored weights ran before their incident.
    #[serde(default)]
    pub last_survival: Option<u64>,
    /// Rollbacks in a row that did not lengthen the clean run.
    #[serde(default)]
    pub stalls: u32,
    /// The early attention rule stopped acting (lowering the LR did not help).
    #[serde(default)]
    pub early_off: bool,
    /// The last step at which the scheduled LR rose (warm-up, a restart): the early rule
    /// stays on `early_window` steps past it.
    #[serde(default)]
    pub lr_rise: Option<u64>,
    #[serde(default)]
    pub last_lr: Option<f64>,
    /// The highest LR the early rule allows (an LR found too high while it rose): the update
    /// LR is min(scheduled × factor, cap).
    #[serde(default)]
    pub lr_cap: Option<f64>,
    /// The highest scheduled LR noted (the cap scales the schedule past its peak).
    #[serde(default)]
    pub lr_max: Option<f64>,
    /// Skipped non-finite losses not yet judged: a clean step next makes them bad batches.
    #[serde(default)]
    pub pending_nonfinite: Vec<u64>,
    /// (last_flag, first_flag, incident_start) before the held non-finite losses: a bad
    /// batch opens no incident.
    #[serde(default)]
    pub pre_nonfinite: Option<(Option<u64>, Option<u64>, Option<u64>)>,
}

/// Why a rollback was asked for: the early rule may be switched off, a divergence gives up.
#[derive(Clone, Copy, PartialEq)]
enum Cause {
    Early,
    Loss,
}

pub struct Policy {
    pub cfg: GuardConfig,
    pub state: PolicyState,
}

impl Policy {
    pub fn new(cfg: GuardConfig) -> Self {
        Policy {
            cfg,
            state: PolicyState {
                lr_factor: 1.0,
                ..Default::default()
            },
        }
    }

    pub fn with_state(cfg: GuardConfig, state: PolicyState) -> Self {
        let mut p = Policy::new(cfg);
        if state.lr_factor > 0.0 {
            p.state = state;
        }
        p
    }

    /// LR multiplier in force for the step last noted (call `begin_step` first).
    pub fn lr_factor(&self) -> f64 {
        self.lr_factor_at(self.state.last_lr)
    }

    /// The LR multiplier for a step whose scheduled LR is `lr`: the factor in force and, under
    /// the early rule's cap, no more than cap / (the highest scheduled LR so far): the warm-up
    /// climbs no higher than the cap, and past the peak the schedule keeps its shape (its
    /// decay scaled, not cut off by a flat cap).
    pub fn lr_factor_at(&self, lr: Option<f64>) -> f64 {
        let f = self.state.lr_factor;
        let top = lr
            .filter(|v| v.is_finite() && *v > 0.0)
            .map(|v| v.max(self.state.lr_max.unwrap_or(0.0)));
        match (self.state.lr_cap, top) {
            (Some(cap), Some(top)) => f.min(cap / top),
            _ => f,
        }
    }

    /// The scheduled LR of `step` (the schedule's, before the guard's factor; None: unknown).
    /// A rise (warm-up, a restart, a resumed run given a higher LR) keeps the early rule on for
    /// `early_window` steps past it, and the early rule caps the LR it found too high.
    pub fn note_lr(&mut self, step: u64, lr: Option<f64>) {
        let Some(lr) = lr.filter(|v| v.is_finite()) else {
            return;
        };
        let s = &mut self.state;
        if s.last_lr.is_some_and(|prev| lr > prev * (1.0 + 1e-6)) {
            s.lr_rise = Some(step);
        }
        s.last_lr = Some(lr);
        s.lr_max = Some(s.lr_max.map_or(lr, |m| m.max(lr)));
    }

    /// Whether the early attention rule acts at `step`: within `early_window` steps of the
    /// start, of the last rollback, or of the last step the scheduled LR rose.
    pub fn early(&self, step: u64) -> bool {
        self.cfg.early_window > 0 && !self.state.early_off && step <= self.early_until()
    }

    /// The last step of the early window: `early_window` steps past the start, the last
    /// rollback or the LR's last rise (the Python package measures every step up to it).
    pub fn early_until(&self) -> u64 {
        let s = &self.state;
        s.restart.unwrap_or(0).max(s.lr_rise.unwrap_or(0)) + self.cfg.early_window
    }

    /// Start of a step: restores the LR when a back-off has run its course.
    pub fn begin_step(&mut self, step: u64) -> Option<Action> {
        let s = &mut self.state;
        if let Some(until) = s.backoff_until {
            if step > until {
                s.backoff_until = None;
                s.lr_factor = if s.base_factor > 0.0 {
                    s.base_factor
                } else {
                    1.0
                };
                return Some(Action::LrRestore);
            }
        }
        None
    }

    fn base(&self) -> f64 {
        if self.state.base_factor > 0.0 {
            self.state.base_factor
        } else {
            1.0
        }
    }

    fn too_many_skips(&self) -> Action {
        Action::GiveUp {
            diagnosis: format!(
                "{} steps skipped (guard.max_skips = {}): the data or the setup is broken. Check the data and lower optim.lr",
                self.state.total_skips, self.cfg.max_skips
            ),
        }
    }

    /// Roll back with the LR × `factor` (not below `lr_floor`) — or, where the walk-down has
    /// stopped helping, give up (a divergence) or stop the early rule (an early warning).
    fn escalate_to_rollback(
        &mut self,
        step: u64,
        why: &str,
        factor: f64,
        cause: Cause,
        d: &mut Decision,
    ) {
        let c = &self.cfg;
        let base = self.base();
        // the multiplier in force at this step (under the cap, the cap's)
        let now = self.lr_factor();
        // how long the weights restored last ran clean, against the run before the last cut
        let since = self.state.restart.unwrap_or(0);
        let survival = self.state.first_flag.unwrap_or(step).saturating_sub(since);
        let stalled = self
            .state
            .last_survival
            .is_some_and(|prev| survival <= prev);
        let stalls = if stalled { self.state.stalls + 1 } else { 0 };
        let floor = c.lr_floor.min(1.0);
        let at_floor = base.min(now) <= floor * (1.0 + 1e-9);
        let stop = if at_floor {
            Some(format!(
                "the LR is at its floor (× {}, guard.lr_floor)",
                short_factor(floor)
            ))
        } else if stalls >= c.walk_patience || (cause == Cause::Early && stalls >= c.early_patience)
        {
            Some(format!(
                "lowering the LR stopped helping ({} rollback{} in a row ran no longer before the next incident)",
                stalls,
                if stalls == 1 { "" } else { "s" }
            ))
        } else if self.state.rollbacks >= c.max_rollbacks {
            Some(format!(
                "{} rollbacks (guard.max_rollbacks)",
                self.state.rollbacks
            ))
        } else {
            None
        };
        if let Some(stop) = stop {
            let s = &mut self.state;
            if cause == Cause::Early {
                // a warning alone never ends a run: train on, judged by the loss detectors
                s.early_off = true;
                d.skip = false;
                d.actions.push(Action::EarlyRuleOff {
                    reason: format!(
                        "{why}; {stop}: attention warnings are logged from now on, not acted on"
                    ),
                });
                return;
            }
            d.actions.push(Action::GiveUp {
                diagnosis: format!(
                    "{why}; {stop}, after {} rollbacks (LR × {}) and {} skipped steps: the instability is not in a few batches. Try a lower optim.lr, a longer warmup, a smaller init scale, or stronger clipping",
                    s.rollbacks, short_factor(base), s.total_skips
                ),
            });
            return;
        }
        let s = &mut self.state;
        s.stalls = stalls;
        s.last_survival = Some(survival);
        s.first_flag = None;
        s.rollbacks += 1;
        s.restart = Some(step);
        let start = s.incident_start.unwrap_or(step);
        d.actions.push(Action::Rollback { before_step: start });
        s.recent_skips.clear();
        s.backoff_until = None;
        if let (Cause::Early, Some(lr)) = (cause, s.last_lr.filter(|v| *v > 0.0)) {
            // an online LR range test: the warning came at the LR this step used, so the
            // LR is capped at `factor` times that for good, and the schedule goes on below it
            // (a factor would let a warm-up climb past the edge again, and cut the decay too)
            let cap = (lr * now * factor).max(lr * floor);
            s.lr_cap = Some(s.lr_cap.map_or(cap, |c| c.min(cap)));
            s.lr_factor = base;
            d.actions.push(Action::LrCap { lr: cap });
            return;
        }
        // A divergence that needed a rollback says the LR is too high for this run: the
        // reduction stays (OPT-175B's restarts lowered the LR the same way); a temporary
        // back-off in force is dropped.
        s.base_factor = (base * factor).max(floor);
        s.lr_factor = s.base_factor;
        s.backoff_until = None;
        d.actions.push(Action::LrBackoff {
            factor: s.lr_factor,
            until_step: u64::MAX,
        });
    }

    /// Decide what to do about `step`, given the detectors' output for it.
    pub fn decide(&mut self, step: u64, detections: &[Detection]) -> Decision {
        let mut d = Decision::default();
        let spike = detections.iter().any(|x| x.kind == Severity::Spike);
        let diverged = detections.iter().find(|x| x.kind == Severity::Divergence);
        // a non-finite loss and nothing else: a bad batch or bad weights, which the next
        // step (same weights: this update is skipped) tells apart
        let nonfinite_only = spike
            && detections
                .iter()
                .filter(|x| x.kind == Severity::Spike)
                .all(|x| x.detector == "nonfinite");
        // attention logits past the limit early in a run (or right after a rollback, or
        // while the LR ramps up): the LR is too high for these weights, though the loss does
        // not show it yet
        let early = self.early(step);
        // (a spike or a divergence on the same step takes its own, ordinary path)
        let attn = detections
            .iter()
            .find(|x| early && !spike && diverged.is_none() && x.detector == "attn_logit");
        if !spike && diverged.is_none() && attn.is_none() {
            let s = &mut self.state;
            if !s.pending_nonfinite.is_empty() {
                // the weights that gave the non-finite losses gave a finite one on the next
                // batch: the batches were bad, not the weights or the LR
                let steps = std::mem::take(&mut s.pending_nonfinite);
                if let Some((last, first, start)) = s.pre_nonfinite.take() {
                    (s.last_flag, s.first_flag, s.incident_start) = (last, first, start);
                }
                d.actions.push(Action::BadBatch {
                    reason: format!(
                        "the same weights gave a finite loss at step {step}: the batch{} at step{} {} bad, not the LR (skipped; the LR is kept)",
                        if steps.len() == 1 { "" } else { "es" },
                        if steps.len() == 1 { "" } else { "s" },
                        steps
                            .iter()
                            .map(|x| x.to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                            + if steps.len() == 1 { " was" } else { " were" }
                    ),
                    steps,
                });
            }
            let window_over = s
                .last_flag
                .is_some_and(|l| step >= l + self.cfg.incident_window);
            // a rollback restored clean weights: once they have run `clean_after_rollback`
            // steps with nothing flagged, the incident is over
            let settled = s.restart.is_some_and(|r| {
                s.last_flag.is_none_or(|l| l <= r) && step >= r + self.cfg.clean_after_rollback
            });
            if window_over || settled {
                s.incident_start = None;
            }
            return d;
        }
        let before = (
            self.state.last_flag,
            self.state.first_flag,
            self.state.incident_start,
        );
        {
            let s = &mut self.state;
            s.last_flag = Some(step);
            if s.first_flag.is_none() {
                s.first_flag = Some(step);
            }
            if s.incident_start.is_none() {
                s.incident_start = Some(step);
            }
        }
        if nonfinite_only
            && diverged.is_none()
            && attn.is_none()
            && self.state.pending_nonfinite.is_empty()
        {
            // held until the next step says whether the batch or the weights were bad (a
            // second one in a row says nothing for the batch: both count as usual)
            d.skip = true;
            d.actions.push(Action::Skip);
            let s = &mut self.state;
            s.pre_nonfinite = Some(before);
            s.pending_nonfinite.push(step);
            s.total_skips += 1;
            if s.total_skips > self.cfg.max_skips {
                d.actions.push(self.too_many_skips());
            }
            return d;
        }
        {
            // anything else flagged: the non-finite losses held so far are evidence too
            let s = &mut self.state;
            s.pre_nonfinite = None;
            let held = std::mem::take(&mut s.pending_nonfinite);
            s.recent_skips.extend(held);
        }
        if let Some(x) = attn {
            let why = format!(
                "attention logit {:.0} > {} within {} steps of the start, the last rollback or the LR's last rise",
                x.value, x.threshold, self.cfg.early_window
            );
            d.skip = true;
            let f = self.cfg.early_lr_factor;
            self.escalate_to_rollback(step, &why, f, Cause::Early, &mut d);
            if self.state.early_off {
                // the warning is only logged now: it opens no incident
                let s = &mut self.state;
                (s.last_flag, s.first_flag, s.incident_start) = before;
            }
            return d;
        }
        if spike {
            d.skip = true;
            d.actions.push(Action::Skip);
            let s = &mut self.state;
            s.total_skips += 1;
            s.recent_skips.push_back(step);
            while s
                .recent_skips
                .front()
                .is_some_and(|&f| f + self.cfg.incident_window <= step)
            {
                s.recent_skips.pop_front();
            }
        }
        if self.state.total_skips > self.cfg.max_skips {
            d.actions.push(self.too_many_skips());
            return d;
        }
        if let Some(x) = diverged {
            let why = format!("diverged ({}: {})", x.detector, x.reason);
            let f = self.cfg.rollback_lr_factor;
            self.escalate_to_rollback(step, &why, f, Cause::Loss, &mut d);
            return d;
        }
        if self.state.recent_skips.len() >= self.cfg.skips_before_backoff {
            if self.state.backoff_until.is_some() {
                let why = format!(
                    "{} more spikes while the LR was backed off",
                    self.state.recent_skips.len()
                );
                let f = self.cfg.rollback_lr_factor;
                self.escalate_to_rollback(step, &why, f, Cause::Loss, &mut d);
            } else {
                let s = &mut self.state;
                s.recent_skips.clear();
                s.lr_factor = if s.base_factor > 0.0 {
                    s.base_factor
                } else {
                    1.0
                } * self.cfg.lr_backoff;
                s.backoff_until = Some(step + self.cfg.backoff_steps);
                d.actions.push(Action::LrBackoff {
                    factor: s.lr_factor,
                    until_step: step + self.cfg.backoff_steps,
                });
            }
        }
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_incident_closes_soon_after_a_rollback_that_stays_clean() {
        let cfg = GuardConfig::default();
        let mut p = Policy::new(cfg.clone());
        // three flagged steps in a row: the third is a persistent divergence → rollback
        p.decide(20, &[det(20, Severity::Spike)]);
        p.decide(21, &[det(21, Severity::Spike)]);
        let d = p.decide(
            22,
            &[det(22, Severity::Spike), det(22, Severity::Divergence)],
        );
        assert!(
            d.actions
                .iter()
                .any(|a| matches!(a, Action::Rollback { .. })),
            "{d:?}"
        );
        assert_eq!(p.state.incident_start, Some(20));
        // clean steps after the rollback: open until `clean_after_rollback` of them
        for s in 23..22 + cfg.clean_after_rollback {
            p.decide(s, &[]);
            assert_eq!(p.state.incident_start, Some(20), "closed early at {s}");
        }
        p.decide(22 + cfg.clean_after_rollback, &[]);
        assert_eq!(p.state.incident_start, None);
        // a new incident starts at its own step, so its rollback target is after the clean run
        p.decide(60, &[det(60, Severity::Spike)]);
        assert_eq!(p.state.incident_start, Some(60));
    }

    fn det(step: u64, kind: Severity) -> Detection {
        Detection {
            step,
            kind,
            detector: "test".into(),
            value: 1.0,
            threshold: 0.0,
            window: 1,
            reason: "planted".into(),
        }
    }

    #[test]
    fn rungs_escalate_in_order_and_stop() {
        let cfg = GuardConfig::default();
        let mut p = Policy::new(cfg.clone());
        // one spike: skip only
        let d = p.decide(100, &[det(100, Severity::Spike)]);
        assert_eq!(d.actions, vec![Action::Skip]);
        // sporadic spikes inside the incident window: back-off on the third
        p.decide(110, &[det(110, Severity::Spike)]);
        let d = p.decide(120, &[det(120, Severity::Spike)]);
        assert!(matches!(d.actions[1], Action::LrBackoff { factor, .. } if factor == 0.5));
        assert_eq!(p.lr_factor(), 0.5);
        // three more while backed off: rollback to before the incident's first step
        for s in [130, 140] {
            p.decide(s, &[det(s, Severity::Spike)]);
        }
        let d = p.decide(150, &[det(150, Severity::Spike)]);
        assert!(d.actions.contains(&Action::Rollback { before_step: 100 }));
        // a rollback lowers the LR for good: no restore
        assert_eq!(p.lr_factor(), 0.5);
        assert_eq!(p.begin_step(10_000), None);
        assert_eq!(p.lr_factor(), 0.5);
        // a later temporary back-off returns to that level, not to 1
        for s in [11_000, 11_010, 11_020] {
            p.decide(s, &[det(s, Severity::Spike)]);
        }
        assert_eq!(p.lr_factor(), 0.25);
        assert_eq!(
            p.begin_step(11_020 + cfg.backoff_steps + 1),
            Some(Action::LrRestore)
        );
        assert_eq!(p.lr_factor(), 0.5);
        // divergences that come at once after each rollback: lowering the LR is not
        // helping, so the guard gives up after `walk_patience` such rollbacks in a row
        let before = p.state.rollbacks;
        let mut gave_up = None;
        for i in 0..10u64 {
            let s = 20_000 + i * 10;
            let d = p.decide(s, &[det(s, Severity::Divergence)]);
            if let Some(Action::GiveUp { diagnosis }) = d.actions.last() {
                gave_up = Some(diagnosis.clone());
                break;
            }
        }
        let why = gave_up.expect("gave up");
        assert!(why.contains("stopped helping"), "{why}");
        // the first of them lengthened the run (after a long quiet stretch); then each cut
        // that did not counts, and the one that would reach `walk_patience` gives up
        assert_eq!(p.state.rollbacks - before, cfg.walk_patience);
    }

    #[test]
    fn the_lr_walks_down_while_it_helps_and_gives_up_at_the_floor() {
        let cfg = GuardConfig::default();
        let mut p = Policy::new(cfg.clone());
        // each restored run lasts longer than the one before: keep walking down, past the
        // old limit of three rollbacks, to the floor; a divergence there gives up
        let (mut s, mut run, mut n) = (0u64, 5u64, 0u32);
        let diag = loop {
            s += run;
            run += 5;
            let d = p.decide(s, &[det(s, Severity::Divergence)]);
            if let Some(Action::GiveUp { diagnosis }) = d.actions.last() {
                break diagnosis.clone();
            }
            assert!(d.actions.contains(&Action::Rollback { before_step: s }));
            n += 1;
            // the incident closes after a clean run, so each divergence opens its own
            for k in 1..=cfg.clean_after_rollback {
                p.decide(s + k, &[]);
            }
            s += cfg.clean_after_rollback;
            assert!(p.lr_factor() >= cfg.lr_floor);
        };
        assert!(n > 3, "only {n} rollbacks");
        assert_eq!(p.lr_factor(), cfg.lr_floor);
        assert!(diag.contains("floor"), "{diag}");
    }

    #[test]
    fn the_early_rule_stops_acting_where_cutting_the_lr_stops_helping() {
        let cfg = GuardConfig::default();
        let mut p = Policy::new(cfg.clone());
        // attention warnings 3 steps after every rollback: each cut bought nothing
        let mut s = 3;
        let mut off = None;
        for _ in 0..10 {
            let d = p.decide(s, &[attn(s)]);
            if let Some(Action::EarlyRuleOff { reason }) = d.actions.last() {
                assert!(!d.skip, "the step is trained on");
                off = Some(reason.clone());
                break;
            }
            assert!(d.skip);
            s += 3;
        }
        let reason = off.expect("the early rule was switched off");
        assert!(reason.contains("stopped helping"), "{reason}");
        assert!(p.state.early_off);
        // `early_patience` (1) cut that did not delay the warning is enough: ignoring a
        // warning is cheap (the first cut has nothing to compare with)
        assert_eq!(p.state.rollbacks, cfg.early_patience);
        // a longer patience walks further, as docs/configuration.md says
        let mut q = Policy::new(GuardConfig {
            early_patience: 2,
            ..cfg.clone()
        });
        let mut t = 3;
        while !q.state.early_off {
            q.decide(t, &[attn(t)]);
            t += 3;
        }
        assert_eq!(q.state.rollbacks, 2);
        assert_eq!(
            p.state.last_flag,
            Some(s - 3),
            "the switched-off warning flagged nothing"
        );
        // later warnings are only warnings; the LR stays where the walk-down left it
        let f = p.lr_factor();
        let d = p.decide(s + 1, &[attn(s + 1)]);
        assert!(!d.skip && d.actions.is_empty(), "{d:?}");
        assert_eq!(p.lr_factor(), f);
        // warnings that come later after each cut are what helping looks like
        let mut q = Policy::new(cfg.clone());
        let mut s = 0;
        for gap in [2, 4, 6, 8] {
            s += gap;
            let d = q.decide(s, &[attn(s)]);
            assert!(
                d.actions
                    .iter()
                    .any(|a| matches!(a, Action::Rollback { .. })),
                "{d:?}"
            );
        }
        assert_eq!(q.state.rollbacks, 4);
    }

    #[test]
    fn isolated_spikes_never_escalate_and_warnings_do_nothing() {
        let mut p = Policy::new(GuardConfig::default());
        for s in (100..2000).step_by(60) {
            let d = p.decide(s, &[det(s, Severity::Spike)]);
            assert_eq!(d.actions, vec![Action::Skip]);
        }
        let d = p.decide(5000, &[det(5000, Severity::Warning)]);
        assert!(!d.skip && d.actions.is_empty());
    }

    fn attn(step: u64) -> Detection {
        Detection {
            detector: "attn_logit".into(),
            value: 500.0,
            threshold: 100.0,
            ..det(step, Severity::Warning)
        }
    }

    #[test]
    fn early_attention_warnings_roll_back_and_cut_the_lr() {
        let cfg = GuardConfig::default();
        let mut p = Policy::new(cfg.clone());
        // within the early window: roll back (before this step) and cut the LR
        let d = p.decide(3, &[attn(3)]);
        assert!(d.skip && d.actions.contains(&Action::Rollback { before_step: 3 }));
        assert!((p.lr_factor() - cfg.early_lr_factor).abs() < 1e-12);
        // the window restarts at the rollback: 3 + 30 still counts, later does not
        let d = p.decide(3 + cfg.early_window, &[attn(3 + cfg.early_window)]);
        assert!(d
            .actions
            .iter()
            .any(|a| matches!(a, Action::Rollback { .. })));
        let late = 3 + 2 * cfg.early_window + 1;
        let d = p.decide(late, &[attn(late)]);
        assert!(!d.skip && d.actions.is_empty(), "{d:?}");
        // off: a warning stays a warning
        let mut off = Policy::new(GuardConfig {
            early_window: 0,
            ..cfg
        });
        assert!(off.decide(3, &[attn(3)]).actions.is_empty());
    }

    fn nan(step: u64) -> Detection {
        Detection {
            detector: "nonfinite".into(),
            ..det(step, Severity::Spike)
        }
    }

    #[test]
    fn a_nan_that_the_next_batch_clears_is_a_bad_batch_not_an_lr_fault() {
        let cfg = GuardConfig::default();
        let mut p = Policy::new(cfg.clone());
        // three isolated non-finite losses within the incident window: each skipped, each
        // followed by a clean step with the same weights: three bad batches, no back-off
        for s in [40, 50, 60] {
            let d = p.decide(s, &[nan(s)]);
            assert!(d.skip && d.actions == vec![Action::Skip], "{d:?}");
            let d = p.decide(s + 1, &[]);
            assert!(
                matches!(&d.actions[..], [Action::BadBatch { steps, .. }] if steps == &vec![s]),
                "{d:?}"
            );
            assert_eq!(
                p.state.incident_start, None,
                "a bad batch opens no incident"
            );
        }
        assert_eq!(p.lr_factor(), 1.0);
        assert_eq!(
            p.state.total_skips, 3,
            "the skips still count toward max_skips"
        );
        // finite loss spikes are the LR's business as before: the third backs off
        for s in [100, 110] {
            p.decide(s, &[det(s, Severity::Spike)]);
        }
        let d = p.decide(120, &[det(120, Severity::Spike)]);
        assert!(
            d.actions
                .iter()
                .any(|a| matches!(a, Action::LrBackoff { .. })),
            "{d:?}"
        );
        // a non-finite loss inside a run of spikes is evidence, not a bad batch
        let mut q = Policy::new(cfg.clone());
        q.decide(200, &[det(200, Severity::Spike)]);
        q.decide(210, &[nan(210)]);
        let d = q.decide(211, &[det(211, Severity::Spike)]);
        assert!(
            d.actions
                .iter()
                .any(|a| matches!(a, Action::LrBackoff { .. })),
            "{d:?}"
        );
        assert!(q.state.pending_nonfinite.is_empty());
    }

    #[test]
    fn non_finite_losses_in_a_row_are_the_weights_not_a_batch() {
        let cfg = GuardConfig::default();
        let mut p = Policy::new(cfg.clone());
        p.decide(30, &[nan(30)]);
        p.decide(31, &[nan(31)]);
        assert_eq!(p.state.recent_skips.len(), 2, "the second one counts both");
        let persistent = Detection {
            detector: "persistent".into(),
            ..det(32, Severity::Divergence)
        };
        let d = p.decide(32, &[nan(32), persistent]);
        assert!(
            d.actions.contains(&Action::Rollback { before_step: 30 }),
            "{d:?}"
        );
        assert_eq!(p.lr_factor(), cfg.rollback_lr_factor);
        assert!(!d
            .actions
            .iter()
            .any(|a| matches!(a, Action::BadBatch { .. })));
    }

    #[test]
    fn an_early_warning_caps_the_lr_where_it_came_and_the_schedule_goes_on_below() {
        let cfg = GuardConfig::default();
        let mut p = Policy::new(cfg.clone());
        // a 100-step warm-up to 1e-2: the warning comes at step 40, at LR 4e-3
        let warm = |s: u64| 1e-2 * (s.min(100) as f64) / 100.0;
        for s in 1..=40 {
            p.note_lr(s, Some(warm(s)));
        }
        let d = p.decide(40, &[attn(40)]);
        let cap = 4e-3 * cfg.early_lr_factor;
        assert!(
            matches!(d.actions.last(), Some(Action::LrCap { lr }) if (lr - cap).abs() < 1e-12),
            "{d:?}"
        );
        assert!(d.actions.contains(&Action::Rollback { before_step: 40 }));
        // the warm-up goes on, the LR does not climb past the cap
        for s in [60, 100] {
            p.note_lr(s, Some(warm(s)));
            assert!((warm(s) * p.lr_factor() - cap).abs() < 1e-12);
        }
        // past the peak the schedule keeps its shape: its decay is scaled by cap / peak
        let f = p.lr_factor();
        assert!((p.lr_factor_at(Some(2e-3)) - f).abs() < 1e-12 && f < 1.0);
        // a second warning caps lower, at the LR it came at (the cap)
        p.note_lr(101, Some(1e-2));
        let d = p.decide(101, &[attn(101)]);
        assert!(
            matches!(d.actions.last(), Some(Action::LrCap { lr }) if (lr - cap * cfg.early_lr_factor).abs() < 1e-12),
            "{d:?}"
        );
    }

    #[test]
    fn the_early_rule_covers_the_warm_up_however_long() {
        let cfg = GuardConfig::default();
        // a 200-step warm-up: a warning at step 150 is early (the LR still rises)
        let mut p = Policy::new(cfg.clone());
        for s in 1..=150 {
            p.note_lr(s, Some(1e-3 * s as f64 / 200.0));
        }
        let d = p.decide(150, &[attn(150)]);
        assert!(
            d.actions
                .iter()
                .any(|a| matches!(a, Action::Rollback { .. })),
            "{d:?}"
        );
        // past the peak, early_window more steps, then not
        let mut q = Policy::new(cfg.clone());
        for s in 1..=300 {
            q.note_lr(s, Some(1e-3 * (s.min(200)) as f64 / 200.0));
        }
        assert!(q.early(200 + cfg.early_window));
        assert!(!q.early(201 + cfg.early_window));
        // a constant or decaying LR: the window counts from the start only
        let mut r = Policy::new(cfg.clone());
        for s in 1..=150 {
            r.note_lr(s, Some(1e-3 / s as f64));
        }
        assert!(r.decide(150, &[attn(150)]).actions.is_empty());
    }

    #[test]
    fn skip_budget_is_finite() {
        let cfg = GuardConfig {
            max_skips: 5,
            skips_before_backoff: 100,
            ..Default::default()
        };
        let mut p = Policy::new(cfg);
        let last = (0..6)
            .map(|i| p.decide(i * 100, &[det(i * 100, Severity::Spike)]))
            .last()
            .unwrap();
        assert!(matches!(last.actions.last(), Some(Action::GiveUp { .. })));
    }
}
