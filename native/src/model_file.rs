//! Opening a model: the embedded default or a memory-mapped GGUF file, with a progress bar for big ones.

use std::path::Path;

use std::sync::Arc;

use bitnet_engine::backend::{self, DeviceOptions, KvType, Weights};
use bitnet_engine::format::gguf::{GgufFile, Value};
use bitnet_engine::generate::Session;
use bitnet_engine::model::{LoadOptions, Model};
use bitnet_engine::text::tokenizer::Tokenizer;
use bitnet_engine::Error;

use crate::ModelArgs;

/// The default model, compiled into the binary so that `bitnet run -p ...` works with no download:
/// smolbit-135m, converted from `../shared/models/smolbit-135m` by `bitnet convert` (see README).
/// (Cargo feature `embedded-model`, on by default; without it the binary is 48 MB smaller and needs `-m`.)
#[cfg(feature = "embedded-model")]
static DEFAULT_MODEL: &[u8] = include_bytes!("../../engine/models/smolbit-135m.gguf");

/// The bytes of a GGUF file: mapped from disk, or the embedded model.
pub enum Bytes {
    Mapped(memmap2::Mmap),
    #[cfg(feature = "embedded-model")]
    Embedded(&'static [u8]),
}

impl std::ops::Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Mapped(m) => m,
            #[cfg(feature = "embedded-model")]
            Bytes::Embedded(b) => b,
        }
    }
}

pub fn open_bytes(path: Option<&Path>) -> Result<Bytes, Error> {
    #[cfg(feature = "embedded-model")]
    let Some(path) = path
    else {
        return Ok(Bytes::Embedded(DEFAULT_MODEL));
    };
    #[cfg(not(feature = "embedded-model"))]
    let Some(path) = path
    else {
        return Err(Error::Invalid("this bitnet was built without the embedded model: give one with -m".into()));
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

/// A model ready to run: its weights on the chosen device, and its tokenizer.
pub struct Loaded {
    pub weights: Arc<dyn Weights>,
    /// The KV cache type of its sequences.
    pub kv: KvType,
    pub tokenizer: Tokenizer,
    /// CPU threads.
    pub threads: usize,
    pub ctx: usize,
}

impl Loaded {
    pub fn open(a: &ModelArgs) -> Result<Self, Error> {
        let bytes = open_bytes(a.model.as_deref())?;
        let gguf = GgufFile::parse(&bytes)?;
        let tokenizer = Tokenizer::from_metadata(&gguf.metadata)?;
        let opts = LoadOptions { activation: a.activation };
        let bar = (bytes.len() > 200 << 20).then(|| {
            let bar = indicatif::ProgressBar::new(1);
            bar.set_style(
                indicatif::ProgressStyle::with_template("loading {bar:40} {pos}/{len} {msg}").expect("valid template"),
            );
            bar
        });
        let mut progress = |done: usize, total: usize| {
            if let Some(b) = &bar {
                b.set_length(total as u64);
                b.set_position(done as u64);
            }
        };
        let model = Model::load(&gguf, &bytes, &opts, &mut progress)?;
        if let Some(b) = bar {
            b.finish_and_clear();
        }
        let ctx = a.ctx.unwrap_or(model.config.n_ctx_train.min(4096));
        let threads = a.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        let device = DeviceOptions { device: a.backend.into(), threads: Some(threads), head: a.head, kv: a.kv_type };
        let weights = backend::open(model, &device)?;
        Ok(Self { weights, tokenizer, threads, ctx, kv: a.kv_type })
    }

    /// A new conversation (one KV cache of the context size).
    pub fn session(&self) -> Result<Session, Error> {
        self.check_memory(self.ctx, 1)?;
        Session::open(&self.weights, self.ctx)
    }

    /// Refuses, before allocating anything, `sequences` states of `ctx` tokens that need more memory than
    /// the machine has available (else a huge --ctx would allocate gigabytes and then abort).
    pub fn check_memory(&self, ctx: usize, sequences: usize) -> Result<(), Error> {
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

/// Memory available to a new allocation (Linux: MemAvailable of /proc/meminfo), None where unknown.
fn available_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// `bitnet info`: metadata, the choices the engine makes about the model, and the tensor table.
pub fn info(path: Option<&Path>) -> Result<(), Error> {
    let bytes = open_bytes(path)?;
    let g = GgufFile::parse(&bytes)?;
    println!(
        "GGUF v{}, {} bytes, {} metadata keys, {} tensors, alignment {}",
        g.version,
        bytes.len(),
        g.metadata.len(),
        g.tensors.len(),
        g.alignment
    );
    println!("\nmetadata:");
    for (k, v) in &g.metadata {
        println!("  {k:<45} {}", show_value(v));
    }
    match bitnet_engine::model::Config::from_gguf(&g, &LoadOptions::default()) {
        Ok(c) => {
            println!(
                "\nmodel: arch {}, {} layers, embd {}, ff {}, heads {}/{} (kv), head dim {}, vocab {}, context {}",
                c.arch, c.n_layer, c.n_embd, c.n_ff, c.n_head, c.n_head_kv, c.head_dim, c.n_vocab, c.n_ctx_train
            );
            if let Ok((family, why)) = bitnet_engine::model::Family::detect(&g) {
                println!("family: {family} ({why})");
            }
            println!("activation: {} ({})", c.activation, c.activation_reason);
            let per_token: Vec<String> = [KvType::F32, KvType::F16, KvType::Q8_0]
                .iter()
                .map(|t| format!("{} {} B", t.name(), t.bytes_per_token(&c)))
                .collect();
            println!("KV cache per token of context: {}", per_token.join(", "));
        }
        Err(e) => println!("\nmodel: not runnable: {e}"),
    }
    match Tokenizer::from_metadata(&g.metadata) {
        Ok(t) => println!(
            "tokenizer: {} ({}), {} tokens, pre-tokenizer {}, add BOS {}",
            t.model(),
            if t.model() == "llama" { "SentencePiece BPE" } else { "byte-level BPE" },
            t.vocab_size(),
            t.pre(),
            t.add_bos()
        ),
        Err(e) => println!("tokenizer: unusable: {e}"),
    }
    if let Ok(t) = Tokenizer::from_metadata(&g.metadata) {
        match t.template_choice() {
            (Some(template), why) => println!("chat template: {} bytes ({why})", template.len()),
            (None, why) => println!("chat template: {why}"),
        }
    }
    println!("\n{:<32} {:<6} {:<18} {:>12}", "tensor", "type", "shape", "bytes");
    for t in &g.tensors {
        println!("{:<32} {:<6} {:<18} {:>12}", t.name, t.ty.name(), format!("{:?}", t.dims), t.size);
    }
    Ok(())
}

/// A metadata value for humans: long strings and arrays are summarized.
fn show_value(v: &Value) -> String {
    match v {
        Value::Str(s) if s.len() > 80 => format!("{:?}... ({} bytes)", &s[..s.floor_char_boundary(60)], s.len()),
        Value::Str(s) => format!("{s:?}"),
        Value::Array(a) if a.len() > 8 => {
            let head: Vec<String> = a.iter().take(3).map(show_value).collect();
            format!("[{} items: {}, ...]", a.len(), head.join(", "))
        }
        Value::Array(a) => format!("[{}]", a.iter().map(show_value).collect::<Vec<_>>().join(", ")),
        Value::Bool(b) => b.to_string(),
        Value::F32(x) => x.to_string(),
        Value::F64(x) => x.to_string(),
        // The integer types; negative ones through f64, which holds every i32 exactly.
        other => {
            other.as_u64().map(|n| n.to_string()).or_else(|| other.as_f64().map(|x| x.to_string())).unwrap_or_default()
        }
    }
}
