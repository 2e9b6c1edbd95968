//! `keel report DIR`: one self-contained `report.html` (inline SVG and CSS, no scripts, opens
//! offline) for a run, a sweep or a `keel check` output, and the same plots as SVG and PNG
//! under `DIR/plots/`.

pub mod compare;
pub mod html;
pub mod optuna;
pub mod plot;
pub mod runs;

use crate::train::{num_field, read_jsonl};
use anyhow::{bail, Context, Result};
use html::{esc, Page};
use plot::{Heatmap, Marker, Plot, Series, VLine};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// What a directory holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Run,
    Sweep,
    Check,
    /// `keel check --coord-check --out`
    Coord,
}

pub fn detect(dir: &Path) -> Result<Kind> {
    if dir.join("sweep.json").exists() {
        Ok(Kind::Sweep)
    } else if dir.join("metrics.jsonl").exists() {
        Ok(Kind::Run)
    } else if dir.join("check.json").exists() {
        Ok(Kind::Check)
    } else if dir.join("coord_check.json").exists() {
        Ok(Kind::Coord)
    } else if runs::RunData::is_run(dir) {
        // a TensorBoard log directory
        Ok(Kind::Run)
    } else if !dir.is_dir() {
        bail!("{}: no such directory", dir.display())
    } else {
        bail!(
            "{}: not a keel run, sweep or check directory (no metrics.jsonl, sweep.json, check.json, coord_check.json or TensorBoard event files); fix: give the --out directory of keel train, keel sweep or keel check, the Python run logger's directory, or a TensorBoard log directory",
            dir.display()
        )
    }
}

/// Write `DIR/report.html` (and `DIR/plots/`); returns the report's path.
pub fn write(dir: &Path) -> Result<PathBuf> {
    let page = match detect(dir)? {
        Kind::Run => run_page(dir)?,
        Kind::Sweep => sweep_page(dir)?,
        Kind::Check => check_page(dir)?,
        Kind::Coord => coord_page(dir)?,
    };
    let path = dir.join("report.html");
    crate::checkpoint::write_atomic(&path, page.render().as_bytes())?;
    Ok(path)
}

fn series_of(m: &[Value], key: &str) -> Vec<(f64, f64)> {
    m.iter()
        .filter_map(|x| Some((num_field(x, "step")?, num_field(x, key)?)))
        .collect()
}

/// Centred moving mean over `2h+1` points (no lag, unlike an EMA on a falling curve).
pub(crate) fn smooth(p: &[(f64, f64)], h: usize) -> Vec<(f64, f64)> {
    let q: Vec<(f64, f64)> = p.iter().copied().filter(|(_, y)| y.is_finite()).collect();
    (0..q.len())
        .map(|i| {
            let (a, b) = (i.saturating_sub(h), (i + h + 1).min(q.len()));
            let m = q[a..b].iter().map(|x| x.1).sum::<f64>() / (b - a) as f64;
            (q[i].0, m)
        })
        .collect()
}

fn event_color(kind: &str) -> plot::RGBColor {
    match kind {
        "spike" => plot::color(3),
        "divergence" | "diverged" | "give_up" => plot::RGBColor(140, 0, 0),
        "skip" => plot::color(1),
        "rollback" => plot::color(4),
        "lr_backoff" | "lr_restore" => plot::color(5),
        "resume" | "interrupted" => plot::color(2),
        _ => plot::color(7),
    }
}

/// The events worth a line on the loss plot (not checkpoints or warnings).
fn marked(events: &[Value]) -> Vec<VLine> {
    let keep = [
        "spike",
        "divergence",
        "diverged",
        "give_up",
        "skip",
        "rollback",
        "lr_backoff",
        "resume",
    ];
    let ev: Vec<&Value> = events
        .iter()
        .filter(|e| {
            e.get("kind")
                .and_then(Value::as_str)
                .is_some_and(|k| keep.contains(&k))
        })
        .collect();
    // one line per step; its label lists the step's events ("spike, skip")
    let mut lines: Vec<(f64, Vec<String>)> = Vec::new();
    for e in &ev {
        let (Some(x), Some(kind)) = (num_field(e, "step"), e.get("kind").and_then(Value::as_str))
        else {
            continue;
        };
        let k = kind.replace('_', " ");
        match lines.iter_mut().find(|l| l.0 == x) {
            Some(l) if !l.1.contains(&k) => l.1.push(k),
            Some(_) => {}
            None => lines.push((x, vec![k])),
        }
    }
    let label = lines.len() <= 12;
    lines
        .into_iter()
        .map(|(x, kinds)| VLine {
            x,
            color: event_color(&kinds[0].replace(' ', "_")),
            label: if label {
                kinds.join(", ")
            } else {
                String::new()
            },
        })
        .collect()
}

fn line(name: &str, pts: Vec<(f64, f64)>, color: usize) -> Series {
    Series {
        name: name.into(),
        points: pts,
        color,
        ..Default::default()
    }
}

/// Layer × step heatmap of a per-layer telemetry field (log10 when `log`).
fn layer_heatmap(tel: &[Value], key: &str, title: &str, label: &str, log: bool) -> Option<Heatmap> {
    let rows: Vec<(f64, Vec<Option<f64>>)> = tel
        .iter()
        .filter_map(|t| {
            let v = t.get(key)?.as_array()?;
            Some((
                num_field(t, "step")?,
                v.iter()
                    .map(|x| {
                        x.as_f64()
                            .map(|x| if log { x.max(1e-30).log10() } else { x })
                    })
                    .collect(),
            ))
        })
        .collect();
    if rows.len() < 2 {
        return None;
    }
    // at most 80 columns: every k-th telemetry record
    let k = rows.len().div_ceil(80);
    let cols: Vec<&(f64, Vec<Option<f64>>)> = rows.iter().step_by(k).collect();
    let nl = cols.iter().map(|c| c.1.len()).max().unwrap_or(0);
    let values: Vec<Vec<Option<f64>>> = (0..nl)
        .rev()
        .map(|l| cols.iter().map(|c| c.1.get(l).copied().flatten()).collect())
        .collect();
    Some(Heatmap {
        title: title.into(),
        x_label: "step".into(),
        y_label: "layer".into(),
        cols: cols.iter().map(|c| format!("{}", c.0)).collect(),
        rows: (0..nl).rev().map(|l| format!("{l}")).collect(),
        values,
        value_label: label.into(),
        no_text: true,
        size: Some((1000, (200 + 26 * nl as u32).clamp(300, 900))),
        ..Default::default()
    })
}

/// Line plots in the report: smaller canvas, so the text stays readable two to a row.
pub(crate) const SIZE: (u32, u32) = (760, 470);

fn run_page(dir: &Path) -> Result<Page> {
    let run = runs::RunData::load(dir)?;
    let (source, notes) = (run.source, run.notes);
    let (metrics, events, tel, cfg_text, cfg) = (
        run.metrics,
        run.events,
        run.telemetry,
        run.cfg_text,
        run.cfg,
    );
    let plots = dir.join("plots");
    let mut page = Page::new(&format!("keel run — {}", dir_name(dir)));
    let last = metrics.last();
    let steps = last.and_then(|m| num_field(m, "step")).unwrap_or(0.0) as u64;
    let planned = cfg.as_ref().map_or(0, |c| c.train.steps);
    let kinds: Vec<&str> = events
        .iter()
        .filter_map(|e| e.get("kind")?.as_str())
        .collect();
    let status = if kinds.iter().any(|k| *k == "give_up" || *k == "diverged") {
        ("diverged", "bad")
    } else if steps >= planned && planned > 0 {
        ("finished", "good")
    } else if kinds.last() == Some(&"interrupted") {
        ("interrupted", "warn")
    } else if cfg.is_none() {
        // a PyTorch or TensorBoard run: its planned length is not known here
        ("logged", "good")
    } else {
        ("in progress or stopped", "warn")
    };
    let losses = series_of(&metrics, "loss");
    let val = series_of(&metrics, "val_loss");
    // the same figures, labelled the same way, as the end-of-run summary on the terminal
    let fig = crate::train::figures::figures(&metrics, &events);
    page.status = Some((status.0.to_string(), status.1.to_string()));
    if planned > 0 {
        page.stat("steps", &format!("{steps} / {planned}"));
    } else {
        page.stat("steps", &format!("{steps}"));
    }
    if cfg.is_none() {
        page.subtitle = format!("from {source}");
    }
    for (label, value) in fig.rows() {
        page.stat(&label, &value);
    }
    page.stat(
        "tokens",
        &last
            .and_then(|m| num_field(m, "tokens"))
            .map_or("—".into(), |t| format!("{:.2} M", t / 1e6)),
    );
    page.stat(
        "wall time",
        &last
            .and_then(|m| num_field(m, "elapsed_s"))
            .map_or("—".into(), |t| format!("{:.0} s", t)),
    );
    if let Some(c) = &cfg {
        if let Ok(mc) = c.model_config() {
            page.subtitle = format!(
                "{} parameters · {} layers · width {} · {} heads ({} KV) · vocab {} · init {} · peak LR {:e} · {} schedule",
                human(mc.num_params() as f64),
                mc.num_layers,
                mc.hidden_size,
                mc.num_heads,
                mc.num_kv_heads,
                mc.vocab_size,
                c.init.scheme,
                c.optim.lr,
                format!("{:?}", c.schedule.kind).to_lowercase()
            );
        }
    }
    let vlines = marked(&events);
    // a step the guard skipped never changed the weights: it stays out of the smoothed
    // curve (one 25× spike would otherwise show as a 50-step plateau)
    let kept: Vec<(f64, f64)> = metrics
        .iter()
        .filter(|m| m.get("skipped").and_then(Value::as_bool) != Some(true))
        .filter_map(|x| Some((num_field(x, "step")?, num_field(x, "loss")?)))
        .collect();
    let one = |key: &str, color: usize| vec![line("", series_of(&metrics, key), color)];
    let mut loss_series = vec![
        line("train (per step)", losses.clone(), 7),
        line(
            "train (smoothed, kept steps)",
            smooth(&kept, (kept.len() / 60).clamp(1, 25)),
            0,
        ),
    ];
    if !val.is_empty() {
        loss_series.push(Series {
            name: "validation".into(),
            points: val.clone(),
            marker: Marker::Dot,
            color: 1,
            ..Default::default()
        });
    }
    // update/weight ratio per tensor group from telemetry (overall from metrics)
    let mut ur = vec![line("all", series_of(&metrics, "update_ratio"), 7)];
    for (i, g) in ["embed", "attn", "mlp", "norm", "head"].iter().enumerate() {
        let pts: Vec<(f64, f64)> = tel
            .iter()
            .filter_map(|t| {
                Some((
                    num_field(t, "step")?,
                    t.get("update_ratio")?.get(*g)?.as_f64()?,
                ))
            })
            .collect();
        if !pts.is_empty() {
            ur.push(line(g, pts, i));
        }
    }
    // with the sharpness probe on (telemetry.sharpness_every), its edge-of-stability LR beside
    // the LR in force, on a log axis
    let edge = series_of(&metrics, "lr_edge");
    let with_edge = !edge.is_empty();
    let mut lr_series = one("lr", 0);
    if with_edge {
        lr_series[0].name = "LR".into();
        lr_series.push(Series {
            name: "Adam's edge of stability, 38/λ_max(P⁻¹H)".into(),
            points: edge,
            marker: Marker::Dot,
            color: 2,
            ..Default::default()
        });
    }
    let lr_caption = if with_edge {
        "Learning rate (after guard back-offs) and the sharpness probe's edge-of-stability LR (Adam trains at and above it: it is not a divergence limit, docs/check.md#sharpness)"
    } else {
        "Learning rate (after guard back-offs)"
    };
    // (file name, caption, title, y label, series, log y, guard events drawn)
    let figs = [
        (
            "loss",
            "Loss — train and validation, guard events marked",
            "Loss",
            "cross-entropy (nats)",
            loss_series,
            true,
            true,
        ),
        (
            "lr",
            lr_caption,
            "Learning rate",
            "LR",
            lr_series,
            with_edge,
            true,
        ),
        (
            "grad_norm",
            "Gradient norm (before clipping)",
            "Gradient norm",
            "‖g‖",
            one("grad_norm", 3),
            true,
            true,
        ),
        (
            "update_ratio",
            "Update/weight ratio ‖ΔW‖/‖W‖ per tensor group",
            "Update / weight ratio",
            "‖ΔW‖ / ‖W‖",
            ur,
            true,
            false,
        ),
        (
            "attn_logit",
            "Largest attention logit (q·k scaled), all layers and heads",
            "Max attention logit",
            "logit",
            one("max_attn_logit", 4),
            false,
            true,
        ),
        (
            "logit_drift",
            "Output logit drift: mean log-partition log Σ exp(z) of the LM head",
            "Output log-partition (logit drift)",
            "mean log Z",
            one("logit_z", 5),
            false,
            true,
        ),
    ];
    let mut body = String::new();
    body.push_str("<div class=grid>");
    for (name, caption, title, y_label, series, log_y, events) in figs {
        if series.iter().all(|s| s.points.is_empty()) {
            continue;
        }
        let p = Plot {
            size: Some(SIZE),
            title: title.into(),
            x_label: "step".into(),
            y_label: y_label.into(),
            series,
            log_y,
            vlines: if events { vlines.clone() } else { Vec::new() },
            ..Default::default()
        };
        let base = plots.join(name);
        plot::save(&p, &base)?;
        body.push_str(&html::figure(&base, name, caption)?);
    }
    body.push_str("</div>");
    page.section("curves", "Training curves", body);
    let mut heat = String::new();
    for (key, name, title, label, log) in [
        (
            "grad_norm_per_layer",
            "layer_grad_norm",
            "Gradient norm per layer over steps",
            "log10 ‖g‖",
            true,
        ),
        (
            "max_attn_logit_per_layer",
            "layer_attn_logit",
            "Max attention logit per layer over steps",
            "logit",
            false,
        ),
    ] {
        if let Some(h) = layer_heatmap(&tel, key, title, label, log) {
            let base = plots.join(name);
            plot::save_heatmap(&h, &base)?;
            heat.push_str(&html::figure(&base, name, title)?);
        }
    }
    if !heat.is_empty() {
        page.section("layers", "Per-layer telemetry", heat);
    }
    // the init check of this run's model and scheme (theory vs measurement at step 0)
    if let Some(c) = &cfg {
        match run_check(c, &plots) {
            Ok(s) => page.section("init", "Initialization check (at step 0, random tokens)", s),
            Err(e) => page.section(
                "init",
                "Initialization check",
                format!("<p class=muted>not available: {}</p>", esc(&e.to_string())),
            ),
        }
    }
    page.section("events", "Events", events_table(&events));
    if !notes.is_empty() {
        let items: String = notes
            .iter()
            .map(|n| format!("<li>{}</li>", esc(n)))
            .collect();
        page.section("notes", "Not read", format!("<ul>{items}</ul>"));
    }
    if !cfg_text.is_empty() {
        page.section(
            "config",
            "Resolved configuration",
            format!("<details><summary>config.toml — re-running it reproduces the run</summary><pre>{}</pre></details>", esc(&cfg_text)),
        );
    }
    Ok(page)
}

fn human(x: f64) -> String {
    if x >= 1e9 {
        format!("{:.1} B", x / 1e9)
    } else if x >= 1e6 {
        format!("{:.1} M", x / 1e6)
    } else if x >= 1e3 {
        format!("{:.0} k", x / 1e3)
    } else {
        format!("{x:.0}")
    }
}

pub(crate) fn dir_name(dir: &Path) -> String {
    std::fs::canonicalize(dir)
        .ok()
        .and_then(|p| p.file_name().map(|s| s.to_string_lossy().to_string()))
        .unwrap_or_else(|| dir.display().to_string())
}

fn run_check(c: &crate::config::RunConfig, plots: &Path) -> Result<String> {
    let mc = c.model_config().map_err(|e| anyhow::anyhow!("{e}"))?;
    let o = crate::probe::CheckOptions {
        optim: c.optim.clone(),
        ..Default::default()
    };
    let r = crate::probe::check(&mc, &c.init, &o)?;
    crate::probe::plot::write_all(plots, std::slice::from_ref(&r))?;
    let v = serde_json::to_value(&r)?;
    check_html(&[v], plots)
}

/// Gates table + depth plots of check reports (JSON, as check.json holds them).
fn check_html(reports: &[Value], plots: &Path) -> Result<String> {
    // pictures first, then one summary row per scheme, then each scheme's gates
    let mut s = String::from("<div class=grid>");
    for (name, cap) in [
        (
            "rms_vs_depth",
            "Residual stream RMS over depth (dashed: theory)",
        ),
        (
            "grad_vs_depth",
            "Gradient RMS of the residual stream over depth (dashed: theory)",
        ),
        ("coord_check_mup", "μP coordinate check"),
        (
            "coord_check_sp",
            "Standard-parametrisation coordinate check",
        ),
    ] {
        let base = plots.join(name);
        if PathBuf::from(format!("{}.svg", base.display())).exists() {
            s.push_str(&html::figure(&base, name, cap)?);
        }
    }
    s.push_str("</div>");
    let many = reports.len() > 1;
    if many {
        let rows: Vec<Vec<String>> = reports
            .iter()
            .map(|r| {
                let v = r.get("verdict").and_then(Value::as_str).unwrap_or("?");
                let flagged: Vec<String> = r
                    .get("gates")
                    .and_then(Value::as_array)
                    .map(|g| {
                        g.iter()
                            .filter(|g| g.get("verdict").and_then(Value::as_str) != Some("Pass"))
                            .map(|g| {
                                format!(
                                    "{} ({})",
                                    g.get("name").and_then(Value::as_str).unwrap_or(""),
                                    g.get("verdict")
                                        .and_then(Value::as_str)
                                        .unwrap_or("")
                                        .to_lowercase()
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                vec![
                    esc(r.get("scheme").and_then(Value::as_str).unwrap_or("?")),
                    format!(
                        "<span class=\"pill {}\">{}</span>",
                        verdict_class(v),
                        esc(&v.to_uppercase())
                    ),
                    esc(&flagged.join(", ")),
                ]
            })
            .collect();
        s.push_str("<h3>Schemes</h3>");
        s.push_str(&html::table(
            &["init", "verdict", "gates not passed"],
            &rows,
        ));
    }
    for r in reports {
        let scheme = r.get("scheme").and_then(Value::as_str).unwrap_or("?");
        let verdict = r.get("verdict").and_then(Value::as_str).unwrap_or("?");
        let title = format!(
            "init {} <span class=\"pill {}\">{}</span>",
            esc(scheme),
            verdict_class(verdict),
            esc(&verdict.to_uppercase())
        );
        if many {
            s.push_str(&format!("<details><summary>{title}</summary>"));
        } else {
            s.push_str(&format!("<h3>{title}</h3>"));
        }
        let rows: Vec<Vec<String>> = r
            .get("gates")
            .and_then(Value::as_array)
            .map(|g| {
                g.iter()
                    .map(|g| {
                        let v = g.get("verdict").and_then(Value::as_str).unwrap_or("");
                        vec![
                            format!(
                                "<span class=\"pill {}\">{}</span>",
                                verdict_class(v),
                                esc(&v.to_uppercase())
                            ),
                            esc(g.get("name").and_then(Value::as_str).unwrap_or("")),
                            esc(g.get("reason").and_then(Value::as_str).unwrap_or("")),
                            {
                                let n = |k: &str| g.get(k).and_then(Value::as_f64);
                                let t = match (n("pass"), n("warn")) {
                                    (Some(p), Some(w)) => format!("PASS ≤ {p}, WARN ≤ {w}"),
                                    (Some(p), None) => format!("PASS ≤ {p}, else WARN"),
                                    _ => String::new(),
                                };
                                format!(
                                    "{}<br><span class=muted>{}</span>",
                                    esc(&t),
                                    esc(g.get("basis").and_then(Value::as_str).unwrap_or(""))
                                )
                            },
                            esc(g.get("suggestion").and_then(Value::as_str).unwrap_or("")),
                        ]
                    })
                    .collect()
            })
            .unwrap_or_default();
        s.push_str(&html::table(
            &["", "gate", "finding", "threshold", "suggestion"],
            &rows,
        ));
        // per-layer theory vs measurement
        let th = r.get("theory");
        let me = r.get("measured");
        let arr = |v: Option<&Value>, k: &str| -> Vec<f64> {
            v.and_then(|v| v.get(k))
                .and_then(Value::as_array)
                .map(|a| a.iter().map(|x| x.as_f64().unwrap_or(f64::NAN)).collect())
                .unwrap_or_default()
        };
        let (tr, mr) = (arr(th, "resid_rms"), arr(me, "resid_rms"));
        let (tg, mg) = (arr(th, "resid_grad_rms"), arr(me, "resid_grad_rms"));
        let rows: Vec<Vec<String>> = (0..tr.len().min(mr.len()))
            .map(|i| {
                let name = if i == 0 {
                    "embedding".to_string()
                } else {
                    format!(
                        "layer {} {}",
                        (i - 1) / 2,
                        if i % 2 == 1 { "attention" } else { "MLP" }
                    )
                };
                let cell = |a: &[f64], b: &[f64]| match (a.get(i), b.get(i)) {
                    (Some(x), Some(y)) => format!("{x:.4} / {y:.4}"),
                    _ => String::new(),
                };
                vec![name, cell(&tr, &mr), cell(&tg, &mg)]
            })
            .collect();
        s.push_str("<details><summary>Residual stream per layer: theory / measured</summary>");
        s.push_str(&html::table(&["after", "RMS", "gradient RMS"], &rows));
        s.push_str("</details>");
        if many {
            s.push_str("</details>");
        }
    }
    Ok(s)
}

fn verdict_class(v: &str) -> &'static str {
    match v {
        "Pass" | "PASS" => "good",
        "Warn" | "WARN" => "warn",
        _ => "bad",
    }
}

/// One event's detail as a sentence (the raw JSON is in events.jsonl).
pub(crate) fn event_sentence(kind: &str, d: &Value) -> String {
    let n = |k: &str| d.get(k).and_then(Value::as_f64);
    let st = |k: &str| st_of(d, k);
    match kind {
        // from a TensorBoard log: the sentence, no numbers
        "spike" | "divergence" | "warning" if d.get("value").is_none() => {
            match (
                d.get("detector").and_then(Value::as_str),
                d.get("reason").and_then(Value::as_str),
            ) {
                (Some(det), Some(r)) => format!("{det}: {r}"),
                (None, Some(r)) => r.to_string(),
                _ => kind.to_string(),
            }
        }
        "spike" | "divergence" | "warning" => format!(
            "{}: {} (value {}, threshold {})",
            st("detector"),
            st("reason"),
            n("value").map_or("not finite".into(), |v| format!("{v:.4}")),
            n("threshold").map_or("—".into(), |v| format!("{v:.4}"))
        ),
        "rollback" | "restored" => match d.get("to_step").and_then(Value::as_u64) {
            Some(0) => format!("restored the initial weights ({})", st("reason")),
            Some(t) => format!("restored step {t} from {} ({})", st("from"), st("reason")),
            None => st("reason").to_string(),
        },
        "skip" => "the update was skipped (its batch consumed)".into(),
        "lr_backoff" => match (n("factor"), d.get("until_step").and_then(Value::as_u64)) {
            (Some(f), Some(u)) => format!("LR × {} until step {u}", crate::train::short_factor(f)),
            (Some(f), None) => format!("LR × {} from now on", crate::train::short_factor(f)),
            _ => "LR lowered".into(),
        },
        "lr_restore" => "LR restored".into(),
        "resume" => format!("resumed from {}", st("checkpoint")),
        "inject" => format!("fault planted: {} at step {}", st("kind"), d["at_step"]),
        "config_change" => d
            .get("changes")
            .and_then(Value::as_array)
            .map(|c| {
                c.iter()
                    .map(|x| {
                        format!(
                            "{} {} → {}",
                            st_of(x, "key"),
                            st_of(x, "old"),
                            st_of(x, "new")
                        )
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default(),
        "interrupted" => "stopped by a signal; a checkpoint was saved".into(),
        _ => d
            .get("reason")
            .or(d.get("diagnosis"))
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| {
                if d.is_null() || d == &Value::Object(Default::default()) {
                    String::new()
                } else {
                    d.to_string()
                }
            }),
    }
}

fn st_of<'a>(v: &'a Value, k: &str) -> &'a str {
    v.get(k).and_then(Value::as_str).unwrap_or("")
}

fn events_table(events: &[Value]) -> String {
    let shown: Vec<&Value> = events
        .iter()
        .filter(|e| e.get("kind").and_then(Value::as_str) != Some("checkpoint"))
        .collect();
    if shown.is_empty() {
        return "<p class=muted>No events: the guard saw nothing unusual.</p>".into();
    }
    let rows: Vec<Vec<String>> = shown
        .iter()
        .take(300)
        .map(|e| {
            let kind = e.get("kind").and_then(Value::as_str).unwrap_or("");
            let d = e.get("detail").cloned().unwrap_or(Value::Null);
            let what = event_sentence(kind, &d);
            vec![
                e.get("step").map_or(String::new(), |s| esc(&s.to_string())),
                format!("<span class=\"kind k-{}\">{}</span>", esc(kind), esc(kind)),
                esc(&what),
            ]
        })
        .collect();
    let mut s = html::table(&["step", "event", "detail"], &rows);
    if shown.len() > 300 {
        s.push_str(&format!(
            "<p class=muted>… and {} more in events.jsonl</p>",
            shown.len() - 300
        ));
    }
    s
}

fn sweep_page(dir: &Path) -> Result<Page> {
    // refresh results and plots from the trial directories
    crate::sweep::run::refresh(dir)?;
    let summary: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("summary.json")).context("summary.json")?,
    )?;
    let results = read_jsonl(&dir.join("results.jsonl")).unwrap_or_default();
    let mut page = Page::new(&format!("keel sweep — {}", dir_name(dir)));
    let n = |k: &str| summary.get(k).and_then(Value::as_u64).unwrap_or(0);
    page.stat("trials", &n("trials").to_string());
    page.stat("finished", &n("finished").to_string());
    page.stat("diverged", &n("diverged").to_string());
    page.stat("not done", &n("unfinished").to_string());
    page.stat(
        "compared by",
        summary.get("metric").and_then(Value::as_str).unwrap_or("?"),
    );
    let rec = &summary["recommendation"];
    if let Some(s) = rec.get("scheme").and_then(Value::as_str) {
        page.stat("most robust init", s);
    }
    page.status = Some(if n("unfinished") == 0 {
        ("complete".into(), "good".into())
    } else {
        ("incomplete".into(), "warn".into())
    });
    let lines: String = rec
        .get("text")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(|l| format!("<li>{}</li>", esc(l)))
                .collect()
        })
        .unwrap_or_default();
    page.section(
        "recommendation",
        "Recommendation",
        format!("<ul class=findings>{lines}</ul>"),
    );
    let plots = dir.join("plots");
    let mut figs = String::from("<div class=grid1>");
    let mut names: Vec<String> = std::fs::read_dir(&plots)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().to_str().map(str::to_string))
                .filter(|n| n.ends_with(".svg"))
                .map(|n| n.trim_end_matches(".svg").to_string())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    for prefix in ["stability_map", "loss_vs_lr", "max_stable_lr_vs"] {
        for name in names.iter().filter(|n| n.starts_with(prefix)) {
            let cap = match prefix {
                "stability_map" => "Stability map: final loss per LR and init (✗: diverged, with the step; ⚠n: n loss spikes flagged on the way)",
                "loss_vs_lr" => "Final loss vs peak learning rate per init scheme",
                _ => "Largest stable learning rate vs model size (dashed: extrapolation)",
            };
            figs.push_str(&html::figure(&plots.join(name), name, cap)?);
        }
    }
    figs.push_str("</div>");
    page.section("maps", "Stability maps", figs);
    let fmt = |v: &Value| match v.as_f64() {
        Some(x) => crate::sweep::show_num(x),
        None => "—".into(),
    };
    let rows: Vec<Vec<String>> = summary["groups"]
        .as_array()
        .map(|gs| {
            gs.iter()
                .map(|g| {
                    let group: serde_json::Map<String, Value> =
                        g["group"].as_object().cloned().unwrap_or_default();
                    let nd = g["diverged_at"]
                        .as_array()
                        .map_or(0, |a| a.iter().filter(|x| !x.is_null()).count());
                    let nl = g["lrs"].as_array().map_or(0, Vec::len);
                    vec![
                        esc(&crate::sweep::analysis::describe_group(&group, true)),
                        fmt(&g["best_lr"]),
                        g["best_loss"]
                            .as_f64()
                            .map_or("—".into(), |x| format!("{x:.4}")),
                        fmt(&g["max_stable_lr"]),
                        fmt(&g["first_unstable_lr"]),
                        g["lr_sensitivity"]
                            .as_f64()
                            .map_or("—".into(), |x| format!("{x:.4}")),
                        match g["lr_window"].as_array().map(|w| (w.first(), w.get(1))) {
                            Some((Some(a), Some(b))) => format!("{} … {}", fmt(a), fmt(b)),
                            _ => "—".into(),
                        },
                        format!("{nd}/{nl}"),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    page.section(
        "sensitivity",
        "LR sensitivity per group",
        format!(
            "{}<p class=muted>LR sensitivity (Wortsman et al. 2023): the mean over the swept LRs of min(final loss, initial loss) − the best final loss; a diverged LR counts as the initial loss. Lower is more robust.</p>",
            html::table(&["group", "best LR", "best loss", "max stable LR", "first diverged LR", "LR sensitivity", "LR window", "diverged"], &rows)
        ),
    );
    let trows: Vec<Vec<String>> = results
        .iter()
        .map(|r| {
            let st = r["status"].as_str().unwrap_or("");
            vec![
                esc(r["id"].as_str().unwrap_or("")),
                format!("<span class=\"kind k-{}\">{}</span>", esc(st), esc(st)),
                r["final_loss"]
                    .as_f64()
                    .map_or("—".into(), |x| format!("{x:.4}")),
                r["diverged_at"]
                    .as_u64()
                    .map_or(String::new(), |s| s.to_string()),
                format!("{}/{}", r["steps_done"], r["steps_planned"]),
                r["max_attn_logit"]
                    .as_f64()
                    .map_or("—".into(), |x| format!("{x:.1}")),
                r["wall_s"]
                    .as_f64()
                    .map_or("—".into(), |x| format!("{x:.0} s")),
            ]
        })
        .collect();
    page.section(
        "trials",
        "Trials",
        html::table(
            &[
                "trial",
                "status",
                "final loss",
                "diverged at",
                "steps",
                "max attn logit",
                "wall",
            ],
            &trows,
        ),
    );
    let spec = std::fs::read_to_string(dir.join("sweep.toml")).unwrap_or_default();
    page.section(
        "config",
        "Sweep definition (sweep.toml)",
        format!("<pre>{}</pre>", esc(&spec)),
    );
    Ok(page)
}

/// A μP coordinate check (`keel check --coord-check --out DIR`): its plots and slopes.
fn coord_page(dir: &Path) -> Result<Page> {
    let path = dir.join("coord_check.json");
    let series: Vec<crate::probe::coord::CoordSeries> = serde_json::from_str(
        &std::fs::read_to_string(&path)
            .with_context(|| format!("{}: cannot read", path.display()))?,
    )
    .with_context(|| format!("{}: not a coordinate check", path.display()))?;
    use crate::probe::coord::slope_word;
    let mut page = Page::new(&format!("keel coordinate check — {}", dir_name(dir)));
    if let Some(c) = series.first() {
        page.subtitle = format!(
            "widths {:?} · {} steps · flat = |slope of log RMS vs log width| < 0.25",
            c.widths,
            c.logits.len().saturating_sub(1)
        );
    }
    let mut body = String::from("<div class=grid>");
    for c in &series {
        let base = dir.join(format!("coord_check_{}", c.parametrisation));
        if PathBuf::from(format!("{}.svg", base.display())).exists() {
            body.push_str(&html::figure(
                &base,
                &format!("coord_{}", c.parametrisation),
                &format!("{}: output logits (solid) and last residual (dashed) by width, one colour per step", c.parametrisation),
            )?);
        }
    }
    body.push_str("</div>");
    let rows: Vec<Vec<String>> = series
        .iter()
        .map(|c| {
            vec![
                esc(&c.parametrisation),
                format!("{:+.2} ({})", c.logit_slope, slope_word(c.logit_slope)),
                format!("{:+.2} ({})", c.resid_slope, slope_word(c.resid_slope)),
            ]
        })
        .collect();
    body.push_str(&html::table(
        &["parametrisation", "logit slope", "last-residual slope"],
        &rows,
    ));
    let mup_flat = series
        .iter()
        .find(|c| c.parametrisation == "mup")
        .map(|c| slope_word(c.logit_slope) == "flat" && slope_word(c.resid_slope) == "flat");
    if let Some(flat) = mup_flat {
        page.status = Some(if flat {
            ("μP FLAT".into(), "good".into())
        } else {
            ("μP NOT FLAT".into(), "bad".into())
        });
    }
    page.section("coord", "Coordinate check", body);
    Ok(page)
}

fn check_page(dir: &Path) -> Result<Page> {
    let v: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("check.json"))
            .with_context(|| format!("{}/check.json: cannot read", dir.display()))?,
    )
    .with_context(|| format!("{}/check.json: not valid JSON", dir.display()))?;
    let reports: Vec<Value> = match v {
        Value::Array(a) => a,
        other => vec![other],
    };
    let mut page = Page::new(&format!("keel check — {}", dir_name(dir)));
    if let Some(r) = reports.first() {
        page.subtitle = format!(
            "{} parameters · {} layers · width {} · vocab {} · batch {} × seq {} · LR {}",
            human(num_field(r, "params").unwrap_or(0.0)),
            r["layers"],
            r["hidden_size"],
            r["vocab_size"],
            r["batch"],
            r["seq"],
            r["lr"]
        );
    }
    let worst = reports
        .iter()
        .filter_map(|r| r.get("verdict").and_then(Value::as_str))
        .max_by_key(|v| match *v {
            "Pass" => 0,
            "Warn" => 1,
            _ => 2,
        })
        .unwrap_or("Pass");
    page.status = Some((worst.to_uppercase(), verdict_class(worst).into()));
    page.stat("schemes", &reports.len().to_string());
    // the cards count gates (six per scheme), not schemes
    let gates: Vec<&Value> = reports
        .iter()
        .filter_map(|r| r.get("gates").and_then(Value::as_array))
        .flatten()
        .collect();
    for v in ["Pass", "Warn", "Fail"] {
        page.stat(
            &format!("gates {}", v.to_uppercase()),
            &gates
                .iter()
                .filter(|g| g.get("verdict").and_then(Value::as_str) == Some(v))
                .count()
                .to_string(),
        );
    }
    if let Some(p) = reports
        .first()
        .and_then(|r| r.get("proxy"))
        .filter(|p| !p.is_null())
    {
        page.stat(
            "measured on",
            &format!(
                "a proxy of width {} ({} params)",
                p["hidden_size"],
                human(num_field(p, "params").unwrap_or(0.0))
            ),
        );
        page.subtitle.push_str(&format!(
            " · measured on a width-{} proxy: {}",
            p["hidden_size"],
            p.get("how").and_then(Value::as_str).unwrap_or("")
        ));
    }
    page.section(
        "init",
        "Signal propagation at initialization",
        check_html(&reports, dir)?,
    );
    Ok(page)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn events_read_as_sentences_and_rollbacks_name_what_came_back() {
        let s = event_sentence(
            "rollback",
            &json!({"to_step": 100, "from": "runs/x/checkpoints/step-00000100", "reason": "incident began at step 121"}),
        );
        assert!(s.starts_with("restored step 100 from"), "{s}");
        let s = event_sentence(
            "rollback",
            &json!({"to_step": 0, "from": "initial weights", "reason": "r"}),
        );
        assert!(s.starts_with("restored the initial weights"), "{s}");
        let s = event_sentence(
            "lr_backoff",
            &json!({"factor": 1.0 / 27.0, "until_step": null}),
        );
        assert_eq!(s, "LR × 0.037 from now on");
        let s = event_sentence(
            "spike",
            &json!({"detector": "loss_spike", "reason": "robust z 9 ≥ 6", "value": 4.5, "threshold": 3.0}),
        );
        assert!(
            s.starts_with("loss_spike: robust z") && !s.contains('{'),
            "{s}"
        );
    }
}
