//! Bad input gets a one-line error and a non-zero exit: never a panic, an abort or a hang.

use bitnet_tests::{bitnet, edited_model, fixture, nan_model};

/// Runs `bitnet ARGS`, which must fail cleanly; returns the error line.
fn fails(args: &[&str]) -> String {
    let out = bitnet(args);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(1), "bitnet {args:?}: exit status {:?}, stderr {stderr}", out.status);
    assert!(!stderr.contains("panicked"), "bitnet {args:?} panicked: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.is_empty()).collect();
    assert_eq!(lines.len(), 1, "bitnet {args:?}: expected one error line, got {stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    lines[0].to_string()
}

fn temp_file(name: &str, bytes: &[u8]) -> String {
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    std::fs::write(&path, bytes).unwrap();
    path.to_str().unwrap().to_string()
}

#[test]
fn truncated_models_fail_cleanly_at_every_section() {
    let good = std::fs::read(fixture("models/tiny-a-i2_s.gguf")).unwrap();
    // Cuts inside the header, the metadata (tokenizer arrays), the tensor infos and the data.
    for cut in [0, 3, 4, 7, 8, 16, 23, 24, 40, 100, 1000, 5000, 20000, 60000, good.len() / 2, good.len() - 1] {
        let path = temp_file(&format!("cut-{cut}.gguf"), &good[..cut]);
        let msg = fails(&["logits", "-m", &path, "--tokens", "1,2"]);
        assert!(msg.contains("GGUF"), "cut at {cut}: {msg}");
        fails(&["info", "-m", &path]);
    }
}

#[test]
fn hostile_headers_are_rejected_before_allocating() {
    let mut huge = b"GGUF".to_vec();
    huge.extend(3u32.to_le_bytes());
    huge.extend(u64::MAX.to_le_bytes()); // tensor count
    huge.extend(u64::MAX.to_le_bytes()); // metadata count
    fails(&["info", "-m", &temp_file("huge-counts.gguf", &huge)]);
    fails(&["info", "-m", &temp_file("not-gguf.gguf", b"PK\x03\x04 this is a zip file, not a model")]);
    fails(&["info", "-m", &temp_file("empty.gguf", b"")]);
    fails(&["run", "-m", "/nonexistent/model.gguf", "-p", "hi"]);
}

#[test]
fn unknown_tensor_type_names_the_tensor() {
    let mut bytes = std::fs::read(fixture("models/tiny-a-i2_s.gguf")).unwrap();
    // The first tensor info after the metadata: find its name and patch the type id after its dims.
    let name = b"token_embd.weight";
    let at = bytes.windows(name.len()).position(|w| w == name).expect("tensor name in file") + name.len();
    let n_dims = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
    let ty_at = at + 4 + 8 * n_dims;
    bytes[ty_at..ty_at + 4].copy_from_slice(&99u32.to_le_bytes());
    let msg = fails(&["logits", "-m", &temp_file("unknown-type.gguf", &bytes), "--tokens", "1"]);
    assert!(msg.contains("token_embd.weight") && msg.contains("99"), "{msg}");
}

#[test]
fn prompts_and_tokens_that_do_not_fit_are_errors() {
    let model = fixture("models/tiny-a-i2_s.gguf");
    let model = model.to_str().unwrap();
    let long = "word ".repeat(100);
    let msg = fails(&["run", "-m", model, "--ctx", "16", "-p", &long, "-n", "4"]);
    assert!(msg.contains("context"), "{msg}");
    let msg = fails(&["logits", "-m", model, "--tokens", "1,999999"]);
    assert!(msg.contains("999999"), "{msg}");
    let msg = fails(&["run", "-m", model, "--ctx", "100000", "-p", "hi"]);
    assert!(msg.contains("context"), "{msg}");
    let bad_utf8 = temp_file("bad-utf8.txt", b"caf\xe9 au lait");
    let msg = fails(&["perplexity", "-m", model, "-f", &bad_utf8]);
    assert!(msg.contains("UTF-8"), "{msg}");
}

#[test]
fn nan_logits_are_an_error_not_a_panic_or_garbage() {
    let model = nan_model();
    let model = model.to_str().unwrap();
    for temp in ["0", "0.8"] {
        let msg = fails(&["run", "-m", model, "-p", "Hello", "-n", "4", "--temp", temp]);
        assert!(msg.contains("logit of NaN"), "--temp {temp}: {msg}");
    }
    let text = fixture("heldout.txt");
    let msg = fails(&["perplexity", "-m", model, "--ctx", "16", "-f", text.to_str().unwrap()]);
    assert!(msg.contains("non-finite"), "{msg}");
}

#[test]
fn a_directory_or_a_device_is_not_a_model() {
    let dir = env!("CARGO_TARGET_TMPDIR");
    let msg = fails(&["info", "-m", dir]);
    assert!(msg.contains("is a directory"), "{msg}");
    let msg = fails(&["run", "-m", "/dev/null", "-p", "hi"]);
    assert!(msg.contains("not a GGUF file"), "{msg}");
}

#[test]
fn counts_and_sizes_that_overflow_or_make_no_sense_are_refused() {
    let model = fixture("models/tiny-a-i2_s.gguf");
    let model = model.to_str().unwrap();
    let msg = fails(&["bench", "-m", model, "-p", "0", "-n", "18446744073709551615"]);
    assert!(msg.contains("context"), "{msg}");
    for ctx in ["1", "2"] {
        let text = fixture("heldout.txt");
        let msg = fails(&["perplexity", "-m", model, "--ctx", ctx, "-f", text.to_str().unwrap()]);
        assert!(msg.contains("at least 3"), "--ctx {ctx}: {msg}");
    }
    for bad in ["0", "1000", "many"] {
        let out = bitnet(&["run", "-m", model, "-t", bad, "-p", "hi", "-n", "1"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "-t {bad}: {stderr}");
        assert!(stderr.contains("thread count"), "-t {bad}: {stderr}");
    }
    for (flag, value) in [("--min-p", "2"), ("--temp", "NaN"), ("--repeat-penalty", "0")] {
        let msg = fails(&["run", "-m", model, flag, value, "-p", "hi", "-n", "1"]);
        assert!(msg.contains("out of range"), "{flag} {value}: {msg}");
    }
}

/// A model that claims a context of 2^31 - 1 tokens: a huge --ctx is refused, with the bytes it needs, before
/// anything is allocated (it used to fill gigabytes of RoPE table first).
#[test]
fn a_context_that_does_not_fit_in_memory_is_refused_up_front() {
    let model = edited_model(
        "models/tiny-a-i2_s.gguf",
        "huge-context.gguf",
        |key, value| {
            if key.ends_with(".context_length") {
                *value = bitnet_engine::format::gguf::Value::U32((1 << 31) - 1);
            }
        },
        |_, _| {},
    );
    let t0 = std::time::Instant::now();
    // 10^9 tokens of this model need 320 GB, more than any machine that runs these tests.
    let msg = fails(&["run", "-m", model.to_str().unwrap(), "--ctx", "1000000000", "-p", "hi", "-n", "1"]);
    assert!(msg.contains("320000") && msg.contains("bytes"), "{msg}");
    assert!(t0.elapsed() < std::time::Duration::from_secs(10), "took {:?}", t0.elapsed());
}

/// A chat longer than the context forgets its oldest turns instead of exiting; a message that cannot fit
/// at all is an error for that message only.
#[test]
fn chat_outgrowing_the_context_goes_on() {
    use std::io::Write;
    let model = fixture("models/tiny-a-i2_s.gguf");
    let mut child = std::process::Command::new(bitnet_tests::bitnet_bin())
        .args(["chat", "-m", model.to_str().unwrap(), "--ctx", "48", "-n", "6", "--temp", "0", "-t", "1"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    for i in 0..12 {
        writeln!(stdin, "tell me more about the weather today, number {i}").unwrap();
    }
    writeln!(stdin, "{}", "far too long ".repeat(40)).unwrap();
    writeln!(stdin, "and the last one").unwrap();
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // Each reply ends with a newline (replies may hold newlines of their own).
    assert!(String::from_utf8_lossy(&out.stdout).lines().count() >= 13, "a reply per fitting message");
    assert_eq!(stderr.lines().filter(|l| l.contains("does not fit")).count(), 1, "{stderr}");
}

/// Malformed family files: an unknown architecture, a SentencePiece vocabulary whose scores do not match its
/// tokens, an unknown tokenizer model, and an arch `llama` file whose projections are latent floats (an ordinary
/// Llama, not a ternary one) each give one line naming the problem.
#[test]
fn malformed_family_files_are_named() {
    let arch = edited_model(
        "models/fam-falcone-i2_s.gguf",
        "arch-qwen2.gguf",
        |key, v| {
            if key == "general.architecture" {
                *v = bitnet_engine::format::gguf::Value::Str("qwen2".into());
            }
        },
        |_, _| {},
    );
    let msg = fails(&["logits", "-m", arch.to_str().unwrap(), "--tokens", "1"]);
    assert!(msg.contains("architecture 'qwen2'") && msg.contains("llama"), "{msg}");

    let scores = edited_model(
        "models/fam-1bitllm-i2_s.gguf",
        "short-scores.gguf",
        |key, v| {
            if key == "tokenizer.ggml.scores" {
                *v = bitnet_engine::format::gguf::Value::Array(vec![bitnet_engine::format::gguf::Value::F32(0.0); 7]);
            }
        },
        |_, _| {},
    );
    let msg = fails(&["run", "-m", scores.to_str().unwrap(), "-p", "hi", "-n", "1"]);
    assert!(msg.contains("tokenizer.ggml.scores") && msg.contains("7 entries for 607 tokens"), "{msg}");

    let model = edited_model(
        "models/fam-1bitllm-i2_s.gguf",
        "unigram.gguf",
        |key, v| {
            if key == "tokenizer.ggml.model" {
                *v = bitnet_engine::format::gguf::Value::Str("t5".into());
            }
        },
        |_, _| {},
    );
    let msg = fails(&["run", "-m", model.to_str().unwrap(), "-p", "hi", "-n", "1"]);
    assert!(msg.contains("tokenizer.ggml.model 't5'"), "{msg}");

    let latent = edited_model(
        "models/fam-falcone-f16.gguf",
        "latent.gguf",
        |_, _| {},
        |name, data| {
            if name == "blk.0.attn_q.weight" {
                // One non-zero f16 weight with a different magnitude (a mantissa bit flipped): no longer {-s, 0, +s}.
                let at = data.chunks_exact(2).position(|h| u16::from_le_bytes([h[0], h[1]]) & 0x7fff != 0).unwrap();
                data[2 * at + 1] ^= 0x01;
            }
        },
    );
    let msg = fails(&["logits", "-m", latent.to_str().unwrap(), "--tokens", "1"]);
    assert!(msg.contains("blk.0.attn_q.weight") && msg.contains("not ternary"), "{msg}");

    // The GPU backends run the BitNet block only so far: asking for one by name is an error (auto stays on the CPU).
    let llama = fixture("models/fam-llama3-tq2_0.gguf");
    let msg = fails(&["logits", "-m", llama.to_str().unwrap(), "--tokens", "1", "--backend", "wgpu"]);
    assert!(msg.contains("no sub-norms") && msg.contains("--backend cpu"), "{msg}");
}

/// RoPE scaling is not implemented: a file that asks for it is refused, not run with the wrong positions.
#[test]
fn rope_scaling_is_refused() {
    use bitnet_engine::format::gguf::{GgufFile, GgufWriter, Value};
    let bytes = std::fs::read(fixture("models/fam-llama3-tq2_0.gguf")).unwrap();
    let g = GgufFile::parse(&bytes).unwrap();
    let mut w = GgufWriter::new();
    for (k, v) in &g.metadata {
        w.add(k, v.clone());
    }
    w.add("llama.rope.scaling.type", Value::Str("yarn".into()));
    w.add("llama.rope.scaling.factor", Value::F32(4.0));
    for t in &g.tensors {
        w.add_tensor(&t.name, &t.dims, t.ty, g.tensor_data(&bytes, t).to_vec());
    }
    let msg = fails(&["logits", "-m", &temp_file("rope-yarn.gguf", &w.to_bytes()), "--tokens", "1"]);
    assert!(msg.contains("RoPE scaling 'yarn'"), "{msg}");
}
