//! A BERT-style encoder whose linear layers are [`crate::AdaptedLinear`]s and whose FFN blocks
//! take a block adapter, with adapters placed by name ([`crate::Targets`]), and a loader for
//! pretrained Hugging Face `model.safetensors` files (all-MiniLM-L6-v2, BERT).

mod bert;
mod config;
mod loader;

pub use bert::{mean_pool, Attention, BertClassifier, BertEncoder, BertLayer, Embeddings};
pub use config::{BertConfig, PeftConfig};
pub use loader::{load_pretrained, TensorSource};
