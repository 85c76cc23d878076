//! KronA^B and KronA^B_res (KronA paper §3.3, Eq. 5–6): a Kronecker adapter beside a whole block.

use burn::module::{Module, Param};
use burn::tensor::{activation, backend::Backend, Tensor};
use serde::{Deserialize, Serialize};

use super::BlockAdapter;
use crate::adapter::shape::KronShapes;
use crate::adapter::{
    const_param, layer_name, zero_factor, KronA, KronAConfig, LinearAdapter, MethodConfig,
};
use crate::error::ConfigError;
use crate::kron::{KronIntermediate, KronPlan};

/// The residual connection of KronA^B_res.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Residual {
    /// KronA^B: no residual.
    #[default]
    None,
    /// KronA^B_res (Eq. 6): `+ s_res · x`, `s_res` learnable, initialised to 1.
    Learned,
    /// KronA^B_sigres (the paper's ablation, Table 7): `+ sigmoid(s_res) · x`, `s_res`
    /// initialised to 1 (so the gate starts at sigmoid(1) ≈ 0.731).
    Sigmoid,
}

impl KronShapes for KronABConfig {}

crate::adapter::shape::kron_config! {
    /// Configuration of a [`KronAB`] block adapter.
    ///
    /// Factor shapes are chosen as for [`crate::KronAConfig`] (explicit, one given, a budget,
    /// or PEFT's factorization near √d).
    ///
    /// ```
    /// use kron_adapters::block::{KronABConfig, Residual};
    /// // The paper's T5-base KronA^B_res: a (32, 24), b (24, 32), s = 16, one bias.
    /// let cfg = KronABConfig::new([32, 24], [24, 32]).with_residual(Residual::Learned);
    /// assert_eq!(cfg.num_params(768, 768).unwrap(), 32 * 24 + 24 * 32 + 768 + 1);
    /// ```
    pub struct KronABConfig(auto) {
        required {}
        optional {}
        defaults {
            /// The scale `s` (the paper's most common choice, Tables 17–18).
            scale: f64 = 16.0,
            /// The paper's "module bias": 0, 1 (`bias [d_out]` after the second product) or 2
            /// (also `bias_mid [b_out]` after the first, the `b` product).
            biases: usize = 1,
            /// KronA^B (`None`), KronA^B_res (`Learned`) or KronA^B_sigres (`Sigmoid`).
            /// (With two biases the contraction order is fixed: `b` first, then `a`.)
            residual: Residual = Residual::None,
        }
    }
}

impl KronABConfig {
    /// KronA^B with explicit factor shapes.
    pub fn new(a_shape: [usize; 2], b_shape: [usize; 2]) -> Self {
        Self::auto().with_a_shape(a_shape).with_b_shape(b_shape)
    }

    /// The KronA part of this config.
    fn kron(&self) -> KronAConfig {
        let mut c = KronAConfig::auto()
            .with_factor(self.factor)
            .with_scale(self.scale)
            .with_init(self.init)
            .with_order(self.order);
        c.a_shape = self.a_shape;
        c.b_shape = self.b_shape;
        c.budget = self.budget;
        c
    }

    /// Trainable parameters: `a_in·a_out + b_in·b_out`, plus `d_out` with one bias,
    /// `d_out + b_out` with two, plus 1 for `s_res`.
    pub fn num_params(&self, d_in: usize, d_out: usize) -> Result<usize, ConfigError> {
        let (a, b) = self.factor_shapes(d_in, d_out)?;
        let biases = match self.biases {
            0 => 0,
            1 => d_out,
            _ => d_out + b[1],
        };
        let res = usize::from(self.residual != Residual::None);
        Ok(KronShapes::factor_params(self, a, b) + biases + res)
    }

    /// Builds the adapter for a `[d_in, d_out]` block.
    pub fn init<B: Backend>(
        &self,
        d_in: usize,
        d_out: usize,
        device: &B::Device,
    ) -> Result<KronAB<B>, ConfigError> {
        let layer = layer_name(d_in, d_out);
        if self.biases > 2 {
            return Err(ConfigError::invalid(
                layer,
                "biases",
                format!("{} biases: KronA^B has 0, 1 or 2", self.biases),
            ));
        }
        if self.residual != Residual::None && d_in != d_out {
            return Err(ConfigError::invalid(
                layer,
                "residual",
                format!(
                    "a residual `s_res · x` needs d_in = d_out, the block is [{d_in}, {d_out}]"
                ),
            ));
        }
        let mut kron = self.kron().init(d_in, d_out, device)?;
        if self.biases == 2 {
            kron.plan = KronPlan::a_last(1, 1);
        }
        let b_out = kron.b.dims()[1];
        Ok(KronAB {
            kron,
            bias_mid: (self.biases == 2).then(|| zero_factor([b_out], device)),
            bias: (self.biases >= 1).then(|| zero_factor([d_out], device)),
            res_scale: (self.residual != Residual::None).then(|| const_param([1], 1.0, device)),
            residual: self.residual,
        })
    }
}

/// KronA^B: `y = f(x) + s · (x·(a ⊗ b) + bias)`, with an optional `bias_mid` after the `b`
/// product and an optional residual `s_res · x` (KronA^B_res). Not mergeable: it runs beside a
/// non-linear block.
#[derive(Module, Debug)]
pub struct KronAB<B: Backend> {
    /// The Kronecker product `s · a ⊗ b` (a [`KronA`], its scale the block's `s`).
    pub kron: KronA<B>,
    /// Bias after the first (`b`) product, `[b_out]` (module bias 2).
    pub bias_mid: Option<Param<Tensor<B, 1>>>,
    /// Bias after the second product, `[d_out]`.
    pub bias: Option<Param<Tensor<B, 1>>>,
    /// `s_res`, `[1]`, for KronA^B_res and _sigres.
    pub res_scale: Option<Param<Tensor<B, 1>>>,
    /// Which residual `res_scale` feeds.
    pub residual: Residual,
}

impl<B: Backend> BlockAdapter<B> for KronAB<B> {
    type Shared = ();

    /// `f(x) + s · (x·(a ⊗ b) + bias) [+ s_res · x]`.
    fn forward<const D: usize>(&self, x: Tensor<B, D>, fx: Tensor<B, D>, _: &()) -> Tensor<B, D> {
        if x.shape().num_elements() == 0 {
            // No rows: the (empty) block output as it is (see `BlockAdapter::forward`).
            return fx;
        }
        let scale = self.kron.scale;
        let y = match &self.bias_mid {
            Some(mid) => {
                let (a, b) = (self.kron.a.val(), self.kron.b.val());
                let (a_in, b_in) = (a.dims()[0], b.dims()[0]);
                // The scale is folded into `a`: nothing per token.
                KronIntermediate::new(x.clone(), a_in, b_in)
                    .apply_b(b)
                    .add_b_bias(mid.val())
                    .apply_a(a.mul_scalar(scale))
                    .finish()
            }
            None => self.kron.apply(x.clone()),
        };
        let y = match &self.bias {
            Some(bias) => y + bias.val().mul_scalar(scale).unsqueeze(),
            None => y,
        };
        let out = fx + y;
        match (&self.res_scale, self.residual) {
            (Some(s), Residual::Learned) => out + x * s.val().unsqueeze(),
            (Some(s), Residual::Sigmoid) => out + x * activation::sigmoid(s.val()).unsqueeze(),
            _ => out,
        }
    }
}
