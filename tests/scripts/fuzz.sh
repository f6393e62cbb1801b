#!/usr/bin/env bash
# Runs every cargo-fuzz target (fuzz/fuzz_targets) for SECONDS each (default 60) and fails on any crash,
# panic, timeout or out-of-memory. Installs cargo-fuzz if it is missing; needs the nightly toolchain
# (FUZZ_TOOLCHAIN, default `nightly`, which the threaded wasm build installs too).
#   bash tests/scripts/fuzz.sh [SECONDS]
# The committed seeds (fuzz/corpus/TARGET) are read, never written: what a run finds goes to a scratch
# corpus (fuzz/corpus-new/TARGET, ignored by git) and a crashing input to fuzz/artifacts/TARGET.
set -euo pipefail
cd "$(dirname "$0")/../../fuzz"
seconds=${1:-60}
toolchain=${FUZZ_TOOLCHAIN:-nightly}
rustup toolchain list | grep -q "^$toolchain" || rustup toolchain install "$toolchain" --profile minimal --no-self-update
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
# Separate from the workspace's target dir: sanitizer-instrumented builds share nothing with it.
export CARGO_TARGET_DIR=${FUZZ_TARGET_DIR:-$PWD/target}
for target in $(cargo +"$toolchain" fuzz list); do
    echo "=== fuzz $target for $seconds s"
    mkdir -p "corpus-new/$target"
    # -timeout: one input running over 10 s is a hang; -rss_limit_mb: a huge allocation is a failure too.
    cargo +"$toolchain" fuzz run "$target" "corpus-new/$target" "corpus/$target" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1
done
echo "=== fuzzing found nothing"
