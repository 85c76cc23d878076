//! Adapters that add a trainable `ΔW` to a frozen `Linear`: LoRA, KronA and Kron-LoRA.
//!
//! Each method lives in one file and declares itself once there, in its [`MethodConfig`]
//! implementation: its [`MethodInfo`] (name, file key, factor names, formula), the shapes its
//! factors may take, its parameter count and how it initialises. Its module implements
//! [`LinearAdapter`], the one surface that [`crate::AdaptedLinear`], placement, the file formats
//! and quantization rely on. The list of methods is written once, in the `linear_methods!`
//! invocation below, which derives [`Method`], [`Adapter`] and [`AdapterConfig`] from it.

mod kron_lora;
mod krona;
mod lora;
pub mod shape;

pub use kron_lora::{KronLora, KronLoraConfig};
pub use krona::{KronA, KronAConfig};
pub use lora::{Lora, LoraConfig};

use burn::module::{Initializer, Module, Param, ParamId};
use burn::tensor::{backend::Backend, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::ConfigError;

/// What a method declares about itself, once, beside its type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MethodInfo {
    /// Its name in text and in JSON configs (`"KronA"`).
    pub name: &'static str,
    /// Its key in adapter files and on the command line (`"krona"`).
    pub key: &'static str,
    /// Its factors' names, in order (tensor names in adapter files).
    pub factors: &'static [&'static str],
    /// `ΔW` in the factors' names.
    pub formula: &'static str,
}

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

/// A resolved description of one adapter: method, layer size, factor shapes (Burn layout) and
/// scale. Written into adapter files and compared when loading them; [`AdapterSpec::validate`]
/// checks that it describes an adapter that can exist.
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

/// The largest `|scale|` a file may declare: beyond it no trained adapter lies, only a corrupt
/// or hostile file (and `f32` products would overflow).
pub const MAX_SCALE: f64 = 1e6;

/// The most elements `ΔW` may have (`d_in · d_out`): a 2³⁴-element layer is far beyond any
/// model, and a file that claims one would make `merge` allocate it.
pub const MAX_DELTA_ELEMENTS: u128 = 1 << 34;

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
            Method::KronA => None,
        }
    }

    /// The factor shapes, in order.
    pub fn shapes(&self) -> Vec<[usize; 2]> {
        self.factors.iter().map(|(_, s)| *s).collect()
    }

    /// Checks that this spec describes an adapter that can exist: the method's factor names in
    /// order, non-empty shapes that chain as the method requires and multiply out to
    /// `[d_in, d_out]` (no larger than [`MAX_DELTA_ELEMENTS`]), and a finite scale no larger than
    /// [`MAX_SCALE`]. `layer` names it in the error. Every reader of adapter files calls it
    /// before anything is built from the spec.
    pub fn validate(&self, layer: &str) -> Result<(), ConfigError> {
        let info = self.method.info();
        let names: Vec<&str> = self.factors.iter().map(|(n, _)| n.as_str()).collect();
        if names != info.factors {
            return Err(ConfigError::invalid(
                layer,
                "factors",
                format!(
                    "{} has factors {:?}, the file lists {names:?}",
                    info.name, info.factors
                ),
            ));
        }
        if !(self.scale.is_finite() && self.scale.abs() <= MAX_SCALE) {
            return Err(ConfigError::invalid(
                layer,
                "scale",
                format!(
                    "{} is not a usable scale (finite, |s| ≤ {MAX_SCALE:e})",
                    self.scale
                ),
            ));
        }
        let shapes = self.shapes();
        if shapes.iter().flatten().any(|&d| d == 0) {
            return Err(ConfigError::invalid(
                layer,
                "factors",
                format!("empty factor shape in {:?}", self.factors),
            ));
        }
        let (d_in, d_out) = self.method.check_shapes(&shapes).map_err(|e| e.at(layer))?;
        if (d_in, d_out) != (self.d_in, self.d_out) {
            return Err(ConfigError::invalid(
                layer,
                "d_in/d_out",
                format!(
                    "the factors {:?} make a [{d_in}, {d_out}] update but the spec says [{}, {}]",
                    self.factors, self.d_in, self.d_out
                ),
            ));
        }
        if d_in as u128 * d_out as u128 > MAX_DELTA_ELEMENTS {
            return Err(ConfigError::invalid(
                layer,
                "d_in/d_out",
                format!("a [{d_in}, {d_out}] layer is beyond any model (more than 2^34 weights)"),
            ));
        }
        Ok(())
    }
}

/// The surface every linear adapter's module offers.
pub trait LinearAdapter<B: Backend>: Sized {
    /// The scale `s` in `ΔW = s · …`.
    fn scale(&self) -> f64;
    /// Which method this is.
    fn method(&self) -> Method;
    /// The adapter's contribution `x·ΔW` (scale included), computed from the factors without
    /// building `ΔW`.
    ///
    /// # Shapes
    /// - `x`: `[..., d_in]`
    /// - output: `[..., d_out]`
    fn apply<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D>;
    /// `apply(x) + y`: the adapter's contribution added to `y` (the adapted layer's frozen
    /// product), in that order, so that autodiff sees the same graph. A method may compute it
    /// without a tensor for its contribution: on burn-flex in inference LoRA adds `(x·down)·up`
    /// into `y`'s buffer, and the Kronecker adapters their last step
    /// ([`crate::kron::kron_apply_add`], the same result bit for bit).
    ///
    /// # Shapes
    /// - `x`: `[..., d_in]`
    /// - `y`, output: `[..., d_out]`
    fn apply_add<const D: usize>(&self, x: Tensor<B, D>, y: Tensor<B, D>) -> Tensor<B, D> {
        self.apply(x) + y
    }
    /// `ΔW`, materialized, scale included (for merging and export only).
    ///
    /// # Shapes
    /// - output: `[d_in, d_out]`
    fn delta_weight(&self) -> Tensor<B, 2>;
    /// The factors, in the order of the method's [`MethodInfo::factors`].
    fn factors(&self) -> Vec<Tensor<B, 2>>;
    /// The same adapter with new factor values (same order and shapes as [`Self::factors`]),
    /// keeping parameter ids and whether each trains.
    fn with_factors(self, values: Vec<Tensor<B, 2>>) -> Self;
    /// An adapter from factor values in the method's order (trainable) and a scale, checked:
    /// the shapes must chain as [`MethodConfig::check_shapes`] requires and the scale be finite.
    /// (Each method also has a typed `from_factors`.)
    fn from_values(values: Vec<Tensor<B, 2>>, scale: f64) -> Result<Self, ConfigError>;

    /// `(d_in, d_out)` of the adapted layer, from the factor shapes.
    fn dims(&self) -> (usize, usize) {
        let shapes: Vec<[usize; 2]> = self.factors().iter().map(|t| t.dims()).collect();
        self.method()
            .check_shapes(&shapes)
            .expect("an adapter's factors are checked when it is built")
    }

    /// Input size `d_in` of the adapted layer.
    fn d_in(&self) -> usize {
        self.dims().0
    }

    /// Output size `d_out` of the adapted layer.
    fn d_out(&self) -> usize {
        self.dims().1
    }

    /// A description of this adapter.
    fn spec(&self) -> AdapterSpec {
        let info = self.method().info();
        AdapterSpec {
            method: self.method(),
            d_in: self.d_in(),
            d_out: self.d_out(),
            factors: info
                .factors
                .iter()
                .zip(self.factors())
                .map(|(n, t)| (n.to_string(), t.dims()))
                .collect(),
            scale: self.scale(),
        }
    }
}

/// What each method's configuration provides: the method's declaration and how to build it.
pub trait MethodConfig {
    /// The method's module.
    type Adapter<B: Backend>: LinearAdapter<B>;
    /// The method's declaration.
    const INFO: MethodInfo;
    /// The `(d_in, d_out)` that factors of these shapes (in the method's order) make, or why
    /// they cannot be this method's factors.
    fn check_shapes(shapes: &[[usize; 2]]) -> Result<(usize, usize), ConfigError>;
    /// Trainable parameters for a `[d_in, d_out]` layer.
    fn num_params(&self, d_in: usize, d_out: usize) -> Result<usize, ConfigError>;
    /// Builds the adapter for a `[d_in, d_out]` layer.
    fn init<B: Backend>(
        &self,
        d_in: usize,
        d_out: usize,
        device: &B::Device,
    ) -> Result<Self::Adapter<B>, ConfigError>;
}

/// A method's factor shapes as an array of its factor count, or an error naming the count.
pub(crate) fn exact_shapes<const N: usize>(
    info: &MethodInfo,
    shapes: &[[usize; 2]],
) -> Result<[[usize; 2]; N], ConfigError> {
    <[[usize; 2]; N]>::try_from(shapes).map_err(|_| {
        ConfigError::invalid(
            "adapter",
            "factors",
            format!(
                "{} has {} factors ({:?}), {} given",
                info.name,
                info.factors.len(),
                info.factors,
                shapes.len()
            ),
        )
    })
}

/// Adds the fields of a rank-scaled method (`alpha`, `scale`: `scale = alpha / rank` unless
/// given) to a config declared with `$via!` (`config!` or `kron_config!`), and
/// `rank_scale(layer)`, the scale they give.
macro_rules! rank_config {
    (
        $via:ident!
        $(#[$meta:meta])*
        pub struct $name:ident($ctor:ident) {
            required { $($req:tt)* }
            optional { $($opt:tt)* }
            defaults { $($def:tt)* }
        }
    ) => {
        $via! {
            $(#[$meta])*
            pub struct $name($ctor) {
                required { $($req)* }
                optional {
                    /// `alpha` in `scale = alpha / rank`; without it `alpha = rank` (scale 1,
                    /// as the KronA paper sets it).
                    alpha: f64,
                    /// An explicit scale, overriding `alpha / rank`.
                    scale: f64,
                    $($opt)*
                }
                defaults { $($def)* }
            }
        }

        impl $name {
            /// The scale: `scale`, else `alpha / rank` (`alpha` defaults to `rank`).
            fn rank_scale(&self, layer: &str) -> Result<f64, ConfigError> {
                $crate::adapter::rank_scale(layer, self.rank, self.alpha, self.scale)
            }
        }
    };
}
pub(crate) use rank_config;

/// Derives, from the one list of linear methods, [`Method`], [`Adapter`] (the module enum),
/// [`AdapterConfig`] (the config enum) and every dispatch between them.
macro_rules! linear_methods {
    ($($variant:ident => $module:ident, $config:ident;)+) => {
        /// Which method an adapter implements.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum Method {
            $(
                #[doc = concat!("See [`", stringify!($module), "`].")]
                $variant,
            )+
        }

        impl Method {
            /// Every linear method.
            pub const ALL: &'static [Method] = &[$(Method::$variant),+];

            /// The method's declaration.
            pub fn info(self) -> MethodInfo {
                match self {
                    $(Method::$variant => <$config as MethodConfig>::INFO,)+
                }
            }

            /// The `(d_in, d_out)` that factors of these shapes make for this method.
            pub fn check_shapes(self, shapes: &[[usize; 2]]) -> Result<(usize, usize), ConfigError> {
                match self {
                    $(Method::$variant => <$config as MethodConfig>::check_shapes(shapes),)+
                }
            }
        }

        /// One adapter of any method, as stored in an [`crate::AdaptedLinear`].
        #[derive(Module, Debug)]
        #[allow(clippy::large_enum_variant)]
        pub enum Adapter<B: Backend> {
            $(
                #[doc = concat!("See [`", stringify!($module), "`].")]
                $variant($module<B>),
            )+
        }

        impl<B: Backend> LinearAdapter<B> for Adapter<B> {
            fn scale(&self) -> f64 {
                match self { $(Adapter::$variant(a) => a.scale(),)+ }
            }
            fn method(&self) -> Method {
                match self { $(Adapter::$variant(_) => Method::$variant,)+ }
            }
            fn apply<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
                match self { $(Adapter::$variant(a) => a.apply(x),)+ }
            }
            fn apply_add<const D: usize>(&self, x: Tensor<B, D>, y: Tensor<B, D>) -> Tensor<B, D> {
                match self { $(Adapter::$variant(a) => a.apply_add(x, y),)+ }
            }
            fn delta_weight(&self) -> Tensor<B, 2> {
                match self { $(Adapter::$variant(a) => a.delta_weight(),)+ }
            }
            fn factors(&self) -> Vec<Tensor<B, 2>> {
                match self { $(Adapter::$variant(a) => a.factors(),)+ }
            }
            fn with_factors(self, values: Vec<Tensor<B, 2>>) -> Self {
                match self { $(Adapter::$variant(a) => Adapter::$variant(a.with_factors(values)),)+ }
            }
            /// Not meaningful for the enum (it does not know the method): use
            /// [`Adapter::from_spec`].
            fn from_values(_: Vec<Tensor<B, 2>>, _: f64) -> Result<Self, ConfigError> {
                Err(ConfigError::invalid(
                    "adapter",
                    "method",
                    "Adapter::from_values cannot tell the method: use Adapter::from_spec",
                ))
            }
        }

        impl<B: Backend> Adapter<B> {
            /// Builds an adapter of `spec`'s method from factor values in spec order (Burn
            /// layout), trainable, with `spec`'s scale and the cheapest contraction order. The
            /// spec is validated and the values must have its shapes.
            pub fn from_spec(spec: &AdapterSpec, factors: Vec<Tensor<B, 2>>) -> Result<Self, ConfigError> {
                let layer = layer_name(spec.d_in, spec.d_out);
                spec.validate(&layer)?;
                let got: Vec<[usize; 2]> = factors.iter().map(|t| t.dims()).collect();
                if got != spec.shapes() {
                    return Err(ConfigError::invalid(
                        layer,
                        "factors",
                        format!("the values have shapes {got:?}, the spec {:?}", spec.shapes()),
                    ));
                }
                Ok(match spec.method {
                    $(Method::$variant => Adapter::$variant($module::from_values(factors, spec.scale)?),)+
                })
            }
        }

        /// Which adapter to put on a `Linear`, and how. Serializes to JSON with a `method` tag
        /// holding the method's name (its key or the variant name are accepted too):
        /// `{"method": "KronA", "a_shape": [32, 24], "b_shape": [24, 32]}`.
        #[derive(Clone, Debug, PartialEq)]
        pub enum AdapterConfig {
            $(
                #[doc = concat!("See [`", stringify!($config), "`].")]
                $variant($config),
            )+
        }

        impl AdapterConfig {
            /// The method.
            pub fn method(&self) -> Method {
                match self { $(AdapterConfig::$variant(_) => Method::$variant,)+ }
            }

            /// Builds the adapter for a `[d_in, d_out]` layer.
            pub fn init<B: Backend>(
                &self,
                d_in: usize,
                d_out: usize,
                device: &B::Device,
            ) -> Result<Adapter<B>, ConfigError> {
                Ok(match self {
                    $(AdapterConfig::$variant(c) => Adapter::$variant(c.init(d_in, d_out, device)?),)+
                })
            }

            /// Trainable parameters for a `[d_in, d_out]` layer.
            pub fn num_params(&self, d_in: usize, d_out: usize) -> Result<usize, ConfigError> {
                match self { $(AdapterConfig::$variant(c) => c.num_params(d_in, d_out),)+ }
            }

            fn to_json(&self) -> Result<serde_json::Value, serde_json::Error> {
                match self { $(AdapterConfig::$variant(c) => serde_json::to_value(c),)+ }
            }

            fn from_json(method: Method, v: serde_json::Value) -> Result<Self, serde_json::Error> {
                Ok(match method {
                    $(Method::$variant => AdapterConfig::$variant(serde_json::from_value(v)?),)+
                })
            }
        }
    };
}

linear_methods! {
    Lora => Lora, LoraConfig;
    KronA => KronA, KronAConfig;
    KronLora => KronLora, KronLoraConfig;
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.info().name)
    }
}

/// `"kron-lora"`, `"Kron_LoRA"` and `"KronLora"` all read as `kronlora`.
fn normalize(s: &str) -> String {
    s.chars()
        .filter(|c| *c != '-' && *c != '_')
        .flat_map(char::to_lowercase)
        .collect()
}

impl std::str::FromStr for Method {
    type Err = ConfigError;

    /// A method by its key (`krona`, `kron_lora`), its name (`Kron-LoRA`) or its variant name,
    /// case, `-` and `_` ignored.
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let n = normalize(s);
        Method::ALL
            .iter()
            .copied()
            .find(|m| {
                let info = m.info();
                [info.key, info.name, &format!("{m:?}")]
                    .iter()
                    .any(|x| normalize(x) == n)
            })
            .ok_or_else(|| {
                ConfigError::invalid(
                    "config",
                    "method",
                    format!(
                        "{s:?} is not a linear adapter method; use one of {:?}",
                        Method::ALL.iter().map(|m| m.info().key).collect::<Vec<_>>()
                    ),
                )
            })
    }
}

impl Serialize for Method {
    /// As its key (`"krona"`), the form adapter files have always used.
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.info().key)
    }
}

impl<'de> Deserialize<'de> for Method {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl Serialize for AdapterConfig {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut v = self.to_json().map_err(serde::ser::Error::custom)?;
        if let Some(obj) = v.as_object_mut() {
            obj.insert("method".into(), self.method().info().name.into());
        }
        v.serialize(s)
    }
}

impl<'de> Deserialize<'de> for AdapterConfig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let mut v = serde_json::Value::deserialize(d)?;
        let obj = v
            .as_object_mut()
            .ok_or_else(|| D::Error::custom("an adapter config is a JSON object"))?;
        let tag = obj
            .remove("method")
            .ok_or_else(|| D::Error::missing_field("method"))?;
        let tag = tag
            .as_str()
            .ok_or_else(|| D::Error::custom("`method` is a string"))?;
        let method: Method = tag.parse().map_err(D::Error::custom)?;
        AdapterConfig::from_json(method, v).map_err(D::Error::custom)
    }
}

impl burn::config::Config for AdapterConfig {}

/// The layer name in errors before placement names it with its path (`Linear[768→768]`).
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
fn normal_factor<B: Backend>(
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

/// Trainable parameters holding given values (loading, PEFT import), after checking them
/// against `M`'s shapes and the scale; returns the params and the `(d_in, d_out)` they make.
pub(crate) fn checked_factors<M: MethodConfig, B: Backend>(
    values: Vec<Tensor<B, 2>>,
    scale: f64,
) -> Result<Vec<Param<Tensor<B, 2>>>, ConfigError> {
    let shapes: Vec<[usize; 2]> = values.iter().map(|t| t.dims()).collect();
    let (d_in, d_out) = M::check_shapes(&shapes)?;
    let layer = layer_name(d_in, d_out);
    check_finite(&layer, "scale", scale)?;
    if shapes.iter().flatten().any(|&d| d == 0) {
        return Err(ConfigError::invalid(
            layer,
            "factors",
            format!("empty factor shape in {shapes:?}"),
        ));
    }
    Ok(values
        .into_iter()
        .map(|t| trainable_param(ParamId::new(), t, true))
        .collect())
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

/// Replaces the values of a list of parameters, keeping their ids and whether each trains.
pub(crate) fn replace_values<B: Backend>(
    params: Vec<&mut Param<Tensor<B, 2>>>,
    values: Vec<Tensor<B, 2>>,
) {
    assert_eq!(params.len(), values.len(), "one value per factor");
    for (p, v) in params.into_iter().zip(values) {
        let device = p.device();
        let trainable = !B::ad_enabled(&device) || p.val().is_require_grad();
        *p = trainable_param(p.id, v.to_device(&device), trainable);
    }
}

/// The scale of a rank-`r` adapter: an explicit `scale`, else `alpha / r` with `alpha`
/// defaulting to `r` (scale 1, as the KronA paper sets it for LoRA and KronA).
pub(crate) fn rank_scale(
    layer: &str,
    rank: usize,
    alpha: Option<f64>,
    scale: Option<f64>,
) -> Result<f64, ConfigError> {
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

pub(crate) fn check_finite(layer: &str, field: &str, v: f64) -> Result<(), ConfigError> {
    if v.is_finite() {
        Ok(())
    } else {
        Err(ConfigError::invalid(
            layer,
            field,
            format!("{v} is not a finite number"),
        ))
    }
}
