//! Checkpoints: the whole module through Burn's recorders, adapter-only safetensors files, and
//! the errors of files that do not match.

use crate::common::*;

use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::record::{FullPrecisionSettings, NamedMpkFileRecorder};
use kron_adapters::store::{read_meta, save_params_matching, CheckpointMeta};
use kron_adapters::{
    load_adapters, save_adapters, AdaptedLinear, AdapterConfig, AdapterError, FactorInit,
    KronAConfig, KronLoraConfig, LoraConfig, Method,
};

fn tmpdir(name: &str) -> std::path::PathBuf {
    scratch_dir("ckpt", name)
}

fn base(rng: &mut Rng, d_in: usize, d_out: usize) -> Linear<TB> {
    let dev = device();
    let mut l = LinearConfig::new(d_in, d_out).init::<TB>(&dev);
    l.weight = l.weight.map(|_| randn::<TB, 2>(rng, [d_in, d_out], &dev));
    l.bias = l
        .bias
        .map(|p| p.map(|_| randn::<TB, 1>(rng, [d_out], &dev)));
    l
}

/// An adapter with non-zero factors (Normal init), so a wrong load would show.
fn configs() -> Vec<AdapterConfig> {
    vec![
        AdapterConfig::KronA(
            KronAConfig::new([6, 8], [8, 12])
                .with_init(FactorInit::Normal)
                .with_scale(0.5),
        ),
        AdapterConfig::KronLora(
            KronLoraConfig::auto(2)
                .with_alpha(4.0)
                .with_init(FactorInit::Normal),
        ),
        AdapterConfig::Lora(
            LoraConfig::new(4)
                .with_alpha(8.0)
                .with_init(FactorInit::Normal),
        ),
    ]
}

#[test]
fn whole_module_recorder_round_trip_is_bit_exact() {
    let dir = tmpdir("rec");
    let dev = device();
    let mut rng = Rng::new(30);
    for (i, cfg) in configs().into_iter().enumerate() {
        let layer = AdaptedLinear::new(base(&mut rng, 48, 96), &cfg, &dev).unwrap();
        let recorder = NamedMpkFileRecorder::<FullPrecisionSettings>::new();
        let path = dir.join(format!("full{i}"));
        layer.clone().save_file(&path, &recorder).unwrap();
        // Load into a differently initialised model of the same shape.
        let fresh = AdaptedLinear::new(base(&mut rng, 48, 96), &cfg, &dev).unwrap();
        let loaded = fresh.load_file(&path, &recorder, &dev).unwrap();
        assert_eq!(
            to_vec(loaded.base.weight.val()),
            to_vec(layer.base.weight.val())
        );
        assert_eq!(to_vec(loaded.delta_weight()), to_vec(layer.delta_weight()));
        let x = randn::<TB, 3>(&mut rng, [2, 3, 48], &dev);
        assert_eq!(
            to_vec(loaded.forward(x.clone())),
            to_vec(layer.forward(x)),
            "{cfg:?}"
        );
    }
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn adapter_only_file_reproduces_outputs_in_a_fresh_model() {
    let dir = tmpdir("adp");
    let dev = device();
    let mut rng = Rng::new(31);
    for (i, cfg) in configs().into_iter().enumerate() {
        let lin = base(&mut rng, 48, 96);
        let trained = AdaptedLinear::new(lin.clone(), &cfg, &dev).unwrap();
        let path = dir.join(format!("adapter{i}.safetensors"));
        let size = save_adapters(&trained, &path).unwrap();
        assert_eq!(size, std::fs::metadata(&path).unwrap().len());

        // A fresh model from the same base and config, with other random factors.
        let fresh = AdaptedLinear::new(lin, &cfg, &dev).unwrap();
        assert_ne!(to_vec(fresh.delta_weight()), to_vec(trained.delta_weight()));
        let loaded = load_adapters(fresh, &path).unwrap();
        let x = randn::<TB, 3>(&mut rng, [2, 5, 48], &dev);
        assert_eq!(
            to_vec(loaded.forward(x.clone())),
            to_vec(trained.forward(x)),
            "{cfg:?}"
        );

        let meta = read_meta(&path).unwrap().expect("metadata");
        assert_eq!(meta.layers.get("").unwrap(), &trained.spec().unwrap());
    }
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn adapter_file_is_far_smaller_than_the_model() {
    let dir = tmpdir("size");
    let dev = device();
    let lin = LinearConfig::new(768, 768).init::<TB>(&dev);
    let layer = AdaptedLinear::new(
        lin,
        &AdapterConfig::KronA(KronAConfig::new([32, 24], [24, 32])),
        &dev,
    )
    .unwrap();
    let adapter = save_adapters(&layer, dir.join("a.safetensors")).unwrap();
    let recorder = NamedMpkFileRecorder::<FullPrecisionSettings>::new();
    layer
        .clone()
        .save_file(dir.join("full"), &recorder)
        .unwrap();
    let full = std::fs::metadata(dir.join("full.mpk")).unwrap().len();
    // 1536 floats + header vs 590k floats.
    assert!(adapter < 8 * 1024, "adapter file {adapter} B");
    assert!(adapter * 200 < full, "adapter {adapter} B vs full {full} B");
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn shape_mismatch_names_the_parameter_and_both_shapes() {
    let dir = tmpdir("shape");
    let dev = device();
    let mut rng = Rng::new(32);
    let lin = base(&mut rng, 48, 96);
    let saved = AdaptedLinear::new(
        lin.clone(),
        &AdapterConfig::KronA(KronAConfig::new([6, 8], [8, 12])),
        &dev,
    )
    .unwrap();
    let path = dir.join("a.safetensors");
    save_adapters(&saved, &path).unwrap();
    let other = AdaptedLinear::new(
        lin,
        &AdapterConfig::KronA(KronAConfig::new([4, 8], [12, 12])),
        &dev,
    )
    .unwrap();
    let err = load_adapters(other, &path).unwrap_err();
    let AdapterError::CheckpointShape {
        param,
        expected,
        found,
        ..
    } = &err
    else {
        panic!("{err}")
    };
    assert_eq!(
        param, "a",
        "a lone layer's factors are keyed by factor name"
    );
    assert_eq!(
        (expected.as_slice(), found.as_slice()),
        (&[4usize, 8][..], &[6usize, 8][..])
    );
    let msg = err.to_string();
    assert!(
        msg.contains("`a`") && msg.contains("[6, 8]") && msg.contains("[4, 8]"),
        "{msg}"
    );
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn other_method_scale_or_missing_tensors_are_refused() {
    let dir = tmpdir("mismatch");
    let dev = device();
    let mut rng = Rng::new(33);
    let lin = base(&mut rng, 48, 96);
    let krona = AdapterConfig::KronA(KronAConfig::new([6, 8], [8, 12]));
    let saved = AdaptedLinear::new(lin.clone(), &krona, &dev).unwrap();
    let path = dir.join("a.safetensors");
    save_adapters(&saved, &path).unwrap();

    // A LoRA model cannot take a KronA file: every tensor is missing or unexpected.
    let lora =
        AdaptedLinear::new(lin.clone(), &AdapterConfig::Lora(LoraConfig::new(2)), &dev).unwrap();
    let err = load_adapters(lora, &path).unwrap_err();
    let AdapterError::CheckpointMismatch {
        missing,
        unexpected,
        ..
    } = &err
    else {
        panic!("{err}")
    };
    assert_eq!(missing, &vec!["down".to_string(), "up".to_string()]);
    assert_eq!(unexpected, &vec!["a".to_string(), "b".to_string()]);

    // Same shapes, different scale: the metadata check catches it.
    let scaled = AdaptedLinear::new(
        lin.clone(),
        &AdapterConfig::KronA(KronAConfig::new([6, 8], [8, 12]).with_scale(2.0)),
        &dev,
    )
    .unwrap();
    let err = load_adapters(scaled, &path).unwrap_err();
    assert!(matches!(err, AdapterError::CheckpointMeta { .. }), "{err}");
    assert!(
        err.to_string().contains("scale 1") && err.to_string().contains("scale 2"),
        "{err}"
    );

    // A file with only part of the adapter: refused when read, naming what is missing.
    let partial = dir.join("partial.safetensors");
    let full = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&full).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&full).unwrap();
    let a = st.tensor("a").unwrap();
    safetensors::serialize_to_file(vec![("a", a)], header.metadata().clone(), &partial).unwrap();
    let fresh = AdaptedLinear::new(lin.clone(), &krona, &dev).unwrap();
    let err = load_adapters(fresh, &partial).unwrap_err();
    let AdapterError::CheckpointMismatch {
        missing,
        unexpected,
        ..
    } = &err
    else {
        panic!("{err}")
    };
    assert_eq!(
        (missing.clone(), unexpected.len()),
        (vec!["b".to_string()], 0)
    );

    // A model without an adapter, with metadata that describes one.
    let frozen = AdaptedLinear::frozen(lin);
    let err = load_adapters(frozen, &path).unwrap_err();
    assert!(
        matches!(err, AdapterError::CheckpointMismatch { .. }),
        "{err}"
    );
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn corrupt_missing_and_unwritable_files_are_errors_without_side_effects() {
    let dir = tmpdir("corrupt");
    let dev = device();
    let mut rng = Rng::new(34);
    let layer = AdaptedLinear::new(base(&mut rng, 48, 96), &configs()[0], &dev).unwrap();
    let path = dir.join("a.safetensors");
    save_adapters(&layer, &path).unwrap();
    let bytes = std::fs::read(&path).unwrap();

    // Truncated, garbage, and bad metadata JSON.
    let cut = dir.join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    assert!(matches!(
        load_adapters(layer.clone(), &cut),
        Err(AdapterError::Format { .. })
    ));
    std::fs::write(&cut, b"not a safetensors file at all").unwrap();
    assert!(matches!(
        load_adapters(layer.clone(), &cut),
        Err(AdapterError::Format { .. })
    ));
    std::fs::write(&cut, [8u8, 0, 0, 0, 0, 0, 0, 0]).unwrap();
    assert!(matches!(
        load_adapters(layer.clone(), &cut),
        Err(AdapterError::Format { .. })
    ));
    let bad_meta = dir.join("meta.safetensors");
    save_params_matching(
        &layer,
        &bad_meta,
        &[kron_adapters::store::ADAPTER_PATTERN],
        &CheckpointMeta::new(vec![]),
    )
    .unwrap();
    let mut raw = std::fs::read(&bad_meta).unwrap();
    let pattern = br#"\"layers\""#;
    let at = raw
        .windows(pattern.len())
        .position(|w| w == pattern)
        .expect("layers in header");
    raw[at + 2] = b'X'; // corrupt the JSON key inside the metadata string
    std::fs::write(&bad_meta, &raw).unwrap();
    let e = load_adapters(layer.clone(), &bad_meta).unwrap_err();
    assert!(matches!(e, AdapterError::Format { .. }), "{e}");

    // Missing file.
    let e = load_adapters(layer.clone(), dir.join("nope.safetensors")).unwrap_err();
    assert!(
        matches!(e, AdapterError::Io { .. }) && e.to_string().contains("nope.safetensors"),
        "{e}"
    );

    // Unwritable destination: an error and no file, temporary or final.
    let target = dir.join("no-such-dir").join("a.safetensors");
    assert!(matches!(
        save_adapters(&layer, &target),
        Err(AdapterError::Io { .. })
    ));
    assert!(!target.exists());
    // Saving over an existing file replaces it whole.
    save_adapters(&layer, &path).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), bytes);
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty());
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn metadata_is_json_with_specs() {
    let dir = tmpdir("meta");
    let dev = device();
    let layer = AdaptedLinear::new(
        LinearConfig::new(48, 96).init::<TB>(&dev),
        &configs()[1],
        &dev,
    )
    .unwrap();
    let path = dir.join("a.safetensors");
    save_adapters(&layer, &path).unwrap();
    let meta = read_meta(&path).unwrap().unwrap();
    assert_eq!(meta.version, env!("CARGO_PKG_VERSION"));
    let spec = &meta.layers[""];
    assert_eq!((spec.method, spec.scale), (Method::KronLora, 2.0));
    let _ = layer.num_params();
    std::fs::remove_dir_all(dir).ok();
}

/// A valid adapter file's bytes with its `kron_adapters` metadata edited by `edit` (tensors
/// untouched): well-formed tensors, inconsistent specs.
pub fn with_edited_meta(bytes: &[u8], edit: impl Fn(&mut serde_json::Value)) -> Vec<u8> {
    use kron_adapters::store::st;
    let mut meta = st::metadata("x", bytes).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&meta["kron_adapters"]).unwrap();
    edit(&mut json);
    meta.insert("kron_adapters".into(), json.to_string());
    let tensors = st::parse("x", bytes).unwrap();
    let entries: Vec<st::Entry<&[u8]>> = tensors
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data()))
        .collect();
    st::serialize("x", &entries, meta).unwrap()
}

/// An edit of a file's metadata.
pub type MetaEdit = Box<dyn Fn(&mut serde_json::Value)>;

/// Specs a file can claim that no adapter has, each with the tensors left well formed.
pub fn inconsistent_specs() -> Vec<(&'static str, MetaEdit)> {
    vec![
        (
            "factor count",
            Box::new(|m| {
                m["layers"][""]["factors"].as_array_mut().unwrap().pop();
            }),
        ),
        (
            "factor names",
            Box::new(|m| m["layers"][""]["factors"][0][0] = "z".into()),
        ),
        ("d_in", Box::new(|m| m["layers"][""]["d_in"] = 47.into())),
        (
            "method",
            Box::new(|m| m["layers"][""]["method"] = "lora".into()),
        ),
        (
            "scale NaN",
            Box::new(|m| m["layers"][""]["scale"] = "NaN".into()),
        ),
        (
            "scale absurd",
            Box::new(|m| m["layers"][""]["scale"] = 1e300.into()),
        ),
        (
            "huge layer",
            Box::new(|m| {
                m["layers"][""]["d_in"] = (1u64 << 40).into();
                m["layers"][""]["factors"][0][1] = serde_json::json!([1u64 << 37, 8]);
            }),
        ),
        (
            "chain",
            Box::new(|m| m["layers"][""]["factors"][2][1] = serde_json::json!([3, 12])),
        ),
    ]
}

/// Review defect: adapter files whose tensors are well formed but whose metadata is
/// inconsistent reached `assert!`s and index panics in export and merge. Every reader now
/// validates every spec and returns a typed error; export and merge never see such a spec.
#[test]
fn inconsistent_metadata_is_a_typed_error_in_every_reader() {
    use kron_adapters::quant::{Level, QuantConfig};
    use kron_adapters::store::{merge_checkpoint, peft_files, read_any, QuantizedAdapters};
    let dir = tmpdir("inconsistent");
    let dev = device();
    let mut rng = Rng::new(33);
    // A Kron-LoRA adapter on a lone 48 → 96 layer: factors a, b1, b2.
    let cfg = AdapterConfig::KronLora(
        KronLoraConfig::new([6, 8], [8, 12], 2).with_init(FactorInit::Normal),
    );
    let layer = AdaptedLinear::new(base(&mut rng, 48, 96), &cfg, &dev).unwrap();
    let good = dir.join("good.safetensors");
    save_adapters(&layer, &good).unwrap();
    let bytes = std::fs::read(&good).unwrap();
    let native = kron_adapters::NativeAdapters::from_bytes("good", &bytes).unwrap();
    let q = QuantizedAdapters::quantize(&native, QuantConfig::new(8, Level::Tensor).unwrap())
        .unwrap()
        .to_bytes()
        .unwrap();
    for (what, edit) in inconsistent_specs() {
        for (kind, src) in [("native", &bytes), ("quantized", &q)] {
            let bad = with_edited_meta(src, &edit);
            let path = dir.join(format!("bad-{kind}.safetensors"));
            std::fs::write(&path, &bad).unwrap();
            let e = kron_adapters::NativeAdapters::from_bytes("bad", &bad).unwrap_err();
            // An invalid spec (or, for a NaN written as a string, metadata that does not parse).
            assert!(
                matches!(
                    e,
                    AdapterError::InvalidSpec { .. } | AdapterError::Format { .. }
                ) && e.kind() == kron_adapters::ErrorKind::Malformed,
                "{kind} {what}: {e:?}"
            );
            assert!(read_any(&path).is_err(), "{kind} {what}");
            let fresh = AdaptedLinear::new(base(&mut rng, 48, 96), &cfg, &dev).unwrap();
            assert!(load_adapters(fresh, &path).is_err(), "{kind} {what}");
        }
    }
    // Hand-built adapters with an inconsistent spec are refused by export and merge too.
    for (what, edit) in inconsistent_specs() {
        let mut meta = serde_json::to_value(&native.meta).unwrap();
        edit(&mut meta);
        let Ok(meta) = serde_json::from_value(meta) else {
            continue; // not even representable (a NaN string): nothing to export
        };
        let bad = kron_adapters::NativeAdapters {
            meta,
            factors: native.factors.clone(),
        };
        assert!(peft_files(&bad, None).is_err(), "export {what}");
        assert!(bad.to_bytes().is_err(), "write {what}");
        let out = dir.join("merged.safetensors");
        let e = merge_checkpoint::<TB>(
            &peft_fixture("lora_d48").join("base.safetensors"),
            &bad,
            &kron_adapters::NameMap::new(),
            &out,
            false,
            &dev,
        );
        assert!(e.is_err() && !out.exists(), "merge {what}");
    }
    std::fs::remove_dir_all(dir).ok();
}

/// The streamed safetensors writer (every file this crate writes, and `export-hf`'s and
/// `merge`'s weights one tensor at a time) gives the bytes the `safetensors` crate gives for the
/// same content under a sorted header, and refuses data that does not fit its declared shape,
/// leaving no file.
#[test]
fn streamed_safetensors_equal_the_safetensors_crates_bytes() {
    use kron_adapters::store::st;
    use safetensors::Dtype;
    let mut rng = Rng::new(71);
    let mut entries: Vec<st::Entry> = Vec::new();
    for (i, (dtype, shape)) in [
        (Dtype::F32, vec![3, 5]),
        (Dtype::F16, vec![7]),
        (Dtype::BF16, vec![2, 2, 3]),
        (Dtype::I8, vec![9]),
        (Dtype::U8, vec![0, 4]),
        (Dtype::F64, vec![1]),
        (Dtype::F32, vec![]),
        (Dtype::I64, vec![2]),
    ]
    .into_iter()
    .enumerate()
    {
        let n = shape.iter().product::<usize>() * dtype.bitsize() / 8;
        let bytes: Vec<u8> = (0..n).map(|_| (rng.uniform() * 256.0) as u8).collect();
        entries.push((format!("t{}.w{i}", (i * 5) % 8), dtype, shape, bytes));
    }
    let meta = std::collections::HashMap::from([
        ("format".to_string(), "pt".to_string()),
        ("note".to_string(), "{\"a\": [1, 2]}".to_string()),
    ]);
    let views: Vec<_> = entries
        .iter()
        .map(|(n, d, s, b)| {
            let view = safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap();
            (n.clone(), view)
        })
        .collect();
    let theirs = safetensors::serialize(views, Some(meta.clone())).unwrap();
    let theirs = st::canonical_safetensors(&theirs).unwrap();
    let ours = st::serialize("x", &entries, meta.clone()).unwrap();
    assert_eq!(ours, theirs);
    // Read back: every tensor and the metadata as written.
    let parsed = st::parse("x", &ours).unwrap();
    for (n, d, s, b) in &entries {
        let v = parsed.tensor(n).unwrap();
        assert_eq!(
            (v.dtype(), v.shape(), v.data()),
            (*d, s.as_slice(), b.as_slice())
        );
    }
    assert_eq!(st::metadata("x", &ours).unwrap(), meta);
    // Without metadata there is no `__metadata__` key, as in the crate's files.
    let bare = st::serialize("x", &entries, Default::default()).unwrap();
    assert!(!String::from_utf8_lossy(&bare[..64]).contains("__metadata__"));

    // Streamed into a file: the same bytes.
    let dir = tmpdir("streamed");
    let path = dir.join("s.safetensors");
    let specs: Vec<st::Spec> = entries
        .iter()
        .map(|(n, d, s, _)| (n.clone(), *d, s.clone()))
        .collect();
    st::write_atomic_with(&path, &mut |out| {
        st::write_streamed("s", out, &specs, meta.clone(), &mut |i| Ok(&entries[i].3))?;
        Ok(())
    })
    .unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), ours);

    // A tensor whose bytes do not fit its shape: an error naming it, and the file unchanged.
    let short = dir.join("short.safetensors");
    let e = st::write_atomic_with(&short, &mut |out| {
        st::write_streamed("short", out, &specs, meta.clone(), &mut |i| {
            Ok(&entries[i].3[..entries[i].3.len() - usize::from(i == 1)])
        })?;
        Ok(())
    })
    .unwrap_err();
    assert!(e.to_string().contains(&entries[1].0), "{e}");
    assert!(!short.exists());
    // Two tensors of one name, or a tensor named like the metadata.
    for name in [entries[0].0.clone(), "__metadata__".to_string()] {
        let mut twice = specs.clone();
        twice[2].0 = name.clone();
        let e = st::write_streamed("x", &mut Vec::new(), &twice, meta.clone(), &mut |i| {
            Ok(&entries[i].3)
        })
        .unwrap_err();
        assert!(e.to_string().contains(&name), "{e}");
    }
    let leftovers = std::fs::read_dir(&dir)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .contains(".tmp-")
        })
        .count();
    assert_eq!(leftovers, 0);
    std::fs::remove_dir_all(dir).ok();
}
