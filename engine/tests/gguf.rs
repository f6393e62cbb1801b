//! GGUF reader and writer: round trips, a hand-built v2 file, and malformed files that must each be
//! rejected with the specific error (never a panic).

use bitnet_engine::format::gguf::{GgufError, GgufFile, GgufWriter, Value};
use bitnet_engine::format::quant::GgmlType;

// ---- helpers ----

/// Little-endian byte builder for files the writer cannot (or must not) produce.
#[derive(Default)]
struct Raw(Vec<u8>);

impl Raw {
    fn bytes(mut self, b: &[u8]) -> Self {
        self.0.extend_from_slice(b);
        self
    }
    fn u32(self, v: u32) -> Self {
        self.bytes(&v.to_le_bytes())
    }
    fn u64(self, v: u64) -> Self {
        self.bytes(&v.to_le_bytes())
    }
    fn str(self, s: &str) -> Self {
        self.u64(s.len() as u64).bytes(s.as_bytes())
    }
    fn tensor_info(self, name: &str, dims: &[u64], type_id: u32, offset: u64) -> Self {
        let raw = self.str(name).u32(dims.len() as u32);
        dims.iter().fold(raw, |r, &d| r.u64(d)).u32(type_id).u64(offset)
    }
    fn pad_to(mut self, alignment: usize) -> Self {
        self.0.resize(self.0.len().next_multiple_of(alignment), 0);
        self
    }
}

fn header(version: u32, n_tensors: u64, n_kv: u64) -> Raw {
    Raw::default().bytes(b"GGUF").u32(version).u64(n_tensors).u64(n_kv)
}

/// A v3 file with no metadata and one tensor "t" described by the arguments, followed by
/// `data_len` bytes of data.
fn one_tensor(dims: &[u64], type_id: u32, offset: u64, data_len: usize) -> Vec<u8> {
    header(3, 1, 0).tensor_info("t", dims, type_id, offset).pad_to(32).bytes(&vec![0xAB; data_len]).0
}

fn parse_err(bytes: &[u8]) -> GgufError {
    let err = GgufFile::parse(bytes).expect_err("the file should be rejected");
    let msg = err.to_string();
    assert!(!msg.contains('\n'), "error message is not one line: {msg}");
    err
}

/// Index just past the single occurrence of `needle` in `bytes`.
fn after(bytes: &[u8], needle: &[u8]) -> usize {
    let hits: Vec<usize> =
        bytes.windows(needle.len()).enumerate().filter(|(_, w)| *w == needle).map(|(i, _)| i).collect();
    assert_eq!(hits.len(), 1, "{:?} should occur once", String::from_utf8_lossy(needle));
    hits[0] + needle.len()
}

/// Index just past metadata key `key` (where its value type follows).
fn key_end(bytes: &[u8], key: &str) -> usize {
    let mut needle = (key.len() as u64).to_le_bytes().to_vec();
    needle.extend_from_slice(key.as_bytes());
    after(bytes, &needle)
}

/// Replaces the single occurrence of `from` with `to` (same length).
fn patch(bytes: &mut [u8], from: &[u8], to: &[u8]) {
    assert_eq!(from.len(), to.len());
    let end = after(bytes, from);
    bytes[end - from.len()..end].copy_from_slice(to);
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

fn every_value_type() -> Vec<(String, Value)> {
    let strs = |xs: &[&str]| Value::Array(xs.iter().map(|s| Value::Str(s.to_string())).collect());
    let mut deep = Value::I32(7);
    for _ in 0..8 {
        deep = Value::Array(vec![deep]); // the deepest nesting the reader accepts
    }
    [
        ("k.u8", Value::U8(200)),
        ("k.i8", Value::I8(-100)),
        ("k.u16", Value::U16(60000)),
        ("k.i16", Value::I16(-30000)),
        ("k.u32", Value::U32(4_000_000_000)),
        ("k.i32", Value::I32(-2_000_000_000)),
        ("k.f32", Value::F32(-1.5e-5)),
        ("k.bool.true", Value::Bool(true)),
        ("k.bool.false", Value::Bool(false)),
        ("k.str", Value::Str("héllo, wörld ✓".into())),
        ("k.str.empty", Value::Str(String::new())),
        ("k.u64", Value::U64(u64::MAX)),
        ("k.i64", Value::I64(i64::MIN)),
        ("k.f64", Value::F64(std::f64::consts::PI)),
        ("k.arr.strs", strs(&["a", "", "Ġthe", "<|eot_id|>"])),
        ("k.arr.f32", Value::Array(vec![Value::F32(0.5), Value::F32(-0.25)])),
        ("k.arr.i32", Value::Array(vec![Value::I32(1), Value::I32(-1), Value::I32(3)])),
        ("k.arr.bool", Value::Array(vec![Value::Bool(true), Value::Bool(false)])),
        ("k.arr.u8", Value::Array(vec![Value::U8(1), Value::U8(2)])),
        ("k.arr.f64", Value::Array(vec![Value::F64(1e300)])),
        ("k.arr.empty", Value::Array(vec![])),
        ("k.arr.nested", Value::Array(vec![strs(&["x", "y"]), strs(&[]), strs(&["z"])])),
        (
            "k.arr.mixed.inner",
            Value::Array(vec![Value::Array(vec![Value::U16(1)]), Value::Array(vec![Value::I64(-2)])]),
        ),
        ("k.arr.deep", deep),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

struct Sample {
    name: &'static str,
    dims: Vec<u64>,
    ty: GgmlType,
    data: Vec<u8>,
}

/// Tensors of several types; the last one's size is a multiple of 32 so the file ends with data.
fn sample_tensors() -> Vec<Sample> {
    let specs: [(&str, &[u64], GgmlType); 5] = [
        ("token_embd.weight", &[4, 3], GgmlType::F32),
        ("blk.0.attn_norm.weight", &[8], GgmlType::F16),
        ("blk.0.ffn_up.weight", &[64, 2], GgmlType::Q8_0),
        ("blk.0.attn_q.weight", &[256, 1], GgmlType::TQ2_0),
        ("blk.0.attn_k.weight", &[128, 3, 1, 1], GgmlType::I2_S),
    ];
    specs
        .iter()
        .enumerate()
        .map(|(i, &(name, dims, ty))| {
            let size = ty.tensor_bytes(dims.iter().product()).unwrap();
            Sample { name, dims: dims.to_vec(), ty, data: pattern(size as usize, i as u8) }
        })
        .collect()
}

fn sample_writer() -> GgufWriter {
    let mut w = GgufWriter::new();
    for (k, v) in every_value_type() {
        w.add(&k, v);
    }
    for t in sample_tensors() {
        w.add_tensor(t.name, &t.dims, t.ty, t.data);
    }
    w
}

fn sample_file() -> Vec<u8> {
    sample_writer().to_bytes()
}

// ---- round trips ----

#[test]
fn round_trip_every_value_type() {
    let mut w = GgufWriter::new();
    for (k, v) in every_value_type() {
        w.add(&k, v);
    }
    let bytes = w.to_bytes();
    let f = GgufFile::parse(&bytes).unwrap();
    assert_eq!(f.version, 3);
    assert_eq!(f.alignment, 32);
    assert_eq!(f.metadata, every_value_type());
    assert!(f.tensors.is_empty());
    assert_eq!(f.data_offset % 32, 0);
}

#[test]
fn round_trip_tensors() {
    let bytes = sample_file();
    let f = GgufFile::parse(&bytes).unwrap();
    let samples = sample_tensors();
    assert_eq!(f.tensors.len(), samples.len());
    assert_eq!(f.metadata, every_value_type());
    assert_eq!(f.data_offset % 32, 0);
    for (t, s) in f.tensors.iter().zip(&samples) {
        assert_eq!(t.name, s.name);
        assert_eq!(t.dims, s.dims);
        assert_eq!(t.ty, s.ty);
        assert_eq!(t.size, s.data.len() as u64);
        assert!(t.offset >= f.data_offset && (t.offset - f.data_offset).is_multiple_of(32));
        assert_eq!(f.tensor_data(&bytes, t), &s.data[..]);
    }
    let k = f.tensor("blk.0.attn_k.weight").unwrap();
    assert_eq!((k.cols(), k.rows(), k.n_elements()), (128, 3, 384));
    let q = f.tensor("blk.0.ffn_up.weight").unwrap();
    assert_eq!((q.cols(), q.rows()), (64, 2));
    assert!(f.tensor("output.weight").is_none());
    // Tensors are laid out back to back in insertion order, the file ends with the last one.
    let last = f.tensors.last().unwrap();
    assert_eq!(last.offset + last.size, bytes.len() as u64);
}

#[test]
fn writer_honours_alignment_key() {
    let mut w = GgufWriter::new();
    w.add("general.alignment", Value::U32(64));
    w.add_tensor("a", &[3], GgmlType::F32, pattern(12, 1));
    w.add_tensor("b", &[5], GgmlType::F32, pattern(20, 2));
    let bytes = w.to_bytes();
    let f = GgufFile::parse(&bytes).unwrap();
    assert_eq!(f.alignment, 64);
    assert_eq!(f.data_offset % 64, 0);
    let b = f.tensor("b").unwrap();
    assert_eq!(b.offset - f.data_offset, 64);
    assert_eq!(f.tensor_data(&bytes, b), &pattern(20, 2)[..]);
}

#[test]
fn writer_add_replaces_an_existing_key_in_place() {
    let mut w = GgufWriter::new();
    w.add("a", Value::U32(1));
    w.add("b", Value::U32(2));
    w.add("a", Value::Str("one".into()));
    let f = GgufFile::parse(&w.to_bytes()).unwrap();
    assert_eq!(f.metadata, vec![("a".into(), Value::Str("one".into())), ("b".into(), Value::U32(2))]);
}

#[test]
fn value_accessors() {
    assert_eq!(Value::U8(7).as_u64(), Some(7));
    assert_eq!(Value::I64(5).as_u64(), Some(5));
    assert_eq!(Value::I32(-1).as_u64(), None);
    assert_eq!(Value::Bool(true).as_u64(), None);
    assert_eq!(Value::F32(1.0).as_u64(), None);
    assert_eq!(Value::F32(0.5).as_f64(), Some(0.5));
    assert_eq!(Value::I16(-3).as_f64(), Some(-3.0));
    assert_eq!(Value::Bool(false).as_f64(), None);
    assert_eq!(Value::Str("x".into()).as_str(), Some("x"));
    assert_eq!(Value::U8(1).as_str(), None);
    assert_eq!(Value::Bool(true).as_bool(), Some(true));
    assert_eq!(Value::U8(1).as_bool(), None);
    assert_eq!(Value::Array(vec![Value::U8(1)]).as_array(), Some(&[Value::U8(1)][..]));
    let f = GgufFile::parse(&sample_file()).unwrap();
    assert_eq!(f.get("k.str").and_then(Value::as_str), Some("héllo, wörld ✓"));
    assert!(f.get("missing").is_none());
}

#[test]
fn version_2_file_built_by_hand() {
    let bytes = header(2, 1, 2)
        .str("general.architecture")
        .u32(8)
        .str("bitnet")
        .str("general.alignment")
        .u32(4)
        .u32(16)
        .tensor_info("w", &[2, 2], 0, 0)
        .pad_to(16)
        .bytes(&pattern(16, 9))
        .0;
    let f = GgufFile::parse(&bytes).unwrap();
    assert_eq!(f.version, 2);
    assert_eq!(f.alignment, 16);
    assert_eq!(f.get("general.architecture"), Some(&Value::Str("bitnet".into())));
    let w = f.tensor("w").unwrap();
    assert_eq!((w.ty, w.size, w.offset), (GgmlType::F32, 16, f.data_offset));
    assert_eq!(f.tensor_data(&bytes, w), &pattern(16, 9)[..]);
}

#[test]
fn alignment_may_be_any_unsigned_integer_type() {
    let mut w = GgufWriter::new();
    w.add("general.alignment", Value::U64(8));
    assert_eq!(GgufFile::parse(&w.to_bytes()).unwrap().alignment, 8);
    // The largest power of two is valid too (the data offset rounds up to it without overflow).
    w.add("general.alignment", Value::U64(1 << 63));
    assert_eq!(GgufFile::parse(&w.to_bytes()).unwrap().data_offset, 1 << 63);
}

// ---- malformed files ----

#[test]
fn bad_magic() {
    let mut bytes = sample_file();
    bytes[..4].copy_from_slice(b"GGML");
    assert_eq!(parse_err(&bytes), GgufError::BadMagic(*b"GGML"));
    assert!(matches!(parse_err(b""), GgufError::Truncated { .. }));
}

#[test]
fn unsupported_versions() {
    for v in [0, 1, 4, 1000] {
        assert_eq!(parse_err(&header(v, 0, 0).0), GgufError::UnsupportedVersion(v));
    }
    assert_eq!(parse_err(&header(3u32.swap_bytes(), 0, 0).0), GgufError::BigEndian(3));
}

#[test]
fn truncated_at_every_cut_point() {
    let bytes = sample_file();
    let f = GgufFile::parse(&bytes).unwrap();
    // Cuts inside the header fail while reading it; once all tensor infos are read, the cut
    // shows as tensor data past the end of the file.
    let mut first_bounds_cut = None;
    for cut in 0..bytes.len() {
        match parse_err(&bytes[..cut]) {
            GgufError::Truncated { .. } | GgufError::CountTooLarge { .. } => {
                assert!(first_bounds_cut.is_none(), "cut {cut}: header error after a data error")
            }
            GgufError::TensorOutOfBounds { .. } => {
                first_bounds_cut.get_or_insert(cut);
            }
            e => panic!("cut {cut}: unexpected error {e}"),
        }
    }
    let first = first_bounds_cut.expect("cuts inside the data region") as u64;
    assert!(first <= f.data_offset && f.data_offset - first < 32);
}

#[test]
fn truncated_in_each_section_names_it() {
    let truncated = |bytes: &[u8], cut: usize| match parse_err(&bytes[..cut]) {
        GgufError::Truncated { what, offset, .. } => (what, offset),
        e => panic!("cut {cut}: expected Truncated, got {e}"),
    };
    let bytes = sample_file();
    assert_eq!(truncated(&bytes, 2), ("magic".into(), 0));
    assert_eq!(truncated(&bytes, 6), ("version".into(), 4));
    assert_eq!(truncated(&bytes, 12), ("tensor count".into(), 8));

    // Small files, so the cuts leave room for the declared counts and fail inside the section.
    // Key bytes at 32..57, value type 57..61, string length 61..69, string bytes 69..91.
    let mut w = GgufWriter::new();
    w.add("general.a.rather.long.key", Value::Str("a value of some length".into()));
    let bytes = w.to_bytes();
    assert_eq!(truncated(&bytes, 20), ("metadata count".into(), 16));
    assert_eq!(truncated(&bytes, 50), ("key #0".into(), 32));
    assert_eq!(truncated(&bytes, 80), ("value of key 'general.a.rather.long.key'".into(), 69));

    // Array header 35..51, "first" at 51..64, "second" at 64..78.
    let mut w = GgufWriter::new();
    w.add("arr", Value::Array(vec![Value::Str("first".into()), Value::Str("second".into())]));
    let bytes = w.to_bytes();
    assert_eq!(truncated(&bytes, 75), ("value of key 'arr'".into(), 72));

    // Name bytes at 32..50, n_dims 50..54, dims 54..62, type 62..66, offset 66..74.
    let bytes = header(3, 1, 0).tensor_info("a.long.tensor.name", &[8], 0, 0).pad_to(32).bytes(&[0; 32]).0;
    assert_eq!(truncated(&bytes, 48), ("name of tensor #0".into(), 32));
    assert_eq!(truncated(&bytes, 64), ("info of tensor 'a.long.tensor.name'".into(), 62));
    assert!(matches!(parse_err(&bytes[..bytes.len() - 1]), GgufError::TensorOutOfBounds { .. }));
}

#[test]
fn huge_tensor_count() {
    for n in [1 << 40, u64::MAX] {
        let err = parse_err(&header(3, n, 0).bytes(&[0; 64]).0);
        assert!(matches!(err, GgufError::CountTooLarge { count, offset: 8, .. } if count == n), "{err}");
    }
    // Each tensor info takes at least 32 bytes: 3 of them cannot fit in 64.
    assert!(matches!(parse_err(&header(3, 3, 0).bytes(&[0; 64]).0), GgufError::CountTooLarge { .. }));
}

#[test]
fn huge_kv_count() {
    for n in [1 << 40, u64::MAX] {
        let err = parse_err(&header(3, 0, n).bytes(&[0; 64]).0);
        assert!(matches!(err, GgufError::CountTooLarge { count, offset: 16, .. } if count == n), "{err}");
    }
}

#[test]
fn huge_string_length() {
    let err = parse_err(&header(3, 0, 1).u64(u64::MAX).bytes(&[0; 64]).0);
    assert!(matches!(err, GgufError::Truncated { needed: u64::MAX, .. }), "{err}");
    let err = parse_err(&header(3, 0, 1).str("k").u32(8).u64(1 << 50).bytes(b"value").0);
    assert!(matches!(err, GgufError::Truncated { ref what, .. } if what == "value of key 'k'"), "{err}");
}

#[test]
fn huge_array_length() {
    for (elem_type, len) in [(10, 1u64 << 61), (10, u64::MAX), (9, 1 << 40), (8, 1000)] {
        let bytes = header(3, 0, 1).str("arr").u32(9).u32(elem_type).u64(len).bytes(&[0; 100]).0;
        assert!(matches!(parse_err(&bytes), GgufError::CountTooLarge { count, .. } if count == len));
    }
    // Nested: the inner array's length is checked against the bytes left too.
    let bytes = header(3, 0, 1).str("arr").u32(9).u32(9).u64(1).u32(0).u64(1 << 62).0;
    assert!(matches!(parse_err(&bytes), GgufError::CountTooLarge { .. }));
}

#[test]
fn tensor_offset_outside_the_file() {
    for offset in [1 << 20, 32, u64::MAX - 31] {
        let err = parse_err(&one_tensor(&[8], 0, offset, 32));
        assert!(
            matches!(err, GgufError::TensorOutOfBounds { ref tensor, offset: o, size: 32, .. } if tensor == "t" && o == offset),
            "{err}"
        );
    }
    // One byte short of the data.
    assert!(matches!(parse_err(&one_tensor(&[8], 0, 0, 31)), GgufError::TensorOutOfBounds { .. }));
    assert!(GgufFile::parse(&one_tensor(&[8], 0, 0, 32)).is_ok());
}

#[test]
fn misaligned_tensor_offset() {
    let err = parse_err(&one_tensor(&[1], 0, 4, 64));
    assert_eq!(err, GgufError::MisalignedOffset { tensor: "t".into(), offset: 4, alignment: 32 });
    // With a larger alignment, 32 is misaligned too.
    let bytes = header(3, 1, 1)
        .str("general.alignment")
        .u32(4)
        .u32(64)
        .tensor_info("t", &[1], 0, 32)
        .pad_to(64)
        .bytes(&[0; 64])
        .0;
    assert!(matches!(parse_err(&bytes), GgufError::MisalignedOffset { alignment: 64, .. }));
}

#[test]
fn bad_alignment_values() {
    for v in [Value::U32(0), Value::U32(3), Value::U32(48), Value::I32(-32), Value::Str("32".into()), Value::F32(32.0)]
    {
        let mut w = GgufWriter::new();
        w.add("general.alignment", v.clone());
        let err = parse_err(&w.to_bytes());
        assert!(matches!(err, GgufError::BadAlignment(_)), "{v:?}: {err}");
    }
}

#[test]
fn unknown_value_type() {
    let mut bytes = sample_file();
    let at = key_end(&bytes, "k.u16");
    bytes[at..at + 4].copy_from_slice(&13u32.to_le_bytes());
    let err = parse_err(&bytes);
    assert_eq!(err, GgufError::UnknownValueType { key: "k.u16".into(), type_id: 13, offset: at as u64 });
    // An array's element type too.
    let mut bytes = sample_file();
    let at = key_end(&bytes, "k.arr.f32") + 4;
    bytes[at..at + 4].copy_from_slice(&0xFFFF_FFFFu32.to_le_bytes());
    assert!(matches!(parse_err(&bytes), GgufError::UnknownValueType { type_id: 0xFFFF_FFFF, .. }));
}

#[test]
fn unknown_tensor_type() {
    let err = parse_err(&one_tensor(&[32], 99, 0, 128));
    assert_eq!(err, GgufError::UnknownTensorType { tensor: "t".into(), type_id: 99 });
    let msg = err.to_string();
    assert!(msg.contains("'t'") && msg.contains("99"), "{msg}");
}

#[test]
fn bad_dimension_counts() {
    for dims in [&[1u64, 1, 1, 1, 1][..], &[]] {
        let err = parse_err(&one_tensor(dims, 0, 0, 32));
        assert!(matches!(err, GgufError::BadDimCount { n_dims, .. } if n_dims as usize == dims.len()), "{err}");
    }
    // n_dims = u32::MAX must be rejected before reading (or allocating for) any dims.
    let bytes = header(3, 1, 0).str("t").u32(u32::MAX).bytes(&[0; 64]).0;
    assert!(matches!(parse_err(&bytes), GgufError::BadDimCount { n_dims: u32::MAX, .. }));
}

#[test]
fn zero_dimension() {
    let err = parse_err(&one_tensor(&[4, 0], 0, 0, 32));
    assert_eq!(err, GgufError::ZeroDim { tensor: "t".into(), index: 1 });
}

#[test]
fn element_count_overflow() {
    let err = parse_err(&one_tensor(&[1 << 32, 1 << 32], 0, 0, 32));
    assert!(matches!(err, GgufError::ElementCountOverflow { .. }), "{err}");
    let err = parse_err(&one_tensor(&[u64::MAX, 2, 1, 1], 0, 0, 32));
    assert!(matches!(err, GgufError::ElementCountOverflow { .. }), "{err}");
}

#[test]
fn tensor_byte_size_invalid_for_its_type() {
    // 31 elements are not a whole number of Q8_0 blocks.
    let err = parse_err(&one_tensor(&[31], GgmlType::Q8_0.id(), 0, 64));
    assert!(matches!(err, GgufError::BadTensorSize { ty: GgmlType::Q8_0, n_elements: 31, .. }), "{err}");
    // F32 bytes of 2^63 elements overflow u64.
    let err = parse_err(&one_tensor(&[1 << 62, 2], 0, 0, 32));
    assert!(matches!(err, GgufError::BadTensorSize { ty: GgmlType::F32, .. }), "{err}");
}

#[test]
fn duplicate_tensor_name() {
    let mut bytes = sample_file();
    patch(&mut bytes, b"blk.0.attn_k.weight", b"blk.0.attn_q.weight");
    assert!(
        matches!(parse_err(&bytes), GgufError::DuplicateTensor { ref tensor, .. } if tensor == "blk.0.attn_q.weight")
    );
}

#[test]
fn duplicate_key() {
    let mut bytes = sample_file();
    patch(&mut bytes, b"k.i16", b"k.u16");
    let err = parse_err(&bytes);
    assert!(matches!(err, GgufError::DuplicateKey { ref key, .. } if key == "k.u16"), "{err}");
}

#[test]
fn invalid_utf8() {
    let mut bytes = sample_file();
    patch(&mut bytes, b"k.i16", b"k.\xFF16");
    assert!(matches!(parse_err(&bytes), GgufError::InvalidUtf8 { ref what, .. } if what == "key #3"));
    // String values are not repaired either.
    let mut bytes = sample_file();
    patch(&mut bytes, "héllo".as_bytes(), b"h\xC3\xC3llo");
    assert!(matches!(parse_err(&bytes), GgufError::InvalidUtf8 { ref what, .. } if what == "value of key 'k.str'"));
    let mut bytes = sample_file();
    patch(&mut bytes, b"token_embd", b"token\xE2embd");
    assert!(matches!(parse_err(&bytes), GgufError::InvalidUtf8 { ref what, .. } if what == "name of tensor #0"));
}

#[test]
fn bad_bool() {
    let mut bytes = sample_file();
    let at = key_end(&bytes, "k.bool.true") + 4;
    assert_eq!(bytes[at], 1);
    bytes[at] = 2;
    assert_eq!(parse_err(&bytes), GgufError::BadBool { key: "k.bool.true".into(), byte: 2, offset: at as u64 });
    // Inside an array.
    let mut bytes = sample_file();
    let at = key_end(&bytes, "k.arr.bool") + 4 + 4 + 8 + 1;
    bytes[at] = 0xFF;
    assert!(matches!(parse_err(&bytes), GgufError::BadBool { byte: 0xFF, .. }));
}

#[test]
fn arrays_nested_too_deep() {
    // Nine nested arrays (eight of arrays, the innermost an empty u8 array); eight are accepted.
    let mut raw = header(3, 0, 1).str("deep").u32(9);
    for _ in 0..8 {
        raw = raw.u32(9).u64(1);
    }
    let bytes = raw.u32(0).u64(0).0;
    assert!(matches!(parse_err(&bytes), GgufError::NestingTooDeep { ref key, .. } if key == "deep"));
    // Hostile nesting far beyond the limit fails the same way, without exhausting the stack.
    let mut raw = header(3, 0, 1).str("deep").u32(9);
    for _ in 0..100_000 {
        raw = raw.u32(9).u64(1);
    }
    assert!(matches!(parse_err(&raw.0), GgufError::NestingTooDeep { .. }));
}

#[test]
fn error_messages_name_the_culprit() {
    let msg = parse_err(&one_tensor(&[4, 0], 0, 0, 32)).to_string();
    assert!(msg.contains("tensor 't'") && msg.contains("dimension 1"), "{msg}");
    let msg = parse_err(&one_tensor(&[8], 0, 1 << 20, 32)).to_string();
    assert!(msg.contains("'t'") && msg.contains("1048576"), "{msg}");
    let msg = parse_err(&sample_file()[..100]).to_string();
    assert!(msg.contains("byte"), "{msg}");
}

/// Mutates a few random bytes of a valid file many times (deterministic LCG): parsing must never
/// panic, and whatever parses must have tensor data inside the file.
#[test]
fn fuzz_random_byte_mutations() {
    let original = sample_file();
    let mut state: u64 = 0x2545_F491_4F6C_DD1D;
    let mut next = move || {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        state >> 33
    };
    let mut accepted = 0;
    for _ in 0..4000 {
        let mut bytes = original.clone();
        for _ in 0..1 + next() % 4 {
            let i = next() as usize % bytes.len();
            // Favour values that make lengths and counts interesting.
            bytes[i] = match next() % 4 {
                0 => 0xFF,
                1 => 0,
                _ => next() as u8,
            };
        }
        let cut = if next() % 8 == 0 { next() as usize % bytes.len() } else { bytes.len() };
        let bytes = &bytes[..cut];
        if let Ok(f) = GgufFile::parse(bytes) {
            accepted += 1;
            for t in &f.tensors {
                assert_eq!(f.tensor_data(bytes, t).len() as u64, t.size);
            }
        }
    }
    // Many mutations hit tensor data or padding and leave a valid file.
    assert!(accepted > 0);
}

// ---- memory taken by hostile files ----

/// Counts the bytes the current thread has allocated, so that a test can measure the peak of one call
/// while other tests run on other threads.
mod counting {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    pub struct Counting;

    thread_local! {
        static LIVE: Cell<isize> = const { Cell::new(0) };
        static PEAK: Cell<isize> = const { Cell::new(0) };
    }

    fn note(delta: isize) {
        // `try_with`: allocations during thread teardown are not counted.
        let _ = LIVE.try_with(|live| {
            live.set(live.get() + delta);
            let _ = PEAK.try_with(|peak| peak.set(peak.get().max(live.get())));
        });
    }

    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            note(layout.size() as isize);
            unsafe { System.alloc(layout) }
        }
        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            note(layout.size() as isize);
            unsafe { System.alloc_zeroed(layout) }
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            note(-(layout.size() as isize));
            unsafe { System.dealloc(ptr, layout) }
        }
        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            note(new_size as isize - layout.size() as isize);
            unsafe { System.realloc(ptr, layout, new_size) }
        }
    }

    /// The most bytes `f` had allocated at once on this thread (what it freed before returning included).
    pub fn peak_of<R>(f: impl FnOnce() -> R) -> (R, usize) {
        let start = LIVE.with(Cell::get);
        PEAK.with(|p| p.set(start));
        let r = f();
        (r, (PEAK.with(Cell::get) - start).max(0) as usize)
    }
}

#[global_allocator]
static ALLOC: counting::Counting = counting::Counting;

/// What parsing a file may allocate at most: the charged metadata (METADATA_MEMORY_FACTOR times the file, or
/// the floor) plus the uncharged bookkeeping (the duplicate-key sets, tensor dims), a few times the file.
fn parse_memory_bound(file_len: usize) -> usize {
    use bitnet_engine::format::gguf::{METADATA_MEMORY_FACTOR, METADATA_MEMORY_FLOOR};
    (2 * METADATA_MEMORY_FACTOR as usize * file_len).max(2 * METADATA_MEMORY_FLOOR as usize)
}

#[test]
fn byte_array_count_cannot_make_the_reader_allocate_32_bytes_per_byte() {
    // 4 MiB of u8 elements: 4 Mi values of 32 bytes (128 MiB) if taken as they are.
    let n = 4 << 20;
    let bytes = header(3, 0, 1).str("arr").u32(9).u32(0).u64(n as u64).bytes(&vec![0; n]).0;
    let (result, peak) = counting::peak_of(|| GgufFile::parse(&bytes));
    assert!(matches!(result, Err(GgufError::MetadataTooLarge { .. })), "{result:?}");
    assert!(peak <= parse_memory_bound(bytes.len()), "peak {peak} bytes for a {}-byte file", bytes.len());
}

/// Property: whatever a hostile file says (counts, lengths, types, bytes), parsing it allocates at most a small
/// multiple of its size. Thousands of seeded mutations of a valid file with every value type.
#[test]
fn no_mutation_allocates_more_than_a_small_multiple_of_the_file() {
    let mut w = sample_writer();
    // Room for a mutated count to claim a lot of elements: a big value after the small ones.
    w.add("k.zz.big", Value::Str("x".repeat(256 << 10)));
    let good = w.to_bytes();
    let header_len = GgufFile::parse(&good).unwrap().data_offset as usize;
    let small_keys_end = header_len - (256 << 10); // mutate the small keys, where the counts are
    let bound = parse_memory_bound(good.len());
    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    for i in 0..4000 {
        let mut bytes = good.clone();
        for _ in 0..1 + next() % 3 {
            let at = next() as usize % small_keys_end;
            match next() % 4 {
                // A count or length up to the file size, the kind a check of the bytes left lets through.
                0 => {
                    let v = next() % (good.len() as u64 + 1);
                    let end = (at + 8).min(bytes.len());
                    bytes[at..end].copy_from_slice(&v.to_le_bytes()[..end - at]);
                }
                1 => bytes[at] ^= 1 << (next() % 8),
                2 => bytes[at] = 0xff,
                _ => bytes[at] = (next() % 13) as u8, // a value type id
            }
        }
        let (_, peak) = counting::peak_of(|| GgufFile::parse(&bytes));
        assert!(peak <= bound, "mutation #{i}: parsing took {peak} bytes, more than {bound}");
    }
}
