//! Quantization math and module passes: adapter factors to symmetric int8 or int4 (per tensor,
//! per block, per output channel) with their scales, frozen base weights on the quantization
//! grid, merging into a quantized base, and Burn's own quantized tensors for deployment. The
//! quantized adapter file is a format like the others: [`crate::store::QuantizedAdapters`].
//!
//! For a group of values `x` (the whole tensor, a block of `n` consecutive values, or one output
//! channel) with `qmax = 127` (int8) or `7` (int4):
//!
//! ```text
//! scale = max|x| / qmax           (0 for an all-zero group)
//! q     = clamp(round(x / scale), -qmax, qmax)     round half away from zero
//! x̂     = q · scale               so |x − x̂| ≤ scale / 2
//! ```
//!
//! The adapter quantizer is a portable implementation on the host: the same numbers on every
//! backend and for every scheme (Burn 0.21's own quantization covers 8-bit only on the CPU
//! backends and has no per-channel level). Blocks run over the row-major values; when the size
//! is not a multiple of the block, the last block is shorter (as if padded with zeros, which
//! change no maximum). Output channels are the columns of a factor in Burn's `[in, out]`
//! layout.

use burn::tensor::backend::{Backend, DTypeUsage};
use burn::tensor::quantization::{QuantLevel, QuantScheme, QuantStore, QuantValue};
use burn::tensor::{DType, Tensor, TensorPrimitive};
use serde::{Deserialize, Serialize};

use crate::error::{AdapterError, ConfigError};
use crate::linear::AdaptedLinear;
use crate::store::{HostTensor, NativeAdapters};

/// How values are grouped under one scale.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Level {
    /// One scale for the whole tensor.
    Tensor,
    /// One scale per block of this many consecutive (row-major) values.
    Block(usize),
    /// One scale per output channel (column of an `[in, out]` factor).
    Channel,
}

impl std::fmt::Display for Level {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Level::Tensor => f.write_str("tensor"),
            Level::Block(n) => write!(f, "block:{n}"),
            Level::Channel => f.write_str("channel"),
        }
    }
}

impl std::str::FromStr for Level {
    type Err = ConfigError;
    /// `tensor`, `block:N` or `channel`.
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let bad = || {
            ConfigError::invalid(
                "quantization",
                "level",
                format!("{s:?}: use tensor, block:N (N ≥ 1) or channel"),
            )
        };
        match s {
            "tensor" => Ok(Level::Tensor),
            "channel" => Ok(Level::Channel),
            _ => {
                let n: usize = s
                    .strip_prefix("block:")
                    .ok_or_else(bad)?
                    .parse()
                    .map_err(|_| bad())?;
                if n == 0 {
                    return Err(bad());
                }
                Ok(Level::Block(n))
            }
        }
    }
}

/// A quantization scheme: bits (8 or 4) and level.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuantConfig {
    /// 8 or 4.
    pub bits: u8,
    /// How values share scales.
    pub level: Level,
}

impl QuantConfig {
    /// A checked scheme.
    pub fn new(bits: u8, level: Level) -> Result<Self, ConfigError> {
        if bits != 8 && bits != 4 {
            return Err(ConfigError::invalid(
                "quantization",
                "bits",
                format!("{bits}: use 8 or 4"),
            ));
        }
        if level == Level::Block(0) {
            return Err(ConfigError::invalid(
                "quantization",
                "level",
                "block size 0",
            ));
        }
        Ok(Self { bits, level })
    }

    /// The largest magnitude of a quantized value: 127 or 7.
    pub fn qmax(&self) -> i32 {
        if self.bits == 8 {
            127
        } else {
            7
        }
    }

    /// Burn's equivalent scheme (symmetric Q8S/Q4S, per tensor or per block along the last
    /// axis) for a tensor of `shape` on `device`, when Burn has one: none for per-channel scales,
    /// blocks that do not divide the rows, or a scheme the device cannot store (4-bit on Burn's
    /// CPU backends). 8-bit values are stored as native `i8` where the
    /// device converts to and from `i8` (Burn's CPU backends, CUDA), packed four to a `u32`
    /// otherwise (e.g. a Vulkan device without 8-bit integer support); 4-bit always packed.
    pub fn burn_scheme<B: Backend>(
        &self,
        shape: [usize; 2],
        device: &B::Device,
    ) -> Option<QuantScheme> {
        let level = match self.level {
            Level::Tensor => QuantLevel::Tensor,
            Level::Block(n) if n <= u8::MAX as usize && shape[1].is_multiple_of(n) => {
                QuantLevel::block([n as u8])
            }
            _ => return None,
        };
        let value = if self.bits == 8 {
            QuantValue::Q8S
        } else {
            QuantValue::Q4S
        };
        let packed = QuantScheme::default().with_value(value).with_level(level);
        let native = packed.with_store(QuantStore::Native);
        let stores =
            |scheme| B::dtype_usage(device, DType::QFloat(scheme)).contains(DTypeUsage::Storage);
        if self.bits == 8 && stores(native) {
            Some(native)
        } else if stores(packed) {
            Some(packed)
        } else {
            None
        }
    }
}

impl std::fmt::Display for QuantConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "int{} per {}", self.bits, self.level)
    }
}

/// A quantized 2-D tensor: values and their scales.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantizedTensor {
    /// The shape, `[rows, cols]`.
    pub shape: [usize; 2],
    /// The scheme.
    pub config: QuantConfig,
    /// One value per element, in `[-qmax, qmax]`, row-major.
    pub values: Vec<i8>,
    /// One scale per group.
    pub scales: Vec<f32>,
}

impl QuantizedTensor {
    /// The group of element `i` (row-major).
    fn group(config: QuantConfig, shape: [usize; 2], i: usize) -> usize {
        match config.level {
            Level::Tensor => 0,
            Level::Block(n) => i / n,
            Level::Channel => i % shape[1],
        }
    }

    fn groups(config: QuantConfig, shape: [usize; 2]) -> usize {
        let n = shape[0] * shape[1];
        match config.level {
            Level::Tensor => 1,
            Level::Block(b) => n.div_ceil(b),
            Level::Channel => shape[1],
        }
    }

    /// Quantizes a 2-D tensor; `name` names it in errors. NaN and infinite values are refused.
    pub fn quantize(name: &str, t: &HostTensor, config: QuantConfig) -> Result<Self, ConfigError> {
        if t.shape.len() != 2 {
            return Err(ConfigError::invalid(
                name,
                "shape",
                format!("{:?}: 2-D factors only", t.shape),
            ));
        }
        let shape = [t.shape[0], t.shape[1]];
        let bad = t.data.iter().filter(|v| !v.is_finite()).count();
        if bad > 0 {
            return Err(ConfigError::NonFinite {
                layer: name.to_string(),
                count: bad,
            });
        }
        let qmax = config.qmax();
        let mut amax = vec![0f32; Self::groups(config, shape)];
        for (i, v) in t.data.iter().enumerate() {
            let g = Self::group(config, shape, i);
            amax[g] = amax[g].max(v.abs());
        }
        let scales: Vec<f32> = amax.iter().map(|a| a / qmax as f32).collect();
        let values = t
            .data
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let s = scales[Self::group(config, shape, i)];
                if s == 0.0 {
                    0
                } else {
                    (v / s).round().clamp(-qmax as f32, qmax as f32) as i8
                }
            })
            .collect();
        Ok(Self {
            shape,
            config,
            values,
            scales,
        })
    }

    /// The dequantized values `q · scale`.
    pub fn dequantize(&self) -> HostTensor {
        let data = self
            .values
            .iter()
            .enumerate()
            .map(|(i, q)| *q as f32 * self.scales[Self::group(self.config, self.shape, i)])
            .collect();
        HostTensor {
            shape: self.shape.to_vec(),
            data,
        }
    }

    /// The values as stored: int8 one per byte (two's complement); int4 two per byte, the first
    /// in the low nibble (two's complement nibbles), a last odd value padded with 0.
    pub fn packed(&self) -> Vec<u8> {
        if self.config.bits == 8 {
            return self.values.iter().map(|v| *v as u8).collect();
        }
        self.values
            .chunks(2)
            .map(|pair| {
                let lo = (pair[0] as u8) & 0x0F;
                let hi = pair.get(1).map_or(0, |v| (*v as u8) & 0x0F);
                lo | (hi << 4)
            })
            .collect()
    }

    /// Rebuilds a tensor from stored bytes and scales (checked).
    pub fn from_packed(
        name: &str,
        shape: [usize; 2],
        config: QuantConfig,
        bytes: &[u8],
        scales: Vec<f32>,
    ) -> Result<Self, ConfigError> {
        let n = shape[0] * shape[1];
        let want = if config.bits == 8 { n } else { n.div_ceil(2) };
        let groups = Self::groups(config, shape);
        if bytes.len() != want || scales.len() != groups {
            return Err(ConfigError::invalid(
                name,
                "quantized data",
                format!(
                    "{} bytes and {} scales for a {shape:?} int{} tensor per {}: expected {want} and {groups}",
                    bytes.len(),
                    scales.len(),
                    config.bits,
                    config.level
                ),
            ));
        }
        if scales.iter().any(|s| !s.is_finite() || *s < 0.0) {
            return Err(ConfigError::invalid(
                name,
                "scales",
                "negative or non-finite scale",
            ));
        }
        let values: Vec<i8> = if config.bits == 8 {
            bytes.iter().map(|b| *b as i8).collect()
        } else {
            let nib = |x: u8| ((x << 4) as i8) >> 4; // sign-extend a nibble
            bytes
                .iter()
                .flat_map(|b| [nib(b & 0x0F), nib(b >> 4)])
                .take(n)
                .collect()
        };
        let qmax = config.qmax();
        if values.iter().any(|v| (*v as i32).abs() > qmax) {
            return Err(ConfigError::invalid(
                name,
                "quantized data",
                format!("a value outside ±{qmax}"),
            ));
        }
        Ok(Self {
            shape,
            config,
            values,
            scales,
        })
    }
}

/// `‖ΔW_q − ΔW‖ / ‖ΔW‖` over all layers together, with `delta` computing a layer's `ΔW` from
/// its factors.
pub fn relative_error(
    float: &NativeAdapters,
    quantized: &NativeAdapters,
    delta: impl Fn(&NativeAdapters, &str) -> Result<HostTensor, AdapterError>,
) -> Result<f64, AdapterError> {
    let (mut num, mut den) = (0f64, 0f64);
    for layer in float.meta.layers.keys() {
        let (a, b) = (delta(float, layer)?, delta(quantized, layer)?);
        for (x, y) in a.data.iter().zip(&b.data) {
            num += ((y - x) as f64).powi(2);
            den += (*x as f64).powi(2);
        }
    }
    Ok((num / den.max(1e-300)).sqrt())
}

/// Quantizes the frozen base weight of a layer with `config`, for training adapters on a
/// quantized base (QLoRA-style): the weight becomes the quantization grid's values `q · scale`,
/// so the adapters learn against exactly the base a quantized deployment computes with.
///
/// The weight stays an ordinary (frozen) float tensor in training: Burn 0.21's autodiff backend
/// leaves its quantized-tensor operations unimplemented (calling one panics inside Burn), so no
/// Burn backend can train through a Burn-quantized weight. The saving comes at deployment:
/// [`merge_quantized`] re-quantizes `W + ΔW`, and [`to_burn_quantized`] stores a weight as a
/// Burn quantized tensor on the inference backend.
pub fn quantize_base<B: Backend>(
    mut layer: AdaptedLinear<B>,
    config: QuantConfig,
) -> Result<AdaptedLinear<B>, ConfigError> {
    let w = layer.base.weight.val();
    let device = w.device();
    let grid =
        QuantizedTensor::quantize("base.weight", &HostTensor::from_tensor(w), config)?.dequantize();
    layer.base.weight = layer
        .base
        .weight
        .map(|_| grid.to_tensor::<B, 2>(&device).set_require_grad(false));
    Ok(layer)
}

/// Merges the adapter into a base quantized with `config`: `W + ΔW`, quantized again with
/// `config`. Re-quantizing rounds the merged weight once more, beyond what the unmerged layer
/// computes with (the exact `W + ΔW`): the returned value is the largest absolute change that
/// rounding makes, for the caller to judge or report.
pub fn merge_quantized<B: Backend>(
    layer: &AdaptedLinear<B>,
    config: QuantConfig,
) -> Result<(burn::nn::Linear<B>, f32), ConfigError> {
    let merged = layer.merge()?;
    let exact = HostTensor::from_tensor(merged.weight.val());
    let grid = QuantizedTensor::quantize("merged weight", &exact, config)?.dequantize();
    let rounding = exact
        .data
        .iter()
        .zip(&grid.data)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    let device = merged.weight.device();
    let linear = burn::nn::Linear {
        weight: merged
            .weight
            .map(|_| grid.to_tensor::<B, 2>(&device).set_require_grad(false)),
        bias: merged.bias,
    };
    Ok((linear, rounding))
}

/// Stores a linear layer's weight as a Burn quantized tensor with `config`'s scheme (8-bit
/// symmetric, per tensor or per block; Burn's CPU backends quantize 8-bit only, the CubeCL
/// backends 4-bit too), for inference on a non-autodiff backend. Schemes Burn has no
/// equivalent for (per channel, blocks that do not divide the rows) are refused.
pub fn to_burn_quantized<B: Backend>(
    mut linear: burn::nn::Linear<B>,
    config: QuantConfig,
) -> Result<burn::nn::Linear<B>, AdapterError> {
    let shape = linear.weight.dims();
    let scheme = config
        .burn_scheme::<B>(shape, &linear.weight.device())
        .ok_or_else(|| AdapterError::Unsupported {
            option: "quantization level".into(),
            message: format!(
                "Burn has no quantized tensor for {config} on a {shape:?} weight on this device"
            ),
        })?;
    linear.weight = linear.weight.map(|w| w.detach().quantize_dynamic(&scheme));
    Ok(linear)
}

/// `module` with every Burn quantized tensor it holds dequantized (`q·s` as `f32`), the rest as
/// it is: the float model that an int8-loaded one ([`crate::model::llama::LoadOptions`])
/// computes with, to export, compare or inspect.
pub fn dequantized<B: Backend, M: burn::module::Module<B>>(module: M) -> M {
    struct Dequantize;
    impl<B: Backend> burn::module::ModuleMapper<B> for Dequantize {
        fn map_float<const D: usize>(
            &mut self,
            param: burn::module::Param<Tensor<B, D>>,
        ) -> burn::module::Param<Tensor<B, D>> {
            param.map(float_values)
        }
    }
    module.map(&mut Dequantize)
}

/// `t` as a float tensor: a Burn quantized tensor dequantized (`q·s`, the values it computes
/// with), any other as it is.
pub fn float_values<B: Backend, const D: usize>(t: Tensor<B, D>) -> Tensor<B, D> {
    if !matches!(t.dtype(), DType::QFloat(_)) {
        return t;
    }
    // Under autodiff (whose own dequantize Burn 0.21 leaves unimplemented), by the inner backend.
    match crate::kron::autodiff::quantized_ops::<B>() {
        Some(ops) => {
            use crate::kron::autodiff::{erase_quantized, unerase};
            unerase((ops.dequantize)(erase_quantized(t)))
        }
        None => t.dequantize(),
    }
}

/// `t` quantized with `scheme` as a frozen tensor: Burn's `quantize_dynamic`, or under an
/// autodiff backend the crate registered (whose own Burn 0.21 leaves unimplemented) its inner
/// backend's, untracked.
pub(crate) fn quantize_frozen_tensor<B: Backend, const D: usize>(
    t: Tensor<B, D>,
    scheme: &QuantScheme,
) -> Tensor<B, D> {
    match crate::kron::autodiff::quantized_ops::<B>() {
        Some(ops) => {
            let out = (ops.quantize)(Box::new(t.into_primitive().tensor()), scheme);
            let q = out
                .downcast::<burn::tensor::ops::QuantizedTensor<B>>()
                .expect("registered under B's TypeId");
            Tensor::from_primitive(TensorPrimitive::QFloat(*q))
        }
        None => t.quantize_dynamic(scheme),
    }
}

/// Is this weight a Burn quantized tensor, and with which scheme?
pub fn burn_scheme_of<B: Backend>(t: &Tensor<B, 2>) -> Option<QuantScheme> {
    match t.dtype() {
        DType::QFloat(scheme) => Some(scheme),
        _ => None,
    }
}
