//! The ggml tensor types a BitNet GGUF may hold: their sizes, and the reference (de)quantizers of llama.cpp's
//! ggml-quants.c (`quantize_row_*_ref`, `dequantize_row_*`), ported operation by operation so the bytes match.
//!
//! The float arithmetic keeps the C source's order of operations and never fuses a multiply-add, as the C code
//! does when compiled without FMA contraction. I2_S is Microsoft's bitnet.cpp type: 2-bit codes over the flattened
//! tensor, then one f32 scale for the whole tensor (formats.md).

use half::f16;

use crate::{Error, Result};

/// Elements per K-quant (and TQ) super-block.
const QK_K: usize = 256;
/// I2_S: weights per 32-byte block.
const I2S_BLOCK: usize = 128;
/// Q1_0 (PrismML's Bonsai, ggml type 41): weights per block (f16 d, then one sign bit per weight).
pub const QK1_0: usize = 128;
/// Q2_0 (Ternary-Bonsai, ggml type 42): weights per block (f16 d, then a 2-bit code per weight).
pub const QK2_0: usize = 64;
/// I2_S: the tensor ends with one 32-byte block whose first 4 bytes are the f32 scale.
const I2S_SCALE_BYTES: usize = 32;

#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q5_0,
    Q8_0,
    Q4_K,
    Q6_K,
    BF16,
    TQ1_0,
    TQ2_0,
    I2_S,
    Q1_0,
    Q2_0,
}

use GgmlType::*;

const ALL_TYPES: [GgmlType; 13] = [F32, F16, Q4_0, Q5_0, Q8_0, Q4_K, Q6_K, BF16, TQ1_0, TQ2_0, I2_S, Q1_0, Q2_0];

impl GgmlType {
    pub fn from_id(id: u32) -> Option<Self> {
        ALL_TYPES.into_iter().find(|t| t.id() == id)
    }

    /// The ggml type id stored in GGUF files.
    pub fn id(self) -> u32 {
        match self {
            F32 => 0,
            F16 => 1,
            Q4_0 => 2,
            Q5_0 => 6,
            Q8_0 => 8,
            Q4_K => 12,
            Q6_K => 14,
            BF16 => 30,
            TQ1_0 => 34,
            TQ2_0 => 35,
            I2_S => 36,
            Q1_0 => 41,
            Q2_0 => 42,
        }
    }

    /// Lowercase name, as llama.cpp prints it.
    pub fn name(self) -> &'static str {
        match self {
            F32 => "f32",
            F16 => "f16",
            Q4_0 => "q4_0",
            Q5_0 => "q5_0",
            Q8_0 => "q8_0",
            Q4_K => "q4_k",
            Q6_K => "q6_k",
            BF16 => "bf16",
            TQ1_0 => "tq1_0",
            TQ2_0 => "tq2_0",
            I2_S => "i2_s",
            Q1_0 => "q1_0",
            Q2_0 => "q2_0",
        }
    }

    /// The type named `name` (case-insensitive), for command-line flags.
    pub fn parse(name: &str) -> Option<Self> {
        ALL_TYPES.into_iter().find(|t| t.name().eq_ignore_ascii_case(name))
    }

    /// Elements per block.
    pub fn block_size(self) -> usize {
        self.layout().0
    }

    /// Bytes per block (for I2_S, without the per-tensor scale block).
    pub fn block_bytes(self) -> usize {
        self.layout().1
    }

    fn layout(self) -> (usize, usize) {
        match self {
            F32 => (1, 4),
            F16 | BF16 => (1, 2),
            Q4_0 => (32, 18),
            Q5_0 => (32, 22),
            Q8_0 => (32, 34),
            Q4_K => (QK_K, 144),
            Q6_K => (QK_K, 210),
            TQ1_0 => (QK_K, 54),
            TQ2_0 => (QK_K, 66),
            I2_S => (I2S_BLOCK, 32),
            Q1_0 => (QK1_0, 18),
            Q2_0 => (QK2_0, 18),
        }
    }

    /// Bytes of a whole tensor of `n_elements`; None if `n_elements` is not a multiple of the block size or the
    /// size overflows.
    pub fn tensor_bytes(self, n_elements: u64) -> Option<u64> {
        let (size, bytes) = self.layout();
        if !n_elements.is_multiple_of(size as u64) {
            return None;
        }
        let blocks = (n_elements / size as u64).checked_mul(bytes as u64)?;
        match self {
            I2_S => blocks.checked_add(I2S_SCALE_BYTES as u64),
            _ => Some(blocks),
        }
    }

    /// Bytes of one row of `cols` elements; None for I2_S (its blocks run across rows and its scale is per tensor)
    /// or when `cols` is not a multiple of the block size.
    pub fn row_bytes(self, cols: usize) -> Option<usize> {
        let (size, bytes) = self.layout();
        if self == I2_S || !cols.is_multiple_of(size) {
            return None;
        }
        (cols / size).checked_mul(bytes)
    }
}

fn invalid(reason: String) -> Error {
    Error::Invalid(reason)
}

fn read_f16(b: &[u8]) -> f32 {
    f16::from_le_bytes([b[0], b[1]]).to_f32()
}

fn f16_bytes(x: f32) -> [u8; 2] {
    f16::from_f32(x).to_le_bytes()
}

/// ggml's `nearest_int`: round to nearest, ties to even, through the float's mantissa (valid for |x| < 2^22).
fn nearest_int(x: f32) -> i32 {
    let v = x + 12582912.0;
    (v.to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
}

// ---------------------------------------------------------------------------------------------------------------
// Dequantization

/// Decode `out.len()` consecutive elements starting at element 0 of `data` (data = whole rows of a block type).
/// For I2_S, `data` must be the whole tensor: its scale sits in the block after the codes.
pub fn dequantize(ty: GgmlType, data: &[u8], out: &mut [f32]) -> Result<()> {
    let decode: fn(&[u8], &mut [f32]) = match ty {
        F32 => |b, y| y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        F16 => |b, y| y[0] = read_f16(b),
        BF16 => |b, y| y[0] = f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16),
        Q4_0 => dequantize_q4_0,
        Q5_0 => dequantize_q5_0,
        Q8_0 => dequantize_q8_0,
        Q4_K => dequantize_q4_k,
        Q6_K => dequantize_q6_k,
        TQ1_0 => dequantize_tq1_0,
        TQ2_0 => dequantize_tq2_0,
        Q1_0 => dequantize_q1_0,
        Q2_0 => dequantize_q2_0,
        I2_S => return dequantize_i2_s(data, out),
    };
    let needed = ty
        .tensor_bytes(out.len() as u64)
        .ok_or_else(|| invalid(format!("{} elements are not whole {} blocks", out.len(), ty.name())))?;
    if (data.len() as u64) < needed {
        return Err(invalid(format!(
            "{} data truncated: {} elements need {needed} bytes, got {}",
            ty.name(),
            out.len(),
            data.len()
        )));
    }
    let (size, bytes) = ty.layout();
    for (block, y) in data.chunks_exact(bytes).zip(out.chunks_exact_mut(size)) {
        decode(block, y);
    }
    Ok(())
}

fn dequantize_q8_0(b: &[u8], y: &mut [f32]) {
    let d = read_f16(b);
    for (y, &q) in y.iter_mut().zip(&b[2..34]) {
        *y = f32::from(q as i8) * d;
    }
}

fn dequantize_q4_0(b: &[u8], y: &mut [f32]) {
    let d = read_f16(b);
    for (j, &q) in b[2..18].iter().enumerate() {
        y[j] = ((q & 0x0f) as i32 - 8) as f32 * d;
        y[j + 16] = ((q >> 4) as i32 - 8) as f32 * d;
    }
}

fn dequantize_q5_0(b: &[u8], y: &mut [f32]) {
    let d = read_f16(b);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    for (j, &q) in b[6..22].iter().enumerate() {
        let h0 = ((qh >> j) << 4) & 0x10;
        let h1 = (qh >> (j + 12)) & 0x10;
        y[j] = ((u32::from(q & 0x0f) | h0) as i32 - 16) as f32 * d;
        y[j + 16] = ((u32::from(q >> 4) | h1) as i32 - 16) as f32 * d;
    }
}

/// Q4_K packs eight 6-bit (scale, min) pairs into 12 bytes.
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

fn dequantize_q4_k(b: &[u8], y: &mut [f32]) {
    let (d, dmin) = (read_f16(&b[0..2]), read_f16(&b[2..4]));
    let (scales, qs) = (&b[4..16], &b[16..144]);
    // Each 32 bytes of qs hold two sub-blocks of 32: low nibbles, then high nibbles.
    for (i, q) in qs.chunks_exact(32).enumerate() {
        let (sc1, m1) = scale_min_k4(2 * i, scales);
        let (sc2, m2) = scale_min_k4(2 * i + 1, scales);
        let (d1, m1) = (d * f32::from(sc1), dmin * f32::from(m1));
        let (d2, m2) = (d * f32::from(sc2), dmin * f32::from(m2));
        let y = &mut y[64 * i..64 * i + 64];
        for l in 0..32 {
            y[l] = d1 * f32::from(q[l] & 0x0f) - m1;
            y[l + 32] = d2 * f32::from(q[l] >> 4) - m2;
        }
    }
}

fn dequantize_q6_k(b: &[u8], y: &mut [f32]) {
    let (ql, qh, sc) = (&b[0..128], &b[128..192], &b[192..208]);
    let d = read_f16(&b[208..210]);
    // Each half of the block: 64 bytes of low nibbles, 32 bytes of 2-bit highs, 8 scales (one per 16 elements).
    for n in 0..2 {
        let (ql, qh, sc) = (&ql[64 * n..], &qh[32 * n..], &sc[8 * n..]);
        let y = &mut y[128 * n..128 * n + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0x0f) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            y[l] = d * f32::from(sc[is] as i8) * q1 as f32;
            y[l + 32] = d * f32::from(sc[is + 2] as i8) * q2 as f32;
            y[l + 64] = d * f32::from(sc[is + 4] as i8) * q3 as f32;
            y[l + 96] = d * f32::from(sc[is + 6] as i8) * q4 as f32;
        }
    }
}

/// TQ2_0: element 128h + 32l + m of a block is bits 2l..2l+1 of qs[32h + m], stored as code + 1.
/// Like ggml, the unused value 3 decodes to 2·d.
fn dequantize_tq2_0(b: &[u8], y: &mut [f32]) {
    let d = read_f16(&b[64..66]);
    for (i, y) in y.iter_mut().enumerate() {
        let (h, l, m) = (i / 128, (i % 128) / 32, i % 32);
        let u = (b[32 * h + m] >> (2 * l)) & 3;
        *y = (i32::from(u) - 1) as f32 * d;
    }
}

/// Q1_0: bit `j % 8` of qs[j / 8] is weight j's sign; set means +d, clear means −d (there is no zero).
fn dequantize_q1_0(b: &[u8], y: &mut [f32]) {
    let d = read_f16(b);
    for (j, y) in y.iter_mut().enumerate() {
        *y = if q1_0_bit(b, j) { d } else { -d };
    }
}

/// Whether weight `j` of a Q1_0 block (18 bytes) is +d.
fn q1_0_bit(b: &[u8], j: usize) -> bool {
    (b[2 + j / 8] >> (j % 8)) & 1 == 1
}

/// Q2_0: bits 2(j % 4)..+2 of qs[j / 4] hold u = code + 1 for weight j; the value is (u − 1)·d, so
/// u = 0, 1, 2, 3 mean −d, 0, +d, +2d (ggml's quantizer clamps round(w/d) to −1..=2).
fn dequantize_q2_0(b: &[u8], y: &mut [f32]) {
    let d = read_f16(b);
    for (j, y) in y.iter_mut().enumerate() {
        *y = (i32::from(q2_0_code(b, j)) - 1) as f32 * d;
    }
}

/// The stored 2-bit value u (code + 1) of weight `j` of a Q2_0 block (18 bytes).
fn q2_0_code(b: &[u8], j: usize) -> u8 {
    (b[2 + j / 4] >> (2 * (j % 4))) & 3
}

/// TQ1_0 trit `n` (0 = most significant) of a base-3 byte: multiplying by 3^n drops the higher trits off the top
/// of the fixed-point fraction q/256 ≈ value/243; the next trit is then the integer part of 3·q/256.
pub(crate) fn tq1_trit(byte: u8, n: usize) -> u8 {
    const POW3: [u8; 5] = [1, 3, 9, 27, 81];
    let q = byte.wrapping_mul(POW3[n]);
    ((u16::from(q) * 3) >> 8) as u8
}

/// Where TQ1_0 keeps element `i` of a block: (byte index, trit index). qs[0..32] hold elements 32n + m,
/// qs[32..48] hold 160 + 16n + m, qh[0..4] (bytes 48..52) hold 240 + 4n + j.
pub(crate) fn tq1_position(i: usize) -> (usize, usize) {
    match i {
        0..160 => (i % 32, i / 32),
        160..240 => (32 + (i - 160) % 16, (i - 160) / 16),
        _ => (48 + (i - 240) % 4, (i - 240) / 4),
    }
}

fn dequantize_tq1_0(b: &[u8], y: &mut [f32]) {
    let d = read_f16(&b[52..54]);
    for (i, y) in y.iter_mut().enumerate() {
        let (byte, n) = tq1_position(i);
        *y = (i32::from(tq1_trit(b[byte], n)) - 1) as f32 * d;
    }
}

/// I2_S position of flattened element `k`: (byte index, bit shift). Byte j of a 32-byte block holds elements
/// j, 32+j, 64+j, 96+j at bits 7:6, 5:4, 3:2, 1:0.
pub(crate) fn i2s_position(k: usize) -> (usize, u32) {
    let (block, j) = (k / I2S_BLOCK, k % I2S_BLOCK);
    (block * 32 + j % 32, 6 - 2 * (j / 32) as u32)
}

/// The I2_S scale: the f32 right after the codes of `n_elements` weights.
pub(crate) fn i2s_scale(data: &[u8], n_elements: usize) -> f32 {
    let at = n_elements / 4;
    f32::from_le_bytes([data[at], data[at + 1], data[at + 2], data[at + 3]])
}

/// 2-bit unsigned code (code + 1) to ternary code; 3 is not a valid code.
pub(crate) fn ternary_from_u2(u: u8) -> Result<i8> {
    match u {
        0..=2 => Ok(u as i8 - 1),
        _ => Err(invalid("2-bit ternary code 3 is not valid (codes are 0, 1, 2 for -1, 0, +1)".into())),
    }
}

fn dequantize_i2_s(data: &[u8], out: &mut [f32]) -> Result<()> {
    let codes_bytes = data.len().checked_sub(I2S_SCALE_BYTES).filter(|n| n % 32 == 0).ok_or_else(|| {
        invalid(format!("I2_S data of {} bytes is not whole 32-byte blocks plus a scale block", data.len()))
    })?;
    let n = codes_bytes * 4;
    if out.len() > n {
        return Err(invalid(format!("I2_S data holds {n} elements, {} requested", out.len())));
    }
    let scale = i2s_scale(data, n);
    for (k, y) in out.iter_mut().enumerate() {
        let (byte, shift) = i2s_position(k);
        *y = f32::from(ternary_from_u2((data[byte] >> shift) & 3)?) * scale;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------------
// Quantization

/// Encode float values into `ty` (F32, F16, BF16, Q8_0, Q5_0, Q4_0, Q6_K, Q4_K; same rounding as ggml's reference
/// quantizers, bit-exact with the `gguf` PyPI package's numpy quantizers where it has them). Ternary types are
/// written by [`crate::tensor::ternary::TernaryMatrix::to_tensor`].
pub fn quantize(ty: GgmlType, src: &[f32]) -> Result<Vec<u8>> {
    let (size, bytes) = ty.layout();
    if !src.len().is_multiple_of(size) {
        return Err(invalid(format!("{} values are not whole {} blocks of {size}", src.len(), ty.name())));
    }
    let encode: fn(&[f32], &mut Vec<u8>) = match ty {
        F32 => |x, out| out.extend_from_slice(&x[0].to_le_bytes()),
        F16 => |x, out| out.extend_from_slice(&f16_bytes(x[0])),
        BF16 => |x, out| out.extend_from_slice(&bf16_bits(x[0]).to_le_bytes()),
        Q8_0 => quantize_q8_0,
        Q5_0 => quantize_q5_0,
        Q4_0 => quantize_q4_0,
        Q6_K => quantize_q6_k,
        Q4_K => quantize_q4_k,
        Q1_0 => quantize_q1_0,
        Q2_0 => quantize_q2_0,
        TQ1_0 | TQ2_0 | I2_S => {
            return Err(invalid(format!(
                "quantize does not write {}; ternary weights are encoded by TernaryMatrix::to_tensor",
                ty.name()
            )))
        }
    };
    let mut out = Vec::with_capacity(src.len() / size * bytes);
    for block in src.chunks_exact(size) {
        encode(block, &mut out);
    }
    Ok(out)
}

/// ggml_compute_fp32_to_bf16: round to nearest even; NaN stays NaN (made quiet).
fn bf16_bits(x: f32) -> u16 {
    let u = x.to_bits();
    if u & 0x7fff_ffff > 0x7f80_0000 {
        return ((u >> 16) | 64) as u16;
    }
    ((u64::from(u) + 0x7fff + u64::from((u >> 16) & 1)) >> 16) as u16
}

/// The signed value of largest magnitude (the first one on ties), as ggml's Q4_0/Q5_0 pick it.
fn signed_absmax(x: &[f32]) -> f32 {
    let (mut amax, mut max) = (0.0f32, 0.0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    max
}

fn inverse_or_zero(d: f32) -> f32 {
    if d != 0.0 {
        1.0 / d
    } else {
        0.0
    }
}

/// ggml's `quantize_row_q1_0_ref`: d = mean |x| (summed in order), a set bit for x ≥ 0.
fn quantize_q1_0(x: &[f32], out: &mut Vec<u8>) {
    let sum_abs = x.iter().fold(0.0f32, |s, v| s + v.abs());
    out.extend_from_slice(&f16_bytes(sum_abs / QK1_0 as f32));
    for byte in x.chunks_exact(8) {
        out.push(byte.iter().enumerate().fold(0u8, |b, (i, &v)| b | (u8::from(v >= 0.0) << i)));
    }
}

/// ggml's `quantize_row_q2_0_ref`: d = max |x|, u = clamp(roundf(x/d) + 1, 0, 3) (roundf: half away from zero).
fn quantize_q2_0(x: &[f32], out: &mut Vec<u8>) {
    let amax = x.iter().fold(0.0f32, |a, v| if v.abs() > a { v.abs() } else { a });
    let id = if amax > 0.0 { 1.0 / amax } else { 0.0 };
    out.extend_from_slice(&f16_bytes(amax));
    for four in x.chunks_exact(4) {
        out.push(four.iter().enumerate().fold(0u8, |b, (i, &w)| {
            let u = ((w * id).round() as i32 + 1).clamp(0, 3) as u8;
            b | (u << (2 * i))
        }));
    }
}

fn quantize_q8_0(x: &[f32], out: &mut Vec<u8>) {
    let amax = x.iter().fold(0.0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = inverse_or_zero(d);
    out.extend_from_slice(&f16_bytes(d));
    // C's roundf: half away from zero, which is Rust's f32::round.
    out.extend(x.iter().map(|&v| (v * id).round() as i8 as u8));
}

/// Q4_0/Q5_0 level of `v`: C's `MIN(max_level, (int8_t)(v*id + offset))`.
fn level(v: f32, id: f32, offset: f32, max_level: i8) -> u8 {
    ((v * id + offset) as i8).min(max_level) as u8
}

fn quantize_q4_0(x: &[f32], out: &mut Vec<u8>) {
    let d = signed_absmax(x) / -8.0;
    let id = inverse_or_zero(d);
    out.extend_from_slice(&f16_bytes(d));
    for j in 0..16 {
        out.push(level(x[j], id, 8.5, 15) | (level(x[j + 16], id, 8.5, 15) << 4));
    }
}

fn quantize_q5_0(x: &[f32], out: &mut Vec<u8>) {
    let d = signed_absmax(x) / -16.0;
    let id = inverse_or_zero(d);
    let q: Vec<u8> = x.iter().map(|&v| level(v, id, 16.5, 31)).collect();
    // Bit 4 of element j goes to bit j of qh.
    let qh = q.iter().enumerate().fold(0u32, |h, (j, &l)| h | (u32::from(l >> 4) << j));
    out.extend_from_slice(&f16_bytes(d));
    out.extend_from_slice(&qh.to_le_bytes());
    out.extend((0..16).map(|j| (q[j] & 0x0f) | ((q[j + 16] & 0x0f) << 4)));
}

/// ggml's make_qx_quants with rmse_type 1 and no importance weights (the Q6_K reference): a symmetric scale for
/// levels -nmax..nmax-1, searched around -nmax/max to minimise the x²-weighted squared error. Writes
/// levels + nmax into `l_out`; returns the scale.
fn make_qx_quants(nmax: i32, x: &[f32], l_out: &mut [i8]) -> f32 {
    let (mut amax, mut max) = (0.0f32, 0.0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax < 1e-15 {
        l_out.fill(0);
        return 0.0;
    }
    let level = |iscale: f32, v: f32| nearest_int(iscale * v).clamp(-nmax, nmax - 1);
    // Weighted sums for levels at `iscale`: (Σ w·x·l, Σ w·l²), w = x².
    let sums = |iscale: f32| {
        let (mut sumlx, mut suml2) = (0.0f32, 0.0f32);
        for &v in x {
            let (l, w) = (level(iscale, v) as f32, v * v);
            sumlx += w * v * l;
            suml2 += w * l * l;
        }
        (sumlx, suml2)
    };
    let store = |iscale: f32, l_out: &mut [i8]| {
        for (o, &v) in l_out.iter_mut().zip(x) {
            *o = (nmax + level(iscale, v)) as i8;
        }
    };
    let iscale = -nmax as f32 / max;
    store(iscale, l_out);
    let (sumlx, suml2) = sums(iscale);
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in (-9..=9).filter(|&is| is != 0) {
        let iscale = -(nmax as f32 + 0.1 * is as f32) / max;
        let (sumlx, suml2) = sums(iscale);
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            store(iscale, l_out);
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

fn quantize_q6_k(x: &[f32], out: &mut Vec<u8>) {
    let mut l = [0i8; QK_K];
    let mut scales = [0.0f32; 16];
    let (mut max_scale, mut max_abs_scale) = (0.0f32, 0.0f32);
    for (ib, s) in scales.iter_mut().enumerate() {
        *s = make_qx_quants(32, &x[16 * ib..16 * ib + 16], &mut l[16 * ib..16 * ib + 16]);
        if s.abs() > max_abs_scale {
            max_abs_scale = s.abs();
            max_scale = *s;
        }
    }
    if max_abs_scale < 1e-15 {
        out.extend_from_slice(&[0u8; 210]);
        return;
    }
    let iscale = -128.0 / max_scale;
    let d = f16_bytes(1.0 / iscale);
    let sc: Vec<i8> = scales.iter().map(|&s| nearest_int(iscale * s).min(127) as i8).collect();
    // Requantize against the rounded block scales.
    for (j, &s) in sc.iter().enumerate() {
        let dj = read_f16(&d) * f32::from(s);
        if dj == 0.0 {
            continue;
        }
        for i in 16 * j..16 * j + 16 {
            l[i] = (nearest_int(x[i] / dj).clamp(-32, 31) + 32) as i8;
        }
    }
    let l = l.map(|v| v as u8);
    let (mut ql, mut qh) = ([0u8; 128], [0u8; 64]);
    for h in 0..2 {
        let (l, ql, qh) = (&l[128 * h..], &mut ql[64 * h..], &mut qh[32 * h..]);
        for i in 0..32 {
            ql[i] = (l[i] & 0x0f) | ((l[i + 64] & 0x0f) << 4);
            ql[i + 32] = (l[i + 32] & 0x0f) | ((l[i + 96] & 0x0f) << 4);
            qh[i] = (l[i] >> 4) | ((l[i + 32] >> 4) << 2) | ((l[i + 64] >> 4) << 4) | ((l[i + 96] >> 4) << 6);
        }
    }
    out.extend_from_slice(&ql);
    out.extend_from_slice(&qh);
    out.extend(sc.iter().map(|&s| s as u8));
    out.extend_from_slice(&d);
}

/// ggml's make_qkx2_quants as the Q4_K reference calls it (nmax 15, rmin -1, rdelta 0.1, 20 steps, squared error):
/// an asymmetric fit x ≈ scale·l + min with l in 0..=nmax and min <= 0, searched over 21 candidate ranges.
/// Writes the levels into `l_out`; returns (scale, -min).
fn make_qkx2_quants(x: &[f32], weights: &[f32], l_out: &mut [u8]) -> (f32, f32) {
    const NMAX: i32 = 15;
    let (rmin, rdelta, nstep) = (-1.0f32, 0.1f32, 20);
    let (mut min, mut max) = (x[0], x[0]);
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for (&v, &w) in x.iter().zip(weights).skip(1) {
        min = if v < min { v } else { min };
        max = if v > max { v } else { max };
        sum_w += w;
        sum_x += w * v;
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        l_out.fill(0);
        return (0.0, -min);
    }
    let levels = |iscale: f32, min: f32, l: &mut [u8]| {
        for (l, &v) in l.iter_mut().zip(x) {
            *l = nearest_int(iscale * (v - min)).clamp(0, NMAX) as u8;
        }
    };
    let error = |scale: f32, min: f32, l: &[u8]| {
        let mut e = 0.0f32;
        for ((&l, &v), &w) in l.iter().zip(x).zip(weights) {
            let diff = scale * f32::from(l) + min - v;
            e += w * (diff * diff);
        }
        e
    };
    let iscale = NMAX as f32 / (max - min);
    let mut scale = 1.0 / iscale;
    levels(iscale, min, l_out);
    let mut best_error = error(scale, min, l_out);
    let mut laux = [0u8; 32];
    // As in C, each candidate range starts from the best min found so far.
    for is in 0..=nstep {
        let iscale = (rmin + rdelta * is as f32 + NMAX as f32) / (max - min);
        levels(iscale, min, &mut laux);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0.0f32, 0.0f32, 0.0f32);
        for ((&l, &v), &w) in laux.iter().zip(x).zip(weights) {
            let l = f32::from(l);
            sum_l += w * l;
            sum_l2 += w * l * l;
            sum_xl += w * l * v;
        }
        let det = sum_w * sum_l2 - sum_l * sum_l;
        if det > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let cur_error = error(this_scale, this_min, &laux);
            if cur_error < best_error {
                l_out.copy_from_slice(&laux);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

fn quantize_q4_k(x: &[f32], out: &mut Vec<u8>) {
    let mut l = [0u8; QK_K];
    let (mut scales, mut mins) = ([0.0f32; 8], [0.0f32; 8]);
    let (mut max_scale, mut max_min) = (0.0f32, 0.0f32);
    for j in 0..8 {
        let xs = &x[32 * j..32 * j + 32];
        let sum_x2 = xs.iter().fold(0.0f32, |s, &v| s + v * v);
        let av_x = (sum_x2 / 32.0).sqrt();
        let weights = q4_k_weights(xs, av_x);
        (scales[j], mins[j]) = make_qkx2_quants(xs, &weights, &mut l[32 * j..32 * j + 32]);
        if scales[j] > max_scale {
            max_scale = scales[j];
        }
        if mins[j] > max_min {
            max_min = mins[j];
        }
    }
    let inv_scale = if max_scale > 0.0 { 63.0 / max_scale } else { 0.0 };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let mut packed = [0u8; 12];
    for j in 0..8 {
        // C stores nearest_int into a uint8_t (wrapping) before clamping to 63.
        let ls = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        let lm = (nearest_int(inv_min * mins[j]) as u8).min(63);
        if j < 4 {
            packed[j] = ls;
            packed[j + 4] = lm;
        } else {
            packed[j + 4] = (ls & 0x0f) | ((lm & 0x0f) << 4);
            packed[j - 4] |= (ls >> 4) << 6;
            packed[j] |= (lm >> 4) << 6;
        }
    }
    let (d, dmin) = (f16_bytes(max_scale / 63.0), f16_bytes(max_min / 63.0));
    // Requantize against the rounded sub-block scales and mins.
    for j in 0..8 {
        let (sc, m) = scale_min_k4(j, &packed);
        let dj = read_f16(&d) * f32::from(sc);
        if dj == 0.0 {
            continue;
        }
        let dm = read_f16(&dmin) * f32::from(m);
        for i in 32 * j..32 * j + 32 {
            l[i] = nearest_int((x[i] + dm) / dj).clamp(0, 15) as u8;
        }
    }
    out.extend_from_slice(&d);
    out.extend_from_slice(&dmin);
    out.extend_from_slice(&packed);
    for chunk in l.chunks_exact(64) {
        out.extend((0..32).map(|i| chunk[i] | (chunk[i + 32] << 4)));
    }
}

/// Q4_K's per-element weights: the sub-block's RMS plus |x|.
fn q4_k_weights(xs: &[f32], av_x: f32) -> [f32; 32] {
    let mut w = [0.0f32; 32];
    for (w, &v) in w.iter_mut().zip(xs) {
        *w = av_x + v.abs();
    }
    w
}
