//! x86-64 AVX2 kernels. Chosen at run time by [`super::best`] when the CPU has AVX2, FMA and F16C.
//!
//! Ternary rows: a 32-byte block holds 128 codes as `u = code + 1` in four 2-bit planes; shifting
//! and masking a plane gives 32 unsigned bytes that `maddubs` multiplies with 32 int8 activations.
//! `Σ u·x − Σ x = Σ code·x`, and `Σ x` is computed once per activation vector.

// Index loops: one index addresses accumulators, loads and pointer offsets at once.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;
use std::ops::Range;

use half::f16;

use super::Kernels;
use crate::format::quant::GgmlType;
use crate::tensor::float::FloatMatrix;
use crate::tensor::ternary::TernaryMatrix;

pub struct Avx2;

impl Avx2 {
    pub fn available() -> bool {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
    }
}

impl Kernels for Avx2 {
    fn name(&self) -> &'static str {
        "avx2"
    }

    fn ternary_rows(&self, w: &TernaryMatrix, rows: Range<usize>, xq: &[i8], out: &mut [i32]) {
        self.ternary_gemm(w, rows, xq, 1, out);
    }

    fn ternary_gemm(&self, w: &TernaryMatrix, rows: Range<usize>, xq: &[i8], n: usize, out: &mut [i32]) {
        let p = w.padded_cols();
        assert!(rows.end <= w.rows && xq.len() >= n * p && out.len() >= n * rows.len());
        let len = rows.len();
        let mut t = 0;
        while t < n {
            let x = &xq[t * p..];
            let sum_x = |k: usize| x[k * p..(k + 1) * p].iter().map(|&v| v as i32).sum::<i32>();
            // SAFETY: `Avx2` is only handed out by `available()` after checking the features; the
            // assert above bounds the activations each call reads.
            unsafe {
                if n - t >= GEMM_TOKENS {
                    let sums: [i32; GEMM_TOKENS] = std::array::from_fn(sum_x);
                    for r in rows.clone() {
                        let acc = ternary_dots::<GEMM_TOKENS>(w.row(r), x, p);
                        for (k, a) in acc.into_iter().enumerate() {
                            out[(t + k) * len + r - rows.start] = a - sums[k];
                        }
                    }
                    t += GEMM_TOKENS;
                } else {
                    let sum = sum_x(0);
                    for r in rows.clone() {
                        out[t * len + r - rows.start] = ternary_dots::<1>(w.row(r), x, p)[0] - sum;
                    }
                    t += 1;
                }
            }
        }
    }

    fn float_rows(&self, w: &FloatMatrix, rows: Range<usize>, x: &[f32], out: &mut [f32]) {
        match w.ty {
            GgmlType::F16 => {
                for (o, r) in out.iter_mut().zip(rows) {
                    // SAFETY: as above; the row holds `cols` halves (checked at load).
                    *o = unsafe { f16_dot(w.row(r), &x[..w.cols]) };
                }
            }
            GgmlType::Q8_0 => {
                for (o, r) in out.iter_mut().zip(rows) {
                    // SAFETY: as above; the row holds cols/32 blocks of 34 bytes.
                    *o = unsafe { q8_0_dot(w.row(r), &x[..w.cols]) };
                }
            }
            _ => super::scalar::Scalar.float_rows(w, rows, x, out),
        }
    }

    fn attn_scores(&self, q: &[f32], keys: &[f16], stride: usize, out: &mut [f32]) {
        // SAFETY: features checked by `available()`; every row is a bounds-checked slice.
        unsafe { attn_scores(q, keys, stride, out) }
    }

    fn attn_values(&self, p: &[f32], values: &[f16], stride: usize, out: &mut [f32]) {
        // SAFETY: as above.
        unsafe { attn_values(p, values, stride, out) }
    }
}

/// Tokens a gemm step takes at once: each unpacked weight block is used for all of them.
const GEMM_TOKENS: usize = 4;

/// `Σ u·x` of one row against `T` activation vectors (`x` at stride `p`); u = code + 1 is in 0..=2,
/// so `maddubs` never saturates.
#[target_feature(enable = "avx2")]
unsafe fn ternary_dots<const T: usize>(row: &[u8], x: &[i8], p: usize) -> [i32; T] {
    let mask = _mm256_set1_epi8(3);
    let ones = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_si256(); T];
    for (b, block) in row.chunks_exact(32).enumerate() {
        if b % 2 == 0 {
            prefetch_ahead(block.as_ptr()); // a line is two blocks
        }
        let b8 = _mm256_loadu_si256(block.as_ptr() as *const __m256i);
        // Plane g (bits 7-2g..6-2g) holds columns 32g..32g+31 of the block.
        let u = [
            _mm256_and_si256(_mm256_srli_epi16(b8, 6), mask),
            _mm256_and_si256(_mm256_srli_epi16(b8, 4), mask),
            _mm256_and_si256(_mm256_srli_epi16(b8, 2), mask),
            _mm256_and_si256(b8, mask),
        ];
        for t in 0..T {
            let xp = x.as_ptr().add(t * p + 128 * b) as *const __m256i;
            let xs = [0, 1, 2, 3].map(|g| _mm256_loadu_si256(xp.add(g)));
            // Each i16 lane is at most 2·2·128 = 512 in magnitude, so summing four stays far from overflow.
            let s = _mm256_add_epi16(
                _mm256_add_epi16(_mm256_maddubs_epi16(u[0], xs[0]), _mm256_maddubs_epi16(u[1], xs[1])),
                _mm256_add_epi16(_mm256_maddubs_epi16(u[2], xs[2]), _mm256_maddubs_epi16(u[3], xs[3])),
            );
            acc[t] = _mm256_add_epi32(acc[t], _mm256_madd_epi16(s, ones));
        }
    }
    acc.map(|a| hsum_i32(a))
}

/// Requests the line `PREFETCH` bytes past `p`: rows are read one after another, so that is where
/// the kernel reads soon. One core's hardware prefetchers alone keep too few lines in flight to
/// stream from DRAM at the memory's bandwidth.
#[inline(always)]
unsafe fn prefetch_ahead(p: *const u8) {
    const PREFETCH: usize = 4096;
    _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH) as *const i8);
}

#[target_feature(enable = "avx2")]
unsafe fn hsum_i32(v: __m256i) -> i32 {
    let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
    _mm_cvtsi128_si32(s)
}

#[target_feature(enable = "avx2,fma")]
unsafe fn hsum_f32(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f16_dot(row: &[u8], x: &[f32]) -> f32 {
    let n = x.len();
    let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let mut i = 0;
    while i + 16 <= n {
        if i % 32 == 0 {
            prefetch_ahead(row.as_ptr().add(2 * i)); // a line is 32 halves
        }
        let h = _mm256_loadu_si256(row.as_ptr().add(2 * i) as *const __m256i);
        let w0 = _mm256_cvtph_ps(_mm256_castsi256_si128(h));
        let w1 = _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1));
        a0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x.as_ptr().add(i)), a0);
        a1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x.as_ptr().add(i + 8)), a1);
        i += 16;
    }
    let mut sum = hsum_f32(_mm256_add_ps(a0, a1));
    for j in i..n {
        sum += half::f16::from_le_bytes([row[2 * j], row[2 * j + 1]]).to_f32() * x[j];
    }
    sum
}

/// The row loops of the attention kernels, compiled with the features so that the row kernels inline.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn attn_scores(q: &[f32], keys: &[f16], stride: usize, out: &mut [f32]) {
    for (key, o) in keys.chunks(stride).zip(out.iter_mut()) {
        *o = f16_dot(bytemuck::cast_slice(&key[..q.len()]), q);
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn attn_values(p: &[f32], values: &[f16], stride: usize, out: &mut [f32]) {
    for (value, &p) in values.chunks(stride).zip(p) {
        f16_axpy(p, &value[..out.len()], out);
    }
}

/// `out += p·v` for an f16 row `v` of `out.len()` halves.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f16_axpy(p: f32, v: &[f16], out: &mut [f32]) {
    let n = out.len();
    let pv = _mm256_set1_ps(p);
    let mut i = 0;
    while i + 8 <= n {
        let w = _mm256_cvtph_ps(_mm_loadu_si128(v.as_ptr().add(i) as *const __m128i));
        let o = out.as_mut_ptr().add(i);
        _mm256_storeu_ps(o, _mm256_fmadd_ps(pv, w, _mm256_loadu_ps(o)));
        i += 8;
    }
    for (o, v) in out[i..].iter_mut().zip(&v[i..]) {
        *o += p * v.to_f32();
    }
}

/// Q8_0: blocks of 32 int8 values and an f16 scale `d` (34 bytes); value = d · q.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q8_0_dot(row: &[u8], x: &[f32]) -> f32 {
    let mut acc = _mm256_setzero_ps();
    for (block, x) in row.chunks_exact(34).zip(x.chunks_exact(32)) {
        let d = _mm256_set1_ps(half::f16::from_le_bytes([block[0], block[1]]).to_f32());
        let mut partial = _mm256_setzero_ps();
        for k in 0..4 {
            let q = _mm_loadl_epi64(block.as_ptr().add(2 + 8 * k) as *const __m128i);
            let w = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
            partial = _mm256_fmadd_ps(w, _mm256_loadu_ps(x.as_ptr().add(8 * k)), partial);
        }
        acc = _mm256_fmadd_ps(d, partial, acc);
    }
    hsum_f32(acc)
}
