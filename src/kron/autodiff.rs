//! The Kronecker apply's hand-written backward on Burn's autodiff backend.
//!
//! Differentiated by Burn operation by operation, `x·(A ⊗ B)` keeps every intermediate of its
//! contraction steps until the backward (one activation-sized `[n, p', q]` tensor per step but
//! the last, per adapted layer), and the gradient of an `a` factor goes through a `[n, p', p]`
//! tensor summed over the `n` rows. This module replaces both:
//!
//! * [`apply_steps`] runs the steps of a [`KronPlan`](super::KronPlan) as **one autodiff node**
//!   that keeps only its input `T [n, p, q]` and the factors, and recomputes the intermediates
//!   in its backward (one extra forward of every step but the last). A Kronecker adapter then
//!   holds what a LoRA adapter holds between forward and backward: its input. Each step's
//!   gradients, last step first, each intermediate dropped once used:
//!   - `Side::B`, `out = T₂·f` (`T₂ [n·p, q]`): `∂f = T₂ᵀ·G₂`, `∂T = G·fᵀ`;
//!   - `Side::A`, `out[r] = fᵀ·T[r]`: `∂T[r] = f·G[r]` and `∂f = Σ_r T[r]·G[r]ᵀ`.
//!
//!   With no factor tracked (frozen factors, only `T` needs a gradient) the node keeps only the
//!   factors and recomputes nothing: `∂T` is the forward of the transposed factors in reverse
//!   order, applied to `G`.
//!
//!   An adapter added to its layer's frozen product (`kron_apply_add`) makes `y` a further
//!   input of the same node: `out = y + steps(T)`, `∂y = G` (the same tensor, shared). On
//!   flex the forward's last step adds into `y`'s buffer, so the adapter's output has no
//!   buffer of its own (whose pages the kernel would fault in on every forward) and the add no
//!   node or pass.
//! * [`contract_a`] is one `a` step as its own node (for the block adapters, which add a bias
//!   between the steps), with the same `∂f`.
//!
//! `∂f` of an `a` step is accumulated over row chunks sized so that a chunk's partial products
//! `[c, p, p']` stay within an eighth of `T` (and at most 16 chunks): never the `[n, p', p]`
//! tensor. Where the factor outweighs a row's intermediates (`p·p' > q·(p + p')`: a large `a`
//! on narrow columns, whose chunked products would have an inner dimension of `q`), it is one
//! product over all `n·q` columns instead, `T` and `G` copied to `[p, n·q]` and `[p', n·q]`
//! (a Mistral-7B block's KronA at LoRA-8's budget, `a` 512 × 256 on 8 columns: 15.0 → 12.8 s
//! a step, docs/benchmarks.md). On burn-flex the `a` steps and their gradients run the host
//! loops of `kron::host` instead (where `quirks::host_loops_take` says; the factor's gradient
//! only up to `host::FACTOR_GRAD_MAX`), both gradients of a step from one read of its `G`.
//! Where every factor and row intermediate fits the host rows of inference
//! (`kron::on_host_rows`), the node's forward is `host::apply_rows` and its backward
//! `host::apply_grads`: every step, the `b` steps too, a chunk of rows at a time with its
//! intermediates in the cache, no tensor between the steps (a MiniLM KronA step 577 → 546 ms,
//! docs/benchmarks-history.md). Both read
//! `T`, `G` and the factors in flex's own buffers (`quirks::host_floats`), where reading a
//! shared tensor's values would copy it.
//!
//! # Why a registry
//! A backward is registered on Burn's `Autodiff<I, C>` backend through its inner backend `I`,
//! which generic code over `B: Backend` cannot name: Rust has no specialization, and a trait
//! bound beyond `Backend` would change every adapter's `Module<B: Backend>` shape. So the
//! backward is registered per autodiff backend type at run time by [`register_backward`]
//! (generic over `AB: AutodiffBackend`, so the library names no backend), and [`apply_steps`]
//! and [`contract_a`] look the backend up by `TypeId`: registered, the hand-written node; not
//! registered (any backend without autodiff, or an autodiff backend nobody registered), Burn's
//! own differentiation of the same products ([`apply_steps_composite`],
//! [`contract_a_composite`]). Both give the same values and gradients up to float rounding.
//!
//! The same registration gives burn-flex's softmax a node (`host_softmax`: the host forward,
//! the output kept, `y·(g − Σ g·y)` per row on the host; `quirks::softmax`), and its GELU and
//! SiLU a node of their own (`host_unary`,
//! used by `quirks::gelu` and `quirks::silu`): forward and backward by the crate's vectorized
//! host kernels (`crate::act`) instead of flex's scalar `erff`/`expf` per element, the input's
//! values kept for the backward. On every backend it gives the decoder's attention one node
//! that keeps no probabilities and recomputes them in its backward, a block of query rows at a
//! time (`crate::model::attention`).
//!
//! # Threads
//! Burn 0.21's autodiff, at the end of every `backward()`, frees the steps of any graph none of
//! whose nodes a tensor still references — the graphs other threads are building included
//! (tracel-ai/burn#5573, fixed after 0.21). A node that takes its inputs' primitives out before
//! registering its own step lets go of those references while it computes; where an input is
//! the only node of its graph (the first operation on parameters after a backward pass: a
//! Kron-LoRA's `b₁·b₂`), a backward pass finishing on another thread meanwhile frees that
//! input's step, and the parameters behind it silently get no gradient. The crate's training
//! steps run backward passes on several threads at once (`crate::shards`, `crate::parallel`),
//! so every node here holds its inputs' references until its step is registered (`held`),
//! and the crate joins tracked tensors with [`cat`] rather than Burn's `Tensor::cat`, which
//! drops them first; a model of one's own trained that way should too.
//!
//! The crate's training loops (`finetune`, `llm`, `learner`, `parallel`) register their
//! backend themselves, unless [`unregister_backward`] opted it out (the recomputation costs
//! about 5% of a MiniLM step for a fifth less memory); a training loop of one's own calls
//! [`register_backward`] once.
//!
//! ```
//! use burn::backend::{Autodiff, NdArray};
//! use kron_adapters::kron::autodiff::{is_registered, register_backward};
//!
//! assert!(register_backward::<Autodiff<NdArray>>());
//! assert!(is_registered::<Autodiff<NdArray>>());
//! assert!(!is_registered::<NdArray>()); // no autodiff: nothing to register
//! ```

use std::any::{Any, TypeId};
use std::sync::{Arc, RwLock};

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::{
    BalancedCheckpointing, CheckpointStrategy, NoCheckpointing,
};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::{Autodiff, NodeId};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::ops::FloatTensor;
use burn::tensor::quantization::QuantScheme;
use burn::tensor::{Tensor, TensorPrimitive};

use super::{host, matmul_last, Side};
use crate::act::HostFn;
use crate::quirks;

/// `out[r] = mᵀ·T[r]`: contracts the middle axis of `t` with `m`, with this module's backward
/// where [`register_backward`] registered `B`, and Burn's otherwise. On burn-flex (`f32`) the
/// products run the crate's host loops: inside the registered node, and without autodiff.
///
/// # Shapes
/// - `m`: `[p, p']`
/// - `t`: `[n, p, q]`
/// - output: `[n, p', q]`
pub fn contract_a<B: Backend>(m: Tensor<B, 2>, t: Tensor<B, 3>) -> Tensor<B, 3> {
    let Some(registered) = lookup(TypeId::of::<B>()) else {
        return a_step(m, t);
    };
    match (m.into_primitive(), t.into_primitive()) {
        (TensorPrimitive::Float(m), TensorPrimitive::Float(t)) => {
            let out = (registered.contract)(Box::new(m), Box::new(t));
            let out = *out
                .downcast::<FloatTensor<B>>()
                .expect("the registered function is the one for B's TypeId");
            Tensor::from_primitive(TensorPrimitive::Float(out))
        }
        // A quantized operand (a quantized adapter's factor): Burn's own path handles it.
        (m, t) => contract_a_composite(Tensor::from_primitive(m), Tensor::from_primitive(t)),
    }
}

/// `out[r] = mᵀ·T[r]` as one broadcast batched product, differentiated by Burn's autodiff
/// (whose gradient of `m` goes through a `[n, p', p]` tensor). The reference [`contract_a`]
/// is checked against, and its path on unregistered backends.
///
/// # Shapes
/// As [`contract_a`].
pub fn contract_a_composite<B: Backend>(m: Tensor<B, 2>, t: Tensor<B, 3>) -> Tensor<B, 3> {
    m.transpose().unsqueeze::<3>().matmul(t)
}

/// Applies `factors` to `t` in order, `steps[i]` saying which axis `factors[i]` contracts
/// (`Side::A`: the middle axis, `out[r] = fᵀ·T[r]`; `Side::B`: the last, `T·f`), as one
/// autodiff node where [`register_backward`] registered `B` (for 2 to 4 factors): it keeps only
/// `t` and the factors for the backward and recomputes the intermediates there, so a layer's
/// Kronecker adapter holds no activation of its own between the forward and the backward.
/// Elsewhere, one step at a time ([`contract_a`] for the `a` steps).
///
/// # Shapes
/// - `t`: `[n, p, q]`
/// - `factors[i]`: `[p, p']` for an `A` step, `[q, q']` for a `B` step, chaining
/// - output: `[n, p_last, q_last]`
pub fn apply_steps<B: Backend>(
    t: Tensor<B, 3>,
    factors: Vec<Tensor<B, 2>>,
    steps: &[Side],
) -> Tensor<B, 3> {
    apply_inner(t, factors, steps, None)
}

/// `y + apply_steps(t, factors, steps)`. Where [`register_backward`] registered `B`, one
/// autodiff node whose forward on the host rows (flex) adds into `y`'s buffer, so that the
/// adapter's output has no tensor of its own and the add no pass or node (`∂y` is the output's
/// gradient, shared); elsewhere [`apply_steps`] and an add.
///
/// # Shapes
/// - `t`, `factors`: as [`apply_steps`]
/// - `y`, output: `[n, p_last, q_last]`
pub(crate) fn apply_steps_add<B: Backend>(
    t: Tensor<B, 3>,
    factors: Vec<Tensor<B, 2>>,
    steps: &[Side],
    y: Tensor<B, 3>,
) -> Tensor<B, 3> {
    apply_inner(t, factors, steps, Some(y))
}

/// [`apply_steps`], plus `y` where given.
fn apply_inner<B: Backend>(
    t: Tensor<B, 3>,
    factors: Vec<Tensor<B, 2>>,
    steps: &[Side],
    y: Option<Tensor<B, 3>>,
) -> Tensor<B, 3> {
    debug_assert_eq!(factors.len(), steps.len(), "one factor per step");
    let plus = |out: Tensor<B, 3>, y: Option<Tensor<B, 3>>| match y {
        Some(y) => out + y,
        None => out,
    };
    let registered = lookup(TypeId::of::<B>()).filter(|_| (2..=4).contains(&factors.len()));
    let fused = registered.is_none() && lookup_pair(TypeId::of::<B>()).is_some();
    if registered.is_none() && !fused {
        return plus(apply_steps_composite(t, factors, steps), y);
    }
    let t = t.into_primitive();
    let factors: Vec<_> = factors.into_iter().map(Tensor::into_primitive).collect();
    let y = y.map(Tensor::into_primitive);
    let all_float = [&t]
        .into_iter()
        .chain(&factors)
        .chain(&y)
        .all(|p| matches!(p, TensorPrimitive::Float(_)));
    if !all_float {
        // A quantized factor: Burn's own path handles it.
        let factors = factors.into_iter().map(Tensor::from_primitive).collect();
        let out = apply_steps_composite(Tensor::from_primitive(t), factors, steps);
        return plus(out, y.map(Tensor::from_primitive));
    }
    let Some(registered) = registered else {
        // No autodiff node on `B`, but its fused kernel (`kron::cube`).
        let factors = factors.into_iter().map(|f| f.tensor());
        let out = forward::<B>(t.tensor(), factors, steps, y.map(|y| y.tensor()));
        return Tensor::from_primitive(TensorPrimitive::Float(out));
    };
    let erase = |p: TensorPrimitive<B>| -> Box<dyn Any> { Box::new(p.tensor()) };
    let factors = factors.into_iter().map(erase).collect();
    let out = (registered.apply)(erase(t), factors, steps, y.map(erase));
    let out = *out
        .downcast::<FloatTensor<B>>()
        .expect("the registered function is the one for B's TypeId");
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

/// [`apply_steps`] one step at a time, each differentiated on its own (the `a` steps by
/// [`contract_a`]): every intermediate is kept for the backward.
pub fn apply_steps_composite<B: Backend>(
    t: Tensor<B, 3>,
    factors: Vec<Tensor<B, 2>>,
    steps: &[Side],
) -> Tensor<B, 3> {
    factors
        .into_iter()
        .zip(steps)
        .fold(t, |t, (f, side)| match side {
            Side::A => contract_a(f, t),
            Side::B => matmul_last(t, f),
        })
}

/// Registers the hand-written backward for the autodiff backend `AB`, so that [`apply_steps`]
/// and [`contract_a`] (and with them every Kronecker adapter's apply) use it, and on flex the
/// host GELU and SiLU nodes. Returns `false`,
/// registering nothing, when `AB` is not Burn's `Autodiff<I>` (with no checkpointing or
/// balanced checkpointing), the only autodiff backend whose graph this crate can extend.
/// Registering again is a no-op.
pub fn register_backward<AB: AutodiffBackend>() -> bool {
    set::<AB>(true)
}

/// What the crate's training loops call: [`register_backward`], unless
/// [`unregister_backward`] opted `AB` out.
#[cfg_attr(not(feature = "finetune"), allow(dead_code))] // the loops need `finetune`
pub(crate) fn register_default<AB: AutodiffBackend>() -> bool {
    set::<AB>(false)
}

/// Registers `AB` (`force`: also over an opt-out).
fn set<AB: AutodiffBackend>(force: bool) -> bool {
    let id = TypeId::of::<AB>();
    set_quantized::<AB>();
    // The training loops call this every step: a read lock when it is already settled.
    if !force && known(id) {
        return true;
    }
    type I<AB> = <AB as AutodiffBackend>::InnerBackend;
    let erased = if id == TypeId::of::<Autodiff<I<AB>>>() {
        Registered {
            contract: contract_erased::<I<AB>, NoCheckpointing>,
            apply: apply_erased::<I<AB>, NoCheckpointing>,
            unary: unary_erased::<I<AB>, NoCheckpointing>,
            softmax: softmax_erased::<I<AB>, NoCheckpointing>,
            product: crate::product::erased::<I<AB>, NoCheckpointing>,
            contiguous: contiguous_erased::<I<AB>, NoCheckpointing>,
            batched: crate::product::batched_erased::<I<AB>, NoCheckpointing>,
            attention: crate::model::attention::erased::<I<AB>, NoCheckpointing>,
        }
    } else if id == TypeId::of::<Autodiff<I<AB>, BalancedCheckpointing>>() {
        Registered {
            contract: contract_erased::<I<AB>, BalancedCheckpointing>,
            apply: apply_erased::<I<AB>, BalancedCheckpointing>,
            unary: unary_erased::<I<AB>, BalancedCheckpointing>,
            softmax: softmax_erased::<I<AB>, BalancedCheckpointing>,
            product: crate::product::erased::<I<AB>, BalancedCheckpointing>,
            contiguous: contiguous_erased::<I<AB>, BalancedCheckpointing>,
            batched: crate::product::batched_erased::<I<AB>, BalancedCheckpointing>,
            attention: crate::model::attention::erased::<I<AB>, BalancedCheckpointing>,
        }
    } else {
        return false;
    };
    let mut registry = REGISTRY.write().unwrap_or_else(|e| e.into_inner());
    match registry.iter_mut().find(|(known, _)| *known == id) {
        Some((_, entry)) if force || entry.is_some() => *entry = Some(erased),
        Some(_) => {} // opted out
        None => registry.push((id, Some(erased))),
    }
    true
}

/// Gives `AB` (Burn's `Autodiff<I>`, with no or balanced checkpointing) the operations on
/// quantized tensors its own backend leaves unimplemented (`crate::qproduct`'s autodiff module):
/// frozen weights held in int8 then train under it. Set by [`register_backward`] and the
/// training loops' registration, and kept through [`unregister_backward`] (nothing else runs
/// them).
fn set_quantized<AB: AutodiffBackend>() {
    let id = TypeId::of::<AB>();
    if find(&QUANTIZED, id).is_some() {
        return;
    }
    type I<AB> = <AB as AutodiffBackend>::InnerBackend;
    let product = if id == TypeId::of::<Autodiff<I<AB>>>() {
        crate::qproduct::product_erased::<I<AB>, NoCheckpointing>
    } else if id == TypeId::of::<Autodiff<I<AB>, BalancedCheckpointing>>() {
        crate::qproduct::product_erased::<I<AB>, BalancedCheckpointing>
    } else {
        return;
    };
    let ops = QuantizedOps {
        quantize: crate::qproduct::quantize_erased::<AB>,
        dequantize: crate::qproduct::dequantize_erased::<AB>,
        product,
        embed: crate::qproduct::embed_erased::<AB>,
    };
    let mut table = QUANTIZED.write().unwrap_or_else(|e| e.into_inner());
    if !table.iter().any(|(known, _)| *known == id) {
        table.push((id, ops));
    }
}

/// Operations on quantized tensors under one registered autodiff backend, their tensors
/// type-erased (`crate::qproduct`'s autodiff module).
#[derive(Clone, Copy)]
pub(crate) struct QuantizedOps {
    /// A float primitive quantized with a scheme: a quantized primitive, untracked.
    pub(crate) quantize: fn(Box<dyn Any>, &QuantScheme) -> Box<dyn Any>,
    /// A quantized primitive dequantized: a float primitive, untracked.
    pub(crate) dequantize: ErasedCopy,
    /// `x·w + c` (`true`: `x·wᵀ`, no `c`) with `w` quantized, as one node.
    pub(crate) product: ErasedQProduct,
    /// Rows (an int primitive) of a quantized table: a float primitive, untracked.
    pub(crate) embed: ErasedContract,
}

/// `x·w + c` or `x·wᵀ` with `w` quantized on one registered backend: `x`, `w` (quantized), `c`
/// where given, whether `w` is transposed, and the result, that backend's primitives.
type ErasedQProduct = fn(Box<dyn Any>, Box<dyn Any>, Option<Box<dyn Any>>, bool) -> Box<dyn Any>;

/// Backends given [`QuantizedOps`] by [`set_quantized`].
static QUANTIZED: RwLock<Vec<(TypeId, QuantizedOps)>> = RwLock::new(Vec::new());

/// `B`'s operations on quantized tensors, where `B` is an autodiff backend registered
/// ([`register_backward`] or a training loop's registration).
pub(crate) fn quantized_ops<B: Backend>() -> Option<QuantizedOps> {
    find(&QUANTIZED, TypeId::of::<B>())
}

/// Opts `AB` out: [`apply_steps`] and [`contract_a`] fall back to Burn's differentiation (the
/// same values and gradients up to rounding; the intermediates kept, about 5% less time per
/// step on MiniLM, docs/benchmarks-history.md), also in the crate's training loops, until
/// [`register_backward`]. Returns whether it was registered.
pub fn unregister_backward<AB: AutodiffBackend>() -> bool {
    let id = TypeId::of::<AB>();
    let mut registry = REGISTRY.write().unwrap_or_else(|e| e.into_inner());
    match registry.iter_mut().find(|(known, _)| *known == id) {
        Some((_, entry)) => entry.take().is_some(),
        None => {
            registry.push((id, None));
            false
        }
    }
}

/// Do [`apply_steps`] and [`contract_a`] use the hand-written backward on backend `B`?
pub fn is_registered<B: Backend>() -> bool {
    lookup(TypeId::of::<B>()).is_some()
}

/// `contract_a` on one registered backend, with its tensors type-erased: both arguments and
/// the result are that backend's float primitives.
type ErasedContract = fn(Box<dyn Any>, Box<dyn Any>) -> Box<dyn Any>;

/// `apply_steps` on one registered backend: `T`, the factors in step order, the steps, and
/// the tensor the result is added to, if any.
type ErasedApply =
    fn(Box<dyn Any>, Vec<Box<dyn Any>>, &[Side], Option<Box<dyn Any>>) -> Box<dyn Any>;

/// An activation through its host kernel (`crate::act`) on one registered backend: `x` and
/// the result are that backend's float primitives.
type ErasedUnary = fn(Box<dyn Any>, HostFn) -> Box<dyn Any>;

/// Softmax over rows of the given width through the host kernel (`crate::act`) on one
/// registered backend: `x` and the result are that backend's float primitives.
type ErasedSoftmax = fn(Box<dyn Any>, usize) -> Box<dyn Any>;

/// `x·w + c` (`crate::product`) on one registered backend: `x`, `w`, `c` where given, and the
/// result, that backend's float primitives.
type ErasedProduct = fn(Box<dyn Any>, Box<dyn Any>, Option<Box<dyn Any>>) -> Box<dyn Any>;

/// A tensor made contiguous (`quirks::host_contiguous`) on one registered backend: the tensor
/// and the result, that backend's float primitives.
type ErasedCopy = fn(Box<dyn Any>) -> Box<dyn Any>;

/// A registered backend's operations.
#[derive(Clone, Copy)]
struct Registered {
    contract: ErasedContract,
    apply: ErasedApply,
    unary: ErasedUnary,
    softmax: ErasedSoftmax,
    product: ErasedProduct,
    contiguous: ErasedCopy,
    batched: ErasedContract,
    attention: ErasedAttention,
}

/// `crate::model::attention`'s node on one registered backend: `q`, `kt`, `v`, the mask (that
/// backend's float primitives) and the query rows a block; the result, likewise.
pub(crate) type ErasedAttention =
    fn(Box<dyn Any>, Box<dyn Any>, Box<dyn Any>, Box<dyn Any>, usize) -> Box<dyn Any>;

/// `B`'s attention node (`crate::model::attention`), where `B` is registered.
pub(crate) fn registered_attention<B: Backend>() -> Option<ErasedAttention> {
    lookup(TypeId::of::<B>()).map(|r| r.attention)
}

/// Backends registered (`Some`) or opted out (`None`).
static REGISTRY: RwLock<Vec<(TypeId, Option<Registered>)>> = RwLock::new(Vec::new());

/// Is `id` registered or opted out?
fn known(id: TypeId) -> bool {
    find(&REGISTRY, id).is_some()
}

fn lookup(id: TypeId) -> Option<Registered> {
    find(&REGISTRY, id).flatten()
}

/// The entry for backend `id` in one of this module's registries.
fn find<T: Copy>(table: &RwLock<Vec<(TypeId, T)>>, id: TypeId) -> Option<T> {
    let table = table.read().unwrap_or_else(|e| e.into_inner());
    table
        .iter()
        .find(|(known, _)| *known == id)
        .map(|(_, entry)| *entry)
}

/// A fused kernel for one `a` step and one `b` step on one backend, its tensors type-erased:
/// `T`, the `a` factor, the `b` factor, and the result, all that backend's float primitives.
pub(crate) type ErasedPair = fn(Box<dyn Any>, Box<dyn Any>, Box<dyn Any>) -> Box<dyn Any>;

/// Backends with a fused kernel for adjacent `a`/`b` steps (`kron::cube`), by their `TypeId`.
static PAIRS: RwLock<Vec<(TypeId, ErasedPair)>> = RwLock::new(Vec::new());

/// Sets (`Some`) or removes (`None`) backend `id`'s fused kernel; returns whether it had one.
#[cfg_attr(not(feature = "cube"), allow(dead_code))] // set by `kron::cube`
pub(crate) fn set_pair(id: TypeId, pair: Option<ErasedPair>) -> bool {
    let mut pairs = PAIRS.write().unwrap_or_else(|e| e.into_inner());
    let had = pairs.iter().position(|(known, _)| *known == id);
    if let Some(at) = had {
        pairs.remove(at);
    }
    if let Some(pair) = pair {
        pairs.push((id, pair));
    }
    had.is_some()
}

#[cfg_attr(not(feature = "cube"), allow(dead_code))]
pub(crate) fn has_pair(id: TypeId) -> bool {
    lookup_pair(id).is_some()
}

fn lookup_pair(id: TypeId) -> Option<ErasedPair> {
    find(&PAIRS, id)
}

fn contract_erased<I: Backend, C: CheckpointStrategy>(
    m: Box<dyn Any>,
    t: Box<dyn Any>,
) -> Box<dyn Any> {
    let expect = "registered under Autodiff<I, C>'s TypeId, so its primitives are these";
    let m = *m.downcast::<FloatTensor<Autodiff<I, C>>>().expect(expect);
    let t = *t.downcast::<FloatTensor<Autodiff<I, C>>>().expect(expect);
    Box::new(contract_tracked::<I, C>(m, t))
}

/// The autodiff node: the forward on the inner backend, and the state its backward needs.
fn contract_tracked<I: Backend, C: CheckpointStrategy>(
    m: FloatTensor<Autodiff<I, C>>,
    t: FloatTensor<Autodiff<I, C>>,
) -> FloatTensor<Autodiff<I, C>> {
    let (m_tracked, t_tracked) = (m.is_tracked(), t.is_tracked());
    match ContractA
        .prepare::<C>([m.node.clone(), t.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(mut prep) => {
            // ∂m needs T, ∂T needs m.
            let m_state = t_tracked.then(|| prep.checkpoint(&m));
            let t_state = m_tracked.then(|| prep.checkpoint(&t));
            prep.finish(
                (m_state, t_state),
                forward::<I>(t.primitive, [m.primitive], &[Side::A], None),
            )
        }
        OpsKind::UnTracked(prep) => {
            prep.finish(forward::<I>(t.primitive, [m.primitive], &[Side::A], None))
        }
    }
}

/// The forward of a node on the inner backend: `factors` applied to `t` by [`step_forward`],
/// or, where a fused kernel is registered for `I` ([`set_pair`]), adjacent `a`/`b` steps as one
/// launch of it, or on the host rows where they take the apply (`kron::on_host_rows`: flex);
/// plus `y` where given (on the host rows added into `y`'s buffer, the same sums as the add).
fn forward<I: Backend>(
    t: FloatTensor<I>,
    factors: impl IntoIterator<Item = FloatTensor<I>>,
    steps: &[Side],
    y: Option<FloatTensor<I>>,
) -> FloatTensor<I> {
    let pair = lookup_pair(TypeId::of::<I>());
    let mut t = float::<I, 3>(t);
    let y = y.map(float::<I, 3>);
    let factors: Vec<Tensor<I, 2>> = factors.into_iter().map(float::<I, 2>).collect();
    if pair.is_none()
        && super::on_host_rows(&t, &factors, steps)
        && y.as_ref().is_none_or(|y| quirks::host_loops_take(&t, y))
    {
        return host::apply_rows_kept(t, factors, steps, y)
            .into_primitive()
            .tensor();
    }
    let mut factors = factors.into_iter();
    let mut i = 0;
    while let Some(f) = factors.next() {
        let side = steps[i];
        match pair {
            Some(pair) if steps.get(i + 1).is_some_and(|&next| next != side) => {
                let g = factors.next().expect("one factor per step");
                let (fa, fb) = match side {
                    Side::A => (f, g),
                    Side::B => (g, f),
                };
                let erase =
                    |p: Tensor<I, 2>| -> Box<dyn Any> { Box::new(p.into_primitive().tensor()) };
                let out = pair(Box::new(t.into_primitive().tensor()), erase(fa), erase(fb));
                let out = *out
                    .downcast::<FloatTensor<I>>()
                    .expect("the registered kernel is the one for I's TypeId");
                t = float::<I, 3>(out);
                i += 2;
            }
            _ => {
                t = step_forward(t, f, side);
                i += 1;
            }
        }
    }
    match y {
        Some(y) => (t + y).into_primitive().tensor(),
        None => t.into_primitive().tensor(),
    }
}

pub(crate) fn float<I: Backend, const D: usize>(p: FloatTensor<I>) -> Tensor<I, D> {
    Tensor::from_primitive(TensorPrimitive::Float(p))
}

/// The references of a node's inputs to their graph nodes, to hold until the node's step is
/// registered (module docs, "Threads").
pub(crate) fn held<I: Backend, C: CheckpointStrategy, const N: usize>(
    inputs: &[FloatTensor<Autodiff<I, C>>; N],
) -> [Arc<NodeId>; N] {
    inputs.each_ref().map(|t| t.rc.clone())
}

/// `Tensor::cat(tensors, dim)`, the inputs held until the result's step is registered: Burn
/// 0.21's `cat` lets go of them first, and a backward pass ending on another thread meanwhile
/// can free the step of an input whose graph has no other live tensor — its parameters then
/// silently get no gradient (module docs, "Threads"). Use it in a model of one's own that is
/// trained in parts or on several devices (`crate::shards`, `crate::parallel`) wherever it joins
/// tracked tensors. It holds a clone of each input (a reference, no copy); a lone tensor is
/// returned as it is (Burn's `cat` would copy it).
///
/// # Panics
/// As `Tensor::cat`: no tensors, or shapes that differ off `dim`.
///
/// ```
/// use burn::backend::{Autodiff, NdArray};
/// use burn::tensor::Tensor;
/// use kron_adapters::kron::autodiff::cat;
///
/// type B = Autodiff<NdArray>;
/// let device = Default::default();
/// let w = Tensor::<B, 2>::from_floats([[1.0, 2.0]], &device).require_grad();
/// let joined = cat(vec![w.clone() * 2.0, w.clone().exp()], 0); // [2, 2]
/// let grads = joined.sum().backward();
/// let g = w.grad(&grads).unwrap().into_data().to_vec::<f32>().unwrap();
/// assert!((g[0] - (2.0 + 1f32.exp())).abs() < 1e-5);
/// ```
pub fn cat<B: Backend, const D: usize>(mut tensors: Vec<Tensor<B, D>>, dim: usize) -> Tensor<B, D> {
    if tensors.len() == 1 {
        return tensors.pop().expect("one tensor");
    }
    let inputs = tensors.clone();
    let out = Tensor::cat(tensors, dim);
    drop(inputs);
    out
}

#[derive(Debug)]
struct ContractA;

impl<I: Backend> Backward<I, 2> for ContractA {
    /// The checkpointed `m` (kept when `T` needs a gradient) and `T` (kept when `m` does).
    type State = (Option<NodeId>, Option<NodeId>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, ckpt: &mut Checkpointer) {
        let [m_node, t_node] = ops.parents;
        let g = float::<I, 3>(grads.consume::<I>(&ops.node));
        let (m_state, t_state) = ops.state;
        // ∂m needs T (kept where m is tracked), ∂T needs m (kept where T is tracked).
        let t = t_state.map(|id| float::<I, 3>(ckpt.retrieve_node_output(id)));
        let m = m_state.map(|id| float::<I, 2>(ckpt.retrieve_node_output(id)));
        let (grad_m, grad_t) = a_step_grads(t, g, m);
        if let (Some(node), Some(grad)) = (m_node, grad_m) {
            grads.register::<I>(node.id, grad.into_primitive().tensor());
        }
        if let (Some(node), Some(grad)) = (t_node, grad_t) {
            grads.register::<I>(node.id, grad.into_primitive().tensor());
        }
    }
}

/// The activation `f` as one autodiff node whose forward and backward run `crate::act`'s host
/// kernels on the inner backend. Only for backends registered ([`is_registered`]) whose values
/// live in host memory (`quirks` decides).
///
/// # Panics
/// If `B` is not registered.
pub(crate) fn host_unary<B: Backend>(f: HostFn, x: Tensor<B, 1>) -> Tensor<B, 1> {
    through_registered(x, |registered, x| (registered.unary)(x, f))
}

/// `x·w + c` as one autodiff node whose forward and backward run `crate::product`'s host
/// products on the inner backend (`crate::product::takes` decides).
///
/// # Panics
/// If `B` is not registered.
pub(crate) fn product_node<B: Backend>(
    x: Tensor<B, 2>,
    w: Tensor<B, 2>,
    c: Option<Tensor<B, 2>>,
) -> Tensor<B, 2> {
    let registered = lookup(TypeId::of::<B>()).expect("product::takes checks is_registered");
    let erase = |t: Tensor<B, 2>| -> Box<dyn Any> { Box::new(t.into_primitive().tensor()) };
    unerase((registered.product)(erase(x), erase(w), c.map(erase)))
}

/// `a·b` over two batch dimensions as one autodiff node (`crate::product::batched`).
///
/// # Panics
/// If `B` is not registered.
pub(crate) fn batched_node<B: Backend>(a: Tensor<B, 4>, b: Tensor<B, 4>) -> Tensor<B, 4> {
    let registered = lookup(TypeId::of::<B>()).expect("product::batched checks is_registered");
    let erase = |t: Tensor<B, 4>| -> Box<dyn Any> { Box::new(t.into_primitive().tensor()) };
    unerase((registered.batched)(erase(a), erase(b)))
}

/// `t` in row-major order as one autodiff node (`quirks::host_contiguous`): the forward copies
/// `t` and the backward the output's gradient by `quirks::host_gather`, each only where it is
/// a strided view.
///
/// # Panics
/// If `B` is not registered.
pub(crate) fn contiguous_node<B: Backend, const D: usize>(t: Tensor<B, D>) -> Tensor<B, D> {
    let registered = lookup(TypeId::of::<B>()).expect("quirks checks is_registered");
    unerase((registered.contiguous)(Box::new(
        t.into_primitive().tensor(),
    )))
}

/// A quantized tensor's primitive, type-erased for one of [`QuantizedOps`].
///
/// # Panics
/// If `t` is not quantized (the callers check its dtype).
pub(crate) fn erase_quantized<B: Backend, const D: usize>(t: Tensor<B, D>) -> Box<dyn Any> {
    match t.into_primitive() {
        TensorPrimitive::QFloat(q) => Box::new(q),
        TensorPrimitive::Float(_) => unreachable!("the callers pass quantized tensors"),
    }
}

/// A registered operation's type-erased result as `B`'s tensor.
pub(crate) fn unerase<B: Backend, const D: usize>(out: Box<dyn Any>) -> Tensor<B, D> {
    let out = *out
        .downcast::<FloatTensor<B>>()
        .expect("registered under B's TypeId, so its primitives are these");
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

fn contiguous_erased<I: Backend, C: CheckpointStrategy>(x: Box<dyn Any>) -> Box<dyn Any> {
    let x = *x
        .downcast::<FloatTensor<Autodiff<I, C>>>()
        .expect("registered under Autodiff<I, C>'s TypeId, so its primitives are these");
    let out =
        match <HostContiguous as Backward<I, 1>>::prepare::<C>(HostContiguous, [x.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish((), quirks::in_row_order::<I>(x.primitive)),
            OpsKind::UnTracked(prep) => prep.finish(quirks::in_row_order::<I>(x.primitive)),
        };
    Box::new(out)
}

/// [`contiguous_node`]'s node: the output's gradient made contiguous the same way.
#[derive(Debug)]
struct HostContiguous;

impl<I: Backend> Backward<I, 1> for HostContiguous {
    type State = ();

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let g = grads.consume::<I>(&ops.node);
        if let [Some(node)] = &ops.parents {
            grads.register::<I>(node.id, quirks::in_row_order::<I>(g));
        }
    }
}

/// `x` through one of `B`'s registered operations, its primitives type-erased on the way.
fn through_registered<B: Backend>(
    x: Tensor<B, 1>,
    op: impl FnOnce(Registered, Box<dyn Any>) -> Box<dyn Any>,
) -> Tensor<B, 1> {
    let registered = lookup(TypeId::of::<B>()).expect("quirks checks is_registered");
    unerase(op(registered, Box::new(x.into_primitive().tensor())))
}

fn unary_erased<I: Backend, C: CheckpointStrategy>(x: Box<dyn Any>, f: HostFn) -> Box<dyn Any> {
    let x = *x
        .downcast::<FloatTensor<Autodiff<I, C>>>()
        .expect("registered under Autodiff<I, C>'s TypeId, so its primitives are these");
    let device = I::float_device(&x.primitive);
    let node = HostUnary(f);
    let out = match <HostUnary as Backward<I, 1>>::prepare::<C>(node, [x.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            // The node keeps the values it read (on flex without a copy: `x` is moved in).
            let xs = crate::act::values(float::<I, 1>(x.primitive));
            let out = crate::act::forward_kept::<I>(f, &xs, &device);
            prep.finish(xs, out.into_primitive().tensor())
        }
        OpsKind::UnTracked(prep) => prep.finish(
            crate::act::forward(f, float::<I, 1>(x.primitive))
                .into_primitive()
                .tensor(),
        ),
    };
    Box::new(out)
}

/// Softmax over rows of `cols` values of the flat `x`, as one autodiff node whose forward and
/// backward run `crate::act`'s host kernels on the inner backend (like [`host_unary`]).
///
/// # Panics
/// If `B` is not registered.
pub(crate) fn host_softmax<B: Backend>(x: Tensor<B, 1>, cols: usize) -> Tensor<B, 1> {
    through_registered(x, |registered, x| (registered.softmax)(x, cols))
}

fn softmax_erased<I: Backend, C: CheckpointStrategy>(x: Box<dyn Any>, cols: usize) -> Box<dyn Any> {
    let x = *x
        .downcast::<FloatTensor<Autodiff<I, C>>>()
        .expect("registered under Autodiff<I, C>'s TypeId, so its primitives are these");
    let node = HostSoftmax(cols);
    let forward = |x: FloatTensor<I>| {
        let x = float::<I, 1>(x);
        let n = x.dims()[0];
        let rows = x.reshape([n / cols.max(1), cols]);
        crate::act::softmax_last(rows)
            .reshape([n])
            .into_primitive()
            .tensor()
    };
    let out = match <HostSoftmax as Backward<I, 1>>::prepare::<C>(node, [x.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            // The node keeps its output (shared with the graph, not copied) for the backward.
            let out = forward(x.primitive);
            prep.finish(out.clone(), out)
        }
        OpsKind::UnTracked(prep) => prep.finish(forward(x.primitive)),
    };
    Box::new(out)
}

/// [`host_softmax`]'s node: keeps the output `y`, and computes `y·(g − Σ g·y)` per row on the
/// host, in place on the output's gradient.
#[derive(Debug)]
struct HostSoftmax(usize);

impl<I: Backend> Backward<I, 1> for HostSoftmax {
    /// The output.
    type State = FloatTensor<I>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let g = float::<I, 1>(grads.consume::<I>(&ops.node));
        let [parent] = ops.parents;
        if let Some(node) = parent {
            let y = crate::act::values(float::<I, 1>(ops.state));
            let grad = crate::act::softmax_backward(self.0, &y, g);
            grads.register::<I>(node.id, grad.into_primitive().tensor());
        }
    }
}

/// [`host_unary`]'s node: keeps `x`'s values, and computes `g·f'(x)` on the host in place.
#[derive(Debug)]
struct HostUnary(HostFn);

impl<I: Backend> Backward<I, 1> for HostUnary {
    /// The input's values.
    type State = burn::tensor::TensorData;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let g = float::<I, 1>(grads.consume::<I>(&ops.node));
        let [parent] = ops.parents;
        if let Some(node) = parent {
            let grad = crate::act::backward(self.0, &ops.state, g);
            grads.register::<I>(node.id, grad.into_primitive().tensor());
        }
    }
}

fn apply_erased<I: Backend, C: CheckpointStrategy>(
    t: Box<dyn Any>,
    factors: Vec<Box<dyn Any>>,
    steps: &[Side],
    y: Option<Box<dyn Any>>,
) -> Box<dyn Any> {
    let down = |b: Box<dyn Any>| -> FloatTensor<Autodiff<I, C>> {
        *b.downcast()
            .expect("registered under Autodiff<I, C>'s TypeId, so its primitives are these")
    };
    let mut inputs = vec![down(t)];
    inputs.extend(factors.into_iter().chain(y).map(down));
    let op = ApplySteps {
        steps: steps.to_vec(),
    };
    // `apply_steps` calls this with 2 to 4 factors, and `y` or not: 3 to 6 inputs.
    let out = match inputs.len() {
        3 => apply_tracked::<I, C, 3>(array(inputs), op),
        4 => apply_tracked::<I, C, 4>(array(inputs), op),
        5 => apply_tracked::<I, C, 5>(array(inputs), op),
        _ => apply_tracked::<I, C, 6>(array(inputs), op),
    };
    Box::new(out)
}

fn array<T, const N: usize>(v: Vec<T>) -> [T; N] {
    let Ok(a) = v.try_into() else {
        unreachable!("apply_erased matched the length")
    };
    a
}

/// The autodiff node of [`apply_steps`]: `T` and the factors checkpointed, nothing in between
/// (the inputs: `T`, the factors, and one more where the result is added to it: [`ApplySteps::adds`]).
fn apply_tracked<I: Backend, C: CheckpointStrategy, const N: usize>(
    inputs: [FloatTensor<Autodiff<I, C>>; N],
    op: ApplySteps,
) -> FloatTensor<Autodiff<I, C>> {
    let nodes = inputs.each_ref().map(|t| t.node.clone());
    let _held = held::<I, C, N>(&inputs);
    let k = op.steps.len();
    let forward = |inputs: [FloatTensor<Autodiff<I, C>>; N], steps: &[Side]| {
        let mut primitives = inputs.into_iter().map(|x| x.primitive);
        let t = primitives.next().expect("N ≥ 3 inputs");
        let factors: Vec<_> = primitives.by_ref().take(k).collect();
        // The added tensor, where there is one.
        forward::<I>(t, factors, steps, primitives.next())
    };
    let steps = op.steps.clone();
    match <ApplySteps as Backward<I, N>>::prepare::<C>(op, nodes)
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(mut prep) => {
            // `T` only matters to the factors' gradients: with every factor frozen, the
            // backward needs the factors alone.
            let factor_tracked = inputs[1..=k].iter().any(|x| x.is_tracked());
            let t = factor_tracked.then(|| prep.checkpoint(&inputs[0]));
            let factors = inputs[1..=k].iter().map(|x| prep.checkpoint(x)).collect();
            prep.finish((t, factors), forward(inputs, &steps))
        }
        OpsKind::UnTracked(prep) => prep.finish(forward(inputs, &steps)),
    }
}

/// [`apply_steps`]' backward: the intermediates recomputed from `T` and the factors, then
/// the steps differentiated last to first, each intermediate dropped once used; where the
/// result was added to a tensor, the output's gradient is also that tensor's.
#[derive(Debug)]
struct ApplySteps {
    steps: Vec<Side>,
}

impl ApplySteps {
    /// Was the result added to a tensor, the node's last of its `n` inputs (`T`, one factor per
    /// step, and that tensor)?
    fn adds(&self, n: usize) -> bool {
        n == self.steps.len() + 2
    }
}

impl<I: Backend, const N: usize> Backward<I, N> for ApplySteps {
    /// The checkpointed `T` (where a factor needs a gradient) and factors, in step order.
    type State = (Option<NodeId>, Vec<NodeId>);

    fn backward(self, ops: Ops<Self::State, N>, grads: &mut Gradients, ckpt: &mut Checkpointer) {
        let mut g = float::<I, 3>(grads.consume::<I>(&ops.node));
        let k = self.steps.len();
        if let (true, Some(node)) = (self.adds(N), &ops.parents[N - 1]) {
            grads.register::<I>(node.id, g.clone().into_primitive().tensor());
        }
        let parents = &ops.parents[..=k];
        let (t_id, factor_ids) = ops.state;
        let factors: Vec<Tensor<I, 2>> = factor_ids
            .into_iter()
            .map(|id| float::<I, 2>(ckpt.retrieve_node_output(id)))
            .collect();
        let Some(t_id) = t_id else {
            // Only `T` needs a gradient (frozen factors): the transposed factors applied in
            // reverse order, no intermediate recomputed (a fused kernel where registered).
            if let Some(node) = &parents[0] {
                let transposed = factors.into_iter().rev().map(|f| f.transpose());
                let steps: Vec<Side> = self.steps.iter().rev().copied().collect();
                let primitives = transposed.map(|f| f.into_primitive().tensor());
                let grad = forward::<I>(g.into_primitive().tensor(), primitives, &steps, None);
                grads.register::<I>(node.id, grad);
            }
            return;
        };
        let t = float::<I, 3>(ckpt.retrieve_node_output(t_id));
        let want: Vec<bool> = parents[1..].iter().map(Option::is_some).collect();
        if host_grads_take(&t, &g, &factors, &self.steps, &want) {
            let want_t = parents[0].is_some();
            let (grad_f, grad_t) = host::apply_grads(t, g, factors, &self.steps, &want, want_t);
            for (node, grad) in parents[1..].iter().zip(grad_f) {
                if let (Some(node), Some(grad)) = (node, grad) {
                    grads.register::<I>(node.id, grad.into_primitive().tensor());
                }
            }
            if let (Some(node), Some(grad)) = (&parents[0], grad_t) {
                grads.register::<I>(node.id, grad.into_primitive().tensor());
            }
            return;
        }
        // The input of every step: T, then the recomputed intermediates.
        let mut inputs = vec![t];
        for (f, side) in factors.iter().zip(&self.steps).take(self.steps.len() - 1) {
            let last = inputs.last().expect("starts with T").clone();
            inputs.push(step_forward(last, f.clone(), *side));
        }
        let tracked: Vec<bool> = parents.iter().map(Option::is_some).collect();
        for (i, (f, side)) in factors.iter().zip(&self.steps).enumerate().rev() {
            let input = inputs.pop().expect("one input per step");
            let factor_node = &parents[i + 1];
            // Does anything before this step need a gradient? If not, `g` stops here.
            let earlier = tracked[..=i].iter().any(|&t| t);
            let (grad_f, grad_in) = match side {
                Side::A => a_step_grads(
                    factor_node.is_some().then_some(input),
                    g,
                    earlier.then(|| f.clone()),
                ),
                Side::B => (
                    factor_node
                        .is_some()
                        .then(|| b_factor_grad(input, g.clone())),
                    earlier.then(|| step_grad_input(g, f.clone(), Side::B)),
                ),
            };
            if let (Some(node), Some(grad)) = (factor_node, grad_f) {
                grads.register::<I>(node.id, grad.into_primitive().tensor());
            }
            match grad_in {
                Some(grad) => g = grad,
                None => return,
            }
        }
        if let Some(node) = &parents[0] {
            grads.register::<I>(node.id, g.into_primitive().tensor());
        }
    }
}

/// Does [`host::apply_grads`] take this backward: the steps on the host rows
/// (`kron::on_host_rows`), `g` on the host, and each `a` factor whose gradient is wanted within
/// [`host::factor_grad_max`] multiply-adds per row (beyond, Burn's products are faster)?
fn host_grads_take<I: Backend>(
    t: &Tensor<I, 3>,
    g: &Tensor<I, 3>,
    factors: &[Tensor<I, 2>],
    steps: &[Side],
    want: &[bool],
) -> bool {
    if !quirks::host_loops_take(t, g) || !super::on_host_rows(t, factors, steps) {
        return false;
    }
    // `q` before each step: an `a` step's gradient costs `p·p'·q` multiply-adds per row.
    let mut q = t.dims()[2];
    for ((f, side), &wanted) in factors.iter().zip(steps).zip(want) {
        let [rows, cols] = f.dims();
        match side {
            Side::A if wanted && rows * cols * q > host::factor_grad_max() => return false,
            Side::A => {}
            Side::B => q = cols,
        }
    }
    true
}

pub(crate) fn step_forward<I: Backend>(
    t: Tensor<I, 3>,
    f: Tensor<I, 2>,
    side: Side,
) -> Tensor<I, 3> {
    match side {
        Side::A => a_step(f, t),
        Side::B => matmul_last(t, f),
    }
}

/// `out[r] = fᵀ·T[r]` outside autodiff: on flex by the host loops of `kron::host` (Burn's
/// batched product runs one `gemm` call per row there), elsewhere [`contract_a_composite`].
fn a_step<B: Backend>(f: Tensor<B, 2>, t: Tensor<B, 3>) -> Tensor<B, 3> {
    if quirks::host_loops_take(&f, &t) {
        host::contract_a(f, t)
    } else {
        contract_a_composite(f, t)
    }
}

/// The gradients through an `a` step, `out[r] = fᵀ·T[r]`, from its output gradient `g`: of
/// the factor where `t` (the step's input) is given, of the input where `f` is given. On flex
/// (`kron::host`) both from one read of `g`, the factor's by Burn's products beyond the host
/// loop's size.
fn a_step_grads<I: Backend>(
    t: Option<Tensor<I, 3>>,
    g: Tensor<I, 3>,
    f: Option<Tensor<I, 2>>,
) -> (Option<Tensor<I, 2>>, Option<Tensor<I, 3>>) {
    let host = f.as_ref().is_none_or(|f| quirks::host_loops_take(f, &g))
        && t.as_ref().is_none_or(|t| quirks::host_loops_take(t, &g));
    if !host {
        let grad_f = t.map(|t| grad_m(t, g.clone()));
        return (grad_f, f.map(|f| step_grad_input(g, f, Side::A)));
    }
    let p2 = g.dims()[1];
    let small = |t: &Tensor<I, 3>| {
        let [_, p, q] = t.dims();
        p * p2 * q <= host::FACTOR_GRAD_MAX
    };
    // A large factor's gradient by Burn's products first: its clone of `g` is dropped before
    // the host loops read `g`, which flex then hands over without a copy.
    let (grad_f, t) = match t {
        Some(t) if !small(&t) => (Some(grad_m(t, g.clone())), None),
        t => (None, t),
    };
    let (host_f, grad_t) = host::contract_a_grads(t, g, f);
    (grad_f.or(host_f), grad_t)
}

/// The gradient of a `b` step's factor from the step's input `t` and output gradient `g`:
/// `out = T₂·f` over all `n·p` rows, so `∂f = T₂ᵀ·G₂`.
fn b_factor_grad<I: Backend>(t: Tensor<I, 3>, g: Tensor<I, 3>) -> Tensor<I, 2> {
    let [n, p, q] = t.dims();
    let q2 = g.dims()[2];
    let t2: Tensor<I, 2> = t.reshape([n * p, q]);
    t2.transpose().matmul(g.reshape([n * p, q2]))
}

/// The gradient of a step's input from its output gradient `g` and factor `f`.
fn step_grad_input<I: Backend>(g: Tensor<I, 3>, f: Tensor<I, 2>, side: Side) -> Tensor<I, 3> {
    match side {
        Side::A => f.unsqueeze::<3>().matmul(g),
        Side::B => matmul_last(g, f.transpose()),
    }
}

/// `∂m = Σ_r T[r]·G[r]ᵀ` (`[p, p']`) by Burn's products (see the module docs): where the
/// factor outweighs the rows' intermediates (`p·p' > q·(p + p')`, a large `a` on narrow
/// columns), one product over all `n·q` columns of `T` and `G` copied to `[p, n·q]` and
/// `[p', n·q]`; elsewhere batched products over chunks of rows, summed.
fn grad_m<I: Backend>(t: Tensor<I, 3>, g: Tensor<I, 3>) -> Tensor<I, 2> {
    let [n, p, q] = t.dims();
    let p2 = g.dims()[1];
    // No rows: the chunks' zeros below (an empty product fails on some backends).
    if n > 0 && one_product(p, p2, q) {
        let t2: Tensor<I, 2> = t.swap_dims(0, 1).reshape([p, n * q]);
        let g2: Tensor<I, 2> = g.swap_dims(0, 1).reshape([p2, n * q]);
        return t2.matmul(g2.transpose());
    }
    let rows = chunk_rows(n, p2, q);
    (0..n)
        .step_by(rows)
        .map(|start| {
            let end = (start + rows).min(n);
            let tc = t.clone().slice(start..end);
            let gc = g.clone().slice(start..end).swap_dims(1, 2);
            tc.matmul(gc).sum_dim(0).reshape([p, p2])
        })
        .reduce(|acc, part| acc + part)
        .unwrap_or_else(|| Tensor::zeros([p, p2], &t.device()))
}

/// Does [`grad_m`] take `∂m` as one product: are the chunked products' partial sums (`p·p'`
/// values a row, each written and summed) more than the copies of `T` and `G` (`q·(p + p')`)?
/// Their products' inner dimension is then `q`, too short for a `gemm` to run at its rate.
fn one_product(p: usize, p2: usize, q: usize) -> bool {
    p * p2 > q * (p + p2)
}

/// Rows per chunk of `∂m`'s partial products: `c·p·p' ≤ n·p·q / 8`, at most 16 chunks.
pub(crate) fn chunk_rows(n: usize, p2: usize, q: usize) -> usize {
    let within_eighth = (n * q) / (8 * p2.max(1));
    within_eighth.max(n.div_ceil(16)).clamp(1, n.max(1))
}

#[cfg(test)]
mod tests {
    use super::{chunk_rows, is_registered, one_product, register_backward, register_default};
    use super::{unregister_backward, Autodiff};

    #[cfg(feature = "ndarray")]
    #[test]
    fn an_opt_out_holds_against_the_training_loops_registration() {
        // A backend type no other test registers (the registry is process-wide).
        type AB = Autodiff<burn::backend::NdArray<f64>>;
        assert!(!is_registered::<AB>());
        assert!(register_default::<AB>());
        assert!(is_registered::<AB>());
        assert!(unregister_backward::<AB>());
        assert!(!unregister_backward::<AB>(), "already opted out");
        assert!(register_default::<AB>());
        assert!(
            !is_registered::<AB>(),
            "a training loop must not undo the opt-out"
        );
        assert!(register_backward::<AB>());
        assert!(is_registered::<AB>(), "an explicit registration does");
    }

    /// Burn 0.21's `cat` lets go of its inputs before registering its step: where an input is
    /// the only node of its graph, a backward pass ending on another thread meanwhile frees it
    /// and the parameter behind it gets no gradient (module docs, "Threads"). Through
    /// [`super::cat`], with such backward passes hammered on another thread, it always does.
    #[cfg(feature = "ndarray")]
    #[test]
    fn cat_holds_its_inputs_through_another_threads_backward() {
        use burn::tensor::Tensor;
        use std::sync::atomic::{AtomicBool, Ordering};
        type AB = Autodiff<burn::backend::NdArray>;
        let dev = Default::default();
        // Large enough that the copy takes a while.
        let p = Tensor::<AB, 1>::ones([1 << 18], &dev).require_grad();
        let stop = AtomicBool::new(false);
        let lost = std::thread::scope(|s| {
            s.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    let t = Tensor::<AB, 1>::ones([4], &dev).require_grad();
                    let _ = (t * 2.0).sum().backward();
                }
            });
            // Each backward pass takes the parameter's graph entry with it: the next `exp` is
            // the only node of a new graph.
            let lost = (0..100)
                .filter(|_| {
                    let x = p.clone().exp();
                    let grads = super::cat(vec![x], 0).sum().backward();
                    p.grad(&grads).is_none()
                })
                .count();
            stop.store(true, Ordering::Relaxed);
            lost
        });
        assert_eq!(lost, 0, "passes that lost the parameter's gradient");
    }

    #[test]
    fn chunks_bound_the_partial_products_and_their_count() {
        // Square KronA factors at 4096 → 14336 over 2,048 rows: 16 chunks at most.
        let c = chunk_rows(2048, 112, 128);
        assert!(2048usize.div_ceil(c) <= 16);
        // A narrow `a` (p' ≪ q): one batched product, its partial products already small.
        assert_eq!(chunk_rows(2048, 2, 4096), 2048);
        // Degenerate sizes stay valid.
        assert_eq!(chunk_rows(0, 4, 4), 1);
        assert_eq!(chunk_rows(1, 4096, 1), 1);
    }

    #[test]
    fn a_large_factor_on_narrow_columns_takes_one_product() {
        // A Mistral-7B FFN's KronA at LoRA-8's budget: `a` 512 × 256 on 8 columns.
        assert!(one_product(512, 256, 8));
        // MiniLM's √d shapes (16 × 16 on 24 columns) and a 4096² layer's (64 × 64 on 64):
        // the chunked products, whose partial sums are smaller than the copies.
        assert!(!one_product(16, 16, 24));
        assert!(!one_product(64, 64, 64));
    }
}
