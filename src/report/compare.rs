//! `keel report A B C --out DIR`: several runs on one page, as W&B's run comparison but
//! offline: loss, validation loss, LR, gradient norm, attention logits and logit drift on
//! shared axes (one colour per run, guard events marked in the run's colour), and a table
//! of the key numbers side by side. Runs may be keel runs, PyTorch runs logged by the
//! Python package, or TensorBoard log directories, of any lengths.

use super::html::{esc, table, Page};
use super::plot::{self, Marker, Plot, Series, VLine};
use super::runs::RunData;
use super::{dir_name, smooth, SIZE};
use crate::train::num_field;
use anyhow::{bail, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};

fn series(m: &[Value], key: &str) -> Vec<(f64, f64)> {
    m.iter()
        .filter(|x| x.get("skipped").and_then(Value::as_bool) != Some(true))
        .filter_map(|x| Some((num_field(x, "step")?, num_field(x, key)?)))
        .collect()
}

/// Names that tell the runs apart: the directory name, with its parent where two collide.
fn names(dirs: &[PathBuf]) -> Vec<String> {
    let short: Vec<String> = dirs.iter().map(|d| dir_name(d)).collect();
    short
        .iter()
        .enumerate()
        .map(|(i, n)| {
            if short.iter().filter(|m| *m == n).count() > 1 {
                let p = std::fs::canonicalize(&dirs[i]).unwrap_or(dirs[i].clone());
                let parent = p
                    .parent()
                    .and_then(|q| q.file_name())
                    .map(|s| s.to_string_lossy().to_string())
                    .unwrap_or_default();
                format!("{parent}/{n}")
            } else {
                n.clone()
            }
        })
        .collect()
}

fn count(ev: &[Value], kind: &str) -> usize {
    ev.iter().filter(|e| e["kind"] == kind).count()
}

fn fmt(x: Option<f64>, prec: usize) -> String {
    match x {
        Some(v) if v.is_finite() => format!("{v:.prec$}"),
        Some(_) => "non-finite".into(),
        None => "—".into(),
    }
}

/// The key numbers of one run, for the table.
fn row(name: &str, r: &RunData) -> Vec<String> {
    let loss = series(&r.metrics, "loss");
    let tail = (loss.len() / 20).max(1);
    let last_loss = (!loss.is_empty())
        .then(|| loss[loss.len() - tail..].iter().map(|p| p.1).sum::<f64>() / tail as f64);
    let val = series(&r.metrics, "val_loss");
    let best_val = val
        .iter()
        .map(|p| p.1)
        .fold(None, |a: Option<f64>, v| Some(a.map_or(v, |a| a.min(v))));
    let max_of = |k: &str| {
        series(&r.metrics, k)
            .iter()
            .map(|p| p.1)
            .fold(None, |a: Option<f64>, v| Some(a.map_or(v, |a| a.max(v))))
    };
    let steps = r
        .metrics
        .last()
        .and_then(|m| num_field(m, "step"))
        .map_or("—".into(), |s| format!("{s:.0}"));
    let gave_up = count(&r.events, "give_up") + count(&r.events, "diverged") > 0;
    vec![
        esc(name),
        steps,
        fmt(last_loss, 4),
        fmt(val.last().map(|p| p.1), 4),
        fmt(best_val, 4),
        format!("{}", count(&r.events, "skip")),
        format!("{}", count(&r.events, "rollback")),
        format!("{}", count(&r.events, "lr_backoff")),
        if gave_up {
            "gave up".into()
        } else {
            "no".into()
        },
        fmt(max_of("grad_norm"), 3),
        fmt(max_of("max_attn_logit"), 1),
        r.metrics
            .last()
            .and_then(|m| num_field(m, "elapsed_s"))
            .map_or("—".into(), |t| format!("{t:.0} s")),
    ]
}

/// Event lines of every run, in the run's colour, labelled with the run when few.
fn vlines(runs: &[(String, RunData)]) -> Vec<VLine> {
    let keep = [
        "skip",
        "rollback",
        "lr_backoff",
        "give_up",
        "diverged",
        "divergence",
    ];
    let mut out = Vec::new();
    for (i, (name, r)) in runs.iter().enumerate() {
        for e in &r.events {
            let Some(kind) = e.get("kind").and_then(Value::as_str) else {
                continue;
            };
            if !keep.contains(&kind) {
                continue;
            }
            if let Some(x) = num_field(e, "step") {
                out.push(VLine {
                    x,
                    label: format!("{name}: {}", kind.replace('_', " ")),
                    color: plot::color(i),
                });
            }
        }
    }
    if out.len() > 12 {
        for v in &mut out {
            v.label.clear();
        }
    }
    out
}

/// Write `out/report.html` (and `out/plots/`) comparing the runs in `dirs`.
pub fn write(dirs: &[PathBuf], out: &Path) -> Result<PathBuf> {
    if dirs.is_empty() {
        bail!("keel report: no runs given; fix: keel report RUN_A RUN_B --out DIR");
    }
    let mut runs = Vec::new();
    for (n, d) in names(dirs).into_iter().zip(dirs) {
        if !RunData::is_run(d) {
            bail!(
                "{}: not a run (no metrics.jsonl and no TensorBoard event files); fix: give keel train's --out, the Python run logger's directory or a TensorBoard log directory",
                d.display()
            );
        }
        runs.push((n, RunData::load(d)?));
    }
    std::fs::create_dir_all(out)?;
    let plots = out.join("plots");
    let mut page = Page::new(&format!("keel — {} runs compared", runs.len()));
    page.subtitle = runs
        .iter()
        .map(|(n, _)| n.as_str())
        .collect::<Vec<_>>()
        .join(" · ");
    let headers = [
        "run",
        "steps",
        "final train loss (last 5%)",
        "last val loss",
        "best val loss",
        "skips",
        "rollbacks",
        "LR back-offs",
        "gave up",
        "max grad norm",
        "max attn logit",
        "wall time",
    ];
    let rows: Vec<Vec<String>> = runs.iter().map(|(n, r)| row(n, r)).collect();
    let mut sources = String::from("<ul>");
    for (n, r) in &runs {
        sources += &format!("<li><b>{}</b>: {}</li>", esc(n), esc(&r.source));
        for note in &r.notes {
            sources += &format!("<li class=muted>{}: {}</li>", esc(n), esc(note));
        }
    }
    sources += "</ul>";
    page.section("numbers", "Key numbers", table(&headers, &rows) + &sources);
    let vl = vlines(&runs);
    // (file, caption, y label, field, log y, smoothed, markers)
    let figs: [(&str, &str, &str, &str, bool, bool, bool); 6] = [
        (
            "loss",
            "Training loss (smoothed; guard events in each run's colour)",
            "cross-entropy (nats)",
            "loss",
            true,
            true,
            false,
        ),
        (
            "val_loss",
            "Validation loss",
            "cross-entropy (nats)",
            "val_loss",
            false,
            false,
            true,
        ),
        ("lr", "Learning rate", "LR", "lr", false, false, false),
        (
            "grad_norm",
            "Gradient norm",
            "‖g‖",
            "grad_norm",
            true,
            true,
            false,
        ),
        (
            "attn_logit",
            "Largest attention logit",
            "logit",
            "max_attn_logit",
            false,
            false,
            false,
        ),
        (
            "logit_drift",
            "Output log-partition (logit drift)",
            "mean log Z",
            "logit_z",
            false,
            false,
            false,
        ),
    ];
    let mut body = String::from("<div class=grid>");
    let mut missing = Vec::new();
    for (file, caption, y, field, log_y, smoothed, markers) in figs {
        let mut ss = Vec::new();
        let mut have = Vec::new();
        for (i, (n, r)) in runs.iter().enumerate() {
            let pts = series(&r.metrics, field);
            if pts.is_empty() {
                continue;
            }
            have.push(n.clone());
            let pts = if smoothed {
                smooth(&pts, (pts.len() / 60).clamp(1, 25))
            } else {
                pts
            };
            ss.push(Series {
                name: n.clone(),
                points: pts,
                color: i,
                marker: if markers {
                    Marker::Dot
                } else {
                    Marker::default()
                },
                ..Default::default()
            });
        }
        if ss.is_empty() {
            missing.push(field);
            continue;
        }
        let p = Plot {
            size: Some(SIZE),
            title: caption.split(" (").next().unwrap_or(caption).into(),
            x_label: "step".into(),
            y_label: y.into(),
            series: ss,
            log_y,
            vlines: if file == "loss" || file == "grad_norm" {
                vl.clone()
            } else {
                Vec::new()
            },
            ..Default::default()
        };
        let base = plots.join(file);
        plot::save(&p, &base)?;
        let only = if have.len() < runs.len() {
            format!(" — only in {}", have.join(", "))
        } else {
            String::new()
        };
        body += &super::html::figure(&base, file, &format!("{caption}{only}"))?;
    }
    body += "</div>";
    if !missing.is_empty() {
        body += &format!(
            "<p class=muted>In none of the runs: {}.</p>",
            esc(&missing.join(", "))
        );
    }
    page.section("curves", "Curves on shared axes", body);
    let mut ev = Vec::new();
    for (n, r) in &runs {
        for e in &r.events {
            let kind = e["kind"].as_str().unwrap_or("");
            if matches!(kind, "checkpoint" | "warning" | "spike") {
                continue;
            }
            ev.push(vec![
                esc(n),
                fmt(num_field(e, "step"), 0),
                esc(kind),
                esc(&super::event_sentence(kind, &e["detail"])),
            ]);
        }
    }
    if !ev.is_empty() {
        page.section(
            "events",
            "Guard actions",
            table(&["run", "step", "action", "what"], &ev),
        );
    }
    let path = out.join("report.html");
    crate::checkpoint::write_atomic(&path, page.render().as_bytes())?;
    Ok(path)
}
