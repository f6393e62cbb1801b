#!/usr/bin/env python3
"""llama.cpp's logits on our family fixtures: does upstream llama.cpp read the TQ files we write?

Usage: LLAMA_CPP=<llama.cpp source with build/bin/libllama.so> LLAMA_CPP_PY=<llama-cpp-python 0.3.36 sdist dir> \
       BITNET=<bitnet binary> python3 tests/scripts/make_llamacpp_refs.py
Writes tests/fixtures/models/references_llamacpp.json (tests/models.rs compares the engine with it; CI needs no
llama.cpp). Made with ggml-org/llama.cpp@0c1e57098 as vendored by llama-cpp-python 0.3.36, CPU, 1 thread.

Files llama.cpp can load are the TQ1_0/TQ2_0 ones (I2_S is not an upstream type) with a graph that matches the
model: fam-llama3-tq2_0.gguf (arch `llama`) as committed, and the same file repacked to TQ1_0 by `bitnet quantize`
(made here in a temporary directory; the test repacks it the same way). The other fixtures are refused or run with
the wrong graph (see tests/fixtures/README.md, "llama.cpp").

Both sides run with an f32 KV cache (llama.cpp type_k = type_v = 0, ours `--kv-type f32`) so that the only
differences are llama.cpp's own activation handling: Q8_K blocks of 256 values for the TQ matmuls (one block = one
whole row here, since every ternary row of this model is 256 wide) and f16 activations for the F16 LM head.
"""
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

LLAMA_CPP, LLAMA_CPP_PY, BITNET = os.environ["LLAMA_CPP"], os.environ["LLAMA_CPP_PY"], os.environ["BITNET"]
MODELS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures", "models")
SOURCE = "fam-llama3-tq2_0.gguf"
CASES = ["short", "sentence", "special", "chat"]  # prompts of references_families.json (ids only)
TOP = 24  # logits kept per case: the top TOP of llama.cpp's last position, rounded to 5 decimals


def llama_logits(path, tokens):
    """llama.cpp's last-position logits (CPU, 1 thread, f32 KV cache), in a child process per run."""
    code = f"""
import json, sys
sys.path.insert(0, {LLAMA_CPP_PY!r})
import llama_cpp
m = llama_cpp.Llama({path!r}, n_ctx=128, n_batch=128, logits_all=True, n_threads=1, verbose=False,
                    type_k=0, type_v=0, flash_attn=False)
m.eval({tokens!r})
print(json.dumps(m.scores[{len(tokens) - 1}].tolist()))
"""
    env = dict(os.environ, LLAMA_CPP_LIB_PATH=os.path.join(LLAMA_CPP, "build", "bin"))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"llama.cpp refused {path}:\n{out.stderr[-2000:]}")
    return np.array(json.loads(out.stdout.strip().splitlines()[-1]))


def engine_logits(path, tokens):
    out = subprocess.run([BITNET, "logits", "-m", path, "--tokens", ",".join(map(str, tokens)), "--all", "--json",
                          "--kv-type", "f32", "-t", "1"], capture_output=True, text=True, check=True)
    return np.array(json.loads(out.stdout)["logits"])


def main():
    fam = json.load(open(os.path.join(MODELS, "references_families.json")))
    cases = {c["name"]: c for c in fam["models"]["fam-llama3"]["cases"]}
    files = {}
    with tempfile.TemporaryDirectory() as tmp:
        tq1 = os.path.join(tmp, "fam-llama3-tq1_0.gguf")
        subprocess.run([BITNET, "quantize", "--type", "tq1_0", os.path.join(MODELS, SOURCE), tq1], check=True,
                       capture_output=True)
        for name, path, how in [(SOURCE, os.path.join(MODELS, SOURCE), "as committed"),
                                ("fam-llama3-tq1_0.gguf", tq1, f"bitnet quantize --type tq1_0 {SOURCE}")]:
            out = []
            for cname in CASES:
                ids = cases[cname]["ids"]
                lc, ours = llama_logits(path, ids), engine_logits(path, ids)
                order = np.argsort(-lc)
                top = [[int(i), round(float(lc[i]), 5)] for i in order[:TOP]]
                d = float(np.abs(lc - ours).max())
                print(f"{name:24} {cname:9} n={len(ids):3} top1 llama {order[0]} ours {int(np.argmax(ours))} "
                      f"gap {lc[order[0]] - lc[order[1]]:.4f}  max|Δ| all logits {d:.2e}  logit std {lc.std():.2f}")
                out.append({"name": cname, "ids": ids, "top": top, "max_abs_vs_engine": float(f"{d:.3g}")})
            files[name] = {"made_by": how, "cases": out}
    doc = {"generator": "tests/scripts/make_llamacpp_refs.py (llama.cpp 0c1e57098 via llama-cpp-python 0.3.36, "
                        "CPU, 1 thread, f32 KV cache)", "top": TOP, "files": files}
    with open(os.path.join(MODELS, "references_llamacpp.json"), "w") as f:
        f.write("{\n")
        f.write(f' "generator": {json.dumps(doc["generator"])},\n "top": {TOP},\n "files": {{\n')
        for k, (name, v) in enumerate(files.items()):
            f.write(f'  {json.dumps(name)}: {{"made_by": {json.dumps(v["made_by"])}, "cases": [\n')
            for j, c in enumerate(v["cases"]):
                f.write(f'   {{"name": {json.dumps(c["name"])}, "max_abs_vs_engine": {c["max_abs_vs_engine"]},\n')
                f.write(f'    "ids": {json.dumps(c["ids"])},\n')
                # the top list, 6 pairs a line
                rows = [json.dumps(c["top"][i:i + 6])[1:-1] for i in range(0, TOP, 6)]
                f.write('    "top": [\n     ' + ",\n     ".join(rows) + "]}")
                f.write(",\n" if j + 1 < len(v["cases"]) else "\n")
            f.write("  ]}" + (",\n" if k + 1 < len(files) else "\n"))
        f.write(" }\n}\n")
    json.load(open(os.path.join(MODELS, "references_llamacpp.json")))  # well-formed


if __name__ == "__main__":
    main()
