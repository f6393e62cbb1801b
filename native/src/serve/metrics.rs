//! Counters and latency histograms shared by the HTTP handlers and the engine thread, rendered as
//! Prometheus text for /metrics.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

#[derive(Default)]
pub struct Metrics {
    pub requests: AtomicU64,
    pub rejected: AtomicU64,
    pub cancelled: AtomicU64,
    pub finished: AtomicU64,
    pub prompt_tokens: AtomicU64,
    /// Prompt tokens whose keys and values were already in the slot's cache.
    pub cached_tokens: AtomicU64,
    pub generated_tokens: AtomicU64,
    /// Engine steps: one forward pass over the next token of every generating slot and a piece of
    /// the waiting prompts.
    pub steps: AtomicU64,
    /// Generating sequences advanced by the steps (decode_rows / steps is the mean decode batch).
    pub decode_rows: AtomicU64,
    pub prompt_tokens_evaluated: AtomicU64,
    pub step_nanos: AtomicU64,
    pub queued: AtomicU64,
    pub busy_slots: AtomicU64,
    pub slots: AtomicU64,
    /// From a request's arrival in the queue to its first generated token.
    pub first_token: Histogram,
    /// Between a request's successive generated tokens.
    pub token_interval: Histogram,
}

/// Upper bounds of the latency buckets, in seconds (Prometheus' default buckets, with finer ones below 5 ms:
/// a token of a small model takes a few milliseconds).
const BUCKETS: [f64; 16] =
    [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0];

/// A Prometheus histogram of durations: counts per bucket (not cumulative; render adds them up), a count and
/// a sum.
#[derive(Default)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_nanos: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|&le| secs <= le) {
            self.buckets[i].fetch_add(1, Relaxed);
        }
        self.count.fetch_add(1, Relaxed);
        add_time(&self.sum_nanos, d);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP bitnet_{name} {help}\n# TYPE bitnet_{name} histogram");
        let mut cumulative = 0;
        for (le, n) in BUCKETS.iter().zip(&self.buckets) {
            cumulative += n.load(Relaxed);
            let _ = writeln!(out, "bitnet_{name}_bucket{{le=\"{le}\"}} {cumulative}");
        }
        let count = self.count.load(Relaxed);
        let _ = writeln!(out, "bitnet_{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "bitnet_{name}_sum {}", self.sum_nanos.load(Relaxed) as f64 * 1e-9);
        let _ = writeln!(out, "bitnet_{name}_count {count}");
    }
}

pub fn add_time(counter: &AtomicU64, d: Duration) {
    counter.fetch_add(d.as_nanos() as u64, Relaxed);
}

impl Metrics {
    pub fn render(&self) -> String {
        let get = |c: &AtomicU64| c.load(Relaxed);
        let secs = |c: &AtomicU64| get(c) as f64 * 1e-9;
        let step_secs = secs(&self.step_nanos);
        let tps = if step_secs > 0.0 { get(&self.decode_rows) as f64 / step_secs } else { 0.0 };
        let mut out = String::new();
        let mut put = |name: &str, kind: &str, help: &str, value: f64| {
            let _ = writeln!(out, "# HELP bitnet_{name} {help}\n# TYPE bitnet_{name} {kind}\nbitnet_{name} {value}");
        };
        put("requests_total", "counter", "Generation requests received.", get(&self.requests) as f64);
        put(
            "requests_rejected_total",
            "counter",
            "Requests refused with 429 because the queue was full.",
            get(&self.rejected) as f64,
        );
        put(
            "requests_cancelled_total",
            "counter",
            "Generations stopped because the client went away.",
            get(&self.cancelled) as f64,
        );
        put("requests_finished_total", "counter", "Generations completed.", get(&self.finished) as f64);
        put("prompt_tokens_total", "counter", "Prompt tokens of admitted requests.", get(&self.prompt_tokens) as f64);
        put(
            "prompt_tokens_cached_total",
            "counter",
            "Prompt tokens reused from a slot's KV cache.",
            get(&self.cached_tokens) as f64,
        );
        put("generated_tokens_total", "counter", "Tokens generated.", get(&self.generated_tokens) as f64);
        put(
            "prompt_tokens_evaluated_total",
            "counter",
            "Prompt tokens run through the model.",
            get(&self.prompt_tokens_evaluated) as f64,
        );
        put("steps_total", "counter", "Engine steps (one batched forward pass each).", get(&self.steps) as f64);
        put(
            "decode_rows_total",
            "counter",
            "Generated tokens evaluated by the steps, all slots together.",
            get(&self.decode_rows) as f64,
        );
        put("step_seconds_total", "counter", "Time spent in engine steps.", step_secs);
        put(
            "decode_tokens_per_second",
            "gauge",
            "Generated tokens evaluated per second of step time (all slots together).",
            tps,
        );
        put("queue_depth", "gauge", "Requests waiting for a slot.", get(&self.queued) as f64);
        put("slots_busy", "gauge", "Slots generating or prefilling.", get(&self.busy_slots) as f64);
        put("slots_total", "gauge", "Slots.", get(&self.slots) as f64);
        let help = "Seconds from a request's arrival to its first generated token (queueing and prompt included).";
        self.first_token.render(&mut out, "time_to_first_token_seconds", help);
        let help = "Seconds between a request's successive generated tokens.";
        self.token_interval.render(&mut out, "time_per_output_token_seconds", help);
        out
    }
}
