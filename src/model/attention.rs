//! The decoder's attention in training as one autodiff node that keeps no probabilities, a
//! block of query rows at a time.
//!
//! `ctx = softmax(q·kt + mask)·v` differentiated by Burn keeps the probabilities
//! `P [b, heads, rows, total]` until the backward: 512 MB a layer for a 2,048-token Mistral-7B
//! layer, 19 MB a layer (570 MB for SmolLM2's 30) for two sequences of 512 tokens. Where the
//! crate's backward is registered (`kron::autodiff`; every training loop of the crate registers
//! it), [`blocked`] is one node instead, as FlashAttention's backward is: it keeps `q`, `kt`, `v`
//! and the mask (which the products keep anyway) and, in the backward, recomputes each block's
//! probabilities `P = softmax(q_r·kt + mask_r)` from them (the same function as the forward),
//! then, with `G_r` the block's rows of the output's gradient:
//! - `∂v += Pᵀ·G_r`, `∂P = G_r·vᵀ`;
//! - `∂S = P ⊙ (∂P − Σ_cols ∂P ⊙ P)`, the softmax's gradient by rows;
//! - `∂q_r = ∂S·ktᵀ`, `∂kt += q_rᵀ·∂S`.
//!
//! That is one more product per block than Burn's backward (`q_r·kt` again) and one more
//! softmax, for no `[b, heads, rows, total]` tensor kept between forward and backward. The
//! blocks (each row's softmax is its own) bound the scores computed at once
//! (`LlamaConfig::attention_scores_at_once`; one block for most batches). Elsewhere (no
//! autodiff, or a backend nobody registered) the same blocks are Burn's operations
//! ([`composite`]).

use std::ops::Range;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Tensor, TensorPrimitive};

use crate::kron::autodiff::{cat, float, held};
use crate::{product, quirks};

/// `softmax(q·kt + mask)·v`, a block of `block` query rows at a time: where the crate's
/// backward is registered for `B`, one node that keeps no probabilities (module docs);
/// elsewhere [`composite`].
///
/// # Shapes
/// - `q`: `[b, h, rows, d]`, `kt`: `[b, h, d, total]`, `v`: `[b, h, total, d]`
/// - `mask`: `[b, 1 | h, rows, total]` (added, broadcast over the heads where 1)
/// - output: `[b, h, rows, d]`
pub(crate) fn blocked<B: Backend>(
    q: Tensor<B, 4>,
    kt: Tensor<B, 4>,
    v: Tensor<B, 4>,
    mask: Tensor<B, 4>,
    block: usize,
) -> Tensor<B, 4> {
    match crate::kron::autodiff::registered_attention::<B>() {
        Some(node) if B::ad_enabled(&q.device()) => {
            let erase = |t: Tensor<B, 4>| -> Box<dyn std::any::Any> {
                Box::new(t.into_primitive().tensor())
            };
            let out = node(erase(q), erase(kt), erase(v), erase(mask), block);
            crate::kron::autodiff::unerase(out)
        }
        _ => composite(q, kt, v, mask, block),
    }
}

/// Is [`blocked`] the node on `B` (an autodiff backend whose backward the crate registered)?
pub(crate) fn is_node<B: Backend>(device: &B::Device) -> bool {
    B::ad_enabled(device) && crate::kron::autodiff::registered_attention::<B>().is_some()
}

/// [`blocked`] by Burn's operations (and the crate's `product` and `quirks`), each block's
/// probabilities kept for the backward where `B` differentiates.
pub(crate) fn composite<B: Backend>(
    q: Tensor<B, 4>,
    kt: Tensor<B, 4>,
    v: Tensor<B, 4>,
    mask: Tensor<B, 4>,
    block: usize,
) -> Tensor<B, 4> {
    let rows = q.dims()[2];
    let blocks = row_blocks(rows, block)
        .map(|r| {
            let qb = rows_of(&q, r.clone());
            product::batched(probabilities(qb, &kt, &mask, r), v.clone())
        })
        .collect();
    cat(blocks, 2)
}

/// The query rows of each block.
fn row_blocks(rows: usize, block: usize) -> impl Iterator<Item = Range<usize>> {
    (0..rows)
        .step_by(block.max(1))
        .map(move |r0| r0..(r0 + block.max(1)).min(rows))
}

/// `t`'s rows `r` (dimension 2).
fn rows_of<B: Backend>(t: &Tensor<B, 4>, r: Range<usize>) -> Tensor<B, 4> {
    let [b, h, _, d] = t.dims();
    t.clone().slice([0..b, 0..h, r, 0..d])
}

/// A block's probabilities `softmax(q_r·kt + mask_r)`, `[b, h, |r|, total]`: the forward's and
/// the backward's, by the same function. On flex the mask's rows are added by the softmax's
/// host kernel as it reads each row (`act::softmax_last_added`), where other backends add the
/// mask broadcast (on flex expanded first, `quirks::expand_for_adds`: a block-sized product).
fn probabilities<B: Backend>(
    qb: Tensor<B, 4>,
    kt: &Tensor<B, 4>,
    mask: &Tensor<B, 4>,
    r: Range<usize>,
) -> Tensor<B, 4> {
    let [b, h, rb, _] = qb.dims();
    let [mb, mh, mrows, total] = mask.dims();
    let scores = product::batched(qb, kt.clone());
    if quirks::host_loops_take(&scores, mask) && mb == b {
        let m = mask.clone().into_primitive().tensor();
        if let Some(adds) = quirks::host_floats::<B>(&m) {
            let row = |i: usize| {
                let (bi, hi, ri) = (i / (h * rb), (i / rb) % h, i % rb);
                (bi * mh + hi % mh) * mrows + r.start + ri
            };
            return crate::act::softmax_last_added(scores, adds, row);
        }
    }
    let m = mask.clone().slice([0..mb, 0..mh, r, 0..total]);
    let m = quirks::expand_for_adds(m, [b, h, rb, total]);
    quirks::softmax(scores + m, 3)
}

/// `a·b` over the last two dimensions, either operand transposed (a view).
fn product_t<B: Backend>(a: Tensor<B, 4>, a_t: bool, b: Tensor<B, 4>, b_t: bool) -> Tensor<B, 4> {
    let a = if a_t { a.swap_dims(2, 3) } else { a };
    let b = if b_t { b.swap_dims(2, 3) } else { b };
    product::batched(a, b)
}

/// The softmax's gradient by rows: `P ⊙ (∂P − Σ_cols ∂P ⊙ P)`.
fn softmax_gradient<B: Backend>(p: Tensor<B, 4>, dp: Tensor<B, 4>) -> Tensor<B, 4> {
    let dims = p.dims();
    if quirks::host_loops_take(&p, &dp) {
        let n = dims.iter().product::<usize>();
        let y = crate::act::values(p);
        return crate::act::softmax_backward(dims[3], &y, dp.reshape([n])).reshape(dims);
    }
    let dot = (dp.clone() * p.clone()).sum_dim(3);
    p * (dp - dot)
}

/// [`blocked`] as one node on `Autodiff<I, C>`, its tensors type-erased (the registry's entry,
/// `kron::autodiff`): Burn's differentiation ([`composite`]) where the mask is tracked.
pub(crate) fn erased<I: Backend, C: CheckpointStrategy>(
    q: Box<dyn std::any::Any>,
    kt: Box<dyn std::any::Any>,
    v: Box<dyn std::any::Any>,
    mask: Box<dyn std::any::Any>,
    block: usize,
) -> Box<dyn std::any::Any> {
    let down = |t: Box<dyn std::any::Any>| -> FloatTensor<Autodiff<I, C>> {
        *t.downcast()
            .expect("registered under Autodiff<I, C>'s TypeId, so its primitives are these")
    };
    let (q, kt, v, mask) = (down(q), down(kt), down(v), down(mask));
    if mask.is_tracked() {
        let up = |t: FloatTensor<Autodiff<I, C>>| {
            Tensor::<Autodiff<I, C>, 4>::from_primitive(TensorPrimitive::Float(t))
        };
        let out = composite(up(q), up(kt), up(v), up(mask), block);
        return Box::new(out.into_primitive().tensor());
    }
    let mask = float::<I, 4>(mask.primitive);
    let inputs = [q, kt, v];
    let nodes = inputs.each_ref().map(|t| t.node.clone());
    // Held until the node is registered (`kron::autodiff`, "Threads").
    let _held = held::<I, C, 3>(&inputs);
    let [q, kt, v] = inputs.map(|t| float::<I, 4>(t.primitive));
    let forward = |q, kt, v, mask| {
        composite::<I>(q, kt, v, mask, block)
            .into_primitive()
            .tensor()
    };
    let node = BlockedAttention { block };
    let out = match <BlockedAttention as Backward<I, 3>>::prepare::<C>(node, nodes)
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let state = [q.clone(), kt.clone(), v.clone(), mask.clone()];
            prep.finish(state, forward(q, kt, v, mask))
        }
        OpsKind::UnTracked(prep) => prep.finish(forward(q, kt, v, mask)),
    };
    Box::new(out)
}

/// [`erased`]'s node: keeps `q`, `kt`, `v` and the mask; its backward recomputes each block's
/// probabilities (module docs).
#[derive(Debug)]
struct BlockedAttention {
    block: usize,
}

impl<I: Backend> Backward<I, 3> for BlockedAttention {
    /// `q`, `kt`, `v` and the mask.
    type State = [Tensor<I, 4>; 4];

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let g = float::<I, 4>(grads.consume::<I>(&ops.node));
        let [q_node, kt_node, v_node] = ops.parents;
        let [q, kt, v, mask] = ops.state;
        let rows = q.dims()[2];
        let (mut dq, mut dkt, mut dv) = (Vec::new(), None, None);
        let add = |acc: Option<Tensor<I, 4>>, t: Tensor<I, 4>| match acc {
            Some(acc) => Some(acc + t),
            None => Some(t),
        };
        for r in row_blocks(rows, self.block) {
            let qb = rows_of(&q, r.clone());
            let gb = rows_of(&g, r.clone());
            let p = probabilities(qb.clone(), &kt, &mask, r);
            if v_node.is_some() {
                dv = add(dv, product_t(p.clone(), true, gb.clone(), false));
            }
            if q_node.is_some() || kt_node.is_some() {
                let ds = softmax_gradient(p, product_t(gb, false, v.clone(), true));
                if kt_node.is_some() {
                    dkt = add(dkt, product_t(qb, true, ds.clone(), false));
                }
                if q_node.is_some() {
                    dq.push(product_t(ds, false, kt.clone(), true));
                }
            }
        }
        let dq = (!dq.is_empty()).then(|| cat(dq, 2));
        for (node, grad) in [(q_node, dq), (kt_node, dkt), (v_node, dv)] {
            if let (Some(node), Some(grad)) = (node, grad) {
                grads.register::<I>(node.id, grad.into_primitive().tensor());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{blocked, composite};
    use burn::backend::autodiff::checkpoint::strategy::BalancedCheckpointing;
    use burn::backend::Autodiff;
    use burn::tensor::backend::AutodiffBackend;
    use burn::tensor::{Distribution, Tensor, TensorData};

    /// `Σ w ⊙ softmax(q·kt + mask)·v` by plain loops in `f64`: the reference whose central
    /// differences the gradients are checked against.
    struct Reference {
        dims: [usize; 5], // b, h, rows, d, total
        mask_heads: usize,
        mask: Vec<f64>,
        w: Vec<f64>,
    }

    impl Reference {
        /// The output `[b, h, rows, d]` and the loss.
        fn run(&self, q: &[f64], kt: &[f64], v: &[f64]) -> (Vec<f64>, f64) {
            let [b, h, rows, d, total] = self.dims;
            let mut out = vec![0.0; b * h * rows * d];
            for bh in 0..b * h {
                let mrow = (bh / h) * self.mask_heads + (bh % h) % self.mask_heads;
                for r in 0..rows {
                    let scores: Vec<f64> = (0..total)
                        .map(|c| {
                            let dot: f64 = (0..d)
                                .map(|k| q[(bh * rows + r) * d + k] * kt[(bh * d + k) * total + c])
                                .sum();
                            dot + self.mask[(mrow * rows + r) * total + c]
                        })
                        .collect();
                    let max = scores.iter().copied().fold(f64::MIN, f64::max);
                    let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for k in 0..d {
                        out[(bh * rows + r) * d + k] = (0..total)
                            .map(|c| e[c] / z * v[(bh * total + c) * d + k])
                            .sum();
                    }
                }
            }
            let loss = out.iter().zip(&self.w).map(|(o, w)| o * w).sum();
            (out, loss)
        }

        /// Central differences of the loss in every element of input `i` (q, kt, v).
        fn gradient(&self, inputs: &[Vec<f64>; 3], i: usize) -> Vec<f64> {
            let eps = 1e-6;
            (0..inputs[i].len())
                .map(|j| {
                    let at = |delta: f64| {
                        let mut x = inputs.clone();
                        x[i][j] += delta;
                        self.run(&x[0], &x[1], &x[2]).1
                    };
                    (at(eps) - at(-eps)) / (2.0 * eps)
                })
                .collect()
        }
    }

    /// The node's output and its gradients of `q`, `kt` and `v`, and Burn's differentiation
    /// of the same blocks ([`composite`]), against plain loops in `f64` and their central
    /// differences, on random data with a causal mask (broadcast over the heads, and per head),
    /// blocks that split the rows unevenly, one row a block, and all rows in one: the node within
    /// 1e-5 (it is within 2e-6). Burn's differentiation is not the reference: on ndarray, with all
    /// 13 rows in one block, its gradients of `q` and `kt` stray from the differences by up to
    /// 3.7e-4 (relative), where in blocks of fewer rows, and on flex, they agree to 2e-6.
    fn check<A: AutodiffBackend>() {
        assert!(crate::kron::autodiff::register_backward::<A>());
        let dev = Default::default();
        let [b, h, rows, d, total] = [2, 3, 13, 8, 11];
        let causal = |heads: usize| -> Vec<f64> {
            (0..b * heads * rows * total)
                .map(|i| {
                    let (r, c) = ((i / total) % rows, i % total);
                    if c > r % total {
                        -1e9
                    } else {
                        0.0
                    }
                })
                .collect()
        };
        let random =
            |shape: [usize; 4]| Tensor::<A, 4>::random(shape, Distribution::Normal(0.0, 1.0), &dev);
        let (q, kt, v) = (
            random([b, h, rows, d]),
            random([b, h, d, total]),
            random([b, h, total, d]),
        );
        let w = random([b, h, rows, d]);
        let f64s = |t: &Tensor<A, 4>| t.to_data().iter::<f64>().collect::<Vec<f64>>();
        let inputs = [f64s(&q), f64s(&kt), f64s(&v)];
        for (mask_heads, block) in [(1, 4), (h, 5), (1, 1), (h, rows)] {
            let reference = Reference {
                dims: [b, h, rows, d, total],
                mask_heads,
                mask: causal(mask_heads),
                w: f64s(&w),
            };
            let want = [
                reference.run(&inputs[0], &inputs[1], &inputs[2]).0,
                reference.gradient(&inputs, 0),
                reference.gradient(&inputs, 1),
                reference.gradient(&inputs, 2),
            ];
            let mask = Tensor::<A, 4>::from_data(
                TensorData::new(
                    reference.mask.iter().map(|&m| m as f32).collect(),
                    [b, mask_heads, rows, total],
                ),
                &dev,
            );
            for node in [true, false] {
                let (q, kt, v) = (
                    q.clone().require_grad(),
                    kt.clone().require_grad(),
                    v.clone().require_grad(),
                );
                let (qa, kta, va, m) = (q.clone(), kt.clone(), v.clone(), mask.clone());
                let out = match node {
                    true => blocked(qa, kta, va, m, block),
                    false => composite(qa, kta, va, m, block),
                };
                let grads = (out.clone() * w.clone()).sum().backward();
                let grad = |t: &Tensor<A, 4>| t.grad(&grads).expect("a gradient").to_data();
                let got = [out.to_data(), grad(&q), grad(&kt), grad(&v)];
                // Burn's differentiation on ndarray (not flex) strays further: see above.
                let tolerance = if node { 1e-5 } else { 1e-3 };
                for (i, (got, want)) in got.iter().zip(&want).enumerate() {
                    assert!(want.iter().any(|x| *x != 0.0), "reference {i} is zero");
                    for (j, (g, w)) in got.iter::<f64>().zip(want).enumerate() {
                        assert!(
                            (g - w).abs() <= tolerance * (1.0 + w.abs()),
                            "node {node}, block {block}, mask heads {mask_heads}: \
                             output/gradient {i} at {j}: {g} against {w}"
                        );
                    }
                }
            }
        }
    }

    #[cfg(feature = "ndarray")]
    #[test]
    fn the_attention_node_matches_central_differences_on_ndarray() {
        check::<Autodiff<burn::backend::NdArray>>();
        check::<Autodiff<burn::backend::NdArray, BalancedCheckpointing>>();
    }

    #[cfg(feature = "flex")]
    #[test]
    fn the_attention_node_matches_central_differences_on_flex() {
        check::<Autodiff<burn::backend::Flex>>();
    }
}
