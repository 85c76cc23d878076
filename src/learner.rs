//! Training inside Burn's own `burn-train` (feature `train`): the BERT classifier and the
//! decoder implement `TrainStep` / `InferenceStep`, with batchers for Burn's data loaders, so
//! adapters drop into `SupervisedTraining` with its metrics, loggers, checkpointer, early
//! stopping and multi-device strategies (`examples/learner.rs`, docs/training.md).
//!
//! Both steps produce burn-train's `ClassificationOutput`: the classifier's class logits, and
//! for the decoder the logits at the positions that predict answer tokens (the same masked loss
//! as [`crate::llm::train`]), so loss, accuracy and perplexity metrics apply unchanged. Only
//! trainable parameters (adapter factors, a head) get gradients: the frozen base is marked
//! `no_grad`, so backward produces nothing for it and the optimizer keeps no state for it.
//! On flex and ndarray the classifier's step computes its batch in two parts at once
//! ([`crate::shards`]), as the main job's loop does, and the decoder's step likewise (its parts'
//! losses weighed by their answer tokens).
//!
//! A model whose frozen weights are held in int8 (`LoadOptions::frozen`) does not train here:
//! burn-train forks the whole model before training (and its checkpointer reloads whole
//! models), which Burn 0.21's autodiff cannot do with a quantized tensor; `llm::train::finetune_mc`
//! or a loop of one's own (with `training::gradients_params`) trains it.
//!
//! ```ignore
//! let batcher = ClassifierBatcher;
//! let train = DataLoaderBuilder::new(batcher.clone()).batch_size(32).shuffle(0).build(InMemDataset::new(data.train.clone()));
//! let valid = DataLoaderBuilder::new(batcher).batch_size(128).build(InMemDataset::new(data.dev.clone()));
//! let result = SupervisedTraining::new("runs/learner", train, valid)
//!     .metrics((AccuracyMetric::new(), LossMetric::new()))
//!     .num_epochs(2)
//!     .launch(Learner::new(model, AdamWConfig::new().init(), 1e-3));
//! ```

use burn::data::dataloader::batcher::Batcher;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Distribution, Int, Tensor};
use burn::train::metric::{MetricDefinition, MetricId};
use burn::train::renderer::{
    EvaluationName, EvaluationProgress, MetricState, MetricsRenderer, MetricsRendererEvaluation,
    MetricsRendererTraining, ProgressType, TrainingProgress,
};
use burn::train::{ClassificationOutput, InferenceStep, LearnerSummary, TrainOutput, TrainStep};

use crate::finetune::tokenize::{batch_tensors, Encoded};
use crate::llm::score::{continuation_batch, continuation_logits, ContinuationBatch};
use crate::model::bert::BertClassifier;
use crate::model::llama::LlamaForCausalLM;
use crate::shards;

/// A padded classification batch.
#[derive(Clone, Debug)]
pub struct ClassifierBatch<B: Backend> {
    /// `[batch, seq]` token ids.
    pub ids: Tensor<B, 2, Int>,
    /// `[batch, seq]`, 1 for tokens, 0 for padding.
    pub mask: Tensor<B, 2, Int>,
    /// `[batch]` classes.
    pub labels: Tensor<B, 1, Int>,
}

impl<B: Backend> ClassifierBatch<B> {
    /// The examples `range` as a batch of their own (padded as the whole batch is).
    fn rows(&self, range: std::ops::Range<usize>) -> Self {
        ClassifierBatch {
            ids: self.ids.clone().slice(range.clone()),
            mask: self.mask.clone().slice(range.clone()),
            labels: self.labels.clone().slice(range),
        }
    }
}

/// Pads tokenized texts into a [`ClassifierBatch`] (to the batch's longest text).
#[derive(Clone, Copy, Debug, Default)]
pub struct ClassifierBatcher;

impl<B: Backend> Batcher<B, Encoded, ClassifierBatch<B>> for ClassifierBatcher {
    fn batch(&self, items: Vec<Encoded>, device: &B::Device) -> ClassifierBatch<B> {
        let refs: Vec<&Encoded> = items.iter().collect();
        let (ids, mask, labels) = batch_tensors::<B>(&refs, device);
        ClassifierBatch { ids, mask, labels }
    }
}

impl<B: Backend> BertClassifier<B> {
    /// Logits and the cross-entropy loss of a batch.
    pub fn forward_classification(&self, batch: ClassifierBatch<B>) -> ClassificationOutput<B> {
        let logits = self.forward(batch.ids, batch.mask);
        let loss = CrossEntropyLossConfig::new()
            .init(&logits.device())
            .forward(logits.clone(), batch.labels.clone());
        ClassificationOutput::new(loss, logits, batch.labels)
    }
}

impl<B: AutodiffBackend> TrainStep for BertClassifier<B> {
    type Input = ClassifierBatch<B>;
    type Output = ClassificationOutput<B>;

    /// One step on `batch`, computed in [`shards::default_parts`] parts at once (2 on flex and
    /// ndarray: [`crate::shards`]); the gradients are the whole batch's, and the output joins
    /// the parts' logits and loss. The parts' dropout generators are seeded from the backend's
    /// generator, so a seeded run repeats.
    ///
    /// Panics if the device fails to synchronize a part's work (burn-train's `step` has no
    /// error path; Burn itself panics on device failures).
    fn step(&self, batch: ClassifierBatch<B>) -> TrainOutput<ClassificationOutput<B>> {
        crate::kron::autodiff::register_default::<B>();
        let device = batch.ids.device();
        let n = batch.labels.dims()[0];
        let parts = shards::default_parts::<B>(&device);
        if parts <= 1 || n <= 1 {
            let out = self.forward_classification(batch);
            return TrainOutput {
                grads: crate::training::gradients_params(out.loss.backward(), self),
                item: out,
            };
        }
        let seed = backend_seed::<B>(&device);
        let (grads, parts) = shards::gradients(self, n, parts, seed, |model, p| {
            let out = model.forward_classification(batch.rows(p.range.clone()));
            detached_share(out, p.share)
        })
        .unwrap_or_else(|e| panic!("the classifier's step in parts: {e}"));
        TrainOutput {
            grads,
            item: joined(parts),
        }
    }
}

/// A seed for the parts' dropout generators, drawn from the backend's generator (so a seeded
/// burn-train run repeats).
fn backend_seed<B: Backend>(device: &B::Device) -> u64 {
    let bits: Vec<f32> = Tensor::<B, 1>::random([2], Distribution::Default, device)
        .into_data()
        .convert::<f32>()
        .to_vec()
        .unwrap_or_default();
    bits.iter()
        .fold(0u64, |acc, v| (acc << 32) | u64::from(v.to_bits()))
}

/// A part's weighed loss, logits and targets, detached from the part's graph.
type PartOutput<B> = (Tensor<B, 1>, Tensor<B, 2>, Tensor<B, 1, Int>);

/// A part's loss weighed by its `share` of the batch (to differentiate), and its output detached
/// (to join with the other parts').
fn detached_share<B: AutodiffBackend>(
    out: ClassificationOutput<B>,
    share: f64,
) -> (Tensor<B, 1>, PartOutput<B>) {
    let share = out.loss.mul_scalar(share);
    (
        share.clone(),
        (share.detach(), out.output.detach(), out.targets),
    )
}

/// The parts' outputs as one: the losses summed (the batch's loss), logits and targets joined
/// in batch order.
fn joined<B: Backend>(parts: Vec<PartOutput<B>>) -> ClassificationOutput<B> {
    let mut loss = None;
    let (mut logits, mut targets) = (Vec::new(), Vec::new());
    for (l, o, t) in parts {
        loss = Some(match loss {
            None => l,
            Some(sum) => sum + l,
        });
        logits.push(o);
        targets.push(t);
    }
    let loss = loss.expect("shards returns every part, at least one");
    ClassificationOutput::new(
        loss,
        crate::kron::autodiff::cat(logits, 0),
        Tensor::cat(targets, 0),
    )
}

impl<B: Backend> InferenceStep for BertClassifier<B> {
    type Input = ClassifierBatch<B>;
    type Output = ClassificationOutput<B>;

    /// The batch's logits and loss (burn-train's validation), computed in
    /// [`shards::default_parts`] parts at once ([`shards::forward`]; 2 on flex and ndarray) and
    /// joined as the training step's are.
    ///
    /// Panics if the device fails to synchronize a part's work (burn-train's `step` has no
    /// error path).
    fn step(&self, batch: ClassifierBatch<B>) -> ClassificationOutput<B> {
        let device = batch.ids.device();
        let n = batch.labels.dims()[0];
        let parts = shards::default_parts::<B>(&device);
        if parts <= 1 || n <= 1 {
            return self.forward_classification(batch);
        }
        let parts = shards::forward::<B, _, _>(&device, n, parts, |p| {
            let out = self.forward_classification(batch.rows(p.range.clone()));
            (out.loss.mul_scalar(p.share), out.output, out.targets)
        })
        .unwrap_or_else(|e| panic!("the classifier's validation step in parts: {e}"));
        joined(parts)
    }
}

/// Pads (context, answer) pairs into a [`ContinuationBatch`]: the loss covers answer tokens.
#[derive(Clone, Copy, Debug, Default)]
pub struct ContinuationBatcher;

impl<B: Backend> Batcher<B, crate::llm::score::Encoded, ContinuationBatch<B>>
    for ContinuationBatcher
{
    fn batch(
        &self,
        items: Vec<crate::llm::score::Encoded>,
        device: &B::Device,
    ) -> ContinuationBatch<B> {
        let refs: Vec<&crate::llm::score::Encoded> = items.iter().collect();
        continuation_batch(&refs, device)
    }
}

impl<B: Backend> LlamaForCausalLM<B> {
    /// The logits at the positions that predict answer tokens (`[tokens, vocab]`), their
    /// targets, and the mean negative log-likelihood.
    pub fn forward_continuation(&self, batch: ContinuationBatch<B>) -> ClassificationOutput<B> {
        let targets = batch.targets.clone();
        let logits = continuation_logits(self, batch);
        let loss = CrossEntropyLossConfig::new()
            .init(&logits.device())
            .forward(logits.clone(), targets.clone());
        ClassificationOutput::new(loss, logits, targets)
    }
}

impl<B: AutodiffBackend> TrainStep for LlamaForCausalLM<B> {
    type Input = ContinuationBatch<B>;
    type Output = ClassificationOutput<B>;

    /// One step on `batch`, computed in [`shards::default_parts`] parts (sequences) at once on
    /// flex and ndarray, as the classifier's; each part's mean loss is weighed by its share of
    /// the batch's answer tokens, so the gradients are the whole batch's. A batch that cannot
    /// be cut into parts that each hold an answer token is computed whole.
    ///
    /// Panics if the device fails to synchronize a part's work (burn-train's `step` has no
    /// error path; Burn itself panics on device failures).
    fn step(&self, batch: ContinuationBatch<B>) -> TrainOutput<ClassificationOutput<B>> {
        crate::kron::autodiff::register_default::<B>();
        let device = batch.ids.device();
        let b = batch.ids.dims()[0];
        let Some((parts, counts)) = decoder_parts(&batch, &device) else {
            let out = self.forward_continuation(batch);
            return TrainOutput {
                grads: crate::training::gradients_params(out.loss.backward(), self),
                item: out,
            };
        };
        let total: usize = counts.iter().sum();
        let seed = backend_seed::<B>(&device);
        let (grads, parts) = shards::gradients(self, b, parts, seed, |model, p| {
            let tokens: usize = counts[p.range.clone()].iter().sum();
            let out = model.forward_continuation(batch.sequences(p.range.clone(), &counts));
            detached_share(out, tokens as f64 / total as f64)
        })
        .unwrap_or_else(|e| panic!("the decoder's step in parts: {e}"));
        TrainOutput {
            grads,
            item: joined(parts),
        }
    }
}

impl<B: Backend> InferenceStep for LlamaForCausalLM<B> {
    type Input = ContinuationBatch<B>;
    type Output = ClassificationOutput<B>;

    /// The batch's answer-token logits and loss (burn-train's validation), in parts as the
    /// training step's ([`shards::forward`]; each part's mean loss weighed by its answer tokens).
    ///
    /// Panics if the device fails to synchronize a part's work (burn-train's `step` has no
    /// error path).
    fn step(&self, batch: ContinuationBatch<B>) -> ClassificationOutput<B> {
        let device = batch.ids.device();
        let b = batch.ids.dims()[0];
        let Some((parts, counts)) = decoder_parts(&batch, &device) else {
            return self.forward_continuation(batch);
        };
        let total: usize = counts.iter().sum();
        let parts = shards::forward::<B, _, _>(&device, b, parts, |p| {
            let tokens: usize = counts[p.range.clone()].iter().sum();
            let out = self.forward_continuation(batch.sequences(p.range.clone(), &counts));
            let share = tokens as f64 / total as f64;
            (out.loss.mul_scalar(share), out.output, out.targets)
        })
        .unwrap_or_else(|e| panic!("the decoder's validation step in parts: {e}"));
        joined(parts)
    }
}

/// How many parts a decoder batch is computed in, with each sequence's answer-token count:
/// [`shards::default_parts`], or `None` (the batch whole) where that is one part or a part
/// would hold no answer token.
fn decoder_parts<B: Backend>(
    batch: &ContinuationBatch<B>,
    device: &B::Device,
) -> Option<(usize, Vec<usize>)> {
    let ranges = shards::split(batch.ids.dims()[0], shards::default_parts::<B>(device));
    if ranges.len() == 1 {
        return None;
    }
    let counts = batch.token_counts()?;
    ranges
        .iter()
        .all(|r| counts[r.clone()].iter().sum::<usize>() > 0)
        .then_some((ranges.len(), counts))
}

/// A burn-train renderer that hands one line of text to `log` every `every` training
/// iterations and at the end of every validation pass (the library never prints: pass
/// `|l| eprintln!("{l}")` to see them). burn-train's own `CliMetricsRenderer` prints every
/// iteration; its terminal UI needs the `tui` feature of `burn`.
pub struct LineRenderer {
    names: std::collections::HashMap<MetricId, String>,
    train: std::collections::BTreeMap<String, String>,
    valid: std::collections::BTreeMap<String, String>,
    every: usize,
    calls: usize,
    log: Box<dyn Fn(&str) + Send + Sync>,
}

impl LineRenderer {
    /// A line every `every` iterations (0: validation lines only), to `log`.
    pub fn new(every: usize, log: impl Fn(&str) + Send + Sync + 'static) -> Self {
        Self {
            names: Default::default(),
            train: Default::default(),
            valid: Default::default(),
            every,
            calls: 0,
            log: Box::new(log),
        }
    }

    fn remember(&self, into: &mut std::collections::BTreeMap<String, String>, state: MetricState) {
        let entry = match state {
            MetricState::Generic(e) | MetricState::Numeric(e, _) => e,
        };
        let name = self
            .names
            .get(&entry.metric_id)
            .cloned()
            .unwrap_or_else(|| "metric".into());
        into.insert(name, entry.serialized_entry.formatted);
    }

    fn line(
        split: &str,
        item: &TrainingProgress,
        values: &std::collections::BTreeMap<String, String>,
    ) -> String {
        let p = item.progress.as_ref();
        let mut line = format!(
            "epoch {}/{} {split} {}/{}:",
            item.global_progress.items_processed,
            item.global_progress.items_total,
            p.map_or(0, |p| p.items_processed),
            p.map_or(0, |p| p.items_total)
        );
        for (k, v) in values {
            line.push_str(&format!(" {k} {v}"));
        }
        line
    }
}

impl MetricsRendererTraining for LineRenderer {
    fn update_train(&mut self, state: MetricState) {
        let mut m = std::mem::take(&mut self.train);
        self.remember(&mut m, state);
        self.train = m;
    }

    fn update_valid(&mut self, state: MetricState) {
        let mut m = std::mem::take(&mut self.valid);
        self.remember(&mut m, state);
        self.valid = m;
    }

    fn render_train(&mut self, item: TrainingProgress, _: Vec<ProgressType>) {
        self.calls += 1;
        if self.every > 0 && self.calls.is_multiple_of(self.every) {
            (self.log)(&Self::line("train", &item, &self.train));
        }
    }

    fn render_valid(&mut self, item: TrainingProgress, _: Vec<ProgressType>) {
        if item
            .progress
            .as_ref()
            .is_some_and(|p| p.items_processed >= p.items_total)
        {
            (self.log)(&Self::line("valid", &item, &self.valid));
        }
    }

    fn on_train_end(
        &mut self,
        summary: Option<LearnerSummary>,
    ) -> Result<(), Box<dyn std::error::Error>> {
        if let Some(s) = summary {
            (self.log)(&s.to_string());
        }
        Ok(())
    }
}

impl MetricsRendererEvaluation for LineRenderer {
    fn update_test(&mut self, _: EvaluationName, state: MetricState) {
        let mut m = std::mem::take(&mut self.valid);
        self.remember(&mut m, state);
        self.valid = m;
    }

    fn render_test(&mut self, _: EvaluationProgress, _: Vec<ProgressType>) {}
}

impl MetricsRenderer for LineRenderer {
    fn manual_close(&mut self) {}

    fn register_metric(&mut self, definition: MetricDefinition) {
        self.names.insert(definition.metric_id, definition.name);
    }
}

/// The main job's learning-rate schedule as a burn-train scheduler: linear warm-up over
/// `warmup` steps to `peak`, then linear decay to 0 at `total` ([`crate::finetune::train::lr_at`]).
/// Its record is the step, so a resumed `SupervisedTraining` continues the schedule.
#[derive(Clone, Debug)]
pub struct WarmupLinear {
    step: usize,
    total: usize,
    warmup: usize,
    peak: f64,
}

impl WarmupLinear {
    /// The schedule over `total` optimizer steps.
    pub fn new(peak: f64, total: usize, warmup: usize) -> Self {
        Self {
            step: 0,
            total,
            warmup,
            peak,
        }
    }
}

impl burn::lr_scheduler::LrScheduler for WarmupLinear {
    type Record<B: Backend> = usize;

    fn step(&mut self) -> burn::optim::LearningRate {
        let lr = crate::finetune::train::lr_at(self.step, self.total, self.warmup, self.peak);
        self.step += 1;
        lr
    }

    fn to_record<B: Backend>(&self) -> usize {
        self.step
    }

    fn load_record<B: Backend>(mut self, record: usize) -> Self {
        self.step = record;
        self
    }
}
