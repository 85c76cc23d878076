//! Block adapters (KronA paper §3.3 and its baselines): modules attached to a whole block `f`
//! (a transformer FFN), not to one `Linear`.
//!
//! | paper name | type | output |
//! | --- | --- | --- |
//! | KronA^B | [`KronAB`] | `f(x) + s · x·(a ⊗ b)` |
//! | KronA^B_res | [`KronAB`] with [`Residual::Learned`] | `f(x) + s · x·(a ⊗ b) + s_res · x` |
//! | KronA^B_sigres | [`KronAB`] with [`Residual::Sigmoid`] | `… + sigmoid(s_res) · x` |
//! | Parallel Adapter | [`ParallelAdapter`] | `f(x) + s · relu(x·down)·up` |
//! | Adapter (Houlsby) | [`HoulsbyAdapter`] | `h + act(h·down)·up`, `h = f(x)` |
//! | Compacter | [`Compacter`] | as Adapter, with PHM projections sharing one rule `Aᵢ` |
//!
//! Every one implements [`BlockAdapter`]: `forward(x, fx, shared)` from the block's input `x`
//! and output `fx = f(x)`, with the parameters the method shares across layers (`()` for all
//! but Compacter). None can be merged into the block's weights: the block is non-linear
//! (KronA^B and the Parallel Adapter run beside it, the Adapter and Compacter after it), so they
//! cost extra inference time, which is what the paper's Table 2 measures.
//!
//! A user attaches one to their own FFN without touching it: compute `fx = ffn.forward(x)`,
//! then `adapters.forward(layer, x, fx)` with a [`BlockAdapters`], which owns one adapter per
//! layer and, for Compacter, the shared rule (so it cannot be missing).

mod compacter;
mod houlsby;
mod krona_b;
mod parallel;

pub use compacter::{Compacter, CompacterConfig, CompacterStack};
pub use houlsby::{HoulsbyAdapter, HoulsbyConfig};
pub use krona_b::{KronAB, KronABConfig, Residual};
pub use parallel::{ParallelAdapter, ParallelAdapterConfig};

use burn::module::Module;
use burn::tensor::{activation, backend::Backend, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::ConfigError;

/// A non-linearity between an adapter's down and up projections.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Activation {
    /// `max(0, x)`.
    Relu,
    /// Gaussian error linear unit, `x·Φ(x)` (erf-based), with the exact derivative as its
    /// gradient on every backend.
    Gelu,
    /// `x · sigmoid(x)` ("swish").
    Silu,
}

impl Activation {
    /// Applies the activation (an empty tensor is returned as it is: the CubeCL backends'
    /// element-wise kernels cannot take one).
    pub fn apply<B: Backend, const D: usize>(self, x: Tensor<B, D>) -> Tensor<B, D> {
        if x.shape().num_elements() == 0 {
            return x;
        }
        match self {
            Activation::Relu => activation::relu(x),
            Activation::Gelu => crate::quirks::gelu(x),
            Activation::Silu => crate::quirks::silu(x),
        }
    }
}

/// The surface of every block adapter.
pub trait BlockAdapter<B: Backend> {
    /// What the method shares across layers and every layer's forward reads (`()` when
    /// nothing).
    type Shared;

    /// The adapted block output from the block input `x` and the block output `fx = f(x)`.
    /// An empty batch (no rows) gives `fx` as it is: Burn's kernels on the CubeCL backends
    /// and burn-ndarray's product cannot take an empty tensor, so every method returns
    /// before them.
    ///
    /// # Shapes
    /// - `x`: `[..., d_in]`, `fx`: `[..., d_out]`; output `[..., d_out]`
    fn forward<const D: usize>(
        &self,
        x: Tensor<B, D>,
        fx: Tensor<B, D>,
        shared: &Self::Shared,
    ) -> Tensor<B, D>;
}

/// Which block adapter to attach to each block. Serializes with a `method` tag:
/// `{"method": "KronAB", "a_shape": [32, 24], "b_shape": [24, 32], "residual": "Learned"}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "method")]
pub enum BlockAdapterConfig {
    /// KronA^B (and KronA^B_res / _sigres through its `residual` field).
    KronAB(KronABConfig),
    /// Parallel Adapter.
    ParallelAdapter(ParallelAdapterConfig),
    /// Adapter (Houlsby et al.).
    Adapter(HoulsbyConfig),
    /// Compacter.
    Compacter(CompacterConfig),
}

impl burn::config::Config for BlockAdapterConfig {}

impl BlockAdapterConfig {
    /// Trainable parameters for `n_layers` blocks of size `d` (shared factors counted once).
    pub fn num_params(&self, d: usize, n_layers: usize) -> Result<usize, ConfigError> {
        Ok(match self {
            BlockAdapterConfig::KronAB(c) => n_layers * c.num_params(d, d)?,
            BlockAdapterConfig::ParallelAdapter(c) => n_layers * c.num_params(d, d),
            BlockAdapterConfig::Adapter(c) => n_layers * c.num_params(d)?,
            BlockAdapterConfig::Compacter(c) => {
                n_layers * c.num_params_per_layer(d)? + c.num_shared_params()
            }
        })
    }
}

/// One block adapter per layer of a model, of one method, with what the method shares.
///
/// ```
/// use burn::backend::NdArray;
/// use burn::tensor::{Distribution, Tensor};
/// use kron_adapters::block::{BlockAdapterConfig, BlockAdapters, KronABConfig, Residual};
///
/// let device = Default::default();
/// let cfg = BlockAdapterConfig::KronAB(KronABConfig::new([16, 12], [24, 32]).with_residual(Residual::Learned));
/// let adapters = BlockAdapters::<NdArray>::new(&cfg, 384, 6, &device).unwrap();
/// let x = Tensor::<NdArray, 3>::random([2, 10, 384], Distribution::Default, &device);
/// let fx = x.clone().tanh(); // your FFN's output
/// let y = adapters.forward(0, x.clone(), fx.clone());
/// // KronA^B_res starts at f(x) + x: its Kronecker part is zero-initialised, s_res = 1.
/// assert!((y - fx - x).abs().max().into_scalar() < 1e-6);
/// ```
#[derive(Module, Debug)]
#[allow(clippy::large_enum_variant)]
pub enum BlockAdapters<B: Backend> {
    /// KronA^B, KronA^B_res, KronA^B_sigres.
    KronAB(Vec<KronAB<B>>),
    /// Parallel Adapters.
    Parallel(Vec<ParallelAdapter<B>>),
    /// Adapters (Houlsby et al. 2019).
    Houlsby(Vec<HoulsbyAdapter<B>>),
    /// Compacter: the layers and their shared rule.
    Compacter(CompacterStack<B>),
}

impl<B: Backend> BlockAdapters<B> {
    /// `n_layers` adapters for blocks of size `d` (in and out).
    pub fn new(
        config: &BlockAdapterConfig,
        d: usize,
        n_layers: usize,
        device: &B::Device,
    ) -> Result<Self, ConfigError> {
        fn stack<T>(
            n: usize,
            init: impl Fn() -> Result<T, ConfigError>,
        ) -> Result<Vec<T>, ConfigError> {
            (0..n)
                .map(|i| init().map_err(|e| e.at(format!("block {i}"))))
                .collect()
        }
        Ok(match config {
            BlockAdapterConfig::KronAB(c) => {
                BlockAdapters::KronAB(stack(n_layers, || c.init(d, d, device))?)
            }
            BlockAdapterConfig::ParallelAdapter(c) => {
                BlockAdapters::Parallel(stack(n_layers, || c.init(d, d, device))?)
            }
            BlockAdapterConfig::Adapter(c) => {
                BlockAdapters::Houlsby(stack(n_layers, || c.init(d, d, device))?)
            }
            BlockAdapterConfig::Compacter(c) => BlockAdapters::Compacter(CompacterStack {
                rule: c.init_rule(device)?,
                layers: stack(n_layers, || c.init(d, d, device))?,
            }),
        })
    }

    /// How many layers.
    pub fn len(&self) -> usize {
        match self {
            BlockAdapters::KronAB(v) => v.len(),
            BlockAdapters::Parallel(v) => v.len(),
            BlockAdapters::Houlsby(v) => v.len(),
            BlockAdapters::Compacter(s) => s.layers.len(),
        }
    }

    /// No layers?
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Layer `layer`'s adapted block output, from its input `x` and its output `fx = f(x)`.
    ///
    /// # Panics
    /// If `layer` is out of range (a model builds one adapter per layer it has).
    pub fn forward<const D: usize>(
        &self,
        layer: usize,
        x: Tensor<B, D>,
        fx: Tensor<B, D>,
    ) -> Tensor<B, D> {
        match self {
            BlockAdapters::KronAB(v) => v[layer].forward(x, fx, &()),
            BlockAdapters::Parallel(v) => v[layer].forward(x, fx, &()),
            BlockAdapters::Houlsby(v) => v[layer].forward(x, fx, &()),
            BlockAdapters::Compacter(s) => s.layers[layer].forward(x, fx, &s.rule.val()),
        }
    }
}

/// The block size of a method whose adapter maps a block's output back onto itself (Adapter,
/// Compacter): `d_in` must equal `d_out`.
pub(crate) fn square(layer: &str, d_in: usize, d_out: usize) -> Result<usize, ConfigError> {
    if d_in == d_out {
        Ok(d_in)
    } else {
        Err(ConfigError::invalid(
            layer,
            "d_in/d_out",
            format!(
                "this adapter runs after a block and needs d_in = d_out, got [{d_in}, {d_out}]"
            ),
        ))
    }
}
