//! Block adapters (KronA^B, KronA^B_res, Parallel Adapter, Adapter, Compacter) and the BitFit /
//! full fine-tuning modes: behaviour at init, forwards against loop references, which
//! parameters get gradients, parameter counts and configuration errors.

use crate::common::*;

use burn::module::{Module, Param};
use burn::nn::{Linear, LinearConfig};
use burn::tensor::{
    activation,
    backend::{AutodiffBackend, Backend},
    Tensor,
};
use kron_adapters::block::{
    Activation, BlockAdapterConfig, BlockAdapters, CompacterConfig, HoulsbyConfig, KronABConfig,
    ParallelAdapterConfig, Residual,
};
use kron_adapters::training::{bitfit, full_finetune, is_bias};
use kron_adapters::{
    count_params, AdaptedLinear, AdapterConfig, ConfigError, KronAConfig, TrainMode,
};

const D: usize = 24;

/// The block: f(x) = relu(x·w1 + b1)·w2 + b2, frozen.
#[derive(Module, Debug)]
struct Ffn<B: Backend> {
    up: Linear<B>,
    down: Linear<B>,
}

impl<B: Backend> Ffn<B> {
    fn new(rng: &mut Rng, dev: &B::Device) -> Self {
        let mut lin = |i: usize, o: usize| {
            let mut l = LinearConfig::new(i, o).init::<B>(dev);
            l.weight = l
                .weight
                .map(|_| randn::<B, 2>(rng, [i, o], dev).mul_scalar(0.3));
            l.bias = l.bias.map(|p| p.map(|_| randn::<B, 1>(rng, [o], dev)));
            l
        };
        Self {
            up: lin(D, 2 * D),
            down: lin(2 * D, D),
        }
        .no_grad()
    }
    fn forward<const N: usize>(&self, x: Tensor<B, N>) -> Tensor<B, N> {
        self.down.forward(activation::relu(self.up.forward(x)))
    }
}

fn all_configs() -> Vec<BlockAdapterConfig> {
    vec![
        BlockAdapterConfig::KronAB(KronABConfig::new([4, 6], [6, 4])),
        BlockAdapterConfig::KronAB(KronABConfig::new([4, 6], [6, 4]).with_biases(2)),
        BlockAdapterConfig::KronAB(KronABConfig::new([6, 4], [4, 6]).with_biases(0)),
        BlockAdapterConfig::KronAB(KronABConfig::auto().with_residual(Residual::Learned)),
        BlockAdapterConfig::KronAB(
            KronABConfig::auto()
                .with_residual(Residual::Sigmoid)
                .with_biases(2),
        ),
        BlockAdapterConfig::ParallelAdapter(ParallelAdapterConfig::new(2)),
        BlockAdapterConfig::Adapter(HoulsbyConfig::new().with_reduction_factor(4)),
        BlockAdapterConfig::Compacter(CompacterConfig::new().with_reduction_factor(3)),
    ]
}

fn residual_of(cfg: &BlockAdapterConfig) -> Residual {
    match cfg {
        BlockAdapterConfig::KronAB(c) => c.residual,
        _ => Residual::None,
    }
}

#[test]
fn at_init_the_block_output_is_unchanged_except_res_which_adds_x() {
    let dev = device();
    let mut rng = Rng::new(40);
    let ffn = Ffn::<TB>::new(&mut rng, &dev);
    for cfg in all_configs() {
        let adapters = BlockAdapters::<TB>::new(&cfg, D, 2, &dev).unwrap();
        let x = randn::<TB, 3>(&mut rng, [2, 5, D], &dev);
        {
            let fx = ffn.forward(x.clone());
            let y = to_vec(adapters.forward(1, x.clone(), fx.clone()));
            let want = match residual_of(&cfg) {
                Residual::None => to_vec(fx),
                // Exactly f(x) + x: the Kronecker part is zero and s_res = 1.
                Residual::Learned => to_vec(fx + x),
                Residual::Sigmoid => to_vec(fx + x.mul_scalar(1.0 / (1.0 + (-1f64).exp()))),
            };
            if residual_of(&cfg) == Residual::Sigmoid {
                assert!(max_abs_diff(&y, &want) < 1e-6, "{cfg:?}");
            } else {
                assert_eq!(y, want, "{cfg:?}");
            }
        }
    }
}

/// Replaces every parameter of a module by seeded normal values (so no factor is zero).
fn randomize<B: Backend, M: Module<B>>(m: M, rng: &mut Rng, dev: &B::Device) -> M {
    struct R<'a, B: Backend> {
        rng: &'a mut Rng,
        dev: B::Device,
    }
    impl<B: Backend> burn::module::ModuleMapper<B> for R<'_, B> {
        fn map_float<const N: usize>(&mut self, p: Param<Tensor<B, N>>) -> Param<Tensor<B, N>> {
            let shape: [usize; N] = p.dims();
            let fresh = randn::<B, N>(self.rng, shape, &self.dev).mul_scalar(0.5);
            p.map(|t| fresh.set_require_grad(t.is_require_grad()))
        }
    }
    m.map(&mut R {
        rng,
        dev: dev.clone(),
    })
}

fn vals<B: Backend, const N: usize>(p: &Param<Tensor<B, N>>) -> Vec<f32> {
    to_vec(p.val())
}

fn silu_ref(v: f32) -> f32 {
    v / (1.0 + (-v).exp())
}

fn add_bias(y: &mut [f32], bias: &[f32], s: f32) {
    let d = bias.len();
    for (i, v) in y.iter_mut().enumerate() {
        *v += s * bias[i % d];
    }
}

/// Loop reference of one block adapter on x [n, D] given fx.
fn reference(
    adapters: &BlockAdapters<TB>,
    layer: usize,
    x: &[f32],
    fx: &[f32],
    n: usize,
) -> Vec<f32> {
    let mut y = fx.to_vec();
    match adapters {
        BlockAdapters::KronAB(v) => {
            let m = &v[layer];
            let (a, b) = (vals(&m.kron.a), vals(&m.kron.b));
            let ([ai, ao], [bi, bo]) = (m.kron.a.dims(), m.kron.b.dims());
            let s = m.kron.scale as f32;
            let mid = m.bias_mid.as_ref().map(vals);
            // H[r, i, l] = Σ_k X[r, i, k] b[k, l] + mid[l]; Y[r, j, l] = Σ_i a[i, j] H[r, i, l]
            for r in 0..n {
                for j in 0..ao {
                    for l in 0..bo {
                        let mut acc = 0f64;
                        for i in 0..ai {
                            let mut h = mid.as_ref().map_or(0.0, |m| m[l] as f64);
                            for k in 0..bi {
                                h += x[r * D + i * bi + k] as f64 * b[k * bo + l] as f64;
                            }
                            acc += a[i * ao + j] as f64 * h;
                        }
                        y[r * D + j * bo + l] += s * acc as f32;
                    }
                }
            }
            if let Some(bias) = &m.bias {
                add_bias(&mut y, &vals(bias), s);
            }
            if let Some(res) = &m.res_scale {
                let g = vals(res)[0];
                let g = if m.residual == Residual::Sigmoid {
                    1.0 / (1.0 + (-g).exp())
                } else {
                    g
                };
                for (v, xv) in y.iter_mut().zip(x) {
                    *v += g * xv;
                }
            }
        }
        BlockAdapters::Parallel(v) => {
            let m = &v[layer];
            let r = m.down.dims()[1];
            let mut h = matmul_ref(x, n, D, &vals(&m.down), r);
            add_bias(&mut h, &vals(m.bias_down.as_ref().unwrap()), 1.0);
            let h: Vec<f32> = h.iter().map(|v| v.max(0.0)).collect();
            let mut o = matmul_ref(&h, n, r, &vals(&m.up), D);
            add_bias(&mut o, &vals(m.bias_up.as_ref().unwrap()), 1.0);
            for (v, ov) in y.iter_mut().zip(&o) {
                *v += m.scale as f32 * ov;
            }
        }
        BlockAdapters::Houlsby(v) => {
            let m = &v[layer];
            let r = m.down.dims()[1];
            let mut h = matmul_ref(fx, n, D, &vals(&m.down), r);
            add_bias(&mut h, &vals(&m.bias_down), 1.0);
            let h: Vec<f32> = h.iter().map(|v| silu_ref(*v)).collect();
            let mut o = matmul_ref(&h, n, r, &vals(&m.up), D);
            add_bias(&mut o, &vals(&m.bias_up), 1.0);
            for (v, ov) in y.iter_mut().zip(&o) {
                *v += ov;
            }
        }
        BlockAdapters::Compacter(stack) => {
            let m = &stack.layers[layer];
            // W = Σᵢ rule[i] ⊗ (s[:, i]·t[i, :]), materialized with loops.
            let rule = vals(&stack.rule);
            let nn = rule.len().pow(1) as f64;
            let n4 = (nn.cbrt().round()) as usize;
            let phm = |s: &[f32], [p, k]: [usize; 2], t: &[f32], q: usize| {
                let mut w = vec![0f32; n4 * p * n4 * q];
                for i in 0..k {
                    let a: Vec<f32> = rule[i * n4 * n4..(i + 1) * n4 * n4].to_vec();
                    let outer: Vec<f32> = (0..p)
                        .flat_map(|m| (0..q).map(move |l| (m, l)))
                        .map(|(m, l)| s[m * k + i] * t[i * q + l])
                        .collect();
                    for (wv, kv) in w.iter_mut().zip(kron_ref(&a, [n4, n4], &outer, [p, q])) {
                        *wv += kv;
                    }
                }
                w
            };
            let r = m.down_bias.dims()[0];
            let wd = phm(&vals(&m.down_s), m.down_s.dims(), &vals(&m.down_t), r / n4);
            let wu = phm(&vals(&m.up_s), m.up_s.dims(), &vals(&m.up_t), D / n4);
            let mut h = matmul_ref(fx, n, D, &wd, r);
            add_bias(&mut h, &vals(&m.down_bias), 1.0);
            let h: Vec<f32> = h.iter().map(|v| silu_ref(*v)).collect();
            let mut o = matmul_ref(&h, n, r, &wu, D);
            add_bias(&mut o, &vals(&m.up_bias), 1.0);
            for (v, ov) in y.iter_mut().zip(&o) {
                *v += ov;
            }
        }
    }
    y
}

#[test]
fn forwards_equal_loop_references_2d_and_3d() {
    let dev = device();
    let mut rng = Rng::new(41);
    let ffn = Ffn::<TB>::new(&mut rng, &dev);
    for cfg in all_configs() {
        let adapters = randomize(
            BlockAdapters::<TB>::new(&cfg, D, 2, &dev).unwrap(),
            &mut rng,
            &dev,
        );
        for layer in 0..2 {
            let x = rng.vec(6 * D);
            let x2 = tensor::<TB, 2>(&x, [6, D], &dev);
            let fx = to_vec(ffn.forward(x2.clone()));
            let want = reference(&adapters, layer, &x, &fx, 6);
            let got2 =
                to_vec(adapters.forward(layer, x2, ffn.forward(tensor::<TB, 2>(&x, [6, D], &dev))));
            assert_close(&got2, &want, 1e-5, &format!("{cfg:?} 2-D"));
            let x3 = tensor::<TB, 3>(&x, [2, 3, D], &dev);
            let got3 = adapters.forward(layer, x3.clone(), ffn.forward(x3));
            assert_eq!(got3.dims(), [2, 3, D]);
            assert_close(&to_vec(got3), &want, 1e-5, &format!("{cfg:?} 3-D"));
        }
    }
}

/// Every (path, has a non-zero gradient) of a module after a backward pass.
fn grad_paths<M: Module<AB>>(
    m: &M,
    grads: &<AB as burn::tensor::backend::AutodiffBackend>::Gradients,
) -> Vec<(String, bool)> {
    struct V<'a> {
        path: Vec<String>,
        grads: &'a <AB as burn::tensor::backend::AutodiffBackend>::Gradients,
        out: Vec<(String, bool)>,
    }
    impl burn::module::ModuleVisitor<AB> for V<'_> {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.path.push(name.into());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.pop();
        }
        fn visit_float<const N: usize>(&mut self, p: &Param<Tensor<AB, N>>) {
            let g = p
                .val()
                .grad(self.grads)
                .map(|g| to_vec(g).iter().any(|v| *v != 0.0))
                .unwrap_or(false);
            self.out.push((self.path.join("."), g));
        }
    }
    let mut v = V {
        path: vec![],
        grads,
        out: vec![],
    };
    m.visit(&mut v);
    v.out
}

#[test]
fn gradients_reach_the_adapter_and_not_the_block() {
    let dev = device();
    let mut rng = Rng::new(42);
    let ffn = Ffn::<AB>::new(&mut rng, &dev);
    for cfg in all_configs() {
        let adapters = randomize(
            BlockAdapters::<AB>::new(&cfg, D, 1, &dev).unwrap(),
            &mut rng,
            &dev,
        );
        let x = randn::<AB, 3>(&mut rng, [2, 3, D], &dev);
        let y = adapters.forward(0, x.clone(), ffn.forward(x));
        let grads = y.powf_scalar(2.0).sum().backward();
        let paths = grad_paths(&adapters, &grads);
        assert!(!paths.is_empty());
        for (path, has) in &paths {
            assert!(has, "{cfg:?}: adapter parameter {path} got no gradient");
        }
        for (path, has) in grad_paths(&ffn, &grads) {
            assert!(
                !has,
                "{cfg:?}: frozen block parameter {path} got a gradient"
            );
        }
        // The structural count agrees with the require_grad flags.
        assert_eq!(
            count_params(&adapters).trainable,
            cfg.num_params(D, 1).unwrap(),
            "{cfg:?}"
        );
    }
}

#[test]
fn compacter_shared_rule_receives_the_sum_of_every_layers_gradient() {
    let dev = device();
    let mut rng = Rng::new(43);
    let cfg = BlockAdapterConfig::Compacter(CompacterConfig::new().with_reduction_factor(3));
    let adapters = randomize(
        BlockAdapters::<AB>::new(&cfg, D, 2, &dev).unwrap(),
        &mut rng,
        &dev,
    );
    let h0 = randn::<AB, 2>(&mut rng, [4, D], &dev);
    let h1 = randn::<AB, 2>(&mut rng, [4, D], &dev);
    let loss = |layers: &[usize]| {
        layers
            .iter()
            .map(|&l| {
                let h = if l == 0 { h0.clone() } else { h1.clone() };
                adapters.forward(l, h.clone(), h).powf_scalar(2.0).sum()
            })
            .reduce(|a, b| a + b)
            .unwrap()
    };
    let BlockAdapters::Compacter(stack) = &adapters else {
        panic!("a Compacter config builds a Compacter stack")
    };
    let rule = &stack.rule;
    let g = |layers: &[usize]| to_vec(rule.val().grad(&loss(layers).backward()).unwrap());
    let (g0, g1, both) = (g(&[0]), g(&[1]), g(&[0, 1]));
    let sum: Vec<f32> = g0.iter().zip(&g1).map(|(a, b)| a + b).collect();
    assert_close(&both, &sum, 1e-5, "shared rule gradient");
    assert!(
        max_abs_diff(&g0, &g1) > 1e-3,
        "the two layers contribute different gradients"
    );
    // One tensor, counted once.
    assert_eq!(
        count_params(&adapters).trainable,
        cfg.num_params(D, 2).unwrap()
    );
}

#[test]
fn parameter_counts_match_the_formulas() {
    let dev = device();
    // The paper's T5-base shapes: d = 768, KronA^B factors (32, 24) / (24, 32).
    for (cfg, d, layers, want) in [
        (
            BlockAdapterConfig::KronAB(KronABConfig::new([32, 24], [24, 32])),
            768,
            1,
            32 * 24 + 24 * 32 + 768,
        ),
        (
            BlockAdapterConfig::KronAB(
                KronABConfig::new([32, 24], [24, 32])
                    .with_biases(2)
                    .with_residual(Residual::Learned),
            ),
            768,
            2,
            2 * (1536 + 768 + 32 + 1),
        ),
        (
            BlockAdapterConfig::ParallelAdapter(ParallelAdapterConfig::new(2)),
            768,
            1,
            2 * 1536 + 2 + 768,
        ),
        (
            BlockAdapterConfig::Adapter(HoulsbyConfig::new()),
            768,
            3,
            3 * (2 * 768 * 24 + 24 + 768),
        ),
        (
            BlockAdapterConfig::Compacter(CompacterConfig::new()),
            768,
            12,
            12 * (3 * 768 + 3 * 24) + 64,
        ),
        (
            BlockAdapterConfig::Compacter(CompacterConfig::new().with_n(2).with_bottleneck(12)),
            384,
            6,
            6 * (3 * 384 + 36) + 8,
        ),
    ] {
        assert_eq!(cfg.num_params(d, layers).unwrap(), want, "{cfg:?}");
        let m = BlockAdapters::<TB>::new(&cfg, d, layers, &dev).unwrap();
        assert_eq!(m.num_params(), want, "{cfg:?}: module");
    }
}

#[test]
fn configs_are_json_and_errors_are_typed() {
    for cfg in all_configs() {
        let json = serde_json::to_string(&cfg).unwrap();
        assert_eq!(
            serde_json::from_str::<BlockAdapterConfig>(&json).unwrap(),
            cfg,
            "{json}"
        );
    }
    let c: BlockAdapterConfig =
        serde_json::from_str(r#"{"method": "KronAB", "a_shape": [32, 24], "residual": "Learned"}"#)
            .unwrap();
    assert_eq!(
        c,
        BlockAdapterConfig::KronAB(
            KronABConfig::auto()
                .with_residual(Residual::Learned)
                .tap_a([32, 24])
        )
    );
    assert!(serde_json::from_str::<BlockAdapterConfig>(
        r#"{"method": "Adapter", "reduction": 16}"#
    )
    .is_err());
    let c: BlockAdapterConfig = serde_json::from_str(r#"{"method": "Compacter"}"#).unwrap();
    assert_eq!(c, BlockAdapterConfig::Compacter(CompacterConfig::new()));

    let dev = device();
    let err =
        |cfg: BlockAdapterConfig, d: usize| BlockAdapters::<TB>::new(&cfg, d, 2, &dev).unwrap_err();
    let e = err(
        BlockAdapterConfig::KronAB(KronABConfig::new([4, 6], [6, 4]).with_biases(3)),
        D,
    );
    assert!(
        matches!(&e, ConfigError::Invalid { field, .. } if field == "biases"),
        "{e}"
    );
    assert!(e.to_string().starts_with("block 0"), "{e}");
    assert!(matches!(
        err(
            BlockAdapterConfig::KronAB(KronABConfig::new([5, 6], [6, 4])),
            D
        ),
        ConfigError::FactorShape(_)
    ));
    assert!(matches!(
        err(
            BlockAdapterConfig::ParallelAdapter(ParallelAdapterConfig::new(0)),
            D
        ),
        ConfigError::Rank { .. }
    ));
    assert!(matches!(
        err(
            BlockAdapterConfig::ParallelAdapter(ParallelAdapterConfig::new(2).with_scale(f64::NAN)),
            D
        ),
        ConfigError::Invalid { .. }
    ));
    assert!(matches!(
        err(
            BlockAdapterConfig::Adapter(HoulsbyConfig::new().with_reduction_factor(0)),
            D
        ),
        ConfigError::Invalid { .. }
    ));
    assert!(
        matches!(
            err(BlockAdapterConfig::Adapter(HoulsbyConfig::new()), D),
            ConfigError::Invalid { .. }
        ),
        "24 / 32 = 0"
    );
    let e = err(
        BlockAdapterConfig::Compacter(CompacterConfig::new().with_n(5).with_bottleneck(6)),
        D,
    );
    assert!(
        matches!(&e, ConfigError::Invalid { field, .. } if field == "n"),
        "{e}"
    );
    assert!(e.to_string().contains("[1, 2, 3, 6]"), "{e}");
    // A residual needs d_in = d_out.
    let e = KronABConfig::new([4, 6], [6, 2])
        .with_residual(Residual::Learned)
        .init::<TB>(24, 12, &dev)
        .unwrap_err();
    assert!(
        matches!(&e, ConfigError::Invalid { field, .. } if field == "residual"),
        "{e}"
    );
}

trait TapA {
    fn tap_a(self, a: [usize; 2]) -> Self;
}
impl TapA for KronABConfig {
    fn tap_a(mut self, a: [usize; 2]) -> Self {
        self.a_shape = Some(a);
        self
    }
}

#[test]
fn activation_choice_is_used() {
    let dev = device();
    let x = tensor::<TB, 1>(&[-1.0, 0.5, 2.0], [3], &dev);
    assert_eq!(
        to_vec(Activation::Relu.apply(x.clone())),
        vec![0.0, 0.5, 2.0]
    );
    let s = to_vec(Activation::Silu.apply(x.clone()));
    assert!((s[0] - silu_ref(-1.0)).abs() < 1e-6 && (s[2] - silu_ref(2.0)).abs() < 1e-6);
    let g = to_vec(Activation::Gelu.apply(x));
    assert!((g[2] - 1.9545).abs() < 1e-3 && (g[0] + 0.1587).abs() < 1e-3);
}

/// `Φ(x)`, the standard normal CDF, in f64 from erf's Taylor series (converges to f64 precision
/// for the `|x| ≤ 4` used here): a reference independent of any backend's `erf`.
fn normal_cdf(x: f64) -> f64 {
    let z = x / std::f64::consts::SQRT_2;
    let (mut term, mut sum) = (z, z);
    for n in 1..100 {
        term *= -z * z / n as f64;
        sum += term / (2 * n + 1) as f64;
    }
    0.5 * (1.0 + sum * 2.0 / std::f64::consts::PI.sqrt())
}

/// GELU is `x·Φ(x)` and its gradient the exact derivative `Φ(x) + x·φ(x)`, not the tanh
/// approximation's (Burn 0.21's default backward, which ndarray and the CubeCL backends
/// inherit: off by up to 8.7e-4 near |x| = 2, well above the tolerance).
fn check_gelu<B: Backend, A: AutodiffBackend>(dev: &B::Device, adev: &A::Device) {
    let pdf = |x: f64| (-x * x / 2.0).exp() / (2.0 * std::f64::consts::PI).sqrt();
    let f = |x: f64| x * normal_cdf(x);
    let df = |x: f64| normal_cdf(x) + x * pdf(x);
    check_activation::<B, A>(Activation::Gelu, &f, &df, dev, adev);
}

/// SiLU is `x·σ(x)`, its gradient `σ(x)·(1 + x·(1 − σ(x)))`.
fn check_silu<B: Backend, A: AutodiffBackend>(dev: &B::Device, adev: &A::Device) {
    let sigmoid = |x: f64| 1.0 / (1.0 + (-x).exp());
    let f = |x: f64| x * sigmoid(x);
    let df = |x: f64| sigmoid(x) * (1.0 + x * (1.0 - sigmoid(x)));
    check_activation::<B, A>(Activation::Silu, &f, &df, dev, adev);
}

/// `act` against `f` and its gradient against `df` (`f64` references), without and with the
/// crate's backward registered (with it, on flex, the host kernels of `src/act.rs` run as one
/// autodiff node on the flattened values): on a 2-D input inside a larger graph.
fn check_activation<B: Backend, A: AutodiffBackend>(
    act: Activation,
    f: &dyn Fn(f64) -> f64,
    df: &dyn Fn(f64) -> f64,
    dev: &B::Device,
    adev: &A::Device,
) {
    for registered in [false, true] {
        if registered {
            kron_adapters::kron::autodiff::register_backward::<A>();
        }
        let xs: Vec<f32> = (0..161).map(|i| -4.0 + 0.05 * i as f32).collect();
        let mut rng = Rng::new(29);
        let ws: Vec<f32> = xs.iter().map(|_| 0.5 + rng.uniform() as f32).collect();
        let n = xs.len();
        let y = to_vec(act.apply(tensor::<B, 1>(&xs, [n], dev)));
        let ya = to_vec(act.apply(tensor::<A, 1>(&xs, [n], adev)));
        let x = tensor::<A, 2>(&xs, [7, 23], adev).require_grad();
        let w = tensor::<A, 2>(&ws, [7, 23], adev);
        // `x·2/2` before and `·w` after: the gradient goes through the node into the graph.
        let h = act.apply(x.clone().mul_scalar(2.0).div_scalar(2.0));
        assert_eq!(h.dims(), [7, 23]);
        let grads = (h * w).sum().backward();
        let got = to_vec(x.grad(&grads).expect("x's gradient"));
        let what = format!("{act:?} (registered: {registered})");
        for i in 0..n {
            let x = xs[i] as f64;
            let want = f(x);
            assert!(
                (y[i] as f64 - want).abs() < 1e-5,
                "{what}({x}) = {}, want {want}",
                y[i]
            );
            assert!(
                (ya[i] as f64 - want).abs() < 1e-5,
                "{what}, autodiff, ({x}) = {}",
                ya[i]
            );
            let dwant = ws[i] as f64 * df(x);
            assert!(
                (got[i] as f64 - dwant).abs() < 2e-5,
                "{what}: gradient at x = {x}: {}, want {dwant}",
                got[i]
            );
        }
    }
}

#[test]
fn gelu_is_exact_with_the_exact_gradient() {
    on_suite_and_flex!(check_gelu);
}

#[test]
fn silu_and_its_gradient() {
    on_suite_and_flex!(check_silu);
}

/// A small model with adapted linears and a LayerNorm, for the training modes.
#[derive(Module, Debug)]
struct Tiny<B: Backend> {
    q: AdaptedLinear<B>,
    norm: burn::nn::LayerNorm<B>,
    head: Linear<B>,
}

#[test]
fn bitfit_trains_biases_only_and_full_trains_everything() {
    let dev = device();
    let mut rng = Rng::new(44);
    let make = || Tiny::<AB> {
        q: AdaptedLinear::frozen(LinearConfig::new(D, D).init(&dev)),
        norm: burn::nn::LayerNormConfig::new(D).init(&dev),
        head: LinearConfig::new(D, 3).init(&dev),
    };
    let x = randn::<AB, 2>(&mut rng, [5, D], &dev);
    let run = |m: &Tiny<AB>| {
        let y = m.head.forward(m.norm.forward(m.q.forward(x.clone())));
        let grads = y.powf_scalar(2.0).sum().backward();
        grad_paths(m, &grads)
    };

    let m = bitfit(make());
    for (path, has) in run(&m) {
        assert_eq!(has, is_bias(&path), "BitFit: {path}");
    }
    let c = count_params(&m);
    assert_eq!(
        c.trainable,
        D + D + 3,
        "q.base.bias + norm.beta + head.bias"
    );
    assert_eq!(TrainMode::BitFit.apply(make()).num_params(), c.total);

    let m = full_finetune(make());
    assert!(run(&m).iter().all(|(_, has)| *has));
    assert_eq!(count_params(&m).trainable, count_params(&m).total);

    // Adapters mode leaves the construction's choice: only the adapter trains.
    let mut m = make();
    m.q = AdaptedLinear::new(
        LinearConfig::new(D, D).init(&dev),
        &AdapterConfig::KronA(KronAConfig::new([4, 6], [6, 4])),
        &dev,
    )
    .unwrap();
    let m = TrainMode::Adapters.apply(kron_adapters::training::freeze(m.clone()));
    assert_eq!(count_params(&m).trainable, 0, "freeze froze everything");
    assert!(is_bias("encoder.layers.0.norm.beta") && !is_bias("encoder.bias_mid"));
}

/// Review defect: BitFit used to freeze every non-bias parameter, linear adapters and block
/// adapters included, so "BitFit + KronA" silently trained the biases only. BitFit freezes the
/// pretrained weights; adapters keep training.
#[test]
fn bitfit_keeps_linear_and_block_adapters_trainable() {
    #[derive(Module, Debug)]
    struct WithBlocks<B: Backend> {
        q: AdaptedLinear<B>,
        block_adapters: BlockAdapters<B>,
    }
    let dev = device();
    let mut rng = Rng::new(45);
    let q = AdaptedLinear::new(
        LinearConfig::new(D, D).init(&dev),
        &AdapterConfig::KronA(KronAConfig::new([4, 6], [6, 4])),
        &dev,
    )
    .unwrap();
    let blocks = BlockAdapters::<AB>::new(
        &BlockAdapterConfig::KronAB(KronABConfig::new([4, 6], [6, 4])),
        D,
        1,
        &dev,
    )
    .unwrap();
    let m = randomize(
        bitfit(WithBlocks {
            q,
            block_adapters: blocks,
        }),
        &mut rng,
        &dev,
    );
    let x = randn::<AB, 2>(&mut rng, [5, D], &dev);
    let h = m.q.forward(x.clone());
    let y = m.block_adapters.forward(0, x, h);
    let grads = y.powf_scalar(2.0).sum().backward();
    let paths = grad_paths(&m, &grads);
    for (path, has) in &paths {
        let adapter = path.contains(".adapter.") || path.starts_with("block_adapters.");
        let want = adapter || is_bias(path);
        assert_eq!(*has, want, "BitFit with adapters: {path}");
    }
    assert!(
        paths.iter().any(|(p, has)| p.contains(".adapter.") && *has),
        "the linear adapter trains"
    );
    assert!(
        paths
            .iter()
            .any(|(p, has)| p.starts_with("block_adapters.") && *has),
        "the block adapter trains"
    );
    // The frozen base weight gets no gradient; its bias does (BitFit).
    assert!(paths.contains(&("q.base.weight".to_string(), false)));
    assert!(paths.contains(&("q.base.bias".to_string(), true)));
}

/// Every block adapter with an empty batch (no rows, or rows of no tokens), in inference and
/// through the backward, on the suite's backend and flex: an empty output of the block's shape.
fn check_empty_batches<B: Backend, A: AutodiffBackend>(_: &B::Device, adev: &A::Device) {
    use burn::module::AutodiffModule;
    kron_adapters::kron::autodiff::register_backward::<A>();
    for cfg in all_configs() {
        let adapters = BlockAdapters::<A>::new(&cfg, D, 2, adev).unwrap();
        for lead in [[0, 5], [3, 0]] {
            let x = Tensor::<A, 3>::zeros([lead[0], lead[1], D], adev).require_grad();
            let fx = Tensor::<A, 3>::zeros([lead[0], lead[1], D], adev).require_grad();
            let y = adapters.forward(1, x.clone(), fx.clone());
            assert_eq!(y.dims(), [lead[0], lead[1], D], "{cfg:?}");
            // `backward` on `y` itself: the CubeCL backends cannot broadcast a sum's gradient
            // back to an empty tensor (Burn's own op, not the adapters').
            let grads = y.backward();
            for g in [x.grad(&grads), fx.grad(&grads)].into_iter().flatten() {
                assert_eq!(g.dims(), [lead[0], lead[1], D], "{cfg:?}");
            }
            let zeros =
                || Tensor::<A::InnerBackend, 3>::zeros([lead[0], lead[1], D], &Default::default());
            let inference = adapters.valid().forward(1, zeros(), zeros());
            assert_eq!(inference.dims(), [lead[0], lead[1], D], "{cfg:?}");
        }
    }
    for act in [Activation::Relu, Activation::Gelu, Activation::Silu] {
        let x = Tensor::<A, 3>::zeros([3, 0, D], adev).require_grad();
        assert_eq!(act.apply(x).dims(), [3, 0, D], "{act:?}");
        let x = Tensor::<A::InnerBackend, 3>::zeros([0, 5, D], &Default::default());
        assert_eq!(act.apply(x).dims(), [0, 5, D], "{act:?}");
    }
}

#[test]
fn empty_batches_give_empty_outputs() {
    on_suite_and_flex!(check_empty_batches);
}
