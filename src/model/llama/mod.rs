//! A Llama-family decoder (SmolLM/SmolLM2, TinyLlama, Llama 2/3, Mistral, Qwen2 by
//! configuration) as Burn modules: token embedding, RMSNorm, RoPE, grouped-query causal
//! self-attention with a KV cache, SwiGLU MLP, tied or untied LM head. Every projection is an
//! [`AdaptedLinear`] named with Hugging Face's path (`model.layers.0.self_attn.q_proj`,
//! `model.layers.0.mlp.gate_proj`), so placement targets and PEFT files work unchanged.
//!
//! Weights load from a Hugging Face folder (`config.json` + `model.safetensors` or a sharded
//! index) or from a GGUF file, dequantized, with llama.cpp's row permutation of `q_proj` and
//! `k_proj` undone so that the modules hold the Hugging Face layout and RoPE rotates the
//! halves of each head (`rotate_half`), as `transformers` does ([`load`]).

mod config;

pub use config::{LlamaConfig, RopeScaling};

use std::collections::BTreeMap;
use std::path::Path;

use burn::module::Module;
use burn::nn::{Embedding, Linear, RmsNorm, RmsNormConfig};
use burn::tensor::{backend::Backend, Bool, Int, Tensor, TensorData};

use super::heads;
use super::source::{Fill, TensorSource};
use crate::adapter_layers;
use crate::error::{AdapterError, ConfigError};
use crate::linear::{AdaptedLinear, AdapterLayers};
use crate::multi::Routing;
use crate::place::{place, PlacementConfig, Targets};
use crate::quant::QuantConfig;
use crate::store::gguf::{self, GgmlType, GgufFile, GgufTensorInfo, GgufTensorSpec, GgufValue};
use crate::store::st::HostTensor;

/// The seven projections of a Llama layer: the default targets (PEFT's own default for Llama is
/// `q_proj` and `v_proj`; the Kron-LoRA paper adapts all seven).
pub const PROJECTIONS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// The decoder's default targets: all seven projections of every layer.
pub fn llama_targets() -> Targets {
    Targets::list(PROJECTIONS)
}

/// Keys and values of every layer for the positions seen so far (incremental decoding).
#[derive(Debug)]
pub struct KvCache<B: Backend> {
    layers: Vec<Option<(Tensor<B, 4>, Tensor<B, 4>)>>,
    len: usize,
}

impl<B: Backend> KvCache<B> {
    /// An empty cache for `layers` layers.
    pub fn new(layers: usize) -> Self {
        Self {
            layers: vec![None; layers],
            len: 0,
        }
    }

    /// Positions cached.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Nothing cached?
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The cache of a one-row batch repeated `n` times (to continue one prefix in `n` ways).
    pub fn repeat(&self, n: usize) -> Self {
        Self {
            layers: self
                .layers
                .iter()
                .map(|l| {
                    l.as_ref()
                        .map(|(k, v)| (k.clone().repeat_dim(0, n), v.clone().repeat_dim(0, n)))
                })
                .collect(),
            len: self.len,
        }
    }
}

/// RoPE's cosines and sines for a run of positions, `[rows, 1, seq, head_dim]` each (`rows` 1
/// or one per batch row; the halves repeated, as `transformers` builds them).
///
/// On burn-flex, whose element-wise operations on a broadcast or permuted operand go one
/// element at a time (`quirks`), RoPE runs on the projections' contiguous `[b, seq, n, hd]`
/// outputs instead, before the head split: the cosines and sines broadcast to that shape once
/// per forward for the query and the key/value head counts, and `rotate_half` a product with
/// the `hd × hd` signed permutation (exact). 10.8 against 0.4 ms for SmolLM2's queries at
/// 8 × 64 tokens.
struct Rope<B: Backend> {
    cos: Tensor<B, 4>,
    sin: Tensor<B, 4>,
    /// flex only: RoPE before the head split ([`FlexRope`]).
    flex: Option<FlexRope<B>>,
}

/// RoPE's tables for the projections' `[b, seq, n, hd]` outputs on flex.
struct FlexRope<B: Backend> {
    /// `(heads, cos, sin)` broadcast to `[b, seq, heads, hd]`, per head count.
    expanded: Vec<(usize, Tensor<B, 4>, Tensor<B, 4>)>,
    /// `rotate_half` as `x·r` (`[hd, hd]`).
    rotation: Tensor<B, 2>,
}

impl<B: Backend> Rope<B> {
    /// Positions `start..start + seq`, or per row `start + c - left_pad[r]` (left-padded
    /// batches: each row's first real token at position 0).
    fn new(
        config: &LlamaConfig,
        start: usize,
        (batch, seq): (usize, usize),
        left_pad: Option<&[usize]>,
        device: &B::Device,
    ) -> Self {
        let inv = config.inv_freq();
        let (half, hd) = (inv.len(), config.head_dim);
        let scale = config.position_scale();
        let pads = left_pad.unwrap_or(&[0]);
        let rows = pads.len();
        let mut cos = vec![0f32; rows * seq * hd];
        let mut sin = vec![0f32; rows * seq * hd];
        for (r, &pad) in pads.iter().enumerate() {
            for p in 0..seq {
                let pos = (start + p).saturating_sub(pad) as f64 * scale;
                let at = (r * seq + p) * hd;
                for (i, f) in inv.iter().enumerate() {
                    let angle = (pos as f32) * (*f as f32);
                    let (s, c) = (angle.sin(), angle.cos());
                    for j in [i, i + half] {
                        cos[at + j] = c;
                        sin[at + j] = s;
                    }
                }
            }
        }
        let t = |v: Vec<f32>| Tensor::from_data(TensorData::new(v, [rows, 1, seq, hd]), device);
        let (cos, sin) = (t(cos), t(sin));
        if !crate::quirks::products_beat_copies::<B>(device) {
            return Self {
                cos,
                sin,
                flex: None,
            };
        }
        let mut heads = vec![config.num_attention_heads, config.num_key_value_heads];
        heads.dedup();
        let expanded = heads
            .into_iter()
            .map(|n| {
                let grow = |t: Tensor<B, 4>| {
                    let t = t.reshape([rows, seq, 1, hd]);
                    crate::quirks::expand_for_adds(t, [batch, seq, n, hd])
                };
                (n, grow(cos.clone()), grow(sin.clone()))
            })
            .collect();
        // (x·r)[j] = -x[j + half] for j < half, x[j - half] after.
        let mut r = vec![0f32; hd * hd];
        for j in 0..half {
            r[(j + half) * hd + j] = -1.0;
            r[j * hd + j + half] = 1.0;
        }
        let rotation = Tensor::from_data(TensorData::new(r, [hd, hd]), device);
        Self {
            cos,
            sin,
            flex: Some(FlexRope { expanded, rotation }),
        }
    }

    /// RoPE on a projection's output `p [b, seq, n·hd]`, split into `n` heads:
    /// `[b, n, seq, hd]` (a view where the heads are split after RoPE).
    fn apply_heads(&self, p: Tensor<B, 3>, n: usize) -> Tensor<B, 4> {
        let [b, s, _] = p.dims();
        let hd = self.cos.dims()[3];
        let x = p.reshape([b, s, n, hd]);
        let found = self.flex.as_ref().and_then(|f| {
            let (_, cos, sin) = f.expanded.iter().find(|(heads, ..)| *heads == n)?;
            Some((cos, sin, &f.rotation))
        });
        match found {
            Some((cos, sin, r)) => {
                let rotated = x.clone().reshape([b * s * n, hd]).matmul(r.clone());
                let t = x * cos.clone() + rotated.reshape([b, s, n, hd]) * sin.clone();
                // The head split's gradient comes back as a permuted view: made contiguous
                // before RoPE's products see it.
                heads::contiguous_gradient(t).swap_dims(1, 2)
            }
            _ => self.apply(x.swap_dims(1, 2)),
        }
    }

    /// `x·cos + rotate_half(x)·sin` for `x [b, heads, seq, head_dim]`.
    fn apply(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let [b, h, s, hd] = x.dims();
        let half = hd / 2;
        let x1 = x.clone().slice([0..b, 0..h, 0..s, 0..half]);
        let x2 = x.clone().slice([0..b, 0..h, 0..s, half..hd]);
        let rotated = crate::kron::autodiff::cat(vec![x2.neg(), x1], 3);
        x * self.cos.clone() + rotated * self.sin.clone()
    }
}

/// Grouped-query causal self-attention.
#[derive(Module, Debug)]
pub struct LlamaAttention<B: Backend> {
    /// `self_attn.q_proj`, `[d, heads·head_dim]`.
    pub q_proj: AdaptedLinear<B>,
    /// `self_attn.k_proj`, `[d, kv_heads·head_dim]`.
    pub k_proj: AdaptedLinear<B>,
    /// `self_attn.v_proj`, `[d, kv_heads·head_dim]`.
    pub v_proj: AdaptedLinear<B>,
    /// `self_attn.o_proj`, `[heads·head_dim, d]`.
    pub o_proj: AdaptedLinear<B>,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Size of a head.
    pub head_dim: usize,
}

impl<B: Backend> LlamaAttention<B> {
    /// # Shapes
    /// - `x`: `[b, s, d]`; `mask`: additive `[b, 1, g·s, past + s]` (the `[b, 1, s, past + s]`
    ///   mask repeated for the `g = heads / kv_heads` query heads of a group, see
    ///   [`layer_mask`]) or that broadcast to `[b, kv_heads, g·s, past + s]`; output `[b, s, d]`
    /// - `scores_at_once`: [`LlamaConfig::attention_scores_at_once`]
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        x: Tensor<B, 3>,
        rope: &Rope<B>,
        mask: Tensor<B, 4>,
        scores_at_once: usize,
        cache: Option<&mut Option<(Tensor<B, 4>, Tensor<B, 4>)>>,
        routing: Option<&Routing<B>>,
    ) -> Tensor<B, 3> {
        let [b, s, _] = x.dims();
        let (h, kvh, hd) = (self.heads, self.kv_heads, self.head_dim);
        // 1/√head_dim on the query projection's contiguous output (RoPE is linear, so this
        // equals scaling the scores; cheaper, see the encoder's attention).
        let q = self.q_proj.forward_routed(x.clone(), routing);
        let q = rope.apply_heads(q.div_scalar((hd as f64).sqrt()), h);
        let k = self.k_proj.forward_routed(x.clone(), routing);
        let mut k = rope.apply_heads(k, kvh);
        let mut v = heads::split_heads(self.v_proj.forward_routed(x, routing), kvh);
        if let Some(slot) = cache {
            if let Some((pk, pv)) = slot.take() {
                k = crate::kron::autodiff::cat(vec![pk, k], 2);
                v = crate::kron::autodiff::cat(vec![pv, v], 2);
            }
            *slot = Some((k.clone(), v.clone()));
        }
        // Heads h share key/value head h / g (transformers' repeat_kv): view the g query heads
        // of a group as one longer sequence instead of repeating k and v.
        let g = h / kvh;
        // The regrouping copies q; on flex by the crate's copy (`heads`).
        let rows = g * s;
        let q = heads::contiguous(q).reshape([b, kvh, rows, hd]);
        let kt = k.swap_dims(2, 3);
        let total = kt.dims()[3];
        let attend = |q: Tensor<B, 4>, mask: Tensor<B, 4>| {
            let probs = crate::quirks::softmax(crate::product::batched(q, kt.clone()) + mask, 3);
            crate::product::batched(probs, v.clone())
        };
        let ctx = match attention_blocks::<B>(&q.device(), scores_at_once, b * kvh, rows, total) {
            None => attend(q, mask),
            // Long sequences: the scores a block of query rows at a time (each row's softmax is
            // its own), so that no `[b, kv_heads, g·s, total]` scores, mask or score gradient
            // exists at once. In training (the crate's backward registered), whole or in
            // blocks, one node that keeps no probabilities (`model::attention`).
            Some(block) => crate::model::attention::blocked(q, kt, v, mask, block),
        };
        let ctx = ctx.reshape([b, h, s, hd]);
        // The merge's gradient, a permuted view, is regrouped by a reshape: contiguous first.
        let ctx = heads::contiguous_gradient(ctx);
        self.o_proj.forward_routed(heads::merge_heads(ctx), routing)
    }
}

/// The SwiGLU MLP: `down(silu(gate(x)) · up(x))`.
#[derive(Module, Debug)]
pub struct LlamaMlp<B: Backend> {
    /// `mlp.gate_proj`, `[d, ffn]`.
    pub gate_proj: AdaptedLinear<B>,
    /// `mlp.up_proj`, `[d, ffn]`.
    pub up_proj: AdaptedLinear<B>,
    /// `mlp.down_proj`, `[ffn, d]`.
    pub down_proj: AdaptedLinear<B>,
}

impl<B: Backend> LlamaMlp<B> {
    fn forward(&self, x: Tensor<B, 3>, routing: Option<&Routing<B>>) -> Tensor<B, 3> {
        let gate = crate::quirks::silu(self.gate_proj.forward_routed(x.clone(), routing));
        self.down_proj
            .forward_routed(gate * self.up_proj.forward_routed(x, routing), routing)
    }
}

/// One decoder layer (pre-norm): `h = x + attn(norm(x))`, `y = h + mlp(norm(h))`.
#[derive(Module, Debug)]
pub struct LlamaLayer<B: Backend> {
    /// `input_layernorm`.
    pub input_layernorm: RmsNorm<B>,
    /// `self_attn`.
    pub self_attn: LlamaAttention<B>,
    /// `post_attention_layernorm`.
    pub post_attention_layernorm: RmsNorm<B>,
    /// `mlp`.
    pub mlp: LlamaMlp<B>,
}

/// The decoder body (`model.*`): embedding, layers, final norm.
#[derive(Module, Debug)]
pub struct LlamaModel<B: Backend> {
    /// `embed_tokens`, `[vocab, d]`.
    pub embed_tokens: Embedding<B>,
    /// `layers`.
    pub layers: Vec<LlamaLayer<B>>,
    /// `norm`.
    pub norm: RmsNorm<B>,
    /// The configuration (RoPE settings, sizes).
    pub config: LlamaConfig,
}

/// A causal language model: the decoder and its LM head (tied to the embedding when `lm_head`
/// is `None`).
#[derive(Module, Debug)]
pub struct LlamaForCausalLM<B: Backend> {
    /// `model`.
    pub model: LlamaModel<B>,
    /// `lm_head`, `[d, vocab]`; `None` when tied to `model.embed_tokens`.
    pub lm_head: Option<Linear<B>>,
}

adapter_layers!(LlamaAttention {
    q_proj => "q_proj",
    k_proj => "k_proj",
    v_proj => "v_proj",
    o_proj => "o_proj",
});
adapter_layers!(LlamaMlp {
    gate_proj => "gate_proj",
    up_proj => "up_proj",
    down_proj => "down_proj",
});
adapter_layers!(LlamaLayer { self_attn => "self_attn", mlp => "mlp" });
adapter_layers!(LlamaModel { layers => "layers" } defaults llama_targets());
adapter_layers!(LlamaForCausalLM { model => "model" } defaults llama_targets());

/// The additive attention mask `[b, 1, s, past + s]`: 0 where a query may look (a real key at
/// or before its position), a large negative number elsewhere.
fn attention_mask<B: Backend>(
    padding: Option<Tensor<B, 2, Int>>,
    b: usize,
    s: usize,
    past: usize,
    device: &B::Device,
) -> Tensor<B, 4> {
    let total = past + s;
    let mut causal = vec![0f32; s * total];
    for i in 0..s {
        for j in (past + i + 1)..total {
            causal[i * total + j] = -1e9;
        }
    }
    let causal: Tensor<B, 4> = Tensor::from_data(TensorData::new(causal, [1, 1, s, total]), device);
    match padding {
        Some(m) => {
            // `m` covers the keys: [b, past + s], 1 for tokens, 0 for padding.
            let keys = m
                .float()
                .sub_scalar(1.0)
                .mul_scalar(1e9)
                .reshape([b, 1, 1, total]);
            causal + keys
        }
        None => causal.repeat_dim(0, b),
    }
}

/// The mask every layer adds to its scores, built once per forward: `mask [b, 1, s, total]`
/// repeated for the `g` query heads that share a key/value head (the attention views them as
/// one sequence of `g·s` queries), and on backends whose broadcast adds are slow broadcast to
/// the scores' `[b, kv_heads, g·s, total]` (`quirks`).
///
/// Where the attention goes through `model::attention` ([`attention_blocks`]), the mask stays
/// `[b, 1, g·s, total]`: each block adds its own rows (on flex by the softmax's kernel) or
/// broadcasts them.
fn layer_mask<B: Backend>(mask: Tensor<B, 4>, config: &LlamaConfig) -> Tensor<B, 4> {
    let [b, _, s, total] = mask.dims();
    let kvh = config.num_key_value_heads;
    let g = config.num_attention_heads / kvh;
    let mask = if g > 1 { mask.repeat_dim(2, g) } else { mask };
    let at_once = config.attention_scores_at_once;
    if attention_blocks::<B>(&mask.device(), at_once, b * kvh, g * s, total).is_some() {
        return mask;
    }
    crate::quirks::expand_for_adds(mask, [b, kvh, g * s, total])
}

/// Query rows a block where the attention's scores `[batch, rows, total]` (`batch` = b ·
/// kv_heads, `rows` = g·s) are more than `at_once` values
/// ([`LlamaConfig::attention_scores_at_once`]): blocks of at most that size (a 2,048-token
/// Mistral-7B layer's 512 MB of scores in two blocks by default: its training step's peak
/// 2,683 → 2,289 MB for 1.00–1.05× the time, 1,808–1,821 MB since training's attention is one
/// node, `model::attention`; blocks of a quarter and a sixteenth of that size saved no more and
/// cost 1.08× and 1.14×); `None` where they are computed whole.
fn attention_block_rows(at_once: usize, batch: usize, rows: usize, total: usize) -> Option<usize> {
    let per_row = (batch * total).max(1);
    (per_row * rows > at_once).then(|| (at_once / per_row).max(1))
}

/// Query rows a block of `model::attention::blocked`: [`attention_block_rows`], or all `rows` in
/// one block where the crate's autodiff node takes the attention (training); `None` where Burn's
/// operations compute it whole, on the mask `layer_mask` expanded. The attention and
/// `layer_mask` both decide by it.
fn attention_blocks<B: Backend>(
    device: &B::Device,
    at_once: usize,
    batch: usize,
    rows: usize,
    total: usize,
) -> Option<usize> {
    attention_block_rows(at_once, batch, rows, total)
        .or_else(|| crate::model::attention::is_node::<B>(device).then_some(rows))
}

impl<B: Backend> LlamaModel<B> {
    /// The last hidden state.
    ///
    /// # Shapes
    /// - `ids`: `[b, s]`; `padding` (1 token, 0 padding; right-padded): `[b, past + s]`;
    ///   output `[b, s, d]`
    pub fn forward(
        &self,
        ids: Tensor<B, 2, Int>,
        padding: Option<Tensor<B, 2, Int>>,
        cache: Option<&mut KvCache<B>>,
    ) -> Tensor<B, 3> {
        self.forward_routed(ids, padding, cache, None, None)
    }

    /// [`LlamaModel::forward`] with per-row adapters (`routing`, see [`crate::multi`]) and,
    /// for left-padded batches, each row's count of left padding (its first real token is at
    /// position 0).
    pub fn forward_routed(
        &self,
        ids: Tensor<B, 2, Int>,
        padding: Option<Tensor<B, 2, Int>>,
        mut cache: Option<&mut KvCache<B>>,
        routing: Option<&Routing<B>>,
        left_pad: Option<&[usize]>,
    ) -> Tensor<B, 3> {
        let [b, s] = ids.dims();
        let device = ids.device();
        if b * s == 0 {
            // No tokens: Burn's embedding lookup cannot take an empty row; the cache is unchanged.
            return Tensor::zeros([b, s, self.config.hidden_size], &device);
        }
        let past = cache.as_ref().map_or(0, |c| c.len);
        let rope = Rope::new(&self.config, past, (b, s), left_pad, &device);
        let mask = layer_mask(attention_mask(padding, b, s, past, &device), &self.config);
        let mut x = crate::qproduct::embed(&self.embed_tokens, ids);
        for (i, layer) in self.layers.iter().enumerate() {
            let slot = cache.as_mut().map(|c| &mut c.layers[i]);
            let h = x.clone()
                + layer.self_attn.forward(
                    layer.input_layernorm.forward(x),
                    &rope,
                    mask.clone(),
                    self.config.attention_scores_at_once,
                    slot,
                    routing,
                );
            x = h.clone()
                + layer
                    .mlp
                    .forward(layer.post_attention_layernorm.forward(h), routing);
        }
        if let Some(c) = cache {
            c.len += s;
        }
        self.norm.forward(x)
    }
}

impl<B: Backend> LlamaForCausalLM<B> {
    /// Builds the model from `source` (Hugging Face names and layout, or random weights),
    /// frozen, with the adapters `placement` describes (placed by [`crate::place()`]).
    pub fn new(
        source: &mut TensorSource,
        config: &LlamaConfig,
        placement: &PlacementConfig,
        device: &B::Device,
    ) -> Result<Self, ConfigError> {
        config.validate()?;
        source.check_holds("LlamaConfig", config.num_params())?;
        placement.validate()?;
        if placement.block.is_some() {
            return Err(ConfigError::invalid(
                "placement",
                "block",
                "block adapters attach to BERT's FFN blocks; the decoder takes linear adapters",
            ));
        }
        let c = config;
        let (d, hd) = (c.hidden_size, c.head_dim);
        let frozen = |src: &mut TensorSource, name: String, i: usize, o: usize, bias: bool| {
            AdaptedLinear::frozen(src.linear::<B>(&name, i, o, bias, device))
        };
        let norm = |src: &mut TensorSource, name: &str| {
            let mut n = RmsNormConfig::new(d)
                .with_epsilon(c.rms_norm_eps)
                .init::<B>(device);
            n.gamma = burn::module::Param::from_tensor(src.tensor(name, [d], Fill::Ones, device));
            n.no_grad()
        };
        // The embedding first: its `f32` values (the largest tensor) are quantized, where the
        // frozen weights are, before the layers' add to what the process holds.
        let embed_tokens = source.embedding("model.embed_tokens", c.vocab_size, d, device);
        let layers = (0..c.num_hidden_layers)
            .map(|i| {
                let p = |rest: &str| format!("model.layers.{i}.{rest}");
                LlamaLayer {
                    input_layernorm: norm(source, &p("input_layernorm.weight")),
                    self_attn: LlamaAttention {
                        q_proj: frozen(
                            source,
                            p("self_attn.q_proj"),
                            d,
                            c.num_attention_heads * hd,
                            c.qkv_bias,
                        ),
                        k_proj: frozen(
                            source,
                            p("self_attn.k_proj"),
                            d,
                            c.num_key_value_heads * hd,
                            c.qkv_bias,
                        ),
                        v_proj: frozen(
                            source,
                            p("self_attn.v_proj"),
                            d,
                            c.num_key_value_heads * hd,
                            c.qkv_bias,
                        ),
                        o_proj: frozen(
                            source,
                            p("self_attn.o_proj"),
                            c.num_attention_heads * hd,
                            d,
                            c.o_bias,
                        ),
                        heads: c.num_attention_heads,
                        kv_heads: c.num_key_value_heads,
                        head_dim: hd,
                    },
                    post_attention_layernorm: norm(source, &p("post_attention_layernorm.weight")),
                    mlp: LlamaMlp {
                        gate_proj: frozen(
                            source,
                            p("mlp.gate_proj"),
                            d,
                            c.intermediate_size,
                            c.mlp_bias,
                        ),
                        up_proj: frozen(
                            source,
                            p("mlp.up_proj"),
                            d,
                            c.intermediate_size,
                            c.mlp_bias,
                        ),
                        down_proj: frozen(
                            source,
                            p("mlp.down_proj"),
                            c.intermediate_size,
                            d,
                            c.mlp_bias,
                        ),
                    },
                }
            })
            .collect();
        let model = LlamaModel {
            embed_tokens,
            layers,
            norm: norm(source, "model.norm.weight"),
            config: c.clone(),
        };
        let lm_head = (!c.tie_word_embeddings)
            .then(|| source.linear::<B>("lm_head", d, c.vocab_size, false, device));
        // A tied checkpoint may still carry lm_head.weight (a copy): not unexpected.
        if c.tie_word_embeddings {
            source.ignore(&["lm_head.weight"]);
        }
        place(Self { model, lm_head }, placement, device)
    }

    /// The configuration.
    pub fn config(&self) -> &LlamaConfig {
        &self.model.config
    }

    /// Logits for hidden states: the LM head (or the tied embedding) applied to them. Pass
    /// only the rows the loss or the next token needs: the head is the model's largest matmul.
    ///
    /// # Shapes
    /// - `hidden`: `[..., d]`; output `[..., vocab]`
    pub fn logits<const D: usize>(&self, hidden: Tensor<B, D>) -> Tensor<B, D> {
        match &self.lm_head {
            Some(head) => crate::linear::linear_on_rows(head, hidden),
            None => {
                let w = self.model.embed_tokens.weight.val(); // [vocab, d]
                let mut dims = hidden.dims();
                let d = dims[D - 1];
                let n = hidden.shape().num_elements() / d.max(1);
                dims[D - 1] = self.model.config.vocab_size;
                if n == 0 {
                    // No rows (see `linear_rows`).
                    return Tensor::zeros(dims, &hidden.device());
                }
                // An int8 table on flex, read in place; else Burn's product.
                let out = match crate::qproduct::product_t(hidden.reshape([n, d]), w) {
                    Ok(out) => out,
                    // A quantized table dequantized before the transpose: burn-ndarray 0.21
                    // transposes a block-quantized tensor without moving its blocks' scales.
                    Err((x, w)) => x.matmul(crate::quant::float_values(w).transpose()),
                };
                out.reshape(dims)
            }
        }
    }

    /// Logits at every position.
    ///
    /// # Shapes
    /// - `ids`, `padding`: `[b, s]`; output `[b, s, vocab]`
    pub fn forward(
        &self,
        ids: Tensor<B, 2, Int>,
        padding: Option<Tensor<B, 2, Int>>,
    ) -> Tensor<B, 3> {
        self.logits(self.model.forward(ids, padding, None))
    }

    /// Logits of the last position of `ids` appended to `cache` (incremental decoding; no
    /// padding: rows of one length).
    ///
    /// # Shapes
    /// - `ids`: `[b, s]`; output `[b, vocab]`
    ///
    /// # Panics
    /// If `s` is 0: there is no last position to give the logits of.
    pub fn forward_cached(&self, ids: Tensor<B, 2, Int>, cache: &mut KvCache<B>) -> Tensor<B, 2> {
        let [b, s] = ids.dims();
        assert!(
            s > 0,
            "forward_cached: `ids` is [{b}, 0], no tokens; give each row at least one"
        );
        let h = self.model.forward(ids, None, Some(cache));
        let d = h.dims()[2];
        let last = h.slice([0..b, s - 1..s, 0..d]).reshape([b, d]);
        self.logits(last)
    }

    /// A fresh KV cache for this model.
    pub fn new_cache(&self) -> KvCache<B> {
        KvCache::new(self.model.layers.len())
    }
}

/// A padding mask `[b, s]` from per-row lengths (right padding).
pub fn padding_mask<B: Backend>(
    lengths: &[usize],
    s: usize,
    device: &B::Device,
) -> Tensor<B, 2, Int> {
    let mut m = vec![0i64; lengths.len() * s];
    for (r, &len) in lengths.iter().enumerate() {
        for c in 0..len.min(s) {
            m[r * s + c] = 1;
        }
    }
    Tensor::from_data(TensorData::new(m, [lengths.len(), s]), device)
}

/// A boolean mask `[b, s]` true where `mask` is 0 (for masked fills).
pub fn is_padding<B: Backend>(mask: Tensor<B, 2, Int>) -> Tensor<B, 2, Bool> {
    mask.equal_elem(0)
}

/// GGUF tensor names and their Hugging Face names (`blk.N.*` per layer).
const GGUF_NAMES: &[(&str, &str)] = &[
    ("attn_norm.weight", "input_layernorm.weight"),
    ("attn_q.weight", "self_attn.q_proj.weight"),
    ("attn_q.bias", "self_attn.q_proj.bias"),
    ("attn_k.weight", "self_attn.k_proj.weight"),
    ("attn_k.bias", "self_attn.k_proj.bias"),
    ("attn_v.weight", "self_attn.v_proj.weight"),
    ("attn_v.bias", "self_attn.v_proj.bias"),
    ("attn_output.weight", "self_attn.o_proj.weight"),
    ("attn_output.bias", "self_attn.o_proj.bias"),
    ("ffn_norm.weight", "post_attention_layernorm.weight"),
    ("ffn_gate.weight", "mlp.gate_proj.weight"),
    ("ffn_up.weight", "mlp.up_proj.weight"),
    ("ffn_down.weight", "mlp.down_proj.weight"),
];

/// The names outside the layers: (GGUF, Hugging Face).
const TOP_NAMES: &[(&str, &str)] = &[
    ("token_embd.weight", "model.embed_tokens.weight"),
    ("output_norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
];

/// A tensor name in the other convention: GGUF to Hugging Face when `to_hf`, else back.
fn rename(name: &str, to_hf: bool) -> Option<String> {
    let side = |&(g, h): &(&'static str, &'static str)| if to_hf { (g, h) } else { (h, g) };
    if let Some((_, to)) = TOP_NAMES.iter().map(side).find(|(from, _)| *from == name) {
        return Some(to.into());
    }
    let (from, to) = side(&("blk.", "model.layers."));
    let (layer, rest) = name.strip_prefix(from)?.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (_, renamed) = GGUF_NAMES.iter().map(side).find(|(f, _)| *f == rest)?;
    Some(format!("{to}{layer}.{renamed}"))
}

/// The Hugging Face name of a GGUF tensor name, if it is a Llama tensor.
pub fn hf_name(gguf: &str) -> Option<String> {
    rename(gguf, true)
}

/// The GGUF name of a Hugging Face tensor name, if it is a Llama tensor (the inverse of
/// [`hf_name`]).
pub fn gguf_name(hf: &str) -> Option<String> {
    rename(hf, false)
}

/// Moves the rows of a Q or K weight (or bias) `[rows, cols]` between llama.cpp's order for
/// adjacent-pair RoPE and Hugging Face's: within each of `heads` heads, GGUF row `2i + j` is
/// Hugging Face row `j·half + i` (`half = head_dim / 2`).
fn move_rows(values: &[f32], rows: usize, cols: usize, heads: usize, to_hf: bool) -> Vec<f32> {
    let hd = rows / heads;
    let half = hd / 2;
    let mut out = vec![0f32; values.len()];
    for h in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                let gguf = (h * hd + 2 * i + j) * cols;
                let hf = (h * hd + j * half + i) * cols;
                let (src, dst) = if to_hf { (gguf, hf) } else { (hf, gguf) };
                out[dst..dst + cols].copy_from_slice(&values[src..src + cols]);
            }
        }
    }
    out
}

/// The heads whose rows llama.cpp permutes in the tensor of Hugging Face name `hf`: the query
/// heads of a `q_proj` weight or bias, the key/value heads of a `k_proj` one, else none.
fn rope_heads(hf: &str, c: &LlamaConfig) -> Option<usize> {
    let (_, leaf) = hf.rsplit_once(".self_attn.")?;
    match leaf {
        "q_proj.weight" | "q_proj.bias" => Some(c.num_attention_heads),
        "k_proj.weight" | "k_proj.bias" => Some(c.num_key_value_heads),
        _ => None,
    }
}

/// Undoes llama.cpp's row permutation of a Q or K weight (or bias) `[rows, cols]` (see
/// [`permute_rows`]).
pub fn unpermute_rows(values: &[f32], rows: usize, cols: usize, heads: usize) -> Vec<f32> {
    move_rows(values, rows, cols, heads, true)
}

/// llama.cpp's row permutation of a Q or K weight (or bias) `[rows, cols]` for adjacent-pair
/// RoPE: within each of `heads` heads, Hugging Face row `j·half + i` becomes GGUF row `2i + j`
/// (`half = head_dim / 2`).
pub fn permute_rows(values: &[f32], rows: usize, cols: usize, heads: usize) -> Vec<f32> {
    move_rows(values, rows, cols, heads, false)
}

/// The tensors of a Llama GGUF file, dequantized to f32 with Hugging Face names and layout
/// (Q/K rows un-permuted) one at a time as the model takes them, as a [`TensorSource`]; and
/// the configuration its metadata gives. Names, types and head shapes are checked now.
pub fn gguf_source<'a>(
    file: &'a GgufFile,
    path: &str,
) -> Result<(TensorSource<'a>, LlamaConfig), AdapterError> {
    let config = LlamaConfig::from_gguf(file, path)?;
    // Hugging Face name -> (the file's tensor, the heads its rows are permuted over).
    let mut found: BTreeMap<String, (&GgufTensorInfo, Option<usize>)> = BTreeMap::new();
    let mut shapes = BTreeMap::new();
    for info in &file.tensors {
        let Some(name) = hf_name(&info.name) else {
            return Err(AdapterError::format(
                path,
                format!("unexpected tensor `{}` for a Llama model", info.name),
            ));
        };
        file.check_type(info)?;
        let heads = rope_heads(&name, &config);
        if let Some(heads) = heads {
            let rows = info.shape[0];
            if rows % (2 * heads) != 0 {
                return Err(AdapterError::format(
                    path,
                    format!(
                        "`{}` has {rows} rows, not a whole number of {heads} heads",
                        info.name
                    ),
                ));
            }
        }
        shapes.insert(name.clone(), info.shape.clone());
        found.insert(name, (info, heads));
    }
    let decode = move |name: &str| {
        let (info, heads) = found[name];
        let values = file.dequantize_info(info)?;
        Ok(match heads {
            Some(heads) => {
                let rows = info.shape[0];
                unpermute_rows(&values, rows, info.numel() / rows.max(1), heads)
            }
            None => values,
        })
    };
    Ok((TensorSource::from_fn(path, shapes, decode), config))
}

/// How [`load_with`] and [`from_gguf_with`] build a model.
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// The adapters to place (none: `PlacementConfig::new()`).
    pub placement: PlacementConfig,
    /// The scheme the frozen linear weights are held in, quantized as they are read (`None`,
    /// the default: `f32`). For inference; see [`TensorSource::quantize_frozen`].
    pub frozen: Option<QuantConfig>,
}

impl LoadOptions {
    /// No adapters, `f32` weights.
    pub fn new() -> Self {
        Self::default()
    }

    /// With the adapters `placement` describes.
    pub fn with_placement(mut self, placement: PlacementConfig) -> Self {
        self.placement = placement;
        self
    }

    /// With the frozen linear weights held in `frozen`'s scheme (int8 per block of 32:
    /// `QuantConfig::new(8, Level::Block(32))`).
    pub fn with_frozen(mut self, frozen: Option<QuantConfig>) -> Self {
        self.frozen = frozen;
        self
    }
}

/// Loads a Llama-family model from a `.gguf` file or a Hugging Face folder (`config.json` and
/// `model.safetensors` or a sharded index), with the adapters `placement` describes. Fails with
/// one error listing every missing, unexpected or mis-shaped tensor.
pub fn load<B: Backend>(
    path: impl AsRef<Path>,
    placement: &PlacementConfig,
    device: &B::Device,
) -> Result<LlamaForCausalLM<B>, AdapterError> {
    load_with(
        path,
        &LoadOptions::new().with_placement(placement.clone()),
        device,
    )
}

/// [`load`] with [`LoadOptions`]: an int8 frozen base for inference, say.
///
/// ```no_run
/// use burn::backend::NdArray;
/// use kron_adapters::model::llama::{self, LoadOptions};
/// use kron_adapters::quant::{Level, QuantConfig};
///
/// let int8 = QuantConfig::new(8, Level::Block(32)).unwrap();
/// let options = LoadOptions::new().with_frozen(Some(int8));
/// let model = llama::load_with::<NdArray>("SmolLM2-135M-Instruct.Q4_1.gguf", &options, &Default::default())?;
/// # Ok::<(), kron_adapters::AdapterError>(())
/// ```
pub fn load_with<B: Backend>(
    path: impl AsRef<Path>,
    options: &LoadOptions,
    device: &B::Device,
) -> Result<LlamaForCausalLM<B>, AdapterError> {
    let path = path.as_ref();
    if path.is_dir() {
        let config = LlamaConfig::from_json_file(path.join("config.json"))?;
        build(
            TensorSource::from_model_dir(path)?,
            &config,
            options,
            device,
        )
    } else {
        from_gguf_with(
            &GgufFile::read(path)?,
            &path.display().to_string(),
            options,
            device,
        )
    }
}

/// A Llama-family model from a GGUF file already read (`path` names it in errors).
pub fn from_gguf<B: Backend>(
    file: &GgufFile,
    path: &str,
    placement: &PlacementConfig,
    device: &B::Device,
) -> Result<LlamaForCausalLM<B>, AdapterError> {
    from_gguf_with(
        file,
        path,
        &LoadOptions::new().with_placement(placement.clone()),
        device,
    )
}

/// [`from_gguf`] with [`LoadOptions`].
pub fn from_gguf_with<B: Backend>(
    file: &GgufFile,
    path: &str,
    options: &LoadOptions,
    device: &B::Device,
) -> Result<LlamaForCausalLM<B>, AdapterError> {
    let (source, config) = gguf_source(file, path)?;
    build(source, &config, options, device)
}

fn build<B: Backend>(
    mut source: TensorSource,
    config: &LlamaConfig,
    options: &LoadOptions,
    device: &B::Device,
) -> Result<LlamaForCausalLM<B>, AdapterError> {
    config.validate()?;
    if let Some(frozen) = options.frozen {
        source.quantize_frozen::<B>(frozen, device)?;
    }
    source.check_holds("LlamaConfig", config.num_params())?;
    // Buffers some checkpoints carry.
    let rotary: Vec<String> = (0..config.num_hidden_layers)
        .map(|i| format!("model.layers.{i}.self_attn.rotary_emb.inv_freq"))
        .collect();
    source.ignore(&rotary.iter().map(String::as_str).collect::<Vec<_>>());
    let model = LlamaForCausalLM::new(&mut source, config, &options.placement, device)?;
    source.finish()?;
    Ok(model)
}

/// A Hugging Face `config.json` for `config` (float32 weights; [`save_hf`] sets `torch_dtype`
/// to the dtype it writes).
pub fn hf_config_json(config: &LlamaConfig) -> serde_json::Value {
    let c = config;
    let arch = match c.model_type.as_str() {
        "qwen2" => "Qwen2ForCausalLM",
        "mistral" => "MistralForCausalLM",
        _ => "LlamaForCausalLM",
    };
    let rope_scaling = match c.rope_scaling {
        RopeScaling::None => serde_json::Value::Null,
        other => serde_json::to_value(other).unwrap_or_default(),
    };
    serde_json::json!({
        "architectures": [arch],
        "model_type": if c.model_type == "qwen2" || c.model_type == "mistral" { c.model_type.as_str() } else { "llama" },
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "head_dim": c.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": c.max_position_embeddings,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta,
        "rope_scaling": rope_scaling,
        "tie_word_embeddings": c.tie_word_embeddings,
        "attention_bias": c.qkv_bias && c.model_type != "qwen2",
        "mlp_bias": c.mlp_bias,
        "bos_token_id": c.bos_token_id,
        "eos_token_id": c.eos_token_ids.first(),
        "torch_dtype": "float32",
    })
}

/// Writes `model` as a Hugging Face folder that `transformers` (and llama.cpp's converter) can
/// run: `config.json` and `model.safetensors` (Hugging Face names and `[out, in]` layout, in
/// `dtype`: F32, or F16 / BF16 at half the size, rounded to nearest; `config.json`'s
/// `torch_dtype` says which), with every linear adapter merged into its base weight first
/// (refusing NaN/Inf, and in F16 a value beyond its range). `extra` files (a tokenizer's) are
/// written into the folder too. The folder is written atomically, the weights one tensor at a
/// time; an existing one is replaced only when `overwrite`. Returns the bytes of
/// `model.safetensors`.
pub fn save_hf<B: Backend>(
    model: LlamaForCausalLM<B>,
    dir: &Path,
    extra: &[(&str, &[u8])],
    dtype: ::safetensors::Dtype,
    overwrite: bool,
) -> Result<u64, AdapterError> {
    use crate::store::st;
    use ::safetensors::Dtype;
    let torch_dtype = match dtype {
        Dtype::F32 => "float32",
        Dtype::F16 => "float16",
        Dtype::BF16 => "bfloat16",
        other => {
            return Err(AdapterError::Unsupported {
                option: "dtype".into(),
                message: format!("{other:?}; F32, F16 and BF16 are written"),
            })
        }
    };
    st::refuse_existing(dir, overwrite)?;
    let model = model.merge_adapters()?;
    let mut config = hf_config_json(model.config());
    config["torch_dtype"] = torch_dtype.into();
    let config = serde_json::to_vec_pretty(&config)
        .map_err(|e| AdapterError::format("config.json", e.to_string()))?;
    let tensors = merged_tensors(&model);
    let specs: Vec<st::Spec> = tensors
        .iter()
        .map(|(name, shape, _)| (name.clone(), dtype, shape.clone()))
        .collect();
    let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    let mut written = 0;
    // The weights are streamed, one tensor at a time: a 7B model is never held twice.
    st::write_dir_atomic_with(dir, overwrite, &mut |tmp| {
        st::write_atomic(&tmp.join("config.json"), &config)?;
        for (name, bytes) in extra {
            st::write_atomic(&tmp.join(name), bytes)?;
        }
        st::write_atomic_with(&tmp.join("model.safetensors"), &mut |out| {
            written =
                st::write_streamed("model.safetensors", out, &specs, meta.clone(), &mut |i| {
                    st::encode_f32(&tensors[i].2().data, dtype).map_err(|m| {
                        AdapterError::format(
                            "model.safetensors",
                            format!("`{}`: {m}", tensors[i].0),
                        )
                    })
                })?;
            Ok(())
        })
    })?;
    Ok(written)
}

/// The `tokenizer.*` metadata of a GGUF file, to carry into another ([`save_gguf`]).
pub fn tokenizer_metadata(file: &GgufFile) -> Vec<(String, GgufValue)> {
    file.metadata
        .iter()
        .filter(|(k, _)| k.starts_with("tokenizer."))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// Writes `model` as a GGUF file that llama.cpp runs: architecture `llama` with its
/// configuration in `llama.*` metadata, llama.cpp's tensor names, and Q/K rows permuted as its
/// converter permutes them, with every linear adapter merged into its base weight first
/// (refusing NaN/Inf). Matrices are stored as `ty` — [`GgmlType::F32`], [`GgmlType::F16`] as
/// the converter's `--outtype f16`, or [`GgmlType::Q8_0`] as its `--outtype q8_0` (ggml's
/// reference quantizer, bit for bit; a matrix whose rows are not whole blocks of 32 in F16) —
/// and vectors (norms, biases) as F32. `tokenizer` is
/// the `tokenizer.*` metadata to carry ([`tokenizer_metadata`] of a GGUF source); without it
/// the file holds the weights and configuration only. The model's BOS and EOS ids are written
/// when `tokenizer` lacks them. Llama 3.1's RoPE scaling is refused (llama.cpp takes it as a
/// `rope_freqs` tensor this crate does not write; export a Hugging Face folder instead). The
/// file is written atomically; an existing one is replaced only when `overwrite`. Returns the
/// bytes written.
pub fn save_gguf<B: Backend>(
    model: LlamaForCausalLM<B>,
    path: &Path,
    tokenizer: &[(String, GgufValue)],
    ty: GgmlType,
    overwrite: bool,
) -> Result<u64, AdapterError> {
    use crate::store::st;
    st::refuse_existing(path, overwrite)?;
    let meta = gguf_metadata(model.config(), tokenizer, ty)?;
    let model = model.merge_adapters()?;
    let mut written = 0;
    st::write_atomic_with(path, &mut |out| {
        written = write_gguf(&model, &meta, ty, out)?;
        Ok(())
    })
    .map_err(|e| match e {
        // Errors name the file being written.
        AdapterError::Format { message, .. } => {
            AdapterError::format(path.display().to_string(), message)
        }
        AdapterError::Io { source, .. } => AdapterError::io(path, source),
        other => other,
    })?;
    Ok(written)
}

/// The bytes of the GGUF file [`save_gguf`] writes.
pub fn to_gguf<B: Backend>(
    model: LlamaForCausalLM<B>,
    tokenizer: &[(String, GgufValue)],
    ty: GgmlType,
) -> Result<Vec<u8>, AdapterError> {
    let meta = gguf_metadata(model.config(), tokenizer, ty)?;
    let model = model.merge_adapters()?;
    let mut out = Vec::new();
    write_gguf(&model, &meta, ty, &mut out)?;
    Ok(out)
}

/// The GGUF metadata of a model of configuration `c` (with `tokenizer`'s), or why it cannot be
/// written as `ty`.
fn gguf_metadata(
    c: &LlamaConfig,
    tokenizer: &[(String, GgufValue)],
    ty: GgmlType,
) -> Result<Vec<(String, GgufValue)>, AdapterError> {
    if !matches!(ty, GgmlType::F32 | GgmlType::F16 | GgmlType::Q8_0) {
        return Err(AdapterError::Unsupported {
            option: "GGUF type".into(),
            message: format!("{ty:?}; F32, F16 and Q8_0 are written"),
        });
    }
    let mut meta: Vec<(String, GgufValue)> = vec![(
        "general.architecture".into(),
        GgufValue::String("llama".into()),
    )];
    let mut int = |k: &str, v: usize| -> Result<(), AdapterError> {
        let v = u32::try_from(v).map_err(|_| {
            AdapterError::format(gguf::OUTPUT, format!("llama.{k} {v} exceeds u32"))
        })?;
        meta.push((format!("llama.{k}"), GgufValue::U32(v)));
        Ok(())
    };
    int("context_length", c.max_position_embeddings)?;
    int("embedding_length", c.hidden_size)?;
    int("block_count", c.num_hidden_layers)?;
    int("feed_forward_length", c.intermediate_size)?;
    int("attention.head_count", c.num_attention_heads)?;
    int("attention.head_count_kv", c.num_key_value_heads)?;
    int("rope.dimension_count", c.head_dim)?;
    int("vocab_size", c.vocab_size)?;
    if c.head_dim * c.num_attention_heads != c.hidden_size {
        int("attention.key_length", c.head_dim)?;
        int("attention.value_length", c.head_dim)?;
    }
    // GGUF keeps these as f32: a value that f32 turns to 0 or infinity is refused.
    let float = |k: &str, v: f64| match v as f32 {
        f if f.is_finite() && (f != 0.0 || v == 0.0) => {
            Ok((format!("llama.{k}"), GgufValue::F32(f)))
        }
        _ => Err(AdapterError::format(
            gguf::OUTPUT,
            format!("llama.{k} {v} does not fit an f32"),
        )),
    };
    meta.push(float("rope.freq_base", c.rope_theta)?);
    meta.push(float("attention.layer_norm_rms_epsilon", c.rms_norm_eps)?);
    match c.rope_scaling {
        RopeScaling::None => {}
        RopeScaling::Linear { factor } => {
            meta.push((
                "llama.rope.scaling.type".into(),
                GgufValue::String("linear".into()),
            ));
            meta.push(float("rope.scaling.factor", factor)?);
        }
        RopeScaling::Llama3 { .. } => {
            return Err(AdapterError::Unsupported {
                option: "rope_scaling".into(),
                message: "Llama 3.1's RoPE scaling is written to Hugging Face folders only \
                          (llama.cpp takes it as a rope_freqs tensor): use export-hf"
                    .into(),
            })
        }
    }
    // llama.cpp's `LlamaFileType`: ALL_F32, MOSTLY_F16, MOSTLY_Q8_0.
    let file_type = match ty {
        GgmlType::F16 => 1,
        GgmlType::Q8_0 => 7,
        _ => 0,
    };
    meta.push(("general.file_type".into(), GgufValue::U32(file_type)));
    meta.push(("general.quantization_version".into(), GgufValue::U32(2)));
    let has = |k: &str| tokenizer.iter().any(|(key, _)| key == k);
    if let (Some(bos), false) = (c.bos_token_id, has("tokenizer.ggml.bos_token_id")) {
        meta.push(("tokenizer.ggml.bos_token_id".into(), GgufValue::U32(bos)));
    }
    if let (Some(&eos), false) = (c.eos_token_ids.first(), has("tokenizer.ggml.eos_token_id")) {
        meta.push(("tokenizer.ggml.eos_token_id".into(), GgufValue::U32(eos)));
    }
    meta.extend(tokenizer.iter().cloned());

    Ok(meta)
}

/// Writes a merged model's GGUF file, its tensors copied to the host one at a time.
fn write_gguf<B: Backend>(
    model: &LlamaForCausalLM<B>,
    meta: &[(String, GgufValue)],
    ty: GgmlType,
    out: &mut dyn std::io::Write,
) -> Result<u64, AdapterError> {
    let c = model.config();
    let mut named = merged_tensors(model);
    named.sort_by(|a, b| a.0.cmp(&b.0)); // the converter's order: the checkpoint's names sorted
    let mut specs = Vec::with_capacity(named.len());
    for (hf, shape, _) in &named {
        let name = gguf_name(hf).ok_or_else(|| {
            AdapterError::format(gguf::OUTPUT, format!("no GGUF name for `{hf}`"))
        })?;
        // As llama.cpp's converter: vectors F32; a Q8_0 weight whose rows are not whole
        // blocks of 32 F16.
        let ty = match ty {
            _ if shape.len() != 2 => GgmlType::F32,
            GgmlType::Q8_0 if shape[1] % GgmlType::Q8_0.block().0 != 0 => GgmlType::F16,
            ty => ty,
        };
        specs.push(GgufTensorSpec {
            name,
            shape: shape.clone(),
            ty,
        });
    }
    gguf::write(out, meta, &specs, &mut |i| {
        let (hf, _, host) = &named[i];
        let t = host();
        let rows = t.shape[0];
        Ok(match rope_heads(hf, c) {
            Some(h) => permute_rows(&t.data, rows, t.data.len() / rows, h),
            None => t.data,
        })
    })
}

/// A tensor of a merged model: its Hugging Face name, its shape in PyTorch order, and how to
/// copy it to the host (one at a time, so that an export never holds two copies of a model).
type LazyTensor<'a> = (String, Vec<usize>, Box<dyn Fn() -> HostTensor + 'a>);

/// The tensors of a model whose adapters are merged, with Hugging Face names and layout
/// (`[out, in]` weights), copied to the host when asked.
fn merged_tensors<B: Backend>(model: &LlamaForCausalLM<B>) -> Vec<LazyTensor<'_>> {
    let mut out: Vec<LazyTensor<'_>> = Vec::new();
    // A linear's weight is `[in, out]` in Burn: transposed to PyTorch's `[out, in]`.
    let linear = |name: String, t: Tensor<B, 2>| -> LazyTensor<'_> {
        let [i, o] = t.dims();
        (
            name,
            vec![o, i],
            Box::new(move || HostTensor::from_tensor(t.clone()).transposed()),
        )
    };
    let vector = |name: String, t: Tensor<B, 1>| -> LazyTensor<'_> {
        (
            name,
            t.dims().to_vec(),
            Box::new(move || HostTensor::from_tensor(t.clone())),
        )
    };
    let embed = model.model.embed_tokens.weight.val();
    out.push((
        "model.embed_tokens.weight".into(),
        embed.dims().to_vec(),
        Box::new(move || HostTensor::from_tensor(embed.clone())),
    ));
    out.push(vector(
        "model.norm.weight".into(),
        model.model.norm.gamma.val(),
    ));
    if let Some(head) = &model.lm_head {
        out.push(linear("lm_head.weight".into(), head.weight.val()));
    }
    for (path, layer) in model.adapter_layers() {
        out.push(linear(format!("{path}.weight"), layer.base.weight.val()));
        if let Some(b) = &layer.base.bias {
            out.push(vector(format!("{path}.bias"), b.val()));
        }
    }
    for (i, layer) in model.model.layers.iter().enumerate() {
        let p = |n: &str| format!("model.layers.{i}.{n}.weight");
        out.push(vector(
            p("input_layernorm"),
            layer.input_layernorm.gamma.val(),
        ));
        out.push(vector(
            p("post_attention_layernorm"),
            layer.post_attention_layernorm.gamma.val(),
        ));
    }
    out
}
