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

use std::mem::MaybeUninit;

use rayon::prelude::*;

use crate::act::{is_f32, slice_mut, values};
use crate::kron::autodiff::{self, float};
use crate::kron::host::HostValues;
use crate::quirks;

/// Products from this many multiply-adds up are split over rayon's threads (burn-flex's rule:
/// 192³).
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
        offset: 0,
        strides: strides(a_dims[1], a_t),
    };
    let rhs = Operand {
        values: &b_vals,
        offset: 0,
        strides: strides(b_dims[1], b_t),
    };
    let threads = n.saturating_mul(m).saturating_mul(k) >= PARALLEL_MACS;
    let data = match out.take() {
        Some(mut data) => {
            let dst = slice_mut(&mut data);
            // SAFETY: `dst` holds the `n × m` output, read and written by gemm.
            unsafe { gemm_call(dst.as_mut_ptr(), true, [n, k, m], lhs, rhs, threads) };
            data
        }
        None => {
            let mut dst: Vec<f32> = Vec::with_capacity(len);
            // SAFETY: gemm writes every one of the `n × m` entries (`gemm_call` with `read`
            // false), so the first `len` are initialized before `set_len`.
            unsafe {
                gemm_call(dst.as_mut_ptr(), false, [n, k, m], lhs, rhs, threads);
                dst.set_len(len);
            }
            TensorData::new(dst, [n, m])
        }
    };
    Tensor::from_data(data, &device)
}

/// `out += x[:, first..first + p]·panel` on host values (`accumulate`; else `out =`): `x`
/// row-major with `x_cols` columns, `panel` row-major `[p, m]`, `out` row-major `[n, m]`; split
/// over rayon's threads from [`PARALLEL_MACS`] multiply-adds. (The int8 product's panels,
/// `crate::qproduct`: a large weight dequantized a panel of rows at a time.)
#[cfg_attr(not(feature = "flex"), allow(dead_code))] // flex's int8 weights only
pub(crate) fn panel_product(
    out: &mut [f32],
    accumulate: bool,
    (x, x_cols, first): (&[f32], usize, usize),
    panel: &[f32],
    [n, p, m]: [usize; 3],
) {
    assert!(
        first + p <= x_cols && x.len() == n * x_cols,
        "x holds the panel's columns"
    );
    assert!(
        panel.len() == p * m && out.len() == n * m,
        "the panel and output sizes"
    );
    let lhs = Operand {
        values: x,
        offset: first as isize,
        strides: [x_cols as isize, 1],
    };
    let rhs = Operand {
        values: panel,
        offset: 0,
        strides: [m as isize, 1],
    };
    let threads = n.saturating_mul(p).saturating_mul(m) >= PARALLEL_MACS;
    // SAFETY: `out` holds the `n × m` output (read where `accumulate`); the operands lie
    // within their values (checked above).
    unsafe { gemm_call(out.as_mut_ptr(), accumulate, [n, p, m], lhs, rhs, threads) };
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

/// A matrix operand: the values holding it, the offset of its first value, and its (row,
/// column) strides.
#[derive(Clone, Copy)]
#[cfg_attr(not(feature = "flex"), allow(dead_code))] // read by gemm_call on flex
struct Operand<'a> {
    values: &'a [f32],
    offset: isize,
    strides: [isize; 2],
}

/// Outputs from 2 to this many columns wide are the crate's own kernels ([`narrow_rows`] where
/// the left operand's rows lie in order, [`narrow_sums`] where it is read transposed): `gemm`
/// runs a row-major output's columns along its registers' 16 lanes, so a 2-column output used
/// 2 of them.
#[cfg(feature = "flex")]
const NARROW_COLS: usize = 4;

/// `lhs·rhs`, `[n, k]·[k, m]` with `m` ≤ [`NARROW_COLS`] and `lhs`'s rows in order (column
/// stride 1), row-major: each row's `m` dot products in one pass over it, 16 lanes at a time,
/// rows split over rayon's threads in fixed chunks from [`PARALLEL_MACS`] multiply-adds.
#[cfg(feature = "flex")]
fn narrow_rows([n, k, m]: [usize; 3], lhs: Operand, rhs: Operand) -> Vec<f32> {
    let [rhs_rs, rhs_cs] = rhs.strides;
    // `rhs`'s columns, each in order: `cols[j·k + t] = rhs[t, j]`.
    let cols: Vec<f32> = (0..m)
        .flat_map(|j| (0..k).map(move |t| t as isize * rhs_rs + j as isize * rhs_cs))
        .map(|at| rhs.values[(rhs.offset + at) as usize])
        .collect();
    let (first, rs) = (lhs.offset as usize, lhs.strides[0] as usize);
    let x = &lhs.values[first..];
    let isa = crate::act::Isa::best();
    let mut out = vec![0.0f32; n * m];
    let chunk = (PARALLEL_MACS / (k * m).max(1)).max(1);
    let run = |(c, out): (usize, &mut [f32])| {
        let r0 = c * chunk;
        let rows = out.len() / m;
        dots(isa, x, rs, k, m, r0, rows, &cols, out)
    };
    if n > chunk {
        out.par_chunks_mut(chunk * m).enumerate().for_each(run);
    } else {
        run((0, &mut out));
    }
    out
}

/// The most output values [`narrow_sums`] takes: its sums stay in the L1 cache.
#[cfg(feature = "flex")]
const NARROW_T_VALUES: usize = 4096;

/// `lhs·rhs`, `[n, k]·[k, m]` with `m` ≤ [`NARROW_COLS`] and `lhs` read transposed (its
/// columns in order: row stride 1), row-major: over the inner dimension `t`, `out[:, j] +=
/// lhs[:, t]·rhs[t, j]`, 16 lanes at a time; the inner dimension split over rayon's threads in
/// fixed chunks from [`PARALLEL_MACS`] multiply-adds, each chunk's sums its own, added in chunk
/// order (the result never depends on the number of threads).
#[cfg(feature = "flex")]
fn narrow_sums([n, k, m]: [usize; 3], lhs: Operand, rhs: Operand) -> Vec<f32> {
    let [rhs_rs, rhs_cs] = rhs.strides;
    let (first, ld) = (lhs.offset as usize, lhs.strides[1] as usize);
    let x = &lhs.values[first..];
    let w = |t: usize, j: usize| {
        rhs.values[(rhs.offset + t as isize * rhs_rs + j as isize * rhs_cs) as usize]
    };
    // `rhs` as it is read, row by row: `ws[t·m + j] = rhs[t, j]`.
    let ws: Vec<f32> = (0..k)
        .flat_map(|t| (0..m).map(move |j| (t, j)))
        .map(|(t, j)| w(t, j))
        .collect();
    let isa = crate::act::Isa::best();
    let chunk = (PARALLEL_MACS / (n * m).max(1)).max(1);
    let part = |t0: usize| {
        let mut sums = vec![0.0f32; m * n];
        let t1 = (t0 + chunk).min(k);
        axpys(isa, x, ld, n, m, t0..t1, &ws, &mut sums);
        sums
    };
    let starts: Vec<usize> = (0..k).step_by(chunk).collect();
    let parts: Vec<Vec<f32>> = if starts.len() > 1 {
        starts.par_iter().map(|&t0| part(t0)).collect()
    } else {
        starts.iter().map(|&t0| part(t0)).collect()
    };
    let mut sums = vec![0.0f32; m * n];
    for p in parts {
        sums.iter_mut().zip(p).for_each(|(s, v)| *s += v);
    }
    // `sums[j·n + i]` to row-major `out[i·m + j]`.
    (0..n * m).map(|at| sums[(at % m) * n + at / m]).collect()
}

/// The inner dimension's values [`axpys`] sums before adding them to the total.
#[cfg(feature = "flex")]
const SUM_BLOCK: usize = 256;

/// `sums[j·n..][..n] += x[t·ld..][..n]·ws[t·m + j]` for `t` in `ts`, `j` < `m`: the inner
/// dimension's part of [`narrow_sums`].
#[cfg(feature = "flex")]
#[allow(clippy::too_many_arguments)]
fn axpys(
    isa: crate::act::Isa,
    x: &[f32],
    ld: usize,
    n: usize,
    m: usize,
    ts: std::ops::Range<usize>,
    ws: &[f32],
    sums: &mut [f32],
) {
    crate::act::dispatch!(
        isa,
        axpys_avx2,
        (x: &[f32], ld: usize, n: usize, m: usize, ts: std::ops::Range<usize>, ws: &[f32], sums: &mut [f32]),
        {
            // In blocks of `SUM_BLOCK` of the inner dimension, each block's sums added to the
            // total: rounding grows with the block and the block count, not the whole length.
            let mut block = vec![0.0f32; sums.len()];
            for t0 in ts.clone().step_by(SUM_BLOCK) {
                block.iter_mut().for_each(|b| *b = 0.0);
                for t in t0..(t0 + SUM_BLOCK).min(ts.end) {
                    let col = &x[t * ld..t * ld + n];
                    for (j, b) in block.chunks_exact_mut(n).enumerate() {
                        let w = ws[t * m + j];
                        b.iter_mut().zip(col).for_each(|(b, &c)| *b = c.mul_add(w, *b));
                    }
                }
                sums.iter_mut().zip(&block).for_each(|(s, b)| *s += b);
            }
        }
    )
}

/// Rows `r0..r0 + rows` of [`narrow_rows`]: `out[i·m + j] = Σ_t x[(r0 + i)·rs + t]·cols[j·k + t]`.
#[cfg(feature = "flex")]
#[allow(clippy::too_many_arguments)]
fn dots(
    isa: crate::act::Isa,
    x: &[f32],
    rs: usize,
    k: usize,
    m: usize,
    r0: usize,
    rows: usize,
    cols: &[f32],
    out: &mut [f32],
) {
    crate::act::dispatch!(
        isa,
        dots_avx2,
        (x: &[f32], rs: usize, k: usize, m: usize, r0: usize, rows: usize, cols: &[f32], out: &mut [f32]),
        {
            for i in 0..rows {
                let at = (r0 + i) * rs;
                let (x, out) = (&x[at..at + k], &mut out[i * m..(i + 1) * m]);
                match m {
                    2 => row_dots::<2>(x, cols, out),
                    3 => row_dots::<3>(x, cols, out),
                    _ => row_dots::<4>(x, cols, out),
                }
            }
        }
    )
}

/// One row's `M` dot products with `cols` (`M` columns of `x.len()` values each), 16 lanes at a
/// time.
#[cfg(feature = "flex")]
#[inline(always)]
fn row_dots<const M: usize>(x: &[f32], cols: &[f32], out: &mut [f32]) {
    const L: usize = 16;
    let k = x.len();
    let mut acc = [[0.0f32; L]; M];
    let whole = k - k % L;
    for t in (0..whole).step_by(L) {
        let xs = &x[t..t + L];
        for (j, a) in acc.iter_mut().enumerate() {
            let cs = &cols[j * k + t..j * k + t + L];
            for l in 0..L {
                a[l] = xs[l].mul_add(cs[l], a[l]);
            }
        }
    }
    for (j, a) in acc.iter().enumerate() {
        let mut sum = a.iter().sum::<f32>();
        for t in whole..k {
            sum = x[t].mul_add(cols[j * k + t], sum);
        }
        out[j] = sum;
    }
}

/// `dst = dst + lhs·rhs` (`read`) or `dst = lhs·rhs`: `[n, k]·[k, m]` into the row-major
/// `[n, m]` at `dst` by one call of the `gemm` crate, which splits it over rayon's threads
/// where `threads` — or, for an output 2 to [`NARROW_COLS`] columns wide, by [`narrow_rows`]
/// (`lhs`'s rows in order) or [`narrow_sums`] (`lhs` read transposed, at most
/// [`NARROW_T_VALUES`] output values).
///
/// # Safety
/// `dst` is valid for `n·m` writes (and reads, where `read`); each operand's matrix lies
/// within its values at its offset and strides.
#[cfg(feature = "flex")]
unsafe fn gemm_call(
    dst: *mut f32,
    read: bool,
    [n, k, m]: [usize; 3],
    lhs: Operand,
    rhs: Operand,
    threads: bool,
) {
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
    let parallelism = if threads {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    let ([lhs_rs, lhs_cs], [rhs_rs, rhs_cs]) = (lhs.strides, rhs.strides);
    if (2..=NARROW_COLS).contains(&m) && lhs_cs == 1 && lhs_rs >= 0 {
        // SAFETY: the caller's contract.
        unsafe { narrow_write(dst, read, narrow_rows([n, k, m], lhs, rhs)) };
        return;
    }
    if (2..=NARROW_COLS).contains(&m) && lhs_rs == 1 && lhs_cs >= 0 && n * m <= NARROW_T_VALUES {
        // SAFETY: the caller's contract.
        unsafe { narrow_write(dst, read, narrow_sums([n, k, m], lhs, rhs)) };
        return;
    }
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
            lhs.values.as_ptr().offset(lhs.offset),
            lhs_cs,
            lhs_rs,
            rhs.values.as_ptr().offset(rhs.offset),
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

/// `dst (+)= out` (`read`: add), `out` the row-major result of [`narrow_rows`] or
/// [`narrow_sums`].
///
/// # Safety
/// `dst` is valid for `out.len()` writes, and reads where `read`.
#[cfg(feature = "flex")]
unsafe fn narrow_write(dst: *mut f32, read: bool, out: Vec<f32>) {
    for (i, v) in out.into_iter().enumerate() {
        // SAFETY: `i < out.len()`: `dst` is valid for that write, and for the read where
        // `read` (the caller's contract); where not, it is written before any read.
        unsafe {
            let d = dst.add(i);
            if read {
                *d += v;
            } else {
                d.write(v);
            }
        }
    }
}

/// Without flex nothing calls it: only flex tensors reach the host products
/// (`quirks::host_loops_take`, `quirks::host_strides`).
#[cfg(not(feature = "flex"))]
unsafe fn gemm_call(_: *mut f32, _: bool, _: [usize; 3], _: Operand, _: Operand, _: bool) {
    unreachable!("the host products run on flex only")
}

/// `a·b` over two batch dimensions (the attention's `q·kᵀ` and `p·v`): on flex by `gemm` into
/// an output of its own, each operand read in flex's buffer with its strides (a transposed or
/// permuted view as it lies); under autodiff over flex (registered) one node whose backward,
/// `∂a = G·bᵀ` and `∂b = aᵀ·G`, runs the same kernel. Elsewhere Burn's product.
///
/// # Shapes
/// - `a`: `[b1, b2, n, k]`, `b`: `[b1, b2, k, m]`
/// - output: `[b1, b2, n, m]`
pub(crate) fn batched<B: Backend>(a: Tensor<B, 4>, b: Tensor<B, 4>) -> Tensor<B, 4> {
    let same_batch = a.dims()[..2] == b.dims()[..2];
    if !(same_batch && is_f32(&a) && is_f32(&b)) {
        return a.matmul(b);
    }
    if quirks::host_loops_take(&a, &b) {
        let (a, b) = (a.into_primitive().tensor(), b.into_primitive().tensor());
        return match host_batched::<B>(&a, false, &b, false) {
            Some(out) => float::<B, 4>(out),
            None => float::<B, 4>(a).matmul(float::<B, 4>(b)),
        };
    }
    if quirks::host_loops_under(&a) && autodiff::is_registered::<B>() {
        return autodiff::batched_node(a, b);
    }
    a.matmul(b)
}

/// `op(a)·op(b)` for `[b1, b2, r, c]` flex tensors, `op` swapping the last two dimensions where
/// flagged (the strides swapped: nothing copied), into a contiguous output of its own: one
/// `gemm` per matrix, the matrices split over rayon's threads where they are many and small
/// (burn-flex's rule), `gemm` splitting each one where they are large. `None` where an operand
/// is not a flex `f32` tensor.
pub(crate) fn host_batched<B: Backend>(
    a: &FloatTensor<B>,
    a_t: bool,
    b: &FloatTensor<B>,
    b_t: bool,
) -> Option<FloatTensor<B>> {
    let (a, b) = (Strided::<B>::of(a, a_t)?, Strided::<B>::of(b, b_t)?);
    let [b1, b2, n, k] = a.dims;
    let [_, _, k2, m] = b.dims;
    assert_eq!(
        [k, b1, b2],
        [k2, b.dims[0], b.dims[1]],
        "the batched product's shapes agree"
    );
    let (count, per) = (b1 * b2, n * m);
    let len = count * per;
    let mut out: Vec<f32> = Vec::with_capacity(len);
    let macs = per.saturating_mul(k);
    let run = |matrix: usize, dst: &mut [MaybeUninit<f32>], threads: bool| {
        let (lhs, rhs) = (a.matrix(matrix, b2), b.matrix(matrix, b2));
        // SAFETY: `dst` holds one `n × m` output matrix; the operands' matrices lie at their
        // strides within their buffers (flex's layouts).
        unsafe { gemm_call(dst.as_mut_ptr().cast(), false, [n, k, m], lhs, rhs, threads) };
    };
    if per > 0 {
        let spare = &mut out.spare_capacity_mut()[..len];
        let total = macs.saturating_mul(count);
        let many = count >= 4 && total >= BATCH_PARALLEL_MACS;
        if macs >= PARALLEL_MACS && !many {
            for (i, dst) in spare.chunks_mut(per).enumerate() {
                run(i, dst, true);
            }
        } else if total >= BATCH_PARALLEL_MACS && count > 1 {
            spare
                .par_chunks_mut(per)
                .enumerate()
                .for_each(|(i, dst)| run(i, dst, false));
        } else {
            for (i, dst) in spare.chunks_mut(per).enumerate() {
                run(i, dst, false);
            }
        }
    }
    // SAFETY: every one of the `count` matrices of `per` entries was written by gemm.
    unsafe { out.set_len(len) };
    let device = a.device;
    Some(
        Tensor::<B, 4>::from_data(TensorData::new(out, [b1, b2, n, m]), &device)
            .into_primitive()
            .tensor(),
    )
}

/// Products over batches from this many multiply-adds in all are split over the batch
/// (burn-flex's rule: 128³).
const BATCH_PARALLEL_MACS: usize = 128 * 128 * 128;

/// An operand of [`host_batched`]: a flex tensor's buffer, its logical dimensions and strides
/// (the last two swapped where it is read transposed), and its offset.
struct Strided<'a, B: Backend> {
    values: &'a [f32],
    offset: usize,
    dims: [usize; 4],
    strides: [isize; 4],
    device: B::Device,
}

impl<'a, B: Backend> Strided<'a, B> {
    fn of(t: &'a FloatTensor<B>, transposed: bool) -> Option<Self> {
        let (values, strides, offset) = quirks::host_strides::<B>(t)?;
        let mut strides: [isize; 4] = strides.try_into().ok()?;
        let mut dims: [usize; 4] = t.shape().dims::<4>();
        if transposed {
            strides.swap(2, 3);
            dims.swap(2, 3);
        }
        Some(Self {
            values,
            offset,
            dims,
            strides,
            device: B::float_device(t),
        })
    }

    /// Matrix `i` of the batch (`b2` matrices a row of the first batch dimension).
    fn matrix(&self, i: usize, b2: usize) -> Operand<'a> {
        Operand {
            values: self.values,
            offset: self.offset as isize
                + (i / b2) as isize * self.strides[0]
                + (i % b2) as isize * self.strides[1],
            strides: [self.strides[2], self.strides[3]],
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
    // Held until the node is registered (`kron::autodiff`, "Threads").
    let _held = crate::kron::autodiff::held::<I, C, N>(&inputs);
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

/// [`batched`] as an autodiff node of `Autodiff<I, C>`, its tensors type-erased (the registry's
/// entry, `kron::autodiff`).
pub(crate) fn batched_erased<I: Backend, C: CheckpointStrategy>(
    a: Box<dyn Any>,
    b: Box<dyn Any>,
) -> Box<dyn Any> {
    let down = |t: Box<dyn Any>| -> FloatTensor<Autodiff<I, C>> {
        *t.downcast()
            .expect("registered under Autodiff<I, C>'s TypeId, so its primitives are these")
    };
    let (a, b) = (down(a), down(b));
    let forward =
        |a: FloatTensor<I>, b: FloatTensor<I>| match host_batched::<I>(&a, false, &b, false) {
            Some(out) => out,
            None => float::<I, 4>(a)
                .matmul(float::<I, 4>(b))
                .into_primitive()
                .tensor(),
        };
    let nodes = [a.node.clone(), b.node.clone()];
    Box::new(
        match <Batched as Backward<I, 2>>::prepare::<C>(Batched, nodes)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let a_state = b.is_tracked().then(|| prep.checkpoint(&a));
                let b_state = a.is_tracked().then(|| prep.checkpoint(&b));
                prep.finish((a_state, b_state), forward(a.primitive, b.primitive))
            }
            OpsKind::UnTracked(prep) => prep.finish(forward(a.primitive, b.primitive)),
        },
    )
}

/// [`batched_erased`]'s backward: `∂a = G·bᵀ`, `∂b = aᵀ·G` by [`host_batched`], the transposed
/// operands read through their strides.
#[derive(Debug)]
struct Batched;

impl<I: Backend> Backward<I, 2> for Batched {
    /// The checkpointed `a` (where `b` is tracked) and `b` (where `a` is).
    type State = (Option<NodeId>, Option<NodeId>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, ckpt: &mut Checkpointer) {
        let g = grads.consume::<I>(&ops.node);
        let (a, b) = ops.state;
        let a = a.map(|id| ckpt.retrieve_node_output::<FloatTensor<I>>(id));
        let b = b.map(|id| ckpt.retrieve_node_output::<FloatTensor<I>>(id));
        let product = |x: &FloatTensor<I>, x_t: bool, y: &FloatTensor<I>, y_t: bool| {
            host_batched::<I>(x, x_t, y, y_t).unwrap_or_else(|| {
                let op = |t: &FloatTensor<I>, tr: bool| {
                    let t = float::<I, 4>(t.clone());
                    if tr {
                        t.swap_dims(2, 3)
                    } else {
                        t
                    }
                };
                op(x, x_t).matmul(op(y, y_t)).into_primitive().tensor()
            })
        };
        let [a_node, b_node] = &ops.parents;
        if let (Some(node), Some(a)) = (b_node, &a) {
            grads.register::<I>(node.id, product(a, true, &g, false));
        }
        if let (Some(node), Some(b)) = (a_node, &b) {
            grads.register::<I>(node.id, product(&g, false, b, true));
        }
    }
}

#[cfg(all(test, feature = "flex"))]
mod tests {
    use burn::backend::{Autodiff, Flex};
    use burn::tensor::{Distribution, Tensor};

    use burn::backend::autodiff::checkpoint::strategy::BalancedCheckpointing;
    use burn::tensor::backend::AutodiffBackend;
    use burn::tensor::ElementConversion;

    use crate::kron::autodiff::register_backward;

    type A = Autodiff<Flex>;

    fn max_rel<B: AutodiffBackend>(got: Tensor<B, 4>, want: Tensor<B, 4>) -> f32 {
        let scale: f32 = want.clone().abs().max().into_scalar().elem();
        let err: f32 = (got - want).abs().max().into_scalar().elem();
        err / scale
    }

    /// [`super::host`] where the output is 2 to 4 columns wide (the crate's row dot products,
    /// `narrow_rows`, where `a`'s rows lie in order; its sums over the inner dimension,
    /// `narrow_sums`, where `a` is read transposed; `gemm` at 5 columns and for a transposed
    /// `a` of many rows) against `f64` loops: `b` read as it lies and transposed, with no `c`,
    /// a row `c` and a whole `c` added, `k` a multiple of the 16 lanes and not; products large
    /// enough to be split over threads both ways.
    #[test]
    fn narrow_products_match_f64_loops() {
        type F = Flex;
        let dev = Default::default();
        let vals = |t: &Tensor<F, 2>| t.to_data().to_vec::<f32>().unwrap();
        let mut cases = Vec::new();
        for m in 2..=5 {
            for k in [7, 16, 45] {
                for n in [3, 40] {
                    cases.push([n, k, m]);
                }
            }
        }
        cases.push([40_000, 45, 4]); // 39,321 rows a chunk: two chunks on rayon's threads
        cases.push([64, 40_000, 4]); // `a` transposed: 27,648 of the inner dimension a chunk
        for [n, k, m] in cases {
            for (a_t, b_t, c_kind) in [(false, false, 0), (false, true, 1), (true, false, 2)] {
                let a_dims = if a_t { [k, n] } else { [n, k] };
                let b_dims = if b_t { [m, k] } else { [k, m] };
                let a = Tensor::<F, 2>::random(a_dims, Distribution::Default, &dev);
                let b = Tensor::<F, 2>::random(b_dims, Distribution::Default, &dev);
                let c = match c_kind {
                    1 => Some(Tensor::<F, 2>::random([1, m], Distribution::Default, &dev)),
                    2 => Some(Tensor::<F, 2>::random([n, m], Distribution::Default, &dev)),
                    _ => None,
                };
                let (av, bv) = (vals(&a), vals(&b));
                let cv = c.as_ref().map(vals);
                let at = |i: usize, t: usize| if a_t { av[t * n + i] } else { av[i * k + t] };
                let bt = |t: usize, j: usize| if b_t { bv[j * k + t] } else { bv[t * m + j] };
                let got = vals(&super::host(a, a_t, b, b_t, c));
                assert_eq!(got.len(), n * m);
                for i in 0..n {
                    for j in 0..m {
                        let terms = (0..k).map(|t| at(i, t) as f64 * bt(t, j) as f64);
                        let scale = 1.0 + terms.clone().map(f64::abs).sum::<f64>();
                        let mut want: f64 = terms.sum();
                        if let Some(cv) = &cv {
                            want += cv[if c_kind == 1 { j } else { i * m + j }] as f64;
                        }
                        let what = format!("[{i}, {j}] of {n}×{k}×{m}, a_t {a_t}, b_t {b_t}");
                        let err = (got[i * m + j] as f64 - want).abs() / scale;
                        assert!(err < 1e-6, "{what}: {err:e}");
                    }
                }
            }
        }
    }

    /// [`super::batched`] on strided views (`a` a permute of its batch dimension and rows, `b` a
    /// transposed view, as the attention's `q·kᵀ`), on flex and registered autodiff over it,
    /// against Burn's own product: the value and both gradients; small matrices one at a time,
    /// many split over threads, one large enough for gemm to split.
    #[test]
    fn batched_products_match_burns_on_strided_views() {
        check_batched::<A>();
        check_batched::<Autodiff<Flex, BalancedCheckpointing>>();
    }

    fn check_batched<A: AutodiffBackend<InnerBackend = Flex>>() {
        register_backward::<A>();
        let dev = Default::default();
        for [b1, b2, n, k, m] in [[2, 3, 5, 4, 6], [2, 12, 64, 32, 64], [1, 2, 200, 190, 210]] {
            let a = Tensor::<A, 4>::random([b1, n, b2, k], Distribution::Default, &dev);
            let b = Tensor::<A, 4>::random([b1, b2, m, k], Distribution::Default, &dev);
            let r = Tensor::<A, 4>::random([b1, b2, n, m], Distribution::Default, &dev);
            let run = |ours: bool| {
                let (a, b) = (a.clone().require_grad(), b.clone().require_grad());
                let (x, y) = (a.clone().swap_dims(1, 2), b.clone().swap_dims(2, 3));
                let out = if ours {
                    super::batched(x, y)
                } else {
                    x.matmul(y)
                };
                let grads = (out.clone() * r.clone()).sum().backward();
                let (ga, gb) = (a.grad(&grads), b.grad(&grads));
                (
                    out,
                    Tensor::<A, 4>::from_inner(ga.unwrap()),
                    Tensor::<A, 4>::from_inner(gb.unwrap()),
                )
            };
            let (out, ga, gb) = run(true);
            let (want, wa, wb) = run(false);
            assert_eq!(out.dims(), [b1, b2, n, m]);
            assert!(max_rel(out, want) < 1e-5, "value at {b1}×{b2}×{n}×{k}×{m}");
            assert!(max_rel(ga, wa) < 1e-5, "∂a at {b1}×{b2}×{n}×{k}×{m}");
            assert!(max_rel(gb, wb) < 1e-5, "∂b at {b1}×{b2}×{n}×{k}×{m}");
            // Without autodiff: flex itself.
            let (x, y) = (
                a.clone().inner().swap_dims(1, 2),
                b.clone().inner().swap_dims(2, 3),
            );
            let got = Tensor::<A, 4>::from_inner(super::batched(x.clone(), y.clone()));
            let want = Tensor::<A, 4>::from_inner(x.matmul(y));
            assert!(
                max_rel(got, want) < 1e-5,
                "inference at {b1}×{b2}×{n}×{k}×{m}"
            );
        }
    }
}
