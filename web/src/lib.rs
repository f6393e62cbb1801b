//! bitnet-web: bitnet-engine in the browser.
//!
//! A thin wasm-bindgen shell for the npm package's Web Worker (`web/js/worker.ts`), which owns everything
//! JavaScript: fetching with progress, the Cache API, the message protocol, timing. Here:
//! - [`Loader`] takes a GGUF file chunk by chunk, after checking that it can fit in wasm memory;
//! - [`Engine`] is a loaded model with one conversation (its KV cache), on the CPU (the engine's `Session`)
//!   or on WebGPU ([`GpuSession`]); it generates one token per [`Engine::step`] call so that the worker's
//!   event loop sees an abort between tokens, optionally constrained by a JSON schema or a Lark grammar
//!   (the engine's `grammar` module, as `bitnet serve`); on an embedding model it embeds texts instead;
//! - [`build_info`] says what this build can do (threads, SIMD128, WebGPU).
//!
//! Whatever evaluates tokens returns a Promise: WebGPU's results can only be awaited (the CPU's are ready
//! when the Promise is). Errors become JavaScript exceptions (`Error` with the engine's message).
//!
//! A model lives as long as its worker: wasm memory can grow but never shrink, so the JS side frees a
//! model by terminating the worker, and a model here is never dropped (on WebGPU only its host copy is,
//! once uploaded).

mod loader;
mod webgpu;

use std::sync::Arc;

use bitnet_engine::backend::cpu::{kernels, CpuModel};
use bitnet_engine::backend::{KvType, Want, Weights};
use bitnet_engine::format::gguf::GgufFile;
use bitnet_engine::generate::embed;
use bitnet_engine::generate::grammar::{Constraint, GrammarSpec, Grammars, ResponseFormat};
use bitnet_engine::generate::sampler::SamplerParams;
use bitnet_engine::generate::{reusable_prefix, GenParams, Generation, Output, Session};
use bitnet_engine::model::{Activation, Config, LoadOptions, Model};
use bitnet_engine::text::chat::ChatMessage;
use bitnet_engine::text::tokenizer::Tokenizer;
use serde::Deserialize;
use serde_json::json;
use wasm_bindgen::prelude::*;

pub use loader::{check_file_size, memory_in_use, FileBuffer, WASM32_LIMIT};
pub use webgpu::GpuSession;

/// Starts rayon's pool of Web Workers (threaded build only; call once, before loading a model).
#[cfg(feature = "threads")]
pub use wasm_bindgen_rayon::init_thread_pool;

#[wasm_bindgen(start)]
fn start() {
    // Panics (engine bugs; bad input is an Error) show their message in the console, not just "unreachable".
    console_error_panic_hook::set_once();
}

/// What this build can do, as JSON: `{version, threads, simd128, kernels, webgpu}`.
#[wasm_bindgen(js_name = buildInfo)]
pub fn build_info() -> String {
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "threads": cfg!(feature = "threads"),
        "simd128": cfg!(target_feature = "simd128"),
        "kernels": kernels::best().name(),
        "webgpu": true,
    })
    .to_string()
}

fn js_error(e: impl std::fmt::Display) -> JsError {
    JsError::new(&e.to_string())
}

fn parse_json<'a, T: Deserialize<'a>>(what: &str, text: &'a str) -> Result<T, JsError> {
    serde_json::from_str(text).map_err(|e| js_error(format!("bad {what}: {e}")))
}

/// Load-time choices (JSON from the worker).
#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LoadOpts {
    /// "wasm" (the default) or "webgpu"; the worker resolves "auto".
    pub backend: Option<String>,
    /// Context size in tokens (default: the model's, at most 4096, as the native CLI).
    pub ctx: Option<usize>,
    /// Overrides the FFN activation ("relu2" or "silu").
    pub activation: Option<String>,
    /// The KV cache type: "f32" (exact), "f16" (the default) or "q8_0"; WebGPU has f16 only.
    pub kv_type: Option<String>,
}

/// Generation settings (JSON from the worker); the defaults are `bitnet run`'s.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct GenOpts {
    pub max_tokens: usize,
    pub temperature: f32,
    pub top_k: usize,
    pub top_p: f32,
    pub min_p: f32,
    pub repeat_penalty: f32,
    pub repeat_last_n: usize,
    /// The worker always sends one (a random one when the user gave none), so that stats can show it.
    pub seed: u64,
    pub stop: Vec<String>,
    /// Structured output: JSON (any object, or valid against a schema), in OpenAI's shape ([`ResponseFormat`]).
    pub response_format: Option<serde_json::Value>,
    /// Structured output: text in this grammar (llguidance's Lark syntax, as `bitnet serve`'s `grammar`).
    pub grammar: Option<String>,
}

impl Default for GenOpts {
    fn default() -> Self {
        let s = SamplerParams::default();
        GenOpts {
            max_tokens: 128,
            temperature: s.temperature,
            top_k: s.top_k,
            top_p: s.top_p,
            min_p: s.min_p,
            repeat_penalty: s.repeat_penalty,
            repeat_last_n: s.repeat_last_n,
            seed: 0,
            stop: Vec::new(),
            response_format: None,
            grammar: None,
        }
    }
}

impl GenOpts {
    /// The grammar the output must follow, if any (read as `bitnet serve` reads these fields).
    fn grammar(&self) -> Result<Option<GrammarSpec>, JsError> {
        let format = self.response_format.as_ref().map(ResponseFormat::deserialize);
        let format = format.transpose().map_err(|e| js_error(format!("bad response_format: {e}")))?;
        let spec = GrammarSpec::from_request(format.as_ref(), self.grammar.as_deref());
        Ok(spec.map_err(js_error)?.map(|(spec, _field)| spec))
    }

    fn params(self) -> GenParams {
        let sampler = SamplerParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repeat_penalty: self.repeat_penalty,
            repeat_last_n: self.repeat_last_n,
            seed: self.seed,
            ..SamplerParams::default()
        };
        GenParams { max_tokens: self.max_tokens, sampler, stop: self.stop }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Message {
    role: String,
    content: String,
}

/// A GGUF file on its way into wasm memory.
#[wasm_bindgen]
pub struct Loader {
    file: FileBuffer,
}

#[wasm_bindgen]
impl Loader {
    /// `size`: the file's byte length when known, else 0. Throws at once when the model cannot fit.
    #[wasm_bindgen(constructor)]
    pub fn new(size: f64) -> Result<Loader, JsError> {
        if !(0.0..=9e15).contains(&size) {
            return Err(js_error(format!("bad file size {size}")));
        }
        Ok(Loader { file: FileBuffer::new(size as u64).map_err(js_error)? })
    }

    pub fn push(&mut self, chunk: &[u8]) -> Result<(), JsError> {
        self.file.push(chunk).map_err(js_error)
    }

    /// Bytes received so far.
    #[wasm_bindgen(getter)]
    pub fn received(&self) -> f64 {
        self.file.bytes.len() as f64
    }

    /// Parses the file and builds the model; `onProgress(done, total)` is called as tensors are repacked.
    /// The file's bytes are freed afterwards (the model keeps its own copy of the weights).
    pub async fn load(self, options: String, on_progress: Option<js_sys::Function>) -> Result<Engine, JsError> {
        let opts: LoadOpts = parse_json("load options", &options)?;
        let mut progress = |done: usize, total: usize| {
            if let Some(f) = &on_progress {
                // A throwing callback must not break loading.
                let _ = f.call2(&JsValue::NULL, &(done as f64).into(), &(total as f64).into());
            }
        };
        Engine::new(&self.file.bytes, &opts, &mut progress).await
    }
}

/// Where the model runs, with the conversation's KV cache.
#[allow(clippy::large_enum_variant)] // one per Engine
enum Runner {
    Cpu(Session),
    Gpu(GpuSession),
}

impl Runner {
    fn name(&self) -> String {
        match self {
            Runner::Cpu(s) => s.backend_name().to_string(),
            Runner::Gpu(g) => g.name().to_string(),
        }
    }

    fn ctx(&self) -> usize {
        match self {
            Runner::Cpu(s) => s.ctx(),
            Runner::Gpu(g) => g.ctx(),
        }
    }

    fn tokens(&self) -> &[u32] {
        match self {
            Runner::Cpu(s) => s.tokens(),
            Runner::Gpu(g) => g.tokens(),
        }
    }

    fn logits(&self) -> &[f32] {
        match self {
            Runner::Cpu(s) => s.logits(),
            Runner::Gpu(g) => g.logits(),
        }
    }

    fn truncate(&mut self, len: usize) {
        match self {
            Runner::Cpu(s) => s.truncate(len),
            Runner::Gpu(g) => g.truncate(len),
        }
    }

    /// Evaluates `tokens` after the cached ones; with `Want::Logits`, `logits()` then belongs to the last
    /// (WebGPU always reads them back).
    async fn push(&mut self, tokens: &[u32], want: Want) -> bitnet_engine::Result<()> {
        match self {
            Runner::Cpu(s) => s.push(tokens, want).map(drop),
            Runner::Gpu(g) => g.push(tokens).await,
        }
    }

    /// Makes the cache hold exactly `tokens` (reusing the cached prefix); returns how many were evaluated.
    async fn prefill(&mut self, tokens: &[u32]) -> bitnet_engine::Result<usize> {
        match self {
            Runner::Cpu(s) => s.prefill(tokens),
            Runner::Gpu(g) => g.prefill(tokens).await,
        }
    }
}

/// A prompt being evaluated chunk by chunk ([`Engine::prefill_chunk`]), so that the worker can stop a long
/// one between chunks.
struct Prompt {
    /// The tokens still to evaluate.
    rest: Vec<u32>,
    /// How many tokens this prompt evaluates in all (the rest were already in the cache).
    n_eval: usize,
    params: GenParams,
    /// The grammar the output must follow, compiled before the prompt is evaluated.
    constraint: Option<Constraint>,
}

/// A loaded model and its one conversation.
#[wasm_bindgen]
pub struct Engine {
    config: Config,
    tokenizer: Tokenizer,
    runner: Runner,
    generation: Option<Generation>,
    /// The prompt of the generation to come, while it is evaluated.
    prompt: Option<Prompt>,
    /// The last prompt's length in tokens (those reused from the cache too).
    prompt_len: usize,
    seed: u64,
    /// An embedding model (its output is a sentence embedding, not text).
    embedding: bool,
    /// The grammar engine for this vocabulary, built by the first request for structured output.
    grammars: Option<Grammars>,
}

impl Engine {
    /// Builds the model from a whole GGUF file (the Rust entry point; JS goes through [`Loader`]).
    pub async fn new(bytes: &[u8], opts: &LoadOpts, progress: &mut dyn FnMut(usize, usize)) -> Result<Engine, JsError> {
        let gpu = match opts.backend.as_deref().unwrap_or("wasm") {
            "wasm" => false,
            "webgpu" => true,
            other => return Err(js_error(format!("unknown backend '{other}' (wasm or webgpu)"))),
        };
        let gguf = GgufFile::parse(bytes).map_err(|e| js_error(bitnet_engine::Error::from(e)))?;
        let tokenizer = Tokenizer::from_metadata(&gguf.metadata).map_err(js_error)?;
        let activation = match opts.activation.as_deref() {
            None => None,
            Some(a) => Some(
                Activation::parse(a).ok_or_else(|| js_error(format!("unknown activation '{a}' (relu2 or silu)")))?,
            ),
        };
        let load = LoadOptions { activation };
        let config = Config::from_gguf(&gguf, &load).map_err(js_error)?;
        let ctx = opts.ctx.unwrap_or(config.n_ctx_train.min(4096));
        let model = Model::load(&gguf, bytes, &load, progress).map_err(js_error)?;
        let embedding = model.is_embedding();
        let kv = match opts.kv_type.as_deref() {
            None => KvType::F16,
            Some(t) => KvType::parse(t).ok_or_else(|| js_error(format!("unknown kvType '{t}' (f32, f16 or q8_0)")))?,
        };
        let runner = if gpu {
            // The weights and the KV cache live on the GPU: the model's host copy is dropped after the upload.
            Runner::Gpu(GpuSession::open(&model, ctx, kv).await.map_err(js_error)?)
        } else {
            let weights: u64 = gguf.tensors.iter().map(|t| t.size).sum();
            loader::check_kv_cache(&config, ctx, kv, weights).map_err(js_error)?;
            let weights: Arc<dyn Weights> =
                Arc::new(CpuModel::new(model, kernels::best(), None, None).map_err(js_error)?.with_kv(kv));
            Runner::Cpu(Session::open(&weights, ctx).map_err(js_error)?)
        };
        Ok(Engine {
            config,
            tokenizer,
            runner,
            generation: None,
            prompt: None,
            prompt_len: 0,
            seed: 0,
            embedding,
            grammars: None,
        })
    }

    /// The prompt of a chat reply: `messages` (JSON `[{role, content}]`) rendered with the model's template.
    fn chat_ids(&self, messages: &str) -> Result<Vec<u32>, JsError> {
        let messages: Vec<Message> = parse_json("chat messages", messages)?;
        let messages: Vec<ChatMessage> = messages.iter().map(|m| ChatMessage::new(&m.role, &m.content)).collect();
        self.tokenizer.encode_chat(&messages, true).map_err(js_error)
    }

    /// Sets up a generation after `prompt` without evaluating it: keeps the cached prefix and returns how
    /// many tokens [`Engine::prefill_chunk`] then evaluates (at least the last one, for its logits).
    fn prepare_ids(&mut self, prompt: &[u32], options: &str) -> Result<u32, JsError> {
        let opts: GenOpts = parse_json("generation options", options)?;
        self.generation = None;
        self.prompt = None;
        if self.embedding {
            return Err(js_error("this is an embedding model: it cannot generate text (use embed())"));
        }
        // A schema or grammar that does not compile fails here, before the prompt is evaluated.
        let constraint = match opts.grammar()? {
            Some(spec) => Some(self.grammars()?.constraint(&spec).map_err(js_error)?),
            None => None,
        };
        let ctx = self.runner.ctx();
        if prompt.is_empty() {
            return Err(js_error(bitnet_engine::Error::Invalid("empty prompt".into())));
        }
        if prompt.len() > ctx {
            return Err(js_error(bitnet_engine::Error::ContextFull { needed: prompt.len(), ctx }));
        }
        self.seed = opts.seed;
        self.prompt_len = prompt.len();
        let keep = reusable_prefix(self.runner.tokens(), prompt);
        self.runner.truncate(keep);
        let rest = prompt[keep..].to_vec();
        let n_eval = rest.len();
        self.prompt = Some(Prompt { rest, n_eval, params: opts.params(), constraint });
        Ok(n_eval as u32)
    }

    /// The grammar engine, built once per model (a trie of the vocabulary).
    fn grammars(&mut self) -> Result<&Grammars, JsError> {
        if self.grammars.is_none() {
            self.grammars = Some(Grammars::new(&self.tokenizer).map_err(js_error)?);
        }
        Ok(self.grammars.as_ref().expect("built above"))
    }

    async fn start_ids(&mut self, prompt: &[u32], options: &str) -> Result<u32, JsError> {
        let n = self.prepare_ids(prompt, options)?;
        while !self.prefill_chunk(u32::MAX).await? {}
        Ok(n)
    }
}

#[wasm_bindgen]
impl Engine {
    /// What runs the model, e.g. "cpu/simd128".
    #[wasm_bindgen(getter)]
    pub fn backend(&self) -> String {
        self.runner.name()
    }

    /// The model's shape, tokenizer and run-time settings as JSON.
    pub fn info(&self) -> String {
        let c = &self.config;
        let t = &self.tokenizer;
        json!({
            "arch": c.arch, "nVocab": c.n_vocab, "nCtxTrain": c.n_ctx_train, "nEmbd": c.n_embd, "nLayer": c.n_layer,
            "nHead": c.n_head, "nHeadKv": c.n_head_kv, "headDim": c.head_dim, "nFf": c.n_ff,
            "activation": c.activation.to_string(), "ctx": self.runner.ctx(), "backend": self.backend(),
            "threads": rayon::current_num_threads(), "bos": t.bos(), "eos": t.eos(), "addBos": t.add_bos(),
            "chatTemplate": t.chat_template().is_some(), "memoryBytes": memory_in_use(), "embedding": self.embedding,
        })
        .to_string()
    }

    /// Token ids of `text`, with BOS first when `add_bos` and the model asks for it.
    pub fn tokenize(&self, text: &str, add_bos: bool) -> Result<Vec<u32>, JsError> {
        self.tokenizer.encode(text, add_bos && self.tokenizer.add_bos()).map_err(js_error)
    }

    pub fn detokenize(&self, ids: &[u32]) -> String {
        self.tokenizer.decode(ids)
    }

    /// The next-token logits after `ids` (evaluated in the conversation's cache, reusing its prefix).
    pub async fn logits(&mut self, ids: Vec<u32>) -> Result<Vec<f32>, JsError> {
        self.generation = None;
        self.prompt = None;
        self.runner.prefill(&ids).await.map_err(js_error)?;
        Ok(self.runner.logits().to_vec())
    }

    /// Starts continuing `prompt` (BOS added as the model asks): evaluates the prompt and returns how many
    /// of its tokens were evaluated (the rest were already in the cache). Then call `step` until it returns
    /// undefined.
    pub async fn start(&mut self, prompt: String, options: String) -> Result<u32, JsError> {
        let ids = self.tokenize(&prompt, true)?;
        self.start_ids(&ids, &options).await
    }

    /// Starts a chat reply: `messages` is a JSON array of `{role, content}`, rendered with the model's template.
    #[wasm_bindgen(js_name = startChat)]
    pub async fn start_chat(&mut self, messages: String, options: String) -> Result<u32, JsError> {
        let ids = self.chat_ids(&messages)?;
        self.start_ids(&ids, &options).await
    }

    /// Sets up continuing `prompt` (as `start`) without evaluating it; returns how many tokens
    /// `prefillChunk` will evaluate. A stop between chunks keeps what was evaluated in the cache.
    pub fn prepare(&mut self, prompt: String, options: String) -> Result<u32, JsError> {
        let ids = self.tokenize(&prompt, true)?;
        self.prepare_ids(&ids, &options)
    }

    /// Sets up a chat reply (as `startChat`) without evaluating the prompt.
    #[wasm_bindgen(js_name = prepareChat)]
    pub fn prepare_chat(&mut self, messages: String, options: String) -> Result<u32, JsError> {
        let ids = self.chat_ids(&messages)?;
        self.prepare_ids(&ids, &options)
    }

    /// Evaluates up to `max` more prompt tokens; resolves to true once the whole prompt is in the cache and
    /// `step` can run.
    #[wasm_bindgen(js_name = prefillChunk)]
    pub async fn prefill_chunk(&mut self, max: u32) -> Result<bool, JsError> {
        let prompt = self.prompt.as_mut().ok_or_else(|| js_error("no prompt prepared"))?;
        let n = prompt.rest.len().min(max.max(1) as usize);
        let chunk: Vec<u32> = prompt.rest.drain(..n).collect();
        // Only the prompt's last token needs logits (the first pick comes from them).
        let want = if prompt.rest.is_empty() { Want::Logits } else { Want::Nothing };
        let done = prompt.rest.is_empty();
        if let Err(e) = self.runner.push(&chunk, want).await {
            self.prompt = None;
            return Err(js_error(e));
        }
        if done {
            let p = self.prompt.take().expect("checked above");
            let mut generation = Generation::new(&p.params, p.n_eval);
            if let Some(c) = p.constraint {
                generation.constrain(c);
            }
            self.generation = Some(generation);
        }
        Ok(done)
    }

    /// Generates one token: returns its text (often "": held back until a character or a possible stop
    /// string is complete), or undefined once generation has stopped.
    pub async fn step(&mut self) -> Result<Option<String>, JsError> {
        let generation = self.generation.as_mut().ok_or_else(|| js_error("no generation started"))?;
        let r = &mut self.runner;
        let out = Output::Logits(r.logits());
        let step = generation.step(&self.tokenizer, out, r.tokens(), r.ctx()).map_err(js_error)?;
        let Some(step) = step else { return Ok(None) };
        if let Some(t) = step.eval {
            r.push(&[t], Want::Logits).await.map_err(js_error)?;
        }
        Ok(Some(step.text))
    }

    /// The current or last generation's counts as JSON: `{promptTokens, cachedTokens, generatedTokens, stop,
    /// seed}` (`promptTokens` were evaluated, `cachedTokens` of the prompt were already in the cache)
    /// (`stop` is null while it runs).
    pub fn stats(&self) -> String {
        let g = self.generation.as_ref();
        json!({
            "promptTokens": g.map(|g| g.n_prompt_eval),
            "generatedTokens": g.map(|g| g.n_generated),
            "cachedTokens": g.map(|g| self.prompt_len - g.n_prompt_eval),
            "stop": g.and_then(|g| g.stop).map(|s| format!("{s:?}")),
            "seed": self.seed,
        })
        .to_string()
    }

    /// The tokens whose embedding is `text`'s (BOS and EOS where the vocabulary adds them, as `bitnet embed`).
    #[wasm_bindgen(js_name = embeddingTokens)]
    pub fn embedding_tokens(&self, text: &str) -> Result<Vec<u32>, JsError> {
        embed::tokens(&self.tokenizer, text).map_err(js_error)
    }

    /// The unit-length sentence embedding of `ids` (an embedding model's last-token pooling, as `bitnet
    /// embed`); the conversation's cache is cleared. Embedding models only, on the wasm backend.
    pub fn embed(&mut self, ids: Vec<u32>) -> Result<Vec<f32>, JsError> {
        if !self.embedding {
            return Err(js_error("this is not an embedding model: it generates text (use generate() or chat())"));
        }
        self.generation = None;
        self.prompt = None;
        match &mut self.runner {
            Runner::Cpu(session) => embed::embed_tokens(session, &ids).map_err(js_error),
            Runner::Gpu(_) => Err(js_error("embeddings run on the wasm backend only: load with backend 'wasm'")),
        }
    }

    /// Forgets the conversation (the KV cache).
    pub fn reset(&mut self) {
        self.generation = None;
        self.prompt = None;
        self.runner.truncate(0);
    }
}
