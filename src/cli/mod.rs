//! Command-line interface: parses arguments and calls one command; no logic of its own.

use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Parser, Debug)]
#[command(name = "keel", version, about = "Train LLaMA-architecture language models that stay stable from the first step")]
pub struct Cli {
    /// Worker threads (0 = one per core)
    #[arg(long, global = true, default_value_t = 0)]
    pub threads: usize,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
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
        Command::Bench { preset, steps, warmup, batch, seq, json } => {
            let opts = crate::bench::BenchOptions { preset, batch, seq, warmup, steps, seed: 0 };
            let bar = if json { ProgressBar::hidden() } else { ProgressBar::new((warmup + steps) as u64) };
            bar.set_style(
                ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} steps {elapsed_precise}")
                    .expect("static template")
                    .progress_chars("=> "),
            );
            bar.set_prefix(format!("bench {}", opts.preset));
            let r = crate::bench::run(&opts, |i, _| bar.set_position(i as u64))?;
            bar.finish_and_clear();
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!("keel bench: preset {} (batch {} × seq {}, {} params, {} threads)", r.preset, r.batch, r.seq, r.params, r.threads);
                println!("  tokens/s        {:>10.0}", r.tokens_per_s);
                println!("  step time (s)   median {:.4}  min {:.4}  max {:.4}", r.step_s_median, r.step_s_min, r.step_s_max);
                println!("  FLOPs/token     {:>10.3e}", r.flops_per_token);
                println!("  achieved        {:>10.1} GFLOP/s", r.achieved_gflops);
                println!("  GEMM peak       {:>10.1} GFLOP/s (f32 1024³, measured now)", r.peak_gflops);
                println!("  MFU             {:>10.1} %", 100.0 * r.mfu);
                println!("  loss            {:.4} → {:.4}", r.first_loss, r.last_loss);
            }
            Ok(0)
        }
    }
}
