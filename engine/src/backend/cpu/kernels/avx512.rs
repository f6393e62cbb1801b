//! x86-64 AVX-512 kernels (F, BW, VL, with VNNI's `vpdpbusd` where the CPU has it). Chosen at run
//! time by [`super::best`]; both variants are registered so that the tests cover both on a VNNI CPU.
//!
//! Ternary rows: a 32-byte block holds 128 codes as `u = code + 1` in four 2-bit planes (byte `j`:
//! columns `j, 32+j, 64+j, 96+j` at bits 7:6, 5:4, 3:2, 1:0). The block is broadcast to both halves
//! of a 512-bit register and masked with `0xC0 | 0x30` (one mask per half): the low half then holds
//! `64·u` of columns 0..32 and the high half `16·u` of columns 32..64, which lines up with one plain
//! 64-byte load of the activations. `0x0C | 0x03` does the same for columns 64..128. No shifts in the
//! inner loop: the accumulator lanes of each half keep their factor (64, 16, 4, 1) and are shifted
//! back once per row, exactly. `Σ u·x − Σ x = Σ code·x`.
//!
//! With VNNI one `vpdpbusd` multiplies 64 unsigned-by-signed bytes and adds each group of four into an
//! i32 lane; without it `vpmaddubsw` + `vpmaddwd` computes the same sums (`64·2·x` pairs stay within
//! i16: `2·128·(−128) = −32768`). A tile of rows × tokens shares each weight and activation load.

// Index loops: one index addresses accumulators, loads and pointer offsets at once.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;
use std::ops::Range;

use half::f16;

use super::avx2::prefetch_tiles_ahead;
use super::blocks::Q8Activations;
use super::qhead::{self, HeadActivations, QuantHead};
use super::{by_tiles, Kernels};
use crate::format::quant::GgmlType;
use crate::tensor::float::FloatMatrix;
use crate::tensor::ternary::TernaryMatrix;

pub struct Avx512 {
    vnni: bool,
}

static BW: Avx512 = Avx512 { vnni: false };
static VNNI: Avx512 = Avx512 { vnni: true };

impl Avx512 {
    fn base() -> bool {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    }

    /// The variants this CPU runs, slowest first: BW, then VNNI.
    pub fn available() -> Vec<&'static dyn Kernels> {
        let mut v: Vec<&'static dyn Kernels> = Vec::new();
        if Self::base() {
            v.push(&BW);
            if is_x86_feature_detected!("avx512vnni") {
                v.push(&VNNI);
            }
        }
        v
    }
}

impl Kernels for Avx512 {
    fn name(&self) -> &'static str {
        if self.vnni {
            "avx512vnni"
        } else {
            "avx512bw"
        }
    }

    fn ternary_rows(&self, w: &TernaryMatrix, rows: Range<usize>, xq: &[i8], out: &mut [i32]) {
        self.ternary_gemm(w, rows, xq, 1, out);
    }

    fn ternary_gemm(&self, w: &TernaryMatrix, rows: Range<usize>, xq: &[i8], n: usize, out: &mut [i32]) {
        assert!(rows.end <= w.rows && xq.len() >= n * w.padded_cols() && out.len() >= n * rows.len());
        // SAFETY: `Avx512` values are only handed out by `available()` after checking the features
        // (VNNI for the VNNI variant); the assert above bounds every pointer the tiles read or write.
        unsafe {
            if self.vnni {
                gemm_vnni(w, rows, xq, n, out)
            } else {
                gemm_bw(w, rows, xq, n, out)
            }
        }
    }

    fn quant_head_rows(&self, h: &QuantHead, rows: Range<usize>, a: &HeadActivations, out: &mut [f32]) {
        qhead::check_args(h, &rows, a, out);
        // SAFETY: features as above; the checks bound every read (rows hold the lane layout of `cols`).
        unsafe {
            if self.vnni {
                qhead_vnni(h, rows, a, out)
            } else {
                qhead_bw(h, rows, a, out)
            }
        }
    }

    fn reads_fast(&self, ty: GgmlType) -> bool {
        matches!(ty, GgmlType::F16 | GgmlType::Q8_0 | GgmlType::Q5_0 | GgmlType::Q6_K)
    }

    fn float_rows(&self, w: &FloatMatrix, rows: Range<usize>, x: &[f32], out: &mut [f32]) {
        self.float_gemm(w, rows, x, 1, out)
    }

    fn float_gemm(&self, w: &FloatMatrix, rows: Range<usize>, x: &[f32], n: usize, out: &mut [f32]) {
        assert!(rows.end <= w.rows && x.len() >= n * w.cols && out.len() >= n * rows.len());
        // SAFETY: as above; rows hold `cols` elements of their type (checked when the matrix was built).
        unsafe {
            match w.ty {
                GgmlType::F16 => f16_gemm(w, rows, x, n, out),
                GgmlType::Q8_0 => q8_0_gemm(w, rows, x, n, out),
                GgmlType::Q5_0 => q5_0_gemm(w, rows, x, n, out),
                _ => {
                    let len = rows.len();
                    for t in 0..n {
                        let (x, out) = (&x[t * w.cols..(t + 1) * w.cols], &mut out[t * len..(t + 1) * len]);
                        match w.ty {
                            GgmlType::Q6_K => q6_k_rows(w, rows.clone(), x, out),
                            _ => super::scalar::Scalar.float_rows(w, rows.clone(), x, out),
                        }
                    }
                }
            }
        }
    }

    // Attention takes the AVX2 loops (every AVX-512 CPU has AVX2, FMA and F16C): 16-wide masked rows measured
    // slower on 128-wide heads (4096 positions, 2 threads: 3.12 ms against 2.62; BENCHMARKS.md).
    fn attn_scores(&self, q: &[f32], keys: &[f16], stride: usize, out: &mut [f32]) {
        super::avx2::AVX2.attn_scores(q, keys, stride, out)
    }

    fn attn_values(&self, p: &[f32], values: &[f16], stride: usize, out: &mut [f32]) {
        super::avx2::AVX2.attn_values(p, values, stride, out)
    }

    // Q1_0/Q2_0/Q8_0 projections take the AVX2 loops too (no 512-bit version yet).
    fn block_rows(&self, w: &FloatMatrix, rows: Range<usize>, a: &Q8Activations, out: &mut [f32]) {
        super::avx2::AVX2.block_rows(w, rows, a, out)
    }
}

/// One step of the integer dot product: `acc + Σ_{4 bytes} u·x` per i32 lane (u unsigned, x signed).
trait Dot {
    /// For `u` ≤ 128 (what `maddubs` takes without saturating).
    unsafe fn dot(acc: __m512i, u: __m512i, x: __m512i) -> __m512i;
    /// For any `u`.
    unsafe fn dot_u8(acc: __m512i, u: __m512i, x: __m512i) -> __m512i;
}

struct Vnni;
struct Bw;

impl Dot for Vnni {
    #[inline(always)]
    unsafe fn dot(acc: __m512i, u: __m512i, x: __m512i) -> __m512i {
        _mm512_dpbusd_epi32(acc, u, x)
    }

    #[inline(always)]
    unsafe fn dot_u8(acc: __m512i, u: __m512i, x: __m512i) -> __m512i {
        _mm512_dpbusd_epi32(acc, u, x)
    }
}

impl Dot for Bw {
    #[inline(always)]
    unsafe fn dot(acc: __m512i, u: __m512i, x: __m512i) -> __m512i {
        _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(u, x), _mm512_set1_epi16(1)))
    }

    /// `u = 16·hi + lo`: each nibble's products stay within i16.
    #[inline(always)]
    unsafe fn dot_u8(acc: __m512i, u: __m512i, x: __m512i) -> __m512i {
        let low4 = _mm512_set1_epi8(0x0f);
        let lo = Self::dot(_mm512_setzero_si512(), _mm512_and_si512(u, low4), x);
        let hi = Self::dot(_mm512_setzero_si512(), _mm512_and_si512(_mm512_srli_epi16(u, 4), low4), x);
        _mm512_add_epi32(acc, _mm512_add_epi32(lo, _mm512_slli_epi32(hi, 4)))
    }
}

// The generic body is compiled twice, once per feature set, so the BW variant never contains a VNNI
// instruction that the compiler might otherwise fuse from `maddubs`/`madd`/`add`.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn gemm_vnni(w: &TernaryMatrix, rows: Range<usize>, xq: &[i8], n: usize, out: &mut [i32]) {
    gemm::<Vnni>(w, rows, xq, n, out)
}

#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn gemm_bw(w: &TernaryMatrix, rows: Range<usize>, xq: &[i8], n: usize, out: &mut [i32]) {
    gemm::<Bw>(w, rows, xq, n, out)
}

/// Tokens in a gemm tile, and rows per tile for one token (decode) and for a token tile.
const TOKENS: usize = 3;
const ROWS_DECODE: usize = 4;
const ROWS_GEMM: usize = 4;

#[inline(always)]
unsafe fn gemm<D: Dot>(w: &TernaryMatrix, rows: Range<usize>, xq: &[i8], n: usize, out: &mut [i32]) {
    let mut t = 0;
    while t < n {
        match n - t {
            1 => token_tile::<D, ROWS_DECODE, 1>(w, rows.clone(), xq, t, out),
            2 => token_tile::<D, ROWS_GEMM, 2>(w, rows.clone(), xq, t, out),
            _ => token_tile::<D, ROWS_GEMM, TOKENS>(w, rows.clone(), xq, t, out),
        }
        t += (n - t).min(TOKENS);
    }
}

/// Tokens `t0..t0 + T` against every row of `rows`, `R` rows at a time.
#[inline(always)]
unsafe fn token_tile<D: Dot, const R: usize, const T: usize>(
    w: &TernaryMatrix,
    rows: Range<usize>,
    xq: &[i8],
    t0: usize,
    out: &mut [i32],
) {
    let p = w.padded_cols();
    let x = xq.as_ptr().add(t0 * p);
    let sums: [i32; T] = std::array::from_fn(|t| sum_i8::<D>(x.add(t * p), p));
    let len = rows.len();
    let mut r = rows.start;
    let mut put = |r: usize, acc: &[i32; T]| {
        for t in 0..T {
            out[(t0 + t) * len + r - rows.start] = acc[t] - sums[t];
        }
    };
    while r + R <= rows.end {
        let acc = tile::<D, R, T>(w, r, x, p);
        for (i, a) in acc.iter().enumerate() {
            put(r + i, a);
        }
        r += R;
    }
    while r < rows.end {
        put(r, &tile::<D, 1, T>(w, r, x, p)[0]);
        r += 1;
    }
}

/// `Σ_c u(r, c)·x(t, c)` for rows `r0..r0 + R` and the `T` activation vectors at `x` (stride `p`).
#[inline(always)]
unsafe fn tile<D: Dot, const R: usize, const T: usize>(
    w: &TernaryMatrix,
    r0: usize,
    x: *const i8,
    p: usize,
) -> [[i32; T]; R] {
    let stride = p / 4;
    let wp = w.data.as_ptr().add(r0 * stride);
    let halves = |lo: u8, hi: u8| _mm512_inserti64x4(_mm512_set1_epi8(lo as i8), _mm256_set1_epi8(hi as i8), 1);
    let (mask_a, mask_b) = (halves(0xC0, 0x30), halves(0x0C, 0x03));
    let mut acc_a = [[_mm512_setzero_si512(); T]; R];
    let mut acc_b = [[_mm512_setzero_si512(); T]; R];
    for b in 0..p / 128 {
        if b % 2 == 0 {
            prefetch_tiles_ahead(wp, R, stride, 32 * b); // a line is two steps
        }
        let block =
            |r: usize| _mm512_broadcast_i64x4(_mm256_loadu_si256(wp.add(r * stride + 32 * b) as *const __m256i));
        let xs = x.add(128 * b);
        let ua: [__m512i; R] = std::array::from_fn(|r| _mm512_and_si512(block(r), mask_a));
        for t in 0..T {
            let xa = _mm512_loadu_si512(xs.add(t * p) as *const _);
            for r in 0..R {
                acc_a[r][t] = D::dot(acc_a[r][t], ua[r], xa);
            }
        }
        let ub: [__m512i; R] = std::array::from_fn(|r| _mm512_and_si512(block(r), mask_b));
        for t in 0..T {
            let xb = _mm512_loadu_si512(xs.add(t * p + 64) as *const _);
            for r in 0..R {
                acc_b[r][t] = D::dot(acc_b[r][t], ub[r], xb);
            }
        }
    }
    // Undo the plane factors: lanes 0..8 of acc_a hold 64·Σ, lanes 8..16 16·Σ; of acc_b 4·Σ and 1·Σ.
    let shift = |lo: i32, hi: i32| _mm512_inserti64x4(_mm512_set1_epi32(lo), _mm256_set1_epi32(hi), 1);
    let (shift_a, shift_b) = (shift(6, 4), shift(2, 0));
    let mut v = [_mm512_setzero_si512(); 16];
    for r in 0..R {
        for t in 0..T {
            let a = _mm512_srav_epi32(acc_a[r][t], shift_a);
            v[r * T + t] = _mm512_add_epi32(a, _mm512_srav_epi32(acc_b[r][t], shift_b));
        }
    }
    let sums = hsum16(v);
    std::array::from_fn(|r| std::array::from_fn(|t| sums[r * T + t]))
}

/// The lane sums of 16 vectors at once (a tile's R·T ≤ 16 accumulators, zeros past them): a transposition
/// tree of 31 additions and shuffles, where one horizontal sum per accumulator took ~10 instructions each,
/// as many as the whole dot product of a short row (576 columns: 4.5 blocks).
#[inline(always)]
unsafe fn hsum16(v: [__m512i; 16]) -> [i32; 16] {
    // Each step adds the halves of two vectors and packs the two results into one.
    let l1: [__m512i; 8] = std::array::from_fn(|i| {
        let (a, b) = (v[2 * i], v[2 * i + 1]);
        _mm512_add_epi32(_mm512_shuffle_i32x4::<0x44>(a, b), _mm512_shuffle_i32x4::<0xEE>(a, b))
    });
    // 128-bit lane k of l2[i]: four partial sums of v[4i + k].
    let l2: [__m512i; 4] = std::array::from_fn(|i| {
        let (a, b) = (l1[2 * i], l1[2 * i + 1]);
        _mm512_add_epi32(_mm512_shuffle_i32x4::<0x88>(a, b), _mm512_shuffle_i32x4::<0xDD>(a, b))
    });
    // Lane k of l3[i]: two partial sums of v[8i + k], then two of v[8i + 4 + k].
    let l3: [__m512i; 2] = std::array::from_fn(|i| {
        let (a, b) = (l2[2 * i], l2[2 * i + 1]);
        _mm512_add_epi32(_mm512_unpacklo_epi64(a, b), _mm512_unpackhi_epi64(a, b))
    });
    // Lane k: the sums of v[k], v[4 + k], v[8 + k], v[12 + k] (elements 0, 2 and 1, 3 of each l3 lane).
    let (a, b) = (_mm512_castsi512_ps(l3[0]), _mm512_castsi512_ps(l3[1]));
    let s = _mm512_add_epi32(
        _mm512_castps_si512(_mm512_shuffle_ps::<0x88>(a, b)),
        _mm512_castps_si512(_mm512_shuffle_ps::<0xDD>(a, b)),
    );
    // Element 4k + j holds v[4j + k]'s sum: into natural order.
    let order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    std::mem::transmute(_mm512_permutexvar_epi32(order, s))
}

/// `Σ x` over `p` int8 activations (`p` a multiple of 64), with the same dot step.
#[inline(always)]
unsafe fn sum_i8<D: Dot>(x: *const i8, p: usize) -> i32 {
    let ones = _mm512_set1_epi8(1);
    let mut acc = _mm512_setzero_si512();
    for i in (0..p).step_by(64) {
        acc = D::dot(acc, ones, _mm512_loadu_si512(x.add(i) as *const _));
    }
    _mm512_reduce_add_epi32(acc)
}

// ---------------------------------------------------------------------------------------------------
// Float rows (the LM head). A tile of rows × tokens shares each activation load and each decoded weight
// vector. Each (row, token) goes through the same operations whatever the tile, so a step of many sequences
// gives each one the logits of stepping it alone, bit for bit.

const FLOAT_ROWS: usize = 4;

/// A float storage type's tile: `Σ_c W(r0 + r, c)·x(t, c)` for rows `r0..r0 + R` and the `T` vectors at `x`
/// (stride `w.cols`).
trait FloatTile {
    /// Tokens per tile, at most (what the registers hold).
    const TOKENS: usize;
    unsafe fn tile<const R: usize, const T: usize>(w: &FloatMatrix, r0: usize, x: *const f32) -> [[f32; T]; R];
}

/// `float_gemm` (`float_rows` for n = 1) with tiles of `K`: tokens `TOKENS` at a time, rows `FLOAT_ROWS`.
#[inline(always)]
unsafe fn float_gemm<K: FloatTile>(w: &FloatMatrix, rows: Range<usize>, x: &[f32], n: usize, out: &mut [f32]) {
    let mut t = 0;
    while t < n {
        let left = (n - t).min(K::TOKENS);
        match left {
            1 => float_tokens::<K, 1>(w, rows.clone(), x, t, out),
            2 => float_tokens::<K, 2>(w, rows.clone(), x, t, out),
            3 => float_tokens::<K, 3>(w, rows.clone(), x, t, out),
            _ => float_tokens::<K, 4>(w, rows.clone(), x, t, out),
        }
        t += left;
    }
}

/// Tokens `t0..t0 + T` against every row of `rows`; results token-major (`out[t·len + i]`).
#[inline(always)]
unsafe fn float_tokens<K: FloatTile, const T: usize>(
    w: &FloatMatrix,
    rows: Range<usize>,
    x: &[f32],
    t0: usize,
    out: &mut [f32],
) {
    let (len, xp) = (rows.len(), x.as_ptr().add(t0 * w.cols));
    let mut put = |r: usize, v: &[f32; T]| {
        for (t, v) in v.iter().enumerate() {
            out[(t0 + t) * len + r - rows.start] = *v;
        }
    };
    let mut r = rows.start;
    while r + FLOAT_ROWS <= rows.end {
        for (i, v) in K::tile::<FLOAT_ROWS, T>(w, r, xp).iter().enumerate() {
            put(r + i, v);
        }
        r += FLOAT_ROWS;
    }
    while r < rows.end {
        put(r, &K::tile::<1, T>(w, r, xp)[0]);
        r += 1;
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c")]
unsafe fn f16_gemm(w: &FloatMatrix, rows: Range<usize>, x: &[f32], n: usize, out: &mut [f32]) {
    float_gemm::<F16>(w, rows, x, n, out)
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c")]
unsafe fn q8_0_gemm(w: &FloatMatrix, rows: Range<usize>, x: &[f32], n: usize, out: &mut [f32]) {
    float_gemm::<Q8_0>(w, rows, x, n, out)
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c")]
unsafe fn q5_0_gemm(w: &FloatMatrix, rows: Range<usize>, x: &[f32], n: usize, out: &mut [f32]) {
    float_gemm::<Q5_0>(w, rows, x, n, out)
}

struct F16;
struct Q8_0;
struct Q5_0;

/// F16 rows: 16 halves → 16 floats per `vcvtph2ps`, two accumulators per (row, token); a masked tail.
impl FloatTile for F16 {
    const TOKENS: usize = 2;

    #[inline(always)]
    unsafe fn tile<const R: usize, const T: usize>(w: &FloatMatrix, r0: usize, x: *const f32) -> [[f32; T]; R] {
        let n = w.cols;
        let row = |r: usize| w.data.as_ptr().add((r0 + r) * w.row_bytes) as *const u16;
        let mut acc0 = [[_mm512_setzero_ps(); T]; R];
        let mut acc1 = [[_mm512_setzero_ps(); T]; R];
        let mut i = 0;
        while i + 32 <= n {
            prefetch_tiles_ahead(row(0) as *const u8, R, w.row_bytes, 2 * i);
            let xs: [(__m512, __m512); T] =
                std::array::from_fn(|t| (_mm512_loadu_ps(x.add(t * n + i)), _mm512_loadu_ps(x.add(t * n + i + 16))));
            for r in 0..R {
                let h0 = _mm512_cvtph_ps(_mm256_loadu_si256(row(r).add(i) as *const __m256i));
                let h1 = _mm512_cvtph_ps(_mm256_loadu_si256(row(r).add(i + 16) as *const __m256i));
                for t in 0..T {
                    acc0[r][t] = _mm512_fmadd_ps(h0, xs[t].0, acc0[r][t]);
                    acc1[r][t] = _mm512_fmadd_ps(h1, xs[t].1, acc1[r][t]);
                }
            }
            i += 32;
        }
        while i < n {
            let m = lanes(n - i);
            for r in 0..R {
                let h = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, row(r).add(i) as *const i16));
                for t in 0..T {
                    acc0[r][t] = _mm512_fmadd_ps(h, _mm512_maskz_loadu_ps(m, x.add(t * n + i)), acc0[r][t]);
                }
            }
            i += 16;
        }
        std::array::from_fn(|r| std::array::from_fn(|t| _mm512_reduce_add_ps(_mm512_add_ps(acc0[r][t], acc1[r][t]))))
    }
}

/// The mask of the first `min(left, 16)` lanes.
#[inline(always)]
fn lanes(left: usize) -> u16 {
    if left >= 16 {
        0xffff
    } else {
        (1u16 << left) - 1
    }
}

/// The f16 scale at the start of a block, broadcast.
#[inline(always)]
unsafe fn block_scale(p: *const u8) -> __m512 {
    let h = (p as *const u16).read_unaligned();
    _mm512_broadcastss_ps(_mm_cvtph_ps(_mm_cvtsi32_si128(h as i32)))
}

/// 16 int8 weights at `p` as floats.
#[inline(always)]
unsafe fn i8x16_ps(q: __m128i) -> __m512 {
    _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q))
}

/// The blocks of 32 values of Q8_0 and Q5_0 (`decode` gives block `b` of a row as two vectors of 16
/// floats, before its scale): acc += d·(q0·x0 + q1·x1) per (row, token).
#[inline(always)]
unsafe fn block32_tile<const R: usize, const T: usize>(
    w: &FloatMatrix,
    r0: usize,
    x: *const f32,
    block_bytes: usize,
    decode: impl Fn(*const u8) -> (__m512, __m512),
) -> [[f32; T]; R] {
    let (n, row) = (w.cols, |r: usize| w.data.as_ptr().add((r0 + r) * w.row_bytes));
    let mut acc = [[_mm512_setzero_ps(); T]; R];
    for b in 0..n / 32 {
        let xs: [(__m512, __m512); T] = std::array::from_fn(|t| {
            (_mm512_loadu_ps(x.add(t * n + 32 * b)), _mm512_loadu_ps(x.add(t * n + 32 * b + 16)))
        });
        for r in 0..R {
            let blk = row(r).add(block_bytes * b);
            let (q0, q1) = decode(blk);
            let d = block_scale(blk);
            for t in 0..T {
                let dot = _mm512_fmadd_ps(q1, xs[t].1, _mm512_mul_ps(q0, xs[t].0));
                acc[r][t] = _mm512_fmadd_ps(dot, d, acc[r][t]);
            }
        }
    }
    std::array::from_fn(|r| std::array::from_fn(|t| _mm512_reduce_add_ps(acc[r][t])))
}

/// Q8_0: blocks of an f16 scale `d` and 32 int8 values (34 bytes); value = d·q.
impl FloatTile for Q8_0 {
    const TOKENS: usize = 4;

    #[inline(always)]
    unsafe fn tile<const R: usize, const T: usize>(w: &FloatMatrix, r0: usize, x: *const f32) -> [[f32; T]; R] {
        block32_tile::<R, T>(w, r0, x, 34, |blk| {
            (
                i8x16_ps(_mm_loadu_si128(blk.add(2) as *const __m128i)),
                i8x16_ps(_mm_loadu_si128(blk.add(18) as *const __m128i)),
            )
        })
    }
}

/// Q5_0: blocks of an f16 scale `d`, 32 high bits `qh` and 16 bytes of nibbles (22 bytes); element
/// `j < 16` is the low nibble of byte `j`, element `j + 16` its high nibble, bit `j` of `qh` is the
/// fifth bit of element `j`; value = d·(q − 16).
impl FloatTile for Q5_0 {
    const TOKENS: usize = 4;

    #[inline(always)]
    unsafe fn tile<const R: usize, const T: usize>(w: &FloatMatrix, r0: usize, x: *const f32) -> [[f32; T]; R] {
        let (low4, bit4, sixteen) = (_mm_set1_epi8(0x0f), _mm256_set1_epi8(0x10), _mm256_set1_epi8(16));
        block32_tile::<R, T>(w, r0, x, 22, |blk| {
            let qh = (blk.add(2) as *const u32).read_unaligned();
            let qs = _mm_loadu_si128(blk.add(6) as *const __m128i);
            let nibbles = _mm256_inserti128_si256(
                _mm256_castsi128_si256(_mm_and_si128(qs, low4)),
                _mm_and_si128(_mm_srli_epi16(qs, 4), low4),
                1,
            );
            let q = _mm256_sub_epi8(_mm256_or_si256(nibbles, _mm256_maskz_mov_epi8(qh, bit4)), sixteen);
            (i8x16_ps(_mm256_castsi256_si128(q)), i8x16_ps(_mm256_extracti128_si256(q, 1)))
        })
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c")]
unsafe fn q6_k_rows(w: &FloatMatrix, rows: Range<usize>, x: &[f32], out: &mut [f32]) {
    by_tiles(rows, out, |r| q6_k_tile::<FLOAT_ROWS>(w, r, x), |r| q6_k_tile::<1>(w, r, x)[0]);
}

/// Q6_K: blocks of 256 values (210 bytes): 128 bytes of low nibbles `ql`, 64 of 2-bit highs `qh`, 16
/// int8 scales (one per 16 values), an f16 `d`; value = d·scale·(q − 32). Each half of a block takes
/// 64 bytes of `ql` and 32 of `qh`: value `l` (< 32) is the low nibble of `ql[l]` with bits 0-1 of
/// `qh[l]`, `l + 32` the low nibble of `ql[l + 32]` with bits 2-3, `l + 64` the high nibble of `ql[l]`
/// with bits 4-5, `l + 96` the high nibble of `ql[l + 32]` with bits 6-7.
#[inline(always)]
unsafe fn q6_k_tile<const R: usize>(w: &FloatMatrix, r0: usize, x: &[f32]) -> [f32; R] {
    let row = |r: usize| w.data.as_ptr().add((r0 + r) * w.row_bytes);
    let (low4, high2, thirty_two) = (_mm256_set1_epi8(0x0f), _mm256_set1_epi8(0x30), _mm256_set1_epi8(32));
    let mut acc = [_mm512_setzero_ps(); R];
    for b in 0..w.cols / 256 {
        for r in 0..R {
            let blk = row(r).add(210 * b);
            let d =
                _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128((blk.add(208) as *const u16).read_unaligned() as i32)));
            let mut sum = _mm512_setzero_ps();
            for half in 0..2 {
                let ql = blk.add(64 * half);
                let (lo, hi) =
                    (_mm256_loadu_si256(ql as *const __m256i), _mm256_loadu_si256(ql.add(32) as *const __m256i));
                let qh = _mm256_loadu_si256(blk.add(128 + 32 * half) as *const __m256i);
                // The four runs of 32 values, each its nibble | its two high bits moved to bits 4-5.
                let runs = [
                    _mm256_or_si256(_mm256_and_si256(lo, low4), _mm256_and_si256(_mm256_slli_epi16(qh, 4), high2)),
                    _mm256_or_si256(_mm256_and_si256(hi, low4), _mm256_and_si256(_mm256_slli_epi16(qh, 2), high2)),
                    _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(lo, 4), low4), _mm256_and_si256(qh, high2)),
                    _mm256_or_si256(
                        _mm256_and_si256(_mm256_srli_epi16(hi, 4), low4),
                        _mm256_and_si256(_mm256_srli_epi16(qh, 2), high2),
                    ),
                ];
                let scales = blk.add(192 + 8 * half) as *const i8;
                for (k, q) in runs.into_iter().enumerate() {
                    let q = _mm256_sub_epi8(q, thirty_two);
                    let xs = x.as_ptr().add(256 * b + 128 * half + 32 * k);
                    let p0 = _mm512_mul_ps(i8x16_ps(_mm256_castsi256_si128(q)), _mm512_loadu_ps(xs));
                    let p1 = _mm512_mul_ps(i8x16_ps(_mm256_extracti128_si256(q, 1)), _mm512_loadu_ps(xs.add(16)));
                    sum = _mm512_fmadd_ps(p0, _mm512_set1_ps(*scales.add(2 * k) as f32), sum);
                    sum = _mm512_fmadd_ps(p1, _mm512_set1_ps(*scales.add(2 * k + 1) as f32), sum);
                }
            }
            acc[r] = _mm512_fmadd_ps(sum, _mm512_set1_ps(d), acc[r]);
        }
    }
    std::array::from_fn(|r| _mm512_reduce_add_ps(acc[r]))
}

// ---------------------------------------------------------------------------------------------------
// The quantized head (see `qhead`): one i32 lane per block, so a group of 16 blocks needs one
// conversion and one FMA however many values its blocks have.

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,fma,f16c")]
unsafe fn qhead_vnni(h: &QuantHead, rows: Range<usize>, a: &HeadActivations, out: &mut [f32]) {
    by_tiles(rows, out, |r| qhead_tile::<Vnni, FLOAT_ROWS>(h, r, a), |r| qhead_tile::<Vnni, 1>(h, r, a)[0]);
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c")]
unsafe fn qhead_bw(h: &QuantHead, rows: Range<usize>, a: &HeadActivations, out: &mut [f32]) {
    by_tiles(rows, out, |r| qhead_tile::<Bw, FLOAT_ROWS>(h, r, a), |r| qhead_tile::<Bw, 1>(h, r, a)[0]);
}

#[inline(always)]
unsafe fn qhead_tile<D: Dot, const R: usize>(h: &QuantHead, r0: usize, a: &HeadActivations) -> [f32; R] {
    let row = |r: usize| h.data.as_ptr().add((r0 + r) * h.row_bytes);
    let mut total = [_mm512_setzero_ps(); R];
    if h.ty == GgmlType::Q6_K {
        let (low4, high2) = (_mm512_set1_epi8(0x0f), _mm512_set1_epi8(0x30));
        for g in 0..h.cols / 256 {
            let xs = a.q.as_ptr().add(256 * g);
            let x: [__m512i; 4] = std::array::from_fn(|k| _mm512_loadu_si512(xs.add(64 * k) as *const _));
            let corr = _mm512_loadu_si512(a.corr.as_ptr().add(16 * g) as *const _);
            let dx = _mm512_loadu_ps(a.d.as_ptr().add(16 * g));
            for r in 0..R {
                let b = row(r).add(210 * g);
                let (lo, hi) = (_mm512_loadu_si512(b as *const _), _mm512_loadu_si512(b.add(64) as *const _));
                let qh = _mm512_loadu_si512(b.add(128) as *const _);
                let nib = |v: __m512i| _mm512_and_si512(v, low4);
                let top = |v: __m512i| _mm512_and_si512(v, high2);
                let steps = [
                    _mm512_or_si512(nib(lo), top(_mm512_slli_epi16(qh, 4))),
                    _mm512_or_si512(nib(_mm512_srli_epi16(lo, 4)), top(_mm512_slli_epi16(qh, 2))),
                    _mm512_or_si512(nib(hi), top(qh)),
                    _mm512_or_si512(nib(_mm512_srli_epi16(hi, 4)), top(_mm512_srli_epi16(qh, 2))),
                ];
                let mut acc = _mm512_setzero_si512();
                for k in 0..4 {
                    acc = D::dot(acc, steps[k], x[k]);
                }
                let sc = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(b.add(192) as *const __m128i)));
                let scale = _mm512_mul_ps(_mm512_mul_ps(sc, dx), block_scale(b.add(208)));
                total[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc, corr)), scale, total[r]);
            }
        }
    } else {
        let blocks = h.cols / 32;
        for g in 0..blocks.div_ceil(16) {
            let j = (blocks - 16 * g).min(16);
            // A short last group: J lanes, 4·J bytes a step.
            let bytes = u64::MAX >> (64 - 4 * j);
            let lanes = (u32::MAX >> (32 - j)) as u16;
            let xs = a.q.as_ptr().add(512 * g);
            let mut acc = [_mm512_setzero_si512(); R];
            for k in 0..8 {
                let x = _mm512_maskz_loadu_epi8(bytes, xs.add(4 * j * k));
                for r in 0..R {
                    let w = _mm512_maskz_loadu_epi8(bytes, row(r).add(544 * g + 4 * j * k) as *const i8);
                    acc[r] = D::dot_u8(acc[r], w, x);
                }
            }
            let corr = _mm512_maskz_loadu_epi32(lanes, a.corr.as_ptr().add(16 * g));
            let dx = _mm512_maskz_loadu_ps(lanes, a.d.as_ptr().add(16 * g));
            for r in 0..R {
                let dw = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(lanes, row(r).add(544 * g + 32 * j) as *const i16));
                let dot = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r], corr));
                total[r] = _mm512_fmadd_ps(dot, _mm512_mul_ps(dw, dx), total[r]);
            }
        }
    }
    std::array::from_fn(|r| _mm512_reduce_add_ps(total[r]))
}
