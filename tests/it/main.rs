//! The integration tests, as one test binary: every module links the whole of Burn (and, with
//! `--features wgpu`, wgpu and CubeCL), so one binary instead of one per file saves minutes of
//! linking and gigabytes of disk on every build. Run one part with a filter, e.g.
//! `cargo test --test it quant::`.
//!
//! The parts that need the main job's text side or the command-line tool are compiled with
//! their features (`--features full` builds everything; `--no-default-features --features
//! ndarray` builds and runs the adapters-only part).

#[macro_use]
mod common;

mod adapters;
mod blocks;
mod checkpoint;
#[cfg(feature = "cli")]
mod cli;
mod encoder;
#[cfg(feature = "finetune")]
mod finetune;
mod kron_backward;
#[cfg(any(feature = "wgpu", feature = "cuda"))]
mod kron_cube;
mod kron_math;
#[cfg(feature = "train")]
mod learner;
mod llama;
#[cfg(feature = "finetune")]
mod llm;
mod multi;
#[cfg(feature = "collective")]
mod parallel;
mod peft_io;
mod peft_parity;
#[cfg(any(feature = "flex", feature = "wgpu", feature = "cuda"))]
mod precision;
mod products;
mod quant;
#[cfg(all(feature = "finetune", feature = "flex"))]
mod resume;
#[cfg(feature = "serve")]
mod serve;
mod shards;
mod training;
