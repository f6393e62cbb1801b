//! The engine thread. The model's weights are shared on their device; each of N slots owns one sequence
//! (its KV cache) there. One loop, on one thread, does all the model work: it admits queued requests into
//! free slots, steps every generating slot's `Generation` (the engine's one generation loop), then
//! evaluates the tokens they pick together with a bounded piece of the prompts still waiting, in one
//! step of the device's `Batcher` (continuous batching: on the CPU each weight matrix is read once per
//! step for all of them, so a step of 16 sequences costs far less than 16 steps).
//! Text goes back to the HTTP handlers through a channel per request; a handler that went away
//! (its receiver dropped) frees its slot at the next step.
//! Embedding requests (embedding models, which do not generate) run whole as they are admitted, in a free
//! slot's sequence.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::Instant;

use bitnet_engine::backend::{Batcher, Sequence, Step, Want};
use bitnet_engine::generate::embed::l2_normalized;
use bitnet_engine::generate::grammar::Constraint;
use bitnet_engine::generate::sampler::TokenLogprob;
use bitnet_engine::generate::{reusable_prefix, GenParams, Generation, Output, StopReason};
use bitnet_engine::text::tokenizer::Tokenizer;
use bitnet_engine::Error;
use rayon::prelude::*;
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
    /// The grammar of `response_format`, if any.
    pub constraint: Option<Constraint>,
    pub events: UnboundedSender<Event>,
    /// When the handler queued it (time to first token counts from here).
    pub queued_at: Instant,
}

/// An embedding request: each input's tokens, known to fit the context; the unit-length embeddings (or
/// why there are none) come back on `reply`.
pub struct EmbedJob {
    pub inputs: Vec<Vec<u32>>,
    pub reply: tokio::sync::oneshot::Sender<Result<Vec<Vec<f32>>, String>>,
}

/// What the queue carries.
pub enum Task {
    /// Boxed: a job (its sampling parameters) is large, and the queue holds up to --queue tasks.
    Generate(Box<Job>),
    Embed(EmbedJob),
}

pub enum Event {
    /// The output of one generated token: its text (valid UTF-8, never part of a stop string; often empty:
    /// text held back) and its log-probabilities if asked for.
    Token {
        text: String,
        logprob: Option<TokenLogprob>,
    },
    Done(Done),
    Failed(String),
}

pub struct Done {
    pub stop: StopReason,
    pub prompt_tokens: usize,
    pub cached_tokens: usize,
    pub completion_tokens: usize,
    pub timings: Timings,
}

/// How long the request's prompt and generation took, as llama-server reports them.
#[derive(Clone, Copy)]
pub struct Timings {
    /// Prompt tokens evaluated (those not reused from the slot's cache), and the time from admission to
    /// the prompt's last piece evaluated.
    pub prompt_n: usize,
    pub prompt_ms: f64,
    /// Tokens generated, and the time from then to the end.
    pub predicted_n: usize,
    pub predicted_ms: f64,
}

pub enum SubmitError {
    /// The queue is full: try again later (HTTP 429).
    Busy,
    /// The engine thread is gone (HTTP 503).
    Stopped,
}

/// The handlers' side: a bounded queue into the engine thread.
pub struct Scheduler {
    queue: SyncSender<Task>,
    pub metrics: Arc<Metrics>,
    /// What each slot is doing (for /slots).
    pub slots: Arc<[SlotStatus]>,
    /// Cleared when the engine thread ends, however it ends (for /health).
    alive: Arc<AtomicBool>,
    /// Set to make the engine fail every request it holds and stop (the end of a graceful shutdown).
    abort: Arc<AtomicBool>,
}

/// A slot as /slots shows it, published by the engine thread after each step.
#[derive(Default)]
pub struct SlotStatus {
    pub busy: AtomicBool,
    /// The admission number of its current (or last) request.
    pub task: AtomicU64,
    /// Tokens whose keys and values its cache holds.
    pub n_cached: AtomicU64,
    pub n_prompt: AtomicU64,
    /// Tokens generated for its current (or last) request.
    pub n_decoded: AtomicU64,
}

/// Clears the flag when dropped: on the engine thread's return or panic.
struct ClearOnDrop(Arc<AtomicBool>);

impl Drop for ClearOnDrop {
    fn drop(&mut self) {
        self.0.store(false, Relaxed);
    }
}

impl Scheduler {
    /// Opens `slots` sequences of `ctx` tokens on the model's device and starts the engine thread.
    pub fn start(m: &'static Loaded, slots: usize, queue: usize, ctx: usize) -> Result<Self, Error> {
        let metrics = Arc::new(Metrics::default());
        metrics.slots.store(slots as u64, Relaxed);
        let slots = (0..slots)
            .map(|_| {
                let seq = m.weights.clone().sequence(ctx)?;
                Ok(Slot { seq, cached: Vec::new(), last_used: 0, req: None, picked: None })
            })
            .collect::<Result<Vec<_>, Error>>()?;
        // One step holds every slot's token and the prompt budget.
        let batcher = m.weights.clone().batcher(slots.len() + PREFILL_BUDGET);
        let (tx, rx) = sync_channel(queue);
        let status: Arc<[SlotStatus]> = slots.iter().map(|_| SlotStatus::default()).collect();
        let abort = Arc::new(AtomicBool::new(false));
        let engine = Engine {
            m,
            batcher,
            slots,
            queue: rx,
            metrics: metrics.clone(),
            clock: 0,
            status: status.clone(),
            abort: abort.clone(),
        };
        let alive = Arc::new(AtomicBool::new(true));
        let clear_on_exit = ClearOnDrop(alive.clone());
        std::thread::Builder::new()
            .name("bitnet-engine".into())
            .spawn(move || {
                let _clear_on_exit = clear_on_exit;
                engine.run()
            })
            .map_err(|e| Error::Invalid(format!("starting the engine thread: {e}")))?;
        Ok(Self { queue: tx, metrics, slots: status, alive, abort })
    }

    pub fn is_alive(&self) -> bool {
        self.alive.load(Relaxed)
    }

    /// Ends every request the engine holds, running or queued, with a "shutting down" failure (a stream ends
    /// with an error object instead of stopping mid-way), and stops the engine thread at its next step.
    pub fn abort(&self) {
        self.abort.store(true, Relaxed);
    }

    pub fn submit(&self, task: Task) -> Result<(), SubmitError> {
        self.metrics.queued.fetch_add(1, Relaxed);
        self.queue.try_send(task).map_err(|e| {
            self.metrics.queued.fetch_sub(1, Relaxed);
            match e {
                TrySendError::Full(_) => SubmitError::Busy,
                TrySendError::Disconnected(_) => SubmitError::Stopped,
            }
        })
    }
}

struct Slot {
    seq: Box<dyn Sequence>,
    /// The tokens whose keys and values are in `seq`, in order. They stay after a request ends, so
    /// that the next request with the same prefix (e.g. the next turn of a chat) reuses them.
    cached: Vec<u32>,
    last_used: u64,
    req: Option<Running>,
    /// The device's greedy pick after the last evaluated token ([`Want::Greedy`]).
    picked: Option<u32>,
}

/// A request in a slot.
struct Running {
    job: Job,
    /// Admission order: prompts are evaluated oldest first.
    seq: u64,
    n_cached: usize,
    gen: Generation,
    admitted: Instant,
    /// When its prompt was evaluated (its first step), then when its last token was picked.
    prompt_done: Option<Instant>,
    last_token: Option<Instant>,
}

impl Slot {
    /// The prompt is fully evaluated and the output of its last token (or of the last generated one) is ready.
    fn generating(&self) -> bool {
        self.req.as_ref().is_some_and(|r| self.cached.len() == r.job.prompt.len() + r.gen.n_generated)
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
    want: Want,
}

struct Engine {
    m: &'static Loaded,
    batcher: Box<dyn Batcher>,
    slots: Vec<Slot>,
    queue: Receiver<Task>,
    metrics: Arc<Metrics>,
    clock: u64,
    status: Arc<[SlotStatus]>,
    abort: Arc<AtomicBool>,
}

impl Engine {
    fn run(mut self) {
        while self.admit() {
            if self.abort.load(Relaxed) {
                return self.shut_down();
            }
            self.drop_abandoned();
            let mut work = self.sample();
            let n_decode = work.len();
            self.add_prompts(&mut work);
            self.forward(&work, n_decode);
            self.publish();
        }
    }

    /// Fails every running and queued request: the server is going away.
    fn shut_down(&mut self) {
        const MSG: &str = "the server is shutting down";
        for i in 0..self.slots.len() {
            if self.slots[i].req.is_some() {
                self.fail(i, Error::Invalid(MSG.into()));
            }
        }
        while let Ok(task) = self.queue.try_recv() {
            self.metrics.queued.fetch_sub(1, Relaxed);
            match task {
                Task::Generate(job) => drop(job.events.send(Event::Failed(MSG.into()))),
                Task::Embed(job) => drop(job.reply.send(Err(MSG.into()))),
            }
        }
        self.publish();
    }

    /// Copies what each slot is doing where /slots reads it.
    fn publish(&self) {
        for (slot, status) in self.slots.iter().zip(self.status.iter()) {
            status.busy.store(slot.req.is_some(), Relaxed);
            status.n_cached.store(slot.cached.len() as u64, Relaxed);
            if let Some(r) = &slot.req {
                status.task.store(r.seq, Relaxed);
                status.n_prompt.store(r.job.prompt.len() as u64, Relaxed);
                status.n_decoded.store(r.gen.n_generated as u64, Relaxed);
            }
        }
    }

    fn busy(&self) -> usize {
        self.slots.iter().filter(|s| s.req.is_some()).count()
    }

    /// Moves queued requests into free slots, waiting for one when no slot is busy.
    /// Returns false once the server has shut down.
    fn admit(&mut self) -> bool {
        while self.busy() < self.slots.len() {
            let task = if self.busy() == 0 {
                match self.queue.recv() {
                    Ok(task) => task,
                    Err(_) => return false,
                }
            } else {
                match self.queue.try_recv() {
                    Ok(task) => task,
                    Err(_) => break,
                }
            };
            self.metrics.queued.fetch_sub(1, Relaxed);
            let job = match task {
                Task::Generate(job) => *job,
                Task::Embed(job) => {
                    self.embed(job);
                    continue;
                }
            };
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
    fn start(&mut self, mut job: Job) {
        let reuse = |s: &Slot| reusable_prefix(&s.cached, &job.prompt);
        let slot = (0..self.slots.len())
            .filter(|&i| self.slots[i].req.is_none())
            .max_by_key(|&i| (reuse(&self.slots[i]), std::cmp::Reverse(self.slots[i].last_used)))
            .expect("admit checks for a free slot");
        let keep = reuse(&self.slots[slot]);
        self.slots[slot].cached.truncate(keep);
        self.clock += 1;
        self.metrics.busy_slots.fetch_add(1, Relaxed);
        self.metrics.prompt_tokens.fetch_add(job.prompt.len() as u64, Relaxed);
        self.metrics.cached_tokens.fetch_add(keep as u64, Relaxed);
        let mut gen = Generation::new(&job.params, job.prompt.len() - keep);
        if let Some(constraint) = job.constraint.take() {
            gen.constrain(constraint);
        }
        let admitted = Instant::now();
        let r = Running { seq: self.clock, n_cached: keep, gen, job, admitted, prompt_done: None, last_token: None };
        self.slots[slot].req = Some(r);
    }

    /// Runs an embedding request at once in a free slot's sequence: each input from position 0, then the final
    /// hidden state of its last token, scaled to unit length (as `bitnet embed` does).
    fn embed(&mut self, job: EmbedJob) {
        if job.reply.is_closed() {
            self.metrics.cancelled.fetch_add(1, Relaxed);
            return;
        }
        let slot = (0..self.slots.len()).find(|&i| self.slots[i].req.is_none()).expect("admit checks for a free slot");
        let (s, device) = (&mut self.slots[slot], &self.m.weights);
        s.picked = None;
        let reply = &job.reply;
        let mut one = |tokens: &[u32]| {
            // A client gone mid-batch: the rest is not computed.
            if reply.is_closed() {
                return Err(Error::Invalid("the client went away".into()));
            }
            s.cached.clear();
            s.seq.forward(tokens, 0, Want::Logits)?;
            s.cached.extend_from_slice(tokens);
            let hidden =
                s.seq.hidden().ok_or_else(|| Error::Unsupported(format!("embeddings on {}", device.name())))?;
            Ok::<_, Error>(l2_normalized(hidden))
        };
        let embeddings = job.inputs.iter().map(|t| one(t)).collect::<Result<Vec<_>, _>>();
        if embeddings.is_err() {
            // What the cache holds is unknown after an error.
            s.cached.clear();
        }
        self.metrics.prompt_tokens.fetch_add(job.inputs.iter().map(|t| t.len() as u64).sum(), Relaxed);
        if job.reply.is_closed() {
            self.metrics.cancelled.fetch_add(1, Relaxed);
            return;
        }
        self.metrics.finished.fetch_add(1, Relaxed);
        let _ = job.reply.send(embeddings.map_err(|e| e.to_string()));
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
            let last = n == left.len();
            let want = match &self.slots[slot].req {
                Some(r) if last => r.gen.want(),
                _ => Want::Nothing,
            };
            work.push(Work { slot, tokens: left[..n].to_vec(), want });
            budget -= n;
        }
    }

    /// Steps the generation of every generating slot: sends its text, and returns the tokens to
    /// evaluate; finishes the requests that stop.
    fn sample(&mut self) -> Vec<Work> {
        // Each slot's step (sampling over the whole vocabulary, detokenizing) is independent of the others':
        // many run on the host's cores together (one after another, they took most of a step's time at 64
        // streams on a GPU); a few run here (waking the thread pool would cost more than it saves).
        let (tok, metrics) = (&self.m.tokenizer, &*self.metrics);
        let generating: Vec<(usize, &mut Slot)> =
            self.slots.iter_mut().enumerate().filter(|(_, s)| s.generating()).collect();
        let stepped: Vec<(usize, Result<u32, StopReason>)> = if generating.len() < 4 {
            generating.into_iter().map(|(i, s)| (i, step(s, tok, metrics))).collect()
        } else {
            generating.into_par_iter().map(|(i, s)| (i, step(s, tok, metrics))).collect()
        };
        let mut work = Vec::new();
        for (slot, stepped) in stepped {
            match stepped {
                Ok(token) => {
                    let want = self.slots[slot].req.as_ref().map_or(Want::Logits, |r| r.gen.want());
                    work.push(Work { slot, tokens: vec![token], want })
                }
                Err(stop) => self.finish(slot, stop),
            }
        }
        work
    }

    /// Ends the request in slot `i` with its summary (its last text went out with its last step).
    fn finish(&mut self, i: usize, stop: StopReason) {
        let r = self.slots[i].req.as_mut().expect("finishing slots run a request");
        self.metrics.generated_tokens.fetch_add(r.gen.n_generated as u64, Relaxed);
        if stop == StopReason::Cancelled {
            self.metrics.cancelled.fetch_add(1, Relaxed);
        } else {
            let now = Instant::now();
            let prompt_done = r.prompt_done.unwrap_or(now);
            let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
            let timings = Timings {
                prompt_n: r.gen.n_prompt_eval,
                prompt_ms: ms(prompt_done - r.admitted),
                predicted_n: r.gen.n_generated,
                predicted_ms: ms(now - prompt_done),
            };
            let done = Done {
                stop,
                prompt_tokens: r.job.prompt.len(),
                cached_tokens: r.n_cached,
                completion_tokens: r.gen.n_generated,
                timings,
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
        let mut steps: Vec<Step> = (self.slots.iter_mut().zip(&todo))
            .filter_map(|(s, w)| {
                w.map(|w| Step { seq: s.seq.as_mut(), tokens: &w.tokens, pos: s.cached.len(), want: w.want })
            })
            .collect();
        let result = self.batcher.forward(&mut steps);
        drop(steps);
        match result {
            Ok(picked) => {
                // `steps` followed the slots' order, as `work` sorted by slot does.
                let mut in_slot_order: Vec<&Work> = work.iter().collect();
                in_slot_order.sort_by_key(|w| w.slot);
                for (w, p) in in_slot_order.into_iter().zip(picked) {
                    let s = &mut self.slots[w.slot];
                    s.cached.extend_from_slice(&w.tokens);
                    s.picked = p;
                }
            }
            Err(e) => {
                for w in work {
                    self.fail(w.slot, Error::Invalid(e.to_string()));
                }
            }
        }
        add_time(&self.metrics.step_nanos, t0.elapsed());
        self.metrics.steps.fetch_add(1, Relaxed);
        self.metrics.decode_rows.fetch_add(n_decode as u64, Relaxed);
        let prompt_tokens: usize = work[n_decode..].iter().map(|w| w.tokens.len()).sum();
        self.metrics.prompt_tokens_evaluated.fetch_add(prompt_tokens as u64, Relaxed);
    }
}

/// One step of a generating slot: the token to evaluate next, or why its request stops.
fn step(slot: &mut Slot, tok: &Tokenizer, metrics: &Metrics) -> Result<u32, StopReason> {
    let out = slot.picked.take().map_or(Output::Logits(slot.seq.logits()), Output::Token);
    let r = slot.req.as_mut().expect("generating slots run a request");
    let now = Instant::now();
    r.prompt_done.get_or_insert(now);
    let generated_before = r.gen.n_generated;
    let step = match r.gen.step(tok, out, &slot.cached, slot.seq.ctx()) {
        Ok(step) => step.expect("a request stops when its generation does"),
        // Broken logits (NaN: a broken model) fail this request; the engine goes on with the others.
        // `finish` counts it as cancelled, as it does a client that went away.
        Err(e) => {
            let _ = r.job.events.send(Event::Failed(e.to_string()));
            return Err(StopReason::Cancelled);
        }
    };
    if r.gen.n_generated > generated_before {
        match r.last_token.replace(now) {
            None => metrics.first_token.observe(now - r.job.queued_at),
            Some(last) => metrics.token_interval.observe(now - last),
        }
    }
    let has_output = !step.text.is_empty() || step.logprob.is_some();
    if has_output && r.job.events.send(Event::Token { text: step.text, logprob: step.logprob }).is_err() {
        r.gen.cancel();
    }
    match (r.gen.stop, step.eval) {
        (Some(stop), _) => Err(stop),
        (None, Some(t)) => Ok(t),
        (None, None) => unreachable!("a step without a token to evaluate ends the generation"),
    }
}
