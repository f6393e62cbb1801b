//! The engine thread. The model is shared read-only; each of N slots owns one sequence's KV cache.
//! One loop, on one thread, does all the model work: it admits queued requests into free slots, picks
//! the next token of every generating slot, then evaluates those tokens together with a bounded piece
//! of the prompts still waiting, in one batched forward pass (continuous batching: each weight matrix
//! is read once per step for all of them, so a step of 16 sequences costs far less than 16 steps).
//! Text goes back to the HTTP handlers through a channel per request; a handler that went away
//! (its receiver dropped) frees its slot at the next step.

use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::Instant;

use bitnet_engine::kernels::{self, Kernels};
use bitnet_engine::model::{BatchItem, BatchScratch, State};
use bitnet_engine::sampling::Sampler;
use bitnet_engine::session::{GenParams, StopMatcher, StopReason};
use bitnet_engine::tokenizer::StreamDecoder;
use bitnet_engine::Error;
use tokio::sync::mpsc::UnboundedSender;

use super::metrics::{add_time, Metrics};
use crate::model_file::Loaded;

/// Prompt tokens evaluated per step, all slots together: a long prompt is evaluated in pieces, so
/// that it delays the other slots' next token by a bounded time.
const PREFILL_BUDGET: usize = 64;

/// A generation request, ready to run: the prompt is tokenized and known to fit the context.
pub struct Job {
    pub prompt: Vec<u32>,
    pub params: GenParams,
    /// OpenAI's frequency and presence penalties (llama.cpp's penalty_freq and penalty_present).
    pub frequency_penalty: f32,
    pub presence_penalty: f32,
    pub events: UnboundedSender<Event>,
}

pub enum Event {
    /// Generated text (valid UTF-8, never part of a stop string).
    Text(String),
    Done(Done),
    Failed(String),
}

pub struct Done {
    pub stop: StopReason,
    pub prompt_tokens: usize,
    pub cached_tokens: usize,
    pub completion_tokens: usize,
}

pub enum SubmitError {
    /// The queue is full: try again later (HTTP 429).
    Busy,
    /// The engine thread is gone (HTTP 503).
    Stopped,
}

/// The handlers' side: a bounded queue into the engine thread.
pub struct Scheduler {
    queue: SyncSender<Job>,
    pub metrics: Arc<Metrics>,
    /// Cleared when the engine thread ends, however it ends (for /health).
    alive: Arc<AtomicBool>,
}

/// Clears the flag when dropped: on the engine thread's return or panic.
struct ClearOnDrop(Arc<AtomicBool>);

impl Drop for ClearOnDrop {
    fn drop(&mut self) {
        self.0.store(false, Relaxed);
    }
}

impl Scheduler {
    /// Allocates `slots` KV caches of `ctx` tokens and starts the engine thread.
    pub fn start(m: &'static Loaded, slots: usize, queue: usize, ctx: usize) -> Result<Self, Error> {
        let metrics = Arc::new(Metrics::default());
        metrics.slots.store(slots as u64, Relaxed);
        let c = &m.model.config;
        let slots = (0..slots)
            .map(|_| Ok(Slot { state: State::new(c, ctx)?, cached: Vec::new(), last_used: 0, req: None }))
            .collect::<Result<Vec<_>, Error>>()?;
        // One tile holds a whole step: every slot's token and the prompt budget.
        let scratch = BatchScratch::new(c, slots.len() + PREFILL_BUDGET);
        let (tx, rx) = sync_channel(queue);
        let engine =
            Engine { m, kernels: kernels::best(), scratch, slots, queue: rx, metrics: metrics.clone(), clock: 0 };
        let alive = Arc::new(AtomicBool::new(true));
        let clear_on_exit = ClearOnDrop(alive.clone());
        std::thread::Builder::new()
            .name("bitnet-engine".into())
            .spawn(move || {
                let _clear_on_exit = clear_on_exit;
                engine.run()
            })
            .map_err(|e| Error::Invalid(format!("starting the engine thread: {e}")))?;
        Ok(Self { queue: tx, metrics, alive })
    }

    pub fn is_alive(&self) -> bool {
        self.alive.load(Relaxed)
    }

    pub fn submit(&self, job: Job) -> Result<(), SubmitError> {
        self.metrics.queued.fetch_add(1, Relaxed);
        self.queue.try_send(job).map_err(|e| {
            self.metrics.queued.fetch_sub(1, Relaxed);
            match e {
                TrySendError::Full(_) => SubmitError::Busy,
                TrySendError::Disconnected(_) => SubmitError::Stopped,
            }
        })
    }
}

struct Slot {
    state: State,
    /// The tokens whose keys and values are in `state`, in order. They stay after a request ends,
    /// so that the next request with the same prefix (e.g. the next turn of a chat) reuses them.
    cached: Vec<u32>,
    last_used: u64,
    req: Option<Running>,
}

/// A request in a slot.
struct Running {
    job: Job,
    /// Admission order: prompts are evaluated oldest first.
    seq: u64,
    n_cached: usize,
    n_generated: usize,
    sampler: Sampler,
    decoder: StreamDecoder,
    stops: StopMatcher,
}

impl Slot {
    /// The prompt is fully evaluated and the logits of its last token (or of the last generated one) are ready.
    fn generating(&self) -> bool {
        self.req.as_ref().is_some_and(|r| self.cached.len() == r.job.prompt.len() + r.n_generated)
    }

    /// The part of the prompt not evaluated yet.
    fn prompt_left(&self) -> &[u32] {
        self.req.as_ref().map_or(&[], |r| r.job.prompt.get(self.cached.len()..).unwrap_or_default())
    }
}

/// Tokens to evaluate in one slot this step: a piece of its prompt, or its newest token.
struct Work {
    slot: usize,
    tokens: Vec<u32>,
    logits: bool,
}

struct Engine {
    m: &'static Loaded,
    kernels: &'static dyn Kernels,
    scratch: BatchScratch,
    slots: Vec<Slot>,
    queue: Receiver<Job>,
    metrics: Arc<Metrics>,
    clock: u64,
}

impl Engine {
    fn run(mut self) {
        while self.admit() {
            self.drop_abandoned();
            let mut work = self.sample();
            let n_decode = work.len();
            self.add_prompts(&mut work);
            self.forward(&work, n_decode);
        }
    }

    fn busy(&self) -> usize {
        self.slots.iter().filter(|s| s.req.is_some()).count()
    }

    /// Moves queued requests into free slots, waiting for one when no slot is busy.
    /// Returns false once the server has shut down.
    fn admit(&mut self) -> bool {
        while self.busy() < self.slots.len() {
            let job = if self.busy() == 0 {
                match self.queue.recv() {
                    Ok(job) => job,
                    Err(_) => return false,
                }
            } else {
                match self.queue.try_recv() {
                    Ok(job) => job,
                    Err(_) => break,
                }
            };
            self.metrics.queued.fetch_sub(1, Relaxed);
            if job.events.is_closed() {
                self.metrics.cancelled.fetch_add(1, Relaxed);
                continue;
            }
            self.start(job);
        }
        true
    }

    /// Puts `job` in the free slot whose cache shares the longest prefix with its prompt
    /// (the least recently used one among equals, to keep other conversations cached).
    fn start(&mut self, job: Job) {
        let common = |s: &Slot| s.cached.iter().zip(&job.prompt).take_while(|(a, b)| a == b).count();
        let slot = (0..self.slots.len())
            .filter(|&i| self.slots[i].req.is_none())
            .max_by_key(|&i| (common(&self.slots[i]), std::cmp::Reverse(self.slots[i].last_used)))
            .expect("admit checks for a free slot");
        // The last prompt token is always evaluated again, for fresh logits.
        let keep = common(&self.slots[slot]).min(job.prompt.len() - 1);
        self.slots[slot].cached.truncate(keep);
        self.clock += 1;
        self.metrics.busy_slots.fetch_add(1, Relaxed);
        self.metrics.prompt_tokens.fetch_add(job.prompt.len() as u64, Relaxed);
        self.metrics.cached_tokens.fetch_add(keep as u64, Relaxed);
        let mut sampler_params = job.params.sampler.clone();
        if job.frequency_penalty != 0.0 || job.presence_penalty != 0.0 {
            // `penalize` applies the repetition penalty together with the other two, in llama.cpp's order.
            sampler_params.repeat_penalty = 1.0;
        }
        self.slots[slot].req = Some(Running {
            sampler: Sampler::new(sampler_params),
            decoder: StreamDecoder::new(),
            stops: StopMatcher::new(&job.params.stop),
            seq: self.clock,
            n_cached: keep,
            n_generated: 0,
            job,
        });
    }

    /// Frees the slots of requests whose client has gone away.
    fn drop_abandoned(&mut self) {
        for i in 0..self.slots.len() {
            if self.slots[i].req.as_ref().is_some_and(|r| r.job.events.is_closed()) {
                self.metrics.cancelled.fetch_add(1, Relaxed);
                self.release(i);
            }
        }
    }

    fn release(&mut self, slot: usize) {
        self.slots[slot].req = None;
        self.slots[slot].last_used = self.clock;
        self.metrics.busy_slots.fetch_sub(1, Relaxed);
    }

    /// Adds up to PREFILL_BUDGET prompt tokens to the step's work, oldest request first.
    fn add_prompts(&self, work: &mut Vec<Work>) {
        let mut waiting: Vec<usize> =
            (0..self.slots.len()).filter(|&i| !self.slots[i].prompt_left().is_empty()).collect();
        waiting.sort_by_key(|&i| self.slots[i].req.as_ref().map(|r| r.seq));
        let mut budget = PREFILL_BUDGET;
        for slot in waiting {
            let left = self.slots[slot].prompt_left();
            let n = left.len().min(budget);
            if n == 0 {
                break;
            }
            work.push(Work { slot, tokens: left[..n].to_vec(), logits: n == left.len() });
            budget -= n;
        }
    }

    /// Picks the next token of every generating slot and sends its text; finishes the requests that
    /// stop. Returns the tokens to evaluate. Mirrors `Session::generate`, step by step.
    fn sample(&mut self) -> Vec<Work> {
        let mut work = Vec::new();
        for slot in 0..self.slots.len() {
            if !self.slots[slot].generating() {
                continue;
            }
            match self.next_token(slot) {
                Ok(token) => work.push(Work { slot, tokens: vec![token], logits: true }),
                Err(stop) => self.finish(slot, stop),
            }
        }
        work
    }

    /// The token to evaluate next in slot `i`, or why its request stops.
    fn next_token(&mut self, i: usize) -> Result<u32, StopReason> {
        let tok = &self.m.tokenizer;
        let slot = &mut self.slots[i];
        let (history, logits) = (&slot.cached, &slot.state.logits);
        let r = slot.req.as_mut().expect("generating slots run a request");
        if r.n_generated == r.job.params.max_tokens {
            return Err(StopReason::MaxTokens);
        }
        let sampled = if r.job.frequency_penalty != 0.0 || r.job.presence_penalty != 0.0 {
            let mut logits = logits.clone();
            let p = &r.job.params.sampler;
            let recent = &history[history.len().saturating_sub(p.repeat_last_n)..];
            penalize(&mut logits, recent, p.repeat_penalty, r.job.frequency_penalty, r.job.presence_penalty);
            r.sampler.sample(&logits, history)
        } else {
            r.sampler.sample(logits, history)
        };
        let next = match sampled {
            Ok(next) => next,
            // Broken logits (NaN: a broken model) fail this request; the engine goes on with the others.
            // `finish` counts it as cancelled, as it does a client that went away.
            Err(e) => {
                let _ = r.job.events.send(Event::Failed(e.to_string()));
                return Err(StopReason::Cancelled);
            }
        };
        if tok.is_end_of_generation(next) {
            return Err(StopReason::EndToken);
        }
        r.n_generated += 1;
        let (text, hit) = r.stops.feed(&r.decoder.push(tok, next));
        if !text.is_empty() && r.job.events.send(Event::Text(text)).is_err() {
            return Err(StopReason::Cancelled);
        }
        if hit {
            return Err(StopReason::StopString);
        }
        if history.len() == slot.state.ctx {
            return Err(StopReason::ContextFull);
        }
        Ok(next)
    }

    /// Ends the request in slot `i`: the held-back text, then the summary.
    fn finish(&mut self, i: usize, stop: StopReason) {
        let r = self.slots[i].req.as_mut().expect("finishing slots run a request");
        self.metrics.generated_tokens.fetch_add(r.n_generated as u64, Relaxed);
        if stop == StopReason::Cancelled {
            self.metrics.cancelled.fetch_add(1, Relaxed);
        } else {
            if stop != StopReason::StopString {
                let (rest, _) = r.stops.feed(&r.decoder.flush());
                let rest = rest + &r.stops.finish();
                if !rest.is_empty() {
                    let _ = r.job.events.send(Event::Text(rest));
                }
            }
            let done = Done {
                stop,
                prompt_tokens: r.job.prompt.len(),
                cached_tokens: r.n_cached,
                completion_tokens: r.n_generated,
            };
            let _ = r.job.events.send(Event::Done(done));
            self.metrics.finished.fetch_add(1, Relaxed);
        }
        self.release(i);
    }

    fn fail(&mut self, i: usize, e: Error) {
        if let Some(r) = &self.slots[i].req {
            let _ = r.job.events.send(Event::Failed(e.to_string()));
        }
        // What the cache holds is unknown after an error.
        self.slots[i].cached.clear();
        self.release(i);
    }

    /// Evaluates the step's work in one batched forward pass; the first `n_decode` items are one new
    /// token of a generating slot each. (A slot appears at most once: it either generates or has
    /// prompt left.)
    fn forward(&mut self, work: &[Work], n_decode: usize) {
        if work.is_empty() {
            return;
        }
        let t0 = Instant::now();
        let mut todo: Vec<Option<&Work>> = vec![None; self.slots.len()];
        for w in work {
            todo[w.slot] = Some(w);
        }
        let mut items: Vec<BatchItem> = (self.slots.iter_mut().zip(&todo))
            .filter_map(|(s, w)| {
                w.map(|w| BatchItem {
                    state: &mut s.state,
                    tokens: &w.tokens,
                    pos: s.cached.len(),
                    want_logits: w.logits,
                })
            })
            .collect();
        let (m, k, scratch) = (self.m, self.kernels, &mut self.scratch);
        let result = m.pool.install(|| m.model.forward_batch(k, scratch, &mut items));
        drop(items);
        for w in work {
            match &result {
                Ok(()) => self.slots[w.slot].cached.extend_from_slice(&w.tokens),
                // The batch is checked before anything runs; no slot's cache changed.
                Err(e) => self.fail(w.slot, Error::Invalid(e.to_string())),
            }
        }
        add_time(&self.metrics.step_nanos, t0.elapsed());
        self.metrics.steps.fetch_add(1, Relaxed);
        self.metrics.decode_rows.fetch_add(n_decode as u64, Relaxed);
        let prompt_tokens: usize = work[n_decode..].iter().map(|w| w.tokens.len()).sum();
        self.metrics.prompt_tokens_evaluated.fetch_add(prompt_tokens as u64, Relaxed);
    }
}

/// llama.cpp's penalties sampler: for each distinct recent token, the repetition penalty (divide a
/// positive logit, multiply a negative one), then `count · frequency + presence` subtracted.
fn penalize(logits: &mut [f32], recent: &[u32], repeat: f32, frequency: f32, presence: f32) {
    let mut counts: Vec<(u32, usize)> = Vec::new();
    let mut sorted = recent.to_vec();
    sorted.sort_unstable();
    for t in sorted {
        match counts.last_mut() {
            Some((last, n)) if *last == t => *n += 1,
            _ => counts.push((t, 1)),
        }
    }
    for (t, n) in counts {
        if let Some(l) = logits.get_mut(t as usize) {
            *l = if *l <= 0.0 { *l * repeat } else { *l / repeat };
            *l -= n as f32 * frequency + presence;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::penalize;

    #[test]
    fn penalties_follow_llama_cpp() {
        let mut l = [2.0, -1.0, 3.0];
        penalize(&mut l, &[0, 0, 1], 2.0, 0.5, 0.25);
        // token 0: 2/2 - 2·0.5 - 0.25; token 1: -1·2 - 0.5 - 0.25; token 2 untouched
        assert_eq!(l, [-0.25, -2.75, 3.0]);
    }
}
