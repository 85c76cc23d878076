//! Every file format for adapters, in one place:
//!
//! | format | type | what |
//! | --- | --- | --- |
//! | native adapter file | [`NativeAdapters`] | `.safetensors`, one tensor per factor, specs in the metadata |
//! | quantized adapter file | [`QuantizedAdapters`] | the same, factors int8/int4 with their scales |
//! | PEFT folder | [`PeftAdapter`] | `adapter_config.json` + `adapter_model.safetensors` (LoRA, LoKr) |
//! | trainable parameters | [`save_params_matching`] | any parameters by module path (heads, block adapters) |
//! | GGUF model files | [`gguf::GgufFile`], [`gguf::to_bytes`] | llama.cpp's format: metadata, tensor table, dequantization; F32/F16 writing |
//!
//! [`read_any`] tells them apart; [`attach`] puts a file's adapters into a model through the
//! generic placement, [`load_adapters`] refills a configured model, [`merge_checkpoint`] merges
//! into a base checkpoint file. The safetensors plumbing they share (canonical headers, atomic
//! writes, dtype decoding) is in [`st`]. Every reader validates what it reads: a malformed or
//! inconsistent file is an [`crate::AdapterError`] naming the item, never a panic, and every
//! writer leaves either the whole file or nothing.

pub mod gguf;
mod merge;
mod native;
mod params;
pub mod peft;
mod quantized;
pub mod st;

use std::path::Path;

pub use merge::{merge_bytes, merge_checkpoint, MergeReport};
pub use native::{
    attach, factor_key, load_adapters, save_adapters, CheckpointMeta, NativeAdapters, META_KEY,
};
pub use params::{load_params_matching, read_meta, save_params_matching, ADAPTER_PATTERN};
pub use peft::{peft_files, write_peft_dir, PeftAdapter, PeftFileConfig, PeftType};
pub use quantized::{is_quantized, QuantizedAdapters, QUANT_KEY};
pub use st::HostTensor;

use crate::error::AdapterError;

/// An adapter file or folder of any format, as read.
#[derive(Clone, Debug)]
#[allow(clippy::large_enum_variant)]
pub enum AdapterFile {
    /// A native adapter file.
    Native(NativeAdapters),
    /// A quantized adapter file.
    Quantized(QuantizedAdapters),
    /// A PEFT folder.
    Peft(PeftAdapter),
}

impl AdapterFile {
    /// The adapters (dequantized for a quantized file), keyed by layer name.
    pub fn adapters(&self) -> NativeAdapters {
        match self {
            AdapterFile::Native(a) => a.clone(),
            AdapterFile::Quantized(q) => q.dequantize(),
            AdapterFile::Peft(p) => p.adapters.clone(),
        }
    }

    /// The adapters, without a copy.
    pub fn into_adapters(self) -> NativeAdapters {
        match self {
            AdapterFile::Native(a) => a,
            AdapterFile::Quantized(q) => q.dequantize(),
            AdapterFile::Peft(p) => p.adapters,
        }
    }

    /// What kind of file this is, in words.
    pub fn describe(&self) -> String {
        match self {
            AdapterFile::Native(_) => "kron-adapters adapter file".into(),
            AdapterFile::Quantized(q) => {
                format!("kron-adapters quantized adapter file ({})", q.config)
            }
            AdapterFile::Peft(p) => format!("PEFT {} folder", p.config.peft_type),
        }
    }
}

/// Reads a whole file named by a user (a command-line argument, an HTTP request, a model
/// folder). Refuses what is neither a file nor a folder — a device such as `/dev/zero`, a FIFO,
/// a socket — by name before reading, since reading one never ends (or blocks); a folder is an
/// I/O error.
pub fn read_file(path: impl AsRef<Path>) -> Result<Vec<u8>, AdapterError> {
    use std::io::Read;
    let path = path.as_ref();
    let (mut file, len) = open_file(path)?;
    let mut bytes = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    file.read_to_end(&mut bytes)
        .map_err(|e| AdapterError::io(path, e))?;
    Ok(bytes)
}

/// Opens a file named by a user to read it in pieces: the file and its length. Refuses what
/// [`read_file`] refuses (a device, FIFO or socket, by name); a folder is an I/O error.
pub fn open_file(path: impl AsRef<Path>) -> Result<(std::fs::File, u64), AdapterError> {
    let path = path.as_ref();
    let meta = std::fs::metadata(path).map_err(|e| AdapterError::io(path, e))?;
    if meta.is_dir() {
        let e = std::io::Error::new(std::io::ErrorKind::IsADirectory, "is a directory");
        return Err(AdapterError::io(path, e));
    }
    if !meta.is_file() {
        return Err(AdapterError::format(
            path.display().to_string(),
            "not a regular file (a device, FIFO or socket): give the path of a file",
        ));
    }
    let file = std::fs::File::open(path).map_err(|e| AdapterError::io(path, e))?;
    Ok((file, meta.len()))
}

/// [`read_file`] for UTF-8 text (a JSON configuration).
pub fn read_text(path: impl AsRef<Path>) -> Result<String, AdapterError> {
    let path = path.as_ref();
    String::from_utf8(read_file(path)?).map_err(|e| {
        AdapterError::format(path.display().to_string(), format!("not UTF-8 text: {e}"))
    })
}

/// Reads an adapter file or folder of any format: a folder is a PEFT adapter, a file a native or
/// quantized adapter file (told apart by its metadata).
pub fn read_any(path: impl AsRef<Path>) -> Result<AdapterFile, AdapterError> {
    let path = path.as_ref();
    if path.is_dir() {
        return Ok(AdapterFile::Peft(PeftAdapter::read_dir(path)?));
    }
    let bytes = read_file(path)?;
    let shown = path.display().to_string();
    if is_quantized(&bytes) {
        Ok(AdapterFile::Quantized(QuantizedAdapters::from_bytes(
            &shown, &bytes,
        )?))
    } else {
        Ok(AdapterFile::Native(NativeAdapters::from_bytes(
            &shown, &bytes,
        )?))
    }
}

/// The size of a file, or of a folder's files, in bytes (0 when it cannot be read).
pub fn size_on_disk(path: &Path) -> u64 {
    if path.is_dir() {
        std::fs::read_dir(path)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter_map(|e| e.metadata().ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0)
    } else {
        std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
    }
}
