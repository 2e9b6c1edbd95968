//! `keel check` (signal propagation): argument handling and the terminal table.

use super::{check, CheckOptions, CheckReport};
use crate::cli::quoted;
use crate::config::RunConfig;
use crate::init::audit::Verdict;
use anyhow::Result;
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args, Debug)]
pub struct ProbeArgs {
    /// Model preset to check (default: tiny)
    #[arg(long, conflicts_with = "hf")]
    pub preset: Option<String>,
    /// An HF config.json (e.g. a 70B Llama): theory at full size, measurement on a
    /// width-reduced proxy of the same depth
    #[arg(long)]
    pub hf: Option<PathBuf>,
    /// A run configuration (TOML) to take model, init and optim from
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Init scheme, or `all` for every scheme side by side
    #[arg(long = "init", default_value = "normal")]
    pub scheme: String,
    /// Override config keys: --set init.std=0.01 --set model.num_layers=48 --set optim.lr=3e-3
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    pub sets: Vec<String>,
    /// Batch of the measurement
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    /// Sequence length of the measurement
    #[arg(long, default_value_t = 128)]
    pub seq: usize,
    /// Also run this many optimizer steps (update/weight ratios, logit growth)
    #[arg(long, default_value_t = 1)]
    pub steps: usize,
    /// Learning rate for the steps (default: optim.lr)
    #[arg(long)]
    pub lr: Option<f64>,
    /// Measure a proxy of about this width for models over 60M parameters
    #[arg(long, default_value_t = 256)]
    pub proxy_width: usize,
    /// μP coordinate check: activation size vs width over the first steps (--steps, 5 by
    /// default; --lr, 1e-2 by default), standard parametrisation against μP
    #[arg(long)]
    pub coord_check: bool,
    /// Measure on real tokens: an llm.c shard or raw .u16/.u32 token file (default: random)
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Widths for --coord-check (multiples of 8)
    #[arg(long, value_delimiter = ',', default_value = "64,128,256,512")]
    pub widths: Vec<usize>,
    /// Directory for plots (SVG and PNG) and check.json
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// One JSON object instead of the table
    #[arg(long)]
    pub json: bool,
    /// Track the sharpness over the first steps of the run as configured (its data, schedule
    /// and optimizer; --lr to change the peak LR): λ_max of Adam's preconditioned Hessian every
    /// --sharpness-every steps and the LR at Adam's edge of stability, 38/λ at β₁ = 0.9
    /// (measured: not where training diverges; see docs/check.md#sharpness)
    #[arg(long)]
    pub sharpness: bool,
    /// Beside the verdict, the edge-of-stability LR for this config and optimizer from a short
    /// run's sharpness, with its cost and its measured accuracy (it does not predict the max
    /// stable LR; keel sweep's scaling fit does)
    #[arg(long)]
    pub lr_edge: bool,
    /// Steps of the short run for --sharpness / --lr-edge
    #[arg(long, default_value_t = 30)]
    pub sharpness_steps: u64,
    /// Measure every N steps of the short run
    #[arg(long, default_value_t = 5)]
    pub sharpness_every: u64,
    /// Most Hessian-vector products per eigenvalue (Lanczos)
    #[arg(long, default_value_t = 20)]
    pub sharpness_iters: usize,
    /// Also λ_max of the plain Hessian (doubles the probe's cost)
    #[arg(long)]
    pub sharpness_hessian: bool,
}

/// Resolve the run configuration for one scheme.
fn resolve(a: &ProbeArgs, scheme: &str) -> Result<RunConfig> {
    let mut sets = Vec::new();
    if let Some(p) = &a.preset {
        sets.push(format!("model.preset={}", quoted(p)));
    }
    if let Some(h) = &a.hf {
        sets.push(format!(
            "model.hf_config={}",
            quoted(&h.display().to_string())
        ));
    }
    if scheme != "(config)" {
        sets.push(format!("init.scheme={}", quoted(scheme)));
    }
    sets.extend(a.sets.iter().cloned());
    RunConfig::parse(a.config.as_deref(), &sets).map_err(|e| anyhow::anyhow!("{e}"))
}

fn options(a: &ProbeArgs, rc: &RunConfig) -> CheckOptions {
    let mut optim = rc.optim.clone();
    if let Some(lr) = a.lr {
        optim.lr = lr;
    }
    CheckOptions {
        batch: a.batch.max(1),
        seq: a.seq.max(2),
        seed: rc.train.seed,
        steps: a.steps.max(1),
        optim,
        proxy_width: a.proxy_width.max(16),
        ..Default::default()
    }
}

fn open_data(a: &ProbeArgs) -> Result<Option<std::sync::Arc<crate::data::shard::TokenFile>>> {
    use crate::data::shard::{Layout, TokenFile};
    let Some(p) = &a.data else { return Ok(None) };
    let layout = Layout::for_file(p, None)?;
    Ok(Some(std::sync::Arc::new(TokenFile::open(p, layout, None)?)))
}

fn run_one(a: &ProbeArgs, scheme: &str) -> Result<CheckReport> {
    let rc = resolve(a, scheme)?;
    let mc = rc.model_config().map_err(|e| anyhow::anyhow!("{e}"))?;
    mc.validate()?;
    crate::init::check_scheme(&rc.init.scheme).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut o = options(a, &rc);
    o.data = open_data(a)?;
    // say what is happening before the work (a 70B proxy takes ~20 s here)
    eprintln!(
        "keel check: {scheme}: {} layers, width {}, vocab {}{}; theory, then a forward/backward pass and {} step(s)…",
        mc.num_layers,
        mc.hidden_size,
        mc.vocab_size,
        if mc.num_params() > o.proxy_above_params {
            format!(", measured on a width-{} proxy", o.proxy_width)
        } else {
            String::new()
        },
        o.steps.max(1)
    );
    check(&mc, &rc.init, &o)
}

fn f(x: f64) -> String {
    if x == 0.0 {
        "0".into()
    } else if !(1e-3..1e4).contains(&x.abs()) {
        format!("{x:.2e}")
    } else {
        format!("{x:.4}")
    }
}

/// Rows to show for a deep model: all up to 12 layers, else a spread including both ends.
fn shown_layers(l: usize) -> Vec<usize> {
    if l <= 12 {
        (0..l).collect()
    } else {
        let mut v: Vec<usize> = (0..10).map(|i| i * (l - 1) / 9).collect();
        v.dedup();
        v
    }
}

pub fn print_report(r: &CheckReport, elapsed: f64) {
    println!(
        "keel check: {} params, {} layers, d {}, vocab {}; init {}; batch {} × seq {}; lr {:.2e}",
        r.params, r.layers, r.hidden_size, r.vocab_size, r.scheme, r.batch, r.seq, r.lr
    );
    if let Some(p) = &r.proxy {
        println!("proxy ({} params): {}", p.params, p.how);
    }
    let (t, m) = (&r.theory, &r.measured);
    println!(
        "\n{:>6} {:>21} {:>21} {:>21} {:>21} {:>8} {:>7} {:>21}",
        "layer",
        "resid RMS th/meas",
        "attn out th/meas",
        "mlp out th/meas",
        "attn logit σ th/meas",
        "max",
        "entropy",
        "∂resid RMS th/meas"
    );
    let pair = |a: f64, b: f64| format!("{} / {}", f(a), f(b));
    println!(
        "{:>6} {:>21} {:>21} {:>21} {:>21} {:>8} {:>7} {:>21}",
        "embed",
        pair(t.resid_rms[0], m.resid_rms[0]),
        "",
        "",
        "",
        "",
        "",
        pair(t.resid_grad_rms[0], m.resid_grad_rms[0])
    );
    for l in shown_layers(r.layers) {
        println!(
            "{:>6} {:>21} {:>21} {:>21} {:>21} {:>8.2} {:>7.2} {:>21}",
            l,
            pair(t.resid_rms[2 * l + 2], m.resid_rms[2 * l + 2]),
            pair(t.attn_out_rms[l], m.attn_out_rms[l]),
            pair(t.mlp_out_rms[l], m.mlp_out_rms[l]),
            pair(t.attn_logit_std[l], m.attn_logit_std[l]),
            m.attn_logit_max[l],
            m.attn_entropy[l],
            pair(t.resid_grad_rms[2 * l + 2], m.resid_grad_rms[2 * l + 2]),
        );
    }
    println!(
        "\noutput logits σ {}   log-partition {}   initial loss {} (ln V {:.4})",
        pair(t.logit_std, m.logit_std),
        pair(t.logz_mean, m.logz_mean),
        pair(t.init_loss, m.loss),
        (r.vocab_size as f64).ln()
    );
    if r.steps.len() > 1 {
        println!(
            "\n{:>5} {:>9} {:>10} {:>10}  update/weight per group",
            "step", "loss", "max logit", "out σ"
        );
        for s in &r.steps {
            let u: Vec<String> = s
                .update_ratio
                .iter()
                .map(|(k, v)| format!("{k} {v:.3}"))
                .collect();
            println!(
                "{:>5} {:>9.4} {:>10.2} {:>10.3}  {}",
                s.step,
                s.loss,
                s.max_attn_logit,
                s.logit_std,
                u.join("  ")
            );
        }
    }
    println!();
    for g in &r.gates {
        println!("  {}  {:<22} {}", g.verdict.label(), g.name, g.reason);
        println!("        [{}: {}]", g.threshold(), g.basis);
        if let Some(s) = &g.suggestion {
            println!("        → {s}");
        }
    }
    println!("verdict: {} ({elapsed:.1} s)", r.verdict.label());
}

fn cmd_coord(a: &ProbeArgs) -> Result<i32> {
    let steps = if a.steps > 1 { a.steps } else { 5 };
    let lr = a.lr.unwrap_or(1e-2);
    let mut widths = a.widths.clone();
    widths.sort_unstable();
    widths.dedup();
    let mut all = Vec::new();
    for scheme in ["normal", "mup"] {
        all.push(super::coord::run(scheme, &widths, steps, lr, &a.sets)?);
    }
    if a.json {
        println!("{}", serde_json::to_string(&all)?);
    } else {
        println!(
            "coordinate check: micro shape widened to {widths:?}, {steps} AdamW steps at lr {lr:.1e}, random tokens"
        );
        for c in &all {
            let name = if c.parametrisation == "mup" {
                "μP"
            } else {
                "standard (normal 0.02)"
            };
            println!(
                "
{name}: output logit RMS by width"
            );
            print!("{:>6}", "step");
            for w in &c.widths {
                print!(" {w:>10}");
            }
            println!();
            for (k, row) in c.logits.iter().enumerate() {
                print!("{k:>6}");
                for v in row {
                    print!(" {v:>10.4}");
                }
                println!();
            }
            println!(
                "slope of log(RMS) vs log(width) at step {steps}: logits {:+.2} ({}), last residual {:+.2} ({})",
                c.logit_slope,
                super::coord::slope_word(c.logit_slope),
                c.resid_slope,
                super::coord::slope_word(c.resid_slope),
            );
        }
    }
    if let Some(out) = &a.out {
        super::plot::write_coord(out, &all)?;
        eprintln!("plots in {}", out.display());
    }
    Ok(0)
}

/// The short run of --sharpness / --lr-edge, for the config being checked.
fn edge_report(a: &ProbeArgs) -> Result<super::edge::EdgeReport> {
    let scheme = if a.scheme == "all" {
        "(config)"
    } else {
        &a.scheme
    };
    let mut rc = resolve(a, scheme)?;
    if let Some(lr) = a.lr {
        rc.optim.lr = lr;
    }
    let o = super::edge::EdgeOptions {
        steps: a.sharpness_steps.max(1),
        every: a.sharpness_every.max(1),
        iters: a.sharpness_iters.max(1),
        hessian: a.sharpness_hessian,
        out: a.out.as_ref().map(|d| d.join("sharpness-run")),
    };
    eprintln!(
        "keel check: the first {} steps at peak LR {:.2e} with the sharpness probe every {} (≈ {} step-equivalents per measurement)…",
        o.steps,
        rc.optim.lr,
        o.every,
        2 * o.iters * if o.hessian { 2 } else { 1 }
    );
    super::edge::run(&rc, &o)
}

fn cmd_sharpness(a: &ProbeArgs) -> Result<i32> {
    let r = edge_report(a)?;
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        super::edge::print_table(&r);
        println!();
        super::edge::print_prediction(&r);
    }
    Ok(0)
}

pub fn cmd_probe(a: &ProbeArgs) -> Result<i32> {
    let t0 = Instant::now();
    if a.coord_check {
        return cmd_coord(a);
    }
    if a.sharpness {
        return cmd_sharpness(a);
    }
    if a.scheme == "all" {
        let mut reports = Vec::new();
        for s in crate::init::SCHEMES {
            reports.push(run_one(a, s)?);
        }
        if a.json {
            println!("{}", serde_json::to_string(&reports)?);
        } else {
            print_comparison(&reports);
        }
        if let Some(out) = &a.out {
            super::plot::write_all(out, &reports)?;
            eprintln!("plots in {}", out.display());
        }
        return Ok(0);
    }
    let r = run_one(a, &a.scheme)?;
    let edge = if a.lr_edge {
        Some(edge_report(a)?)
    } else {
        None
    };
    if a.json {
        let mut v = serde_json::to_value(&r)?;
        if let Some(e) = &edge {
            v["lr_edge"] = serde_json::to_value(e)?;
        }
        println!("{v}");
    } else {
        print_report(&r, t0.elapsed().as_secs_f64());
        if let Some(e) = &edge {
            super::edge::print_prediction(e);
        }
    }
    if let Some(out) = &a.out {
        super::plot::write_all(out, std::slice::from_ref(&r))?;
        eprintln!("plots in {}", out.display());
    }
    Ok(if r.verdict == Verdict::Fail { 4 } else { 0 })
}

fn print_comparison(rs: &[CheckReport]) {
    let Some(r0) = rs.first() else { return };
    println!(
        "keel check --init all: {} params, {} layers, d {}, vocab {}; batch {} × seq {}; lr {:.2e}",
        r0.params, r0.layers, r0.hidden_size, r0.vocab_size, r0.batch, r0.seq, r0.lr
    );
    print!("{:<16}", "scheme");
    for g in &r0.gates {
        print!(" {:>22}", g.name);
    }
    println!("  verdict");
    for r in rs {
        print!("{:<16}", r.scheme);
        for g in &r.gates {
            print!(" {:>15} {:>6}", f(g.value), g.verdict.label());
        }
        println!("  {}", r.verdict.label());
    }
}
