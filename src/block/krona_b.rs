//! KronA^B and KronA^B_res (KronA paper §3.3, Eq. 5–6): a Kronecker adapter beside a whole block.

use burn::module::{Module, Param};
use burn::tensor::{activation, backend::Backend, Tensor};
use serde::{Deserialize, Serialize};

use crate::adapter::{
    check_finite, const_param, init_factors, layer_name, minus_one, zero_factor, FactorInit,
};
use crate::error::AdapterError;
use crate::kron::{kron_apply, ContractionOrder, KronIntermediate, KronPlan};

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

fn default_scale() -> f64 {
    16.0
}

fn default_biases() -> usize {
    1
}

/// Configuration of a [`KronAB`] block adapter.
///
/// Factor shapes are chosen as for [`crate::KronAConfig`] (explicit, one given, a budget, or
/// PEFT's factorization near √d).
///
/// ```
/// use kron_adapters::block::{KronABConfig, Residual};
/// // The paper's T5-base KronA^B_res: a (32, 24), b (24, 32), s = 16, one bias.
/// let cfg = KronABConfig::new([32, 24], [24, 32]).with_residual(Residual::Learned);
/// assert_eq!(cfg.num_params(768, 768).unwrap(), 32 * 24 + 24 * 32 + 768 + 1);
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KronABConfig {
    /// Shape of `a`, `[a_in, a_out]`.
    #[serde(default)]
    pub a_shape: Option<[usize; 2]>,
    /// Shape of `b`, `[b_in, b_out]`.
    #[serde(default)]
    pub b_shape: Option<[usize; 2]>,
    /// PEFT's factor hint when no shape or budget is given. Default -1 (near √d).
    #[serde(default = "minus_one")]
    pub factor: i64,
    /// A target number of factor parameters when no shape is given.
    #[serde(default)]
    pub budget: Option<usize>,
    /// The scale `s`. Default 16 (the paper's most common choice, Tables 17–18).
    #[serde(default = "default_scale")]
    pub scale: f64,
    /// The paper's "module bias": 0, 1 (`bias [d_out]` after the second product, the default)
    /// or 2 (also `bias_mid [b_out]` after the first, the `b` product).
    #[serde(default = "default_biases")]
    pub biases: usize,
    /// KronA^B (`None`), KronA^B_res (`Learned`) or KronA^B_sigres (`Sigmoid`).
    #[serde(default)]
    pub residual: Residual,
    /// Initialisation of `a` and `b`. Default: `a` Kaiming-uniform, `b` zero.
    #[serde(default)]
    pub init: FactorInit,
    /// Contraction order (with two biases it is fixed: `b` first, then `a`).
    #[serde(default)]
    pub order: ContractionOrder,
}

impl KronABConfig {
    crate::adapter::kron_shape_config!();

    /// KronA^B with explicit factor shapes.
    pub fn new(a_shape: [usize; 2], b_shape: [usize; 2]) -> Self {
        Self {
            a_shape: Some(a_shape),
            b_shape: Some(b_shape),
            ..Self::auto()
        }
    }

    /// KronA^B with shapes chosen per block near √d.
    pub fn auto() -> Self {
        Self {
            a_shape: None,
            b_shape: None,
            factor: -1,
            budget: None,
            scale: default_scale(),
            biases: default_biases(),
            residual: Residual::None,
            init: FactorInit::default(),
            order: ContractionOrder::default(),
        }
    }

    /// Sets the residual connection (KronA^B_res: [`Residual::Learned`]).
    pub fn with_residual(mut self, residual: Residual) -> Self {
        self.residual = residual;
        self
    }

    /// Sets the number of biases (0, 1 or 2).
    pub fn with_biases(mut self, biases: usize) -> Self {
        self.biases = biases;
        self
    }

    /// Sets the scale.
    pub fn with_scale(mut self, scale: f64) -> Self {
        self.scale = scale;
        self
    }

    /// Sets the initialisation.
    pub fn with_init(mut self, init: FactorInit) -> Self {
        self.init = init;
        self
    }

    /// Sets the contraction order.
    pub fn with_order(mut self, order: ContractionOrder) -> Self {
        self.order = order;
        self
    }

    /// Trainable parameters: `a_in·a_out + b_in·b_out`, plus `d_out` with one bias,
    /// `d_out + b_out` with two, plus 1 for `s_res`.
    pub fn num_params(&self, d_in: usize, d_out: usize) -> Result<usize, AdapterError> {
        let (a, b) = self.factor_shapes(d_in, d_out)?;
        let biases = match self.biases {
            0 => 0,
            1 => d_out,
            _ => d_out + b[1],
        };
        let res = usize::from(self.residual != Residual::None);
        Ok(self.factor_params(a, b) + biases + res)
    }

    fn factor_params(&self, a: [usize; 2], b: [usize; 2]) -> usize {
        a[0] * a[1] + b[0] * b[1]
    }

    /// Builds the adapter for a `[d_in, d_out]` block.
    pub fn init<B: Backend>(
        &self,
        d_in: usize,
        d_out: usize,
        device: &B::Device,
    ) -> Result<KronAB<B>, AdapterError> {
        self.init_named(&layer_name(d_in, d_out), d_in, d_out, device)
    }

    pub(crate) fn init_named<B: Backend>(
        &self,
        layer: &str,
        d_in: usize,
        d_out: usize,
        device: &B::Device,
    ) -> Result<KronAB<B>, AdapterError> {
        check_finite(layer, "scale", self.scale)?;
        if self.biases > 2 {
            return Err(AdapterError::config(
                layer,
                "biases",
                format!("{} biases: KronA^B has 0, 1 or 2", self.biases),
            ));
        }
        if self.residual != Residual::None && d_in != d_out {
            return Err(AdapterError::config(
                layer,
                "residual",
                format!(
                    "a residual `s_res · x` needs d_in = d_out, the block is [{d_in}, {d_out}]"
                ),
            ));
        }
        let (a_shape, b_shape) = self.shapes_named(layer, d_in, d_out)?;
        let mut f = init_factors(self.init, &[a_shape, b_shape], d_in, device);
        let b = f.pop().expect("two factors");
        let a = f.pop().expect("two factors");
        let plan = if self.biases == 2 {
            KronPlan::a_last(1, 1)
        } else {
            self.order.plan(&[a_shape], &[b_shape])
        };
        Ok(KronAB {
            a,
            b,
            bias_mid: (self.biases == 2).then(|| zero_factor([b_shape[1]], device)),
            bias: (self.biases >= 1).then(|| zero_factor([d_out], device)),
            res_scale: (self.residual != Residual::None).then(|| const_param([1], 1.0, device)),
            scale: self.scale,
            residual: self.residual,
            plan,
        })
    }
}

/// KronA^B: `y = f(x) + s · (x·(a ⊗ b) + bias)`, with an optional `bias_mid` after the `b`
/// product and an optional residual `s_res · x` (KronA^B_res). Not mergeable: it runs beside a
/// non-linear block.
#[derive(Module, Debug)]
pub struct KronAB<B: Backend> {
    /// Left Kronecker factor, `[a_in, a_out]`.
    pub a: Param<Tensor<B, 2>>,
    /// Right Kronecker factor, `[b_in, b_out]`.
    pub b: Param<Tensor<B, 2>>,
    /// Bias after the first (`b`) product, `[b_out]` (module bias 2).
    pub bias_mid: Option<Param<Tensor<B, 1>>>,
    /// Bias after the second product, `[d_out]`.
    pub bias: Option<Param<Tensor<B, 1>>>,
    /// `s_res`, `[1]`, for KronA^B_res and _sigres.
    pub res_scale: Option<Param<Tensor<B, 1>>>,
    /// The scale `s`.
    pub scale: f64,
    /// Which residual `res_scale` feeds.
    pub residual: Residual,
    /// The contraction order.
    pub plan: KronPlan,
}

impl<B: Backend> KronAB<B> {
    /// `f(x) + s · (x·(a ⊗ b) + bias) [+ s_res · x]`, from the block input `x` and output `fx`.
    ///
    /// # Shapes
    /// - `x`: `[..., d_in]`, `fx`: `[..., d_out]`; output `[..., d_out]`
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>, fx: Tensor<B, D>) -> Tensor<B, D> {
        // The scale is folded into `a` (and the output bias): nothing per token.
        let a = self.a.val().mul_scalar(self.scale);
        let [a_in, _] = a.dims();
        let b_in = self.b.dims()[0];
        let y = match &self.bias_mid {
            Some(mid) => KronIntermediate::new(x.clone(), a_in, b_in)
                .apply_b(self.b.val())
                .add_b_bias(mid.val())
                .apply_a(a)
                .finish(),
            None => kron_apply(x.clone(), &[a], &[self.b.val()], &self.plan, 1.0),
        };
        let y = match &self.bias {
            Some(bias) => y + bias.val().mul_scalar(self.scale).unsqueeze(),
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
