//! Hugging Face BitNet checkpoints to GGUF ([`convert`]), and GGUF to GGUF with other weight types ([`requantize`]).
//!
//! Everything works on byte slices (the native shell memory-maps the files), so conversion also runs in a browser.
//! Tensors are converted one at a time: at most one tensor is decoded to codes or floats at any moment.
//!
//! # BitLinear weights in a checkpoint
//! Three layouts are recognised, per tensor, from the weight's dtype:
//! - `uint8` (out/4, in): the packed "offline" layout of `microsoft/bitnet-b1.58-2B-4T` (transformers'
//!   `pack_weights`): 4 rows per byte, R = out/4 apart: `t[j·R + r, c] = ((byte[r, c] >> 2j) & 3) - 1`.
//! - `int8` (out, in): unpacked codes in {-1, 0, 1}.
//! - `float32`/`float16`/`bfloat16` (out, in): master weights, or weights already ternary-valued ({-s, 0, s});
//!   decoded by [`TernaryMatrix::from_tensor`] (absmean ternarization for master weights).
//!
//! Codes stored as integers come with a `{name}_scale` tensor (`weight_scale`, f32/bf16/f16, one value). Its
//! meaning follows the class named by `quantization_config.linear_class`: transformers' `BitLinear`
//! ("bitlinear", also assumed when the key is absent) DIVIDES by it (W = t / weight_scale), its `AutoBitLinear`
//! ("autobitlinear") MULTIPLIES. The GGUF multiplier is then `f32(1 / f64(weight_scale))` or `weight_scale`.

use std::collections::HashMap;

use half::f16;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde_json::Value as Json;

use crate::format::gguf::{GgufFile, GgufWriter, Value};
use crate::format::quant::{self, GgmlType};
use crate::tensor::ternary::{hf_row_of_llama_row, TernaryMatrix};
use crate::{Error, Result};

/// The architecture our converter writes for 2B4T-style (relu²) I2_S models: Microsoft's name, for which
/// bitnet.cpp runs its relu² graph.
pub const ARCH: &str = "bitnet-b1.58";

/// The architecture name each family's reference engine expects (written by `convert` and `quantize`):
/// - a Llama block with ternary projections (Llama3-8B-1.58, Falcon3, Falcon-E): `llama`, as llama.cpp's converter
///   writes them;
/// - a relu² BitNet block (2B4T) stored as I2_S: `bitnet-b1.58` (bitnet.cpp's `bitnet` graph is SiLU);
/// - otherwise `bitnet`: SiLU models (1bitLLM, whose arch this is in both llama.cpp and bitnet.cpp), and relu² ones
///   stored as TQ1_0/TQ2_0, which only llama.cpp reads and only under `bitnet` (mainline llama.cpp ignores
///   `bitnet.hidden_activation` and runs SiLU: such files are right for this engine, not for llama.cpp).
///
/// Every BitNet-block file also gets `<arch>.hidden_activation`, so no reader has to infer it.
pub fn target_arch(llama_block: bool, relu2: bool, ternary: GgmlType) -> &'static str {
    match (llama_block, relu2, ternary) {
        (true, _, _) => "llama",
        (false, true, GgmlType::I2_S) => ARCH,
        _ => "bitnet",
    }
}
/// Architectures whose `blk.N.{attn_q, ...}` tensors are BitLinear weights.
const BITNET_ARCHS: [&str; 4] = ["bitnet-b1.58", "bitnet-25", "bitnet", "llama"];
/// The seven BitLinear projections of a block: (GGUF name, HF name).
const PROJECTIONS: [(&str, &str); 7] = [
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
];
/// Elements converted at a time when re-encoding a float matrix (bounds the f32 scratch copy).
const CHUNK_ELEMENTS: usize = 1 << 20;

/// The files of a Hugging Face checkpoint folder, as bytes.
pub struct HfCheckpoint<'a> {
    pub config_json: &'a str,
    pub tokenizer: HfTokenizer<'a>,
    pub tokenizer_config_json: Option<&'a str>,
    /// `model.safetensors`, or every shard listed by `model.safetensors.index.json` (any order).
    pub shards: &'a [&'a [u8]],
}

/// The tokenizer file of a checkpoint folder: tokenizer.json, or else a SentencePiece `tokenizer.model`.
#[derive(Clone, Copy)]
pub enum HfTokenizer<'a> {
    Json(&'a str),
    SentencePiece(&'a [u8]),
}

#[derive(Clone, Debug)]
pub struct ConvertOptions {
    /// Storage of the BitLinear weights: I2_S, TQ2_0 or TQ1_0.
    pub ternary: GgmlType,
    /// Storage of the embedding and of an untied LM head: F16, BF16, F32, Q8_0, Q6_K, Q5_0, Q4_0 or Q4_K.
    pub embd: GgmlType,
    /// Convert models whose config does not declare BitNet (their float weights get ternarized).
    pub force: bool,
    /// `general.name` (default: "bitnet").
    pub name: Option<String>,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions { ternary: GgmlType::I2_S, embd: GgmlType::F16, force: false, name: None }
    }
}

/// A converted model, ready to be written ([`GgufWriter::write_to`] or [`GgufWriter::to_bytes`]), and what the
/// user should know about it.
pub struct Converted {
    pub gguf: GgufWriter,
    pub warnings: Vec<String>,
}

fn err(msg: impl Into<String>) -> Error {
    Error::Convert(msg.into())
}

fn tensor_err(name: &str, e: impl std::fmt::Display) -> Error {
    err(format!("tensor '{name}': {e}"))
}

/// `general.file_type` (llama.cpp's `llama_ftype`) of a model whose BitLinear weights are `ty`.
fn file_type(ty: GgmlType) -> u32 {
    match ty {
        GgmlType::TQ1_0 => 36,
        GgmlType::TQ2_0 => 37,
        _ => 40, // I2_S, as Microsoft's bitnet.cpp writes it
    }
}

fn check_types(ternary: GgmlType, embd: Option<GgmlType>) -> Result<()> {
    if !matches!(ternary, GgmlType::I2_S | GgmlType::TQ2_0 | GgmlType::TQ1_0) {
        return Err(err(format!("{} is not a ternary type (i2_s, tq2_0, tq1_0)", ternary.name())));
    }
    if let Some(e) = embd {
        if matches!(e, GgmlType::I2_S | GgmlType::TQ2_0 | GgmlType::TQ1_0) {
            return Err(err(format!("the embedding cannot be stored as {} (it is not ternary)", e.name())));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------------
// config.json

/// The model shape and conventions read from config.json.
#[derive(Debug)]
struct HfConfig {
    n_vocab: usize,
    n_embd: usize,
    n_ff: usize,
    n_layer: usize,
    n_head: usize,
    n_head_kv: usize,
    head_dim: usize,
    n_ctx: usize,
    eps: f64,
    rope_base: f64,
    activation: &'static str,
    tied: bool,
    /// model_type llama (LlamaForCausalLM with a bitnet quantization_config, or a float Llama with --force).
    llama: bool,
    /// weight_scale divides (transformers' BitLinear) rather than multiplies (AutoBitLinear).
    scale_divides: bool,
}

fn parse_config(text: &str, force: bool) -> Result<HfConfig> {
    let j: Json = serde_json::from_str(text).map_err(|e| err(format!("config.json: {e}")))?;
    let model_type = j["model_type"].as_str().unwrap_or_default();
    let archs: Vec<&str> = j["architectures"].as_array().into_iter().flatten().filter_map(Json::as_str).collect();
    let qc = &j["quantization_config"];
    let quant_method = qc["quant_method"].as_str();
    let is_bitnet = model_type == "bitnet";
    if !is_bitnet && model_type != "llama" {
        return Err(err(format!(
            "unknown architecture: model_type '{model_type}' (architectures {archs:?}); supported: bitnet, and llama with --force"
        )));
    }
    if quant_method.is_some_and(|m| m != "bitnet") {
        return Err(err(format!("quantization method {quant_method:?} is not supported (only 'bitnet')")));
    }
    // A config that says BitNet is trusted; anything else is a float model that would be ternarized.
    let declared =
        is_bitnet || quant_method == Some("bitnet") || archs.iter().any(|a| a.to_lowercase().starts_with("bitnet"));
    if !declared && !force {
        return Err(err(format!(
            "config.json does not declare a BitNet model (model_type '{model_type}', architectures {archs:?}, no \
             quantization_config.quant_method 'bitnet'): ternarizing its float weights would change the model; \
             pass --force to do it anyway"
        )));
    }
    if j["rope_scaling"].is_object() || j["rope_parameters"]["rope_type"].as_str().is_some_and(|t| t != "default") {
        return Err(err("RoPE scaling is not supported"));
    }
    if j["attention_bias"].as_bool() == Some(true) || j["mlp_bias"].as_bool() == Some(true) {
        return Err(err("biases are not supported (BitNet has none)"));
    }
    let linear_class = qc["linear_class"].as_str().unwrap_or("bitlinear");
    let scale_divides = match linear_class {
        "bitlinear" => true,
        "autobitlinear" => false,
        other => return Err(err(format!("unknown quantization_config.linear_class '{other}'"))),
    };
    let size = |key: &str| -> Result<usize> {
        let v = &j[key];
        v.as_u64()
            .filter(|&n| n > 0)
            .map(|n| n as usize)
            .ok_or_else(|| err(format!("config.json: '{key}' should be a positive integer, found {v}")))
    };
    let opt_size = |key: &str, default: usize| if j[key].is_null() { Ok(default) } else { size(key) };
    // Keys left out of config.json take transformers' defaults for the model type.
    let (eps, rope_base, act) = if is_bitnet { (1e-5, 500000.0, "relu2") } else { (1e-6, 10000.0, "silu") };
    let (n_embd, n_head) = (size("hidden_size")?, size("num_attention_heads")?);
    let activation = match j["hidden_act"].as_str().unwrap_or(act) {
        "relu2" => "relu2",
        "silu" => "silu",
        other => return Err(err(format!("hidden_act '{other}' is not supported (relu2 or silu)"))),
    };
    let c = HfConfig {
        n_vocab: size("vocab_size")?,
        n_embd,
        n_ff: size("intermediate_size")?,
        n_layer: size("num_hidden_layers")?,
        n_head,
        n_head_kv: opt_size("num_key_value_heads", n_head)?,
        head_dim: opt_size("head_dim", n_embd / n_head)?,
        n_ctx: opt_size("max_position_embeddings", 2048)?,
        eps: j["rms_norm_eps"].as_f64().unwrap_or(eps),
        rope_base: j["rope_theta"].as_f64().or(j["rope_parameters"]["rope_theta"].as_f64()).unwrap_or(rope_base),
        activation,
        tied: j["tie_word_embeddings"].as_bool().unwrap_or(false),
        llama: !is_bitnet,
        scale_divides,
    };
    if !c.n_head.is_multiple_of(c.n_head_kv) || !c.head_dim.is_multiple_of(2) {
        return Err(err(format!(
            "attention shape: {} heads, {} kv heads, head dim {}",
            c.n_head, c.n_head_kv, c.head_dim
        )));
    }
    Ok(c)
}

fn metadata(c: &HfConfig, arch: &str, name: &str, ternary: GgmlType) -> Vec<(String, Value)> {
    let k = |s: &str| format!("{arch}.{s}");
    let u = |n: usize| Value::U32(n as u32);
    let mut md = vec![
        ("general.architecture".into(), Value::Str(arch.into())),
        ("general.name".into(), Value::Str(name.into())),
        ("general.file_type".into(), Value::U32(file_type(ternary))),
        ("general.quantization_version".into(), Value::U32(2)),
        (k("vocab_size"), u(c.n_vocab)),
        (k("context_length"), u(c.n_ctx)),
        (k("embedding_length"), u(c.n_embd)),
        (k("block_count"), u(c.n_layer)),
        (k("feed_forward_length"), u(c.n_ff)),
        (k("attention.head_count"), u(c.n_head)),
        (k("attention.head_count_kv"), u(c.n_head_kv)),
        (k("attention.key_length"), u(c.head_dim)),
        (k("attention.value_length"), u(c.head_dim)),
        (k("rope.dimension_count"), u(c.head_dim)),
        (k("rope.freq_base"), Value::F32(c.rope_base as f32)),
        (k("attention.layer_norm_rms_epsilon"), Value::F32(c.eps as f32)),
    ];
    if arch != "llama" {
        md.push((k("hidden_activation"), Value::Str(c.activation.into())));
    }
    md
}

// ---------------------------------------------------------------------------------------------------------------
// Checkpoint → GGUF

/// The tensors of every shard by name; each is taken out once when converted, so leftovers can be reported.
struct Tensors<'a>(HashMap<String, TensorView<'a>>);

impl<'a> Tensors<'a> {
    fn new(shards: &[&'a [u8]]) -> Result<Self> {
        let mut all = HashMap::new();
        for (i, bytes) in shards.iter().enumerate() {
            let st = SafeTensors::deserialize(bytes).map_err(|e| err(format!("safetensors shard #{i}: {e}")))?;
            for (name, view) in st.tensors() {
                if all.insert(name.clone(), view).is_some() {
                    return Err(err(format!("tensor '{name}' appears in more than one shard")));
                }
            }
        }
        Ok(Tensors(all))
    }

    fn take(&mut self, name: &str) -> Result<TensorView<'a>> {
        self.0.remove(name).ok_or_else(|| err(format!("missing tensor '{name}'")))
    }

    /// The first of `names` present (checkpoints differ in the sub-norms' names).
    fn take_any(&mut self, names: &[String]) -> Result<(String, TensorView<'a>)> {
        for n in names {
            if let Some(v) = self.0.remove(n) {
                return Ok((n.clone(), v));
            }
        }
        Err(err(format!("missing tensor '{}'", names.join("' or '"))))
    }
}

/// The ggml float type with the same bytes as a safetensors float dtype.
fn float_type(name: &str, v: &TensorView) -> Result<GgmlType> {
    match v.dtype() {
        Dtype::F32 => Ok(GgmlType::F32),
        Dtype::F16 => Ok(GgmlType::F16),
        Dtype::BF16 => Ok(GgmlType::BF16),
        d => Err(tensor_err(name, format!("dtype {d:?} where a float tensor was expected"))),
    }
}

fn check_shape(name: &str, v: &TensorView, shape: &[usize]) -> Result<()> {
    if v.shape() != shape {
        return Err(tensor_err(name, format!("shape {:?}, expected {shape:?}", v.shape())));
    }
    Ok(())
}

/// Re-encode a row-major float matrix (`cols` a multiple of `to`'s block) from `from` to `to`, a chunk of rows at a
/// time. Same type: the bytes are copied.
fn recode_floats(name: &str, data: &[u8], from: GgmlType, to: GgmlType, cols: usize) -> Result<Vec<u8>> {
    if from == to {
        return Ok(data.to_vec());
    }
    let bad_row = |t: GgmlType| {
        tensor_err(name, format!("rows of {cols} elements are not whole {} blocks of {}", t.name(), t.block_size()))
    };
    let (src_row, dst_row) =
        (from.row_bytes(cols).ok_or_else(|| bad_row(from))?, to.row_bytes(cols).ok_or_else(|| bad_row(to))?);
    let rows_per_chunk = (CHUNK_ELEMENTS / cols).max(1);
    let mut out = Vec::with_capacity(data.len() / src_row * dst_row);
    let mut buf = vec![0f32; rows_per_chunk * cols];
    for chunk in data.chunks(rows_per_chunk * src_row) {
        let x = &mut buf[..chunk.len() / src_row * cols];
        quant::dequantize(from, chunk, x).map_err(|e| tensor_err(name, e))?;
        out.extend(quant::quantize(to, x).map_err(|e| tensor_err(name, e))?);
    }
    Ok(out)
}

/// A norm weight as F32.
fn norm(name: &str, v: &TensorView, len: usize) -> Result<Vec<u8>> {
    check_shape(name, v, &[len])?;
    recode_floats(name, v.data(), float_type(name, v)?, GgmlType::F32, len)
}

/// The one value of a `weight_scale` tensor.
fn scalar(name: &str, v: &TensorView) -> Result<f32> {
    if v.shape().iter().product::<usize>() != 1 {
        return Err(tensor_err(name, format!("shape {:?}, expected one value", v.shape())));
    }
    let mut x = [0f32];
    quant::dequantize(float_type(name, v)?, v.data(), &mut x).map_err(|e| tensor_err(name, e))?;
    Ok(x[0])
}

/// Codes t[j·R + r, c] = ((byte[r, c] >> 2j) & 3) - 1 of the packed (rows/4, cols) layout, row-major.
fn unpack_codes(name: &str, data: &[u8], rows: usize, cols: usize) -> Result<Vec<i8>> {
    let r_stride = rows / 4;
    let mut codes = vec![0i8; rows * cols];
    for (k, &b) in data.iter().enumerate() {
        let (r, c) = (k / cols, k % cols);
        for j in 0..4 {
            let u = (b >> (2 * j)) & 3;
            if u == 3 {
                return Err(tensor_err(
                    name,
                    format!("packed byte {b:#04x} at ({r}, {c}) holds the invalid 2-bit value 3"),
                ));
            }
            codes[(j * r_stride + r) * cols + c] = u as i8 - 1;
        }
    }
    Ok(codes)
}

/// A BitLinear weight of `rows` (out) × `cols` (in), in any of the checkpoint layouts (see the module docs).
fn ternary_matrix(t: &mut Tensors, c: &HfConfig, hf: &str, rows: usize, cols: usize) -> Result<TernaryMatrix> {
    let name = format!("{hf}.weight");
    let w = t.take(&name)?;
    let scale_name = format!("{hf}.weight_scale");
    let scale = t.0.remove(&scale_name);
    let (codes, scale) = match (w.dtype(), scale) {
        (Dtype::F32 | Dtype::F16 | Dtype::BF16, None) => {
            check_shape(&name, &w, &[rows, cols])?;
            let m = TernaryMatrix::from_tensor(float_type(&name, &w)?, w.data(), rows, cols)
                .map_err(|e| tensor_err(&name, e))?;
            return Ok(m);
        }
        (Dtype::U8, Some(s)) => {
            if !rows.is_multiple_of(4) {
                return Err(tensor_err(&name, format!("{rows} output features cannot be packed 4 rows per byte")));
            }
            check_shape(&name, &w, &[rows / 4, cols])?;
            (unpack_codes(&name, w.data(), rows, cols)?, scalar(&scale_name, &s)?)
        }
        (Dtype::I8, Some(s)) => {
            check_shape(&name, &w, &[rows, cols])?;
            let codes: Vec<i8> = bytemuck::cast_slice(w.data()).to_vec();
            if let Some(k) = codes.iter().position(|t| !(-1..=1).contains(t)) {
                return Err(tensor_err(&name, format!("int8 code {} at index {k} is not ternary", codes[k])));
            }
            (codes, scalar(&scale_name, &s)?)
        }
        (Dtype::U8 | Dtype::I8, None) => {
            return Err(err(format!("missing tensor '{scale_name}' for the integer codes of '{name}'")))
        }
        (Dtype::F32 | Dtype::F16 | Dtype::BF16, Some(_)) => {
            return Err(tensor_err(
                &name,
                "float weights with a weight_scale: unknown layout (expected uint8 or int8 codes)",
            ))
        }
        (d, _) => return Err(tensor_err(&name, format!("dtype {d:?} is not a BitLinear weight layout"))),
    };
    let multiplier = if c.scale_divides { (1.0 / f64::from(scale)) as f32 } else { scale };
    if !multiplier.is_finite() || multiplier <= 0.0 {
        return Err(tensor_err(
            &scale_name,
            format!("weight_scale {scale} gives the unusable multiplier {multiplier}"),
        ));
    }
    Ok(TernaryMatrix::from_codes(rows, cols, &codes, multiplier))
}

/// Tracks how much f16 rounding of the TQ block scale moved the ternary scales.
#[derive(Default)]
struct ScaleRounding {
    changed: usize,
    total: usize,
    worst: Option<(f64, String)>,
}

impl ScaleRounding {
    fn encode(&mut self, name: &str, m: &TernaryMatrix, ty: GgmlType) -> Result<Vec<u8>> {
        if matches!(ty, GgmlType::TQ1_0 | GgmlType::TQ2_0) {
            self.total += 1;
            let rounded = f16::from_f32(m.scale).to_f32();
            if rounded != m.scale {
                self.changed += 1;
                let rel = ((f64::from(rounded) - f64::from(m.scale)) / f64::from(m.scale)).abs();
                if self.worst.as_ref().is_none_or(|(w, _)| rel > *w) {
                    self.worst = Some((rel, name.to_string()));
                }
            }
        }
        m.to_tensor(ty).map_err(|e| tensor_err(name, e))
    }

    fn warning(&self, ty: GgmlType) -> Option<String> {
        let (rel, name) = self.worst.as_ref()?;
        Some(format!(
            "{} stores the ternary scale as f16: {} of {} scales were rounded (largest relative change {rel:.2e}, \
             in '{name}'); the codes are unchanged",
            ty.name(),
            self.changed,
            self.total
        ))
    }
}

/// Refuse, before any work, shapes the chosen types cannot hold.
fn check_layout(c: &HfConfig, o: &ConvertOptions) -> Result<()> {
    let q_dim = c.n_head * c.head_dim;
    for cols in [c.n_embd, q_dim, c.n_ff] {
        if o.ternary != GgmlType::I2_S && !cols.is_multiple_of(256) {
            return Err(err(format!(
                "{} needs rows (in_features) that are a multiple of 256; this model has rows of {cols}: use i2_s",
                o.ternary.name()
            )));
        }
    }
    if o.embd.row_bytes(c.n_embd).is_none() {
        return Err(err(format!(
            "{} needs embedding rows that are a multiple of {}; this model's have {}",
            o.embd.name(),
            o.embd.block_size(),
            c.n_embd
        )));
    }
    Ok(())
}

/// Convert a Hugging Face BitNet checkpoint to GGUF. `progress(done, total)` is called after each tensor.
pub fn convert(ckpt: &HfCheckpoint, o: &ConvertOptions, progress: &mut dyn FnMut(usize, usize)) -> Result<Converted> {
    check_types(o.ternary, Some(o.embd))?;
    let c = parse_config(ckpt.config_json, o.force)?;
    check_layout(&c, o)?;
    let mut t = Tensors::new(ckpt.shards)?;
    // A Llama block has no sub-norms: LlamaForCausalLM with a bitnet quantization_config.
    let sub_norm_names = ["self_attn.attn_sub_norm", "self_attn.inner_attn_ln"];
    let llama_block =
        c.llama && !sub_norm_names.iter().any(|n| t.0.contains_key(&format!("model.layers.0.{n}.weight")));
    let arch = target_arch(llama_block, c.activation == "relu2", o.ternary);
    let mut g = GgufWriter::new();
    for (k, v) in metadata(&c, arch, o.name.as_deref().unwrap_or("bitnet"), o.ternary) {
        g.add(&k, v);
    }
    let tokenizer = match ckpt.tokenizer {
        HfTokenizer::Json(json) => crate::text::tokenizer::metadata_from_hf(json, ckpt.tokenizer_config_json)?,
        HfTokenizer::SentencePiece(model) => {
            crate::text::spm_model::metadata_from_spm_model(model, ckpt.tokenizer_config_json)?
        }
    };
    check_vocab(&tokenizer, c.n_vocab)?;
    for (k, v) in tokenizer {
        g.add(&k, v);
    }

    let untied = !c.tied && t.0.contains_key("lm_head.weight");
    let total = 2 + usize::from(untied) + 11 * c.n_layer;
    let mut done = 0;
    // Shapes are given in HF order (rows, cols); ggml dims run the other way ([cols, rows]).
    let mut step = |g: &mut GgufWriter, name: &str, dims: &[usize], ty: GgmlType, data: Vec<u8>| {
        let dims: Vec<u64> = dims.iter().rev().map(|&d| d as u64).collect();
        g.add_tensor(name, &dims, ty, data);
        done += 1;
        progress(done, total);
    };

    let float_matrix = |t: &mut Tensors, hf: &str| -> Result<Vec<u8>> {
        let v = t.take(hf)?;
        check_shape(hf, &v, &[c.n_vocab, c.n_embd])?;
        recode_floats(hf, v.data(), float_type(hf, &v)?, o.embd, c.n_embd)
    };
    let embd = float_matrix(&mut t, "model.embed_tokens.weight")?;
    step(&mut g, "token_embd.weight", &[c.n_vocab, c.n_embd], o.embd, embd);
    let v = t.take("model.norm.weight")?;
    step(&mut g, "output_norm.weight", &[c.n_embd], GgmlType::F32, norm("model.norm.weight", &v, c.n_embd)?);
    if untied {
        let head = float_matrix(&mut t, "lm_head.weight")?;
        step(&mut g, "output.weight", &[c.n_vocab, c.n_embd], o.embd, head);
    }

    let (q_dim, kv_dim) = (c.n_head * c.head_dim, c.n_head_kv * c.head_dim);
    let shapes = [
        (q_dim, c.n_embd),
        (kv_dim, c.n_embd),
        (kv_dim, c.n_embd),
        (c.n_embd, q_dim),
        (c.n_ff, c.n_embd),
        (c.n_ff, c.n_embd),
        (c.n_embd, c.n_ff),
    ];
    let mut rounding = ScaleRounding::default();
    for i in 0..c.n_layer {
        let p = format!("model.layers.{i}");
        let norms: [(&str, &[&str], usize); 4] = [
            ("attn_norm", &["input_layernorm"], c.n_embd),
            ("attn_sub_norm", &["self_attn.attn_sub_norm", "self_attn.inner_attn_ln"], q_dim),
            ("ffn_norm", &["post_attention_layernorm"], c.n_embd),
            ("ffn_sub_norm", &["mlp.ffn_sub_norm", "mlp.ffn_layernorm"], c.n_ff),
        ];
        for (gguf, hf, len) in norms.into_iter().filter(|n| !llama_block || !n.0.ends_with("sub_norm")) {
            let names: Vec<String> = hf.iter().map(|n| format!("{p}.{n}.weight")).collect();
            let (hf_name, v) = t.take_any(&names)?;
            step(&mut g, &format!("blk.{i}.{gguf}.weight"), &[len], GgmlType::F32, norm(&hf_name, &v, len)?);
        }
        for ((gguf, hf), (rows, cols)) in PROJECTIONS.into_iter().zip(shapes) {
            let mut m = ternary_matrix(&mut t, &c, &format!("{p}.{hf}"), rows, cols)?;
            if llama_block && matches!(gguf, "attn_q" | "attn_k") {
                // Rows in llama.cpp's interleaved-RoPE order, as its converter writes arch `llama`.
                m = m.gather_rows(|f| hf_row_of_llama_row(f, c.head_dim));
            }
            let name = format!("blk.{i}.{gguf}.weight");
            let data = rounding.encode(&name, &m, o.ternary)?;
            step(&mut g, &name, &[rows, cols], o.ternary, data);
        }
    }
    check_leftovers(t, c.tied)?;
    Ok(Converted { gguf: g, warnings: rounding.warning(o.ternary).into_iter().collect() })
}

/// Token ids must have an embedding row.
fn check_vocab(tokenizer: &[(String, Value)], n_vocab: usize) -> Result<()> {
    let n_tokens = tokenizer
        .iter()
        .find(|(k, _)| k == "tokenizer.ggml.tokens")
        .and_then(|(_, v)| v.as_array())
        .map_or(0, <[Value]>::len);
    if n_tokens > n_vocab {
        return Err(err(format!("the tokenizer has {n_tokens} tokens but the model's vocab_size is {n_vocab}")));
    }
    Ok(())
}

/// Tensors the converter did not use would be silently dropped: refuse, except those that carry nothing.
fn check_leftovers(t: Tensors, tied: bool) -> Result<()> {
    let mut left: Vec<String> =
        t.0.into_keys().filter(|n| !(n.ends_with("rotary_emb.inv_freq") || (tied && n == "lm_head.weight"))).collect();
    if left.is_empty() {
        return Ok(());
    }
    left.sort();
    let more = if left.len() > 8 { format!(" and {} more", left.len() - 8) } else { String::new() };
    left.truncate(8);
    Err(err(format!("unexpected tensors (biases or layers this engine does not have): {}{more}", left.join(", "))))
}

// ---------------------------------------------------------------------------------------------------------------
// GGUF → GGUF

/// `blk.N.{attn_q, attn_k, attn_v, attn_output, ffn_gate, ffn_up, ffn_down}.weight`: the BitLinear weights.
fn is_bitlinear(name: &str) -> bool {
    let Some(rest) = name.strip_prefix("blk.") else { return false };
    let Some((n, rest)) = rest.split_once('.') else { return false };
    n.parse::<u32>().is_ok() && PROJECTIONS.iter().any(|&(p, _)| rest.strip_suffix(".weight") == Some(p))
}

/// Rewrite a GGUF model with its BitLinear weights stored as `ternary` (lossless between ternary types: the codes
/// and the scale are kept, except that TQ types round the scale to f16, reported in the warnings; float weights
/// are ternarized as the engine would at load time), and its embedding and untied LM head as `embd` when given.
/// All other tensors and all metadata are copied as they are, except `general.file_type` and the architecture name
/// (with its key prefix), which become what the family's reference engine expects for `ternary` ([`target_arch`];
/// `<arch>.hidden_activation` is written for BitNet blocks).
///
/// `force` allows a non-BitNet architecture, and re-quantizing an embedding that is already quantized.
pub fn requantize(
    bytes: &[u8],
    ternary: GgmlType,
    embd: Option<GgmlType>,
    force: bool,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Converted> {
    check_types(ternary, embd)?;
    let src = GgufFile::parse(bytes)?;
    let arch = src.get("general.architecture").and_then(Value::as_str).unwrap_or_default();
    if !BITNET_ARCHS.contains(&arch) && !force {
        return Err(err(format!(
            "architecture '{arch}' is not BitNet ({}); pass --force to convert anyway",
            BITNET_ARCHS.join(", ")
        )));
    }
    let mut g = GgufWriter::new();
    let (dst_arch, activation) = match crate::model::Config::from_gguf(&src, &Default::default()) {
        Ok(c) => {
            let llama = crate::model::Family::detect(&src)?.0 == crate::model::Family::LlamaTernary;
            let relu2 = c.activation == crate::model::Activation::Relu2;
            (target_arch(llama, relu2, ternary), (!llama).then(|| c.activation.to_string()))
        }
        // Not a model this engine runs (--force): names as they are.
        Err(_) => (arch, None),
    };
    for (k, v) in &src.metadata {
        // The writer lays tensors out by a U32 alignment; keep the file's alignment in that form.
        let v = if k == "general.alignment" { Value::U32(src.alignment as u32) } else { v.clone() };
        match k.strip_prefix(arch).and_then(|rest| rest.strip_prefix('.')) {
            Some(rest) => g.add(&format!("{dst_arch}.{rest}"), v),
            None if k == "general.architecture" => g.add(k, Value::Str(dst_arch.into())),
            None => g.add(k, v),
        }
    }
    if let Some(a) = activation {
        g.add(&format!("{dst_arch}.hidden_activation"), Value::Str(a));
    }
    g.add("general.file_type", Value::U32(file_type(ternary)));
    let mut rounding = ScaleRounding::default();
    for (i, t) in src.tensors.iter().enumerate() {
        let data = src.tensor_data(bytes, t);
        let latent = || !crate::tensor::ternary::holds_ternary(t.ty, data);
        if dst_arch == "llama" && is_bitlinear(&t.name) && !force && latent() {
            return Err(tensor_err(
                &t.name,
                "not ternary: an arch 'llama' file with float weights is an ordinary Llama (pass --force to ternarize)",
            ));
        }
        let (ty, out) = if is_bitlinear(&t.name) && t.ty != ternary {
            let m = TernaryMatrix::from_tensor(t.ty, data, t.rows(), t.cols()).map_err(|e| tensor_err(&t.name, e))?;
            (ternary, rounding.encode(&t.name, &m, ternary)?)
        } else if let Some(e) =
            embd.filter(|&e| e != t.ty && matches!(t.name.as_str(), "token_embd.weight" | "output.weight"))
        {
            if !matches!(t.ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16) && !force {
                return Err(tensor_err(
                    &t.name,
                    format!(
                        "already quantized as {}; re-quantizing to {} loses precision twice (pass --force)",
                        t.ty.name(),
                        e.name()
                    ),
                ));
            }
            (e, recode_floats(&t.name, data, t.ty, e, t.cols())?)
        } else {
            (t.ty, data.to_vec())
        };
        g.add_tensor(&t.name, &t.dims, ty, out);
        progress(i + 1, src.tensors.len());
    }
    Ok(Converted { gguf: g, warnings: rounding.warning(ternary).into_iter().collect() })
}
