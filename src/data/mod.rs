//! Data: sources (text, JSONL, Parquet, token shards), tokenizers, the token cache beside the
//! run, the built-in corpus, and deterministic batches addressed by a cursor.

pub mod corpus;
pub mod shard;
pub mod source;
pub mod tokenizer;

use crate::config::RunConfig;
use crate::init::rng::{hash_name, Stream};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use shard::{Layout, ShardWriter, TokenFile};
use source::Format;
use std::ops::Range;
use std::path::{Path, PathBuf};
use tokenizer::Tok;

/// Tokens ready for training: one token file split into train and validation ranges.
pub struct Dataset {
    pub tokens: TokenFile,
    pub train: Range<usize>,
    pub val: Range<usize>,
    /// Path of the tokenizer.json that produced the tokens (copied into checkpoints).
    pub tokenizer: Option<PathBuf>,
    /// Where the data came from, for logs.
    pub description: String,
}

impl Dataset {
    /// Entropy (nats/token) of the unigram distribution of the training tokens (the first
    /// 16M): the loss of a model that ignores context. A model that learned anything beats it.
    pub fn unigram_entropy(&self) -> f64 {
        let n = self.train.len().min(1 << 24);
        let mut counts: std::collections::HashMap<u32, u64> = std::collections::HashMap::new();
        for i in self.train.start..self.train.start + n {
            *counts.entry(self.tokens.get(i)).or_default() += 1;
        }
        counts
            .values()
            .map(|&c| {
                let p = c as f64 / n as f64;
                -p * p.ln()
            })
            .sum()
    }
}

/// Key of the token cache: reused only when source and tokenizer are unchanged.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct CacheKey {
    source: String,
    bytes: u64,
    mtime: u64,
    tokenizer_hash: u64,
    format: String,
}

/// Build (or reuse) the tokens for a run in `dir/data/`, with a progress callback
/// `(bytes_done, bytes_total)` for tokenisation.
/// Data preparation was stopped (the progress callback said so, e.g. on Ctrl-C); nothing
/// half-written was left behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Interrupted;

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "interrupted while preparing the data")
    }
}

impl std::error::Error for Interrupted {}

/// Read, tokenise and cache the training data. `progress(what, done, total)` is called at
/// least every 100 ms while the tokenizer trains and after every 2 MB tokenised; when it
/// returns false the work stops within about a second with `Interrupted`, leaving no
/// partial file (the tokenizer and the token cache are only ever renamed into place whole).
pub fn prepare(
    cfg: &RunConfig,
    dir: &Path,
    vocab: usize,
    seq_len: usize,
    progress: &mut dyn FnMut(&str, u64, u64) -> bool,
) -> Result<Dataset> {
    let data_dir = dir.join("data");
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("{}: cannot create", data_dir.display()))?;
    let (path, description) = if cfg.data.path.is_empty() {
        let p = data_dir.join("builtin-corpus.txt");
        if !p.exists() {
            let text = corpus::generate(cfg.data.builtin_bytes, 0);
            crate::checkpoint::write_atomic(&p, text.as_bytes())?;
        }
        (p, "built-in corpus".to_string())
    } else {
        let p = PathBuf::from(&cfg.data.path);
        let d = p.display().to_string();
        (p, d)
    };
    let format = source::detect_format(&path, &cfg.data.format)?;
    let (tokens, tokenizer) = if format == Format::Shard {
        let tf = TokenFile::open(&path, Layout::Auto, Some(vocab))?;
        let tk = if cfg.data.tokenizer.is_empty() {
            None
        } else {
            Some(PathBuf::from(&cfg.data.tokenizer))
        };
        if let Some(t) = &tk {
            check_tokenizer_vocab(&Tok::load(t)?, t, vocab)?;
        }
        (tf, tk)
    } else {
        let tok_path = dir.join("tokenizer.json");
        let tok = if !cfg.data.tokenizer.is_empty() {
            let p = PathBuf::from(&cfg.data.tokenizer);
            let t = Tok::load(&p)?;
            check_tokenizer_vocab(&t, &p, vocab)?;
            t.save(&tok_path)?;
            t
        } else if tok_path.exists() {
            let t = Tok::load(&tok_path)?;
            check_tokenizer_vocab(&t, &tok_path, vocab)?;
            t
        } else {
            if !progress("training tokenizer", 0, 1) {
                return Err(Interrupted.into());
            }
            let sample = source::sample_text(&path, format, 64 << 20)?;
            // BPE training cannot be interrupted from inside: run it on its own thread and
            // abandon it when asked to stop (its result is never saved)
            let h = std::thread::spawn(move || Tok::train(vocab, sample.iter()));
            while !h.is_finished() {
                if !progress("training tokenizer", 0, 1) {
                    return Err(Interrupted.into());
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            let t = h
                .join()
                .map_err(|_| anyhow::anyhow!("the tokenizer's training thread panicked"))??;
            t.save(&tok_path)?;
            t
        };
        let tok_json = std::fs::read_to_string(&tok_path)?;
        let (bytes, mtime) = source::fingerprint(&path)?;
        let key = CacheKey {
            source: std::fs::canonicalize(&path)
                .unwrap_or(path.clone())
                .display()
                .to_string(),
            bytes,
            mtime,
            tokenizer_hash: hash_name(&tok_json),
            format: format!("{format:?}"),
        };
        let shard = data_dir.join("tokens.bin");
        let key_path = data_dir.join("tokens.json");
        let cached = std::fs::read_to_string(&key_path)
            .ok()
            .and_then(|s| serde_json::from_str::<CacheKey>(&s).ok())
            .is_some_and(|k| k == key)
            && shard.exists();
        if !cached {
            tokenize_to_shard(&tok, &path, format, &shard, vocab, bytes, progress)?;
            crate::checkpoint::write_atomic(
                &key_path,
                serde_json::to_string_pretty(&key)?.as_bytes(),
            )?;
        }
        (
            TokenFile::open(&shard, Layout::Auto, Some(vocab))?,
            Some(tok_path),
        )
    };
    let n = tokens.len;
    let n_val = ((n as f64) * cfg.data.val_fraction) as usize;
    let n_val = if cfg.data.val_fraction > 0.0 {
        n_val.max(seq_len + 1)
    } else {
        0
    };
    if n < n_val + seq_len + 2 {
        bail!(
            "{}: only {n} tokens, too few for seq_len {seq_len} plus a validation split; fix: give more data or lower train.seq_len",
            path.display()
        );
    }
    Ok(Dataset {
        tokens,
        train: 0..n - n_val,
        val: n - n_val..n,
        tokenizer,
        description,
    })
}

fn check_tokenizer_vocab(t: &Tok, path: &Path, vocab: usize) -> Result<()> {
    if t.vocab_size() > vocab {
        bail!(
            "{}: tokenizer has {} ids but model.vocab_size is {vocab}; fix: set model.vocab_size = {} (or more) or use a matching tokenizer",
            path.display(),
            t.vocab_size(),
            t.vocab_size()
        );
    }
    Ok(())
}

fn tokenize_to_shard(
    tok: &Tok,
    path: &Path,
    format: Format,
    shard: &Path,
    vocab: usize,
    total: u64,
    progress: &mut dyn FnMut(&str, u64, u64) -> bool,
) -> Result<()> {
    let mut w = ShardWriter::create(shard, vocab)?;
    let mut stopped = false;
    let mut batch: Vec<source::Piece> = Vec::new();
    let mut batch_bytes = 0usize;
    let mut done = 0u64;
    let mut ids = Vec::new();
    let mut flush =
        |batch: &mut Vec<source::Piece>, w: &mut ShardWriter, done: &mut u64| -> Result<()> {
            let texts: Vec<String> = batch.iter().map(|p| p.text.clone()).collect();
            let enc = tok
                .inner
                .encode_batch(texts.iter().map(|s| s.as_str()).collect::<Vec<_>>(), false)
                .map_err(|e| anyhow::anyhow!("tokenizing {} failed: {e}", path.display()))?;
            ids.clear();
            for (e, p) in enc.iter().zip(batch.iter()) {
                ids.extend_from_slice(e.get_ids());
                if p.end_of_doc {
                    if let Some(eot) = tok.eot {
                        ids.push(eot);
                    }
                }
                *done += p.text.len() as u64;
            }
            w.push(&ids)?;
            batch.clear();
            Ok(())
        };
    let res = source::for_each_piece(path, format, &mut |p| {
        if stopped {
            return Ok(());
        }
        batch_bytes += p.text.len();
        batch.push(p);
        if batch_bytes >= 2 << 20 {
            flush(&mut batch, &mut w, &mut done)?;
            batch_bytes = 0;
            stopped = !progress("tokenizing", done, total);
        }
        Ok(())
    });
    if let Err(e) = res {
        w.abandon();
        return Err(e);
    }
    if stopped {
        w.abandon();
        return Err(Interrupted.into());
    }
    flush(&mut batch, &mut w, &mut done)?;
    progress("tokenizing", total, total);
    if w.count == 0 {
        bail!(
            "{}: no text found; fix: give a non-empty data file",
            path.display()
        );
    }
    w.finish()
}

/// Deterministic batches. Training batch `index` (the data cursor) takes B random windows of
/// the train range from a counter-based stream, so any batch can be re-made from
/// (seed, index) alone; validation batches are fixed consecutive windows.
pub struct Batcher {
    pub seed: u64,
    pub batch: usize,
    pub seq: usize,
}

impl Batcher {
    pub fn train_batch(&self, ds: &Dataset, index: u64, tokens: &mut [u32], targets: &mut [u32]) {
        let s = Stream::new(self.seed, 0xDA7A);
        let span = (ds.train.len() - self.seq) as u64;
        for r in 0..self.batch {
            let off =
                ds.train.start + (s.u64_at(index * self.batch as u64 + r as u64) % span) as usize;
            self.window(ds, off, r, tokens, targets);
        }
    }

    /// Number of distinct validation batches available (at most `want`).
    pub fn val_batches(&self, ds: &Dataset, want: usize) -> usize {
        let windows = ds.val.len().saturating_sub(1) / self.seq;
        (windows / self.batch)
            .min(want)
            .max(if windows > 0 { 1 } else { 0 })
    }

    pub fn val_batch(&self, ds: &Dataset, index: usize, tokens: &mut [u32], targets: &mut [u32]) {
        let windows = (ds.val.len() - 1) / self.seq;
        for r in 0..self.batch {
            let w = (index * self.batch + r) % windows;
            self.window(ds, ds.val.start + w * self.seq, r, tokens, targets);
        }
    }

    fn window(&self, ds: &Dataset, off: usize, r: usize, tokens: &mut [u32], targets: &mut [u32]) {
        let t = self.seq;
        ds.tokens.read(off, &mut tokens[r * t..(r + 1) * t]);
        ds.tokens.read(off + 1, &mut targets[r * t..(r + 1) * t]);
    }
}
