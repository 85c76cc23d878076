//! # kron-adapters
//!
//! Kronecker-product adapters for parameter-efficient fine-tuning on [Burn]: KronA
//! (`ΔW = s · a ⊗ b`), Kron-LoRA (`ΔW = s · a ⊗ (b1·b2)`) and LoRA, as ordinary
//! `Module<B: Backend>` types that train on every Burn backend (CPU, CUDA, wgpu), never
//! materialize a Kronecker product in training, merge into a plain `Linear`, and checkpoint
//! adapter-only files.
//!
//! Layout follows Burn's `Linear`: weights are `[d_in, d_out]` and `y = x·W + b`;
//! `(a ⊗ b)[i·b_in + k, j·b_out + l] = a[i, j]·b[k, l]`.
//!
//! ```
//! use burn::backend::{Autodiff, NdArray};
//! use burn::nn::LinearConfig;
//! use burn::tensor::{Distribution, Tensor};
//! use kron_adapters::{AdaptedLinear, AdapterConfig, KronAConfig};
//!
//! type B = Autodiff<NdArray>;
//! let device = Default::default();
//! let linear = LinearConfig::new(768, 768).init::<B>(&device); // your pretrained layer
//! let cfg = AdapterConfig::KronA(KronAConfig::new([32, 24], [24, 32]));
//! let layer = AdaptedLinear::new(linear, &cfg, &device)?; // base frozen, a ⊗ b trainable
//! let y = layer.forward(Tensor::<B, 3>::random([2, 10, 768], Distribution::Default, &device));
//! let dw = layer.delta_weight(); // [768, 768], scale included
//! let merged = layer.merge()?; // a plain Linear with W + ΔW
//! # Ok::<(), kron_adapters::AdapterError>(())
//! ```
//!
//! [Burn]: https://burn.dev

#![warn(missing_docs)]

pub mod adapter;
pub mod block;
pub mod checkpoint;
mod error;
#[cfg(feature = "finetune")]
pub mod finetune;
pub mod kron;
pub mod linear;
pub mod model;
pub mod params;
pub mod peft;
pub mod quant;
pub mod rng;
pub mod targets;
pub mod training;

pub use adapter::{
    Adapter, AdapterConfig, AdapterSpec, FactorInit, KronA, KronAConfig, KronLora, KronLoraConfig,
    LinearAdapter, Lora, LoraConfig, Method,
};
pub use checkpoint::{load_adapters, save_adapters, AdapterLayers, CheckpointMeta, NativeAdapters};
pub use error::{AdapterError, FactorShapeError};
pub use kron::{ContractionOrder, KronPlan};
pub use linear::AdaptedLinear;
pub use model::PeftConfig;
pub use params::{count_params, ParamCount};
pub use targets::Targets;
pub use training::TrainMode;
