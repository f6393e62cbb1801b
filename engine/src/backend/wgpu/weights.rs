//! Model weights on the device, uploaded once.
//!
//! Ternary matrices keep the engine layout (read as vec4<u32>); the three attention projections share
//! one buffer (one GEMV over q, k and v rows), and gate and up rows are interleaved so that one workgroup
//! sees both halves of each act(gate)·up product. Projections in ggml blocks (Q1_0, Q2_0, Q8_0: Qwen3)
//! are stacked and interleaved the same way, each block's bits split from its f16 scale (see
//! [`LinearGpu::upload_blocks`]). Float matrices keep F16/BF16 as they are; Q8_0, Q5_0
//! and Q4_0 become int8 blocks with f32 scales (the same values: checked while repacking); anything else
//! is decoded to F32.

use std::ops::Range;

use half::f16;

use super::gpu::Gpu;
use super::kernels::TernaryParams;
use crate::format::quant::GgmlType;
use crate::tensor::float::FloatMatrix;
use crate::tensor::ternary::TernaryMatrix;
use crate::{Error, Result};

/// A projection's matrix (or several stacked) on the device, with the parameters of its GEMV: ternary
/// (`params.ty` 0, ternary.wgsl) or in ggml blocks (`params.ty` one of the `TY_*`, blocks.wgsl).
pub(crate) struct LinearGpu {
    pub buf: wgpu::Buffer,
    pub params: TernaryParams,
}

impl LinearGpu {
    /// Rows of `parts` stacked in order (up to three, each with its own scale), or interleaved
    /// (two parts: gate row i at 2i, up row i at 2i+1).
    pub fn upload(gpu: &Gpu, label: &str, parts: &[&TernaryMatrix], interleave: bool) -> Result<Self> {
        let first = parts[0];
        assert!(parts.len() <= 3 && parts.iter().all(|m| m.cols == first.cols), "same input width");
        let stride = first.padded_cols() / 4;
        let rows: usize = parts.iter().map(|m| m.rows).sum();
        let mut bytes = Vec::with_capacity(rows * stride);
        if interleave {
            for r in 0..first.rows {
                bytes.extend_from_slice(parts[0].row(r));
                bytes.extend_from_slice(parts[1].row(r));
            }
        } else {
            parts.iter().for_each(|m| bytes.extend_from_slice(&m.data));
        }
        if bytes.len() as u64 > gpu.max_binding() {
            return Err(Error::Gpu(format!("{label}: {} bytes exceed the largest storage binding", bytes.len())));
        }
        let scale = |i: usize| parts.get(i).map_or(0.0, |m| m.scale);
        let seg1 = first.rows;
        let params = TernaryParams {
            rows: rows as u32,
            k: first.cols as u32,
            vpr: (stride / 16) as u32,
            seg1: seg1 as u32,
            seg2: (seg1 + parts.get(1).map_or(0, |m| m.rows)) as u32,
            scale0: scale(0),
            scale1: scale(1),
            scale2: scale(2),
            ..Default::default()
        };
        Ok(LinearGpu { buf: gpu.storage(label, &bytes), params })
    }
}

/// blocks.wgsl's weight types (`TernaryParams::ty`).
pub(crate) const TY_Q1_0: u32 = 1;
pub(crate) const TY_Q2_0: u32 = 2;
pub(crate) const TY_Q8_0: u32 = 3;

impl LinearGpu {
    /// Matrices in ggml blocks (all of one type and width), stacked or interleaved as [`LinearGpu::upload`]
    /// does. A row becomes its blocks' bits, one vec4<u32> per Q1_0 (128 signs) or Q2_0 block (64 codes),
    /// two per Q8_0 block (32 int8), as the file stores them; the blocks' f16 scales follow all the rows,
    /// as f32 (exact), from vec4 `d_off` on: row r's block b at word `4·d_off + r·blocks + b`.
    pub fn upload_blocks(gpu: &Gpu, label: &str, parts: &[&FloatMatrix], interleave: bool) -> Result<Self> {
        let first = parts[0];
        assert!(parts.iter().all(|m| m.cols == first.cols && m.ty == first.ty), "same type and width");
        let (ty, vec4s) = match first.ty {
            GgmlType::Q1_0 => (TY_Q1_0, 1),
            GgmlType::Q2_0 => (TY_Q2_0, 1),
            GgmlType::Q8_0 => (TY_Q8_0, 2),
            other => return Err(Error::Unsupported(format!("{label}: {} projections on wgpu", other.name()))),
        };
        let order: Vec<(&FloatMatrix, usize)> = match interleave {
            true => (0..first.rows).flat_map(|r| [(parts[0], r), (parts[1], r)]).collect(),
            false => parts.iter().flat_map(|&m| (0..m.rows).map(move |r| (m, r))).collect(),
        };
        let block_bytes = first.ty.block_bytes(); // the f16 scale, then the bits
        let blocks = first.row_bytes / block_bytes;
        let (mut bits, mut scales) = (Vec::new(), Vec::new());
        for (m, r) in order.iter().copied() {
            for b in m.row(r).chunks_exact(block_bytes) {
                bits.extend_from_slice(&b[2..]);
                scales.push(f16::from_le_bytes([b[0], b[1]]).to_f32());
            }
        }
        let d_off = bits.len() / 16;
        bits.extend_from_slice(bytemuck::cast_slice(&scales));
        if bits.len() as u64 > gpu.max_binding() {
            return Err(Error::Gpu(format!("{label}: {} bytes exceed the largest storage binding", bits.len())));
        }
        let params = TernaryParams {
            rows: order.len() as u32,
            k: first.cols as u32,
            vpr: (blocks * vec4s) as u32,
            ty,
            d_off: d_off as u32,
            ..Default::default()
        };
        Ok(LinearGpu { buf: gpu.storage(label, &bits), params })
    }
}

/// How a float matrix's rows are stored on the device (float.wgsl's FORMAT).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Format {
    F32 = 0,
    F16 = 1,
    BF16 = 2,
    /// 32-element blocks of int8 with one f32 scale each.
    Q8 = 3,
}

impl Format {
    /// Elements per vec4<u32>.
    pub fn per_vec4(self) -> usize {
        match self {
            Format::F32 => 4,
            Format::F16 | Format::BF16 => 8,
            Format::Q8 => 16,
        }
    }
}

/// A contiguous range of rows in buffers of their own (`d`: the Q8 block scales, else a dummy).
pub(crate) struct Shard {
    pub rows: Range<usize>,
    pub m: wgpu::Buffer,
    pub d: wgpu::Buffer,
}

pub(crate) struct FloatGpu {
    pub format: Format,
    pub cols: usize,
    /// vec4<u32> per row.
    pub vpr: usize,
    pub shards: Vec<Shard>,
}

impl FloatGpu {
    pub fn upload(gpu: &Gpu, label: &str, m: &FloatMatrix) -> Result<Self> {
        let native = match m.ty {
            GgmlType::F16 if m.cols.is_multiple_of(8) => Some(Format::F16),
            GgmlType::BF16 if m.cols.is_multiple_of(8) => Some(Format::BF16),
            GgmlType::Q8_0 | GgmlType::Q5_0 | GgmlType::Q4_0 if q8_lossless(m) => Some(Format::Q8),
            _ => None,
        };
        let format = native.unwrap_or(Format::F32);
        let vpr = m.cols.div_ceil(format.per_vec4());
        let row_bytes = vpr as u64 * 16;
        let rows_per_shard = (gpu.max_shard() / row_bytes) as usize;
        if rows_per_shard == 0 {
            return Err(Error::Gpu(format!(
                "{label}: one row of {row_bytes} bytes exceeds the largest storage binding"
            )));
        }
        let mut shards = Vec::new();
        for start in (0..m.rows).step_by(rows_per_shard) {
            let rows = start..(start + rows_per_shard).min(m.rows);
            let (data, scales) = match format {
                Format::F16 | Format::BF16 => {
                    (m.data[rows.start * m.row_bytes..rows.end * m.row_bytes].to_vec(), vec![])
                }
                Format::Q8 => to_q8(m, rows.clone()),
                Format::F32 => (to_f32(m, rows.clone(), vpr * 4), vec![]),
            };
            let d = bytemuck::cast_slice::<f32, u8>(&scales);
            shards.push(Shard { m: gpu.storage(label, &data), d: gpu.storage(label, d), rows });
        }
        gpu.check(label)?;
        Ok(FloatGpu { format, cols: m.cols, vpr, shards })
    }
}

/// Rows decoded to f32, each zero-padded to `padded` columns.
fn to_f32(m: &FloatMatrix, rows: Range<usize>, padded: usize) -> Vec<u8> {
    let mut out = vec![0f32; rows.len() * padded];
    for (r, o) in rows.zip(out.chunks_exact_mut(padded)) {
        m.dequantize_row(r, o);
    }
    bytemuck::cast_slice(&out).to_vec()
}

/// The int8 of `v` in a block of scale `d`, if `v` is exactly that int8 times `d`.
fn as_int8(v: f32, d: f32) -> Option<i8> {
    if d == 0.0 {
        return (v == 0.0).then_some(0);
    }
    let q = (v / d).round();
    ((-128.0..=127.0).contains(&q) && q * d == v).then_some(q as i8)
}

/// Row `r` of a Q8_0/Q5_0/Q4_0 matrix as (block scales, int8 values), if every value is an int8 times
/// its block's scale `d` (the f16 at the start of each block), so that the int8 layout changes nothing.
fn q8_row(m: &FloatMatrix, r: usize) -> Option<(Vec<f32>, Vec<i8>)> {
    let mut values = vec![0f32; m.cols];
    m.dequantize_row(r, &mut values);
    let (mut ds, mut qs) = (Vec::new(), Vec::with_capacity(m.cols));
    for (block, v) in m.row(r).chunks_exact(m.ty.block_bytes()).zip(values.chunks_exact(32)) {
        let d = f16::from_le_bytes([block[0], block[1]]).to_f32();
        ds.push(d);
        for &x in v {
            qs.push(as_int8(x, d)?);
        }
    }
    Some((ds, qs))
}

fn q8_lossless(m: &FloatMatrix) -> bool {
    m.cols.is_multiple_of(32) && (0..m.rows).all(|r| q8_row(m, r).is_some())
}

fn to_q8(m: &FloatMatrix, rows: Range<usize>) -> (Vec<u8>, Vec<f32>) {
    let (mut qs, mut ds) = (Vec::new(), Vec::new());
    for r in rows {
        let (d, q) = q8_row(m, r).expect("checked by q8_lossless");
        ds.extend(d);
        qs.extend(q.iter().map(|&q| q as u8));
    }
    (qs, ds)
}
