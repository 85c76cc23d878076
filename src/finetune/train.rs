//! The fine-tuning loop: AdamW with warm-up and linear decay, length-bucketed batches, the
//! adapters (or biases, or everything) training, dev evaluation each epoch, the best
//! trainable-parameters checkpoint kept, and the test accuracy of the best epoch.

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::module::AutodiffModule;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::grad_clipping::GradientClippingConfig;
use burn::optim::{AdamWConfig, GradientsAccumulator, Optimizer};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::ElementConversion;
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};

use super::assets::AssetCache;
use super::data::{bbc_news, rotten_tomatoes, Task, TaskName, SPLIT_SEED};
use super::report::{EvalRow, LogRow};
use super::tokenize::{batch_tensors, length_batches, sorted_batches, Encoded, TextEncoder};
use crate::adapter::{AdapterConfig, KronAConfig};
use crate::error::{AdapterError, ConfigError};
use crate::linear::AdapterLayers;
use crate::model::bert::{classifier_from_source, BertClassifier, BertConfig};
use crate::model::TensorSource;
use crate::params::{count_params, ParamCount};
use crate::place::PlacementConfig;
use crate::rng::SplitMix64;
use crate::shards;
use crate::store::{save_params_matching, CheckpointMeta, NativeAdapters, ADAPTER_PATTERN};
use crate::training::TrainMode;

crate::macros::config! {
    /// A fine-tuning run. Serializes to JSON; every field has a default.
    pub struct FinetuneConfig(new) {
        required {}
        optional {
            /// Use only the first `max_train` training examples (the split itself never
            /// changes).
            max_train: usize,
            /// Dropout on hidden states and attention probabilities; without it the model's
            /// (0.1).
            dropout: f64,
            /// Parts of each (micro-)batch computed at once, forward and backward, on rayon's
            /// threads ([`crate::shards`]); without it [`crate::shards::default_parts`]: 2 on
            /// flex and ndarray (whose element-wise operations run on one thread), 1 elsewhere.
            /// The update is the whole batch's either way; the dropout masks differ. Each part
            /// holds its own gradient of every trainable parameter until they are summed: with
            /// `full` fine-tuning one more copy of the model's size a part (1 saves it).
            batch_parts: usize,
        }
        defaults {
            /// The task.
            task: TaskName = TaskName::RottenTomatoes,
            /// Adapters and training mode: KronA (shapes near √d) on every linear.
            placement: PlacementConfig =
                PlacementConfig::linear(AdapterConfig::KronA(KronAConfig::auto())),
            /// Passes over the training set (one epoch fits in 10 minutes on 2 CPU cores).
            epochs: usize = 1,
            /// Sentences per step.
            batch_size: usize = 32,
            /// Peak learning rate, right for the default KronA in a one- or two-epoch budget
            /// (1e-3, the KronA paper's for 20 epochs, reaches 77.6% instead of 80.1% test on
            /// 4,000 Rotten Tomatoes sentences in one epoch); see `docs/results.md` and
            /// [`super::presets`](mod@super::presets) for other methods.
            lr: f64 = 1e-2,
            /// Fraction of the steps spent warming up linearly from 0.
            warmup: f64 = 0.06,
            /// AdamW weight decay.
            weight_decay: f64 = 0.01,
            /// Gradient clipping: each parameter's gradient is scaled down to this L2 norm
            /// (Burn 0.21's `GradientClippingConfig::Norm` clips per parameter tensor, not the
            /// global norm over all parameters as PyTorch's `clip_grad_norm_` does).
            clip_norm: f64 = 1.0,
            /// Longest sequence in tokens (longer texts are truncated).
            max_len: usize = 64,
            /// Seed of the head's initialisation, the adapters', dropout and batch order.
            seed: u64 = 0,
            /// Sentences per evaluation batch.
            eval_batch_size: usize = 128,
            /// Dev evaluations per epoch (the best one is kept).
            evals_per_epoch: usize = 2,
            /// Micro-batches per optimizer step: each batch is split into this many parts whose
            /// gradients are summed (weighted by size) before one update — the whole batch's
            /// update, with one part's activations in memory at a time.
            grad_accumulation: usize = 1,
            /// Steps between resume checkpoints in the run's `resume/` folder (0: none); see
            /// [`super::resume`].
            checkpoint_every: usize = 50,
        }
    }
}

impl Default for FinetuneConfig {
    fn default() -> Self {
        Self::new()
    }
}

impl FinetuneConfig {
    /// Checks the numbers make sense.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |f: &str, r: String| Err(ConfigError::invalid("finetune", f, r));
        ConfigError::nonzero(
            "finetune",
            &[
                ("epochs", self.epochs),
                ("batch_size", self.batch_size),
                ("eval_batch_size", self.eval_batch_size),
                ("evals_per_epoch", self.evals_per_epoch),
            ],
        )?;
        check_schedule("finetune", self.lr, self.warmup)?;
        if let Some(p) = self.dropout {
            if !(0.0..1.0).contains(&p) {
                return bad("dropout", format!("{p} is not a probability in [0, 1)"));
            }
        }
        if self.grad_accumulation == 0 || self.grad_accumulation > self.batch_size {
            return bad(
                "grad_accumulation",
                format!(
                    "{} micro-batches for batches of {}: use 1 to batch_size",
                    self.grad_accumulation, self.batch_size
                ),
            );
        }
        crate::shards::check_parts("finetune", self.batch_parts, self.batch_size)?;
        if self.max_train == Some(0) {
            return bad("max_train", "0 examples: nothing to train on".into());
        }
        self.placement.validate()
    }

    /// A name for this run's folder: the method ([`super::presets::run_key`]), the task and the
    /// seed (`krona-rotten_tomatoes-seed0`).
    pub fn run_name(&self, task: &str) -> String {
        format!(
            "{}-{task}-seed{}",
            super::presets::run_key(&self.placement),
            self.seed
        )
    }
}

/// A task tokenized once, with the model it is tokenized for (shared by every run of a
/// comparison).
pub struct Prepared {
    /// The task, text and labels.
    pub task: Task,
    /// Tokenized training set.
    pub train: Vec<Encoded>,
    /// Tokenized dev set.
    pub dev: Vec<Encoded>,
    /// Tokenized test set.
    pub test: Vec<Encoded>,
    /// The model directory (`config.json`, `model.safetensors`, `tokenizer.json`).
    pub model_dir: PathBuf,
    /// The model's configuration.
    pub bert: BertConfig,
    /// Tokenizer truncation length.
    pub max_len: usize,
}

/// Finds (or fetches) the model and the task's data, splits and tokenizes it.
pub fn prepare(
    cache: &AssetCache,
    task: TaskName,
    max_len: usize,
    log: &dyn Fn(&str),
) -> Result<Prepared, AdapterError> {
    let model_dir = cache.minilm(log)?;
    let task = match task {
        TaskName::RottenTomatoes => rotten_tomatoes(&cache.rotten_tomatoes(log)?, SPLIT_SEED)?,
        TaskName::BbcNews => bbc_news(&cache.bbc_news(log)?, SPLIT_SEED)?,
    };
    prepare_task(&model_dir, task, max_len)
}

/// Tokenizes a task for the model in `model_dir`.
pub fn prepare_task(
    model_dir: &Path,
    task: Task,
    max_len: usize,
) -> Result<Prepared, AdapterError> {
    let bert = BertConfig::from_json_file(model_dir.join("config.json"))?;
    if max_len > bert.max_position_embeddings {
        return Err(ConfigError::invalid(
            "finetune",
            "max_len",
            format!(
                "{max_len} > the model's {} positions",
                bert.max_position_embeddings
            ),
        )
        .into());
    }
    let enc = TextEncoder::from_file(model_dir.join("tokenizer.json"), max_len)?;
    enc.check_vocab(bert.vocab_size)?;
    let encode = |xs: &[super::data::Example]| {
        xs.iter()
            .map(|e| {
                Ok(Encoded {
                    ids: enc.encode(&e.text)?,
                    label: e.label,
                })
            })
            .collect::<Result<Vec<_>, AdapterError>>()
    };
    Ok(Prepared {
        train: encode(&task.train)?,
        dev: encode(&task.dev)?,
        test: encode(&task.test)?,
        task,
        model_dir: model_dir.to_path_buf(),
        bert,
        max_len,
    })
}

/// What a run measured.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunReport {
    /// The configuration.
    pub config: FinetuneConfig,
    /// The task's class names, by index (what a served adapter answers with).
    #[serde(default)]
    pub labels: Vec<String>,
    /// Trainable and total parameters (head included).
    pub trainable: usize,
    /// All parameters.
    pub total: usize,
    /// Best dev accuracy.
    pub best_dev_acc: f64,
    /// The step of the best dev accuracy.
    pub best_step: usize,
    /// Test accuracy of the best-dev model.
    pub test_acc: f64,
    /// Training steps.
    pub steps: usize,
    /// Seconds spent training (evaluation excluded).
    pub train_seconds: f64,
    /// Median milliseconds per training step.
    pub median_step_ms: f64,
    /// Training sentences per second.
    pub sentences_per_second: f64,
    /// Logged training curve.
    pub history: Vec<LogRow>,
    /// One row per dev evaluation.
    pub evals: Vec<EvalRow>,
    /// The best checkpoint of every trainable parameter (adapters, head; by module path), if
    /// an output directory was given.
    pub checkpoint: Option<PathBuf>,
    /// The best linear adapters as an adapter file (by layer name; what the command-line tool
    /// merges and converts to PEFT), when the model has linear adapters.
    pub adapter_file: Option<PathBuf>,
}

/// The module-path patterns of what a mode trains (for the trainable-only checkpoint).
pub fn trainable_patterns(mode: TrainMode) -> Vec<&'static str> {
    let mut p = vec![ADAPTER_PATTERN, r"^encoder\.block_adapters\.", r"^head\."];
    match mode {
        TrainMode::Adapters => {}
        TrainMode::BitFit => p.push(r"(^|\.)(bias|beta)$"),
        TrainMode::Full => p = vec![".*"],
    }
    p
}

/// Builds the classifier for a run: the pretrained encoder with the run's adapters, its mode
/// applied, and a fresh head.
pub fn build_model<B: AutodiffBackend>(
    cfg: &FinetuneConfig,
    data: &Prepared,
    device: &B::Device,
) -> Result<BertClassifier<B>, AdapterError> {
    let source = TensorSource::from_model_dir(&data.model_dir)?;
    build_model_from(cfg, data, source, device)
}

/// [`build_model`] with the encoder's weights from `source` (random weights for tests).
pub fn build_model_from<B: AutodiffBackend>(
    cfg: &FinetuneConfig,
    data: &Prepared,
    source: TensorSource,
    device: &B::Device,
) -> Result<BertClassifier<B>, AdapterError> {
    let mut bert = data.bert.clone();
    if let Some(p) = cfg.dropout {
        bert.hidden_dropout_prob = p;
        bert.attention_probs_dropout_prob = p;
    }
    let mut model = classifier_from_source::<B>(
        source,
        &bert,
        &cfg.placement,
        data.task.labels.len(),
        device,
    )?;
    model.encoder = cfg.placement.train.apply(model.encoder);
    Ok(model)
}

/// Learning rate at `step` of `total`: linear warm-up over `warmup` steps, then linear decay to 0.
pub fn lr_at(step: usize, total: usize, warmup: usize, peak: f64) -> f64 {
    if step < warmup {
        peak * (step + 1) as f64 / warmup as f64
    } else {
        let left = total.saturating_sub(step) as f64;
        let span = total.saturating_sub(warmup).max(1) as f64;
        peak * left / span
    }
}

/// Accuracy of `model` on `data`, in batches of `batch_size` examples, each computed in
/// [`shards::default_parts`] parts at once (2 on flex and ndarray: a batch's forward pass keeps
/// both cores busy; 1 elsewhere).
///
/// Errors: a part failing to synchronize its device ([`shards::forward`]).
pub fn evaluate<B: Backend>(
    model: &BertClassifier<B>,
    data: &[Encoded],
    batch_size: usize,
    device: &B::Device,
) -> Result<f64, ConfigError> {
    if data.is_empty() {
        return Ok(0.0);
    }
    let lengths: Vec<usize> = data.iter().map(|e| e.ids.len()).collect();
    let parts = shards::default_parts::<B>(device);
    let mut correct = 0usize;
    for batch in sorted_batches(&lengths, batch_size) {
        let items: Vec<&Encoded> = batch.iter().map(|&i| &data[i]).collect();
        let (ids, mask, labels) = batch_tensors::<B>(&items, device);
        let hits = shards::forward::<B, _, _>(device, items.len(), parts, |p| {
            let rows = p.range.clone();
            let logits = model.forward(
                ids.clone().slice(rows.clone()),
                mask.clone().slice(rows.clone()),
            );
            let pred = logits.argmax(1).flatten::<1>(0, 1);
            let hits: i64 = pred
                .equal(labels.clone().slice(rows))
                .int()
                .sum()
                .into_scalar()
                .elem();
            hits as usize
        })?;
        correct += hits.iter().sum::<usize>();
    }
    Ok(correct as f64 / data.len() as f64)
}

/// Fine-tunes a fresh model on `data` with `cfg`. With `out_dir`, writes the best checkpoint
/// (trainable parameters only), `metrics.csv`, `curves.png` and `report.json` there.
pub fn finetune<B: AutodiffBackend>(
    cfg: &FinetuneConfig,
    data: &Prepared,
    out_dir: Option<&Path>,
    device: &B::Device,
    show_progress: bool,
) -> Result<RunReport, AdapterError> {
    cfg.validate()?;
    B::seed(device, cfg.seed);
    let model = build_model::<B>(cfg, data, device)?;
    train_model(cfg, data, model, out_dir, device, show_progress)
}

/// What the loop keeps while it runs: per-step rows, dev evaluations, timings, and the best
/// model so far.
struct Progress<B: AutodiffBackend> {
    history: Vec<LogRow>,
    evals: Vec<EvalRow>,
    step_ms: Vec<f64>,
    sentences: usize,
    best: Option<(f64, usize, BertClassifier<B>)>,
    /// Running statistics since the last evaluation: loss sum, hits, sentences, tokens, ms.
    window: (f64, usize, usize, usize, f64),
}

/// One optimizer step on a batch, in `micro` micro-batches whose gradients are summed, each
/// weighted by its share of the batch (so the update is the whole batch's), each micro-batch
/// computed in `parts` parts at once ([`crate::shards`], dropout drawn from `seed`); returns the
/// model, the batch's mean loss and correct predictions.
#[allow(clippy::too_many_arguments)]
fn train_step<B: AutodiffBackend, O: Optimizer<BertClassifier<B>, B>>(
    model: BertClassifier<B>,
    optim: &mut O,
    items: &[&Encoded],
    micro: usize,
    parts: usize,
    seed: u64,
    lr: f64,
    device: &B::Device,
) -> Result<(BertClassifier<B>, f64, usize), AdapterError> {
    let n = items.len();
    let size = n.div_ceil(micro.clamp(1, n.max(1)));
    let mut acc = GradientsAccumulator::<BertClassifier<B>>::new();
    let (mut loss_sum, mut hits) = (0.0, 0usize);
    for (m, chunk) in items.chunks(size).enumerate() {
        let micro_seed = seed ^ (m as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let (grads, outs) =
            shards::gradients(&model, chunk.len(), parts, micro_seed, |model, p| {
                let part = &chunk[p.range.clone()];
                let (ids, mask, labels) = batch_tensors::<B>(part, device);
                let logits = model.forward(ids, mask);
                let loss = CrossEntropyLossConfig::new()
                    .init(device)
                    .forward(logits.clone(), labels.clone());
                // The part's share of the whole batch (of every micro-batch together).
                let weight = part.len() as f64 / n as f64;
                let scaled = loss.clone().mul_scalar(weight);
                let l: f64 = loss.into_scalar().elem();
                let h: i64 = logits
                    .argmax(1)
                    .flatten::<1>(0, 1)
                    .equal(labels)
                    .int()
                    .sum()
                    .into_scalar()
                    .elem();
                (scaled, (l * weight, h as usize))
            })?;
        acc.accumulate(&model, grads);
        for (l, h) in outs {
            loss_sum += l;
            hits += h;
        }
    }
    let model = optim.step(lr, model, acc.grads());
    Ok((model, loss_sum, hits))
}

/// Where the best checkpoint goes: every trainable parameter, and the linear adapters alone as
/// an adapter file (what the command-line tool merges and converts to PEFT).
struct Checkpoints {
    trainable: Option<PathBuf>,
    adapters: Option<PathBuf>,
}

impl Checkpoints {
    fn new<B: AutodiffBackend>(out_dir: Option<&Path>, model: &BertClassifier<B>) -> Self {
        Self {
            trainable: out_dir.map(|d| d.join("trainable.safetensors")),
            adapters: out_dir
                .filter(|_| !model.adapter_specs().is_empty())
                .map(|d| d.join("adapter.safetensors")),
        }
    }

    /// Writes both files (atomically) for `model`, with `cfg` in their metadata.
    fn save<B: AutodiffBackend>(
        &self,
        model: &BertClassifier<B>,
        cfg: &FinetuneConfig,
    ) -> Result<(), AdapterError> {
        let extra = serde_json::to_value(cfg).ok();
        if let Some(path) = &self.trainable {
            let mut meta = CheckpointMeta::new(model.adapter_specs());
            meta.extra = extra.clone();
            let patterns = trainable_patterns(cfg.placement.train);
            save_params_matching(model, path, &patterns, &meta)?;
        }
        if let Some(path) = &self.adapters {
            let mut native = NativeAdapters::from_model(model);
            native.meta.extra = extra;
            native.write(path)?;
        }
        Ok(())
    }
}

/// The training loop on an already-built model (see [`finetune`]): `train_step` per batch,
/// a dev evaluation `evals_per_epoch` times an epoch, the best model checkpointed, and the
/// test accuracy of the best one. With `out_dir`, a resume checkpoint every
/// `checkpoint_every` steps (see [`train_model_resumable`]).
pub fn train_model<B: AutodiffBackend>(
    cfg: &FinetuneConfig,
    data: &Prepared,
    model: BertClassifier<B>,
    out_dir: Option<&Path>,
    device: &B::Device,
    show_progress: bool,
) -> Result<RunReport, AdapterError> {
    train_model_resumable(cfg, data, model, out_dir, device, show_progress, false)
}

/// The configuration a run folder's newest resume checkpoint was made with, if it has one.
pub fn resume_config(out_dir: &Path) -> Result<Option<FinetuneConfig>, AdapterError> {
    let Some(dir) = super::resume::latest(&out_dir.join("resume")) else {
        return Ok(None);
    };
    let path = dir.join("state.json");
    let text = crate::store::read_text(&path)?;
    let state: super::resume::RunState = serde_json::from_str(&text)
        .map_err(|e| AdapterError::format(path.display().to_string(), e.to_string()))?;
    Ok(Some(state.config))
}

/// The seed of the backend's generator (dropout) for `step`: reseeding every step makes a
/// resumed run draw what the uninterrupted one drew.
fn step_seed(seed: u64, step: usize) -> u64 {
    SplitMix64::new(seed ^ (step as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)).next_u64()
}

/// [`train_model`], continuing from the newest checkpoint in `out_dir/resume/` when `resume`
/// (which `model` must be built for: same config, fresh). Without `resume`, an old checkpoint
/// there is replaced.
pub fn train_model_resumable<B: AutodiffBackend>(
    cfg: &FinetuneConfig,
    data: &Prepared,
    mut model: BertClassifier<B>,
    out_dir: Option<&Path>,
    device: &B::Device,
    show_progress: bool,
    resume: bool,
) -> Result<RunReport, AdapterError> {
    cfg.validate()?;
    crate::kron::autodiff::register_default::<B>();
    let train: &[Encoded] = match cfg.max_train {
        Some(n) => &data.train[..n.min(data.train.len())],
        None => &data.train,
    };
    let ParamCount { trainable, total } = count_params(&model);
    if let Some(dir) = out_dir {
        std::fs::create_dir_all(dir).map_err(|e| AdapterError::io(dir, e))?;
    }
    let lengths: Vec<usize> = train.iter().map(|e| e.ids.len()).collect();
    let total_steps = train.len().div_ceil(cfg.batch_size) * cfg.epochs;
    let warmup = ((cfg.warmup * total_steps as f64).ceil() as usize).min(total_steps);
    let parts = cfg
        .batch_parts
        .unwrap_or_else(|| shards::default_parts::<B>(device));
    let mut optim: super::resume::Optim<B> = crate::optim::adamw(
        &AdamWConfig::new()
            .with_weight_decay(cfg.weight_decay as f32)
            .with_grad_clipping(Some(GradientClippingConfig::Norm(cfg.clip_norm as f32))),
    );
    let checkpoints = Checkpoints::new(out_dir, &model);
    let patterns = trainable_patterns(cfg.placement.train);
    let resume_root = out_dir
        .filter(|_| cfg.checkpoint_every > 0 || resume)
        .map(|d| d.join("resume"));
    let mut p = Progress::<B> {
        history: Vec::new(),
        evals: Vec::new(),
        step_ms: Vec::with_capacity(total_steps),
        sentences: 0,
        best: None,
        window: (0.0, 0, 0, 0, 0.0),
    };
    let (mut first_epoch, mut skip) = (1, 0);
    let mut rng = SplitMix64::new(cfg.seed ^ 0x5eed);
    match (&resume_root, resume) {
        (Some(root), true) => {
            let restored = super::resume::load(root, model, optim, &patterns, device)?;
            let Some(r) = restored else {
                return Err(AdapterError::io(
                    root,
                    std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        "no resume checkpoint to continue from",
                    ),
                ));
            };
            if r.state.config != *cfg {
                return Err(ConfigError::invalid(
                    "finetune",
                    "resume",
                    "the checkpoint was made with another configuration: resume with the one \
                     in its state.json (or start afresh elsewhere)",
                )
                .into());
            }
            (model, optim) = (r.model, r.optim);
            p.best = match (r.state.best, r.best) {
                (Some((acc, step)), Some(m)) => Some((acc, step, m)),
                _ => None,
            };
            (p.history, p.evals, p.step_ms) = (r.state.history, r.state.evals, r.state.step_ms);
            (p.sentences, p.window) = (r.state.sentences, r.state.window);
            (first_epoch, skip) = (r.state.epoch, r.state.batch);
            rng = SplitMix64::new(r.state.epoch_rng);
        }
        (None, true) => {
            return Err(ConfigError::invalid(
                "finetune",
                "resume",
                "resuming needs the run's output folder",
            )
            .into());
        }
        (Some(root), false) => {
            let _ = std::fs::remove_dir_all(root);
        }
        (None, false) => {}
    }
    let bar = progress_bar(show_progress, total_steps);
    bar.set_position(p.step_ms.len() as u64);
    for epoch in first_epoch..=cfg.epochs {
        let epoch_rng = rng.state();
        let batches = length_batches(&lengths, cfg.batch_size, &mut rng);
        let every = batches.len().div_ceil(cfg.evals_per_epoch);
        let n_batches = batches.len();
        for (bi, batch) in batches
            .into_iter()
            .enumerate()
            .skip(std::mem::take(&mut skip))
        {
            let t0 = Instant::now();
            let items: Vec<&Encoded> = batch.iter().map(|&i| &train[i]).collect();
            let step = p.step_ms.len();
            let lr = lr_at(step, total_steps, warmup, cfg.lr);
            let seed = step_seed(cfg.seed, step);
            B::seed(device, seed);
            let (next, loss, hits) = train_step(
                model,
                &mut optim,
                &items,
                cfg.grad_accumulation,
                parts,
                seed,
                lr,
                device,
            )?;
            model = next;
            let ms = t0.elapsed().as_secs_f64() * 1e3;
            if !loss.is_finite() {
                bar.abandon();
                return Err(ConfigError::invalid(
                    "finetune",
                    "lr",
                    format!("the loss became {loss} at step {step}: lower the learning rate"),
                )
                .into());
            }
            p.record(epoch, lr, loss, hits, &items, ms);
            bar.set_position(p.step_ms.len() as u64);
            bar.set_message(p.window_message(epoch));
            if (bi + 1) % every == 0 || bi + 1 == n_batches {
                let row = p.evaluate(epoch, &model, data, cfg, device)?;
                bar.println(format!(
                    "epoch {epoch} step {}/{total_steps}: train loss {:.4} acc {:.4}, dev acc {:.4}",
                    row.step, row.train_loss, row.train_acc, row.dev_acc,
                ));
                if p.best.as_ref().is_none_or(|(acc, ..)| row.dev_acc > *acc) {
                    checkpoints.save(&model, cfg)?;
                    p.best = Some((row.dev_acc, row.step, model.clone()));
                }
                p.evals.push(row);
            }
            let done = p.step_ms.len();
            if let Some(root) = resume_root.as_ref().filter(|_| cfg.checkpoint_every > 0) {
                if done.is_multiple_of(cfg.checkpoint_every) && done < total_steps {
                    let (epoch, batch, epoch_rng) = if bi + 1 == n_batches {
                        (epoch + 1, 0, rng.state())
                    } else {
                        (epoch, bi + 1, epoch_rng)
                    };
                    let state = p.state(cfg, epoch, batch, epoch_rng);
                    let best = p.best.as_ref().map(|b| &b.2);
                    super::resume::save(root, &state, &model, best, &optim, &patterns)?;
                }
            }
        }
    }
    bar.finish_and_clear();
    let report = p.report(cfg, data, trainable, total, &checkpoints, device)?;
    if let Some(dir) = out_dir {
        super::report::write_outputs(dir, &report)?;
    }
    if let Some(root) = &resume_root {
        // The run is complete: its outputs replace the resume checkpoints.
        let _ = std::fs::remove_dir_all(root);
    }
    Ok(report)
}

fn progress_bar(show: bool, total_steps: usize) -> ProgressBar {
    let bar = if show {
        ProgressBar::new(total_steps as u64)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
        )
        .expect("a valid template"),
    );
    bar
}

impl<B: AutodiffBackend> Progress<B> {
    /// Where the run is, for a resume checkpoint.
    fn state(
        &self,
        cfg: &FinetuneConfig,
        epoch: usize,
        batch: usize,
        epoch_rng: u64,
    ) -> super::resume::RunState {
        super::resume::RunState {
            config: cfg.clone(),
            step: self.step_ms.len(),
            epoch,
            batch,
            epoch_rng,
            history: self.history.clone(),
            evals: self.evals.clone(),
            step_ms: self.step_ms.clone(),
            sentences: self.sentences,
            window: self.window,
            best: self.best.as_ref().map(|b| (b.0, b.1)),
            sha256: Default::default(),
        }
    }

    fn record(
        &mut self,
        epoch: usize,
        lr: f64,
        loss: f64,
        hits: usize,
        items: &[&Encoded],
        ms: f64,
    ) {
        let n = items.len();
        let tokens = n * items.iter().map(|e| e.ids.len()).max().unwrap_or(0);
        self.step_ms.push(ms);
        self.sentences += n;
        let w = &mut self.window;
        *w = (
            w.0 + loss * n as f64,
            w.1 + hits,
            w.2 + n,
            w.3 + tokens,
            w.4 + ms,
        );
        self.history.push(LogRow {
            step: self.step_ms.len(),
            epoch,
            lr,
            loss,
            accuracy: hits as f64 / n as f64,
        });
    }

    fn window_message(&self, epoch: usize) -> String {
        let (loss, hits, n, tokens, ms) = self.window;
        format!(
            "epoch {epoch} loss {:.4} acc {:.3} {:.0} sent/s {:.0} tok/s",
            loss / n as f64,
            hits as f64 / n as f64,
            n as f64 / (ms / 1e3),
            tokens as f64 / (ms / 1e3)
        )
    }

    /// A dev evaluation; resets the running window.
    fn evaluate(
        &mut self,
        epoch: usize,
        model: &BertClassifier<B>,
        data: &Prepared,
        cfg: &FinetuneConfig,
        device: &B::Device,
    ) -> Result<EvalRow, ConfigError> {
        let dev_acc = evaluate(&model.valid(), &data.dev, cfg.eval_batch_size, device)?;
        let (loss, hits, n, ..) = std::mem::take(&mut self.window);
        Ok(EvalRow {
            epoch,
            step: self.step_ms.len(),
            train_loss: loss / n as f64,
            train_acc: hits as f64 / n as f64,
            dev_acc,
            train_seconds: self.step_ms.iter().sum::<f64>() / 1e3,
        })
    }

    fn report(
        self,
        cfg: &FinetuneConfig,
        data: &Prepared,
        trainable: usize,
        total: usize,
        checkpoints: &Checkpoints,
        device: &B::Device,
    ) -> Result<RunReport, ConfigError> {
        let (best_dev_acc, best_step, best) = self.best.expect("at least one evaluation");
        let train_seconds = self.step_ms.iter().sum::<f64>() / 1e3;
        let test_acc = evaluate(&best.valid(), &data.test, cfg.eval_batch_size, device)?;
        Ok(RunReport {
            config: cfg.clone(),
            labels: data.task.labels.clone(),
            trainable,
            total,
            best_dev_acc,
            best_step,
            test_acc,
            steps: self.step_ms.len(),
            train_seconds,
            median_step_ms: super::timing::median(&self.step_ms),
            sentences_per_second: self.sentences as f64 / train_seconds.max(1e-9),
            history: self.history,
            evals: self.evals,
            checkpoint: checkpoints.trainable.clone(),
            adapter_file: checkpoints.adapters.clone(),
        })
    }
}

/// Checks a peak learning rate and a warm-up fraction (the main job's and the decoder's
/// configs share the schedule); `owner` names the config in the error.
pub(crate) fn check_schedule(owner: &str, lr: f64, warmup: f64) -> Result<(), ConfigError> {
    if !(lr.is_finite() && lr > 0.0) {
        return Err(ConfigError::invalid(
            owner,
            "lr",
            format!("{lr} is not a positive learning rate"),
        ));
    }
    if !(0.0..1.0).contains(&warmup) {
        return Err(ConfigError::invalid(
            owner,
            "warmup",
            format!("{warmup} is not a fraction in [0, 1)"),
        ));
    }
    Ok(())
}
