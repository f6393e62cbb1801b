//! The CPU's KV cache in each [`KvType`]: keys (after RoPE) and values as `[layer][pos][kv_dim]`, and the
//! attention loops over the types the kernel sets do not cover (f16 goes through [`Kernels`], the
//! default's SIMD loops; f32, the exact mode, and q8_0 are plain loops here).

use half::f16;
use half::slice::HalfFloatSliceExt;

use super::kernels::Kernels;
use crate::backend::KvType;

/// llama.cpp's Q8_0 block: 32 values as `d · q`, `d` an f16 scale, `q` int8.
#[derive(Clone, Copy, Debug, Default)]
pub struct BlockQ8 {
    pub d: f16,
    pub q: [i8; 32],
}

impl BlockQ8 {
    /// ggml's reference quantizer: `d = max|x| / 127`, `q = round(x / d)`.
    fn quantize(x: &[f32]) -> Self {
        let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let mut q = [0i8; 32];
        for (q, &v) in q.iter_mut().zip(x) {
            *q = (v * id).round() as i8;
        }
        Self { d: f16::from_f32(d), q }
    }
}

/// One layer's or a whole cache's storage.
pub enum KvStore {
    F32(Vec<f32>),
    F16(Vec<f16>),
    Q8(Vec<BlockQ8>),
}

/// A view of cached rows from some element on: key or value `t` of a head starts at element `t · stride`.
#[derive(Clone, Copy)]
pub enum KvRows<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    Q8(&'a [BlockQ8]),
}

impl KvStore {
    pub fn new(ty: KvType, len: usize) -> Self {
        match ty {
            KvType::F32 => Self::F32(vec![0.0; len]),
            KvType::F16 => Self::F16(vec![f16::ZERO; len]),
            KvType::Q8_0 => Self::Q8(vec![BlockQ8::default(); len / 32]),
        }
    }

    /// How many values it holds.
    pub fn values(&self) -> usize {
        match self {
            Self::F32(c) => c.len(),
            Self::F16(c) => c.len(),
            Self::Q8(c) => c.len() * 32,
        }
    }

    /// Stores `x` at element `at` (a multiple of 32 for q8_0).
    pub fn store(&mut self, at: usize, x: &[f32]) {
        match self {
            Self::F32(c) => c[at..at + x.len()].copy_from_slice(x),
            Self::F16(c) => c[at..at + x.len()].convert_from_f32_slice(x),
            Self::Q8(c) => {
                for (b, x) in c[at / 32..].iter_mut().zip(x.chunks_exact(32)) {
                    *b = BlockQ8::quantize(x);
                }
            }
        }
    }

    /// The rows from element `at` on.
    pub fn rows(&self, at: usize) -> KvRows<'_> {
        match self {
            Self::F32(c) => KvRows::F32(&c[at..]),
            Self::F16(c) => KvRows::F16(&c[at..]),
            Self::Q8(c) => KvRows::Q8(&c[at / 32..]),
        }
    }
}

impl KvRows<'_> {
    /// `scores[t] = q · key t` for the first `scores.len()` positions.
    pub fn scores(self, k: &dyn Kernels, q: &[f32], stride: usize, scores: &mut [f32]) {
        match self {
            Self::F16(keys) => k.attn_scores(q, keys, stride, scores),
            Self::F32(keys) => {
                for (t, s) in scores.iter_mut().enumerate() {
                    *s = dot(q, &keys[t * stride..t * stride + q.len()]);
                }
            }
            Self::Q8(keys) => {
                let (stride, n) = (stride / 32, q.len() / 32);
                for (t, s) in scores.iter_mut().enumerate() {
                    let blocks = &keys[t * stride..t * stride + n];
                    *s = blocks.iter().zip(q.chunks_exact(32)).map(|(b, q)| b.d.to_f32() * dot_i8(q, &b.q)).sum();
                }
            }
        }
    }

    /// `out += Σ_t p[t] · value t` over the first `p.len()` positions.
    pub fn accumulate(self, k: &dyn Kernels, p: &[f32], stride: usize, out: &mut [f32]) {
        match self {
            Self::F16(values) => k.attn_values(p, values, stride, out),
            Self::F32(values) => {
                for (t, &p) in p.iter().enumerate() {
                    let v = &values[t * stride..t * stride + out.len()];
                    out.iter_mut().zip(v).for_each(|(o, &v)| *o += p * v);
                }
            }
            Self::Q8(values) => {
                let stride = stride / 32;
                for (t, &p) in p.iter().enumerate() {
                    for (b, o) in values[t * stride..].iter().zip(out.chunks_exact_mut(32)) {
                        let pd = p * b.d.to_f32();
                        o.iter_mut().zip(&b.q).for_each(|(o, &q)| *o += pd * q as f32);
                    }
                }
            }
        }
    }
}

/// A dot product in 8 lanes, which the compiler vectorizes.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    for (a, b) in a.chunks(8).zip(b.chunks(8)) {
        lanes.iter_mut().zip(a.iter().zip(b)).for_each(|(l, (a, b))| *l += a * b);
    }
    lanes.iter().sum()
}

fn dot_i8(a: &[f32], q: &[i8; 32]) -> f32 {
    let mut lanes = [0f32; 8];
    for (a, q) in a.chunks(8).zip(q.chunks(8)) {
        lanes.iter_mut().zip(a.iter().zip(q)).for_each(|(l, (a, &q))| *l += a * q as f32);
    }
    lanes.iter().sum()
}
