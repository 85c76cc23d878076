//! Half-precision frozen base (`AdapterLayers::cast_base`): the base's linear weights in f16,
//! the adapters, their gradients and AdamW's state in f32; outputs and adapter gradients agree
//! with the float32 model to f16's precision. On flex (CPU) and, in the wgpu suite, on wgpu.

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{DType, FloatDType, Int, Tensor, TensorData};
use kron_adapters::model::bert::classifier_from_source;
use kron_adapters::model::{BertClassifier, BertConfig, TensorSource};
use kron_adapters::{
    AdapterConfig, AdapterLayers, FactorInit, KronAConfig, LinearAdapter, PlacementConfig,
};

use crate::common::assert_close;

/// dtypes of trainable and frozen float parameters.
struct Dtypes(Vec<DType>, Vec<DType>);

impl<B: burn::tensor::backend::Backend> ModuleVisitor<B> for Dtypes {
    fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
        if p.is_require_grad() {
            self.0.push(p.dtype());
        } else {
            self.1.push(p.dtype());
        }
    }
}

fn adapter_grads<B: AutodiffBackend>(m: &BertClassifier<B>, g: &B::Gradients) -> Vec<f32> {
    m.adapter_layers()
        .into_iter()
        .filter_map(|(_, l)| l.adapter.as_ref())
        .flat_map(|a| a.factors())
        .flat_map(|f| {
            f.grad(g)
                .map(|t| t.into_data().convert::<f32>().to_vec::<f32>().unwrap())
                .unwrap_or_default()
        })
        .collect()
}

fn check<B: AutodiffBackend>() {
    let dev: B::Device = Default::default();
    let mut cfg = BertConfig::tiny(40);
    cfg.hidden_dropout_prob = 0.0;
    cfg.attention_probs_dropout_prob = 0.0;
    let placement = PlacementConfig::linear(AdapterConfig::KronA(
        KronAConfig::auto().with_init(FactorInit::Normal),
    ));
    let full: BertClassifier<B> =
        classifier_from_source(TensorSource::random(8), &cfg, &placement, 3, &dev).unwrap();
    let ids: Vec<i64> = (0..4 * 9).map(|i| 4 + (i * 7 % 36) as i64).collect();
    let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [4, 9]), &dev);
    let mask = Tensor::<B, 2, Int>::ones([4, 9], &dev);
    // Burn initializes parameters lazily and a clone of an uninitialized one initializes on its
    // own (other random values): run the model once before cloning.
    let y32 = full.forward(ids.clone(), mask.clone());
    let half = full.clone().cast_base(FloatDType::F16);
    let mut d = Dtypes(vec![], vec![]);
    half.visit(&mut d);
    assert!(
        d.0.iter().all(|t| *t == DType::F32),
        "trainable parameters stay f32: {:?}",
        d.0
    );
    let f16 = d.1.iter().filter(|t| **t == DType::F16).count();
    assert_eq!(
        f16,
        2 * 6 * cfg.num_hidden_layers,
        "every adapted layer's weight and bias in f16"
    );

    let y16 = half.forward(ids, mask);
    assert_eq!(y16.dtype(), DType::F32, "activations stay f32");
    let to = |t: Tensor<B, 2>| t.into_data().convert::<f32>().to_vec::<f32>().unwrap();
    assert_close(
        &to(y16.clone()),
        &to(y32.clone()),
        2e-2,
        "logits, f16 base vs f32",
    );
    let (g32, g16) = (
        y32.powf_scalar(2.0).mean().backward(),
        y16.clone().powf_scalar(2.0).mean().backward(),
    );
    let (a, b) = (adapter_grads(&full, &g32), adapter_grads(&half, &g16));
    assert!(!a.is_empty() && b.iter().all(|v| v.is_finite()));
    assert_close(&b, &a, 5e-2, "adapter gradients, f16 base vs f32");
    // An optimizer step updates the adapters (f32) and leaves the f16 base as it was.
    let grads = GradientsParams::from_grads(g16, &half);
    let mut optim = AdamWConfig::new().init::<B, BertClassifier<B>>();
    let stepped = optim.step(1e-2, half.clone(), grads);
    let base = |m: &BertClassifier<B>| {
        m.encoder.layers[0]
            .intermediate
            .base
            .weight
            .val()
            .into_data()
    };
    assert_eq!(base(&stepped).dtype, DType::F16);
    assert_eq!(base(&stepped).bytes, base(&half).bytes);
    assert_eq!(
        base(&half).bytes.len() * 2,
        base(&full).bytes.len(),
        "half the bytes"
    );
}

#[cfg(feature = "flex")]
#[test]
fn half_precision_base_on_flex() {
    check::<burn::backend::Autodiff<burn::backend::Flex>>();
}

#[cfg(any(feature = "wgpu", feature = "cuda"))]
#[test]
fn half_precision_base_on_the_gpu_backend() {
    check::<crate::common::AB>();
}
