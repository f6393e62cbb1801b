"""References for `--kv-type f32` (the exact KV cache) and `--kv-type q8_0`: the numpy reference with keys and
values kept as computed, or stored as Q8_0 blocks, on every fixture model and prompt of references.json.
Writes references_kv.json: {kv type: {model: [{name, ids, stable, logits_f64}]}}, `stable` as
make_test_models.py decides it (float64 and float32 agree, and so do float32 runs with ~1 ulp of noise on
every BitLinear input: no rounding can flip). q8_0 is skipped for models whose head dim is not a multiple of 32.

Needs numpy and gguf (pip install numpy gguf); reads the committed fixture GGUFs only.
"""
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import numpy_ref  # noqa: E402

OUT = os.path.join(os.path.dirname(__file__), "..", "fixtures", "models")
N_NOISE, NOISE_REL, STABLE_TOL = 4, 2.4e-7, 1e-4   # as make_test_models.py


def main():
    refs = json.load(open(os.path.join(OUT, "references.json")))
    out = {"f32": {}, "q8_0": {}}
    for kv, name in [(kv, name) for kv in out for name in refs["models"]]:
        model = refs["models"][name]
        path = os.path.join(OUT, next(f for f, i in refs["files"].items() if i["model"] == name))
        m = numpy_ref.GgufModel(path)
        if kv == "q8_0" and m.head_dim % 32:
            continue
        f64 = numpy_ref.Forward(m, np.float64, kv=kv)
        f32 = numpy_ref.Forward(m, np.float32, kv=kv)
        noisy = [numpy_ref.Forward(m, np.float32, (seed, NOISE_REL), kv=kv) for seed in range(N_NOISE)]
        cases = []
        for cs in model["cases"]:
            a = f64(cs["ids"])[-1]
            d32 = float(np.abs(a - f32(cs["ids"])[-1]).max())
            dn = max(float(np.abs(a - fn(cs["ids"])[-1]).max()) for fn in noisy)
            stable = d32 < STABLE_TOL and dn < STABLE_TOL
            cases.append({"name": cs["name"], "ids": cs["ids"], "stable": stable,
                          "logits_f64": [round(float(x), 6) for x in a]})
            print(f"{kv:5} {name:8} {cs['name']:9} stable {stable!s:5} |f64-f32| {d32:.2e} |f64-noisy| {dn:.2e}")
        out[kv][name] = cases
    with open(os.path.join(OUT, "references_kv.json"), "w") as f:
        json.dump(out, f, separators=(",", ":"))


if __name__ == "__main__":
    main()
