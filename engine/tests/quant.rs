//! quant.rs and ternary.rs against independent references: gguf-py's numpy (de)quantizers (fixtures written by
//! tests/scripts/make_quant_fixtures.py) and, for I2_S which gguf-py lacks, a decoder written here from formats.md.

use bitnet_engine::format::quant::{dequantize, quantize, GgmlType};
use bitnet_engine::tensor::ternary::TernaryMatrix;
use half::{bf16, f16};

/// One gguf-py fixture: the input floats (if gguf-py could quantize them), its bytes, and its decoding of them.
struct Fixture {
    ty: GgmlType,
    input: Option<Vec<f32>>,
    encoded: Vec<u8>,
    decoded: Vec<f32>,
}

fn read_u32(b: &[u8], at: usize) -> usize {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap()) as usize
}

fn read_f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
}

fn fixture(name: &str) -> Fixture {
    let path = format!("{}/../tests/fixtures/quant/{name}.qfx", env!("CARGO_MANIFEST_DIR"));
    let b = std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    assert_eq!(&b[..4], b"QFX1");
    let ty = GgmlType::from_id(read_u32(&b, 4) as u32).unwrap();
    let (n, has_input, n_bytes) = (read_u32(&b, 8), read_u32(&b, 12) == 1, read_u32(&b, 16));
    let mut at = 20;
    let input = has_input.then(|| {
        at += 4 * n;
        read_f32s(&b[20..at])
    });
    let encoded = b[at..at + n_bytes].to_vec();
    let decoded = read_f32s(&b[at + n_bytes..]);
    assert_eq!(decoded.len(), n);
    Fixture { ty, input, encoded, decoded }
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

fn decode(ty: GgmlType, data: &[u8], n: usize) -> Vec<f32> {
    let mut out = vec![0.0; n];
    dequantize(ty, data, &mut out).unwrap();
    out
}

/// Deterministic xorshift generator for test inputs.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn code(&mut self) -> i8 {
        (self.next() % 3) as i8 - 1
    }
    fn codes(&mut self, n: usize) -> Vec<i8> {
        (0..n).map(|_| self.code()).collect()
    }
    /// Roughly normal, from the sum of uniforms.
    fn normal(&mut self) -> f32 {
        (0..4).map(|_| (self.next() >> 40) as f32 / (1u64 << 24) as f32).sum::<f32>() - 2.0
    }
}

fn err_text<T: std::fmt::Debug>(r: bitnet_engine::Result<T>) -> String {
    r.expect_err("expected an error").to_string()
}

// --- types -------------------------------------------------------------------------------------------------------

#[test]
fn type_ids_names_and_sizes() {
    let table = [
        (GgmlType::F32, 0, "f32", 1, 4),
        (GgmlType::F16, 1, "f16", 1, 2),
        (GgmlType::Q4_0, 2, "q4_0", 32, 18),
        (GgmlType::Q5_0, 6, "q5_0", 32, 22),
        (GgmlType::Q8_0, 8, "q8_0", 32, 34),
        (GgmlType::Q4_K, 12, "q4_k", 256, 144),
        (GgmlType::Q6_K, 14, "q6_k", 256, 210),
        (GgmlType::BF16, 30, "bf16", 1, 2),
        (GgmlType::TQ1_0, 34, "tq1_0", 256, 54),
        (GgmlType::TQ2_0, 35, "tq2_0", 256, 66),
        (GgmlType::I2_S, 36, "i2_s", 128, 32),
        (GgmlType::Q1_0, 41, "q1_0", 128, 18),
        (GgmlType::Q2_0, 42, "q2_0", 64, 18),
    ];
    for (ty, id, name, size, bytes) in table {
        assert_eq!((ty.id(), ty.name(), ty.block_size(), ty.block_bytes()), (id, name, size, bytes));
        assert_eq!(GgmlType::from_id(id), Some(ty));
        assert_eq!(GgmlType::parse(name), Some(ty));
    }
    assert_eq!(GgmlType::from_id(3), None);
    assert_eq!(GgmlType::parse("q4_1"), None);
    assert_eq!(GgmlType::Q8_0.tensor_bytes(64), Some(68));
    assert_eq!(GgmlType::Q8_0.tensor_bytes(48), None);
    assert_eq!(GgmlType::TQ2_0.row_bytes(512), Some(132));
    assert_eq!(GgmlType::TQ2_0.row_bytes(576), None);
    assert_eq!(GgmlType::F16.row_bytes(7), Some(14));
    assert_eq!(GgmlType::F32.tensor_bytes(u64::MAX), None);
    // I2_S: n/4 bytes of codes plus one 32-byte scale block per tensor; no per-row size.
    assert_eq!(GgmlType::I2_S.tensor_bytes(2 * 576), Some(2 * 576 / 4 + 32));
    assert_eq!(GgmlType::I2_S.tensor_bytes(576), None);
    assert_eq!(GgmlType::I2_S.row_bytes(1024), None);
}

// --- gguf-py references ------------------------------------------------------------------------------------------

/// Our quantize and dequantize against gguf-py, bit for bit.
fn check_fixture(name: &str) {
    let f = fixture(name);
    if let Some(input) = &f.input {
        assert_eq!(quantize(f.ty, input).unwrap(), f.encoded, "{name}: quantize");
    }
    assert_eq!(bits(&decode(f.ty, &f.encoded, f.decoded.len())), bits(&f.decoded), "{name}: dequantize");
}

#[test]
fn f32_f16_bf16_match_gguf_py() {
    // Includes f16 overflow to inf, subnormals, round-to-even ties, and bf16 NaNs (made quiet, as ggml does).
    for name in ["f32", "f16", "bf16"] {
        check_fixture(name);
    }
}

/// PrismML's Q1_0 and Q2_0 against ggml itself (`quantize_row_q{1,2}_0_ref`, `dequantize_row_q{1,2}_0` of the
/// llama.cpp build that made the Qwen3 fixtures, called by tests/scripts/make_qwen3_models.py): bit for bit,
/// zero blocks, negative zero and Q2_0 rounding ties included.
#[test]
fn q1_0_q2_0_match_ggml() {
    for name in ["q1_0", "q2_0"] {
        check_fixture(name);
    }
}

#[test]
fn q8_0_q5_0_q4_0_match_gguf_py() {
    // Includes zero, constant, tiny (f16 d underflow), sign-tie and exact rounding-tie blocks.
    for name in ["q8_0", "q5_0", "q4_0"] {
        check_fixture(name);
    }
}

#[test]
fn k_quant_dequantize_matches_gguf_py() {
    // gguf-py (0.19) has no Q4_K/Q6_K quantizer: its fixtures are random blocks that it decoded.
    for name in ["q4_k_random", "q6_k_random"] {
        check_fixture(name);
    }
}

#[test]
fn tq_dequantize_matches_gguf_py() {
    // Random floats: gguf-py picks a different d per block; we decode each block with its own d.
    for name in ["tq1_0_float", "tq2_0_float", "tq1_0_ternary", "tq2_0_ternary"] {
        let f = fixture(name);
        assert_eq!(bits(&decode(f.ty, &f.encoded, f.decoded.len())), bits(&f.decoded), "{name}");
    }
}

#[test]
fn tq_encoding_matches_gguf_py() {
    // A 4 x 512 ternary weight (codes times one f16-exact scale) as gguf-py encodes it.
    for name in ["tq1_0_ternary", "tq2_0_ternary"] {
        let f = fixture(name);
        let input = f.input.unwrap();
        let scale = input.iter().fold(0.0f32, |a, v| a.max(v.abs()));
        let codes: Vec<i8> = input.iter().map(|&v| if v == 0.0 { 0 } else { v.signum() as i8 }).collect();
        let m = TernaryMatrix::from_codes(4, 512, &codes, scale);
        assert_eq!(m.to_tensor(f.ty).unwrap(), f.encoded, "{name}: to_tensor");
        let back = TernaryMatrix::from_tensor(f.ty, &f.encoded, 4, 512).unwrap();
        assert_eq!((back.to_codes(), back.scale), (codes, scale), "{name}: from_tensor");
    }
}

#[test]
fn tq_with_per_block_scales_is_refused() {
    for name in ["tq1_0_float", "tq2_0_float"] {
        let f = fixture(name);
        let e = err_text(TernaryMatrix::from_tensor(f.ty, &f.encoded, 8, 256));
        assert!(e.contains("different scales"), "{name}: {e}");
    }
}

/// gguf-py has no Q4_K/Q6_K quantizer to compare bytes with, so bound the round-trip error instead: per 256-block,
/// the worst error relative to the block's absmax.
#[test]
fn k_quant_round_trip_error_is_bounded() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut x: Vec<f32> = (0..16 * 256).map(|_| rng.normal()).collect();
    x[256..512].fill(0.0); // an all-zero block
    x[512..768].iter_mut().for_each(|v| *v = v.abs() + 1.0); // all positive: Q4_K's min is 0
    for (ty, bound) in [(GgmlType::Q6_K, 0.02), (GgmlType::Q4_K, 0.09)] {
        let q = quantize(ty, &x).unwrap();
        assert_eq!(q.len() as u64, ty.tensor_bytes(x.len() as u64).unwrap());
        let y = decode(ty, &q, x.len());
        for (xb, yb) in x.chunks(256).zip(y.chunks(256)) {
            let amax = xb.iter().fold(0.0f32, |a, v| a.max(v.abs()));
            let worst = xb.iter().zip(yb).fold(0.0f32, |a, (x, y)| a.max((x - y).abs()));
            assert!(worst <= bound * amax, "{}: error {worst} for block absmax {amax}", ty.name());
        }
    }
}

// --- I2_S, from formats.md ---------------------------------------------------------------------------------------

/// Straight from formats.md: the tensor is flattened and cut into blocks of 128 weights in 32 bytes; element j of a
/// block sits in byte j % 32 at bits 6 - 2*(j / 32), as code + 1; the f32 scale follows the n/4 bytes of codes.
fn reference_i2s_decode(data: &[u8], n: usize) -> (Vec<i8>, f32) {
    let codes = (0..n)
        .map(|k| {
            let (block, j) = (k / 128, k % 128);
            let byte = data[32 * block + j % 32];
            ((byte >> (6 - 2 * (j / 32))) & 3) as i8 - 1
        })
        .collect();
    (codes, f32::from_le_bytes(data[n / 4..n / 4 + 4].try_into().unwrap()))
}

fn reference_i2s_encode(codes: &[i8], scale: f32) -> Vec<u8> {
    let n = codes.len();
    let mut out = vec![0u8; n / 4 + 32];
    for (k, &t) in codes.iter().enumerate() {
        let (block, j) = (k / 128, k % 128);
        out[32 * block + j % 32] |= ((t + 1) as u8) << (6 - 2 * (j / 32));
    }
    out[n / 4..n / 4 + 4].copy_from_slice(&scale.to_le_bytes());
    out
}

#[test]
fn i2_s_matches_reference_including_rows_inside_blocks() {
    let mut rng = Rng(7);
    // 576-wide rows start inside a 128-block (576 = 4.5 blocks); 96 and 80 are narrower than a block.
    for (rows, cols) in [(2, 576), (6, 576), (4, 96), (8, 80), (3, 128), (5, 640)] {
        let codes = rng.codes(rows * cols);
        let data = reference_i2s_encode(&codes, 0.37);
        let m = TernaryMatrix::from_tensor(GgmlType::I2_S, &data, rows, cols).unwrap();
        assert_eq!((m.to_codes(), m.scale), reference_i2s_decode(&data, rows * cols), "{rows}x{cols}");
        assert_eq!(m.to_tensor(GgmlType::I2_S).unwrap(), data, "{rows}x{cols}");
        let expected: Vec<f32> = codes.iter().map(|&t| f32::from(t) * 0.37).collect();
        assert_eq!(decode(GgmlType::I2_S, &data, rows * cols), expected, "{rows}x{cols}");
    }
}

#[test]
fn ternary_round_trips_are_exact() {
    let mut rng = Rng(42);
    let shapes = [(2, 576), (4, 96), (1, 128), (7, 640), (3, 256), (2, 768), (5, 1280)];
    for (rows, cols) in shapes {
        let codes = rng.codes(rows * cols);
        let m = TernaryMatrix::from_codes(rows, cols, &codes, 0.5);
        for ty in [GgmlType::I2_S, GgmlType::TQ2_0, GgmlType::TQ1_0] {
            if ty != GgmlType::I2_S && cols % 256 != 0 {
                continue;
            }
            let data = m.to_tensor(ty).unwrap();
            assert_eq!(data.len() as u64, ty.tensor_bytes((rows * cols) as u64).unwrap());
            let back = TernaryMatrix::from_tensor(ty, &data, rows, cols).unwrap();
            assert_eq!(back, m, "{} {rows}x{cols}", ty.name());
        }
    }
}

#[test]
fn engine_layout_pads_rows_with_zero_weights() {
    let mut rng = Rng(3);
    let (rows, cols) = (3, 200);
    let codes = rng.codes(rows * cols);
    let m = TernaryMatrix::from_codes(rows, cols, &codes, 1.0);
    assert_eq!(m.padded_cols(), 256);
    assert_eq!(m.data.len(), rows * 64);
    for r in 0..rows {
        let row = m.row(r);
        assert_eq!(row.len(), 64);
        for c in 0..m.padded_cols() {
            // Column c of a row: block c / 128, byte c % 32, bits 6 - 2 * ((c % 128) / 32), stored as code + 1.
            let u = (row[32 * (c / 128) + c % 32] >> (6 - 2 * ((c % 128) / 32))) & 3;
            let expected = if c < cols { codes[r * cols + c] } else { 0 };
            assert_eq!(u as i8 - 1, expected, "row {r} col {c}");
            if c < cols {
                assert_eq!(m.code(r, c), expected);
            }
        }
    }
    assert_eq!(m.to_codes(), codes);
}

// --- float-stored BitNet weights ---------------------------------------------------------------------------------

fn f16_bytes(w: &[f32]) -> Vec<u8> {
    w.iter().flat_map(|&v| f16::from_f32(v).to_le_bytes()).collect()
}

fn bf16_bytes(w: &[f32]) -> Vec<u8> {
    w.iter().flat_map(|&v| bf16::from_f32(v).to_le_bytes()).collect()
}

fn f32_bytes(w: &[f32]) -> Vec<u8> {
    w.iter().flat_map(|v| v.to_le_bytes()).collect()
}

#[test]
fn ternary_valued_floats_give_sign_codes_and_stored_scale() {
    let mut rng = Rng(11);
    let (rows, cols) = (4, 96);
    let codes = rng.codes(rows * cols);
    let s = 0.012345f32; // not exactly representable in f16 or bf16
    let w: Vec<f32> = codes.iter().map(|&t| f32::from(t) * s).collect();
    let stored = [
        (GgmlType::F32, f32_bytes(&w), s),
        (GgmlType::F16, f16_bytes(&w), f16::from_f32(s).to_f32()),
        (GgmlType::BF16, bf16_bytes(&w), bf16::from_f32(s).to_f32()),
    ];
    for (ty, data, scale) in stored {
        let m = TernaryMatrix::from_tensor(ty, &data, rows, cols).unwrap();
        assert_eq!((m.to_codes(), m.scale), (codes.clone(), scale), "{}", ty.name());
    }
    // Magnitudes one storage ulp apart (a converter rounding s·t per element) are still one scale: max|w|.
    let mut wide = w.clone();
    let k = codes.iter().position(|&t| t != 0).unwrap();
    wide[k] = f32::from(codes[k]) * f16::from_bits(f16::from_f32(s).to_bits() + 1).to_f32();
    let m = TernaryMatrix::from_tensor(GgmlType::F16, &f16_bytes(&wide), rows, cols).unwrap();
    assert_eq!(m.to_codes(), codes);
    assert_eq!(m.scale, wide[k].abs());
}

#[test]
fn latent_float_weights_use_absmean() {
    let mut rng = Rng(5);
    let (rows, cols) = (8, 64);
    let w: Vec<f32> = (0..rows * cols).map(|_| rng.normal() * 0.02).collect();
    let mean = (w.iter().map(|v| f64::from(v.abs())).sum::<f64>() / w.len() as f64) as f32;
    let expected: Vec<i8> = w.iter().map(|&v| (v / mean).round_ties_even().clamp(-1.0, 1.0) as i8).collect();
    let m = TernaryMatrix::from_tensor(GgmlType::F32, &f32_bytes(&w), rows, cols).unwrap();
    assert_eq!(m.scale, mean);
    assert_eq!(m.to_codes(), expected);
    assert!(expected.contains(&0) && expected.contains(&1) && expected.contains(&-1));
}

#[test]
fn all_zero_float_tensor_is_fine() {
    let m = TernaryMatrix::from_tensor(GgmlType::BF16, &[0u8; 2 * 2 * 64], 2, 64).unwrap();
    assert!(m.to_codes().iter().all(|&t| t == 0));
    assert_eq!(m.scale, 0.0);
}

// --- errors ------------------------------------------------------------------------------------------------------

#[test]
fn bad_shapes_and_data_are_errors() {
    // TQ rows must be whole blocks: 4 x 576 is 9 blocks, but rows would straddle them.
    let m576 = TernaryMatrix::from_codes(4, 576, &[0; 2304], 1.0);
    for ty in [GgmlType::TQ1_0, GgmlType::TQ2_0] {
        assert!(err_text(m576.to_tensor(ty)).contains("576 columns"));
        let data = vec![0u8; ty.tensor_bytes(2304).unwrap() as usize];
        assert!(err_text(TernaryMatrix::from_tensor(ty, &data, 4, 576)).contains("576 columns"));
    }
    // I2_S: 3 x 576 = 1728 elements is not a multiple of 128.
    let m = TernaryMatrix::from_codes(3, 576, &[0; 1728], 1.0);
    assert!(err_text(m.to_tensor(GgmlType::I2_S)).contains("128"));
    assert!(err_text(TernaryMatrix::from_tensor(GgmlType::I2_S, &[0x55; 464], 3, 576)).contains("1728"));
    // Truncated data.
    let i2s = reference_i2s_encode(&[0; 1152], 1.0);
    assert!(err_text(TernaryMatrix::from_tensor(GgmlType::I2_S, &i2s[..i2s.len() - 1], 2, 576)).contains("bytes"));
    assert!(err_text(TernaryMatrix::from_tensor(GgmlType::TQ2_0, &[0; 131], 2, 256)).contains("bytes"));
    assert!(err_text(TernaryMatrix::from_tensor(GgmlType::F16, &[0; 10], 2, 3)).contains("bytes"));
    let mut out = [0.0f32; 64];
    assert!(dequantize(GgmlType::Q8_0, &[0; 67], &mut out).is_err());
    assert!(dequantize(GgmlType::Q8_0, &[0; 68], &mut out[..40]).is_err());
    assert!(dequantize(GgmlType::I2_S, &[0; 40], &mut out).is_err());
    // A 2-bit code of 3 is not ternary.
    let mut bad = i2s.clone();
    bad[5] = 0xff;
    assert!(err_text(TernaryMatrix::from_tensor(GgmlType::I2_S, &bad, 2, 576)).contains("code 3"));
    // Non-ternary storage types and quantize targets.
    assert!(TernaryMatrix::from_tensor(GgmlType::Q8_0, &[0; 34], 1, 32).is_err());
    assert!(quantize(GgmlType::TQ2_0, &[0.0; 256]).is_err());
    assert!(quantize(GgmlType::Q4_K, &[0.0; 255]).is_err());
    // Float weights with a NaN, and a TQ scale an f16 cannot hold.
    assert!(TernaryMatrix::from_tensor(GgmlType::F32, &f32_bytes(&[1.0, f32::NAN]), 1, 2).is_err());
    let big = TernaryMatrix::from_codes(1, 256, &[1; 256], 1e6);
    assert!(err_text(big.to_tensor(GgmlType::TQ2_0)).contains("f16"));
}
