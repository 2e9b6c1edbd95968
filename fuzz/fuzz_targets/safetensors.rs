//! Any bytes as a model.safetensors of the micro model: an error or a load, never a panic,
//! hang or huge allocation.
#![no_main]
use libfuzzer_sys::fuzz_target;
mod common;

fuzz_target!(|data: &[u8]| {
    let cfg = keel::config::ModelConfig::preset("micro").unwrap();
    let layout = keel::model::ParamLayout::new(&cfg);
    let mut out = vec![0f32; layout.total];
    let p = common::scratch("model.safetensors", data);
    let _ = keel::checkpoint::load_tensors(&p, &layout, "", &mut out, false);
    let _ = keel::checkpoint::load_tensors(&p, &layout, "model.", &mut out, true);
});
