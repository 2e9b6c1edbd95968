//! Learning-rate schedules (config section `[schedule]`).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    /// Linear warm-up, then constant.
    Constant,
    /// Linear warm-up, then cosine decay to `min_lr_ratio`·lr at the last step.
    Cosine,
    /// Warmup-stable-decay: warm-up, constant, then linear decay over the final
    /// `decay_fraction` of training to `min_lr_ratio`·lr.
    Wsd,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Schedule {
    pub kind: ScheduleKind,
    pub warmup_steps: u64,
    pub min_lr_ratio: f64,
    pub decay_fraction: f64,
}

impl Default for Schedule {
    fn default() -> Self {
        Schedule {
            kind: ScheduleKind::Cosine,
            warmup_steps: 0,
            min_lr_ratio: 0.1,
            decay_fraction: 0.2,
        }
    }
}

impl Schedule {
    pub fn constant() -> Self {
        Schedule {
            kind: ScheduleKind::Constant,
            warmup_steps: 0,
            min_lr_ratio: 1.0,
            decay_fraction: 0.0,
        }
    }

    /// Learning rate for 0-based `step` of `total` steps, given the peak `lr`.
    pub fn lr_at(&self, step: u64, total: u64, lr: f64) -> f64 {
        if step < self.warmup_steps {
            return lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let min = lr * self.min_lr_ratio;
        match self.kind {
            ScheduleKind::Constant => lr,
            ScheduleKind::Cosine => {
                let span = total.saturating_sub(self.warmup_steps).max(1) as f64;
                let prog = ((step - self.warmup_steps) as f64 / (span - 1.0).max(1.0)).min(1.0);
                min + (lr - min) * 0.5 * (1.0 + (std::f64::consts::PI * prog).cos())
            }
            ScheduleKind::Wsd => {
                let decay = ((total as f64) * self.decay_fraction).round() as u64;
                let start = total.saturating_sub(decay).max(self.warmup_steps);
                if step < start || decay == 0 {
                    lr
                } else {
                    let prog = ((step - start + 1) as f64 / decay as f64).min(1.0);
                    lr + (min - lr) * prog
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosine_warms_up_then_decays_to_min() {
        let s = Schedule {
            kind: ScheduleKind::Cosine,
            warmup_steps: 10,
            min_lr_ratio: 0.1,
            decay_fraction: 0.0,
        };
        assert!((s.lr_at(0, 100, 1.0) - 0.1).abs() < 1e-12);
        assert!((s.lr_at(9, 100, 1.0) - 1.0).abs() < 1e-12);
        assert!((s.lr_at(10, 100, 1.0) - 1.0).abs() < 1e-12);
        assert!((s.lr_at(99, 100, 1.0) - 0.1).abs() < 1e-12);
        let mid = s.lr_at(55, 100, 1.0);
        assert!(mid > 0.4 && mid < 0.7);
        for st in 10..99 {
            assert!(s.lr_at(st + 1, 100, 1.0) <= s.lr_at(st, 100, 1.0));
        }
    }

    #[test]
    fn wsd_is_flat_then_linear() {
        let s = Schedule {
            kind: ScheduleKind::Wsd,
            warmup_steps: 5,
            min_lr_ratio: 0.0,
            decay_fraction: 0.2,
        };
        assert_eq!(s.lr_at(50, 100, 2.0), 2.0);
        assert_eq!(s.lr_at(79, 100, 2.0), 2.0);
        assert!((s.lr_at(89, 100, 2.0) - 1.0).abs() < 1e-12);
        assert!(s.lr_at(99, 100, 2.0).abs() < 1e-12);
    }

    #[test]
    fn constant_after_warmup() {
        let s = Schedule {
            warmup_steps: 4,
            ..Schedule::constant()
        };
        assert_eq!(s.lr_at(1, 10, 1.0), 0.5);
        assert_eq!(s.lr_at(7, 10, 1.0), 1.0);
    }
}
