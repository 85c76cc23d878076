//! Training on a frozen base held in int8 (QLoRA's idea on Burn): the quantized weights as
//! they are under Burn's autodiff backend, and the products with them as autodiff nodes.
//!
//! Burn 0.21's `Autodiff<I>` keeps its inner backend's quantized tensors as its own (a
//! `Tensor<Autodiff<I>, 2>` can hold one) but implements none of their operations: quantizing,
//! dequantizing, and every product or lookup with a quantized operand panic as unimplemented. The
//! frozen weights need none of them differentiated — nothing trains them — only the inputs
//! flowing through them. So this module gives the autodiff backend, through the registry of
//! `crate::kron::autodiff` (which knows its inner backend `I`):
//! - [`quantize`] and [`dequantize`]: the inner backend's own, the result untracked;
//! - [`product`]: `y = x·w + c` (or `x·wᵀ`, a tied LM head) as one node whose forward is
//!   `crate::qproduct`'s product on `I` (on flex the `i8` values read in place; elsewhere the
//!   weight dequantized for the product) and whose backward is the other orientation of the
//!   same product: `∂x = G·wᵀ` (`product_t`), `∂x = G·w` for the transposed one, `∂c = G`
//!   (summed over rows where `c` is one row). The node keeps the quantized weight (a handle to
//!   its values) where `x` needs a gradient, nothing else: no `f32` copy of a weight outlives
//!   its product, forward or backward;
//! - [`embed`]: an embedding lookup in an int8 table, untracked (a frozen table's rows need no
//!   gradient, and nothing lies upstream of the ids).

use std::any::Any;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::Autodiff;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::ops::{FloatTensor, IntTensor, QuantizedTensor};
use burn::tensor::quantization::QuantScheme;
use burn::tensor::{Int, Tensor, TensorMetadata, TensorPrimitive};

use crate::kron::autodiff::float;

const ERASED: &str = "registered under the backend's TypeId, so its primitives are these";

/// `x` (a float primitive of `AB`) quantized with `scheme` by the inner backend: a quantized
/// primitive of `AB`, untracked.
pub(crate) fn quantize<AB: AutodiffBackend>(x: Box<dyn Any>, scheme: &QuantScheme) -> Box<dyn Any> {
    let x = AB::inner(*x.downcast::<FloatTensor<AB>>().expect(ERASED));
    let x = Tensor::<AB::InnerBackend, 1>::from_primitive(TensorPrimitive::Float(x));
    let TensorPrimitive::QFloat(q) = x.quantize_dynamic(scheme).into_primitive() else {
        unreachable!("Burn quantizes into a quantized tensor")
    };
    Box::new(AB::q_from_inner(q))
}

/// `q` (a quantized primitive of `AB`) dequantized by the inner backend: a float primitive of
/// `AB`, untracked.
pub(crate) fn dequantize<AB: AutodiffBackend>(q: Box<dyn Any>) -> Box<dyn Any> {
    let q = AB::q_inner(*q.downcast::<QuantizedTensor<AB>>().expect(ERASED));
    let x = Tensor::<AB::InnerBackend, 1>::from_primitive(TensorPrimitive::QFloat(q)).dequantize();
    Box::new(AB::from_inner(x.into_primitive().tensor()))
}

/// The rows `ids` (an int primitive of `AB`, `[b, s]`) of the quantized table `q` (`[vocab,
/// d]`), looked up by the inner backend (`crate::qproduct::embed`): a float primitive of `AB`
/// (`[b, s, d]`), untracked.
pub(crate) fn embed<AB: AutodiffBackend>(q: Box<dyn Any>, ids: Box<dyn Any>) -> Box<dyn Any> {
    let q = AB::q_inner(*q.downcast::<QuantizedTensor<AB>>().expect(ERASED));
    let ids = AB::int_inner(*ids.downcast::<IntTensor<AB>>().expect(ERASED));
    let table = Tensor::<AB::InnerBackend, 2>::from_primitive(TensorPrimitive::QFloat(q));
    let ids = Tensor::<AB::InnerBackend, 2, Int>::from_primitive(ids);
    let out = super::lookup(table, ids);
    Box::new(AB::from_inner(out.into_primitive().tensor()))
}

/// `x·w + c`, or `x·wᵀ` where `transposed` (then no `c`), on the inner backend: the
/// quantized product where `crate::qproduct` takes it, else the weight dequantized (before a
/// transpose: burn-ndarray 0.21 transposes a block-quantized tensor without moving its
/// blocks' scales).
///
/// # Shapes
/// - `x`: `[n, k]`; `w`: `[k, m]`, or `[m, k]` where `transposed`; `c`: `[1, m]`
/// - output: `[n, m]`
fn times<I: Backend>(
    x: Tensor<I, 2>,
    w: &QuantizedTensor<I>,
    c: Option<Tensor<I, 2>>,
    transposed: bool,
) -> Tensor<I, 2> {
    assert!(
        !transposed || c.is_none(),
        "a transposed product adds nothing"
    );
    match (super::in_place(&x, w), transposed) {
        (true, false) => super::product_in_place(x, w, c),
        (true, true) => super::product_t_in_place(x, w),
        (false, _) => {
            let w = Tensor::<I, 2>::from_primitive(TensorPrimitive::QFloat(w.clone())).dequantize();
            match (transposed, c) {
                (true, _) => x.matmul(w.transpose()),
                (false, Some(c)) => x.matmul(w) + c,
                (false, None) => x.matmul(w),
            }
        }
    }
}

/// [`super::product`] (`transposed`: [`super::product_t`]) under the autodiff backend
/// `Autodiff<I, C>`: `x` and `c` its float primitives, `w` its quantized one; the result one
/// node ([`QProduct`]).
pub(crate) fn product<I: Backend, C: CheckpointStrategy>(
    x: Box<dyn Any>,
    w: Box<dyn Any>,
    c: Option<Box<dyn Any>>,
    transposed: bool,
) -> Box<dyn Any> {
    type Ad<I, C> = Autodiff<I, C>;
    let down = |t: Box<dyn Any>| *t.downcast::<FloatTensor<Ad<I, C>>>().expect(ERASED);
    let w = *w.downcast::<QuantizedTensor<Ad<I, C>>>().expect(ERASED);
    let x = down(x);
    let out = match c.map(down) {
        Some(c) => tracked::<I, C, 2>([x, c], w, transposed),
        None => tracked::<I, C, 1>([x], w, transposed),
    };
    Box::new(out)
}

/// The node over `x` (and `c`): the product on the inner backend, the weight kept where `x`
/// is tracked.
fn tracked<I: Backend, C: CheckpointStrategy, const N: usize>(
    inputs: [FloatTensor<Autodiff<I, C>>; N],
    w: QuantizedTensor<I>,
    transposed: bool,
) -> FloatTensor<Autodiff<I, C>> {
    let nodes = inputs.each_ref().map(|t| t.node.clone());
    // Held until the node is registered (`kron::autodiff`, "Threads").
    let _held = crate::kron::autodiff::held::<I, C, N>(&inputs);
    let n = inputs[0].primitive.shape().dims::<2>()[0];
    let row = N == 2 && n != 1 && inputs[1].primitive.shape().dims::<2>()[0] == 1;
    let x_tracked = inputs[0].is_tracked();
    let [x, c] = {
        let mut p = inputs.into_iter().map(|t| float::<I, 2>(t.primitive));
        [p.next(), p.next()]
    };
    let op = QProduct { transposed, row };
    match op.prepare::<C>(nodes).compute_bound().stateful() {
        OpsKind::Tracked(prep) => {
            // The weight read in place, then kept as it is (no second copy of its scales).
            let y = times(x.expect("x"), &w, c, transposed);
            prep.finish(x_tracked.then_some(w), y.into_primitive().tensor())
        }
        OpsKind::UnTracked(prep) => {
            let y = times(x.expect("x"), &w, c, transposed);
            prep.finish(y.into_primitive().tensor())
        }
    }
}

/// [`tracked`]'s backward: `∂x` the product of `G` with the weight in the other orientation,
/// `∂c = G` (summed over rows where `c` is a row).
#[derive(Debug)]
struct QProduct {
    /// Was the forward `x·wᵀ`?
    transposed: bool,
    /// Is `c` a row added to every row?
    row: bool,
}

impl<I: Backend, const N: usize> Backward<I, N> for QProduct {
    /// The quantized weight, where `x` needs a gradient.
    type State = Option<QuantizedTensor<I>>;

    fn backward(self, ops: Ops<Self::State, N>, grads: &mut Gradients, _: &mut Checkpointer) {
        let g = float::<I, 2>(grads.consume::<I>(&ops.node));
        if let (2, Some(c)) = (N, ops.parents[N - 1].as_ref()) {
            let grad = match self.row {
                true => g.clone().sum_dim(0),
                false => g.clone(),
            };
            grads.register::<I>(c.id, grad.into_primitive().tensor());
        }
        if let (Some(x), Some(w)) = (ops.parents[0].as_ref(), ops.state) {
            let grad = times(g, &w, None, !self.transposed);
            grads.register::<I>(x.id, grad.into_primitive().tensor());
        }
    }
}
