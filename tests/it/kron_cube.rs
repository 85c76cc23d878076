//! The fused CubeCL kernel for the Kronecker apply (`kron::cube`), on the wgpu backend (CI runs
//! it on Mesa's lavapipe) and on CUDA (`scripts/gpu_check.sh` on a lent NVIDIA GPU): one `a` step and one `b` step against f64 host loops, in both of its
//! orders, with strided inputs, columns that do not fill a tile, a `p × tile` block that needs
//! a smaller tile, and more rows than one cube-count dimension holds; then registered, KronA's
//! and Kron-LoRA's plans through `kron_apply` (inference) and its gradients through the apply's
//! own autodiff node, against the materialized product.

use crate::common::*;

use burn::tensor::Tensor;
use kron_adapters::kron::autodiff::register_backward;
use kron_adapters::kron::cube::{
    fused_pair, is_fused, register_fused_kernel, unregister_fused_kernel,
};
use kron_adapters::kron::{chain_product, kron, kron_apply, KronPlan};

/// `out[r, i, j] = Σ_k Σ_l fa[k, i]·T[r, k, l]·fb[l, j]` in f64.
fn pair_ref(t: &[f32], fa: &[f32], fb: &[f32], [n, p, q, p2, q2]: [usize; 5]) -> Vec<f32> {
    let mut out = vec![0f32; n * p2 * q2];
    for r in 0..n {
        for i in 0..p2 {
            for j in 0..q2 {
                let mut acc = 0f64;
                for k in 0..p {
                    let mut inner = 0f64;
                    for l in 0..q {
                        inner += t[(r * p + k) * q + l] as f64 * fb[l * q2 + j] as f64;
                    }
                    acc += fa[k * p2 + i] as f64 * inner;
                }
                out[(r * p2 + i) * q2 + j] = acc as f32;
            }
        }
    }
    out
}

#[test]
fn the_fused_pair_matches_host_loops_in_both_orders_and_with_strided_inputs() {
    let dev = device();
    let mut rng = Rng::new(140);
    // [n, p, q, p', q']: KronA's √d shapes (the q-first order), a wide p', the p-first order
    // with columns that do not fill a tile (37), a single row, rank-1 factors, and a long kept
    // axis (q first with p = 1024: 32 columns would take 128 KB of shared memory, so the tile
    // shrinks). Which order each takes is KronPlan::cost's count.
    let cases = [
        [6, 8, 8, 8, 8],
        [5, 4, 6, 40, 3],
        [3, 5, 7, 6, 37],
        [1, 3, 4, 2, 5],
        [4, 1, 9, 1, 3],
        [1, 1024, 64, 64, 32],
    ];
    for dims @ [n, p, q, p2, q2] in cases {
        let (t, fa, fb) = (rng.vec(n * p * q), rng.vec(p * p2), rng.vec(q * q2));
        let want = pair_ref(&t, &fa, &fb, dims);
        let got = fused_pair(
            tensor::<TB, 3>(&t, [n, p, q], &dev),
            tensor::<TB, 2>(&fa, [p, p2], &dev),
            tensor::<TB, 2>(&fb, [q, q2], &dev),
        );
        assert_eq!(got.dims(), [n, p2, q2]);
        assert_close(&to_vec(got), &want, 1e-5, &format!("contiguous {dims:?}"));
        // The same values as transposed views (strides, not copies): T stored as [n, q, p],
        // the factors stored transposed.
        let t_stored = (0..n)
            .flat_map(|r| transpose_ref(&t[r * p * q..(r + 1) * p * q], p, q))
            .collect::<Vec<_>>();
        let got = fused_pair(
            tensor::<TB, 3>(&t_stored, [n, q, p], &dev).swap_dims(1, 2),
            tensor::<TB, 2>(&transpose_ref(&fa, p, p2), [p2, p], &dev).transpose(),
            tensor::<TB, 2>(&transpose_ref(&fb, q, q2), [q2, q], &dev).transpose(),
        );
        assert_close(&to_vec(got), &want, 1e-5, &format!("strided {dims:?}"));
    }
}

#[test]
fn the_fused_pair_covers_more_rows_than_one_cube_count_dimension() {
    // 70,000 rows: more cubes than the 65,535 of one dimension, so the rows go over two.
    let dev = device();
    let mut rng = Rng::new(141);
    let dims @ [n, p, q, p2, q2] = [70_000, 2, 3, 2, 2];
    let (t, fa, fb) = (rng.vec(n * p * q), rng.vec(p * p2), rng.vec(q * q2));
    let got = fused_pair(
        tensor::<TB, 3>(&t, [n, p, q], &dev),
        tensor::<TB, 2>(&fa, [p, p2], &dev),
        tensor::<TB, 2>(&fb, [q, q2], &dev),
    );
    let got = to_vec(got);
    let want = pair_ref(&t, &fa, &fb, dims);
    assert_close(&got, &want, 1e-5, "70,000 rows");
    // The last rows (in the second dimension's cubes) specifically.
    let tail = (n - 10) * p2 * q2;
    assert_close(&got[tail..], &want[tail..], 1e-5, "the last rows");
}

/// A chain of factors: each one's values and shape.
type Chain = [(Vec<f32>, [usize; 2])];

/// `x·(A ⊗ B)·scale` through `kron_apply` (with `plan`) or the materialized product (without),
/// and the gradients under `Σ y ⊙ R` of `x` and, when `track_factors`, of every factor.
fn apply(
    x: &[f32],
    chains: (&Chain, &Chain),
    r: &[f32],
    plan: Option<&KronPlan>,
    track_factors: bool,
) -> (Vec<f32>, Vec<Option<Vec<f32>>>) {
    let dev = device();
    let (a, b) = chains;
    let d_in = a[0].1[0] * b[0].1[0];
    let d_out = a.last().unwrap().1[1] * b.last().unwrap().1[1];
    let n = x.len() / d_in;
    let xt = tensor::<AB, 2>(x, [n, d_in], &dev).require_grad();
    let factor = |(v, s): &(Vec<f32>, [usize; 2])| {
        let f = tensor::<AB, 2>(v, *s, &dev);
        if track_factors {
            f.require_grad()
        } else {
            f
        }
    };
    let at: Vec<_> = a.iter().map(factor).collect();
    let bt: Vec<_> = b.iter().map(factor).collect();
    let y: Tensor<AB, 2> = match plan {
        Some(plan) => kron_apply(xt.clone(), &at, &bt, plan, 0.6),
        None => xt
            .clone()
            .matmul(kron(chain_product(&at), chain_product(&bt)).mul_scalar(0.6)),
    };
    let value = to_vec(y.clone());
    let g = (y * tensor::<AB, 2>(r, [n, d_out], &dev)).sum().backward();
    let grads = std::iter::once(&xt)
        .chain(&at)
        .chain(&bt)
        .map(|t| t.grad(&g).map(to_vec))
        .collect();
    (value, grads)
}

#[test]
fn registered_the_kernel_serves_kron_apply_and_its_gradients() {
    // Process-wide: other wgpu tests running meanwhile may go through the kernel too, which
    // gives their values up to rounding.
    register_fused_kernel::<TB>();
    assert!(is_fused::<TB>());
    assert!(
        !is_fused::<AB>(),
        "registered for the inner backend, not Autodiff<TB>"
    );
    assert!(register_backward::<AB>());
    let dev = device();
    let mut rng = Rng::new(142);
    let mut chain = |shapes: &[[usize; 2]]| -> Vec<(Vec<f32>, [usize; 2])> {
        shapes.iter().map(|s| (rng.vec(s[0] * s[1]), *s)).collect()
    };
    // KronA (one fused launch, both plans) and Kron-LoRA (a fused pair after a lone `b` step,
    // and before one); every plan of every chain is kron_backward's, each shape compiling its
    // own kernels on lavapipe.
    let cases = [
        (chain(&[[4, 6]]), chain(&[[5, 3]]), KronPlan::all(1, 1)),
        (
            chain(&[[4, 6]]),
            chain(&[[5, 2], [2, 3]]),
            vec![KronPlan::a_last(1, 2), KronPlan::a_first(1, 2)],
        ),
    ];
    let n = 12;
    for (a, b, plans) in &cases {
        let d_in = a[0].1[0] * b[0].1[0];
        let d_out = a.last().unwrap().1[1] * b.last().unwrap().1[1];
        let (x, r) = (rng.vec(n * d_in), rng.vec(n * d_out));
        let (want_y, want_g) = apply(&x, (a, b), &r, None, true);
        for plan in plans {
            let what = format!("{} × {} factors, plan {:?}", a.len(), b.len(), plan.steps);
            // Inference on TB: no autodiff node, the kernel directly.
            let xt = tensor::<TB, 2>(&x, [n, d_in], &dev);
            let ft = |(v, s): &(Vec<f32>, [usize; 2])| tensor::<TB, 2>(v, *s, &dev);
            let at: Vec<_> = a.iter().map(ft).collect();
            let bt: Vec<_> = b.iter().map(ft).collect();
            let y = kron_apply(xt, &at, &bt, plan, 0.6);
            assert_close(&to_vec(y), &want_y, 1e-5, &format!("inference, {what}"));
            // Training on Autodiff<TB>: the kernel inside the apply's node.
            let (y, grads) = apply(&x, (a, b), &r, Some(plan), true);
            assert_close(&y, &want_y, 1e-5, &format!("training value, {what}"));
            for (i, (g, w)) in grads.iter().zip(&want_g).enumerate() {
                let (Some(g), Some(w)) = (g, w) else {
                    panic!("input {i} has no gradient, {what}")
                };
                assert_close(g, w, 1e-5, &format!("gradient of input {i}, {what}"));
            }
        }
        // Frozen factors: x's gradient alone, the transposed factors through the kernel.
        let (_, grads) = apply(&x, (a, b), &r, Some(&KronPlan::a_last(1, b.len())), false);
        let what = format!("{} × {} frozen factors", a.len(), b.len());
        assert!(
            grads[1..].iter().all(Option::is_none),
            "{what}: factor gradients"
        );
        let got = grads[0].as_ref().expect("x is tracked");
        let want = want_g[0].as_ref().expect("x is tracked");
        assert_close(got, want, 1e-5, &format!("gradient of x, {what}"));
    }
    assert!(unregister_fused_kernel::<TB>());
    assert!(!is_fused::<TB>());
    assert!(!unregister_fused_kernel::<TB>(), "already unregistered");
}
