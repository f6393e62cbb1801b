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

use rayon::prelude::*;

use crate::gguf::{GgufFile, TensorInfo, Value};
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
}

/// Choices a user can make at load time.
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// Overrides the FFN activation read or inferred from the file.
    pub activation: Option<Activation>,
}

const ARCHS: [&str; 3] = ["bitnet-b1.58", "bitnet-25", "bitnet"];

fn md<'a>(g: &'a GgufFile, key: &str) -> Result<&'a Value> {
    g.get(key).ok_or_else(|| Error::Metadata { key: key.into(), reason: "missing".into() })
}

fn md_usize(g: &GgufFile, key: &str) -> Result<usize> {
    let v = md(g, key)?;
    let n = v.as_u64().ok_or_else(|| Error::Metadata { key: key.into(), reason: format!("expected an integer, found {v:?}") })?;
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
        let token_embd = g.tensor("token_embd.weight").ok_or_else(|| Error::MissingTensor("token_embd.weight".into()))?;
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
        Some("gpt2") => Ok((Activation::Relu2, "no activation key; byte-level BPE vocabulary means a 2B4T-style model".into())),
        Some("llama") => Ok((Activation::Silu, "no activation key; SentencePiece vocabulary means a bitnet_b1_58 model".into())),
        other => Err(Error::Unsupported(format!(
            "cannot infer the activation of arch 'bitnet' (tokenizer model {other:?}): pass --activation relu2|silu"
        ))),
    }
}

impl Model {
    /// Loads and repacks every tensor. `progress(done, total)` is called once per tensor group.
    pub fn load(g: &GgufFile, bytes: &[u8], opts: &LoadOptions, progress: &mut dyn FnMut(usize, usize)) -> Result<Self> {
        let c = Config::from_gguf(g, opts)?;
        let total = c.n_layer + 2;
        let token_embd = float_matrix(g, bytes, "token_embd.weight", c.n_embd, c.n_vocab)?;
        let output = match g.tensor("output.weight") {
            Some(_) => Some(float_matrix(g, bytes, "output.weight", c.n_embd, c.n_vocab)?),
            None => None,
        };
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
        progress(total, total);
        Ok(Model { config: c, token_embd, output, output_norm, layers })
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
    quant::dequantize(t.ty, g.tensor_data(bytes, t), &mut out).map_err(|e| Error::Tensor { tensor: name.into(), reason: e.to_string() })?;
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

/// One sequence's KV cache and the scratch buffers of the forward pass: nothing is allocated per token.
pub struct State {
    pub ctx: usize,
    k_cache: Vec<f32>, // [layer][pos][n_head_kv * head_dim]
    v_cache: Vec<f32>,
    rope_cos: Vec<f32>, // [pos][rope_dim / 2]
    rope_sin: Vec<f32>,
    x: Vec<f32>,
    xn: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    att: Vec<f32>,    // [n_head][ctx] attention weights
    att_out: Vec<f32>, // [n_head * head_dim]
    gate: Vec<f32>,
    up: Vec<f32>,
    xq: Vec<i8>,
    acc: Vec<i32>,
    pub logits: Vec<f32>,
}

impl State {
    /// Buffers for a context of `ctx` tokens (at most the trained context).
    pub fn new(c: &Config, ctx: usize) -> Result<Self> {
        if ctx == 0 || ctx > c.n_ctx_train {
            return Err(Error::Invalid(format!("context {ctx} must be between 1 and the model's {}", c.n_ctx_train)));
        }
        let kv = c.n_layer * ctx * c.n_head_kv * c.head_dim;
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
        let q_dim = c.n_head * c.head_dim;
        let widest = c.n_embd.max(q_dim).max(c.n_ff);
        let padded = widest.div_ceil(128) * 128;
        Ok(State {
            ctx,
            k_cache: vec![0f32; kv],
            v_cache: vec![0f32; kv],
            rope_cos,
            rope_sin,
            x: vec![0f32; c.n_embd],
            xn: vec![0f32; widest],
            q: vec![0f32; q_dim],
            k: vec![0f32; c.n_head_kv * c.head_dim],
            v: vec![0f32; c.n_head_kv * c.head_dim],
            att: vec![0f32; c.n_head * ctx],
            att_out: vec![0f32; q_dim],
            gate: vec![0f32; c.n_ff],
            up: vec![0f32; c.n_ff],
            xq: vec![0i8; padded],
            acc: vec![0i32; widest.max(q_dim)],
            logits: vec![0f32; c.n_vocab],
        })
    }
}

/// Rows per rayon task: a few tasks per thread so that uneven cores still finish together.
fn rows_per_task(rows: usize) -> usize {
    (rows / (rayon::current_num_threads() * 4)).max(16)
}

/// `out = W·x` for int8 `xq`, as i32 accumulators, split over threads by rows.
fn ternary_matvec(k: &dyn Kernels, w: &TernaryMatrix, xq: &[i8], out: &mut [i32]) {
    let chunk = rows_per_task(w.rows);
    out[..w.rows].par_chunks_mut(chunk).enumerate().for_each(|(i, o)| {
        let start = i * chunk;
        k.ternary_rows(w, start..start + o.len(), xq, o);
    });
}

/// BitLinear on activations already quantized with scale `s`: `y = acc / s · scale`.
fn bitlinear(k: &dyn Kernels, w: &TernaryMatrix, xq: &[i8], s: f32, acc: &mut [i32], y: &mut [f32]) {
    ternary_matvec(k, w, &xq[..w.padded_cols()], acc);
    for (y, &a) in y.iter_mut().zip(&acc[..w.rows]) {
        *y = a as f32 / s * w.scale;
    }
}

fn rmsnorm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let inv = 1.0 / (ms + eps).sqrt();
    for ((o, &v), &w) in out.iter_mut().zip(x).zip(w) {
        *o = w * (v * inv);
    }
}

/// NeoX-style rotary embedding of one head: element i pairs with i + rope_dim/2.
fn rope(head: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = cos.len();
    for j in 0..half {
        let (a, b) = (head[j], head[j + half]);
        head[j] = a * cos[j] - b * sin[j];
        head[j + half] = b * cos[j] + a * sin[j];
    }
}

fn softmax(x: &mut [f32]) {
    let max = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let mut sum = 0.0;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    for v in x.iter_mut() {
        *v /= sum;
    }
}

impl Model {
    /// Runs one token at position `pos` through the network, filling the KV cache at `pos`.
    /// With `want_logits`, `s.logits` holds the next-token logits afterwards (the LM head is
    /// the most expensive matrix, so prompt tokens whose logits nobody reads skip it).
    pub fn forward(&self, k: &dyn Kernels, s: &mut State, token: u32, pos: usize, want_logits: bool) -> Result<()> {
        let c = &self.config;
        if token as usize >= self.token_embd.rows {
            return Err(Error::Invalid(format!("token id {token} is outside the vocabulary of {}", self.token_embd.rows)));
        }
        if pos >= s.ctx {
            return Err(Error::ContextFull { needed: pos + 1, ctx: s.ctx });
        }
        self.token_embd.dequantize_row(token as usize, &mut s.x);
        let (hd, kv_dim) = (c.head_dim, c.n_head_kv * c.head_dim);
        let half = c.rope_dim / 2;
        let (cos, sin) = (&s.rope_cos[pos * half..(pos + 1) * half], &s.rope_sin[pos * half..(pos + 1) * half]);
        for (l, w) in self.layers.iter().enumerate() {
            // Attention.
            rmsnorm(&s.x, &w.attn_norm, c.eps, &mut s.xn[..c.n_embd]);
            let sx = kernels::quantize_activations(&s.xn[..c.n_embd], &mut s.xq[..w.wq.padded_cols()]);
            bitlinear(k, &w.wq, &s.xq, sx, &mut s.acc, &mut s.q);
            bitlinear(k, &w.wk, &s.xq, sx, &mut s.acc, &mut s.k);
            bitlinear(k, &w.wv, &s.xq, sx, &mut s.acc, &mut s.v);
            for head in s.q.chunks_exact_mut(hd).chain(s.k.chunks_exact_mut(hd)) {
                rope(&mut head[..c.rope_dim], cos, sin);
            }
            let layer_kv = l * s.ctx * kv_dim;
            s.k_cache[layer_kv + pos * kv_dim..][..kv_dim].copy_from_slice(&s.k);
            s.v_cache[layer_kv + pos * kv_dim..][..kv_dim].copy_from_slice(&s.v);
            let (kc, vc) = (&s.k_cache[layer_kv..], &s.v_cache[layer_kv..]);
            attention(c, &s.q, kc, vc, &mut s.att, &mut s.att_out, pos);
            let q_dim = s.att_out.len();
            rmsnorm(&s.att_out, &w.attn_sub_norm, c.eps, &mut s.xn[..q_dim]);
            let sx = kernels::quantize_activations(&s.xn[..q_dim], &mut s.xq[..w.wo.padded_cols()]);
            bitlinear(k, &w.wo, &s.xq, sx, &mut s.acc, &mut s.xn[..c.n_embd]);
            s.x.iter_mut().zip(&s.xn).for_each(|(x, d)| *x += d);

            // Feed-forward.
            rmsnorm(&s.x, &w.ffn_norm, c.eps, &mut s.xn[..c.n_embd]);
            let sx = kernels::quantize_activations(&s.xn[..c.n_embd], &mut s.xq[..w.w_gate.padded_cols()]);
            bitlinear(k, &w.w_gate, &s.xq, sx, &mut s.acc, &mut s.gate);
            bitlinear(k, &w.w_up, &s.xq, sx, &mut s.acc, &mut s.up);
            for (g, &u) in s.gate.iter_mut().zip(&s.up) {
                let a = match c.activation {
                    Activation::Relu2 => g.max(0.0) * g.max(0.0),
                    Activation::Silu => *g / (1.0 + (-*g).exp()),
                };
                *g = a * u;
            }
            rmsnorm(&s.gate, &w.ffn_sub_norm, c.eps, &mut s.xn[..c.n_ff]);
            let sx = kernels::quantize_activations(&s.xn[..c.n_ff], &mut s.xq[..w.w_down.padded_cols()]);
            bitlinear(k, &w.w_down, &s.xq, sx, &mut s.acc, &mut s.xn[..c.n_embd]);
            s.x.iter_mut().zip(&s.xn).for_each(|(x, d)| *x += d);
        }
        if want_logits {
            rmsnorm(&s.x, &self.output_norm, c.eps, &mut s.xn[..c.n_embd]);
            let head = self.lm_head();
            let chunk = rows_per_task(head.rows);
            let xn = &s.xn[..c.n_embd];
            s.logits.par_chunks_mut(chunk).enumerate().for_each(|(i, o)| {
                let start = i * chunk;
                k.float_rows(head, start..start + o.len(), xn, o);
            });
        }
        Ok(())
    }
}

/// Causal attention of the token at `pos` over one layer's cache, heads in parallel.
/// `k_cache`/`v_cache` hold `[pos][n_head_kv * head_dim]`; `att` is `[n_head][ctx]` scratch.
fn attention(c: &Config, q: &[f32], k_cache: &[f32], v_cache: &[f32], att: &mut [f32], out: &mut [f32], pos: usize) {
    let (hd, kv_dim, group) = (c.head_dim, c.n_head_kv * c.head_dim, c.n_head / c.n_head_kv);
    let scale = 1.0 / (hd as f32).sqrt();
    let ctx = att.len() / c.n_head;
    out.par_chunks_mut(hd).zip(att.par_chunks_mut(ctx)).enumerate().for_each(|(h, (out, att))| {
        let qh = &q[h * hd..(h + 1) * hd];
        let kv_off = (h / group) * hd; // GQA: `group` query heads share one kv head
        let att = &mut att[..=pos];
        for (t, a) in att.iter_mut().enumerate() {
            let kh = &k_cache[t * kv_dim + kv_off..][..hd];
            *a = qh.iter().zip(kh).map(|(a, b)| a * b).sum::<f32>() * scale;
        }
        softmax(att);
        out.fill(0.0);
        for (t, &a) in att.iter().enumerate() {
            let vh = &v_cache[t * kv_dim + kv_off..][..hd];
            out.iter_mut().zip(vh).for_each(|(o, v)| *o += a * v);
        }
    });
}
