//! Plots of `keel check` (SVG and PNG, the same picture): RMS of the residual stream and of
//! its gradient over depth, theory dashed and measurement solid, one colour per scheme; and
//! the μP coordinate check. Text uses the bundled DejaVu Sans (no system fonts needed).

use super::CheckReport;
use anyhow::{Context, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::Path;

static FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");

fn ensure_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ =
            plotters::style::register_font("sans-serif", plotters::style::FontStyle::Normal, FONT);
    });
}

pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    pub dashed: bool,
    pub color: usize,
}

pub struct Plot {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<Series>,
    pub log_x: bool,
}

fn draw<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, p: &Plot) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow::anyhow!("plot: {e:?}");
    root.fill(&WHITE).map_err(err)?;
    let pts = || {
        p.series
            .iter()
            .flat_map(|s| s.points.iter())
            .filter(|(x, y)| x.is_finite() && y.is_finite() && *y > 0.0)
    };
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in pts() {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if x0 > x1 {
        (x0, x1, y0, y1) = (0.0, 1.0, 1e-3, 1.0);
    }
    if x1 == x0 {
        x1 = x0 + 1.0;
    }
    let (y0, y1) = (y0 / 1.5, y1 * 1.5);
    let mut b = ChartBuilder::on(&root);
    b.caption(&p.title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(42)
        .y_label_area_size(80);
    macro_rules! body {
        ($chart:expr) => {{
            let mut chart = $chart;
            chart
                .configure_mesh()
                .x_desc(p.x_label.as_str())
                .y_desc(p.y_label.as_str())
                .label_style(("sans-serif", 13))
                .draw()
                .map_err(err)?;
            for s in &p.series {
                let color = Palette99::pick(s.color).to_rgba();
                let data: Vec<(f64, f64)> = s
                    .points
                    .iter()
                    .copied()
                    .filter(|(x, y)| x.is_finite() && y.is_finite() && *y > 0.0)
                    .collect();
                let style = color.stroke_width(2);
                let anno = if s.dashed {
                    chart
                        .draw_series(DashedLineSeries::new(data, 6, 4, style))
                        .map_err(err)?
                } else {
                    chart
                        .draw_series(LineSeries::new(data, style))
                        .map_err(err)?
                };
                if !s.name.is_empty() {
                    anno.label(s.name.as_str()).legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                    });
                }
            }
            chart
                .configure_series_labels()
                .label_font(("sans-serif", 12))
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .position(SeriesLabelPosition::UpperLeft)
                .draw()
                .map_err(err)?;
        }};
    }
    if p.log_x {
        body!(b
            .build_cartesian_2d((x0..x1).log_scale(), (y0..y1).log_scale())
            .map_err(err)?);
    } else {
        body!(b
            .build_cartesian_2d(x0..x1, (y0..y1).log_scale())
            .map_err(err)?);
    }
    root.present().map_err(err)?;
    Ok(())
}

/// Write `base.svg` and `base.png`.
pub fn save(p: &Plot, base: &Path) -> Result<()> {
    ensure_font();
    let svg = base.with_extension("svg");
    let png = base.with_extension("png");
    draw(SVGBackend::new(&svg, (900, 560)).into_drawing_area(), p)
        .with_context(|| format!("{}: cannot draw", svg.display()))?;
    draw(BitMapBackend::new(&png, (900, 560)).into_drawing_area(), p)
        .with_context(|| format!("{}: cannot draw", png.display()))?;
    Ok(())
}

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
            dashed: false,
            color: i,
        });
        rms.push(Series {
            name: th.clone(),
            points: depth(&r.theory.resid_rms),
            dashed: true,
            color: i,
        });
        grad.push(Series {
            name: me,
            points: depth(&r.measured.resid_grad_rms),
            dashed: false,
            color: i,
        });
        grad.push(Series {
            name: th,
            points: depth(&r.theory.resid_grad_rms),
            dashed: true,
            color: i,
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
            log_x: false,
        },
        &out.join("rms_vs_depth"),
    )?;
    save(
        &Plot {
            title: format!("Gradient RMS of the residual stream — {what}"),
            x_label: "layer".into(),
            y_label: "RMS of ∂loss/∂x".into(),
            series: grad,
            log_x: false,
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
                dashed: false,
                color: k,
            });
            lines.push(Series {
                name: String::new(),
                points: pts(rs),
                dashed: true,
                color: k,
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
            },
            &out.join(format!("coord_check_{}", c.parametrisation)),
        )?;
    }
    crate::checkpoint::write_atomic(
        &out.join("coord_check.json"),
        serde_json::to_string_pretty(series)?.as_bytes(),
    )
}
