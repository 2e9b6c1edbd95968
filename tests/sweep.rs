//! `keel sweep` end to end on the micro preset: trials as processes, a deliberately too-high
//! LR marked diverged, resume after the sweep is SIGKILLed, every output written, and the
//! `--emit list` + `keel sweep collect` path giving the same results.

mod common;
use common::{keel, tmpdir};

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// 3 LRs × 2 inits on micro; LR 3.0 is far past what micro survives.
fn write_spec(dir: &Path, steps: u64) -> PathBuf {
    let p = dir.join("sweep.toml");
    std::fs::write(
        &p,
        format!(
            r#"
[base]
model.preset = "micro"
train.steps = {steps}
train.batch_size = 4
data.builtin_bytes = 200000
schedule.warmup_steps = 5
eval.batches = 2
checkpoint.every = 25

[axes]
"optim.lr" = [1e-3, 1e-2, 3.0]
"init.scheme" = ["normal", "xavier-normal"]
"#
        ),
    )
    .unwrap();
    p
}

/// `keel [pre] sweep [flags] --config spec --out out`, ready to run.
fn sweep(pre: &[&str], flags: &[&str], spec: &Path, out: &Path) -> Command {
    let mut c = keel();
    c.args(pre)
        .arg("sweep")
        .args(flags)
        .arg("--config")
        .arg(spec)
        .arg("--out")
        .arg(out);
    c
}

fn results(dir: &Path) -> Vec<Value> {
    keel::train::read_jsonl(&dir.join("results.jsonl")).unwrap_or_default()
}

fn by_lr(rs: &[Value], lr: f64) -> Vec<&Value> {
    rs.iter()
        .filter(|r| r["axes"]["optim.lr"].as_f64() == Some(lr))
        .collect()
}

/// Steps 1..=n exactly once each: a resumed trial neither lost nor repeated a step.
fn assert_contiguous(metrics: &Path) {
    let m = keel::train::read_jsonl(metrics).unwrap();
    let steps: Vec<u64> = m.iter().map(|x| x["step"].as_u64().unwrap()).collect();
    let want: Vec<u64> = (1..=steps.len() as u64).collect();
    assert_eq!(steps, want, "{}", metrics.display());
}

fn check_outputs(out: &Path, steps: u64) {
    let rs = results(out);
    assert_eq!(rs.len(), 6, "one row per trial");
    for r in by_lr(&rs, 3.0) {
        assert_eq!(r["status"], "diverged", "{r}");
        let at = r["diverged_at"].as_u64().unwrap();
        // warm-up 5 + 10 steps above the initial loss at the latest
        assert!(at <= 15, "diverged at {at}");
        assert!(r["steps_done"].as_u64().unwrap() == at);
        // early warning: the passive detectors' first firings are recorded, before the end
        let spike = r["first_loss_spike"].as_u64();
        let attn = r["first_attn_warning"].as_u64();
        assert!(spike.or(attn).is_some_and(|s| s <= at), "{r}");
        assert!(r["peak_logit_z"].as_f64().is_some(), "{r}");
    }
    for lr in [1e-3, 1e-2] {
        for r in by_lr(&rs, lr) {
            assert_eq!(r["status"], "finished", "{r}");
            assert_eq!(r["steps_done"].as_u64(), Some(steps));
            assert!(r["final_loss"].as_f64().unwrap() < r["initial_loss"].as_f64().unwrap());
        }
    }
    let csv = std::fs::read_to_string(out.join("results.csv")).unwrap();
    assert_eq!(csv.lines().count(), 7);
    assert!(csv
        .lines()
        .next()
        .unwrap()
        .contains("final_loss,min_loss,diverged,diverged_at"));
    let s: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    let groups = s["groups"].as_array().unwrap();
    assert_eq!(groups.len(), 2, "one group per init scheme");
    for g in groups {
        assert_eq!(g["max_stable_lr"].as_f64(), Some(1e-2));
        assert_eq!(g["first_unstable_lr"].as_f64(), Some(3.0));
        assert_eq!(g["best_lr"].as_f64(), Some(1e-2), "{g}");
        // Wortsman: mean over the 3 LRs of min(loss, initial) − best; the diverged LR adds
        // initial − best, the best LR adds 0
        let l0 = g["initial_loss"].as_f64().unwrap();
        let best = g["best_loss"].as_f64().unwrap();
        let lo = g["loss"][0].as_f64().unwrap();
        let want = ((lo.min(l0) - best) + 0.0 + (l0 - best)) / 3.0;
        assert!((g["lr_sensitivity"].as_f64().unwrap() - want).abs() < 1e-9);
    }
    assert!(s["recommendation"]["scheme"].is_string());
    assert!(!s["recommendation"]["text"].as_array().unwrap().is_empty());
    for f in ["stability_map", "loss_vs_lr"] {
        for ext in ["svg", "png"] {
            let p = out.join("plots").join(format!("{f}.{ext}"));
            assert!(
                std::fs::metadata(&p)
                    .map(|m| m.len() > 2000)
                    .unwrap_or(false),
                "{}",
                p.display()
            );
        }
    }
    let svg = std::fs::read_to_string(out.join("plots/stability_map.svg")).unwrap();
    assert!(svg.contains("xavier-normal") && svg.contains("step"));
    // every trial is an ordinary run directory
    for r in &rs {
        let d = out.join("trials").join(r["id"].as_str().unwrap());
        assert!(d.join("config.toml").exists() && d.join("metrics.jsonl").exists());
        assert_contiguous(&d.join("metrics.jsonl"));
        if r["status"] == "finished" {
            assert!(d
                .join(format!("checkpoints/step-{steps:08}/model.safetensors"))
                .exists());
        }
    }
}

#[test]
fn sweep_resumes_after_kill_and_marks_divergence() {
    let dir = tmpdir("resume");
    let steps = 300;
    let spec = write_spec(&dir, steps);
    let out = dir.join("out");
    let run = || sweep(&["--threads", "2"], &["--jobs", "2"], &spec, &out);
    let mut child = run()
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // kill the sweep once two trials are done (others are mid-run)
    let t0 = Instant::now();
    while results(&out)
        .iter()
        .filter(|r| r["status"] == "finished" || r["status"] == "diverged")
        .count()
        < 2
    {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "sweep made no progress"
        );
        if child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    let before: Vec<(String, std::time::SystemTime)> = results(&out)
        .iter()
        .filter(|r| r["status"] == "finished" || r["status"] == "diverged")
        .map(|r| {
            let id = r["id"].as_str().unwrap().to_string();
            let m = std::fs::metadata(out.join("trials").join(&id).join("metrics.jsonl"))
                .unwrap()
                .modified()
                .unwrap();
            (id, m)
        })
        .collect();
    assert!(!before.is_empty());
    let o = run().output().unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{stdout}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(stdout.contains("Recommended scheme"), "{stdout}");
    // finished trials were not run again
    for (id, m) in before {
        let now = std::fs::metadata(out.join("trials").join(&id).join("metrics.jsonl"))
            .unwrap()
            .modified()
            .unwrap();
        assert_eq!(now, m, "{id} was re-run");
    }
    check_outputs(&out, steps);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn emit_list_then_collect() {
    let dir = tmpdir("emit");
    let steps = 40;
    let spec = write_spec(&dir, steps);
    let out = dir.join("out");
    let o = sweep(&[], &["--emit", "list", "--jobs", "2"], &spec, &out)
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let cmds = std::fs::read_to_string(out.join("commands.txt")).unwrap();
    assert_eq!(cmds.lines().count(), 6);
    assert!(!out.join("results.jsonl").exists(), "--emit runs nothing");
    for line in cmds.lines() {
        let st = Command::new("sh")
            .arg("-c")
            .arg(line)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap();
        // 2 = the trial diverged: a result, not an error
        assert!(matches!(st.code(), Some(0) | Some(2)), "{line}: {st}");
    }
    let o = keel()
        .args(["sweep", "collect"])
        .arg(&out)
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    check_outputs(&out, steps);
    let o = sweep(&[], &["--emit", "slurm", "--jobs", "3"], &spec, &out)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0));
    let sb = std::fs::read_to_string(out.join("sweep.sbatch")).unwrap();
    assert!(
        sb.contains("#SBATCH --array=0-5%3") && sb.contains("trials.txt"),
        "{sb}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_sweeps_are_refused_with_the_field() {
    let dir = tmpdir("bad");
    let p = dir.join("s.toml");
    std::fs::write(&p, "[axes]\n\"init.scheme\" = [\"normal\"]\n").unwrap();
    let o = sweep(&[], &[], &p, &dir.join("o")).output().unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(e.contains("s.toml") && e.contains("optim.lr"), "{e}");
    // an axis value the run config rejects names the trial and the key
    std::fs::write(&p, "[base]\nmodel.preset=\"micro\"\n[axes]\n\"optim.lr\" = [1e-3]\n\"train.batch_size\" = [\"four\"]\n").unwrap();
    let o = sweep(&[], &[], &p, &dir.join("o2")).output().unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(e.contains("train.batch_size"), "{e}");
    // a directory holding another sweep is not mixed into
    let good = write_spec(&dir, 10);
    let o = sweep(&[], &["--emit", "list"], &good, &dir.join("o3"))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0));
    std::fs::write(
        &p,
        "[base]\nmodel.preset=\"micro\"\n[axes]\n\"optim.lr\" = [1e-3, 2e-3]\n",
    )
    .unwrap();
    let o = sweep(&[], &["--emit", "list"], &p, &dir.join("o3"))
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(e.contains("different sweep"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A command sweep of tests/fixtures/sweep_trial.py (python3, no torch): 4 LRs × 2 widths.
fn command_spec(dir: &Path, extra: &str, command_tail: &str) -> PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sweep_trial.py");
    let p = dir.join("cmd.toml");
    std::fs::write(
        &p,
        format!(
            r#"
[trial]
command = ["python3", "{}", "--lr", "{{optim.lr}}", "--out", "{{dir}}", "--steps", "{{steps}}"{command_tail}]
steps = 150
metrics = "log.csv"
grace_s = 2
{extra}

[axes]
"optim.lr" = [0.001, 0.01, 0.1, 1.0]
"model.hidden_size" = [64, 128]
"#,
            script.display()
        ),
    )
    .unwrap();
    p
}

fn have_python() -> bool {
    Command::new("python3")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn command_trials_are_swept_and_diverging_ones_stopped_early() {
    if !have_python() {
        eprintln!("SKIPPED: no python3 to run the trial script");
        return;
    }
    let d = tmpdir("cmd-sweep");
    let spec = command_spec(&d, "", r#", "--width", "{model.hidden_size}""#);
    let out = d.join("out");
    let o = sweep(&["--threads", "2"], &["--jobs", "2"], &spec, &out)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    let stdout = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(o.status.success(), "{err}\n{stdout}");
    let rs = results(&out);
    assert_eq!(rs.len(), 8);
    // past the edge (LR 1.0 at both widths, 0.1 at width 128): stopped soon after step 20
    for r in &rs {
        let lr = r["axes"]["optim.lr"].as_f64().unwrap();
        let w = r["axes"]["model.hidden_size"].as_i64().unwrap();
        let past = lr > if w <= 64 { 0.5 } else { 0.05 };
        if past {
            assert_eq!(r["status"], "diverged", "{r}");
            assert_eq!(r["stopped_early"], true, "{r}");
            let at = r["diverged_at"].as_u64().unwrap();
            assert!((21..=40).contains(&at), "{r}");
            assert!(r["steps_done"].as_u64().unwrap() < 100, "not stopped: {r}");
        } else {
            assert_eq!(r["status"], "finished", "{r}");
            assert_eq!(r["steps_done"], 150, "{r}");
        }
    }
    // the map: max stable LR per width, and the compute the early stops saved
    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    let mut stable: Vec<(i64, f64)> = summary["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| {
            (
                g["group"]["model.hidden_size"].as_i64().unwrap(),
                g["max_stable_lr"].as_f64().unwrap(),
            )
        })
        .collect();
    stable.sort_by_key(|x| x.0);
    assert_eq!(stable, vec![(64, 0.1), (128, 0.01)]);
    // the optimal LR along width: one series, both widths, each seed's optimum on the grid
    let opt = &summary["recommendation"]["lr_opt_trends"];
    assert_eq!(opt.as_array().map(Vec::len), Some(1), "{opt}");
    let pts = opt[0]["points"].as_array().unwrap();
    assert_eq!(
        pts.iter()
            .map(|p| p["at"].as_f64().unwrap())
            .collect::<Vec<_>>(),
        vec![64.0, 128.0]
    );
    for p in pts {
        let lr = p["lr"].as_f64().unwrap();
        assert!((0.001..=0.1 * (1.0 + 1e-9)).contains(&lr), "{p}");
    }
    assert!(out.join("plots/optimal_lr_vs_width.svg").exists());
    assert_eq!(summary["compute"]["stopped"], 3);
    assert!(stdout.contains("compute saved"), "{stdout}");
    assert!(err.contains("diverged at step"), "{err}");
    // resume: nothing is run again
    let log = std::fs::read_to_string(
        out.join("trials")
            .join(rs[0]["id"].as_str().unwrap())
            .join("log.csv"),
    )
    .unwrap();
    let o = sweep(&["--threads", "2"], &["--jobs", "2"], &spec, &out)
        .output()
        .unwrap();
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("(8 done before)"));
    let again = std::fs::read_to_string(
        out.join("trials")
            .join(rs[0]["id"].as_str().unwrap())
            .join("log.csv"),
    )
    .unwrap();
    assert_eq!(log, again);
    // keel report draws the command sweep like any other
    let o = keel().arg("report").arg(&out).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // --emit writes each trial's command as a script that exports its axes
    let emit = d.join("emit");
    let o = sweep(&[], &["--emit", "list"], &spec, &emit)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let cmds = std::fs::read_to_string(emit.join("commands.txt")).unwrap();
    let first = cmds.lines().next().unwrap();
    assert!(
        first.starts_with("sh ") && first.ends_with("run.sh"),
        "{first}"
    );
    let sh = std::fs::read_to_string(first.trim_start_matches("sh ")).unwrap();
    assert!(
        sh.contains("export KEEL_AXIS_OPTIM_LR=") && sh.contains("--width 64"),
        "{sh}"
    );
    // run two emitted trials as a job runner would (nobody follows them), then collect: the
    // one that blew up is judged from its log, as a followed one would have been stopped
    for l in cmds
        .lines()
        .filter(|l| l.contains("-d64-lr1e-3/") || l.contains("-d64-lr1/"))
    {
        let st = Command::new("sh")
            .arg(l.trim_start_matches("sh "))
            .status()
            .unwrap();
        assert!(st.success(), "{l}");
    }
    let o = keel()
        .args(["sweep", "collect"])
        .arg(&emit)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rs = results(&emit);
    let get = |lr: f64| {
        by_lr(&rs, lr)
            .into_iter()
            .find(|r| r["axes"]["model.hidden_size"] == 64)
            .unwrap()
            .clone()
    };
    let (stable, blew) = (get(0.001), get(1.0));
    assert_eq!(stable["status"], "finished", "{stable}");
    assert_eq!(blew["status"], "diverged", "{blew}");
    assert_eq!(blew["stopped_early"], false);
    assert_eq!(blew["steps_done"], 150, "it ran to the end: {blew}");
    assert!(
        (21..=40).contains(&blew["diverged_at"].as_u64().unwrap()),
        "{blew}"
    );
}

#[test]
fn command_trials_that_fail_or_cannot_be_read_are_reported_not_diverged() {
    if !have_python() {
        eprintln!("SKIPPED: no python3 to run the trial script");
        return;
    }
    let d = tmpdir("cmd-bad");
    // the script fails: exit code and its last stderr line, not "diverged"
    let spec = command_spec(
        &d,
        "env = { FAIL = \"1\" }",
        r#", "--width", "{model.hidden_size}""#,
    );
    let out = d.join("fail");
    let o = sweep(&[], &["--jobs", "2"], &spec, &out).output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    let rs = results(&out);
    assert!(
        rs.iter()
            .all(|r| r["status"] == "failed" && r["diverged"] == false),
        "{rs:?}"
    );
    assert_eq!(rs[0]["exit_code"], 7);
    assert!(
        rs[0]["error"]
            .as_str()
            .unwrap()
            .contains("CUDA out of memory"),
        "{}",
        rs[0]
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("FAILED (exit 7)") && err.contains("CUDA out of memory"),
        "{err}"
    );
    // a log without a loss field keel knows: reported with the fix
    let spec = command_spec(
        &d,
        "env = { LOSS_NAME = \"objective\" }",
        r#", "--width", "{model.hidden_size}""#,
    );
    let out = d.join("noloss");
    let o = sweep(&[], &["--jobs", "2"], &spec, &out).output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    let rs = results(&out);
    assert!(
        rs[0]["error"].as_str().unwrap().contains("trial.fields"),
        "{}",
        rs[0]
    );
    // bad templates and programs are refused before anything runs, naming the field
    let spec = command_spec(&d, "", r#", "--width", "{model.hiden_size}""#);
    let o = sweep(&[], &[], &spec, &d.join("x1")).output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("trial.command[") && err.contains("names no axis"),
        "{err}"
    );
    // an axis no placeholder uses: allowed (the environment has it), with a warning
    let spec = command_spec(&d, "", r#", "--width", "64""#);
    let o = sweep(&[], &["--emit", "list"], &spec, &d.join("x2"))
        .output()
        .unwrap();
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("KEEL_AXIS_MODEL_HIDDEN_SIZE"));
    let p = d.join("cmd.toml");
    let text = std::fs::read_to_string(&p)
        .unwrap()
        .replace("\"python3\"", "\"pythonnn3\"");
    std::fs::write(&p, text).unwrap();
    let o = sweep(&[], &[], &p, &d.join("x3")).output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("not found on PATH"));
}
