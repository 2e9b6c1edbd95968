//! keel: train LLaMA-architecture language models that stay stable from the first step.
//!
//! Layers (see DESIGN.md): `cli` → `train`/`sweep`/`probe`/`report`/`bench`/`sample` →
//! `monitor`, `model`, `optim`, `init` → `kernels`; `config`, `data` and `checkpoint` handle
//! what is on disk. `sweep` runs `keel train` processes; `report` draws what the others wrote.
//! `bindings/python` is the Python package over this library (guard, init, audit, check).

pub mod bench;
pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod data;
pub mod init;
pub mod kernels;
pub mod model;
pub mod monitor;
pub mod optim;
pub mod probe;
pub mod report;
pub mod sample;
pub mod sweep;
pub mod tensorboard;
pub mod train;
pub mod watch;
