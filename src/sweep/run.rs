//! Running a sweep: trials as `keel train` child processes, `jobs` at a time with the
//! threads split between them; resume skips finished trials; `--emit` writes the trials out
//! for Slurm or any job runner instead; `collect` reads results back.

use super::analysis::{self, describe_group, Recommendation, Target};
use super::collect::{self, TrialResult};
use super::output;
use super::{prepare, Plan, SweepSpec};
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Emit {
    /// A Slurm array job (DIR/sweep.sbatch) running one trial per array task
    Slurm,
    /// One command per line (DIR/commands.txt): GNU parallel, Kubernetes Indexed Jobs, ...
    List,
}

pub struct SweepOptions {
    pub config: PathBuf,
    pub out: PathBuf,
    pub jobs: usize,
    /// Threads in all (0 = one per core), split between the jobs.
    pub threads: usize,
    pub emit: Option<Emit>,
    pub target: Target,
    pub progress: bool,
}

fn trial_dir(out: &Path, id: &str) -> PathBuf {
    out.join("trials").join(id)
}

fn abs(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}

fn keel_exe() -> Result<PathBuf> {
    std::env::current_exe().context("cannot locate the keel executable to run trials")
}

fn spawn(exe: &Path, out: &Path, id: &str, threads: usize) -> Result<Child> {
    let dir = trial_dir(out, id);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("train.log"))
        .with_context(|| format!("{}: cannot open train.log", dir.display()))?;
    let mut cmd = Command::new(exe);
    cmd.arg("--threads")
        .arg(threads.to_string())
        .arg("train")
        .arg("--config")
        .arg(dir.join("trial.toml"))
        .arg("--out")
        .arg(&dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    die_with_the_sweep(&mut cmd);
    cmd.spawn()
        .with_context(|| format!("cannot start {} for trial {id}", exe.display()))
}

/// If the sweep dies (even SIGKILL), its trials get SIGTERM: keel trials checkpoint and exit
/// 3, so a resumed sweep continues them instead of racing orphans for the run lock.
fn die_with_the_sweep(cmd: &mut Command) {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::process::CommandExt;
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = cmd;
}

fn terminate(child: &Child) {
    signal(child, libc::SIGTERM);
}

fn signal(child: &Child, sig: libc::c_int) {
    // SAFETY: plain kill(2) on a PID we spawned and have not yet reaped.
    unsafe {
        libc::kill(child.id() as libc::pid_t, sig);
    }
}

/// Start a command trial: its argv and environment, stdout to train.log, stderr to
/// stderr.log (its last lines explain a failure).
fn spawn_command(plan: &Plan, out: &Path, i: usize) -> Result<Child> {
    let c = plan.command.as_ref().expect("a command sweep");
    let t = &plan.trials[i];
    let dir = abs(&trial_dir(out, &t.id));
    let (argv, env) = c.resolve(t, &dir);
    let open = |name: &str| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(name))
            .with_context(|| format!("trial {}: {}: cannot open {name}", t.id, dir.display()))
    };
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .envs(env)
        .stdin(Stdio::null())
        .stdout(open("train.log")?)
        .stderr(open("stderr.log")?);
    die_with_the_sweep(&mut cmd);
    cmd.spawn().with_context(|| {
        format!(
            "trial {}: cannot start {:?}; fix: check trial.command (the program, its path)",
            t.id, argv[0]
        )
    })
}

/// A running command trial's log, judged by the guard's detectors as it grows.
struct Follower {
    judge: collect::LogJudge,
    /// Stopped by the sweep: when SIGTERM was sent.
    stopped: Option<Instant>,
    killed: bool,
    last_read: Instant,
}

impl Follower {
    fn new() -> Self {
        Follower {
            judge: collect::LogJudge::new(),
            stopped: None,
            killed: false,
            last_read: Instant::now() - Duration::from_secs(10),
        }
    }

    /// Read the new lines; Some((step, detector, reason)) when the trial should be stopped.
    fn check(&mut self, plan: &Plan, dir: &Path) -> Option<(u64, String, String)> {
        let c = plan.command.as_ref()?;
        let metrics = collect::trial_metrics(dir, plan);
        self.judge
            .feed(&metrics, c.stop_on_attn_warning)
            .filter(|(_, det, _)| c.stop_diverged || det == "attn_logit")
    }
}

/// Print the per-group table and the recommendation.
fn report(dir: &Path, plan: &Plan, res: &[TrialResult], rec: &Recommendation) {
    let groups = analysis::summarize(plan, res);
    println!(
        "sweep: {} trials — {} finished, {} diverged, {} not done",
        res.len(),
        res.iter().filter(|r| r.status == "finished").count(),
        res.iter().filter(|r| r.diverged).count(),
        res.iter().filter(|r| !r.done()).count()
    );
    let saved = output::compute_saved(res);
    if saved.stopped > 0 {
        println!(
            "  {} trial(s) stopped when they diverged: {} of {} planned steps run, {:.0}% of the sweep's compute saved against running every trial to the end",
            saved.stopped,
            saved.steps_run,
            saved.steps_planned,
            100.0 * saved.fraction()
        );
    }
    let lr = |x: Option<f64>| x.map_or("—".to_string(), super::show_num);
    let w = groups
        .iter()
        .map(|g| describe_group(&g.group, true).chars().count())
        .max()
        .unwrap_or(5)
        .max(5);
    println!(
        "  {:<w$}  {:>9}  {:>9}  {:>10}  {:>14}  {:>11}",
        "group", "best LR", "loss", "max stable", "LR sensitivity", "diverged"
    );
    for g in &groups {
        let n_div = g.diverged_at.iter().filter(|d| d.is_some()).count();
        println!(
            "  {:<w$}  {:>9}  {:>9}  {:>10}  {:>14}  {:>11}",
            describe_group(&g.group, true),
            lr(g.best_lr),
            g.best_loss.map_or("—".into(), |l| format!("{l:.4}")),
            lr(g.max_stable_lr),
            g.lr_sensitivity.map_or("—".into(), |s| format!("{s:.4}")),
            format!("{n_div}/{}", g.lrs.len()),
        );
    }
    println!();
    for line in &rec.text {
        println!("  {line}");
    }
    println!();
    println!("  results   {}", dir.join("results.csv").display());
    println!("  summary   {}", dir.join("summary.json").display());
    println!("  plots     {}", dir.join("plots").display());
}

fn target_of(plan: &Plan, t: &Target) -> Target {
    Target {
        width: t.width.or(plan.settings.target_width),
        depth: t.depth.or(plan.settings.target_depth),
        source: if t.source.is_empty() {
            "sweep.toml".into()
        } else {
            t.source.clone()
        },
    }
}

fn write_emit(out: &Path, plan: &Plan, how: Emit, jobs: usize, threads: usize) -> Result<PathBuf> {
    let exe = abs(&keel_exe()?);
    let dir = abs(out);
    let ids: String = plan.trials.iter().map(|t| format!("{}\n", t.id)).collect();
    crate::checkpoint::write_atomic(&dir.join("trials.txt"), ids.as_bytes())?;
    let cmd = |id: &str, threads: &str| {
        let td = dir.join("trials").join(id);
        if plan.command.is_some() {
            return format!("sh {}", td.join("run.sh").display());
        }
        format!(
            "{} --threads {threads} train --config {} --out {}",
            exe.display(),
            td.join("trial.toml").display(),
            td.display()
        )
    };
    match how {
        Emit::List => {
            let lines: String = plan
                .trials
                .iter()
                .map(|t| cmd(&t.id, &threads.to_string()) + "\n")
                .collect();
            let p = dir.join("commands.txt");
            crate::checkpoint::write_atomic(&p, lines.as_bytes())?;
            Ok(p)
        }
        Emit::Slurm => {
            let n = plan.trials.len();
            let script = format!(
                "#!/bin/bash\n\
                 # keel sweep: {n} trials as a Slurm array ({jobs} at a time). Submit: sbatch {sb}\n\
                 # Afterwards: keel sweep collect {d}\n\
                 #SBATCH --job-name=keel-sweep\n\
                 #SBATCH --array=0-{last}%{jobs}\n\
                 #SBATCH --cpus-per-task={threads}\n\
                 #SBATCH --output={d}/trials/slurm-%A_%a.out\n\
                 set -euo pipefail\n\
                 KEEL=${{KEEL:-{exe}}}\n\
                 ID=$(sed -n \"$((SLURM_ARRAY_TASK_ID + 1))p\" {d}/trials.txt)\n\
                 T={d}/trials/$ID\n\
                 {run}\n",
                sb = dir.join("sweep.sbatch").display(),
                run = if plan.command.is_some() {
                    "# the trial's own command (trials/ID/run.sh); follow it with: keel watch --follow $T/<its log>\nsh \"$T/run.sh\"".to_string()
                } else {
                    "# exit 2 = the trial diverged: a result, not a job failure\n\"$KEEL\" --threads \"${SLURM_CPUS_PER_TASK:-THREADS}\" train --config \"$T/trial.toml\" --out \"$T\" || [ $? -eq 2 ]".replace("THREADS", &threads.to_string())
                },
                d = dir.display(),
                last = n.saturating_sub(1),
                exe = exe.display(),
            );
            let p = dir.join("sweep.sbatch");
            crate::checkpoint::write_atomic(&p, script.as_bytes())?;
            Ok(p)
        }
    }
}

pub fn run(opts: &SweepOptions) -> Result<i32> {
    let spec = SweepSpec::load(&opts.config)?;
    for w in &spec.warnings {
        eprintln!("warning: {w}");
    }
    std::fs::create_dir_all(&opts.out)
        .with_context(|| format!("{}: cannot create the sweep directory", opts.out.display()))?;
    let _lock = crate::train::lock::RunLock::acquire(&opts.out)?;
    let out = opts.out.as_path();
    let text = std::fs::read_to_string(&opts.config)?;
    let plan = prepare(&spec, out, opts.progress)?;
    crate::checkpoint::write_atomic(&out.join("sweep.toml"), text.as_bytes())?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let total = if opts.threads > 0 {
        opts.threads
    } else {
        cores
    };
    let jobs = opts.jobs.max(1).min(plan.trials.len().max(1));
    let per = (total / jobs).max(1);
    if let Some(how) = opts.emit {
        let p = write_emit(out, &plan, how, jobs, per)?;
        println!(
            "sweep: {} trials written under {}",
            plan.trials.len(),
            out.join("trials").display()
        );
        match how {
            Emit::Slurm => println!("  submit:  sbatch {}", p.display()),
            Emit::List if plan.command.is_some() => println!(
                "  run:     parallel -j {jobs} < {}   (keel judges each trial's log when collecting)",
                p.display()
            ),
            Emit::List => println!(
                "  run:     parallel -j {jobs} < {}   (exit 2 = diverged, a result)",
                p.display()
            ),
        }
        println!("  then:    keel sweep collect {}", out.display());
        return Ok(0);
    }
    crate::train::install_interrupt_handler();
    let target = target_of(&plan, &opts.target);
    let exe = keel_exe()?;
    let mut res: Vec<TrialResult> = plan
        .trials
        .iter()
        .map(|t| collect::collect_trial(&trial_dir(out, &t.id), t, &plan, None))
        .collect();
    let skipped = res.iter().filter(|r| r.done()).count();
    let mut pending: std::collections::VecDeque<usize> =
        (0..plan.trials.len()).filter(|&i| !res[i].done()).collect();
    eprintln!(
        "keel sweep → {}: {} trials ({} done before), {jobs} at a time × {per} thread(s)",
        out.display(),
        plan.trials.len(),
        skipped
    );
    let bar = if opts.progress {
        ProgressBar::new(plan.trials.len() as u64)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template("sweep [{bar:28}] {pos}/{len} trials {msg} eta {eta}")
            .expect("static template")
            .progress_chars("=> "),
    );
    bar.set_position(skipped as u64);
    let mut running: Vec<(usize, Child, Instant)> = Vec::new();
    let mut followers: std::collections::HashMap<usize, Follower> = Default::default();
    let mut interrupted = false;
    let mut finished_now = skipped;
    let status_msg = |running: &[(usize, Child, Instant)], res: &[TrialResult]| {
        format!(
            "· {} running · {} diverged",
            running.len(),
            res.iter().filter(|r| r.diverged).count()
        )
    };
    loop {
        if crate::train::interrupted() && !interrupted {
            interrupted = true;
            for (_, c, _) in &running {
                terminate(c);
            }
            bar.suspend(|| {
                eprintln!("sweep: interrupted — waiting for running trials to save a checkpoint")
            });
        }
        while !interrupted && running.len() < jobs {
            // a trial still held by a process of an earlier, killed sweep waits its turn
            let Some(pos) = pending.iter().position(|&i| {
                crate::train::lock::holder(&trial_dir(out, &plan.trials[i].id)).is_none()
            }) else {
                break;
            };
            let i = pending.remove(pos).expect("index from position");
            // a leftover process of a killed sweep may have finished it meanwhile
            let now = collect::collect_trial(
                &trial_dir(out, &plan.trials[i].id),
                &plan.trials[i],
                &plan,
                None,
            );
            if now.done() {
                res[i] = now;
                finished_now += 1;
                bar.inc(1);
                continue;
            }
            let child = if plan.command.is_some() {
                followers.insert(i, Follower::new());
                spawn_command(&plan, out, i)?
            } else {
                spawn(&exe, out, &plan.trials[i].id, per)?
            };
            running.push((i, child, Instant::now()));
            bar.set_message(status_msg(&running, &res));
        }
        if running.is_empty() && (pending.is_empty() || interrupted) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        // command trials: follow their logs, stop the ones that diverged
        if let Some(c) = &plan.command {
            for (i, child, _) in &running {
                let Some(f) = followers.get_mut(i) else {
                    continue;
                };
                if let Some(t0) = f.stopped {
                    if !f.killed && t0.elapsed().as_secs_f64() > c.grace_s {
                        signal(child, libc::SIGKILL);
                        f.killed = true;
                    }
                    continue;
                }
                if interrupted || f.last_read.elapsed() < Duration::from_secs(1) {
                    continue;
                }
                f.last_read = Instant::now();
                let t = &plan.trials[*i];
                let tdir = trial_dir(out, &t.id);
                if let Some((step, detector, reason)) = f.check(&plan, &tdir) {
                    let mut detail = collect::diverged_detail(&detector, &reason);
                    detail["stopped_by"] = "keel sweep".into();
                    let line = crate::train::event_line(step, "diverged", detail);
                    let mut w = crate::train::JsonlWriter::open(&tdir.join("events.jsonl"))?;
                    w.write(&line)?;
                    terminate(child);
                    f.stopped = Some(Instant::now());
                    bar.suspend(|| {
                        eprintln!(
                            "{}: diverged at step {step} ({detector}): stopped, its slot goes to the next trial",
                            t.id
                        )
                    });
                }
            }
        }
        let mut k = 0;
        while k < running.len() {
            let exited = running[k].1.try_wait().context("waiting for a trial")?;
            let Some(status) = exited else {
                k += 1;
                continue;
            };
            let (i, _, t0) = running.swap_remove(k);
            let t = &plan.trials[i];
            // killed by a signal, or stopped (exit 3) when the sweep was not: a failure to
            // report, not a trial to forget; the next run resumes it
            let stopped = followers.remove(&i).is_some_and(|f| f.stopped.is_some());
            let code = match status.code() {
                // stopped by the sweep (diverged) or by Ctrl-C: not a failure
                None if stopped || interrupted => None,
                None => Some(-1),
                Some(3) if !interrupted => Some(-3),
                _ if interrupted && plan.command.is_some() => None,
                c => c,
            };
            let r = collect::collect_trial(&trial_dir(out, &t.id), t, &plan, code);
            let line = match r.status.as_str() {
                "finished" => format!(
                    "{}: finished, {} {}",
                    t.id,
                    // the metric compared; a trial with no validation loss compares its train loss
                    if plan.settings.metric == "val_loss" && r.val_loss.is_none() {
                        "train loss (last 10 steps)"
                    } else {
                        plan.settings.metric.as_str()
                    },
                    r.final_loss.map_or("—".into(), |l| format!("{l:.4}"))
                ),
                "diverged" => format!("{}: diverged at step {}", t.id, r.diverged_at.unwrap_or(0)),
                "failed" => format!(
                    "{}: FAILED ({}); see {}{}",
                    t.id,
                    match status.code() {
                        _ if r
                            .error
                            .as_deref()
                            .is_some_and(|e| e.contains("no loss field")) =>
                        {
                            "its log has no loss field".into()
                        }
                        Some(c) => format!("exit {c}"),
                        None => "killed by a signal".into(),
                    },
                    trial_dir(out, &t.id)
                        .join(if plan.command.is_some() {
                            "stderr.log"
                        } else {
                            "train.log"
                        })
                        .display(),
                    r.error.as_deref().map_or(String::new(), |e| format!(
                        "\n    {}",
                        e.replace('\n', "\n    ")
                    ))
                ),
                other => format!("{}: {other} (step {})", t.id, r.steps_done),
            };
            let done = r.done();
            res[i] = r;
            if done {
                finished_now += 1;
                bar.inc(1);
            }
            if !opts.progress || !done {
                bar.suspend(|| {
                    eprintln!(
                        "[{finished_now}/{}] {line} ({:.0} s)",
                        plan.trials.len(),
                        t0.elapsed().as_secs_f64()
                    )
                });
            }
            bar.set_message(status_msg(&running, &res));
            // results so far, so a killed sweep still leaves readable outputs (a failed
            // write here must not stop the trials)
            if let Err(e) = output::write_all(out, &plan, &plan.base_scheme, &res, &target) {
                bar.suspend(|| eprintln!("note: could not update the results yet: {e:#}"));
            }
        }
    }
    bar.finish_and_clear();
    let rec = output::write_all(out, &plan, &plan.base_scheme, &res, &target)?;
    report(out, &plan, &res, &rec);
    let failed = res.iter().filter(|r| r.status == "failed").count();
    if interrupted {
        eprintln!("sweep interrupted: resume with the same command");
        return Ok(3);
    }
    if failed > 0 {
        bail!(
            "{failed} trial(s) failed (not diverged: an error or a kill); their {} says why; rerun the same command to resume them",
            if plan.command.is_some() { "stderr.log (or the error in results.jsonl)" } else { "train.log" }
        );
    }
    Ok(0)
}

/// `keel sweep collect DIR`: results from trial directories, wherever they were run.
pub fn collect(dir: &Path, target: &Target) -> Result<i32> {
    let (plan, res, rec) = gather(dir, target)?;
    report(dir, &plan, &res, &rec);
    Ok(0)
}

/// Re-read every trial and rewrite results, summary and plots (for `keel report`); while a
/// sweep is running in `dir` its own outputs are used as they are.
pub fn refresh(dir: &Path) -> Result<()> {
    if crate::train::lock::holder(dir).is_some() && dir.join("summary.json").exists() {
        return Ok(());
    }
    let old: Option<Target> = std::fs::read_to_string(dir.join("summary.json"))
        .ok()
        .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
        .and_then(|v| serde_json::from_value(v.get("target")?.clone()).ok());
    gather(dir, &old.unwrap_or_default()).map(|_| ())
}

fn gather(dir: &Path, target: &Target) -> Result<(Plan, Vec<TrialResult>, Recommendation)> {
    let plan_path = dir.join("sweep.json");
    let plan: Plan = serde_json::from_str(
        &std::fs::read_to_string(&plan_path).with_context(|| {
            format!(
                "{}: cannot read; fix: give the directory `keel sweep --emit` or `keel sweep` wrote",
                plan_path.display()
            )
        })?,
    )
    .with_context(|| format!("{}: not a keel sweep plan", plan_path.display()))?;
    let res: Vec<TrialResult> = plan
        .trials
        .iter()
        .map(|t| collect::collect_trial(&trial_dir(dir, &t.id), t, &plan, None))
        .collect();
    let target = target_of(&plan, target);
    let rec = output::write_all(dir, &plan, &plan.base_scheme, &res, &target)?;
    Ok((plan, res, rec))
}
