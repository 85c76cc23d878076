//! The integration tests, as one test binary: every module links the whole of Burn (and, with
//! `--features wgpu`, wgpu and CubeCL), so one binary instead of one per file saves minutes of
//! linking and gigabytes of disk on every build. Run one part with a filter, e.g.
//! `cargo test --test it quant::`.

mod common;

mod adapters;
mod blocks;
mod checkpoint;
mod cli;
mod encoder;
mod finetune;
mod kron_math;
mod peft_io;
mod peft_parity;
mod quant;
mod training;
