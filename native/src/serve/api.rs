//! The OpenAI wire format: request bodies as serde reads them (known fields must have the right type; a
//! field the server does not honour is refused by name, see [`unknown_field`]), and the responses, stream
//! chunks and error bodies the server writes.
//! Depends on nothing of the server but serde and the engine, so that the fuzz target of request bodies
//! (fuzz/fuzz_targets/request.rs) compiles this very file.

use std::collections::BTreeMap;

use bitnet_engine::generate::grammar::ResponseFormat;
use bitnet_engine::generate::sampler::SamplerParams;
use bitnet_engine::generate::GenParams;
use serde::{Deserialize, Serialize};

/// The fields of [`Sampling`], which both generation endpoints read.
pub const SAMPLING_FIELDS: &[&str] = &[
    "model",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "stop",
    "repeat_penalty",
    "repeat_last_n",
    "frequency_penalty",
    "presence_penalty",
    "n",
    "stream",
    "stream_options",
    "logit_bias",
    "ignore_eos",
    "user",
    "response_format",
    "grammar",
];
/// The fields of [`ChatRequest`].
pub const CHAT_FIELDS: &[&str] =
    &["messages", "logprobs", "top_logprobs", "tools", "tool_choice", "parallel_tool_calls"];
/// The fields of [`CompletionRequest`].
pub const COMPLETION_FIELDS: &[&str] = &["prompt", "logprobs"];

/// The first field of a request body that is none of `known` (a null one counts as absent): the server does
/// not honour it, and says so rather than answer as if it had (a client asking for `response_format` or
/// `tools` must not get free text with a 200).
pub fn unknown_field(body: &serde_json::Value, known: &[&[&str]]) -> Option<String> {
    let fields = body.as_object()?;
    let is_known = |name: &str| known.iter().any(|list| list.contains(&name));
    fields.iter().find(|(name, value)| !value.is_null() && !is_known(name)).map(|(name, _)| name.clone())
}

/// Most alternatives per token that `top_logprobs` (chat) or `logprobs` (completions) may ask for (OpenAI's
/// limit for chat).
pub const MAX_TOP_LOGPROBS: u32 = 20;

/// Fields shared by /v1/chat/completions and /v1/completions, read from the same body as the request
/// itself (not `#[serde(flatten)]`ed into it, which would lose the path of a bad field). Sampling fields that OpenAI lacks
/// (top_k, min_p, repeat_penalty, repeat_last_n) are llama-server's.
#[derive(Deserialize, Default)]
pub struct Sampling {
    /// Any name is accepted (the server has one model), but it must be a string.
    #[allow(dead_code)]
    pub model: Option<String>,
    pub max_tokens: Option<u32>,
    /// The newer name of `max_tokens` in the chat API.
    pub max_completion_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<u32>,
    pub min_p: Option<f32>,
    /// A negative seed (llama-server's -1) means a random one.
    pub seed: Option<i64>,
    pub stop: Option<Stop>,
    pub repeat_penalty: Option<f32>,
    pub repeat_last_n: Option<u32>,
    pub frequency_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub n: Option<u32>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    /// Token id (as a string, JSON keys being strings) to a bias from -100 to 100 added to its logit.
    pub logit_bias: Option<BTreeMap<String, f32>>,
    /// llama-server's: never stop at an end-of-generation token.
    pub ignore_eos: Option<bool>,
    /// Metadata only (who asked): accepted and not used.
    #[allow(dead_code)]
    pub user: Option<String>,
    /// Structured output: `{"type": "text" | "json_object" | "json_schema", "json_schema": {"schema": ...}}`.
    pub response_format: Option<ResponseFormat>,
    /// A grammar in llguidance's Lark syntax that the output must follow.
    pub grammar: Option<String>,
}

/// A request field out of range: the message and the field's name (a 400 naming it).
#[derive(Debug)]
pub struct FieldError {
    pub message: String,
    pub param: &'static str,
}

impl Sampling {
    /// The sampling settings; absent fields take llama.cpp's defaults (temperature 0.8, top_k 40, top_p
    /// 0.95, min_p 0.05). Returns the parameters (max_tokens unset, no log-probabilities); `vocab_size` bounds
    /// the token ids of `logit_bias`.
    pub fn gen_params(&self, vocab_size: usize) -> Result<GenParams, FieldError> {
        if self.n.is_some_and(|n| n != 1) {
            return Err(FieldError { message: "only n = 1 is supported".into(), param: "n" });
        }
        let d = SamplerParams::default();
        type Check = fn(f32) -> bool;
        let check = |param: &'static str, value: Option<f32>, default: f32, ok: Check, range: &str| match value {
            None => Ok(default),
            Some(v) if v.is_finite() && ok(v) => Ok(v),
            Some(v) => Err(FieldError { message: format!("{param} = {v} is out of range ({range})"), param }),
        };
        let temperature = check("temperature", self.temperature, d.temperature, |v| v >= 0.0, "0 or more")?;
        let top_p = check("top_p", self.top_p, d.top_p, |v| (0.0..=1.0).contains(&v), "0 to 1")?;
        let min_p = check("min_p", self.min_p, d.min_p, |v| (0.0..=1.0).contains(&v), "0 to 1")?;
        let repeat_penalty =
            check("repeat_penalty", self.repeat_penalty, d.repeat_penalty, |v| v > 0.0, "more than 0")?;
        let penalty: Check = |v| (-2.0..=2.0).contains(&v);
        let frequency_penalty = check("frequency_penalty", self.frequency_penalty, 0.0, penalty, "-2 to 2")?;
        let presence_penalty = check("presence_penalty", self.presence_penalty, 0.0, penalty, "-2 to 2")?;
        let seed = match self.seed {
            Some(seed) if seed >= 0 => seed as u64,
            _ => random_seed(),
        };
        let stop = match &self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        };
        let sampler = SamplerParams {
            temperature,
            top_k: self.top_k.map_or(d.top_k, |k| k as usize),
            top_p,
            min_p,
            repeat_penalty,
            repeat_last_n: self.repeat_last_n.map_or(d.repeat_last_n, |n| n as usize),
            frequency_penalty,
            presence_penalty,
            seed,
            logit_bias: self.logit_bias(vocab_size)?,
            ignore_eos: self.ignore_eos.unwrap_or(false),
            n_probs: None,
        };
        Ok(GenParams { max_tokens: 0, sampler, stop })
    }

    fn logit_bias(&self, vocab_size: usize) -> Result<Vec<(u32, f32)>, FieldError> {
        let bad = |message: String| FieldError { message, param: "logit_bias" };
        let mut out = Vec::new();
        for (key, &bias) in self.logit_bias.iter().flatten() {
            let token = key.parse::<u32>().ok().filter(|&t| (t as usize) < vocab_size);
            let Some(token) = token else {
                return Err(bad(format!(
                    "logit_bias: '{key}' is not a token id (0 to {})",
                    vocab_size.saturating_sub(1)
                )));
            };
            if !(-100.0..=100.0).contains(&bias) {
                return Err(bad(format!("logit_bias: {bias} for token {key} is out of range (-100 to 100)")));
            }
            out.push((token, bias));
        }
        Ok(out)
    }
}

fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    // The standard library's per-process random keys, advanced on every call.
    std::collections::hash_map::RandomState::new().build_hasher().finish()
}

#[derive(Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    pub include_usage: Option<bool>,
}

#[derive(Deserialize)]
pub struct ChatRequest {
    pub messages: Vec<Message>,
    /// Report the log-probability of each generated token...
    pub logprobs: Option<bool>,
    /// ...and of this many most likely tokens at each position (0 to 20; needs `logprobs`).
    pub top_logprobs: Option<u32>,
    /// Functions the model may call (given to the chat template as they are).
    pub tools: Option<Vec<ToolDef>>,
    pub tool_choice: Option<ToolChoiceField>,
    /// Several calls in one reply (the default, where the template's format allows it).
    pub parallel_tool_calls: Option<bool>,
}

/// `{"type": "function", "function": {"name", "description", "parameters", "strict"}}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolDef {
    #[serde(rename = "type")]
    pub kind: String,
    pub function: FunctionDef,
}

/// A function; `description` and `strict` are accepted (the arguments always follow `parameters`, as
/// `strict: true` asks).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct FunctionDef {
    pub name: String,
    pub description: Option<String>,
    /// The arguments' JSON schema.
    pub parameters: Option<serde_json::Value>,
    pub strict: Option<bool>,
}

/// `"none" | "auto" | "required"`, or `{"type": "function", "function": {"name": ...}}`.
#[derive(Deserialize)]
#[serde(untagged)]
pub enum ToolChoiceField {
    Mode(String),
    Function(NamedTool),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamedTool {
    #[serde(rename = "type")]
    pub kind: String,
    pub function: NamedFunction,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamedFunction {
    pub name: String,
}

/// A message; other fields (`name`, ...) are refused, not dropped.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Message {
    pub role: String,
    /// Null for an assistant message that only called tools.
    pub content: Option<Content>,
    /// The calls an assistant message made.
    pub tool_calls: Option<Vec<ToolCallIn>>,
    /// The call a `tool` message answers.
    pub tool_call_id: Option<String>,
}

/// A call as the client sends it back: `arguments` is JSON text.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolCallIn {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub function: FunctionCallIn,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FunctionCallIn {
    pub name: String,
    pub arguments: String,
}

#[derive(Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Part>),
}

/// A content part; only `{"type": "text", "text": ...}` is understood (the model reads text only).
#[derive(Deserialize)]
pub struct Part {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

#[derive(Deserialize)]
pub struct CompletionRequest {
    pub prompt: Prompt,
    /// The log-probabilities of each generated token and of this many most likely ones (0 to 20).
    pub logprobs: Option<u32>,
}

/// A prompt: text, a list of one text, or token ids (as the OpenAI API allows).
#[derive(Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
}

/// The fields of [`EmbeddingRequest`].
pub const EMBEDDING_FIELDS: &[&str] = &["model", "input", "encoding_format", "user"];

/// Most inputs in one embedding request (OpenAI's limit).
pub const MAX_EMBEDDING_INPUTS: usize = 2048;

/// /v1/embeddings.
#[derive(Deserialize)]
pub struct EmbeddingRequest {
    pub input: EmbeddingInput,
    /// Any name is accepted (the server has one model), but it must be a string.
    #[allow(dead_code)]
    pub model: Option<String>,
    /// "float" (the default) or "base64" (the floats' little-endian bytes).
    pub encoding_format: Option<String>,
    /// An end-user id (OpenAI's abuse monitoring); nothing is done with it.
    #[allow(dead_code)]
    pub user: Option<String>,
}

/// What to embed: a text, texts, a text's token ids, or several texts' token ids (as the OpenAI API allows).
#[derive(Deserialize)]
#[serde(untagged)]
pub enum EmbeddingInput {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

#[derive(Serialize)]
pub struct EmbeddingList<'a> {
    pub object: &'static str, // "list"
    pub data: Vec<EmbeddingData>,
    pub model: &'a str,
    pub usage: EmbeddingUsage,
}

#[derive(Serialize)]
pub struct EmbeddingData {
    pub object: &'static str, // "embedding"
    pub index: usize,
    pub embedding: EmbeddingValue,
}

/// The vector as JSON numbers, or as base64 of its little-endian f32s (`encoding_format: "base64"`).
#[derive(Serialize)]
#[serde(untagged)]
pub enum EmbeddingValue {
    Float(Vec<f32>),
    Base64(String),
}

#[derive(Serialize)]
pub struct EmbeddingUsage {
    pub prompt_tokens: usize,
    pub total_tokens: usize,
}

/// llama-server's /tokenize.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenizeRequest {
    pub content: String,
    #[serde(default)]
    pub add_special: bool,
}

/// llama-server's /detokenize.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DetokenizeRequest {
    pub tokens: Vec<u32>,
}

#[derive(Serialize, Clone, Copy)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
    /// Prompt tokens whose keys and values were reused from the slot's cache.
    pub prompt_tokens_details: PromptDetails,
}

#[derive(Serialize, Clone, Copy)]
pub struct PromptDetails {
    pub cached_tokens: usize,
}

#[derive(Serialize)]
pub struct ChatCompletion<'a> {
    pub id: &'a str,
    pub object: &'static str, // "chat.completion"
    pub created: u64,
    pub model: &'a str,
    pub choices: [ChatChoice<'a>; 1],
    pub usage: Usage,
    pub timings: Timings,
}

#[derive(Serialize)]
pub struct ChatChoice<'a> {
    pub index: u32,
    pub message: AssistantMessage<'a>,
    pub finish_reason: &'static str,
    pub logprobs: Option<ChatLogprobs>,
}

#[derive(Serialize)]
pub struct AssistantMessage<'a> {
    pub role: &'static str,
    /// Null when the reply is tool calls.
    pub content: Option<&'a str>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCallOut>,
}

/// A call the model made.
#[derive(Serialize)]
pub struct ToolCallOut {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: &'static str, // "function"
    pub function: FunctionCallOut,
}

#[derive(Serialize)]
pub struct FunctionCallOut {
    pub name: String,
    /// The arguments as JSON text.
    pub arguments: String,
}

/// One server-sent event of a streamed chat completion.
#[derive(Serialize)]
pub struct ChatChunk<'a> {
    pub id: &'a str,
    pub object: &'static str, // "chat.completion.chunk"
    pub created: u64,
    pub model: &'a str,
    /// Empty in the final usage chunk (`stream_options.include_usage`).
    pub choices: Vec<ChunkChoice<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// In the chunk with the finish reason.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timings: Option<Timings>,
}

#[derive(Serialize)]
pub struct ChunkChoice<'a> {
    pub index: u32,
    pub delta: Delta<'a>,
    pub finish_reason: Option<&'static str>,
    pub logprobs: Option<ChatLogprobs>,
}

/// Chat log-probabilities: one entry per generated token.
#[derive(Serialize, Default)]
pub struct ChatLogprobs {
    pub content: Vec<TokenLogprob>,
}

#[derive(Serialize)]
pub struct TokenLogprob {
    pub token: String,
    pub logprob: f32,
    /// The token's bytes (a token may hold part of a UTF-8 character, which `token` shows as U+FFFD).
    pub bytes: Vec<u8>,
    pub top_logprobs: Vec<TopLogprob>,
}

#[derive(Serialize)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

/// Legacy completions' log-probabilities: parallel lists, one entry per generated token.
#[derive(Serialize, Default)]
pub struct CompletionLogprobs {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<f32>,
    /// Token text to log-probability, the most likely tokens at each position.
    pub top_logprobs: Vec<BTreeMap<String, f32>>,
    /// Where each token starts in the completion's text, in characters.
    pub text_offset: Vec<usize>,
}

/// llama-server's `timings`: prompt evaluation and generation times.
#[derive(Serialize, Clone, Copy)]
pub struct Timings {
    /// Prompt tokens reused from the slot's cache.
    pub cache_n: usize,
    pub prompt_n: usize,
    pub prompt_ms: f64,
    pub prompt_per_token_ms: f64,
    pub prompt_per_second: f64,
    pub predicted_n: usize,
    pub predicted_ms: f64,
    pub predicted_per_token_ms: f64,
    pub predicted_per_second: f64,
}

impl Timings {
    pub fn new(cache_n: usize, prompt_n: usize, prompt_ms: f64, predicted_n: usize, predicted_ms: f64) -> Self {
        let per_token = |ms: f64, n: usize| if n > 0 { ms / n as f64 } else { 0.0 };
        let per_second = |ms: f64, n: usize| if ms > 0.0 { n as f64 * 1e3 / ms } else { 0.0 };
        Timings {
            cache_n,
            prompt_n,
            prompt_ms,
            prompt_per_token_ms: per_token(prompt_ms, prompt_n),
            prompt_per_second: per_second(prompt_ms, prompt_n),
            predicted_n,
            predicted_ms,
            predicted_per_token_ms: per_token(predicted_ms, predicted_n),
            predicted_per_second: per_second(predicted_ms, predicted_n),
        }
    }
}

#[derive(Serialize, Default)]
pub struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallDelta>>,
}

/// A piece of a streamed call, as OpenAI sends them: the first of a call has its `id`, `type` and name (and
/// `arguments: ""`), the next ones more of its arguments; `index` says which call.
#[derive(Serialize)]
pub struct ToolCallDelta {
    pub index: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<&'static str>,
    pub function: FunctionDelta,
}

#[derive(Serialize)]
pub struct FunctionDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub arguments: String,
}

/// A text completion, or one chunk of a streamed one (same object, as in the OpenAI API).
#[derive(Serialize)]
pub struct Completion<'a> {
    pub id: &'a str,
    pub object: &'static str, // "text_completion"
    pub created: u64,
    pub model: &'a str,
    pub choices: Vec<CompletionChoice<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// In the whole completion, and the stream's chunk with the finish reason.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timings: Option<Timings>,
}

#[derive(Serialize)]
pub struct CompletionChoice<'a> {
    pub index: u32,
    pub text: &'a str,
    pub finish_reason: Option<&'static str>,
    pub logprobs: Option<CompletionLogprobs>,
}

#[derive(Serialize)]
pub struct ModelList<'a> {
    pub object: &'static str, // "list"
    pub data: [ModelCard<'a>; 1],
}

#[derive(Serialize)]
pub struct ModelCard<'a> {
    pub id: &'a str,
    pub object: &'static str, // "model"
    pub created: u64,
    pub owned_by: &'static str,
}

/// `{"error": {...}}`, the body of every failed request.
#[derive(Serialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Serialize)]
pub struct ErrorDetail {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}
