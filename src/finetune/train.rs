//! The fine-tuning loop: AdamW with warm-up and linear decay, length-bucketed batches, the
//! adapters (or biases, or everything) training, dev evaluation each epoch, the best
//! trainable-parameters checkpoint kept, and the test accuracy of the best epoch.

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::module::AutodiffModule;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::grad_clipping::GradientClippingConfig;
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::ElementConversion;
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};

use super::assets::AssetCache;
use super::data::{bbc_news, rotten_tomatoes, Task, TaskName, SPLIT_SEED};
use super::report::{EvalRow, LogRow};
use super::tokenize::{batch_tensors, length_batches, sorted_batches, Encoded, TextEncoder};
use crate::adapter::AdapterConfig;
use crate::checkpoint::{
    save_params_matching, AdapterLayers, CheckpointMeta, NativeAdapters, ADAPTER_PATTERN,
};
use crate::error::AdapterError;
use crate::model::{BertClassifier, BertConfig, PeftConfig, TensorSource};
use crate::params::{count_params, ParamCount};
use crate::rng::SplitMix64;
use crate::training::TrainMode;
use crate::KronAConfig;

/// A fine-tuning run. Serializes to JSON; every field but `peft` has a default.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FinetuneConfig {
    /// The task. Default Rotten Tomatoes.
    #[serde(default)]
    pub task: TaskName,
    /// Adapters and training mode. Default: KronA (shapes near √d) on every linear.
    #[serde(default = "default_peft")]
    pub peft: PeftConfig,
    /// Passes over the training set. Default 1 (the main job fits in 10 minutes on 2 CPU cores).
    #[serde(default = "d_epochs")]
    pub epochs: usize,
    /// Sentences per step. Default 32.
    #[serde(default = "d_batch")]
    pub batch_size: usize,
    /// Peak learning rate. Default 1e-2, right for the default KronA in a one- or two-epoch
    /// budget (1e-3, the KronA paper's for 20 epochs, reaches 77.6% instead of 80.1% test on
    /// 4,000 Rotten Tomatoes sentences in one epoch); see `docs/results.md` for other methods.
    #[serde(default = "d_lr")]
    pub lr: f64,
    /// Fraction of the steps spent warming up linearly from 0. Default 0.06.
    #[serde(default = "d_warmup")]
    pub warmup: f64,
    /// AdamW weight decay. Default 0.01.
    #[serde(default = "d_wd")]
    pub weight_decay: f64,
    /// Gradient norm clipping. Default 1.0.
    #[serde(default = "d_clip")]
    pub clip_norm: f64,
    /// Longest sequence in tokens (longer texts are truncated). Default 64.
    #[serde(default = "d_len")]
    pub max_len: usize,
    /// Use only the first `max_train` training examples (the split itself never changes).
    #[serde(default)]
    pub max_train: Option<usize>,
    /// Seed of the head's initialisation, the adapters', dropout and batch order. Default 0.
    #[serde(default)]
    pub seed: u64,
    /// Sentences per evaluation batch. Default 128.
    #[serde(default = "d_eval_batch")]
    pub eval_batch_size: usize,
    /// Dropout on hidden states and attention probabilities; `None` keeps the model's (0.1).
    #[serde(default)]
    pub dropout: Option<f64>,
    /// Dev evaluations per epoch (the best one is kept). Default 2.
    #[serde(default = "d_evals")]
    pub evals_per_epoch: usize,
}

fn default_peft() -> PeftConfig {
    PeftConfig::linear(AdapterConfig::KronA(KronAConfig::auto()))
}
fn d_epochs() -> usize {
    1
}
fn d_batch() -> usize {
    32
}
fn d_lr() -> f64 {
    1e-2
}
fn d_warmup() -> f64 {
    0.06
}
fn d_wd() -> f64 {
    0.01
}
fn d_clip() -> f64 {
    1.0
}
fn d_len() -> usize {
    64
}
fn d_eval_batch() -> usize {
    128
}
fn d_evals() -> usize {
    2
}

impl Default for FinetuneConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("every field has a default")
    }
}

impl burn::config::Config for FinetuneConfig {}

impl FinetuneConfig {
    /// Checks the numbers make sense.
    pub fn validate(&self) -> Result<(), AdapterError> {
        let bad = |f: &str, r: String| Err(AdapterError::config("finetune", f, r));
        if self.epochs == 0
            || self.batch_size == 0
            || self.eval_batch_size == 0
            || self.evals_per_epoch == 0
        {
            return bad(
                "epochs/batch_size/evals_per_epoch",
                "must be at least 1".into(),
            );
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad("lr", format!("{} is not a positive learning rate", self.lr));
        }
        if !(0.0..1.0).contains(&self.warmup) {
            return bad(
                "warmup",
                format!("{} is not a fraction in [0, 1)", self.warmup),
            );
        }
        if let Some(p) = self.dropout {
            if !(0.0..1.0).contains(&p) {
                return bad("dropout", format!("{p} is not a probability in [0, 1)"));
            }
        }
        if self.max_train == Some(0) {
            return bad("max_train", "0 examples: nothing to train on".into());
        }
        self.peft.targets.validate()
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
        return Err(AdapterError::config(
            "finetune",
            "max_len",
            format!(
                "{max_len} > the model's {} positions",
                bert.max_position_embeddings
            ),
        ));
    }
    let enc = TextEncoder::from_file(model_dir.join("tokenizer.json"), max_len)?;
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
    let mut bert = data.bert.clone();
    if let Some(p) = cfg.dropout {
        bert.hidden_dropout_prob = p;
        bert.attention_probs_dropout_prob = p;
    }
    let mut source = TensorSource::from_safetensors(data.model_dir.join("model.safetensors"))?;
    let mut model = BertClassifier::<B>::new(
        &mut source,
        &bert,
        &cfg.peft,
        data.task.labels.len(),
        device,
    )?;
    source.finish()?;
    model.encoder = cfg.peft.train.apply(model.encoder);
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

/// Accuracy of `model` on `data`.
pub fn evaluate<B: Backend>(
    model: &BertClassifier<B>,
    data: &[Encoded],
    batch_size: usize,
    device: &B::Device,
) -> f64 {
    if data.is_empty() {
        return 0.0;
    }
    let lengths: Vec<usize> = data.iter().map(|e| e.ids.len()).collect();
    let mut correct = 0usize;
    for batch in sorted_batches(&lengths, batch_size) {
        let items: Vec<&Encoded> = batch.iter().map(|&i| &data[i]).collect();
        let (ids, mask, labels) = batch_tensors::<B>(&items, device);
        let pred = model.forward(ids, mask).argmax(1).flatten::<1>(0, 1);
        let hits: i64 = pred.equal(labels).int().sum().into_scalar().elem();
        correct += hits as usize;
    }
    correct as f64 / data.len() as f64
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

/// The training loop on an already-built model (see [`finetune`]).
pub fn train_model<B: AutodiffBackend>(
    cfg: &FinetuneConfig,
    data: &Prepared,
    mut model: BertClassifier<B>,
    out_dir: Option<&Path>,
    device: &B::Device,
    show_progress: bool,
) -> Result<RunReport, AdapterError> {
    let train: &[Encoded] = match cfg.max_train {
        Some(n) => &data.train[..n.min(data.train.len())],
        None => &data.train,
    };
    let ParamCount { trainable, total } = count_params(&model);
    if let Some(dir) = out_dir {
        std::fs::create_dir_all(dir).map_err(|e| AdapterError::io(dir, e))?;
    }
    let lengths: Vec<usize> = train.iter().map(|e| e.ids.len()).collect();
    let per_epoch = train.len().div_ceil(cfg.batch_size);
    let total_steps = per_epoch * cfg.epochs;
    let warmup = ((cfg.warmup * total_steps as f64).ceil() as usize).min(total_steps);
    let mut optim = AdamWConfig::new()
        .with_weight_decay(cfg.weight_decay as f32)
        .with_grad_clipping(Some(GradientClippingConfig::Norm(cfg.clip_norm as f32)))
        .init();
    let loss_fn = CrossEntropyLossConfig::new().init(device);

    let bar = if show_progress {
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
    let mut rng = SplitMix64::new(cfg.seed ^ 0x5eed);
    let mut history = Vec::new();
    let mut evals = Vec::new();
    let mut step_ms = Vec::with_capacity(total_steps);
    let (mut best_acc, mut best_step, mut best) = (-1.0f64, 0usize, None);
    let checkpoint = out_dir.map(|d| d.join("trainable.safetensors"));
    let adapter_file = out_dir
        .filter(|_| !model.adapter_specs().is_empty())
        .map(|d| d.join("adapter.safetensors"));
    let mut step = 0usize;
    let mut sentences = 0usize;
    for epoch in 1..=cfg.epochs {
        let batches = length_batches(&lengths, cfg.batch_size, &mut rng);
        let every = batches.len().div_ceil(cfg.evals_per_epoch);
        let n_batches = batches.len();
        // Running statistics since the last evaluation.
        let (mut run_loss, mut run_hits, mut run_n, mut run_tokens, mut run_ms) =
            (0.0f64, 0usize, 0usize, 0usize, 0.0f64);
        for (bi, batch) in batches.into_iter().enumerate() {
            let t0 = Instant::now();
            let items: Vec<&Encoded> = batch.iter().map(|&i| &train[i]).collect();
            let (ids, mask, labels) = batch_tensors::<B>(&items, device);
            let logits = model.forward(ids.clone(), mask);
            let loss = loss_fn.forward(logits.clone(), labels.clone());
            let lr = lr_at(step, total_steps, warmup, cfg.lr);
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            model = optim.step(lr, model, grads);
            let loss_v: f64 = loss.into_scalar().elem();
            let hits: i64 = logits
                .argmax(1)
                .flatten::<1>(0, 1)
                .equal(labels)
                .int()
                .sum()
                .into_scalar()
                .elem();
            let ms = t0.elapsed().as_secs_f64() * 1e3;
            step_ms.push(ms);
            if !loss_v.is_finite() {
                bar.abandon();
                return Err(AdapterError::config(
                    "finetune",
                    "lr",
                    format!("the loss became {loss_v} at step {step}: lower the learning rate"),
                ));
            }
            step += 1;
            run_loss += loss_v * items.len() as f64;
            run_hits += hits as usize;
            run_n += items.len();
            run_tokens += ids.dims()[0] * ids.dims()[1];
            run_ms += ms;
            sentences += items.len();
            history.push(LogRow {
                step,
                epoch,
                lr,
                loss: loss_v,
                accuracy: hits as f64 / items.len() as f64,
            });
            bar.set_position(step as u64);
            bar.set_message(format!(
                "epoch {epoch} loss {:.4} acc {:.3} {:.0} sent/s {:.0} tok/s",
                run_loss / run_n as f64,
                run_hits as f64 / run_n as f64,
                run_n as f64 / (run_ms / 1e3),
                run_tokens as f64 / (run_ms / 1e3)
            ));
            if (bi + 1) % every != 0 && bi + 1 != n_batches {
                continue;
            }
            let dev_acc = evaluate(&model.valid(), &data.dev, cfg.eval_batch_size, device);
            let row = EvalRow {
                epoch,
                step,
                train_loss: run_loss / run_n as f64,
                train_acc: run_hits as f64 / run_n as f64,
                dev_acc,
                train_seconds: step_ms.iter().sum::<f64>() / 1e3,
            };
            bar.println(format!(
                "epoch {epoch} step {step}/{total_steps}: train loss {:.4} acc {:.4}, dev acc {:.4} \
                 ({:.1} sentences/s)",
                row.train_loss,
                row.train_acc,
                dev_acc,
                run_n as f64 / (run_ms / 1e3)
            ));
            evals.push(row);
            (run_loss, run_hits, run_n, run_tokens, run_ms) = (0.0, 0, 0, 0, 0.0);
            if dev_acc > best_acc {
                best_acc = dev_acc;
                best_step = step;
                if let Some(path) = &checkpoint {
                    let mut meta = CheckpointMeta::new(model.adapter_specs());
                    meta.extra = serde_json::to_value(cfg).ok();
                    save_params_matching(&model, path, &trainable_patterns(cfg.peft.train), &meta)?;
                }
                if let Some(path) = &adapter_file {
                    let mut native = NativeAdapters::from_model(&model);
                    native.meta.extra = serde_json::to_value(cfg).ok();
                    native.write(path)?;
                }
                best = Some(model.clone());
            }
        }
    }
    bar.finish_and_clear();
    let best = best.expect("at least one evaluation");
    let train_seconds = step_ms.iter().sum::<f64>() / 1e3;
    let test_acc = evaluate(&best.valid(), &data.test, cfg.eval_batch_size, device);
    let mut sorted = step_ms.clone();
    sorted.sort_by(f64::total_cmp);
    let report = RunReport {
        config: cfg.clone(),
        trainable,
        total,
        best_dev_acc: best_acc,
        best_step,
        test_acc,
        steps: step,
        train_seconds,
        median_step_ms: sorted.get(sorted.len() / 2).copied().unwrap_or(0.0),
        sentences_per_second: sentences as f64 / train_seconds.max(1e-9),
        history,
        evals,
        checkpoint,
        adapter_file,
    };
    if let Some(dir) = out_dir {
        super::report::write_outputs(dir, &report)?;
    }
    Ok(report)
}
