//! Text to token ids and back, built from a GGUF file's `tokenizer.ggml.*` metadata.
//!
//! Two kinds of vocabulary, as llama.cpp names them in `tokenizer.ggml.model`:
//! - `gpt2`: byte-level BPE (Llama 3 / BitNet 2B4T, Falcon3, SmolLM, GPT-2), from tokens and merges;
//! - `llama`: SentencePiece BPE (LLaMA / LLaMA-2, the 1bitLLM `bitnet_b1_58` models), from tokens and scores:
//!   spaces become `▁`, one `▁` is prepended to each stretch of text (the "dummy prefix"), pieces merge best score
//!   first, and characters outside the vocabulary fall back to `<0xNN>` byte tokens.
//!
//! The BPE itself is Hugging Face's `tokenizers` crate, assembled here from the GGUF arrays, so the ids are
//! the ones the model was trained with; what this module adds is the mapping from llama.cpp's metadata conventions
//! (pre-tokenizer names, token types, scores, BOS rules, end-of-generation tokens) and byte-exact detokenization.

use crate::format::gguf::Value;
use crate::text::chat::{self, ChatMessage};
use crate::{Error, Result};
use tokenizers::models::bpe::{Merges, Vocab, BPE};
use tokenizers::normalizers::{Prepend, Replace};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, NormalizerWrapper, PreTokenizerWrapper, SplitDelimiterBehavior};

/// Llama 3's pre-tokenizer split (as in its tokenizer.json; llama.cpp's `llama-bpe` is the same expression).
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Qwen2/Qwen3's split (tokenizer.json; llama.cpp's `qwen2`): Llama 3's with every digit on its own.
const QWEN2_REGEX: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Token texts that end a generation whatever the vocabulary's eos/eot ids say (chat models stop on these).
const END_TEXTS: [&str; 5] = ["<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|im_end|>", "<|endoftext|>"];

// llama.cpp token types (tokenizer.ggml.token_type), the same numbers as SentencePiece's piece types.
const TYPE_NORMAL: u64 = 1;
const TYPE_UNKNOWN: u64 = 2;
const TYPE_CONTROL: u64 = 3;
const TYPE_USER_DEFINED: u64 = 4;
const TYPE_UNUSED: u64 = 5;
const TYPE_BYTE: u64 = 6;

/// SentencePiece's stand-in for a space.
const SPM_SPACE: char = '▁';

/// The kind of vocabulary: llama.cpp's `tokenizer.ggml.model`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// `gpt2`: byte-level BPE with this pre-tokenizer.
    ByteLevel(Pre),
    /// `llama`: SentencePiece BPE; `space_prefix` is `tokenizer.ggml.add_space_prefix` (default true).
    SentencePiece { space_prefix: bool },
}

/// The pre-tokenizers we know, named as llama.cpp's `tokenizer.ggml.pre`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pre {
    /// Llama 3 split regex, then bytes to the GPT-2 alphabet; whole words found in the vocabulary skip the merges.
    Llama3,
    /// Every digit on its own, then GPT-2's regex and alphabet.
    SmolLm,
    /// GPT-2's regex and alphabet.
    Gpt2,
    /// Qwen2/Qwen3: NFC normalization (as their tokenizer.json), the Qwen2 split regex, bytes to the GPT-2
    /// alphabet; every merge applies (no whole-word shortcut).
    Qwen2,
}

impl Pre {
    fn name(self) -> &'static str {
        match self {
            Pre::Llama3 => "llama-bpe",
            Pre::SmolLm => "smollm",
            Pre::Gpt2 => "gpt2",
            Pre::Qwen2 => "qwen2",
        }
    }

    fn pre_tokenizer(self) -> Result<PreTokenizerWrapper> {
        let gpt2 = ByteLevel::new(false, true, true);
        Ok(match self {
            Pre::Llama3 | Pre::Qwen2 => {
                let regex = if self == Pre::Qwen2 { QWEN2_REGEX } else { LLAMA3_REGEX };
                let split = Split::new(SplitPattern::Regex(regex.into()), SplitDelimiterBehavior::Isolated, false)
                    .map_err(|e| Error::Tokenizer(format!("{} split regex: {e}", self.name())))?;
                Sequence::new(vec![split.into(), ByteLevel::new(false, true, false).into()]).into()
            }
            Pre::SmolLm => Sequence::new(vec![Digits::new(true).into(), gpt2.into()]).into(),
            Pre::Gpt2 => gpt2.into(),
        })
    }
}

pub struct Tokenizer {
    bpe: tokenizers::Tokenizer,
    /// Token texts by id, as stored in the GGUF (byte-level alphabet for normal tokens).
    tokens: Vec<String>,
    /// llama.cpp token types by id.
    types: Vec<u64>,
    bos: Option<u32>,
    eos: Option<u32>,
    /// Every id that ends a generation.
    end_ids: Vec<u32>,
    add_bos: bool,
    /// `tokenizer.ggml.add_eos_token`: end every text with EOS (embedding models pool that token).
    add_eos: bool,
    kind: Kind,
    chat_template: Option<String>,
    /// Control (and unknown) token texts, longest first, with their ids: the tokens a chat template writes, and
    /// the texts a chat message may not turn into tokens (see `encode_chat`).
    specials: Vec<(String, u32)>,
    /// The tokenizer without those special tokens: text in which control-token text is just text.
    plain: tokenizers::Tokenizer,
}

/// Stand-ins for control-token text inside chat messages while the template renders (`encode_chat`):
/// private-use characters, the `k`-th of `specials` being `base + k`, the base being the first of
/// these ranges that no character of the conversation falls in (so that no message can type a marker).
const MARKER_BASES: [u32; 4] = [0xF0000, 0xF8000, 0x100000, 0x108000];
const MARKERS: u32 = 0x7FFE;

impl Tokenizer {
    /// Build from GGUF metadata (`tokenizer.ggml.*` keys), the only source at run time.
    pub fn from_metadata(md: &[(String, Value)]) -> Result<Tokenizer> {
        let model = get_str(md, "tokenizer.ggml.model")?.ok_or_else(|| missing("tokenizer.ggml.model"))?;
        if !["gpt2", "llama"].contains(&model) {
            return Err(Error::Unsupported(format!(
                "tokenizer.ggml.model '{model}' (supported: gpt2 = byte-level BPE, llama = SentencePiece)"
            )));
        }
        let tokens = get_strings(md, "tokenizer.ggml.tokens")?.ok_or_else(|| missing("tokenizer.ggml.tokens"))?;
        let types = match get_array(md, "tokenizer.ggml.token_type")? {
            Some(a) if a.len() != tokens.len() => {
                return Err(bad(
                    "tokenizer.ggml.token_type",
                    format!("{} entries for {} tokens", a.len(), tokens.len()),
                ))
            }
            Some(a) => a
                .iter()
                .map(|v| v.as_u64().ok_or_else(|| bad("tokenizer.ggml.token_type", "not an integer")))
                .collect::<Result<Vec<_>>>()?,
            None => vec![TYPE_NORMAL; tokens.len()],
        };
        let (kind, model) = if model == "llama" {
            let space_prefix = match get(md, "tokenizer.ggml.add_space_prefix") {
                Some(v) => v.as_bool().ok_or_else(|| bad("tokenizer.ggml.add_space_prefix", "not a bool"))?,
                None => true,
            };
            let kind = Kind::SentencePiece { space_prefix };
            (kind, spm_model(&tokens, &types, &get_scores(md, tokens.len())?)?)
        } else {
            let merges = get_strings(md, "tokenizer.ggml.merges")?.unwrap_or_default();
            let pre = resolve_pre(get_str(md, "tokenizer.ggml.pre")?, &tokens)?;
            (Kind::ByteLevel(pre), bpe_model(&tokens, &merges, pre)?)
        };
        let (bpe, plain, specials) = build_tokenizer(model, kind, &tokens, &types)?;
        let token_id = |key: &str| -> Result<Option<u32>> {
            match get(md, key).map(|v| v.as_u64()) {
                None => Ok(None),
                Some(Some(id)) if (id as usize) < tokens.len() => Ok(Some(id as u32)),
                Some(_) => Err(bad(key, format!("not a token id below the vocabulary size {}", tokens.len()))),
            }
        };
        let (bos, eos, eot) = (
            token_id("tokenizer.ggml.bos_token_id")?,
            token_id("tokenizer.ggml.eos_token_id")?,
            token_id("tokenizer.ggml.eot_token_id")?,
        );
        let mut end_ids: Vec<u32> = eos.into_iter().chain(eot).collect();
        for (id, text) in tokens.iter().enumerate() {
            if END_TEXTS.contains(&text.as_str()) && !end_ids.contains(&(id as u32)) {
                end_ids.push(id as u32);
            }
        }
        let add_bos = match get(md, "tokenizer.ggml.add_bos_token") {
            Some(v) => v.as_bool().ok_or_else(|| bad("tokenizer.ggml.add_bos_token", "not a bool"))?,
            // llama.cpp's defaults: SentencePiece and Llama 3 vocabularies start with BOS.
            None => matches!(kind, Kind::ByteLevel(Pre::Llama3) | Kind::SentencePiece { .. }),
        } && bos.is_some(); // a file may ask for BOS without saying which token it is
        let add_eos = match get(md, "tokenizer.ggml.add_eos_token") {
            Some(v) => v.as_bool().ok_or_else(|| bad("tokenizer.ggml.add_eos_token", "not a bool"))?,
            None => false,
        } && eos.is_some();
        let chat_template = get_str(md, "tokenizer.chat_template")?.map(str::to_owned);
        Ok(Tokenizer { bpe, tokens, types, bos, eos, end_ids, add_bos, add_eos, kind, chat_template, specials, plain })
    }

    /// Token ids of `text`; special-token text inside it (e.g. "<|eot_id|>") becomes that token, as in llama.cpp.
    pub fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>> {
        let enc = self.bpe.encode_fast(text, false).map_err(|e| Error::Tokenizer(e.to_string()))?;
        let bos = self.bos.filter(|_| add_bos);
        Ok(bos.into_iter().chain(enc.get_ids().iter().copied()).collect())
    }

    /// The text of `ids`; special tokens appear as their text. Bytes that are not UTF-8 become U+FFFD.
    /// SentencePiece: the space the dummy prefix put before the first token is removed (as HF and llama.cpp do),
    /// so that `decode(encode(text))` is `text`.
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut bytes: Vec<u8> = ids.iter().flat_map(|&id| self.token_bytes(id)).collect();
        let first_is_text = ids.first().is_some_and(|&id| self.types.get(id as usize) == Some(&TYPE_NORMAL));
        if self.kind == (Kind::SentencePiece { space_prefix: true }) && first_is_text && bytes.first() == Some(&b' ') {
            bytes.remove(0);
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// The raw bytes one token stands for (a piece of a UTF-8 character, possibly); empty for an unknown id.
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        let Some(text) = self.tokens.get(id as usize) else { return Vec::new() };
        let ty = self.types[id as usize];
        if ty != TYPE_NORMAL && ty != TYPE_BYTE && ty != TYPE_UNUSED {
            return text.as_bytes().to_vec();
        }
        if let Kind::SentencePiece { .. } = self.kind {
            return match ty {
                TYPE_BYTE => byte_token(text).map(|b| vec![b]).unwrap_or_default(),
                _ => text.replace(SPM_SPACE, " ").into_bytes(),
            };
        }
        let mut out = Vec::with_capacity(text.len());
        for c in text.chars() {
            match byte_of_char(c) {
                Some(b) => out.push(b),
                // Not in the byte-level alphabet (a hand-made vocabulary): keep the character itself.
                None => out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
            }
        }
        out
    }

    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    pub fn bos(&self) -> Option<u32> {
        self.bos
    }

    pub fn eos(&self) -> Option<u32> {
        self.eos
    }

    /// Whether prompts start with BOS (`tokenizer.ggml.add_bos_token`; without it, true for Llama 3 and
    /// SentencePiece vocabularies).
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    pub fn add_eos(&self) -> bool {
        self.add_eos
    }

    /// EOS, EOT, and the usual end-of-turn tokens found by text.
    pub fn is_end_of_generation(&self, id: u32) -> bool {
        self.end_ids.contains(&id)
    }

    /// Control, user-defined and unknown tokens (`<|eot_id|>`): their text is not text the model writes.
    pub fn is_special(&self, id: u32) -> bool {
        matches!(self.types.get(id as usize), Some(&(TYPE_CONTROL | TYPE_USER_DEFINED | TYPE_UNKNOWN)))
    }

    /// The token's text as stored in the vocabulary (byte-level alphabet for normal tokens: "Ġworld").
    pub fn token_text(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }

    /// The pre-tokenizer in use, by its llama.cpp name ("default" for SentencePiece, which has none).
    pub fn pre(&self) -> &str {
        match self.kind {
            Kind::ByteLevel(pre) => pre.name(),
            Kind::SentencePiece { .. } => "default",
        }
    }

    /// The vocabulary kind, as `tokenizer.ggml.model` names it: "gpt2" (byte-level BPE) or "llama" (SentencePiece).
    pub fn model(&self) -> &str {
        match self.kind {
            Kind::ByteLevel(_) => "gpt2",
            Kind::SentencePiece { .. } => "llama",
        }
    }

    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// The chat template in use, and why: the file's `tokenizer.chat_template`; else BitNet 2B4T's when the
    /// vocabulary has its `<|eot_id|>` (Microsoft's GGUF carries none); else none (a base model: an error to chat).
    pub fn template_choice(&self) -> (Option<&str>, &'static str) {
        if let Some(t) = self.chat_template() {
            return (Some(t), "tokenizer.chat_template of the file");
        }
        if self.tokens.iter().any(|t| t == "<|eot_id|>") {
            return (
                Some(chat::BITNET_TEMPLATE),
                "none in the file; BitNet b1.58 2B4T's (the vocabulary has <|eot_id|>)",
            );
        }
        (None, "none in the file, and the vocabulary is not 2B4T's: a base model, no chat")
    }

    fn template(&self) -> Result<&str> {
        self.template_choice().0.ok_or_else(|| {
            Error::Template("the model file has no chat template (tokenizer.chat_template): use a plain prompt".into())
        })
    }

    /// The conversation as prompt text, by the model's template (see `template_choice`).
    pub fn render_chat(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        self.render_chat_with(messages, None, add_generation_prompt)
    }

    /// `render_chat`, with the tools the model may call (OpenAI's `tools` list) given to the template.
    pub fn render_chat_with(
        &self,
        messages: &[ChatMessage],
        tools: Option<&[serde_json::Value]>,
        add_generation_prompt: bool,
    ) -> Result<String> {
        let text_of = |id: Option<u32>| id.and_then(|id| self.token_text(id)).unwrap_or("");
        let (bos, eos) = (text_of(self.bos), text_of(self.eos));
        chat::render(self.template()?, messages, tools, add_generation_prompt, bos, eos)
    }

    /// How the model's template writes tool calls, or None if it has no tool support.
    pub fn tool_format(&self) -> Option<crate::text::tools::ToolFormat> {
        self.template_choice().0.and_then(crate::text::tools::ToolFormat::of_template)
    }

    /// The conversation as prompt ids. BOS is added per `add_bos()` unless the template already wrote it.
    /// Control-token text inside a message ("<|eot_id|>" typed by a user) is tokenized as text, so that
    /// no message can forge a turn of another role; only the template writes control tokens.
    pub fn encode_chat(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<Vec<u32>> {
        self.encode_chat_with(messages, None, add_generation_prompt, false)
    }

    /// `encode_chat`, with the tools the model may call (see `render_chat_with`), and `parse_special` making
    /// control-token text in messages real control tokens (what llama.cpp does; for trusted input only).
    pub fn encode_chat_with(
        &self,
        messages: &[ChatMessage],
        tools: Option<&[serde_json::Value]>,
        add_generation_prompt: bool,
        parse_special: bool,
    ) -> Result<Vec<u32>> {
        let base = if parse_special { None } else { Some(self.marker_base(messages, tools)?) };
        let text = match base {
            None => self.render_chat_with(messages, tools, add_generation_prompt)?,
            Some(base) => {
                // Tool definitions and calls are the client's text too: marked like the messages.
                let mark = |text: &str| self.mark_control_text(text, base);
                let mark_json = |v: &serde_json::Value| self.mark_json(v, base);
                let marked: Vec<ChatMessage> = messages
                    .iter()
                    .map(|m| ChatMessage {
                        role: mark(&m.role),
                        content: mark(&m.content),
                        tool_calls: (m.tool_calls.iter())
                            .map(|c| chat::ToolCall {
                                id: mark(&c.id),
                                kind: mark(&c.kind),
                                function: chat::FunctionCall {
                                    name: mark(&c.function.name),
                                    arguments: mark_json(&c.function.arguments),
                                },
                            })
                            .collect(),
                        tool_call_id: m.tool_call_id.as_deref().map(mark),
                    })
                    .collect();
                let tools: Option<Vec<serde_json::Value>> = tools.map(|t| t.iter().map(mark_json).collect());
                self.render_chat_with(&marked, tools.as_deref(), add_generation_prompt)?
            }
        };
        let bos_written = self.bos.and_then(|id| self.token_text(id)).is_some_and(|bos| text.starts_with(bos));
        let mut ids: Vec<u32> = self.bos.filter(|_| self.add_bos && !bos_written).into_iter().collect();
        let Some(base) = base else {
            ids.extend(self.encode(&text, false)?);
            return Ok(ids);
        };
        // The template's control tokens split the text into runs, as a tokenizer splits at special tokens; in a
        // run, each marker is the control-token text a message typed, tokenized as text in its context.
        let firsts: std::collections::HashSet<char> =
            self.specials.iter().filter_map(|(t, _)| t.chars().next()).collect();
        let (mut run, mut rest) = (String::new(), text.as_str());
        while let Some(c) = rest.chars().next() {
            let special = firsts.contains(&c).then(|| self.specials.iter().find(|(t, _)| rest.starts_with(t.as_str())));
            if let Some(Some((t, id))) = special {
                ids.extend(self.encode_plain(&run)?);
                run.clear();
                ids.push(*id);
                rest = &rest[t.len()..];
                continue;
            }
            let marked = (c as u32).checked_sub(base).and_then(|k| self.specials.get(k as usize));
            match marked {
                Some((t, _)) => run.push_str(t),
                None => run.push(c),
            }
            rest = &rest[c.len_utf8()..];
        }
        ids.extend(self.encode_plain(&run)?);
        Ok(ids)
    }

    /// Ids of `text` with no special tokens recognised (SentencePiece: with the dummy prefix, as after a control
    /// token).
    fn encode_plain(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.plain.encode_fast(text, false).map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// The first of MARKER_BASES whose markers appear nowhere in the conversation or the template.
    fn marker_base(&self, messages: &[ChatMessage], tools: Option<&[serde_json::Value]>) -> Result<u32> {
        let template = self.template()?;
        // Every string of the conversation is in its JSON (which escapes no private-use character).
        let json = serde_json::to_string(&(messages, tools)).map_err(|e| Error::Invalid(e.to_string()))?;
        let texts = || [json.as_str(), template].into_iter();
        let n = self.specials.len() as u32;
        let free = |base: u32| !texts().flat_map(str::chars).any(|c| (base..base + n).contains(&(c as u32)));
        MARKER_BASES.into_iter().find(|&base| free(base)).ok_or_else(|| {
            Error::Invalid("the chat messages use every private-use character range the tokenizer needs".into())
        })
    }

    /// `value` with control-token text replaced by markers in every string and key.
    fn mark_json(&self, value: &serde_json::Value, base: u32) -> serde_json::Value {
        use serde_json::Value as J;
        match value {
            J::String(s) => J::String(self.mark_control_text(s, base)),
            J::Array(items) => J::Array(items.iter().map(|v| self.mark_json(v, base)).collect()),
            J::Object(map) => {
                J::Object(map.iter().map(|(k, v)| (self.mark_control_text(k, base), self.mark_json(v, base))).collect())
            }
            other => other.clone(),
        }
    }

    /// `text` with each control-token text replaced by its marker character.
    fn mark_control_text(&self, text: &str, base: u32) -> String {
        let mut out = text.to_owned();
        for (k, (control, _)) in self.specials.iter().enumerate() {
            if out.contains(control.as_str()) {
                if let Some(marker) = char::from_u32(base + k as u32) {
                    out = out.replace(control.as_str(), marker.encode_utf8(&mut [0; 4]));
                }
            }
        }
        out
    }
}

/// `tokenizer.ggml.pre`, or the Llama 3 split when the key is missing but the vocabulary is Llama 3's
/// (Microsoft's 2B4T GGUF has no `pre` key).
fn resolve_pre(pre: Option<&str>, tokens: &[String]) -> Result<Pre> {
    match pre {
        // Falcon3's pre-tokenizer is the Llama 3 split (llama.cpp maps `falcon3` to it).
        Some("llama-bpe" | "llama3" | "falcon3") => Ok(Pre::Llama3),
        Some("smollm") => Ok(Pre::SmolLm),
        Some("qwen2") => Ok(Pre::Qwen2),
        Some("gpt2" | "default") => Ok(Pre::Gpt2),
        Some(other) => Err(Error::Unsupported(format!(
            "tokenizer.ggml.pre '{other}' (supported: llama-bpe, llama3, falcon3, smollm, qwen2, gpt2, default)"
        ))),
        None if tokens.get(128000).is_some_and(|t| t == "<|begin_of_text|>") => Ok(Pre::Llama3),
        None => Ok(Pre::Gpt2),
    }
}

/// The tokenizer, the same without special tokens, and the special tokens' texts and ids (longest first, at most
/// MARKERS of them).
type Built = (tokenizers::Tokenizer, tokenizers::Tokenizer, Vec<(String, u32)>);

/// Token text → id; a duplicated text keeps its first id, as llama.cpp's token_to_id does.
fn vocab_of(tokens: &[String]) -> Vocab {
    let mut vocab = Vocab::default();
    for (id, text) in tokens.iter().enumerate() {
        vocab.entry(text.clone()).or_insert(id as u32);
    }
    vocab
}

fn bpe_error(e: tokenizers::Error) -> Error {
    Error::Tokenizer(format!("building the BPE from the GGUF vocabulary: {e}"))
}

/// Byte-level BPE from the GGUF's merges.
fn bpe_model(tokens: &[String], merges: &[String], pre: Pre) -> Result<BPE> {
    let merges = merges.iter().map(|m| split_merge(m)).collect::<Result<Merges>>()?;
    let builder = BPE::builder().vocab_and_merges(vocab_of(tokens), merges).ignore_merges(pre == Pre::Llama3);
    builder.build().map_err(bpe_error)
}

/// SentencePiece BPE as a `tokenizers` BPE, the way Hugging Face converts a SentencePiece model (transformers'
/// `SpmConverter`): every split of a normal piece into two normal pieces is a merge, ranked by the score of the
/// merged piece (best first), then by its id. llama.cpp's tokenizer merges the best-scoring adjacent pair at each
/// step, which is the same order. Characters no piece covers become `<0xNN>` byte tokens.
fn spm_model(tokens: &[String], types: &[u64], scores: &[f32]) -> Result<BPE> {
    let normal: std::collections::HashMap<&str, usize> =
        (0..tokens.len()).filter(|&i| types[i] == TYPE_NORMAL).map(|i| (tokens[i].as_str(), i)).collect();
    let mut ranked: Vec<(f32, usize, &str, &str)> = Vec::new();
    for (&piece, &id) in &normal {
        for (at, _) in piece.char_indices().skip(1) {
            let (left, right) = piece.split_at(at);
            if normal.contains_key(left) && normal.contains_key(right) {
                ranked.push((scores[id], id, left, right));
            }
        }
    }
    ranked.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(b.2)));
    let merges: Merges = ranked.into_iter().map(|(_, _, l, r)| (l.to_owned(), r.to_owned())).collect();
    let mut builder = BPE::builder().vocab_and_merges(vocab_of(tokens), merges).byte_fallback(true).fuse_unk(true);
    if let Some(unk) = types.iter().position(|&t| t == TYPE_UNKNOWN) {
        builder = builder.unk_token(tokens[unk].clone());
    }
    builder.build().map_err(bpe_error)
}

/// `<0x41>` → 0x41.
fn byte_token(text: &str) -> Option<u8> {
    let hex = text.strip_prefix("<0x")?.strip_suffix('>')?;
    u8::from_str_radix(hex, 16).ok().filter(|_| hex.len() == 2)
}

/// The tokenizer around the BPE model: byte-level pre-tokenizer, or SentencePiece's space handling; special tokens.
fn build_tokenizer(model: BPE, kind: Kind, tokens: &[String], types: &[u64]) -> Result<Built> {
    let mut tk = tokenizers::Tokenizer::new(model);
    match kind {
        Kind::ByteLevel(pre) => {
            tk.with_pre_tokenizer(Some(pre.pre_tokenizer()?));
            if pre == Pre::Qwen2 {
                tk.with_normalizer(Some(tokenizers::normalizers::unicode::NFC))
                    .map_err(|e| Error::Tokenizer(format!("NFC normalizer: {e}")))?;
            }
        }
        Kind::SentencePiece { space_prefix } => {
            // Spaces become ▁, then one ▁ goes before each stretch of text between special tokens (HF's legacy
            // LLaMA tokenizer; llama.cpp adds it after every special token too). Empty text stays empty.
            let space = Replace::new(" ", SPM_SPACE.to_string())
                .map_err(|e| Error::Tokenizer(format!("SentencePiece normalizer: {e}")))?;
            let mut steps: Vec<NormalizerWrapper> = vec![space.into()];
            if space_prefix {
                steps.push(Prepend::new(SPM_SPACE.to_string()).into());
            }
            tk.with_normalizer(Some(tokenizers::normalizers::Sequence::new(steps)))
                .map_err(|e| Error::Tokenizer(format!("SentencePiece normalizer: {e}")))?;
        }
    }
    // Control, unknown and user-defined tokens are matched in the raw text before any splitting (llama.cpp's
    // special-token cache; HF lists <unk>, <s>, </s> of LLaMA as added tokens). `plain` has the user-defined ones.
    let added = |want: &[u64], special: bool| -> Vec<AddedToken> {
        let picked = types.iter().zip(tokens).filter(|(t, text)| want.contains(t) && !text.is_empty());
        picked.map(|(_, text)| AddedToken::from(text.as_str(), special).normalized(false)).collect()
    };
    let tokenizer_err = |e: tokenizers::Error| Error::Tokenizer(format!("adding special tokens: {e}"));
    tk.add_tokens(added(&[TYPE_USER_DEFINED], false)).map_err(tokenizer_err)?;
    let plain = tk.clone();
    tk.add_special_tokens(added(&[TYPE_CONTROL, TYPE_UNKNOWN], true)).map_err(tokenizer_err)?;
    let mut specials: Vec<(String, u32)> = (0..tokens.len())
        .filter(|&i| (types[i] == TYPE_CONTROL || types[i] == TYPE_UNKNOWN) && !tokens[i].is_empty())
        .map(|i| (tokens[i].clone(), i as u32))
        .collect();
    // Longest first (a text that starts another matches whole); a repeated text keeps its first id.
    specials.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.0.cmp(&b.0)).then(a.1.cmp(&b.1)));
    specials.dedup_by(|a, b| a.0 == b.0);
    specials.truncate(MARKERS as usize);
    Ok((tk, plain, specials))
}

/// "a b" → ("a", "b"); the separator is the first space after the first character, as in llama.cpp.
fn split_merge(merge: &str) -> Result<(String, String)> {
    let sep = merge.char_indices().skip(1).find(|&(_, c)| c == ' ').map(|(i, _)| i);
    let sep = sep.ok_or_else(|| bad("tokenizer.ggml.merges", format!("'{merge}' is not two tokens")))?;
    Ok((merge[..sep].to_owned(), merge[sep + 1..].to_owned()))
}

/// GPT-2's byte-level alphabet, inverted. Printable Latin-1 bytes stand for themselves; the other 68 bytes
/// (controls, space, DEL, NBSP, soft hyphen) were given the characters U+0100.. in byte order.
fn byte_of_char(c: char) -> Option<u8> {
    const fn printable(b: u32) -> bool {
        (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || b >= 174
    }
    const SHIFTED: [u8; 68] = {
        let (mut table, mut n, mut b) = ([0u8; 68], 0, 0);
        while b < 256 {
            if !printable(b) {
                table[n] = b as u8;
                n += 1;
            }
            b += 1;
        }
        table
    };
    match c as u32 {
        b @ 0..=255 if printable(b) => Some(b as u8),
        u @ 256..=323 => Some(SHIFTED[(u - 256) as usize]),
        _ => None,
    }
}

/// Incremental detokenizer: text pieces that are always valid UTF-8. The bytes of a character split across tokens
/// (emoji, CJK) are held until it is complete; bytes that can never become UTF-8 come out as U+FFFD.
#[derive(Default)]
pub struct StreamDecoder {
    pending: Vec<u8>,
}

impl StreamDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> String {
        self.pending.extend(tok.token_bytes(id));
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    out.push_str(s);
                    self.pending.clear();
                    return out;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    out.push_str(std::str::from_utf8(&self.pending[..valid]).unwrap_or_default());
                    match e.error_len() {
                        // An invalid sequence: nothing later can fix it.
                        Some(bad_len) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            self.pending.drain(..valid + bad_len);
                        }
                        // A character cut short: wait for the next token.
                        None => {
                            self.pending.drain(..valid);
                            return out;
                        }
                    }
                }
            }
        }
    }

    /// Whatever is still held (an unfinished character), lossily.
    pub fn flush(&mut self) -> String {
        let out = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        out
    }
}

/// GGUF tokenizer metadata from a Hugging Face tokenizer.json (+ tokenizer_config.json for bos/eos/add_bos/chat
/// template), as llama.cpp's converter writes it. Byte-level BPE only, with one of the pre-tokenizers above.
pub fn metadata_from_hf(tokenizer_json: &str, tokenizer_config_json: Option<&str>) -> Result<Vec<(String, Value)>> {
    use serde_json::Value as J;
    let tj: J = serde_json::from_str(tokenizer_json).map_err(|e| Error::Tokenizer(format!("tokenizer.json: {e}")))?;
    let config: J = match tokenizer_config_json {
        Some(s) => serde_json::from_str(s).map_err(|e| Error::Tokenizer(format!("tokenizer_config.json: {e}")))?,
        None => J::Null,
    };
    let model = &tj["model"];
    if model["type"] != "BPE" {
        return Err(Error::Unsupported(format!("tokenizer.json model type {} (only BPE)", model["type"])));
    }
    if model["byte_fallback"].as_bool() == Some(true) {
        return spm_metadata_from_hf(&tj, &config);
    }
    let pre = hf_pre(&tj["pre_tokenizer"])
        .ok_or_else(|| Error::Unsupported(format!("tokenizer.json pre_tokenizer {}", tj["pre_tokenizer"])))?;
    // Qwen2's tokenizer.json normalizes to NFC, which its pre-tokenizer brings along.
    let normalizer_ok = tj["normalizer"].is_null() || (pre == Pre::Qwen2 && tj["normalizer"]["type"] == "NFC");
    let plain_bpe = normalizer_ok
        && model["ignore_merges"].as_bool().unwrap_or(false) == (pre == Pre::Llama3)
        && !model["byte_fallback"].as_bool().unwrap_or(false)
        && [&model["continuing_subword_prefix"], &model["end_of_word_suffix"]].iter().all(|v| v.is_null() || *v == "");
    if !plain_bpe {
        return Err(Error::Unsupported(
            "tokenizer.json: a normalizer or BPE options other than byte-level BPE's".into(),
        ));
    }

    let (tokens, types) = hf_tokens(&tj)?;
    let merges = hf_merges(model)?;
    let md = vec![
        ("tokenizer.ggml.model".to_owned(), Value::Str("gpt2".into())),
        ("tokenizer.ggml.pre".to_owned(), Value::Str(pre.name().into())),
        ("tokenizer.ggml.tokens".to_owned(), Value::Array(tokens.iter().cloned().map(Value::Str).collect())),
        ("tokenizer.ggml.token_type".to_owned(), Value::Array(types.iter().map(|&t| Value::I32(t as i32)).collect())),
        ("tokenizer.ggml.merges".to_owned(), Value::Array(merges)),
    ];
    Ok(with_special_ids(md, &tokens, &tj, &config))
}

/// A SentencePiece BPE tokenizer.json (LLaMA's: `byte_fallback`, spaces as `▁` with a dummy prefix) as llama.cpp's
/// `llama` vocabulary. tokenizer.json has merges but no scores; llama.cpp merges by score, so each piece gets
/// minus the rank of the first merge that makes it (pieces no merge makes come after, in id order): the merge
/// order of the file, which Hugging Face's converter derived from the SentencePiece scores in the first place.
fn spm_metadata_from_hf(tj: &serde_json::Value, config: &serde_json::Value) -> Result<Vec<(String, Value)>> {
    if !hf_spm_spaces(&tj["normalizer"], &tj["pre_tokenizer"]) {
        return Err(Error::Unsupported(format!(
            "tokenizer.json with byte_fallback: normalizer {} and pre_tokenizer {} are not LLaMA's SentencePiece \
             space handling",
            tj["normalizer"], tj["pre_tokenizer"]
        )));
    }
    let (tokens, mut types) = hf_tokens(tj)?;
    let unk = tj["model"]["unk_token"].as_str();
    for (text, ty) in tokens.iter().zip(types.iter_mut()) {
        if byte_token(text).is_some() && text.len() == 6 {
            *ty = TYPE_BYTE;
        } else if Some(text.as_str()) == unk {
            *ty = TYPE_UNKNOWN;
        }
    }
    let mut first_merge: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for (rank, m) in hf_merges(&tj["model"])?.iter().enumerate() {
        let merge = m.as_str().unwrap_or_default();
        let (a, b) = split_merge(merge)?;
        first_merge.entry(a + &b).or_insert(rank);
    }
    let n_merges = first_merge.len();
    let scores: Vec<Value> = tokens
        .iter()
        .zip(&types)
        .enumerate()
        .map(|(id, (text, &ty))| match (ty, first_merge.get(text)) {
            (TYPE_NORMAL, Some(&rank)) => Value::F32(-(rank as f32) - 1.0),
            (TYPE_NORMAL, None) => Value::F32(-((n_merges + id) as f32) - 1.0),
            _ => Value::F32(0.0),
        })
        .collect();
    let md = vec![
        ("tokenizer.ggml.model".to_owned(), Value::Str("llama".into())),
        ("tokenizer.ggml.pre".to_owned(), Value::Str("default".into())),
        ("tokenizer.ggml.tokens".to_owned(), Value::Array(tokens.iter().cloned().map(Value::Str).collect())),
        ("tokenizer.ggml.scores".to_owned(), Value::Array(scores)),
        ("tokenizer.ggml.token_type".to_owned(), Value::Array(types.iter().map(|&t| Value::I32(t as i32)).collect())),
        ("tokenizer.ggml.add_space_prefix".to_owned(), Value::Bool(true)),
    ];
    Ok(with_special_ids(md, &tokens, tj, config))
}

/// LLaMA's space handling in tokenizer.json: the published form (normalizer Prepend("▁") and Replace(" ", "▁"),
/// no pre-tokenizer) or transformers 5's (normalizer Replace(" ", "▁"), pre-tokenizer Metaspace, prepend always).
fn hf_spm_spaces(normalizer: &serde_json::Value, pre: &serde_json::Value) -> bool {
    let steps = |v: &serde_json::Value, key: &str| match v["type"].as_str() {
        Some("Sequence") => v[key].as_array().cloned().unwrap_or_default(),
        Some(_) => vec![v.clone()],
        None => vec![],
    };
    let space = |n: &serde_json::Value| n["type"] == "Replace" && n["pattern"]["String"] == " " && n["content"] == "▁";
    let norm = steps(normalizer, "normalizers");
    let published = pre.is_null()
        && norm.len() == 2
        && norm.iter().any(space)
        && norm.iter().any(|n| n["type"] == "Prepend" && n["prepend"] == "▁");
    let pres = steps(pre, "pretokenizers");
    let metaspace = |p: &serde_json::Value| {
        p["type"] == "Metaspace" && p["replacement"] == "▁" && p["prepend_scheme"] == "always" && p["split"] == false
    };
    let v5 = norm.first().is_some_and(space) && pres.len() == 1 && metaspace(&pres[0]);
    published || v5
}

/// `md` plus BOS/EOS/padding ids, add_bos and the chat template from tokenizer_config.json (or the post-processor).
pub(super) fn with_special_ids(
    mut md: Vec<(String, Value)>,
    tokens: &[String],
    tj: &serde_json::Value,
    config: &serde_json::Value,
) -> Vec<(String, Value)> {
    let id_of = |text: &str| tokens.iter().position(|t| t == text).map(|i| i as u32);
    // Special tokens in tokenizer_config.json are a string or an AddedToken object.
    let config_token = |key: &str| config[key].as_str().or_else(|| config[key]["content"].as_str()).map(str::to_owned);
    let prepended = hf_prepended_token(&tj["post_processor"]);
    let bos_text = config_token("bos_token").or_else(|| prepended.clone());
    let add_bos = config["add_bos_token"].as_bool().unwrap_or(prepended.is_some() && prepended == bos_text);
    let ids = [
        ("tokenizer.ggml.bos_token_id", bos_text),
        ("tokenizer.ggml.eos_token_id", config_token("eos_token")),
        ("tokenizer.ggml.padding_token_id", config_token("pad_token")),
    ];
    for (key, text) in ids {
        if let Some(id) = text.as_deref().and_then(id_of) {
            md.push((key.to_owned(), Value::U32(id)));
        }
    }
    md.push(("tokenizer.ggml.add_bos_token".to_owned(), Value::Bool(add_bos)));
    if let Some(template) = hf_chat_template(&config["chat_template"]) {
        md.push(("tokenizer.chat_template".to_owned(), Value::Str(template)));
    }
    md
}

/// Token texts and llama.cpp token types by id: the model's vocabulary, then the added tokens (which may repeat
/// vocabulary entries; control when special, user-defined otherwise).
fn hf_tokens(tj: &serde_json::Value) -> Result<(Vec<String>, Vec<u64>)> {
    let mut entries: Vec<(u64, String, u64)> = Vec::new();
    let vocab = tj["model"]["vocab"].as_object().ok_or_else(|| Error::Tokenizer("tokenizer.json: no vocab".into()))?;
    for (text, id) in vocab {
        let id = id.as_u64().ok_or_else(|| Error::Tokenizer(format!("tokenizer.json: bad id for '{text}'")))?;
        entries.push((id, text.clone(), TYPE_NORMAL));
    }
    for t in tj["added_tokens"].as_array().map(Vec::as_slice).unwrap_or_default() {
        let (Some(id), Some(text)) = (t["id"].as_u64(), t["content"].as_str()) else {
            return Err(Error::Tokenizer(format!("tokenizer.json: bad added token {t}")));
        };
        let ty = if t["special"].as_bool().unwrap_or(false) { TYPE_CONTROL } else { TYPE_USER_DEFINED };
        entries.push((id, text.to_owned(), ty));
    }
    let n = entries.iter().map(|e| e.0.saturating_add(1)).max().unwrap_or(0);
    // Ids may leave a few holes, not gigabytes of them (a corrupt id must not allocate a huge table).
    if n > 4 * entries.len() as u64 {
        return Err(Error::Tokenizer(format!("tokenizer.json: token ids up to {n} for {} tokens", entries.len())));
    }
    // Ids nothing names get a placeholder, as llama.cpp's converter writes them.
    let mut tokens: Vec<String> = (0..n).map(|i| format!("[PAD{i}]")).collect();
    let mut types = vec![TYPE_UNUSED; n as usize];
    for (id, text, ty) in entries {
        tokens[id as usize] = text;
        types[id as usize] = ty;
    }
    Ok((tokens, types))
}

/// Merges as GGUF strings "a b"; tokenizer.json has them as such strings or as pairs.
fn hf_merges(model: &serde_json::Value) -> Result<Vec<Value>> {
    use serde_json::Value as J;
    let mut merges = Vec::new();
    for m in model["merges"].as_array().map(Vec::as_slice).unwrap_or_default() {
        let merge = match m {
            J::String(s) => s.clone(),
            J::Array(pair) => match pair.as_slice() {
                [J::String(a), J::String(b)] if !a.contains(' ') && !b.contains(' ') => format!("{a} {b}"),
                _ => return Err(Error::Tokenizer(format!("tokenizer.json: merge {m} cannot be written as 'a b'"))),
            },
            _ => return Err(Error::Tokenizer(format!("tokenizer.json: bad merge {m}"))),
        };
        merges.push(Value::Str(merge));
    }
    Ok(merges)
}

/// Which of our pre-tokenizers a tokenizer.json `pre_tokenizer` is, if any.
fn hf_pre(pt: &serde_json::Value) -> Option<Pre> {
    let byte_level = |p: &serde_json::Value, regex: bool| {
        p["type"] == "ByteLevel"
            && p["use_regex"].as_bool().unwrap_or(true) == regex
            && !p["add_prefix_space"].as_bool().unwrap_or(false)
    };
    if byte_level(pt, true) {
        return Some(Pre::Gpt2);
    }
    if pt["type"] != "Sequence" {
        return None;
    }
    match pt["pretokenizers"].as_array()?.as_slice() {
        [split, bl]
            if split["type"] == "Split"
                && split["behavior"] == "Isolated"
                && split["invert"] == false
                && byte_level(bl, false) =>
        {
            match split["pattern"]["Regex"].as_str()? {
                LLAMA3_REGEX => Some(Pre::Llama3),
                QWEN2_REGEX => Some(Pre::Qwen2),
                _ => None,
            }
        }
        [digits, bl] if digits["type"] == "Digits" && digits["individual_digits"] == true && byte_level(bl, true) => {
            Some(Pre::SmolLm)
        }
        _ => None,
    }
}

/// The special token a TemplateProcessing post-processor puts before a single sequence (HF's way to add BOS).
fn hf_prepended_token(pp: &serde_json::Value) -> Option<String> {
    if pp["type"] == "Sequence" {
        return pp["processors"].as_array()?.iter().find_map(hf_prepended_token);
    }
    if pp["type"] != "TemplateProcessing" {
        return None;
    }
    pp["single"].as_array()?.first()?["SpecialToken"]["id"].as_str().map(str::to_owned)
}

/// tokenizer_config.json's chat_template: a string, or a list of named templates (take "default").
fn hf_chat_template(t: &serde_json::Value) -> Option<String> {
    if let Some(s) = t.as_str() {
        return Some(s.to_owned());
    }
    let named = t.as_array()?.iter().find(|n| n["name"] == "default")?;
    named["template"].as_str().map(str::to_owned)
}

fn get<'a>(md: &'a [(String, Value)], key: &str) -> Option<&'a Value> {
    md.iter().find(|(k, _)| k == key).map(|(_, v)| v)
}

fn get_str<'a>(md: &'a [(String, Value)], key: &str) -> Result<Option<&'a str>> {
    get(md, key).map(|v| v.as_str().ok_or_else(|| bad(key, "not a string"))).transpose()
}

fn get_array<'a>(md: &'a [(String, Value)], key: &str) -> Result<Option<&'a [Value]>> {
    get(md, key).map(|v| v.as_array().ok_or_else(|| bad(key, "not an array"))).transpose()
}

/// `tokenizer.ggml.scores`: one f32 per token (SentencePiece's merge priorities).
fn get_scores(md: &[(String, Value)], n_tokens: usize) -> Result<Vec<f32>> {
    let key = "tokenizer.ggml.scores";
    let values = get_array(md, key)?.ok_or_else(|| missing(key))?;
    if values.len() != n_tokens {
        return Err(bad(key, format!("{} entries for {} tokens", values.len(), n_tokens)));
    }
    let score =
        |v: &Value| v.as_f64().map(|x| x as f32).filter(|x| !x.is_nan()).ok_or_else(|| bad(key, "not all numbers"));
    values.iter().map(score).collect()
}

fn get_strings(md: &[(String, Value)], key: &str) -> Result<Option<Vec<String>>> {
    let Some(values) = get_array(md, key)? else { return Ok(None) };
    let strings = values.iter().map(|v| v.as_str().map(str::to_owned).ok_or_else(|| bad(key, "not all strings")));
    strings.collect::<Result<Vec<_>>>().map(Some)
}

fn missing(key: &str) -> Error {
    Error::Metadata { key: key.into(), reason: "missing".into() }
}

fn bad(key: &str, reason: impl Into<String>) -> Error {
    Error::Metadata { key: key.into(), reason: reason.into() }
}
