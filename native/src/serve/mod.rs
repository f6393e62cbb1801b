//! `bitnet serve`: an OpenAI-compatible HTTP server (llama-server's API subset).
//!
//! The HTTP side runs on a single-threaded tokio runtime: handlers parse and validate a request,
//! tokenize its prompt, and queue it for the engine thread (scheduler.rs), which streams text back.
//! All model work happens on the engine thread and its rayon pool.

mod api;
mod metrics;
mod scheduler;

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bitnet_engine::generate::sampler::SamplerParams;
use bitnet_engine::generate::{GenParams, StopReason};
use bitnet_engine::text::chat::ChatMessage;
use bitnet_engine::Error;
use clap::Args;
use futures_util::{stream, Stream, StreamExt};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use crate::model_file::Loaded;
use crate::ModelArgs;
use api::*;
use scheduler::{Done, Event, Job, Scheduler, SubmitError};

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Address to listen on (127.0.0.1: this machine only).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on (0: any free port; the address is printed on stdout).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Sequences generated at once; each slot has its own KV cache of --ctx tokens.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=256))]
    slots: u32,
    /// Requests that may wait for a free slot; beyond that the server answers 429.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    queue: u32,
    /// Require `Authorization: Bearer KEY` on every endpoint but /health.
    #[arg(long, env = "BITNET_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Largest accepted request body, in bytes.
    #[arg(long, default_value_t = 1 << 20)]
    max_body: usize,
}

/// What every handler sees.
struct App {
    m: &'static Loaded,
    scheduler: Scheduler,
    model_id: String,
    ctx: usize,
    api_key: Option<String>,
    started: u64,
    next_id: AtomicU64,
}

pub fn serve(a: ServeArgs) -> Result<(), Error> {
    // The model lives as long as the process: the engine thread and the handlers borrow it.
    let m: &'static Loaded = Box::leak(Box::new(Loaded::open(&a.model)?));
    let ctx = m.ctx;
    let scheduler = Scheduler::start(m, a.slots as usize, a.queue as usize, ctx)?;
    let model_id = match &a.model.model {
        Some(p) => p.file_stem().map_or("model".into(), |s| s.to_string_lossy().into_owned()),
        None => "smolbit-135m".into(),
    };
    let app = Arc::new(App {
        m,
        scheduler,
        model_id,
        ctx,
        api_key: a.api_key.clone(),
        started: unix_time(),
        next_id: AtomicU64::new(0),
    });
    let io = |e: std::io::Error| Error::Invalid(format!("server: {e}"));
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(io)?;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind((a.host.as_str(), a.port)).await.map_err(io)?;
        let addr = listener.local_addr().map_err(io)?;
        // Tests and scripts read this line to find the port.
        println!("listening on http://{addr}");
        std::io::Write::flush(&mut std::io::stdout()).map_err(io)?;
        eprintln!(
            "model {} on {} ({} CPU threads): {} slots of {ctx} tokens, queue {}",
            app.model_id,
            m.weights.name(),
            m.threads,
            a.slots,
            a.queue
        );
        axum::serve(listener, router(app, a.max_body)).await.map_err(io)
    })
}

fn router(app: Arc<App>, max_body: usize) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/metrics", get(metrics))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .route_layer(middleware::from_fn_with_state(app.clone(), auth))
        .route("/health", get(|| async { Json(serde_json::json!({ "status": "ok" })) }))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such endpoint", "invalid_request_error") })
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(app)
}

/// An error as OpenAI reports it: a status and `{"error": {"message", "type", "param", "code"}}`.
struct ApiError {
    status: StatusCode,
    detail: ErrorDetail,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>, kind: &'static str) -> Self {
        Self { status, detail: ErrorDetail { message: message.into(), kind, param: None, code: None } }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message, "invalid_request_error")
    }

    fn param(mut self, param: &str) -> Self {
        self.detail.param = Some(param.into());
        self
    }

    fn code(mut self, code: &'static str) -> Self {
        self.detail.code = Some(code);
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(ErrorBody { error: self.detail })).into_response()
    }
}

async fn auth(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    if let Some(key) = &app.api_key {
        let given = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
        let given = given.and_then(|v| v.strip_prefix("Bearer ")).unwrap_or("");
        if !same_secret(given.as_bytes(), key.as_bytes()) {
            let e = ApiError::new(
                StatusCode::UNAUTHORIZED,
                "invalid or missing API key (Authorization: Bearer KEY)",
                "invalid_request_error",
            );
            return e.code("invalid_api_key").into_response();
        }
    }
    next.run(req).await
}

/// Compares without an early exit, so that response times do not reveal how much of a guess was right.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The body as JSON; a body too large or not JSON is a 4xx naming the problem.
fn json_body(body: Result<Bytes, BytesRejection>) -> Result<serde_json::Value, ApiError> {
    let body = body.map_err(|r| ApiError::new(r.status(), r.body_text(), "invalid_request_error"))?;
    serde_json::from_slice(&body).map_err(|e| ApiError::bad_request(format!("the body is not valid JSON: {e}")))
}

/// The JSON body as `T`; a missing field or one of the wrong type is a 400 that names it.
fn typed<T: DeserializeOwned>(body: &serde_json::Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(body).map_err(|e| {
        let path = e.path().to_string();
        let err = ApiError::bad_request(format!("invalid request: {}: {}", path, e.inner()));
        if path == "." {
            err
        } else {
            err.param(&path)
        }
    })
}

async fn chat(State(app): State<Arc<App>>, body: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let body = json_body(body)?;
    let (req, sampling): (ChatRequest, Sampling) = (typed(&body)?, typed(&body)?);
    if req.messages.is_empty() {
        return Err(ApiError::bad_request("messages must not be empty").param("messages"));
    }
    let messages = req.messages.iter().map(chat_message).collect::<Result<Vec<_>, _>>()?;
    let prompt = app
        .m
        .tokenizer
        .encode_chat(&messages, true)
        .map_err(|e| ApiError::bad_request(e.to_string()).param("messages"))?;
    let mut pending = Generation::submit(&app, prompt, &sampling, "messages", "chatcmpl")?;
    if sampling.stream == Some(true) {
        let usage = sampling.stream_options.and_then(|o| o.include_usage) == Some(true);
        return Ok(sse(pending.chat_stream(app, usage)));
    }
    let (text, done) = pending.collect().await?;
    let body = ChatCompletion {
        id: &pending.id,
        object: "chat.completion",
        created: pending.created,
        model: &app.model_id,
        choices: [ChatChoice {
            index: 0,
            message: AssistantMessage { role: "assistant", content: &text },
            finish_reason: finish_reason(done.stop),
            logprobs: None,
        }],
        usage: usage(&done),
    };
    Ok(Json(body).into_response())
}

fn chat_message(m: &Message) -> Result<ChatMessage, ApiError> {
    let content = match &m.content {
        None => String::new(),
        Some(Content::Text(t)) => t.clone(),
        Some(Content::Parts(parts)) => {
            let mut text = String::new();
            for p in parts {
                match (p.kind.as_str(), &p.text) {
                    ("text", Some(t)) => text.push_str(t),
                    _ => {
                        return Err(ApiError::bad_request(format!(
                            "content parts of type '{}' are not supported (text only)",
                            p.kind
                        ))
                        .param("messages"))
                    }
                }
            }
            text
        }
    };
    Ok(ChatMessage { role: m.role.clone(), content })
}

async fn completions(State(app): State<Arc<App>>, body: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let body = json_body(body)?;
    let (req, sampling): (CompletionRequest, Sampling) = (typed(&body)?, typed(&body)?);
    let tok = &app.m.tokenizer;
    let prompt = match &req.prompt {
        Prompt::Text(t) => tok.encode(t, tok.add_bos()),
        Prompt::Texts(t) if t.len() == 1 => tok.encode(&t[0], tok.add_bos()),
        Prompt::Texts(_) => {
            return Err(ApiError::bad_request("only one prompt per request is supported").param("prompt"))
        }
        Prompt::Tokens(ids) => Ok(ids.clone()),
    };
    let prompt = prompt.map_err(|e| ApiError::bad_request(e.to_string()).param("prompt"))?;
    if let Some(&bad) = prompt.iter().find(|&&t| t as usize >= tok.vocab_size()) {
        return Err(ApiError::bad_request(format!("token id {bad} is outside the vocabulary of {}", tok.vocab_size()))
            .param("prompt"));
    }
    let mut pending = Generation::submit(&app, prompt, &sampling, "prompt", "cmpl")?;
    if sampling.stream == Some(true) {
        let usage = sampling.stream_options.and_then(|o| o.include_usage) == Some(true);
        return Ok(sse(pending.completion_stream(app, usage)));
    }
    let (text, done) = pending.collect().await?;
    let choice =
        CompletionChoice { index: 0, text: &text, finish_reason: Some(finish_reason(done.stop)), logprobs: None };
    let body = Completion {
        id: &pending.id,
        object: "text_completion",
        created: pending.created,
        model: &app.model_id,
        choices: vec![choice],
        usage: Some(usage(&done)),
    };
    Ok(Json(body).into_response())
}

/// A queued request: its id and the channel its text comes back on.
struct Generation {
    id: String,
    created: u64,
    events: UnboundedReceiver<Event>,
}

impl Generation {
    /// Checks the sampling fields and the context, and queues the request.
    fn submit(
        app: &App,
        prompt: Vec<u32>,
        s: &Sampling,
        prompt_param: &str,
        id_prefix: &str,
    ) -> Result<Self, ApiError> {
        app.scheduler.metrics.requests.fetch_add(1, Relaxed);
        if prompt.is_empty() {
            return Err(ApiError::bad_request("the prompt is empty").param(prompt_param));
        }
        let params = gen_params(s)?;
        let max_tokens = s.max_completion_tokens.or(s.max_tokens);
        let needed = prompt.len() + max_tokens.map_or(1, |n| n as usize);
        if needed > app.ctx {
            let asked = max_tokens
                .map_or(String::new(), |n| format!(" ({} in the prompt, {n} in the completion)", prompt.len()));
            let msg = format!("This model's maximum context length is {} tokens. However, you requested {needed} tokens{asked}. Please reduce the length of the prompt or completion.", app.ctx);
            return Err(ApiError::bad_request(msg).param(prompt_param).code("context_length_exceeded"));
        }
        let params = GenParams { max_tokens: max_tokens.map_or(app.ctx - prompt.len(), |n| n as usize), ..params };
        let (tx, rx) = unbounded_channel();
        let job = Job { prompt, params, events: tx };
        match app.scheduler.submit(job) {
            Ok(()) => {}
            Err(SubmitError::Busy) => {
                app.scheduler.metrics.rejected.fetch_add(1, Relaxed);
                let e = ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "the server is busy: every slot is in use and the queue is full; retry later",
                    "server_error",
                );
                return Err(e.code("rate_limit_exceeded"));
            }
            Err(SubmitError::Stopped) => {
                return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "the engine has stopped", "server_error"));
            }
        }
        let n = app.next_id.fetch_add(1, Relaxed);
        Ok(Self { id: format!("{id_prefix}-{:x}{n:06x}", app.started), created: unix_time(), events: rx })
    }

    /// The whole text, for a non-streaming response.
    async fn collect(&mut self) -> Result<(String, Done), ApiError> {
        let mut text = String::new();
        while let Some(event) = self.events.recv().await {
            match event {
                Event::Text(t) => text.push_str(&t),
                Event::Done(done) => return Ok((text, done)),
                Event::Failed(msg) => {
                    return Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, msg, "server_error"))
                }
            }
        }
        Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "the engine stopped", "server_error"))
    }

    /// The request's events up to its last (a closed channel counts as a failure).
    fn events(self) -> impl Stream<Item = Event> + Send + 'static {
        stream::unfold(Some(self.events), |rx| async move {
            let mut rx = rx?;
            match rx.recv().await {
                Some(text @ Event::Text(_)) => Some((text, Some(rx))),
                Some(last) => Some((last, None)),
                None => Some((Event::Failed("the engine stopped".into()), None)),
            }
        })
    }

    /// `chat.completion.chunk` events: the role, the text pieces, the finish reason, the usage if asked for.
    fn chat_stream(self, app: Arc<App>, include_usage: bool) -> impl Stream<Item = String> + Send + 'static {
        let (id, created) = (self.id.clone(), self.created);
        let chunk = move |delta: Delta, finish_reason: Option<&'static str>, usage: Option<Usage>| {
            let choice = usage.is_none().then_some(ChunkChoice { index: 0, delta, finish_reason, logprobs: None });
            let c = ChatChunk {
                id: &id,
                object: "chat.completion.chunk",
                created,
                model: &app.model_id,
                choices: choice.into_iter().collect(),
                usage,
            };
            to_json(&c)
        };
        let first = chunk(Delta { role: Some("assistant"), content: Some("") }, None, None);
        let rest = self.events().flat_map(move |event| {
            stream::iter(match event {
                Event::Text(t) => vec![chunk(Delta { role: None, content: Some(&t) }, None, None)],
                Event::Done(d) => {
                    let mut out = vec![chunk(Delta::default(), Some(finish_reason(d.stop)), None)];
                    out.extend(include_usage.then(|| chunk(Delta::default(), None, Some(usage(&d)))));
                    out.push("[DONE]".into());
                    out
                }
                Event::Failed(msg) => vec![stream_error(msg)],
            })
        });
        stream::once(std::future::ready(first)).chain(rest)
    }

    /// `text_completion` events: the text pieces, the finish reason, the usage if asked for.
    fn completion_stream(self, app: Arc<App>, include_usage: bool) -> impl Stream<Item = String> + Send + 'static {
        let (id, created) = (self.id.clone(), self.created);
        let chunk = move |text: &str, finish_reason: Option<&'static str>, usage: Option<Usage>| {
            let choice = usage.is_none().then_some(CompletionChoice { index: 0, text, finish_reason, logprobs: None });
            let c = Completion {
                id: &id,
                object: "text_completion",
                created,
                model: &app.model_id,
                choices: choice.into_iter().collect(),
                usage,
            };
            to_json(&c)
        };
        self.events().flat_map(move |event| {
            stream::iter(match event {
                Event::Text(t) => vec![chunk(&t, None, None)],
                Event::Done(d) => {
                    let mut out = vec![chunk("", Some(finish_reason(d.stop)), None)];
                    out.extend(include_usage.then(|| chunk("", None, Some(usage(&d)))));
                    out.push("[DONE]".into());
                    out
                }
                Event::Failed(msg) => vec![stream_error(msg)],
            })
        })
    }
}

fn sse(data: impl Stream<Item = String> + Send + 'static) -> Response {
    let events = data.map(|d| Ok::<_, std::convert::Infallible>(SseEvent::default().data(d)));
    Sse::new(events).keep_alive(KeepAlive::default()).into_response()
}

fn to_json(v: &impl serde::Serialize) -> String {
    serde_json::to_string(v).expect("response types serialize")
}

/// A failure after the stream has started: an error object in place of the next chunk.
fn stream_error(message: String) -> String {
    to_json(&ErrorBody { error: ErrorDetail { message, kind: "server_error", param: None, code: None } })
}

fn finish_reason(stop: StopReason) -> &'static str {
    match stop {
        StopReason::MaxTokens | StopReason::ContextFull => "length",
        StopReason::EndToken | StopReason::StopString | StopReason::Cancelled => "stop",
    }
}

fn usage(d: &Done) -> Usage {
    Usage {
        prompt_tokens: d.prompt_tokens,
        completion_tokens: d.completion_tokens,
        total_tokens: d.prompt_tokens + d.completion_tokens,
        prompt_tokens_details: PromptDetails { cached_tokens: d.cached_tokens },
    }
}

/// Sampling settings from the request; absent fields take llama.cpp's defaults (temperature 0.8, top_k 40,
/// top_p 0.95, min_p 0.05). Returns the parameters with max_tokens unset.
fn gen_params(s: &Sampling) -> Result<GenParams, ApiError> {
    if s.n.is_some_and(|n| n != 1) {
        return Err(ApiError::bad_request("only n = 1 is supported").param("n"));
    }
    let d = SamplerParams::default();
    let check = |name: &str, value: Option<f32>, default: f32, ok: fn(f32) -> bool, range: &str| match value {
        None => Ok(default),
        Some(v) if v.is_finite() && ok(v) => Ok(v),
        Some(v) => Err(ApiError::bad_request(format!("{name} = {v} is out of range ({range})")).param(name)),
    };
    let temperature = check("temperature", s.temperature, d.temperature, |v| v >= 0.0, "0 or more")?;
    let top_p = check("top_p", s.top_p, d.top_p, |v| (0.0..=1.0).contains(&v), "0 to 1")?;
    let min_p = check("min_p", s.min_p, d.min_p, |v| (0.0..=1.0).contains(&v), "0 to 1")?;
    let repeat_penalty = check("repeat_penalty", s.repeat_penalty, d.repeat_penalty, |v| v > 0.0, "more than 0")?;
    let frequency_penalty =
        check("frequency_penalty", s.frequency_penalty, 0.0, |v| (-2.0..=2.0).contains(&v), "-2 to 2")?;
    let presence_penalty =
        check("presence_penalty", s.presence_penalty, 0.0, |v| (-2.0..=2.0).contains(&v), "-2 to 2")?;
    let seed = match s.seed {
        Some(seed) if seed >= 0 => seed as u64,
        _ => random_seed(),
    };
    let stop = match &s.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s.clone()],
        Some(Stop::Many(v)) => v.clone(),
    };
    let sampler = SamplerParams {
        temperature,
        top_k: s.top_k.map_or(d.top_k, |k| k as usize),
        top_p,
        min_p,
        repeat_penalty,
        repeat_last_n: s.repeat_last_n.map_or(d.repeat_last_n, |n| n as usize),
        frequency_penalty,
        presence_penalty,
        seed,
    };
    Ok(GenParams { max_tokens: 0, sampler, stop })
}

fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    // The standard library's per-process random keys, advanced on every call.
    std::collections::hash_map::RandomState::new().build_hasher().finish()
}

fn unix_time() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

async fn models(State(app): State<Arc<App>>) -> Json<serde_json::Value> {
    let card = ModelCard { id: &app.model_id, object: "model", created: app.started, owned_by: "bitnet" };
    Json(serde_json::json!(ModelList { object: "list", data: [card] }))
}

async fn metrics(State(app): State<Arc<App>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], app.scheduler.metrics.render())
}

async fn tokenize(
    State(app): State<Arc<App>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let req: TokenizeRequest = typed(&json_body(body)?)?;
    let tok = &app.m.tokenizer;
    let tokens = tok
        .encode(&req.content, req.add_special && tok.add_bos())
        .map_err(|e| ApiError::bad_request(e.to_string()).param("content"))?;
    Ok(Json(serde_json::json!({ "tokens": tokens })))
}

async fn detokenize(
    State(app): State<Arc<App>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let req: DetokenizeRequest = typed(&json_body(body)?)?;
    let tok = &app.m.tokenizer;
    if let Some(&bad) = req.tokens.iter().find(|&&t| t as usize >= tok.vocab_size()) {
        return Err(ApiError::bad_request(format!("token id {bad} is outside the vocabulary of {}", tok.vocab_size()))
            .param("tokens"));
    }
    Ok(Json(serde_json::json!({ "content": tok.decode(&req.tokens) })))
}
