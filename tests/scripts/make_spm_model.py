#!/usr/bin/env python3
"""fam-1bitllm-tokenizer.model: the fam-1bitllm vocabulary (make_family_models.spm_vocab: pieces, scores, types)
as a SentencePiece ModelProto, the `tokenizer.model` that LLaMA-style Hugging Face folders (1bitLLM bitnet_b1_58)
ship instead of tokenizer.json. Input of `bitnet convert`'s tests (engine/tests/convert.rs).

Usage: python3 tests/scripts/make_spm_model.py   (sentencepiece + protobuf from PyPI; deterministic)
Checks that the sentencepiece library tokenizes mtr.TEXTS with it exactly as fam-1bitllm-tokenizer.json does.
"""
import os
import sys

import sentencepiece
import tokenizers
from sentencepiece import sentencepiece_model_pb2 as pb

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_family_models as mfm  # noqa: E402
import make_tokenizer_refs as mtr  # noqa: E402


def main():
    tokens, scores, types = mfm.spm_vocab()
    m = pb.ModelProto()
    for t, s, ty in zip(tokens, scores, types):
        m.pieces.add(piece=t, score=s, type=ty)
    # LLaMA's trainer and normalizer settings (the ones that change tokenization).
    ts = m.trainer_spec
    ts.model_type = pb.TrainerSpec.BPE
    ts.vocab_size = len(tokens)
    ts.byte_fallback = True
    ts.unk_id, ts.bos_id, ts.eos_id, ts.pad_id = 0, 1, 2, -1
    ns = m.normalizer_spec
    ns.name = "identity"
    ns.add_dummy_prefix = True
    ns.remove_extra_whitespaces = False
    ns.escape_whitespaces = True
    data = m.SerializeToString()
    sp = sentencepiece.SentencePieceProcessor(model_proto=data)
    hf = tokenizers.Tokenizer.from_file(os.path.join(mfm.OUT, "fam-1bitllm-tokenizer.json"))
    for text in mtr.TEXTS:
        assert sp.encode(text) == hf.encode(text, add_special_tokens=False).ids, text
    with open(os.path.join(mfm.OUT, "fam-1bitllm-tokenizer.model"), "wb") as f:
        f.write(data)
    print(f"fam-1bitllm-tokenizer.model: {len(tokens)} pieces, {len(data)} bytes")


if __name__ == "__main__":
    main()
