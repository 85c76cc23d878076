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
use crate::shards;

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

/// A padded batch of (context, continuation) pairs and the positions that predict
/// continuation tokens.
#[derive(Clone, Debug)]
pub struct ContinuationBatch<B: Backend> {
    /// `[b, s]` token ids (right-padded with 0).
    pub ids: Tensor<B, 2, Int>,
    /// `[b, s]`, 1 for tokens, 0 for padding.
    pub mask: Tensor<B, 2, Int>,
    /// `[n]` flat positions (`row·s + t − 1`) whose hidden state predicts continuation token `t`.
    pub rows: Tensor<B, 1, Int>,
    /// `[n]` the continuation tokens, in batch order.
    pub targets: Tensor<B, 1, Int>,
}

impl<B: Backend> ContinuationBatch<B> {
    /// How many continuation tokens each sequence has (`[b]`, read back from `rows`), or
    /// `None` if the device cannot hand `rows` back.
    #[cfg(feature = "train")]
    pub(crate) fn token_counts(&self) -> Option<Vec<usize>> {
        let [b, s] = self.ids.dims();
        let rows = self.rows.to_data().convert::<i64>().to_vec::<i64>().ok()?;
        let mut counts = vec![0usize; b];
        for r in rows {
            *counts.get_mut(usize::try_from(r).ok()? / s.max(1))? += 1;
        }
        Some(counts)
    }

    /// The sequences `range` as a batch of their own (`counts` from [`Self::token_counts`]):
    /// their ids and mask, and their continuation positions re-indexed into the smaller batch.
    /// The padded length stays the batch's, so each sequence's logits are the same.
    #[cfg(feature = "train")]
    pub(crate) fn sequences(&self, range: std::ops::Range<usize>, counts: &[usize]) -> Self {
        let s = self.ids.dims()[1];
        let first: usize = counts[..range.start].iter().sum();
        let taken: usize = counts[range.clone()].iter().sum();
        let at = first..first + taken;
        ContinuationBatch {
            ids: self.ids.clone().slice(range.clone()),
            mask: self.mask.clone().slice(range.clone()),
            rows: self
                .rows
                .clone()
                .slice(at.clone())
                .sub_scalar((range.start * s) as i64),
            targets: self.targets.clone().slice(at),
        }
    }
}

/// Pads `batch` into a [`ContinuationBatch`].
pub fn continuation_batch<B: Backend>(
    batch: &[&Encoded],
    device: &B::Device,
) -> ContinuationBatch<B> {
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
    let n = rows.len();
    ContinuationBatch {
        ids: Tensor::from_data(TensorData::new(ids, [b, s]), device),
        mask: padding_mask::<B>(&lengths, s, device),
        rows: Tensor::from_data(TensorData::new(rows, [n]), device),
        targets: Tensor::from_data(TensorData::new(targets, [n]), device),
    }
}

/// The logits `[n, vocab]` at the positions that predict a batch's continuation tokens: the LM
/// head runs on those positions only.
pub fn continuation_logits<B: Backend>(
    model: &LlamaForCausalLM<B>,
    batch: ContinuationBatch<B>,
) -> Tensor<B, 2> {
    let [b, s] = batch.ids.dims();
    let hidden = model.model.forward(batch.ids, Some(batch.mask), None);
    let d = hidden.dims()[2];
    model.logits(hidden.reshape([b * s, d]).select(0, batch.rows))
}

/// Log-probabilities of every continuation token of a batch (a flat tensor `[tokens]`, in
/// batch order), computing the LM head only at the positions that predict them.
pub fn continuation_logprobs<B: Backend>(
    model: &LlamaForCausalLM<B>,
    batch: &[&Encoded],
    device: &B::Device,
) -> Tensor<B, 1> {
    let batch = continuation_batch(batch, device);
    let n = batch.targets.dims()[0];
    let targets = batch.targets.clone().reshape([n, 1]);
    let logp = activation::log_softmax(continuation_logits(model, batch), 1);
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

/// A part's share of a batch's [`masked_nll`]: the negative sum of the part's continuation
/// log-probabilities over the whole batch's `batch_tokens` continuation tokens, so that the
/// parts' shares add up to the batch's loss ([`crate::shards::gradients`]).
pub fn masked_nll_share<B: Backend>(
    model: &LlamaForCausalLM<B>,
    part: &[&Encoded],
    batch_tokens: usize,
    device: &B::Device,
) -> Tensor<B, 1> {
    continuation_logprobs(model, part, device)
        .sum()
        .div_scalar(batch_tokens.max(1) as f64)
        .neg()
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

/// The summed continuation log-probabilities of requests that share their context (the
/// choices of one question): the context runs once into a KV cache, the continuations as one
/// right-padded batch on copies of it. Equal to [`loglikelihoods`] on the same requests, with
/// the context's cost paid once instead of once per choice.
///
/// # Panics
/// If the requests' contexts differ (callers check [`shared_context`]).
pub fn shared_loglikelihoods<B: Backend>(
    model: &LlamaForCausalLM<B>,
    requests: &[&Encoded],
    device: &B::Device,
) -> Vec<f64> {
    let ctx = &requests[0].ids[..requests[0].start];
    assert!(
        requests.iter().all(|e| &e.ids[..e.start] == ctx),
        "one shared context"
    );
    let ids = |v: &[u32], rows: usize, s: usize| {
        Tensor::<B, 2, Int>::from_data(
            TensorData::new(v.iter().map(|&t| t as i64).collect::<Vec<_>>(), [rows, s]),
            device,
        )
    };
    let mut cache = model.new_cache();
    let h = model
        .model
        .forward(ids(ctx, 1, ctx.len()), None, Some(&mut cache));
    let d = h.dims()[2];
    let last = h
        .slice([0..1, ctx.len() - 1..ctx.len(), 0..d])
        .reshape([1, d]);
    let first: Vec<f32> = activation::log_softmax(model.logits(last), 1)
        .into_data()
        .convert::<f32>()
        .to_vec()
        .expect("f32");
    let mut out: Vec<f64> = requests
        .iter()
        .map(|e| first[e.ids[e.start] as usize] as f64)
        .collect();
    // The rest of each continuation: its tokens but the last fed, each predicting the next.
    let n = requests.len();
    let s = requests
        .iter()
        .map(|e| e.ids.len() - e.start - 1)
        .max()
        .unwrap_or(0);
    if s == 0 {
        return out;
    }
    let mut fed = vec![0u32; n * s];
    let (mut rows, mut targets, mut owner) = (Vec::new(), Vec::new(), Vec::new());
    let mut key_lengths = Vec::with_capacity(n);
    for (r, e) in requests.iter().enumerate() {
        let cont = e.continuation();
        for (c, &t) in cont[..cont.len() - 1].iter().enumerate() {
            fed[r * s + c] = t;
            rows.push((r * s + c) as i64);
            targets.push(cont[c + 1] as i64);
            owner.push(r);
        }
        key_lengths.push(ctx.len() + cont.len() - 1);
    }
    let mut cache = cache.repeat(n);
    let mask = padding_mask::<B>(&key_lengths, ctx.len() + s, device);
    let h = model
        .model
        .forward(ids(&fed, n, s), Some(mask), Some(&mut cache));
    let m = rows.len();
    let picked = h.reshape([n * s, d]).select(
        0,
        Tensor::<B, 1, Int>::from_data(TensorData::new(rows, [m]), device),
    );
    let lp: Vec<f32> = activation::log_softmax(model.logits(picked), 1)
        .gather(
            1,
            Tensor::<B, 2, Int>::from_data(TensorData::new(targets, [m, 1]), device),
        )
        .into_data()
        .convert::<f32>()
        .to_vec()
        .expect("f32");
    for (r, v) in owner.into_iter().zip(lp) {
        out[r] += v as f64;
    }
    out
}

/// Do these requests share their context (so [`shared_loglikelihoods`] can score them)?
pub fn shared_context(requests: &[Encoded]) -> bool {
    requests.first().is_some_and(|first| {
        let ctx = &first.ids[..first.start];
        requests.iter().all(|e| &e.ids[..e.start] == ctx)
    })
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
/// the left at `max_len` tokens. Questions whose choices share their context (ARC, PIQA,
/// HellaSwag, BoolQ) run it once ([`shared_loglikelihoods`]); the others (WinoGrande's options
/// sit inside the context) are batched ([`loglikelihoods`]). The questions are scored in
/// [`shards::default_parts`] parts at once (2 on flex and ndarray, whose element-wise work runs
/// on one thread; 1 elsewhere); a question's scores do not depend on the others'.
///
/// Errors: a question that cannot be encoded, or a part failing to synchronize its device.
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
    // `starts[i]`: question `i`'s first request.
    let mut starts = vec![0];
    for q in questions {
        for (ctx, cont) in &q.choices {
            requests.push(encode_pair(tok, ctx, cont, max_len)?);
            chars.push(cont.trim_start_matches(' ').chars().count().max(1) as f64);
        }
        starts.push(requests.len());
    }
    let ll: Vec<f64> = if questions.is_empty() {
        Vec::new()
    } else {
        let parts = shards::default_parts::<B>(device);
        shards::forward::<B, _, _>(device, questions.len(), parts, |p| {
            let (qs, at) = (&questions[p.range.clone()], starts[p.range.start]);
            let requests = &requests[at..starts[p.range.end]];
            question_loglikelihoods(model, qs, requests, batch_tokens, device)
        })?
        .concat()
    };
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

/// The log-likelihood of every request of `questions` (`requests`: their choices in order):
/// shared-context questions one by one, the others batched together.
fn question_loglikelihoods<B: Backend>(
    model: &LlamaForCausalLM<B>,
    questions: &[Question],
    requests: &[Encoded],
    batch_tokens: usize,
    device: &B::Device,
) -> Vec<f64> {
    let mut ll = vec![0f64; requests.len()];
    let (mut rest, mut rest_at) = (Vec::new(), Vec::new());
    let mut k = 0;
    for q in questions {
        let group = &requests[k..k + q.choices.len()];
        if shared_context(group) {
            let refs: Vec<&Encoded> = group.iter().collect();
            ll[k..k + group.len()].copy_from_slice(&shared_loglikelihoods(model, &refs, device));
        } else {
            rest.extend_from_slice(group);
            rest_at.extend(k..k + group.len());
        }
        k += q.choices.len();
    }
    for (i, v) in rest_at
        .into_iter()
        .zip(loglikelihoods(model, &rest, batch_tokens, device))
    {
        ll[i] = v;
    }
    ll
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
