//! The `a` step of the Kronecker apply, `out[r] = fᵀ·T[r]`, and its two gradients as host loops,
//! for burn-flex.
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
//!   then amortize), so [`FACTOR_GRAD_MAX`] bounds where this one is used.
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

use std::mem::MaybeUninit;

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
    contract_into(has_avx2_fma(), f, p, p2, t, n, q, spare);
    // SAFETY: `contract_into` wrote each of the first `len` entries.
    unsafe { out.set_len(len) };
    out
}

/// [`contract`] into `out` (`[n, p2, q]`), every entry of which it writes.
#[allow(clippy::too_many_arguments)]
fn contract_into(
    simd: bool,
    f: &[f32],
    p: usize,
    p2: usize,
    t: &[f32],
    n: usize,
    q: usize,
    out: &mut [MaybeUninit<f32>],
) {
    let (row_t, row_o) = (p * q, p2 * q);
    assert_eq!(f.len(), p * p2, "f is [p, p2]");
    assert_eq!(t.len(), n * row_t, "t is [n, p, q]");
    assert_eq!(out.len(), n * row_o, "out is [n, p2, q]");
    if row_t == 0 || row_o == 0 {
        // Sums of no terms (p = 0), or nothing to write.
        out.iter_mut().for_each(|o| {
            o.write(0.0);
        });
        return;
    }
    let rows = |t: &[f32], out: &mut [MaybeUninit<f32>]| {
        #[cfg(target_arch = "x86_64")]
        if simd {
            // SAFETY: the CPU has AVX2 and FMA (`has_avx2_fma()`), and the lengths were checked
            // above.
            unsafe { x86::contract(f, p, p2, t, q, out) };
            return;
        }
        let _ = simd;
        portable::contract(f, p, p2, t, q, out)
    };
    let chunk = (PARALLEL_MACS / (row_t * p2).max(1)).max(1);
    if t.len() / row_t > chunk {
        t.par_chunks(chunk * row_t)
            .zip(out.par_chunks_mut(chunk * row_o))
            .for_each(|(t, out)| rows(t, out));
    } else {
        rows(t, out)
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
            // SAFETY: the CPU has AVX2 and FMA (`has_avx2_fma()`), and the lengths were checked
            // above.
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
    use std::mem::MaybeUninit;

    /// [`super::contract`] over whole rows.
    pub(super) fn contract(
        f: &[f32],
        p: usize,
        p2: usize,
        t: &[f32],
        q: usize,
        out: &mut [MaybeUninit<f32>],
    ) {
        for (tr, or) in t.chunks_exact(p * q).zip(out.chunks_exact_mut(p2 * q)) {
            let mut j = 0;
            while j + 4 <= p2 {
                rows::<4>(f, p, p2, j, tr, q, or);
                j += 4;
            }
            while j < p2 {
                rows::<1>(f, p, p2, j, tr, q, or);
                j += 1;
            }
        }
    }

    /// Output rows `j..j + J` of one row `tr`.
    #[inline(always)]
    fn rows<const J: usize>(
        f: &[f32],
        p: usize,
        p2: usize,
        j: usize,
        tr: &[f32],
        q: usize,
        or: &mut [MaybeUninit<f32>],
    ) {
        let mut k = 0;
        while k + 8 <= q {
            cols::<J, 8>(f, p, p2, j, tr, q, k, or);
            k += 8;
        }
        while k < q {
            cols::<J, 1>(f, p, p2, j, tr, q, k, or);
            k += 1;
        }
    }

    /// Columns `k..k + W` of output rows `j..j + J`, summed over `i`.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn cols<const J: usize, const W: usize>(
        f: &[f32],
        p: usize,
        p2: usize,
        j: usize,
        tr: &[f32],
        q: usize,
        k: usize,
        or: &mut [MaybeUninit<f32>],
    ) {
        let mut acc = [[0f32; W]; J];
        for i in 0..p {
            let tv = &tr[i * q + k..i * q + k + W];
            let fv = &f[i * p2 + j..i * p2 + j + J];
            for (a, &fj) in acc.iter_mut().zip(fv) {
                for (a, &tl) in a.iter_mut().zip(tv) {
                    *a += fj * tl;
                }
            }
        }
        for (jj, a) in acc.iter().enumerate() {
            let o = &mut or[(j + jj) * q + k..(j + jj) * q + k + W];
            for (o, &v) in o.iter_mut().zip(a) {
                o.write(v);
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

    /// [`super::contract`] over whole rows: writes every entry of `out`.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; `f` is `[p, p2]`, `t` `[n, p, q]`, `out` `[n, p2, q]` (checked
    /// by the caller), so every pointer below stays inside its slice.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn contract(
        f: &[f32],
        p: usize,
        p2: usize,
        t: &[f32],
        q: usize,
        out: &mut [MaybeUninit<f32>],
    ) {
        let (q16, q8) = (q / 16 * 16, q / 8 * 8);
        for (tr, or) in t.chunks_exact(p * q).zip(out.chunks_exact_mut(p2 * q)) {
            let (tp, fp) = (tr.as_ptr(), f.as_ptr());
            let op = or.as_mut_ptr().cast::<f32>();
            let mut j = 0;
            while j < p2 {
                let jb = (p2 - j).min(4);
                let mut k = 0;
                while k < q16 {
                    let mut acc = [[_mm256_setzero_ps(); 2]; 4];
                    for i in 0..p {
                        let t0 = _mm256_loadu_ps(tp.add(i * q + k));
                        let t1 = _mm256_loadu_ps(tp.add(i * q + k + 8));
                        let fr = fp.add(i * p2 + j);
                        for (jj, a) in acc.iter_mut().enumerate().take(jb) {
                            let b = _mm256_broadcast_ss(&*fr.add(jj));
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
                        let fr = fp.add(i * p2 + j);
                        for (jj, a) in acc.iter_mut().enumerate().take(jb) {
                            *a = _mm256_fmadd_ps(_mm256_broadcast_ss(&*fr.add(jj)), t0, *a);
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
                            s = f[i * p2 + j + jj].mul_add(tr[i * q + k], s);
                        }
                        or[(j + jj) * q + k].write(s);
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
    let (f, t) = (values(f), values(t));
    let out = contract(&floats(&f), p, p2, &floats(&t), n, q);
    Tensor::from_data(TensorData::new(out, [n, p2, q]), &device)
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
    let g = values(g);
    let g = floats(&g);
    let grad_f = t.map(|t| {
        let p = t.dims()[1];
        let t = values(t);
        let out = grad_factor(&floats(&t), &g, p, p2, q);
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

    use super::{contract_into, grad_factor_with, has_avx2_fma, PARALLEL_MACS};

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
        contract_into(simd, f, p, p2, t, n, q, &mut out);
        // SAFETY: every entry was initialized (with NaN) before the call.
        out.iter().map(|v| unsafe { v.assume_init() }).collect()
    }

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
                let out = contract_nan(with_simd, &f, p, p2, &t, n, q);
                let ft: Vec<f32> = (0..p2 * p).map(|x| f[(x % p) * p2 + x / p]).collect();
                let gt = contract_nan(with_simd, &ft, p2, p, &g, n, q);
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
