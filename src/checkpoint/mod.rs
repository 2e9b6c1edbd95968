//! Checkpoints and model directories on disk.
//!
//! A checkpoint is an HF model directory (`config.json`, `model.safetensors`,
//! `tokenizer.json`) plus keel's trainer state (`trainer_state.safetensors`: AdamW moments;
//! `state.json`: step, data cursor, ...). It is written to a temporary directory, every file
//! fsynced, then renamed into place and the parent fsynced, so a crash never leaves a
//! partial checkpoint under its final name.

use crate::config::ModelConfig;
use crate::model::{Model, ParamLayout};
use anyhow::{anyhow, bail, Context, Result};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Write a file atomically: temp file in the same folder, fsync, rename, fsync the folder.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let name = path.display();
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file"),
        std::process::id()
    ));
    let res = (|| -> Result<()> {
        let mut f =
            File::create(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
        f.write_all(bytes)
            .with_context(|| format!("{name}: write failed (disk full?)"))?;
        f.sync_all()
            .with_context(|| format!("{name}: fsync failed"))?;
        std::fs::rename(&tmp, path).with_context(|| format!("{name}: cannot rename into place"))?;
        sync_dir(dir);
        Ok(())
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

/// fsync a directory so a rename in it is durable (best effort: not all filesystems allow it).
pub fn sync_dir(dir: &Path) {
    if let Ok(f) = File::open(dir) {
        let _ = f.sync_all();
    }
}

fn f32_bytes(x: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(x.len() * 4);
    for v in x {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// Serialise named f32 tensors (name, shape, values) to safetensors bytes.
pub fn safetensors_bytes(
    tensors: &[(String, Vec<usize>, &[f32])],
    meta: HashMap<String, String>,
) -> Result<Vec<u8>> {
    let bufs: Vec<Vec<u8>> = tensors.iter().map(|(_, _, v)| f32_bytes(v)).collect();
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .zip(&bufs)
        .map(|((n, s, _), b)| Ok((n.clone(), TensorView::new(Dtype::F32, s.clone(), b)?)))
        .collect::<Result<_, safetensors::SafeTensorError>>()?;
    Ok(safetensors::serialize(views, Some(meta))?)
}

fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h >> 15) as u32) << 31;
    let exp = ((h >> 10) & 0x1f) as u32;
    let man = (h & 0x3ff) as u32;
    let bits = if exp == 0 {
        if man == 0 {
            sign
        } else {
            // subnormal: renormalise
            let mut e = 127 - 15 + 1;
            let mut m = man;
            while m & 0x400 == 0 {
                m <<= 1;
                e -= 1;
            }
            sign | ((e as u32) << 23) | ((m & 0x3ff) << 13)
        }
    } else if exp == 31 {
        sign | 0x7f80_0000 | (man << 13)
    } else {
        sign | ((exp + 127 - 15) << 23) | (man << 13)
    };
    f32::from_bits(bits)
}

/// Copy a safetensors tensor into f32 (F32, BF16 and F16 accepted).
fn read_f32(file: &str, name: &str, t: &TensorView<'_>, out: &mut [f32]) -> Result<()> {
    let d = t.data();
    match t.dtype() {
        Dtype::F32 => {
            for (o, b) in out.iter_mut().zip(d.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        Dtype::BF16 => {
            for (o, b) in out.iter_mut().zip(d.chunks_exact(2)) {
                *o = f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16);
            }
        }
        Dtype::F16 => {
            for (o, b) in out.iter_mut().zip(d.chunks_exact(2)) {
                *o = f16_to_f32(u16::from_le_bytes([b[0], b[1]]));
            }
        }
        other => bail!(
            "{file}: tensor {name} has dtype {other:?}; fix: keel reads F32, BF16 or F16 weights"
        ),
    }
    Ok(())
}

/// Memory-map a file read-only: a huge or hostile file is never read into memory whole;
/// safetensors validates the header against the mapped length before any tensor is touched.
fn map_file(path: &Path) -> Result<memmap2::Mmap> {
    let f = File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    // SAFETY: read-only map of a file keel does not modify while it is mapped.
    unsafe { memmap2::Mmap::map(&f) }
        .with_context(|| format!("{}: cannot memory-map", path.display()))
}

/// Load named tensors from a safetensors file into the parameter layout (`prefix` + HF name).
/// Every tensor of the layout must be present with its shape. Extra tensors are an error,
/// except `lm_head.weight` of a tied model and rotary buffers.
pub fn load_tensors(
    path: &Path,
    layout: &ParamLayout,
    prefix: &str,
    out: &mut [f32],
    tied: bool,
) -> Result<()> {
    let file = path.display().to_string();
    let bytes = map_file(path)?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| {
        anyhow!("{file}: not a valid safetensors file ({e}); fix: re-save the checkpoint")
    })?;
    for spec in &layout.specs {
        let name = format!("{prefix}{}", spec.name);
        let t = st.tensor(&name).map_err(|_| {
            if name.ends_with("q_norm.weight") || name.ends_with("k_norm.weight") {
                anyhow!(
                    "{file}: tensor {name} is missing: the config asks for qk-norm (model.qk_norm, or model_type \"qwen3\") but the checkpoint has no q/k norm weights; fix: load it without qk-norm (model_type \"llama\"), or train qk-norm from a fresh init"
                )
            } else {
                anyhow!(
                    "{file}: tensor {name} is missing; fix: the checkpoint does not match config.json"
                )
            }
        })?;
        if t.shape() != spec.shape.as_slice() {
            bail!(
                "{file}: tensor {name} has shape {:?}, expected {:?} from the config; fix: use the config.json this checkpoint was saved with",
                t.shape(),
                spec.shape
            );
        }
        read_f32(
            &file,
            &name,
            &t,
            &mut out[spec.offset..spec.offset + spec.len],
        )?;
    }
    let known: std::collections::HashSet<String> = layout
        .specs
        .iter()
        .map(|s| format!("{prefix}{}", s.name))
        .collect();
    for name in st.names() {
        let n: &str = name;
        let ok = known.contains(n)
            || (tied && n == format!("{prefix}lm_head.weight"))
            || n.contains("rotary_emb");
        if !ok {
            bail!("{file}: unexpected tensor {n}; fix: keel loads LlamaForCausalLM weights only (no biases or extra heads)");
        }
    }
    Ok(())
}

/// Load an HF model directory (config.json + model.safetensors) into a model with activation
/// buffers for (b, t).
pub fn load_model_dir(dir: &Path, b: usize, t: usize) -> Result<Model> {
    let cfg = ModelConfig::from_hf_json(&dir.join("config.json")).map_err(|e| anyhow!("{e}"))?;
    let mut model = Model::new(&cfg, b, t);
    let tied = cfg.tie_embeddings;
    let Model { layout, params, .. } = &mut model;
    load_tensors(&dir.join("model.safetensors"), layout, "", params, tied)?;
    Ok(model)
}

/// The model directory files: config.json and model.safetensors.
pub fn model_files(model: &Model) -> Result<(Vec<u8>, Vec<u8>)> {
    let cfg = serde_json::to_vec_pretty(&model.cfg.to_hf_value())?;
    let tensors: Vec<(String, Vec<usize>, &[f32])> = model
        .layout
        .specs
        .iter()
        .map(|s| {
            (
                s.name.clone(),
                s.shape.clone(),
                &model.params[s.offset..s.offset + s.len],
            )
        })
        .collect();
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    Ok((cfg, safetensors_bytes(&tensors, meta)?))
}

/// Write `out/config.json` and `out/model.safetensors` (each atomically): an HF model
/// directory that `LlamaForCausalLM.from_pretrained` loads.
pub fn write_model_dir(model: &Model, out: &Path) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("{}: cannot create", out.display()))?;
    let (c, w) = model_files(model)?;
    write_atomic(&out.join("config.json"), &c)?;
    write_atomic(&out.join("model.safetensors"), &w)
}

/// Trainer progress saved with each checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainerState {
    /// Optimizer steps completed.
    pub step: u64,
    /// Training batches consumed (advances past skipped batches too).
    pub data_cursor: u64,
    /// AdamW's own step count (bias correction).
    pub adam_step: u64,
    pub tokens_seen: u64,
    pub elapsed_s: f64,
    pub best_val_loss: Option<f64>,
    pub keel_version: String,
    /// Detector windows and policy state, so a resumed run guards exactly as before.
    #[serde(default)]
    pub guard: crate::monitor::GuardSnapshot,
    /// Loss of the first step and the count of consecutive steps above it since warm-up
    /// (`train.stop_if_diverged`).
    #[serde(default)]
    pub initial_loss: Option<f64>,
    #[serde(default)]
    pub above_initial: u64,
    /// The guard rescued a broken init at step 1 (`guard.init_rescue`): a rollback to the
    /// initial weights restores the rescued ones.
    #[serde(default)]
    pub init_rescued: bool,
    /// Taken with no guard incident open: a rollback may restore it. A checkpoint forced
    /// inside an incident (Ctrl-C, the last step) is only a place to resume from.
    #[serde(default = "yes")]
    pub clean: bool,
    /// A regular checkpoint was due and waits for the incident to close (so a resumed run
    /// takes it where the uninterrupted one would).
    #[serde(default)]
    pub checkpoint_pending: bool,
}

fn yes() -> bool {
    true
}

/// Whether a checkpoint may be a rollback target (its state says it was taken clean).
pub fn is_clean(dir: &Path) -> bool {
    read_state(dir).is_ok_and(|s| s.clean)
}

/// Write a complete checkpoint atomically as `root/step-NNNNNNNN`; returns its path.
pub fn save(
    root: &Path,
    model: &Model,
    m: &[f32],
    v: &[f32],
    state: &TrainerState,
    tokenizer: Option<&Path>,
) -> Result<PathBuf> {
    std::fs::create_dir_all(root).with_context(|| format!("{}: cannot create", root.display()))?;
    let final_dir = root.join(format!("step-{:08}", state.step));
    let tmp = root.join(format!(
        ".tmp-step-{:08}-{}",
        state.step,
        std::process::id()
    ));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    let res = (|| -> Result<()> {
        std::fs::create_dir(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
        let (cfg, weights) = model_files(model)?;
        write_synced(&tmp.join("config.json"), &cfg)?;
        write_synced(&tmp.join("model.safetensors"), &weights)?;
        if let Some(t) = tokenizer {
            let bytes = std::fs::read(t)
                .with_context(|| format!("{}: cannot read tokenizer", t.display()))?;
            write_synced(&tmp.join("tokenizer.json"), &bytes)?;
        }
        let mut tensors = Vec::new();
        for s in &model.layout.specs {
            tensors.push((
                format!("exp_avg.{}", s.name),
                s.shape.clone(),
                &m[s.offset..s.offset + s.len],
            ));
            tensors.push((
                format!("exp_avg_sq.{}", s.name),
                s.shape.clone(),
                &v[s.offset..s.offset + s.len],
            ));
        }
        let ts = safetensors_bytes(&tensors, HashMap::new())?;
        write_synced(&tmp.join("trainer_state.safetensors"), &ts)?;
        write_synced(&tmp.join("state.json"), &serde_json::to_vec_pretty(state)?)?;
        sync_dir(&tmp);
        if final_dir.exists() {
            // a re-save of the same step: move the old one aside atomically first
            remove_atomically(&final_dir)?;
        }
        std::fs::rename(&tmp, &final_dir)
            .with_context(|| format!("{}: cannot rename into place", final_dir.display()))?;
        sync_dir(root);
        Ok(())
    })();
    if let Err(e) = res {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e.context(format!(
            "writing checkpoint {} failed; earlier checkpoints are intact; fix: free disk space and resume with the same --out",
            final_dir.display()
        )));
    }
    Ok(final_dir)
}

/// I/O fault injection for tests of the failure path: `KEEL_FAULT_WRITE=NAME@K` makes the
/// K-th checkpoint write of a file called NAME fail as a full disk would.
fn injected_fault(path: &Path) -> Option<std::io::Error> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static SEEN: AtomicUsize = AtomicUsize::new(0);
    let spec = std::env::var("KEEL_FAULT_WRITE").ok()?;
    let (name, k) = spec.split_once('@')?;
    let k: usize = k.parse().ok()?;
    if path.file_name()?.to_str()? != name {
        return None;
    }
    let n = SEEN.fetch_add(1, Ordering::SeqCst) + 1;
    (n == k).then(|| {
        std::io::Error::new(
            std::io::ErrorKind::StorageFull,
            "No space left on device (injected)",
        )
    })
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let name = path.display();
    if let Some(e) = injected_fault(path) {
        return Err(anyhow::Error::new(e).context(format!("{name}: write failed (disk full?)")));
    }
    let mut f = File::create(path).with_context(|| format!("{name}: cannot create"))?;
    f.write_all(bytes)
        .with_context(|| format!("{name}: write failed (disk full?)"))?;
    f.sync_all()
        .with_context(|| format!("{name}: fsync failed"))?;
    Ok(())
}

/// Delete a checkpoint directory so that no crash can leave it half-deleted under its name:
/// rename it to a hidden `.tmp-` name (atomic), then remove that.
fn remove_atomically(dir: &Path) -> Result<()> {
    let name = dir
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("checkpoint");
    let trash = dir.with_file_name(format!(".tmp-delete-{name}-{}", std::process::id()));
    std::fs::rename(dir, &trash)
        .with_context(|| format!("{}: cannot move aside", dir.display()))?;
    if let Some(parent) = dir.parent() {
        sync_dir(parent);
    }
    std::fs::remove_dir_all(&trash).with_context(|| format!("{}: cannot remove", trash.display()))
}

/// Files every complete checkpoint has.
const CHECKPOINT_FILES: [&str; 4] = [
    "config.json",
    "model.safetensors",
    "trainer_state.safetensors",
    "state.json",
];

/// Complete checkpoints under `root`, oldest first (temporary directories are ignored).
pub fn list(root: &Path) -> Vec<(u64, PathBuf)> {
    let mut out: Vec<(u64, PathBuf)> = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_str()?.to_string();
            let step = name.strip_prefix("step-")?.parse().ok()?;
            let complete = CHECKPOINT_FILES.iter().all(|f| e.path().join(f).exists());
            complete.then_some((step, e.path()))
        })
        .collect();
    out.sort();
    out
}

/// Remove leftovers of interrupted saves and deletes, and all but the newest `keep` clean
/// checkpoints (each moved aside atomically before it is deleted). A checkpoint forced inside
/// an incident does not count against `keep` (it would push out a rollback target the
/// uninterrupted run still has) and goes once a newer clean one exists.
pub fn prune(root: &Path, keep: usize) -> Result<()> {
    for e in std::fs::read_dir(root).into_iter().flatten().flatten() {
        let leftover = e
            .file_name()
            .to_str()
            .is_some_and(|n| n.starts_with(".tmp-step-") || n.starts_with(".tmp-delete-"));
        if leftover {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
    let all = list(root);
    let clean: Vec<bool> = all.iter().map(|(_, p)| is_clean(p)).collect();
    let newest_clean = clean.iter().rposition(|&c| c);
    let n_clean = clean.iter().filter(|&&c| c).count();
    let mut clean_seen = 0;
    for (i, (_, p)) in all.iter().enumerate() {
        let drop = if clean[i] {
            clean_seen += 1;
            clean_seen + keep.min(n_clean) <= n_clean
        } else {
            newest_clean.is_some_and(|n| n > i)
        };
        if drop {
            remove_atomically(p)?;
        }
    }
    Ok(())
}

/// Load a checkpoint into `model` and the optimizer moments; returns its trainer state.
pub fn load(dir: &Path, model: &mut Model, m: &mut [f32], v: &mut [f32]) -> Result<TrainerState> {
    let cfg = ModelConfig::from_hf_json(&dir.join("config.json")).map_err(|e| anyhow!("{e}"))?;
    if cfg != model.cfg {
        bail!(
            "{}: checkpoint model config differs from the run's; fix: resume with the run's own config.toml, or use a new --out",
            dir.display()
        );
    }
    let tied = cfg.tie_embeddings;
    {
        let Model { layout, params, .. } = model;
        load_tensors(&dir.join("model.safetensors"), layout, "", params, tied)?;
    }
    let ts = dir.join("trainer_state.safetensors");
    let bytes = map_file(&ts)?;
    let st =
        SafeTensors::deserialize(&bytes).map_err(|e| anyhow!("{}: invalid ({e})", ts.display()))?;
    let file = ts.display().to_string();
    for s in &model.layout.specs {
        for (prefix, buf) in [("exp_avg.", &mut *m), ("exp_avg_sq.", &mut *v)] {
            let name = format!("{prefix}{}", s.name);
            let t = st
                .tensor(&name)
                .map_err(|_| anyhow!("{file}: missing {name}"))?;
            if t.shape() != s.shape.as_slice() || t.dtype() != Dtype::F32 {
                bail!("{file}: {name} has the wrong shape or dtype");
            }
            read_f32(&file, &name, &t, &mut buf[s.offset..s.offset + s.len])?;
        }
    }
    let st = read_state(dir)?;
    // Adam's bias correction divides by 1 − β₂^step: moments with a step count of 0 are a
    // state.json that does not belong to these tensors (edited, or copied from elsewhere)
    if st.adam_step == 0 && v.iter().any(|&x| x != 0.0) {
        bail!(
            "{}: adam_step is 0 but {} holds second moments of earlier updates; the files do \
             not belong together (state.json edited or copied from another checkpoint); fix: \
             restore the checkpoint's own state.json, or resume from an older checkpoint by \
             moving this one aside",
            dir.join("state.json").display(),
            ts.display()
        );
    }
    Ok(st)
}

/// A checkpoint's `state.json`, cross-checked against the checkpoint's name: a hand-edited
/// or misplaced state is refused, not trusted.
pub fn read_state(dir: &Path) -> Result<TrainerState> {
    let sp = dir.join("state.json");
    let text =
        std::fs::read_to_string(&sp).with_context(|| format!("{}: cannot read", sp.display()))?;
    let st: TrainerState = serde_json::from_str(&text)
        .with_context(|| format!("{}: invalid state file", sp.display()))?;
    let named = dir
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("step-"))
        .and_then(|n| n.parse::<u64>().ok());
    let fix = "fix: restore the checkpoint's own state.json, or move this checkpoint aside to resume from an older one";
    if let Some(n) = named {
        if st.step != n {
            bail!(
                "{}: step is {} but the checkpoint is {}; {fix}",
                sp.display(),
                st.step,
                dir.file_name().and_then(|n| n.to_str()).unwrap_or("")
            );
        }
    }
    if st.adam_step > st.step {
        bail!(
            "{}: adam_step {} exceeds step {} (an optimizer update per step at most); {fix}",
            sp.display(),
            st.adam_step,
            st.step
        );
    }
    if st.data_cursor < st.step {
        bail!(
            "{}: data_cursor {} is behind step {} (each step consumes at least one batch); {fix}",
            sp.display(),
            st.data_cursor,
            st.step
        );
    }
    Ok(st)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_conversion() {
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
        assert_eq!(f16_to_f32(0x0001), 5.960_464_5e-8);
        assert!(f16_to_f32(0x7c00).is_infinite());
    }
}
