//! The Llama-family decoder against `transformers` (tiny random models written by
//! scripts/make_llama_fixtures.py): Llama with grouped-query attention and an untied head, a
//! tied head, Qwen2's q/k/v biases, the same weights from a GGUF file (llama.cpp's Q/K row
//! permutation undone), PEFT LoRA and LoKr adapters on all seven projections; the KV cache; the
//! masked loss; GGUF dequantization per type against the `gguf` package; and typed errors.

use crate::common::*;

use std::collections::HashMap;
use std::path::Path;

use burn::tensor::{Int, Tensor, TensorData};
use kron_adapters::model::llama::{self, LlamaConfig, LlamaForCausalLM};
use kron_adapters::model::TensorSource;
use kron_adapters::store::gguf::GgufFile;
use kron_adapters::store::{attach, read_any};
use kron_adapters::{
    AdapterConfig, AdapterError, AdapterLayers, KronAConfig, KronLoraConfig, LoraConfig, NameMap,
    PlacementConfig,
};

/// A safetensors file as name → (shape, values as f64: floats and ints alike).
/// A reference file's tensors: name → (shape, values).
type Reference = HashMap<String, (Vec<usize>, Vec<f64>)>;

/// A reference batch: ids, attention mask, each row's length.
type Inputs = (Tensor<TB, 2, Int>, Tensor<TB, 2, Int>, Vec<usize>);

fn read_st(path: &Path) -> Reference {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, v)| {
            let vals: Vec<f64> = match v.dtype() {
                safetensors::Dtype::F32 => v
                    .data()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
                    .collect(),
                safetensors::Dtype::I64 => v
                    .data()
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64)
                    .collect(),
                d => panic!("{name}: {d:?}"),
            };
            (name, (v.shape().to_vec(), vals))
        })
        .collect()
}

fn fx(path: &str) -> std::path::PathBuf {
    fixture("llama").join(path)
}

/// The fixture's inputs: ids `[2, 7]`, padding mask, and each row's length.
fn inputs(reference: &Reference) -> Inputs {
    let dev = device();
    let ids = &reference["input_ids"];
    let mask = &reference["attention_mask"];
    let [b, s] = [ids.0[0], ids.0[1]];
    let lengths = (0..b)
        .map(|r| {
            mask.1[r * s..(r + 1) * s]
                .iter()
                .filter(|v| **v == 1.0)
                .count()
        })
        .collect();
    let t = |v: &[f64]| {
        Tensor::<TB, 2, Int>::from_data(
            TensorData::new(v.iter().map(|x| *x as i64).collect::<Vec<_>>(), [b, s]),
            &dev,
        )
    };
    (t(&ids.1), t(&mask.1), lengths)
}

/// Max abs difference between our logits and the reference's over the real (unpadded)
/// positions.
fn logits_error(got: Tensor<TB, 3>, want: &(Vec<usize>, Vec<f64>), lengths: &[usize]) -> f64 {
    let [_, s, v] = got.dims();
    let got = to_vec(got);
    let mut err = 0f64;
    for (r, &len) in lengths.iter().enumerate() {
        for p in 0..len {
            for k in 0..v {
                let i = (r * s + p) * v + k;
                err = err.max((got[i] as f64 - want.1[i]).abs());
            }
        }
    }
    assert!(want.1.iter().any(|x| *x != 0.0));
    err
}

/// The largest difference between `model`'s logits and `transformers`' for the fixture `dir`.
fn reference_error(model: &LlamaForCausalLM<TB>, dir: &str) -> f64 {
    let reference = read_st(&fx(&format!("{dir}/reference.safetensors")));
    let (ids, mask, lengths) = inputs(&reference);
    logits_error(
        model.forward(ids, Some(mask)),
        &reference["logits"],
        &lengths,
    )
}

/// The tiny Llama's PEFT LoRA case: the reference inputs (ids, mask, lengths),
/// `transformers` + PEFT's outputs with the adapter, and the adapter.
fn tiny_llama_lora() -> (Inputs, Reference, kron_adapters::NativeAdapters) {
    let reference = read_st(&fx("tiny_llama/reference.safetensors"));
    let (ids, mask, lengths) = inputs(&reference);
    let want = read_st(&fx("tiny_llama/reference_lora.safetensors"));
    let lora = read_any(fx("tiny_llama/peft_lora"))
        .unwrap()
        .into_adapters();
    ((ids, mask, lengths), want, lora)
}

fn load_dir(dir: &str) -> LlamaForCausalLM<TB> {
    llama::load::<TB>(fx(dir), &PlacementConfig::new(), &device()).unwrap()
}

#[test]
fn hugging_face_llama_qwen2_and_tied_heads_match_transformers() {
    for (dir, tied, bias) in [
        ("tiny_llama", false, false),
        ("tiny_llama_tied", true, false),
        ("tiny_qwen2", false, true),
    ] {
        let model = load_dir(dir);
        let c = model.config();
        assert_eq!((c.tie_word_embeddings, c.qkv_bias), (tied, bias), "{dir}");
        assert_eq!(model.lm_head.is_none(), tied, "{dir}");
        assert_eq!(
            (c.num_attention_heads, c.num_key_value_heads),
            (4, 2),
            "{dir}: GQA"
        );
        let err = reference_error(&model, dir);
        assert!(err <= 1e-4, "{dir}: logits max abs error {err}");
    }
}

#[test]
fn gguf_weights_with_llamacpp_row_permutation_give_the_same_logits() {
    let dev = device();
    let model = llama::load::<TB>(
        fx("tiny_llama/tiny_llama.gguf"),
        &PlacementConfig::new(),
        &dev,
    )
    .unwrap();
    let hf = load_dir("tiny_llama");
    assert_eq!(model.config().num_key_value_heads, 2);
    // The Q/K weights come back in the Hugging Face row order (bit for bit: GGUF F32).
    let q = |m: &LlamaForCausalLM<TB>| to_vec(m.model.layers[1].self_attn.q_proj.base.weight.val());
    let k = |m: &LlamaForCausalLM<TB>| to_vec(m.model.layers[0].self_attn.k_proj.base.weight.val());
    assert_eq!(q(&model), q(&hf));
    assert_eq!(k(&model), k(&hf));
    let reference = read_st(&fx("tiny_llama/reference.safetensors"));
    let (ids, mask, lengths) = inputs(&reference);
    let err = logits_error(
        model.forward(ids, Some(mask)),
        &reference["logits"],
        &lengths,
    );
    assert!(err <= 1e-4, "GGUF logits max abs error {err}");
}

#[test]
fn peft_lora_and_lokr_on_all_seven_projections_give_pefts_logits_on_hf_and_gguf_bases() {
    let dev = device();
    for (adapter, reference) in [
        (
            "tiny_llama/peft_lora",
            "tiny_llama/reference_lora.safetensors",
        ),
        (
            "tiny_llama/peft_lokr",
            "tiny_llama/reference_lokr.safetensors",
        ),
    ] {
        let file = read_any(fx(adapter)).unwrap().into_adapters();
        assert_eq!(
            file.meta.layers.len(),
            2 * 7,
            "{adapter}: seven projections × 2 layers"
        );
        assert!(file
            .meta
            .layers
            .contains_key("model.layers.1.self_attn.q_proj"));
        let want = read_st(&fx(reference));
        let (ids, mask, lengths) = inputs(&read_st(&fx("tiny_llama/reference.safetensors")));
        // The RoPE row layout matters: q_proj/k_proj adapters from PEFT land on the rows of the
        // Hugging Face layout, also when the base came from llama.cpp's permuted GGUF.
        for base in ["tiny_llama", "tiny_llama/tiny_llama.gguf"] {
            let model = llama::load::<TB>(fx(base), &PlacementConfig::new(), &dev).unwrap();
            let model = attach(model, &file, &NameMap::new(), &dev).unwrap();
            assert_eq!(model.adapter_specs().len(), 14);
            let logits = model.forward(ids.clone(), Some(mask.clone()));
            let err = logits_error(logits.clone(), &want["logits"], &lengths);
            assert!(
                err <= 1e-4,
                "{adapter} on {base}: logits max abs error {err}"
            );
            // Merged: the base model's cost, the same logits.
            let merged = model.merge_adapters().unwrap();
            assert!(merged.adapter_specs().is_empty());
            let err = logits_error(
                merged.forward(ids.clone(), Some(mask.clone())),
                &want["logits"],
                &lengths,
            );
            assert!(err <= 1e-4, "{adapter} on {base} merged: {err}");
        }
    }
}

/// A tiny random decoder with adapters.
fn random_model<B: burn::tensor::backend::Backend>(
    cfg: &LlamaConfig,
    placement: &PlacementConfig,
    dev: &B::Device,
) -> LlamaForCausalLM<B> {
    LlamaForCausalLM::new(&mut TensorSource::random(7), cfg, placement, dev).unwrap()
}

/// Where the attention's scores (`[b·kv_heads, g·s, s]`: two sequences of 45 tokens on the tiny
/// model, two key/value heads of two query heads each) exceed `attention_scores_at_once`, the
/// decoder goes a block of query rows at a time — with the crate's backward registered, as one
/// node that keeps no probabilities (`model::attention`) — on the suite's backend and flex;
/// against the same model computing them whole (the default), its logits and every adapter
/// gradient of a loss on them are equal — blocks of 1, 7 and 40 rows, which split a query
/// head's rows and leave a short last block, and a setting of 0 refused.
#[test]
fn long_sequences_attend_a_block_of_queries_at_a_time_as_when_whole() {
    use burn::module::{Module, ModuleVisitor, Param};
    use burn::tensor::backend::AutodiffBackend;
    struct Grads<'a, B: AutodiffBackend>(&'a B::Gradients, Vec<Vec<f32>>);
    impl<B: AutodiffBackend> ModuleVisitor<B> for Grads<'_, B> {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
            if p.is_require_grad() {
                self.1
                    .push(to_vec(p.grad(self.0).expect("a trainable grad")));
            }
        }
    }
    fn check<B: burn::tensor::backend::Backend, A: AutodiffBackend>(
        _: &B::Device,
        dev: &A::Device,
    ) {
        let dev = dev.clone();
        assert!(kron_adapters::kron::autodiff::register_backward::<A>());
        let s_len = 45;
        let cfg = LlamaConfig::tiny(50);
        let mut model: LlamaForCausalLM<A> = random_model(
            &cfg,
            &PlacementConfig::linear(AdapterConfig::KronLora(
                KronLoraConfig::auto(2).with_init(kron_adapters::FactorInit::Normal),
            )),
            &dev,
        );
        let mut rng = Rng::new(77);
        let seq: Vec<i64> = (0..2 * s_len)
            .map(|_| (rng.next_u64() % 50) as i64)
            .collect();
        let weights = rng.vec(2 * s_len * cfg.vocab_size);
        // Two sequences: the scores are [2·2, 2·45, 45].
        let run = |model: &LlamaForCausalLM<A>| {
            let ids =
                Tensor::<A, 2, Int>::from_data(TensorData::new(seq.clone(), [2, s_len]), &dev);
            let logits = model.forward(ids, None);
            let w = Tensor::<A, 3>::from_data(
                TensorData::new(weights.clone(), [2, s_len, cfg.vocab_size]),
                &dev,
            );
            let grads = (logits.clone() * w).sum().backward();
            let mut visitor = Grads::<A>(&grads, Vec::new());
            model.visit(&mut visitor);
            (to_vec(logits), visitor.1)
        };
        let (whole, whole_grads) = run(&model);
        assert!(!whole_grads.is_empty());
        let per_row = 2 * 2 * s_len;
        for rows in [1, 7, 40] {
            model.model.config.attention_scores_at_once = rows * per_row;
            let (blocks, blocks_grads) = run(&model);
            assert_close(
                &blocks,
                &whole,
                1e-5,
                &format!("logits, blocks of {rows} rows"),
            );
            assert_eq!(blocks_grads.len(), whole_grads.len());
            for (i, (g, w)) in blocks_grads.iter().zip(&whole_grads).enumerate() {
                assert!(w.iter().any(|v| *v != 0.0), "gradient {i} is zero");
                assert_close(g, w, 1e-4, &format!("gradient {i}, blocks of {rows} rows"));
            }
        }
        let bad = LlamaConfig {
            attention_scores_at_once: 0,
            ..cfg
        };
        assert!(bad
            .validate()
            .is_err_and(|e| e.to_string().contains("attention_scores_at_once")));
    }
    on_suite_and_flex!(check);
}

/// Burn 0.21's autodiff frees, at the end of every `backward()`, steps of graphs other threads
/// are still building when it judges them unreferenced (tracel-ai/burn#5573): an operation
/// that lets go of its inputs before registering its own step (Burn's `cat`, this crate's
/// nodes) can lose a parameter's gradient while another thread finishes a backward pass — as
/// `shards` and `parallel` do. With a backward pass hammered on another thread, every adapter
/// of the decoder (Kronecker adapters through this crate's nodes, LoRA, the attention in query
/// blocks through `cat`) gets its gradient, step after step, equal to the first step's.
#[test]
fn a_backward_pass_on_another_thread_loses_no_gradient() {
    use burn::module::{Module, ModuleVisitor, Param};
    use burn::tensor::backend::AutodiffBackend;
    use std::sync::atomic::{AtomicBool, Ordering};
    struct Grads<'a, B: AutodiffBackend>(&'a B::Gradients, Vec<Option<Vec<f32>>>);
    impl<B: AutodiffBackend> ModuleVisitor<B> for Grads<'_, B> {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
            if p.is_require_grad() {
                self.1.push(p.grad(self.0).map(to_vec));
            }
        }
    }
    fn check<B: burn::tensor::backend::Backend, A: AutodiffBackend>(
        _: &B::Device,
        dev: &A::Device,
    ) {
        kron_adapters::kron::autodiff::register_backward::<A>();
        let dev = dev.clone();
        let s_len = 12;
        let mut cfg = LlamaConfig::tiny(50);
        // Blocks of 5 query rows: the attention joins its blocks with `cat`.
        cfg.attention_scores_at_once = 5 * 2 * 2 * s_len;
        let mut rng = Rng::new(78);
        let seq: Vec<i64> = (0..2 * s_len)
            .map(|_| (rng.next_u64() % 50) as i64)
            .collect();
        let weights = rng.vec(2 * s_len * cfg.vocab_size);
        for adapter in [
            AdapterConfig::KronLora(
                KronLoraConfig::auto(2).with_init(kron_adapters::FactorInit::Normal),
            ),
            AdapterConfig::Lora(
                kron_adapters::LoraConfig::new(2).with_init(kron_adapters::FactorInit::Normal),
            ),
        ] {
            let model: LlamaForCausalLM<A> =
                random_model(&cfg, &PlacementConfig::linear(adapter.clone()), &dev);
            let step = || {
                let ids =
                    Tensor::<A, 2, Int>::from_data(TensorData::new(seq.clone(), [2, s_len]), &dev);
                let w = Tensor::<A, 3>::from_data(
                    TensorData::new(weights.clone(), [2, s_len, cfg.vocab_size]),
                    &dev,
                );
                let grads = (model.forward(ids, None) * w).sum().backward();
                let mut visitor = Grads::<A>(&grads, Vec::new());
                model.visit(&mut visitor);
                visitor.1
            };
            let first = step();
            assert!(!first.is_empty() && first.iter().all(Option::is_some));
            let stop = AtomicBool::new(false);
            std::thread::scope(|s| {
                s.spawn(|| {
                    let d = dev.clone();
                    while !stop.load(Ordering::Relaxed) {
                        let t = Tensor::<A, 1>::ones([4], &d).require_grad();
                        let _ = (t * 2.0).sum().backward();
                    }
                });
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    for n in 0..20 {
                        let grads = step();
                        assert_eq!(grads.len(), first.len());
                        for (i, (g, f)) in grads.iter().zip(&first).enumerate() {
                            let g = g.as_ref().unwrap_or_else(|| {
                                panic!("{adapter:?}: step {n} lost gradient {i}")
                            });
                            assert_close(g, f.as_ref().unwrap(), 1e-5, "a gradient");
                        }
                    }
                }));
                stop.store(true, Ordering::Relaxed);
                if let Err(e) = result {
                    std::panic::resume_unwind(e);
                }
            });
        }
    }
    on_suite_and_flex!(check);
}

#[test]
fn kv_cache_logits_equal_full_sequence_logits() {
    let dev = device();
    let cfg = LlamaConfig::tiny(50);
    let model: LlamaForCausalLM<TB> = random_model(
        &cfg,
        &PlacementConfig::linear(AdapterConfig::KronLora(
            KronLoraConfig::auto(2).with_init(kron_adapters::FactorInit::Normal),
        )),
        &dev,
    );
    let seq: Vec<i64> = vec![3, 17, 42, 8, 8, 29, 1, 44, 10];
    let ids = |v: &[i64]| {
        Tensor::<TB, 2, Int>::from_data(TensorData::new(v.to_vec(), [1, v.len()]), &dev)
    };
    let full = to_vec(model.forward(ids(&seq), None));
    let v = cfg.vocab_size;
    // Prompt of 4, then one token at a time.
    let mut cache = model.new_cache();
    let mut got = to_vec(model.forward_cached(ids(&seq[..4]), &mut cache));
    let mut want = full[3 * v..4 * v].to_vec();
    for p in 4..seq.len() {
        got.extend(to_vec(
            model.forward_cached(ids(&seq[p..p + 1]), &mut cache),
        ));
        want.extend_from_slice(&full[p * v..(p + 1) * v]);
    }
    assert_eq!(cache.len(), seq.len());
    assert_close(&got, &want, 1e-5, "cached vs full logits");
}

#[test]
fn typed_errors_for_bad_configs_files_and_placements() {
    let dev = device();
    // A config whose heads do not divide.
    let mut cfg = LlamaConfig::tiny(50);
    cfg.num_key_value_heads = 3;
    assert!(LlamaForCausalLM::<TB>::new(
        &mut TensorSource::random(1),
        &cfg,
        &PlacementConfig::new(),
        &dev
    )
    .is_err());
    // Block adapters are BERT's.
    let block = PlacementConfig::block(kron_adapters::block::BlockAdapterConfig::KronAB(
        kron_adapters::block::KronABConfig::auto(),
    ));
    assert!(LlamaForCausalLM::<TB>::new(
        &mut TensorSource::random(1),
        &LlamaConfig::tiny(50),
        &block,
        &dev
    )
    .is_err());
    // Targets by PEFT's rules, errors by path.
    let e = LlamaForCausalLM::<TB>::new(
        &mut TensorSource::random(1),
        &LlamaConfig::tiny(50),
        &PlacementConfig::linear(AdapterConfig::KronA(KronAConfig::new([5, 7], [7, 5])))
            .with_targets(kron_adapters::Targets::list(["q_proj"])),
        &dev,
    )
    .unwrap_err();
    assert!(
        e.to_string()
            .starts_with("model.layers.0.self_attn.q_proj:"),
        "{e}"
    );
    // A HF folder with a missing tensor: one error listing it.
    let dir = scratch_dir("llama", "missing");
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fx("tiny_llama").join(f), dir.join(f)).unwrap();
    }
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let kept: Vec<(String, safetensors::tensor::TensorView)> = st
        .tensors()
        .into_iter()
        .filter(|(n, _)| n != "model.layers.1.mlp.up_proj.weight")
        .collect();
    std::fs::write(
        dir.join("model.safetensors"),
        safetensors::serialize(kept, None).unwrap(),
    )
    .unwrap();
    match llama::load::<TB>(&dir, &PlacementConfig::new(), &dev) {
        Err(AdapterError::PretrainedMismatch { missing, .. }) => {
            assert_eq!(missing, vec!["model.layers.1.mlp.up_proj.weight"])
        }
        Err(e) => panic!("wrong error {e}"),
        Ok(_) => panic!("loaded a model with a missing tensor"),
    }
    // An unsupported architecture and a malformed config.
    std::fs::write(
        dir.join("config.json"),
        r#"{"model_type": "gpt2", "vocab_size": 5}"#,
    )
    .unwrap();
    assert!(matches!(
        llama::load::<TB>(&dir, &PlacementConfig::new(), &dev),
        Err(AdapterError::Unsupported { .. })
    ));
    std::fs::write(dir.join("config.json"), "{ not json").unwrap();
    assert!(matches!(
        llama::load::<TB>(&dir, &PlacementConfig::new(), &dev),
        Err(AdapterError::Format { .. })
    ));
    std::fs::remove_dir_all(dir).ok();
    // LoRA adapters of the wrong size for a layer are refused, naming it.
    let model: LlamaForCausalLM<TB> =
        random_model(&LlamaConfig::tiny(50), &PlacementConfig::new(), &dev);
    let other: LlamaForCausalLM<TB> = random_model(
        &LlamaConfig {
            hidden_size: 16,
            head_dim: 4,
            ..LlamaConfig::tiny(50)
        },
        &PlacementConfig::linear(AdapterConfig::Lora(LoraConfig::new(2))),
        &dev,
    );
    let Err(e) = attach(
        model,
        &kron_adapters::NativeAdapters::from_model(&other),
        &NameMap::new(),
        &dev,
    ) else {
        panic!("a size mismatch")
    };
    assert!(
        e.to_string().contains("model.layers.0.self_attn.q_proj"),
        "{e}"
    );
}

/// Every GGUF tensor type against the `gguf` package's dequantization (scripts/make_gguf_quant_fixture.py).
#[test]
fn gguf_dequantization_matches_the_gguf_package_for_every_type() {
    let file = GgufFile::read(fixture("gguf/quants.gguf")).unwrap();
    let reference = read_st(&fixture("gguf/reference.safetensors"));
    assert_eq!(file.tensors.len(), 13);
    for info in &file.tensors {
        let (shape, want) = &reference[&info.name];
        assert_eq!(&info.shape, shape, "{}", info.name);
        let got = file.dequantize_info(info).unwrap();
        let err = got
            .iter()
            .zip(want)
            .map(|(a, b)| (*a as f64 - b).abs())
            .fold(0f64, f64::max);
        assert_eq!(err, 0.0, "{}: max abs difference {err}", info.name);
        assert!(want.iter().any(|v| *v != 0.0), "{}", info.name);
    }
    // Metadata of every value type.
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("gguf/reference.json")).unwrap())
            .unwrap();
    for kv in meta["metadata"].as_array().unwrap() {
        let key = kv["key"].as_str().unwrap();
        let got = file.get(key).unwrap_or_else(|| panic!("{key}"));
        let want = &kv["value"];
        let same = match got {
            kron_adapters::store::gguf::GgufValue::String(s) => want.as_str() == Some(s.as_str()),
            kron_adapters::store::gguf::GgufValue::Bool(b) => want.as_bool() == Some(*b),
            kron_adapters::store::gguf::GgufValue::Array(a) => {
                a.len() == want.as_array().unwrap().len()
            }
            v => {
                (v.as_f64().unwrap() - want.as_f64().unwrap()).abs()
                    <= 1e-6 * want.as_f64().unwrap().abs().max(1.0)
            }
        };
        assert!(same, "{key}: {got:?} vs {want}");
    }
}

/// Truncated, corrupted or hostile GGUF files are typed errors, never panics.
#[test]
fn damaged_gguf_files_are_errors() {
    let bytes = std::fs::read(fixture("gguf/quants.gguf")).unwrap();
    let dir = scratch_dir("llama", "damaged-gguf");
    let path = dir.join("x.gguf");
    // In memory, and from a file read in pieces (header and tables first, each tensor when
    // dequantized): the same file or the same error.
    let parse = |b: Vec<u8>| {
        std::fs::write(&path, &b).unwrap();
        let (memory, file) = (GgufFile::from_bytes("x", b), GgufFile::read(&path));
        match (&memory, file) {
            (Ok(m), Ok(f)) => {
                assert_eq!(
                    (m.version, &m.metadata, &m.tensors),
                    (f.version, &f.metadata, &f.tensors)
                );
                for t in &m.tensors {
                    let (a, b) = (m.dequantize_info(t), f.dequantize_info(t));
                    assert_eq!(a.is_ok(), b.is_ok(), "{}", t.name);
                    if let (Ok(a), Ok(b)) = (a, b) {
                        assert!(
                            a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
                            "{}",
                            t.name
                        );
                    }
                }
            }
            (Err(m), Err(f)) => assert_eq!(
                m.to_string(),
                f.to_string().replace(&path.display().to_string(), "x")
            ),
            (m, f) => panic!("in memory {:?}, from the file {:?}", m.is_ok(), f.is_ok()),
        }
        memory
    };
    assert!(parse(bytes.clone()).is_ok());
    let last = parse(bytes.clone())
        .unwrap()
        .tensors
        .iter()
        .map(|t| t.offset + t.size.unwrap())
        .max()
        .unwrap();
    for cut in [0, 3, 8, 23, 100, 700, 1279, last - 1] {
        assert!(parse(bytes[..cut].to_vec()).is_err(), "cut at {cut}");
    }
    let mut bad = bytes.clone();
    bad[0] = b'X';
    assert!(parse(bad).is_err());
    let mut bad = bytes.clone();
    bad[4] = 1; // version 1
    assert!(matches!(parse(bad), Err(AdapterError::Unsupported { .. })));
    // An absurd tensor count.
    let mut bad = bytes.clone();
    bad[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(parse(bad).is_err());
    // Every single-byte corruption of the header and tensor table: an error or a file whose
    // tensors all dequantize or refuse, never a panic.
    let mut rng = Rng::new(3);
    for _ in 0..400 {
        let mut bad = bytes.clone();
        let at = (rng.next_u64() as usize) % 1280;
        bad[at] = rng.next_u64() as u8;
        if let Ok(f) = parse(bad) {
            for t in &f.tensors {
                let _ = f.dequantize_info(t);
            }
        }
    }
    // Metadata larger than the first piece read from a file (1 MB), whole and cut short.
    let big = vec![(
        "general.description".to_string(),
        kron_adapters::store::gguf::GgufValue::String("ab".repeat(1_500_000)),
    )];
    let bytes = kron_adapters::store::gguf::to_bytes(&big, &[]).unwrap();
    assert_eq!(parse(bytes.clone()).unwrap().metadata.len(), 1);
    for cut in [1 << 20, (1 << 20) + 5, 2_999_000] {
        assert!(parse(bytes[..cut].to_vec()).is_err(), "cut at {cut}");
    }
    std::fs::remove_dir_all(dir).ok();
}

/// Metadata that describe a model bigger than the file's tensors (found by fuzzing: a damaged
/// `block_count` or `embedding_length` made the loader allocate gigabytes of zeros for the
/// missing tensors) are refused before anything is allocated.
#[test]
fn gguf_metadata_bigger_than_its_tensors_is_refused_before_allocating() {
    let bytes = std::fs::read(fixture("llama/tiny_llama/tiny_llama.gguf")).unwrap();
    let dev = device();
    let load = |b: Vec<u8>| {
        let file = GgufFile::from_bytes("x.gguf", b).unwrap();
        llama::from_gguf::<TB>(&file, "x.gguf", &PlacementConfig::new(), &dev)
    };
    assert!(load(bytes.clone()).is_ok());
    for (key, value) in [
        ("llama.block_count", 1u32 << 30),
        ("llama.embedding_length", 1 << 24),
        ("llama.feed_forward_length", u32::MAX),
    ] {
        let at = bytes
            .windows(key.len())
            .position(|w| w == key.as_bytes())
            .unwrap()
            + key.len();
        assert_eq!(bytes[at..at + 4], 4u32.to_le_bytes(), "{key} is a u32");
        let mut bad = bytes.clone();
        bad[at + 4..at + 8].copy_from_slice(&value.to_le_bytes());
        let err = load(bad)
            .err()
            .unwrap_or_else(|| panic!("{key} = {value} loaded"));
        let msg = err.to_string();
        assert!(
            msg.contains("does not belong to these weights") || msg.contains("LlamaConfig"),
            "{key}: {msg}"
        );
    }
}

/// A merged model written as a Hugging Face folder reloads with the same logits (float32,
/// Hugging Face names and layout), from a GGUF base too; adapters trained here export as PEFT
/// folders keyed by the Llama paths PEFT uses.
#[test]
fn merged_hugging_face_export_and_peft_export_of_decoder_adapters() {
    use safetensors::Dtype;
    let dev = device();
    let ((ids, mask, lengths), want, lora) = tiny_llama_lora();
    let dir = scratch_dir("llama", "export");
    for base in ["tiny_llama", "tiny_llama/tiny_llama.gguf"] {
        let model = llama::load::<TB>(fx(base), &PlacementConfig::new(), &dev).unwrap();
        let model = attach(model, &lora, &NameMap::new(), &dev).unwrap();
        let out = dir.join("hf");
        llama::save_hf(model, &out, &[("extra.txt", b"x")], Dtype::F32, true).unwrap();
        assert!(out.join("extra.txt").exists());
        let back = load_dir_at(&out);
        assert!(back.adapter_specs().is_empty(), "merged");
        let err = logits_error(
            back.forward(ids.clone(), Some(mask.clone())),
            &want["logits"],
            &lengths,
        );
        assert!(err <= 1e-4, "{base}: exported model logits {err}");
    }
    // In half precision: half the file, the dtype in config.json, the weights rounded to
    // nearest (each equal to the F32 export's rounded), logits close to transformers + PEFT's.
    let f32_weights = read_st(&dir.join("hf/model.safetensors"));
    // Tensor bytes: the file less its 8-byte length and JSON header.
    let data_len = |b: &[u8]| b.len() - 8 - u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
    let f32_size = data_len(&std::fs::read(dir.join("hf/model.safetensors")).unwrap());
    for (dtype, name, tolerance) in [
        (Dtype::BF16, "bfloat16", 0.3), // 8 bits of mantissa: as Q8_0 on this model (0.17)
        (Dtype::F16, "float16", 2e-2),
    ] {
        let model = llama::load::<TB>(fx("tiny_llama"), &PlacementConfig::new(), &dev).unwrap();
        let model = attach(model, &lora, &NameMap::new(), &dev).unwrap();
        let out = dir.join(name);
        llama::save_hf(model, &out, &[], dtype, false).unwrap();
        let config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
        assert_eq!(config["torch_dtype"], name);
        let bytes = std::fs::read(out.join("model.safetensors")).unwrap();
        assert_eq!(
            2 * data_len(&bytes),
            f32_size,
            "{name}: half the F32 tensor bytes"
        );
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        for (k, (_, v)) in &f32_weights {
            let t = st.tensor(k).unwrap();
            assert_eq!(t.dtype(), dtype, "{k}");
            let v: Vec<f32> = v.iter().map(|x| *x as f32).collect();
            let rounded: Vec<u8> = kron_adapters::store::st::encode_f32(&v, dtype).unwrap();
            assert_eq!(t.data(), rounded.as_slice(), "{name} {k}");
        }
        let back = load_dir_at(&out);
        let err = logits_error(
            back.forward(ids.clone(), Some(mask.clone())),
            &want["logits"],
            &lengths,
        );
        assert!(err <= tolerance && err > 0.0, "{name}: logits {err}");
    }
    // A value beyond F16's range is refused in F16, leaving nothing; BF16 holds it.
    let mut huge = llama::load::<TB>(fx("tiny_llama"), &PlacementConfig::new(), &dev).unwrap();
    huge.model.norm.gamma = huge.model.norm.gamma.map(|g| g.mul_scalar(1.0e5));
    let e = llama::save_hf(huge.clone(), &dir.join("huge"), &[], Dtype::F16, false).unwrap_err();
    assert!(e.to_string().contains("model.norm.weight"), "{e}");
    assert!(!dir.join("huge").exists());
    llama::save_hf(huge, &dir.join("huge"), &[], Dtype::BF16, false).unwrap();
    // Other dtypes are refused.
    let model = llama::load::<TB>(fx("tiny_llama"), &PlacementConfig::new(), &dev).unwrap();
    assert!(matches!(
        llama::save_hf(model, &dir.join("i8"), &[], Dtype::I8, false),
        Err(AdapterError::Unsupported { .. })
    ));
    // An existing folder is refused without overwrite, and left as it was.
    let model = llama::load::<TB>(fx("tiny_llama"), &PlacementConfig::new(), &dev).unwrap();
    assert!(llama::save_hf(model, &dir.join("hf"), &[], Dtype::F32, false).is_err());
    assert!(dir.join("hf/extra.txt").exists());
    // Kron-LoRA trained here → a PEFT LoKr folder with PEFT's Llama keys → read back exactly.
    let model: LlamaForCausalLM<TB> = LlamaForCausalLM::new(
        &mut TensorSource::random(3),
        &LlamaConfig::tiny(64),
        &PlacementConfig::linear(AdapterConfig::KronLora(
            KronLoraConfig::auto(2).with_init(kron_adapters::FactorInit::Normal),
        )),
        &dev,
    )
    .unwrap();
    let native = kron_adapters::NativeAdapters::from_model(&model);
    let (config, tensors) = kron_adapters::store::peft_files(&native, None).unwrap();
    let st = safetensors::SafeTensors::deserialize(&tensors).unwrap();
    assert!(st
        .names()
        .contains(&"base_model.model.model.layers.0.self_attn.q_proj.lokr_w1"));
    assert!(st
        .names()
        .contains(&"base_model.model.model.layers.1.mlp.down_proj.lokr_w2_a"));
    let back =
        kron_adapters::store::PeftAdapter::from_bytes("x", config.as_bytes(), &tensors).unwrap();
    assert_eq!(back.adapters.meta.layers, native.meta.layers);
    assert_eq!(back.adapters.factors, native.factors);
    std::fs::remove_dir_all(dir).ok();
}

fn load_dir_at(dir: &Path) -> LlamaForCausalLM<TB> {
    llama::load::<TB>(dir, &PlacementConfig::new(), &device()).unwrap()
}

/// Configs of the Llama family parse from their Hugging Face spellings.
#[test]
fn llama_family_configs_parse() {
    let parse = |j: &str| LlamaConfig::from_hf("c", &serde_json::from_str(j).unwrap());
    let base = r#""vocab_size": 100, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 8"#;
    // transformers 4: rope_theta at the top, Llama 3.1 scaling in rope_scaling; eos a list.
    let c = parse(&format!(
        r#"{{{base}, "model_type": "llama", "num_key_value_heads": 2, "rope_theta": 500000.0,
           "rope_scaling": {{"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
           "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}},
           "eos_token_id": [128001, 128009], "bos_token_id": 1}}"#
    ));
    // eos outside the vocabulary of 100: refused with a typed error.
    assert!(matches!(c, Err(AdapterError::InvalidSpec { .. })), "{c:?}");
    let c = parse(&format!(
        r#"{{{base}, "model_type": "llama", "num_key_value_heads": 2, "rope_theta": 500000.0,
           "rope_scaling": {{"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
           "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}, "eos_token_id": [2, 3]}}"#
    ))
    .unwrap();
    assert_eq!(
        (c.rope_theta, c.eos_token_ids.clone(), c.head_dim),
        (500000.0, vec![2, 3], 8)
    );
    assert!(matches!(c.rope_scaling, llama::RopeScaling::Llama3 { .. }));
    let inv = c.inv_freq();
    assert!(inv[0] == 1.0 && inv[3] < 1.0 / 500000f64.powf(6.0 / 8.0) + 1e-12);
    // Mistral and Qwen2; transformers 5's rope_parameters.
    let m = parse(&format!(r#"{{{base}, "model_type": "mistral", "sliding_window": 4096, "rope_parameters": {{"rope_theta": 1000000.0, "rope_type": "default"}}}}"#)).unwrap();
    assert_eq!(
        (m.rope_theta, m.qkv_bias, m.num_key_value_heads),
        (1000000.0, false, 8)
    );
    let q = parse(&format!(
        r#"{{{base}, "model_type": "qwen2", "tie_word_embeddings": true}}"#
    ))
    .unwrap();
    assert!(q.qkv_bias && !q.o_bias && q.tie_word_embeddings);
    let l = parse(&format!(
        r#"{{{base}, "rope_scaling": {{"type": "linear", "factor": 2.0}}}}"#
    ))
    .unwrap();
    assert_eq!(l.position_scale(), 0.5);
    // What is not a Llama-family model, or not readable, is refused by name.
    assert!(matches!(
        parse(&format!(r#"{{{base}, "model_type": "gemma3"}}"#)),
        Err(AdapterError::Unsupported { .. })
    ));
    assert!(matches!(
        parse(&format!(r#"{{{base}, "hidden_act": "gelu"}}"#)),
        Err(AdapterError::Unsupported { .. })
    ));
    assert!(matches!(
        parse(&format!(
            r#"{{{base}, "rope_scaling": {{"rope_type": "yarn", "factor": 4.0}}}}"#
        )),
        Err(AdapterError::Unsupported { .. })
    ));
    assert!(parse(r#"{"vocab_size": 100}"#).is_err());
    assert!(parse(&format!(r#"{{{base}, "num_key_value_heads": 3}}"#)).is_err());
    assert!(parse(&format!(r#"{{{base}, "hidden_size": -4}}"#)).is_err());
}

/// `save_gguf` writes what llama.cpp's converter writes: the Hugging Face tiny Llama exported as
/// F32 is, tensor for tensor (names, shapes, Q/K rows permuted, every bit) and key for key, the
/// fixture `tiny_llama.gguf` the `gguf` package made from the same weights. Exports with a PEFT
/// LoRA merged read back with `transformers`' logits for that adapter (F32 within 1e-4, F16
/// within the half-precision rounding), the tied and Qwen2 (biased) fixtures with their own,
/// and bad requests are refused leaving nothing.
#[test]
fn gguf_export_matches_llamacpps_layout_and_reads_back_with_transformers_logits() {
    use kron_adapters::store::gguf::{GgmlType, GgufValue};
    let dev = device();
    let dir = scratch_dir("llama", "gguf-export");
    let out = dir.join("model.gguf");

    // Against the converter's layout.
    let model = load_dir("tiny_llama");
    llama::save_gguf(model, &out, &[], GgmlType::F32, false).unwrap();
    let ours = GgufFile::read(&out).unwrap();
    let theirs = GgufFile::read(fx("tiny_llama/tiny_llama.gguf")).unwrap();
    assert_eq!(ours.tensors.len(), theirs.tensors.len());
    for t in &theirs.tensors {
        let o = ours
            .tensor(&t.name)
            .unwrap_or_else(|| panic!("no {}", t.name));
        assert_eq!((&o.shape, o.type_id), (&t.shape, t.type_id), "{}", t.name);
        let (a, b) = (
            ours.dequantize(&t.name).unwrap(),
            theirs.dequantize(&t.name).unwrap(),
        );
        assert!(
            a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
            "{}",
            t.name
        );
    }
    for (key, value) in &theirs.metadata {
        assert_eq!(ours.get(key), Some(value), "{key}");
    }
    // BOS and EOS come from the model's configuration when no tokenizer metadata is given.
    assert_eq!(
        ours.get("tokenizer.ggml.bos_token_id"),
        Some(&GgufValue::U32(1))
    );

    // A PEFT LoRA merged in, F32, F16 and Q8_0, against transformers + PEFT. Q8_0 is held to
    // the scale of the error of the converter's own Q8_0 file of the base (the `gguf`
    // package's quantizer, below) against transformers, 0.11: this tiny model's weights (std
    // 0.2) and logits (up to 3.5) make 8-bit rounding show, and a largest difference over 896
    // logits is noisy (0.28 with the LoRA merged; its quantizer is checked bit for bit below).
    let converters_q8_0 = llama::from_gguf::<TB>(
        &GgufFile::read(fx("tiny_llama/tiny_llama_q8_0.gguf")).unwrap(),
        "q8_0",
        &PlacementConfig::new(),
        &dev,
    )
    .unwrap();
    let q8_0_error = reference_error(&converters_q8_0, "tiny_llama");
    assert!(q8_0_error > 2e-2 && q8_0_error < 1.0, "{q8_0_error}");
    let ((ids, mask, lengths), want, lora) = tiny_llama_lora();
    for (ty, tolerance) in [
        (GgmlType::F32, 1e-4),
        (GgmlType::F16, 2e-2),
        (GgmlType::Q8_0, 3.0 * q8_0_error),
    ] {
        let model = load_dir("tiny_llama");
        let model = attach(model, &lora, &NameMap::new(), &dev).unwrap();
        llama::save_gguf(model, &out, &[], ty, true).unwrap();
        let file = GgufFile::read(&out).unwrap();
        let q = file.tensor("blk.0.attn_q.weight").unwrap().type_id;
        let norm = file.tensor("blk.0.attn_norm.weight").unwrap().type_id;
        let want_q = match ty {
            GgmlType::F16 => 1,
            GgmlType::Q8_0 => 8,
            _ => 0,
        };
        assert_eq!((q, norm), (want_q, 0), "{ty:?}");
        let back = llama::from_gguf::<TB>(&file, "x", &PlacementConfig::new(), &dev).unwrap();
        let err = logits_error(
            back.forward(ids.clone(), Some(mask.clone())),
            &want["logits"],
            &lengths,
        );
        assert!(
            err <= tolerance,
            "{ty:?}: logits {err} (tolerance {tolerance})"
        );
        assert!(err > 0.0 || ty == GgmlType::F32);
    }
    // Q8_0 as the converter's `--outtype q8_0` makes it: every tensor's bytes as the `gguf`
    // package's port of ggml's reference quantizer gives them (F16 for a weight whose rows of
    // 48 are not whole blocks of 32, F32 vectors), and the same metadata
    // (scripts/make_q8_0_gguf_fixture.py).
    llama::save_gguf(load_dir("tiny_llama"), &out, &[], GgmlType::Q8_0, true).unwrap();
    let (ours, theirs) = (
        GgufFile::read(&out).unwrap(),
        GgufFile::read(fx("tiny_llama/tiny_llama_q8_0.gguf")).unwrap(),
    );
    let (our_bytes, their_bytes) = (
        std::fs::read(&out).unwrap(),
        std::fs::read(fx("tiny_llama/tiny_llama_q8_0.gguf")).unwrap(),
    );
    assert_eq!(ours.tensors.len(), theirs.tensors.len());
    let mut types = std::collections::BTreeMap::new();
    for t in &theirs.tensors {
        let o = ours.tensor(&t.name).unwrap();
        assert_eq!((&o.shape, o.type_id), (&t.shape, t.type_id), "{}", t.name);
        let bytes = |b: &[u8], t: &kron_adapters::store::gguf::GgufTensorInfo| {
            b[t.offset..t.offset + t.size.unwrap()].to_vec()
        };
        assert_eq!(bytes(&our_bytes, o), bytes(&their_bytes, t), "{}", t.name);
        *types.entry(t.type_id).or_insert(0) += 1;
    }
    assert_eq!(
        types,
        [(0, 5), (1, 2), (8, 14)].into(),
        "F32, F16, Q8_0 tensors"
    );
    for (key, value) in &theirs.metadata {
        assert_eq!(ours.get(key), Some(value), "{key}");
    }
    assert_eq!(ours.get("general.file_type"), Some(&GgufValue::U32(7)));

    // The tied head (no output.weight) and Qwen2's q/k/v biases (permuted like their rows).
    for name in ["tiny_llama_tied", "tiny_qwen2"] {
        llama::save_gguf(load_dir(name), &out, &[], GgmlType::F32, true).unwrap();
        let file = GgufFile::read(&out).unwrap();
        assert_eq!(
            file.tensor("output.weight").is_none(),
            name.ends_with("tied")
        );
        let back = llama::from_gguf::<TB>(&file, "x", &PlacementConfig::new(), &dev).unwrap();
        assert_eq!(back.config().qkv_bias, name.ends_with("qwen2"));
        let err = reference_error(&back, name);
        assert!(err <= 1e-4, "{name}: logits {err}");
    }

    // Tokenizer metadata is carried as given (the caller's own keys beside the model's ids).
    let tokenizer = vec![("tokenizer.ggml.eos_token_id".to_string(), GgufValue::U32(3))];
    llama::save_gguf(
        load_dir("tiny_llama"),
        &out,
        &tokenizer,
        GgmlType::F32,
        true,
    )
    .unwrap();
    let file = GgufFile::read(&out).unwrap();
    assert_eq!(
        file.get("tokenizer.ggml.eos_token_id"),
        Some(&GgufValue::U32(3))
    );

    // Refused, leaving what was there: an existing file without overwrite, a quantized type,
    // Llama 3.1's RoPE scaling.
    let before = std::fs::read(&out).unwrap();
    assert!(llama::save_gguf(load_dir("tiny_llama"), &out, &[], GgmlType::F32, false).is_err());
    let refused = llama::save_gguf(load_dir("tiny_llama"), &out, &[], GgmlType::Q4_0, true);
    assert!(
        matches!(refused, Err(AdapterError::Unsupported { .. })),
        "{refused:?}"
    );
    let mut config = LlamaConfig::tiny(64);
    config.rope_scaling = kron_adapters::model::llama::RopeScaling::Llama3 {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 32.0,
    };
    let model: LlamaForCausalLM<TB> = LlamaForCausalLM::new(
        &mut TensorSource::random(3),
        &config,
        &PlacementConfig::new(),
        &dev,
    )
    .unwrap();
    let refused = llama::save_gguf(model, &out, &[], GgmlType::F32, true);
    assert!(
        matches!(refused, Err(AdapterError::Unsupported { .. })),
        "{refused:?}"
    );
    assert_eq!(std::fs::read(&out).unwrap(), before);
    let leftovers = std::fs::read_dir(&dir).unwrap().count();
    assert_eq!(leftovers, 1, "only model.gguf in {}", dir.display());
    std::fs::remove_dir_all(dir).ok();

    // The writer refuses what its types cannot hold, naming the tensor: a value beyond F16's
    // range (65504) in F16, a block whose Q8_0 scale max|x|/127 is beyond it, NaN in Q8_0, and
    // Q8_0 rows that are not whole blocks of 32; what they can hold reads back.
    use kron_adapters::store::gguf::{self, GgufTensorOut, GgufTensorSpec};
    let one = |ty: GgmlType, cols: usize, x: f32| {
        let mut values: Vec<f32> = (0..cols).map(|i| i as f32 / 7.0 - 2.0).collect();
        values[cols / 2] = x;
        let spec = GgufTensorSpec {
            name: "w".into(),
            shape: vec![1, cols],
            ty,
        };
        gguf::to_bytes(&[], &[GgufTensorOut { spec, values }])
    };
    for (ty, cols, x, ok) in [
        (GgmlType::F16, 32, 6.0e4, true),
        (GgmlType::F16, 32, 1.0e6, false),
        (GgmlType::Q8_0, 32, 1.0e6, true),
        (GgmlType::Q8_0, 64, 1.0e9, false),
        (GgmlType::Q8_0, 32, f32::NAN, false),
        (GgmlType::Q8_0, 48, 1.0, false),
    ] {
        match one(ty, cols, x) {
            Ok(bytes) => {
                assert!(ok, "{ty:?} {cols} {x}");
                let file = GgufFile::from_bytes("w.gguf", bytes).unwrap();
                let back = file.dequantize("w").unwrap();
                let err = (back[cols / 2] - x).abs() / x.abs();
                assert!(err < 5e-3, "{ty:?} {x}: read back {}", back[cols / 2]);
            }
            Err(e) => assert!(
                !ok && e.to_string().contains("`w`"),
                "{ty:?} {cols} {x}: {e}"
            ),
        }
    }
}

/// Model weights are read a tensor at a time (the header checked when the file is opened, as
/// the `safetensors` crate checks a whole file), so damaged files are still refused by name,
/// before or while the model is built: a header past the end, a header that is not JSON,
/// offsets that overlap, data shorter or longer than the header says, a tensor in an
/// unsupported dtype, a tensor in two shards, and a device for a file.
#[test]
fn damaged_safetensors_weights_are_refused_by_name() {
    let dev = device();
    let dir = scratch_dir("llama", "damaged-weights");
    std::fs::copy(fx("tiny_llama/config.json"), dir.join("config.json")).unwrap();
    let good = std::fs::read(fx("tiny_llama/model.safetensors")).unwrap();
    let n = u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&good[8..8 + n]).unwrap();
    let with_header = |h: &serde_json::Value, data: &[u8]| {
        let h = h.to_string().into_bytes();
        let mut b = (h.len() as u64).to_le_bytes().to_vec();
        b.extend(h);
        b.extend(data);
        b
    };
    let data = &good[8 + n..];
    // The first tensor by offset, to damage.
    let (first, _) = header
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .min_by_key(|(_, v)| v["data_offsets"][0].as_u64().unwrap())
        .unwrap();
    let edit = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut h = header.clone();
        f(&mut h);
        with_header(&h, data)
    };
    let mut cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "a header past the end",
            {
                let mut b = good.clone();
                b[..8].copy_from_slice(&(good.len() as u64).to_le_bytes());
                b
            },
            "header",
        ),
        (
            "a header that is not JSON",
            {
                let mut b = good.clone();
                b[8] = b'[';
                b
            },
            "header",
        ),
        (
            "cut short",
            good[..good.len() - 10].to_vec(),
            "bytes of tensors",
        ),
        (
            "trailing bytes",
            [good.as_slice(), &[0u8; 8]].concat(),
            "bytes of tensors",
        ),
        (
            "overlapping offsets",
            edit(&|h| h[first.as_str()]["data_offsets"][1] = serde_json::json!(4)),
            "not a valid safetensors file",
        ),
        (
            "an unsupported dtype",
            edit(&|h| {
                let shape = h[first.as_str()]["shape"].clone();
                let n: u64 = shape
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|d| d.as_u64().unwrap())
                    .product();
                // I32 has F32's size: only the dtype changes.
                h[first.as_str()]["dtype"] = serde_json::json!("I32");
                assert_eq!(
                    n * 4,
                    h[first.as_str()]["data_offsets"][1].as_u64().unwrap()
                );
            }),
            "I32",
        ),
    ];
    cases.push(("empty", Vec::new(), "header"));
    for (what, bytes, says) in cases {
        std::fs::write(dir.join("model.safetensors"), bytes).unwrap();
        let e = match llama::load::<TB>(&dir, &PlacementConfig::new(), &dev) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("{what}: loaded"),
        };
        assert!(
            e.contains("model.safetensors") && e.contains(says),
            "{what}: {e}"
        );
    }
    // Two shards holding one tensor.
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    for shard in ["a.safetensors", "b.safetensors"] {
        std::fs::write(dir.join(shard), &good).unwrap();
    }
    let names: Vec<&String> = header.as_object().unwrap().keys().collect();
    let map: serde_json::Map<String, serde_json::Value> = names
        .iter()
        .enumerate()
        .map(|(i, k)| {
            (
                k.to_string(),
                serde_json::json!(["a", "b"][i % 2].to_string() + ".safetensors"),
            )
        })
        .collect();
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        serde_json::json!({"weight_map": map}).to_string(),
    )
    .unwrap();
    let e = llama::load::<TB>(&dir, &PlacementConfig::new(), &dev)
        .err()
        .unwrap();
    assert!(e.to_string().contains("more than one shard"), "{e}");
    // A device named as the weights file (through the shard index).
    #[cfg(unix)]
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        serde_json::json!({"weight_map": {"x": "null"}}).to_string(),
    )
    .unwrap();
    std::os::unix::fs::symlink("/dev/null", dir.join("null")).unwrap();
    let e = llama::load::<TB>(&dir, &PlacementConfig::new(), &dev)
        .err()
        .unwrap();
    assert!(e.to_string().contains("not a regular file"), "{e}");
    // The good file loads.
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(fx("tiny_llama/config.json"), dir.join("config.json")).unwrap();
    std::fs::write(dir.join("model.safetensors"), &good).unwrap();
    assert!(llama::load::<TB>(&dir, &PlacementConfig::new(), &dev).is_ok());
    std::fs::remove_dir_all(dir).ok();
}

/// `merge_checkpoint` into a sharded Hugging Face folder (how 7B checkpoints come): the same
/// shards out, each adapted weight merged in the shard that holds it, the other files copied
/// (weights in other formats left out), and the folder loads with `transformers` + PEFT's
/// logits; its tensors are the single-file merge's. A layer no shard holds, or two layers
/// merging into one weight, is refused with nothing written.
#[test]
fn merge_into_a_sharded_folder_matches_peft() {
    use kron_adapters::store::{merge_checkpoint, st};
    let dev = device();
    let ((ids, mask, lengths), want, lora) = tiny_llama_lora();
    let dir = scratch_dir("llama", "sharded-merge");
    let base = dir.join("base");
    std::fs::create_dir_all(&base).unwrap();
    // Two shards, split by name, and the index transformers writes.
    let bytes = std::fs::read(fx("tiny_llama/model.safetensors")).unwrap();
    let whole = st::parse("x", &bytes).unwrap();
    let mut names: Vec<String> = whole.names().into_iter().map(String::from).collect();
    names.sort();
    let mut weight_map = serde_json::Map::new();
    for (k, part) in names.chunks(names.len() / 2 + 1).enumerate() {
        let shard = format!("model-0000{}-of-00002.safetensors", k + 1);
        let entries: Vec<st::Entry<&[u8]>> = part
            .iter()
            .map(|n| {
                let v = whole.tensor(n).unwrap();
                (n.clone(), v.dtype(), v.shape().to_vec(), v.data())
            })
            .collect();
        std::fs::write(
            base.join(&shard),
            st::serialize("x", &entries, Default::default()).unwrap(),
        )
        .unwrap();
        for n in part {
            weight_map.insert(n.clone(), shard.clone().into());
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(base.join("model.safetensors.index.json"), index.to_string()).unwrap();
    std::fs::copy(fx("tiny_llama/config.json"), base.join("config.json")).unwrap();
    std::fs::write(base.join("pytorch_model.bin"), b"old weights").unwrap();
    let out = dir.join("merged");
    let report = merge_checkpoint::<TB>(&base, &lora, &NameMap::new(), &out, false, &dev).unwrap();
    assert_eq!(report.merged.len(), lora.meta.layers.len());
    let mut files: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert_eq!(
        files,
        [
            "config.json",
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
            "model.safetensors.index.json"
        ]
    );
    let merged = load_dir_at(&out);
    let err = logits_error(merged.forward(ids, Some(mask)), &want["logits"], &lengths);
    assert!(err <= 1e-4, "merged shards: logits {err}");
    // The single-file merge's tensors, shard by shard.
    let single = dir.join("single.safetensors");
    merge_checkpoint::<TB>(
        &fx("tiny_llama/model.safetensors"),
        &lora,
        &NameMap::new(),
        &single,
        false,
        &dev,
    )
    .unwrap();
    let single = std::fs::read(&single).unwrap();
    let single = st::parse("single", &single).unwrap();
    for shard in &files[1..3] {
        let b = std::fs::read(out.join(shard)).unwrap();
        for (n, v) in st::parse("shard", &b).unwrap().tensors() {
            assert_eq!(v.data(), single.tensor(&n).unwrap().data(), "{n}");
        }
    }
    // Refused, nothing written: a layer no shard holds, two layers into one weight.
    let bad = NameMap::new()
        .parse_rule("model.layers.1=model.layers.7")
        .unwrap();
    let e = merge_checkpoint::<TB>(&base, &lora, &bad, &dir.join("bad"), false, &dev).unwrap_err();
    assert!(e.to_string().contains("model.layers.7"), "{e}");
    let twice = NameMap::new()
        .parse_rule("model.layers.1=model.layers.0")
        .unwrap();
    let e =
        merge_checkpoint::<TB>(&base, &lora, &twice, &dir.join("bad"), false, &dev).unwrap_err();
    assert!(e.to_string().contains("both merge into"), "{e}");
    assert!(!dir.join("bad").exists());
    // An existing output folder is refused without overwrite, and kept.
    assert!(merge_checkpoint::<TB>(&base, &lora, &NameMap::new(), &out, false, &dev).is_err());
    assert!(out.join("config.json").exists());
    std::fs::remove_dir_all(dir).ok();
}

/// An int8 frozen base (`LoadOptions::frozen`, `--base-weights int8`) computes what its
/// dequantized twin (`quant::dequantized`: the same model with each quantized weight as `f32`)
/// computes, on the suite's backend and on flex (whose products read the `i8` values in place):
/// the full sequence, the KV cache a token at a time, with a PEFT LoRA attached, and a merged
/// export (the same bytes as the twin's). Layers whose rows are not whole blocks stay `f32`;
/// training backends and schemes the device cannot store are refused.
#[test]
fn an_int8_frozen_base_computes_with_its_dequantized_weights() {
    use kron_adapters::model::llama::LoadOptions;
    use kron_adapters::quant::{self, burn_scheme_of, Level, QuantConfig};

    fn check<B: burn::tensor::backend::Backend, A: burn::tensor::backend::Backend>(
        dev: &B::Device,
        ad: &A::Device,
    ) {
        let ((ids, mask, lengths), want_lora, lora) = tiny_llama_lora();
        let ids = Tensor::<B, 2, Int>::from_data(ids.into_data(), dev);
        let mask = Tensor::<B, 2, Int>::from_data(mask.into_data(), dev);
        let f32_model = llama::load::<B>(fx("tiny_llama"), &PlacementConfig::new(), dev).unwrap();
        let f32_logits = to_vec(f32_model.forward(ids.clone(), Some(mask.clone())));
        for (level, quantized) in [
            // 32 divides the 32-wide layers and the head, not k/v (16) or gate/up (48).
            (
                Level::Block(32),
                vec!["q_proj", "o_proj", "down_proj", "lm_head"],
            ),
            (Level::Block(16), vec!["proj", "lm_head"]),
            (Level::Tensor, vec!["proj", "lm_head"]),
        ] {
            let int8 = QuantConfig::new(8, level).unwrap();
            let options = LoadOptions::new().with_frozen(Some(int8));
            // The tied fixture's head is its embedding table, read transposed.
            for base in [
                "tiny_llama",
                "tiny_llama/tiny_llama.gguf",
                "tiny_llama_tied",
            ] {
                let what = format!("{base}, {int8}");
                let model = llama::load_with::<B>(fx(base), &options, dev).unwrap();
                for (path, layer) in model.adapter_layers() {
                    let q = burn_scheme_of(&layer.base.weight.val()).is_some();
                    let want = quantized.iter().any(|p| path.contains(p));
                    assert_eq!(q, want, "{what}: {path} quantized");
                }
                let table = model.model.embed_tokens.weight.val();
                assert!(burn_scheme_of(&table).is_some(), "{what}: the embedding");
                let tied = base == "tiny_llama_tied";
                let f32_logits = match tied {
                    true => {
                        let m = llama::load::<B>(fx(base), &PlacementConfig::new(), dev).unwrap();
                        to_vec(m.forward(ids.clone(), Some(mask.clone())))
                    }
                    false => f32_logits.clone(),
                };
                let twin = quant::dequantized(model.clone());
                assert!(twin
                    .adapter_layers()
                    .iter()
                    .all(|(_, l)| burn_scheme_of(&l.base.weight.val()).is_none()));
                let got = to_vec(model.forward(ids.clone(), Some(mask.clone())));
                let want = to_vec(twin.forward(ids.clone(), Some(mask.clone())));
                assert_close(&got, &want, 1e-5, &format!("{what}: logits"));
                // Quantized, the logits move from the f32 model's, but not far (the tiny
                // models' weights, std 0.2, make 8-bit rounding show; one scale a tensor most).
                let moved = max_abs_diff(&got, &f32_logits);
                let scale = f32_logits.iter().fold(0f32, |m, v| m.max(v.abs()));
                assert!(moved > 0.0 && moved < 0.25 * scale, "{what}: moved {moved}");

                // A token at a time (one row: flex's int8 loop) against the whole sequence.
                let seq: Vec<i64> = vec![3, 17, 42, 8, 8, 29, 1, 44, 10, 5, 9];
                let t = |v: &[i64]| {
                    Tensor::<B, 2, Int>::from_data(TensorData::new(v.to_vec(), [1, v.len()]), dev)
                };
                let full = to_vec(twin.forward(t(&seq), None));
                let v = model.config().vocab_size;
                let mut cache = model.new_cache();
                let mut cached = to_vec(model.forward_cached(t(&seq[..3]), &mut cache));
                for p in 3..seq.len() {
                    cached.extend(to_vec(model.forward_cached(t(&seq[p..p + 1]), &mut cache)));
                }
                assert_close(&cached, &full[2 * v..], 1e-5, &format!("{what}: cached"));
                if tied {
                    continue;
                }

                // A PEFT LoRA on the int8 base: the twin's logits with it, and near PEFT's.
                let map = NameMap::new();
                let adapted = attach(model, &lora, &map, dev).unwrap();
                let twin = attach(twin, &lora, &map, dev).unwrap();
                let got = adapted.forward(ids.clone(), Some(mask.clone()));
                let want = twin.forward(ids.clone(), Some(mask.clone()));
                assert_close(&to_vec(got.clone()), &to_vec(want), 1e-5, &what);
                let got = Tensor::<TB, 3>::from_data(got.into_data(), &device());
                // Near PEFT's logits as the base's are near the f32 model's (the tiny model's
                // weights, std 0.2, make 8-bit rounding show: 0.17–0.24 of 3.5 here).
                let peft = logits_error(got, &want_lora["logits"], &lengths);
                assert!(
                    peft < 0.25 * scale as f64,
                    "{what}: {peft} from PEFT's logits"
                );

                // Merged exports: the twin's bytes (the base's grid values plus ΔW).
                let dir = scratch_dir("llama", "int8-export");
                let (a, b) = (dir.join("int8"), dir.join("twin"));
                let f32_dtype = safetensors::Dtype::F32;
                llama::save_hf(adapted, &a, &[], f32_dtype, true).unwrap();
                llama::save_hf(twin, &b, &[], f32_dtype, true).unwrap();
                let file = |d: &Path| std::fs::read(d.join("model.safetensors")).unwrap();
                assert!(file(&a) == file(&b), "{what}: merged export");
            }
        }
        // Refused: per-channel scales, 4-bit where the device stores none (an autodiff backend
        // unregistered: `adapters_train_on_an_int8_base_as_on_its_dequantized_twin`).
        let int8 = QuantConfig::new(8, Level::Block(32)).unwrap();
        let refused = |r: Result<_, AdapterError>, needle: &str| match r {
            Err(e @ AdapterError::Unsupported { .. }) => {
                assert!(e.to_string().contains(needle), "{e}")
            }
            Err(e) => panic!("{needle}: {e}"),
            Ok(_) => panic!("{needle}: loaded"),
        };
        let _ = (int8, ad);
        let channel = QuantConfig::new(8, Level::Channel).unwrap();
        let options = LoadOptions::new().with_frozen(Some(channel));
        refused(
            llama::load_with::<B>(fx("tiny_llama"), &options, dev).map(|_| ()),
            "per channel",
        );
        let int4 = QuantConfig::new(4, Level::Block(16)).unwrap();
        if int4.burn_scheme::<B>([1, 16], dev).is_none() {
            let options = LoadOptions::new().with_frozen(Some(int4));
            refused(
                llama::load_with::<B>(fx("tiny_llama"), &options, dev).map(|_| ()),
                "int4",
            );
        }
    }
    #[cfg(feature = "tch")]
    return; // LibTorch stores no Burn quantized tensors.
    #[allow(unreachable_code)]
    {
        on_suite_and_flex!(check);
    }
}

/// A random model wider than the fixtures (256-wide layers: the int8 loop's widest pass), with
/// its own head or its embedding as the head, loads its frozen weights in int8 and decodes a
/// token at a time as its twin does.
#[test]
fn a_wider_int8_model_decodes_as_its_twin() {
    use kron_adapters::quant::{self, Level, QuantConfig};

    fn check<B: burn::tensor::backend::Backend, A: burn::tensor::backend::Backend>(
        dev: &B::Device,
        _: &A::Device,
    ) {
        let mut cfg = LlamaConfig::tiny(300);
        cfg.hidden_size = 64;
        cfg.intermediate_size = 544;
        cfg.head_dim = 16;
        for (level, tied) in [
            (Level::Block(32), false),
            (Level::Block(64), true),
            (Level::Tensor, true),
        ] {
            cfg.tie_word_embeddings = tied;
            let int8 = QuantConfig::new(8, level).unwrap();
            let mut source = TensorSource::random(11);
            source.quantize_frozen::<B>(int8, dev).unwrap();
            let model = LlamaForCausalLM::<B>::new(&mut source, &cfg, &PlacementConfig::new(), dev)
                .unwrap();
            let twin = quant::dequantized(model.clone());
            let seq: Vec<i64> = (0..12).map(|i| (i * 37 % 300) as i64).collect();
            let t = |v: &[i64]| {
                Tensor::<B, 2, Int>::from_data(TensorData::new(v.to_vec(), [1, v.len()]), dev)
            };
            let full = to_vec(twin.forward(t(&seq), None));
            let mut cache = model.new_cache();
            let mut cached = to_vec(model.forward_cached(t(&seq[..2]), &mut cache));
            for p in 2..seq.len() {
                cached.extend(to_vec(model.forward_cached(t(&seq[p..p + 1]), &mut cache)));
            }
            assert_close(&cached, &full[300..], 1e-5, &format!("{int8}"));
        }
    }
    #[cfg(feature = "tch")]
    return;
    #[allow(unreachable_code)]
    {
        on_suite_and_flex!(check);
    }
}

/// Weights an int8 load cannot represent — NaN, infinities — stay `f32` (burn-ndarray's quantizer
/// panicked on NaN), 1e30 and a tensor of zeros quantize (zeros stay zeros), and the model runs:
/// a damaged checkpoint is the user's to find, never a crash.
#[test]
fn non_finite_and_zero_weights_quantize_without_a_panic() {
    use kron_adapters::quant::{Level, QuantConfig};
    let bytes = std::fs::read(fx("tiny_llama/model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let shapes: std::collections::BTreeMap<String, Vec<usize>> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.shape().to_vec()))
        .collect();
    let config = LlamaConfig::from_json_file(fx("tiny_llama/config.json")).unwrap();
    let sizes = shapes.clone();
    let mut source = TensorSource::from_fn("damaged", shapes, move |name: &str| {
        let len: usize = sizes[name].iter().product();
        let odd = |i: usize, value: f32| {
            if i.is_multiple_of(7) {
                value
            } else {
                (i % 13) as f32 * 0.01
            }
        };
        Ok((0..len)
            .map(|i| match name {
                n if n.contains("q_proj") => odd(i, f32::NAN),
                n if n.contains("k_proj") => odd(i, f32::NEG_INFINITY),
                n if n.contains("v_proj") => odd(i, -1e30),
                n if n.contains("down_proj") => 0.0,
                _ => odd(i, 0.5),
            })
            .collect())
    });
    let dev = device();
    let int8 = QuantConfig::new(8, Level::Block(16)).unwrap();
    source.quantize_frozen::<TB>(int8, &dev).unwrap();
    let model =
        LlamaForCausalLM::<TB>::new(&mut source, &config, &PlacementConfig::new(), &dev).unwrap();
    source.finish().unwrap();
    let ids = Tensor::<TB, 2, Int>::from_data(TensorData::new(vec![1i64, 5, 9], [1, 3]), &dev);
    assert_eq!(model.forward(ids, None).dims(), [1, 3, config.vocab_size]);
    // NaN and infinite weights stay f32 (as the file has them); huge and zero ones quantize.
    let layer = &model.model.layers[0];
    let q = |l: &kron_adapters::AdaptedLinear<TB>| {
        kron_adapters::quant::burn_scheme_of(&l.base.weight.val()).is_some()
    };
    let attn = &layer.self_attn;
    assert!(
        !q(&attn.q_proj) && !q(&attn.k_proj),
        "non-finite weights kept"
    );
    assert!(
        q(&attn.v_proj) && q(&layer.mlp.down_proj),
        "finite weights quantized"
    );
    let twin = kron_adapters::quant::dequantized(model);
    let down = &twin.model.layers[0].mlp.down_proj.base.weight;
    assert!(
        to_vec(down.val()).iter().all(|v| *v == 0.0),
        "zeros stay zeros"
    );
}

/// Adapters train on an int8 base as on its dequantized twin (QLoRA's idea, on Burn's autodiff
/// through the crate's registered int8 products): every adapter factor's gradient equals the
/// twin's, over few rows (flex's int8 loops) and many (the weight dequantized for `gemm`), with
/// the model's own head and with the embedding as head (the transposed product's backward),
/// computed whole and in two parts (`shards::gradients`, whose forks keep the int8 weights), with
/// Qwen2's biases training too (BitFit), a PEFT LoRA attached after loading, and under balanced
/// checkpointing; no int8 weight gets a gradient, and an AdamW step moves both models' adapters
/// alike and leaves the int8 weights as they were.
#[test]
fn adapters_train_on_an_int8_base_as_on_its_dequantized_twin() {
    use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
    use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
    use burn::tensor::backend::{AutodiffBackend, Backend};
    use kron_adapters::model::llama::LoadOptions;
    use kron_adapters::quant::{self, burn_scheme_of, Level, QuantConfig};

    /// Trainable parameters get random values (adapters start with a zero factor, which would
    /// leave the other factor's gradient zero).
    struct Randomize<'a, B: Backend>(Rng, &'a B::Device);
    impl<B: AutodiffBackend> ModuleMapper<B> for Randomize<'_, B> {
        fn map_float<const D: usize>(&mut self, p: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            let (rng, device) = (&mut self.0, self.1);
            p.map(|t| match t.is_require_grad() {
                true => {
                    let dims = t.dims();
                    let n = dims.iter().product();
                    let values: Vec<f32> = rng.vec(n).iter().map(|v| 0.3 * v).collect();
                    Tensor::from_data(TensorData::new(values, dims), device).require_grad()
                }
                false => t,
            })
        }
    }
    /// Every trainable parameter's gradient (by id), and whether each frozen one is int8.
    struct Grads<'a>(&'a GradientsParams, Vec<(ParamId, Vec<f32>)>, Vec<bool>);
    impl<B: AutodiffBackend> ModuleVisitor<B> for Grads<'_> {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
            let t = p.val();
            if t.is_require_grad() {
                let g = self
                    .0
                    .get::<B::InnerBackend, D>(p.id)
                    .expect("a trainable grad");
                self.1.push((p.id, to_vec(g)));
            } else {
                self.2
                    .push(matches!(t.dtype(), burn::tensor::DType::QFloat(_)));
            }
        }
    }

    fn check<B: Backend, A: AutodiffBackend>(_: &B::Device, ad: &A::Device) {
        // Unregistered, an autodiff backend refuses int8 weights (by name, no panic).
        let int8 = QuantConfig::new(8, Level::Block(16)).unwrap();
        type Unregistered<A> = burn::backend::Autodiff<A>;
        let options = LoadOptions::new().with_frozen(Some(int8));
        match llama::load_with::<Unregistered<A>>(fx("tiny_llama"), &options, ad) {
            Err(e @ AdapterError::Unsupported { .. }) => {
                assert!(e.to_string().contains("register_backward"), "{e}")
            }
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("an unregistered autodiff backend loaded int8 weights"),
        }
        assert!(kron_adapters::kron::autodiff::register_backward::<A>());
        let mut rng = Rng::new(41);
        // Qwen2's q/k/v biases trained too (BitFit): the node's bias gradient.
        for (base, adapter, bitfit) in [
            (
                "tiny_llama",
                AdapterConfig::KronLora(KronLoraConfig::auto(2)),
                false,
            ),
            (
                "tiny_llama_tied",
                AdapterConfig::Lora(LoraConfig::new(3)),
                false,
            ),
            (
                "tiny_llama/tiny_llama.gguf",
                AdapterConfig::KronA(KronAConfig::auto()),
                false,
            ),
            ("tiny_qwen2", AdapterConfig::Lora(LoraConfig::new(2)), true),
        ] {
            let options = LoadOptions::new()
                .with_placement(PlacementConfig::linear(adapter))
                .with_frozen(Some(int8));
            let model = llama::load_with::<A>(fx(base), &options, ad).unwrap();
            let model = match bitfit {
                true => kron_adapters::training::bitfit(model),
                false => model,
            };
            let model = model.map(&mut Randomize::<A>(Rng::new(7), ad));
            let table = model.model.embed_tokens.weight.val();
            assert!(burn_scheme_of(&table).is_some(), "{base}: the embedding");
            let twin = quant::dequantized(model.clone());
            let vocab = model.config().vocab_size;
            for [b, s] in [[2, 7], [5, 9]] {
                let what = format!("{base}, {b}×{s} tokens");
                let ids: Vec<i64> = (0..b * s)
                    .map(|_| (rng.next_u64() % vocab as u64) as i64)
                    .collect();
                let ids = Tensor::<A, 2, Int>::from_data(TensorData::new(ids, [b, s]), ad);
                let r = Tensor::<A, 3>::from_data(
                    TensorData::new(rng.vec(b * s * vocab), [b, s, vocab]),
                    ad,
                );
                let loss = |m: &LlamaForCausalLM<A>, rows: std::ops::Range<usize>| {
                    let logits = m.forward(ids.clone().slice([rows.clone()]), None);
                    (logits * r.clone().slice([rows])).sum()
                };
                let grads_of = |m: &LlamaForCausalLM<A>, parts: usize| {
                    let (grads, _) = kron_adapters::shards::gradients(m, b, parts, 3, |m, p| {
                        (loss(m, p.range.clone()), ())
                    })
                    .unwrap();
                    let mut seen = Grads(&grads, Vec::new(), Vec::new());
                    m.visit(&mut seen);
                    assert_eq!(grads.len(), seen.1.len(), "{what}: only trainable grads");
                    (seen.1, seen.2)
                };
                for parts in [1, 2] {
                    let (got, frozen) = grads_of(&model, parts);
                    let (want, _) = grads_of(&twin, parts);
                    assert!(frozen.iter().any(|&q| q), "{what}: int8 weights");
                    assert_eq!(got.len(), want.len());
                    for ((id, g), (id2, w)) in got.iter().zip(&want) {
                        assert_eq!(id, id2);
                        assert!(g.iter().any(|v| *v != 0.0), "{what}: a zero gradient");
                        assert_close(g, w, 1e-4, &format!("{what}, {parts} parts: {id}"));
                    }
                }
            }
            // One AdamW step on each: the same adapters after it, the int8 weights unmoved.
            let ids = Tensor::<A, 2, Int>::from_data(TensorData::new(vec![3i64, 9, 1], [1, 3]), ad);
            let mut optim = AdamWConfig::new().init::<A, LlamaForCausalLM<A>>();
            let mut step = |m: LlamaForCausalLM<A>| {
                let loss = m.forward(ids.clone(), None).powi_scalar(2).mean();
                let grads = kron_adapters::training::gradients_params(loss.backward(), &m);
                optim.step(1e-2, m, grads)
            };
            let q_before = to_vec(quant::float_values(
                model.model.layers[0].self_attn.o_proj.base.weight.val(),
            ));
            let (stepped, twin) = (step(model), step(twin));
            let o = &stepped.model.layers[0].self_attn.o_proj.base.weight;
            assert!(burn_scheme_of(&o.val()).is_some(), "{base}: still int8");
            assert_eq!(to_vec(quant::float_values(o.val())), q_before);
            let a = |m: &LlamaForCausalLM<A>| to_vec(m.adapter_layers()[0].1.delta_weight());
            assert_close(&a(&stepped), &a(&twin), 1e-4, &format!("{base}: stepped"));
        }
        // A PEFT LoRA attached to the int8 base (to train it further): the twin's gradients.
        let (_, _, lora) = tiny_llama_lora();
        let options = LoadOptions::new().with_frozen(Some(int8));
        let base = llama::load_with::<A>(fx("tiny_llama"), &options, ad).unwrap();
        let twin = quant::dequantized(base.clone());
        let ids = Tensor::<A, 2, Int>::from_data(TensorData::new(vec![5i64, 2, 7], [1, 3]), ad);
        let grads = |m: LlamaForCausalLM<A>| {
            let m = attach(m, &lora, &NameMap::new(), ad).unwrap();
            let loss = m.forward(ids.clone(), None).powi_scalar(2).mean();
            let grads = kron_adapters::training::gradients_params(loss.backward(), &m);
            let mut seen = Grads(&grads, Vec::new(), Vec::new());
            m.visit(&mut seen);
            seen.1
        };
        let (got, want) = (grads(base), grads(twin));
        assert!(
            !got.is_empty() && got.len() == want.len(),
            "the PEFT LoRA's gradients"
        );
        for ((_, g), (_, w)) in got.iter().zip(&want) {
            assert_close(g, w, 1e-4, "a PEFT LoRA on the int8 base");
        }
        // Under Burn's balanced checkpointing (registered too): the twin's gradients.
        type Balanced<A> = burn::backend::Autodiff<
            <A as AutodiffBackend>::InnerBackend,
            burn::backend::autodiff::checkpoint::strategy::BalancedCheckpointing,
        >;
        let bd: &burn::tensor::Device<Balanced<A>> = ad;
        assert!(kron_adapters::kron::autodiff::register_backward::<
            Balanced<A>,
        >());
        let placement = PlacementConfig::linear(AdapterConfig::Lora(LoraConfig::new(3)));
        let options = LoadOptions::new()
            .with_placement(placement)
            .with_frozen(Some(int8));
        let model = llama::load_with::<Balanced<A>>(fx("tiny_llama_tied"), &options, bd).unwrap();
        let model = model.map(&mut Randomize::<Balanced<A>>(Rng::new(8), bd));
        let twin = quant::dequantized(model.clone());
        let ids = Tensor::<Balanced<A>, 2, Int>::from_data(
            TensorData::new(vec![3i64, 9, 1, 4, 4, 0], [2, 3]),
            bd,
        );
        let grads = |m: &LlamaForCausalLM<Balanced<A>>| {
            let loss = m.forward(ids.clone(), None).powi_scalar(2).mean();
            let grads = kron_adapters::training::gradients_params(loss.backward(), m);
            let mut seen = Grads(&grads, Vec::new(), Vec::new());
            m.visit(&mut seen);
            seen.1
        };
        let (got, want) = (grads(&model), grads(&twin));
        assert!(
            !got.is_empty() && got.len() == want.len(),
            "the adapters' gradients"
        );
        for ((id, g), (_, w)) in got.iter().zip(&want) {
            assert_close(g, w, 1e-4, &format!("balanced checkpointing: {id}"));
        }
    }
    #[cfg(feature = "tch")]
    return; // LibTorch stores no Burn quantized tensors.
    #[allow(unreachable_code)]
    {
        on_suite_and_flex!(check);
    }
}
