//! Training inside burn-train (`kron_adapters::learner`): the steps give gradients to the
//! trainable parameters only, the optimizer keeps state for them only, and `SupervisedTraining`
//! trains an adapter that learns a task.

use std::collections::BTreeSet;

use burn::data::dataloader::batcher::Batcher;
use burn::data::dataloader::DataLoaderBuilder;
use burn::data::dataset::InMemDataset;
use burn::module::{AutodiffModule, Module, ModuleVisitor, Param, ParamId};
use burn::optim::{AdamWConfig, Optimizer};
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use burn::train::metric::{AccuracyMetric, LossMetric, PerplexityMetric};
use burn::train::{InferenceStep, Learner, SupervisedTraining, TrainStep};
use kron_adapters::finetune::tokenize::Encoded;
use kron_adapters::learner::{ClassifierBatcher, ContinuationBatcher};
use kron_adapters::model::bert::classifier_from_source;
use kron_adapters::model::{BertConfig, LlamaConfig, LlamaForCausalLM, TensorSource};
use kron_adapters::{AdapterConfig, KronAConfig, KronLoraConfig, PlacementConfig};

use crate::common::{assert_close, device, scratch_dir, to_vec, Rng, AB, TB};

/// Ids of the parameters that require a gradient.
struct Trainable(BTreeSet<ParamId>, BTreeSet<ParamId>);

impl<B: Backend> ModuleVisitor<B> for Trainable {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if param.is_require_grad() {
            self.0.insert(param.id);
        } else {
            self.1.insert(param.id);
        }
    }
}

fn trainable<B: Backend, M: Module<B>>(m: &M) -> (BTreeSet<ParamId>, BTreeSet<ParamId>) {
    let mut v = Trainable(BTreeSet::new(), BTreeSet::new());
    m.visit(&mut v);
    (v.0, v.1)
}

/// Two classes of texts over disjoint halves of a 40-token vocabulary.
fn separable(n: usize, seed: u64) -> Vec<Encoded> {
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|i| {
            let label = i % 2;
            let len = 3 + (rng.next_u64() % 6) as usize;
            let mut ids = vec![2u32];
            ids.extend((0..len).map(|_| (4 + label * 18) as u32 + (rng.next_u64() % 18) as u32));
            ids.push(3);
            Encoded { ids, label }
        })
        .collect()
}

fn classifier() -> kron_adapters::model::BertClassifier<AB> {
    let placement = PlacementConfig::linear(AdapterConfig::KronA(KronAConfig::auto()));
    classifier_from_source(
        TensorSource::random(3),
        &BertConfig::tiny(40),
        &placement,
        2,
        &device(),
    )
    .unwrap()
}

#[test]
fn the_frozen_base_gets_no_gradient_and_no_optimizer_state() {
    let dev = device();
    let model = classifier();
    let (train, frozen) = trainable::<AB, _>(&model);
    assert!(!train.is_empty() && frozen.len() > train.len());
    let batch = ClassifierBatcher.batch(separable(8, 1), &dev);
    let out = TrainStep::step(&model, batch);
    assert_eq!(
        out.grads.len(),
        train.len(),
        "a gradient for every trainable parameter, no more"
    );
    let mut optim = AdamWConfig::new().init::<AB, _>();
    let model = optim.step(1e-3, model, out.grads);
    let state: BTreeSet<ParamId> = optim.to_record().keys().copied().collect();
    assert_eq!(
        state, train,
        "AdamW moments for the trainable parameters only"
    );
    assert!(state.is_disjoint(&frozen));
    // The decoder likewise (Kron-LoRA on every projection; the LM head and norms frozen).
    let lm = tiny_lm(2, AdapterConfig::KronLora(KronLoraConfig::auto(2)));
    let (train, frozen) = trainable::<AB, _>(&lm);
    let items = vec![
        kron_adapters::llm::score::Encoded {
            ids: vec![1, 7, 9, 30, 31],
            start: 3,
        },
        kron_adapters::llm::score::Encoded {
            ids: vec![1, 5, 40],
            start: 2,
        },
    ];
    let out = TrainStep::step(&lm, ContinuationBatcher.batch(items, &dev));
    assert_eq!(out.item.targets.dims(), [3], "answer tokens only");
    assert_eq!(out.grads.len(), train.len());
    let mut optim = AdamWConfig::new().init::<AB, _>();
    let _ = optim.step(1e-3, lm, out.grads);
    let state: BTreeSet<ParamId> = optim.to_record().keys().copied().collect();
    assert_eq!(state, train);
    assert!(state.is_disjoint(&frozen));
    drop(model);
}

/// A tiny random Llama (vocabulary 50) with `adapter` on every projection.
fn tiny_lm(seed: u64, adapter: AdapterConfig) -> LlamaForCausalLM<AB> {
    let placement = PlacementConfig::linear(adapter);
    LlamaForCausalLM::<AB>::new(
        &mut TensorSource::random(seed),
        &LlamaConfig::tiny(50),
        &placement,
        &device(),
    )
    .unwrap()
}

/// `lm` with its adapters' random factors replaced by seeded draws from the same distribution
/// (Kaiming-uniform, `U(−1/√fan_in, 1/√fan_in)`; zero factors stay zero). The crate draws them
/// from the backend's generator, which the tests running alongside draw from too, so a training
/// run's result would depend on the tests around it.
fn seeded_adapters(lm: LlamaForCausalLM<AB>, seed: u64) -> LlamaForCausalLM<AB> {
    let mut native = kron_adapters::NativeAdapters::from_model(&lm);
    let mut rng = Rng::new(seed);
    for f in native.factors.values_mut().flatten() {
        if f.data.iter().any(|&v| v != 0.0) {
            let bound = 1.0 / (f.shape[0] as f64).sqrt();
            for v in &mut f.data {
                *v = ((2.0 * rng.uniform() - 1.0) * bound) as f32;
            }
        }
    }
    kron_adapters::store::attach(lm, &native, &kron_adapters::NameMap::new(), &device()).unwrap()
}

/// A step's joined output is the whole batch's: its loss to 1e-5, logits to `tol`, the same
/// targets in the same order.
fn assert_same_output<B: Backend>(
    got: &burn::train::ClassificationOutput<B>,
    whole: &burn::train::ClassificationOutput<B>,
    tol: f64,
) {
    let whole_loss = to_vec(whole.loss.clone())[0];
    let got_loss = to_vec(got.loss.clone())[0];
    assert!(
        (got_loss - whole_loss).abs() <= 1e-5 * whole_loss.abs(),
        "{got_loss} vs {whole_loss}"
    );
    assert_close(
        &to_vec(got.output.clone()),
        &to_vec(whole.output.clone()),
        tol,
        "logits",
    );
    let ints = |t: Tensor<B, 1, burn::tensor::Int>| t.into_data().convert::<i64>().to_vec::<i64>();
    assert_eq!(
        ints(got.targets.clone()).unwrap(),
        ints(whole.targets.clone()).unwrap()
    );
}

/// burn-train's classifier step computes the batch in parts on flex and ndarray
/// (`shards::default_parts`): the same loss, logits and targets as the whole batch, gradients
/// bit for bit those of the same parts one after another, and the whole batch's up to `f32`
/// rounding. Its validation step likewise gives the whole batch's output.
#[test]
fn the_classifier_step_in_parts_is_the_whole_batchs() {
    use burn::optim::GradientsParams;
    let dev = device();
    let bert = BertConfig {
        hidden_dropout_prob: 0.0,
        attention_probs_dropout_prob: 0.0,
        ..BertConfig::tiny(40)
    };
    let placement = PlacementConfig::linear(AdapterConfig::KronA(KronAConfig::auto()));
    let model =
        classifier_from_source::<AB>(TensorSource::random(3), &bert, &placement, 2, &dev).unwrap();
    let model = kron_adapters::training::full_finetune(model);
    let batch: kron_adapters::learner::ClassifierBatch<AB> =
        ClassifierBatcher.batch(separable(7, 5), &dev);
    let out = TrainStep::step(&model, batch.clone());
    let whole = model.forward_classification(batch.clone());
    assert_same_output(&out.item, &whole, 1e-5);
    let inner = model.valid();
    let inner_batch: kron_adapters::learner::ClassifierBatch<TB> =
        ClassifierBatcher.batch(separable(7, 5), &dev);
    assert_same_output(
        &InferenceStep::step(&inner, inner_batch.clone()),
        &inner.forward_classification(inner_batch),
        1e-5,
    );
    // Exactly what the same two parts give one after another on the model itself...
    let ranges = kron_adapters::shards::split(7, 2);
    let mut acc = burn::optim::GradientsAccumulator::new();
    for r in ranges {
        let part = model.forward_classification(kron_adapters::learner::ClassifierBatch {
            ids: batch.ids.clone().slice(r.clone()),
            mask: batch.mask.clone().slice(r.clone()),
            labels: batch.labels.clone().slice(r.clone()),
        });
        let loss = part.loss.mul_scalar(r.len() as f64 / 7.0);
        acc.accumulate(&model, GradientsParams::from_grads(loss.backward(), &model));
    }
    let got = crate::shards::collect(&model, &out.grads);
    if kron_adapters::shards::default_parts::<AB>(&dev) == 2 {
        assert_eq!(
            got,
            crate::shards::collect(&model, &acc.grads()),
            "the step's parts"
        );
    }
    // ...and the whole batch's up to f32 rounding, which the token-type embedding's gradient (a
    // sum over every token) shows most: 2.8e-3 here; a lost or misweighted part is off by 30%+.
    let want = GradientsParams::from_grads(whole.loss.backward(), &model);
    for (i, (g, w)) in got
        .iter()
        .zip(&crate::shards::collect(&model, &want))
        .enumerate()
    {
        if w.iter().any(|&v| v.abs() > 1e-6) {
            assert_close(g, w, 1e-2, &format!("burn-train's step, gradient {i}"));
        }
    }
}

/// burn-train's decoder step computes its batch in parts (sequences) on flex and ndarray, each
/// part's mean loss weighed by its answer tokens: the whole batch's loss, logits and targets,
/// gradients bit for bit those of the same parts batched on their own one after another, and
/// the whole batch's up to `f32` rounding. A batch whose parts cannot each hold an answer token
/// is computed whole. Its validation step likewise gives the whole batch's output, its loss the
/// parts' losses weighed by their answer tokens.
#[test]
fn the_decoder_step_in_parts_is_the_whole_batchs() {
    use burn::optim::GradientsParams;
    use kron_adapters::llm::score::Encoded as Pair;
    let dev = device();
    let lm = tiny_lm(4, AdapterConfig::KronLora(KronLoraConfig::auto(2)));
    let lm = kron_adapters::training::full_finetune(lm);
    let pair = |ids: &[u32], start| Pair {
        ids: ids.to_vec(),
        start,
    };
    // Parts [0, 3) and [3, 5) (`shards::split`); each holds a longest sequence (7 tokens), so
    // each part batched on its own pads to the batch's length; the first sequence has no
    // answer token, the others 2 to 4 (6 and 5 in the parts).
    let items = vec![
        pair(&[1, 7, 9], 3),
        pair(&[1, 5, 40, 41, 42, 43, 44], 3),
        pair(&[1, 11, 12, 13, 14], 3),
        pair(&[1, 20, 21, 22, 23, 24, 25], 5),
        pair(&[1, 30, 31, 32, 33], 2),
    ];
    let batch = ContinuationBatcher.batch(items.clone(), &dev);
    let out = TrainStep::step(&lm, batch.clone());
    let whole = lm.forward_continuation(batch);
    assert_eq!(out.item.output.dims(), [11, 50], "11 answer tokens");
    assert_same_output(&out.item, &whole, 1e-4);
    let inner = lm.valid();
    let inner_batch = |items: Vec<Pair>| -> kron_adapters::llm::score::ContinuationBatch<TB> {
        ContinuationBatcher.batch(items, &dev)
    };
    let valid = InferenceStep::step(&inner, inner_batch(items.clone()));
    assert_eq!(valid.output.dims(), [11, 50]);
    assert_same_output(
        &valid,
        &inner.forward_continuation(inner_batch(items.clone())),
        1e-4,
    );
    if kron_adapters::shards::default_parts::<TB>(&dev) == 2 {
        // The random model's per-token losses are all near ln 50, so the whole batch's loss
        // barely tells weights apart: check the weighing against the parts' own losses.
        let part = |r: std::ops::Range<usize>| {
            f64::from(
                to_vec(
                    inner
                        .forward_continuation(inner_batch(items[r].to_vec()))
                        .loss,
                )[0],
            )
        };
        let want = (6.0 * part(0..3) + 5.0 * part(3..5)) / 11.0;
        let got = f64::from(to_vec(valid.loss.clone())[0]);
        assert!((got - want).abs() <= 3e-7 * want, "{got} against {want}");
    }
    let got = crate::shards::collect(&lm, &out.grads);
    if kron_adapters::shards::default_parts::<AB>(&dev) == 2 {
        let mut acc = burn::optim::GradientsAccumulator::new();
        for (range, tokens) in [(0..3, 6.0), (3..5, 5.0)] {
            let part =
                lm.forward_continuation(ContinuationBatcher.batch(items[range].to_vec(), &dev));
            let loss = part.loss.mul_scalar(tokens / 11.0);
            acc.accumulate(&lm, GradientsParams::from_grads(loss.backward(), &lm));
        }
        assert_eq!(
            got,
            crate::shards::collect(&lm, &acc.grads()),
            "the step's parts"
        );
    }
    let want = GradientsParams::from_grads(whole.loss.backward(), &lm);
    crate::shards::assert_gradients_close(
        &got,
        &crate::shards::collect(&lm, &want),
        "decoder step",
    );
    // The second part has no answer token: the batch is computed whole.
    let items = vec![pair(&[1, 7, 9, 30], 2), pair(&[1, 5, 40], 3)];
    let batch = ContinuationBatcher.batch(items.clone(), &dev);
    let out = TrainStep::step(&lm, batch.clone());
    let whole = lm.forward_continuation(batch);
    assert_eq!(to_vec(out.item.loss), to_vec(whole.loss.clone()));
    assert_eq!(
        to_vec(InferenceStep::step(&inner, inner_batch(items.clone())).loss),
        to_vec(inner.forward_continuation(inner_batch(items)).loss)
    );
    assert_eq!(
        crate::shards::collect(&lm, &out.grads),
        crate::shards::collect(
            &lm,
            &GradientsParams::from_grads(whole.loss.backward(), &lm)
        )
    );
}

#[test]
fn supervised_training_learns_a_task_with_burn_train() {
    let dir = scratch_dir("learner", "classify");
    let batcher = ClassifierBatcher;
    let train = DataLoaderBuilder::new(batcher)
        .batch_size(16)
        .shuffle(7)
        .build(InMemDataset::new(separable(192, 2)));
    let valid = DataLoaderBuilder::new(batcher)
        .batch_size(32)
        .build(InMemDataset::new(separable(64, 3)));
    let model = classifier();
    let before = accuracy(&model.valid(), &separable(64, 3));
    let result = SupervisedTraining::new(&dir, train, valid)
        .metrics((AccuracyMetric::new(), LossMetric::new()))
        .num_epochs(4)
        .renderer(kron_adapters::learner::LineRenderer::new(0, |_| {}))
        .with_application_logger(None)
        .launch(Learner::new(model, AdamWConfig::new().init(), 1e-2));
    let after = accuracy(&result.model, &separable(64, 3));
    assert!(
        after >= 0.9 && after > before,
        "accuracy {before} → {after}"
    );
    // burn-train's file logger wrote the metrics of every epoch.
    assert!(
        dir.join("train/epoch-4/Accuracy.log").exists(),
        "{:?}",
        std::fs::read_dir(&dir).unwrap().collect::<Vec<_>>()
    );
}

/// The decoder trains inside `SupervisedTraining` too (its step in parts on flex and ndarray):
/// Kron-LoRA adapters on a tiny random Llama learn answers that follow from the context, with
/// burn-train's loss and perplexity metrics logged.
#[test]
fn supervised_training_fits_the_decoder_with_burn_train() {
    use kron_adapters::llm::score::{masked_nll, Encoded as Pair};
    let dir = scratch_dir("learner", "decoder");
    let dev = device();
    // The answer is token 44 after a context ending in 4..22, token 45 after one ending in
    // 22..40.
    let pairs = |n: usize, seed: u64| -> Vec<Pair> {
        let mut rng = Rng::new(seed);
        (0..n)
            .map(|_| {
                let x = 4 + (rng.next_u64() % 36) as u32;
                let y = 4 + (rng.next_u64() % 36) as u32;
                Pair {
                    ids: vec![1, x, y, 44 + u32::from(y >= 22)],
                    start: 3,
                }
            })
            .collect()
    };
    let lm = seeded_adapters(tiny_lm(5, AdapterConfig::KronA(KronAConfig::auto())), 5);
    // The adapters and the LM head train (PEFT's `modules_to_save`): the random base's head
    // (N(0, 0.02)) is too small for any hidden state to move its logits by more than ~0.6.
    let lm = kron_adapters::training::set_trainable(lm, |p| {
        kron_adapters::training::is_adapter(p) || p.starts_with("lm_head")
    });
    let valid_pairs = pairs(64, 9);
    let nll = |m: &LlamaForCausalLM<crate::common::TB>| {
        let refs: Vec<&Pair> = valid_pairs.iter().collect();
        to_vec(masked_nll(m, &refs, &dev))[0]
    };
    let before = nll(&lm.valid());
    let train = DataLoaderBuilder::new(ContinuationBatcher)
        .batch_size(16)
        .shuffle(3)
        .build(InMemDataset::new(pairs(256, 8)));
    let valid = DataLoaderBuilder::new(ContinuationBatcher)
        .batch_size(32)
        .build(InMemDataset::new(valid_pairs.clone()));
    let result = SupervisedTraining::new(&dir, train, valid)
        .metrics((LossMetric::new(), PerplexityMetric::new()))
        .num_epochs(4)
        .renderer(kron_adapters::learner::LineRenderer::new(0, |_| {}))
        .with_application_logger(None)
        .launch(Learner::new(lm, AdamWConfig::new().init(), 3e-2));
    let after = nll(&result.model);
    // Chance between the two answers is ln 2 = 0.69; the random model starts near ln 50 = 3.9.
    assert!(
        after < 0.5 && after < before / 5.0,
        "validation NLL {before} → {after}"
    );
    assert!(
        dir.join("valid/epoch-4/Perplexity.log").exists(),
        "{:?}",
        std::fs::read_dir(&dir).unwrap().collect::<Vec<_>>()
    );
}

fn accuracy<B: Backend>(model: &kron_adapters::model::BertClassifier<B>, data: &[Encoded]) -> f64 {
    kron_adapters::finetune::train::evaluate(model, data, 64, &Default::default()).unwrap()
}
