//! GGUF v3, ggml's single-file model format (the one llama.cpp loads): a writer, and a small
//! reader that the tests use to round-trip files.
//!
//! Layout (ggml `docs/gguf.md`), all integers little-endian:
//! - header: magic `GGUF`, version (u32, 3), tensor count (u64), metadata KV count (u64);
//! - metadata KVs: key (string), value type (u32), value; a string is a u64 byte length and
//!   UTF-8 bytes; an array is an element type (u32), a count (u64) and the elements;
//! - tensor infos: name, n_dims (u32), dims (u64 each), ggml type (u32), data offset (u64,
//!   relative to the data section, a multiple of the alignment);
//! - padding to the alignment (`general.alignment`, default 32), then the tensor data, each
//!   tensor padded to the alignment.
//!
//! Dims are listed innermost first: ne\[0\] is the row length, torch's last dim. A torch
//! (out, in) weight is written with dims \[in, out\].

use std::io::Write;
use std::path::Path;

pub const MAGIC: [u8; 4] = *b"GGUF";
pub const VERSION: u32 = 3;
pub const DEFAULT_ALIGNMENT: u64 = 32;
pub const ALIGNMENT_KEY: &str = "general.alignment";
/// Values per Q8_0 block; a block is an f16 scale and 32 i8 values (34 bytes).
pub const QK8_0: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    // The io error is part of the message and not a `source`: a `{:#}` chain would print it twice.
    #[error("{path}: {err}")]
    Io { path: String, err: std::io::Error },
    #[error("not a GGUF file (magic {0:?})")]
    BadMagic([u8; 4]),
    #[error("GGUF version {0} is not supported (2 and 3 are)")]
    Version(u32),
    #[error("file truncated: {needed} bytes needed at offset {offset}")]
    Truncated { offset: usize, needed: usize },
    #[error("unknown metadata value type {0}")]
    ValueType(u32),
    #[error("ggml tensor type {0} is not supported (F32, F16, BF16 and Q8_0 are)")]
    TensorType(u32),
    #[error("the string at offset {0} is not UTF-8")]
    Utf8(usize),
    #[error("an array of {expected:?} holds a {found:?}")]
    MixedArray { expected: ValueType, found: ValueType },
    #[error("duplicate metadata key `{0}`")]
    DuplicateKey(String),
    #[error("duplicate tensor `{0}`")]
    DuplicateTensor(String),
    #[error("{ALIGNMENT_KEY} = {0}: it must be a u32, a non-zero multiple of 8")]
    Alignment(String),
    #[error("tensor `{name}`: {reason}")]
    Tensor { name: String, reason: String },
}

pub type Result<T> = std::result::Result<T, GgufError>;

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> GgufError + '_ {
    move |err| GgufError::Io { path: path.display().to_string(), err }
}

fn tensor_err(name: &str, reason: impl Into<String>) -> GgufError {
    GgufError::Tensor { name: name.to_string(), reason: reason.into() }
}

/// The type tag of a metadata value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueType {
    U8 = 0,
    I8 = 1,
    U16 = 2,
    I16 = 3,
    U32 = 4,
    I32 = 5,
    F32 = 6,
    Bool = 7,
    String = 8,
    Array = 9,
    U64 = 10,
    I64 = 11,
    F64 = 12,
}

impl ValueType {
    fn from_u32(t: u32) -> Result<Self> {
        use ValueType::*;
        Ok(match t {
            0 => U8,
            1 => I8,
            2 => U16,
            3 => I16,
            4 => U32,
            5 => I32,
            6 => F32,
            7 => Bool,
            8 => String,
            9 => Array,
            10 => U64,
            11 => I64,
            12 => F64,
            _ => return Err(GgufError::ValueType(t)),
        })
    }
}

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Array),
    U64(u64),
    I64(i64),
    F64(f64),
}

/// An array value: its element type is explicit so that an empty array still has one
/// (llama.cpp checks that `tokenizer.ggml.merges` is an array of strings even when empty).
#[derive(Debug, Clone, PartialEq)]
pub struct Array {
    elem: ValueType,
    items: Vec<Value>,
}

impl Array {
    /// Fails if an item is not of type `elem`.
    pub fn new(elem: ValueType, items: Vec<Value>) -> Result<Self> {
        if let Some(bad) = items.iter().find(|v| v.ty() != elem) {
            return Err(GgufError::MixedArray { expected: elem, found: bad.ty() });
        }
        Ok(Self { elem, items })
    }

    pub fn elem_type(&self) -> ValueType {
        self.elem
    }

    pub fn items(&self) -> &[Value] {
        &self.items
    }
}

impl Value {
    pub fn ty(&self) -> ValueType {
        match self {
            Value::U8(_) => ValueType::U8,
            Value::I8(_) => ValueType::I8,
            Value::U16(_) => ValueType::U16,
            Value::I16(_) => ValueType::I16,
            Value::U32(_) => ValueType::U32,
            Value::I32(_) => ValueType::I32,
            Value::F32(_) => ValueType::F32,
            Value::Bool(_) => ValueType::Bool,
            Value::String(_) => ValueType::String,
            Value::Array(_) => ValueType::Array,
            Value::U64(_) => ValueType::U64,
            Value::I64(_) => ValueType::I64,
            Value::F64(_) => ValueType::F64,
        }
    }

    pub fn string(s: impl Into<String>) -> Self {
        Value::String(s.into())
    }

    pub fn strings<S: Into<String>>(items: impl IntoIterator<Item = S>) -> Self {
        Value::Array(Array {
            elem: ValueType::String,
            items: items.into_iter().map(|s| Value::String(s.into())).collect(),
        })
    }

    pub fn i32s(items: impl IntoIterator<Item = i32>) -> Self {
        Value::Array(Array { elem: ValueType::I32, items: items.into_iter().map(Value::I32).collect() })
    }

    pub fn u32s(items: impl IntoIterator<Item = u32>) -> Self {
        Value::Array(Array { elem: ValueType::U32, items: items.into_iter().map(Value::U32).collect() })
    }

    pub fn f32s(items: impl IntoIterator<Item = f32>) -> Self {
        Value::Array(Array { elem: ValueType::F32, items: items.into_iter().map(Value::F32).collect() })
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&Array> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }

    /// Any integer value that fits a u64.
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

    /// Any float value, as f64.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    fn write(&self, out: &mut Vec<u8>) {
        match self {
            Value::U8(v) => out.push(*v),
            Value::I8(v) => out.extend_from_slice(&v.to_le_bytes()),
            Value::U16(v) => out.extend_from_slice(&v.to_le_bytes()),
            Value::I16(v) => out.extend_from_slice(&v.to_le_bytes()),
            Value::U32(v) => out.extend_from_slice(&v.to_le_bytes()),
            Value::I32(v) => out.extend_from_slice(&v.to_le_bytes()),
            Value::F32(v) => out.extend_from_slice(&v.to_le_bytes()),
            Value::Bool(v) => out.push(u8::from(*v)),
            Value::String(s) => write_str(out, s),
            Value::Array(a) => {
                out.extend_from_slice(&(a.elem as u32).to_le_bytes());
                out.extend_from_slice(&(a.items.len() as u64).to_le_bytes());
                for item in &a.items {
                    item.write(out);
                }
            }
            Value::U64(v) => out.extend_from_slice(&v.to_le_bytes()),
            Value::I64(v) => out.extend_from_slice(&v.to_le_bytes()),
            Value::F64(v) => out.extend_from_slice(&v.to_le_bytes()),
        }
    }
}

fn write_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// The ggml tensor types this module writes and reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorType {
    F32 = 0,
    F16 = 1,
    Q8_0 = 8,
    BF16 = 30,
}

impl TensorType {
    fn from_u32(t: u32) -> Result<Self> {
        match t {
            0 => Ok(TensorType::F32),
            1 => Ok(TensorType::F16),
            8 => Ok(TensorType::Q8_0),
            30 => Ok(TensorType::BF16),
            _ => Err(GgufError::TensorType(t)),
        }
    }

    /// (values per block, bytes per block).
    pub fn block(self) -> (usize, usize) {
        match self {
            TensorType::F32 => (1, 4),
            TensorType::F16 | TensorType::BF16 => (1, 2),
            TensorType::Q8_0 => (QK8_0, 2 + QK8_0),
        }
    }

    /// Bytes for `n` values; `n` must be a multiple of the block size.
    pub fn nbytes(self, n: usize) -> usize {
        let (per, bytes) = self.block();
        n / per * bytes
    }
}

/// Encodes row-major f32 `data` whose rows are `row_len` long.
pub fn encode(data: &[f32], row_len: usize, ty: TensorType) -> std::result::Result<Vec<u8>, String> {
    match ty {
        TensorType::F32 => Ok(data.iter().flat_map(|v| v.to_le_bytes()).collect()),
        TensorType::F16 => Ok(data.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect()),
        TensorType::BF16 => Ok(data.iter().flat_map(|v| half::bf16::from_f32(*v).to_le_bytes()).collect()),
        TensorType::Q8_0 => {
            if row_len == 0 || !row_len.is_multiple_of(QK8_0) {
                return Err(format!("Q8_0 needs a row length that is a multiple of {QK8_0}, found {row_len}"));
            }
            let mut out = Vec::with_capacity(data.len() / QK8_0 * (QK8_0 + 2));
            for block in data.chunks(QK8_0) {
                let (d, qs) = quantize_q8_0(block);
                out.extend_from_slice(&half::f16::from_f32(d).to_le_bytes());
                out.extend(qs.iter().map(|&q| q as u8));
            }
            Ok(out)
        }
    }
}

/// One Q8_0 block: the scale d = max|x| / 127 and round(x / d), halves away from zero
/// (ggml's reference `quantize_row_q8_0`). The scale is returned before its f16 rounding.
pub fn quantize_q8_0(block: &[f32]) -> (f32, [i8; QK8_0]) {
    let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d == 0.0 { 0.0 } else { 1.0 / d };
    let mut qs = [0i8; QK8_0];
    for (q, &x) in qs.iter_mut().zip(block) {
        *q = (x * id).round() as i8;
    }
    (d, qs)
}

/// Decodes `n` values of type `ty` from `bytes`.
pub fn decode(bytes: &[u8], ty: TensorType) -> Vec<f32> {
    match ty {
        TensorType::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        TensorType::F16 => bytes.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        TensorType::BF16 => bytes.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        TensorType::Q8_0 => bytes
            .chunks_exact(QK8_0 + 2)
            .flat_map(|b| {
                let d = half::f16::from_le_bytes([b[0], b[1]]).to_f32();
                b[2..].iter().map(move |&q| q as i8 as f32 * d)
            })
            .collect(),
    }
}

struct PendingTensor {
    name: String,
    /// ggml order: innermost first.
    dims: Vec<u64>,
    ty: TensorType,
    data: Vec<u8>,
}

/// Collects metadata and tensors, then writes a GGUF v3 file.
#[derive(Default)]
pub struct GgufWriter {
    kvs: Vec<(String, Value)>,
    tensors: Vec<PendingTensor>,
}

impl GgufWriter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a metadata KV; keys are unique. `general.alignment` must be a u32 multiple of 8.
    pub fn add_kv(&mut self, key: impl Into<String>, value: Value) -> Result<()> {
        let key = key.into();
        if self.kvs.iter().any(|(k, _)| *k == key) {
            return Err(GgufError::DuplicateKey(key));
        }
        if key == ALIGNMENT_KEY {
            alignment_of(&value)?;
        }
        self.kvs.push((key, value));
        Ok(())
    }

    pub fn kvs(&self) -> &[(String, Value)] {
        &self.kvs
    }

    /// Adds a tensor of torch shape `shape` (outermost first) from row-major f32 `data`,
    /// encoded as `ty`.
    pub fn add_tensor(&mut self, name: impl Into<String>, shape: &[usize], ty: TensorType, data: &[f32]) -> Result<()> {
        let name = name.into();
        if self.tensors.iter().any(|t| t.name == name) {
            return Err(GgufError::DuplicateTensor(name));
        }
        if shape.is_empty() || shape.len() > 4 {
            return Err(tensor_err(&name, format!("{} dims: GGUF tensors have 1 to 4", shape.len())));
        }
        let n: usize = shape.iter().product();
        if n != data.len() {
            return Err(tensor_err(&name, format!("shape {shape:?} holds {n} values, data has {}", data.len())));
        }
        let row_len = shape[shape.len() - 1];
        let bytes = encode(data, row_len, ty).map_err(|r| tensor_err(&name, r))?;
        let dims = shape.iter().rev().map(|&d| d as u64).collect();
        self.tensors.push(PendingTensor { name, dims, ty, data: bytes });
        Ok(())
    }

    /// The alignment the file will use.
    pub fn alignment(&self) -> Result<u64> {
        match self.kvs.iter().find(|(k, _)| k == ALIGNMENT_KEY) {
            Some((_, v)) => alignment_of(v),
            None => Ok(DEFAULT_ALIGNMENT),
        }
    }

    /// Writes the whole file.
    pub fn write_to(&self, w: &mut impl Write) -> std::io::Result<()> {
        let align = self.alignment().map_err(std::io::Error::other)?;
        let mut head = Vec::new();
        head.extend_from_slice(&MAGIC);
        head.extend_from_slice(&VERSION.to_le_bytes());
        head.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        head.extend_from_slice(&(self.kvs.len() as u64).to_le_bytes());
        for (k, v) in &self.kvs {
            write_str(&mut head, k);
            head.extend_from_slice(&(v.ty() as u32).to_le_bytes());
            v.write(&mut head);
        }
        let mut offset = 0u64;
        for t in &self.tensors {
            write_str(&mut head, &t.name);
            head.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                head.extend_from_slice(&d.to_le_bytes());
            }
            head.extend_from_slice(&(t.ty as u32).to_le_bytes());
            head.extend_from_slice(&offset.to_le_bytes());
            offset = align_up(offset + t.data.len() as u64, align);
        }
        head.resize(align_up(head.len() as u64, align) as usize, 0);
        w.write_all(&head)?;
        let zeros = vec![0u8; align as usize];
        for t in &self.tensors {
            w.write_all(&t.data)?;
            let pad = align_up(t.data.len() as u64, align) - t.data.len() as u64;
            w.write_all(&zeros[..pad as usize])?;
        }
        w.flush()
    }

    /// Writes to `path` through a temporary file in the same directory, then renames it.
    pub fn write_file(&self, path: &Path) -> Result<()> {
        let tmp = path.with_extension(format!("gguf.tmp-{}", std::process::id()));
        let res = (|| {
            let f = std::fs::File::create(&tmp)?;
            let mut w = std::io::BufWriter::new(f);
            self.write_to(&mut w)?;
            w.into_inner().map_err(|e| e.into_error())?.sync_all()
        })();
        if let Err(e) = res {
            let _ = std::fs::remove_file(&tmp);
            return Err(io_err(path)(e));
        }
        std::fs::rename(&tmp, path).map_err(io_err(path))
    }
}

fn alignment_of(v: &Value) -> Result<u64> {
    match v {
        Value::U32(a) if *a > 0 && a.is_multiple_of(8) => Ok((*a).into()),
        other => Err(GgufError::Alignment(format!("{other:?}"))),
    }
}

fn align_up(n: u64, align: u64) -> u64 {
    n.div_ceil(align) * align
}

/// A tensor's entry in a file.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: innermost first.
    pub dims: Vec<u64>,
    pub ty: TensorType,
    /// From the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    /// torch order: outermost first.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }

    pub fn n_elems(&self) -> usize {
        self.dims.iter().product::<u64>() as usize
    }

    pub fn nbytes(&self) -> usize {
        self.ty.nbytes(self.n_elems())
    }
}

/// A parsed GGUF file, held in memory.
#[derive(Debug)]
pub struct GgufFile {
    pub version: u32,
    pub kvs: Vec<(String, Value)>,
    pub tensors: Vec<TensorInfo>,
    pub alignment: u64,
    /// Where the data section starts in the file.
    pub data_offset: usize,
    bytes: Vec<u8>,
}

struct Cursor<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.b.len().saturating_sub(self.pos) < n {
            return Err(GgufError::Truncated { offset: self.pos, needed: n });
        }
        let s = &self.b[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        Ok(self.take(N)?.try_into().expect("took N bytes"))
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// A length or count, checked against what is left so a corrupt file can't make us
    /// allocate wildly.
    fn count(&mut self, min_item: usize) -> Result<usize> {
        let at = self.pos;
        let n = self.u64()?;
        let left = (self.b.len() - self.pos) as u64;
        if n.saturating_mul(min_item as u64) > left {
            return Err(GgufError::Truncated { offset: at, needed: n.saturating_mul(min_item as u64) as usize });
        }
        Ok(n as usize)
    }

    fn string(&mut self) -> Result<String> {
        let n = self.count(1)?;
        let at = self.pos;
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| GgufError::Utf8(at))
    }

    fn value(&mut self, ty: ValueType) -> Result<Value> {
        Ok(match ty {
            ValueType::U8 => Value::U8(self.take(1)?[0]),
            ValueType::I8 => Value::I8(self.take(1)?[0] as i8),
            ValueType::U16 => Value::U16(u16::from_le_bytes(self.array()?)),
            ValueType::I16 => Value::I16(i16::from_le_bytes(self.array()?)),
            ValueType::U32 => Value::U32(self.u32()?),
            ValueType::I32 => Value::I32(i32::from_le_bytes(self.array()?)),
            ValueType::F32 => Value::F32(f32::from_le_bytes(self.array()?)),
            ValueType::Bool => Value::Bool(self.take(1)?[0] != 0),
            ValueType::String => Value::String(self.string()?),
            ValueType::Array => {
                let elem = ValueType::from_u32(self.u32()?)?;
                let n = self.count(1)?;
                let items = (0..n).map(|_| self.value(elem)).collect::<Result<Vec<_>>>()?;
                Value::Array(Array { elem, items })
            }
            ValueType::U64 => Value::U64(self.u64()?),
            ValueType::I64 => Value::I64(i64::from_le_bytes(self.array()?)),
            ValueType::F64 => Value::F64(f64::from_le_bytes(self.array()?)),
        })
    }
}

impl GgufFile {
    pub fn read(path: &Path) -> Result<Self> {
        Self::parse(std::fs::read(path).map_err(io_err(path))?)
    }

    /// Parses a whole file and checks that every tensor's data lies inside it, aligned.
    pub fn parse(bytes: Vec<u8>) -> Result<Self> {
        let mut c = Cursor { b: &bytes, pos: 0 };
        let magic: [u8; 4] = c.array()?;
        if magic != MAGIC {
            return Err(GgufError::BadMagic(magic));
        }
        let version = c.u32()?;
        if version != 2 && version != 3 {
            return Err(GgufError::Version(version));
        }
        let n_tensors = c.count(8)?;
        let n_kvs = c.count(8)?;
        let mut kvs: Vec<(String, Value)> = Vec::with_capacity(n_kvs);
        for _ in 0..n_kvs {
            let key = c.string()?;
            let ty = ValueType::from_u32(c.u32()?)?;
            let v = c.value(ty)?;
            if kvs.iter().any(|(k, _)| *k == key) {
                return Err(GgufError::DuplicateKey(key));
            }
            kvs.push((key, v));
        }
        let alignment = match kvs.iter().find(|(k, _)| k == ALIGNMENT_KEY) {
            Some((_, v)) => alignment_of(v)?,
            None => DEFAULT_ALIGNMENT,
        };
        let mut tensors: Vec<TensorInfo> = Vec::with_capacity(n_tensors);
        for _ in 0..n_tensors {
            let name = c.string()?;
            let n_dims = c.u32()? as usize;
            if n_dims == 0 || n_dims > 4 {
                return Err(tensor_err(&name, format!("{n_dims} dims")));
            }
            let dims = (0..n_dims).map(|_| c.u64()).collect::<Result<Vec<_>>>()?;
            let ty = TensorType::from_u32(c.u32()?)?;
            let offset = c.u64()?;
            if tensors.iter().any(|t| t.name == name) {
                return Err(GgufError::DuplicateTensor(name));
            }
            if !(dims[0] as usize).is_multiple_of(ty.block().0) {
                return Err(tensor_err(&name, format!("row length {} for {ty:?}", dims[0])));
            }
            tensors.push(TensorInfo { name, dims, ty, offset });
        }
        let data_offset = align_up(c.pos as u64, alignment) as usize;
        for t in &tensors {
            if !t.offset.is_multiple_of(alignment) {
                return Err(tensor_err(&t.name, format!("offset {} is not aligned to {alignment}", t.offset)));
            }
            let end = (data_offset as u64).checked_add(t.offset).and_then(|s| s.checked_add(t.nbytes() as u64));
            if end.is_none_or(|e| e > bytes.len() as u64) {
                return Err(tensor_err(&t.name, "data runs past the end of the file"));
            }
        }
        Ok(Self { version, kvs, tensors, alignment, data_offset, bytes })
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.kvs.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// A tensor's raw (encoded) bytes.
    pub fn tensor_bytes(&self, t: &TensorInfo) -> &[u8] {
        let start = self.data_offset + t.offset as usize;
        &self.bytes[start..start + t.nbytes()]
    }

    /// A tensor decoded to f32, row-major in torch order.
    pub fn tensor_f32(&self, name: &str) -> Result<Vec<f32>> {
        let t = self.tensor(name).ok_or_else(|| tensor_err(name, "not in the file"))?;
        Ok(decode(self.tensor_bytes(t), t.ty))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn every_kv_type() -> Vec<(String, Value)> {
        let nested = Array::new(ValueType::Array, vec![Value::i32s([1, -2]), Value::i32s([])]).unwrap();
        vec![
            ("u8".into(), Value::U8(200)),
            ("i8".into(), Value::I8(-100)),
            ("u16".into(), Value::U16(60_000)),
            ("i16".into(), Value::I16(-30_000)),
            ("u32".into(), Value::U32(4_000_000_000)),
            ("i32".into(), Value::I32(-2_000_000_000)),
            ("f32".into(), Value::F32(1.5e-5)),
            ("bool.t".into(), Value::Bool(true)),
            ("bool.f".into(), Value::Bool(false)),
            ("string".into(), Value::string("héllo, ĠĊ wörld")),
            ("empty.string".into(), Value::string("")),
            ("u64".into(), Value::U64(u64::MAX - 3)),
            ("i64".into(), Value::I64(i64::MIN + 5)),
            ("f64".into(), Value::F64(-1e300)),
            ("arr.strings".into(), Value::strings(["a", "Ġb c", ""])),
            ("arr.empty_strings".into(), Value::strings(Vec::<String>::new())),
            ("arr.i32".into(), Value::i32s([1, 3, -6])),
            ("arr.u32".into(), Value::u32s([7, 0])),
            ("arr.f32".into(), Value::f32s([0.25, -3.0])),
            (
                "arr.f64".into(),
                Value::Array(Array::new(ValueType::F64, vec![Value::F64(1.0), Value::F64(2.5)]).unwrap()),
            ),
            ("arr.nested".into(), Value::Array(nested)),
        ]
    }

    fn to_bytes(w: &GgufWriter) -> Vec<u8> {
        let mut out = Vec::new();
        w.write_to(&mut out).unwrap();
        out
    }

    #[test]
    fn every_kv_type_round_trips() {
        let mut w = GgufWriter::new();
        for (k, v) in every_kv_type() {
            w.add_kv(k, v).unwrap();
        }
        let f = GgufFile::parse(to_bytes(&w)).unwrap();
        assert_eq!(f.version, 3);
        assert_eq!(f.kvs, every_kv_type());
        assert!(f.tensors.is_empty());
        let empty = f.get("arr.empty_strings").unwrap().as_array().unwrap();
        assert_eq!(empty.elem_type(), ValueType::String);
        assert!(empty.items().is_empty());
    }

    #[test]
    fn header_bytes_follow_the_spec() {
        let mut w = GgufWriter::new();
        w.add_kv("k", Value::U32(7)).unwrap();
        w.add_tensor("t", &[2], TensorType::F32, &[1.0, 2.0]).unwrap();
        let b = to_bytes(&w);
        assert_eq!(&b[..4], b"GGUF");
        assert_eq!(u32::from_le_bytes(b[4..8].try_into().unwrap()), 3);
        assert_eq!(u64::from_le_bytes(b[8..16].try_into().unwrap()), 1); // tensors
        assert_eq!(u64::from_le_bytes(b[16..24].try_into().unwrap()), 1); // kvs
        assert_eq!(u64::from_le_bytes(b[24..32].try_into().unwrap()), 1); // key length
        assert_eq!(b[32], b'k');
        assert_eq!(u32::from_le_bytes(b[33..37].try_into().unwrap()), ValueType::U32 as u32);
        assert_eq!(u32::from_le_bytes(b[37..41].try_into().unwrap()), 7);
        // Tensor info: name "t", 1 dim of 2, F32, offset 0; then padding to 32.
        assert_eq!(u64::from_le_bytes(b[41..49].try_into().unwrap()), 1);
        assert_eq!(b[49], b't');
        assert_eq!(u32::from_le_bytes(b[50..54].try_into().unwrap()), 1);
        assert_eq!(u64::from_le_bytes(b[54..62].try_into().unwrap()), 2);
        assert_eq!(u32::from_le_bytes(b[62..66].try_into().unwrap()), 0);
        assert_eq!(u64::from_le_bytes(b[66..74].try_into().unwrap()), 0);
        assert_eq!(b.len(), 96 + 32, "header padded to 96, 8 data bytes padded to 32");
        assert_eq!(f32::from_le_bytes(b[100..104].try_into().unwrap()), 2.0);
    }

    fn ramp(n: usize) -> Vec<f32> {
        (0..n).map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0).collect()
    }

    #[test]
    fn f32_and_f16_are_exact_and_dims_reverse() {
        let mut w = GgufWriter::new();
        let a = ramp(3 * 5);
        w.add_tensor("a", &[3, 5], TensorType::F32, &a).unwrap();
        // Values exactly representable in f16 come back bit-exact.
        let h: Vec<f32> = (0..40).map(|i| (i as f32 - 20.0) * 0.125).collect();
        w.add_tensor("h", &[2, 4, 5], TensorType::F16, &h).unwrap();
        let f = GgufFile::parse(to_bytes(&w)).unwrap();
        let ta = f.tensor("a").unwrap();
        assert_eq!(ta.dims, vec![5, 3]);
        assert_eq!(ta.shape(), vec![3, 5]);
        assert_eq!(f.tensor_f32("a").unwrap(), a);
        assert_eq!(f.tensor("h").unwrap().dims, vec![5, 4, 2]);
        assert_eq!(f.tensor_f32("h").unwrap(), h);
        // Other values round to the nearest f16.
        let mut w = GgufWriter::new();
        w.add_tensor("r", &[15], TensorType::F16, &a).unwrap();
        let f = GgufFile::parse(to_bytes(&w)).unwrap();
        for (x, y) in a.iter().zip(f.tensor_f32("r").unwrap()) {
            assert_eq!(y, half::f16::from_f32(*x).to_f32());
            assert!((x - y).abs() <= x.abs() * 1e-3);
        }
    }

    #[test]
    fn q8_0_dequantises_within_half_a_step() {
        let (rows, cols) = (3, 64);
        let mut x = ramp(rows * cols);
        x[5] = 0.0;
        x[64..96].iter_mut().for_each(|v| *v = 0.0); // an all-zero block
        let mut w = GgufWriter::new();
        w.add_tensor("q", &[rows, cols], TensorType::Q8_0, &x).unwrap();
        let f = GgufFile::parse(to_bytes(&w)).unwrap();
        let t = f.tensor("q").unwrap();
        assert_eq!(t.nbytes(), rows * cols / 32 * 34);
        let y = f.tensor_f32("q").unwrap();
        for (xb, yb) in x.chunks(32).zip(y.chunks(32)) {
            let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = half::f16::from_f32(amax / 127.0).to_f32();
            for (a, b) in xb.iter().zip(yb) {
                // Half a quantisation step, plus the scale's f16 rounding over 127 steps.
                assert!((a - b).abs() <= d / 2.0 + amax * 1e-3, "{a} vs {b} (d {d})");
            }
            // The largest value hits +-127 exactly.
            if amax > 0.0 {
                let i = xb.iter().position(|v| v.abs() == amax).unwrap();
                assert_eq!(yb[i].abs(), 127.0 * d);
            }
        }
        assert!(y[64..96].iter().all(|&v| v == 0.0));
        // Rounding is half away from zero, as ggml's reference quantiser.
        let mut block = [0f32; 32];
        block[0] = 127.0;
        block[1] = 2.5;
        block[2] = -2.5;
        let (d, qs) = quantize_q8_0(&block);
        assert_eq!((d, qs[0], qs[1], qs[2]), (1.0, 127, 3, -3));
    }

    #[test]
    fn q8_0_needs_rows_of_32() {
        let mut w = GgufWriter::new();
        let err = w.add_tensor("bad", &[2, 48], TensorType::Q8_0, &ramp(96)).unwrap_err().to_string();
        assert!(err.contains("bad") && err.contains("48"), "{err}");
    }

    #[test]
    fn alignment_is_honoured() {
        for align in [None, Some(8u32), Some(64), Some(256)] {
            let mut w = GgufWriter::new();
            if let Some(a) = align {
                w.add_kv(ALIGNMENT_KEY, Value::U32(a)).unwrap();
            }
            w.add_kv("general.name", Value::string("x")).unwrap();
            for (i, n) in [3usize, 1, 33, 8].iter().enumerate() {
                w.add_tensor(format!("t{i}"), &[*n], TensorType::F32, &ramp(*n)).unwrap();
            }
            let bytes = to_bytes(&w);
            let f = GgufFile::parse(bytes.clone()).unwrap();
            let a = align.map_or(32, u64::from);
            assert_eq!(f.alignment, a);
            assert_eq!(f.data_offset as u64 % a, 0);
            assert_eq!(bytes.len() as u64 % a, 0);
            for (i, t) in f.tensors.iter().enumerate() {
                assert_eq!(t.offset % a, 0, "{align:?} {}", t.name);
                assert_eq!(f.tensor_f32(&t.name).unwrap(), ramp(t.n_elems()), "{i}");
            }
        }
        let mut w = GgufWriter::new();
        assert!(matches!(w.add_kv(ALIGNMENT_KEY, Value::U32(12)), Err(GgufError::Alignment(_))));
        assert!(matches!(w.add_kv(ALIGNMENT_KEY, Value::U64(32)), Err(GgufError::Alignment(_))));
    }

    #[test]
    fn errors_are_typed() {
        let mut w = GgufWriter::new();
        w.add_kv("a", Value::U8(1)).unwrap();
        assert!(matches!(w.add_kv("a", Value::U8(2)), Err(GgufError::DuplicateKey(k)) if k == "a"));
        w.add_tensor("t", &[2], TensorType::F32, &[0.0, 1.0]).unwrap();
        assert!(matches!(w.add_tensor("t", &[1], TensorType::F32, &[0.0]), Err(GgufError::DuplicateTensor(_))));
        assert!(matches!(w.add_tensor("u", &[3], TensorType::F32, &[0.0]), Err(GgufError::Tensor { .. })));
        assert!(matches!(
            Array::new(ValueType::U32, vec![Value::U32(1), Value::I32(2)]),
            Err(GgufError::MixedArray { expected: ValueType::U32, found: ValueType::I32 })
        ));

        let good = to_bytes(&w);
        assert!(matches!(GgufFile::parse(b"GGML\x03\0\0\0".to_vec()), Err(GgufError::BadMagic(_))));
        let mut v4 = good.clone();
        v4[4] = 4;
        assert!(matches!(GgufFile::parse(v4), Err(GgufError::Version(4))));
        for cut in [3, 10, 30, 60] {
            assert!(matches!(GgufFile::parse(good[..cut].to_vec()), Err(GgufError::Truncated { .. })), "{cut}");
        }
        // Cut inside the tensor data.
        assert!(matches!(GgufFile::parse(good[..100].to_vec()), Err(GgufError::Tensor { .. })));
        let mut bad_type = good.clone();
        bad_type[33] = 99; // the value type of key "a"
        assert!(matches!(GgufFile::parse(bad_type), Err(GgufError::ValueType(99))));
        // A huge declared count must fail cleanly, not allocate.
        let mut huge = good;
        huge[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(GgufFile::parse(huge), Err(GgufError::Truncated { .. })));
    }

    #[test]
    fn write_file_is_readable() {
        let dir = std::env::temp_dir().join(format!("taper-gguf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("m.gguf");
        let mut w = GgufWriter::new();
        w.add_kv("general.architecture", Value::string("llama")).unwrap();
        w.add_tensor("w", &[2, 32], TensorType::Q8_0, &ramp(64)).unwrap();
        w.write_file(&p).unwrap();
        let f = GgufFile::read(&p).unwrap();
        assert_eq!(f.get("general.architecture").and_then(Value::as_str), Some("llama"));
        assert_eq!(f.tensor("w").unwrap().ty, TensorType::Q8_0);
        let err = GgufFile::read(&dir.join("missing.gguf")).unwrap_err().to_string();
        assert!(err.contains("missing.gguf"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
