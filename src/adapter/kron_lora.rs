//! Kron-LoRA (Shen 2025): `ΔW = scale · a ⊗ (b1·b2)`.

use burn::module::{Module, Param};
use burn::tensor::{backend::Backend, Tensor};

use super::shape::kron_config;
use super::{
    checked_factors, exact_shapes, init_factors, layer_name, replace_values, LinearAdapter, Method,
    MethodConfig, MethodInfo,
};
use crate::error::ConfigError;
use crate::kron::{kron, kron_apply, kron_apply_add, ContractionOrder, KronPlan};

super::rank_config! {
    kron_config!
    /// Configuration of a [`KronLora`] adapter.
    ///
    /// The Kronecker shapes are chosen as for [`crate::KronAConfig`] (`b_shape` is the shape of
    /// the product `b1·b2`); then `b1` is `[b_in, rank]` and `b2` is `[rank, b_out]`.
    ///
    /// ```
    /// use kron_adapters::{KronLoraConfig, MethodConfig};
    /// // PEFT LoKr with decompose_both=false, r=2, alpha=4 on a 48×48 layer: a [6, 6], b [8, 8].
    /// let cfg = KronLoraConfig::auto(2).with_alpha(4.0);
    /// assert_eq!(cfg.num_params(48, 48).unwrap(), 6 * 6 + 2 * (8 + 8));
    /// ```
    pub struct KronLoraConfig(auto) {
        required {
            /// The rank `r` of `b = b1·b2`: at least 1, and at most `min(b_in, b_out)` or
            /// below `max(b_in, b_out) / 2` (the ranks PEFT's LoKr stores as `w2_a @ w2_b`; a
            /// rank above `min(b_in, b_out)` adds parameters, not expressiveness).
            rank: usize,
        }
        optional {}
        defaults {}
    }
}

impl KronLoraConfig {
    /// Kron-LoRA with explicit shapes `a [a_in, a_out]` and `b = b1·b2 [b_in, b_out]`.
    pub fn new(a_shape: [usize; 2], b_shape: [usize; 2], rank: usize) -> Self {
        Self::auto(rank).with_a_shape(a_shape).with_b_shape(b_shape)
    }
}

impl super::shape::KronShapes for KronLoraConfig {
    /// `a_in·a_out + r·(b_in + b_out)`.
    fn factor_params(&self, a: [usize; 2], b: [usize; 2]) -> usize {
        a[0] * a[1] + self.rank * (b[0] + b[1])
    }

    /// A budget search picks only shapes whose `b` takes the rank.
    fn admissible(&self, _: [usize; 2], b: [usize; 2]) -> bool {
        check_rank("", self.rank, b).is_ok()
    }
}

/// The ranks a `b [b_in, b_out]` takes: `1 ≤ r ≤ min(b_in, b_out)`, or `r < max(b_in, b_out)/2`
/// (PEFT's LoKr accepts those too, storing `w2_a [b_out, r]`, `w2_b [r, b_in]`).
fn check_rank(layer: &str, rank: usize, b: [usize; 2]) -> Result<(), ConfigError> {
    let (min, max) = (b[0].min(b[1]), b[0].max(b[1]));
    if rank >= 1 && (rank <= min || 2 * rank < max) {
        return Ok(());
    }
    Err(ConfigError::Rank {
        layer: layer.to_string(),
        rank,
        reason: format!(
            "Kron-LoRA factorizes b {b:?} as b1·b2, so its rank must be between 1 and \
             min(b_in, b_out) = {min}, or below max(b_in, b_out)/2 = {} as PEFT's LoKr allows; \
             for a full b use KronA",
            max as f64 / 2.0
        ),
    })
}

impl MethodConfig for KronLoraConfig {
    type Adapter<B: Backend> = KronLora<B>;

    const INFO: MethodInfo = MethodInfo {
        name: "Kron-LoRA",
        key: "kron_lora",
        factors: &["a", "b1", "b2"],
        formula: "scale · a ⊗ (b1·b2)",
    };

    fn check_shapes(shapes: &[[usize; 2]]) -> Result<(usize, usize), ConfigError> {
        let [a, [b_in, r], [r2, b_out]] = exact_shapes::<3>(&Self::INFO, shapes)?;
        let (d_in, d_out) = (a[0] * b_in, a[1] * b_out);
        let layer = layer_name(d_in, d_out);
        if r != r2 {
            return Err(ConfigError::invalid(
                layer,
                "b2",
                format!("b1 [{b_in}, {r}] and b2 [{r2}, {b_out}] do not chain"),
            ));
        }
        check_rank(&layer, r, [b_in, b_out])?;
        Ok((d_in, d_out))
    }

    /// `a_in·a_out + r·(b_in + b_out)`.
    fn num_params(&self, d_in: usize, d_out: usize) -> Result<usize, ConfigError> {
        let (a, b) = self.factor_shapes(d_in, d_out)?;
        check_rank(&layer_name(d_in, d_out), self.rank, b)?;
        Ok(super::shape::KronShapes::factor_params(self, a, b))
    }

    fn init<B: Backend>(
        &self,
        d_in: usize,
        d_out: usize,
        device: &B::Device,
    ) -> Result<KronLora<B>, ConfigError> {
        let layer = layer_name(d_in, d_out);
        let (a_shape, b_shape) = self.factor_shapes(d_in, d_out)?;
        check_rank(&layer, self.rank, b_shape)?;
        let scale = self.rank_scale(&layer)?;
        let r = self.rank;
        let shapes = [a_shape, [b_shape[0], r], [r, b_shape[1]]];
        let mut f = init_factors(self.init, &shapes, d_in, device);
        let b2 = f.pop().expect("three factors");
        let b1 = f.pop().expect("three factors");
        let a = f.pop().expect("three factors");
        Ok(KronLora {
            a,
            b1,
            b2,
            scale,
            plan: self.order.plan(&[a_shape], &shapes[1..]),
        })
    }
}

/// A Kron-LoRA adapter: `x·ΔW = scale · x·(a ⊗ (b1·b2))`, computed without materializing
/// `a ⊗ (b1·b2)` nor `b1·b2`: `a` is contracted before, between or after `b1`/`b2`,
/// whichever is cheapest.
#[derive(Module, Debug)]
pub struct KronLora<B: Backend> {
    /// Left Kronecker factor, `[a_in, a_out]`.
    pub a: Param<Tensor<B, 2>>,
    /// First low-rank half of the right factor, `[b_in, r]`.
    pub b1: Param<Tensor<B, 2>>,
    /// Second low-rank half of the right factor, `[r, b_out]`.
    pub b2: Param<Tensor<B, 2>>,
    /// The scale `s`.
    pub scale: f64,
    /// The contraction order, fixed at construction.
    pub plan: KronPlan,
}

impl<B: Backend> KronLora<B> {
    /// A Kron-LoRA adapter from given factors (trainable), with the cheapest contraction order.
    pub fn from_factors(
        a: Tensor<B, 2>,
        b1: Tensor<B, 2>,
        b2: Tensor<B, 2>,
        scale: f64,
    ) -> Result<Self, ConfigError> {
        Self::from_values(vec![a, b1, b2], scale)
    }

    /// Uses this contraction order instead of the one chosen at construction.
    pub fn with_order(mut self, order: ContractionOrder) -> Self {
        self.plan = order.plan(&[self.a.dims()], &[self.b1.dims(), self.b2.dims()]);
        self
    }

    /// Uses an explicit plan (any interleaving of one `a` step and two `b` steps).
    pub fn with_plan(mut self, plan: KronPlan) -> Self {
        self.plan = plan;
        self
    }

    /// The rank `r`.
    pub fn rank(&self) -> usize {
        self.b1.dims()[1]
    }
}

impl<B: Backend> LinearAdapter<B> for KronLora<B> {
    fn scale(&self) -> f64 {
        self.scale
    }

    fn method(&self) -> Method {
        Method::KronLora
    }

    fn apply<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        kron_apply(
            x,
            &[self.a.val()],
            &[self.b1.val(), self.b2.val()],
            &self.plan,
            self.scale,
        )
    }

    fn apply_add<const D: usize>(&self, x: Tensor<B, D>, y: Tensor<B, D>) -> Tensor<B, D> {
        let (a, b) = ([self.a.val()], [self.b1.val(), self.b2.val()]);
        kron_apply_add(x, &a, &b, &self.plan, self.scale, y)
    }

    fn delta_weight(&self) -> Tensor<B, 2> {
        let b = self.b1.val().matmul(self.b2.val());
        kron(self.a.val(), b).mul_scalar(self.scale)
    }

    fn factors(&self) -> Vec<Tensor<B, 2>> {
        vec![self.a.val(), self.b1.val(), self.b2.val()]
    }

    fn with_factors(mut self, values: Vec<Tensor<B, 2>>) -> Self {
        replace_values(vec![&mut self.a, &mut self.b1, &mut self.b2], values);
        self
    }

    fn from_values(values: Vec<Tensor<B, 2>>, scale: f64) -> Result<Self, ConfigError> {
        let mut p = checked_factors::<KronLoraConfig, B>(values, scale)?.into_iter();
        let (a, b1, b2) = (
            p.next().expect("3"),
            p.next().expect("3"),
            p.next().expect("3"),
        );
        let plan = KronPlan::cheapest(&[a.dims()], &[b1.dims(), b2.dims()]);
        Ok(Self {
            a,
            b1,
            b2,
            scale,
            plan,
        })
    }
}
