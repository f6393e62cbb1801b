"""Type stubs of the Rust extension (python/src/lib.rs)."""

from collections.abc import Iterator, Mapping, Sequence
from os import PathLike
from typing import Literal, Optional, Union, overload

import numpy as np
import numpy.typing as npt

class BitnetError(Exception):
    """An error of the engine (a bad model file, a prompt too long, ...), with the engine's message."""

class TextStream(Iterator[str]):
    """The pieces of text a generation produces, one per next(): whole UTF-8 characters, never part of a
    stop string. Joined, they are the text generate(stream=False) returns. Ctrl+C between tokens raises
    KeyboardInterrupt; iterating again resumes the generation."""

    @property
    def seed(self) -> int:
        """The sampling seed (drawn from the clock when none was given)."""
    @property
    def n_generated(self) -> int:
        """Tokens generated so far."""
    @property
    def stop_reason(self) -> Optional[Literal["end_token", "stop_string", "max_tokens", "context_full", "cancelled"]]:
        """Why the generation stopped; None while it runs."""
    def __iter__(self) -> TextStream: ...
    def __next__(self) -> str: ...

class Model:
    """A BitNet b1.58 language model, loaded once and called many times. Every call has its own KV cache
    of `ctx` tokens, so a Model can be shared by threads; the GIL is released while the engine computes.

    path: a GGUF file; None loads the small model embedded in the package (smolbit-135m).
    backend: "cpu", "wgpu", "cuda" or "auto" (a real GPU if there is one, else the CPU).
    threads: CPU threads (default: every CPU). ctx: context size (default: the model's, at most 4096).
    kv_type: the KV cache type, "f32" (exact), "f16" or "q8_0"; the GPU backends have f16 only.
    """

    def __init__(
        self,
        path: Optional[Union[str, PathLike[str]]] = None,
        backend: Literal["cpu", "wgpu", "cuda", "auto"] = "auto",
        threads: Optional[int] = None,
        ctx: Optional[int] = None,
        kv_type: Literal["f32", "f16", "q8_0"] = "f16",
    ) -> None: ...
    @property
    def info(self) -> str:
        """What `bitnet info` prints about the model file: metadata, the engine's reading of it, tensors."""
    @property
    def ctx(self) -> int:
        """The context size of each call's KV cache."""
    @property
    def n_vocab(self) -> int:
        """The number of logits per position."""
    @property
    def backend(self) -> str:
        """What runs the model, e.g. "cpu/avx2"."""
    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        """Token ids of `text`; BOS first when `add_special` and the model adds one. Special-token text
        (e.g. "<|eot_id|>") becomes that token, as in llama.cpp."""
    def detokenize(self, ids: Sequence[int]) -> str:
        """The text of token ids (special tokens as their text; bytes that are not UTF-8 as U+FFFD)."""
    @overload
    def logits(self, ids: Sequence[int], all: Literal[False] = False) -> npt.NDArray[np.float32]:
        """Next-token logits of `ids` (no BOS is added) after the last id, shape [n_vocab]: equal to
        `bitnet logits --tokens ... --all`."""
    @overload
    def logits(self, ids: Sequence[int], all: Literal[True]) -> npt.NDArray[np.float32]:
        """Next-token logits after every id, shape [len(ids), n_vocab], evaluated one token at a time as
        `bitnet perplexity` does (row i is what `logits(ids[: i + 1])` gives). The array takes
        len(ids) * n_vocab * 4 bytes."""
    @overload
    def generate(
        self,
        prompt: str,
        max_tokens: int = 128,
        temperature: float = 0.8,
        top_k: int = 40,
        top_p: float = 0.95,
        min_p: float = 0.05,
        repeat_penalty: float = 1.0,
        repeat_last_n: int = 64,
        seed: Optional[int] = None,
        stop: Optional[Union[str, Sequence[str]]] = None,
        stream: Literal[False] = False,
    ) -> str:
        """Continues `prompt` (BOS first when the model adds one) as `bitnet run` does, with its defaults:
        the same settings and seed give the same text. temperature 0 is greedy. Generation stops before any
        `stop` string. stream=True returns a TextStream of pieces instead of the whole text."""
    @overload
    def generate(
        self,
        prompt: str,
        max_tokens: int = 128,
        temperature: float = 0.8,
        top_k: int = 40,
        top_p: float = 0.95,
        min_p: float = 0.05,
        repeat_penalty: float = 1.0,
        repeat_last_n: int = 64,
        seed: Optional[int] = None,
        stop: Optional[Union[str, Sequence[str]]] = None,
        *,
        stream: Literal[True],
    ) -> TextStream:
        """Continues `prompt` (BOS first when the model adds one) as `bitnet run` does, with its defaults:
        the same settings and seed give the same text. temperature 0 is greedy. Generation stops before any
        `stop` string. stream=True returns a TextStream of pieces instead of the whole text."""
    def chat(
        self,
        messages: Sequence[Mapping[str, str]],
        max_tokens: int = 128,
        temperature: float = 0.8,
        top_k: int = 40,
        top_p: float = 0.95,
        min_p: float = 0.05,
        repeat_penalty: float = 1.0,
        repeat_last_n: int = 64,
        seed: Optional[int] = None,
        stop: Optional[Union[str, Sequence[str]]] = None,
        stream: bool = False,
    ) -> Union[str, TextStream]:
        """The assistant's reply to `messages` (each {"role": ..., "content": ...}), rendered by the model's
        chat template as `bitnet chat` renders them; the other arguments are generate()'s."""
    def perplexity(self, text: str, ctx: Optional[int] = None) -> float:
        """Perplexity of `text` as `bitnet perplexity` (and llama-perplexity) computes it: non-overlapping
        windows of `ctx` tokens (default: the model's context), each from an empty cache with BOS first,
        the second half of each window scored."""
