#!/usr/bin/env python3
"""A BitNet b1.58 2B4T-shaped model with random ternary weights, as a Hugging Face folder (for speed benchmarks).

    python3 tests/scripts/make_2b4t_shape.py OUT_DIR [--seed 0] [--layers 30]     # ~1.2 GB, ~30 s

Same shapes, dtypes and file layout as microsoft/bitnet-b1.58-2B4T (Microsoft's packed "offline" format, like
/work/shared/models/smolbit-135m), so `bitnet convert` turns it into GGUFs of exactly the published model's size:
  config.json             arch bitnet: vocab 128256, embd 2560, 30 layers, ff 6912, 20 heads / 5 kv heads (dim 128),
                          rope theta 500000, context 4096, relu2, tied embedding, quantization_config bitnet/offline
  model.safetensors       per linear: uint8 (out/4, in), 4 rows per byte (rows i, i+R, i+2R, i+3R at bits 0,2,4,6),
                          2-bit codes 0..2 (= ternary + 1, never 3), plus an f32 weight_scale [1] (transformers
                          divides by it; a power of two); f16 embedding 128256 x 2560; f32 norms close to 1
  tokenizer.json          the real Llama 3 tokenizer (/work/shared/tokenizers/llama3), + tokenizer_config.json
The weights are noise: the model's text is gibberish, its speed is the real model's. Tensors are generated and
written one at a time (the safetensors header is computed first), so memory stays well under 1 GB. Standard
library only (the GPU machine has no numpy): random bytes mapped through byte tables.
"""
import argparse, gzip, json, math, os, random, shutil, struct

LLAMA3 = os.environ.get("LLAMA3_TOKENIZER", "/work/shared/tokenizers/llama3")
N_VOCAB, N_EMBD, N_FF, N_HEAD, N_HEAD_KV, HEAD_DIM = 128256, 2560, 6912, 20, 5, 128
EMBD_CHUNK_ROWS = 8192                    # embedding rows generated at a time (42 MB)

# Every byte whose four 2-bit fields are valid codes (0, 1, 2): random bytes mapped onto these 81 give four
# ternary weights each (close to uniform: 256 is not a multiple of 81).
VALID_BYTES = [a | b << 2 | c << 4 | d << 6 for a in range(3) for b in range(3) for c in range(3) for d in range(3)]
TO_CODES = bytes(VALID_BYTES[b % 81] for b in range(256))
# An f16's high byte (sign, 5 exponent bits, 2 mantissa bits) kept as the sign and the top mantissa bits with
# the exponent of 2^-6: random bytes become values of magnitude 0.016-0.031, of either sign.
TO_SMALL_F16 = bytes((b & 0x83) | (9 << 2) for b in range(256))


def config(n_layer):
    return {
        "architectures": ["BitNetForCausalLM"],
        "model_type": "bitnet",
        "vocab_size": N_VOCAB,
        "hidden_size": N_EMBD,
        "intermediate_size": N_FF,
        "num_hidden_layers": n_layer,
        "num_attention_heads": N_HEAD,
        "num_key_value_heads": N_HEAD_KV,
        "head_dim": HEAD_DIM,
        "hidden_act": "relu2",
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-05,
        "rope_theta": 500000.0,
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": True,
        "bos_token_id": 128000,
        "eos_token_id": 128001,
        "torch_dtype": "float16",
        "quantization_config": {"quant_method": "bitnet", "linear_class": "bitlinear",
                                "quantization_mode": "offline"},
    }


def tensor_plan(n_layer):
    """(name, safetensors dtype, shape, generator kind) of every tensor, in file order."""
    plan = [("model.embed_tokens.weight", "F16", (N_VOCAB, N_EMBD), "embd")]
    kv = N_HEAD_KV * HEAD_DIM
    linears = [("self_attn.q_proj", N_HEAD * HEAD_DIM, N_EMBD), ("self_attn.k_proj", kv, N_EMBD),
               ("self_attn.v_proj", kv, N_EMBD), ("self_attn.o_proj", N_EMBD, N_HEAD * HEAD_DIM),
               ("mlp.gate_proj", N_FF, N_EMBD), ("mlp.up_proj", N_FF, N_EMBD), ("mlp.down_proj", N_EMBD, N_FF)]
    for i in range(n_layer):
        p = f"model.layers.{i}."
        for name, out, inp in linears:
            plan.append((p + name + ".weight", "U8", (out // 4, inp), "codes"))
            plan.append((p + name + ".weight_scale", "F32", (1,), f"scale:{inp}"))
        plan += [(p + "input_layernorm.weight", "F32", (N_EMBD,), "norm"),
                 (p + "post_attention_layernorm.weight", "F32", (N_EMBD,), "norm"),
                 (p + "self_attn.attn_sub_norm.weight", "F32", (N_EMBD,), "norm"),
                 (p + "mlp.ffn_sub_norm.weight", "F32", (N_FF,), "norm")]
    plan.append(("model.norm.weight", "F32", (N_EMBD,), "norm"))
    return plan


ITEM = {"F16": 2, "F32": 4, "U8": 1}


def chunks(kind, shape, rng):
    """The tensor's bytes, in pieces small enough to keep memory low."""
    if kind == "embd":
        for r in range(0, shape[0], EMBD_CHUNK_ROWS):
            b = bytearray(rng.randbytes(2 * min(EMBD_CHUNK_ROWS, shape[0] - r) * shape[1]))
            b[1::2] = b[1::2].translate(TO_SMALL_F16)
            yield bytes(b)
    elif kind == "codes":
        yield rng.randbytes(math.prod(shape)).translate(TO_CODES)
    elif kind == "norm":
        yield struct.pack(f"<{shape[0]}f", *(1.0 + 0.05 * rng.gauss() for _ in range(shape[0])))
    else:
        # weight_scale divides the output: about sqrt(in * 2/3) (the std of a sum of `in` random ternary
        # products) keeps each layer's output on the scale of its input through 30 layers. A power of two, so
        # the GGUF scale 1/weight_scale is exact in f16 too (TQ block scales): every GGUF is the same model.
        n_in = int(kind.split(":")[1])
        yield struct.pack("<f", 2.0 ** round(math.log2(math.sqrt(n_in * 2 / 3))))


def write_safetensors(path, plan, rng):
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, dtype, shape, _ in plan:
        size = math.prod(shape) * ITEM[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)               # safetensors pads the header to 8 bytes with spaces
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little"))
        f.write(head)
        for name, dtype, shape, kind in plan:
            start = f.tell()
            for piece in chunks(kind, shape, rng):
                f.write(piece)
            assert f.tell() - start == math.prod(shape) * ITEM[dtype], name
    return offset


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layers", type=int, default=30, help="fewer layers for a quick smoke test (default 30)")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "config.json"), "w") as f:
        json.dump(config(a.layers), f, indent=2)
    with gzip.open(os.path.join(LLAMA3, "tokenizer.json.gz"), "rb") as src, \
            open(os.path.join(a.out, "tokenizer.json"), "wb") as dst:
        shutil.copyfileobj(src, dst)
    name = "tokenizer_config.json"
    shutil.copyfile(os.path.join(LLAMA3, name), os.path.join(a.out, name))
    n = write_safetensors(os.path.join(a.out, "model.safetensors"), tensor_plan(a.layers),
                          random.Random(a.seed))
    print(f"{a.out}: {a.layers} layers, {n / 1e9:.3f} GB of tensors")


if __name__ == "__main__":
    main()
