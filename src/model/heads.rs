//! The attention heads' split and merge, `[b, s, n·hd] ↔ [b, n, s, hd]`, and on `burn-flex` the
//! copies they imply done by the crate.
//!
//! A permuted view is free, but the next reshape (the merge) or the backward of the split (the
//! gradient arrives as `[b, n, s, hd]` and must become `[b, s, n·hd]`) copies it. On `burn-flex`
//! that copy goes one element at a time (about 6 ms for one MiniLM activation, 50× an add; see
//! `crate::quirks`). There the copy is the crate's (`quirks::host_contiguous`: runs of `hd`
//! values, and under autodiff one node that copies only a strided input in its forward and only
//! a strided gradient in its backward; a MiniLM step 4–7% faster than with the products below,
//! docs/benchmarks.md). On autodiff over flex where the crate's backward is not registered it
//! is `t·I` (`I` the `hd × hd` identity, broadcast over the heads): `hd` multiply-adds per
//! element, exact (every product but one is `0·x`), and 15-20% faster for MiniLM's attention
//! forward + backward than flex's copy (`cargo bench --features full --bench encoder_ops`,
//! docs/benchmarks-history.md). The other backends get the plain permutes and reshapes.
//!
//! On a backend without autodiff (inference) the split adds no copy: it only matters to the
//! backward.
//!
//! The BERT encoder and the Llama decoder use them (the decoder also for its grouped-query
//! regrouping, and before its RoPE products so that they see a contiguous gradient: SmolLM2's
//! training step 7% faster, docs/benchmarks-history.md).

use burn::tensor::{backend::Backend, Tensor};

/// `t [.., hd]` made contiguous where the backend's copy of a permuted view is slow (on
/// `burn-flex` the crate's copy, or `t·I`: see the module docs); elsewhere `t` unchanged (the
/// next reshape copies it).
pub fn contiguous<B: Backend>(t: Tensor<B, 4>) -> Tensor<B, 4> {
    if !crate::quirks::products_beat_copies::<B>(&t.device()) {
        return t;
    }
    let t = match crate::quirks::host_contiguous(t) {
        Ok(t) => return t,
        Err(t) => t,
    };
    let hd = t.dims()[3];
    let eye = Tensor::<B, 2>::eye(hd, &t.device()).reshape([1, 1, hd, hd]);
    t.matmul(eye)
}

/// `[b, s, n·hd] → [b, n, s, hd]` (a strided view). On `burn-flex` with autodiff the split's
/// gradient comes back contiguous ([`contiguous_gradient`]).
///
/// # Shapes
/// - `t`: `[b, s, n·hd]`
/// - output: `[b, n, s, hd]`
pub fn split_heads<B: Backend>(t: Tensor<B, 3>, heads: usize) -> Tensor<B, 4> {
    let [b, s, d] = t.dims();
    contiguous_gradient(t.reshape([b, s, heads, d / heads])).swap_dims(1, 2)
}

/// `t` itself; on `burn-flex` with autodiff through [`contiguous`] (with the crate's backward
/// registered a node that passes `t` through and copies only its gradient), so that a gradient
/// arriving as a permuted view (the next operation is a permute) leaves it contiguous, for the
/// element-wise operations or reshapes before it. Without autodiff `t` unchanged.
pub fn contiguous_gradient<B: Backend>(t: Tensor<B, 4>) -> Tensor<B, 4> {
    if B::ad_enabled(&t.device()) {
        contiguous(t)
    } else {
        t
    }
}

/// `[b, n, s, hd] → [b, s, n·hd]`, contiguous; on `burn-flex` through [`contiguous`] instead
/// of flex's strided copy.
///
/// # Shapes
/// - `t`: `[b, n, s, hd]`
/// - output: `[b, s, n·hd]`
pub fn merge_heads<B: Backend>(t: Tensor<B, 4>) -> Tensor<B, 3> {
    let [b, n, s, hd] = t.dims();
    contiguous(t.swap_dims(1, 2)).reshape([b, s, n * hd])
}
