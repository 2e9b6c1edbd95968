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
    },
    /// Mean next-token cross-entropy of a model on a token file (JSON on stdout)
    Eval {
        /// HF model directory (config.json + model.safetensors), e.g. a checkpoint
        #[arg(long)]
        model: PathBuf,
        /// Token ids: raw uint16/uint32 (by --dtype or a .u16/.u32 suffix) or an llm.c shard
        #[arg(long)]
        tokens: PathBuf,
        /// Window length L: inputs t[wL..wL+L), targets shifted by one
        #[arg(long)]
        seq_len: usize,
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
pub fn run(cli: Cli) -> anyhow::Result<i32> {
    crate::kernels::init_threads(cli.threads);
    match cli.command {
        Command::Train {
            config,
            preset,
            data,
            out,
            steps,
            sets,
        } => cmd_train(config, preset, data, out, steps, sets, cli.threads),
        Command::Eval {
            model,
            tokens,
            seq_len,
            dtype,
            max_windows,
        } => cmd_eval(&model, &tokens, seq_len, dtype.as_deref(), max_windows),
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
            }
            Ok(0)
        }
    }
}

fn quoted(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

fn cmd_train(
    config: Option<PathBuf>,
    preset: Option<String>,
    data: Option<String>,
    out: Option<PathBuf>,
    steps: Option<u64>,
    sets: Vec<String>,
    threads: usize,
) -> anyhow::Result<i32> {
    use crate::train::{Outcome, TrainOptions};
    let explicit = config.is_some()
        || preset.is_some()
        || data.is_some()
        || steps.is_some()
        || !sets.is_empty();
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
        explicit_config: explicit,
        progress,
    })?;
    let status = match s.outcome {
        Outcome::Finished => "finished",
        Outcome::Interrupted => "interrupted (checkpoint saved; resume with the same --out)",
    };
    println!("run {status}: {} steps", s.steps);
    println!("  final train loss   {:.4}", s.final_loss);
    println!(
        "  unigram entropy    {:.4}  (loss of a model that ignores context)",
        s.unigram_entropy
    );
    if let Some(v) = s.best_val_loss {
        println!("  best val loss      {v:.4}");
    }
    println!("  tokens/s (last)    {:.0}", s.tokens_per_s);
    println!("  events             {}", s.events);
    if let Some(c) = &s.checkpoint {
        println!("  checkpoint         {}", c.display());
    }
    println!(
        "  metrics            {}",
        out.join("metrics.jsonl").display()
    );
    Ok(if s.outcome == Outcome::Interrupted {
        3
    } else {
        0
    })
}

fn cmd_eval(
    model: &Path,
    tokens: &Path,
    seq_len: usize,
    dtype: Option<&str>,
    max_windows: Option<usize>,
) -> anyhow::Result<i32> {
    use crate::data::shard::{Layout, TokenDtype, TokenFile};
    if seq_len == 0 {
        anyhow::bail!("--seq-len must be positive");
    }
    let ext = tokens.extension().and_then(|e| e.to_str()).unwrap_or("");
    let layout = match (dtype, ext) {
        (Some("u16") | Some("uint16"), _) => Layout::Raw(TokenDtype::U16),
        (Some("u32") | Some("uint32"), _) => Layout::Raw(TokenDtype::U32),
        (Some(other), _) => anyhow::bail!("--dtype {other}: use u16 or u32"),
        (None, "u16" | "uint16") => Layout::Raw(TokenDtype::U16),
        (None, "u32" | "uint32") => Layout::Raw(TokenDtype::U32),
        (None, _) => Layout::Auto,
    };
    let tf = TokenFile::open(tokens, layout, None)?;
    let mut m = crate::checkpoint::load_model_dir(model, 1, seq_len)?;
    if seq_len > m.cfg.max_seq_len {
        anyhow::bail!(
            "--seq-len {seq_len} exceeds the model's max_position_embeddings {}",
            m.cfg.max_seq_len
        );
    }
    let (ce, n) = crate::train::eval_tokens(&mut m, &tf, seq_len, max_windows)?;
    println!(
        "{}",
        serde_json::json!({"mean_ce": ce, "windows": n, "tokens": n * seq_len})
    );
    Ok(0)
}

fn cmd_sample(
    model: &Path,
    prompt: &str,
    opts: &crate::sample::SampleOptions,
) -> anyhow::Result<i32> {
    let dir = if model.join("config.json").exists() {
        model.to_path_buf()
    } else {
        crate::train::latest_checkpoint(model).ok_or_else(|| {
            anyhow::anyhow!(
                "{}: neither a model directory (config.json) nor a run with checkpoints",
                model.display()
            )
        })?
    };
    let tok_path = dir.join("tokenizer.json");
    if !tok_path.exists() {
        anyhow::bail!(
            "{}: no tokenizer.json; fix: sample from a checkpoint of a run trained on text",
            dir.display()
        );
    }
    let tok = crate::data::tokenizer::Tok::load(&tok_path)?;
    let mut m = crate::checkpoint::load_model_dir(&dir, 1, 32)?;
    let mut ids = tok.encode(prompt)?;
    if ids.is_empty() {
        ids.push(tok.eot.unwrap_or(b'\n' as u32));
    }
    let gen = crate::sample::generate(&mut m, &ids, opts, tok.eot)?;
    let text = tok.decode(&gen)?;
    println!("{prompt}{text}");
    Ok(0)
}
