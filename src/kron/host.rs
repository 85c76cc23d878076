//! The `a` step of the Kronecker apply, `out[r] = fᵀ·T[r]`, and its two gradients as host loops,
//! for burn-flex.
//!
//! An `a` factor contracts the middle axis of `T [n, p, q]`. As Burn operations that is a
//! batched product of `n` small matrices (`[p', p]·[p, q]` each, 16 × 16 × 24 on a MiniLM
//! projection with KronA's √d factors), and burn-flex makes one `gemm` call per row, each with
//! its own dispatch and packing. A KronA training step on MiniLM spent 16.5% of its CPU time in
//! these products and their gradients, for under a tenth of its multiply-adds
//! (docs/benchmarks-history.md, "The `a` step by host loops"). Here each is one pass over the
//! rows, a row's values in the L1 cache:
//!
//! * [`contract`]: `out[r, j, :] = Σ_i f[i, j]·T[r, i, :]`: four output rows at a time share
//!   each load of `T`, sixteen (or eight) columns in registers, summed over `i`; rows split
//!   over rayon's threads in fixed chunks when the work is large;
//! * the gradient of `T` through the step, `∂T[r] = f·G[r]`, is [`contract`] with `fᵀ`, from
//!   the same read of `G` as the factor's ([`contract_a_grads`]);
//! * [`grad_factor`]: `∂f[i, j] = Σ_r Σ_k T[r, i, k]·G[r, j, k]`, blocks of 2 × 4 entries
//!   summed in eight-lane registers over a block of rows that fits the L1 cache, then added
//!   to the running sums. Burn's product is faster once the factor is large (its `gemm` calls
//!   then amortize), so [`FACTOR_GRAD_MAX`] bounds where this one is used.
//!
//! With AVX2 and FMA (chosen at run time) the loops are written with their intrinsics; elsewhere
//! (other CPUs, other architectures) plain Rust loops of the same shape (`contract`'s blocks of
//! four rows, `grad_factor`'s eight-lane dot products), which the compiler vectorizes for the
//! baseline target (NEON on aarch64). The two differ in rounding (fused
//! against separate multiply and add) and both from `gemm`'s order of summation; the tests
//! check each against `f64` references.
//!
//! `kron::autodiff` decides where they run (`quirks::host_loops_take`: flex, `f32`, and not on
//! autodiff tensors: inside the registered autodiff node, and in inference).
//!
//! For inference the same kernel also runs whole applies and adds:
//!
//! * [`apply_rows`] (behind `kron::kron_apply` and `kron_apply_add` on flex): each row through
//!   every factor in turn, a `b` step `T[r]·f` being the kernel with the row as its factor read
//!   through strides ([`contract_strided`]), the last step optionally adding into the frozen
//!   product's output;
//! * [`product_add`]: LoRA's `y + h·up`, `h`'s rows the kernel's output rows.
//!
//! And for training (inside `kron::autodiff`'s node), [`apply_rows`] as the forward and
//! [`apply_grads`] as the backward: every step's gradients from one pass over chunks of rows
//! (`grads`).
//!
//! With AVX-512F these use a 512-bit version of the kernel ([`Isa`]), whose results are the
//! AVX2 kernel's bit for bit: eight output rows at a time where there are eight (sixteen sums in
//! flight), columns by 48, 32, 24 and 16, and rows of 24 columns in pairs (three full registers
//! instead of one and a half each). In both kernels every block has its row count as a
//! constant, so its loops unroll and its sums stay in registers (with a run-time count they
//! moved between registers on every step of the sum).

use std::borrow::Cow;
use std::mem::MaybeUninit;
use std::ops::Range;

use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Tensor, TensorData, TensorPrimitive};
use rayon::prelude::*;

use super::Side;
use crate::act::{floats, has_avx2_fma, slice_mut, values, Isa};
use crate::quirks;

mod grads;

/// Floats of a chunk's largest row intermediate (32 KB) in [`rows_into`] and `grads`: a
/// chunk's buffers stay in the L1 and L2 caches.
const CHUNK_FLOATS: usize = 8 * 1024;

/// Floats of `T` and `G` per row block of [`grad_factor`] (32 KB).
const BLOCK_FLOATS: usize = 8 * 1024;

/// Multiply-adds from which [`contract`] splits its rows over rayon's threads, in chunks of
/// about this many (fixed, so the result never depends on the number of threads).
const PARALLEL_MACS: usize = 1 << 21;

/// The largest factor, as `p·p'·q` multiply-adds per row, whose gradient [`grad_factor`]
/// computes; beyond it Burn's chunked products are faster (measured at MiniLM's and SmolLM2's
/// shapes against 64 × 64 × 64, docs/benchmarks-history.md).
pub(crate) const FACTOR_GRAD_MAX: usize = 1 << 16;

/// The largest `a` factor, as `p·p'·q` multiply-adds per row, whose gradient [`apply_grads`]
/// computes: any with the 512-bit kernel ([`grad_factor_lanes`]; a 4096² KronA step, `a` 64 ×
/// 64, 215 → 208 ms against Burn's products), [`FACTOR_GRAD_MAX`] with the AVX2 one.
pub(crate) fn factor_grad_max() -> usize {
    if Isa::best() == Isa::Avx512 {
        usize::MAX
    } else {
        FACTOR_GRAD_MAX
    }
}

/// `out[r] = fᵀ·T[r]` for every row `r`, into a new buffer that only the kernels write (a
/// zeroed one would cost a pass over the output before they overwrite it).
///
/// # Shapes
/// - `f`: `[p, p2]`, row-major
/// - `t`: `[n, p, q]`
/// - output: `[n, p2, q]`
///
/// # Panics
/// If the lengths do not match the shapes.
pub(crate) fn contract(f: &[f32], p: usize, p2: usize, t: &[f32], n: usize, q: usize) -> Vec<f32> {
    let len = n * p2 * q;
    let mut out = Vec::with_capacity(len);
    let spare = &mut out.spare_capacity_mut()[..len];
    contract_into::<false>(has_avx2_fma(), f, p, p2, t, n, q, spare);
    // SAFETY: `contract_into` wrote each of the first `len` entries.
    unsafe { out.set_len(len) };
    out
}

/// [`contract`] into `out` (`[n, p2, q]`), every entry of which it writes; with `ADD` (where
/// `out` is initialized) each entry's sum is added to the value there instead.
#[allow(clippy::too_many_arguments)]
fn contract_into<const ADD: bool>(
    simd: bool,
    f: &[f32],
    p: usize,
    p2: usize,
    t: &[f32],
    n: usize,
    q: usize,
    out: &mut [MaybeUninit<f32>],
) {
    assert_eq!(f.len(), p * p2, "f is [p, p2]");
    let isa = if simd { Isa::Avx2 } else { Isa::Portable };
    contract_strided::<ADD>(isa, f, p, p2, [p2, 1], t, n, q, out);
}

/// [`contract_into`] with `f[i, j]` at `f[i·fs[0] + j·fs[1]]` (`fs = [p2, 1]`: row-major `[p,
/// p2]`; `[1, p]`: `fᵀ` stored row-major as `[p2, p]`).
#[allow(clippy::too_many_arguments)]
fn contract_strided<const ADD: bool>(
    isa: Isa,
    f: &[f32],
    p: usize,
    p2: usize,
    fs: [usize; 2],
    t: &[f32],
    n: usize,
    q: usize,
    out: &mut [MaybeUninit<f32>],
) {
    let (row_t, row_o) = (p * q, p2 * q);
    if p > 0 && p2 > 0 {
        let last = (p - 1) * fs[0] + (p2 - 1) * fs[1];
        assert!(last < f.len(), "f's strides stay inside it");
    }
    assert_eq!(t.len(), n * row_t, "t is [n, p, q]");
    assert_eq!(out.len(), n * row_o, "out is [n, p2, q]");
    if row_t == 0 || row_o == 0 {
        // Sums of no terms (p = 0), or nothing to write.
        if !ADD {
            out.iter_mut().for_each(|o| {
                o.write(0.0);
            });
        }
        return;
    }
    let rows = |t: &[f32], out: &mut [MaybeUninit<f32>]| {
        #[cfg(target_arch = "x86_64")]
        match isa {
            // SAFETY: the CPU has AVX2 and FMA (`has_avx2_fma()`), and with `Avx512` AVX-512F
            // (`Isa::best`); the lengths and strides were checked above.
            Isa::Avx2 => return unsafe { x86::contract::<ADD>(f, p, p2, fs, t, q, out) },
            Isa::Avx512 => return unsafe { x86::contract512::<ADD>(f, p, p2, fs, t, q, out) },
            Isa::Portable => {}
        }
        let _ = isa;
        portable::contract::<ADD>(f, p, p2, fs, t, q, out)
    };
    in_row_chunks(t, row_t, out, row_o, row_t * p2, rows);
}

/// `f` over `input` (rows of `row_in` values) and `out` (rows of `row_out`) in order, in chunks
/// of rows split over rayon's threads when the rows hold more than [`PARALLEL_MACS`]
/// multiply-adds (`macs` per row), in chunks of a fixed number of rows (so the result never
/// depends on the number of threads).
fn in_row_chunks(
    input: &[f32],
    row_in: usize,
    out: &mut [MaybeUninit<f32>],
    row_out: usize,
    macs: usize,
    f: impl Fn(&[f32], &mut [MaybeUninit<f32>]) + Sync,
) {
    let chunk = (PARALLEL_MACS / macs.max(1)).max(1);
    if input.len() / row_in.max(1) > chunk {
        input
            .par_chunks(chunk * row_in)
            .zip(out.par_chunks_mut(chunk * row_out))
            .for_each(|(input, out)| f(input, out));
    } else {
        f(input, out)
    }
}

/// `out` as a buffer the kernels write into (with `ADD`, add into).
fn as_uninit(out: &mut [f32]) -> &mut [MaybeUninit<f32>] {
    // SAFETY: `MaybeUninit<f32>` has `f32`'s layout, every entry is initialized, and the kernels
    // write only initialized values back.
    unsafe { &mut *(out as *mut [f32] as *mut [MaybeUninit<f32>]) }
}

/// Writes `v` into `o`, or with `ADD` adds it to the (initialized) value there.
#[inline(always)]
fn put<const ADD: bool>(o: &mut MaybeUninit<f32>, v: f32) {
    if ADD {
        // SAFETY: with `ADD` the caller passes initialized entries.
        let old = unsafe { o.assume_init() };
        o.write(old + v);
    } else {
        o.write(v);
    }
}

/// One step of [`rows_into`]: a factor's values, row-major, its shape and the axis it contracts.
pub(crate) struct HostStep<'a> {
    pub f: &'a [f32],
    pub dims: [usize; 2],
    pub side: Side,
}

/// The `[p, q]` of a row before each of `steps` and after the last (`p, q` first), and the
/// multiply-adds per row of them all.
///
/// # Panics
/// If a factor's values do not match its shape, or the shapes do not chain.
fn chain_dims(p: usize, q: usize, steps: &[HostStep]) -> (Vec<(usize, usize)>, usize) {
    let mut dims = vec![(p, q)];
    let mut macs = 0;
    for s in steps {
        let (pp, qq) = *dims.last().expect("starts with T's");
        assert_eq!(
            s.f.len(),
            s.dims[0] * s.dims[1],
            "a factor's values match its shape"
        );
        let (inner, next) = match s.side {
            Side::A => (pp, (s.dims[1], qq)),
            Side::B => (qq, (pp, s.dims[1])),
        };
        assert_eq!(s.dims[0], inner, "the factors chain");
        macs += pp * qq * s.dims[1];
        dims.push(next);
    }
    (dims, macs)
}

/// `out[r] = T[r]` through `steps` for every row `r` (with `ADD`, added to `out`), a chunk of
/// rows at a time ([`CHUNK_FLOATS`]), the chunk's intermediates in two buffers of its own: an
/// `a` step `fᵀ·T[r]` is [`contract`]'s kernel over the chunk's rows; a `b` step `T[r]·f` is the
/// same kernel with the chunk's `rows·p` rows of `q` values as its factor (read through strides
/// as their transpose) and `f` as its one row ([`step_rows`]). Rows split over rayon's threads in
/// fixed chunks when the work is large, as in [`contract_into`]. Each value is the same sums in
/// the same order whatever the chunks.
///
/// # Panics
/// If the shapes do not chain or the lengths do not match them.
fn rows_into<const ADD: bool>(
    isa: Isa,
    t: &[f32],
    n: usize,
    p: usize,
    q: usize,
    steps: &[HostStep],
    out: &mut [MaybeUninit<f32>],
) {
    assert!(
        p * q > 0 && !steps.is_empty(),
        "rows of some input, and some step"
    );
    let (dims, macs) = chain_dims(p, q, steps);
    let size = |(a, b): (usize, usize)| a * b;
    // The intermediates: after each step but the last.
    let scratch = dims[1..steps.len()]
        .iter()
        .copied()
        .map(size)
        .max()
        .unwrap_or(0);
    let (row_t, row_o) = (p * q, size(dims[steps.len()]));
    assert_eq!(t.len(), n * row_t, "t is [n, p, q]");
    assert_eq!(out.len(), n * row_o, "out is [n, p_last, q_last]");
    if n == 0 || row_o == 0 {
        return;
    }
    let sub = (CHUNK_FLOATS / scratch.max(row_t).max(row_o)).max(1);
    let chunk_rows = |t: &[f32], out: &mut [MaybeUninit<f32>]| {
        let rows = t.len() / row_t;
        let len = sub.min(rows) * scratch;
        // The second buffer holds the second intermediate: only a chain of three steps or more
        // has one (two steps write theirs into the first and then `out`).
        let second = if steps.len() > 2 { len } else { 0 };
        let mut bufs = [vec![0f32; len], vec![0f32; second]];
        let mut start = 0;
        while start < rows {
            let end = (start + sub).min(rows);
            let (t, out) = (
                &t[start * row_t..end * row_t],
                &mut out[start * row_o..end * row_o],
            );
            chunk::<ADD>(isa, t, end - start, (p, q), steps, out, &mut bufs);
            start = end;
        }
    };
    in_row_chunks(t, row_t, out, row_o, macs, chunk_rows);
}

/// One chunk of [`rows_into`]: `rows` rows of `t` (`[p, q]` each) through `steps` into `out`,
/// the intermediates in `bufs` (each at least as large as any of them).
fn chunk<const ADD: bool>(
    isa: Isa,
    t: &[f32],
    rows: usize,
    (p, q): (usize, usize),
    steps: &[HostStep],
    out: &mut [MaybeUninit<f32>],
    bufs: &mut [Vec<f32>; 2],
) {
    let (mut pp, mut qq) = (p, q);
    // Where the current intermediate is: the input rows, or `bufs[i]`.
    let mut cur: Option<usize> = None;
    for (i, s) in steps.iter().enumerate() {
        let last = i + 1 == steps.len();
        let (src, write, w) = in_turn(bufs, cur, t, rows * pp * qq);
        let (p2, q2) = match s.side {
            Side::A => (s.dims[1], qq),
            Side::B => (pp, s.dims[1]),
        };
        if last {
            step_rows::<ADD>(isa, s, src, rows, (pp, qq), out);
        } else {
            let dst = as_uninit(&mut write[..rows * p2 * q2]);
            step_rows::<false>(isa, s, src, rows, (pp, qq), dst);
        }
        (pp, qq) = (p2, q2);
        cur = Some(w);
    }
}

/// Two buffers used in turn: the current values (`first` before any step, else the first
/// `len` values of `bufs[c]` for `cur = Some(c)`), the buffer the next step writes, and its
/// index (the next `cur`).
pub(super) fn in_turn<'a>(
    bufs: &'a mut [Vec<f32>; 2],
    cur: Option<usize>,
    first: &'a [f32],
    len: usize,
) -> (&'a [f32], &'a mut Vec<f32>, usize) {
    let w = cur.map_or(0, |c| 1 - c);
    let [b0, b1] = bufs;
    let (read, write) = if w == 0 { (&*b1, b0) } else { (&*b0, b1) };
    let src = match cur {
        None => first,
        Some(_) => &read[..len],
    };
    (src, write, w)
}

/// One step over `rows` rows (`src [rows, pp, qq]`) into `dst` (with `ADD`, added to it): an
/// `a` step `fᵀ·T[r]` with the factor `[pp, p2]` row-major; a `b` step `T·f` with the rows'
/// `rows·pp` rows of `qq` values as the factor (`T[i, k]` at `k + i·qq`) and `f` its one row.
pub(super) fn step_rows<const ADD: bool>(
    isa: Isa,
    s: &HostStep,
    src: &[f32],
    rows: usize,
    (pp, qq): (usize, usize),
    dst: &mut [MaybeUninit<f32>],
) {
    let cols = s.dims[1];
    match s.side {
        Side::A => contract_strided::<ADD>(isa, s.f, pp, cols, [cols, 1], src, rows, qq, dst),
        Side::B => contract_strided::<ADD>(isa, src, qq, rows * pp, [1, qq], s.f, 1, cols, dst),
    }
}

/// `∂f = Σ_r T[r]·G[r]ᵀ`: `∂f[i, j] = Σ_r Σ_k T[r, i, k]·G[r, j, k]`.
///
/// # Shapes
/// - `t`: `[n, p, q]`
/// - `g`: `[n, p2, q]`
/// - output: `[p, p2]`, row-major
///
/// # Panics
/// If the lengths do not match the shapes.
pub(crate) fn grad_factor(t: &[f32], g: &[f32], p: usize, p2: usize, q: usize) -> Vec<f32> {
    grad_factor_with(has_avx2_fma(), t, g, p, p2, q)
}

fn grad_factor_with(simd: bool, t: &[f32], g: &[f32], p: usize, p2: usize, q: usize) -> Vec<f32> {
    let mut out = vec![0f32; p * p2];
    grad_factor_add(simd, t, g, p, p2, q, &mut out);
    out
}

/// [`grad_factor`] added to `out` (`[p, p2]`).
fn grad_factor_add(
    simd: bool,
    t: &[f32],
    g: &[f32],
    p: usize,
    p2: usize,
    q: usize,
    out: &mut [f32],
) {
    assert_eq!(out.len(), p * p2, "out is [p, p2]");
    let (row_t, row_g) = (p * q, p2 * q);
    if row_t == 0 || row_g == 0 {
        return;
    }
    assert_eq!(t.len() % row_t, 0, "t is [n, p, q]");
    assert_eq!(g.len(), t.len() / row_t * row_g, "g is [n, p2, q]");
    let rows = (BLOCK_FLOATS / (row_t + row_g)).max(1);
    for (tb, gb) in t.chunks(rows * row_t).zip(g.chunks(rows * row_g)) {
        #[cfg(target_arch = "x86_64")]
        if simd {
            // SAFETY: the CPU has AVX2 and FMA (`has_avx2_fma()`), and the lengths were checked
            // above.
            unsafe { x86::grad_block(tb, gb, p, p2, q, out) };
            continue;
        }
        let _ = simd;
        portable::grad_block(tb, gb, p, p2, q, out);
    }
}

/// [`grad_factor`] with the AVX-512 kernel, its sums left in sixteen lanes per entry and added
/// to `lanes` (`[p, p2, 16]`; [`add_lanes`] sums them).
///
/// # Panics
/// If the lengths do not match the shapes, or the CPU lacks AVX-512F (`Isa::best`).
pub(crate) fn grad_factor_lanes(
    t: &[f32],
    g: &[f32],
    p: usize,
    p2: usize,
    q: usize,
    lanes: &mut [f32],
) {
    assert_eq!(
        Isa::best(),
        Isa::Avx512,
        "the 512-bit kernel needs AVX-512F"
    );
    assert_eq!(lanes.len(), p * p2 * 16, "lanes is [p, p2, 16]");
    let (row_t, row_g) = (p * q, p2 * q);
    if row_t == 0 || row_g == 0 {
        return;
    }
    assert_eq!(t.len() % row_t, 0, "t is [n, p, q]");
    assert_eq!(g.len(), t.len() / row_t * row_g, "g is [n, p2, q]");
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the CPU has AVX-512F (asserted above), and the lengths were checked.
    unsafe {
        x86::grad_lanes512(t, g, p, p2, q, lanes)
    };
}

/// Adds each entry's sixteen lanes (`lanes`, `[e, 16]`) to `out` (`[e]`), in a fixed order.
pub(crate) fn add_lanes(lanes: &[f32], out: &mut [f32]) {
    for (o, l) in out.iter_mut().zip(lanes.chunks_exact(16)) {
        *o += l.iter().sum::<f32>();
    }
}

/// The kernels in plain Rust, for CPUs without AVX2 and FMA.
mod portable {
    use std::mem::MaybeUninit;

    /// [`super::contract`] over whole rows, `f[i, j]` at `f[i·fs[0] + j·fs[1]]`.
    pub(super) fn contract<const ADD: bool>(
        f: &[f32],
        p: usize,
        p2: usize,
        fs: [usize; 2],
        t: &[f32],
        q: usize,
        out: &mut [MaybeUninit<f32>],
    ) {
        for (tr, or) in t.chunks_exact(p * q).zip(out.chunks_exact_mut(p2 * q)) {
            let mut j = 0;
            while j + 4 <= p2 {
                rows::<ADD, 4>(f, p, fs, j, tr, q, or);
                j += 4;
            }
            while j < p2 {
                rows::<ADD, 1>(f, p, fs, j, tr, q, or);
                j += 1;
            }
        }
    }

    /// Output rows `j..j + J` of one row `tr`.
    #[inline(always)]
    fn rows<const ADD: bool, const J: usize>(
        f: &[f32],
        p: usize,
        fs: [usize; 2],
        j: usize,
        tr: &[f32],
        q: usize,
        or: &mut [MaybeUninit<f32>],
    ) {
        let mut k = 0;
        while k + 8 <= q {
            cols::<ADD, J, 8>(f, p, fs, j, tr, q, k, or);
            k += 8;
        }
        while k < q {
            cols::<ADD, J, 1>(f, p, fs, j, tr, q, k, or);
            k += 1;
        }
    }

    /// Columns `k..k + W` of output rows `j..j + J`, summed over `i`.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn cols<const ADD: bool, const J: usize, const W: usize>(
        f: &[f32],
        p: usize,
        fs: [usize; 2],
        j: usize,
        tr: &[f32],
        q: usize,
        k: usize,
        or: &mut [MaybeUninit<f32>],
    ) {
        let mut acc = [[0f32; W]; J];
        for i in 0..p {
            let tv = &tr[i * q + k..i * q + k + W];
            for (jj, a) in acc.iter_mut().enumerate() {
                let fj = f[i * fs[0] + (j + jj) * fs[1]];
                for (a, &tl) in a.iter_mut().zip(tv) {
                    *a += fj * tl;
                }
            }
        }
        for (jj, a) in acc.iter().enumerate() {
            let o = &mut or[(j + jj) * q + k..(j + jj) * q + k + W];
            for (o, &v) in o.iter_mut().zip(a) {
                super::put::<ADD>(o, v);
            }
        }
    }

    /// [`super::grad_factor`] over one block of rows, added to `out`.
    pub(super) fn grad_block(
        tb: &[f32],
        gb: &[f32],
        p: usize,
        p2: usize,
        q: usize,
        out: &mut [f32],
    ) {
        for (tr, gr) in tb.chunks_exact(p * q).zip(gb.chunks_exact(p2 * q)) {
            for i in 0..p {
                let ti = &tr[i * q..(i + 1) * q];
                for j in 0..p2 {
                    let gj = &gr[j * q..(j + 1) * q];
                    let mut lanes = [0f32; 8];
                    let mut chunks = ti.chunks_exact(8).zip(gj.chunks_exact(8));
                    for (a, b) in &mut chunks {
                        for l in 0..8 {
                            lanes[l] += a[l] * b[l];
                        }
                    }
                    let tail: f32 = ti[q / 8 * 8..]
                        .iter()
                        .zip(&gj[q / 8 * 8..])
                        .map(|(a, b)| a * b)
                        .sum();
                    out[i * p2 + j] += lanes.iter().sum::<f32>() + tail;
                }
            }
        }
    }
}

/// The kernels with AVX2 and FMA intrinsics.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;
    use std::mem::MaybeUninit;

    /// `$f` with its output-row count `J` (the second const parameter) set to the run-time
    /// `$jb` (1 to 4, or 8), so that each block's loops unroll and its sums stay in registers.
    macro_rules! by_rows {
        ($jb:expr, $f:ident::<$add:ident $(, $c:tt)*>($($arg:expr),*)) => {
            match $jb {
                8 => $f::<$add, 8 $(, $c)*>($($arg),*),
                4 => $f::<$add, 4 $(, $c)*>($($arg),*),
                3 => $f::<$add, 3 $(, $c)*>($($arg),*),
                2 => $f::<$add, 2 $(, $c)*>($($arg),*),
                1 => $f::<$add, 1 $(, $c)*>($($arg),*),
                jb => unreachable!("blocks of 1 to 4 or 8 output rows, not {jb}"),
            }
        };
    }

    /// [`super::contract`] over whole rows: writes every entry of `out` (with `ADD`, adds to
    /// it). Blocks of four output rows (fewer at the end) by sixteen, then eight columns, then a
    /// scalar tail ([`narrow_cols`]).
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; `f[i, j]` (at `i·fs[0] + j·fs[1]`) lies in `f` for `i < p`,
    /// `j < p2`, `t` is `[n, p, q]`, `out` `[n, p2, q]` (checked by the caller, and initialized
    /// with `ADD`), so every pointer below stays inside its slice.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn contract<const ADD: bool>(
        f: &[f32],
        p: usize,
        p2: usize,
        fs: [usize; 2],
        t: &[f32],
        q: usize,
        out: &mut [MaybeUninit<f32>],
    ) {
        for (tr, or) in t.chunks_exact(p * q).zip(out.chunks_exact_mut(p2 * q)) {
            let (tp, fp) = (tr.as_ptr(), f.as_ptr());
            let op = or.as_mut_ptr().cast::<f32>();
            let mut j = 0;
            while j < p2 {
                let jb = (p2 - j).min(4);
                let mut k = 0;
                while k + 16 <= q {
                    by_rows!(jb, block256::<ADD, 2>(fp, fs, tp, op, [p, q, j, k, 0]));
                    k += 16;
                }
                narrow_cols::<ADD>(fp, fs, tp, op, [p, q, j, jb, k]);
                j += jb;
            }
        }
    }

    /// Columns `k..k + 8·Y` of output rows `j..j + J` of one row (`tp`: `[p, q]`, `op`: its
    /// output `[p2, q]`, `f[i, j]` at `fp + i·fs[0] + j·fs[1]`), summed over `i` from zero in
    /// `J·Y` eight-lane registers. `dims` is `[p, q, j, k, kept]`: with `ADD`, the first `kept`
    /// columns of the block already hold their sums (the row's last block, moved back to end
    /// with the row: [`narrow_cols`]) and are stored back unchanged; without `ADD` they are
    /// written again with the same values.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; the pointers cover those entries (the kernels' callers check
    /// the lengths), and with `ADD` the outputs are initialized.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn block256<const ADD: bool, const J: usize, const Y: usize>(
        fp: *const f32,
        fs: [usize; 2],
        tp: *const f32,
        op: *mut f32,
        [p, q, j, k, kept]: [usize; 5],
    ) {
        let mut acc = [[_mm256_setzero_ps(); Y]; J];
        for i in 0..p {
            let tr = tp.add(i * q + k);
            let mut tv = [_mm256_setzero_ps(); Y];
            for (v, t) in tv.iter_mut().enumerate() {
                *t = _mm256_loadu_ps(tr.add(8 * v));
            }
            let fr = fp.add(i * fs[0] + j * fs[1]);
            for (jj, a) in acc.iter_mut().enumerate() {
                let b = _mm256_broadcast_ss(&*fr.add(jj * fs[1]));
                for (a, t) in a.iter_mut().zip(&tv) {
                    *a = _mm256_fmadd_ps(b, *t, *a);
                }
            }
        }
        for (jj, a) in acc.iter().enumerate() {
            for (v, a) in a.iter().enumerate() {
                let o = op.add((j + jj) * q + k + 8 * v);
                if ADD && kept > 0 && v == 0 {
                    add_after(o, *a, kept);
                } else {
                    store::<ADD>(o, *a);
                }
            }
        }
    }

    /// Columns `k..q` of output rows `j..j + jb` of one row, as [`block256`]: blocks of eight,
    /// then the row's last eight columns where it has eight or more, else one at a time; the
    /// last columns of both kernels. `dims` is `[p, q, j, jb, k]`.
    ///
    /// # Safety
    /// As [`block256`].
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn narrow_cols<const ADD: bool>(
        fp: *const f32,
        fs: [usize; 2],
        tp: *const f32,
        op: *mut f32,
        [p, q, j, jb, mut k]: [usize; 5],
    ) {
        while k + 8 <= q {
            by_rows!(jb, block256::<ADD, 1>(fp, fs, tp, op, [p, q, j, k, 0]));
            k += 8;
        }
        if k < q && q >= 8 {
            // The last columns as the eight that end the row, the `k − (q − 8)` before them
            // again (the same sums, bit for bit): a vector block instead of a scalar loop.
            let (start, kept) = (q - 8, k - (q - 8));
            by_rows!(
                jb,
                block256::<ADD, 1>(fp, fs, tp, op, [p, q, j, start, kept])
            );
            return;
        }
        for k in k..q {
            for jj in 0..jb {
                let mut s = 0f32;
                for i in 0..p {
                    s = (*fp.add(i * fs[0] + (j + jj) * fs[1])).mul_add(*tp.add(i * q + k), s);
                }
                super::put::<ADD>(&mut *op.add((j + jj) * q + k).cast::<MaybeUninit<f32>>(), s);
            }
        }
    }

    /// [`contract`] with 512-bit registers: eight output rows at a time where there are eight,
    /// by blocks of 48, 32, 24 (the last eight columns in a register's lower half) and 16
    /// columns, then [`contract`]'s 8-column block and scalar tail; rows of 24 columns two at a
    /// time ([`pair24`]: MiniLM's `b` width, where one row's block leaves a quarter of its
    /// lanes empty). Each entry is the same fused multiply-adds over `i` in the same order from
    /// zero as in [`contract`], so the two agree bit for bit.
    ///
    /// # Safety
    /// As [`contract`], and the CPU has AVX-512F.
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) unsafe fn contract512<const ADD: bool>(
        f: &[f32],
        p: usize,
        p2: usize,
        fs: [usize; 2],
        t: &[f32],
        q: usize,
        out: &mut [MaybeUninit<f32>],
    ) {
        let (mut t, mut out) = (t, out);
        if q == 24 {
            // Two rows' 24 columns fill three sixteen-lane registers (one row's fill one and a
            // half): the rows in pairs, the last one alone.
            let pairs = t.len() / (2 * p * q);
            let (tt, rest_t) = t.split_at(pairs * 2 * p * q);
            let (oo, rest_o) = out.split_at_mut(pairs * 2 * p2 * q);
            for (tr, or) in tt
                .chunks_exact(2 * p * q)
                .zip(oo.chunks_exact_mut(2 * p2 * q))
            {
                let (tp, fp) = (tr.as_ptr(), f.as_ptr());
                let op = or.as_mut_ptr().cast::<f32>();
                let mut j = 0;
                while j < p2 {
                    // Four output rows: twelve sums in flight (eight rows' 24 would leave the
                    // compiler one register short, and a sum then goes through the stack).
                    let jb = (p2 - j).min(4);
                    by_rows!(jb, pair24::<ADD>(fp, fs, tp, op, [p, p2, j]));
                    j += jb;
                }
            }
            (t, out) = (rest_t, rest_o);
        }
        for (tr, or) in t.chunks_exact(p * q).zip(out.chunks_exact_mut(p2 * q)) {
            let (tp, fp) = (tr.as_ptr(), f.as_ptr());
            let op = or.as_mut_ptr().cast::<f32>();
            let mut j = 0;
            while j < p2 {
                // Eight rows where there are (eight sums or more in flight: a fused
                // multiply-add's latency is four cycles, and two issue per cycle).
                let jb = if p2 - j >= 8 { 8 } else { (p2 - j).min(4) };
                let dims = |k| [p, q, j, k];
                let mut k = 0;
                while k + 48 <= q {
                    by_rows!(jb, block512::<ADD, 3, false>(fp, fs, tp, op, dims(k)));
                    k += 48;
                }
                while k + 32 <= q {
                    by_rows!(jb, block512::<ADD, 2, false>(fp, fs, tp, op, dims(k)));
                    k += 32;
                }
                while k + 24 <= q {
                    by_rows!(jb, block512::<ADD, 2, true>(fp, fs, tp, op, dims(k)));
                    k += 24;
                }
                while k + 16 <= q {
                    by_rows!(jb, block512::<ADD, 1, false>(fp, fs, tp, op, dims(k)));
                    k += 16;
                }
                narrow_cols::<ADD>(fp, fs, tp, op, [p, q, j, jb, k]);
                j += jb;
            }
        }
    }

    /// [`block256`] with `Z` sixteen-lane registers per output row, the last one holding
    /// eight columns in its lower lanes where `HALF` (its upper lanes zero): columns `k..k +
    /// 16·Z` (`− 8` with `HALF`). The eight columns are loaded and stored as 256-bit values, not
    /// masked 512-bit ones: a masked store's 64 bytes overlap the next row's first columns, and a
    /// load of those then waits for the store to reach the cache instead of being forwarded.
    ///
    /// # Safety
    /// As [`block256`], and the CPU has AVX-512F.
    #[target_feature(enable = "avx512f,avx2,fma")]
    #[inline]
    unsafe fn block512<const ADD: bool, const J: usize, const Z: usize, const HALF: bool>(
        fp: *const f32,
        fs: [usize; 2],
        tp: *const f32,
        op: *mut f32,
        [p, q, j, k]: [usize; 4],
    ) {
        let half = |v: usize| HALF && v + 1 == Z;
        let mut acc = [[_mm512_setzero_ps(); Z]; J];
        for i in 0..p {
            let tr = tp.add(i * q + k);
            let mut tv = [_mm512_setzero_ps(); Z];
            for (v, t) in tv.iter_mut().enumerate() {
                *t = if half(v) {
                    _mm512_zextps256_ps512(_mm256_loadu_ps(tr.add(16 * v)))
                } else {
                    _mm512_loadu_ps(tr.add(16 * v))
                };
            }
            let fr = fp.add(i * fs[0] + j * fs[1]);
            for (jj, a) in acc.iter_mut().enumerate() {
                let b = _mm512_set1_ps(*fr.add(jj * fs[1]));
                for (a, t) in a.iter_mut().zip(&tv) {
                    *a = _mm512_fmadd_ps(b, *t, *a);
                }
            }
        }
        for (jj, a) in acc.iter().enumerate() {
            for (v, a) in a.iter().enumerate() {
                let o = op.add((j + jj) * q + k + 16 * v);
                if half(v) {
                    store::<ADD>(o, _mm512_castps512_ps256(*a));
                } else {
                    store512::<ADD>(o, *a);
                }
            }
        }
    }

    /// Output rows `j..j + J` of two rows of 24 columns (`tp`: `[2, p, 24]`, `op`: `[2, p2,
    /// 24]`; `dims` is `[p, p2, j]`), [`block512`]'s sums with the two rows side by side in three
    /// sixteen-lane registers: the first row's columns 0..16, its columns 16..24 and the second
    /// row's 0..8, the second row's 8..24. Every lane holds a sum (one row's 24 columns use a
    /// register and a half), and each entry is the same fused multiply-adds in the same order as
    /// in [`block512`].
    ///
    /// # Safety
    /// As [`block512`].
    #[target_feature(enable = "avx512f,avx2,fma")]
    #[inline]
    unsafe fn pair24<const ADD: bool, const J: usize>(
        fp: *const f32,
        fs: [usize; 2],
        tp: *const f32,
        op: *mut f32,
        [p, p2, j]: [usize; 3],
    ) {
        let (tp1, op1) = (tp.add(p * 24), op.add(p2 * 24));
        let mut acc = [[_mm512_setzero_ps(); 3]; J];
        for i in 0..p {
            let (r0, r1) = (tp.add(i * 24), tp1.add(i * 24));
            let lo = _mm512_castps256_ps512(_mm256_loadu_ps(r0.add(16)));
            let hi = _mm256_castps_pd(_mm256_loadu_ps(r1));
            let tv = [
                _mm512_loadu_ps(r0),
                _mm512_castpd_ps(_mm512_insertf64x4::<1>(_mm512_castps_pd(lo), hi)),
                _mm512_loadu_ps(r1.add(8)),
            ];
            let fr = fp.add(i * fs[0] + j * fs[1]);
            for (jj, a) in acc.iter_mut().enumerate() {
                let b = _mm512_set1_ps(*fr.add(jj * fs[1]));
                for (a, t) in a.iter_mut().zip(&tv) {
                    *a = _mm512_fmadd_ps(b, *t, *a);
                }
            }
        }
        for (jj, [a0, a1, a2]) in acc.iter().enumerate() {
            let (o0, o1) = (op.add((j + jj) * 24), op1.add((j + jj) * 24));
            store512::<ADD>(o0, *a0);
            store::<ADD>(o0.add(16), _mm512_castps512_ps256(*a1));
            let a1_hi = _mm512_extractf64x4_pd::<1>(_mm512_castps_pd(*a1));
            store::<ADD>(o1, _mm256_castpd_ps(a1_hi));
            store512::<ADD>(o1.add(8), *a2);
        }
    }

    /// [`store`] for sixteen lanes.
    ///
    /// # Safety
    /// The CPU has AVX-512F; `p` points at sixteen floats (initialized with `ADD`).
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn store512<const ADD: bool>(p: *mut f32, v: __m512) {
        if ADD {
            _mm512_storeu_ps(p, _mm512_add_ps(_mm512_loadu_ps(p), v));
        } else {
            _mm512_storeu_ps(p, v);
        }
    }

    /// Adds lanes `kept..8` of `v` to the eight values at `p`, storing the first `kept` back as
    /// they were (a blend, not a masked store: see [`block512`]).
    ///
    /// # Safety
    /// The CPU has AVX2; `p` points at eight initialized floats.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn add_after(p: *mut f32, v: __m256, kept: usize) {
        let old = _mm256_loadu_ps(p);
        let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        let take = _mm256_cmpgt_epi32(lanes, _mm256_set1_epi32(kept as i32 - 1));
        let new = _mm256_blendv_ps(old, _mm256_add_ps(old, v), _mm256_castsi256_ps(take));
        _mm256_storeu_ps(p, new);
    }

    /// Stores the eight lanes `v` at `p`, or with `ADD` adds them to the eight values there.
    ///
    /// # Safety
    /// The CPU has AVX2; `p` points at eight floats (initialized with `ADD`).
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn store<const ADD: bool>(p: *mut f32, v: __m256) {
        if ADD {
            _mm256_storeu_ps(p, _mm256_add_ps(_mm256_loadu_ps(p), v));
        } else {
            _mm256_storeu_ps(p, v);
        }
    }

    /// [`super::grad_factor`] over one block of rows, added to `out`.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; `tb` is `[rows, p, q]`, `gb` `[rows, p2, q]` (checked by the
    /// caller), `out` `[p, p2]`.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::needless_range_loop)] // `jj` indexes both rows of the 2 × 4 block
    pub(super) unsafe fn grad_block(
        tb: &[f32],
        gb: &[f32],
        p: usize,
        p2: usize,
        q: usize,
        out: &mut [f32],
    ) {
        let (row_t, row_g) = (p * q, p2 * q);
        let rows = tb.len() / row_t;
        let q8 = q / 8 * 8;
        let mut i = 0;
        while i < p {
            let ib = (p - i).min(2);
            let mut j = 0;
            while j < p2 {
                let jb = (p2 - j).min(4);
                let mut acc = [[_mm256_setzero_ps(); 4]; 2];
                let mut tail = [[0f32; 4]; 2];
                for r in 0..rows {
                    let tp = tb.as_ptr().add(r * row_t + i * q);
                    let gp = gb.as_ptr().add(r * row_g + j * q);
                    let mut k = 0;
                    if ib == 2 && jb == 4 {
                        while k < q8 {
                            let t0 = _mm256_loadu_ps(tp.add(k));
                            let t1 = _mm256_loadu_ps(tp.add(q + k));
                            for jj in 0..4 {
                                let gv = _mm256_loadu_ps(gp.add(jj * q + k));
                                acc[0][jj] = _mm256_fmadd_ps(t0, gv, acc[0][jj]);
                                acc[1][jj] = _mm256_fmadd_ps(t1, gv, acc[1][jj]);
                            }
                            k += 8;
                        }
                    } else {
                        while k < q8 {
                            for (ii, a) in acc.iter_mut().enumerate().take(ib) {
                                let tv = _mm256_loadu_ps(tp.add(ii * q + k));
                                for (jj, a) in a.iter_mut().enumerate().take(jb) {
                                    *a = _mm256_fmadd_ps(
                                        tv,
                                        _mm256_loadu_ps(gp.add(jj * q + k)),
                                        *a,
                                    );
                                }
                            }
                            k += 8;
                        }
                    }
                    if q8 < q && q >= 8 {
                        // The row's last eight columns, those already summed masked off in `T`.
                        let start = q - 8;
                        let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
                        let before = _mm256_set1_epi32((q8 - start) as i32 - 1);
                        let take = _mm256_castsi256_ps(_mm256_cmpgt_epi32(lanes, before));
                        for (ii, a) in acc.iter_mut().enumerate().take(ib) {
                            let tv = _mm256_and_ps(_mm256_loadu_ps(tp.add(ii * q + start)), take);
                            for (jj, a) in a.iter_mut().enumerate().take(jb) {
                                let gv = _mm256_loadu_ps(gp.add(jj * q + start));
                                *a = _mm256_fmadd_ps(tv, gv, *a);
                            }
                        }
                        continue;
                    }
                    for k in q8..q {
                        for (ii, s) in tail.iter_mut().enumerate().take(ib) {
                            for (jj, s) in s.iter_mut().enumerate().take(jb) {
                                *s = (*tp.add(ii * q + k)).mul_add(*gp.add(jj * q + k), *s);
                            }
                        }
                    }
                }
                for ii in 0..ib {
                    for jj in 0..jb {
                        out[(i + ii) * p2 + j + jj] += sum(acc[ii][jj]) + tail[ii][jj];
                    }
                }
                j += jb;
            }
            i += ib;
        }
    }

    /// `∂f = Σ_r T[r]·G[r]ᵀ` over a block of rows, as [`grad_block`], with 512-bit registers
    /// and the sums left in sixteen lanes per entry, added to `lanes` (`[p, p2, 16]`): blocks of
    /// 4 × 4 entries (sixteen sums in flight, eight loads per sixteen multiply-adds), the row's
    /// last columns by masked loads. The caller adds each entry's lanes up once for all its
    /// blocks of rows, so their sum is taken across lanes once, not once per block.
    ///
    /// # Safety
    /// The CPU has AVX-512F; `tb` is `[rows, p, q]`, `gb` `[rows, p2, q]`, `lanes` `[p, p2,
    /// 16]` (checked by the caller).
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) unsafe fn grad_lanes512(
        tb: &[f32],
        gb: &[f32],
        p: usize,
        p2: usize,
        q: usize,
        lanes: &mut [f32],
    ) {
        let mut i = 0;
        while i < p {
            let ib = if p - i >= 4 { 4 } else { 1 };
            let mut j = 0;
            while j < p2 {
                let jb = if p2 - j >= 4 { 4 } else { 1 };
                let dims = [p, p2, q, i, j];
                match (ib, jb) {
                    (4, 4) => grad_entries::<4, 4>(tb, gb, dims, lanes),
                    (4, _) => grad_entries::<4, 1>(tb, gb, dims, lanes),
                    (_, 4) => grad_entries::<1, 4>(tb, gb, dims, lanes),
                    _ => grad_entries::<1, 1>(tb, gb, dims, lanes),
                }
                j += jb;
            }
            i += ib;
        }
    }

    /// Entries `i..i + I` × `j..j + J` of [`grad_lanes512`]. `dims` is `[p, p2, q, i, j]`.
    ///
    /// # Safety
    /// As [`grad_lanes512`].
    #[target_feature(enable = "avx512f,avx2,fma")]
    #[inline]
    unsafe fn grad_entries<const I: usize, const J: usize>(
        tb: &[f32],
        gb: &[f32],
        [p, p2, q, i, j]: [usize; 5],
        lanes: &mut [f32],
    ) {
        let (row_t, row_g) = (p * q, p2 * q);
        let rows = tb.len() / row_t;
        let at = |ii: usize, jj: usize| ((i + ii) * p2 + j + jj) * 16;
        let mut acc = [[_mm512_setzero_ps(); J]; I];
        for (ii, a) in acc.iter_mut().enumerate() {
            for (jj, a) in a.iter_mut().enumerate() {
                *a = _mm512_loadu_ps(lanes.as_ptr().add(at(ii, jj)));
            }
        }
        let tail = (q % 16) as u32;
        let mask: __mmask16 = ((1u32 << tail) - 1) as u16;
        for r in 0..rows {
            let tp = tb.as_ptr().add(r * row_t + i * q);
            let gp = gb.as_ptr().add(r * row_g + j * q);
            let mut k = 0;
            while k + 16 <= q {
                let mut tv = [_mm512_setzero_ps(); I];
                for (ii, t) in tv.iter_mut().enumerate() {
                    *t = _mm512_loadu_ps(tp.add(ii * q + k));
                }
                for jj in 0..J {
                    let gv = _mm512_loadu_ps(gp.add(jj * q + k));
                    for (a, t) in acc.iter_mut().zip(&tv) {
                        a[jj] = _mm512_fmadd_ps(*t, gv, a[jj]);
                    }
                }
                k += 16;
            }
            if k < q {
                let mut tv = [_mm512_setzero_ps(); I];
                for (ii, t) in tv.iter_mut().enumerate() {
                    *t = _mm512_maskz_loadu_ps(mask, tp.add(ii * q + k));
                }
                for jj in 0..J {
                    let gv = _mm512_maskz_loadu_ps(mask, gp.add(jj * q + k));
                    for (a, t) in acc.iter_mut().zip(&tv) {
                        a[jj] = _mm512_fmadd_ps(*t, gv, a[jj]);
                    }
                }
            }
        }
        for (ii, a) in acc.iter().enumerate() {
            for (jj, a) in a.iter().enumerate() {
                _mm512_storeu_ps(lanes.as_mut_ptr().add(at(ii, jj)), *a);
            }
        }
    }

    /// The sum of the eight lanes.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn sum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
    }
}

/// `out[r] = fᵀ·T[r]` through [`contract`].
///
/// # Shapes
/// - `f`: `[p, p2]`
/// - `t`: `[n, p, q]`
/// - output: `[n, p2, q]`
pub(crate) fn contract_a<B: Backend>(f: Tensor<B, 2>, t: Tensor<B, 3>) -> Tensor<B, 3> {
    let device = t.device();
    let [n, p, q] = t.dims();
    let p2 = f.dims()[1];
    let (f, t) = (HostValues::of(f), HostValues::of(t));
    let out = contract(&f.floats(), p, p2, &t.floats(), n, q);
    Tensor::from_data(TensorData::new(out, [n, p2, q]), &device)
}

/// A Kronecker apply on the host, `T [n, p, q]` through every factor in turn (`steps[i]`: the
/// axis `factors[i]` contracts), each row's intermediates in buffers of the thread's own that
/// stay in its L1 cache; with `y` the last step adds into `y`'s buffer (without a copy where `y`
/// is not shared). In inference on flex, Burn's products would allocate (and clear, and
/// realign) each step's output, and the adapter's add would take a pass and a tensor of its
/// own. A scale goes on a factor (the caller folds it into the smallest).
///
/// `T` is read where flex keeps it ([`Rows`]): an adapted layer's input is usually shared (the
/// query, key and value projections and the residual read the same tensor), and reading a
/// shared tensor's values (`into_data`) costs flex two copies, one of them realigning. Where
/// `T` is not in order in its buffer it is copied instead, a block of [`INFER_FLOATS`] values'
/// rows at a time, the blocks split over rayon's threads, each block's copy still in the
/// thread's L2 cache when the kernel reads it (at 2,048 rows of 1,536 values the apply took
/// 1.85 ms with one whole copy, 1.1 ms in blocks; docs/benchmarks-history.md, stop 32).
///
/// # Shapes
/// - `t`: `[n, p, q]`
/// - `factors[i]`: `[p, p']` for an `A` step, `[q, q']` for a `B` step, chaining
/// - `y`: `[n, p_last·q_last]`
/// - output: `[n, p_last, q_last]`
pub(crate) fn apply_rows<B: Backend>(
    t: Tensor<B, 3>,
    factors: Vec<Tensor<B, 2>>,
    steps: &[Side],
    y: Option<Tensor<B, 2>>,
) -> Tensor<B, 3> {
    let device = t.device();
    rows_out(&Rows::blocks(t, INFER_FLOATS), (factors, steps), y, &device)
}

/// [`apply_rows`] for the forward of `kron::autodiff`'s node, which keeps `T` for its
/// backward: where `T` is copied, a large one is read [`READ_FLOATS`] values' rows at a time
/// ([`Rows`]). With `y` (an adapter added to its frozen product) the last step adds into `y`'s
/// buffer, without a copy where `y` is not shared: the same sums as the add.
///
/// # Shapes
/// - `t`, `factors`: as [`apply_rows`]
/// - `y`, output: `[n, p_last, q_last]`
pub(crate) fn apply_rows_kept<B: Backend>(
    t: Tensor<B, 3>,
    factors: Vec<Tensor<B, 2>>,
    steps: &[Side],
    y: Option<Tensor<B, 3>>,
) -> Tensor<B, 3> {
    let device = t.device();
    let y = y.map(|y| {
        let [n, pl, ql] = y.dims();
        y.reshape([n, pl * ql])
    });
    rows_out(&Rows::of(t), (factors, steps), y, &device)
}

/// The most values of `T` that [`Rows`] copies at once, where `T` is copied and larger than
/// twice this.
const READ_FLOATS: usize = 256 * 1024;

/// The values of `T` that [`apply_rows`] copies at once (256 KB), where `T` is copied and
/// larger than twice this: a block's copy stays in the L2 cache until the kernel reads it, and
/// the blocks are few enough that slicing each costs nothing measurable (measured from 8K to
/// 256K values: 64K and 128K fastest at MiniLM's and SmolLM2's widths, 8K 25% slower than 64K).
const INFER_FLOATS: usize = 64 * 1024;

/// The values of `T [n, p, q]`'s rows, for a pass that reads them a block at a time. Where
/// flex keeps `T` in order, its buffer is read in place (`quirks::host_floats`): an adapted
/// layer's input is shared (by the layer's other products and the residual, and the autodiff
/// node keeps it for the backward), and reading a shared tensor's values costs flex two copies
/// (KronA's MiniLM training step 669 → 657 ms, docs/benchmarks-history.md, stop 34). Otherwise a
/// small `T` is copied once, in one pass (flex's scalar product by 1, which writes one new
/// tensor), a large one a block of rows at a time (a slice's scalar product), so that the copy
/// is never the whole input (at 2,048 rows of 4,096 values that took 32 MB more at a training
/// step's peak) and each block's is read while still in the cache.
struct Rows<B: Backend> {
    /// Where the values come from.
    src: Source<B>,
    /// `T`'s `[n, p, q]`, and rows per block (all of them where read whole).
    dims: [usize; 3],
    block: usize,
}

/// [`Rows`]' values.
enum Source<B: Backend> {
    /// `T`'s own buffer, borrowed (`quirks::host_floats` gives it).
    InPlace(FloatTensor<B>),
    /// `T`, copied a block at a time.
    Blocks(Tensor<B, 3>),
    /// `T`'s values, copied whole.
    Whole(Vec<f32>),
}

impl<B: Backend> Rows<B> {
    /// `T`: in place where flex keeps it in order, else in blocks where it holds more than
    /// twice [`READ_FLOATS`] values.
    fn of(t: Tensor<B, 3>) -> Self {
        Self::blocks(t, READ_FLOATS)
    }

    /// `T`: in place where flex keeps it in order, else read in blocks of about `floats`
    /// values where it holds more than twice that.
    fn blocks(t: Tensor<B, 3>, floats: usize) -> Self {
        let dims = t.dims();
        match in_place(t) {
            Ok(t) => Rows {
                src: Source::InPlace(t),
                dims,
                block: dims[0].max(1),
            },
            Err(t) => Self::blocks_copied(t, floats),
        }
    }

    /// `T` copied: in blocks of about `floats` values where it holds more than twice that, else
    /// whole.
    fn blocks_copied(t: Tensor<B, 3>, floats: usize) -> Self {
        let dims @ [n, p, q] = t.dims();
        if n * p * q <= 2 * floats {
            return Self::whole(t);
        }
        Rows {
            src: Source::Blocks(t),
            dims,
            block: (floats / (p * q).max(1)).max(1),
        }
    }

    /// `T`, copied whole.
    fn whole(t: Tensor<B, 3>) -> Self {
        let dims = t.dims();
        Rows {
            src: Source::Whole(floats_of(t.mul_scalar(1.0))),
            dims,
            block: dims[0].max(1),
        }
    }

    /// The values of rows `rows`.
    fn get(&self, rows: Range<usize>) -> Cow<'_, [f32]> {
        let row = self.dims[1] * self.dims[2];
        let range = rows.start * row..rows.end * row;
        match &self.src {
            Source::InPlace(t) => Cow::Borrowed(&borrowed::<B>(t)[range]),
            Source::Whole(whole) => Cow::Borrowed(&whole[range]),
            Source::Blocks(t) => Cow::Owned(floats_of(t.clone().slice([rows]).mul_scalar(1.0))),
        }
    }
}

/// A tensor's values for the host kernels to read: flex's own buffer where it keeps them in
/// order (`quirks::host_floats`: no copy, where reading a shared tensor's values would copy it
/// twice), else the values read out (`values`).
pub(crate) struct HostValues<B: Backend>(Result<FloatTensor<B>, TensorData>);

impl<B: Backend> HostValues<B> {
    pub(crate) fn of<const D: usize>(t: Tensor<B, D>) -> Self {
        Self(in_place(t).map_err(values))
    }

    pub(crate) fn floats(&self) -> Cow<'_, [f32]> {
        match &self.0 {
            Ok(t) => Cow::Borrowed(borrowed::<B>(t)),
            Err(data) => floats(data),
        }
    }
}

/// `t`'s primitive where flex keeps its values in order, so that [`borrowed`] reads them in
/// place (`quirks::host_floats`); else `t` back.
fn in_place<B: Backend, const D: usize>(t: Tensor<B, D>) -> Result<FloatTensor<B>, Tensor<B, D>> {
    let t = t.into_primitive().tensor();
    match quirks::host_floats::<B>(&t) {
        Some(_) => Ok(t),
        None => Err(Tensor::from_primitive(TensorPrimitive::Float(t))),
    }
}

/// The values of a primitive [`in_place`] kept.
fn borrowed<B: Backend>(t: &FloatTensor<B>) -> &[f32] {
    quirks::host_floats::<B>(t).expect("in_place checked that flex keeps them in order")
}

/// A tensor's values as a vector (flex's buffer handed over where the tensor is not shared).
fn floats_of<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    (values(t).into_vec::<f32>()).expect("the host kernels run on f32 tensors only (quirks checks)")
}

/// [`apply_rows`]'s pass: `T [n, p, q]` through `factors` a block of `t`'s rows at a time (the
/// blocks split over rayon's threads), with `y` added into its buffer.
fn rows_out<B: Backend>(
    t: &Rows<B>,
    (factors, steps): (Vec<Tensor<B, 2>>, &[Side]),
    y: Option<Tensor<B, 2>>,
    device: &B::Device,
) -> Tensor<B, 3> {
    let ([n, p, q], block) = (t.dims, t.block);
    let (dims, values_f) = factor_values(factors);
    let floats_f: Vec<_> = values_f.iter().map(HostValues::floats).collect();
    let host_steps = host_steps(&floats_f, &dims, steps);
    let (pl, ql) = *chain_dims(p, q, &host_steps)
        .0
        .last()
        .expect("starts with T's");
    let row_o = pl * ql;
    let isa = Isa::best();
    let by_blocks = |out: &mut [MaybeUninit<f32>], add: bool| {
        let blocks = out.par_chunks_mut(block * row_o).enumerate();
        blocks.for_each(|(i, out)| {
            let rows = i * block..(i * block + block).min(n);
            let (len, t) = (rows.len(), t.get(rows));
            if add {
                rows_into::<true>(isa, &t, len, p, q, &host_steps, out);
            } else {
                rows_into::<false>(isa, &t, len, p, q, &host_steps, out);
            }
        });
    };
    match y {
        Some(y) => {
            let mut data = values(y);
            by_blocks(as_uninit(slice_mut(&mut data)), true);
            Tensor::<B, 2>::from_data(data, device).reshape([n, pl, ql])
        }
        None => {
            let len = n * row_o;
            let mut out = Vec::with_capacity(len);
            by_blocks(&mut out.spare_capacity_mut()[..len], false);
            // SAFETY: `rows_into` wrote each of the first `len` entries.
            unsafe { out.set_len(len) };
            Tensor::from_data(TensorData::new(out, [n, pl, ql]), device)
        }
    }
}

/// The factors' shapes and values.
fn factor_values<B: Backend>(factors: Vec<Tensor<B, 2>>) -> (Vec<[usize; 2]>, Vec<HostValues<B>>) {
    let dims = factors.iter().map(|f| f.dims()).collect();
    (dims, factors.into_iter().map(HostValues::of).collect())
}

/// The steps of [`rows_into`] and [`grads::steps_grads`] from the factors' values and shapes.
fn host_steps<'a>(
    floats_f: &'a [Cow<'a, [f32]>],
    dims: &[[usize; 2]],
    steps: &[Side],
) -> Vec<HostStep<'a>> {
    (floats_f.iter().zip(dims).zip(steps))
        .map(|((f, &dims), &side)| HostStep { f, dims, side })
        .collect()
}

/// The gradients through `factors` applied to `t` in order (`steps[i]`: the axis `factors[i]`
/// contracts, as in [`apply_rows`] with a scale of 1) from the output's gradient `g`, by one
/// pass over the rows ([`grads::steps_grads`]): of each factor where `want[i]`, of `t` where
/// `want_t`.
///
/// # Shapes
/// - `t`: `[n, p, q]`
/// - `factors[i]`: `[p, p']` for an `A` step, `[q, q']` for a `B` step, chaining
/// - `g`: `[n, p_last, q_last]`
/// - output: the factors' gradients (their shapes), `∂T [n, p, q]`
pub(crate) fn apply_grads<B: Backend>(
    t: Tensor<B, 3>,
    g: Tensor<B, 3>,
    factors: Vec<Tensor<B, 2>>,
    steps: &[Side],
    want: &[bool],
    want_t: bool,
) -> (Vec<Option<Tensor<B, 2>>>, Option<Tensor<B, 3>>) {
    let device = g.device();
    let [n, p, q] = t.dims();
    let (dims, values_f) = factor_values(factors);
    let floats_f: Vec<_> = values_f.iter().map(HostValues::floats).collect();
    let host_steps = host_steps(&floats_f, &dims, steps);
    let g = HostValues::of(g);
    let g = g.floats();
    let len = n * p * q;
    let mut dt = want_t.then(|| Vec::with_capacity(len));
    let spare = dt.as_mut().map(|dt| &mut dt.spare_capacity_mut()[..len]);
    let rows = Rows::of(t);
    let grads = grads::steps_grads(
        Isa::best(),
        |r| rows.get(r),
        &g,
        [n, p, q],
        &host_steps,
        want,
        spare,
    );
    let dt = dt.map(|mut dt| {
        // SAFETY: `steps_grads` wrote each of the first `len` entries of the buffer it was given.
        unsafe { dt.set_len(len) };
        Tensor::from_data(TensorData::new(dt, [n, p, q]), &device)
    });
    let grads = (grads.into_iter().zip(&dims))
        .map(|(grad, &shape)| grad.map(|v| Tensor::from_data(TensorData::new(v, shape), &device)))
        .collect();
    (grads, dt)
}

/// `y + h·m` through [`contract`]'s kernel, `h`'s rows its output rows (`hᵀ` read through
/// strides) and `m` its one row, added into `y`'s buffer (without a copy where `y` is not
/// shared): a low-rank adapter's `(x·down)·up` added to the frozen product with no tensor of
/// its own and no pass for the add. Rows split over rayon's threads in fixed chunks when the
/// work is large.
///
/// # Shapes
/// - `h`: `[n, r]`, `r > 0`
/// - `m`: `[r, d]`
/// - `y`, output: `[n, d]`
pub(crate) fn product_add<B: Backend>(
    h: Tensor<B, 2>,
    m: Tensor<B, 2>,
    y: Tensor<B, 2>,
) -> Tensor<B, 2> {
    let device = y.device();
    let [n, r] = h.dims();
    let d = m.dims()[1];
    assert!(r > 0, "a product of rank 0 adds nothing");
    assert_eq!(y.dims(), [n, d], "y is [n, d]");
    let (h, m) = (HostValues::of(h), HostValues::of(m));
    let (h, m) = (h.floats(), m.floats());
    let mut data = values(y);
    let out = as_uninit(slice_mut(&mut data));
    let isa = Isa::best();
    let rows = |h: &[f32], out: &mut [MaybeUninit<f32>]| {
        let n = h.len() / r;
        contract_strided::<true>(isa, h, r, n, [1, r], &m, 1, d, out)
    };
    in_row_chunks(&h, r, out, d, r * d, rows);
    Tensor::from_data(data, &device)
}

/// The gradients through `out[r] = fᵀ·T[r]` from one read of the output's gradient `g`: of
/// the factor, `∂f = Σ_r T[r]·G[r]ᵀ` by [`grad_factor`] (where `t` is given), and of `T`,
/// `∂T[r] = f·G[r]` by [`contract`] with `fᵀ` (where `f` is given).
///
/// # Shapes
/// - `t`: `[n, p, q]`
/// - `g`: `[n, p2, q]`
/// - `f`: `[p, p2]`
/// - output: `∂f [p, p2]`, `∂T [n, p, q]`
pub(crate) fn contract_a_grads<B: Backend>(
    t: Option<Tensor<B, 3>>,
    g: Tensor<B, 3>,
    f: Option<Tensor<B, 2>>,
) -> (Option<Tensor<B, 2>>, Option<Tensor<B, 3>>) {
    if t.is_none() && f.is_none() {
        return (None, None);
    }
    let device = g.device();
    let [n, p2, q] = g.dims();
    let g = HostValues::of(g);
    let g = g.floats();
    let grad_f = t.map(|t| {
        let p = t.dims()[1];
        let t = HostValues::of(t);
        let out = grad_factor(&t.floats(), &g, p, p2, q);
        Tensor::from_data(TensorData::new(out, [p, p2]), &device)
    });
    let grad_t = f.map(|f| {
        let p = f.dims()[0];
        let ft = values(f.transpose());
        let out = contract(&floats(&ft), p2, p, &g, n, q);
        Tensor::from_data(TensorData::new(out, [n, p, q]), &device)
    });
    (grad_f, grad_t)
}

#[cfg(test)]
mod tests {
    use std::mem::MaybeUninit;

    use super::{
        add_lanes, contract_into, contract_strided, grad_factor_lanes, grad_factor_with,
        has_avx2_fma, rows_into, HostStep, Isa, Side, PARALLEL_MACS,
    };

    /// [`contract_into`] over a buffer of NaNs, so that an entry the kernel skips shows.
    fn contract_nan(
        simd: bool,
        f: &[f32],
        p: usize,
        p2: usize,
        t: &[f32],
        n: usize,
        q: usize,
    ) -> Vec<f32> {
        let mut out = vec![MaybeUninit::new(f32::NAN); n * p2 * q];
        contract_into::<false>(simd, f, p, p2, t, n, q, &mut out);
        // SAFETY: every entry was initialized (with NaN) before the call.
        out.iter().map(|v| unsafe { v.assume_init() }).collect()
    }

    /// Deterministic values in [−1, 1), none zero.
    pub(super) fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                let v = ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0;
                if v == 0.0 {
                    0.5
                } else {
                    v
                }
            })
            .collect()
    }

    /// Shapes `[n, p, p2, q]` with every block and tail of the kernels: output rows by 4 and
    /// fewer, columns by 16, 8 and single, `∂f` blocks of 2 × 4 and smaller, row blocks of one
    /// row and of many, and a contraction large enough to split over threads.
    const SHAPES: [[usize; 4]; 10] = [
        [5, 16, 16, 24],
        [3, 16, 32, 48],
        [4, 32, 16, 24],
        [2, 7, 5, 3],
        [6, 1, 1, 1],
        [3, 3, 9, 17],
        [40, 2, 3, 8],
        [1, 64, 112, 64],
        [2, 5, 6, 31],
        [600, 16, 16, 24],
    ];

    /// Each kernel (the intrinsics where the CPU has them, and the portable one) against `f64`
    /// loops: every value within 1e-6 of the sum of its terms' magnitudes, where `f32` sums of
    /// this length land.
    #[test]
    fn the_a_step_and_its_gradients_match_f64_loops() {
        // One case splits its rows over threads.
        const { assert!(600 * 16 * 16 * 24 > PARALLEL_MACS) };
        let kernels: &[bool] = if has_avx2_fma() {
            &[true, false]
        } else {
            &[false]
        };
        for &with_simd in kernels {
            for (s, dims @ [n, p, p2, q]) in SHAPES.into_iter().enumerate() {
                let what = |name: &str| format!("{name} {dims:?}, intrinsics {with_simd}");
                let f = values(p * p2, 3 * s as u64 + 1);
                let t = values(n * p * q, 3 * s as u64 + 2);
                let g = values(n * p2 * q, 3 * s as u64 + 3);
                let out = contract_nan(with_simd, &f, p, p2, &t, n, q);
                let ft: Vec<f32> = (0..p2 * p).map(|x| f[(x % p) * p2 + x / p]).collect();
                let gt = contract_nan(with_simd, &ft, p2, p, &g, n, q);
                let gf = grad_factor_with(with_simd, &t, &g, p, p2, q);
                // With AVX-512, the 512-bit kernel's lanes too (over two blocks of rows, as the
                // backward's chunks call it), added up.
                let wide = (with_simd && Isa::best() == Isa::Avx512).then(|| {
                    let mut lanes = vec![0.0; p * p2 * 16];
                    let half = n / 2 * p * q;
                    let gh = n / 2 * p2 * q;
                    grad_factor_lanes(&t[..half], &g[..gh], p, p2, q, &mut lanes);
                    grad_factor_lanes(&t[half..], &g[gh..], p, p2, q, &mut lanes);
                    let mut sums = vec![0.0; p * p2];
                    add_lanes(&lanes, &mut sums);
                    sums
                });
                let (tv, gv) = (
                    |r, i, k| t[(r * p + i) * q + k] as f64,
                    |r, j, k| g[(r * p2 + j) * q + k] as f64,
                );
                for r in 0..n {
                    for k in 0..q {
                        for j in 0..p2 {
                            let terms = (0..p).map(|i| f[i * p2 + j] as f64 * tv(r, i, k));
                            check(out[(r * p2 + j) * q + k], terms, &what("out"));
                        }
                        for i in 0..p {
                            let terms = (0..p2).map(|j| f[i * p2 + j] as f64 * gv(r, j, k));
                            check(gt[(r * p + i) * q + k], terms, &what("∂T"));
                        }
                    }
                }
                for i in 0..p {
                    for j in 0..p2 {
                        let terms = (0..n * q).map(|x| tv(x / q, i, x % q) * gv(x / q, j, x % q));
                        let terms: Vec<f64> = terms.collect();
                        check(gf[i * p2 + j], terms.iter().copied(), &what("∂f"));
                        if let Some(wide) = &wide {
                            check(wide[i * p2 + j], terms.into_iter(), &what("∂f, 512-bit"));
                        }
                    }
                }
            }
        }
    }

    /// The adding kernel gives each entry `y + sum` with the writing kernel's sum, bit for bit,
    /// in every block and tail and over threads; with `p = 0` it leaves `y` as it is.
    #[test]
    fn the_adding_step_is_y_plus_the_written_step_bit_for_bit() {
        for with_simd in [true, false].into_iter().filter(|&s| !s || has_avx2_fma()) {
            for (s, dims @ [n, p, p2, q]) in SHAPES.into_iter().enumerate() {
                let f = values(p * p2, 5 * s as u64 + 1);
                let t = values(n * p * q, 5 * s as u64 + 2);
                let y = values(n * p2 * q, 5 * s as u64 + 3);
                let sums = contract_nan(with_simd, &f, p, p2, &t, n, q);
                let mut out: Vec<_> = y.iter().map(|&v| MaybeUninit::new(v)).collect();
                contract_into::<true>(with_simd, &f, p, p2, &t, n, q, &mut out);
                for (i, o) in out.iter().enumerate() {
                    // SAFETY: initialized from `y`.
                    let got = unsafe { o.assume_init() };
                    let want = y[i] + sums[i];
                    assert_eq!(
                        got.to_bits(),
                        want.to_bits(),
                        "{dims:?} entry {i}, intrinsics {with_simd}"
                    );
                }
            }
            let y = values(2 * 3 * 4, 9);
            let mut out: Vec<_> = y.iter().map(|&v| MaybeUninit::new(v)).collect();
            contract_into::<true>(with_simd, &[], 0, 3, &[], 2, 4, &mut out);
            // SAFETY: initialized from `y`.
            let got: Vec<f32> = out.iter().map(|o| unsafe { o.assume_init() }).collect();
            assert_eq!(got, y, "p = 0 adds nothing");
        }
    }

    /// [`rows_into`] (writing, and adding into `y`) against `f64` loops, step by step, for
    /// every order of an `a` factor and two `b` factors, the intrinsics and the portable
    /// kernels, over enough rows to split them over threads.
    #[test]
    fn rows_through_every_step_match_f64_loops() {
        let (p, q) = (5, 8);
        let (a, b1, b2) = (values(5 * 3, 1), values(8 * 9, 2), values(9 * 17, 3));
        let n = 1 + PARALLEL_MACS / (5 * 8 * 9);
        let t = values(n * p * q, 4);
        let orders = [
            [Side::A, Side::B, Side::B],
            [Side::B, Side::A, Side::B],
            [Side::B, Side::B, Side::A],
        ];
        for isa in Isa::available() {
            for order in orders {
                let (mut ib, mut steps) = (0, Vec::new());
                for side in order {
                    let (f, dims) = match (side, ib) {
                        (Side::A, _) => (&a, [5, 3]),
                        (Side::B, 0) => (&b1, [8, 9]),
                        (Side::B, _) => (&b2, [9, 17]),
                    };
                    ib += usize::from(side == Side::B);
                    steps.push(HostStep { f, dims, side });
                }
                let y = values(n * 3 * 17, 5);
                let mut out: Vec<_> = y.iter().map(|&v| MaybeUninit::new(v)).collect();
                rows_into::<true>(isa, &t, n, p, q, &steps, &mut out);
                let mut fresh = vec![MaybeUninit::new(f32::NAN); n * 3 * 17];
                rows_into::<false>(isa, &t, n, p, q, &steps, &mut fresh);
                for r in 0..n {
                    let (mut cur, mut pp, mut qq): (Vec<f64>, usize, usize) = (
                        t[r * p * q..(r + 1) * p * q]
                            .iter()
                            .map(|&v| v as f64)
                            .collect(),
                        p,
                        q,
                    );
                    for s in &steps {
                        let f = |i: usize, j: usize| s.f[i * s.dims[1] + j] as f64;
                        (cur, pp, qq) = match s.side {
                            Side::A => {
                                let p2 = s.dims[1];
                                let v = (0..p2 * qq)
                                    .map(|x| {
                                        (0..pp).map(|i| f(i, x / qq) * cur[i * qq + x % qq]).sum()
                                    })
                                    .collect();
                                (v, p2, qq)
                            }
                            Side::B => {
                                let q2 = s.dims[1];
                                let v = (0..pp * q2)
                                    .map(|x| {
                                        (0..qq).map(|k| cur[x / q2 * qq + k] * f(k, x % q2)).sum()
                                    })
                                    .collect();
                                (v, pp, q2)
                            }
                        };
                    }
                    for (x, want) in cur.iter().enumerate() {
                        let i = r * pp * qq + x;
                        // SAFETY: initialized before the calls.
                        let (added, wrote) =
                            unsafe { (out[i].assume_init(), fresh[i].assume_init()) };
                        let what = format!("{order:?} row {r} entry {x}, {isa:?}");
                        assert!(
                            (wrote as f64 - want).abs() <= 1e-4 * (1.0 + want.abs()),
                            "{what}"
                        );
                        assert_eq!(added.to_bits(), (y[i] + wrote).to_bits(), "{what}: y + sum");
                    }
                }
            }
        }
    }

    /// The AVX-512 kernel gives the AVX2 kernel's results bit for bit, writing and adding, in
    /// every column block (48, 32, 24, 16, 8, scalar), every block of output rows (8, 4, 3, 2,
    /// 1) and with strided factors.
    #[test]
    fn the_512_bit_kernel_is_the_avx2_kernel_bit_for_bit() {
        if Isa::best() != Isa::Avx512 {
            eprintln!("no AVX-512 on this CPU: the 512-bit kernel is not run here");
            return;
        }
        let qs = [3, 8, 17, 24, 32, 40, 48, 56, 64, 72];
        let cases = qs.into_iter().flat_map(|q| [6, 11, 13].map(|p2| (q, p2)));
        for (s, (q, p2)) in cases.enumerate() {
            // Rows in pairs where q = 24 (`pair24`), the last alone where n is odd.
            let (n, p) = (3 + s % 2, 7);
            let f = values(p * p2, 7 * s as u64 + 1);
            let t = values(n * p * q, 7 * s as u64 + 2);
            let y = values(n * p2 * q, 7 * s as u64 + 3);
            for fs in [[p2, 1], [1, p]] {
                let run = |isa: Isa, add: bool| -> Vec<u32> {
                    let mut out: Vec<_> = y.iter().map(|&v| MaybeUninit::new(v)).collect();
                    if add {
                        contract_strided::<true>(isa, &f, p, p2, fs, &t, n, q, &mut out);
                    } else {
                        contract_strided::<false>(isa, &f, p, p2, fs, &t, n, q, &mut out);
                    }
                    // SAFETY: initialized from `y`.
                    out.iter()
                        .map(|o| unsafe { o.assume_init() }.to_bits())
                        .collect()
                };
                for add in [false, true] {
                    let what = format!("q {q}, p2 {p2}, strides {fs:?}, add {add}");
                    assert_eq!(run(Isa::Avx512, add), run(Isa::Avx2, add), "{what}");
                }
            }
        }
    }

    fn check(got: f32, terms: impl Iterator<Item = f64>, what: &str) {
        let (sum, mag) = terms.fold((0.0, 0.0), |(s, m), v: f64| (s + v, m + v.abs()));
        assert!(
            (got as f64 - sum).abs() <= 1e-6 * mag,
            "{what}: {got} against {sum} (terms' magnitude {mag})"
        );
    }

    /// A shared `T` (as the autodiff node holds it) is read in place ([`super::Rows`]), and
    /// where it is copied, above the size copied whole, in blocks of rows: the node's forward
    /// and backward (in place and from blocks), and inference's apply (in place and in smaller
    /// blocks, added to an output), give the values of the whole copy bit for bit (each row's
    /// sums, and each group's, do not depend on which block holds the row).
    #[cfg(feature = "flex")]
    #[test]
    fn blocks_of_rows_give_the_whole_inputs_values() {
        use super::{apply_grads, apply_rows, apply_rows_kept, grads, rows_out, Rows, Source};
        use super::{INFER_FLOATS, READ_FLOATS};
        use burn::backend::Flex;
        use burn::tensor::{Tensor, TensorData};
        use std::borrow::Cow;

        let dev = Default::default();
        // 40 rows of 128 × 128: twice the copy's bound and more, in blocks of 16 rows (the
        // last one of 8), the backward's groups of 3 rows spread over several blocks' reads.
        let [n, p, q] = [40, 128, 128];
        assert!(n * p * q > 2 * READ_FLOATS && (READ_FLOATS / (p * q)) < n);
        let tv = values(n * p * q, 11);
        let t = Tensor::<Flex, 3>::from_data(TensorData::new(tv.clone(), [n, p, q]), &dev);
        let kept = t.clone();
        let shapes = [[p, 16], [q, 24]];
        let factors: Vec<Tensor<Flex, 2>> = (shapes.iter().enumerate())
            .map(|(i, &s)| {
                let v = values(s[0] * s[1], 12 + i as u64);
                Tensor::from_data(TensorData::new(v, s), &dev)
            })
            .collect();
        let steps = [Side::A, Side::B];
        let in_place = Rows::of(t.clone());
        assert!(matches!(in_place.src, Source::InPlace(_)), "read in place");
        let blocks = Rows::blocks_copied(t.clone(), READ_FLOATS);
        assert!(matches!(blocks.src, Source::Blocks(_)), "read in blocks");
        let bits = |t: TensorData| {
            t.to_vec::<f32>()
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect::<Vec<_>>()
        };
        let whole = |y: Option<Tensor<Flex, 2>>| {
            let rows = Rows::whole(t.clone());
            rows_out(&rows, (factors.clone(), &steps), y, &dev)
        };
        let whole_bits = bits(whole(None).into_data());
        let kept_forward = apply_rows_kept(t.clone(), factors.clone(), &steps, None);
        // (`assert!`: the vectors are too long to print.)
        assert!(bits(kept_forward.into_data()) == whole_bits, "forward");
        let by_blocks = rows_out(&blocks, (factors.clone(), &steps), None, &dev);
        assert!(
            bits(by_blocks.into_data()) == whole_bits,
            "forward in blocks"
        );
        // Inference, in place and in its smaller blocks, with an output to add to.
        assert!((INFER_FLOATS / (p * q)) < n && n * p * q > 2 * INFER_FLOATS);
        let y = Tensor::<Flex, 2>::from_data(
            TensorData::new(values(n * 16 * 24, 14), [n, 16 * 24]),
            &dev,
        );
        let added = bits(whole(Some(y.clone())).into_data());
        let in_place = apply_rows(t.clone(), factors.clone(), &steps, Some(y.clone()));
        assert!(bits(in_place.into_data()) == added, "added to y");
        let small = Rows::blocks_copied(t.clone(), INFER_FLOATS);
        assert!(matches!(small.src, Source::Blocks(_)));
        let by_blocks = rows_out(&small, (factors.clone(), &steps), Some(y), &dev);
        assert!(
            bits(by_blocks.into_data()) == added,
            "added to y, in blocks"
        );

        let gv = values(n * 16 * 24, 13);
        let g = Tensor::<Flex, 3>::from_data(TensorData::new(gv.clone(), [n, 16, 24]), &dev);
        let want = [true, true];
        let (got_f, got_t) = apply_grads(t, g, factors.clone(), &steps, &want, true);
        let fv: Vec<Vec<f32>> = factors
            .iter()
            .map(|f| f.to_data().to_vec().unwrap())
            .collect();
        let host: Vec<HostStep> = (fv.iter().zip(shapes).zip(steps))
            .map(|((f, dims), side)| HostStep { f, dims, side })
            .collect();
        let mut dt = vec![MaybeUninit::new(0.0); n * p * q];
        let whole_t =
            |r: std::ops::Range<usize>| Cow::Borrowed(&tv[r.start * p * q..r.end * p * q]);
        let want_f = grads::steps_grads(
            Isa::best(),
            whole_t,
            &gv,
            [n, p, q],
            &host,
            &want,
            Some(&mut dt),
        );
        // The backward reading the copied blocks gives the same bits.
        let mut dt_blocks = vec![MaybeUninit::new(0.0); n * p * q];
        let blocks_f = grads::steps_grads(
            Isa::best(),
            |r| blocks.get(r),
            &gv,
            [n, p, q],
            &host,
            &want,
            Some(&mut dt_blocks),
        );
        let as_bits = |v: &[MaybeUninit<f32>]| -> Vec<u32> {
            // SAFETY: initialized before the calls.
            v.iter()
                .map(|v| unsafe { v.assume_init() }.to_bits())
                .collect()
        };
        assert!(as_bits(&dt_blocks) == as_bits(&dt), "∂T from blocks");
        assert!(blocks_f == want_f, "the factors' gradients from blocks");
        for (got, want) in got_f.into_iter().zip(want_f) {
            let want: Vec<u32> = want.unwrap().iter().map(|v| v.to_bits()).collect();
            assert!(
                bits(got.unwrap().into_data()) == want,
                "a factor's gradient"
            );
        }
        assert!(bits(got_t.unwrap().into_data()) == as_bits(&dt), "∂T");
        drop(kept);
    }

    /// No rows, or an empty axis: zeros wherever the output has entries.
    #[test]
    fn empty_shapes_give_zeros() {
        for with_simd in [true, false].into_iter().filter(|&s| !s || has_avx2_fma()) {
            assert!(contract_nan(with_simd, &[1.0; 6], 2, 3, &[], 0, 4).is_empty());
            assert_eq!(grad_factor_with(with_simd, &[], &[], 2, 3, 4), vec![0.0; 6]);
            // q = 0: rows of no columns; p = 0: nothing to sum.
            assert!(contract_nan(with_simd, &[1.0; 6], 2, 3, &[], 5, 0).is_empty());
            assert_eq!(grad_factor_with(with_simd, &[], &[], 2, 3, 0), vec![0.0; 6]);
            let out = contract_nan(with_simd, &[], 0, 3, &[], 2, 4);
            assert_eq!(out.len(), 2 * 3 * 4);
            assert!(out.iter().all(|&v| v == 0.0));
        }
    }
}
