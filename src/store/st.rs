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
        // A Burn quantized tensor (an int8 frozen base): the values it computes with.
        let data = crate::quant::float_values(t).into_data().convert::<f32>();
        Self {
            shape: data.shape.to_vec(),
            // Moved out, not copied (a model's embedding is hundreds of MB).
            data: data.into_vec::<f32>().expect("f32 after convert"),
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

/// f32 values as little-endian bytes of `dtype` (F32, F16 or BF16; rounded to nearest). A
/// finite value that F16 would turn into infinity (|x| ≥ 65520) is refused: every writer of
/// half-precision weights (merges into an F16 base, `export-hf`, GGUF F16) goes through here.
pub fn encode_f32(values: &[f32], dtype: Dtype) -> Result<Vec<u8>, String> {
    Ok(match dtype {
        Dtype::F16 => {
            let mut out = Vec::with_capacity(values.len() * 2);
            for &x in values {
                let h = half::f16::from_f32(x);
                if h.is_infinite() && x.is_finite() {
                    return Err(format!("{x} is beyond F16's range"));
                }
                out.extend(h.to_le_bytes());
            }
            out
        }
        Dtype::BF16 => values
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect(),
        _ => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
    })
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
    let specs: Vec<Spec> = entries
        .iter()
        .map(|(k, dtype, shape, _)| (k.clone(), *dtype, shape.clone()))
        .collect();
    let mut out = Vec::new();
    write_streamed(path, &mut out, &specs, metadata, &mut |i| {
        Ok(entries[i].3.as_ref())
    })?;
    Ok(out)
}

/// One tensor of a streamed file: name, dtype, shape.
pub type Spec = (String, Dtype, Vec<usize>);

/// Writes a safetensors file to `out` one tensor at a time, so a file larger than memory can be
/// written: the header comes from `specs` alone, then `data(i)` gives the bytes of `specs[i]`
/// when they are due (each checked against its dtype and shape). Tensors are laid out as the
/// `safetensors` crate lays them out (by descending dtype, then name) under a canonical header
/// (sorted keys, space-padded to a multiple of 8 bytes), so the bytes equal [`serialize`]'s of
/// the same content. `path` names the file in errors. Returns the bytes written.
pub fn write_streamed<D: AsRef<[u8]>>(
    path: &str,
    out: &mut dyn std::io::Write,
    specs: &[Spec],
    metadata: HashMap<String, String>,
    data: &mut dyn FnMut(usize) -> Result<D, AdapterError>,
) -> Result<u64, AdapterError> {
    let fail = |m: String| AdapterError::format(path, format!("cannot serialize: {m}"));
    let mut order: Vec<usize> = (0..specs.len()).collect();
    order.sort_by(|&l, &r| {
        specs[r]
            .1
            .cmp(&specs[l].1)
            .then(specs[l].0.cmp(&specs[r].0))
    });
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        header.insert("__metadata__".into(), serde_json::json!(metadata));
    }
    let mut sizes = vec![0usize; specs.len()];
    let mut offset = 0usize;
    for &i in &order {
        let (name, dtype, shape) = &specs[i];
        let bits = shape
            .iter()
            .try_fold(dtype.bitsize(), |n, &d| n.checked_mul(d))
            .filter(|bits| bits % 8 == 0)
            .ok_or_else(|| {
                fail(format!(
                    "`{name}`: {shape:?} {dtype:?} is not a whole number of bytes"
                ))
            })?;
        sizes[i] = bits / 8;
        let end = offset
            .checked_add(sizes[i])
            .ok_or_else(|| fail("the tensors' sizes overflow".into()))?;
        if header.contains_key(name.as_str()) || name == "__metadata__" {
            return Err(fail(format!("`{name}` is named twice")));
        }
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, end]}),
        );
        offset = end;
    }
    let json = padded_json(&header.into());
    let io = |e| AdapterError::io(path, e);
    out.write_all(&(json.len() as u64).to_le_bytes())
        .map_err(io)?;
    out.write_all(&json).map_err(io)?;
    for &i in &order {
        let bytes = data(i)?;
        let bytes = bytes.as_ref();
        if bytes.len() != sizes[i] {
            return Err(fail(format!(
                "`{}` has {} bytes where its dtype and shape need {}",
                specs[i].0,
                bytes.len(),
                sizes[i]
            )));
        }
        out.write_all(bytes).map_err(io)?;
    }
    Ok((8 + json.len() + offset) as u64)
}

/// A safetensors file read one tensor at a time: the header is read and checked when the file
/// is opened (as [`parse`] checks it: offsets contiguous and sized by dtype and shape, and the
/// data exactly filling the file), and each tensor's bytes only when asked for. Loading a model
/// this way holds the model and one tensor's bytes, never the whole file besides.
pub struct SafetensorsFile {
    shown: String,
    file: std::fs::File,
    meta: ::safetensors::tensor::Metadata,
    /// Where the data starts in the file.
    start: u64,
    len: u64,
}

impl SafetensorsFile {
    /// Opens and checks `path` (a device, FIFO or socket is refused by name, as
    /// [`super::read_file`] refuses it).
    pub fn open(path: &Path) -> Result<Self, AdapterError> {
        use std::io::Read;
        let shown = path.display().to_string();
        let bad =
            |m: String| AdapterError::format(&shown, format!("not a valid safetensors file: {m}"));
        let (mut file, len) = super::open_file(path)?;
        let mut n = [0u8; 8];
        file.read_exact(&mut n)
            .map_err(|_| bad("shorter than its 8-byte header size".into()))?;
        let n = u64::from_le_bytes(n);
        // The `safetensors` crate's own limit on a header.
        if n > 100_000_000 || n > len.saturating_sub(8) {
            return Err(bad(format!("a header of {n} bytes in a file of {len}")));
        }
        let mut header = vec![0u8; n as usize];
        file.read_exact(&mut header)
            .map_err(|e| AdapterError::io(path, e))?;
        let header = std::str::from_utf8(&header).map_err(|e| bad(format!("header: {e}")))?;
        let meta: ::safetensors::tensor::Metadata =
            serde_json::from_str(header).map_err(|e| bad(format!("header: {e}")))?;
        let start = 8 + n;
        if meta.data_len() as u64 != len.saturating_sub(start) {
            return Err(bad(format!(
                "the header describes {} bytes of tensors, the file holds {}",
                meta.data_len(),
                len - start
            )));
        }
        Ok(Self {
            shown,
            file,
            meta,
            start,
            len,
        })
    }

    /// The file's size in bytes.
    pub fn byte_len(&self) -> u64 {
        self.len
    }

    /// The tensors' names, in no particular order.
    pub fn names(&self) -> Vec<String> {
        self.meta.tensors().into_keys().collect()
    }

    /// The shape of `name`, if the file holds it.
    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.meta.info(name).map(|i| i.shape.clone())
    }

    /// Each tensor's name, dtype and shape, in no particular order.
    pub fn specs(&self) -> Vec<Spec> {
        self.meta
            .tensors()
            .into_iter()
            .map(|(name, info)| (name, info.dtype, info.shape.clone()))
            .collect()
    }

    /// The file's `__metadata__` (empty when there is none).
    pub fn metadata(&self) -> HashMap<String, String> {
        self.meta.metadata().clone().unwrap_or_default()
    }

    /// The bytes of `name`, read from the file now. `None` when the file does not hold it.
    pub fn read_bytes(&mut self, name: &str) -> Option<Result<Vec<u8>, AdapterError>> {
        use std::io::{Read, Seek, SeekFrom};
        let (s, e) = self.meta.info(name)?.data_offsets;
        let mut bytes = vec![0u8; e - s];
        let read = self
            .file
            .seek(SeekFrom::Start(self.start + s as u64))
            .and_then(|_| self.file.read_exact(&mut bytes));
        Some(read.map(|()| bytes).map_err(|e| {
            AdapterError::format(
                &self.shown,
                format!("reading `{name}`: {e} (the file changed while it was read?)"),
            )
        }))
    }

    /// The values of `name` as f32 (from F32, F16 or BF16; [`decode_f32`]), read from the
    /// file now. `None` when the file does not hold it.
    pub fn read_f32(&mut self, name: &str) -> Option<Result<Vec<f32>, AdapterError>> {
        let bytes = self.read_bytes(name)?;
        let info = self.meta.info(name)?;
        Some(bytes.and_then(|bytes| {
            TensorView::new(info.dtype, info.shape.clone(), &bytes)
                .map_err(|e| AdapterError::format(&self.shown, format!("`{name}`: {e}")))
                .and_then(|view| decode_f32(&self.shown, name, &view))
        }))
    }
}

/// The safetensors files of a Hugging Face model folder: `model.safetensors`, or the shards
/// that `model.safetensors.index.json` lists (each a file name in the folder), sorted.
pub fn model_dir_shards(dir: &Path) -> Result<Vec<PathBuf>, AdapterError> {
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    let index_path = dir.join("model.safetensors.index.json");
    let text = super::read_text(&index_path).map_err(|e| match e {
        AdapterError::Io { source, .. } => AdapterError::io(
            &index_path,
            std::io::Error::new(
                source.kind(),
                format!("{source} (a model folder holds model.safetensors or a sharded index)"),
            ),
        ),
        other => other,
    })?;
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: std::collections::BTreeMap<String, String>,
    }
    let index: Index = serde_json::from_str(&text).map_err(|e| {
        AdapterError::format(index_path.display().to_string(), format!("bad index: {e}"))
    })?;
    let shards: std::collections::BTreeSet<&String> = index.weight_map.values().collect();
    shards
        .into_iter()
        .map(|shard| {
            if shard.is_empty()
                || shard.contains('/')
                || shard.contains('\\')
                || shard.starts_with('.')
            {
                return Err(AdapterError::format(
                    index_path.display().to_string(),
                    format!("shard name {shard:?} is not a file name in the folder"),
                ));
            }
            Ok(dir.join(shard))
        })
        .collect()
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
    let json = padded_json(&header);
    let mut out = Vec::with_capacity(8 + json.len() + bytes.len() - 8 - n);
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    out.extend_from_slice(&bytes[8 + n..]);
    Ok(out)
}

/// A safetensors header's JSON with sorted keys (serde_json's map is ordered by key, so the
/// serialization is canonical), padded with spaces to a multiple of 8 bytes.
fn padded_json(header: &serde_json::Value) -> Vec<u8> {
    let mut json = serde_json::to_vec(header).expect("a JSON value serializes");
    while !json.len().is_multiple_of(8) {
        json.push(b' ');
    }
    json
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
    write_dir_atomic_with(dir, overwrite, &mut |tmp| {
        for (name, bytes) in files {
            write_atomic(&tmp.join(name), bytes)?;
        }
        Ok(())
    })
}

/// [`write_dir_atomic`] for files written piece by piece: `fill` gets the temporary folder to
/// write into (with [`write_atomic_with`] for a file too large to hold in memory); its error
/// leaves nothing behind.
pub fn write_dir_atomic_with(
    dir: &Path,
    overwrite: bool,
    fill: &mut dyn FnMut(&Path) -> Result<(), AdapterError>,
) -> Result<(), AdapterError> {
    refuse_existing(dir, overwrite)?;
    let tmp = temp_sibling(dir, "dir");
    let _ = std::fs::remove_dir_all(&tmp);
    let result = (|| {
        std::fs::create_dir_all(&tmp).map_err(|e| AdapterError::io(&tmp, e))?;
        fill(&tmp)?;
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
