//! The wgpu backend against the CPU: every kernel against the scalar reference (integer accumulators
//! bit-for-bit, float results to the tolerance their summation order allows), then whole forward passes
//! on the fixture models and the default model.
//!
//! Runs on any adapter, llvmpipe included (`apt-get install mesa-vulkan-drivers libvulkan1`). Without one
//! the tests pass with a note, except in CI (`CI` set), where a missing adapter is a failure.
#![cfg(feature = "wgpu")]

use std::path::{Path, PathBuf};

use bitnet_engine::backend::cpu::kernels::{self, quantize_activations};
use bitnet_engine::backend::cpu::CpuModel;
use bitnet_engine::backend::wgpu::{Gpu, GpuModel, Wgpu, TILE};
use bitnet_engine::backend::{KvType, Sequence, Step, Want, Weights};
use bitnet_engine::format::quant::{self, GgmlType};
use bitnet_engine::model::{Activation, Model};
use bitnet_engine::tensor::float::FloatMatrix;
use bitnet_engine::tensor::ternary::TernaryMatrix;
use std::sync::Arc;

mod common;
use common::{argmax, load, max_abs_diff, random_2b4t, Rng};

/// The adapter the tests run on (a CPU-type one is fine), or `None` outside CI when there is none.
fn gpu() -> Option<Gpu> {
    match Gpu::open(true).expect("opening the adapter") {
        Some(g) => Some(g),
        None if std::env::var_os("CI").is_some() => panic!("CI must have a wgpu adapter: install mesa-vulkan-drivers"),
        None => {
            eprintln!("no wgpu adapter: skipped (install mesa-vulkan-drivers libvulkan1 for llvmpipe)");
            None
        }
    }
}

/// The adapter, with `dot4I8Packed` and with the plain-WGSL fallback.
fn both_dot4() -> Vec<Gpu> {
    let Some(a) = gpu() else { return vec![] };
    let b = gpu().expect("opened once").without_dot4();
    vec![a, b]
}

fn random_ternary(rng: &mut Rng, rows: usize, cols: usize, scale: f32) -> TernaryMatrix {
    let codes: Vec<i8> = (0..rows * cols).map(|_| rng.below(3) as i8 - 1).collect();
    TernaryMatrix::from_codes(rows, cols, &codes, scale)
}

fn scalar_acc(w: &TernaryMatrix, xq: &[i8]) -> Vec<i32> {
    let mut acc = vec![0i32; w.rows];
    kernels::scalar::Scalar.ternary_rows(w, 0..w.rows, xq, &mut acc);
    acc
}

use kernels::Kernels;

fn ulps(a: f32, b: f32) -> u32 {
    (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
}

#[test]
fn bitlinear_accumulators_are_exact() {
    let mut rng = Rng(0x5eed_0001);
    for gpu in both_dot4() {
        for &(rows, cols) in
            &[(1, 1), (3, 127), (17, 128), (40, 192), (33, 320), (64, 576), (9, 1536), (70, 2560), (5, 6912)]
        {
            let w = random_ternary(&mut rng, rows, cols, 0.5);
            let mut inputs = vec![rng.vec(cols, 3.0)];
            // absmax 127 makes s = 1, and then x.5 values are ties: round half to even decides them.
            let mut ties: Vec<f32> = (0..cols).map(|i| (i % 9) as f32 - 4.5).collect();
            ties[0] = 127.0;
            inputs.push(ties);
            inputs.push(vec![-1.0; cols]); // every activation at -127
            for x in inputs {
                let (acc, s) = gpu.probe_bitlinear_acc(&w, &x).unwrap();
                let mut xq = vec![0i8; w.padded_cols()];
                let s_cpu = quantize_activations(&x, &mut xq);
                // WGSL division need not be correctly rounded: s may be off by an ulp or two, and the
                // quantization is then checked with the device's s (x·s is exact in both).
                assert!(ulps(s, s_cpu) <= 2, "{rows}x{cols}: s = {s} on the GPU, {s_cpu} on the CPU");
                let xq_dev: Vec<i8> = x.iter().map(|&v| (v * s).round_ties_even().clamp(-128.0, 127.0) as i8).collect();
                xq[..cols].copy_from_slice(&xq_dev);
                assert_eq!(acc, scalar_acc(&w, &xq), "{rows}x{cols}: accumulators ({})", gpu.adapter().name);
            }
        }
    }
}

/// The prompt GEMM (tile.wgsl): every token's accumulators bit for bit, over token counts that fill
/// no tile exactly (one to two tiles), odd row counts (a row pair's second row missing) and odd widths.
#[test]
fn prompt_gemm_accumulators_are_exact() {
    let mut rng = Rng(0x5eed_0006);
    for gpu in both_dot4() {
        for &(rows, cols, n) in &[
            (1, 1, 3),
            (3, 127, TILE + 5),
            (17, 128, 1),
            (40, 192, TILE),
            (33, 320, 2 * TILE - 1),
            (64, 576, 7),
            (70, 2560, 9),
            (5, 6912, TILE + 1),
        ] {
            let w = random_ternary(&mut rng, rows, cols, 0.5);
            let mut ties: Vec<f32> = (0..cols).map(|i| (i % 9) as f32 - 4.5).collect();
            ties[0] = 127.0;
            let xs: Vec<Vec<f32>> =
                (0..n).map(|i| if i % 5 == 1 { ties.clone() } else { rng.vec(cols, 1.0 + i as f32) }).collect();
            let got = gpu.probe_gemm_acc(&w, &xs).unwrap();
            assert_eq!(got.len(), n);
            // The tile quantizes as the decode kernel does: the same scale, to the bit.
            let (_, s_decode) = gpu.probe_bitlinear_acc(&w, &xs[0]).unwrap();
            assert_eq!(got[0].1, s_decode, "{rows}x{cols}: the tile's and the decode step's scale");
            for (t, (x, (acc, s))) in xs.iter().zip(got).enumerate() {
                let mut xq = vec![0i8; w.padded_cols()];
                let s_cpu = quantize_activations(x, &mut xq);
                assert!(ulps(s, s_cpu) <= 2, "{rows}x{cols} token {t}: s = {s} on the GPU, {s_cpu} on the CPU");
                let xq_dev: Vec<i8> = x.iter().map(|&v| (v * s).round_ties_even().clamp(-128.0, 127.0) as i8).collect();
                xq[..cols].copy_from_slice(&xq_dev);
                assert_eq!(
                    acc,
                    scalar_acc(&w, &xq),
                    "{rows}x{cols} token {t} of {n}: accumulators ({})",
                    gpu.adapter().name
                );
            }
        }
    }
}

/// Softmax attention of the last position over all of them, in f64 (GQA: `n_head_kv` key/value heads).
fn attention_f64(head_dim: usize, n_head_kv: usize, q: &[f32], keys: &[f32], values: &[f32]) -> Vec<f32> {
    let (n_head, kv_dim) = (q.len() / head_dim, n_head_kv * head_dim);
    let mut out = vec![0f32; q.len()];
    for h in 0..n_head {
        let (qh, off) = (&q[h * head_dim..(h + 1) * head_dim], h / (n_head / n_head_kv) * head_dim);
        let scores: Vec<f64> = keys
            .chunks_exact(kv_dim)
            .map(|k| {
                qh.iter().zip(&k[off..]).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>() / (head_dim as f64).sqrt()
            })
            .collect();
        let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
        let sum: f64 = e.iter().sum();
        for i in 0..head_dim {
            out[h * head_dim + i] =
                (e.iter().zip(values.chunks_exact(kv_dim)).map(|(e, v)| e * v[off + i] as f64).sum::<f64>() / sum)
                    as f32;
        }
    }
    out
}

/// Decode attention split over the sequence (flash-decoding), at positions on both sides of chunk
/// boundaries and with a chunk a workgroup wide: the single pass's result and the exact one, to float
/// tolerance.
#[test]
fn split_attention_matches_the_single_pass() {
    let mut rng = Rng(0x5eed_0007);
    let Some(gpu) = gpu() else { return };
    let (head_dim, n_head, n_head_kv) = (64, 6, 2);
    for &(chunk, pos) in
        &[(8, 7), (8, 8), (8, 9), (8, 15), (8, 16), (8, 17), (8, 63), (3, 40), (256, 256), (256, 700), (256, 1023)]
    {
        let n = pos + 1;
        let q = rng.vec(n_head * head_dim, 2.0);
        // Values an f16 cache holds exactly (the kernel rounds the current position's key and value to f16).
        let f16_exact = |v: Vec<f32>| v.into_iter().map(|x| half::f16::from_f32(x).to_f32()).collect::<Vec<_>>();
        let (keys, values) = (rng.vec(n * n_head_kv * head_dim, 2.0), rng.vec(n * n_head_kv * head_dim, 1.0));
        let (keys, values) = (f16_exact(keys), f16_exact(values));
        let want = attention_f64(head_dim, n_head_kv, &q, &keys, &values);
        let single = gpu.probe_attention(head_dim, n_head_kv, &q, &keys, &values, 0).unwrap();
        let split = gpu.probe_attention(head_dim, n_head_kv, &q, &keys, &values, chunk).unwrap();
        let (ds, dp) = (max_abs_diff(&single, &want), max_abs_diff(&split, &want));
        assert!(ds <= 1e-5 && dp <= 1e-5, "chunk {chunk}, position {pos}: max |Δ| {ds} single pass, {dp} split");
        assert!(max_abs_diff(&split, &single) <= 1e-5, "chunk {chunk}, position {pos}: split vs single pass");
    }
}

/// The CPU's rmsnorm, quantization and BitLinear scaling, for the fused kernel's checks.
fn cpu_bitlinear(w: &TernaryMatrix, x: &[f32], norm: &[f32], eps: f32) -> (Vec<f32>, f32) {
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let inv = 1.0 / (ms + eps).sqrt();
    let xn: Vec<f32> = x.iter().zip(norm).map(|(&v, &w)| w * (v * inv)).collect();
    let mut xq = vec![0i8; w.padded_cols()];
    let s = quantize_activations(&xn, &mut xq);
    (scalar_acc(w, &xq).iter().map(|&a| a as f32 / s * w.scale).collect(), s)
}

/// `got` against `want` where one int8 rounding flip (float noise in the norm) may move an output by
/// `step` = scale / s.
fn assert_close(got: &[f32], want: &[f32], step: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= 2.0 * step + 1e-5 * w.abs(), "{what}: [{i}] {g} vs {w} (flip step {step})");
    }
}

#[test]
fn fused_bitlinear_matches_the_cpu() {
    let mut rng = Rng(0x5eed_0002);
    let Some(gpu) = gpu() else { return };
    for &(cols, eps) in &[(96, 1e-5), (576, 1e-6), (2560, 1e-5)] {
        let parts = [
            random_ternary(&mut rng, cols, cols, 0.7),
            random_ternary(&mut rng, 33, cols, 1.3),
            random_ternary(&mut rng, 20, cols, 0.01),
        ];
        let x = rng.vec(cols, 2.0);
        let norm: Vec<f32> = (0..cols).map(|_| 1.0 + 0.2 * rng.f32()).collect();
        let refs: Vec<&TernaryMatrix> = parts.iter().collect();
        let got = gpu.probe_bitlinear(&refs, &x, &norm, eps, None).unwrap();
        let mut at = 0;
        for w in &parts {
            let (want, s) = cpu_bitlinear(w, &x, &norm, eps);
            assert_close(&got[at..at + w.rows], &want, w.scale / s, &format!("stacked part of {cols} columns"));
            at += w.rows;
        }
        // Accumulating into the residual.
        let w = &parts[0];
        let residual = rng.vec(w.rows, 5.0);
        let got = gpu.probe_bitlinear(&[w], &x, &norm, eps, Some(&residual)).unwrap();
        let (y, s) = cpu_bitlinear(w, &x, &norm, eps);
        let want: Vec<f32> = residual.iter().zip(&y).map(|(r, y)| r + y).collect();
        assert_close(&got, &want, w.scale / s, "residual");
    }
}

#[test]
fn gate_up_applies_the_activation() {
    let mut rng = Rng(0x5eed_0003);
    let Some(gpu) = gpu() else { return };
    for act in [Activation::Relu2, Activation::Silu] {
        let (n_ff, cols) = (300, 200);
        let (gate, up) = (random_ternary(&mut rng, n_ff, cols, 0.9), random_ternary(&mut rng, n_ff, cols, 1.1));
        let x = rng.vec(cols, 1.0);
        let norm: Vec<f32> = (0..cols).map(|_| 1.0 + 0.2 * rng.f32()).collect();
        let got = gpu.probe_gate_up(&gate, &up, act, &x, &norm, 1e-5).unwrap();
        let ((g, s), (u, _)) = (cpu_bitlinear(&gate, &x, &norm, 1e-5), cpu_bitlinear(&up, &x, &norm, 1e-5));
        // One int8 flip moves gate or up by a step of scale / s: bound what that does to act(g)·u.
        let (dg, du) = (2.0 * gate.scale / s, 2.0 * up.scale / s);
        for i in 0..n_ff {
            let (a, da) = match act {
                Activation::Relu2 => (g[i].max(0.0) * g[i].max(0.0), dg * (2.0 * g[i].abs() + dg)),
                Activation::Silu => (g[i] / (1.0 + (-g[i]).exp()), 1.1 * dg),
            };
            let tol = da * u[i].abs() + a.abs() * du + da * du + 1e-5 * (a * u[i]).abs();
            assert!((got[i] - a * u[i]).abs() <= tol, "{act}: [{i}] {} vs {}", got[i], a * u[i]);
        }
    }
}

/// A float matrix of `ty` with random values (round-tripped through the type).
fn float_matrix(rng: &mut Rng, ty: GgmlType, rows: usize, cols: usize) -> FloatMatrix {
    let data = quant::quantize(ty, &rng.vec(rows * cols, 1.0)).unwrap();
    let row_bytes = ty.row_bytes(cols).unwrap();
    FloatMatrix { ty, rows, cols, row_bytes, data }
}

const FLOAT_TYPES: [(GgmlType, usize); 10] = [
    (GgmlType::F32, 100), // not a multiple of 4: rows are padded
    (GgmlType::F16, 96),
    (GgmlType::F16, 100), // not a multiple of 8: decoded to F32
    (GgmlType::BF16, 96),
    (GgmlType::Q8_0, 96),
    (GgmlType::Q5_0, 576),
    (GgmlType::Q4_0, 64),
    (GgmlType::Q6_K, 256),
    (GgmlType::Q4_K, 512),
    (GgmlType::F32, 2560),
];

#[test]
fn lm_head_and_embedding_match_the_cpu_for_every_type() {
    let mut rng = Rng(0x5eed_0004);
    let Some(gpu) = gpu() else { return };
    // A small binding limit splits every matrix into several shards.
    for gpu in [gpu, self::gpu().expect("opened once").with_max_shard(12 << 10)] {
        for (ty, cols) in FLOAT_TYPES {
            let m = float_matrix(&mut rng, ty, 77, cols);
            let x = rng.vec(cols, 1.0);
            let got = gpu.probe_matvec(&m, &x).unwrap();
            let mut want = vec![0f32; m.rows];
            kernels::scalar::Scalar.float_rows(&m, 0..m.rows, &x, &mut want);
            let mut row = vec![0f32; cols];
            for r in 0..m.rows {
                m.dequantize_row(r, &mut row);
                let bound: f32 = row.iter().zip(&x).map(|(a, b)| (a * b).abs()).sum();
                assert!(
                    (got[r] - want[r]).abs() <= 1e-5 * bound + 1e-6,
                    "{} x{cols}: row {r}: {} vs {}",
                    ty.name(),
                    got[r],
                    want[r]
                );
            }
            for r in [0, 1, 40, 76] {
                m.dequantize_row(r, &mut row);
                assert_eq!(
                    gpu.probe_lookup(&m, r as u32).unwrap(),
                    row,
                    "{} x{cols}: lookup of row {r} is exact",
                    ty.name()
                );
            }
        }
    }
}

/// blocks.wgsl against the CPU reference (blocks.rs's `reference_rows`, ggml's generic C) on Bonsai-wide rows
/// (Q1_0 4096 columns: 32 blocks a row over 8 threads; Q2_0 and Q8_0 too): on the raw input the Q8_0
/// activations and integer dots are the CPU's and only float sums run in another order (1e-5 relative);
/// through the fused RMS norm, whose sum also runs in another order, a Q8_0 rounding may flip (measured: one
/// step of one activation moved a Q8_0 output by 0.018 of 96), so there 2e-3 relative, which a wrong norm
/// (off by a factor) exceeds by far.
#[test]
fn block_projections_match_the_cpu_reference() {
    use bitnet_engine::backend::cpu::kernels::blocks::{reference_rows, Q8Activations};
    let mut rng = Rng(20);
    for gpu in both_dot4() {
        for (ty, rows, cols) in [(GgmlType::Q1_0, 300, 4096), (GgmlType::Q2_0, 97, 1536), (GgmlType::Q8_0, 64, 4096)] {
            let m = float_matrix(&mut rng, ty, rows, cols);
            let x = rng.vec(cols, 3.0);
            let norm: Vec<f32> = (0..cols).map(|_| 0.5 + rng.f32().abs()).collect();
            for with_norm in [false, true] {
                let input = match with_norm {
                    false => x.clone(),
                    true => {
                        let inv = 1.0 / (x.iter().map(|v| v * v).sum::<f32>() / cols as f32 + 1e-6).sqrt();
                        x.iter().zip(&norm).map(|(v, w)| w * (v * inv)).collect()
                    }
                };
                let mut a = Q8Activations::default();
                a.quantize(&input);
                let mut want = vec![0f32; rows];
                reference_rows(&m, 0..rows, &a, &mut want);
                let got = gpu.probe_blocks(&m, &x, if with_norm { &norm } else { &[] }, 1e-6).unwrap();
                let scale = want.iter().fold(1f32, |s, v| s.max(v.abs()));
                let d = max_abs_diff(&got, &want);
                let what = format!("{ty:?} {rows}x{cols}, norm {with_norm} ({})", gpu.adapter().name);
                let tol = if with_norm { 2e-3 } else { 1e-5 };
                assert!(d <= tol * scale, "{what}: max |Δ| {d} (outputs up to {scale})");
                eprintln!("{what}: max |Δ| {d} (outputs up to {scale})");
            }
        }
    }
}

#[test]
fn argmax_is_the_greedy_choice() {
    let mut rng = Rng(0x5eed_0005);
    let Some(gpu) = gpu() else { return };
    let mut cases =
        vec![vec![0.5, 2.0, -1.0, 2.0], vec![f32::NEG_INFINITY; 5], vec![1.0; 1000], rng.vec(128_256, 10.0)];
    let mut late = vec![-1.0f32; 5000];
    late[4321] = 3.0;
    late[4999] = 3.0;
    cases.push(late);
    for x in cases {
        let want =
            bitnet_engine::generate::sampler::Sampler::new(bitnet_engine::generate::sampler::SamplerParams::greedy())
                .sample(&x, &[])
                .unwrap();
        assert_eq!(gpu.probe_argmax(&x).unwrap(), want, "argmax of {} values", x.len());
    }
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models").join(name)
}

/// The prompt in one call, then `steps` greedy tokens one at a time; at every position with logits the
/// GPU's must match the CPU's: same top-1 where the CPU's top two are `margin` apart (more where a rounding
/// flipped), and within `tol` at
/// the prompt's last position, 0.5 (an int8 rounding flip or two) after it.
/// Returns the difference at the prompt's last position and the largest one.
fn compare_with_cpu(
    model: &Model,
    gm: &Arc<GpuModel>,
    prompt: &[u32],
    steps: usize,
    tol: f32,
    margin: f32,
) -> (f32, f32) {
    let ctx = 64;
    let name = gm.gpu().adapter().name.clone();
    let mut cpu = Arc::new(CpuModel::new(model.clone(), kernels::best(), None, None).unwrap()).sequence(ctx).unwrap();
    let mut dev = Wgpu::with_model(gm.clone(), ctx).unwrap();
    cpu.forward(prompt, 0, Want::Logits).unwrap();
    dev.forward(prompt, 0, Want::Logits).unwrap();
    let (mut first, mut worst) = (0f32, 0f32);
    for (step, pos) in (0..=steps).zip(prompt.len()..) {
        let (c, g) = (cpu.logits(), dev.logits());
        let d = max_abs_diff(c, g);
        eprintln!("{name}: position {pos}: max |Δlogit| {d}");
        worst = worst.max(d);
        if step == 0 {
            first = d;
        }
        assert!(d <= if step == 0 { tol } else { tol.max(0.5) }, "{name}: position {pos}: max |Δlogit| = {d}");
        let top = argmax(c);
        let mut sorted = c.to_vec();
        sorted.sort_by(|a, b| b.total_cmp(a));
        // Where an int8 rounding flipped (a GPU's float reductions differ in order from the CPU's), the
        // logits move by a few tenths: the top-1 must then agree only where the CPU's lead exceeds that move.
        if sorted[0] - sorted[1] > margin.max(2.0 * d) {
            assert_eq!(argmax(g), top, "{name}: position {pos}: top-1");
        }
        if step == steps {
            break;
        }
        let next = top as u32;
        cpu.forward(&[next], pos, Want::Logits).unwrap();
        // Alternate between the two GPU paths: full logits, and the argmax alone (then the logits again).
        if step % 2 == 1 {
            let id = dev.forward(&[next], pos, Want::Greedy).unwrap().unwrap();
            dev.forward(&[next], pos, Want::Logits).unwrap(); // the same position again: the cache entry is rewritten
            assert_eq!(id as usize, argmax(dev.logits()), "{name}: the GPU argmax is that of its logits");
        } else {
            dev.forward(&[next], pos, Want::Logits).unwrap();
        }
    }
    (first, worst)
}

fn upload(gpu: Gpu, model: &Model) -> Arc<GpuModel> {
    Arc::new(GpuModel::upload(Arc::new(gpu), model).unwrap())
}

/// A model's reference prompts (`cases` of a references file) and `steps` greedy steps on `gm` against the CPU,
/// the first prompt also on each of `variants`: (prompts checked, worst |Δlogit| at the prompts' last
/// position on stable prompts, worst anywhere). Stable prompts have no int8 rounding flips under small float
/// noise: logits agree to 1e-3. Elsewhere (and on the generated tokens, which nobody checked for flips) a
/// flip moves logits by a few tenths.
fn compare_cases(
    model: &Model,
    cases: &[serde_json::Value],
    gm: &Arc<GpuModel>,
    variants: &[Arc<GpuModel>],
    steps: usize,
) -> (usize, f32, f32) {
    let (mut stable_worst, mut worst) = (0f32, 0f32);
    for (i, case) in cases.iter().enumerate() {
        let ids: Vec<u32> = case["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        let tol = if case["stable"].as_bool() == Some(true) { 1e-3 } else { 0.5 };
        for gm in std::iter::once(gm).chain(if i == 0 { variants } else { &[] }) {
            let (first, all) = compare_with_cpu(model, gm, &ids, steps, tol, 0.05);
            if tol < 0.5 {
                stable_worst = stable_worst.max(first);
            }
            worst = worst.max(all);
        }
    }
    (cases.len(), stable_worst, worst)
}

/// Every fixture model (every weight type: I2_S, TQ1_0, TQ2_0, F32/F16/BF16-stored ternary, per-tensor
/// scales, tied and untied heads, GQA) on its reference prompts; the first prompt also with the
/// plain-WGSL dot product, with the LM head and embedding split into shards, and with the decode steps'
/// attention split over the sequence in chunks of 2 positions (from position 4 on).
#[test]
fn fixture_models_match_the_cpu() {
    let refs: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("references.json")).unwrap()).unwrap();
    if gpu().is_none() {
        return;
    }
    let (mut checked, mut stable_worst, mut worst) = (0, 0f32, 0f32);
    for (file, info) in refs["files"].as_object().unwrap() {
        let (model, _) = load(&fixture(file));
        let gm = upload(gpu().unwrap(), &model);
        let variants = [
            upload(gpu().unwrap().without_dot4(), &model),
            upload(gpu().unwrap().with_max_shard(8192), &model),
            upload(gpu().unwrap().with_attention_chunk(2), &model),
        ];
        let cases = refs["models"][info["model"].as_str().unwrap()]["cases"].as_array().unwrap();
        let (n, stable, all) = compare_cases(&model, cases, &gm, &variants, 6);
        (checked, stable_worst, worst) = (checked + n, stable_worst.max(stable), worst.max(all));
    }
    assert_eq!(checked, 30, "6 files × 5 prompts");
    eprintln!("fixtures: max |Δlogit| {stable_worst} on stable prompts, {worst} anywhere");
}

/// The other BitNet b1.58 families (tests/scripts/make_family_models.py, references_families.json): 1bitLLM
/// (arch `bitnet`, SiLU, I2_S rows 160 wide: not a multiple of 128), Llama3-8B-1.58 (arch `llama`, TQ2_0, no
/// sub-norms), Falcon-E (arch `llama`, I2_S and ternary-valued F16, untied F16 head, head dim 16) on their
/// reference prompts and 4 greedy steps, against the CPU (1e-3 on flip-free prompts, as the fixtures above),
/// the first prompt also with the plain-WGSL dot product; and their batched steps. Measured on llvmpipe: max
/// |Δlogit| 9.5e-6 anywhere (no int8 rounding flipped).
#[test]
fn family_models_match_the_cpu() {
    let refs: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("references_families.json")).unwrap()).unwrap();
    if gpu().is_none() {
        return;
    }
    let (mut checked, mut stable_worst, mut worst) = (0, 0f32, 0f32);
    for (file, info) in refs["files"].as_object().unwrap() {
        let (model, _) = load(&fixture(file));
        let gm = upload(gpu().unwrap(), &model);
        let plain = upload(gpu().unwrap().without_dot4(), &model);
        let cases = refs["models"][info["model"].as_str().unwrap()]["cases"].as_array().unwrap();
        let (n, stable, all) = compare_cases(&model, cases, &gm, std::slice::from_ref(&plain), 4);
        (checked, stable_worst, worst) = (checked + n, stable_worst.max(stable), worst.max(all));
        let prompts: Vec<Vec<u32>> =
            [3, 1, 6, 2].iter().map(|&n| (0..n).map(|i| (i * 37 + n) % 500).collect()).collect();
        batch_matches_one_at_a_time(&gm, &prompts);
    }
    assert_eq!(checked, 4 + 5 + 5 + 5, "1bitLLM 4 prompts, 3 BPE files × 5");
    eprintln!("families: max |Δlogit| {stable_worst} on stable prompts, {worst} anywhere");
}

/// The default model (smolbit-135m: 30 layers, Q5_0 embedding, head dim 64, GQA 3:1).
#[test]
fn default_model_matches_the_cpu() {
    let Some(gpu) = gpu() else { return };
    let (model, tok) = load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("models/smolbit-135m.gguf"));
    let prompt = tok.encode("The capital of France is", tok.add_bos()).unwrap();
    // A real 30-layer model amplifies float noise through int8 rounding flips: on the CPU alone, scaling
    // one norm weight vector by 1 + 1e-6 moves these logits by 0.24 to 0.43. Hence the wider tolerance.
    let (first, worst) = compare_with_cpu(&model, &upload(gpu, &model), &prompt, 8, 1.0, 0.1);
    eprintln!("default model: max |Δlogit| {first} after the prompt, {worst} anywhere");
}

/// A prompt of more than one tile (the last one partial) in one call: its logits are those of the same
/// tokens run one at a time through the decode path (the same int8 activations and float operations), the
/// decode steps after it continue identically, and both match the CPU.
#[test]
fn prompt_tiles_match_token_by_token() {
    let Some(gpu) = gpu() else { return };
    let (model, tok) = load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("models/smolbit-135m.gguf"));
    let text = "The quick brown fox jumps over the lazy dog. Paris is the capital of France, Berlin is the capital of \
                Germany, and Madrid is the capital of Spain. The tallest mountain in the world is";
    let prompt = tok.encode(text, tok.add_bos()).unwrap();
    assert!(prompt.len() > TILE && prompt.len() % TILE != 0, "{} tokens", prompt.len());
    let gm = upload(gpu, &model);
    compare_with_cpu(&model, &gm, &prompt, 2, 1.0, 0.1);

    let (mut tiled, mut single) = (Wgpu::with_model(gm.clone(), 64).unwrap(), Wgpu::with_model(gm, 64).unwrap());
    tiled.forward(&prompt, 0, Want::Logits).unwrap();
    for (i, &t) in prompt.iter().enumerate() {
        single.forward(&[t], i, if i + 1 == prompt.len() { Want::Logits } else { Want::Nothing }).unwrap();
    }
    // The logits before position `pos` agree; returns their top-1, the next token.
    let same = |tiled: &Wgpu, single: &Wgpu, pos: usize| -> u32 {
        let d = max_abs_diff(tiled.logits(), single.logits());
        eprintln!("position {pos}: max |Δlogit| {d} between the prompt in tiles and token by token");
        assert!(d <= 1e-4, "position {pos}: max |Δlogit| = {d}");
        let next = argmax(single.logits());
        assert_eq!(argmax(tiled.logits()), next, "position {pos}: top-1");
        next as u32
    };
    let mut next = same(&tiled, &single, prompt.len());
    for pos in prompt.len()..prompt.len() + 3 {
        tiled.forward(&[next], pos, Want::Logits).unwrap();
        single.forward(&[next], pos, Want::Logits).unwrap();
        next = same(&tiled, &single, pos + 1);
    }
}

/// Many sequences through the model's batcher (their decode tokens as the rows of one tile, each over its own
/// cache at its own position) against the same sequences run one at a time: the same logits (a tile row
/// computes what the decode path computes, as in `prompt_tiles_match_token_by_token`) and greedy picks, with
/// prompts of different lengths in one step, then sequences leaving the batch and joining it again.
fn batch_matches_one_at_a_time(gm: &Arc<GpuModel>, prompts: &[Vec<u32>]) {
    let name = gm.gpu().adapter().name.clone();
    let mut batcher = gm.clone().batcher(8);
    let mut batched: Vec<Box<dyn Sequence>> = prompts.iter().map(|_| gm.clone().sequence(64).unwrap()).collect();
    let mut single: Vec<Wgpu> = prompts.iter().map(|_| Wgpu::with_model(gm.clone(), 64).unwrap()).collect();
    let run = |batcher: &mut Box<dyn bitnet_engine::backend::Batcher>,
               batched: &mut [Box<dyn Sequence>],
               single: &mut [Wgpu],
               work: &[(usize, Vec<u32>, usize)],
               want: Want| {
        let mut steps: Vec<Step> = batched
            .iter_mut()
            .enumerate()
            .filter_map(|(i, s)| {
                let (_, tokens, pos) = work.iter().find(|w| w.0 == i)?;
                Some(Step { seq: s.as_mut(), tokens, pos: *pos, want })
            })
            .collect();
        let picked = batcher.forward(&mut steps).unwrap();
        drop(steps);
        for (w, p) in work.iter().zip(&picked) {
            let (i, tokens, pos) = w;
            single[*i].forward(tokens, *pos, Want::Logits).unwrap();
            let what = format!("{name}: sequence {i} at {}", pos + tokens.len());
            match want {
                Want::Logits => {
                    let d = max_abs_diff(batched[*i].logits(), single[*i].logits());
                    assert!(d <= 1e-4, "{what}: max |Δlogit| = {d} between the batch and one at a time");
                    assert_eq!(*p, None);
                }
                Want::Greedy => assert_eq!(*p, Some(argmax(single[*i].logits()) as u32), "{what}: greedy pick"),
                Want::Nothing => assert_eq!(*p, None),
            }
        }
    };
    let work: Vec<_> = prompts.iter().enumerate().map(|(i, p)| (i, p.clone(), 0)).collect();
    run(&mut batcher, &mut batched, &mut single, &work, Want::Logits);
    let mut pos: Vec<usize> = prompts.iter().map(|p| p.len()).collect();
    let all: Vec<usize> = (0..prompts.len()).collect();
    let plan = [
        (all.clone(), Want::Logits),
        (all.clone(), Want::Greedy),
        (vec![1, 3], Want::Logits),
        (vec![0], Want::Nothing),
        (all.clone(), Want::Logits),
        (all.clone(), Want::Greedy),
        (all, Want::Logits),
    ];
    for (active, want) in plan {
        let work: Vec<_> = active.iter().map(|&i| (i, vec![argmax(single[i].logits()) as u32], pos[i])).collect();
        run(&mut batcher, &mut batched, &mut single, &work, want);
        active.iter().for_each(|&i| pos[i] += 1);
    }
}

#[test]
fn batched_steps_match_one_at_a_time() {
    let Some(gpu) = gpu() else { return };
    let (model, _) = load(&fixture("tiny-a-i2_s.gguf"));
    let prompts: Vec<Vec<u32>> =
        [3, 1, 7, 2, 12].iter().map(|&n| (0..n).map(|i| (i * 37 + n) % 100).collect()).collect();
    batch_matches_one_at_a_time(&upload(gpu, &model), &prompts);
}

#[test]
fn bad_input_is_an_error() {
    let Some(gpu) = gpu() else { return };
    let (model, _) = load(&fixture("tiny-a-i2_s.gguf"));
    let m = Arc::new(GpuModel::upload(Arc::new(gpu), &model).unwrap());
    assert!(Wgpu::with_model(m.clone(), 0).is_err(), "empty context");
    assert!(Wgpu::with_model(m.clone(), model.config.n_ctx_train + 1).is_err(), "context beyond the model's");
    let mut dev = Wgpu::with_model(m, 8).unwrap();
    let n_vocab = model.config.n_vocab as u32;
    assert!(dev.forward(&[n_vocab], 0, Want::Logits).is_err(), "token outside the vocabulary");
    assert!(dev.forward(&[1; 9], 0, Want::Nothing).is_err(), "more tokens than the context");
    assert!(dev.forward(&[1], 8, Want::Logits).is_err(), "position past the context");
    dev.forward(&[1, 2, 3, 4, 5, 6, 7, 8], 0, Want::Logits).expect("a full context");
}

// ---------------------------------------------------------------------------------------------------------------
// Speed, by hand (not correctness: these are ignored by default):
// `cargo test --release -p bitnet-engine --features wgpu --test wgpu -- --ignored --nocapture bench`
// Measured as `bitnet bench` does: pp = a prompt of 128 tokens from an empty cache (logits of the last), tg = 64
// tokens one at a time, each with its logits read back; one warm-up, then the mean of 3 runs. Also tg with only
// the argmax read back, and each kernel's time per dispatch.

/// Bytes a decode step must read: every ternary weight and the LM head.
fn bytes_per_token(m: &Model) -> usize {
    let t: usize = m.layers.iter().flat_map(|l| l.ternary().expect("ternary layers")).map(|w| w.data.len()).sum();
    t + m.lm_head().data.len()
}

fn bench(name: &str, model: &Model) {
    let Some(gpu) = gpu() else { return };
    let adapter = gpu.adapter().clone();
    let t = std::time::Instant::now();
    let m = Arc::new(GpuModel::upload(Arc::new(gpu), model).unwrap());
    let mut dev = Wgpu::with_model(m, model.config.n_ctx_train.min(4096)).unwrap();
    eprintln!(
        "{name}: uploaded in {:.2} s to {} ({}, {})",
        t.elapsed().as_secs_f64(),
        adapter.name,
        adapter.kind,
        adapter.backend
    );
    let n_vocab = model.config.n_vocab as u32;
    let tokens: Vec<u32> = (0..128u32).map(|i| (i * 7919 + 13) % n_vocab).collect();
    let mut time = |what: &str, f: &mut dyn FnMut(&mut Wgpu)| -> f64 {
        f(&mut dev); // warm-up
        let runs: Vec<f64> = (0..3)
            .map(|_| {
                let t = std::time::Instant::now();
                f(&mut dev);
                t.elapsed().as_secs_f64()
            })
            .collect();
        let mean = runs.iter().sum::<f64>() / runs.len() as f64;
        eprintln!(
            "{name}: {what}: {:.3} ms (runs {:?} ms)",
            mean * 1e3,
            runs.iter().map(|r| (r * 1e4).round() / 10.0).collect::<Vec<_>>()
        );
        mean
    };
    let pp = time("pp128", &mut |d| {
        d.forward(&tokens, 0, Want::Logits).unwrap();
    });
    let tg = time("tg64", &mut |d| {
        (0..64).for_each(|i| {
            d.forward(&tokens[i..i + 1], i, Want::Logits).unwrap();
        })
    });
    let tg_id = time("tg64 argmax only", &mut |d| {
        (0..64).for_each(|i| {
            d.forward(&tokens[i..i + 1], i, Want::Greedy).unwrap().unwrap();
        })
    });
    let bytes = bytes_per_token(model) as f64;
    let floor = bytes / 3.35e12; // H100 SXM HBM3 bandwidth
    let row = |test: &str, n: f64, secs: f64| {
        let per_token = secs / n;
        println!(
            "| {name} | {} | {test} | {:.1} tokens/s | {:.3} ms/token | {:.1}% of the 3.35 TB/s floor ({:.0} MB/token) |",
            adapter.name,
            n / secs,
            per_token * 1e3,
            100.0 * floor / per_token,
            bytes / 1e6
        )
    };
    row("pp128", 128.0, pp);
    row("tg64", 64.0, tg);
    row("tg64 (argmax only)", 64.0, tg_id);
    for (kernel, us) in dev.time_kernels(200).unwrap() {
        println!("| {name} | kernel {kernel} | {us:.2} µs per dispatch |");
    }
    for (part, us) in dev.time_host(50).unwrap() {
        println!("| {name} | host: {part} | {us:.1} µs per token |");
    }
}

/// The host's share of a decode step alone (on llvmpipe too, where the device time says little).
#[test]
#[ignore]
fn bench_host_side() {
    let Some(gpu) = gpu() else { return };
    let (model, _) = load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("models/smolbit-135m.gguf"));
    let mut dev = Wgpu::with_model(upload(gpu, &model), 64).unwrap();
    dev.time_host(5).unwrap(); // warm-up
    for (part, us) in dev.time_host(50).unwrap() {
        println!("| smolbit-135m | host: {part} | {us:.1} µs per token |");
    }
}

#[test]
#[ignore]
fn bench_default_model() {
    bench("smolbit-135m", &load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("models/smolbit-135m.gguf")).0);
}

#[test]
#[ignore]
fn bench_2b4t_shape() {
    bench("2B4T-shape", &random_2b4t());
}

/// The Qwen3 fixtures (tests/fixtures/models/references_qwen3.json: PrismML's Q1_0 with a tied F16 head,
/// Q2_0 with an untied Q8_0 head, both quantized by llama.cpp's llama-quantize) on the device, both KV
/// caches f32 as the references: every prompt position's logits, token by token (the decode path) and the
/// whole prompt in one call (the tile path: its last position), against the CPU backend and against
/// llama.cpp's logits on the same file, with the same top-1.
///
/// Tolerance: the device quantizes each projection's input to Q8_0 blocks as the CPU does, and the integer
/// dot products are exact, but its float sums (RMS norms, the block scales' sums) run in another order, so
/// a Q8_0 rounding of one activation can flip on another device. Measured on llvmpipe: max |Δ| 1.1e-5 vs
/// the CPU (no flip), 0.0043 vs llama.cpp (the CPU's own difference). Bounds: 0.01 vs the CPU (room for a
/// flip or two on other GPUs, far below the quantization error itself), and the CPU's own bound against
/// llama.cpp (0.02, tests/qwen3.rs).
#[test]
fn qwen3_models_match_the_cpu_and_llama_cpp() {
    let refs: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("references_qwen3.json")).unwrap()).unwrap();
    if gpu().is_none() {
        return;
    }
    let floats = |v: &serde_json::Value| -> Vec<f32> {
        v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
    };
    let (mut checked, mut worst_cpu, mut worst_lc) = (0, 0f32, 0f32);
    for (file, info) in refs["models"].as_object().unwrap() {
        let (model, _) = load(&fixture(file));
        let cpu: Arc<dyn Weights> =
            Arc::new(CpuModel::new(model.clone(), kernels::best(), None, None).unwrap().with_kv(KvType::F32));
        let devices = [gpu().unwrap(), gpu().unwrap().without_dot4()];
        for dev in devices {
            let gm = Arc::new(GpuModel::upload(Arc::new(dev), &model).unwrap().with_kv(KvType::F32).unwrap());
            let name = format!("{file} on {}", gm.gpu().adapter().name);
            for case in info["cases"].as_array().unwrap() {
                let tokens: Vec<u32> =
                    case["tokens"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
                let lc = case["llama_cpp"].as_array().unwrap();
                let (mut c, mut g) = (cpu.clone().sequence(64).unwrap(), Wgpu::with_model(gm.clone(), 64).unwrap());
                let mut whole = Wgpu::with_model(gm.clone(), 64).unwrap();
                whole.forward(&tokens, 0, Want::Logits).unwrap();
                for (pos, &t) in tokens.iter().enumerate() {
                    c.forward(&[t], pos, Want::Logits).unwrap();
                    g.forward(&[t], pos, Want::Logits).unwrap();
                    let (want, lc) = (c.logits(), floats(&lc[pos]));
                    let what = format!("{name}, prompt of {}, position {pos}", tokens.len());
                    let (d_cpu, d_lc) = (max_abs_diff(g.logits(), want), max_abs_diff(g.logits(), &lc));
                    assert!(d_cpu <= 0.01, "{what}: max |Δ| vs the CPU = {d_cpu}");
                    assert!(d_lc <= 0.02, "{what}: max |Δ| vs llama.cpp = {d_lc}");
                    assert_eq!(argmax(g.logits()), argmax(want), "{what}: top-1 vs the CPU");
                    assert_eq!(argmax(g.logits()), argmax(&lc), "{what}: top-1 vs llama.cpp");
                    (worst_cpu, worst_lc) = (worst_cpu.max(d_cpu), worst_lc.max(d_lc));
                    checked += 1;
                }
                let d = max_abs_diff(whole.logits(), g.logits());
                assert!(d <= 1e-4, "{name}: the prompt in one call vs token by token: max |Δ| = {d}");
            }
        }
    }
    assert_eq!(checked, 2 * 2 * (12 + 8), "2 files × 2 dot products × 20 positions");
    eprintln!("qwen3: max |Δlogit| {worst_cpu} vs the CPU, {worst_lc} vs llama.cpp");
}

/// The batched step on Qwen3 (Q1_0 projections; Q2_0 with the Q8_0 head): each row as its sequence alone.
#[test]
fn qwen3_batched_steps_match_one_at_a_time() {
    let prompts: Vec<Vec<u32>> =
        [3, 1, 7, 2, 12].iter().map(|&n| (0..n).map(|i| (i * 37 + n) % 500).collect()).collect();
    for file in ["qwen3-q1_0.gguf", "qwen3-q2_0.gguf"] {
        let Some(gpu) = gpu() else { return };
        let (model, _) = load(&fixture(file));
        batch_matches_one_at_a_time(&upload(gpu, &model), &prompts);
    }
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "embedding lengths");
    let dot = |x: &[f32], y: &[f32]| x.iter().zip(y).map(|(&p, &q)| p as f64 * q as f64).sum::<f64>();
    dot(a, b) / (dot(a, a) * dot(b, b)).sqrt()
}

/// A BitNet embedding model (qwen3 with I2_S projections and an RMSNorm on each projection's input: q, k, v,
/// gate and up each on their own input, the double norm fused into the quantization) on the device: the final
/// hidden state of the reference's tokens (last-token pooling) against the CPU's and against the numpy
/// reference of references_qwen3.json (cosine ≥ 0.9999, as `bitnet embed` on the CPU), with the f16 and the
/// f32 KV cache; the prompt in one call (tiles) equal to token by token; and its batched steps.
#[test]
fn qwen3_embedding_model_matches_the_cpu_and_reference() {
    let refs: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("references_qwen3.json")).unwrap()).unwrap();
    let refs = &refs["embedding"];
    let Some(gpu) = gpu() else { return };
    let (model, _) = load(&fixture(refs["file"].as_str().unwrap()));
    assert!(model.is_embedding());
    let gpu = Arc::new(gpu);
    let floats = |v: &serde_json::Value| -> Vec<f32> {
        v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
    };
    let (mut worst_cpu, mut worst_ref) = (1f64, 1f64);
    for (kv, want) in [(KvType::F16, "embedding"), (KvType::F32, "embedding_f32_cache")] {
        let gm = Arc::new(GpuModel::upload(gpu.clone(), &model).unwrap().with_kv(kv).unwrap());
        let cpu: Arc<dyn Weights> =
            Arc::new(CpuModel::new(model.clone(), kernels::best(), None, None).unwrap().with_kv(kv));
        for case in refs["cases"].as_array().unwrap() {
            let tokens: Vec<u32> =
                case["tokens"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
            let (mut c, mut g) = (cpu.clone().sequence(64).unwrap(), Wgpu::with_model(gm.clone(), 64).unwrap());
            c.forward(&tokens, 0, Want::Logits).unwrap();
            g.forward(&tokens, 0, Want::Logits).unwrap();
            let what = format!("{:?}, {kv:?} cache", case["text"]);
            let hidden = g.hidden().expect("an embedding model's hidden state").to_vec();
            let (to_cpu, to_ref) = (cosine(&hidden, c.hidden().unwrap()), cosine(&hidden, &floats(&case[want])));
            assert!(to_cpu >= 0.9999, "{what}: cosine {to_cpu} with the CPU's");
            assert!(to_ref >= 0.9999, "{what}: cosine {to_ref} with the numpy reference");
            (worst_cpu, worst_ref) = (worst_cpu.min(to_cpu), worst_ref.min(to_ref));
            let mut single = Wgpu::with_model(gm.clone(), 64).unwrap();
            for (i, &t) in tokens.iter().enumerate() {
                single.forward(&[t], i, Want::Logits).unwrap();
            }
            let d = max_abs_diff(single.hidden().unwrap(), &hidden);
            assert!(d <= 1e-5, "{what}: token by token vs the prompt in one call: max |Δ| {d}");
        }
    }
    eprintln!("embedding model: cosine ≥ {worst_cpu} with the CPU, ≥ {worst_ref} with the numpy reference");
    let prompts: Vec<Vec<u32>> = [3, 1, 6, 2].iter().map(|&n| (0..n).map(|i| (i * 37 + n) % 500).collect()).collect();
    batch_matches_one_at_a_time(&Arc::new(GpuModel::upload(gpu, &model).unwrap()), &prompts);
}
