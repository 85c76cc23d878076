//! What one backend does slowly enough that the crate works around it: the one place the crate
//! looks at which backend it runs on ([`Backend::name`]).
//!
//! `burn-flex`, Burn 0.21's default CPU backend, copies a permuted view that does not collapse
//! to a 2-D transpose one element at a time (its generic strided iterator), and evaluates a
//! broadcast element-wise operation the same way: about 6 ms for one MiniLM activation
//! (2,048 × 384 floats) against 0.12 ms for a plain add of the same size. Its GEMM, on the
//! other hand, reads strided and broadcast operands directly and writes a contiguous result. So
//! on flex, two things that are a copy or a broadcast product elsewhere are GEMMs whose every
//! output is one product (exact, the same bits):
//! - the attention heads' merge and the split's gradient ([`crate::model::heads`]): `t·I`
//!   where the crate's backward is not registered; where it is (and in inference),
//!   [`host_contiguous`] copies them in runs of the heads' width instead;
//! - the materialized Kronecker product ([`crate::kron::kron`]): outer products batched over
//!   its row blocks, 50× faster than the broadcast multiply at 384 × 1,536;
//! - the attention masks, added to every layer's scores ([`expand_for_adds`]): adding a
//!   `[32, 1, 1, 64]` mask to MiniLM's `[32, 12, 64, 64]` scores takes 17 ms there, 50× an add
//!   of two full tensors; expanded once per forward by products with ones (0.5 ms), each layer's
//!   add is a plain one.
//!
//! The other backends keep the plain operations: they copy and broadcast well, and a GPU's
//! matmul may round `f32` inputs (TF32), which a copy must not.
//!
//! One is about threads: flex and ndarray run element-wise operations on the calling thread,
//! so training steps compute two parts of a batch at once there ([`element_wise_on_one_thread`],
//! [`crate::shards`]).
//!
//! One is about a function: flex's GELU and its backward call libm's scalar `erff` per element
//! (12% of a MiniLM step's CPU time), and its SiLU is a sigmoid by scalar `expf` and a
//! product; on flex [`gelu`] and [`silu`] run the crate's vectorized host kernels instead
//! (`crate::act`, correctly rounded to `f32`), as autodiff nodes where the crate's backward is
//! registered. Its softmax likewise calls `expf` once per value (the attention's
//! probabilities, 786K values per layer for 16 × 64 tokens: 2.7–2.9 ms on one thread);
//! [`softmax`] runs the crate's host kernel instead (1.1 ms, the same formula in `f64`, rounded
//! once), under autodiff as one node with its backward on the host.
//!
//! One is about many small products: the Kronecker apply's `a` step is a broadcast batched
//! product (`n` products of `[p', p]·[p, q]`, 16 × 16 × 24 at MiniLM's width), and flex makes
//! one `gemm` call per row for it; on flex (`f32`, outside autodiff: the registered node calls
//! it on the inner backend) [`host_loops_take`] sends the step and its gradients to the crate's
//! host loops (`crate::kron::host`).
//!
//! One is about reading values: flex's `into_data` copies a shared tensor twice (to a new
//! vector, then realigned), and an adapted layer's input is always shared (the frozen product
//! reads it, the autodiff node keeps it). [`host_floats`] borrows a flex tensor's buffer
//! instead, where it is `f32` and in order, for the Kronecker apply's host rows
//! (`crate::kron::host`), which read the input in place.
//!
//! One is about allocation: flex gives every product's output a zeroed buffer and then copies
//! it into an aligned one before `gemm` writes it (7% of a MiniLM KronA step, 14% of a LoRA
//! step). The frozen layers' products and LoRA's run `gemm` into outputs of their own instead
//! (`crate::product`, where [`host_loops_take`] or, under autodiff, [`host_loops_under`] says).
//!
//! One is about quantized weights: Burn 0.21 multiplies by a quantized tensor (and looks rows
//! up in one) by dequantizing all of it first, on flex on one thread, at every call. A frozen
//! weight held in int8 (`TensorSource::quantize_frozen`) is read where flex keeps its `i8`
//! values instead ([`host_int8`], `crate::qproduct`).
//!
//! One quirk is about exactness, not speed: Burn 0.21's default `gelu_backward`, which every
//! backend but flex and LibTorch inherits (ndarray, the CubeCL backends behind wgpu and CUDA,
//! fusion), is the derivative of GELU's tanh approximation while the forward is the exact,
//! erf-based GELU: the gradient is off by up to 8.7e-4 (near `|x| = 2`). [`gelu`] gives those
//! backends the exact derivative.

use burn::tensor::ops::{FloatTensor, QuantizedTensor};
use burn::tensor::{
    activation, backend::Backend, Tensor, TensorData, TensorMetadata, TensorPrimitive,
};

use crate::act::HostFn;

/// Is `B` burn-flex (or autodiff over it), whose strided copies and broadcast element-wise
/// operations are slower than a GEMM computing the same values?
pub(crate) fn products_beat_copies<B: Backend>(device: &B::Device) -> bool {
    inner_name::<B>(device) == "flex"
}

/// Does `B` (or the backend under its autodiff) run its element-wise operations on the calling
/// thread? burn-flex and burn-ndarray do (only their large GEMMs and reductions use rayon's
/// other threads), so a training step computing two parts of its batch at once keeps more
/// cores busy ([`crate::shards`]).
pub(crate) fn element_wise_on_one_thread<B: Backend>(device: &B::Device) -> bool {
    matches!(inner_name::<B>(device).as_str(), "flex" | "ndarray")
}

/// `B`'s name ([`Backend::name`]), or that of the backend under its autodiff.
fn inner_name<B: Backend>(device: &B::Device) -> String {
    let name = B::name(device);
    match name
        .strip_prefix("autodiff<")
        .and_then(|n| n.strip_suffix('>'))
    {
        Some(inner) => inner.to_string(),
        None => name,
    }
}

/// GELU, `x·Φ(x)` with `Φ(x) = (1 + erf(x/√2))/2`, whose gradient is the exact derivative
/// `Φ(x) + x·φ(x)` on every backend. On flex (`f32`) the host kernel of [`crate::act`]:
/// directly without autodiff, as one autodiff node where the crate's backward is registered
/// (`kron::autodiff::register_backward`, which the training loops call). Where the backend's
/// own GELU backward is exact (flex otherwise, LibTorch), or there is no autodiff, Burn's fused
/// `gelu`; elsewhere under autodiff the same formula from `erf`, `mul` and scalars, which Burn
/// differentiates exactly (at the cost of keeping `x/√2` and `Φ(x)` for the backward, where
/// the fused op keeps `x`).
pub(crate) fn gelu<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    let device = x.device();
    let x = match activation_on_host(HostFn::Gelu, x) {
        Ok(y) => return y,
        Err(x) => x,
    };
    if !B::ad_enabled(&device) || gelu_backward_is_exact::<B>(&device) {
        return activation::gelu(x);
    }
    let cdf = x
        .clone()
        .div_scalar(std::f64::consts::SQRT_2)
        .erf()
        .add_scalar(1.0)
        .mul_scalar(0.5);
    x * cdf
}

/// SiLU, `x·σ(x)`: on flex (`f32`) the host kernel of [`crate::act`] (as one autodiff node
/// where the crate's backward is registered), elsewhere Burn's `silu` (a sigmoid and a product).
pub(crate) fn silu<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    match activation_on_host(HostFn::Silu, x) {
        Ok(y) => y,
        Err(x) => activation::silu(x),
    }
}

/// Softmax over dimension `dim`: on flex (`f32`, the last dimension) the host kernels of
/// [`crate::act`], where flex's own softmax calls libm's scalar `expf` once per value: in
/// place on `x`'s values without autodiff, as one autodiff node (keeping its output for the
/// backward, `y·(g − Σ g·y)` per row) where the crate's backward is registered; elsewhere
/// Burn's `softmax`.
pub(crate) fn softmax<B: Backend, const D: usize>(x: Tensor<B, D>, dim: usize) -> Tensor<B, D> {
    if dim + 1 != D {
        return activation::softmax(x, dim);
    }
    let cols = x.dims()[D - 1];
    let node = |flat| crate::kron::autodiff::host_softmax(flat, cols);
    on_host(x, crate::act::softmax_last, node).unwrap_or_else(|x| activation::softmax(x, dim))
}

/// The activation `f(x)` by its host kernel where it applies ([`on_host`]); `Err(x)` elsewhere.
fn activation_on_host<B: Backend, const D: usize>(
    f: HostFn,
    x: Tensor<B, D>,
) -> Result<Tensor<B, D>, Tensor<B, D>> {
    let node = |flat| crate::kron::autodiff::host_unary(f, flat);
    on_host(x, |x| crate::act::forward(f, x), node)
}

/// `x` through a host kernel where one applies (flex, `f32`): `plain(x)` without autodiff;
/// under autodiff, where the crate's backward is registered, `node` on `x` flattened (one
/// autodiff node); `Err(x)` elsewhere.
fn on_host<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    plain: impl FnOnce(Tensor<B, D>) -> Tensor<B, D>,
    node: impl FnOnce(Tensor<B, 1>) -> Tensor<B, 1>,
) -> Result<Tensor<B, D>, Tensor<B, D>> {
    let device = x.device();
    if inner_name::<B>(&device) != "flex" || !crate::act::is_f32(&x) {
        return Err(x);
    }
    if x.shape().num_elements() == 0 {
        // Burn's reshape reads a 0 as "keep this dimension": no flat view of an empty tensor.
        return Err(x);
    }
    if !B::ad_enabled(&device) {
        return Ok(plain(x));
    }
    if !crate::kron::autodiff::is_registered::<B>() {
        return Err(x);
    }
    // `x` moved in whole, so flex hands its buffer over without a copy.
    let dims = x.dims();
    let flat = x.reshape([dims.iter().product::<usize>()]);
    Ok(node(flat).reshape(dims))
}

/// Do the host loops of `kron::host` take tensors `x` and `y`: the Kronecker apply's `a` step
/// `out[r] = fᵀ·T[r]` and its gradients (two of `f`, `T` and the output's gradient `G`), and in
/// inference whole applies (`kron_apply`, `kron_apply_add`) and LoRA's add into the frozen
/// product? On flex itself, `f32`: not on autodiff over flex, whose graph the loops are not
/// part of (the registered autodiff node calls them on the inner backend).
pub(crate) fn host_loops_take<B: Backend, const D: usize, const E: usize>(
    x: &Tensor<B, D>,
    y: &Tensor<B, E>,
) -> bool {
    B::name(&x.device()) == "flex" && crate::act::is_f32(x) && crate::act::is_f32(y)
}

/// Is `x` an `f32` tensor of flex or of an autodiff backend over flex: does a registered
/// autodiff node's forward on `x`'s inner tensor meet [`host_loops_take`]?
pub(crate) fn host_loops_under<B: Backend, const D: usize>(x: &Tensor<B, D>) -> bool {
    inner_name::<B>(&x.device()) == "flex" && crate::act::is_f32(x)
}

/// The values of `t` borrowed from its buffer in host memory, in order: burn-flex's `f32`
/// tensors stored contiguously (a shared one too, where reading its values would copy it).
/// `None` for every other tensor and backend.
pub(crate) fn host_floats<B: Backend>(t: &FloatTensor<B>) -> Option<&[f32]> {
    #[cfg(feature = "flex")]
    {
        let t = (t as &dyn std::any::Any).downcast_ref::<burn_flex::FlexTensor>()?;
        (t.dtype() == burn::tensor::DType::F32).then_some(())?;
        let (start, end) = t.layout().contiguous_offsets()?;
        t.storage::<f32>().get(start..end)
    }
    #[cfg(not(feature = "flex"))]
    {
        let _ = t;
        None
    }
}

/// A burn-flex 8-bit symmetric quantized tensor (`Q8S`, stored as `i8`) read where it lies: its
/// values in row-major order, its scales, and how many consecutive values each scale covers
/// (the whole tensor for one scale, else a block along the last dimension). `None` for every
/// other tensor, scheme and backend.
pub(crate) fn host_int8<B: Backend>(t: &QuantizedTensor<B>) -> Option<(&[i8], &[f32], usize)> {
    #[cfg(feature = "flex")]
    {
        use burn::tensor::quantization::{QTensorPrimitive, QuantLevel, QuantStore, QuantValue};
        let q = (t as &dyn std::any::Any).downcast_ref::<burn_flex::FlexQTensor>()?;
        let scheme = q.scheme();
        (scheme.value == QuantValue::Q8S && scheme.store == QuantStore::Native).then_some(())?;
        let values = q.tensor();
        (values.dtype() == burn::tensor::DType::I8).then_some(())?;
        let (start, end) = values.layout().contiguous_offsets()?;
        let values = values.storage::<i8>().get(start..end)?;
        let per = match scheme.level {
            QuantLevel::Tensor => values.len(),
            QuantLevel::Block(b) if b.len() == 1 => b.num_elements(),
            QuantLevel::Block(_) => return None,
        };
        let scales = q.scales();
        (per > 0 && scales.len() == values.len().div_ceil(per)).then_some((values, scales, per))
    }
    #[cfg(not(feature = "flex"))]
    {
        let _ = t;
        None
    }
}

/// A flex `f32` tensor's whole buffer, the strides of its dimensions and the offset of its
/// first value: a strided view read where it lies. `None` for every other tensor and backend.
pub(crate) fn host_strides<B: Backend>(t: &FloatTensor<B>) -> Option<(&[f32], &[isize], usize)> {
    #[cfg(feature = "flex")]
    {
        let t = (t as &dyn std::any::Any).downcast_ref::<burn_flex::FlexTensor>()?;
        (t.dtype() == burn::tensor::DType::F32).then_some(())?;
        let layout = t.layout();
        Some((t.storage::<f32>(), layout.strides(), layout.start_offset()))
    }
    #[cfg(not(feature = "flex"))]
    {
        let _ = t;
        None
    }
}

/// `t`'s `f32` values in the row-major order of its shape, copied out of flex's buffer in runs
/// of its innermost dimension where that dimension's stride is 1 (one value at a time
/// elsewhere): a permuted view made contiguous without flex's own copy, which walks it one
/// element at a time. `None` for every other tensor and backend.
pub(crate) fn host_gather<B: Backend>(t: &FloatTensor<B>) -> Option<Vec<f32>> {
    let (storage, strides, start) = host_strides::<B>(t)?;
    Some(gather(storage, &t.shape(), strides, start))
}

/// `t` itself where flex keeps it in order, else its values gathered in order
/// ([`host_gather`]); on a backend without host values `t` as it is (the same values).
pub(crate) fn in_row_order<B: Backend>(t: FloatTensor<B>) -> FloatTensor<B> {
    if host_floats::<B>(&t).is_some() {
        return t;
    }
    match host_gather::<B>(&t) {
        Some(values) => {
            let shape = t.shape();
            B::float_from_data(TensorData::new(values, shape), &B::float_device(&t))
        }
        None => t,
    }
}

/// The values at `start + Σ index[d]·strides[d]` for every index of `dims` in row-major order,
/// the innermost dimension copied as one run where its stride is 1.
fn gather(storage: &[f32], dims: &[usize], strides: &[isize], start: usize) -> Vec<f32> {
    let len: usize = dims.iter().product();
    let mut out = Vec::with_capacity(len);
    let Some((&inner, outer_dims)) = dims.split_last() else {
        out.push(storage[start]);
        return out;
    };
    if len == 0 {
        return out;
    }
    let inner_stride = strides[dims.len() - 1];
    let mut index = vec![0usize; outer_dims.len()];
    let mut offset = start as isize;
    for _ in 0..len / inner {
        let at = offset as usize;
        if inner_stride == 1 {
            out.extend_from_slice(&storage[at..at + inner]);
        } else {
            out.extend((0..inner).map(|j| storage[(offset + j as isize * inner_stride) as usize]));
        }
        // The next index of the outer dimensions, the last fastest.
        for d in (0..outer_dims.len()).rev() {
            index[d] += 1;
            offset += strides[d];
            if index[d] < outer_dims[d] {
                break;
            }
            offset -= strides[d] * outer_dims[d] as isize;
            index[d] = 0;
        }
    }
    out
}

/// `t` in row-major order on flex, without flex's element-by-element copy of a strided view:
/// under autodiff (the crate's backward registered) one node whose forward and backward each
/// copy their tensor by [`host_gather`] only where it is a strided view (so a contiguous input
/// passes through, and its gradient comes back contiguous); on flex itself the copy alone.
/// Elsewhere `Err(t)`.
pub(crate) fn host_contiguous<B: Backend, const D: usize>(
    t: Tensor<B, D>,
) -> Result<Tensor<B, D>, Tensor<B, D>> {
    if !crate::act::is_f32(&t) {
        return Err(t);
    }
    if B::name(&t.device()) == "flex" {
        let p = in_row_order::<B>(t.into_primitive().tensor());
        return Ok(Tensor::from_primitive(TensorPrimitive::Float(p)));
    }
    if host_loops_under(&t) && crate::kron::autodiff::is_registered::<B>() {
        return Ok(crate::kron::autodiff::contiguous_node(t));
    }
    Err(t)
}

/// Does `B` (or the backend under its autodiff) implement `gelu_backward` itself, exactly?
/// Only flex and LibTorch do in Burn 0.21; an unknown backend is taken not to.
fn gelu_backward_is_exact<B: Backend>(device: &B::Device) -> bool {
    let inner = inner_name::<B>(device);
    inner == "flex" || inner.starts_with("libtorch")
}

/// `t` made ready to be added to several tensors of `shape` (its dimensions of size 1
/// broadcast): on burn-flex materialized to `shape` once, each broadcast dimension by a product
/// with a column of ones (exact: `1·x`), so that the adds are plain element-wise ones; elsewhere
/// `t` unchanged, broadcast by each add.
///
/// # Panics
/// If a dimension of `t` is neither 1 nor `shape`'s.
pub(crate) fn expand_for_adds<B: Backend, const D: usize>(
    t: Tensor<B, D>,
    shape: [usize; D],
) -> Tensor<B, D> {
    if !products_beat_copies::<B>(&t.device()) {
        return t;
    }
    let mut t = t;
    for (k, &n) in shape.iter().enumerate() {
        let dims = t.dims();
        if dims[k] == n {
            continue;
        }
        assert_eq!(
            dims[k], 1,
            "dimension {k} of {dims:?} broadcasts to {shape:?}"
        );
        let prefix: usize = dims[..k].iter().product();
        let suffix: usize = dims[k + 1..].iter().product();
        let ones = Tensor::<B, 3>::ones([1, n, 1], &t.device());
        let grown = ones.matmul(t.reshape([prefix, 1, suffix]));
        let mut next = dims;
        next[k] = n;
        t = grown.reshape(next);
    }
    t
}

#[cfg(all(test, feature = "flex", feature = "ndarray"))]
mod tests {
    use super::{expand_for_adds, host_floats, softmax};
    use burn::backend::{Autodiff, Flex, NdArray};
    use burn::tensor::{activation, Distribution, Tensor, Tolerance};

    /// A flex tensor's values are borrowed in order: a shared one, a slice of rows (an offset
    /// into its buffer), a reshape; a transposed view, another dtype and another backend are
    /// not read in place.
    #[test]
    fn host_floats_are_the_tensors_values_in_order() {
        let dev = Default::default();
        let x = Tensor::<Flex, 3>::random([4, 3, 5], Distribution::Normal(0.0, 1.0), &dev);
        let shared = x.clone();
        let read = |t: Tensor<Flex, 3>| {
            let want = t.to_data().to_vec::<f32>().unwrap();
            let p = t.into_primitive().tensor();
            (host_floats::<Flex>(&p).map(<[f32]>::to_vec), want)
        };
        let (got, want) = read(x.clone());
        assert_eq!(got, Some(want));
        let (got, want) = read(x.clone().narrow(0, 1, 2));
        assert_eq!(got.as_deref().map(<[f32]>::len), Some(2 * 3 * 5));
        assert_eq!(got, Some(want), "rows 1 and 2, at an offset");
        let (got, want) = read(x.clone().reshape([2, 6, 5]));
        assert_eq!(got, Some(want));
        assert_eq!(read(x.clone().swap_dims(1, 2)).0, None, "a transposed view");
        let half = x
            .clone()
            .cast(burn::tensor::DType::F16)
            .into_primitive()
            .tensor();
        assert_eq!(host_floats::<Flex>(&half), None, "not f32");
        let nd = Tensor::<NdArray, 1>::ones([3], &Default::default());
        let nd = nd.into_primitive().tensor();
        assert_eq!(host_floats::<NdArray>(&nd), None, "not flex");
        drop(shared);
    }

    /// The host softmax (flex, last dimension) gives Burn's values to `f32` rounding, on a
    /// shared input too (which it leaves as it was), and under autodiff (registered) Burn's
    /// gradient; along another dimension it is Burn's own.
    #[test]
    fn softmax_on_the_host_is_burns_softmax() {
        let dev = Default::default();
        let x = Tensor::<Flex, 4>::random([3, 2, 5, 70], Distribution::Normal(0.0, 4.0), &dev);
        let before = x.to_data();
        let want = activation::softmax(x.clone(), 3);
        let got = softmax(x.clone(), 3);
        got.to_data()
            .assert_approx_eq::<f32>(&want.to_data(), Tolerance::absolute(1e-6));
        assert_eq!(x.to_data(), before, "the shared input is unchanged");
        assert_eq!(
            softmax(x.clone(), 2).into_data(),
            activation::softmax(x.clone(), 2).into_data()
        );
        // Under autodiff, registered: the node's values and gradient against Burn's.
        type A = Autodiff<Flex>;
        assert!(crate::kron::autodiff::register_backward::<A>());
        let w = Tensor::<A, 4>::random([3, 2, 5, 70], Distribution::Default, &dev);
        let run = |host: bool| {
            let xa = Tensor::<A, 4>::from_data(before.clone(), &dev).require_grad();
            let ya = if host {
                softmax(xa.clone(), 3)
            } else {
                activation::softmax(xa.clone(), 3)
            };
            let grads = (ya.clone() * w.clone()).sum().backward();
            (
                ya.into_data(),
                xa.grad(&grads).expect("a gradient").into_data(),
            )
        };
        let ((y_host, g_host), (y_burn, g_burn)) = (run(true), run(false));
        y_host.assert_approx_eq::<f32>(&y_burn, Tolerance::absolute(1e-6));
        g_host.assert_approx_eq::<f32>(&g_burn, Tolerance::absolute(1e-6));
        assert!(g_host
            .to_vec::<f32>()
            .unwrap()
            .iter()
            .any(|&v| v.abs() > 1e-3));
    }

    /// On flex the products give `expand`'s values exactly; elsewhere `t` comes back as is.
    #[test]
    fn expansion_by_products_equals_the_broadcast() {
        let dev = Default::default();
        for (from, to) in [
            ([3, 1, 1, 5], [3, 4, 6, 5]),
            ([2, 1, 6, 5], [2, 3, 6, 5]),
            ([1, 4, 1, 1], [2, 4, 3, 2]),
            ([2, 3, 4, 5], [2, 3, 4, 5]),
        ] {
            let t = Tensor::<Flex, 4>::random(from, Distribution::Default, &dev);
            let got = expand_for_adds(t.clone(), to);
            assert_eq!(got.dims(), to);
            let want = t.expand(to);
            assert_eq!(got.into_data(), want.into_data(), "{from:?} → {to:?}");
            let other =
                Tensor::<NdArray, 4>::random(from, Distribution::Default, &Default::default());
            assert_eq!(expand_for_adds(other, to).dims(), from);
        }
    }
}
