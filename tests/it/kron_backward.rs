//! The Kronecker apply's hand-written backward (`kron::autodiff`): the `a` contraction's
//! gradients against exact host references (f64 loops), on shapes that split the gradient of `m`
//! into several row chunks; the whole apply (one node that recomputes its intermediates) against
//! the materialized Kronecker product differentiated by Burn, for every plan of chains of 2 to 4
//! factors and every combination of tracked inputs; the balanced-checkpointing backend; and what
//! registration reports.

use crate::common::*;

use burn::backend::autodiff::checkpoint::strategy::BalancedCheckpointing;
use burn::backend::Autodiff;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::Tensor;
use kron_adapters::kron::autodiff::{
    contract_a, contract_a_composite, is_registered, register_backward,
};
use kron_adapters::kron::{chain_product, kron, kron_apply, kron_apply_add, KronPlan};

/// Host references for `out[r] = mᵀ·T[r]` under the loss `Σ out ⊙ R`:
/// `∂m[i, o] = Σ_r Σ_k T[r, i, k]·R[r, o, k]` and `∂T[r, i, k] = Σ_o m[i, o]·R[r, o, k]`.
fn host_grads(m: &[f32], t: &[f32], r: &[f32], [n, p, p2, q]: [usize; 4]) -> (Vec<f32>, Vec<f32>) {
    let mut gm = vec![0f64; p * p2];
    let mut gt = vec![0f64; n * p * q];
    for row in 0..n {
        for i in 0..p {
            for o in 0..p2 {
                for k in 0..q {
                    let tv = t[(row * p + i) * q + k] as f64;
                    let rv = r[(row * p2 + o) * q + k] as f64;
                    gm[i * p2 + o] += tv * rv;
                    gt[(row * p + i) * q + k] += m[i * p2 + o] as f64 * rv;
                }
            }
        }
    }
    let f = |v: Vec<f64>| v.into_iter().map(|x| x as f32).collect();
    (f(gm), f(gt))
}

/// Random `m`, `T`, `R` for `dims`, and the host references of `∂m` and `∂T`.
fn random_case(rng: &mut Rng, dims @ [n, p, p2, q]: [usize; 4]) -> [Vec<f32>; 5] {
    let (m, t, r) = (rng.vec(p * p2), rng.vec(n * p * q), rng.vec(n * p2 * q));
    let (gm, gt) = host_grads(&m, &t, &r, dims);
    [m, t, r, gm, gt]
}

/// `contract_a`'s value and both gradients on autodiff backend `A`, for `Σ out ⊙ R`.
fn contract_grads<A: AutodiffBackend>(
    m: &[f32],
    t: &[f32],
    r: &[f32],
    [n, p, p2, q]: [usize; 4],
    dev: &A::Device,
    composite: bool,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let mt = tensor::<A, 2>(m, [p, p2], dev).require_grad();
    let tt = tensor::<A, 3>(t, [n, p, q], dev).require_grad();
    let out = if composite {
        contract_a_composite(mt.clone(), tt.clone())
    } else {
        contract_a(mt.clone(), tt.clone())
    };
    assert_eq!(out.dims(), [n, p2, q]);
    let loss = (out.clone() * tensor::<A, 3>(r, [n, p2, q], dev)).sum();
    let grads = loss.backward();
    (
        to_vec(out),
        to_vec(mt.grad(&grads).expect("m has a gradient")),
        to_vec(tt.grad(&grads).expect("T has a gradient")),
    )
}

#[test]
fn contract_a_gradients_match_host_references_over_several_chunks() {
    on_suite_and_flex!(check_contract_a);
}

/// `contract_a` on backend `B` (without autodiff: the value) and on `A` registered (value and
/// both gradients) against host references, and Burn's differentiation of the broadcast
/// product on `A`. On flex the registered node runs the crate's host loops (`kron::host`), and
/// the factor's gradient Burn's products beyond their size (the 64 × 32 × 40 case).
fn check_contract_a<B: Backend, A: AutodiffBackend>(bdev: &B::Device, dev: &A::Device) {
    assert!(register_backward::<A>());
    assert!(is_registered::<A>());
    let mut rng = Rng::new(130);
    // [n, p, p', q]: square factors with rows enough for several chunks of ∂m, a wide `a`
    // (one chunk per row; one product over all columns off flex), a narrow one (one chunk in
    // all), a single row, MiniLM's 16 × 16 × 24 (every register block of the host loops), a
    // large factor, and a large factor on narrow columns (one product over all columns).
    for dims @ [n, p, p2, q] in [
        [40, 3, 5, 4],
        [33, 6, 7, 1],
        [24, 2, 2, 16],
        [1, 4, 3, 5],
        [70, 16, 16, 24],
        [3, 64, 32, 40],
        [6, 256, 128, 3],
    ] {
        let [m, t, r, gm_want, gt_want] = random_case(&mut rng, dims);
        let (out, gm, gt) = contract_grads::<A>(&m, &t, &r, dims, dev, false);
        // The value: out[r] = mᵀ·T[r], from the host.
        let mt_host = transpose_ref(&m, p, p2);
        let want: Vec<f32> = (0..n)
            .flat_map(|row| matmul_ref(&mt_host, p2, p, &t[row * p * q..(row + 1) * p * q], q))
            .collect();
        let what = |name: &str| format!("{name} {dims:?} on {}", A::name(dev));
        assert_close(&out, &want, 1e-5, &what("value"));
        assert_close(&gm, &gm_want, 1e-5, &what("∂m"));
        assert_close(&gt, &gt_want, 1e-5, &what("∂T"));
        // Burn's own differentiation of the broadcast product agrees.
        let (_, gm_c, gt_c) = contract_grads::<A>(&m, &t, &r, dims, dev, true);
        assert_close(&gm, &gm_c, 1e-5, &what("∂m vs composite"));
        assert_close(&gt, &gt_c, 1e-5, &what("∂T vs composite"));
        // Without autodiff, the value alone.
        let plain = contract_a(
            tensor::<B, 2>(&m, [p, p2], bdev),
            tensor::<B, 3>(&t, [n, p, q], bdev),
        );
        assert_close(&to_vec(plain), &want, 1e-5, &what("value without autodiff"));
    }
}

#[test]
fn balanced_checkpointing_backend_gets_the_same_gradients() {
    type Balanced = Autodiff<TB, BalancedCheckpointing>;
    assert!(register_backward::<Balanced>());
    assert!(is_registered::<Balanced>());
    let dev = device();
    let mut rng = Rng::new(131);
    let dims = [20, 4, 6, 3];
    let [m, t, r, gm_want, gt_want] = random_case(&mut rng, dims);
    let (_, gm, gt) = contract_grads::<Balanced>(&m, &t, &r, dims, &dev, false);
    assert_close(&gm, &gm_want, 1e-5, "∂m, balanced checkpointing");
    assert_close(&gt, &gt_want, 1e-5, "∂T, balanced checkpointing");
}

#[test]
fn only_tracked_operands_get_gradients() {
    on_suite_and_flex!(check_only_tracked);
}

fn check_only_tracked<B: Backend, A: AutodiffBackend>(bdev: &B::Device, dev: &A::Device) {
    assert!(register_backward::<A>());
    let mut rng = Rng::new(132);
    let dims @ [n, p, p2, q] = [9, 3, 4, 2];
    let [m, t, r, gm_want, gt_want] = random_case(&mut rng, dims);
    for (track_m, track_t) in [(true, false), (false, true)] {
        let mut mt = tensor::<A, 2>(&m, [p, p2], dev);
        let mut tt = tensor::<A, 3>(&t, [n, p, q], dev);
        if track_m {
            mt = mt.require_grad();
        }
        if track_t {
            tt = tt.require_grad();
        }
        let out = contract_a(mt.clone(), tt.clone());
        let grads = (out * tensor::<A, 3>(&r, [n, p2, q], dev)).sum().backward();
        match (mt.grad(&grads), tt.grad(&grads)) {
            (Some(gm), None) if track_m => assert_close(&to_vec(gm), &gm_want, 1e-5, "∂m"),
            (None, Some(gt)) if track_t => assert_close(&to_vec(gt), &gt_want, 1e-5, "∂T"),
            (gm, gt) => panic!(
                "tracked (m {track_m}, T {track_t}) but gradients (m {}, T {})",
                gm.is_some(),
                gt.is_some()
            ),
        }
    }
    // Neither tracked: the plain forward, the same value.
    let out = contract_a(
        tensor::<A, 2>(&m, [p, p2], dev),
        tensor::<A, 3>(&t, [n, p, q], dev),
    );
    let want = contract_a_composite(
        tensor::<B, 2>(&m, [p, p2], bdev),
        tensor::<B, 3>(&t, [n, p, q], bdev),
    );
    assert_close(&to_vec(out), &to_vec(want), 1e-5, "untracked value");
}

/// `x·(A ⊗ B)·scale` (plus `y0` where given: `kron_apply_add`) under `Σ y ⊙ R` with `A`, `B`
/// chains of factors: the value, and the gradients of `x`, of every factor and of `y0` (`None`
/// where not tracked), through `kron_apply` with `plan` or, without one, through the
/// materialized product (Burn's differentiation of `chain_product` and `kron`).
#[allow(clippy::too_many_arguments)]
fn chain_grads<A: AutodiffBackend>(
    x: &[f32],
    a: &[(Vec<f32>, [usize; 2])],
    b: &[(Vec<f32>, [usize; 2])],
    y0: Option<&[f32]>,
    r: &[f32],
    (track_x, track_factors): (bool, bool),
    plan: Option<&KronPlan>,
    dev: &A::Device,
) -> Vec<Option<Vec<f32>>> {
    let (d_in, d_out) = (
        a[0].1[0] * b[0].1[0],
        a.last().unwrap().1[1] * b.last().unwrap().1[1],
    );
    let n = x.len() / d_in;
    let track = |t: Tensor<A, 2>, on: bool| if on { t.require_grad() } else { t };
    let xt = track(tensor::<A, 2>(x, [n, d_in], dev), track_x);
    let factor = |(v, s): &(Vec<f32>, [usize; 2])| track(tensor::<A, 2>(v, *s, dev), track_factors);
    let at: Vec<_> = a.iter().map(factor).collect();
    let bt: Vec<_> = b.iter().map(factor).collect();
    let y0 = y0.map(|y0| tensor::<A, 2>(y0, [n, d_out], dev).require_grad());
    let scale = 0.7;
    let y = match (plan, &y0) {
        (Some(plan), None) => kron_apply(xt.clone(), &at, &bt, plan, scale),
        (Some(plan), Some(y0)) => {
            // `y0` times 1: a tensor of its own, as a frozen product's output is, which flex
            // adds into in place.
            let y0 = y0.clone().mul_scalar(1.0);
            kron_apply_add(xt.clone(), &at, &bt, plan, scale, y0)
        }
        (None, _) => {
            let delta = kron(chain_product(&at), chain_product(&bt)).mul_scalar(scale);
            let y = xt.clone().matmul(delta);
            y0.clone().map_or(y.clone(), |y0| y0 + y)
        }
    };
    let value = to_vec(y.clone().inner());
    let g = (y * tensor::<A, 2>(r, [n, d_out], dev)).sum().backward();
    std::iter::once(Some(value))
        .chain(
            std::iter::once(&xt)
                .chain(&at)
                .chain(&bt)
                .chain(&y0)
                .map(|t| t.grad(&g).map(to_vec)),
        )
        .collect()
}

#[test]
fn kron_apply_gradients_match_the_materialized_product_for_every_plan_and_chain() {
    on_suite_and_flex!(check_every_plan);
}

/// [`chain_grads`] through `kron_apply` on `A` registered (on flex: the host loops for the `a`
/// steps) against the materialized product, for every plan.
fn check_every_plan<B: Backend, A: AutodiffBackend>(_: &B::Device, dev: &A::Device) {
    assert!(register_backward::<A>());
    let mut rng = Rng::new(133);
    let mut chain = |shapes: &[[usize; 2]]| -> Vec<(Vec<f32>, [usize; 2])> {
        shapes.iter().map(|s| (rng.vec(s[0] * s[1]), *s)).collect()
    };
    // KronA (2 factors), Kron-LoRA (3), both sides low rank (4): one autodiff node each; then
    // KronA and Kron-LoRA with every intermediate 8 columns wide or more, whose backward on flex
    // is the host's pass over chunks of rows (`kron::host::apply_grads`), over several chunks;
    // and a Kron-LoRA whose rank is too narrow for that pass but whose collapse is not.
    let cases = [
        (chain(&[[4, 6]]), chain(&[[5, 3]]), 70),
        (chain(&[[4, 6]]), chain(&[[5, 2], [2, 3]]), 70),
        (chain(&[[4, 2], [2, 6]]), chain(&[[5, 2], [2, 3]]), 70),
        (chain(&[[4, 6]]), chain(&[[9, 8]]), 300),
        (chain(&[[4, 6]]), chain(&[[9, 8], [8, 10]]), 300),
        // Kron-LoRA of rank 2 whose collapsed `b1·b2` is 10 columns wide: on flex the node runs
        // `a` and `b1·b2` on the host rows, `b1` and `b2` differentiated through their product.
        (chain(&[[4, 6]]), chain(&[[9, 2], [2, 10]]), 300),
        // Intermediates 2 × 2 wide, too narrow for the host rows: on flex the steps as dense
        // products (`crate::product`'s nodes: `b` over all `n·p` rows, `a` as `a ⊗ I`,
        // differentiated through it); and a Kron-LoRA of rank 1 whose collapse has that shape.
        (chain(&[[2, 12]]), chain(&[[12, 2]]), 300),
        (chain(&[[2, 12]]), chain(&[[12, 1], [1, 2]]), 300),
    ];
    for (a, b, n) in &cases {
        let n = *n;
        let d_in = a[0].1[0] * b[0].1[0];
        let d_out = a.last().unwrap().1[1] * b.last().unwrap().1[1];
        let x = rng.vec(n * d_in);
        let r = rng.vec(n * d_out);
        // Every tracked subset on the Kron-LoRA chain; everything tracked on the others (each
        // shape compiles its own kernels on wgpu).
        let subsets: &[(bool, bool)] = match a.len() + b.len() {
            3 => &[(true, true), (false, true), (true, false)],
            _ => &[(true, true)],
        };
        // Also added to a tracked `y0` (`kron_apply_add`: on flex one node that adds into
        // `y0`'s buffer).
        let y0 = rng.vec(n * d_out);
        let added = [None, Some(&y0[..])];
        for (&tracking @ (track_x, track_factors), y0) in subsets
            .iter()
            .flat_map(|s| added.iter().map(move |y0| (s, *y0)))
        {
            let want = chain_grads::<A>(&x, a, b, y0, &r, tracking, None, dev);
            assert_eq!(
                want.len(),
                2 + a.len() + b.len() + usize::from(y0.is_some())
            );
            for plan in KronPlan::all(a.len(), b.len()) {
                let got = chain_grads::<A>(&x, a, b, y0, &r, tracking, Some(&plan), dev);
                assert_eq!(got.len(), want.len());
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    let what = format!(
                        "{} of a {} × b {} factors{}, plan {:?}, tracked x {track_x} factors {track_factors}, on {}",
                        match i {
                            0 => "the value".to_string(),
                            1 => "the gradient of x".to_string(),
                            i => format!("the gradient of input {}", i - 1),
                        },
                        a.len(),
                        b.len(),
                        if y0.is_some() { " added to y0" } else { "" },
                        plan.steps,
                        A::name(dev)
                    );
                    // The value, and `y0`'s gradient, are always there.
                    let last = i + 1 == want.len() && y0.is_some();
                    let tracked = match i {
                        0 => true,
                        1 => track_x,
                        _ if last => true,
                        _ => track_factors,
                    };
                    match (g, w) {
                        (Some(g), Some(w)) if tracked => {
                            assert!(w.iter().any(|v| v.abs() > 1e-3), "{what}: all zero");
                            assert_close(g, w, 1e-5, &what);
                        }
                        (None, None) if !tracked => {}
                        _ => panic!(
                            "{what}: gradient present {} / reference {}",
                            g.is_some(),
                            w.is_some()
                        ),
                    }
                }
            }
        }
    }
}

#[test]
fn only_autodiff_backends_register() {
    // Without autodiff there is no backward to register, and the forward is Burn's product.
    assert!(!is_registered::<TB>());
    let dev = device();
    let mut rng = Rng::new(134);
    let m = randn::<TB, 2>(&mut rng, [3, 2], &dev);
    let t = randn::<TB, 3>(&mut rng, [4, 3, 5], &dev);
    let got = contract_a(m.clone(), t.clone());
    let want = contract_a_composite(m, t);
    assert_close(&to_vec(got), &to_vec(want), 0.0, "no-autodiff value");
}
