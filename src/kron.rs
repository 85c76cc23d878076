//! The Kronecker math, in one place.
//!
//! * [`kron`] materializes `a ⊗ b` (only `delta_weight` and `merge` use it);
//! * [`kron_apply`] computes `x·(A ⊗ B)` **without** materializing the product, where `A` and
//!   `B` may each be a chain of factors (`A = a1·a2·…`, `B = b1·b2·…`), following the KronA
//!   paper's Eq. 2: with `x` reshaped to `X [n, a_in, b_in]`, `x·(A ⊗ B) = reshape(Aᵀ·X·B)`;
//! * [`KronPlan`] is the order in which the factors are contracted, and its cost model;
//! * [`autodiff`] gives the apply a hand-written backward on Burn's autodiff backend: one node
//!   that recomputes its intermediates instead of keeping them, and the gradient of `a` without
//!   the `[n, a_out, a_in]` tensor of the generic one;
//! * on burn-flex, steps whose intermediates are too narrow for the host kernels (a few columns)
//!   run as dense products: a `b` step over all rows, an `a` step with the factor's Kronecker
//!   product with an identity (`a ⊗ I_q`, a few thousand values), still never `A ⊗ B`;
//!
//! Choosing factor shapes for a layer is policy, not math: it lives beside the configs, in
//! [`crate::adapter::shape`].
//!
//! Layout and index order follow Burn's `Linear` (`W` is `[d_in, d_out]`, `y = x·W`):
//! `(a ⊗ b)[i·b_in + k, j·b_out + l] = a[i, j] · b[k, l]`.

use burn::tensor::{backend::Backend, Tensor};
use serde::{Deserialize, Serialize};

pub mod autodiff;
#[cfg(feature = "cube")]
pub mod cube;
pub(crate) mod host;

/// Materializes the Kronecker product `a ⊗ b`.
///
/// Each entry is one product `a[i, j]·b[k, l]`, on every backend: a broadcast multiply, or on
/// `burn-flex` (whose broadcast element-wise operations go one element at a time) the same
/// products as GEMMs with an inner dimension of 1, batched over `(i, k)`.
///
/// # Shapes
/// - `a`: `[a_in, a_out]`, `b`: `[b_in, b_out]`
/// - output: `[a_in·b_in, a_out·b_out]` with `out[i·b_in + k, j·b_out + l] = a[i, j]·b[k, l]`
pub fn kron<B: Backend>(a: Tensor<B, 2>, b: Tensor<B, 2>) -> Tensor<B, 2> {
    let [a_in, a_out] = a.dims();
    let [b_in, b_out] = b.dims();
    if crate::quirks::products_beat_copies::<B>(&a.device()) {
        let a4: Tensor<B, 4> = a.reshape([a_in, 1, a_out, 1]);
        let b4: Tensor<B, 4> = b.reshape([1, b_in, 1, b_out]);
        // [a_in, b_in] products of [a_out, 1] · [1, b_out]
        a4.matmul(b4).reshape([a_in * b_in, a_out * b_out])
    } else {
        kron_broadcast(a, b)
    }
}

/// [`kron`] as one broadcast multiply on every backend: how [`kron_identity`] builds `f ⊗ I_q`
/// under autodiff (differentiated by Burn), where `kron`'s flex branch would be `p·q` products
/// of one column by one row.
fn kron_broadcast<B: Backend>(a: Tensor<B, 2>, b: Tensor<B, 2>) -> Tensor<B, 2> {
    let [a_in, a_out] = a.dims();
    let [b_in, b_out] = b.dims();
    let a4: Tensor<B, 4> = a.reshape([a_in, 1, a_out, 1]);
    let b4: Tensor<B, 4> = b.reshape([1, b_in, 1, b_out]);
    (a4 * b4).reshape([a_in * b_in, a_out * b_out])
}

/// The product of a chain of matrices, `m1·m2·…` (a single factor is returned as is).
///
/// # Panics
/// If the chain is empty.
pub fn chain_product<B: Backend>(chain: &[Tensor<B, 2>]) -> Tensor<B, 2> {
    let mut iter = chain.iter().cloned();
    let first = iter.next().expect("a factor chain has at least one factor");
    iter.fold(first, |acc, m| acc.matmul(m))
}

/// Which side of the Kronecker product a contraction step applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Side {
    /// The next factor of the `a` chain (contracts the `a_in` axis of `X [n, a_in, b_in]`).
    A,
    /// The next factor of the `b` chain (contracts the `b_in` axis).
    B,
}

/// The order in which [`kron_apply`] contracts the factors: an interleaving of the `a` chain and
/// the `b` chain, each applied in its own order.
///
/// For KronA (`a`, `b`) there are two plans: `[A, B]` (`aᵀ·X` first) and `[B, A]` (`X·b`
/// first). For Kron-LoRA (`a`, `b1`, `b2`) there are three, `a` before, between or after
/// `b1`/`b2`. Their multiply-add counts per input row ([`KronPlan::cost`]) differ with the factor
/// shapes; [`KronPlan::cheapest`] picks the least.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct KronPlan {
    /// The contraction steps, first to last.
    pub steps: Vec<Side>,
}

impl KronPlan {
    /// Every `a` factor first, then every `b` factor.
    pub fn a_first(n_a: usize, n_b: usize) -> Self {
        let mut steps = vec![Side::A; n_a];
        steps.extend(std::iter::repeat_n(Side::B, n_b));
        Self { steps }
    }

    /// Every `b` factor first, then every `a` factor.
    pub fn a_last(n_a: usize, n_b: usize) -> Self {
        let mut steps = vec![Side::B; n_b];
        steps.extend(std::iter::repeat_n(Side::A, n_a));
        Self { steps }
    }

    /// Multiply-adds per input row (per token) of this plan, for chains of these shapes.
    ///
    /// With the intermediate `T [p, q]` per row (`p` on the `a` axis, `q` on the `b` axis),
    /// applying an `a` factor `[p, p']` costs `p·q·p'` and a `b` factor `[q, q']` costs
    /// `p·q·q'`. The backward pass costs about twice this (input and factor gradients).
    pub fn cost(&self, a_shapes: &[[usize; 2]], b_shapes: &[[usize; 2]]) -> u64 {
        let mut p = a_shapes[0][0] as u64;
        let mut q = b_shapes[0][0] as u64;
        let (mut ia, mut ib) = (0, 0);
        let mut cost = 0u64;
        for side in &self.steps {
            match side {
                Side::A => {
                    let out = a_shapes[ia][1] as u64;
                    cost += p * q * out;
                    p = out;
                    ia += 1;
                }
                Side::B => {
                    let out = b_shapes[ib][1] as u64;
                    cost += p * q * out;
                    q = out;
                    ib += 1;
                }
            }
        }
        cost
    }

    /// How many times the plan switches sides (counting from and back to the `b` side): the
    /// tie-break between plans of equal cost, fewer switches first.
    pub fn transposes(&self) -> usize {
        let mut prev = Side::B;
        let mut count = 0;
        for &s in self.steps.iter().chain(std::iter::once(&Side::B)) {
            if s != prev {
                count += 1;
                prev = s;
            }
        }
        count
    }

    /// Every interleaving of `n_a` `a` steps and `n_b` `b` steps.
    pub fn all(n_a: usize, n_b: usize) -> Vec<Self> {
        fn rec(n_a: usize, n_b: usize, cur: &mut Vec<Side>, out: &mut Vec<KronPlan>) {
            if n_a == 0 && n_b == 0 {
                out.push(KronPlan { steps: cur.clone() });
                return;
            }
            if n_a > 0 {
                cur.push(Side::A);
                rec(n_a - 1, n_b, cur, out);
                cur.pop();
            }
            if n_b > 0 {
                cur.push(Side::B);
                rec(n_a, n_b - 1, cur, out);
                cur.pop();
            }
        }
        let mut out = Vec::new();
        rec(n_a, n_b, &mut Vec::new(), &mut out);
        out
    }

    /// The plan with the fewest multiply-adds (ties to the fewest side switches, then to the
    /// plan that applies `a` earliest), unless a plan starting with a `b` step costs at most a
    /// quarter more (ties included): then the cheapest of those.
    ///
    /// A `b` step first reads the layer's input as one GEMM where it lies, and the `a` steps
    /// then contract an intermediate of the adapter's own; an `a` step first is a batched
    /// product over the input, which the layer shares. On burn-flex the `a` steps ran host
    /// loops (`kron::host`) that copied the shared input three times per step (forward,
    /// recomputation, gradient): for MiniLM's 1536 → 384 layer that copying cost more than
    /// the 14% more multiply-adds of starting with `b`. They read it in place now; a rule by
    /// the training step's multiply-adds (forward, recomputation and both gradients: `a` first
    /// at MiniLM's 384 → 384 and 1536 → 384 layers, 6% and 17% fewer there) measured within
    /// 0.5% of this one in a MiniLM step, so this one stays. The rule is the same on every
    /// backend, so a plan, and with it the rounding, does not depend on the backend.
    pub fn cheapest(a_shapes: &[[usize; 2]], b_shapes: &[[usize; 2]]) -> Self {
        let all = Self::all(a_shapes.len(), b_shapes.len());
        let key = |p: &&Self| (p.cost(a_shapes, b_shapes), p.transposes());
        let best = all.iter().min_by_key(key).expect("at least one plan");
        let b_first = all
            .iter()
            .filter(|p| p.steps.first() == Some(&Side::B))
            .min_by_key(key);
        match b_first {
            Some(b) if 4 * key(&b).0 <= 5 * key(&best).0 => b.clone(),
            _ => best.clone(),
        }
    }
}

/// The contraction order a user asks for in an adapter config.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ContractionOrder {
    /// The cheapest plan for the factor shapes ([`KronPlan::cheapest`]).
    #[default]
    Auto,
    /// `aᵀ·X` first, then the `b` factor(s).
    AFirst,
    /// The `b` factor(s) first (`X·b`), then `a`.
    ALast,
}

impl ContractionOrder {
    /// The plan this choice means for chains of these shapes.
    pub fn plan(self, a_shapes: &[[usize; 2]], b_shapes: &[[usize; 2]]) -> KronPlan {
        match self {
            ContractionOrder::Auto => KronPlan::cheapest(a_shapes, b_shapes),
            ContractionOrder::AFirst => KronPlan::a_first(a_shapes.len(), b_shapes.len()),
            ContractionOrder::ALast => KronPlan::a_last(a_shapes.len(), b_shapes.len()),
        }
    }
}

/// Computes `scale · x·(A ⊗ B)` with `A = a_chain[0]·a_chain[1]·…` and `B = b_chain[0]·…`,
/// never building `A ⊗ B` (nor any `d_in × d_out` tensor, forward or backward).
///
/// `x` is reshaped to `X [n, a_in, b_in]` and the factors are contracted in `plan`'s order:
/// an `a` factor contracts the middle axis, a `b` factor the last. The scale is folded into the
/// smallest factor, so it costs nothing per token. On an autodiff backend registered with
/// [`autodiff::register_backward`] the steps are one autodiff node that recomputes its
/// intermediates in the backward ([`autodiff::apply_steps`]; on burn-flex that node's forward
/// and backward run on the host a chunk of rows at a time). In inference on burn-flex (`f32`)
/// each chunk of rows goes through every factor on the host, its intermediates in the L1 and L2
/// caches (`kron::host::apply_rows`; factors of up to 16,384 values). On burn-flex, in training
/// and inference, a chain whose rank-wide intermediates are narrower than 8 columns (Kron-LoRA
/// below rank 8) runs as its small products `A` and `B` (differentiated by Burn), for the host.
///
/// # Shapes
/// - `x`: `[..., d_in]` with `d_in = a_in·b_in` (`a_in` = rows of `a_chain[0]`,
///   `b_in` = rows of `b_chain[0]`)
/// - output: `[..., d_out]` with `d_out = a_out·b_out` (columns of the chains' last factors)
///
/// # Panics
/// If a chain is empty or the shapes do not chain; adapters validate them at construction.
pub fn kron_apply<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    a_chain: &[Tensor<B, 2>],
    b_chain: &[Tensor<B, 2>],
    plan: &KronPlan,
    scale: f64,
) -> Tensor<B, D> {
    apply_then_add(x, a_chain, b_chain, plan, scale, None)
}

/// `y + scale · x·(A ⊗ B)`: [`kron_apply`] added to `y` (an adapted layer's frozen product), the
/// same sum bit for bit.
///
/// In inference on burn-flex (`f32`, no autodiff) both run each row through the factors on the
/// host (`kron::host::apply_rows`), and here the last step adds into `y`'s buffer: the adapter's
/// output has no tensor of its own and the add no pass. On an autodiff backend registered with
/// [`autodiff::register_backward`] the apply and the add are one node (`y` one of its inputs,
/// whose gradient is the output's), and on flex its forward adds into `y`'s buffer likewise.
/// Elsewhere `kron_apply(…) + y`.
///
/// # Shapes
/// As [`kron_apply`]; `y`: `[..., d_out]`, with `x`'s leading dimensions.
///
/// # Panics
/// As [`kron_apply`], and if `y`'s shape is not the output's.
pub fn kron_apply_add<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    a_chain: &[Tensor<B, 2>],
    b_chain: &[Tensor<B, 2>],
    plan: &KronPlan,
    scale: f64,
    y: Tensor<B, D>,
) -> Tensor<B, D> {
    apply_then_add(x, a_chain, b_chain, plan, scale, Some(y))
}

/// The largest factor, in values, that [`host::apply_rows`] takes (128 × 128): a chunk of
/// rows' factors and intermediates then stay in the L1 and L2 caches; beyond it Burn's
/// products. (At 64 × 64 until measured: a 4096 → 14336 KronA, `a` 64 × 112 and `b` 64 × 128,
/// over 2,048 rows, 92 ms by Burn's products, 35 ms on the host rows.)
const HOST_ROW_MAX: usize = 1 << 14;
/// The largest row intermediate, in values, that [`host::apply_rows`] takes (a 14,336-wide
/// layer's row fits).
const HOST_INTERMEDIATE_MAX: usize = 1 << 14;
/// The fewest columns (the `b` axis) of a row intermediate that [`host::apply_rows`] takes: its
/// kernel works on eight columns at a time, and narrower rows run its scalar tail (KronA with
/// `a` (2, 192) on MiniLM: 1.38× the base's inference against 1.25× by Burn's products).
const HOST_COLUMNS_MIN: usize = 8;

fn apply_then_add<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    a_chain: &[Tensor<B, 2>],
    b_chain: &[Tensor<B, 2>],
    plan: &KronPlan,
    scale: f64,
    y: Option<Tensor<B, D>>,
) -> Tensor<B, D> {
    if x.shape().num_elements() == 0 {
        // No rows (Burn's reshape reads a 0 as "keep this dimension"): `y`, or an empty result.
        let mut dims = x.dims();
        let (p_out, q_out) = out_axes(a_chain, b_chain);
        dims[D - 1] = p_out * q_out;
        return y.unwrap_or_else(|| Tensor::zeros(dims, &x.device()));
    }
    let t = KronIntermediate::new(x, a_chain[0].dims()[0], b_chain[0].dims()[0]);
    let y_on_host = y
        .as_ref()
        .is_none_or(|y| crate::quirks::host_loops_take(&t.t, y));
    let host = y_on_host
        .then(|| host_factors(a_chain, b_chain, plan, |f, s| on_host_rows(&t.t, f, s)))
        .flatten();
    if let Some((mut factors, steps)) = host {
        // The scale on the smallest factor, as for the node below.
        scale_smallest(&mut factors, scale);
        let KronIntermediate { t, lead } = t;
        let n = t.dims()[0];
        let y = y.map(|y| {
            let d_out = y.dims()[D - 1];
            y.reshape([n, d_out])
        });
        let out = host::apply_rows(t, factors, &steps, y);
        return KronIntermediate { t: out, lead }.finish();
    }
    // In training on flex the registered node's forward and backward take the host rows where
    // the shapes fit (`on_host_rows` on the inner backend), so the same choice is made by
    // shape: a chain too narrow for them goes there collapsed, its products `b1·b2·…`
    // differentiated by Burn.
    let node_on_host = autodiff::is_registered::<B>() && crate::quirks::host_loops_under(&t.t);
    let dims = t.t.dims();
    let fitted = node_on_host
        .then(|| host_factors(a_chain, b_chain, plan, |f, s| host_rows_fit(dims, f, s)))
        .flatten();
    // Where neither fits the host rows (intermediates a few columns wide), flex's products.
    let inference = crate::quirks::host_loops_take(&t.t, &t.t);
    if let (None, true) = (&fitted, node_on_host || inference) {
        if let Some(dense) = dense_steps(inference, dims, a_chain, b_chain, plan, scale) {
            return t.dense(dense, y);
        }
    }
    let (mut factors, steps) =
        fitted.unwrap_or_else(|| (in_order(a_chain, b_chain, plan), plan.steps.clone()));
    scale_smallest(&mut factors, scale);
    match y {
        // One node for the apply and the add where the backward is registered.
        Some(y) => {
            let KronIntermediate { t, lead } = t;
            let (p_out, q_out) = out_axes(a_chain, b_chain);
            let y = y.reshape([t.dims()[0], p_out, q_out]);
            let out = autodiff::apply_steps_add(t, factors, &steps, y);
            KronIntermediate { t: out, lead }.finish()
        }
        None => t.apply_steps(factors, &steps).finish(),
    }
}

/// The result's `a` and `b` axes: the columns of the chains' last factors.
fn out_axes<B: Backend>(a_chain: &[Tensor<B, 2>], b_chain: &[Tensor<B, 2>]) -> (usize, usize) {
    let a = a_chain.last().expect("a chain is not empty");
    let b = b_chain.last().expect("b chain is not empty");
    (a.dims()[1], b.dims()[1])
}

/// The most multiply-adds per row [`dense_steps`] spends, as a multiple of the steps' own.
const DENSE_MACS_MAX: usize = 4;
/// The widest row intermediate [`dense_steps`] takes, in values: a rank-like width, so that
/// the last product's inner dimension (the intermediate's width, or its `q`) stays within one of
/// `gemm`'s depth blocks (its add into `y` is then the same sum, bit for bit, as the product
/// added to `y` after).
const DENSE_WIDTH_MAX: usize = 64;
/// The fewest rows [`dense_steps`] takes under autodiff, where `f ⊗ I_q` is built by a
/// broadcast multiply (on flex element by element: about 27 µs a call at `a` (2, 192)'s
/// shapes), more than the narrow steps cost on a few dozen rows (KronA with `a` (2, 192) on
/// 384 → 384 by Burn's products: 15 µs a call at 10 rows, 3.0 ms at 2,048). In inference it
/// is written on the host and the dense steps are faster from one row up (7 µs at 10 rows).
const DENSE_ROWS_MIN: usize = 64;

/// One step of [`dense_steps`]: a `b` step's factor `f [q, q']`, a product over `T`'s `n·p`
/// rows of `q` values; or an `a` step as `f ⊗ I_q` (`[p·q, p'·q]`), a product over its `n`
/// rows of `p·q` values.
enum DenseStep<B: Backend> {
    B(Tensor<B, 2>),
    A(Tensor<B, 2>),
}

/// The steps as dense products, for chains whose intermediates are too narrow for the host
/// rows' kernels (KronA with `a` (2, 192) on a 384-wide layer: `T [n, 2, 192]` through `b` to
/// `[n, 2, 2]`, then through `a`): a `b` step is `T [n·p, q] · f`, one product over all rows; an
/// `a` step, which contracts the middle axis, is `T [n, p·q] · (f ⊗ I_q)`, the factor's
/// Kronecker product with an identity (`[p·q, p'·q]`, never `A ⊗ B`), whose zeros cost `q`
/// times the step's multiply-adds. [`KronIntermediate::dense`] applies them by
/// `crate::product` (outputs of their own, the last added into `y`'s buffer; under autodiff
/// its nodes, an `a` factor's gradient through the identity product). A KronA's steps as
/// planned; a chain (Kron-LoRA, LoKr) as its products `A`, `B` ([`collapsed`]). `None` on
/// fewer than [`DENSE_ROWS_MIN`] rows under autodiff (`inference` false), where that costs
/// more than [`DENSE_MACS_MAX`] times the steps' own multiply-adds, or where an intermediate is
/// wider than [`DENSE_WIDTH_MAX`].
fn dense_steps<B: Backend>(
    inference: bool,
    [n, p, q]: [usize; 3],
    a_chain: &[Tensor<B, 2>],
    b_chain: &[Tensor<B, 2>],
    plan: &KronPlan,
    scale: f64,
) -> Option<Vec<DenseStep<B>>> {
    if n < DENSE_ROWS_MIN && !inference {
        return None;
    }
    let (mut factors, steps) = collapsed(a_chain, b_chain)
        .unwrap_or_else(|| (in_order(a_chain, b_chain, plan), plan.steps.clone()));
    let (mut pp, mut qq) = (p, q);
    let (mut own, mut dense) = (0usize, 0usize);
    for (i, (f, side)) in factors.iter().zip(&steps).enumerate() {
        let cols = f.dims()[1];
        let macs = pp * qq * cols;
        own += macs;
        match side {
            Side::A => {
                dense += macs * qq;
                pp = cols;
            }
            Side::B => {
                dense += macs;
                qq = cols;
            }
        }
        if i + 1 < steps.len() && pp * qq > DENSE_WIDTH_MAX {
            return None;
        }
    }
    if dense > DENSE_MACS_MAX * own {
        return None;
    }
    scale_smallest(&mut factors, scale);
    let mut qq = q;
    let dense = factors.into_iter().zip(&steps).map(|(f, side)| match side {
        Side::A => DenseStep::A(kron_identity(f, qq)),
        Side::B => {
            qq = f.dims()[1];
            DenseStep::B(f)
        }
    });
    Some(dense.collect())
}

/// `f ⊗ I_q` (`f [p, p']` → `[p·q, p'·q]`, `out[i·q + k, j·q + k] = f[i, j]`): on flex in
/// inference written from `f`'s values in one pass; elsewhere (under autodiff: differentiable)
/// one broadcast multiply.
fn kron_identity<B: Backend>(f: Tensor<B, 2>, q: usize) -> Tensor<B, 2> {
    let device = f.device();
    let [p, p2] = f.dims();
    if crate::quirks::host_loops_take(&f, &f) {
        let values = host::HostValues::of(f);
        let values = values.floats();
        let (rows, cols) = (p * q, p2 * q);
        let mut out = vec![0f32; rows * cols];
        for (i, row) in values.chunks_exact(p2).enumerate() {
            for k in 0..q {
                let o = &mut out[(i * q + k) * cols..][..cols];
                for (j, v) in row.iter().enumerate() {
                    o[j * q + k] = *v;
                }
            }
        }
        return Tensor::from_data(burn::tensor::TensorData::new(out, [rows, cols]), &device);
    }
    kron_broadcast(f, Tensor::eye(q, &device))
}

/// The chains' factors in `plan`'s step order.
fn in_order<B: Backend>(
    a_chain: &[Tensor<B, 2>],
    b_chain: &[Tensor<B, 2>],
    plan: &KronPlan,
) -> Vec<Tensor<B, 2>> {
    let (mut a, mut b) = (a_chain.iter().cloned(), b_chain.iter().cloned());
    (plan.steps.iter())
        .map(|side| match side {
            Side::A => a.next().expect("plan matches the a chain"),
            Side::B => b.next().expect("plan matches the b chain"),
        })
        .collect()
}

/// The factors and steps for the host rows, where `fits` takes them: the chains as planned, or
/// chains too narrow for the host kernels as their small products ([`collapsed`]).
fn host_factors<B: Backend>(
    a_chain: &[Tensor<B, 2>],
    b_chain: &[Tensor<B, 2>],
    plan: &KronPlan,
    fits: impl Fn(&[Tensor<B, 2>], &[Side]) -> bool,
) -> Option<(Vec<Tensor<B, 2>>, Vec<Side>)> {
    let factors = in_order(a_chain, b_chain, plan);
    if fits(&factors, &plan.steps) {
        return Some((factors, plan.steps.clone()));
    }
    collapsed(a_chain, b_chain).filter(|(factors, steps)| fits(factors, steps))
}

/// A chain of more than one factor a side (Kron-LoRA, LoKr) as a KronA: the chains' products
/// `A = a1·a2·…` and `B = b1·b2·…`, small `[a_in, a_out]` and `[b_in, b_out]` matrices (never
/// `A ⊗ B`), in the cheapest plan's order, and that plan's steps. For chains whose rank-wide
/// intermediates are too narrow for the host rows' kernel (a rank below 8). `None` for a KronA.
fn collapsed<B: Backend>(
    a_chain: &[Tensor<B, 2>],
    b_chain: &[Tensor<B, 2>],
) -> Option<(Vec<Tensor<B, 2>>, Vec<Side>)> {
    if a_chain.len() == 1 && b_chain.len() == 1 {
        return None;
    }
    let (a, b) = (chain_product(a_chain), chain_product(b_chain));
    let plan = KronPlan::cheapest(&[a.dims()], &[b.dims()]);
    let factors = plan.steps.iter().map(|side| match side {
        Side::A => a.clone(),
        Side::B => b.clone(),
    });
    Some((factors.collect(), plan.steps))
}

/// Does [`host::apply_rows`] take this apply: flex, `f32` values, no autodiff, and the shapes
/// [`host_rows_fit`]?
fn on_host_rows<B: Backend>(t: &Tensor<B, 3>, factors: &[Tensor<B, 2>], steps: &[Side]) -> bool {
    crate::quirks::host_loops_take(t, t)
        && factors.iter().all(|f| crate::quirks::host_loops_take(f, t))
        && host_rows_fit(t.dims(), factors, steps)
}

/// Do the host rows' kernels take these shapes (`t`: `[n, p, q]`): no factor or row
/// intermediate empty or beyond [`HOST_ROW_MAX`] / [`HOST_INTERMEDIATE_MAX`], and none narrower
/// than [`HOST_COLUMNS_MIN`]?
fn host_rows_fit<B: Backend>(
    [_, mut p, mut q]: [usize; 3],
    factors: &[Tensor<B, 2>],
    steps: &[Side],
) -> bool {
    let fits = |n: usize, max: usize| n > 0 && n <= max;
    let mut ok = fits(p * q, HOST_INTERMEDIATE_MAX) && q >= HOST_COLUMNS_MIN;
    for (f, side) in factors.iter().zip(steps) {
        let [rows, cols] = f.dims();
        ok &= fits(rows * cols, HOST_ROW_MAX);
        match side {
            Side::A => p = cols,
            Side::B => q = cols,
        }
        ok &= fits(p * q, HOST_INTERMEDIATE_MAX) && q >= HOST_COLUMNS_MIN;
    }
    ok
}

/// The intermediate of a Kronecker apply: the input `[..., p·q]` viewed as `T [n, p, q]`
/// (`p` on the `a` axis, `q` on the `b` axis), contracted one factor at a time.
///
/// [`kron_apply`] drives it from a [`KronPlan`]; block adapters use it directly to add a bias
/// between the two products. `T` is never transposed: a `b` factor contracts the last axis as
/// one GEMM over all `n·p` rows, and an `a` factor contracts the middle axis as a batched
/// product `mᵀ [1, p', p] · T [n, p, q]`, so no step copies the intermediate. The `a` step
/// goes through [`autodiff::contract_a`], whose backward (where registered) accumulates `m`'s
/// gradient over row chunks (or, for a large `m` on narrow columns, takes it as one product
/// over all rows) instead of building `[n, p', p]`.
pub struct KronIntermediate<B: Backend> {
    /// `[n, p, q]`, contiguous.
    t: Tensor<B, 3>,
    lead: Vec<usize>,
}

impl<B: Backend> KronIntermediate<B> {
    /// Views `x [..., p·q]` as `[n, p, q]`.
    pub fn new<const D: usize>(x: Tensor<B, D>, p: usize, q: usize) -> Self {
        let dims = x.dims();
        let lead = dims[..D - 1].to_vec();
        let n = lead.iter().product();
        Self {
            t: x.reshape([n, p, q]),
            lead,
        }
    }

    /// Contracts `factors[i]` on `steps[i]`'s axis, first to last, as one autodiff node where
    /// registered ([`autodiff::apply_steps`]).
    pub fn apply_steps(mut self, factors: Vec<Tensor<B, 2>>, steps: &[Side]) -> Self {
        self.t = autodiff::apply_steps(self.t, factors, steps);
        self
    }

    /// Contracts the `a` axis with `m [p, p']`: `T'[r] = mᵀ·T[r]` for every row `r`.
    pub fn apply_a(mut self, m: Tensor<B, 2>) -> Self {
        self.t = autodiff::contract_a(m, self.t);
        self
    }

    /// Contracts the `b` axis with `m [q, q']`.
    pub fn apply_b(mut self, m: Tensor<B, 2>) -> Self {
        self.t = matmul_last(self.t, m);
        self
    }

    /// The result of [`dense_steps`] applied to `T` one after the other, the last added to `y`
    /// where given: flex's products where they take them, else Burn's.
    fn dense<const D: usize>(
        self,
        steps: Vec<DenseStep<B>>,
        y: Option<Tensor<B, D>>,
    ) -> Tensor<B, D> {
        let Self { t, lead } = self;
        let [n, mut p, mut q] = t.dims();
        let last = steps.len() - 1;
        let mut h: Tensor<B, 2> = t.reshape([n, p * q]);
        let mut y = y.map(|y| {
            let d = y.dims()[D - 1];
            y.reshape([n, d])
        });
        for (i, step) in steps.into_iter().enumerate() {
            // The step's rows and their product's operand: `[n·p, q]` for a `b` step.
            let (rows, m) = match step {
                DenseStep::B(f) => {
                    q = f.dims()[1];
                    (n * p, f)
                }
                DenseStep::A(m) => {
                    p = m.dims()[1] / q;
                    (n, m)
                }
            };
            let x = h.reshape([rows, m.dims()[0]]);
            let add = if i == last { y.take() } else { None };
            h = match add.map(|y| y.reshape([rows, m.dims()[1]])) {
                Some(y) if crate::product::takes(&x, &m, Some(&y)) => {
                    crate::product::product(x, m, Some(y))
                }
                Some(y) => x.matmul(m) + y,
                None => crate::product::matmul(x, m),
            }
            .reshape([n, p * q]);
        }
        let mut dims = [0; D];
        dims[..D - 1].copy_from_slice(&lead);
        dims[D - 1] = p * q;
        h.reshape(dims)
    }

    /// Adds `bias [q]` along the `b` axis (broadcast over rows and the `a` axis).
    pub fn add_b_bias(mut self, bias: Tensor<B, 1>) -> Self {
        let q = bias.dims()[0];
        self.t = self.t + bias.reshape([1, 1, q]);
        self
    }

    /// The result `[..., p'·q']`, in Kronecker index order.
    pub fn finish<const D: usize>(self) -> Tensor<B, D> {
        let [_, p, q] = self.t.dims();
        let mut dims = [0; D];
        dims[..D - 1].copy_from_slice(&self.lead);
        dims[D - 1] = p * q;
        self.t.reshape(dims)
    }
}

/// `t [n, u, v] · m [v, w] → [n, u, w]` as one GEMM over `n·u` rows.
pub(crate) fn matmul_last<B: Backend>(t: Tensor<B, 3>, m: Tensor<B, 2>) -> Tensor<B, 3> {
    let [n, u, v] = t.dims();
    let w = m.dims()[1];
    let t2: Tensor<B, 2> = t.reshape([n * u, v]);
    t2.matmul(m).reshape([n, u, w])
}

/// Computes `x·W` for a PHM weight (Compacter's parameterized hypercomplex multiplication)
/// `W = Σᵢ rule[i] ⊗ (s[:, i] · t[i, :])`, a sum of `k` Kronecker products whose right factors
/// have rank 1, without building `W`.
///
/// With `x` viewed as `X [N, n, p]`: `Z = X·s` (`[N, n, k]`), then each term's `rule[i]`
/// contracts the `n` axis of `Z[.., i]` (a batched product over `i`), then `·t` sums the terms.
/// Multiply-adds per row: `k·(n·p + n·n' + n'·q)`, against `n·p·n'·q` for `x·W` materialized.
///
/// # Shapes
/// - `x`: `[..., n·p]`
/// - `rule`: `[k, n, n']` (term `i` is `rule[i]`, `[n, n']`)
/// - `s`: `[p, k]` (column `i` is the left vector of term `i`)
/// - `t`: `[k, q]` (row `i` is the right vector of term `i`)
/// - output: `[..., n'·q]`
pub fn phm_apply<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    rule: Tensor<B, 3>,
    s: Tensor<B, 2>,
    t: Tensor<B, 2>,
) -> Tensor<B, D> {
    let [_, n, n2] = rule.dims();
    let p = s.dims()[0];
    let q = t.dims()[1];
    let dims = x.dims();
    let rows: usize = dims[..D - 1].iter().product();
    // Z [rows, n, k] = X [rows·n, p] · s [p, k]
    let z = matmul_last(x.reshape([rows, n, p]), s);
    // U [k, rows, n'] = Z [k, rows, n] ·(batched over k) rule [k, n, n']
    let u = z.permute([2, 0, 1]).matmul(rule);
    // Y [rows, n', q] = U [rows, n', k] · t [k, q]
    let y = matmul_last(u.permute([1, 2, 0]), t);
    let mut out = dims;
    out[D - 1] = n2 * q;
    y.reshape(out)
}

/// The PHM weight `W = Σᵢ rule[i] ⊗ (s[:, i] · t[i, :])`, materialized (`[n·p, n'·q]`), for
/// references and inspection only.
pub fn phm_weight<B: Backend>(
    rule: Tensor<B, 3>,
    s: Tensor<B, 2>,
    t: Tensor<B, 2>,
) -> Tensor<B, 2> {
    let [k, n, n2] = rule.dims();
    let p = s.dims()[0];
    let q = t.dims()[1];
    (0..k)
        .map(|i| {
            let a: Tensor<B, 2> = rule.clone().slice(i..i + 1).reshape([n, n2]);
            let outer = s
                .clone()
                .slice([0..p, i..i + 1])
                .matmul(t.clone().slice(i..i + 1));
            kron(a, outer)
        })
        .reduce(|acc, w| acc + w)
        .unwrap_or_else(|| Tensor::zeros([n * p, n2 * q], &s.device()))
}

/// `scale` folded into the smallest of `factors` (the first of equal size), unless it is 1.
fn scale_smallest<B: Backend>(factors: &mut [Tensor<B, 2>], scale: f64) {
    if scale == 1.0 {
        return;
    }
    let numel = |i: &usize| factors[*i].shape().num_elements();
    if let Some(i) = (0..factors.len()).min_by_key(numel) {
        factors[i] = factors[i].clone().mul_scalar(scale);
    }
}
