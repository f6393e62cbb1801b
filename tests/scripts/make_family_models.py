#!/usr/bin/env python3
"""Tiny random models of the BitNet b1.58 families besides 2B4T (issue 17), each in its family's GGUF layout,
with references from the independent numpy implementation (numpy_ref.py) and Hugging Face tokenizers.

  fam-1bitllm   1bitLLM bitnet_b1_58 as llama.cpp's converter writes it: arch `bitnet`, attn/ffn sub-norms, no
                activation key (SiLU follows from the SentencePiece vocabulary), `tokenizer.ggml.model = llama`
                (607 pieces of the LLaMA vocabulary with their scores and types: <unk>, <s>, </s>, the 256
                <0xNN> byte pieces, the next 253 pieces and the single characters ▁ and printable ASCII), tied. Rows of 160: not a multiple of 256
                (like the 3B's 3200), so only I2_S and float storage can hold it. No chat template (base model).
  fam-llama3    Llama3-8B-1.58 as llama.cpp's converter writes LlamaForCausalLM + quantization_config bitnet:
                arch `llama`, no sub-norms, q/k rows permuted for llama.cpp's interleaved RoPE, Llama 3 BPE
                (`llama-bpe`), TQ2_0 projections, rope theta 500000, GQA.
  fam-falcone   Falcon-E / Falcon3-1.58bit style: arch `llama`, I2_S projections (rows of 96 straddle I2_S blocks)
                and the same model as ternary-valued F16, untied F16 output head, ChatML template, BPE vocabulary
                with `tokenizer.ggml.pre = falcon3` (llama.cpp: the Llama 3 split), no BOS.

The vocabularies of the BPE models are make_test_models.py's cut of the Llama 3 vocabulary (768 tokens); the
Falcon-E one renames two reserved specials to <|im_start|> and <|im_end|>. Weights: make_test_models.py's
generator (codes uniform in {-1,0,1}, f16-exact scales). The numpy reference reads each GGUF back; for arch
`llama` it applies llama.cpp's adjacent-pair RoPE to the file's permuted rows (the engine undoes the permutation
and rotates NeoX pairs: the two must agree). Cases, stability flags and greedy continuations as in
make_test_models.py; chat prompts rendered by transformers' apply_chat_template from the template string.

Usage: python3 tests/scripts/make_family_models.py   (writes tests/fixtures/models/fam-*.gguf and
references_families.json; exits 1 unless "CHECK PASSED")
"""
import json
import os
import sys

import numpy as np
import gguf
import tokenizers

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import numpy_ref  # noqa: E402
import make_test_models as mtm  # noqa: E402
import make_tokenizer_refs as mtr  # noqa: E402

OUT = mtm.OUT
SPM_K = 512
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
MODELS = {
    "fam-1bitllm": dict(arch="bitnet", vocab="spm", n_embd=160, n_head=5, n_head_kv=5, n_ff=288, n_layer=2,
                        ctx=256, theta=10000.0, eps=1e-5, tied=True, seed=21, emb_std=0.5, res_gain=1.0,
                        ggufs={"fam-1bitllm-i2_s.gguf": "i2_s"}),
    "fam-llama3": dict(arch="llama", vocab="llama-bpe", n_embd=256, n_head=4, n_head_kv=2, n_ff=256, n_layer=1,
                       ctx=256, theta=500000.0, eps=1e-5, tied=True, seed=12, emb_std=0.3, res_gain=1.5,
                       ggufs={"fam-llama3-tq2_0.gguf": "tq2_0"}),
    "fam-falcone": dict(arch="llama", vocab="falcon3", n_embd=96, n_head=6, n_head_kv=2, n_ff=160, n_layer=1,
                        ctx=256, theta=10000.0, eps=1e-5, tied=False, seed=13, emb_std=0.5, res_gain=2.0,
                        ggufs={"fam-falcone-i2_s.gguf": "i2_s", "fam-falcone-f16.gguf": "f16"}),
}
FILE_TYPE = {"i2_s": 40, "f16": 1, "tq2_0": 37}


def spm_vocab():
    """<unk>, <s>, </s>, the 256 byte pieces and the next SPM_K - 259 pieces of the LLaMA vocabulary, then its
    single-character pieces for "▁" and printable ASCII (ids near 29871 there), renumbered, scores and types kept:
    a small SentencePiece vocabulary in which text really merges (without the characters everything would be
    bytes)."""
    tokens, scores, types = mtr.llama2_vocab()
    chars = [i for i, t in enumerate(tokens) if i >= SPM_K and len(t) == 1 and (t == "\u2581" or " " < t <= "~")]
    keep = list(range(SPM_K)) + chars
    return [tokens[i] for i in keep], [float(scores[i]) for i in keep], [int(types[i]) for i in keep]


def write_spm_hf_tokenizer(vocab):
    """fam-1bitllm-tokenizer.json: the cut vocabulary as Hugging Face's converter makes it, in the published LLaMA
    tokenizer.json form (normalizer Prepend("▁") + Replace(" ", "▁"), no pre-tokenizer, BOS post-processor): the
    input of `bitnet convert` for 1bitLLM checkpoints (which carry no scores; the engine derives them)."""
    tok, _, _ = mtr.spm_tokenizer(*vocab)
    j = json.loads(tok.to_str())
    j["normalizer"] = {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "\u2581"},
                                                          {"type": "Replace", "pattern": {"String": " "},
                                                           "content": "\u2581"}]}
    j["pre_tokenizer"] = None
    check = tokenizers.Tokenizer.from_str(json.dumps(j))
    for text in mtr.TEXTS:
        assert check.encode(text, add_special_tokens=False).ids == tok.encode(text, add_special_tokens=False).ids
    with open(os.path.join(OUT, "fam-1bitllm-tokenizer.json"), "w") as f:
        json.dump(j, f, ensure_ascii=False, separators=(",", ":"))


def bpe_vocab(name):
    """make_test_models' Llama 3 cut; for Falcon-E two reserved specials become ChatML's."""
    tok_json, tokens, merges, sid = mtm.cut_vocab()
    if name == "falcon3":
        for k, new in ((2, "<|im_start|>"), (3, "<|im_end|>")):
            old = tokens[mtm.K + k]
            tokens[mtm.K + k] = new
            for a in tok_json["added_tokens"]:
                if a["content"] == old:
                    a["content"] = new
            sid[new] = sid.pop(old)
    return tok_json, tokens, merges, sid


def permute_qk(codes, n_head):
    """llama.cpp's convert_hf_to_gguf `permute`: each head's rows (i, i + hd/2) become adjacent (2i, 2i+1)."""
    rows, cols = codes.shape
    return codes.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def write_gguf(c, w, kind, vocab, path):
    arch, llama = c["arch"], c["arch"] == "llama"
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
    if c["vocab"] == "spm":
        tokens, scores, types = vocab
        wr.add_tokenizer_model("llama")
        wr.add_tokenizer_pre("default")
        wr.add_token_list(tokens)
        wr.add_token_scores(scores)
        wr.add_token_types(types)
        wr.add_bos_token_id(1)
        wr.add_eos_token_id(2)
        wr.add_unk_token_id(0)
        wr.add_add_bos_token(True)
        wr.add_add_eos_token(False)
    else:
        _, tokens, merges, sid = vocab
        wr.add_tokenizer_model("gpt2")
        wr.add_tokenizer_pre(c["vocab"])
        wr.add_token_list(tokens)
        wr.add_token_types([1] * mtm.K + [3] * mtm.N_SPECIAL)
        wr.add_token_merges([f"{a} {b}" for a, b in merges])
        wr.add_bos_token_id(sid["<|begin_of_text|>"])
        chatml = c["vocab"] == "falcon3"
        wr.add_eos_token_id(sid["<|im_end|>" if chatml else "<|end_of_text|>"])
        wr.add_add_bos_token(not chatml)
        wr.add_chat_template(CHATML if chatml else mtm.CHAT_TEMPLATE)
    if kind != "f16":
        wr.add_quantization_version(gguf.GGML_QUANT_VERSION)

    wr.add_tensor("token_embd.weight", w["emb"])
    for i, ly in enumerate(w["layers"]):
        p = f"blk.{i}."
        norms = ("attn_norm", "ffn_norm") if llama else ("attn_norm", "attn_sub_norm", "ffn_norm", "ffn_sub_norm")
        for k in norms:
            wr.add_tensor(p + k + ".weight", ly[k])
        for k in mtm.HF_NAMES:
            codes, s = ly[k]
            if llama and k in ("attn_q", "attn_k"):
                codes = permute_qk(codes, c["n_head"] if k == "attn_q" else c["n_head_kv"])
            name = p + k + ".weight"
            vals = codes.astype(np.float32) * np.float32(s)
            if kind == "i2_s":
                wr.add_tensor(name, mtm.pack_i2_s(codes, s).view(np.int8), raw_shape=codes.shape,
                              raw_dtype=numpy_ref.I2_S)
            elif kind == "f16":
                wr.add_tensor(name, vals.astype(np.float16))
            else:
                qt = gguf.GGMLQuantizationType[kind.upper()]
                wr.add_tensor(name, gguf.quants.quantize(vals, qt), raw_dtype=qt)
    wr.add_tensor("output_norm.weight", w["out_norm"])
    if not c["tied"]:
        wr.add_tensor("output.weight", w["out"])
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()


def reference_tokenizer(c, vocab):
    """(HF tokenizer, bos text, eos text, chat template or None) for the family's vocabulary."""
    if c["vocab"] == "spm":
        tok, _, _ = mtr.spm_tokenizer(*vocab)
        return tok, "<s>", "</s>", None
    tok_json, _, _, _ = vocab
    tok = tokenizers.Tokenizer.from_str(json.dumps(tok_json))
    if c["vocab"] == "falcon3":
        return tok, "<|begin_of_text|>", "<|im_end|>", CHATML
    return tok, "<|begin_of_text|>", "<|end_of_text|>", mtm.CHAT_TEMPLATE


def cases_for(c, vocab):
    from transformers import PreTrainedTokenizerFast
    tok, bos, eos, template = reference_tokenizer(c, vocab)
    add_bos = c["vocab"] != "falcon3"
    bos_id = tok.token_to_id(bos)
    cases = []
    for pname, text, add_special in mtm.PROMPTS:
        if text is None:
            if template is None:
                continue
            hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos)
            text = hf.apply_chat_template(mtm.CHAT_MESSAGES, chat_template=template, tokenize=False,
                                          add_generation_prompt=True)
        ids = tok.encode(text, add_special_tokens=False).ids
        if add_special and add_bos:
            ids = [bos_id] + ids
        case = {"name": pname, "text": text, "add_special": add_special, "ids": ids}
        if pname == "chat":
            case["messages"] = mtm.CHAT_MESSAGES
        cases.append(case)
    return cases


def main():
    refs = {"generator": f"tests/scripts/make_family_models.py (numpy {np.__version__}, gguf-py, tokenizers "
                         f"{tokenizers.__version__})", "models": {}, "files": {}}
    ok, table = True, []
    for name, c in MODELS.items():
        vocab = spm_vocab() if c["vocab"] == "spm" else bpe_vocab(c["vocab"])
        if c["vocab"] == "spm":
            write_spm_hf_tokenizer(vocab)
        V = len(vocab[0]) if c["vocab"] == "spm" else len(vocab[1])
        w = mtm.make_weights(c, V)
        cases = cases_for(c, vocab)
        first = None
        for fname, kind in c["ggufs"].items():
            path = os.path.join(OUT, fname)
            write_gguf(c, w, kind, vocab, path)
            m = numpy_ref.GgufModel(path)
            assert m.act == "silu", (fname, m.act)
            f64, f32 = numpy_ref.Forward(m, np.float64), numpy_ref.Forward(m, np.float32)
            noisy = [numpy_ref.Forward(m, np.float32, (seed, mtm.NOISE_REL)) for seed in range(mtm.N_NOISE)]
            res = []
            for cs in cases:
                a = f64(cs["ids"])[-1]
                dn = [float(np.abs(a - fn(cs["ids"])[-1]).max()) for fn in noisy]
                res.append((a, dn, f32(cs["ids"])[-1].astype(np.float64)))
            if first is None:
                first = (m, res)
            else:   # every file of a model must give bit-identical reference logits
                ok &= all(np.array_equal(a, a0) for (a, _, _), (a0, _, _) in zip(res, first[1]))
            refs["files"][fname] = {"model": name, "kind": kind, "bytes": os.path.getsize(path),
                                    "tensor_types": sorted({mtm.gguf_type_name(t) for t in m.tensor_types.values()})}
        m, res = first
        f64 = numpy_ref.Forward(m, np.float64)
        for cs, (a, dn, b) in zip(cases, res):
            d32 = float(np.abs(a - b).max())
            stable = d32 < mtm.STABLE_TOL and max(dn) < mtm.STABLE_TOL
            g, gaps = numpy_ref.greedy(f64, cs["ids"], mtm.N_GREEDY)
            ok &= int(a.argmax()) == int(b.argmax())
            cs.update({"stable": stable, "max_abs_f64_vs_f32": d32, "max_abs_f64_vs_perturbed": max(dn),
                       "logit_std": float(a.std()), "top1": int(a.argmax()), "greedy": g,
                       "greedy_gaps": [round(x, 6) for x in gaps], "logits_f64": mtm.r6(a)})
            table.append((name, cs["name"], len(cs["ids"]), stable, d32, max(dn), float(a.std())))
        conf = {k: v for k, v in c.items() if k not in ("ggufs", "seed", "emb_std", "res_gain")}
        refs["models"][name] = {"config": conf, "n_vocab": V, "ggufs": list(c["ggufs"]), "cases": cases}
    with open(os.path.join(OUT, "references_families.json"), "w") as f:
        json.dump(refs, f, ensure_ascii=False, separators=(",", ":"))
    print(f"{'model':12} {'case':9} {'T':>3} {'stable':6} {'|f64-f32|':>10} {'|f64-pert|':>10} {'std':>6}")
    for r in table:
        print(f"{r[0]:12} {r[1]:9} {r[2]:3d} {str(r[3]):6} {r[4]:10.2e} {r[5]:10.2e} {r[6]:6.2f}")
    total = sum(os.path.getsize(os.path.join(OUT, f)) for f in os.listdir(OUT) if f.startswith("fam-"))
    print(f"fam-*.gguf: {total / 1e6:.2f} MB")
    print("CHECK", "PASSED" if ok else "FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
