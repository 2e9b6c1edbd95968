//! Initialisation audit: compare the weights of a model directory with what a scheme says,
//! tensor by tensor, and say what is wrong (planted or real init bugs: depth scaling on the
//! wrong tensor, an uninitialised head, truncation bounds in absolute units, clamping).

use super::schemes::{erf, trunc_std, Dist, TensorPlan};
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum Verdict {
    Pass,
    Warn,
    Fail,
}

impl Verdict {
    pub fn label(self) -> &'static str {
        match self {
            Verdict::Pass => "PASS",
            Verdict::Warn => "WARN",
            Verdict::Fail => "FAIL",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct TensorAudit {
    pub name: String,
    pub role: &'static str,
    pub n: usize,
    pub std: f64,
    pub target_std: f64,
    pub mean: f64,
    /// max |w| / target σ
    pub max_over_sigma: f64,
    pub excess_kurtosis: f64,
    /// Fraction of values within 0.1% of the bound (bounded schemes) or of max |w|.
    pub frac_at_bound: f64,
    pub verdict: Verdict,
    pub reasons: Vec<String>,
}

/// Excess kurtosis the distribution should show.
fn expected_kurtosis(d: &Dist) -> f64 {
    match *d {
        Dist::Uniform { .. } => -1.2,
        Dist::TruncNormal { sigma_bound: a, .. } => {
            let phi = (-a * a / 2.0).exp() / (2.0 * std::f64::consts::PI).sqrt();
            let z = erf(a / std::f64::consts::SQRT_2);
            let m2 = trunc_std(a).powi(2);
            let m4 = 3.0 * m2 - 2.0 * a.powi(3) * phi / z;
            m4 / (m2 * m2) - 3.0
        }
        _ => 0.0,
    }
}

/// Audit every tensor of `model` against the scheme `ic` (`keel check --model`,
/// `keel.audit`), in layout order.
pub fn audit_model(
    model: &crate::model::Model,
    ic: &super::InitSection,
) -> Result<Vec<TensorAudit>, crate::config::ConfigError> {
    let plans = super::plan(&model.cfg, &model.layout, ic)?;
    Ok(model
        .layout
        .specs
        .iter()
        .zip(&plans)
        .map(|(s, p)| audit_tensor(p, &model.params[s.offset..s.offset + s.len]))
        .collect())
}

/// The per-tensor guesses `audit_tensor` adds to a σ mismatch.
const DEPTH_HINTS: [&str; 2] = [
    " (depth scaling applied to a tensor the scheme leaves unscaled?)",
    " (the scheme's depth scaling is missing here?)",
];

/// For weights written with options nobody recorded (no `keel_init.json`): guessing a cause
/// per tensor misleads (a gain of 0.5 is not "depth scaling on the wrong tensor"). Drop the
/// guesses, and when most matrices are off by one common factor, say that instead: one
/// gain or base σ, not per-tensor bugs. Returns that model-level finding.
pub fn without_guesses(audits: &mut [TensorAudit]) -> Option<String> {
    for a in audits.iter_mut() {
        for r in a.reasons.iter_mut() {
            for h in DEPTH_HINTS {
                if let Some(i) = r.find(h) {
                    r.replace_range(
                        i..i + h.len(),
                        " (the init options these weights were written with are unknown)",
                    );
                }
            }
        }
    }
    let mut ratios: Vec<f64> = audits
        .iter()
        .filter(|a| a.target_std > 0.0 && a.role != "norm")
        .map(|a| a.std / a.target_std)
        .collect();
    if ratios.len() < 2 {
        return None;
    }
    ratios.sort_by(f64::total_cmp);
    let med = ratios[ratios.len() / 2];
    let near = ratios
        .iter()
        .filter(|r| (*r / med - 1.0).abs() < 0.03)
        .count();
    if (med - 1.0).abs() > 0.05 && near * 5 >= ratios.len() * 4 {
        Some(format!(
            "{near} of {} weight matrices have σ {med:.3}× their target: one gain or base σ \
             differs from the scheme's (e.g. --set init.gain={med:.2}), not a bug in each tensor; \
             `keel init --out` records its options in keel_init.json so the audit can use them",
            ratios.len()
        ))
    } else {
        None
    }
}

/// The worst verdict of an audit (PASS when empty).
pub fn worst(audits: &[TensorAudit]) -> Verdict {
    audits
        .iter()
        .map(|a| a.verdict)
        .max()
        .unwrap_or(Verdict::Pass)
}

/// Audit one tensor's values against its plan.
pub fn audit_tensor(plan: &TensorPlan, w: &[f32]) -> TensorAudit {
    let n = w.len().max(1);
    let nf = n as f64;
    let mean = w.iter().map(|&x| x as f64).sum::<f64>() / nf;
    let (mut m2, mut m4, mut maxabs) = (0f64, 0f64, 0f64);
    for &x in w {
        let c = x as f64 - mean;
        m2 += c * c;
        m4 += c * c * c * c;
        maxabs = maxabs.max((x as f64).abs());
    }
    let var = m2 / nf;
    let std = var.sqrt();
    let kurt = if var > 0.0 {
        m4 / nf / (var * var) - 3.0
    } else {
        0.0
    };
    let target = plan.target_std;
    let bound = plan.dist.bound();
    let edge = bound.unwrap_or(maxabs) * 0.999;
    // values piled on the bound (clamped), not beyond it (bounds in the wrong units say that)
    let top = bound.map_or(maxabs, |b| b * (1.0 + 1e-4) + 1e-12);
    let at_bound = if edge > 0.0 {
        w.iter()
            .filter(|&&x| (edge..=top).contains(&(x as f64).abs()))
            .count() as f64
            / nf
    } else {
        0.0
    };
    let mut reasons = Vec::new();
    let mut verdict = Verdict::Pass;
    let mut flag = |v: Verdict, r: String, verdict: &mut Verdict| {
        *verdict = (*verdict).max(v);
        reasons.push(r);
    };
    match plan.dist {
        Dist::Ones => {
            if w.iter().any(|&x| x != 1.0) {
                flag(Verdict::Warn, format!("norm weights are not all 1 (mean {mean:.4}): trained, or not initialised to ones"), &mut verdict);
            }
        }
        Dist::Zeros => {
            if maxabs > 0.0 {
                flag(
                    Verdict::Fail,
                    format!("should be zero (scheme), but std is {std:.3e}"),
                    &mut verdict,
                );
            }
        }
        _ => {
            if maxabs == 0.0 {
                flag(
                    Verdict::Fail,
                    "all zero: this tensor was never initialised".into(),
                    &mut verdict,
                );
            } else {
                let ratio = std / target;
                let tol = (6.0 / (2.0 * nf).sqrt()).max(0.03);
                if (ratio - 1.0).abs() > tol {
                    let hint = if ratio < 1.0 && plan.depth_scaling.is_empty() {
                        DEPTH_HINTS[0]
                    } else if ratio > 1.0 && !plan.depth_scaling.is_empty() {
                        DEPTH_HINTS[1]
                    } else {
                        ""
                    };
                    flag(
                        Verdict::Fail,
                        format!("std {std:.4e} is {ratio:.3}× the target {target:.4e}{hint}"),
                        &mut verdict,
                    );
                }
                if let Some(b) = bound {
                    if maxabs > b * (1.0 + 1e-4) + 1e-12 {
                        flag(
                            Verdict::Fail,
                            format!("|w| reaches {maxabs:.4e}, beyond the bound ±{b:.4e}: truncation bounds given in absolute units, or none applied?"),
                            &mut verdict,
                        );
                    }
                }
                let pile_limit = 0.01 + 10.0 / nf;
                if at_bound > pile_limit && nf > 1000.0 {
                    flag(
                        Verdict::Fail,
                        format!("{:.2}% of values sit at ±{edge:.3e}: clamped instead of resampled (or low-precision rounding)?", 100.0 * at_bound),
                        &mut verdict,
                    );
                }
                let ek = expected_kurtosis(&plan.dist);
                let ktol = (6.0 * (24.0 / nf).sqrt()).max(0.3);
                if (kurt - ek).abs() > ktol && nf > 1000.0 {
                    flag(
                        Verdict::Warn,
                        format!(
                            "excess kurtosis {kurt:.2}, expected {ek:.2} for this distribution"
                        ),
                        &mut verdict,
                    );
                }
                if mean.abs() > 6.0 * target / nf.sqrt() + 1e-3 * target && nf > 1000.0 {
                    flag(
                        Verdict::Warn,
                        format!("mean {mean:.3e} is far from 0"),
                        &mut verdict,
                    );
                }
            }
        }
    }
    TensorAudit {
        name: plan.name.clone(),
        role: plan.role,
        n: w.len(),
        std,
        target_std: target,
        mean,
        max_over_sigma: if target > 0.0 { maxabs / target } else { 0.0 },
        excess_kurtosis: kurt,
        frac_at_bound: at_bound,
        verdict,
        reasons,
    }
}
