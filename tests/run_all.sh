#!/usr/bin/env bash
# Installs what the tests need on a fresh machine of this kind (Debian, Rust via rustup) and runs
# every test. `.ci/run` calls exactly this; so does the README.
set -euo pipefail
cd "$(dirname "$0")/.."

# The official OpenAI Python client, which one `bitnet serve` test drives unmodified.
python3 -m pip install -q --disable-pip-version-check openai

# The `bitnet` binary the end-to-end tests drive, from the same (dev, optimized) profile as the tests.
cargo build -p bitnet-cli
cargo test --workspace
