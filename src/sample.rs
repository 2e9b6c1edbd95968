//! `keel sample`: text generation from a model directory (temperature, top-k, seed).

use crate::init::rng::Stream;
use crate::model::Model;
use anyhow::{bail, Result};

pub struct SampleOptions {
    pub max_new_tokens: usize,
    pub temperature: f32,
    pub top_k: usize,
    pub seed: u64,
}

/// Continue `prompt` (token ids) by up to `max_new_tokens`; stops early at `stop` if given.
/// Without a KV cache each new token re-runs the (causal) forward over the context; the
/// context is padded up to a multiple of 32 so buffers are resized rarely.
pub fn generate(
    model: &mut Model,
    prompt: &[u32],
    opts: &SampleOptions,
    stop: Option<u32>,
) -> Result<Vec<u32>> {
    if prompt.is_empty() {
        bail!("the prompt encodes to no tokens; fix: give a non-empty --prompt");
    }
    if opts.temperature.is_nan() || opts.temperature < 0.0 {
        bail!("--temperature must be ≥ 0 (0 = greedy)");
    }
    let v = model.cfg.vocab_size;
    let max_ctx = model.cfg.max_seq_len;
    let rng = Stream::new(opts.seed, 0x5A3B1E);
    let mut toks = prompt.to_vec();
    let mut out = Vec::new();
    let mut probs: Vec<(f32, u32)> = Vec::with_capacity(v);
    for i in 0..opts.max_new_tokens {
        let ctx = &toks[toks.len().saturating_sub(max_ctx)..];
        let len = ctx.len();
        let padded = len.div_ceil(32).saturating_mul(32).min(max_ctx).max(len);
        model.set_batch_shape(1, padded);
        let mut x = vec![0u32; padded];
        x[..len].copy_from_slice(ctx);
        model.forward_logits(&x)?;
        let logits = &model.logits().expect("forward_logits leaves logits")[(len - 1) * v..len * v];
        let next = if opts.temperature == 0.0 {
            logits
                .iter()
                .enumerate()
                .fold(
                    (0, f32::NEG_INFINITY),
                    |a, (j, &l)| if l > a.1 { (j, l) } else { a },
                )
                .0 as u32
        } else {
            probs.clear();
            probs.extend(
                logits
                    .iter()
                    .enumerate()
                    .map(|(j, &l)| (l / opts.temperature, j as u32)),
            );
            if opts.top_k > 0 && opts.top_k < v {
                probs.select_nth_unstable_by(opts.top_k - 1, |a, b| b.0.total_cmp(&a.0));
                probs.truncate(opts.top_k);
            }
            let mx = probs.iter().fold(f32::NEG_INFINITY, |m, p| m.max(p.0));
            let mut sum = 0f64;
            for p in probs.iter_mut() {
                p.0 = (p.0 - mx).exp();
                sum += p.0 as f64;
            }
            let mut r = rng.uniform_at(i as u64) * sum;
            let mut pick = probs.last().map(|p| p.1).unwrap_or(0);
            for p in probs.iter() {
                r -= p.0 as f64;
                if r <= 0.0 {
                    pick = p.1;
                    break;
                }
            }
            pick
        };
        toks.push(next);
        out.push(next);
        if Some(next) == stop {
            break;
        }
    }
    Ok(out)
}

/// Continue `prompt` from a model directory with a tokenizer.json (a checkpoint), or from
/// the newest checkpoint of a run directory; returns the generated text (`keel sample`).
pub fn from_dir(model: &std::path::Path, prompt: &str, opts: &SampleOptions) -> Result<String> {
    let dir = if model.join("config.json").exists() {
        model.to_path_buf()
    } else {
        crate::train::latest_checkpoint(model).ok_or_else(|| {
            anyhow::anyhow!(
                "{}: neither a model directory (config.json) nor a run with checkpoints",
                model.display()
            )
        })?
    };
    let tok_path = dir.join("tokenizer.json");
    if !tok_path.exists() {
        bail!(
            "{}: no tokenizer.json; fix: sample from a checkpoint of a run trained on text",
            dir.display()
        );
    }
    let tok = crate::data::tokenizer::Tok::load(&tok_path)?;
    let mut m = crate::checkpoint::load_model_dir(&dir, 1, 32)?;
    let mut ids = tok.encode(prompt)?;
    if ids.is_empty() {
        ids.push(tok.eot.unwrap_or(b'\n' as u32));
    }
    let gen = generate(&mut m, &ids, opts, tok.eot)?;
    tok.decode(&gen)
}
