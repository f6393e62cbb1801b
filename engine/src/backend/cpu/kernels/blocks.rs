//! Projections stored in ggml blocks with a scale per block: Q1_0 (PrismML's 1-bit Bonsai: 128 signs
//! and an f16 `d`), Q2_0 (Ternary-Bonsai: 64 two-bit codes and an f16 `d`) and Q8_0 (32 int8 and an
//! f16 `d`). ggml's CPU path multiplies all three with activations quantized to Q8_0 (their
//! `vec_dot_type`): per block of 32 values, `d = max|x| / 127` (stored as f16), `q = round(x / d)`.
//! Doing the same here gives llama.cpp's numbers for these files, up to float summation order.
//!
//! The integer part of each 32-value block is a plain dot product of small integers: `Σ s·q` with
//! signs `s = ±1` (Q1_0), `Σ (u − 1)·q = Σ u·q − Σ q` with `u` in 0..=3 (Q2_0), `Σ w·q` (Q8_0). The
//! float part scales each block's sum by the activation's `d`, then by the weight block's `d`, in the
//! order of ggml's generic C (`ggml_vec_dot_q1_0_q8_0_generic` and its siblings), which
//! [`reference_rows`] follows step by step.
//!
//! Q2_0 stores weight `j` of a 32-value run in byte `j / 4` at bits `2(j % 4)`: shifting the run's 8
//! bytes right by `2k` and masking gives the codes of weights `4b + k` (b = 0..8), a "plane". SIMD
//! kernels unpack the four planes one after the other, so [`Q8Activations::planes`] keeps each
//! block's activations in that order too: position `8k + b` holds value `4b + k`.

use std::ops::Range;

use half::f16;

use crate::format::quant::{GgmlType, QK1_0, QK2_0};
use crate::tensor::float::FloatMatrix;

/// Values per Q8_0 activation block.
pub const QK8_0: usize = 32;

/// Whether [`super::Kernels::block_rows`] multiplies weights of type `ty`.
pub fn reads(ty: GgmlType) -> bool {
    matches!(ty, GgmlType::Q1_0 | GgmlType::Q2_0 | GgmlType::Q8_0)
}

/// One activation vector quantized to Q8_0 blocks, as ggml's `quantize_row_q8_0` does.
#[derive(Clone, Debug, Default)]
pub struct Q8Activations {
    /// The int8 values, in order (within −127..=127).
    pub q: Vec<i8>,
    /// The same values with each block in Q2_0 plane order (see the module notes).
    pub planes: Vec<i8>,
    /// Per block: the scale, rounded to f16 as `block_q8_0` stores it.
    pub d: Vec<f32>,
    /// Per block: `Σ q`.
    pub sum: Vec<i32>,
}

impl Q8Activations {
    /// Quantizes `x` (a multiple of 32 values long).
    pub fn quantize(&mut self, x: &[f32]) {
        assert!(x.len().is_multiple_of(QK8_0), "Q8_0 activations of {} values", x.len());
        let blocks = x.len() / QK8_0;
        self.q.resize(x.len(), 0);
        self.planes.resize(x.len(), 0);
        self.d.resize(blocks, 0.0);
        self.sum.resize(blocks, 0);
        for (b, x) in x.chunks_exact(QK8_0).enumerate() {
            let q = &mut self.q[b * QK8_0..(b + 1) * QK8_0];
            self.d[b] = f16::from_f32(super::quantize_block(x, q)).to_f32();
            self.sum[b] = q.iter().map(|&v| v as i32).sum();
            let planes = &mut self.planes[b * QK8_0..(b + 1) * QK8_0];
            for (j, &v) in q.iter().enumerate() {
                planes[8 * (j % 4) + j / 4] = v;
            }
        }
    }
}

/// The bounds every kernel's `block_rows` checks first: its unchecked reads stay inside them.
pub fn check_args(w: &FloatMatrix, rows: &Range<usize>, a: &Q8Activations, out: &[f32]) {
    assert!(reads(w.ty), "block_rows on a {} matrix", w.ty.name());
    assert!(rows.end <= w.rows && out.len() >= rows.len());
    assert!(a.q.len() >= w.cols && a.planes.len() >= w.cols && a.d.len() >= w.cols / QK8_0);
    assert!(a.sum.len() >= w.cols / QK8_0 && w.data.len() >= w.rows * w.row_bytes);
    assert_eq!(w.row_bytes, w.ty.row_bytes(w.cols).expect("checked at load"));
}

/// The integer dot of one run of 32 values (activation block `y` of `a`) with 32 weights of each type.
/// A kernel set that only speeds this part up runs [`rows_by`] with it and gives exactly the
/// reference's floats.
pub trait Dot32 {
    /// Q1_0: `Σ ±q`, the sign of value `j` being bit `j % 8` of `bits[j / 8]` (4 bytes).
    fn signs(bits: &[u8], a: &Q8Activations, y: usize) -> i32;
    /// Q2_0: `Σ (u − 1)·q`, `u` of value `j` at bits `2(j % 4)` of `codes[j / 4]` (8 bytes).
    fn codes(codes: &[u8], a: &Q8Activations, y: usize) -> i32;
    /// Q8_0: `Σ w·q` of 32 int8 weights.
    fn int8(w: &[u8], a: &Q8Activations, y: usize) -> i32;
}

/// Plain Rust: the definition.
pub struct Plain;

impl Dot32 for Plain {
    fn signs(bits: &[u8], a: &Q8Activations, y: usize) -> i32 {
        let q = &a.q[y * QK8_0..][..QK8_0];
        (0..QK8_0).map(|j| if (bits[j / 8] >> (j % 8)) & 1 == 1 { q[j] as i32 } else { -(q[j] as i32) }).sum()
    }

    fn codes(codes: &[u8], a: &Q8Activations, y: usize) -> i32 {
        let q = &a.q[y * QK8_0..][..QK8_0];
        (0..QK8_0).map(|j| (((codes[j / 4] >> (2 * (j % 4))) & 3) as i32 - 1) * q[j] as i32).sum()
    }

    fn int8(w: &[u8], a: &Q8Activations, y: usize) -> i32 {
        w.iter().zip(&a.q[y * QK8_0..][..QK8_0]).map(|(&w, &x)| w as i8 as i32 * x as i32).sum()
    }
}

/// The reference: ggml's generic `vec_dot` of each row with `a` (`ggml_vec_dot_q1_0_q8_0_generic` and
/// its siblings), in its order of float operations.
pub fn reference_rows(w: &FloatMatrix, rows: Range<usize>, a: &Q8Activations, out: &mut [f32]) {
    rows_by::<Plain>(w, rows, a, out)
}

/// [`reference_rows`] with the integer dots of `D`.
pub fn rows_by<D: Dot32>(w: &FloatMatrix, rows: Range<usize>, a: &Q8Activations, out: &mut [f32]) {
    check_args(w, &rows, a, out);
    let f16 = |b: &[u8]| f16::from_le_bytes([b[0], b[1]]).to_f32();
    for (o, r) in out.iter_mut().zip(rows) {
        let row = w.row(r);
        let mut sumf = 0f32;
        match w.ty {
            GgmlType::Q1_0 => {
                for (i, b) in row.chunks_exact(18).enumerate() {
                    let mut sumi = 0f32;
                    for k in 0..QK1_0 / QK8_0 {
                        let y = 4 * i + k;
                        sumi += a.d[y] * D::signs(&b[2 + 4 * k..6 + 4 * k], a, y) as f32;
                    }
                    sumf += f16(b) * sumi;
                }
            }
            GgmlType::Q2_0 => {
                for (i, b) in row.chunks_exact(18).enumerate() {
                    let mut sumi = 0f32;
                    for k in 0..QK2_0 / QK8_0 {
                        let y = 2 * i + k;
                        sumi += a.d[y] * D::codes(&b[2 + 8 * k..10 + 8 * k], a, y) as f32;
                    }
                    sumf += f16(b) * sumi;
                }
            }
            _ => {
                for (i, b) in row.chunks_exact(34).enumerate() {
                    sumf += D::int8(&b[2..], a, i) as f32 * (f16(b) * a.d[i]);
                }
            }
        }
        *o = sumf;
    }
}
