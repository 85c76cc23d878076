//! Parallel Adapter (He et al. 2022): `y = f(x) + s · relu(x·down)·up`.

use burn::module::{Module, Param};
use burn::tensor::{backend::Backend, module::linear, Tensor};
use serde::{Deserialize, Serialize};

use super::Activation;
use crate::adapter::{check_finite, init_factors, layer_name, zero_factor, FactorInit};
use crate::error::AdapterError;

fn default_scale() -> f64 {
    16.0
}

fn yes() -> bool {
    true
}

fn relu() -> Activation {
    Activation::Relu
}

/// Configuration of a [`ParallelAdapter`].
///
/// ```
/// use kron_adapters::block::ParallelAdapterConfig;
/// // The KronA paper's PA: rank 2, s = 16.
/// let cfg = ParallelAdapterConfig::new(2);
/// assert_eq!(cfg.num_params(768, 768), 2 * (768 + 768) + 2 + 768);
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParallelAdapterConfig {
    /// The bottleneck size `r`.
    pub rank: usize,
    /// The scale `s`. Default 16 (the KronA paper's Table 15).
    #[serde(default = "default_scale")]
    pub scale: f64,
    /// Biases on both projections (as `nn.Linear`s). Default true.
    #[serde(default = "yes")]
    pub bias: bool,
    /// The non-linearity. Default ReLU (He et al.).
    #[serde(default = "relu")]
    pub activation: Activation,
    /// Initialisation. Default: `down` Kaiming-uniform, `up` zero (the block starts unchanged).
    #[serde(default)]
    pub init: FactorInit,
}

impl ParallelAdapterConfig {
    /// A rank-`rank` Parallel Adapter with the defaults above.
    pub fn new(rank: usize) -> Self {
        Self {
            rank,
            scale: default_scale(),
            bias: true,
            activation: Activation::Relu,
            init: FactorInit::default(),
        }
    }

    /// Sets the scale.
    pub fn with_scale(mut self, scale: f64) -> Self {
        self.scale = scale;
        self
    }

    /// Sets the activation.
    pub fn with_activation(mut self, activation: Activation) -> Self {
        self.activation = activation;
        self
    }

    /// Sets the initialisation.
    pub fn with_init(mut self, init: FactorInit) -> Self {
        self.init = init;
        self
    }

    /// Trainable parameters: `r·(d_in + d_out)`, plus `r + d_out` with biases.
    pub fn num_params(&self, d_in: usize, d_out: usize) -> usize {
        self.rank * (d_in + d_out) + if self.bias { self.rank + d_out } else { 0 }
    }

    /// Builds the adapter for a `[d_in, d_out]` block.
    pub fn init<B: Backend>(
        &self,
        d_in: usize,
        d_out: usize,
        device: &B::Device,
    ) -> Result<ParallelAdapter<B>, AdapterError> {
        self.init_named(&layer_name(d_in, d_out), d_in, d_out, device)
    }

    pub(crate) fn init_named<B: Backend>(
        &self,
        layer: &str,
        d_in: usize,
        d_out: usize,
        device: &B::Device,
    ) -> Result<ParallelAdapter<B>, AdapterError> {
        check_finite(layer, "scale", self.scale)?;
        let max = d_in.min(d_out);
        if self.rank == 0 || self.rank > max {
            return Err(AdapterError::Rank {
                layer: layer.to_string(),
                rank: self.rank,
                reason: format!("a Parallel Adapter's rank must be between 1 and {max}"),
            });
        }
        let r = self.rank;
        let mut f = init_factors(self.init, &[[d_in, r], [r, d_out]], d_in, device);
        let up = f.pop().expect("two factors");
        let down = f.pop().expect("two factors");
        Ok(ParallelAdapter {
            down,
            bias_down: self.bias.then(|| zero_factor([r], device)),
            up,
            bias_up: self.bias.then(|| zero_factor([d_out], device)),
            scale: self.scale,
            activation: self.activation,
        })
    }
}

/// A Parallel Adapter: `y = f(x) + s · (act(x·down + bias_down)·up + bias_up)`.
#[derive(Module, Debug)]
pub struct ParallelAdapter<B: Backend> {
    /// Down projection, `[d_in, r]`.
    pub down: Param<Tensor<B, 2>>,
    /// Bias of the down projection, `[r]`.
    pub bias_down: Option<Param<Tensor<B, 1>>>,
    /// Up projection, `[r, d_out]`.
    pub up: Param<Tensor<B, 2>>,
    /// Bias of the up projection, `[d_out]`.
    pub bias_up: Option<Param<Tensor<B, 1>>>,
    /// The scale `s`.
    pub scale: f64,
    /// The non-linearity.
    pub activation: Activation,
}

impl<B: Backend> ParallelAdapter<B> {
    /// The adapted block output from the block input `x` and output `fx`.
    ///
    /// # Shapes
    /// - `x`: `[..., d_in]`, `fx`: `[..., d_out]`; output `[..., d_out]`
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>, fx: Tensor<B, D>) -> Tensor<B, D> {
        let h = linear(x, self.down.val(), self.bias_down.as_ref().map(|b| b.val()));
        let h = self.activation.apply(h).mul_scalar(self.scale);
        let bias_up = self
            .bias_up
            .as_ref()
            .map(|b| b.val().mul_scalar(self.scale));
        fx + linear(h, self.up.val(), bias_up)
    }
}
