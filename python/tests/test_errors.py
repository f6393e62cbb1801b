"""Bad input raises an exception with the engine's message (the one `bitnet` prints after "error: "), never
a crash; Ctrl+C interrupts a generation."""

import os
import signal
import threading

import pytest

import bitnet
from conftest import FIXTURES, TINY_A, bitnet as cli


def cli_error(*args):
    out = cli(*args)
    assert out.returncode != 0
    assert out.stderr.startswith("error: "), out.stderr
    return out.stderr.removeprefix("error: ").strip()


def test_a_truncated_gguf_raises_the_engines_message(tmp_path):
    data = open(FIXTURES[0], "rb").read()
    for cut in (10, 200, len(data) // 2, len(data) - 1):
        path = tmp_path / f"cut{cut}.gguf"
        path.write_bytes(data[:cut])
        with pytest.raises(bitnet.BitnetError) as e:
            bitnet.Model(str(path), backend="cpu")
        assert str(e.value) == cli_error("logits", "-m", str(path), "--backend", "cpu", "-p", "a")
        assert str(e.value).startswith("invalid GGUF file")


def test_not_a_model_file(tmp_path):
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf file at all" * 10)
    cases = [str(garbage), str(tmp_path), str(tmp_path / "missing.gguf"), str(tmp_path / "empty.gguf")]
    (tmp_path / "empty.gguf").write_bytes(b"")
    for path in cases:
        with pytest.raises(bitnet.BitnetError) as e:
            bitnet.Model(path, backend="cpu")
        assert str(e.value) == cli_error("info", "-m", path)


def test_bad_arguments(default_model):
    with pytest.raises(bitnet.BitnetError, match="temperature -1 is out of range"):
        default_model.generate("Hi", temperature=-1.0)
    with pytest.raises(bitnet.BitnetError, match="top-p 2 is out of range"):
        default_model.generate("Hi", top_p=2.0)
    with pytest.raises(bitnet.BitnetError, match="outside the vocabulary"):
        default_model.logits([default_model.n_vocab])
    with pytest.raises(bitnet.BitnetError, match="empty prompt"):
        default_model.logits([])
    with pytest.raises(bitnet.BitnetError, match="empty prompt"):
        default_model.logits([], all=True)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        default_model.detokenize([10**6])
    with pytest.raises(ValueError, match="unknown backend 'tpu'"):
        bitnet.Model(FIXTURES[0], backend="tpu")
    with pytest.raises(ValueError, match="unknown kv_type"):
        bitnet.Model(FIXTURES[0], kv_type="f8")
    with pytest.raises(bitnet.BitnetError, match="a q8_0 KV cache with head dim 16"):
        bitnet.Model(TINY_A, backend="cpu", kv_type="q8_0")
    with pytest.raises(ValueError, match="threads must be from 1"):
        bitnet.Model(FIXTURES[0], threads=0)
    with pytest.raises(OverflowError):
        default_model.logits([-1])
    with pytest.raises(KeyError, match="content"):
        default_model.chat([{"role": "user"}])


def test_context_limits():
    model = bitnet.Model(FIXTURES[0], backend="cpu", ctx=8)
    with pytest.raises(bitnet.BitnetError, match="context full: 9 tokens needed, the context holds 8"):
        model.logits(list(range(1, 10)))
    with pytest.raises(bitnet.BitnetError, match="context 0 must be between 1"):
        bitnet.Model(FIXTURES[0], backend="cpu", ctx=0)
    with pytest.raises(bitnet.BitnetError, match="at least one window of 64 is needed"):
        model.perplexity("short text", ctx=64)
    # A generation that fills the context stops there.
    stream = model.generate("a b", max_tokens=100, seed=1, stream=True)
    assert len("".join(stream)) > 0
    assert stream.stop_reason in ("context_full", "end_token")


def test_ctrl_c_interrupts_a_generation(default_model):
    """SIGINT while the engine computes (GIL released) raises KeyboardInterrupt between tokens; the stream
    loses nothing and goes on when iterated again."""
    stream = default_model.generate(PROMPT_LONG, max_tokens=2000, temperature=0.0, stream=True)
    first = next(stream)
    timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    pieces = [first]
    with pytest.raises(KeyboardInterrupt):
        for piece in stream:
            pieces.append(piece)
    timer.join()
    assert stream.stop_reason is None
    pieces += [next(stream) for _ in range(3)]
    whole = default_model.generate(PROMPT_LONG, max_tokens=stream.n_generated, temperature=0.0)
    assert whole.startswith("".join(pieces)) and len(pieces) > 4


PROMPT_LONG = "Once upon a time"


def test_the_gil_is_released_while_the_engine_computes(default_model):
    """Another Python thread keeps running during a long call: the longest pause it sees is a small part of
    the call (were the GIL held, it would pause for all of it)."""
    import time

    ids = default_model.tokenize(PROMPT_LONG * 12)[:48]
    done = threading.Event()
    worker = threading.Thread(target=lambda: (default_model.logits(ids, all=True), done.set()))
    start = last = time.perf_counter()
    longest = 0.0
    worker.start()
    while not done.is_set():
        now = time.perf_counter()
        longest, last = max(longest, now - last), now
    took = time.perf_counter() - start
    worker.join()
    assert took > 0.5, "the call must be long enough to tell"
    assert longest < took / 4, (longest, took)
