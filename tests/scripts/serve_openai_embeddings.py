"""/v1/embeddings with the official `openai` Python client, unmodified, against `bitnet serve` on an embedding
model (run by tests/serve.rs, which passes what `bitnet embed --json` printed for each text).

Needs: python3 -m pip install openai

Usage: serve_openai_embeddings.py BASE_URL EXPECTED.json CTX
  EXPECTED.json: [{"text", "tokens", "embedding"}, ...] from `bitnet embed --json`; CTX: the server's --ctx.
Prints "openai embeddings OK" when every check passed; any failure raises.
"""
from array import array
import base64
import json
import struct
import sys

import openai

base, expected, ctx = sys.argv[1].rstrip("/") + "/v1", json.load(open(sys.argv[2])), int(sys.argv[3])
client = openai.OpenAI(base_url=base, api_key="none", max_retries=0, timeout=60)
model = client.models.list().data[0].id
texts = [e["text"] for e in expected]


def same(got, e, what):
    # The same engine, device and thread count as `bitnet embed`: the same f32s. (Compared as f32: the server
    # writes each f32's shortest decimal, `bitnet embed --json` that of the f32 widened to f64.)
    got, want = array("f", got), array("f", e["embedding"])
    assert got == want, f"{what}: {e['text']!r} differs from bitnet embed ({len(got)} vs {len(want)} values)"


# A batch of texts, as floats: each equals `bitnet embed`, in order, with the usage of their tokens.
r = client.embeddings.create(model=model, input=texts, encoding_format="float")
assert r.object == "list" and r.model == model, r
assert [d.index for d in r.data] == list(range(len(texts))), r.data
assert all(d.object == "embedding" for d in r.data)
for d, e in zip(r.data, expected):
    same(d.embedding, e, "float")
n_tokens = sum(len(e["tokens"]) for e in expected)
assert r.usage.prompt_tokens == n_tokens and r.usage.total_tokens == n_tokens, r.usage

# encoding_format base64, asked for explicitly: the client hands back the string; its little-endian f32s are
# the same floats.
r = client.embeddings.create(model=model, input=texts, encoding_format="base64")
for d, e in zip(r.data, expected):
    raw = base64.b64decode(d.embedding)
    same(struct.unpack(f"<{len(raw) // 4}f", raw), e, "base64")

# Without encoding_format the client asks for base64 itself and decodes it.
r = client.embeddings.create(model=model, input=texts[0])
assert len(r.data) == 1
same(r.data[0].embedding, expected[0], "default (base64 decoded by the client)")

# Token ids, one list and a batch of lists: the embeddings of those tokens.
r = client.embeddings.create(model=model, input=expected[1]["tokens"], encoding_format="float")
same(r.data[0].embedding, expected[1], "token ids")
r = client.embeddings.create(model=model, input=[e["tokens"] for e in expected], encoding_format="float")
for d, e in zip(r.data, expected):
    same(d.embedding, e, "batched token ids")


def refused(what, param, **kwargs):
    try:
        client.embeddings.create(model=model, **kwargs)
    except openai.BadRequestError as e:
        assert e.status_code == 400 and e.body["param"] == param, (what, e.body)
        return e.body
    raise AssertionError(f"{what}: not refused")


body = refused("dimensions", "dimensions", input="hi", dimensions=8)
assert "dimensions" in body["message"], body
body = refused("too long", "input", input=[list(range(1, ctx + 2))], encoding_format="float")
assert body["code"] == "context_length_exceeded", body
body = refused("long text", "input", input="word " * (2 * ctx), encoding_format="float")
assert body["code"] == "context_length_exceeded", body
refused("empty list", "input", input=[], encoding_format="float")
refused("empty text", "input", input=["a", ""], encoding_format="float")
refused("encoding_format", "encoding_format", input="hi", encoding_format="int8")

# An embedding model does not generate: the generation endpoints say so.
for call in (
    lambda: client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=4),
    lambda: client.completions.create(model=model, prompt="Hi", max_tokens=4),
):
    try:
        call()
    except openai.BadRequestError as e:
        assert "embedding model" in e.body["message"] and "cannot generate" in e.body["message"], e.body
    else:
        raise AssertionError("an embedding model generated text")

print("openai embeddings OK")
