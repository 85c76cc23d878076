//! The BERT encoder and a sequence classifier on top of it.

use burn::module::Module;
use burn::nn::{Dropout, DropoutConfig, Embedding, LayerNorm, Linear, LinearConfig};
use burn::tensor::{activation, backend::Backend, Int, Tensor};

use super::config::{BertConfig, PeftConfig};
use super::loader::TensorSource;
use crate::block::BlockAdapters;
use crate::checkpoint::AdapterLayers;
use crate::error::AdapterError;
use crate::linear::AdaptedLinear;

/// Word, position and token-type embeddings, summed, normalized.
#[derive(Module, Debug)]
pub struct Embeddings<B: Backend> {
    /// `[vocab, d]`.
    pub word: Embedding<B>,
    /// `[max_positions, d]`.
    pub position: Embedding<B>,
    /// `[type_vocab, d]`.
    pub token_type: Embedding<B>,
    /// LayerNorm after the sum.
    pub norm: LayerNorm<B>,
    /// Dropout after the norm.
    pub dropout: Dropout,
}

impl<B: Backend> Embeddings<B> {
    /// # Shapes
    /// - `ids`, `token_types`: `[batch, seq]`; output `[batch, seq, d]`
    pub fn forward(&self, ids: Tensor<B, 2, Int>, token_types: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let [_, seq] = ids.dims();
        let positions = Tensor::<B, 1, Int>::arange(0..seq as i64, &ids.device()).unsqueeze::<2>();
        let x = self.word.forward(ids)
            + self.position.forward(positions)
            + self.token_type.forward(token_types);
        self.dropout.forward(self.norm.forward(x))
    }
}

/// Multi-head self-attention with its output projection and post-LayerNorm.
#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    /// `attention.self.query`.
    pub query: AdaptedLinear<B>,
    /// `attention.self.key`.
    pub key: AdaptedLinear<B>,
    /// `attention.self.value`.
    pub value: AdaptedLinear<B>,
    /// `attention.output.dense`.
    pub output: AdaptedLinear<B>,
    /// `attention.output.LayerNorm`.
    pub norm: LayerNorm<B>,
    /// Dropout on attention probabilities.
    pub probs_dropout: Dropout,
    /// Dropout on the output projection.
    pub dropout: Dropout,
    /// Number of heads.
    pub heads: usize,
}

impl<B: Backend> Attention<B> {
    /// # Shapes
    /// - `x`: `[batch, seq, d]`, `mask`: additive, `[batch, 1, 1, seq]`; output `[batch, seq, d]`
    pub fn forward(&self, x: Tensor<B, 3>, mask: Tensor<B, 4>) -> Tensor<B, 3> {
        let [batch, seq, d] = x.dims();
        let dh = d / self.heads;
        let split = |t: Tensor<B, 3>| t.reshape([batch, seq, self.heads, dh]).swap_dims(1, 2);
        let q = split(self.query.forward(x.clone()));
        let k = split(self.key.forward(x.clone()));
        let v = split(self.value.forward(x.clone()));
        let scores = q.matmul(k.transpose()).div_scalar((dh as f64).sqrt()) + mask;
        let probs = self.probs_dropout.forward(activation::softmax(scores, 3));
        let ctx = probs.matmul(v).swap_dims(1, 2).reshape([batch, seq, d]);
        let out = self.dropout.forward(self.output.forward(ctx));
        self.norm.forward(out + x)
    }
}

/// One transformer layer: attention, then the FFN block (where block adapters attach).
#[derive(Module, Debug)]
pub struct BertLayer<B: Backend> {
    /// Self-attention.
    pub attention: Attention<B>,
    /// `intermediate.dense`, `[d, ffn]`.
    pub intermediate: AdaptedLinear<B>,
    /// `output.dense`, `[ffn, d]`.
    pub output: AdaptedLinear<B>,
    /// `output.LayerNorm`.
    pub norm: LayerNorm<B>,
    /// Dropout on the FFN output.
    pub dropout: Dropout,
}

impl<B: Backend> BertLayer<B> {
    /// The layer; `block` is this layer's block adapter (the adapters and the layer index).
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        mask: Tensor<B, 4>,
        block: Option<(&BlockAdapters<B>, usize)>,
    ) -> Tensor<B, 3> {
        let h = self.attention.forward(x, mask);
        // The block f: the FFN without its residual and norm.
        let fx = self
            .output
            .forward(activation::gelu(self.intermediate.forward(h.clone())));
        let fx = match block {
            Some((adapters, i)) => adapters.forward(i, h.clone(), fx),
            None => fx,
        };
        self.norm.forward(self.dropout.forward(fx) + h)
    }
}

/// A BERT encoder: embeddings and layers, with adapters where a [`PeftConfig`] puts them.
#[derive(Module, Debug)]
pub struct BertEncoder<B: Backend> {
    /// The embeddings.
    pub embeddings: Embeddings<B>,
    /// The layers.
    pub layers: Vec<BertLayer<B>>,
    /// Block adapters on the FFNs, if any.
    pub block_adapters: Option<BlockAdapters<B>>,
}

/// The Hugging Face module name of a layer's linear (what [`crate::Targets`] match).
fn hf(i: usize, rest: &str) -> String {
    format!("encoder.layer.{i}.{rest}")
}

impl<B: Backend> BertEncoder<B> {
    /// Builds the encoder from `source` (a pretrained file, or random weights), frozen, with the
    /// adapters `peft` describes (the training mode is applied by the trainer, on the autodiff
    /// backend).
    pub fn new(
        source: &mut TensorSource,
        config: &BertConfig,
        peft: &PeftConfig,
        device: &B::Device,
    ) -> Result<Self, AdapterError> {
        config.validate()?;
        peft.targets.validate()?;
        let (d, ffn) = (config.hidden_size, config.intermediate_size);
        let eps = config.layer_norm_eps;
        let hidden_dropout = DropoutConfig::new(config.hidden_dropout_prob).init();
        let probs_dropout = DropoutConfig::new(config.attention_probs_dropout_prob).init();
        let adapted = |src: &mut TensorSource, name: String, d_in: usize, d_out: usize| {
            let linear = src.linear::<B>(&name, d_in, d_out, device);
            match &peft.linear {
                Some(cfg) if peft.targets.matches(&name) => {
                    AdaptedLinear::new(linear, cfg, device).map_err(|e| e.at(&name))
                }
                _ => Ok(AdaptedLinear::frozen(linear)),
            }
        };

        let embeddings = Embeddings {
            word: source.embedding("embeddings.word_embeddings", config.vocab_size, d, device),
            position: source.embedding(
                "embeddings.position_embeddings",
                config.max_position_embeddings,
                d,
                device,
            ),
            token_type: source.embedding(
                "embeddings.token_type_embeddings",
                config.type_vocab_size,
                d,
                device,
            ),
            norm: source.layer_norm("embeddings.LayerNorm", d, eps, device),
            dropout: hidden_dropout.clone(),
        };
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let attention = Attention {
                query: adapted(source, hf(i, "attention.self.query"), d, d)?,
                key: adapted(source, hf(i, "attention.self.key"), d, d)?,
                value: adapted(source, hf(i, "attention.self.value"), d, d)?,
                output: adapted(source, hf(i, "attention.output.dense"), d, d)?,
                norm: source.layer_norm(&hf(i, "attention.output.LayerNorm"), d, eps, device),
                probs_dropout: probs_dropout.clone(),
                dropout: hidden_dropout.clone(),
                heads: config.num_attention_heads,
            };
            layers.push(BertLayer {
                attention,
                intermediate: adapted(source, hf(i, "intermediate.dense"), d, ffn)?,
                output: adapted(source, hf(i, "output.dense"), ffn, d)?,
                norm: source.layer_norm(&hf(i, "output.LayerNorm"), d, eps, device),
                dropout: hidden_dropout.clone(),
            });
        }
        let block_adapters = peft
            .block
            .as_ref()
            .map(|cfg| BlockAdapters::new(cfg, d, config.num_hidden_layers, device))
            .transpose()?;
        Ok(Self {
            embeddings,
            layers,
            block_adapters,
        })
    }

    /// The last hidden state.
    ///
    /// # Shapes
    /// - `ids`, `mask` (1 for tokens, 0 for padding): `[batch, seq]`; output `[batch, seq, d]`
    pub fn forward(&self, ids: Tensor<B, 2, Int>, mask: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let [batch, seq] = ids.dims();
        let token_types = Tensor::<B, 2, Int>::zeros([batch, seq], &ids.device());
        let mut x = self.embeddings.forward(ids, token_types);
        // Additive mask: 0 for tokens, a large negative number for padding.
        let additive = mask
            .float()
            .sub_scalar(1.0)
            .mul_scalar(1e9)
            .reshape([batch, 1, 1, seq]);
        for (i, layer) in self.layers.iter().enumerate() {
            let block = self.block_adapters.as_ref().map(|b| (b, i));
            x = layer.forward(x, additive.clone(), block);
        }
        x
    }

    /// Every adapted linear with its Hugging Face name.
    pub fn named_linears(&self) -> Vec<(String, &AdaptedLinear<B>)> {
        let mut out = Vec::new();
        for (i, l) in self.layers.iter().enumerate() {
            out.push((hf(i, "attention.self.query"), &l.attention.query));
            out.push((hf(i, "attention.self.key"), &l.attention.key));
            out.push((hf(i, "attention.self.value"), &l.attention.value));
            out.push((hf(i, "attention.output.dense"), &l.attention.output));
            out.push((hf(i, "intermediate.dense"), &l.intermediate));
            out.push((hf(i, "output.dense"), &l.output));
        }
        out
    }

    /// Every adapted linear, mutably, with its Hugging Face name (to put adapters in place,
    /// for instance from a PEFT file).
    pub fn named_linears_mut(&mut self) -> Vec<(String, &mut AdaptedLinear<B>)> {
        let mut out = Vec::new();
        for (i, l) in self.layers.iter_mut().enumerate() {
            out.push((hf(i, "attention.self.query"), &mut l.attention.query));
            out.push((hf(i, "attention.self.key"), &mut l.attention.key));
            out.push((hf(i, "attention.self.value"), &mut l.attention.value));
            out.push((hf(i, "attention.output.dense"), &mut l.attention.output));
            out.push((hf(i, "intermediate.dense"), &mut l.intermediate));
            out.push((hf(i, "output.dense"), &mut l.output));
        }
        out
    }

    /// Merges every linear adapter into its base weight: the encoder then costs what the
    /// pretrained one does (block adapters, which cannot merge, stay).
    pub fn merge(mut self) -> Result<Self, AdapterError> {
        for (name, linear) in self.named_linears_mut() {
            if linear.adapter.is_some() {
                *linear = AdaptedLinear::frozen(linear.merge().map_err(|e| e.at(&name))?);
            }
        }
        Ok(self)
    }
}

impl<B: Backend> AdapterLayers<B> for BertEncoder<B> {
    fn adapter_layers(&self) -> Vec<(String, &AdaptedLinear<B>)> {
        self.named_linears()
    }

    fn adapter_layers_mut(&mut self) -> Vec<(String, &mut AdaptedLinear<B>)> {
        self.named_linears_mut()
    }
}

/// Mean of the hidden states over the real tokens (sentence-transformers' pooling).
///
/// # Shapes
/// - `hidden`: `[batch, seq, d]`, `mask`: `[batch, seq]`; output `[batch, d]`
pub fn mean_pool<B: Backend>(hidden: Tensor<B, 3>, mask: Tensor<B, 2, Int>) -> Tensor<B, 2> {
    let [batch, seq, d] = hidden.dims();
    let m = mask.float().reshape([batch, seq, 1]);
    let sum: Tensor<B, 2> = (hidden * m.clone()).sum_dim(1).reshape([batch, d]);
    let count: Tensor<B, 2> = m.sum_dim(1).reshape([batch, 1]).clamp_min(1e-9);
    sum / count
}

/// A sentence classifier: the encoder, mean pooling, dropout and a linear head.
#[derive(Module, Debug)]
pub struct BertClassifier<B: Backend> {
    /// The encoder.
    pub encoder: BertEncoder<B>,
    /// `[d, classes]`, always trained.
    pub head: Linear<B>,
    /// Dropout before the head.
    pub dropout: Dropout,
}

impl<B: Backend> BertClassifier<B> {
    /// An encoder and a fresh head for `classes` classes.
    pub fn new(
        source: &mut TensorSource,
        config: &BertConfig,
        peft: &PeftConfig,
        classes: usize,
        device: &B::Device,
    ) -> Result<Self, AdapterError> {
        if classes < 2 {
            return Err(AdapterError::config(
                "classifier",
                "classes",
                format!("{classes} classes: a classifier needs at least 2"),
            ));
        }
        Ok(Self {
            encoder: BertEncoder::new(source, config, peft, device)?,
            head: LinearConfig::new(config.hidden_size, classes).init(device),
            dropout: DropoutConfig::new(config.hidden_dropout_prob).init(),
        })
    }

    /// Class logits.
    ///
    /// # Shapes
    /// - `ids`, `mask`: `[batch, seq]`; output `[batch, classes]`
    pub fn forward(&self, ids: Tensor<B, 2, Int>, mask: Tensor<B, 2, Int>) -> Tensor<B, 2> {
        let h = self.encoder.forward(ids, mask.clone());
        self.head.forward(self.dropout.forward(mean_pool(h, mask)))
    }
}

impl<B: Backend> AdapterLayers<B> for BertClassifier<B> {
    fn adapter_layers(&self) -> Vec<(String, &AdaptedLinear<B>)> {
        self.encoder.named_linears()
    }

    fn adapter_layers_mut(&mut self) -> Vec<(String, &mut AdaptedLinear<B>)> {
        self.encoder.named_linears_mut()
    }
}
