//! Float matrices (the embedding and the LM head, which BitNet keeps in float) in their GGUF storage type.

use rayon::prelude::*;

use crate::format::gguf::TensorInfo;
use crate::format::quant::{self, GgmlType};
use crate::{Error, Result};

/// A float matrix in its GGUF storage type (F32, F16, BF16 or a 32/256-block type), decoded row by row.
/// Used for the embedding and the LM head, which BitNet keeps in float.
#[derive(Clone)]
pub struct FloatMatrix {
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
    pub row_bytes: usize,
    pub data: Vec<u8>,
}

impl FloatMatrix {
    pub fn from_tensor(t: &TensorInfo, data: &[u8]) -> Result<Self> {
        let (rows, cols) = (t.rows(), t.cols());
        let row_bytes = t.ty.row_bytes(cols).ok_or_else(|| Error::Tensor {
            tensor: t.name.clone(),
            reason: format!("type {} cannot be used for a float matrix of {cols} columns", t.ty.name()),
        })?;
        Ok(Self { ty: t.ty, rows, cols, row_bytes, data: data.to_vec() })
    }

    pub fn row(&self, r: usize) -> &[u8] {
        &self.data[r * self.row_bytes..(r + 1) * self.row_bytes]
    }

    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        // The type and row size were checked at load time, so decoding a row cannot fail.
        quant::dequantize(self.ty, self.row(r), &mut out[..self.cols]).expect("row checked at load");
    }

    /// A Q4_0 or Q5_0 matrix as Q8_0 with exactly the same values: each block of 32 keeps its f16 scale
    /// `d`, and its 4- or 5-bit codes become int8 (a value is `k·d` for a small integer `k`).
    pub fn repacked_q8_0(&self) -> FloatMatrix {
        assert!(matches!(self.ty, GgmlType::Q4_0 | GgmlType::Q5_0), "only Q4_0 and Q5_0 repack exactly");
        let block = self.ty.row_bytes(32).expect("a type of blocks of 32");
        let mut data = vec![0u8; self.data.len() / block * 34];
        data.par_chunks_mut(34).zip(self.data.par_chunks(block)).for_each(|(out, b)| {
            let mut v = [0f32; 32];
            quant::dequantize(self.ty, b, &mut v).expect("block checked at load");
            let d = half::f16::from_le_bytes([b[0], b[1]]).to_f32();
            out[..2].copy_from_slice(&b[..2]);
            for (q, v) in out[2..].iter_mut().zip(v) {
                // `v` is k·d, computed exactly in f32 (|k| ≤ 16), so v / d is k exactly.
                *q = if d == 0.0 { 0 } else { (v / d) as i8 as u8 };
            }
        });
        FloatMatrix { ty: GgmlType::Q8_0, rows: self.rows, cols: self.cols, row_bytes: self.cols / 32 * 34, data }
    }
}
