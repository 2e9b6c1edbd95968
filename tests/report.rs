//! `keel report` for a run, a sweep and a check: one self-contained report.html with its
//! plots, opened in headless Chromium (Debian's `chromium`, which `.ci/run` installs): the
//! screenshot is not blank and the DOM holds the figures.

mod common;
use common::{keel, tmpdir};

use std::path::{Path, PathBuf};
use std::process::Command;

fn ok(c: &mut Command) -> String {
    let o = c.output().unwrap();
    assert!(
        o.status.success(),
        "{:?}: {}\n{}",
        c,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).to_string()
}

fn chromium() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    for name in ["chromium", "chromium-browser", "google-chrome", "chrome"] {
        for d in std::env::split_paths(&path) {
            let p = d.join(name);
            if p.is_file() {
                return Some(p);
            }
        }
    }
    None
}

/// Self-contained: no scripts, nothing fetched (the SVG namespace URI is a name, not a fetch).
fn assert_offline(html: &str) {
    assert!(!html.contains("<script"), "report has a script");
    let stripped = html.replace("http://www.w3.org/2000/svg", "");
    for bad in ["http://", "https://", "<link", "@import", "url("] {
        assert!(!stripped.contains(bad), "report references {bad}");
    }
}

/// Open in headless Chromium: DOM dump and a screenshot; the screenshot must show the
/// plots (many non-white pixels, the plot palette present).
fn browse(html: &Path, want_ids: &[&str], min_svgs: usize) {
    let Some(chrome) = chromium() else {
        assert!(
            std::env::var_os("KEEL_REQUIRE_CHROMIUM").is_none(),
            "chromium not found, but .ci/run installed it (KEEL_REQUIRE_CHROMIUM)"
        );
        eprintln!("SKIPPED the browser part: no chromium on PATH (apt-get install chromium)");
        return;
    };
    let dir = html.parent().unwrap();
    let profile = dir.join("chrome-profile");
    let url = format!("file://{}", html.canonicalize().unwrap().display());
    let base = |c: &mut Command| {
        c.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.display()));
    };
    let mut c = Command::new(&chrome);
    base(&mut c);
    let dom = ok(c.arg("--dump-dom").arg(&url));
    let svgs = dom.matches("<svg").count();
    assert!(
        svgs >= min_svgs,
        "{svgs} inline SVGs in the DOM, want ≥ {min_svgs}"
    );
    for id in want_ids {
        assert!(dom.contains(&format!("id=\"{id}\"")), "no #{id} in the DOM");
    }
    let shot = dir.join("screenshot.png");
    let mut c = Command::new(&chrome);
    base(&mut c);
    ok(c.arg(format!("--screenshot={}", shot.display()))
        .arg("--window-size=1280,2400")
        .arg(&url));
    let dec = png::Decoder::new(std::fs::File::open(&shot).unwrap());
    let mut reader = dec.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    let ch = info.color_type.samples();
    let px: Vec<&[u8]> = buf[..info.buffer_size()].chunks(ch).collect();
    let non_white = px
        .iter()
        .filter(|p| p[0] < 235 || p[1] < 235 || p[2] < 235)
        .count();
    let frac = non_white as f64 / px.len() as f64;
    assert!(
        frac > 0.05,
        "screenshot nearly blank ({:.1}% ink)",
        frac * 100.0
    );
    // the plots' colours are there (Tableau blue/orange, or viridis purple), not just text
    let near = |p: &[u8], c: (i32, i32, i32)| {
        (p[0] as i32 - c.0).abs() < 30
            && (p[1] as i32 - c.1).abs() < 30
            && (p[2] as i32 - c.2).abs() < 30
    };
    let coloured = px
        .iter()
        .filter(|p| {
            near(p, (31, 119, 180))
                || near(p, (255, 127, 14))
                || near(p, (68, 1, 84))
                || near(p, (214, 39, 40))
        })
        .count();
    assert!(
        coloured > 500,
        "only {coloured} plot-coloured pixels in the screenshot"
    );
    let _ = std::fs::remove_dir_all(&profile);
}

#[test]
fn run_report_renders() {
    let dir = tmpdir("run");
    let run = dir.join("run");
    let out = ok(keel()
        .args([
            "--threads",
            "2",
            "train",
            "--preset",
            "micro",
            "--steps",
            "60",
            "--out",
        ])
        .arg(&run)
        .args([
            "--set",
            "data.builtin_bytes=200000",
            "--set",
            "train.batch_size=4",
            "--set",
            "checkpoint.every=20",
            "--set",
            "eval.every=20",
            "--inject",
            "nan@30",
        ]));
    // the terminal summary names the report
    assert!(
        out.contains("report") && out.contains("report.html"),
        "{out}"
    );
    let html = std::fs::read_to_string(run.join("report.html")).unwrap();
    // one set of figures: every labelled figure of the summary is on the page, same value
    let fig = keel::train::figures_of(&run);
    for (label, value) in fig.rows() {
        assert!(
            out.contains(&label) && out.contains(&value),
            "summary lacks {label} {value}: {out}"
        );
        assert!(
            html.contains(&label) && html.contains(&value),
            "report lacks {label} {value}"
        );
    }
    assert!(
        fig.guard_events >= 2,
        "the NaN's detection and skip: {fig:?}"
    );
    assert_offline(&html);
    for id in [
        "fig-loss",
        "fig-lr",
        "fig-grad_norm",
        "fig-update_ratio",
        "fig-attn_logit",
        "fig-logit_drift",
        "fig-layer_grad_norm",
        "fig-rms_vs_depth",
    ] {
        assert!(html.contains(&format!("id=\"{id}\"")), "no {id}");
    }
    // the injected NaN is marked on the loss plot and listed
    assert!(
        html.contains(">skip<"),
        "skip event not in the events table"
    );
    assert!(html.contains("[model]"), "resolved config missing");
    for p in [
        "loss",
        "lr",
        "grad_norm",
        "update_ratio",
        "attn_logit",
        "logit_drift",
        "layer_grad_norm",
        "rms_vs_depth",
    ] {
        for ext in ["svg", "png"] {
            let f = run.join("plots").join(format!("{p}.{ext}"));
            assert!(
                std::fs::metadata(&f)
                    .map(|m| m.len() > 1500)
                    .unwrap_or(false),
                "{}",
                f.display()
            );
        }
    }
    let loss_svg = std::fs::read_to_string(run.join("plots/loss.svg")).unwrap();
    assert!(
        loss_svg.contains("spike, skip"),
        "the skip is not marked on the loss plot"
    );
    browse(
        &run.join("report.html"),
        &["fig-loss", "fig-layer_grad_norm", "status", "events"],
        9,
    );
    // `keel report` on the same directory rewrites it the same way
    let o = ok(keel().arg("report").arg(&run));
    assert!(o.contains("report.html"));
    compare_with_a_tensorboard_run(&dir, &run);
    let _ = std::fs::remove_dir_all(&dir);
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        let q = to.join(p.file_name().unwrap());
        if p.is_dir() {
            copy_dir(&p, &q);
        } else {
            std::fs::copy(&p, &q).unwrap();
        }
    }
}

/// A TensorBoard log (Lightning's logger, 80 steps diverging from 61) drawn as a run, and
/// beside a keel run (60 steps, a skip at 30) on one comparison page.
fn compare_with_a_tensorboard_run(dir: &Path, run: &Path) {
    let tb = dir.join("tb");
    copy_dir(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tensorboard/lightning"),
        &tb,
    );
    ok(keel().arg("report").arg(&tb));
    let html = std::fs::read_to_string(tb.join("report.html")).unwrap();
    assert!(html.contains("TensorBoard events"), "source not named");
    assert!(html.contains("loss ← train_loss"), "tag mapping not shown");
    assert!(html.contains("id=\"fig-loss\"") && html.contains("id=\"fig-grad_norm\""));
    assert!(!html.contains("fig-lr\""), "no LR was logged: no LR plot");
    // several runs need a directory of their own
    let o = keel().arg("report").arg(run).arg(&tb).output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--out"));
    let cmp = dir.join("cmp");
    ok(keel()
        .arg("report")
        .arg(run)
        .arg(&tb)
        .arg("--out")
        .arg(&cmp));
    let html = std::fs::read_to_string(cmp.join("report.html")).unwrap();
    assert_offline(&html);
    // the key numbers side by side: steps 60 and 80, the keel run's one skip
    let row = |name: &str| {
        let i = html
            .find(&format!("<td>{name}</td>"))
            .unwrap_or_else(|| panic!("no row {name}"));
        html[i..i + html[i..].find("</tr>").unwrap()].to_string()
    };
    assert!(row("run").contains("<td>60</td>"), "{}", row("run"));
    assert!(row("tb").contains("<td>80</td>"), "{}", row("tb"));
    assert!(
        row("run").contains("<td>1</td>"),
        "one skip: {}",
        row("run")
    );
    let loss = std::fs::read_to_string(cmp.join("plots/loss.svg")).unwrap();
    assert!(
        loss.contains(">\nrun\n<") && loss.contains(">\ntb\n<"),
        "legend lacks a run"
    );
    assert!(
        loss.contains("run: skip"),
        "the skip is not marked in the run's colour"
    );
    // validation loss only in the keel run: drawn, and said so
    assert!(
        html.contains("only in run"),
        "the one-run plot is not labelled"
    );
    browse(
        &cmp.join("report.html"),
        &["numbers", "curves", "fig-loss", "fig-val_loss"],
        5,
    );
}

#[test]
fn sweep_and_check_reports_render() {
    let dir = tmpdir("sweep");
    let spec = dir.join("sweep.toml");
    std::fs::write(
        &spec,
        "[base]\nmodel.preset = \"micro\"\ntrain.steps = 30\ntrain.batch_size = 4\ndata.builtin_bytes = 200000\nschedule.warmup_steps = 5\n[axes]\n\"optim.lr\" = [1e-3, 1e-2, 3.0]\n\"init.scheme\" = [\"normal\", \"xavier-normal\"]\n",
    )
    .unwrap();
    let sw = dir.join("sw");
    ok(keel()
        .args(["--threads", "2", "sweep", "--jobs", "2", "--config"])
        .arg(&spec)
        .arg("--out")
        .arg(&sw));
    ok(keel().arg("report").arg(&sw));
    let html = std::fs::read_to_string(sw.join("report.html")).unwrap();
    assert_offline(&html);
    for id in [
        "fig-stability_map",
        "fig-loss_vs_lr",
        "recommendation",
        "sensitivity",
        "trials",
    ] {
        assert!(html.contains(&format!("id=\"{id}\"")), "no {id}");
    }
    assert!(html.contains("Recommended scheme") && html.contains("diverged"));
    browse(
        &sw.join("report.html"),
        &["fig-stability_map", "sensitivity"],
        2,
    );

    let ck = dir.join("check");
    let o = keel()
        .args(["check", "--preset", "micro", "--init", "all", "--out"])
        .arg(&ck)
        .output()
        .unwrap();
    assert!(matches!(o.status.code(), Some(0) | Some(4)));
    ok(keel().arg("report").arg(&ck));
    let html = std::fs::read_to_string(ck.join("report.html")).unwrap();
    assert_offline(&html);
    assert!(
        html.contains("id=\"fig-rms_vs_depth\"")
            && html.contains("xavier-normal")
            && html.contains("initial loss")
    );
    browse(&ck.join("report.html"), &["fig-rms_vs_depth", "init"], 2);
    // the cards count gates (six per scheme), each gate shows its threshold
    let n_schemes = html.matches("<summary>init ").count();
    assert!(n_schemes > 1, "{n_schemes}");
    assert!(
        html.contains("gates PASS") && html.contains("PASS ≤"),
        "cards/thresholds"
    );
    // a 7B config is measured on a proxy, and the page says so
    let big = dir.join("check-7b");
    let hf = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/hf/llama2-7b.json");
    let o = keel()
        .args(["check", "--hf", hf, "--out"])
        .arg(&big)
        .output()
        .unwrap();
    assert!(o.status.code().is_some());
    ok(keel().arg("report").arg(&big));
    let html = std::fs::read_to_string(big.join("report.html")).unwrap();
    assert!(html.contains("measured on") && html.contains("width-256 proxy"));
    // a coordinate-check directory has a report too
    let co = dir.join("coord");
    ok(keel()
        .args([
            "check",
            "--coord-check",
            "--widths",
            "32,64",
            "--steps",
            "2",
            "--out",
        ])
        .arg(&co));
    ok(keel().arg("report").arg(&co));
    let html = std::fs::read_to_string(co.join("report.html")).unwrap();
    assert_offline(&html);
    assert!(
        html.contains("id=\"fig-coord_mup\"") && html.contains("slope"),
        "coord page"
    );
    // not a keel directory: a clear error
    let o = keel().arg("report").arg(&dir).output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("not a keel run, sweep or check directory"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Values near f64's limits once made plotters loop forever or allocate gigabytes: the report
/// leaves them out with a note and finishes at once.
#[test]
fn extreme_values_are_left_out_of_plots_not_hung_on() {
    for (name, losses) in [
        ("huge", vec![3.0, 1e308, 2.9, 2.8]),
        ("tiny", vec![1e-300; 6]),
        ("denormal", vec![2.0, 1e-308, 1.9, 5e-324]),
    ] {
        let d = tmpdir(&format!("extreme-{name}"));
        let mut m = String::new();
        for (i, l) in losses.iter().enumerate() {
            m += &format!(
                "{{\"step\": {}, \"loss\": {l:e}, \"lr\": 1e-3, \"grad_norm\": {l:e}, \"tokens_per_s\": 100.0, \"val_loss\": {l:e}}}\n",
                i + 1
            );
        }
        std::fs::write(d.join("metrics.jsonl"), m).unwrap();
        let mut child = keel()
            .arg("report")
            .arg(&d)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let t0 = std::time::Instant::now();
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if t0.elapsed().as_secs() > 60 {
                let _ = child.kill();
                panic!("{name}: keel report still running after 60 s");
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        };
        assert!(status.success(), "{name}");
        let html = std::fs::read_to_string(d.join("report.html")).unwrap();
        if name != "tiny" {
            assert!(
                html.contains("not drawn"),
                "{name}: no note of the values left out"
            );
        }
    }
}
