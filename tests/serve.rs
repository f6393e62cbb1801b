//! `bitnet serve` over loopback with a real HTTP client: the OpenAI endpoints, streaming, stop strings,
//! seeds, cancellation, concurrency (each answer equal to the same request answered alone), overload,
//! malformed requests, the API key, and the official `openai` Python client.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bitnet_tests::{bitnet, bitnet_bin, bitnet_json, bitnet_ok, edited_model, fixture, repo};
use reqwest::blocking::{Client, Response};
use serde_json::{json, Value};

const TINY: &str = "models/tiny-a-i2_s.gguf";

/// A running `bitnet serve`, killed when dropped.
struct Server {
    child: Child,
    url: String,
    client: Client,
}

impl Server {
    /// Starts `bitnet serve --port 0 ARGS` and waits for the address it prints.
    fn start(args: &[&str]) -> Server {
        Server::start_with(args, Stdio::inherit())
    }

    /// The same, its stderr (the request log) going to `stderr`.
    fn start_with(args: &[&str], stderr: Stdio) -> Server {
        let mut child = Command::new(bitnet_bin())
            .args(["serve", "--port", "0"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("start bitnet serve");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).expect("read the address");
        let url = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_string();
        let client = Client::builder().timeout(Duration::from_secs(120)).build().unwrap();
        Server { child, url, client }
    }

    fn tiny(args: &[&str]) -> Server {
        let model = fixture(TINY);
        let mut all = vec!["-m", model.to_str().unwrap(), "-t", "1"];
        all.extend_from_slice(args);
        Server::start(&all)
    }

    fn post(&self, path: &str, body: &Value) -> Response {
        self.client.post(format!("{}{path}", self.url)).json(body).send().expect("POST")
    }

    fn get(&self, path: &str) -> Response {
        self.client.get(format!("{}{path}", self.url)).send().expect("GET")
    }

    /// POST that must succeed; returns the JSON body.
    fn ok(&self, path: &str, body: &Value) -> Value {
        let r = self.post(path, body);
        let status = r.status();
        let text = r.text().unwrap();
        assert_eq!(status, 200, "{path} {body}: {text}");
        serde_json::from_str(&text).unwrap()
    }

    /// The text of a non-streaming completion.
    fn complete(&self, body: &Value) -> String {
        self.ok("/v1/completions", body)["choices"][0]["text"].as_str().unwrap().to_string()
    }

    fn metric(&self, name: &str) -> f64 {
        let text = self.get("/metrics").text().unwrap();
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("bitnet_{name} ")))
            .unwrap_or_else(|| panic!("no {name} in {text}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    }

    /// Waits until `name` reaches `want` (the engine thread updates metrics asynchronously).
    fn wait_metric(&self, name: &str, want: f64) {
        let t0 = Instant::now();
        while self.metric(name) != want {
            assert!(t0.elapsed() < Duration::from_secs(30), "{name} stayed at {}, expected {want}", self.metric(name));
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The JSON payloads of a server-sent event stream, up to `[DONE]` (which must come).
fn sse_events(r: Response) -> Vec<Value> {
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    let mut out = Vec::new();
    for line in BufReader::new(r).lines() {
        let line = line.unwrap();
        let Some(data) = line.strip_prefix("data: ") else { continue };
        if data == "[DONE]" {
            return out;
        }
        out.push(serde_json::from_str(data).unwrap());
    }
    panic!("the stream ended without [DONE]: {out:?}");
}

fn greedy(prompt: &str, max_tokens: usize) -> Value {
    json!({ "prompt": prompt, "max_tokens": max_tokens, "temperature": 0 })
}

/// Checks an OpenAI error body and returns its message.
fn error_of(r: Response, status: u16) -> String {
    assert_eq!(r.status(), status);
    let body: Value = r.json().expect("error bodies are JSON");
    let e = &body["error"];
    assert!(e["type"].is_string() && e.get("param").is_some() && e.get("code").is_some(), "{body}");
    e["message"].as_str().expect("error.message").to_string()
}

#[test]
fn endpoints_health_models_tokenize_metrics() {
    let s = Server::tiny(&[]);
    assert_eq!(s.get("/health").json::<Value>().unwrap(), json!({ "status": "ok" }));
    let models: Value = s.get("/v1/models").json().unwrap();
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], "tiny-a-i2_s");
    let toks = s.ok("/tokenize", &json!({ "content": "Hello world", "add_special": true }));
    let ids: Vec<u64> = toks["tokens"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
    assert_eq!(ids[0], 512, "BOS first with add_special");
    let text = s.ok("/detokenize", &json!({ "tokens": &ids[1..] }));
    assert_eq!(text["content"], "Hello world");
    let body = s.get("/metrics").text().unwrap();
    for name in ["requests_total", "generated_tokens_total", "decode_tokens_per_second", "queue_depth", "slots_busy"] {
        assert!(body.contains(&format!("# TYPE bitnet_{name} ")), "{name} missing from {body}");
    }
    s.complete(&greedy("Once", 5));
    assert_eq!(s.metric("generated_tokens_total"), 5.0);
    assert_eq!(s.metric("requests_total"), 1.0);
    // Latency histograms: one first token, four intervals between tokens, every one in some bucket.
    assert_eq!(s.metric("time_to_first_token_seconds_count"), 1.0);
    assert_eq!(s.metric("time_per_output_token_seconds_count"), 4.0);
    let body = s.get("/metrics").text().unwrap();
    assert!(body.contains("# TYPE bitnet_time_to_first_token_seconds histogram"), "{body}");
    assert!(body.contains("bitnet_time_per_output_token_seconds_bucket{le=\"+Inf\"} 4\n"), "{body}");
    assert!(body.contains("bitnet_time_to_first_token_seconds_bucket{le=\"120\"} 1\n"), "{body}");
    assert!(s.metric("time_to_first_token_seconds_sum") > 0.0);
}

#[test]
fn completion_equals_bitnet_run() {
    let s = Server::tiny(&[]);
    let model = fixture(TINY);
    // Over 64 tokens: the server evaluates the prompt in two pieces.
    let prompt = "The quick brown fox jumps over the lazy dog. ".repeat(8);
    let body = s.ok("/v1/completions", &greedy(&prompt, 24));
    assert_eq!(body["object"], "text_completion");
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    let usage = &body["usage"];
    assert!(usage["prompt_tokens"].as_u64().unwrap() > 64, "{usage}");
    assert_eq!(usage["completion_tokens"], 24);
    assert_eq!(usage["total_tokens"].as_u64(), Some(usage["prompt_tokens"].as_u64().unwrap() + 24));
    let run = bitnet_ok(&["run", "-m", model.to_str().unwrap(), "-p", &prompt, "-n", "24", "--temp", "0"]);
    assert_eq!(body["choices"][0]["text"].as_str().unwrap(), run.strip_suffix('\n').unwrap());
}

/// The default model, several requests batched together (one with a long prompt evaluated in pieces
/// between their decode steps): each answer equals `bitnet run`'s for the same prompt.
#[test]
fn batched_answers_equal_bitnet_run_on_the_default_model() {
    let s = Server::start(&["--slots", "4", "--ctx", "512"]);
    let prompts = [
        "The capital of France is".to_string(),
        "Here is a short poem about the sea:".to_string(),
        format!("{} In summary,", "Rivers carry water from the mountains to the sea. ".repeat(8)),
        "def fibonacci(n):".to_string(),
    ];
    let answers: Vec<String> = std::thread::scope(|sc| {
        let handles: Vec<_> = prompts.iter().map(|p| sc.spawn(|| s.complete(&greedy(p, 16)))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (p, answer) in prompts.iter().zip(&answers) {
        let run = bitnet_ok(&["run", "-p", p, "-n", "16", "--temp", "0"]);
        assert_eq!(answer, run.strip_suffix('\n').unwrap(), "prompt {p:?}");
    }
    assert!(s.metric("decode_rows_total") > s.metric("steps_total"), "the requests never shared a step");
}

#[test]
fn chat_streaming_matches_non_streaming() {
    let s = Server::tiny(&[]);
    let req = json!({
        "model": "anything",
        "messages": [{ "role": "system", "content": "Be brief." }, { "role": "user", "content": [{ "type": "text", "text": "Hi there" }] }],
        "max_tokens": 20, "temperature": 0,
    });
    let whole = s.ok("/v1/chat/completions", &req);
    assert_eq!(whole["object"], "chat.completion");
    assert_eq!(whole["choices"][0]["message"]["role"], "assistant");
    let text = whole["choices"][0]["message"]["content"].as_str().unwrap();

    let mut streamed = req.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({ "include_usage": true });
    let events = sse_events(s.post("/v1/chat/completions", &streamed));
    assert_eq!(events[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(events.iter().all(|e| e["object"] == "chat.completion.chunk" && e["id"] == events[0]["id"]));
    let pieces: String = events.iter().filter_map(|e| e["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(pieces, text);
    let n = events.len();
    assert_eq!(events[n - 2]["choices"][0]["finish_reason"], whole["choices"][0]["finish_reason"]);
    assert_eq!(events[n - 1]["choices"], json!([]));
    assert_eq!(events[n - 1]["usage"]["completion_tokens"], whole["usage"]["completion_tokens"]);
    // The second identical request found its whole prompt but the last token in the slot's cache.
    let prompt_tokens = whole["usage"]["prompt_tokens"].as_u64().unwrap();
    assert_eq!(events[n - 1]["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64(), Some(prompt_tokens - 1));
}

#[test]
fn completion_streaming_and_stop_strings() {
    let s = Server::tiny(&[]);
    let full = s.complete(&greedy("Stop here", 40));
    let events = sse_events(s.post(
        "/v1/completions",
        &json!({ "prompt": "Stop here", "max_tokens": 40, "temperature": 0, "stream": true }),
    ));
    let pieces: String = events.iter().filter_map(|e| e["choices"][0]["text"].as_str()).collect();
    assert_eq!(pieces, full);
    // A stop string taken from the middle of the greedy answer: the answer ends right before it.
    let chars: Vec<char> = full.chars().collect();
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 3].iter().collect();
    let cut = &full[..full.find(&stop).unwrap()];
    for stream in [false, true] {
        let req = json!({ "prompt": "Stop here", "max_tokens": 40, "temperature": 0, "stop": [stop.clone(), "never appears"], "stream": stream });
        let (text, reason) = if stream {
            let ev = sse_events(s.post("/v1/completions", &req));
            let text: String = ev.iter().filter_map(|e| e["choices"][0]["text"].as_str()).collect();
            (text, ev.last().unwrap()["choices"][0]["finish_reason"].clone())
        } else {
            let body = s.ok("/v1/completions", &req);
            (body["choices"][0]["text"].as_str().unwrap().to_string(), body["choices"][0]["finish_reason"].clone())
        };
        assert_eq!(text, cut, "stream {stream}");
        assert_eq!(reason, "stop");
    }
    let single = json!({ "prompt": "Stop here", "max_tokens": 40, "temperature": 0, "stop": stop });
    assert_eq!(s.complete(&single), cut);
}

#[test]
fn seeds_reproduce_samples() {
    let s = Server::tiny(&[]);
    let req = |seed: i64| json!({ "prompt": "Random", "max_tokens": 30, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "seed": seed });
    let a = s.complete(&req(7));
    assert_eq!(a, s.complete(&req(7)));
    let others: Vec<String> = (8..12).map(|seed| s.complete(&req(seed))).collect();
    assert!(others.iter().any(|o| *o != a), "five seeds gave the same 30 random tokens");
    // Penalties change the greedy answer of a model that repeats itself, and are deterministic too.
    let pen = json!({ "prompt": "Random", "max_tokens": 30, "temperature": 0, "frequency_penalty": 1.5, "presence_penalty": 0.5, "repeat_penalty": 1.3 });
    assert_eq!(s.complete(&pen), s.complete(&pen));
}

#[test]
fn concurrent_requests_equal_their_single_answers() {
    let s = Server::tiny(&["--slots", "8", "--queue", "32"]);
    let reqs: Vec<Value> = (0..32)
        .map(|i| {
            let mut r = greedy(&format!("Request number {i}: {}", "la ".repeat(i % 7)), 8 + (i * 5) % 29);
            if i % 4 == 1 {
                r = json!({ "messages": [{ "role": "user", "content": format!("Question {i}") }], "max_tokens": 16, "temperature": 0 });
            }
            r
        })
        .collect();
    let path = |r: &Value| if r.get("messages").is_some() { "/v1/chat/completions" } else { "/v1/completions" };
    let text = |v: &Value| {
        v["choices"][0]["text"].as_str().or(v["choices"][0]["message"]["content"].as_str()).unwrap().to_string()
    };
    let alone: Vec<String> = reqs.iter().map(|r| text(&s.ok(path(r), r))).collect();
    let together: Vec<String> = std::thread::scope(|sc| {
        let handles: Vec<_> = reqs.iter().map(|r| sc.spawn(|| text(&s.ok(path(r), r)))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, (a, t)) in alone.iter().zip(&together).enumerate() {
        assert_eq!(a, t, "request {i} answered differently under load");
    }
    // Several sequences really were decoded in the same steps.
    assert!(s.metric("decode_rows_total") > s.metric("steps_total") * 1.5);
}

/// A streaming request on the default model that would run for minutes unless cancelled; returns
/// once its first text has arrived, with the open response.
fn start_long_stream(s: &Server) -> BufReader<Response> {
    let req =
        json!({ "prompt": "Tell me a long story.", "max_tokens": 1500, "temperature": 0.8, "seed": 1, "stream": true });
    let mut r = BufReader::new(s.post("/v1/completions", &req));
    let mut line = String::new();
    while !line.starts_with("data: ") {
        line.clear();
        r.read_line(&mut line).unwrap();
    }
    r
}

#[test]
fn disconnect_cancels_and_frees_the_slot() {
    let s = Server::start(&["--slots", "1", "--ctx", "2048"]);
    let stream = start_long_stream(&s);
    assert_eq!(s.metric("slots_busy"), 1.0);
    drop(stream);
    s.wait_metric("requests_cancelled_total", 1.0);
    s.wait_metric("slots_busy", 0.0);
    // The slot takes new work at once.
    let t0 = Instant::now();
    s.complete(&greedy("Hello", 4));
    assert!(t0.elapsed() < Duration::from_secs(20));
    // A non-streaming request whose client goes away is cancelled too.
    let url = s.url.clone();
    let quick = Client::builder().timeout(Duration::from_millis(1500)).build().unwrap();
    // The long stream's prompt and seed: it runs for minutes (another prompt ended in 137 tokens, 2.4 s, with the
    // f16 KV cache, and under load in less than the client's timeout).
    let req = json!({ "prompt": "Tell me a long story.", "max_tokens": 1500, "temperature": 0.8, "seed": 1 });
    assert!(quick.post(format!("{url}/v1/completions")).json(&req).send().is_err(), "expected the client timeout");
    s.wait_metric("requests_cancelled_total", 2.0);
    s.wait_metric("slots_busy", 0.0);
}

#[test]
fn overload_answers_429() {
    let s = Server::start(&["--slots", "1", "--queue", "1", "--ctx", "2048"]);
    let running = start_long_stream(&s);
    // The second waits in the queue (its client reads nothing yet).
    let queued = std::thread::scope(|sc| {
        let waiting =
            sc.spawn(|| s.post("/v1/completions", &json!({ "prompt": "Queued", "max_tokens": 1500, "stream": true })));
        s.wait_metric("queue_depth", 1.0);
        let msg = error_of(s.post("/v1/completions", &greedy("Refused", 4)), 429);
        assert!(msg.contains("busy"), "{msg}");
        let msg =
            error_of(s.post("/v1/chat/completions", &json!({ "messages": [{ "role": "user", "content": "x" }] })), 429);
        assert!(msg.contains("busy"), "{msg}");
        drop(running);
        waiting.join().unwrap()
    });
    // The queued one was admitted when the slot freed, and streams.
    let mut first = String::new();
    let mut r = BufReader::new(queued);
    while !first.starts_with("data: ") {
        first.clear();
        r.read_line(&mut first).unwrap();
    }
    drop(r);
    s.wait_metric("slots_busy", 0.0);
    assert_eq!(s.metric("requests_rejected_total"), 2.0);
}

#[test]
fn malformed_requests_get_400_with_an_error_body() {
    let s = Server::tiny(&["--max-body", "4096"]);
    let raw = |path: &str, body: &str| {
        s.client
            .post(format!("{}{path}", s.url))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .unwrap()
    };
    for body in ["", "{", "not json", "[1, 2]", "{\"prompt\": \"a\"} trailing", "\u{0}"] {
        error_of(raw("/v1/completions", body), 400);
        error_of(raw("/v1/chat/completions", body), 400);
    }
    let cases = [
        ("/v1/completions", json!({ "prompt": "a", "temperature": "hot" }), "temperature"),
        ("/v1/completions", json!({ "prompt": "a", "max_tokens": -1 }), "max_tokens"),
        ("/v1/completions", json!({ "prompt": "a", "max_tokens": 1.5 }), "max_tokens"),
        ("/v1/completions", json!({ "prompt": "a", "stop": 3 }), "stop"),
        ("/v1/completions", json!({ "prompt": "a", "seed": "x" }), "seed"),
        ("/v1/completions", json!({ "prompt": "a", "stream": "yes" }), "stream"),
        ("/v1/completions", json!({ "prompt": 42 }), "prompt"),
        ("/v1/completions", json!({ "prompt": [] }), "prompt"),
        ("/v1/completions", json!({ "prompt": ["a", "b"] }), "prompt"),
        ("/v1/completions", json!({ "prompt": [1, 99999] }), "prompt"),
        ("/v1/completions", json!({ "max_tokens": 3 }), "prompt"),
        ("/v1/completions", json!({ "prompt": "a", "n": 2 }), "n"),
        ("/v1/completions", json!({ "prompt": "a", "temperature": -1 }), "temperature"),
        ("/v1/completions", json!({ "prompt": "a", "top_p": 2 }), "top_p"),
        ("/v1/chat/completions", json!({ "messages": [] }), "messages"),
        ("/v1/chat/completions", json!({ "messages": "hi" }), "messages"),
        ("/v1/chat/completions", json!({ "messages": [{ "content": "no role" }] }), "messages"),
        (
            "/v1/chat/completions",
            json!({ "messages": [{ "role": "user", "content": [{ "type": "image_url" }] }] }),
            "messages",
        ),
        ("/tokenize", json!({ "content": 5 }), "content"),
        ("/detokenize", json!({ "tokens": [1, 100000] }), "tokens"),
        ("/detokenize", json!({ "tokens": [-1] }), "tokens"),
    ];
    for (path, body, param) in &cases {
        let msg = error_of(s.post(path, body), 400);
        assert!(!msg.is_empty());
        let r: Value = s.post(path, body).json().unwrap();
        let got = r["error"]["param"].as_str().unwrap_or("");
        assert!(got.starts_with(param) || msg.contains(param), "{path} {body}: param {got:?}, message {msg}");
    }
    // Context overflow: the tiny model's context is 256 tokens.
    let long = "word ".repeat(400);
    let r = s.post("/v1/completions", &json!({ "prompt": long }));
    let msg = error_of(r, 400);
    assert!(msg.contains("maximum context length is 256"), "{msg}");
    let r: Value = s.post("/v1/completions", &json!({ "prompt": "a", "max_tokens": 1000 })).json().unwrap();
    assert_eq!(r["error"]["code"], "context_length_exceeded");
    // Too large a body, an unknown endpoint.
    let big = json!({ "prompt": "x".repeat(5000) });
    error_of(s.post("/v1/completions", &big), 413);
    error_of(s.get("/v1/nothing"), 404);
    // `user` is metadata, accepted; a null field counts as absent; the server still answers normally after all
    // of that.
    let ok = s.ok("/v1/completions", &json!({ "prompt": "a", "max_tokens": 2, "user": "me", "suffix": null }));
    assert_eq!(ok["usage"]["completion_tokens"], 2);
}

/// A field the server does not honour is a 400 naming it, never dropped (a client asking for JSON output or
/// tools must not get free text with a 200).
#[test]
fn unhonoured_fields_are_refused_by_name() {
    let s = Server::tiny(&[]);
    let chat = |extra: Value| {
        let mut body = json!({ "messages": [{ "role": "user", "content": "Hi" }], "max_tokens": 2 });
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        body
    };
    let cases = [
        ("/v1/completions", json!({ "prompt": "a", "echo": false }), "echo"),
        ("/v1/completions", json!({ "prompt": "a", "suffix": "b" }), "suffix"),
        ("/v1/completions", json!({ "prompt": "a", "best_of": 1 }), "best_of"),
        ("/v1/completions", json!({ "prompt": "a", "top_logprobs": 2 }), "top_logprobs"),
        ("/v1/chat/completions", chat(json!({ "grammar": "start: ) (" })), "grammar"),
        (
            "/v1/chat/completions",
            chat(json!({ "response_format": { "type": "json_object", "x": 1 } })),
            "response_format",
        ),
        ("/v1/chat/completions", chat(json!({ "tools": [], "tool_choice": "auto" })), "tool"),
        // The tiny model's template has no tool support: tools, and tool turns, are refused.
        (
            "/v1/chat/completions",
            chat(json!({ "tools": [{ "type": "function", "function": { "name": "f" } }] })),
            "tools",
        ),
        (
            "/v1/chat/completions",
            json!({ "messages": [{ "role": "tool", "content": "21", "tool_call_id": "call_1" }] }),
            "messages",
        ),
        ("/v1/chat/completions", chat(json!({ "prompt": "a" })), "prompt"),
        ("/v1/chat/completions", chat(json!({ "stream": true, "stream_options": { "chunk": 1 } })), "stream_options"),
        (
            "/v1/chat/completions",
            json!({ "messages": [{ "role": "user", "content": "Hi", "name": "bob" }] }),
            "messages",
        ),
        ("/tokenize", json!({ "content": "a", "with_pieces": true }), "with_pieces"),
        ("/detokenize", json!({ "tokens": [1], "extra": 1 }), "extra"),
    ];
    for (path, body, field) in &cases {
        let r = s.post(path, body);
        let status = r.status();
        let r: Value = r.json().unwrap();
        assert_eq!(status, 400, "{path} {body}: {r}");
        let (msg, param) = (r["error"]["message"].as_str().unwrap(), r["error"]["param"].as_str().unwrap_or(""));
        assert!(msg.contains(field) || param.starts_with(field), "{path} {body}: {r}");
    }
    // The same requests without the field are answered.
    assert_eq!(s.post("/v1/chat/completions", &chat(json!({}))).status(), 200);
}

/// Completions' `logprobs: N` against `bitnet logits` of the same prompt: the picked token's log-probability
/// is the log-softmax of its logit, the N alternatives are the N largest logits in order, and their
/// probabilities add up to what the softmax gives them.
#[test]
fn logprobs_agree_with_bitnet_logits() {
    let s = Server::tiny(&[]);
    let model = fixture(TINY);
    let reference = bitnet_json(&["logits", "-m", model.to_str().unwrap(), "-p", "Once upon a", "--all", "--json"]);
    let logits: Vec<f64> = reference["logits"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let log_sum = max + logits.iter().map(|l| (l - max).exp()).sum::<f64>().ln();
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));

    let body = s.ok(
        "/v1/completions",
        &json!({ "prompt": reference["tokens"], "max_tokens": 1, "temperature": 0, "logprobs": 5 }),
    );
    let lp = &body["choices"][0]["logprobs"];
    let picked = lp["tokens"][0].as_str().unwrap();
    let best = order[0] as u32;
    let detok = |ids: &[u32]| s.ok("/detokenize", &json!({ "tokens": ids }))["content"].as_str().unwrap().to_string();
    assert_eq!(picked, detok(&[best]));
    let got = lp["token_logprobs"][0].as_f64().unwrap();
    assert!((got - (logits[order[0]] - log_sum)).abs() < 1e-3, "{got} vs {}", logits[order[0]] - log_sum);
    let top = lp["top_logprobs"][0].as_object().unwrap();
    assert_eq!(top.len(), 5, "{top:?}");
    for &id in &order[..5] {
        let want = logits[id] - log_sum;
        let got = top[&detok(&[id as u32])].as_f64().unwrap();
        assert!((got - want).abs() < 1e-3, "token {id}: {got} vs {want}");
    }
    assert_eq!(lp["text_offset"], json!([0]));

    // Chat: top_logprobs in order, the same through the stream, and one entry per generated token.
    let req = json!({
        "messages": [{ "role": "user", "content": "Tell me" }], "max_tokens": 12, "temperature": 0,
        "logprobs": true, "top_logprobs": 20,
    });
    let whole = s.ok("/v1/chat/completions", &req);
    let content = whole["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len() as u64, whole["usage"]["completion_tokens"].as_u64().unwrap());
    let mut bytes = Vec::new();
    for entry in content {
        let top = entry["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 20);
        let values: Vec<f64> = top.iter().map(|t| t["logprob"].as_f64().unwrap()).collect();
        assert!(values.windows(2).all(|w| w[0] >= w[1]), "not in order: {values:?}");
        let mass: f64 = values.iter().map(|v| v.exp()).sum();
        assert!(mass <= 1.0 + 1e-4 && mass > 0.0, "{mass}");
        // Greedy: the picked token is the most likely one.
        assert_eq!(entry["token"], top[0]["token"]);
        assert_eq!(entry["logprob"], top[0]["logprob"]);
        bytes.extend(entry["bytes"].as_array().unwrap().iter().map(|b| b.as_u64().unwrap() as u8));
    }
    // A token may hold part of a character: the bytes, joined, are the text.
    assert_eq!(String::from_utf8_lossy(&bytes), whole["choices"][0]["message"]["content"].as_str().unwrap());
    let mut streamed = req.clone();
    streamed["stream"] = json!(true);
    let chunks = sse_events(s.post("/v1/chat/completions", &streamed));
    let from_stream: Vec<Value> =
        chunks.iter().filter_map(|c| c["choices"][0]["logprobs"]["content"].as_array()).flatten().cloned().collect();
    assert_eq!(from_stream, *content);
    // Out of range, or alternatives without logprobs.
    let mut bad = req.clone();
    bad["top_logprobs"] = json!(21);
    error_of(s.post("/v1/chat/completions", &bad), 400);
    bad["top_logprobs"] = json!(2);
    bad["logprobs"] = json!(false);
    error_of(s.post("/v1/chat/completions", &bad), 400);
}

#[test]
fn logit_bias_and_ignore_eos() {
    let s = Server::tiny(&[]);
    let first = |extra: Value| {
        let mut body = greedy("Once upon a", 1);
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        let r = s.ok("/v1/completions", &body);
        r["choices"][0]["logprobs"]["tokens"][0].as_str().map(String::from).unwrap_or_default()
    };
    let plain = first(json!({ "logprobs": 2 }));
    let model = fixture(TINY);
    let reference =
        bitnet_json(&["logits", "-m", model.to_str().unwrap(), "-p", "Once upon a", "--top", "2", "--json"]);
    let (best, second) = (reference["top"][0][0].as_u64().unwrap(), reference["top"][1][0].as_u64().unwrap());
    // Banning the best token picks the second; a large bias forces any token, at every step.
    let banned = first(json!({ "logprobs": 0, "logit_bias": { best.to_string(): -100 } }));
    let detok = |id: u64| s.ok("/detokenize", &json!({ "tokens": [id] }))["content"].as_str().unwrap().to_string();
    assert_eq!(plain, detok(best));
    assert_eq!(banned, detok(second));
    let forced = s.ok(
        "/v1/completions",
        &json!({ "prompt": "Once", "max_tokens": 4, "temperature": 0.9, "seed": 1, "logit_bias": { "300": 100 } }),
    );
    assert_eq!(forced["choices"][0]["text"].as_str().unwrap(), detok(300).repeat(4));
    // Forcing the end token stops at once; ignore_eos bans it, and the generation runs to its length.
    let eos = json!({ "513": 100 });
    let stopped =
        s.ok("/v1/completions", &json!({ "prompt": "Once", "max_tokens": 8, "temperature": 0, "logit_bias": eos }));
    assert_eq!(
        (stopped["usage"]["completion_tokens"].as_u64(), stopped["choices"][0]["finish_reason"].as_str()),
        (Some(0), Some("stop"))
    );
    let ignored = s.ok(
        "/v1/completions",
        &json!({ "prompt": "Once", "max_tokens": 8, "temperature": 0, "logit_bias": eos, "ignore_eos": true }),
    );
    assert_eq!(
        (ignored["usage"]["completion_tokens"].as_u64(), ignored["choices"][0]["finish_reason"].as_str()),
        (Some(8), Some("length"))
    );
    for bad in [json!({ "99999": 1 }), json!({ "x": 1 }), json!({ "1": 101 }), json!({ "1": "a" })] {
        let r = s.post("/v1/completions", &json!({ "prompt": "Once", "logit_bias": bad }));
        let body: Value = r.json().unwrap();
        assert!(body["error"]["param"].as_str().unwrap_or("").starts_with("logit_bias"), "{bad}: {body}");
    }
}

/// `timings` as llama-server reports them, in whole answers and in the stream's last chunk.
#[test]
fn responses_carry_timings() {
    let s = Server::tiny(&[]);
    let body = s.ok("/v1/completions", &greedy("Once upon a time there was", 10));
    let (t, u) = (&body["timings"], &body["usage"]);
    assert_eq!(t["predicted_n"], u["completion_tokens"]);
    assert_eq!(
        t["prompt_n"].as_u64().unwrap() + t["cache_n"].as_u64().unwrap(),
        u["prompt_tokens"].as_u64().unwrap(),
        "{t}"
    );
    for key in ["prompt_ms", "predicted_ms", "prompt_per_second", "predicted_per_second", "predicted_per_token_ms"] {
        assert!(t[key].as_f64().unwrap() > 0.0, "{key}: {t}");
    }
    let per_token = t["predicted_ms"].as_f64().unwrap() / 10.0;
    assert!((t["predicted_per_token_ms"].as_f64().unwrap() - per_token).abs() < 1e-9);
    // The same prompt again: its prefix comes from the cache.
    let again = s.ok("/v1/completions", &greedy("Once upon a time there was", 10));
    assert!(again["timings"]["cache_n"].as_u64().unwrap() > 0, "{}", again["timings"]);
    let chat = json!({ "messages": [{ "role": "user", "content": "Hi" }], "max_tokens": 5, "stream": true });
    let chunks = sse_events(s.post("/v1/chat/completions", &chat));
    let last = chunks.iter().find(|c| c["choices"][0]["finish_reason"].is_string()).unwrap();
    assert!(last["timings"]["predicted_n"].as_u64().unwrap() <= 5, "{last}");
    assert!(s
        .ok("/v1/chat/completions", &json!({ "messages": [{ "role": "user", "content": "Hi" }], "max_tokens": 3 }))
        ["timings"]
        .is_object());
}

#[test]
fn api_key_is_required_except_for_health() {
    let s = Server::tiny(&["--api-key", "sekret"]);
    assert_eq!(s.get("/health").status(), 200);
    let msg = error_of(s.get("/v1/models"), 401);
    assert!(msg.contains("API key"), "{msg}");
    let with = |key: &str| s.client.get(format!("{}/v1/models", s.url)).bearer_auth(key).send().unwrap().status();
    assert_eq!(with("wrong"), 401);
    assert_eq!(with("sekre"), 401);
    assert_eq!(with("sekret"), 200);
    error_of(s.post("/v1/completions", &greedy("a", 2)), 401);
    error_of(s.get("/metrics"), 401);
    let r =
        s.client.post(format!("{}/v1/completions", s.url)).bearer_auth("sekret").json(&greedy("a", 2)).send().unwrap();
    assert_eq!(r.status(), 200);
}

#[test]
fn binds_loopback_by_default() {
    let s = Server::tiny(&[]);
    assert!(s.url.starts_with("http://127.0.0.1:"), "{}", s.url);
}

/// The official `openai` Python package, unmodified, against the server (CI installs it:
/// `python3 -m pip install openai`).
#[test]
fn official_openai_python_client() {
    let s = Server::tiny(&["--api-key", "test-key"]);
    let script = repo().join("tests/scripts/serve_openai_client.py");
    let out = Command::new("python3").arg(&script).arg(&s.url).output().expect("python3 is needed for this test");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success(),
        "{} failed (install the client with `python3 -m pip install openai jsonschema`):\n{stdout}\n{stderr}",
        script.display()
    );
    assert!(stdout.contains("openai client OK"), "{stdout}");
}

/// /v1/embeddings on a BitNet embedding model with the official `openai` Python client
/// (tests/scripts/serve_openai_embeddings.py): texts, token ids and batches of each give exactly what `bitnet embed
/// --json` gives on the same texts, as floats and as base64; `dimensions`, inputs longer than the context, empty
/// inputs and unknown encodings are 400s naming the field; the generation endpoints refuse an embedding model.
/// A model that is not an embedding model refuses /v1/embeddings.
#[test]
fn embeddings_with_the_openai_client() {
    let model = fixture("models/qwen3-embed-i2_s.gguf");
    let model = model.to_str().unwrap();
    let ctx = "64";
    let texts = ["Hello world", "The quick brown fox jumps over the lazy dog.", "naïve café 中文"];
    let expected: Vec<Value> = (texts.iter())
        .map(|text| {
            let out = bitnet_json(&["embed", "-m", model, "-t", "1", "--ctx", ctx, "-p", text, "--json"]);
            json!({ "text": text, "tokens": out["tokens"], "embedding": out["embedding"] })
        })
        .collect();
    let path = std::env::temp_dir().join(format!("bitnet-embeddings-{}.json", std::process::id()));
    std::fs::write(&path, serde_json::to_string(&expected).unwrap()).unwrap();
    let s = Server::start(&["-m", model, "-t", "1", "--ctx", ctx]);
    let script = repo().join("tests/scripts/serve_openai_embeddings.py");
    let out = Command::new("python3").arg(&script).arg(&s.url).arg(&path).arg(ctx).output();
    let _ = std::fs::remove_file(&path);
    let out = out.expect("python3 is needed for this test");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{} failed (python3 -m pip install openai):\n{stdout}\n{stderr}", script.display());
    assert!(stdout.contains("openai embeddings OK"), "{stdout}");

    let tiny = Server::tiny(&[]);
    let r = tiny.post("/v1/embeddings", &json!({ "model": "x", "input": "Hello" }));
    assert_eq!(r.status(), 400);
    let body: Value = r.json().unwrap();
    assert!(body["error"]["message"].as_str().unwrap().contains("is not an embedding model"), "{body}");
}

/// The server on any device (`--backend`, here wgpu: llvmpipe in CI, a GPU on the GPU machine): requests
/// that share the server in batched steps each get exactly `bitnet run`'s greedy text on that device.
/// `BITNET_SERVE_BACKEND` picks another device (e.g. cuda on the GPU machine).
#[test]
fn serves_on_a_gpu_backend_like_bitnet_run() {
    let backend = std::env::var("BITNET_SERVE_BACKEND").unwrap_or_else(|_| "wgpu".into());
    let devices = bitnet_ok(&["info", "--devices"]);
    if backend == "wgpu" && devices.contains("no wgpu adapters") {
        assert!(std::env::var_os("CI").is_none(), "CI must have a wgpu adapter: install mesa-vulkan-drivers");
        eprintln!("no wgpu adapter: skipped (install mesa-vulkan-drivers libvulkan1 for llvmpipe)");
        return;
    }
    let model = fixture(TINY);
    let model = model.to_str().unwrap();
    let s = Server::start(&["-m", model, "--backend", &backend, "--slots", "3"]);
    let prompts = ["Hello world, the", "Once upon a time", "The capital of"];
    let answers: Vec<String> = std::thread::scope(|sc| {
        let handles: Vec<_> = prompts.iter().map(|p| sc.spawn(|| s.complete(&greedy(p, 12)))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (p, answer) in prompts.iter().zip(&answers) {
        let run = bitnet_ok(&["run", "-m", model, "--backend", &backend, "-p", p, "-n", "12", "--temp", "0"]);
        assert_eq!(answer, run.strip_suffix('\n').unwrap(), "prompt {p:?} on {backend}");
    }
}

/// NaN logits (a broken model) fail the request with a message; the engine thread lives on and answers the
/// next one (it used to panic, and /health kept saying ok).
#[test]
fn broken_logits_fail_the_request_not_the_engine() {
    let model = bitnet_tests::nan_model();
    let s = Server::start(&["-m", model.to_str().unwrap(), "-t", "1"]);
    for temperature in [0.0, 0.8, 0.0] {
        let body = json!({ "prompt": "Hello", "max_tokens": 4, "temperature": temperature });
        let msg = error_of(s.post("/v1/completions", &body), 500);
        assert!(msg.contains("logit of NaN"), "{msg}");
        assert_eq!(s.get("/health").status(), 200);
    }
    s.wait_metric("slots_busy", 0.0);
}

#[test]
fn wrong_methods_and_content_types_get_json_errors() {
    let s = Server::tiny(&[]);
    for path in ["/v1/completions", "/v1/chat/completions", "/tokenize"] {
        let msg = error_of(s.get(path), 405);
        assert!(msg.contains("GET"), "{msg}");
    }
    error_of(s.client.delete(format!("{}/health", s.url)).send().unwrap(), 405);
    // A web page can POST text/plain (or a form) to any address without asking: JSON endpoints refuse it.
    let body = greedy("a", 2).to_string();
    for content_type in [Some("text/plain"), Some("application/x-www-form-urlencoded"), None] {
        let mut r = s.client.post(format!("{}/v1/completions", s.url)).body(body.clone());
        if let Some(ct) = content_type {
            r = r.header("content-type", ct);
        }
        let msg = error_of(r.send().unwrap(), 415);
        assert!(msg.contains("application/json"), "{content_type:?}: {msg}");
    }
    let r =
        s.client.post(format!("{}/v1/completions", s.url)).header("content-type", "Application/JSON; charset=utf-8");
    assert_eq!(r.body(body).send().unwrap().status(), 200);
    // `[]` is an empty prompt, not several.
    let msg = error_of(s.post("/v1/completions", &json!({ "prompt": [] })), 400);
    assert!(msg.contains("empty"), "{msg}");
}

/// DNS rebinding: a page at http://evil.example:PORT whose name resolves to 127.0.0.1 reaches the server with
/// `Host: evil.example:PORT`; on loopback only this machine's names are answered. CORS is off by default.
#[test]
fn loopback_server_refuses_foreign_hosts_and_cross_origin_reads() {
    let s = Server::tiny(&[]);
    let port = s.url.rsplit(':').next().unwrap().to_string();
    let with_host = |host: &str| s.client.get(format!("{}/v1/models", s.url)).header("host", host).send().unwrap();
    for good in ["localhost", "127.0.0.1", &format!("127.0.0.1:{port}"), &format!("LOCALHOST:{port}"), "[::1]:1"] {
        assert_eq!(with_host(good).status(), 200, "{good}");
    }
    for bad in [format!("evil.example:{port}"), "localhost.evil.example".into(), "127.0.0.1.nip.io".into()] {
        let msg = error_of(with_host(&bad), 403);
        assert!(msg.contains("Host"), "{msg}");
    }
    let preflight = |s: &Server| {
        s.client
            .request(reqwest::Method::OPTIONS, format!("{}/v1/completions", s.url))
            .header("origin", "http://app.example")
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", "content-type")
            .send()
            .unwrap()
    };
    assert!(preflight(&s).headers().get("access-control-allow-origin").is_none());
    let allowed = Server::tiny(&["--cors-origin", "http://app.example"]);
    let r = preflight(&allowed);
    assert_eq!(r.headers()["access-control-allow-origin"], "http://app.example");
}

/// Half-sent requests: headers or a body that never finish are answered (408) or closed within --timeout,
/// and the server goes on answering.
#[test]
fn slow_clients_are_cut_off() {
    use std::io::{Read, Write};
    let s = Server::tiny(&["--timeout", "1"]);
    let addr = s.url.strip_prefix("http://").unwrap().to_string();
    let t0 = Instant::now();
    let mut partial_headers = std::net::TcpStream::connect(&addr).unwrap();
    partial_headers.write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n").unwrap();
    let mut partial_body = std::net::TcpStream::connect(&addr).unwrap();
    let head = "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n";
    partial_body.write_all(format!("{head}Content-Length: 100\r\n\r\n{{\"prompt\"").as_bytes()).unwrap();
    for stream in [&mut partial_headers, &mut partial_body] {
        stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    }
    let mut answer = String::new();
    partial_body.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    let mut rest = Vec::new();
    assert_eq!(partial_headers.read_to_end(&mut rest).unwrap(), 0, "closed without an answer");
    assert!(t0.elapsed() < Duration::from_secs(10), "took {:?}", t0.elapsed());
    assert_eq!(s.get("/health").status(), 200);
}

/// `bitnet serve-www` on a site of three files and a dotfile, under a memory limit (`prlimit --as`): it serves
/// the files with the isolation headers and the right types, hides the dotfile, and hundreds of idle
/// connections neither kill it (one thread per connection did: a thread it could not spawn was a panic)
/// nor keep it from answering once they are gone.
#[test]
fn serve_www_serves_only_the_site_and_survives_idle_connections() {
    let site = std::env::temp_dir().join(format!("bitnet-www-test-{}", std::process::id()));
    std::fs::create_dir_all(&site).unwrap();
    for (name, body) in [("index.html", "<p>hi</p>"), ("app.wasm", "\0asm"), ("app.js", "1"), (".env", "KEY=1")] {
        std::fs::write(site.join(name), body).unwrap();
    }
    let mut child = Command::new("prlimit")
        .arg("--as=600000000") // bytes of address space: the binary and a few dozen threads' stacks
        .arg(bitnet_bin())
        .args(["serve-www", "--port", "0", "--dir", site.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start bitnet serve-www under prlimit");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let url = line.trim().rsplit(" at ").next().unwrap().trim_end_matches('/').to_string();
    let client = Client::builder().timeout(Duration::from_secs(30)).build().unwrap();
    let get = |path: &str| client.get(format!("{url}{path}")).send().unwrap();
    let check = || {
        let r = get("/");
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["cross-origin-opener-policy"], "same-origin");
        assert_eq!(r.headers()["cross-origin-embedder-policy"], "require-corp");
        assert_eq!(r.text().unwrap(), "<p>hi</p>");
    };
    check();
    assert_eq!(get("/app.wasm").headers()["content-type"], "application/wasm");
    assert!(get("/app.js").headers()["content-type"].to_str().unwrap().contains("javascript"));
    for hidden in ["/.env", "/%2eenv", "/../etc/passwd", "/missing"] {
        assert_eq!(get(hidden).status(), 404, "{hidden}");
    }
    assert_eq!(client.post(format!("{url}/")).send().unwrap().status(), 405);
    let addr = url.strip_prefix("http://").unwrap();
    let idle: Vec<std::net::TcpStream> = (0..400).map(|_| std::net::TcpStream::connect(addr).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(500));
    drop(idle);
    check();
    assert!(child.try_wait().unwrap().is_none(), "serve-www exited");
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&site);
}

/// --max-connections: beyond it, a client waits to be accepted; idle connections are closed after --timeout
/// (they then free their places).
#[test]
fn connections_are_limited_and_idle_ones_time_out() {
    let s = Server::tiny(&["--max-connections", "2", "--timeout", "2"]);
    let addr = s.url.strip_prefix("http://").unwrap().to_string();
    let idle: Vec<std::net::TcpStream> = (0..2).map(|_| std::net::TcpStream::connect(&addr).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(300));
    let t0 = Instant::now();
    assert_eq!(s.get("/health").status(), 200);
    let waited = t0.elapsed();
    assert!(waited > Duration::from_secs(1) && waited < Duration::from_secs(20), "answered after {waited:?}");
    drop(idle);
}

/// Sends `body` to `path` on a raw connection, shuts down the write side (as `curl` or `nc -N` may once the
/// request is sent), and reads the whole answer: the status and the body (chunks joined).
fn half_closed_request(s: &Server, path: &str, body: &Value) -> (u16, String) {
    use std::io::{Read, Write};
    let addr = s.url.strip_prefix("http://").unwrap();
    let mut c = std::net::TcpStream::connect(addr).unwrap();
    let body = body.to_string();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    c.write_all(format!("{head}{body}").as_bytes()).unwrap();
    c.shutdown(std::net::Shutdown::Write).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut raw = Vec::new();
    c.read_to_end(&mut raw).unwrap();
    let raw = String::from_utf8(raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no complete answer: {raw:?}"));
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let body =
        if head.to_ascii_lowercase().contains("transfer-encoding: chunked") { dechunk(body) } else { body.to_string() };
    (status, body)
}

/// The payload of an HTTP/1.1 chunked body (which must be complete: a last, empty chunk).
fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    loop {
        let (size, after) = rest.split_once("\r\n").expect("a chunk size line");
        let size = usize::from_str_radix(size.trim(), 16).expect("a hex chunk size");
        if size == 0 {
            return out;
        }
        out.push_str(&after[..size]);
        rest = after[size..].strip_prefix("\r\n").expect("CRLF after a chunk");
    }
}

/// A client that half-closes after sending its request gets the full answer, the same as a client that
/// keeps its side open, on every POST endpoint (with hyper's half_close off, only GET /health answered).
#[test]
fn half_closing_clients_get_their_answers() {
    let s = Server::tiny(&[]);
    let completion = greedy("Once upon a time", 40);
    let (status, body) = half_closed_request(&s, "/v1/completions", &completion);
    assert_eq!(status, 200, "{body}");
    let got: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(got["choices"][0]["text"], s.ok("/v1/completions", &completion)["choices"][0]["text"]);
    assert_eq!(got["usage"]["completion_tokens"], 40);

    let chat = json!({ "messages": [{ "role": "user", "content": "Hi" }], "max_tokens": 30, "temperature": 0 });
    let (status, body) = half_closed_request(&s, "/v1/chat/completions", &chat);
    assert_eq!(status, 200, "{body}");
    let got: Value = serde_json::from_str(&body).unwrap();
    let want = s.ok("/v1/chat/completions", &chat);
    assert_eq!(got["choices"][0]["message"], want["choices"][0]["message"]);

    let (status, body) = half_closed_request(&s, "/tokenize", &json!({ "content": "Hello world" }));
    assert_eq!(status, 200, "{body}");
    let got: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(got, s.ok("/tokenize", &json!({ "content": "Hello world" })));

    // Errors reach a half-closed client too, with their status.
    let (status, body) = half_closed_request(&s, "/v1/completions", &json!({ "prompt": "a", "n": 2 }));
    assert_eq!(status, 400, "{body}");
    // Nothing was cancelled: the answers above ran to the end.
    assert_eq!(s.metric("requests_cancelled_total"), 0.0);
}

/// /props and /slots in llama-server's shapes, --alias as the model's name, --api-key-file.
#[test]
fn props_slots_alias_and_api_key_file() {
    let dir = std::env::temp_dir().join(format!("bitnet-key-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let key_file = dir.join("key");
    std::fs::write(&key_file, "  file-key \n").unwrap();
    let key = key_file.to_str().unwrap();
    let s = Server::tiny(&["--alias", "my-model", "--api-key-file", key, "--slots", "2"]);
    let get = |path: &str| {
        let r = s.client.get(format!("{}{path}", s.url)).bearer_auth("file-key").send().unwrap();
        assert_eq!(r.status(), 200, "{path}");
        r.json::<Value>().unwrap()
    };
    assert_eq!(s.get("/v1/models").status(), 401, "the key from the file is required");
    assert_eq!(get("/v1/models")["data"][0]["id"], "my-model");
    let props = get("/props");
    assert_eq!(props["total_slots"], 2);
    assert_eq!(props["default_generation_settings"]["n_ctx"], 256);
    assert_eq!(props["model_alias"], "my-model");
    assert!(props["model_path"].as_str().unwrap().ends_with("tiny-a-i2_s.gguf"), "{props}");
    assert!(props["chat_template"].as_str().unwrap().contains("message"), "{props}");
    assert_eq!(props["chat_template_caps"]["supports_tools"], false, "the 2B4T template has no tool support");
    let slots = get("/slots");
    assert_eq!(slots.as_array().unwrap().len(), 2);
    assert!(slots.as_array().unwrap().iter().all(|s| s["is_processing"] == false && s["n_ctx"] == 256), "{slots}");
    let r = s
        .client
        .post(format!("{}/v1/completions", s.url))
        .bearer_auth("file-key")
        .json(&greedy("Once upon a", 6))
        .send()
        .unwrap();
    let body: Value = r.json().unwrap();
    assert_eq!(body["model"], "my-model");
    let slots = get("/slots");
    let used: Vec<&Value> = slots.as_array().unwrap().iter().filter(|s| s["n_cached_tokens"] != 0).collect();
    assert_eq!(used.len(), 1, "{slots}");
    assert_eq!(used[0]["next_token"]["n_decoded"], body["usage"]["completion_tokens"]);
    assert_eq!(used[0]["n_prompt_tokens"], body["usage"]["prompt_tokens"]);

    // A key given twice, or an empty key file, is refused before the model loads.
    let model = fixture(TINY);
    let m = model.to_str().unwrap();
    let out = bitnet(&["serve", "-m", m, "--port", "0", "--api-key", "k", "--api-key-file", key]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("API key once"));
    std::fs::write(&key_file, "\n").unwrap();
    let out = bitnet(&["serve", "-m", m, "--port", "0", "--api-key-file", key]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("empty"));
    let _ = std::fs::remove_dir_all(&dir);
}

fn sigterm(s: &Server) {
    let status = Command::new("kill").args(["-TERM", &s.child.id().to_string()]).status().unwrap();
    assert!(status.success());
}

/// Waits for the server to exit and returns whether it exited with status 0.
fn exits_cleanly(s: &mut Server, within: Duration) -> bool {
    let t0 = Instant::now();
    loop {
        if let Some(status) = s.child.try_wait().unwrap() {
            return status.success();
        }
        assert!(t0.elapsed() < within, "still running after {within:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The rest of a server-sent event stream: its JSON payloads and whether `[DONE]` came (the stream must end).
fn rest_of_stream(r: &mut BufReader<Response>) -> (Vec<Value>, bool) {
    let mut events = Vec::new();
    for line in r.lines() {
        let Ok(line) = line else { break };
        match line.strip_prefix("data: ") {
            Some("[DONE]") => return (events, true),
            Some(data) => events.push(serde_json::from_str(data).unwrap()),
            None => {}
        }
    }
    (events, false)
}

/// SIGTERM during a stream: the server stops accepting at once, lets the stream finish, then exits 0; the request
/// log has one line per request.
#[test]
fn sigterm_lets_running_streams_finish() {
    let log = std::env::temp_dir().join(format!("bitnet-serve-log-{}.txt", std::process::id()));
    let mut s =
        Server::start_with(&["--slots", "1", "--ctx", "512"], Stdio::from(std::fs::File::create(&log).unwrap()));
    let req =
        json!({ "prompt": "Tell me a story.", "max_tokens": 48, "temperature": 0, "ignore_eos": true, "stream": true });
    let mut r = BufReader::new(s.post("/v1/completions", &req));
    let mut line = String::new();
    while !line.starts_with("data: ") {
        line.clear();
        r.read_line(&mut line).unwrap();
    }
    let slots: Value = s.get("/slots").json().unwrap();
    assert_eq!(slots[0]["is_processing"], true, "{slots}");
    sigterm(&s);
    // New connections are refused while the stream goes on.
    let addr = s.url.strip_prefix("http://").unwrap().to_string();
    let t0 = Instant::now();
    while std::net::TcpStream::connect(&addr).is_ok() {
        assert!(t0.elapsed() < Duration::from_secs(5), "still accepting connections");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (events, done) = rest_of_stream(&mut r);
    assert!(done, "the stream did not finish: {events:?}");
    let last = events.iter().rev().find(|e| e["choices"][0]["finish_reason"].is_string()).unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "length");
    assert!(exits_cleanly(&mut s, Duration::from_secs(20)), "non-zero exit status");
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(log.lines().any(|l| l.starts_with("POST /v1/completions 200 ") && l.ends_with(" ms")), "{log}");
    assert!(log.lines().any(|l| l.starts_with("GET /slots 200 ")), "{log}");
}

/// SIGTERM during a stream longer than --shutdown-timeout: the stream ends with an error object saying why, and
/// the server exits 0.
#[test]
fn sigterm_ends_long_streams_cleanly_after_the_timeout() {
    let mut s = Server::start(&["--slots", "1", "--ctx", "2048", "--shutdown-timeout", "1"]);
    let mut r = start_long_stream(&s);
    let t0 = Instant::now();
    sigterm(&s);
    let (events, done) = rest_of_stream(&mut r);
    assert!(!done);
    let last = events.last().unwrap();
    assert!(last["error"]["message"].as_str().unwrap().contains("shutting down"), "{last}");
    assert!(exits_cleanly(&mut s, Duration::from_secs(20)), "non-zero exit status");
    assert!(t0.elapsed() < Duration::from_secs(15), "took {:?}", t0.elapsed());
}

/// `response_format`: json_object and json_schema outputs parse and follow the schema (tests/scripts/
/// serve_openai_client.py validates them with Python's `jsonschema` too); a schema that does not compile, or an
/// unknown format, is a 400 naming `response_format`.
#[test]
fn structured_output_follows_the_schema() {
    let s = Server::tiny(&[]);
    let schema = json!({
        "type": "object",
        "properties": {
            "name": { "type": "string", "maxLength": 10 },
            "age": { "type": "integer", "minimum": 0, "maximum": 120 },
            "color": { "enum": ["red", "green", "blue"] },
            "tags": { "type": "array", "items": { "type": "boolean" }, "maxItems": 3 },
        },
        "required": ["name", "age", "color", "tags"],
        "additionalProperties": false,
    });
    let format =
        json!({ "type": "json_schema", "json_schema": { "name": "person", "schema": schema, "strict": true } });
    for seed in 1..=6 {
        let req = json!({
            "messages": [{ "role": "user", "content": "Describe a person." }],
            "max_tokens": 120, "temperature": 1.0, "seed": seed, "response_format": format,
        });
        let body = s.ok("/v1/chat/completions", &req);
        assert_eq!(body["choices"][0]["finish_reason"], "stop", "{body}");
        let text = body["choices"][0]["message"]["content"].as_str().unwrap();
        let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("seed {seed}: {e}: {text:?}"));
        let o = v.as_object().unwrap();
        assert_eq!(o.len(), 4, "{text}");
        assert!(o["name"].as_str().unwrap().chars().count() <= 10, "{text}");
        assert!((0..=120).contains(&o["age"].as_i64().unwrap()), "{text}");
        assert!(["red", "green", "blue"].contains(&o["color"].as_str().unwrap()), "{text}");
        let tags = o["tags"].as_array().unwrap();
        assert!(tags.len() <= 3 && tags.iter().all(Value::is_boolean), "{text}");
    }
    // Any JSON object, streamed: the pieces joined parse.
    let req = json!({
        "prompt": "Data:", "max_tokens": 60, "temperature": 0.7, "seed": 3, "stream": true,
        "response_format": { "type": "json_object" },
    });
    let chunks = sse_events(s.post("/v1/completions", &req));
    let text: String = chunks.iter().filter_map(|c| c["choices"][0]["text"].as_str()).collect();
    let finish = chunks.iter().find_map(|c| c["choices"][0]["finish_reason"].as_str()).unwrap();
    if finish == "stop" {
        assert!(serde_json::from_str::<Value>(&text).unwrap().is_object(), "{text:?}");
    } else {
        assert!(text.starts_with('{'), "{text:?}");
    }
    // Free text is still free text.
    let plain =
        s.ok("/v1/completions", &json!({ "prompt": "a", "max_tokens": 3, "response_format": { "type": "text" } }));
    assert_eq!(plain["usage"]["completion_tokens"], 3);
    for bad in [
        json!({ "type": "json_schema", "json_schema": { "name": "x", "schema": { "type": "nonsense" } } }),
        json!({ "type": "json_schema" }),
        json!({ "type": "yaml" }),
        json!({ "type": "json_object", "schema": {} }),
    ] {
        let r: Value = s.post("/v1/completions", &json!({ "prompt": "a", "response_format": bad })).json().unwrap();
        assert!(r["error"]["param"].as_str().unwrap_or("").starts_with("response_format"), "{bad}: {r}");
    }
    let r = s.post(
        "/v1/completions",
        &json!({ "prompt": "a", "ignore_eos": true, "response_format": { "type": "json_object" } }),
    );
    assert_eq!(r.status(), 400);
}

/// Tool calls with the official `openai` client (tests/scripts/serve_openai_tools.py), on the tiny model with each
/// form of tool-call template (tests/fixtures/templates/): the tool loop (a required call, the tool's result sent
/// back, a text answer), a named function, one call without parallel_tool_calls, auto, streaming deltas equal to
/// the whole reply, the template rendered as Jinja2 renders it, bad tool requests refused. A model whose template
/// has no tool support refuses tools (serve_openai_client.py).
#[test]
fn tool_calls_with_the_openai_client() {
    for (template, format) in [("hermes-tools.jinja", "hermes"), ("llama3-tools.jinja", "llama3")] {
        let path = fixture(&format!("templates/{template}"));
        let text = std::fs::read_to_string(&path).unwrap();
        let model = edited_model(
            TINY,
            &format!("{format}.gguf"),
            |key, value| {
                use bitnet_engine::format::gguf::Value as V;
                if key == "tokenizer.chat_template" {
                    *value = V::Str(text.clone());
                }
                // Tool definitions take a few hundred of the tiny vocabulary's tokens: a longer context than 256
                // (the weights are random anyway).
                if key.ends_with(".context_length") {
                    *value = V::U32(2048);
                }
            },
            |_, _| {},
        );
        let s = Server::start(&["-m", model.to_str().unwrap(), "-t", "1"]);
        let script = repo().join("tests/scripts/serve_openai_tools.py");
        let out = Command::new("python3").arg(&script).args([&s.url, path.to_str().unwrap(), format]).output();
        let out = out.expect("python3 is needed for this test");
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(
            out.status.success(),
            "{} {format} failed (python3 -m pip install openai jsonschema jinja2):\n{stdout}\n{stderr}",
            script.display()
        );
        assert!(stdout.contains("openai tools OK"), "{stdout}");
        let _ = std::fs::remove_file(model);
    }
}
