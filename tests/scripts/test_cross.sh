#!/usr/bin/env bash
# The kernels of the other targets, tested where they run: the NEON kernels on emulated AArch64 CPUs
# with and without the dot-product extension (qemu-user), and the WebAssembly SIMD kernels under
# Node's WASI. Each run names the kernel sets it must see (BITNET_EXPECT_KERNELS, checked by
# engine/tests/kernels.rs), so a pass proves which variants were compared with the reference.
# Installs what it needs on a fresh Debian machine with Rust (rustup) and Node >= 18.17.
set -euo pipefail
cd "$(dirname "$0")/../.."
repo=$PWD

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
if ! command -v qemu-aarch64 >/dev/null || ! command -v aarch64-linux-gnu-gcc >/dev/null || ! command -v node >/dev/null; then
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user gcc-aarch64-linux-gnu \
        $(command -v node >/dev/null || echo nodejs)
fi
rustup target add aarch64-unknown-linux-gnu wasm32-wasip1

tests=(-p bitnet-engine --test kernels --test quant)

# qemu's `max` CPU has every extension, dotprod included; the Cortex-A53 (Armv8.0) has none.
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
for run in max=scalar,neon,neon-dotprod cortex-a53=scalar,neon; do
    cpu=${run%%=*}
    echo "== aarch64 on qemu -cpu $cpu"
    CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu -cpu $cpu" \
        BITNET_EXPECT_KERNELS=${run#*=} cargo test --target aarch64-unknown-linux-gnu "${tests[@]}"
done

# WebAssembly has no run-time feature detection: SIMD is chosen at compile time, as for the browser.
echo "== wasm32-wasip1 +simd128 on node $(node --version)"
CARGO_TARGET_WASM32_WASIP1_RUSTFLAGS="-C target-feature=+simd128" \
    CARGO_TARGET_WASM32_WASIP1_RUNNER="node --no-warnings $repo/tests/scripts/wasi_run.mjs" \
    BITNET_EXPECT_KERNELS=scalar,simd128 cargo test --target wasm32-wasip1 "${tests[@]}"
