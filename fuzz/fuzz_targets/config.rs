//! Any bytes as an HF config.json and as a run config TOML: an error or a config, never a
//! panic or an allocation sized by the file (validation refuses absurd shapes first).
#![no_main]
use libfuzzer_sys::fuzz_target;
mod common;

fuzz_target!(|data: &[u8]| {
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) {
        if let Ok(c) = keel::config::ModelConfig::from_hf_value(&v) {
            let _ = c
                .validate()
                .map(|_| (c.num_params(), c.flops_per_token(c.max_seq_len)));
        }
    }
    let p = common::scratch("run.toml", data);
    if let Ok(rc) = keel::config::RunConfig::load(Some(&p), &[]) {
        let _ = rc.model_config();
    }
});
