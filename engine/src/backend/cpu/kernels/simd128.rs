//! WebAssembly SIMD (simd128) kernels, for the browser. WebAssembly has no run-time feature
//! detection: this module exists only in builds with `-C target-feature=+simd128`, and every
//! engine that loads such a module supports it.
//!
//! Ternary rows use the same trick as the AVX2 and NEON kernels: a 32-byte block holds 128 codes as
//! `u = code + 1` in four 2-bit planes; shifting and masking a plane gives 16 bytes per vector with
//! values 0..=2, multiplied with int8 activations, and `Σ u·x − Σ x = Σ code·x`.

// Index loops: one index addresses accumulators, loads and pointer offsets at once.
#![allow(clippy::needless_range_loop)]

use std::arch::wasm32::*;
use std::ops::Range;

use half::f16;

use super::blocks::{self, Dot32, Q8Activations};
use super::qhead::{self, HeadActivations, QuantHead};
use super::{by_tiles, Kernels};
use crate::format::quant::GgmlType;
use crate::tensor::float::FloatMatrix;
use crate::tensor::ternary::TernaryMatrix;

pub struct Simd128;

impl Kernels for Simd128 {
    fn name(&self) -> &'static str {
        "simd128"
    }

    fn ternary_rows(&self, w: &TernaryMatrix, rows: Range<usize>, xq: &[i8], out: &mut [i32]) {
        let xq = &xq[..w.padded_cols()];
        let sum_x: i32 = xq.iter().map(|&v| v as i32).sum();
        for (o, r) in out.iter_mut().zip(rows) {
            *o = ternary_dot(w.row(r), xq) - sum_x;
        }
    }

    fn float_rows(&self, w: &FloatMatrix, rows: Range<usize>, x: &[f32], out: &mut [f32]) {
        let x = &x[..w.cols];
        match w.ty {
            GgmlType::F16 => {
                for (o, r) in out.iter_mut().zip(rows) {
                    *o = f16_dot(w.row(r), x);
                }
            }
            GgmlType::Q8_0 => {
                for (o, r) in out.iter_mut().zip(rows) {
                    *o = q8_0_dot(w.row(r), x);
                }
            }
            _ => super::decoded_rows(w, rows, x, out, |acc, a, b| acc + f32_dot(a, b)),
        }
    }

    fn quant_head_rows(&self, h: &QuantHead, rows: Range<usize>, a: &HeadActivations, out: &mut [f32]) {
        qhead::check_args(h, &rows, a, out);
        by_tiles(rows, out, |r| head_tile::<HEAD_ROWS>(h, r, a), |r| head_tile::<1>(h, r, a)[0]);
    }

    fn block_rows(&self, w: &FloatMatrix, rows: Range<usize>, a: &Q8Activations, out: &mut [f32]) {
        blocks::rows_by::<SimdDot>(w, rows, a, out)
    }

    fn attn_scores(&self, q: &[f32], keys: &[f16], stride: usize, out: &mut [f32]) {
        for (key, o) in keys.chunks(stride).zip(out.iter_mut()) {
            *o = f16_dot(bytemuck::cast_slice(&key[..q.len()]), q);
        }
    }

    fn attn_values(&self, p: &[f32], values: &[f16], stride: usize, out: &mut [f32]) {
        for (value, &p) in values.chunks(stride).zip(p) {
            f16_axpy(p, &value[..out.len()], out);
        }
    }
}

/// 16 bytes from `p`; the caller's slice holds them.
fn load(p: &[u8]) -> v128 {
    assert!(p.len() >= 16);
    // SAFETY: 16 readable bytes (asserted); `v128_load` has no alignment requirement.
    unsafe { v128_load(p.as_ptr() as *const v128) }
}

/// Four floats from `p`.
fn load_f32(p: &[f32]) -> v128 {
    assert!(p.len() >= 4);
    // SAFETY: as in `load`.
    unsafe { v128_load(p.as_ptr() as *const v128) }
}

/// Four floats to `p`.
fn store_f32(p: &mut [f32], v: v128) {
    assert!(p.len() >= 4);
    // SAFETY: as in `load`.
    unsafe { v128_store(p.as_mut_ptr() as *mut v128, v) }
}

/// `Σ u·x` over one row: int16 products (at most 2·128 in magnitude, 16 per lane per block) are
/// pairwise-added into int32 once per block.
fn ternary_dot(row: &[u8], xq: &[i8]) -> i32 {
    let xq: &[u8] = bytemuck::cast_slice(xq);
    let mask = u8x16_splat(3);
    let mut acc = i32x4_splat(0);
    for (block, x) in row.chunks_exact(32).zip(xq.chunks_exact(128)) {
        let mut s = i16x8_splat(0);
        // Bytes 0..16 and 16..32 of the block hold columns 32g + 0..16 and 32g + 16..32 of plane g.
        for half in 0..2 {
            let b = load(&block[16 * half..]);
            let planes =
                [u8x16_shr(b, 6), v128_and(u8x16_shr(b, 4), mask), v128_and(u8x16_shr(b, 2), mask), v128_and(b, mask)];
            for (g, u) in planes.into_iter().enumerate() {
                let xv = load(&x[32 * g + 16 * half..]);
                s = i16x8_add(s, i16x8_add(i16x8_extmul_low_i8x16(u, xv), i16x8_extmul_high_i8x16(u, xv)));
            }
        }
        acc = i32x4_add(acc, i32x4_extadd_pairwise_i16x8(s));
    }
    hsum_i32(acc)
}

fn hsum_i32(v: v128) -> i32 {
    i32x4_extract_lane::<0>(v) + i32x4_extract_lane::<1>(v) + i32x4_extract_lane::<2>(v) + i32x4_extract_lane::<3>(v)
}

fn hsum_f32(v: v128) -> f32 {
    f32x4_extract_lane::<0>(v) + f32x4_extract_lane::<1>(v) + f32x4_extract_lane::<2>(v) + f32x4_extract_lane::<3>(v)
}

/// Four halves (zero-extended to u32 lanes) to floats. WebAssembly has no conversion
/// instruction; this is the exact bit trick of F. Giesen's `half_to_float`: shifting the exponent
/// and mantissa into place and multiplying by 2^112 rebiases the exponent (normal and subnormal
/// halves alike, as subnormal floats are exact in WebAssembly); infinities and NaNs get the
/// all-ones exponent back.
fn widen_f16(h: v128) -> v128 {
    let exp_mant = v128_and(h, u32x4_splat(0x7fff));
    let sign = u32x4_shl(v128_xor(h, exp_mant), 16);
    let scaled = f32x4_mul(u32x4_shl(exp_mant, 13), f32x4_splat(f32::from_bits((127 + 112) << 23)));
    let inf_nan = v128_and(u32x4_gt(exp_mant, u32x4_splat(0x7bff)), u32x4_splat(0xff << 23));
    v128_or(scaled, v128_or(sign, inf_nan))
}

/// `Σ w·x` over an F16 row, eight halves at a time.
fn f16_dot(row: &[u8], x: &[f32]) -> f32 {
    let (mut acc0, mut acc1) = (f32x4_splat(0.0), f32x4_splat(0.0));
    let (rows8, xs8) = (row.chunks_exact(16), x.chunks_exact(8));
    let tail = xs8.remainder();
    for (h, x) in rows8.zip(xs8) {
        let h = load(h);
        acc0 = f32x4_add(acc0, f32x4_mul(widen_f16(u32x4_extend_low_u16x8(h)), load_f32(x)));
        acc1 = f32x4_add(acc1, f32x4_mul(widen_f16(u32x4_extend_high_u16x8(h)), load_f32(&x[4..])));
    }
    let mut sum = hsum_f32(f32x4_add(acc0, acc1));
    let done = x.len() - tail.len();
    for (j, &x) in tail.iter().enumerate() {
        let b = &row[2 * (done + j)..];
        sum += half::f16::from_le_bytes([b[0], b[1]]).to_f32() * x;
    }
    sum
}

/// `out += p·v` for an f16 row `v` of `out.len()` halves, eight at a time.
fn f16_axpy(p: f32, v: &[f16], out: &mut [f32]) {
    let (n, pv) = (out.len(), f32x4_splat(p));
    let mut outs = out.chunks_exact_mut(8);
    for (o, h) in (&mut outs).zip(v.chunks_exact(8)) {
        let h = load(bytemuck::cast_slice(h));
        let (lo, hi) = o.split_at_mut(4);
        store_f32(lo, f32x4_add(load_f32(lo), f32x4_mul(pv, widen_f16(u32x4_extend_low_u16x8(h)))));
        store_f32(hi, f32x4_add(load_f32(hi), f32x4_mul(pv, widen_f16(u32x4_extend_high_u16x8(h)))));
    }
    let tail = outs.into_remainder();
    let done = n - tail.len();
    for (o, v) in tail.iter_mut().zip(&v[done..]) {
        *o += p * v.to_f32();
    }
}

/// Q8_0: blocks of 32 int8 values and an f16 scale `d` (34 bytes); value = d · q.
fn q8_0_dot(row: &[u8], x: &[f32]) -> f32 {
    let mut acc = f32x4_splat(0.0);
    for (block, x) in row.chunks_exact(34).zip(x.chunks_exact(32)) {
        let d = half::f16::from_le_bytes([block[0], block[1]]).to_f32();
        let mut partial = f32x4_splat(0.0);
        for k in 0..2 {
            let q = load(&block[2 + 16 * k..]);
            let (q0, q1) = (i16x8_extend_low_i8x16(q), i16x8_extend_high_i8x16(q));
            let w = [
                i32x4_extend_low_i16x8(q0),
                i32x4_extend_high_i16x8(q0),
                i32x4_extend_low_i16x8(q1),
                i32x4_extend_high_i16x8(q1),
            ];
            for (j, w) in w.into_iter().enumerate() {
                partial = f32x4_add(partial, f32x4_mul(f32x4_convert_i32x4(w), load_f32(&x[16 * k + 4 * j..])));
            }
        }
        acc = f32x4_add(acc, f32x4_mul(partial, f32x4_splat(d)));
    }
    hsum_f32(acc)
}

fn f32_dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = f32x4_splat(0.0);
    let (a4, b4) = (a.chunks_exact(4), b.chunks_exact(4));
    let (ta, tb) = (a4.remainder(), b4.remainder());
    for (a, b) in a4.zip(b4) {
        acc = f32x4_add(acc, f32x4_mul(load_f32(a), load_f32(b)));
    }
    hsum_f32(acc) + ta.iter().zip(tb).map(|(a, b)| a * b).sum::<f32>()
}

// ---------------------------------------------------------------------------------------------------
// The quantized head (see `qhead`): a 64-byte step of the lane layout is four vectors of 4 blocks, one
// i32 lane per block; each vector is taken through its group's steps, then scaled and added up. The
// products are signed: a Q8_0 weight is taken as `q = u ^ 0x80`, a Q6_K weight `u` (< 64) as it is.

/// Rows of a tile: they share each activation load and widening.
const HEAD_ROWS: usize = 4;

fn head_tile<const R: usize>(h: &QuantHead, r0: usize, a: &HeadActivations) -> [f32; R] {
    if h.ty == GgmlType::Q6_K {
        q6_k_tile::<R>(h, r0, a)
    } else {
        q8_0_tile::<R>(h, r0, a)
    }
}

/// 16 int8 activations widened to i16, bytes 0..8 and 8..16.
fn widen(x: v128) -> [v128; 2] {
    [i16x8_extend_low_i8x16(x), i16x8_extend_high_i8x16(x)]
}

/// `i32x4_dot_i16x8` of 16 signed bytes `w` with widened activations `x`, added to `acc`: lane `i` of
/// `acc[0]` gains the products of bytes `2i, 2i + 1`, of `acc[1]` those of bytes `8 + 2i, 9 + 2i`
/// ([`block_lanes`] adds neighbouring lanes into one per block of four bytes, once per vector).
fn dot_pairs(acc: [v128; 2], w: v128, x: &[v128; 2]) -> [v128; 2] {
    let (lo, hi) = (i16x8_extend_low_i8x16(w), i16x8_extend_high_i8x16(w));
    [i32x4_add(acc[0], i32x4_dot_i16x8(lo, x[0])), i32x4_add(acc[1], i32x4_dot_i16x8(hi, x[1]))]
}

/// Lane `l` = the sum of bytes `4l..4l + 4`, from [`dot_pairs`]' accumulators.
fn block_lanes(acc: [v128; 2]) -> v128 {
    i32x4_add(i32x4_shuffle::<0, 2, 4, 6>(acc[0], acc[1]), i32x4_shuffle::<1, 3, 5, 7>(acc[0], acc[1]))
}

/// The first `lanes` i32 lanes (of 4) of `p`, the others zero: the vector of a short last group.
fn load_lanes(p: &[u8], lanes: usize) -> v128 {
    if lanes == 4 {
        load(p)
    } else {
        let mut buf = [0u8; 16];
        buf[..4 * lanes].copy_from_slice(&p[..4 * lanes]);
        load(&buf)
    }
}

/// Q8_0 rows `r0..r0 + R`: per group of J blocks, `32·J` bytes of `q + 128` then the J f16 scales.
fn q8_0_tile<const R: usize>(h: &QuantHead, r0: usize, a: &HeadActivations) -> [f32; R] {
    let xq: &[u8] = bytemuck::cast_slice(&a.q);
    let blocks = h.cols / 32;
    let sign = i8x16_splat(-128);
    let mut total = [f32x4_splat(0.0); R];
    let mut short = [0f32; R]; // a short last group's partial vector, finished lane by lane
    for g in 0..blocks.div_ceil(qhead::LANES) {
        let (j, base) = ((blocks - 16 * g).min(16), 544 * g);
        let rows: [&[u8]; R] = std::array::from_fn(|r| &h.row(r0 + r)[base..]);
        for v in 0..j.div_ceil(4) {
            let (lanes, first) = ((j - 4 * v).min(4), 16 * g + 4 * v); // `first`: the block in lane 0
            let mut acc = [[i32x4_splat(0); 2]; R];
            for k in 0..8 {
                let at = 4 * j * k + 16 * v;
                let x = widen(load_lanes(&xq[512 * g + at..], lanes));
                for r in 0..R {
                    acc[r] = dot_pairs(acc[r], v128_xor(load_lanes(&rows[r][at..], lanes), sign), &x);
                }
            }
            if lanes < 4 {
                for r in 0..R {
                    let d = block_lanes(acc[r]);
                    let dots = [i32x4_extract_lane::<0>(d), i32x4_extract_lane::<1>(d), i32x4_extract_lane::<2>(d)];
                    short[r] += qhead::scale_lanes(h, r0 + r, first, &dots[..lanes], a, false);
                }
                continue;
            }
            let dx = load_f32(&a.d[first..]);
            for r in 0..R {
                let halves = &rows[r][32 * j + 8 * v..][..8];
                let dw = widen_f16(u32x4_extend_low_u16x8(u64x2_splat(u64::from_le_bytes(halves.try_into().unwrap()))));
                let dot = f32x4_convert_i32x4(block_lanes(acc[r]));
                total[r] = f32x4_add(total[r], f32x4_mul(dot, f32x4_mul(dw, dx)));
            }
        }
    }
    std::array::from_fn(|r| hsum_f32(total[r]) + short[r])
}

/// Q6_K rows `r0..r0 + R`: per 256 values, 128 bytes of nibbles, 64 of high bits, 16 int8 sub-block
/// scales and an f16 `d`; 16-byte quarter `v` of each part holds sub-blocks `4v..4v + 4`.
fn q6_k_tile<const R: usize>(h: &QuantHead, r0: usize, a: &HeadActivations) -> [f32; R] {
    let xq: &[u8] = bytemuck::cast_slice(&a.q);
    let (low4, high2) = (u8x16_splat(0x0f), u8x16_splat(0x30));
    let top = |v: v128| v128_and(v, high2);
    let mut total = [f32x4_splat(0.0); R];
    for g in 0..h.cols / 256 {
        for v in 0..4 {
            let first = 16 * g + 4 * v;
            let x: [[v128; 2]; 4] = std::array::from_fn(|k| widen(load(&xq[256 * g + 64 * k + 16 * v..])));
            let corr = load(bytemuck::cast_slice(&a.corr[first..first + 4]));
            let dx = load_f32(&a.d[first..]);
            for r in 0..R {
                let b = &h.row(r0 + r)[210 * g..][..210];
                let (lo, hi, qh) = (load(&b[16 * v..]), load(&b[64 + 16 * v..]), load(&b[128 + 16 * v..]));
                let steps = [
                    v128_or(v128_and(lo, low4), top(u8x16_shl(qh, 4))),
                    v128_or(u8x16_shr(lo, 4), top(u8x16_shl(qh, 2))),
                    v128_or(v128_and(hi, low4), top(qh)),
                    v128_or(u8x16_shr(hi, 4), top(u8x16_shr(qh, 2))),
                ];
                let mut acc = [i32x4_splat(0); 2];
                for (step, x) in steps.into_iter().zip(&x) {
                    acc = dot_pairs(acc, step, x);
                }
                let sc4 = i32x4_splat(i32::from_le_bytes(b[192 + 4 * v..][..4].try_into().unwrap()));
                let sc = f32x4_convert_i32x4(i32x4_extend_low_i16x8(i16x8_extend_low_i8x16(sc4)));
                let d = f16::from_le_bytes([b[208], b[209]]).to_f32();
                let scale = f32x4_mul(f32x4_mul(sc, dx), f32x4_splat(d));
                let dot = f32x4_convert_i32x4(i32x4_sub(block_lanes(acc), corr));
                total[r] = f32x4_add(total[r], f32x4_mul(dot, scale));
            }
        }
    }
    std::array::from_fn(|r| hsum_f32(total[r]))
}

// ---------------------------------------------------------------------------------------------------
// Q1_0, Q2_0 and Q8_0 projections: the integer dot of each 32-value run in SIMD128, the float steps
// those of the reference (`blocks::rows_by`), so the results equal the reference's exactly.

struct SimdDot;

/// `Σ a·b` of two 16-byte int8 vectors, in four i32 lanes (widened to i16, then `i32x4.dot_i16x8`).
#[inline(always)]
fn dot16(a: v128, b: v128) -> v128 {
    let lo = i32x4_dot_i16x8(i16x8_extend_low_i8x16(a), i16x8_extend_low_i8x16(b));
    let hi = i32x4_dot_i16x8(i16x8_extend_high_i8x16(a), i16x8_extend_high_i8x16(b));
    i32x4_add(lo, hi)
}

fn hsum(v: v128) -> i32 {
    i32x4_extract_lane::<0>(v) + i32x4_extract_lane::<1>(v) + i32x4_extract_lane::<2>(v) + i32x4_extract_lane::<3>(v)
}

/// 16 int8 from `p`; the caller's slice holds them.
fn load_i8(p: &[i8]) -> v128 {
    // SAFETY: u8 and i8 have the same layout.
    load(unsafe { std::slice::from_raw_parts(p.as_ptr() as *const u8, p.len()) })
}

impl Dot32 for SimdDot {
    fn signs(bits: &[u8], a: &Q8Activations, y: usize) -> i32 {
        let q = &a.q[y * 32..][..32];
        let word = u32x4_splat(u32::from_le_bytes([bits[0], bits[1], bits[2], bits[3]]));
        let bit = u64x2_splat(0x8040_2010_0804_0201);
        let mut acc = i32x4_splat(0);
        for h in 0..2 {
            // Byte j of this half takes bits byte 2h + j/8; a clear bit negates its activation.
            let (b0, b1) = (2 * h as u8, 2 * h as u8 + 1);
            let idx = u8x16(b0, b0, b0, b0, b0, b0, b0, b0, b1, b1, b1, b1, b1, b1, b1, b1);
            let clear = u8x16_eq(v128_and(u8x16_swizzle(word, idx), bit), u8x16_splat(0));
            let signed = i8x16_sub(v128_xor(load_i8(&q[16 * h..]), clear), clear);
            acc = i32x4_add(acc, i32x4_extadd_pairwise_i16x8(i16x8_extadd_pairwise_i8x16(signed)));
        }
        hsum(acc)
    }

    fn codes(codes: &[u8], a: &Q8Activations, y: usize) -> i32 {
        let x = &a.planes[y * 32..][..32];
        let b = u64x2_splat(u64::from_le_bytes(codes[..8].try_into().unwrap()));
        let three = u8x16_splat(3);
        // Lanes 0-7 the plane shifted by 2k, lanes 8-15 by 2k + 2: two planes per vector, in order.
        let p01 = v128_and(
            i8x16_shuffle::<0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23>(b, u8x16_shr(b, 2)),
            three,
        );
        let p23 = v128_and(
            i8x16_shuffle::<0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23>(u8x16_shr(b, 4), u8x16_shr(b, 6)),
            three,
        );
        hsum(i32x4_add(dot16(p01, load_i8(x)), dot16(p23, load_i8(&x[16..])))) - a.sum[y]
    }

    fn int8(w: &[u8], a: &Q8Activations, y: usize) -> i32 {
        let x = &a.q[y * 32..][..32];
        hsum(i32x4_add(dot16(load(w), load_i8(x)), dot16(load(&w[16..]), load_i8(&x[16..]))))
    }
}
