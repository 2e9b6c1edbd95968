//! keel: train LLaMA-architecture language models that stay stable from the first step.
//!
//! Layers (see DESIGN.md): `cli` → `bench`/`train` → `model`, `optim`, `init` → `kernels`;
//! `config` and `checkpoint` handle what is on disk.

pub mod bench;
pub mod cli;
pub mod config;
pub mod init;
pub mod kernels;
pub mod model;
pub mod optim;
