//! Safetensors plumbing shared by every format: host tensors, dtype decoding and encoding,
//! canonical headers, metadata, and atomic writes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use ::safetensors::tensor::TensorView;
use ::safetensors::{Dtype, SafeTensors};
use burn::tensor::{backend::Backend, Tensor, TensorData};

use crate::error::AdapterError;

/// A tensor's values on the host, as files hold them (f32, row-major).
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    /// Its shape.
    pub shape: Vec<usize>,
    /// Its values, row-major.
    pub data: Vec<f32>,
}

impl HostTensor {
    /// Copies a tensor to the host.
    pub fn from_tensor<B: Backend, const D: usize>(t: Tensor<B, D>) -> Self {
        let data = t.into_data().convert::<f32>();
        Self {
            shape: data.shape.to_vec(),
            data: data.to_vec::<f32>().expect("f32 after convert"),
        }
    }

    /// A safetensors tensor as f32 (from F32, F16 or BF16); `name` and `path` name it in the
    /// error for other dtypes.
    pub fn from_view(path: &str, name: &str, view: &TensorView<'_>) -> Result<Self, AdapterError> {
        Ok(Self {
            shape: view.shape().to_vec(),
            data: decode_f32(path, name, view)?,
        })
    }

    /// A tensor of any rank on `device` (`D` must be its rank).
    pub fn to_tensor<B: Backend, const D: usize>(&self, device: &B::Device) -> Tensor<B, D> {
        Tensor::from_data(
            TensorData::new(self.data.clone(), self.shape.clone()),
            device,
        )
    }

    /// The transpose of a 2-D tensor (PyTorch `[out, in]` ↔ Burn `[in, out]`).
    pub fn transposed(&self) -> Self {
        let (r, c) = (self.shape[0], self.shape[1]);
        let mut data = vec![0f32; r * c];
        for i in 0..r {
            for j in 0..c {
                data[j * r + i] = self.data[i * c + j];
            }
        }
        Self {
            shape: vec![c, r],
            data,
        }
    }

    /// `self · other` for 2-D tensors (f64 accumulation): PEFT's decomposed factors
    /// (`lokr_w1_a @ lokr_w1_b`) are multiplied out on the host when a file is converted.
    pub fn matmul(&self, other: &Self) -> Self {
        let (n, k, m) = (self.shape[0], self.shape[1], other.shape[1]);
        debug_assert_eq!(k, other.shape[0], "inner sizes are checked by the callers");
        let mut data = vec![0f32; n * m];
        for i in 0..n {
            for j in 0..m {
                let s: f64 = (0..k)
                    .map(|t| self.data[i * k + t] as f64 * other.data[t * m + j] as f64)
                    .sum();
                data[i * m + j] = s as f32;
            }
        }
        Self {
            shape: vec![n, m],
            data,
        }
    }

    /// The little-endian f32 bytes.
    pub fn f32_bytes(&self) -> Vec<u8> {
        self.data.iter().flat_map(|v| v.to_le_bytes()).collect()
    }
}

/// A safetensors tensor's values as f32, from F32, F16 or BF16.
pub fn decode_f32(path: &str, name: &str, view: &TensorView<'_>) -> Result<Vec<f32>, AdapterError> {
    let b = view.data();
    Ok(match view.dtype() {
        Dtype::F32 => b
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F16 => b
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => b
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        other => {
            return Err(AdapterError::Unsupported {
                option: "dtype".into(),
                message: format!("{path}: `{name}` is {other:?}; F32, F16 and BF16 are supported"),
            })
        }
    })
}

/// f32 values as little-endian bytes of `dtype` (F32, F16 or BF16; rounded to nearest).
pub fn encode_f32(values: &[f32], dtype: Dtype) -> Vec<u8> {
    match dtype {
        Dtype::F16 => values
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect(),
        Dtype::BF16 => values
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect(),
        _ => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
    }
}

/// One tensor to write: name, dtype, shape, bytes (owned or borrowed).
pub type Entry<D = Vec<u8>> = (String, Dtype, Vec<usize>, D);

/// Serializes tensors and metadata as safetensors bytes with a canonical header (sorted keys),
/// so the same content always gives the same bytes.
pub fn serialize<D: AsRef<[u8]>>(
    path: &str,
    entries: &[Entry<D>],
    metadata: HashMap<String, String>,
) -> Result<Vec<u8>, AdapterError> {
    let fail = |m: String| AdapterError::format(path, format!("cannot serialize: {m}"));
    let views = entries
        .iter()
        .map(|(k, dtype, shape, bytes)| {
            TensorView::new(*dtype, shape.clone(), bytes.as_ref())
                .map(|v| (k.clone(), v))
                .map_err(|e| fail(format!("`{k}`: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let meta = (!metadata.is_empty()).then_some(metadata);
    let bytes = ::safetensors::serialize(views, meta).map_err(|e| fail(e.to_string()))?;
    canonical_safetensors(&bytes).map_err(fail)
}

/// Parses safetensors bytes; `path` names the file in the error.
pub fn parse<'a>(path: &str, bytes: &'a [u8]) -> Result<SafeTensors<'a>, AdapterError> {
    SafeTensors::deserialize(bytes)
        .map_err(|e| AdapterError::format(path, format!("not a valid safetensors file: {e}")))
}

/// The metadata of safetensors bytes (empty when there is none).
pub fn metadata(path: &str, bytes: &[u8]) -> Result<HashMap<String, String>, AdapterError> {
    let (_, header) = SafeTensors::read_metadata(bytes)
        .map_err(|e| AdapterError::format(path, format!("not a valid safetensors file: {e}")))?;
    Ok(header.metadata().clone().unwrap_or_default())
}

/// Parses the JSON held under `key` in the metadata, if present.
pub fn meta_json<T: serde::de::DeserializeOwned>(
    path: &str,
    meta: &HashMap<String, String>,
    key: &str,
) -> Result<Option<T>, AdapterError> {
    meta.get(key)
        .map(|json| {
            serde_json::from_str(json)
                .map_err(|e| AdapterError::format(path, format!("bad `{key}` metadata: {e}")))
        })
        .transpose()
}

/// Rewrites a safetensors file's JSON header with sorted keys (padded with spaces to a multiple
/// of 8 bytes), so the same tensors and metadata always give the same bytes. Burn's store writes
/// its metadata from a hash map, in an order that changes from run to run.
pub fn canonical_safetensors(bytes: &[u8]) -> Result<Vec<u8>, String> {
    let (n, _) = SafeTensors::read_metadata(bytes)
        .map_err(|e| format!("not a valid safetensors buffer: {e}"))?;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n])
        .map_err(|e| format!("bad safetensors header: {e}"))?;
    // serde_json's map is ordered by key, so this serialization is canonical.
    let mut json = serde_json::to_vec(&header).expect("a JSON value serializes");
    while !json.len().is_multiple_of(8) {
        json.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + json.len() + bytes.len() - 8 - n);
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    out.extend_from_slice(&bytes[8 + n..]);
    Ok(out)
}

/// Reads the file at `path` and parses it with `parse(name, bytes)`, the name being the path
/// (for error messages).
pub fn read_file<T>(
    path: &Path,
    parse: impl FnOnce(&str, &[u8]) -> Result<T, AdapterError>,
) -> Result<T, AdapterError> {
    let bytes = super::read_file(path)?;
    parse(&path.display().to_string(), &bytes)
}

/// A sibling path of `path` for a temporary copy: `.<name>.tmp-<pid>` in the same directory
/// (so the final rename stays on one file system).
fn temp_sibling(path: &Path, fallback: &str) -> PathBuf {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| fallback.into());
    dir.join(format!(".{name}.tmp-{}", std::process::id()))
}

/// Writes `bytes` to `path` through a temporary file in the same directory, synced, and a
/// rename, so readers never see a partial file and a crash keeps the previous one.
///
/// An existing `path` that is a device, FIFO or socket is refused: the rename would replace the
/// node itself (`--force` onto `/dev/null` used to leave a regular file there).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), AdapterError> {
    write_atomic_with(path, &mut |f| {
        f.write_all(bytes).map_err(|e| AdapterError::io(path, e))
    })
}

/// [`write_atomic`] for a file written piece by piece: `write` gets the temporary file
/// (buffered); its error, or any error writing, leaves nothing behind.
pub fn write_atomic_with(
    path: &Path,
    write: &mut dyn FnMut(&mut dyn std::io::Write) -> Result<(), AdapterError>,
) -> Result<(), AdapterError> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        let t = meta.file_type();
        if !(t.is_file() || t.is_symlink() || t.is_dir()) {
            return Err(AdapterError::format(
                path.display().to_string(),
                "exists and is not a regular file (a device, FIFO or socket): write to a file path",
            ));
        }
    }
    let tmp = temp_sibling(path, "out");
    let result = std::fs::File::create(&tmp)
        .map_err(|e| AdapterError::io(path, e))
        .and_then(|f| {
            let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
            write(&mut w)?;
            let f = w
                .into_inner()
                .map_err(|e| AdapterError::io(path, e.into_error()))?;
            f.sync_all().map_err(|e| AdapterError::io(path, e))
        })
        .and_then(|_| std::fs::rename(&tmp, path).map_err(|e| AdapterError::io(path, e)));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Writes a folder of files atomically: into a temporary sibling folder, then renamed into
/// place (replacing `dir` only when `overwrite`), so a failure leaves nothing behind.
pub fn write_dir_atomic(
    dir: &Path,
    files: &[(&str, &[u8])],
    overwrite: bool,
) -> Result<(), AdapterError> {
    refuse_existing(dir, overwrite)?;
    let tmp = temp_sibling(dir, "dir");
    let _ = std::fs::remove_dir_all(&tmp);
    let result = (|| {
        std::fs::create_dir_all(&tmp).map_err(|e| AdapterError::io(&tmp, e))?;
        for (name, bytes) in files {
            write_atomic(&tmp.join(name), bytes)?;
        }
        if dir.exists() {
            std::fs::remove_dir_all(dir).map_err(|e| AdapterError::io(dir, e))?;
        }
        std::fs::rename(&tmp, dir).map_err(|e| AdapterError::io(dir, e))
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

/// An I/O error when `path` exists and `overwrite` is off.
pub fn refuse_existing(path: &Path, overwrite: bool) -> Result<(), AdapterError> {
    if path.exists() && !overwrite {
        return Err(AdapterError::io(
            path,
            std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "already exists (pass overwrite / --force to replace it)",
            ),
        ));
    }
    Ok(())
}

/// Gives a file format with `from_bytes(path, bytes)` and `to_bytes()` its `read(path)` and
/// `write(path)` (atomic; returns the size written).
macro_rules! file_io {
    ($ty:ty, $what:literal) => {
        impl $ty {
            #[doc = concat!("Reads ", $what, ".")]
            pub fn read(path: impl AsRef<std::path::Path>) -> Result<Self, AdapterError> {
                super::st::read_file(path.as_ref(), Self::from_bytes)
            }

            #[doc = concat!("Writes ", $what, " (atomically); returns its size in bytes.")]
            pub fn write(&self, path: impl AsRef<std::path::Path>) -> Result<u64, AdapterError> {
                let bytes = self.to_bytes()?;
                super::st::write_atomic(path.as_ref(), &bytes)?;
                Ok(bytes.len() as u64)
            }
        }
    };
}
pub(crate) use file_io;
