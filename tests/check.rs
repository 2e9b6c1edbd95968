//! `keel check`: the variance-propagation theory agrees with a measured forward and backward
//! at init; the gates fire on planted problems and stay quiet on sound setups; a 7B-shaped
//! HF config runs on a proxy; plots and JSON are written.

use keel::config::RunConfig;
use keel::init::audit::Verdict;
use keel::probe::{check, CheckOptions, CheckReport};
use std::process::Command;

fn report(sets: &[&str]) -> CheckReport {
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    let rc = RunConfig::parse(None, &sets).unwrap();
    let mc = rc.model_config().unwrap();
    let o = CheckOptions {
        optim: rc.optim.clone(),
        ..Default::default()
    };
    check(&mc, &rc.init, &o).unwrap()
}

fn max_rel(a: &[f64], b: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() / y.abs().max(1e-30))
        .fold(0.0, f64::max)
}

fn gate(r: &CheckReport, name: &str) -> Verdict {
    r.gates.iter().find(|g| g.name == name).unwrap().verdict
}

/// Stated tolerances (docs/check.md): residual, sublayer outputs, output logits, gradient of the
/// residual stream (after layer 0) within 10%; attention-logit spread within 25%; initial
/// loss within 0.05 nats.
#[test]
fn theory_matches_measurement_on_micro_and_tiny() {
    for preset in ["micro", "tiny"] {
        for scheme in ["xavier-normal", "normal", "depth-scaled", "mup"] {
            let r = report(&[
                &format!("model.preset=\"{preset}\""),
                &format!("init.scheme=\"{scheme}\""),
            ]);
            let (t, m) = (&r.theory, &r.measured);
            let ctx = format!("{preset}/{scheme}");
            assert!(max_rel(&t.resid_rms, &m.resid_rms) < 0.10, "{ctx} residual");
            assert!(
                max_rel(&t.attn_out_rms, &m.attn_out_rms) < 0.10,
                "{ctx} attn out"
            );
            assert!(
                max_rel(&t.mlp_out_rms, &m.mlp_out_rms) < 0.10,
                "{ctx} mlp out"
            );
            assert!(
                max_rel(&t.attn_logit_std, &m.attn_logit_std) < 0.25,
                "{ctx} logits"
            );
            if scheme != "mup" {
                // μP's zero readout: no gradient below the head at init, nothing to compare
                assert!(
                    max_rel(&t.resid_grad_rms[1..], &m.resid_grad_rms[1..]) < 0.10,
                    "{ctx} gradient {:?} vs {:?}",
                    t.resid_grad_rms,
                    m.resid_grad_rms
                );
                assert!(
                    (t.logit_std / m.logit_std - 1.0).abs() < 0.05,
                    "{ctx} output σ"
                );
            } else {
                assert_eq!(m.logit_std, 0.0);
            }
            assert!((t.init_loss - m.loss).abs() < 0.05, "{ctx} loss");
        }
    }
}

#[test]
fn gates_fire_on_planted_problems_and_pass_sound_setups() {
    // embedding σ 1.0 with an unscaled (tied) head: logits of std √d
    let r = report(&[
        "model.preset=\"tiny\"",
        "model.tie_embeddings=true",
        "init.roles.embed.std=1.0",
    ]);
    assert_eq!(gate(&r, "output logits"), Verdict::Fail);
    assert_eq!(gate(&r, "initial loss"), Verdict::Fail);
    // no depth scaling at depth 128 on a narrow model: the residual stream keeps growing
    let deep = ["model.preset=\"tiny\"", "model.num_layers=128"];
    let r = report(&[deep[0], deep[1], "init.scheme=\"normal\""]);
    assert_eq!(gate(&r, "residual growth"), Verdict::Fail);
    let r = report(&[deep[0], deep[1], "init.scheme=\"megatron\""]);
    assert_eq!(gate(&r, "residual growth"), Verdict::Pass);
    assert_eq!(r.verdict, Verdict::Pass);
    // σ 0.2 everywhere: attention saturates, output logits grow (σ 3.2: a warning)
    let r = report(&["model.preset=\"tiny\"", "init.std=0.2"]);
    assert_eq!(gate(&r, "attention logits"), Verdict::Fail);
    assert_eq!(gate(&r, "output logits"), Verdict::Warn);
    // a passing gate carries no suggestion; every gate its thresholds and their basis
    let ok = report(&["model.preset=\"tiny\""]);
    for g in &ok.gates {
        assert_eq!(g.suggestion.is_some(), g.verdict != Verdict::Pass, "{g:?}");
        assert!(
            g.pass > 0.0 && g.warn > g.pass && !g.basis.is_empty(),
            "{g:?}"
        );
    }
    // a huge LR against small weights: the first update dwarfs them
    let r = report(&["model.preset=\"micro\"", "optim.lr=0.05"]);
    assert_eq!(gate(&r, "update/weight, step 1"), Verdict::Fail);
    // the defaults pass
    assert_eq!(report(&["model.preset=\"tiny\""]).verdict, Verdict::Pass);
}

#[test]
fn cli_exit_codes_hf_proxy_json_and_plots() {
    let out = std::env::temp_dir().join(format!("keel-check-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let keel = env!("CARGO_BIN_EXE_keel");
    let o = Command::new(keel)
        .args(["check", "--preset", "tiny", "--set", "init.std=0.2"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(4), "a FAIL gate exits 4");
    assert!(String::from_utf8_lossy(&o.stdout).contains("FAIL  attention logits"));
    // a Llama-2-7B config: theory at full size, measured on a proxy of the same depth
    let hf = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/hf/llama2-7b.json");
    let o = Command::new(keel)
        .args(["check", "--json", "--init", "megatron", "--hf", hf, "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        o.status.code().is_some(),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["layers"], 32);
    assert_eq!(r["hidden_size"], 4096);
    assert_eq!(r["proxy"]["hidden_size"], 256);
    let (t, m) = (&r["theory"]["resid_rms"], &r["measured"]["resid_rms"]);
    let last = t.as_array().unwrap().len() - 1;
    let (t, m) = (t[last].as_f64().unwrap(), m[last].as_f64().unwrap());
    assert!(
        (t / m - 1.0).abs() < 0.1,
        "proxy stands for the full model: {t} vs {m}"
    );
    for f in [
        "rms_vs_depth.svg",
        "rms_vs_depth.png",
        "grad_vs_depth.svg",
        "check.json",
    ] {
        let bytes = std::fs::read(out.join(f)).unwrap();
        assert!(bytes.len() > 1000, "{f}");
    }
    let png = std::fs::read(out.join("grad_vs_depth.png")).unwrap();
    assert_eq!(&png[..4], b"\x89PNG");
    // bad input: a clear error naming the file
    let o = Command::new(keel)
        .args(["check", "--hf", "/nonexistent/config.json"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("/nonexistent/config.json"));
}

/// The μP coordinate check: flat under μP, growing with width under the standard
/// parametrisation (this test caught a readout LR scaled twice).
#[test]
fn coord_check_is_flat_for_mup_and_grows_for_standard() {
    let widths = [64, 128, 256, 512];
    let sp = keel::probe::coord::run("normal", &widths, 5, 1e-2, &[]).unwrap();
    let mup = keel::probe::coord::run("mup", &widths, 5, 1e-2, &[]).unwrap();
    assert!(
        sp.logit_slope > 0.5,
        "standard logits slope {}",
        sp.logit_slope
    );
    assert!(
        sp.resid_slope > 1.0,
        "standard residual slope {}",
        sp.resid_slope
    );
    assert!(
        mup.logit_slope.abs() < 0.3,
        "μP logits slope {}",
        mup.logit_slope
    );
    assert!(
        mup.resid_slope.abs() < 0.5,
        "μP residual slope {}",
        mup.resid_slope
    );
    // at init μP's residual is width-independent to a few %
    let r0 = &mup.resid[0];
    assert!(r0.iter().all(|&r| (r / r0[0] - 1.0).abs() < 0.05), "{r0:?}");
}

/// One recipe of the calibration table: an HF config (or preset), init, peak LR, and whether
/// it is known to train (`good`) or known to fail (`bad`), with the source.
struct Recipe {
    name: &'static str,
    sets: &'static [&'static str],
    known: Option<bool>,
    source: &'static str,
}

const RECIPES: &[Recipe] = &[
    Recipe { name: "Llama 2 7B", sets: &["model.hf_config=\"llama2-7b.json\"", "init.scheme=\"normal\"", "optim.lr=3e-4"], known: Some(true), source: "Touvron et al. 2023 (peak LR 3e-4); HF initializer_range 0.02" },
    Recipe { name: "Llama 2 13B", sets: &["model.hf_config=\"llama2-13b.json\"", "init.scheme=\"normal\"", "optim.lr=3e-4"], known: Some(true), source: "Touvron et al. 2023 (3e-4); σ 0.02" },
    Recipe { name: "Llama 2 70B", sets: &["model.hf_config=\"llama2-70b.json\"", "init.scheme=\"normal\"", "optim.lr=1.5e-4"], known: Some(true), source: "Touvron et al. 2023 (1.5e-4); σ 0.02" },
    Recipe { name: "Llama 3 8B", sets: &["model.hf_config=\"llama3-8b.json\"", "init.scheme=\"normal\"", "optim.lr=3e-4"], known: Some(true), source: "Llama 3 model card / Dubey et al. 2024 (3e-4); σ 0.02" },
    Recipe { name: "Llama 3 70B", sets: &["model.hf_config=\"llama3-70b.json\"", "init.scheme=\"normal\"", "optim.lr=1.5e-4"], known: Some(true), source: "Dubey et al. 2024 (1.5e-4); σ 0.02" },
    Recipe { name: "Llama 3 70B, Megatron init", sets: &["model.hf_config=\"llama3-70b.json\"", "init.scheme=\"megatron\"", "optim.lr=1.5e-4"], known: Some(true), source: "Megatron-LM's default init (σ 0.02, output projections σ/√(2L)) at Llama 3 70B's shape and LR" },
    Recipe { name: "Mistral 7B v0.3", sets: &["model.hf_config=\"mistral-7b-v0.3.json\"", "init.scheme=\"normal\"", "optim.lr=3e-4"], known: Some(true), source: "Mistral config (model_type mistral, no sliding window); σ 0.02; LR not published, 3e-4 assumed" },
    Recipe { name: "Qwen3 8B", sets: &["model.hf_config=\"qwen3-8b.json\"", "init.scheme=\"normal\"", "optim.lr=3e-4"], known: Some(true), source: "Qwen3 config (qk-norm); σ 0.02; LR not published, 3e-4 assumed" },
    Recipe { name: "OLMo 2 7B shape", sets: &["model.hf_config=\"olmo2-7b-shape.json\"", "init.scheme=\"trunc-normal\"", "init.std=0.02", "optim.lr=3e-4"], known: Some(true), source: "OLMo 2 (2024): truncated normal σ 0.02, peak LR 3e-4; as a pre-norm Llama of its shape (keel cannot represent OLMo 2's norm placement)" },
    Recipe { name: "TinyLlama 1.1B", sets: &["model.hf_config=\"tinyllama-1.1b.json\"", "init.scheme=\"wang\"", "optim.lr=4e-4"], known: Some(true), source: "Zhang et al. 2024 (4e-4); lit-gpt's init √(2/5d), output projections ~1/(L√d) (keel's wang)" },
    Recipe { name: "tiny, LR 3e-3", sets: &["model.preset=\"tiny\"", "init.scheme=\"normal\"", "optim.lr=3e-3"], known: Some(true), source: "examples/instability stable run (val 1.19 at 300 steps)" },
    Recipe { name: "Llama 2 7B, σ = 1", sets: &["model.hf_config=\"llama2-7b.json\"", "init.scheme=\"normal\"", "init.std=1.0", "optim.lr=3e-4"], known: Some(false), source: "50× HF's σ: first loss 25× ln V" },
    Recipe { name: "tiny, σ = 1", sets: &["model.preset=\"tiny\"", "init.scheme=\"normal\"", "init.std=1.0", "optim.lr=3e-3"], known: Some(false), source: "examples/instability: first loss 59.5 (ln V 8.3), unguarded val 2.70 vs 1.19 stable" },
    Recipe { name: "tiny, LR 0.1, no warm-up", sets: &["model.preset=\"tiny\"", "init.scheme=\"normal\"", "optim.lr=0.1"], known: Some(false), source: "examples/instability: attention logit > 100 at step 3, unguarded val 2.90 vs 1.19" },
    Recipe { name: "tiny width, 128 layers, no depth scaling", sets: &["model.preset=\"tiny\"", "model.num_layers=128", "init.scheme=\"normal\"", "optim.lr=3e-3"], known: Some(false), source: "planted (DeepNet's depth problem at d 256); not trained here" },
];

/// The calibration table (docs/check.md, "Calibration"): every known-good recipe PASSes or WARNs,
/// every known-bad one FAILs. Prints the table: `cargo test --release --test check
/// calibration -- --nocapture`.
#[test]
fn calibration_known_good_recipes_pass_and_known_bad_ones_fail() {
    let hf = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/hf/");
    let mut rows = Vec::new();
    let mut wrong = Vec::new();
    for r in RECIPES {
        let sets: Vec<String> = r
            .sets
            .iter()
            .map(|s| s.replace("hf_config=\"", &format!("hf_config=\"{hf}")))
            .collect();
        let rc = RunConfig::parse(None, &sets).unwrap();
        let mc = rc.model_config().unwrap();
        let o = CheckOptions {
            optim: rc.optim.clone(),
            ..Default::default()
        };
        let rep = check(&mc, &rc.init, &o).unwrap();
        let cells: Vec<String> = rep
            .gates
            .iter()
            .map(|g| format!("{} {:.3}", &g.verdict.label()[..1], g.value))
            .collect();
        let known = match r.known {
            Some(true) => "good",
            Some(false) => "bad",
            None => "—",
        };
        rows.push(format!(
            "| {} | {known} | {} | **{}** | {} |",
            r.name,
            cells.join(" | "),
            rep.verdict.label(),
            r.source
        ));
        match r.known {
            Some(true) if rep.verdict == Verdict::Fail => wrong.push(format!("{} FAILs", r.name)),
            Some(false) if rep.verdict != Verdict::Fail => {
                wrong.push(format!("{} does not FAIL", r.name))
            }
            _ => {}
        }
    }
    let names: Vec<&str> = report(&["model.preset=\"micro\""])
        .gates
        .iter()
        .map(|g| g.name)
        .collect();
    println!(
        "| recipe | known | {} | verdict | source |",
        names.join(" | ")
    );
    println!("|---|---|{}---|---|", "---|".repeat(names.len()));
    for r in rows {
        println!("{r}");
    }
    assert!(wrong.is_empty(), "{wrong:?}");
}

/// `keel check --sharpness`: the first steps of the configured run with the probe; the
/// edge-of-stability LR is 38/λ_max(P⁻¹H) of the last measurement, it is labelled as not a
/// max-stable-LR prediction, the cost adds up, and the run directory (a temporary one) is gone
/// afterwards. `--lr-edge` puts the same beside the verdict.
#[test]
fn sharpness_and_lr_edge_predict_from_a_short_run() {
    let keel = env!("CARGO_BIN_EXE_keel");
    let base = [
        "check",
        "--preset",
        "micro",
        "--set",
        "data.builtin_bytes=300000",
        "--set",
        "train.batch_size=4",
        "--set",
        "train.threads=2",
        "--sharpness-steps",
        "6",
        "--sharpness-every",
        "3",
        "--sharpness-iters",
        "6",
        "--json",
    ];
    let o = Command::new(keel)
        .args(base)
        .args(["--sharpness", "--lr", "2e-3"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let pts = v["points"].as_array().unwrap();
    assert_eq!(
        pts.iter()
            .map(|p| p["step"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        vec![3, 6]
    );
    assert_eq!(v["peak_lr"].as_f64(), Some(2e-3));
    let coef = v["coefficient"].as_f64().unwrap();
    assert!((coef - 38.0).abs() < 1e-9);
    let last = &pts[1];
    let lam = last["sharpness_precond"].as_f64().unwrap();
    assert!(lam > 0.0);
    assert!((v["edge_lr"].as_f64().unwrap() - coef / lam).abs() < 1e-9 * coef / lam);
    assert!(v["accuracy"]
        .as_str()
        .unwrap()
        .starts_with("not a max-stable-LR prediction"));
    assert_eq!(v["run_steps"].as_u64(), Some(6));
    let probe = v["probe_cost_steps"].as_f64().unwrap();
    assert!(probe > 0.0 && probe <= 2.0 * 6.0 * 2.0, "{probe}");
    assert_eq!(v["cost_steps"].as_f64(), Some(6.0 + probe));
    let ratio = last["edge_ratio"].as_f64().unwrap();
    assert!((ratio - last["lr"].as_f64().unwrap() * lam / coef).abs() < 1e-9);

    let child = Command::new(keel)
        .args(base)
        .arg("--lr-edge")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(
        v["verdict"].is_string(),
        "the check's own report is still there"
    );
    assert!(v["lr_edge"]["edge_lr"].as_f64().unwrap() > 0.0);
    let dir = std::env::temp_dir().join(format!("keel-lr-edge-{pid}"));
    assert!(!dir.exists(), "{} was left behind", dir.display());
}
