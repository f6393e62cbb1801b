//! The reference kernels: the simplest correct code for each operation.

use std::ops::Range;

use half::f16;

use super::Kernels;
use crate::tensor::float::FloatMatrix;
use crate::tensor::ternary::TernaryMatrix;

pub struct Scalar;

impl Kernels for Scalar {
    fn name(&self) -> &'static str {
        "scalar"
    }

    fn ternary_rows(&self, w: &TernaryMatrix, rows: Range<usize>, xq: &[i8], out: &mut [i32]) {
        for (o, r) in out.iter_mut().zip(rows) {
            let row = w.row(r);
            let mut acc = 0i32;
            // A block of 128 columns is 32 bytes; byte j holds columns j, 32+j, 64+j, 96+j
            // (bits 7:6, 5:4, 3:2, 1:0) as code + 1.
            for (block, x) in row.chunks_exact(32).zip(xq.chunks_exact(128)) {
                for (j, &b) in block.iter().enumerate() {
                    for g in 0..4 {
                        let code = ((b >> (6 - 2 * g)) & 3) as i32 - 1;
                        acc += code * x[32 * g + j] as i32;
                    }
                }
            }
            *o = acc;
        }
    }

    fn float_rows(&self, w: &FloatMatrix, rows: Range<usize>, x: &[f32], out: &mut [f32]) {
        super::decoded_rows(w, rows, x, out, |acc, a, b| a.iter().zip(b).fold(acc, |acc, (a, b)| acc + a * b));
    }

    fn attn_scores(&self, q: &[f32], keys: &[f16], stride: usize, out: &mut [f32]) {
        for (key, o) in keys.chunks(stride).zip(out.iter_mut()) {
            *o = q.iter().zip(&key[..q.len()]).map(|(q, k)| q * k.to_f32()).sum();
        }
    }

    fn attn_values(&self, p: &[f32], values: &[f16], stride: usize, out: &mut [f32]) {
        let n = out.len();
        for (value, &p) in values.chunks(stride).zip(p) {
            out.iter_mut().zip(&value[..n]).for_each(|(o, v)| *o += p * v.to_f32());
        }
    }
}
