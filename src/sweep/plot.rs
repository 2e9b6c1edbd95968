//! Sweep pictures (SVG + PNG under `DIR/plots/`): the stability map (LR × init, final loss,
//! diverged cells marked) and loss-vs-LR curves per depth/width panel, and the largest
//! stable LR against width and depth.

use super::analysis::{describe_group, GroupSummary, Recommendation};
use super::{show_num, Plan};
use crate::report::plot::{save, save_heatmap, Heatmap, Marker, Plot, Series};
use anyhow::Result;
use serde_json::{Map, Value};
use std::path::Path;

/// A panel: the groups sharing every non-init axis value.
pub struct Panel<'a> {
    pub name: String,
    /// File-name suffix ("" when there is one panel).
    pub slug: String,
    pub groups: Vec<(String, &'a GroupSummary)>,
}

pub fn panels<'a>(groups: &'a [GroupSummary], base_scheme: &str) -> Vec<Panel<'a>> {
    type Members<'a> = Vec<(String, &'a GroupSummary)>;
    let mut out: Vec<(Map<String, Value>, Members)> = Vec::new();
    for g in groups {
        let mut key = g.group.clone();
        let scheme = key
            .remove("init.scheme")
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_else(|| base_scheme.to_string());
        match out.iter_mut().find(|(k, _)| *k == key) {
            Some((_, v)) => v.push((scheme, g)),
            None => out.push((key, vec![(scheme, g)])),
        }
    }
    let single = out.len() == 1;
    out.into_iter()
        .map(|(k, gs)| {
            let name = describe_group(&k, false);
            let slug = if single || k.is_empty() {
                String::new()
            } else {
                let s: String = name
                    .chars()
                    .filter(|c| !c.is_whitespace())
                    .map(|c| {
                        if c.is_ascii_alphanumeric() || c == '=' || c == '-' || c == '.' {
                            c
                        } else {
                            '_'
                        }
                    })
                    .collect();
                format!("_{s}")
            };
            Panel {
                name,
                slug,
                groups: gs,
            }
        })
        .collect()
}

impl Panel<'_> {
    /// `sep` + the panel's name, or nothing for the only panel.
    fn suffix(&self, sep: &str) -> String {
        if self.name == "all" {
            String::new()
        } else {
            format!("{sep}{}", self.name)
        }
    }
}

pub fn stability_map(p: &Panel, metric: &str) -> Heatmap {
    let lrs = p
        .groups
        .first()
        .map(|g| g.1.lrs.clone())
        .unwrap_or_default();
    let mut values = Vec::new();
    let mut text = Vec::new();
    for (_, g) in &p.groups {
        values.push(g.loss.clone());
        text.push(
            g.loss
                .iter()
                .zip(&g.diverged_at)
                .enumerate()
                .map(|(i, (l, d))| match (l, d) {
                    (_, Some(s)) => format!("✗ step {s}"),
                    (None, None) => "not run".into(),
                    (Some(l), None) => match g.spikes.get(i).copied().unwrap_or(0) {
                        0 => format!("{l:.3}"),
                        n => format!("{l:.3} ⚠{n}"),
                    },
                })
                .collect(),
        );
    }
    Heatmap {
        title: format!(
            "Stability map — {}{}",
            metric.replace('_', " "),
            p.suffix(", ")
        ),
        x_label: "peak learning rate".into(),
        y_label: "init scheme".into(),
        cols: lrs.iter().map(|&x| show_num(x)).collect(),
        rows: p.groups.iter().map(|g| g.0.clone()).collect(),
        values,
        text,
        value_label: metric.replace('_', " "),
        low_is_good: true,
        // resolve the good region: everything worse than twice the best loss looks the same
        clip_high: p
            .groups
            .iter()
            .filter_map(|g| g.1.best_loss)
            .reduce(f64::min)
            .map(|b| 2.0 * b),
        ..Default::default()
    }
}

pub fn loss_vs_lr(p: &Panel, metric: &str) -> Plot {
    let mut series = Vec::new();
    for (i, (scheme, g)) in p.groups.iter().enumerate() {
        let pts: Vec<(f64, f64)> = g
            .lrs
            .iter()
            .zip(&g.loss)
            .filter_map(|(&x, l)| l.map(|l| (x, l)))
            .collect();
        series.push(Series {
            name: scheme.clone(),
            points: pts,
            marker: Marker::Dot,
            color: i,
            ..Default::default()
        });
        // diverged LRs drawn at the initial loss (the cap of the LR-sensitivity definition)
        let div: Vec<(f64, f64)> = g
            .lrs
            .iter()
            .zip(&g.diverged_at)
            .filter(|(_, d)| d.is_some())
            .filter_map(|(&x, _)| g.initial_loss.map(|l0| (x, l0)))
            .collect();
        if !div.is_empty() {
            series.push(Series {
                name: String::new(),
                points: div,
                marker: Marker::Cross,
                no_line: true,
                color: i,
                ..Default::default()
            });
        }
    }
    if p.groups
        .iter()
        .any(|(_, g)| g.diverged_at.iter().any(Option::is_some))
    {
        series.push(Series {
            name: "diverged (at the initial loss)".into(),
            marker: Marker::Cross,
            no_line: true,
            color: 7,
            ..Default::default()
        });
    }
    Plot {
        title: format!(
            "Final {} vs learning rate{}",
            metric.replace('_', " "),
            p.suffix(" — ")
        ),
        x_label: "peak learning rate".into(),
        y_label: metric.replace('_', " "),
        series,
        log_x: true,
        log_y: false,
        ..Default::default()
    }
}

pub fn write_all(
    out: &Path,
    plan: &Plan,
    base_scheme: &str,
    groups: &[GroupSummary],
    rec: &Recommendation,
) -> Result<()> {
    let metric = plan.settings.metric.as_str();
    for p in panels(groups, base_scheme) {
        save_heatmap(
            &stability_map(&p, metric),
            &out.join(format!("stability_map{}", p.slug)),
        )?;
        save(
            &loss_vs_lr(&p, metric),
            &out.join(format!("loss_vs_lr{}", p.slug)),
        )?;
    }
    for (axis, name) in SIZE_AXES {
        let trends: Vec<_> = rec.lr_trends.iter().filter(|t| t.axis == axis).collect();
        if trends.is_empty() {
            continue;
        }
        let mut series = Vec::new();
        for (i, t) in trends.iter().enumerate() {
            series.push(Series {
                name: trend_label(&t.scheme, t.exponent, name),
                points: t.points.iter().map(|p| (p.0, p.1)).collect(),
                marker: Marker::Dot,
                color: i,
                ..Default::default()
            });
            let up: Vec<(f64, f64)> = t
                .points
                .iter()
                .filter_map(|p| p.2.map(|u| (p.0, u)))
                .collect();
            if !up.is_empty() {
                series.push(Series {
                    name: String::new(),
                    points: up,
                    marker: Marker::Cross,
                    no_line: true,
                    color: i,
                    ..Default::default()
                });
            }
            if let (Some(tg), Some(pr)) = (t.target, t.predicted_lr) {
                let last = t.points.last().map(|p| (p.0, p.1));
                if let Some(l) = last {
                    series.push(Series {
                        name: String::new(),
                        points: vec![l, (tg, pr)],
                        dashed: true,
                        color: i,
                        ..Default::default()
                    });
                }
            }
        }
        save_lr_vs(
            format!("Largest stable LR vs {name} (dots; ✗: first LR that diverged)"),
            name,
            series,
            &out.join(format!("max_stable_lr_vs_{name}")),
        )?;
    }
    // the optimal LR per series, its power law (dashed, out to the target) and the holdout's
    // prediction (✗) beside the measured point
    for (axis, name) in SIZE_AXES {
        let trends: Vec<_> = rec
            .lr_opt_trends
            .iter()
            .filter(|t| t.axis == axis)
            .collect();
        if trends.is_empty() {
            continue;
        }
        let mut series = Vec::new();
        for (i, t) in trends.iter().enumerate() {
            series.push(Series {
                name: trend_label(&t.series, t.exponent, name),
                points: t.points.iter().map(|p| (p.at, p.lr)).collect(),
                marker: Marker::Dot,
                no_line: true,
                color: i,
                ..Default::default()
            });
            let pts: Vec<(f64, f64)> = t.points.iter().map(|p| (p.at, p.lr)).collect();
            if let Some(f) = super::analysis::power_fit(&pts) {
                let lo = pts.iter().map(|p| p.0).fold(f64::MAX, f64::min);
                let hi = pts
                    .iter()
                    .map(|p| p.0)
                    .chain(t.target)
                    .fold(f64::MIN, f64::max);
                series.push(Series {
                    name: String::new(),
                    points: vec![(lo, f.at(lo)), (hi, f.at(hi))],
                    dashed: true,
                    color: i,
                    ..Default::default()
                });
            }
            if let Some(h) = &t.holdout {
                series.push(Series {
                    name: String::new(),
                    points: vec![(h.at, h.predicted)],
                    marker: Marker::Cross,
                    no_line: true,
                    color: i,
                    ..Default::default()
                });
            }
        }
        save_lr_vs(
            format!("Optimal LR vs {name} (dashed: power law; ✗: holdout)"),
            name,
            series,
            &out.join(format!("optimal_lr_vs_{name}")),
        )?;
    }
    Ok(())
}

/// The axes a trend runs along, with their names in words.
const SIZE_AXES: [(&str, &str); 2] = [
    ("model.hidden_size", "width"),
    ("model.num_layers", "depth"),
];

/// A trend's legend entry: "normal (∝ width^-1.03)".
fn trend_label(label: &str, exponent: Option<f64>, name: &str) -> String {
    match exponent {
        Some(b) => format!("{label} (∝ {name}^{b:+.2})"),
        None => label.to_string(),
    }
}

/// An LR against width or depth, both axes logarithmic.
fn save_lr_vs(title: String, name: &str, series: Vec<Series>, path: &Path) -> Result<()> {
    save(
        &Plot {
            title,
            x_label: name.into(),
            y_label: "learning rate".into(),
            series,
            log_x: true,
            log_y: true,
            ..Default::default()
        },
        path,
    )
}
