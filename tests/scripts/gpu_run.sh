#!/usr/bin/env bash
# The GPU tests and benchmarks, on a machine with an NVIDIA GPU but no Rust toolchain (the lent H100).
# Here, with the toolchain, build the test binaries into .devcarry/ (xz: the transfer is size-limited):
#
#   bash tests/scripts/gpu_run.sh build
#
# There, from the repository root, with .devcarry/ and .gl/ alongside (.gl/: the debs of libvulkan1 libegl1
# libglvnd0 libopengl0 libgl1 libglx0 libgles2, as the device README downloads them; with libvulkan1 alone the
# NVIDIA Vulkan driver loads no adapter):
#
#   bash tests/scripts/gpu_run.sh [wgpu|cuda]...     # default: both; logs in $OUT (or /tmp)
#
# The test binaries find their fixtures through the absolute path of the tree they were built in, so
# that path is made to point at this tree.
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ "${1:-}" = build ]; then
    mkdir -p .devcarry
    built=$(cargo test --release -p bitnet-engine --features wgpu,cuda --no-run --message-format=json 2>/dev/null |
        python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["profile"]["test"] and m["target"]["name"] in ("bitnet_engine", "wgpu", "cuda"):
        print(m["target"]["name"], m["executable"])')
    while read -r name exe; do
        strip -o ".devcarry/$name" "$exe" && xz -f -T2 ".devcarry/$name"
    done <<< "$built"
    echo "$PWD" > .devcarry/built_in
    ls -la .devcarry
    exit
fi

out=${OUT:-/tmp}
for f in .gl/*.deb; do dpkg -x "$f" /; done
ldconfig
# The NVIDIA Vulkan driver's manifest, where the lent machines keep it.
icd=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
[ -f "$icd" ] && export VK_DRIVER_FILES=$icd
built_in=$(cat .devcarry/built_in)
[ "$built_in" = "$PWD" ] || { mkdir -p "$(dirname "$built_in")"; ln -sfn "$PWD" "$built_in"; }
for f in .devcarry/*.xz; do xz -dkf "$f"; chmod +x "${f%.xz}"; done
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"

failed=0
run() { "$@" || failed=1; }
for what in ${*:-wgpu cuda}; do
    case $what in
        wgpu)
            # Every wgpu test (CI=1: no adapter is a failure), then the benchmarks.
            run env CI=1 .devcarry/wgpu > "$out/wgpu-tests.log" 2>&1
            run .devcarry/wgpu --ignored --nocapture --test-threads 1 bench > "$out/wgpu-bench.log" 2>&1 ;;
        cuda)
            run .devcarry/bitnet_engine cuda > "$out/cuda-unit.log" 2>&1
            run .devcarry/cuda > "$out/cuda-tests.log" 2>&1
            run .devcarry/cuda --ignored --nocapture --test-threads 1 bench > "$out/cuda-bench.log" 2>&1 ;;
        *) echo "unknown: $what (wgpu or cuda)" >&2; exit 2 ;;
    esac
done
grep -h "^test result" "$out"/*.log
exit $failed
