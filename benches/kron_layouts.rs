//! The `a` contraction of the Kronecker apply, two ways: the crate's (a broadcast batched
//! product `aᵀ [1, p', p] · X [n, p, q]`, no copy of the intermediate; its backward for `a` is a
//! batched product summed over `n`) against the layout whose backward for `a` is one GEMM over
//! all rows (`X` transposed to `[n·q, p]`, one GEMM, transposed back: two copies of the
//! intermediate). Prints a markdown table of medians (ms) measured in the same run
//! (docs/benchmarks-history.md, "The `a` contraction's layout"), a second for the materialized
//! `a ⊗ b`: a broadcast multiply against `kron::kron` ("Unmerged inference, folded"), and a
//! third for the `a` step's forward batched per row (the crate's, `[n]` products
//! `aᵀ [p', p] · X[r] [p, q]`) against `G` rows per product through the block-diagonal
//! `I_G ⊗ aᵀ` (`[n/G]` products `[G·p', G·p] · [G·p, q]`: fewer, larger products, `G×` the
//! multiply-adds), and a fourth for the `a` step as Burn's product against the crate's
//! `contract_a` (on flex the host loops of `kron::host`), forward and forward plus backward.
//!
//! ```text
//! cargo bench --features full --bench kron_layouts
//! ```

#[path = "../examples/common/mod.rs"]
mod common;

use burn::tensor::{backend::Backend, Distribution, Tensor};
use common::{backend_name, Inner};
use kron_adapters::kron::autodiff::{contract_a, contract_a_composite};
use kron_adapters::kron::{kron, kron_apply, KronPlan};

type Grad = burn::backend::Autodiff<Inner>;

/// A markdown table's header after a blank line, the first column left-aligned.
fn header(cells: &[&str]) {
    println!("\n| {} |", cells.join(" | "));
    println!("|---|{}", "---:|".repeat(cells.len() - 1));
}

fn time<F: FnMut()>(f: F) -> f64 {
    kron_adapters::finetune::timing::median_ms(f, 2, 3.0)
}

/// `x·(a ⊗ b)` with the `a` axis contracted as one GEMM over `n·q` rows (`b_first`: `b` first).
fn gemm_layout<B: Backend>(
    x: Tensor<B, 2>,
    a: Tensor<B, 2>,
    b: Tensor<B, 2>,
    b_first: bool,
) -> Tensor<B, 2> {
    let [n, _] = x.dims();
    let [p, p2] = a.dims();
    let [q, q2] = b.dims();
    let t = x.reshape([n, p, q]);
    if b_first {
        let t = t.reshape([n * p, q]).matmul(b).reshape([n, p, q2]);
        let t = t.swap_dims(1, 2).reshape([n * q2, p]).matmul(a);
        t.reshape([n, q2, p2]).swap_dims(1, 2).reshape([n, p2 * q2])
    } else {
        let t = t.swap_dims(1, 2).reshape([n * q, p]).matmul(a);
        let t = t.reshape([n, q, p2]).swap_dims(1, 2).reshape([n * p2, q]);
        t.matmul(b).reshape([n, p2 * q2])
    }
}

/// The crate's apply with `a` contracted first (one `a`, one `b`, scale 1).
fn ours<B: Backend>(x: Tensor<B, 2>, a: &Tensor<B, 2>, b: &Tensor<B, 2>) -> Tensor<B, 2> {
    kron_apply(
        x,
        std::slice::from_ref(a),
        std::slice::from_ref(b),
        &KronPlan::a_first(1, 1),
        1.0,
    )
}

fn main() {
    kron_adapters::finetune::keep_freed_memory();
    let dev = Default::default();
    println!("backend: {}\n", backend_name());
    println!("| rows × (p·q) | base GEMM fwd | apply fwd: batched | GEMM layout | apply fwd+bwd: batched | GEMM layout | max difference |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for &(n, p, q) in &[
        (2048usize, 16usize, 24usize),
        (2048, 24, 16),
        (512, 64, 64),
        (10, 16, 24),
    ] {
        let d = p * q;
        let x =
            Tensor::<Grad, 2>::random([n, d], Distribution::Normal(0., 1.), &dev).require_grad();
        let a =
            Tensor::<Grad, 2>::random([p, p], Distribution::Normal(0., 0.1), &dev).require_grad();
        let b =
            Tensor::<Grad, 2>::random([q, q], Distribution::Normal(0., 0.1), &dev).require_grad();
        let w = Tensor::<Grad, 2>::random([d, d], Distribution::Normal(0., 0.05), &dev);
        let mine = ours(x.clone(), &a, &b);
        let other = gemm_layout(x.clone(), a.clone(), b.clone(), false);
        let diff: f32 = (mine - other).abs().max().into_scalar();
        let (xi, ai, bi) = (x.clone().inner(), a.clone().inner(), b.clone().inner());
        let base = time(|| {
            let _ = xi.clone().matmul(w.clone().inner()).into_data();
        });
        let fwd = time(|| {
            let _ = ours(xi.clone(), &ai, &bi).into_data();
        });
        let fwd_gemm = time(|| {
            let _ = gemm_layout(xi.clone(), ai.clone(), bi.clone(), false).into_data();
        });
        let both = time(|| {
            let g = ours(x.clone(), &a, &b).sum().backward();
            let _ = a.grad(&g).unwrap().into_data();
        });
        let both_gemm = time(|| {
            let g = gemm_layout(x.clone(), a.clone(), b.clone(), false)
                .sum()
                .backward();
            let _ = a.grad(&g).unwrap().into_data();
        });
        println!(
            "| {n} × ({p}·{q}) | {base:.2} | {fwd:.2} | {fwd_gemm:.2} | {both:.2} | {both_gemm:.2} | {diff:.1e} |"
        );
    }
    kron_table(&dev);
    grouped_table(&dev);
    host_table(&dev);
}

/// The `a` step `out[r] = aᵀ·T[r]` as Burn's broadcast batched product (`contract_a_composite`,
/// differentiated by Burn) against the crate's `contract_a` (on flex the host loops of
/// `kron::host`; under autodiff the registered node, whose backward runs them too): the
/// forward alone (inference), and forward plus both gradients. `T` is made afresh in each
/// timed call (`T·1`, in both columns), as an adapter's intermediate is; one column times
/// `contract_a` on a `T` held elsewhere too (an adapter's input, which its layer shares), which
/// flex's `into_data` copies before the host loops read it.
fn host_table(dev: &burn::tensor::Device<Inner>) {
    kron_adapters::kron::autodiff::register_backward::<Grad>();
    header(&[
        "rows × (p·q), p'",
        "fwd: Burn's product",
        "`contract_a`",
        "`contract_a`, `T` shared",
        "fwd+bwd: Burn's",
        "`contract_a`",
        "max difference",
    ]);
    for &(n, p, q, p2) in &[
        (2048usize, 16usize, 24usize, 16usize),
        (2048, 16, 48, 32),
        (2048, 32, 48, 16),
        (2048, 24, 24, 24),
        (2048, 64, 64, 64),
        (2048, 64, 128, 112),
    ] {
        let t = Tensor::<Grad, 3>::random([n, p, q], Distribution::Normal(0., 1.), dev);
        let a = Tensor::<Grad, 2>::random([p, p2], Distribution::Normal(0., 0.1), dev);
        let (t, a) = (t.require_grad(), a.require_grad());
        let (ti, ai) = (t.clone().inner(), a.clone().inner());
        let diff: f32 = (contract_a(ai.clone(), ti.clone())
            - contract_a_composite(ai.clone(), ti.clone()))
        .abs()
        .max()
        .into_scalar();
        type Fwd = fn(Tensor<Inner, 2>, Tensor<Inner, 3>) -> Tensor<Inner, 3>;
        let fwd = |f: Fwd, fresh: bool| {
            time(|| {
                let t = if fresh {
                    ti.clone().mul_scalar(1.0)
                } else {
                    ti.clone()
                };
                let _ = f(ai.clone(), t).into_data();
            })
        };
        let both = |f: fn(Tensor<Grad, 2>, Tensor<Grad, 3>) -> Tensor<Grad, 3>| {
            time(|| {
                let g = f(a.clone(), t.clone().mul_scalar(1.0)).sum().backward();
                let _ = (
                    a.grad(&g).unwrap().into_data(),
                    t.grad(&g).unwrap().into_data(),
                );
            })
        };
        println!(
            "| {n} × ({p}·{q}), {p2} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {diff:.1e} |",
            fwd(contract_a_composite, true),
            fwd(contract_a, true),
            fwd(contract_a, false),
            both(contract_a_composite),
            both(contract_a),
        );
    }
}

/// The `a` step's forward (inference), batched per row against `G` rows per product through
/// the block-diagonal `I_G ⊗ aᵀ`.
fn grouped_table(dev: &burn::tensor::Device<Inner>) {
    header(&[
        "rows × (p·q), p'",
        "per row",
        "G = 2",
        "G = 4",
        "G = 8",
        "max difference",
    ]);
    for &(n, p, q, p2) in &[
        (2048usize, 16usize, 24usize, 16usize),
        (2048, 16, 24, 64),
        (2048, 24, 24, 32),
    ] {
        let t = Tensor::<Inner, 3>::random([n, p, q], Distribution::Normal(0., 1.), dev);
        let a = Tensor::<Inner, 2>::random([p, p2], Distribution::Normal(0., 1.), dev);
        let per_row = || a.clone().transpose().unsqueeze::<3>().matmul(t.clone());
        let grouped = |g: usize| {
            let block = kron(Tensor::<Inner, 2>::eye(g, dev), a.clone().transpose());
            let t = t.clone().reshape([n / g, g * p, q]);
            block.unsqueeze::<3>().matmul(t).reshape([n, p2, q])
        };
        let want = per_row();
        let diff: f32 = [2, 4, 8]
            .map(|g| (grouped(g) - want.clone()).abs().max().into_scalar())
            .into_iter()
            .fold(0.0, f32::max);
        let ms = |f: &dyn Fn() -> Tensor<Inner, 3>| {
            time(|| {
                let _ = f().into_data();
            })
        };
        println!(
            "| {n} × ({p}·{q}), {p2} | {:.3} | {:.3} | {:.3} | {:.3} | {diff:.1e} |",
            ms(&per_row),
            ms(&|| grouped(2)),
            ms(&|| grouped(4)),
            ms(&|| grouped(8)),
        );
    }
}

/// The materialized `a ⊗ b` (merging, export, the folded inference forward): a broadcast
/// multiply, against `kron::kron` (which on flex is batched outer products, `quirks`).
fn kron_table(dev: &burn::tensor::Device<Inner>) {
    header(&["a ⊗ b", "broadcast multiply", "`kron::kron`", "equal"]);
    for &(a_in, a_out, b_in, b_out) in &[
        (16usize, 16usize, 24usize, 24usize),
        (16, 16, 24, 96),
        (16, 16, 96, 24),
        (64, 64, 64, 64),
    ] {
        let a = Tensor::<Inner, 2>::random([a_in, a_out], Distribution::Normal(0., 1.), dev);
        let b = Tensor::<Inner, 2>::random([b_in, b_out], Distribution::Normal(0., 1.), dev);
        let broadcast = |a: Tensor<Inner, 2>, b: Tensor<Inner, 2>| {
            let a4: Tensor<Inner, 4> = a.reshape([a_in, 1, a_out, 1]);
            let b4: Tensor<Inner, 4> = b.reshape([1, b_in, 1, b_out]);
            (a4 * b4).reshape([a_in * b_in, a_out * b_out])
        };
        let equal = broadcast(a.clone(), b.clone())
            .equal(kron(a.clone(), b.clone()))
            .all()
            .into_scalar();
        let t_broadcast = time(|| {
            let _ = broadcast(a.clone(), b.clone()).into_data();
        });
        let t_kron = time(|| {
            let _ = kron(a.clone(), b.clone()).into_data();
        });
        println!(
            "| ({a_in}, {a_out}) ⊗ ({b_in}, {b_out}) | {t_broadcast:.3} | {t_kron:.3} | {equal} |"
        );
    }
}
