#!/usr/bin/env python3
"""References for the real small model /work/shared/models/smolbit-135m  ->  tests/fixtures/smolbit_refs.json

    python3 tests/scripts/make_smolbit_refs.py          # ~3-4 min on 2 cores

Uses the model's own float64 reference (reference.py's Model, imported from the shared folder):
  * perplexity of tests/fixtures/heldout.txt the way llama.cpp's llama-perplexity computes it;
  * top-20 (id, logit) at the last position of 4 prompts (2 plain, 2 with the model's ChatML template).
A float32 run and float32 runs with a tiny input perturbation (~2 ulps before each int8 quantisation, like a
different summation order) tell how far an exact float32 engine may legitimately land from float64.
"""
import json, math, os, sys, time

import torch

SMOL = os.environ.get("SMOLBIT_DIR", "/work/shared/models/smolbit-135m")
sys.path.insert(0, SMOL)
from reference import Model, chat_prompt  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
FIX = os.path.join(ROOT, "tests", "fixtures")
N_CTX = 128
N_NOISE, NOISE_REL = 2, 2.4e-7
PROMPTS = [("once", "Once upon a time", False), ("capital", "The capital of France is", False),
           ("chat_sky", "Why is the sky blue?", True), ("chat_capital", "What is the capital of France?", True)]


class NoisyModel(Model):
    """reference.py's Model whose BitLinear inputs get a relative perturbation U(-rel, rel) when enabled."""
    gen = None
    rel = 0.0

    def bitlinear(self, x, cs):
        if self.gen is not None:
            u = torch.rand(x.shape, generator=self.gen, dtype=torch.float64).to(x.dtype)
            x = x * (1 + self.rel * (2 * u - 1))
        return Model.bitlinear(x, cs)


def perplexity(m, ids, n_ctx):
    """llama-perplexity: non-overlapping windows of n_ctx tokens, each evaluated from scratch (no BOS added:
    this vocabulary does not ask for one), scoring logits at positions first..n_ctx-2 (first = n_ctx/2)
    against the next token, i.e. n_ctx - 1 - first predictions per window. PPL = exp(sum NLL / count)."""
    first = n_ctx // 2
    sums = []
    for w in range(len(ids) // n_ctx):
        chunk = ids[w * n_ctx:(w + 1) * n_ctx]
        logits, _ = m.forward(chunk)
        lp = torch.log_softmax(logits.double(), -1)
        tgt = torch.tensor(chunk[first + 1:])
        sums.append(-float(lp[first:n_ctx - 1].gather(-1, tgt[:, None]).sum()))
    count = len(sums) * (n_ctx - 1 - first)
    return math.exp(sum(sums) / count), sums, count


def main():
    torch.set_grad_enabled(False)
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer
    tok = Tokenizer.from_file(os.path.join(SMOL, "tokenizer.json"))
    hf_tok = AutoTokenizer.from_pretrained(SMOL)
    cfg = json.load(open(os.path.join(SMOL, "tokenizer_config.json")))
    add_bos = bool(cfg.get("add_bos_token", False))
    assert not add_bos

    t0 = time.time()
    m64 = Model(SMOL, torch.float64)
    m32 = NoisyModel(SMOL, torch.float32)

    text = open(os.path.join(FIX, "heldout.txt"), encoding="utf-8").read()
    ids = tok.encode(text).ids
    assert ids[0] != hf_tok.bos_token_id, "no BOS expected for this vocabulary"
    ppl, sums, count = perplexity(m64, ids, N_CTX)
    ppl32, sums32, _ = perplexity(m32, ids, N_CTX)
    print(f"perplexity: {len(ids)} tokens, {len(sums)} windows of {N_CTX}, {count} scored: "
          f"PPL f64 {ppl:.6f}, f32 {ppl32:.6f} ({time.time() - t0:.0f}s)")

    prompts = []
    for name, q, is_chat in PROMPTS:
        if is_chat:
            msgs = [{"role": "user", "content": q}]
            text_p = hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            assert text_p == chat_prompt(q), text_p      # ChatML with the default system prompt
        else:
            text_p = q
        pids = tok.encode(text_p).ids
        a = m64.forward(pids)[0][-1].double()
        top = torch.topk(a, 20)
        top_ids = top.indices.tolist()
        b = m32.forward(pids)[0][-1].double()
        d32 = float((a - b).abs().max())
        dn = []
        for seed in range(N_NOISE):
            m32.gen, m32.rel = torch.Generator().manual_seed(seed), NOISE_REL
            dn.append(float((a - m32.forward(pids)[0][-1].double()).abs().max()))
            m32.gen = None
        stable = max([d32] + dn) < 1e-4
        prompts.append({"name": name, "chat": is_chat, "question": q if is_chat else None, "text": text_p,
                        "ids": pids, "top20": [[i, round(float(a[i]), 6)] for i in top_ids],
                        "top20_f32": [[i, round(float(b[i]), 6)] for i in top_ids],
                        "max_abs_f64_vs_f32": d32, "max_abs_f64_vs_perturbed": max(dn), "stable": stable,
                        "logit_std": float(a.std())})
        print(f"{name:13} {len(pids):3d} tokens  top-1 {top_ids[0]:6d} {tok.decode([top_ids[0]])!r:12} "
              f"|f64-f32| {d32:.2e} |f64-perturbed| {max(dn):.2e} stable {stable}  ({time.time() - t0:.0f}s)")

    out = {"generator": "tests/scripts/make_smolbit_refs.py (smolbit-135m reference.py Model, float64)",
           "model": "smolbit-135m",
           "perplexity": {"text_file": "heldout.txt", "add_bos": add_bos, "n_ctx": N_CTX, "n_tokens": len(ids),
                          "n_windows": len(sums), "first_scored": N_CTX // 2,
                          "scored_per_window": N_CTX - 1 - N_CTX // 2, "n_scored": count,
                          "ppl": round(ppl, 6), "nll_sum_per_window": [round(s, 6) for s in sums],
                          "ppl_f32": round(ppl32, 6), "nll_sum_per_window_f32": [round(s, 6) for s in sums32],
                          "token_ids": ids},
           "prompts": prompts}
    with open(os.path.join(FIX, "smolbit_refs.json"), "w") as f:
        json.dump(out, f, ensure_ascii=False, indent=1)
    print(f"done in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
