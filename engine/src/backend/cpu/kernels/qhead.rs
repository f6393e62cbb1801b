//! The opt-in quantized LM head (`LoadOptions::head`, `--head q8_0|q6_k`): the head's values are
//! exactly those of ggml's Q8_0 or Q6_K encoding of it, and the activations are quantized to int8 too
//! (one scale per block, as llama.cpp does for its quantized matrices), so that the dot products are
//! integer: `vpdpbusd` does 64 multiply-adds in one instruction where a float head needs a conversion
//! and an FMA per 16 values. The head is most of the bytes a token reads; this makes it memory-bound.
//!
//! Layout ("lanes"): a row is cut into groups of 16 blocks, block `j` of a group feeding i32 lane `j`
//! of a 512-bit accumulator. A block has `L` values (32 for Q8_0; 16, a Q6_K sub-block, for Q6_K),
//! taken 4 at a time: step `k` of a group holds values `4k..4k+4` of each of its blocks, i.e. byte
//! `4·J·k + 4j + e` is value `L·j + 4k + e` (J = blocks in the group, 16 except in a short last group).
//! The activations are stored in the same order, so a step is one plain load of each.
//! - Q8_0 group (J blocks): `32·J` bytes of `u = q + 128`, then the J f16 scales `d`.
//!   Row value = d·q.
//! - Q6_K group (one 256-value super-block, J = 16): 128 bytes of nibbles (byte `i` of the first 64:
//!   steps 0 and 1 at bits 0-3 and 4-7; of the next 64: steps 2 and 3), 64 bytes of high bits (byte `i`:
//!   bits `2k..2k+2` for step `k`), the 16 int8 sub-block scales, the f16 `d`. Row value =
//!   d·scale·(q − 32), q in 0..64.
//!
//! Each block's integer dot is `Σ u·x − offset·Σ x` (offset 128 or 32): the activation sums are
//! computed once per vector, so the weights can be unsigned, as `vpdpbusd` wants them.
//!
//! Narrower vectors read the same layout: a 64-byte step is two 32-byte vectors of 8 whole blocks
//! (AVX2) or four 16-byte vectors of 4 (NEON, SIMD128), each still one block per i32 lane. Kernels
//! without an unsigned-by-signed dot take a Q8_0 weight as `q = u ^ 0x80` (signed) and sum `q·x`
//! directly, which needs no correction; two such products fit an i16 because the activations stay
//! within ±127 (see [`HeadActivations`]).

use std::ops::Range;

use rayon::prelude::*;

use crate::format::quant::GgmlType;
use crate::{Error, Result};

/// Blocks per group: one per i32 lane of a 512-bit register.
pub const LANES: usize = 16;

/// A quantized LM head in the lane layout.
#[derive(Clone, Debug)]
pub struct QuantHead {
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
    pub row_bytes: usize,
    pub data: Vec<u8>,
}

/// Values per block: what one i32 lane sums.
pub fn block_len(ty: GgmlType) -> usize {
    if ty == GgmlType::Q6_K {
        16
    } else {
        32
    }
}

/// The unsigned offset of the stored values.
pub fn offset(ty: GgmlType) -> i32 {
    if ty == GgmlType::Q6_K {
        32
    } else {
        128
    }
}

/// Where value `c` of a row sits in lane order, for blocks of `l` values.
pub fn lane_position(c: usize, cols: usize, l: usize) -> usize {
    let group = LANES * l;
    let (g, i) = (c / group, c % group);
    let j_count = ((cols - g * group) / l).min(LANES);
    let (j, v) = (i / l, i % l);
    g * group + 4 * j_count * (v / 4) + 4 * j + v % 4
}

impl QuantHead {
    /// The bytes of a ggml `ty` row of `cols` values, where `ty` is a head type (Q8_0 or Q6_K) that can
    /// encode such rows.
    pub fn ggml_row_bytes(ty: GgmlType, cols: usize) -> Result<usize> {
        ty.row_bytes(cols).filter(|_| matches!(ty, GgmlType::Q8_0 | GgmlType::Q6_K)).ok_or_else(|| {
            Error::Invalid(format!(
                "a {} LM head of rows of {cols} values is not possible (q8_0: multiples of 32, q6_k: of 256)",
                ty.name()
            ))
        })
    }

    /// Repacks rows already encoded as ggml Q8_0 or Q6_K (`rows × row_bytes(ty, cols)`).
    pub fn from_ggml(ty: GgmlType, rows: usize, cols: usize, ggml: &[u8]) -> Result<Self> {
        let src_row = Self::ggml_row_bytes(ty, cols)?;
        if ggml.len() != rows * src_row {
            return Err(Error::Invalid(format!(
                "{} head data of {} bytes, expected {}",
                ty.name(),
                ggml.len(),
                rows * src_row
            )));
        }
        let mut data = vec![0u8; rows * src_row];
        data.par_chunks_mut(src_row).zip(ggml.par_chunks(src_row)).for_each(|(dst, src)| match ty {
            GgmlType::Q8_0 => pack_q8_0_row(src, cols, dst),
            _ => pack_q6_k_row(src, dst),
        });
        Ok(QuantHead { ty, rows, cols, row_bytes: src_row, data })
    }

    pub fn row(&self, r: usize) -> &[u8] {
        &self.data[r * self.row_bytes..(r + 1) * self.row_bytes]
    }
}

/// Q8_0 (blocks of f16 d + 32 int8) into groups of `32·J` lane-ordered `q + 128` bytes and J scales.
fn pack_q8_0_row(src: &[u8], cols: usize, dst: &mut [u8]) {
    let blocks = cols / 32;
    for g in 0..blocks.div_ceil(LANES) {
        let j_count = (blocks - g * LANES).min(LANES);
        let out = &mut dst[g * LANES * 34..];
        for j in 0..j_count {
            let b = &src[(g * LANES + j) * 34..][..34];
            for v in 0..32 {
                out[4 * j_count * (v / 4) + 4 * j + v % 4] = (b[2 + v] as i8 as i16 + 128) as u8;
            }
            out[32 * j_count + 2 * j..][..2].copy_from_slice(&b[..2]);
        }
    }
}

/// Q6_K (ql[128], qh[64], scales[16], d) into the lane layout; see the module notes.
fn pack_q6_k_row(src: &[u8], dst: &mut [u8]) {
    for (b, out) in src.chunks_exact(210).zip(dst.chunks_exact_mut(210)) {
        let mut q = [0u8; 256];
        for (i, q) in q.iter_mut().enumerate() {
            *q = q6_k_value(b, i);
        }
        out[..192].fill(0);
        for s in 0..LANES {
            for v in 0..16 {
                let (k, byte) = (v / 4, 4 * s + v % 4);
                let u = q[16 * s + v];
                out[64 * (k / 2) + byte] |= (u & 0x0f) << (4 * (k % 2));
                out[128 + byte] |= (u >> 4) << (2 * k);
            }
        }
        out[192..210].copy_from_slice(&b[192..210]);
    }
}

/// Value `i` (0..256) of a ggml Q6_K block, as stored: q in 0..64 (the value is d·scale·(q − 32)).
fn q6_k_value(b: &[u8], i: usize) -> u8 {
    let (half, i) = (i / 128, i % 128);
    let (ql, qh) = (&b[64 * half..], &b[128 + 32 * half..]);
    let (run, l) = (i / 32, i % 32);
    let nibble = match run {
        0 => ql[l] & 0x0f,
        1 => ql[l + 32] & 0x0f,
        2 => ql[l] >> 4,
        _ => ql[l + 32] >> 4,
    };
    nibble | (((qh[l] >> (2 * run)) & 3) << 4)
}

/// Activations quantized for a [`QuantHead`]: int8 in lane order, a scale and a sum per block.
/// The int8 values are within −127..=127 (never −128), which the kernels rely on.
#[derive(Clone, Debug, Default)]
pub struct HeadActivations {
    pub q: Vec<i8>,
    /// Per block: x ≈ d·q.
    pub d: Vec<f32>,
    /// Per block: `offset · Σ q`, what the unsigned weights add to the integer dot.
    pub corr: Vec<i32>,
}

impl HeadActivations {
    /// Quantizes `x` for `h`: per block, `d = max|x| / 127`, `q = round(x / d)`.
    pub fn quantize(&mut self, h: &QuantHead, x: &[f32]) {
        let l = block_len(h.ty);
        let blocks = h.cols / l;
        self.q.resize(h.cols, 0);
        self.d.resize(blocks, 0.0);
        self.corr.resize(blocks, 0);
        let mut q = [0i8; 32];
        for (b, x) in x[..h.cols].chunks_exact(l).enumerate() {
            self.d[b] = super::quantize_block(x, &mut q[..l]);
            for (v, &q) in q[..l].iter().enumerate() {
                self.q[lane_position(b * l + v, h.cols, l)] = q;
            }
            self.corr[b] = offset(h.ty) * q[..l].iter().map(|&q| q as i32).sum::<i32>();
        }
    }
}

/// The bounds that every kernel's `quant_head_rows` checks first: its unchecked reads stay inside them.
pub fn check_args(h: &QuantHead, rows: &Range<usize>, a: &HeadActivations, out: &[f32]) {
    let blocks = h.cols / block_len(h.ty);
    assert!(rows.end <= h.rows && a.q.len() >= h.cols && a.d.len() >= blocks && a.corr.len() >= blocks);
    assert!(out.len() >= rows.len() && matches!(h.ty, GgmlType::Q8_0 | GgmlType::Q6_K));
    assert!(h.data.len() >= h.rows * h.row_bytes);
}

/// The reference: `out[i] = Σ_blocks scale(block) · d_x(block) · (Σ u·x − offset·Σ x)`.
pub fn reference_rows(h: &QuantHead, rows: Range<usize>, a: &HeadActivations, out: &mut [f32]) {
    let l = block_len(h.ty);
    for (o, r) in out.iter_mut().zip(rows) {
        let row = h.row(r);
        let mut acc = 0f32;
        for b in 0..h.cols / l {
            let mut dot = 0i32;
            for v in 0..l {
                let pos = lane_position(b * l + v, h.cols, l);
                dot += stored_value(h, row, pos) as i32 * a.q[pos] as i32;
            }
            acc += block_scale(h, row, b) * a.d[b] * (dot - a.corr[b]) as f32;
        }
        *o = acc;
    }
}

/// The unsigned weight at lane-order position `pos` of a row.
fn stored_value(h: &QuantHead, row: &[u8], pos: usize) -> u8 {
    match h.ty {
        GgmlType::Q6_K => {
            let (g, i) = (pos / 256, pos % 256);
            let b = &row[210 * g..];
            let (k, byte) = (i / 64, i % 64);
            let nibble = (b[64 * (k / 2) + byte] >> (4 * (k % 2))) & 0x0f;
            nibble | (((b[128 + byte] >> (2 * k)) & 3) << 4)
        }
        _ => {
            let g = pos / (LANES * 32);
            row[g * LANES * 34 + pos % (LANES * 32)]
        }
    }
}

/// The float sum of a vector of fewer than all its lanes (a short last group's last vector), lane by
/// lane: `dots[l]` is the kernel's integer sum for block `first + l` of row `r`, `Σ u·x` (then
/// `unsigned`, and the activations' `corr` is still to subtract) or the signed `Σ q·x`.
pub fn scale_lanes(h: &QuantHead, r: usize, first: usize, dots: &[i32], a: &HeadActivations, unsigned: bool) -> f32 {
    let row = h.row(r);
    let corr = |b: usize| if unsigned { a.corr[b] } else { 0 };
    (first..).zip(dots).map(|(b, &dot)| block_scale(h, row, b) * a.d[b] * (dot - corr(b)) as f32).sum()
}

/// The float factor of block `b` of a row: d (Q8_0) or d·scale (Q6_K).
fn block_scale(h: &QuantHead, row: &[u8], b: usize) -> f32 {
    let f16 = |p: &[u8]| half::f16::from_le_bytes([p[0], p[1]]).to_f32();
    match h.ty {
        GgmlType::Q6_K => {
            let blk = &row[210 * (b / 16)..];
            f16(&blk[208..]) * blk[192 + b % 16] as i8 as f32
        }
        _ => {
            let (g, j) = (b / LANES, b % LANES);
            let j_count = (h.cols / 32 - g * LANES).min(LANES);
            f16(&row[g * LANES * 34 + 32 * j_count + 2 * j..])
        }
    }
}
