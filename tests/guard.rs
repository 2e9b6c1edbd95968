//! The guard end to end: each injected fault is detected at its step and recovered by the
//! right rung; the run finishes; clean runs raise nothing; `keel watch` on the metrics log
//! reports what the live guard saw; `keel replay` tells data from transient faults.

mod common;
use common::{keel, tmpdir};

use serde_json::Value;
use std::path::Path;
use std::process::Output;

/// A micro run (batch 8 × 64, 2 threads) with extra flags.
fn train(out: &Path, steps: u64, extra: &[&str]) -> Output {
    let mut c = keel();
    c.args(["train", "--preset", "micro", "--threads", "2", "--steps"])
        .arg(steps.to_string())
        .arg("--out")
        .arg(out)
        .args([
            "--set",
            "data.builtin_bytes=400000",
            "--set",
            "checkpoint.every=50",
        ])
        .args(extra);
    c.output().expect("spawn keel")
}

fn events(dir: &Path) -> Vec<Value> {
    keel::train::read_jsonl(&dir.join("events.jsonl")).unwrap()
}

fn of_kind<'a>(ev: &'a [Value], kind: &str) -> Vec<&'a Value> {
    ev.iter().filter(|e| e["kind"] == kind).collect()
}

/// (step, detector) of every detection the live guard logged.
fn live_detections(ev: &[Value]) -> Vec<(u64, String)> {
    ev.iter()
        .filter(|e| matches!(e["kind"].as_str(), Some("spike" | "divergence" | "warning")))
        .map(|e| {
            (
                e["step"].as_u64().unwrap(),
                e["detail"]["detector"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// `keel watch --json` over a run directory (its metrics.jsonl) or a TensorBoard log
/// directory: (step, detector) list and exit code.
fn watch(target: &Path) -> (Vec<(u64, String)>, i32) {
    let o = keel()
        .args(["watch", "--json"])
        .arg(target)
        .output()
        .unwrap();
    let list = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (
                v["step"].as_u64().unwrap(),
                v["detector"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    (list, o.status.code().unwrap())
}

fn replay(dir: &Path, step: u64) -> Value {
    let o = keel()
        .args(["replay", "--json", "--step", &step.to_string(), "--run"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

fn ok(o: &Output) {
    assert!(
        o.status.success(),
        "exit {:?}\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn nan_and_bad_batch_are_skipped_and_replay_tells_them_apart() {
    let d = tmpdir("skip");
    let o = train(
        &d,
        160,
        &[
            "--inject",
            "nan@60",
            "--inject",
            "bad-batch@120",
            "--set",
            "telemetry.tensorboard=true",
        ],
    );
    ok(&o);
    let ev = events(&d);
    let det = live_detections(&ev);
    assert!(det.contains(&(60, "nonfinite".into())), "{det:?}");
    assert!(
        det.iter().any(|(s, k)| *s == 120 && k == "loss_spike"),
        "{det:?}"
    );
    assert!(det.iter().all(|(s, _)| *s == 60 || *s == 120), "{det:?}");
    let skips: Vec<u64> = of_kind(&ev, "skip")
        .iter()
        .map(|e| e["step"].as_u64().unwrap())
        .collect();
    assert_eq!(skips, vec![60, 120]);
    assert!(of_kind(&ev, "lr_backoff").is_empty() && of_kind(&ev, "rollback").is_empty());
    let m = keel::train::read_jsonl(&d.join("metrics.jsonl")).unwrap();
    assert_eq!(m.len(), 160);
    assert!(m[59]["loss"].is_null() && m[59]["skipped"] == true);
    assert!(m.last().unwrap()["loss"].as_f64().unwrap().is_finite());
    // the sidecar sees what the live guard saw
    assert_eq!(watch(&d), (det.clone(), 0));
    // and the TensorBoard mirror holds the same run: every step's loss, the skips at
    // their steps (scalar and text), read back by keel watch to the same detections
    let (files, _) = keel::tensorboard::event_files(&d.join("tensorboard")).unwrap();
    let (sc, notes) = keel::tensorboard::read_scalars(&files).unwrap();
    assert!(notes.is_empty(), "{notes:?}");
    let loss: Vec<(i64, f64)> = sc
        .iter()
        .filter(|s| s.tag == "train/loss")
        .map(|s| (s.step, s.value))
        .collect();
    assert_eq!(loss.len(), 160);
    for (i, (step, v)) in loss.iter().enumerate() {
        assert_eq!(*step, i as i64 + 1);
        match m[i]["loss"].as_f64() {
            Some(x) => assert_eq!(*v, x as f32 as f64, "step {step}"),
            None => assert!(v.is_nan() && *step == 60, "step {step}: {v}"),
        }
    }
    let tb_skips: Vec<i64> = sc
        .iter()
        .filter(|s| s.tag == "keel/skip")
        .map(|s| s.step)
        .collect();
    assert_eq!(tb_skips, vec![60, 120]);
    assert!(sc
        .iter()
        .any(|s| s.tag.starts_with("layers/max_attn_logit_per_layer/")));
    let mut r = keel::tensorboard::EventReader::open(&files[0]).unwrap();
    let texts: Vec<(i64, String)> = r
        .poll(true)
        .unwrap()
        .0
        .into_iter()
        .flat_map(|e| e.texts.into_iter().map(move |(_, t)| (e.step, t)))
        .collect();
    assert!(
        texts.iter().any(|(s, t)| *s == 120 && t.contains("skip")),
        "{texts:?}"
    );
    assert_eq!(watch(&d.join("tensorboard")), (det, 0));
    // the NaN was a transient fault: it does not reproduce; the junk batch does, and is data
    let r = replay(&d, 60);
    assert_eq!(r["reproduces"], false, "{r}");
    let r = replay(&d, 120);
    assert_eq!(r["reproduces"], true, "{r}");
    assert!(r["verdict"].as_str().unwrap().contains("DATA"), "{r}");
    let r = replay(&d, 100);
    assert_eq!(r["reproduces"], true, "{r}");
}

#[test]
fn repeated_spikes_back_off_the_lr_then_restore_it() {
    let d = tmpdir("backoff");
    let o = train(
        &d,
        200,
        &[
            "--inject",
            "bad-batch@60",
            "--inject",
            "bad-batch@70",
            "--inject",
            "bad-batch@80",
            "--set",
            "guard.backoff_steps=50",
            "--set",
            "schedule.kind=\"constant\"",
        ],
    );
    ok(&o);
    let ev = events(&d);
    let b = of_kind(&ev, "lr_backoff");
    assert_eq!(b.len(), 1, "{ev:?}");
    assert_eq!(b[0]["step"], 80);
    assert_eq!(b[0]["detail"]["factor"], 0.5);
    let r = of_kind(&ev, "lr_restore");
    assert_eq!(r[0]["step"], 131);
    let m = keel::train::read_jsonl(&d.join("metrics.jsonl")).unwrap();
    let lr = |s: usize| m[s - 1]["lr"].as_f64().unwrap();
    // steps 81..=130 run at half the (constant) LR; before and after at the full LR
    assert_eq!(lr(81), 0.5 * lr(80));
    assert_eq!(lr(130), lr(81));
    assert_eq!(lr(131), lr(80));
    assert!(of_kind(&ev, "rollback").is_empty());
    assert_eq!(watch(&d).0, live_detections(&ev));
}

#[test]
fn a_bad_update_is_rolled_back_past_the_damage() {
    let d = tmpdir("rollback");
    let o = train(&d, 200, &["--inject", "spike@120"]);
    ok(&o);
    // the terminal says which state came back
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("rolled back to step 100 ("), "{err}");
    assert!(err.contains("LR × 0.5 from now on"), "{err}");
    let ev = events(&d);
    let rb = of_kind(&ev, "rollback");
    assert_eq!(rb.len(), 1, "{ev:?}");
    let at = rb[0]["step"].as_u64().unwrap();
    assert!((121..=130).contains(&at), "rollback at {at}");
    // to the last checkpoint before the bad update, past the batches since
    assert_eq!(rb[0]["detail"]["to_step"], 100);
    assert_eq!(rb[0]["detail"]["skipped_batches"][1], at);
    let det = live_detections(&ev);
    assert!(det.iter().all(|(s, _)| (121..=at).contains(s)), "{det:?}");
    assert!(
        det.iter().any(|(s, k)| *s == 121 && k == "loss_spike"),
        "{det:?}"
    );
    let m = keel::train::read_jsonl(&d.join("metrics.jsonl")).unwrap();
    let before = m[118]["loss"].as_f64().unwrap();
    let end = m.last().unwrap()["loss"].as_f64().unwrap();
    assert!(end < before + 0.3, "recovered: {before} → {end}");
    // watch, beside the run's events, sees what the guard saw, the divergence as handled by
    // the rollback (the windows go back to the restored step's, as the live guard's do): the
    // run recovered, so a sidecar must not stop it (exit 0)
    let (w, code) = watch(&d);
    assert_eq!(code, 0);
    assert_eq!(w, det);
    assert!(w.contains(&(at, "persistent".to_string())), "{w:?}");
    let o = keel()
        .args(["watch", "--json"])
        .arg(d.join("metrics.jsonl"))
        .output()
        .unwrap();
    let handled: Vec<Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v.get("handled").is_some())
        .collect();
    assert_eq!(handled.len(), 1);
    assert!(handled[0]["handled"].as_str().unwrap().contains("step 100"));
    // without the events beside it, the same log is a divergence (exit 2)
    let lone = tmpdir("rollback-lone");
    std::fs::copy(d.join("metrics.jsonl"), lone.join("metrics.jsonl")).unwrap();
    assert_eq!(watch(&lone).1, 2);
}

#[test]
fn the_guard_gives_up_with_exit_2_when_out_of_rungs() {
    let d = tmpdir("giveup");
    let o = train(
        &d,
        200,
        &["--inject", "spike@120", "--set", "guard.max_rollbacks=0"],
    );
    assert_eq!(
        o.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("diagnosis"), "{out}");
    let ev = events(&d);
    assert_eq!(of_kind(&ev, "give_up").len(), 1);
    assert!(ev.last().unwrap()["kind"] == "give_up");
    // no checkpoint of the damaged weights was written
    let ck = keel::train::latest_checkpoint(&d).unwrap();
    assert!(ck.ends_with("step-00000100"), "{}", ck.display());
}

#[test]
fn early_attention_warnings_alone_never_end_a_run() {
    // a threshold every step passes: each rollback cuts the LR and the warning comes back as
    // soon as before, so cutting stops helping; the rule switches off and the run trains on
    let d = tmpdir("early-off");
    let o = train(&d, 60, &["--set", "guard.attn_logit_max=0.001"]);
    ok(&o);
    let ev = events(&d);
    assert!(of_kind(&ev, "give_up").is_empty());
    let off = of_kind(&ev, "early_rule_off");
    assert_eq!(off.len(), 1, "{ev:?}");
    let rb = of_kind(&ev, "rollback").len() as u32;
    let cfg = keel::monitor::GuardConfig::default();
    assert!(rb >= 1 && rb <= cfg.walk_patience, "{rb} rollbacks");
    // nothing rolls back after that: the run trains on, judged by the loss detectors
    let at = off[0]["step"].as_u64().unwrap();
    assert!(ev
        .iter()
        .all(|e| e["kind"] != "rollback" || e["step"].as_u64() < Some(at)));
    let m = keel::train::read_jsonl(&d.join("metrics.jsonl")).unwrap();
    assert_eq!(m.last().unwrap()["step"], 60);
}

#[test]
fn clean_micro_runs_raise_no_events_over_five_seeds() {
    for seed in 1..=5 {
        let d = tmpdir(&format!("clean{seed}"));
        let s = seed.to_string();
        let o = train(
            &d,
            300,
            &[
                "--set",
                &format!("train.seed={s}"),
                "--set",
                &format!("init.seed={s}"),
            ],
        );
        ok(&o);
        let det = live_detections(&events(&d));
        assert!(det.is_empty(), "seed {seed}: {det:?}");
        assert_eq!(watch(&d), (vec![], 0));
    }
}

#[test]
fn a_broken_init_is_rescued_before_the_first_update() {
    // σ = 1 everywhere: first loss ~10× ln(vocab); the guard rescales the matrices at step 1
    let d = tmpdir("rescue");
    let o = train(&d, 40, &["--set", "init.std=1.0"]);
    ok(&o);
    // every guard action prints its line, the rescue too
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("guard: step 1 → init rescue"), "{err}");
    let ev = events(&d);
    let r = of_kind(&ev, "init_rescue");
    assert_eq!(r.len(), 1, "{ev:?}");
    assert_eq!(r[0]["step"], 1);
    assert!(r[0]["detail"]["largest_std_before"].as_f64().unwrap() > 0.5);
    let m = keel::train::read_jsonl(&d.join("metrics.jsonl")).unwrap();
    let lnv = (256f64).ln();
    assert!(m[0]["loss"].as_f64().unwrap() > 2.0 * lnv && m[0]["skipped"] == true);
    // from step 2 the loss is that of a sane init, and it trains
    assert!(m[1]["loss"].as_f64().unwrap() < 1.2 * lnv, "{}", m[1]);
    assert!(m.last().unwrap()["loss"].as_f64().unwrap() < m[1]["loss"].as_f64().unwrap());
    // a non-finite first loss is a fault for the nonfinite detector, not a broken init
    let n = tmpdir("rescue-nan");
    ok(&train(&n, 5, &["--inject", "nan@1"]));
    let ev = events(&n);
    assert!(of_kind(&ev, "init_rescue").is_empty(), "{ev:?}");
    assert_eq!(of_kind(&ev, "skip")[0]["step"], 1);
    // unguarded: no rescue
    let u = tmpdir("rescue-off");
    ok(&train(
        &u,
        5,
        &["--set", "init.std=1.0", "--set", "guard.enabled=false"],
    ));
    assert!(of_kind(&events(&u), "init_rescue").is_empty());
}

/// Clean tiny runs (a few minutes): `cargo test --release -- --ignored clean_tiny`.
#[test]
#[ignore]
fn clean_tiny_runs_raise_no_events_over_five_seeds() {
    for seed in 1..=5 {
        let d = tmpdir(&format!("tiny{seed}"));
        let o = keel()
            .args(["train", "--preset", "tiny", "--steps", "150", "--out"])
            .arg(&d)
            .args(["--set", &format!("train.seed={seed}")])
            .args(["--set", &format!("init.seed={seed}")])
            .args(["--set", "train.batch_size=4"])
            .output()
            .unwrap();
        ok(&o);
        let det = live_detections(&events(&d));
        assert!(det.is_empty(), "seed {seed}: {det:?}");
    }
}

#[test]
fn watch_reads_csv_and_other_trainers_field_names() {
    let d = tmpdir("watch");
    let mut csv = String::from("iter,train_loss,gnorm\n");
    for i in 1..=100 {
        let l = 3.0 - i as f64 * 0.005 + if i % 3 == 0 { 0.02 } else { 0.0 };
        let l = if i == 70 { 9.0 } else { l };
        csv += &format!("{i},{l},1.0\n");
    }
    std::fs::write(d.join("log.csv"), &csv).unwrap();
    let o = keel()
        .args(["watch", "--json"])
        .arg(d.join("log.csv"))
        .args([
            "--field",
            "step=iter",
            "--field",
            "loss=train_loss",
            "--field",
            "grad_norm=gnorm",
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0));
    let out = String::from_utf8_lossy(&o.stdout);
    let v: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(v.len(), 1, "{out}");
    assert_eq!(
        (v[0]["step"].as_u64(), v[0]["detector"].as_str()),
        (Some(70), Some("loss_spike"))
    );
    // a run that blows up: exit 2
    let mut j = String::new();
    for i in 1..=100 {
        let l = if i < 60 { 3.0 - i as f64 * 0.01 } else { 50.0 };
        j += &format!("{{\"step\": {i}, \"loss\": {l}}}\n");
    }
    std::fs::write(d.join("m.jsonl"), &j).unwrap();
    let o = keel().arg("watch").arg(d.join("m.jsonl")).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stdout).contains("DIVERGENCE"));
    // bad input: a clear error, not a panic
    let o = keel()
        .args(["watch", "/nonexistent/log.jsonl"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("cannot open"));
}

#[test]
fn watch_follows_a_growing_log_and_stops_the_sidecar_on_divergence() {
    use std::io::Write;
    let d = tmpdir("follow");
    let path = d.join("live.jsonl");
    std::fs::write(&path, "").unwrap();
    let mut child = keel()
        .args(["watch", "--follow", "--json"])
        .arg(&path)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap();
    for i in 1..=80u64 {
        let l = if i < 60 { 3.0 - i as f64 * 0.005 } else { 40.0 };
        let line = format!("{{\"step\": {i}, \"loss\": {l}}}\n");
        if i == 30 {
            // a writer caught mid-line: the half line must wait for its end
            f.write_all(&line.as_bytes()[..7]).unwrap();
            f.flush().unwrap();
            std::thread::sleep(std::time::Duration::from_millis(400));
            f.write_all(&line.as_bytes()[7..]).unwrap();
        } else {
            f.write_all(line.as_bytes()).unwrap();
        }
        f.flush().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let t0 = std::time::Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(t0.elapsed().as_secs() < 20, "watch --follow did not stop");
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(2));
    let mut out = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut out).unwrap();
    let first: Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert_eq!(first["step"], 60, "{out}");
    assert!(out.contains("\"persistent\""), "{out}");
}

fn rss_kb(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// 10,000 micro steps with telemetry and the guard on: RSS flat, logs valid JSON lines
/// (about 3 minutes): `cargo test --release -- --ignored soak`.
#[test]
#[ignore]
fn soak_10000_micro_steps_memory_flat_logs_valid() {
    let d = tmpdir("soak");
    let mut child = keel()
        .args(["train", "--preset", "micro", "--steps", "10000", "--out"])
        .arg(&d)
        .args(["--set", "checkpoint.every=500", "--set", "eval.every=500"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let lines = || {
        std::fs::read_to_string(d.join("metrics.jsonl"))
            .map(|s| s.lines().count())
            .unwrap_or(0)
    };
    let (mut early, mut late) = (None, None);
    while child.try_wait().unwrap().is_none() {
        let n = lines();
        if n >= 500 && early.is_none() {
            early = rss_kb(child.id());
        }
        if n >= 9500 && late.is_none() {
            late = rss_kb(child.id());
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let (early, late) = (early.unwrap(), late.unwrap());
    assert!(
        late <= early + early / 20 + 4096,
        "RSS grew: {early} kB → {late} kB"
    );
    for f in ["metrics.jsonl", "telemetry.jsonl", "events.jsonl"] {
        for l in std::fs::read_to_string(d.join(f)).unwrap().lines() {
            serde_json::from_str::<Value>(l).unwrap();
        }
    }
    assert_eq!(lines(), 10000);
}

/// A run stopped inside an incident (its last checkpoint forced while the guard was still
/// judging a rollback) and resumed makes the same decisions and ends with the same weights as
/// the uninterrupted run: the forced checkpoint is a place to resume from, never a rollback
/// target, and a rollback that stays clean closes its incident so later snapshots count.
#[test]
fn a_run_resumed_from_inside_an_incident_decides_as_the_uninterrupted_one() {
    let common = [
        "--set",
        "schedule.kind=\"constant\"",
        "--set",
        "checkpoint.every=100",
    ];
    let a = tmpdir("incident-whole");
    let mut args: Vec<&str> = common.to_vec();
    args.extend(["--inject", "spike@120", "--inject", "spike@160"]);
    ok(&train(&a, 200, &args));
    let ev = events(&a);
    let rb: Vec<&Value> = of_kind(&ev, "rollback");
    assert_eq!(rb.len(), 2, "{ev:?}");
    // the second incident began after the first had settled: it has its own start
    assert!(
        rb[1]["detail"]["reason"].as_str().unwrap().contains("16"),
        "{}",
        rb[1]
    );
    // B: stopped at 123, inside the first incident (its last checkpoint is forced there)
    let b = tmpdir("incident-split");
    let mut args: Vec<&str> = common.to_vec();
    args.extend(["--inject", "spike@120"]);
    ok(&train(&b, 123, &args));
    let st: Value = serde_json::from_str(
        &std::fs::read_to_string(b.join("checkpoints/step-00000123/state.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(st["clean"], false, "{st}");
    let mut args: Vec<&str> = common.to_vec();
    args.extend(["--inject", "spike@160"]);
    ok(&train(&b, 200, &args));
    let key = |d: &Path| -> Vec<(u64, String, String, String)> {
        keel::train::read_jsonl(&d.join("metrics.jsonl"))
            .unwrap()
            .iter()
            .map(|m| {
                (
                    m["step"].as_u64().unwrap(),
                    m["loss"].to_string(),
                    m["lr"].to_string(),
                    m["grad_norm"].to_string(),
                )
            })
            .collect()
    };
    assert_eq!(key(&a), key(&b), "the resumed run decided differently");
    let rb_b: Vec<u64> = of_kind(&events(&b), "rollback")
        .iter()
        .map(|e| e["detail"]["to_step"].as_u64().unwrap())
        .collect();
    let rb_a: Vec<u64> = rb
        .iter()
        .map(|e| e["detail"]["to_step"].as_u64().unwrap())
        .collect();
    assert_eq!(rb_a, rb_b);
    let w =
        |d: &Path| std::fs::read(d.join("checkpoints/step-00000200/model.safetensors")).unwrap();
    assert!(w(&a) == w(&b), "final weights differ");
}
