//! KronA (Edalati et al. 2023): `ΔW = scale · a ⊗ b`.

use burn::module::{Module, Param};
use burn::tensor::{backend::Backend, Tensor};
use serde::{Deserialize, Serialize};

use super::{
    check_finite, factor_from_tensor, init_factors, layer_name, minus_one, one, replace_value,
    AdapterSpec, FactorInit, LinearAdapter, Method,
};
use crate::error::AdapterError;
use crate::kron::{kron, kron_apply, ContractionOrder, KronPlan};

/// Configuration of a [`KronA`] adapter.
///
/// Factor shapes are Burn-layout `[rows, cols]` with `a_in·b_in = d_in` and
/// `a_out·b_out = d_out`. Give both, one (the other is derived), a parameter budget, or nothing
/// (PEFT's `factorization` near √d on each side).
///
/// ```
/// use kron_adapters::KronAConfig;
/// // The KronA paper's T5-base shapes for a 768×768 layer: 32·24 + 24·32 = 1536 parameters.
/// let cfg = KronAConfig::new([32, 24], [24, 32]);
/// assert_eq!(cfg.num_params(768, 768).unwrap(), 1536);
/// // Or let the crate choose near √d, as PEFT's LoKr does: a [24, 24], b [32, 32].
/// let auto = KronAConfig::auto();
/// assert_eq!(auto.factor_shapes(768, 768).unwrap(), ([24, 24], [32, 32]));
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KronAConfig {
    /// Shape of `a`, `[a_in, a_out]`.
    #[serde(default)]
    pub a_shape: Option<[usize; 2]>,
    /// Shape of `b`, `[b_in, b_out]`.
    #[serde(default)]
    pub b_shape: Option<[usize; 2]>,
    /// PEFT's `decompose_factor` when no shape or budget is given. Default -1 (near √d).
    #[serde(default = "minus_one")]
    pub factor: i64,
    /// A target number of trainable parameters per layer when no shape is given.
    #[serde(default)]
    pub budget: Option<usize>,
    /// The scale `s`. Default 1 (the paper's setting).
    #[serde(default = "one")]
    pub scale: f64,
    /// Initialisation. Default: `a` Kaiming-uniform, `b` zero (paper, Table 4).
    #[serde(default)]
    pub init: FactorInit,
    /// Contraction order of the unmaterialized apply. Default: the cheaper for the shapes.
    #[serde(default)]
    pub order: ContractionOrder,
}

impl KronAConfig {
    crate::adapter::kron_shape_config!();

    /// KronA with explicit factor shapes `a [a_in, a_out]`, `b [b_in, b_out]`.
    pub fn new(a_shape: [usize; 2], b_shape: [usize; 2]) -> Self {
        Self {
            a_shape: Some(a_shape),
            b_shape: Some(b_shape),
            ..Self::auto()
        }
    }

    /// KronA whose shapes are chosen per layer, near √d on each side (PEFT's factorization).
    pub fn auto() -> Self {
        Self {
            a_shape: None,
            b_shape: None,
            factor: -1,
            budget: None,
            scale: 1.0,
            init: FactorInit::default(),
            order: ContractionOrder::default(),
        }
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

    /// Trainable parameters for a `[d_in, d_out]` layer: `a_in·a_out + b_in·b_out`.
    pub fn num_params(&self, d_in: usize, d_out: usize) -> Result<usize, AdapterError> {
        let (a, b) = self.factor_shapes(d_in, d_out)?;
        Ok(self.factor_params(a, b))
    }

    fn factor_params(&self, a: [usize; 2], b: [usize; 2]) -> usize {
        a[0] * a[1] + b[0] * b[1]
    }

    /// Builds the adapter for a `[d_in, d_out]` layer.
    pub fn init<B: Backend>(
        &self,
        d_in: usize,
        d_out: usize,
        device: &B::Device,
    ) -> Result<KronA<B>, AdapterError> {
        self.init_named(&layer_name(d_in, d_out), d_in, d_out, device)
    }

    pub(crate) fn init_named<B: Backend>(
        &self,
        layer: &str,
        d_in: usize,
        d_out: usize,
        device: &B::Device,
    ) -> Result<KronA<B>, AdapterError> {
        check_finite(layer, "scale", self.scale)?;
        let (a_shape, b_shape) = self.shapes_named(layer, d_in, d_out)?;
        let mut f = init_factors(self.init, &[a_shape, b_shape], d_in, device);
        let b = f.pop().expect("two factors");
        let a = f.pop().expect("two factors");
        Ok(KronA {
            a,
            b,
            scale: self.scale,
            plan: self.order.plan(&[a_shape], &[b_shape]),
        })
    }
}

/// A KronA adapter: `x·ΔW = scale · x·(a ⊗ b)`, computed as `reshape(aᵀ·X·b)` (never
/// materializing `a ⊗ b`).
#[derive(Module, Debug)]
pub struct KronA<B: Backend> {
    /// Left Kronecker factor, `[a_in, a_out]`.
    pub a: Param<Tensor<B, 2>>,
    /// Right Kronecker factor, `[b_in, b_out]`.
    pub b: Param<Tensor<B, 2>>,
    /// The scale `s`.
    pub scale: f64,
    /// The contraction order, fixed at construction.
    pub plan: KronPlan,
}

impl<B: Backend> KronA<B> {
    /// A KronA adapter from given factors (trainable), with the cheapest contraction order.
    pub fn from_factors(
        a: Tensor<B, 2>,
        b: Tensor<B, 2>,
        scale: f64,
    ) -> Result<Self, AdapterError> {
        let (a_shape, b_shape) = (a.dims(), b.dims());
        let layer = layer_name(a_shape[0] * b_shape[0], a_shape[1] * b_shape[1]);
        check_finite(&layer, "scale", scale)?;
        if a_shape.iter().chain(&b_shape).any(|&d| d == 0) {
            return Err(AdapterError::config(
                layer,
                "a/b",
                format!("factor shapes {a_shape:?} and {b_shape:?} must be non-empty"),
            ));
        }
        Ok(Self {
            a: factor_from_tensor(a),
            b: factor_from_tensor(b),
            scale,
            plan: KronPlan::cheapest(&[a_shape], &[b_shape]),
        })
    }

    /// Uses this contraction order instead of the one chosen at construction.
    pub fn with_order(mut self, order: ContractionOrder) -> Self {
        self.plan = order.plan(&[self.a.dims()], &[self.b.dims()]);
        self
    }
}

impl<B: Backend> LinearAdapter<B> for KronA<B> {
    fn d_in(&self) -> usize {
        self.a.dims()[0] * self.b.dims()[0]
    }

    fn d_out(&self) -> usize {
        self.a.dims()[1] * self.b.dims()[1]
    }

    fn apply<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        kron_apply(x, &[self.a.val()], &[self.b.val()], &self.plan, self.scale)
    }

    fn delta_weight(&self) -> Tensor<B, 2> {
        kron(self.a.val(), self.b.val()).mul_scalar(self.scale)
    }

    fn spec(&self) -> AdapterSpec {
        AdapterSpec {
            method: Method::Krona,
            d_in: self.d_in(),
            d_out: self.d_out(),
            factors: vec![("a".into(), self.a.dims()), ("b".into(), self.b.dims())],
            scale: self.scale,
        }
    }

    fn factors(&self) -> Vec<Tensor<B, 2>> {
        vec![self.a.val(), self.b.val()]
    }

    fn with_factors(mut self, values: Vec<Tensor<B, 2>>) -> Self {
        let mut v = values.into_iter();
        self.a = replace_value(&self.a, v.next().expect("2 factors"));
        self.b = replace_value(&self.b, v.next().expect("2 factors"));
        self
    }
}
