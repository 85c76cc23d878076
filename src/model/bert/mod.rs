//! A BERT encoder (all-MiniLM-L6-v2, BERT) whose linear layers are [`AdaptedLinear`]s named
//! with Hugging Face's module paths (`encoder.layer.0.attention.self.query`) and whose FFN
//! blocks take a block adapter, a sequence classifier on top of it, and the loader for
//! pretrained Hugging Face folders. Adapters are placed by the generic
//! [`crate::place`](mod@crate::place); BERT only says which layers exist and which it targets
//! by default ([`bert_targets`]).

mod config;

pub use config::BertConfig;

use std::path::Path;

use burn::module::Module;
use burn::nn::{Dropout, DropoutConfig, Embedding, LayerNorm, Linear, LinearConfig};
use burn::tensor::{backend::Backend, Int, Tensor};

use super::heads::{merge_heads, split_heads};
use super::source::TensorSource;
use crate::adapter_layers;
use crate::block::BlockAdapters;
use crate::error::{AdapterError, ConfigError};
use crate::linear::AdaptedLinear;
use crate::multi::Routing;
use crate::place::{place, PlacementConfig, Targets};
use crate::shards::dropout;

/// BERT's default targets: every linear of every layer (attention query, key, value, output;
/// FFN intermediate and output).
pub fn bert_targets() -> Targets {
    Targets::list([
        "query",
        "key",
        "value",
        "attention.output.dense",
        "intermediate.dense",
        "output.dense",
    ])
}

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
    ///
    /// # Panics
    /// If `seq` is longer than the position table (`max_position_embeddings`).
    pub fn forward(&self, ids: Tensor<B, 2, Int>, token_types: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let [_, seq] = ids.dims();
        let table = self.position.weight.dims()[0];
        assert!(
            seq <= table,
            "{seq} tokens a row: this encoder has {table} positions \
             (max_position_embeddings); truncate the rows to at most that"
        );
        let positions = Tensor::<B, 1, Int>::arange(0..seq as i64, &ids.device()).unsqueeze::<2>();
        let embed = crate::qproduct::embed;
        let x = embed(&self.word, ids)
            + embed(&self.position, positions)
            + embed(&self.token_type, token_types);
        dropout(&self.dropout, self.norm.forward(x))
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
    /// - `x`: `[batch, seq, d]`, `mask`: additive, `[batch, 1, 1, seq]` or already broadcast
    ///   to `[batch, heads, seq, seq]`; output `[batch, seq, d]`
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        mask: Tensor<B, 4>,
        routing: Option<&Routing<B>>,
    ) -> Tensor<B, 3> {
        let dh = x.dims()[2] / self.heads;
        let split = |t: Tensor<B, 3>| split_heads(t, self.heads);
        // 1/√d_head applied to the query projection's output (contiguous, half the size of the
        // scores at 64 tokens) rather than to the scores: 5-17% faster attention forward +
        // backward on flex (`benches/encoder_ops.rs`).
        let q = self.query.forward_routed(x.clone(), routing);
        let q = split(q.div_scalar((dh as f64).sqrt()));
        let k = split(self.key.forward_routed(x.clone(), routing));
        let v = split(self.value.forward_routed(x.clone(), routing));
        let scores = crate::product::batched(q, k.transpose()) + mask;
        let probs = dropout(&self.probs_dropout, crate::quirks::softmax(scores, 3));
        let ctx = merge_heads(crate::product::batched(probs, v));
        let out = dropout(&self.dropout, self.output.forward_routed(ctx, routing));
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
        routing: Option<&Routing<B>>,
    ) -> Tensor<B, 3> {
        let h = self.attention.forward(x, mask, routing);
        // The block f: the FFN without its residual and norm.
        // Exact GELU, with its exact derivative on every backend (`quirks::gelu`).
        let inner = crate::quirks::gelu(self.intermediate.forward_routed(h.clone(), routing));
        let fx = self.output.forward_routed(inner, routing);
        let fx = match block {
            Some((adapters, i)) => adapters.forward(i, h.clone(), fx),
            None => fx,
        };
        self.norm.forward(dropout(&self.dropout, fx) + h)
    }
}

/// A BERT encoder: embeddings and layers, with adapters where a [`PlacementConfig`] puts them.
#[derive(Module, Debug)]
pub struct BertEncoder<B: Backend> {
    /// The embeddings.
    pub embeddings: Embeddings<B>,
    /// The layers.
    pub layers: Vec<BertLayer<B>>,
    /// Block adapters on the FFNs, if any.
    pub block_adapters: Option<BlockAdapters<B>>,
}

/// The Hugging Face module name of a layer's weights.
fn hf(i: usize, rest: &str) -> String {
    format!("encoder.layer.{i}.{rest}")
}

impl<B: Backend> BertEncoder<B> {
    /// Builds the encoder from `source` (a pretrained file, or random weights), frozen, with the
    /// adapters `placement` describes, placed by [`crate::place()`] (the training mode is applied
    /// by the trainer, on the autodiff backend).
    pub fn new(
        source: &mut TensorSource,
        config: &BertConfig,
        placement: &PlacementConfig,
        device: &B::Device,
    ) -> Result<Self, ConfigError> {
        config.validate()?;
        source.check_holds("BertConfig", config.num_params())?;
        placement.validate()?;
        source.ignore(IGNORED);
        let (d, ffn) = (config.hidden_size, config.intermediate_size);
        let eps = config.layer_norm_eps;
        let hidden_dropout = DropoutConfig::new(config.hidden_dropout_prob).init();
        let probs_dropout = DropoutConfig::new(config.attention_probs_dropout_prob).init();
        let frozen = |src: &mut TensorSource, name: String, d_in: usize, d_out: usize| {
            AdaptedLinear::frozen(src.linear::<B>(&name, d_in, d_out, true, device))
        };
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let attention = Attention {
                query: frozen(source, hf(i, "attention.self.query"), d, d),
                key: frozen(source, hf(i, "attention.self.key"), d, d),
                value: frozen(source, hf(i, "attention.self.value"), d, d),
                output: frozen(source, hf(i, "attention.output.dense"), d, d),
                norm: source.layer_norm(&hf(i, "attention.output.LayerNorm"), d, eps, device),
                probs_dropout: probs_dropout.clone(),
                dropout: hidden_dropout.clone(),
                heads: config.num_attention_heads,
            };
            layers.push(BertLayer {
                attention,
                intermediate: frozen(source, hf(i, "intermediate.dense"), d, ffn),
                output: frozen(source, hf(i, "output.dense"), ffn, d),
                norm: source.layer_norm(&hf(i, "output.LayerNorm"), d, eps, device),
                dropout: hidden_dropout.clone(),
            });
        }
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
        let block_adapters = placement
            .block
            .as_ref()
            .map(|cfg| BlockAdapters::new(cfg, d, config.num_hidden_layers, device))
            .transpose()?;
        let encoder = Self {
            embeddings,
            layers,
            block_adapters,
        };
        place(encoder, placement, device)
    }

    /// The last hidden state.
    ///
    /// # Shapes
    /// - `ids`, `mask` (1 for tokens, 0 for padding): `[batch, seq]`; output `[batch, seq, d]`
    ///
    /// # Panics
    /// If `seq` is longer than `max_position_embeddings`.
    pub fn forward(&self, ids: Tensor<B, 2, Int>, mask: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        self.forward_routed(ids, mask, None)
    }

    /// [`BertEncoder::forward`] with per-row adapters (see [`crate::multi`]).
    pub fn forward_routed(
        &self,
        ids: Tensor<B, 2, Int>,
        mask: Tensor<B, 2, Int>,
        routing: Option<&Routing<B>>,
    ) -> Tensor<B, 3> {
        let [batch, seq] = ids.dims();
        if batch * seq == 0 {
            // No tokens: Burn's embedding lookup cannot take an empty row.
            let d = self.embeddings.word.weight.dims()[1];
            return Tensor::zeros([batch, seq, d], &ids.device());
        }
        let token_types = Tensor::<B, 2, Int>::zeros([batch, seq], &ids.device());
        let mut x = self.embeddings.forward(ids, token_types);
        // Additive mask: 0 for tokens, a large negative number for padding.
        let additive = mask
            .float()
            .sub_scalar(1.0)
            .mul_scalar(1e9)
            .reshape([batch, 1, 1, seq]);
        // Broadcast to the scores' shape once rather than in every layer's add where that is
        // slow (burn-flex, `quirks`).
        let heads = self.layers.first().map_or(1, |l| l.attention.heads);
        let additive = crate::quirks::expand_for_adds(additive, [batch, heads, seq, seq]);
        for (i, layer) in self.layers.iter().enumerate() {
            let block = self.block_adapters.as_ref().map(|b| (b, i));
            x = layer.forward(x, additive.clone(), block, routing);
        }
        x
    }

    /// Merges every linear adapter into its base weight: the encoder then costs what the
    /// pretrained one does (block adapters, which cannot merge, stay).
    pub fn merge(self) -> Result<Self, ConfigError> {
        crate::AdapterLayers::<B>::merge_adapters(self)
    }
}

adapter_layers!(Attention {
    query => "self.query",
    key => "self.key",
    value => "self.value",
    output => "output.dense",
});
adapter_layers!(BertLayer {
    attention => "attention",
    intermediate => "intermediate.dense",
    output => "output.dense",
});
adapter_layers!(BertEncoder { layers => "encoder.layer" } defaults bert_targets());
adapter_layers!(BertClassifier { encoder => "" } defaults bert_targets());

/// Mean of the hidden states over the real tokens (sentence-transformers' pooling).
///
/// # Shapes
/// - `hidden`: `[batch, seq, d]`, `mask`: `[batch, seq]`; output `[batch, d]`
pub fn mean_pool<B: Backend>(hidden: Tensor<B, 3>, mask: Tensor<B, 2, Int>) -> Tensor<B, 2> {
    let [batch, seq, d] = hidden.dims();
    if batch * seq == 0 {
        // Rows of no tokens pool to zeros (as the clamped count below gives); the CubeCL
        // backends' sums cannot take an empty dimension.
        return Tensor::zeros([batch, d], &hidden.device());
    }
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
        placement: &PlacementConfig,
        classes: usize,
        device: &B::Device,
    ) -> Result<Self, ConfigError> {
        if classes < 2 {
            return Err(ConfigError::invalid(
                "classifier",
                "classes",
                format!("{classes} classes: a classifier needs at least 2"),
            ));
        }
        Ok(Self {
            encoder: BertEncoder::new(source, config, placement, device)?,
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
        let pooled = mean_pool(h, mask);
        if pooled.dims()[0] == 0 {
            // No rows: burn-ndarray's product divides by the row count.
            let classes = self.head.weight.dims()[1];
            return Tensor::zeros([0, classes], &pooled.device());
        }
        self.head.forward(dropout(&self.dropout, pooled))
    }
}

/// Keys in Hugging Face BERT checkpoints that the encoder does not use: buffers, and the BERT
/// pooler (sentence-transformers pools by mean, as this encoder does).
const IGNORED: &[&str] = &[
    "embeddings.position_ids",
    "pooler.dense.weight",
    "pooler.dense.bias",
];

/// Loads a pretrained classifier from a Hugging Face model directory (`config.json` and
/// `model.safetensors`), with the adapters `placement` describes and a fresh head of `classes`.
pub fn load_pretrained<B: Backend>(
    model_dir: impl AsRef<Path>,
    placement: &PlacementConfig,
    classes: usize,
    device: &B::Device,
) -> Result<(BertClassifier<B>, BertConfig), AdapterError> {
    let dir = model_dir.as_ref();
    let config = BertConfig::from_json_file(dir.join("config.json"))?;
    let mut source = TensorSource::from_model_dir(dir)?;
    let model = BertClassifier::new(&mut source, &config, placement, classes, device)?;
    source.finish()?;
    Ok((model, config))
}

/// Builds a classifier from any [`TensorSource`] (a pretrained file, or random weights for
/// tests and timing), checking that a file source held exactly BERT's tensors.
pub fn classifier_from_source<B: Backend>(
    mut source: TensorSource,
    config: &BertConfig,
    placement: &PlacementConfig,
    classes: usize,
    device: &B::Device,
) -> Result<BertClassifier<B>, AdapterError> {
    let model = BertClassifier::new(&mut source, config, placement, classes, device)?;
    source.finish()?;
    Ok(model)
}
