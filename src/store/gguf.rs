//! GGUF files (llama.cpp / ggml): a small reader for the header, the metadata and the tensor
//! table, dequantization of the common tensor types to f32, and a writer ([`write()`], one tensor
//! at a time) of F32, F16 and Q8_0 tensors.
//!
//! Layout (ggml's `docs/gguf.md`; versions 2 and 3, little-endian): magic `GGUF`, `u32`
//! version, `u64` tensor count, `u64` metadata count, the metadata (`string key`, `u32` type,
//! value; strings are `u64` length + UTF-8, arrays `u32` element type + `u64` count + values),
//! the tensor infos (`string name`, `u32 n_dims`, `u64` dims with the fastest-varying first —
//! the reverse of PyTorch's shape —, `u32` ggml type, `u64` offset), then the data, aligned to
//! `general.alignment` (default 32), each tensor at `data_start + offset`.
//!
//! Dequantization follows ggml's reference `dequantize_row_*` (`ggml-quants.c`), in f32 in the
//! same order of operations, for F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and the k-quants
//! Q2_K, Q3_K, Q4_K, Q5_K, Q6_K; every other type is refused with an error naming it. Every
//! size, count and offset read from the file is checked before it is used: a truncated or
//! hostile file is an [`AdapterError`], never a panic or an unbounded allocation.

use std::collections::BTreeMap;
use std::path::Path;

use crate::error::AdapterError;

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum GgufValue {
    /// `uint8`.
    U8(u8),
    /// `int8`.
    I8(i8),
    /// `uint16`.
    U16(u16),
    /// `int16`.
    I16(i16),
    /// `uint32`.
    U32(u32),
    /// `int32`.
    I32(i32),
    /// `float32`.
    F32(f32),
    /// `bool`.
    Bool(bool),
    /// `string`.
    String(String),
    /// `array` (elements of one type).
    Array(Vec<GgufValue>),
    /// `uint64`.
    U64(u64),
    /// `int64`.
    I64(i64),
    /// `float64`.
    F64(f64),
}

impl GgufValue {
    /// The value as an unsigned integer, if it is a non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U8(v) => Some(v as u64),
            GgufValue::U16(v) => Some(v as u64),
            GgufValue::U32(v) => Some(v as u64),
            GgufValue::U64(v) => Some(v),
            GgufValue::I8(v) => u64::try_from(v).ok(),
            GgufValue::I16(v) => u64::try_from(v).ok(),
            GgufValue::I32(v) => u64::try_from(v).ok(),
            GgufValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a float, if it is a number.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(v) => Some(v as f64),
            GgufValue::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64).or(match *self {
                GgufValue::I8(v) => Some(v as f64),
                GgufValue::I16(v) => Some(v as f64),
                GgufValue::I32(v) => Some(v as f64),
                GgufValue::I64(v) => Some(v as f64),
                _ => None,
            }),
        }
    }

    /// The value as a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// The value as a bool.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            GgufValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// The value as an array.
    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(v) => Some(v),
            _ => None,
        }
    }
}

/// A ggml tensor type this reader knows the size of.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GgmlType {
    /// 32-bit float.
    F32,
    /// 16-bit float.
    F16,
    /// bfloat16.
    BF16,
    /// 4-bit, scale, blocks of 32.
    Q4_0,
    /// 4-bit, scale and minimum, blocks of 32.
    Q4_1,
    /// 5-bit, scale, blocks of 32.
    Q5_0,
    /// 5-bit, scale and minimum, blocks of 32.
    Q5_1,
    /// 8-bit, scale, blocks of 32.
    Q8_0,
    /// 2-bit k-quant, blocks of 256.
    Q2K,
    /// 3-bit k-quant.
    Q3K,
    /// 4-bit k-quant.
    Q4K,
    /// 5-bit k-quant.
    Q5K,
    /// 6-bit k-quant.
    Q6K,
}

impl GgmlType {
    /// The type of a ggml type id, if this reader knows it.
    pub fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            6 => GgmlType::Q5_0,
            7 => GgmlType::Q5_1,
            8 => GgmlType::Q8_0,
            10 => GgmlType::Q2K,
            11 => GgmlType::Q3K,
            12 => GgmlType::Q4K,
            13 => GgmlType::Q5K,
            14 => GgmlType::Q6K,
            30 => GgmlType::BF16,
            _ => return None,
        })
    }

    /// ggml's name of a type id (for error messages), known to this reader or not.
    pub fn name_of(id: u32) -> String {
        const NAMES: &[(u32, &str)] = &[
            (0, "F32"),
            (1, "F16"),
            (2, "Q4_0"),
            (3, "Q4_1"),
            (6, "Q5_0"),
            (7, "Q5_1"),
            (8, "Q8_0"),
            (9, "Q8_1"),
            (10, "Q2_K"),
            (11, "Q3_K"),
            (12, "Q4_K"),
            (13, "Q5_K"),
            (14, "Q6_K"),
            (15, "Q8_K"),
            (16, "IQ2_XXS"),
            (17, "IQ2_XS"),
            (18, "IQ3_XXS"),
            (19, "IQ1_S"),
            (20, "IQ4_NL"),
            (21, "IQ3_S"),
            (22, "IQ2_S"),
            (23, "IQ4_XS"),
            (24, "I8"),
            (25, "I16"),
            (26, "I32"),
            (27, "I64"),
            (28, "F64"),
            (29, "IQ1_M"),
            (30, "BF16"),
            (34, "TQ1_0"),
            (35, "TQ2_0"),
            (39, "MXFP4"),
        ];
        NAMES
            .iter()
            .find(|(i, _)| *i == id)
            .map_or_else(|| format!("type id {id}"), |(_, n)| n.to_string())
    }

    /// Elements per block and bytes per block.
    pub fn block(self) -> (usize, usize) {
        match self {
            GgmlType::F32 => (1, 4),
            GgmlType::F16 | GgmlType::BF16 => (1, 2),
            GgmlType::Q4_0 => (32, 18),
            GgmlType::Q4_1 => (32, 20),
            GgmlType::Q5_0 => (32, 22),
            GgmlType::Q5_1 => (32, 24),
            GgmlType::Q8_0 => (32, 34),
            GgmlType::Q2K => (256, 84),
            GgmlType::Q3K => (256, 110),
            GgmlType::Q4K => (256, 144),
            GgmlType::Q5K => (256, 176),
            GgmlType::Q6K => (256, 210),
        }
    }
}

/// A tensor's entry in the table.
#[derive(Clone, Debug, PartialEq)]
pub struct GgufTensorInfo {
    /// Its name (`blk.0.attn_q.weight`).
    pub name: String,
    /// Its shape in PyTorch order (slowest-varying first: `[out, in]` for a weight).
    pub shape: Vec<usize>,
    /// The ggml type id.
    pub type_id: u32,
    /// Its offset in the file (absolute).
    pub offset: usize,
    /// Its size in bytes, when the type is known.
    pub size: Option<usize>,
}

impl GgufTensorInfo {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A GGUF file: its metadata and tensor table, parsed and checked, and its tensors' data —
/// in memory ([`GgufFile::from_bytes`]) or read from the file a tensor at a time
/// ([`GgufFile::read`]: a model's weights are not held besides the model).
pub struct GgufFile {
    /// `2` or `3`.
    pub version: u32,
    /// Every metadata key and value.
    pub metadata: BTreeMap<String, GgufValue>,
    /// Every tensor, in file order.
    pub tensors: Vec<GgufTensorInfo>,
    path: String,
    data: Data,
}

/// Where a GGUF file's tensor data is.
enum Data {
    Bytes(Vec<u8>),
    File(std::sync::Mutex<std::fs::File>),
}

/// Reads little-endian values from the start of a file (`bytes`, a prefix of its `total`
/// bytes), with every read bounds-checked against the file.
struct Reader<'a> {
    bytes: &'a [u8],
    /// The file's length.
    total: usize,
    pos: usize,
    path: &'a str,
    /// A read went past the prefix but not past the file: parse again with more of it.
    short: bool,
}

impl<'a> Reader<'a> {
    fn err(&self, what: impl Into<String>) -> AdapterError {
        AdapterError::format(
            self.path,
            format!(
                "not a valid GGUF file: {} (at byte {})",
                what.into(),
                self.pos
            ),
        )
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], AdapterError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.total);
        self.short = end.is_some_and(|e| e > self.bytes.len());
        let end = end
            .filter(|&e| e <= self.bytes.len())
            .ok_or_else(|| self.err(format!("truncated: {n} more bytes needed")))?;
        let s = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], AdapterError> {
        let s = self.take(N)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self) -> Result<u32, AdapterError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, AdapterError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// A count that must fit in the bytes left, at `min_size` bytes per item.
    fn count(&mut self, min_size: usize, what: &str) -> Result<usize, AdapterError> {
        let n = self.u64()?;
        let left = self.total.saturating_sub(self.pos) as u64;
        if n.saturating_mul(min_size.max(1) as u64) > left {
            return Err(self.err(format!("{what} count {n} exceeds the file")));
        }
        Ok(n as usize)
    }

    fn string(&mut self) -> Result<String, AdapterError> {
        let n = self.count(1, "string length")?;
        let s = self.take(n)?;
        String::from_utf8(s.to_vec()).map_err(|_| self.err("a string that is not UTF-8"))
    }

    fn value(&mut self, type_id: u32, depth: usize) -> Result<GgufValue, AdapterError> {
        Ok(match type_id {
            0 => GgufValue::U8(self.array::<1>()?[0]),
            1 => GgufValue::I8(self.array::<1>()?[0] as i8),
            2 => GgufValue::U16(u16::from_le_bytes(self.array()?)),
            3 => GgufValue::I16(i16::from_le_bytes(self.array()?)),
            4 => GgufValue::U32(self.u32()?),
            5 => GgufValue::I32(i32::from_le_bytes(self.array()?)),
            6 => GgufValue::F32(f32::from_le_bytes(self.array()?)),
            7 => match self.array::<1>()?[0] {
                0 => GgufValue::Bool(false),
                1 => GgufValue::Bool(true),
                b => return Err(self.err(format!("bool value {b}"))),
            },
            8 => GgufValue::String(self.string()?),
            9 => {
                if depth > 0 {
                    return Err(self.err("an array of arrays (llama.cpp refuses them too)"));
                }
                let elem = self.u32()?;
                let min = match elem {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 | 10..=12 => 8,
                    _ => return Err(self.err(format!("array element type {elem}"))),
                };
                let n = self.count(min, "array")?;
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.value(elem, depth + 1)?);
                }
                GgufValue::Array(v)
            }
            10 => GgufValue::U64(self.u64()?),
            11 => GgufValue::I64(i64::from_le_bytes(self.array()?)),
            12 => GgufValue::F64(f64::from_le_bytes(self.array()?)),
            other => return Err(self.err(format!("metadata value type {other}"))),
        })
    }
}

impl GgufFile {
    /// Opens a GGUF file: its header, metadata and tensor table are read and checked now
    /// (every count, size and offset against the file's length), its tensors' data when
    /// dequantized. A device, FIFO or socket is refused by name.
    pub fn read(path: impl AsRef<Path>) -> Result<Self, AdapterError> {
        use std::io::Read;
        let path = path.as_ref();
        let shown = path.display().to_string();
        let (mut file, len) = super::open_file(path)?;
        let total = usize::try_from(len).unwrap_or(usize::MAX);
        // The header and metadata (a tokenizer's: a few MB) are read in growing pieces.
        let mut head = Vec::new();
        let mut want = 1 << 20;
        loop {
            let more = want.min(total) - head.len();
            let got = (&mut file)
                .take(more as u64)
                .read_to_end(&mut head)
                .map_err(|e| AdapterError::io(path, e))?;
            let (parsed, short) = parse(&shown, &head, total);
            match parsed {
                Err(_) if short && got > 0 => want = want.saturating_mul(4),
                Err(e) => return Err(e),
                Ok((version, metadata, tensors)) => {
                    return Ok(Self {
                        version,
                        metadata,
                        tensors,
                        path: shown,
                        data: Data::File(std::sync::Mutex::new(file)),
                    })
                }
            }
        }
    }

    /// Parses a GGUF file's bytes; `path` names it in errors.
    pub fn from_bytes(path: &str, bytes: Vec<u8>) -> Result<Self, AdapterError> {
        let (version, metadata, tensors) = parse(path, &bytes, bytes.len()).0?;
        Ok(Self {
            version,
            metadata,
            tensors,
            path: path.to_string(),
            data: Data::Bytes(bytes),
        })
    }

    /// A metadata value.
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }

    /// A tensor's table entry.
    pub fn tensor(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The tensor `name` dequantized to f32, row-major in its PyTorch shape.
    pub fn dequantize(&self, name: &str) -> Result<Vec<f32>, AdapterError> {
        let info = self.tensor(name).ok_or_else(|| {
            AdapterError::format(&self.path, format!("no tensor `{name}` in the file"))
        })?;
        self.dequantize_info(info)
    }

    /// A tensor dequantized to f32, row-major in its PyTorch shape.
    pub fn dequantize_info(&self, info: &GgufTensorInfo) -> Result<Vec<f32>, AdapterError> {
        let (t, size) = self.check_type(info)?;
        let mut out = vec![0f32; info.numel()];
        match &self.data {
            Data::Bytes(bytes) => dequantize(t, &bytes[info.offset..info.offset + size], &mut out),
            Data::File(file) => {
                use std::io::{Read, Seek, SeekFrom};
                let mut data = vec![0u8; size];
                let mut file = file.lock().unwrap_or_else(|e| e.into_inner());
                file.seek(SeekFrom::Start(info.offset as u64))
                    .and_then(|_| file.read_exact(&mut data))
                    .map_err(|e| {
                        AdapterError::format(
                            &self.path,
                            format!(
                                "reading tensor `{}`: {e} (the file changed while it was read?)",
                                info.name
                            ),
                        )
                    })?;
                dequantize(t, &data, &mut out);
            }
        }
        Ok(out)
    }

    /// A tensor's type and size in bytes, or the error naming a type this reader does not
    /// dequantize ([`Self::dequantize_info`] fails only so).
    pub fn check_type(&self, info: &GgufTensorInfo) -> Result<(GgmlType, usize), AdapterError> {
        let (Some(t), Some(size)) = (GgmlType::from_id(info.type_id), info.size) else {
            return Err(AdapterError::Unsupported {
                option: "GGUF tensor type".into(),
                message: format!(
                    "{}: tensor `{}` is {}; this reader dequantizes F32, F16, BF16, Q4_0, Q4_1, \
                     Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K and Q6_K",
                    self.path,
                    info.name,
                    GgmlType::name_of(info.type_id)
                ),
            });
        };
        Ok((t, size))
    }
}

/// A GGUF file's version, metadata and tensor table from the first bytes of a file of `total`
/// bytes (all of them, or enough to hold the header and tables); `true` beside an error when
/// the bytes ran out before the file did (parse again with more of them).
#[allow(clippy::type_complexity)]
fn parse(
    path: &str,
    bytes: &[u8],
    total: usize,
) -> (
    Result<(u32, BTreeMap<String, GgufValue>, Vec<GgufTensorInfo>), AdapterError>,
    bool,
) {
    let mut r = Reader {
        bytes,
        total,
        pos: 0,
        path,
        short: false,
    };
    let parsed = parse_with(&mut r);
    (parsed, r.short)
}

#[allow(clippy::type_complexity)]
fn parse_with(
    r: &mut Reader<'_>,
) -> Result<(u32, BTreeMap<String, GgufValue>, Vec<GgufTensorInfo>), AdapterError> {
    let (path, total) = (r.path, r.total);
    if r.take(4)? != b"GGUF" {
        return Err(r.err("no GGUF magic"));
    }
    let version = r.u32()?;
    if version != 2 && version != 3 {
        return Err(AdapterError::Unsupported {
            option: "GGUF version".into(),
            message: format!("{path}: GGUF version {version}; versions 2 and 3 are read"),
        });
    }
    let n_tensors = r.count(4 + 8 + 4 + 4 + 8, "tensor")?;
    let n_kv = r.count(8 + 4 + 1, "metadata")?;
    let mut metadata = BTreeMap::new();
    for _ in 0..n_kv {
        let key = r.string()?;
        let t = r.u32()?;
        let value = r.value(t, 0)?;
        if key.is_empty() || metadata.insert(key.clone(), value).is_some() {
            return Err(r.err(format!("empty or repeated metadata key {key:?}")));
        }
    }
    let alignment = match metadata.get("general.alignment") {
        None => 32,
        Some(GgufValue::U32(a)) if a.is_power_of_two() => *a as usize,
        Some(other) => {
            return Err(r.err(format!(
                "general.alignment {other:?} is not a power of two (u32)"
            )))
        }
    };
    let mut infos = Vec::with_capacity(n_tensors);
    for _ in 0..n_tensors {
        let name = r.string()?;
        let n_dims = r.u32()? as usize;
        if n_dims == 0 || n_dims > 4 {
            return Err(r.err(format!("tensor `{name}` has {n_dims} dimensions (1 to 4)")));
        }
        let mut dims = Vec::with_capacity(n_dims);
        for _ in 0..n_dims {
            dims.push(r.u64()?);
        }
        let type_id = r.u32()?;
        let offset = r.u64()?;
        infos.push((name, dims, type_id, offset));
    }
    let data_start = r.pos.div_ceil(alignment) * alignment;
    let mut tensors = Vec::with_capacity(n_tensors);
    let mut names = std::collections::HashSet::new();
    for (name, dims, type_id, offset) in infos {
        if !names.insert(name.clone()) {
            return Err(r.err(format!("tensor `{name}` appears twice")));
        }
        let numel = dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .filter(|&n| n > 0 && n <= (total as u64).saturating_mul(8))
            .ok_or_else(|| r.err(format!("tensor `{name}` has dims {dims:?}")))?
            as usize;
        let offset = (data_start as u64)
            .checked_add(offset)
            .filter(|&o| o <= total as u64)
            .ok_or_else(|| r.err(format!("tensor `{name}` starts past the end")))?
            as usize;
        let size = match GgmlType::from_id(type_id) {
            Some(t) => {
                let (block, block_bytes) = t.block();
                if !(dims[0] as usize).is_multiple_of(block) {
                    return Err(r.err(format!(
                        "tensor `{name}`: its rows of {} do not fill {}'s blocks of {block}",
                        dims[0],
                        GgmlType::name_of(type_id)
                    )));
                }
                let size = numel / block * block_bytes;
                if offset + size > total {
                    return Err(r.err(format!(
                        "tensor `{name}` ({size} bytes at {offset}) runs past the end"
                    )));
                }
                Some(size)
            }
            None => None,
        };
        let shape = dims.iter().rev().map(|&d| d as usize).collect();
        tensors.push(GgufTensorInfo {
            name,
            shape,
            type_id,
            offset,
            size,
        });
    }
    Ok((version, metadata, tensors))
}

/// The name errors of [`write()`] give the file it writes (callers that know its path put it
/// in).
pub const OUTPUT: &str = "GGUF output";

/// A GGUF string: its length in 8 bytes, then its UTF-8.
fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

/// A tensor to write: its name, its shape in PyTorch order (`[out, in]` for a weight), and the
/// type to store it as ([`GgmlType::F32`], [`GgmlType::F16`] or [`GgmlType::Q8_0`]); its values come when
/// [`write()`] asks for them.
#[derive(Clone, Debug, PartialEq)]
pub struct GgufTensorSpec {
    /// Its name (`blk.0.attn_q.weight`).
    pub name: String,
    /// Its shape in PyTorch order.
    pub shape: Vec<usize>,
    /// F32, F16 or Q8_0 (whose rows, the shape's last dimension, are whole blocks of 32).
    pub ty: GgmlType,
}

/// A tensor to write with its values (row-major), for [`to_bytes`].
pub struct GgufTensorOut {
    /// Its name, shape and type.
    pub spec: GgufTensorSpec,
    /// Its values, row-major.
    pub values: Vec<f32>,
}

/// Writes a GGUF file (version 3, alignment 32) of `metadata` and `tensors` to `out`, asking
/// `values(i)` for the i-th tensor's values only when its turn comes (a model is written one
/// tensor at a time), as [`GgufFile`] reads it back. Refused: a type other than F32, F16 and
/// Q8_0, Q8_0 rows that are not whole blocks of 32, a repeated or empty name or key, values not
/// filling their shape, an array mixing element types, an F16 value beyond F16's range (it
/// would become infinite), and in Q8_0 a non-finite value or a block whose scale is beyond
/// F16's range. Returns the bytes written.
pub fn write(
    out: &mut dyn std::io::Write,
    metadata: &[(String, GgufValue)],
    tensors: &[GgufTensorSpec],
    values: &mut dyn FnMut(usize) -> Result<Vec<f32>, AdapterError>,
) -> Result<u64, AdapterError> {
    const ALIGN: usize = 32;
    let bad = |m: String| AdapterError::format(OUTPUT, m);
    let mut head = b"GGUF".to_vec();
    head.extend(3u32.to_le_bytes());
    head.extend((tensors.len() as u64).to_le_bytes());
    head.extend((metadata.len() as u64).to_le_bytes());
    let mut keys = std::collections::HashSet::new();
    for (key, value) in metadata {
        if key.is_empty() || !keys.insert(key.as_str()) || key == "general.alignment" {
            return Err(bad(format!(
                "metadata key {key:?} is empty, repeated or reserved"
            )));
        }
        put_str(&mut head, key);
        head.extend(value.type_id().to_le_bytes());
        value
            .write(&mut head)
            .map_err(|m| bad(format!("{key}: {m}")))?;
    }
    let mut names = std::collections::HashSet::new();
    let mut offset = 0usize;
    for t in tensors {
        let numel: usize = t.shape.iter().product();
        let id = match t.ty {
            GgmlType::F32 => 0u32,
            GgmlType::F16 => 1,
            GgmlType::Q8_0 => 8,
            other => return Err(bad(format!("`{}`: {other:?} is not written", t.name))),
        };
        let (block, block_bytes) = t.ty.block();
        if t.shape.last().is_none_or(|&row| row % block != 0) {
            return Err(bad(format!(
                "`{}`: rows of {:?} are not whole {:?} blocks of {block}",
                t.name,
                t.shape.last(),
                t.ty
            )));
        }
        if t.name.is_empty() || !names.insert(t.name.as_str()) {
            return Err(bad(format!(
                "tensor name {:?} is empty or repeated",
                t.name
            )));
        }
        if t.shape.is_empty() || t.shape.len() > 4 || numel == 0 {
            return Err(bad(format!("`{}`: shape {:?}", t.name, t.shape)));
        }
        put_str(&mut head, &t.name);
        head.extend((t.shape.len() as u32).to_le_bytes());
        for &d in t.shape.iter().rev() {
            head.extend((d as u64).to_le_bytes());
        }
        head.extend(id.to_le_bytes());
        head.extend((offset as u64).to_le_bytes());
        offset = (offset + numel / block * block_bytes).div_ceil(ALIGN) * ALIGN;
    }
    head.resize(head.len().div_ceil(ALIGN) * ALIGN, 0);
    let io = |e: std::io::Error| AdapterError::io(Path::new(OUTPUT), e);
    out.write_all(&head).map_err(io)?;
    let mut written = head.len() as u64;
    let mut buf = Vec::new();
    for (i, t) in tensors.iter().enumerate() {
        let v = values(i)?;
        let numel: usize = t.shape.iter().product();
        if v.len() != numel {
            return Err(bad(format!(
                "`{}`: shape {:?} for {} values",
                t.name,
                t.shape,
                v.len()
            )));
        }
        buf.clear();
        match t.ty {
            GgmlType::F16 => buf.extend(
                super::st::encode_f32(&v, ::safetensors::Dtype::F16)
                    .map_err(|m| bad(format!("`{}`: {m}", t.name)))?,
            ),
            GgmlType::Q8_0 => {
                if let Some(x) = v.iter().find(|x| !x.is_finite()) {
                    return Err(bad(format!("`{}`: {x} cannot be quantized", t.name)));
                }
                for b in v.chunks_exact(32) {
                    quantize_q8_0(b, &mut buf).map_err(|m| bad(format!("`{}`: {m}", t.name)))?;
                }
            }
            _ => buf.extend(v.iter().flat_map(|x| x.to_le_bytes())),
        }
        buf.resize(buf.len().div_ceil(ALIGN) * ALIGN, 0);
        out.write_all(&buf).map_err(io)?;
        written += buf.len() as u64;
    }
    Ok(written)
}

/// One Q8_0 block of 32 values, as ggml's reference quantizer (`quantize_row_q8_0_ref`) makes
/// it: the scale `d = max|x| / 127` (stored as f16), then each value times `1/d` rounded half
/// away from zero, as an int8.
/// A block whose scale is beyond F16's range (values past 127 × 65504) is refused.
fn quantize_q8_0(block: &[f32], out: &mut Vec<u8>) -> Result<(), String> {
    let amax = block.iter().fold(0f32, |m, x| m.max(x.abs()));
    let d = amax / 127.0;
    let id = if d == 0.0 { 0.0 } else { 1.0 / d };
    let scale = half::f16::from_f32(d);
    if scale.is_infinite() {
        return Err(format!(
            "{amax} is beyond Q8_0's range (its block scale is an f16)"
        ));
    }
    out.extend(scale.to_le_bytes());
    out.extend(block.iter().map(|x| (x * id).round() as i8 as u8));
    Ok(())
}

/// The bytes of a GGUF file of `metadata` and `tensors` ([`write()`] into memory).
pub fn to_bytes(
    metadata: &[(String, GgufValue)],
    tensors: &[GgufTensorOut],
) -> Result<Vec<u8>, AdapterError> {
    let specs: Vec<GgufTensorSpec> = tensors.iter().map(|t| t.spec.clone()).collect();
    let mut out = Vec::new();
    write(&mut out, metadata, &specs, &mut |i| {
        Ok(tensors[i].values.clone())
    })?;
    Ok(out)
}

impl GgufValue {
    /// Its type id in a file.
    fn type_id(&self) -> u32 {
        match self {
            GgufValue::U8(_) => 0,
            GgufValue::I8(_) => 1,
            GgufValue::U16(_) => 2,
            GgufValue::I16(_) => 3,
            GgufValue::U32(_) => 4,
            GgufValue::I32(_) => 5,
            GgufValue::F32(_) => 6,
            GgufValue::Bool(_) => 7,
            GgufValue::String(_) => 8,
            GgufValue::Array(_) => 9,
            GgufValue::U64(_) => 10,
            GgufValue::I64(_) => 11,
            GgufValue::F64(_) => 12,
        }
    }

    /// Its bytes in a file (after its type id).
    fn write(&self, out: &mut Vec<u8>) -> Result<(), String> {
        match self {
            GgufValue::U8(v) => out.push(*v),
            GgufValue::I8(v) => out.extend(v.to_le_bytes()),
            GgufValue::U16(v) => out.extend(v.to_le_bytes()),
            GgufValue::I16(v) => out.extend(v.to_le_bytes()),
            GgufValue::U32(v) => out.extend(v.to_le_bytes()),
            GgufValue::I32(v) => out.extend(v.to_le_bytes()),
            GgufValue::F32(v) => out.extend(v.to_le_bytes()),
            GgufValue::Bool(v) => out.push(u8::from(*v)),
            GgufValue::String(s) => put_str(out, s),
            GgufValue::Array(items) => {
                // An empty array is written as one of u32 (llama.cpp does the same for an
                // empty list).
                let ty = items.first().map_or(4, GgufValue::type_id);
                if items.iter().any(|v| v.type_id() != ty) {
                    return Err("an array mixes element types".into());
                }
                out.extend(ty.to_le_bytes());
                out.extend((items.len() as u64).to_le_bytes());
                for v in items {
                    v.write(out)?;
                }
            }
            GgufValue::U64(v) => out.extend(v.to_le_bytes()),
            GgufValue::I64(v) => out.extend(v.to_le_bytes()),
            GgufValue::F64(v) => out.extend(v.to_le_bytes()),
        }
        Ok(())
    }
}

fn f16(b: &[u8]) -> f32 {
    half::f16::from_le_bytes([b[0], b[1]]).to_f32()
}

/// Dequantizes `data` (whole blocks of type `t`) into `out` (`data`'s element count).
pub fn dequantize(t: GgmlType, data: &[u8], out: &mut [f32]) {
    let (block, bytes) = t.block();
    for (x, y) in data.chunks_exact(bytes).zip(out.chunks_exact_mut(block)) {
        match t {
            GgmlType::F32 => y[0] = f32::from_le_bytes([x[0], x[1], x[2], x[3]]),
            GgmlType::F16 => y[0] = f16(x),
            GgmlType::BF16 => {
                y[0] = f32::from_bits((u16::from_le_bytes([x[0], x[1]]) as u32) << 16)
            }
            GgmlType::Q4_0 => {
                let d = f16(x);
                for j in 0..16 {
                    y[j] = ((x[2 + j] & 0x0F) as i32 - 8) as f32 * d;
                    y[j + 16] = ((x[2 + j] >> 4) as i32 - 8) as f32 * d;
                }
            }
            GgmlType::Q4_1 => {
                let (d, m) = (f16(x), f16(&x[2..]));
                for j in 0..16 {
                    y[j] = (x[4 + j] & 0x0F) as f32 * d + m;
                    y[j + 16] = (x[4 + j] >> 4) as f32 * d + m;
                }
            }
            GgmlType::Q5_0 | GgmlType::Q5_1 => {
                let with_min = t == GgmlType::Q5_1;
                let d = f16(x);
                let (m, rest) = if with_min {
                    (f16(&x[2..]), &x[4..])
                } else {
                    (0.0, &x[2..])
                };
                let qh = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]);
                let qs = &rest[4..];
                for j in 0..16 {
                    let xh0 = ((qh >> j) << 4) & 0x10;
                    let xh1 = (qh >> (j + 12)) & 0x10;
                    let x0 = ((qs[j] as u32 & 0x0F) | xh0) as i32;
                    let x1 = ((qs[j] as u32 >> 4) | xh1) as i32;
                    if with_min {
                        y[j] = x0 as f32 * d + m;
                        y[j + 16] = x1 as f32 * d + m;
                    } else {
                        y[j] = (x0 - 16) as f32 * d;
                        y[j + 16] = (x1 - 16) as f32 * d;
                    }
                }
            }
            GgmlType::Q8_0 => {
                let d = f16(x);
                for j in 0..32 {
                    y[j] = (x[2 + j] as i8) as f32 * d;
                }
            }
            GgmlType::Q2K => dequantize_q2_k(x, y),
            GgmlType::Q3K => dequantize_q3_k(x, y),
            GgmlType::Q4K | GgmlType::Q5K => dequantize_q45_k(x, y, t == GgmlType::Q5K),
            GgmlType::Q6K => dequantize_q6_k(x, y),
        }
    }
}

/// Q2_K: `scales[16]`, `qs[64]`, `d`, `dmin`.
fn dequantize_q2_k(x: &[u8], y: &mut [f32]) {
    let (scales, qs) = (&x[0..16], &x[16..80]);
    let (d, min) = (f16(&x[80..]), f16(&x[82..]));
    let (mut is, mut k) = (0, 0);
    for half in 0..2 {
        let q = &qs[32 * half..];
        for shift in [0, 2, 4, 6] {
            for part in 0..2 {
                let sc = scales[is];
                is += 1;
                let (dl, ml) = (d * (sc & 0xF) as f32, min * (sc >> 4) as f32);
                for l in 0..16 {
                    y[k] = dl * ((q[l + 16 * part] >> shift) & 3) as f32 - ml;
                    k += 1;
                }
            }
        }
    }
}

/// Q3_K: `hmask[32]`, `qs[64]`, `scales[12]` (16 signed 6-bit scales), `d`.
fn dequantize_q3_k(x: &[u8], y: &mut [f32]) {
    let (hm, qs, raw) = (&x[0..32], &x[32..96], &x[96..108]);
    let d_all = f16(&x[108..]);
    let sc: Vec<f32> = (0..16)
        .map(|s| {
            let low = if s < 8 { raw[s] & 0xF } else { raw[s - 8] >> 4 };
            let high = (raw[8 + s % 4] >> (2 * (s / 4))) & 3;
            ((low | (high << 4)) as i8 - 32) as f32
        })
        .collect();
    let (mut m, mut is, mut k) = (1u8, 0, 0);
    for half in 0..2 {
        let q = &qs[32 * half..];
        for shift in [0, 2, 4, 6] {
            for part in 0..2 {
                let dl = d_all * sc[is];
                is += 1;
                for l in 0..16 {
                    let idx = l + 16 * part;
                    let hi = if hm[idx] & m != 0 { 0 } else { 4 };
                    y[k] = dl * (((q[idx] >> shift) & 3) as i32 - hi) as f32;
                    k += 1;
                }
            }
            m = m.wrapping_shl(1);
        }
    }
}

/// The 6-bit scale and min of sub-block `j` of a Q4_K/Q5_K block (ggml's `get_scale_min_k4`).
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Q4_K (`d`, `dmin`, `scales[12]`, `qs[128]`) and Q5_K (the same with `qh[32]` before `qs`).
fn dequantize_q45_k(x: &[u8], y: &mut [f32], five: bool) {
    let (d, min) = (f16(x), f16(&x[2..]));
    let scales = &x[4..16];
    let (qh, ql) = if five {
        (&x[16..48], &x[48..176])
    } else {
        (&x[0..0], &x[16..144])
    };
    let (mut is, mut k) = (0, 0);
    let (mut u1, mut u2) = (1u8, 2u8);
    for chunk in 0..4 {
        let q = &ql[32 * chunk..];
        let (sc1, m1) = scale_min_k4(is, scales);
        let (sc2, m2) = scale_min_k4(is + 1, scales);
        let (d1, m1) = (d * sc1 as f32, min * m1 as f32);
        let (d2, m2) = (d * sc2 as f32, min * m2 as f32);
        for l in 0..32 {
            let h = if five && qh[l] & u1 != 0 { 16 } else { 0 };
            y[k] = d1 * ((q[l] & 0xF) + h) as f32 - m1;
            k += 1;
        }
        for l in 0..32 {
            let h = if five && qh[l] & u2 != 0 { 16 } else { 0 };
            y[k] = d2 * ((q[l] >> 4) + h) as f32 - m2;
            k += 1;
        }
        is += 2;
        u1 = u1.wrapping_shl(2);
        u2 = u2.wrapping_shl(2);
    }
}

/// Q6_K: `ql[128]`, `qh[64]`, `scales[16]` (i8), `d`.
fn dequantize_q6_k(x: &[u8], y: &mut [f32]) {
    let d = f16(&x[208..]);
    for half in 0..2 {
        let ql = &x[64 * half..];
        let qh = &x[128 + 32 * half..];
        let sc = &x[192 + 8 * half..];
        let y = &mut y[128 * half..];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            let s = |i: usize| d * (sc[is + i] as i8) as f32;
            y[l] = s(0) * q1 as f32;
            y[l + 32] = s(2) * q2 as f32;
            y[l + 64] = s(4) * q3 as f32;
            y[l + 96] = s(6) * q4 as f32;
        }
    }
}
