//! Many adapters over one model (`kron_adapters::multi`): a batch mixing adapters (and rows
//! with none) gives every row what its adapter alone gives; the registry refuses what does not
//! fit and leaves batches in flight alone.

use burn::tensor::{Int, Tensor, TensorData};
use kron_adapters::model::{BertConfig, BertEncoder, LlamaConfig, LlamaForCausalLM, TensorSource};
use kron_adapters::multi::{AdapterRegistry, Routing};
use kron_adapters::{
    attach, place, AdapterConfig, ErrorKind, FactorInit, KronAConfig, KronLoraConfig, LoraConfig,
    NameMap, NativeAdapters, PlacementConfig,
};

use crate::common::{assert_close, device, to_vec, Rng, TB};

/// One adapter of every method, with `ΔW ≠ 0`.
pub fn every_method() -> Vec<(&'static str, AdapterConfig)> {
    vec![
        (
            "lora",
            AdapterConfig::Lora(LoraConfig::new(4).with_init(FactorInit::Normal)),
        ),
        (
            "krona",
            AdapterConfig::KronA(KronAConfig::auto().with_init(FactorInit::Normal)),
        ),
        (
            "kronlora",
            AdapterConfig::KronLora(KronLoraConfig::auto(2).with_init(FactorInit::Normal)),
        ),
    ]
}

/// The adapter file `cfg` placed on `base` would give.
pub fn adapters_for<M>(base: &M, cfg: &AdapterConfig) -> NativeAdapters
where
    M: kron_adapters::AdapterLayers<TB> + Clone,
{
    let adapted = place(
        base.clone(),
        &PlacementConfig::linear(cfg.clone()),
        &device(),
    )
    .unwrap();
    NativeAdapters::from_model(&adapted)
}

fn ids(rows: &[Vec<i64>]) -> Tensor<TB, 2, Int> {
    let (b, l) = (rows.len(), rows[0].len());
    Tensor::from_data(TensorData::new(rows.concat(), [b, l]), &device())
}

pub fn tiny_llama() -> LlamaForCausalLM<TB> {
    LlamaForCausalLM::new(
        &mut TensorSource::random(7),
        &LlamaConfig::tiny(50),
        &PlacementConfig::new(),
        &device(),
    )
    .unwrap()
}

#[test]
fn decoder_mixed_batch_rows_equal_each_adapter_alone() {
    let dev = device();
    let base = tiny_llama();
    let registry = AdapterRegistry::new(&base, &dev);
    let methods = every_method();
    let mut files = Vec::new();
    for (name, cfg) in &methods {
        let file = adapters_for(&base, cfg);
        registry.load(name, &file, &NameMap::new()).unwrap();
        files.push(file);
    }
    // Rows: each method, none, and a method twice (rows of one adapter need not be adjacent).
    let plan: Vec<Option<usize>> = vec![Some(0), None, Some(2), Some(1), Some(0), None];
    let mut rng = Rng::new(3);
    let rows: Vec<Vec<i64>> = plan
        .iter()
        .map(|_| (0..7).map(|_| (rng.next_u64() % 50) as i64).collect())
        .collect();
    let names: Vec<Option<&str>> = plan.iter().map(|p| p.map(|i| methods[i].0)).collect();
    let bank = registry.snapshot();
    let routing = Routing::new(&bank, &names, &dev).unwrap();
    let hidden = base
        .model
        .forward_routed(ids(&rows), None, None, Some(&routing), None);
    let got = to_vec(base.logits(hidden));
    let per_row = got.len() / rows.len();
    for (r, p) in plan.iter().enumerate() {
        let alone = match p {
            Some(i) => attach(base.clone(), &files[*i], &NameMap::new(), &dev).unwrap(),
            None => base.clone(),
        };
        let want = to_vec(alone.forward(ids(&rows[r..r + 1]), None));
        assert_close(
            &got[r * per_row..(r + 1) * per_row],
            &want,
            1e-5,
            &format!("row {r} ({p:?})"),
        );
    }
    // A batch all of one adapter (no gather and scatter) equals it alone too.
    let routing = Routing::new(&bank, &vec![Some(methods[2].0); rows.len()], &dev).unwrap();
    let all = to_vec(base.logits(base.model.forward_routed(
        ids(&rows),
        None,
        None,
        Some(&routing),
        None,
    )));
    let alone = attach(base.clone(), &files[2], &NameMap::new(), &dev).unwrap();
    assert_close(
        &all,
        &to_vec(alone.forward(ids(&rows), None)),
        1e-5,
        "all rows one adapter",
    );
    // The adapters change the output (the test would pass trivially otherwise).
    let plain = to_vec(base.forward(ids(&rows[..1]), None));
    assert!(crate::common::max_abs_diff(&got[..per_row], &plain) > 1e-3);
}

#[test]
fn encoder_mixed_batch_with_padding_equals_each_adapter_alone() {
    let dev = device();
    let cfg = BertConfig::tiny(40);
    let base: BertEncoder<TB> = BertEncoder::new(
        &mut TensorSource::random(5),
        &cfg,
        &PlacementConfig::new(),
        &dev,
    )
    .unwrap();
    let registry = AdapterRegistry::new(&base, &dev);
    let methods = every_method();
    let mut files = Vec::new();
    for (name, c) in &methods {
        let file = adapters_for(&base, c);
        registry.load(name, &file, &NameMap::new()).unwrap();
        files.push(file);
    }
    let plan: Vec<Option<usize>> = vec![Some(1), Some(0), None, Some(2), Some(1)];
    let lens = [9usize, 4, 7, 9, 2];
    let mut rng = Rng::new(11);
    let l = 9;
    let mut rows = Vec::new();
    let mut masks = Vec::new();
    for &n in &lens {
        rows.push(
            (0..l)
                .map(|j| {
                    if j < n {
                        1 + (rng.next_u64() % 39) as i64
                    } else {
                        0
                    }
                })
                .collect::<Vec<_>>(),
        );
        masks.push((0..l).map(|j| i64::from(j < n)).collect::<Vec<_>>());
    }
    let names: Vec<Option<&str>> = plan.iter().map(|p| p.map(|i| methods[i].0)).collect();
    let routing = Routing::new(&registry.snapshot(), &names, &dev).unwrap();
    let got = to_vec(base.forward_routed(ids(&rows), ids(&masks), Some(&routing)));
    let d = cfg.hidden_size;
    for (r, p) in plan.iter().enumerate() {
        let alone = match p {
            Some(i) => attach(base.clone(), &files[*i], &NameMap::new(), &dev).unwrap(),
            None => base.clone(),
        };
        let n = lens[r];
        let want = to_vec(alone.forward(
            ids(&[rows[r][..n].to_vec()]),
            ids(&[masks[r][..n].to_vec()]),
        ));
        // Real tokens only: padded positions are not defined to match.
        assert_close(
            &got[r * l * d..r * l * d + n * d],
            &want,
            1e-5,
            &format!("row {r} ({p:?})"),
        );
    }
}

#[test]
fn registry_refuses_misfits_and_keeps_snapshots_in_flight() {
    let dev = device();
    let base = tiny_llama();
    let registry = AdapterRegistry::new(&base, &dev);
    let lora = adapters_for(&base, &every_method()[0].1);
    registry.load("a", &lora, &NameMap::new()).unwrap();
    let held = registry.snapshot();

    // An adapter for a wider model: refused, nothing changes.
    let mut wide_cfg = LlamaConfig::tiny(50);
    wide_cfg.hidden_size *= 2;
    wide_cfg.intermediate_size *= 2;
    let wide = LlamaForCausalLM::<TB>::new(
        &mut TensorSource::random(1),
        &wide_cfg,
        &PlacementConfig::new(),
        &dev,
    )
    .unwrap();
    let err = registry
        .load(
            "b",
            &adapters_for(&wide, &every_method()[0].1),
            &NameMap::new(),
        )
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Incompatible, "{err}");
    assert!(err.to_string().contains("another model"), "{err}");
    // Layer names that are not the model's: refused with the mapped name.
    let err = registry
        .load(
            "c",
            &lora,
            &NameMap::new().with_prefix("model.", "decoder."),
        )
        .unwrap_err();
    assert!(err.to_string().contains("decoder.layers.0"), "{err}");
    // Bad names, unknown adapters.
    for bad in ["", "a b", "../x", &"x".repeat(129)] {
        assert_eq!(
            registry
                .load(bad, &lora, &NameMap::new())
                .unwrap_err()
                .kind(),
            ErrorKind::Usage,
            "{bad:?}"
        );
    }
    assert!(registry.unload("nope").is_err());
    assert!(Routing::new(&registry.snapshot(), &[Some("nope")], &dev).is_err());
    assert_eq!(registry.snapshot().len(), 1);

    // Unloading swaps the set; a snapshot taken before still holds the adapter and still routes.
    registry.unload("a").unwrap();
    assert!(registry.snapshot().is_empty());
    assert!(Routing::new(&held, &[Some("a")], &dev).is_ok());
    // Replacing under the same name swaps in the new one.
    registry.load("a", &lora, &NameMap::new()).unwrap();
    registry
        .load(
            "a",
            &adapters_for(&base, &every_method()[1].1),
            &NameMap::new(),
        )
        .unwrap();
    let list = registry.snapshot().list();
    assert_eq!(list.len(), 1);
    assert_ne!(
        list[0].1,
        held.list()[0].1,
        "the replacement has another size"
    );
}

#[cfg(feature = "finetune")]
#[test]
fn generate_batch_rows_equal_generate_alone() {
    use kron_adapters::llm::generate::{generate, generate_batch};
    use kron_adapters::llm::GenerateConfig;
    let dev = device();
    let base = tiny_llama();
    let registry = AdapterRegistry::new(&base, &dev);
    let methods = every_method();
    let mut files = Vec::new();
    for (name, cfg) in &methods {
        let file = adapters_for(&base, cfg);
        registry.load(name, &file, &NameMap::new()).unwrap();
        files.push(file);
    }
    // Prompts of different lengths (left padding), greedy and sampled rows, different lengths
    // to generate, an end-of-sequence token that stops some rows early.
    let prompts: Vec<Vec<u32>> = vec![
        vec![3, 9, 27, 4, 4],
        vec![11],
        vec![7, 1, 40],
        vec![5, 6, 7, 8, 9, 10, 11],
        vec![2, 3],
    ];
    let plan: Vec<Option<usize>> = vec![Some(0), None, Some(1), Some(2), Some(0)];
    let configs: Vec<GenerateConfig> = vec![
        GenerateConfig::new().with_max_new_tokens(6),
        GenerateConfig::new().with_max_new_tokens(4),
        GenerateConfig::new()
            .with_max_new_tokens(8)
            .with_temperature(0.9)
            .with_seed(5),
        GenerateConfig::new()
            .with_max_new_tokens(3)
            .with_temperature(1.3)
            .with_top_p(0.8)
            .with_seed(1),
        GenerateConfig::new().with_max_new_tokens(7),
    ];
    let eos = [17u32];
    let names: Vec<Option<&str>> = plan.iter().map(|p| p.map(|i| methods[i].0)).collect();
    let routing = Routing::new(&registry.snapshot(), &names, &dev).unwrap();
    let got = generate_batch(&base, &prompts, &configs, &eos, Some(&routing), &dev).unwrap();
    for r in 0..prompts.len() {
        let alone = match plan[r] {
            Some(i) => attach(base.clone(), &files[i], &NameMap::new(), &dev).unwrap(),
            None => base.clone(),
        };
        let want = generate(&alone, &prompts[r], &configs[r], &eos, &dev, |_| {}).unwrap();
        assert_eq!(got[r], want, "row {r}");
        assert!(!want.is_empty());
    }
    // Bad input: a token outside the vocabulary, a prompt longer than the context, mismatched
    // counts — typed errors, not panics.
    assert!(generate_batch(&base, &[vec![99]], &configs[..1], &eos, None, &dev).is_err());
    assert!(generate_batch(&base, &[vec![1; 200]], &configs[..1], &eos, None, &dev).is_err());
    assert!(generate_batch(&base, &prompts, &configs[..1], &eos, None, &dev).is_err());
    assert!(generate_batch(&base, &[vec![]], &configs[..1], &eos, None, &dev).is_err());
}
