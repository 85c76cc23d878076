//! LoRA (Hu et al. 2022): `ΔW = scale · down·up`.

use burn::module::{Module, Param};
use burn::tensor::{backend::Backend, Tensor};
use serde::{Deserialize, Serialize};

use super::{
    check_factor_shape, factor_from_tensor, init_factors, layer_name, rank_scale, replace_value,
    AdapterSpec, FactorInit, LinearAdapter, Method,
};
use crate::error::AdapterError;

/// Configuration of a [`Lora`] adapter.
///
/// ```
/// use kron_adapters::LoraConfig;
/// let cfg = LoraConfig::new(8).with_alpha(16.0); // scale = alpha / rank = 2
/// assert_eq!(cfg.rank, 8);
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraConfig {
    /// The rank `r`: `down` is `[d_in, r]`, `up` is `[r, d_out]`. `1 ≤ r ≤ min(d_in, d_out)`.
    pub rank: usize,
    /// `alpha` in `scale = alpha / r`. Default: `r` (scale 1, as in the KronA paper).
    #[serde(default)]
    pub alpha: Option<f64>,
    /// An explicit scale, overriding `alpha / r`.
    #[serde(default)]
    pub scale: Option<f64>,
    /// Initialisation. Default: `down` Kaiming-uniform, `up` zero.
    #[serde(default)]
    pub init: FactorInit,
}

impl LoraConfig {
    /// A rank-`rank` LoRA with the defaults above.
    pub fn new(rank: usize) -> Self {
        Self {
            rank,
            alpha: None,
            scale: None,
            init: FactorInit::default(),
        }
    }

    /// Sets `alpha` (scale `alpha / rank`).
    pub fn with_alpha(mut self, alpha: f64) -> Self {
        self.alpha = Some(alpha);
        self
    }

    /// Sets the scale directly.
    pub fn with_scale(mut self, scale: f64) -> Self {
        self.scale = Some(scale);
        self
    }

    /// Sets the initialisation.
    pub fn with_init(mut self, init: FactorInit) -> Self {
        self.init = init;
        self
    }

    /// Trainable parameters for a `[d_in, d_out]` layer: `r·(d_in + d_out)`.
    pub fn num_params(&self, d_in: usize, d_out: usize) -> usize {
        self.rank * (d_in + d_out)
    }

    /// Builds the adapter for a `[d_in, d_out]` layer.
    pub fn init<B: Backend>(
        &self,
        d_in: usize,
        d_out: usize,
        device: &B::Device,
    ) -> Result<Lora<B>, AdapterError> {
        self.init_named(&layer_name(d_in, d_out), d_in, d_out, device)
    }

    pub(crate) fn init_named<B: Backend>(
        &self,
        layer: &str,
        d_in: usize,
        d_out: usize,
        device: &B::Device,
    ) -> Result<Lora<B>, AdapterError> {
        let scale = self.check(layer, d_in, d_out)?;
        let mut f = init_factors(
            self.init,
            &[[d_in, self.rank], [self.rank, d_out]],
            d_in,
            device,
        );
        let up = f.pop().expect("two factors");
        let down = f.pop().expect("two factors");
        Ok(Lora { down, up, scale })
    }

    fn check(&self, layer: &str, d_in: usize, d_out: usize) -> Result<f64, AdapterError> {
        let max = d_in.min(d_out);
        if self.rank == 0 || self.rank > max {
            return Err(AdapterError::Rank {
                layer: layer.to_string(),
                rank: self.rank,
                reason: format!(
                    "LoRA's rank must be between 1 and min(d_in, d_out) = {max} for a \
                     [{d_in}, {d_out}] layer"
                ),
            });
        }
        rank_scale(layer, self.rank, self.alpha, self.scale)
    }
}

/// A LoRA adapter: `x·ΔW = scale · (x·down)·up`.
#[derive(Module, Debug)]
pub struct Lora<B: Backend> {
    /// Down projection, `[d_in, r]`.
    pub down: Param<Tensor<B, 2>>,
    /// Up projection, `[r, d_out]`.
    pub up: Param<Tensor<B, 2>>,
    /// The scale `s`.
    pub scale: f64,
}

impl<B: Backend> Lora<B> {
    /// A LoRA adapter from given factors (`down [d_in, r]`, `up [r, d_out]`), trainable.
    pub fn from_factors(
        down: Tensor<B, 2>,
        up: Tensor<B, 2>,
        scale: f64,
    ) -> Result<Self, AdapterError> {
        let [d_in, r] = down.dims();
        let [r2, d_out] = up.dims();
        let layer = layer_name(d_in, d_out);
        check_factor_shape(&layer, "up", [r2, d_out], [r, d_out])?;
        LoraConfig::new(r)
            .with_scale(scale)
            .check(&layer, d_in, d_out)?;
        Ok(Self {
            down: factor_from_tensor(down),
            up: factor_from_tensor(up),
            scale,
        })
    }

    /// The rank `r`.
    pub fn rank(&self) -> usize {
        self.down.dims()[1]
    }
}

impl<B: Backend> LinearAdapter<B> for Lora<B> {
    fn d_in(&self) -> usize {
        self.down.dims()[0]
    }

    fn d_out(&self) -> usize {
        self.up.dims()[1]
    }

    fn apply<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let mut dims = x.dims();
        let d_in = dims[D - 1];
        let n = x.shape().num_elements() / d_in.max(1);
        let x2: Tensor<B, 2> = x.reshape([n, d_in]);
        // The scale goes on the [n, r] intermediate, the smallest tensor on the way.
        let mut h = x2.matmul(self.down.val());
        if self.scale != 1.0 {
            h = h.mul_scalar(self.scale);
        }
        let y = h.matmul(self.up.val());
        dims[D - 1] = self.d_out();
        y.reshape(dims)
    }

    fn delta_weight(&self) -> Tensor<B, 2> {
        self.down.val().matmul(self.up.val()).mul_scalar(self.scale)
    }

    fn spec(&self) -> AdapterSpec {
        AdapterSpec {
            method: Method::Lora,
            d_in: self.d_in(),
            d_out: self.d_out(),
            factors: vec![
                ("down".into(), self.down.dims()),
                ("up".into(), self.up.dims()),
            ],
            scale: self.scale,
        }
    }

    fn factors(&self) -> Vec<Tensor<B, 2>> {
        vec![self.down.val(), self.up.val()]
    }

    fn with_factors(mut self, values: Vec<Tensor<B, 2>>) -> Self {
        let mut v = values.into_iter();
        self.down = replace_value(&self.down, v.next().expect("2 factors"));
        self.up = replace_value(&self.up, v.next().expect("2 factors"));
        self
    }
}
