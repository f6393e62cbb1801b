//! Ternary weight matrices in the engine's own 2-bit layout, decoded from (and encoded to) every storage type a
//! BitNet GGUF may use: I2_S (bitnet.cpp), TQ1_0 and TQ2_0 (llama.cpp), or plain F32/F16/BF16.

use half::f16;

use crate::format::quant::{self, i2s_position, i2s_scale, ternary_from_u2, tq1_position, tq1_trit, GgmlType};
use crate::{Error, Result};

/// Columns per 32-byte block of the engine layout.
const BLOCK: usize = 128;
/// Weights per TQ1_0/TQ2_0 block.
const QK_K: usize = 256;
/// Four zero weights (u = code + 1 = 1 in every 2-bit field): the padding byte.
const ZERO_BYTE: u8 = 0x55;

/// A ternary weight matrix (rows × cols, codes in {-1,0,+1}) times one f32 scale: W = codes * scale.
/// Engine layout (chosen for SIMD): each row padded with zero-weights to a multiple of 128 columns; a block of 128
/// columns takes 32 bytes; byte j of a block holds columns j, 32+j, 64+j, 96+j at bits 7:6, 5:4, 3:2, 1:0, as
/// u = code + 1 (I2_S's x86 block layout, applied per row). Row stride = padded_cols / 4 bytes.
#[derive(Clone, Debug, PartialEq)]
pub struct TernaryMatrix {
    pub rows: usize,
    pub cols: usize,
    pub scale: f32,
    pub data: Vec<u8>,
}

fn invalid(reason: String) -> Error {
    Error::Invalid(reason)
}

impl TernaryMatrix {
    /// An all-zero matrix.
    fn zeros(rows: usize, cols: usize, scale: f32) -> Self {
        let stride = cols.div_ceil(BLOCK) * BLOCK / 4;
        TernaryMatrix { rows, cols, scale, data: vec![ZERO_BYTE; rows * stride] }
    }

    /// Build from row-major codes. Panics if `codes.len() != rows * cols` or a code is outside -1..=1
    /// (a programming error: decoded files go through [`TernaryMatrix::from_tensor`], which validates).
    pub fn from_codes(rows: usize, cols: usize, codes: &[i8], scale: f32) -> Self {
        assert_eq!(codes.len(), rows * cols, "from_codes: {rows}x{cols} matrix needs {} codes", rows * cols);
        let mut m = Self::zeros(rows, cols, scale);
        for (k, &t) in codes.iter().enumerate() {
            assert!((-1..=1).contains(&t), "from_codes: code {t} is not ternary");
            m.set(k / cols, k % cols, t);
        }
        m
    }

    /// The matrix whose row `r` is row `src(r)` of this one (`src` a permutation of the rows).
    pub fn gather_rows(&self, src: impl Fn(usize) -> usize) -> Self {
        let stride = self.padded_cols() / 4;
        let mut data = Vec::with_capacity(self.data.len());
        for r in 0..self.rows {
            data.extend_from_slice(self.row(src(r)));
        }
        debug_assert_eq!(data.len(), self.rows * stride);
        TernaryMatrix { data, ..self.clone() }
    }

    /// Columns including the zero padding: a multiple of 128.
    pub fn padded_cols(&self) -> usize {
        self.cols.div_ceil(BLOCK) * BLOCK
    }

    /// The packed bytes of row `r` (padded_cols / 4 of them).
    pub fn row(&self, r: usize) -> &[u8] {
        let stride = self.padded_cols() / 4;
        &self.data[r * stride..(r + 1) * stride]
    }

    /// Byte index and bit shift of (r, c) in `data`.
    fn position(&self, r: usize, c: usize) -> (usize, u32) {
        let (block, j) = (c / BLOCK, c % BLOCK);
        (r * self.padded_cols() / 4 + block * 32 + j % 32, 6 - 2 * (j / 32) as u32)
    }

    pub fn code(&self, r: usize, c: usize) -> i8 {
        let (byte, shift) = self.position(r, c);
        ((self.data[byte] >> shift) & 3) as i8 - 1
    }

    fn set(&mut self, r: usize, c: usize, t: i8) {
        let (byte, shift) = self.position(r, c);
        let b = &mut self.data[byte];
        *b = (*b & !(3 << shift)) | (((t + 1) as u8) << shift);
    }

    /// All codes, row-major, without padding.
    pub fn to_codes(&self) -> Vec<i8> {
        let mut codes = Vec::with_capacity(self.rows * self.cols);
        for r in 0..self.rows {
            codes.extend((0..self.cols).map(|c| self.code(r, c)));
        }
        codes
    }

    /// Decode a GGUF tensor (I2_S, TQ1_0, TQ2_0, or F32/F16/BF16 holding a BitNet weight; see formats.md 'Float-stored
    /// BitNet weights') of `rows` × `cols` (ggml dims [cols, rows]). I2_S by flattened element index (rows may start
    /// inside a 128-block). Errors name the reason (caller adds the tensor name).
    pub fn from_tensor(ty: GgmlType, data: &[u8], rows: usize, cols: usize) -> Result<Self> {
        let n = rows.checked_mul(cols).ok_or_else(|| invalid(format!("{rows}x{cols} elements overflow")))?;
        let expected = ty.tensor_bytes(n as u64).ok_or_else(|| {
            invalid(format!("{rows}x{cols} = {n} elements are not whole {} blocks of {}", ty.name(), ty.block_size()))
        })?;
        if data.len() as u64 != expected {
            return Err(invalid(format!(
                "{} data of {rows}x{cols} should be {expected} bytes, got {}",
                ty.name(),
                data.len()
            )));
        }
        let m = match ty {
            GgmlType::I2_S => Self::from_i2_s(data, rows, cols)?,
            GgmlType::TQ1_0 | GgmlType::TQ2_0 => Self::from_tq(ty, data, rows, cols)?,
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => Self::from_floats(ty, data, rows, cols)?,
            _ => return Err(invalid(format!("type {} does not hold ternary weights", ty.name()))),
        };
        if !m.scale.is_finite() {
            return Err(invalid(format!("scale {} is not finite", m.scale)));
        }
        Ok(m)
    }

    /// I2_S blocks of 128 run over the flattened tensor, so a row may start mid-block: decode element by element.
    fn from_i2_s(data: &[u8], rows: usize, cols: usize) -> Result<Self> {
        let n = rows * cols;
        let mut m = Self::zeros(rows, cols, i2s_scale(data, n));
        for k in 0..n {
            let (byte, shift) = i2s_position(k);
            m.set(k / cols, k % cols, ternary_from_u2((data[byte] >> shift) & 3)?);
        }
        Ok(m)
    }

    /// TQ1_0/TQ2_0 carry one f16 scale d per block of 256; a BitNet weight has one scale per tensor, so every block
    /// holding a non-zero weight must agree on d. Blocks of zero weights (or with d = 0) may carry any d.
    fn from_tq(ty: GgmlType, data: &[u8], rows: usize, cols: usize) -> Result<Self> {
        if !cols.is_multiple_of(QK_K) {
            return Err(invalid(format!("{} rows of {cols} columns are not a multiple of {QK_K}", ty.name())));
        }
        let mut m = Self::zeros(rows, cols, 0.0);
        let mut scale = None;
        let mut codes = [0i8; QK_K];
        for (b, block) in data.chunks_exact(ty.block_bytes()).enumerate() {
            let d = match ty {
                GgmlType::TQ2_0 => decode_tq2_0(block, &mut codes)?,
                _ => decode_tq1_0(block, &mut codes),
            };
            if d == 0.0 || codes.iter().all(|&t| t == 0) {
                continue;
            }
            match scale {
                None => scale = Some(d),
                Some(s) if s != d => {
                    return Err(invalid(format!(
                        "{} blocks have different scales ({s} and {d}): not a per-tensor ternary weight",
                        ty.name()
                    )))
                }
                Some(_) => {}
            }
            for (i, &t) in codes.iter().enumerate() {
                let k = b * QK_K + i;
                m.set(k / cols, k % cols, t);
            }
        }
        m.scale = scale.unwrap_or(0.0);
        Ok(m)
    }

    /// Float-stored weights are either ternary-valued already ({-s, 0, +s}, as converters write them; all non-zero
    /// magnitudes equal up to the storage rounding): codes = sign(w), scale = max|w|. Otherwise they are latent
    /// master weights, ternarized with BitNet's absmean recipe.
    fn from_floats(ty: GgmlType, data: &[u8], rows: usize, cols: usize) -> Result<Self> {
        let mut w = vec![0.0f32; rows * cols];
        quant::dequantize(ty, data, &mut w)?;
        if let Some(bad) = w.iter().find(|v| !v.is_finite()) {
            return Err(invalid(format!("weight {bad} is not finite")));
        }
        let amax = w.iter().fold(0.0f32, |a, v| a.max(v.abs()));
        let (scale, codes): (f32, Vec<i8>) = if ternary_valued(ty, &w) {
            (amax, w.iter().map(|&v| if v == 0.0 { 0 } else { v.signum() as i8 }).collect())
        } else {
            absmean_ternarize(&w)
        };
        Ok(Self::from_codes(rows, cols, &codes, scale))
    }

    /// Encode to I2_S / TQ2_0 / TQ1_0 (TQ: block scale d = f16(scale); error if cols % 256 != 0).
    pub fn to_tensor(&self, ty: GgmlType) -> Result<Vec<u8>> {
        match ty {
            GgmlType::I2_S => self.to_i2_s(),
            GgmlType::TQ1_0 | GgmlType::TQ2_0 => self.to_tq(ty),
            _ => Err(invalid(format!("cannot encode a ternary matrix as {}", ty.name()))),
        }
    }

    fn to_i2_s(&self) -> Result<Vec<u8>> {
        let n = self.rows * self.cols;
        if !n.is_multiple_of(BLOCK) {
            return Err(invalid(format!(
                "I2_S needs a multiple of {BLOCK} elements, {}x{} has {n}",
                self.rows, self.cols
            )));
        }
        let mut out = vec![0u8; n / 4 + 32];
        for (k, t) in self.to_codes().into_iter().enumerate() {
            let (byte, shift) = i2s_position(k);
            out[byte] |= ((t + 1) as u8) << shift;
        }
        out[n / 4..n / 4 + 4].copy_from_slice(&self.scale.to_le_bytes());
        Ok(out)
    }

    fn to_tq(&self, ty: GgmlType) -> Result<Vec<u8>> {
        if !self.cols.is_multiple_of(QK_K) {
            return Err(invalid(format!("{} rows of {} columns are not a multiple of {QK_K}", ty.name(), self.cols)));
        }
        let d = f16::from_f32(self.scale);
        if !d.is_finite() {
            return Err(invalid(format!("scale {} does not fit an f16", self.scale)));
        }
        let codes = self.to_codes();
        let mut out = Vec::with_capacity(codes.len() / QK_K * ty.block_bytes());
        for block in codes.chunks_exact(QK_K) {
            match ty {
                GgmlType::TQ2_0 => out.extend_from_slice(&encode_tq2_0(block)),
                _ => out.extend_from_slice(&encode_tq1_0(block)),
            }
            out.extend_from_slice(&d.to_le_bytes());
        }
        Ok(out)
    }
}

/// BitNet's absmean ternarization: s = max(mean|w|, 1e-5), codes = clamp(round(w / s), -1, 1) with ties to even.
/// The mean is summed in f64 so it does not depend on summation order.
fn absmean_ternarize(w: &[f32]) -> (f32, Vec<i8>) {
    let mean = w.iter().map(|v| f64::from(v.abs())).sum::<f64>() / w.len() as f64;
    let s = (mean as f32).max(1e-5);
    (s, w.iter().map(|&v| (v / s).round_ties_even().clamp(-1.0, 1.0) as i8).collect())
}

/// Codes of one TQ2_0 block (element 128h + 32l + m at bits 2l of qs[32h + m]); returns d.
fn decode_tq2_0(block: &[u8], codes: &mut [i8; QK_K]) -> Result<f32> {
    for (i, t) in codes.iter_mut().enumerate() {
        let (h, l, m) = (i / 128, (i % 128) / 32, i % 32);
        *t = ternary_from_u2((block[32 * h + m] >> (2 * l)) & 3)?;
    }
    Ok(f16::from_le_bytes([block[64], block[65]]).to_f32())
}

fn encode_tq2_0(codes: &[i8]) -> [u8; 64] {
    let mut qs = [0u8; 64];
    for (i, &t) in codes.iter().enumerate() {
        let (h, l, m) = (i / 128, (i % 128) / 32, i % 32);
        qs[32 * h + m] |= ((t + 1) as u8) << (2 * l);
    }
    qs
}

/// Codes of one TQ1_0 block; returns d.
fn decode_tq1_0(block: &[u8], codes: &mut [i8; QK_K]) -> f32 {
    for (i, t) in codes.iter_mut().enumerate() {
        let (byte, n) = tq1_position(i);
        *t = tq1_trit(block[byte], n) as i8 - 1;
    }
    f16::from_le_bytes([block[52], block[53]]).to_f32()
}

/// TQ1_0 bytes: the trits (code + 1) of a byte form a base-3 number, most significant first (qh bytes hold 4 trits,
/// padded with a trailing 0 trit); the byte stores it as the fixed-point fraction ceil(q * 256 / 243).
fn encode_tq1_0(codes: &[i8]) -> [u8; 52] {
    let mut q = [0u16; 52];
    for (i, &t) in codes.iter().enumerate() {
        let (byte, n) = tq1_position(i);
        q[byte] += (t + 1) as u16 * 3u16.pow(4 - n as u32);
    }
    q.map(|q| (q * 256).div_ceil(243) as u8)
}

/// Whether float weights are ternary-valued ({-s, 0, +s}): all non-zero magnitudes equal up to the storage rounding.
fn ternary_valued(ty: GgmlType, w: &[f32]) -> bool {
    let amax = w.iter().fold(0.0f32, |a, v| a.max(v.abs()));
    // One unit in the last place of the storage type, relative: magnitudes this close to amax are equal.
    let ulp = match ty {
        GgmlType::F16 => 2f32.powi(-10),
        GgmlType::BF16 => 2f32.powi(-7),
        _ => 2f32.powi(-23),
    };
    w.iter().all(|&v| v == 0.0 || amax - v.abs() <= amax * ulp)
}

/// Whether a tensor holds ternary weights: a ternary type (I2_S, TQ1_0, TQ2_0), or floats that are ternary-valued
/// (not latent master weights). Undecodable data answers false.
pub fn holds_ternary(ty: GgmlType, data: &[u8]) -> bool {
    match ty {
        _ if is_ternary_type(ty) => true,
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => {
            let mut w = vec![0.0f32; data.len() / ty.block_bytes() * ty.block_size()];
            quant::dequantize(ty, data, &mut w).is_ok() && ternary_valued(ty, &w)
        }
        _ => false,
    }
}

/// Whether `ty` is a storage type made for ternary weights only (I2_S, TQ1_0, TQ2_0).
pub fn is_ternary_type(ty: GgmlType) -> bool {
    matches!(ty, GgmlType::I2_S | GgmlType::TQ1_0 | GgmlType::TQ2_0)
}

/// llama.cpp's converter stores each head's q/k rows in the order its interleaved RoPE rotates (`permute` in
/// convert_hf_to_gguf.py): row `2i + j` of a head in the file is Hugging Face's row `j * head_dim/2 + i` (the
/// NeoX order every backend here rotates in). The Hugging Face row that file row `r` holds:
pub fn hf_row_of_llama_row(r: usize, head_dim: usize) -> usize {
    let (head, within) = (r / head_dim, r % head_dim);
    head * head_dim + (within % 2) * (head_dim / 2) + within / 2
}

/// The inverse of [`hf_row_of_llama_row`]: the file row that holds Hugging Face row `h`.
pub fn llama_row_of_hf_row(h: usize, head_dim: usize) -> usize {
    let (head, within, half) = (h / head_dim, h % head_dim, head_dim / 2);
    head * head_dim + 2 * (within % half) + within / half
}
