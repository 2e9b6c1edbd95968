//! `keel watch` as a sidecar on other people's logs: every format and name a trainer writes
//! is read (or refused with the fix), non-finite values are seen, a followed log that is
//! replaced or rewritten starts a fresh history, and usage errors never exit 2 ("diverged").

mod common;
use common::{keel, tmpdir};

use serde_json::Value;
use std::io::Write;
use std::path::Path;
use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

fn watch(args: &[&str], file: &Path) -> Output {
    keel().arg("watch").args(args).arg(file).output().unwrap()
}

fn code(o: &Output) -> i32 {
    o.status.code().unwrap()
}

fn err(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// (step, detector) of each JSON event on stdout.
fn detections(o: &Output) -> Vec<(u64, String)> {
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (
                v["step"].as_u64().unwrap(),
                v["detector"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// A healthy, slowly decreasing loss with a little noise.
fn healthy(i: u64) -> f64 {
    3.0 - i as f64 * 0.005 + if i.is_multiple_of(3) { 0.02 } else { 0.0 }
}

#[test]
fn python_nonfinite_tokens_are_read_as_the_numbers_they_are() {
    let d = tmpdir("w-nan");
    for tok in ["NaN", "Infinity", "-Infinity"] {
        // what json.dumps writes: 29 good steps, then 30 non-finite ones
        let mut s = String::new();
        for i in 1..=59u64 {
            let l = if i <= 29 {
                format!("{}", healthy(i))
            } else {
                tok.to_string()
            };
            s += &format!("{{\"step\": {i}, \"loss\": {l}, \"grad_norm\": 1.0}}\n");
        }
        let f = d.join(format!("{tok}.jsonl"));
        std::fs::write(&f, s).unwrap();
        let o = watch(&["--json"], &f);
        assert_eq!(code(&o), 2, "{tok}: {}", err(&o));
        let det = detections(&o);
        assert_eq!(det[0], (30, "nonfinite".to_string()), "{tok}: {det:?}");
        assert!(det.iter().any(|(_, k)| k == "persistent"), "{det:?}");
    }
}

#[test]
fn common_field_names_and_formats_are_recognised() {
    let d = tmpdir("w-names");
    // nanoGPT-ish CSV names, no --field given: the spike at 70 is seen
    let mut csv = String::from("iter,train_loss,gnorm\n");
    for i in 1..=100u64 {
        let l = if i == 70 { 9.0 } else { healthy(i) };
        csv += &format!("{i},{l},1.0\n");
    }
    let f = d.join("log.csv");
    std::fs::write(&f, &csv).unwrap();
    let o = watch(&["--json"], &f);
    assert_eq!(code(&o), 0, "{}", err(&o));
    assert_eq!(detections(&o), vec![(70, "loss_spike".to_string())]);
    assert!(err(&o).contains("train_loss"), "{}", err(&o));
    // Lightning / W&B style JSON lines: train/loss, trainer/global_step
    let mut j = String::new();
    for i in 1..=100u64 {
        let l = if i < 60 { healthy(i) } else { 50.0 };
        j += &format!("{{\"trainer/global_step\": {i}, \"train/loss\": {l}}}\n");
    }
    let f = d.join("wandb.jsonl");
    std::fs::write(&f, &j).unwrap();
    let o = watch(&["--json"], &f);
    assert_eq!(code(&o), 2, "{}", err(&o));
    assert_eq!(detections(&o)[0].0, 60);
    // HF Trainer's trainer_state.json: log_history rows, eval rows and the closing summary
    let mut rows = Vec::new();
    for i in 1..=60u64 {
        let l = if i < 40 { healthy(i) } else { 30.0 };
        rows.push(serde_json::json!({"step": i, "loss": l, "grad_norm": 1.0, "learning_rate": 1e-3, "epoch": 0.1}));
        if i % 20 == 0 {
            rows.push(serde_json::json!({"step": i, "eval_loss": 2.0}));
        }
    }
    rows.push(serde_json::json!({"step": 60, "train_loss": 9.0, "train_runtime": 100.0}));
    let st = serde_json::json!({"global_step": 60, "log_history": rows});
    let f = d.join("trainer_state.json");
    std::fs::write(&f, serde_json::to_string_pretty(&st).unwrap()).unwrap();
    let o = watch(&["--json"], &f);
    assert_eq!(code(&o), 2, "{}", err(&o));
    assert_eq!(detections(&o)[0], (40, "loss_spike".to_string()));
    // text logs: nanoGPT's prints and Megatron's
    let mut t = String::from("step 0: train loss 4.2800, val loss 4.2900\n");
    for i in 0..=80u64 {
        let l = if i < 50 { healthy(i) } else { f64::NAN };
        t += &format!("iter {i}: loss {l:.4}, time 101.20ms, mfu 12.00%\n");
    }
    let f = d.join("train.log");
    std::fs::write(&f, &t).unwrap();
    let o = watch(&["--json"], &f);
    assert_eq!(code(&o), 2, "{}", err(&o));
    assert_eq!(detections(&o)[0], (50, "nonfinite".to_string()));
    let mut t = String::new();
    for i in 1..=80u64 {
        let l = if i == 50 { 40.0 } else { healthy(i) };
        t += &format!(
            " iteration {i:>8}/     100 | consumed samples: {} | lm loss: {l:.6E} | grad norm: 1.234 | number of skipped iterations:   0 |\n",
            i * 32
        );
    }
    let f = d.join("megatron.out");
    std::fs::write(&f, &t).unwrap();
    let o = watch(&["--json"], &f);
    assert_eq!(code(&o), 0, "{}", err(&o));
    assert_eq!(detections(&o), vec![(50, "loss_spike".to_string())]);
}

#[test]
fn logs_keel_cannot_judge_are_refused_with_the_fix() {
    let d = tmpdir("w-refuse");
    // fields it does not know: exit 1 naming them and the --field that maps them
    let mut j = String::new();
    for i in 1..=40u64 {
        j += &format!("{{\"it\": {i}, \"objective_loss\": 2.0, \"speed\": 3.0}}\n");
    }
    let f = d.join("odd.jsonl");
    std::fs::write(&f, &j).unwrap();
    let o = watch(&[], &f);
    assert_eq!(code(&o), 1, "{}", err(&o));
    let e = err(&o);
    assert!(e.contains("objective_loss") && e.contains("speed"), "{e}");
    assert!(e.contains("--field loss=objective_loss"), "{e}");
    // with the mapping it reads them
    let o = watch(&["--field", "loss=objective_loss"], &f);
    assert_eq!(code(&o), 0, "{}", err(&o));
    // a short file with no loss field is refused too, at its end
    std::fs::write(&f, "{\"a\": 1}\n{\"a\": 2}\n").unwrap();
    assert_eq!(code(&watch(&[], &f)), 1);
    // a CSV with only a header of unknown names
    std::fs::write(d.join("h.csv"), "x,y\n1,2\n").unwrap();
    let o = watch(&[], &d.join("h.csv"));
    assert_eq!(code(&o), 1);
    assert!(err(&o).contains("x, y"), "{}", err(&o));
    // a CSV without a header
    std::fs::write(d.join("nohead.csv"), "1,3.0,1.0\n2,2.9,1.0\n").unwrap();
    let o = watch(&[], &d.join("nohead.csv"));
    assert_eq!(code(&o), 1);
    assert!(err(&o).contains("not a header"), "{}", err(&o));
    // a binary file that is no event file either
    std::fs::write(d.join("blob.bin"), b"\x89PNG\x00\x00\x00\x0dIHDR").unwrap();
    let o = watch(&[], &d.join("blob.bin"));
    assert_eq!(code(&o), 1);
    assert!(err(&o).contains("not a text log"), "{}", err(&o));
    // an event file cut inside its first record: said so, and nothing to judge
    std::fs::write(
        d.join("events.out.tfevents.1"),
        b"\x18\x00\x00\x00\x00\x00\x00\x00\xa3\x7f",
    )
    .unwrap();
    let o = watch(&[], &d.join("events.out.tfevents.1"));
    assert_eq!(code(&o), 1);
    assert!(err(&o).contains("no scalars"), "{}", err(&o));
    // an empty file (without --follow there is nothing to wait for)
    std::fs::write(d.join("empty.jsonl"), "").unwrap();
    let o = watch(&[], &d.join("empty.jsonl"));
    assert_eq!(code(&o), 1);
    assert!(err(&o).contains("--follow"), "{}", err(&o));
    // HF JSON without log_history
    std::fs::write(d.join("config.json"), "{\n \"a\": 1\n}\n").unwrap();
    assert_eq!(code(&watch(&[], &d.join("config.json"))), 1);
}

#[test]
fn quoted_commas_stay_in_their_cell() {
    let d = tmpdir("w-quote");
    let mut csv = String::from("step,note,loss,grad_norm\n");
    for i in 1..=100u64 {
        csv += &format!("{i},\"lr 3e-4, warmup, 100\",{},1.0\n", healthy(i));
    }
    let f = d.join("q.csv");
    std::fs::write(&f, &csv).unwrap();
    let o = watch(&["--json"], &f);
    assert_eq!(code(&o), 0, "{}", err(&o));
    assert!(detections(&o).is_empty(), "{:?}", detections(&o));
}

#[test]
fn usage_errors_exit_1_not_the_divergence_code() {
    let d = tmpdir("w-usage");
    let f = d.join("m.jsonl");
    std::fs::write(&f, "{\"loss\": 1.0}\n").unwrap();
    for args in [
        vec!["watch"],
        vec!["watch", "--folow", f.to_str().unwrap()],
        vec!["sample", "--model", "x", "--temperature", "-1"],
        vec!["train", "--steps", "many"],
        vec!["no-such-command"],
    ] {
        let o = keel().args(&args).output().unwrap();
        assert_eq!(code(&o), 1, "{args:?}: {}", err(&o));
    }
    for args in [vec!["--help"], vec!["watch", "--help"], vec!["--version"]] {
        let o = keel().args(&args).output().unwrap();
        assert_eq!(code(&o), 0, "{args:?}");
    }
}

fn spawn_follow(path: &Path) -> Child {
    keel()
        .args(["watch", "--follow", "--json"])
        .arg(path)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn wait_exit(child: &mut Child, secs: u64) -> (i32, String, String) {
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t0.elapsed().as_secs() > secs {
            let _ = child.kill();
            panic!("watch --follow did not stop within {secs} s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut out = String::new();
    let mut e = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut out).unwrap();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut e).unwrap();
    (status.code().unwrap(), out, e)
}

fn lines(from: u64, to: u64, loss: impl Fn(u64) -> String) -> String {
    (from..=to)
        .map(|i| format!("{{\"step\": {i}, \"loss\": {}}}\n", loss(i)))
        .collect()
}

#[test]
fn follow_waits_for_a_log_that_does_not_exist_yet() {
    let d = tmpdir("w-later");
    let path = d.join("later.jsonl");
    let mut child = spawn_follow(&path);
    std::thread::sleep(Duration::from_millis(800));
    let new = lines(1, 20, |i| healthy(i).to_string()) + &lines(21, 40, |_| "NaN".into());
    std::fs::write(&path, new).unwrap();
    let (c, out, e) = wait_exit(&mut child, 20);
    assert_eq!(c, 2, "{out}\n{e}");
    assert!(e.contains("waiting for"), "{e}");
    assert!(out.contains("\"nonfinite\""), "{out}");
}

#[test]
fn follow_by_name_sees_a_replaced_log() {
    let d = tmpdir("w-rename");
    let path = d.join("live.jsonl");
    std::fs::write(&path, lines(1, 40, |i| healthy(i).to_string())).unwrap();
    let mut child = spawn_follow(&path);
    std::thread::sleep(Duration::from_millis(800));
    // the trainer restarts and its log is replaced by rename (an atomic rewrite, rotation)
    let tmp = d.join("live.jsonl.tmp");
    let new = lines(1, 20, |i| healthy(i).to_string()) + &lines(21, 40, |_| "NaN".into());
    std::fs::write(&tmp, new).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    let (c, out, e) = wait_exit(&mut child, 20);
    assert_eq!(c, 2, "{out}\n{e}");
    assert!(e.contains("replaced"), "{e}");
    assert!(out.contains("\"nonfinite\""), "{out}");
}

#[test]
fn follow_starts_a_fresh_history_when_the_log_is_rewritten() {
    let d = tmpdir("w-trunc");
    let path = d.join("live.jsonl");
    // a run that trained down to ~1.0
    std::fs::write(
        &path,
        lines(1, 200, |i| {
            format!(
                "{}",
                1.0 + 2.0 * (-(i as f64) / 20.0).exp() + 0.001 * (i % 3) as f64
            )
        }),
    )
    .unwrap();
    let mut child = spawn_follow(&path);
    std::thread::sleep(Duration::from_millis(800));
    // the same path rewritten by a new run from its start (loss back at 3): not a divergence
    let mut f = std::fs::File::create(&path).unwrap();
    f.write_all(lines(1, 30, |i| healthy(i).to_string()).as_bytes())
        .unwrap();
    f.flush().unwrap();
    std::thread::sleep(Duration::from_millis(1000));
    // and a rewrite that is as long as before (no shrink to see): the first line changed
    let mut long = lines(1, 200, |i| format!("{}", 2.5 + 0.0001 * (i % 5) as f64));
    long += &lines(201, 230, |_| "NaN".into());
    std::fs::write(&path, long).unwrap();
    let (c, out, e) = wait_exit(&mut child, 20);
    assert_eq!(c, 2, "{out}\n{e}");
    assert!(e.contains("fresh history"), "{e}");
    let first: Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert_eq!(first["step"], 201, "a false alarm before the NaNs: {out}");
}

/// The fixtures of scripts/make_tensorboard_fixtures.py: 60 falling steps, then a loss
/// growing 12% a step from step 61.
fn tb_fixture(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tensorboard")
        .join(name)
}

fn only_event_file(dir: &Path) -> std::path::PathBuf {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(v.len(), 1, "{v:?}");
    v.pop().unwrap()
}

#[test]
fn tensorboard_logs_of_torch_and_lightning_are_watched() {
    // SummaryWriter with HF's tags (simple_value), with new_style tensors, and Lightning's
    // logger (a log directory of two runs: the newest is read)
    for (name, loss_tag) in [
        ("torch_hf_tags", "train/loss"),
        ("torch_new_style", "loss"),
        ("lightning", "train_loss"),
    ] {
        let o = watch(&["--json"], &tb_fixture(name));
        assert_eq!(code(&o), 2, "{name}: {}", err(&o));
        let d = detections(&o);
        assert_eq!(d[0], (62, "loss_spike".to_string()), "{name}: {d:?}");
        assert_eq!(d.last().unwrap(), &(64, "persistent".to_string()), "{name}");
        assert!(
            err(&o).contains(&format!("loss ← \"{loss_tag}\"")),
            "{}",
            err(&o)
        );
    }
    // the older Lightning run (30 clean steps), given as its own directory: nothing to see
    let o = watch(&[], &tb_fixture("lightning/version_0"));
    assert_eq!(code(&o), 0, "{}", err(&o));
    assert!(err(&o).contains("30 steps read"), "{}", err(&o));
}

#[test]
fn torn_and_corrupt_event_files_are_reported_not_trusted() {
    let d = tmpdir("w-tb-bad");
    let src = std::fs::read(only_event_file(&tb_fixture("torch_hf_tags"))).unwrap();
    // records: the file-version event, then one per add_scalar (loss, grad_norm, lr per step)
    let mut offsets = vec![];
    let mut i = 0usize;
    while i < src.len() {
        offsets.push(i);
        i += 16 + u64::from_le_bytes(src[i..i + 8].try_into().unwrap()) as usize;
    }
    assert_eq!(offsets.len(), 1 + 3 * 80);
    // step 62's loss record (the first spike) corrupted: its value is not trusted, so the
    // first spike seen is step 63's
    let mut bad = src.clone();
    let at = offsets[1 + 3 * 61] + 20;
    bad[at] ^= 0x40;
    // and the last record torn (a writer killed mid-write)
    bad.truncate(src.len() - 3);
    let f = d.join("events.out.tfevents.1.host");
    std::fs::write(&f, &bad).unwrap();
    let o = watch(&["--json"], &f);
    let e = err(&o);
    assert_eq!(code(&o), 2, "{e}");
    assert!(e.contains("fails its CRC check"), "{e}");
    assert!(e.contains("torn write"), "{e}");
    let det = detections(&o);
    assert_eq!(det[0], (63, "loss_spike".to_string()), "{det:?}");
    // a clean prefix, torn inside the first diverging step: no divergence, and said so
    std::fs::write(&f, &src[..offsets[1 + 3 * 60] + 9]).unwrap();
    let o = watch(&[], &f);
    assert_eq!(code(&o), 0, "{}", err(&o));
    assert!(err(&o).contains("60 steps read"), "{}", err(&o));
    // garbage with an event file's name: refused or empty, never a divergence or a panic
    std::fs::write(&f, b"not an event file at all, just text").unwrap();
    let o = watch(&[], &f);
    assert_eq!(code(&o), 1, "{}", err(&o));
    assert!(err(&o).contains("header"), "{}", err(&o));
}

#[test]
fn follow_reads_a_growing_event_file_and_a_restarted_writers_new_file() {
    use keel::tensorboard::EventWriter;
    let d = tmpdir("w-tb-follow");
    let run = d.join("runs").join("exp1");
    let mut w = EventWriter::create(&run).unwrap();
    for s in 1..=40u64 {
        w.scalars(s as i64, &[("train/loss", healthy(s))]).unwrap();
    }
    w.flush().unwrap();
    let mut child = spawn_follow(&d);
    std::thread::sleep(Duration::from_millis(1500));
    // more steps on the same file, then the job restarts from step 40's checkpoint: a new
    // file, whose loss goes non-finite
    for s in 41..=45u64 {
        w.scalars(s as i64, &[("train/loss", healthy(s))]).unwrap();
    }
    w.flush().unwrap();
    std::thread::sleep(Duration::from_millis(1200));
    drop(w);
    std::thread::sleep(Duration::from_millis(1100)); // the new file's name has a later second
    let mut w2 = EventWriter::create(&run).unwrap();
    for s in 41..=60u64 {
        let v = if s > 50 { f64::NAN } else { healthy(s) };
        w2.scalars(s as i64, &[("train/loss", v)]).unwrap();
    }
    w2.flush().unwrap();
    let (c, out, e) = wait_exit(&mut child, 30);
    assert_eq!(c, 2, "{out}\n{e}");
    assert!(e.contains("went back from 45 to 41"), "{e}");
    assert!(out.contains("\"nonfinite\""), "{out}");
}
