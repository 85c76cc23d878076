//! Adapter (Houlsby et al. 2019): a bottleneck after the block, `h + act(h·down)·up`.

use burn::module::{Module, Param};
use burn::tensor::{backend::Backend, Tensor};

use super::{square, Activation, BlockAdapter};
use crate::adapter::{init_factors, layer_name, zero_factor, FactorInit};
use crate::error::ConfigError;
use crate::linear::linear_rows;

/// The bottleneck size of a sequential adapter for blocks of size `d`.
pub(crate) fn bottleneck(
    layer: &str,
    d: usize,
    reduction_factor: usize,
    explicit: Option<usize>,
) -> Result<usize, ConfigError> {
    let r = match explicit {
        Some(r) => r,
        None if reduction_factor == 0 => {
            return Err(ConfigError::invalid(
                layer,
                "reduction_factor",
                "must be at least 1",
            ))
        }
        None => d / reduction_factor,
    };
    if r == 0 || r > d {
        return Err(ConfigError::invalid(
            layer,
            "bottleneck",
            format!(
                "the bottleneck is {r} for d = {d}; it must be between 1 and d \
                 (use a reduction factor of at most {d})"
            ),
        ));
    }
    Ok(r)
}

crate::macros::config! {
    /// Configuration of a [`HoulsbyAdapter`] (the paper's "Adapter").
    ///
    /// ```
    /// use kron_adapters::block::HoulsbyConfig;
    /// // The KronA paper's setting (Table 12): reduction factor 32, so 768 → 24 → 768.
    /// let cfg = HoulsbyConfig::new();
    /// assert_eq!(cfg.num_params(768).unwrap(), 2 * 768 * 24 + 24 + 768);
    /// ```
    pub struct HoulsbyConfig(new) {
        required {}
        optional {
            /// An explicit bottleneck size, overriding the reduction factor.
            bottleneck: usize,
        }
        defaults {
            /// The bottleneck is `d / reduction_factor`.
            reduction_factor: usize = 32,
            /// The non-linearity (SiLU, "swish", as in the Compacter code the paper used).
            activation: Activation = Activation::Silu,
            /// Initialisation: `down` Kaiming-uniform, `up` zero (the adapter starts as the
            /// identity).
            init: FactorInit = FactorInit::KaimingZero,
        }
    }
}

impl HoulsbyConfig {
    /// Trainable parameters for blocks of size `d`: `2·d·r + r + d`.
    pub fn num_params(&self, d: usize) -> Result<usize, ConfigError> {
        let r = bottleneck(&layer_name(d, d), d, self.reduction_factor, self.bottleneck)?;
        Ok(2 * d * r + r + d)
    }

    /// Builds the adapter for `[d, d]` blocks (`d_in` must equal `d_out`).
    pub fn init<B: Backend>(
        &self,
        d_in: usize,
        d_out: usize,
        device: &B::Device,
    ) -> Result<HoulsbyAdapter<B>, ConfigError> {
        let layer = layer_name(d_in, d_out);
        let d = square(&layer, d_in, d_out)?;
        let r = bottleneck(&layer, d, self.reduction_factor, self.bottleneck)?;
        let mut f = init_factors(self.init, &[[d, r], [r, d]], d, device);
        let up = f.pop().expect("two factors");
        let down = f.pop().expect("two factors");
        Ok(HoulsbyAdapter {
            down,
            bias_down: zero_factor([r], device),
            up,
            bias_up: zero_factor([d], device),
            activation: self.activation,
        })
    }
}

/// An Adapter after a block: `y = h + act(h·down + bias_down)·up + bias_up`, `h = f(x)`.
#[derive(Module, Debug)]
pub struct HoulsbyAdapter<B: Backend> {
    /// Down projection, `[d, r]`.
    pub down: Param<Tensor<B, 2>>,
    /// Bias of the down projection, `[r]`.
    pub bias_down: Param<Tensor<B, 1>>,
    /// Up projection, `[r, d]`.
    pub up: Param<Tensor<B, 2>>,
    /// Bias of the up projection, `[d]`.
    pub bias_up: Param<Tensor<B, 1>>,
    /// The non-linearity.
    pub activation: Activation,
}

impl<B: Backend> BlockAdapter<B> for HoulsbyAdapter<B> {
    type Shared = ();

    /// The adapted output from the block output `h = fx` (the block input is not used).
    fn forward<const D: usize>(&self, _x: Tensor<B, D>, h: Tensor<B, D>, _: &()) -> Tensor<B, D> {
        if h.shape().num_elements() == 0 {
            // No rows: the (empty) block output as it is (see `BlockAdapter::forward`).
            return h;
        }
        let z = linear_rows(h.clone(), self.down.val(), Some(self.bias_down.val()));
        h + linear_rows(
            self.activation.apply(z),
            self.up.val(),
            Some(self.bias_up.val()),
        )
    }
}
