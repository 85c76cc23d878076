//! The decoder's text jobs: the masked causal-LM loss (against a full-logits reference and
//! finite differences; only adapters get gradients), scoring and acc/acc_norm against
//! hand-computed values, the task loaders' formats and counts, generation's sampling, and the
//! real SmolLM2 (tokenizer ids and greedy continuations against `transformers`, with and without
//! PEFT adapters) when its asset is present (CI fetches it).

use crate::common::*;

use burn::module::Param;
use burn::tensor::{activation, Int, Tensor, TensorData};
use kron_adapters::llm::score::{
    continuation_logprobs, encode_pair, first_max, loglikelihoods, masked_nll, Encoded,
};
use kron_adapters::llm::tasks::{question, TaskKind};
use kron_adapters::llm::{self, GenerateConfig, Question, TextTokenizer};
use kron_adapters::model::llama::{LlamaConfig, LlamaForCausalLM};
use kron_adapters::model::TensorSource;
use kron_adapters::{AdapterConfig, FactorInit, KronLoraConfig, LinearAdapter, PlacementConfig};

fn kron_lora() -> PlacementConfig {
    PlacementConfig::linear(AdapterConfig::KronLora(
        KronLoraConfig::auto(2).with_init(FactorInit::Normal),
    ))
}

fn model<B: burn::tensor::backend::Backend>(vocab: usize, dev: &B::Device) -> LlamaForCausalLM<B> {
    LlamaForCausalLM::new(
        &mut TensorSource::random(11),
        &LlamaConfig::tiny(vocab),
        &kron_lora(),
        dev,
    )
    .unwrap()
}

/// Question `i` of a rule the adapters learn: "`{word} {i} : is it`" continued by either answer,
/// the `gold` one right.
fn is_it(word: &str, i: usize, answers: [&str; 2], gold: usize) -> Question {
    Question {
        id: i,
        choices: answers
            .iter()
            .map(|a| (format!("{word} {i} : is it"), a.to_string()))
            .collect(),
        gold,
    }
}

/// Log-probabilities of the continuation tokens from full-sequence logits (one row at a time).
fn reference_logprobs(m: &LlamaForCausalLM<TB>, e: &Encoded) -> Vec<f32> {
    let dev = device();
    let ids: Vec<i64> = e.ids.iter().map(|&t| t as i64).collect();
    let n = ids.len();
    let logits = m.forward(
        Tensor::<TB, 2, Int>::from_data(TensorData::new(ids, [1, n]), &dev),
        None,
    );
    let lp = to_vec(activation::log_softmax(logits, 2));
    let v = m.config().vocab_size;
    (e.start..n)
        .map(|t| lp[(t - 1) * v + e.ids[t] as usize])
        .collect()
}

#[test]
fn continuation_scores_equal_full_logits_in_padded_batches() {
    let dev = device();
    let m: LlamaForCausalLM<TB> = model(40, &dev);
    let reqs = vec![
        Encoded {
            ids: vec![5, 9, 13, 2, 7],
            start: 3,
        },
        Encoded {
            ids: vec![30, 1, 4],
            start: 1,
        },
        Encoded {
            ids: vec![8, 8, 8, 8, 8, 8, 21],
            start: 6,
        },
    ];
    let want: Vec<f32> = reqs
        .iter()
        .flat_map(|e| reference_logprobs(&m, e))
        .collect();
    let got = to_vec(continuation_logprobs(
        &m,
        &reqs.iter().collect::<Vec<_>>(),
        &dev,
    ));
    assert_close(&got, &want, 1e-5, "batched continuation log-probs");
    // Choices sharing a context: the context once, then the continuations on its cache.
    let shared = vec![
        Encoded {
            ids: vec![5, 9, 13, 2, 7],
            start: 3,
        },
        Encoded {
            ids: vec![5, 9, 13, 30],
            start: 3,
        },
        Encoded {
            ids: vec![5, 9, 13, 1, 1, 1, 4],
            start: 3,
        },
    ];
    let refs: Vec<&Encoded> = shared.iter().collect();
    let once = kron_adapters::llm::score::shared_loglikelihoods(&m, &refs, &dev);
    let each = loglikelihoods(&m, &shared, 4096, &dev);
    for (g, w) in once.iter().zip(&each) {
        assert!((g - w).abs() < 1e-4, "shared context: {g} vs {w}");
    }
    // Summed per request, in any batch size.
    for tokens in [1, 8, 1000] {
        let sums = loglikelihoods(&m, &reqs, tokens, &dev);
        let mut k = 0;
        for (e, s) in reqs.iter().zip(&sums) {
            let n = e.ids.len() - e.start;
            let w: f64 = want[k..k + n].iter().map(|v| *v as f64).sum();
            assert!((s - w).abs() < 1e-4, "batch {tokens}: {s} vs {w}");
            k += n;
        }
    }
}

/// The loss is the mean NLL of the answer tokens only: equal to a full-logits cross-entropy
/// whose prompt positions are masked out, with the same gradients; gradients reach only the
/// adapters; and they agree with finite differences.
#[test]
fn masked_loss_ignores_prompt_tokens_and_trains_only_adapters() {
    let dev = device();
    let m: LlamaForCausalLM<AB> = model(40, &dev);
    let batch = [
        Encoded {
            ids: vec![5, 9, 13, 2, 7, 11],
            start: 4,
        },
        Encoded {
            ids: vec![30, 1, 4, 17],
            start: 2,
        },
    ];
    let refs: Vec<&Encoded> = batch.iter().collect();
    // Each loss is built just before its backward pass, so that no other graph is alive
    // during one: built together, the second backward pass once found its root gone (Burn's
    // "Node should have a step registered"; on lavapipe beside other tests, not reproduced).
    let loss = masked_nll(&m, &refs, &dev);
    let l = to_vec(loss.clone());
    let g1 = loss.backward();
    // Reference: full logits of each row, cross-entropy weighted 1 on answer targets, 0 on
    // prompt targets.
    let mut terms = Vec::new();
    for e in &batch {
        let n = e.ids.len();
        let ids: Vec<i64> = e.ids.iter().map(|&t| t as i64).collect();
        let lp = activation::log_softmax(
            m.forward(
                Tensor::<AB, 2, Int>::from_data(TensorData::new(ids, [1, n]), &dev),
                None,
            ),
            2,
        );
        let targets: Vec<i64> = e.ids[1..].iter().map(|&t| t as i64).collect();
        let picked = lp
            .slice([0..1, 0..n - 1])
            .reshape([n - 1, 40])
            .gather(
                1,
                Tensor::<AB, 2, Int>::from_data(TensorData::new(targets, [n - 1, 1]), &dev),
            )
            .reshape([n - 1]);
        let weights: Vec<f32> = (1..n)
            .map(|t| if t >= e.start { 1.0 } else { 0.0 })
            .collect();
        terms.push(
            (picked * Tensor::<AB, 1>::from_data(TensorData::new(weights, [n - 1]), &dev)).sum(),
        );
    }
    let answer_tokens = (6 - 4 + 4 - 2) as f64;
    let full = Tensor::cat(terms, 0).sum().div_scalar(answer_tokens).neg();
    let f = to_vec(full.clone());
    assert!((l[0] - f[0]).abs() < 1e-5, "{l:?} vs {f:?}");
    let g2 = full.backward();
    let q = &m.model.layers[1].self_attn.q_proj;
    let kron_adapters::Adapter::KronLora(a) = q.adapter.as_ref().unwrap() else {
        panic!("Kron-LoRA")
    };
    let ga = to_vec(a.b1.val().grad(&g1).unwrap());
    assert_close(
        &ga,
        &to_vec(a.b1.val().grad(&g2).unwrap()),
        // f32 gradients through two layers summed in different orders (a padded batch against
        // one row at a time), with adapter factors drawn afresh each run: 1.2e-4 and 1.4e-4 seen
        // (1e-4 failed about one run in four); a prompt token left in the loss is O(1).
        1e-3,
        "masked vs weighted gradient",
    );
    // Only adapters have gradients.
    assert!(
        q.base.weight.val().grad(&g1).is_none(),
        "the frozen base got a gradient"
    );
    assert!(m.model.embed_tokens.weight.val().grad(&g1).is_none());
    assert!(m.model.norm.gamma.val().grad(&g1).is_none());
    assert!(m.lm_head.as_ref().unwrap().weight.val().grad(&g1).is_none());
    // Finite differences on one factor entry.
    let eps = 1e-2f32;
    let at = 3;
    let bumped = |delta: f32| {
        let mut mm = m.clone();
        let kron_adapters::Adapter::KronLora(a) =
            mm.model.layers[1].self_attn.q_proj.adapter.take().unwrap()
        else {
            unreachable!()
        };
        let mut vals = to_vec(a.b1.val());
        vals[at] += delta;
        let dims = a.b1.dims();
        let b1 = tensor::<AB, 2>(&vals, dims, &dev);
        let (fa, fb2) = (a.a.val(), a.b2.val());
        let a = a.with_factors(vec![fa, b1, fb2]);
        mm.model.layers[1].self_attn.q_proj.adapter = Some(kron_adapters::Adapter::KronLora(a));
        to_vec(masked_nll(&mm, &refs, &dev))[0] as f64
    };
    let fd = (bumped(eps) - bumped(-eps)) / (2.0 * eps as f64);
    assert!(
        (fd - ga[at] as f64).abs() < 2e-3 * (1.0 + fd.abs()),
        "finite difference {fd} vs {}",
        ga[at]
    );
    let _ = Param::<Tensor<AB, 1>>::from_tensor;
}

/// acc sums log-probabilities; acc_norm divides by the continuation's characters (leading
/// space not counted). Checked on hand-computed scores.
#[test]
fn acc_and_acc_norm_on_hand_computed_scores() {
    let dev = device();
    // A WordPiece tokenizer (MiniLM's, in the fixtures) over a random decoder of its vocabulary.
    let tok = TextTokenizer::from_hf_dir(&fixture("minilm")).unwrap();
    let m: LlamaForCausalLM<TB> = LlamaForCausalLM::new(
        &mut TensorSource::random(5),
        &LlamaConfig::tiny(tok.vocab_size()),
        &kron_lora(),
        &dev,
    )
    .unwrap();
    let q = Question {
        id: 0,
        choices: vec![
            ("the cat sat on the".into(), " mat".into()),
            ("the cat sat on the".into(), " very large red carpet".into()),
            ("the cat sat on the".into(), " dog".into()),
        ],
        gold: 1,
    };
    let encoded: Vec<Encoded> = q
        .choices
        .iter()
        .map(|(c, x)| encode_pair(&tok, c, x, 64).unwrap())
        .collect();
    for e in &encoded {
        assert_eq!(
            &e.ids[..e.start],
            &tok.encode("the cat sat on the", true).unwrap()[..],
            "context first"
        );
    }
    let ll = loglikelihoods(&m, &encoded, 4096, &dev);
    let chars = [3.0, 22.0, 3.0];
    let norm: Vec<f64> = ll.iter().zip(chars).map(|(l, c)| l / c).collect();
    let r = llm::evaluate(&m, &tok, std::slice::from_ref(&q), 64, 4096, &dev).unwrap();
    assert_eq!(r.predictions, vec![first_max(&ll)]);
    assert_eq!(r.acc, f64::from(u8::from(first_max(&ll) == 1)));
    assert_eq!(r.acc_norm, f64::from(u8::from(first_max(&norm) == 1)));
    // The long answer has the lowest sum but not necessarily the lowest per character: the two
    // metrics are computed from different numbers.
    assert!(ll[1] < ll[0] && ll[1] < ll[2], "{ll:?}");
    assert_eq!(first_max(&[1.0, 3.0, 3.0]), 1, "ties go to the first");
    // Several questions at once (in parts on the CPU backends), with shared contexts and
    // without (options inside the context, as WinoGrande's), of two and three choices: each
    // scores as it does alone.
    let pair = |id, a: &str, b: &str, x: &str, y: &str, gold| Question {
        id,
        choices: vec![(a.into(), x.into()), (b.into(), y.into())],
        gold,
    };
    let qs = [
        q.clone(),
        pair(1, "a dog ran", "a cat ran", " home", " home", 0),
        pair(2, "one two", "one two", " three", " four", 1),
        pair(3, "the sky is", "the sky is", " blue", " made of cheese", 0),
        q.clone(),
    ];
    let all = llm::evaluate(&m, &tok, &qs, 64, 4096, &dev).unwrap();
    let alone: Vec<_> = qs
        .iter()
        .map(|x| llm::evaluate(&m, &tok, std::slice::from_ref(x), 64, 4096, &dev).unwrap())
        .collect();
    assert_eq!(all.n, 5);
    let preds: Vec<usize> = alone.iter().map(|r| r.predictions[0]).collect();
    assert_eq!(all.predictions, preds);
    assert_eq!(all.acc, alone.iter().map(|r| r.acc).sum::<f64>() / 5.0);
    assert_eq!(
        all.acc_norm,
        alone.iter().map(|r| r.acc_norm).sum::<f64>() / 5.0
    );
    let none = llm::evaluate(&m, &tok, &[], 64, 4096, &dev).unwrap();
    assert_eq!((none.n, none.predictions.len()), (0, 0));
}

#[test]
fn task_formats_follow_lm_evaluation_harness() {
    let doc = |j: &str| serde_json::from_str::<serde_json::Value>(j).unwrap();
    let arc = question(
        TaskKind::ArcEasy,
        0,
        &doc(r#"{"query": "Question: What is red?\nAnswer:", "choices": ["blood", "sky"], "gold": 0}"#),
    )
    .unwrap();
    assert_eq!(
        arc.choices[1],
        (
            "Question: What is red?\nAnswer:".to_string(),
            " sky".to_string()
        )
    );
    let piqa = question(
        TaskKind::Piqa,
        0,
        &doc(r#"{"goal": "Open a jar", "sol1": "twist", "sol2": "kick", "label": 1, "query": "Goal: x"}"#),
    )
    .unwrap();
    assert_eq!(piqa.choices[0].0, "Question: Open a jar\nAnswer:");
    assert_eq!((piqa.choices[1].1.as_str(), piqa.gold), (" kick", 1));
    let wino = question(
        TaskKind::Winogrande,
        0,
        &doc(r#"{"sentence": "Sarah beat Maria so _ got the easy cases.", "option1": "Sarah", "option2": "Maria", "answer": "2"}"#),
    )
    .unwrap();
    assert_eq!(wino.gold, 1);
    assert_eq!(
        wino.choices[0],
        (
            "Sarah beat Maria so Sarah".to_string(),
            " got the easy cases.".to_string()
        )
    );
    assert_eq!(wino.choices[1].0, "Sarah beat Maria so Maria");
    let boolq = question(
        TaskKind::Boolq,
        0,
        &doc(r#"{"query": "P\nQuestion: q?\nAnswer:", "choices": ["yes", "no"], "gold": 1}"#),
    )
    .unwrap();
    assert_eq!(boolq.choices[1].1, " no");
    // Malformed docs: typed errors, not panics.
    assert!(question(
        TaskKind::ArcEasy,
        0,
        &doc(r#"{"query": "q", "choices": ["a"], "gold": 3}"#)
    )
    .is_err());
    assert!(question(
        TaskKind::Winogrande,
        0,
        &doc(r#"{"sentence": "no blank", "option1": "a", "option2": "b", "answer": "1"}"#)
    )
    .is_err());
    assert!(question(TaskKind::Piqa, 0, &doc(r#"{"goal": 3}"#)).is_err());
}

/// The real task files: the published split sizes, every gold index in range.
#[test]
fn real_task_splits_have_the_published_sizes() {
    let Some(pkg) = asset(&kron_adapters::finetune::assets::OLMO) else {
        return;
    };
    let dir = pkg.join(kron_adapters::finetune::assets::OLMO.prefix);
    use kron_adapters::llm::Split::*;
    for (task, split, n, choices) in [
        (TaskKind::ArcChallenge, Train, 1119, 4),
        (TaskKind::ArcChallenge, Validation, 299, 4),
        (TaskKind::ArcChallenge, Test, 1172, 4),
        (TaskKind::ArcEasy, Test, 2376, 4),
        (TaskKind::Piqa, Validation, 1838, 2),
        (TaskKind::Winogrande, Validation, 1267, 2),
        (TaskKind::Boolq, Validation, 3270, 2),
    ] {
        let qs = kron_adapters::llm::tasks::load(&dir, task, split).unwrap();
        assert_eq!(qs.len(), n, "{task:?} {split:?}");
        assert!(qs
            .iter()
            .all(|q| q.gold < q.choices.len() && q.choices.len() >= 2));
        // ARC has a few 3- and 5-choice questions; most have 4.
        let most = qs.iter().filter(|q| q.choices.len() == choices).count();
        assert!(
            most * 10 > qs.len() * 9,
            "{task:?}: {most} of {} with {choices} choices",
            qs.len()
        );
    }
    assert!(
        kron_adapters::llm::tasks::load(&dir, TaskKind::Piqa, Test).is_err(),
        "PIQA has no test labels"
    );
}

#[test]
fn sampling_is_seeded_and_respects_top_p() {
    let dev = device();
    let m: LlamaForCausalLM<TB> = model(40, &dev);
    let run =
        |cfg: &GenerateConfig| llm::generate(&m, &[3, 9, 27], cfg, &[], &dev, |_| {}).unwrap();
    let greedy = GenerateConfig::new().with_max_new_tokens(6);
    assert_eq!(run(&greedy), run(&greedy));
    let hot = GenerateConfig::new()
        .with_max_new_tokens(12)
        .with_temperature(5.0)
        .with_seed(1);
    assert_eq!(run(&hot), run(&hot), "same seed, same tokens");
    assert_ne!(
        run(&hot),
        run(&hot.clone().with_seed(2)),
        "another seed, other tokens"
    );
    // top_p this small keeps only the most likely token: greedy.
    let nucleus = GenerateConfig::new()
        .with_max_new_tokens(6)
        .with_temperature(1.0)
        .with_top_p(1e-9);
    assert_eq!(run(&nucleus), run(&greedy));
    // Stops after EOS, which is returned.
    let first = run(&greedy)[0];
    assert_eq!(
        llm::generate(&m, &[3, 9, 27], &greedy, &[first], &dev, |_| {}).unwrap(),
        vec![first]
    );
    // Bad settings and prompts are errors.
    for bad in [
        GenerateConfig::new().with_temperature(0.0),
        GenerateConfig::new().with_top_p(0.0),
        GenerateConfig::new().with_max_new_tokens(1000),
        // The prompt's length plus this overflowed (a panic) before the context was checked.
        GenerateConfig::new().with_max_new_tokens(usize::MAX),
    ] {
        assert!(
            llm::generate(&m, &[3], &bad, &[], &dev, |_| {}).is_err(),
            "{bad:?}"
        );
        assert!(
            llm::generate::generate_batch(
                &m,
                &[vec![3]],
                std::slice::from_ref(&bad),
                &[],
                None,
                &dev
            )
            .is_err(),
            "{bad:?}"
        );
    }
    assert!(llm::generate(&m, &[], &greedy, &[], &dev, |_| {}).is_err());
    assert!(
        llm::generate(&m, &[400], &greedy, &[], &dev, |_| {}).is_err(),
        "out of vocabulary"
    );
}

/// The real SmolLM2-135M-Instruct against `transformers` on the same (dequantized) weights
/// (tests/fixtures/smollm2, made by scripts/make_smollm2_reference.py): tokenizer ids, and the
/// greedy continuation of fixed prompts with and without PEFT LoRA/LoKr adapters. CPU only: on
/// a software Vulkan device a 135M-parameter model is minutes a token; the wgpu suite checks the
/// decoder on the tiny fixtures.
#[cfg(not(feature = "wgpu"))]
#[test]
fn smollm2_tokenizer_and_greedy_continuations_match_transformers() {
    let Some(pkg) = asset(&kron_adapters::finetune::assets::SMOLLM2) else {
        return;
    };
    let gguf = pkg.join(kron_adapters::finetune::assets::SMOLLM2.prefix);
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("smollm2/reference.json")).unwrap())
            .unwrap();
    let tok = TextTokenizer::load(&gguf).unwrap();
    let ids_of = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    for case in reference["tokenizer"]["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let want = ids_of(&case["ids"]);
        assert_eq!(tok.encode(text, false).unwrap(), want, "{text:?}");
        let decoded = case["decoded"].as_str().unwrap_or(text);
        assert_eq!(
            tok.decode(&want, false).unwrap(),
            decoded,
            "round trip {text:?}"
        );
    }
    assert!(!tok.add_bos, "SmolLM2 adds no BOS");
    assert_eq!(tok.eos, vec![2]);
    // Converted back to GGUF metadata — from the GGUF tokenizer, and from its tokenizer.json
    // export read as a Hugging Face folder — it is the file's own: every token, merge and
    // token type, the pre-tokenizer's name and the special ids.
    let file = kron_adapters::store::gguf::GgufFile::read(&gguf).unwrap();
    let dir = scratch_dir("llm", "smollm2-tokenizer");
    for (name, bytes) in tok.hf_files().unwrap() {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
    for (how, t) in [
        ("gguf", &tok),
        ("tokenizer.json", &TextTokenizer::from_hf_dir(&dir).unwrap()),
    ] {
        let meta: std::collections::HashMap<String, _> =
            t.gguf_metadata().unwrap().into_iter().collect();
        for key in [
            "model",
            "pre",
            "tokens",
            "merges",
            "token_type",
            "bos_token_id",
            "eos_token_id",
            "add_bos_token",
        ] {
            let key = format!("tokenizer.ggml.{key}");
            assert_eq!(meta.get(&key), file.get(&key), "{how}: {key}");
        }
        assert_eq!(
            meta.get("tokenizer.chat_template"),
            file.get("tokenizer.chat_template"),
            "{how}"
        );
    }
    let dev = device();
    let base =
        kron_adapters::model::llama::load::<TB>(&gguf, &PlacementConfig::new(), &dev).unwrap();
    let greedy = |m: &LlamaForCausalLM<TB>, prompt: &[u32], n: usize| {
        llm::generate(
            m,
            prompt,
            &GenerateConfig::new().with_max_new_tokens(n),
            &[],
            &dev,
            |_| {},
        )
        .unwrap()
    };
    for case in reference["greedy"]["cases"].as_array().unwrap() {
        let prompt = ids_of(&case["prompt_ids"]);
        let want = ids_of(&case["continuation_ids"]);
        let text = case["prompt_text"].as_str().unwrap();
        assert_eq!(tok.encode(text, false).unwrap(), prompt, "{text:?}");
        assert_eq!(greedy(&base, &prompt, want.len()), want, "{text:?}");
    }
    // The chat template gives transformers' prompt.
    let chat = &reference["greedy"]["cases"][1];
    assert_eq!(
        tok.chat_prompt("What is 2 + 3?").unwrap(),
        chat["prompt_text"].as_str().unwrap()
    );
    for key in ["lora", "lokr"] {
        let adapter = &reference["adapters"][key];
        let case = &adapter["plain"];
        let dir = fixture("smollm2").join(adapter["dir"].as_str().unwrap());
        let file = kron_adapters::read_any(dir).unwrap().into_adapters();
        let m = kron_adapters::attach(base.clone(), &file, &kron_adapters::NameMap::new(), &dev)
            .unwrap();
        let prompt = ids_of(&case["prompt_ids"]);
        let want = ids_of(&case["continuation_ids"]);
        assert_eq!(greedy(&m, &prompt, want.len()), want, "{key}");
    }
}

/// Fine-tuning for multiple choice on a tiny model (any backend, the wgpu suite included): the
/// training loss falls, only adapters change, the best dev evaluation's model is returned.
#[test]
fn multiple_choice_finetuning_lowers_the_loss_and_trains_only_adapters() {
    use kron_adapters::llm::train::{finetune_mc, LlmFinetuneConfig};
    let dev = device();
    let tok = TextTokenizer::from_hf_dir(&fixture("minilm")).unwrap();
    let m: LlamaForCausalLM<AB> = LlamaForCausalLM::new(
        &mut TensorSource::random(2),
        &LlamaConfig::tiny(tok.vocab_size()),
        &PlacementConfig::linear(AdapterConfig::KronLora(KronLoraConfig::auto(2))),
        &dev,
    )
    .unwrap();
    // Questions whose answer is always "yes" after "is it": learnable by the adapters.
    let q = |i: usize| is_it("question", i, [" yes", " no"], 0);
    let train: Vec<Question> = (0..16).map(q).collect();
    let dev_q: Vec<Question> = (16..20).map(q).collect();
    let base_q = to_vec(m.model.layers[0].self_attn.q_proj.base.weight.val());
    let cfg = LlmFinetuneConfig::new()
        .with_lr(0.2)
        .with_batch_size(4)
        .with_epochs(6)
        .with_evals(3);
    let (trained, report) = finetune_mc(m, &tok, &train, &dev_q, &cfg, &dev, &|_| {}).unwrap();
    assert_eq!(report.steps, 24);
    let first: f64 = report.losses[..4].iter().sum::<f64>() / 4.0;
    let last: f64 = report.losses[20..].iter().sum::<f64>() / 4.0;
    // The frozen random head (N(0, 0.02) over 30,522 tokens) caps how far any logit can move
    // (≈ 0.6 nats), so the loss falls little; the choice between " yes" and " no" is learnt.
    assert!(last < first - 0.1, "loss {first} → {last}");
    assert_eq!(report.evals.len(), 3);
    assert_eq!(
        report.best.acc,
        report.evals.iter().map(|e| e.dev_acc).fold(0.0, f64::max)
    );
    assert_eq!(report.best.acc, 1.0, "the rule is learnt");
    assert_eq!(
        to_vec(trained.model.layers[0].self_attn.q_proj.base.weight.val()),
        base_q,
        "the base is frozen"
    );
    // Typed errors for bad runs.
    let bad = LlmFinetuneConfig::new().with_lr(f64::NAN);
    let m2: LlamaForCausalLM<AB> = model(tok.vocab_size(), &dev);
    assert!(finetune_mc(m2.clone(), &tok, &train, &dev_q, &bad, &dev, &|_| {}).is_err());
    assert!(finetune_mc(
        m2,
        &tok,
        &[],
        &dev_q,
        &LlmFinetuneConfig::new(),
        &dev,
        &|_| {}
    )
    .is_err());
    // Each size names itself and its least value.
    for (cfg, field) in [
        (
            LlmFinetuneConfig::new().with_epochs(0),
            "`epochs`: 0: use at least 1",
        ),
        (
            LlmFinetuneConfig::new().with_batch_size(0),
            "`batch_size`: 0",
        ),
        (
            LlmFinetuneConfig::new().with_max_len(1),
            "`max_len`: 1: use at least 2",
        ),
    ] {
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains(field), "{err}");
    }
}

/// Fine-tuning on an int8 base (QLoRA's idea: a tiny random model whose frozen weights are
/// held in int8, on the suite's autodiff backend): the run's losses are its dequantized twin's
/// step by step, its dev evaluations the twin's, the rule is learnt, and the model it returns
/// still holds its frozen weights in int8, unmoved.
#[test]
fn multiple_choice_finetuning_on_an_int8_base_follows_its_dequantized_twin() {
    use kron_adapters::llm::train::{finetune_mc, LlmFinetuneConfig};
    use kron_adapters::quant::{self, burn_scheme_of, Level, QuantConfig};
    #[cfg(feature = "tch")]
    return; // LibTorch stores no Burn quantized tensors.
    #[allow(unreachable_code)]
    let dev = device();
    kron_adapters::kron::autodiff::register_backward::<AB>();
    let tok = TextTokenizer::from_hf_dir(&fixture("minilm")).unwrap();
    let mut source = TensorSource::random(2);
    let int8 = QuantConfig::new(8, Level::Block(16)).unwrap();
    source.quantize_frozen::<AB>(int8, &dev).unwrap();
    let m: LlamaForCausalLM<AB> = LlamaForCausalLM::new(
        &mut source,
        &LlamaConfig::tiny(tok.vocab_size()),
        &PlacementConfig::linear(AdapterConfig::KronLora(KronLoraConfig::auto(2))),
        &dev,
    )
    .unwrap();
    let weight = |m: &LlamaForCausalLM<AB>| m.model.layers[0].mlp.up_proj.base.weight.val();
    assert!(burn_scheme_of(&weight(&m)).is_some(), "int8 weights");
    let twin = quant::dequantized(m.clone());
    let before = to_vec(twin.model.layers[0].mlp.up_proj.base.weight.val());
    let q = |i: usize| is_it("question", i, [" yes", " no"], 0);
    let train: Vec<Question> = (0..16).map(q).collect();
    let dev_q: Vec<Question> = (16..20).map(q).collect();
    let cfg = LlmFinetuneConfig::new()
        .with_lr(0.2)
        .with_batch_size(4)
        .with_epochs(3)
        .with_evals(3);
    let run = |m| finetune_mc(m, &tok, &train, &dev_q, &cfg, &dev, &|_| {}).unwrap();
    let ((trained, report), (_, want)) = (run(m), run(twin));
    assert_eq!(report.steps, 12);
    let (got, expected) = (&report.losses, &want.losses);
    let as_f32 = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<_>>();
    assert_close(&as_f32(got), &as_f32(expected), 1e-3, "losses");
    assert!(got[got.len() - 1] < got[0] - 0.1, "the loss falls: {got:?}");
    let accs = |r: &kron_adapters::llm::train::LlmRunReport| {
        r.evals.iter().map(|e| e.dev_acc).collect::<Vec<_>>()
    };
    assert_eq!(accs(&report), accs(&want), "dev evaluations");
    assert_eq!(report.best.acc, 1.0, "the rule is learnt");
    let w = weight(&trained);
    assert!(burn_scheme_of(&w).is_some(), "still int8");
    assert_eq!(to_vec(quant::float_values(w)), before, "the base is frozen");
}

/// The decoder's loss in parts: the parts' shares of the masked NLL add up to the batch's loss,
/// and their summed gradients are the batch's (what `finetune_mc` trains with on flex and
/// ndarray); bad part counts are rejected.
#[test]
fn decoder_parts_give_the_whole_batchs_gradients() {
    use burn::optim::GradientsParams;
    use kron_adapters::llm::score::{encode_pair, masked_nll, masked_nll_share};
    use kron_adapters::llm::train::LlmFinetuneConfig;
    use kron_adapters::shards;
    let dev = device();
    let tok = TextTokenizer::from_hf_dir(&fixture("minilm")).unwrap();
    let m: LlamaForCausalLM<AB> =
        kron_adapters::training::full_finetune(model(tok.vocab_size(), &dev));
    let conts = [
        " yes",
        " no it is not",
        " maybe so",
        " yes",
        " a longer answer here",
    ];
    let enc: Vec<_> = conts
        .iter()
        .enumerate()
        .map(|(i, c)| encode_pair(&tok, &format!("question {i} : is it"), c, 64).unwrap())
        .collect();
    let items: Vec<_> = enc.iter().collect();
    let tokens: usize = items.iter().map(|e| e.continuation().len()).sum();
    let whole_loss = masked_nll(&m, &items, &dev);
    let whole_value = to_vec(whole_loss.clone())[0] as f64;
    let whole = crate::shards::collect(&m, &GradientsParams::from_grads(whole_loss.backward(), &m));
    assert!(whole.len() > 10);
    for parts in [2, 3] {
        let (grads, shares) = shards::gradients(&m, items.len(), parts, 0, |m, p| {
            let loss = masked_nll_share(m, &items[p.range.clone()], tokens, &dev);
            let v = to_vec(loss.clone())[0] as f64;
            (loss, v)
        })
        .unwrap();
        let total: f64 = shares.iter().sum();
        assert!(
            (total - whole_value).abs() < 1e-5 * whole_value.abs(),
            "{total} vs {whole_value}"
        );
        // f32 rounding through the tiny random decoder differs between batch sizes (~1e-4, as
        // for the encoder in `shards::`); a wrong share or a lost part is off by 20% or more.
        let got = crate::shards::collect(&m, &grads);
        crate::shards::assert_gradients_close(&got, &whole, &format!("{parts} parts"));
    }
    for bad in [0, 9] {
        let cfg = LlmFinetuneConfig {
            batch_parts: Some(bad),
            ..LlmFinetuneConfig::new()
        };
        assert!(cfg.validate().is_err(), "{bad} parts for batches of 8");
    }
}

/// The sequential experiment's mechanism: a second fine-tuning starts from the first stage's
/// adapter file (not a fresh initialisation), trains those adapters only, and leaves the file
/// it started from as it was.
#[test]
fn sequential_finetuning_continues_from_the_first_stages_adapters() {
    use burn::module::AutodiffModule;
    use kron_adapters::llm::train::{finetune_mc, LlmFinetuneConfig};
    use kron_adapters::{attach, NameMap, NativeAdapters};
    let dev = device();
    let tok = TextTokenizer::from_hf_dir(&fixture("minilm")).unwrap();
    let stage1: LlamaForCausalLM<TB> = model(tok.vocab_size(), &dev);
    let file = crate::common::scratch_dir("llm", "sequential").join("stage1.safetensors");
    NativeAdapters::from_model(&stage1).write(&file).unwrap();
    let before = std::fs::read(&file).unwrap();
    // Stage 2 builds the frozen base and attaches stage 1's adapters on the autodiff backend.
    let base: LlamaForCausalLM<AB> = LlamaForCausalLM::new(
        &mut TensorSource::random(11),
        &LlamaConfig::tiny(tok.vocab_size()),
        &PlacementConfig::new(),
        &dev,
    )
    .unwrap();
    let start = attach(
        base,
        &NativeAdapters::read(&file).unwrap(),
        &NameMap::new(),
        &dev,
    )
    .unwrap();
    let ids = Tensor::<AB, 2, Int>::from_data(TensorData::new(vec![3i64, 9, 27, 4], [1, 4]), &dev);
    let ids1 = Tensor::<TB, 2, Int>::from_data(TensorData::new(vec![3i64, 9, 27, 4], [1, 4]), &dev);
    assert_eq!(
        to_vec(start.valid().forward(ids1.clone(), None)),
        to_vec(stage1.forward(ids1, None)),
        "stage 2 starts where stage 1 ended"
    );
    let q = |i: usize| is_it("item", i, [" no", " yes"], 1);
    let train: Vec<Question> = (0..8).map(q).collect();
    let cfg = LlmFinetuneConfig::new()
        .with_lr(0.05)
        .with_batch_size(4)
        .with_epochs(1)
        .with_evals(1);
    let (trained, report) =
        finetune_mc(start, &tok, &train, &train[..2], &cfg, &dev, &|_| {}).unwrap();
    assert_eq!(report.steps, 2);
    assert_eq!(
        report.trainable,
        NativeAdapters::from_model(&stage1).num_params(),
        "stage 1's adapters train, nothing else"
    );
    let stage2 = NativeAdapters::from_model(&trained);
    assert_eq!(
        stage2.meta.layers,
        NativeAdapters::from_model(&stage1).meta.layers,
        "the same layers and shapes"
    );
    assert_ne!(
        to_vec(trained.forward(ids.clone(), None)),
        to_vec(stage1.forward(ids.inner(), None))
    );
    assert_eq!(
        std::fs::read(&file).unwrap(),
        before,
        "stage 1's file is untouched"
    );
}

/// Quantized adapters are evaluated from the file written and read back, not from memory:
/// the reloaded model scores exactly as the dequantized adapters do.
#[test]
fn quantized_adapters_evaluate_from_their_reloaded_file() {
    use kron_adapters::llm::score::{encode_pair, loglikelihoods, Encoded};
    use kron_adapters::quant::{Level, QuantConfig};
    use kron_adapters::store::{read_any, AdapterFile, QuantizedAdapters};
    use kron_adapters::{attach, NameMap, NativeAdapters};
    let dev = device();
    let tok = TextTokenizer::from_hf_dir(&fixture("minilm")).unwrap();
    let trained: LlamaForCausalLM<TB> = model(tok.vocab_size(), &dev);
    let float = NativeAdapters::from_model(&trained);
    let requests: Vec<Encoded> = (0..6)
        .flat_map(|i| {
            ["one", "two", "three"]
                .map(|c| encode_pair(&tok, &format!("q {i} is"), &format!(" {c}"), 64).unwrap())
        })
        .collect();
    let scores = |m: &LlamaForCausalLM<TB>| loglikelihoods(m, &requests, 512, &dev);
    let base = || -> LlamaForCausalLM<TB> {
        LlamaForCausalLM::new(
            &mut TensorSource::random(11),
            &LlamaConfig::tiny(tok.vocab_size()),
            &PlacementConfig::new(),
            &dev,
        )
        .unwrap()
    };
    let dir = crate::common::scratch_dir("llm", "quant_eval");
    for (bits, level) in [(8, Level::Tensor), (4, Level::Block(32))] {
        let cfg = QuantConfig::new(bits, level).unwrap();
        let q = QuantizedAdapters::quantize(&float, cfg).unwrap();
        let path = dir.join(format!("q{bits}.safetensors"));
        kron_adapters::store::st::write_atomic(&path, &q.to_bytes().unwrap()).unwrap();
        let file = read_any(&path).unwrap();
        assert!(
            matches!(file, AdapterFile::Quantized(_)),
            "the file reads back as quantized"
        );
        let from_file = attach(base(), &file.into_adapters(), &NameMap::new(), &dev).unwrap();
        let in_memory = attach(base(), &q.dequantize(), &NameMap::new(), &dev).unwrap();
        let (a, b) = (scores(&from_file), scores(&in_memory));
        assert_eq!(
            a, b,
            "{bits}-bit: reloaded and in-memory adapters score alike"
        );
        // The quantization changes the scores a little (else quantization went unmeasured).
        let f = scores(&attach(base(), &float, &NameMap::new(), &dev).unwrap());
        assert_ne!(a, f, "{bits}-bit");
    }
}

/// A GGUF file holding only tokenizer metadata: `tokens` and `merges` of a GPT-2 BPE.
fn gguf_tokenizer(tokens: &[&str], merges: &[&str]) -> Vec<u8> {
    let string = |b: &mut Vec<u8>, s: &str| {
        b.extend((s.len() as u64).to_le_bytes());
        b.extend(s.as_bytes());
    };
    let strings = |b: &mut Vec<u8>, key: &str, items: &[&str]| {
        string(b, key);
        b.extend(9u32.to_le_bytes()); // array
        b.extend(8u32.to_le_bytes()); // of strings
        b.extend((items.len() as u64).to_le_bytes());
        items.iter().for_each(|s| string(b, s));
    };
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend(0u64.to_le_bytes()); // tensors
    b.extend(3u64.to_le_bytes()); // metadata entries
    string(&mut b, "tokenizer.ggml.model");
    b.extend(8u32.to_le_bytes());
    string(&mut b, "gpt2");
    strings(&mut b, "tokenizer.ggml.tokens", tokens);
    strings(&mut b, "tokenizer.ggml.merges", merges);
    b
}

/// Damaged or hostile tokenizer files — `tokenizer.json` for the encoder's and the decoder's
/// loaders, GGUF metadata for the decoder's — are format errors naming the file and the part,
/// where the `tokenizers` crate (0.23) panicked at load or at the first text: found by the
/// `tokenizer_json` fuzz target and in the crate's own tracker (pull request 2151).
#[test]
fn damaged_tokenizer_files_are_refused_by_name() {
    use kron_adapters::finetune::tokenize::TextEncoder;
    use kron_adapters::store::gguf::GgufFile;
    use kron_adapters::AdapterError;
    use serde_json::{json, Value};

    let text = std::fs::read_to_string(fixture("minilm/tokenizer.json")).unwrap();
    let at = text.find(r#""decoder":{"type":"WordPiece""#).unwrap() + 20;
    let minilm = |edit: &dyn Fn(&mut Value)| {
        let mut v: Value = serde_json::from_str(&text).unwrap();
        edit(&mut v);
        v.to_string()
    };
    let bpe = |merges: Value, edit: &dyn Fn(&mut Value)| {
        let mut v = json!({
            "version": "1.0", "added_tokens": [], "normalizer": null, "pre_tokenizer": null,
            "post_processor": null, "decoder": null,
            "model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2, "##b": 3}, "merges": merges},
        });
        edit(&mut v);
        v.to_string()
    };
    let cases: Vec<(&str, String)> = vec![
        // A download cut short inside `decoder`, and a bad escape there.
        ("not JSON", text[..at].to_string()),
        (
            "not JSON",
            format!(r#"{}\ud800{}"#, &text[..at], &text[at..]),
        ),
        // Templates naming a special token they do not define (also inside a Sequence of
        // processors); a single template using the second text; ids and tokens in different
        // numbers (refused as the crate's own constructor does).
        (
            "[XYZ]",
            minilm(&|v| v["post_processor"]["single"][0]["SpecialToken"]["id"] = "[XYZ]".into()),
        ),
        (
            "[XYZ]",
            minilm(&|v| {
                let p = v["post_processor"].take();
                v["post_processor"] = json!({"type": "Sequence", "processors": [p]});
                v["post_processor"]["processors"][0]["single"][0]["SpecialToken"]["id"] =
                    "[XYZ]".into();
            }),
        ),
        (
            "sequence B",
            minilm(&|v| v["post_processor"]["single"][1]["Sequence"]["id"] = "B".into()),
        ),
        (
            "ids and",
            minilm(&|v| v["post_processor"]["special_tokens"]["[CLS]"]["tokens"] = json!([])),
        ),
        // A merge making a token longer than every token (overran the crate's buffer), as pairs
        // and as lines; and one whose second half is shorter than the continuation prefix.
        ("\"abab\"", bpe(json!([["a", "b"], ["ab", "ab"]]), &|_| {})),
        ("\"abab\"", bpe(json!(["a b", "ab ab"]), &|_| {})),
        (
            "prefix",
            bpe(json!([["a", "b"]]), &|v| {
                v["model"]["continuing_subword_prefix"] = "###".into()
            }),
        ),
        // Any Precompiled normalizer (its binary map is trusted: this one asks for 8 GB); a
        // fixed-length split of length 0; a Strip decoder stripping at the end (a token made
        // of its `content` alone, shorter than start + stop, is sliced backwards).
        (
            "Precompiled",
            minilm(&|v| {
                v["normalizer"] = json!({"type": "Sequence", "normalizers": [
                {"type": "Precompiled", "precompiled_charsmap": "/////w=="}]})
            }),
        ),
        (
            "FixedLength",
            minilm(&|v| v["pre_tokenizer"] = json!({"type": "FixedLength", "length": 0})),
        ),
        (
            "Strip",
            minilm(&|v| {
                v["decoder"] = json!({"type": "Sequence", "decoders": [
                v["decoder"].clone(), {"type": "Strip", "content": "a", "start": 1, "stop": 1}]})
            }),
        ),
    ];
    let dir = scratch_dir("llm", "damaged-tokenizer");
    let path = dir.join("tokenizer.json");
    let refused = |what: &str, r: Result<(), AdapterError>| match r {
        Err(e @ AdapterError::Format { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("tokenizer.json"), "{msg}");
            assert!(msg.contains(what), "{what}: {msg}");
        }
        Err(e) => panic!("{what}: {e}"),
        Ok(()) => panic!("{what}: a damaged tokenizer.json loaded"),
    };
    for (what, damaged) in &cases {
        std::fs::write(&path, damaged).unwrap();
        refused(what, TextEncoder::from_file(&path, 16).map(|_| ()));
        refused(what, TextTokenizer::from_hf_dir(&dir).map(|_| ()));
    }
    // The undamaged files load (the MiniLM one encodes), so the refusals are the damage's.
    std::fs::write(&path, minilm(&|_| {})).unwrap();
    let enc = TextEncoder::from_file(&path, 16).unwrap();
    assert_eq!(enc.encode("hello").unwrap(), vec![101, 7592, 102]);
    std::fs::write(&path, bpe(json!([["a", "b"]]), &|_| {})).unwrap();
    TextTokenizer::from_hf_dir(&dir).unwrap();

    // The decoder's GGUF tokenizer builds its BPE through the same merge check.
    let gguf = |merges: &[&str]| {
        let file =
            GgufFile::from_bytes("t.gguf", gguf_tokenizer(&["a", "b", "ab"], merges)).unwrap();
        TextTokenizer::from_gguf(&file, "t.gguf").map(|_| ())
    };
    gguf(&["a b"]).unwrap();
    match gguf(&["a b", "ab ab"]) {
        Err(e @ AdapterError::Format { .. }) => {
            let msg = e.to_string();
            assert!(
                msg.contains("tokenizer.ggml.merges") && msg.contains("\"abab\""),
                "{msg}"
            )
        }
        other => panic!("{other:?}"),
    }

    // A vocabulary numbered with a gap near 2³² loads (its ids are the file's), but is not
    // exported: writing it back walked every missing id (gigabytes).
    let mut v: Value = serde_json::from_str(&bpe(json!([["a", "b"]]), &|_| {})).unwrap();
    v["model"]["vocab"]["far"] = json!(4_000_000_000u32);
    std::fs::write(&path, v.to_string()).unwrap();
    let tok = TextTokenizer::from_hf_dir(&dir).unwrap();
    match tok.hf_files() {
        Err(e @ AdapterError::Format { .. }) => {
            assert!(e.to_string().contains("4000000000"), "{e}")
        }
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("a vocabulary with a gap of 2^32 exported"),
    }
    // Nor converted to GGUF metadata, which serializes it first (an out-of-memory the
    // `tokenizer_json` fuzz target found).
    match tok.gguf_metadata() {
        Err(e @ AdapterError::Format { .. }) => {
            assert!(e.to_string().contains("4000000000"), "{e}")
        }
        other => panic!("{:?}", other.map(|m| m.len())),
    }
}

/// Byte-level BPE tokenizers convert to GGUF metadata (`gguf_metadata`, what `export-gguf`
/// writes for a Hugging Face folder) and back, for each pre-tokenizer llama.cpp names that the
/// GGUF reader builds; from a GGUF tokenizer and from its `tokenizer.json` export alike, the
/// metadata is the original and the ids are the same. Other tokenizers are refused.
#[test]
fn bpe_tokenizers_convert_to_gguf_metadata_and_back() {
    use kron_adapters::store::gguf::{self, GgufFile, GgufValue};
    use kron_adapters::AdapterError;
    let strings =
        |v: &[&str]| GgufValue::Array(v.iter().map(|s| GgufValue::String(s.to_string())).collect());
    let tokens = [
        "<s>",
        "</s>",
        "a",
        "b",
        "1",
        "2",
        "\u{120}",
        "ab",
        "\u{120}a",
        "\u{120}ab",
    ];
    let types: Vec<GgufValue> = (0..tokens.len())
        .map(|i| GgufValue::I32(if i < 2 { 3 } else { 1 }))
        .collect();
    let dir = scratch_dir("llm", "gguf-tokenizer");
    for pre in ["smollm", "llama-bpe", "gpt-2"] {
        let key = |k: &str| format!("tokenizer.ggml.{k}");
        let meta = vec![
            (key("model"), GgufValue::String("gpt2".into())),
            (key("pre"), GgufValue::String(pre.into())),
            (key("tokens"), strings(&tokens)),
            (key("token_type"), GgufValue::Array(types.clone())),
            (key("merges"), strings(&["a b", "\u{120} ab", "\u{120} a"])),
            (key("add_bos_token"), GgufValue::Bool(true)),
            (key("bos_token_id"), GgufValue::U32(0)),
            (key("eos_token_id"), GgufValue::U32(1)),
            (
                "tokenizer.chat_template".into(),
                GgufValue::String("{{ x }}".into()),
            ),
        ];
        let file = GgufFile::from_bytes("t.gguf", gguf::to_bytes(&meta, &[]).unwrap()).unwrap();
        let original = TextTokenizer::from_gguf(&file, "t.gguf").unwrap();
        for (name, bytes) in original.hf_files().unwrap() {
            std::fs::write(dir.join(name), bytes).unwrap();
        }
        let text = "ab ab a12<s>";
        let want = original.encode(text, true).unwrap();
        assert_eq!(want[..3], [0, 7, 9], "{pre}: BOS, then `ab`, ` ab`");
        for (how, t) in [
            ("gguf", original),
            ("tokenizer.json", TextTokenizer::from_hf_dir(&dir).unwrap()),
        ] {
            let back = t.gguf_metadata().unwrap();
            for (k, v) in &meta {
                let got = back.iter().find(|(bk, _)| bk == k).map(|(_, v)| v);
                assert_eq!(got, Some(v), "{pre} from {how}: {k}");
            }
            let file = GgufFile::from_bytes("u.gguf", gguf::to_bytes(&back, &[]).unwrap()).unwrap();
            let again = TextTokenizer::from_gguf(&file, "u.gguf").unwrap();
            assert_eq!(again.encode(text, true).unwrap(), want, "{pre} from {how}");
        }
    }
    // A merge whose left token holds a space: a GGUF merge string (split at its first space
    // after the first character) cannot hold it.
    let original_json = std::fs::read(dir.join("tokenizer.json")).unwrap();
    let mut json: serde_json::Value = serde_json::from_slice(&original_json).unwrap();
    let n = tokens.len();
    json["model"]["vocab"]["x y"] = n.into();
    json["model"]["vocab"]["x yb"] = (n + 1).into();
    json["model"]["merges"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!(["x y", "b"]));
    std::fs::write(dir.join("tokenizer.json"), json.to_string()).unwrap();
    match TextTokenizer::from_hf_dir(&dir).unwrap().gguf_metadata() {
        Err(e @ AdapterError::Unsupported { .. }) => {
            assert!(e.to_string().contains("\"x y\""), "{e}")
        }
        other => panic!("{:?}", other.map(|m| m.len())),
    }
    std::fs::write(dir.join("tokenizer.json"), original_json).unwrap();
    // Two tokens sharing an id (a damaged vocabulary the `tokenizers` crate loads): no GGUF
    // form, whose token list numbers the tokens (found by the `tokenizer_json` fuzz target).
    let mut json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("tokenizer.json")).unwrap()).unwrap();
    json["model"]["vocab"]["b"] = json["model"]["vocab"]["a"].clone();
    std::fs::write(dir.join("tokenizer.json"), json.to_string()).unwrap();
    let shared = TextTokenizer::from_hf_dir(&dir).unwrap();
    match shared.gguf_metadata() {
        Err(e @ AdapterError::Unsupported { .. }) => {
            assert!(e.to_string().contains("share an id"), "{e}")
        }
        other => panic!("{:?}", other.map(|m| m.len())),
    }
    // A WordPiece tokenizer (MiniLM's) has no GGUF form here.
    let minilm = TextTokenizer::from_hf_dir(&fixture("minilm")).unwrap();
    assert!(matches!(
        minilm.gguf_metadata(),
        Err(AdapterError::Unsupported { .. })
    ));
}

/// A SentencePiece tokenizer from GGUF metadata (`tokenizer.ggml.model` `llama`: Llama 2,
/// Mistral, TinyLlama) gives the ids `sentencepiece` gives and decodes them back, byte
/// fallback, leading and repeated spaces, digits and scripts outside the pieces included
/// (tests/fixtures/spm, made by scripts/make_spm_gguf_fixture.py with Llama 2's settings).
#[test]
fn sentencepiece_gguf_tokenizer_matches_sentencepiece() {
    use kron_adapters::store::gguf::GgufFile;
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("spm/reference.json")).unwrap())
            .unwrap();
    let tok = TextTokenizer::load(fixture("spm/tokenizer.gguf")).unwrap();
    assert_eq!(tok.vocab_size(), 600);
    assert_eq!(
        (tok.bos, tok.eos.clone(), tok.add_bos),
        (Some(1), vec![2], true)
    );
    for case in reference["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(tok.encode(text, false).unwrap(), want, "{text:?}");
        let mut with_bos = vec![1];
        with_bos.extend(&want);
        assert_eq!(tok.encode(text, true).unwrap(), with_bos, "{text:?}");
        assert_eq!(
            tok.decode(&with_bos, true).unwrap(),
            case["decoded"].as_str().unwrap(),
            "{text:?}"
        );
    }
    // Control tokens in a text are tokens; unequal scores and tokens are refused.
    assert_eq!(tok.encode("</s>", false).unwrap(), vec![2]);
    let mut file = GgufFile::read(fixture("spm/tokenizer.gguf")).unwrap();
    if let Some(kron_adapters::store::gguf::GgufValue::Array(scores)) =
        file.metadata.get_mut("tokenizer.ggml.scores")
    {
        scores.pop();
    }
    let err = TextTokenizer::from_gguf(&file, "t.gguf").err().unwrap();
    assert!(
        err.to_string().contains("599 scores for 600 tokens"),
        "{err}"
    );
}

/// The ids and decodings of tests/fixtures/spm's `reference.json` (or `hf/reference.json`).
fn spm_cases(path: &str) -> Vec<(String, Vec<u32>, String)> {
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture(path)).unwrap()).unwrap();
    reference["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let ids = c["ids"].as_array().unwrap();
            (
                c["text"].as_str().unwrap().to_string(),
                ids.iter().map(|v| v.as_u64().unwrap() as u32).collect(),
                c["decoded"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// SentencePiece-style tokenizers (Llama 2, Mistral) convert to GGUF metadata that tokenizes
/// as `sentencepiece` does (and so as llama.cpp does, from the same pieces and types as its
/// converter writes): from the GGUF fixture, from this crate's `tokenizer.json` export of it,
/// and from the folder `transformers` 5 writes for the same model (a `Metaspace`
/// pre-tokenizer; no `add_bos_token`, the post-processor adds BOS), which itself tokenizes as
/// `transformers` does (tests/fixtures/spm/hf, scripts/make_spm_gguf_fixture.py).
#[test]
fn sentencepiece_tokenizers_convert_to_gguf_metadata_and_back() {
    use kron_adapters::store::gguf::{self, GgufFile, GgufValue};
    let original = GgufFile::read(fixture("spm/tokenizer.gguf")).unwrap();
    let from_gguf = TextTokenizer::from_gguf(&original, "spm.gguf").unwrap();
    let dir = scratch_dir("llm", "spm-export");
    for (name, bytes) in from_gguf.hf_files().unwrap() {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
    let exported = TextTokenizer::from_hf_dir(&dir).unwrap();
    let hf = TextTokenizer::from_hf_dir(&fixture("spm/hf")).unwrap();
    assert_eq!(
        (hf.bos, hf.add_bos),
        (Some(1), true),
        "BOS from the post-processor"
    );
    for (text, ids, decoded) in spm_cases("spm/hf/reference.json") {
        assert_eq!(
            hf.encode(&text, false).unwrap(),
            ids,
            "transformers: {text:?}"
        );
        assert_eq!(
            hf.decode(&ids, true).unwrap(),
            decoded,
            "transformers: {text:?}"
        );
    }
    let get = |meta: &[(String, GgufValue)], k: &str| {
        meta.iter()
            .find(|(key, _)| key == &format!("tokenizer.ggml.{k}"))
            .map(|(_, v)| v.clone())
    };
    let scores = |v: Option<GgufValue>| -> Vec<f64> {
        v.unwrap()
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_f64().unwrap())
            .collect()
    };
    let want_scores = scores(original.get("tokenizer.ggml.scores").cloned());
    let from_gguf_meta = from_gguf.gguf_metadata().unwrap();
    assert_eq!(exported.gguf_metadata().unwrap(), from_gguf_meta);
    for (how, tok) in [("gguf", &from_gguf), ("transformers", &hf)] {
        let meta = tok.gguf_metadata().unwrap();
        assert_eq!(get(&meta, "model"), Some(GgufValue::String("llama".into())));
        assert_eq!(get(&meta, "add_space_prefix"), Some(GgufValue::Bool(true)));
        assert_eq!(
            get(&meta, "pre"),
            None,
            "{how}: llama.cpp's converter writes none"
        );
        for k in [
            "tokens",
            "token_type",
            "unknown_token_id",
            "bos_token_id",
            "eos_token_id",
        ] {
            assert_eq!(
                get(&meta, k).as_ref(),
                original.get(&format!("tokenizer.ggml.{k}")),
                "{how}: {k}"
            );
        }
        assert_eq!(get(&meta, "add_bos_token"), Some(GgufValue::Bool(true)));
        // Merged pieces keep sentencepiece's order (the scores themselves are ranks).
        let got = scores(get(&meta, "scores"));
        let merged: Vec<usize> = (0..got.len()).filter(|&i| got[i] != 0.0).collect();
        assert!(merged.len() > 200, "{how}: {} merged pieces", merged.len());
        for &i in &merged {
            for &j in &merged {
                if want_scores[i] > want_scores[j] {
                    assert!(got[i] > got[j], "{how}: pieces {i} and {j}");
                }
            }
        }
        let file = GgufFile::from_bytes("u.gguf", gguf::to_bytes(&meta, &[]).unwrap()).unwrap();
        let back = TextTokenizer::from_gguf(&file, "u.gguf").unwrap();
        for (text, ids, decoded) in spm_cases("spm/reference.json") {
            let mut with_bos = vec![1];
            with_bos.extend(&ids);
            assert_eq!(
                back.encode(&text, true).unwrap(),
                with_bos,
                "{how}: {text:?}"
            );
            assert_eq!(back.decode(&ids, true).unwrap(), decoded, "{how}: {text:?}");
        }
    }
    // Without the space prefix: a folder whose normalizer only replaces spaces.
    let mut json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("tokenizer.json")).unwrap()).unwrap();
    let replace = json["normalizer"]["normalizers"][1].clone();
    assert_eq!(replace["type"], "Replace");
    json["normalizer"] = replace;
    std::fs::write(dir.join("tokenizer.json"), json.to_string()).unwrap();
    let meta = TextTokenizer::from_hf_dir(&dir)
        .unwrap()
        .gguf_metadata()
        .unwrap();
    assert_eq!(get(&meta, "add_space_prefix"), Some(GgufValue::Bool(false)));
    let file = GgufFile::from_bytes("p.gguf", gguf::to_bytes(&meta, &[]).unwrap()).unwrap();
    let back = TextTokenizer::from_gguf(&file, "p.gguf").unwrap();
    let (with, without) = (
        from_gguf.encode("Hello world", false).unwrap(),
        back.encode("Hello world", false).unwrap(),
    );
    assert_ne!(with, without, "`▁Hello` against `Hello`");
    assert_eq!(back.decode(&without, false).unwrap(), "Hello world");
    std::fs::remove_dir_all(dir).ok();
}
