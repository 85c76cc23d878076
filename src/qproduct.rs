//! Products with a frozen weight held as 8-bit integers (`quant::to_burn_quantized`, the
//! loaders' `frozen` option): `x·w + c` where `w` is a Burn quantized tensor.
//!
//! Burn 0.21 multiplies by a quantized tensor by dequantizing all of it first (a new `f32`
//! copy of the weight, on flex in one thread) and then multiplying: every token of a decoder's
//! generation would write and read its whole weight in `f32`, slower than keeping it in `f32`.
//! On flex, [`product`] reads the `i8` values and their scales where flex keeps them instead:
//! - a few rows (up to [`LOOP_ROWS`]: generation, a server's batch): one pass over the
//!   weight, its values widened and multiplied into the rows' sums a row of the weight at a
//!   time, `y[r] += (x[r, i]·s)·q[i]` with `s` the scale of `q[i]`'s block — 1 byte a weight
//!   read instead of 4;
//! - many rows (a prompt): the weight dequantized (`q·s`) into an `f32` buffer of this product's
//!   own and multiplied by `gemm` (`crate::product`), so one layer's `f32` copy exists at a time.
//!
//! A tied LM head (`x·tableᵀ`, [`product_t`]) and embedding lookups ([`embed`]) read an int8
//! table the same way. Elsewhere (other backends, packed storage, another scheme) the operands
//! come back and the callers keep Burn's ops, which dequantize the weight and give the same
//! values up to the order of the sums.

mod autodiff;
pub(crate) use autodiff::{dequantize as dequantize_erased, embed as embed_erased};
pub(crate) use autodiff::{product as product_erased, quantize as quantize_erased};

use std::any::Any;

use burn::nn::Embedding;
use burn::tensor::backend::Backend;
use burn::tensor::ops::QuantizedTensor;
use burn::tensor::{DType, Int, Tensor, TensorData, TensorMetadata, TensorPrimitive};
use rayon::prelude::*;

use crate::act::Isa;
use crate::kron::autodiff::{erase_quantized, unerase};
use crate::kron::host::HostValues;
use crate::quirks;

/// Up to this many rows the weight is read in `i8` ([`rows_loop`], [`dot_rows`]); from one
/// more, dequantized and multiplied by `gemm`, which runs many rows near the machine's
/// multiply-add rate. (A server's batches of 16 and 32 rows ran 1.1–1.2× faster on the loop
/// than dequantized for `gemm`; scoring, whose continuation passes run such row counts too,
/// ran 1.08× slower with the loop than with 8 here — ARC-Easy's 300 questions 16.3–16.7 s
/// against 15.0–15.3 s; serving is what int8 weights are for, so 32.)
pub(crate) const LOOP_ROWS: usize = 32;

/// Rows [`rows_loop`] sums at once, their sums held in registers.
pub(crate) const FEW_ROWS: usize = 8;

/// Columns a task of [`rows_loop`] sums at most (its rows' sums stay in the first-level cache).
const CHUNK: usize = 256;

/// Products from this many multiply-adds up are split over rayon's threads (burn-flex's rule
/// for its products, 192³): below it, waking the threads costs more than they save (SmolLM2's
/// layers, up to 885K a token, generated 1.25× faster on one thread than split from 2¹⁸).
const PARALLEL_MACS: usize = 192 * 192 * 192;

/// `x·w + c` where `w` is a Burn quantized tensor that flex stores as `i8` values with `f32`
/// scales, per tensor or per block along its rows, and `x` is `f32` on flex; else the operands
/// back, untouched, for Burn's product.
///
/// # Shapes
/// - `x`: `[n, k]`, `w`: `[k, m]` (quantized), `c`: `[1, m]`
/// - output: `[n, m]`
pub(crate) fn product<B: Backend>(
    x: Tensor<B, 2>,
    w: Tensor<B, 2>,
    c: Option<Tensor<B, 2>>,
) -> Result<Tensor<B, 2>, Operands<B>> {
    let ([_, k], [k2, _]) = (x.dims(), w.dims());
    assert_eq!(k, k2, "the product's inner dimensions agree");
    let (x, w, c) = match on_autodiff(x, w, c, false) {
        Ok(y) => return Ok(y),
        Err(operands) => operands,
    };
    match flex_int8(&x, w) {
        Ok(q) => Ok(product_in_place(x, &q, c)),
        Err(w) => Err((x, w, c)),
    }
}

/// [`product`] where [`in_place`] says flex holds `q` as `i8` values and `x` is flex's `f32`.
pub(crate) fn product_in_place<B: Backend>(
    x: Tensor<B, 2>,
    q: &QuantizedTensor<B>,
    c: Option<Tensor<B, 2>>,
) -> Tensor<B, 2> {
    let ([n, k], [k2, m]) = (x.dims(), q.shape().dims::<2>());
    assert_eq!(k, k2, "the product's inner dimensions agree");
    let (values, scales, per) = quirks::host_int8::<B>(q).expect("checked by in_place");
    let device = x.device();
    assert_eq!(values.len(), k * m, "flex holds the weight's values");
    let weight = Int8 {
        values,
        scales,
        per,
        cols: m,
    };
    let many_rows = n > LOOP_ROWS || !loop_takes(m, per, scales.len());
    if many_rows && k * m <= PANEL {
        let w = Tensor::from_data(TensorData::new(weight.dequantize(), [k, m]), &device);
        return crate::product::product(x, w, c);
    }
    if many_rows {
        // A weight larger than a panel (an embedding table, in a tied head's backward): panels
        // of its rows dequantized and their products added up, no `f32` copy of it whole.
        let mut out = match c {
            Some(c) => {
                assert_eq!(c.dims(), [1, m], "c is a row");
                HostValues::of(c).floats().repeat(n)
            }
            None => vec![0f32; n * m],
        };
        let xs = HostValues::of(x);
        let xs = xs.floats();
        let rows = (PANEL / m.max(1)).clamp(1, k.max(1));
        for r0 in (0..k).step_by(rows) {
            let p = rows.min(k - r0);
            let panel = weight.rows(r0, p).dequantize();
            crate::product::panel_product(&mut out, true, (&xs, k, r0), &panel, [n, p, m]);
        }
        return Tensor::from_data(TensorData::new(out, [n, m]), &device);
    }
    let bias = c.map(|c| {
        assert_eq!(c.dims(), [1, m], "c is a row");
        HostValues::of(c)
    });
    let bias = bias.as_ref().map(|b| b.floats());
    let xs = HostValues::of(x);
    let out = rows_loop(Isa::best(), &xs.floats(), n, &weight, bias.as_deref());
    Tensor::from_data(TensorData::new(out, [n, m]), &device)
}

/// `w`'s quantized primitive where `x` is an `f32` flex tensor and flex stores `w` as `i8`
/// values the host kernels read ([`quirks::host_int8`]); else `w` back.
fn flex_int8<B: Backend>(
    x: &Tensor<B, 2>,
    w: Tensor<B, 2>,
) -> Result<QuantizedTensor<B>, Tensor<B, 2>> {
    // `x` an `f32` tensor of flex itself (not of autodiff over it).
    if !quirks::host_loops_take(x, x) || !matches!(w.dtype(), DType::QFloat(_)) {
        return Err(w);
    }
    match w.into_primitive() {
        TensorPrimitive::QFloat(q) if in_place(x, &q) => Ok(q),
        p => Err(Tensor::from_primitive(p)),
    }
}

/// Do the host kernels read `q` where it lies for a product with `x`: `x` an `f32` tensor of
/// flex itself (not of autodiff over it) and `q` `i8` values flex stores
/// ([`quirks::host_int8`])?
pub(crate) fn in_place<B: Backend>(x: &Tensor<B, 2>, q: &QuantizedTensor<B>) -> bool {
    quirks::host_loops_take(x, x) && quirks::host_int8::<B>(q).is_some()
}

/// `x·w + c` (`transposed`: `x·wᵀ`) as one autodiff node (`autodiff::product`) where `B` is an
/// autodiff backend the crate's backward is registered on (`kron::autodiff`) and `w` is
/// quantized; else the operands back.
fn on_autodiff<B: Backend>(
    x: Tensor<B, 2>,
    w: Tensor<B, 2>,
    c: Option<Tensor<B, 2>>,
    transposed: bool,
) -> Result<Tensor<B, 2>, Operands<B>> {
    let quantized = |t: &Tensor<B, 2>| matches!(t.dtype(), DType::QFloat(_));
    let ops = match crate::kron::autodiff::quantized_ops::<B>() {
        Some(ops) if quantized(&w) && !quantized(&x) && !c.as_ref().is_some_and(quantized) => ops,
        _ => return Err((x, w, c)),
    };
    let erase = |t: Tensor<B, 2>| -> Box<dyn Any> { Box::new(t.into_primitive().tensor()) };
    let w = erase_quantized(w);
    Ok(unerase((ops.product)(
        erase(x),
        w,
        c.map(erase),
        transposed,
    )))
}

/// The operands of a product [`product`] gave back: `x`, `w` and `c`.
pub(crate) type Operands<B> = (Tensor<B, 2>, Tensor<B, 2>, Option<Tensor<B, 2>>);

/// `x·wᵀ` where `w` is a Burn quantized `[m, k]` tensor flex stores as `i8` (a tied LM head:
/// the embedding table), as [`product`] takes `x·w`; else the operands back. A few rows take
/// one pass over the table ([`dot_rows`]); many rows, panels of it dequantized and multiplied
/// by `gemm` in turn, so that no `f32` copy of the whole table is made.
///
/// # Shapes
/// - `x`: `[n, k]`, `w`: `[m, k]` (quantized)
/// - output: `[n, m]`
pub(crate) fn product_t<B: Backend>(
    x: Tensor<B, 2>,
    w: Tensor<B, 2>,
) -> Result<Tensor<B, 2>, (Tensor<B, 2>, Tensor<B, 2>)> {
    let ([_, k], [_, k2]) = (x.dims(), w.dims());
    assert_eq!(k, k2, "the product's inner dimensions agree");
    let (x, w) = match on_autodiff(x, w, None, true) {
        Ok(y) => return Ok(y),
        Err((x, w, _)) => (x, w),
    };
    match flex_int8(&x, w) {
        Ok(q) => Ok(product_t_in_place(x, &q)),
        Err(w) => Err((x, w)),
    }
}

/// [`product_t`] where [`in_place`] says flex holds `q` as `i8` values and `x` is flex's `f32`.
pub(crate) fn product_t_in_place<B: Backend>(
    x: Tensor<B, 2>,
    q: &QuantizedTensor<B>,
) -> Tensor<B, 2> {
    let ([n, k], [m, k2]) = (x.dims(), q.shape().dims::<2>());
    assert_eq!(k, k2, "the product's inner dimensions agree");
    let (values, scales, per) = quirks::host_int8::<B>(q).expect("checked by in_place");
    assert_eq!(values.len(), k * m, "flex holds the weight's values");
    let device = x.device();
    let weight = Int8 {
        values,
        scales,
        per,
        cols: k,
    };
    let out = if n <= LOOP_ROWS && dot_takes(k, per, scales.len()) {
        dot_rows(Isa::best(), &HostValues::of(x).floats(), n, &weight)
    } else {
        // Panels of about 2M values: dequantized, multiplied, their columns copied out (one
        // panel, a layer's weight in a backward: its product is the output).
        let rows = (PANEL / k.max(1)).clamp(1, m.max(1));
        if rows >= m {
            let w = Tensor::from_data(TensorData::new(weight.dequantize(), [m, k]), &device);
            return crate::product::host(x, false, w, true, None);
        }
        let mut out = vec![0f32; n * m];
        for v0 in (0..m).step_by(rows) {
            let p = rows.min(m - v0);
            let panel = weight.rows(v0, p).dequantize();
            let panel = Tensor::<B, 2>::from_data(TensorData::new(panel, [p, k]), &device);
            let y = crate::product::host(x.clone(), false, panel, true, None);
            let y = HostValues::of(y);
            for (r, row) in y.floats().chunks(p).enumerate() {
                out[r * m + v0..r * m + v0 + p].copy_from_slice(row);
            }
        }
        out
    };
    Tensor::from_data(TensorData::new(out, [n, m]), &device)
}

/// Values a panel of [`product_t`] dequantizes at a time.
const PANEL: usize = 1 << 21;

/// The rows `ids` of an embedding table (`[vocab, d]`): on flex, from an int8 table, only the
/// rows read are dequantized; under autodiff over a backend whose crate backward is registered,
/// from its inner backend (`autodiff::embed`: a frozen table, untracked); elsewhere (or an id
/// outside the table) Burn's lookup, which dequantizes a quantized table whole.
///
/// # Shapes
/// - `ids`: `[b, s]`; output `[b, s, d]`
pub(crate) fn embed<B: Backend>(table: &Embedding<B>, ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
    let weight = table.weight.val();
    if !matches!(weight.dtype(), DType::QFloat(_)) {
        return table.forward(ids);
    }
    match crate::kron::autodiff::quantized_ops::<B>() {
        Some(ops) => unerase((ops.embed)(
            erase_quantized(weight),
            Box::new(ids.into_primitive()),
        )),
        None => lookup(weight, ids),
    }
}

/// [`embed`] with the table's weight, on a backend without autodiff.
fn lookup<B: Backend>(weight: Tensor<B, 2>, ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
    let [vocab, d] = weight.dims();
    let TensorPrimitive::QFloat(q) = weight.into_primitive() else {
        unreachable!("embed looks up quantized tables only")
    };
    // Flex's `i8` storage (`quirks::host_int8` reads flex's quantized tensors alone).
    let Some((values, scales, per)) = quirks::host_int8::<B>(&q) else {
        let weight = Tensor::from_primitive(TensorPrimitive::QFloat(q));
        return burn::tensor::module::embedding(weight, ids);
    };
    let [b, s] = ids.dims();
    let rows: Vec<i64> = ids.to_data().convert::<i64>().to_vec().unwrap_or_default();
    let in_table = rows.len() == b * s && rows.iter().all(|&i| (0..vocab as i64).contains(&i));
    if !in_table {
        let weight = Tensor::from_primitive(TensorPrimitive::QFloat(q));
        return burn::tensor::module::embedding(weight, ids);
    }
    let table = Int8 {
        values,
        scales,
        per,
        cols: d,
    };
    let mut out = vec![0f32; b * s * d];
    for (&i, dst) in rows.iter().zip(out.chunks_mut(d.max(1))) {
        table.rows(i as usize, 1).dequantize_into(dst);
    }
    Tensor::from_data(TensorData::new(out, [b, s, d]), &ids.device())
}

/// An `i8` weight `[rows, cols]` in row-major order with its scales, each covering `per`
/// consecutive values.
#[derive(Clone, Copy)]
pub(crate) struct Int8<'a> {
    pub(crate) values: &'a [i8],
    pub(crate) scales: &'a [f32],
    pub(crate) per: usize,
    pub(crate) cols: usize,
}

impl<'a> Int8<'a> {
    /// The rows `first..first + count` (of `cols` values each) as a weight of their own, with
    /// the scales they use: blocks of whole rows, or one scale.
    pub(crate) fn rows(&self, first: usize, count: usize) -> Int8<'a> {
        let (start, len) = (first * self.cols, count * self.cols);
        let (values, scales) = if self.scales.len() == 1 {
            (&self.values[start..start + len], self.scales)
        } else {
            assert!(start.is_multiple_of(self.per), "rows start a block");
            let first_scale = start / self.per;
            let n = len.div_ceil(self.per);
            (
                &self.values[start..start + len],
                &self.scales[first_scale..first_scale + n],
            )
        };
        Int8 {
            values,
            scales,
            per: self.per.min(len.max(1)),
            cols: self.cols,
        }
    }

    /// `q·s` for every value, in order: what Burn's `dequantize` gives.
    pub(crate) fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.values.len()];
        self.dequantize_into(&mut out);
        out
    }

    /// [`Int8::dequantize`] into `out` (as long as the values): runs of whole blocks (about 64K
    /// values), over rayon's threads when there are many.
    pub(crate) fn dequantize_into(&self, out: &mut [f32]) {
        let len = self.values.len();
        assert_eq!(out.len(), len, "one output a value");
        // One scale: runs of any length; else blocks of `per`.
        let per = if self.scales.len() == 1 {
            1 << 16
        } else {
            self.per
        };
        let (isa, per) = (Isa::best(), per.min(len).max(1));
        let run = (1usize << 16).next_multiple_of(per);
        let work = |(r, dst): (usize, &mut [f32])| {
            let start = r * run;
            let (first, blocks) = (start / per, dst.len().div_ceil(per));
            // One scale (per tensor) or one a block.
            let scales = match self.scales.len() {
                1 => self.scales,
                _ => &self.scales[first..first + blocks],
            };
            dequantize_run(
                isa,
                &self.values[start..start + dst.len()],
                scales,
                per,
                dst,
            );
        };
        if len >= PARALLEL_MACS {
            out.par_chunks_mut(run).enumerate().for_each(work);
        } else {
            out.chunks_mut(run).enumerate().for_each(work);
        }
    }
}

/// `out[j] = q[j]·s` with `s` the scale of `q[j]`'s block of `per` values (`scales[0]` for
/// all where there is one), compiled for `isa`.
fn dequantize_run(isa: Isa, q: &[i8], scales: &[f32], per: usize, out: &mut [f32]) {
    crate::act::dispatch!(
        isa,
        dequantize_avx2,
        (q: &[i8], scales: &[f32], per: usize, out: &mut [f32]),
        {
            let one = scales.len() == 1;
            for (b, (out, q)) in out.chunks_mut(per).zip(q.chunks(per)).enumerate() {
                let s = if one { scales[0] } else { scales[b] };
                out.iter_mut().zip(q).for_each(|(o, &v)| *o = v as f32 * s);
            }
        }
    )
}

/// `y = x·(q·s) + c` for `n` rows `x` (`[n, k]`, row-major) and the `[k, m]` weight `w`:
/// for each row `i` of the weight, in order, `y[r, j] += (x[r, i]·s)·q[i, j]` (one fused
/// multiply-add; `s` the scale of `q[i, j]`'s block), starting from `c` (or 0). Columns are
/// split into runs over rayon's threads when the product is large; each column's
/// sum is the same whatever the split and the instruction set.
pub(crate) fn rows_loop(isa: Isa, x: &[f32], n: usize, w: &Int8, c: Option<&[f32]>) -> Vec<f32> {
    let m = w.cols;
    let k = w.values.len().checked_div(m).unwrap_or(0);
    assert_eq!(x.len(), n * k, "x holds n rows of k values");
    by_column_runs(n, m, n * k * m >= PARALLEL_MACS, |c0, acc| {
        let width = acc.len() / n;
        if let Some(c) = c {
            for r in 0..n {
                acc[r * width..(r + 1) * width].copy_from_slice(&c[c0..c0 + width]);
            }
        }
        // Rows a block of FEW_ROWS at a time (the run's values then come from the cache).
        for r0 in (0..n).step_by(FEW_ROWS) {
            let rows = (n - r0).min(FEW_ROWS);
            let (x, acc) = (
                &x[r0 * k..(r0 + rows) * k],
                &mut acc[r0 * width..(r0 + rows) * width],
            );
            columns(isa, x, [rows, k, m], w.values, w.scales, w.per, c0, acc);
        }
    })
}

/// An `[n, m]` output computed by runs of [`CHUNK`] columns: `run(c0, part)` fills `part`, the
/// run's `[n, width]` block (zeros at first), which is then copied into place; the runs are
/// split over rayon's threads where `parallel`.
fn by_column_runs(
    n: usize,
    m: usize,
    parallel: bool,
    run: impl Fn(usize, &mut [f32]) + Sync,
) -> Vec<f32> {
    let mut out = vec![0f32; n * m];
    if n == 0 || m == 0 {
        return out;
    }
    let part = |c0: usize| {
        let mut part = vec![0f32; n * CHUNK.min(m - c0)];
        run(c0, &mut part);
        part
    };
    let starts: Vec<usize> = (0..m).step_by(CHUNK).collect();
    let parts: Vec<Vec<f32>> = if parallel && starts.len() > 1 {
        starts.par_iter().map(|&c0| part(c0)).collect()
    } else {
        starts.iter().map(|&c0| part(c0)).collect()
    };
    for (&c0, part) in starts.iter().zip(&parts) {
        let width = CHUNK.min(m - c0);
        for r in 0..n {
            out[r * m + c0..r * m + c0 + width].copy_from_slice(&part[r * width..(r + 1) * width]);
        }
    }
    out
}

/// Columns a group of [`columns`] sums at once: a block of one scale holds whole groups.
pub(crate) const GROUP: usize = 32;

/// Lanes of [`dot_rows`]' sums: the values of a row are summed in this many interleaved
/// partial sums, then added pairwise.
const LANES: usize = 16;

/// Does [`dot_rows`] take a table whose rows have `k` values and whose scales cover `per`
/// values each (`scales` of them): rows of whole lane runs, one scale or blocks of them?
pub(crate) fn dot_takes(k: usize, per: usize, scales: usize) -> bool {
    k.is_multiple_of(LANES) && (scales == 1 || (per.is_multiple_of(LANES) && k.is_multiple_of(per)))
}

/// `y[r, v] = x[r]·(q[v]·s)` for `n` rows `x` (`[n, k]`) and the `[m, k]` table `w`: the
/// dequantized values `q·s` (Burn's) multiplied into [`LANES`] partial sums, value `i` into
/// lane `i mod LANES` in order by fused multiply-adds, the lanes then added in halves (8, 4, 2,
/// 1 apart). Rows of the table are split over rayon's threads when the product is large; each
/// sum is the same whatever the split and the instruction set.
pub(crate) fn dot_rows(isa: Isa, x: &[f32], n: usize, w: &Int8) -> Vec<f32> {
    let k = w.cols;
    let m = w.values.len().checked_div(k).unwrap_or(0);
    assert_eq!(x.len(), n * k, "x holds n rows of k values");
    by_column_runs(n, m, n * k * m >= PARALLEL_MACS, |v0, part| {
        let count = part.len() / n;
        for r0 in (0..n).step_by(FEW_ROWS) {
            let rows = (n - r0).min(FEW_ROWS);
            let (x, part) = (
                &x[r0 * k..(r0 + rows) * k],
                &mut part[r0 * count..(r0 + rows) * count],
            );
            dots(isa, x, [rows, k], w.values, w.scales, w.per, v0, part);
        }
    })
}

/// The sums of [`dot_rows`] for the table's rows `v0..v0 + count` (`part`, `[n, count]`),
/// compiled for `isa`.
#[allow(clippy::too_many_arguments)]
fn dots(
    isa: Isa,
    x: &[f32],
    nk: [usize; 2],
    q: &[i8],
    scales: &[f32],
    per: usize,
    v0: usize,
    part: &mut [f32],
) {
    crate::act::dispatch!(
        isa,
        dots_avx2,
        (
            x: &[f32],
            nk: [usize; 2],
            q: &[i8],
            scales: &[f32],
            per: usize,
            v0: usize,
            part: &mut [f32]
        ),
        {
            let [n, k] = nk;
            let count = part.len() / n;
            // Each row's blocks: one scale a block (the whole row where there is one scale).
            let (len, blocks) = if scales.len() == 1 { (k, 1) } else { (per, k / per) };
            for t in 0..count {
                let v = v0 + t;
                let row = &q[v * k..(v + 1) * k];
                let mut lanes = [[0f32; LANES]; FEW_ROWS];
                for b in 0..blocks {
                    let s = if scales.len() == 1 { scales[0] } else { scales[v * blocks + b] };
                    for c in 0..len / LANES {
                        let at = b * len + c * LANES;
                        let qc: &[i8; LANES] = row[at..at + LANES].try_into().expect("lanes");
                        let w: [f32; LANES] = std::array::from_fn(|l| qc[l] as f32 * s);
                        for (r, lanes) in lanes.iter_mut().enumerate().take(n) {
                            let xr: &[f32; LANES] =
                                x[r * k + at..r * k + at + LANES].try_into().expect("lanes");
                            for l in 0..LANES {
                                lanes[l] = xr[l].mul_add(w[l], lanes[l]);
                            }
                        }
                    }
                }
                for (r, lanes) in lanes.iter_mut().enumerate().take(n) {
                    let mut half = LANES / 2;
                    while half > 0 {
                        for l in 0..half {
                            lanes[l] += lanes[l + half];
                        }
                        half /= 2;
                    }
                    part[r * count + t] = lanes[0];
                }
            }
        }
    )
}

/// Groups one row's pass sums at once ([`single_row`]).
const WIDE: usize = 8;

/// `acc[t·GROUP + j] += (x[i]·s)·q[i, col + t·GROUP + j]` for every row `i` of the weight in
/// order, `s` the scale of that value's block: one row of `x` against `G` groups of columns,
/// the sums held in registers while the weight's rows stream past.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn one_row<const G: usize>(
    x: &[f32],
    m: usize,
    q: &[i8],
    scales: &[f32],
    per: usize,
    per_row: usize,
    col: usize,
    acc: &mut [f32],
) {
    let sc: [usize; G] = std::array::from_fn(|t| {
        if scales.len() == 1 {
            0
        } else {
            (col + t * GROUP) / per
        }
    });
    let mut sums = [[0f32; GROUP]; G];
    for (t, s) in sums.iter_mut().enumerate() {
        s.copy_from_slice(&acc[t * GROUP..(t + 1) * GROUP]);
    }
    for (i, &xi) in x.iter().enumerate() {
        let row = &q[i * m + col..i * m + col + G * GROUP];
        for (t, sums) in sums.iter_mut().enumerate() {
            let xs = xi * scales[i * per_row + sc[t]];
            let group: &[i8; GROUP] = row[t * GROUP..(t + 1) * GROUP].try_into().expect("a group");
            for (a, &v) in sums.iter_mut().zip(group) {
                *a = xs.mul_add(v as f32, *a);
            }
        }
    }
    for (t, s) in sums.iter().enumerate() {
        acc[t * GROUP..(t + 1) * GROUP].copy_from_slice(s);
    }
}

/// Does [`rows_loop`] take a weight of `cols` columns whose scales cover `per` values each
/// (`scales` of them): one scale, or blocks of whole groups along each row?
pub(crate) fn loop_takes(cols: usize, per: usize, scales: usize) -> bool {
    scales == 1 || (per.is_multiple_of(GROUP) && cols.is_multiple_of(per))
}

/// The sums of [`rows_loop`] for the columns `c0..c0 + width` of every row (`acc`, `[n,
/// width]`, holding `c`'s values or 0), compiled for `isa`: a group of [`GROUP`] columns at a
/// time, its sums kept in registers down the weight's rows; any last columns short of a group
/// one at a time (the same operations).
#[allow(clippy::too_many_arguments)]
fn columns(
    isa: Isa,
    x: &[f32],
    nkm: [usize; 3],
    q: &[i8],
    scales: &[f32],
    per: usize,
    c0: usize,
    acc: &mut [f32],
) {
    crate::act::dispatch!(
        isa,
        columns_avx2,
        (
            x: &[f32],
            nkm: [usize; 3],
            q: &[i8],
            scales: &[f32],
            per: usize,
            c0: usize,
            acc: &mut [f32]
        ),
        {
            let [n, k, m] = nkm;
            let width = acc.len() / n;
            // The scale of row `i`, column `col`: `scales[i·per_row + col / per]`.
            let per_row = if scales.len() == 1 { 0 } else { m / per };
            let scale_col = |col: usize| if scales.len() == 1 { 0 } else { col / per };
            let groups = width / GROUP;
            if n == 1 {
                // Eight groups at a time (256 consecutive values of each of the weight's rows),
                // then two, then one.
                let mut g = 0;
                while g < groups {
                    let (j, col) = (g * GROUP, c0 + g * GROUP);
                    let take = if g + WIDE <= groups {
                        WIDE
                    } else if g + 2 <= groups {
                        2
                    } else {
                        1
                    };
                    let a = &mut acc[j..j + take * GROUP];
                    let x = &x[..k];
                    match take {
                        WIDE => one_row::<WIDE>(x, m, q, scales, per, per_row, col, a),
                        2 => one_row::<2>(x, m, q, scales, per, per_row, col, a),
                        _ => one_row::<1>(x, m, q, scales, per, per_row, col, a),
                    }
                    g += take;
                }
            } else {
                for g in 0..groups {
                    let (j, col) = (g * GROUP, c0 + g * GROUP);
                    let sc = scale_col(col);
                    let mut a = [[0f32; GROUP]; FEW_ROWS];
                    for (r, a) in a.iter_mut().enumerate().take(n) {
                        a.copy_from_slice(&acc[r * width + j..r * width + j + GROUP]);
                    }
                    for i in 0..k {
                        let s = scales[i * per_row + sc];
                        let row: &[i8; GROUP] =
                            q[i * m + col..i * m + col + GROUP].try_into().expect("a group");
                        let mut wide = [0f32; GROUP];
                        for (w, &v) in wide.iter_mut().zip(row) {
                            *w = v as f32;
                        }
                        for (r, a) in a.iter_mut().enumerate().take(n) {
                            let xs = x[r * k + i] * s;
                            for (a, &w) in a.iter_mut().zip(&wide) {
                                *a = xs.mul_add(w, *a);
                            }
                        }
                    }
                    for (r, a) in a.iter().enumerate().take(n) {
                        acc[r * width + j..r * width + j + GROUP].copy_from_slice(a);
                    }
                }
            }
            for j in groups * GROUP..width {
                let col = c0 + j;
                let sc = scale_col(col);
                for i in 0..k {
                    let w = q[i * m + col] as f32;
                    let s = scales[i * per_row + sc];
                    for r in 0..n {
                        let xs = x[r * k + i] * s;
                        acc[r * width + j] = xs.mul_add(w, acc[r * width + j]);
                    }
                }
            }
        }
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    /// The kernel's formula written plainly, one value at a time: each column's sum over the
    /// weight's rows in order, `fma(x·s, q, sum)`, from `c` (or 0).
    fn reference(x: &[f32], n: usize, w: &Int8, c: Option<&[f32]>) -> Vec<f32> {
        let m = w.cols;
        let k = w.values.len() / m;
        let mut out = vec![0f32; n * m];
        for r in 0..n {
            for j in 0..m {
                let mut sum = c.map_or(0.0, |c| c[j]);
                for i in 0..k {
                    let at = i * m + j;
                    let xs = x[r * k + i] * w.scales[at / w.per];
                    sum = xs.mul_add(w.values[at] as f32, sum);
                }
                out[r * m + j] = sum;
            }
        }
        out
    }

    fn values(rng: &mut SplitMix64, len: usize) -> Vec<i8> {
        (0..len)
            .map(|_| (rng.below(255) as i32 - 127) as i8)
            .collect()
    }

    fn floats(rng: &mut SplitMix64, len: usize) -> Vec<f32> {
        (0..len).map(|_| rng.normal() as f32).collect()
    }

    /// Every path of the loop (eight, two and one groups of one row; several rows; columns
    /// short of a group; one scale; blocks of 32 and 64; a product split over threads) gives
    /// the plain formula's bits on every instruction set, and a row's result does not depend on
    /// the rows beside it.
    #[test]
    fn the_int8_loop_is_its_formula_bit_for_bit() {
        let mut rng = SplitMix64::new(13);
        // (k, m, values per scale; 0: one scale)
        let cases = [
            (70, 320, 32),
            (48, 96, 32),
            (33, 300, 0),
            (40, 192, 64),
            (5, 512, 32),
            (300, 1100, 0),
            (300, 1088, 32),
        ];
        for (k, m, per) in cases {
            let q = values(&mut rng, k * m);
            let per = if per == 0 { k * m } else { per };
            let scales: Vec<f32> = (0..(k * m).div_ceil(per))
                .map(|_| rng.uniform() as f32 * 0.01 + 1e-4)
                .collect();
            let w = Int8 {
                values: &q,
                scales: &scales,
                per,
                cols: m,
            };
            assert!(loop_takes(m, per, scales.len()), "{k}×{m}");
            let c = floats(&mut rng, m);
            for n in (1..=FEW_ROWS).chain([9, 17, LOOP_ROWS]) {
                let x = floats(&mut rng, n * k);
                for bias in [None, Some(&c[..])] {
                    let want = reference(&x, n, &w, bias);
                    for isa in Isa::available() {
                        let got = rows_loop(isa, &x, n, &w, bias);
                        assert!(
                            got.iter()
                                .zip(&want)
                                .all(|(a, b)| a.to_bits() == b.to_bits()),
                            "{k}×{m}, {n} rows, {isa:?}"
                        );
                    }
                }
                // Row by row, the same bits as in the batch.
                let batch = rows_loop(Isa::best(), &x, n, &w, None);
                for r in 0..n {
                    let one = rows_loop(Isa::best(), &x[r * k..(r + 1) * k], 1, &w, None);
                    assert_eq!(one, batch[r * m..(r + 1) * m], "row {r} of {n}");
                }
            }
            let deq = w.dequantize();
            let want: Vec<f32> = (0..k * m).map(|i| q[i] as f32 * scales[i / per]).collect();
            assert_eq!(deq, want, "dequantized {k}×{m}");
        }
        // Blocks that split a row's groups are not the loop's: the product dequantizes them.
        assert!(!loop_takes(96, 48, 2));
        assert!(!loop_takes(100, 32, 4));
    }

    /// [`dot_rows`]' formula written plainly: lanes of fused multiply-adds of `x` with the
    /// dequantized values, added in halves.
    fn dot_reference(x: &[f32], n: usize, w: &Int8) -> Vec<f32> {
        let k = w.cols;
        let m = w.values.len() / k;
        let mut out = vec![0f32; n * m];
        for r in 0..n {
            for v in 0..m {
                let mut lanes = [0f32; LANES];
                for i in 0..k {
                    let at = v * k + i;
                    let deq = w.values[at] as f32 * w.scales[at / w.per];
                    lanes[i % LANES] = x[r * k + i].mul_add(deq, lanes[i % LANES]);
                }
                let mut half = LANES / 2;
                while half > 0 {
                    for l in 0..half {
                        lanes[l] += lanes[l + half];
                    }
                    half /= 2;
                }
                out[r * m + v] = lanes[0];
            }
        }
        out
    }

    /// The tied head's products (`x·wᵀ` for an int8 table) give the plain formula's bits on
    /// every instruction set and split, and a table's rows taken alone dequantize as the table.
    #[test]
    fn the_int8_dot_rows_are_their_formula_bit_for_bit() {
        let mut rng = SplitMix64::new(29);
        // (table rows m, row length k, values per scale; 0: one scale)
        for (m, k, per) in [(300, 64, 32), (97, 48, 16), (40, 96, 0), (5000, 576, 32)] {
            let q = values(&mut rng, k * m);
            let per = if per == 0 { k * m } else { per };
            let scales: Vec<f32> = (0..(k * m).div_ceil(per))
                .map(|_| rng.uniform() as f32 * 0.01 + 1e-4)
                .collect();
            let w = Int8 {
                values: &q,
                scales: &scales,
                per,
                cols: k,
            };
            assert!(dot_takes(k, per, scales.len()), "{m}×{k}");
            for n in [1, 2, 3, FEW_ROWS, 13, LOOP_ROWS] {
                let x = floats(&mut rng, n * k);
                let want = dot_reference(&x, n, &w);
                for isa in Isa::available() {
                    let got = dot_rows(isa, &x, n, &w);
                    assert!(
                        got.iter()
                            .zip(&want)
                            .all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{m}×{k}, {n} rows, {isa:?}"
                    );
                }
            }
            let all = w.dequantize();
            for (first, count) in [(0, 1), (3, 2), (m - 1, 1)] {
                let part = w.rows(first, count).dequantize();
                assert_eq!(
                    part,
                    all[first * k..(first + count) * k],
                    "rows {first}+{count}"
                );
            }
        }
        assert!(!dot_takes(40, 32, 2), "rows short of whole lane runs");
        assert!(!dot_takes(64, 8, 8), "blocks splitting a lane run");
    }

    /// A weight larger than a panel (an embedding table in a tied head's backward) is
    /// dequantized a panel of rows at a time and the panels' products added up: the product
    /// with the dequantized weight, with and without a bias row, for many rows and few.
    #[cfg(feature = "flex")]
    #[test]
    fn a_weight_larger_than_a_panel_multiplies_in_panels() {
        use burn::backend::Flex;
        use burn::tensor::quantization::{QuantLevel, QuantScheme, QuantStore, QuantValue};
        let dev = Default::default();
        let mut rng = SplitMix64::new(5);
        // 4,200 × 512 = 2.15M values, just over a panel: panels of 4,096 rows and 104.
        let (k, m) = (4200, 512);
        let scheme = QuantScheme::default()
            .with_value(QuantValue::Q8S)
            .with_level(QuantLevel::block([32]))
            .with_store(QuantStore::Native);
        let w =
            Tensor::<Flex, 2>::from_data(TensorData::new(floats(&mut rng, k * m), [k, m]), &dev)
                .quantize_dynamic(&scheme);
        let c = Tensor::<Flex, 2>::from_data(TensorData::new(floats(&mut rng, m), [1, m]), &dev);
        for n in [40, 3] {
            let x = Tensor::<Flex, 2>::from_data(
                TensorData::new(floats(&mut rng, n * k), [n, k]),
                &dev,
            );
            for bias in [None, Some(c.clone())] {
                let want = x.clone().matmul(w.clone().dequantize());
                let want = match &bias {
                    Some(c) => want + c.clone(),
                    None => want,
                };
                let got = match product(x.clone(), w.clone(), bias) {
                    Ok(y) => y,
                    Err(_) => panic!("flex takes an int8 weight"),
                };
                let (got, want) = (
                    got.into_data().to_vec::<f32>().unwrap(),
                    want.into_data().to_vec::<f32>().unwrap(),
                );
                let err = got
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                let scale = want.iter().fold(0f32, |a, b| a.max(b.abs()));
                assert!(err <= 1e-5 * scale, "{n} rows: {err} of {scale}");
            }
        }
    }
}
