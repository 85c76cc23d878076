//! Quantization: error bounds per scheme, packing, ragged blocks, zero/constant/NaN tensors,
//! quantized adapter files, Burn's own quantizer against the portable one, and training on a
//! quantized frozen base.

use crate::common::*;

use burn::nn::LinearConfig;
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use kron_adapters::quant::{
    burn_scheme_of, merge_quantized, quantize_base, to_burn_quantized, Level, QuantConfig,
    QuantizedTensor,
};
use kron_adapters::store::{HostTensor, NativeAdapters, QuantizedAdapters};
use kron_adapters::{
    AdaptedLinear, AdapterConfig, AdapterError, ConfigError, FactorInit, KronAConfig,
    KronLoraConfig, LinearAdapter, LoraConfig,
};

fn schemes() -> Vec<QuantConfig> {
    let mut v = Vec::new();
    for bits in [8, 4] {
        for level in [
            Level::Tensor,
            Level::Block(16),
            Level::Block(7),
            Level::Channel,
        ] {
            v.push(QuantConfig::new(bits, level).unwrap());
        }
    }
    v
}

fn host(rng: &mut Rng, shape: [usize; 2]) -> HostTensor {
    HostTensor {
        shape: shape.to_vec(),
        data: rng.vec(shape[0] * shape[1]),
    }
}

#[test]
fn every_scheme_stays_within_half_a_scale() {
    let mut rng = Rng::new(80);
    for cfg in schemes() {
        for shape in [[24, 16], [7, 13], [1, 5], [48, 2]] {
            let t = host(&mut rng, shape);
            let q = QuantizedTensor::quantize("t", &t, cfg).unwrap();
            let groups = match cfg.level {
                Level::Tensor => 1,
                Level::Block(n) => (shape[0] * shape[1]).div_ceil(n),
                Level::Channel => shape[1],
            };
            assert_eq!(
                q.scales.len(),
                groups,
                "{cfg} {shape:?}: ragged last block counted"
            );
            let back = q.dequantize();
            for (i, (x, y)) in t.data.iter().zip(&back.data).enumerate() {
                let g = match cfg.level {
                    Level::Tensor => 0,
                    Level::Block(n) => i / n,
                    Level::Channel => i % shape[1],
                };
                let s = q.scales[g];
                assert!(
                    (x - y).abs() <= s / 2.0 * (1.0 + 1e-5),
                    "{cfg} {shape:?} element {i}: {x} → {y}, scale {s}"
                );
                assert!((q.values[i] as i32).abs() <= cfg.qmax());
            }
            // The largest value of each group hits ±qmax exactly.
            assert!(q.values.iter().any(|v| (*v as i32).abs() == cfg.qmax()));
        }
    }
}

#[test]
fn zero_constant_and_non_finite_tensors() {
    for cfg in schemes() {
        let zero = HostTensor {
            shape: vec![4, 6],
            data: vec![0.0; 24],
        };
        let q = QuantizedTensor::quantize("z", &zero, cfg).unwrap();
        assert!(q.scales.iter().all(|s| *s == 0.0) && q.values.iter().all(|v| *v == 0));
        assert_eq!(q.dequantize().data, zero.data, "zeros stay exactly zero");
        let c = HostTensor {
            shape: vec![4, 6],
            data: vec![-0.75; 24],
        };
        let q = QuantizedTensor::quantize("c", &c, cfg).unwrap();
        assert!(q.values.iter().all(|v| *v as i32 == -cfg.qmax()));
        assert!(q.dequantize().data.iter().all(|v| (v + 0.75).abs() < 1e-6));
        let mut bad = c.clone();
        bad.data[3] = f32::NAN;
        bad.data[5] = f32::INFINITY;
        match QuantizedTensor::quantize("layer.a", &bad, cfg) {
            Err(ConfigError::NonFinite { count, layer }) => {
                assert_eq!((count, layer.as_str()), (2, "layer.a"))
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(QuantConfig::new(3, Level::Tensor).is_err());
    assert!("block:0".parse::<Level>().is_err() && "rows".parse::<Level>().is_err());
    assert_eq!("block:32".parse::<Level>().unwrap(), Level::Block(32));
}

#[test]
fn packing_round_trips_exactly() {
    let mut rng = Rng::new(81);
    for cfg in schemes() {
        for shape in [[3, 5], [4, 4], [1, 1]] {
            let t = host(&mut rng, shape);
            let q = QuantizedTensor::quantize("t", &t, cfg).unwrap();
            let bytes = q.packed();
            let n = shape[0] * shape[1];
            assert_eq!(
                bytes.len(),
                if cfg.bits == 8 { n } else { n.div_ceil(2) },
                "int4: two per byte"
            );
            let back =
                QuantizedTensor::from_packed("t", q.shape, cfg, &bytes, q.scales.clone()).unwrap();
            assert_eq!(back, q, "{cfg} {shape:?}");
        }
    }
    // Every int4 value survives its nibble.
    let cfg = QuantConfig::new(4, Level::Tensor).unwrap();
    let q = QuantizedTensor {
        shape: [1, 15],
        config: cfg,
        values: (-7..=7).collect(),
        scales: vec![1.0],
    };
    assert_eq!(
        QuantizedTensor::from_packed("t", [1, 15], cfg, &q.packed(), vec![1.0])
            .unwrap()
            .values,
        q.values
    );
    // Wrong sizes and out-of-range values are errors.
    assert!(QuantizedTensor::from_packed("t", [2, 2], cfg, &[0, 0, 0], vec![1.0]).is_err());
    assert!(
        QuantizedTensor::from_packed("t", [1, 2], cfg, &[0x08], vec![1.0]).is_err(),
        "-8 is outside ±7"
    );
    assert!(QuantizedTensor::from_packed("t", [1, 2], cfg, &[0x11], vec![-1.0]).is_err());
}

fn adapters(seed: u64) -> NativeAdapters {
    let dev = device();
    let layers: Vec<(String, AdaptedLinear<TB>)> = [
        (
            "q",
            AdapterConfig::KronA(KronAConfig::auto().with_init(FactorInit::Normal)),
        ),
        (
            "v",
            AdapterConfig::KronLora(KronLoraConfig::auto(2).with_init(FactorInit::Normal)),
        ),
        (
            "o",
            AdapterConfig::Lora(LoraConfig::new(4).with_init(FactorInit::Normal)),
        ),
    ]
    .into_iter()
    .map(|(n, c)| {
        TB::seed(&dev, seed);
        (
            n.to_string(),
            AdaptedLinear::new(LinearConfig::new(384, 1536).init(&dev), &c, &dev).unwrap(),
        )
    })
    .collect();
    NativeAdapters::from_adapters(
        layers
            .iter()
            .map(|(n, l)| (n.clone(), l.adapter.as_ref().unwrap())),
    )
}

use burn::tensor::backend::Backend;

#[test]
fn quantized_files_round_trip_bit_for_bit_and_are_small() {
    let dir = scratch_dir("quant", "files");
    let float = adapters(1);
    let f32_size = float.write(dir.join("f32.safetensors")).unwrap();
    for cfg in schemes() {
        let q = QuantizedAdapters::quantize(&float, cfg).unwrap();
        let path = dir.join(format!("q{}.safetensors", cfg.bits));
        let size = q.write(&path).unwrap();
        let back = QuantizedAdapters::read(&path).unwrap();
        assert_eq!(back, q, "{cfg}");
        let deq = q.dequantize();
        // Every reader of adapter files reads it, dequantized, with the same bits.
        let via_native = NativeAdapters::read(&path).unwrap();
        for (l, fs) in &deq.factors {
            for (a, b) in fs.iter().zip(&via_native.factors[l]) {
                assert_eq!(
                    a.data.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    b.data.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
                );
            }
        }
        // The file is the packed values, 4 bytes per scale, and a header: nothing else.
        let payload: usize = q
            .factors
            .values()
            .flatten()
            .map(|t| t.packed().len() + 4 * t.scales.len())
            .sum();
        assert!(
            size as usize >= payload && (size as usize) < payload + 8192,
            "{cfg}: {size} B for a {payload} B payload"
        );
        if cfg.level == Level::Tensor {
            let bound = if cfg.bits == 8 { 0.30 } else { 0.17 };
            assert!(
                (size as f64) < bound * f32_size as f64,
                "{cfg}: {size} B vs {f32_size} B in f32"
            );
        }
    }
    // A damaged file is an error, not a panic.
    let path = dir.join("q4.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    let pattern = br#"\"bits\":4"#;
    let at = bytes
        .windows(pattern.len())
        .position(|w| w == pattern)
        .unwrap();
    bytes[at + 9] = b'3';
    let e = QuantizedAdapters::from_bytes("x", &bytes);
    assert!(
        matches!(&e, Err(AdapterError::InvalidSpec { path, .. }) if path == "x"),
        "{e:?}"
    );
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn burn_quantizer_agrees_with_the_portable_one_where_it_applies() {
    let dev = device();
    let mut rng = Rng::new(82);
    let t = host(&mut rng, [32, 64]);
    for cfg in [
        QuantConfig::new(8, Level::Tensor).unwrap(),
        QuantConfig::new(8, Level::Block(16)).unwrap(),
    ] {
        let Some(scheme) = cfg.burn_scheme::<TB>([32, 64], &dev) else {
            // LibTorch (burn-tch) stores no Burn quantized tensors; there the scheme must be
            // refused (checked as a typed error in `deployed_weights_can_be_burn_quantized_tensors`).
            if cfg!(feature = "tch") {
                continue;
            }
            panic!("Burn has {cfg} on this backend");
        };
        let ours = QuantizedTensor::quantize("t", &t, cfg)
            .unwrap()
            .dequantize();
        let burn = to_vec(
            t.to_tensor::<TB, 2>(&dev)
                .quantize_dynamic(&scheme)
                .dequantize(),
        );
        let scale = t.data.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
        let worst = ours
            .data
            .iter()
            .zip(&burn)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        // Same grid: at most one step apart where rounding ties break differently.
        assert!(
            worst <= scale * 1.0001,
            "{cfg}: max difference {worst}, scale {scale}"
        );
        let same = ours
            .data
            .iter()
            .zip(&burn)
            .filter(|(a, b)| (*a - *b).abs() <= 1e-6 * scale.max(1e-30) + 1e-12)
            .count();
        assert!(
            same as f64 >= 0.99 * ours.data.len() as f64,
            "{cfg}: {same} of {} identical",
            ours.data.len()
        );
    }
    assert!(QuantConfig::new(8, Level::Channel)
        .unwrap()
        .burn_scheme::<TB>([32, 64], &dev)
        .is_none());
    assert!(QuantConfig::new(8, Level::Block(7))
        .unwrap()
        .burn_scheme::<TB>([32, 64], &dev)
        .is_none());
}

#[test]
fn adapters_train_on_a_quantized_frozen_base() {
    let dev = device();
    let mut rng = Rng::new(83);
    let mut base = LinearConfig::new(24, 36).init::<AB>(&dev);
    base.weight = base
        .weight
        .map(|_| randn::<AB, 2>(&mut rng, [24, 36], &dev).mul_scalar(0.3));
    let w_float = to_vec(base.weight.val().inner());
    for cfg in [
        QuantConfig::new(8, Level::Tensor).unwrap(),
        QuantConfig::new(4, Level::Block(12)).unwrap(),
    ] {
        let kron = AdapterConfig::KronA(KronAConfig::new([4, 6], [6, 6]));
        let mut layer =
            quantize_base(AdaptedLinear::new(base.clone(), &kron, &dev).unwrap(), cfg).unwrap();
        // The base now holds the grid values, exactly what the quantized tensor dequantizes to.
        let grid = QuantizedTensor::quantize(
            "w",
            &HostTensor {
                shape: vec![24, 36],
                data: w_float.clone(),
            },
            cfg,
        )
        .unwrap()
        .dequantize();
        let w0 = to_vec(layer.base.weight.val().inner());
        assert_eq!(w0, grid.data, "{cfg}");
        assert!(w0 != w_float, "{cfg}: quantization changed the base");
        assert_eq!(
            kron_adapters::count_params(&layer).trainable,
            24 + 36,
            "{cfg}: only the adapter trains"
        );
        let x = randn::<AB, 2>(&mut rng, [16, 24], &dev);
        let target = randn::<AB, 2>(&mut rng, [16, 36], &dev);
        let mut optim = AdamWConfig::new().init();
        let mut losses = Vec::new();
        for _ in 0..40 {
            let loss = (layer.forward(x.clone()) - target.clone())
                .powf_scalar(2.0)
                .mean();
            losses.push(to_vec(loss.clone().inner())[0]);
            let grads = GradientsParams::from_grads(loss.backward(), &layer);
            layer = optim.step(2e-2, layer, grads);
        }
        assert!(
            losses[39] < 0.9 * losses[0],
            "{cfg}: loss {} → {}",
            losses[0],
            losses[39]
        );
        assert_eq!(
            to_vec(layer.base.weight.val().inner()),
            w0,
            "{cfg}: the quantized base did not move"
        );
        // Merging re-quantizes, and says how much that rounds.
        let (merged, rounding) = merge_quantized(&layer, cfg).unwrap();
        let exact = to_vec(layer.forward(x.clone()).inner());
        let approx = to_vec(merged.forward(x.clone()).inner());
        let xmax = to_vec(x.clone().inner())
            .iter()
            .fold(0f32, |m, v| m.max(v.abs()));
        assert!(rounding > 0.0, "{cfg}");
        assert!(
            max_abs_diff(&approx, &exact) <= 24.0 * xmax * rounding * 1.001,
            "{cfg}: rounding {rounding}"
        );
        let mw = QuantizedTensor::quantize(
            "m",
            &HostTensor::from_tensor(merged.weight.val().inner()),
            cfg,
        )
        .unwrap()
        .dequantize();
        assert_eq!(
            mw.data,
            to_vec(merged.weight.val().inner()),
            "{cfg}: the merged weight is on the grid"
        );
        let _ = layer.adapter.as_ref().unwrap().d_in();
    }
}

#[test]
fn deployed_weights_can_be_burn_quantized_tensors() {
    let dev = device();
    let mut rng = Rng::new(84);
    let mut lin = LinearConfig::new(32, 64).init::<TB>(&dev);
    lin.weight = lin.weight.map(|_| randn::<TB, 2>(&mut rng, [32, 64], &dev));
    let cfg = QuantConfig::new(8, Level::Tensor).unwrap();
    let q = match to_burn_quantized(lin.clone(), cfg) {
        // LibTorch (burn-tch) stores no Burn quantized tensors: a typed refusal, not a panic.
        Err(AdapterError::Unsupported { .. }) if cfg!(feature = "tch") => return,
        result => result.unwrap(),
    };
    assert!(
        burn_scheme_of(&q.weight.val()).is_some(),
        "stored as a Burn quantized tensor"
    );
    let x = randn::<TB, 2>(&mut rng, [4, 32], &dev);
    let ours = QuantizedTensor::quantize("w", &HostTensor::from_tensor(lin.weight.val()), cfg)
        .unwrap()
        .dequantize();
    let want = x.clone().matmul(ours.to_tensor::<TB, 2>(&dev))
        + lin.bias.as_ref().unwrap().val().unsqueeze();
    let scale = ours.data.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
    assert!(
        max_abs_diff(&to_vec(q.forward(x)), &to_vec(want)) < 32.0 * 4.0 * scale,
        "same grid up to tie-breaking"
    );
    assert!(matches!(
        to_burn_quantized(lin.clone(), QuantConfig::new(8, Level::Channel).unwrap()),
        Err(AdapterError::Unsupported { .. })
    ));
    // 4-bit: packed where the device stores it (CubeCL backends), a typed refusal where it
    // does not (Burn's CPU backends), never a panic.
    let int4 = QuantConfig::new(4, Level::Block(16)).unwrap();
    let result = to_burn_quantized(lin.clone(), int4);
    eprintln!(
        "int4 as a Burn quantized tensor: {}",
        if result.is_ok() { "stored" } else { "refused" }
    );
    match result {
        Ok(q) => {
            assert!(burn_scheme_of(&q.weight.val()).is_some());
            let ours =
                QuantizedTensor::quantize("w", &HostTensor::from_tensor(lin.weight.val()), int4)
                    .unwrap()
                    .dequantize();
            let x = randn::<TB, 2>(&mut rng, [4, 32], &dev);
            let want = x.clone().matmul(ours.to_tensor::<TB, 2>(&dev))
                + lin.bias.as_ref().unwrap().val().unsqueeze();
            let scale = ours.data.iter().fold(0f32, |m, v| m.max(v.abs())) / 7.0;
            assert!(max_abs_diff(&to_vec(q.forward(x)), &to_vec(want)) < 32.0 * 4.0 * scale);
        }
        Err(e) => {
            assert!(matches!(e, AdapterError::Unsupported { .. }), "{e}");
            assert!(int4.burn_scheme::<TB>([32, 64], &dev).is_none());
        }
    }
}
