//! The hot loops of inference, one implementation per target behind the [`Kernels`] trait.
//!
//! [`scalar`] is the reference: plain Rust that says exactly what each kernel computes. Every faster
//! implementation is tested against it (bit-for-bit on the integer accumulators). [`best`] picks the
//! fastest one the running CPU supports.

#[cfg(target_arch = "x86_64")]
pub mod avx2;
#[cfg(target_arch = "x86_64")]
pub mod avx512;
pub mod blocks;
#[cfg(target_arch = "aarch64")]
pub mod neon;
pub mod qhead;
pub mod scalar;
#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
pub mod simd128;

use std::ops::Range;

use half::f16;

use crate::format::quant::GgmlType;
use crate::tensor::float::FloatMatrix;
use crate::tensor::ternary::TernaryMatrix;
use blocks::Q8Activations;
use qhead::{HeadActivations, QuantHead};

pub trait Kernels: Send + Sync {
    /// A short name for logs and `bitnet bench`.
    fn name(&self) -> &'static str;

    /// The integer part of BitLinear for the rows `rows` of `w`:
    /// `out[i] = Σ_c code(rows.start + i, c) · xq[c]`.
    /// `xq` holds `w.padded_cols()` int8 activations (zero past `w.cols`).
    fn ternary_rows(&self, w: &TernaryMatrix, rows: Range<usize>, xq: &[i8], out: &mut [i32]);

    /// [`Kernels::ternary_rows`] for a tile of `n` tokens, so that the rows are read once for all of
    /// them: `xq` holds `n` activation vectors of `w.padded_cols()` (each quantized with its own
    /// scale), `out` holds `n` result vectors of `rows.len()`, token-major:
    /// `out[t·len + i] = Σ_c code(rows.start + i, c) · xq[t·padded_cols + c]`.
    /// The default runs the rows once per token (fine when the caller's row range fits in cache).
    fn ternary_gemm(&self, w: &TernaryMatrix, rows: Range<usize>, xq: &[i8], n: usize, out: &mut [i32]) {
        let (p, len) = (w.padded_cols(), rows.len());
        for t in 0..n {
            self.ternary_rows(w, rows.clone(), &xq[t * p..(t + 1) * p], &mut out[t * len..(t + 1) * len]);
        }
    }

    /// A float matrix-vector product over the rows `rows` of `w` (the LM head):
    /// `out[i] = Σ_c W(rows.start + i, c) · x[c]`, with `W` decoded from its storage type.
    fn float_rows(&self, w: &FloatMatrix, rows: Range<usize>, x: &[f32], out: &mut [f32]);

    /// Whether [`Kernels::float_rows`] has a fast path for matrices of type `ty` (the model repacks a
    /// Q4_0/Q5_0 LM head to Q8_0, with the same values, for kernels that read only Q8_0 fast).
    fn reads_fast(&self, ty: GgmlType) -> bool {
        matches!(ty, GgmlType::F16 | GgmlType::Q8_0)
    }

    /// [`Kernels::float_rows`] for `n` vectors (`x`: `n × w.cols`, `out`: `n × rows.len()`, token-major),
    /// for the LM head of several sequences at once.
    fn float_gemm(&self, w: &FloatMatrix, rows: Range<usize>, x: &[f32], n: usize, out: &mut [f32]) {
        let len = rows.len();
        for t in 0..n {
            self.float_rows(w, rows.clone(), &x[t * w.cols..(t + 1) * w.cols], &mut out[t * len..(t + 1) * len]);
        }
    }

    /// Attention scores of one query head against `out.len()` cached keys: `out[t] = Σ_i q[i]·key_t[i]`,
    /// where key `t` is the f16 row `keys[t·stride..][..q.len()]` (the cache holds every kv head of a
    /// position, so one head's rows are `kv_dim` apart).
    fn attn_scores(&self, q: &[f32], keys: &[f16], stride: usize, out: &mut [f32]);

    /// The attention-weighted sum of one head's cached values: `out[i] += Σ_t p[t]·value_t[i]`, where
    /// value `t` is the f16 row `values[t·stride..][..out.len()]`.
    fn attn_values(&self, p: &[f32], values: &[f16], stride: usize, out: &mut [f32]);

    /// The opt-in quantized LM head ([`qhead`]): `out[i]` = row `rows.start + i` of `h` times the
    /// quantized activations `a`. The default is the reference.
    fn quant_head_rows(&self, h: &QuantHead, rows: Range<usize>, a: &HeadActivations, out: &mut [f32]) {
        qhead::reference_rows(h, rows, a, out);
    }

    /// Rows of a Q1_0, Q2_0 or Q8_0 projection ([`blocks`]) times activations quantized to Q8_0
    /// blocks: `out[i]` = row `rows.start + i` of `w` · `a`, as ggml's `vec_dot` for the type. The
    /// default is the reference.
    fn block_rows(&self, w: &FloatMatrix, rows: Range<usize>, a: &Q8Activations, out: &mut [f32]) {
        blocks::reference_rows(w, rows, a, out);
    }
}

/// Float rows of any storage type, decoded a piece at a time into a stack buffer (no allocation per
/// call; 256 elements are whole blocks of every type): `acc_dot(acc, piece, x)` adds a piece's dot
/// product to `acc`. The fallback of every kernel set for types it has no direct path for.
pub(crate) fn decoded_rows(
    w: &FloatMatrix,
    rows: Range<usize>,
    x: &[f32],
    out: &mut [f32],
    acc_dot: impl Fn(f32, &[f32], &[f32]) -> f32,
) {
    const PIECE: usize = 256;
    let piece_bytes = w.ty.row_bytes(PIECE).expect("every float type encodes 256 elements");
    let mut buf = [0f32; PIECE];
    for (o, r) in out.iter_mut().zip(rows) {
        let mut acc = 0f32;
        for (bytes, x) in w.row(r).chunks(piece_bytes).zip(x[..w.cols].chunks(PIECE)) {
            let buf = &mut buf[..x.len()];
            crate::format::quant::dequantize(w.ty, bytes, buf).expect("row checked at load");
            acc = acc_dot(acc, buf, x);
        }
        *o = acc;
    }
}

/// Runs a row kernel over `rows`: `tile(r)` computes rows `r..r + R` at once (sharing each activation
/// load), `one(r)` the rows left over; row `r` goes to `out[r − rows.start]`.
#[allow(dead_code)] // a target with no SIMD set (wasm32 without simd128) has no tiled kernels
#[inline(always)]
pub(crate) fn by_tiles<const R: usize>(
    rows: Range<usize>,
    out: &mut [f32],
    mut tile: impl FnMut(usize) -> [f32; R],
    mut one: impl FnMut(usize) -> f32,
) {
    let mut r = rows.start;
    while r + R <= rows.end {
        out[r - rows.start..][..R].copy_from_slice(&tile(r));
        r += R;
    }
    while r < rows.end {
        out[r - rows.start] = one(r);
        r += 1;
    }
}

/// The fastest kernels this CPU supports.
/// `BITNET_KERNELS=<name>` picks another available set (`scalar` for the reference; for comparisons).
pub fn best() -> &'static dyn Kernels {
    let all = available();
    let chosen = std::env::var("BITNET_KERNELS").ok().and_then(|name| all.iter().find(|k| k.name() == name).copied());
    chosen.unwrap_or(all[all.len() - 1])
}

/// Every kernel set this CPU can run, the reference first and the fastest last: what the kernel
/// tests compare.
pub fn available() -> Vec<&'static dyn Kernels> {
    #[allow(unused_mut)] // a target with no SIMD set (wasm32 without simd128) adds nothing
    let mut all: Vec<&'static dyn Kernels> = vec![&scalar::Scalar];
    #[cfg(target_arch = "x86_64")]
    all.extend(avx2::Avx2::available());
    #[cfg(target_arch = "x86_64")]
    all.extend(avx512::Avx512::available());
    #[cfg(target_arch = "aarch64")]
    all.extend(neon::Neon::available());
    #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
    all.push(&simd128::Simd128);
    all
}

/// Per-token absmax int8 quantization of activations (BitNet b1.58's activation quantizer):
/// `s = 127 / max(max|x|, 1e-5)`, `q = clamp(round_half_even(x·s), -128, 127)`.
/// Writes `q` into the first `x.len()` entries of `out`, zeros into the rest (the padding of the
/// ternary rows), and returns `s`.
pub fn quantize_activations(x: &[f32], out: &mut [i8]) -> f32 {
    // The maximum in 16 lanes (it vectorizes; one running maximum would be a chain of dependent steps).
    let mut lanes = [0f32; 16];
    for c in x.chunks(16) {
        lanes.iter_mut().zip(c).for_each(|(m, v)| *m = m.max(v.abs()));
    }
    let amax = lanes.iter().fold(0f32, |m, &v| m.max(v));
    let s = 127.0 / amax.max(1e-5);
    for (q, &v) in out.iter_mut().zip(x) {
        *q = round_ties_even_small(v * s).clamp(-128.0, 127.0) as i8;
    }
    out[x.len()..].fill(0);
    s
}

/// ggml's Q8_0 quantization of one block (`quantize_row_q8_0_ref`, used for the activations of
/// quantized matrices): `d = max|x| / 127`, `q = round(x / d)` (half away from zero; within ±127).
/// Writes `q` and returns `d` (in f32; ggml stores it as f16).
pub fn quantize_block(x: &[f32], q: &mut [i8]) -> f32 {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
    for (q, &x) in q.iter_mut().zip(x) {
        *q = (x * inv).round() as i8;
    }
    d
}

/// `v.round_ties_even()` for |v| < 2²² (every `v·s` above is within ±127), as plain arithmetic that
/// vectorizes: x86-64's baseline has no rounding instruction, so `round_ties_even` is a libm call per
/// value there. The sum with 1.5·2²³ has no fraction bits, so the addition itself rounds half to even
/// (IEEE's default mode), and the subtraction gives back that rounded value exactly.
#[inline]
fn round_ties_even_small(v: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5 · 2²³
    (v + MAGIC) - MAGIC
}
