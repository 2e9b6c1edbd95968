//! Plots of `keel check` (SVG and PNG, the same picture): RMS of the residual stream and of
//! its gradient over depth, theory dashed and measurement solid, one colour per scheme; and
//! the μP coordinate check. Text uses the bundled DejaVu Sans (no system fonts needed).

use super::CheckReport;
use crate::report::plot::{save, Plot, Series};
use anyhow::{Context, Result};
use std::path::Path;

/// The depth plots (and check.json) of one or more reports.
pub fn write_all(out: &Path, reports: &[CheckReport]) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("{}: cannot create", out.display()))?;
    let depth = |v: &[f64]| -> Vec<(f64, f64)> {
        v.iter()
            .enumerate()
            .map(|(i, &y)| (i as f64 / 2.0, y))
            .collect()
    };
    let one = reports.len() == 1;
    let mut rms = Vec::new();
    let mut grad = Vec::new();
    for (i, r) in reports.iter().enumerate() {
        let (th, me) = if one {
            ("theory".to_string(), "measured".to_string())
        } else {
            (String::new(), r.scheme.clone())
        };
        rms.push(Series {
            name: me.clone(),
            points: depth(&r.measured.resid_rms),
            color: i,
            ..Default::default()
        });
        rms.push(Series {
            name: th.clone(),
            points: depth(&r.theory.resid_rms),
            dashed: true,
            color: i,
            ..Default::default()
        });
        grad.push(Series {
            name: me,
            points: depth(&r.measured.resid_grad_rms),
            color: i,
            ..Default::default()
        });
        grad.push(Series {
            name: th,
            points: depth(&r.theory.resid_grad_rms),
            dashed: true,
            color: i,
            ..Default::default()
        });
    }
    let what = if one {
        format!("init {}", reports[0].scheme)
    } else {
        "every scheme (dashed: theory)".to_string()
    };
    save(
        &Plot {
            title: format!("Residual stream RMS over depth — {what}"),
            x_label: "layer (half steps: after attention, after MLP)".into(),
            y_label: "RMS".into(),
            series: rms,
            log_y: true,
            ..Default::default()
        },
        &out.join("rms_vs_depth"),
    )?;
    save(
        &Plot {
            title: format!("Gradient RMS of the residual stream — {what}"),
            x_label: "layer".into(),
            y_label: "RMS of ∂loss/∂x".into(),
            series: grad,
            log_y: true,
            ..Default::default()
        },
        &out.join("grad_vs_depth"),
    )?;
    crate::checkpoint::write_atomic(
        &out.join("check.json"),
        serde_json::to_string_pretty(reports)?.as_bytes(),
    )
}

/// Coordinate-check plots: one per parametrisation, activation RMS against width (log-log),
/// a line per step (solid: output logits, dashed: last residual).
pub fn write_coord(out: &Path, series: &[super::coord::CoordSeries]) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("{}: cannot create", out.display()))?;
    for c in series {
        let mut lines = Vec::new();
        for (k, (lg, rs)) in c.logits.iter().zip(&c.resid).enumerate().skip(1) {
            let pts = |v: &[f64]| {
                c.widths
                    .iter()
                    .map(|&w| w as f64)
                    .zip(v.iter().copied())
                    .collect()
            };
            lines.push(Series {
                name: format!("logits, step {k}"),
                points: pts(lg),
                color: k,
                ..Default::default()
            });
            lines.push(Series {
                name: String::new(),
                points: pts(rs),
                dashed: true,
                color: k,
                ..Default::default()
            });
        }
        let name = if c.parametrisation == "mup" {
            "μP"
        } else {
            "standard parametrisation"
        };
        save(
            &Plot {
                title: format!(
                    "Coordinate check — {name} (slope {:+.2}; dashed: last residual)",
                    c.logit_slope
                ),
                x_label: "width".into(),
                y_label: "RMS".into(),
                series: lines,
                log_x: true,
                log_y: true,
                ..Default::default()
            },
            &out.join(format!("coord_check_{}", c.parametrisation)),
        )?;
    }
    crate::checkpoint::write_atomic(
        &out.join("coord_check.json"),
        serde_json::to_string_pretty(series)?.as_bytes(),
    )
}
