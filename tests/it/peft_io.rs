//! Reading and writing PEFT folders through the library: import equals PEFT's outputs, export
//! writes what PEFT wrote, export → import is exact, and malformed or unsupported inputs are
//! typed errors.

use crate::common::*;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::nn::{Linear, LinearConfig};
use burn::tensor::{activation, Tensor};
use kron_adapters::store::{
    attach as apply_adapters, peft_files, write_peft_dir, NativeAdapters, PeftAdapter,
};
use kron_adapters::NameMap;
use kron_adapters::{
    AdaptedLinear, AdapterError, AdapterLayers, KronAConfig, LinearAdapter, Method,
};

fn tmp(name: &str) -> PathBuf {
    scratch_dir("peftio", name)
}

type Tensors = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

fn read_st(path: &Path) -> Tensors {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, v)| {
            (
                n,
                (
                    v.shape().to_vec(),
                    v.data()
                        .chunks_exact(4)
                        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                        .collect(),
                ),
            )
        })
        .collect()
}

/// The fixtures' network, with every linear an AdaptedLinear named as in PyTorch.
struct Net {
    layers: Vec<(String, AdaptedLinear<TB>)>,
    pooler: Linear<TB>,
    n_layers: usize,
}

impl AdapterLayers<TB> for Net {
    fn visit_adapted<'a>(&'a self, _: &str, f: &mut dyn FnMut(String, &'a AdaptedLinear<TB>)) {
        for (n, l) in &self.layers {
            f(n.clone(), l);
        }
    }
    fn visit_adapted_mut<'a>(
        &'a mut self,
        _: &str,
        f: &mut dyn FnMut(String, &'a mut AdaptedLinear<TB>),
    ) {
        for (n, l) in &mut self.layers {
            f(n.clone(), l);
        }
    }
}

const TARGETS: [&str; 4] = [
    "attention.self.query",
    "attention.self.value",
    "intermediate.dense",
    "output.dense",
];

fn linear(base: &Tensors, module: &str) -> Linear<TB> {
    let (ws, w) = &base[&format!("{module}.weight")];
    let (_, b) = &base[&format!("{module}.bias")];
    let dev = device();
    let mut l = LinearConfig::new(ws[1], ws[0]).init::<TB>(&dev);
    l.weight = l
        .weight
        .map(|_| tensor(&transpose_ref(w, ws[0], ws[1]), [ws[1], ws[0]], &dev));
    l.bias = l.bias.map(|p| p.map(|_| tensor(b, [ws[0]], &dev)));
    l
}

fn net(case: &str) -> Net {
    let base = read_st(&peft_fixture(case).join("base.safetensors"));
    let meta: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(peft_fixture(case).join("meta.json")).unwrap(),
    )
    .unwrap();
    let n_layers = meta["layers"].as_u64().unwrap() as usize;
    let mut layers = Vec::new();
    for i in 0..n_layers {
        for t in TARGETS {
            let name = format!("encoder.layer.{i}.{t}");
            layers.push((name.clone(), AdaptedLinear::frozen(linear(&base, &name))));
        }
    }
    Net {
        layers,
        pooler: linear(&base, "pooler"),
        n_layers,
    }
}

impl Net {
    fn forward(&self, mut x: Tensor<TB, 3>) -> Tensor<TB, 3> {
        for i in 0..self.n_layers {
            let l = |t: usize| &self.layers[i * 4 + t].1;
            x = x.clone() + l(1).forward(l(0).forward(x).tanh());
            x = x.clone() + l(3).forward(activation::relu(l(2).forward(x)));
        }
        self.pooler.forward(x)
    }
}

const CASES: [(&str, Method); 4] = [
    ("lokr_kronlora_d48", Method::KronLora),
    ("lokr_krona_full_d48", Method::KronA),
    ("lokr_both_d64", Method::KronLora),
    ("lora_d48", Method::Lora),
];

#[test]
fn imported_adapters_reproduce_peft_outputs_and_merges() {
    let dev = device();
    for (case, method) in CASES {
        let peft = PeftAdapter::read_dir(peft_fixture(case).join("adapter")).unwrap();
        assert!(
            peft.adapters
                .meta
                .layers
                .values()
                .all(|s| s.method == method),
            "{case}"
        );
        let model = apply_adapters(net(case), &peft.adapters, &NameMap::new(), &dev).unwrap();
        let io = read_st(&peft_fixture(case).join("io.safetensors"));
        let (xs, x) = &io["x"];
        let y = to_vec(model.forward(tensor(x, [xs[0], xs[1], xs[2]], &dev)));
        let err = max_abs_diff(&y, &io["y"].1);
        assert!(err <= 1e-4, "{case}: y max abs error {err}");
        let merged = read_st(&peft_fixture(case).join("merged.safetensors"));
        for (name, layer) in &model.layers {
            let (ws, w) = &merged[&format!("{name}.weight")];
            let got = transpose_ref(&to_vec(layer.merge().unwrap().weight.val()), ws[1], ws[0]);
            let err = max_abs_diff(&got, w);
            assert!(err <= 1e-5, "{case} {name}: merged max abs error {err}");
        }
    }
}

#[test]
fn export_writes_the_keys_and_shapes_peft_wrote_and_reimports_exactly() {
    for (case, _) in CASES {
        let peft = PeftAdapter::read_dir(peft_fixture(case).join("adapter")).unwrap();
        let dir = tmp(&format!("export-{case}"));
        let out = dir.join("adapter");
        write_peft_dir(&out, &peft.adapters, Some("fixture-net"), false).unwrap();
        // Same key set and shapes as PEFT's own file (decompose_both's w1_a/w1_b come back as
        // the product lokr_w1: the same ΔW, one factor fewer).
        let ours = read_st(&out.join("adapter_model.safetensors"));
        let theirs = read_st(&peft_fixture(case).join("adapter/adapter_model.safetensors"));
        let shapes = |t: &Tensors| {
            t.iter()
                .map(|(k, v)| (k.clone(), v.0.clone()))
                .collect::<BTreeMap<_, _>>()
        };
        if case != "lokr_both_d64" {
            assert_eq!(shapes(&ours), shapes(&theirs), "{case}");
            for (k, (_, v)) in &ours {
                assert_eq!(
                    v, &theirs[k].1,
                    "{case} {k}: values are PEFT's, bit for bit"
                );
            }
        } else {
            assert!(
                ours.keys().all(|k| !k.contains("w1_a"))
                    && ours.keys().any(|k| k.ends_with("lokr_w1"))
            );
        }
        let bytes = std::fs::read(out.join("adapter_model.safetensors")).unwrap();
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(header.metadata().as_ref().unwrap()["format"], "pt");
        // The config PEFT needs.
        let cfg: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(out.join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        let orig: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(peft_fixture(case).join("adapter/adapter_config.json"))
                .unwrap(),
        )
        .unwrap();
        assert_eq!(cfg["peft_type"], orig["peft_type"]);
        if case != "lokr_krona_full_d48" && case != "lokr_both_d64" {
            assert_eq!(cfg["r"], orig["r"], "{case}");
        }
        assert_eq!(cfg["base_model_name_or_path"], "fixture-net");
        // Re-import: exactly the same adapters.
        let back = PeftAdapter::read_dir(&out).unwrap().adapters;
        assert_eq!(back.meta.layers, peft.adapters.meta.layers, "{case}: specs");
        assert_eq!(
            back.factors, peft.adapters.factors,
            "{case}: factors bit for bit"
        );
        std::fs::remove_dir_all(dir).ok();
    }
}

#[test]
fn crate_adapters_export_with_rank_and_alpha_patterns() {
    let dev = device();
    let mut rng = Rng::new(70);
    // KronA (auto shapes, so PEFT's factorization gives them) with two different scales.
    let layer = |d_in, d_out, scale: f64| {
        let cfg = kron_adapters::AdapterConfig::KronA(
            KronAConfig::auto()
                .with_scale(scale)
                .with_init(kron_adapters::FactorInit::Normal),
        );
        AdaptedLinear::new(LinearConfig::new(d_in, d_out).init::<TB>(&dev), &cfg, &dev).unwrap()
    };
    let net = Net {
        layers: vec![
            ("a.q".into(), layer(48, 48, 0.5)),
            ("a.ffn".into(), layer(48, 96, 0.5)),
            ("b.q".into(), layer(48, 48, 2.0)),
        ],
        pooler: LinearConfig::new(4, 4).init(&dev),
        n_layers: 0,
    };
    let native = NativeAdapters::from_model(&net);
    let (cfg, _) = peft_files(&native, None).unwrap();
    let cfg: serde_json::Value = serde_json::from_str(&cfg).unwrap();
    assert_eq!(cfg["decompose_factor"], -1);
    assert!(
        !cfg["rank_pattern"].as_object().unwrap().is_empty()
            || !cfg["alpha_pattern"].as_object().unwrap().is_empty()
    );
    let dir = tmp("patterns");
    write_peft_dir(dir.join("out"), &native, None, false).unwrap();
    let back = PeftAdapter::read_dir(dir.join("out")).unwrap().adapters;
    assert_eq!(
        back.meta.layers, native.meta.layers,
        "scales survive through r and alpha patterns"
    );
    assert_eq!(back.factors, native.factors);
    // Overwrite is refused without the flag, and allowed with it.
    assert!(matches!(
        write_peft_dir(dir.join("out"), &native, None, false),
        Err(AdapterError::Io { .. })
    ));
    write_peft_dir(dir.join("out"), &native, None, true).unwrap();
    let _ = rng.next_u64();
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn unexportable_shapes_and_mixed_methods_are_refused() {
    let dev = device();
    let krona = |a: [usize; 2], b: [usize; 2]| {
        let cfg = kron_adapters::AdapterConfig::KronA(KronAConfig::new(a, b));
        AdaptedLinear::new(
            LinearConfig::new(a[0] * b[0], a[1] * b[1]).init::<TB>(&dev),
            &cfg,
            &dev,
        )
        .unwrap()
    };
    let lora = AdaptedLinear::new(
        LinearConfig::new(48, 48).init::<TB>(&dev),
        &kron_adapters::AdapterConfig::Lora(kron_adapters::LoraConfig::new(2)),
        &dev,
    )
    .unwrap();
    // (3, 5) ⊗ (16, 8) is no factorization(d, f) PEFT would make.
    let odd = Net {
        layers: vec![("x".into(), krona([3, 5], [16, 8]))],
        pooler: LinearConfig::new(2, 2).init(&dev),
        n_layers: 0,
    };
    let e = peft_files(&NativeAdapters::from_model(&odd), None).unwrap_err();
    assert!(
        matches!(&e, AdapterError::Unsupported { option, .. } if option == "factor shapes"),
        "{e}"
    );
    // A single explicit factor works: a (4, 4) on 48 → 48 is factorization(48, 4) = (4, 12).
    let fits = Net {
        layers: vec![("x".into(), krona([4, 4], [12, 12]))],
        pooler: LinearConfig::new(2, 2).init(&dev),
        n_layers: 0,
    };
    let (cfg, _) = peft_files(&NativeAdapters::from_model(&fits), None).unwrap();
    assert!(cfg.contains("\"decompose_factor\": 4"), "{cfg}");
    let mixed = Net {
        layers: vec![("x".into(), krona([6, 6], [8, 8])), ("y".into(), lora)],
        pooler: LinearConfig::new(2, 2).init(&dev),
        n_layers: 0,
    };
    assert!(matches!(
        peft_files(&NativeAdapters::from_model(&mixed), None),
        Err(AdapterError::Unsupported { .. })
    ));
}

#[test]
fn names_map_to_model_layers_or_fail_clearly() {
    let dev = device();
    let peft = PeftAdapter::read_dir(peft_fixture("lora_d48").join("adapter")).unwrap();
    // Rename the file's modules with a prefix the model does not have, then map it away.
    let mut renamed = peft.adapters.clone();
    renamed.meta.layers = renamed
        .meta
        .layers
        .into_iter()
        .map(|(k, v)| (format!("bert.{k}"), v))
        .collect();
    renamed.factors = renamed
        .factors
        .into_iter()
        .map(|(k, v)| (format!("bert.{k}"), v))
        .collect();
    let e = apply_adapters(net("lora_d48"), &renamed, &NameMap::new(), &dev)
        .err()
        .unwrap();
    assert!(
        e.to_string().contains("not a layer of the model")
            && e.to_string().contains("encoder.layer.0"),
        "{e}"
    );
    let model = apply_adapters(
        net("lora_d48"),
        &renamed,
        &NameMap::new().with_prefix("bert.", ""),
        &dev,
    )
    .unwrap();
    assert_eq!(model.adapter_specs().len(), 8);
    // Sizes must fit.
    let e = apply_adapters(
        net("lora_d48"),
        &PeftAdapter::read_dir(peft_fixture("lokr_both_d64").join("adapter"))
            .unwrap()
            .adapters,
        &NameMap::new(),
        &dev,
    )
    .err()
    .unwrap();
    assert!(e.to_string().contains("[64, 64]"), "{e}");
    assert!(NameMap::new().parse_rule("no-equals").is_err());
}

/// Runs `PeftAdapter::from_bytes` on the lora fixture with an edited config or tensors.
fn lora_with(
    edit_cfg: impl Fn(&mut serde_json::Value),
    edit_st: impl Fn(&mut BTreeMap<String, (Vec<usize>, Vec<f32>)>),
) -> Result<PeftAdapter, AdapterError> {
    let dir = peft_fixture("lora_d48").join("adapter");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap())
            .unwrap();
    edit_cfg(&mut cfg);
    let mut t = read_st(&dir.join("adapter_model.safetensors"));
    edit_st(&mut t);
    let owned: Vec<(String, Vec<usize>, Vec<u8>)> = t
        .into_iter()
        .map(|(k, (s, v))| (k, s, v.iter().flat_map(|f| f.to_le_bytes()).collect()))
        .collect();
    let views: Vec<_> = owned
        .iter()
        .map(|(k, s, b)| {
            (
                k.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                    .unwrap(),
            )
        })
        .collect();
    let bytes = safetensors::serialize(views, None).unwrap();
    PeftAdapter::from_bytes(
        "test",
        serde_json::to_string(&cfg).unwrap().as_bytes(),
        &bytes,
    )
}

#[test]
fn malformed_and_unsupported_inputs_are_typed_errors() {
    let q = "base_model.model.encoder.layer.0.attention.self.query";
    let unsupported = |e: Result<PeftAdapter, AdapterError>, opt: &str| match e {
        Err(AdapterError::Unsupported { option, .. }) => assert_eq!(option, opt),
        other => panic!("expected unsupported {opt}, got {other:?}"),
    };
    let format = |e: Result<PeftAdapter, AdapterError>, needle: &str| match e {
        Err(e @ AdapterError::Format { .. }) => assert!(e.to_string().contains(needle), "{e}"),
        other => panic!("expected a format error about {needle}, got {other:?}"),
    };
    format(
        lora_with(
            |_| {},
            |t| {
                t.remove(&format!("{q}.lora_B.weight"));
            },
        ),
        "lacks `lora_B.weight`",
    );
    format(
        lora_with(
            |_| {},
            |t| {
                t.get_mut(&format!("{q}.lora_A.weight")).unwrap().0 = vec![8, 24];
            },
        ),
        "rank",
    );
    format(
        lora_with(
            |_| {},
            |t| {
                t.insert(format!("{q}.weird"), (vec![2], vec![0.0; 2]));
            },
        ),
        "not one of LORA's tensors",
    );
    format(
        lora_with(|c| c["target_modules"] = serde_json::json!(["key"]), |_| {}),
        "not in target_modules",
    );
    unsupported(
        lora_with(|c| c["peft_type"] = "IA3".into(), |_| {}),
        "peft_type",
    );
    unsupported(
        lora_with(|c| c["use_dora"] = true.into(), |_| {}),
        "use_dora",
    );
    unsupported(
        lora_with(|c| c["fan_in_fan_out"] = true.into(), |_| {}),
        "fan_in_fan_out",
    );
    unsupported(lora_with(|c| c["bias"] = "all".into(), |_| {}), "bias");
    unsupported(
        lora_with(
            |c| c["modules_to_save"] = serde_json::json!(["classifier"]),
            |_| {},
        ),
        "modules_to_save",
    );
    unsupported(
        lora_with(
            |c| c["layers_to_transform"] = serde_json::json!([0]),
            |_| {},
        ),
        "layers_to_transform",
    );
    unsupported(
        lora_with(
            |_| {},
            |t| {
                t.insert(
                    format!("{q}.lora_magnitude_vector"),
                    (vec![48], vec![1.0; 48]),
                );
            },
        ),
        "use_dora",
    );
    unsupported(
        lora_with(
            |_| {},
            |t| {
                t.get_mut(&format!("{q}.lora_A.weight")).unwrap().0 = vec![4, 48, 1, 1];
            },
        ),
        "conv layers",
    );
    // Bad JSON, truncated safetensors.
    let dir = peft_fixture("lora_d48").join("adapter");
    let st = std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
    let cfg = std::fs::read(dir.join("adapter_config.json")).unwrap();
    assert!(matches!(
        PeftAdapter::from_bytes("t", b"{not json", &st),
        Err(AdapterError::Format { .. })
    ));
    assert!(matches!(
        PeftAdapter::from_bytes("t", &cfg, &st[..st.len() - 100]),
        Err(AdapterError::Format { .. })
    ));
    assert!(matches!(
        PeftAdapter::from_bytes("t", &cfg, &[]),
        Err(AdapterError::Format { .. })
    ));
    assert!(matches!(
        PeftAdapter::read_dir("/nonexistent-peft"),
        Err(AdapterError::Io { .. })
    ));
}

#[test]
fn rank_alpha_patterns_and_rslora_set_the_scale() {
    let q = "encoder.layer.0.attention.self.query";
    let plain = lora_with(|_| {}, |_| {}).unwrap();
    assert_eq!(plain.adapters.meta.layers[q].scale, 2.0, "8 / 4");
    let p = lora_with(
        |c| c["alpha_pattern"] = serde_json::json!({"query": 16}),
        |_| {},
    )
    .unwrap();
    assert_eq!(p.adapters.meta.layers[q].scale, 4.0);
    assert_eq!(
        p.adapters.meta.layers["encoder.layer.0.attention.self.value"].scale,
        2.0
    );
    let r = lora_with(|c| c["use_rslora"] = true.into(), |_| {}).unwrap();
    assert_eq!(r.adapters.meta.layers[q].scale, 4.0, "8 / √4");
    // A rank pattern that disagrees with the tensors is an error.
    assert!(lora_with(
        |c| c["rank_pattern"] = serde_json::json!({"value": 2}),
        |_| {}
    )
    .is_err());
    let d = plain.adapters.adapter::<TB>(q, &device()).unwrap();
    assert_eq!((d.d_in(), d.d_out()), (48, 48));
}
