//! `keel watch`: the guard's detectors over any trainer's metrics log (keel's metrics.jsonl,
//! another trainer's JSON lines, a CSV with a header, an HF `trainer_state.json`, or a text
//! log of `name: value` pairs), printing events as they happen. Exit code 2 on a divergence
//! the trainer did not handle, so it can stop a PyTorch job as a sidecar; 1 on bad input
//! (including a log in which no loss field can be found: a sidecar that can never fire).
//!
//! Beside a guarded trainer's log (keel's `events.jsonl`, the Python package's events file)
//! the sidecar judges what the trainer kept: rows it skipped stay out of the windows, and a
//! divergence it answered with a rollback is reported as handled, with the detector windows
//! put back to those of the restored step, as the live guard does.

pub mod parse;
mod tb;

pub use parse::{Fields, Format, LineParser, Record};

use crate::monitor::{Detection, GuardConfig, Monitor, MonitorState, Severity};
use anyhow::{bail, Context, Result};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// Lines read without a loss field before a log is refused as unreadable.
const NO_LOSS_LINES: u64 = 20;
/// Detector states kept for rollbacks to a recent step (≈1.6 KB each).
const RING: usize = 4096;
/// Bytes read at a time (bounds memory on large logs).
const CHUNK: u64 = 8 << 20;

pub fn format_detection(d: &Detection) -> String {
    let kind = match d.kind {
        Severity::Warning => "warning",
        Severity::Spike => "spike",
        Severity::Divergence => "DIVERGENCE",
    };
    format!(
        "step {:>7}  {kind:<10} {:<12} value {:<10.4} threshold {:<10.4} window {:>3}  {}",
        d.step, d.detector, d.value, d.threshold, d.window, d.reason
    )
}

/// What a guarded trainer did about its steps, from its events log: rollbacks (at step →
/// the step restored, 0 for the initial weights) and give-ups.
#[derive(Debug, Default)]
struct TrainerEvents {
    path: Option<PathBuf>,
    /// Bytes read so far, through the last whole line.
    len: u64,
    rollbacks: BTreeMap<u64, u64>,
    gave_up: BTreeSet<u64>,
    /// Newest step any event names (the trainer has judged up to here).
    newest: u64,
}

impl TrainerEvents {
    fn new(path: Option<PathBuf>) -> Self {
        let mut e = TrainerEvents {
            path,
            ..Default::default()
        };
        e.refresh();
        e
    }

    /// Re-read the file if it changed (events logs are small).
    fn refresh(&mut self) {
        let Some(p) = &self.path else { return };
        let Ok(md) = std::fs::metadata(p) else { return };
        if md.len() == self.len {
            return;
        }
        let Ok(text) = std::fs::read_to_string(p) else {
            return;
        };
        if text.get(self.len as usize..).is_none() {
            // rewritten shorter (or not at a line boundary any more): a new history
            (self.rollbacks, self.gave_up, self.newest) = Default::default();
            self.len = 0;
        }
        // only the whole lines written since the last look (a trainer may be mid-line)
        let new = &text[self.len as usize..];
        let whole = new.rfind('\n').map_or(0, |i| i + 1);
        self.len += whole as u64;
        for v in new[..whole].lines().filter_map(parse::json_relaxed) {
            let Some(step) = v.get("step").and_then(|s| s.as_u64()) else {
                continue;
            };
            self.newest = self.newest.max(step);
            let to = v["detail"]["to_step"].as_u64();
            match v.get("kind").and_then(|k| k.as_str()) {
                // keel train writes one `rollback` line naming the restored step; the Python
                // package a `rollback` line and a `restored` line with it
                Some("rollback" | "restored") => {
                    if let Some(t) = to {
                        self.rollbacks.insert(step, t);
                    }
                }
                Some("give_up") => {
                    self.gave_up.insert(step);
                }
                _ => {}
            }
        }
    }
}

/// The events log beside a metrics log, if any: `--events`, else keel's `events.jsonl` or
/// the Python package's `keel-events.jsonl` in the same folder.
fn events_beside(file: &Path, given: Option<&Path>) -> Option<PathBuf> {
    if let Some(g) = given {
        return Some(g.to_path_buf());
    }
    let dir = file.parent()?;
    ["events.jsonl", "keel-events.jsonl"]
        .iter()
        .map(|n| dir.join(n))
        .find(|p| p.is_file() && p.as_path() != file)
}

/// The detectors, the field choice and what the trainer did: one history.
struct Judge {
    mon: Monitor,
    cfg: GuardConfig,
    fields: Fields,
    overrides: Vec<String>,
    ring: VecDeque<(u64, MonitorState)>,
    events: TrainerEvents,
    follow: bool,
    json: bool,
    lines: u64,
    steps: u64,
    detections: u64,
    handled: u64,
    announced: bool,
}

impl Judge {
    fn new(
        cfg: GuardConfig,
        overrides: &[String],
        events: TrainerEvents,
        follow: bool,
        json: bool,
    ) -> Result<Self> {
        Ok(Judge {
            mon: Monitor::new(cfg.clone()),
            cfg,
            fields: Fields::new(overrides)?,
            overrides: overrides.to_vec(),
            ring: VecDeque::new(),
            events,
            follow,
            json,
            lines: 0,
            steps: 0,
            detections: 0,
            handled: 0,
            announced: false,
        })
    }

    /// The end of a watch with no unhandled divergence: refuse a log with no loss, else say
    /// what was read.
    fn finish(&self, file: &Path, fmt: Format, header: Option<&[String]>) -> Result<i32> {
        if self.steps == 0 && !crate::train::interrupted() {
            if self.lines > 0 || header.is_some() {
                let mut f = self.fields.clone();
                if let Some(h) = header {
                    f.seen = h.to_vec();
                }
                return Err(f.no_loss_error(file, fmt));
            }
            if fmt == Format::TensorBoard {
                bail!(
                    "{}: no scalars in it (TensorBoard events with scalar summaries: add_scalar, log_metrics); to wait for a trainer that has not written yet, use --follow",
                    file.display()
                );
            }
            bail!(
                "{}: no metrics in it (empty); to wait for a trainer that has not written yet, use --follow",
                file.display()
            );
        }
        if !self.json {
            let handled = if self.handled > 0 {
                format!(
                    ", {} divergence(s) handled by the trainer's rollbacks",
                    self.handled
                )
            } else {
                String::new()
            };
            eprintln!(
                "keel watch: {} steps read, {} events{handled}, no unhandled divergence",
                self.steps, self.detections
            );
        }
        Ok(0)
    }

    /// A fresh history (the log was replaced or rewritten).
    fn reset(&mut self) -> Result<()> {
        self.mon = Monitor::new(self.cfg.clone());
        self.fields = Fields::new(&self.overrides)?;
        self.ring.clear();
        self.announced = false;
        Ok(())
    }

    fn restore(&mut self, to: u64) {
        self.mon.state = if to == 0 {
            MonitorState::default()
        } else if let Some((_, s)) = self.ring.iter().rev().find(|(s, _)| *s == to) {
            s.clone()
        } else {
            eprintln!(
                "keel watch: the trainer restored step {to}, older than the {RING} steps kept; \
                 judging from a fresh history"
            );
            MonitorState::default()
        };
    }

    /// One record; Some(exit code) to stop.
    fn feed(&mut self, r: &Record, path: &Path, fmt: Format) -> Result<Option<i32>> {
        self.lines += 1;
        let Some(m) = self.fields.metrics(r, self.lines) else {
            if !self.fields.has_loss() && self.fields.without_loss >= NO_LOSS_LINES {
                return Err(self.fields.no_loss_error(path, fmt));
            }
            return Ok(None);
        };
        if !self.announced {
            self.announced = true;
            eprintln!(
                "keel watch: {} as {}: {}{}",
                path.display(),
                fmt.name(),
                self.fields.describe(),
                match &self.events.path {
                    Some(p) => format!("; trainer events from {}", p.display()),
                    None => String::new(),
                }
            );
        }
        self.steps += 1;
        let before = r.skipped.then(|| self.mon.state.clone());
        let dets = self.mon.observe(&m);
        if let Some(b) = before {
            // the trainer threw this step away: it stays out of the windows (the flags that
            // count consecutive flagged steps carry on)
            let after = std::mem::take(&mut self.mon.state);
            self.mon.state = MonitorState {
                consecutive_flagged: after.consecutive_flagged,
                attn_warned: after.attn_warned,
                logit_warned: after.logit_warned,
                ..b
            };
        }
        self.events.refresh();
        let mut stop = None;
        for d in &dets {
            self.detections += 1;
            let mut handled = None;
            if d.kind == Severity::Divergence {
                let mut to = self.events.rollbacks.get(&m.step).copied();
                if to.is_none() && self.follow && self.events.path.is_some() {
                    // the trainer writes its events after the metrics line: give it a moment
                    let t0 = std::time::Instant::now();
                    while to.is_none()
                        && self.events.newest < m.step
                        && t0.elapsed() < std::time::Duration::from_secs(3)
                    {
                        std::thread::sleep(std::time::Duration::from_millis(100));
                        self.events.refresh();
                        to = self.events.rollbacks.get(&m.step).copied();
                    }
                }
                handled = to.map(|t| {
                    if t == 0 {
                        "the trainer rolled back to the initial weights".to_string()
                    } else {
                        format!("the trainer rolled back to step {t}")
                    }
                });
            }
            if self.json {
                let mut v = serde_json::to_value(d)?;
                if let Some(h) = &handled {
                    v["handled"] = serde_json::json!(h);
                }
                println!("{}", serde_json::to_string(&v)?);
            } else {
                match &handled {
                    Some(h) => println!("{}  (handled: {h})", format_detection(d)),
                    None => println!("{}", format_detection(d)),
                }
            }
            if d.kind == Severity::Divergence {
                if handled.is_some() {
                    self.handled += 1;
                } else if stop.is_none() {
                    if !self.json {
                        let gave_up = if self.events.gave_up.contains(&m.step) {
                            " (the trainer gave up)"
                        } else {
                            ""
                        };
                        eprintln!(
                            "keel watch: divergence at step {}{gave_up} after {} steps read; exit 2",
                            d.step, self.steps
                        );
                    }
                    stop = Some(2);
                }
            }
        }
        if stop.is_some() {
            return Ok(stop);
        }
        if self.ring.len() == RING {
            self.ring.pop_front();
        }
        self.ring.push_back((m.step, self.mon.state.clone()));
        if let Some(&to) = self.events.rollbacks.get(&m.step) {
            self.restore(to);
        }
        Ok(None)
    }
}

/// A file followed by name, like `tail -F`: new whole lines, and a notice when the file at
/// the path was replaced (another inode) or rewritten (shrank, or its first bytes changed).
struct Tail {
    path: PathBuf,
    file: File,
    id: (u64, u64),
    pos: u64,
    /// The first bytes read, to notice a rewrite that did not shrink the file.
    prefix: Vec<u8>,
    pending: Vec<u8>,
}

fn file_id(md: &std::fs::Metadata) -> (u64, u64) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        (md.dev(), md.ino())
    }
    #[cfg(not(unix))]
    {
        let _ = md;
        (0, 0)
    }
}

enum Polled {
    Lines(Vec<String>),
    /// The old file's history ends here; a fresh one starts with the next poll.
    Reset(String),
}

impl Tail {
    fn open(path: &Path) -> Result<Tail> {
        let file = File::open(path).with_context(|| {
            format!(
                "{}: cannot open; fix: give the path of a metrics log (JSON lines, CSV, \
                 trainer_state.json or a text log)",
                path.display()
            )
        })?;
        let md = file.metadata()?;
        if md.is_dir() {
            bail!(
                "{}: is a directory; fix: give the metrics file in it (e.g. {}/metrics.jsonl)",
                path.display(),
                path.display()
            );
        }
        Ok(Tail {
            path: path.to_path_buf(),
            id: file_id(&md),
            file,
            pos: 0,
            prefix: Vec::new(),
            pending: Vec::new(),
        })
    }

    fn reopen(&mut self) -> Result<()> {
        *self = Tail::open(&self.path)?;
        Ok(())
    }

    /// The complete lines written since the last poll (at most CHUNK bytes); with `eof`, a
    /// last line without its newline too.
    fn poll(&mut self, follow: bool, eof: bool) -> Result<Polled> {
        let len = self.file.metadata()?.len();
        if follow && len < self.pos {
            self.reopen()?;
            return Ok(Polled::Reset("shrank (truncated or rewritten)".into()));
        }
        if follow && !self.prefix.is_empty() {
            let mut head = vec![0u8; self.prefix.len()];
            self.file.seek(SeekFrom::Start(0))?;
            let ok = self.file.read_exact(&mut head).is_ok();
            if !ok || head != self.prefix {
                self.reopen()?;
                return Ok(Polled::Reset(
                    "was rewritten (its first line changed)".into(),
                ));
            }
        }
        let mut buf = Vec::new();
        self.file.seek(SeekFrom::Start(self.pos))?;
        (&mut self.file)
            .take((len - self.pos).min(CHUNK))
            .read_to_end(&mut buf)?;
        if buf.is_empty() && follow {
            // nothing new here: was the name given to another file (log rotation, an atomic
            // rewrite by rename)? the old file is fully read, so switch
            if let Ok(md) = std::fs::metadata(&self.path) {
                if file_id(&md) != self.id {
                    self.reopen()?;
                    return Ok(Polled::Reset("was replaced by a new file".into()));
                }
            }
        }
        if self.pos == 0 && !buf.is_empty() {
            self.prefix = buf[..buf.len().min(64)].to_vec();
        } else if self.prefix.len() < 64 && !buf.is_empty() {
            let take = (64 - self.prefix.len()).min(buf.len());
            self.prefix.extend_from_slice(&buf[..take]);
        }
        self.pos += buf.len() as u64;
        self.pending.extend_from_slice(&buf);
        // only whole lines: a writer may be mid-line
        let done = self
            .pending
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |i| i + 1);
        let mut whole: Vec<u8> = self.pending.drain(..done).collect();
        if eof && self.pos >= len && !self.pending.is_empty() {
            whole.append(&mut self.pending);
        }
        Ok(Polled::Lines(
            String::from_utf8_lossy(&whole)
                .lines()
                .map(str::to_string)
                .collect(),
        ))
    }

    fn at_end(&self) -> bool {
        self.file
            .metadata()
            .map(|m| m.len() <= self.pos)
            .unwrap_or(true)
    }
}

pub struct WatchArgs<'a> {
    pub file: &'a Path,
    pub follow: bool,
    pub json: bool,
    pub fields: &'a [String],
    pub sets: &'a [String],
    pub events: Option<&'a Path>,
}

pub fn cmd_watch(a: WatchArgs) -> Result<i32> {
    for s in a.sets {
        if !s.starts_with("guard.") {
            bail!("--set {s}: keel watch takes only guard.* keys (e.g. --set guard.loss_z=5)");
        }
    }
    let cfg = crate::config::RunConfig::load(None, a.sets)
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .guard;
    let file = a.file;
    if a.follow && !file.exists() {
        // a sidecar started beside its trainer: wait for the log, as `tail -F` does
        crate::train::install_interrupt_handler();
        eprintln!(
            "keel watch: waiting for {} to appear (Ctrl-C to stop)",
            file.display()
        );
        while !file.exists() {
            if crate::train::interrupted() {
                return Ok(0);
            }
            std::thread::sleep(std::time::Duration::from_millis(300));
        }
    }
    // a run directory: keel's (or the Python run logger's) metrics.jsonl, else TensorBoard
    let keel_metrics = file.join("metrics.jsonl");
    let file: &Path = if file.is_dir() && keel_metrics.is_file() {
        &keel_metrics
    } else {
        file
    };
    if let Some((files, dir)) = tensorboard_input(file)? {
        let events = TrainerEvents::new(a.events.map(Path::to_path_buf));
        let mut judge = Judge::new(cfg, a.fields, events, a.follow, a.json)?;
        crate::train::install_interrupt_handler();
        let code = tb::watch(&mut judge, file, files, dir, a.follow)?;
        if code != 0 {
            return Ok(code);
        }
        return judge.finish(file, Format::TensorBoard, None);
    }
    let mut tail = Tail::open(file)?;
    let events = TrainerEvents::new(events_beside(file, a.events));
    let mut judge = Judge::new(cfg, a.fields, events, a.follow, a.json)?;
    crate::train::install_interrupt_handler();
    let tsv = file
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("tsv"));
    let mut parser: Option<LineParser> = None;
    // trainer_state.json is one document, rewritten whole: re-read it when it changes
    let mut hf_last: Option<u64> = None;
    let mut hf_len = None;
    loop {
        let fmt = match &parser {
            Some(p) => p.format,
            None => {
                let mut head = vec![0u8; 65536];
                tail.file.seek(SeekFrom::Start(0))?;
                let n = tail.file.read(&mut head)?;
                head.truncate(n);
                let waiting = a.follow && head.iter().all(u8::is_ascii_whitespace);
                let f = Format::sniff(file, &head)?;
                if !waiting || f == Format::HfState {
                    parser = Some(LineParser::new(f, tsv));
                }
                f
            }
        };
        if fmt == Format::HfState {
            let md = std::fs::metadata(file);
            let len = md.as_ref().map(|m| (m.len(), m.modified().ok())).ok();
            if len != hf_len {
                hf_len = len;
                let text = std::fs::read_to_string(file).unwrap_or_default();
                match parse::hf_state_records(&text) {
                    Some(rows) => {
                        let newest = rows
                            .iter()
                            .filter_map(|r| r.get("step"))
                            .fold(0f64, f64::max) as u64;
                        if hf_last.is_some_and(|l| newest < l) {
                            eprintln!("keel watch: {} was rewritten with fewer steps; starting a fresh history", file.display());
                            judge.reset()?;
                            hf_last = None;
                        }
                        for r in rows {
                            let s = r.get("step").map(|s| s as u64);
                            if hf_last.is_some_and(|l| s.is_some_and(|s| s <= l)) {
                                continue;
                            }
                            if let Some(code) = judge.feed(&r, file, fmt)? {
                                return Ok(code);
                            }
                        }
                        hf_last = Some(newest);
                    }
                    None if !a.follow => bail!(
                        "{}: not a Hugging Face trainer_state.json (no log_history list in a JSON \
                         document); for JSON lines, one object per line",
                        file.display()
                    ),
                    None => {}
                }
            }
        } else if let Some(p) = parser.as_mut() {
            loop {
                match tail.poll(a.follow, !a.follow)? {
                    Polled::Reset(why) => {
                        eprintln!(
                            "keel watch: {} {why}; starting a fresh history",
                            file.display()
                        );
                        judge.reset()?;
                        parser = None;
                        break;
                    }
                    Polled::Lines(lines) => {
                        let empty = lines.is_empty();
                        for l in &lines {
                            let Some(r) = p.parse(l, file)? else {
                                if let Some(h) = p.header() {
                                    judge.fields.fix_from_header(h);
                                }
                                continue;
                            };
                            if let Some(code) = judge.feed(&r, file, p.format)? {
                                return Ok(code);
                            }
                        }
                        if empty || tail.at_end() {
                            break;
                        }
                    }
                }
            }
        }
        if !a.follow || crate::train::interrupted() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
    let fmt = parser.as_ref().map_or(Format::JsonLines, |p| p.format);
    judge.finish(file, fmt, parser.as_ref().and_then(|p| p.header()))
}

/// A TensorBoard input: an event file (by name or by its first record), or a directory of
/// them. Returns the files and, for a directory, the run directory to watch for new files.
fn tensorboard_input(path: &Path) -> Result<Option<(Vec<PathBuf>, Option<PathBuf>)>> {
    if path.is_dir() {
        let (files, others) = crate::tensorboard::event_files(path)?;
        let run = files[0].parent().map(Path::to_path_buf);
        if !others.is_empty() {
            eprintln!(
                "keel watch: {} holds {} other run director{} with event files; reading the newest, {} (give another directory to choose)",
                path.display(),
                others.len(),
                if others.len() == 1 { "y" } else { "ies" },
                run.as_deref().unwrap_or(path).display()
            );
        }
        return Ok(Some((files, run)));
    }
    let mut head = [0u8; 12];
    let n = File::open(path)
        .and_then(|mut f| f.read(&mut head))
        .unwrap_or(0);
    if crate::tensorboard::is_event_file(path)
        || crate::tensorboard::looks_like_tfrecord(&head[..n])
    {
        return Ok(Some((vec![path.to_path_buf()], None)));
    }
    Ok(None)
}
