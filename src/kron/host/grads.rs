//! The backward of a whole Kronecker apply on the host, for training on burn-flex: every
//! step's gradients from one pass over the rows, a chunk of rows at a time, its intermediates in
//! buffers of the chunk's own that stay in the cache.
//!
//! By Burn's products, a `b` step's two gradients are two `gemm` calls over all `n·p` rows of
//! a 24-column intermediate (MiniLM's `b`), each allocating and clearing its output, and the
//! recomputed intermediates go through memory between the steps. Here, per chunk of rows:
//!
//! 1. the inputs of the steps after the first are recomputed (as [`super::rows_into`] would);
//! 2. the steps are differentiated last to first from the output's gradient `G`:
//!    - `Side::B`, `out = I·f` (`I [m, q]`, the chunk's `m = rows·p` rows): `∂f += Iᵀ·G` and
//!      `∂I = G·fᵀ`, both [`super::contract_strided`]'s kernel with the chunk as one long row
//!      (`∂f`: eight of its rows summed over all `m` at once);
//!    - `Side::A`, `out[r] = fᵀ·I[r]`: `∂f += Σ_r I[r]·G[r]ᵀ` by `grad_factor`'s blocks, `∂I[r]
//!      = f·G[r]` by the kernel with `f` read through strides;
//!
//!    the first step's `∂I` is `∂T`, written in place.
//!
//! Rows go in fixed groups (at most [`GROUPS`]), each group's factor gradients summed on their
//! own and the groups' sums added in order, so the result never depends on the number of
//! threads.

use std::borrow::Cow;
use std::mem::MaybeUninit;
use std::ops::Range;

use rayon::prelude::*;

use super::{add_lanes, as_uninit, contract_strided, grad_factor_add, grad_factor_lanes};
use super::{chain_dims, in_turn, step_rows, HostStep, Isa};
use super::{CHUNK_FLOATS, PARALLEL_MACS};
use crate::kron::Side;

/// The most groups of rows whose factor gradients are summed apart (and split over threads).
const GROUPS: usize = 16;

/// The gradients of `out = T` through `steps` (as [`super::rows_into`] computes it) from the
/// output's gradient `g`: of each factor `i` where `want[i]`, and of `T` into `dt` where given.
///
/// `t(rows)` gives the values of those rows of `T` (a group's at a time, so that a caller
/// who must copy them copies a group's rows, not the whole input at once).
///
/// # Shapes
/// - `t(rows)`: `[rows.len(), p, q]`
/// - `g`: `[n, p_last, q_last]`
/// - `dt`: `[n, p, q]`
/// - output: one `[rows, cols]` gradient per factor (`None` where not wanted), row-major
///
/// # Panics
/// If the shapes do not chain or the lengths do not match them.
#[allow(clippy::too_many_arguments)]
pub(crate) fn steps_grads<'t>(
    isa: Isa,
    t: impl Fn(Range<usize>) -> Cow<'t, [f32]> + Sync,
    g: &[f32],
    [n, p, q]: [usize; 3],
    steps: &[HostStep],
    want: &[bool],
    dt: Option<&mut [MaybeUninit<f32>]>,
) -> Vec<Option<Vec<f32>>> {
    assert_eq!(want.len(), steps.len(), "one flag per step");
    // The `[p, q]` of each step's input, and of the output last.
    let (dims, macs) = chain_dims(p, q, steps);
    let size = |(a, b): (usize, usize)| a * b;
    let (row_t, row_g) = (size(dims[0]), size(dims[steps.len()]));
    assert!(row_t > 0 && row_g > 0, "rows of some values");
    assert_eq!(g.len(), n * row_g, "g is [n, p_last, q_last]");
    if let Some(dt) = &dt {
        assert_eq!(dt.len(), n * row_t, "dt is [n, p, q]");
    }
    let largest = dims.iter().copied().map(size).max().unwrap_or(1);
    let chunk = (CHUNK_FLOATS / largest).max(1);
    let group = n.div_ceil(GROUPS).div_ceil(chunk).max(1) * chunk;
    // `fᵀ` of each `b` step, row-major (`∂I = G·fᵀ` reads it as the kernel's one row).
    let transposed: Vec<Vec<f32>> = steps
        .iter()
        .map(|s| match s.side {
            Side::A => Vec::new(),
            Side::B => {
                let [rows, cols] = s.dims;
                (0..rows * cols)
                    .map(|x| s.f[(x % rows) * cols + x / rows])
                    .collect()
            }
        })
        .collect();
    let plan = Plan {
        isa,
        steps,
        dims: &dims,
        want,
        transposed: &transposed,
        chunk,
        rows: [row_t, row_g, largest],
    };
    let zeros = || -> Vec<Vec<f32>> {
        (steps.iter().zip(want))
            .map(|(s, &w)| if w { vec![0.0; s.f.len()] } else { Vec::new() })
            .collect()
    };
    let run = |(rows, g, dt): Part| {
        let mut sums = zeros();
        let t = t(rows);
        assert_eq!(t.len(), g.len() / row_g * row_t, "t is [n, p, q]");
        plan.group(&t, g, dt, &mut sums);
        sums
    };
    let ts = (0..n)
        .step_by(group)
        .map(|start| start..(start + group).min(n));
    let gs = g.chunks(group * row_g);
    let dts: Vec<Option<&mut [MaybeUninit<f32>]>> = match dt {
        Some(dt) => dt.chunks_mut(group * row_t).map(Some).collect(),
        None => (0..n.div_ceil(group)).map(|_| None).collect(),
    };
    let parts: Vec<Part> = ts.zip(gs).zip(dts).map(|((t, g), dt)| (t, g, dt)).collect();
    let sums: Vec<Vec<Vec<f32>>> = if n * macs >= PARALLEL_MACS {
        parts.into_par_iter().map(run).collect()
    } else {
        parts.into_iter().map(run).collect()
    };
    let mut total = zeros();
    for part in &sums {
        for (acc, s) in total.iter_mut().zip(part) {
            acc.iter_mut().zip(s).for_each(|(a, v)| *a += v);
        }
    }
    total
        .into_iter()
        .zip(want)
        .map(|(v, &w)| w.then_some(v))
        .collect()
}

/// A group of rows: which rows, their `G`, and where their `∂T` goes.
type Part<'a> = (Range<usize>, &'a [f32], Option<&'a mut [MaybeUninit<f32>]>);

/// What every chunk shares: the steps, their inputs' dimensions, the gradients wanted.
struct Plan<'a> {
    isa: Isa,
    steps: &'a [HostStep<'a>],
    /// `[p, q]` of each step's input, then of the output.
    dims: &'a [(usize, usize)],
    want: &'a [bool],
    /// `fᵀ` of each `b` step (empty for `a` steps).
    transposed: &'a [Vec<f32>],
    /// Rows per chunk.
    chunk: usize,
    /// Values of a row of `T`, of `G`, and of the largest of a row's intermediates.
    rows: [usize; 3],
}

impl Plan<'_> {
    /// One group of rows, a chunk at a time, its factor gradients added to `sums`.
    fn group(
        &self,
        t: &[f32],
        g: &[f32],
        mut dt: Option<&mut [MaybeUninit<f32>]>,
        sums: &mut [Vec<f32>],
    ) {
        let [row_t, row_g, largest] = self.rows;
        // The recomputed inputs of steps 1.., and two buffers for the gradients between steps.
        let mut inputs: Vec<Vec<f32>> = self.dims[1..self.steps.len()]
            .iter()
            .map(|&(a, b)| vec![0.0; self.chunk * a * b])
            .collect();
        let mut bufs = [
            vec![0.0; self.chunk * largest],
            vec![0.0; self.chunk * largest],
        ];
        // With AVX-512, each `a` factor's gradient in sixteen lanes per entry, added up at the
        // end of the group.
        let mut lanes: Vec<Vec<f32>> = (self.steps.iter().zip(self.want))
            .map(|(s, &w)| {
                let wide = w && s.side == Side::A && self.isa == Isa::Avx512;
                if wide {
                    vec![0.0; s.f.len() * 16]
                } else {
                    Vec::new()
                }
            })
            .collect();
        let rows = t.len() / row_t;
        let mut start = 0;
        while start < rows {
            let end = (start + self.chunk).min(rows);
            let dt_chunk = dt
                .as_deref_mut()
                .map(|dt| &mut dt[start * row_t..end * row_t]);
            self.chunk_grads(
                &t[start * row_t..end * row_t],
                &g[start * row_g..end * row_g],
                end - start,
                dt_chunk,
                (sums, &mut lanes),
                &mut inputs,
                &mut bufs,
            );
            start = end;
        }
        for (sum, lanes) in sums.iter_mut().zip(&lanes) {
            if !lanes.is_empty() {
                add_lanes(lanes, sum);
            }
        }
    }

    /// One chunk of `rows` rows: the recomputed inputs, then the steps' gradients last to first.
    #[allow(clippy::too_many_arguments)]
    fn chunk_grads(
        &self,
        t: &[f32],
        g: &[f32],
        rows: usize,
        dt: Option<&mut [MaybeUninit<f32>]>,
        (sums, lanes): (&mut [Vec<f32>], &mut [Vec<f32>]),
        inputs: &mut [Vec<f32>],
        bufs: &mut [Vec<f32>; 2],
    ) {
        let isa = self.isa;
        let n_steps = self.steps.len();
        // Inputs are needed up to the last step whose factor wants a gradient.
        let needed = self.want.iter().rposition(|&w| w).unwrap_or(0);
        for i in 0..needed {
            let (pp, qq) = self.dims[i];
            let (p2, q2) = self.dims[i + 1];
            let (before, after) = inputs.split_at_mut(i);
            let src: &[f32] = match before.last() {
                Some(buf) => &buf[..rows * pp * qq],
                None => t,
            };
            let dst = as_uninit(&mut after[0][..rows * p2 * q2]);
            step_rows::<false>(isa, &self.steps[i], src, rows, (pp, qq), dst);
        }
        let mut dt = dt;
        // Where the current gradient is: `g`, or `bufs[c]`.
        let mut cur: Option<usize> = None;
        for i in (0..n_steps).rev() {
            let s = &self.steps[i];
            let (pp, qq) = self.dims[i];
            let (po, qo) = self.dims[i + 1];
            let (gi, write, w) = in_turn(bufs, cur, g, rows * po * qo);
            if self.want[i] {
                let input: &[f32] = if i == 0 {
                    t
                } else {
                    &inputs[i - 1][..rows * pp * qq]
                };
                let sum = &mut sums[i];
                match s.side {
                    // ∂f = Iᵀ·G over the chunk's `rows·pp` rows: `I` as the kernel's factor
                    // (`[m, qq]` row-major), `G` as its one row `[m, qo]`.
                    Side::B => {
                        let m = rows * pp;
                        contract_strided::<true>(
                            isa,
                            input,
                            m,
                            qq,
                            [qq, 1],
                            gi,
                            1,
                            qo,
                            as_uninit(sum),
                        )
                    }
                    Side::A if !lanes[i].is_empty() => {
                        grad_factor_lanes(input, gi, pp, po, qq, &mut lanes[i])
                    }
                    Side::A => grad_factor_add(isa != Isa::Portable, input, gi, pp, po, qq, sum),
                }
            }
            let earlier = dt.is_some() || self.want[..i].iter().any(|&w| w);
            if !earlier {
                return;
            }
            let out: &mut [MaybeUninit<f32>] = if i == 0 {
                match dt.as_deref_mut() {
                    Some(dt) => dt,
                    None => return,
                }
            } else {
                as_uninit(&mut write[..rows * pp * qq])
            };
            match s.side {
                // ∂I = G·fᵀ: `G` as the factor (`G[m, l]` at `l + m·qo`), `fᵀ` the one row.
                Side::B => {
                    let m = rows * pp;
                    let ft = &self.transposed[i];
                    contract_strided::<false>(isa, gi, qo, m, [1, qo], ft, 1, qq, out)
                }
                // ∂I[r] = f·G[r]: `f [pp, po]` read as `fᵀ` (`f[ii, j]` at `j + ii·po`).
                Side::A => contract_strided::<false>(isa, s.f, po, pp, [1, po], gi, rows, qq, out),
            }
            cur = Some(w);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;
    use std::mem::MaybeUninit;
    use std::ops::Range;

    use super::{steps_grads, HostStep, Isa, Side, CHUNK_FLOATS, GROUPS, PARALLEL_MACS};
    use crate::kron::host::tests::values;

    /// `T` through `steps` and back in `f64`: the factors' gradients and `∂T` under the output
    /// gradient `g`, row by row.
    fn reference(
        t: &[f64],
        g: &[f64],
        [n, p, q]: [usize; 3],
        steps: &[(Vec<f64>, [usize; 2], Side)],
    ) -> (Vec<Vec<f64>>, Vec<f64>) {
        let mut grads: Vec<Vec<f64>> = steps.iter().map(|s| vec![0.0; s.0.len()]).collect();
        let mut dt = vec![0.0; t.len()];
        let row_g = g.len() / n.max(1);
        for r in 0..n {
            let mut ins = vec![(t[r * p * q..(r + 1) * p * q].to_vec(), p, q)];
            for (f, [_, cols], side) in steps {
                let (cur, pp, qq) = ins.last().unwrap().clone();
                let cur = &cur;
                let next = match side {
                    Side::A => {
                        let v = (0..cols * qq)
                            .map(|x| {
                                (0..pp).map(move |i| f[i * cols + x / qq] * cur[i * qq + x % qq])
                            })
                            .map(Iterator::sum)
                            .collect();
                        (v, *cols, qq)
                    }
                    Side::B => {
                        let v = (0..pp * cols)
                            .map(|x| {
                                (0..qq)
                                    .map(move |k| cur[x / cols * qq + k] * f[k * cols + x % cols])
                            })
                            .map(Iterator::sum)
                            .collect();
                        (v, pp, *cols)
                    }
                };
                ins.push(next);
            }
            let mut gr = g[r * row_g..(r + 1) * row_g].to_vec();
            for (i, (f, [_, cols], side)) in steps.iter().enumerate().rev() {
                let (input, pp, qq) = &ins[i];
                let (pp, qq, cols) = (*pp, *qq, *cols);
                let mut gi = vec![0.0; pp * qq];
                match side {
                    Side::A => {
                        for ii in 0..pp {
                            for j in 0..cols {
                                for k in 0..qq {
                                    grads[i][ii * cols + j] += input[ii * qq + k] * gr[j * qq + k];
                                    gi[ii * qq + k] += f[ii * cols + j] * gr[j * qq + k];
                                }
                            }
                        }
                    }
                    Side::B => {
                        for ii in 0..pp {
                            for k in 0..qq {
                                for l in 0..cols {
                                    grads[i][k * cols + l] +=
                                        input[ii * qq + k] * gr[ii * cols + l];
                                    gi[ii * qq + k] += gr[ii * cols + l] * f[k * cols + l];
                                }
                            }
                        }
                    }
                }
                gr = gi;
            }
            dt[r * p * q..(r + 1) * p * q].copy_from_slice(&gr);
        }
        (grads, dt)
    }

    /// Every step order of one `a` and one or two `b` factors (KronA and Kron-LoRA), every
    /// kernel, several chunks and groups of rows split over threads, and a subset of the
    /// gradients wanted: each value within 1e-5 of the magnitude of its terms (the same
    /// reference over absolute values), and the same bits on one thread as on many.
    #[test]
    fn every_gradient_matches_f64_loops_for_every_order() {
        let (p, q) = (6, 9);
        let a = (values(6 * 5, 1), [6, 5]);
        let b1 = (values(9 * 8, 2), [9, 8]);
        let b2 = (values(8 * 11, 3), [8, 11]);
        let orders: [&[(Side, usize)]; 5] = [
            &[(Side::A, 0), (Side::B, 1)],
            &[(Side::B, 1), (Side::A, 0)],
            &[(Side::A, 0), (Side::B, 1), (Side::B, 2)],
            &[(Side::B, 1), (Side::A, 0), (Side::B, 2)],
            &[(Side::B, 1), (Side::B, 2), (Side::A, 0)],
        ];
        // Enough rows for several groups of several chunks, and to split over threads.
        let n = 1 + PARALLEL_MACS / (6 * 9 * 8);
        assert!(n > GROUPS * (CHUNK_FLOATS / (6 * 11)));
        let t = values(n * p * q, 4);
        for order in orders {
            let factors: Vec<_> = order
                .iter()
                .map(|&(side, which)| {
                    let (f, dims) = [&a, &b1, &b2][which];
                    (f, *dims, side)
                })
                .collect();
            let steps: Vec<HostStep> = factors
                .iter()
                .map(|&(f, dims, side)| HostStep { f, dims, side })
                .collect();
            let (pl, ql) = *super::super::chain_dims(p, q, &steps).0.last().unwrap();
            let g = values(n * pl * ql, 5);
            let as64 = |v: &[f32], abs: bool| -> Vec<f64> {
                v.iter()
                    .map(|&x| if abs { x.abs() } else { x } as f64)
                    .collect()
            };
            let refs = |abs: bool| {
                let st: Vec<_> = factors
                    .iter()
                    .map(|&(f, dims, side)| (as64(f, abs), dims, side))
                    .collect();
                reference(&as64(&t, abs), &as64(&g, abs), [n, p, q], &st)
            };
            let ((want_f, want_t), (mag_f, mag_t)) = (refs(false), refs(true));
            // Everything, and only the second factor without `∂T`.
            let cases: [(&[bool], bool); 2] = [
                (&[true; 3][..steps.len()], true),
                (&[false, true, false][..steps.len()], false),
            ];
            for isa in Isa::available() {
                for (want, with_t) in cases {
                    let what = format!("{order:?}, {isa:?}, wanted {want:?}");
                    let run = || {
                        let mut dt = vec![MaybeUninit::new(f32::NAN); n * p * q];
                        let dt_arg = with_t.then_some(&mut dt[..]);
                        let t = |r: Range<usize>| Cow::Borrowed(&t[r.start * p * q..r.end * p * q]);
                        let grads = steps_grads(isa, t, &g, [n, p, q], &steps, want, dt_arg);
                        // SAFETY: initialized before the call.
                        let dt: Vec<f32> = dt.iter().map(|v| unsafe { v.assume_init() }).collect();
                        (grads, dt)
                    };
                    let (grads, dt) = run();
                    let one = rayon::ThreadPoolBuilder::new()
                        .num_threads(1)
                        .build()
                        .unwrap();
                    let (grads1, dt1) = one.install(run);
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&dt), bits(&dt1), "{what}: ∂T on one thread");
                    for (x, y) in grads.iter().zip(&grads1) {
                        let (x, y) = (x.as_deref().map(bits), y.as_deref().map(bits));
                        assert_eq!(x, y, "{what}: ∂f on one thread");
                    }
                    let check = |got: &[f32], want: &[f64], mag: &[f64], name: &str| {
                        assert_eq!(got.len(), want.len(), "{what}: {name}");
                        for (i, ((&x, &w), &m)) in got.iter().zip(want).zip(mag).enumerate() {
                            assert!(
                                (x as f64 - w).abs() <= 1e-5 * m,
                                "{what}: {name} entry {i}: {x} against {w} (magnitude {m})"
                            );
                        }
                    };
                    if with_t {
                        check(&dt, &want_t, &mag_t, "∂T");
                    } else {
                        assert!(dt.iter().all(|v| v.is_nan()), "{what}: ∂T written unasked");
                    }
                    for (i, grad) in grads.iter().enumerate() {
                        match grad {
                            Some(v) if want[i] => {
                                check(v, &want_f[i], &mag_f[i], &format!("∂f{i}"))
                            }
                            None if !want[i] => {}
                            _ => panic!("{what}: factor {i}'s gradient given {}", grad.is_some()),
                        }
                    }
                }
            }
        }
    }
}
