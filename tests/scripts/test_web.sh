#!/usr/bin/env bash
# The browser side's tests, runnable on a fresh Debian 12 machine: installs what is missing (the recipe of
# shared/notes/toolchain.md), builds `bitnet` and the two wasm builds with the site (web/build.sh), then runs
#   1. the wasm tests in headless Chromium (wasm-pack test, threaded build: loading, tokenizer, logits vs the
#      references, WebGPU (SwiftShader) vs the CPU, SIMD128 kernels vs scalar, the thread pool),
#   2. the demo page end to end (Playwright: 20 tokens with wasm threads, one thread and WebGPU, each equal to
#      `bitnet run`; screenshots; browser tokens/s next to `bitnet bench`), the npm package imported by a
#      plain ESM page (both APIs: the package's own and the OpenAI-shaped one; structured output and embeddings
#      against `bitnet run --json-schema`/`--grammar` and `bitnet embed`), the Vite and webpack example
#      apps (web/examples/) built from the packed package, and the demo on a static host without isolation
#      headers (the service worker), and `bitnet serve`'s own chat page at / (node --test web/tests/).
# Outputs (screenshots, results.json, the example builds) go to target/web-test/ (under CARGO_TARGET_DIR when set).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
NIGHTLY=nightly-2026-05-20
start=$(date +%s)
step() { echo "=== $* [$(( $(date +%s) - start )) s]"; }

step "install what is missing"
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver
fi
rustup target list --installed | grep -qx wasm32-unknown-unknown || rustup target add wasm32-unknown-unknown
if ! rustup run "$NIGHTLY" rustc --print sysroot >/dev/null 2>&1 \
   || ! rustup component list --installed --toolchain "$NIGHTLY" | grep -q '^rust-src' \
   || ! rustup target list --installed --toolchain "$NIGHTLY" | grep -qx wasm32-unknown-unknown; then
  # --no-self-update: a fresh RUSTUP_HOME would otherwise "update" rustup 1.29 down to the dist server's 1.28.
  rustup toolchain install "$NIGHTLY" --profile minimal -c rust-src -t wasm32-unknown-unknown --no-self-update
fi
# Not --locked: the lock file pins a webpki-roots the crates.io mirror does not have.
wasm-bindgen --version 2>/dev/null | grep -q ' 0\.2\.130' || cargo install wasm-bindgen-cli --version 0.2.130
command -v wasm-pack >/dev/null || cargo install wasm-pack --version 0.15.1 --locked
(cd web && npm ci --no-audit --no-fund)

step "native build (bitnet: run, bench, serve-www)"
cargo build --release -p bitnet-cli

step "wasm builds, npm package, site"
bash web/build.sh

step "wasm tests in headless Chromium"
bash web/build.sh test

step "demo page and npm package in headless Chromium"
node --test --test-concurrency=1 web/tests/

step "done"
