//! A fused CubeCL kernel for the Kronecker apply on Burn's GPU backends (issue 13, lever 6).
//!
//! One `a` step and one `b` step of a [`KronPlan`](super::KronPlan) (KronA's whole apply; the
//! last two steps of a Kron-LoRA plan) as **one kernel launch**, with the intermediate in the
//! GPU's shared memory instead of a tensor in global memory:
//!
//! `out[r, i, j] = Σ_k fa[k, i] · Σ_l T[r, k, l] · fb[l, j]`
//!
//! with `T [n, p, q]`, `fa [p, p']` (the `a` step's factor), `fb [q, q']` (the `b` step's) and
//! `out [n, p', q']` — the same products as the two steps one after the other. One cube (work
//! group) per row `r` and tile of `tile` output columns `j`: it first contracts the `q` axis,
//! `S[k, j] = Σ_l T[r, k, l] · fb[l, j]` for its tile into shared memory (`p × tile` values),
//! then the `p` axis, `out[r, i, j] = Σ_k fa[k, i] · S[k, j]`. Of the two orders (`q` first or
//! `p` first, by transposing the roles through strides, no copy) the launch takes the one with
//! fewer multiply-adds, as [`KronPlan::cost`](super::KronPlan::cost) counts them.
//!
//! It runs on Burn's CubeCL backends without kernel fusion (`Wgpu`, `Vulkan`, `Metal`, `Cuda`:
//! the [`FusedKernel`] backends) and is **opt in**: [`register_fused_kernel`] makes
//! [`autodiff::apply_steps`](super::autodiff::apply_steps) use it for the backend (directly
//! for inference, and inside the apply's autodiff node when training on `Autodiff<backend>`).
//! In the backward, where only the input needs a gradient (frozen factors), `∂T` is this same
//! kernel on the gradient with the factors transposed; where factors train, their gradients need
//! the intermediate of every step, so the backward recomputes them with Burn's products. Where
//! the kernel cannot run (mixed
//! or quantized dtypes, or a `p × tile` block beyond the device's shared memory even at one
//! column) the same products run as Burn's two steps.
//!
//! It is checked against host references on a software Vulkan device (Mesa's lavapipe) in CI;
//! whether it is faster than Burn's two matrix products on a real GPU is for a GPU to tell
//! (`docs/benchmarks.md`).
//!
//! ```no_run
//! # #[cfg(feature = "wgpu")] {
//! use burn::backend::{Autodiff, Wgpu};
//! use kron_adapters::kron::autodiff::register_backward;
//! use kron_adapters::kron::cube::register_fused_kernel;
//!
//! register_fused_kernel::<Wgpu>(); // inference on Wgpu, and the forward of training on it
//! register_backward::<Autodiff<Wgpu>>(); // the apply's own backward around it
//! # }
//! ```

use std::any::{Any, TypeId};

use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Shape, Tensor, TensorPrimitive};
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::ops::permute;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
use cubecl::prelude::{CubeCount, CubeDim};

use super::autodiff::{self, float, step_forward};
use super::Side;

/// Output columns per cube at most (fewer where the shared memory is short).
const MAX_TILE: usize = 32;
/// Units (threads) per cube at most.
const MAX_UNITS: u32 = 128;
/// Rows per cube-count dimension at most: CubeCL's portable bound (WebGPU's 65,535).
const MAX_CUBES_PER_DIM: usize = 65_535;

/// The backends the fused kernel runs on: Burn's CubeCL backends without kernel fusion
/// (`CubeBackend<R, F, I, BT>`, which `Wgpu`, `Vulkan`, `Metal` and `Cuda` are when the `fusion`
/// feature is off).
pub trait FusedKernel: Backend + sealed::Launch {}

mod sealed {
    use burn::tensor::backend::Backend;
    use burn::tensor::ops::FloatTensor;

    pub trait Launch: Backend {
        /// The fused pair on this backend's primitives; `None` where it cannot run.
        fn launch_pair(
            t: &FloatTensor<Self>,
            fa: &FloatTensor<Self>,
            fb: &FloatTensor<Self>,
        ) -> Option<FloatTensor<Self>>;
    }
}

impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> sealed::Launch
    for CubeBackend<R, F, I, BT>
{
    fn launch_pair(
        t: &CubeTensor<R>,
        fa: &CubeTensor<R>,
        fb: &CubeTensor<R>,
    ) -> Option<CubeTensor<R>> {
        launch::<R>(t, fa, fb)
    }
}

impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> FusedKernel
    for CubeBackend<R, F, I, BT>
{
}

/// One `a` step and one `b` step as one kernel launch where it can run (see the module docs),
/// Burn's two products otherwise: `out[r] = faᵀ·T[r]·fb`.
///
/// # Shapes
/// - `t`: `[n, p, q]`
/// - `fa`: `[p, p']`, `fb`: `[q, q']`
/// - output: `[n, p', q']`
///
/// # Panics
/// If the shapes do not chain (as Burn's products would).
pub fn fused_pair<B: FusedKernel>(
    t: Tensor<B, 3>,
    fa: Tensor<B, 2>,
    fb: Tensor<B, 2>,
) -> Tensor<B, 3> {
    let [_, p, q] = t.dims();
    assert!(
        fa.dims()[0] == p && fb.dims()[0] == q,
        "fused_pair: T {:?} does not chain with fa {:?} and fb {:?}",
        t.dims(),
        fa.dims(),
        fb.dims()
    );
    let prims = (t.into_primitive(), fa.into_primitive(), fb.into_primitive());
    let (TensorPrimitive::Float(t), TensorPrimitive::Float(fa), TensorPrimitive::Float(fb)) = prims
    else {
        let (t, fa, fb) = prims;
        let (t, fa, fb) = (
            Tensor::from_primitive(t),
            Tensor::from_primitive(fa),
            Tensor::from_primitive(fb),
        );
        return two_steps(t, fa, fb);
    };
    match B::launch_pair(&t, &fa, &fb) {
        Some(out) => Tensor::from_primitive(TensorPrimitive::Float(out)),
        None => two_steps(float(t), float(fa), float(fb)),
    }
}

/// Makes [`autodiff::apply_steps`](super::autodiff::apply_steps) (so every Kronecker adapter's
/// apply) run adjacent `a`/`b` steps through [`fused_pair`] on backend `B`, and on
/// `Autodiff<B>` inside the apply's own autodiff node (registered with
/// [`register_backward`](super::autodiff::register_backward); Burn's own differentiation of the
/// steps does not call it). Returns whether it was registered before.
pub fn register_fused_kernel<B: FusedKernel>() -> bool {
    autodiff::set_pair(TypeId::of::<B>(), Some(pair_erased::<B>))
}

/// Undoes [`register_fused_kernel`]: Burn's two products again. Returns whether it was
/// registered.
pub fn unregister_fused_kernel<B: Backend>() -> bool {
    autodiff::set_pair(TypeId::of::<B>(), None)
}

/// Does [`autodiff::apply_steps`](super::autodiff::apply_steps) run the fused kernel on `B`?
pub fn is_fused<B: Backend>() -> bool {
    autodiff::has_pair(TypeId::of::<B>())
}

/// [`fused_pair`] with its tensors type-erased (the registry's entry for `B`).
fn pair_erased<B: FusedKernel>(
    t: Box<dyn Any>,
    fa: Box<dyn Any>,
    fb: Box<dyn Any>,
) -> Box<dyn Any> {
    let down = |b: Box<dyn Any>| -> Tensor<B, 2> {
        let p = *b
            .downcast::<FloatTensor<B>>()
            .expect("registered under B's TypeId, so its primitives are these");
        float(p)
    };
    let t = *t
        .downcast::<FloatTensor<B>>()
        .expect("registered under B's TypeId, so its primitives are these");
    let out = fused_pair::<B>(float(t), down(fa), down(fb));
    Box::new(out.into_primitive().tensor())
}

/// The `b` step, then the `a` step, as Burn's products.
fn two_steps<B: Backend>(t: Tensor<B, 3>, fa: Tensor<B, 2>, fb: Tensor<B, 2>) -> Tensor<B, 3> {
    step_forward(step_forward(t, fb, Side::B), fa, Side::A)
}

/// Picks the order and the tile, allocates the output and launches; `None` where the kernel
/// cannot run. (A tensor here is a handle: cloning one shares its buffer.)
fn launch<R: CubeRuntime>(
    t: &CubeTensor<R>,
    fa: &CubeTensor<R>,
    fb: &CubeTensor<R>,
) -> Option<CubeTensor<R>> {
    let same_dtype = t.dtype == fa.dtype && t.dtype == fb.dtype;
    let float = matches!(
        t.dtype,
        burn::tensor::DType::F32 | burn::tensor::DType::F16 | burn::tensor::DType::BF16
    );
    let quantized = t.qparams.is_some() || fa.qparams.is_some() || fb.qparams.is_some();
    if !same_dtype || !float || quantized {
        return None;
    }
    let [n, p, q] = t.meta.shape().dims::<3>();
    let p2 = fa.meta.shape().dims::<2>()[1];
    let q2 = fb.meta.shape().dims::<2>()[1];
    // `q` first costs p·q'·(q + p') per row, `p` first q·p'·(p + q').
    let q_first = p * q2 * (q + p2) <= q * p2 * (p + q2);
    // The contracted-second axis is the one kept in shared memory for a tile of columns.
    let (kept, cols) = if q_first { (p, q2) } else { (q, p2) };
    let client = t.client.clone();
    let hw = &client.properties().hardware;
    let kept_cap = kept.next_power_of_two();
    let elem = t.dtype.size();
    let mut tile = MAX_TILE.min(cols.next_power_of_two());
    while tile > 1 && kept_cap * tile * elem > hw.max_shared_memory_size {
        tile /= 2;
    }
    if kept_cap * tile * elem > hw.max_shared_memory_size {
        return None;
    }
    let dtype = t.dtype;
    let out = empty_device_contiguous_dtype(
        client.clone(),
        t.device.clone(),
        Shape::new([n, p2, q2]),
        dtype,
    );
    if n == 0 || p2 == 0 || q2 == 0 {
        return Some(out);
    }
    // The `p`-first order is the `q`-first kernel on the transposed problem: T's last two axes,
    // the factors' roles and the output's last two axes swapped (views, no copy).
    let (t_arg, first, second, out_arg) = if q_first {
        (t.clone(), fb.clone(), fa.clone(), out.clone())
    } else {
        let t = permute(t.clone(), &[0, 2, 1]);
        (t, fa.clone(), fb.clone(), permute(out.clone(), &[0, 2, 1]))
    };
    let per_dim = MAX_CUBES_PER_DIM.min(hw.max_cube_count.0 as usize).max(1);
    let cubes_x = n.min(per_dim);
    let cubes_y = n.div_ceil(cubes_x);
    let count = CubeCount::Static(cubes_x as u32, cubes_y as u32, cols.div_ceil(tile) as u32);
    let units = MAX_UNITS.min(hw.max_units_per_cube).max(1);
    kernel::kron_pair::launch::<R>(
        &client,
        count,
        CubeDim::new_1d(units),
        t_arg.into_tensor_arg(),
        first.into_tensor_arg(),
        second.into_tensor_arg(),
        out_arg.into_tensor_arg(),
        kept_cap,
        tile,
        dtype.into(),
    );
    Some(out)
}

/// The kernel, in CubeCL's language (kept apart: its prelude's `Tensor` and `Float` are not
/// Burn's).
mod kernel {
    use cubecl::prelude::*;

    /// `out[r, i, j] = Σ_k second[k, i] · Σ_l t[r, k, l] · first[l, j]` for the cube's row `r`
    /// (`CUBE_POS_X + CUBE_POS_Y · CUBE_COUNT_X`) and its tile of `tile` columns `j`
    /// (`CUBE_POS_Z`), through `S [kept_cap, tile]` in shared memory. Every tensor is read and
    /// written through its strides.
    #[cube(launch)]
    pub fn kron_pair<F: Float>(
        t: &Tensor<F>,
        first: &Tensor<F>,
        second: &Tensor<F>,
        out: &mut Tensor<F>,
        #[comptime] kept_cap: usize,
        #[comptime] tile: usize,
        #[define(F)] _dtype: StorageType,
    ) {
        let n = t.shape(0);
        let p = t.shape(1);
        let q = t.shape(2);
        let p2 = second.shape(1);
        let q2 = first.shape(1);
        let row = CUBE_POS_X as usize + CUBE_POS_Y as usize * CUBE_COUNT_X as usize;
        // The same for every unit of the cube, so no unit is left waiting at the barrier.
        if row >= n {
            terminate!();
        }
        let j0 = CUBE_POS_Z as usize * tile;
        let unit = UNIT_POS as usize;
        let units = CUBE_DIM as usize;
        let mut s = SharedMemory::<F>::new(kept_cap * tile);

        // S[k, jj] = Σ_l T[r, k, l] · first[l, j0 + jj]
        let t_row = row * t.stride(0);
        let t_k = t.stride(1);
        let t_l = t.stride(2);
        let f_l = first.stride(0);
        let f_j = first.stride(1);
        let mut at = unit;
        while at < p * tile {
            let k = at / tile;
            let j = j0 + at % tile;
            let mut acc = F::new(0.0);
            if j < q2 {
                for l in 0..q {
                    acc += t[t_row + k * t_k + l * t_l] * first[l * f_l + j * f_j];
                }
            }
            s[at] = acc;
            at += units;
        }
        sync_cube();

        // out[r, i, j0 + jj] = Σ_k second[k, i] · S[k, jj]
        let o_row = row * out.stride(0);
        let o_i = out.stride(1);
        let o_j = out.stride(2);
        let s_k = second.stride(0);
        let s_i = second.stride(1);
        let mut idx = unit;
        while idx < p2 * tile {
            let i = idx / tile;
            let jj = idx % tile;
            let j = j0 + jj;
            if j < q2 {
                let mut acc = F::new(0.0);
                for k in 0..p {
                    acc += second[k * s_k + i * s_i] * s[k * tile + jj];
                }
                out[o_row + i * o_i + j * o_j] = acc;
            }
            idx += units;
        }
    }
}
