//! The CUDA backend against the CPU: whole forward passes on the fixture models and the default model
//! (the kernels one by one are unit tests in engine/src/cuda/tests.rs), and a hand-run benchmark on a
//! 2B4T-shaped model with random weights.
//!
//! Needs an NVIDIA GPU with its driver and NVRTC: without one these tests fail. CI only builds them
//! (`cargo test -p bitnet-engine --features cuda --no-run`); README, development section, says how to run them.
#![cfg(feature = "cuda")]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use bitnet_engine::backend::cpu::kernels;
use bitnet_engine::backend::cpu::CpuModel;
use bitnet_engine::backend::cuda::{Cuda, CudaModel};
use bitnet_engine::backend::{Batcher, KvType, Sequence, Step, Want, Weights};
use bitnet_engine::model::{Activation, Model};
use bitnet_engine::tensor::float::FloatMatrix;
use bitnet_engine::tensor::ternary::TernaryMatrix;
use half::f16;
use rayon::prelude::*;

mod common;
use common::{argmax, load, max_abs_diff, random_2b4t};

/// A path under engine/: from the source tree, or from the current directory when the test binary was
/// copied to another checkout (run it from that checkout's engine/).
fn engine_path(rel: &str) -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(rel);
    if p.exists() {
        p
    } else {
        PathBuf::from(rel)
    }
}

/// The gap between the two largest values.
fn margin(v: &[f32]) -> f32 {
    let mut sorted = v.to_vec();
    sorted.sort_by(|a, b| b.total_cmp(a));
    sorted[0] - sorted[1]
}

fn f16_round(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| f16::from_f32(x).to_f32()).collect()
}

/// Keys or values as a cache of type `kv` gives them back: f16-rounded, as they are (f32), or through
/// ggml's reference q8_0 quantizer (per 32 values d = max|x| / 127 kept as f16, q = round(x / d)).
fn cache_round(kv: KvType, v: &[f32]) -> Vec<f32> {
    match kv {
        KvType::F16 => f16_round(v),
        KvType::F32 => v.to_vec(),
        KvType::Q8_0 => v
            .chunks(32)
            .flat_map(|b| {
                let d = b.iter().fold(0f32, |m, x| m.max(x.abs())) / 127.0;
                let inv = if d != 0.0 { 1.0 / d } else { 0.0 };
                let d16 = f16::from_f32(d).to_f32();
                b.iter().map(move |x| d16 * (x * inv).round())
            })
            .collect(),
    }
}

/// How much a cache type's own rounding may move logits besides float noise (q8_0 rounds keys and values
/// to 8 bits: a rounding that float noise flips moves them by a few thousandths).
fn kv_tolerance(kv: KvType) -> f32 {
    if kv == KvType::Q8_0 {
        0.05
    } else {
        0.0
    }
}

/// A sub-norm: the input as it is for a family without them (empty weights).
fn sub_norm(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    if w.is_empty() {
        x.to_vec()
    } else {
        rmsnorm(x, w, eps)
    }
}

fn rmsnorm(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let inv = 1.0 / (ms + eps).sqrt();
    x.iter().zip(w).map(|(&v, &w)| w * (v * inv)).collect()
}

/// model.rs's forward pass, written out again with what the GPU keeps in f16 rounded to f16: keys and
/// values (or as the cache type `kv` keeps them), and the embedding and LM head when stored in another type. The GPU computes this function; it
/// must agree up to float summation order (the CPU backend differs by the f16 rounding as well, which
/// can flip int8 activation roundings and move logits by tenths).
struct Reference<'m> {
    model: &'m Model,
    embd: Vec<f32>,
    head: Vec<f32>,
    kc: Vec<Vec<f32>>,
    vc: Vec<Vec<f32>>,
    kv: KvType,
}

impl<'m> Reference<'m> {
    fn with_kv(model: &'m Model, kv: KvType) -> Self {
        let decode = |m: &FloatMatrix| {
            let mut all = vec![0f32; m.rows * m.cols];
            all.chunks_mut(m.cols).enumerate().for_each(|(r, row)| m.dequantize_row(r, row));
            f16_round(&all)
        };
        let n = model.config.n_layer;
        Reference {
            model,
            embd: decode(&model.token_embd),
            head: decode(model.lm_head()),
            kc: vec![vec![]; n],
            vc: vec![vec![]; n],
            kv,
        }
    }

    fn bitlinear(&self, m: &TernaryMatrix, xn: &[f32]) -> Vec<f32> {
        let mut xq = vec![0i8; m.padded_cols()];
        let s = kernels::quantize_activations(xn, &mut xq);
        let mut acc = vec![0i32; m.rows];
        acc.par_chunks_mut(64)
            .enumerate()
            .for_each(|(i, o)| kernels::best().ternary_rows(m, i * 64..i * 64 + o.len(), &xq, o));
        acc.iter().map(|&a| a as f32 / s * m.scale).collect()
    }

    /// The logits after `token`, the next position.
    fn step(&mut self, token: u32) -> Vec<f32> {
        let c = &self.model.config;
        let (hd, kv_dim, half) = (c.head_dim, c.n_head_kv * c.head_dim, c.rope_dim / 2);
        let pos = self.kc[0].len() / kv_dim;
        let mut x = self.embd[token as usize * c.n_embd..][..c.n_embd].to_vec();
        for (l, w) in self.model.layers.iter().enumerate() {
            let xn = rmsnorm(&x, &w.attn_norm, c.eps);
            let (mut q, mut k, v) = (
                self.bitlinear(w.wq.ternary().unwrap(), &xn),
                self.bitlinear(w.wk.ternary().unwrap(), &xn),
                self.bitlinear(w.wv.ternary().unwrap(), &xn),
            );
            for head in q.chunks_exact_mut(hd).chain(k.chunks_exact_mut(hd)) {
                for j in 0..half {
                    let inv_freq = (c.rope_base as f64).powf(-2.0 * j as f64 / c.rope_dim as f64);
                    let angle = pos as f64 * inv_freq;
                    let (cos, sin) = (angle.cos() as f32, angle.sin() as f32);
                    let (a, b) = (head[j], head[j + half]);
                    head[j] = a * cos - b * sin;
                    head[j + half] = b * cos + a * sin;
                }
            }
            self.kc[l].extend(cache_round(self.kv, &k));
            self.vc[l].extend(cache_round(self.kv, &v));
            let (group, scale) = (c.n_head / c.n_head_kv, 1.0 / (hd as f32).sqrt());
            let mut att = vec![0f32; q.len()];
            for (h, out) in att.chunks_exact_mut(hd).enumerate() {
                let (qh, off) = (&q[h * hd..(h + 1) * hd], (h / group) * hd);
                let mut s: Vec<f32> = (0..=pos)
                    .map(|t| {
                        qh.iter().zip(&self.kc[l][t * kv_dim + off..][..hd]).map(|(a, b)| a * b).sum::<f32>() * scale
                    })
                    .collect();
                let max = s.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                s.iter_mut().for_each(|v| *v = (*v - max).exp());
                let sum: f32 = s.iter().sum();
                for (t, p) in s.iter().enumerate() {
                    let vh = &self.vc[l][t * kv_dim + off..][..hd];
                    out.iter_mut().zip(vh).for_each(|(o, v)| *o += p / sum * v);
                }
            }
            let o = self.bitlinear(w.wo.ternary().unwrap(), &sub_norm(&att, &w.attn_sub_norm, c.eps));
            x.iter_mut().zip(&o).for_each(|(x, o)| *x += o);
            let xn = rmsnorm(&x, &w.ffn_norm, c.eps);
            let (g, u) =
                (self.bitlinear(w.w_gate.ternary().unwrap(), &xn), self.bitlinear(w.w_up.ternary().unwrap(), &xn));
            let gu: Vec<f32> = g
                .iter()
                .zip(&u)
                .map(|(&g, &u)| match c.activation {
                    Activation::Relu2 => g.max(0.0) * g.max(0.0) * u,
                    Activation::Silu => g / (1.0 + (-g).exp()) * u,
                })
                .collect();
            let d = self.bitlinear(w.w_down.ternary().unwrap(), &sub_norm(&gu, &w.ffn_sub_norm, c.eps));
            x.iter_mut().zip(&d).for_each(|(x, d)| *x += d);
        }
        let xn = rmsnorm(&x, &self.model.output_norm, c.eps);
        self.head.par_chunks(c.n_embd).map(|row| row.iter().zip(&xn).map(|(a, b)| a * b).sum()).collect()
    }
}

/// How closely the GPU must follow: the f16-rounding reference within `tol`, with the same top-1 where the
/// reference's top two are `margin` apart; the CPU backend within `tol_cpu` and `margin_cpu` alike.
struct Tolerance {
    tol: f32,
    margin: f32,
    tol_cpu: f32,
    margin_cpu: f32,
}

/// The prompt in one call (the prefill path), then `steps` greedy tokens one at a time (the decode graph),
/// against the reference and the CPU backend at every position; the GPU's own argmax must be the argmax
/// of its logits. Returns the largest differences to the reference and to the CPU.
fn compare(model: &Model, ctx: usize, prompt: &[u32], steps: usize, t: &Tolerance) -> (f32, f32) {
    compare_kv(model, ctx, prompt, steps, t, KvType::F16)
}

/// `compare` with caches of type `kv` on the GPU, the CPU and in the reference.
fn compare_kv(model: &Model, ctx: usize, prompt: &[u32], steps: usize, t: &Tolerance, kv: KvType) -> (f32, f32) {
    let cpu = CpuModel::new(model.clone(), kernels::best(), None, None).unwrap().with_kv(kv);
    let mut cpu = Arc::new(cpu).sequence(ctx).unwrap();
    let mut gpu = Cuda::new(&Arc::new(CudaModel::new(model.clone()).unwrap().with_kv(kv).unwrap()), ctx).unwrap();
    let mut reference = Reference::with_kv(model, kv);
    cpu.forward(prompt, 0, Want::Logits).unwrap();
    gpu.forward(prompt, 0, Want::Logits).unwrap();
    let mut want = prompt.iter().map(|&tok| reference.step(tok)).last().unwrap();
    let (mut worst, mut worst_cpu, mut pos) = (0f32, 0f32, prompt.len());
    let mut picked = None; // the GPU's own greedy pick from the step's logits
    for step in 0..=steps {
        let (c, g) = (cpu.logits(), gpu.logits());
        let (d, d_cpu) = (max_abs_diff(&want, g), max_abs_diff(c, g));
        (worst, worst_cpu) = (worst.max(d), worst_cpu.max(d_cpu));
        assert!(d <= t.tol, "position {pos}: max |Δlogit| to the f16 reference = {d}");
        assert!(d_cpu <= t.tol_cpu, "position {pos}: max |Δlogit| to the CPU = {d_cpu}");
        if margin(&want) > t.margin {
            assert_eq!(argmax(g), argmax(&want), "position {pos}: top-1 vs the f16 reference");
        }
        if margin(c) > t.margin_cpu {
            assert_eq!(argmax(g), argmax(c), "position {pos}: top-1 vs the CPU");
        }
        if let Some(id) = picked {
            assert_eq!(id as usize, argmax(g), "position {pos}: GPU argmax of its own logits");
        }
        if step == steps {
            break;
        }
        let next = argmax(c) as u32;
        cpu.forward(&[next], pos, Want::Logits).unwrap();
        picked = Some(gpu.forward(&[next], pos, Want::Greedy).unwrap().unwrap());
        want = reference.step(next);
        pos += 1;
    }
    (worst, worst_cpu)
}

fn fixture(name: &str) -> PathBuf {
    engine_path("../tests/fixtures/models").join(name)
}

/// Every fixture model (I2_S, TQ1_0, TQ2_0, F32/F16/BF16-stored ternary, per-tensor scales, tied and untied
/// heads, GQA, rows that are not multiples of 64) on its reference prompts.
#[test]
fn fixture_models_match_the_cpu() {
    let refs: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("references.json")).unwrap()).unwrap();
    let mut checked = 0;
    for (file, info) in refs["files"].as_object().unwrap() {
        let (model, _) = load(&fixture(file));
        for case in refs["models"][info["model"].as_str().unwrap()]["cases"].as_array().unwrap() {
            let ids: Vec<u32> = case["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
            // Stable cases have no int8 rounding flip under float noise (make_test_models.py); f16 keys and
            // values are a larger noise, so against the CPU backend flips move logits by tenths anywhere.
            let tol = if case["stable"].as_bool() == Some(true) { 1e-3 } else { 0.5 };
            let t = Tolerance { tol, margin: 0.05, tol_cpu: 1.0, margin_cpu: 1.0 };
            let (d, d_cpu) = compare(&model, 64, &ids, 6, &t);
            eprintln!("{file} / {}: max |Δlogit| {d} (f16 reference), {d_cpu} (CPU)", case["name"]);
            checked += 1;
        }
    }
    assert_eq!(checked, 30, "6 files × 5 prompts");
}

/// The other families' fixtures (tests/scripts/make_family_models.py): 1bitLLM (SiLU, 160-wide rows), and the
/// Llama block without sub-norms (Llama3-8B-1.58 in TQ2_0, Falcon-E with an untied f16 head).
#[test]
fn family_models_match_the_cpu() {
    for file in ["fam-1bitllm-i2_s.gguf", "fam-llama3-tq2_0.gguf", "fam-falcone-i2_s.gguf", "fam-falcone-f16.gguf"] {
        let (model, _) = load(&fixture(file));
        let vocab = model.config.n_vocab as u32;
        let prompt: Vec<u32> = (0..9u32).map(|i| (i * 131 + 7) % vocab).collect();
        // No flip-free prompts to hand: int8 rounding flips move logits by tenths.
        let t = Tolerance { tol: 0.5, margin: 0.5, tol_cpu: 1.0, margin_cpu: 1.0 };
        let (d, d_cpu) = compare(&model, 64, &prompt, 6, &t);
        eprintln!("{file}: max |Δlogit| {d} (f16 reference), {d_cpu} (CPU)");
    }
}

/// The exact (f32) and q8_0 caches: every fixture's stable prompts against the reference keeping keys and values
/// the same way (f32: within 1e-3, as exact as the CPU backend), and the default model.
#[test]
fn kv_types_match_the_cpu() {
    let refs: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("references.json")).unwrap()).unwrap();
    for kv in [KvType::F32, KvType::Q8_0] {
        let mut checked = 0;
        for (file, info) in refs["files"].as_object().unwrap() {
            let (model, _) = load(&fixture(file));
            if kv == KvType::Q8_0 && !model.config.head_dim.is_multiple_of(32) {
                assert!(CudaModel::new(model.clone()).unwrap().with_kv(kv).is_err(), "{file}: q8_0 heads");
                continue;
            }
            for case in refs["models"][info["model"].as_str().unwrap()]["cases"].as_array().unwrap() {
                if case["stable"].as_bool() != Some(true) {
                    continue;
                }
                let ids: Vec<u32> =
                    case["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
                let tol = 1e-3 + kv_tolerance(kv);
                let t = Tolerance { tol, margin: 0.05 + tol, tol_cpu: 1.0, margin_cpu: 1.0 };
                let (d, d_cpu) = compare_kv(&model, 64, &ids, 6, &t, kv);
                eprintln!(
                    "{} cache, {file} / {}: max |Δlogit| {d} (reference), {d_cpu} (CPU)",
                    kv.name(),
                    case["name"]
                );
                checked += 1;
            }
        }
        assert!(checked >= 6, "{} cache: {checked} stable cases", kv.name());
        let (model, tok) = load(&engine_path("models/smolbit-135m.gguf"));
        let t = Tolerance { tol: 1.0, margin: 0.5, tol_cpu: 1.5, margin_cpu: 1.0 };
        let prompt = tok.encode(&"Paris is the capital and largest city of France. ".repeat(12), true).unwrap();
        let (d, d_cpu) = compare_kv(&model, 1024, &prompt, 8, &t, kv);
        eprintln!("{} cache, default model: max |Δlogit| {d} (reference), {d_cpu} (CPU)", kv.name());
    }
}

/// The default model (smolbit-135m: 30 layers, Q5_0 embedding converted to f16, head dim 64, GQA 3:1),
/// also with a prompt longer than one prefill batch (512 tokens).
#[test]
fn default_model_matches_the_cpu() {
    let (model, tok) = load(&engine_path("models/smolbit-135m.gguf"));
    // 30 layers: even float noise flips a few int8 roundings.
    let t = Tolerance { tol: 1.0, margin: 0.5, tol_cpu: 1.5, margin_cpu: 1.0 };
    let prompt = tok.encode("The capital of France is", tok.add_bos()).unwrap();
    let (d, d_cpu) = compare(&model, 1024, &prompt, 8, &t);
    eprintln!("default model, short prompt: max |Δlogit| {d} (f16 reference), {d_cpu} (CPU)");
    let text = "Paris is the capital and largest city of France. ".repeat(60);
    let long = tok.encode(&text, tok.add_bos()).unwrap();
    assert!(long.len() > 600, "{} tokens", long.len());
    let (d, d_cpu) = compare(&model, 1024, &long[..600], 4, &t);
    eprintln!("default model, 600-token prompt: max |Δlogit| {d} (f16 reference), {d_cpu} (CPU)");
}

/// One batched decode step of the sequences in `active`, each taking the reference's greedy pick as its
/// token; their `want` becomes the reference's logits after it. Returns the batcher's greedy picks, in the
/// order of `active`.
fn decode_step(
    batcher: &mut dyn Batcher,
    seqs: &mut [Box<dyn Sequence>],
    active: &[usize],
    reference: &mut [Reference],
    want: &mut [Vec<f32>],
    pos: &mut [usize],
    w: Want,
) -> Vec<Option<u32>> {
    let next: Vec<u32> = want.iter().map(|l| argmax(l) as u32).collect();
    let mut steps: Vec<Step> = seqs
        .iter_mut()
        .enumerate()
        .filter(|(i, _)| active.contains(i))
        .map(|(i, s)| Step { seq: s.as_mut(), tokens: std::slice::from_ref(&next[i]), pos: pos[i], want: w })
        .collect();
    let picked = batcher.forward(&mut steps).unwrap();
    drop(steps);
    for &i in active {
        want[i] = reference[i].step(next[i]);
        pos[i] += 1;
    }
    picked
}

/// Many sequences of one model at once through its batcher (decode tokens as the rows of one pass, each
/// over its own cache at its own position) against the reference: every fixture model's five prompts as
/// five sequences, their prompts in one step, then decode steps that want logits, greedy tokens, or nothing,
/// with sequences leaving the batch and joining it again.
#[test]
fn batched_steps_match_the_reference() {
    batched_steps(KvType::F16, 6);
}

/// The batched step over f32 and q8_0 caches (each row's keys and values quantized into its own sequence's
/// cache at its own position).
#[test]
fn batched_steps_with_other_kv_types() {
    batched_steps(KvType::F32, 2);
    batched_steps(KvType::Q8_0, 2);
}

/// A batched step whose decode tokens carry short prompt pieces as more rows of the same pass (a new
/// sequence's whole prompt, then another one's prompt in two pieces): each piece's last row gives its
/// sequence's logits, the decode rows theirs, all as the reference computes them.
#[test]
fn prompt_pieces_join_a_batched_step() {
    let (model, _) = load(&fixture("tiny-b-tq2_0.gguf"));
    let m = Arc::new(CudaModel::new(model.clone()).unwrap());
    let mut batcher = m.clone().batcher(64);
    let vocab = model.config.n_vocab as u32;
    let prompts: Vec<Vec<u32>> =
        (0..6u32).map(|s| (0..5 + 3 * s).map(|i| (i * 131 + 17 * s + 7) % vocab).collect()).collect();
    let mut seqs: Vec<Box<dyn Sequence>> = prompts.iter().map(|_| m.clone().sequence(64).unwrap()).collect();
    let mut reference: Vec<Reference> = prompts.iter().map(|_| Reference::with_kv(&model, KvType::F16)).collect();
    let mut want: Vec<Vec<f32>> = vec![vec![]; prompts.len()];
    let mut pos = vec![0usize; prompts.len()];
    // Sequences 0-3 take their prompts alone; 4 and 5 wait.
    for i in 0..4 {
        seqs[i].forward(&prompts[i], 0, Want::Logits).unwrap();
        want[i] = prompts[i].iter().map(|&t| reference[i].step(t)).last().unwrap();
        pos[i] = prompts[i].len();
    }
    // Step 1: four decode tokens, sequence 4's whole prompt, and the first 4 tokens of sequence 5's.
    // Step 2: the decode tokens again, and the rest of sequence 5's prompt.
    let split = 4;
    for step in 0..2 {
        let next: Vec<u32> = want.iter().map(|l| if l.is_empty() { 0 } else { argmax(l) as u32 }).collect();
        let pieces: Vec<(usize, &[u32])> = match step {
            0 => vec![(4, &prompts[4][..]), (5, &prompts[5][..split])],
            _ => vec![(5, &prompts[5][split..])],
        };
        let mut steps: Vec<Step> = Vec::new();
        for (i, s) in seqs.iter_mut().enumerate() {
            if i < 4 {
                steps.push(Step {
                    seq: s.as_mut(),
                    tokens: std::slice::from_ref(&next[i]),
                    pos: pos[i],
                    want: Want::Logits,
                });
            } else if let Some((_, piece)) = pieces.iter().find(|(j, _)| *j == i) {
                let w = if step == 0 && i == 5 { Want::Nothing } else { Want::Logits };
                steps.push(Step { seq: s.as_mut(), tokens: piece, pos: pos[i], want: w });
            }
        }
        batcher.forward(&mut steps).unwrap();
        drop(steps);
        for i in 0..4 {
            want[i] = reference[i].step(next[i]);
            pos[i] += 1;
        }
        for &(i, piece) in &pieces {
            want[i] = piece.iter().map(|&t| reference[i].step(t)).last().unwrap();
            pos[i] += piece.len();
        }
        for i in 0..6 {
            if (step == 0 && i == 5) || want[i].is_empty() {
                continue;
            }
            let d = max_abs_diff(&want[i], seqs[i].logits());
            assert!(d <= 0.5, "step {step}, sequence {i}: max |Δlogit| to the f16 reference = {d}");
            if margin(&want[i]) > 0.05f32.max(2.0 * d) {
                assert_eq!(argmax(seqs[i].logits()), argmax(&want[i]), "step {step}, sequence {i}: top-1");
            }
        }
    }
}

/// `batched_steps_match_the_reference` on the first `files` fixtures that fit caches of type `kv`.
fn batched_steps(kv: KvType, files: usize) {
    let refs: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("references.json")).unwrap()).unwrap();
    let mut checked = 0;
    // q8_0 blocks of 32 values need heads of a multiple of 32 (tiny-a's are 16).
    let fits = |file: &str| kv != KvType::Q8_0 || load(&fixture(file)).0.config.head_dim.is_multiple_of(32);
    for (file, info) in refs["files"].as_object().unwrap().iter().filter(|(f, _)| fits(f)).take(files) {
        let (model, _) = load(&fixture(file));
        let cases = refs["models"][info["model"].as_str().unwrap()]["cases"].as_array().unwrap();
        let prompts: Vec<Vec<u32>> = cases
            .iter()
            .map(|c| c["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect())
            .collect();
        let tols: Vec<f32> = cases
            .iter()
            .map(|c| if c["stable"].as_bool() == Some(true) { 1e-3 + kv_tolerance(kv) } else { 0.5 })
            .collect();
        let m = Arc::new(CudaModel::new(model.clone()).unwrap().with_kv(kv).unwrap());
        let mut batcher = m.clone().batcher(16);
        let mut seqs: Vec<Box<dyn Sequence>> = prompts.iter().map(|_| m.clone().sequence(64).unwrap()).collect();
        let mut reference: Vec<Reference> = prompts.iter().map(|_| Reference::with_kv(&model, kv)).collect();
        let mut want: Vec<Vec<f32>> =
            prompts.iter().zip(&mut reference).map(|(p, r)| p.iter().map(|&t| r.step(t)).last().unwrap()).collect();
        let mut pos: Vec<usize> = prompts.iter().map(|p| p.len()).collect();
        let mut steps: Vec<Step> = seqs
            .iter_mut()
            .zip(&prompts)
            .map(|(s, p)| Step { seq: s.as_mut(), tokens: p, pos: 0, want: Want::Logits })
            .collect();
        batcher.forward(&mut steps).unwrap();
        drop(steps);
        // Flip-free ("stable") holds for the prompt's last position only: later positions may have an int8
        // rounding flip (the GPU's float sums run in another order than the reference's), which moves
        // logits by tenths (H200: 0.078 once); the top-1 must agree where the lead exceeds that.
        let check_logits = |seqs: &[Box<dyn Sequence>], active: &[usize], want: &[Vec<f32>], step: usize| {
            for &i in active {
                let s = &seqs[i];
                let what = format!("{file} case {i} step {step}");
                let d = max_abs_diff(&want[i], s.logits());
                let tol = if step == 0 { tols[i] } else { tols[i].max(0.5) };
                assert!(d <= tol, "{what}: max |Δlogit| to the f16 reference = {d}");
                if margin(&want[i]) > 0.05f32.max(2.0 * d) {
                    assert_eq!(argmax(s.logits()), argmax(&want[i]), "{what}: top-1");
                }
            }
        };
        let all: Vec<usize> = (0..seqs.len()).collect();
        check_logits(&seqs, &all, &want, 0);
        // Which sequences step, and what they want: all, then some leave (the odd ones, then all but the
        // first), then all join again.
        let (odd, first): (Vec<usize>, Vec<usize>) = (vec![1, 3], vec![0]);
        let plan = [
            (&all, Want::Logits),
            (&all, Want::Greedy),
            (&odd, Want::Logits),
            (&first, Want::Nothing),
            (&all, Want::Logits),
            (&all, Want::Greedy),
            (&all, Want::Logits),
        ];
        for (step, (active, w)) in plan.into_iter().enumerate() {
            let picked = decode_step(batcher.as_mut(), &mut seqs, active, &mut reference, &mut want, &mut pos, w);
            assert_eq!(picked.len(), active.len());
            for (p, &i) in picked.iter().zip(active.iter()) {
                match w {
                    Want::Logits => assert_eq!(*p, None),
                    Want::Nothing => assert_eq!(*p, None),
                    // No logits to see a flip by: the pick must agree where the lead exceeds any flip's move.
                    Want::Greedy if margin(&want[i]) > 1.0 => {
                        assert_eq!(*p, Some(argmax(&want[i]) as u32), "{file} case {i} step {step}: greedy pick")
                    }
                    Want::Greedy => assert!(p.is_some()),
                }
            }
            if w == Want::Logits {
                check_logits(&seqs, active, &want, step + 1);
            }
            checked += 1;
        }
    }
    assert!(checked >= 7, "{} cache: {checked} steps", kv.name());
    if kv == KvType::F16 {
        assert_eq!(checked, 6 * 7, "6 files × 7 steps");
    }
}

#[test]
fn bad_input_is_an_error() {
    let (model, _) = load(&fixture("tiny-a-i2_s.gguf"));
    let m = Arc::new(CudaModel::new(model.clone()).unwrap());
    assert!(Cuda::new(&m, 0).is_err(), "empty context");
    assert!(Cuda::new(&m, model.config.n_ctx_train + 1).is_err(), "context beyond the model's");
    let mut dev = Cuda::new(&m, 8).unwrap();
    let n_vocab = model.config.n_vocab as u32;
    assert!(dev.forward(&[n_vocab], 0, Want::Logits).is_err(), "token outside the vocabulary");
    assert!(dev.forward(&[1; 9], 0, Want::Nothing).is_err(), "more tokens than the context");
    assert!(dev.forward(&[1], 8, Want::Logits).is_err(), "position past the context");
    dev.forward(&[1, 2, 3, 4, 5, 6, 7, 8], 0, Want::Logits).expect("a full context");
}

/// Mean tokens/s of `f` (which processes `n` tokens) over `reps` runs after one warm-up, as `bitnet bench`.
fn tokens_per_s(n: usize, reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let runs: Vec<f64> = (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            n as f64 / t.elapsed().as_secs_f64()
        })
        .collect();
    runs.iter().sum::<f64>() / reps as f64
}

/// `bitnet bench`'s tests through the backend: pp512 (a prompt from an empty cache, logits of its last
/// token) and tg (tokens one at a time with their logits, from an empty cache and after 1024 tokens).
fn bench(name: &str, model: &Model) {
    let ctx = 4096.min(model.config.n_ctx_train);
    let m = Arc::new(CudaModel::new(model.clone()).unwrap());
    let device = m.name();
    let mut gpu = Cuda::new(&m, ctx).unwrap();
    let vocab = model.config.n_vocab as u32;
    let tokens: Vec<u32> = (0..2048u32).map(|i| (i * 7919 + 13) % vocab).collect();
    let pp = tokens_per_s(512, 5, || {
        gpu.forward(&tokens[..512], 0, Want::Logits).unwrap();
    });
    let tg = |gpu: &mut Cuda, start: usize| {
        tokens_per_s(128, 3, || {
            for (i, &t) in tokens[..128].iter().enumerate() {
                gpu.forward(&[t], start + i, Want::Logits).unwrap();
            }
        })
    };
    let tg0 = tg(&mut gpu, 0);
    // The decode steps without the LM head (and so without logits to read back).
    let steps = tokens_per_s(128, 3, || {
        for (i, &t) in tokens[..128].iter().enumerate() {
            gpu.forward(&[t], i, Want::Nothing).unwrap();
        }
    });
    gpu.forward(&tokens[..1024], 0, Want::Nothing).unwrap();
    let tg1024 = tg(&mut gpu, 1024);
    let c = &model.config;
    let ternary_bytes: usize = model
        .layers
        .iter()
        .map(|l| l.ternary().expect("ternary layers").iter().map(|m| m.rows * m.cols.div_ceil(64) * 16).sum::<usize>())
        .sum();
    let bytes = ternary_bytes + c.n_vocab * c.n_embd * 2;
    let floor = 3.35e12 / bytes as f64;
    println!("| {name} | {} | pp512 | {pp:.0} |", device);
    println!(
        "| {name} | {} | tg128 (from pos 0) | {tg0:.0} ({:.0}% of the {floor:.0} tok/s HBM floor) |",
        device,
        100.0 * tg0 / floor
    );
    println!("| {name} | {} | tg128 (from pos 1024) | {tg1024:.0} |", device);
    println!("| {name} | {} | 128 decode steps without the LM head | {steps:.0} |", device);
}

/// Hand-run: `cargo test -p bitnet-engine --features cuda --release --test cuda -- --ignored --nocapture`.
#[test]
#[ignore = "benchmark: run by hand on a GPU"]
fn bench_2b4t_shape_and_default_model() {
    let (smol, _) = load(&engine_path("models/smolbit-135m.gguf"));
    bench("smolbit-135m", &smol);
    let t = Instant::now();
    let m = random_2b4t();
    eprintln!("random 2B4T-shaped model built in {:.1} s", t.elapsed().as_secs_f64());
    bench("2B4T-shaped (random)", &m);
}
