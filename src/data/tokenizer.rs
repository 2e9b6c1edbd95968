//! Tokenizers: train a byte-level BPE with HF `tokenizers`, or load any `tokenizer.json`.

use anyhow::{anyhow, bail, Context, Result};
use std::path::Path;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, DecoderWrapper, PreTokenizerWrapper, Tokenizer};

/// The document separator keel adds when the vocabulary has room for it.
pub const EOT: &str = "<|endoftext|>";

pub struct Tok {
    pub inner: Tokenizer,
    /// Id of the end-of-text separator, if the tokenizer has one.
    pub eot: Option<u32>,
}

impl Tok {
    /// Train a byte-level BPE of exactly `vocab` ids on `docs` (256 byte symbols, the EOT
    /// separator when vocab > 256, then merges).
    pub fn train<I, S>(vocab: usize, docs: I) -> Result<Tok>
    where
        I: Iterator<Item = S> + Send,
        S: AsRef<str> + Send,
    {
        if vocab < 256 {
            bail!("model.vocab_size {vocab} is too small for a byte-level BPE (needs ≥ 256); fix: raise model.vocab_size or give data.tokenizer");
        }
        let specials = if vocab > 256 {
            vec![AddedToken::from(EOT, true)]
        } else {
            vec![]
        };
        let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
            .vocab_size(vocab)
            .min_frequency(2)
            .show_progress(false)
            .special_tokens(specials)
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .build()
            .into();
        let mut tk = Tokenizer::new(BPE::default());
        tk.with_pre_tokenizer(Some(PreTokenizerWrapper::ByteLevel(ByteLevel::new(
            false, true, true,
        ))));
        tk.with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevel::default())));
        tk.train(&mut trainer, docs)
            .map_err(|e| anyhow!("training the BPE tokenizer failed: {e}"))?;
        let eot = tk.token_to_id(EOT);
        Ok(Tok { inner: tk, eot })
    }

    pub fn load(path: &Path) -> Result<Tok> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("{}: cannot read tokenizer", path.display()))?;
        let inner: Tokenizer = text.parse().map_err(|e| {
            anyhow!(
                "{}: not a valid tokenizer.json ({e}); fix: give a file saved by HF tokenizers",
                path.display()
            )
        })?;
        let eot = inner.token_to_id(EOT).or_else(|| inner.token_to_id("</s>"));
        Ok(Tok { inner, eot })
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let json = self
            .inner
            .to_string(false)
            .map_err(|e| anyhow!("serialising tokenizer: {e}"))?;
        crate::checkpoint::write_atomic(path, json.as_bytes())
    }

    /// Number of ids the tokenizer can produce (including added tokens).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Encode a batch of documents in parallel, each followed by EOT when there is one.
    pub fn encode_docs(&self, docs: &[String], out: &mut Vec<u32>) -> Result<()> {
        let enc = self
            .inner
            .encode_batch(docs.iter().map(|s| s.as_str()).collect::<Vec<_>>(), false)
            .map_err(|e| anyhow!("tokenizing failed: {e}"))?;
        for e in enc {
            out.extend_from_slice(e.get_ids());
            if let Some(eot) = self.eot {
                out.push(eot);
            }
        }
        Ok(())
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let e = self
            .inner
            .encode(text, false)
            .map_err(|e| anyhow!("tokenizing failed: {e}"))?;
        Ok(e.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| anyhow!("decoding failed: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trains_exact_vocab_and_round_trips() {
        let text = crate::data::corpus::generate(60_000, 3);
        let docs: Vec<String> = text.split("\n\n").map(str::to_string).collect();
        let tok = Tok::train(400, docs.iter()).unwrap();
        assert_eq!(tok.vocab_size(), 400);
        assert!(tok.eot.is_some());
        let s = "ada lives in oslo. three plus four is seven.";
        let ids = tok.encode(s).unwrap();
        assert!(
            ids.len() * 3 < s.len() * 2,
            "BPE merges compress: {} ids",
            ids.len()
        );
        assert_eq!(tok.decode(&ids).unwrap(), s);
        let bytes_only = Tok::train(256, docs.iter()).unwrap();
        assert_eq!(bytes_only.vocab_size(), 256);
        assert_eq!(
            bytes_only
                .decode(&bytes_only.encode("héllo").unwrap())
                .unwrap(),
            "héllo"
        );
    }
}
