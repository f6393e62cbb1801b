"""The module computes what the `bitnet` binary computes: the same logits bit for bit, the same seeded text,
the same perplexity, the same `info`."""

import math

import numpy as np
import pytest

import bitnet
from conftest import FIXTURES, HELDOUT, MODELS, bitnet_json, bitnet_ok

PROMPT = "The quick brown fox jumps over the lazy dog. Then"


def cli_logits(path, ids, *flags):
    out = bitnet_json("logits", "-m", path, "--backend", "cpu", "--tokens", ",".join(map(str, ids)), "--all", "--json", *flags)
    assert out["tokens"] == ids
    # serde_json writes each f32 as the shortest decimal that reads back as that f32.
    return np.array(out["logits"], dtype=np.float64).astype(np.float32)


@pytest.mark.parametrize("path", FIXTURES)
def test_logits_equal_the_cli_bit_for_bit(path):
    model = bitnet.Model(path, backend="cpu")
    ids = [t % model.n_vocab for t in model.tokenize(PROMPT)][:10]
    last = model.logits(ids)
    assert last.dtype == np.float32 and last.shape == (model.n_vocab,)
    assert np.array_equal(last, cli_logits(path, ids))
    # Every position: each row is the CLI's logits of that prefix (the batched and the one-token passes agree).
    rows = model.logits(ids, all=True)
    assert rows.dtype == np.float32 and rows.shape == (len(ids), model.n_vocab)
    for i in (0, len(ids) // 2, len(ids) - 1):
        assert np.array_equal(rows[i], cli_logits(path, ids[: i + 1])), f"row {i}"


def test_logits_with_other_kv_caches_equal_the_cli():
    path = FIXTURES[0]
    model = bitnet.Model(path, backend="cpu", kv_type="f32")
    ids = model.tokenize(PROMPT)[:12]
    assert np.array_equal(model.logits(ids), cli_logits(path, ids, "--kv-type", "f32"))
    # q8_0 needs a head dimension that is a multiple of 32: the default model's.
    model = bitnet.Model(backend="cpu", kv_type="q8_0")
    ids = model.tokenize(PROMPT)
    out = bitnet_json("logits", "--backend", "cpu", "-p", PROMPT, "--all", "--json", "--kv-type", "q8_0")
    assert np.array_equal(model.logits(ids), np.array(out["logits"]).astype(np.float32))


def test_logits_of_the_default_model_equal_the_cli(default_model):
    ids = default_model.tokenize(PROMPT)
    out = bitnet_json("logits", "--backend", "cpu", "-p", PROMPT, "--all", "--json")
    assert out["tokens"] == ids
    assert np.array_equal(default_model.logits(ids), np.array(out["logits"]).astype(np.float32))


def cli_run(*args):
    # `bitnet run` ends the text with one newline of its own.
    out = bitnet_ok("run", "--backend", "cpu", *args)
    assert out.endswith("\n")
    return out[:-1]


@pytest.mark.parametrize(
    "settings",
    [
        dict(seed=7),
        dict(seed=123, temperature=1.3, top_k=0, top_p=1.0, min_p=0.0),
        dict(seed=5, temperature=0.0),
        dict(seed=9, repeat_penalty=1.3, repeat_last_n=16, top_k=10),
    ],
)
def test_generate_with_a_seed_equals_bitnet_run(default_model, settings):
    flags = {"temperature": "--temp", "top_k": "--top-k", "top_p": "--top-p", "min_p": "--min-p",
             "repeat_penalty": "--repeat-penalty", "repeat_last_n": "--repeat-last-n", "seed": "--seed"}
    args = [a for k, v in settings.items() for a in (flags[k], str(v))]
    want = cli_run("-p", PROMPT, "-n", "40", *args)
    got = default_model.generate(PROMPT, max_tokens=40, **settings)
    assert got == want
    assert len(got) > 20


@pytest.mark.parametrize("path", FIXTURES[:1] + FIXTURES[-1:])
def test_generate_on_fixture_models_equals_bitnet_run(path):
    model = bitnet.Model(path, backend="cpu")
    assert model.generate("Hello", max_tokens=30, seed=3) == cli_run("-m", path, "-p", "Hello", "-n", "30", "--seed", "3")


def test_stop_strings_are_honoured_as_by_the_cli(default_model):
    full = default_model.generate(PROMPT, max_tokens=40, seed=7)
    stop = full.split()[3]  # a word that does occur
    got = default_model.generate(PROMPT, max_tokens=40, seed=7, stop=[stop, "zzzz"])
    assert got == cli_run("-p", PROMPT, "-n", "40", "--seed", "7", "--stop", stop, "--stop", "zzzz")
    assert got == full[: full.index(stop)]
    assert default_model.generate(PROMPT, max_tokens=40, seed=7, stop=stop) == got


def test_streaming_yields_the_same_text(default_model):
    whole = default_model.generate(PROMPT, max_tokens=40, seed=11)
    stream = default_model.generate(PROMPT, max_tokens=40, seed=11, stream=True)
    assert stream.stop_reason is None
    pieces = list(stream)
    assert len(pieces) > 5 and all(pieces)
    assert "".join(pieces) == whole
    assert stream.seed == 11 and stream.n_generated == 40 and stream.stop_reason == "max_tokens"


def test_chat_equals_bitnet_chat(default_model):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]
    got = default_model.chat(messages, max_tokens=24, seed=4)
    want = bitnet_ok("chat", "--backend", "cpu", "--system", "You are terse.", "-n", "24", "--seed", "4", stdin="Name a colour.\n")
    assert want == got + "\n"
    assert "".join(default_model.chat(messages, max_tokens=24, seed=4, stream=True)) == got


def test_tokenize_and_detokenize_round_trip(default_model):
    ids = default_model.tokenize(PROMPT)
    assert bitnet_json("logits", "--backend", "cpu", "-p", PROMPT, "--json")["tokens"] == ids
    assert default_model.detokenize(ids) == PROMPT
    plain = default_model.tokenize(PROMPT, add_special=False)
    assert ids[len(ids) - len(plain) :] == plain and len(ids) - len(plain) in (0, 1)


def test_info_is_what_bitnet_info_prints():
    for path in FIXTURES[:2]:
        assert bitnet.Model(path, backend="cpu").info == bitnet_ok("info", "-m", path)


def loglikelihood(model, tokens, first):
    """lm-eval's loglikelihood of tokens[first + 1:] given what precedes each, from logits(all=True):
    the sum of log softmax(logits at position j)[tokens[j + 1]], in float64."""
    rows = model.logits(tokens, all=True).astype(np.float64)
    total = 0.0
    for j in range(first, len(tokens) - 1):
        row = rows[j]
        top = row.max()
        total += row[tokens[j + 1]] - top - math.log(np.exp(row - top).sum())
    return total


@pytest.mark.parametrize("which, ctx, chars", [("default", 64, 900), ("tiny-a-i2_s.gguf", 32, None)])
def test_loglikelihood_from_logits_matches_bitnet_perplexity(default_model, tmp_path, which, ctx, chars):
    """`bitnet perplexity` (llama-perplexity's method): windows of ctx tokens, BOS first (if the model adds
    one: the tiny model does, the embedded one does not), the second half of each window scored. The same
    sums from logits(all=True) give the same perplexity. (The held-out text is cut for the 135M model.)"""
    text = HELDOUT.read_text()[:chars]
    path = tmp_path / "heldout.txt"
    path.write_text(text)
    model_args = [] if which == "default" else ["-m", str(MODELS / which)]
    model = default_model if which == "default" else bitnet.Model(str(MODELS / which), backend="cpu")
    tokens = model.tokenize(text)
    with_bos, plain = model.tokenize("a"), model.tokenize("a", add_special=False)
    bos = with_bos[:1] if len(with_bos) > len(plain) else []
    nll, scored = 0.0, 0
    for w in range(len(tokens) // ctx):
        window = tokens[w * ctx : (w + 1) * ctx]
        window = bos + window[len(bos) :]
        nll -= loglikelihood(model, window, ctx // 2)
        scored += ctx - 1 - ctx // 2
    assert scored >= 60
    ppl = math.exp(nll / scored)
    out = bitnet_ok("perplexity", "--backend", "cpu", *model_args, "-f", str(path), "--ctx", str(ctx))
    assert f"scored tokens = {scored}" in out
    printed = float(out.splitlines()[-1].removeprefix("PPL = "))
    assert abs(printed - ppl) <= 0.5e-4, (printed, ppl)
    assert math.isclose(model.perplexity(text, ctx=ctx), ppl, rel_tol=1e-9)
