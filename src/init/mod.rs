//! Weight initialisation. Every tensor is filled from its own counter-based stream keyed by
//! (seed, HF name), so values are independent of thread count and of the other tensors.

pub mod rng;

use crate::model::{Model, Role};
use rayon::prelude::*;
use rng::{hash_name, Stream};

/// Fill `out` with N(0, std²) from the stream of `name`.
pub fn fill_normal(out: &mut [f32], seed: u64, name: &str, std: f64) {
    let s = Stream::new(seed, hash_name(name));
    out.par_chunks_mut(4096).enumerate().for_each(|(ci, ch)| {
        for (j, x) in ch.iter_mut().enumerate() {
            *x = (s.normal_at((ci * 4096 + j) as u64) * std) as f32;
        }
    });
}

/// Hugging Face's default LLaMA init: every linear and embedding N(0, 0.02²), norms 1.
pub fn init_hf_normal(model: &mut Model, seed: u64, std: f64) {
    let specs = model.layout.specs.clone();
    for s in &specs {
        let out = &mut model.params[s.offset..s.offset + s.len];
        match s.role {
            Role::Norm => out.fill(1.0),
            _ => fill_normal(out, seed, &s.name, std),
        }
    }
}

/// Schemes this build implements (more arrive with role-aware initialisation).
pub const SCHEMES: &[&str] = &["normal"];

/// Refuse an unknown scheme name with the list of known ones.
pub fn check_scheme(name: &str) -> Result<(), crate::config::ConfigError> {
    if SCHEMES.contains(&name) {
        Ok(())
    } else {
        Err(crate::config::ConfigError::new(
            "init.scheme",
            format!("unknown scheme '{name}'"),
            format!("use one of: {}", SCHEMES.join(", ")),
        ))
    }
}

/// Initialise a model as the run config says.
pub fn initialize(
    model: &mut Model,
    scheme: &str,
    seed: u64,
    std: f64,
) -> Result<(), crate::config::ConfigError> {
    check_scheme(scheme)?;
    init_hf_normal(model, seed, std);
    Ok(())
}
