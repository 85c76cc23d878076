//! Activation functions and their derivatives computed on the host, for burn-flex, whose own
//! GELU calls libm's scalar `erff` element by element (with its backward, 12% of a MiniLM
//! training step's CPU time, docs/benchmarks-history.md) and whose SiLU is a sigmoid by scalar
//! `expf` and a product, two operations each way.
//!
//! **GELU.** `gelu(x) = x·Φ(x)` and `gelu'(x) = Φ(x) + x·φ(x)`, with `φ(x) = exp(−x²/2)/√(2π)`
//! and `Φ(x) = E/2` for `x < 0`, `1 − E/2` otherwise, where `E = erfc(|x|/√2)`. Everything is
//! computed in `f64` and rounded once to `f32`: with `z = |x|/√2` and `t = 1/(1 + z/2)`,
//! `E = t·Q(t)·exp(−z²)`, `Q` a degree-11 polynomial fitted to `erfc(z)·exp(z²)/t` on
//! `z ∈ [0, 6]` (`scripts/fit_gelu.py`: relative error of `E` under 1e-10 there; beyond, `E`
//! and `φ` are taken as 0, as `f32`'s erf rounds to ±1 long before), and `exp` by range
//! reduction to `|r| ≤ ln 2 / 2` and a degree-8 Taylor polynomial (relative error under 3e-10).
//! The same `exp(−z²)` serves `E` and `φ`. No branches and no calls, so the loops vectorize:
//! compiled for AVX-512F (eight `f64` lanes) or for AVX2 and FMA (four) where the CPU has them
//! (chosen at run time, [`Isa`]), for the baseline target elsewhere; the same operations per
//! value in every build, so the same bits (1.6× faster with AVX-512 than with AVX2 on this
//! project's Xeon: 1.57M values' GELU 2.88 → 1.75 ms, its backward 3.1 → 1.9 ms, SiLU 1.61 →
//! 1.10 ms). The tests check every result against libm's `f64` `erfc` to half an `f32` ulp
//! (plus 1e-9 relative), and every narrower build's results against the widest's, bit for bit.
//!
//! **SiLU.** `silu(x) = x·s` and `silu'(x) = s·(1 + x·(1 − s))` with `s = σ(x) = 1/(1 + e)`
//! for `x ≥ 0` and `e/(1 + e)` otherwise, `e = exp(−|x|)` (the same `exp`; 0 beyond
//! `|x| = 700`), in `f64`, rounded once; checked against `f64` `exp` from std likewise.
//!
//! **Softmax**: `y_i = exp(x_i − m)/Σ_j exp(x_j − m)` over each row, `m` the row's largest
//! value, the exponentials by the same `exp` and their sum in `f64`, rounded once; its backward
//! from the output, `∂x_i = y_i·(g_i − Σ_j g_j·y_j)`, likewise. Both checked against `f64`
//! formulas (std's `exp`) to half an `f32` ulp.
//!
//! On burn-flex, reading a tensor's values and wrapping a new buffer are copies at most (a
//! contiguous, unshared tensor is handed over without one), so [`forward`] and the autodiff
//! node of `kron::autodiff` (registered with the Kronecker apply's) run one pass each way
//! instead of flex's element-by-element maps. `quirks::gelu` and `quirks::silu` decide where
//! they are used.

use std::borrow::Cow;

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};

/// `Q`'s coefficients, lowest degree first, in `u = (8t − 5)/3` (`t ∈ [1/4, 1]` mapped to
/// `[−1, 1]`), from `scripts/fit_gelu.py`.
const Q: [f64; 12] = [
    0.6056598670464737,
    0.31210421337133143,
    0.08378962039179119,
    0.0025157211228875958,
    -0.0041818571948038195,
    -0.00015552529290111745,
    0.0003071917397530857,
    -2.3232101170164623e-05,
    -2.2652117268862094e-05,
    6.3599141470345366e-06,
    9.657006954089403e-07,
    -6.726278123367625e-07,
];

/// `z` beyond which `E` and `φ` are taken as 0 (the fit's range).
const Z_MAX: f64 = 6.0;

/// `exp(a)` for `a ∈ [−700, 0]`.
#[inline(always)]
fn exp(a: f64) -> f64 {
    // Round to nearest by adding and subtracting 1.5·2⁵² (no rounding instruction needed).
    const SHIFTER: f64 = 6_755_399_441_055_744.0;
    let shifted = a.mul_add(std::f64::consts::LOG2_E, SHIFTER);
    let k = shifted - SHIFTER;
    let r = (-k).mul_add(std::f64::consts::LN_2, a);
    // e^r, |r| ≤ ln 2 / 2, Taylor to degree 8, by Horner.
    let mut p: f64 = 1.0 / 40_320.0;
    for c in [
        1.0 / 5_040.0,
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ] {
        p = p.mul_add(r, c);
    }
    // 2^k from k's bits in the shifted value's low mantissa bits (k ∈ [−1010, 0]).
    let two_k =
        f64::from_bits((shifted.to_bits().wrapping_add(1023) << 52) & 0x7ff0_0000_0000_0000);
    p * two_k
}

/// `(Φ(x), exp(−x²/2))` in `f64`.
#[inline(always)]
fn phi_and_gauss(x: f32) -> (f64, f64) {
    let x = f64::from(x);
    let z = x.abs() * std::f64::consts::FRAC_1_SQRT_2;
    let beyond = z > Z_MAX;
    let z = z.min(Z_MAX);
    let t = 1.0 / 0.5f64.mul_add(z, 1.0);
    let u = t.mul_add(8.0 / 3.0, -5.0 / 3.0);
    let mut q = Q[11];
    for &c in Q[..11].iter().rev() {
        q = q.mul_add(u, c);
    }
    let gauss = if beyond { 0.0 } else { exp(-z * z) };
    let e = t * q * gauss;
    let cdf = if x < 0.0 {
        0.5 * e
    } else {
        (-0.5f64).mul_add(e, 1.0)
    };
    (cdf, gauss)
}

/// `x·Φ(x)`.
#[inline(always)]
fn gelu_one(x: f32) -> f32 {
    (f64::from(x) * phi_and_gauss(x).0) as f32
}

/// `g·(Φ(x) + x·φ(x))`.
#[inline(always)]
fn gelu_grad_one(x: f32, g: f32) -> f32 {
    const INV_SQRT_2PI: f64 = 0.398_942_280_401_432_7;
    let (cdf, gauss) = phi_and_gauss(x);
    (f64::from(g) * (f64::from(x) * INV_SQRT_2PI).mul_add(gauss, cdf)) as f32
}

/// `(σ(x), x)` in `f64`.
#[inline(always)]
fn sigmoid(x: f32) -> (f64, f64) {
    let x = f64::from(x);
    // Beyond |x| = 700, e (under 1e-304) is taken as 0: σ(−∞) = 0, as in x·sigmoid(x).
    let e = if x.abs() > 700.0 {
        0.0
    } else {
        exp((-x.abs()).max(-700.0))
    };
    let s = if x < 0.0 { e } else { 1.0 } / (1.0 + e);
    (s, x)
}

/// `x·σ(x)`.
#[inline(always)]
fn silu_one(x: f32) -> f32 {
    let (s, x) = sigmoid(x);
    (x * s) as f32
}

/// `g·σ(x)·(1 + x·(1 − σ(x)))`.
#[inline(always)]
fn silu_grad_one(x: f32, g: f32) -> f32 {
    let (s, x) = sigmoid(x);
    (f64::from(g) * s * x.mul_add(1.0 - s, 1.0)) as f32
}

/// The activation functions with a host kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum HostFn {
    /// `x·Φ(x)`, exact (erf-based).
    Gelu,
    /// `x·σ(x)`.
    Silu,
}

/// Does this CPU have AVX2 and FMA (the kernels compiled for them, here and in `kron::host`)?
pub(crate) fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Which of the host kernels runs (here and in `kron::host`): the portable loops, the ones
/// compiled for AVX2 and FMA, or for AVX-512F. Each gives the others' results bit for bit: the
/// same operations per value, in the same order (fused multiply-adds as `mul_add`), only more
/// values per instruction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Isa {
    Portable,
    Avx2,
    Avx512,
}

impl Isa {
    /// The widest this CPU runs.
    pub(crate) fn best() -> Self {
        if !has_avx2_fma() {
            return Isa::Portable;
        }
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            return Isa::Avx512;
        }
        Isa::Avx2
    }

    /// Every kernel this CPU runs, narrowest first.
    #[cfg(test)]
    pub(crate) fn available() -> Vec<Self> {
        let best = Self::best();
        [Isa::Portable, Isa::Avx2, Isa::Avx512]
            .into_iter()
            .filter(|&i| i as u8 <= best as u8)
            .collect()
    }
}

/// Runs `$body` (a loop over slices) compiled for `$isa`'s instructions: AVX-512F (eight `f64`
/// lanes), AVX2 and FMA (four), or the baseline target (where `mul_add` may be a library call:
/// correct, slower). The body is plain Rust that the compiler vectorizes for each.
macro_rules! dispatch {
    ($isa:expr, $name:ident, ($($arg:ident: $ty:ty),*), $body:expr) => {{
        #[inline(always)]
        fn body($($arg: $ty),*) {
            $body
        }
        let isa: $crate::act::Isa = $isa;
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx512f,avx2,fma")]
            unsafe fn wide($($arg: $ty),*) {
                body($($arg),*)
            }
            #[target_feature(enable = "avx2,fma")]
            unsafe fn $name($($arg: $ty),*) {
                body($($arg),*)
            }
            match isa {
                // SAFETY: `Isa::best` found AVX-512F, AVX2 and FMA on this CPU.
                $crate::act::Isa::Avx512 => return unsafe { wide($($arg),*) },
                // SAFETY: `Isa::best` found AVX2 and FMA on this CPU.
                $crate::act::Isa::Avx2 => return unsafe { $name($($arg),*) },
                $crate::act::Isa::Portable => {}
            }
        }
        let _ = isa;
        body($($arg),*)
    }};
}

pub(crate) use dispatch;

/// `out[i] = f(x[i])`.
pub(crate) fn apply_slice(isa: Isa, f: HostFn, x: &[f32], out: &mut [f32]) {
    dispatch!(isa, apply_avx2, (f: HostFn, x: &[f32], out: &mut [f32]), {
        match f {
            HostFn::Gelu => out.iter_mut().zip(x).for_each(|(o, &v)| *o = gelu_one(v)),
            HostFn::Silu => out.iter_mut().zip(x).for_each(|(o, &v)| *o = silu_one(v)),
        }
    })
}

/// `x[i] = f(x[i])`.
fn apply_in_place(isa: Isa, f: HostFn, x: &mut [f32]) {
    dispatch!(isa, apply_in_place_avx2, (f: HostFn, x: &mut [f32]), {
        match f {
            HostFn::Gelu => x.iter_mut().for_each(|v| *v = gelu_one(*v)),
            HostFn::Silu => x.iter_mut().for_each(|v| *v = silu_one(*v)),
        }
    })
}

/// `g[i] = g[i]·f'(x[i])`.
pub(crate) fn grad_in_place(isa: Isa, f: HostFn, x: &[f32], g: &mut [f32]) {
    dispatch!(isa, grad_avx2, (f: HostFn, x: &[f32], g: &mut [f32]), {
        match f {
            HostFn::Gelu => g.iter_mut().zip(x).for_each(|(d, &v)| *d = gelu_grad_one(v, *d)),
            HostFn::Silu => g.iter_mut().zip(x).for_each(|(d, &v)| *d = silu_grad_one(v, *d)),
        }
    })
}

/// Softmax over each row of `cols` values, in place: `x_i ← exp(x_i − m)/Σ_j exp(x_j − m)`
/// with `m` the row's largest value, the exponentials (the module's `exp`, `f64`) and their sum
/// in `f64`, each result rounded once to `f32`. An exponent below −700 counts as −700 (its
/// exponential, 1e-304, rounds to 0 in the quotient); a row holding NaN or +∞ gives NaN, as
/// the formula does. `scratch` holds a row's exponentials.
fn softmax_rows(isa: Isa, cols: usize, x: &mut [f32], scratch: &mut Vec<f64>) {
    dispatch!(isa, softmax_avx2, (cols: usize, x: &mut [f32], scratch: &mut Vec<f64>), {
        scratch.resize(cols, 0.0);
        for row in x.chunks_exact_mut(cols) {
            // Sixteen running maxima and eight running sums, so that the loops vectorize the
            // same way in every build (the order of the sums is the source's, not the lanes').
            let mut m = [f32::NEG_INFINITY; 16];
            let mut blocks = row.chunks_exact(16);
            for b in &mut blocks {
                m.iter_mut().zip(b).for_each(|(m, &v)| *m = m.max(v));
            }
            let mut max = blocks.remainder().iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
            max = m.iter().fold(max, |a, &v| a.max(v));
            let max = f64::from(max);
            for (e, &v) in scratch.iter_mut().zip(row.iter()) {
                // (Not `max(-700.0)`, which would turn a NaN into −700.)
                let a = f64::from(v) - max;
                *e = exp(if a < -700.0 { -700.0 } else { a });
            }
            let mut sums = [0f64; 8];
            let mut blocks = scratch.chunks_exact(8);
            for b in &mut blocks {
                sums.iter_mut().zip(b).for_each(|(s, &e)| *s += e);
            }
            let sum = blocks.remainder().iter().sum::<f64>() + sums.iter().sum::<f64>();
            for (v, &e) in row.iter_mut().zip(scratch.iter()) {
                *v = (e / sum) as f32;
            }
        }
    })
}

/// Softmax's backward over each row of `cols` values, from its output `y`, in place on the
/// output's gradient: `g_i ← y_i·(g_i − Σ_j g_j·y_j)`, the sum and the product in `f64`,
/// rounded once.
fn softmax_grad_rows(isa: Isa, cols: usize, y: &[f32], g: &mut [f32]) {
    dispatch!(isa, softmax_grad_avx2, (cols: usize, y: &[f32], g: &mut [f32]), {
        for (yr, gr) in y.chunks_exact(cols).zip(g.chunks_exact_mut(cols)) {
            let mut sums = [0f64; 8];
            let (mut yb, mut gb) = (yr.chunks_exact(8), gr.chunks_exact(8));
            for (a, b) in (&mut yb).zip(&mut gb) {
                for k in 0..8 {
                    sums[k] += f64::from(a[k]) * f64::from(b[k]);
                }
            }
            let tail = yb.remainder().iter().zip(gb.remainder());
            let s = tail.map(|(&a, &b)| f64::from(a) * f64::from(b)).sum::<f64>()
                + sums.iter().sum::<f64>();
            for (gv, &yv) in gr.iter_mut().zip(yr) {
                *gv = (f64::from(yv) * (f64::from(*gv) - s)) as f32;
            }
        }
    })
}

/// Softmax's gradient over rows of `cols` values from its output's values `y` and the output's
/// gradient `g` (in place on `g`'s values; the autodiff node's backward).
pub(crate) fn softmax_backward<B: Backend>(
    cols: usize,
    y: &TensorData,
    g: Tensor<B, 1>,
) -> Tensor<B, 1> {
    use rayon::prelude::*;
    let device = g.device();
    let mut gd = values(g);
    let y = floats(y);
    if cols > 0 {
        let isa = Isa::best();
        (slice_mut(&mut gd).par_chunks_mut(SOFTMAX_ROWS * cols))
            .zip(y.par_chunks(SOFTMAX_ROWS * cols))
            .for_each(|(g, y)| softmax_grad_rows(isa, cols, y, g));
    }
    Tensor::from_data(gd, &device)
}

/// Rows per task of [`softmax_last`]'s split over threads (fixed: each row's result does not
/// depend on the split).
const SOFTMAX_ROWS: usize = 64;

/// Softmax over `x`'s last dimension by [`softmax_rows`] (in place where `x` is not shared,
/// rows split over rayon's threads), for inference on flex, whose own softmax calls libm's
/// scalar `expf` once per value.
pub(crate) fn softmax_last<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    use rayon::prelude::*;
    let device = x.device();
    let cols = x.dims()[D - 1];
    let mut data = values(x);
    if cols > 0 {
        let isa = Isa::best();
        slice_mut(&mut data)
            .par_chunks_mut(SOFTMAX_ROWS * cols)
            .for_each_init(Vec::new, |scratch, rows| {
                softmax_rows(isa, cols, rows, scratch)
            });
    }
    Tensor::from_data(data, &device)
}

/// [`softmax_last`] of `x + adds`: row `i` of `x` (`[b, h, rows, cols]` in row order) has row
/// `add_row(i)` of `adds` (`cols` values a row) added before its softmax, in place and in the
/// same pass — the attention's mask, broadcast over heads, without expanding it (flex).
pub(crate) fn softmax_last_added<B: Backend>(
    x: Tensor<B, 4>,
    adds: &[f32],
    add_row: impl Fn(usize) -> usize + Sync,
) -> Tensor<B, 4> {
    use rayon::prelude::*;
    let device = x.device();
    let cols = x.dims()[3];
    let mut data = values(x);
    if cols > 0 {
        let isa = Isa::best();
        slice_mut(&mut data)
            .par_chunks_mut(SOFTMAX_ROWS * cols)
            .enumerate()
            .for_each_init(Vec::new, |scratch, (chunk, rows)| {
                for (k, row) in rows.chunks_exact_mut(cols).enumerate() {
                    let add = &adds[add_row(chunk * SOFTMAX_ROWS + k) * cols..][..cols];
                    row.iter_mut().zip(add).for_each(|(x, a)| *x += a);
                }
                softmax_rows(isa, cols, rows, scratch)
            });
    }
    Tensor::from_data(data, &device)
}

/// Does this tensor hold `f32` (the kernels' type)?
pub(crate) fn is_f32<B: Backend, const D: usize>(t: &Tensor<B, D>) -> bool {
    t.dtype() == burn::tensor::DType::F32
}

/// A tensor's values, `f32` (checked by the callers, [`is_f32`]): on flex handed over without a
/// copy when the tensor is contiguous and not shared.
pub(crate) fn values<B: Backend, const D: usize>(t: Tensor<B, D>) -> TensorData {
    t.into_data()
}

/// The values of `data` as `f32` (the callers check the type), borrowed where the buffer is
/// aligned for them (flex's always is), copied otherwise.
pub(crate) fn floats(data: &TensorData) -> Cow<'_, [f32]> {
    match data.as_slice::<f32>() {
        Ok(values) => Cow::Borrowed(values),
        Err(_) => Cow::Owned(
            data.to_vec::<f32>()
                .expect("the host kernels run on f32 tensors only (quirks checks)"),
        ),
    }
}

pub(crate) fn slice_mut(data: &mut TensorData) -> &mut [f32] {
    data.as_mut_slice::<f32>()
        .expect("the host kernels run on f32 tensors only (quirks checks)")
}

/// `f(x)` through the host kernel, in place on `x`'s values (no autodiff: the result is a new
/// leaf).
pub(crate) fn forward<B: Backend, const D: usize>(f: HostFn, x: Tensor<B, D>) -> Tensor<B, D> {
    let device = x.device();
    let mut data = values(x);
    apply_in_place(Isa::best(), f, slice_mut(&mut data));
    Tensor::from_data(data, &device)
}

/// `f` of the values `x` into a new tensor (the autodiff node's forward, which keeps `x`).
pub(crate) fn forward_kept<B: Backend>(
    f: HostFn,
    x: &TensorData,
    device: &B::Device,
) -> Tensor<B, 1> {
    let xs = floats(x);
    let mut out = vec![0f32; xs.len()];
    apply_slice(Isa::best(), f, &xs, &mut out);
    Tensor::from_data(TensorData::new(out, [xs.len()]), device)
}

/// `g·f'(x)` through the host kernel, in place on `g`'s values.
pub(crate) fn backward<B: Backend>(f: HostFn, x: &TensorData, g: Tensor<B, 1>) -> Tensor<B, 1> {
    let device = g.device();
    let mut gd = values(g);
    grad_in_place(Isa::best(), f, &floats(x), slice_mut(&mut gd));
    Tensor::from_data(gd, &device)
}

#[cfg(test)]
mod tests {
    use super::{apply_in_place, apply_slice, exp, grad_in_place, softmax_rows, HostFn, Isa};

    #[test]
    fn exp_matches_std_over_its_range() {
        let mut worst = 0f64;
        for i in 0..=700_000 {
            let a = -700.0 + i as f64 * 1e-3;
            worst = worst.max((exp(a) - a.exp()).abs() / a.exp());
        }
        assert!(worst < 3e-10, "relative error {worst}");
    }

    /// `x·Φ(x)`, and the two terms of `Φ(x) + x·φ(x)`, in `f64` from libm's `erfc` (fdlibm,
    /// under 1 ulp).
    fn reference(x: f32) -> (f64, f64, f64) {
        let x = f64::from(x);
        let cdf = 0.5 * libm::erfc(-x * std::f64::consts::FRAC_1_SQRT_2);
        let pdf = (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt();
        (x * cdf, cdf, x * pdf)
    }

    /// `got` is `want` rounded to `f32` (half an `f32` ulp, and 1e-9 of `want` for the `f64`
    /// evaluation's own error), plus `slack`.
    fn assert_close(got: f32, want: f64, slack: f64, what: &str, x: f32) {
        let tol = want.abs() * (0.5 * f64::from(f32::EPSILON) + 1e-9) + slack;
        assert!(
            (f64::from(got) - want).abs() <= tol.max(1e-37),
            "{what}({x}) = {got}, exact {want}"
        );
    }

    /// A dense sweep of `[−20, 20]` and random finite floats of every magnitude, with random
    /// output gradients.
    fn samples() -> (Vec<f32>, Vec<f32>) {
        let mut xs: Vec<f32> = (0..=400_000).map(|i| -20.0 + i as f32 * 1e-4).collect();
        let mut s = 0x9e37_79b9_7f4a_7c15u64;
        xs.extend((0..200_000).filter_map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let v = f32::from_bits((s >> 32) as u32);
            (v.is_finite() && v.abs() < 1e30).then_some(v)
        }));
        let gs: Vec<f32> = xs.iter().map(|x| 0.5 + (x * 7.0).sin()).collect();
        (xs, gs)
    }

    /// `f(x)` (checked equal in place and into a new buffer) and `g·f'(x)` by the widest
    /// kernel, checked equal bit for bit to every narrower kernel's (the portable loops, AVX2).
    fn run(f: HostFn, xs: &[f32], gs: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        let by = |isa: Isa| {
            let mut y = vec![0f32; xs.len()];
            apply_slice(isa, f, xs, &mut y);
            let mut in_place = xs.to_vec();
            apply_in_place(isa, f, &mut in_place);
            assert!(
                bits(&in_place) == bits(&y),
                "{f:?} in place and into a new buffer alike ({isa:?})"
            );
            let mut d = gs.to_vec();
            grad_in_place(isa, f, xs, &mut d);
            (y, d)
        };
        let (y, d) = by(Isa::best());
        for isa in Isa::available() {
            let (yi, di) = by(isa);
            // (`assert!`: the vectors are too long to print.)
            assert!(
                bits(&yi) == bits(&y),
                "{f:?}: {isa:?} against {:?}",
                Isa::best()
            );
            assert!(
                bits(&di) == bits(&d),
                "{f:?}': {isa:?} against {:?}",
                Isa::best()
            );
        }
        (y, d)
    }

    #[test]
    fn silu_and_its_derivative_are_correctly_rounded() {
        let (xs, gs) = samples();
        let (y, d) = run(HostFn::Silu, &xs, &gs);
        for i in 0..xs.len() {
            let (x, g) = (f64::from(xs[i]), f64::from(gs[i]));
            let s = 1.0 / (1.0 + (-x).exp());
            assert_close(y[i], x * s, 0.0, "silu", xs[i]);
            // The derivative's terms cancel near x = −1.28, as GELU's near −0.75.
            let terms = g.abs() * s * (1.0 + (x * (1.0 - s)).abs());
            assert_close(
                d[i],
                g * s * (1.0 + x * (1.0 - s)),
                1e-9 * terms,
                "g·silu'",
                xs[i],
            );
        }
        let mut y = [0f32; 4];
        apply_slice(
            Isa::best(),
            HostFn::Silu,
            &[f32::INFINITY, f32::NEG_INFINITY, f32::NAN, -0.0],
            &mut y,
        );
        assert_eq!(y[0], f32::INFINITY);
        assert!(
            y[1].is_nan() && y[2].is_nan(),
            "−∞·σ(−∞) = −∞·0, as x·sigmoid(x)"
        );
        assert_eq!(y[3], 0.0);
    }

    #[test]
    fn gelu_and_its_derivative_are_correctly_rounded() {
        let (xs, gs) = samples();
        let (y, d) = run(HostFn::Gelu, &xs, &gs);
        for i in 0..xs.len() {
            let (x, g) = (xs[i], f64::from(gs[i]));
            let (f, cdf, xpdf) = reference(x);
            // Far left (|x|/√2 > 6, x < −8.48) the kernel gives 0 for values under 1e-15.
            let tail = if x < -8.4 { 1e-15 } else { 0.0 };
            assert_close(y[i], f, tail, "gelu", x);
            // The derivative's two terms cancel near x = −0.75: the f64 evaluation's own
            // error (1e-10 of the terms) can show there, far below f32's resolution of them.
            let terms = g.abs() * (cdf.abs() + xpdf.abs());
            assert_close(d[i], g * (cdf + xpdf), tail + 1e-9 * terms, "g·gelu'", x);
        }
    }

    #[test]
    fn special_values_behave_like_the_formula() {
        let xs = [
            0.0f32,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            -20.0,
            20.0,
        ];
        let mut y = [0f32; 7];
        apply_slice(Isa::best(), HostFn::Gelu, &xs, &mut y);
        assert_eq!(y[0], 0.0);
        assert_eq!(y[1], 0.0);
        assert_eq!(y[2], f32::INFINITY);
        assert!(y[3].is_nan(), "−∞·Φ(−∞) = −∞·0, as flex's own GELU");
        assert!(y[4].is_nan());
        assert_eq!(y[5], 0.0);
        assert_eq!(y[6], 20.0);
        let mut d = [1f32; 7];
        grad_in_place(Isa::best(), HostFn::Gelu, &xs, &mut d);
        assert_eq!(d[0], 0.5);
        assert_eq!(d[5], 0.0);
        assert_eq!(d[6], 1.0);
    }

    /// Softmax rows of several widths (under 8, between the blocks, long), with masked
    /// entries (−1e4, −∞), large and tiny values: each result within half an `f32` ulp of the
    /// `f64` formula (std's `exp`), rows summing to 1, and every build's results the widest's.
    #[test]
    fn softmax_rows_are_correctly_rounded() {
        let mut s = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 11) as f64 / (1u64 << 53) as f64
        };
        for cols in [1, 5, 16, 23, 64, 100, 333] {
            let rows = 40;
            let xs: Vec<f32> = (0..rows * cols)
                .map(|i| match i % 97 {
                    3 => -1e4,
                    7 if i % cols != 0 => f32::NEG_INFINITY,
                    _ => ((next() - 0.5) * 60.0) as f32,
                })
                .collect();
            let by = |isa| {
                let mut y = xs.clone();
                softmax_rows(isa, cols, &mut y, &mut Vec::new());
                y
            };
            let y = by(Isa::best());
            for isa in Isa::available() {
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert!(bits(&by(isa)) == bits(&y), "{isa:?}, {cols} columns");
            }
            for (xr, yr) in xs.chunks(cols).zip(y.chunks(cols)) {
                let max = xr
                    .iter()
                    .fold(f64::NEG_INFINITY, |a, &v| a.max(f64::from(v)));
                let es: Vec<f64> = xr.iter().map(|&v| (f64::from(v) - max).exp()).collect();
                let sum: f64 = es.iter().sum();
                for ((&x, &got), e) in xr.iter().zip(yr).zip(&es) {
                    assert_close(got, e / sum, 1e-300, "softmax", x);
                }
                let total: f64 = yr.iter().map(|&v| f64::from(v)).sum();
                assert!(
                    (total - 1.0).abs() < 1e-5 * cols as f64,
                    "{cols} columns sum to {total}"
                );
            }
        }
        // The backward from the output: `y·(g − Σ g·y)` to half an ulp of the f64 formula
        // (plus the sum's cancellation), every build the widest's.
        for cols in [1, 7, 64, 100] {
            let mut y: Vec<f32> = (0..30 * cols)
                .map(|_| ((next() - 0.5) * 8.0) as f32)
                .collect();
            softmax_rows(Isa::best(), cols, &mut y, &mut Vec::new());
            let g: Vec<f32> = (0..30 * cols)
                .map(|_| ((next() - 0.5) * 4.0) as f32)
                .collect();
            let by = |isa| {
                let mut d = g.clone();
                super::softmax_grad_rows(isa, cols, &y, &mut d);
                d
            };
            let d = by(Isa::best());
            for isa in Isa::available() {
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert!(
                    bits(&by(isa)) == bits(&d),
                    "backward, {isa:?}, {cols} columns"
                );
            }
            for ((yr, gr), dr) in y.chunks(cols).zip(g.chunks(cols)).zip(d.chunks(cols)) {
                let s: f64 = yr
                    .iter()
                    .zip(gr)
                    .map(|(&a, &b)| f64::from(a) * f64::from(b))
                    .sum();
                let mag: f64 = yr
                    .iter()
                    .zip(gr)
                    .map(|(&a, &b)| f64::from(a * b).abs())
                    .sum();
                for ((&yv, &gv), &got) in yr.iter().zip(gr).zip(dr) {
                    let want = f64::from(yv) * (f64::from(gv) - s);
                    assert_close(got, want, 1e-12 * f64::from(yv) * mag, "softmax'", gv);
                }
            }
        }
        // NaN or +∞ in a row: NaN throughout; a row of −∞ alone: NaN (0/0), as the formula.
        for bad in [f32::NAN, f32::INFINITY] {
            let mut y = vec![0.5, bad, -1.0];
            softmax_rows(Isa::best(), 3, &mut y, &mut Vec::new());
            assert!(y.iter().all(|v| v.is_nan()), "{bad} gives {y:?}");
        }
        let mut y = vec![f32::NEG_INFINITY; 4];
        softmax_rows(Isa::best(), 4, &mut y, &mut Vec::new());
        assert!(y.iter().all(|v| v.is_nan()));
    }
}
