#!/usr/bin/env python3
"""Reference token ids and chat renderings for engine/tests/tokenizer.rs, from Hugging Face `tokenizers`/`transformers`.

For each tricky string, the ids the HF tokenizer gives (no special tokens added; special-token text in the string is
parsed as the special token, as both HF and llama.cpp do), for three vocabularies:
  llama3:  shared/tokenizers/llama3/tokenizer.json.gz (BitNet 2B4T's Llama 3 tokenizer: Llama 3 regex, ignore_merges)
  smolbit: shared/models/smolbit-135m/tokenizer.json (SmolLM2: individual digits + ByteLevel regex)
  llama2:  tests/fixtures/llama-spm-vocab.gguf.gz, the LLaMA / LLaMA-2 SentencePiece vocabulary (32000 pieces with
           scores, byte fallback; the 1bitLLM bitnet_b1_58 models use it) as llama.cpp ships it in
           models/ggml-vocab-llama-spm.gguf (taken from the llama-cpp-python 0.3.36 sdist on PyPI, with its
           test strings and llama.cpp's ids: llama-spm-vocab.inp / .out). The GGUF's pieces, scores and types are
           turned back into a SentencePiece model (tokenizer.model: BPE, byte_fallback, identity normalizer with
           the dummy prefix, as LLaMA's); the reference ids come from Hugging Face's converter of that model
           (transformers' SpmConverter, legacy LlamaTokenizerFast behaviour), and the script asserts the
           `sentencepiece` library and llama.cpp's .out give the same ids.
plus chat templates rendered by transformers' apply_chat_template (the Jinja settings HF uses) and their ids.

Usage: python3 tests/scripts/make_tokenizer_refs.py  (writes tests/fixtures/tokenizer_refs.json)
"""
import gzip
import json
import tempfile
from pathlib import Path

import gguf
import sentencepiece
from sentencepiece import sentencepiece_model_pb2 as sp_pb

import tokenizers
import transformers
from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import SpmConverter

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared"
FIXTURES = REPO / "tests" / "fixtures"
OUT = FIXTURES / "tokenizer_refs.json"
SPM_VOCAB = FIXTURES / "llama-spm-vocab.gguf.gz"

# Must equal chat::BITNET_TEMPLATE (the test checks): microsoft/bitnet-b1.58-2B-4T's tokenizer_config.json template.
BITNET_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = message['role'] | capitalize + ': '+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}"
)

TEXTS = [
    "",
    " ",
    "\n",
    "Hello world!",
    "  leading spaces",
    "trailing spaces   ",
    "a    b     c      d",
    "tabs\tand\t\ttabs\t",
    "line1\nline2\n\n\nline3\r\nwindows\r\n",
    "   \n\n  \t \n ",
    "a  \n  b \t\n\tc",
    "1234567 and 3.14159 and 1,000,000",
    "Digits: 0 00 000 0000 12345678901234567890",
    "abc123def4567ghi89 x1y2z3 v2.0.1-rc3",
    "I'm sure you'll see it's what we've done, they're here and he'd go; don't",
    "I'M SURE YOU'LL SEE IT'S WHAT WE'VE DONE, THEY'RE HERE AND HE'D GO; DON'T",
    "Mixed 'S 'T 'Re 'vE 'M 'Ll 'D 'x ' s''s",
    "Héllo wörld café naïve façade Ærøskøbing",
    "e\u0301 a\u0308 n\u0303 Z\u0351\u0360\u0489 o\u0336",
    "日本語のテキストです。中文测试，한국어 텍스트",
    "I ❤️ 🦀 and 👍🏽!",
    "family: 👨‍👩‍👧‍👦 and 🏳️‍🌈 flag 🇺🇸🇯🇵",
    "🦀🦀🦀",
    "\U0001F600\U00010348\U000E0001 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "fn main() {\n    let x: Vec<u32> = vec![1, 2, 3];\n    println!(\"{x:?}\");\n}\n",
    "def f(a, b):\n\treturn a**2 + b // 3  # comment\n",
    "https://example.com/path?query=1&b=%20x#frag and mailto:a.b@c.org",
    "<|begin_of_text|>Hello<|eot_id|> world<|end_of_text|>",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
    "<|eot_id| > <|im_end <|unknown|> <|reserved_special_token_5|>",
    "مرحبا بالعالم שלום עולם",
    "नमस्ते दुनिया สวัสดีชาวโลก",
    "Привет, мир! Γειά σου Κόσμε",
    "∀x∈ℝ: x² ≥ 0 ⇒ √x ∈ ℂ; ∑ᵢ aᵢ ≈ π",
    "\ufffd\u200b\u00a0\u2028\u2029\ufeff\u0000\u0007",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa!!!!!!!!----------",
    "Wait... what?!?! (yes) [no] {maybe} <html> &amp; \"quoted\" 'single'",
    "Ⅻ ① ½ ٣٤٥ ０１２ ²³",
    "{\"key\": [1, 2.5e-3, null, true], \"k2\": \"v\\n\"}",
    "\\xff\\xfe %C3%28 \\u{D800} &#xD800; 0xDEADBEEF",
    "# Title\n\n- item **bold** _it_\n> quote\n",
    "The quick brown fox jumps over the lazy dog. It's 3:45pm — \"déjà vu\", isn't it?",
]

# SentencePiece only: control-token text inside the text, where the dummy-prefix rule applies again after each
# control token (llama.cpp and HF's legacy LLaMA tokenizer agree; decoding does not give these texts back).
SPM_SPECIAL_TEXTS = [
    "<s>Hello</s> world",
    "Hello</s>\n<s>[INST] hi [/INST]",
    "</s></s>  x <unk>",
]

CHATS = [
    {"messages": [{"role": "user", "content": "Hello!"}], "add_generation_prompt": True},
    {
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "  What is 2+2?  "},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "And 🦀?\n"},
        ],
        "add_generation_prompt": True,
    },
    {
        "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
        "add_generation_prompt": False,
    },
]


def load_llama3():
    with gzip.open(SHARED / "tokenizers/llama3/tokenizer.json.gz", "rt", encoding="utf-8") as f:
        tok = tokenizers.Tokenizer.from_str(f.read())
    config = json.loads((SHARED / "tokenizers/llama3/tokenizer_config.json").read_text())
    return tok, config


def load_smolbit():
    tok = tokenizers.Tokenizer.from_file(str(SHARED / "models/smolbit-135m/tokenizer.json"))
    config = json.loads((SHARED / "models/smolbit-135m/tokenizer_config.json").read_text())
    return tok, config


def llama2_vocab():
    """tokens, scores, token types of the LLaMA SentencePiece vocabulary fixture."""
    with tempfile.NamedTemporaryFile(suffix=".gguf") as f:
        f.write(gzip.decompress(SPM_VOCAB.read_bytes()))
        f.flush()
        fields = gguf.GGUFReader(f.name).fields
        return [fields[f"tokenizer.ggml.{k}"].contents() for k in ("tokens", "scores", "token_type")]


def load_llama2():
    """HF's tokenizer for the LLaMA SentencePiece vocabulary, and the same model in the `sentencepiece` library."""
    return spm_tokenizer(*llama2_vocab())


def spm_tokenizer(tokens, scores, types):
    """A SentencePiece vocabulary (as GGUF arrays) as LLaMA's tokenizer.model, HF's tokenizer converted from it
    (LlamaTokenizerFast, legacy), and the `sentencepiece` processor of it."""
    proto = sp_pb.ModelProto()
    for text, score, ty in zip(tokens, scores, types):
        piece = proto.pieces.add()
        piece.piece, piece.score, piece.type = text, score, ty  # llama.cpp's token types are SentencePiece's
    t = proto.trainer_spec
    t.model_type, t.byte_fallback, t.vocab_size = sp_pb.TrainerSpec.BPE, True, len(tokens)
    t.unk_id, t.bos_id, t.eos_id, t.pad_id = 0, 1, 2, -1
    n = proto.normalizer_spec
    n.name, n.add_dummy_prefix, n.remove_extra_whitespaces, n.escape_whitespaces = "identity", True, False, True
    tok = SpmConverter.build_tokenizer_from_spm_proto(proto, {text: i for i, text in enumerate(tokens)}, legacy=True)
    # <unk>, <s>, </s> are matched in raw text, as in HF's LLaMA tokenizer.json (added_tokens) and llama.cpp
    # (its special-token cache holds control, user-defined and unknown tokens).
    controls = [text for text, ty in zip(tokens, types) if ty in (2, 3)]
    tok.add_special_tokens([tokenizers.AddedToken(text, special=True, normalized=False) for text in controls])
    tok.post_processor = tokenizers.processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    sp = sentencepiece.SentencePieceProcessor(model_proto=proto.SerializeToString())
    return tok, {"bos_token": "<s>", "eos_token": "</s>"}, sp


def check_llama2_peers(tok, sp):
    """The reference ids must equal sentencepiece's (plain text) and llama.cpp's (its own test strings)."""
    for text in TEXTS:
        assert tok.encode(text, add_special_tokens=False).ids == sp.encode(text), text
    texts = (FIXTURES / "llama-spm-vocab.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    outs = (FIXTURES / "llama-spm-vocab.out").read_text(encoding="utf-8").strip("\n").split("\n")
    for text, out in zip(texts, outs):
        want = [int(x) for x in out.split()]
        assert tok.encode(text, add_special_tokens=False).ids == want == sp.encode(text), text
    return len(outs)


# A template that writes no control tokens, and messages that type control-token text: the engine keeps that text
# as text, so the prompt's ids are what `sentencepiece` (which knows no special tokens) gives for the whole text.
# (Typed control texts are kept apart by spaces: the engine tokenizes each one on its own, so pieces that would
# merge across two adjacent ones, "></" in "</s></s>", are a known difference.)
SPM_PLAIN_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
SPM_PLAIN_MESSAGES = [{"role": "user", "content": "Say </s> or <s> twice"}, {"role": "assistant", "content": "</s> </s>"},
                      {"role": "user", "content": "  <unk>!"}]


def llama2_plain_chat(tok, sp):
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    text = hf.apply_chat_template(SPM_PLAIN_MESSAGES, chat_template=SPM_PLAIN_TEMPLATE, add_generation_prompt=True,
                                  tokenize=False)
    return {"template": SPM_PLAIN_TEMPLATE, "messages": SPM_PLAIN_MESSAGES, "text": text, "ids": sp.encode(text)}


def vocab_refs(tok, config, special_texts=()):
    bos_id = tok.token_to_id(config["bos_token"])
    add_bos = tok.encode("x", add_special_tokens=True).ids[0] == bos_id
    cases = []
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False).ids
        with_special = tok.encode(text, add_special_tokens=True).ids
        assert with_special == ([bos_id] + ids if add_bos else ids), text
        assert tok.decode(ids, skip_special_tokens=False) == text, text
        cases.append({"text": text, "ids": ids})
    special = [{"text": t, "ids": tok.encode(t, add_special_tokens=False).ids} for t in special_texts]
    return {"add_bos": add_bos, "bos": bos_id, "cases": cases, "special_cases": special}


def chat_refs(tok, config, template):
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=config["bos_token"], eos_token=config["eos_token"])
    out = []
    for chat in CHATS:
        text = hf.apply_chat_template(
            chat["messages"], chat_template=template, add_generation_prompt=chat["add_generation_prompt"], tokenize=False
        )
        ids = tok.encode(text, add_special_tokens=False).ids
        out.append({**chat, "text": text, "ids": ids})
    return out


def main():
    llama3, llama3_config = load_llama3()
    smolbit, smolbit_config = load_smolbit()
    llama2, llama2_config, llama2_sp = load_llama2()
    n_llama_cpp = check_llama2_peers(llama2, llama2_sp)
    refs = {
        "generator": f"tokenizers {tokenizers.__version__}, transformers {transformers.__version__}",
        "texts_count": len(TEXTS),
        "llama3": vocab_refs(llama3, llama3_config),
        "smolbit": vocab_refs(smolbit, smolbit_config),
        "llama2": vocab_refs(llama2, llama2_config, SPM_SPECIAL_TEXTS),
        "llama2_plain_chat": llama2_plain_chat(llama2, llama2_sp),
        "bitnet_template": BITNET_TEMPLATE,
        "chat_bitnet_llama3": chat_refs(llama3, llama3_config, BITNET_TEMPLATE),
        "chat_chatml_smolbit": chat_refs(smolbit, smolbit_config, smolbit_config["chat_template"]),
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(refs, ensure_ascii=False, separators=(",", ":")) + "\n", encoding="utf-8")
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes, {len(TEXTS)} texts; llama2 = sentencepiece = llama.cpp on "
          f"{len(TEXTS)} + {n_llama_cpp} texts)")


if __name__ == "__main__":
    main()
