//! Fine-tuning a decoder for multiple choice: the causal-LM loss on the gold continuation given
//! its context (the prompt masked: [`super::score::masked_nll`]), AdamW with warm-up and linear
//! decay and per-parameter gradient clipping (the main job's machinery:
//! [`crate::finetune::train::lr_at`]), length-bucketed batches, and dev-based selection: the
//! model of the best dev evaluation is returned. Only the adapters train; the library reports
//! progress through a callback and never prints.

use std::time::Instant;

use burn::module::AutodiffModule;
use burn::optim::grad_clipping::GradientClippingConfig;
use burn::optim::{AdamWConfig, Optimizer};
use burn::tensor::backend::AutodiffBackend;
use serde::{Deserialize, Serialize};

use super::score::{encode_pair, evaluate, masked_nll_share, Encoded, EvalResult};
use super::tasks::Question;
use super::tokenizer::TextTokenizer;
use crate::adapter::{AdapterConfig, KronLoraConfig};
use crate::error::{AdapterError, ConfigError};
use crate::finetune::tokenize::length_batches;
use crate::finetune::train::lr_at;
use crate::model::llama::LlamaForCausalLM;
use crate::params::count_params;
use crate::place::PlacementConfig;
use crate::rng::SplitMix64;
use crate::shards;
use burn::tensor::ElementConversion;

crate::macros::config! {
    /// A multiple-choice fine-tuning run of a decoder.
    pub struct LlmFinetuneConfig(new) {
        required {}
        optional {
            /// Parts of each batch computed at once, forward and backward, on rayon's threads
            /// ([`crate::shards`]); without it [`crate::shards::default_parts`]: 2 on flex and
            /// ndarray, 1 elsewhere. The update is the whole batch's either way.
            batch_parts: usize,
        }
        defaults {
            /// Adapters: Kron-LoRA (rank 2, shapes near √d) on the seven projections.
            placement: PlacementConfig =
                PlacementConfig::linear(AdapterConfig::KronLora(KronLoraConfig::auto(2))),
            /// Passes over the training questions.
            epochs: usize = 1,
            /// Questions per step.
            batch_size: usize = 8,
            /// Peak learning rate.
            lr: f64 = 1e-3,
            /// Fraction of the steps spent warming up.
            warmup: f64 = 0.06,
            /// AdamW weight decay.
            weight_decay: f64 = 0.0,
            /// Per-parameter gradient norm clipping (Burn 0.21's `Norm` clipping).
            clip_norm: f64 = 1.0,
            /// Longest sequence (context cut from the left).
            max_len: usize = 256,
            /// Seed of the adapters' initialisation and the batch order.
            seed: u64 = 0,
            /// Dev evaluations over the run (the best is kept); 0: only at the end.
            evals: usize = 2,
            /// Tokens per scoring batch.
            eval_batch_tokens: usize = 4096,
        }
    }
}

impl LlmFinetuneConfig {
    /// Checks the numbers.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |f: &str, r: String| Err(ConfigError::invalid("llm finetune", f, r));
        ConfigError::nonzero(
            "llm finetune",
            &[("epochs", self.epochs), ("batch_size", self.batch_size)],
        )?;
        if self.max_len < 2 {
            return bad("max_len", format!("{}: use at least 2", self.max_len));
        }
        crate::shards::check_parts("llm finetune", self.batch_parts, self.batch_size)?;
        crate::finetune::train::check_schedule("llm finetune", self.lr, self.warmup)?;
        self.placement.validate()
    }
}

/// One dev evaluation.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LlmEvalRow {
    /// Steps done.
    pub step: usize,
    /// Mean training loss since the previous evaluation.
    pub train_loss: f64,
    /// Dev accuracy.
    pub dev_acc: f64,
}

/// What a run measured.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LlmRunReport {
    /// The configuration.
    pub config: LlmFinetuneConfig,
    /// Trainable parameters.
    pub trainable: usize,
    /// Training steps.
    pub steps: usize,
    /// Seconds of training (evaluation excluded).
    pub train_seconds: f64,
    /// Median milliseconds per step.
    pub median_step_ms: f64,
    /// Loss per step.
    pub losses: Vec<f64>,
    /// Dev evaluations.
    pub evals: Vec<LlmEvalRow>,
    /// The best dev evaluation (the returned model's).
    pub best: EvalResult,
    /// Its step.
    pub best_step: usize,
}

/// Encodes each question's gold (context, continuation) for training.
pub fn encode_gold(
    tok: &TextTokenizer,
    questions: &[Question],
    max_len: usize,
) -> Result<Vec<Encoded>, ConfigError> {
    questions
        .iter()
        .map(|q| {
            let (ctx, cont) = &q.choices[q.gold];
            encode_pair(tok, ctx, cont, max_len)
        })
        .collect()
}

/// Fine-tunes `model` (built with its adapters on an autodiff backend) on `train`, evaluating
/// on `dev` `cfg.evals` times; returns the model of the best dev accuracy and the report.
/// `log` hears progress lines.
pub fn finetune_mc<B: AutodiffBackend>(
    mut model: LlamaForCausalLM<B>,
    tok: &TextTokenizer,
    train: &[Question],
    dev: &[Question],
    cfg: &LlmFinetuneConfig,
    device: &B::Device,
    log: &dyn Fn(&str),
) -> Result<(LlamaForCausalLM<B>, LlmRunReport), AdapterError> {
    cfg.validate()?;
    crate::kron::autodiff::register_default::<B>();
    if train.is_empty() || dev.is_empty() {
        return Err(
            ConfigError::invalid("llm finetune", "data", "no training or dev questions").into(),
        );
    }
    let examples = encode_gold(tok, train, cfg.max_len)?;
    let lengths: Vec<usize> = examples.iter().map(|e| e.ids.len()).collect();
    let total_steps = train.len().div_ceil(cfg.batch_size) * cfg.epochs;
    let warmup = ((cfg.warmup * total_steps as f64).ceil() as usize).min(total_steps);
    let every = if cfg.evals == 0 {
        total_steps
    } else {
        total_steps.div_ceil(cfg.evals)
    };
    let mut optim = crate::optim::adamw(
        &AdamWConfig::new()
            .with_weight_decay(cfg.weight_decay as f32)
            .with_grad_clipping(Some(GradientClippingConfig::Norm(cfg.clip_norm as f32))),
    );
    let trainable = count_params(&model).trainable;
    let parts = cfg
        .batch_parts
        .unwrap_or_else(|| shards::default_parts::<B>(device));
    let mut rng = SplitMix64::new(cfg.seed ^ 0x11a);
    let (mut losses, mut step_ms, mut evals) = (Vec::new(), Vec::new(), Vec::new());
    let mut best: Option<(EvalResult, usize, LlamaForCausalLM<B>)> = None;
    let mut window = (0.0, 0usize);
    for epoch in 1..=cfg.epochs {
        for batch in length_batches(&lengths, cfg.batch_size, &mut rng) {
            let t0 = Instant::now();
            let items: Vec<&Encoded> = batch.iter().map(|&i| &examples[i]).collect();
            let step = step_ms.len();
            let lr = lr_at(step, total_steps, warmup, cfg.lr);
            let tokens: usize = items.iter().map(|e| e.continuation().len()).sum();
            let seed = cfg.seed ^ step as u64;
            let (grads, shares) =
                shards::gradients(&model, items.len(), parts, seed, |model, p| {
                    let loss = masked_nll_share(model, &items[p.range.clone()], tokens, device);
                    let value: f64 = loss.clone().into_scalar().elem();
                    (loss, value)
                })?;
            model = optim.step(lr, model, grads);
            let loss: f64 = shares.iter().sum();
            step_ms.push(t0.elapsed().as_secs_f64() * 1e3);
            if !loss.is_finite() {
                return Err(ConfigError::invalid(
                    "llm finetune",
                    "lr",
                    format!("the loss became {loss} at step {step}: lower the learning rate"),
                )
                .into());
            }
            losses.push(loss);
            window = (window.0 + loss, window.1 + 1);
            let done = step_ms.len();
            if done % every == 0 || done == total_steps {
                let result = evaluate(
                    &model.valid(),
                    tok,
                    dev,
                    cfg.max_len,
                    cfg.eval_batch_tokens,
                    device,
                )?;
                let row = LlmEvalRow {
                    step: done,
                    train_loss: window.0 / window.1.max(1) as f64,
                    dev_acc: result.acc,
                };
                log(&format!(
                    "epoch {epoch} step {done}/{total_steps}: train loss {:.4}, dev acc {:.4} \
                     ({:.0} ms/step)",
                    row.train_loss,
                    row.dev_acc,
                    step_ms.iter().sum::<f64>() / done as f64
                ));
                window = (0.0, 0);
                if best.as_ref().is_none_or(|(b, ..)| result.acc > b.acc) {
                    best = Some((result, done, model.clone()));
                }
                evals.push(row);
            }
        }
    }
    let (best, best_step, best_model) = best.expect("at least one evaluation");
    let report = LlmRunReport {
        config: cfg.clone(),
        trainable,
        steps: step_ms.len(),
        train_seconds: step_ms.iter().sum::<f64>() / 1e3,
        median_step_ms: crate::finetune::timing::median(&step_ms),
        losses,
        evals,
        best,
        best_step,
    };
    Ok((best_model, report))
}
