//! Dense products `x·w + c` on burn-flex into outputs of their own: the frozen layers' products
//! (`linear::linear_rows`) and LoRA's two products in training.
//!
//! burn-flex 0.21 gives every matmul's output a fresh buffer through `FlexTensor::empty`: a
//! zeroed `Vec<u8>` (a pass of `memset`), which `Bytes::from_bytes_vec` then copies into a new
//! 16-byte-aligned allocation (a `u8` vector declares an alignment of 1, so the copy is made
//! whatever the address). Two passes over every product's output before `gemm` writes it: 7%
//! of a MiniLM KronA training step's CPU time and 14% of a LoRA step's, whose rank-`r`
//! products cost little else (docs/benchmarks.md). [`product`] calls the same `gemm` (the
//! crate flex uses, with flex's rule for when to split it over threads) into a `Vec<f32>` that
//! only `gemm` writes and that flex takes over as it is. A bias is written into the rows first
//! and the product added to it, and a whole added tensor (LoRA's frozen product) is added into
//! where it lies: no pass and no buffer for the add either.
//!
//! Under autodiff over flex, where `kron::autodiff::register_backward` registered the backend,
//! it is one autodiff node whose backward runs the same kernel: `∂x = G·wᵀ` and `∂w = xᵀ·G`
//! (the transposed operand read through strides, never copied), `∂c = G` (a bias: `G` summed
//! over rows); it keeps `x` only where `w` is trained, and `w` only where `x` needs a
//! gradient. Elsewhere (every other backend, flex unregistered, other dtypes) [`takes`] says
//! no and the callers keep Burn's own ops: the same values up to the order in which the bias
//! is added.

use std::any::Any;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::{Autodiff, NodeId};
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Tensor, TensorData, TensorMetadata};

use crate::act::{is_f32, slice_mut, values};
use crate::kron::autodiff::{self, float};
use crate::kron::host::HostValues;
use crate::quirks;

/// Products from this many multiply-adds up are split over rayon's threads (burn-flex's rule:
/// 192³).
#[cfg(feature = "flex")]
const PARALLEL_MACS: usize = 192 * 192 * 192;

/// Does [`product`] take `x·w + c`: `f32` tensors on flex, or on autodiff over flex where the
/// crate's backward is registered?
pub(crate) fn takes<B: Backend>(
    x: &Tensor<B, 2>,
    w: &Tensor<B, 2>,
    c: Option<&Tensor<B, 2>>,
) -> bool {
    if !(is_f32(x) && is_f32(w) && c.is_none_or(is_f32)) {
        return false;
    }
    quirks::host_loops_take(x, w) || (quirks::host_loops_under(x) && autodiff::is_registered::<B>())
}

/// `x·w + c` where [`takes`] says so: on flex by [`host`], under autodiff as one node.
///
/// # Shapes
/// - `x`: `[n, k]`, `w`: `[k, m]`
/// - `c`: `[1, m]` (a row added to every row of the product) or `[n, m]`
/// - output: `[n, m]`
pub(crate) fn product<B: Backend>(
    x: Tensor<B, 2>,
    w: Tensor<B, 2>,
    c: Option<Tensor<B, 2>>,
) -> Tensor<B, 2> {
    if quirks::host_loops_take(&x, &w) {
        host(x, false, w, false, c)
    } else {
        autodiff::product_node(x, w, c)
    }
}

/// `x·w`: [`product`] where it [`takes`] it, else Burn's product.
pub(crate) fn matmul<B: Backend>(x: Tensor<B, 2>, w: Tensor<B, 2>) -> Tensor<B, 2> {
    if takes(&x, &w, None) {
        product(x, w, None)
    } else {
        x.matmul(w)
    }
}

/// `op(a)·op(b) + c` by `gemm` into an output of its own, `op` transposing where `a_t` / `b_t`
/// say (the operand read through strides); `c` as in [`product`]. On flex the operands are
/// read in place ([`HostValues`]), on other backends through their values.
///
/// # Shapes
/// - `op(a)`: `[n, k]`, `op(b)`: `[k, m]`
/// - `c`: `[1, m]` or `[n, m]`
/// - output: `[n, m]`
pub(crate) fn host<B: Backend>(
    a: Tensor<B, 2>,
    a_t: bool,
    b: Tensor<B, 2>,
    b_t: bool,
    c: Option<Tensor<B, 2>>,
) -> Tensor<B, 2> {
    let device = a.device();
    let (a_dims, b_dims) = (a.dims(), b.dims());
    let (n, k) = logical(a_dims, a_t);
    let (k2, m) = logical(b_dims, b_t);
    assert_eq!(k, k2, "the product's inner dimensions agree");
    let len = n * m;
    // The output's buffer: `c`'s values (added into), its row repeated, or one gemm writes.
    let mut out = match c {
        Some(c) if c.dims() == [n, m] => Some(values(c)),
        Some(c) => {
            assert_eq!(c.dims(), [1, m], "c is a row or the whole output");
            let row = HostValues::of(c);
            let row = row.floats();
            let mut rows = Vec::with_capacity(len);
            for _ in 0..n {
                rows.extend_from_slice(&row);
            }
            Some(TensorData::new(rows, [n, m]))
        }
        None => None,
    };
    let (a_vals, b_vals) = (HostValues::of(a), HostValues::of(b));
    let (a_vals, b_vals) = (a_vals.floats(), b_vals.floats());
    assert_eq!(a_vals.len(), a_dims[0] * a_dims[1], "a's values");
    assert_eq!(b_vals.len(), b_dims[0] * b_dims[1], "b's values");
    let lhs = Operand {
        values: &a_vals,
        strides: strides(a_dims[1], a_t),
    };
    let rhs = Operand {
        values: &b_vals,
        strides: strides(b_dims[1], b_t),
    };
    let data = match out.take() {
        Some(mut data) => {
            let dst = slice_mut(&mut data);
            // SAFETY: `dst` holds the `n × m` output, read and written by gemm.
            unsafe { gemm_into(dst.as_mut_ptr(), true, [n, k, m], lhs, rhs) };
            data
        }
        None => {
            let mut dst: Vec<f32> = Vec::with_capacity(len);
            // SAFETY: gemm writes every one of the `n × m` entries (`gemm_into` with `read`
            // false), so the first `len` are initialized before `set_len`.
            unsafe {
                gemm_into(dst.as_mut_ptr(), false, [n, k, m], lhs, rhs);
                dst.set_len(len);
            }
            TensorData::new(dst, [n, m])
        }
    };
    Tensor::from_data(data, &device)
}

/// `[rows, cols]` of a stored `[r, c]` matrix read transposed or not.
fn logical([r, c]: [usize; 2], transposed: bool) -> (usize, usize) {
    if transposed {
        (c, r)
    } else {
        (r, c)
    }
}

/// The (row, column) strides of a matrix stored row-major with `stored_cols` columns, read as
/// it is or transposed.
fn strides(stored_cols: usize, transposed: bool) -> [isize; 2] {
    let cols = stored_cols as isize;
    if transposed {
        [1, cols]
    } else {
        [cols, 1]
    }
}

/// A matrix operand: its values and its (row, column) strides.
#[derive(Clone, Copy)]
struct Operand<'a> {
    values: &'a [f32],
    strides: [isize; 2],
}

/// `dst = dst + lhs·rhs` (`read`) or `dst = lhs·rhs`: `[n, k]·[k, m]` into the row-major
/// `[n, m]` at `dst`, by the `gemm` crate, split over rayon's threads from [`PARALLEL_MACS`].
///
/// # Safety
/// `dst` is valid for `n·m` writes (and reads, where `read`); the operands hold their
/// matrices at the given strides.
#[cfg(feature = "flex")]
unsafe fn gemm_into(dst: *mut f32, read: bool, [n, k, m]: [usize; 3], lhs: Operand, rhs: Operand) {
    if n == 0 || m == 0 {
        return;
    }
    if k == 0 {
        if !read {
            // SAFETY: `dst` is valid for `n·m` writes; zero bits are 0.0.
            unsafe { dst.write_bytes(0, n * m) };
        }
        return;
    }
    let parallelism = if n.saturating_mul(m).saturating_mul(k) >= PARALLEL_MACS {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    let ([lhs_rs, lhs_cs], [rhs_rs, rhs_cs]) = (lhs.strides, rhs.strides);
    // SAFETY: the caller's contract; gemm reads `dst` only where `read`.
    unsafe {
        gemm::gemm(
            n,
            m,
            k,
            dst,
            1,
            m as isize,
            read,
            lhs.values.as_ptr(),
            lhs_cs,
            lhs_rs,
            rhs.values.as_ptr(),
            rhs_cs,
            rhs_rs,
            1.0f32,
            1.0f32,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// Without flex (nothing calls [`host`] there: [`takes`] is false), the same sums by loops.
#[cfg(not(feature = "flex"))]
unsafe fn gemm_into(dst: *mut f32, read: bool, [n, k, m]: [usize; 3], lhs: Operand, rhs: Operand) {
    let at = |o: Operand, i: usize, j: usize| {
        o.values[i * o.strides[0] as usize + j * o.strides[1] as usize]
    };
    for i in 0..n {
        for j in 0..m {
            let sum: f32 = (0..k).map(|l| at(lhs, i, l) * at(rhs, l, j)).sum();
            // SAFETY: the caller's contract.
            unsafe {
                let out = dst.add(i * m + j);
                out.write(if read { out.read() + sum } else { sum });
            }
        }
    }
}

/// [`product`] as an autodiff node of `Autodiff<I, C>`, its tensors type-erased (the
/// registry's entry, `kron::autodiff`): `x`, `w`, and `c` where given, that backend's float
/// primitives.
pub(crate) fn erased<I: Backend, C: CheckpointStrategy>(
    x: Box<dyn Any>,
    w: Box<dyn Any>,
    c: Option<Box<dyn Any>>,
) -> Box<dyn Any> {
    let down = |b: Box<dyn Any>| -> FloatTensor<Autodiff<I, C>> {
        *b.downcast()
            .expect("registered under Autodiff<I, C>'s TypeId, so its primitives are these")
    };
    let (x, w) = (down(x), down(w));
    Box::new(match c.map(down) {
        Some(c) => tracked::<I, C, 3>([x, w, c]),
        None => tracked::<I, C, 2>([x, w]),
    })
}

/// The node: `x·w (+ c)` by [`host`] on the inner backend, `x` checkpointed where `w` is
/// tracked and `w` where `x` is.
fn tracked<I: Backend, C: CheckpointStrategy, const N: usize>(
    inputs: [FloatTensor<Autodiff<I, C>>; N],
) -> FloatTensor<Autodiff<I, C>> {
    let nodes = inputs.each_ref().map(|t| t.node.clone());
    let n = inputs[0].primitive.shape().dims::<2>()[0];
    // `c` a row broadcast over several rows: its gradient is `G` summed over them.
    let row = N == 3 && n != 1 && inputs[N - 1].primitive.shape().dims::<2>()[0] == 1;
    let forward = |inputs: [FloatTensor<Autodiff<I, C>>; N]| {
        let mut p = inputs.into_iter().map(|t| float::<I, 2>(t.primitive));
        let (x, w) = (p.next().expect("x"), p.next().expect("w"));
        host(x, false, w, false, p.next()).into_primitive().tensor()
    };
    let op = Product { row };
    match op.prepare::<C>(nodes).compute_bound().stateful() {
        OpsKind::Tracked(mut prep) => {
            let x = inputs[1].is_tracked().then(|| prep.checkpoint(&inputs[0]));
            let w = inputs[0].is_tracked().then(|| prep.checkpoint(&inputs[1]));
            prep.finish((x, w), forward(inputs))
        }
        OpsKind::UnTracked(prep) => prep.finish(forward(inputs)),
    }
}

/// [`tracked`]'s backward: `∂c = G` (summed over rows where `c` is a row), `∂w = xᵀ·G`,
/// `∂x = G·wᵀ`, the products by [`host`].
#[derive(Debug)]
struct Product {
    /// Is `c` a row added to every row?
    row: bool,
}

impl<I: Backend, const N: usize> Backward<I, N> for Product {
    /// The checkpointed `x` (where `w` is tracked) and `w` (where `x` is).
    type State = (Option<NodeId>, Option<NodeId>);

    fn backward(self, ops: Ops<Self::State, N>, grads: &mut Gradients, ckpt: &mut Checkpointer) {
        let g = float::<I, 2>(grads.consume::<I>(&ops.node));
        let (x, w) = ops.state;
        let x = x.map(|id| float::<I, 2>(ckpt.retrieve_node_output(id)));
        let w = w.map(|id| float::<I, 2>(ckpt.retrieve_node_output(id)));
        let id = |i: usize| ops.parents[i].as_ref().map(|node| node.id);
        if let (3, Some(c)) = (N, id(N - 1)) {
            let grad = if self.row {
                g.clone().sum_dim(0)
            } else {
                g.clone()
            };
            grads.register::<I>(c, grad.into_primitive().tensor());
        }
        if let (Some(node), Some(x)) = (id(1), x) {
            let grad = host(x, true, g.clone(), false, None);
            grads.register::<I>(node, grad.into_primitive().tensor());
        }
        if let (Some(node), Some(w)) = (id(0), w) {
            let grad = host(g, false, w, true, None);
            grads.register::<I>(node, grad.into_primitive().tensor());
        }
    }
}
