//! `keel train`: the training loop, run directory, checkpoints and exact resume.

pub mod figures;
pub(crate) mod lock;
mod log;
pub mod replay;

pub use figures::{figures_of, Figures};
pub use log::{event_line, num_field, read_jsonl, truncate_after_step, JsonlWriter};

use crate::checkpoint::{self, TrainerState};
use crate::config::RunConfig;
use crate::data::{self, Batcher, Dataset};
use crate::model::Model;
use crate::monitor::{Action, Guard, StepMetrics};
use crate::optim::AdamW;
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

/// True once Ctrl-C / SIGTERM arrived (for loops outside `run`, e.g. `keel watch --follow`).
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Finished,
    /// Interrupted by a signal after saving a checkpoint (exit code 3).
    Interrupted,
    /// The guard could not recover (exit code 2); the summary carries the diagnosis.
    Diverged,
    /// A resume found the run already at its last step: nothing was trained or written.
    AlreadyComplete,
}

pub struct TrainOptions {
    /// The command line's configuration (a fresh run trains with it).
    pub config: RunConfig,
    pub out: PathBuf,
    /// `--config` given; a resume then compares that whole file with the run's config.toml.
    pub config_file: Option<PathBuf>,
    /// `--set`, `--steps`, `--preset`, `--data` as `section.key=value`: a resume applies them
    /// on top of the run's own config.toml.
    pub overrides: Vec<String>,
    /// Show a progress bar (stderr is a terminal).
    pub progress: bool,
    /// Faults to inject (`--inject`).
    pub inject: Vec<Injection>,
    /// Stop after this step, the schedule still spanning `train.steps` (`keel check
    /// --sharpness`: the first steps of the run as configured).
    pub stop_after: Option<u64>,
}

/// How a run ended; the figures the summary prints are read back from its logs
/// (`figures_of`), the same ones the report shows.
#[derive(Debug, Clone)]
pub struct Summary {
    pub outcome: Outcome,
    pub steps: u64,
    pub checkpoint: Option<PathBuf>,
    /// Loss of a context-free (unigram) model on the training tokens, for reference.
    pub unigram_entropy: f64,
    /// Why the guard gave up (Outcome::Diverged).
    pub diagnosis: Option<String>,
    /// The run's own `train.report` (a bare resume takes the run directory's config).
    pub report: bool,
}

impl Summary {
    /// A run that trained nothing this time (already complete, or stopped while reading the
    /// data): its figures come from the logs, none from this process.
    fn untrained(outcome: Outcome, steps: u64, checkpoint: Option<PathBuf>) -> Summary {
        Summary {
            outcome,
            steps,
            checkpoint,
            unigram_entropy: f64::NAN,
            diagnosis: None,
            report: false,
        }
    }
}

/// Keys whose change would break a resumed run's exactness (the weights, the data stream or
/// the batches would differ from those the checkpoint was trained on): a resume refuses them.
const FROZEN: &[&str] = &[
    "model.",
    "data.",
    "init.",
    "train.batch_size",
    "train.seq_len",
    "train.grad_accum",
    "train.seed",
];

/// Flatten a config into `section.key` → value (nested tables joined with dots).
fn flat(cfg: &RunConfig) -> std::collections::BTreeMap<String, toml::Value> {
    fn walk(
        prefix: &str,
        v: &toml::Value,
        out: &mut std::collections::BTreeMap<String, toml::Value>,
    ) {
        match v {
            toml::Value::Table(t) => {
                for (k, x) in t {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(&key, x, out);
                }
            }
            _ => {
                out.insert(prefix.to_string(), v.clone());
            }
        }
    }
    let mut out = Default::default();
    if let Ok(v) = toml::Value::try_from(cfg) {
        walk("", &v, &mut out);
    }
    out
}

/// The keys that differ between two configs, with (old, new) as TOML text ("(unset)" when absent).
pub fn config_changes(old: &RunConfig, new: &RunConfig) -> Vec<(String, String, String)> {
    let (a, b) = (flat(old), flat(new));
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    let show = |v: Option<&toml::Value>| v.map_or("(unset)".to_string(), |v| v.to_string());
    keys.into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| (k.clone(), show(a.get(k)), show(b.get(k))))
        .collect()
}

/// A resolved run configuration: what to train with, and what a resume changed.
pub struct Resolved {
    pub cfg: RunConfig,
    pub resuming: bool,
    /// (key, old, new) of each setting a resume changed (steps, cadences, schedule, ...).
    pub changes: Vec<(String, String, String)>,
    /// The configuration in force before this resume (recorded in the history when changed).
    pub previous: Option<RunConfig>,
}

/// Resolve the configuration of a run directory. A fresh run takes the command line's. A
/// resume starts from the directory's own config.toml, with this command's `--set`/`--steps`
/// (or a whole `--config`) on top: settings that leave the past intact (steps, eval,
/// checkpoint and log cadence, the schedule, the guard) may change; one that would break
/// exactness (model, data, init, batch, seed) is refused naming the key, old and new value.
fn resolve_config(opts: &TrainOptions) -> Result<Resolved> {
    let path = opts.out.join("config.toml");
    if !path.exists() {
        return Ok(Resolved {
            cfg: opts.config.clone(),
            resuming: false,
            changes: vec![],
            previous: None,
        });
    }
    let saved = RunConfig::load(Some(&path), &[]).map_err(|e| anyhow::anyhow!("{e}"))?;
    let new = match &opts.config_file {
        Some(f) => RunConfig::load(Some(f), &opts.overrides),
        None => RunConfig::load(Some(&path), &opts.overrides),
    }
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let changes = config_changes(&saved, &new);
    // the thread count changes speed only (and exactness only across thread counts, which
    // docs/train.md states); it is not a change of the run
    let changes: Vec<_> = changes
        .into_iter()
        .filter(|(k, _, _)| k != "train.threads")
        .collect();
    let frozen: Vec<String> = changes
        .iter()
        .filter(|(k, _, _)| {
            FROZEN
                .iter()
                .any(|f| k.starts_with(f) || k == f.trim_end_matches('.'))
        })
        .map(|(k, o, n)| format!("{k}: {o} → {n}"))
        .collect();
    let trained = !checkpoint::list(&opts.out.join("checkpoints")).is_empty()
        || std::fs::metadata(opts.out.join("metrics.jsonl")).is_ok_and(|m| m.len() > 0);
    if !frozen.is_empty() && !trained {
        // a start that never trained a step (killed or failed while reading the data): the
        // command given now is the run
        return Ok(Resolved {
            cfg: new,
            resuming: false,
            changes: vec![],
            previous: None,
        });
    }
    if !frozen.is_empty() {
        bail!(
            "{}: resuming cannot change what the checkpoints were trained on:\n  {}\n  fix: resume \
             with `keel train --out {}` (plus --steps or --set of steps, cadences, schedule or \
             guard), or start a new run with another --out",
            path.display(),
            frozen.join("\n  "),
            opts.out.display()
        );
    }
    Ok(Resolved {
        cfg: new,
        resuming: true,
        changes,
        previous: Some(saved),
    })
}

/// The configuration in force at `step` of a run: config.toml, unless a resume changed it
/// after that step (`config_history.jsonl` keeps each replaced config with its last step).
pub fn config_at(run: &Path, step: u64) -> Result<RunConfig> {
    let hist = run.join("config_history.jsonl");
    if let Ok(entries) = read_jsonl(&hist) {
        for e in entries {
            let (Some(until), Some(text)) = (e["until_step"].as_u64(), e["config"].as_str()) else {
                continue;
            };
            if step <= until {
                let table = text.parse::<toml::Table>().with_context(|| {
                    format!(
                        "{}: a config of the history is not valid TOML",
                        hist.display()
                    )
                })?;
                return RunConfig::from_table(table)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", hist.display()));
            }
        }
    }
    RunConfig::load(Some(&run.join("config.toml")), &[]).map_err(|e| anyhow::anyhow!("{e}"))
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

/// A fault to inject (`--inject KIND@STEP`), for tests and demos of the guard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InjectKind {
    /// The step's loss and gradient become NaN (a numerics or hardware fault).
    Nan,
    /// The step's update is applied at 100× the learning rate (a bad update).
    Spike,
    /// The step's batches are replaced by repeated junk tokens (bad data).
    BadBatch,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Injection {
    pub kind: InjectKind,
    pub step: u64,
}

impl std::str::FromStr for Injection {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let usage = "expected KIND@STEP with KIND nan, spike or bad-batch, e.g. --inject nan@120";
        let (k, n) = s
            .split_once('@')
            .ok_or_else(|| format!("--inject {s}: {usage}"))?;
        let kind = match k {
            "nan" => InjectKind::Nan,
            "spike" => InjectKind::Spike,
            "bad-batch" => InjectKind::BadBatch,
            _ => return Err(format!("--inject {s}: unknown kind {k:?}; {usage}")),
        };
        let step = n
            .parse::<u64>()
            .ok()
            .filter(|&n| n >= 1)
            .ok_or_else(|| format!("--inject {s}: step must be a number ≥ 1; {usage}"))?;
        Ok(Injection { kind, step })
    }
}

impl InjectKind {
    pub fn name(self) -> &'static str {
        match self {
            InjectKind::Nan => "nan",
            InjectKind::Spike => "spike",
            InjectKind::BadBatch => "bad-batch",
        }
    }
}

/// What one optimizer step did (returned to the loop and to `keel replay`).
#[derive(Debug, Clone)]
pub struct StepReport {
    pub step: u64,
    pub loss: f64,
    pub grad_norm: f64,
    pub skipped: bool,
    pub detections: Vec<crate::monitor::Detection>,
    pub actions: Vec<crate::monitor::Action>,
    pub gave_up: Option<String>,
    /// `train.stop_if_diverged` fired: why.
    pub diverged: Option<String>,
    /// One line for each thing the guard did this step (the terminal prints them).
    pub said: Vec<String>,
    /// The LR this step used (after any guard factor), and the validation loss on eval steps.
    pub lr: f64,
    pub val_loss: Option<f64>,
}

/// Consecutive steps above the first step's loss (after warm-up) that count as diverged.
pub const DIVERGED_AFTER: u64 = 10;

/// The sweep's divergence rule, one step of it (keel train's `stop_if_diverged`, and the
/// sweep's judgement of command trials): the first finite loss is remembered, and a loss
/// above it on `DIVERGED_AFTER` counted steps in a row is a divergence (the reason). Steps
/// before the end of warm-up are not counted. `loss` must be finite (a non-finite loss is
/// its own divergence, the caller's).
pub fn above_initial(
    initial: &mut Option<f64>,
    above: &mut u64,
    loss: f64,
    counted: bool,
) -> Option<String> {
    let init = *initial.get_or_insert(loss);
    if counted {
        *above = if loss > init { *above + 1 } else { 0 };
    }
    (*above >= DIVERGED_AFTER).then(|| {
        format!(
            "the loss stayed above the first step's {init:.4} for {DIVERGED_AFTER} steps after warm-up (now {loss:.4})"
        )
    })
}

/// The training state machine: model, optimizer, data cursor and guard, one step at a time.
/// `record` off (replay) writes nothing to the run directory.
pub(crate) struct Trainer {
    pub cfg: RunConfig,
    pub ds: Dataset,
    pub model: Model,
    pub opt: AdamW,
    pub state: TrainerState,
    batcher: Batcher,
    x: Vec<u32>,
    y: Vec<u32>,
    pub guard: Guard,
    pub inject: Vec<Injection>,
    ck_root: PathBuf,
    record: bool,
    metrics: Option<JsonlWriter>,
    events: Option<JsonlWriter>,
    telemetry: Option<JsonlWriter>,
    tb: Option<log::TbMirror>,
    sumsq: Vec<f64>,
    /// `telemetry.sharpness_every`: the probe's buffers and a copy of the measured batch
    /// (allocated at the first measurement).
    sharp: Option<(crate::probe::sharpness::Scratch, Vec<u32>, Vec<u32>)>,
    ckpt_pending: bool,
    t_start: Instant,
    elapsed0: f64,
    pub last_ckpt: Option<PathBuf>,
    pub tps: f64,
}

fn fresh_state() -> TrainerState {
    TrainerState {
        step: 0,
        data_cursor: 0,
        adam_step: 0,
        tokens_seen: 0,
        elapsed_s: 0.0,
        best_val_loss: None,
        keel_version: env!("CARGO_PKG_VERSION").to_string(),
        guard: Default::default(),
        initial_loss: None,
        above_initial: 0,
        init_rescued: false,
        clean: true,
        checkpoint_pending: false,
    }
}

/// σ a broken init is rescaled to (`guard.init_rescue`): HF's default for every matrix.
const RESCUE_STD: f64 = 0.02;

/// JSON for a float that may be non-finite (null then).
fn num(x: f64) -> serde_json::Value {
    if x.is_finite() {
        json!(x)
    } else {
        serde_json::Value::Null
    }
}

impl Trainer {
    /// Model and optimizer for `cfg`, at init or restored from checkpoint `from`.
    pub fn new(
        cfg: RunConfig,
        ds: Dataset,
        out: &Path,
        from: Option<&Path>,
        record: bool,
    ) -> Result<Trainer> {
        let mc = cfg.model_config().map_err(|e| anyhow::anyhow!("{e}"))?;
        let t = cfg.seq_len(&mc);
        let b = cfg.train.batch_size;
        let mut model = Model::new(&mc, b, t);
        model.z_loss = cfg.train.z_loss as f32;
        crate::init::initialize(&mut model, &cfg.init).map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut opt = AdamW::new(cfg.optim.clone(), &model.layout)
            .with_lr_multipliers(&model.layout, |r| {
                crate::init::lr_multiplier(&cfg.init, &mc, r)
            });
        let mut state = fresh_state();
        if let Some(dir) = from {
            state = checkpoint::load(dir, &mut model, &mut opt.m, &mut opt.v)?;
            opt.step = state.adam_step;
        }
        let guard = Guard::with_snapshot(cfg.guard.clone(), state.guard.clone());
        let open = |name: &str| -> Result<Option<JsonlWriter>> {
            Ok(if record {
                Some(JsonlWriter::open(&out.join(name))?)
            } else {
                None
            })
        };
        let nspecs = model.layout.specs.len();
        Ok(Trainer {
            batcher: Batcher {
                seed: cfg.train.seed,
                batch: b,
                seq: t,
            },
            x: vec![0u32; b * t],
            y: vec![0u32; b * t],
            guard,
            inject: Vec::new(),
            ck_root: out.join("checkpoints"),
            metrics: open("metrics.jsonl")?,
            events: open("events.jsonl")?,
            telemetry: if cfg.telemetry.every > 0 {
                open("telemetry.jsonl")?
            } else {
                None
            },
            tb: if record && cfg.telemetry.tensorboard {
                Some(log::TbMirror::create(&out.join("tensorboard"))?)
            } else {
                None
            },
            record,
            sumsq: vec![0.0; nspecs],
            sharp: None,
            // a resumed run still owes the regular checkpoint its source was waiting to take
            ckpt_pending: state.checkpoint_pending,
            t_start: Instant::now(),
            elapsed0: state.elapsed_s,
            last_ckpt: None,
            tps: 0.0,
            cfg,
            ds,
            model,
            opt,
            state,
        })
    }

    pub fn event(&mut self, kind: &str, detail: serde_json::Value) -> Result<()> {
        self.event_at(self.state.step, kind, detail)
    }

    fn event_at(&mut self, step: u64, kind: &str, detail: serde_json::Value) -> Result<()> {
        if let Some(e) = &mut self.events {
            let line = log::event_line(step, kind, detail);
            e.write(&line)?;
            if let Some(tb) = &mut self.tb {
                tb.event(&line)?;
            }
        }
        Ok(())
    }

    fn injected(&self, step: u64, kind: InjectKind) -> bool {
        self.inject.iter().any(|i| i.step == step && i.kind == kind)
    }

    /// Repeated junk: a fixed 7-token pattern of arbitrary ids, over the whole batch.
    fn junk_batch(&mut self) {
        let v = self.model.cfg.vocab_size as u64;
        let pat: Vec<u32> = (0..8u64)
            .map(|i| ((i * 0x9E37_79B9_7F4A_7C15 + 12345) % v) as u32)
            .collect();
        for (i, (x, y)) in self.x.iter_mut().zip(self.y.iter_mut()).enumerate() {
            *x = pat[i % 7];
            *y = pat[(i + 1) % 7];
        }
    }

    /// Mean loss of the batches step `step` trains on (forward only; grads untouched).
    pub fn batch_loss(&mut self, step: u64) -> Result<f64> {
        let accum = self.cfg.train.grad_accum as u64;
        let mut loss = 0f64;
        for k in 0..accum {
            if self.injected(step, InjectKind::BadBatch) {
                self.junk_batch();
            } else {
                let c = (step - 1) * accum + k;
                self.batcher
                    .train_batch(&self.ds, c, &mut self.x, &mut self.y);
            }
            loss += self.model.forward(&self.x, &self.y)? as f64 / accum as f64;
        }
        Ok(loss)
    }

    /// Roll back to the newest checkpoint that predates the incident (or the initial
    /// weights); the step count and data cursor keep going, so the batches since are skipped.
    fn rollback(&mut self, before_step: u64) -> Result<String> {
        // the newest state known clean that predates the incident
        let target = checkpoint::list(&self.ck_root)
            .into_iter()
            .rfind(|(s, d)| s + 1 < before_step && checkpoint::is_clean(d));
        let restored = match &target {
            Some((s, dir)) => {
                let st = checkpoint::load(dir, &mut self.model, &mut self.opt.m, &mut self.opt.v)?;
                self.opt.step = st.adam_step;
                self.guard.restore_detectors(st.guard.monitor.clone());
                (*s, st.data_cursor, dir.display().to_string())
            }
            None => {
                crate::init::initialize(&mut self.model, &self.cfg.init)
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                if self.state.init_rescued {
                    crate::init::rescale_matrices(&mut self.model, RESCUE_STD);
                }
                self.opt.m.fill(0.0);
                self.opt.v.fill(0.0);
                self.opt.step = 0;
                self.guard.restore_detectors(Default::default());
                (0, 0, "initial weights".to_string())
            }
        };
        // the trainer state follows the optimizer it restored: a checkpoint taken before the
        // next update (Ctrl-C, the last step) must resume with this Adam step count
        self.state.adam_step = self.opt.step;
        self.event(
            "rollback",
            json!({"to_step": restored.0, "from": restored.2,
                   "skipped_batches": [restored.1, self.state.data_cursor],
                   "reason": format!("incident began at step {before_step}")}),
        )?;
        Ok(if restored.0 == 0 {
            format!("rolled back to the initial weights (the incident began at step {before_step}; no checkpoint before it)")
        } else {
            format!(
                "rolled back to step {} ({}; the incident began at step {before_step})",
                restored.0, restored.2
            )
        })
    }

    /// One optimizer step under the guard.
    pub fn step(&mut self) -> Result<StepReport> {
        let t0 = Instant::now();
        let total = self.cfg.train.steps;
        let accum = self.cfg.train.grad_accum;
        let s = self.state.step + 1; // the step being taken (as logged)
        if let Some(a) = self.guard.begin_step(s) {
            let (kind, detail) = a.event();
            self.event_at(s, kind, detail)?;
        }
        let scheduled_lr = self
            .cfg
            .schedule
            .lr_at(self.state.step, total, self.cfg.optim.lr);
        let factor = self.guard.lr_factor_at(Some(scheduled_lr));
        let lr = scheduled_lr * factor;
        self.model.zero_grad();
        let mut loss = 0f64;
        let bad_batch = self.injected(s, InjectKind::BadBatch);
        for _ in 0..accum {
            if bad_batch {
                self.junk_batch();
            } else {
                self.batcher.train_batch(
                    &self.ds,
                    self.state.data_cursor,
                    &mut self.x,
                    &mut self.y,
                );
            }
            self.state.data_cursor += 1;
            loss += self.model.forward(&self.x, &self.y)? as f64 / accum as f64;
            self.model.backward(1.0 / accum as f32)?;
        }
        if self.injected(s, InjectKind::Nan) {
            loss = f64::NAN;
            self.model.grads[0] = f32::NAN;
        }
        let tel_now = self.telemetry.is_some() && s.is_multiple_of(self.cfg.telemetry.every);
        if tel_now {
            crate::optim::tensor_sumsq(&self.model.grads, &self.model.layout, &mut self.sumsq);
        }
        let gnorm = crate::optim::grad_norm(&self.model.grads);
        let st = &self.model.stats;
        let max_attn = st
            .max_attn_logit
            .iter()
            .fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let (logit_z, lse_max) = (st.lse_mean, st.lse_max);
        let m = StepMetrics {
            step: s,
            loss,
            grad_norm: Some(gnorm),
            max_attn_logit: Some(max_attn as f64),
            logit_z: Some(logit_z as f64),
            lr: Some(scheduled_lr),
            scaler_skips: None,
        };
        // A first loss far above ln(vocab) is a broken init, not a bad step: rescale the
        // weights to a sane σ before any update (this step's gradients are discarded).
        // A non-finite first loss is left to the nonfinite detector (a transient fault, or
        // `--inject nan@1`, is no reason to rescale the weights).
        let rescue = self.cfg.guard.init_rescue;
        let lnv = (self.model.cfg.vocab_size as f64).ln();
        let rescued = s == 1
            && self.guard.enabled()
            && rescue > 0.0
            && loss.is_finite()
            && loss > rescue * lnv;
        let mut said = Vec::new();
        if rescued {
            let worst = crate::init::rescale_matrices(&mut self.model, RESCUE_STD);
            said.push(format!(
                "init rescue: first-step loss {loss:.2} > {rescue} × ln(vocab) = {:.2}; every weight matrix rescaled to σ {RESCUE_STD} (largest σ was {worst:.3}), this step's update discarded",
                rescue * lnv
            ));
            self.state.init_rescued = true;
            self.event_at(
                s,
                "init_rescue",
                json!({"loss": num(loss), "threshold": rescue * lnv, "std": RESCUE_STD,
                       "largest_std_before": worst,
                       "reason": format!("first-step loss {loss:.2} > {rescue} × ln(vocab) = {:.2}: the init is broken; every weight matrix rescaled to σ {RESCUE_STD}", rescue * lnv)}),
            )?;
        }
        // guard off: detect and log, never act (an unguarded baseline runs to the end)
        let (detections, decision) = if rescued {
            (
                Vec::new(),
                crate::monitor::Decision {
                    skip: true,
                    actions: Vec::new(),
                },
            )
        } else {
            self.guard.observe(&m)
        };
        let mut update_ratio = None;
        if !decision.skip {
            crate::optim::clip_grad_norm(&mut self.model.grads, self.cfg.optim.grad_clip);
            let mult = if self.injected(s, InjectKind::Spike) {
                100.0
            } else {
                1.0
            };
            // the update/weight sums cost a few % of a step: gathered on telemetry steps
            self.opt.track = tel_now;
            self.opt
                .update(&mut self.model.params, &self.model.grads, lr * mult);
            self.state.adam_step = self.opt.step;
            if tel_now {
                update_ratio = Some(self.opt.update_ratio());
            }
        }
        self.state.step = s;
        self.state.tokens_seen += (self.batcher.batch * self.batcher.seq * accum) as u64;
        self.tps =
            (self.batcher.batch * self.batcher.seq * accum) as f64 / t0.elapsed().as_secs_f64();
        self.state.elapsed_s = self.elapsed0 + self.t_start.elapsed().as_secs_f64();
        let mut line = json!({
            "step": s,
            "tokens": self.state.tokens_seen,
            "loss": num(loss),
            "lr": lr,
            "grad_norm": num(gnorm),
            "tokens_per_s": self.tps,
            "elapsed_s": self.state.elapsed_s,
            "max_attn_logit": num(max_attn as f64),
            "logit_z": num(logit_z as f64),
            "skipped": decision.skip,
        });
        if let Some(r) = update_ratio {
            line["update_ratio"] = num(r);
        }
        let every = self.cfg.telemetry.sharpness_every;
        let sharp_now = every > 0 && s.is_multiple_of(every) && !decision.skip && self.record;
        if sharp_now {
            // the batch this step trained on (the eval below reuses x and y)
            let (_, bx, by) = self.sharp.get_or_insert_with(|| {
                (
                    crate::probe::sharpness::Scratch::new(0),
                    Vec::new(),
                    Vec::new(),
                )
            });
            bx.clone_from(&self.x);
            by.clone_from(&self.y);
        }
        if self.model.z_loss > 0.0 {
            // the z-loss term of the objective, last micro-batch (the loss is the cross-entropy)
            line["z_term"] = num((self.model.z_loss * self.model.stats.lse_sq_mean) as f64);
        }
        let eval_now =
            (self.cfg.eval.every > 0 && s.is_multiple_of(self.cfg.eval.every)) || s == total;
        if eval_now && self.record {
            let (mut x, mut y) = (std::mem::take(&mut self.x), std::mem::take(&mut self.y));
            let v = validate(
                &mut self.model,
                &self.ds,
                &self.batcher,
                self.cfg.eval.batches,
                &mut x,
                &mut y,
            );
            (self.x, self.y) = (x, y);
            if let Some(v) = v? {
                line["val_loss"] = json!(v);
                self.state.best_val_loss =
                    Some(self.state.best_val_loss.map_or(v, |b: f64| b.min(v)));
            }
        }
        if tel_now {
            self.write_telemetry(s, update_ratio.is_some(), lse_max)?;
        }
        if sharp_now {
            // last: the probe's passes overwrite activations the telemetry above reads
            self.sharpness_into(&mut line, lr)?;
        }
        if let Some(w) = &mut self.metrics {
            w.write(&line)?;
        }
        if let Some(tb) = &mut self.tb {
            tb.metrics(&line)?;
        }
        for d in &detections {
            self.event(d.kind.event_kind(), serde_json::to_value(d)?)?;
        }
        let mut diverged = None;
        if !decision.skip {
            let warm = s > self.cfg.schedule.warmup_steps;
            if !loss.is_finite() {
                diverged = Some(format!("the loss is {loss} at step {s}"));
            } else {
                diverged = above_initial(
                    &mut self.state.initial_loss,
                    &mut self.state.above_initial,
                    loss,
                    warm,
                );
            }
        }
        if !self.cfg.train.stop_if_diverged {
            diverged = None;
        }
        if let Some(why) = &diverged {
            self.event(
                "diverged",
                json!({"rule": "train.stop_if_diverged", "reason": why, "loss": num(loss),
                       "initial_loss": self.state.initial_loss.map(num)}),
            )?;
        }
        let mut gave_up = None;
        for a in &decision.actions {
            if !matches!(a, Action::Rollback { .. }) {
                said.push(describe(a));
            }
            match a {
                Action::Skip => self.event(
                    "skip",
                    json!({"batches": [self.state.data_cursor - accum as u64, self.state.data_cursor]}),
                )?,
                Action::Rollback { before_step } => said.push(self.rollback(*before_step)?),
                Action::GiveUp { diagnosis } => {
                    let (kind, detail) = a.event();
                    self.event(kind, detail)?;
                    gave_up = Some(diagnosis.clone());
                }
                Action::LrBackoff { .. }
                | Action::LrRestore
                | Action::EarlyRuleOff { .. }
                | Action::LrCap { .. }
                | Action::BadBatch { .. } => {
                    let (kind, detail) = a.event();
                    self.event(kind, detail)?;
                }
            }
        }
        self.state.guard = self.guard.snapshot();
        Ok(StepReport {
            step: s,
            loss,
            grad_norm: gnorm,
            skipped: decision.skip,
            detections,
            actions: decision.actions,
            gave_up,
            diverged,
            said,
            lr,
            val_loss: line.get("val_loss").and_then(serde_json::Value::as_f64),
        })
    }

    /// The sharpness probe on the batch saved this step (weights after its update, Adam's
    /// state as the next step finds it), into the metrics line. `lr` is the step's LR (the
    /// schedule's, times any guard factor): `edge_ratio` = lr / lr_edge.
    fn sharpness_into(&mut self, line: &mut serde_json::Value, lr: f64) -> Result<()> {
        let t = &self.cfg.telemetry;
        let o = crate::probe::sharpness::SharpnessOptions {
            iters: t.sharpness_iters.max(1),
            plain: t.sharpness_hessian,
            seed: self.cfg.train.seed,
            ..Default::default()
        };
        let Some((scratch, bx, by)) = &mut self.sharp else {
            return Ok(());
        };
        let r = crate::probe::sharpness::measure(
            &mut self.model,
            bx,
            by,
            Some(&self.opt),
            lr,
            &o,
            scratch,
        )?;
        if let Some(l) = r.lambda_max {
            line["sharpness"] = num(l);
        }
        if let Some(l) = r.lambda_precond {
            line["sharpness_precond"] = num(l);
        }
        line["lr_edge"] = num(r.lr_edge);
        line["edge_ratio"] = num(r.edge_ratio);
        line["sharpness_cost_steps"] = json!(r.cost_steps);
        Ok(())
    }

    /// Per-layer statistics: grad norms, update/weight ratio per tensor group, attention
    /// logit max, residual RMS, output log-partition.
    fn write_telemetry(&mut self, step: u64, updated: bool, lse_max: f32) -> Result<()> {
        let lay = &self.model.layout;
        let nl = self.model.cfg.num_layers;
        let mut layer_g = vec![0f64; nl];
        for (i, sp) in lay.specs.iter().enumerate() {
            if let Some(l) = sp.layer {
                layer_g[l] += self.sumsq[i];
            }
        }
        let ratios: serde_json::Map<String, serde_json::Value> = self
            .opt
            .group_update_sq(lay)
            .iter()
            .map(|(k, (d, w))| (k.to_string(), num((d / w.max(1e-30)).sqrt())))
            .collect();
        let line = json!({
            "step": step,
            "grad_norm_per_layer": layer_g.iter().map(|g| num(g.sqrt())).collect::<Vec<_>>(),
            "update_ratio": if updated { serde_json::Value::Object(ratios) } else { serde_json::Value::Null },
            "max_attn_logit_per_layer": self.model.stats.max_attn_logit.iter().map(|&x| num(x as f64)).collect::<Vec<_>>(),
            "residual_rms": self.model.residual_rms().into_iter().map(num).collect::<Vec<_>>(),
            "logit_z_mean": num(self.model.stats.lse_mean as f64),
            "logit_z_max": num(lse_max as f64),
        });
        if let Some(w) = &mut self.telemetry {
            w.write(&line)?;
        }
        if let Some(tb) = &mut self.tb {
            tb.telemetry(&line)?;
        }
        Ok(())
    }

    /// Save a checkpoint (and prune), unless a guard incident is open: then it waits for the
    /// first quiet step, so a rollback target never holds damaged weights.
    pub fn maybe_checkpoint(&mut self, force: bool) -> Result<()> {
        let s = self.state.step;
        let every = self.cfg.checkpoint.every;
        if every > 0 && s.is_multiple_of(every) {
            self.ckpt_pending = true;
        }
        let incident = self.guard.in_incident();
        if !(force || (self.ckpt_pending && !incident)) {
            return Ok(());
        }
        // a save forced inside an incident is no rollback target, and does not settle a
        // regular checkpoint that waits for the incident to close
        self.ckpt_pending &= incident;
        self.state.clean = !incident;
        self.state.checkpoint_pending = self.ckpt_pending;
        let dir = checkpoint::save(
            &self.ck_root,
            &self.model,
            &self.opt.m,
            &self.opt.v,
            &self.state,
            self.ds.tokenizer.as_deref(),
        )?;
        checkpoint::prune(&self.ck_root, self.cfg.checkpoint.keep)?;
        self.event("checkpoint", json!({"path": dir.display().to_string()}))?;
        self.last_ckpt = Some(dir);
        Ok(())
    }
}

/// Prepare the dataset of a run (tokenise or load the cache) with a progress bar.
pub(crate) fn prepare_data(cfg: &RunConfig, out: &Path, progress: bool) -> Result<Dataset> {
    let mc = cfg.model_config().map_err(|e| anyhow::anyhow!("{e}"))?;
    let bar = if progress {
        ProgressBar::new(1)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {percent}%")
            .expect("static template")
            .progress_chars("=> "),
    );
    let ds = data::prepare(
        cfg,
        out,
        mc.vocab_size,
        cfg.seq_len(&mc),
        &mut |what, done, total| {
            bar.set_length(total.max(1));
            bar.set_position(done);
            bar.set_message(what.to_string());
            !INTERRUPTED.load(Ordering::SeqCst)
        },
    )?;
    bar.finish_and_clear();
    Ok(ds)
}

pub fn run(opts: &TrainOptions) -> Result<Summary> {
    let out = &opts.out;
    std::fs::create_dir_all(out)
        .with_context(|| format!("{}: cannot create run directory", out.display()))?;
    let _lock = lock::RunLock::acquire(out)?;
    let Resolved {
        cfg,
        resuming,
        changes,
        previous,
    } = resolve_config(opts)?;
    crate::kernels::init_threads(cfg.train.threads);
    let ck_root = out.join("checkpoints");
    let done = resuming
        .then(|| checkpoint::list(&ck_root).pop())
        .flatten()
        .filter(|(s, _)| *s >= cfg.train.steps);
    if let Some((s, dir)) = done {
        // nothing to train: say so with the run's own figures, and write nothing
        checkpoint::read_state(&dir)?;
        return Ok(Summary::untrained(Outcome::AlreadyComplete, s, Some(dir)));
    }
    // config.toml is written first, so a start killed while reading the data resumes as
    // the command said; a start that fails with an error removes it again, so the
    // corrected command is not refused as a change of the run
    let cfg_path = out.join("config.toml");
    if !resuming {
        checkpoint::write_atomic(&cfg_path, cfg.to_toml().as_bytes())?;
    }
    let ds = match prepare_data(&cfg, out, opts.progress) {
        Ok(ds) => ds,
        Err(e) if e.downcast_ref::<data::Interrupted>().is_some() => {
            // Ctrl-C while reading the data: nothing half-written; the config stays, so
            // the same command (or --out alone) starts it again
            eprintln!("interrupted while preparing the data; run the same command to start again");
            return Ok(Summary::untrained(Outcome::Interrupted, 0, None));
        }
        Err(e) => {
            if !resuming {
                let _ = std::fs::remove_file(&cfg_path);
            }
            return Err(e);
        }
    };
    let unigram = ds.unigram_entropy();
    eprintln!(
        "data: {} — {} train / {} val tokens, unigram entropy {unigram:.3} nats/token",
        ds.description,
        ds.train.len(),
        ds.val.len()
    );
    checkpoint::prune(&ck_root, usize::MAX)?; // clears leftovers of interrupted saves
    let metrics_path = out.join("metrics.jsonl");
    let latest = checkpoint::list(&ck_root).pop().map(|(_, d)| d);
    let resumed_at = match &latest {
        Some(dir) => checkpoint::read_state(dir)?.step,
        None => 0,
    };
    if latest.is_some() {
        log::truncate_after_step(&metrics_path, resumed_at)?;
        log::truncate_after_step(&out.join("telemetry.jsonl"), resumed_at)?;
    } else if resuming || metrics_path.exists() {
        // a run that died before its first checkpoint starts over
        log::truncate_after_step(&metrics_path, 0)?;
        log::truncate_after_step(&out.join("telemetry.jsonl"), 0)?;
    }
    if !changes.is_empty() {
        // the replaced config is kept with the last step it was in force for, so `keel
        // replay` re-runs each step under its own config
        let mut h = JsonlWriter::open(&out.join("config_history.jsonl"))?;
        h.write(&json!({
            "until_step": resumed_at,
            "config": previous.as_ref().map(RunConfig::to_toml),
            "changes": changes.iter().map(|(k, o, n)| json!({"key": k, "old": o, "new": n})).collect::<Vec<_>>(),
        }))?;
        checkpoint::write_atomic(&out.join("config.toml"), cfg.to_toml().as_bytes())?;
        for (k, o, n) in &changes {
            eprintln!("resume: {k} {o} → {n}");
        }
    }
    if latest.is_some() {
        eprintln!("resuming from step {resumed_at} of {}", cfg.train.steps);
    }
    let mut tr = match Trainer::new(cfg.clone(), ds, out, latest.as_deref(), true) {
        Ok(t) => t,
        Err(e) => {
            if !resuming && latest.is_none() {
                let _ = std::fs::remove_file(&cfg_path);
            }
            return Err(e);
        }
    };
    tr.inject = opts.inject.clone();
    if let Some(dir) = &latest {
        tr.event("resume", json!({"checkpoint": dir.display().to_string()}))?;
    }
    if !changes.is_empty() {
        let ch: Vec<_> = changes
            .iter()
            .map(|(k, o, n)| json!({"key": k, "old": o, "new": n}))
            .collect();
        tr.event("config_change", json!({"changes": ch}))?;
    }
    for i in &opts.inject {
        if i.step > tr.state.step {
            tr.event("inject", json!({"kind": i.kind.name(), "at_step": i.step}))?;
        }
    }
    let total = cfg.train.steps;
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
    bar.set_position(tr.state.step);
    let summary = |tr: &Trainer, outcome, diagnosis| Summary {
        outcome,
        steps: tr.state.step,
        checkpoint: tr.last_ckpt.clone(),
        unigram_entropy: unigram,
        diagnosis,
        report: cfg.train.report,
    };
    let end = opts.stop_after.map_or(total, |s| s.min(total));
    while tr.state.step < end {
        let r = tr.step()?;
        let step = r.step;
        for d in &r.detections {
            bar.suspend(|| {
                eprintln!(
                    "guard: step {step} {} {}: {}",
                    d.kind.event_kind(),
                    d.detector,
                    d.reason
                )
            });
        }
        for line in &r.said {
            bar.suspend(|| eprintln!("guard: step {step} → {line}"));
        }
        if let Some(diag) = r.gave_up.or(r.diverged) {
            bar.abandon();
            return Ok(summary(&tr, Outcome::Diverged, Some(diag)));
        }
        bar.set_position(step);
        bar.set_message(format!("loss {:.4} | {:.0} tok/s", r.loss, tr.tps));
        if !opts.progress
            && cfg.train.log_every > 0
            && (step.is_multiple_of(cfg.train.log_every) || step == total || r.val_loss.is_some())
        {
            eprintln!(
                "step {step:>6}/{total}  loss {:.4}  grad_norm {:.3}  lr {:.3e}  {:.0} tok/s{}{}",
                r.loss,
                r.grad_norm,
                r.lr,
                tr.tps,
                r.val_loss
                    .map(|v| format!("  val {v:.4}"))
                    .unwrap_or_default(),
                if r.skipped { "  (skipped)" } else { "" }
            );
        }
        let interrupted = INTERRUPTED.load(Ordering::SeqCst);
        tr.maybe_checkpoint(interrupted || step == end)?;
        if interrupted {
            tr.event("interrupted", json!({}))?;
            bar.abandon();
            return Ok(summary(&tr, Outcome::Interrupted, None));
        }
    }
    bar.finish_and_clear();
    if tr.last_ckpt.is_none() {
        tr.last_ckpt = checkpoint::list(&ck_root).pop().map(|(_, p)| p);
    }
    Ok(summary(&tr, Outcome::Finished, None))
}

pub use crate::monitor::short_factor;

/// One line for a guard action.
pub fn describe(a: &Action) -> String {
    match a {
        Action::Skip => "skipped the update".into(),
        Action::LrBackoff { factor, until_step } if *until_step == u64::MAX => {
            format!("LR × {} from now on", short_factor(*factor))
        }
        Action::LrBackoff { factor, until_step } => {
            format!("LR × {} until step {until_step}", short_factor(*factor))
        }
        Action::LrRestore => "LR restored".into(),
        Action::Rollback { before_step } => {
            format!("rolled back to the newest state before step {before_step}")
        }
        Action::GiveUp { diagnosis } => format!("gave up: {diagnosis}"),
        Action::EarlyRuleOff { reason } => format!("early attention rule off: {reason}"),
        Action::BadBatch { reason, .. } => format!("bad batch: {reason}"),
        Action::LrCap { lr } => format!("LR capped at {lr:.3e} from now on"),
    }
}

/// Mean next-token cross-entropy of the model directory `model` on a token file, in windows of
/// `seq_len` (`keel eval`): (mean CE, windows).
pub fn eval_file(
    model: &Path,
    tokens: &Path,
    seq_len: usize,
    dtype: Option<&str>,
    max_windows: Option<usize>,
) -> Result<(f64, usize)> {
    use crate::data::shard::{Layout, TokenFile};
    if seq_len == 0 {
        bail!("--seq-len must be positive");
    }
    let tf = TokenFile::open(tokens, Layout::for_file(tokens, dtype)?, None)?;
    let mut m = checkpoint::load_model_dir(model, 1, seq_len)?;
    if seq_len > m.cfg.max_seq_len {
        bail!(
            "--seq-len {seq_len} exceeds the model's max_position_embeddings {}",
            m.cfg.max_seq_len
        );
    }
    eval_tokens(&mut m, &tf, seq_len, max_windows)
}

/// Mean next-token cross-entropy of a model on a flat token array, windows as in DESIGN.md:
/// window w has inputs t[wL..wL+L) and targets t[wL+1..wL+L+1), n = (len−1)/L windows.
pub fn eval_tokens(
    model: &mut Model,
    tokens: &data::shard::TokenFile,
    seq: usize,
    max_windows: Option<usize>,
) -> Result<(f64, usize)> {
    eval_range(model, tokens, 0..tokens.len, seq, max_windows)
}

/// `eval_tokens` over the tokens of `range` only (a run's validation split).
pub fn eval_range(
    model: &mut Model,
    tokens: &data::shard::TokenFile,
    range: std::ops::Range<usize>,
    seq: usize,
    max_windows: Option<usize>,
) -> Result<(f64, usize)> {
    let mut n = range.len().saturating_sub(1) / seq;
    if let Some(m) = max_windows {
        n = n.min(m);
    }
    if n == 0 {
        bail!(
            "{}: {} tokens are too few for one window of --seq-len {seq}",
            tokens.path.display(),
            range.len()
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
            let at = range.start + (w + r) * seq;
            tokens.read(at, &mut x[r * seq..(r + 1) * seq]);
            tokens.read(at + 1, &mut y[r * seq..(r + 1) * seq]);
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

/// `keel eval --model RUN_DIR --split val`: the newest checkpoint of a run on its own data's
/// split (`train`, `val` or `all`), at the run's sequence length.
pub struct RunEval {
    pub mean_ce: f64,
    pub windows: usize,
    pub seq_len: usize,
    pub checkpoint: PathBuf,
}

pub fn eval_run(run: &Path, split: &str, max_windows: Option<usize>) -> Result<RunEval> {
    let cfg =
        RunConfig::load(Some(&run.join("config.toml")), &[]).map_err(|e| anyhow::anyhow!("{e}"))?;
    let ck = latest_checkpoint(run).with_context(|| {
        format!(
            "{}: no checkpoint yet; fix: evaluate after the first checkpoint (checkpoint.every)",
            run.display()
        )
    })?;
    let mc = cfg.model_config().map_err(|e| anyhow::anyhow!("{e}"))?;
    let seq = cfg.seq_len(&mc);
    let ds = prepare_data(&cfg, run, false)?;
    let range = match split {
        "val" => ds.val.clone(),
        "train" => ds.train.clone(),
        "all" => 0..ds.tokens.len,
        other => bail!("--split {other}: use val, train or all"),
    };
    if range.is_empty() {
        bail!(
            "{}: the run has no {split} split (data.val_fraction = 0?); fix: --split train",
            run.display()
        );
    }
    let mut m = checkpoint::load_model_dir(&ck, 1, seq)?;
    let (mean_ce, windows) = eval_range(&mut m, &ds.tokens, range, seq, max_windows)?;
    Ok(RunEval {
        mean_ce,
        windows,
        seq_len: seq,
        checkpoint: ck,
    })
}

/// Path helpers for tests and commands.
pub fn latest_checkpoint(run: &Path) -> Option<PathBuf> {
    checkpoint::list(&run.join("checkpoints"))
        .pop()
        .map(|(_, p)| p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn factors_print_short() {
        assert_eq!(short_factor(1.0 / 27.0), "0.037");
        assert_eq!(short_factor(0.5), "0.5");
        assert_eq!(short_factor(1.0 / 3.0), "0.33");
        assert_eq!(short_factor(0.25), "0.25");
        assert_eq!(short_factor(0.0012345), "0.0012");
        let d = describe(&Action::LrBackoff {
            factor: 1.0 / 27.0,
            until_step: u64::MAX,
        });
        assert_eq!(d, "LR × 0.037 from now on");
    }
}
