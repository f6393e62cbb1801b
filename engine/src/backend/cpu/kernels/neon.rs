//! AArch64 NEON kernels. NEON is part of every AArch64 CPU; the dot-product extension
//! (`sdot`, Armv8.2+, optional before Armv8.4) is detected at run time; both variants are
//! registered so that the tests cover both on a CPU with it.
//!
//! Ternary rows use the same trick as the AVX2 kernel: a 32-byte block holds 128 codes as
//! `u = code + 1` in four 2-bit planes; shifting and masking a plane gives 16 bytes per vector with
//! values 0..=2, multiplied with int8 activations, and `Σ u·x − Σ x = Σ code·x`.

use std::arch::aarch64::*;
use std::arch::asm;
use std::ops::Range;

use half::f16;

use super::Kernels;
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
