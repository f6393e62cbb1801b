#!/usr/bin/env python3
"""Tiny random BitNet b1.58 test models + independent references  ->  tests/fixtures/models/

    python3 tests/scripts/make_test_models.py [--keep-hf]          # ~20 s on 2 cores

Writes (deterministic, seeded):
  tiny-a/                 HF folder (transformers' packed "offline" BitNet format, like smolbit-135m)
  tiny-a-i2_s.gguf        arch bitnet-b1.58, ternary as I2_S (Microsoft's type 36), F16 token_embd, tied
  tiny-a-f32.gguf         same model, ternary-valued F32 weights (codes * scale), F32 token_embd
  tiny-a-f16.gguf         same model, ternary-valued F16 weights, F16 token_embd
  (tiny-b/                HF folder of tiny-b, untied lm_head: only with --keep-hf, not committed: size budget)
  tiny-b-tq2_0.gguf       arch bitnet (llama.cpp), TQ2_0 weights, untied F16 output.weight, pre = llama-bpe
  tiny-b-tq1_0.gguf       same model, TQ1_0
  tiny-b-scale.gguf       same model, BF16 weights holding the bare codes (+1/0/-1) and per-tensor
                          blk.N.<name>.scale F32 [1] tensors holding the scale
  references.json         prompt ids + last-position logits (HF transformers float32, numpy float64 and
                          float32 references reading each GGUF), stability flags, greedy continuations;
                          every reference rounds keys (after RoPE) and values to f16, as the engine's KV
                          cache stores them
All files of one model are the SAME model exactly: every per-tensor scale is an f16-representable number
(so F16 storage and TQ's f16 block scale d are exact) and the HF folder stores weight_scale = f32(1/scale)
(transformers divides by it), with f32(1/weight_scale) == scale checked.
See tests/fixtures/README.md for the formats and the reasons for the sizes.
"""
import gzip, json, os, sys, tempfile

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")      # transformers' BitNet helpers are @torch.compile'd

import numpy as np
import gguf
from safetensors.numpy import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import numpy_ref  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
OUT = os.path.join(ROOT, "tests", "fixtures", "models")
LLAMA3 = "/work/shared/tokenizers/llama3/tokenizer.json.gz"
K = 512                       # regular tokens kept from the Llama 3 vocabulary (+ 256 specials = 768)
N_SPECIAL = 256

# 2B4T-style chat template: BOS, then "Role: content<|eot_id|>" per message, generation prompt "Assistant: ".
CHAT_TEMPLATE = ("{% for message in messages %}{% if loop.first %}{{ bos_token }}{% endif %}"
                 "{{ message['role'] | capitalize + ': ' + message['content'] | trim + '<|eot_id|>' }}"
                 "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}")

MODELS = {
    # 2B4T-like: rows of 96 and 160 values are not multiples of 128, so I2_S rows straddle 128-blocks
    # (every tensor's element count is a multiple of 128); GQA 6 query heads over 2 kv heads.
    "tiny-a": dict(arch="bitnet-b1.58", n_embd=96, n_head=6, n_head_kv=2, n_ff=160, n_layer=2, ctx=256,
                   theta=10000.0, eps=1e-5, tied=True, pre=None, seed=1, emb_std=0.5, res_gain=3.0, commit_hf=True,
                   ggufs={"tiny-a-i2_s.gguf": "i2_s", "tiny-a-f32.gguf": "f32", "tiny-a-f16.gguf": "f16"}),
    # llama.cpp's `bitnet` arch: rows are multiples of 256 (TQ blocks), untied output, no activation key.
    "tiny-b": dict(arch="bitnet", n_embd=256, n_head=4, n_head_kv=4, n_ff=256, n_layer=1, ctx=256,
                   theta=10000.0, eps=1e-5, tied=False, pre="llama-bpe", seed=2, emb_std=0.3, res_gain=1.0, commit_hf=False,
                   ggufs={"tiny-b-tq2_0.gguf": "tq2_0", "tiny-b-tq1_0.gguf": "tq1_0",
                          "tiny-b-scale.gguf": "scale"}),
}
HF_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
            "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
            "ffn_down": "mlp.down_proj"}
NORM_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
              "attn_sub_norm": "self_attn.attn_sub_norm", "ffn_sub_norm": "mlp.ffn_sub_norm"}
# target output std of each BitLinear (inputs are normed); res_gain scales the two residual-branch outputs: a
# tied model whose blocks add little to the embedding just predicts its input token again.
GAIN = {"attn_q": 1.5, "attn_k": 1.5, "attn_v": 1.0, "attn_output": 1.0, "ffn_gate": 1.0, "ffn_up": 1.0,
        "ffn_down": 1.0}

PROMPTS = [  # (name, text, add_special_tokens)
    ("short", "Hello world", True),
    ("sentence", "The cat sat on the mat, and then it went to sleep.", True),
    ("special", "Question: is it raining?<|eot_id|>Answer: no<|end_of_text|>", True),
    ("long", "Once upon a time there was a little robot who lived by the sea, alone.", True),
    ("chat", None, False),   # rendered from CHAT_MESSAGES with the model's template (BOS comes from it)
]
CHAT_MESSAGES = [{"role": "system", "content": "You are a helpful assistant."},
                 {"role": "user", "content": "Hi! What is two plus two?"}]
N_GREEDY = 10
# Stability probe: float32 runs whose BitLinear inputs get a random relative perturbation of up to NOISE_REL
# (~2 float32 ulps, like another summation order) must all stay within STABLE_TOL of float64.
N_NOISE, NOISE_REL, STABLE_TOL = 4, 2.4e-7, 1e-4


# ---------------------------------------------------------------------------------------------- vocabulary
def cut_vocab():
    """Llama 3 vocabulary cut to the first K regular tokens, the merges whose parts and result are < K, and
    the 256 specials renumbered to K..K+255. Returns (tokenizer.json dict, tokens, merges, special ids)."""
    t = json.load(gzip.open(LLAMA3))
    voc = t["model"]["vocab"]
    tokens = [None] * K
    for s, i in voc.items():
        if i < K:
            tokens[i] = s
    merges = [m for m in t["model"]["merges"]
              if voc[m[0]] < K and voc[m[1]] < K and voc.get(m[0] + m[1], K) < K]
    specials = []
    for a in t["added_tokens"]:
        a = dict(a, id=a["id"] - 128000 + K)
        specials.append(a)
    assert [a["id"] for a in specials] == list(range(K, K + N_SPECIAL))
    t["model"]["vocab"] = {s: i for i, s in enumerate(tokens)}
    t["model"]["merges"] = merges
    t["added_tokens"] = specials
    for p in t["post_processor"]["processors"]:
        if p["type"] == "TemplateProcessing":
            for st in p["special_tokens"].values():
                st["ids"] = [i - 128000 + K for i in st["ids"]]
    tokens = tokens + [a["content"] for a in specials]
    sid = {a["content"]: a["id"] for a in specials}
    return t, tokens, merges, sid


# ---------------------------------------------------------------------------------------------- weights
def pick_scale(rng, target):
    """An f16-representable scale near `target` (not a power of two) whose f32 reciprocal round-trips,
    so F16/TQ storage is exact and the HF weight_scale = f32(1/s) describes the same model."""
    s = np.float16(target * rng.uniform(0.85, 1.15))
    while True:
        s32 = np.float32(s)
        ws = np.float32(1.0) / s32
        frac = float(np.frexp(s32)[0])
        if np.float32(1.0) / ws == s32 and frac != 0.5:
            return float(s32)
        s = np.nextafter(s, np.float16(np.inf))


def make_weights(c, V):
    rng = np.random.default_rng(c["seed"])
    E, F, D = c["n_embd"], c["n_ff"], c["n_embd"] // c["n_head"]
    shapes = {"attn_q": (c["n_head"] * D, E), "attn_k": (c["n_head_kv"] * D, E),
              "attn_v": (c["n_head_kv"] * D, E), "attn_output": (E, c["n_head"] * D),
              "ffn_gate": (F, E), "ffn_up": (F, E), "ffn_down": (E, F)}
    w = {"emb": rng.normal(0, c["emb_std"], (V, E)).astype(np.float16)}
    if not c["tied"]:
        w["out"] = rng.normal(0, c["emb_std"], (V, E)).astype(np.float16)
    norm = lambda n: (1.0 + 0.15 * rng.standard_normal(n)).astype(np.float32)
    w["out_norm"] = norm(E)
    w["layers"] = []
    for _ in range(c["n_layer"]):
        ly = {"attn_norm": norm(E), "attn_sub_norm": norm(E), "ffn_norm": norm(E), "ffn_sub_norm": norm(F)}
        for k, (o, i) in shapes.items():
            assert (o * i) % 128 == 0 and o % 4 == 0, (k, o, i)
            codes = rng.integers(-1, 2, (o, i)).astype(np.int8)       # uniform over {-1, 0, 1}: 1/3 zeros
            gain = GAIN[k] * (c["res_gain"] if k in ("attn_output", "ffn_down") else 1.0)
            ly[k] = (codes, pick_scale(rng, gain / np.sqrt(2.0 / 3.0 * i)))
        w["layers"].append(ly)
    return w


# ---------------------------------------------------------------------------------------------- HF folder
def pack_hf(codes):
    """transformers' pack_weights: (out, in) codes -> uint8 (out/4, in), rows r, r+R, r+2R, r+3R at bits 0,2,4,6."""
    u = (codes + 1).astype(np.uint8)
    R = codes.shape[0] // 4
    return u[:R] | u[R:2 * R] << 2 | u[2 * R:3 * R] << 4 | u[3 * R:] << 6


def write_hf(c, w, tok_json, sid, folder):
    os.makedirs(folder, exist_ok=True)
    V, E = w["emb"].shape
    t = {"model.embed_tokens.weight": w["emb"], "model.norm.weight": w["out_norm"]}
    if not c["tied"]:
        t["lm_head.weight"] = w["out"]
    for i, ly in enumerate(w["layers"]):
        p = f"model.layers.{i}."
        for k, hn in NORM_NAMES.items():
            t[p + hn + ".weight"] = ly[k]
        for k, hn in HF_NAMES.items():
            codes, s = ly[k]
            t[p + hn + ".weight"] = pack_hf(codes)
            t[p + hn + ".weight_scale"] = np.array([np.float32(1.0) / np.float32(s)], dtype=np.float32)
    save_file(t, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    bos, eos, eot = sid["<|begin_of_text|>"], sid["<|end_of_text|>"], sid["<|eot_id|>"]
    cfg = {"architectures": ["BitNetForCausalLM"], "model_type": "bitnet", "vocab_size": V, "hidden_size": E,
           "intermediate_size": c["n_ff"], "num_hidden_layers": c["n_layer"],
           "num_attention_heads": c["n_head"], "num_key_value_heads": c["n_head_kv"],
           "head_dim": E // c["n_head"], "hidden_act": "relu2", "max_position_embeddings": c["ctx"],
           "rms_norm_eps": c["eps"], "rope_theta": c["theta"], "rope_scaling": None, "attention_bias": False,
           "attention_dropout": 0.0, "mlp_bias": False, "tie_word_embeddings": c["tied"],
           "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": eos, "torch_dtype": "float16",
           "quantization_config": {"quant_method": "bitnet", "linear_class": "bitlinear",
                                   "quantization_mode": "offline"}}
    dump = lambda obj, name: json.dump(obj, open(os.path.join(folder, name), "w"), indent=2, ensure_ascii=False)
    dump(cfg, "config.json")
    dump({"bos_token_id": bos, "eos_token_id": [eos, eot], "pad_token_id": eos, "do_sample": False},
         "generation_config.json")
    dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
          "eos_token": "<|end_of_text|>", "pad_token": "<|end_of_text|>", "clean_up_tokenization_spaces": False,
          "model_max_length": c["ctx"], "chat_template": CHAT_TEMPLATE}, "tokenizer_config.json")
    with open(os.path.join(folder, "tokenizer.json"), "w") as f:
        json.dump(tok_json, f, ensure_ascii=False, separators=(",", ":"))


# ---------------------------------------------------------------------------------------------- GGUF
def pack_i2_s(codes, scale):
    """I2_S x86 layout over the flattened tensor: byte j of a 128-block holds elements j, 32+j, 64+j, 96+j at
    bits 7:6, 5:4, 3:2, 1:0 as code + 1; then 32 bytes: f32 scale (the multiplier) and zero padding."""
    u = (codes.reshape(-1, 4, 32) + 1).astype(np.uint8)                 # (block, group, j)
    packed = u[:, 0] << 6 | u[:, 1] << 4 | u[:, 2] << 2 | u[:, 3]
    tail = np.zeros(32, dtype=np.uint8)
    tail[:4] = np.frombuffer(np.float32(scale).tobytes(), dtype=np.uint8)
    return np.concatenate([packed.reshape(-1), tail])


FILE_TYPE = {"i2_s": 40, "f32": 0, "f16": 1, "tq1_0": 36, "tq2_0": 37, "scale": 32}


def write_gguf(c, w, kind, tokens, merges, sid, path):
    arch = c["arch"]
    V, E = w["emb"].shape
    wr = gguf.GGUFWriter(path, arch)
    wr.add_name(os.path.basename(path)[:-5])
    wr.add_vocab_size(V)
    wr.add_context_length(c["ctx"])
    wr.add_embedding_length(E)
    wr.add_block_count(c["n_layer"])
    wr.add_feed_forward_length(c["n_ff"])
    wr.add_rope_dimension_count(E // c["n_head"])
    wr.add_head_count(c["n_head"])
    wr.add_head_count_kv(c["n_head_kv"])
    wr.add_layer_norm_rms_eps(c["eps"])
    wr.add_rope_freq_base(c["theta"])
    wr.add_file_type(FILE_TYPE[kind])
    wr.add_tokenizer_model("gpt2")
    if c["pre"]:
        wr.add_tokenizer_pre(c["pre"])
    wr.add_token_list(tokens)
    if arch == "bitnet-b1.58":
        wr.add_token_scores([0.0] * V)               # Microsoft's 2B4T file carries scores; llama.cpp's don't
    wr.add_token_types([1] * K + [3] * N_SPECIAL)    # normal, then control
    wr.add_token_merges([f"{a} {b}" for a, b in merges])
    wr.add_bos_token_id(sid["<|begin_of_text|>"])
    wr.add_eos_token_id(sid["<|end_of_text|>"])
    if arch == "bitnet":
        wr.add_eot_token_id(sid["<|eot_id|>"])
    wr.add_pad_token_id(sid["<|end_of_text|>"])
    wr.add_add_bos_token(True)
    wr.add_chat_template(CHAT_TEMPLATE)
    if kind not in ("f32", "f16", "scale"):
        wr.add_quantization_version(gguf.GGML_QUANT_VERSION)

    ftype = np.float32 if kind == "f32" else np.float16
    wr.add_tensor("token_embd.weight", w["emb"].astype(ftype))
    for i, ly in enumerate(w["layers"]):
        p = f"blk.{i}."
        for k in ("attn_norm", "attn_sub_norm", "ffn_norm", "ffn_sub_norm"):
            wr.add_tensor(p + k + ".weight", ly[k])
        for k in HF_NAMES:
            codes, s = ly[k]
            name = p + k + ".weight"
            vals = codes.astype(np.float32) * np.float32(s)                 # ternary-valued, exact
            if kind == "i2_s":   # gguf-py has no type 36: raw bytes (int8 keeps the shape as given)
                wr.add_tensor(name, pack_i2_s(codes, s).view(np.int8), raw_shape=codes.shape,
                              raw_dtype=numpy_ref.I2_S)
            elif kind in ("f32", "f16"):
                wr.add_tensor(name, vals.astype(ftype))
            elif kind in ("tq1_0", "tq2_0"):
                qt = gguf.GGMLQuantizationType[kind.upper()]
                wr.add_tensor(name, gguf.quants.quantize(vals, qt), raw_dtype=qt)
            elif kind == "scale":
                qt = gguf.GGMLQuantizationType.BF16
                wr.add_tensor(name, gguf.quants.quantize(codes.astype(np.float32), qt), raw_dtype=qt)
                wr.add_tensor(p + k + ".scale", np.array([s], dtype=np.float32))
    wr.add_tensor("output_norm.weight", w["out_norm"])
    if not c["tied"]:
        wr.add_tensor("output.weight", w["out"])
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()


def check_gguf(path, c, w):
    """Parse with gguf.GGUFReader (I2_S registered) and decode every tensor back to the generator's weights."""
    m = numpy_ref.GgufModel(path)
    assert (m.n_embd, m.n_head, m.n_kv, m.n_ff, m.n_layer) == (c["n_embd"], c["n_head"], c["n_head_kv"],
                                                              c["n_ff"], c["n_layer"])
    assert np.array_equal(m.emb, w["emb"].astype(np.float64))
    assert (m.out is m.emb) == c["tied"]
    for ly, ref in zip(m.layers, w["layers"]):
        for k in HF_NAMES:
            assert np.array_equal(ly[k][0], ref[k][0]) and ly[k][1] == ref[k][1], (path, k)
    # the TQ decoders above are independent of gguf-py's; they must agree with its dequantizer too
    r = numpy_ref.read_gguf(path)
    for t in r.tensors:
        if int(t.tensor_type) in (34, 35):
            deq = gguf.quants.dequantize(t.data, gguf.GGMLQuantizationType(int(t.tensor_type)))
            codes, s = numpy_ref.decode_ternary(r, t)
            assert np.array_equal(deq.reshape(codes.shape).astype(np.float64), codes * s), t.name
    return m


# ---------------------------------------------------------------------------------------------- references
def hf_logits(folder, ids_list):
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.models.bitnet import modeling_bitnet
    eager = modeling_bitnet.eager_attention_forward

    def f16_cache_attention(module, query, key, value, *args, **kwargs):
        # The engine's KV cache holds f16: round keys (after RoPE) and values as it stores them.
        return eager(module, query, key.to(torch.float16).float(), value.to(torch.float16).float(), *args, **kwargs)

    modeling_bitnet.eager_attention_forward = f16_cache_attention   # looked up at each call
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    out = []
    with torch.no_grad():
        for ids in ids_list:
            out.append(hf(torch.tensor([ids])).logits[0, -1].double().numpy())
    return out


def r6(a):
    return [round(float(x), 6) for x in a]


def main():
    from transformers import AutoTokenizer
    os.makedirs(OUT, exist_ok=True)
    tok_json, tokens, merges, sid = cut_vocab()
    V = len(tokens)
    refs = {"generator": f"tests/scripts/make_test_models.py (numpy {np.__version__}, gguf-py, transformers)",
            "vocab": {"n_vocab": V, "n_regular": K, "n_merges": len(merges), "bos": sid["<|begin_of_text|>"],
                      "eos": sid["<|end_of_text|>"], "eot": sid["<|eot_id|>"]},
            "models": {}, "files": {}}
    table = []
    ok = True
    tmp = tempfile.TemporaryDirectory()
    for name, c in MODELS.items():
        w = make_weights(c, V)
        # tiny-b's HF folder (0.95 MB) does not fit the fixture budget: by default it lives in a temporary
        # directory just long enough for the transformers reference; --keep-hf writes it beside the others.
        keep = c["commit_hf"] or "--keep-hf" in sys.argv
        folder = os.path.join(OUT, name) if keep else os.path.join(tmp.name, name)
        write_hf(c, w, tok_json, sid, folder)
        tok = AutoTokenizer.from_pretrained(folder)
        cases = []
        for pname, text, add_special in PROMPTS:
            if text is None:
                text = tok.apply_chat_template(CHAT_MESSAGES, tokenize=False, add_generation_prompt=True)
            ids = tok(text, add_special_tokens=add_special)["input_ids"]
            cases.append({"name": pname, "text": text, "add_special": add_special, "ids": ids})
        hf = hf_logits(folder, [cs["ids"] for cs in cases])

        first = None
        for fname, kind in c["ggufs"].items():
            path = os.path.join(OUT, fname)
            write_gguf(c, w, kind, tokens, merges, sid, path)
            m = check_gguf(path, c, w)
            f64, f32 = numpy_ref.Forward(m, np.float64), numpy_ref.Forward(m, np.float32)
            noisy = [numpy_ref.Forward(m, np.float32, (seed, NOISE_REL)) for seed in range(N_NOISE)]
            res = []
            for cs in cases:
                a = f64(cs["ids"])[-1]
                margin = f64.last_margin()
                dn = [float(np.abs(a - fn(cs["ids"])[-1]).max()) for fn in noisy]
                res.append((a, (margin, dn), f32(cs["ids"])[-1].astype(np.float64)))
            if first is None:
                first = res
            else:   # every file of a model must give bit-identical reference logits
                for (a, _, b), (a0, _, b0) in zip(res, first):
                    ok &= bool(np.array_equal(a, a0) and np.array_equal(b, b0))
            refs["files"][fname] = {"model": name, "kind": kind, "bytes": os.path.getsize(path),
                                    "tensor_types": sorted({gguf_type_name(t) for t in m.tensor_types.values()})}

        m = numpy_ref.GgufModel(os.path.join(OUT, next(iter(c["ggufs"]))))
        f64 = numpy_ref.Forward(m, np.float64)
        for cs, (a, (margin, dn), b), h in zip(cases, first, hf):
            d32 = float(np.abs(a - b).max())
            dhf = float(np.abs(a - h).max())
            stable = d32 < STABLE_TOL and max(dn) < STABLE_TOL
            g, gaps = numpy_ref.greedy(f64, cs["ids"], N_GREEDY)
            top1_same = int(a.argmax()) == int(h.argmax()) == int(b.argmax())
            ok &= top1_same and (dhf < 1e-3 if stable else True)
            cs.update({"stable": stable, "max_abs_f64_vs_f32": d32, "max_abs_f64_vs_hf": dhf,
                       "max_abs_f64_vs_perturbed": max(dn), "round_margin": margin, "logit_std": float(a.std()), "top1": int(a.argmax()),
                       "greedy": g, "greedy_gaps": [round(x, 6) for x in gaps],
                       "logits_f64": r6(a), "logits_f32": r6(b), "logits_hf": r6(h)})
            table.append((name, cs["name"], len(cs["ids"]), stable, d32, max(dn), dhf, margin, top1_same))
        conf = {k: v for k, v in c.items() if k not in ("ggufs", "seed", "emb_std", "res_gain", "commit_hf")}
        conf["head_dim"] = c["n_embd"] // c["n_head"]
        refs["models"][name] = {"config": conf,
                                "n_vocab": V, "hf_folder": name if c["commit_hf"] else None, "ggufs": list(c["ggufs"]), "cases": cases}

    with open(os.path.join(OUT, "references.json"), "w") as f:
        json.dump(refs, f, ensure_ascii=False, separators=(",", ":"))
    print(f"{'model':8} {'case':9} {'T':>3} {'stable':6} {'|f64-f32|':>10} {'|f64-pert|':>10} {'|f64-HF|':>10} "
          f"{'margin':>9} top1")
    for r in table:
        print(f"{r[0]:8} {r[1]:9} {r[2]:3d} {str(r[3]):6} {r[4]:10.2e} {r[5]:10.2e} {r[6]:10.2e} {r[7]:9.2e} "
              f"{'same' if r[8] else 'DIFF'}")
    total = 0
    for dp, _, fs in os.walk(OUT):
        for fn in fs:
            total += os.path.getsize(os.path.join(dp, fn))
    print(f"fixtures/models: {total / 1e6:.2f} MB")
    print("CHECK", "PASSED" if ok else "FAILED")
    sys.exit(0 if ok else 1)


def gguf_type_name(ty):
    return "I2_S" if ty == numpy_ref.I2_S else gguf.GGMLQuantizationType(ty).name


if __name__ == "__main__":
    main()
