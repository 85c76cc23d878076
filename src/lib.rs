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
//! The module map, what each module may depend on and where a new model, method or file
//! format goes: `docs/architecture.md`.
//!
//! [Burn]: https://burn.dev

#![warn(missing_docs)]

mod macros;

mod act;
pub mod adapter;
pub mod block;
mod error;
#[cfg(feature = "finetune")]
pub mod finetune;
pub mod kron;
#[cfg(feature = "train")]
pub mod learner;
pub mod linear;
#[cfg(feature = "finetune")]
pub mod llm;
pub mod model;
pub mod multi;
pub mod optim;
#[cfg(feature = "collective")]
pub mod parallel;
pub mod params;
pub mod place;
mod product;
mod qproduct;
pub mod quant;
mod quirks;
pub mod rng;
#[cfg(feature = "serve")]
pub mod serve;
pub mod shards;
pub mod store;
pub mod training;

pub use adapter::{
    Adapter, AdapterConfig, AdapterSpec, FactorInit, KronA, KronAConfig, KronLora, KronLoraConfig,
    LinearAdapter, Lora, LoraConfig, Method, MethodConfig, MethodInfo,
};
pub use error::{AdapterError, ConfigError, ErrorKind, FactorShapeError};
pub use kron::{ContractionOrder, KronPlan};
pub use linear::{AdaptedLinear, AdapterLayers};
pub use params::{count_params, ParamCount};
pub use place::{place, place_with, NameMap, PlacementConfig, Targets};
pub use store::{attach, load_adapters, read_any, save_adapters, NativeAdapters};
pub use training::TrainMode;

#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
