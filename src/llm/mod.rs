//! The decoder side's text jobs (feature `finetune`): the tokenizer (from GGUF metadata or
//! `tokenizer.json`), generation, the multiple-choice tasks of the Kron-LoRA paper, scoring and
//! evaluation, and fine-tuning for multiple choice with the loss masked to the answer.

pub mod generate;
pub mod score;
pub mod tasks;
pub mod tokenizer;
pub mod train;

pub use generate::{generate, GenerateConfig};
pub use score::{evaluate, EvalResult};
pub use tasks::{Question, Split, TaskKind};
pub use tokenizer::TextTokenizer;
