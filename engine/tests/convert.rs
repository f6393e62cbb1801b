//! Hugging Face checkpoint → GGUF conversion and GGUF requantization.
//!
//! Synthetic checkpoints are built here in each BitLinear layout (packed uint8, int8 codes, float master weights),
//! converted, parsed back, and their codes and scales compared with the ones they were built from. The real
//! smolbit-135m checkpoint is converted once and compared with an independent decode of its packed tensors.

use std::collections::HashMap;

use bitnet_engine::convert::{self, ConvertOptions, Converted, HfCheckpoint, HfTokenizer};
use bitnet_engine::format::gguf::{GgufFile, GgufWriter, Value};
use bitnet_engine::format::quant::{self, GgmlType};
use bitnet_engine::model::{Activation, Family, LoadOptions, Model};
use bitnet_engine::tensor::ternary::TernaryMatrix;
use bitnet_engine::Error;
use half::{bf16, f16};
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::json;

// ---------------------------------------------------------------------------------------------------------------
// A synthetic checkpoint

/// SplitMix64: deterministic test data.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [-1, 1).
    fn float(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    fn code(&mut self) -> i8 {
        (self.next() % 3) as i8 - 1
    }
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Layout {
    /// uint8 (out/4, in) + weight_scale (f32 or bf16) that divides.
    Packed(Dtype),
    /// int8 (out, in) codes + f32 weight_scale.
    Int8,
    /// Latent master weights in this float dtype.
    Master(Dtype),
    /// Ternary-valued floats {-s, 0, s} in this dtype.
    TernaryValued(Dtype),
}

#[derive(Clone, Copy)]
struct Shape {
    n_vocab: usize,
    n_embd: usize,
    n_ff: usize,
    n_layer: usize,
    n_head: usize,
    n_head_kv: usize,
    head_dim: usize,
}

const SMALL: Shape = Shape { n_vocab: 64, n_embd: 256, n_ff: 512, n_layer: 2, n_head: 4, n_head_kv: 2, head_dim: 64 };

const PROJ: [(&str, &str); 7] = [
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
];

fn proj_shapes(s: &Shape) -> [(usize, usize); 7] {
    let (q, kv) = (s.n_head * s.head_dim, s.n_head_kv * s.head_dim);
    [
        (q, s.n_embd),
        (kv, s.n_embd),
        (kv, s.n_embd),
        (s.n_embd, q),
        (s.n_ff, s.n_embd),
        (s.n_ff, s.n_embd),
        (s.n_embd, s.n_ff),
    ]
}

/// A checkpoint's files, and what its BitLinear weights must decode to (GGUF name → codes, multiplier).
struct Synth {
    config: serde_json::Value,
    tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)>,
    expected: HashMap<String, (Vec<i8>, f32)>,
    shape: Shape,
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn float_bytes(v: &[f32], dtype: Dtype) -> Vec<u8> {
    match dtype {
        Dtype::F32 => f32_bytes(v),
        Dtype::F16 => v.iter().flat_map(|&x| f16::from_f32(x).to_le_bytes()).collect(),
        Dtype::BF16 => v.iter().flat_map(|&x| bf16::from_f32(x).to_le_bytes()).collect(),
        d => panic!("not a float dtype: {d:?}"),
    }
}

fn pack(codes: &[i8], rows: usize, cols: usize) -> Vec<u8> {
    let r_stride = rows / 4;
    let mut out = vec![0u8; r_stride * cols];
    for (k, &t) in codes.iter().enumerate() {
        let (row, c) = (k / cols, k % cols);
        out[(row % r_stride) * cols + c] |= ((t + 1) as u8) << (2 * (row / r_stride));
    }
    out
}

/// BitNet's absmean recipe, written out independently of the engine.
fn absmean(w: &[f32]) -> (Vec<i8>, f32) {
    let mean = w.iter().map(|v| f64::from(v.abs())).sum::<f64>() / w.len() as f64;
    let s = (mean as f32).max(1e-5);
    (w.iter().map(|&v| (v / s).round_ties_even().clamp(-1.0, 1.0) as i8).collect(), s)
}

impl Synth {
    fn new(shape: Shape, layout: Layout, seed: u64) -> Self {
        let s = shape;
        let config = json!({
            "architectures": ["BitNetForCausalLM"], "model_type": "bitnet", "vocab_size": s.n_vocab,
            "hidden_size": s.n_embd, "intermediate_size": s.n_ff, "num_hidden_layers": s.n_layer,
            "num_attention_heads": s.n_head, "num_key_value_heads": s.n_head_kv, "head_dim": s.head_dim,
            "hidden_act": "relu2", "max_position_embeddings": 1024, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
            "rope_scaling": null, "tie_word_embeddings": true,
            "quantization_config": {"quant_method": "bitnet", "linear_class": "bitlinear", "quantization_mode": "offline"}
        });
        let mut synth = Synth { config, tensors: Vec::new(), expected: HashMap::new(), shape };
        let mut rng = Rng(seed);
        let embd: Vec<f32> = (0..s.n_vocab * s.n_embd).map(|_| rng.float()).collect();
        synth.add("model.embed_tokens.weight", Dtype::F16, vec![s.n_vocab, s.n_embd], float_bytes(&embd, Dtype::F16));
        synth.add_norm("model.norm.weight", s.n_embd, &mut rng);
        let q_dim = s.n_head * s.head_dim;
        for i in 0..s.n_layer {
            let p = format!("model.layers.{i}");
            synth.add_norm(&format!("{p}.input_layernorm.weight"), s.n_embd, &mut rng);
            synth.add_norm(&format!("{p}.post_attention_layernorm.weight"), s.n_embd, &mut rng);
            synth.add_norm(&format!("{p}.self_attn.attn_sub_norm.weight"), q_dim, &mut rng);
            synth.add_norm(&format!("{p}.mlp.ffn_sub_norm.weight"), s.n_ff, &mut rng);
            for ((gguf, hf), (rows, cols)) in PROJ.into_iter().zip(proj_shapes(&s)) {
                synth.add_projection(
                    &format!("{p}.{hf}"),
                    &format!("blk.{i}.{gguf}.weight"),
                    rows,
                    cols,
                    layout,
                    &mut rng,
                );
            }
        }
        synth
    }

    fn add(&mut self, name: &str, dtype: Dtype, shape: Vec<usize>, data: Vec<u8>) {
        self.tensors.push((name.to_string(), dtype, shape, data));
    }

    fn add_norm(&mut self, name: &str, len: usize, rng: &mut Rng) {
        let w: Vec<f32> = (0..len).map(|_| 1.0 + 0.5 * rng.float()).collect();
        self.add(name, Dtype::F32, vec![len], f32_bytes(&w));
    }

    fn add_projection(&mut self, hf: &str, gguf: &str, rows: usize, cols: usize, layout: Layout, rng: &mut Rng) {
        let codes: Vec<i8> = (0..rows * cols).map(|_| rng.code()).collect();
        let s = 0.01 + 0.04 * rng.float().abs(); // the training scale
        let weight = format!("{hf}.weight");
        let scale_name = format!("{hf}.weight_scale");
        let expected = match layout {
            Layout::Packed(dtype) => {
                self.add(&weight, Dtype::U8, vec![rows / 4, cols], pack(&codes, rows, cols));
                let ws = float_bytes(&[1.0 / s], dtype);
                let stored = if dtype == Dtype::BF16 { bf16::from_le_bytes([ws[0], ws[1]]).to_f32() } else { 1.0 / s };
                self.add(&scale_name, dtype, vec![1], ws);
                (codes, (1.0 / f64::from(stored)) as f32)
            }
            Layout::Int8 => {
                self.add(&weight, Dtype::I8, vec![rows, cols], codes.iter().map(|&t| t as u8).collect());
                self.add(&scale_name, Dtype::F32, vec![1], f32_bytes(&[1.0 / s]));
                (codes, (1.0 / f64::from(1.0 / s)) as f32)
            }
            Layout::Master(dtype) => {
                // Latent weights around the codes, far from the rounding boundaries of the absmean recipe.
                let w: Vec<f32> = codes.iter().map(|&t| (f32::from(t) + 0.3 * rng.float()) * s).collect();
                let bytes = float_bytes(&w, dtype);
                let mut stored = vec![0f32; w.len()];
                quant::dequantize(float_type(dtype), &bytes, &mut stored).unwrap();
                self.add(&weight, dtype, vec![rows, cols], bytes);
                absmean(&stored)
            }
            Layout::TernaryValued(dtype) => {
                let w: Vec<f32> = codes.iter().map(|&t| f32::from(t) * s).collect();
                self.add(&weight, dtype, vec![rows, cols], float_bytes(&w, dtype));
                (codes, s_of(&w, dtype))
            }
        };
        self.expected.insert(gguf.to_string(), expected);
    }

    fn shard(&self, filter: impl Fn(usize) -> bool) -> Vec<u8> {
        let views: Vec<(String, TensorView)> = self
            .tensors
            .iter()
            .enumerate()
            .filter(|(i, _)| filter(*i))
            .map(|(_, (n, d, s, b))| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
            .collect();
        safetensors::serialize(views, None).unwrap()
    }

    fn safetensors(&self) -> Vec<u8> {
        self.shard(|_| true)
    }

    fn convert(&self, o: &ConvertOptions) -> Result<Converted, Error> {
        convert_shards(&self.config.to_string(), &[&self.safetensors()], o)
    }
}

/// The stored magnitude of ternary-valued floats: max |w| after the dtype's rounding.
fn s_of(w: &[f32], dtype: Dtype) -> f32 {
    let bytes = float_bytes(w, dtype);
    let mut stored = vec![0f32; w.len()];
    quant::dequantize(float_type(dtype), &bytes, &mut stored).unwrap();
    stored.iter().fold(0.0, |a, v| a.max(v.abs()))
}

fn float_type(d: Dtype) -> GgmlType {
    match d {
        Dtype::F32 => GgmlType::F32,
        Dtype::F16 => GgmlType::F16,
        Dtype::BF16 => GgmlType::BF16,
        d => panic!("{d:?}"),
    }
}

/// A small byte-level BPE tokenizer.json with `n` tokens (the last one special).
fn tokenizer_json(n: usize) -> String {
    let vocab: serde_json::Map<String, serde_json::Value> = (0..n - 1).map(|i| (format!("t{i}"), json!(i))).collect();
    json!({
        "model": {"type": "BPE", "vocab": vocab, "merges": [], "byte_fallback": false},
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "use_regex": true},
        "added_tokens": [{"id": n - 1, "content": "<|endoftext|>", "special": true}]
    })
    .to_string()
}

fn tokenizer_config() -> String {
    json!({"eos_token": "<|endoftext|>", "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"})
        .to_string()
}

fn convert_shards(config: &str, shards: &[&[u8]], o: &ConvertOptions) -> Result<Converted, Error> {
    let tok = tokenizer_json(64);
    let tok_config = tokenizer_config();
    let ckpt = HfCheckpoint {
        config_json: config,
        tokenizer: HfTokenizer::Json(&tok),
        tokenizer_config_json: Some(&tok_config),
        shards,
    };
    convert::convert(&ckpt, o, &mut |_, _| {})
}

fn opts(ternary: GgmlType, embd: GgmlType) -> ConvertOptions {
    ConvertOptions { ternary, embd, force: false, name: Some("synthetic".into()) }
}

// ---------------------------------------------------------------------------------------------------------------
// Checks on the GGUF

fn ternary_of(g: &GgufFile, bytes: &[u8], name: &str) -> TernaryMatrix {
    let t = g.tensor(name).unwrap_or_else(|| panic!("no tensor {name}"));
    TernaryMatrix::from_tensor(t.ty, g.tensor_data(bytes, t), t.rows(), t.cols()).unwrap()
}

fn u(g: &GgufFile, key: &str) -> u64 {
    g.get(key).and_then(Value::as_u64).unwrap_or_else(|| panic!("no integer key {key}"))
}

/// Every BitLinear weight has the source's codes and the expected multiplier (`scale_of` maps it for TQ types).
fn check_ternary(synth: &Synth, bytes: &[u8], ty: GgmlType, scale_of: impl Fn(f32) -> f32) {
    let g = GgufFile::parse(bytes).unwrap();
    assert_eq!(synth.expected.len(), 7 * synth.shape.n_layer);
    for (name, (codes, scale)) in &synth.expected {
        assert_eq!(g.tensor(name).unwrap().ty, ty, "{name}");
        let m = ternary_of(&g, bytes, name);
        assert!(m.to_codes() == *codes, "{name}: codes differ");
        assert_eq!(m.scale, scale_of(*scale), "{name}: scale");
    }
}

fn check_metadata(g: &GgufFile, s: &Shape, ternary: GgmlType) {
    let arch = g.get("general.architecture").and_then(Value::as_str).unwrap();
    // relu² as I2_S: bitnet.cpp's name for 2B4T; as TQ: llama.cpp's `bitnet` (see convert::target_arch).
    assert_eq!(arch, if ternary == GgmlType::I2_S { "bitnet-b1.58" } else { "bitnet" });
    let k = |s: &str| format!("{arch}.{s}");
    assert_eq!(u(g, &k("vocab_size")), s.n_vocab as u64);
    assert_eq!(u(g, &k("context_length")), 1024);
    assert_eq!(u(g, &k("embedding_length")), s.n_embd as u64);
    assert_eq!(u(g, &k("block_count")), s.n_layer as u64);
    assert_eq!(u(g, &k("feed_forward_length")), s.n_ff as u64);
    assert_eq!(u(g, &k("attention.head_count")), s.n_head as u64);
    assert_eq!(u(g, &k("attention.head_count_kv")), s.n_head_kv as u64);
    assert_eq!(u(g, &k("attention.key_length")), s.head_dim as u64);
    assert_eq!(u(g, &k("rope.dimension_count")), s.head_dim as u64);
    assert_eq!(g.get(&k("rope.freq_base")).and_then(Value::as_f64), Some(100000.0));
    assert_eq!(g.get(&k("attention.layer_norm_rms_epsilon")), Some(&Value::F32(1e-5)));
    assert_eq!(g.get(&k("hidden_activation")).and_then(Value::as_str), Some("relu2"));
    assert_eq!(g.get("general.name").and_then(Value::as_str), Some("synthetic"));
    let file_type = match ternary {
        GgmlType::TQ1_0 => 36,
        GgmlType::TQ2_0 => 37,
        _ => 40,
    };
    assert_eq!(u(g, "general.file_type"), file_type);
    assert_eq!(g.get("tokenizer.ggml.model").and_then(Value::as_str), Some("gpt2"));
    assert_eq!(g.get("tokenizer.ggml.tokens").and_then(Value::as_array).map(<[Value]>::len), Some(s.n_vocab));
    assert_eq!(u(g, "tokenizer.ggml.eos_token_id"), s.n_vocab as u64 - 1);
    assert!(g.get("tokenizer.chat_template").is_some());
}

/// Norms are F32 copies; the embedding is the source's f16 bytes (same type) or their re-encoding.
fn check_floats(synth: &Synth, bytes: &[u8], embd: GgmlType) {
    let g = GgufFile::parse(bytes).unwrap();
    let src: HashMap<&str, &[u8]> = synth.tensors.iter().map(|(n, _, _, b)| (n.as_str(), b.as_slice())).collect();
    let data = |name: &str| g.tensor_data(bytes, g.tensor(name).unwrap());
    let s = &synth.shape;
    let e = g.tensor("token_embd.weight").unwrap();
    assert_eq!((e.dims.as_slice(), e.ty), ([s.n_embd as u64, s.n_vocab as u64].as_slice(), embd));
    let mut x = vec![0f32; s.n_vocab * s.n_embd];
    quant::dequantize(GgmlType::F16, src["model.embed_tokens.weight"], &mut x).unwrap();
    assert!(data("token_embd.weight") == quant::quantize(embd, &x).unwrap().as_slice());
    assert_eq!(data("output_norm.weight"), src["model.norm.weight"]);
    for i in 0..s.n_layer {
        let p = format!("model.layers.{i}");
        for (gguf, hf) in [
            ("attn_norm", "input_layernorm"),
            ("ffn_norm", "post_attention_layernorm"),
            ("attn_sub_norm", "self_attn.attn_sub_norm"),
            ("ffn_sub_norm", "mlp.ffn_sub_norm"),
        ] {
            let t = g.tensor(&format!("blk.{i}.{gguf}.weight")).unwrap();
            assert_eq!(t.ty, GgmlType::F32);
            assert_eq!(g.tensor_data(bytes, t), src[format!("{p}.{hf}.weight").as_str()]);
        }
    }
    assert!(g.tensor("output.weight").is_none(), "tied: no output.weight");
    assert_eq!(g.tensors.len(), 2 + 11 * s.n_layer);
}

fn convert_err(r: Result<Converted, Error>) -> String {
    match r {
        Ok(_) => panic!("conversion should have failed"),
        Err(Error::Convert(msg)) => msg,
        Err(e) => panic!("expected Error::Convert, got {e}"),
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Conversion of each layout

#[test]
fn packed_layout_with_f32_scale() {
    let synth = Synth::new(SMALL, Layout::Packed(Dtype::F32), 1);
    let o = opts(GgmlType::I2_S, GgmlType::F16);
    let out = synth.convert(&o).unwrap();
    assert!(out.warnings.is_empty(), "{:?}", out.warnings);
    let bytes = out.gguf.to_bytes();
    check_metadata(&GgufFile::parse(&bytes).unwrap(), &SMALL, GgmlType::I2_S);
    check_ternary(&synth, &bytes, GgmlType::I2_S, |s| s);
    check_floats(&synth, &bytes, GgmlType::F16);
}

#[test]
fn packed_layout_with_bf16_scale() {
    let synth = Synth::new(SMALL, Layout::Packed(Dtype::BF16), 2);
    let bytes = synth.convert(&opts(GgmlType::I2_S, GgmlType::F16)).unwrap().gguf.to_bytes();
    check_ternary(&synth, &bytes, GgmlType::I2_S, |s| s);
}

#[test]
fn int8_codes_with_dividing_scale() {
    let synth = Synth::new(SMALL, Layout::Int8, 3);
    let bytes = synth.convert(&opts(GgmlType::I2_S, GgmlType::F16)).unwrap().gguf.to_bytes();
    check_ternary(&synth, &bytes, GgmlType::I2_S, |s| s);
    check_floats(&synth, &bytes, GgmlType::F16);
}

#[test]
fn autobitlinear_scale_multiplies() {
    let mut synth = Synth::new(SMALL, Layout::Int8, 4);
    synth.config["quantization_config"]["linear_class"] = json!("autobitlinear");
    // The stored weight_scale (1/s) is now the multiplier itself.
    for (name, (_, scale)) in synth.expected.iter_mut() {
        let hf = hf_scale_name(name);
        let stored = synth.tensors.iter().find(|t| t.0 == hf).unwrap();
        *scale = f32::from_le_bytes(stored.3[..4].try_into().unwrap());
    }
    let bytes = synth.convert(&opts(GgmlType::I2_S, GgmlType::F16)).unwrap().gguf.to_bytes();
    check_ternary(&synth, &bytes, GgmlType::I2_S, |s| s);
}

/// `blk.N.attn_q.weight` → `model.layers.N.self_attn.q_proj.weight_scale`.
fn hf_scale_name(gguf: &str) -> String {
    let mut parts = gguf.split('.');
    let (_, i, p) = (parts.next(), parts.next().unwrap(), parts.next().unwrap());
    let hf = PROJ.iter().find(|(g, _)| *g == p).unwrap().1;
    format!("model.layers.{i}.{hf}.weight_scale")
}

#[test]
fn float_master_weights_are_absmean_ternarized() {
    for (seed, dtype) in [(5, Dtype::F32), (6, Dtype::BF16), (7, Dtype::F16)] {
        let synth = Synth::new(SMALL, Layout::Master(dtype), seed);
        let bytes = synth.convert(&opts(GgmlType::I2_S, GgmlType::F16)).unwrap().gguf.to_bytes();
        check_ternary(&synth, &bytes, GgmlType::I2_S, |s| s);
    }
}

#[test]
fn ternary_valued_floats_keep_codes_and_scale() {
    for (seed, dtype) in [(8, Dtype::F32), (9, Dtype::BF16)] {
        let synth = Synth::new(SMALL, Layout::TernaryValued(dtype), seed);
        let bytes = synth.convert(&opts(GgmlType::I2_S, GgmlType::F16)).unwrap().gguf.to_bytes();
        check_ternary(&synth, &bytes, GgmlType::I2_S, |s| s);
    }
}

#[test]
fn tq_types_keep_codes_and_round_the_scale_to_f16() {
    let synth = Synth::new(SMALL, Layout::Packed(Dtype::F32), 10);
    for ty in [GgmlType::TQ2_0, GgmlType::TQ1_0] {
        let out = synth.convert(&opts(ty, GgmlType::F16)).unwrap();
        assert_eq!(out.warnings.len(), 1, "{:?}", out.warnings);
        assert!(out.warnings[0].contains("f16"), "{}", out.warnings[0]);
        let bytes = out.gguf.to_bytes();
        check_metadata(&GgufFile::parse(&bytes).unwrap(), &SMALL, ty);
        check_ternary(&synth, &bytes, ty, |s| f16::from_f32(s).to_f32());
    }
}

#[test]
fn embedding_types() {
    let synth = Synth::new(SMALL, Layout::Packed(Dtype::F32), 11);
    for embd in
        [GgmlType::F32, GgmlType::BF16, GgmlType::Q8_0, GgmlType::Q6_K, GgmlType::Q5_0, GgmlType::Q4_0, GgmlType::Q4_K]
    {
        let bytes = synth.convert(&opts(GgmlType::I2_S, embd)).unwrap().gguf.to_bytes();
        check_floats(&synth, &bytes, embd);
    }
}

#[test]
fn untied_lm_head_becomes_output_weight() {
    let mut synth = Synth::new(SMALL, Layout::Packed(Dtype::F32), 12);
    let mut rng = Rng(99);
    let head: Vec<f32> = (0..SMALL.n_vocab * SMALL.n_embd).map(|_| rng.float()).collect();
    synth.add("lm_head.weight", Dtype::BF16, vec![SMALL.n_vocab, SMALL.n_embd], float_bytes(&head, Dtype::BF16));
    // Tied: lm_head.weight is ignored, as transformers ignores it.
    let bytes = synth.convert(&opts(GgmlType::I2_S, GgmlType::F16)).unwrap().gguf.to_bytes();
    assert!(GgufFile::parse(&bytes).unwrap().tensor("output.weight").is_none());

    synth.config["tie_word_embeddings"] = json!(false);
    let bytes = synth.convert(&opts(GgmlType::I2_S, GgmlType::Q8_0)).unwrap().gguf.to_bytes();
    let g = GgufFile::parse(&bytes).unwrap();
    let t = g.tensor("output.weight").unwrap();
    assert_eq!((t.ty, t.dims.as_slice()), (GgmlType::Q8_0, [SMALL.n_embd as u64, SMALL.n_vocab as u64].as_slice()));
    let mut x = vec![0f32; head.len()];
    quant::dequantize(GgmlType::BF16, &float_bytes(&head, Dtype::BF16), &mut x).unwrap();
    assert!(g.tensor_data(&bytes, t) == quant::quantize(GgmlType::Q8_0, &x).unwrap().as_slice());
}

#[test]
fn sharded_checkpoint_equals_single_file() {
    let synth = Synth::new(SMALL, Layout::Packed(Dtype::F32), 13);
    let o = opts(GgmlType::I2_S, GgmlType::F16);
    let single = synth.convert(&o).unwrap().gguf.to_bytes();
    let (a, b) = (synth.shard(|i| i % 3 == 0), synth.shard(|i| i % 3 != 0));
    let sharded = convert_shards(&synth.config.to_string(), &[&b, &a], &o).unwrap().gguf.to_bytes();
    assert!(single == sharded);
}

#[test]
fn progress_reports_every_tensor() {
    let synth = Synth::new(SMALL, Layout::Int8, 14);
    let (st, tok) = (synth.safetensors(), tokenizer_json(64));
    let config = synth.config.to_string();
    let ckpt = HfCheckpoint {
        config_json: &config,
        tokenizer: HfTokenizer::Json(&tok),
        tokenizer_config_json: None,
        shards: &[&st],
    };
    let mut calls = Vec::new();
    convert::convert(&ckpt, &ConvertOptions::default(), &mut |done, total| calls.push((done, total))).unwrap();
    let total = 2 + 11 * SMALL.n_layer;
    assert_eq!(calls, (1..=total).map(|d| (d, total)).collect::<Vec<_>>());
}

#[test]
fn one_bit_llm_names_and_llama_model_type() {
    // 1bitLLM-style checkpoints: model_type llama, architecture BitnetForCausalLM, sub-norms named
    // inner_attn_ln / ffn_layernorm, float master weights, SiLU.
    let mut synth = Synth::new(SMALL, Layout::Master(Dtype::F16), 15);
    synth.config["model_type"] = json!("llama");
    synth.config["architectures"] = json!(["BitnetForCausalLM"]);
    synth.config["hidden_act"] = json!("silu");
    synth.config.as_object_mut().unwrap().remove("quantization_config");
    for t in &mut synth.tensors {
        t.0 =
            t.0.replace("self_attn.attn_sub_norm", "self_attn.inner_attn_ln")
                .replace("mlp.ffn_sub_norm", "mlp.ffn_layernorm");
    }
    let bytes = synth.convert(&opts(GgmlType::I2_S, GgmlType::F16)).unwrap().gguf.to_bytes();
    check_ternary(&synth, &bytes, GgmlType::I2_S, |s| s);
    let g = GgufFile::parse(&bytes).unwrap();
    // SiLU BitNet blocks are arch `bitnet` for every reader (bitnet.cpp's `bitnet-b1.58` graph is relu²).
    assert_eq!(g.get("general.architecture").and_then(Value::as_str), Some("bitnet"));
    assert_eq!(g.get("bitnet.hidden_activation").and_then(Value::as_str), Some("silu"));
    assert!(g.tensor("blk.1.attn_sub_norm.weight").is_some() && g.tensor("blk.1.ffn_sub_norm.weight").is_some());
}

/// 1bitLLM checkpoints carry LLaMA's SentencePiece tokenizer.json (byte fallback, dummy prefix, merges but no
/// scores): converted to a `llama` vocabulary whose derived scores tokenize every test string as the real LLaMA
/// scores do (fam-1bitllm-i2_s.gguf holds the same 607 pieces with llama.cpp's scores), with BOS, arch `bitnet`.
#[test]
fn one_bit_llm_sentencepiece_tokenizer_converts() {
    use bitnet_engine::text::tokenizer::Tokenizer;
    let fixtures = format!("{}/../tests/fixtures", env!("CARGO_MANIFEST_DIR"));
    let tok_json = std::fs::read_to_string(format!("{fixtures}/models/fam-1bitllm-tokenizer.json")).unwrap();
    let tok_config = json!({"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": true}).to_string();
    let shape = Shape { n_vocab: 607, n_embd: 128, n_ff: 256, n_layer: 1, n_head: 2, n_head_kv: 2, head_dim: 64 };
    let mut synth = Synth::new(shape, Layout::TernaryValued(Dtype::F32), 17);
    synth.config["model_type"] = json!("llama");
    synth.config["architectures"] = json!(["BitnetForCausalLM"]);
    synth.config["hidden_act"] = json!("silu");
    synth.config.as_object_mut().unwrap().remove("quantization_config");
    let st = synth.safetensors();
    let config = synth.config.to_string();
    let ckpt = HfCheckpoint {
        config_json: &config,
        tokenizer: HfTokenizer::Json(&tok_json),
        tokenizer_config_json: Some(&tok_config),
        shards: &[&st],
    };
    let bytes = convert::convert(&ckpt, &opts(GgmlType::I2_S, GgmlType::F16), &mut |_, _| {}).unwrap().gguf.to_bytes();
    let g = GgufFile::parse(&bytes).unwrap();
    assert_eq!(g.get("general.architecture").and_then(Value::as_str), Some("bitnet"));
    let ours = Tokenizer::from_metadata(&g.metadata).unwrap();
    let reference_file = std::fs::read(format!("{fixtures}/models/fam-1bitllm-i2_s.gguf")).unwrap();
    let reference = Tokenizer::from_metadata(&GgufFile::parse(&reference_file).unwrap().metadata).unwrap();
    assert_eq!(
        (ours.model(), ours.vocab_size(), ours.bos(), ours.eos(), ours.add_bos()),
        ("llama", 607, Some(1), Some(2), true)
    );
    let refs: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{fixtures}/tokenizer_refs.json")).unwrap()).unwrap();
    let texts = refs["llama2"]["cases"].as_array().unwrap().iter().map(|c| c["text"].as_str().unwrap().to_string());
    let mut n = 0;
    for text in texts.chain(["the nation and you, for the station".to_string()]) {
        let ids = ours.encode(&text, true).unwrap();
        assert_eq!(ids, reference.encode(&text, true).unwrap(), "{text:?}");
        // (Not always `text`: this cut of the vocabulary lacks the piece "▁", so spaces fall back to its UTF-8
        // bytes, which decode as "▁" in HF too.)
        assert_eq!(ours.decode(&ids[1..]), reference.decode(&ids[1..]));
        n += 1;
    }
    assert!(n > 40);
    // The merges matter: "the" is one piece, not bytes.
    assert!(ours.encode(" the", false).unwrap().len() < 3);
    // A tokenizer.json with byte fallback but other space handling is refused.
    let odd = tok_json.replace("Prepend", "Strip");
    let ckpt = HfCheckpoint { tokenizer: HfTokenizer::Json(&odd), ..ckpt };
    let e = convert::convert(&ckpt, &opts(GgmlType::I2_S, GgmlType::F16), &mut |_, _| {}).err().unwrap();
    assert!(matches!(&e, Error::Unsupported(m) if m.contains("not LLaMA's SentencePiece")), "{e}");
}

/// Folders that ship only SentencePiece's `tokenizer.model` (many LLaMA-style checkpoints): the pieces, scores and
/// types come from the ModelProto (fam-1bitllm-tokenizer.model, tests/scripts/make_spm_model.py), giving the
/// tokenizer.json conversion's keys, llama.cpp's scores (those of fam-1bitllm-i2_s.gguf) and the same ids; the
/// special ids come from the model when tokenizer_config.json is absent; a truncated file is a one-line error.
#[test]
fn sentencepiece_tokenizer_model_alone_converts() {
    use bitnet_engine::text::tokenizer::Tokenizer;
    let fixtures = format!("{}/../tests/fixtures", env!("CARGO_MANIFEST_DIR"));
    let read = |name: &str| std::fs::read(format!("{fixtures}/models/{name}")).unwrap();
    let (spm, tok_json) = (read("fam-1bitllm-tokenizer.model"), read("fam-1bitllm-tokenizer.json"));
    let tok_json = String::from_utf8(tok_json).unwrap();
    let tok_config = json!({"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": true}).to_string();
    let shape = Shape { n_vocab: 607, n_embd: 128, n_ff: 256, n_layer: 1, n_head: 2, n_head_kv: 2, head_dim: 64 };
    let mut synth = Synth::new(shape, Layout::TernaryValued(Dtype::F32), 17);
    synth.config["model_type"] = json!("llama");
    synth.config["hidden_act"] = json!("silu");
    let (st, config) = (synth.safetensors(), synth.config.to_string());
    let convert_with = |tokenizer: HfTokenizer, tok_config: Option<&str>| {
        let ckpt = HfCheckpoint { config_json: &config, tokenizer, tokenizer_config_json: tok_config, shards: &[&st] };
        convert::convert(&ckpt, &opts(GgmlType::I2_S, GgmlType::F16), &mut |_, _| {}).map(|c| c.gguf.to_bytes())
    };
    let from_json = convert_with(HfTokenizer::Json(&tok_json), Some(&tok_config)).unwrap();
    let from_spm = convert_with(HfTokenizer::SentencePiece(&spm), Some(&tok_config)).unwrap();
    let spm_alone = convert_with(HfTokenizer::SentencePiece(&spm), None).unwrap();
    let reference_file = read("fam-1bitllm-i2_s.gguf");
    let (gj, gs, ga) = (
        GgufFile::parse(&from_json).unwrap(),
        GgufFile::parse(&from_spm).unwrap(),
        GgufFile::parse(&spm_alone).unwrap(),
    );
    let reference = GgufFile::parse(&reference_file).unwrap();
    for (key, _) in gj.metadata.iter().filter(|(k, _)| k.starts_with("tokenizer.")) {
        // tokenizer.json has no scores (the engine derives them from the merges); tokenizer.model has the real ones.
        let want = if key == "tokenizer.ggml.scores" { reference.get(key) } else { gj.get(key) };
        assert_eq!(gs.get(key), want, "{key}");
        assert_eq!(ga.get(key), want, "{key} without tokenizer_config.json");
    }
    assert_eq!(gs.get("tokenizer.ggml.unknown_token_id"), Some(&Value::U32(0)));
    let (ours, json_tok) =
        (Tokenizer::from_metadata(&ga.metadata).unwrap(), Tokenizer::from_metadata(&gj.metadata).unwrap());
    assert_eq!((ours.model(), ours.bos(), ours.eos(), ours.add_bos()), ("llama", Some(1), Some(2), true));
    let refs: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{fixtures}/tokenizer_refs.json")).unwrap()).unwrap();
    for c in refs["llama2"]["cases"].as_array().unwrap() {
        let text = c["text"].as_str().unwrap();
        assert_eq!(ours.encode(text, true).unwrap(), json_tok.encode(text, true).unwrap(), "{text:?}");
    }
    // tokenizer_config.json's added tokens (here a <pad> two ids past the pieces) extend the vocabulary as in
    // llama.cpp's converter; a corrupt id is an error, not a huge table.
    let added = json!({"pad_token": "<pad>", "added_tokens_decoder": {"608": {"content": "<pad>", "special": true}}});
    let md = bitnet_engine::text::spm_model::metadata_from_spm_model(&spm, Some(&added.to_string())).unwrap();
    let get = |key: &str| md.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone()).unwrap();
    let (tokens, types) = (get("tokenizer.ggml.tokens"), get("tokenizer.ggml.token_type"));
    let (tokens, types) = (tokens.as_array().unwrap(), types.as_array().unwrap());
    assert_eq!(
        (tokens.len(), &tokens[607], &tokens[608]),
        (609, &Value::Str("[PAD607]".into()), &Value::Str("<pad>".into()))
    );
    assert_eq!((&types[607], &types[608]), (&Value::I32(5), &Value::I32(3)));
    assert_eq!(get("tokenizer.ggml.padding_token_id"), Value::U32(608));
    let corrupt = json!({"added_tokens_decoder": {"4000000000": {"content": "x"}}}).to_string();
    assert!(bitnet_engine::text::spm_model::metadata_from_spm_model(&spm, Some(&corrupt)).is_err());
    // Truncated, or not a SentencePiece model at all: one line naming the file.
    for bad in [&spm[..spm.len() / 2], &b"\x0a\xff\xff\xff\xff\x0f"[..], &b""[..]] {
        let e = convert_with(HfTokenizer::SentencePiece(bad), None).err().unwrap().to_string();
        assert!(e.starts_with("tokenizer: tokenizer.model: ") && !e.contains('\n'), "{e}");
    }
}

/// Llama3-8B-1.58 / Falcon3-1.58bit / Falcon-E checkpoints: LlamaForCausalLM with a bitnet quantization_config and
/// no sub-norms. They become arch `llama` as llama.cpp's converter writes it: `llama.*` keys, no activation key,
/// no sub-norm tensors, and q/k rows permuted for llama.cpp's interleaved RoPE; the engine loads them back.
#[test]
fn llama_family_checkpoints_become_arch_llama() {
    let mut synth = Synth::new(SMALL, Layout::Packed(Dtype::BF16), 16);
    synth.config["model_type"] = json!("llama");
    synth.config["architectures"] = json!(["LlamaForCausalLM"]);
    synth.config["hidden_act"] = json!("silu");
    synth.tensors.retain(|t| !t.0.contains("sub_norm"));
    for ty in [GgmlType::I2_S, GgmlType::TQ2_0] {
        let bytes = synth.convert(&opts(ty, GgmlType::F16)).unwrap().gguf.to_bytes();
        let g = GgufFile::parse(&bytes).unwrap();
        assert_eq!(g.get("general.architecture").and_then(Value::as_str), Some("llama"));
        assert_eq!(u(&g, "llama.block_count"), 2);
        assert!(g.metadata.iter().all(|(k, _)| !k.contains("hidden_activation") && !k.starts_with("bitnet")));
        assert!(g.tensors.iter().all(|t| !t.name.contains("sub_norm")));
        for (name, (codes, _)) in &synth.expected {
            let m = ternary_of(&g, &bytes, name);
            let want = if name.contains("attn_q") || name.contains("attn_k") {
                // File row f holds HF row hf_row_of_llama_row(f): llama.cpp's `permute`.
                let (cols, hd) = (m.cols, SMALL.head_dim);
                let hf_row = |f: usize| (f / hd) * hd + (f % hd % 2) * (hd / 2) + (f % hd) / 2;
                (0..m.rows).flat_map(|f| codes[hf_row(f) * cols..(hf_row(f) + 1) * cols].to_vec()).collect()
            } else {
                codes.clone()
            };
            assert!(m.to_codes() == want, "{name}: codes (rows in llama.cpp's order)");
        }
        let model = Model::load(&g, &bytes, &LoadOptions::default(), &mut |_, _| {}).unwrap();
        assert_eq!(model.family, Family::LlamaTernary);
        assert_eq!(model.config.activation, Activation::Silu);
        // Back in Hugging Face's row order once loaded.
        let (codes, _) = &synth.expected["blk.1.attn_k.weight"];
        assert!(model.layers[1].wk.ternary().unwrap().to_codes() == *codes, "loaded attn_k rows");
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Errors

#[test]
fn unknown_architecture_is_refused() {
    let mut synth = Synth::new(SMALL, Layout::Int8, 20);
    synth.config["model_type"] = json!("gpt_neox");
    let msg = convert_err(synth.convert(&opts(GgmlType::I2_S, GgmlType::F16)));
    assert!(msg.contains("unknown architecture") && msg.contains("gpt_neox"), "{msg}");
}

#[test]
fn undeclared_float_model_needs_force() {
    let mut synth = Synth::new(SMALL, Layout::Master(Dtype::F32), 21);
    synth.config["model_type"] = json!("llama");
    synth.config["architectures"] = json!(["LlamaForCausalLM"]);
    synth.config.as_object_mut().unwrap().remove("quantization_config");
    let mut o = opts(GgmlType::I2_S, GgmlType::F16);
    let msg = convert_err(synth.convert(&o));
    assert!(msg.contains("--force"), "{msg}");
    o.force = true;
    let bytes = synth.convert(&o).unwrap().gguf.to_bytes();
    check_ternary(&synth, &bytes, GgmlType::I2_S, |s| s);
}

#[test]
fn tq_needs_rows_multiple_of_256() {
    let shape = Shape { n_embd: 128, n_head: 2, ..SMALL };
    let synth = Synth::new(shape, Layout::Int8, 22);
    for ty in [GgmlType::TQ2_0, GgmlType::TQ1_0] {
        let msg = convert_err(synth.convert(&opts(ty, GgmlType::F16)));
        assert!(msg.contains("256") && msg.contains("i2_s"), "{msg}");
    }
    let msg = convert_err(synth.convert(&opts(GgmlType::I2_S, GgmlType::Q4_K)));
    assert!(msg.contains("q4_k") && msg.contains("128"), "{msg}");
    // I2_S holds it.
    let bytes = synth.convert(&opts(GgmlType::I2_S, GgmlType::Q8_0)).unwrap().gguf.to_bytes();
    check_ternary(&synth, &bytes, GgmlType::I2_S, |s| s);
}

#[test]
fn missing_tensors_are_named() {
    let mut synth = Synth::new(SMALL, Layout::Packed(Dtype::F32), 23);
    synth.tensors.retain(|t| t.0 != "model.layers.1.mlp.up_proj.weight_scale");
    let msg = convert_err(synth.convert(&opts(GgmlType::I2_S, GgmlType::F16)));
    assert!(msg.contains("model.layers.1.mlp.up_proj.weight_scale"), "{msg}");
    synth.tensors.retain(|t| t.0 != "model.layers.0.self_attn.k_proj.weight");
    let msg = convert_err(synth.convert(&opts(GgmlType::I2_S, GgmlType::F16)));
    assert!(msg.contains("missing tensor 'model.layers.0.self_attn.k_proj.weight'"), "{msg}");
    synth.tensors.retain(|t| t.0 != "model.layers.0.mlp.ffn_sub_norm.weight");
    let msg = convert_err(synth.convert(&opts(GgmlType::I2_S, GgmlType::F16)));
    assert!(msg.contains("model.layers.0.mlp.ffn_sub_norm.weight"), "{msg}");
}

#[test]
fn shape_mismatches_are_named() {
    let mut synth = Synth::new(SMALL, Layout::Int8, 24);
    synth.config["intermediate_size"] = json!(768);
    let msg = convert_err(synth.convert(&opts(GgmlType::I2_S, GgmlType::F16)));
    assert!(msg.contains("shape") && msg.contains("512") && msg.contains("768"), "{msg}");

    let mut synth = Synth::new(SMALL, Layout::Packed(Dtype::F32), 25);
    synth.config["vocab_size"] = json!(100);
    let msg = convert_err(synth.convert(&opts(GgmlType::I2_S, GgmlType::F16)));
    assert!(msg.contains("model.embed_tokens.weight") && msg.contains("shape"), "{msg}");
}

#[test]
fn bad_codes_are_refused() {
    let mut synth = Synth::new(SMALL, Layout::Packed(Dtype::F32), 26);
    let t = synth.tensors.iter_mut().find(|t| t.0 == "model.layers.0.self_attn.v_proj.weight").unwrap();
    t.3[5] = 0xff;
    let msg = convert_err(synth.convert(&opts(GgmlType::I2_S, GgmlType::F16)));
    assert!(msg.contains("v_proj") && msg.contains("invalid 2-bit value 3"), "{msg}");

    let mut synth = Synth::new(SMALL, Layout::Int8, 27);
    let t = synth.tensors.iter_mut().find(|t| t.0 == "model.layers.1.mlp.down_proj.weight").unwrap();
    t.3[7] = 2;
    let msg = convert_err(synth.convert(&opts(GgmlType::I2_S, GgmlType::F16)));
    assert!(msg.contains("down_proj") && msg.contains("not ternary"), "{msg}");
}

#[test]
fn unexpected_tensors_and_options_are_refused() {
    let mut synth = Synth::new(SMALL, Layout::Int8, 28);
    synth.add("model.layers.0.self_attn.q_proj.bias", Dtype::F32, vec![256], vec![0; 1024]);
    let msg = convert_err(synth.convert(&opts(GgmlType::I2_S, GgmlType::F16)));
    assert!(msg.contains("unexpected tensors") && msg.contains("q_proj.bias"), "{msg}");

    let mut synth = Synth::new(SMALL, Layout::Int8, 29);
    synth.config["hidden_act"] = json!("gelu");
    assert!(convert_err(synth.convert(&opts(GgmlType::I2_S, GgmlType::F16))).contains("gelu"));
    synth.config["hidden_act"] = json!("relu2");
    synth.config["rope_scaling"] = json!({"rope_type": "llama3", "factor": 8.0});
    assert!(convert_err(synth.convert(&opts(GgmlType::I2_S, GgmlType::F16))).contains("RoPE scaling"));
    synth.config["rope_scaling"] = json!(null);
    assert!(convert_err(synth.convert(&opts(GgmlType::Q4_0, GgmlType::F16))).contains("not a ternary type"));
    assert!(convert_err(synth.convert(&opts(GgmlType::I2_S, GgmlType::TQ2_0))).contains("embedding"));
    assert!(convert_err(convert_shards("{not json", &[&synth.safetensors()], &ConvertOptions::default()))
        .contains("config.json"));
    assert!(convert_err(convert_shards(&synth.config.to_string(), &[b"garbage"], &ConvertOptions::default()))
        .contains("safetensors"));
}

// ---------------------------------------------------------------------------------------------------------------
// Requantization

/// A GGUF with a ternary scale that f16 represents exactly (so TQ round trips are bit-exact on the bytes too).
fn exact_scale_gguf(ty: GgmlType) -> (Synth, Vec<u8>) {
    let mut synth = Synth::new(SMALL, Layout::Int8, 40);
    for t in synth.tensors.iter_mut().filter(|t| t.0.ends_with("weight_scale")) {
        t.3 = f32_bytes(&[32.0]); // divides: multiplier 1/32, exact in f16
    }
    for (_, scale) in synth.expected.values_mut() {
        *scale = 1.0 / 32.0;
    }
    let bytes = synth.convert(&opts(ty, GgmlType::F16)).unwrap().gguf.to_bytes();
    (synth, bytes)
}

fn requantize(bytes: &[u8], ty: GgmlType, embd: Option<GgmlType>, force: bool) -> Result<Converted, Error> {
    convert::requantize(bytes, ty, embd, force, &mut |_, _| {})
}

#[test]
fn repacking_round_trip_is_bit_exact() {
    let (synth, i2s) = exact_scale_gguf(GgmlType::I2_S);
    let tq2 = requantize(&i2s, GgmlType::TQ2_0, None, false).unwrap();
    assert!(tq2.warnings.is_empty(), "{:?}", tq2.warnings);
    let tq2 = tq2.gguf.to_bytes();
    check_ternary(&synth, &tq2, GgmlType::TQ2_0, |s| s);
    let tq1 = requantize(&tq2, GgmlType::TQ1_0, None, false).unwrap().gguf.to_bytes();
    check_ternary(&synth, &tq1, GgmlType::TQ1_0, |s| s);
    let back = requantize(&tq1, GgmlType::I2_S, None, false).unwrap().gguf.to_bytes();
    check_ternary(&synth, &back, GgmlType::I2_S, |s| s);
    assert!(back == i2s, "I2_S -> TQ2_0 -> TQ1_0 -> I2_S changed the file");
    // Same as converting to TQ1_0 directly.
    assert!(tq1 == exact_scale_gguf(GgmlType::TQ1_0).1);
    let g = GgufFile::parse(&tq1).unwrap();
    assert_eq!(u(&g, "general.file_type"), 36);
    assert_eq!(g.metadata.len(), GgufFile::parse(&i2s).unwrap().metadata.len());
}

#[test]
fn repacking_to_tq_warns_about_scale_rounding() {
    let synth = Synth::new(SMALL, Layout::Packed(Dtype::F32), 41);
    let i2s = synth.convert(&opts(GgmlType::I2_S, GgmlType::F16)).unwrap().gguf.to_bytes();
    let out = requantize(&i2s, GgmlType::TQ2_0, None, false).unwrap();
    assert_eq!(out.warnings.len(), 1);
    assert!(out.warnings[0].contains("14 of 14"), "{}", out.warnings[0]);
    check_ternary(&synth, &out.gguf.to_bytes(), GgmlType::TQ2_0, |s| f16::from_f32(s).to_f32());
}

#[test]
fn requantize_embedding_and_copy_the_rest() {
    let (synth, i2s) = exact_scale_gguf(GgmlType::I2_S);
    let q5 = requantize(&i2s, GgmlType::I2_S, Some(GgmlType::Q5_0), false).unwrap().gguf.to_bytes();
    check_floats(&synth, &q5, GgmlType::Q5_0);
    let (a, b) = (GgufFile::parse(&i2s).unwrap(), GgufFile::parse(&q5).unwrap());
    assert_eq!(a.metadata, b.metadata);
    for t in a.tensors.iter().filter(|t| t.name != "token_embd.weight") {
        assert_eq!(a.tensor_data(&i2s, t), b.tensor_data(&q5, b.tensor(&t.name).unwrap()), "{}", t.name);
    }
    // A quantized embedding is requantized only with force.
    let e = requantize(&q5, GgmlType::I2_S, Some(GgmlType::Q4_0), false).err().unwrap();
    assert!(e.to_string().contains("--force"), "{e}");
    let q4 = requantize(&q5, GgmlType::I2_S, Some(GgmlType::Q4_0), true).unwrap().gguf.to_bytes();
    assert_eq!(GgufFile::parse(&q4).unwrap().tensor("token_embd.weight").unwrap().ty, GgmlType::Q4_0);
}

#[test]
fn requantize_ternarizes_float_weights() {
    // A float GGUF as llama.cpp's converter writes BitNet models: ternary-valued F32/F16 weights.
    let (synth, i2s) = exact_scale_gguf(GgmlType::I2_S);
    let src = GgufFile::parse(&i2s).unwrap();
    let mut w = GgufWriter::new();
    for (k, v) in &src.metadata {
        w.add(k, v.clone());
    }
    for (i, t) in src.tensors.iter().enumerate() {
        let data = src.tensor_data(&i2s, t);
        if t.ty == GgmlType::I2_S {
            let mut x = vec![0f32; t.n_elements() as usize];
            quant::dequantize(t.ty, data, &mut x).unwrap();
            let ty = if i % 2 == 0 { GgmlType::F32 } else { GgmlType::F16 };
            w.add_tensor(&t.name, &t.dims, ty, quant::quantize(ty, &x).unwrap());
        } else {
            w.add_tensor(&t.name, &t.dims, t.ty, data.to_vec());
        }
    }
    let float = w.to_bytes();
    let back = requantize(&float, GgmlType::I2_S, None, false).unwrap().gguf.to_bytes();
    check_ternary(&synth, &back, GgmlType::I2_S, |s| s);
    assert!(back == i2s);
}

/// `bitnet quantize` names the architecture as each family's reference engine expects: a relu² 2B4T-style model is
/// `bitnet-b1.58` as I2_S (bitnet.cpp's relu² graph) and `bitnet` as TQ (llama.cpp), keys renamed with it and
/// `hidden_activation` written; arch `llama` stays `llama`; latent float weights in an arch `llama` file are refused.
#[test]
fn requantize_names_the_architecture_per_family() {
    let fixture = |name: &str| std::fs::read(format!("{}/../tests/fixtures/models/{name}", env!("CARGO_MANIFEST_DIR")));
    let arch_of = |bytes: &[u8]| {
        let g = GgufFile::parse(bytes).unwrap();
        let arch = g.get("general.architecture").and_then(Value::as_str).unwrap().to_string();
        let act = g.get(&format!("{arch}.hidden_activation")).and_then(Value::as_str).map(str::to_string);
        assert!(g.get(&format!("{arch}.block_count")).is_some(), "{arch}: keys renamed");
        (arch, act)
    };
    // tiny-b: llama.cpp's `bitnet` with a Llama 3 vocabulary and no activation key (relu² inferred).
    let tq2 = fixture("tiny-b-tq2_0.gguf").unwrap();
    let i2s = requantize(&tq2, GgmlType::I2_S, None, false).unwrap().gguf.to_bytes();
    assert_eq!(arch_of(&i2s), ("bitnet-b1.58".into(), Some("relu2".into())));
    let back = requantize(&i2s, GgmlType::TQ2_0, None, false).unwrap().gguf.to_bytes();
    assert_eq!(arch_of(&back), ("bitnet".into(), Some("relu2".into())));
    // 1bitLLM (SiLU) stays `bitnet` as I2_S.
    let spm = fixture("fam-1bitllm-i2_s.gguf").unwrap();
    let out = requantize(&spm, GgmlType::I2_S, Some(GgmlType::Q8_0), false).unwrap().gguf.to_bytes();
    assert_eq!(arch_of(&out), ("bitnet".into(), Some("silu".into())));
    // Llama family: `llama` whatever the type, and the same model.
    let llama = fixture("fam-llama3-tq2_0.gguf").unwrap();
    let out = requantize(&llama, GgmlType::I2_S, None, false).unwrap().gguf.to_bytes();
    assert_eq!(arch_of(&out), ("llama".into(), None));
    let load = |bytes: &[u8]| {
        let g = GgufFile::parse(bytes).unwrap();
        Model::load(&g, bytes, &LoadOptions::default(), &mut |_, _| {}).unwrap()
    };
    let (a, b) = (load(&llama), load(&out));
    assert!(a.layers[0].ternary() == b.layers[0].ternary());
    let f16 = fixture("fam-falcone-f16.gguf").unwrap();
    let mut latent = GgufWriter::new();
    let src = GgufFile::parse(&f16).unwrap();
    for (k, v) in &src.metadata {
        latent.add(k, v.clone());
    }
    for t in &src.tensors {
        let mut data = src.tensor_data(&f16, t).to_vec();
        if t.name == "blk.0.ffn_up.weight" {
            data[1] ^= 0x01; // one weight of another magnitude: latent floats
        }
        latent.add_tensor(&t.name, &t.dims, t.ty, data);
    }
    let e = requantize(&latent.to_bytes(), GgmlType::I2_S, None, false).err().unwrap();
    assert!(e.to_string().contains("blk.0.ffn_up.weight") && e.to_string().contains("not ternary"), "{e}");
}

#[test]
fn requantize_refuses_other_architectures_and_bad_shapes() {
    let mut w = GgufWriter::new();
    // (Arch `llama` is a BitNet family when its projections are ternary: see requantize_names_the_architecture.)
    w.add("general.architecture", Value::Str("qwen2".into()));
    w.add_tensor("blk.0.attn_q.weight", &[256, 4], GgmlType::F32, vec![0; 4096]);
    let qwen = w.to_bytes();
    let e = requantize(&qwen, GgmlType::I2_S, None, false).err().unwrap();
    assert!(e.to_string().contains("--force"), "{e}");
    let forced = requantize(&qwen, GgmlType::I2_S, None, true).unwrap().gguf.to_bytes();
    assert_eq!(GgufFile::parse(&forced).unwrap().tensors[0].ty, GgmlType::I2_S);

    let shape = Shape { n_embd: 128, n_head: 2, ..SMALL };
    let i2s =
        Synth::new(shape, Layout::Int8, 42).convert(&opts(GgmlType::I2_S, GgmlType::F16)).unwrap().gguf.to_bytes();
    let e = requantize(&i2s, GgmlType::TQ2_0, None, false).err().unwrap();
    assert!(e.to_string().contains("blk.0.attn_q.weight") && e.to_string().contains("256"), "{e}");
    assert!(requantize(b"not a gguf", GgmlType::I2_S, None, false).is_err());
}

// ---------------------------------------------------------------------------------------------------------------
// Real checkpoints

fn folder(rel: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn read(path: &std::path::Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Converts an HF folder (single safetensors file).
fn convert_folder(dir: &std::path::Path, o: &ConvertOptions) -> Converted {
    let text = |f: &str| String::from_utf8(read(&dir.join(f))).unwrap();
    let (config, tok) = (text("config.json"), text("tokenizer.json"));
    let tok_config = dir.join("tokenizer_config.json").exists().then(|| text("tokenizer_config.json"));
    let st = read(&dir.join("model.safetensors"));
    let ckpt = HfCheckpoint {
        config_json: &config,
        tokenizer: HfTokenizer::Json(&tok),
        tokenizer_config_json: tok_config.as_deref(),
        shards: &[&st],
    };
    convert::convert(&ckpt, o, &mut |_, _| {}).unwrap()
}

/// smolbit-135m converted to I2_S has, in every BitLinear weight, exactly the codes of its packed tensors (decoded
/// here by the README's formula) and the multiplier f32(1 / weight_scale); the f16 embedding is copied bit for bit.
#[test]
fn smolbit_135m_converts_code_for_code() {
    let dir = folder("../../shared/models/smolbit-135m");
    let out = convert_folder(&dir, &ConvertOptions { name: Some("smolbit-135m".into()), ..ConvertOptions::default() });
    let bytes = out.gguf.to_bytes();
    let g = GgufFile::parse(&bytes).unwrap();
    let st_bytes = read(&dir.join("model.safetensors"));
    let st = safetensors::SafeTensors::deserialize(&st_bytes).unwrap();
    assert_eq!(u(&g, "bitnet-b1.58.block_count"), 30);
    assert_eq!(u(&g, "bitnet-b1.58.attention.head_count_kv"), 3);
    assert_eq!(g.get("bitnet-b1.58.hidden_activation").and_then(Value::as_str), Some("relu2"));
    assert_eq!(g.get("tokenizer.ggml.tokens").and_then(Value::as_array).map(<[Value]>::len), Some(49152));
    let embd = g.tensor("token_embd.weight").unwrap();
    assert_eq!(embd.ty, GgmlType::F16);
    assert!(g.tensor_data(&bytes, embd) == st.tensor("model.embed_tokens.weight").unwrap().data());
    let mut checked = 0;
    for i in 0..30 {
        for (gguf, hf) in PROJ {
            let packed = st.tensor(&format!("model.layers.{i}.{hf}.weight")).unwrap();
            let ws = st.tensor(&format!("model.layers.{i}.{hf}.weight_scale")).unwrap();
            let (r_stride, cols) = (packed.shape()[0], packed.shape()[1]);
            let mut codes = vec![0i8; 4 * r_stride * cols];
            for (k, &b) in packed.data().iter().enumerate() {
                for j in 0..4 {
                    codes[(j * r_stride + k / cols) * cols + k % cols] = ((b >> (2 * j)) & 3) as i8 - 1;
                }
            }
            let ws = f32::from_le_bytes(ws.data().try_into().unwrap());
            let m = ternary_of(&g, &bytes, &format!("blk.{i}.{gguf}.weight"));
            assert!(m.to_codes() == codes, "blk.{i}.{gguf}: codes differ");
            assert_eq!(m.scale, (1.0 / f64::from(ws)) as f32, "blk.{i}.{gguf}: scale");
            checked += 1;
        }
    }
    assert_eq!(checked, 210);
    assert_eq!(g.tensors.len(), 2 + 11 * 30);
}

/// helper C's fixtures: an HF folder and GGUFs of the same model written by an independent Python script
/// (gguf-py). Our conversion must hold the same codes and effective scales (their `.scale` tensors multiply), the
/// same float tensors where the types agree, and the same shape and tokenizer metadata.
#[test]
fn fixtures_match_their_reference_ggufs() {
    let pairs = [
        ("tiny-a", "tiny-a-i2_s.gguf", GgmlType::I2_S),
        ("tiny-a", "tiny-a-f16.gguf", GgmlType::I2_S),
        ("tiny-b", "tiny-b-tq2_0.gguf", GgmlType::TQ2_0),
        ("tiny-b", "tiny-b-scale.gguf", GgmlType::TQ1_0),
    ];
    let mut checked = 0;
    for (model, file, ternary) in pairs {
        let dir = folder(&format!("../tests/fixtures/models/{model}"));
        if !dir.join("config.json").exists() {
            eprintln!("skipped {file}: no HF folder {} (tiny-b's is only kept with --keep-hf)", dir.display());
            continue;
        }
        let ref_bytes = read(&folder(&format!("../tests/fixtures/models/{file}")));
        let ours = convert_folder(&dir, &ConvertOptions { ternary, ..ConvertOptions::default() }).gguf.to_bytes();
        compare_with_reference(
            &GgufFile::parse(&ref_bytes).unwrap(),
            &ref_bytes,
            &GgufFile::parse(&ours).unwrap(),
            &ours,
            file,
        );
        checked += 1;
    }
    assert!(checked >= 2, "tiny-a's HF folder should be in the fixtures");
}

fn effective_ternary(g: &GgufFile, bytes: &[u8], name: &str) -> TernaryMatrix {
    let mut m = ternary_of(g, bytes, name);
    if let Some(t) = g.tensor(&name.replace(".weight", ".scale")) {
        let mut s = [0f32];
        quant::dequantize(t.ty, g.tensor_data(bytes, t), &mut s).unwrap();
        m.scale *= s[0];
    }
    m
}

fn compare_with_reference(r: &GgufFile, rb: &[u8], g: &GgufFile, gb: &[u8], file: &str) {
    let arch = |g: &GgufFile| g.get("general.architecture").and_then(Value::as_str).unwrap().to_string();
    let (ra, ga) = (arch(r), arch(g));
    for key in [
        "vocab_size",
        "context_length",
        "embedding_length",
        "block_count",
        "feed_forward_length",
        "attention.head_count",
        "attention.head_count_kv",
        "rope.dimension_count",
        "rope.freq_base",
        "attention.layer_norm_rms_epsilon",
    ] {
        let v = |g: &GgufFile, a: &str| g.get(&format!("{a}.{key}")).and_then(Value::as_f64);
        assert_eq!(v(g, &ga), v(r, &ra), "{file}: {key}");
    }
    for key in
        ["tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"]
    {
        assert_eq!(g.get(key), r.get(key), "{file}: {key}");
    }
    let mut n_ternary = 0;
    for t in r.tensors.iter().filter(|t| !t.name.ends_with(".scale")) {
        let ours = g.tensor(&t.name).unwrap_or_else(|| panic!("{file}: we have no {}", t.name));
        assert_eq!(ours.dims, t.dims, "{file}: {}", t.name);
        if PROJ.iter().any(|(p, _)| t.name.ends_with(&format!(".{p}.weight"))) {
            let (theirs, mine) = (effective_ternary(r, rb, &t.name), effective_ternary(g, gb, &t.name));
            assert!(mine.to_codes() == theirs.to_codes(), "{file}: {}: codes differ", t.name);
            assert_eq!(mine.scale, theirs.scale, "{file}: {}: scale", t.name);
            n_ternary += 1;
        } else if ours.ty == t.ty {
            assert!(g.tensor_data(gb, ours) == r.tensor_data(rb, t), "{file}: {} differs", t.name);
        }
    }
    assert!(n_ternary > 0, "{file}: no ternary tensors");
    assert_eq!(
        g.tensors.len(),
        r.tensors.iter().filter(|t| !t.name.ends_with(".scale")).count(),
        "{file}: tensor count"
    );
}
