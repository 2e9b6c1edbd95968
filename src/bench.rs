//! `keel bench`: full training steps (forward, backward, clip, AdamW) on random tokens,
//! timed as in shared/bench/CONFIGS.md, with MFU against a GEMM peak measured in-process.

use crate::config::ModelConfig;
use crate::init::{init_hf_normal, rng::Stream};
use crate::kernels::matmul::measure_peak_flops;
use crate::model::Model;
use crate::optim::{clip_grad_norm, AdamW, OptimConfig};
use serde::Serialize;
use std::time::Instant;

#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub preset: String,
    pub batch: Option<usize>,
    pub seq: Option<usize>,
    pub warmup: usize,
    pub steps: usize,
    pub seed: u64,
}

#[derive(Debug, Serialize)]
pub struct BenchResult {
    pub preset: String,
    pub batch: usize,
    pub seq: usize,
    pub threads: usize,
    pub matmul: &'static str,
    pub params: usize,
    pub tokens_per_step: usize,
    pub tokens_per_s: f64,
    pub step_s_median: f64,
    pub step_s_min: f64,
    pub step_s_max: f64,
    pub flops_per_token: f64,
    pub achieved_gflops: f64,
    pub peak_gflops: f64,
    pub mfu: f64,
    pub first_loss: f32,
    pub last_loss: f32,
    /// Step time with the guard's telemetry (detectors every step; update/weight sums and
    /// per-layer statistics every 10th step) over the step without, minus 1; steps alternate.
    pub telemetry_overhead: f64,
}

/// Default batch per preset, as in CONFIGS.md (tiny 8 × 256, small 4 × 512).
pub fn default_batch(preset: &str) -> usize {
    match preset {
        "small" => 4,
        _ => 8,
    }
}

pub fn run(
    opts: &BenchOptions,
    mut progress: impl FnMut(usize, usize),
) -> anyhow::Result<BenchResult> {
    let cfg = ModelConfig::preset(&opts.preset)?;
    cfg.validate()?;
    let b = opts.batch.unwrap_or_else(|| default_batch(&opts.preset));
    let t = opts.seq.unwrap_or(cfg.max_seq_len);
    if b == 0 || t == 0 {
        anyhow::bail!("--batch and --seq must be positive");
    }
    let mut model = Model::new(&cfg, b, t);
    init_hf_normal(&mut model, opts.seed, 0.02);
    let mut opt = AdamW::new(OptimConfig::default(), &model.layout);
    let s = Stream::new(opts.seed, 0xBE7C);
    let n = b * t;
    let total = opts.warmup + opts.steps;
    let mut times = Vec::with_capacity(opts.steps);
    let mut times_off = Vec::with_capacity(opts.steps);
    let mut monitor = crate::monitor::Monitor::new(Default::default());
    let mut sumsq = vec![0f64; model.layout.specs.len()];
    let (mut first, mut last) = (f32::NAN, f32::NAN);
    let mut tokens = vec![0u32; n];
    let mut targets = vec![0u32; n];
    for step in 0..total {
        for i in 0..n {
            tokens[i] = (s.u64_at((step * 2 * n + i) as u64) % cfg.vocab_size as u64) as u32;
            targets[i] = (s.u64_at((step * 2 * n + n + i) as u64) % cfg.vocab_size as u64) as u32;
        }
        // even steps as `keel train` runs them (telemetry on), odd ones bare
        let tel = step % 2 == 0;
        let t0 = Instant::now();
        model.zero_grad();
        let loss = model.forward(&tokens, &targets)?;
        model.backward(1.0)?;
        // per-layer statistics on every 10th step, as with the default telemetry.every
        let per_layer = tel && step % 20 == 0;
        if per_layer {
            crate::optim::tensor_sumsq(&model.grads, &model.layout, &mut sumsq);
            std::hint::black_box(model.residual_rms());
        }
        let g = clip_grad_norm(&mut model.grads, 1.0);
        opt.track = per_layer;
        opt.update(&mut model.params, &model.grads, 1e-3);
        if tel {
            let d = monitor.observe(&crate::monitor::StepMetrics {
                step: step as u64,
                loss: loss as f64,
                grad_norm: Some(g),
                max_attn_logit: Some(model.stats.max_attn_logit[0] as f64),
                logit_z: Some(model.stats.lse_mean as f64),
                ..Default::default()
            });
            std::hint::black_box((d, opt.update_ratio()));
        }
        let dt = t0.elapsed().as_secs_f64();
        if step == 0 {
            first = loss;
        }
        last = loss;
        if step >= opts.warmup {
            if tel {
                times.push(dt)
            } else {
                times_off.push(dt)
            }
        }
        progress(step + 1, total);
    }
    let peak = measure_peak_flops(1024, 10);
    let median = |t: &mut Vec<f64>| {
        t.sort_by(f64::total_cmp);
        if t.is_empty() {
            f64::NAN
        } else {
            t[t.len() / 2]
        }
    };
    let med_off = median(&mut times_off);
    let med = median(&mut times);
    let tps = n as f64 / med;
    let fpt = cfg.flops_per_token(t);
    Ok(BenchResult {
        preset: opts.preset.clone(),
        batch: b,
        seq: t,
        threads: crate::kernels::num_threads(),
        matmul: crate::kernels::matmul::BACKEND,
        params: cfg.num_params(),
        tokens_per_step: n,
        tokens_per_s: tps,
        step_s_median: med,
        step_s_min: times.first().copied().unwrap_or(f64::NAN),
        step_s_max: times.last().copied().unwrap_or(f64::NAN),
        flops_per_token: fpt,
        achieved_gflops: fpt * tps / 1e9,
        peak_gflops: peak / 1e9,
        mfu: fpt * tps / peak,
        first_loss: first,
        last_loss: last,
        telemetry_overhead: med / med_off - 1.0,
    })
}
