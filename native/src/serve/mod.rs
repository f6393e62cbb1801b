//! `bitnet serve`: an OpenAI-compatible HTTP server (llama-server's API subset).
//!
//! The HTTP side runs on a single-threaded tokio runtime: handlers parse and validate a request,
//! tokenize its prompt (on tokio's blocking pool: a long prompt must not stall the other connections),
//! and queue it for the engine thread (scheduler.rs), which streams text back. All model work happens
//! on the engine thread and its rayon pool.
//!
//! Safe as a local server by default: bound to 127.0.0.1, it refuses a `Host` that is not this machine
//! (DNS rebinding: a web page whose name resolves to 127.0.0.1 must not read the answers), JSON endpoints
//! want `Content-Type: application/json` (which a page can only send cross-origin with CORS, off unless
//! `--cors-origin` allows an origin), and connections, headers and bodies have limits (crate::http).

mod api;
mod metrics;
mod scheduler;
mod webui;

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use bitnet_engine::generate::embed;
use bitnet_engine::generate::grammar::{Constraint, GrammarSpec, Grammars};
use bitnet_engine::generate::sampler::TokenLogprob as EngineLogprob;
use bitnet_engine::generate::{GenParams, StopReason};
use bitnet_engine::text::chat::{ChatMessage, FunctionCall, ToolCall};
use bitnet_engine::text::tools::{CallPiece, CallReader, ParsedCall, Tool, ToolChoice, ToolFormat};
use bitnet_engine::Error;
use clap::Args;
use futures_util::{stream, Stream, StreamExt};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use crate::http::Peer;
use crate::model_file::Loaded;
use crate::ModelArgs;
use api::*;
use scheduler::{Done, EmbedJob, Event, Job, Scheduler, SubmitError, Task};

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
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
    /// Require `Authorization: Bearer KEY` on every endpoint but /health. A key given on the command line
    /// is visible to every user of the machine (`ps`): prefer the BITNET_API_KEY environment variable.
    #[arg(long, env = "BITNET_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Read the API key from this file (its first line; surrounding whitespace is ignored): the key shows
    /// neither in `ps` nor in the environment.
    #[arg(long, value_name = "FILE")]
    api_key_file: Option<std::path::PathBuf>,
    /// The model's name in /v1/models and in responses (default: the file name without .gguf).
    #[arg(long, value_name = "NAME")]
    alias: Option<String>,
    /// On SIGINT or SIGTERM, seconds that running requests get to finish before they are ended with an error
    /// (new connections are refused at once).
    #[arg(long, default_value_t = 30, value_name = "SECONDS")]
    shutdown_timeout: u64,
    /// Largest accepted request body, in bytes.
    #[arg(long, default_value_t = 1 << 20)]
    max_body: usize,
    /// Let web pages of this origin (e.g. http://localhost:3000) call the API from a browser (repeatable).
    /// Without it, no cross-origin access is allowed.
    #[arg(long)]
    cors_origin: Vec<String>,
    /// Tokenize control-token text inside chat messages (e.g. "<|eot_id|>") as control tokens, as
    /// llama.cpp does. Off: message text is only text, so a user cannot forge another role's turn.
    #[arg(long)]
    parse_special: bool,
    /// Seconds a client has to send a request's headers, and then its body.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    timeout: u64,
    /// Connections served at once; more wait to be accepted.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=65536))]
    max_connections: u32,
    /// Do not serve the chat page at / (llama-server's flag).
    #[arg(long)]
    no_webui: bool,
}

/// What every handler sees.
struct App {
    m: &'static Loaded,
    scheduler: Scheduler,
    model_id: String,
    /// The model file, for /props ("" for the embedded model).
    model_path: String,
    /// The grammar engine for structured output, built by the first request that asks for it.
    grammars: std::sync::OnceLock<Result<Grammars, String>>,
    ctx: usize,
    api_key: Option<String>,
    started: u64,
    next_id: AtomicU64,
    parse_special: bool,
    /// Host names requests may be addressed to (with any port); None: any (the server is not on loopback).
    allowed_hosts: Option<Vec<String>>,
    max_body: usize,
    body_timeout: Duration,
    /// Serve the chat page at / (not --no-webui).
    webui: bool,
}

pub fn serve(a: ServeArgs) -> Result<(), Error> {
    let api_key = api_key(&a)?;
    // The model lives as long as the process: the engine thread and the handlers borrow it.
    let m: &'static Loaded = Box::leak(Box::new(Loaded::open(&a.model)?));
    let ctx = m.ctx;
    m.check_memory(ctx, a.slots as usize)?;
    let scheduler = Scheduler::start(m, a.slots as usize, a.queue as usize, ctx)?;
    let model_id = match (&a.alias, &a.model.model) {
        (Some(alias), _) => alias.clone(),
        (None, Some(p)) => p.file_stem().map_or("model".into(), |s| s.to_string_lossy().into_owned()),
        (None, None) => "smolbit-135m".into(),
    };
    let app = Arc::new(App {
        m,
        scheduler,
        model_id,
        model_path: a.model.model.as_ref().map_or(String::new(), |p| p.display().to_string()),
        grammars: std::sync::OnceLock::new(),
        ctx,
        api_key,
        started: unix_time(),
        next_id: AtomicU64::new(0),
        parse_special: a.parse_special,
        allowed_hosts: loopback_names(&a.host),
        max_body: a.max_body,
        body_timeout: Duration::from_secs(a.timeout),
        webui: !a.no_webui,
    });
    let cors = cors_layer(&a.cors_origin)?;
    let limits = crate::http::Limits {
        max_connections: a.max_connections as usize,
        header_timeout: Duration::from_secs(a.timeout),
        // Generations stream for as long as they run.
        connection_timeout: None,
    };
    let io = |e: std::io::Error| Error::Invalid(format!("server: {e}"));
    // The blocking pool tokenizes prompts; a few threads keep a flood of huge prompts from taking every core.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().max_blocking_threads(4).build().map_err(io)?;
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
        let mut router = router(app.clone());
        if let Some(cors) = cors {
            router = router.layer(cors);
        }
        let router = router.layer(middleware::from_fn(log_request));
        let open = crate::http::serve(listener, router, limits, stop_signal()).await;
        // Graceful shutdown: no new connections; running requests get --shutdown-timeout to finish (a second
        // signal cuts that short); then the engine ends the rest with an error, which their connections still
        // deliver.
        eprintln!("shutting down: waiting up to {} s for running requests (again to stop now)", a.shutdown_timeout);
        let mut closed = Box::pin(open.shutdown());
        tokio::select! {
            finished = tokio::time::timeout(Duration::from_secs(a.shutdown_timeout), &mut closed) => {
                if finished.is_ok() {
                    return Ok(());
                }
            }
            () = stop_signal() => {}
        }
        eprintln!("shutting down: ending the requests still running");
        app.scheduler.abort();
        let _ = tokio::time::timeout(Duration::from_secs(5), closed).await;
        Ok::<(), Error>(())
    })?;
    // Tokenization still running on the blocking pool (for a connection already gone) is not waited for.
    rt.shutdown_timeout(Duration::from_secs(1));
    Ok(())
}

/// The API key from --api-key-file, or --api-key / BITNET_API_KEY (not both).
fn api_key(a: &ServeArgs) -> Result<Option<String>, Error> {
    let Some(path) = &a.api_key_file else { return Ok(a.api_key.clone()) };
    if a.api_key.is_some() {
        return Err(Error::Invalid("give the API key once: --api-key-file, or --api-key / BITNET_API_KEY".into()));
    }
    let text =
        std::fs::read_to_string(path).map_err(|e| Error::Invalid(format!("--api-key-file {}: {e}", path.display())))?;
    match text.lines().next().map(str::trim) {
        Some(key) if !key.is_empty() => Ok(Some(key.to_owned())),
        _ => Err(Error::Invalid(format!("--api-key-file {}: the first line is empty", path.display()))),
    }
}

/// Resolves on SIGINT (Ctrl+C) or SIGTERM (what `kill`, systemd and container runtimes send).
async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

/// One line on stderr per request: method, path, status and the time until the response started (a stream
/// goes on after that).
async fn log_request(req: Request, next: Next) -> Response {
    let (method, path) = (req.method().clone(), req.uri().path().to_owned());
    let t0 = std::time::Instant::now();
    let response = next.run(req).await;
    let ms = t0.elapsed().as_secs_f64() * 1e3;
    eprintln!("{method} {path} {} {ms:.1} ms", response.status().as_u16());
    response
}

fn router(app: Arc<App>) -> Router {
    let max_body = app.max_body;
    // The page is public, like /health (with --api-key, it asks for the key and sends it with its API calls).
    let page = if app.webui { webui::routes() } else { Router::new() };
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/models", get(models))
        .route("/metrics", get(metrics))
        .route("/tokenize", post(tokenize))
        .route("/props", get(props))
        .route("/slots", get(slots))
        .route("/detokenize", post(detokenize))
        .route("/apply-template", post(apply_template))
        .route_layer(middleware::from_fn_with_state(app.clone(), auth))
        .route("/health", get(health))
        .merge(page)
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such endpoint", "invalid_request_error") })
        .method_not_allowed_fallback(|method: Method| async move {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("{method} is not allowed here"),
                "invalid_request_error",
            )
        })
        .layer(middleware::from_fn_with_state(app.clone(), guard))
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(app)
}

/// The names a server bound to loopback answers to: `localhost`, the loopback addresses, and the name it was
/// bound with. None for any other binding (reachable from elsewhere by choice: names are not checked).
fn loopback_names(host: &str) -> Option<Vec<String>> {
    let ip = host.trim_matches(['[', ']']).parse::<std::net::IpAddr>();
    if !(host.eq_ignore_ascii_case("localhost") || ip.is_ok_and(|ip| ip.is_loopback())) {
        return None;
    }
    let bound = if host.contains(':') && !host.starts_with('[') { format!("[{host}]") } else { host.to_owned() };
    Some(["localhost", "127.0.0.1", "[::1]", &bound].map(str::to_ascii_lowercase).to_vec())
}

/// The host name of a `Host` header value: without its port, IPv6 addresses in brackets.
fn host_name(host: &str) -> &str {
    match host.strip_prefix('[') {
        Some(rest) => rest.find(']').map_or(host, |end| &host[..end + 2]),
        None => host.split(':').next().unwrap_or(host),
    }
}

fn cors_layer(origins: &[String]) -> Result<Option<tower_http::cors::CorsLayer>, Error> {
    if origins.is_empty() {
        return Ok(None);
    }
    let origins = origins
        .iter()
        .map(|o| {
            HeaderValue::from_str(o).map_err(|_| Error::Invalid(format!("--cors-origin '{o}' is not a valid origin")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let layer = tower_http::cors::CorsLayer::new()
        .allow_origin(origins)
        .allow_methods([Method::GET, Method::POST])
        .allow_headers([header::CONTENT_TYPE, header::AUTHORIZATION]);
    Ok(Some(layer))
}

/// Checks what every request must satisfy before its handler runs: the `Host` (on loopback), a JSON content
/// type for POST bodies, and the whole body within the timeout (a client trickling a body holds nothing for long).
async fn guard(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    if let Some(allowed) = &app.allowed_hosts {
        let host = req.headers().get(header::HOST).map(|h| h.to_str().unwrap_or("?").to_ascii_lowercase());
        // No Host at all (HTTP/1.0) cannot be DNS rebinding, which comes from browsers.
        if let Some(host) = host.filter(|h| !allowed.iter().any(|a| a == host_name(h))) {
            let msg = format!("Host '{host}' is not this server (it answers to localhost only)");
            return ApiError::new(StatusCode::FORBIDDEN, msg, "invalid_request_error").into_response();
        }
    }
    if req.method() == Method::POST && !is_json(req.headers()) {
        let msg = "the body must be JSON, sent with Content-Type: application/json";
        return ApiError::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, msg, "invalid_request_error").into_response();
    }
    let (parts, body) = req.into_parts();
    let body = match tokio::time::timeout(app.body_timeout, axum::body::to_bytes(body, app.max_body)).await {
        Ok(Ok(body)) => body,
        Ok(Err(e)) => {
            let msg = format!("the request body could not be read (at most {} bytes): {e}", app.max_body);
            return ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, msg, "invalid_request_error").into_response();
        }
        Err(_) => {
            let msg = format!("the request body did not arrive within {} s", app.body_timeout.as_secs());
            return ApiError::new(StatusCode::REQUEST_TIMEOUT, msg, "invalid_request_error").into_response();
        }
    };
    next.run(Request::from_parts(parts, Body::from(body))).await
}

fn is_json(headers: &HeaderMap) -> bool {
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    content_type.split(';').next().unwrap_or("").trim().eq_ignore_ascii_case("application/json")
}

/// 200 while the engine thread runs; 503 once it has stopped (nothing would ever be answered).
async fn health(State(app): State<Arc<App>>) -> Response {
    if app.scheduler.is_alive() {
        Json(serde_json::json!({ "status": "ok" })).into_response()
    } else {
        let e = ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "the engine thread has stopped", "server_error");
        e.into_response()
    }
}

/// Runs tokenization or template rendering on the blocking pool: a megabyte of prompt takes a good part of
/// a second, during which the runtime's only thread would serve no one else.
async fn blocking<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(work).await.map_err(|e| {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("tokenizing failed: {e}"), "server_error")
    })
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

/// The body checked against the fields an endpoint honours (400 naming the first other one), then as `T`.
fn request<T: DeserializeOwned>(body: &serde_json::Value, known: &[&[&str]]) -> Result<T, ApiError> {
    if let Some(field) = unknown_field(body, known) {
        let msg = format!("unsupported field '{field}': this server does not honour it");
        return Err(ApiError::bad_request(msg).param(&field).code("unsupported_parameter"));
    }
    typed(body)
}

/// `top_logprobs` as the number of alternatives to report, or None without `logprobs: true`.
fn chat_n_probs(req: &ChatRequest) -> Result<Option<usize>, ApiError> {
    match (req.logprobs, req.top_logprobs) {
        (_, Some(n)) if n > MAX_TOP_LOGPROBS => {
            let msg = format!("top_logprobs = {n} is out of range (0 to {MAX_TOP_LOGPROBS})");
            Err(ApiError::bad_request(msg).param("top_logprobs"))
        }
        (Some(true), n) => Ok(Some(n.unwrap_or(0) as usize)),
        (_, Some(n)) if n > 0 => Err(ApiError::bad_request("top_logprobs needs logprobs: true").param("top_logprobs")),
        _ => Ok(None),
    }
}

async fn chat(
    State(app): State<Arc<App>>,
    peer: Option<Extension<Peer>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = json_body(body)?;
    generates(&app)?;
    let (req, sampling): (ChatRequest, Sampling) = (request(&body, &[SAMPLING_FIELDS, CHAT_FIELDS])?, typed(&body)?);
    let n_probs = chat_n_probs(&req)?;
    let (messages, tools) = chat_input(&app, &req, &body)?;
    let (m, parse_special) = (app.m, app.parse_special);
    let tool_list = tools.as_ref().map(|t| t.json.clone());
    let prompt = blocking(move || m.tokenizer.encode_chat_with(&messages, tool_list.as_deref(), true, parse_special))
        .await?
        .map_err(|e| ApiError::bad_request(e.to_string()).param("messages"))?;
    let mut spec = grammar_spec(&sampling)?;
    if let Some(lark) = tools.as_ref().and_then(|t| t.grammar.clone()) {
        if spec.is_some() {
            let msg = "tools (unless tool_choice is \"none\") cannot be combined with response_format or grammar";
            return Err(ApiError::bad_request(msg).param("tools"));
        }
        spec = Some((GrammarSpec::Lark(lark), "tools"));
    }
    let constraint = compile(&app, spec, sampling.ignore_eos).await?;
    let mut pending = Generation::submit(&app, prompt, &sampling, n_probs, constraint, "messages", "chatcmpl")?;
    pending.tools = tools.filter(|t| t.grammar.is_some()).map(|t| t.format);
    if sampling.stream == Some(true) {
        let usage = sampling.stream_options.and_then(|o| o.include_usage) == Some(true);
        return Ok(sse(pending.chat_stream(app, usage)));
    }
    Ok(answer(peer, chat_answer(app, pending)).await)
}

/// 400 for an embedding model, which cannot generate text.
fn generates(app: &App) -> Result<(), ApiError> {
    if !app.m.embedding {
        return Ok(());
    }
    let msg = format!("'{}' is an embedding model: it cannot generate text (use /v1/embeddings)", app.model_id);
    Err(ApiError::bad_request(msg).param("model").code("model_not_supported"))
}

/// /v1/embeddings: the unit-length sentence embedding of each input (embedding models only), computed on the
/// engine thread.
async fn embeddings(State(app): State<Arc<App>>, body: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let req: EmbeddingRequest = request(&json_body(body)?, &[EMBEDDING_FIELDS])?;
    if !app.m.embedding {
        let msg = format!(
            "'{}' is not an embedding model: it generates text (use /v1/chat/completions or /v1/completions)",
            app.model_id
        );
        return Err(ApiError::bad_request(msg).param("model").code("model_not_supported"));
    }
    let base64 = match req.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            let msg = format!("encoding_format '{other}' is not supported (float, base64)");
            return Err(ApiError::bad_request(msg).param("encoding_format"));
        }
    };
    let inputs = embedding_tokens(&app, req.input).await?;
    app.scheduler.metrics.requests.fetch_add(1, Relaxed);
    let prompt_tokens = inputs.iter().map(Vec::len).sum();
    let (reply, done) = tokio::sync::oneshot::channel();
    submit(&app, Task::Embed(EmbedJob { inputs, reply }))?;
    let failed = |msg: String| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, msg, "server_error");
    let vectors = done.await.map_err(|_| failed("the engine stopped".into()))?.map_err(failed)?;
    let value = |v: Vec<f32>| match base64 {
        false => EmbeddingValue::Float(v),
        true => {
            let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            EmbeddingValue::Base64(base64::Engine::encode(&base64::engine::general_purpose::STANDARD, bytes))
        }
    };
    let data = (vectors.into_iter().enumerate())
        .map(|(index, v)| EmbeddingData { object: "embedding", index, embedding: value(v) })
        .collect();
    let usage = EmbeddingUsage { prompt_tokens, total_tokens: prompt_tokens };
    Ok(Json(EmbeddingList { object: "list", data, model: &app.model_id, usage }).into_response())
}

/// The tokens of each input (texts tokenized on the blocking pool as `bitnet embed` does; ids as given),
/// checked: at least one input and at most MAX_EMBEDDING_INPUTS, none empty, ids in the vocabulary, each
/// within the context.
async fn embedding_tokens(app: &App, input: EmbeddingInput) -> Result<Vec<Vec<u32>>, ApiError> {
    let bad = |msg: String| ApiError::bad_request(msg).param("input");
    let texts = match input {
        EmbeddingInput::Text(t) => vec![t],
        EmbeddingInput::Texts(t) => t,
        EmbeddingInput::Tokens(ids) => return check_embedding_inputs(app, vec![ids]),
        EmbeddingInput::TokenLists(lists) => return check_embedding_inputs(app, lists),
    };
    if texts.iter().any(String::is_empty) {
        return Err(bad("an input text is empty: nothing to embed".into()));
    }
    if texts.len() > MAX_EMBEDDING_INPUTS {
        return Err(bad(format!("{} inputs: at most {MAX_EMBEDDING_INPUTS} per request", texts.len())));
    }
    let m = app.m;
    let tokens = blocking(move || texts.iter().map(|t| embed::tokens(&m.tokenizer, t)).collect::<Result<Vec<_>, _>>())
        .await?
        .map_err(|e| bad(e.to_string()))?;
    check_embedding_inputs(app, tokens)
}

fn check_embedding_inputs(app: &App, inputs: Vec<Vec<u32>>) -> Result<Vec<Vec<u32>>, ApiError> {
    let bad = |msg: String| ApiError::bad_request(msg).param("input");
    let vocab = app.m.tokenizer.vocab_size();
    if inputs.is_empty() {
        return Err(bad("input is empty: nothing to embed".into()));
    }
    if inputs.len() > MAX_EMBEDDING_INPUTS {
        return Err(bad(format!("{} inputs: at most {MAX_EMBEDDING_INPUTS} per request", inputs.len())));
    }
    for (i, ids) in inputs.iter().enumerate() {
        if ids.is_empty() {
            return Err(bad(format!("input {i} is empty: nothing to embed")));
        }
        if let Some(&t) = ids.iter().find(|&&t| t as usize >= vocab) {
            return Err(bad(format!("input {i}: token id {t} is outside the vocabulary of {vocab}")));
        }
        if ids.len() > app.ctx {
            let msg = format!(
                "This model's maximum context length is {} tokens. However, input {i} has {} tokens. Please reduce \
                 the length of the input.",
                app.ctx,
                ids.len()
            );
            return Err(bad(msg).code("context_length_exceeded"));
        }
    }
    Ok(inputs)
}

/// The conversation and its tools, checked.
fn chat_input(
    app: &App,
    req: &ChatRequest,
    body: &serde_json::Value,
) -> Result<(Vec<ChatMessage>, Option<ToolUse>), ApiError> {
    if req.messages.is_empty() {
        return Err(ApiError::bad_request("messages must not be empty").param("messages"));
    }
    let tools = tool_use(app, req, body)?;
    let messages = req.messages.iter().map(chat_message).collect::<Result<Vec<_>, _>>()?;
    let uses_tools = messages.iter().any(|m| m.role == "tool" || !m.tool_calls.is_empty());
    if uses_tools && app.m.tokenizer.tool_format().is_none() {
        return Err(no_tool_support("messages"));
    }
    Ok((messages, tools))
}

/// llama-server's /apply-template: the prompt text the model's chat template makes of a chat request's
/// `messages` (and `tools`), without generating.
async fn apply_template(
    State(app): State<Arc<App>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let body = json_body(body)?;
    let req: ChatRequest = request(&body, &[SAMPLING_FIELDS, CHAT_FIELDS])?;
    let (messages, tools) = chat_input(&app, &req, &body)?;
    let m = app.m;
    let tool_list = tools.map(|t| t.json);
    let prompt = blocking(move || m.tokenizer.render_chat_with(&messages, tool_list.as_deref(), true))
        .await?
        .map_err(|e| ApiError::bad_request(e.to_string()).param("messages"))?;
    Ok(Json(serde_json::json!({ "prompt": prompt })))
}

async fn chat_answer(app: Arc<App>, mut pending: Generation) -> Result<Response, ApiError> {
    let (text, logprobs, done) = pending.collect().await?;
    let calls = pending.tools.and_then(|format| format.parse(&text));
    let finish = if calls.is_some() { "tool_calls" } else { finish_reason(done.stop) };
    let message = match calls {
        Some(calls) => {
            AssistantMessage { role: "assistant", content: None, tool_calls: tool_calls_out(&pending.id, calls) }
        }
        None => AssistantMessage { role: "assistant", content: Some(&text), tool_calls: Vec::new() },
    };
    let body = ChatCompletion {
        id: &pending.id,
        object: "chat.completion",
        created: pending.created,
        model: &app.model_id,
        choices: [ChatChoice {
            index: 0,
            message,
            finish_reason: finish,
            logprobs: pending.n_probs.map(|_| chat_logprobs(&app, &logprobs)),
        }],
        usage: usage(&done),
        timings: timings(&done),
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
    let mut tool_calls = Vec::new();
    for call in m.tool_calls.iter().flatten() {
        let bad = |msg: String| ApiError::bad_request(msg).param("messages");
        if call.kind != "function" {
            return Err(bad(format!("tool call type '{}' is not supported (function only)", call.kind)));
        }
        let arguments = serde_json::from_str(&call.function.arguments).map_err(|e| {
            bad(format!("the arguments of the call {} of '{}' are not JSON: {e}", call.id, call.function.name))
        })?;
        let function = FunctionCall { name: call.function.name.clone(), arguments };
        tool_calls.push(ToolCall { id: call.id.clone(), kind: call.kind.clone(), function });
    }
    Ok(ChatMessage { role: m.role.clone(), content, tool_calls, tool_call_id: m.tool_call_id.clone() })
}

/// What a request's tools ask of the reply.
struct ToolUse {
    format: ToolFormat,
    /// The tools as the client sent them, for the template.
    json: Vec<serde_json::Value>,
    /// The reply's grammar; None for `tool_choice: "none"` (text, parsed as such).
    grammar: Option<String>,
}

fn no_tool_support(param: &str) -> ApiError {
    let msg = "this model's chat template has no tool support (it writes no tool calls): tools, tool calls and \
               tool messages cannot be used with it";
    ApiError::bad_request(msg).param(param).code("unsupported_parameter")
}

/// The request's tools, checked (names as OpenAI allows them, once each; schemas objects), and its
/// `tool_choice`; None without tools.
fn tool_use(app: &App, req: &ChatRequest, body: &serde_json::Value) -> Result<Option<ToolUse>, ApiError> {
    let defs = req.tools.as_deref().unwrap_or_default();
    if defs.is_empty() {
        return match &req.tool_choice {
            Some(ToolChoiceField::Mode(m)) if m == "none" => Ok(None),
            Some(_) => Err(ApiError::bad_request("tool_choice needs tools").param("tool_choice")),
            None => Ok(None),
        };
    }
    let format = app.m.tokenizer.tool_format().ok_or_else(|| no_tool_support("tools"))?;
    let bad = |msg: String| ApiError::bad_request(msg).param("tools");
    let mut tools: Vec<Tool> = Vec::new();
    for def in defs {
        let name = &def.function.name;
        if def.kind != "function" {
            return Err(bad(format!("tool type '{}' is not supported (function only)", def.kind)));
        }
        let valid = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
        if name.is_empty() || name.len() > 64 || !name.chars().all(valid) {
            return Err(bad(format!("tool name '{name}' must be 1 to 64 letters, digits, '_' or '-'")));
        }
        if tools.iter().any(|t| &t.name == name) {
            return Err(bad(format!("tool '{name}' is given twice")));
        }
        let parameters = match &def.function.parameters {
            // No parameters: the call takes none (an empty object).
            None => serde_json::json!({ "type": "object", "properties": {}, "additionalProperties": false }),
            Some(p @ serde_json::Value::Object(_)) => p.clone(),
            Some(_) => return Err(bad(format!("the parameters of tool '{name}' must be a JSON schema (an object)"))),
        };
        tools.push(Tool { name: name.clone(), parameters });
    }
    let bad_choice = |msg: String| ApiError::bad_request(msg).param("tool_choice");
    let choice = match &req.tool_choice {
        None => ToolChoice::Auto,
        Some(ToolChoiceField::Mode(m)) => match m.as_str() {
            "auto" => ToolChoice::Auto,
            "none" => ToolChoice::None,
            "required" => ToolChoice::Required,
            other => return Err(bad_choice(format!("tool_choice '{other}' is not one of none, auto, required"))),
        },
        Some(ToolChoiceField::Function(named)) => {
            let name = &named.function.name;
            if named.kind != "function" || !tools.iter().any(|t| &t.name == name) {
                return Err(bad_choice(format!("tool_choice names no function of tools ('{name}')")));
            }
            ToolChoice::Function(name.clone())
        }
    };
    let parallel = req.parallel_tool_calls.unwrap_or(true);
    let grammar = format.grammar(&tools, &choice, parallel);
    let json = body["tools"].as_array().cloned().unwrap_or_default();
    Ok(Some(ToolUse { format, json, grammar }))
}

/// A call's id: the request's and the call's number in the reply.
fn call_id(request_id: &str, index: usize) -> String {
    format!("call_{}_{index}", request_id.rsplit('-').next().unwrap_or(request_id))
}

/// The calls as the API reports them, in order.
fn tool_calls_out(request_id: &str, calls: Vec<ParsedCall>) -> Vec<ToolCallOut> {
    (calls.into_iter().enumerate())
        .map(|(i, call)| ToolCallOut {
            id: call_id(request_id, i),
            kind: "function",
            function: FunctionCallOut { name: call.name, arguments: call.arguments },
        })
        .collect()
}

async fn completions(
    State(app): State<Arc<App>>,
    peer: Option<Extension<Peer>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = json_body(body)?;
    generates(&app)?;
    let known = [SAMPLING_FIELDS, COMPLETION_FIELDS];
    let (req, sampling): (CompletionRequest, Sampling) = (request(&body, &known)?, typed(&body)?);
    if let Some(n) = req.logprobs.filter(|&n| n > MAX_TOP_LOGPROBS) {
        let msg = format!("logprobs = {n} is out of range (0 to {MAX_TOP_LOGPROBS})");
        return Err(ApiError::bad_request(msg).param("logprobs"));
    }
    let n_probs = req.logprobs.map(|n| n as usize);
    let text = match req.prompt {
        Prompt::Text(t) => Some(t),
        // `[]` reads as an empty list of texts: an empty prompt, refused below.
        Prompt::Texts(t) if t.is_empty() => None,
        Prompt::Texts(t) if t.len() == 1 => t.into_iter().next(),
        Prompt::Texts(_) => {
            return Err(ApiError::bad_request("only one prompt per request is supported").param("prompt"))
        }
        Prompt::Tokens(ids) => return completion_of(app, peer, ids, sampling, n_probs).await,
    };
    let m = app.m;
    let prompt = match text {
        Some(text) => blocking(move || m.tokenizer.encode(&text, m.tokenizer.add_bos())).await?,
        None => Ok(Vec::new()),
    };
    let prompt = prompt.map_err(|e| ApiError::bad_request(e.to_string()).param("prompt"))?;
    completion_of(app, peer, prompt, sampling, n_probs).await
}

/// The completion of prompt ids.
async fn completion_of(
    app: Arc<App>,
    peer: Option<Extension<Peer>>,
    prompt: Vec<u32>,
    sampling: Sampling,
    n_probs: Option<usize>,
) -> Result<Response, ApiError> {
    let tok = &app.m.tokenizer;
    if let Some(&bad) = prompt.iter().find(|&&t| t as usize >= tok.vocab_size()) {
        return Err(ApiError::bad_request(format!("token id {bad} is outside the vocabulary of {}", tok.vocab_size()))
            .param("prompt"));
    }
    let constraint = compile(&app, grammar_spec(&sampling)?, sampling.ignore_eos).await?;
    let pending = Generation::submit(&app, prompt, &sampling, n_probs, constraint, "prompt", "cmpl")?;
    if sampling.stream == Some(true) {
        let usage = sampling.stream_options.and_then(|o| o.include_usage) == Some(true);
        return Ok(sse(pending.completion_stream(app, usage)));
    }
    Ok(answer(peer, completion_answer(app, pending)).await)
}

async fn completion_answer(app: Arc<App>, mut pending: Generation) -> Result<Response, ApiError> {
    let (text, logprobs, done) = pending.collect().await?;
    let logprobs = pending.n_probs.map(|_| {
        let mut offset = 0;
        completion_logprobs(&app, &logprobs, &mut offset)
    });
    let choice = CompletionChoice { index: 0, text: &text, finish_reason: Some(finish_reason(done.stop)), logprobs };
    let body = Completion {
        id: &pending.id,
        object: "text_completion",
        created: pending.created,
        model: &app.model_id,
        choices: vec![choice],
        usage: Some(usage(&done)),
        timings: Some(timings(&done)),
    };
    Ok(Json(body).into_response())
}

/// `response_format` or `grammar` as the grammar the output must follow, with the field it came from (None
/// for free text).
fn grammar_spec(s: &Sampling) -> Result<Option<(GrammarSpec, &'static str)>, ApiError> {
    GrammarSpec::from_request(s.response_format.as_ref(), s.grammar.as_deref())
        .map_err(|msg| ApiError::bad_request(msg).param("response_format"))
}

/// A grammar compiled on the blocking pool (the first one also builds the grammar engine for the vocabulary);
/// one that does not compile is a 400 naming the field it came from.
async fn compile(
    app: &Arc<App>,
    spec: Option<(GrammarSpec, &'static str)>,
    ignore_eos: Option<bool>,
) -> Result<Option<Constraint>, ApiError> {
    let Some((spec, param)) = spec else { return Ok(None) };
    let bad = move |msg: String| ApiError::bad_request(msg).param(param);
    if ignore_eos == Some(true) {
        return Err(bad(format!("{param} and ignore_eos cannot be combined (a complete answer ends with EOS)")));
    }
    let app = app.clone();
    blocking(move || {
        let grammars = app.grammars.get_or_init(|| Grammars::new(&app.m.tokenizer).map_err(|e| e.to_string()));
        let grammars = grammars
            .as_ref()
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.clone(), "server_error"))?;
        grammars.constraint(&spec).map(Some).map_err(|e| bad(e.to_string()))
    })
    .await?
}

/// Queues a task for the engine thread: 429 when the queue is full, 503 once the engine has stopped.
fn submit(app: &App, task: Task) -> Result<(), ApiError> {
    match app.scheduler.submit(task) {
        Ok(()) => Ok(()),
        Err(SubmitError::Busy) => {
            app.scheduler.metrics.rejected.fetch_add(1, Relaxed);
            let e = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "the server is busy: every slot is in use and the queue is full; retry later",
                "server_error",
            );
            Err(e.code("rate_limit_exceeded"))
        }
        Err(SubmitError::Stopped) => {
            Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "the engine has stopped", "server_error"))
        }
    }
}

/// A queued request: its id and the channel its text comes back on.
struct Generation {
    id: String,
    created: u64,
    events: UnboundedReceiver<Event>,
    /// Log-probabilities were asked for (with this many alternatives per token).
    n_probs: Option<usize>,
    /// The reply is text or tool calls of this format (tools were given, and tool_choice is not "none").
    tools: Option<ToolFormat>,
}

impl Generation {
    /// Checks the sampling fields and the context, and queues the request.
    fn submit(
        app: &App,
        prompt: Vec<u32>,
        s: &Sampling,
        n_probs: Option<usize>,
        constraint: Option<Constraint>,
        prompt_param: &str,
        id_prefix: &str,
    ) -> Result<Self, ApiError> {
        app.scheduler.metrics.requests.fetch_add(1, Relaxed);
        if prompt.is_empty() {
            return Err(ApiError::bad_request("the prompt is empty").param(prompt_param));
        }
        let mut params =
            s.gen_params(app.m.tokenizer.vocab_size()).map_err(|e| ApiError::bad_request(e.message).param(e.param))?;
        params.sampler.n_probs = n_probs;
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
        let job = Job { prompt, params, constraint, events: tx, queued_at: std::time::Instant::now() };
        submit(app, Task::Generate(Box::new(job)))?;
        let n = app.next_id.fetch_add(1, Relaxed);
        let id = format!("{id_prefix}-{:x}{n:06x}", app.started);
        Ok(Self { id, created: unix_time(), events: rx, n_probs, tools: None })
    }

    /// The whole text and the tokens' log-probabilities (if asked for), for a non-streaming response.
    async fn collect(&mut self) -> Result<(String, Vec<EngineLogprob>, Done), ApiError> {
        let mut text = String::new();
        let mut logprobs = Vec::new();
        while let Some(event) = self.events.recv().await {
            match event {
                Event::Token { text: t, logprob } => {
                    text.push_str(&t);
                    logprobs.extend(logprob);
                }
                Event::Done(done) => return Ok((text, logprobs, done)),
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
                Some(token @ Event::Token { .. }) => Some((token, Some(rx))),
                Some(last) => Some((last, None)),
                None => Some((Event::Failed("the engine stopped".into()), None)),
            }
        })
    }

    /// `chat.completion.chunk` events: the role, the text pieces, the finish reason, the usage if asked for.
    fn chat_stream(self, app: Arc<App>, include_usage: bool) -> impl Stream<Item = String> + Send + 'static {
        let (id, created) = (self.id.clone(), self.created);
        // The tokenizer for the log-probabilities' token texts, when they were asked for.
        let with_logprobs = self.n_probs.map(|_| app.clone());
        let chunk = move |choice: Option<ChunkChoice>, usage: Option<Usage>, timings: Option<Timings>| {
            let c = ChatChunk {
                id: &id,
                object: "chat.completion.chunk",
                created,
                model: &app.model_id,
                choices: choice.into_iter().collect(),
                usage,
                timings,
            };
            to_json(&c)
        };
        fn choice<'a>(d: Delta<'a>, end: Option<&'static str>, lp: Option<ChatLogprobs>) -> Option<ChunkChoice<'a>> {
            Some(ChunkChoice { index: 0, delta: d, finish_reason: end, logprobs: lp })
        }
        let first = chunk(
            choice(Delta { role: Some("assistant"), content: Some(""), ..Delta::default() }, None, None),
            None,
            None,
        );
        let lp = move |tokens: &[EngineLogprob]| with_logprobs.as_ref().map(|app| chat_logprobs(app, tokens));
        let mut tool_reply = self.tools.map(|format| ToolReply::new(format, &self.id));
        let rest = self.events().flat_map(move |event| {
            let text_chunk = |text: &str, logprob: &[EngineLogprob]| {
                chunk(choice(Delta { content: Some(text), ..Delta::default() }, None, lp(logprob)), None, None)
            };
            stream::iter(match event {
                Event::Token { text, logprob } => match &mut tool_reply {
                    None => vec![text_chunk(&text, logprob.as_slice())],
                    Some(reply) => {
                        reply.logprobs.extend(logprob);
                        match reply.read(&text) {
                            (Some(text), _) => vec![text_chunk(&text, &std::mem::take(&mut reply.logprobs))],
                            (None, calls) if !calls.is_empty() => {
                                let delta = Delta { tool_calls: Some(calls), ..Delta::default() };
                                vec![chunk(choice(delta, None, lp(&std::mem::take(&mut reply.logprobs))), None, None)]
                            }
                            (None, _) => vec![],
                        }
                    }
                },
                Event::Done(d) => {
                    let mut finish = finish_reason(d.stop);
                    let mut logprobs = None;
                    if let Some(reply) = &tool_reply {
                        if reply.made_calls() && d.stop == StopReason::EndToken {
                            finish = "tool_calls";
                        }
                        logprobs = Some(&reply.logprobs).filter(|l| !l.is_empty()).and_then(|l| lp(l));
                    }
                    let last = choice(Delta::default(), Some(finish), logprobs);
                    let mut out = vec![chunk(last, None, Some(timings(&d)))];
                    out.extend(include_usage.then(|| chunk(None, Some(usage(&d)), None)));
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
        let with_logprobs = self.n_probs.map(|_| app.clone());
        let chunk = move |choice: Option<CompletionChoice>, usage: Option<Usage>, timings: Option<Timings>| {
            let c = Completion {
                id: &id,
                object: "text_completion",
                created,
                model: &app.model_id,
                choices: choice.into_iter().collect(),
                usage,
                timings,
            };
            to_json(&c)
        };
        fn choice<'a>(
            text: &'a str,
            end: Option<&'static str>,
            lp: Option<CompletionLogprobs>,
        ) -> Option<CompletionChoice<'a>> {
            Some(CompletionChoice { index: 0, text, finish_reason: end, logprobs: lp })
        }
        // Where the next token starts in the text streamed so far (the chunks' `text_offset`).
        let mut offset = 0;
        self.events().flat_map(move |event| {
            stream::iter(match event {
                Event::Token { text, logprob } => {
                    let logprobs =
                        with_logprobs.as_ref().map(|app| completion_logprobs(app, logprob.as_slice(), &mut offset));
                    vec![chunk(choice(&text, None, logprobs), None, None)]
                }
                Event::Done(d) => {
                    let mut out = vec![chunk(choice("", Some(finish_reason(d.stop)), None), None, Some(timings(&d)))];
                    out.extend(include_usage.then(|| chunk(None, Some(usage(&d)), None)));
                    out.push("[DONE]".into());
                    out
                }
                Event::Failed(msg) => vec![stream_error(msg)],
            })
        })
    }
}

/// A streamed reply when tools may be called. Its first character tells text from calls (see
/// engine::text::tools): until then it is held; text then streams as it comes, calls as OpenAI streams them
/// (each call's id and name, then its arguments in pieces).
struct ToolReply {
    format: ToolFormat,
    state: ReplyState,
    request_id: String,
    /// The log-probabilities of the tokens not sent yet.
    logprobs: Vec<EngineLogprob>,
}

enum ReplyState {
    Undecided(String),
    Text,
    Calls(CallReader),
}

impl ToolReply {
    fn new(format: ToolFormat, request_id: &str) -> Self {
        let state = ReplyState::Undecided(String::new());
        ToolReply { format, state, request_id: request_id.to_owned(), logprobs: Vec::new() }
    }

    /// Reads a piece of the reply: text to send, or pieces of calls.
    fn read(&mut self, text: &str) -> (Option<String>, Vec<ToolCallDelta>) {
        let pieces = match &mut self.state {
            ReplyState::Text => return (Some(text.to_owned()), Vec::new()),
            ReplyState::Calls(reader) => reader.push(text),
            ReplyState::Undecided(held) => {
                held.push_str(text);
                if held.is_empty() {
                    return (None, Vec::new());
                }
                if !self.format.starts_call(held) {
                    let held = std::mem::take(held);
                    self.state = ReplyState::Text;
                    return (Some(held), Vec::new());
                }
                let mut reader = CallReader::new(self.format);
                let pieces = reader.push(held);
                self.state = ReplyState::Calls(reader);
                pieces
            }
        };
        (None, self.deltas(pieces))
    }

    fn made_calls(&self) -> bool {
        matches!(self.state, ReplyState::Calls(_))
    }

    /// Call pieces as deltas, a call's start and the arguments after it in one.
    fn deltas(&self, pieces: Vec<CallPiece>) -> Vec<ToolCallDelta> {
        let mut out: Vec<ToolCallDelta> = Vec::new();
        for piece in pieces {
            match piece {
                CallPiece::Start { index, name } => out.push(ToolCallDelta {
                    index,
                    id: Some(call_id(&self.request_id, index)),
                    kind: Some("function"),
                    function: FunctionDelta { name: Some(name), arguments: String::new() },
                }),
                CallPiece::Arguments { index, text } => match out.last_mut() {
                    Some(last) if last.index == index => last.function.arguments.push_str(&text),
                    _ => out.push(ToolCallDelta {
                        index,
                        id: None,
                        kind: None,
                        function: FunctionDelta { name: None, arguments: text },
                    }),
                },
            }
        }
        out
    }
}

fn sse(data: impl Stream<Item = String> + Send + 'static) -> Response {
    let events = data.map(|d| Ok::<_, std::convert::Infallible>(SseEvent::default().data(d)));
    Sse::new(events).keep_alive(KeepAlive::default()).into_response()
}

/// How often a client that closed its side while its non-streaming answer runs is sent a space.
const PROBE_INTERVAL: Duration = Duration::from_millis(500);

/// A non-streaming answer, watching the client meanwhile. While the client's side is open, the answer
/// comes as usual when ready. Once it closes, the server cannot tell a half-close (the client still
/// reads: it must be answered) from a client gone for good (its slot must be freed) without writing;
/// so the answer starts at once, as 200 with a chunked body, and a space (JSON allows leading
/// whitespace) goes out every PROBE_INTERVAL until the JSON follows. A gone client's socket refuses the
/// second write; hyper then drops the body, and with it the request, which frees its slot. A failure
/// after that point is the usual error object, under the 200 already sent.
async fn answer(
    peer: Option<Extension<Peer>>,
    work: impl std::future::Future<Output = Result<Response, ApiError>> + Send + 'static,
) -> Response {
    let mut work = Box::pin(async move { work.await.unwrap_or_else(|e| e.into_response()) });
    let Some(Extension(peer)) = peer else { return work.await };
    tokio::select! {
        response = &mut work => return response,
        () = peer.read_closed() => {}
    }
    let body = stream::unfold(Some(work), |work| async move {
        let mut work = work?;
        tokio::select! {
            response = &mut work => {
                let body = axum::body::to_bytes(response.into_body(), usize::MAX).await;
                Some((body.map_err(axum::Error::new), None))
            }
            () = tokio::time::sleep(PROBE_INTERVAL) => Some((Ok(Bytes::from_static(b" ")), Some(work))),
        }
    });
    ([(header::CONTENT_TYPE, "application/json")], Body::from_stream(body)).into_response()
}

fn to_json(v: &impl serde::Serialize) -> String {
    serde_json::to_string(v).expect("response types serialize")
}

/// A failure after the stream has started: an error object in place of the next chunk.
fn stream_error(message: String) -> String {
    to_json(&ErrorBody { error: ErrorDetail { message, kind: "server_error", param: None, code: None } })
}

/// A token's text (U+FFFD for a piece of a UTF-8 character) and bytes.
fn token_text(app: &App, token: u32) -> (String, Vec<u8>) {
    let bytes = app.m.tokenizer.token_bytes(token);
    (String::from_utf8_lossy(&bytes).into_owned(), bytes)
}

/// The chat API's `logprobs` of some generated tokens.
fn chat_logprobs(app: &App, tokens: &[EngineLogprob]) -> ChatLogprobs {
    let entry = |t: &EngineLogprob| {
        let (token, bytes) = token_text(app, t.token);
        let top_logprobs = (t.top.iter())
            .map(|&(id, logprob)| {
                let (token, bytes) = token_text(app, id);
                TopLogprob { token, logprob, bytes }
            })
            .collect();
        TokenLogprob { token, logprob: t.logprob, bytes, top_logprobs }
    };
    ChatLogprobs { content: tokens.iter().map(entry).collect() }
}

/// The completions API's `logprobs` of some generated tokens, the first starting at character `offset` of the
/// completion (advanced past them).
fn completion_logprobs(app: &App, tokens: &[EngineLogprob], offset: &mut usize) -> CompletionLogprobs {
    let mut out = CompletionLogprobs::default();
    for t in tokens {
        let token = token_text(app, t.token).0;
        out.text_offset.push(*offset);
        *offset += token.chars().count();
        out.tokens.push(token);
        out.token_logprobs.push(t.logprob);
        out.top_logprobs.push(t.top.iter().map(|&(id, logprob)| (token_text(app, id).0, logprob)).collect());
    }
    out
}

fn timings(d: &Done) -> Timings {
    let t = &d.timings;
    Timings::new(d.cached_tokens, t.prompt_n, t.prompt_ms, t.predicted_n, t.predicted_ms)
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

fn unix_time() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

async fn models(State(app): State<Arc<App>>) -> Json<serde_json::Value> {
    let card = ModelCard { id: &app.model_id, object: "model", created: app.started, owned_by: "bitnet" };
    Json(serde_json::json!(ModelList { object: "list", data: [card] }))
}

/// llama-server's /props: the server's settings and the model's.
async fn props(State(app): State<Arc<App>>) -> Json<serde_json::Value> {
    let tok = &app.m.tokenizer;
    let token = |id: Option<u32>| id.map_or(String::new(), |id| String::from_utf8_lossy(&tok.token_bytes(id)).into());
    let d = bitnet_engine::generate::sampler::SamplerParams::default();
    Json(serde_json::json!({
        "default_generation_settings": {
            "n_ctx": app.ctx,
            "params": {
                "n_predict": -1,
                "temperature": d.temperature,
                "top_k": d.top_k,
                "top_p": d.top_p,
                "min_p": d.min_p,
                "repeat_penalty": d.repeat_penalty,
                "repeat_last_n": d.repeat_last_n,
                "frequency_penalty": d.frequency_penalty,
                "presence_penalty": d.presence_penalty,
                "seed": -1,
            },
        },
        "total_slots": app.scheduler.slots.len(),
        "model_path": app.model_path,
        "model_alias": app.model_id,
        "chat_template": tok.chat_template().unwrap_or(""),
        // llama-server's: whether the template takes tools and writes tool calls (in a form this server knows).
        "chat_template_caps": { "supports_tools": tok.tool_format().is_some(), "supports_tool_calls": tok.tool_format().is_some() },
        "bos_token": token(tok.bos()),
        "eos_token": token(tok.eos()),
        "build_info": format!("bitnet {}", env!("CARGO_PKG_VERSION")),
        "modalities": { "vision": false, "audio": false },
    }))
}

/// llama-server's /slots: what each slot is doing (counts only: no prompt text).
async fn slots(State(app): State<Arc<App>>) -> Json<serde_json::Value> {
    let slot = |(id, s): (usize, &scheduler::SlotStatus)| {
        let n_decoded = s.n_decoded.load(Relaxed);
        serde_json::json!({
            "id": id,
            "id_task": s.task.load(Relaxed),
            "n_ctx": app.ctx,
            "is_processing": s.busy.load(Relaxed),
            "n_prompt_tokens": s.n_prompt.load(Relaxed),
            "n_cached_tokens": s.n_cached.load(Relaxed),
            "next_token": { "n_decoded": n_decoded },
        })
    };
    Json(serde_json::Value::Array(app.scheduler.slots.iter().enumerate().map(slot).collect()))
}

async fn metrics(State(app): State<Arc<App>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], app.scheduler.metrics.render())
}

async fn tokenize(
    State(app): State<Arc<App>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let req: TokenizeRequest = typed(&json_body(body)?)?;
    let m = app.m;
    let tokens = blocking(move || m.tokenizer.encode(&req.content, req.add_special && m.tokenizer.add_bos()))
        .await?
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
