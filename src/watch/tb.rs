//! `keel watch` over TensorBoard event files: a single file, or a log directory whose newest
//! run is read file by file (a restarted writer starts a new file), followed as files grow
//! and as new ones appear. Each step's scalars (one Event per `add_scalar` call, or one per
//! step) become one `Record`, tag → value, so the same field names pick the loss
//! (`train/loss`, `lm loss`, `loss_metrics/global_avg_loss`, ...).

use super::{Format, Judge, Record};
use crate::tensorboard::{event_files, EventReader};
use anyhow::Result;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A run directory followed: the files read so far, and new ones as they appear.
struct Files {
    dir: Option<PathBuf>,
    seen: Vec<PathBuf>,
    readers: Vec<EventReader>,
    cur: usize,
}

impl Files {
    fn rescan(&mut self) -> Result<()> {
        let Some(dir) = &self.dir else { return Ok(()) };
        let Ok((files, _)) = event_files(dir) else {
            return Ok(());
        };
        for f in files {
            if !self.seen.contains(&f) {
                self.readers.push(EventReader::open(&f)?);
                self.seen.push(f);
            }
        }
        Ok(())
    }
}

/// The step being gathered: its scalars arrive as several events.
struct Pending {
    step: Option<i64>,
    values: Vec<(String, f64)>,
    since: Instant,
    /// keel's own mirror marks a step the guard skipped (`keel/skipped`).
    skipped: bool,
    /// Last step handed to the judge (steps going back mean a resumed or restarted run).
    last: Option<i64>,
}

impl Pending {
    fn flush(&mut self, judge: &mut Judge, path: &Path) -> Result<Option<i32>> {
        let Some(step) = self.step.take() else {
            return Ok(None);
        };
        if let Some(l) = self.last {
            if step <= l {
                eprintln!(
                    "keel watch: steps went back from {l} to {step} in {} (a resumed or restarted run); judging from step {step}",
                    path.display()
                );
                judge.restore(step.saturating_sub(1).max(0) as u64);
            }
        }
        self.last = Some(step);
        let mut values = vec![("step".to_string(), step as f64)];
        values.append(&mut self.values);
        judge.feed(
            &Record {
                values,
                skipped: false,
            },
            path,
            Format::TensorBoard,
        )
    }
}

pub(super) fn watch(
    judge: &mut Judge,
    given: &Path,
    files: Vec<PathBuf>,
    dir: Option<PathBuf>,
    follow: bool,
) -> Result<i32> {
    let readers = files
        .iter()
        .map(|f| EventReader::open(f))
        .collect::<Result<Vec<_>>>()?;
    let mut fs = Files {
        dir,
        seen: files,
        readers,
        cur: 0,
    };
    let mut p = Pending {
        step: None,
        values: Vec::new(),
        since: Instant::now(),
        skipped: false,
        last: None,
    };
    loop {
        let mut got = false;
        while fs.cur < fs.readers.len() {
            // a file is finished when a newer one exists, or when not following
            let last = fs.cur + 1 == fs.readers.len();
            let eof = !follow || !last;
            let r = &mut fs.readers[fs.cur];
            let (events, problems) = r.poll(eof)?;
            for pr in &problems {
                eprintln!("keel watch: {}", pr.describe(&r.path));
            }
            let path = r.path.clone();
            for e in events {
                if e.scalars.is_empty() {
                    continue;
                }
                got = true;
                if p.step.is_some_and(|s| s != e.step) {
                    if let Some(code) = p.flush(judge, &path)? {
                        return Ok(code);
                    }
                }
                if p.step.is_none() {
                    p.step = Some(e.step);
                    p.since = Instant::now();
                }
                for (tag, v) in e.scalars {
                    if tag == "keel/skipped" {
                        p.skipped = v == 1.0;
                        continue;
                    }
                    // a tag logged twice in a step: the later value
                    match p.values.iter_mut().find(|(t, _)| *t == tag) {
                        Some(slot) => slot.1 = v,
                        None => p.values.push((tag, v)),
                    }
                }
            }
            if eof {
                fs.cur += 1;
            } else {
                break;
            }
        }
        let path = fs
            .seen
            .last()
            .cloned()
            .unwrap_or_else(|| given.to_path_buf());
        // not following: the end; following: a step with nothing new for a second is whole
        if !follow || (!got && p.since.elapsed() > Duration::from_secs(1)) {
            if let Some(code) = p.flush(judge, &path)? {
                return Ok(code);
            }
        }
        if !follow || crate::train::interrupted() {
            break;
        }
        fs.rescan()?;
        std::thread::sleep(Duration::from_millis(300));
    }
    Ok(0)
}
