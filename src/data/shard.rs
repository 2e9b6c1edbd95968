//! Token files: llm.c shards (256 × int32 header: magic 20240520 → uint16 tokens, magic
//! 20240801 → uint32 tokens; header[2] = token count), nanoGPT's headerless uint16 `.bin`,
//! and raw uint16/uint32 arrays (`keel eval --tokens`). Memory-mapped, validated on open.

use anyhow::{bail, Context, Result};
use memmap2::Mmap;
use rayon::prelude::*;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

pub const MAGIC_U16: i32 = 20240520;
pub const MAGIC_U32: i32 = 20240801;
const HEADER_BYTES: usize = 256 * 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenDtype {
    U16,
    U32,
}

impl TokenDtype {
    pub fn size(self) -> usize {
        match self {
            TokenDtype::U16 => 2,
            TokenDtype::U32 => 4,
        }
    }
    /// The narrowest dtype that holds ids below `vocab`.
    pub fn for_vocab(vocab: usize) -> Self {
        if vocab <= 1 << 16 {
            TokenDtype::U16
        } else {
            TokenDtype::U32
        }
    }
}

/// How to read a token file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// llm.c header if the magic is present, else nanoGPT headerless uint16.
    Auto,
    /// Headerless array of the given dtype.
    Raw(TokenDtype),
}

impl Layout {
    /// The layout of `path`: `dtype` (u16/u32) if given, else a `.u16`/`.u32` suffix means
    /// a raw array, anything else is read as an llm.c shard (or nanoGPT uint16).
    pub fn for_file(path: &Path, dtype: Option<&str>) -> anyhow::Result<Layout> {
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        Ok(match (dtype, ext) {
            (Some("u16" | "uint16"), _) | (None, "u16" | "uint16") => Layout::Raw(TokenDtype::U16),
            (Some("u32" | "uint32"), _) | (None, "u32" | "uint32") => Layout::Raw(TokenDtype::U32),
            (Some(other), _) => anyhow::bail!("--dtype {other}: use u16 or u32"),
            (None, _) => Layout::Auto,
        })
    }
}

/// A memory-mapped, validated array of token ids.
#[derive(Debug)]
pub struct TokenFile {
    pub path: PathBuf,
    map: Option<Mmap>, // None for an empty token array
    offset: usize,
    pub len: usize,
    pub dtype: TokenDtype,
}

impl TokenFile {
    /// Open and check a token file: header, size, and (when `vocab` is given) every id < vocab.
    pub fn open(path: &Path, layout: Layout, vocab: Option<usize>) -> Result<Self> {
        let name = path.display();
        let f = File::open(path).with_context(|| format!("{name}: cannot open token file"))?;
        let size = f
            .metadata()
            .with_context(|| format!("{name}: cannot stat"))?
            .len() as usize;
        if size == 0 {
            bail!("{name}: token file is empty; fix: point data.path at a non-empty shard");
        }
        // SAFETY: read-only map; keel never writes a file it has mapped.
        let map = unsafe { Mmap::map(&f) }.with_context(|| format!("{name}: cannot memory-map"))?;
        let (offset, len, dtype) = match layout {
            Layout::Raw(dt) => {
                if !size.is_multiple_of(dt.size()) {
                    bail!(
                        "{name}: size {size} is not a multiple of {} bytes; fix: check --dtype",
                        dt.size()
                    );
                }
                (0, size / dt.size(), dt)
            }
            Layout::Auto => {
                let magic = if size >= 4 {
                    i32::from_le_bytes([map[0], map[1], map[2], map[3]])
                } else {
                    0
                };
                if magic == MAGIC_U16 || magic == MAGIC_U32 {
                    if size < HEADER_BYTES {
                        bail!("{name}: llm.c header is truncated ({size} bytes < 1024); the file is damaged");
                    }
                    let dt = if magic == MAGIC_U16 {
                        TokenDtype::U16
                    } else {
                        TokenDtype::U32
                    };
                    let count = i32::from_le_bytes([map[8], map[9], map[10], map[11]]);
                    if count < 0 {
                        bail!(
                            "{name}: header token count {count} is negative; the file is damaged"
                        );
                    }
                    let need = (count as usize)
                        .checked_mul(dt.size())
                        .and_then(|b| b.checked_add(HEADER_BYTES));
                    match need {
                        Some(n) if n <= size => (HEADER_BYTES, count as usize, dt),
                        _ => bail!(
                            "{name}: header says {count} tokens but the file holds only {} bytes after the header (truncated); fix: re-create the shard",
                            size - HEADER_BYTES
                        ),
                    }
                } else if (magic as u32) >> 16 == (MAGIC_U16 as u32) >> 16 {
                    // looks like an llm.c magic (2024xxxx) but is not one we know
                    bail!("{name}: unrecognised magic {magic}; fix: give an llm.c shard (magic {MAGIC_U16} or {MAGIC_U32}) or a headerless uint16 file");
                } else {
                    if !size.is_multiple_of(2) {
                        bail!("{name}: no llm.c header and odd size {size}, so not a uint16 token array; fix: check the file");
                    }
                    (0, size / 2, TokenDtype::U16)
                }
            }
        };
        let tf = TokenFile {
            path: path.to_path_buf(),
            map: Some(map),
            offset,
            len,
            dtype,
        };
        if let Some(v) = vocab {
            tf.check_vocab(v)?;
        }
        Ok(tf)
    }

    fn bytes(&self) -> &[u8] {
        match &self.map {
            Some(m) => &m[self.offset..self.offset + self.len * self.dtype.size()],
            None => &[],
        }
    }

    /// Token i (caller keeps i < len).
    #[inline]
    pub fn get(&self, i: usize) -> u32 {
        let b = self.bytes();
        match self.dtype {
            TokenDtype::U16 => u16::from_le_bytes([b[2 * i], b[2 * i + 1]]) as u32,
            TokenDtype::U32 => {
                u32::from_le_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]])
            }
        }
    }

    /// Copy tokens [start, start + out.len()) into `out`.
    pub fn read(&self, start: usize, out: &mut [u32]) {
        for (j, o) in out.iter_mut().enumerate() {
            *o = self.get(start + j);
        }
    }

    /// Every id must be < vocab; the error names the first offender.
    pub fn check_vocab(&self, vocab: usize) -> Result<()> {
        let bad = (0..self.len)
            .into_par_iter()
            .with_min_len(1 << 16)
            .find_first(|&i| self.get(i) as usize >= vocab);
        if let Some(i) = bad {
            bail!(
                "{}: token id {} at position {i} is >= the model's vocab_size {vocab}; fix: use a tokenizer/shard made for this vocabulary or raise model.vocab_size",
                self.path.display(),
                self.get(i)
            );
        }
        Ok(())
    }
}

/// Write tokens as an llm.c shard (uint16 when ids fit, else uint32), atomically.
pub fn write_shard(path: &Path, tokens: &[u32], vocab: usize) -> Result<()> {
    if tokens.len() > i32::MAX as usize {
        bail!(
            "{}: {} tokens exceed one shard's limit (2^31)",
            path.display(),
            tokens.len()
        );
    }
    let dt = TokenDtype::for_vocab(vocab);
    let mut buf = Vec::with_capacity(HEADER_BYTES + tokens.len() * dt.size());
    let mut header = [0i32; 256];
    header[0] = if dt == TokenDtype::U16 {
        MAGIC_U16
    } else {
        MAGIC_U32
    };
    header[1] = if dt == TokenDtype::U16 { 1 } else { 7 };
    header[2] = tokens.len() as i32;
    for h in header {
        buf.extend_from_slice(&h.to_le_bytes());
    }
    for &t in tokens {
        match dt {
            TokenDtype::U16 => buf.extend_from_slice(&(t as u16).to_le_bytes()),
            TokenDtype::U32 => buf.extend_from_slice(&t.to_le_bytes()),
        }
    }
    crate::checkpoint::write_atomic(path, &buf)
}

/// Write raw little-endian tokens (no header), for `keel eval` inputs.
pub fn write_raw(path: &Path, tokens: &[u32], dt: TokenDtype) -> Result<()> {
    let mut f = File::create(path).with_context(|| format!("{}: cannot create", path.display()))?;
    for &t in tokens {
        match dt {
            TokenDtype::U16 => f.write_all(&(t as u16).to_le_bytes())?,
            TokenDtype::U32 => f.write_all(&t.to_le_bytes())?,
        }
    }
    Ok(())
}

/// Streams tokens into an llm.c shard: written to a temporary file, the header patched with
/// the count at the end, fsynced and renamed into place (a crash leaves no partial shard).
pub struct ShardWriter {
    w: std::io::BufWriter<File>,
    tmp: PathBuf,
    path: PathBuf,
    dtype: TokenDtype,
    pub count: usize,
}

impl ShardWriter {
    pub fn create(path: &Path, vocab: usize) -> Result<Self> {
        let tmp = path.with_extension("bin.partial");
        let f = File::create(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
        let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
        w.write_all(&[0u8; HEADER_BYTES])?;
        Ok(ShardWriter {
            w,
            tmp,
            path: path.to_path_buf(),
            dtype: TokenDtype::for_vocab(vocab),
            count: 0,
        })
    }

    pub fn push(&mut self, tokens: &[u32]) -> Result<()> {
        let name = self.tmp.display().to_string();
        for &t in tokens {
            match self.dtype {
                TokenDtype::U16 => self.w.write_all(&(t as u16).to_le_bytes()),
                TokenDtype::U32 => self.w.write_all(&t.to_le_bytes()),
            }
            .with_context(|| format!("{name}: write failed (disk full?)"))?;
        }
        self.count += tokens.len();
        if self.count > i32::MAX as usize {
            bail!(
                "{}: more than 2^31 tokens for one shard",
                self.path.display()
            );
        }
        Ok(())
    }

    /// Stop without a result: the partial file is removed.
    pub fn abandon(self) {
        let tmp = self.tmp.clone();
        drop(self.w);
        let _ = std::fs::remove_file(tmp);
    }

    pub fn finish(self) -> Result<()> {
        use std::io::{Seek, SeekFrom};
        let name = self.tmp.display().to_string();
        let mut f = self
            .w
            .into_inner()
            .map_err(|e| anyhow::anyhow!("{name}: write failed: {}", e.error()))?;
        let mut header = [0i32; 256];
        header[0] = if self.dtype == TokenDtype::U16 {
            MAGIC_U16
        } else {
            MAGIC_U32
        };
        header[1] = if self.dtype == TokenDtype::U16 { 1 } else { 7 };
        header[2] = self.count as i32;
        let bytes: Vec<u8> = header.iter().flat_map(|h| h.to_le_bytes()).collect();
        f.seek(SeekFrom::Start(0))?;
        f.write_all(&bytes)
            .with_context(|| format!("{name}: write failed"))?;
        f.sync_all()
            .with_context(|| format!("{name}: fsync failed"))?;
        std::fs::rename(&self.tmp, &self.path)
            .with_context(|| format!("{}: cannot rename into place", self.path.display()))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("keel-shard-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d.join(name)
    }

    #[test]
    fn round_trip_and_formats() {
        let toks: Vec<u32> = (0..1000).map(|i| (i * 37) % 500).collect();
        let p = tmp("a.bin");
        write_shard(&p, &toks, 500).unwrap();
        let f = TokenFile::open(&p, Layout::Auto, Some(500)).unwrap();
        assert_eq!((f.len, f.dtype), (1000, TokenDtype::U16));
        let mut out = vec![0; 10];
        f.read(990, &mut out);
        assert_eq!(&out[..], &toks[990..]);
        assert!(TokenFile::open(&p, Layout::Auto, Some(400))
            .unwrap_err()
            .to_string()
            .contains(">= the model's vocab_size"));
        let big: Vec<u32> = vec![70000, 1, 2];
        let p32 = tmp("b.bin");
        write_shard(&p32, &big, 80000).unwrap();
        let f = TokenFile::open(&p32, Layout::Auto, None).unwrap();
        assert_eq!((f.get(0), f.dtype), (70000, TokenDtype::U32));
        // nanoGPT headerless uint16
        let pr = tmp("c.bin");
        write_raw(&pr, &[5, 6, 7], TokenDtype::U16).unwrap();
        let f = TokenFile::open(&pr, Layout::Auto, Some(8)).unwrap();
        assert_eq!((f.len, f.get(2)), (3, 7));
    }

    #[test]
    fn damaged_files_are_refused() {
        let toks: Vec<u32> = (0..100).collect();
        let p = tmp("t.bin");
        write_shard(&p, &toks, 100).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() - 10]).unwrap();
        let e = TokenFile::open(&p, Layout::Auto, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("truncated"), "{e}");
        std::fs::write(&p, &bytes[..100]).unwrap();
        assert!(TokenFile::open(&p, Layout::Auto, None)
            .unwrap_err()
            .to_string()
            .contains("header is truncated"));
        let mut neg = bytes.clone();
        neg[8..12].copy_from_slice(&(-5i32).to_le_bytes());
        std::fs::write(&p, &neg).unwrap();
        assert!(TokenFile::open(&p, Layout::Auto, None).is_err());
        std::fs::write(&p, [1u8, 2, 3]).unwrap();
        assert!(TokenFile::open(&p, Layout::Auto, None)
            .unwrap_err()
            .to_string()
            .contains("odd size"));
        std::fs::write(&p, []).unwrap();
        assert!(TokenFile::open(&p, Layout::Auto, None)
            .unwrap_err()
            .to_string()
            .contains("empty"));
    }
}
