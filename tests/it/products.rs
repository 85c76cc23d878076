//! An adapted layer's dense products — the frozen `x·W + b` and LoRA's `(x·down)·up` added to
//! it — which on flex run `gemm` into outputs of their own and, where the crate's backward is
//! registered, one autodiff node each (`crate::product`); elsewhere Burn's ops. The value in
//! inference and in training, and every gradient (the input's and the factors', and with the
//! base trained the weight's and the bias's), against `f64` references, on shapes where no
//! dimension equals another (so that a transposed operand read with the wrong stride fails) and
//! on one large enough for `gemm` to split over threads.

use crate::common::*;

use burn::module::Param;
use burn::nn::LinearConfig;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::Tensor;
use kron_adapters::adapter::{Adapter, Lora};
use kron_adapters::kron::autodiff::register_backward;
use kron_adapters::training::full_finetune;
use kron_adapters::AdaptedLinear;

/// One layer's shapes: the input `[batch, seq, d_in]`, LoRA's rank and scale.
#[derive(Clone, Copy)]
struct Case {
    batch: usize,
    seq: usize,
    d_in: usize,
    d_out: usize,
    rank: usize,
    scale: f64,
}

/// Random values for a case: `x`, `W`, `b`, `down`, `up`, and `R` (the loss is `Σ y ⊙ R`).
struct Values {
    x: Vec<f32>,
    w: Vec<f32>,
    b: Vec<f32>,
    down: Vec<f32>,
    up: Vec<f32>,
    r: Vec<f32>,
}

impl Values {
    fn new(rng: &mut Rng, c: Case) -> Self {
        let n = c.batch * c.seq;
        Self {
            x: rng.vec(n * c.d_in),
            w: rng.vec(c.d_in * c.d_out),
            b: rng.vec(c.d_out),
            down: rng.vec(c.d_in * c.rank),
            up: rng.vec(c.rank * c.d_out),
            r: rng.vec(n * c.d_out),
        }
    }
}

/// The references: `y = x·W + b + s·(x·down)·up` and, for `Σ y ⊙ R`, `∂x = R·Wᵀ +
/// s·(R·upᵀ)·downᵀ`, `∂down = s·xᵀ·(R·upᵀ)`, `∂up = s·(x·down)ᵀ·R`, `∂W = xᵀ·R`, `∂b = Σ_rows
/// R`, in that order.
fn references(v: &Values, c: Case) -> [Vec<f32>; 6] {
    let n = c.batch * c.seq;
    let (d_in, d_out, r) = (c.d_in, c.d_out, c.rank);
    let h = matmul_ref(&v.x, n, d_in, &v.down, r);
    let hu = matmul_ref(&h, n, r, &v.up, d_out);
    let xw = matmul_ref(&v.x, n, d_in, &v.w, d_out);
    let y: Vec<f32> = (0..n * d_out)
        .map(|i| (xw[i] as f64 + v.b[i % d_out] as f64 + c.scale * hu[i] as f64) as f32)
        .collect();
    let rut = matmul_ref(&v.r, n, d_out, &transpose_ref(&v.up, r, d_out), r);
    let dx_base = matmul_ref(&v.r, n, d_out, &transpose_ref(&v.w, d_in, d_out), d_in);
    let dx_lora = matmul_ref(&rut, n, r, &transpose_ref(&v.down, d_in, r), d_in);
    let dx = (0..n * d_in)
        .map(|i| (dx_base[i] as f64 + c.scale * dx_lora[i] as f64) as f32)
        .collect();
    let xt = transpose_ref(&v.x, n, d_in);
    let ddown = scale_ref(&matmul_ref(&xt, d_in, n, &rut, r), c.scale);
    let dup = scale_ref(
        &matmul_ref(&transpose_ref(&h, n, r), r, n, &v.r, d_out),
        c.scale,
    );
    let dw = matmul_ref(&xt, d_in, n, &v.r, d_out);
    let db = (0..d_out)
        .map(|j| (0..n).map(|i| v.r[i * d_out + j] as f64).sum::<f64>() as f32)
        .collect();
    [y, dx, ddown, dup, dw, db]
}

/// The layer on backend `X`: the base from `W` and `b` (frozen), LoRA from `down` and `up`.
fn layer<X: Backend>(v: &Values, c: Case, dev: &X::Device) -> AdaptedLinear<X> {
    let mut linear = LinearConfig::new(c.d_in, c.d_out).init::<X>(dev);
    linear.weight = Param::from_tensor(tensor::<X, 2>(&v.w, [c.d_in, c.d_out], dev));
    linear.bias = Some(Param::from_tensor(tensor::<X, 1>(&v.b, [c.d_out], dev)));
    let down = tensor::<X, 2>(&v.down, [c.d_in, c.rank], dev);
    let up = tensor::<X, 2>(&v.up, [c.rank, c.d_out], dev);
    let lora = Lora::from_factors(down, up, c.scale).expect("the factors chain");
    AdaptedLinear::with_adapter(linear, Adapter::Lora(lora)).expect("the sizes agree")
}

#[test]
fn adapted_layer_products_match_f64_references_frozen_and_trained() {
    on_suite_and_flex!(check_layer);
}

/// The same on flex with balanced checkpointing, the other autodiff backend the crate registers:
/// its nodes keep what their backward needs there too.
#[cfg(feature = "flex")]
#[test]
fn balanced_checkpointing_gets_the_same_products() {
    use burn::backend::autodiff::checkpoint::strategy::BalancedCheckpointing;
    type F = burn::backend::Flex;
    type Balanced = burn::backend::Autodiff<F, BalancedCheckpointing>;
    check_layer::<F, Balanced>(&Default::default(), &Default::default());
}

/// [`references`] against the layer on `B` (inference: the value) and on `A` registered (the
/// value and every gradient, with the base frozen and with it trained).
fn check_layer<B: Backend, A: AutodiffBackend>(bdev: &B::Device, dev: &A::Device) {
    register_backward::<A>();
    let mut rng = Rng::new(36);
    let cases = [
        // Every dimension different; the input's rows not a multiple of a SIMD width.
        Case {
            batch: 3,
            seq: 7,
            d_in: 40,
            d_out: 24,
            rank: 3,
            scale: 2.0,
        },
        // Rank 1, and products from 192³ multiply-adds up: gemm splits them over threads.
        Case {
            batch: 2,
            seq: 128,
            d_in: 224,
            d_out: 160,
            rank: 1,
            scale: 0.5,
        },
    ];
    for c in cases {
        let what = |part: &str| format!("{part} at {}×{} rank {}", c.d_in, c.d_out, c.rank);
        let v = Values::new(&mut rng, c);
        let [y, dx, ddown, dup, dw, db] = references(&v, c);
        let x_dims = [c.batch, c.seq, c.d_in];
        let y_dims = [c.batch, c.seq, c.d_out];

        let inference = layer::<B>(&v, c, bdev).forward(tensor::<B, 3>(&v.x, x_dims, bdev));
        assert_eq!(inference.dims(), y_dims);
        assert_close(&to_vec(inference), &y, 1e-5, &what("inference"));

        for trained in [false, true] {
            let mut l = layer::<A>(&v, c, dev);
            if trained {
                l = full_finetune(l);
            }
            let x = tensor::<A, 3>(&v.x, x_dims, dev).require_grad();
            let out = l.forward(x.clone());
            assert_close(&to_vec(out.clone()), &y, 1e-5, &what("training"));
            let loss = (out * tensor::<A, 3>(&v.r, y_dims, dev)).sum();
            let grads = loss.backward();
            assert_close(&to_vec(x.grad(&grads).expect("∂x")), &dx, 1e-5, &what("∂x"));
            let Some(Adapter::Lora(lora)) = &l.adapter else {
                unreachable!("the layer was built with LoRA")
            };
            let g_down = lora.down.grad(&grads).expect("∂down");
            assert_close(&to_vec(g_down), &ddown, 1e-5, &what("∂down"));
            let g_up = lora.up.grad(&grads).expect("∂up");
            assert_close(&to_vec(g_up), &dup, 1e-5, &what("∂up"));
            let g_w = l.base.weight.grad(&grads);
            let g_b = l.base.bias.as_ref().and_then(|b| b.grad(&grads));
            if trained {
                assert_close(&to_vec(g_w.expect("∂W")), &dw, 1e-5, &what("∂W"));
                assert_close(&to_vec(g_b.expect("∂b")), &db, 1e-5, &what("∂b"));
            } else {
                assert!(g_w.is_none() && g_b.is_none(), "{}", what("frozen base"));
            }
        }
    }
}

/// A product whose input is a view that flex does not keep in order (a slice of every row):
/// the host products read its values instead of its buffer, with the same result.
#[test]
fn a_strided_input_gives_the_contiguous_inputs_result() {
    on_suite_and_flex!(check_strided);
}

fn check_strided<B: Backend, A: AutodiffBackend>(_: &B::Device, dev: &A::Device) {
    register_backward::<A>();
    let c = Case {
        batch: 2,
        seq: 5,
        d_in: 12,
        d_out: 9,
        rank: 2,
        scale: 1.0,
    };
    let mut rng = Rng::new(7);
    let v = Values::new(&mut rng, c);
    let [y, ..] = references(&v, c);
    let l = layer::<A>(&v, c, dev);
    // `x` as the first `d_in` columns of a wider tensor.
    let wide: Vec<f32> =
        v.x.chunks(c.d_in)
            .flat_map(|row| row.iter().copied().chain([9.0; 4]))
            .collect();
    let wide = tensor::<A, 3>(&wide, [c.batch, c.seq, c.d_in + 4], dev);
    let x: Tensor<A, 3> = wide.slice([0..c.batch, 0..c.seq, 0..c.d_in]);
    assert_close(&to_vec(l.forward(x)), &y, 1e-5, "a sliced input");
}
