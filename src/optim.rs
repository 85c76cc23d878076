//! AdamW with its step fused into one pass on burn-flex: [`FusedAdamW`].
//!
//! Burn's `AdamW` updates a parameter by about a dozen element-wise tensor operations (the two
//! moments, their bias corrections, the square root, the division, the decay, the update),
//! each a pass over the parameter's size that allocates its result. For full fine-tuning
//! that is a dozen passes over every weight of the model per step, and MiniLM's 47 MB word
//! embedding makes each of them a fresh mapping of memory that the kernel clears. On burn-flex
//! (`f32`) [`FusedAdamW`] makes one pass that reads the parameter, its gradient and both
//! moments and writes the parameter and the moments in place (rows split over threads), with
//! Burn's formulas in Burn's order of operations:
//!
//! ```text
//! m ← β₁·m + (1 − β₁)·g            v ← β₂·v + (1 − β₂)·g²
//! Δ ← (m / (1 − β₁ᵗ)) / (√(v / (1 − β₂ᵗ)) + ε)
//! w ← w·(1 − lr·λ) − lr·Δ
//! ```
//!
//! Its state is Burn's `AdamWState`, so records (checkpoints, resumed runs) are those of Burn's
//! `AdamW`. Elsewhere (other backends, other float types, AMSGrad, cautious weight decay) each
//! step is Burn's `AdamW::step` itself.
//!
//! ```
//! use burn::backend::{Autodiff, NdArray};
//! use burn::nn::{Linear, LinearConfig};
//! use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
//! use burn::tensor::Tensor;
//!
//! type B = Autodiff<NdArray>;
//! let device = Default::default();
//! let model: Linear<B> = LinearConfig::new(4, 2).init(&device);
//! let mut optim = kron_adapters::optim::adamw::<B, Linear<B>>(&AdamWConfig::new());
//! let loss = model.forward(Tensor::<B, 2>::ones([3, 4], &device)).sum();
//! let grads = GradientsParams::from_grads(loss.backward(), &model);
//! let model = optim.step(1e-3, model, grads);
//! # let _ = model;
//! ```

use burn::module::AutodiffModule;
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::grad_clipping::GradientClippingConfig;
use burn::optim::{
    AdamW, AdamWConfig, AdamWState, AdaptiveMomentumState, LearningRate, SimpleOptimizer,
};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorData};
use rayon::prelude::*;
use serde::Deserialize;

use crate::act::{slice_mut, values, Isa};

/// Burn's `AdamW`, its step one fused pass on burn-flex (module docs). Built by [`adamw`] or
/// [`FusedAdamW::new`] from an `AdamWConfig`.
#[derive(Clone)]
pub struct FusedAdamW {
    /// Burn's optimizer, for the steps the fused pass does not take.
    inner: AdamW,
    /// The hyperparameters of the fused pass; `None` where the configuration asks for what it
    /// does not do (AMSGrad, cautious weight decay).
    fused: Option<Hyper>,
}

/// [`FusedAdamW`]'s hyperparameters, as `AdamWConfig` names them.
#[derive(Clone, Copy, Debug, Deserialize)]
struct Hyper {
    beta_1: f32,
    beta_2: f32,
    epsilon: f32,
    weight_decay: f32,
    #[serde(default)]
    cautious_weight_decay: bool,
    #[serde(default)]
    amsgrad: bool,
}

impl std::fmt::Debug for FusedAdamW {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Burn's `AdamW` has no `Debug`; the hyperparameters say what it was built from.
        f.debug_struct("FusedAdamW")
            .field("fused", &self.fused)
            .finish_non_exhaustive()
    }
}

/// `AdamWConfig`'s serialized form, which names its fields (private in Burn).
fn serialized(config: &AdamWConfig) -> Option<serde_json::Value> {
    serde_json::to_value(config).ok()
}

impl FusedAdamW {
    /// The optimizer `config` describes (its gradient clipping aside: [`adamw`] applies it).
    pub fn new(config: &AdamWConfig) -> Self {
        Self::from_serialized(config, serialized(config).as_ref())
    }

    fn from_serialized(config: &AdamWConfig, fields: Option<&serde_json::Value>) -> Self {
        let fused = fields
            .and_then(|v| Hyper::deserialize(v).ok())
            .filter(|h| !h.amsgrad && !h.cautious_weight_decay);
        Self {
            inner: config.build(),
            fused,
        }
    }

    /// The hyperparameters of the fused pass where it takes this step: burn-flex, `f32`, a
    /// configuration it does (no AMSGrad, no cautious weight decay).
    fn fuses<B: Backend, const D: usize>(
        &self,
        tensor: &Tensor<B, D>,
        grad: &Tensor<B, D>,
        state: Option<&AdamWState<B, D>>,
    ) -> Option<Hyper> {
        let host = crate::quirks::host_loops_take(tensor, grad)
            && state.is_none_or(|s| {
                s.momentum.max_moment_2.is_none()
                    && crate::quirks::host_loops_take(&s.momentum.moment_1, tensor)
                    && crate::quirks::host_loops_take(&s.momentum.moment_2, tensor)
            });
        self.fused.filter(|_| host)
    }
}

/// `config`'s optimizer with the fused step, wrapped as `AdamWConfig::init` wraps Burn's (its
/// gradient clipping included).
pub fn adamw<B: AutodiffBackend, M: AutodiffModule<B>>(
    config: &AdamWConfig,
) -> OptimizerAdaptor<FusedAdamW, M, B> {
    let fields = serialized(config);
    let optim = OptimizerAdaptor::from(FusedAdamW::from_serialized(config, fields.as_ref()));
    let clipping = (fields.as_ref())
        .and_then(|v| v.get("grad_clipping"))
        .and_then(|v| Option::<GradientClippingConfig>::deserialize(v).ok())
        .flatten();
    match clipping {
        Some(clipping) => optim.with_grad_clipping(clipping.init()),
        None => optim,
    }
}

/// Parameter values per task of the fused pass's split over threads (fixed: the result does
/// not depend on the number of threads, each value being updated on its own anyway).
const CHUNK: usize = 1 << 16;

impl<B: Backend> SimpleOptimizer<B> for FusedAdamW {
    type State<const D: usize> = AdamWState<B, D>;

    fn step<const D: usize>(
        &self,
        lr: LearningRate,
        tensor: Tensor<B, D>,
        grad: Tensor<B, D>,
        state: Option<Self::State<D>>,
    ) -> (Tensor<B, D>, Option<Self::State<D>>) {
        let Some(h) = self.fuses(&tensor, &grad, state.as_ref()) else {
            return self.inner.step(lr, tensor, grad, state);
        };
        let device = tensor.device();
        let shape = tensor.shape();
        let len = shape.num_elements();
        let (mut w, g) = (values(tensor), values(grad));
        let (mut m, mut v, time) = match state {
            Some(s) => (
                values(s.momentum.moment_1),
                values(s.momentum.moment_2),
                s.momentum.time + 1,
            ),
            None => {
                let zeros = || TensorData::new(vec![0f32; len], shape.clone());
                (zeros(), zeros(), 1)
            }
        };
        let t = time as i32;
        let k = Constants {
            b1: h.beta_1,
            b2: h.beta_2,
            f1: 1.0 - h.beta_1,
            f2: 1.0 - h.beta_2,
            c1: 1.0 - h.beta_1.powi(t),
            c2: 1.0 - h.beta_2.powi(t),
            eps: h.epsilon,
            keep: (1.0 - lr * h.weight_decay as f64) as f32,
            lr: lr as f32,
        };
        let g = crate::act::floats(&g);
        (slice_mut(&mut w).par_chunks_mut(CHUNK))
            .zip(slice_mut(&mut m).par_chunks_mut(CHUNK))
            .zip(slice_mut(&mut v).par_chunks_mut(CHUNK))
            .zip(g.par_chunks(CHUNK))
            .for_each(|(((w, m), v), g)| update(update_isa(), &k, w, m, v, g));
        let tensor = |data: TensorData| Tensor::<B, D>::from_data(data, &device);
        let momentum = AdaptiveMomentumState::new(time, tensor(m), tensor(v));
        (tensor(w), Some(AdamWState::new(momentum)))
    }

    fn to_device<const D: usize>(state: Self::State<D>, device: &B::Device) -> Self::State<D> {
        <AdamW as SimpleOptimizer<B>>::to_device(state, device)
    }
}

/// The step's scalars, each in `f32` as Burn's scalar operations take them.
struct Constants {
    b1: f32,
    b2: f32,
    f1: f32,
    f2: f32,
    /// The bias corrections `1 − β₁ᵗ`, `1 − β₂ᵗ`.
    c1: f32,
    c2: f32,
    eps: f32,
    /// `1 − lr·λ`.
    keep: f32,
    lr: f32,
}

/// The widest build of [`update`] worth running: the AVX2 one where the CPU has it (4M values,
/// one thread, on this project's Xeon: 2.83–2.88 ms against 3.40–3.68 for the baseline build;
/// the AVX-512 build, 3.02–3.33 ms, was slower: the pass is bound by memory, and the wider
/// divisions and square roots did not pay).
fn update_isa() -> Isa {
    match Isa::best() {
        Isa::Avx512 => Isa::Avx2,
        isa => isa,
    }
}

/// One chunk of the fused pass, compiled for `isa`'s vectors (the same operations per value in
/// every build: separate products and sums, no fused multiply-add, so the same bits).
fn update(isa: Isa, k: &Constants, w: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32]) {
    crate::act::dispatch!(
        isa,
        update_avx2,
        (k: &Constants, w: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32]),
        {
            for (((w, m), v), &g) in w.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(g) {
                *m = *m * k.b1 + g * k.f1;
                *v = *v * k.b2 + (g * g) * k.f2;
                let delta = (*m / k.c1) / ((*v / k.c2).sqrt() + k.eps);
                *w = *w * k.keep - delta * k.lr;
            }
        }
    )
}

#[cfg(test)]
mod tests {
    use burn::nn::{Linear, LinearConfig};
    use burn::optim::grad_clipping::GradientClippingConfig;
    use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
    use burn::tensor::backend::AutodiffBackend;
    use burn::tensor::{Tensor, TensorData};

    use super::{adamw, FusedAdamW};

    /// Deterministic values in [−1, 1).
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = crate::rng::SplitMix64::new(seed);
        (0..n).map(|_| (rng.uniform() * 2.0 - 1.0) as f32).collect()
    }

    /// A linear layer trained for `steps` steps on fixed random batches by `step`, its weight
    /// and bias after each step.
    fn train<B: AutodiffBackend>(
        mut step: impl FnMut(Linear<B>, GradientsParams) -> Linear<B>,
        steps: usize,
    ) -> Vec<Vec<f32>> {
        let device = Default::default();
        let mut model: Linear<B> = LinearConfig::new(37, 19).init(&device);
        let w = TensorData::new(values(37 * 19, 1), [37, 19]);
        model.weight = model
            .weight
            .map(|_| Tensor::from_data(w, &device).require_grad());
        let b = TensorData::new(values(19, 2), [19]);
        model.bias = (model.bias).map(|p| p.map(|_| Tensor::from_data(b, &device).require_grad()));
        let mut seen = Vec::new();
        for s in 0..steps {
            let x = Tensor::<B, 2>::from_data(
                TensorData::new(values(5 * 37, 10 + s as u64), [5, 37]),
                &device,
            );
            let loss = model.forward(x).powi_scalar(2).sum();
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            model = step(model, grads);
            let w: Vec<f32> = model.weight.val().into_data().to_vec().unwrap();
            let b: Vec<f32> = model
                .bias
                .as_ref()
                .unwrap()
                .val()
                .into_data()
                .to_vec()
                .unwrap();
            seen.push([w, b].concat());
        }
        seen
    }

    /// Against Burn's `AdamW` step by step, with weight decay and clipping: within `f32`
    /// rounding on flex (the fused pass), equal elsewhere (Burn's step itself).
    fn matches_burns_adamw<B: AutodiffBackend>(tolerance: f32) {
        let config = AdamWConfig::new()
            .with_weight_decay(0.05)
            .with_beta_1(0.8)
            .with_grad_clipping(Some(GradientClippingConfig::Norm(3.0)));
        let mut burns = config.init::<B, Linear<B>>();
        let mut fused = adamw::<B, Linear<B>>(&config);
        let want = train::<B>(|m, g| burns.step(3e-2, m, g), 4);
        let got = train::<B>(|m, g| fused.step(3e-2, m, g), 4);
        for (s, (got, want)) in got.iter().zip(&want).enumerate() {
            for (i, (x, y)) in got.iter().zip(want).enumerate() {
                assert!(
                    (x - y).abs() <= tolerance * (1.0 + y.abs()),
                    "step {s} value {i}: {x} against Burn's {y}"
                );
            }
        }
        // The steps moved the parameters: not a comparison of untouched values.
        let first = train::<B>(|m, _| m, 1);
        assert!(want[3]
            .iter()
            .zip(&first[0])
            .any(|(a, b)| (a - b).abs() > 1e-2));
    }

    /// Does the fused pass take a step on backend `B`'s `f32` tensors?
    fn fused_on<B: burn::tensor::backend::Backend>() -> bool {
        let device = Default::default();
        let t = Tensor::<B, 1>::ones([3], &device);
        FusedAdamW::new(&AdamWConfig::new())
            .fuses(&t, &t, None)
            .is_some()
    }

    #[cfg(feature = "flex")]
    #[test]
    fn the_fused_step_is_burns_adamw_on_flex() {
        assert!(fused_on::<burn::backend::Flex>());
        matches_burns_adamw::<burn::backend::Autodiff<burn::backend::Flex>>(1e-6);
    }

    #[cfg(feature = "ndarray")]
    #[test]
    fn elsewhere_the_step_is_burns_adamw() {
        assert!(!fused_on::<burn::backend::NdArray>());
        matches_burns_adamw::<burn::backend::Autodiff<burn::backend::NdArray>>(0.0);
    }

    /// A record of Burn's `AdamW` (saved as bytes) loads into [`FusedAdamW`] and back: the
    /// state is Burn's `AdamWState`, so checkpoints of either resume with the other.
    #[cfg(feature = "flex")]
    #[test]
    fn records_of_burns_adamw_load_and_resume() {
        use burn::record::{BinBytesRecorder, FullPrecisionSettings, Recorder};
        type B = burn::backend::Autodiff<burn::backend::Flex>;
        let config = AdamWConfig::new().with_weight_decay(0.05);
        let recorder = BinBytesRecorder::<FullPrecisionSettings>::default();
        let device = Default::default();
        let (mut burns, mut fused) = (
            config.init::<B, Linear<B>>(),
            adamw::<B, Linear<B>>(&config),
        );
        // Two steps by Burn's; the third by each, the fused one from the bytes of the record.
        let mut third = Vec::new();
        for resumed in [false, true] {
            let mut n = 0;
            let steps = train::<B>(
                |m, g| {
                    n += 1;
                    if resumed && n == 3 {
                        let bytes = recorder.record(burns.to_record(), ()).unwrap();
                        let record = recorder.load(bytes, &device).unwrap();
                        fused = fused.clone().load_record(record);
                        fused.step(3e-2, m, g)
                    } else {
                        burns.step(3e-2, m, g)
                    }
                },
                3,
            );
            third.push(steps[2].clone());
            burns = config.init::<B, Linear<B>>();
        }
        for (i, (x, y)) in third[1].iter().zip(&third[0]).enumerate() {
            assert!(
                (x - y).abs() <= 1e-6 * (1.0 + y.abs()),
                "value {i}: {x} against {y}"
            );
        }
        // And the fused optimizer's record loads into Burn's.
        let bytes = recorder.record(fused.to_record(), ()).unwrap();
        let record = recorder.load(bytes, &device).unwrap();
        let burns = config.init::<B, Linear<B>>().load_record(record);
        assert_eq!(burns.to_record().len(), 2, "weight and bias");
    }

    #[test]
    fn the_configuration_is_read_and_what_the_pass_does_not_do_is_left_to_burn() {
        let h = FusedAdamW::new(&AdamWConfig::new().with_beta_2(0.95).with_epsilon(1e-7))
            .fused
            .expect("a plain AdamW is fused");
        assert_eq!((h.beta_1, h.beta_2, h.epsilon), (0.9, 0.95, 1e-7));
        assert!(FusedAdamW::new(&AdamWConfig::new().with_amsgrad(true))
            .fused
            .is_none());
        let cautious = AdamWConfig::new().with_cautious_weight_decay(true);
        assert!(FusedAdamW::new(&cautious).fused.is_none());
    }
}
