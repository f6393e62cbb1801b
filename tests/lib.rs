//! Helpers shared by the end-to-end tests: where the `bitnet` binary, the fixtures and the shared
//! models are, and how to run the binary.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The repository root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ is inside the repo").to_path_buf()
}

pub fn fixture(name: &str) -> PathBuf {
    repo().join("tests/fixtures").join(name)
}

/// `../shared` beside the checkout (also laid beside CI's clone).
pub fn shared(name: &str) -> PathBuf {
    repo().join("../shared").join(name)
}

/// The `bitnet` binary of the same build as this test (cargo builds it for native/'s own tests).
pub fn bitnet_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().and_then(Path::parent).expect("target/<profile>/deps");
    let bin = dir.join(format!("bitnet{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.exists(),
        "{} not found: build it first with `cargo build -p bitnet-cli` (same profile)",
        bin.display()
    );
    bin
}

/// Runs `bitnet ARGS` and returns its output (whatever the exit status).
pub fn bitnet(args: &[&str]) -> Output {
    Command::new(bitnet_bin()).args(args).output().expect("run bitnet")
}

/// Runs `bitnet ARGS`, requires success, and returns stdout.
pub fn bitnet_ok(args: &[&str]) -> String {
    let out = bitnet(args);
    assert!(out.status.success(), "bitnet {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("stdout is UTF-8")
}

/// Runs `bitnet ARGS` that must print one JSON object.
pub fn bitnet_json(args: &[&str]) -> serde_json::Value {
    let out = bitnet_ok(args);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("bitnet {args:?} printed invalid JSON ({e}): {out}"))
}

/// A copy of fixture `name` with its metadata and tensor data edited, written as `out` (in the temporary directory).
pub fn edited_model(
    name: &str,
    out: &str,
    edit_metadata: impl Fn(&str, &mut bitnet_engine::format::gguf::Value),
    edit_tensor: impl Fn(&str, &mut Vec<u8>),
) -> PathBuf {
    use bitnet_engine::format::gguf::{GgufFile, GgufWriter};
    let bytes = std::fs::read(fixture(name)).unwrap();
    let g = GgufFile::parse(&bytes).unwrap();
    let mut w = GgufWriter::new();
    for (key, value) in &g.metadata {
        let mut value = value.clone();
        edit_metadata(key, &mut value);
        w.add(key, value);
    }
    for t in &g.tensors {
        let mut data = g.tensor_data(&bytes, t).to_vec();
        edit_tensor(&t.name, &mut data);
        w.add_tensor(&t.name, &t.dims, t.ty, data);
    }
    let path = std::env::temp_dir().join(format!("bitnet-tests-{}-{out}", std::process::id()));
    std::fs::write(&path, w.to_bytes()).expect("write the edited model");
    path
}

/// The tiny model with a NaN final norm: every logit is NaN.
pub fn nan_model() -> PathBuf {
    edited_model(
        "models/tiny-a-i2_s.gguf",
        "nan-norm.gguf",
        |_, _| {},
        |name, data| {
            if name == "output_norm.weight" {
                data.chunks_exact_mut(4).for_each(|c| c.copy_from_slice(&f32::NAN.to_le_bytes()));
            }
        },
    )
}
