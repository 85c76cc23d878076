//! Adapter (Houlsby et al. 2019): a bottleneck after the block, `h + act(h·down)·up`.

use burn::module::{Module, Param};
use burn::tensor::{backend::Backend, module::linear, Tensor};
use serde::{Deserialize, Serialize};

use super::Activation;
use crate::adapter::{init_factors, zero_factor, FactorInit};
use crate::error::AdapterError;

pub(crate) fn default_reduction() -> usize {
    32
}

pub(crate) fn silu() -> Activation {
    Activation::Silu
}

/// The bottleneck size of a sequential adapter for blocks of size `d`.
pub(crate) fn bottleneck(
    layer: &str,
    d: usize,
    reduction_factor: usize,
    explicit: Option<usize>,
) -> Result<usize, AdapterError> {
    let r = match explicit {
        Some(r) => r,
        None if reduction_factor == 0 => {
            return Err(AdapterError::config(
                layer,
                "reduction_factor",
                "must be at least 1",
            ))
        }
        None => d / reduction_factor,
    };
    if r == 0 || r > d {
        return Err(AdapterError::config(
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

/// Configuration of a [`HoulsbyAdapter`] (the paper's "Adapter").
///
/// ```
/// use kron_adapters::block::HoulsbyConfig;
/// // The KronA paper's setting (Table 12): reduction factor 32, so 768 → 24 → 768.
/// let cfg = HoulsbyConfig::new();
/// assert_eq!(cfg.num_params(768).unwrap(), 2 * 768 * 24 + 24 + 768);
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HoulsbyConfig {
    /// The bottleneck is `d / reduction_factor`. Default 32.
    #[serde(default = "default_reduction")]
    pub reduction_factor: usize,
    /// An explicit bottleneck size, overriding the reduction factor.
    #[serde(default)]
    pub bottleneck: Option<usize>,
    /// The non-linearity. Default SiLU ("swish", as in the Compacter code the paper used).
    #[serde(default = "silu")]
    pub activation: Activation,
    /// Initialisation. Default: `down` Kaiming-uniform, `up` zero (the adapter starts as the
    /// identity).
    #[serde(default)]
    pub init: FactorInit,
}

impl Default for HoulsbyConfig {
    fn default() -> Self {
        Self::new()
    }
}

impl HoulsbyConfig {
    /// An adapter with the defaults above.
    pub fn new() -> Self {
        Self {
            reduction_factor: default_reduction(),
            bottleneck: None,
            activation: silu(),
            init: FactorInit::default(),
        }
    }

    /// Sets the reduction factor.
    pub fn with_reduction_factor(mut self, reduction_factor: usize) -> Self {
        self.reduction_factor = reduction_factor;
        self
    }

    /// Sets the bottleneck size directly.
    pub fn with_bottleneck(mut self, bottleneck: usize) -> Self {
        self.bottleneck = Some(bottleneck);
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

    /// Trainable parameters for blocks of size `d`: `2·d·r + r + d`.
    pub fn num_params(&self, d: usize) -> Result<usize, AdapterError> {
        let r = bottleneck("adapter", d, self.reduction_factor, self.bottleneck)?;
        Ok(2 * d * r + r + d)
    }

    /// Builds the adapter for blocks of size `d`.
    pub fn init<B: Backend>(
        &self,
        d: usize,
        device: &B::Device,
    ) -> Result<HoulsbyAdapter<B>, AdapterError> {
        self.init_named(&format!("block[{d}]"), d, device)
    }

    pub(crate) fn init_named<B: Backend>(
        &self,
        layer: &str,
        d: usize,
        device: &B::Device,
    ) -> Result<HoulsbyAdapter<B>, AdapterError> {
        let r = bottleneck(layer, d, self.reduction_factor, self.bottleneck)?;
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

impl<B: Backend> HoulsbyAdapter<B> {
    /// The adapted output from the block output `h`.
    ///
    /// # Shapes
    /// - `h`: `[..., d]`; output `[..., d]`
    pub fn forward<const D: usize>(&self, h: Tensor<B, D>) -> Tensor<B, D> {
        let z = linear(h.clone(), self.down.val(), Some(self.bias_down.val()));
        h + linear(
            self.activation.apply(z),
            self.up.val(),
            Some(self.bias_up.val()),
        )
    }
}
