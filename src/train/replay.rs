//! `keel replay --run DIR --step N`: re-run one recorded step from the newest checkpoint
//! before it (same weights, same batch, same guard decisions on the way) and compare.
//! A spike that reproduces is deterministic: the data or the numerics. One that does not
//! is nondeterminism or a transient fault. Data injections (`bad-batch`) recorded in
//! events.jsonl are replayed at the step, being part of the data; fault injections (`nan`,
//! `spike`) only before it (they shaped the weights), as they stand for transient faults.

use super::{prepare_data, read_jsonl, InjectKind, Injection, Trainer};
use crate::checkpoint;
use anyhow::{bail, Context, Result};
use serde_json::json;
use std::path::Path;

fn same(a: f64, b: f64) -> bool {
    (a.is_nan() && b.is_nan()) || a == b || (a - b).abs() <= 1e-6 * a.abs().max(b.abs())
}

pub fn cmd_replay(run: &Path, step: u64, as_json: bool) -> Result<i32> {
    let cfg_path = run.join("config.toml");
    if !cfg_path.exists() {
        bail!(
            "{}: not a keel run directory (no config.toml); fix: pass the --out of `keel train`",
            run.display()
        );
    }
    // the config in force at that step (a resume may have changed steps or cadences since)
    let cfg = super::config_at(run, step)?;
    crate::kernels::init_threads(cfg.train.threads);
    let metrics = read_jsonl(&run.join("metrics.jsonl"))?;
    let rec = metrics
        .iter()
        .rev()
        .find(|m| m["step"].as_u64() == Some(step))
        .with_context(|| {
            format!(
                "{}: step {step} is not recorded; fix: pick a step between 1 and {}",
                run.join("metrics.jsonl").display(),
                metrics
                    .iter()
                    .filter_map(|m| m["step"].as_u64())
                    .max()
                    .unwrap_or(0)
            )
        })?;
    let num = |v: &serde_json::Value| v.as_f64().unwrap_or(f64::NAN);
    let (rec_loss, rec_g) = (num(&rec["loss"]), num(&rec["grad_norm"]));
    let events = read_jsonl(&run.join("events.jsonl")).unwrap_or_default();
    // Injections before the step are history (they shaped the weights); at the step itself
    // only a data injection is replayed.
    let inject: Vec<Injection> = events
        .iter()
        .filter(|e| e["kind"] == "inject")
        .filter_map(|e| {
            let d = &e["detail"];
            let i: Injection = format!("{}@{}", d["kind"].as_str()?, d["at_step"].as_u64()?)
                .parse()
                .ok()?;
            (i.step < step || i.kind == InjectKind::BadBatch).then_some(i)
        })
        .collect();
    let flagged: Vec<String> = events
        .iter()
        .filter(|e| {
            e["step"].as_u64() == Some(step)
                && matches!(e["kind"].as_str(), Some("spike" | "divergence"))
        })
        .filter_map(|e| e["detail"]["detector"].as_str().map(String::from))
        .collect();
    let from = checkpoint::list(&run.join("checkpoints"))
        .into_iter()
        .rfind(|(s, _)| *s < step);
    let ds = prepare_data(&cfg, run, false)?;
    let mut tr = Trainer::new(cfg, ds, run, from.as_ref().map(|(_, d)| d.as_path()), false)?;
    tr.inject = inject;
    let from_step = tr.state.step;
    let bar = indicatif::ProgressBar::new(step - from_step);
    while tr.state.step + 1 < step {
        let r = tr.step()?;
        if r.gave_up.is_some() {
            bail!(
                "the guard gave up at step {} while replaying; nothing to compare",
                r.step
            );
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    // Under the very weights of the step: is its batch anomalous next to its neighbours?
    let batch_loss = tr.batch_loss(step)?;
    // the same weights on neighbouring (un-injected) batches, for scale
    let mut near = Vec::new();
    for s in (step.saturating_sub(4).max(1)..step + 4).filter(|&s| s != step) {
        if !tr.inject.iter().any(|i| i.step == s) {
            near.push(tr.batch_loss(s)?);
        }
    }
    near.sort_by(|a, b| a.total_cmp(b));
    let typical = near.get(near.len() / 2).copied();
    let r = tr.step()?;
    let reproduces = same(r.loss, rec_loss) && same(r.grad_norm, rec_g);
    let data_like = typical.is_some_and(|t| batch_loss > 1.5 * t);
    let verdict = match (reproduces, flagged.is_empty()) {
        (true, true) => "reproduces exactly; the step was not flagged".to_string(),
        (true, false) if data_like => format!(
            "the spike reproduces and this batch is anomalous next to its neighbours under the same weights (loss {batch_loss:.3} vs {:.3} on neighbouring batches): the DATA",
            typical.unwrap_or(f64::NAN)
        ),
        (true, false) => format!(
            "the spike reproduces but the batch is ordinary under the same weights (loss {batch_loss:.3} vs {:.3} on neighbouring batches): the NUMERICS of the trajectory since (LR, init, precision)",
            typical.unwrap_or(f64::NAN)
        ),
        (false, _) => "does NOT reproduce from the same weights and batch: nondeterminism or a transient fault (hardware, memory, an injected fault)".to_string(),
    };
    if as_json {
        println!(
            "{}",
            json!({
                "step": step, "from_checkpoint_step": from_step,
                "recorded": {"loss": rec["loss"], "grad_norm": rec["grad_norm"]},
                "replayed": {"loss": if r.loss.is_finite() { json!(r.loss) } else { json!(null) },
                             "grad_norm": if r.grad_norm.is_finite() { json!(r.grad_norm) } else { json!(null) }},
                "reproduces": reproduces, "flagged_by": flagged,
                "batch_loss": batch_loss, "neighbour_batch_loss": typical,
                "verdict": verdict,
            })
        );
    } else {
        println!(
            "keel replay: step {step} of {} (from checkpoint step {from_step})",
            run.display()
        );
        println!("  recorded   loss {rec_loss:.6}  grad_norm {rec_g:.6}");
        println!(
            "  replayed   loss {:.6}  grad_norm {:.6}",
            r.loss, r.grad_norm
        );
        if !flagged.is_empty() {
            println!("  flagged by {}", flagged.join(", "));
        }
        println!("  verdict    {verdict}");
    }
    Ok(0)
}
