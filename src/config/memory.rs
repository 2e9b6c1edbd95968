//! What a command may allocate: the memory available to this process (MemAvailable, a cgroup
//! limit, or `--max-memory`), and estimates made before allocating, so a config that cannot
//! fit is refused naming the field that makes it big, instead of aborting half-way.

use super::{ConfigError, ModelConfig};
use std::sync::atomic::{AtomicU64, Ordering};

/// `--max-memory` in bytes (0: not given).
static LIMIT: AtomicU64 = AtomicU64::new(0);

/// Cap what commands may allocate (`--max-memory`), below what the machine has.
pub fn set_limit(bytes: u64) {
    LIMIT.store(bytes, Ordering::SeqCst);
}

/// Parse `8G`, `512M`, `2.5GiB`, `1000000` (bytes).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let i = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(i);
    let x: f64 = num
        .parse()
        .map_err(|_| format!("{s:?}: expected a size such as 8G, 512M or 2.5GiB"))?;
    let k = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" | "kib" => 1024.0,
        "m" | "mb" | "mib" => 1024f64.powi(2),
        "g" | "gb" | "gib" => 1024f64.powi(3),
        "t" | "tb" | "tib" => 1024f64.powi(4),
        u => return Err(format!("{s:?}: unknown unit {u:?}; use K, M, G or T")),
    };
    if !(x.is_finite() && x > 0.0) {
        return Err(format!("{s:?}: must be positive"));
    }
    Ok((x * k) as u64)
}

fn meminfo_available() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn cgroup_limit() -> Option<u64> {
    let max = std::fs::read_to_string("/sys/fs/cgroup/memory.max").ok()?;
    let max: u64 = max.trim().parse().ok()?; // "max" = unlimited
    let used = std::fs::read_to_string("/sys/fs/cgroup/memory.current")
        .ok()
        .and_then(|u| u.trim().parse::<u64>().ok())
        .unwrap_or(0);
    Some(max.saturating_sub(used))
}

/// Bytes this process may still allocate, and where the figure comes from.
pub fn available() -> (u64, &'static str) {
    let l = LIMIT.load(Ordering::SeqCst);
    if l > 0 {
        return (l, "--max-memory");
    }
    match (meminfo_available(), cgroup_limit()) {
        (Some(m), Some(c)) if c < m => (c, "the cgroup's memory limit"),
        (Some(m), _) => (m, "available memory"),
        (None, Some(c)) => (c, "the cgroup's memory limit"),
        (None, None) => (u64::MAX, "unknown"),
    }
}

pub fn human(b: f64) -> String {
    if b >= 1e12 {
        format!("{:.1} TB", b / 1e12)
    } else if b >= 1e9 {
        format!("{:.1} GB", b / 1e9)
    } else {
        format!("{:.0} MB", b / 1e6)
    }
}

/// Refuse `bytes` for `what` when it exceeds what is available, naming `field` and the fix.
pub fn ensure_fits(field: &str, what: &str, bytes: f64, fix: &str) -> Result<(), ConfigError> {
    let (avail, src) = available();
    if bytes > avail as f64 {
        return Err(ConfigError::new(
            field,
            format!(
                "{what} needs ~{} of memory, more than the {} of {src}",
                human(bytes),
                human(avail as f64)
            ),
            format!("{fix} (or raise the limit with --max-memory)"),
        ));
    }
    Ok(())
}

/// Bytes `keel train` (and `keel check`'s measurement) allocates for a model trained on
/// batches of `batch` × `seq`: weights, gradients and Adam's two moments (16 B a parameter),
/// activations kept for backward per layer, attention probabilities, and the logits with
/// their gradient. Returns the total and the field that contributes most.
pub fn train_bytes(mc: &ModelConfig, batch: usize, seq: usize) -> (f64, &'static str) {
    let n = batch as f64 * seq as f64;
    let (d, f, l) = (
        mc.hidden_size as f64,
        mc.intermediate_size as f64,
        mc.num_layers as f64,
    );
    let v = mc.vocab_size as f64;
    let params = 16.0 * mc.num_params() as f64;
    let vocab_params = 16.0 * v * d * if mc.tie_embeddings { 1.0 } else { 2.0 };
    let layers = 4.0 * n * (d * 12.0 + f * 3.0) * l;
    let attn = 4.0 * batch as f64 * (mc.num_heads * seq * seq) as f64 * l;
    let logits = 4.0 * 2.0 * n * v;
    let total = params + layers + attn + logits;
    let parts = [
        (vocab_params + logits, "model.vocab_size"),
        (params - vocab_params + layers, "model.num_layers"),
        (attn, "train.seq_len"),
    ];
    let field = parts
        .iter()
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map_or("model", |p| p.1);
    (total, field)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("8G").unwrap(), 8 << 30);
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("1000").unwrap(), 1000);
        assert!(parse_size("lots").is_err() && parse_size("3X").is_err());
    }

    #[test]
    fn a_huge_vocabulary_is_named_as_the_cause() {
        let mut mc = ModelConfig::preset("tiny").unwrap();
        mc.vocab_size = 4_194_304;
        let (b, field) = train_bytes(&mc, 8, 256);
        assert!(b > 30e9, "{b}");
        assert_eq!(field, "model.vocab_size");
        let tiny = ModelConfig::preset("tiny").unwrap();
        assert!(train_bytes(&tiny, 8, 256).0 < 1e9);
    }
}
