//! A model ready to run, the way every native shell (the `bitnet` binary, the Python module) opens one:
//! the bytes of a GGUF file (memory-mapped, or the default model compiled in), its weights on the chosen
//! device, its tokenizer, and a memory check before each new KV cache.

use std::sync::Arc;

use crate::backend::{self, DeviceOptions, KvType, Weights};
use crate::format::gguf::GgufFile;
use crate::generate::Session;
use crate::model::{Config, LoadOptions, Model};
use crate::text::tokenizer::Tokenizer;
use crate::{Error, Result};

/// The default model, compiled in so that a shell runs with no model file: smolbit-135m, converted from
/// `../shared/models/smolbit-135m` by `bitnet convert` (see README). Cargo feature `embedded-model` (48 MB).
#[cfg(feature = "embedded-model")]
pub const EMBEDDED_MODEL: Option<&[u8]> = Some(include_bytes!("../models/smolbit-135m.gguf"));
#[cfg(not(feature = "embedded-model"))]
pub const EMBEDDED_MODEL: Option<&[u8]> = None;

/// The bytes of a GGUF file: mapped from disk, or the embedded model.
pub enum Bytes {
    #[cfg(not(target_arch = "wasm32"))]
    Mapped(memmap2::Mmap),
    Static(&'static [u8]),
}

impl std::ops::Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            #[cfg(not(target_arch = "wasm32"))]
            Bytes::Mapped(m) => m,
            Bytes::Static(b) => b,
        }
    }
}

/// The file at `path` mapped into memory, or the embedded model when there is no path.
#[cfg(not(target_arch = "wasm32"))]
pub fn open_bytes(path: Option<&std::path::Path>) -> Result<Bytes> {
    let Some(path) = path else {
        return EMBEDDED_MODEL
            .map(Bytes::Static)
            .ok_or_else(|| Error::Invalid("this build has no embedded model: give a model file".into()));
    };
    let file = std::fs::File::open(path).map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))?;
    // Said plainly here: mapping a directory or a device fails with "No such device".
    let meta = file.metadata().map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))?;
    if meta.is_dir() {
        return Err(Error::Invalid(format!("{} is a directory, not a GGUF file", path.display())));
    }
    if !meta.is_file() || meta.len() == 0 {
        let why = if meta.is_file() { "it is empty" } else { "not a regular file" };
        return Err(Error::Invalid(format!("{} is not a GGUF file ({why})", path.display())));
    }
    // SAFETY: the file is only read; if another process truncates it while mapped, reads fault, as with
    // any memory-mapped loader (llama.cpp does the same).
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))?;
    Ok(Bytes::Mapped(map))
}

/// How to open a model: the choices a user makes (flags of the binary, arguments in Python).
#[derive(Clone, Debug, Default)]
pub struct OpenOptions {
    /// Context size in tokens (default: the model's, at most 4096).
    pub ctx: Option<usize>,
    pub load: LoadOptions,
    /// The device, CPU threads (default: every CPU), LM head and KV cache type.
    pub device: DeviceOptions,
}

/// A model ready to run: its weights on the chosen device, and its tokenizer.
pub struct Loaded {
    pub weights: Arc<dyn Weights>,
    /// The KV cache type of its sequences.
    pub kv: KvType,
    pub tokenizer: Tokenizer,
    /// CPU threads.
    pub threads: usize,
    pub ctx: usize,
    /// An embedding model ([`Model::is_embedding`]): it embeds text and cannot generate it.
    pub embedding: bool,
}

impl Loaded {
    /// Loads the GGUF file in `bytes`; `progress(done, total)` follows the weights being read.
    pub fn load(bytes: &[u8], opts: &OpenOptions, progress: &mut dyn FnMut(usize, usize)) -> Result<Self> {
        let gguf = GgufFile::parse(bytes)?;
        let tokenizer = Tokenizer::from_metadata(&gguf.metadata)?;
        let model = Model::load(&gguf, bytes, &opts.load, progress)?;
        let ctx = opts.ctx.unwrap_or(default_ctx(&model.config));
        let embedding = model.is_embedding();
        let threads =
            opts.device.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        let device = DeviceOptions { threads: Some(threads), ..opts.device.clone() };
        let weights = backend::open(model, &device)?;
        Ok(Self { weights, tokenizer, threads, ctx, kv: device.kv, embedding })
    }

    /// A new conversation (one KV cache of the context size).
    pub fn session(&self) -> Result<Session> {
        self.session_of(self.ctx)
    }

    /// A new conversation with a KV cache of `ctx` tokens.
    pub fn session_of(&self, ctx: usize) -> Result<Session> {
        self.check_memory(ctx, 1)?;
        Session::open(&self.weights, ctx)
    }

    /// Refuses, before allocating anything, `sequences` states of `ctx` tokens that need more memory than
    /// the machine has available (else a huge context would allocate gigabytes and then abort).
    pub fn check_memory(&self, ctx: usize, sequences: usize) -> Result<()> {
        let c = self.weights.config();
        let per_sequence = backend::sequence_bytes(c, ctx.min(c.n_ctx_train), self.kv);
        let needed = per_sequence.and_then(|b| b.checked_mul(sequences as u64));
        match (needed, available_memory()) {
            (Some(needed), Some(available)) if needed <= available => Ok(()),
            (Some(_), None) => Ok(()), // unknown: let the allocation decide
            (needed, available) => Err(Error::Invalid(format!(
                "a context of {ctx} tokens ({sequences} sequence(s)) needs {} bytes of KV cache and RoPE tables, \
                 more than the {} bytes of memory available: lower --ctx",
                needed.map_or("over 2^64".into(), |n| n.to_string()),
                available.map_or("?".into(), |n| n.to_string()),
            ))),
        }
    }
}

/// The context a model runs with when none is asked for: its training context, at most 4096 tokens.
pub fn default_ctx(c: &Config) -> usize {
    c.n_ctx_train.min(4096)
}

/// Memory available to a new allocation (Linux: MemAvailable of /proc/meminfo), None where unknown.
fn available_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}
