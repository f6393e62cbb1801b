//! `bitnet._bitnet`: bitnet-engine for Python. A thin shell, like the `bitnet` binary: it opens a model
//! with the engine's [`open`], and every computation is the engine's, so that logits, perplexity and seeded
//! generations equal the binary's. The GIL is released while the engine computes; a generation checks for
//! Ctrl+C between tokens.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use bitnet_engine::backend::{DeviceChoice, DeviceOptions, KvType, Want};
use bitnet_engine::generate::perplexity::perplexity;
use bitnet_engine::generate::sampler::{clock_seed, SamplerParams};
use bitnet_engine::generate::{GenParams, Generation, Session, StopReason};
use bitnet_engine::open::{self, Loaded, OpenOptions};
use bitnet_engine::text::chat::ChatMessage;
use numpy::ndarray::Array2;
use numpy::{IntoPyArray, PyArray1, PyArray2};
use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyValueError};
use pyo3::prelude::*;

create_exception!(
    bitnet,
    BitnetError,
    PyException,
    "An error of the engine (a bad model file, a prompt too long, ...)."
);

/// The engine's error as a Python exception, with the engine's message.
fn py_err(e: bitnet_engine::Error) -> PyErr {
    BitnetError::new_err(e.to_string())
}

/// A language model loaded once, then called many times. Thread-safe: each call has its own KV cache.
#[pyclass(frozen, module = "bitnet")]
struct Model {
    m: Arc<Loaded>,
    info: String,
}

#[pymethods]
impl Model {
    #[new]
    #[pyo3(signature = (path=None, backend="auto", threads=None, ctx=None, kv_type="f16"))]
    fn new(
        py: Python<'_>,
        path: Option<PathBuf>,
        backend: &str,
        threads: Option<usize>,
        ctx: Option<usize>,
        kv_type: &str,
    ) -> PyResult<Self> {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        if threads.is_some_and(|n| !(1..=cpus).contains(&n)) {
            return Err(PyValueError::new_err(format!("threads must be from 1 to {cpus} (the CPUs available)")));
        }
        let kv = KvType::parse(kv_type)
            .ok_or_else(|| PyValueError::new_err(format!("unknown kv_type '{kv_type}' (f32, f16 or q8_0)")))?;
        let device = DeviceChoice::parse(backend)
            .ok_or_else(|| PyValueError::new_err(format!("unknown backend '{backend}' (cpu, wgpu, cuda or auto)")))?;
        let device = DeviceOptions { device, threads, head: None, kv };
        let opts = OpenOptions { ctx, device, ..OpenOptions::default() };
        py.detach(|| {
            let bytes = open::open_bytes(path.as_deref())?;
            let info = bitnet_engine::info::report(&bytes)?;
            let m = Loaded::load(&bytes, &opts, &mut |_, _| {})?;
            m.session()?; // the context size and the memory for it, checked now rather than at the first call
            Ok(Model { m: Arc::new(m), info })
        })
        .map_err(py_err)
    }

    /// Token ids of `text`; BOS first when `add_special` and the model adds one.
    #[pyo3(signature = (text, add_special=true))]
    fn tokenize(&self, py: Python<'_>, text: &str, add_special: bool) -> PyResult<Vec<u32>> {
        let tok = &self.m.tokenizer;
        py.detach(|| tok.encode(text, add_special && tok.add_bos())).map_err(py_err)
    }

    /// The text of token ids (special tokens as their text; bytes that are not UTF-8 as U+FFFD).
    fn detokenize(&self, ids: Vec<u32>) -> PyResult<String> {
        let tok = &self.m.tokenizer;
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= tok.vocab_size()) {
            return Err(PyValueError::new_err(format!(
                "token id {bad} is outside the vocabulary of {}",
                tok.vocab_size()
            )));
        }
        Ok(tok.decode(&ids))
    }

    /// Next-token logits of `ids` as float32: those after the last id (shape [n_vocab]), or with
    /// `all=True` those after every id (shape [len(ids), n_vocab]).
    #[pyo3(signature = (ids, all=false))]
    fn logits<'py>(&self, py: Python<'py>, ids: Vec<u32>, all: bool) -> PyResult<Bound<'py, PyAny>> {
        let m = &self.m;
        if !all {
            let row = py.detach(|| -> bitnet_engine::Result<Vec<f32>> {
                let mut session = m.session()?;
                session.prefill(&ids)?;
                Ok(session.logits().to_vec())
            });
            return Ok(PyArray1::from_vec(py, row.map_err(py_err)?).into_any());
        }
        let n_vocab = m.weights.config().n_vocab;
        let flat = py.detach(|| -> bitnet_engine::Result<Vec<f32>> {
            if ids.is_empty() {
                return Err(bitnet_engine::Error::Invalid("empty prompt".into()));
            }
            let mut session = m.session()?;
            let mut flat = Vec::with_capacity(ids.len() * n_vocab);
            // One token at a time, as `bitnet perplexity` scores them.
            for &t in &ids {
                session.push(&[t], Want::Logits)?;
                flat.extend_from_slice(session.logits());
            }
            Ok(flat)
        });
        let rows = Array2::from_shape_vec((ids.len(), n_vocab), flat.map_err(py_err)?).expect("one row per id");
        let array: Bound<'py, PyArray2<f32>> = rows.into_pyarray(py);
        Ok(array.into_any())
    }

    /// Continues `prompt` (BOS first when the model adds one), as `bitnet run` does: the same settings
    /// and seed give the same text.
    #[pyo3(signature = (prompt, max_tokens=128, temperature=0.8, top_k=40, top_p=0.95, min_p=0.05,
        repeat_penalty=1.0, repeat_last_n=64, seed=None, stop=None, stream=false))]
    #[allow(clippy::too_many_arguments)]
    fn generate(
        &self,
        py: Python<'_>,
        prompt: &str,
        max_tokens: usize,
        temperature: f32,
        top_k: usize,
        top_p: f32,
        min_p: f32,
        repeat_penalty: f32,
        repeat_last_n: usize,
        seed: Option<u64>,
        stop: Option<Stop>,
        stream: bool,
    ) -> PyResult<Py<PyAny>> {
        let sampler =
            SamplerParams { temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n, ..Default::default() };
        let params = gen_params(sampler, seed, max_tokens, stop)?;
        let tok = &self.m.tokenizer;
        let ids = py.detach(|| tok.encode(prompt, tok.add_bos())).map_err(py_err)?;
        self.run(py, ids, params, stream)
    }

    /// Replies to `messages` (dicts with "role" and "content") through the model's chat template, as
    /// `bitnet chat` does; the sampling arguments are generate()'s.
    #[pyo3(signature = (messages, max_tokens=128, temperature=0.8, top_k=40, top_p=0.95, min_p=0.05,
        repeat_penalty=1.0, repeat_last_n=64, seed=None, stop=None, stream=false))]
    #[allow(clippy::too_many_arguments)]
    fn chat(
        &self,
        py: Python<'_>,
        messages: Vec<Message>,
        max_tokens: usize,
        temperature: f32,
        top_k: usize,
        top_p: f32,
        min_p: f32,
        repeat_penalty: f32,
        repeat_last_n: usize,
        seed: Option<u64>,
        stop: Option<Stop>,
        stream: bool,
    ) -> PyResult<Py<PyAny>> {
        let sampler =
            SamplerParams { temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n, ..Default::default() };
        let params = gen_params(sampler, seed, max_tokens, stop)?;
        let messages: Vec<ChatMessage> = messages.into_iter().map(|m| ChatMessage::new(&m.role, &m.content)).collect();
        let tok = &self.m.tokenizer;
        let ids = py.detach(|| tok.encode_chat(&messages, true)).map_err(py_err)?;
        self.run(py, ids, params, stream)
    }

    /// Perplexity of `text` as `bitnet perplexity` (and llama-perplexity) computes it: windows of `ctx`
    /// tokens (default: the model's context), the second half of each scored.
    #[pyo3(signature = (text, ctx=None))]
    fn perplexity(&self, py: Python<'_>, text: &str, ctx: Option<usize>) -> PyResult<f64> {
        let m = &self.m;
        let mut interrupted = None;
        let score = py.detach(|| {
            let mut session = m.session_of(ctx.unwrap_or(m.ctx))?;
            // Between windows, a look for Ctrl+C (which needs the GIL back for a moment).
            perplexity(&mut session, &m.tokenizer, text, &mut |_| {
                interrupted = Python::attach(|py| py.check_signals().err());
                interrupted.is_none()
            })
        });
        match interrupted {
            Some(e) => Err(e),
            None => Ok(score.map_err(py_err)?.ppl()),
        }
    }

    /// What `bitnet info` prints about the model file: metadata, the engine's reading of it, tensors.
    #[getter]
    fn info(&self) -> &str {
        &self.info
    }

    /// The context size of each call's KV cache.
    #[getter]
    fn ctx(&self) -> usize {
        self.m.ctx
    }

    #[getter]
    fn n_vocab(&self) -> usize {
        self.m.weights.config().n_vocab
    }

    /// What runs the model, e.g. "cpu/avx2".
    #[getter]
    fn backend(&self) -> String {
        self.m.weights.name()
    }

    fn __repr__(&self) -> String {
        let c = self.m.weights.config();
        format!(
            "bitnet.Model({}, {} layers, vocab {}, ctx {}, {})",
            c.arch,
            c.n_layer,
            c.n_vocab,
            self.m.ctx,
            self.backend()
        )
    }
}

impl Model {
    /// Starts a generation of `ids`: a TextStream, or (stream=False) the whole text.
    fn run(&self, py: Python<'_>, ids: Vec<u32>, params: GenParams, stream: bool) -> PyResult<Py<PyAny>> {
        let m = self.m.clone();
        let run = py
            .detach(|| -> bitnet_engine::Result<Run> {
                let mut session = m.session()?;
                let gen = session.start(&ids, &params)?;
                Ok(Run { m, session, gen })
            })
            .map_err(py_err)?;
        let text = TextStream { run: Mutex::new(run), seed: params.sampler.seed };
        if stream {
            return Ok(Py::new(py, text)?.into_any());
        }
        let mut all = String::new();
        while let Some(piece) = text.next_piece(py)? {
            all.push_str(&piece);
        }
        Ok(all.into_pyobject(py)?.into_any().unbind())
    }
}

/// Where a generation is: its own KV cache and the engine's stepper.
struct Run {
    m: Arc<Loaded>,
    session: Session,
    gen: Generation,
}

/// The pieces of text a generation produces, one per `next()` (always whole UTF-8 characters, never part
/// of a stop string); joined, they are the text `generate(stream=False)` returns.
#[pyclass(frozen, module = "bitnet")]
struct TextStream {
    run: Mutex<Run>,
    /// The sampling seed (the one drawn from the clock when none was given).
    #[pyo3(get)]
    seed: u64,
}

impl TextStream {
    /// Steps until a token completes some text; None once the generation has stopped. Ctrl+C between
    /// tokens raises KeyboardInterrupt (and the generation can be resumed).
    fn next_piece(&self, py: Python<'_>) -> PyResult<Option<String>> {
        loop {
            // Before the step, so that an interrupt loses no text: the stream can be resumed.
            py.check_signals()?;
            let step = py.detach(|| {
                let mut guard = self.run.lock().unwrap_or_else(|e| e.into_inner());
                let Run { m, session, gen } = &mut *guard;
                session.step(gen, &m.tokenizer)
            });
            match step.map_err(py_err)? {
                Some(text) if text.is_empty() => continue,
                piece => return Ok(piece),
            }
        }
    }

    fn with_gen<T>(&self, f: impl FnOnce(&Generation) -> T) -> T {
        f(&self.run.lock().unwrap_or_else(|e| e.into_inner()).gen)
    }
}

#[pymethods]
impl TextStream {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<Option<String>> {
        self.next_piece(py)
    }

    /// Tokens generated so far.
    #[getter]
    fn n_generated(&self) -> usize {
        self.with_gen(|g| g.n_generated)
    }

    /// Why the generation stopped ("end_token", "stop_string", "max_tokens", "context_full"); None while
    /// it runs.
    #[getter]
    fn stop_reason(&self) -> Option<&'static str> {
        self.with_gen(|g| g.stop).map(|r| match r {
            StopReason::EndToken => "end_token",
            StopReason::StopString => "stop_string",
            StopReason::MaxTokens => "max_tokens",
            StopReason::ContextFull => "context_full",
            StopReason::Cancelled => "cancelled",
        })
    }
}

/// generate()'s `stop`: one string or several.
#[derive(FromPyObject)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

/// A chat message: a dict with "role" and "content".
#[derive(FromPyObject)]
#[pyo3(from_item_all)]
struct Message {
    role: String,
    content: String,
}

/// What to generate, checked as `bitnet run` checks it; no seed means one from the clock.
fn gen_params(sampler: SamplerParams, seed: Option<u64>, max_tokens: usize, stop: Option<Stop>) -> PyResult<GenParams> {
    let sampler = SamplerParams { seed: seed.unwrap_or_else(clock_seed), ..sampler };
    sampler.check().map_err(py_err)?;
    let stop = match stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) => v,
    };
    Ok(GenParams { max_tokens, stop, sampler })
}

#[pymodule]
fn _bitnet(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Model>()?;
    m.add_class::<TextStream>()?;
    m.add("BitnetError", m.py().get_type::<BitnetError>())?;
    Ok(())
}
