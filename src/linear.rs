//! [`AdaptedLinear`]: a frozen `Linear` plus one optional adapter.

use burn::module::Module;
use burn::nn::Linear;
use burn::tensor::{backend::Backend, Tensor};

use crate::adapter::{layer_name, Adapter, AdapterConfig, AdapterSpec, LinearAdapter};
use crate::error::AdapterError;
use crate::params::ParamCount;

/// A frozen [`Linear`] layer with an optional trainable adapter.
///
/// `forward` computes `x·W + b + x·ΔW`, the adapter's part from its factors (never building
/// `ΔW`); `merge` folds `ΔW` into `W` and gives back a plain `Linear` with the base model's cost.
///
/// ```
/// use burn::backend::{Autodiff, NdArray};
/// use burn::nn::LinearConfig;
/// use burn::tensor::{Distribution, Tensor};
/// use kron_adapters::{AdaptedLinear, AdapterConfig, KronAConfig, LinearAdapter};
///
/// type B = Autodiff<NdArray>;
/// let device = Default::default();
/// let linear = LinearConfig::new(48, 96).init::<B>(&device);
/// let cfg = AdapterConfig::KronA(KronAConfig::new([6, 8], [8, 12]));
/// let layer = AdaptedLinear::new(linear, &cfg, &device).unwrap();
/// let x = Tensor::<B, 3>::random([2, 5, 48], Distribution::Default, &device);
/// assert_eq!(layer.forward(x).dims(), [2, 5, 96]);
/// let counts = layer.param_counts();
/// assert_eq!(counts.trainable, 6 * 8 + 8 * 12);
/// let merged = layer.merge().unwrap(); // a plain `Linear`, W + ΔW
/// ```
#[derive(Module, Debug)]
pub struct AdaptedLinear<B: Backend> {
    /// The pretrained layer, frozen: its parameters never require gradients.
    pub base: Linear<B>,
    /// The adapter, if any.
    pub adapter: Option<Adapter<B>>,
}

impl<B: Backend> AdaptedLinear<B> {
    /// Wraps `linear` (frozen) with the adapter `config` describes.
    pub fn new(
        linear: Linear<B>,
        config: &AdapterConfig,
        device: &B::Device,
    ) -> Result<Self, AdapterError> {
        let [d_in, d_out] = linear.weight.dims();
        let adapter = config.init(&layer_name(d_in, d_out), d_in, d_out, device)?;
        Ok(Self {
            base: linear.no_grad(),
            adapter: Some(adapter),
        })
    }

    /// Wraps `linear` (frozen) with an adapter built elsewhere (from PEFT factors, say).
    pub fn with_adapter(linear: Linear<B>, adapter: Adapter<B>) -> Result<Self, AdapterError> {
        let [d_in, d_out] = linear.weight.dims();
        if adapter.d_in() != d_in || adapter.d_out() != d_out {
            return Err(AdapterError::config(
                layer_name(d_in, d_out),
                "adapter",
                format!(
                    "the adapter is [{}, {}] but the layer is [{d_in}, {d_out}]",
                    adapter.d_in(),
                    adapter.d_out()
                ),
            ));
        }
        Ok(Self {
            base: linear.no_grad(),
            adapter: Some(adapter),
        })
    }

    /// Wraps `linear` (frozen) with no adapter.
    pub fn frozen(linear: Linear<B>) -> Self {
        Self {
            base: linear.no_grad(),
            adapter: None,
        }
    }

    /// Input size.
    pub fn d_in(&self) -> usize {
        self.base.weight.dims()[0]
    }

    /// Output size.
    pub fn d_out(&self) -> usize {
        self.base.weight.dims()[1]
    }

    /// `x·W + b + x·ΔW`.
    ///
    /// # Shapes
    /// - `x`: `[..., d_in]`
    /// - output: `[..., d_out]`
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        match &self.adapter {
            Some(adapter) => self.base.forward(x.clone()) + adapter.apply(x),
            None => self.base.forward(x),
        }
    }

    /// `ΔW` with scale, `[d_in, d_out]` (zeros without an adapter).
    pub fn delta_weight(&self) -> Tensor<B, 2> {
        match &self.adapter {
            Some(adapter) => adapter.delta_weight(),
            None => Tensor::zeros([self.d_in(), self.d_out()], &self.base.weight.device()),
        }
    }

    /// A plain `Linear` with weight `W + ΔW` and the same bias: the adapted layer at the base
    /// layer's inference cost. Works on an autodiff backend right after training (the result is
    /// detached and, like the base, frozen).
    ///
    /// Refuses, with [`AdapterError::NonFinite`], to produce a weight with NaN or infinite
    /// values (PEFT's `safe_merge`).
    pub fn merge(&self) -> Result<Linear<B>, AdapterError> {
        let Some(adapter) = &self.adapter else {
            return Ok(self.base.clone());
        };
        let merged = self.base.weight.val() + adapter.delta_weight();
        let bad = merged
            .clone()
            .is_finite()
            .bool_not()
            .int()
            .sum()
            .into_scalar();
        let count: i64 = burn::tensor::ElementConversion::elem(bad);
        if count > 0 {
            return Err(AdapterError::NonFinite {
                layer: layer_name(self.d_in(), self.d_out()),
                count: count as usize,
            });
        }
        Ok(Linear {
            weight: self.base.weight.clone().map(|_| merged.detach()),
            bias: self.base.bias.clone(),
        })
    }

    /// Trainable (adapter) and total (base + adapter) parameters.
    pub fn param_counts(&self) -> ParamCount {
        let trainable = self.adapter.as_ref().map_or(0, |a| a.num_params());
        ParamCount {
            trainable,
            total: self.base.num_params() + trainable,
        }
    }

    /// The adapter's description, if there is one.
    pub fn spec(&self) -> Option<AdapterSpec> {
        self.adapter.as_ref().map(|a| a.spec())
    }
}
