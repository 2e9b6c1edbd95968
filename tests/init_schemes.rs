//! Initialisation: every scheme's realised statistics match its formula, the formulas match
//! PyTorch/HF/torchtitan/GPT-NeoX/OLMo references, the audit catches planted bugs, and values
//! do not depend on the thread count.

use keel::config::ModelConfig;
use keel::init::audit::{audit_tensor, Verdict};
use keel::init::{initialize, plan, Dist, InitSection, SCHEMES};
use keel::model::Model;
use std::process::Command;

fn section(scheme: &str) -> InitSection {
    InitSection {
        scheme: scheme.into(),
        seed: 3,
        ..Default::default()
    }
}

fn audit_all(m: &Model, ic: &InitSection) -> Vec<keel::init::audit::TensorAudit> {
    let plans = plan(&m.cfg, &m.layout, ic).unwrap();
    m.layout
        .specs
        .iter()
        .zip(&plans)
        .map(|(s, p)| audit_tensor(p, &m.params[s.offset..s.offset + s.len]))
        .collect()
}

#[test]
fn every_scheme_realises_its_own_formula() {
    for preset in ["micro", "tiny"] {
        let cfg = ModelConfig::preset(preset).unwrap();
        for scheme in SCHEMES {
            let ic = section(scheme);
            let mut m = Model::new(&cfg, 1, 1);
            let plans = initialize(&mut m, &ic).unwrap();
            for (a, (s, p)) in audit_all(&m, &ic)
                .iter()
                .zip(m.layout.specs.iter().zip(&plans))
            {
                assert_eq!(
                    a.verdict,
                    Verdict::Pass,
                    "{preset}/{scheme}/{}: {:?}",
                    a.name,
                    a.reasons
                );
                let w = &m.params[s.offset..s.offset + s.len];
                let maxabs = w.iter().fold(0f64, |m, &x| m.max((x as f64).abs()));
                if let Some(b) = p.dist.bound() {
                    assert!(
                        maxabs <= b * (1.0 + 1e-6),
                        "{scheme}/{}: {maxabs} beyond bound {b}",
                        s.name
                    );
                    if let Dist::Uniform { .. } = p.dist {
                        if w.len() > 10_000 {
                            assert!(
                                maxabs > b * 0.999,
                                "{scheme}/{}: uniform max {maxabs} far below bound {b}",
                                s.name
                            );
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn trunc_normal_is_resampled_and_std_corrected() {
    let cfg = ModelConfig::preset("tiny").unwrap();
    let mut ic = section("trunc-normal");
    ic.trunc_sigma = 1.5;
    let mut m = Model::new(&cfg, 1, 1);
    let plans = initialize(&mut m, &ic).unwrap();
    let s = m.layout.get("lm_head.weight").unwrap().clone();
    let p = plans.iter().find(|p| p.name == s.name).unwrap();
    let w = &m.params[s.offset..s.offset + s.len];
    let n = w.len() as f64;
    let std = (w.iter().map(|&x| (x as f64).powi(2)).sum::<f64>() / n).sqrt();
    assert!((std / 0.02 - 1.0).abs() < 0.01, "corrected std {std}");
    let b = p.dist.bound().unwrap();
    let near = w.iter().filter(|&&x| (x as f64).abs() > 0.999 * b).count() as f64 / n;
    assert!(near < 0.002, "values pile at the bound: {near}");
}

#[test]
fn formulas_match_the_pytorch_reference() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/init_targets.json"
    );
    let refs: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut checked = 0;
    for c in refs["configs"].as_array().unwrap() {
        let mc = &c["model"];
        let u = |k: &str| mc[k].as_u64().unwrap() as usize;
        let cfg = ModelConfig {
            vocab_size: u("vocab_size"),
            hidden_size: u("hidden_size"),
            num_layers: u("num_layers"),
            num_heads: u("num_heads"),
            num_kv_heads: u("num_kv_heads"),
            intermediate_size: u("intermediate_size"),
            rope_theta: 10000.0,
            rms_norm_eps: 1e-5,
            tie_embeddings: mc["tie_embeddings"].as_bool().unwrap(),
            max_seq_len: 64,
            attn_scale: None,
            logit_scale: 1.0,
            residual_scale: 1.0,
            qk_norm: false,
        };
        let layout = keel::model::ParamLayout::new(&cfg);
        for (key, sch) in c["schemes"].as_object().unwrap() {
            // "xavier-normal@gain=0.5" → scheme + parameter
            let mut parts = key.split('@');
            let mut ic = section(parts.next().unwrap());
            for kv in parts {
                let (k, v) = kv.split_once('=').unwrap();
                match k {
                    "gain" => ic.gain = Some(v.parse().unwrap()),
                    "mode" => ic.mode = v.to_string(),
                    other => panic!("unknown fixture parameter {other}"),
                }
            }
            if let Some(g) = sch["params"].get("gain").and_then(|g| g.as_f64()) {
                ic.gain = Some(g);
            }
            if ic.scheme == "kaiming-normal" && sch["params"].get("nonlinearity").is_some() {
                ic.gain = Some(sch["params"]["gain"].as_f64().unwrap_or(2f64.sqrt()));
            }
            let plans = plan(&cfg, &layout, &ic).unwrap();
            for p in &plans {
                let r = &sch["tensors"][&p.name];
                assert!(!r.is_null(), "{key}: reference lacks {}", p.name);
                if r["kind"] == "ones" {
                    assert_eq!(p.dist, Dist::Ones, "{key}/{}", p.name);
                    continue;
                }
                assert_eq!(
                    r["fan_in"].as_u64().map(|x| x as usize),
                    Some(p.fan_in),
                    "{key}/{} fan_in",
                    p.name
                );
                assert_eq!(
                    r["fan_out"].as_u64().map(|x| x as usize),
                    Some(p.fan_out),
                    "{key}/{} fan_out",
                    p.name
                );
                let want = r["std"].as_f64().unwrap();
                let got = match p.dist {
                    Dist::TruncNormal { std, .. } => std, // the std parameter, as trunc_normal_ takes it
                    _ => p.target_std,
                };
                assert!(
                    (got - want).abs() <= 1e-7 * want.abs().max(1e-12),
                    "{key}/{}: keel σ {got} vs reference {want}",
                    p.name
                );
                if let Some(b) = r.get("bound").and_then(|b| b.as_f64()) {
                    let kb = p.dist.bound().unwrap();
                    assert!(
                        (kb - b).abs() <= 1e-7 * b,
                        "{key}/{}: bound {kb} vs {b}",
                        p.name
                    );
                }
                checked += 1;
            }
        }
    }
    assert!(checked > 300, "only {checked} reference tensors checked");
}

fn planted(
    cfg: &ModelConfig,
    scheme: &str,
    f: impl Fn(&mut Model),
) -> Vec<keel::init::audit::TensorAudit> {
    let ic = section(scheme);
    let mut m = Model::new(cfg, 1, 1);
    initialize(&mut m, &ic).unwrap();
    f(&mut m);
    audit_all(&m, &ic)
}

fn verdict_of<'a>(
    a: &'a [keel::init::audit::TensorAudit],
    name: &str,
) -> &'a keel::init::audit::TensorAudit {
    a.iter().find(|x| x.name == name).unwrap()
}

#[test]
fn audit_catches_planted_bugs() {
    let cfg = ModelConfig::preset("tiny").unwrap();
    // depth scaling on up_proj instead of down_proj (the torchtitan/llama2.c w3 bug)
    let a = planted(&cfg, "depth-scaled", |m| {
        let l = 3;
        let up = m
            .layout
            .get(&format!("model.layers.{l}.mlp.up_proj.weight"))
            .unwrap()
            .clone();
        let down = m
            .layout
            .get(&format!("model.layers.{l}.mlp.down_proj.weight"))
            .unwrap()
            .clone();
        let k = 1.0 / (2.0f32 * (l as f32 + 1.0)).sqrt();
        m.params[up.offset..up.offset + up.len]
            .iter_mut()
            .for_each(|x| *x *= k);
        m.params[down.offset..down.offset + down.len]
            .iter_mut()
            .for_each(|x| *x /= k);
    });
    let up = verdict_of(&a, "model.layers.3.mlp.up_proj.weight");
    let down = verdict_of(&a, "model.layers.3.mlp.down_proj.weight");
    assert_eq!(up.verdict, Verdict::Fail);
    assert!(
        up.reasons[0].contains("leaves unscaled"),
        "{:?}",
        up.reasons
    );
    assert_eq!(down.verdict, Verdict::Fail);
    assert!(
        down.reasons[0].contains("depth scaling is missing"),
        "{:?}",
        down.reasons
    );
    assert_eq!(
        verdict_of(&a, "model.layers.2.mlp.down_proj.weight").verdict,
        Verdict::Pass
    );
    // an uninitialised (zero) head
    let a = planted(&cfg, "normal", |m| {
        let h = m.layout.get("lm_head.weight").unwrap().clone();
        m.params[h.offset..h.offset + h.len].fill(0.0);
    });
    let h = verdict_of(&a, "lm_head.weight");
    assert_eq!(h.verdict, Verdict::Fail);
    assert!(h.reasons[0].contains("never initialised"));
    // truncation bounds in absolute units: torch's trunc_normal_(std=0.02, a=-2, b=2) never
    // truncates, so the weights are a plain N(0, 0.02²)
    let ic = InitSection {
        trunc_sigma: 2.0,
        std: 0.02,
        ..section("trunc-normal")
    };
    let mut m = Model::new(&cfg, 1, 1);
    initialize(
        &mut m,
        &InitSection {
            std: 0.02,
            ..section("normal")
        },
    )
    .unwrap();
    let a = audit_all(&m, &ic);
    let h = verdict_of(&a, "model.embed_tokens.weight");
    assert_eq!(h.verdict, Verdict::Fail);
    assert!(
        h.reasons.iter().any(|r| r.contains("absolute units")),
        "{:?}",
        h.reasons
    );
    // values beyond the bound are not values piled at it: no "clamped" reason for them
    assert!(
        !h.reasons.iter().any(|r| r.contains("clamped")),
        "{:?}",
        h.reasons
    );
    // clamped instead of resampled
    let a = planted(&cfg, "normal", |m| {
        let h = m
            .layout
            .get("model.layers.0.mlp.gate_proj.weight")
            .unwrap()
            .clone();
        m.params[h.offset..h.offset + h.len]
            .iter_mut()
            .for_each(|x| *x = x.clamp(-0.03, 0.03));
    });
    let g = verdict_of(&a, "model.layers.0.mlp.gate_proj.weight");
    assert_eq!(g.verdict, Verdict::Fail, "{:?}", g.reasons);
    assert!(
        g.reasons.iter().any(|r| r.contains("clamped")),
        "{:?}",
        g.reasons
    );
}

#[test]
fn same_seed_same_values_on_1_and_2_threads() {
    let base = std::env::temp_dir().join(format!("keel-init-threads-{}", std::process::id()));
    let mut outs = Vec::new();
    for threads in ["1", "2"] {
        for scheme in ["trunc-normal", "orthogonal", "xavier-uniform"] {
            let dir = base.join(format!("{scheme}-{threads}"));
            let st = Command::new(env!("CARGO_BIN_EXE_keel"))
                .args([
                    "--threads",
                    threads,
                    "init",
                    "--preset",
                    "micro",
                    "--init",
                    scheme,
                    "--seed",
                    "7",
                ])
                .arg("--out")
                .arg(&dir)
                .status()
                .unwrap();
            assert!(st.success());
            outs.push((
                scheme,
                threads,
                std::fs::read(dir.join("model.safetensors")).unwrap(),
            ));
        }
    }
    for (s, _, w) in outs.iter().filter(|o| o.1 == "1") {
        let two = outs.iter().find(|o| o.0 == *s && o.1 == "2").unwrap();
        assert!(*w == two.2, "{s}: values differ between 1 and 2 threads");
    }
}

#[test]
fn bad_init_input_is_refused() {
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_keel"))
            .args(args)
            .output()
            .unwrap()
    };
    let o = run(&["init", "--preset", "micro", "--init", "glorot", "--explain"]);
    assert_eq!(o.status.code(), Some(1));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("glorot") && e.contains("xavier-normal") && e.contains("mitchell"),
        "{e}"
    );
    let o = run(&[
        "init",
        "--preset",
        "micro",
        "--init",
        "trunc-normal",
        "--set",
        "init.trunc_sigma=0.01",
        "--explain",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("init.trunc_sigma"));
    let o = run(&[
        "init",
        "--preset",
        "micro",
        "--init",
        "xavier-normal",
        "--set",
        "init.gain=-1",
        "--explain",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("init.gain"));
    // a checkpoint whose shapes do not match its config
    let dir = std::env::temp_dir().join(format!("keel-init-bad-{}", std::process::id()));
    assert!(
        run(&["init", "--preset", "micro", "--out", dir.to_str().unwrap()])
            .status
            .success()
    );
    let cfg = std::fs::read_to_string(dir.join("config.json")).unwrap();
    std::fs::write(
        dir.join("config.json"),
        cfg.replace("\"intermediate_size\": 172", "\"intermediate_size\": 128"),
    )
    .unwrap();
    let o = run(&[
        "check",
        "--model",
        dir.to_str().unwrap(),
        "--init",
        "normal",
    ]);
    assert_eq!(o.status.code(), Some(1));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("gate_proj") && e.contains("shape"), "{e}");
}

#[test]
fn check_exits_4_on_a_failing_audit() {
    let dir = std::env::temp_dir().join(format!("keel-init-audit-{}", std::process::id()));
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_keel"))
            .args(args)
            .output()
            .unwrap()
    };
    assert!(run(&[
        "init",
        "--preset",
        "micro",
        "--init",
        "megatron",
        "--out",
        dir.to_str().unwrap()
    ])
    .status
    .success());
    assert_eq!(
        run(&[
            "check",
            "--model",
            dir.to_str().unwrap(),
            "--init",
            "megatron"
        ])
        .status
        .code(),
        Some(0)
    );
    let o = run(&[
        "check",
        "--model",
        dir.to_str().unwrap(),
        "--init",
        "normal",
    ]);
    assert_eq!(o.status.code(), Some(4));
    // the directory says what wrote it: the audit names that instead of guessing a bug
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("was initialised with megatron"), "{out}");
}

/// docs/init.md's init → audit example: options recorded by `keel init` are what the audit
/// checks against; without the record, no per-tensor cause is guessed and a common factor
/// is named as one gain.
#[test]
fn audit_uses_the_recorded_init_and_does_not_guess_without_it() {
    let dir = std::env::temp_dir().join(format!("keel-init-gain-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_keel"))
            .args(args)
            .output()
            .unwrap()
    };
    let d = dir.to_str().unwrap();
    let o = run(&[
        "init",
        "--preset",
        "tiny",
        "--init",
        "xavier-normal",
        "--set",
        "init.gain=0.5",
        "--out",
        d,
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = run(&["check", "--model", d, "--init", "xavier-normal"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "{out}");
    assert!(out.contains("init.gain=0.5"), "{out}");
    // the same weights with the record removed: a FAIL, but no made-up cause
    std::fs::remove_file(dir.join("keel_init.json")).unwrap();
    let o = run(&["check", "--model", d, "--init", "xavier-normal"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(4), "{out}");
    assert!(!out.contains("depth scaling applied"), "{out}");
    assert!(
        out.contains("options these weights were written with are unknown"),
        "{out}"
    );
    assert!(
        out.contains("σ 0.50") && out.contains("init.gain=0.50"),
        "{out}"
    );
    // options given on the command line are taken as known
    let o = run(&[
        "check",
        "--model",
        d,
        "--init",
        "xavier-normal",
        "--set",
        "init.gain=0.5",
    ]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
}
