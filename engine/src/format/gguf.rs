//! GGUF files: a validating reader and a writer.
//!
//! Layout (little-endian, versions 2 and 3; version 1 used 32-bit counts and is not supported):
//!
//! ```text
//! magic "GGUF" | version u32 | tensor count u64 | metadata count u64
//! metadata: key (string), value type u32, value                    × metadata count
//! tensor info: name (string), n_dims u32, dims u64 × n_dims,
//!              ggml type u32, offset u64                           × tensor count
//! zero padding up to a multiple of the alignment (from the start of the file)
//! tensor data: each tensor at `data start + its offset`, offsets multiples of the alignment
//! ```
//!
//! A string is a u64 byte length then UTF-8 bytes (no terminator). An array value is an element type
//! u32, a u64 length, then the elements without type tags (arrays may nest). The alignment is the
//! `general.alignment` key, 32 when absent. Dims are in ggml order: `dims[0]` is the row length.
//!
//! [`GgufFile::parse`] checks every count, length, offset and size against the bytes that are
//! actually there before using or allocating for it, so a hostile file yields a [`GgufError`] and
//! never a panic, a hang or a huge allocation: the metadata may take at most [`METADATA_MEMORY_FACTOR`] times
//! the file's size in memory (plus a small floor), counted before each allocation, because a value can be
//! much larger in memory than on disk (a one-byte array element becomes a 32-byte [`Value`]). Only metadata is copied: tensor data stays in the
//! caller's buffer (typically a memory map) and is borrowed through [`GgufFile::tensor_data`].

use std::collections::HashSet;
use std::io::{self, Write};

use crate::format::quant::GgmlType;

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
const ALIGNMENT_KEY: &str = "general.alignment";
const MAX_DIMS: u32 = 4;
/// Arrays of arrays deeper than this are rejected, so hostile nesting cannot exhaust the stack.
const MAX_ARRAY_DEPTH: usize = 8;
/// Smallest encodings, used to reject counts that cannot fit in the bytes left before allocating:
/// a key-value pair is an empty key (8) + type (4) + a one-byte value; a tensor info is an empty
/// name (8) + n_dims (4) + one dim (8) + type (4) + offset (8).
const MIN_KV_BYTES: u64 = 13;
const MIN_TENSOR_INFO_BYTES: u64 = 32;
/// The parsed metadata and tensor infos may take this many times the file's size in memory (real files
/// need under 3: their arrays are mostly strings and 4-byte integers)...
pub const METADATA_MEMORY_FACTOR: u64 = 8;
/// ...or this much, for tiny files.
pub const METADATA_MEMORY_FLOOR: u64 = 1 << 20;

/// A metadata value. The variants are in GGUF value type id order (0..=12).
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    /// All elements have the same type (nested arrays may differ in their own element types).
    Array(Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    /// Any integer value that is not negative (bools and floats are not integers).
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// Any number, integer or float (not bools).
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::I8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::I16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::I32(v) => Some(v.into()),
            Value::F32(v) => Some(v.into()),
            Value::U64(v) => Some(v as f64),
            Value::I64(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    fn value_type(&self) -> ValueType {
        match self {
            Value::U8(_) => ValueType::U8,
            Value::I8(_) => ValueType::I8,
            Value::U16(_) => ValueType::U16,
            Value::I16(_) => ValueType::I16,
            Value::U32(_) => ValueType::U32,
            Value::I32(_) => ValueType::I32,
            Value::F32(_) => ValueType::F32,
            Value::Bool(_) => ValueType::Bool,
            Value::Str(_) => ValueType::Str,
            Value::Array(_) => ValueType::Array,
            Value::U64(_) => ValueType::U64,
            Value::I64(_) => ValueType::I64,
            Value::F64(_) => ValueType::F64,
        }
    }

    /// A short description for error messages (never the contents of a long string or array).
    fn describe(&self) -> String {
        match self {
            Value::Str(_) => "a string".into(),
            Value::Array(_) => "an array".into(),
            v => format!("{v:?}"),
        }
    }

    /// Every array, at every nesting level, holds elements of a single type.
    fn is_homogeneous(&self) -> bool {
        match self {
            Value::Array(items) => {
                let first = items.first().map(Value::value_type);
                items.iter().all(|v| Some(v.value_type()) == first && v.is_homogeneous())
            }
            _ => true,
        }
    }
}

/// GGUF value type ids, in id order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ValueType {
    U8,
    I8,
    U16,
    I16,
    U32,
    I32,
    F32,
    Bool,
    Str,
    Array,
    U64,
    I64,
    F64,
}

impl ValueType {
    fn from_id(id: u32) -> Option<Self> {
        use ValueType::*;
        const ALL: [ValueType; 13] = [U8, I8, U16, I16, U32, I32, F32, Bool, Str, Array, U64, I64, F64];
        ALL.get(usize::try_from(id).ok()?).copied()
    }

    fn id(self) -> u32 {
        self as u32
    }

    /// Bytes taken by the smallest value of this type (an empty string, an empty array).
    fn min_bytes(self) -> u64 {
        match self {
            ValueType::U8 | ValueType::I8 | ValueType::Bool => 1,
            ValueType::U16 | ValueType::I16 => 2,
            ValueType::U32 | ValueType::I32 | ValueType::F32 => 4,
            ValueType::U64 | ValueType::I64 | ValueType::F64 | ValueType::Str => 8,
            ValueType::Array => 12,
        }
    }
}

/// One tensor's description; its bytes are `file[offset..offset + size]`.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: `dims[0]` is the row length (ne0).
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Absolute byte offset in the file.
    pub offset: u64,
    /// Size in bytes.
    pub size: u64,
}

impl TensorInfo {
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }

    // parse() checked that the element count fits in usize, so neither of these can overflow it.

    /// Number of rows: the product of `dims[1..]`.
    pub fn rows(&self) -> usize {
        self.dims.iter().skip(1).product::<u64>() as usize
    }

    /// Row length: `dims[0]`.
    pub fn cols(&self) -> usize {
        self.dims.first().map_or(1, |&d| d as usize)
    }
}

/// The parsed header of a GGUF file: metadata and tensor descriptions (no tensor data).
#[derive(Clone, Debug, PartialEq)]
pub struct GgufFile {
    pub version: u32,
    /// In file order.
    pub metadata: Vec<(String, Value)>,
    /// In file order.
    pub tensors: Vec<TensorInfo>,
    pub alignment: u64,
    /// Absolute offset of the tensor data section.
    pub data_offset: u64,
}

/// Why a GGUF file was rejected. Offsets are absolute byte offsets in the file.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum GgufError {
    #[error("bad magic {0:02x?} at byte 0, expected \"GGUF\"")]
    BadMagic([u8; 4]),
    #[error("big-endian GGUF (version {0} byte-swapped) is not supported")]
    BigEndian(u32),
    #[error("unsupported GGUF version {0} at byte 4 (supported: 2 and 3)")]
    UnsupportedVersion(u32),
    #[error("truncated: {what} at byte {offset} needs {needed} bytes, only {available} left")]
    Truncated { what: String, offset: u64, needed: u64, available: u64 },
    #[error("{what}: {count} items at byte {offset} cannot fit in the {available} bytes left")]
    CountTooLarge { what: String, count: u64, offset: u64, available: u64 },
    #[error("invalid UTF-8 in {what} at byte {offset}")]
    InvalidUtf8 { what: String, offset: u64 },
    #[error("duplicate metadata key '{key}' at byte {offset}")]
    DuplicateKey { key: String, offset: u64 },
    #[error("key '{key}': unknown value type {type_id} at byte {offset}")]
    UnknownValueType { key: String, type_id: u32, offset: u64 },
    #[error("key '{key}': bool byte {byte} at byte {offset} is neither 0 nor 1")]
    BadBool { key: String, byte: u8, offset: u64 },
    #[error("key '{key}': arrays nested more than {MAX_ARRAY_DEPTH} deep at byte {offset}")]
    NestingTooDeep { key: String, offset: u64 },
    #[error(
        "the metadata needs more than {limit} bytes of memory ({METADATA_MEMORY_FACTOR} times the \
         {file_len}-byte file) at byte {offset}"
    )]
    MetadataTooLarge { limit: u64, file_len: u64, offset: u64 },
    #[error("general.alignment must be a non-zero power-of-two integer, found {0}")]
    BadAlignment(String),
    #[error("duplicate tensor name '{tensor}' at byte {offset}")]
    DuplicateTensor { tensor: String, offset: u64 },
    #[error("tensor '{tensor}': {n_dims} dimensions at byte {offset}, expected 1 to {MAX_DIMS}")]
    BadDimCount { tensor: String, n_dims: u32, offset: u64 },
    #[error("tensor '{tensor}': dimension {index} is zero")]
    ZeroDim { tensor: String, index: usize },
    #[error("tensor '{tensor}': element count of dims {dims:?} overflows")]
    ElementCountOverflow { tensor: String, dims: Vec<u64> },
    #[error("tensor '{tensor}': unknown ggml type id {type_id}")]
    UnknownTensorType { tensor: String, type_id: u32 },
    #[error("tensor '{tensor}': {n_elements} elements of type {}: {reason}", .ty.name())]
    BadTensorSize { tensor: String, ty: GgmlType, n_elements: u64, reason: String },
    #[error("tensor '{tensor}': offset {offset} is not a multiple of the alignment {alignment}")]
    MisalignedOffset { tensor: String, offset: u64, alignment: u64 },
    #[error(
        "tensor '{tensor}': {size} bytes at data offset {offset} (data starts at byte {data_offset}) \
         run past the end of the {file_len}-byte file"
    )]
    TensorOutOfBounds { tensor: String, offset: u64, size: u64, data_offset: u64, file_len: u64 },
}

type Result<T, E = GgufError> = std::result::Result<T, E>;

impl GgufFile {
    /// Parses and validates the header of a whole GGUF file held in memory (or memory-mapped).
    pub fn parse(bytes: &[u8]) -> Result<GgufFile> {
        let file_len = bytes.len() as u64;
        let memory_limit = file_len.saturating_mul(METADATA_MEMORY_FACTOR).max(METADATA_MEMORY_FLOOR);
        let mut r = Reader { bytes, pos: 0, memory_left: memory_limit, memory_limit };

        let magic: [u8; 4] = r.array("magic")?;
        if &magic != MAGIC {
            return Err(GgufError::BadMagic(magic));
        }
        let version = u32::from_le_bytes(r.array("version")?);
        match version {
            2 | 3 => {}
            v if matches!(v.swap_bytes(), 2 | 3) => return Err(GgufError::BigEndian(v.swap_bytes())),
            v => return Err(GgufError::UnsupportedVersion(v)),
        }
        let n_tensors = r.count("tensor count", MIN_TENSOR_INFO_BYTES)?;
        let n_kv = r.count("metadata count", MIN_KV_BYTES)?;

        let metadata = read_metadata(&mut r, n_kv)?;
        let alignment = match metadata.iter().find(|(k, _)| k == ALIGNMENT_KEY) {
            None => DEFAULT_ALIGNMENT,
            Some((_, v)) => match v.as_u64() {
                Some(a) if a.is_power_of_two() => a,
                _ => return Err(GgufError::BadAlignment(v.describe())),
            },
        };
        let mut tensors = read_tensor_infos(&mut r, n_tensors, alignment)?;

        // Cannot overflow: the offset is below 2^63 (a slice length) and the alignment a power of two <= 2^63.
        let data_offset = r.offset().next_multiple_of(alignment);
        for t in &mut tensors {
            let start = data_offset.checked_add(t.offset);
            match start.and_then(|s| s.checked_add(t.size)) {
                Some(end) if end <= file_len => t.offset += data_offset,
                _ => {
                    return Err(GgufError::TensorOutOfBounds {
                        tensor: t.name.clone(),
                        offset: t.offset,
                        size: t.size,
                        data_offset,
                        file_len,
                    })
                }
            }
        }
        Ok(GgufFile { version, metadata, tensors, alignment, data_offset })
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The bytes of tensor `t` within `bytes`, the buffer this file was parsed from.
    ///
    /// # Panics
    /// If `bytes` is shorter than the buffer given to [`GgufFile::parse`] (parse checked the bounds).
    pub fn tensor_data<'a>(&self, bytes: &'a [u8], t: &TensorInfo) -> &'a [u8] {
        &bytes[t.offset as usize..(t.offset + t.size) as usize]
    }
}

fn read_metadata(r: &mut Reader<'_>, n_kv: u64) -> Result<Vec<(String, Value)>> {
    r.charge::<(String, Value)>(n_kv)?;
    let mut metadata = Vec::with_capacity(n_kv as usize);
    let mut seen = HashSet::new();
    for i in 0..n_kv {
        let key_offset = r.offset();
        let key = r.string(&format!("key #{i}"))?;
        if !seen.insert(key) {
            return Err(GgufError::DuplicateKey { key: key.into(), offset: key_offset });
        }
        let what = format!("value of key '{key}'");
        let ty = r.value_type(key, &what)?;
        let value = r.value(ty, key, &what, 0)?;
        r.charge::<u8>(key.len() as u64)?;
        metadata.push((key.to_owned(), value));
    }
    Ok(metadata)
}

fn read_tensor_infos(r: &mut Reader<'_>, n_tensors: u64, alignment: u64) -> Result<Vec<TensorInfo>> {
    r.charge::<TensorInfo>(n_tensors)?;
    let mut tensors = Vec::with_capacity(n_tensors as usize);
    let mut seen = HashSet::new();
    for i in 0..n_tensors {
        let name_offset = r.offset();
        let name = r.string(&format!("name of tensor #{i}"))?;
        if !seen.insert(name) {
            return Err(GgufError::DuplicateTensor { tensor: name.into(), offset: name_offset });
        }
        let what = format!("info of tensor '{name}'");

        let dims_offset = r.offset();
        let n_dims = r.u32(&what)?;
        if !(1..=MAX_DIMS).contains(&n_dims) {
            return Err(GgufError::BadDimCount { tensor: name.into(), n_dims, offset: dims_offset });
        }
        let dims = (0..n_dims).map(|_| r.u64(&what)).collect::<Result<Vec<u64>>>()?;
        if let Some(index) = dims.iter().position(|&d| d == 0) {
            return Err(GgufError::ZeroDim { tensor: name.into(), index });
        }
        // The element count must also fit in usize: the engine indexes rows and columns with it.
        let n_elements = dims
            .iter()
            .try_fold(1u64, |n, &d| n.checked_mul(d))
            .filter(|&n| usize::try_from(n).is_ok())
            .ok_or_else(|| GgufError::ElementCountOverflow { tensor: name.into(), dims: dims.clone() })?;

        let type_id = r.u32(&what)?;
        let ty =
            GgmlType::from_id(type_id).ok_or_else(|| GgufError::UnknownTensorType { tensor: name.into(), type_id })?;
        let size = ty.tensor_bytes(n_elements).ok_or_else(|| GgufError::BadTensorSize {
            tensor: name.into(),
            ty,
            n_elements,
            reason: size_error_reason(ty, n_elements),
        })?;

        let offset = r.u64(&what)?;
        if !offset.is_multiple_of(alignment) {
            return Err(GgufError::MisalignedOffset { tensor: name.into(), offset, alignment });
        }
        r.charge::<u8>(name.len() as u64)?;
        // Relative to the data section until parse() knows where that starts.
        tensors.push(TensorInfo { name: name.to_owned(), dims, ty, offset, size });
    }
    Ok(tensors)
}

fn size_error_reason(ty: GgmlType, n_elements: u64) -> String {
    let block = ty.block_size() as u64;
    if !n_elements.is_multiple_of(block) {
        format!("not a multiple of the {block}-element block")
    } else {
        "the byte size overflows".into()
    }
}

/// A cursor over the file; every read checks the bytes left first.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
    /// Bytes of memory the parsed metadata may still take (see `charge`).
    memory_left: u64,
    memory_limit: u64,
}

impl<'a> Reader<'a> {
    fn offset(&self) -> u64 {
        self.pos as u64
    }

    fn remaining(&self) -> u64 {
        (self.bytes.len() - self.pos) as u64
    }

    fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(GgufError::Truncated {
                what: what.into(),
                offset: self.offset(),
                needed: n,
                available: self.remaining(),
            });
        }
        let start = self.pos;
        self.pos += n as usize;
        Ok(&self.bytes[start..self.pos])
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N as u64, what)?);
        Ok(out)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// Accounts for `n` items of `T` about to be allocated; an error once the metadata would take
    /// more memory than the file size allows.
    fn charge<T>(&mut self, n: u64) -> Result<()> {
        match n.checked_mul(std::mem::size_of::<T>() as u64) {
            Some(bytes) if bytes <= self.memory_left => {
                self.memory_left -= bytes;
                Ok(())
            }
            _ => Err(GgufError::MetadataTooLarge {
                limit: self.memory_limit,
                file_len: self.bytes.len() as u64,
                offset: self.offset(),
            }),
        }
    }

    /// A u64 count of items that each take at least `min_item_bytes`; rejected if they cannot fit
    /// in the bytes left, which bounds any allocation sized by it.
    fn count(&mut self, what: &str, min_item_bytes: u64) -> Result<u64> {
        let offset = self.offset();
        let count = self.u64(what)?;
        match count.checked_mul(min_item_bytes) {
            Some(n) if n <= self.remaining() => Ok(count),
            _ => Err(GgufError::CountTooLarge { what: what.into(), count, offset, available: self.remaining() }),
        }
    }

    fn string(&mut self, what: &str) -> Result<&'a str> {
        let len = self.u64(what)?;
        let offset = self.offset();
        std::str::from_utf8(self.take(len, what)?).map_err(|_| GgufError::InvalidUtf8 { what: what.into(), offset })
    }

    fn value_type(&mut self, key: &str, what: &str) -> Result<ValueType> {
        let offset = self.offset();
        let type_id = self.u32(what)?;
        ValueType::from_id(type_id).ok_or_else(|| GgufError::UnknownValueType { key: key.into(), type_id, offset })
    }

    /// A value of type `ty` of key `key`; `depth` is the number of enclosing arrays.
    fn value(&mut self, ty: ValueType, key: &str, what: &str, depth: usize) -> Result<Value> {
        Ok(match ty {
            ValueType::U8 => Value::U8(u8::from_le_bytes(self.array(what)?)),
            ValueType::I8 => Value::I8(i8::from_le_bytes(self.array(what)?)),
            ValueType::U16 => Value::U16(u16::from_le_bytes(self.array(what)?)),
            ValueType::I16 => Value::I16(i16::from_le_bytes(self.array(what)?)),
            ValueType::U32 => Value::U32(u32::from_le_bytes(self.array(what)?)),
            ValueType::I32 => Value::I32(i32::from_le_bytes(self.array(what)?)),
            ValueType::F32 => Value::F32(f32::from_le_bytes(self.array(what)?)),
            ValueType::U64 => Value::U64(u64::from_le_bytes(self.array(what)?)),
            ValueType::I64 => Value::I64(i64::from_le_bytes(self.array(what)?)),
            ValueType::F64 => Value::F64(f64::from_le_bytes(self.array(what)?)),
            ValueType::Bool => {
                let offset = self.offset();
                match self.array::<1>(what)? {
                    [0] => Value::Bool(false),
                    [1] => Value::Bool(true),
                    [byte] => return Err(GgufError::BadBool { key: key.into(), byte, offset }),
                }
            }
            ValueType::Str => {
                let s = self.string(what)?;
                self.charge::<u8>(s.len() as u64)?;
                Value::Str(s.to_owned())
            }
            ValueType::Array => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(GgufError::NestingTooDeep { key: key.into(), offset: self.offset() });
                }
                let elem = self.value_type(key, what)?;
                let len = self.count(what, elem.min_bytes())?;
                self.charge::<Value>(len)?;
                let mut items = Vec::with_capacity(len as usize);
                for _ in 0..len {
                    items.push(self.value(elem, key, what, depth + 1)?);
                }
                Value::Array(items)
            }
        })
    }
}

/// Builds a GGUF version 3 file: metadata and tensors in insertion order, each tensor's data padded
/// to the alignment (32, or `general.alignment` when added as a valid [`Value::U32`]).
#[derive(Default)]
pub struct GgufWriter {
    metadata: Vec<(String, Value)>,
    tensors: Vec<PendingTensor>,
}

struct PendingTensor {
    name: String,
    dims: Vec<u64>,
    ty: GgmlType,
    data: Vec<u8>,
}

impl GgufWriter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets metadata `key` (replacing an earlier value of the same key in place).
    ///
    /// # Panics
    /// If an array in `v` mixes element types, which GGUF cannot encode.
    pub fn add(&mut self, key: &str, v: Value) {
        assert!(v.is_homogeneous(), "GGUF key '{key}': array elements must all have one type");
        match self.metadata.iter_mut().find(|(k, _)| k == key) {
            Some((_, old)) => *old = v,
            None => self.metadata.push((key.to_owned(), v)),
        }
    }

    /// Appends a tensor; `data` is its encoding as `ty` (dims in ggml order, `dims[0]` = row length).
    ///
    /// # Panics
    /// If the name is already used or `data` is not exactly the size of `dims` elements of `ty`.
    pub fn add_tensor(&mut self, name: &str, dims: &[u64], ty: GgmlType, data: Vec<u8>) {
        assert!(self.tensors.iter().all(|t| t.name != name), "duplicate GGUF tensor '{name}'");
        let expected = dims.iter().try_fold(1u64, |n, &d| n.checked_mul(d)).and_then(|n| ty.tensor_bytes(n));
        assert_eq!(expected, Some(data.len() as u64), "GGUF tensor '{name}': data size does not match dims {dims:?}");
        self.tensors.push(PendingTensor { name: name.to_owned(), dims: dims.to_vec(), ty, data });
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.write_to(&mut out).expect("writing to a Vec cannot fail");
        out
    }

    pub fn write_to(&self, w: &mut impl Write) -> io::Result<()> {
        // An invalid alignment value is still written (tests build bad files this way), but the
        // layout then uses the default.
        let alignment = match self.metadata.iter().find(|(k, _)| k == ALIGNMENT_KEY) {
            Some((_, Value::U32(a))) if a.is_power_of_two() => u64::from(*a),
            _ => DEFAULT_ALIGNMENT,
        };

        let mut header = Vec::new();
        header.extend_from_slice(MAGIC);
        header.extend_from_slice(&3u32.to_le_bytes());
        header.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        header.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (key, value) in &self.metadata {
            put_str(&mut header, key);
            header.extend_from_slice(&value.value_type().id().to_le_bytes());
            put_value(&mut header, value);
        }
        let mut offset = 0u64;
        for t in &self.tensors {
            put_str(&mut header, &t.name);
            header.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                header.extend_from_slice(&d.to_le_bytes());
            }
            header.extend_from_slice(&t.ty.id().to_le_bytes());
            header.extend_from_slice(&offset.to_le_bytes());
            offset += (t.data.len() as u64).next_multiple_of(alignment);
        }
        header.resize((header.len() as u64).next_multiple_of(alignment) as usize, 0);
        w.write_all(&header)?;

        let zeros = vec![0u8; alignment as usize];
        for t in &self.tensors {
            w.write_all(&t.data)?;
            let padding = (t.data.len() as u64).next_multiple_of(alignment) - t.data.len() as u64;
            w.write_all(&zeros[..padding as usize])?;
        }
        Ok(())
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I8(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => out.push(u8::from(*x)),
        Value::Str(s) => put_str(out, s),
        Value::Array(items) => {
            // An empty array's element type is not recoverable; u8 is as good as any.
            let elem = items.first().map_or(ValueType::U8, Value::value_type);
            out.extend_from_slice(&elem.id().to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for item in items {
                put_value(out, item);
            }
        }
        Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
    }
}
