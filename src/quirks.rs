//! What one backend does slowly enough that the crate works around it: the one place the crate
//! looks at which backend it runs on ([`Backend::name`]).
//!
//! `burn-flex`, Burn 0.21's default CPU backend, copies a permuted view that does not collapse
//! to a 2-D transpose one element at a time (its generic strided iterator), and evaluates a
//! broadcast element-wise operation the same way: about 6 ms for one MiniLM activation
//! (2,048 × 384 floats) against 0.12 ms for a plain add of the same size. Its GEMM, on the
//! other hand, reads strided and broadcast operands directly and writes a contiguous result. So
//! on flex, two things that are a copy or a broadcast product elsewhere are GEMMs whose every
//! output is one product (exact, the same bits):
//! - the attention heads' merge and the split's gradient ([`crate::model::heads`]): `t·I`;
//! - the materialized Kronecker product ([`crate::kron::kron`]): outer products batched over
//!   its row blocks, 50× faster than the broadcast multiply at 384 × 1,536.
//!
//! The other backends keep the plain operations: they copy and broadcast well, and a GPU's
//! matmul may round `f32` inputs (TF32), which a copy must not.

use burn::tensor::backend::Backend;

/// Is `B` burn-flex (or autodiff over it), whose strided copies and broadcast element-wise
/// operations are slower than a GEMM computing the same values?
pub(crate) fn products_beat_copies<B: Backend>(device: &B::Device) -> bool {
    matches!(B::name(device).as_str(), "flex" | "autodiff<flex>")
}
