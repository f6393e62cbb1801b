//! x86-64 AVX2 kernels. Chosen at run time by [`super::best`] when the CPU has AVX2, FMA and F16C;
//! a second variant adds AVX-VNNI's 256-bit `vpdpbusd` for the quantized head where the CPU has it
//! (both are registered so that the tests cover both on such a CPU).
//!
//! Ternary rows: a 32-byte block holds 128 codes as `u = code + 1` in four 2-bit planes; shifting
//! and masking a plane gives 32 unsigned bytes that `maddubs` multiplies with 32 int8 activations.
//! `Σ u·x − Σ x = Σ code·x`, and `Σ x` is computed once per activation vector.

// Index loops: one index addresses accumulators, loads and pointer offsets at once.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;
use std::ops::Range;

use half::f16;

use super::blocks::{self, Q8Activations};
use super::qhead::{self, HeadActivations, QuantHead};
use super::{by_tiles, Kernels};
use crate::format::quant::GgmlType;
use crate::tensor::float::FloatMatrix;
use crate::tensor::ternary::TernaryMatrix;

pub struct Avx2 {
    vnni: bool,
}

/// The plain AVX2 set (the AVX-512 set uses its attention loops too).
pub static AVX2: Avx2 = Avx2 { vnni: false };
static AVX2_VNNI: Avx2 = Avx2 { vnni: true };

impl Avx2 {
    /// The variants this CPU runs, slowest first: plain AVX2, then AVX-VNNI.
    pub fn available() -> Vec<&'static dyn Kernels> {
        let mut v: Vec<&'static dyn Kernels> = Vec::new();
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c") {
            v.push(&AVX2);
            if is_x86_feature_detected!("avxvnni") {
                v.push(&AVX2_VNNI);
            }
        }
        v
    }
}

impl Kernels for Avx2 {
    fn name(&self) -> &'static str {
        if self.vnni {
            "avx2vnni"
        } else {
            "avx2"
        }
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
        self.float_gemm(w, rows, x, 1, out)
    }

    fn float_gemm(&self, w: &FloatMatrix, rows: Range<usize>, x: &[f32], n: usize, out: &mut [f32]) {
        assert!(rows.end <= w.rows && x.len() >= n * w.cols && out.len() >= n * rows.len());
        match w.ty {
            // SAFETY: as above; rows hold `cols` halves, or cols/32 blocks of 34 bytes (checked at load).
            GgmlType::F16 | GgmlType::Q8_0 => unsafe { float_gemm(w, rows, x, n, out) },
            _ => {
                let len = rows.len();
                for t in 0..n {
                    let (x, out) = (&x[t * w.cols..(t + 1) * w.cols], &mut out[t * len..(t + 1) * len]);
                    super::scalar::Scalar.float_rows(w, rows.clone(), x, out);
                }
            }
        }
    }

    fn quant_head_rows(&self, h: &QuantHead, rows: Range<usize>, a: &HeadActivations, out: &mut [f32]) {
        qhead::check_args(h, &rows, a, out);
        // SAFETY: features checked by `available()` (AVX-VNNI for the VNNI variant); the checks bound
        // every read (rows hold the lane layout of `cols`).
        unsafe {
            if self.vnni {
                qhead_vnni(h, rows, a, out)
            } else {
                qhead_plain(h, rows, a, out)
            }
        }
    }

    fn block_rows(&self, w: &FloatMatrix, rows: Range<usize>, a: &Q8Activations, out: &mut [f32]) {
        blocks::check_args(w, &rows, a, out);
        for (o, r) in out.iter_mut().zip(rows) {
            // SAFETY: features checked by `available()`; `check_args` bounds the row (whole blocks of
            // the type) and the activations (at least `cols` values and `cols / 32` scales and sums).
            *o = unsafe {
                match w.ty {
                    GgmlType::Q1_0 => q1_0_row(w.row(r), a),
                    GgmlType::Q2_0 => q2_0_row(w.row(r), a),
                    _ => q8_0_row(w.row(r), a),
                }
            };
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

/// Requests the line at `offset` of each row of the tile two tiles after the one at `tile` (`rows`
/// rows of `stride` bytes): the same place in rows the kernel reads soon. One core's hardware
/// prefetchers alone keep too few lines in flight to stream from DRAM at the memory's bandwidth
/// (and one linear prefetch stream fell behind the rows of tiles longer than its distance).
#[inline(always)]
pub(super) unsafe fn prefetch_tiles_ahead(tile: *const u8, rows: usize, stride: usize, offset: usize) {
    for r in 0..rows {
        _mm_prefetch::<_MM_HINT_T0>(tile.wrapping_add((2 * rows + r) * stride + offset) as *const i8);
    }
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

/// F16 or Q8_0 rows against `n` vectors (token-major results), a row against up to four tokens at a time:
/// each decoded weight vector serves them all, and each (row, token) takes `float_rows`' own operations.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn float_gemm(w: &FloatMatrix, rows: Range<usize>, x: &[f32], n: usize, out: &mut [f32]) {
    let len = rows.len();
    let mut t = 0;
    while t < n {
        let left = (n - t).min(4);
        for (i, r) in rows.clone().enumerate() {
            let xt = x.as_ptr().add(t * w.cols);
            let mut put = |v: &[f32]| v.iter().enumerate().for_each(|(k, &v)| out[(t + k) * len + i] = v);
            match (w.ty == GgmlType::F16, left) {
                (true, 1) => put(&f16_dots::<1>(w.row(r), xt, w.cols)),
                (true, 2) => put(&f16_dots::<2>(w.row(r), xt, w.cols)),
                (true, 3) => put(&f16_dots::<3>(w.row(r), xt, w.cols)),
                (true, _) => put(&f16_dots::<4>(w.row(r), xt, w.cols)),
                (false, 1) => put(&q8_0_dots::<1>(w.row(r), xt, w.cols)),
                (false, 2) => put(&q8_0_dots::<2>(w.row(r), xt, w.cols)),
                (false, 3) => put(&q8_0_dots::<3>(w.row(r), xt, w.cols)),
                (false, _) => put(&q8_0_dots::<4>(w.row(r), xt, w.cols)),
            }
        }
        t += left;
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f16_dot(row: &[u8], x: &[f32]) -> f32 {
    f16_dots::<1>(row, x.as_ptr(), x.len())[0]
}

/// An f16 row of `n` halves against the `T` vectors of `n` floats at `x`.
#[inline(always)]
unsafe fn f16_dots<const T: usize>(row: &[u8], x: *const f32, n: usize) -> [f32; T] {
    let mut a0 = [_mm256_setzero_ps(); T];
    let mut a1 = [_mm256_setzero_ps(); T];
    let mut i = 0;
    while i + 16 <= n {
        if i % 32 == 0 {
            prefetch_ahead(row.as_ptr().add(2 * i)); // a line is 32 halves
        }
        let h = _mm256_loadu_si256(row.as_ptr().add(2 * i) as *const __m256i);
        let w0 = _mm256_cvtph_ps(_mm256_castsi256_si128(h));
        let w1 = _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1));
        for t in 0..T {
            a0[t] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x.add(t * n + i)), a0[t]);
            a1[t] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x.add(t * n + i + 8)), a1[t]);
        }
        i += 16;
    }
    std::array::from_fn(|t| {
        let mut sum = hsum_f32(_mm256_add_ps(a0[t], a1[t]));
        for j in i..n {
            sum += half::f16::from_le_bytes([row[2 * j], row[2 * j + 1]]).to_f32() * *x.add(t * n + j);
        }
        sum
    })
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

/// Q8_0: blocks of 32 int8 values and an f16 scale `d` (34 bytes); value = d · q. A row of `n` values against
/// the `T` vectors at `x`.
#[inline(always)]
unsafe fn q8_0_dots<const T: usize>(row: &[u8], x: *const f32, n: usize) -> [f32; T] {
    let mut acc = [_mm256_setzero_ps(); T];
    for (b, block) in row.chunks_exact(34).take(n / 32).enumerate() {
        let d = _mm256_set1_ps(half::f16::from_le_bytes([block[0], block[1]]).to_f32());
        let mut partial = [_mm256_setzero_ps(); T];
        for k in 0..4 {
            let q = _mm_loadl_epi64(block.as_ptr().add(2 + 8 * k) as *const __m128i);
            let w = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
            for t in 0..T {
                partial[t] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x.add(t * n + 32 * b + 8 * k)), partial[t]);
            }
        }
        for t in 0..T {
            acc[t] = _mm256_fmadd_ps(d, partial[t], acc[t]);
        }
    }
    std::array::from_fn(|t| hsum_f32(acc[t]))
}

// ---------------------------------------------------------------------------------------------------
// Q1_0, Q2_0 and Q8_0 projections against Q8_0 activations (see `blocks`): per 32 values an i32x8 of
// partial integer sums, scaled by the activation's d into a block accumulator, then by the weight's d.

/// The f16 at the start of `b`, converted by F16C (`half` converts in software where f16c is not a compile-time
/// feature: a sixth of the decoding time once).
#[target_feature(enable = "avx2,f16c")]
#[inline]
unsafe fn f16_at(b: &[u8]) -> f32 {
    let bits = u16::from_le_bytes([b[0], b[1]]);
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
}

/// Σ of the 32 bytes of `v` as signed values, in eight i32 lanes.
#[target_feature(enable = "avx2")]
unsafe fn sum_i8(v: __m256i) -> __m256i {
    _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_set1_epi8(1), v), _mm256_set1_epi16(1))
}

/// Q1_0: each activation byte negated where its weight's bit is clear (ggml's AVX2 trick: the bit
/// spread to a byte mask), then summed.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q1_0_row(row: &[u8], a: &Q8Activations) -> f32 {
    let byte_of = _mm256_setr_epi8(
        0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3,
    );
    let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
    let mut acc = _mm256_setzero_ps();
    for (i, b) in row.chunks_exact(18).enumerate() {
        let mut block = _mm256_setzero_ps();
        for k in 0..4 {
            let y = 4 * i + k;
            let bits = u32::from_le_bytes([b[2 + 4 * k], b[3 + 4 * k], b[4 + 4 * k], b[5 + 4 * k]]);
            let spread = _mm256_shuffle_epi8(_mm256_set1_epi32(bits as i32), byte_of);
            let clear = _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), _mm256_setzero_si256());
            let q = _mm256_loadu_si256(a.q.as_ptr().add(32 * y) as *const __m256i);
            let signed = _mm256_sub_epi8(_mm256_xor_si256(q, clear), clear);
            block = _mm256_fmadd_ps(_mm256_set1_ps(a.d[y]), _mm256_cvtepi32_ps(sum_i8(signed)), block);
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(f16_at(b)), block, acc);
    }
    hsum_f32(acc)
}

/// Q2_0: the 8 bytes of 32 codes shifted by 0, 2, 4, 6 in the four 64-bit lanes give the four planes
/// (`blocks`' plane order, in which the activations are kept too); `Σ u·x − Σ x`.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q2_0_row(row: &[u8], a: &Q8Activations) -> f32 {
    let shifts = _mm256_setr_epi64x(0, 2, 4, 6);
    let three = _mm256_set1_epi8(3);
    let mut acc = _mm256_setzero_ps();
    for (i, b) in row.chunks_exact(18).enumerate() {
        let mut block = _mm256_setzero_ps();
        for k in 0..2 {
            let y = 2 * i + k;
            let bytes = u64::from_le_bytes(b[2 + 8 * k..10 + 8 * k].try_into().unwrap());
            let u = _mm256_and_si256(_mm256_srlv_epi64(_mm256_set1_epi64x(bytes as i64), shifts), three);
            let x = _mm256_loadu_si256(a.planes.as_ptr().add(32 * y) as *const __m256i);
            let dot = _mm256_madd_epi16(_mm256_maddubs_epi16(u, x), _mm256_set1_epi16(1));
            let dot = _mm256_sub_epi32(dot, _mm256_setr_epi32(a.sum[y], 0, 0, 0, 0, 0, 0, 0));
            block = _mm256_fmadd_ps(_mm256_set1_ps(a.d[y]), _mm256_cvtepi32_ps(dot), block);
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(f16_at(b)), block, acc);
    }
    hsum_f32(acc)
}

/// Q8_0 × Q8_0: `maddubs(|w|, x·sign(w))` (|−128| = 128 is right as an unsigned byte).
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q8_0_row(row: &[u8], a: &Q8Activations) -> f32 {
    let mut acc = _mm256_setzero_ps();
    for (i, b) in row.chunks_exact(34).enumerate() {
        let w = _mm256_loadu_si256(b.as_ptr().add(2) as *const __m256i);
        let x = _mm256_loadu_si256(a.q.as_ptr().add(32 * i) as *const __m256i);
        let prod = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
        let dot = _mm256_madd_epi16(prod, _mm256_set1_epi16(1));
        acc = _mm256_fmadd_ps(_mm256_set1_ps(f16_at(b) * a.d[i]), _mm256_cvtepi32_ps(dot), acc);
    }
    hsum_f32(acc)
}

// ---------------------------------------------------------------------------------------------------
// The quantized head (see `qhead`): a 64-byte step of the lane layout is two vectors of 8 blocks, one
// i32 lane per block; each vector is taken through its group's steps, then scaled and added up.

/// The integer steps of the quantized head: per i32 lane, four byte products summed.
trait HeadDot {
    /// Whether [`HeadDot::q8_0`] sums the stored unsigned bytes (then the activations' `corr` is still
    /// to subtract) or the signed values.
    const Q8_0_UNSIGNED: bool;
    /// `acc + Σ u·x` for unsigned `u`, where any two neighbouring products sum within i16 (Q6_K: u < 64).
    unsafe fn dot(acc: __m256i, u: __m256i, x: __m256i) -> __m256i;
    /// For Q8_0's stored `u = q + 128`: `acc + Σ u·x` or `acc + Σ q·x`, as `Q8_0_UNSIGNED` says.
    unsafe fn q8_0(acc: __m256i, u: __m256i, x: __m256i) -> __m256i;
}

struct Maddubs;
struct AvxVnni;

impl HeadDot for Maddubs {
    const Q8_0_UNSIGNED: bool = false;

    #[inline(always)]
    unsafe fn dot(acc: __m256i, u: __m256i, x: __m256i) -> __m256i {
        _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, x), _mm256_set1_epi16(1)))
    }

    /// `Σ u·x` would overflow `maddubs`'s i16 pairs; `Σ |q|·(±x)`, the sign of `q` moved onto `x`, stays
    /// within 2·128·127 because `x` is never −128.
    #[inline(always)]
    unsafe fn q8_0(acc: __m256i, u: __m256i, x: __m256i) -> __m256i {
        let q = _mm256_xor_si256(u, _mm256_set1_epi8(-128));
        Self::dot(acc, _mm256_abs_epi8(q), _mm256_sign_epi8(x, q))
    }
}

impl HeadDot for AvxVnni {
    const Q8_0_UNSIGNED: bool = true;

    #[inline(always)]
    unsafe fn dot(acc: __m256i, u: __m256i, x: __m256i) -> __m256i {
        _mm256_dpbusd_avx_epi32(acc, u, x)
    }

    #[inline(always)]
    unsafe fn q8_0(acc: __m256i, u: __m256i, x: __m256i) -> __m256i {
        _mm256_dpbusd_avx_epi32(acc, u, x)
    }
}

// The generic body is compiled once per feature set, so that the plain variant holds no VNNI
// instruction that the compiler might otherwise fuse from `maddubs`/`madd`/`add`.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn qhead_plain(h: &QuantHead, rows: Range<usize>, a: &HeadActivations, out: &mut [f32]) {
    by_tiles(rows, out, |r| head_tile::<Maddubs, HEAD_ROWS>(h, r, a), |r| head_tile::<Maddubs, 1>(h, r, a)[0]);
}

#[target_feature(enable = "avx2,fma,f16c,avxvnni")]
unsafe fn qhead_vnni(h: &QuantHead, rows: Range<usize>, a: &HeadActivations, out: &mut [f32]) {
    by_tiles(rows, out, |r| head_tile::<AvxVnni, HEAD_ROWS>(h, r, a), |r| head_tile::<AvxVnni, 1>(h, r, a)[0]);
}

/// Rows of a tile: they share each activation load.
const HEAD_ROWS: usize = 4;

#[inline(always)]
unsafe fn head_tile<D: HeadDot, const R: usize>(h: &QuantHead, r0: usize, a: &HeadActivations) -> [f32; R] {
    if h.ty == GgmlType::Q6_K {
        q6_k_tile::<D, R>(h, r0, a)
    } else {
        q8_0_tile::<D, R>(h, r0, a)
    }
}

/// Requests the lines of group bytes `start..start + len` of the rows two tiles ahead.
#[inline(always)]
unsafe fn prefetch_group(tile: *const u8, rows: usize, stride: usize, start: usize, len: usize) {
    for offset in (start..start + len).step_by(64) {
        prefetch_tiles_ahead(tile, rows, stride, offset);
    }
}

/// The first `lanes` i32 lanes (of 8) at `p`, the others zero: the vector of a short last group.
#[inline(always)]
unsafe fn load_lanes(p: *const u8, lanes: usize) -> __m256i {
    if lanes == 8 {
        _mm256_loadu_si256(p as *const __m256i)
    } else {
        let mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(lanes as i32), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        _mm256_maskload_epi32(p as *const i32, mask)
    }
}

/// Q8_0 rows `r0..r0 + R`: per group of J blocks, `32·J` bytes of `q + 128` then the J f16 scales.
#[inline(always)]
unsafe fn q8_0_tile<D: HeadDot, const R: usize>(h: &QuantHead, r0: usize, a: &HeadActivations) -> [f32; R] {
    let row = |r: usize| h.data.as_ptr().add((r0 + r) * h.row_bytes);
    let blocks = h.cols / 32;
    let mut total = [_mm256_setzero_ps(); R];
    let mut short = [0f32; R]; // a short last group's partial vector, finished lane by lane
    for g in 0..blocks.div_ceil(qhead::LANES) {
        let (j, base) = ((blocks - 16 * g).min(16), 544 * g);
        prefetch_group(row(0), R, h.row_bytes, base, 34 * j);
        let xs = a.q.as_ptr().add(512 * g) as *const u8;
        for v in 0..j.div_ceil(8) {
            let (lanes, first) = ((j - 8 * v).min(8), 16 * g + 8 * v); // `first`: the block in lane 0
            let mut acc = [_mm256_setzero_si256(); R];
            for k in 0..8 {
                let at = 4 * j * k + 32 * v;
                let x = load_lanes(xs.add(at), lanes);
                for r in 0..R {
                    acc[r] = D::q8_0(acc[r], load_lanes(row(r).add(base + at), lanes), x);
                }
            }
            if lanes < 8 {
                for r in 0..R {
                    let dots: [i32; 8] = std::mem::transmute(acc[r]);
                    short[r] += qhead::scale_lanes(h, r0 + r, first, &dots[..lanes], a, D::Q8_0_UNSIGNED);
                }
                continue;
            }
            let corr = if D::Q8_0_UNSIGNED {
                _mm256_loadu_si256(a.corr.as_ptr().add(first) as *const __m256i)
            } else {
                _mm256_setzero_si256()
            };
            let dx = _mm256_loadu_ps(a.d.as_ptr().add(first));
            for r in 0..R {
                let dw = _mm256_cvtph_ps(_mm_loadu_si128(row(r).add(base + 32 * j + 16 * v) as *const __m128i));
                let dot = _mm256_cvtepi32_ps(_mm256_sub_epi32(acc[r], corr));
                total[r] = _mm256_fmadd_ps(dot, _mm256_mul_ps(dw, dx), total[r]);
            }
        }
    }
    std::array::from_fn(|r| hsum_f32(total[r]) + short[r])
}

/// Q6_K rows `r0..r0 + R`: per 256 values, 128 bytes of nibbles, 64 of high bits, 16 int8 sub-block
/// scales and an f16 `d`; 32-byte half `v` of each part holds sub-blocks `8v..8v + 8`.
#[inline(always)]
unsafe fn q6_k_tile<D: HeadDot, const R: usize>(h: &QuantHead, r0: usize, a: &HeadActivations) -> [f32; R] {
    let row = |r: usize| h.data.as_ptr().add((r0 + r) * h.row_bytes);
    let (low4, high2) = (_mm256_set1_epi8(0x0f), _mm256_set1_epi8(0x30));
    let nib = |v: __m256i| _mm256_and_si256(v, low4);
    let top = |v: __m256i| _mm256_and_si256(v, high2);
    let mut total = [_mm256_setzero_ps(); R];
    for g in 0..h.cols / 256 {
        prefetch_group(row(0), R, h.row_bytes, 210 * g, 210);
        let xs = a.q.as_ptr().add(256 * g);
        for v in 0..2 {
            let first = 16 * g + 8 * v;
            let x: [__m256i; 4] =
                std::array::from_fn(|k| _mm256_loadu_si256(xs.add(64 * k + 32 * v) as *const __m256i));
            let corr = _mm256_loadu_si256(a.corr.as_ptr().add(first) as *const __m256i);
            let dx = _mm256_loadu_ps(a.d.as_ptr().add(first));
            for r in 0..R {
                let b = row(r).add(210 * g);
                let load = |at: usize| _mm256_loadu_si256(b.add(at + 32 * v) as *const __m256i);
                let (lo, hi, qh) = (load(0), load(64), load(128));
                let steps = [
                    _mm256_or_si256(nib(lo), top(_mm256_slli_epi16(qh, 4))),
                    _mm256_or_si256(nib(_mm256_srli_epi16(lo, 4)), top(_mm256_slli_epi16(qh, 2))),
                    _mm256_or_si256(nib(hi), top(qh)),
                    _mm256_or_si256(nib(_mm256_srli_epi16(hi, 4)), top(_mm256_srli_epi16(qh, 2))),
                ];
                let mut acc = _mm256_setzero_si256();
                for k in 0..4 {
                    acc = D::dot(acc, steps[k], x[k]);
                }
                let sc =
                    _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(b.add(192 + 8 * v) as *const __m128i)));
                let d = _mm256_broadcastss_ps(_mm_cvtph_ps(_mm_cvtsi32_si128(
                    (b.add(208) as *const u16).read_unaligned() as i32,
                )));
                let scale = _mm256_mul_ps(_mm256_mul_ps(sc, dx), d);
                total[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(acc, corr)), scale, total[r]);
            }
        }
    }
    std::array::from_fn(|r| hsum_f32(total[r]))
}
