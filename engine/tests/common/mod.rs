//! Helpers shared by the engine's tests and benchmarks (`mod common;`): deterministic random data, and a
//! BitNet b1.58 2B4T-shaped model built in memory for the speed runs.
#![allow(dead_code)] // each test file uses its own subset

use std::path::Path;

use bitnet_engine::format::gguf::GgufFile;
use bitnet_engine::format::quant::GgmlType;
use bitnet_engine::model::{Activation, Config, Family, Layer, LoadOptions, Model};
use bitnet_engine::tensor::float::FloatMatrix;
use bitnet_engine::tensor::ternary::TernaryMatrix;
use bitnet_engine::tensor::Linear;
use bitnet_engine::text::tokenizer::Tokenizer;
use rayon::prelude::*;

/// A small deterministic generator (xorshift64*), so failures reproduce.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// Uniform in [-1, 1).
    pub fn f32(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }

    pub fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.f32() * scale).collect()
    }
}

/// A GGUF file's model and tokenizer, loaded as `bitnet` loads them.
pub fn load(path: &Path) -> (Model, Tokenizer) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let g = GgufFile::parse(&bytes).unwrap();
    let model = Model::load(&g, &bytes, &LoadOptions::default(), &mut |_, _| {}).unwrap();
    (model, Tokenizer::from_metadata(&g.metadata).unwrap())
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// The index of the largest value (the lowest index among equals), as greedy sampling picks.
pub fn argmax(v: &[f32]) -> usize {
    (0..v.len()).fold(0, |best, i| if v[i] > v[best] { i } else { best })
}

/// Every byte whose four 2-bit fields are valid ternary codes (u = code + 1 in 0..=2).
pub fn valid_ternary_bytes() -> Vec<u8> {
    (0..=255u8).filter(|b| (0..4).all(|g| (b >> (2 * g)) & 3 != 3)).collect()
}

/// Microsoft's BitNet b1.58 2B4T shapes (30 layers, 2560 wide, ff 6912, 20/5 heads of 128, vocabulary 128256,
/// f16 tied embedding) with random weights: the real model's speed (which does not depend on the values),
/// generated in memory in about a second.
pub fn random_2b4t() -> Model {
    let c = Config {
        arch: "bitnet-b1.58".into(),
        n_vocab: 128_256,
        n_ctx_train: 4096,
        n_embd: 2560,
        n_layer: 30,
        n_head: 20,
        n_head_kv: 5,
        head_dim: 128,
        rope_dim: 128,
        n_ff: 6912,
        eps: 1e-5,
        rope_base: 500_000.0,
        activation: Activation::Relu2,
        activation_reason: "random 2B4T-shaped model".into(),
    };
    let valid = valid_ternary_bytes();
    // SplitMix64 of (seed, index): every byte independent, so the matrices fill in parallel.
    let noise = |seed: u64, i: usize| {
        let mut z = seed.wrapping_add(i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z ^ (z >> 31)
    };
    let ternary = |seed: u64, rows: usize, cols: usize| {
        let mut m = TernaryMatrix { rows, cols, scale: 0.02, data: vec![0; rows * cols.div_ceil(128) * 32] };
        m.data.par_iter_mut().enumerate().for_each(|(i, b)| *b = valid[(noise(seed, i) % valid.len() as u64) as usize]);
        Linear::Ternary(m)
    };
    let (q_dim, kv_dim) = (c.n_head * c.head_dim, c.n_head_kv * c.head_dim);
    let layers = (0..c.n_layer as u64)
        .map(|l| Layer {
            attn_norm: vec![1.0; c.n_embd],
            attn_sub_norm: vec![1.0; q_dim],
            ffn_norm: vec![1.0; c.n_embd],
            ffn_sub_norm: vec![1.0; c.n_ff],
            attn_q_norm: Vec::new(),
            attn_k_norm: Vec::new(),
            norm_in: Vec::new(),
            wq: ternary(l * 8, q_dim, c.n_embd),
            wk: ternary(l * 8 + 1, kv_dim, c.n_embd),
            wv: ternary(l * 8 + 2, kv_dim, c.n_embd),
            wo: ternary(l * 8 + 3, c.n_embd, q_dim),
            w_gate: ternary(l * 8 + 4, c.n_ff, c.n_embd),
            w_up: ternary(l * 8 + 5, c.n_ff, c.n_embd),
            w_down: ternary(l * 8 + 6, c.n_embd, c.n_ff),
        })
        .collect();
    let mut embd = vec![0u8; c.n_vocab * c.n_embd * 2];
    embd.par_chunks_mut(2).enumerate().for_each(|(i, b)| {
        let v = (noise(999, i) % 2001) as f32 / 1000.0 - 1.0;
        b.copy_from_slice(&half::f16::from_f32(v * 0.05).to_le_bytes());
    });
    let token_embd =
        FloatMatrix { ty: GgmlType::F16, rows: c.n_vocab, cols: c.n_embd, row_bytes: c.n_embd * 2, data: embd };
    Model { output_norm: vec![1.0; c.n_embd], token_embd, output: None, layers, config: c, family: Family::BitNet }
}
