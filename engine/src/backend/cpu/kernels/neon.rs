//! AArch64 NEON kernels. NEON is part of every AArch64 CPU; the dot-product extension
//! (`sdot`, Armv8.2+, optional before Armv8.4) is detected at run time; both variants are
//! registered so that the tests cover both on a CPU with it.
//!
//! Ternary rows use the same trick as the AVX2 kernel: a 32-byte block holds 128 codes as
//! `u = code + 1` in four 2-bit planes; shifting and masking a plane gives 16 bytes per vector with
//! values 0..=2, multiplied with int8 activations, and `Σ u·x − Σ x = Σ code·x`.

// Index loops: one index addresses accumulators, loads and pointer offsets at once.
#![allow(clippy::needless_range_loop)]

use std::arch::aarch64::*;
use std::arch::asm;
use std::ops::Range;

use half::f16;

use super::blocks::{self, Dot32, Q8Activations};
use super::qhead::{self, HeadActivations, QuantHead};
use super::{by_tiles, Kernels};
use crate::format::quant::GgmlType;
use crate::tensor::float::FloatMatrix;
use crate::tensor::ternary::TernaryMatrix;

/// NEON kernels, with or without the dot-product instructions for the ternary rows.
pub struct Neon {
    dotprod: bool,
}

static PLAIN: Neon = Neon { dotprod: false };
static DOTPROD: Neon = Neon { dotprod: true };

impl Neon {
    /// The variants this CPU runs, slowest first: plain NEON (`smlal` / `sadalp`, any AArch64
    /// CPU), then `sdot` where the CPU has the dot-product extension.
    pub fn available() -> Vec<&'static dyn Kernels> {
        let mut v: Vec<&'static dyn Kernels> = vec![&PLAIN];
        if std::arch::is_aarch64_feature_detected!("dotprod") {
            v.push(&DOTPROD);
        }
        v
    }
}

impl Kernels for Neon {
    fn name(&self) -> &'static str {
        if self.dotprod {
            "neon-dotprod"
        } else {
            "neon"
        }
    }

    fn ternary_rows(&self, w: &TernaryMatrix, rows: Range<usize>, xq: &[i8], out: &mut [i32]) {
        let xq = &xq[..w.padded_cols()];
        let sum_x: i32 = xq.iter().map(|&v| v as i32).sum();
        for (o, r) in out.iter_mut().zip(rows) {
            // SAFETY: NEON is always present on AArch64; the `sdot` variant is only handed out by
            // `available()` after detecting the dot-product extension.
            let dot = unsafe {
                if self.dotprod {
                    ternary_dot_sdot(w.row(r), xq)
                } else {
                    ternary_dot(w.row(r), xq)
                }
            };
            *o = dot - sum_x;
        }
    }

    fn float_rows(&self, w: &FloatMatrix, rows: Range<usize>, x: &[f32], out: &mut [f32]) {
        let x = &x[..w.cols];
        match w.ty {
            GgmlType::F16 => {
                for (o, r) in out.iter_mut().zip(rows) {
                    // SAFETY: NEON is always present; the row holds `cols` halves (checked at load).
                    *o = unsafe { f16_dot(w.row(r), x) };
                }
            }
            GgmlType::Q8_0 => {
                for (o, r) in out.iter_mut().zip(rows) {
                    // SAFETY: NEON is always present; the row holds cols/32 blocks of 34 bytes.
                    *o = unsafe { q8_0_dot(w.row(r), x) };
                }
            }
            // SAFETY (NEON): always present on AArch64.
            _ => super::decoded_rows(w, rows, x, out, |acc, a, b| acc + unsafe { f32_dot(a, b) }),
        }
    }

    fn quant_head_rows(&self, h: &QuantHead, rows: Range<usize>, a: &HeadActivations, out: &mut [f32]) {
        qhead::check_args(h, &rows, a, out);
        // SAFETY: NEON is always present; the `sdot` variant is only handed out after detecting the
        // dot-product extension; the checks bound every read (rows hold the lane layout of `cols`).
        unsafe {
            if self.dotprod {
                qhead_sdot(h, rows, a, out)
            } else {
                qhead_widening(h, rows, a, out)
            }
        }
    }

    fn block_rows(&self, w: &FloatMatrix, rows: Range<usize>, a: &Q8Activations, out: &mut [f32]) {
        blocks::rows_by::<NeonDot>(w, rows, a, out)
    }

    fn attn_scores(&self, q: &[f32], keys: &[f16], stride: usize, out: &mut [f32]) {
        for (key, o) in keys.chunks(stride).zip(out.iter_mut()) {
            // SAFETY: NEON is always present; the slice holds the key's `q.len()` halves.
            *o = unsafe { f16_dot(bytemuck::cast_slice(&key[..q.len()]), q) };
        }
    }

    fn attn_values(&self, p: &[f32], values: &[f16], stride: usize, out: &mut [f32]) {
        for (value, &p) in values.chunks(stride).zip(p) {
            // SAFETY: NEON is always present; the slice holds the value's `out.len()` halves.
            unsafe { f16_axpy(p, &value[..out.len()], out) };
        }
    }
}

/// The four 2-bit planes of 16 packed bytes: plane g (bits 7-2g..6-2g) as values 0..=2.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn planes(b: uint8x16_t) -> [int8x16_t; 4] {
    let mask = vdupq_n_u8(3);
    [
        vreinterpretq_s8_u8(vshrq_n_u8(b, 6)),
        vreinterpretq_s8_u8(vandq_u8(vshrq_n_u8(b, 4), mask)),
        vreinterpretq_s8_u8(vandq_u8(vshrq_n_u8(b, 2), mask)),
        vreinterpretq_s8_u8(vandq_u8(b, mask)),
    ]
}

/// `Σ u·x` over one row with widening multiplies: int16 products (at most 2·128 in magnitude,
/// 16 per lane per block) are pairwise-added into int32 once per block.
#[target_feature(enable = "neon")]
unsafe fn ternary_dot(row: &[u8], xq: &[i8]) -> i32 {
    let mut acc = vdupq_n_s32(0);
    for (block, x) in row.chunks_exact(32).zip(xq.chunks_exact(128)) {
        let mut s = vdupq_n_s16(0);
        // Bytes 0..16 and 16..32 of the block hold columns 32g + 0..16 and 32g + 16..32 of plane g.
        for half in 0..2 {
            let u = planes(vld1q_u8(block.as_ptr().add(16 * half)));
            for (g, u) in u.into_iter().enumerate() {
                let xv = vld1q_s8(x.as_ptr().add(32 * g + 16 * half));
                s = vmlal_s8(s, vget_low_s8(u), vget_low_s8(xv));
                s = vmlal_high_s8(s, u, xv);
            }
        }
        acc = vpadalq_s16(acc, s);
    }
    vaddvq_s32(acc)
}

/// `Σ u·x` over one row with `sdot` (four int8 products summed into each int32 lane).
#[target_feature(enable = "neon,dotprod")]
unsafe fn ternary_dot_sdot(row: &[u8], xq: &[i8]) -> i32 {
    let (mut acc0, mut acc1) = (vdupq_n_s32(0), vdupq_n_s32(0));
    for (block, x) in row.chunks_exact(32).zip(xq.chunks_exact(128)) {
        let lo = planes(vld1q_u8(block.as_ptr()));
        let hi = planes(vld1q_u8(block.as_ptr().add(16)));
        for g in 0..4 {
            acc0 = sdot(acc0, lo[g], vld1q_s8(x.as_ptr().add(32 * g)));
            acc1 = sdot(acc1, hi[g], vld1q_s8(x.as_ptr().add(32 * g + 16)));
        }
    }
    vaddvq_s32(vaddq_s32(acc0, acc1))
}

/// `acc + sdot(a, b)`: the `vdotq_s32` intrinsic is not stable Rust yet.
#[inline]
#[target_feature(enable = "neon,dotprod")]
unsafe fn sdot(mut acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
    asm!("sdot {acc:v}.4s, {a:v}.16b, {b:v}.16b", acc = inout(vreg) acc, a = in(vreg) a, b = in(vreg) b,
         options(pure, nomem, nostack));
    acc
}

/// `Σ w·x` over an F16 row, eight halves at a time.
#[target_feature(enable = "neon")]
unsafe fn f16_dot(row: &[u8], x: &[f32]) -> f32 {
    let n = x.len();
    let (mut acc0, mut acc1) = (vdupq_n_f32(0.0), vdupq_n_f32(0.0));
    let mut i = 0;
    while i + 8 <= n {
        let h = vld1q_u16(row.as_ptr().add(2 * i) as *const u16);
        acc0 = vfmaq_f32(acc0, widen_f16(vget_low_u16(h)), vld1q_f32(x.as_ptr().add(i)));
        acc1 = vfmaq_f32(acc1, widen_f16(vget_high_u16(h)), vld1q_f32(x.as_ptr().add(i + 4)));
        i += 8;
    }
    let mut sum = vaddvq_f32(vaddq_f32(acc0, acc1));
    for j in i..n {
        sum += half::f16::from_le_bytes([row[2 * j], row[2 * j + 1]]).to_f32() * x[j];
    }
    sum
}

/// `out += p·v` for an f16 row `v` of `out.len()` halves, four at a time.
#[target_feature(enable = "neon")]
unsafe fn f16_axpy(p: f32, v: &[f16], out: &mut [f32]) {
    let n = out.len();
    let mut i = 0;
    while i + 4 <= n {
        let h = vld1_u16(v.as_ptr().add(i) as *const u16);
        let o = out.as_mut_ptr().add(i);
        vst1q_f32(o, vfmaq_n_f32(vld1q_f32(o), widen_f16(h), p));
        i += 4;
    }
    for (o, v) in out[i..].iter_mut().zip(&v[i..]) {
        *o += p * v.to_f32();
    }
}

/// Four halves (as bits) to floats with `fcvtl`, an Armv8.0 NEON instruction. Its intrinsic,
/// `vcvt_f32_f16`, only became stable Rust long after this crate's minimum version.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn widen_f16(h: uint16x4_t) -> float32x4_t {
    let out: float32x4_t;
    asm!("fcvtl {out:v}.4s, {h:v}.4h", out = lateout(vreg) out, h = in(vreg) h, options(pure, nomem, nostack));
    out
}

/// Q8_0: blocks of 32 int8 values and an f16 scale `d` (34 bytes); value = d · q.
#[target_feature(enable = "neon")]
unsafe fn q8_0_dot(row: &[u8], x: &[f32]) -> f32 {
    let mut acc = vdupq_n_f32(0.0);
    for (block, x) in row.chunks_exact(34).zip(x.chunks_exact(32)) {
        let d = half::f16::from_le_bytes([block[0], block[1]]).to_f32();
        let mut partial = vdupq_n_f32(0.0);
        for k in 0..2 {
            let q = vld1q_s8(block.as_ptr().add(2 + 16 * k) as *const i8);
            let (q0, q1) = (vmovl_s8(vget_low_s8(q)), vmovl_high_s8(q));
            let w = [vmovl_s16(vget_low_s16(q0)), vmovl_high_s16(q0), vmovl_s16(vget_low_s16(q1)), vmovl_high_s16(q1)];
            for (j, w) in w.into_iter().enumerate() {
                let xv = vld1q_f32(x.as_ptr().add(16 * k + 4 * j));
                partial = vfmaq_f32(partial, vcvtq_f32_s32(w), xv);
            }
        }
        acc = vfmaq_n_f32(acc, partial, d);
    }
    vaddvq_f32(acc)
}

#[target_feature(enable = "neon")]
unsafe fn f32_dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (mut acc0, mut acc1) = (vdupq_n_f32(0.0), vdupq_n_f32(0.0));
    let mut i = 0;
    while i + 8 <= n {
        acc0 = vfmaq_f32(acc0, vld1q_f32(a.as_ptr().add(i)), vld1q_f32(b.as_ptr().add(i)));
        acc1 = vfmaq_f32(acc1, vld1q_f32(a.as_ptr().add(i + 4)), vld1q_f32(b.as_ptr().add(i + 4)));
        i += 8;
    }
    let mut sum = vaddvq_f32(vaddq_f32(acc0, acc1));
    for j in i..n {
        sum += a[j] * b[j];
    }
    sum
}

// ---------------------------------------------------------------------------------------------------
// The quantized head (see `qhead`): a 64-byte step of the lane layout is four vectors of 4 blocks, one
// i32 lane per block; each vector is taken through its group's steps, then scaled and added up. The
// products are signed: a Q8_0 weight is taken as `q = u ^ 0x80`, a Q6_K weight `u` (< 64) as it is.

/// The integer step of the quantized head.
trait HeadDot {
    /// `acc + Σ w·x` per i32 lane of four byte products, where any two neighbouring products sum
    /// within i16 (as they do for the head's weights against activations within ±127).
    unsafe fn dot(acc: int32x4_t, w: int8x16_t, x: int8x16_t) -> int32x4_t;
}

struct Widening;
struct Sdot;

impl HeadDot for Widening {
    /// Products 0..8 and 8..16 as i16, neighbours added, then each lane's two sums widened into it.
    #[inline(always)]
    unsafe fn dot(acc: int32x4_t, w: int8x16_t, x: int8x16_t) -> int32x4_t {
        let lo = vmull_s8(vget_low_s8(w), vget_low_s8(x));
        vpadalq_s16(acc, vpaddq_s16(lo, vmull_high_s8(w, x)))
    }
}

impl HeadDot for Sdot {
    #[inline(always)]
    unsafe fn dot(acc: int32x4_t, w: int8x16_t, x: int8x16_t) -> int32x4_t {
        sdot(acc, w, x)
    }
}

#[target_feature(enable = "neon")]
unsafe fn qhead_widening(h: &QuantHead, rows: Range<usize>, a: &HeadActivations, out: &mut [f32]) {
    by_tiles(rows, out, |r| head_tile::<Widening, HEAD_ROWS>(h, r, a), |r| head_tile::<Widening, 1>(h, r, a)[0]);
}

#[target_feature(enable = "neon,dotprod")]
unsafe fn qhead_sdot(h: &QuantHead, rows: Range<usize>, a: &HeadActivations, out: &mut [f32]) {
    by_tiles(rows, out, |r| head_tile::<Sdot, HEAD_ROWS>(h, r, a), |r| head_tile::<Sdot, 1>(h, r, a)[0]);
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

/// The first `lanes` i32 lanes (of 4) at `p`, the others zero: the vector of a short last group.
#[inline(always)]
unsafe fn load_lanes(p: *const u8, lanes: usize) -> int8x16_t {
    if lanes == 4 {
        vld1q_s8(p as *const i8)
    } else {
        let mut buf = [0u8; 16];
        std::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), 4 * lanes);
        vld1q_s8(buf.as_ptr() as *const i8)
    }
}

/// Q8_0 rows `r0..r0 + R`: per group of J blocks, `32·J` bytes of `q + 128` then the J f16 scales.
#[inline(always)]
unsafe fn q8_0_tile<D: HeadDot, const R: usize>(h: &QuantHead, r0: usize, a: &HeadActivations) -> [f32; R] {
    let row = |r: usize| h.data.as_ptr().add((r0 + r) * h.row_bytes);
    let blocks = h.cols / 32;
    let sign = vdupq_n_s8(-128);
    let mut total = [vdupq_n_f32(0.0); R];
    let mut short = [0f32; R]; // a short last group's partial vector, finished lane by lane
    for g in 0..blocks.div_ceil(qhead::LANES) {
        let (j, base) = ((blocks - 16 * g).min(16), 544 * g);
        let xs = a.q.as_ptr().add(512 * g) as *const u8;
        for v in 0..j.div_ceil(4) {
            let (lanes, first) = ((j - 4 * v).min(4), 16 * g + 4 * v); // `first`: the block in lane 0
            let mut acc = [vdupq_n_s32(0); R];
            for k in 0..8 {
                let at = 4 * j * k + 16 * v;
                let x = load_lanes(xs.add(at), lanes);
                for r in 0..R {
                    acc[r] = D::dot(acc[r], veorq_s8(load_lanes(row(r).add(base + at), lanes), sign), x);
                }
            }
            if lanes < 4 {
                for r in 0..R {
                    let dots: [i32; 4] = std::mem::transmute(acc[r]);
                    short[r] += qhead::scale_lanes(h, r0 + r, first, &dots[..lanes], a, false);
                }
                continue;
            }
            let dx = vld1q_f32(a.d.as_ptr().add(first));
            for r in 0..R {
                let dw = widen_f16(vld1_u16(row(r).add(base + 32 * j + 8 * v) as *const u16));
                total[r] = vfmaq_f32(total[r], vcvtq_f32_s32(acc[r]), vmulq_f32(dw, dx));
            }
        }
    }
    std::array::from_fn(|r| vaddvq_f32(total[r]) + short[r])
}

/// Q6_K rows `r0..r0 + R`: per 256 values, 128 bytes of nibbles, 64 of high bits, 16 int8 sub-block
/// scales and an f16 `d`; 16-byte quarter `v` of each part holds sub-blocks `4v..4v + 4`.
#[inline(always)]
unsafe fn q6_k_tile<D: HeadDot, const R: usize>(h: &QuantHead, r0: usize, a: &HeadActivations) -> [f32; R] {
    let row = |r: usize| h.data.as_ptr().add((r0 + r) * h.row_bytes);
    let (low4, high2) = (vdupq_n_u8(0x0f), vdupq_n_u8(0x30));
    let mut total = [vdupq_n_f32(0.0); R];
    for g in 0..h.cols / 256 {
        let xs = a.q.as_ptr().add(256 * g);
        for v in 0..4 {
            let first = 16 * g + 4 * v;
            let x: [int8x16_t; 4] = std::array::from_fn(|k| vld1q_s8(xs.add(64 * k + 16 * v)));
            let corr = vld1q_s32(a.corr.as_ptr().add(first));
            let dx = vld1q_f32(a.d.as_ptr().add(first));
            for r in 0..R {
                let b = row(r).add(210 * g);
                let load = |at: usize| vld1q_u8(b.add(at + 16 * v));
                let (lo, hi, qh) = (load(0), load(64), load(128));
                let top = |v: uint8x16_t| vandq_u8(v, high2);
                let steps = [
                    vorrq_u8(vandq_u8(lo, low4), top(vshlq_n_u8(qh, 4))),
                    vorrq_u8(vshrq_n_u8(lo, 4), top(vshlq_n_u8(qh, 2))),
                    vorrq_u8(vandq_u8(hi, low4), top(qh)),
                    vorrq_u8(vshrq_n_u8(hi, 4), top(vshrq_n_u8(qh, 2))),
                ];
                let mut acc = vdupq_n_s32(0);
                for (step, x) in steps.into_iter().zip(x) {
                    acc = D::dot(acc, vreinterpretq_s8_u8(step), x);
                }
                let sc4 = vreinterpret_s8_u32(vdup_n_u32((b.add(192 + 4 * v) as *const u32).read_unaligned()));
                let sc = vcvtq_f32_s32(vmovl_s16(vget_low_s16(vmovl_s8(sc4))));
                let d = f16::from_bits((b.add(208) as *const u16).read_unaligned()).to_f32();
                let scale = vmulq_n_f32(vmulq_f32(sc, dx), d);
                total[r] = vfmaq_f32(total[r], vcvtq_f32_s32(vsubq_s32(acc, corr)), scale);
            }
        }
    }
    std::array::from_fn(|r| vaddvq_f32(total[r]))
}

// ---------------------------------------------------------------------------------------------------
// Q1_0, Q2_0 and Q8_0 projections: the integer dot of each 32-value run in NEON, the float steps those
// of the reference (`blocks::rows_by`), so the results equal the reference's exactly.

struct NeonDot;

/// `Σ a·b` of two 16-byte int8 vectors (widening multiplies, pairwise adds; no overflow for |a·b| ≤ 2¹⁴).
#[inline(always)]
unsafe fn dot16(a: int8x16_t, b: int8x16_t) -> int32x4_t {
    let lo = vmull_s8(vget_low_s8(a), vget_low_s8(b));
    let hi = vmull_s8(vget_high_s8(a), vget_high_s8(b));
    vpadalq_s16(vpaddlq_s16(lo), hi)
}

impl Dot32 for NeonDot {
    fn signs(bits: &[u8], a: &Q8Activations, y: usize) -> i32 {
        let q = &a.q[y * 32..][..32];
        // SAFETY: NEON is always present on AArch64; `bits` has 4 bytes and `q` 32 (slices above).
        unsafe {
            let word = vreinterpretq_u8_u32(vdupq_n_u32(u32::from_le_bytes([bits[0], bits[1], bits[2], bits[3]])));
            let bit = vreinterpretq_u8_u64(vdupq_n_u64(0x8040_2010_0804_0201));
            let mut acc = vdupq_n_s32(0);
            for h in 0..2 {
                // Byte j of this half takes bits byte 2h + j/8; a clear bit negates its activation.
                let idx = vcombine_u8(vdup_n_u8(2 * h as u8), vdup_n_u8(2 * h as u8 + 1));
                let clear = vceqq_u8(vandq_u8(vqtbl1q_u8(word, idx), bit), vdupq_n_u8(0));
                let x = vld1q_s8(q.as_ptr().add(16 * h));
                let m = vreinterpretq_s8_u8(clear);
                let signed = vsubq_s8(veorq_s8(x, m), m);
                acc = vpadalq_s16(acc, vpaddlq_s8(signed));
            }
            vaddvq_s32(acc)
        }
    }

    fn codes(codes: &[u8], a: &Q8Activations, y: usize) -> i32 {
        let x = &a.planes[y * 32..][..32];
        // SAFETY: as above; `codes` has 8 bytes, `x` 32: the four planes (shifts 0, 2, 4, 6) in order.
        unsafe {
            let b = vld1_u8(codes.as_ptr());
            let three = vdup_n_u8(3);
            let p01 = vcombine_u8(vand_u8(b, three), vand_u8(vshr_n_u8::<2>(b), three));
            let p23 = vcombine_u8(vand_u8(vshr_n_u8::<4>(b), three), vshr_n_u8::<6>(b));
            let acc = vaddq_s32(
                dot16(vreinterpretq_s8_u8(p01), vld1q_s8(x.as_ptr())),
                dot16(vreinterpretq_s8_u8(p23), vld1q_s8(x.as_ptr().add(16))),
            );
            vaddvq_s32(acc) - a.sum[y]
        }
    }

    fn int8(w: &[u8], a: &Q8Activations, y: usize) -> i32 {
        let x = &a.q[y * 32..][..32];
        // SAFETY: as above; `w` has 32 bytes.
        unsafe {
            let w = w.as_ptr() as *const i8;
            let acc = vaddq_s32(
                dot16(vld1q_s8(w), vld1q_s8(x.as_ptr())),
                dot16(vld1q_s8(w.add(16)), vld1q_s8(x.as_ptr().add(16))),
            );
            vaddvq_s32(acc)
        }
    }
}
