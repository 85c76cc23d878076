//! Training on the autodiff backend: factor gradients against finite differences, a frozen base
//! that stays bit-identical through AdamW steps, and a loss that falls.

use crate::common::*;

use burn::module::{AutodiffModule, Module};
use burn::nn::{Linear, LinearConfig};
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::{Tensor, TensorData};
use kron_adapters::{
    count_params, AdaptedLinear, Adapter, AdapterConfig, KronA, KronAConfig, KronLora,
    KronLoraConfig, LinearAdapter, Lora, LoraConfig,
};

const D_IN: usize = 24;
const D_OUT: usize = 36;

fn base_linear<B: burn::tensor::backend::Backend>(rng: &mut Rng, dev: &B::Device) -> Linear<B> {
    let mut l = LinearConfig::new(D_IN, D_OUT).init::<B>(dev);
    l.weight = l
        .weight
        .map(|_| randn::<B, 2>(rng, [D_IN, D_OUT], dev).mul_scalar(0.2));
    l.bias = l.bias.map(|p| p.map(|_| randn::<B, 1>(rng, [D_OUT], dev)));
    l
}

/// Named factor data and a builder for an adapter from it, on any backend.
struct Case {
    name: &'static str,
    factors: Vec<(&'static str, [usize; 2], Vec<f32>)>,
    scale: f64,
}

impl Case {
    fn build<B: burn::tensor::backend::Backend>(&self, dev: &B::Device) -> Adapter<B> {
        let t = |i: usize| tensor::<B, 2>(&self.factors[i].2, self.factors[i].1, dev);
        match self.name {
            "lora" => Adapter::Lora(Lora::from_factors(t(0), t(1), self.scale).unwrap()),
            "krona" => Adapter::KronA(KronA::from_factors(t(0), t(1), self.scale).unwrap()),
            "kron_lora" => {
                Adapter::KronLora(KronLora::from_factors(t(0), t(1), t(2), self.scale).unwrap())
            }
            _ => unreachable!(),
        }
    }
}

fn cases(rng: &mut Rng) -> Vec<Case> {
    let mut f = |name, shape: [usize; 2]| {
        (
            name,
            shape,
            rng.vec(shape[0] * shape[1])
                .iter()
                .map(|v| v * 0.5)
                .collect(),
        )
    };
    vec![
        Case {
            name: "lora",
            factors: vec![f("down", [D_IN, 3]), f("up", [3, D_OUT])],
            scale: 1.5,
        },
        Case {
            name: "krona",
            factors: vec![f("a", [4, 6]), f("b", [6, 6])],
            scale: 0.7,
        },
        Case {
            name: "kron_lora",
            factors: vec![f("a", [4, 6]), f("b1", [6, 2]), f("b2", [2, 6])],
            scale: 2.0,
        },
    ]
}

/// The loss L = Σ r⊙y + ½ Σ y², computed on the host in f64 (quadratic in every single
/// parameter, so central differences are exact up to rounding).
fn host_loss(y: &[f32], r: &[f32]) -> f64 {
    y.iter()
        .zip(r)
        .map(|(y, r)| *y as f64 * *r as f64 + 0.5 * (*y as f64).powi(2))
        .sum()
}

fn factor_grads(
    adapter: &Adapter<AB>,
    grads: &<AB as burn::tensor::backend::AutodiffBackend>::Gradients,
) -> Vec<Vec<f32>> {
    let params = match adapter {
        Adapter::Lora(l) => vec![l.down.val(), l.up.val()],
        Adapter::KronA(k) => vec![k.a.val(), k.b.val()],
        Adapter::KronLora(k) => vec![k.a.val(), k.b1.val(), k.b2.val()],
    };
    params
        .iter()
        .map(|p| to_vec(p.grad(grads).expect("a factor has a gradient")))
        .collect()
}

#[test]
fn factor_and_input_gradients_match_finite_differences() {
    // The Kronecker adapters' `a` contraction with its hand-written backward (the trainers
    // register it; kron_backward:: checks it against Burn's own too).
    assert!(kron_adapters::kron::autodiff::register_backward::<AB>());
    let mut rng = Rng::new(20);
    let dev = device();
    let base_data = base_linear::<TB>(&mut rng, &dev);
    let x = rng.vec(2 * 3 * D_IN);
    let r = rng.vec(2 * 3 * D_OUT);
    for case in cases(&mut rng) {
        // Autodiff gradients.
        let base_ad: Linear<AB> = Linear::from_inner(base_data.clone());
        let layer = AdaptedLinear::with_adapter(base_ad, case.build::<AB>(&dev)).unwrap();
        let xt = tensor::<AB, 3>(&x, [2, 3, D_IN], &dev).require_grad();
        let rt = tensor::<AB, 3>(&r, [2, 3, D_OUT], &dev);
        let y = layer.forward(xt.clone());
        let loss = (y.clone() * rt).sum() + y.powf_scalar(2.0).sum().mul_scalar(0.5);
        let grads = loss.backward();
        let g = factor_grads(layer.adapter.as_ref().unwrap(), &grads);
        assert!(
            layer.base.weight.val().grad(&grads).is_none(),
            "frozen base got a gradient"
        );
        let gx = to_vec(xt.grad(&grads).unwrap());

        // Central differences on the inner backend, a few entries of every factor.
        let eps = 0.05f32;
        let loss_with = |case: &Case, x: &[f32]| {
            let layer =
                AdaptedLinear::with_adapter(base_data.clone(), case.build::<TB>(&dev)).unwrap();
            host_loss(
                &to_vec(layer.forward(tensor::<TB, 3>(x, [2, 3, D_IN], &dev))),
                &r,
            )
        };
        for (fi, grad) in g.iter().enumerate() {
            let gmax = grad.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert!(
                gmax > 0.0,
                "{} factor {fi}: zero gradient proves nothing",
                case.name
            );
            let n = grad.len();
            for k in [0, n / 3, n / 2, n - 1] {
                let mut plus = Case {
                    name: case.name,
                    factors: case.factors.clone(),
                    scale: case.scale,
                };
                plus.factors[fi].2[k] += eps;
                let mut minus = Case {
                    name: case.name,
                    factors: case.factors.clone(),
                    scale: case.scale,
                };
                minus.factors[fi].2[k] -= eps;
                let fd = (loss_with(&plus, &x) - loss_with(&minus, &x)) / (2.0 * eps as f64);
                let err = (fd - grad[k] as f64).abs();
                assert!(
                    err <= 2e-3 * gmax as f64 + 1e-4,
                    "{} d/d{}[{k}]: autodiff {} vs finite difference {fd}",
                    case.name,
                    case.factors[fi].0,
                    grad[k]
                );
            }
        }
        // The input gradient flows through base and adapter.
        for k in [0, 17, x.len() - 1] {
            let (mut xp, mut xm) = (x.clone(), x.clone());
            xp[k] += eps;
            xm[k] -= eps;
            let fd = (loss_with(&case, &xp) - loss_with(&case, &xm)) / (2.0 * eps as f64);
            let gmax = gx.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
            assert!(
                (fd - gx[k] as f64).abs() <= 2e-3 * gmax,
                "{} d/dx[{k}]",
                case.name
            );
        }
    }
}

fn bits(t: Tensor<TB, 2>) -> Vec<u32> {
    to_vec(t).iter().map(|v| v.to_bits()).collect()
}

#[test]
fn base_stays_bit_identical_through_adamw_steps() {
    let mut rng = Rng::new(21);
    let dev = device();
    for cfg in [
        AdapterConfig::Lora(LoraConfig::new(2)),
        AdapterConfig::KronA(KronAConfig::new([4, 6], [6, 6])),
        AdapterConfig::KronLora(KronLoraConfig::new([4, 6], [6, 6], 2)),
    ] {
        let mut layer = AdaptedLinear::new(base_linear::<AB>(&mut rng, &dev), &cfg, &dev).unwrap();
        let counts = count_params(&layer);
        assert_eq!(
            counts,
            layer.param_counts(),
            "require_grad flags agree with the structural count"
        );
        assert_eq!(counts.trainable, layer.spec().unwrap().num_params());

        let w0 = bits(layer.base.weight.val().inner());
        let b0 = to_vec(layer.base.bias.as_ref().unwrap().val().inner());
        let f0 = to_vec(layer.delta_weight().inner());
        let mut optim = AdamWConfig::new().with_weight_decay(0.1).init();
        let x = randn::<AB, 2>(&mut rng, [16, D_IN], &dev);
        let target = randn::<AB, 2>(&mut rng, [16, D_OUT], &dev);
        for _ in 0..5 {
            let loss = (layer.forward(x.clone()) - target.clone())
                .powf_scalar(2.0)
                .mean();
            let grads = GradientsParams::from_grads(loss.backward(), &layer);
            assert_eq!(
                grads.len(),
                cfg_factor_count(&cfg),
                "only adapter factors have gradients"
            );
            layer = optim.step(1e-2, layer, grads);
        }
        assert_eq!(
            bits(layer.base.weight.val().inner()),
            w0,
            "{cfg:?}: base weight moved"
        );
        assert_eq!(
            to_vec(layer.base.bias.as_ref().unwrap().val().inner()),
            b0,
            "{cfg:?}: base bias moved"
        );
        assert_ne!(
            to_vec(layer.delta_weight().inner()),
            f0,
            "{cfg:?}: adapter did not train"
        );
        // Still frozen after the optimizer rebuilt the module.
        assert_eq!(count_params(&layer), counts);
    }
}

fn cfg_factor_count(cfg: &AdapterConfig) -> usize {
    match cfg {
        AdapterConfig::KronLora(_) => 3,
        _ => 2,
    }
}

#[test]
fn loss_falls_on_a_kronecker_task_and_merge_works_right_after() {
    let mut rng = Rng::new(22);
    let dev = device();
    let base = base_linear::<AB>(&mut rng, &dev);
    // The true update is a Kronecker product of the adapter's shapes.
    let a_true = rng.vec(4 * 6);
    let b_true = rng.vec(6 * 6);
    let dw_true = tensor::<AB, 2>(
        &kron_ref(&a_true, [4, 6], &b_true, [6, 6]),
        [D_IN, D_OUT],
        &dev,
    );
    let x = randn::<AB, 2>(&mut rng, [64, D_IN], &dev);
    let target = (base.forward(x.clone()) + x.clone().matmul(dw_true)).detach();

    let cfg = AdapterConfig::KronA(KronAConfig::new([4, 6], [6, 6]));
    let mut layer = AdaptedLinear::new(base, &cfg, &dev).unwrap();
    let mut optim = AdamWConfig::new().init();
    let mut losses = Vec::new();
    for _ in 0..150 {
        let loss = (layer.forward(x.clone()) - target.clone())
            .powf_scalar(2.0)
            .mean();
        losses.push(loss.clone().into_scalar());
        let grads = GradientsParams::from_grads(loss.backward(), &layer);
        layer = optim.step(3e-2, layer, grads);
    }
    let (first, last) = (losses[0], *losses.last().unwrap());
    assert!(last < 0.01 * first, "loss {first} → {last}");

    // Merge straight from the autodiff module.
    let merged = layer.merge().unwrap();
    let y_merged = to_vec(merged.forward(x.clone()).inner());
    let y = to_vec(layer.forward(x).inner());
    assert_close(&y_merged, &y, 1e-5, "merged after training");
    // And the inference module (valid) agrees.
    let valid = layer.valid();
    let xv = Tensor::<TB, 2>::from_data(TensorData::new(vec![0.5f32; D_IN], [1, D_IN]), &dev);
    assert_close(
        &to_vec(valid.merge().unwrap().forward(xv.clone())),
        &to_vec(valid.forward(xv)),
        1e-5,
        "valid",
    );
    let _ = layer.adapter.as_ref().unwrap().d_in();
}

#[test]
fn clones_share_their_initial_factors() {
    let dev = device();
    let mut rng = Rng::new(23);
    let cfg = AdapterConfig::KronLora(
        KronLoraConfig::new([4, 6], [6, 6], 2).with_init(kron_adapters::FactorInit::Normal),
    );
    let layer = AdaptedLinear::new(base_linear::<TB>(&mut rng, &dev), &cfg, &dev).unwrap();
    let copy = layer.clone();
    assert_eq!(to_vec(copy.delta_weight()), to_vec(layer.delta_weight()));
}

#[test]
fn built_on_the_inner_backend_then_moved_to_autodiff_trains_the_adapter_only() {
    let dev = device();
    let mut rng = Rng::new(24);
    for cfg in [
        AdapterConfig::KronA(KronAConfig::new([4, 6], [6, 6])),
        AdapterConfig::Lora(LoraConfig::new(2)),
    ] {
        let layer = AdaptedLinear::new(base_linear::<TB>(&mut rng, &dev), &cfg, &dev).unwrap();
        let trainable = layer.param_counts().trainable;
        let ad: AdaptedLinear<AB> = layer.train();
        let counts = count_params(&ad);
        assert_eq!(counts.trainable, trainable, "{cfg:?}");
        assert_eq!(counts.total, D_IN * D_OUT + D_OUT + trainable);
    }
}
