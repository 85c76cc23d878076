//! Kron-LoRA (Shen 2025): `ΔW = scale · a ⊗ (b1·b2)`.

use burn::module::{Module, Param};
use burn::tensor::{backend::Backend, Tensor};
use serde::{Deserialize, Serialize};

use super::{
    factor_from_tensor, init_factors, layer_name, minus_one, rank_scale, replace_value,
    AdapterSpec, FactorInit, LinearAdapter, Method,
};
use crate::error::AdapterError;
use crate::kron::{kron, kron_apply, ContractionOrder, KronPlan};

/// Configuration of a [`KronLora`] adapter.
///
/// The Kronecker shapes are chosen as for [`crate::KronAConfig`] (`b_shape` is the shape of the
/// product `b1·b2`); then `b1` is `[b_in, rank]` and `b2` is `[rank, b_out]`.
///
/// ```
/// use kron_adapters::KronLoraConfig;
/// // PEFT LoKr with decompose_both=false, r=2, alpha=4 on a 48×48 layer: a [6, 6], b [8, 8].
/// let cfg = KronLoraConfig::auto(2).with_alpha(4.0);
/// assert_eq!(cfg.num_params(48, 48).unwrap(), 6 * 6 + 2 * (8 + 8));
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KronLoraConfig {
    /// Shape of `a`, `[a_in, a_out]`.
    #[serde(default)]
    pub a_shape: Option<[usize; 2]>,
    /// Shape of `b = b1·b2`, `[b_in, b_out]`.
    #[serde(default)]
    pub b_shape: Option<[usize; 2]>,
    /// The rank `r` of `b = b1·b2`: `1 ≤ r ≤ min(b_in, b_out)`.
    pub rank: usize,
    /// PEFT's `decompose_factor` when no shape or budget is given. Default -1 (near √d).
    #[serde(default = "minus_one")]
    pub factor: i64,
    /// A target number of trainable parameters per layer when no shape is given.
    #[serde(default)]
    pub budget: Option<usize>,
    /// `alpha` in `scale = alpha / r`. Default: `r` (scale 1).
    #[serde(default)]
    pub alpha: Option<f64>,
    /// An explicit scale, overriding `alpha / r`.
    #[serde(default)]
    pub scale: Option<f64>,
    /// Initialisation. Default: `a` and `b1` Kaiming-uniform, `b2` zero.
    #[serde(default)]
    pub init: FactorInit,
    /// Contraction order of the unmaterialized apply. Default: the cheapest for the shapes.
    #[serde(default)]
    pub order: ContractionOrder,
}

impl KronLoraConfig {
    crate::adapter::kron_shape_config!();

    /// Kron-LoRA with explicit shapes `a [a_in, a_out]` and `b = b1·b2 [b_in, b_out]`.
    pub fn new(a_shape: [usize; 2], b_shape: [usize; 2], rank: usize) -> Self {
        Self {
            a_shape: Some(a_shape),
            b_shape: Some(b_shape),
            ..Self::auto(rank)
        }
    }

    /// Kron-LoRA whose shapes are chosen per layer near √d (PEFT's factorization).
    pub fn auto(rank: usize) -> Self {
        Self {
            a_shape: None,
            b_shape: None,
            rank,
            factor: -1,
            budget: None,
            alpha: None,
            scale: None,
            init: FactorInit::default(),
            order: ContractionOrder::default(),
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

    /// Sets the contraction order.
    pub fn with_order(mut self, order: ContractionOrder) -> Self {
        self.order = order;
        self
    }

    /// Trainable parameters for a `[d_in, d_out]` layer: `a_in·a_out + r·(b_in + b_out)`.
    pub fn num_params(&self, d_in: usize, d_out: usize) -> Result<usize, AdapterError> {
        let (a, b) = self.factor_shapes(d_in, d_out)?;
        Ok(self.factor_params(a, b))
    }

    fn factor_params(&self, a: [usize; 2], b: [usize; 2]) -> usize {
        a[0] * a[1] + self.rank * (b[0] + b[1])
    }

    /// Builds the adapter for a `[d_in, d_out]` layer.
    pub fn init<B: Backend>(
        &self,
        d_in: usize,
        d_out: usize,
        device: &B::Device,
    ) -> Result<KronLora<B>, AdapterError> {
        self.init_named(&layer_name(d_in, d_out), d_in, d_out, device)
    }

    pub(crate) fn init_named<B: Backend>(
        &self,
        layer: &str,
        d_in: usize,
        d_out: usize,
        device: &B::Device,
    ) -> Result<KronLora<B>, AdapterError> {
        let (a_shape, b_shape) = self.shapes_named(layer, d_in, d_out)?;
        let scale = check_rank(layer, self.rank, b_shape, self.alpha, self.scale)?;
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

fn check_rank(
    layer: &str,
    rank: usize,
    b_shape: [usize; 2],
    alpha: Option<f64>,
    scale: Option<f64>,
) -> Result<f64, AdapterError> {
    let max = b_shape[0].min(b_shape[1]);
    if rank == 0 || rank > max {
        return Err(AdapterError::Rank {
            layer: layer.to_string(),
            rank,
            reason: format!(
                "Kron-LoRA factorizes b {b_shape:?} as b1·b2, so its rank must be between 1 and \
                 min(b_in, b_out) = {max}"
            ),
        });
    }
    rank_scale(layer, rank, alpha, scale)
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
    ) -> Result<Self, AdapterError> {
        let (sa, s1, s2) = (a.dims(), b1.dims(), b2.dims());
        let layer = layer_name(sa[0] * s1[0], sa[1] * s2[1]);
        super::check_factor_shape(&layer, "b2", s2, [s1[1], s2[1]])?;
        if sa.contains(&0) {
            return Err(AdapterError::config(
                layer,
                "a",
                format!("factor a {sa:?} must be non-empty"),
            ));
        }
        check_rank(&layer, s1[1], [s1[0], s2[1]], None, Some(scale))?;
        Ok(Self {
            a: factor_from_tensor(a),
            b1: factor_from_tensor(b1),
            b2: factor_from_tensor(b2),
            scale,
            plan: KronPlan::cheapest(&[sa], &[s1, s2]),
        })
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
    fn d_in(&self) -> usize {
        self.a.dims()[0] * self.b1.dims()[0]
    }

    fn d_out(&self) -> usize {
        self.a.dims()[1] * self.b2.dims()[1]
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

    fn delta_weight(&self) -> Tensor<B, 2> {
        let b = self.b1.val().matmul(self.b2.val());
        kron(self.a.val(), b).mul_scalar(self.scale)
    }

    fn spec(&self) -> AdapterSpec {
        AdapterSpec {
            method: Method::KronLora,
            d_in: self.d_in(),
            d_out: self.d_out(),
            factors: vec![
                ("a".into(), self.a.dims()),
                ("b1".into(), self.b1.dims()),
                ("b2".into(), self.b2.dims()),
            ],
            scale: self.scale,
        }
    }

    fn factors(&self) -> Vec<Tensor<B, 2>> {
        vec![self.a.val(), self.b1.val(), self.b2.val()]
    }

    fn with_factors(mut self, values: Vec<Tensor<B, 2>>) -> Self {
        let mut v = values.into_iter();
        self.a = replace_value(&self.a, v.next().expect("3 factors"));
        self.b1 = replace_value(&self.b1, v.next().expect("3 factors"));
        self.b2 = replace_value(&self.b2, v.next().expect("3 factors"));
        self
    }
}
