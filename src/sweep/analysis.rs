//! Sweep analysis: per-group LR statistics (best LR, max stable LR, LR sensitivity), the
//! trends over width and depth, and the recommendation. Pure functions of the trial results.

use super::collect::{mean, TrialResult};
use super::{num, short_key, show_num, Plan};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The LR statistics of one group (the trials sharing every non-LR, non-seed axis value).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GroupSummary {
    /// Axis key → value (no LR, no seed).
    pub group: Map<String, Value>,
    pub lrs: Vec<f64>,
    /// Mean over seeds of the final loss, per LR (None: every seed diverged or none ran).
    pub loss: Vec<Option<f64>>,
    /// Earliest divergence step over seeds, per LR.
    pub diverged_at: Vec<Option<u64>>,
    /// Mean final max attention logit, per LR.
    pub attn_logit: Vec<Option<f64>>,
    /// Loss spikes the (passive) guard detectors flagged, summed over seeds, per LR.
    #[serde(default)]
    pub spikes: Vec<usize>,
    pub initial_loss: Option<f64>,
    pub best_lr: Option<f64>,
    pub best_loss: Option<f64>,
    /// Largest LR with no diverged seed.
    pub max_stable_lr: Option<f64>,
    /// Smallest LR above `max_stable_lr` that diverged (the grid's bracket); None: none did.
    pub first_unstable_lr: Option<f64>,
    /// Wortsman et al. (2023): mean over the LR grid of min(loss, initial loss) − best loss.
    pub lr_sensitivity: Option<f64>,
    /// Contiguous stable LRs around the best whose loss is within `sweep.window` of it.
    pub lr_window: Option<(f64, f64)>,
    /// Every trial of the group finished or diverged.
    pub complete: bool,
}

/// Group key of a trial: its axis values without LR and seed.
fn group_of(r: &TrialResult, lr_key: &str) -> Map<String, Value> {
    r.axes
        .iter()
        .filter(|(k, _)| k.as_str() != lr_key && k.as_str() != "train.seed")
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

pub fn summarize(plan: &Plan, results: &[TrialResult]) -> Vec<GroupSummary> {
    let lr_key = plan.settings.lr_key.as_str();
    let mut groups: Vec<Map<String, Value>> = Vec::new();
    for r in results {
        let g = group_of(r, lr_key);
        if !groups.contains(&g) {
            groups.push(g);
        }
    }
    let mut lrs: Vec<f64> = plan
        .axes
        .iter()
        .find(|a| a.key == lr_key)
        .map(|a| a.values.iter().filter_map(num).collect())
        .unwrap_or_default();
    lrs.sort_by(f64::total_cmp);
    lrs.dedup();
    groups
        .into_iter()
        .map(|g| {
            let members: Vec<&TrialResult> = results
                .iter()
                .filter(|r| group_of(r, lr_key) == g)
                .collect();
            let complete = members.iter().all(|r| r.done());
            let at_lr = |lr: f64| -> Vec<&TrialResult> {
                members
                    .iter()
                    .copied()
                    .filter(|r| r.done() && r.axes.get(lr_key).and_then(Value::as_f64) == Some(lr))
                    .collect()
            };
            let inits: Vec<f64> = members.iter().filter_map(|r| r.initial_loss).collect();
            let initial_loss = mean(&inits);
            let mut loss = Vec::new();
            let mut diverged_at = Vec::new();
            let mut attn = Vec::new();
            let mut spikes = Vec::new();
            for &lr in &lrs {
                let rs = at_lr(lr);
                let div = rs
                    .iter()
                    .filter_map(|r| r.diverged.then_some(r.diverged_at.unwrap_or(0)))
                    .min();
                let ok: Vec<f64> = rs
                    .iter()
                    .filter(|r| !r.diverged)
                    .filter_map(|r| r.final_loss)
                    .collect();
                loss.push(if div.is_some() { None } else { mean(&ok) });
                diverged_at.push(div);
                let a: Vec<f64> = rs.iter().filter_map(|r| r.max_attn_logit).collect();
                attn.push(mean(&a));
                spikes.push(rs.iter().map(|r| r.spikes).sum());
            }
            let ran: Vec<usize> = (0..lrs.len())
                .filter(|&i| !at_lr(lrs[i]).is_empty())
                .collect();
            let stable: Vec<usize> = ran
                .iter()
                .copied()
                .filter(|&i| diverged_at[i].is_none() && loss[i].is_some())
                .collect();
            let best = stable.iter().copied().min_by(|&a, &b| {
                loss[a]
                    .unwrap_or(f64::MAX)
                    .total_cmp(&loss[b].unwrap_or(f64::MAX))
            });
            // the stability edge: the first LR that diverged, and the last stable one below it
            // (a stable LR above a diverged one is luck, not a wider window)
            let first_unstable = ran.iter().copied().find(|&i| diverged_at[i].is_some());
            let max_stable = stable
                .iter()
                .copied()
                .rfind(|&i| first_unstable.is_none_or(|f| i < f));
            let best_loss = best.and_then(|i| loss[i]);
            // only over the whole grid: a half-run group would look robust
            let lr_sensitivity = match (best_loss, initial_loss) {
                (Some(b), Some(l0)) if complete && ran.len() == lrs.len() => {
                    let capped: Vec<f64> = ran
                        .iter()
                        .map(|&i| loss[i].map_or(l0, |x| x.min(l0)) - b)
                        .collect();
                    mean(&capped)
                }
                _ => None,
            };
            let lr_window = best.map(|b| {
                let within = |i: usize| {
                    diverged_at[i].is_none()
                        && loss[i].is_some_and(|x| {
                            x <= best_loss.unwrap_or(0.0) * (1.0 + plan.settings.window)
                        })
                };
                let (mut lo, mut hi) = (b, b);
                while lo > 0 && within(lo - 1) {
                    lo -= 1;
                }
                while hi + 1 < lrs.len() && within(hi + 1) {
                    hi += 1;
                }
                (lrs[lo], lrs[hi])
            });
            GroupSummary {
                group: g,
                lrs: lrs.clone(),
                loss,
                diverged_at,
                attn_logit: attn,
                spikes,
                initial_loss,
                best_lr: best.map(|i| lrs[i]),
                best_loss,
                max_stable_lr: max_stable.map(|i| lrs[i]),
                first_unstable_lr: first_unstable.map(|i| lrs[i]),
                lr_sensitivity,
                lr_window,
                complete,
            }
        })
        .collect()
}

/// Least squares on (ln x, ln y): y ≈ exp(a) · x^b; `se_b` and the residual σ in log space
/// need ≥ 3 points.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct PowerFit {
    pub a: f64,
    pub b: f64,
    pub n: usize,
    pub resid_sigma: Option<f64>,
    pub se_b: Option<f64>,
}

pub fn power_fit(pts: &[(f64, f64)]) -> Option<PowerFit> {
    let p: Vec<(f64, f64)> = pts
        .iter()
        .filter(|(x, y)| *x > 0.0 && *y > 0.0 && y.is_finite())
        .map(|(x, y)| (x.ln(), y.ln()))
        .collect();
    let n = p.len();
    if n < 2 {
        return None;
    }
    let mx = p.iter().map(|q| q.0).sum::<f64>() / n as f64;
    let my = p.iter().map(|q| q.1).sum::<f64>() / n as f64;
    let sxx: f64 = p.iter().map(|q| (q.0 - mx).powi(2)).sum();
    if sxx <= 0.0 {
        return None;
    }
    let b = p.iter().map(|q| (q.0 - mx) * (q.1 - my)).sum::<f64>() / sxx;
    let a = my - b * mx;
    let (resid_sigma, se_b) = if n >= 3 {
        let rss: f64 = p.iter().map(|q| (q.1 - a - b * q.0).powi(2)).sum();
        let s = (rss / (n - 2) as f64).sqrt();
        (Some(s), Some(s / sxx.sqrt()))
    } else {
        (None, None)
    };
    Some(PowerFit {
        a,
        b,
        n,
        resid_sigma,
        se_b,
    })
}

impl PowerFit {
    pub fn at(&self, x: f64) -> f64 {
        (self.a + self.b * x.ln()).exp()
    }
}

/// Where the trends are extrapolated to.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Target {
    pub width: Option<usize>,
    pub depth: Option<usize>,
    /// Where it came from (an HF config path, --target).
    pub source: String,
}

/// A trend of one scheme along width or depth.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Trend {
    pub scheme: String,
    /// model.hidden_size or model.num_layers
    pub axis: String,
    /// (axis value, largest stable LR, the grid's next LR that diverged or None)
    pub points: Vec<(f64, f64, Option<f64>)>,
    pub exponent: Option<f64>,
    pub exponent_range: Option<(f64, f64)>,
    pub target: Option<f64>,
    pub predicted_lr: Option<f64>,
    pub predicted_range: Option<(f64, Option<f64>)>,
    /// The fit's own check (≥ 3 points): the largest proxy predicted from the others.
    #[serde(default)]
    pub holdout: Option<Holdout>,
}

/// The largest proxy of a trend predicted from the smaller ones, against its measurement.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Holdout {
    /// The held-out width or depth.
    pub at: f64,
    /// Predicted max stable LR there (None: a smaller proxy had no diverged LR).
    pub predicted: Option<f64>,
    pub predicted_range: Option<(f64, Option<f64>)>,
    /// Its measured bracket: the largest stable LR and the grid's next LR, which diverged.
    pub measured: (f64, Option<f64>),
    /// predicted / measured (the bracket's geometric midpoint; its stable end when no LR
    /// diverged there).
    pub ratio: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SchemeScore {
    pub scheme: String,
    pub mean_lr_sensitivity: Option<f64>,
    pub mean_best_loss: Option<f64>,
    pub diverged_trials: usize,
    pub trials: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Recommendation {
    pub scheme: Option<String>,
    pub lr_window: Option<(f64, f64)>,
    pub schemes: Vec<SchemeScore>,
    pub lr_trends: Vec<Trend>,
    /// The optimal LR along width/depth per series (`sweep::optimum`).
    #[serde(default)]
    pub lr_opt_trends: Vec<super::optimum::OptTrend>,
    pub attn_trend: Option<Trend>,
    /// The recommendation in words, one finding per line.
    pub text: Vec<String>,
}

/// " for xavier-normal", or nothing in a command sweep (no keel init scheme).
fn for_scheme(s: &str) -> String {
    if s.is_empty() {
        String::new()
    } else {
        format!(" for {s}")
    }
}

fn of_scheme(s: &str) -> String {
    if s.is_empty() {
        String::new()
    } else {
        format!(" of {s}")
    }
}

fn paren(s: &str) -> String {
    if s.is_empty() {
        String::new()
    } else {
        format!(" ({s})")
    }
}

fn scheme_of(g: &Map<String, Value>, base: &str) -> String {
    g.get("init.scheme")
        .and_then(Value::as_str)
        .unwrap_or(base)
        .to_string()
}

/// Pooled standard deviation of the final loss between seeds of the same trial (same axes
/// but `train.seed`, not diverged), and how many such cells there were; None without
/// repeated seeds.
pub fn seed_noise(plan: &Plan, results: &[TrialResult]) -> Option<(f64, usize)> {
    let _ = plan;
    let mut cells: Vec<(Map<String, Value>, Vec<f64>)> = Vec::new();
    for r in results.iter().filter(|r| r.done() && !r.diverged) {
        let Some(l) = r.final_loss.filter(|x| x.is_finite()) else {
            continue;
        };
        let key: Map<String, Value> = r
            .axes
            .iter()
            .filter(|(k, _)| k.as_str() != "train.seed")
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        match cells.iter_mut().find(|(k, _)| *k == key) {
            Some((_, v)) => v.push(l),
            None => cells.push((key, vec![l])),
        }
    }
    let vars: Vec<f64> = cells
        .iter()
        .filter(|(_, v)| v.len() >= 2)
        .map(|(_, v)| {
            let m = v.iter().sum::<f64>() / v.len() as f64;
            v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (v.len() - 1) as f64
        })
        .collect();
    mean(&vars).map(|v| (v.sqrt(), vars.len()))
}

pub fn recommend(
    plan: &Plan,
    base_scheme: &str,
    results: &[TrialResult],
    groups: &[GroupSummary],
    target: &Target,
) -> Recommendation {
    let mut text = Vec::new();
    let mut schemes: Vec<String> = Vec::new();
    for g in groups {
        let s = scheme_of(&g.group, base_scheme);
        if !schemes.contains(&s) {
            schemes.push(s);
        }
    }
    let scores: Vec<SchemeScore> = schemes
        .iter()
        .map(|s| {
            let gs: Vec<&GroupSummary> = groups
                .iter()
                .filter(|g| &scheme_of(&g.group, base_scheme) == s)
                .collect();
            let sens: Vec<f64> = gs.iter().filter_map(|g| g.lr_sensitivity).collect();
            let best: Vec<f64> = gs.iter().filter_map(|g| g.best_loss).collect();
            let rs: Vec<&TrialResult> = results
                .iter()
                .filter(|r| {
                    r.done()
                        && r.axes
                            .get("init.scheme")
                            .and_then(Value::as_str)
                            .unwrap_or(base_scheme)
                            == s
                })
                .collect();
            SchemeScore {
                scheme: s.clone(),
                // a scheme with a group that never trained stably has no sensitivity: worst
                mean_lr_sensitivity: (sens.len() == gs.len()).then(|| mean(&sens)).flatten(),
                mean_best_loss: mean(&best),
                diverged_trials: rs.iter().filter(|r| r.diverged).count(),
                trials: rs.len(),
            }
        })
        .collect();
    // What a user wants first is the lowest loss; among schemes whose best losses differ by
    // less than the seed noise, the widest LR window (the stablest choice) decides, then
    // the LR sensitivity. The text says which metric decided.
    let noise = seed_noise(plan, results);
    let window_decades = |s: &str| -> Option<f64> {
        let ws: Vec<f64> = groups
            .iter()
            .filter(|g| scheme_of(&g.group, base_scheme) == s)
            .map(|g| g.lr_window.map(|(lo, hi)| (hi / lo).log10()))
            .collect::<Option<Vec<f64>>>()?;
        mean(&ws)
    };
    let eligible: Vec<&SchemeScore> = scores
        .iter()
        .filter(|s| s.mean_best_loss.is_some() && s.mean_lr_sensitivity.is_some())
        .collect();
    let lowest = eligible.iter().copied().min_by(|a, b| {
        a.mean_best_loss
            .unwrap_or(f64::MAX)
            .total_cmp(&b.mean_best_loss.unwrap_or(f64::MAX))
    });
    // a lead smaller than twice the seed noise is no lead (unmeasured noise: any lead counts,
    // and the text says it may not be significant)
    let tie = |a: &SchemeScore, b: &SchemeScore| match noise {
        Some((sd, _)) => {
            (a.mean_best_loss.unwrap_or(f64::MAX) - b.mean_best_loss.unwrap_or(f64::MAX)).abs()
                < 2.0 * sd
        }
        None => false,
    };
    let mut decided_by = "lowest loss reached";
    let robust = lowest.map(|low| {
        let tied: Vec<&SchemeScore> = eligible.iter().copied().filter(|s| tie(s, low)).collect();
        if tied.len() <= 1 {
            return low;
        }
        decided_by = "widest LR window among schemes whose best losses are within the seed noise";
        tied.into_iter()
            .max_by(|a, b| {
                let (wa, wb) = (
                    window_decades(&a.scheme).unwrap_or(-1.0),
                    window_decades(&b.scheme).unwrap_or(-1.0),
                );
                wa.total_cmp(&wb).then(
                    b.mean_lr_sensitivity
                        .unwrap_or(f64::MAX)
                        .total_cmp(&a.mean_lr_sensitivity.unwrap_or(f64::MAX)),
                )
            })
            .unwrap_or(low)
    });
    let mut lr_window = None;
    if let Some(r) = robust {
        let others: Vec<String> = scores
            .iter()
            .filter(|s| s.scheme != r.scheme)
            .map(|s| match (s.mean_best_loss, s.mean_lr_sensitivity) {
                (Some(b), Some(x)) => format!(
                    "{} {b:.3} (Δ {:+.3}; sensitivity {x:.3})",
                    s.scheme,
                    b - r.mean_best_loss.unwrap_or(f64::NAN)
                ),
                _ => format!("{} (no stable LR in some group)", s.scheme),
            })
            .collect();
        let n_groups = groups
            .iter()
            .filter(|g| scheme_of(&g.group, base_scheme) == r.scheme)
            .count();
        text.push(if r.scheme.is_empty() {
            // a command sweep: no init scheme to recommend, the script's own init
            format!(
                "Mean best loss {:.3} nats over {n_groups} group(s), LR sensitivity {:.3} (Wortsman et al. 2023)",
                r.mean_best_loss.unwrap_or(f64::NAN),
                r.mean_lr_sensitivity.unwrap_or(f64::NAN),
            )
        } else {
            format!(
                "Recommended scheme: {} — decided by {decided_by}: mean best loss {:.3} nats over {n_groups} group(s), LR sensitivity {:.3} (Wortsman et al. 2023){}",
                r.scheme,
                r.mean_best_loss.unwrap_or(f64::NAN),
                r.mean_lr_sensitivity.unwrap_or(f64::NAN),
                if others.is_empty() { String::new() } else { format!("; others: {}", others.join(", ")) }
            )
        });
        text.push(match noise {
            Some((sd, n)) => format!(
                "Seed noise: σ {sd:.3} nats of final loss between seeds ({n} LR × group cells with repeated seeds); leads under {:.3} (2σ) are not significant",
                2.0 * sd
            ),
            None => "One seed per trial: the seed noise is not measured, so differences of a few hundredths of a nat may not be significant (add a train.seed axis to measure it)".to_string(),
        });
        // the LRs inside the window of every group of that scheme
        let gs: Vec<&GroupSummary> = groups
            .iter()
            .filter(|g| scheme_of(&g.group, base_scheme) == r.scheme)
            .collect();
        let all_lrs = gs.first().map(|g| g.lrs.clone()).unwrap_or_default();
        let common: Vec<f64> = all_lrs
            .iter()
            .copied()
            .filter(|&x| {
                gs.iter()
                    .all(|g| g.lr_window.is_some_and(|(lo, hi)| x >= lo && x <= hi))
            })
            .collect();
        if let (Some(&lo), Some(&hi)) = (common.first(), common.last()) {
            lr_window = Some((lo, hi));
            text.push(if lo == hi {
                format!(
                    "Only LR {} is within {:.0}% of the best loss in every group{}: the grid shows no window; sweep finer around it",
                    show_num(lo),
                    plan.settings.window * 100.0,
                    of_scheme(&r.scheme)
                )
            } else {
                format!(
                    "LR window{}: {} … {} — stable and within {:.0}% of the best loss in every group",
                    for_scheme(&r.scheme),
                    show_num(lo),
                    show_num(hi),
                    plan.settings.window * 100.0
                )
            });
        } else {
            let per: Vec<String> = gs
                .iter()
                .filter_map(|g| {
                    g.lr_window.map(|(lo, hi)| {
                        format!(
                            "{}: {} … {}",
                            describe_group(&g.group, true),
                            show_num(lo),
                            show_num(hi)
                        )
                    })
                })
                .collect();
            text.push(format!(
                "No single LR is within {:.0}% of the best in every group{}; per group: {}",
                plan.settings.window * 100.0,
                of_scheme(&r.scheme),
                per.join("; ")
            ));
        }
    } else if !scores.is_empty() {
        text.push(
            "No scheme trained stably in every group: lower the LR range or the step budget's LR"
                .into(),
        );
    }
    let mut lr_trends = Vec::new();
    for (axis, tgt) in [
        ("model.hidden_size", target.width),
        ("model.num_layers", target.depth),
    ] {
        let vals: Vec<f64> = plan
            .axes
            .iter()
            .find(|a| a.key == axis)
            .map(|a| a.values.iter().filter_map(num).collect())
            .unwrap_or_default();
        if vals.len() < 2 {
            continue;
        }
        for s in &schemes {
            let mut points = Vec::new();
            for &v in &vals {
                let gs: Vec<&GroupSummary> = groups
                    .iter()
                    .filter(|g| {
                        scheme_of(&g.group, base_scheme) == *s
                            && g.group.get(axis).and_then(Value::as_f64) == Some(v)
                    })
                    .collect();
                // conservative over the other axes: the smallest max-stable LR and the
                // smallest diverged LR above it; a group with no stable LR drops the point
                if gs.is_empty() || gs.iter().any(|g| g.max_stable_lr.is_none()) {
                    continue;
                }
                let ms = gs.iter().filter_map(|g| g.max_stable_lr).reduce(f64::min);
                if let Some(ms) = ms {
                    let up = gs
                        .iter()
                        .filter_map(|g| g.first_unstable_lr)
                        .filter(|&u| u > ms)
                        .reduce(f64::min);
                    points.push((v, ms, up));
                }
            }
            lr_trends.push(trend(s, axis, points, tgt.map(|t| t as f64)));
        }
    }
    let name = |axis: &str| {
        if axis == "model.hidden_size" {
            "width"
        } else {
            "depth"
        }
    };
    for t in &lr_trends {
        if Some(&t.scheme) != robust.map(|r| &r.scheme) && robust.is_some() {
            continue;
        }
        let pts: Vec<String> = t
            .points
            .iter()
            .map(|(v, ms, up)| match up {
                Some(u) => format!(
                    "{}={v}: {} (diverged at {})",
                    short_key(&t.axis),
                    show_num(*ms),
                    show_num(*u)
                ),
                None => format!(
                    "{}={v}: ≥ {} (none diverged)",
                    short_key(&t.axis),
                    show_num(*ms)
                ),
            })
            .collect();
        let mut line = format!(
            "Max stable LR vs {}{}: {}",
            name(&t.axis),
            paren(&t.scheme),
            pts.join(", ")
        );
        match (t.exponent, t.exponent_range) {
            (Some(b), Some((lo, hi))) => line.push_str(&format!(
                "; ∝ {}^{b:+.2} (exponent {lo:+.2} … {hi:+.2} within the grid's brackets)",
                name(&t.axis)
            )),
            _ => line.push_str(&format!(
                "; no trend: the edge was not reached at every {}",
                name(&t.axis)
            )),
        }
        text.push(line);
        if let Some(h) = &t.holdout {
            let measured = match h.measured {
                (lo, Some(hi)) => format!("{} … {}", show_num(lo), show_num(hi)),
                (lo, None) => format!("≥ {} (none diverged)", show_num(lo)),
            };
            text.push(match (h.predicted, h.ratio) {
                (Some(p), Some(r)) => format!(
                    "Holdout: {}={} predicted from the smaller ones: max stable LR {}{}; measured {measured}: {}",
                    short_key(&t.axis),
                    h.at,
                    show_num(super::round_sig(p)),
                    match h.predicted_range {
                        Some((lo, Some(hi))) => format!(" (range {} … {})", show_num(super::round_sig(lo)), show_num(super::round_sig(hi))),
                        _ => String::new(),
                    },
                    if (0.5..=2.0).contains(&r) {
                        format!("within 2× (×{r:.2})")
                    } else {
                        format!("off by ×{r:.2}: do not trust this trend's extrapolation")
                    }
                ),
                _ => format!(
                    "Holdout: {}={} cannot be predicted from the smaller ones (at one of them no LR diverged); measured {measured}",
                    short_key(&t.axis),
                    h.at
                ),
            });
        }
        if t.target.is_some() && t.predicted_lr.is_none() && t.points.len() >= 2 {
            text.push(format!(
                "No extrapolation to the target {}: at some {} no LR diverged, so the limit there is unknown — extend the LR axis up",
                name(&t.axis),
                name(&t.axis)
            ));
        }
        if let (Some(tg), Some(p)) = (t.target, t.predicted_lr) {
            let maxv = t.points.iter().map(|p| p.0).fold(0.0, f64::max);
            let range = match t.predicted_range {
                Some((lo, Some(hi))) => format!("range {} … {}", show_num(lo), show_num(hi)),
                Some((lo, None)) => format!("at least {}", show_num(lo)),
                None => String::new(),
            };
            let honest = if t.points.len() < 3 {
                format!(
                    "{} points: no statistical error bar, only the grid's brackets",
                    t.points.len()
                )
            } else {
                format!("{} points, ±2σ of the fit included", t.points.len())
            };
            let far = tg / maxv.max(1.0);
            text.push(format!(
                "At target {} {tg} ({}): predicted max stable LR {} — {range}; {honest}{}",
                name(&t.axis),
                target.source,
                show_num(super::round_sig(p)),
                if far > 4.0 { format!("; extrapolating ×{far:.0} beyond the largest {} measured: read it as an order of magnitude", name(&t.axis)) } else { String::new() }
            ));
        }
    }
    let lr_opt_trends = super::optimum::optimal_trends(plan, base_scheme, results, target);
    for t in &lr_opt_trends {
        text.extend(super::optimum::describe(t));
    }
    // attention-logit growth with width, for the robust scheme at the largest LR every width trained stably at
    let mut attn_trend = None;
    if let (Some(r), Some(ax)) = (
        robust,
        plan.axes.iter().find(|a| a.key == "model.hidden_size"),
    ) {
        let widths: Vec<f64> = ax.values.iter().filter_map(num).collect();
        let gs: Vec<&GroupSummary> = groups
            .iter()
            .filter(|g| scheme_of(&g.group, base_scheme) == r.scheme)
            .collect();
        let ref_lr = gs.iter().filter_map(|g| g.max_stable_lr).reduce(f64::min);
        if let (Some(ref_lr), true) = (ref_lr, widths.len() >= 2) {
            let mut pts = Vec::new();
            for &w in &widths {
                let vals: Vec<f64> = gs
                    .iter()
                    .filter(|g| g.group.get("model.hidden_size").and_then(Value::as_f64) == Some(w))
                    .filter_map(|g| {
                        g.lrs
                            .iter()
                            .position(|&x| x == ref_lr)
                            .and_then(|i| g.attn_logit[i])
                    })
                    .collect();
                if let Some(m) = mean(&vals) {
                    pts.push((w, m, None));
                }
            }
            let fit = power_fit(&pts.iter().map(|p| (p.0, p.1)).collect::<Vec<_>>());
            let mut line = format!(
                "Max attention logit at LR {}{}: {}",
                show_num(ref_lr),
                paren(&r.scheme),
                pts.iter()
                    .map(|p| format!("d={}: {:.1}", p.0, p.1))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            let mut predicted = None;
            if let Some(fit) = fit {
                line.push_str(&format!("; ∝ width^{:+.2}", fit.b));
                if let Some(tw) = target.width {
                    let p = fit.at(tw as f64);
                    predicted = Some(p);
                    line.push_str(&format!(
                        "; at width {tw}: ≈ {p:.0} (guard warns above {}; {} points, no error bar{})",
                        crate::monitor::GuardConfig::default().attn_logit_max,
                        pts.len(),
                        if p > crate::monitor::GuardConfig::default().attn_logit_max { " — consider QK-norm or a lower LR" } else { "" }
                    ));
                }
            }
            text.push(line);
            attn_trend = Some(Trend {
                scheme: r.scheme.clone(),
                axis: "model.hidden_size".into(),
                points: pts,
                exponent: fit.map(|f| f.b),
                exponent_range: None,
                target: target.width.map(|w| w as f64),
                predicted_lr: predicted,
                predicted_range: None,
                holdout: None,
            });
        }
    }
    if !plan.axes.iter().any(|a| a.key == "model.hidden_size") && (target.width.is_some()) {
        text.push("The sweep has one width: no trend to extrapolate to the target width; add \"model.hidden_size\" = [128, 256, 512] to [axes]".into());
    }
    // the grid's edges: an optimum or a stability limit outside it is not measured
    let at_low: Vec<String> = groups
        .iter()
        .filter(|g| g.best_lr.is_some() && g.best_lr == g.lrs.first().copied())
        .map(|g| describe_group(&g.group, true))
        .collect();
    if !at_low.is_empty() {
        text.push(format!(
            "The best LR is the smallest one swept in {} of {} group(s) ({}): the optimum may lie lower — extend the LR axis down",
            at_low.len(),
            groups.len(),
            at_low.join("; ")
        ));
    }
    let none_div = groups
        .iter()
        .filter(|g| g.max_stable_lr.is_some() && g.first_unstable_lr.is_none())
        .count();
    if none_div > 0 {
        text.push(format!(
            "No LR diverged in {none_div} of {} group(s): their max stable LR is only a lower bound — extend the LR axis up to find the edge",
            groups.len()
        ));
    }
    let incomplete = groups.iter().filter(|g| !g.complete).count();
    if incomplete > 0 {
        text.push(format!(
            "{incomplete} group(s) have unfinished trials: the numbers above use the finished ones"
        ));
    }
    Recommendation {
        scheme: robust.map(|r| r.scheme.clone()),
        lr_window,
        schemes: scores,
        lr_trends,
        lr_opt_trends,
        attn_trend,
        text,
    }
}

fn trend(
    scheme: &str,
    axis: &str,
    points: Vec<(f64, f64, Option<f64>)>,
    target: Option<f64>,
) -> Trend {
    let mut t = fit_trend(scheme, axis, points, target);
    if t.points.len() >= 3 {
        // hold out the largest proxy: what the fit would have said about it
        let mut pts = t.points.clone();
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        let last = pts.pop().expect("≥ 3 points");
        let sub = fit_trend(scheme, axis, pts, Some(last.0));
        let mid = last.2.map_or(last.1, |u| (last.1 * u).sqrt());
        t.holdout = Some(Holdout {
            at: last.0,
            predicted: sub.predicted_lr,
            predicted_range: sub.predicted_range,
            measured: (last.1, last.2),
            ratio: sub.predicted_lr.map(|p| p / mid),
        });
    }
    t
}

fn fit_trend(
    scheme: &str,
    axis: &str,
    points: Vec<(f64, f64, Option<f64>)>,
    target: Option<f64>,
) -> Trend {
    // The true max stable LR at each point lies in [largest stable, first diverged) of the
    // grid. Lines through every combination of bracket ends bound the exponent and the
    // prediction; the central estimate goes through the bracket midpoints (log space), or
    // through the stable ends when some point has no diverged LR (then only a lower bound).
    let all_up = points.iter().all(|p| p.2.is_some());
    let central_pts: Vec<(f64, f64)> = points
        .iter()
        .map(|p| {
            (
                p.0,
                if all_up {
                    p.2.map_or(p.1, |u| (p.1 * u).sqrt())
                } else {
                    p.1
                },
            )
        })
        .collect();
    let central = power_fit(&central_pts);
    let widen = central
        .and_then(|f| f.resid_sigma)
        .map_or(1.0, |s| (2.0 * s).exp());
    let n = points.len();
    let (mut bmin, mut bmax) = (f64::MAX, f64::MIN);
    let (mut pmin, mut pmax) = (f64::MAX, f64::MIN);
    // every combination of ends up to 8 points; beyond, the all-low / all-high / mixed-half lines
    let masks: Vec<u32> = if !all_up {
        vec![]
    } else if n <= 8 {
        (0u32..(1 << n)).collect()
    } else {
        vec![
            0,
            u32::MAX,
            0x5555_5555,
            0xAAAA_AAAA,
            (1 << (n / 2)) - 1,
            !((1 << (n / 2)) - 1),
        ]
    };
    for mask in masks {
        let pts: Vec<(f64, f64)> = points
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let hi = i < 32 && mask & (1 << i) != 0;
                (p.0, if hi { p.2.unwrap_or(p.1) } else { p.1 })
            })
            .collect();
        if let Some(f) = power_fit(&pts) {
            bmin = bmin.min(f.b);
            bmax = bmax.max(f.b);
            if let Some(t) = target {
                pmin = pmin.min(f.at(t));
                pmax = pmax.max(f.at(t));
            }
        }
    }
    // with an unbracketed point the limit has no ceiling there: no range, no extrapolation
    let exponent_range = (bmin <= bmax).then_some((bmin, bmax));
    let predicted_range =
        (target.is_some() && pmin <= pmax).then(|| (pmin / widen, Some(pmax * widen)));
    Trend {
        scheme: scheme.to_string(),
        axis: axis.to_string(),
        points,
        exponent: central.map(|f| f.b),
        exponent_range,
        target,
        predicted_lr: target
            .filter(|_| all_up)
            .and_then(|t| central.map(|f| f.at(t))),
        predicted_range,
        holdout: None,
    }
}

/// "L=4, d=128, xavier-normal" (without the scheme when `no_scheme`).
pub fn describe_group(g: &Map<String, Value>, with_scheme: bool) -> String {
    let parts: Vec<String> = g
        .iter()
        .filter(|(k, _)| with_scheme || k.as_str() != "init.scheme")
        .map(|(k, v)| match v {
            Value::String(s) if k == "init.scheme" => s.clone(),
            Value::String(s) => format!("{}={s}", short_key(k)),
            other => format!("{}={other}", short_key(k)),
        })
        .collect();
    if parts.is_empty() {
        "all".into()
    } else {
        parts.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn plan(lrs: &[f64]) -> Plan {
        Plan {
            axes: vec![super::super::Axis {
                key: "optim.lr".into(),
                values: lrs.iter().map(|&x| toml::Value::Float(x)).collect(),
            }],
            settings: Default::default(),
            trials: vec![],
            steps: 10,
            base_scheme: "normal".into(),
            base: String::new(),
            command: None,
        }
    }

    fn trial(lr: f64, loss: Option<f64>, div: Option<u64>) -> TrialResult {
        let mut axes = Map::new();
        axes.insert("optim.lr".into(), json!(lr));
        TrialResult {
            id: format!("lr{lr}"),
            axes,
            status: if div.is_some() {
                "diverged"
            } else {
                "finished"
            }
            .into(),
            steps_planned: 10,
            steps_done: div.unwrap_or(10),
            initial_loss: Some(8.0),
            final_loss: loss,
            final_train_loss: loss,
            val_loss: loss,
            min_loss: loss,
            diverged: div.is_some(),
            diverged_at: div,
            diverged_reason: None,
            max_attn_logit: None,
            peak_attn_logit: None,
            final_grad_norm: None,
            spikes: 0,
            warnings: 0,
            first_attn_warning: None,
            first_logit_warning: None,
            first_loss_spike: None,
            peak_logit_z: None,
            wall_s: None,
            tokens_per_s: None,
            ..Default::default()
        }
    }

    #[test]
    fn group_statistics_follow_their_definitions() {
        let p = plan(&[1e-3, 1e-2, 1e-1, 1.0]);
        // a lucky stable LR above a diverged one does not widen the stable range
        let rs = vec![
            trial(1e-3, Some(3.0), None),
            trial(1e-2, Some(2.0), None),
            trial(1e-1, None, Some(12)),
            trial(1.0, Some(9.0), None),
        ];
        let g = &summarize(&p, &rs)[0];
        assert_eq!(g.best_lr, Some(1e-2));
        assert_eq!(g.max_stable_lr, Some(1e-2));
        assert_eq!(g.first_unstable_lr, Some(1e-1));
        // mean of min(loss, 8) − 2 over the grid: (1 + 0 + 6 + 6) / 4
        assert!((g.lr_sensitivity.unwrap() - 13.0 / 4.0).abs() < 1e-12);
        assert_eq!(g.lr_window, Some((1e-2, 1e-2)));
        // an unfinished trial: no sensitivity (a partial grid would look robust)
        let mut part = rs.clone();
        part[3].status = "incomplete".into();
        assert_eq!(summarize(&p, &part)[0].lr_sensitivity, None);
    }

    #[test]
    fn trend_brackets_and_refuses_unbounded_extrapolation() {
        // max stable LR halves per width doubling; the next grid LR (×2) diverged
        let pts = vec![
            (128.0, 0.04, Some(0.08)),
            (256.0, 0.02, Some(0.04)),
            (512.0, 0.01, Some(0.02)),
        ];
        let t = trend("s", "model.hidden_size", pts, Some(4096.0));
        assert!((t.exponent.unwrap() + 1.0).abs() < 1e-9);
        let (lo, hi) = t.exponent_range.unwrap();
        assert!(lo < -1.0 && hi > -1.0);
        let p = t.predicted_lr.unwrap();
        // midpoint line: √2·0.04·(128/4096)
        assert!((p - 0.04 * 2f64.sqrt() / 32.0).abs() < 1e-9, "{p}");
        let (plo, phi) = t.predicted_range.unwrap();
        assert!(plo <= p && phi.unwrap() >= p);
        // one width with no diverged LR: no bound, no extrapolation
        let t = trend(
            "s",
            "model.hidden_size",
            vec![(128.0, 0.04, Some(0.08)), (256.0, 0.02, None)],
            Some(4096.0),
        );
        assert!(t.exponent_range.is_none() && t.predicted_lr.is_none());
    }

    #[test]
    fn the_largest_proxy_is_predicted_from_the_others() {
        // a clean power law: the holdout lands on the measured bracket (ratio 1)
        let law = vec![
            (128.0, 0.04, Some(0.08)),
            (256.0, 0.02, Some(0.04)),
            (512.0, 0.01, Some(0.02)),
        ];
        let h = trend("s", "model.hidden_size", law, None).holdout.unwrap();
        assert_eq!(h.at, 512.0);
        assert_eq!(h.measured, (0.01, Some(0.02)));
        assert!((h.ratio.unwrap() - 1.0).abs() < 1e-9, "{h:?}");
        // the largest proxy breaks the law (its edge 4x lower than the trend says): seen
        let bent = vec![
            (128.0, 0.04, Some(0.08)),
            (256.0, 0.02, Some(0.04)),
            (512.0, 0.0025, Some(0.005)),
        ];
        let h = trend("s", "model.hidden_size", bent, None).holdout.unwrap();
        assert!((h.ratio.unwrap() - 4.0).abs() < 1e-9, "{h:?}");
        // two points: nothing to hold out
        let two = vec![(128.0, 0.04, Some(0.08)), (256.0, 0.02, Some(0.04))];
        assert!(trend("s", "model.hidden_size", two, None).holdout.is_none());
    }

    fn with(mut t: TrialResult, scheme: &str, seed: i64) -> TrialResult {
        t.axes.insert("init.scheme".into(), json!(scheme));
        t.axes.insert("train.seed".into(), json!(seed));
        t.id = format!("{}-{scheme}-{seed}", t.id);
        t
    }

    fn plan2(lrs: &[f64]) -> Plan {
        let mut p = plan(lrs);
        p.axes.push(super::super::Axis {
            key: "init.scheme".into(),
            values: vec!["normal".into(), "xavier-normal".into()],
        });
        p
    }

    #[test]
    fn the_recommendation_follows_the_lowest_loss_and_says_why() {
        // xavier-normal is lower at every LR, yet (relative to its own best) more LR
        // sensitive: the user wants the lower loss
        let p = plan2(&[1e-3, 1e-2, 1e-1]);
        let rs = vec![
            with(trial(1e-3, Some(2.50), None), "normal", 1),
            with(trial(1e-2, Some(2.40), None), "normal", 1),
            with(trial(1e-1, Some(2.45), None), "normal", 1),
            with(trial(1e-3, Some(2.30), None), "xavier-normal", 1),
            with(trial(1e-2, Some(1.90), None), "xavier-normal", 1),
            with(trial(1e-1, Some(2.35), None), "xavier-normal", 1),
        ];
        let g = summarize(&p, &rs);
        let r = recommend(&p, "normal", &rs, &g, &Target::default());
        assert_eq!(r.scheme.as_deref(), Some("xavier-normal"), "{:?}", r.text);
        assert!(
            r.text[0].contains("decided by lowest loss reached"),
            "{}",
            r.text[0]
        );
        assert!(r.text[1].contains("One seed per trial"), "{}", r.text[1]);
        // a one-point window is not called a window
        assert!(r.text[2].starts_with("Only LR 0.01"), "{}", r.text[2]);
        // with repeated seeds whose noise exceeds the lead, the wider LR window decides
        let mut rs2 = Vec::new();
        for (seed, d) in [(1, 0.2), (2, -0.2)] {
            for (lr, a, b) in [(1e-3, 2.0, 2.5), (1e-2, 2.0, 1.95), (1e-1, 2.02, 2.6)] {
                rs2.push(with(trial(lr, Some(a + d), None), "normal", seed));
                rs2.push(with(trial(lr, Some(b + d), None), "xavier-normal", seed));
            }
        }
        let g = summarize(&p, &rs2);
        let r = recommend(&p, "normal", &rs2, &g, &Target::default());
        assert_eq!(r.scheme.as_deref(), Some("normal"), "{:?}", r.text);
        assert!(r.text[0].contains("widest LR window"), "{}", r.text[0]);
        assert!(r.text[1].contains("Seed noise: σ 0.283"), "{}", r.text[1]);
    }

    #[test]
    fn power_fit_recovers_exponent() {
        let pts: Vec<(f64, f64)> = [64.0, 128.0, 256.0, 512.0]
            .iter()
            .map(|&w: &f64| (w, 3.0 * w.powf(-0.5)))
            .collect();
        let f = power_fit(&pts).unwrap();
        assert!((f.b + 0.5).abs() < 1e-12 && (f.a.exp() - 3.0).abs() < 1e-9);
        assert!(f.se_b.unwrap() < 1e-9);
        assert!((f.at(1024.0) - 3.0 / 32.0).abs() < 1e-9);
        assert!(power_fit(&pts[..1]).is_none());
    }
}
