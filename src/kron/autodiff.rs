//! The `a` contraction of the Kronecker apply with a hand-written backward.
//!
//! [`KronIntermediate::apply_a`](super::KronIntermediate::apply_a) contracts the middle axis of
//! `T [n, p, q]` with a factor `m [p, p']`: `out[r] = mᵀ·T[r]`, one broadcast batched product.
//! Burn's autodiff differentiates that product generically: the gradient of `m` is computed as
//! `G [n, p', q] · Tᵀ [n, q, p]`, a `[n, p', p]` tensor, then summed over the `n` rows. At LLM
//! widths (thousands of rows) that tensor is the whole memory excess of a KronA layer over a
//! LoRA layer.
//!
//! [`contract_a`] computes the same forward with one autodiff node whose backward is this
//! module's:
//!
//! * `∂T = m · G` (`[1, p, p'] · [n, p', q]`, one broadcast batched product), and
//! * `∂m = Σ_r T[r] · G[r]ᵀ`, accumulated over row chunks sized so that a chunk's partial
//!   products `[c, p, p']` stay within an eighth of `T` (and at most 16 chunks), so the
//!   gradient never holds the `[n, p', p]` tensor.
//!
//! # Why a registry
//! A backward is registered on Burn's `Autodiff<I, C>` backend through its inner backend `I`,
//! which generic code over `B: Backend` cannot name: Rust has no specialization, and a trait
//! bound beyond `Backend` would change every adapter's `Module<B: Backend>` shape. So the
//! backward is registered per autodiff backend type at run time by [`register_backward`]
//! (generic over `AB: AutodiffBackend`, so the library names no backend), and [`contract_a`]
//! looks the backend up by `TypeId`: registered, the hand-written node; not registered (any
//! backend without autodiff, or an autodiff backend nobody registered), Burn's own
//! differentiation of the same product ([`contract_a_composite`]). Both give the same values
//! and gradients up to float rounding.
//!
//! The crate's training loops (`finetune`, `llm`, `learner`, `parallel`) register their
//! backend themselves; a training loop of one's own calls [`register_backward`] once.
//!
//! ```
//! # #[cfg(feature = "ndarray")] {
//! use burn::backend::{Autodiff, NdArray};
//! use kron_adapters::kron::autodiff::{is_registered, register_backward};
//!
//! assert!(register_backward::<Autodiff<NdArray>>());
//! assert!(is_registered::<Autodiff<NdArray>>());
//! assert!(!is_registered::<NdArray>()); // no autodiff: nothing to register
//! # }
//! ```

use std::any::{Any, TypeId};
use std::sync::RwLock;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::{
    BalancedCheckpointing, CheckpointStrategy, NoCheckpointing,
};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::{Autodiff, NodeId};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Tensor, TensorPrimitive};

/// `out[r] = mᵀ·T[r]`: contracts the middle axis of `t` with `m`, with this module's backward
/// where [`register_backward`] registered `B`, and Burn's otherwise.
///
/// # Shapes
/// - `m`: `[p, p']`
/// - `t`: `[n, p, q]`
/// - output: `[n, p', q]`
pub fn contract_a<B: Backend>(m: Tensor<B, 2>, t: Tensor<B, 3>) -> Tensor<B, 3> {
    let Some(erased) = lookup(TypeId::of::<B>()) else {
        return contract_a_composite(m, t);
    };
    match (m.into_primitive(), t.into_primitive()) {
        (TensorPrimitive::Float(m), TensorPrimitive::Float(t)) => {
            let out = erased(Box::new(m), Box::new(t));
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

/// Registers the hand-written backward for the autodiff backend `AB`, so that [`contract_a`]
/// (and with it every Kronecker adapter's apply) uses it. Returns `false`, registering
/// nothing, when `AB` is not Burn's `Autodiff<I>` (with no checkpointing or balanced
/// checkpointing), the only autodiff backend whose graph this crate can extend. Registering
/// again is a no-op.
pub fn register_backward<AB: AutodiffBackend>() -> bool {
    let id = TypeId::of::<AB>();
    let erased: ErasedContract = if id == TypeId::of::<Autodiff<AB::InnerBackend>>() {
        contract_erased::<AB::InnerBackend, NoCheckpointing>
    } else if id == TypeId::of::<Autodiff<AB::InnerBackend, BalancedCheckpointing>>() {
        contract_erased::<AB::InnerBackend, BalancedCheckpointing>
    } else {
        return false;
    };
    if lookup(id).is_none() {
        let mut registry = REGISTRY.write().unwrap_or_else(|e| e.into_inner());
        if !registry.iter().any(|(known, _)| *known == id) {
            registry.push((id, erased));
        }
    }
    true
}

/// Removes `AB`'s registration, so that [`contract_a`] falls back to Burn's differentiation
/// (for comparisons in one process; the values are the same). Returns whether it was
/// registered.
pub fn unregister_backward<AB: AutodiffBackend>() -> bool {
    let id = TypeId::of::<AB>();
    let mut registry = REGISTRY.write().unwrap_or_else(|e| e.into_inner());
    let before = registry.len();
    registry.retain(|(known, _)| *known != id);
    registry.len() != before
}

/// Does [`contract_a`] use the hand-written backward on backend `B`?
pub fn is_registered<B: Backend>() -> bool {
    lookup(TypeId::of::<B>()).is_some()
}

/// `contract_a` on one registered backend, with its tensors type-erased: both arguments and
/// the result are that backend's float primitives.
type ErasedContract = fn(Box<dyn Any>, Box<dyn Any>) -> Box<dyn Any>;

static REGISTRY: RwLock<Vec<(TypeId, ErasedContract)>> = RwLock::new(Vec::new());

fn lookup(id: TypeId) -> Option<ErasedContract> {
    let registry = REGISTRY.read().unwrap_or_else(|e| e.into_inner());
    registry
        .iter()
        .find(|(known, _)| *known == id)
        .map(|(_, f)| *f)
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
            prep.finish((m_state, t_state), forward::<I>(m.primitive, t.primitive))
        }
        OpsKind::UnTracked(prep) => prep.finish(forward::<I>(m.primitive, t.primitive)),
    }
}

fn forward<I: Backend>(m: FloatTensor<I>, t: FloatTensor<I>) -> FloatTensor<I> {
    contract_a_composite(float::<I, 2>(m), float::<I, 3>(t))
        .into_primitive()
        .tensor()
}

fn float<I: Backend, const D: usize>(p: FloatTensor<I>) -> Tensor<I, D> {
    Tensor::from_primitive(TensorPrimitive::Float(p))
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
        if let (Some(node), Some(id)) = (m_node, t_state) {
            let t = float::<I, 3>(ckpt.retrieve_node_output(id));
            let grad = grad_m(t, g.clone());
            grads.register::<I>(node.id, grad.into_primitive().tensor());
        }
        if let (Some(node), Some(id)) = (t_node, m_state) {
            let m = float::<I, 2>(ckpt.retrieve_node_output(id));
            let grad = m.unsqueeze::<3>().matmul(g);
            grads.register::<I>(node.id, grad.into_primitive().tensor());
        }
    }
}

/// `∂m = Σ_r T[r]·G[r]ᵀ` (`[p, p']`), over chunks of rows (see the module docs).
fn grad_m<I: Backend>(t: Tensor<I, 3>, g: Tensor<I, 3>) -> Tensor<I, 2> {
    let [n, p, q] = t.dims();
    let p2 = g.dims()[1];
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

/// Rows per chunk of `∂m`'s partial products: `c·p·p' ≤ n·p·q / 8`, at most 16 chunks.
pub(crate) fn chunk_rows(n: usize, p2: usize, q: usize) -> usize {
    let within_eighth = (n * q) / (8 * p2.max(1));
    within_eighth.max(n.div_ceil(16)).clamp(1, n.max(1))
}

#[cfg(test)]
mod tests {
    use super::chunk_rows;

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
}
