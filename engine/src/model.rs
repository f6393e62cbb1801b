//! The BitNet b1.58 transformer (Microsoft's 2B4T architecture) as plain structs and one forward pass.
//!
//! Per block, pre-norm Llama with two extra norms:
//! ```text
//! h = rmsnorm(x, attn_norm)
//! q, k, v = BitLinear(h); rope(q), rope(k)                  (NeoX pairs: i with i + head_dim/2)
//! x += BitLinear_o(rmsnorm(attention(q, k, v), attn_sub_norm))
//! h = rmsnorm(x, ffn_norm)
//! x += BitLinear_down(rmsnorm(act(BitLinear_gate(h)) * BitLinear_up(h), ffn_sub_norm))   act = relu² (or SiLU)
//! ```
//! then `logits = rmsnorm(x, output_norm) · Eᵀ`, where `E` is `output.weight` or the tied embedding.
//! BitLinear is exact W1.58A8: int8 per-token activations, ternary weights, one float scale per tensor.

use std::fmt;

use half::f16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

use crate::gguf::{GgufFile, TensorInfo, Value};
use crate::kernels::qhead::{HeadActivations, QuantHead};
use crate::kernels::{self, Kernels};
use crate::quant::{self, GgmlType};
use crate::ternary::TernaryMatrix;
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

/// A float matrix in its GGUF storage type (F32, F16, BF16 or a 32/256-block type), decoded row by row.
/// Used for the embedding and the LM head, which BitNet keeps in float.
pub struct FloatMatrix {
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
    pub row_bytes: usize,
    pub data: Vec<u8>,
}

impl FloatMatrix {
    fn from_tensor(t: &TensorInfo, data: &[u8]) -> Result<Self> {
        let (rows, cols) = (t.rows(), t.cols());
        let row_bytes = t.ty.row_bytes(cols).ok_or_else(|| Error::Tensor {
            tensor: t.name.clone(),
            reason: format!("type {} cannot be used for a float matrix of {cols} columns", t.ty.name()),
        })?;
        Ok(Self { ty: t.ty, rows, cols, row_bytes, data: data.to_vec() })
    }

    pub fn row(&self, r: usize) -> &[u8] {
        &self.data[r * self.row_bytes..(r + 1) * self.row_bytes]
    }

    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        // The type and row size were checked at load time, so decoding a row cannot fail.
        quant::dequantize(self.ty, self.row(r), &mut out[..self.cols]).expect("row checked at load");
    }

    /// A Q4_0 or Q5_0 matrix as Q8_0 with exactly the same values: each block of 32 keeps its f16 scale
    /// `d`, and its 4- or 5-bit codes become int8 (a value is `k·d` for a small integer `k`).
    pub fn repacked_q8_0(&self) -> FloatMatrix {
        assert!(matches!(self.ty, GgmlType::Q4_0 | GgmlType::Q5_0), "only Q4_0 and Q5_0 repack exactly");
        let block = self.ty.row_bytes(32).expect("a type of blocks of 32");
        let mut data = vec![0u8; self.data.len() / block * 34];
        data.par_chunks_mut(34).zip(self.data.par_chunks(block)).for_each(|(out, b)| {
            let mut v = [0f32; 32];
            quant::dequantize(self.ty, b, &mut v).expect("block checked at load");
            let d = half::f16::from_le_bytes([b[0], b[1]]).to_f32();
            out[..2].copy_from_slice(&b[..2]);
            for (q, v) in out[2..].iter_mut().zip(v) {
                // `v` is k·d, computed exactly in f32 (|k| ≤ 16), so v / d is k exactly.
                *q = if d == 0.0 { 0 } else { (v / d) as i8 as u8 };
            }
        });
        FloatMatrix { ty: GgmlType::Q8_0, rows: self.rows, cols: self.cols, row_bytes: self.cols / 32 * 34, data }
    }
}

pub struct Layer {
    pub attn_norm: Vec<f32>,
    pub attn_sub_norm: Vec<f32>,
    pub ffn_norm: Vec<f32>,
    pub ffn_sub_norm: Vec<f32>,
    pub wq: TernaryMatrix,
    pub wk: TernaryMatrix,
    pub wv: TernaryMatrix,
    pub wo: TernaryMatrix,
    pub w_gate: TernaryMatrix,
    pub w_up: TernaryMatrix,
    pub w_down: TernaryMatrix,
}

pub struct Model {
    pub config: Config,
    pub token_embd: FloatMatrix,
    /// The LM head when it is not tied to the embedding.
    pub output: Option<FloatMatrix>,
    pub output_norm: Vec<f32>,
    pub layers: Vec<Layer>,
    /// The LM head requantized for the int8 head kernels (`LoadOptions::head`); the CPU uses it
    /// instead of the float head when present.
    pub quant_head: Option<QuantHead>,
}

/// Choices a user can make at load time.
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// Overrides the FFN activation read or inferred from the file.
    pub activation: Option<Activation>,
    /// Requantizes the LM head to this type at load time (Q8_0, or Q6_K where rows are a multiple
    /// of 256): the head is most of the bytes a token reads, so decoding gets faster, for a small
    /// loss of accuracy. A tied head is the embedding, so the input embeddings change with it.
    pub head: Option<GgmlType>,
}

const ARCHS: [&str; 3] = ["bitnet-b1.58", "bitnet-25", "bitnet"];

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
        let arch = md(g, "general.architecture")?
            .as_str()
            .ok_or_else(|| Error::Metadata { key: "general.architecture".into(), reason: "not a string".into() })?
            .to_string();
        if !ARCHS.contains(&arch.as_str()) {
            return Err(Error::Unsupported(format!("architecture '{arch}' (supported: {})", ARCHS.join(", "))));
        }
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
/// activation is inferred where the file does not say: the `bitnet-b1.58` architecture is relu² by
/// definition; for llama.cpp's `bitnet`, a byte-level BPE (Llama 3 family) vocabulary means a 2B4T-style
/// relu² model and a SentencePiece vocabulary means the SiLU `bitnet_b1_58` models.
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
    if arch != "bitnet" {
        return Ok((Activation::Relu2, format!("architecture {arch} implies relu²")));
    }
    match g.get("tokenizer.ggml.model").and_then(Value::as_str) {
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

impl Model {
    /// Loads and repacks every tensor. `progress(done, total)` is called once per tensor group.
    pub fn load(
        g: &GgufFile,
        bytes: &[u8],
        opts: &LoadOptions,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Self> {
        let c = Config::from_gguf(g, opts)?;
        let total = c.n_layer + 2;
        let token_embd = float_matrix(g, bytes, "token_embd.weight", c.n_embd, c.n_vocab)?;
        let output = match g.tensor("output.weight") {
            Some(_) => Some(float_matrix(g, bytes, "output.weight", c.n_embd, c.n_vocab)?),
            None => None,
        };
        // Most kernel sets read a Q8_0 LM head fast but decode Q4_0/Q5_0 one piece at a time: for them,
        // the head is repacked to Q8_0, which holds the same values exactly (the default model's Q5_0
        // embedding decodes ~8x faster that way on AVX2, NEON and wasm SIMD128).
        let k = kernels::best();
        let for_kernels = |m: FloatMatrix| match m.ty {
            GgmlType::Q4_0 | GgmlType::Q5_0 if !k.reads_fast(m.ty) => m.repacked_q8_0(),
            _ => m,
        };
        let output = output.map(for_kernels);
        let token_embd = if output.is_none() { for_kernels(token_embd) } else { token_embd };
        let output_norm = vector(g, bytes, "output_norm.weight", c.n_embd)?;
        progress(1, total);
        let (q_dim, kv_dim) = (c.n_head * c.head_dim, c.n_head_kv * c.head_dim);
        let mut layers = Vec::with_capacity(c.n_layer);
        for i in 0..c.n_layer {
            let t = |n: &str, rows, cols| ternary(g, bytes, &format!("blk.{i}.{n}"), rows, cols);
            let v = |n: &str, len| vector(g, bytes, &format!("blk.{i}.{n}.weight"), len);
            layers.push(Layer {
                attn_norm: v("attn_norm", c.n_embd)?,
                attn_sub_norm: v("attn_sub_norm", q_dim)?,
                ffn_norm: v("ffn_norm", c.n_embd)?,
                ffn_sub_norm: v("ffn_sub_norm", c.n_ff)?,
                wq: t("attn_q", q_dim, c.n_embd)?,
                wk: t("attn_k", kv_dim, c.n_embd)?,
                wv: t("attn_v", kv_dim, c.n_embd)?,
                wo: t("attn_output", c.n_embd, q_dim)?,
                w_gate: t("ffn_gate", c.n_ff, c.n_embd)?,
                w_up: t("ffn_up", c.n_ff, c.n_embd)?,
                w_down: t("ffn_down", c.n_embd, c.n_ff)?,
            });
            progress(i + 2, total);
        }
        let mut model = Model { config: c, token_embd, output, output_norm, layers, quant_head: None };
        if let Some(ty) = opts.head {
            model.requantize_head(ty)?;
        }
        progress(total, total);
        Ok(model)
    }

    /// Encodes the LM head as `ty` (ggml's Q8_0 or Q6_K quantizer, rows in parallel) in the layout of
    /// the int8 head kernels. The float head stays for the embedding and for other backends.
    fn requantize_head(&mut self, ty: GgmlType) -> Result<()> {
        let head = self.lm_head();
        let (rows, cols) = (head.rows, head.cols);
        let row_bytes = QuantHead::ggml_row_bytes(ty, cols)?;
        let mut ggml = vec![0u8; rows * row_bytes];
        ggml.par_chunks_mut(row_bytes).enumerate().try_for_each_init(
            || vec![0f32; cols],
            |row, (r, out)| {
                head.dequantize_row(r, row);
                out.copy_from_slice(&quant::quantize(ty, row)?);
                Ok::<_, Error>(())
            },
        )?;
        self.quant_head = Some(QuantHead::from_ggml(ty, rows, cols, &ggml)?);
        Ok(())
    }

    /// The LM head: `output.weight`, or the embedding when tied.
    pub fn lm_head(&self) -> &FloatMatrix {
        self.output.as_ref().unwrap_or(&self.token_embd)
    }
}

fn find<'a>(g: &'a GgufFile, name: &str) -> Result<&'a TensorInfo> {
    g.tensor(name).ok_or_else(|| Error::MissingTensor(name.into()))
}

fn check_shape(t: &TensorInfo, rows: usize, cols: usize) -> Result<()> {
    let ok = t.dims.len() <= 2 && t.cols() == cols && t.rows() == rows;
    if ok {
        return Ok(());
    }
    Err(Error::Tensor { tensor: t.name.clone(), reason: format!("shape {:?}, expected [{cols}, {rows}]", t.dims) })
}

fn float_matrix(g: &GgufFile, bytes: &[u8], name: &str, cols: usize, rows: usize) -> Result<FloatMatrix> {
    let t = find(g, name)?;
    check_shape(t, rows, cols)?;
    FloatMatrix::from_tensor(t, g.tensor_data(bytes, t))
}

/// A norm weight (or a scale): any float type, decoded to f32.
fn vector(g: &GgufFile, bytes: &[u8], name: &str, len: usize) -> Result<Vec<f32>> {
    let t = find(g, name)?;
    if t.n_elements() != len as u64 {
        return Err(Error::Tensor { tensor: name.into(), reason: format!("shape {:?}, expected [{len}]", t.dims) });
    }
    let mut out = vec![0f32; len];
    quant::dequantize(t.ty, g.tensor_data(bytes, t), &mut out)
        .map_err(|e| Error::Tensor { tensor: name.into(), reason: e.to_string() })?;
    Ok(out)
}

/// A BitLinear weight `{name}.weight`, times the optional llama.cpp scale tensor `{name}.scale`.
fn ternary(g: &GgufFile, bytes: &[u8], name: &str, rows: usize, cols: usize) -> Result<TernaryMatrix> {
    let wname = format!("{name}.weight");
    let t = find(g, &wname)?;
    check_shape(t, rows, cols)?;
    let mut m = TernaryMatrix::from_tensor(t.ty, g.tensor_data(bytes, t), rows, cols)
        .map_err(|e| Error::Tensor { tensor: wname.clone(), reason: e.to_string() })?;
    let sname = format!("{name}.scale");
    if g.tensor(&sname).is_some() {
        m.scale *= vector(g, bytes, &sname, 1)?[0];
    }
    Ok(m)
}

/// One sequence: its KV cache, RoPE tables and next-token logits. The working buffers of the forward
/// pass live in a [`BatchScratch`], which any number of sequences can share.
pub struct State {
    pub ctx: usize,
    kv_dim: usize,
    // [layer][pos][kv_dim], keys after RoPE. Stored as f16, as llama.cpp's default cache and our CUDA
    // backend do: half the memory, and half the bytes each token's attention reads at long contexts.
    k_cache: Vec<f16>,
    v_cache: Vec<f16>,
    rope_cos: Vec<f32>, // [pos][rope_dim / 2]
    rope_sin: Vec<f32>,
    pub logits: Vec<f32>,
}

impl State {
    /// Bytes of memory a state of `ctx` tokens takes (KV cache, RoPE tables, logits), None if that does not
    /// fit in a u64: what a caller checks against the memory there is before making one.
    pub fn bytes(c: &Config, ctx: usize) -> Option<u64> {
        let kv_dim = (c.n_head_kv as u64).checked_mul(c.head_dim as u64)?;
        // Keys and values, f16 each.
        let kv = (c.n_layer as u64).checked_mul(ctx as u64)?.checked_mul(kv_dim)?.checked_mul(2 * 2)?;
        // Cosines and sines, f32 each.
        let rope = (ctx as u64).checked_mul(c.rope_dim as u64 / 2)?.checked_mul(2 * 4)?;
        kv.checked_add(rope)?.checked_add((c.n_vocab as u64).checked_mul(4)?)
    }

    /// A cache of `ctx` tokens (at most the trained context).
    pub fn new(c: &Config, ctx: usize) -> Result<Self> {
        if ctx == 0 || ctx > c.n_ctx_train {
            return Err(Error::Invalid(format!("context {ctx} must be between 1 and the model's {}", c.n_ctx_train)));
        }
        // Every size below is a factor of this one, so none of them overflows once it fits in usize.
        if Self::bytes(c, ctx).and_then(|b| usize::try_from(b).ok()).is_none() {
            return Err(Error::Invalid(format!("a context of {ctx} tokens needs more memory than can be addressed")));
        }
        let kv_dim = c.n_head_kv * c.head_dim;
        let half = c.rope_dim / 2;
        let (mut rope_cos, mut rope_sin) = (vec![0f32; ctx * half], vec![0f32; ctx * half]);
        for p in 0..ctx {
            for j in 0..half {
                let inv_freq = (c.rope_base as f64).powf(-2.0 * j as f64 / c.rope_dim as f64);
                let angle = p as f64 * inv_freq;
                rope_cos[p * half + j] = angle.cos() as f32;
                rope_sin[p * half + j] = angle.sin() as f32;
            }
        }
        let kv = c.n_layer * ctx * kv_dim;
        Ok(State {
            ctx,
            kv_dim,
            k_cache: vec![f16::ZERO; kv],
            v_cache: vec![f16::ZERO; kv],
            rope_cos,
            rope_sin,
            logits: vec![0f32; c.n_vocab],
        })
    }

    /// Keys and values of layer `l`: `[pos][kv_dim]`.
    fn layer_kv(&self, l: usize) -> (&[f16], &[f16]) {
        let n = self.ctx * self.kv_dim;
        (&self.k_cache[l * n..(l + 1) * n], &self.v_cache[l * n..(l + 1) * n])
    }

    /// Stores a position's keys and values, rounded to the nearest f16.
    fn store_kv(&mut self, l: usize, pos: usize, k: &[f32], v: &[f32]) {
        let at = (l * self.ctx + pos) * self.kv_dim;
        self.k_cache[at..at + self.kv_dim].convert_from_f32_slice(k);
        self.v_cache[at..at + self.kv_dim].convert_from_f32_slice(v);
    }

    fn rope(&self, pos: usize) -> (&[f32], &[f32]) {
        let half = self.rope_cos.len() / self.ctx;
        (&self.rope_cos[pos * half..(pos + 1) * half], &self.rope_sin[pos * half..(pos + 1) * half])
    }
}

/// One sequence's share of a [`Model::forward_batch`] call: `tokens` at positions
/// `pos..pos + tokens.len()` of `state`'s cache (later positions are forgotten). With `want_logits`,
/// `state.logits` afterwards holds the next-token logits of the last token.
pub struct BatchItem<'a> {
    pub state: &'a mut State,
    pub tokens: &'a [u32],
    pub pos: usize,
    pub want_logits: bool,
}

/// A token of the tile in flight: which item it belongs to, and where.
struct Row {
    item: usize,
    token: u32,
    pos: usize,
    logits: bool,
}

/// The working buffers of [`Model::forward_batch`] for a tile of up to `tile` tokens, each row of
/// each buffer one token. Made once; nothing is allocated per token.
pub struct BatchScratch {
    tile: usize,
    dims: [usize; 4], // n_embd, q_dim, kv_dim, n_ff: the model this was made for
    rows: Vec<Row>,
    x: Vec<f32>,                  // [tile][n_embd] the residual stream
    xn: Vec<f32>,                 // [tile][widest] normed activations (and BitLinear outputs)
    xq: Vec<i8>,                  // [tile][padded widest] their int8 quantization
    sx: Vec<f32>,                 // [tile] the quantization scales
    q: Vec<f32>,                  // [tile][q_dim]
    k: Vec<f32>,                  // [tile][kv_dim]
    v: Vec<f32>,                  // [tile][kv_dim]
    att: Vec<f32>,                // [tile][q_dim] attention outputs
    gate: Vec<f32>,               // [tile][n_ff]
    up: Vec<f32>,                 // [tile][n_ff]
    acc: Vec<i32>,                // [tile][rows of the matrices of one `bitlinear`] integer accumulators, in row chunks
    logits: Vec<f32>,             // [tokens wanting logits][n_vocab] (grown on first use)
    head_x: Vec<HeadActivations>, // per token wanting logits, for a quantized head (grown on first use)
}

impl BatchScratch {
    /// Buffers for tiles of up to `tile` tokens (at least 1). Bigger tiles read the weights fewer
    /// times per prompt; one token is all a single sequence's decoding needs.
    pub fn new(c: &Config, tile: usize) -> Self {
        let tile = tile.max(1);
        let (q_dim, kv_dim) = (c.n_head * c.head_dim, c.n_head_kv * c.head_dim);
        let widest = c.n_embd.max(q_dim).max(c.n_ff);
        let padded = widest.div_ceil(128) * 128;
        BatchScratch {
            tile,
            dims: [c.n_embd, q_dim, kv_dim, c.n_ff],
            rows: Vec::with_capacity(tile),
            x: vec![0f32; tile * c.n_embd],
            xn: vec![0f32; tile * widest],
            xq: vec![0i8; tile * padded],
            sx: vec![0f32; tile],
            q: vec![0f32; tile * q_dim],
            k: vec![0f32; tile * kv_dim],
            v: vec![0f32; tile * kv_dim],
            att: vec![0f32; tile * q_dim],
            gate: vec![0f32; tile * c.n_ff],
            up: vec![0f32; tile * c.n_ff],
            acc: vec![0i32; tile * (q_dim + 2 * kv_dim).max(2 * c.n_ff).max(widest)],
            logits: Vec::new(),
            head_x: Vec::new(),
        }
    }
}

/// Rows per rayon task: a few tasks per thread so that uneven cores still finish together.
fn rows_per_task(rows: usize) -> usize {
    (rows / (rayon::current_num_threads() * 4)).max(16)
}

/// BitLinear of the matrices `ws`, which share their input (q, k and v; gate and up), for the `n`
/// tokens of a tile: `ys[j][t] = (ws[j]·xq[t]) / s[t] · ws[j].scale`, with `xq` rows of
/// `padded_cols()` and `ys[j]` rows of `ws[j].rows`. All their rows are one parallel loop, so the
/// threads meet once per input, not once per matrix. Threads take chunks of rows; each chunk's
/// accumulators come back token-major inside the chunk (`Kernels::ternary_gemm`'s layout).
fn bitlinear<const M: usize>(
    k: &dyn Kernels,
    ws: [&TernaryMatrix; M],
    xq: &[i8],
    s: &[f32],
    n: usize,
    acc: &mut [i32],
    ys: [&mut [f32]; M],
) {
    let mut rest = acc;
    let accs = ws.map(|w| {
        let (acc, r) = std::mem::take(&mut rest).split_at_mut(n * w.rows);
        rest = r;
        acc
    });
    let xq = &xq[..n * ws[0].padded_cols()];
    ws.into_par_iter().zip(accs).zip(ys).for_each(|((w, acc), y)| {
        let chunk = rows_per_task(w.rows);
        acc.par_chunks_mut(chunk * n).enumerate().for_each(|(i, o)| {
            let start = i * chunk;
            k.ternary_gemm(w, start..start + o.len() / n, xq, n, o);
        });
        for (i, o) in acc.chunks(chunk * n).enumerate() {
            let len = o.len() / n;
            for t in 0..n {
                let y = &mut y[t * w.rows + i * chunk..][..len];
                for (y, &a) in y.iter_mut().zip(&o[t * len..(t + 1) * len]) {
                    *y = a as f32 / s[t] * w.scale;
                }
            }
        }
    });
}

fn rmsnorm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    // Σ x² in 16 lanes, which vectorizes; a single running sum is a chain of dependent additions.
    let mut lanes = [0f32; 16];
    for c in x.chunks(16) {
        lanes.iter_mut().zip(c).for_each(|(l, v)| *l += v * v);
    }
    let ms = lanes.iter().sum::<f32>() / x.len() as f32;
    let inv = 1.0 / (ms + eps).sqrt();
    for ((o, &v), &w) in out.iter_mut().zip(x).zip(w) {
        *o = w * (v * inv);
    }
}

/// RMSNorm then per-token int8 quantization of the `n` rows of `x` (each `w.len()` long) into rows of
/// `stride` in `xq`, each with its own scale in `s`; `tmp` holds the normed rows.
#[allow(clippy::too_many_arguments)]
fn norm_quantize(
    x: &[f32],
    w: &[f32],
    eps: f32,
    n: usize,
    tmp: &mut [f32],
    xq: &mut [i8],
    stride: usize,
    s: &mut [f32],
) {
    let d = w.len();
    for t in 0..n {
        let normed = &mut tmp[t * d..(t + 1) * d];
        rmsnorm(&x[t * d..(t + 1) * d], w, eps, normed);
        s[t] = kernels::quantize_activations(normed, &mut xq[t * stride..(t + 1) * stride]);
    }
}

/// NeoX-style rotary embedding of one head: element i pairs with i + rope_dim/2. The halves are zipped, so
/// the loop has no bounds checks and the compiler may vectorize it.
fn rope(head: &mut [f32], cos: &[f32], sin: &[f32]) {
    let (lo, hi) = head.split_at_mut(cos.len());
    for (((a, b), &c), &s) in lo.iter_mut().zip(hi).zip(cos).zip(sin) {
        (*a, *b) = (*a * c - *b * s, *b * c + *a * s);
    }
}

impl Model {
    /// Runs a batch through the network: each item's tokens at its own positions of its own cache.
    /// One call serves both (a) a prompt: one item, many consecutive tokens (causal within the call),
    /// and (b) one decoding step of many sequences: many items, one token each. Tokens are run in
    /// tiles of up to `scratch`'s size, so each weight matrix is read once per tile, not per token;
    /// every token is quantized with its own scale, so results do not depend on the tiling.
    pub fn forward_batch(
        &self,
        k: &dyn Kernels,
        scratch: &mut BatchScratch,
        items: &mut [BatchItem<'_>],
    ) -> Result<()> {
        self.check_batch(scratch, items)?;
        let (mut item, mut i) = (0, 0); // the next token to run: items[item].tokens[i]
        while item < items.len() {
            scratch.rows.clear();
            while scratch.rows.len() < scratch.tile && item < items.len() {
                let it = &items[item];
                let last = i + 1 == it.tokens.len();
                scratch.rows.push(Row { item, token: it.tokens[i], pos: it.pos + i, logits: last && it.want_logits });
                (item, i) = if last { (item + 1, 0) } else { (item, i + 1) };
            }
            self.forward_tile(k, scratch, items);
        }
        Ok(())
    }

    fn check_batch(&self, scratch: &BatchScratch, items: &[BatchItem<'_>]) -> Result<()> {
        let c = &self.config;
        let (q_dim, kv_dim) = (c.n_head * c.head_dim, c.n_head_kv * c.head_dim);
        if scratch.dims != [c.n_embd, q_dim, kv_dim, c.n_ff] {
            return Err(Error::Invalid("the batch scratch was made for another model".into()));
        }
        for it in items {
            let s = &it.state;
            if s.kv_dim != kv_dim || s.k_cache.len() != c.n_layer * s.ctx * kv_dim || s.logits.len() != c.n_vocab {
                return Err(Error::Invalid("a state was made for another model".into()));
            }
            if it.tokens.is_empty() {
                return Err(Error::Invalid("a batch item has no tokens".into()));
            }
            if it.pos + it.tokens.len() > s.ctx {
                return Err(Error::ContextFull { needed: it.pos + it.tokens.len(), ctx: s.ctx });
            }
            if let Some(&t) = it.tokens.iter().find(|&&t| t as usize >= self.token_embd.rows) {
                return Err(Error::Invalid(format!(
                    "token id {t} is outside the vocabulary of {}",
                    self.token_embd.rows
                )));
            }
        }
        Ok(())
    }

    /// Every layer for the tokens in `s.rows`, then the LM head for those that want logits.
    fn forward_tile(&self, k: &dyn Kernels, s: &mut BatchScratch, items: &mut [BatchItem<'_>]) {
        let c = &self.config;
        let n = s.rows.len();
        let [d, q_dim, kv_dim, n_ff] = s.dims;
        let hd = c.head_dim;
        for (x, row) in s.x.chunks_exact_mut(d).zip(&s.rows) {
            self.token_embd.dequantize_row(row.token as usize, x);
        }
        for (l, w) in self.layers.iter().enumerate() {
            // Attention.
            norm_quantize(&s.x, &w.attn_norm, c.eps, n, &mut s.xn, &mut s.xq, w.wq.padded_cols(), &mut s.sx);
            bitlinear(k, [&w.wq, &w.wk, &w.wv], &s.xq, &s.sx, n, &mut s.acc, [&mut s.q, &mut s.k, &mut s.v]);
            for (t, row) in s.rows.iter().enumerate() {
                let state = &mut *items[row.item].state;
                let (q, kk) = (&mut s.q[t * q_dim..(t + 1) * q_dim], &mut s.k[t * kv_dim..(t + 1) * kv_dim]);
                let (cos, sin) = state.rope(row.pos);
                for head in q.chunks_exact_mut(hd).chain(kk.chunks_exact_mut(hd)) {
                    rope(&mut head[..c.rope_dim], cos, sin);
                }
                state.store_kv(l, row.pos, kk, &s.v[t * kv_dim..(t + 1) * kv_dim]);
            }
            attention(k, c, l, &s.rows, items, &s.q, &mut s.att[..n * q_dim]);
            norm_quantize(&s.att, &w.attn_sub_norm, c.eps, n, &mut s.xn, &mut s.xq, w.wo.padded_cols(), &mut s.sx);
            bitlinear(k, [&w.wo], &s.xq, &s.sx, n, &mut s.acc, [&mut s.xn]);
            s.x[..n * d].iter_mut().zip(&s.xn).for_each(|(x, o)| *x += o);

            // Feed-forward.
            norm_quantize(&s.x, &w.ffn_norm, c.eps, n, &mut s.xn, &mut s.xq, w.w_gate.padded_cols(), &mut s.sx);
            bitlinear(k, [&w.w_gate, &w.w_up], &s.xq, &s.sx, n, &mut s.acc, [&mut s.gate, &mut s.up]);
            for (g, &u) in s.gate[..n * n_ff].iter_mut().zip(&s.up) {
                let a = match c.activation {
                    Activation::Relu2 => g.max(0.0) * g.max(0.0),
                    Activation::Silu => *g / (1.0 + (-*g).exp()),
                };
                *g = a * u;
            }
            norm_quantize(&s.gate, &w.ffn_sub_norm, c.eps, n, &mut s.xn, &mut s.xq, w.w_down.padded_cols(), &mut s.sx);
            bitlinear(k, [&w.w_down], &s.xq, &s.sx, n, &mut s.acc, [&mut s.xn]);
            s.x[..n * d].iter_mut().zip(&s.xn).for_each(|(x, o)| *x += o);
        }
        self.head(k, s, items);
    }

    /// The logits of the tile's tokens that want them, the head's rows read once for all of them.
    fn head(&self, k: &dyn Kernels, s: &mut BatchScratch, items: &mut [BatchItem<'_>]) {
        let d = self.config.n_embd;
        let mut m = 0;
        for (t, row) in s.rows.iter().enumerate() {
            if row.logits {
                rmsnorm(&s.x[t * d..(t + 1) * d], &self.output_norm, self.config.eps, &mut s.xn[m * d..(m + 1) * d]);
                m += 1;
            }
        }
        if m == 0 {
            return;
        }
        let head = self.lm_head();
        s.logits.resize(m * head.rows, 0.0); // grows once, to the largest batch seen
        let chunk = rows_per_task(head.rows);
        let xn = &s.xn[..m * d];
        if let Some(qh) = &self.quant_head {
            s.head_x.resize_with(m.max(s.head_x.len()), HeadActivations::default);
            for (a, x) in s.head_x.iter_mut().zip(xn.chunks_exact(d)) {
                a.quantize(qh, x);
            }
            let acts = &s.head_x[..m];
            s.logits.par_chunks_mut(chunk * m).enumerate().for_each(|(i, o)| {
                let (start, len) = (i * chunk, o.len() / m);
                for (a, o) in acts.iter().zip(o.chunks_exact_mut(len)) {
                    k.quant_head_rows(qh, start..start + len, a, o);
                }
            });
        } else {
            s.logits.par_chunks_mut(chunk * m).enumerate().for_each(|(i, o)| {
                let start = i * chunk;
                k.float_gemm(head, start..start + o.len() / m, xn, m, o);
            });
        }
        for (t, row) in s.rows.iter().filter(|r| r.logits).enumerate() {
            let dst = &mut items[row.item].state.logits;
            for (i, o) in s.logits.chunks(chunk * m).enumerate() {
                let len = o.len() / m;
                dst[i * chunk..i * chunk + len].copy_from_slice(&o[t * len..(t + 1) * len]);
            }
        }
    }
}

/// Causal attention for every (token, head) of the tile, in parallel: each token attends to its own
/// sequence's cache up to its own position (the tile's earlier tokens of the same sequence included:
/// their keys and values are already stored).
fn attention(
    k: &dyn Kernels,
    c: &Config,
    layer: usize,
    rows: &[Row],
    items: &[BatchItem<'_>],
    q: &[f32],
    out: &mut [f32],
) {
    let (hd, group) = (c.head_dim, c.n_head / c.n_head_kv);
    let kv_dim = c.n_head_kv * hd;
    let scale = 1.0 / (hd as f32).sqrt();
    out.par_chunks_mut(hd).enumerate().for_each(|(i, out)| {
        let row = &rows[i / c.n_head];
        let kv_off = (i % c.n_head / group) * hd; // GQA: `group` query heads share one kv head
        let (keys, values) = items[row.item].state.layer_kv(layer);
        attend(k, &q[i * hd..(i + 1) * hd], &keys[kv_off..], &values[kv_off..], kv_dim, row.pos + 1, scale, out);
    });
}

/// One head: `out = softmax(q·Kᵀ·scale)·V` over the first `n` cached positions (key and value `t` are
/// the rows at `t·stride`), with a two-pass softmax (max, then exponentials) as in the PyTorch
/// reference (a vectorized `exp` measured no faster: the exponentials are a few % of the time). The scores
/// live in a per-thread buffer that grows to the longest context seen, so nothing is allocated per token.
/// Public for the benchmarks.
#[allow(clippy::too_many_arguments)]
pub fn attend(
    k: &dyn Kernels,
    q: &[f32],
    keys: &[f16],
    values: &[f16],
    stride: usize,
    n: usize,
    scale: f32,
    out: &mut [f32],
) {
    thread_local!(static SCORES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) });
    SCORES.with_borrow_mut(|scores| {
        scores.resize(n.max(scores.len()), 0.0);
        let scores = &mut scores[..n];
        k.attn_scores(q, keys, stride, scores);
        scores.iter_mut().for_each(|a| *a *= scale);
        let max = scores.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let mut sum = 0.0;
        for a in scores.iter_mut() {
            *a = (*a - max).exp();
            sum += *a;
        }
        scores.iter_mut().for_each(|a| *a /= sum);
        out.fill(0.0);
        k.attn_values(scores, values, stride, out);
    });
}
