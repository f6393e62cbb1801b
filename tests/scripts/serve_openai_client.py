"""The official `openai` Python client, unmodified, against `bitnet serve` (run by tests/serve.rs).

Needs: python3 -m pip install openai jsonschema

Usage: serve_openai_client.py BASE_URL   (the server must run with --api-key test-key)
Prints "openai client OK" when every check passed; any failure raises.
"""
import json
import sys

import jsonschema
import openai

base = sys.argv[1].rstrip("/") + "/v1"
client = openai.OpenAI(base_url=base, api_key="test-key", max_retries=0, timeout=60)

models = client.models.list()
model = models.data[0].id
assert model == "tiny-a-i2_s", model

messages = [{"role": "user", "content": "Hello"}]
chat = client.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0)
text = chat.choices[0].message.content
assert chat.choices[0].finish_reason in ("stop", "length"), chat
assert chat.usage.completion_tokens <= 12 and chat.usage.prompt_tokens > 0, chat.usage

stream = client.chat.completions.create(
    model=model, messages=messages, max_tokens=12, temperature=0, stream=True, stream_options={"include_usage": True}
)
pieces, usage, finish = [], None, None
for chunk in stream:
    if chunk.usage is not None:
        usage = chunk.usage
    for choice in chunk.choices:
        pieces.append(choice.delta.content or "")
        finish = choice.finish_reason or finish
assert "".join(pieces) == text, ("".join(pieces), text)
assert usage is not None and usage.completion_tokens == chat.usage.completion_tokens, usage
assert finish == chat.choices[0].finish_reason

done = client.completions.create(model=model, prompt="Once upon", max_tokens=8, temperature=0, seed=3, stop=["\n\n"])
assert done.object == "text_completion" and done.usage.completion_tokens <= 8, done
streamed = "".join(c.choices[0].text for c in client.completions.create(
    model=model, prompt="Once upon", max_tokens=8, temperature=0, seed=3, stop=["\n\n"], stream=True) if c.choices)
assert streamed == done.choices[0].text, (streamed, done.choices[0].text)

# logprobs in the client's own types: one entry per token, the alternatives most likely first.
lp = client.chat.completions.create(
    model=model, messages=messages, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
entries = lp.choices[0].logprobs.content
assert len(entries) == lp.usage.completion_tokens, entries
for e in entries:
    assert len(e.top_logprobs) == 3 and e.top_logprobs[0].token == e.token, e
    assert e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob >= e.top_logprobs[2].logprob, e
# A token may hold part of a character: the bytes, joined, are the text.
assert b"".join(bytes(e.bytes) for e in entries).decode(errors="replace") == lp.choices[0].message.content
legacy = client.completions.create(model=model, prompt="Once upon", max_tokens=3, temperature=0, logprobs=2)
assert len(legacy.choices[0].logprobs.tokens) == legacy.usage.completion_tokens, legacy
assert all(len(t) <= 2 for t in legacy.choices[0].logprobs.top_logprobs), legacy

# logit_bias: a banned token never comes out.
first = legacy.choices[0].logprobs.tokens[0]
first_id = client.post("/../tokenize", body={"content": first}, cast_to=object)["tokens"][0]
banned = client.completions.create(
    model=model, prompt="Once upon", max_tokens=3, temperature=0, logprobs=0, logit_bias={str(first_id): -100})
assert banned.choices[0].logprobs.tokens[0] != first, banned

# Structured output: what comes back parses and validates against the schema.
schema = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 16},
        "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
        "genres": {"type": "array", "items": {"enum": ["drama", "comedy", "horror"]}, "minItems": 1, "maxItems": 2},
    },
    "required": ["title", "year", "genres"],
    "additionalProperties": False,
}
for seed in range(1, 6):
    r = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "A film, as JSON."}], max_tokens=100, temperature=1.0,
        seed=seed, response_format={"type": "json_schema", "json_schema": {"name": "film", "schema": schema, "strict": True}})
    assert r.choices[0].finish_reason == "stop", r
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)

# A grammar (llguidance's Lark; the `grammar` field, llama-server's name, sent as extra_body): every reply is a
# sentence of it, here a prefix and JSON valid against the schema above.
# (Inside a grammar the schema's own layout options apply: compact JSON, else a small model may pad forever.)
compact = dict(schema, **{"x-guidance": {"whitespace_flexible": False}})
lark = 'start: "Film: " %json ' + json.dumps(compact) + "\n"
for seed in range(1, 4):
    done = client.completions.create(model=model, prompt="A film:", max_tokens=100, temperature=1.0, seed=seed,
                                     extra_body={"grammar": lark})
    text = done.choices[0].text
    assert done.choices[0].finish_reason == "stop" and text.startswith("Film: "), done
    jsonschema.validate(json.loads(text[len("Film: "):]), schema)
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "A film?"}], max_tokens=100,
                                       temperature=1.0, seed=seed, extra_body={"grammar": lark}, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in r if c.choices)
    assert text.startswith("Film: "), text
    jsonschema.validate(json.loads(text[len("Film: "):]), schema)
for bad in [{"grammar": "start: ) ("}, {"grammar": lark, "response_format": {"type": "json_object"}}]:
    try:
        client.completions.create(model=model, prompt="A", max_tokens=4, extra_body=bad)
        raise AssertionError(f"accepted: {bad}")
    except openai.BadRequestError as e:
        assert e.body["param"] in ("grammar", "response_format"), e.body

# Tools on a model whose template has no tool support are refused, naming them (not dropped).
try:
    client.chat.completions.create(model=model, messages=messages, tools=[{"type": "function", "function": {"name": "f"}}])
    raise AssertionError("tools were accepted")
except openai.BadRequestError as e:
    assert e.body["param"] == "tools" and "no tool support" in e.body["message"], e.body

try:
    client.chat.completions.create(model=model, messages=messages, max_tokens=100000)
    raise AssertionError("a context overflow was accepted")
except openai.BadRequestError as e:
    assert e.code == "context_length_exceeded", e.body

try:
    openai.OpenAI(base_url=base, api_key="wrong", max_retries=0).models.list()
    raise AssertionError("a wrong key was accepted")
except openai.AuthenticationError:
    pass

print("openai client OK")
