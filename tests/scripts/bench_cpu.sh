#!/usr/bin/env bash
# CPU speed of `bitnet bench` against llama.cpp's `llama-bench`, on the SAME GGUF files of a BitNet b1.58
# 2B4T-shaped model (random ternary weights, real shapes and Llama 3 vocabulary: see make_2b4t_shape.py).
#
#   tests/scripts/bench_cpu.sh                   # ~1-2 h on 2 cores; prints the machine, then a markdown table
#
# Environment (all optional):
#   LLAMA_BENCH=path      an existing llama-bench binary (otherwise built once into $CACHE)
#   BITNET=path           an existing bitnet binary (otherwise built here, release)
#   LLAMA_CPP_SRC=dir     llama.cpp source to build; else the llama-cpp-python sdist below (found in $CACHE or
#                         /tmp/lcpp, or fetched with `pip download`), whose vendor/llama.cpp is the source
#   CACHE=dir             where llama.cpp is built (default ~/.cache/bitnet-bench)
#   WORK=dir              where the models go (default: a temp dir, deleted at the end; ~4 GB of GGUFs)
#   THREADS="1 2"  PP=128  TG=64  REPS=3      (on a busy machine, lower them: a 2-thread llama-bench can crawl)
#
# Files: bitnet convert writes arch bitnet-b1.58 for relu² I2_S files and llama.cpp's "bitnet" for TQ2_0/TQ1_0
# (convert::target_arch; rename_arch below is a no-op for those now, kept for older binaries) and BOTH engines run
# the TQ file. llama.cpp's bitnet graph applies SiLU where the model has relu² (it ignores
# bitnet.hidden_activation): same cost, different numbers - this is a speed test only. I2_S (type 36, Microsoft's
# fork) is unknown to upstream llama.cpp, so only ours runs it.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
LCPP_PY_VERSION=0.3.36            # vendors ggml-org/llama.cpp@0c1e57098 (its CHANGELOG)
CACHE=${CACHE:-$HOME/.cache/bitnet-bench}
THREADS=${THREADS:-"1 2"}
PP=${PP:-128}
TG=${TG:-64}
REPS=${REPS:-3}
log() { echo "== $*" >&2; }

# --- tools -------------------------------------------------------------------------------------------------------
build_llama_bench() {
    local src=${LLAMA_CPP_SRC:-}
    if [ -z "$src" ]; then
        local sdist
        sdist=$(ls "$CACHE"/llama_cpp_python-$LCPP_PY_VERSION.tar.gz /tmp/lcpp/llama_cpp_python-$LCPP_PY_VERSION.tar.gz \
            2>/dev/null | head -n1 || true)
        if [ -z "$sdist" ]; then
            log "downloading the llama-cpp-python $LCPP_PY_VERSION sdist (pip builds its metadata: slow once)"
            pip download --no-deps --no-binary :all: "llama-cpp-python==$LCPP_PY_VERSION" -d "$CACHE" >&2
            sdist=$CACHE/llama_cpp_python-$LCPP_PY_VERSION.tar.gz
        fi
        tar -xzf "$sdist" -C "$CACHE"
        src=$CACHE/llama_cpp_python-$LCPP_PY_VERSION/vendor/llama.cpp
    fi
    command -v cmake >/dev/null || { log "cmake missing: pip install cmake, or apt-get install -y cmake"; exit 1; }
    log "building llama-bench from $src"
    cmake -S "$src" -B "$CACHE/build" -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DCMAKE_BUILD_TYPE=Release >&2
    cmake --build "$CACHE/build" --target llama-bench -j"$(nproc)" >&2
}

mkdir -p "$CACHE"
if [ -z "${LLAMA_BENCH:-}" ]; then
    LLAMA_BENCH=$CACHE/build/bin/llama-bench
    [ -x "$LLAMA_BENCH" ] || build_llama_bench
fi
if [ -z "${BITNET:-}" ]; then
    log "building bitnet"
    (cd "$ROOT" && cargo build --release -p bitnet-cli >&2)
    BITNET=$ROOT/target/release/bitnet
fi

# --- models ------------------------------------------------------------------------------------------------------
if [ -z "${WORK:-}" ]; then
    WORK=$(mktemp -d /tmp/bitnet-bench.XXXXXX)
    trap 'rm -rf "$WORK"' EXIT
fi
mkdir -p "$WORK"

# Copy a GGUF with general.architecture "bitnet" and its `<arch>.` keys renamed; tensors byte for byte.
rename_arch() {
    python3 - "$1" "$2" <<'EOF'
import sys, gguf
src, dst = sys.argv[1:]
r = gguf.GGUFReader(src)
old = r.fields["general.architecture"].contents()
w = gguf.GGUFWriter(dst, arch="bitnet")
for f in r.fields.values():
    if f.name.startswith("GGUF.") or f.name == "general.architecture":
        continue
    key = "bitnet." + f.name[len(old) + 1:] if f.name.startswith(old + ".") else f.name
    sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
    w.add_key_value(key, f.contents(), f.types[0], sub_type=sub)
for t in r.tensors:
    w.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
w.write_header_to_file()
w.write_kv_data_to_file()
w.write_ti_data_to_file()
for t in r.tensors:
    w.write_tensor_data(t.data)
w.close()
EOF
}

if [ ! -f "$WORK/2b4t-tq1_0.gguf" ]; then
    log "writing the 2B4T-shaped HF folder"
    python3 "$ROOT/tests/scripts/make_2b4t_shape.py" "$WORK/hf" >&2
    "$BITNET" convert "$WORK/hf" -o "$WORK/2b4t-i2_s.gguf" --type i2_s >&2
    for ty in tq2_0 tq1_0; do
        "$BITNET" convert "$WORK/hf" -o "$WORK/tmp.gguf" --type $ty >&2
        rename_arch "$WORK/tmp.gguf" "$WORK/2b4t-$ty.gguf"
        rm "$WORK/tmp.gguf"
    done
    rm -rf "$WORK/hf"
fi

# --- machine -----------------------------------------------------------------------------------------------------
echo "Machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores," \
    "$(free -g | awk '/^Mem:/ {print $2}') GiB RAM;" \
    "flags: $(grep -o -w -E 'avx2|avx512f|avx512_vnni|avx_vnni' /proc/cpuinfo | sort -u | tr '\n' ' ')"
echo "llama-bench: $LLAMA_BENCH ($("$LLAMA_BENCH" --version 2>&1 | grep -m1 commit));" \
    "bitnet: $("$BITNET" --version), tree at $(git -C "$ROOT" rev-parse --short HEAD)" \
    "+ $(git -C "$ROOT" status --short -- engine native | wc -l) uncommitted engine/native files"
echo "Load average before the runs: $(cut -d' ' -f1-3 /proc/loadavg) (a busy shared machine makes every number noisy)"
echo

# --- runs: peers back to back, so both see the same machine load ------------------------------------------------
for t in $THREADS; do
    for ty in tq2_0 tq1_0; do
        f=$WORK/2b4t-$ty.gguf
        log "llama.cpp $ty t=$t"
        "$LLAMA_BENCH" -m "$f" -p "$PP" -n "$TG" -t "$t" -r "$REPS" -o json > "$WORK/llama-$ty-t$t.json"
        log "bitnet $ty t=$t"
        "$BITNET" bench --backend cpu -m "$f" -p "$PP" -n "$TG" -t "$t" -r "$REPS" --json \
            > "$WORK/bitnet-$ty-t$t.json"
    done
    log "bitnet i2_s t=$t"
    "$BITNET" bench --backend cpu -m "$WORK/2b4t-i2_s.gguf" -p "$PP" -n "$TG" -t "$t" -r "$REPS" --json \
        > "$WORK/bitnet-i2_s-t$t.json"
done

echo "Load average after the runs: $(cut -d' ' -f1-3 /proc/loadavg)"
echo

# --- table -------------------------------------------------------------------------------------------------------
python3 - "$WORK" "$THREADS" <<'EOF'
import json, sys
work, threads = sys.argv[1], sys.argv[2].split()
load = lambda p: json.load(open(f"{work}/{p}.json"))

def theirs(ty, t):
    runs = load(f"llama-{ty}-t{t}")
    pp, tg = (next(r for r in runs if (r["n_gen"] > 0) == gen) for gen in (False, True))
    return {"pp": (pp["n_prompt"], pp["avg_ts"], pp["stddev_ts"]),
            "tg": (tg["n_gen"], tg["avg_ts"], tg["stddev_ts"])}, runs[0]["build_commit"]

def ours(ty, t):
    r = load(f"bitnet-{ty}-t{t}")
    return {k: (r[k]["n"], r[k]["tps"], r[k]["sd"]) for k in ("pp", "tg")}, r.get("backend", r.get("kernels"))

fmt = lambda v: f"{v[1]:.2f} ± {v[2]:.2f}"
print("| threads | weights | test | llama.cpp t/s | bitnet t/s | bitnet / llama.cpp |")
print("|--:|---|---|--:|--:|--:|")
for t in threads:
    for ty in ("tq2_0", "tq1_0", "i2_s"):
        o, backend = ours(ty, t)
        # I2_S runs only in ours: compare it with llama.cpp's TQ2_0 (also 2 bits per weight).
        l, commit = theirs("tq2_0" if ty == "i2_s" else ty, t)
        label = f"{ty} (vs their tq2_0)" if ty == "i2_s" else ty
        for k in ("pp", "tg"):
            assert o[k][0] == l[k][0], "both engines must run the same test"
            print(f"| {t} | {label} | {k}{o[k][0]} | {fmt(l[k])} | {fmt(o[k])} | {o[k][1] / l[k][1]:.2f} |")
print(f"\nllama.cpp build {commit}; bitnet backend: {backend}")
EOF
