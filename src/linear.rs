//! [`AdaptedLinear`] — a frozen `Linear` plus one optional adapter — and [`AdapterLayers`], the
//! one trait a model implements so that placement, adapter files, PEFT and merging find its
//! adapted layers by their full paths.

use burn::module::Module;
use burn::nn::Linear;
use burn::tensor::{backend::Backend, module::linear, Tensor};

use crate::adapter::{layer_name, Adapter, AdapterConfig, AdapterSpec, LinearAdapter};
use crate::error::ConfigError;
use crate::params::ParamCount;
use crate::place::Targets;
use crate::{product, qproduct};

/// `linear.forward(x)` with `x` viewed as rows `[n, d_in]` ([`linear_rows`]).
pub(crate) fn linear_on_rows<B: Backend, const D: usize>(
    linear: &Linear<B>,
    x: Tensor<B, D>,
) -> Tensor<B, D> {
    let bias = linear.bias.as_ref().map(|b| b.val());
    linear_rows(x, linear.weight.val(), bias)
}

/// `x·weight + bias` with `x` viewed as rows `[n, d_in]` (free for a contiguous `x`): Burn's
/// `linear` op, or on flex `crate::product` (the same `gemm` into an output of its own, the bias
/// added in it; under autodiff one node, where the crate's backward is registered).
///
/// Burn 0.21's `linear` op differentiates a 3-D or higher input against the weight broadcast to
/// `[1, .., d_in, d_out]`: the input's gradient reshapes the transposed weight, which copies
/// it (on flex a full copy of every layer's weight, freshly allocated, at every step), and a
/// trainable weight's gradient is built as `[batch, d_in, d_out]` and then summed over the
/// batch. On rows both are one GEMM that reads `weight` where it is.
///
/// # Shapes
/// - `x`: `[..., d_in]`, `weight`: `[d_in, d_out]`, `bias`: `[d_out]`
/// - output: `[..., d_out]`
pub(crate) fn linear_rows<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    weight: Tensor<B, 2>,
    bias: Option<Tensor<B, 1>>,
) -> Tensor<B, D> {
    let mut dims = x.dims();
    let d_in = dims[D - 1];
    let d_out = weight.dims()[1];
    let rows: usize = dims[..D - 1].iter().product();
    if rows == 0 {
        // No rows: an empty output (Burn's reshape reads a 0 as "keep this dimension", so no
        // `[0, d_in]` view, and burn-ndarray's product divides by the row count).
        dims[D - 1] = d_out;
        return Tensor::zeros(dims, &x.device());
    }
    let x: Tensor<B, 2> = x.reshape([rows, d_in]);
    let bias = bias.map(|b| b.reshape([1, d_out]));
    // An int8 weight on flex, read in place; else the operands back.
    let y = match qproduct::product(x, weight, bias) {
        Ok(y) => y,
        Err((x, weight, bias)) if product::takes(&x, &weight, bias.as_ref()) => {
            product::product(x, weight, bias)
        }
        Err((x, weight, bias)) => linear(x, weight, bias.map(|b| b.reshape([d_out]))),
    };
    dims[D - 1] = d_out;
    y.reshape(dims)
}

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
    ) -> Result<Self, ConfigError> {
        let [d_in, d_out] = linear.weight.dims();
        let adapter = config.init(d_in, d_out, device)?;
        Ok(Self {
            base: linear.no_grad(),
            adapter: Some(adapter),
        })
    }

    /// Wraps `linear` (frozen) with an adapter built elsewhere (from PEFT factors, say).
    pub fn with_adapter(linear: Linear<B>, adapter: Adapter<B>) -> Result<Self, ConfigError> {
        let mut layer = Self::frozen(linear);
        layer.set_adapter(adapter)?;
        Ok(layer)
    }

    /// Wraps `linear` (frozen) with no adapter.
    pub fn frozen(linear: Linear<B>) -> Self {
        Self {
            base: linear.no_grad(),
            adapter: None,
        }
    }

    /// Puts `adapter` on this layer (replacing any), after checking it has the layer's size.
    pub fn set_adapter(&mut self, adapter: Adapter<B>) -> Result<(), ConfigError> {
        let (d_in, d_out) = (self.d_in(), self.d_out());
        if adapter.d_in() != d_in || adapter.d_out() != d_out {
            return Err(ConfigError::invalid(
                layer_name(d_in, d_out),
                "adapter",
                format!(
                    "the adapter is [{}, {}] (in, out) but the layer is [{d_in}, {d_out}]",
                    adapter.d_in(),
                    adapter.d_out()
                ),
            ));
        }
        self.adapter = Some(adapter);
        Ok(())
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
    /// - output: `[..., d_out]` (an empty batch, any leading dimension 0, gives an empty output)
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        match &self.adapter {
            // `apply(x) + base(x)`, the adapter's term on the left (the sum is the same either
            // way): Burn's autodiff then runs the base product's backward before the
            // adapter's, and the output gradient the two share is the adapter's alone when it
            // reads it. On burn-flex the host loops of a Kronecker adapter's last `a` step read
            // it without a copy; on the right, a copy of it per layer was 2% of a MiniLM KronA
            // step. The base first, so that in inference the adapter can add into its output.
            // An empty batch (no rows) adds nothing: the base's empty output.
            Some(adapter) if x.shape().num_elements() > 0 => {
                adapter.apply_add(x.clone(), self.base_forward(x))
            }
            _ => self.base_forward(x),
        }
    }

    /// `x·W + b` in the base's own precision: with a half-precision base
    /// ([`AdapterLayers::cast_base`]) `x` is cast to it and the product back to `x`'s, so the
    /// adapter, its gradients and the optimizer stay in `x`'s precision (float32). A quantized
    /// base (int8, [`crate::quant::to_burn_quantized`]) multiplies `x` as it is.
    pub fn base_forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let (xd, wd) = (x.dtype(), self.base.weight.dtype());
        if xd == wd || matches!(wd, burn::tensor::DType::QFloat(_)) {
            linear_on_rows(&self.base, x)
        } else {
            linear_on_rows(&self.base, x.cast(wd)).cast(xd)
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
    /// Refuses, with [`ConfigError::NonFinite`], to produce a weight with NaN or infinite
    /// values (PEFT's `safe_merge`). This is the crate's one merge: merging into a checkpoint
    /// file and into a quantized base go through it. A base held as a Burn quantized tensor
    /// (an int8-loaded model) gives a float32 weight.
    pub fn merge(&self) -> Result<Linear<B>, ConfigError> {
        let Some(adapter) = &self.adapter else {
            return Ok(self.base.clone());
        };
        // A quantized base merges into float32: its grid's values plus ΔW
        // (`quant::merge_quantized` quantizes the sum again).
        let weight = crate::quant::float_values(self.base.weight.val());
        let dtype = weight.dtype();
        let merged = weight + adapter.delta_weight().cast(dtype);
        let bad = merged
            .clone()
            .is_finite()
            .bool_not()
            .int()
            .sum()
            .into_scalar();
        let count: i64 = burn::tensor::ElementConversion::elem(bad);
        if count > 0 {
            return Err(ConfigError::NonFinite {
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

/// A model whose adapted linear layers can be visited by their full paths — the only thing the
/// generic placement ([`crate::place`](mod@crate::place)), adapter files, PEFT import/export and
/// merging need to know about a model (as PEFT's `inject_adapter` needs only `named_modules`).
///
/// Implement it with [`adapter_layers!`](crate::adapter_layers), naming each field's path
/// segment; `Vec`s number their items, `Option`s pass through. Paths follow Hugging Face's
/// module names (`encoder.layer.0.attention.self.query`, `model.layers.0.self_attn.q_proj`), so
/// PEFT `target_modules` and adapter files work unchanged.
pub trait AdapterLayers<B: Backend> {
    /// Calls `f` with every adapted linear layer under `prefix`, and its full path.
    fn visit_adapted<'a>(&'a self, prefix: &str, f: &mut dyn FnMut(String, &'a AdaptedLinear<B>));

    /// The same, mutably.
    fn visit_adapted_mut<'a>(
        &'a mut self,
        prefix: &str,
        f: &mut dyn FnMut(String, &'a mut AdaptedLinear<B>),
    );

    /// The layers a placement targets when it names none (PEFT's per-model defaults); `None`:
    /// every adapted layer.
    fn default_targets(&self) -> Option<Targets> {
        None
    }

    /// Casts every adapted layer's frozen base (weight and bias) to `dtype` — half precision
    /// halves the frozen weights' memory — leaving the adapters, and everything else in the
    /// model, as they are. Forward passes then run each base product in `dtype`
    /// ([`AdaptedLinear::base_forward`]). Backends without the dtype (burn-ndarray has no
    /// f16) fail at the cast.
    fn cast_base(mut self, dtype: burn::tensor::FloatDType) -> Self
    where
        Self: Sized,
    {
        for (_, l) in self.adapter_layers_mut() {
            l.base.weight = l.base.weight.clone().map(|w| w.cast(dtype));
            if let Some(b) = l.base.bias.take() {
                l.base.bias = Some(b.map(|b| b.cast(dtype)));
            }
        }
        self
    }

    /// Every adapted linear layer, with its path.
    fn adapter_layers(&self) -> Vec<(String, &AdaptedLinear<B>)> {
        let mut out = Vec::new();
        self.visit_adapted("", &mut |p, l| out.push((p, l)));
        out
    }

    /// The same, mutably.
    fn adapter_layers_mut(&mut self) -> Vec<(String, &mut AdaptedLinear<B>)> {
        let mut out = Vec::new();
        self.visit_adapted_mut("", &mut |p, l| out.push((p, l)));
        out
    }

    /// The layers that have an adapter, and its spec.
    fn adapter_specs(&self) -> Vec<(String, AdapterSpec)> {
        self.adapter_layers()
            .into_iter()
            .filter_map(|(name, l)| l.spec().map(|s| (name, s)))
            .collect()
    }

    /// Merges every linear adapter into its base weight (see [`AdaptedLinear::merge`]); errors
    /// name the layer's path.
    fn merge_adapters(mut self) -> Result<Self, ConfigError>
    where
        Self: Sized,
    {
        for (path, layer) in self.adapter_layers_mut() {
            if layer.adapter.is_some() {
                *layer = AdaptedLinear::frozen(layer.merge().map_err(|e| e.at(&path))?);
            }
        }
        Ok(self)
    }
}

/// `prefix.segment`, or either alone when the other is empty.
pub fn join_path(prefix: &str, segment: &str) -> String {
    match (prefix.is_empty(), segment.is_empty()) {
        (true, _) => segment.to_string(),
        (_, true) => prefix.to_string(),
        _ => format!("{prefix}.{segment}"),
    }
}

impl<B: Backend> AdapterLayers<B> for AdaptedLinear<B> {
    fn visit_adapted<'a>(&'a self, prefix: &str, f: &mut dyn FnMut(String, &'a AdaptedLinear<B>)) {
        f(prefix.to_string(), self)
    }

    fn visit_adapted_mut<'a>(
        &'a mut self,
        prefix: &str,
        f: &mut dyn FnMut(String, &'a mut AdaptedLinear<B>),
    ) {
        f(prefix.to_string(), self)
    }
}

impl<B: Backend, T: AdapterLayers<B>> AdapterLayers<B> for Vec<T> {
    fn visit_adapted<'a>(&'a self, prefix: &str, f: &mut dyn FnMut(String, &'a AdaptedLinear<B>)) {
        for (i, item) in self.iter().enumerate() {
            item.visit_adapted(&join_path(prefix, &i.to_string()), f);
        }
    }

    fn visit_adapted_mut<'a>(
        &'a mut self,
        prefix: &str,
        f: &mut dyn FnMut(String, &'a mut AdaptedLinear<B>),
    ) {
        for (i, item) in self.iter_mut().enumerate() {
            item.visit_adapted_mut(&join_path(prefix, &i.to_string()), f);
        }
    }
}

impl<B: Backend, T: AdapterLayers<B>> AdapterLayers<B> for Option<T> {
    fn visit_adapted<'a>(&'a self, prefix: &str, f: &mut dyn FnMut(String, &'a AdaptedLinear<B>)) {
        if let Some(item) = self {
            item.visit_adapted(prefix, f);
        }
    }

    fn visit_adapted_mut<'a>(
        &'a mut self,
        prefix: &str,
        f: &mut dyn FnMut(String, &'a mut AdaptedLinear<B>),
    ) {
        if let Some(item) = self {
            item.visit_adapted_mut(prefix, f);
        }
    }
}

/// Implements [`AdapterLayers`] for a model struct generic over `B: Backend` by listing its
/// fields that hold adapted layers (an [`AdaptedLinear`], a `Vec` or `Option` of them, or any
/// other type implementing the trait), each with the path segment it adds; optionally the
/// model's default targets.
///
/// ```
/// use burn::module::Module;
/// use burn::tensor::backend::Backend;
/// use kron_adapters::{adapter_layers, AdaptedLinear, Targets};
///
/// #[derive(Module, Debug)]
/// pub struct Mlp<B: Backend> {
///     pub up: AdaptedLinear<B>,
///     pub down: AdaptedLinear<B>,
/// }
/// adapter_layers!(Mlp { up => "up_proj", down => "down_proj" });
///
/// #[derive(Module, Debug)]
/// pub struct Net<B: Backend> {
///     pub blocks: Vec<Mlp<B>>,
/// }
/// adapter_layers!(Net { blocks => "layers" } defaults Targets::list(["up_proj"]));
/// // Paths: layers.0.up_proj, layers.0.down_proj, layers.1.up_proj, ...
/// ```
#[macro_export]
macro_rules! adapter_layers {
    ($ty:ident { $($field:ident => $segment:expr),* $(,)? } $(defaults $targets:expr)?) => {
        impl<B: burn::tensor::backend::Backend> $crate::AdapterLayers<B> for $ty<B> {
            fn visit_adapted<'a>(
                &'a self,
                prefix: &str,
                f: &mut dyn FnMut(String, &'a $crate::AdaptedLinear<B>),
            ) {
                $(
                    $crate::AdapterLayers::<B>::visit_adapted(
                        &self.$field,
                        &$crate::linear::join_path(prefix, $segment),
                        f,
                    );
                )*
            }

            fn visit_adapted_mut<'a>(
                &'a mut self,
                prefix: &str,
                f: &mut dyn FnMut(String, &'a mut $crate::AdaptedLinear<B>),
            ) {
                $(
                    $crate::AdapterLayers::<B>::visit_adapted_mut(
                        &mut self.$field,
                        &$crate::linear::join_path(prefix, $segment),
                        f,
                    );
                )*
            }

            $(
                fn default_targets(&self) -> Option<$crate::Targets> {
                    Some($targets)
                }
            )?
        }
    };
}
