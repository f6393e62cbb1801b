//! `tokenizer.model`: a SentencePiece ModelProto (protobuf), the only tokenizer file of many LLaMA-style
//! Hugging Face folders (1bitLLM bitnet_b1_58). Read as llama.cpp's converter reads it
//! (`_set_vocab_sentencepiece`): pieces, scores and types become GGUF's `llama` vocabulary.
//!
//! Only the fields used are declared (field numbers from sentencepiece's `sentencepiece_model.proto`);
//! protobuf skips the others.

use super::tokenizer::with_special_ids;
use crate::format::gguf::Value;
use crate::{Error, Result};
use prost::Message;

#[derive(Clone, PartialEq, Message)]
struct ModelProto {
    #[prost(message, repeated, tag = "1")]
    pieces: Vec<SentencePiece>,
    #[prost(message, optional, tag = "2")]
    trainer_spec: Option<TrainerSpec>,
    #[prost(message, optional, tag = "3")]
    normalizer_spec: Option<NormalizerSpec>,
}

#[derive(Clone, PartialEq, Message)]
struct SentencePiece {
    #[prost(string, optional, tag = "1")]
    piece: Option<String>,
    #[prost(float, optional, tag = "2")]
    score: Option<f32>,
    /// NORMAL 1, UNKNOWN 2, CONTROL 3, USER_DEFINED 4, UNUSED 5, BYTE 6: llama.cpp's token types, same numbers.
    #[prost(int32, optional, tag = "3")]
    r#type: Option<i32>,
}

#[derive(Clone, PartialEq, Message)]
struct TrainerSpec {
    /// UNIGRAM 1, BPE 2, WORD 3, CHAR 4.
    #[prost(int32, optional, tag = "3")]
    model_type: Option<i32>,
    #[prost(int32, optional, tag = "40")]
    unk_id: Option<i32>,
    #[prost(int32, optional, tag = "41")]
    bos_id: Option<i32>,
    #[prost(int32, optional, tag = "42")]
    eos_id: Option<i32>,
}

#[derive(Clone, PartialEq, Message)]
struct NormalizerSpec {
    #[prost(bool, optional, tag = "3")]
    add_dummy_prefix: Option<bool>,
}

fn err(msg: impl std::fmt::Display) -> Error {
    Error::Tokenizer(format!("tokenizer.model: {msg}"))
}

/// GGUF tokenizer metadata from a SentencePiece BPE `tokenizer.model` (and tokenizer_config.json where present:
/// BOS/EOS/padding by text, add_bos_token, chat template; the model's own ids and LLaMA's add-BOS otherwise).
pub fn metadata_from_spm_model(model: &[u8], tokenizer_config_json: Option<&str>) -> Result<Vec<(String, Value)>> {
    let m = ModelProto::decode(model).map_err(err)?;
    if m.pieces.is_empty() {
        return Err(err("no pieces"));
    }
    let trainer = m.trainer_spec.unwrap_or_default();
    // Defaults are the proto's: model_type UNIGRAM, ids unk 0 / bos 1 / eos 2, add_dummy_prefix true.
    if trainer.model_type.unwrap_or(1) != 2 {
        return Err(Error::Unsupported(format!(
            "tokenizer.model of SentencePiece model type {} (only BPE, as LLaMA's)",
            trainer.model_type.unwrap_or(1)
        )));
    }
    let mut tokens = Vec::with_capacity(m.pieces.len());
    let (mut scores, mut types) = (Vec::new(), Vec::new());
    for (id, p) in m.pieces.into_iter().enumerate() {
        let ty = p.r#type.unwrap_or(1);
        if !(1..=6).contains(&ty) {
            return Err(err(format!("piece {id} has type {ty} (1 to 6)")));
        }
        tokens.push(p.piece.ok_or_else(|| err(format!("piece {id} has no text")))?);
        scores.push(Value::F32(p.score.unwrap_or(0.0)));
        types.push(Value::I32(ty));
    }
    let config: serde_json::Value = match tokenizer_config_json {
        Some(s) => serde_json::from_str(s).map_err(|e| Error::Tokenizer(format!("tokenizer_config.json: {e}")))?,
        None => serde_json::Value::Null,
    };
    add_config_tokens(&config, &mut tokens, &mut scores, &mut types)?;
    let add_space_prefix = m.normalizer_spec.and_then(|n| n.add_dummy_prefix).unwrap_or(true);
    let md = vec![
        ("tokenizer.ggml.model".to_owned(), Value::Str("llama".into())),
        ("tokenizer.ggml.pre".to_owned(), Value::Str("default".into())),
        ("tokenizer.ggml.tokens".to_owned(), Value::Array(tokens.iter().cloned().map(Value::Str).collect())),
        ("tokenizer.ggml.scores".to_owned(), Value::Array(scores)),
        ("tokenizer.ggml.token_type".to_owned(), Value::Array(types)),
        ("tokenizer.ggml.add_space_prefix".to_owned(), Value::Bool(add_space_prefix)),
    ];
    let mut md = with_special_ids(md, &tokens, &serde_json::Value::Null, &config);
    // What tokenizer_config.json does not name comes from the model: its special ids, and LlamaTokenizer's
    // default of adding BOS.
    let ids = [
        ("tokenizer.ggml.bos_token_id", trainer.bos_id.unwrap_or(1)),
        ("tokenizer.ggml.eos_token_id", trainer.eos_id.unwrap_or(2)),
        ("tokenizer.ggml.unknown_token_id", trainer.unk_id.unwrap_or(0)),
    ];
    for (key, id) in ids {
        if id >= 0 && (id as usize) < tokens.len() && !md.iter().any(|(k, _)| k == key) {
            md.push((key.to_owned(), Value::U32(id as u32)));
        }
    }
    let add_bos = config["add_bos_token"].as_bool().unwrap_or(true);
    for (k, v) in md.iter_mut() {
        if k == "tokenizer.ggml.add_bos_token" {
            *v = Value::Bool(add_bos);
        }
    }
    Ok(md)
}

/// tokenizer_config.json's `added_tokens_decoder` (e.g. a `<pad>` after LLaMA's 32000 pieces) replaces or appends
/// tokens as llama.cpp's converter does: control when special, user-defined otherwise, score −1000; ids skipped
/// over become `[PADn]` placeholders of type unused.
fn add_config_tokens(
    config: &serde_json::Value,
    tokens: &mut Vec<String>,
    scores: &mut Vec<Value>,
    types: &mut Vec<Value>,
) -> Result<()> {
    let Some(added) = config["added_tokens_decoder"].as_object() else { return Ok(()) };
    for (id, t) in added {
        let bad = || Error::Tokenizer(format!("tokenizer_config.json: bad added token {id}: {t}"));
        let id: usize = id.parse().map_err(|_| bad())?;
        let text = t["content"].as_str().ok_or_else(bad)?;
        // Ids may leave a few holes (as in hf_tokens), not gigabytes of them.
        if id >= 4 * (tokens.len() + added.len()) {
            return Err(bad());
        }
        while tokens.len() <= id {
            tokens.push(format!("[PAD{}]", tokens.len()));
            scores.push(Value::F32(-1000.0));
            types.push(Value::I32(5));
        }
        tokens[id] = text.to_owned();
        scores[id] = Value::F32(-1000.0);
        types[id] = Value::I32(if t["special"].as_bool().unwrap_or(false) { 3 } else { 4 });
    }
    Ok(())
}
