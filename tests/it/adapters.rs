//! Adapters and AdaptedLinear: forward against materialized references, merge, init, counts,
//! configs and every configuration error.

use crate::common::*;

use burn::module::{Module, Param};
use burn::nn::{Linear, LinearConfig};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::Tensor;
use kron_adapters::{
    AdaptedLinear, Adapter, AdapterConfig, ConfigError, ContractionOrder, FactorInit, KronA,
    KronAConfig, KronLora, KronLoraConfig, LinearAdapter, Lora, LoraConfig, Method, MethodConfig,
};

/// A Linear with random non-zero weight and bias.
fn linear(rng: &mut Rng, d_in: usize, d_out: usize) -> (Linear<TB>, Vec<f32>, Vec<f32>) {
    let dev = device();
    let w = rng.vec(d_in * d_out);
    let b = rng.vec(d_out);
    let mut l = LinearConfig::new(d_in, d_out).init::<TB>(&dev);
    l.weight = l.weight.map(|_| tensor::<TB, 2>(&w, [d_in, d_out], &dev));
    l.bias = l
        .bias
        .map(|p| p.map(|_| tensor::<TB, 1>(&b, [d_out], &dev)));
    (l, w, b)
}

/// Reference y = x·W + b + x·ΔW with loops.
fn reference(
    x: &[f32],
    n: usize,
    d_in: usize,
    w: &[f32],
    b: &[f32],
    dw: &[f32],
    d_out: usize,
) -> Vec<f32> {
    let full: Vec<f32> = w.iter().zip(dw).map(|(a, c)| a + c).collect();
    let mut y = matmul_ref(x, n, d_in, &full, d_out);
    for r in 0..n {
        for c in 0..d_out {
            y[r * d_out + c] += b[c];
        }
    }
    y
}

/// Adapters with random non-zero factors, and their reference ΔW.
fn random_adapters(rng: &mut Rng) -> Vec<(Adapter<TB>, Vec<f32>, &'static str)> {
    let dev = device();
    let mut out = Vec::new();
    // LoRA 48 → 96, rank 4, scale 2.
    let (down, up) = (rng.vec(48 * 4), rng.vec(4 * 96));
    let dw = scale_ref(&matmul_ref(&down, 48, 4, &up, 96), 2.0);
    let a = Lora::from_factors(
        tensor(&down, [48, 4], &dev),
        tensor(&up, [4, 96], &dev),
        2.0,
    )
    .unwrap();
    out.push((Adapter::Lora(a), dw, "lora"));
    // KronA 48 → 96, rectangular factors, scale 0.25, both orders.
    let (a, b) = (rng.vec(6 * 8), rng.vec(8 * 12));
    let dw = scale_ref(&kron_ref(&a, [6, 8], &b, [8, 12]), 0.25);
    for order in [ContractionOrder::AFirst, ContractionOrder::ALast] {
        let k = KronA::from_factors(tensor(&a, [6, 8], &dev), tensor(&b, [8, 12], &dev), 0.25)
            .unwrap()
            .with_order(order);
        out.push((Adapter::KronA(k), dw.clone(), "krona"));
    }
    // Kron-LoRA 48 → 96: a [6, 8], b = b1·b2 [8, 12], rank 3, scale 1.5, three orders.
    let (a, b1, b2) = (rng.vec(6 * 8), rng.vec(8 * 3), rng.vec(3 * 12));
    let bfull = matmul_ref(&b1, 8, 3, &b2, 12);
    let dw = scale_ref(&kron_ref(&a, [6, 8], &bfull, [8, 12]), 1.5);
    for plan in kron_adapters::KronPlan::all(1, 2) {
        let k = KronLora::from_factors(
            tensor(&a, [6, 8], &dev),
            tensor(&b1, [8, 3], &dev),
            tensor(&b2, [3, 12], &dev),
            1.5,
        )
        .unwrap()
        .with_plan(plan);
        out.push((Adapter::KronLora(k), dw.clone(), "kron_lora"));
    }
    out
}

#[test]
fn forward_equals_materialized_reference_2d_and_3d() {
    let mut rng = Rng::new(10);
    let dev = device();
    for (adapter, dw, what) in random_adapters(&mut rng) {
        let (lin, w, b) = linear(&mut rng, 48, 96);
        let layer = AdaptedLinear::with_adapter(lin, adapter).unwrap();
        // delta_weight is the reference ΔW.
        assert_close(
            &to_vec(layer.delta_weight()),
            &dw,
            1e-6,
            &format!("{what} ΔW"),
        );
        // 2-D input.
        let x = rng.vec(5 * 48);
        let y = layer.forward(tensor::<TB, 2>(&x, [5, 48], &dev));
        assert_eq!(y.dims(), [5, 96]);
        assert_close(
            &to_vec(y),
            &reference(&x, 5, 48, &w, &b, &dw, 96),
            1e-5,
            what,
        );
        // 3-D input.
        let x = rng.vec(2 * 7 * 48);
        let y = layer.forward(tensor::<TB, 3>(&x, [2, 7, 48], &dev));
        assert_eq!(y.dims(), [2, 7, 96]);
        assert_close(
            &to_vec(y),
            &reference(&x, 14, 48, &w, &b, &dw, 96),
            1e-5,
            what,
        );
        // The adapter alone is x·ΔW.
        let x = rng.vec(3 * 48);
        let only = layer
            .adapter
            .as_ref()
            .unwrap()
            .apply(tensor::<TB, 2>(&x, [3, 48], &dev));
        assert_close(&to_vec(only), &matmul_ref(&x, 3, 48, &dw, 96), 1e-5, what);
    }
}

/// A 3-D input through a trainable base (full fine-tuning) with a LoRA adapter: the output and
/// the gradients of the input, the base weight and bias equal row-wise loop references
/// (`∂x = G·(W + ΔW)ᵀ`, `∂W = Σ_rows xᵀ·G`, `∂b = Σ_rows G`). The base's product runs over the
/// rows (`linear_rows`), where Burn's op differentiates a 3-D input against a broadcast weight.
fn check_rows<B: Backend, A: AutodiffBackend>(_: &B::Device, dev: &A::Device) {
    let mut rng = Rng::new(61);
    let (batch, seq, d_in, d_out, r) = (2, 5, 12, 8, 2);
    let n = batch * seq;
    let (wv, bv) = (rng.vec(d_in * d_out), rng.vec(d_out));
    let (down, up) = (rng.vec(d_in * r), rng.vec(r * d_out));
    let mut base = LinearConfig::new(d_in, d_out).init::<A>(dev);
    base.weight = Param::from_tensor(tensor::<A, 2>(&wv, [d_in, d_out], dev));
    base.bias = Some(Param::from_tensor(tensor::<A, 1>(&bv, [d_out], dev)));
    let lora = Lora::from_factors(
        tensor::<A, 2>(&down, [d_in, r], dev),
        tensor::<A, 2>(&up, [r, d_out], dev),
        1.0,
    )
    .unwrap();
    let layer = AdaptedLinear::with_adapter(base, Adapter::Lora(lora)).unwrap();
    let layer = kron_adapters::training::full_finetune(layer);
    let (xv, gv) = (rng.vec(n * d_in), rng.vec(n * d_out));
    let x = tensor::<A, 3>(&xv, [batch, seq, d_in], dev).require_grad();
    let y = layer.forward(x.clone());
    let dw = matmul_ref(&down, d_in, r, &up, d_out);
    let want = reference(&xv, n, d_in, &wv, &bv, &dw, d_out);
    assert_close(&to_vec(y.clone()), &want, 1e-5, "output");
    let grads = (y * tensor::<A, 3>(&gv, [batch, seq, d_out], dev))
        .sum()
        .backward();
    let full: Vec<f32> = wv.iter().zip(&dw).map(|(a, c)| a + c).collect();
    let (mut gx, mut gw, mut gb) = (
        vec![0.0; n * d_in],
        vec![0.0; d_in * d_out],
        vec![0.0; d_out],
    );
    for row in 0..n {
        for o in 0..d_out {
            let g = gv[row * d_out + o];
            gb[o] += g;
            for i in 0..d_in {
                gx[row * d_in + i] += g * full[i * d_out + o];
                gw[i * d_out + o] += xv[row * d_in + i] * g;
            }
        }
    }
    let grad = |p: &Param<Tensor<A, 2>>| to_vec(p.grad(&grads).expect("a gradient"));
    assert_close(&to_vec(x.grad(&grads).unwrap()), &gx, 1e-5, "∂x");
    assert_close(&grad(&layer.base.weight), &gw, 1e-5, "∂W");
    let bias = layer.base.bias.as_ref().unwrap();
    assert_close(&to_vec(bias.grad(&grads).unwrap()), &gb, 1e-5, "∂b");
}

#[test]
fn three_d_input_gradients_equal_the_row_references() {
    on_suite_and_flex!(check_rows);
}

/// An adapted layer's forward in inference equals `x·W + b + x·ΔW` for LoRA (rank 1, and rank
/// 4 over enough rows that flex's host add splits them over threads), KronA (in the host rows'
/// shapes) and Kron-LoRA (ranks 8 and 2, every order); `apply_add` gives `apply(x) + y`, and a `y` still
/// shared elsewhere keeps its values (on flex these add into `y`'s buffer on the host).
#[test]
fn inference_forward_and_apply_add_equal_the_references() {
    on_suite_and_flex!(check_inference_adds);
}

fn check_inference_adds<B: Backend, A: AutodiffBackend>(dev: &B::Device, _: &A::Device) {
    let mut rng = Rng::new(71);
    let t2 = |v: &[f32], s: [usize; 2]| tensor::<B, 2>(v, s, dev);
    // The adapter, its reference ΔW, d_in, d_out, rows, and a name.
    type Case<B> = (Adapter<B>, Vec<f32>, [usize; 3], String);
    let mut cases: Vec<Case<B>> = Vec::new();
    for (r, rows, scale) in [(1, 7, 1.0), (4, 2100, 2.0)] {
        let (d_in, d_out) = (32, 256);
        let (down, up) = (rng.vec(d_in * r), rng.vec(r * d_out));
        let dw = scale_ref(&matmul_ref(&down, d_in, r, &up, d_out), scale);
        let a = Lora::from_factors(t2(&down, [d_in, r]), t2(&up, [r, d_out]), scale).unwrap();
        let what = format!("lora r {r}");
        cases.push((Adapter::Lora(a), dw, [d_in, d_out, rows], what));
    }
    let (a, b) = (rng.vec(16 * 16), rng.vec(24 * 24));
    let dw = scale_ref(&kron_ref(&a, [16, 16], &b, [24, 24]), 0.5);
    let k = KronA::from_factors(t2(&a, [16, 16]), t2(&b, [24, 24]), 0.5).unwrap();
    cases.push((Adapter::KronA(k), dw, [384, 384, 9], "krona".into()));
    // Rank 8 (the host rows as they are) and rank 2 (as the products `a` and `b1·b2`).
    for r in [8, 2] {
        let (a, b1, b2) = (rng.vec(4 * 6), rng.vec(16 * r), rng.vec(r * 16));
        let dw = scale_ref(
            &kron_ref(&a, [4, 6], &matmul_ref(&b1, 16, r, &b2, 16), [16, 16]),
            1.5,
        );
        for plan in kron_adapters::KronPlan::all(1, 2) {
            let factors = (t2(&a, [4, 6]), t2(&b1, [16, r]), t2(&b2, [r, 16]));
            let k = KronLora::from_factors(factors.0, factors.1, factors.2, 1.5).unwrap();
            let what = format!("kron_lora r {r} {:?}", plan.steps);
            let k = Adapter::KronLora(k.with_plan(plan));
            cases.push((k, dw.clone(), [64, 96, 9], what));
        }
    }
    for (adapter, dw, [d_in, d_out, rows], what) in cases {
        let (wv, bv) = (rng.vec(d_in * d_out), rng.vec(d_out));
        let mut base = LinearConfig::new(d_in, d_out).init::<B>(dev);
        base.weight = Param::from_tensor(t2(&wv, [d_in, d_out]));
        base.bias = Some(Param::from_tensor(tensor::<B, 1>(&bv, [d_out], dev)));
        let layer = AdaptedLinear::with_adapter(base, adapter.clone()).unwrap();
        let xv = rng.vec(rows * d_in);
        let x = tensor::<B, 3>(&xv, [1, rows, d_in], dev);
        let want = reference(&xv, rows, d_in, &wv, &bv, &dw, d_out);
        assert_close(&to_vec(layer.forward(x.clone())), &want, 1e-5, &what);
        let yv = rng.vec(rows * d_out);
        let y = tensor::<B, 3>(&yv, [1, rows, d_out], dev);
        let sum = to_vec(adapter.apply(x.clone()) + y.clone());
        let added = adapter.apply_add(x, y.clone());
        assert_eq!(added.dims(), [1, rows, d_out], "{what}");
        assert_close(&to_vec(added), &sum, 1e-6, &what);
        assert_eq!(to_vec(y), yv, "{what}: a shared y keeps its values");
    }
}

#[test]
fn merged_linear_equals_unmerged_forward() {
    let mut rng = Rng::new(11);
    let dev = device();
    for (adapter, _, what) in random_adapters(&mut rng) {
        let (lin, _, _) = linear(&mut rng, 48, 96);
        let layer = AdaptedLinear::with_adapter(lin, adapter).unwrap();
        let merged = layer.merge().unwrap();
        let x = randn::<TB, 3>(&mut rng, [3, 4, 48], &dev);
        let unmerged = to_vec(layer.forward(x.clone()));
        let merged_y = to_vec(merged.forward(x));
        assert_close(&merged_y, &unmerged, 1e-5, what);
    }
}

#[test]
fn default_init_starts_at_the_pretrained_model() {
    let mut rng = Rng::new(12);
    let dev = device();
    let configs = [
        AdapterConfig::Lora(LoraConfig::new(4)),
        AdapterConfig::KronA(KronAConfig::new([6, 8], [8, 12])),
        AdapterConfig::KronLora(KronLoraConfig::new([6, 8], [8, 12], 2)),
        AdapterConfig::KronA(KronAConfig::auto().with_init(FactorInit::ZeroKaiming)),
        AdapterConfig::KronLora(KronLoraConfig::auto(2).with_init(FactorInit::ZeroKaiming)),
    ];
    for cfg in configs {
        let (lin, _, _) = linear(&mut rng, 48, 96);
        let layer = AdaptedLinear::new(lin.clone(), &cfg, &dev).unwrap();
        let dw = to_vec(layer.delta_weight());
        assert!(dw.iter().all(|v| *v == 0.0), "{cfg:?}: ΔW ≠ 0 at init");
        let x = randn::<TB, 2>(&mut rng, [4, 48], &dev);
        assert_eq!(
            to_vec(layer.forward(x.clone())),
            to_vec(lin.forward(x)),
            "{cfg:?}"
        );
    }
}

#[test]
fn kaiming_factor_has_the_papers_bound_and_normal_init_is_nonzero() {
    let dev = device();
    let cfg = KronAConfig::new([64, 8], [2, 12]);
    let k: KronA<TB> = cfg.init(128, 96, &dev).unwrap();
    let a = to_vec(k.a.val());
    let bound = 1.0 / (64f32).sqrt();
    assert!(a.iter().all(|v| v.abs() <= bound), "a outside ±1/√a_in");
    assert!(
        a.iter().any(|v| v.abs() > bound * 0.5),
        "a not spread over its range"
    );
    assert!(to_vec(k.b.val()).iter().all(|v| *v == 0.0), "b not zero");

    let z: KronA<TB> = cfg
        .clone()
        .with_init(FactorInit::ZeroKaiming)
        .init(128, 96, &dev)
        .unwrap();
    assert!(to_vec(z.a.val()).iter().all(|v| *v == 0.0));
    let b = to_vec(z.b.val());
    assert!(b.iter().all(|v| v.abs() <= 1.0 / 2f32.sqrt()) && b.iter().any(|v| *v != 0.0));

    let n: KronA<TB> = cfg
        .with_init(FactorInit::Normal)
        .init(128, 96, &dev)
        .unwrap();
    let a = to_vec(n.a.val());
    let std = (a.iter().map(|v| v * v).sum::<f32>() / a.len() as f32).sqrt();
    let want = 1.0 / (128f32).sqrt();
    assert!(
        (std - want).abs() < 0.25 * want,
        "normal std {std} vs {want}"
    );
    assert!(to_vec(n.delta_weight()).iter().any(|v| *v != 0.0));

    // LoRA: down Kaiming (bound 1/√d_in), up zero.
    let l: Lora<TB> = LoraConfig::new(4).init(100, 30, &dev).unwrap();
    assert!(
        to_vec(l.down.val()).iter().all(|v| v.abs() <= 0.1)
            && to_vec(l.up.val()).iter().all(|v| *v == 0.0)
    );
    // Kron-LoRA: a and b1 Kaiming, b2 zero.
    let kl: KronLora<TB> = KronLoraConfig::new([4, 4], [8, 8], 2)
        .init(32, 32, &dev)
        .unwrap();
    assert!(to_vec(kl.b1.val()).iter().any(|v| *v != 0.0));
    assert!(to_vec(kl.b2.val()).iter().all(|v| *v == 0.0));
}

#[test]
fn parameter_counts_follow_the_formulas() {
    let dev = device();
    // The paper's Table 3 / T5-base shapes: d = 768, a (32, 24), b (24, 32).
    let krona = KronAConfig::new([32, 24], [24, 32]);
    assert_eq!(krona.num_params(768, 768).unwrap(), 32 * 24 + 24 * 32);
    let lora = LoraConfig::new(1);
    assert_eq!(lora.num_params(768, 768).unwrap(), 2 * 768); // LoRA r = 1 has the same 1536
    let kl = KronLoraConfig::new([24, 24], [32, 32], 4);
    assert_eq!(kl.num_params(768, 768).unwrap(), 24 * 24 + 4 * (32 + 32));

    for (cfg, d_in, d_out, trainable) in [
        (AdapterConfig::KronA(krona), 768, 768, 1536),
        (
            AdapterConfig::Lora(LoraConfig::new(8)),
            384,
            1536,
            8 * (384 + 1536),
        ),
        (AdapterConfig::KronLora(kl), 768, 768, 24 * 24 + 4 * 64),
        (
            AdapterConfig::KronA(KronAConfig::auto()),
            384,
            1536,
            16 * 32 + 24 * 48,
        ),
    ] {
        let lin = LinearConfig::new(d_in, d_out).init::<TB>(&dev);
        let layer = AdaptedLinear::new(lin, &cfg, &dev).unwrap();
        let c = layer.param_counts();
        assert_eq!(c.trainable, trainable, "{cfg:?}");
        assert_eq!(c.total, d_in * d_out + d_out + trainable);
        assert_eq!(layer.spec().unwrap().num_params(), trainable);
        assert_eq!(layer.num_params(), c.total, "Burn's own count agrees");
    }
}

#[test]
fn specs_describe_the_adapter() {
    let dev = device();
    let lin = LinearConfig::new(48, 96).init::<TB>(&dev);
    let cfg = AdapterConfig::KronLora(KronLoraConfig::auto(2).with_alpha(4.0));
    let spec = AdaptedLinear::new(lin, &cfg, &dev).unwrap().spec().unwrap();
    assert_eq!(spec.method, Method::KronLora);
    assert_eq!((spec.d_in, spec.d_out, spec.scale), (48, 96, 2.0));
    assert_eq!(spec.rank(), Some(2));
    let shapes: Vec<_> = spec.factors.iter().map(|(n, s)| (n.as_str(), *s)).collect();
    assert_eq!(shapes, vec![("a", [6, 8]), ("b1", [8, 2]), ("b2", [2, 12])]);
}

#[test]
fn configs_round_trip_through_json_and_reject_typos() {
    let cfgs = [
        AdapterConfig::Lora(LoraConfig::new(8).with_alpha(16.0)),
        AdapterConfig::KronA(
            KronAConfig::new([32, 24], [24, 32])
                .with_scale(4.0)
                .with_order(ContractionOrder::ALast),
        ),
        AdapterConfig::KronLora(
            KronLoraConfig::auto(4)
                .with_budget(1000)
                .with_init(FactorInit::Normal),
        ),
    ];
    for cfg in cfgs {
        let json = serde_json::to_string(&cfg).unwrap();
        let back: AdapterConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(back, cfg, "{json}");
    }
    // Defaults fill in what a JSON file leaves out.
    let c: AdapterConfig =
        serde_json::from_str(r#"{"method": "KronA", "a_shape": [32, 24]}"#).unwrap();
    assert_eq!(
        c,
        AdapterConfig::KronA(KronAConfig::auto().with_a_shape([32, 24]))
    );
    // A misspelt field is an error, not silently ignored.
    let err = serde_json::from_str::<AdapterConfig>(r#"{"method": "KronA", "a_shap": [32, 24]}"#)
        .unwrap_err();
    assert!(err.to_string().contains("a_shap"), "{err}");
    assert!(serde_json::from_str::<AdapterConfig>(r#"{"method": "Dora", "rank": 2}"#).is_err());
    // Burn's Config trait: save and load a file.
    use burn::config::Config;
    let dir = scratch_dir("adapters", "config");
    let cfg = AdapterConfig::KronA(KronAConfig::new([6, 8], [8, 12]));
    cfg.save(dir.join("c.json")).unwrap();
    assert_eq!(AdapterConfig::load(dir.join("c.json")).unwrap(), cfg);
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn configuration_errors() {
    let dev = device();
    let lin = || LinearConfig::new(48, 96).init::<TB>(&dev);
    let err = |cfg: AdapterConfig| AdaptedLinear::new(lin(), &cfg, &dev).unwrap_err();

    // Shapes that do not multiply out.
    let e = err(AdapterConfig::KronA(KronAConfig::new([6, 8], [8, 8])));
    assert!(matches!(e, ConfigError::FactorShape(_)), "{e}");
    assert!(e.to_string().contains("Linear[48→96]"), "{e}");
    // Rank 0 and rank above the factor dims.
    for cfg in [
        AdapterConfig::Lora(LoraConfig::new(0)),
        AdapterConfig::Lora(LoraConfig::new(49)),
        AdapterConfig::KronLora(KronLoraConfig::new([6, 8], [8, 12], 0)),
        AdapterConfig::KronLora(KronLoraConfig::new([6, 8], [8, 12], 9)),
    ] {
        let e = err(cfg.clone());
        let ConfigError::Rank { rank, reason, .. } = &e else {
            panic!("{cfg:?} gave {e}")
        };
        assert!(reason.contains("between 1 and"), "{e}");
        assert!(*rank == 0 || *rank > 8);
    }
    // Non-finite scale or alpha.
    for cfg in [
        AdapterConfig::KronA(KronAConfig::auto().with_scale(f64::NAN)),
        AdapterConfig::Lora(LoraConfig::new(2).with_alpha(f64::INFINITY)),
        AdapterConfig::KronLora(KronLoraConfig::auto(2).with_scale(f64::NEG_INFINITY)),
    ] {
        assert!(matches!(err(cfg), ConfigError::Invalid { .. }));
    }
    // A layer name given by the model replaces the default.
    let e = err(AdapterConfig::Lora(LoraConfig::new(0))).at("encoder.layer.0.attention.self.query");
    assert!(
        e.to_string()
            .starts_with("encoder.layer.0.attention.self.query: rank 0"),
        "{e}"
    );

    // Factors that do not chain, and an adapter of the wrong size for the layer.
    let d = |v: &[f32], s: [usize; 2]| tensor::<TB, 2>(v, s, &dev);
    assert!(matches!(
        Lora::from_factors(d(&[0.0; 8], [4, 2]), d(&[0.0; 9], [3, 3]), 1.0),
        Err(ConfigError::Invalid { .. })
    ));
    assert!(matches!(
        KronLora::from_factors(
            d(&[0.0; 4], [2, 2]),
            d(&[0.0; 8], [4, 2]),
            d(&[0.0; 12], [3, 4]),
            1.0
        ),
        Err(ConfigError::Invalid { .. })
    ));
    assert!(matches!(
        KronA::from_factors(d(&[0.0; 4], [2, 2]), d(&[0.0; 4], [2, 2]), f64::NAN),
        Err(ConfigError::Invalid { .. })
    ));
    let small = KronA::from_factors(d(&[1.0; 4], [2, 2]), d(&[1.0; 4], [2, 2]), 1.0).unwrap();
    assert!(matches!(
        AdaptedLinear::with_adapter(lin(), Adapter::KronA(small)),
        Err(ConfigError::Invalid { .. })
    ));
}

#[test]
fn merge_refuses_non_finite_weights() {
    let dev = device();
    let mut rng = Rng::new(13);
    let mut a = rng.vec(6 * 8);
    a[5] = f32::NAN;
    let b = rng.vec(8 * 12);
    let k = KronA::from_factors(
        tensor::<TB, 2>(&a, [6, 8], &dev),
        tensor(&b, [8, 12], &dev),
        1.0,
    )
    .unwrap();
    let layer =
        AdaptedLinear::with_adapter(LinearConfig::new(48, 96).init(&dev), Adapter::KronA(k))
            .unwrap();
    let e = layer.merge().unwrap_err();
    let ConfigError::NonFinite { count, .. } = e else {
        panic!("{e}")
    };
    assert_eq!(count, 8 * 12, "one NaN in a spreads over one b-block");

    let mut down = rng.vec(48 * 2);
    down[0] = f32::INFINITY;
    let l = Lora::from_factors(
        tensor::<TB, 2>(&down, [48, 2], &dev),
        randn(&mut rng, [2, 96], &dev),
        1.0,
    )
    .unwrap();
    let layer = AdaptedLinear::with_adapter(LinearConfig::new(48, 96).init(&dev), Adapter::Lora(l))
        .unwrap();
    assert!(matches!(layer.merge(), Err(ConfigError::NonFinite { .. })));
}

#[test]
fn frozen_layer_and_delta_of_no_adapter() {
    let mut rng = Rng::new(14);
    let dev = device();
    let (lin, _, _) = linear(&mut rng, 8, 4);
    let layer = AdaptedLinear::frozen(lin.clone());
    assert!(to_vec(layer.delta_weight()).iter().all(|v| *v == 0.0));
    assert_eq!(layer.param_counts().trainable, 0);
    let x: Tensor<TB, 2> = randn(&mut rng, [3, 8], &dev);
    assert_eq!(
        to_vec(layer.merge().unwrap().forward(x.clone())),
        to_vec(lin.forward(x))
    );
}

/// An empty batch (no rows) gives an empty output of the right shape, in inference and under
/// autodiff (the backward too), for every adapter and the bare layer, and through
/// `kron_apply` / `kron_apply_add` for KronA, narrow and Kron-LoRA chains: Burn's reshape reads
/// a 0 as "keep this dimension", so a `[0, d]` view of the rows would fail.
#[test]
fn empty_batches_give_empty_outputs() {
    on_suite_and_flex!(check_empty_batches);
}

fn check_empty_batches<B: Backend, A: AutodiffBackend>(dev: &B::Device, adev: &A::Device) {
    use burn::module::AutodiffModule;
    use kron_adapters::kron::{kron_apply, kron_apply_add, KronPlan};
    kron_adapters::kron::autodiff::register_backward::<A>();
    let configs = [
        None,
        Some(AdapterConfig::Lora(LoraConfig::new(2))),
        Some(AdapterConfig::KronA(KronAConfig::auto())),
        Some(AdapterConfig::KronA(
            KronAConfig::auto().with_a_shape([2, 12]),
        )),
        Some(AdapterConfig::KronLora(KronLoraConfig::auto(2))),
    ];
    let (d_in, d_out) = (24, 24);
    for config in &configs {
        let what = format!("{config:?}");
        let layer = |linear| match config {
            Some(c) => AdaptedLinear::new(linear, c, adev).expect("valid config"),
            None => AdaptedLinear {
                base: linear,
                adapter: None,
            },
        };
        let l = layer(LinearConfig::new(d_in, d_out).init::<A>(adev));
        for lead in [[0, 5], [3, 0]] {
            let x = Tensor::<A, 3>::zeros([lead[0], lead[1], d_in], adev).require_grad();
            let y = l.forward(x.clone());
            assert_eq!(y.dims(), [lead[0], lead[1], d_out], "{what}");
            let grads = y.sum().backward();
            let gx = x.grad(&grads).map(|g| g.dims());
            assert!(
                gx.is_none_or(|d| d == [lead[0], lead[1], d_in]),
                "{what}: ∂x {gx:?}"
            );
            let inference = l.valid().forward(Tensor::<A::InnerBackend, 3>::zeros(
                [lead[0], lead[1], d_in],
                &Default::default(),
            ));
            assert_eq!(inference.dims(), [lead[0], lead[1], d_out], "{what}");
        }
    }
    // The apply alone, every plan, on the plain backend.
    type Chain = &'static [[usize; 2]];
    let chains: [(Chain, Chain); 3] = [
        (&[[4, 6]], &[[6, 4]]),
        (&[[2, 12]], &[[12, 2]]),
        (&[[4, 3]], &[[6, 2], [2, 8]]),
    ];
    for (a_shapes, b_shapes) in chains {
        let t = |s: &[usize; 2]| Tensor::<B, 2>::ones(*s, dev);
        let (a, b): (Vec<_>, Vec<_>) = (
            a_shapes.iter().map(t).collect(),
            b_shapes.iter().map(t).collect(),
        );
        let d_in = a_shapes[0][0] * b_shapes[0][0];
        let d_out = a_shapes.last().unwrap()[1] * b_shapes.last().unwrap()[1];
        for plan in KronPlan::all(a.len(), b.len()) {
            let x = Tensor::<B, 3>::zeros([2, 0, d_in], dev);
            let out = kron_apply(x.clone(), &a, &b, &plan, 0.5);
            assert_eq!(
                out.dims(),
                [2, 0, d_out],
                "{a_shapes:?} {b_shapes:?} {plan:?}"
            );
            let y = Tensor::<B, 3>::zeros([2, 0, d_out], dev);
            let out = kron_apply_add(x, &a, &b, &plan, 0.5, y);
            assert_eq!(
                out.dims(),
                [2, 0, d_out],
                "{a_shapes:?} {b_shapes:?} {plan:?}"
            );
        }
    }
}
