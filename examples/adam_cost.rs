//! Prices the guard's update/weight telemetry inside AdamW (tracked vs untracked update) on
//! the tiny preset: `cargo run --release --example adam_cost`.
use keel::config::ModelConfig;
use keel::model::ParamLayout;
use keel::optim::{AdamW, OptimConfig};
use std::time::Instant;

fn main() {
    let cfg = ModelConfig::preset("tiny").unwrap();
    let layout = ParamLayout::new(&cfg);
    let mut opt = AdamW::new(OptimConfig::default(), &layout);
    let mut p: Vec<f32> = (0..layout.total).map(|i| (i % 97) as f32 * 1e-3).collect();
    let g: Vec<f32> = (0..layout.total)
        .map(|i| (i % 13) as f32 * 1e-4 - 6e-4)
        .collect();
    for track in [false, true, false, true] {
        opt.track = track;
        let t0 = Instant::now();
        for _ in 0..50 {
            opt.update(&mut p, &g, 1e-3);
        }
        println!(
            "track {track:5}: {:.3} ms per update ({} params)",
            t0.elapsed().as_secs_f64() * 1e3 / 50.0,
            layout.total
        );
    }
}
