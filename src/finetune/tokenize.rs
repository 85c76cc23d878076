//! Tokenization with the model's own `tokenizer.json`, and batching by length.

use std::path::Path;

use burn::tensor::{backend::Backend, Int, Tensor, TensorData};
use tokenizers::{Tokenizer, TruncationParams};

use crate::error::AdapterError;
use crate::rng::SplitMix64;

/// A WordPiece tokenizer from a Hugging Face `tokenizer.json`, with its fixed padding removed
/// (batches are padded to their longest sequence) and truncation at `max_len` tokens.
pub struct TextEncoder {
    tokenizer: Tokenizer,
    /// The longest sequence kept, special tokens included.
    pub max_len: usize,
}

impl TextEncoder {
    /// Loads `tokenizer.json`; overrides its padding (none) and truncation (`max_len`).
    pub fn from_file(path: impl AsRef<Path>, max_len: usize) -> Result<Self, AdapterError> {
        let path = path.as_ref();
        let err = |m: String| AdapterError::Format {
            path: path.display().to_string(),
            message: m,
        };
        if max_len < 3 {
            return Err(crate::ConfigError::invalid(
                "tokenizer",
                "max_len",
                format!("{max_len} tokens leaves no room for text between [CLS] and [SEP]"),
            )
            .into());
        }
        // Read as any user file (a device or FIFO is refused), then parsed.
        let bytes = crate::store::read_file(path)?;
        let mut tokenizer = super::tokenizer_json::parse(&bytes).map_err(err)?;
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: max_len,
                ..Default::default()
            }))
            .map_err(|e| err(e.to_string()))?;
        Ok(Self { tokenizer, max_len })
    }

    /// Checks that every id this tokenizer gives has a row in a model's embedding of
    /// `vocab_size` (its `config.json`'s `vocab_size`): a tokenizer from another model would
    /// otherwise fail inside the model at the first text with a token beyond it.
    pub fn check_vocab(&self, vocab_size: usize) -> Result<(), AdapterError> {
        check_vocab(&self.tokenizer, vocab_size)
    }

    /// Token ids of one text, `[CLS] … [SEP]`.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, AdapterError> {
        self.tokenizer
            .encode(text, true)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| crate::ConfigError::invalid("tokenizer", "text", e.to_string()).into())
    }

    /// Text back from ids (special tokens dropped).
    pub fn decode(&self, ids: &[u32]) -> Result<String, AdapterError> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| crate::ConfigError::invalid("tokenizer", "ids", e.to_string()).into())
    }
}

/// [`TextEncoder::check_vocab`] for any tokenizer (the decoder's too).
pub(crate) fn check_vocab(tokenizer: &Tokenizer, vocab_size: usize) -> Result<(), AdapterError> {
    let vocab = tokenizer.get_vocab(true);
    match vocab.iter().max_by_key(|(_, &id)| id) {
        Some((token, &id)) if id as usize >= vocab_size => Err(AdapterError::Incompatible {
            message: format!(
                "the tokenizer gives token {token:?} id {id}, beyond the model's vocabulary of \
                 {vocab_size} (`vocab_size` in its configuration): it is another model's \
                 tokenizer; use the one saved with the model"
            ),
        }),
        _ => Ok(()),
    }
}

/// A tokenized example.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Encoded {
    /// Token ids, `[CLS] … [SEP]`.
    pub ids: Vec<u32>,
    /// The class.
    pub label: usize,
}

/// A padded batch: `ids [batch, seq]`, `mask [batch, seq]` (1 token, 0 padding), `labels
/// [batch]`, padded to the batch's longest sequence with id 0 (`[PAD]`).
pub fn batch_tensors<B: Backend>(
    items: &[&Encoded],
    device: &B::Device,
) -> (Tensor<B, 2, Int>, Tensor<B, 2, Int>, Tensor<B, 1, Int>) {
    let seq = items.iter().map(|e| e.ids.len()).max().unwrap_or(1).max(1);
    let n = items.len();
    let mut ids = vec![0i64; n * seq];
    let mut mask = vec![0i64; n * seq];
    for (r, e) in items.iter().enumerate() {
        for (c, &id) in e.ids.iter().enumerate() {
            ids[r * seq + c] = id as i64;
            mask[r * seq + c] = 1;
        }
    }
    let labels: Vec<i64> = items.iter().map(|e| e.label as i64).collect();
    (
        Tensor::from_data(TensorData::new(ids, [n, seq]), device),
        Tensor::from_data(TensorData::new(mask, [n, seq]), device),
        Tensor::from_data(TensorData::new(labels, [n]), device),
    )
}

/// Batches of indices whose sequences have similar lengths, so little compute goes to padding:
/// the indices are shuffled, cut into pools of 50 batches, each pool sorted by length and cut
/// into batches, and the batches shuffled.
pub fn length_batches(
    lengths: &[usize],
    batch_size: usize,
    rng: &mut SplitMix64,
) -> Vec<Vec<usize>> {
    let batch_size = batch_size.max(1);
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    rng.shuffle(&mut order);
    let mut batches = Vec::new();
    for pool in order.chunks(batch_size * 50) {
        let mut pool = pool.to_vec();
        pool.sort_by_key(|&i| lengths[i]);
        batches.extend(pool.chunks(batch_size).map(|c| c.to_vec()));
    }
    rng.shuffle(&mut batches);
    batches
}

/// Batches in length order (for evaluation: no shuffling needed, least padding).
pub fn sorted_batches(lengths: &[usize], batch_size: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by_key(|&i| lengths[i]);
    order
        .chunks(batch_size.max(1))
        .map(|c| c.to_vec())
        .collect()
}
