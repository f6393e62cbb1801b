//! The real small model, smolbit-135m (../shared/models/smolbit-135m), converted by `bitnet convert`,
//! against its PyTorch float64 reference (tests/scripts/make_smolbit_refs.py): perplexity, next-token
//! logits of plain and chat prompts, greedy text, and the embedded default model's provenance.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use bitnet_tests::{bitnet, bitnet_json, bitnet_ok, fixture, repo, shared};
use serde_json::Value;

/// smolbit converted with an F16 embedding (the exact model), once per test run.
fn f16_model() -> &'static str {
    static PATH: OnceLock<String> = OnceLock::new();
    PATH.get_or_init(|| {
        let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("smolbit-f16.gguf");
        convert(&out, "f16");
        out.to_str().unwrap().to_string()
    })
}

fn convert(out: &Path, embd: &str) {
    let src = shared("models/smolbit-135m");
    bitnet_ok(&["convert", src.to_str().unwrap(), "-o", out.to_str().unwrap(), "--embd", embd]);
}

fn refs() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("smolbit_refs.json")).unwrap()).unwrap()
}

#[test]
fn perplexity_matches_the_pytorch_reference_within_one_percent() {
    let r = refs();
    let want = r["perplexity"]["ppl"].as_f64().unwrap();
    let ctx = r["perplexity"]["n_ctx"].as_u64().unwrap().to_string();
    let heldout = fixture("heldout.txt");
    let out = bitnet_ok(&["perplexity", "-m", f16_model(), "-f", heldout.to_str().unwrap(), "--ctx", &ctx]);
    let last = out.lines().last().unwrap();
    let got: f64 = last.strip_prefix("PPL = ").expect("last line is `PPL = <value>`").parse().unwrap();
    assert!(out.contains(&format!("scored tokens = {}", r["perplexity"]["n_scored"])), "{out}");
    assert!((got / want - 1.0).abs() < 0.01, "PPL {got} vs reference {want}");
}

#[test]
fn top20_logits_match_the_pytorch_reference() {
    for p in refs()["prompts"].as_array().unwrap() {
        let name = p["name"].as_str().unwrap();
        let out = bitnet_json(&["logits", "-m", f16_model(), "-p", p["text"].as_str().unwrap(), "--all", "--json"]);
        assert_eq!(out["tokens"], p["ids"], "{name}: prompt ids");
        let logits = out["logits"].as_array().unwrap();
        let top20 = p["top20"].as_array().unwrap();
        assert_eq!(out["top"][0][0], top20[0][0], "{name}: top-1");
        for pair in top20 {
            let (id, want) = (pair[0].as_u64().unwrap() as usize, pair[1].as_f64().unwrap());
            let got = logits[id].as_f64().unwrap();
            // Not stable under int8 rounding flips (see tests/fixtures/README.md): a few tenths.
            assert!((got - want).abs() < 0.7, "{name}: logit of {id}: {got} vs {want}");
        }
    }
}

#[test]
fn greedy_text_matches_the_reference_sample() {
    let samples: Value =
        serde_json::from_str(&std::fs::read_to_string(shared("models/smolbit-135m/reference_samples.json")).unwrap())
            .unwrap();
    let sample = samples["samples"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["prompt"] == "Once upon a time" && s["temperature"] == 0.0)
        .unwrap();
    let out = bitnet_ok(&["run", "-m", f16_model(), "-p", "Once upon a time", "-n", "24", "--temp", "0"]);
    let want: String = sample["text"].as_str().unwrap().chars().take(100).collect();
    let got = out.trim_end_matches('\n');
    assert!(want.starts_with(&got[..got.len().min(100)]) && got.len() >= 80, "got {got:?}\nwant {want:?}");
}

#[test]
fn chat_answers_through_the_template_and_keeps_history() {
    let mut child = std::process::Command::new(bitnet_tests::bitnet_bin())
        .args(["chat", "--temp", "0", "-n", "40"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"What is the capital of France?\nAnd what is the capital of Italy?\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let answers: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(answers[0].contains("Paris"), "{text}");
    assert!(text.contains("Rome"), "{text}");
    assert!(!text.contains("<|im_end|>") && !text.contains("<|im_start|>"), "special tokens leaked: {text}");
}

#[test]
fn embedded_default_model_is_bitnet_convert_output() {
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("smolbit-q5_0.gguf");
    convert(&out, "q5_0");
    let made = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).ok();
    let shipped = std::fs::read(repo().join("engine/models/smolbit-135m.gguf")).unwrap();
    assert!(made == shipped, "engine/models/smolbit-135m.gguf differs from `bitnet convert ... --embd q5_0`");
    // And `bitnet run` without -m runs it.
    let o = bitnet(&["run", "-p", "The capital of France is", "-n", "3", "--temp", "0"]);
    assert!(o.status.success() && String::from_utf8_lossy(&o.stdout).contains("Paris"));
}
