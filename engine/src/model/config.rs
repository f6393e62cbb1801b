//! The model's shape and choices, read from the GGUF metadata: sizes, activation, RoPE.

use std::fmt;

use crate::format::gguf::{GgufFile, Value};
use crate::{Error, Result};

/// The FFN's gate activation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// relu(x)², BitNet b1.58 2B4T and every model trained in its recipe.
    Relu2,
    /// x·sigmoid(x), the 1bitLLM `bitnet_b1_58` models.
    Silu,
}

impl Activation {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "relu2" | "relu_squared" | "relu²" => Some(Self::Relu2),
            "silu" | "swish" => Some(Self::Silu),
            _ => None,
        }
    }
}

impl fmt::Display for Activation {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(match self {
            Self::Relu2 => "relu2",
            Self::Silu => "silu",
        })
    }
}

/// The block a file's layers have, which tells the model family apart (`bitnet info` prints it and why).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// Microsoft's BitNet block, with `attn_sub_norm` and `ffn_sub_norm` before the o and down projections:
    /// BitNet b1.58 2B4T (relu², Llama 3 vocabulary) and 1bitLLM `bitnet_b1_58` (SiLU, LLaMA-2 SentencePiece).
    BitNet,
    /// A Llama block whose projections are BitLinear (HF `LlamaForCausalLM` with a `bitnet` quantization_config:
    /// Llama3-8B-1.58, Falcon3-*-1.58bit, Falcon-E): no sub-norms, SiLU, GGUF arch `llama` (whose q/k rows
    /// llama.cpp's converter permuted for its interleaved RoPE; the loader undoes it).
    LlamaTernary,
    /// Qwen3 (GGUF arch `qwen3`): a Llama block with per-head q/k RMSNorm, SwiGLU, NeoX RoPE; projections in
    /// any llama.cpp type, PrismML's 1-bit Q1_0 and ternary Q2_0 (Bonsai) included.
    Qwen3,
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(match self {
            Self::BitNet => "BitNet block (sub-norms)",
            Self::LlamaTernary => "Llama block with ternary projections (no sub-norms)",
            Self::Qwen3 => "Qwen3 block (q/k norms)",
        })
    }
}

impl Family {
    /// The family of a GGUF file, and why: its architecture name (the tensors it must have follow from it).
    pub fn detect(g: &GgufFile) -> Result<(Family, String)> {
        let arch = arch_name(g)?;
        if arch == "qwen3" {
            let why = match g.tensor("blk.0.attn_q_norm_in.weight") {
                Some(_) => {
                    "architecture qwen3 with *_norm_in tensors: a BitNet embedding model (BitLinear \
                            projections, each input RMSNormed; `bitnet embed` pools the last token)"
                }
                None => {
                    "architecture qwen3: GQA with per-head q/k RMSNorm, SwiGLU (projections Q1_0, Q2_0, Q8_0, \
                         float or ternary)"
                }
            };
            return Ok((Family::Qwen3, why.into()));
        }
        if arch == "llama" {
            let why = "architecture llama: a Llama block (ternary projections required: I2_S, TQ1_0, TQ2_0 or \
                       ternary-valued floats)";
            return Ok((Family::LlamaTernary, why.into()));
        }
        let vocab = match g.get("tokenizer.ggml.model").and_then(Value::as_str) {
            Some("llama") => ", SentencePiece vocabulary: 1bitLLM bitnet_b1_58 style",
            Some("gpt2") => ", byte-level BPE vocabulary: BitNet b1.58 2B4T style",
            _ => "",
        };
        Ok((Family::BitNet, format!("architecture {arch}: BitNet block with attn/ffn sub-norms{vocab}")))
    }
}

/// Choices a user can make at load time.
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// Overrides the FFN activation read or inferred from the file.
    pub activation: Option<Activation>,
}

/// Everything about the model's shape, read from the GGUF metadata.
#[derive(Clone, Debug)]
pub struct Config {
    pub arch: String,
    pub n_vocab: usize,
    pub n_ctx_train: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub rope_dim: usize,
    pub n_ff: usize,
    pub eps: f32,
    pub rope_base: f32,
    pub activation: Activation,
    /// Why this activation was chosen (metadata key, architecture, or vocabulary type).
    pub activation_reason: String,
}

impl Config {
    /// The width of the query projection (all heads).
    pub fn q_dim(&self) -> usize {
        self.n_head * self.head_dim
    }

    /// The width of the key and value projections (the KV heads).
    pub fn kv_dim(&self) -> usize {
        self.n_head_kv * self.head_dim
    }

    /// The widest activation a BitLinear reads (its input is quantized into a buffer this wide).
    pub fn widest(&self) -> usize {
        self.n_embd.max(self.q_dim()).max(self.n_ff)
    }

    /// The rotary table of positions `0..ctx`: `(cos, sin)`, each `[pos][rope_dim / 2]` (NeoX pairs).
    /// Every backend uploads or keeps this one table, so they rotate by the same floats.
    pub fn rope_table(&self, ctx: usize) -> (Vec<f32>, Vec<f32>) {
        let half = self.rope_dim / 2;
        let (mut cos, mut sin) = (vec![0f32; ctx * half], vec![0f32; ctx * half]);
        for p in 0..ctx {
            for j in 0..half {
                let inv_freq = (self.rope_base as f64).powf(-2.0 * j as f64 / self.rope_dim as f64);
                let angle = p as f64 * inv_freq;
                cos[p * half + j] = angle.cos() as f32;
                sin[p * half + j] = angle.sin() as f32;
            }
        }
        (cos, sin)
    }
}

const ARCHS: [&str; 5] = ["bitnet-b1.58", "bitnet-25", "bitnet", "llama", "qwen3"];

/// `general.architecture`, checked against the ones the engine runs.
fn arch_name(g: &GgufFile) -> Result<String> {
    let arch = md(g, "general.architecture")?
        .as_str()
        .ok_or_else(|| Error::Metadata { key: "general.architecture".into(), reason: "not a string".into() })?;
    if !ARCHS.contains(&arch) {
        return Err(Error::Unsupported(format!("architecture '{arch}' (supported: {})", ARCHS.join(", "))));
    }
    Ok(arch.to_string())
}

fn md<'a>(g: &'a GgufFile, key: &str) -> Result<&'a Value> {
    g.get(key).ok_or_else(|| Error::Metadata { key: key.into(), reason: "missing".into() })
}

fn md_usize(g: &GgufFile, key: &str) -> Result<usize> {
    let v = md(g, key)?;
    let n = v
        .as_u64()
        .ok_or_else(|| Error::Metadata { key: key.into(), reason: format!("expected an integer, found {v:?}") })?;
    usize::try_from(n)
        .ok()
        .filter(|&n| n > 0 && n < (1 << 31))
        .ok_or_else(|| Error::Metadata { key: key.into(), reason: format!("value {n} out of range") })
}

fn md_f32(g: &GgufFile, key: &str) -> Result<Option<f32>> {
    match g.get(key) {
        None => Ok(None),
        Some(v) => v
            .as_f64()
            .map(|x| Some(x as f32))
            .ok_or_else(|| Error::Metadata { key: key.into(), reason: format!("expected a number, found {v:?}") }),
    }
}

impl Config {
    pub fn from_gguf(g: &GgufFile, opts: &LoadOptions) -> Result<Self> {
        let arch = arch_name(g)?;
        let k = |s: &str| format!("{arch}.{s}");
        let n_embd = md_usize(g, &k("embedding_length"))?;
        let n_head = md_usize(g, &k("attention.head_count"))?;
        let n_head_kv = match g.get(&k("attention.head_count_kv")) {
            Some(_) => md_usize(g, &k("attention.head_count_kv"))?,
            None => n_head,
        };
        let head_dim = match g.get(&k("attention.key_length")) {
            Some(_) => md_usize(g, &k("attention.key_length"))?,
            None => n_embd / n_head,
        };
        let rope_dim = match g.get(&k("rope.dimension_count")) {
            Some(_) => md_usize(g, &k("rope.dimension_count"))?,
            None => head_dim,
        };
        if n_head % n_head_kv != 0 || head_dim % 2 != 0 || rope_dim > head_dim || rope_dim % 2 != 0 {
            return Err(Error::Unsupported(format!(
                "attention shape: {n_head} heads, {n_head_kv} kv heads, head dim {head_dim}, rope dim {rope_dim}"
            )));
        }
        let token_embd =
            g.tensor("token_embd.weight").ok_or_else(|| Error::MissingTensor("token_embd.weight".into()))?;
        let n_vocab = match g.get(&k("vocab_size")) {
            Some(_) => md_usize(g, &k("vocab_size"))?,
            None => token_embd.rows(),
        };
        check_rope_scaling(g, &arch)?;
        let (activation, activation_reason) = choose_activation(g, &arch, opts)?;
        Ok(Config {
            n_vocab,
            n_ctx_train: md_usize(g, &k("context_length"))?,
            n_embd,
            n_layer: md_usize(g, &k("block_count"))?,
            n_head,
            n_head_kv,
            head_dim,
            rope_dim,
            n_ff: md_usize(g, &k("feed_forward_length"))?,
            eps: md_f32(g, &k("attention.layer_norm_rms_epsilon"))?.unwrap_or(1e-5),
            rope_base: md_f32(g, &k("rope.freq_base"))?.unwrap_or(10000.0),
            activation,
            activation_reason,
            arch,
        })
    }
}

/// Microsoft's GGUFs have no activation key and mainline llama.cpp writes none either, so the
/// activation is inferred where the file does not say: `llama` files are LlamaForCausalLM (SiLU); a
/// SentencePiece vocabulary means the 1bitLLM `bitnet_b1_58` models (SiLU, whichever BitNet arch name the
/// converter wrote); otherwise `bitnet-b1.58` is relu² by definition, and for llama.cpp's `bitnet` a
/// byte-level BPE (Llama 3 family) vocabulary means a 2B4T-style relu² model.
fn choose_activation(g: &GgufFile, arch: &str, opts: &LoadOptions) -> Result<(Activation, String)> {
    if let Some(a) = opts.activation {
        return Ok((a, "set by the user".into()));
    }
    for key in [format!("{arch}.hidden_activation"), "bitnet.hidden_activation".to_string()] {
        if let Some(v) = g.get(&key) {
            let name = v.as_str().unwrap_or_default();
            let a = Activation::parse(name)
                .ok_or_else(|| Error::Metadata { key: key.clone(), reason: format!("unknown activation '{name}'") })?;
            return Ok((a, format!("metadata key {key}")));
        }
    }
    if arch == "llama" {
        return Ok((Activation::Silu, "architecture llama: LlamaForCausalLM's SiLU".into()));
    }
    if arch == "qwen3" {
        return Ok((Activation::Silu, "architecture qwen3: SwiGLU".into()));
    }
    let vocab = g.get("tokenizer.ggml.model").and_then(Value::as_str);
    if vocab == Some("llama") {
        return Ok((Activation::Silu, "no activation key; SentencePiece vocabulary means a bitnet_b1_58 model".into()));
    }
    if arch != "bitnet" {
        return Ok((Activation::Relu2, format!("architecture {arch} implies relu²")));
    }
    match vocab {
        Some("gpt2") => {
            Ok((Activation::Relu2, "no activation key; byte-level BPE vocabulary means a 2B4T-style model".into()))
        }
        Some("llama") => {
            Ok((Activation::Silu, "no activation key; SentencePiece vocabulary means a bitnet_b1_58 model".into()))
        }
        other => Err(Error::Unsupported(format!(
            "cannot infer the activation of arch 'bitnet' (tokenizer model {other:?}): pass --activation relu2|silu"
        ))),
    }
}

/// RoPE scaling (Llama 3.1's `rope_freqs.weight`, YaRN, linear factors other than 1) is not implemented: refuse it
/// rather than run the wrong positions. bitnet.cpp's converter writes linear scaling with factor 1 (none).
fn check_rope_scaling(g: &GgufFile, arch: &str) -> Result<()> {
    if g.tensor("rope_freqs.weight").is_some() {
        return Err(Error::Unsupported("RoPE frequency factors (rope_freqs.weight, Llama 3.1 style)".into()));
    }
    let kind = g.get(&format!("{arch}.rope.scaling.type")).and_then(Value::as_str).unwrap_or("none");
    let factor = md_f32(g, &format!("{arch}.rope.scaling.factor"))?.unwrap_or(1.0);
    if kind != "none" && !(kind == "linear" && factor == 1.0) {
        return Err(Error::Unsupported(format!("RoPE scaling '{kind}' with factor {factor}")));
    }
    Ok(())
}
