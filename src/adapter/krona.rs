//! KronA (Edalati et al. 2023): `ΔW = scale · a ⊗ b`.

use burn::module::{Module, Param};
use burn::tensor::{backend::Backend, Tensor};

use super::{
    check_finite, checked_factors, exact_shapes, init_factors, replace_values, LinearAdapter,
    Method, MethodConfig, MethodInfo,
};
use crate::error::ConfigError;
use crate::kron::{kron, kron_apply, kron_apply_add, ContractionOrder, KronPlan};

super::shape::kron_config! {
    /// Configuration of a [`KronA`] adapter.
    ///
    /// Factor shapes are Burn-layout `[rows, cols]` with `a_in·b_in = d_in` and
    /// `a_out·b_out = d_out`. Give both, one (the other is derived), a parameter budget, or
    /// nothing (PEFT's `factorization` near √d on each side).
    ///
    /// ```
    /// use kron_adapters::{KronAConfig, MethodConfig};
    /// // The KronA paper's T5-base shapes for a 768×768 layer: 32·24 + 24·32 = 1536 parameters.
    /// let cfg = KronAConfig::new([32, 24], [24, 32]);
    /// assert_eq!(cfg.num_params(768, 768).unwrap(), 1536);
    /// // Or let the crate choose near √d, as PEFT's LoKr does: a [24, 24], b [32, 32].
    /// let auto = KronAConfig::auto();
    /// assert_eq!(auto.factor_shapes(768, 768).unwrap(), ([24, 24], [32, 32]));
    /// ```
    pub struct KronAConfig(auto) {
        required {}
        optional {}
        defaults {
            /// The scale `s` (the paper's setting is 1).
            scale: f64 = 1.0,
        }
    }
}

impl KronAConfig {
    /// KronA with explicit factor shapes `a [a_in, a_out]`, `b [b_in, b_out]` (and everything
    /// else at its default). [`KronAConfig::auto`] leaves the shapes to be chosen per layer,
    /// near √d on each side (PEFT's factorization).
    pub fn new(a_shape: [usize; 2], b_shape: [usize; 2]) -> Self {
        Self::auto().with_a_shape(a_shape).with_b_shape(b_shape)
    }
}

impl super::shape::KronShapes for KronAConfig {}

impl MethodConfig for KronAConfig {
    type Adapter<B: Backend> = KronA<B>;

    const INFO: MethodInfo = MethodInfo {
        name: "KronA",
        key: "krona",
        factors: &["a", "b"],
        formula: "scale · a ⊗ b",
    };

    fn check_shapes(shapes: &[[usize; 2]]) -> Result<(usize, usize), ConfigError> {
        let [a, b] = exact_shapes::<2>(&Self::INFO, shapes)?;
        Ok((a[0] * b[0], a[1] * b[1]))
    }

    /// `a_in·a_out + b_in·b_out`.
    fn num_params(&self, d_in: usize, d_out: usize) -> Result<usize, ConfigError> {
        let (a, b) = self.factor_shapes(d_in, d_out)?;
        Ok(super::shape::KronShapes::factor_params(self, a, b))
    }

    fn init<B: Backend>(
        &self,
        d_in: usize,
        d_out: usize,
        device: &B::Device,
    ) -> Result<KronA<B>, ConfigError> {
        let (a_shape, b_shape) = self.factor_shapes(d_in, d_out)?;
        check_finite(&super::layer_name(d_in, d_out), "scale", self.scale)?;
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
    pub fn from_factors(a: Tensor<B, 2>, b: Tensor<B, 2>, scale: f64) -> Result<Self, ConfigError> {
        Self::from_values(vec![a, b], scale)
    }

    /// Uses this contraction order instead of the one chosen at construction.
    pub fn with_order(mut self, order: ContractionOrder) -> Self {
        self.plan = order.plan(&[self.a.dims()], &[self.b.dims()]);
        self
    }
}

impl<B: Backend> LinearAdapter<B> for KronA<B> {
    fn scale(&self) -> f64 {
        self.scale
    }

    fn method(&self) -> Method {
        Method::KronA
    }

    fn apply<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        kron_apply(x, &[self.a.val()], &[self.b.val()], &self.plan, self.scale)
    }

    fn apply_add<const D: usize>(&self, x: Tensor<B, D>, y: Tensor<B, D>) -> Tensor<B, D> {
        let (a, b) = (self.a.val(), self.b.val());
        kron_apply_add(x, &[a], &[b], &self.plan, self.scale, y)
    }

    fn delta_weight(&self) -> Tensor<B, 2> {
        kron(self.a.val(), self.b.val()).mul_scalar(self.scale)
    }

    fn factors(&self) -> Vec<Tensor<B, 2>> {
        vec![self.a.val(), self.b.val()]
    }

    fn with_factors(mut self, values: Vec<Tensor<B, 2>>) -> Self {
        replace_values(vec![&mut self.a, &mut self.b], values);
        self
    }

    fn from_values(values: Vec<Tensor<B, 2>>, scale: f64) -> Result<Self, ConfigError> {
        let mut p = checked_factors::<KronAConfig, B>(values, scale)?.into_iter();
        let (a, b) = (p.next().expect("2"), p.next().expect("2"));
        let plan = KronPlan::cheapest(&[a.dims()], &[b.dims()]);
        Ok(Self { a, b, scale, plan })
    }
}
