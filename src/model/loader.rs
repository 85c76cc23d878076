//! Reading pretrained weights with Hugging Face names and `[out, in]` layout.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use burn::module::{Module, Param};
use burn::nn::{Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::tensor::{backend::Backend, Tensor, TensorData};

use super::bert::BertClassifier;
use super::config::{BertConfig, PeftConfig};
use crate::error::AdapterError;
use crate::rng::SplitMix64;

/// Where an encoder's weights come from: a safetensors file with Hugging Face names, or seeded
/// random values (for tests and smoke runs).
///
/// A file source records every tensor the model asks for. [`TensorSource::finish`] then fails
/// with one error listing every missing key, every unexpected key and every shape mismatch,
/// rather than stopping at the first.
pub struct TensorSource {
    kind: Kind,
    taken: BTreeSet<String>,
    missing: Vec<String>,
    mismatched: Vec<String>,
}

enum Kind {
    File { path: PathBuf, bytes: Vec<u8> },
    Random(SplitMix64),
}

/// Keys in Hugging Face BERT checkpoints that the encoder does not use: buffers, and the BERT
/// pooler (sentence-transformers pools by mean, as this encoder does).
const IGNORED: &[&str] = &[
    "embeddings.position_ids",
    "pooler.dense.weight",
    "pooler.dense.bias",
];

impl TensorSource {
    /// A safetensors file (read whole, checked to parse).
    pub fn from_safetensors(path: impl AsRef<Path>) -> Result<Self, AdapterError> {
        let path = path.as_ref().to_path_buf();
        let bytes = std::fs::read(&path).map_err(|e| AdapterError::io(&path, e))?;
        safetensors::SafeTensors::deserialize(&bytes).map_err(|e| AdapterError::Format {
            path: path.display().to_string(),
            message: format!("not a valid safetensors file: {e}"),
        })?;
        Ok(Self::with(Kind::File { path, bytes }))
    }

    /// Random weights, `N(0, 0.02)` as BERT initializes (LayerNorms at 1 and 0).
    pub fn random(seed: u64) -> Self {
        Self::with(Kind::Random(SplitMix64::new(seed)))
    }

    fn with(kind: Kind) -> Self {
        Self {
            kind,
            taken: BTreeSet::new(),
            missing: Vec::new(),
            mismatched: Vec::new(),
        }
    }

    /// Reads `name` as f32 values of shape `shape`; records a missing or mismatched key (and
    /// returns zeros) so that all problems are reported together.
    fn take(&mut self, name: &str, shape: &[usize], fill: Fill) -> Vec<f32> {
        let n: usize = shape.iter().product();
        match &mut self.kind {
            Kind::Random(rng) => match fill {
                Fill::Normal => (0..n).map(|_| (rng.normal() * 0.02) as f32).collect(),
                Fill::Ones => vec![1.0; n],
                Fill::Zeros => vec![0.0; n],
            },
            Kind::File { bytes, .. } => {
                self.taken.insert(name.to_string());
                let st = safetensors::SafeTensors::deserialize(bytes).expect("checked at open");
                let Ok(view) = st.tensor(name) else {
                    self.missing.push(name.to_string());
                    return vec![0.0; n];
                };
                if view.shape() != shape {
                    self.mismatched.push(format!(
                        "{name}: file {:?}, model {:?}",
                        view.shape(),
                        shape
                    ));
                    return vec![0.0; n];
                }
                match f32_values(&view) {
                    Some(v) => v,
                    None => {
                        self.mismatched
                            .push(format!("{name}: dtype {:?}, expected F32", view.dtype()));
                        vec![0.0; n]
                    }
                }
            }
        }
    }

    /// A frozen `Linear` from `{name}.weight [out, in]` and `{name}.bias [out]`.
    pub fn linear<B: Backend>(
        &mut self,
        name: &str,
        d_in: usize,
        d_out: usize,
        device: &B::Device,
    ) -> Linear<B> {
        let w = self.take(&format!("{name}.weight"), &[d_out, d_in], Fill::Normal);
        let b = self.take(&format!("{name}.bias"), &[d_out], Fill::Zeros);
        // PyTorch [out, in] → Burn [in, out], transposed here so the weight is contiguous.
        let mut wt = vec![0f32; w.len()];
        for o in 0..d_out {
            for i in 0..d_in {
                wt[i * d_out + o] = w[o * d_in + i];
            }
        }
        let mut linear = LinearConfig::new(d_in, d_out).init::<B>(device);
        linear.weight = Param::from_tensor(tensor(wt, [d_in, d_out], device));
        linear.bias = Some(Param::from_tensor(tensor(b, [d_out], device)));
        linear.no_grad()
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
        let g = self.take(&format!("{name}.{wn}"), &[d], Fill::Ones);
        let b = self.take(&format!("{name}.{bn}"), &[d], Fill::Zeros);
        let mut norm = LayerNormConfig::new(d).with_epsilon(eps).init::<B>(device);
        norm.gamma = Param::from_tensor(tensor(g, [d], device));
        norm.beta = Some(Param::from_tensor(tensor(b, [d], device)));
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
        let w = self.take(&format!("{name}.weight"), &[n, d], Fill::Normal);
        let mut emb = EmbeddingConfig::new(n, d).init::<B>(device);
        emb.weight = Param::from_tensor(tensor(w, [n, d], device));
        emb.no_grad()
    }

    fn has(&self, name: &str) -> bool {
        match &self.kind {
            Kind::File { bytes, .. } => safetensors::SafeTensors::deserialize(bytes)
                .map(|st| st.tensor(name).is_ok())
                .unwrap_or(false),
            Kind::Random(_) => false,
        }
    }

    /// Checks that the file held exactly what the model needed (ignoring buffers and the BERT
    /// pooler): one error lists every missing key, unexpected key and shape mismatch.
    pub fn finish(self) -> Result<(), AdapterError> {
        let Kind::File { path, bytes } = &self.kind else {
            return Ok(());
        };
        let st = safetensors::SafeTensors::deserialize(bytes).expect("checked at open");
        let unexpected: Vec<String> = st
            .names()
            .into_iter()
            .filter(|k| !self.taken.contains(*k) && !IGNORED.contains(k))
            .map(String::from)
            .collect::<BTreeSet<_>>()
            .into_iter()
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

#[derive(Clone, Copy)]
enum Fill {
    Normal,
    Ones,
    Zeros,
}

fn tensor<B: Backend, const D: usize>(
    v: Vec<f32>,
    shape: [usize; D],
    device: &B::Device,
) -> Tensor<B, D> {
    Tensor::from_data(TensorData::new(v, shape), device)
}

fn f32_values(view: &safetensors::tensor::TensorView<'_>) -> Option<Vec<f32>> {
    (view.dtype() == safetensors::Dtype::F32).then(|| {
        view.data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    })
}

/// Loads a pretrained classifier from a Hugging Face model directory (`config.json` and
/// `model.safetensors`), with the adapters `peft` describes and a fresh head of `classes`.
pub fn load_pretrained<B: Backend>(
    model_dir: impl AsRef<Path>,
    peft: &PeftConfig,
    classes: usize,
    device: &B::Device,
) -> Result<(BertClassifier<B>, BertConfig), AdapterError> {
    let dir = model_dir.as_ref();
    let config = BertConfig::from_json_file(dir.join("config.json"))?;
    let mut source = TensorSource::from_safetensors(dir.join("model.safetensors"))?;
    let model = BertClassifier::new(&mut source, &config, peft, classes, device)?;
    source.finish()?;
    Ok((model, config))
}
