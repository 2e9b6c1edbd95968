//! Command-line interface: parses arguments and calls one command; no logic of its own.

use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

#[derive(Parser, Debug)]
#[command(
    name = "keel",
    version,
    about = "Train LLaMA-architecture language models that stay stable from the first step"
)]
pub struct Cli {
    /// Worker threads (0 = one per core)
    #[arg(long, global = true, default_value_t = 0)]
    pub threads: usize,
    /// Refuse work that would allocate more than this (e.g. 8G; default: the memory
    /// available to the process)
    #[arg(long, global = true, value_name = "SIZE", value_parser = crate::config::memory::parse_size)]
    pub max_memory: Option<u64>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Train a model (no arguments: the tiny preset on the built-in corpus, a few minutes)
    Train {
        /// Run configuration (TOML: [model] [init] [data] [train] [optim] [schedule] ...)
        #[arg(long)]
        config: Option<PathBuf>,
        /// Model preset: micro, tiny, small
        #[arg(long)]
        preset: Option<String>,
        /// Training data: text file or folder, .jsonl, .parquet, or a token shard (.bin)
        #[arg(long)]
        data: Option<String>,
        /// Run directory (an existing one is resumed from its newest checkpoint)
        #[arg(long)]
        out: Option<PathBuf>,
        /// Number of optimizer steps (same as --set train.steps=N)
        #[arg(long)]
        steps: Option<u64>,
        /// Override any config key: --set optim.lr=3e-4 (repeatable)
        #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
        sets: Vec<String>,
        /// Inject a fault to see the guard work: nan@STEP, spike@STEP (a 100× update) or
        /// bad-batch@STEP (repeated junk tokens); repeatable
        #[arg(long, value_name = "KIND@STEP")]
        inject: Vec<crate::train::Injection>,
    },
    /// Run the guard's detectors over any trainer's metrics log; exit 2 on a divergence the
    /// trainer did not handle, so it can stop a job as a sidecar (exit 1 on bad input)
    Watch {
        /// Metrics file: JSON lines (Python's NaN/Infinity included), CSV with a header row,
        /// an HF trainer_state.json, a text log of `name: value` pairs (nanoGPT, torchtitan,
        /// Megatron), or TensorBoard events (an events.out.tfevents.* file, or a log
        /// directory: its newest run, new files included with --follow). A keel run
        /// directory reads its metrics.jsonl. Common field and tag names are recognised
        /// (loss, train/loss, train_loss, lm loss; step, iter, global_step; grad_norm,
        /// gnorm, grad norm, grad-norm)
        file: PathBuf,
        /// Keep reading as the file grows (until divergence or Ctrl-C)
        #[arg(long)]
        follow: bool,
        /// One JSON event per line: step, kind, detector, value, threshold
        #[arg(long)]
        json: bool,
        /// Field names in the log, as NAME=FIELD: step, loss, grad_norm, max_attn_logit,
        /// logit_z (e.g. --field loss=train/loss --field grad_norm=grad_norm)
        #[arg(long = "field", value_name = "NAME=FIELD")]
        fields: Vec<String>,
        /// Detector thresholds: --set guard.loss_z=5 (keys of the [guard] section)
        #[arg(long = "set", value_name = "guard.KEY=VALUE")]
        sets: Vec<String>,
        /// The guarded trainer's events log (default: events.jsonl or keel-events.jsonl
        /// beside the file): rows it skipped stay out of the windows, and a divergence it
        /// rolled back from is reported as handled, not as exit 2
        #[arg(long, value_name = "EVENTS_JSONL")]
        events: Option<PathBuf>,
    },
    /// Re-run one recorded training step (same weights, same batch) and say whether its loss
    /// and gradient reproduce: data and numerics, or nondeterminism and faults
    Replay {
        /// Run directory of `keel train`
        #[arg(long)]
        run: PathBuf,
        /// The step to re-run (as numbered in metrics.jsonl)
        #[arg(long)]
        step: u64,
        #[arg(long)]
        json: bool,
    },
    /// Write a freshly initialised HF model directory; --explain prints the per-tensor plan
    Init {
        /// Model preset (micro, tiny, small, llama2-7b, ...)
        #[arg(long, conflicts_with = "hf")]
        preset: Option<String>,
        /// An HF config.json to take the shape from
        #[arg(long)]
        hf: Option<PathBuf>,
        /// Scheme: xavier-uniform, xavier-normal, kaiming-uniform, kaiming-normal, lecun-normal,
        /// normal, trunc-normal, depth-scaled, megatron, small-init, wang, mitchell, deepnorm,
        /// mup, orthogonal
        #[arg(long = "init", default_value = "normal")]
        scheme: String,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Output directory (config.json + model.safetensors); optional with --explain
        #[arg(long)]
        out: Option<PathBuf>,
        /// Print the table: tensor, role, shape, fans, formula, target σ, depth scaling
        #[arg(long)]
        explain: bool,
        /// Scheme parameters: --set init.gain=0.5, --set init.roles.head.std=0.001
        #[arg(long = "set", value_name = "init.KEY=VALUE")]
        sets: Vec<String>,
    },
    /// Signal propagation before training: theory vs measurement per layer and gates for a
    /// config and init (any size: large ones on a proxy); --model audits saved weights.
    /// Exit 4 on a FAIL
    Check {
        #[command(flatten)]
        probe: crate::probe::cli::ProbeArgs,
        /// Audit instead: an HF model directory's weights against the scheme (exit 4 on a FAIL)
        #[arg(long, conflicts_with_all = ["preset", "hf"])]
        model: Option<PathBuf>,
        /// With --model: print every tensor, not only those with findings
        #[arg(long)]
        all: bool,
    },
    /// Stability sweep on small proxies: LR × init × depth/width grids, each trial a run
    /// directory; LR sensitivity, stability maps and a recommendation.
    /// `keel sweep collect DIR` gathers trials run elsewhere (after --emit)
    Sweep(SweepArgs),
    /// Write DIR/report.html (self-contained, opens offline) and DIR/plots/ for a run, a
    /// sweep or a `keel check --out` directory
    Report {
        /// The directory of keel train, keel sweep or keel check --out, the Python run
        /// logger's directory, or a TensorBoard log directory; several runs (with --out)
        /// are drawn on one page
        #[arg(required = true, num_args = 1..)]
        dirs: Vec<PathBuf>,
        /// Where to write the comparison page of several runs (report.html and plots/), or
        /// an Optuna study's sweep directory
        #[arg(long)]
        out: Option<PathBuf>,
        /// The study's name, when an Optuna storage (sqlite:///study.db, a .db file or any
        /// RDB URL) holds several
        #[arg(long)]
        study: Option<String>,
    },
    /// Mean next-token cross-entropy of a model on a token file (JSON on stdout)
    Eval {
        /// A run directory (its newest checkpoint on its own data), or an HF model directory
        /// (config.json + model.safetensors, e.g. a checkpoint) with --tokens and --seq-len
        #[arg(long)]
        model: PathBuf,
        /// Token ids: raw uint16/uint32 (by --dtype or a .u16/.u32 suffix) or an llm.c shard
        #[arg(long)]
        tokens: Option<PathBuf>,
        /// Window length L: inputs t[wL..wL+L), targets shifted by one (a run: its own)
        #[arg(long)]
        seq_len: Option<usize>,
        /// With a run directory: val (default), train or all of the run's tokens
        #[arg(long)]
        split: Option<String>,
        /// Token dtype of a raw file: u16 or u32
        #[arg(long)]
        dtype: Option<String>,
        /// Evaluate at most N windows
        #[arg(long)]
        max_windows: Option<usize>,
    },
    /// Generate text from a model directory or run directory
    Sample {
        /// Model directory with tokenizer.json (a checkpoint), or a run directory
        #[arg(long)]
        model: PathBuf,
        /// Text to continue
        #[arg(long, default_value = "")]
        prompt: String,
        #[arg(long, default_value_t = 200)]
        max_new_tokens: usize,
        /// Softmax temperature (0 = greedy)
        #[arg(long, default_value_t = 0.8)]
        temperature: f32,
        /// Sample among the k most likely tokens (0 = all)
        #[arg(long, default_value_t = 40)]
        top_k: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Time full training steps on random tokens: tokens/s, step time and MFU
    Bench {
        /// Model preset (micro, tiny, small)
        #[arg(long, default_value = "tiny")]
        preset: String,
        /// Timed steps (after warm-up)
        #[arg(long, default_value_t = 20)]
        steps: usize,
        /// Untimed warm-up steps
        #[arg(long, default_value_t = 5)]
        warmup: usize,
        /// Batch size (default: 8 for tiny, 4 for small, as in shared/bench/CONFIGS.md)
        #[arg(long)]
        batch: Option<usize>,
        /// Sequence length (default: the preset's)
        #[arg(long)]
        seq: Option<usize>,
        /// Print one JSON object instead of a table
        #[arg(long)]
        json: bool,
    },
}

/// Run the parsed command; returns the process exit code.
#[derive(clap::Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct SweepArgs {
    #[command(subcommand)]
    pub cmd: Option<SweepCmd>,
    /// The sweep file: [base] run config, [axes] (keys → value lists or
    /// { log = [lo, hi], points = n }), [sweep] settings
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Sweep directory (default runs/sweep-<config name>); rerun the same command to resume
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Trials run at the same time; the threads (--threads, default all cores) are split
    #[arg(long, default_value_t = 1)]
    pub jobs: usize,
    /// Write the trials out instead of running them: a Slurm array job, or a command list
    #[arg(long, value_enum)]
    pub emit: Option<crate::sweep::run::Emit>,
    #[command(flatten)]
    pub target: TargetArgs,
}

#[derive(clap::Args, Debug)]
pub struct TargetArgs {
    /// Where to extrapolate the optimal-LR, max-stable-LR and attention-logit trends: a width,
    /// or an HF config.json (its width and depth; any size, nothing is allocated)
    #[arg(long = "target", value_name = "WIDTH|CONFIG_JSON")]
    pub target: Option<String>,
    /// The same as --target CONFIG_JSON
    #[arg(long, value_name = "CONFIG_JSON", conflicts_with = "target")]
    pub hf: Option<PathBuf>,
}

impl TargetArgs {
    fn target(&self) -> anyhow::Result<crate::sweep::analysis::Target> {
        use crate::sweep::analysis::Target;
        let path = match (&self.hf, &self.target) {
            (Some(h), _) => Some(h.clone()),
            (None, Some(t)) if t.parse::<usize>().is_err() => Some(PathBuf::from(t)),
            _ => None,
        };
        if let Some(h) = path {
            let mc = crate::config::ModelConfig::from_hf_json(&h).map_err(|e| {
                anyhow::anyhow!(
                    "--target {}: {e} (give a width, e.g. --target 4096, or an HF config.json)",
                    h.display()
                )
            })?;
            return Ok(Target {
                width: Some(mc.hidden_size),
                depth: Some(mc.num_layers),
                source: h.display().to_string(),
            });
        }
        let width = self.target.as_deref().and_then(|t| t.parse::<usize>().ok());
        if width == Some(0) {
            anyhow::bail!("--target 0: the target width must be positive");
        }
        Ok(Target {
            width,
            depth: None,
            source: if width.is_some() {
                "--target".into()
            } else {
                String::new()
            },
        })
    }
}

#[derive(Subcommand, Debug)]
pub enum SweepCmd {
    /// Gather the trials' results (run anywhere) into results.jsonl/csv, summary.json, plots
    Collect {
        /// The sweep directory (`keel sweep --emit` wrote it)
        dir: PathBuf,
        #[command(flatten)]
        target: TargetArgs,
    },
}

fn cmd_sweep(a: SweepArgs, threads: usize) -> anyhow::Result<i32> {
    if let Some(SweepCmd::Collect { dir, target }) = a.cmd {
        return crate::sweep::run::collect(&dir, &target.target()?);
    }
    let Some(config) = a.config else {
        anyhow::bail!("keel sweep needs --config sweep.toml (or `keel sweep collect DIR`); see `keel sweep --help` and docs/sweep.md");
    };
    let out = a.out.unwrap_or_else(|| {
        let stem = config
            .file_stem()
            .map_or("sweep".into(), |s| s.to_string_lossy().to_string());
        PathBuf::from(format!("runs/sweep-{stem}"))
    });
    crate::sweep::run::run(&crate::sweep::run::SweepOptions {
        config,
        out,
        jobs: a.jobs,
        threads,
        emit: a.emit,
        target: a.target.target()?,
        progress: std::io::stderr().is_terminal(),
    })
}

pub fn run(cli: Cli) -> anyhow::Result<i32> {
    crate::kernels::init_threads(cli.threads);
    if let Some(m) = cli.max_memory {
        crate::config::memory::set_limit(m);
    }
    match cli.command {
        Command::Train {
            config,
            preset,
            data,
            out,
            steps,
            sets,
            inject,
        } => cmd_train(config, preset, data, out, steps, sets, inject, cli.threads),
        Command::Watch {
            file,
            follow,
            json,
            fields,
            sets,
            events,
        } => crate::watch::cmd_watch(crate::watch::WatchArgs {
            file: &file,
            follow,
            json,
            fields: &fields,
            sets: &sets,
            events: events.as_deref(),
        }),
        Command::Replay { run, step, json } => crate::train::replay::cmd_replay(&run, step, json),
        Command::Init {
            preset,
            hf,
            scheme,
            seed,
            out,
            explain,
            sets,
        } => cmd_init(preset, hf, &scheme, seed, out, explain, &sets),
        Command::Sweep(a) => cmd_sweep(a, cli.threads),
        Command::Report { dirs, out, study } => {
            if dirs.len() == 1 && crate::report::optuna::is_storage(&dirs[0]) {
                let p = crate::report::optuna::report(&dirs[0], study.as_deref(), out.as_deref())?;
                println!("report: {}", p.display());
                return Ok(0);
            }
            let p = match (dirs.len(), out) {
                (1, None) => crate::report::write(&dirs[0])?,
                (_, Some(out)) => crate::report::compare::write(&dirs, &out)?,
                (_, None) => anyhow::bail!(
                    "keel report: {} runs given and no --out; fix: keel report {} --out compare/ (a comparison page needs a directory of its own)",
                    dirs.len(),
                    dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(" ")
                ),
            };
            println!("report: {}", p.display());
            Ok(0)
        }
        Command::Check { probe, model, all } => match model {
            Some(m) => cmd_check(&m, &probe.scheme, &probe.sets, probe.json, all),
            None => crate::probe::cli::cmd_probe(&probe),
        },
        Command::Eval {
            model,
            tokens,
            seq_len,
            split,
            dtype,
            max_windows,
        } => cmd_eval(
            &model,
            tokens.as_deref(),
            seq_len,
            split.as_deref(),
            dtype.as_deref(),
            max_windows,
        ),
        Command::Sample {
            model,
            prompt,
            max_new_tokens,
            temperature,
            top_k,
            seed,
        } => {
            let opts = crate::sample::SampleOptions {
                max_new_tokens,
                temperature,
                top_k,
                seed,
            };
            cmd_sample(&model, &prompt, &opts)
        }
        Command::Bench {
            preset,
            steps,
            warmup,
            batch,
            seq,
            json,
        } => {
            let opts = crate::bench::BenchOptions {
                preset,
                batch,
                seq,
                warmup,
                steps,
                seed: 0,
            };
            let bar = if json {
                ProgressBar::hidden()
            } else {
                ProgressBar::new((warmup + steps) as u64)
            };
            bar.set_style(
                ProgressStyle::with_template(
                    "{prefix} [{bar:30}] {pos}/{len} steps {elapsed_precise}",
                )
                .expect("static template")
                .progress_chars("=> "),
            );
            bar.set_prefix(format!("bench {}", opts.preset));
            let r = crate::bench::run(&opts, |i, _| bar.set_position(i as u64))?;
            bar.finish_and_clear();
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "keel bench: preset {} (batch {} × seq {}, {} params, {} threads, matmul {})",
                    r.preset, r.batch, r.seq, r.params, r.threads, r.matmul
                );
                println!("  tokens/s        {:>10.0}", r.tokens_per_s);
                println!(
                    "  step time (s)   median {:.4}  min {:.4}  max {:.4}",
                    r.step_s_median, r.step_s_min, r.step_s_max
                );
                println!("  FLOPs/token     {:>10.3e}", r.flops_per_token);
                println!("  achieved        {:>10.1} GFLOP/s", r.achieved_gflops);
                println!(
                    "  GEMM peak       {:>10.1} GFLOP/s (f32 1024³, measured now)",
                    r.peak_gflops
                );
                println!("  MFU             {:>10.1} %", 100.0 * r.mfu);
                println!("  loss            {:.4} → {:.4}", r.first_loss, r.last_loss);
                println!(
                    "  telemetry cost  {:>+10.1} % of step time (guard statistics on vs off)",
                    100.0 * r.telemetry_overhead
                );
            }
            Ok(0)
        }
    }
}

/// A string as a TOML value, for building `--set` assignments.
pub(crate) fn quoted(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

#[allow(clippy::too_many_arguments)] // one per CLI flag
fn cmd_train(
    config: Option<PathBuf>,
    preset: Option<String>,
    data: Option<String>,
    out: Option<PathBuf>,
    steps: Option<u64>,
    sets: Vec<String>,
    inject: Vec<crate::train::Injection>,
    threads: usize,
) -> anyhow::Result<i32> {
    use crate::train::{Outcome, TrainOptions};
    let mut all = Vec::new();
    if let Some(p) = &preset {
        all.push(format!("model.preset={}", quoted(p)));
    }
    if let Some(d) = &data {
        all.push(format!("data.path={}", quoted(d)));
    }
    if let Some(n) = steps {
        all.push(format!("train.steps={n}"));
    }
    if threads > 0 {
        all.push(format!("train.threads={threads}"));
    }
    all.extend(sets);
    let cfg = crate::config::RunConfig::load(config.as_deref(), &all)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let out = out.unwrap_or_else(|| {
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        PathBuf::from(format!("runs/train-{secs}"))
    });
    crate::train::install_interrupt_handler();
    let progress = std::io::stderr().is_terminal();
    eprintln!("keel train → {}", out.display());
    let s = crate::train::run(&TrainOptions {
        config: cfg,
        out: out.clone(),
        config_file: config,
        overrides: all,
        progress,
        inject,
        stop_after: None,
    })?;
    let status = match s.outcome {
        Outcome::Finished => "finished".to_string(),
        Outcome::Interrupted if s.checkpoint.is_none() && s.steps == 0 => {
            "interrupted before the first step (nothing trained, nothing half-written; run the same command to start again)".into()
        }
        Outcome::Interrupted => "interrupted (checkpoint saved; resume with the same --out)".into(),
        Outcome::Diverged => "diverged (see the diagnosis)".into(),
        Outcome::AlreadyComplete => format!(
            "already complete at step {} (nothing trained; raise --steps to train on)",
            s.steps
        ),
    };
    // one set of figures, read back from the run's logs: the report shows the same ones
    let fig = crate::train::figures_of(&out);
    println!("run {status}: {} steps", fig.steps.max(s.steps));
    for (label, value) in fig.rows() {
        println!("  {label:<30} {value}");
    }
    if s.unigram_entropy.is_finite() {
        println!(
            "  {:<30} {:.4}",
            "unigram entropy (no context)", s.unigram_entropy
        );
    }
    if let Some(c) = &s.checkpoint {
        println!("  {:<30} {}", "checkpoint", c.display());
    }
    println!(
        "  {:<30} {}",
        "metrics",
        out.join("metrics.jsonl").display()
    );
    if s.report {
        match crate::report::write(&out) {
            Ok(p) => println!("  {:<30} {}", "report", p.display()),
            Err(e) => eprintln!("note: the report could not be written: {e:#}"),
        }
    }
    if let Some(d) = &s.diagnosis {
        println!("  {:<30} {d}", "diagnosis");
        println!("  {:<30} {}", "events", out.join("events.jsonl").display());
    }
    Ok(match s.outcome {
        Outcome::Finished | Outcome::AlreadyComplete => 0,
        Outcome::Diverged => 2,
        Outcome::Interrupted => 3,
    })
}

fn cmd_eval(
    model: &Path,
    tokens: Option<&Path>,
    seq_len: Option<usize>,
    split: Option<&str>,
    dtype: Option<&str>,
    max_windows: Option<usize>,
) -> anyhow::Result<i32> {
    if model.join("config.toml").exists() && tokens.is_none() {
        // a run directory: its newest checkpoint on its own split
        let split = split.unwrap_or("val");
        let r = crate::train::eval_run(model, split, max_windows)?;
        println!(
            "{}",
            serde_json::json!({"mean_ce": r.mean_ce, "perplexity": r.mean_ce.exp(),
                "windows": r.windows, "tokens": r.windows * r.seq_len, "split": split,
                "checkpoint": r.checkpoint.display().to_string()})
        );
        return Ok(0);
    }
    if split.is_some() {
        anyhow::bail!("--split takes a run directory as --model (one with config.toml)");
    }
    let (Some(tokens), Some(seq_len)) = (tokens, seq_len) else {
        anyhow::bail!(
            "{}: not a run directory; fix: give a run directory, or --tokens FILE and --seq-len L with a model directory",
            model.display()
        );
    };
    let (ce, n) = crate::train::eval_file(model, tokens, seq_len, dtype, max_windows)?;
    println!(
        "{}",
        serde_json::json!({"mean_ce": ce, "perplexity": ce.exp(), "windows": n, "tokens": n * seq_len})
    );
    Ok(0)
}

fn cmd_sample(
    model: &Path,
    prompt: &str,
    opts: &crate::sample::SampleOptions,
) -> anyhow::Result<i32> {
    let text = crate::sample::from_dir(model, prompt, opts)?;
    println!("{prompt}{text}");
    Ok(0)
}

fn print_plan(plans: &[crate::init::TensorPlan]) {
    println!(
        "{:<44} {:<9} {:>12} {:>7} {:>7}  {:>10} {:<14} formula",
        "tensor", "role", "shape", "fan_in", "fan_out", "target σ", "depth scaling"
    );
    for p in plans {
        let shape = p
            .shape
            .iter()
            .map(|x| x.to_string())
            .collect::<Vec<_>>()
            .join("×");
        let bound = p
            .dist
            .bound()
            .map(|b| format!(" (|w| ≤ {b:.3e})"))
            .unwrap_or_default();
        println!(
            "{:<44} {:<9} {:>12} {:>7} {:>7}  {:>10.3e} {:<14} {}{}",
            p.name,
            p.role,
            shape,
            p.fan_in,
            p.fan_out,
            p.target_std,
            if p.depth_scaling.is_empty() {
                "-"
            } else {
                &p.depth_scaling
            },
            p.formula,
            bound
        );
    }
}

/// The file `keel init --out` writes beside the weights: scheme, seed and options.
const INIT_RECORD: &str = "keel_init.json";

fn cmd_init(
    preset: Option<String>,
    hf: Option<PathBuf>,
    scheme: &str,
    seed: u64,
    out: Option<PathBuf>,
    explain: bool,
    sets: &[String],
) -> anyhow::Result<i32> {
    use crate::config::ModelConfig;
    let cfg = match (&preset, &hf) {
        (_, Some(h)) => ModelConfig::from_hf_json(h),
        (Some(p), None) => ModelConfig::preset(p),
        (None, None) => anyhow::bail!("give --preset P or --hf config.json"),
    }
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let ic = crate::init::section(scheme, seed, sets)?;
    let raw = cfg;
    let (cfg, plans) = crate::init::explain(&raw, &ic).map_err(|e| anyhow::anyhow!("{e}"))?;
    if explain {
        print_plan(&plans);
        if !cfg.is_plain_llama() {
            println!(
                "model variant implied by {scheme}: attention scale {}, logit scale {:.4}, residual α {:.4} (recorded in config.json as keel_* keys; transformers ignores them)",
                cfg.attn_scale.map(|a| format!("{a:.4}")).unwrap_or_else(|| "1/√d_head".into()),
                cfg.logit_scale,
                cfg.residual_scale
            );
        }
        if scheme == "mup" {
            let m = crate::init::lr_multiplier(&ic, &cfg, crate::model::Role::AttnQ);
            println!("AdamW learning rate × {m:.4} on hidden and readout matrices (μP), × 1 on embeddings and norms");
        }
    }
    let Some(out) = out else {
        if explain {
            return Ok(0);
        }
        anyhow::bail!("give --out DIR (or --explain to only print the plan)");
    };
    let model = crate::init::initialized(&raw, &ic)?;
    crate::checkpoint::write_model_dir(&model, &out)?;
    // what wrote these weights, so `keel check --model` audits against it, not a guess
    let record = serde_json::json!({
        "scheme": scheme, "seed": seed, "sets": sets, "init": ic,
        "written_by": format!("keel {}", env!("CARGO_PKG_VERSION")),
    });
    crate::checkpoint::write_atomic(
        &out.join(INIT_RECORD),
        serde_json::to_string_pretty(&record)?.as_bytes(),
    )?;
    eprintln!(
        "wrote {} ({} parameters, init {scheme}, seed {seed})",
        out.display(),
        cfg.num_params()
    );
    Ok(0)
}

fn cmd_check(
    model: &Path,
    scheme: &str,
    sets: &[String],
    json: bool,
    all: bool,
) -> anyhow::Result<i32> {
    use crate::init::audit::{audit_model, without_guesses, worst, Verdict};
    // the options the weights were written with, when `keel init` recorded them
    let rec_path = model.join(INIT_RECORD);
    let record: Option<serde_json::Value> = std::fs::read_to_string(&rec_path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok());
    let rec_scheme = record
        .as_ref()
        .and_then(|r| r["scheme"].as_str().map(str::to_string));
    let mut notes = Vec::new();
    let (ic, known) = match (&record, &rec_scheme) {
        (Some(r), Some(rs)) if rs == scheme => {
            let mut all: Vec<String> = r["sets"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|s| s.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default();
            all.extend(sets.iter().cloned());
            notes.push(format!(
                "options from {}: seed {}{}",
                rec_path.display(),
                r["seed"],
                if all.is_empty() {
                    String::new()
                } else {
                    format!(", {}", all.join(" "))
                }
            ));
            (
                crate::init::section(scheme, r["seed"].as_u64().unwrap_or(0), &all)?,
                true,
            )
        }
        (_, Some(rs)) => {
            notes.push(format!(
                "{} was initialised with {rs} ({}); auditing against {scheme} as asked (--init {rs} audits against what was written)",
                model.display(),
                rec_path.display()
            ));
            (crate::init::section(scheme, 0, sets)?, !sets.is_empty())
        }
        _ => (crate::init::section(scheme, 0, sets)?, !sets.is_empty()),
    };
    let m = crate::checkpoint::load_model_dir(model, 1, 1)?;
    let mut audits = audit_model(&m, &ic).map_err(|e| anyhow::anyhow!("{e}"))?;
    if !known {
        notes.push(format!(
            "no record of the options these weights were written with ({} absent): findings \
             compare with {scheme}'s defaults",
            rec_path.display()
        ));
        if let Some(f) = without_guesses(&mut audits) {
            notes.push(f);
        }
    }
    let worst = worst(&audits);
    if json {
        for a in &audits {
            println!("{}", serde_json::to_string(a)?);
        }
    } else {
        println!("init audit of {} against {scheme}", model.display());
        for n in &notes {
            println!("  note: {n}");
        }
        println!(
            "{:<44} {:<9} {:>10} {:>10} {:>6} {:>9} {:>7} {:>7}  verdict",
            "tensor", "role", "std", "target", "ratio", "max/σ", "kurt", "@bound"
        );
        for a in audits.iter().filter(|a| all || a.verdict != Verdict::Pass) {
            let ratio = if a.target_std > 0.0 {
                a.std / a.target_std
            } else {
                f64::NAN
            };
            println!(
                "{:<44} {:<9} {:>10.3e} {:>10.3e} {:>6.3} {:>9.2} {:>7.2} {:>6.2}%  {}",
                a.name,
                a.role,
                a.std,
                a.target_std,
                ratio,
                a.max_over_sigma,
                a.excess_kurtosis,
                100.0 * a.frac_at_bound,
                a.verdict.label()
            );
            for r in &a.reasons {
                println!("    {}: {r}", a.verdict.label());
            }
        }
        let count = |v: Verdict| audits.iter().filter(|a| a.verdict == v).count();
        println!(
            "{} tensors: {} PASS, {} WARN, {} FAIL",
            audits.len(),
            count(Verdict::Pass),
            count(Verdict::Warn),
            count(Verdict::Fail)
        );
    }
    Ok(if worst == Verdict::Fail { 4 } else { 0 })
}
