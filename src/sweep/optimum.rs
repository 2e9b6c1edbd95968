//! The optimal LR along width and depth. Per seed, the LR of the lowest final loss, refined by
//! a parabola in ln(LR) through the grid's minimum and its two neighbours (a 3× grid alone
//! cannot resolve an exponent of −0.5 over a 4× range of widths); per proxy, the seeds'
//! geometric mean and their scatter; a power law through the proxies (log-log least squares);
//! the largest proxy held out and predicted from the others; the prediction at a target
//! width/depth with an interval from the fit's residual and the seed scatter.
//!
//! muP's promise is that this exponent is ≈ 0 against width (the optimum transfers), while
//! under standard parametrisation with Adam it is clearly negative; a sweep with an
//! `init.scheme` axis of both gives the two slopes side by side.

use super::analysis::{describe_group, power_fit};
use super::collect::TrialResult;
use super::{short_key, show_num, Plan};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// One proxy of a series.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct OptPoint {
    /// Width or depth.
    pub at: f64,
    /// Geometric mean over seeds of each seed's optimal LR.
    pub lr: f64,
    pub seeds: usize,
    /// Standard deviation of ln(optimal LR) over the seeds (0 with one seed).
    pub scatter: f64,
    /// Some seed's optimum was the grid's smallest or largest LR: the true one may lie outside.
    pub at_grid_edge: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct OptHoldout {
    pub at: f64,
    pub predicted: f64,
    pub measured: f64,
    /// predicted / measured.
    pub ratio: f64,
}

/// The optimal LR of one series (all other axes fixed) along one axis.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct OptTrend {
    /// The other axes' values ("qk_norm=false, mup"), or "all".
    pub series: String,
    pub axis: String,
    pub points: Vec<OptPoint>,
    /// optimal LR ∝ axis^exponent, with its standard error (≥ 3 points or ≥ 2 seeds).
    pub exponent: Option<f64>,
    pub exponent_se: Option<f64>,
    pub target: Option<f64>,
    pub predicted: Option<f64>,
    /// ±2 standard errors of the prediction.
    pub predicted_range: Option<(f64, f64)>,
    pub holdout: Option<OptHoldout>,
}

/// The optimum of one seed over the LR grid: (LR, at the grid's edge), or None when nothing
/// finished. `pts` = (LR, final loss or None if diverged), sorted by LR.
pub fn seed_optimum(pts: &[(f64, Option<f64>)]) -> Option<(f64, bool)> {
    let ok: Vec<(usize, f64)> = pts
        .iter()
        .enumerate()
        .filter_map(|(i, p)| p.1.filter(|l| l.is_finite()).map(|l| (i, l)))
        .collect();
    let &(i, _) = ok.iter().min_by(|a, b| a.1.total_cmp(&b.1))?;
    let edge = i == 0 || i + 1 == pts.len();
    let lr = pts[i].0;
    if edge {
        return Some((lr, true));
    }
    let (Some(l0), Some(l1), Some(l2)) = (pts[i - 1].1, pts[i].1, pts[i + 1].1) else {
        return Some((lr, false));
    };
    let (x0, x1, x2) = (pts[i - 1].0.ln(), lr.ln(), pts[i + 1].0.ln());
    // vertex of the parabola through the three points (l1 is the smallest: it opens upward)
    let d0 = (l1 - l0) / (x1 - x0);
    let d1 = (l2 - l1) / (x2 - x1);
    let curv = (d1 - d0) / (x2 - x0);
    if curv.is_nan() || curv <= 0.0 {
        return Some((lr, false));
    }
    // p(x) = l0 + d0·(x − x0) + curv·(x − x0)(x − x1); p'(x) = 0 at the vertex
    let v = 0.5 * (x0 + x1) - d0 / (2.0 * curv);
    Some((v.clamp(x0, x2).exp(), false))
}

/// Mean of a list the callers know is not empty (0 if it were).
fn mean(v: &[f64]) -> f64 {
    super::collect::mean(v).unwrap_or(0.0)
}

/// The optimal-LR trends of every series along width and depth.
pub fn optimal_trends(
    plan: &Plan,
    base_scheme: &str,
    results: &[TrialResult],
    target: &super::analysis::Target,
) -> Vec<OptTrend> {
    let lr_key = plan.settings.lr_key.as_str();
    let mut out = Vec::new();
    for (axis, tgt) in [
        ("model.hidden_size", target.width),
        ("model.num_layers", target.depth),
    ] {
        if !plan
            .axes
            .iter()
            .any(|a| a.key == axis && a.values.len() >= 2)
        {
            continue;
        }
        // series: every axis value but LR, seed and this axis
        let series_of = |r: &TrialResult| -> Map<String, Value> {
            let mut m: Map<String, Value> = r
                .axes
                .iter()
                .filter(|(k, _)| {
                    k.as_str() != lr_key && k.as_str() != "train.seed" && k.as_str() != axis
                })
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            if !m.contains_key("init.scheme") && !base_scheme.is_empty() {
                m.insert("init.scheme".into(), Value::String(base_scheme.into()));
            }
            m
        };
        let mut series: Vec<Map<String, Value>> = Vec::new();
        for r in results {
            let s = series_of(r);
            if !series.contains(&s) {
                series.push(s);
            }
        }
        for s in series {
            let members: Vec<&TrialResult> = results
                .iter()
                .filter(|r| r.done() && series_of(r) == s)
                .collect();
            let mut ats: Vec<f64> = members
                .iter()
                .filter_map(|r| r.axes.get(axis).and_then(Value::as_f64))
                .collect();
            ats.sort_by(f64::total_cmp);
            ats.dedup();
            let mut points = Vec::new();
            for &at in &ats {
                let here: Vec<&&TrialResult> = members
                    .iter()
                    .filter(|r| r.axes.get(axis).and_then(Value::as_f64) == Some(at))
                    .collect();
                let mut seeds: Vec<Value> = here
                    .iter()
                    .map(|r| r.axes.get("train.seed").cloned().unwrap_or(Value::Null))
                    .collect();
                seeds.sort_by_key(|v| v.to_string());
                seeds.dedup();
                let mut opts = Vec::new();
                let mut edge = false;
                for seed in &seeds {
                    let mut pts: Vec<(f64, Option<f64>)> = here
                        .iter()
                        .filter(|r| r.axes.get("train.seed").unwrap_or(&Value::Null) == seed)
                        .filter_map(|r| {
                            let lr = r.axes.get(lr_key).and_then(Value::as_f64)?;
                            Some((lr, (!r.diverged).then_some(r.final_loss).flatten()))
                        })
                        .collect();
                    pts.sort_by(|a, b| a.0.total_cmp(&b.0));
                    if pts.len() < 2 {
                        continue;
                    }
                    if let Some((lr, e)) = seed_optimum(&pts) {
                        opts.push(lr.ln());
                        edge |= e;
                    }
                }
                if opts.is_empty() {
                    continue;
                }
                let m = mean(&opts);
                let scatter = if opts.len() >= 2 {
                    (opts.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (opts.len() - 1) as f64)
                        .sqrt()
                } else {
                    0.0
                };
                points.push(OptPoint {
                    at,
                    lr: m.exp(),
                    seeds: opts.len(),
                    scatter,
                    at_grid_edge: edge,
                });
            }
            if points.len() < 2 {
                continue;
            }
            out.push(fit(
                describe_group(&s, true),
                axis,
                points,
                tgt.map(|t| t as f64),
                true,
            ));
        }
    }
    out
}

/// Power law through the points, its holdout (≥ 3 points) and the target prediction.
fn fit(
    series: String,
    axis: &str,
    points: Vec<OptPoint>,
    target: Option<f64>,
    holdout: bool,
) -> OptTrend {
    let xy: Vec<(f64, f64)> = points.iter().map(|p| (p.at, p.lr)).collect();
    let f = power_fit(&xy);
    let n = points.len() as f64;
    let lx: Vec<f64> = points.iter().map(|p| p.at.ln()).collect();
    let mx = mean(&lx);
    let sxx: f64 = lx.iter().map(|x| (x - mx).powi(2)).sum();
    // per-point noise: the fit's residual and the seed scatter of a point's mean
    let seed_var = mean(
        &points
            .iter()
            .map(|p| p.scatter.powi(2) / p.seeds.max(1) as f64)
            .collect::<Vec<_>>(),
    );
    let resid = f.and_then(|f| f.resid_sigma).unwrap_or(0.0);
    let s = (resid.powi(2) + seed_var).sqrt();
    let known = f.is_some_and(|f| f.resid_sigma.is_some()) || points.iter().any(|p| p.seeds >= 2);
    let exponent_se = (known && sxx > 0.0).then(|| s / sxx.sqrt());
    let (predicted, predicted_range) = match (f, target) {
        (Some(f), Some(t)) => {
            let p = f.at(t);
            let se = s * (1.0 / n + (t.ln() - mx).powi(2) / sxx.max(1e-300)).sqrt();
            (
                Some(p),
                known.then(|| (p * (-2.0 * se).exp(), p * (2.0 * se).exp())),
            )
        }
        _ => (None, None),
    };
    let held = (holdout && points.len() >= 3)
        .then(|| {
            let mut rest = points.clone();
            let last = rest.pop()?;
            let sub = fit(String::new(), axis, rest, Some(last.at), false);
            let p = sub.predicted?;
            Some(OptHoldout {
                at: last.at,
                predicted: p,
                measured: last.lr,
                ratio: p / last.lr,
            })
        })
        .flatten();
    OptTrend {
        series,
        axis: axis.to_string(),
        points,
        exponent: f.map(|f| f.b),
        exponent_se,
        target,
        predicted,
        predicted_range,
        holdout: held,
    }
}

/// The recommendation's lines for one trend.
pub fn describe(t: &OptTrend) -> Vec<String> {
    let name = if t.axis == "model.hidden_size" {
        "width"
    } else {
        "depth"
    };
    let pts: Vec<String> = t
        .points
        .iter()
        .map(|p| {
            format!(
                "{}={}: {}{}{}",
                short_key(&t.axis),
                p.at,
                show_num(super::round_sig(p.lr)),
                if p.seeds >= 2 {
                    format!(" (seeds ×{:.2})", p.scatter.exp())
                } else {
                    String::new()
                },
                if p.at_grid_edge { " [grid edge]" } else { "" }
            )
        })
        .collect();
    let mut line = format!("Optimal LR vs {name} ({}): {}", t.series, pts.join(", "));
    if let Some(b) = t.exponent {
        line.push_str(&format!("; ∝ {name}^{b:+.2}"));
        if let Some(se) = t.exponent_se {
            line.push_str(&format!(" ± {se:.2}"));
        }
    }
    let mut out = vec![line];
    if t.points.iter().any(|p| p.at_grid_edge) {
        out.push(format!(
            "  ({}: some optimum sits at the grid's edge, so the trend there is a bound; extend the LR axis)",
            t.series
        ));
    }
    if let Some(h) = &t.holdout {
        out.push(format!(
            "  Holdout: optimal LR at {}={} predicted from the smaller ones {}, measured {}: {}",
            short_key(&t.axis),
            h.at,
            show_num(super::round_sig(h.predicted)),
            show_num(super::round_sig(h.measured)),
            if (0.5..=2.0).contains(&h.ratio) {
                format!("within 2× (×{:.2})", h.ratio)
            } else {
                format!("off by ×{:.2}", h.ratio)
            }
        ));
    }
    if let (Some(tg), Some(p)) = (t.target, t.predicted) {
        out.push(format!(
            "  At target {name} {tg}: optimal LR ≈ {}{}",
            show_num(super::round_sig(p)),
            match t.predicted_range {
                Some((lo, hi)) => format!(
                    " (±2σ: {} … {})",
                    show_num(super::round_sig(lo)),
                    show_num(super::round_sig(hi))
                ),
                None => " (one seed, two proxies: no error bar)".into(),
            }
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_parabola_in_log_lr_finds_the_vertex_between_grid_points() {
        // loss = (ln lr − ln 0.005)² + 1 on a 3× grid: the vertex is 0.005, between 3e-3 and 1e-2
        let f = |lr: f64| (lr.ln() - 0.005f64.ln()).powi(2) + 1.0;
        let pts: Vec<(f64, Option<f64>)> = [1e-3, 3e-3, 1e-2, 3e-2]
            .iter()
            .map(|&lr| (lr, Some(f(lr))))
            .collect();
        let (lr, edge) = seed_optimum(&pts).unwrap();
        assert!(!edge);
        assert!((lr / 0.005 - 1.0).abs() < 1e-9, "{lr}");
        // a minimum at the grid's end is reported as such, unrefined
        let pts: Vec<(f64, Option<f64>)> = [0.1, 0.3, 1.0]
            .iter()
            .map(|&lr| (lr, Some(f(lr))))
            .collect();
        assert_eq!(seed_optimum(&pts), Some((0.1, true)));
        // a diverged neighbour: no parabola, the grid point
        let pts = vec![(1e-3, Some(3.0)), (3e-3, Some(2.0)), (1e-2, None)];
        assert_eq!(seed_optimum(&pts), Some((3e-3, false)));
    }

    #[test]
    fn the_trend_recovers_a_power_law_and_holds_out_the_largest_proxy() {
        // optimal LR = 0.64 · width^−0.5 exactly, two seeds scattered ±10% in ln
        let pts: Vec<OptPoint> = [64.0, 128.0, 256.0, 512.0]
            .iter()
            .map(|&w: &f64| OptPoint {
                at: w,
                lr: 0.64 * w.powf(-0.5),
                seeds: 2,
                scatter: 0.1,
                at_grid_edge: false,
            })
            .collect();
        let t = fit("s".into(), "model.hidden_size", pts, Some(4096.0), true);
        assert!((t.exponent.unwrap() + 0.5).abs() < 1e-9);
        let p = t.predicted.unwrap();
        assert!((p / (0.64 / 64.0) - 1.0).abs() < 1e-9, "{p}");
        let (lo, hi) = t.predicted_range.unwrap();
        assert!(lo < p && p < hi && hi / lo > 1.2, "{lo} {hi}");
        let h = t.holdout.unwrap();
        assert_eq!(h.at, 512.0);
        assert!((h.ratio - 1.0).abs() < 1e-9);
        assert!(t.exponent_se.unwrap() > 0.0);
    }
}
