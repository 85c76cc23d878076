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
//! | Compacter | [`Compacter`] | as Adapter, with PHM projections sharing [`BlockAdapters::phm_rule`] |
//!
//! None of these can be merged into the block's weights: the block is non-linear (KronA^B and
//! the Parallel Adapter run beside it, the Adapter and Compacter after it), so they cost extra
//! inference time, which is what the paper's Table 2 measures.
//!
//! A user attaches one to their own FFN without touching it: compute `fx = ffn.forward(x)`,
//! then `adapters.forward(layer, x, fx)` with a [`BlockAdapters`], which owns one adapter per
//! layer and the factors Compacter shares across layers.

mod compacter;
mod houlsby;
mod krona_b;
mod parallel;

pub use compacter::{Compacter, CompacterConfig};
pub use houlsby::{HoulsbyAdapter, HoulsbyConfig};
pub use krona_b::{KronAB, KronABConfig, Residual};
pub use parallel::{ParallelAdapter, ParallelAdapterConfig};

use burn::module::{Module, Param};
use burn::tensor::{activation, backend::Backend, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::AdapterError;

/// A non-linearity between an adapter's down and up projections.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Activation {
    /// `max(0, x)`.
    Relu,
    /// Gaussian error linear unit.
    Gelu,
    /// `x · sigmoid(x)` ("swish").
    Silu,
}

impl Activation {
    /// Applies the activation.
    pub fn apply<B: Backend, const D: usize>(self, x: Tensor<B, D>) -> Tensor<B, D> {
        match self {
            Activation::Relu => activation::relu(x),
            Activation::Gelu => activation::gelu(x),
            Activation::Silu => activation::silu(x),
        }
    }
}

/// One block adapter of any method.
#[derive(Module, Debug)]
#[allow(clippy::large_enum_variant)]
pub enum BlockAdapter<B: Backend> {
    /// KronA^B, KronA^B_res, KronA^B_sigres.
    KronAB(KronAB<B>),
    /// Parallel Adapter (He et al. 2022).
    Parallel(ParallelAdapter<B>),
    /// Adapter (Houlsby et al. 2019).
    Houlsby(HoulsbyAdapter<B>),
    /// Compacter (Mahabadi et al. 2021).
    Compacter(Compacter<B>),
}

impl<B: Backend> BlockAdapter<B> {
    /// The adapted block output from the block input `x` and the block output `fx = f(x)`.
    /// `phm_rule` is Compacter's shared factor (see [`BlockAdapters`]); other methods ignore it.
    ///
    /// # Shapes
    /// - `x`: `[..., d_in]`, `fx`: `[..., d_out]`; output `[..., d_out]`
    ///
    /// # Panics
    /// For a Compacter adapter without its shared rule (a [`BlockAdapters`] always has it).
    pub fn forward<const D: usize>(
        &self,
        x: Tensor<B, D>,
        fx: Tensor<B, D>,
        phm_rule: Option<Tensor<B, 3>>,
    ) -> Tensor<B, D> {
        match self {
            BlockAdapter::KronAB(m) => m.forward(x, fx),
            BlockAdapter::Parallel(m) => m.forward(x, fx),
            BlockAdapter::Houlsby(m) => m.forward(fx),
            BlockAdapter::Compacter(m) => {
                let rule = phm_rule.expect("a Compacter adapter needs the shared PHM rule");
                m.forward(fx, rule)
            }
        }
    }

    /// Trainable parameters of this adapter (Compacter's shared rule not included).
    pub fn trainable_params(&self) -> usize {
        self.num_params()
    }
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
    pub fn num_params(&self, d: usize, n_layers: usize) -> Result<usize, AdapterError> {
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

/// One block adapter per layer of a model, and the factors they share (Compacter's `Aᵢ`).
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
pub struct BlockAdapters<B: Backend> {
    /// The adapter of each layer.
    pub layers: Vec<BlockAdapter<B>>,
    /// Compacter's shared `Aᵢ`, `[n, n, n]`: one tensor that every layer's PHM projections use,
    /// so it trains once with the sum of every layer's gradient.
    pub phm_rule: Option<Param<Tensor<B, 3>>>,
}

impl<B: Backend> BlockAdapters<B> {
    /// `n_layers` adapters for blocks of size `d` (in and out).
    pub fn new(
        config: &BlockAdapterConfig,
        d: usize,
        n_layers: usize,
        device: &B::Device,
    ) -> Result<Self, AdapterError> {
        let name = |i: usize| format!("block {i}");
        let mut phm_rule = None;
        if let BlockAdapterConfig::Compacter(c) = config {
            phm_rule = Some(c.init_rule(device)?);
        }
        let layers = (0..n_layers)
            .map(|i| {
                Ok(match config {
                    BlockAdapterConfig::KronAB(c) => {
                        BlockAdapter::KronAB(c.init_named(&name(i), d, d, device)?)
                    }
                    BlockAdapterConfig::ParallelAdapter(c) => {
                        BlockAdapter::Parallel(c.init_named(&name(i), d, d, device)?)
                    }
                    BlockAdapterConfig::Adapter(c) => {
                        BlockAdapter::Houlsby(c.init_named(&name(i), d, device)?)
                    }
                    BlockAdapterConfig::Compacter(c) => {
                        BlockAdapter::Compacter(c.init_named(&name(i), d, device)?)
                    }
                })
            })
            .collect::<Result<Vec<_>, AdapterError>>()?;
        Ok(Self { layers, phm_rule })
    }

    /// Layer `layer`'s adapted block output, from its input `x` and its output `fx = f(x)`.
    ///
    /// # Panics
    /// If `layer` is out of range.
    pub fn forward<const D: usize>(
        &self,
        layer: usize,
        x: Tensor<B, D>,
        fx: Tensor<B, D>,
    ) -> Tensor<B, D> {
        let rule = self.phm_rule.as_ref().map(|p| p.val());
        self.layers[layer].forward(x, fx, rule)
    }
}
