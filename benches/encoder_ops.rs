//! Two changes to the encoder's own operations, each timed against the current code in the same
//! run (issue 13's lever 2), on MiniLM's attention at batch 32 × 64 tokens (2,048 rows, d = 384,
//! 12 heads) with a LoRA r = 1 adapter on each projection:
//!
//! - **fused QKV**: the frozen query, key and value weights as one `[d, 3d]` GEMM, the three
//!   outputs sliced from it, the adapters still per projection; against three projections.
//! - **scaling `q`**: `1/√d_head` applied to the query projection's output (`[b, s, d]`, before
//!   the head split, contiguous) instead of to the scores (`[b, h, s, s]`, twice as large at
//!   64 tokens).
//! - **the heads' copies as products** (`kron_adapters::model::heads`): the head merge, and the
//!   head split's gradient, made contiguous by a product with the identity instead of the
//!   backend's copy of a permuted view (on flex, element by element).
//!
//! Forward, and forward + backward of a sum (the input's gradient and the adapters'; the base
//! is frozen), median ms. Prints a markdown table (docs/benchmarks-history.md, "The encoder's own
//! operations"), and a second for inference (no autodiff): the attention core as the encoder
//! computes it, against Burn's fused `attention` op (`burn::tensor::module::attention`) fed the
//! heads as strided views or made contiguous first.
//!
//! ```text
//! cargo bench --features full --bench encoder_ops
//! ```

#[path = "../examples/common/mod.rs"]
mod common;

use burn::module::Module;
use burn::nn::LinearConfig;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{activation, backend::Backend, module, Distribution, ElementConversion, Tensor};
use common::{backend_name, Inner, Train};
use kron_adapters::model::heads;
use kron_adapters::{AdaptedLinear, AdapterConfig, FactorInit, LinearAdapter, LoraConfig};

const BATCH: usize = 32;
const SEQ: usize = 64;
const D: usize = 384;
const HEADS: usize = 12;

/// One way of computing the attention context from the layer input.
type Variant<'a> = &'a dyn Fn(Tensor<Train, 3>) -> Tensor<Train, 3>;

fn time<F: FnMut()>(f: F) -> f64 {
    kron_adapters::finetune::timing::median_ms(f, 2, 3.0)
}

fn sync<B: Backend, const N: usize>(t: Tensor<B, N>) {
    let _ = t.into_data();
}

fn split_heads<B: Backend>(t: Tensor<B, 3>) -> Tensor<B, 4> {
    t.reshape([BATCH, SEQ, HEADS, D / HEADS]).swap_dims(1, 2)
}

/// The attention context from `q`, `k`, `v` (`[b, s, d]`), scaling `q` (contiguous, before
/// the head split) or the scores.
fn attend<B: Backend>(
    q: Tensor<B, 3>,
    k: Tensor<B, 3>,
    v: Tensor<B, 3>,
    scale_q: bool,
) -> Tensor<B, 3> {
    let scale = 1.0 / ((D / HEADS) as f64).sqrt();
    let q = if scale_q { q.mul_scalar(scale) } else { q };
    let (q, k, v) = (split_heads(q), split_heads(k), split_heads(v));
    let scores = if scale_q {
        q.matmul(k.transpose())
    } else {
        q.matmul(k.transpose()).mul_scalar(scale)
    };
    let probs = activation::softmax(scores, 3);
    probs.matmul(v).swap_dims(1, 2).reshape([BATCH, SEQ, D])
}

/// As [`attend`] with `q` scaled, the head split and merge by `model::heads` (the merge, and
/// the split's gradient, made contiguous by a product with the identity).
fn attend_eye<B: Backend>(q: Tensor<B, 3>, k: Tensor<B, 3>, v: Tensor<B, 3>) -> Tensor<B, 3> {
    let q = q.mul_scalar(1.0 / ((D / HEADS) as f64).sqrt());
    let (q, k, v) = (
        heads::split_heads(q, HEADS),
        heads::split_heads(k, HEADS),
        heads::split_heads(v, HEADS),
    );
    let probs = activation::softmax(q.matmul(k.transpose()), 3);
    heads::merge_heads(probs.matmul(v))
}

fn adapted<B: Backend>(device: &B::Device) -> AdaptedLinear<B> {
    let lora = AdapterConfig::Lora(LoraConfig::new(1).with_init(FactorInit::Normal));
    AdaptedLinear::new(LinearConfig::new(D, D).init(device), &lora, device).unwrap()
}

fn main() {
    kron_adapters::finetune::keep_freed_memory();
    let dev = Default::default();
    let (q, k, v) = (
        adapted::<Train>(&dev),
        adapted::<Train>(&dev),
        adapted::<Train>(&dev),
    );
    // The fused base: the three frozen weights side by side, their biases likewise.
    let w = Tensor::cat(
        vec![
            q.base.weight.val(),
            k.base.weight.val(),
            v.base.weight.val(),
        ],
        1,
    )
    .detach();
    let bias = |l: &AdaptedLinear<Train>| l.base.bias.as_ref().map(|b| b.val()).unwrap();
    let b = Tensor::cat(vec![bias(&q), bias(&k), bias(&v)], 0).detach();
    let x0 = Tensor::<Train, 3>::random([BATCH, SEQ, D], Distribution::Normal(0.0, 1.0), &dev);

    let separate = |x: Tensor<Train, 3>, scale_q: bool| {
        attend(
            q.forward(x.clone()),
            k.forward(x.clone()),
            v.forward(x),
            scale_q,
        )
    };
    let fused = |x: Tensor<Train, 3>| {
        let base = x.clone().matmul(w.clone().unsqueeze()) + b.clone().unsqueeze();
        let delta = |l: &AdaptedLinear<Train>| l.adapter.as_ref().unwrap().apply(x.clone());
        let part = |i: usize| base.clone().slice([0..BATCH, 0..SEQ, i * D..(i + 1) * D]);
        attend(
            part(0) + delta(&q),
            part(1) + delta(&k),
            part(2) + delta(&v),
            false,
        )
    };
    let diff = (separate(x0.clone(), false) - fused(x0.clone()))
        .abs()
        .max()
        .into_scalar()
        .elem::<f32>();
    let diff_scale = (separate(x0.clone(), false) - separate(x0.clone(), true))
        .abs()
        .max()
        .into_scalar()
        .elem::<f32>();

    let eyed =
        |x: Tensor<Train, 3>| attend_eye(q.forward(x.clone()), k.forward(x.clone()), v.forward(x));
    let diff_eye = (separate(x0.clone(), false) - eyed(x0.clone()))
        .abs()
        .max()
        .into_scalar()
        .elem::<f32>();
    let fwd = |f: Variant| time(|| sync(f(x0.clone())));
    let fwd_bwd = |f: Variant| {
        time(|| {
            let x = x0.clone().require_grad();
            let g = f(x.clone()).sum().backward();
            let _ = x.grad(&g).map(sync);
        })
    };
    let before = |x| separate(x, false);
    let scaled_q = |x| separate(x, true);
    let rows: [(&str, Variant, f32); 4] = [
        (
            "three projections, scores scaled (the code before)",
            &before,
            0.0,
        ),
        ("fused QKV base GEMM", &fused, diff),
        (
            "three projections, q scaled before the head split (the code before the next)",
            &scaled_q,
            diff_scale,
        ),
        (
            "as the last, the heads' copies as products with the identity (the code now)",
            &eyed,
            diff_eye,
        ),
    ];
    println!(
        "backend: {}, batch {BATCH} × {SEQ}, d = {D}, {HEADS} heads, LoRA r = 1 on q, k, v\n",
        backend_name()
    );
    println!("| variant | fwd ms | fwd+bwd ms | max difference from the first |");
    println!("|---|---:|---:|---:|");
    for (name, f, d) in rows {
        println!("| {name} | {:.2} | {:.2} | {d:.1e} |", fwd(f), fwd_bwd(f));
    }
    // The layers are used through their module API above; keep them alive and counted.
    let _ = q.num_params() + k.num_params() + v.num_params();
    inference_table(&dev);
}

/// The attention core for inference (`q`, `k`, `v` already projected, an additive padding mask
/// expanded to the scores' shape as the encoder does on flex): the encoder's operations, against
/// Burn's fused op with the heads as strided views, or made contiguous first by
/// `heads::contiguous`.
fn inference_table(dev: &burn::tensor::Device<Inner>) {
    let input = || Tensor::<Inner, 3>::random([BATCH, SEQ, D], Distribution::Normal(0.0, 1.0), dev);
    let (q, k, v) = (input(), input(), input());
    let mask =
        Tensor::<Inner, 4>::random([BATCH, 1, 1, SEQ], Distribution::Uniform(-1.0, 0.0), dev);
    let mask = mask
        .expand([BATCH, 1, SEQ, SEQ])
        .reshape([BATCH, 1, SEQ, SEQ]);
    let full_mask = mask.clone().expand([BATCH, HEADS, SEQ, SEQ]);
    let full_mask = full_mask.reshape([BATCH, HEADS, SEQ, SEQ]);
    let scale = 1.0 / ((D / HEADS) as f64).sqrt();
    let split = |t: Tensor<Inner, 3>| heads::split_heads(t, HEADS);
    let ours = || {
        let (q, k, v) = (
            split(q.clone().mul_scalar(scale)),
            split(k.clone()),
            split(v.clone()),
        );
        let probs = activation::softmax(q.matmul(k.transpose()) + full_mask.clone(), 3);
        heads::merge_heads(probs.matmul(v))
    };
    let fused = |contiguous: bool| {
        let (q, k, v) = (split(q.clone()), split(k.clone()), split(v.clone()));
        let (q, k, v) = if contiguous {
            (
                heads::contiguous(q),
                heads::contiguous(k),
                heads::contiguous(v),
            )
        } else {
            (q, k, v)
        };
        let options = AttentionModuleOptions {
            scale: Some(scale),
            softcap: None,
            is_causal: false,
        };
        heads::merge_heads(module::attention(
            q,
            k,
            v,
            None,
            Some(mask.clone()),
            options,
        ))
    };
    let reference = ours();
    let differs = |t: Tensor<Inner, 3>| {
        (t - reference.clone())
            .abs()
            .max()
            .into_scalar()
            .elem::<f32>()
    };
    println!("\nInference (no autodiff), the attention core from projected q, k, v:\n");
    println!("| variant | ms | max difference from the first |");
    println!("|---|---:|---:|");
    println!(
        "| the encoder's (q scaled, scores + mask, softmax, merge) | {:.2} | 0 |",
        time(|| sync(ours()))
    );
    for (name, contiguous) in [
        ("Burn's fused `attention`, heads as strided views", false),
        (
            "Burn's fused `attention`, heads made contiguous first",
            true,
        ),
    ] {
        let d = differs(fused(contiguous));
        println!(
            "| {name} | {:.2} | {d:.1e} |",
            time(|| sync(fused(contiguous)))
        );
    }
}
