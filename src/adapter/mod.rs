//! Adapters that add a trainable `ΔW` to a frozen `Linear`: LoRA, KronA and Kron-LoRA.
//!
//! Every adapter implements [`LinearAdapter`], the one surface [`crate::AdaptedLinear`] (and the
//! PEFT, quantization and checkpoint code) relies on: its sizes, its contribution `x·ΔW` computed
//! without materializing `ΔW`, its `ΔW` materialized for merging, and an [`AdapterSpec`] that
//! describes it.

mod kron_lora;
mod krona;
mod lora;

pub use kron_lora::{KronLora, KronLoraConfig};
pub use krona::{KronA, KronAConfig};
pub use lora::{Lora, LoraConfig};

use burn::module::{Initializer, Module, Param, ParamId};
use burn::tensor::{backend::Backend, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::AdapterError;

/// How an adapter's factors are initialised.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum FactorInit {
    /// The KronA paper's choice (Appendix B.1): the first factor (`down`, `a`; for Kron-LoRA `a`
    /// and `b1`) Kaiming-uniform with a = √5 (bound `1/√fan_in`), the last (`up`, `b`, `b2`)
    /// zero, so `ΔW = 0` at step 0 and training starts exactly at the pretrained model.
    #[default]
    KaimingZero,
    /// The first factor zero, the others Kaiming-uniform: PEFT LoKr's default (`w1 = 0`). Also
    /// `ΔW = 0` at step 0.
    ZeroKaiming,
    /// Every factor from Normal(0, 1/√d_in): the paper's ablation (Table 4). `ΔW ≠ 0` at step 0.
    Normal,
}

/// Builder methods and shape resolution of the configs with Kronecker shape fields
/// (`a_shape`, `b_shape`, `factor`, `budget`): KronA, Kron-LoRA and KronA^B. The config
/// provides `fn factor_params(&self, a, b) -> usize`, its factor parameters for given shapes
/// (what a budget is matched against).
macro_rules! kron_shape_config {
    () => {
        /// Sets the shape of `a` only (`b` is derived per layer).
        pub fn with_a_shape(mut self, a_shape: [usize; 2]) -> Self {
            self.a_shape = Some(a_shape);
            self
        }

        /// Sets the shape of `b` only (for Kron-LoRA, of `b1·b2`; `a` is derived per layer).
        pub fn with_b_shape(mut self, b_shape: [usize; 2]) -> Self {
            self.b_shape = Some(b_shape);
            self
        }

        /// Sets PEFT's factor hint (used when no shape or budget is given).
        pub fn with_factor(mut self, factor: i64) -> Self {
            self.factor = factor;
            self
        }

        /// Chooses shapes per layer to come closest to `params` trainable parameters.
        pub fn with_budget(mut self, params: usize) -> Self {
            self.budget = Some(params);
            self
        }

        /// The factor shapes `(a, b)` this config gives a `[d_in, d_out]` layer (for Kron-LoRA,
        /// `b` is the shape of `b1·b2`).
        pub fn factor_shapes(
            &self,
            d_in: usize,
            d_out: usize,
        ) -> Result<([usize; 2], [usize; 2]), crate::AdapterError> {
            self.shapes_named(&crate::adapter::layer_name(d_in, d_out), d_in, d_out)
        }

        fn shapes_named(
            &self,
            layer: &str,
            d_in: usize,
            d_out: usize,
        ) -> Result<([usize; 2], [usize; 2]), crate::AdapterError> {
            let request = crate::kron::ShapeRequest {
                a: self.a_shape,
                b: self.b_shape,
                factor: self.factor,
                budget: self.budget,
            };
            crate::kron::resolve_factor_shapes(layer, d_in, d_out, &request, |a, b| {
                self.factor_params(a, b)
            })
        }
    };
}
pub(crate) use kron_shape_config;

/// Which method an adapter implements.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// LoRA: `ΔW = scale · down·up`.
    Lora,
    /// KronA: `ΔW = scale · a ⊗ b`.
    Krona,
    /// Kron-LoRA: `ΔW = scale · a ⊗ (b1·b2)`.
    KronLora,
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Method::Lora => "LoRA",
            Method::Krona => "KronA",
            Method::KronLora => "Kron-LoRA",
        })
    }
}

/// A resolved description of one adapter: method, layer size, factor shapes (Burn layout) and
/// scale. Written into adapter checkpoints and compared when loading them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdapterSpec {
    /// The method.
    pub method: Method,
    /// The layer's input size.
    pub d_in: usize,
    /// The layer's output size.
    pub d_out: usize,
    /// Each factor's name and shape, in order (`down`/`up`, `a`/`b`, `a`/`b1`/`b2`).
    pub factors: Vec<(String, [usize; 2])>,
    /// The scale `s` in `ΔW = s · …`.
    pub scale: f64,
}

impl AdapterSpec {
    /// Trainable parameters: the sum of the factors' sizes.
    pub fn num_params(&self) -> usize {
        self.factors.iter().map(|(_, s)| s[0] * s[1]).sum()
    }

    /// The rank (inner size) of a LoRA or Kron-LoRA adapter.
    pub fn rank(&self) -> Option<usize> {
        match self.method {
            Method::Lora => self.factors.first().map(|(_, s)| s[1]),
            Method::KronLora => self.factors.get(1).map(|(_, s)| s[1]),
            Method::Krona => None,
        }
    }
}

/// The surface every `Linear` adapter offers.
pub trait LinearAdapter<B: Backend> {
    /// Input size `d_in` of the adapted layer.
    fn d_in(&self) -> usize;
    /// Output size `d_out` of the adapted layer.
    fn d_out(&self) -> usize;
    /// The adapter's contribution `x·ΔW` (scale included), computed from the factors without
    /// building `ΔW`.
    ///
    /// # Shapes
    /// - `x`: `[..., d_in]`
    /// - output: `[..., d_out]`
    fn apply<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D>;
    /// `ΔW`, materialized, scale included.
    ///
    /// # Shapes
    /// - output: `[d_in, d_out]`
    fn delta_weight(&self) -> Tensor<B, 2>;
    /// A description of this adapter.
    fn spec(&self) -> AdapterSpec;
    /// The factors, in the order of [`AdapterSpec::factors`].
    fn factors(&self) -> Vec<Tensor<B, 2>>;
    /// The same adapter with new factor values (same order and shapes as [`Self::factors`]),
    /// keeping parameter ids and whether each trains.
    fn with_factors(self, values: Vec<Tensor<B, 2>>) -> Self;
}

/// One adapter of any method, as stored in an [`crate::AdaptedLinear`].
#[derive(Module, Debug)]
#[allow(clippy::large_enum_variant)]
pub enum Adapter<B: Backend> {
    /// LoRA.
    Lora(Lora<B>),
    /// KronA.
    KronA(KronA<B>),
    /// Kron-LoRA.
    KronLora(KronLora<B>),
}

macro_rules! dispatch {
    ($self:ident, $a:ident => $e:expr) => {
        match $self {
            Adapter::Lora($a) => $e,
            Adapter::KronA($a) => $e,
            Adapter::KronLora($a) => $e,
        }
    };
}

impl<B: Backend> LinearAdapter<B> for Adapter<B> {
    fn d_in(&self) -> usize {
        dispatch!(self, a => a.d_in())
    }
    fn d_out(&self) -> usize {
        dispatch!(self, a => a.d_out())
    }
    fn apply<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        dispatch!(self, a => a.apply(x))
    }
    fn delta_weight(&self) -> Tensor<B, 2> {
        dispatch!(self, a => a.delta_weight())
    }
    fn spec(&self) -> AdapterSpec {
        dispatch!(self, a => a.spec())
    }
    fn factors(&self) -> Vec<Tensor<B, 2>> {
        dispatch!(self, a => a.factors())
    }
    fn with_factors(self, values: Vec<Tensor<B, 2>>) -> Self {
        match self {
            Adapter::Lora(a) => Adapter::Lora(a.with_factors(values)),
            Adapter::KronA(a) => Adapter::KronA(a.with_factors(values)),
            Adapter::KronLora(a) => Adapter::KronLora(a.with_factors(values)),
        }
    }
}

impl<B: Backend> Adapter<B> {
    /// Builds an adapter of `spec`'s method from factor values in spec order (Burn layout),
    /// trainable, with `spec`'s scale and the cheapest contraction order.
    pub fn from_spec(spec: &AdapterSpec, factors: Vec<Tensor<B, 2>>) -> Result<Self, AdapterError> {
        let want = spec.factors.len();
        if factors.len() != want {
            return Err(AdapterError::config(
                layer_name(spec.d_in, spec.d_out),
                "factors",
                format!(
                    "{} has {want} factors, {} given",
                    spec.method,
                    factors.len()
                ),
            ));
        }
        for ((name, shape), t) in spec.factors.iter().zip(&factors) {
            check_factor_shape(&layer_name(spec.d_in, spec.d_out), name, t.dims(), *shape)?;
        }
        let mut f = factors.into_iter();
        let mut next = || f.next().expect("counted");
        let adapter = match spec.method {
            Method::Lora => Adapter::Lora(Lora::from_factors(next(), next(), spec.scale)?),
            Method::Krona => Adapter::KronA(KronA::from_factors(next(), next(), spec.scale)?),
            Method::KronLora => {
                Adapter::KronLora(KronLora::from_factors(next(), next(), next(), spec.scale)?)
            }
        };
        if adapter.d_in() != spec.d_in || adapter.d_out() != spec.d_out {
            return Err(AdapterError::config(
                layer_name(spec.d_in, spec.d_out),
                "factors",
                format!(
                    "the factors make a [{}, {}] update",
                    adapter.d_in(),
                    adapter.d_out()
                ),
            ));
        }
        Ok(adapter)
    }
}

/// Which adapter to put on a `Linear`, and how. Serializes to JSON with a `method` tag:
/// `{"method": "KronA", "a_shape": [32, 24], "b_shape": [24, 32]}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "method")]
pub enum AdapterConfig {
    /// LoRA.
    Lora(LoraConfig),
    /// KronA.
    KronA(KronAConfig),
    /// Kron-LoRA.
    KronLora(KronLoraConfig),
}

impl burn::config::Config for AdapterConfig {}

impl AdapterConfig {
    /// Builds the adapter for a `[d_in, d_out]` layer; `layer` names it in errors.
    pub fn init<B: Backend>(
        &self,
        layer: &str,
        d_in: usize,
        d_out: usize,
        device: &B::Device,
    ) -> Result<Adapter<B>, AdapterError> {
        Ok(match self {
            AdapterConfig::Lora(c) => Adapter::Lora(c.init_named(layer, d_in, d_out, device)?),
            AdapterConfig::KronA(c) => Adapter::KronA(c.init_named(layer, d_in, d_out, device)?),
            AdapterConfig::KronLora(c) => {
                Adapter::KronLora(c.init_named(layer, d_in, d_out, device)?)
            }
        })
    }
}

/// The default layer name in errors, before a model names it.
pub(crate) fn layer_name(d_in: usize, d_out: usize) -> String {
    format!("Linear[{d_in}→{d_out}]")
}

/// A factor `[rows, cols]` (applied as `x·m`, so `fan_in = rows`) initialised Kaiming-uniform
/// with a = √5: `U(-1/√rows, 1/√rows)`, as PyTorch's `kaiming_uniform_(w, a=√5)`.
pub(crate) fn kaiming_factor<B: Backend>(
    shape: [usize; 2],
    device: &B::Device,
) -> Param<Tensor<B, 2>> {
    kaiming_fan_in(shape, shape[0], device)
}

/// Kaiming-uniform with a = √5 for any shape and an explicit fan-in: `U(-1/√fan_in, 1/√fan_in)`.
pub(crate) fn kaiming_fan_in<B: Backend, const D: usize>(
    shape: [usize; D],
    fan_in: usize,
    device: &B::Device,
) -> Param<Tensor<B, D>> {
    eager(
        Initializer::KaimingUniform {
            gain: 1.0 / 3f64.sqrt(),
            fan_out_only: false,
        }
        .init_with(shape, Some(fan_in), None, device),
    )
}

/// A zero parameter of any rank (factors, biases).
pub(crate) fn zero_factor<B: Backend, const D: usize>(
    shape: [usize; D],
    device: &B::Device,
) -> Param<Tensor<B, D>> {
    eager(Initializer::Zeros.init(shape, device))
}

/// A parameter filled with `value`.
pub(crate) fn const_param<B: Backend, const D: usize>(
    shape: [usize; D],
    value: f64,
    device: &B::Device,
) -> Param<Tensor<B, D>> {
    eager(Initializer::Constant { value }.init(shape, device))
}

/// Burn's params are lazy, and every clone of a lazy param made before its first use re-runs
/// the initializer, so two clones of a fresh adapter would differ. Initialize now: the param
/// keeps its trainable flag (also on a non-autodiff backend later moved with `.train()`).
pub(crate) fn eager<B: Backend, const D: usize>(p: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
    let _ = p.val();
    p
}

/// A factor from Normal(0, 1/√d_in), the paper's alternative initialisation.
pub(crate) fn normal_factor<B: Backend>(
    shape: [usize; 2],
    d_in: usize,
    device: &B::Device,
) -> Param<Tensor<B, 2>> {
    eager(
        Initializer::Normal {
            mean: 0.0,
            std: 1.0 / (d_in as f64).sqrt(),
        }
        .init(shape, device),
    )
}

/// Initialises a chain of factors: `first` for the leading ones and `last` for the final one
/// under [`FactorInit::KaimingZero`]; the reverse roles under `ZeroKaiming`.
pub(crate) fn init_factors<B: Backend>(
    init: FactorInit,
    shapes: &[[usize; 2]],
    d_in: usize,
    device: &B::Device,
) -> Vec<Param<Tensor<B, 2>>> {
    let last = shapes.len() - 1;
    shapes
        .iter()
        .enumerate()
        .map(|(i, &s)| match init {
            FactorInit::KaimingZero if i == last => zero_factor(s, device),
            FactorInit::KaimingZero => kaiming_factor(s, device),
            FactorInit::ZeroKaiming if i == 0 => zero_factor(s, device),
            FactorInit::ZeroKaiming => kaiming_factor(s, device),
            FactorInit::Normal => normal_factor(s, d_in, device),
        })
        .collect()
}

/// A trainable parameter from a given tensor (loading, PEFT import, tests).
pub(crate) fn factor_from_tensor<B: Backend>(t: Tensor<B, 2>) -> Param<Tensor<B, 2>> {
    trainable_param(ParamId::new(), t, true)
}

/// A parameter holding `t`, trainable or not. Built as an (immediately initialised) lazy param
/// so that its trainable flag survives a move to the autodiff backend with `.train()`, also
/// when built on a plain backend.
pub(crate) fn trainable_param<B: Backend, const D: usize>(
    id: ParamId,
    t: Tensor<B, D>,
    trainable: bool,
) -> Param<Tensor<B, D>> {
    let device = t.device();
    let shape = t.shape();
    let t = t.detach();
    eager(Param::uninitialized(
        id,
        move |dev, require_grad| t.clone().to_device(dev).set_require_grad(require_grad),
        device,
        trainable,
        shape,
    ))
}

/// Replaces a parameter's value, keeping its id and whether it trains.
pub(crate) fn replace_value<B: Backend>(
    p: &Param<Tensor<B, 2>>,
    v: Tensor<B, 2>,
) -> Param<Tensor<B, 2>> {
    let device = p.device();
    let trainable = !B::ad_enabled(&device) || p.val().is_require_grad();
    trainable_param(p.id, v.to_device(&device), trainable)
}

/// The scale of a rank-`r` adapter: an explicit `scale`, else `alpha / r` with `alpha`
/// defaulting to `r` (scale 1, as the KronA paper sets it for LoRA and KronA).
pub(crate) fn rank_scale(
    layer: &str,
    rank: usize,
    alpha: Option<f64>,
    scale: Option<f64>,
) -> Result<f64, AdapterError> {
    if let Some(a) = alpha {
        check_finite(layer, "alpha", a)?;
    }
    let s = match scale {
        Some(s) => s,
        None => alpha.unwrap_or(rank as f64) / rank as f64,
    };
    check_finite(layer, "scale", s)?;
    Ok(s)
}

pub(crate) fn check_finite(layer: &str, field: &str, v: f64) -> Result<(), AdapterError> {
    if v.is_finite() {
        Ok(())
    } else {
        Err(AdapterError::config(
            layer,
            field,
            format!("{v} is not a finite number"),
        ))
    }
}

/// Checks that a given factor tensor has the expected shape.
pub(crate) fn check_factor_shape(
    layer: &str,
    name: &str,
    got: [usize; 2],
    want: [usize; 2],
) -> Result<(), AdapterError> {
    if got == want {
        Ok(())
    } else {
        Err(AdapterError::config(
            layer,
            name,
            format!("factor `{name}` is {got:?} but must be {want:?} for this layer"),
        ))
    }
}

pub(crate) fn one() -> f64 {
    1.0
}

pub(crate) fn minus_one() -> i64 {
    -1
}
