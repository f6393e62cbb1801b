//! The BitNet b1.58 transformer (Microsoft's 2B4T architecture) as plain structs, loaded from GGUF.
//! Each backend runs the forward pass below over them (the CPU's is `backend::cpu::forward`).
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
//!
//! The Llama-architecture ternary family ([`Family::LlamaTernary`]) is the same block without the two sub-norms
//! (their vectors are empty): o and down read the attention output and `act(gate) * up` as they are.
//!
//! Qwen3 ([`Family::Qwen3`]) is that block with an RMSNorm over each head of q and of k (`attn_q_norm`,
//! `attn_k_norm`, one weight vector of head_dim shared by the heads) before RoPE, SwiGLU, and projections
//! stored as llama.cpp stores them (Q1_0, Q2_0, Q8_0, float: [`Linear::Ggml`]) or ternary. Microsoft's BitNet
//! embedding models are Qwen3 with ternary (I2_S) projections and an RMSNorm on each projection's input
//! (`Layer::norm_in`): `q = BitLinear_q(rmsnorm(h, attn_q_norm_in))` with h = rmsnorm(x, attn_norm), and so on.

pub mod config;

pub use config::{Activation, Config, Family, LoadOptions};

use crate::format::gguf::{GgufFile, TensorInfo};
use crate::format::quant;
use crate::tensor::float::FloatMatrix;
use crate::tensor::ternary::{llama_row_of_hf_row, TernaryMatrix};
use crate::tensor::Linear;
use crate::{Error, Result};

#[derive(Clone)]
pub struct Layer {
    pub attn_norm: Vec<f32>,
    /// Empty for a family without sub-norms ([`Family::LlamaTernary`]).
    pub attn_sub_norm: Vec<f32>,
    pub ffn_norm: Vec<f32>,
    /// Empty for a family without sub-norms ([`Family::LlamaTernary`]).
    pub ffn_sub_norm: Vec<f32>,
    /// Qwen3's per-head RMSNorm weights of q and k (head_dim each); empty for the other families.
    pub attn_q_norm: Vec<f32>,
    pub attn_k_norm: Vec<f32>,
    /// BitNet embedding models (a Qwen3 backbone with BitLinear projections): an RMSNorm on the input of each
    /// projection, in the order q, k, v, o, gate, up, down (`*_norm_in` tensors); empty otherwise.
    pub norm_in: Vec<Vec<f32>>,
    pub wq: Linear,
    pub wk: Linear,
    pub wv: Linear,
    pub wo: Linear,
    pub w_gate: Linear,
    pub w_up: Linear,
    pub w_down: Linear,
}

impl Layer {
    /// The seven projections (q, k, v, o, gate, up, down) if all are ternary: what the GPU backends run.
    pub fn ternary(&self) -> Option<[&TernaryMatrix; 7]> {
        let all = [&self.wq, &self.wk, &self.wv, &self.wo, &self.w_gate, &self.w_up, &self.w_down];
        let t = all.map(Linear::ternary);
        t.iter().all(Option::is_some).then(|| t.map(Option::unwrap))
    }
}

#[derive(Clone)]
pub struct Model {
    pub config: Config,
    pub family: Family,
    pub token_embd: FloatMatrix,
    /// The LM head when it is not tied to the embedding.
    pub output: Option<FloatMatrix>,
    pub output_norm: Vec<f32>,
    pub layers: Vec<Layer>,
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
        let (family, _) = Family::detect(g)?;
        let total = c.n_layer + 2;
        let token_embd = float_matrix(g, bytes, "token_embd.weight", c.n_embd, c.n_vocab)?;
        let output = match g.tensor("output.weight") {
            Some(_) => Some(float_matrix(g, bytes, "output.weight", c.n_embd, c.n_vocab)?),
            None => None,
        };
        let output_norm = vector(g, bytes, "output_norm.weight", c.n_embd)?;
        progress(1, total);
        let (q_dim, kv_dim) = (c.q_dim(), c.kv_dim());
        let mut layers = Vec::with_capacity(c.n_layer);
        let llama = family == Family::LlamaTernary;
        let qwen3 = family == Family::Qwen3;
        for i in 0..c.n_layer {
            let t = |n: &str, rows, cols| {
                let name = format!("blk.{i}.{n}");
                match qwen3 {
                    true => linear(g, bytes, &name, rows, cols),
                    false => ternary(g, bytes, &name, rows, cols, llama).map(Linear::Ternary),
                }
            };
            let v = |n: &str, len| vector(g, bytes, &format!("blk.{i}.{n}.weight"), len);
            let sub_norm = |n: &str, len| if family == Family::BitNet { v(n, len) } else { Ok(Vec::new()) };
            let qk_norm = |n: &str| if qwen3 { v(n, c.head_dim) } else { Ok(Vec::new()) };
            let norm_in = match g.tensor(&format!("blk.{i}.attn_q_norm_in.weight")) {
                Some(_) if qwen3 => NORM_IN
                    .iter()
                    .zip([c.n_embd, c.n_embd, c.n_embd, q_dim, c.n_embd, c.n_embd, c.n_ff])
                    .map(|(n, len)| v(n, len))
                    .collect::<Result<Vec<_>>>()?,
                _ => Vec::new(),
            };
            // llama.cpp's converter permuted q and k rows for its interleaved RoPE; back to NeoX order.
            let rope_rows = |m: Linear| match (llama, m) {
                (true, Linear::Ternary(m)) => Linear::Ternary(m.gather_rows(|h| llama_row_of_hf_row(h, c.head_dim))),
                (_, m) => m,
            };
            layers.push(Layer {
                attn_norm: v("attn_norm", c.n_embd)?,
                attn_sub_norm: sub_norm("attn_sub_norm", q_dim)?,
                ffn_norm: v("ffn_norm", c.n_embd)?,
                ffn_sub_norm: sub_norm("ffn_sub_norm", c.n_ff)?,
                attn_q_norm: qk_norm("attn_q_norm")?,
                attn_k_norm: qk_norm("attn_k_norm")?,
                norm_in,
                wq: rope_rows(t("attn_q", q_dim, c.n_embd)?),
                wk: rope_rows(t("attn_k", kv_dim, c.n_embd)?),
                wv: t("attn_v", kv_dim, c.n_embd)?,
                wo: t("attn_output", c.n_embd, q_dim)?,
                w_gate: t("ffn_gate", c.n_ff, c.n_embd)?,
                w_up: t("ffn_up", c.n_ff, c.n_embd)?,
                w_down: t("ffn_down", c.n_embd, c.n_ff)?,
            });
            progress(i + 2, total);
        }
        progress(total, total);
        Ok(Model { config: c, family, token_embd, output, output_norm, layers })
    }

    /// Whether the layers have attn/ffn sub-norms (the BitNet family).
    /// A BitNet embedding model (`*_norm_in` tensors): its output is a sentence embedding, not text.
    pub fn is_embedding(&self) -> bool {
        self.layers.first().is_some_and(|l| !l.norm_in.is_empty())
    }

    pub fn has_sub_norms(&self) -> bool {
        self.layers.iter().all(|l| !l.attn_sub_norm.is_empty() && !l.ffn_sub_norm.is_empty())
    }

    /// The LM head: `output.weight`, or the embedding when tied.
    pub fn lm_head(&self) -> &FloatMatrix {
        self.output.as_ref().unwrap_or(&self.token_embd)
    }
}

/// The per-projection input norms of BitNet embedding models (Microsoft's bitnet-embeddings GGUF names).
const NORM_IN: [&str; 7] = [
    "attn_q_norm_in",
    "attn_k_norm_in",
    "attn_v_norm_in",
    "attn_output_norm_in",
    "ffn_gate_norm_in",
    "ffn_up_norm_in",
    "ffn_down_norm_in",
];

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

/// A projection `{name}.weight` of a family whose projections need not be ternary (Qwen3): ternary storage
/// types run as BitLinear (BitNet embedding models), every other type as llama.cpp multiplies it.
fn linear(g: &GgufFile, bytes: &[u8], name: &str, rows: usize, cols: usize) -> Result<Linear> {
    let wname = format!("{name}.weight");
    let t = find(g, &wname)?;
    if crate::tensor::ternary::is_ternary_type(t.ty) {
        return ternary(g, bytes, name, rows, cols, true).map(Linear::Ternary);
    }
    check_shape(t, rows, cols)?;
    FloatMatrix::from_tensor(t, g.tensor_data(bytes, t)).map(Linear::Ggml)
}

/// A BitLinear weight `{name}.weight`, times the optional llama.cpp scale tensor `{name}.scale`.
/// `ternary_only`: float storage must hold ternary values already (an arch `llama` file with latent float
/// weights is an ordinary Llama model, which ternarizing would ruin).
fn ternary(
    g: &GgufFile,
    bytes: &[u8],
    name: &str,
    rows: usize,
    cols: usize,
    ternary_only: bool,
) -> Result<TernaryMatrix> {
    let wname = format!("{name}.weight");
    let t = find(g, &wname)?;
    check_shape(t, rows, cols)?;
    if ternary_only && !crate::tensor::ternary::holds_ternary(t.ty, g.tensor_data(bytes, t)) {
        return Err(Error::Tensor {
            tensor: wname,
            reason: format!(
                "{} weights that are not ternary: an arch 'llama' file runs here only as a BitNet b1.58 model",
                t.ty.name()
            ),
        });
    }
    let mut m = TernaryMatrix::from_tensor(t.ty, g.tensor_data(bytes, t), rows, cols)
        .map_err(|e| Error::Tensor { tensor: wname.clone(), reason: e.to_string() })?;
    let sname = format!("{name}.scale");
    if g.tensor(&sname).is_some() {
        m.scale *= vector(g, bytes, &sname, 1)?[0];
    }
    Ok(m)
}
