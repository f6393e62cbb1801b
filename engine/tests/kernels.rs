//! Every kernel set against the scalar reference: integer accumulators bit-for-bit, float
//! products to float tolerance, on random data and shapes that are not multiples of the blocks.

use bitnet_engine::backend::cpu::kernels::blocks::Q8Activations;
use bitnet_engine::backend::cpu::kernels::qhead::{HeadActivations, QuantHead};
use bitnet_engine::backend::cpu::kernels::{self, quantize_activations};
use bitnet_engine::format::quant::{self, GgmlType};
use bitnet_engine::tensor::float::FloatMatrix;
use bitnet_engine::tensor::ternary::TernaryMatrix;
use half::f16;

mod common;
use common::Rng;

fn random_ternary(rng: &mut Rng, rows: usize, cols: usize) -> TernaryMatrix {
    let codes: Vec<i8> = (0..rows * cols).map(|_| rng.below(3) as i8 - 1).collect();
    TernaryMatrix::from_codes(rows, cols, &codes, 0.5)
}

#[test]
fn ternary_rows_match_the_reference_exactly() {
    let mut rng = Rng(0x1234_5678);
    let reference = kernels::available()[0];
    for &(rows, cols) in &[(1, 1), (3, 127), (17, 128), (40, 192), (33, 320), (64, 576), (9, 1536), (5, 2560)] {
        let w = random_ternary(&mut rng, rows, cols);
        let x: Vec<f32> = (0..cols).map(|_| rng.f32() * 3.0).collect();
        let mut xq = vec![0i8; w.padded_cols()];
        quantize_activations(&x, &mut xq);
        // Extreme activations too: -128 and 127 everywhere exercise the widest sums.
        for xq in [xq.clone(), extreme(cols, w.padded_cols(), -128), extreme(cols, w.padded_cols(), 127)] {
            let mut want = vec![0i32; rows];
            reference.ternary_rows(&w, 0..rows, &xq, &mut want);
            let naive: Vec<i32> =
                (0..rows).map(|r| (0..cols).map(|c| w.code(r, c) as i32 * xq[c] as i32).sum()).collect();
            assert_eq!(want, naive, "scalar kernel vs. the definition, {rows}x{cols}");
            for k in kernels::available() {
                let mut got = vec![0i32; rows];
                k.ternary_rows(&w, 0..rows, &xq, &mut got);
                assert_eq!(got, want, "{} kernel, {rows}x{cols}", k.name());
                // A sub-range of rows lands in the right places.
                if rows > 2 {
                    let mut part = vec![0i32; rows - 2];
                    k.ternary_rows(&w, 1..rows - 1, &xq, &mut part);
                    assert_eq!(part, want[1..rows - 1], "{} kernel, row range", k.name());
                }
            }
        }
    }
}

fn extreme(cols: usize, padded: usize, v: i8) -> Vec<i8> {
    (0..padded).map(|c| if c < cols { v } else { 0 }).collect()
}

#[test]
fn activation_quantization_is_absmax_round_half_even() {
    // max|x| = 127/64 makes the scale exactly 64, so x·s below is exact and the ties are real ties.
    let x = [1.984375f32, 1.0 / 128.0, 3.0 / 128.0, 5.0 / 128.0, -5.0 / 128.0, -1.984375];
    let mut q = [0i8; 8];
    let s = quantize_activations(&x, &mut q);
    assert_eq!(s, 64.0);
    // 0.5 → 0, 1.5 → 2, 2.5 → 2, -2.5 → -2 (half to even); padding is zeroed.
    assert_eq!(q, [127, 0, 2, 2, -2, -127, 0, 0]);
    let mut q = [1i8; 4];
    assert_eq!(quantize_activations(&[0.0; 2], &mut q), 127.0 / 1e-5);
    assert_eq!(q, [0; 4]);
}

#[test]
fn float_rows_match_the_reference() {
    let mut rng = Rng(99);
    let reference = kernels::available()[0];
    for ty in [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q8_0,
        GgmlType::Q5_0,
        GgmlType::Q4_0,
        GgmlType::Q6_K,
        GgmlType::Q4_K,
    ] {
        let (rows, cols) = (37, if ty.block_size() == 256 { 512 } else { 576 });
        let src: Vec<f32> = (0..rows * cols).map(|_| rng.f32()).collect();
        let data = quant::quantize(ty, &src).unwrap();
        let w = FloatMatrix { ty, rows, cols, row_bytes: ty.row_bytes(cols).unwrap(), data };
        let x: Vec<f32> = (0..cols).map(|_| rng.f32()).collect();
        let mut want = vec![0f32; rows];
        reference.float_rows(&w, 0..rows, &x, &mut want);
        // The reference equals the dot product of the dequantized rows.
        let mut deq = vec![0f32; rows * cols];
        quant::dequantize(ty, &w.data, &mut deq).unwrap();
        for r in 0..rows {
            let d: f64 = (0..cols).map(|c| deq[r * cols + c] as f64 * x[c] as f64).sum();
            assert!((want[r] as f64 - d).abs() < 1e-4, "{ty:?} scalar row {r}: {} vs {d}", want[r]);
        }
        for k in kernels::available() {
            let mut got = vec![0f32; rows];
            k.float_rows(&w, 0..rows, &x, &mut got);
            for (g, e) in got.iter().zip(&want) {
                assert!((g - e).abs() <= 1e-4 * (1.0 + e.abs()), "{} kernel, {ty:?}: {g} vs {e}", k.name());
            }
        }
    }
}

#[test]
fn f16_rows_decode_subnormals_and_odd_lengths() {
    // Row 0: subnormal halves only; row 1: zeros, the smallest and largest subnormals, the smallest
    // normal and one; row 2: anything below one. 43 columns leave a tail after every vector loop.
    let (rows, cols) = (3, 43);
    let mut rng = Rng(7);
    let mut bits = Vec::with_capacity(rows * cols);
    for r in 0..rows {
        for _ in 0..cols {
            let sign = (rng.below(2) as u16) << 15;
            bits.push(
                sign | match r {
                    0 => 1 + rng.below(0x3ff) as u16,
                    1 => [0, 1, 0x3ff, 0x400, 0x3c00][rng.below(5) as usize],
                    _ => rng.below(0x3c00) as u16,
                },
            );
        }
    }
    let data: Vec<u8> = bits.iter().flat_map(|b| b.to_le_bytes()).collect();
    let w = FloatMatrix { ty: GgmlType::F16, rows, cols, row_bytes: 2 * cols, data };
    let x: Vec<f32> = (0..cols).map(|_| rng.f32()).collect();
    for k in kernels::available() {
        let mut got = vec![0f32; rows];
        k.float_rows(&w, 0..rows, &x, &mut got);
        for r in 0..rows {
            let terms = (0..cols).map(|c| half::f16::from_bits(bits[r * cols + c]).to_f64() * x[c] as f64);
            let (want, magnitude) = terms.fold((0f64, 0f64), |(s, m), t| (s + t, m + t.abs()));
            // Relative to Σ|w·x|, so that a row of subnormals is checked at its own scale.
            assert!(
                (got[r] as f64 - want).abs() <= 1e-5 * magnitude,
                "{} kernel, F16 row {r}: {} vs {want}",
                k.name(),
                got[r]
            );
        }
    }
}

/// `n` random halves as a KV cache holds them: mostly values in ±4, with zeros and subnormals mixed in
/// (the integer-bit conversions of NEON-less and wasm code paths must get those right too).
fn random_halves(rng: &mut Rng, n: usize) -> Vec<f16> {
    (0..n)
        .map(|_| match rng.below(8) {
            0 => f16::from_bits(rng.below(0x400) as u16 | (rng.below(2) as u16) << 15), // zero or subnormal
            _ => f16::from_f32(rng.f32() * 4.0),
        })
        .collect()
}

/// One head's attention over `n` cached positions, as in the model: rows of `hd` halves at a stride of
/// `stride` (several kv heads per position), starting at a head offset. Head dims 64 and 128 are the
/// real models'; the others leave tails after every vector width.
const ATTN_SHAPES: [(usize, usize); 8] = [(1, 1), (16, 5), (17, 3), (64, 33), (100, 7), (128, 1), (128, 70), (200, 9)];

/// Asserts that a kernel's `got` is `start + Σ terms`, to 1e-5 relative to `|start| + Σ|terms|`: the
/// summation order differs between kernels.
fn assert_sum(got: f32, start: f32, terms: impl Iterator<Item = f64>, what: impl Fn() -> String) {
    let (exact, magnitude) = terms.fold((start as f64, start.abs() as f64), |(s, m), x| (s + x, m + x.abs()));
    assert!((got as f64 - exact).abs() <= 1e-5 * magnitude + 1e-30, "{}: {got} vs {exact}", what());
}

#[test]
fn attention_scores_match_the_reference() {
    let mut rng = Rng(0xa77e);
    for (hd, n) in ATTN_SHAPES {
        let (stride, off) = (3 * hd + 5, hd + 2);
        let keys = random_halves(&mut rng, off + n * stride);
        let q = rng.vec(hd, 2.0);
        for k in kernels::available() {
            let mut got = vec![f32::NAN; n];
            k.attn_scores(&q, &keys[off..], stride, &mut got);
            for t in 0..n {
                let terms = (0..hd).map(|i| q[i] as f64 * keys[off + t * stride + i].to_f64());
                assert_sum(got[t], 0.0, terms, || format!("{}, head dim {hd}, key {t}", k.name()));
            }
        }
    }
}

#[test]
fn attention_values_match_the_reference() {
    let mut rng = Rng(0x5a1e);
    for (hd, n) in ATTN_SHAPES {
        let (stride, off) = (2 * hd + 3, hd);
        let values = random_halves(&mut rng, off + n * stride);
        let p: Vec<f32> = (0..n).map(|_| rng.f32().abs()).collect();
        let start = rng.vec(hd, 1.0); // the kernel adds to what `out` holds
        for k in kernels::available() {
            let mut got = start.clone();
            k.attn_values(&p, &values[off..], stride, &mut got);
            for i in 0..hd {
                let terms = (0..n).map(|t| p[t] as f64 * values[off + t * stride + i].to_f64());
                assert_sum(got[i], start[i], terms, || format!("{}, head dim {hd}, element {i}", k.name()));
            }
        }
    }
}

/// CI runs these tests on emulated CPUs and names the kernel sets each must offer
/// (`BITNET_EXPECT_KERNELS`, comma-separated in `available()` order), so that a run proves which
/// variants it covered.
#[test]
fn the_expected_kernels_are_available() {
    let names: Vec<&str> = kernels::available().iter().map(|k| k.name()).collect();
    println!("available kernels: {}", names.join(","));
    if let Ok(expected) = std::env::var("BITNET_EXPECT_KERNELS") {
        assert_eq!(names.join(","), expected);
    }
    if std::env::var_os("BITNET_KERNELS").is_none() {
        assert_eq!(kernels::best().name(), names[names.len() - 1], "best() is the last (fastest) set");
    }
}

#[test]
fn ternary_gemm_matches_the_reference_rows_exactly() {
    let mut rng = Rng(0xfeed);
    let reference = kernels::available()[0];
    for &(rows, cols, n) in
        &[(1, 1, 1), (7, 130, 2), (9, 256, 3), (13, 384, 4), (18, 640, 5), (33, 2560, 7), (4, 6912, 1)]
    {
        let w = random_ternary(&mut rng, rows, cols);
        let p = w.padded_cols();
        let mut xq = vec![0i8; n * p];
        for t in 0..n {
            // Each token has its own scale; the last one is all -128, the widest sums.
            let x: Vec<f32> = (0..cols).map(|_| rng.f32() * (t + 1) as f32).collect();
            quantize_activations(&x, &mut xq[t * p..(t + 1) * p]);
        }
        xq[(n - 1) * p..(n - 1) * p + cols].fill(-128);
        let mut want = vec![0i32; n * rows];
        for t in 0..n {
            reference.ternary_rows(&w, 0..rows, &xq[t * p..(t + 1) * p], &mut want[t * rows..(t + 1) * rows]);
        }
        for k in kernels::available() {
            let mut got = vec![0i32; n * rows];
            k.ternary_gemm(&w, 0..rows, &xq, n, &mut got);
            assert_eq!(got, want, "{} gemm, {rows}x{cols}, {n} tokens", k.name());
            if rows > 2 {
                let len = rows - 2;
                let mut part = vec![0i32; n * len];
                k.ternary_gemm(&w, 1..rows - 1, &xq, n, &mut part);
                for t in 0..n {
                    assert_eq!(
                        part[t * len..(t + 1) * len],
                        want[t * rows + 1..(t + 1) * rows - 1],
                        "{} gemm rows",
                        k.name()
                    );
                }
            }
        }
    }
}

/// Float rows whose length is not a multiple of any vector width, and several vectors at once.
#[test]
fn float_rows_and_gemm_match_the_reference_on_ragged_rows() {
    let mut rng = Rng(7);
    let reference = kernels::available()[0];
    for ty in [GgmlType::F32, GgmlType::F16, GgmlType::BF16] {
        for cols in [1, 15, 16, 17, 33, 100, 2561] {
            let rows = 11;
            let src: Vec<f32> = (0..rows * cols).map(|_| rng.f32()).collect();
            let data = quant::quantize(ty, &src).unwrap();
            let w = FloatMatrix { ty, rows, cols, row_bytes: ty.row_bytes(cols).unwrap(), data };
            let n = 3;
            let x: Vec<f32> = (0..n * cols).map(|_| rng.f32()).collect();
            let mut want = vec![0f32; n * rows];
            for t in 0..n {
                reference.float_rows(&w, 0..rows, &x[t * cols..(t + 1) * cols], &mut want[t * rows..(t + 1) * rows]);
            }
            for k in kernels::available() {
                let mut got = vec![0f32; n * rows];
                k.float_gemm(&w, 0..rows, &x, n, &mut got);
                for (g, e) in got.iter().zip(&want) {
                    assert!(
                        (g - e).abs() <= 1e-4 * (1.0 + e.abs()),
                        "{} kernel, {ty:?} x {cols}: {g} vs {e}",
                        k.name()
                    );
                }
            }
        }
    }
}

/// A step of many sequences gives each the logits of stepping it alone: every kernel set's `float_gemm` equals
/// its own `float_rows` token by token, bit for bit, for every number of tokens (the tiles of tokens differ).
#[test]
fn float_gemm_equals_float_rows_bit_for_bit() {
    let mut rng = Rng(21);
    for (ty, cols) in [
        (GgmlType::F16, 2561),
        (GgmlType::F16, 576),
        (GgmlType::Q8_0, 576),
        (GgmlType::Q5_0, 576),
        (GgmlType::Q6_K, 512),
        (GgmlType::Q4_0, 64),
    ] {
        let rows = 11;
        let src: Vec<f32> = (0..rows * cols).map(|_| rng.f32()).collect();
        let data = quant::quantize(ty, &src).unwrap();
        let w = FloatMatrix { ty, rows, cols, row_bytes: ty.row_bytes(cols).unwrap(), data };
        let x: Vec<f32> = (0..9 * cols).map(|_| rng.f32()).collect();
        for k in kernels::available() {
            for n in 1..=9 {
                let mut got = vec![0f32; n * 10];
                k.float_gemm(&w, 1..rows, &x, n, &mut got);
                for t in 0..n {
                    let mut want = vec![0f32; 10];
                    k.float_rows(&w, 1..rows, &x[t * cols..(t + 1) * cols], &mut want);
                    assert_eq!(
                        &got[t * 10..(t + 1) * 10],
                        &want[..],
                        "{} kernel, {ty:?}, {n} tokens, token {t}",
                        k.name()
                    );
                }
            }
        }
    }
}

/// The quantized head on realistic data (ggml's own quantizer, float activations): the reference
/// stays close to the float product of the same quantized rows, which checks the lane layout, and
/// every kernel equals the reference to float tolerance, for whole and partial row ranges.
#[test]
fn quantized_head_matches_the_reference() {
    let mut rng = Rng(11);
    let reference = kernels::available()[0];
    let shapes = [(GgmlType::Q8_0, 32), (GgmlType::Q8_0, 576), (GgmlType::Q8_0, 800), (GgmlType::Q8_0, 2560)];
    for (ty, cols) in shapes.into_iter().chain([(GgmlType::Q6_K, 512), (GgmlType::Q6_K, 2560)]) {
        let rows = 23;
        let src: Vec<f32> = (0..rows * cols).map(|_| rng.f32()).collect();
        let ggml = quant::quantize(ty, &src).unwrap();
        let h = QuantHead::from_ggml(ty, rows, cols, &ggml).unwrap();
        let deq = FloatMatrix { ty, rows, cols, row_bytes: ty.row_bytes(cols).unwrap(), data: ggml };
        for scale in [4.0, 0.01] {
            let x: Vec<f32> = (0..cols).map(|_| rng.f32() * scale).collect();
            let mut a = HeadActivations::default();
            a.quantize(&h, &x);
            let mut want = vec![0f32; rows];
            reference.quant_head_rows(&h, 0..rows, &a, &mut want);
            let mut exact = vec![0f32; rows];
            reference.float_rows(&deq, 0..rows, &x, &mut exact);
            let mut row = vec![0f32; cols];
            for r in 0..rows {
                deq.dequantize_row(r, &mut row);
                let magnitude: f32 = row.iter().zip(&x).map(|(w, x)| (w * x).abs()).sum();
                assert!(
                    (want[r] - exact[r]).abs() < 0.01 * magnitude,
                    "{ty:?} x {cols} row {r}: {} vs float {}",
                    want[r],
                    exact[r]
                );
            }
            for k in kernels::available() {
                for range in [0..rows, 3..rows - 1, 7..8] {
                    let mut got = vec![0f32; range.len()];
                    k.quant_head_rows(&h, range.clone(), &a, &mut got);
                    for (g, e) in got.iter().zip(&want[range.clone()]) {
                        let what = || format!("{} kernel, {ty:?} x {cols}, rows {range:?}", k.name());
                        assert!((g - e).abs() <= 1e-4 * (1.0 + e.abs()), "{}: {g} vs {e}", what());
                    }
                }
            }
        }
    }
}

/// The quantized head's integer sums, bit for bit: with power-of-two scales (and small enough sums)
/// every float step after the integer dot products is exact whatever its order, so each kernel must
/// give exactly the definition `Σ w·x` of the ggml values, computed here in f64. Full-range bytes:
/// Q8_0 values −128 and 127, Q6_K values 0 and 63 with int8 sub-block scales, activations ±127 and
/// an all-zero block; short last groups, odd row counts, row ranges inside the matrix.
#[test]
fn quantized_head_integer_sums_are_exact() {
    let mut rng = Rng(0x0b17_5eed);
    let shapes = [(GgmlType::Q8_0, 32), (GgmlType::Q8_0, 288), (GgmlType::Q8_0, 800), (GgmlType::Q8_0, 1024)];
    for (ty, cols) in shapes.into_iter().chain([(GgmlType::Q6_K, 256), (GgmlType::Q6_K, 512)]) {
        let rows = 13;
        let ggml = exact_head_rows(&mut rng, ty, rows, cols);
        let h = QuantHead::from_ggml(ty, rows, cols, &ggml).unwrap();
        let deq = FloatMatrix { ty, rows, cols, row_bytes: ty.row_bytes(cols).unwrap(), data: ggml };
        let l = if ty == GgmlType::Q6_K { 16 } else { 32 };
        for vector in 0..3 {
            let x = exact_activations(&mut rng, cols, l, vector == 1);
            let mut a = HeadActivations::default();
            a.quantize(&h, &x);
            let mut w = vec![0f32; cols];
            let want: Vec<f64> = (0..rows)
                .map(|r| {
                    deq.dequantize_row(r, &mut w);
                    let terms: Vec<f64> = w.chunks(l).zip(x.chunks(l)).map(|(w, x)| dot_f64(w, x)).collect();
                    // Exactness needs every partial sum within f32's 24 bits, in units of the smallest
                    // weight scale × activation scale (2⁻²).
                    let bound: f64 = terms.iter().map(|t| t.abs()).sum();
                    assert!(bound * 4.0 < (1 << 24) as f64, "test data too large for exact sums: {bound}");
                    terms.iter().sum()
                })
                .collect();
            for k in kernels::available() {
                for range in [0..rows, 2..rows, 5..6] {
                    let mut got = vec![0f32; range.len()];
                    k.quant_head_rows(&h, range.clone(), &a, &mut got);
                    for (i, (&g, &e)) in got.iter().zip(&want[range.clone()]).enumerate() {
                        let r = range.start + i;
                        assert_eq!(g as f64, e, "{} kernel, {ty:?} x {cols}, vector {vector}, row {r}", k.name());
                    }
                }
            }
        }
    }
}

fn dot_f64(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&a, &b)| a as f64 * b as f64).sum()
}

/// `rows` ggml rows of `ty` with random bytes for the values, power-of-two scales (Q8_0 `d` 0.5, 1
/// or 2; Q6_K `d` 0.5 or 1, sub-block scales mostly within ±8, one of −128 a row) and each row's
/// first block holding the extreme values.
fn exact_head_rows(rng: &mut Rng, ty: GgmlType, rows: usize, cols: usize) -> Vec<u8> {
    let pow2 = |rng: &mut Rng, n: u64| f16::from_f32(0.5 * (1 << rng.below(n)) as f32).to_le_bytes();
    let mut out = Vec::new();
    for _ in 0..rows {
        let start = out.len();
        if ty == GgmlType::Q6_K {
            for _ in 0..cols / 256 {
                let mut b: Vec<u8> = (0..192).map(|_| rng.next() as u8).collect();
                b.extend((0..16).map(|_| (rng.below(17) as i8 - 8) as u8));
                b.extend(pow2(rng, 2));
                out.extend(b);
            }
            // Values 0 and 63 (ql nibbles 0 and 15, their qh bits 0 and 3) and the scale −128.
            out[start] &= 0xf0;
            out[start + 128] &= !3;
            out[start + 1] |= 0x0f;
            out[start + 129] |= 3;
            out[start + 192 + 5] = 0x80;
        } else {
            for _ in 0..cols / 32 {
                out.extend(pow2(rng, 3));
                out.extend((0..32).map(|_| rng.next() as u8));
            }
            out[start + 2] = 0x80; // −128
            out[start + 3] = 0x7f;
        }
    }
    out
}

/// Activations whose blocks of `l` quantize exactly: block scale 0.5 or 1 (the block's maximum is
/// 127 times it), int8 values anywhere in ±127; block 1 all zero if `zero_block`.
fn exact_activations(rng: &mut Rng, cols: usize, l: usize, zero_block: bool) -> Vec<f32> {
    let mut x = Vec::with_capacity(cols);
    for b in 0..cols / l {
        let d = if rng.below(2) == 0 { 0.5 } else { 1.0 };
        let mut q: Vec<i32> = (0..l).map(|_| rng.below(255) as i32 - 127).collect();
        q[rng.below(l as u64) as usize] = if rng.below(2) == 0 { 127 } else { -127 };
        if zero_block && b == 1 {
            q.fill(0);
        }
        x.extend(q.iter().map(|&q| q as f32 * d));
    }
    x
}

/// A Q4_0 or Q5_0 LM head is repacked to Q8_0 for kernels without a path of their own: the values must
/// stay exactly the same (each block's scale kept, its codes widened to int8).
#[test]
fn q4_0_and_q5_0_repack_to_q8_0_exactly() {
    let mut rng = Rng(0x005e_ed45);
    let (rows, cols) = (7, 576);
    for ty in [GgmlType::Q4_0, GgmlType::Q5_0] {
        let mut x = rng.vec(rows * cols, 2.0);
        x[..32].fill(0.0); // an all-zero block: scale 0
        let data = quant::quantize(ty, &x).unwrap();
        let w = FloatMatrix { ty, rows, cols, row_bytes: ty.row_bytes(cols).unwrap(), data };
        let q8 = w.repacked_q8_0();
        assert_eq!((q8.ty, q8.rows, q8.cols), (GgmlType::Q8_0, rows, cols));
        let (mut a, mut b) = (vec![0f32; cols], vec![0f32; cols]);
        for r in 0..rows {
            w.dequantize_row(r, &mut a);
            q8.dequantize_row(r, &mut b);
            assert!(a.iter().zip(&b).all(|(a, b)| a.to_bits() == b.to_bits()), "{ty:?} row {r}");
        }
    }
}

/// Random ggml rows of a block type: random code bytes, f16 scales from `scale` (called per block).
fn block_rows_of(
    rng: &mut Rng,
    ty: GgmlType,
    rows: usize,
    cols: usize,
    scale: impl Fn(&mut Rng) -> f32,
) -> FloatMatrix {
    let (size, bytes) = (ty.block_size(), ty.block_bytes());
    let mut data = Vec::with_capacity(rows * cols / size * bytes);
    for _ in 0..rows * cols / size {
        data.extend(f16::from_f32(scale(rng)).to_le_bytes());
        data.extend((0..bytes - 2).map(|_| rng.next() as u8));
    }
    FloatMatrix { ty, rows, cols, row_bytes: ty.row_bytes(cols).unwrap(), data }
}

/// Q1_0, Q2_0 and Q8_0 projections: every kernel against the reference (ggml's generic order of float
/// operations), to float rounding, on random rows and activations.
#[test]
fn block_rows_match_the_reference() {
    let mut rng = Rng(0x0b10_c0de);
    let reference = kernels::available()[0];
    for (ty, cols) in [(GgmlType::Q1_0, 128), (GgmlType::Q1_0, 640), (GgmlType::Q2_0, 64), (GgmlType::Q2_0, 448)]
        .into_iter()
        .chain([(GgmlType::Q8_0, 32), (GgmlType::Q8_0, 416)])
    {
        let rows = 11;
        let w = block_rows_of(&mut rng, ty, rows, cols, |r| 0.001 + r.below(1000) as f32 * 1e-4);
        let x: Vec<f32> = (0..cols).map(|_| rng.below(20001) as f32 / 1000.0 - 10.0).collect();
        let mut a = Q8Activations::default();
        a.quantize(&x);
        let mut want = vec![0f32; rows];
        reference.block_rows(&w, 0..rows, &a, &mut want);
        let mut row = vec![0f32; cols];
        for k in kernels::available() {
            for range in [0..rows, 3..rows, 4..5] {
                let mut got = vec![0f32; range.len()];
                k.block_rows(&w, range.clone(), &a, &mut got);
                for (i, (&g, &e)) in got.iter().zip(&want[range.clone()]).enumerate() {
                    // The sum of |terms| bounds the rounding of any summation order.
                    w.dequantize_row(range.start + i, &mut row);
                    let mag: f32 = row.iter().zip(&x).map(|(w, x)| (w * x).abs()).sum();
                    assert!((g - e).abs() <= 1e-5 * mag, "{} {ty:?} x {cols}, row {}: {g} vs {e}", k.name(), i);
                }
            }
        }
    }
}

/// The integer part bit for bit: with power-of-two weight scales and activations whose Q8_0 blocks
/// quantize exactly (scales 0.5 or 1), every float step is exact whatever its order, so each kernel
/// must give exactly `Σ w·x` of the dequantized weights (f64). Full-range codes (random bytes: Q2_0's
/// unused-by-ternary code 3 and Q8_0's −128 included), activations ±127 and an all-zero block.
#[test]
fn block_rows_integer_sums_are_exact() {
    let mut rng = Rng(0x0b10_e8ac);
    for (ty, cols) in [(GgmlType::Q1_0, 256), (GgmlType::Q2_0, 192), (GgmlType::Q8_0, 288)] {
        let rows = 7;
        let mut w = block_rows_of(&mut rng, ty, rows, cols, |r| 0.5 * (1 << r.below(3)) as f32);
        if ty == GgmlType::Q8_0 {
            w.data[2] = 0x80; // −128
        }
        for vector in 0..3 {
            let x = exact_activations(&mut rng, cols, 32, vector == 1);
            let mut a = Q8Activations::default();
            a.quantize(&x);
            let mut row = vec![0f32; cols];
            let want: Vec<f64> = (0..rows)
                .map(|r| {
                    w.dequantize_row(r, &mut row);
                    dot_f64(&row, &x)
                })
                .collect();
            for k in kernels::available() {
                let mut got = vec![0f32; rows];
                k.block_rows(&w, 0..rows, &a, &mut got);
                for (r, (&g, &e)) in got.iter().zip(&want).enumerate() {
                    assert_eq!(g as f64, e, "{} kernel, {ty:?} x {cols}, vector {vector}, row {r}", k.name());
                }
            }
        }
    }
}

/// ggml's Q8_0 activation quantizer (`quantize_row_q8_0_ref`): d = max|x|/127 kept as f16, q = round(x/d)
/// with ties away from zero, and the Q2_0 plane order (value 4b + k at 8k + b).
#[test]
fn q8_0_activations_are_ggml_s() {
    let mut x: Vec<f32> = (0..64).map(|i| (i as f32 - 31.5) * 0.37).collect();
    x[5] = 0.5 * (x[0].abs() / 127.0) * 3.0; // 1.5 steps: rounds away from zero to 2
    let mut a = Q8Activations::default();
    a.quantize(&x);
    for (b, x) in x.chunks(32).enumerate() {
        let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        assert_eq!(a.d[b], f16::from_f32(d).to_f32());
        for (j, &v) in x.iter().enumerate() {
            let q = (v * (1.0 / d)).round() as i8;
            assert_eq!(a.q[32 * b + j], q, "block {b} value {j}");
            assert_eq!(a.planes[32 * b + 8 * (j % 4) + j / 4], q);
        }
        assert_eq!(a.sum[b], a.q[32 * b..32 * b + 32].iter().map(|&q| q as i32).sum::<i32>());
    }
    assert_eq!(a.q[5], 2);
}
