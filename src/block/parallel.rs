//! Parallel Adapter (He et al. 2022): `y = f(x) + s · relu(x·down)·up`.

use burn::module::{Module, Param};
use burn::tensor::{backend::Backend, Tensor};

use super::{Activation, BlockAdapter};
use crate::adapter::{check_finite, init_factors, layer_name, zero_factor, FactorInit};
use crate::error::ConfigError;
use crate::linear::linear_rows;

crate::macros::config! {
    /// Configuration of a [`ParallelAdapter`].
    ///
    /// ```
    /// use kron_adapters::block::ParallelAdapterConfig;
    /// // The KronA paper's PA: rank 2, s = 16.
    /// let cfg = ParallelAdapterConfig::new(2);
    /// assert_eq!(cfg.num_params(768, 768), 2 * (768 + 768) + 2 + 768);
    /// ```
    pub struct ParallelAdapterConfig(new) {
        required {
            /// The bottleneck size `r`.
            rank: usize,
        }
        optional {}
        defaults {
            /// The scale `s` (the KronA paper's Table 15).
            scale: f64 = 16.0,
            /// Biases on both projections (as `nn.Linear`s).
            bias: bool = true,
            /// The non-linearity (He et al.: ReLU).
            activation: Activation = Activation::Relu,
            /// Initialisation: `down` Kaiming-uniform, `up` zero (the block starts unchanged).
            init: FactorInit = FactorInit::KaimingZero,
        }
    }
}

impl ParallelAdapterConfig {
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
    ) -> Result<ParallelAdapter<B>, ConfigError> {
        let layer = layer_name(d_in, d_out);
        check_finite(&layer, "scale", self.scale)?;
        let max = d_in.min(d_out);
        if self.rank == 0 || self.rank > max {
            return Err(ConfigError::Rank {
                layer,
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

impl<B: Backend> BlockAdapter<B> for ParallelAdapter<B> {
    type Shared = ();

    fn forward<const D: usize>(&self, x: Tensor<B, D>, fx: Tensor<B, D>, _: &()) -> Tensor<B, D> {
        if x.shape().num_elements() == 0 {
            // No rows: the (empty) block output as it is (see `BlockAdapter::forward`).
            return fx;
        }
        let h = linear_rows(x, self.down.val(), self.bias_down.as_ref().map(|b| b.val()));
        let h = self.activation.apply(h).mul_scalar(self.scale);
        let bias_up = self
            .bias_up
            .as_ref()
            .map(|b| b.val().mul_scalar(self.scale));
        fx + linear_rows(h, self.up.val(), bias_up)
    }
}
