//! The `a` step of the Kronecker apply, `out[r] = fᵀ·T[r]`, its two gradients, and the gradient
//! through a `b` step as host loops, for burn-flex.
//!
//! An `a` factor contracts the middle axis of `T [n, p, q]`. As Burn operations that is a
//! batched product of `n` small matrices (`[p', p]·[p, q]` each, 16 × 16 × 24 on a MiniLM
//! projection with KronA's √d factors), and burn-flex makes one `gemm` call per row, each with
//! its own dispatch and packing. A KronA training step on MiniLM spent 16.5% of its CPU time in
//! these products and their gradients, for under a tenth of its multiply-adds
//! (docs/benchmarks.md, "The `a` step by host loops"). Here each is one pass over the rows, a
//! row's values in the L1 cache:
//!
//! * [`contract`]: `out[r, j, :] = Σ_i f[i, j]·T[r, i, :]`: four output rows at a time share
//!   each load of `T`, sixteen (or eight) columns in registers, summed over `i`; rows split
//!   over rayon's threads in fixed chunks when the work is large;
//! * the gradient of `T` through the step, `∂T[r] = f·G[r]`, is [`contract`] with `fᵀ`, from
//!   the same read of `G` as the factor's ([`contract_a_grads`]);
//! * [`grad_factor`]: `∂f[i, j] = Σ_r Σ_k T[r, i, k]·G[r, j, k]`, blocks of 2 × 4 entries
//!   summed in eight-lane registers over a block of rows that fits the L1 cache, then added
//!   to the running sums. Burn's product is faster once the factor is large (its `gemm` calls
//!   then amortize), so [`FACTOR_GRAD_MAX`] bounds where this one is used;
//! * [`rmul`]: `x·m` for many rows `x` and one small `m`, the gradient through a `b` step
//!   (`∂T = G·fᵀ`): [`contract`]'s kernel with a block of four rows, read transposed through
//!   [`Factor`]'s strides, as its factor and `m` as its one row.
//!
//! Where the output has the input's shape (a square `a` factor, a square `b` factor) the loops
//! write it over the input's own values ([`contract_in_place`], [`rmul_in_place`]: each row or
//! block copied aside first), so no output buffer is allocated and cleared. That matters on flex
//! beyond the allocation: its products allocate their output as cleared bytes and then copy it
//! once more to align it (`FlexTensor::empty`, 13% of a KronA step's samples on MiniLM,
//! docs/benchmarks.md), which a host loop writing into the buffer it was handed never does.
//!
//! With AVX2 and FMA (chosen at run time) the loops are written with their intrinsics; elsewhere
//! (other CPUs, other architectures) plain Rust loops of the same shape (`contract`'s blocks of
//! four rows, `grad_factor`'s eight-lane dot products), which the compiler vectorizes for the
//! baseline target (NEON on aarch64). The two differ in rounding (fused
//! against separate multiply and add) and both from `gemm`'s order of summation; the tests
//! check each against `f64` references.
//!
//! `kron::autodiff` decides where they run (`quirks::a_steps_on_host`: flex, `f32`, and not on
//! autodiff tensors: inside the registered autodiff node, and in inference).

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use rayon::prelude::*;

use crate::act::{floats, has_avx2_fma, values};

/// Floats of `T` and `G` per row block of [`grad_factor`] (32 KB).
const BLOCK_FLOATS: usize = 8 * 1024;

/// Multiply-adds from which [`contract`] splits its rows over rayon's threads, in chunks of
/// about this many (fixed, so the result never depends on the number of threads).
const PARALLEL_MACS: usize = 1 << 21;

/// The largest factor, as `p·p'·q` multiply-adds per row, whose gradient [`grad_factor`]
/// computes; beyond it Burn's chunked products are faster (measured at MiniLM's and SmolLM2's
/// shapes against 64 × 64 × 64, docs/benchmarks.md).
pub(crate) const FACTOR_GRAD_MAX: usize = 1 << 16;

/// A small matrix `f [p, p2]` read with strides: `f[i, j]` is `values[i·strides[0] +
/// j·strides[1]]` (`[p2, 1]` row-major, `[1, p]` a row-major `[p2, p]` matrix transposed).
#[derive(Clone, Copy)]
pub(crate) struct Factor<'a> {
    pub values: &'a [f32],
    pub strides: [usize; 2],
}

impl<'a> Factor<'a> {
    /// `values` as a row-major `[p, p2]` matrix.
    pub fn rows(values: &'a [f32], p2: usize) -> Self {
        Self {
            values,
            strides: [p2, 1],
        }
    }

    /// `values`, a row-major `[p2, p]` matrix, read as its transpose `[p, p2]`.
    pub fn transposed(values: &'a [f32], p: usize) -> Self {
        Self {
            values,
            strides: [1, p],
        }
    }

    /// Panics unless every entry of a `[p, p2]` matrix lies inside `values`.
    fn check(&self, p: usize, p2: usize) {
        let last = (p.max(1) - 1) * self.strides[0] + (p2.max(1) - 1) * self.strides[1];
        assert!(
            p * p2 == 0 || last < self.values.len(),
            "f is [p, p2] within its values"
        );
    }
}

/// `out[r] = fᵀ·T[r]` for every row `r`.
///
/// # Shapes
/// - `f`: `[p, p2]`
/// - `t`: `[n, p, q]`
/// - `out`: `[n, p2, q]`
///
/// # Panics
/// If the lengths do not match the shapes.
pub(crate) fn contract(f: Factor, p: usize, p2: usize, t: &[f32], q: usize, out: &mut [f32]) {
    contract_with(has_avx2_fma(), f, p, p2, t, q, out)
}

/// [`contract`] written over `t` itself (`p2 = p`): each row copied aside, its result stored
/// where it was, so no output buffer is allocated or cleared.
///
/// # Shapes
/// - `f`: `[p, p]`
/// - `t`: `[n, p, q]`, then the output `[n, p, q]`
pub(crate) fn contract_in_place(f: Factor, p: usize, t: &mut [f32], q: usize) {
    contract_in_place_with(has_avx2_fma(), f, p, t, q)
}

/// `x·m`: every row of `x` through the same small matrix (the gradient through a `b` step,
/// `G·fᵀ`). Blocks of four rows go through [`contract`]'s kernel with the block, transposed,
/// as its factor and `m` as its one row.
///
/// # Shapes
/// - `x`: `[rows, k]`
/// - `m`: `[k, n]`, row-major
/// - `out`: `[rows, n]`
pub(crate) fn rmul(x: &[f32], m: &[f32], k: usize, n: usize, out: &mut [f32]) {
    rmul_with(has_avx2_fma(), x, m, k, n, out)
}

/// [`rmul`] written over `x`, for a square `m` (`[k, k]`): each block of rows copied aside,
/// its result stored where it was.
pub(crate) fn rmul_in_place(x: &mut [f32], m: &[f32], k: usize) {
    rmul_in_place_with(has_avx2_fma(), x, m, k)
}

/// Rows of [`rmul`]'s blocks: four rows share each load of `m`'s rows in the kernel.
const RMUL_BLOCK: usize = 4;

/// One pass of [`contract`]'s kernel (intrinsics where `simd`), lengths checked by the caller.
fn kernel(simd: bool, f: Factor, p: usize, p2: usize, t: &[f32], q: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: the CPU has AVX2 and FMA (`has_avx2_fma()`), and the callers checked the
        // lengths against the shapes (`Factor::check` for `f`).
        unsafe { x86::contract(f, p, p2, t, q, out) };
        return;
    }
    let _ = simd;
    portable::contract(f, p, p2, t, q, out)
}

/// Rows per parallel chunk when `rows` rows of `macs` multiply-adds each are worth splitting
/// over rayon's threads (fixed chunks: the result never depends on the number of threads).
fn parallel_chunk(rows: usize, macs: usize) -> Option<usize> {
    let chunk = (PARALLEL_MACS / macs.max(1)).max(1);
    (rows > chunk).then_some(chunk)
}

fn contract_with(simd: bool, f: Factor, p: usize, p2: usize, t: &[f32], q: usize, out: &mut [f32]) {
    let (row_t, row_o) = (p * q, p2 * q);
    f.check(p, p2);
    if row_t == 0 || row_o == 0 {
        out.fill(0.0);
        return;
    }
    assert_eq!(t.len() % row_t, 0, "t is [n, p, q]");
    assert_eq!(out.len(), t.len() / row_t * row_o, "out is [n, p2, q]");
    let rows = |t: &[f32], out: &mut [f32]| kernel(simd, f, p, p2, t, q, out);
    match parallel_chunk(t.len() / row_t, row_t * p2) {
        Some(chunk) => t
            .par_chunks(chunk * row_t)
            .zip(out.par_chunks_mut(chunk * row_o))
            .for_each(|(t, out)| rows(t, out)),
        None => rows(t, out),
    }
}

fn contract_in_place_with(simd: bool, f: Factor, p: usize, t: &mut [f32], q: usize) {
    let row = p * q;
    f.check(p, p);
    if row == 0 {
        return;
    }
    assert_eq!(t.len() % row, 0, "t is [n, p, q]");
    let rows = |t: &mut [f32]| {
        let mut aside = vec![0f32; row];
        for r in t.chunks_exact_mut(row) {
            aside.copy_from_slice(r);
            kernel(simd, f, p, p, &aside, q, r);
        }
    };
    match parallel_chunk(t.len() / row, row * p) {
        Some(chunk) => t.par_chunks_mut(chunk * row).for_each(rows),
        None => rows(t),
    }
}

fn rmul_with(simd: bool, x: &[f32], m: &[f32], k: usize, n: usize, out: &mut [f32]) {
    assert_eq!(m.len(), k * n, "m is [k, n]");
    if k == 0 || n == 0 {
        out.fill(0.0);
        return;
    }
    assert_eq!(x.len() % k, 0, "x is [rows, k]");
    assert_eq!(out.len(), x.len() / k * n, "out is [rows, n]");
    let rows = |x: &[f32], out: &mut [f32]| {
        for (block, out) in x.chunks(RMUL_BLOCK * k).zip(out.chunks_mut(RMUL_BLOCK * n)) {
            let b = block.len() / k;
            kernel(simd, Factor::transposed(block, k), k, b, m, n, out);
        }
    };
    match parallel_chunk(x.len() / k, k * n) {
        Some(chunk) => {
            let chunk = chunk.next_multiple_of(RMUL_BLOCK);
            x.par_chunks(chunk * k)
                .zip(out.par_chunks_mut(chunk * n))
                .for_each(|(x, out)| rows(x, out))
        }
        None => rows(x, out),
    }
}

fn rmul_in_place_with(simd: bool, x: &mut [f32], m: &[f32], k: usize) {
    assert_eq!(m.len(), k * k, "m is [k, k]");
    if k == 0 {
        return;
    }
    assert_eq!(x.len() % k, 0, "x is [rows, k]");
    let rows = |x: &mut [f32]| {
        let mut aside = Vec::with_capacity(RMUL_BLOCK * k);
        for block in x.chunks_mut(RMUL_BLOCK * k) {
            aside.clear();
            aside.extend_from_slice(block);
            let b = block.len() / k;
            kernel(simd, Factor::transposed(&aside, k), k, b, m, k, block);
        }
    };
    match parallel_chunk(x.len() / k, k * k) {
        Some(chunk) => x
            .par_chunks_mut(chunk.next_multiple_of(RMUL_BLOCK) * k)
            .for_each(rows),
        None => rows(x),
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
    let (row_t, row_g) = (p * q, p2 * q);
    if row_t == 0 || row_g == 0 {
        return out;
    }
    assert_eq!(t.len() % row_t, 0, "t is [n, p, q]");
    assert_eq!(g.len(), t.len() / row_t * row_g, "g is [n, p2, q]");
    let rows = (BLOCK_FLOATS / (row_t + row_g)).max(1);
    for (tb, gb) in t.chunks(rows * row_t).zip(g.chunks(rows * row_g)) {
        #[cfg(target_arch = "x86_64")]
        if simd {
            // SAFETY: the CPU has AVX2 and FMA (`has_avx2_fma()`), and the lengths were checked above.
            unsafe { x86::grad_block(tb, gb, p, p2, q, &mut out) };
            continue;
        }
        let _ = simd;
        portable::grad_block(tb, gb, p, p2, q, &mut out);
    }
    out
}

/// The kernels in plain Rust, for CPUs without AVX2 and FMA.
mod portable {
    use super::Factor;

    /// [`super::contract`] over whole rows.
    pub(super) fn contract(f: Factor, p: usize, p2: usize, t: &[f32], q: usize, out: &mut [f32]) {
        for (tr, or) in t.chunks_exact(p * q).zip(out.chunks_exact_mut(p2 * q)) {
            let mut j = 0;
            while j + 4 <= p2 {
                rows::<4>(f, p, j, tr, q, or);
                j += 4;
            }
            while j < p2 {
                rows::<1>(f, p, j, tr, q, or);
                j += 1;
            }
        }
    }

    /// Output rows `j..j + J` of one row `tr`.
    #[inline(always)]
    fn rows<const J: usize>(f: Factor, p: usize, j: usize, tr: &[f32], q: usize, or: &mut [f32]) {
        let mut k = 0;
        while k + 8 <= q {
            cols::<J, 8>(f, p, j, tr, q, k, or);
            k += 8;
        }
        while k < q {
            cols::<J, 1>(f, p, j, tr, q, k, or);
            k += 1;
        }
    }

    /// Columns `k..k + W` of output rows `j..j + J`, summed over `i`.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn cols<const J: usize, const W: usize>(
        f: Factor,
        p: usize,
        j: usize,
        tr: &[f32],
        q: usize,
        k: usize,
        or: &mut [f32],
    ) {
        let mut acc = [[0f32; W]; J];
        for i in 0..p {
            let tv = &tr[i * q + k..i * q + k + W];
            let [rs, cs] = f.strides;
            for (jj, a) in acc.iter_mut().enumerate() {
                let fj = f.values[i * rs + (j + jj) * cs];
                for (a, &tl) in a.iter_mut().zip(tv) {
                    *a += fj * tl;
                }
            }
        }
        for (jj, a) in acc.iter().enumerate() {
            or[(j + jj) * q + k..(j + jj) * q + k + W].copy_from_slice(a);
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

    use super::Factor;

    /// [`super::contract`] over whole rows.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; `f` is `[p, p2]` within its values, `t` `[n, p, q]`, `out`
    /// `[n, p2, q]` (checked by the caller), so every pointer below stays inside its slice.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn contract(
        f: Factor,
        p: usize,
        p2: usize,
        t: &[f32],
        q: usize,
        out: &mut [f32],
    ) {
        let (q16, q8) = (q / 16 * 16, q / 8 * 8);
        let [rs, cs] = f.strides;
        for (tr, or) in t.chunks_exact(p * q).zip(out.chunks_exact_mut(p2 * q)) {
            let (tp, op, fp) = (tr.as_ptr(), or.as_mut_ptr(), f.values.as_ptr());
            let mut j = 0;
            while j < p2 {
                let jb = (p2 - j).min(4);
                let mut k = 0;
                while k < q16 {
                    let mut acc = [[_mm256_setzero_ps(); 2]; 4];
                    for i in 0..p {
                        let t0 = _mm256_loadu_ps(tp.add(i * q + k));
                        let t1 = _mm256_loadu_ps(tp.add(i * q + k + 8));
                        let fr = fp.add(i * rs + j * cs);
                        for (jj, a) in acc.iter_mut().enumerate().take(jb) {
                            let b = _mm256_broadcast_ss(&*fr.add(jj * cs));
                            a[0] = _mm256_fmadd_ps(b, t0, a[0]);
                            a[1] = _mm256_fmadd_ps(b, t1, a[1]);
                        }
                    }
                    for (jj, a) in acc.iter().enumerate().take(jb) {
                        _mm256_storeu_ps(op.add((j + jj) * q + k), a[0]);
                        _mm256_storeu_ps(op.add((j + jj) * q + k + 8), a[1]);
                    }
                    k += 16;
                }
                while k < q8 {
                    let mut acc = [_mm256_setzero_ps(); 4];
                    for i in 0..p {
                        let t0 = _mm256_loadu_ps(tp.add(i * q + k));
                        let fr = fp.add(i * rs + j * cs);
                        for (jj, a) in acc.iter_mut().enumerate().take(jb) {
                            *a = _mm256_fmadd_ps(_mm256_broadcast_ss(&*fr.add(jj * cs)), t0, *a);
                        }
                    }
                    for (jj, a) in acc.iter().enumerate().take(jb) {
                        _mm256_storeu_ps(op.add((j + jj) * q + k), *a);
                    }
                    k += 8;
                }
                for k in q8..q {
                    for jj in 0..jb {
                        let mut s = 0f32;
                        for i in 0..p {
                            s = f.values[i * rs + (j + jj) * cs].mul_add(tr[i * q + k], s);
                        }
                        or[(j + jj) * q + k] = s;
                    }
                }
                j += jb;
            }
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

    /// The sum of the eight lanes.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn sum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
    }
}

/// `out[r] = fᵀ·T[r]` through [`contract`]: over `t`'s own values where `f` is square (no
/// output buffer to allocate and clear).
///
/// # Shapes
/// - `f`: `[p, p2]`
/// - `t`: `[n, p, q]`
/// - output: `[n, p2, q]`
pub(crate) fn contract_a<B: Backend>(f: Tensor<B, 2>, t: Tensor<B, 3>) -> Tensor<B, 3> {
    let device = t.device();
    let [n, p, q] = t.dims();
    let p2 = f.dims()[1];
    let (f, mut t) = (values(f), values(t));
    let f = floats(&f);
    let f = Factor::rows(&f, p2);
    if p2 == p {
        if let Some(values) = mut_floats(&mut t) {
            contract_in_place(f, p, values, q);
            return Tensor::from_data(t, &device);
        }
    }
    let mut out = vec![0f32; n * p2 * q];
    contract(f, p, p2, &floats(&t), q, &mut out);
    Tensor::from_data(TensorData::new(out, [n, p2, q]), &device)
}

/// The gradients through `out[r] = fᵀ·T[r]` from one read of the output's gradient `g`: of
/// the factor, `∂f = Σ_r T[r]·G[r]ᵀ` by [`grad_factor`] (where `t` is given), and of `T`,
/// `∂T[r] = f·G[r]` by [`contract`] with `fᵀ` (where `f` is given; over `g`'s own values
/// where `f` is square).
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
    let mut g = values(g);
    let grad_f = t.map(|t| {
        let p = t.dims()[1];
        let t = values(t);
        let out = grad_factor(&floats(&t), &floats(&g), p, p2, q);
        Tensor::from_data(TensorData::new(out, [p, p2]), &device)
    });
    let grad_t = f.map(|f| {
        let p = f.dims()[0];
        let f = values(f);
        let f = floats(&f);
        // fᵀ `[p2, p]` over `f`'s row-major `[p, p2]` values.
        let ft = Factor::transposed(&f, p2);
        if p == p2 {
            if let Some(values) = mut_floats(&mut g) {
                contract_in_place(ft, p2, values, q);
                return Tensor::from_data(g, &device);
            }
        }
        let mut out = vec![0f32; n * p * q];
        contract(ft, p2, p, &floats(&g), q, &mut out);
        Tensor::from_data(TensorData::new(out, [n, p, q]), &device)
    });
    (grad_f, grad_t)
}

/// The gradient through a `b` step `out = T·f`, `∂T = G·fᵀ` ([`rmul`]): over `g`'s own values
/// where `f` is square.
///
/// # Shapes
/// - `g`: `[n, p, q2]`
/// - `f`: `[q, q2]`
/// - output: `[n, p, q]`
pub(crate) fn b_step_grad_input<B: Backend>(g: Tensor<B, 3>, f: Tensor<B, 2>) -> Tensor<B, 3> {
    let device = g.device();
    let [n, p, q2] = g.dims();
    let q = f.dims()[0];
    let f = values(f);
    let f = floats(&f);
    // `fᵀ` `[q2, q]`, row-major: the kernel reads its rows.
    let ft: Vec<f32> = (0..q2 * q).map(|x| f[(x % q) * q2 + x / q]).collect();
    let mut g = values(g);
    if q == q2 {
        if let Some(values) = mut_floats(&mut g) {
            rmul_in_place(values, &ft, q);
            return Tensor::from_data(g, &device);
        }
    }
    let mut out = vec![0f32; n * p * q];
    rmul(&floats(&g), &ft, q2, q, &mut out);
    Tensor::from_data(TensorData::new(out, [n, p, q]), &device)
}

/// `data`'s values as mutable `f32`s, where its buffer is aligned for them (flex's always is).
fn mut_floats(data: &mut TensorData) -> Option<&mut [f32]> {
    data.as_mut_slice::<f32>().ok()
}

#[cfg(test)]
mod tests {
    use super::{contract_in_place_with, contract_with, grad_factor_with, has_avx2_fma};
    use super::{rmul_in_place_with, rmul_with, Factor, PARALLEL_MACS};

    /// Deterministic values in [−1, 1), none zero.
    fn values(n: usize, seed: u64) -> Vec<f32> {
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
                let mut out = vec![f32::NAN; n * p2 * q];
                contract_with(with_simd, Factor::rows(&f, p2), p, p2, &t, q, &mut out);
                // ∂T through `f`'s transpose read by strides, and through a copy of it.
                let ft: Vec<f32> = (0..p2 * p).map(|x| f[(x % p) * p2 + x / p]).collect();
                let mut gt = vec![f32::NAN; n * p * q];
                contract_with(with_simd, Factor::transposed(&f, p2), p2, p, &g, q, &mut gt);
                let mut gt_copy = vec![f32::NAN; n * p * q];
                contract_with(with_simd, Factor::rows(&ft, p), p2, p, &g, q, &mut gt_copy);
                assert_eq!(gt, gt_copy, "{}", what("∂T by strides"));
                if p == p2 {
                    // Written over the input: the same values as into a new buffer.
                    let mut in_place = t.clone();
                    contract_in_place_with(with_simd, Factor::rows(&f, p2), p, &mut in_place, q);
                    assert_eq!(in_place, out, "{}", what("in place"));
                }
                let gf = grad_factor_with(with_simd, &t, &g, p, p2, q);
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
                        check(gf[i * p2 + j], terms, &what("∂f"));
                    }
                }
            }
        }
    }

    /// `x·m`, into a new buffer and (square `m`) over `x`'s own values, against `f64` loops:
    /// row blocks of four and shorter, columns by 16, 8 and single, and enough rows to split
    /// over threads.
    #[test]
    fn the_b_step_input_gradient_matches_f64_loops() {
        let shapes = [
            [7, 24, 24],
            [4, 16, 16],
            [3, 5, 5],
            [1, 1, 1],
            [9, 33, 33],
            [4000, 24, 24],
            [6, 48, 24],
            [5, 24, 48],
            [3000, 48, 24],
            [2, 3, 17],
        ];
        for with_simd in [true, false].into_iter().filter(|&s| !s || has_avx2_fma()) {
            for (s, [rows, k, n]) in shapes.into_iter().enumerate() {
                let x = values(rows * k, 5 * s as u64 + 1);
                let m = values(k * n, 5 * s as u64 + 2);
                let mut got = vec![f32::NAN; rows * n];
                rmul_with(with_simd, &x, &m, k, n, &mut got);
                let what = format!("x·m [{rows}, {k}]·[{k}, {n}], intrinsics {with_simd}");
                for r in 0..rows {
                    for c in 0..n {
                        let terms = (0..k).map(|i| x[r * k + i] as f64 * m[i * n + c] as f64);
                        check(got[r * n + c], terms, &what);
                    }
                }
                if k == n {
                    let mut in_place = x.clone();
                    rmul_in_place_with(with_simd, &mut in_place, &m, k);
                    assert_eq!(in_place, got, "{what} in place");
                }
            }
        }
        // The largest cases split over threads.
        const { assert!(3000 * 48 * 24 > PARALLEL_MACS && 4000 * 24 * 24 > PARALLEL_MACS) };
    }

    fn check(got: f32, terms: impl Iterator<Item = f64>, what: &str) {
        let (sum, mag) = terms.fold((0.0, 0.0), |(s, m), v: f64| (s + v, m + v.abs()));
        assert!(
            (got as f64 - sum).abs() <= 1e-6 * mag,
            "{what}: {got} against {sum} (terms' magnitude {mag})"
        );
    }

    /// No rows, or an empty axis: zeros wherever the output has entries.
    #[test]
    fn empty_shapes_give_zeros() {
        for with_simd in [true, false].into_iter().filter(|&s| !s || has_avx2_fma()) {
            let mut out = vec![];
            let f = Factor::rows(&[1.0; 6], 3);
            contract_with(with_simd, f, 2, 3, &[], 4, &mut out);
            assert_eq!(grad_factor_with(with_simd, &[], &[], 2, 3, 4), vec![0.0; 6]);
            // q = 0: rows of no columns; p = 0: nothing to sum.
            contract_with(with_simd, f, 2, 3, &[], 0, &mut out);
            assert_eq!(grad_factor_with(with_simd, &[], &[], 2, 3, 0), vec![0.0; 6]);
            let mut out = vec![f32::NAN; 2 * 3 * 4];
            contract_with(with_simd, Factor::rows(&[], 3), 0, 3, &[], 4, &mut out);
            assert!(out.iter().all(|&v| v == 0.0));
            let mut none: Vec<f32> = vec![];
            contract_in_place_with(with_simd, Factor::rows(&[1.0; 4], 2), 2, &mut none, 3);
            rmul_in_place_with(with_simd, &mut none, &[], 0);
            rmul_with(with_simd, &[], &[1.0; 6], 2, 3, &mut none);
            rmul_with(with_simd, &[1.0; 8], &[], 2, 0, &mut []);
            // k = 0: each row of the output is an empty sum.
            let mut out = vec![f32::NAN; 4];
            rmul_with(with_simd, &[], &[], 0, 2, &mut out);
            assert_eq!(out, vec![0.0; 4]);
        }
    }
}
