//! The GPU backend through wgpu: one set of WGSL kernels (`shaders/`) for Vulkan, Metal, DX12 and
//! the browser's WebGPU. Enabled by the `wgpu` cargo feature.
//!
//! Per token and layer the device runs five kernels, each a single dispatch:
//! ```text
//! qkv      = BitLinear(rmsnorm(x, attn_norm))              ternary.wgsl: norm + int8 quantization fused in
//! att      = attention(rope(q), rope(k), v, KV cache)      attention.wgsl: also stores k and v in the cache
//! x       += BitLinear_o(rmsnorm(att, attn_sub_norm))
//! h        = act(gate) · up, gate/up = BitLinear(rmsnorm(x, ffn_norm))
//! x       += BitLinear_down(rmsnorm(h, ffn_sub_norm))
//! ```
//! then, when logits are wanted, `rmsnorm(x, output_norm)`, the LM head (float.wgsl) and optionally the
//! argmax (norm.wgsl). Weights are uploaded once ([`GpuModel`]); each [`Wgpu`] context owns its KV cache and
//! creates every bind group once: per token, the host writes the token id and position into a small
//! uniform buffer and submits the same dispatches again. A decode step's command buffer is recorded while
//! the device runs the step before it (see [`Wgpu::run`]).
//!
//! A prompt runs in tiles of up to [`TILE`] tokens, each tile one command buffer: per layer, each BitLinear
//! becomes two dispatches (tile.wgsl: norm + quantization of the tile's rows, then a GEMM that reads each
//! weight row once for all of them), and attention two (store the tile's keys and values, then attend, one
//! workgroup per head and token). Only the tile's last token goes through the LM head. A token's int8
//! activations, accumulators and float operations are those of the decode path, so a prompt in tiles gives
//! the logits of the same prompt run token by token.
//!
//! The model families differ only in data: a family without sub-norms quantizes o's and down's raw input;
//! Qwen3 adds one dispatch after qkv (norm.wgsl's head_norm: each q and k head RMS-normalized in place), and
//! its projections in ggml blocks (Q1_0, Q2_0, Q8_0; a head in those types too) run blocks.wgsl in place of
//! ternary.wgsl, against Q8_0 activations as the CPU and llama.cpp multiply them, one dispatch for a token or
//! a whole tile. A BitNet embedding model's projections each have their own input norm (after the block's:
//! both fused into the quantization), so q, k, v and gate, up run as separate `Part`s.
//!
//! The integer part of BitLinear is exact, as on the CPU. Float sums run in a different order (and WGSL's
//! division and square root are not correctly rounded), so logits agree with the CPU's to float tolerance.
//!
//! In a browser (wasm32) nothing may block on the device: there [`Gpu::open_async`] opens the adapter
//! and [`Wgpu::forward_async`] awaits the logits, in place of `Gpu::open` and the
//! [`Sequence`](crate::backend::Sequence) and [`Weights`](crate::backend::Weights) implementations.

mod gpu;
mod kernels;
#[cfg(feature = "probes")]
mod probe;
mod weights;

use std::sync::Arc;

#[cfg(not(target_arch = "wasm32"))]
pub use gpu::adapters;
pub use gpu::adapters_async;
pub use gpu::{AdapterDesc, Gpu};
pub use kernels::TILE;

use crate::backend::cpu::kernels::blocks;
use crate::backend::{check_ctx, check_input, check_runs, KvType};
#[cfg(not(target_arch = "wasm32"))]
use crate::backend::{Sequence, Want, Weights};
use crate::model::{Activation, Config, Family, Model};
use crate::tensor::Linear;
use crate::{Error, Result};
use kernels::{
    grid, AttnParams, Dispatch, FloatParams, Kernel, NormParams, Step, TernaryParams, MODE_ACT_MUL, MODE_ADD,
    MODE_GATE_UP, MODE_STORE, SHORT_ROW, STEP_STRIDE,
};
use weights::{FloatGpu, LinearGpu};

/// A projection as a layer runs it (or projections stacked, sharing their input): its weights, what it does
/// with its output, and the norms of its input.
struct Part {
    w: LinearGpu,
    mode: u32,
    /// The input's RMS norm weights (`prenorm` 1), two norms' back to back (`prenorm` 2: a BitNet embedding
    /// model's block norm, then the projection's own `*_norm_in`), or none (`prenorm` 0: a family without
    /// sub-norms quantizes the o and down projections' raw input).
    norm: Option<wgpu::Buffer>,
    prenorm: u32,
    /// Where its rows go in the output: q, k and v each on its own input write their parts of `qkv`.
    out_off: usize,
}

struct GpuLayer {
    /// Qwen3's RMSNorm weights of each q head, then of each k head (norm.wgsl's head_norm); None otherwise.
    qk_norm: Option<wgpu::Buffer>,
    /// q, k and v stacked (or each on its own input norm), from x into `qkv`.
    qkv: Vec<Part>,
    /// From the attention output, added to x.
    wo: Part,
    /// Gate and up interleaved, act(gate)·up into `h` (or gate then up, each on its own input norm).
    gate_up: Vec<Part>,
    /// From h, added to x.
    down: Part,
}

impl GpuLayer {
    fn parts(&self) -> impl Iterator<Item = &Part> {
        self.qkv.iter().chain([&self.wo]).chain(&self.gate_up).chain([&self.down])
    }
}

/// A model's weights on one device, with the compiled kernels: shared by every context ([`Wgpu`]).
pub struct GpuModel {
    gpu: Arc<Gpu>,
    config: Config,
    layers: Vec<GpuLayer>,
    output_norm: wgpu::Buffer,
    /// The embedding (the lookup), also the LM head when tied to it and float.
    token_embd: FloatGpu,
    lm_head: LmHead,
    /// BitLinear for rows of up to `SHORT_ROW` columns, and for longer ones.
    ternary: [Kernel; 2],
    /// Projections in ggml blocks (blocks.wgsl), where the model has any.
    blocks: Option<Kernel>,
    head_norm: Kernel,
    attention: Kernel,
    /// A prompt tile's kernels: norm + quantization, the ternary GEMM, the keys' and values' store.
    quantize: Kernel,
    gemm: Kernel,
    store_kv: Kernel,
    /// Merges the chunks of a decode step's attention split over the sequence.
    combine: Kernel,
    rmsnorm: Kernel,
    argmax: Kernel,
    matvec: Kernel,
    lookup: Kernel,
    /// Keys and values cached as computed (`KvType::F32`), or rounded to f16.
    exact_kv: bool,
    /// A BitNet embedding model: contexts read back the final hidden state with the logits.
    embedding: bool,
}

/// The LM head on the device.
enum LmHead {
    /// The float embedding, tied.
    Embedding,
    Float(FloatGpu),
    /// Qwen3's head in Q1_0, Q2_0 or Q8_0 (tied or not), multiplied as its projections are (the final norm
    /// fused in).
    Blocks(Part),
}

/// `Layer::norm_in`'s index of no projection: a stacked projection has no input norm of its own.
const NO_NORM_IN: usize = usize::MAX;

/// Projections that share an input, stacked (or interleaved) into one matrix: ternary ones for ternary.wgsl,
/// ggml blocks of one type for blocks.wgsl.
fn upload_linear(gpu: &Gpu, label: &str, parts: &[&Linear], interleave: bool) -> Result<LinearGpu> {
    let ternary: Option<Vec<_>> = parts.iter().map(|w| w.ternary()).collect();
    let blocks: Option<Vec<_>> = parts
        .iter()
        .map(|w| match w {
            Linear::Ggml(m) => Some(m),
            Linear::Ternary(_) => None,
        })
        .collect();
    match (ternary, blocks) {
        (Some(t), _) => LinearGpu::upload(gpu, label, &t, interleave),
        (_, Some(b)) if b.iter().all(|m| blocks::reads(m.ty) && m.ty == b[0].ty) => {
            LinearGpu::upload_blocks(gpu, label, &b, interleave)
        }
        _ => Err(Error::Unsupported(format!(
            "{label}: projections of types other than one of Q1_0, Q2_0, Q8_0 or ternary on wgpu (the CPU runs every \
             type)"
        ))),
    }
}

impl GpuModel {
    /// Uploads the weights of `model` and compiles the kernels.
    pub fn upload(gpu: Arc<Gpu>, model: &Model) -> Result<Self> {
        let c = model.config.clone();
        if c.head_dim > kernels::WG as usize {
            return Err(Error::Unsupported(format!("head dim {} on the GPU (at most {})", c.head_dim, kernels::WG)));
        }
        let g = &gpu;
        let f32s = |label: &str, v: &[f32]| g.storage(label, bytemuck::cast_slice(v));
        let mut layers = Vec::with_capacity(c.n_layer);
        check_runs(model, "wgpu")?;
        let (q_dim, kv_dim) = (c.q_dim(), c.kv_dim());
        for (i, l) in model.layers.iter().enumerate() {
            let name = |n: &str| format!("blk.{i}.{n}");
            // A projection `ws` on its input through the block's norm `block` (empty: none) and its own norm
            // `norm_in[own]` where the model has those.
            let part = |label: &str, ws: &[&Linear], mode, block: &[f32], own: usize, out_off| -> Result<Part> {
                let label = name(label);
                let (norm, prenorm) = match (block.is_empty(), l.norm_in.get(own)) {
                    (true, None) => (None, 0),
                    (false, None) => (Some(f32s(&label, block)), 1),
                    (true, Some(own)) => (Some(f32s(&label, own)), 1),
                    (false, Some(own)) => {
                        let mut both = block.to_vec();
                        both.resize(s4(block.len()), 0.0);
                        both.extend_from_slice(own);
                        (Some(f32s(&label, &both)), 2)
                    }
                };
                let w = upload_linear(g, &label, ws, mode == MODE_GATE_UP)?;
                Ok(Part { w, mode, norm, prenorm, out_off })
            };
            let (qkv, gate_up) = match l.norm_in.is_empty() {
                true => (
                    vec![part("attn_qkv", &[&l.wq, &l.wk, &l.wv], MODE_STORE, &l.attn_norm, NO_NORM_IN, 0)?],
                    vec![part("ffn_gate_up", &[&l.w_gate, &l.w_up], MODE_GATE_UP, &l.ffn_norm, NO_NORM_IN, 0)?],
                ),
                false => (
                    vec![
                        part("attn_q", &[&l.wq], MODE_STORE, &l.attn_norm, 0, 0)?,
                        part("attn_k", &[&l.wk], MODE_STORE, &l.attn_norm, 1, q_dim)?,
                        part("attn_v", &[&l.wv], MODE_STORE, &l.attn_norm, 2, q_dim + kv_dim)?,
                    ],
                    vec![
                        part("ffn_gate", &[&l.w_gate], MODE_STORE, &l.ffn_norm, 4, 0)?,
                        part("ffn_up", &[&l.w_up], MODE_ACT_MUL, &l.ffn_norm, 5, 0)?,
                    ],
                ),
            };
            let qk_norm = [l.attn_q_norm.as_slice(), &l.attn_k_norm].concat();
            layers.push(GpuLayer {
                qk_norm: (!qk_norm.is_empty()).then(|| f32s(&name("attn_qk_norm"), &qk_norm)),
                qkv,
                wo: part("attn_output", &[&l.wo], MODE_ADD, &l.attn_sub_norm, 3, 0)?,
                gate_up,
                down: part("ffn_down", &[&l.w_down], MODE_ADD, &l.ffn_sub_norm, 6, 0)?,
            });
            gpu.check("uploading the weights")?;
        }
        let token_embd = FloatGpu::upload(g, "token_embd", &model.token_embd)?;
        let head = model.lm_head();
        // As the CPU multiplies it: a Qwen3 head in Q1_0/Q2_0/Q8_0 against Q8_0 activations, others in float.
        let lm_head = match (&model.output, model.family == Family::Qwen3 && blocks::reads(head.ty)) {
            (_, true) => LmHead::Blocks(Part {
                w: LinearGpu::upload_blocks(g, "lm_head", &[head], false)?,
                mode: MODE_STORE,
                norm: Some(f32s("output_norm", &model.output_norm)),
                prenorm: 1,
                out_off: 0,
            }),
            (Some(out), false) => LmHead::Float(FloatGpu::upload(g, "lm_head", out)?),
            (None, false) => LmHead::Embedding,
        };
        let max_cols = [c.n_embd, c.n_head * c.head_dim, c.n_ff].into_iter().max().unwrap_or(0).div_ceil(128) * 128;
        let any_blocks =
            matches!(lm_head, LmHead::Blocks(_)) || layers.iter().flat_map(GpuLayer::parts).any(|p| p.w.params.ty != 0);
        let head_format = match &lm_head {
            LmHead::Float(f) => f.format,
            _ => token_embd.format,
        };
        let m = GpuModel {
            output_norm: f32s("output_norm", &model.output_norm),
            ternary: [Kernel::ternary(g, max_cols, false)?, Kernel::ternary(g, max_cols, true)?],
            blocks: if any_blocks { Some(Kernel::blocks(g, max_cols)?) } else { None },
            head_norm: Kernel::norm(g, "head_norm"),
            attention: Kernel::attention(g, c.head_dim, "main"),
            quantize: Kernel::tile(g, "quantize"),
            gemm: Kernel::tile(g, "gemm"),
            store_kv: Kernel::attention(g, c.head_dim, "store_kv"),
            combine: Kernel::attention(g, c.head_dim, "combine"),
            rmsnorm: Kernel::norm(g, "rmsnorm"),
            argmax: Kernel::norm(g, "argmax"),
            matvec: Kernel::float(g, head_format, "matvec"),
            lookup: Kernel::float(g, token_embd.format, "lookup"),
            lm_head,
            token_embd,
            layers,
            config: c,
            gpu: gpu.clone(),
            exact_kv: false,
            embedding: model.is_embedding(),
        };
        gpu.check("compiling the kernels")?;
        Ok(m)
    }

    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    /// The KV cache type of every context: f16 (the default) or f32 (exact).
    pub fn with_kv(mut self, kv: KvType) -> Result<Self> {
        if kv == KvType::Q8_0 {
            return Err(Error::Unsupported("a q8_0 KV cache on wgpu (f32 or f16; --backend cpu has all)".into()));
        }
        self.exact_kv = kv == KvType::F32;
        Ok(self)
    }

    /// A step buffer: [`TILE`] entries, and one more for a batch's tile-wide dispatches.
    fn step_buffer(&self) -> wgpu::Buffer {
        self.gpu.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("step"),
            size: (TILE as u64 + 1) * STEP_STRIDE,
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        })
    }

    /// Attention of a decode step (one token, row 0, its k and v from `qkv`) in a context of `ctx`.
    fn attn_params(&self, ctx: usize) -> AttnParams {
        let c = &self.config;
        AttnParams {
            head_dim: c.head_dim as u32,
            group: (c.n_head / c.n_head_kv) as u32,
            q_dim: c.q_dim() as u32,
            kv_dim: c.kv_dim() as u32,
            rope_half: (c.rope_dim / 2) as u32,
            ctx: ctx as u32,
            scale: 1.0 / (c.head_dim as f32).sqrt(),
            qkv_stride: 0,
            out_stride: 0,
            cached: 0,
            chunk: 0,
            exact: u32::from(self.exact_kv),
        }
    }

    /// The buffers of a tile's rows in contexts of up to `ctx` tokens.
    fn tile_buffers(&self, ctx: usize) -> TileBufs {
        let (c, gpu) = (&self.config, &*self.gpu);
        let f32_buf = |label: &str, n: usize| gpu.zeros(label, n as u64 * 4);
        let (q_dim, kv_dim) = (c.q_dim(), c.kv_dim());
        let ternary = self.layers.iter().flat_map(GpuLayer::parts).filter(|p| p.w.params.ty == 0);
        let widest = ternary.map(|p| p.w.params.vpr).max();
        let attn = AttnParams {
            qkv_stride: s4(q_dim + 2 * kv_dim) as u32,
            out_stride: s4(q_dim) as u32,
            cached: 1,
            ..self.attn_params(ctx)
        };
        TileBufs {
            x: f32_buf("x tile", TILE * s4(c.n_embd)),
            qkv: f32_buf("qkv tile", TILE * s4(q_dim + 2 * kv_dim)),
            att_out: f32_buf("att_out tile", TILE * s4(q_dim)),
            h: f32_buf("h tile", TILE * s4(c.n_ff)),
            att: f32_buf("att tile", TILE * c.n_head * ctx),
            words: gpu.zeros("int8 tile", (TILE * widest.unwrap_or(1) as usize * 64) as u64),
            scales: f32_buf("int8 scales tile", 2 * TILE),
            attn: gpu.uniform("tile attention params", &attn),
        }
    }

    /// The embedding lookup into a tile's row `step.row`: one dispatch per shard of the embedding.
    fn tile_embed(&self, step: &wgpu::Buffer, t: &TileBufs) -> Vec<Dispatch> {
        let embd = &self.token_embd;
        // The lookup's input binding is unused: any buffer of the right kind.
        embd.shards.iter().map(|s| self.float(&self.lookup, embd, s, step, &t.h, &t.x)).collect()
    }

    /// The dispatches of `part` on `input` (through its norms) into `out`, for a decode step's token, or for
    /// a tile's rows (`tile`: its buffers, and the rows' input and output lengths): a ternary matrix's GEMV,
    /// or its tile's norm + quantization and GEMM; a matrix in ggml blocks's one dispatch (blocks.wgsl)
    /// either way.
    fn projection(
        &self,
        step: &wgpu::Buffer,
        part: &Part,
        [input, out]: [&wgpu::Buffer; 2],
        tile: Option<(&TileBufs, usize, usize)>,
    ) -> Vec<Dispatch> {
        let (c, gpu, w) = (&self.config, &*self.gpu, &part.w);
        let act = u32::from(c.activation == Activation::Silu);
        let norm = part.norm.as_ref().unwrap_or(input); // no norm: any buffer, unread
        let (x_stride, out_stride) = tile.map_or((0, 0), |(_, i, o)| ((s4(i) / 4) as u32, s4(o) as u32));
        let (mode, prenorm, out_off) = (part.mode, part.prenorm, part.out_off as u32);
        let p = TernaryParams { mode, act, prenorm, eps: c.eps, x_stride, out_stride, out_off, ..w.params };
        let uniform = gpu.uniform("projection params", &p);
        let gemv = |k: &Kernel| {
            k.dispatch(gpu, step, &[&uniform, &w.buf, input, norm, out], grid(p.rows as usize, k.rows_per_group))
        };
        match (p.ty, tile) {
            (0, Some((t, _, _))) => vec![
                self.quantize.dispatch(gpu, step, &[&uniform, &t.words, input, norm, &t.scales], (TILE as u32, 1)),
                self.gemm.dispatch(
                    gpu,
                    step,
                    &[&uniform, &w.buf, &t.words, &t.scales, out],
                    grid(p.rows as usize, self.gemm.rows_per_group),
                ),
            ],
            (0, None) => vec![gemv(&self.ternary[usize::from(p.vpr as usize * 64 > SHORT_ROW)])],
            _ => vec![gemv(self.blocks.as_ref().expect("compiled for a model with block projections"))],
        }
    }

    /// Qwen3's q and k head norms, in place in `qkv` (token rows of `stride` floats) for up to `rows` tokens;
    /// None for other families. `spare`: any writable buffer but `qkv` (bound, unused).
    fn head_norm(
        &self,
        step: &wgpu::Buffer,
        l: &GpuLayer,
        [qkv, spare]: [&wgpu::Buffer; 2],
        stride: usize,
        rows: usize,
    ) -> Option<Dispatch> {
        let c = &self.config;
        let norm = l.qk_norm.as_ref()?;
        let p = NormParams { n: c.head_dim as u32, eps: c.eps, q_heads: c.n_head as u32, stride: stride as u32 };
        let uniform = self.gpu.uniform("head norm params", &p);
        let heads = (c.n_head + c.n_head_kv) as u32;
        Some(self.head_norm.dispatch(&self.gpu, step, &[&uniform, norm, norm, qkv, spare], (heads, rows as u32)))
    }

    /// Every layer's dispatches around its attention, over the buffers `x`, `qkv`, `att_out` and `h` (see
    /// [`TileBufs`]): for a decode step's token, or for the rows of `tile` (whose buffers they are).
    fn layer_dispatches(
        &self,
        step: &wgpu::Buffer,
        [x, qkv, att_out, h]: [&wgpu::Buffer; 4],
        spare: &wgpu::Buffer,
        tile: Option<&TileBufs>,
    ) -> Vec<Around> {
        let c = &self.config;
        let (d, q_dim, ff) = (c.n_embd, c.q_dim(), c.n_ff);
        let qkv_len = q_dim + 2 * c.kv_dim();
        let sized = |i, o| tile.map(|t| (t, i, o));
        let rows = if tile.is_some() { TILE } else { 1 };
        self.layers
            .iter()
            .map(|l| {
                let mut before: Vec<Dispatch> =
                    l.qkv.iter().flat_map(|p| self.projection(step, p, [x, qkv], sized(d, qkv_len))).collect();
                before.extend(self.head_norm(step, l, [qkv, spare], s4(qkv_len), rows));
                let after = std::iter::once((&l.wo, [att_out, x], sized(q_dim, d)))
                    .chain(l.gate_up.iter().map(|p| (p, [x, h], sized(d, ff))))
                    .chain([(&l.down, [h, x], sized(ff, d))])
                    .flat_map(|(p, io, tile)| self.projection(step, p, io, tile))
                    .collect();
                Around { before, after }
            })
            .collect()
    }

    /// Every layer's projections (and head norms) for a tile's rows.
    fn tile_layers(&self, step: &wgpu::Buffer, t: &TileBufs) -> Vec<Around> {
        self.layer_dispatches(step, [&t.x, &t.qkv, &t.att_out, &t.h], &t.scales, Some(t))
    }

    /// A layer's attention for a tile's rows over the caches `kv`: the store of their keys and values,
    /// then attention, each for `rows` tokens from `step.row` on.
    fn tile_attention(
        &self,
        step: &wgpu::Buffer,
        t: &TileBufs,
        rope: &wgpu::Buffer,
        [kc, vc]: [&wgpu::Buffer; 2],
        part: &wgpu::Buffer,
        rows: u32,
    ) -> [Dispatch; 2] {
        let (c, gpu) = (&self.config, &*self.gpu);
        let b = [&t.attn, &t.qkv, rope, kc, vc, &t.att, &t.att_out, part];
        [
            self.store_kv.dispatch(gpu, step, &b, (c.n_head_kv as u32, rows)),
            self.attention.dispatch(gpu, step, &b, (c.n_head as u32, rows)),
        ]
    }

    /// A float matrix kernel over one shard of `fm`.
    fn float(
        &self,
        k: &Kernel,
        fm: &FloatGpu,
        s: &weights::Shard,
        step: &wgpu::Buffer,
        input: &wgpu::Buffer,
        out: &wgpu::Buffer,
    ) -> Dispatch {
        let p = FloatParams {
            rows: s.rows.len() as u32,
            row_offset: s.rows.start as u32,
            vpr: fm.vpr as u32,
            k: fm.cols as u32,
        };
        let uniform = self.gpu.uniform("float params", &p);
        let g = if k.rows_per_group > 1 { grid(s.rows.len(), k.rows_per_group) } else { (1, 1) };
        k.dispatch(&self.gpu, step, &[&uniform, &s.m, &s.d, input, out], g)
    }
}

/// A row length rounded up to whole vec4s (the kernels' loads).
fn s4(n: usize) -> usize {
    n.next_multiple_of(4)
}

/// A layer's dispatches on either side of its attention: the q/k/v projection (and Qwen3's q/k head norms)
/// before it, the output projection and the feed-forward after.
struct Around {
    before: Vec<Dispatch>,
    after: Vec<Dispatch>,
}

/// The buffers of a tile of up to [`TILE`] token rows: a prompt tile, or one token of each of many sequences.
struct TileBufs {
    /// The residual stream, `[TILE][n_embd rounded up to 4]`.
    x: wgpu::Buffer,
    qkv: wgpu::Buffer,
    att_out: wgpu::Buffer,
    h: wgpu::Buffer,
    /// Attention scores, `[row][head][ctx]`.
    att: wgpu::Buffer,
    words: wgpu::Buffer,
    scales: wgpu::Buffer,
    /// The rows' attention parameters (their keys and values are in the cache once `store_kv` ran).
    attn: wgpu::Buffer,
}

/// What to compute after the last token of a [`Wgpu::run`].
#[derive(Clone, Copy, PartialEq, Eq)]
enum Head {
    None,
    Logits,
    Argmax,
}

/// A prompt tile's dispatches and buffers.
struct Tile {
    /// The embedding lookup, recorded once per token of the tile (at its step slot).
    embed: Vec<Dispatch>,
    /// Per layer, its projections (see [`GpuModel::tile_layers`]) and its attention.
    layers: Vec<Around>,
    attention: Vec<[Dispatch; 2]>,
    bufs: TileBufs,
}

/// One sequence on the GPU: the KV cache, the activations, and every dispatch of a token, recorded once.
pub struct Wgpu {
    m: Arc<GpuModel>,
    ctx: usize,
    step: wgpu::Buffer,
    /// The residual stream of a decode step (the head's input).
    x: wgpu::Buffer,
    /// The embedding lookup, one dispatch per shard of the embedding (only the token's shard does work).
    embed: Vec<Dispatch>,
    /// Per layer, its dispatches around attention (see the module documentation), and its attention.
    layers: Vec<Around>,
    attention: Vec<Dispatch>,
    /// Per layer, its attention split over the sequence and the merge of the chunks: in place of the
    /// single-pass attention from position `split_from` on.
    split_attention: Vec<[Dispatch; 2]>,
    split_from: usize,
    /// The final norm and the LM head's shards.
    head: Vec<Dispatch>,
    argmax: Dispatch,
    tile: Tile,
    logits_buf: wgpu::Buffer,
    logits_read: wgpu::Buffer,
    best_buf: wgpu::Buffer,
    best_read: wgpu::Buffer,
    logits: Vec<f32>,
    /// An embedding model's final normed hidden state (`Sequence::hidden`), read back with the logits (the
    /// device's `xn`, the float head's input); None for other models.
    hidden: Option<(wgpu::Buffer, wgpu::Buffer, Vec<f32>)>,
    /// A decode step with this head, and split attention or not, recorded ahead (see [`Wgpu::run`]).
    ready: Option<(Head, bool, wgpu::CommandBuffer)>,
    /// The RoPE table and each layer's key and value caches, for a [`WgpuBatcher`]'s dispatches (the
    /// browser has no batcher).
    #[cfg_attr(target_arch = "wasm32", allow(dead_code))]
    rope: wgpu::Buffer,
    #[cfg_attr(target_arch = "wasm32", allow(dead_code))]
    caches: Vec<[wgpu::Buffer; 2]>,
    /// This sequence's attention in a [`WgpuBatcher`]'s steps (the batcher's id, each layer's dispatches).
    #[cfg(not(target_arch = "wasm32"))]
    batched: Option<(u64, Vec<[Dispatch; 2]>)>,
}

impl Wgpu {
    /// Opens the best adapter (a real GPU if there is one, else a CPU-type one such as llvmpipe), uploads
    /// the model and creates a context of `ctx` tokens.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn new(model: &Model, ctx: usize) -> Result<Self> {
        let gpu = Gpu::open(true)?.ok_or_else(|| Error::Gpu("no GPU adapter found".into()))?;
        Self::with_model(Arc::new(GpuModel::upload(Arc::new(gpu), model)?), ctx)
    }

    /// A new context on uploaded weights.
    pub fn with_model(m: Arc<GpuModel>, ctx: usize) -> Result<Self> {
        let c = &m.config;
        check_ctx(c, ctx)?;
        let gpu = &*m.gpu;
        let f32_buf = |label: &str, n: usize| gpu.zeros(label, n as u64 * 4);
        let (q_dim, kv_dim) = (c.q_dim(), c.kv_dim());
        let kv_bytes = (ctx * kv_dim * 4) as u64;
        if kv_bytes > gpu.max_binding() {
            return Err(Error::Gpu(format!(
                "a KV cache layer of {kv_bytes} bytes exceeds the largest storage binding"
            )));
        }
        let step = m.step_buffer();
        let x = f32_buf("x", c.n_embd);
        let xn = match &m.lm_head {
            LmHead::Float(f) => f32_buf("xn", f.vpr * f.format.per_vec4()), // zero-padded LM head input
            LmHead::Embedding => f32_buf("xn", m.token_embd.vpr * m.token_embd.format.per_vec4()),
            LmHead::Blocks(_) => f32_buf("xn", 4), // unused: blocks.wgsl normalizes x itself
        };
        let qkv = f32_buf("qkv", q_dim + 2 * kv_dim);
        let att_out = f32_buf("att_out", q_dim);
        let h = f32_buf("h", c.n_ff);
        let att = f32_buf("att", c.n_head * ctx);
        let (cos, sin) = c.rope_table(ctx);
        let rope: Vec<[f32; 2]> = cos.into_iter().zip(sin).map(|(c, s)| [c, s]).collect();
        let rope = gpu.storage("rope", bytemuck::cast_slice(&rope));
        let logits_buf = f32_buf("logits", c.n_vocab);
        let best_buf = gpu.zeros("best", 4);

        // A decode step: one token (row 0), its k and v from `qkv`.
        let attn_params = m.attn_params(ctx);
        let attn_uniform = gpu.uniform("attention params", &attn_params);
        // Attention split over the sequence: each head's chunks' partial results, `head_dim + 2` floats each.
        let chunk = gpu.attn_chunk;
        let part = f32_buf("attention chunks", c.n_head * ctx.div_ceil(chunk) * (c.head_dim + 2));
        let split_uniform = gpu.uniform("split attention params", &AttnParams { chunk: chunk as u32, ..attn_params });
        let tile_bufs = m.tile_buffers(ctx);

        let layers = m.layer_dispatches(&step, [&x, &qkv, &att_out, &h], &best_buf, None);
        let mut attention = Vec::with_capacity(c.n_layer);
        let mut split_attention = Vec::with_capacity(c.n_layer);
        let mut caches = Vec::with_capacity(c.n_layer);
        let mut tile_attention = Vec::with_capacity(c.n_layer);
        for i in 0..c.n_layer {
            let (kc, vc) = (gpu.zeros(&format!("k_cache.{i}"), kv_bytes), gpu.zeros(&format!("v_cache.{i}"), kv_bytes));
            attention.push(m.attention.dispatch(
                gpu,
                &step,
                &[&attn_uniform, &qkv, &rope, &kc, &vc, &att, &att_out, &part],
                (c.n_head as u32, 1),
            ));
            let split = [&split_uniform, &qkv, &rope, &kc, &vc, &att, &att_out, &part];
            split_attention.push([
                m.attention.dispatch(gpu, &step, &split, (c.n_head as u32, ctx.div_ceil(chunk) as u32)),
                m.combine.dispatch(gpu, &step, &split, (c.n_head as u32, 1)),
            ]);
            tile_attention.push(m.tile_attention(&step, &tile_bufs, &rope, [&kc, &vc], &part, TILE as u32));
            caches.push([kc, vc]);
        }

        let embd = &m.token_embd;
        let embed = embd.shards.iter().map(|s| m.float(&m.lookup, embd, s, &step, &xn, &x)).collect();
        let tile = Tile {
            embed: m.tile_embed(&step, &tile_bufs),
            layers: m.tile_layers(&step, &tile_bufs),
            attention: tile_attention,
            bufs: tile_bufs,
        };
        let norm =
            |n: usize| gpu.uniform("norm params", &NormParams { n: n as u32, eps: c.eps, q_heads: 0, stride: 0 });
        let head = match &m.lm_head {
            LmHead::Blocks(part) => m.projection(&step, part, [&x, &logits_buf], None),
            LmHead::Float(_) | LmHead::Embedding => {
                let f = if let LmHead::Float(f) = &m.lm_head { f } else { &m.token_embd };
                let mut head = vec![m.rmsnorm.dispatch(
                    gpu,
                    &step,
                    &[&norm(c.n_embd), &x, &m.output_norm, &xn, &best_buf],
                    (1, 1),
                )];
                head.extend(f.shards.iter().map(|s| m.float(&m.matvec, f, s, &step, &xn, &logits_buf)));
                head
            }
        };
        let argmax =
            m.argmax.dispatch(gpu, &step, &[&norm(c.n_vocab), &logits_buf, &m.output_norm, &xn, &best_buf], (1, 1));
        gpu.check("creating a context")?;
        let hidden = match m.lm_head {
            LmHead::Blocks(_) => None,
            _ => m.embedding.then(|| (xn.clone(), gpu.readback("hidden", c.n_embd as u64 * 4), vec![0.0; c.n_embd])),
        };
        Ok(Wgpu {
            hidden,
            logits_read: gpu.readback("logits", c.n_vocab as u64 * 4),
            best_read: gpu.readback("best", 4),
            logits: vec![0.0; c.n_vocab],
            ready: None,
            m: m.clone(),
            ctx,
            step,
            embed,
            layers,
            attention,
            split_attention,
            // One chunk's positions are what the single pass takes per workgroup; the split's second
            // dispatch pays off only past that (where exactly is for measuring on each GPU).
            split_from: 2 * chunk,
            head,
            argmax,
            tile,
            x,
            logits_buf,
            best_buf,
            rope,
            caches,
            #[cfg(not(target_arch = "wasm32"))]
            batched: None,
        })
    }

    /// `Sequence::forward` with [`Want::Greedy`]: only the greedy next token (the argmax of the logits,
    /// lowest id on ties) comes back from the device; the logits are not read.
    #[cfg(not(target_arch = "wasm32"))]
    fn forward_argmax(&mut self, tokens: &[u32], pos: usize) -> Result<u32> {
        self.run(tokens, pos, Head::Argmax)?;
        let mut best = [0u32];
        self.m.gpu.read(&self.best_read, &mut best)?;
        Ok(best[0])
    }

    /// `Sequence::forward` with logits for the browser, where nothing may block: the same work is
    /// submitted, then the readback is awaited; [`Wgpu::logits`] then holds the last token's logits.
    pub async fn forward_async(&mut self, tokens: &[u32], pos: usize) -> Result<()> {
        self.run(tokens, pos, Head::Logits)?;
        self.m.gpu.read_async(&self.logits_read, &mut self.logits).await
    }

    /// The logits of the last forward pass that read them back (`Sequence::logits`, also where the
    /// `Sequence` trait is not implemented: in the browser).
    pub fn logits(&self) -> &[f32] {
        &self.logits
    }

    /// Device time per dispatch of each kernel of a token (the first layer's), for tuning: the time of
    /// `2·reps` copies in one pass minus that of `reps` (which cancels the fixed cost of a submission),
    /// over `reps`. Barriers between the copies count, as they do in a forward pass. Then a whole decode
    /// step, attention at the context's last position in one pass and split over the sequence (where to
    /// switch), and a full prompt tile's dispatches of one layer.
    #[cfg(all(feature = "probes", not(target_arch = "wasm32")))]
    pub fn time_kernels(&mut self, reps: usize) -> Result<Vec<(&'static str, f64)>> {
        self.run(&[0], 0, Head::Argmax)?;
        let gpu = &*self.m.gpu;
        let time = |ds: &[&Dispatch], n: usize| -> Result<f64> {
            let t = std::time::Instant::now();
            let mut enc = gpu.device.create_command_encoder(&Default::default());
            {
                let mut pass = enc.begin_compute_pass(&Default::default());
                for _ in 0..n {
                    ds.iter().for_each(|d| d.record(&mut pass, 0));
                }
            }
            gpu.queue.submit([enc.finish()]);
            gpu.device.poll(wgpu::PollType::wait_indefinitely()).map_err(|e| Error::Gpu(e.to_string()))?;
            Ok(t.elapsed().as_secs_f64())
        };
        let (l, attn) = (&self.layers[0], &self.attention[0]);
        let kinds: [(&str, Vec<&Dispatch>); 9] = [
            ("embedding lookup", vec![&self.embed[0]]),
            ("qkv (norm + quantize + ternary)", vec![&l.before[0]]),
            ("attention (rope + kv store), pos 0", vec![attn]),
            ("wo (+ residual)", vec![&l.after[0]]),
            ("gate/up (+ relu²·up)", vec![&l.after[1]]),
            ("down (+ residual)", vec![&l.after[2]]),
            ("final norm", vec![&self.head[0]]),
            ("LM head (all shards)", self.head[1..].iter().collect()),
            ("argmax", vec![&self.argmax]),
        ];
        let mut out = Vec::new();
        let mut measure = |name, ds: Vec<&Dispatch>| -> Result<()> {
            time(&ds, reps)?; // warm-up
            let (one, two) = (time(&ds, reps)?, time(&ds, 2 * reps)?);
            out.push((name, (two - one).max(0.0) / reps as f64 * 1e6));
            Ok(())
        };
        for (name, ds) in kinds {
            measure(name, ds)?;
        }
        // All of a decode step's dispatches: their sum above, plus what streaming every weight from memory
        // (not from the cache, as in the repeated single dispatches) adds.
        let layers =
            self.layers.iter().zip(&self.attention).flat_map(|(l, a)| l.before.iter().chain([a]).chain(&l.after));
        let whole = self.embed.iter().chain(layers).chain(&self.head).collect();
        measure("a whole decode step (pos 0, logits)", whole)?;
        let step = |s: Step| gpu.queue.write_buffer(&self.step, 0, bytemuck::bytes_of(&s));
        step(Step { token: 0, pos: (self.ctx - 1) as u32, row: 0, n: 1 });
        measure("attention, last position of the context, single pass", vec![attn])?;
        measure("attention, last position of the context, split + combine", self.split_attention[0].iter().collect())?;
        step(Step { token: 0, pos: 0, row: 0, n: TILE as u32 });
        let (t, a) = (&self.tile.layers[0], &self.tile.attention[0]);
        measure("prompt tile: qkv quantize", vec![&t.before[0]])?;
        measure("prompt tile: qkv GEMM", vec![&t.before[1]])?;
        measure("prompt tile: kv store + attention", a.iter().collect())?;
        measure("prompt tile: gate/up GEMM", vec![&t.after[3]])?;
        measure("prompt tile: down GEMM", vec![&t.after[5]])?;
        measure("prompt tile: a whole layer", t.before.iter().chain(a).chain(&t.after).collect())?;
        gpu.check("timing the kernels")?;
        Ok(out)
    }

    /// Host time (µs) of the parts of a one-token step with logits, for tuning: recording its command
    /// buffer (which [`Wgpu::run`] does while the device runs the step before), writing the step and
    /// submitting (what the device waits for), and reading the logits back once the device is done.
    #[cfg(all(feature = "probes", not(target_arch = "wasm32")))]
    pub fn time_host(&mut self, reps: usize) -> Result<Vec<(&'static str, f64)>> {
        let gpu = self.m.gpu.clone();
        let idle =
            || gpu.device.poll(wgpu::PollType::wait_indefinitely()).map(drop).map_err(|e| Error::Gpu(e.to_string()));
        let mut sums = [0.0; 3];
        for i in 0..reps {
            idle()?;
            let t = std::time::Instant::now();
            let cmd = self.record(Head::Logits, false);
            let recorded = t.elapsed();
            gpu.queue.write_buffer(
                &self.step,
                0,
                bytemuck::bytes_of(&Step { token: 1, pos: (i % self.ctx) as u32, row: 0, n: 1 }),
            );
            gpu.queue.submit([cmd]);
            let submitted = t.elapsed();
            idle()?;
            let t = std::time::Instant::now();
            gpu.read(&self.logits_read, &mut self.logits)?;
            for (sum, d) in sums.iter_mut().zip([recorded, submitted - recorded, t.elapsed()]) {
                *sum += d.as_secs_f64() * 1e6 / reps as f64;
            }
        }
        gpu.check("timing the host")?;
        Ok(["record a token", "write the step and submit", "read the logits back"].into_iter().zip(sums).collect())
    }

    /// Submits `tokens` at positions `pos..`, then `head` after the last: one token as a decode step, more
    /// in prompt tiles of up to [`TILE`] tokens, one command buffer each.
    ///
    /// A token's dispatches do not depend on its id or position (the `step` uniform holds those), so the
    /// command buffer of a decode step (with the next call's likely head) is recorded right after
    /// submitting, while the device works: the next decode step then only writes `step` and submits, and
    /// the device does not wait for the host to record ~150 dispatches. A recorded buffer is used only
    /// where its head matches; otherwise it is dropped and the step recorded on the spot.
    fn run(&mut self, tokens: &[u32], pos: usize, head: Head) -> Result<()> {
        check_input(self.ctx, self.m.config.n_vocab, tokens, pos)?;
        let queue = &self.m.gpu.queue;
        if let [token] = *tokens {
            queue.write_buffer(&self.step, 0, bytemuck::bytes_of(&Step { token, pos: pos as u32, row: 0, n: 1 }));
            let split = pos >= self.split_from;
            let cmd = match self.ready.take() {
                Some((rh, rs, cmd)) if rh == head && rs == split => cmd,
                _ => self.record(head, split),
            };
            queue.submit([cmd]);
        } else {
            for (c, chunk) in tokens.chunks(TILE).enumerate() {
                let mut steps = vec![0u8; chunk.len() * STEP_STRIDE as usize];
                for (i, (&token, entry)) in chunk.iter().zip(steps.chunks_exact_mut(STEP_STRIDE as usize)).enumerate() {
                    let s = Step { token, pos: (pos + c * TILE + i) as u32, row: i as u32, n: chunk.len() as u32 };
                    entry[..16].copy_from_slice(bytemuck::bytes_of(&s));
                }
                queue.write_buffer(&self.step, 0, &steps);
                let last = (c + 1) * TILE >= tokens.len();
                queue.submit([self.record_tile(chunk.len(), if last { head } else { Head::None })]);
            }
        }
        let split = pos + tokens.len() >= self.split_from;
        self.ready = Some((head, split, self.record(head, split)));
        self.m.gpu.check("running the model")
    }

    /// Reads back the logits (and an embedding model's hidden state) that a step with `Head::Logits` copied.
    #[cfg(not(target_arch = "wasm32"))]
    fn read_logits(&mut self) -> Result<()> {
        self.m.gpu.read(&self.logits_read, &mut self.logits)?;
        match &mut self.hidden {
            Some((_, read, h)) => self.m.gpu.read(read, h),
            None => Ok(()),
        }
    }

    /// The command buffer of a decode step, with attention split over the sequence or not, then `head`.
    fn record(&self, head: Head, split: bool) -> wgpu::CommandBuffer {
        let mut enc = self.m.gpu.device.create_command_encoder(&Default::default());
        {
            let mut pass = enc.begin_compute_pass(&Default::default());
            self.embed.iter().for_each(|d| d.record(&mut pass, 0));
            record_layers(&mut pass, &self.layers, 0, |l, pass| match split {
                true => self.split_attention[l].iter().for_each(|d| d.record(pass, 0)),
                false => self.attention[l].record(pass, 0),
            });
            self.record_head(&mut pass, head);
        }
        self.copy_head(&mut enc, head);
        enc.finish()
    }

    /// The command buffer of a prompt tile of `n` tokens (their steps at slots `0..n`), then `head` for
    /// its last token, whose residual row is copied to the decode step's `x` first.
    fn record_tile(&self, n: usize, head: Head) -> wgpu::CommandBuffer {
        let mut enc = self.m.gpu.device.create_command_encoder(&Default::default());
        {
            let mut pass = enc.begin_compute_pass(&Default::default());
            for slot in 0..n {
                self.tile.embed.iter().for_each(|d| d.record(&mut pass, slot));
            }
            record_layers(&mut pass, &self.tile.layers, 0, |l, pass| {
                self.tile.attention[l].iter().for_each(|d| d.record(pass, 0));
            });
        }
        if head != Head::None {
            self.copy_tile_row(&mut enc, &self.tile.bufs, n - 1);
            self.record_head(&mut enc.begin_compute_pass(&Default::default()), head);
            self.copy_head(&mut enc, head);
        }
        enc.finish()
    }

    /// Copies row `row` of a tile's residual stream to `x`, the LM head's input.
    fn copy_tile_row(&self, enc: &mut wgpu::CommandEncoder, t: &TileBufs, row: usize) {
        let n = self.m.config.n_embd;
        enc.copy_buffer_to_buffer(&t.x, (row * s4(n) * 4) as u64, &self.x, 0, n as u64 * 4);
    }

    /// The final norm and the LM head of `x`, and the argmax where asked.
    fn record_head(&self, pass: &mut wgpu::ComputePass, head: Head) {
        let tail: &[Dispatch] = if head == Head::None { &[] } else { &self.head };
        let argmax = (head == Head::Argmax).then_some(&self.argmax);
        tail.iter().chain(argmax).for_each(|d| d.record(pass, 0));
    }

    /// Copies what `head` computed to the buffer the host reads.
    fn copy_head(&self, enc: &mut wgpu::CommandEncoder, head: Head) {
        match head {
            // The device buffer may be padded (to whole 16 bytes): copy the logits only.
            Head::Logits => {
                enc.copy_buffer_to_buffer(&self.logits_buf, 0, &self.logits_read, 0, self.logits.len() as u64 * 4);
                if let Some((xn, read, h)) = &self.hidden {
                    enc.copy_buffer_to_buffer(xn, 0, read, 0, h.len() as u64 * 4);
                }
            }
            Head::Argmax => enc.copy_buffer_to_buffer(&self.best_buf, 0, &self.best_read, 0, 4),
            Head::None => {}
        }
    }
}

// Reading results back blocks on the device, which only native targets can do (and a `Sequence` is
// `Send`, which wgpu's objects in a browser are not): the browser uses `forward_async`.
#[cfg(not(target_arch = "wasm32"))]
impl Sequence for Wgpu {
    fn ctx(&self) -> usize {
        self.ctx
    }

    fn forward(&mut self, tokens: &[u32], pos: usize, want: Want) -> Result<Option<u32>> {
        match want {
            Want::Greedy => return self.forward_argmax(tokens, pos).map(Some),
            Want::Logits => {
                self.run(tokens, pos, Head::Logits)?;
                self.read_logits()?;
            }
            Want::Nothing => self.run(tokens, pos, Head::None)?,
        }
        Ok(None)
    }

    fn logits(&self) -> &[f32] {
        &self.logits
    }

    fn hidden(&self) -> Option<&[f32]> {
        self.hidden.as_ref().map(|(_, _, h)| h.as_slice())
    }

    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
}

#[cfg(not(target_arch = "wasm32"))]
impl Weights for GpuModel {
    fn name(&self) -> String {
        self.gpu.backend_name()
    }

    fn config(&self) -> &Config {
        &self.config
    }

    fn sequence(self: Arc<Self>, ctx: usize) -> Result<Box<dyn Sequence>> {
        Ok(Box::new(Wgpu::with_model(self, ctx)?))
    }

    fn batcher(self: Arc<Self>, _max_tokens: usize) -> Box<dyn crate::backend::Batcher> {
        Box::new(WgpuBatcher { m: self, bufs: None })
    }
}

/// Every layer: its dispatches around attention at the step entry `slot`, and `attend(l, pass)` between.
fn record_layers(
    pass: &mut wgpu::ComputePass,
    layers: &[Around],
    slot: usize,
    mut attend: impl FnMut(usize, &mut wgpu::ComputePass),
) {
    for (l, d) in layers.iter().enumerate() {
        d.before.iter().for_each(|d| d.record(pass, slot));
        attend(l, pass);
        d.after.iter().for_each(|d| d.record(pass, slot));
    }
}

/// Steps of many sequences of one [`GpuModel`]: each sequence's prompt pieces through its own prompt tiles,
/// and the sequences' single decode tokens together, as the rows of prompt-style tiles (each BitLinear
/// reads its weights once for up to [`TILE`] sequences), with each row's attention over its own cache and
/// each row's LM head as its sequence's.
#[cfg(not(target_arch = "wasm32"))]
pub struct WgpuBatcher {
    m: Arc<GpuModel>,
    /// Made on the first step, and again when a longer context comes.
    bufs: Option<BatchBufs>,
}

/// A batcher's tile, for rows of contexts up to `ctx`.
#[cfg(not(target_arch = "wasm32"))]
struct BatchBufs {
    /// Tells the sequences' attention dispatches for these buffers from those for earlier ones.
    id: u64,
    ctx: usize,
    /// Entries `0..rows`: each row's token and position; entry [`TILE`]: the tile-wide dispatches' (`n` rows).
    step: wgpu::Buffer,
    tile: TileBufs,
    embed: Vec<Dispatch>,
    layers: Vec<Around>,
    part: wgpu::Buffer,
}

#[cfg(not(target_arch = "wasm32"))]
impl BatchBufs {
    fn new(m: &GpuModel, ctx: usize) -> Self {
        static IDS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let step = m.step_buffer();
        let tile = m.tile_buffers(ctx);
        Self {
            id: IDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            ctx,
            embed: m.tile_embed(&step, &tile),
            layers: m.tile_layers(&step, &tile),
            // Unused by a tile's attention (no split), but bound.
            part: m.gpu.zeros("attention chunks", 4 * (m.config.head_dim as u64 + 2)),
            tile,
            step,
        }
    }
}

/// One sequence's decode token in a batched step.
#[cfg(not(target_arch = "wasm32"))]
struct Row<'a> {
    seq: &'a mut Wgpu,
    token: u32,
    pos: usize,
    want: Want,
}

#[cfg(not(target_arch = "wasm32"))]
impl WgpuBatcher {
    /// One token of each row's sequence (at most [`TILE`] rows), in one submission.
    fn decode(&mut self, rows: &mut [Row<'_>]) -> Result<Vec<Option<u32>>> {
        let m = self.m.clone();
        let (c, gpu) = (&m.config, &*m.gpu);
        for r in rows.iter() {
            if !Arc::ptr_eq(&r.seq.m, &m) {
                return Err(Error::Invalid("a wgpu batch of sequences of different models".into()));
            }
            check_input(r.seq.ctx, c.n_vocab, &[r.token], r.pos)?;
        }
        let ctx = rows.iter().map(|r| r.seq.ctx).max().unwrap_or(1);
        if self.bufs.as_ref().is_none_or(|b| b.ctx < ctx) {
            self.bufs = Some(BatchBufs::new(&m, ctx));
        }
        let b = self.bufs.as_ref().expect("made above");
        for r in rows.iter_mut() {
            if r.seq.batched.as_ref().is_none_or(|(id, _)| *id != b.id) {
                let s = &*r.seq;
                let attention =
                    s.caches.iter().map(|[kc, vc]| m.tile_attention(&b.step, &b.tile, &s.rope, [kc, vc], &b.part, 1));
                r.seq.batched = Some((b.id, attention.collect()));
            }
        }
        let mut steps = vec![0u8; (TILE + 1) * STEP_STRIDE as usize];
        let entries = steps.chunks_exact_mut(STEP_STRIDE as usize);
        for (i, (r, entry)) in rows.iter().zip(entries).enumerate() {
            let s = Step { token: r.token, pos: r.pos as u32, row: i as u32, n: 1 };
            entry[..16].copy_from_slice(bytemuck::bytes_of(&s));
        }
        let all = Step { token: 0, pos: 0, row: 0, n: rows.len() as u32 };
        steps[TILE * STEP_STRIDE as usize..][..16].copy_from_slice(bytemuck::bytes_of(&all));
        gpu.queue.write_buffer(&b.step, 0, &steps);

        let head = |w: Want| match w {
            Want::Nothing => Head::None,
            Want::Logits => Head::Logits,
            Want::Greedy => Head::Argmax,
        };
        let mut enc = gpu.device.create_command_encoder(&Default::default());
        {
            let mut pass = enc.begin_compute_pass(&Default::default());
            for slot in 0..rows.len() {
                b.embed.iter().for_each(|d| d.record(&mut pass, slot));
            }
            record_layers(&mut pass, &b.layers, TILE, |l, pass| {
                for (slot, r) in rows.iter().enumerate() {
                    let (_, attention) = r.seq.batched.as_ref().expect("made above");
                    attention[l].iter().for_each(|d| d.record(pass, slot));
                }
            });
        }
        for (i, r) in rows.iter().enumerate().filter(|(_, r)| r.want != Want::Nothing) {
            r.seq.copy_tile_row(&mut enc, &b.tile, i);
        }
        {
            let mut pass = enc.begin_compute_pass(&Default::default());
            rows.iter().for_each(|r| r.seq.record_head(&mut pass, head(r.want)));
        }
        rows.iter().for_each(|r| r.seq.copy_head(&mut enc, head(r.want)));
        gpu.queue.submit([enc.finish()]);
        gpu.check("running a batch")?;
        rows.iter_mut()
            .map(|r| match r.want {
                Want::Nothing => Ok(None),
                Want::Logits => r.seq.read_logits().map(|_| None),
                Want::Greedy => {
                    let mut best = [0u32];
                    gpu.read(&r.seq.best_read, &mut best)?;
                    Ok(Some(best[0]))
                }
            })
            .collect()
    }
}

#[cfg(not(target_arch = "wasm32"))]
impl crate::backend::Batcher for WgpuBatcher {
    fn forward(&mut self, steps: &mut [crate::backend::Step<'_>]) -> Result<Vec<Option<u32>>> {
        // One row per sequence (no prompt folded in), in the order of `seqs`.
        crate::backend::gpu_step::<Wgpu>(steps, "wgpu", TILE, 0, |seqs, rows| {
            let first = rows.first().map_or(0, |r| r.seq);
            let seqs = seqs[first..first + rows.len()].iter_mut();
            let mut rows: Vec<Row> =
                seqs.zip(rows).map(|(seq, r)| Row { seq, token: r.token, pos: r.pos, want: r.want }).collect();
            self.decode(&mut rows)
        })
    }
}
