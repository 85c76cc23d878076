//! Data-parallel training through burn-collective's all-reduce, on CPU threads: with the same
//! global batch, N ranks give the gradient and the trained adapters one device gives.

use burn::collective::CollectiveConfig;
use burn::data::dataloader::batcher::Batcher;
use burn::module::Module;
use burn::optim::{AdamWConfig, Optimizer, SgdConfig};
use burn::train::TrainStep;
use kron_adapters::finetune::tokenize::Encoded;
use kron_adapters::learner::{ClassifierBatch, ClassifierBatcher};
use kron_adapters::model::bert::{classifier_from_source, BertClassifier};
use kron_adapters::model::{BertConfig, TensorSource};
use kron_adapters::parallel::train_data_parallel;
use kron_adapters::{save_adapters, AdapterConfig, KronAConfig, PlacementConfig};

use crate::common::{assert_close, device, scratch_dir, Rng, AB};

fn model() -> BertClassifier<AB> {
    let mut cfg = BertConfig::tiny(40);
    // No dropout: ranks and the single device must see the same function.
    cfg.hidden_dropout_prob = 0.0;
    cfg.attention_probs_dropout_prob = 0.0;
    let placement = PlacementConfig::linear(AdapterConfig::KronA(
        KronAConfig::auto().with_init(kron_adapters::FactorInit::Normal),
    ));
    classifier_from_source(TensorSource::random(4), &cfg, &placement, 2, &device()).unwrap()
}

/// Global batch `step`: 8 texts of random lengths.
fn global(step: usize) -> Vec<Encoded> {
    let mut rng = Rng::new(100 + step as u64);
    (0..8)
        .map(|i| {
            let len = 2 + (rng.next_u64() % 7) as usize;
            let mut ids = vec![2u32];
            ids.extend((0..len).map(|_| 4 + (rng.next_u64() % 36) as u32));
            ids.push(3);
            Encoded { ids, label: i % 2 }
        })
        .collect()
}

/// The adapters (and head) of a model, as one flat vector, through the adapter-file writer.
fn trained(m: &BertClassifier<AB>, name: &str) -> Vec<f32> {
    let path = scratch_dir("parallel", name).join("a.safetensors");
    save_adapters(m, &path).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
    names.sort();
    let mut out = Vec::new();
    for n in names {
        let v = st.tensor(&n).unwrap();
        out.extend(
            v.data()
                .chunks(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        );
    }
    let head = m
        .head
        .weight
        .val()
        .into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .unwrap();
    out.extend(head);
    out
}

fn batch(items: Vec<Encoded>) -> ClassifierBatch<AB> {
    ClassifierBatcher.batch(items, &device())
}

#[test]
fn n_ranks_train_what_one_device_trains_on_the_global_batch() {
    let base = model();
    let lr = |_: usize| 0.05;
    // One SGD step: the update is −lr·gradient, so equal models mean equal gradients.
    let mut sgd = SgdConfig::new().init::<AB, BertClassifier<AB>>();
    let out = TrainStep::step(&base, batch(global(0)));
    let one = sgd.step(lr(0), base.clone(), out.grads);
    for ranks in [2usize, 4] {
        let devices = vec![device(); ranks];
        let shard = |step: usize, rank: usize, _: &_| {
            let g = global(step);
            let per = g.len() / ranks;
            batch(g[rank * per..(rank + 1) * per].to_vec())
        };
        let par = train_data_parallel(
            base.clone(),
            SgdConfig::new().init::<AB, BertClassifier<AB>>(),
            &devices,
            CollectiveConfig::default(),
            1,
            &lr,
            &shard,
        )
        .unwrap();
        assert_close(
            &trained(&par, &format!("sgd{ranks}")),
            &trained(&one, "sgd1"),
            1e-5,
            &format!("{ranks} ranks, one SGD step"),
        );
    }
    // Several AdamW steps: the trained adapters agree.
    let steps = 4;
    let mut adam = AdamWConfig::new().init::<AB, BertClassifier<AB>>();
    let mut single = base.clone();
    for step in 0..steps {
        let out = TrainStep::step(&single, batch(global(step)));
        single = adam.step(1e-2, single, out.grads);
    }
    let shard =
        |step: usize, rank: usize, _: &_| batch(global(step)[rank * 4..(rank + 1) * 4].to_vec());
    let par = train_data_parallel(
        base.clone(),
        AdamWConfig::new().init::<AB, BertClassifier<AB>>(),
        &[device(), device()],
        CollectiveConfig::default(),
        steps,
        &|_| 1e-2,
        &shard,
    )
    .unwrap();
    let (a, b) = (trained(&par, "adam2"), trained(&single, "adam1"));
    assert_close(&a, &b, 1e-4, "2 ranks, 4 AdamW steps");
    // The training moved the adapters (else agreement proves little).
    assert!(crate::common::max_abs_diff(&b, &trained(&base, "base")) > 1e-3);
    assert_eq!(par.num_params(), single.num_params());
}
