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

/// Stated tolerances (README): residual, sublayer outputs, output logits, gradient of the
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
    // no depth scaling at depth 48: the residual stream keeps growing
    let deep = ["model.preset=\"tiny\"", "model.num_layers=48"];
    let r = report(&[deep[0], deep[1], "init.scheme=\"normal\""]);
    assert_eq!(gate(&r, "residual growth"), Verdict::Fail);
    assert_ne!(gate(&r, "gradient ratio"), Verdict::Pass);
    let r = report(&[deep[0], deep[1], "init.scheme=\"megatron\""]);
    assert_eq!(gate(&r, "residual growth"), Verdict::Pass);
    assert_eq!(r.verdict, Verdict::Pass);
    // σ 0.2 everywhere: attention saturates, logits explode
    let r = report(&["model.preset=\"tiny\"", "init.std=0.2"]);
    assert_eq!(gate(&r, "attention logits"), Verdict::Fail);
    assert_eq!(gate(&r, "output logits"), Verdict::Fail);
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
