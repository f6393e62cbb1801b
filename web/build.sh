#!/usr/bin/env bash
# Builds the browser side of BitNet-Rust:
#   web/pkg/       the npm package: two wasm builds (st/: single-threaded SIMD128, stable Rust; mt/: threads,
#                  nightly + build-std + shared memory, with wasm-bindgen-rayon) and the TypeScript worker API
#   target/www/    the demo site (www/ + the package + the default model), served by `bitnet serve-www`
# Needs wasm-pack 0.15.1 and wasm-bindgen-cli 0.2.130 on PATH, the wasm32 target on stable and on the pinned
# nightly (with rust-src), node and npm: tests/scripts/test_web.sh installs all of it.
#
#   bash web/build.sh          both builds, the package and the site
#   bash web/build.sh st       the single-threaded build only (the package then always runs single-threaded)
#   bash web/build.sh test     the wasm tests (web/tests/web.rs) in headless Chromium, in the threaded build
#   bash web/build.sh js       the TypeScript, the package and the site again, with the wasm builds already in pkg/
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$(cd .. && pwd)
# Build outputs go under CARGO_TARGET_DIR when it is set (as cargo does), else target/.
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
NIGHTLY=nightly-2026-05-20
# Shared memory needs atomics in std (build-std) and these link arguments since nightly-2025-10 (rustc
# stopped passing --shared-memory; see ../shared/notes/toolchain.md §1).
MT_RUSTFLAGS='-C target-feature=+atomics,+bulk-memory,+mutable-globals,+simd128 -C link-arg=--shared-memory -C link-arg=--max-memory=4294967296 -C link-arg=--import-memory -C link-arg=--export=__wasm_init_tls -C link-arg=--export=__tls_size -C link-arg=--export=__tls_align -C link-arg=--export=__tls_base'

[ -x node_modules/.bin/wasm-opt ] && [ -x node_modules/.bin/tsc ] || npm ci --no-audit --no-fund
# wasm-pack runs the first wasm-opt on PATH: npm's binaryen 132 (Debian's 108 corrupts the output).
export PATH="$PWD/node_modules/.bin:$PATH"

# Each build has its own target dir: their flags differ, and sharing one would rebuild everything each time.
# No debug info in the wasm (the workspace's release profile has line tables for native profiling): it
# would ship in the package, and wasm-opt takes minutes over it.
export CARGO_PROFILE_RELEASE_DEBUG=false
st() { # stable Rust; SIMD128 is in every browser since 2021
  RUSTFLAGS='-C target-feature=+simd128' CARGO_TARGET_DIR="$TARGET/wasm-st" wasm-pack "$@"
}
mt() { # wasm-pack wants its path argument before cargo's own options
  RUSTFLAGS="$MT_RUSTFLAGS" CARGO_TARGET_DIR="$TARGET/wasm-mt" rustup run "$NIGHTLY" wasm-pack "$@" \
    --features threads -Z build-std=panic_abort,std
}

if [ "${1:-}" = test ]; then
  # Release: the tests then reuse the threaded package build's compiled dependencies.
  # webdriver.json gives Chromium --enable-unsafe-webgpu (SwiftShader's WebGPU adapter).
  WASM_BINDGEN_TEST_TIMEOUT=${WASM_BINDGEN_TEST_TIMEOUT:-300} mt test --headless --chrome --release . --test web \
    --features test-threads
  exit
fi

BUILDS=${*:-st mt}
if [ "$BUILDS" = js ]; then
  BUILDS=
else
  rm -rf pkg
fi
for build in $BUILDS; do
  case $build in
    st) st build --target web --release --no-pack --out-dir pkg/st --out-name bitnet_web . ;;
    mt) mt build --target web --release --no-pack --out-dir pkg/mt --out-name bitnet_web . ;;
    *) echo "unknown build '$build' (st, mt or test)" >&2; exit 2 ;;
  esac
  rm -f "pkg/$build/.gitignore"
done
# wasm-bindgen-rayon's bundler-mode helper (the Worker that each pool thread runs) imports its package as
# `import('../../..')`, a folder only bundlers resolve; naming the file works for bundlers and browsers alike.
if [ -d pkg/mt ] && ! grep -q "import('../../../bitnet_web.js')" pkg/mt/snippets/*/src/workerHelpers.js; then
  helper=$(find pkg/mt/snippets -name workerHelpers.js)
  [ -n "$helper" ] && grep -q "import('../../..')" "$helper" \
    || { echo "wasm-bindgen-rayon's workerHelpers.js changed: check its import of the package" >&2; exit 2; }
  sed -i "s|import('../../..')|import('../../../bitnet_web.js')|" "$helper"
fi
# The worker type-checks against the single-threaded build's declarations (both builds have the same API).
[ -d pkg/st ] || { echo "the st build is needed for the TypeScript declarations" >&2; exit 2; }
# The worker imports both builds: with the st build only, mt/ is a copy of it (no initThreadPool, so never threaded).
[ -d pkg/mt ] || cp -r pkg/st pkg/mt

tsc -p tsconfig.json
tsc -p tsconfig.worker.json
version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$ROOT/Cargo.toml" | head -1)
sed "s/\"VERSION\"/\"$version\"/" js/package.json > pkg/package.json
cp js/README.md pkg/README.md
# For static hosts that cannot send COOP/COEP (threads need them): a service worker that adds them.
cp node_modules/coi-serviceworker/coi-serviceworker.min.js pkg/coi-serviceworker.js

site="$TARGET/www"
rm -rf "$site"
mkdir -p "$site/models"
cp -r "$ROOT"/www/* "$site/"
cp -r pkg "$site/bitnet"
cp pkg/coi-serviceworker.js "$site/"
# The page's Markdown rendering (marked, and DOMPurify to sanitize its HTML) is in www/vendor/, copied above.
cp "$ROOT/engine/models/smolbit-135m.gguf" "$site/models/"
echo "built web/pkg (bitnet-web $version: ${BUILDS:-the wasm builds kept}) and the demo site in $site"
echo "serve it: target/release/bitnet serve-www --port 8080"
