//! Where a model's pretrained weights come from: Hugging Face safetensors files (one file or a
//! sharded index) with their names and PyTorch `[out, in]` layout, or seeded random values for
//! tests and timing. Every model's loader asks a [`TensorSource`] for tensors by name and shape;
//! [`TensorSource::finish`] then reports every missing, unexpected and mis-shaped tensor at once.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use burn::module::{Module, Param};
use burn::nn::{Embedding, LayerNorm, LayerNormConfig, Linear};
use burn::tensor::{backend::Backend, Tensor, TensorData};

use crate::error::{AdapterError, ConfigError};
use crate::quant::{Level, QuantConfig};
use crate::rng::SplitMix64;
use crate::store::st;

/// How random weights are filled.
#[derive(Clone, Copy, Debug)]
pub enum Fill {
    /// `N(0, 0.02)`, as BERT and Llama initialize.
    Normal,
    /// Ones (norm scales).
    Ones,
    /// Zeros (biases).
    Zeros,
}

/// Named host tensors from files, or random values. See the module docs. `'a` is the life of
/// what a source decodes from when it is not a file it reads itself ([`TensorSource::from_fn`]:
/// a GGUF file already in memory).
pub struct TensorSource<'a> {
    kind: Kind<'a>,
    taken: BTreeSet<String>,
    missing: Vec<String>,
    mismatched: Vec<String>,
    ignored: Vec<String>,
    /// The first error decoding a tensor (reported by [`TensorSource::finish`] before the rest).
    failed: Option<AdapterError>,
    /// The scheme frozen linear weights are quantized with ([`TensorSource::quantize_frozen`]).
    frozen: Option<QuantConfig>,
}

/// Decodes a tensor by name (see [`TensorSource::from_fn`]).
type Decode<'a> = Box<dyn FnMut(&str) -> Result<Vec<f32>, AdapterError> + 'a>;

enum Kind<'a> {
    /// Safetensors files, read a tensor at a time; `index` maps a tensor name to its file.
    Files {
        path: PathBuf,
        files: Vec<st::SafetensorsFile>,
        index: BTreeMap<String, usize>,
    },
    /// Tensors decoded when taken, by name: their shapes, and the decoder.
    Lazy {
        path: PathBuf,
        shapes: BTreeMap<String, Vec<usize>>,
        decode: Decode<'a>,
    },
    Random(SplitMix64),
}

impl<'a> TensorSource<'a> {
    /// A safetensors file (its header read and checked now, each tensor when it is taken).
    pub fn from_safetensors(path: impl AsRef<Path>) -> Result<Self, AdapterError> {
        Self::from_files(path.as_ref(), &[path.as_ref().to_path_buf()])
    }

    /// A Hugging Face model folder's weights: `model.safetensors`, or the shards that
    /// `model.safetensors.index.json` lists ([`st::model_dir_shards`]).
    pub fn from_model_dir(dir: impl AsRef<Path>) -> Result<Self, AdapterError> {
        let dir = dir.as_ref();
        Self::from_files(dir, &st::model_dir_shards(dir)?)
    }

    fn from_files(path: &Path, paths: &[PathBuf]) -> Result<Self, AdapterError> {
        let mut files = Vec::new();
        let mut index = BTreeMap::new();
        for (i, p) in paths.iter().enumerate() {
            let file = st::SafetensorsFile::open(p)?;
            for name in file.names() {
                if index.insert(name.clone(), i).is_some() {
                    return Err(AdapterError::format(
                        p.display().to_string(),
                        format!("tensor `{name}` is in more than one shard"),
                    ));
                }
            }
            files.push(file);
        }
        Ok(Self::with(Kind::Files {
            path: path.to_path_buf(),
            files,
            index,
        }))
    }

    /// Tensors decoded elsewhere (a GGUF file's, say), by name, with the shape each has in
    /// PyTorch layout; `path` names the source in errors.
    pub fn from_host(
        path: impl Into<PathBuf>,
        tensors: BTreeMap<String, (Vec<usize>, Vec<f32>)>,
    ) -> Self {
        let shapes = tensors
            .iter()
            .map(|(name, (shape, _))| (name.clone(), shape.clone()))
            .collect();
        Self::from_fn(path, shapes, move |name| {
            Ok(tensors
                .get(name)
                .map(|(_, v)| v.clone())
                .unwrap_or_default())
        })
    }

    /// Tensors decoded one at a time when the model takes them (a GGUF file's, dequantized:
    /// the model and one tensor's values in memory, not every tensor's twice): `shapes` gives
    /// each name's shape in PyTorch layout, `decode` its values (row-major; an error is
    /// reported by [`TensorSource::finish`]); `path` names the source in errors.
    pub fn from_fn(
        path: impl Into<PathBuf>,
        shapes: BTreeMap<String, Vec<usize>>,
        decode: impl FnMut(&str) -> Result<Vec<f32>, AdapterError> + 'a,
    ) -> Self {
        Self::with(Kind::Lazy {
            path: path.into(),
            shapes,
            decode: Box::new(decode),
        })
    }

    /// Random weights: `N(0, 0.02)` for matrices, ones for norm scales, zeros for biases.
    pub fn random(seed: u64) -> Self {
        Self::with(Kind::Random(SplitMix64::new(seed)))
    }

    fn with(kind: Kind<'a>) -> Self {
        Self {
            kind,
            taken: BTreeSet::new(),
            missing: Vec::new(),
            mismatched: Vec::new(),
            ignored: Vec::new(),
            failed: None,
            frozen: None,
        }
    }

    /// Holds the frozen linear weights this source builds from now on ([`TensorSource::linear`])
    /// as Burn quantized tensors with `config`'s scheme, each quantized when it is read: an int8
    /// model holds its linear weights in a quarter of their `f32` memory, and never all of them
    /// in `f32` at once. For inference, and for training adapters on the frozen int8 base
    /// (QLoRA's idea): Burn 0.21's autodiff backend runs no quantized tensor by itself, so an
    /// autodiff `B` is refused unless [`crate::kron::autodiff::register_backward`] gave it the
    /// crate's int8 products (docs/quantization.md, "Training on an int8 base"). Refused too: a
    /// scheme `device` cannot store (per channel; 4-bit on Burn's CPU backends, which quantize
    /// 8-bit only). A layer whose rows are not whole
    /// blocks stays `f32`, as does one with NaN or infinite values (as the file has it), and
    /// norms and biases; embeddings are quantized like weights. On flex the products read the `i8`
    /// values in place (docs/quantization.md, "Frozen bases held in int8").
    pub fn quantize_frozen<B: Backend>(
        &mut self,
        config: QuantConfig,
        device: &B::Device,
    ) -> Result<(), AdapterError> {
        let unsupported = |message: String| AdapterError::Unsupported {
            option: "frozen weights".into(),
            message,
        };
        if B::ad_enabled(device) && crate::kron::autodiff::quantized_ops::<B>().is_none() {
            return Err(unsupported(format!(
                "{config} frozen weights on a training (autodiff) backend: Burn 0.21's autodiff \
                 runs no quantized tensor by itself; call \
                 kron_adapters::kron::autodiff::register_backward::<B>() before loading (it gives \
                 Burn's Autodiff<I> the crate's int8 products), or load in f32"
            )));
        }
        let probe = match config.level {
            Level::Block(n) => [1, n],
            _ => [1, 1],
        };
        if config.burn_scheme::<B>(probe, device).is_none() {
            return Err(unsupported(format!(
                "{config}: this device has no Burn quantized tensor for it (Burn's CPU backends \
                 store 8-bit values per tensor or per block; use --bits 8 with a tensor or block level)"
            )));
        }
        self.frozen = Some(config);
        Ok(())
    }

    /// Tensors the file may hold that the model does not use (buffers, a pooler): not reported
    /// as unexpected by [`TensorSource::finish`].
    pub fn ignore(&mut self, names: &[&str]) {
        self.ignored.extend(names.iter().map(|s| s.to_string()));
    }

    /// Does the source hold `name`? (Random sources hold nothing.)
    pub fn has(&self, name: &str) -> bool {
        match &self.kind {
            Kind::Files { index, .. } => index.contains_key(name),
            Kind::Lazy { shapes, .. } => shapes.contains_key(name),
            Kind::Random(_) => false,
        }
    }

    /// An upper bound on the values the source holds (`None` for a random source): exact for
    /// decoded tensors, the files' bytes for safetensors files (every value takes at least one
    /// byte). A model whose configuration asks for more cannot come from this source; checking
    /// that first keeps an absurd configuration from allocating what no file backs.
    pub fn held_values(&self) -> Option<usize> {
        match &self.kind {
            Kind::Files { files, .. } => Some(
                files
                    .iter()
                    .map(|f| usize::try_from(f.byte_len()).unwrap_or(usize::MAX))
                    .fold(0, usize::saturating_add),
            ),
            Kind::Lazy { shapes, .. } => Some(
                shapes
                    .values()
                    .map(|s| s.iter().product::<usize>())
                    .fold(0, usize::saturating_add),
            ),
            Kind::Random(_) => None,
        }
    }

    /// Refuses a configuration (`model` names its type in the error) that describes `wanted`
    /// parameters (`None`: too many to count) when the source holds fewer values
    /// ([`TensorSource::held_values`]): a damaged header or the wrong `config.json` beside the
    /// weights would otherwise allocate a model no file backs before the missing tensors are
    /// reported. A random source holds any size.
    pub fn check_holds(&self, model: &str, wanted: Option<usize>) -> Result<(), ConfigError> {
        let Some(held) = self.held_values() else {
            return Ok(());
        };
        if wanted.is_none_or(|w| w > held) {
            return Err(ConfigError::invalid(
                model,
                "sizes",
                format!(
                    "they describe a model of {} parameters, more than the {held} values {} \
                     holds: the configuration does not belong to these weights",
                    wanted.map_or("too many to count".to_string(), |w| w.to_string()),
                    self.path_shown()
                ),
            ));
        }
        Ok(())
    }

    /// The path the source was read from, as errors show it (empty for a random source).
    pub fn path_shown(&self) -> String {
        match &self.kind {
            Kind::Files { path, .. } | Kind::Lazy { path, .. } => path.display().to_string(),
            Kind::Random(_) => String::new(),
        }
    }

    /// The shape `name` has in the source, if it holds it.
    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        match &self.kind {
            Kind::Files { files, index, .. } => files[*index.get(name)?].shape(name),
            Kind::Lazy { shapes, .. } => shapes.get(name).cloned(),
            Kind::Random(_) => None,
        }
    }

    /// Reads `name` as f32 values of shape `shape` (random values filled as `fill`); records a
    /// missing or mismatched tensor (and returns zeros) so that all problems are reported
    /// together by [`TensorSource::finish`].
    pub fn take(&mut self, name: &str, shape: &[usize], fill: Fill) -> Vec<f32> {
        let n: usize = shape.iter().product();
        let found = match &mut self.kind {
            Kind::Random(rng) => {
                return match fill {
                    Fill::Normal => (0..n).map(|_| (rng.normal() * 0.02) as f32).collect(),
                    Fill::Ones => vec![1.0; n],
                    Fill::Zeros => vec![0.0; n],
                }
            }
            Kind::Files { files, index, .. } => index.get(name).and_then(|&i| {
                let file = &mut files[i];
                match file.shape(name)? {
                    s if s == shape => file
                        .read_f32(name)
                        .map(|values| values.map_err(|e| e.to_string())),
                    s => Some(Err(format!("file {s:?}, model {shape:?}"))),
                }
            }),
            Kind::Lazy { shapes, decode, .. } => match shapes.get(name) {
                None => None,
                Some(s) if s.as_slice() != shape => {
                    Some(Err(format!("file {s:?}, model {shape:?}")))
                }
                Some(_) => match decode(name) {
                    Ok(v) if v.len() == n => Some(Ok(v)),
                    Ok(v) => Some(Err(format!("{} values for {shape:?}", v.len()))),
                    Err(e) => {
                        self.failed.get_or_insert(e);
                        Some(Ok(vec![0.0; n]))
                    }
                },
            },
        };
        self.taken.insert(name.to_string());
        match found {
            None => {
                self.missing.push(name.to_string());
                vec![0.0; n]
            }
            Some(Err(why)) => {
                self.mismatched.push(format!("{name}: {why}"));
                vec![0.0; n]
            }
            Some(Ok(v)) => v,
        }
    }

    /// A tensor `name` of shape `shape` on `device` (see [`TensorSource::take`]).
    pub fn tensor<B: Backend, const D: usize>(
        &mut self,
        name: &str,
        shape: [usize; D],
        fill: Fill,
        device: &B::Device,
    ) -> Tensor<B, D> {
        let v = self.take(name, &shape, fill);
        Tensor::from_data(TensorData::new(v, shape), device)
    }

    /// A frozen `Linear` from `{name}.weight [out, in]` and, with `bias`, `{name}.bias [out]`.
    pub fn linear<B: Backend>(
        &mut self,
        name: &str,
        d_in: usize,
        d_out: usize,
        bias: bool,
        device: &B::Device,
    ) -> Linear<B> {
        let w = self.take(&format!("{name}.weight"), &[d_out, d_in], Fill::Normal);
        // PyTorch [out, in] → Burn [in, out], transposed here so the weight is contiguous.
        let mut wt = vec![0f32; w.len()];
        for o in 0..d_out {
            for i in 0..d_in {
                wt[i * d_out + o] = w[o * d_in + i];
            }
        }
        drop(w);
        let weight = self.frozen_weight::<B>(wt, [d_in, d_out], device);
        let bias = bias.then(|| {
            Param::from_tensor(self.tensor(&format!("{name}.bias"), [d_out], Fill::Zeros, device))
        });
        Linear {
            weight: Param::from_tensor(weight),
            bias,
        }
        .no_grad()
    }

    /// `values` (`shape`, row-major) as a frozen weight on `device`: `f32`, or quantized by
    /// Burn with the scheme [`TensorSource::quantize_frozen`] set where the device stores it for
    /// this shape, and whose values are all finite. (Quantizing on the host into Burn's quantized tensor data instead held 48%
    /// more memory after loading SmolLM2, 425 against 287 MB, and loaded slower.)
    fn frozen_weight<B: Backend>(
        &self,
        values: Vec<f32>,
        shape: [usize; 2],
        device: &B::Device,
    ) -> Tensor<B, 2> {
        // A weight with NaN or infinite values stays as the file has it (burn-ndarray's
        // quantizer panics on NaN; no scale represents them).
        let finite = self.frozen.is_some() && values.iter().all(|v| v.is_finite());
        let tensor = Tensor::from_data(TensorData::new(values, shape), device);
        match self
            .frozen
            .filter(|_| finite)
            .and_then(|c| c.burn_scheme::<B>(shape, device))
        {
            Some(scheme) => crate::quant::quantize_frozen_tensor(tensor, &scheme),
            None => tensor,
        }
    }

    /// A frozen `LayerNorm` from `{name}.weight` and `{name}.bias` (or the older `gamma`/`beta`).
    pub fn layer_norm<B: Backend>(
        &mut self,
        name: &str,
        d: usize,
        eps: f64,
        device: &B::Device,
    ) -> LayerNorm<B> {
        let (wn, bn) = if self.has(&format!("{name}.gamma")) {
            ("gamma", "beta")
        } else {
            ("weight", "bias")
        };
        let g = self.tensor(&format!("{name}.{wn}"), [d], Fill::Ones, device);
        let b = self.tensor(&format!("{name}.{bn}"), [d], Fill::Zeros, device);
        let mut norm = LayerNormConfig::new(d).with_epsilon(eps).init::<B>(device);
        norm.gamma = Param::from_tensor(g);
        norm.beta = Some(Param::from_tensor(b));
        norm.no_grad()
    }

    /// A frozen `Embedding` from `{name}.weight [n, d]`.
    pub fn embedding<B: Backend>(
        &mut self,
        name: &str,
        n: usize,
        d: usize,
        device: &B::Device,
    ) -> Embedding<B> {
        let values = self.take(&format!("{name}.weight"), &[n, d], Fill::Normal);
        Embedding {
            weight: Param::from_tensor(self.frozen_weight::<B>(values, [n, d], device)),
        }
        .no_grad()
    }

    /// Checks that the source held exactly what the model needed (besides the ignored names):
    /// one error lists every missing key, unexpected key and shape or dtype mismatch.
    pub fn finish(self) -> Result<(), AdapterError> {
        if let Some(e) = self.failed {
            return Err(e);
        }
        let (path, names): (&Path, Vec<&String>) = match &self.kind {
            Kind::Random(_) => return Ok(()),
            Kind::Files { path, index, .. } => (path, index.keys().collect()),
            Kind::Lazy { path, shapes, .. } => (path, shapes.keys().collect()),
        };
        let unexpected: Vec<String> = names
            .into_iter()
            .filter(|k| !self.taken.contains(*k) && !self.ignored.contains(k))
            .cloned()
            .collect();
        if self.missing.is_empty() && self.mismatched.is_empty() && unexpected.is_empty() {
            return Ok(());
        }
        Err(AdapterError::PretrainedMismatch {
            path: path.display().to_string(),
            missing: self.missing,
            unexpected,
            mismatched: self.mismatched,
        })
    }
}
