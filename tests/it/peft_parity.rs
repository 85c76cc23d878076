//! Parity with Hugging Face PEFT 0.21.2 (fixtures made with PyTorch, see tests/fixtures/README.md):
//! rebuild each targeted layer's adapter from PEFT's factors — transposing PyTorch's [out, in] to
//! Burn's [in, out] — and match PEFT's ΔW, merged weights and network output.

use crate::common::*;

use std::collections::HashMap;
use std::path::Path;

use burn::nn::{Linear, LinearConfig};
use burn::tensor::{activation, Tensor};
use kron_adapters::{AdaptedLinear, Adapter, KronA, KronLora, Lora};

/// A safetensors file as name → (shape, f32 values).
fn read_st(path: &Path) -> HashMap<String, (Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            assert_eq!(view.dtype(), safetensors::Dtype::F32, "{name}");
            let v = view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            (name, (view.shape().to_vec(), v))
        })
        .collect()
}

/// PyTorch [out, in] → Burn [in, out] tensor.
fn torch_2d(t: &(Vec<usize>, Vec<f32>)) -> Tensor<TB, 2> {
    let (o, i) = (t.0[0], t.0[1]);
    tensor(&transpose_ref(&t.1, o, i), [i, o], &device())
}

fn torch_linear(base: &HashMap<String, (Vec<usize>, Vec<f32>)>, module: &str) -> Linear<TB> {
    let w = &base[&format!("{module}.weight")];
    let b = &base[&format!("{module}.bias")];
    let dev = device();
    let mut l = LinearConfig::new(w.0[1], w.0[0]).init::<TB>(&dev);
    l.weight = l.weight.map(|_| torch_2d(w));
    l.bias = l.bias.map(|p| p.map(|_| tensor(&b.1, [b.0[0]], &dev)));
    l
}

/// Builds this crate's adapter from PEFT's factors for one module.
fn adapter_from_peft(
    ad: &HashMap<String, (Vec<usize>, Vec<f32>)>,
    cfg: &serde_json::Value,
    module: &str,
) -> Adapter<TB> {
    let key = |s: &str| format!("base_model.model.{module}.{s}");
    let get = |s: &str| ad.get(&key(s));
    let dev = device();
    let matmul = |x: &(Vec<usize>, Vec<f32>), y: &(Vec<usize>, Vec<f32>)| {
        (
            vec![x.0[0], y.0[1]],
            matmul_ref(&x.1, x.0[0], x.0[1], &y.1, y.0[1]),
        )
    };
    match cfg["peft_type"].as_str().unwrap() {
        "LORA" => {
            let r = cfg["r"].as_f64().unwrap();
            let scale = cfg["lora_alpha"].as_f64().unwrap() / r;
            // lora_A [r, in] → down [in, r]; lora_B [out, r] → up [r, out].
            let down = torch_2d(get("lora_A.weight").unwrap());
            let up = torch_2d(get("lora_B.weight").unwrap());
            Adapter::Lora(Lora::from_factors(down, up, scale).unwrap())
        }
        "LOKR" => {
            let scale = cfg["alpha"].as_f64().unwrap() / cfg["r"].as_f64().unwrap();
            // a = w1ᵀ (w1 = w1_a @ w1_b when decomposed: materialized, ΔW is identical).
            let a = match get("lokr_w1") {
                Some(w1) => torch_2d(w1),
                None => torch_2d(&matmul(
                    get("lokr_w1_a").unwrap(),
                    get("lokr_w1_b").unwrap(),
                )),
            };
            match get("lokr_w2") {
                Some(w2) => Adapter::KronA(KronA::from_factors(a, torch_2d(w2), scale).unwrap()),
                None => {
                    // w2 = w2_a @ w2_b, so b = w2ᵀ = w2_bᵀ · w2_aᵀ: b1 = w2_bᵀ, b2 = w2_aᵀ.
                    let b1 = torch_2d(get("lokr_w2_b").unwrap());
                    let b2 = torch_2d(get("lokr_w2_a").unwrap());
                    let _ = &dev;
                    Adapter::KronLora(KronLora::from_factors(a, b1, b2, scale).unwrap())
                }
            }
        }
        other => panic!("unexpected peft_type {other}"),
    }
}

struct Net {
    layers: Vec<[AdaptedLinear<TB>; 4]>, // query, value, intermediate.dense, output.dense
    pooler: Linear<TB>,
}

const TARGETS: [&str; 4] = [
    "attention.self.query",
    "attention.self.value",
    "intermediate.dense",
    "output.dense",
];

impl Net {
    fn forward(&self, mut x: Tensor<TB, 3>) -> Tensor<TB, 3> {
        for [q, v, i, o] in &self.layers {
            x = x.clone() + v.forward(q.forward(x).tanh());
            x = x.clone() + o.forward(activation::relu(i.forward(x)));
        }
        self.pooler.forward(x)
    }

    fn merged(&self) -> Net {
        Net {
            layers: self
                .layers
                .iter()
                .map(|ls| {
                    ls.clone()
                        .map(|l| AdaptedLinear::frozen(l.merge().unwrap()))
                })
                .collect(),
            pooler: self.pooler.clone(),
        }
    }
}

fn check_case(case: &str, expect: &str) {
    let dir = peft_fixture(case);
    let base = read_st(&dir.join("base.safetensors"));
    let ad = read_st(&dir.join("adapter/adapter_model.safetensors"));
    let delta = read_st(&dir.join("delta.safetensors"));
    let merged = read_st(&dir.join("merged.safetensors"));
    let io = read_st(&dir.join("io.safetensors"));
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("adapter/adapter_config.json")).unwrap(),
    )
    .unwrap();
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("meta.json")).unwrap()).unwrap();
    let n_layers = meta["layers"].as_u64().unwrap() as usize;

    let mut layers = Vec::new();
    for li in 0..n_layers {
        let build = |t: &str| {
            let module = format!("encoder.layer.{li}.{t}");
            let adapter = adapter_from_peft(&ad, &cfg, &module);
            let kind = match &adapter {
                Adapter::Lora(_) => "lora",
                Adapter::KronA(_) => "krona",
                Adapter::KronLora(_) => "kron_lora",
            };
            assert_eq!(kind, expect, "{case} {module}");
            let layer = AdaptedLinear::with_adapter(torch_linear(&base, &module), adapter).unwrap();

            // ΔW against PEFT's get_delta_weight ([out, in]).
            let want = &delta[&format!("{module}.delta_weight")];
            let got = transpose_ref(&to_vec(layer.delta_weight()), want.0[1], want.0[0]);
            let err = max_abs_diff(&got, &want.1);
            assert!(err <= 1e-5, "{case} {module}: ΔW max abs error {err}");
            assert!(want.1.iter().any(|v| *v != 0.0));

            // Merged weight and bias against merge_and_unload().
            let m = layer.merge().unwrap();
            let want_w = &merged[&format!("{module}.weight")];
            let got_w = transpose_ref(&to_vec(m.weight.val()), want_w.0[1], want_w.0[0]);
            let err = max_abs_diff(&got_w, &want_w.1);
            assert!(
                err <= 1e-5,
                "{case} {module}: merged weight max abs error {err}"
            );
            let want_b = &merged[&format!("{module}.bias")];
            assert_eq!(
                to_vec(m.bias.as_ref().unwrap().val()),
                want_b.1,
                "{case} {module}: bias"
            );
            layer
        };
        layers.push(TARGETS.map(build));
    }
    let net = Net {
        layers,
        pooler: torch_linear(&base, "pooler"),
    };
    // The untargeted pooler is merged as is.
    assert_eq!(merged["pooler.weight"].1, base["pooler.weight"].1);

    let (x, y) = (&io["x"], &io["y"]);
    let shape = [x.0[0], x.0[1], x.0[2]];
    let xt = tensor::<TB, 3>(&x.1, shape, &device());
    let got = to_vec(net.forward(xt.clone()));
    let err = max_abs_diff(&got, &y.1);
    assert!(err <= 1e-4, "{case}: unmerged y max abs error {err}");
    let got = to_vec(net.merged().forward(xt));
    let err = max_abs_diff(&got, &y.1);
    assert!(err <= 1e-4, "{case}: merged y max abs error {err}");
}

#[test]
fn peft_lokr_kron_lora() {
    check_case("lokr_kronlora_d48", "kron_lora");
}

#[test]
fn peft_lokr_full_factors_is_krona() {
    check_case("lokr_krona_full_d48", "krona");
}

#[test]
fn peft_lokr_decompose_both() {
    check_case("lokr_both_d64", "kron_lora");
}

#[test]
fn peft_lora() {
    check_case("lora_d48", "lora");
}
