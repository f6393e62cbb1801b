//! Host-side preparation of the weights for the CUDA kernels: ternary rows repacked to 16 columns per u32
//! word (the layout is described in shaders/cuda/bitlinear.cu), rows put in the pairs the kernel epilogues
//! consume, rotary tables, and the float matrices as f16.

use half::f16;
use rayon::prelude::*;

use crate::format::quant::GgmlType;
use crate::model::Config;
use crate::tensor::float::FloatMatrix;
use crate::tensor::ternary::TernaryMatrix;

/// Columns of the prompt GEMM's K tile: packed rows are padded to a multiple of it.
const TILE_COLS: usize = 64;

/// Packed words per row of `cols` columns.
pub fn words(cols: usize) -> usize {
    cols.div_ceil(TILE_COLS) * TILE_COLS / 16
}

/// Bit position of column `c` (of 16) inside its packed word.
fn shift(c: usize) -> u32 {
    (8 * (c % 4) + 2 * (c / 4)) as u32
}

/// Row `r` of `m` in the GPU layout: `out` holds `words(m.cols)` words; padding columns get code 0.
pub fn pack_row(m: &TernaryMatrix, r: usize, out: &mut [u32]) {
    out.fill(0x5555_5555); // u = 1 everywhere: code 0
                           // Engine layout: a 128-column block is 32 bytes; byte j holds columns j, 32+j, 64+j, 96+j at bits 7:6 .. 1:0.
    for (b, block) in m.row(r).chunks_exact(32).enumerate() {
        for (j, &byte) in block.iter().enumerate() {
            for g in 0..4 {
                let col = b * 128 + 32 * g + j;
                if col < m.cols {
                    let u = ((byte >> (6 - 2 * g)) & 3) as u32;
                    let (w, s) = (&mut out[col / 16], shift(col % 16));
                    *w = (*w & !(3 << s)) | (u << s);
                }
            }
        }
    }
}

/// Rows gathered from one or more matrices of `cols` columns, in the order the kernels read them.
pub struct Packed {
    pub words: usize,
    pub data: Vec<u32>,
    /// Each packed row's scale (rows of one launch may come from matrices with different scales).
    pub scales: Vec<f32>,
}

pub fn pack(rows: &[(&TernaryMatrix, usize)], cols: usize) -> Packed {
    let words = words(cols);
    let mut data = vec![0u32; rows.len() * words];
    data.par_chunks_mut(words).zip(rows).for_each(|(out, &(m, r))| pack_row(m, r, out));
    Packed { words, data, scales: rows.iter().map(|&(m, _)| m.scale).collect() }
}

/// The pairs of the fused q/k/v matrix (rows q, then k, then v, as the CPU numbers them): for each q and k
/// head its rotary pairs (j, j + rope_dim/2), then its unrotated rest as neighbours; v rows as neighbours.
/// Returns each packed row's original row and each pair's rotary frequency index (-1: not rotated).
pub fn qkv_pairs(c: &Config) -> (Vec<i32>, Vec<i32>) {
    let (hd, half) = (c.head_dim, c.rope_dim / 2);
    let (mut dst, mut rope) = (Vec::new(), Vec::new());
    for head in 0..c.n_head + c.n_head_kv {
        let base = head * hd;
        for j in 0..half {
            dst.extend([base + j, base + j + half]);
            rope.push(j as i32);
        }
        for j in (c.rope_dim..hd).step_by(2) {
            dst.extend([base + j, base + j + 1]);
            rope.push(-1);
        }
    }
    let v0 = (c.n_head + c.n_head_kv) * hd;
    for r in (v0..v0 + c.n_head_kv * hd).step_by(2) {
        dst.extend([r, r + 1]);
        rope.push(-1);
    }
    (dst.into_iter().map(|r| r as i32).collect(), rope)
}

/// A float matrix as f16 bits: F16 as stored, every other type decoded and rounded to f16.
pub fn to_f16(m: &FloatMatrix) -> Vec<u16> {
    let mut out = vec![0u16; m.rows * m.cols];
    if m.ty == GgmlType::F16 {
        out.iter_mut().zip(m.data.chunks_exact(2)).for_each(|(o, b)| *o = u16::from_le_bytes([b[0], b[1]]));
        return out;
    }
    out.par_chunks_mut(m.cols).enumerate().for_each(|(r, o)| {
        let mut row = vec![0f32; m.cols];
        m.dequantize_row(r, &mut row);
        o.iter_mut().zip(&row).for_each(|(o, &v)| *o = f16::from_f32(v).to_bits());
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The dot product the GPU computes from a packed row (dp4a on u = code + 1, minus Σx), on the CPU.
    fn packed_dot(words: &[u32], xq: &[i8]) -> i32 {
        let sum_x: i32 = xq.iter().map(|&v| v as i32).sum();
        let mut acc = 0;
        for (w, x) in words.iter().zip(xq.chunks_exact(16)) {
            for g in 0..4 {
                let lanes = (w >> (2 * g)) & 0x0303_0303;
                for k in 0..4 {
                    acc += ((lanes >> (8 * k)) & 0xff) as i32 * x[4 * g + k] as i32;
                }
            }
        }
        acc - sum_x
    }

    #[test]
    fn packed_rows_give_the_scalar_dot_products() {
        let (rows, cols) = (5, 200); // not a multiple of 64 or 128
        let codes: Vec<i8> = (0..rows * cols).map(|i| ((i * 7 + i / 3) % 3) as i8 - 1).collect();
        let m = TernaryMatrix::from_codes(rows, cols, &codes, 0.5);
        let xq: Vec<i8> =
            (0..words(cols) * 16).map(|i| if i < cols { (i as i32 * 37 % 255 - 127) as i8 } else { 0 }).collect();
        let p = pack(&(0..rows).map(|r| (&m, r)).collect::<Vec<_>>(), cols);
        for r in 0..rows {
            let want: i32 = (0..cols).map(|c| codes[r * cols + c] as i32 * xq[c] as i32).sum();
            assert_eq!(packed_dot(&p.data[r * p.words..(r + 1) * p.words], &xq), want, "row {r}");
        }
    }
}
