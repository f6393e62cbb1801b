#!/usr/bin/env bash
# Installs what the tests need on a fresh machine of this kind (Debian, Rust via rustup, Node) and runs
# every test. `.ci/run` calls exactly this; so does the README.
#   0. lint: `cargo fmt --check`, `cargo clippy -D warnings`
#   1. native: `cargo test --workspace` (the wgpu tests on llvmpipe, software Vulkan: none are skipped);
#      the build with the CUDA backend is checked (its tests need an NVIDIA GPU: README, Development)
#   1b. the Python module: `pip install ./python`, then its pytest suite against the `bitnet` binary
#   2. the NEON kernels under qemu-aarch64 (with and without dotprod) and SIMD128 under Node's WASI
#   3. the browser: both wasm builds, the npm package and the demo page in headless Chromium
#   4. fuzzing: each cargo-fuzz target for 45 s (GGUF reader, tokenizer, chat templates, request bodies)
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
step() { echo "=== $* [$(( $(date +%s) - start )) s, $(df -h --output=avail . | tail -1 | tr -d ' ') free]"; }
# A one-off build needs no incremental state (it was 1.3 GB of the dev profile's 6 GB).
export CARGO_INCREMENTAL=0

step "install what is missing"
# The official OpenAI Python client, which one `bitnet serve` test drives unmodified (and jsonschema, with which
# it validates structured output; jinja2 renders the tool-call templates as the reference).
python3 -m pip install -q --disable-pip-version-check openai jsonschema jinja2
# llvmpipe, for the wgpu tests (they fail, rather than skip, without an adapter when CI is set).
if ! dpkg -s mesa-vulkan-drivers libvulkan1 >/dev/null 2>&1; then
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q mesa-vulkan-drivers libvulkan1
fi
export CI=${CI:-true}

step "lint: rustfmt and clippy"
for c in clippy rustfmt; do rustup component list --installed | grep -q "^$c" || rustup component add "$c"; done
cargo fmt --all --check
cargo clippy --workspace --all-targets -- -D warnings

step "the CUDA backend builds (without CUDA installed)"
cargo build -p bitnet-cli --features cuda

step "native tests"
# The `bitnet` binary the end-to-end tests drive, from the same (dev, optimized) profile as the tests.
cargo build -p bitnet-cli
cargo test --workspace

step "Python module"
# maturin comes from PyPI in pip's build environment. The dev profile the native step just built is reused
# (same engine features), so only the extension itself compiles; a user's `pip install ./python` builds release.
python3 -m pip install -q --disable-pip-version-check pytest numpy
MATURIN_PEP517_ARGS="--profile dev" python3 -m pip install -q --disable-pip-version-check ./python
# The tests find the `bitnet` binary under $CARGO_TARGET_DIR (or target/).
python3 -m pytest -q python/tests

step "AArch64 and WebAssembly kernels"
bash tests/scripts/test_cross.sh

step "browser"
bash tests/scripts/test_web.sh

step "fuzzing (45 s per target)"
bash tests/scripts/fuzz.sh 45

step "all passed"
