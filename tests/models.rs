//! End to end on small BitNet GGUFs this engine has never seen (written by gguf-py, see
//! tests/fixtures/README.md): `bitnet logits` must give the reference's prompt ids and last-position
//! logits. The references are an independent numpy implementation reading the same GGUF (float64)
//! and HF transformers' BitNet model on the same weights (float32).
//!
//! Where the reference is free of int8 rounding flips (`stable`), logits agree within 1e-3;
//! elsewhere a flip moves logits by a few tenths, so top-1 must agree and logits stay within 0.5.

use std::sync::Arc;

use bitnet_engine::backend::cpu::{kernels, CpuModel};
use bitnet_engine::backend::{Want, Weights};
use bitnet_engine::format::gguf::GgufFile;
use bitnet_engine::generate::sampler::{Sampler, SamplerParams};
use bitnet_engine::generate::Session;
use bitnet_engine::model::{LoadOptions, Model};
use bitnet_engine::text::tokenizer::Tokenizer;
use bitnet_tests::{bitnet, bitnet_json, bitnet_ok, fixture};
use serde_json::Value;

fn references() -> Value {
    let text = std::fs::read_to_string(fixture("models/references.json")).expect("references.json");
    serde_json::from_str(&text).expect("valid JSON")
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array().expect("array").iter().map(|x| x.as_f64().expect("number") as f32).collect()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().expect("array").iter().map(|x| x.as_u64().expect("id") as u32).collect()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "logit vector lengths");
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn argmax(v: &[f32]) -> usize {
    (0..v.len()).fold(0, |best, i| if v[i] > v[best] { i } else { best })
}

/// Every fixture file × every prompt, through the `bitnet` binary.
#[test]
fn logits_match_independent_references() {
    let refs = references();
    let mut checked = 0;
    for (file, info) in refs["files"].as_object().expect("files") {
        let model = &refs["models"][info["model"].as_str().expect("model name")];
        let path = fixture(&format!("models/{file}"));
        let path = path.to_str().expect("UTF-8 path");
        for case in model["cases"].as_array().expect("cases") {
            let name = format!("{file} / {}", case["name"]);
            let want_ids = ids(&case["ids"]);
            // Plain prompts go through the tokenizer (BOS added as the model asks); the chat case is
            // already rendered with its BOS text, so it is evaluated from the reference ids.
            let out = if case["add_special"].as_bool() == Some(true) {
                bitnet_json(&[
                    "logits",
                    "-m",
                    path,
                    "-p",
                    case["text"].as_str().unwrap(),
                    "--all",
                    "--json",
                    "--top",
                    "5",
                ])
            } else {
                let list: Vec<String> = want_ids.iter().map(u32::to_string).collect();
                bitnet_json(&["logits", "-m", path, "--tokens", &list.join(","), "--all", "--json", "--top", "5"])
            };
            assert_eq!(ids(&out["tokens"]), want_ids, "{name}: prompt ids");
            let got = floats(&out["logits"]);
            let f64_ref = floats(&case["logits_f64"]);
            let hf = floats(&case["logits_hf"]);
            let top = out["top"].as_array().unwrap();
            assert_eq!(top[0][0].as_u64(), Some(argmax(&got) as u64), "{name}: top list starts with the argmax");
            assert_eq!(argmax(&got), argmax(&f64_ref), "{name}: top-1 vs numpy float64 reference");
            assert_eq!(argmax(&got), argmax(&hf), "{name}: top-1 vs HF transformers");
            let (d_ref, d_hf) = (max_abs_diff(&got, &f64_ref), max_abs_diff(&got, &hf));
            if case["stable"].as_bool() == Some(true) {
                assert!(d_ref < 1e-3, "{name}: max |Δ| vs numpy float64 = {d_ref}");
                assert!(d_hf < 1e-3, "{name}: max |Δ| vs HF transformers = {d_hf}");
            } else {
                assert!(d_ref < 0.5 && d_hf < 0.5, "{name}: max |Δ| {d_ref} (numpy), {d_hf} (HF)");
            }
            checked += 1;
        }
    }
    assert_eq!(checked, 30, "6 files × 5 prompts");
}

/// Greedy decoding through the engine API reproduces the reference's continuation wherever the
/// reference's top-2 margins are wide enough that float noise cannot swap them.
#[test]
fn greedy_continuations_match_the_reference() {
    let refs = references();
    let mut checked = 0;
    for (file, info) in refs["files"].as_object().unwrap() {
        let bytes = std::fs::read(fixture(&format!("models/{file}"))).unwrap();
        let g = GgufFile::parse(&bytes).unwrap();
        let model = Model::load(&g, &bytes, &LoadOptions::default(), &mut |_, _| {}).unwrap();
        let weights: Arc<dyn Weights> = Arc::new(CpuModel::new(model, kernels::best(), None, None).unwrap());
        let tok = Tokenizer::from_metadata(&g.metadata).unwrap();
        for case in refs["models"][info["model"].as_str().unwrap()]["cases"].as_array().unwrap() {
            let gaps = floats(&case["greedy_gaps"]);
            if case["stable"].as_bool() != Some(true) || gaps.iter().any(|&g| g < 0.01) {
                continue;
            }
            if case["add_special"].as_bool() == Some(true) {
                assert_eq!(tok.encode(case["text"].as_str().unwrap(), true).unwrap(), ids(&case["ids"]));
            }
            let mut s = Session::open(&weights, 128).unwrap();
            s.prefill(&ids(&case["ids"])).unwrap();
            let mut sampler = Sampler::new(SamplerParams::greedy());
            let mut out = Vec::new();
            for _ in 0..10 {
                let t = sampler.sample(s.logits(), s.tokens()).unwrap();
                out.push(t);
                s.push(&[t], Want::Logits).unwrap();
            }
            assert_eq!(out, ids(&case["greedy"]), "{file} / {}: greedy continuation", case["name"]);
            checked += 1;
        }
    }
    assert!(checked >= 10, "only {checked} cases had wide enough margins");
}

/// The activation the engine picks for files without an activation key, and the override.
#[test]
fn activation_is_inferred_and_can_be_overridden() {
    for (file, want) in [("tiny-a-i2_s.gguf", "architecture bitnet-b1.58"), ("tiny-b-tq2_0.gguf", "byte-level BPE")] {
        let out = bitnet_tests::bitnet_ok(&["info", "-m", fixture(&format!("models/{file}")).to_str().unwrap()]);
        let line = out.lines().find(|l| l.starts_with("activation:")).expect("activation line");
        assert!(line.contains("relu2") && line.contains(want), "{file}: {line}");
    }
    let path = fixture("models/tiny-b-tq2_0.gguf");
    let path = path.to_str().unwrap();
    let relu2 = bitnet_json(&["logits", "-m", path, "-p", "Hello", "--json", "--all"]);
    let silu = bitnet_json(&["logits", "-m", path, "-p", "Hello", "--json", "--all", "--activation", "silu"]);
    assert!(
        max_abs_diff(&floats(&relu2["logits"]), &floats(&silu["logits"])) > 0.1,
        "--activation silu changes the model"
    );
}

/// `--kv-type f32` is exact again (on the CPU and wgpu) and `--kv-type q8_0` is exactly llama.cpp's Q8_0 blocks: against the
/// numpy float64 reference with the same cache (references_kv.json, made by tests/scripts/make_kv_refs.py),
/// within 1e-3 on flip-free prompts, within a few tenths with the same top-1 elsewhere. A q8_0 cache needs
/// heads of whole 32-value blocks: tiny-a's head dim of 16 is refused with an error, as in llama.cpp.
#[test]
fn kv_cache_types_match_their_references() {
    let refs = references();
    let text = std::fs::read_to_string(fixture("models/references_kv.json")).expect("references_kv.json");
    let kv_refs: Value = serde_json::from_str(&text).expect("valid JSON");
    let mut checked = 0;
    for (file, info) in refs["files"].as_object().expect("files") {
        let path = fixture(&format!("models/{file}"));
        let path = path.to_str().expect("UTF-8 path");
        for kv in ["f32", "q8_0"] {
            let Some(cases) = kv_refs[kv][info["model"].as_str().unwrap()].as_array() else {
                let out = bitnet(&["logits", "-m", path, "-p", "a", "--kv-type", kv]);
                let err = String::from_utf8_lossy(&out.stderr);
                assert!(!out.status.success() && err.contains("q8_0 KV cache with head dim"), "{file}: {err}");
                continue;
            };
            // wgpu (llvmpipe in CI) has the exact cache too.
            let backends: &[&str] = if kv == "f32" { &["cpu", "wgpu"] } else { &["cpu"] };
            for case in cases {
                for backend in backends {
                    let name = format!("{file} / {} / --kv-type {kv} --backend {backend}", case["name"]);
                    let list: Vec<String> = ids(&case["ids"]).iter().map(u32::to_string).collect();
                    let list = list.join(",");
                    let args = ["logits", "-m", path, "--tokens", &list, "--all", "--json", "--kv-type", kv];
                    let out = bitnet_json(&[&args[..], &["--backend", backend]].concat());
                    let (got, want) = (floats(&out["logits"]), floats(&case["logits_f64"]));
                    let d = max_abs_diff(&got, &want);
                    let tol = if case["stable"].as_bool() == Some(true) { 1e-3 } else { 0.5 };
                    assert!(d < tol, "{name}: max |Δ| = {d}");
                    assert_eq!(argmax(&got), argmax(&want), "{name}: top-1");
                    checked += 1;
                }
            }
        }
    }
    assert_eq!(
        checked,
        2 * 6 * 5 + 3 * 5,
        "6 files × 5 prompts with f32 on CPU and wgpu, the 3 tiny-b files with q8_0"
    );
}

fn family_references() -> Value {
    let text = std::fs::read_to_string(fixture("models/references_families.json")).expect("references_families.json");
    serde_json::from_str(&text).expect("valid JSON")
}

/// The other BitNet b1.58 families (tests/scripts/make_family_models.py): 1bitLLM (arch `bitnet`, SentencePiece,
/// SiLU, I2_S with 160-wide rows), Llama3-8B-1.58 (arch `llama`, TQ2_0, permuted q/k rows), Falcon-E (arch `llama`,
/// I2_S and the converter's ternary-valued F16, untied head, ChatML). Prompt ids must be Hugging Face's; logits
/// match the independent numpy float64 reference (which rotates the file's rows with llama.cpp's adjacent-pair
/// RoPE, where the engine un-permutes them) within 1e-3 where flip-free, top-1 and 0.5 elsewhere.
#[test]
fn families_match_independent_references() {
    let refs = family_references();
    let mut checked = 0;
    for (file, info) in refs["files"].as_object().expect("files") {
        let path = fixture(&format!("models/{file}"));
        let path = path.to_str().expect("UTF-8 path");
        // On the CPU, and on wgpu (llvmpipe in CI): the Llama block's missing sub-norms too.
        for (case, backend) in refs["models"][info["model"].as_str().unwrap()]["cases"]
            .as_array()
            .expect("cases")
            .iter()
            .flat_map(|c| [(c, "cpu"), (c, "wgpu")])
        {
            let name = format!("{file} / {} / --backend {backend}", case["name"]);
            let want_ids = ids(&case["ids"]);
            let out = if case["add_special"].as_bool() == Some(true) {
                let text = case["text"].as_str().unwrap();
                bitnet_json(&["logits", "-m", path, "-p", text, "--all", "--json", "--backend", backend])
            } else {
                let list: Vec<String> = want_ids.iter().map(u32::to_string).collect();
                bitnet_json(&[
                    "logits",
                    "-m",
                    path,
                    "--tokens",
                    &list.join(","),
                    "--all",
                    "--json",
                    "--backend",
                    backend,
                ])
            };
            assert_eq!(ids(&out["tokens"]), want_ids, "{name}: prompt ids");
            let (got, want) = (floats(&out["logits"]), floats(&case["logits_f64"]));
            assert_eq!(argmax(&got), argmax(&want), "{name}: top-1 vs numpy float64 reference");
            let d = max_abs_diff(&got, &want);
            let tol = if case["stable"].as_bool() == Some(true) { 1e-3 } else { 0.5 };
            assert!(d < tol, "{name}: max |Δ| vs numpy float64 = {d} (stable: {})", case["stable"]);
            checked += 1;
        }
    }
    assert_eq!(checked, 2 * (4 + 5 + 5 + 5), "1bitLLM 4 prompts (no chat template), 3 BPE files × 5, CPU and wgpu");
}

/// Upstream llama.cpp reads the TQ files we write and computes the same logits
/// (tests/scripts/make_llamacpp_refs.py; references_llamacpp.json holds llama.cpp's top 24 logits per prompt).
/// The files: fam-llama3-tq2_0.gguf as committed, and that file repacked to TQ1_0 by `bitnet quantize`.
///
/// Tolerance 1e-3 (observed ≤ 1.3e-5): llama.cpp dots TQ weights against Q8_K activations, one absmax scale
/// per 256 values, and every ternary row of this model is 256 wide, so a Q8_K block is the whole row and its
/// int8 codes are our per-token absmax codes (round-to-nearest-even of x·127/max|x|, both sides); the integer
/// dots are then equal and only float summation order differs, as between our engine and the float32 numpy
/// reference (the same 1e-3 bound as the flip-free references; these prompts are all flip-free there). With
/// one int8 flip the logits would move by ~0.1–0.3 (formats.md), far above it. Top-1 must agree wherever
/// llama.cpp's top two are more than 0.01 apart.
#[test]
fn llama_cpp_reads_our_tq_files() {
    let text = std::fs::read_to_string(fixture("models/references_llamacpp.json")).expect("references_llamacpp.json");
    let refs: Value = serde_json::from_str(&text).expect("valid JSON");
    let source = fixture("models/fam-llama3-tq2_0.gguf");
    let tq1 = std::env::temp_dir().join(format!("bitnet-llamacpp-tq1_0-{}.gguf", std::process::id()));
    let (source, tq1_path) = (source.to_str().unwrap(), tq1.to_str().unwrap());
    bitnet_ok(&["quantize", "--type", "tq1_0", source, tq1_path]);
    let mut checked = 0;
    for (file, path) in [("fam-llama3-tq2_0.gguf", source), ("fam-llama3-tq1_0.gguf", tq1_path)] {
        for case in refs["files"][file]["cases"].as_array().expect("cases") {
            let name = format!("{file} / {}", case["name"]);
            let list: Vec<String> = ids(&case["ids"]).iter().map(u32::to_string).collect();
            let args = ["logits", "-m", path, "--tokens", &list.join(","), "--all", "--json", "--kv-type", "f32"];
            let got = floats(&bitnet_json(&args)["logits"]);
            let top = case["top"].as_array().expect("top");
            let logit = |pair: &Value| pair[1].as_f64().unwrap() as f32;
            let d = top.iter().map(|p| (got[p[0].as_u64().unwrap() as usize] - logit(p)).abs()).fold(0.0, f32::max);
            assert!(d < 1e-3, "{name}: max |Δ| vs llama.cpp over its top {} = {d}", top.len());
            if logit(&top[0]) - logit(&top[1]) > 0.01 {
                assert_eq!(argmax(&got) as u64, top[0][0].as_u64().unwrap(), "{name}: top-1 vs llama.cpp");
            }
            checked += 1;
        }
    }
    std::fs::remove_file(&tq1).ok();
    assert_eq!(checked, 2 * 4, "2 files × 4 prompts");
}

/// The chat prompt renders exactly as transformers' apply_chat_template does with the family's template, and
/// tokenizes to the reference ids; the 1bitLLM base model has no template, which is a one-line error.
#[test]
fn family_chat_prompts_render_as_transformers() {
    use bitnet_engine::text::chat::ChatMessage;
    let refs = family_references();
    let mut checked = 0;
    for (file, info) in refs["files"].as_object().unwrap() {
        let bytes = std::fs::read(fixture(&format!("models/{file}"))).unwrap();
        let tok = Tokenizer::from_metadata(&GgufFile::parse(&bytes).unwrap().metadata).unwrap();
        let cases = refs["models"][info["model"].as_str().unwrap()]["cases"].as_array().unwrap();
        let Some(chat) = cases.iter().find(|c| c["name"] == "chat") else {
            let err = tok.render_chat(&[ChatMessage::new("user", "hi")], true).unwrap_err().to_string();
            assert!(err.contains("no chat template") && !err.contains('\n'), "{file}: {err}");
            continue;
        };
        let messages: Vec<ChatMessage> = chat["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| ChatMessage::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
            .collect();
        assert_eq!(tok.render_chat(&messages, true).unwrap(), chat["text"].as_str().unwrap(), "{file}");
        assert_eq!(tok.encode_chat(&messages, true).unwrap(), ids(&chat["ids"]), "{file}");
        checked += 1;
    }
    assert_eq!(checked, 3);
}

/// `bitnet info` names the family, activation, tokenizer and template it chose, and why.
#[test]
fn info_explains_the_family_choices() {
    let expect = [
        (
            "fam-1bitllm-i2_s.gguf",
            [
                "BitNet block",
                "SentencePiece vocabulary means a bitnet_b1_58",
                "llama (SentencePiece BPE)",
                "a base model, no chat",
            ],
        ),
        (
            "fam-llama3-tq2_0.gguf",
            [
                "Llama block with ternary projections",
                "architecture llama",
                "pre-tokenizer llama-bpe",
                "tokenizer.chat_template of the file",
            ],
        ),
        (
            "fam-falcone-i2_s.gguf",
            [
                "Llama block with ternary projections",
                "LlamaForCausalLM's SiLU",
                "gpt2 (byte-level BPE)",
                "tokenizer.chat_template of the file",
            ],
        ),
        ("tiny-a-i2_s.gguf", ["BitNet block", "implies relu²", "gpt2", "tokenizer.chat_template of the file"]),
    ];
    for (file, [family, activation, tokenizer, template]) in expect {
        let out = bitnet_tests::bitnet_ok(&["info", "-m", fixture(&format!("models/{file}")).to_str().unwrap()]);
        let line = |start: &str| out.lines().find(|l| l.starts_with(start)).unwrap_or_default().to_string();
        assert!(line("family:").contains(family), "{file}: {}", line("family:"));
        assert!(line("activation:").contains(activation), "{file}: {}", line("activation:"));
        assert!(line("tokenizer:").contains(tokenizer), "{file}: {}", line("tokenizer:"));
        assert!(line("chat template:").contains(template), "{file}: {}", line("chat template:"));
    }
}
