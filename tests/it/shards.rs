//! Parts of a batch computed at once (`kron_adapters::shards`): the summed gradients are the
//! whole batch's, on the suite's backend and on flex (whose default is 2 parts); dropout inside
//! the parts is reproducible and is dropout; a forward pass in parts is the whole batch's; bad
//! part counts are typed errors.

use burn::module::{AutodiffModule, Module, ModuleVisitor, Param};
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::DropoutConfig;
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor, TensorData};
use kron_adapters::model::{BertClassifier, BertConfig, TensorSource};
use kron_adapters::shards::{self, split};
use kron_adapters::{
    AdapterConfig, AdapterError, ErrorKind, LoraConfig, PlacementConfig, TrainMode,
};

use crate::common::*;

/// Every gradient in `grads` of `model`'s parameters, in the module's order.
pub fn collect<A: AutodiffBackend, M: Module<A>>(
    model: &M,
    grads: &GradientsParams,
) -> Vec<Vec<f32>> {
    struct Collect<'a>(&'a GradientsParams, Vec<Vec<f32>>);
    impl<A: AutodiffBackend> ModuleVisitor<A> for Collect<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<A, D>>) {
            if let Some(g) = self.0.get::<A::InnerBackend, D>(param.id) {
                self.1.push(to_vec(g));
            }
        }
    }
    let mut c = Collect(grads, Vec::new());
    model.visit(&mut c);
    c.1
}

/// `got` against `want`, gradient by gradient, to 1e-3 relative: `f32` rounding through a tiny
/// random model differs between batch sizes by ~2e-4, a wrong share or a lost part by 20% or
/// more. Gradients that are zero up to rounding in `want` (LoRA's `a` while `b` is zero, the
/// key bias, to which the softmax is invariant) must be as small in `got`.
pub fn assert_gradients_close(got: &[Vec<f32>], want: &[Vec<f32>], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: gradient count");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let largest = |v: &[f32]| v.iter().fold(0f32, |m, x| m.max(x.abs()));
        if largest(w) < 1e-6 {
            assert!(
                largest(g) < 1e-6,
                "{what}, gradient {i}: {} should be ~0",
                largest(g)
            );
        } else {
            assert_close(g, w, 1e-3, &format!("{what}, gradient {i}"));
        }
    }
}

/// A tiny classifier (LoRA on every linear, then every weight trainable), dropout `p`.
fn classifier<A: AutodiffBackend>(p: f64, dev: &A::Device) -> BertClassifier<A> {
    let bert = BertConfig {
        hidden_dropout_prob: p,
        attention_probs_dropout_prob: p,
        ..BertConfig::tiny(60)
    };
    let placement = PlacementConfig::linear(AdapterConfig::Lora(LoraConfig::new(2)));
    let model =
        BertClassifier::<A>::new(&mut TensorSource::random(4), &bert, &placement, 3, dev).unwrap();
    TrainMode::Full.apply(model)
}

/// A batch of 5 padded sentences and their labels.
fn batch<A: Backend>(dev: &A::Device) -> (Tensor<A, 2, Int>, Tensor<A, 2, Int>, Tensor<A, 1, Int>) {
    let mut rng = Rng::new(8);
    let ids: Vec<i64> = (0..5 * 9)
        .map(|_| 1 + (rng.next_u64() % 58) as i64)
        .collect();
    let lens = [9, 4, 7, 9, 2];
    let mask: Vec<i64> = lens
        .iter()
        .flat_map(|&l| (0..9).map(move |j| i64::from(j < l)))
        .collect();
    (
        Tensor::from_data(TensorData::new(ids, [5, 9]), dev),
        Tensor::from_data(TensorData::new(mask, [5, 9]), dev),
        Tensor::from_data(TensorData::new(vec![0i64, 2, 1, 1, 0], [5]), dev),
    )
}

/// The gradients of the batch's mean cross-entropy in `parts` parts (each part's mean weighted
/// by its share), and the parts' weighted losses.
fn part_gradients<A: AutodiffBackend>(
    model: &BertClassifier<A>,
    parts: usize,
    seed: u64,
    dev: &A::Device,
) -> (Vec<Vec<f32>>, Vec<f64>) {
    let (ids, mask, labels) = batch::<A>(dev);
    let loss_fn = CrossEntropyLossConfig::new().init(dev);
    let (grads, losses) = shards::gradients(model, 5, parts, seed, |m, p| {
        assert_eq!(p.share, p.range.len() as f64 / 5.0);
        let (r, share) = (p.range.clone(), p.share);
        let logits = m.forward(ids.clone().slice(r.clone()), mask.clone().slice(r.clone()));
        let loss = loss_fn
            .forward(logits, labels.clone().slice(r))
            .mul_scalar(share);
        let value = to_vec(loss.clone())[0] as f64;
        (loss, value)
    })
    .unwrap();
    (collect(model, &grads), losses)
}

#[test]
fn split_covers_the_batch_in_near_equal_ranges() {
    assert_eq!(split(5, 2), vec![0..3, 3..5]);
    assert_eq!(split(7, 3), vec![0..3, 3..5, 5..7]);
    assert_eq!(split(2, 4), vec![0..1, 1..2]);
    assert_eq!(split(4, 1), vec![0..4]);
    assert!(split(0, 3).is_empty());
    for n in 1..40 {
        for parts in 1..9 {
            let r = split(n, parts);
            assert_eq!(r.len(), parts.min(n));
            assert_eq!(r[0].start, 0);
            assert_eq!(r.last().unwrap().end, n);
            assert!(r.windows(2).all(|w| w[0].end == w[1].start));
            let (min, max) = (
                r.iter().map(|x| x.len()).min().unwrap(),
                r.iter().map(|x| x.len()).max().unwrap(),
            );
            assert!(min >= 1 && max - min <= 1, "{n} in {parts}: {r:?}");
        }
    }
}

/// The same parts computed one after another on `model` itself (no fork, no thread), their
/// gradients summed in order: the reference for the concurrent parts.
fn sequential_gradients<A: AutodiffBackend>(
    model: &BertClassifier<A>,
    parts: usize,
    dev: &A::Device,
) -> Vec<Vec<f32>> {
    let (ids, mask, labels) = batch::<A>(dev);
    let loss_fn = CrossEntropyLossConfig::new().init(dev);
    let mut acc = burn::optim::GradientsAccumulator::<BertClassifier<A>>::new();
    for r in split(5, parts) {
        let share = r.len() as f64 / 5.0;
        let logits = model.forward(ids.clone().slice(r.clone()), mask.clone().slice(r.clone()));
        let loss = loss_fn
            .forward(logits, labels.clone().slice(r))
            .mul_scalar(share);
        acc.accumulate(model, GradientsParams::from_grads(loss.backward(), model));
    }
    collect(model, &acc.grads())
}

/// Concurrent parts give exactly what the same parts give one after another, and the whole
/// batch's gradients up to `f32` rounding, which this random tiny model amplifies to ~2e-4
/// (measured: with `NdArray<f64>`, in a process of its own, every gradient agrees to the last
/// `f32` digit; not a test here, because burn-ndarray's default float type is process-wide
/// state that the suite's `f32` tests running alongside change).
fn parts_sum_to_the_whole<I: Backend, A: AutodiffBackend>(_: &I::Device, dev: &A::Device) {
    let model = classifier::<A>(0.0, dev);
    let (whole, whole_loss) = part_gradients(&model, 1, 0, dev);
    assert!(
        whole.len() > 20,
        "every weight trains: {} gradients",
        whole.len()
    );
    for parts in [2, 3, 5] {
        let (got, losses) = part_gradients(&model, parts, 0, dev);
        assert_eq!(losses.len(), parts);
        let total: f64 = losses.iter().sum();
        assert!(
            (total - whole_loss[0]).abs() < 1e-5 * whole_loss[0].abs().max(1.0),
            "{parts} parts: losses add to {total}, the batch's is {}",
            whole_loss[0]
        );
        let sequential = sequential_gradients(&model, parts, dev);
        assert_eq!(got.len(), whole.len());
        assert_eq!(
            got, sequential,
            "{parts} concurrent parts = one after another"
        );
        assert_gradients_close(&got, &whole, &format!("{parts} parts"));
    }
}

#[test]
fn parts_give_the_whole_batchs_gradients() {
    on_suite_and_flex!(parts_sum_to_the_whole);
}

#[test]
fn dropout_in_parts_is_reproducible_and_seeded() {
    let dev = device();
    let model = classifier::<AB>(0.3, &dev);
    let (first, _) = part_gradients(&model, 2, 7, &dev);
    let (again, _) = part_gradients(&model, 2, 7, &dev);
    assert_eq!(
        first, again,
        "the same seed gives the same masks and gradients"
    );
    let (other, _) = part_gradients(&model, 2, 8, &dev);
    assert!(
        rel_err(&other[0], &first[0]) > 1e-3,
        "another seed draws other masks"
    );
    // Without dropout the seed does not matter.
    let plain = classifier::<AB>(0.0, &dev);
    assert_eq!(
        part_gradients(&plain, 2, 7, &dev).0,
        part_gradients(&plain, 2, 8, &dev).0
    );
}

#[test]
fn dropout_in_a_part_keeps_and_scales_like_dropout() {
    let dev = device();
    let p = 0.25;
    let layer = DropoutConfig::new(p).init();
    let n = 200_000;
    let x = Tensor::<AB, 1>::from_data(TensorData::new(vec![3.0f32; n], [n]), &dev);
    let model = classifier::<AB>(0.0, &dev);
    let (_, outs) = shards::gradients(&model, 2, 2, 11, |m, p| {
        let y = to_vec(shards::dropout(&layer, x.clone()));
        let zero = (m.head.weight.val().sum() * 0.0).reshape([1]);
        (zero, (p.range.start, y))
    })
    .unwrap();
    let scaled = 3.0 / (1.0 - p as f32);
    for (i, y) in &outs {
        assert!(
            y.iter().all(|&v| v == 0.0 || v == scaled),
            "part {i}: 0 or x/(1-p)"
        );
        let dropped = y.iter().filter(|&&v| v == 0.0).count() as f64 / n as f64;
        // Binomial: the standard deviation of the fraction is ~0.001 here.
        assert!((dropped - p).abs() < 0.006, "part {i}: dropped {dropped}");
    }
    assert_ne!(outs[0].1, outs[1].1, "the parts draw different masks");
    // Outside the parts: Burn's own dropout; without autodiff: nothing dropped.
    let inner = Tensor::<TB, 1>::from_data(TensorData::new(vec![3.0f32; 64], [64]), &dev);
    assert_eq!(to_vec(shards::dropout(&layer, inner)), vec![3.0f32; 64]);
}

#[test]
fn bad_part_counts_are_typed_errors() {
    let dev = device();
    let model = classifier::<AB>(0.0, &dev);
    for (len, parts) in [(4, 0), (0, 2)] {
        let err = shards::gradients(&model, len, parts, 0, |m, _| {
            (m.head.weight.val().sum().reshape([1]), ())
        })
        .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Usage, "{err}");
        assert!(err.to_string().contains("parts"), "{err}");
    }
    assert!(shards::default_parts::<AB>(&dev) >= 1);
    for (len, parts) in [(4, 0), (0, 2)] {
        let err =
            AdapterError::from(shards::forward::<TB, _, _>(&dev, len, parts, |_| ()).unwrap_err());
        assert_eq!(err.kind(), ErrorKind::Usage, "{err}");
        assert!(err.to_string().contains("parts"), "{err}");
    }
}

/// The classifier's logits for the batch in `parts` parts at once ([`shards::forward`]), joined
/// in order, against the same parts one after another and the whole batch at once.
fn forward_parts_are_the_whole<I: Backend, A: AutodiffBackend>(_: &I::Device, dev: &A::Device) {
    let model = classifier::<A>(0.0, dev).valid();
    let (ids, mask, _) = batch::<A::InnerBackend>(dev);
    let logits = |r: std::ops::Range<usize>| {
        model.forward(ids.clone().slice(r.clone()), mask.clone().slice(r))
    };
    let whole = to_vec(logits(0..5));
    assert_eq!(whole.len(), 5 * 3);
    for parts in [1, 2, 3, 5] {
        let outs = shards::forward::<A::InnerBackend, _, _>(dev, 5, parts, |p| {
            (p.range.clone(), to_vec(logits(p.range.clone())))
        })
        .unwrap();
        let ranges: Vec<_> = outs.iter().map(|(r, _)| r.clone()).collect();
        assert_eq!(ranges, split(5, parts), "{parts} parts, in order");
        let got: Vec<f32> = outs.iter().flat_map(|(_, v)| v.clone()).collect();
        let sequential: Vec<f32> = split(5, parts)
            .into_iter()
            .flat_map(|r| to_vec(logits(r)))
            .collect();
        assert_eq!(
            got, sequential,
            "{parts} concurrent parts = one after another"
        );
        assert_close(
            &got,
            &whole,
            1e-5,
            &format!("{parts} parts against the whole batch"),
        );
    }
}

#[test]
fn a_forward_in_parts_is_the_whole_batchs() {
    on_suite_and_flex!(forward_parts_are_the_whole);
}
