//! TensorBoard event files (`events.out.tfevents.*`), read by `keel watch`/`keel report` and
//! written by `keel train` (`[telemetry] tensorboard = true`), with no TensorFlow or protobuf
//! dependency: the format is small and fixed.
//!
//! A file is a sequence of TFRecords: `u64 length | u32 masked CRC32C(length) | data |
//! u32 masked CRC32C(data)`, little-endian, where each `data` is an `Event` protobuf
//! (`wall_time` = 1: double, `step` = 2: int64, `file_version` = 3: string, `summary` = 5).
//! A `Summary` holds repeated `Value`s (`tag` = 1, `simple_value` = 2: float, `tensor` = 8,
//! `metadata` = 9). Scalars come in two forms: the classic `simple_value` (TF1, PyTorch's
//! `SummaryWriter`, Lightning) and a rank-0 tensor with the `scalars` plugin (TF2's
//! `tf.summary.scalar`). A record whose CRC does not match is reported and not trusted; a
//! short last record is a write in progress (followed) or a torn write (reported).

use anyhow::{bail, Context, Result};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// CRC32C (Castagnoli), as TFRecord uses it.
pub fn crc32c(data: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let t = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, e) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    (c >> 1) ^ 0x82F6_3B78
                } else {
                    c >> 1
                };
            }
            *e = c;
        }
        t
    });
    let mut c = !0u32;
    for &b in data {
        c = t[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

/// TFRecord's masked CRC: a CRC stored in the data it covers would otherwise be fragile.
pub fn masked_crc(data: &[u8]) -> u32 {
    let c = crc32c(data);
    (c.rotate_right(15)).wrapping_add(0xa282_ead8)
}

/// One scalar from an event file.
#[derive(Debug, Clone, PartialEq)]
pub struct Scalar {
    pub step: i64,
    pub wall_time: f64,
    pub tag: String,
    pub value: f64,
}

/// What one record's data held.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Event {
    pub step: i64,
    pub wall_time: f64,
    pub file_version: Option<String>,
    /// (tag, value) of each scalar summary value.
    pub scalars: Vec<(String, f64)>,
    /// (tag, text) of each text summary value (the `text` plugin).
    pub texts: Vec<(String, String)>,
}

// ---------------------------------------------------------------- protobuf, the parts used

struct Pb<'a> {
    b: &'a [u8],
    i: usize,
}

enum Wire<'a> {
    Varint(u64),
    Fixed64(u64),
    Bytes(&'a [u8]),
    Fixed32(u32),
}

impl<'a> Pb<'a> {
    fn new(b: &'a [u8]) -> Self {
        Pb { b, i: 0 }
    }

    fn varint(&mut self) -> Result<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let Some(&byte) = self.b.get(self.i) else {
                bail!("truncated varint");
            };
            self.i += 1;
            v |= ((byte & 0x7f) as u64) << shift;
            if byte & 0x80 == 0 {
                return Ok(v);
            }
        }
        bail!("varint longer than 10 bytes")
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.b.len() - self.i < n {
            bail!("field runs past the end of its message");
        }
        let s = &self.b[self.i..self.i + n];
        self.i += n;
        Ok(s)
    }

    /// The next (field number, value), or None at the end.
    fn next(&mut self) -> Result<Option<(u64, Wire<'a>)>> {
        if self.i >= self.b.len() {
            return Ok(None);
        }
        let key = self.varint()?;
        let w = match key & 7 {
            0 => Wire::Varint(self.varint()?),
            1 => Wire::Fixed64(u64::from_le_bytes(self.take(8)?.try_into().unwrap())),
            2 => {
                let n = self.varint()? as usize;
                Wire::Bytes(self.take(n)?)
            }
            5 => Wire::Fixed32(u32::from_le_bytes(self.take(4)?.try_into().unwrap())),
            t => bail!("unsupported protobuf wire type {t}"),
        };
        Ok(Some((key >> 3, w)))
    }
}

fn f16_to_f64(h: u16) -> f64 {
    let s = if h >> 15 == 1 { -1.0 } else { 1.0 };
    let e = ((h >> 10) & 0x1f) as i32;
    let m = (h & 0x3ff) as f64;
    match e {
        0 => s * m * 2f64.powi(-24),
        31 if m == 0.0 => s * f64::INFINITY,
        31 => f64::NAN,
        _ => s * (1.0 + m / 1024.0) * 2f64.powi(e - 15),
    }
}

/// DataType enum values of TensorProto.dtype.
const DT_FLOAT: u64 = 1;
const DT_DOUBLE: u64 = 2;
const DT_INT32: u64 = 3;
const DT_STRING: u64 = 7;
const DT_INT64: u64 = 9;
const DT_BFLOAT16: u64 = 14;
const DT_HALF: u64 = 19;

/// A tensor's values: numbers, or strings for DT_STRING.
#[derive(Default)]
struct Tensor {
    dtype: u64,
    numbers: Vec<f64>,
    strings: Vec<String>,
}

fn tensor(b: &[u8]) -> Result<Tensor> {
    let mut t = Tensor::default();
    let mut content: &[u8] = &[];
    let mut halves: Vec<f64> = Vec::new();
    let mut p = Pb::new(b);
    // repeated scalar fields come packed (proto3) or one per key (older writers)
    let packed =
        |w: Wire, fixed: usize, out: &mut Vec<f64>, conv: &dyn Fn(u64) -> f64| -> Result<()> {
            match w {
                Wire::Bytes(bytes) if fixed > 0 => {
                    for c in bytes.chunks_exact(fixed) {
                        let v = if fixed == 4 {
                            u32::from_le_bytes(c.try_into().unwrap()) as u64
                        } else {
                            u64::from_le_bytes(c.try_into().unwrap())
                        };
                        out.push(conv(v));
                    }
                }
                Wire::Bytes(bytes) => {
                    let mut q = Pb::new(bytes);
                    while q.i < bytes.len() {
                        out.push(conv(q.varint()?));
                    }
                }
                Wire::Varint(v) | Wire::Fixed64(v) => out.push(conv(v)),
                Wire::Fixed32(v) => out.push(conv(v as u64)),
            }
            Ok(())
        };
    while let Some((f, w)) = p.next()? {
        match (f, w) {
            (1, Wire::Varint(d)) => t.dtype = d,
            (4, Wire::Bytes(c)) => content = c,
            (5, w) => packed(w, 4, &mut t.numbers, &|v| f32::from_bits(v as u32) as f64)?,
            (6, w) => packed(w, 8, &mut t.numbers, &|v| f64::from_bits(v))?,
            (7, w) => packed(w, 0, &mut t.numbers, &|v| v as i32 as f64)?,
            (10, w) => packed(w, 0, &mut t.numbers, &|v| v as i64 as f64)?,
            // half_val: raw 16-bit patterns, decoded once the dtype is known
            (13, w) => packed(w, 0, &mut halves, &|v| v as f64)?,
            (8, Wire::Bytes(s)) => t.strings.push(String::from_utf8_lossy(s).into_owned()),
            _ => {}
        }
    }
    for h in halves {
        let bits = h as u16;
        t.numbers.push(if t.dtype == DT_BFLOAT16 {
            f32::from_bits((bits as u32) << 16) as f64
        } else {
            f16_to_f64(bits)
        });
    }
    if !content.is_empty() {
        let n: Vec<f64> = match t.dtype {
            DT_FLOAT => content
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
                .collect(),
            DT_DOUBLE => content
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                .collect(),
            DT_INT32 => content
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as f64)
                .collect(),
            DT_INT64 => content
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64)
                .collect(),
            DT_HALF => content
                .chunks_exact(2)
                .map(|c| f16_to_f64(u16::from_le_bytes(c.try_into().unwrap())))
                .collect(),
            DT_BFLOAT16 => content
                .chunks_exact(2)
                .map(|c| {
                    f32::from_bits((u16::from_le_bytes(c.try_into().unwrap()) as u32) << 16) as f64
                })
                .collect(),
            _ => Vec::new(),
        };
        t.numbers = n;
    }
    Ok(t)
}

/// Decode one record's data as an Event.
pub fn parse_event(b: &[u8]) -> Result<Event> {
    let mut e = Event::default();
    let mut p = Pb::new(b);
    while let Some((f, w)) = p.next()? {
        match (f, w) {
            (1, Wire::Fixed64(v)) => e.wall_time = f64::from_bits(v),
            (2, Wire::Varint(v)) => e.step = v as i64,
            (3, Wire::Bytes(s)) => e.file_version = Some(String::from_utf8_lossy(s).into_owned()),
            (5, Wire::Bytes(s)) => summary(s, &mut e)?,
            _ => {}
        }
    }
    Ok(e)
}

fn summary(b: &[u8], e: &mut Event) -> Result<()> {
    let mut p = Pb::new(b);
    while let Some((f, w)) = p.next()? {
        let (1, Wire::Bytes(v)) = (f, w) else {
            continue;
        };
        let (mut tag, mut simple, mut tens, mut plugin) = (String::new(), None, None, None);
        let mut q = Pb::new(v);
        while let Some((f, w)) = q.next()? {
            match (f, w) {
                (1, Wire::Bytes(s)) => tag = String::from_utf8_lossy(s).into_owned(),
                (2, Wire::Fixed32(x)) => simple = Some(f32::from_bits(x) as f64),
                (8, Wire::Bytes(s)) => tens = Some(tensor(s)?),
                (9, Wire::Bytes(s)) => {
                    // SummaryMetadata.plugin_data (1) .plugin_name (1)
                    let mut m = Pb::new(s);
                    while let Some((f, w)) = m.next()? {
                        if let (1, Wire::Bytes(pd)) = (f, w) {
                            let mut n = Pb::new(pd);
                            while let Some((f, w)) = n.next()? {
                                if let (1, Wire::Bytes(name)) = (f, w) {
                                    plugin = Some(String::from_utf8_lossy(name).into_owned());
                                }
                            }
                        }
                    }
                }
                _ => {}
            }
        }
        if let Some(x) = simple {
            e.scalars.push((tag, x));
        } else if let Some(t) = tens {
            match plugin.as_deref() {
                Some("text") if t.dtype == DT_STRING => e.texts.push((tag, t.strings.join("\n"))),
                // a one-element numeric tensor under the scalars plugin (or none named)
                Some("scalars") | None if t.numbers.len() == 1 => {
                    e.scalars.push((tag, t.numbers[0]))
                }
                _ => {}
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- reading files

/// What reading found besides events: records not trusted, a torn end.
#[derive(Debug, Clone, PartialEq)]
pub enum Problem {
    /// A record's data CRC did not match: its contents are not trusted (skipped).
    BadCrc { offset: u64 },
    /// The length header's CRC did not match: framing is lost, the rest of the file is unread.
    BadHeader { offset: u64 },
    /// The record's data is not a valid Event protobuf (skipped).
    BadEvent { offset: u64, why: String },
    /// The file ends inside a record (a writer killed mid-write, or still writing).
    Torn { offset: u64, have: u64, need: u64 },
}

impl Problem {
    pub fn describe(&self, path: &Path) -> String {
        let p = path.display();
        match self {
            Problem::BadCrc { offset } => format!(
                "{p}: record at byte {offset} fails its CRC check (corrupted); skipped, not trusted"
            ),
            Problem::BadHeader { offset } => format!(
                "{p}: the record header at byte {offset} fails its CRC check; the rest of the file cannot be framed and is not read"
            ),
            Problem::BadEvent { offset, why } => {
                format!("{p}: record at byte {offset} is not a valid Event ({why}); skipped")
            }
            Problem::Torn { offset, have, need } => format!(
                "{p}: the last record (byte {offset}) is cut short ({have} of {need} bytes): a torn write; the events before it are read"
            ),
        }
    }
}

/// Reads an event file incrementally: `poll` returns the events of the records completed
/// since the last call, so a file being written can be followed.
pub struct EventReader {
    pub path: PathBuf,
    file: File,
    pos: u64,
    pending: Vec<u8>,
    /// Framing was lost (a bad header CRC): nothing more is read.
    dead: bool,
}

/// Largest record accepted: a corrupted length must not make us allocate gigabytes.
const MAX_RECORD: u64 = 256 << 20;

impl EventReader {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path)
            .with_context(|| format!("{}: cannot open the event file", path.display()))?;
        Ok(EventReader {
            path: path.to_path_buf(),
            file,
            pos: 0,
            pending: Vec::new(),
            dead: false,
        })
    }

    /// Bytes read so far.
    pub fn offset(&self) -> u64 {
        self.pos
    }

    /// The events of the whole records written since the last poll. With `eof` (the file is
    /// finished), bytes left over are a torn record and reported.
    pub fn poll(&mut self, eof: bool) -> Result<(Vec<Event>, Vec<Problem>)> {
        let mut events = Vec::new();
        let mut problems = Vec::new();
        if self.dead {
            return Ok((events, problems));
        }
        let start = self.pos - self.pending.len() as u64;
        self.file.seek(SeekFrom::Start(self.pos))?;
        let mut buf = Vec::new();
        self.file.read_to_end(&mut buf)?;
        self.pos += buf.len() as u64;
        self.pending.extend_from_slice(&buf);
        let mut i = 0usize;
        loop {
            let off = start + i as u64;
            let rest = &self.pending[i..];
            if rest.len() < 12 {
                break;
            }
            let len = u64::from_le_bytes(rest[..8].try_into().unwrap());
            let hcrc = u32::from_le_bytes(rest[8..12].try_into().unwrap());
            if masked_crc(&rest[..8]) != hcrc || len > MAX_RECORD {
                problems.push(Problem::BadHeader { offset: off });
                self.dead = true;
                self.pending.clear();
                return Ok((events, problems));
            }
            let need = 12 + len as usize + 4;
            if rest.len() < need {
                break;
            }
            let data = &rest[12..12 + len as usize];
            let dcrc = u32::from_le_bytes(rest[12 + len as usize..need].try_into().unwrap());
            if masked_crc(data) != dcrc {
                problems.push(Problem::BadCrc { offset: off });
            } else {
                match parse_event(data) {
                    Ok(e) => events.push(e),
                    Err(why) => problems.push(Problem::BadEvent {
                        offset: off,
                        why: why.to_string(),
                    }),
                }
            }
            i += need;
        }
        self.pending.drain(..i);
        if eof && !self.pending.is_empty() {
            let have = self.pending.len() as u64;
            let need = if have >= 8 {
                12 + u64::from_le_bytes(self.pending[..8].try_into().unwrap()) + 4
            } else {
                12
            };
            problems.push(Problem::Torn {
                offset: self.pos - have,
                have,
                need,
            });
            self.pending.clear();
        }
        Ok((events, problems))
    }
}

/// Whether a file name is a TensorBoard event file's.
pub fn is_event_file(p: &Path) -> bool {
    p.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.contains("tfevents"))
}

/// Whether the bytes start like a TFRecord file (a valid first length header).
pub fn looks_like_tfrecord(head: &[u8]) -> bool {
    head.len() >= 12
        && masked_crc(&head[..8]) == u32::from_le_bytes(head[8..12].try_into().unwrap())
}

/// The event files of a log directory: those directly in it, else those of the one
/// directory (searched recursively) that holds the newest event file (TensorBoard's runs,
/// Lightning's `version_N`, HF's `runs/<date>`); oldest first, as TensorBoard orders them.
/// Also returns the other run directories found, so the caller can say which was chosen.
pub fn event_files(dir: &Path) -> Result<(Vec<PathBuf>, Vec<PathBuf>)> {
    fn walk(d: &Path, depth: usize, out: &mut Vec<PathBuf>) {
        let Ok(rd) = std::fs::read_dir(d) else { return };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() && depth < 6 {
                walk(&p, depth + 1, out);
            } else if is_event_file(&p) {
                out.push(p);
            }
        }
    }
    let mut all = Vec::new();
    walk(dir, 0, &mut all);
    if all.is_empty() {
        bail!(
            "{}: no TensorBoard event files (events.out.tfevents.*) in it or below; fix: give the log directory the SummaryWriter or logger wrote, or a metrics file",
            dir.display()
        );
    }
    let mtime = |p: &PathBuf| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    // newest by the creation time in the name (a clone or copy resets modification times)
    let newest = all
        .iter()
        .max_by_key(|p| (tf_time(p), mtime(p), (*p).clone()))
        .unwrap()
        .clone();
    let run = newest.parent().unwrap_or(dir).to_path_buf();
    let mut others: Vec<PathBuf> = all
        .iter()
        .filter_map(|p| p.parent().map(Path::to_path_buf))
        .filter(|p| *p != run)
        .collect();
    others.sort();
    others.dedup();
    let mut files: Vec<PathBuf> = all
        .into_iter()
        .filter(|p| p.parent() == Some(&run))
        .collect();
    files.sort_by(|a, b| (tf_time(a), a).cmp(&(tf_time(b), b)));
    Ok((files, others))
}

/// The creation time in an event file's name (`events.out.tfevents.<secs>.<host>...`).
fn tf_time(p: &Path) -> u64 {
    p.file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.split("tfevents.").nth(1))
        .and_then(|r| r.split('.').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// Read whole event files: the scalars in file order, and what was not trusted.
pub fn read_scalars(files: &[PathBuf]) -> Result<(Vec<Scalar>, Vec<String>)> {
    let mut out = Vec::new();
    let mut notes = Vec::new();
    for f in files {
        let mut r = EventReader::open(f)?;
        let (events, problems) = r.poll(true)?;
        for e in events {
            for (tag, value) in e.scalars {
                out.push(Scalar {
                    step: e.step,
                    wall_time: e.wall_time,
                    tag,
                    value,
                });
            }
        }
        notes.extend(problems.iter().map(|p| p.describe(f)));
    }
    Ok((out, notes))
}

// ---------------------------------------------------------------- writing

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_key(out: &mut Vec<u8>, field: u64, wire: u64) {
    put_varint(out, (field << 3) | wire);
}

fn put_bytes(out: &mut Vec<u8>, field: u64, b: &[u8]) {
    put_key(out, field, 2);
    put_varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

fn event_bytes(wall_time: f64, step: i64, body: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut e = Vec::new();
    put_key(&mut e, 1, 1);
    e.extend_from_slice(&wall_time.to_le_bytes());
    if step != 0 {
        put_key(&mut e, 2, 0);
        put_varint(&mut e, step as u64);
    }
    body(&mut e);
    e
}

fn scalar_value(tag: &str, v: f32) -> Vec<u8> {
    let mut val = Vec::new();
    put_bytes(&mut val, 1, tag.as_bytes());
    put_key(&mut val, 2, 5);
    val.extend_from_slice(&v.to_le_bytes());
    val
}

fn text_value(tag: &str, text: &str) -> Vec<u8> {
    // metadata: plugin_data { plugin_name: "text" }
    let mut pd = Vec::new();
    put_bytes(&mut pd, 1, b"text");
    let mut md = Vec::new();
    put_bytes(&mut md, 1, &pd);
    // tensor: dtype DT_STRING, shape [] , string_val
    let mut t = Vec::new();
    put_key(&mut t, 1, 0);
    put_varint(&mut t, DT_STRING);
    put_bytes(&mut t, 2, &[]);
    put_bytes(&mut t, 8, text.as_bytes());
    let mut val = Vec::new();
    put_bytes(&mut val, 1, tag.as_bytes());
    put_bytes(&mut val, 8, &t);
    put_bytes(&mut val, 9, &md);
    val
}

/// Frame one record.
pub fn record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut r = Vec::with_capacity(data.len() + 16);
    r.extend_from_slice(&len);
    r.extend_from_slice(&masked_crc(&len).to_le_bytes());
    r.extend_from_slice(data);
    r.extend_from_slice(&masked_crc(data).to_le_bytes());
    r
}

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Appends events to a new event file in a log directory, one record per write; each
/// `flush` makes the step's scalars visible to a TensorBoard (or `keel watch`) reading it.
pub struct EventWriter {
    pub path: PathBuf,
    out: std::io::BufWriter<File>,
}

impl EventWriter {
    /// A new file `events.out.tfevents.<secs>.<host>.keel` in `dir` (created if needed),
    /// starting with the file-version event TensorBoard expects.
    pub fn create(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| {
            format!(
                "{}: cannot create the TensorBoard log directory",
                dir.display()
            )
        })?;
        let host = std::fs::read_to_string("/etc/hostname")
            .ok()
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty() && !h.contains(['/', '.']))
            .unwrap_or_else(|| "localhost".into());
        let t = now();
        let mut n = 0;
        let path = loop {
            let suffix = if n == 0 {
                String::new()
            } else {
                format!(".{n}")
            };
            let p = dir.join(format!(
                "events.out.tfevents.{}.{host}.keel{suffix}",
                t as u64
            ));
            if !p.exists() {
                break p;
            }
            n += 1;
        };
        let f = File::create(&path)
            .with_context(|| format!("{}: cannot create the event file", path.display()))?;
        let mut w = EventWriter {
            path,
            out: std::io::BufWriter::new(f),
        };
        let ev = event_bytes(t, 0, |e| put_bytes(e, 3, b"brain.Event:2"));
        w.out.write_all(&record(&ev))?;
        w.out.flush()?;
        Ok(w)
    }

    /// Scalars of one step, in one Event.
    pub fn scalars(&mut self, step: i64, values: &[(&str, f64)]) -> Result<()> {
        // (NaN and infinities are written as they are: a diverging run must show as one)
        let vals = values;
        if vals.is_empty() {
            return Ok(());
        }
        let ev = event_bytes(now(), step, |e| {
            let mut s = Vec::new();
            for (tag, v) in vals {
                put_bytes(&mut s, 1, &scalar_value(tag, *v as f32));
            }
            put_bytes(e, 5, &s);
        });
        self.out.write_all(&record(&ev))?;
        Ok(())
    }

    /// A text summary (TensorBoard's Text tab), e.g. a guard event's description.
    pub fn text(&mut self, step: i64, tag: &str, text: &str) -> Result<()> {
        let ev = event_bytes(now(), step, |e| {
            let mut s = Vec::new();
            put_bytes(&mut s, 1, &text_value(tag, text));
            put_bytes(e, 5, &s);
        });
        self.out.write_all(&record(&ev))?;
        Ok(())
    }

    pub fn flush(&mut self) -> Result<()> {
        self.out.flush()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        // the CRC-32C check value of "123456789" (RFC 3720, iSCSI)
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
    }

    #[test]
    fn written_events_read_back() {
        let dir = std::env::temp_dir().join(format!("keel-tb-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut w = EventWriter::create(&dir).unwrap();
        w.scalars(1, &[("train/loss", 4.5), ("train/lr", 1e-3)])
            .unwrap();
        w.text(1, "keel/events", "skip: loss spike").unwrap();
        w.scalars(2, &[("train/loss", f64::INFINITY)]).unwrap();
        w.flush().unwrap();
        let (files, others) = event_files(&dir).unwrap();
        assert_eq!(files, vec![w.path.clone()]);
        assert!(others.is_empty());
        let mut r = EventReader::open(&files[0]).unwrap();
        let (ev, problems) = r.poll(true).unwrap();
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(ev[0].file_version.as_deref(), Some("brain.Event:2"));
        assert_eq!(ev[1].step, 1);
        assert_eq!(ev[1].scalars[0], ("train/loss".to_string(), 4.5));
        assert!((ev[1].scalars[1].1 - 1e-3).abs() < 1e-9);
        assert_eq!(
            ev[2].texts,
            vec![("keel/events".into(), "skip: loss spike".into())]
        );
        assert_eq!(ev[3].scalars[0].1, f64::INFINITY);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn torn_and_corrupt_records_are_reported_not_trusted() {
        let mut bytes = Vec::new();
        for s in 1..=3 {
            let ev = event_bytes(0.0, s, |e| {
                let mut sm = Vec::new();
                put_bytes(&mut sm, 1, &scalar_value("loss", s as f32));
                put_bytes(e, 5, &sm);
            });
            bytes.extend(record(&ev));
        }
        let one = bytes.len() / 3;
        // flip a bit in record 2's data: its CRC no longer matches
        let mut bad = bytes.clone();
        bad[one + 14] ^= 0x10;
        // and cut record 3 short
        bad.truncate(bytes.len() - 5);
        let p = std::env::temp_dir().join(format!("keel-tb-torn-{}.tfevents", std::process::id()));
        std::fs::write(&p, &bad).unwrap();
        let mut r = EventReader::open(&p).unwrap();
        // while followed, a short record is a write in progress: no problem yet
        let (ev, problems) = r.poll(false).unwrap();
        assert_eq!(ev.len(), 1);
        assert_eq!(problems, vec![Problem::BadCrc { offset: one as u64 }]);
        let (ev, problems) = r.poll(true).unwrap();
        assert!(ev.is_empty());
        assert!(matches!(problems[0], Problem::Torn { .. }), "{problems:?}");
        // a corrupted length header stops framing
        let mut hdr = bytes.clone();
        hdr[one + 2] ^= 1;
        std::fs::write(&p, &hdr).unwrap();
        let (ev, problems) = EventReader::open(&p).unwrap().poll(true).unwrap();
        assert_eq!(ev.len(), 1);
        assert_eq!(problems, vec![Problem::BadHeader { offset: one as u64 }]);
        let _ = std::fs::remove_file(&p);
    }

    #[test]
    fn tensor_scalars_of_every_dtype_are_read() {
        // tf.summary.scalar writes a rank-0 tensor under the scalars plugin
        let tensor_value = |dtype: u64, content: &[u8]| {
            let mut t = Vec::new();
            put_key(&mut t, 1, 0);
            put_varint(&mut t, dtype);
            put_bytes(&mut t, 4, content);
            let mut pd = Vec::new();
            put_bytes(&mut pd, 1, b"scalars");
            let mut md = Vec::new();
            put_bytes(&mut md, 1, &pd);
            let mut v = Vec::new();
            put_bytes(&mut v, 1, b"x");
            put_bytes(&mut v, 9, &md);
            put_bytes(&mut v, 8, &t);
            v
        };
        let cases: Vec<(u64, Vec<u8>, f64)> = vec![
            (DT_FLOAT, 2.5f32.to_le_bytes().to_vec(), 2.5),
            (DT_DOUBLE, 0.1f64.to_le_bytes().to_vec(), 0.1),
            (DT_INT64, 7i64.to_le_bytes().to_vec(), 7.0),
            (DT_HALF, 0x3C00u16.to_le_bytes().to_vec(), 1.0),
            (DT_BFLOAT16, 0x4040u16.to_le_bytes().to_vec(), 3.0),
        ];
        for (dtype, content, want) in cases {
            let ev = event_bytes(0.0, 5, |e| {
                let mut s = Vec::new();
                put_bytes(&mut s, 1, &tensor_value(dtype, &content));
                put_bytes(e, 5, &s);
            });
            let e = parse_event(&ev).unwrap();
            assert_eq!(e.scalars, vec![("x".to_string(), want)], "dtype {dtype}");
        }
        // a packed float_val (another writer's form)
        let mut t = Vec::new();
        put_key(&mut t, 1, 0);
        put_varint(&mut t, DT_FLOAT);
        put_bytes(&mut t, 5, &4.0f32.to_le_bytes());
        let mut v = Vec::new();
        put_bytes(&mut v, 1, b"y");
        put_bytes(&mut v, 8, &t);
        let mut s = Vec::new();
        put_bytes(&mut s, 1, &v);
        let e = parse_event(&event_bytes(0.0, 1, |e| put_bytes(e, 5, &s))).unwrap();
        assert_eq!(e.scalars, vec![("y".to_string(), 4.0)]);
    }
}
