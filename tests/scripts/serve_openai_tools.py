"""Tool calls with the official `openai` Python client, unmodified, against `bitnet serve` (run by tests/serve.rs
with a model whose chat template supports tools: tests/fixtures/templates/).

Needs: python3 -m pip install openai jsonschema jinja2

Usage: serve_openai_tools.py BASE_URL TEMPLATE_FILE FORMAT   (FORMAT: hermes or llama3)
Prints "openai tools OK" when every check passed; any failure raises. The model's weights are random: the
grammar alone makes its calls well formed, which is what is checked.
"""
import json
import sys

import jinja2
import jsonschema
import openai

base, template_file, fmt = sys.argv[1].rstrip("/"), sys.argv[2], sys.argv[3]
client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=120)
model = client.models.list().data[0].id
assert client.get("/../props", cast_to=object)["chat_template_caps"]["supports_tools"] is True

weather = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather <now> in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
clock = {"type": "function", "function": {
    "name": "get_time",
    "parameters": {"type": "object", "properties": {"zone": {"type": "integer", "minimum": -12, "maximum": 14}},
                   "required": ["zone"], "additionalProperties": False}}}
tools = [weather, clock]
schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}


def check_calls(choice):
    """The reply is tool calls, each of a given tool with arguments valid against its schema."""
    assert choice.finish_reason == "tool_calls", choice
    assert choice.message.content is None and choice.message.tool_calls, choice
    if fmt == "llama3":
        assert len(choice.message.tool_calls) == 1, choice  # Llama 3.1's form has one call a reply
    for call in choice.message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_"), call
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
    return choice.message.tool_calls


def cut_short(choice):
    """A reply of calls cut by max_tokens: finish_reason length, the text as content."""
    return choice.finish_reason == "length" and choice.message.content.startswith(call_start)


call_start = "<tool_call>" if fmt == "hermes" else "{"
messages = [{"role": "system", "content": "You tell the weather."},
            {"role": "user", "content": "What is the weather in Paris?"}]
# Required: calls, as many as the model makes (a random model may go on calling until max_tokens).
complete = 0
for seed in range(1, 9):
    r = client.chat.completions.create(model=model, messages=messages, tools=tools, tool_choice="required",
                                       temperature=1.0, seed=seed, max_tokens=120)
    if not cut_short(r.choices[0]):
        check_calls(r.choices[0])
        complete += 1
assert complete > 0, "no reply ended"

# The tool-calling loop: the model calls, the client runs the tools and sends their results back, the model
# answers in text.
r = client.chat.completions.create(model=model, messages=messages, tools=tools, tool_choice="required",
                                   parallel_tool_calls=False, temperature=1.0, seed=1, max_tokens=200)
calls = check_calls(r.choices[0])
convo = messages + [r.choices[0].message]  # the response's message object, as OpenAI's guide appends it
for call in calls:
    convo.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21})})
answer = client.chat.completions.create(model=model, messages=convo, tools=tools, tool_choice="none",
                                        max_tokens=16, temperature=0)
assert answer.choices[0].message.tool_calls is None, answer
assert isinstance(answer.choices[0].message.content, str), answer
assert answer.choices[0].finish_reason in ("stop", "length"), answer

# The conversation, tool calls and results included, renders as Jinja2 renders it with Hugging Face's
# settings (llama-server's /apply-template shows the prompt); HF's tojson is json.dumps.
wire = [m if isinstance(m, dict) else m.model_dump(exclude_unset=True) for m in convo]
prompt = client.post("/../apply-template", body={"messages": wire, "tools": tools}, cast_to=object)["prompt"]
env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
reference = []
for m in wire:
    m = dict(m)
    if m.get("tool_calls"):  # templates take arguments as objects (as transformers and llama.cpp pass them)
        m["tool_calls"] = [dict(c, function=dict(c["function"], arguments=json.loads(c["function"]["arguments"])))
                           for c in m["tool_calls"]]
    m["content"] = m.get("content") or ""
    reference.append(m)
want = env.from_string(open(template_file).read()).render(
    messages=reference, tools=tools, add_generation_prompt=True,
    bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>")
assert prompt == want, (prompt, want)
assert "The weather <now> in a city" in prompt  # not HTML-escaped

# A named function: one call of it.
for seed in range(1, 4):
    r = client.chat.completions.create(model=model, messages=messages, tools=tools, seed=seed, temperature=1.0,
                                       tool_choice={"type": "function", "function": {"name": "get_time"}},
                                       max_tokens=100)
    calls = check_calls(r.choices[0])
    assert [c.function.name for c in calls] == ["get_time"], calls

# One call at most without parallel_tool_calls.
for seed in range(1, 4):
    r = client.chat.completions.create(model=model, messages=messages, tools=tools, tool_choice="required",
                                       parallel_tool_calls=False, seed=seed, temperature=1.0, max_tokens=200)
    assert len(check_calls(r.choices[0])) == 1

# auto: text or calls, as the model picks; either way well formed.
kinds = set()
for seed in range(1, 9):
    r = client.chat.completions.create(model=model, messages=messages, tools=tools, seed=seed, temperature=1.0,
                                       max_tokens=200)
    choice = r.choices[0]
    if cut_short(choice):
        kinds.add("calls cut short")
    elif choice.message.tool_calls:
        check_calls(choice)
        kinds.add("calls")
    else:
        assert isinstance(choice.message.content, str) and choice.finish_reason in ("stop", "length"), choice
        assert not choice.message.content.startswith("<" if fmt == "hermes" else "{"), choice
        kinds.add("text")
print("auto replies:", sorted(kinds))

# Streaming: the deltas, put together as OpenAI's guide does, are the non-streamed reply.
for choice_arg in ["required", "auto"]:
    args = dict(model=model, messages=messages, tools=tools, tool_choice=choice_arg, temperature=0, max_tokens=200,
                parallel_tool_calls=False)
    whole = client.chat.completions.create(**args).choices[0]
    calls, text, finish, pieces = {}, "", None, 0
    for chunk in client.chat.completions.create(stream=True, **args):
        for c in chunk.choices:
            text += c.delta.content or ""
            finish = c.finish_reason or finish
            for d in c.delta.tool_calls or []:
                # A call's first delta has its id and name; the next ones only more arguments.
                assert (d.index in calls) == (d.id is None and d.function.name is None), d
                call = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
                call["id"] = d.id or call["id"]
                call["name"] += (d.function.name or "") if d.function else ""
                call["arguments"] += (d.function.arguments or "") if d.function else ""
                pieces += 1
    assert finish == whole.finish_reason, (finish, whole)
    if whole.message.tool_calls:
        assert all(calls[i]["id"].startswith("call_") for i in calls), calls
        got = [(calls[i]["name"], calls[i]["arguments"]) for i in sorted(calls)]
        assert got == [(c.function.name, c.function.arguments) for c in whole.message.tool_calls], got
        assert text == ""
        assert pieces > len(calls), "the arguments come in pieces, as OpenAI streams them"
    else:
        assert text == whole.message.content and not calls, (text, whole)

# A function without parameters is called with an empty object.
bare = {"type": "function", "function": {"name": "ping"}}
r = client.chat.completions.create(model=model, messages=messages, tools=[bare], tool_choice="required",
                                   parallel_tool_calls=False, max_tokens=80)
assert r.choices[0].finish_reason == "tool_calls", r
assert json.loads(r.choices[0].message.tool_calls[0].function.arguments) == {}, r

# Bad tool requests are 400s naming the field.
for bad, param in [
    (dict(tools=tools, tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice"),
    (dict(tools=tools, tool_choice="sometimes"), "tool_choice"),
    (dict(tools=[{"type": "function", "function": {"name": "has space"}}]), "tools"),
    (dict(tools=[weather, weather]), "tools"),
    (dict(tools=tools, response_format={"type": "json_object"}), "tools"),
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}]), "tools"),
    (dict(tools=tools, messages=messages + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "get_time", "arguments": "not json"}}]}]), "messages"),
]:
    try:
        client.chat.completions.create(**{"model": model, "messages": messages, "max_tokens": 4, **bad})
        raise AssertionError(f"accepted: {bad}")
    except openai.BadRequestError as e:
        assert e.body["param"] == param, (bad, e.body)

print("openai tools OK")
