//! Reading other trainers' logs: JSON lines (Python's `NaN`/`Infinity` included), CSV with a
//! header (a real CSV reader: quoted commas stay in their cell), Hugging Face
//! `trainer_state.json`, and text logs of `name: value` pairs (nanoGPT, torchtitan, Megatron,
//! the HF Trainer's printed dicts). Each line becomes a `Record` (name → value); a `Fields`
//! resolver picks the step, loss and gradient-norm fields by the common names once, and keeps
//! to them, so an epoch summary or an eval line is not mistaken for a step.

use crate::monitor::StepMetrics;
use anyhow::{bail, Result};

/// One log line's numbers by name. A present value that is null or not a number is NaN.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Record {
    pub values: Vec<(String, f64)>,
    /// The trainer marked this step as skipped (keel's `"skipped": true`).
    pub skipped: bool,
}

impl Record {
    pub fn get(&self, k: &str) -> Option<f64> {
        self.values.iter().find(|(n, _)| n == k).map(|(_, v)| *v)
    }
}

/// The formats `keel watch` reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    JsonLines,
    Csv,
    /// Hugging Face `trainer_state.json`: one JSON document whose `log_history` holds the rows.
    HfState,
    /// Free text with `name: value` / `name=value` / `name value` pairs.
    Text,
    /// TensorBoard event files (read by `watch::tb`, not line by line).
    TensorBoard,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::JsonLines => "JSON lines",
            Format::Csv => "CSV",
            Format::HfState => "HF trainer_state.json",
            Format::Text => "text log",
            Format::TensorBoard => "TensorBoard events",
        }
    }

    /// Decide from the file name and the first bytes; refuses binary files.
    pub fn sniff(path: &std::path::Path, head: &[u8]) -> Result<Format> {
        if let Some(i) = head.iter().position(|&b| b == 0) {
            bail!(
                "{}: not a text log (a NUL byte at offset {i}); keel watch reads JSON lines, CSV \
                 with a header row, HF trainer_state.json, or text logs with `name: value` pairs \
                 (TensorBoard event files are read by their name, events.out.tfevents.*, or as a log directory)",
                path.display()
            );
        }
        let text = String::from_utf8_lossy(head);
        let bad = text.chars().filter(|&c| c == '\u{FFFD}').count();
        if bad * 20 > text.chars().count().max(1) {
            bail!(
                "{}: not a text log ({bad} bytes in the first {} are not UTF-8); keel watch reads \
                 JSON lines, CSV with a header row, HF trainer_state.json or text logs",
                path.display(),
                head.len()
            );
        }
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .unwrap_or("")
            .to_ascii_lowercase();
        let first = text.lines().map(str::trim).find(|l| !l.is_empty());
        let Some(first) = first else {
            // nothing yet: the name decides (a followed file may still be empty)
            return Ok(match ext.as_str() {
                "csv" | "tsv" => Format::Csv,
                "json" => Format::HfState,
                "log" | "txt" | "out" => Format::Text,
                _ => Format::JsonLines,
            });
        };
        if first.starts_with('{') {
            let one_doc = name == "trainer_state.json"
                || (ext == "json" && serde_json::from_str::<serde_json::Value>(first).is_err());
            return Ok(if one_doc {
                Format::HfState
            } else {
                Format::JsonLines
            });
        }
        if ext == "csv" || ext == "tsv" || (first.contains(',') && !first.contains([':', '='])) {
            return Ok(Format::Csv);
        }
        Ok(Format::Text)
    }
}

/// Python's `json.dumps` writes `NaN`, `Infinity` and `-Infinity`, which are not JSON: turn
/// them (outside strings) into strings that `value_of` reads back as the non-finite numbers.
pub fn json_relaxed(line: &str) -> Option<serde_json::Value> {
    if let Ok(v) = serde_json::from_str(line) {
        return Some(v);
    }
    let mut out = String::with_capacity(line.len() + 16);
    let (mut in_str, mut esc) = (false, false);
    let mut rest = line;
    while let Some(c) = rest.chars().next() {
        if in_str {
            out.push(c);
            if esc {
                esc = false;
            } else if c == '\\' {
                esc = true;
            } else if c == '"' {
                in_str = false;
            }
            rest = &rest[c.len_utf8()..];
            continue;
        }
        if c == '"' {
            in_str = true;
        }
        let token = ["-Infinity", "Infinity", "NaN"]
            .into_iter()
            .find(|t| rest.starts_with(t));
        if let Some(t) = token {
            out.push('"');
            out.push_str(t);
            out.push('"');
            rest = &rest[t.len()..];
        } else {
            out.push(c);
            rest = &rest[c.len_utf8()..];
        }
    }
    serde_json::from_str(&out).ok()
}

/// A JSON value as a metric: numbers as they are, null as NaN (keel writes non-finite
/// values as null), numeric strings parsed (`"NaN"`, `"inf"`), other strings NaN; booleans,
/// arrays and objects are not metrics.
fn value_of(v: &serde_json::Value) -> Option<f64> {
    match v {
        serde_json::Value::Number(n) => n.as_f64(),
        serde_json::Value::Null => Some(f64::NAN),
        serde_json::Value::String(s) => Some(s.trim().parse::<f64>().unwrap_or(f64::NAN)),
        _ => None,
    }
}

/// A JSON object as a record.
pub fn record_of_json(v: &serde_json::Value) -> Option<Record> {
    let o = v.as_object()?;
    let mut r = Record::default();
    for (k, x) in o {
        if k == "skipped" {
            r.skipped = x.as_bool().unwrap_or(false);
        }
        if let Some(f) = value_of(x) {
            r.values.push((k.clone(), f));
        }
    }
    Some(r)
}

/// One CSV line's cells (quotes, quoted commas and doubled quotes handled by the csv crate).
pub fn csv_cells(line: &str, delim: u8) -> Vec<String> {
    let mut rd = csv::ReaderBuilder::new()
        .has_headers(false)
        .delimiter(delim)
        .flexible(true)
        .from_reader(line.as_bytes());
    rd.records()
        .next()
        .and_then(|r| r.ok())
        .map(|r| r.iter().map(|c| c.trim().to_string()).collect())
        .unwrap_or_default()
}

fn is_number(s: &str) -> bool {
    s.parse::<f64>().is_ok()
}

/// Length of a number starting at `b[i]` (sign, digits, fraction, exponent), 0 if none.
fn number_len(b: &[u8], i: usize) -> usize {
    let mut j = i;
    if j < b.len() && (b[j] == b'-' || b[j] == b'+') {
        j += 1;
    }
    let d0 = j;
    while j < b.len() && b[j].is_ascii_digit() {
        j += 1;
    }
    if j < b.len() && b[j] == b'.' {
        j += 1;
        while j < b.len() && b[j].is_ascii_digit() {
            j += 1;
        }
    }
    if j == d0 || (j == d0 + 1 && b[d0] == b'.') {
        return 0;
    }
    if j < b.len() && (b[j] == b'e' || b[j] == b'E') {
        let mut k = j + 1;
        if k < b.len() && (b[k] == b'-' || b[k] == b'+') {
            k += 1;
        }
        let k0 = k;
        while k < b.len() && b[k].is_ascii_digit() {
            k += 1;
        }
        if k > k0 {
            j = k;
        }
    }
    j - i
}

/// Text logs: every number with the words before it as its name, e.g.
/// `iter 10: loss 4.2774, time 20.4ms` → iter 10, loss 4.2774, time 20.4;
/// ` lm loss: 1.03E+01 | grad norm: 5.4 |` → lm loss, grad norm; `{'loss': 2.3}` → loss.
/// A name is the text since the previous number or separator (`|,;{}[]()`), trimmed of
/// punctuation and quotes; `nan`/`inf` words count as numbers.
pub fn record_of_text(line: &str) -> Record {
    // ANSI colour codes (torchtitan colours its log) are not part of any name
    let mut clean = String::with_capacity(line.len());
    let mut it = line.chars().peekable();
    while let Some(c) = it.next() {
        if c == '\u{1b}' {
            for d in it.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            clean.push(c);
        }
    }
    let b = clean.as_bytes();
    let mut r = Record::default();
    let mut name_start = 0usize;
    let mut i = 0usize;
    let word_char = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b'.';
    while i < b.len() {
        let c = b[i];
        if matches!(
            c,
            b'|' | b',' | b';' | b'{' | b'}' | b'[' | b']' | b'(' | b')'
        ) {
            i += 1;
            name_start = i;
            continue;
        }
        let prev_ok = i == 0 || !word_char(b[i - 1]);
        let mut n = if prev_ok { number_len(b, i) } else { 0 };
        let mut val = None;
        if n > 0 {
            val = clean[i..i + n].parse::<f64>().ok();
        } else if prev_ok {
            for (w, v) in [
                ("nan", f64::NAN),
                ("NaN", f64::NAN),
                ("-inf", f64::NEG_INFINITY),
                ("inf", f64::INFINITY),
            ] {
                if b[i..].starts_with(w.as_bytes())
                    && !b
                        .get(i + w.len())
                        .is_some_and(|&c| c.is_ascii_alphanumeric())
                {
                    n = w.len();
                    val = Some(v);
                    break;
                }
            }
        }
        if let (Some(v), true) = (val, n > 0) {
            let name = clean[name_start..i]
                .trim_matches(|c: char| {
                    c.is_whitespace() || matches!(c, ':' | '=' | '\'' | '"' | '/' | '-' | '>')
                })
                .to_string();
            if !name.is_empty() && name.chars().any(|c| c.is_alphabetic()) {
                r.values.push((name, v));
            }
            i += n;
            name_start = i;
            // units glued to the number (`ms`, `GiB`, `%`) belong to neither name
            while i < b.len() && (b[i].is_ascii_alphabetic() || b[i] == b'%') {
                i += 1;
            }
            name_start = name_start.max(i);
            continue;
        }
        i += 1;
    }
    r
}

/// What each metric is called in a log: the user's `--field` names, else the first of the
/// common names that appears.
pub const STEP: &[&str] = &[
    "step",
    "iter",
    "iteration",
    "global_step",
    "train/global_step",
    "trainer/global_step",
    "_step",
    "it",
    "Step",
    "steps",
];
const LOSS: &[&str] = &[
    "loss",
    "train_loss",
    "train/loss",
    "train_loss_step",
    "train/loss_step",
    "loss_step",
    "lm loss",
    "lm_loss",
    "train/lm_loss",
    "train/lm loss",
    "loss/train",
    "training_loss",
    "train/ce_loss",
    "train/CrossEntropyLoss",
    "loss_metrics/global_avg_loss",
];
const GRAD: &[&str] = &[
    "grad_norm",
    "gnorm",
    "grad-norm",
    "grad norm",
    "train/grad_norm",
    "grad_norm/total",
    "total_norm",
    "optim/total_grad_norm",
    "gradient_norm",
    "train/gnorm",
];
// keel/*: the Python package's HF and Lightning callbacks (HF's TensorBoard adds train/)
const ATTN: &[&str] = &[
    "max_attn_logit",
    "train/max_attn_logit",
    "keel/max_attn_logit",
    "train/keel/max_attn_logit",
];
const LOGZ: &[&str] = &[
    "logit_z",
    "train/logit_z",
    "keel/logit_z",
    "train/keel/logit_z",
];

/// The slots of `StepMetrics` a log can fill.
pub const SLOTS: [&str; 5] = ["step", "loss", "grad_norm", "max_attn_logit", "logit_z"];

fn aliases(slot: usize) -> &'static [&'static str] {
    [STEP, LOSS, GRAD, ATTN, LOGZ][slot]
}

/// Picks each slot's field once and keeps to it.
#[derive(Debug, Clone, Default)]
pub struct Fields {
    /// The field of each slot (`SLOTS` order): fixed by `--field`, or found.
    pub chosen: [Option<String>; 5],
    explicit: [bool; 5],
    /// Names seen in lines without a loss (for the error when none is ever found).
    pub seen: Vec<String>,
    pub records: u64,
    pub without_loss: u64,
}

impl Fields {
    /// `NAME=FIELD` overrides, e.g. `loss=train/loss`.
    pub fn new(overrides: &[String]) -> Result<Self> {
        let mut f = Fields::default();
        for o in overrides {
            let Some((k, v)) = o.split_once('=') else {
                bail!("--field {o}: expected NAME=FIELD, e.g. --field loss=train/loss");
            };
            let Some(i) = SLOTS.iter().position(|s| *s == k) else {
                bail!(
                    "--field {o}: unknown name {k:?}; use step, loss, grad_norm, max_attn_logit or logit_z"
                );
            };
            f.chosen[i] = Some(v.to_string());
            f.explicit[i] = true;
        }
        Ok(f)
    }

    /// Look at a CSV header: fix every slot whose name is among the columns.
    pub fn fix_from_header(&mut self, cols: &[String]) {
        for i in 0..SLOTS.len() {
            if self.chosen[i].is_none() {
                self.chosen[i] = aliases(i)
                    .iter()
                    .find(|a| cols.iter().any(|c| c == *a))
                    .map(|a| a.to_string());
            }
        }
    }

    fn value(&mut self, slot: usize, r: &Record) -> Option<f64> {
        if let Some(name) = &self.chosen[slot] {
            return r.get(name);
        }
        // not fixed yet: the first common name present fixes it
        let a = aliases(slot).iter().find(|a| r.get(a).is_some())?;
        self.chosen[slot] = Some(a.to_string());
        r.get(a)
    }

    /// A record → the step's metrics; None for lines without the loss (evals, headers, epoch
    /// summaries). `n` numbers lines without a step field.
    pub fn metrics(&mut self, r: &Record, n: u64) -> Option<StepMetrics> {
        if r.values.is_empty() {
            return None;
        }
        self.records += 1;
        let loss = self.value(1, r);
        let Some(loss) = loss else {
            self.without_loss += 1;
            for (k, _) in &r.values {
                if !self.seen.contains(k) && self.seen.len() < 40 {
                    self.seen.push(k.clone());
                }
            }
            return None;
        };
        let step = self.value(0, r).filter(|s| s.is_finite() && *s >= 0.0);
        Some(StepMetrics {
            step: step.map_or(n, |s| s as u64),
            loss,
            grad_norm: self.value(2, r),
            max_attn_logit: self.value(3, r),
            logit_z: self.value(4, r),
            ..Default::default()
        })
    }

    /// Whether a loss field has been found (or was given).
    pub fn has_loss(&self) -> bool {
        self.chosen[1].is_some()
    }

    /// The error for a log in which no loss field was found: the fields seen and the flag.
    pub fn no_loss_error(&self, path: &std::path::Path, fmt: Format) -> anyhow::Error {
        let guess = self
            .seen
            .iter()
            .find(|k| {
                let l = k.to_ascii_lowercase();
                l.contains("loss") && !l.contains("val") && !l.contains("eval")
            })
            .cloned();
        let what = if self.explicit[1] {
            format!(
                "the loss field {:?} (from --field) is in none of them",
                self.chosen[1].as_deref().unwrap_or("")
            )
        } else {
            "none of them is a loss field keel knows".to_string()
        };
        let fix = match guess {
            Some(g) => format!("--field loss={g}"),
            None => "--field loss=NAME".to_string(),
        };
        anyhow::anyhow!(
            "{}: read {} lines as {}, {what}.\n  fields seen: {}\n  fix: name the loss field, e.g. `{fix}` \
             (also --field step=NAME, --field grad_norm=NAME)",
            path.display(),
            self.records,
            fmt.name(),
            if self.seen.is_empty() {
                "(none)".to_string()
            } else {
                self.seen.join(", ")
            }
        )
    }

    /// One line for the user: which fields are read.
    pub fn describe(&self) -> String {
        SLOTS
            .iter()
            .zip(&self.chosen)
            .filter_map(|(s, c)| c.as_ref().map(|c| format!("{s} ← {c:?}")))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Parses one format line by line into records.
pub struct LineParser {
    pub format: Format,
    csv_header: Option<Vec<String>>,
    delim: u8,
}

impl LineParser {
    pub fn new(format: Format, tsv: bool) -> Self {
        LineParser {
            format,
            csv_header: None,
            delim: if tsv { b'\t' } else { b',' },
        }
    }

    /// The CSV header, once read.
    pub fn header(&self) -> Option<&[String]> {
        self.csv_header.as_deref()
    }

    /// One line → a record (None for blanks, the header and lines that are not records).
    /// A CSV whose first line is numbers is refused: without names nothing can be judged.
    pub fn parse(&mut self, line: &str, path: &std::path::Path) -> Result<Option<Record>> {
        let line = line.trim_end_matches(['\r', '\n']);
        if line.trim().is_empty() {
            return Ok(None);
        }
        Ok(match self.format {
            Format::JsonLines => json_relaxed(line.trim()).and_then(|v| record_of_json(&v)),
            Format::Text => Some(record_of_text(line)),
            Format::HfState | Format::TensorBoard => None,
            Format::Csv => {
                let cells = csv_cells(line, self.delim);
                let Some(h) = &self.csv_header else {
                    if !cells.is_empty() && cells.iter().all(|c| c.is_empty() || is_number(c)) {
                        bail!(
                            "{}: the first line is numbers ({}), not a header; keel watch needs \
                             column names: add a header row (e.g. step,loss,grad_norm)",
                            path.display(),
                            line.chars().take(60).collect::<String>()
                        );
                    }
                    self.csv_header = Some(cells);
                    return Ok(None);
                };
                let mut r = Record::default();
                for (k, c) in h.iter().zip(&cells) {
                    if c.is_empty() {
                        continue;
                    }
                    if k == "skipped" {
                        r.skipped = matches!(c.to_ascii_lowercase().as_str(), "true" | "1");
                    }
                    r.values
                        .push((k.clone(), c.parse::<f64>().unwrap_or(f64::NAN)));
                }
                Some(r)
            }
        })
    }
}

/// The rows of an HF `trainer_state.json` (`log_history`), or None while it does not parse
/// (a writer mid-way).
pub fn hf_state_records(text: &str) -> Option<Vec<Record>> {
    let v = json_relaxed(text).or_else(|| serde_json::from_str(text).ok())?;
    let h = v.get("log_history")?.as_array()?;
    Some(h.iter().filter_map(record_of_json).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn python_nonfinite_tokens_are_numbers_outside_strings() {
        let v =
            json_relaxed(r#"{"loss": NaN, "g": Infinity, "h": -Infinity, "s": "NaN x"}"#).unwrap();
        let r = record_of_json(&v).unwrap();
        assert!(r.get("loss").unwrap().is_nan());
        assert_eq!(r.get("g"), Some(f64::INFINITY));
        assert_eq!(r.get("h"), Some(f64::NEG_INFINITY));
        assert!(r.get("s").unwrap().is_nan());
    }

    #[test]
    fn text_logs_of_common_trainers() {
        let r = record_of_text("iter 10: loss 4.2774, time 20403.61ms, mfu -100.00%");
        assert_eq!(r.get("iter"), Some(10.0));
        assert_eq!(r.get("loss"), Some(4.2774));
        assert_eq!(r.get("time"), Some(20403.61));
        let r = record_of_text(
            " iteration       10/     100 | consumed samples: 320 | lm loss: 1.034E+01 | grad norm: 5.432 |",
        );
        assert_eq!(r.get("iteration"), Some(10.0));
        assert_eq!(r.get("lm loss"), Some(10.34));
        assert_eq!(r.get("grad norm"), Some(5.432));
        let r = record_of_text("{'loss': 2.3456, 'grad_norm': nan, 'learning_rate': 5e-05}");
        assert_eq!(r.get("loss"), Some(2.3456));
        assert!(r.get("grad_norm").unwrap().is_nan());
        assert_eq!(r.get("learning_rate"), Some(5e-5));
        let r =
            record_of_text("\u{1b}[31mstep:  1  \u{1b}[32mloss: 12.2345  \u{1b}[33mmemory: 1.2GiB");
        assert_eq!(r.get("step"), Some(1.0));
        assert_eq!(r.get("loss"), Some(12.2345));
    }

    #[test]
    fn fields_lock_on_the_first_common_name() {
        let mut f = Fields::new(&[]).unwrap();
        // nanoGPT: the eval line comes first and has no plain loss
        let eval = record_of_text("step 0: train loss 4.28, val loss 4.29");
        assert!(f.metrics(&eval, 1).is_none());
        let m = f
            .metrics(&record_of_text("iter 0: loss 4.27, time 1ms"), 2)
            .unwrap();
        assert_eq!((m.step, m.loss), (0, 4.27));
        assert_eq!(f.chosen[1].as_deref(), Some("loss"));
        // HF's closing summary has train_loss but no loss: not a step
        let mut r = Record::default();
        r.values.push(("train_loss".into(), 2.0));
        r.values.push(("step".into(), 100.0));
        assert!(f.metrics(&r, 3).is_none());
    }

    #[test]
    fn csv_quotes_and_headerless_files() {
        let mut p = LineParser::new(Format::Csv, false);
        let path = Path::new("x.csv");
        assert!(p.parse("step,note,loss", path).unwrap().is_none());
        let r = p.parse(r#"3,"a, b, c",2.5"#, path).unwrap().unwrap();
        assert_eq!(r.get("loss"), Some(2.5));
        let mut p = LineParser::new(Format::Csv, false);
        assert!(p.parse("1,2.5,0.3", path).is_err());
    }

    #[test]
    fn sniffing() {
        let p = Path::new("a.bin");
        assert!(Format::sniff(p, b"\x00\x01\x02").is_err());
        assert_eq!(
            Format::sniff(Path::new("trainer_state.json"), b"{\n  \"log_history\": [").unwrap(),
            Format::HfState
        );
        assert_eq!(
            Format::sniff(Path::new("m.jsonl"), b"{\"loss\": 1}\n").unwrap(),
            Format::JsonLines
        );
        assert_eq!(
            Format::sniff(Path::new("log"), b"iter,train_loss,gnorm\n").unwrap(),
            Format::Csv
        );
        assert_eq!(
            Format::sniff(Path::new("out.txt"), b"iter 0: loss 4.2, time 3ms\n").unwrap(),
            Format::Text
        );
    }
}
