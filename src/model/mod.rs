//! Models whose linear layers are [`crate::AdaptedLinear`]s, named with Hugging Face's module
//! paths so that placement targets and PEFT files work unchanged, and where their pretrained
//! weights come from ([`TensorSource`]).

pub(crate) mod attention;
pub mod bert;
pub mod heads;
pub mod llama;
pub mod source;

pub use bert::{BertClassifier, BertConfig, BertEncoder};
pub use llama::{LlamaConfig, LlamaForCausalLM};
pub use source::{Fill, TensorSource};
