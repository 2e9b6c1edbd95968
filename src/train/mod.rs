//! `keel train`: the training loop, run directory, checkpoints and exact resume.

mod lock;
mod log;

pub use log::{read_jsonl, JsonlWriter};

use crate::checkpoint::{self, TrainerState};
use crate::config::RunConfig;
use crate::data::{self, Batcher, Dataset};
use crate::model::Model;
use crate::optim::{clip_grad_norm, AdamW};
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Install the Ctrl-C / SIGTERM handler once: it only sets a flag the loop checks after each step.
pub fn install_interrupt_handler() {
    let _ = ctrlc::set_handler(|| INTERRUPTED.store(true, Ordering::SeqCst));
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Finished,
    /// Interrupted by a signal after saving a checkpoint (exit code 3).
    Interrupted,
}

pub struct TrainOptions {
    pub config: RunConfig,
    pub out: PathBuf,
    /// The user gave configuration (file, preset, data or --set); otherwise a resume takes
    /// the run directory's own config.toml.
    pub explicit_config: bool,
    /// Show a progress bar (stderr is a terminal).
    pub progress: bool,
}

/// Summary printed at the end of a run.
#[derive(Debug, Clone)]
pub struct Summary {
    pub outcome: Outcome,
    pub steps: u64,
    pub final_loss: f64,
    pub best_val_loss: Option<f64>,
    pub tokens_per_s: f64,
    pub checkpoint: Option<PathBuf>,
    pub events: usize,
    /// Loss of a context-free (unigram) model on the training tokens, for reference.
    pub unigram_entropy: f64,
}

fn now_s() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Resolve the configuration of a run directory: a fresh run writes config.toml; a resume
/// reuses it, and refuses a differently-shaped configuration.
fn resolve_config(opts: &TrainOptions) -> Result<(RunConfig, bool)> {
    let path = opts.out.join("config.toml");
    if !path.exists() {
        return Ok((opts.config.clone(), false));
    }
    let saved = RunConfig::load(Some(&path), &[]).map_err(|e| anyhow::anyhow!("{e}"))?;
    if !opts.explicit_config {
        return Ok((saved, true));
    }
    let new = &opts.config;
    let same_shape = new.model_config().ok() == saved.model_config().ok()
        && new.data == saved.data
        && new.init == saved.init
        && new.train.batch_size == saved.train.batch_size
        && new.train.seq_len == saved.train.seq_len
        && new.train.grad_accum == saved.train.grad_accum
        && new.train.seed == saved.train.seed;
    if !same_shape {
        bail!(
            "{}: this run directory was made with a different model/data/batch configuration; fix: resume with `keel train --out {}` alone, or pick a new --out",
            path.display(),
            opts.out.display()
        );
    }
    Ok((new.clone(), true))
}

/// Mean validation loss over the fixed validation batches.
fn validate(
    model: &mut Model,
    ds: &Dataset,
    batcher: &Batcher,
    want: usize,
    x: &mut [u32],
    y: &mut [u32],
) -> Result<Option<f64>> {
    let n = batcher.val_batches(ds, want);
    if n == 0 {
        return Ok(None);
    }
    let mut sum = 0f64;
    for i in 0..n {
        batcher.val_batch(ds, i, x, y);
        sum += model.forward(x, y)? as f64;
    }
    Ok(Some(sum / n as f64))
}

pub fn run(opts: &TrainOptions) -> Result<Summary> {
    let out = &opts.out;
    std::fs::create_dir_all(out)
        .with_context(|| format!("{}: cannot create run directory", out.display()))?;
    let _lock = lock::RunLock::acquire(out)?;
    let (cfg, resuming) = resolve_config(opts)?;
    let mc = cfg.model_config().map_err(|e| anyhow::anyhow!("{e}"))?;
    let t = cfg.seq_len(&mc);
    let b = cfg.train.batch_size;
    crate::kernels::init_threads(cfg.train.threads);
    if !resuming {
        checkpoint::write_atomic(&out.join("config.toml"), cfg.to_toml().as_bytes())?;
    }

    let bar = if opts.progress {
        ProgressBar::new(1)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {percent}%")
            .expect("static template")
            .progress_chars("=> "),
    );
    let ds = data::prepare(&cfg, out, mc.vocab_size, t, &mut |what, done, total| {
        bar.set_length(total.max(1));
        bar.set_position(done);
        bar.set_message(what.to_string());
    })?;
    bar.finish_and_clear();
    let unigram = ds.unigram_entropy();
    eprintln!(
        "data: {} — {} train / {} val tokens, unigram entropy {unigram:.3} nats/token",
        ds.description,
        ds.train.len(),
        ds.val.len()
    );

    let mut model = Model::new(&mc, b, t);
    crate::init::initialize(&mut model, &cfg.init).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut opt = AdamW::new(cfg.optim.clone(), &model.layout)
        .with_lr_multipliers(&model.layout, |r| {
            crate::init::lr_multiplier(&cfg.init, &mc, r)
        });
    let ck_root = out.join("checkpoints");
    checkpoint::prune(&ck_root, usize::MAX)?; // clears leftovers of interrupted saves
    let mut state = TrainerState {
        step: 0,
        data_cursor: 0,
        adam_step: 0,
        tokens_seen: 0,
        elapsed_s: 0.0,
        best_val_loss: None,
        keel_version: env!("CARGO_PKG_VERSION").to_string(),
    };
    let mut events = JsonlWriter::open(&out.join("events.jsonl"))?;
    let metrics_path = out.join("metrics.jsonl");
    if let Some((_, dir)) = checkpoint::list(&ck_root).pop() {
        state = checkpoint::load(&dir, &mut model, &mut opt.m, &mut opt.v)?;
        opt.step = state.adam_step;
        log::truncate_after_step(&metrics_path, state.step)?;
        events.write(&json!({"step": state.step, "kind": "resume", "detail": {"checkpoint": dir.display().to_string()}, "time": now_s()}))?;
    } else if resuming || metrics_path.exists() {
        // a run that died before its first checkpoint starts over
        log::truncate_after_step(&metrics_path, 0)?;
    }
    let mut metrics = JsonlWriter::open(&metrics_path)?;
    let batcher = Batcher {
        seed: cfg.train.seed,
        batch: b,
        seq: t,
    };
    let (mut x, mut y) = (vec![0u32; b * t], vec![0u32; b * t]);
    let total = cfg.train.steps;
    let accum = cfg.train.grad_accum;
    let tokens_per_step = (b * t * accum) as u64;

    let bar = if opts.progress {
        ProgressBar::new(total)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template("{prefix} [{bar:28}] {pos}/{len} {msg} eta {eta}")
            .expect("static template")
            .progress_chars("=> "),
    );
    bar.set_prefix("train");
    bar.set_position(state.step);
    let t_start = Instant::now();
    let elapsed0 = state.elapsed_s;
    let mut last_loss = f64::NAN;
    let mut tps = 0f64;
    let mut last_ckpt: Option<PathBuf> = None;
    let mut n_events = 0usize;

    while state.step < total {
        let t0 = Instant::now();
        let lr = cfg.schedule.lr_at(state.step, total, cfg.optim.lr);
        model.zero_grad();
        let mut loss = 0f64;
        for _ in 0..accum {
            batcher.train_batch(&ds, state.data_cursor, &mut x, &mut y);
            state.data_cursor += 1;
            loss += model.forward(&x, &y)? as f64 / accum as f64;
            model.backward(1.0 / accum as f32)?;
        }
        let gnorm = clip_grad_norm(&mut model.grads, cfg.optim.grad_clip);
        opt.update(&mut model.params, &model.grads, lr);
        state.adam_step = opt.step;
        state.step += 1;
        state.tokens_seen += tokens_per_step;
        let dt = t0.elapsed().as_secs_f64();
        tps = tokens_per_step as f64 / dt;
        last_loss = loss;
        state.elapsed_s = elapsed0 + t_start.elapsed().as_secs_f64();
        let mut line = json!({
            "step": state.step,
            "tokens": state.tokens_seen,
            "loss": loss,
            "lr": lr,
            "grad_norm": gnorm,
            "tokens_per_s": tps,
            "elapsed_s": state.elapsed_s,
            "max_attn_logit": model.stats.max_attn_logit.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)),
            "logit_z": model.stats.lse_mean,
            "skipped": false,
        });
        let eval_now = (cfg.eval.every > 0 && state.step.is_multiple_of(cfg.eval.every))
            || state.step == total;
        if eval_now {
            if let Some(v) = validate(&mut model, &ds, &batcher, cfg.eval.batches, &mut x, &mut y)?
            {
                line["val_loss"] = json!(v);
                state.best_val_loss = Some(state.best_val_loss.map_or(v, |b: f64| b.min(v)));
            }
        }
        metrics.write(&line)?;
        bar.set_position(state.step);
        bar.set_message(format!("loss {loss:.4} | {tps:.0} tok/s"));
        if !opts.progress
            && cfg.train.log_every > 0
            && (state.step.is_multiple_of(cfg.train.log_every) || state.step == total)
        {
            eprintln!("step {:>6}/{total}  loss {loss:.4}  lr {lr:.2e}  grad_norm {gnorm:.3}  {tps:.0} tok/s", state.step);
        }
        let interrupted = INTERRUPTED.load(Ordering::SeqCst);
        let ck_now = (cfg.checkpoint.every > 0 && state.step.is_multiple_of(cfg.checkpoint.every))
            || state.step == total;
        if ck_now || interrupted {
            let dir = checkpoint::save(
                &ck_root,
                &model,
                &opt.m,
                &opt.v,
                &state,
                ds.tokenizer.as_deref(),
            )?;
            checkpoint::prune(&ck_root, cfg.checkpoint.keep)?;
            events.write(&json!({"step": state.step, "kind": "checkpoint", "detail": {"path": dir.display().to_string()}, "time": now_s()}))?;
            n_events += 1;
            last_ckpt = Some(dir);
        }
        if interrupted {
            events.write(
                &json!({"step": state.step, "kind": "interrupted", "detail": {}, "time": now_s()}),
            )?;
            bar.abandon();
            return Ok(Summary {
                outcome: Outcome::Interrupted,
                steps: state.step,
                final_loss: last_loss,
                best_val_loss: state.best_val_loss,
                tokens_per_s: tps,
                checkpoint: last_ckpt,
                events: n_events + 1,
                unigram_entropy: unigram,
            });
        }
    }
    bar.finish_and_clear();
    if last_ckpt.is_none() {
        last_ckpt = checkpoint::list(&ck_root).pop().map(|(_, p)| p);
    }
    Ok(Summary {
        outcome: Outcome::Finished,
        steps: state.step,
        final_loss: last_loss,
        best_val_loss: state.best_val_loss,
        tokens_per_s: tps,
        checkpoint: last_ckpt,
        events: n_events,
        unigram_entropy: unigram,
    })
}

/// Mean next-token cross-entropy of a model on a flat token array, windows as in DESIGN.md:
/// window w has inputs t[wL..wL+L) and targets t[wL+1..wL+L+1), n = (len−1)/L windows.
pub fn eval_tokens(
    model: &mut Model,
    tokens: &data::shard::TokenFile,
    seq: usize,
    max_windows: Option<usize>,
) -> Result<(f64, usize)> {
    let mut n = tokens.len.saturating_sub(1) / seq;
    if let Some(m) = max_windows {
        n = n.min(m);
    }
    if n == 0 {
        bail!(
            "{}: {} tokens are too few for one window of --seq-len {seq}",
            tokens.path.display(),
            tokens.len
        );
    }
    if tokens.len > 0 {
        tokens.check_vocab(model.cfg.vocab_size)?;
    }
    let group = 8usize;
    let mut sum = 0f64;
    let mut w = 0;
    while w < n {
        let b = group.min(n - w);
        model.set_batch_shape(b, seq);
        let (mut x, mut y) = (vec![0u32; b * seq], vec![0u32; b * seq]);
        for r in 0..b {
            tokens.read((w + r) * seq, &mut x[r * seq..(r + 1) * seq]);
            tokens.read((w + r) * seq + 1, &mut y[r * seq..(r + 1) * seq]);
        }
        model.forward(&x, &y)?;
        sum += model
            .position_losses()
            .iter()
            .map(|&l| l as f64)
            .sum::<f64>();
        w += b;
    }
    Ok((sum / (n * seq) as f64, n))
}

/// Path helpers for tests and commands.
pub fn latest_checkpoint(run: &Path) -> Option<PathBuf> {
    checkpoint::list(&run.join("checkpoints"))
        .pop()
        .map(|(_, p)| p)
}
