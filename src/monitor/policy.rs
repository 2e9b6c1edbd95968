//! The escalating recovery policy: skip the update → lower the LR for a while → roll back to
//! the last good checkpoint past the bad batches → give up (exit 2) with a diagnosis.
//! Each rung has a limit, so the guard can never loop forever.
//!
//! - every Spike (one bad step) is skipped;
//! - `skips_before_backoff` skips within `incident_window` steps: LR × `lr_backoff` for
//!   `backoff_steps`, then restored;
//! - that many skips again while backed off, or a Divergence: roll back, and lower the LR by
//!   `lr_backoff` for the rest of the run (each rollback again);
//! - more than `max_rollbacks` rollbacks or `max_skips` skips: give up.

use super::{Detection, GuardConfig, Severity};
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

    /// LR multiplier in force for `step` (call `begin_step` first).
    pub fn lr_factor(&self) -> f64 {
        self.state.lr_factor
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

    fn escalate_to_rollback(&mut self, step: u64, why: &str, factor: f64, d: &mut Decision) {
        let c = &self.cfg;
        let s = &mut self.state;
        if s.rollbacks >= c.max_rollbacks {
            d.actions.push(Action::GiveUp {
                diagnosis: format!(
                    "{why} after {} rollbacks and {} skipped steps; the instability is not in a few batches. Try a lower optim.lr, a longer warmup, a smaller init scale, or stronger clipping",
                    s.rollbacks, s.total_skips
                ),
            });
            return;
        }
        s.rollbacks += 1;
        s.restart = Some(step);
        let start = s.incident_start.unwrap_or(step);
        d.actions.push(Action::Rollback { before_step: start });
        s.recent_skips.clear();
        // resume past the damage more gently; the back-off window restarts
        // A divergence that needed a rollback says the LR is too high for this run: the
        // reduction stays (OPT-175B's restarts lowered the LR the same way); a temporary
        // back-off in force is dropped.
        s.base_factor = if s.base_factor > 0.0 {
            s.base_factor
        } else {
            1.0
        } * factor;
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
        // attention logits past the limit early in a run (or right after a rollback): the LR
        // is too high for these weights, though the loss does not show it yet
        let early = self.cfg.early_window > 0
            && step <= self.state.restart.unwrap_or(0) + self.cfg.early_window;
        // (a spike or a divergence on the same step takes its own, ordinary path)
        let attn = detections
            .iter()
            .find(|x| early && !spike && diverged.is_none() && x.detector == "attn_logit");
        if !spike && diverged.is_none() && attn.is_none() {
            let s = &mut self.state;
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
        {
            let s = &mut self.state;
            s.last_flag = Some(step);
            if s.incident_start.is_none() {
                s.incident_start = Some(step);
            }
        }
        if let Some(x) = attn {
            let why = format!(
                "attention logit {:.0} > {} within {} steps of the start or the last rollback",
                x.value, x.threshold, self.cfg.early_window
            );
            d.skip = true;
            self.escalate_to_rollback(step, &why, self.cfg.early_lr_factor, &mut d);
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
            d.actions.push(Action::GiveUp {
                diagnosis: format!(
                    "{} steps skipped (guard.max_skips = {}): the data or the setup is broken. Check the data and lower optim.lr",
                    self.state.total_skips, self.cfg.max_skips
                ),
            });
            return d;
        }
        if let Some(x) = diverged {
            let why = format!("diverged ({}: {})", x.detector, x.reason);
            self.escalate_to_rollback(step, &why, self.cfg.rollback_lr_factor, &mut d);
            return d;
        }
        if self.state.recent_skips.len() >= self.cfg.skips_before_backoff {
            if self.state.backoff_until.is_some() {
                let why = format!(
                    "{} more spikes while the LR was backed off",
                    self.state.recent_skips.len()
                );
                self.escalate_to_rollback(step, &why, self.cfg.rollback_lr_factor, &mut d);
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
        // divergences: rollbacks up to the limit, then give up
        let mut gave_up = false;
        for i in 0..10u64 {
            let s = 20_000 + i * 10;
            let d = p.decide(s, &[det(s, Severity::Divergence)]);
            if d.actions.iter().any(|a| matches!(a, Action::GiveUp { .. })) {
                gave_up = true;
                assert_eq!(p.state.rollbacks, cfg.max_rollbacks);
                break;
            }
        }
        assert!(gave_up);
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
