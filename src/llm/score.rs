//! Scoring continuations with a decoder: the summed log-probability of a continuation given its
//! context, batched, with the LM head computed only at the positions that predict continuation
//! tokens (the head is the model's largest product). The same gathering gives the causal-LM
//! training loss masked to the answer ([`masked_nll`]) and the multiple-choice evaluation
//! ([`evaluate`]): `acc` picks the choice with the highest summed log-probability, `acc_norm`
//! the highest per character of the continuation (its leading space not counted), as
//! lm-evaluation-harness does.

use burn::tensor::{activation, backend::Backend, Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use super::tasks::Question;
use super::tokenizer::TextTokenizer;
use crate::error::ConfigError;
use crate::model::llama::{padding_mask, LlamaForCausalLM};

/// A tokenized (context, continuation) pair: the whole sequence and where the continuation
/// starts (`ids[start..]`, `start ≥ 1`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Encoded {
    /// Context and continuation tokens.
    pub ids: Vec<u32>,
    /// The first continuation token.
    pub start: usize,
}

impl Encoded {
    /// Continuation tokens.
    pub fn continuation(&self) -> &[u32] {
        &self.ids[self.start..]
    }
}

/// Tokenizes a pair as lm-evaluation-harness does: trailing spaces of the context move to the
/// continuation; the continuation's tokens are those of `context + continuation` after the
/// context's; an empty context is replaced by the BOS (or EOS) token; sequences longer than
/// `max_len` lose tokens from the left (the continuation is kept whole when it fits).
pub fn encode_pair(
    tok: &TextTokenizer,
    context: &str,
    continuation: &str,
    max_len: usize,
) -> Result<Encoded, ConfigError> {
    let trimmed = context.trim_end_matches(' ');
    let continuation = format!("{}{continuation}", &context[trimmed.len()..]);
    let mut ctx = tok.encode(trimmed, true)?;
    let whole = tok.encode(&format!("{trimmed}{continuation}"), true)?;
    let cont = whole[ctx.len().min(whole.len())..].to_vec();
    if cont.is_empty() {
        return Err(ConfigError::invalid(
            "score",
            "continuation",
            format!("{continuation:?} adds no tokens to its context"),
        ));
    }
    if ctx.is_empty() {
        let prefix = tok.bos.or(tok.eos.first().copied()).ok_or_else(|| {
            ConfigError::invalid(
                "score",
                "context",
                "an empty context and no BOS/EOS token to stand for it",
            )
        })?;
        ctx.push(prefix);
    }
    Ok(truncate(ctx, cont, max_len))
}

fn truncate(ctx: Vec<u32>, cont: Vec<u32>, max_len: usize) -> Encoded {
    let mut ids = ctx;
    let start = ids.len();
    ids.extend(cont);
    let drop = ids
        .len()
        .saturating_sub(max_len)
        .min(start.saturating_sub(1));
    Encoded {
        ids: ids[drop..].to_vec(),
        start: start - drop,
    }
}

/// Log-probabilities of every continuation token of a batch (a flat tensor `[tokens]`, in
/// batch order), computing the LM head only at the positions that predict them.
pub fn continuation_logprobs<B: Backend>(
    model: &LlamaForCausalLM<B>,
    batch: &[&Encoded],
    device: &B::Device,
) -> Tensor<B, 1> {
    let s = batch.iter().map(|e| e.ids.len()).max().unwrap_or(1);
    let b = batch.len();
    let mut ids = vec![0i64; b * s];
    let (mut rows, mut targets) = (Vec::new(), Vec::new());
    for (r, e) in batch.iter().enumerate() {
        for (c, &t) in e.ids.iter().enumerate() {
            ids[r * s + c] = t as i64;
        }
        for t in e.start..e.ids.len() {
            rows.push((r * s + t - 1) as i64);
            targets.push(e.ids[t] as i64);
        }
    }
    let lengths: Vec<usize> = batch.iter().map(|e| e.ids.len()).collect();
    let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [b, s]), device);
    let mask = padding_mask::<B>(&lengths, s, device);
    let hidden = model.model.forward(ids, Some(mask), None);
    let d = hidden.dims()[2];
    let n = rows.len();
    let rows = Tensor::<B, 1, Int>::from_data(TensorData::new(rows, [n]), device);
    let picked = hidden.reshape([b * s, d]).select(0, rows);
    let logp = activation::log_softmax(model.logits(picked), 1);
    let targets = Tensor::<B, 2, Int>::from_data(TensorData::new(targets, [n, 1]), device);
    logp.gather(1, targets).reshape([n])
}

/// The causal-LM loss of a batch, masked to the continuations (the answers): the mean negative
/// log-likelihood of their tokens; context tokens contribute nothing (not even a logit).
pub fn masked_nll<B: Backend>(
    model: &LlamaForCausalLM<B>,
    batch: &[&Encoded],
    device: &B::Device,
) -> Tensor<B, 1> {
    continuation_logprobs(model, batch, device).mean().neg()
}

/// The summed continuation log-probability of each request, computed in batches of about
/// `batch_tokens` tokens (longest first, so padding is small).
pub fn loglikelihoods<B: Backend>(
    model: &LlamaForCausalLM<B>,
    requests: &[Encoded],
    batch_tokens: usize,
    device: &B::Device,
) -> Vec<f64> {
    let mut order: Vec<usize> = (0..requests.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(requests[i].ids.len()));
    let mut out = vec![0f64; requests.len()];
    let mut at = 0;
    while at < order.len() {
        let longest = requests[order[at]].ids.len().max(1);
        let take = (batch_tokens / longest).max(1).min(order.len() - at);
        let idx = &order[at..at + take];
        let batch: Vec<&Encoded> = idx.iter().map(|&i| &requests[i]).collect();
        let lp: Vec<f32> = continuation_logprobs(model, &batch, device)
            .into_data()
            .convert::<f32>()
            .to_vec()
            .expect("f32");
        let mut k = 0;
        for &i in idx {
            let n = requests[i].continuation().len();
            out[i] = lp[k..k + n].iter().map(|&v| v as f64).sum();
            k += n;
        }
        at += take;
    }
    out
}

/// Accuracy on a multiple-choice task.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalResult {
    /// Questions.
    pub n: usize,
    /// Accuracy by summed log-probability.
    pub acc: f64,
    /// Accuracy by log-probability per character of the continuation.
    pub acc_norm: f64,
    /// The predicted choice of each question (by `acc`).
    pub predictions: Vec<usize>,
}

/// Evaluates `questions`: every choice scored, `acc` and `acc_norm`. Sequences are cut from
/// the left at `max_len` tokens.
pub fn evaluate<B: Backend>(
    model: &LlamaForCausalLM<B>,
    tok: &TextTokenizer,
    questions: &[Question],
    max_len: usize,
    batch_tokens: usize,
    device: &B::Device,
) -> Result<EvalResult, ConfigError> {
    let mut requests = Vec::new();
    let mut chars = Vec::new();
    for q in questions {
        for (ctx, cont) in &q.choices {
            requests.push(encode_pair(tok, ctx, cont, max_len)?);
            chars.push(cont.trim_start_matches(' ').chars().count().max(1) as f64);
        }
    }
    let ll = loglikelihoods(model, &requests, batch_tokens, device);
    let (mut hits, mut hits_norm, mut k) = (0usize, 0usize, 0usize);
    let mut predictions = Vec::with_capacity(questions.len());
    for q in questions {
        let n = q.choices.len();
        let scores = &ll[k..k + n];
        let norm: Vec<f64> = scores
            .iter()
            .zip(&chars[k..k + n])
            .map(|(s, c)| s / c)
            .collect();
        let best = first_max(scores);
        hits += usize::from(best == q.gold);
        hits_norm += usize::from(first_max(&norm) == q.gold);
        predictions.push(best);
        k += n;
    }
    let n = questions.len().max(1) as f64;
    Ok(EvalResult {
        n: questions.len(),
        acc: hits as f64 / n,
        acc_norm: hits_norm as f64 / n,
        predictions,
    })
}

/// The index of the largest value, the first of ties (as `numpy.argmax`).
pub fn first_max(v: &[f64]) -> usize {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best
}
