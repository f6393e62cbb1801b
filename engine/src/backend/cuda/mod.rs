//! The CUDA backend (feature `cuda`): the whole forward pass on an NVIDIA GPU, computing what the CPU
//! backend computes (W1.58A8 BitLinear exact in its integer part; keys and values cached in f16, or f32 (exact)
//! or q8_0: [`CudaModel::with_kv`]).
//!
//! - [`CudaModel`]: the weights, uploaded once and shared by every sequence: ternary rows repacked to 2-bit
//!   codes, 16 columns per u32 word ([`pack`]), the q/k/v and gate/up matrices fused; the embedding and LM
//!   head as f16. The kernels are compiled once too.
//! - [`Cuda`]: one sequence (its KV cache, activations and CUDA graphs, on a stream of its own).
//! - [`CudaBatcher`]: a decode step of many sequences at once (short prompt pieces included), their tokens
//!   as the rows of the prompt path's GEMM (each row's keys and values going to its own sequence's cache at
//!   its own position), attention per row over its own cache, and one LM head pass for all rows.
//! - Decode (one token): per layer five kernels, each BitLinear fused with the RMSNorm and int8
//!   quantization of its input and with its epilogue (RoPE + KV-cache store, relu²·up, residual add);
//!   attention is flash-decoding over 128-key chunks. The step is one CUDA graph, replayed for every
//!   token (a second one ends with the LM head and its argmax, for steps whose logits are wanted).
//!   Nothing is allocated per token; the LM head writes the logits straight into page-locked host memory
//!   that [`Backend::logits`] returns as it is.
//! - Prompts: tensor-core int8 GEMM (mma.sync) with the same epilogues, and flash-style attention.
//!
//! Libraries are loaded at run time (libcuda, libnvrtc), so a build with this feature runs anywhere and
//! [`Cuda::new`] reports a missing driver or device as an error.

mod kernels;
mod pack;
#[cfg(test)]
mod tests;

use std::ffi::c_void;
use std::sync::Arc;

use cudarc::driver::sys::{self, CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{
    CudaContext, CudaGraph, CudaSlice, CudaStream, DevicePtr, DeviceRepr, DriverError, PinnedHostSlice, ValidAsZeroBits,
};

use crate::backend::{
    check_ctx, check_input, check_runs, gpu_step, Batcher, DecodeRow, KvType, Sequence, Step, Want, Weights,
};
use crate::model::{Activation, Config, Model};
use crate::tensor::ternary::TernaryMatrix;
use crate::{Error, Result};
use kernels::{
    kv_code, kv_row_bytes, AttnDims, DecodeRows, Epilogue, Kernels, KvDest, Linear, SplitK, DEC_CHUNK, EPI_GLU,
    EPI_QKV, EPI_RESID,
};

impl From<DriverError> for Error {
    fn from(e: DriverError) -> Self {
        Error::Gpu(format!("CUDA: {e}"))
    }
}

/// Prompt tokens per batch of the prefill path (a sequence's activation buffers hold this many rows), and
/// the most rows of a many-sequence step.
const MAX_BATCH: usize = 512;

/// A device buffer and its address.
struct Buf<T> {
    mem: CudaSlice<T>,
    ptr: u64,
}

impl<T> Buf<T> {
    /// The address of element `i`.
    fn at(&self, i: usize) -> u64 {
        self.ptr + (i * std::mem::size_of::<T>()) as u64
    }
}

fn upload<T: DeviceRepr>(s: &Arc<CudaStream>, host: &[T]) -> Result<Buf<T>> {
    let mem = s.clone_htod(host)?;
    let ptr = mem.device_ptr(s).0;
    Ok(Buf { mem, ptr })
}

/// `n` zeros in page-locked host memory mapped into the device's address space, and their device address.
fn mapped<T: DeviceRepr + ValidAsZeroBits + Default + Copy>(
    s: &Arc<CudaStream>,
    n: usize,
) -> Result<(PinnedHostSlice<T>, u64)> {
    // SAFETY: a cached (not write-combined: the host reads it) page-locked allocation, mapped into the
    // device's address space.
    let mut host = unsafe { s.context().alloc_pinned_with_flags::<T>(n, sys::CU_MEMHOSTALLOC_DEVICEMAP) }?;
    host.as_mut_slice()?.fill(T::default());
    let mut dev = 0;
    // SAFETY: the pointer is the start of a mapped page-locked allocation.
    unsafe { sys::cuMemHostGetDevicePointer_v2(&mut dev, host.as_mut_ptr()? as *mut c_void, 0) }.result()?;
    Ok((host, dev))
}

fn zeros<T: DeviceRepr + ValidAsZeroBits>(s: &Arc<CudaStream>, n: usize) -> Result<Buf<T>> {
    let mem = s.alloc_zeros::<T>(n.max(1))?;
    let ptr = mem.device_ptr(s).0;
    Ok(Buf { mem, ptr })
}

/// A BitLinear weight with the buffers behind its [`Linear`].
struct DeviceLinear {
    _w: Buf<u32>,
    _scales: Buf<f32>,
    lin: Linear,
}

impl DeviceLinear {
    fn new(s: &Arc<CudaStream>, k: &Kernels, rows: &[(&TernaryMatrix, usize)], cols: usize) -> Result<Self> {
        let p = pack::pack(rows, cols);
        let (w, scales) = (upload(s, &p.data)?, upload(s, &p.scales)?);
        let pairs = rows.len() / 2;
        let (blocks, chunk) = k.plan_gemv(pairs, p.words, cols, None)?;
        let lin = Linear { w: w.ptr, scales: scales.ptr, words: p.words, pairs, blocks, chunk };
        Ok(Self { _w: w, _scales: scales, lin })
    }
}

struct Layer {
    attn_norm: Buf<f32>,
    /// None for a family without sub-norms: the o and down projections quantize their raw input.
    attn_sub_norm: Option<Buf<f32>>,
    ffn_norm: Buf<f32>,
    ffn_sub_norm: Option<Buf<f32>>,
    qkv: DeviceLinear,
    wo: DeviceLinear,
    gate_up: DeviceLinear,
    down: DeviceLinear,
}

impl Layer {
    /// The sub-norms' addresses (0: none, the kernels quantize their input as it is).
    fn attn_sub_norm(&self) -> u64 {
        self.attn_sub_norm.as_ref().map_or(0, |b| b.ptr)
    }

    fn ffn_sub_norm(&self) -> u64 {
        self.ffn_sub_norm.as_ref().map_or(0, |b| b.ptr)
    }
}

/// Activations of up to `rows` tokens: a sequence's prompt batch (row 0 is its decode step's), or the rows
/// of a many-sequence step.
struct Acts {
    x: Buf<f32>,
    q: Buf<f32>,
    att: Buf<f32>,
    h: Buf<f32>,
    xq: Buf<i8>,
    scales: Buf<f32>,
    tokens: Buf<u32>,
    /// The GEMM's split-K partial sums and tile counters.
    part: Buf<i32>,
    done: Buf<u32>,
    /// A q8_0 cache's keys and values before `kv_quant` (`[row][2 kv_dim]`; unused by the other types).
    stage: Buf<f32>,
}

impl Acts {
    fn new(s: &Arc<CudaStream>, k: &Kernels, c: &Config, rows: usize, kv: KvType) -> Result<Self> {
        let kp = [c.n_embd, c.q_dim(), c.n_ff].into_iter().map(|n| pack::words(n) * 16).max().unwrap_or(0);
        let (part, done) = k.split_k_sizes();
        Ok(Self {
            part: zeros(s, part)?,
            done: zeros(s, done)?,
            x: zeros(s, rows * c.n_embd)?,
            q: zeros(s, rows * c.q_dim())?,
            att: zeros(s, rows * c.q_dim())?,
            h: zeros(s, rows * c.n_ff)?,
            xq: zeros(s, rows * kp)?,
            scales: zeros(s, rows)?,
            tokens: zeros(s, rows)?,
            stage: zeros(s, if kv == KvType::Q8_0 { rows * 2 * c.kv_dim() } else { 0 })?,
        })
    }
}

/// RoPE's cos and sin for positions `0..ctx`.
struct Rope {
    cos: Buf<f32>,
    sin: Buf<f32>,
}

impl Rope {
    fn new(s: &Arc<CudaStream>, c: &Config, ctx: usize) -> Result<Self> {
        let (cos, sin) = c.rope_table(ctx);
        Ok(Self { cos: upload(s, &cos)?, sin: upload(s, &sin)? })
    }
}

/// The partial results of flash-decoding attention and of the LM head's argmax, for `rows` rows of up to
/// `ctx` positions.
struct Scratch {
    part_o: Buf<f32>,
    part_ml: Buf<f32>,
    att_counters: Buf<u32>,
    max_chunks: usize,
    block_val: Buf<f32>,
    block_idx: Buf<i32>,
    head_counters: Buf<u32>,
    /// The split inputs of the many-token LM head (`head_split_rows` in head.cu).
    head_xh: Buf<u16>,
    head_xl: Buf<u16>,
    head_inv: Buf<f32>,
}

impl Scratch {
    fn new(s: &Arc<CudaStream>, k: &Kernels, c: &Config, rows: usize, ctx: usize) -> Result<Self> {
        let max_chunks = ctx.div_ceil(DEC_CHUNK);
        let blocks = k.lm_head_blocks(c.n_vocab).max(Kernels::lm_head_mma_blocks(c.n_vocab));
        let split_rows = if rows > 1 { Kernels::head_split_rows_for(rows) } else { 0 };
        Ok(Self {
            head_xh: zeros(s, split_rows * c.n_embd)?,
            head_xl: zeros(s, split_rows * c.n_embd)?,
            head_inv: zeros(s, split_rows)?,
            part_o: zeros(s, rows * c.n_head * max_chunks * c.head_dim)?,
            part_ml: zeros(s, rows * c.n_head * max_chunks * 2)?,
            att_counters: zeros(s, rows * c.n_head)?,
            max_chunks,
            block_val: zeros(s, rows * blocks)?,
            block_idx: zeros(s, rows * blocks)?,
            head_counters: zeros(s, rows)?,
        })
    }
}

/// The model on the first CUDA device: its weights and the compiled kernels, shared (`Arc`) by every
/// sequence and batcher.
pub struct CudaModel {
    c: Config,
    name: String,
    /// The stream the weights were uploaded on.
    stream: Arc<CudaStream>,
    k: Kernels,
    layers: Vec<Layer>,
    embd: Buf<u16>,
    /// `output.weight` when the LM head is not tied to the embedding.
    head: Option<Buf<u16>>,
    output_norm: Buf<f32>,
    qkv_dst: Buf<i32>,
    qkv_rope: Buf<i32>,
    /// The KV cache type of its sequences.
    kv: KvType,
}

/// Whether a CUDA driver, NVRTC and at least one device are present (for `--backend auto`).
pub fn available() -> bool {
    // SAFETY: only probes whether the shared libraries can be opened.
    let libs = unsafe { cudarc::driver::sys::is_culib_present() && cudarc::nvrtc::sys::is_culib_present() };
    libs && CudaContext::device_count().is_ok_and(|n| n > 0)
}

/// The first CUDA device, or why there is none.
fn device() -> Result<Arc<CudaContext>> {
    // SAFETY: only probes whether the shared libraries can be opened.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(Error::Gpu("no CUDA driver (libcuda) found".into()));
    }
    // SAFETY: as above.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(Error::Gpu("NVRTC (libnvrtc) not found: install the CUDA toolkit's runtime compiler".into()));
    }
    if CudaContext::device_count()? < 1 {
        return Err(Error::Gpu("no CUDA device".into()));
    }
    Ok(CudaContext::new(0)?)
}

impl CudaModel {
    /// Compiles the kernels for the first CUDA device and uploads `model`'s weights to it.
    pub fn new(model: Model) -> Result<Self> {
        let c = model.config.clone();
        check_shape(&c)?;
        let dev = device()?;
        // Each sequence and batcher works on one stream of its own, in order: the per-buffer event
        // tracking of cudarc is not needed (and graphs must not record it).
        // SAFETY: every buffer is used on one stream only (the weights are read-only once uploaded, and
        // uploaded before any sequence exists).
        unsafe { dev.disable_event_tracking() };
        let stream = dev.new_stream()?;
        let k = Kernels::new(&dev, stream.clone())?;
        let s = &stream;
        let (dst, rope) = pack::qkv_pairs(&c);
        let sub_norm = |v: &[f32]| (!v.is_empty()).then(|| upload(s, v)).transpose();
        let mut layers = Vec::with_capacity(c.n_layer);
        check_runs(&model, "CUDA")?;
        for l in &model.layers {
            let [wq, wk, wv, wo, w_gate, w_up, w_down] = l.ternary().expect("checked by check_runs");
            let (q_dim, kv_dim) = (c.q_dim(), c.kv_dim());
            let qkv_rows: Vec<_> = dst
                .iter()
                .map(|&r| {
                    let r = r as usize;
                    if r < q_dim {
                        (wq, r)
                    } else if r < q_dim + kv_dim {
                        (wk, r - q_dim)
                    } else {
                        (wv, r - q_dim - kv_dim)
                    }
                })
                .collect();
            let gate_up: Vec<_> = (0..c.n_ff).flat_map(|r| [(w_gate, r), (w_up, r)]).collect();
            layers.push(Layer {
                attn_norm: upload(s, &l.attn_norm)?,
                attn_sub_norm: sub_norm(&l.attn_sub_norm)?,
                ffn_norm: upload(s, &l.ffn_norm)?,
                ffn_sub_norm: sub_norm(&l.ffn_sub_norm)?,
                qkv: DeviceLinear::new(s, &k, &qkv_rows, c.n_embd)?,
                wo: DeviceLinear::new(s, &k, &all_rows(wo), q_dim)?,
                gate_up: DeviceLinear::new(s, &k, &gate_up, c.n_embd)?,
                down: DeviceLinear::new(s, &k, &all_rows(w_down), c.n_ff)?,
            });
        }
        let m = CudaModel {
            name: format!("cuda/{}", dev.name()?),
            embd: upload(s, &pack::to_f16(&model.token_embd))?,
            head: model.output.as_ref().map(|m| upload(s, &pack::to_f16(m))).transpose()?,
            output_norm: upload(s, &model.output_norm)?,
            qkv_dst: upload(s, &dst)?,
            qkv_rope: upload(s, &rope)?,
            c,
            stream: stream.clone(),
            k,
            layers,
            kv: KvType::F16,
        };
        m.k.check_attention(&m.attn_dims())?;
        stream.synchronize()?;
        Ok(m)
    }

    /// Its sequences cache keys and values as `kv` (f16 unless this is called): q8_0 needs heads of a
    /// multiple of 32 (its blocks), f32 twice f16's shared memory in the attention kernels.
    pub fn with_kv(mut self, kv: KvType) -> Result<Self> {
        if kv == KvType::Q8_0 && !self.c.head_dim.is_multiple_of(32) {
            return Err(Error::Unsupported(format!(
                "a q8_0 KV cache needs heads of a multiple of 32 values (this model's are {})",
                self.c.head_dim
            )));
        }
        self.kv = kv;
        self.k.check_attention(&self.attn_dims())?;
        Ok(self)
    }

    fn attn_dims(&self) -> AttnDims {
        let c = &self.c;
        AttnDims { n_head: c.n_head, hd: c.head_dim, kv_dim: c.kv_dim(), group: c.n_head / c.n_head_kv, kv: self.kv }
    }

    /// The epilogues of a layer over the activations `a`: q/k/v store with RoPE (keys and values to `kv`),
    /// relu²·up (or SiLU), residual add into x.
    fn epilogues(&self, a: &Acts, rope: &Rope, kv: KvDest) -> [Epilogue; 3] {
        let c = &self.c;
        let qkv = Epilogue {
            dst: self.qkv_dst.ptr,
            rope: self.qkv_rope.ptr,
            out: a.q.ptr,
            kc: kv.kc,
            vc: kv.vc,
            cos: rope.cos.ptr,
            sin: rope.sin.ptr,
            kind: EPI_QKV,
            out_stride: c.q_dim() as i32,
            q_dim: c.q_dim() as i32,
            kv_dim: c.kv_dim() as i32,
            rope_half: (c.rope_dim / 2) as i32,
            silu: 0,
            row_pos: kv.row_pos,
            row_kv: kv.row_kv,
            stage: a.stage.ptr,
            kv_type: kv_code(self.kv) as i32,
        };
        let glu = Epilogue {
            out: a.h.ptr,
            kind: EPI_GLU,
            out_stride: c.n_ff as i32,
            silu: (c.activation == Activation::Silu) as i32,
            ..Default::default()
        };
        let resid = Epilogue { out: a.x.ptr, kind: EPI_RESID, out_stride: c.n_embd as i32, ..Default::default() };
        [qkv, glu, resid]
    }

    /// `t` tokens (their ids in `a.tokens`) through every layer on the tensor-core GEMM: a piece of one
    /// sequence's prompt at positions `pos0..`, or one token of each of `t` sequences. `kv(l)` says where
    /// layer l's keys and values go, `attend(l)` runs its attention (`a.q` into `a.att`).
    #[allow(clippy::too_many_arguments)]
    fn gemm_layers(
        &self,
        k: &Kernels,
        a: &Acts,
        t: usize,
        pos0: usize,
        rope: &Rope,
        kv: impl Fn(usize) -> KvDest,
        attend: impl Fn(usize) -> Result<()>,
    ) -> Result<()> {
        let c = &self.c;
        let kp = |n: usize| pack::words(n) * 16;
        let (xq, sc) = (a.xq.ptr, a.scales.ptr);
        let sk = &SplitK { part: a.part.ptr, done: a.done.ptr };
        k.embed(self.embd.ptr, c.n_embd, a.tokens.ptr, a.x.ptr, t)?;
        for (l, w) in self.layers.iter().enumerate() {
            let [qkv, glu, resid] = self.epilogues(a, rope, kv(l));
            k.norm_quant_rows(a.x.ptr, w.attn_norm.ptr, c.n_embd, kp(c.n_embd), c.eps, xq, sc, t)?;
            k.gemm(xq, sc, t, &w.qkv.lin, pos0, &qkv, sk)?;
            self.quantize_kv(k, a, t, pos0, 0, kv(l))?;
            attend(l)?;
            k.norm_quant_rows(a.att.ptr, w.attn_sub_norm(), c.q_dim(), kp(c.q_dim()), c.eps, xq, sc, t)?;
            k.gemm(xq, sc, t, &w.wo.lin, pos0, &resid, sk)?;
            k.norm_quant_rows(a.x.ptr, w.ffn_norm.ptr, c.n_embd, kp(c.n_embd), c.eps, xq, sc, t)?;
            k.gemm(xq, sc, t, &w.gate_up.lin, pos0, &glu, sk)?;
            k.norm_quant_rows(a.h.ptr, w.ffn_sub_norm(), c.n_ff, kp(c.n_ff), c.eps, xq, sc, t)?;
            k.gemm(xq, sc, t, &w.down.lin, pos0, &resid, sk)?;
        }
        Ok(())
    }

    /// With a q8_0 cache, stores the `t` rows of keys and values the QKV epilogue left in `a.stage`.
    fn quantize_kv(&self, k: &Kernels, a: &Acts, t: usize, pos0: usize, params: u64, kv: KvDest) -> Result<()> {
        if self.kv != KvType::Q8_0 {
            return Ok(());
        }
        k.kv_quant(a.stage.ptr, self.c.kv_dim(), t, pos0, params, kv)
    }

    /// Bytes of one token's keys (or values) in a cache.
    fn kv_row_bytes(&self) -> usize {
        kv_row_bytes(self.kv, self.c.kv_dim())
    }

    /// The LM head's matrix.
    fn head_matrix(&self) -> u64 {
        self.head.as_ref().unwrap_or(&self.embd).ptr
    }

    /// Logits and argmax of the hidden state at `x`, to `logits` and `best`.
    fn lm_head(&self, k: &Kernels, x: u64, logits: u64, best: u64, s: &Scratch) -> Result<()> {
        let c = &self.c;
        let (val, idx, counter) = (s.block_val.ptr, s.block_idx.ptr, s.head_counters.ptr);
        k.lm_head(
            x,
            self.output_norm.ptr,
            c.n_embd,
            c.eps,
            self.head_matrix(),
            c.n_vocab,
            logits,
            val,
            idx,
            counter,
            best,
        )
    }

    /// Logits and argmax of the `nt` hidden states at `x`, to the addresses in `outs` (see `lm_head_mma` in
    /// head.cu).
    fn lm_head_rows(&self, k: &Kernels, x: u64, nt: usize, outs: u64, s: &Scratch) -> Result<()> {
        let c = &self.c;
        let best = [s.block_val.ptr, s.block_idx.ptr, s.head_counters.ptr];
        let split = [s.head_xh.ptr, s.head_xl.ptr, s.head_inv.ptr];
        let (norm, e) = (self.output_norm.ptr, self.head_matrix());
        k.lm_head_rows(x, nt, norm, c.n_embd, c.eps, e, c.n_vocab, outs, split, best)
    }
}

impl Weights for CudaModel {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn config(&self) -> &Config {
        &self.c
    }

    fn sequence(self: Arc<Self>, ctx: usize) -> Result<Box<dyn Sequence>> {
        Ok(Box::new(Cuda::new(&self, ctx)?))
    }

    fn batcher(self: Arc<Self>, max_tokens: usize) -> Box<dyn Batcher> {
        Box::new(CudaBatcher { m: self, rows: max_tokens.clamp(1, MAX_BATCH), bufs: None })
    }
}

/// A captured CUDA graph.
struct Graph(CudaGraph);

// SAFETY: a graph is used only through `&mut Cuda`, so by one thread at a time; CUDA graphs may move
// between threads as long as calls on them are not concurrent.
unsafe impl Send for Graph {}

/// One sequence on the CUDA device: its KV cache (f16), its activations and its decode graphs, on a stream
/// of its own.
pub struct Cuda {
    /// The decode step, without and with the LM head.
    step: Option<Graph>,
    step_head: Option<Graph>,
    m: Arc<CudaModel>,
    ctx: usize,
    stream: Arc<CudaStream>,
    k: Kernels,
    a: Acts,
    rope: Rope,
    scratch: Scratch,
    /// Keys and values, `[layer][ctx]` rows of `CudaModel::kv_row_bytes`.
    kc: Buf<u8>,
    vc: Buf<u8>,
    /// The decode step's token and position: copied by the step's graph, as its first node, from the
    /// page-locked `_params_host`, where `set_params` writes them.
    params: Buf<i32>,
    _params_host: PinnedHostSlice<u32>,
    /// Its address, taken once (as `logits_dev`).
    params_host_ptr: usize,
    /// The logits and their argmax, in page-locked host memory mapped into the device's address space:
    /// the LM head writes them there itself while it runs (no copy after it). With their device addresses,
    /// taken once: a graph being captured may not ask a `PinnedHostSlice` for anything (that waits on an
    /// event).
    logits_host: PinnedHostSlice<f32>,
    logits_dev: u64,
    best_host: PinnedHostSlice<i32>,
    best_dev: u64,
}

impl Cuda {
    /// A sequence of `ctx` tokens of the model `m`.
    pub fn new(m: &Arc<CudaModel>, ctx: usize) -> Result<Self> {
        let c = &m.c;
        check_ctx(c, ctx)?;
        let stream = m.stream.context().new_stream()?;
        let k = m.k.on(stream.clone());
        let s = &stream;
        let (logits_host, logits_dev) = mapped(s, c.n_vocab)?;
        let (best_host, best_dev) = mapped(s, 1)?;
        // SAFETY: a plain page-locked allocation, freed with the sequence.
        let mut params_host = unsafe { s.context().alloc_pinned_with_flags::<u32>(2, 0) }?;
        let mut seq = Cuda {
            a: Acts::new(s, &k, c, MAX_BATCH.min(ctx), m.kv)?,
            rope: Rope::new(s, c, ctx)?,
            scratch: Scratch::new(s, &k, c, 1, ctx)?,
            kc: zeros(s, c.n_layer * ctx * m.kv_row_bytes())?,
            vc: zeros(s, c.n_layer * ctx * m.kv_row_bytes())?,
            params: zeros(s, 2)?,
            params_host_ptr: params_host.as_mut_ptr()? as usize,
            _params_host: params_host,
            logits_host,
            logits_dev,
            best_host,
            best_dev,
            step: None,
            step_head: None,
            m: m.clone(),
            ctx,
            stream: stream.clone(),
            k,
        };
        seq.step = Some(seq.capture(|g| g.decode_layers())?);
        seq.step_head = Some(seq.capture(|g| {
            g.decode_layers()?;
            g.m.lm_head(&g.k, g.a.x.ptr, g.logits_dev, g.best_dev, &g.scratch)
        })?);
        stream.synchronize()?;
        Ok(seq)
    }

    /// Records the launches of `f` into a CUDA graph.
    fn capture(&self, f: impl FnOnce(&Self) -> Result<()>) -> Result<Graph> {
        self.stream.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)?;
        let recorded = f(self);
        let graph = self.stream.end_capture(CUgraphInstantiate_flags(0))?;
        recorded?;
        let graph = graph.ok_or_else(|| Error::Gpu("CUDA graph capture recorded nothing".into()))?;
        graph.upload()?;
        Ok(Graph(graph))
    }

    /// This layer's key and value caches.
    fn caches(&self, l: usize) -> (u64, u64) {
        let off = l * self.ctx * self.m.kv_row_bytes();
        (self.kc.at(off), self.vc.at(off))
    }

    fn kv_dest(&self, l: usize) -> KvDest {
        let (kc, vc) = self.caches(l);
        KvDest { kc, vc, ..Default::default() }
    }

    /// The decode step: its token and position copied in (`set_params` wrote them), the embedding, then
    /// every layer, for the token in row 0.
    fn decode_layers(&self) -> Result<()> {
        let (m, k, a, s) = (&*self.m, &self.k, &self.a, &self.scratch);
        let c = &m.c;
        self.stream.context().bind_to_thread()?;
        // SAFETY: both buffers hold two 32-bit values and live as long as `self`, which owns the graphs that
        // replay this copy.
        unsafe {
            sys::cuMemcpyHtoDAsync_v2(
                self.params.ptr,
                self.params_host_ptr as *const c_void,
                8,
                self.stream.cu_stream(),
            )
        }
        .result()?;
        k.embed(m.embd.ptr, c.n_embd, self.params.ptr, a.x.ptr, 1)?;
        let rows = DecodeRows { params: self.params.ptr, row_pos: 0, row_kv: 0, rows: 1, chunks: s.max_chunks };
        for (l, w) in m.layers.iter().enumerate() {
            let [qkv, glu, resid] = m.epilogues(a, &self.rope, self.kv_dest(l));
            let (kc, vc) = self.caches(l);
            let p = self.params.ptr;
            k.gemv(a.x.ptr, w.attn_norm.ptr, c.n_embd, c.eps, &w.qkv.lin, p, &qkv)?;
            m.quantize_kv(k, a, 1, 0, p, self.kv_dest(l))?;
            let (part_o, part_ml, counters) = (s.part_o.ptr, s.part_ml.ptr, s.att_counters.ptr);
            k.attn_decode(a.q.ptr, kc, vc, m.attn_dims(), &rows, part_o, part_ml, s.max_chunks, counters, a.att.ptr)?;
            k.gemv(a.att.ptr, w.attn_sub_norm(), c.q_dim(), c.eps, &w.wo.lin, p, &resid)?;
            k.gemv(a.x.ptr, w.ffn_norm.ptr, c.n_embd, c.eps, &w.gate_up.lin, p, &glu)?;
            k.gemv(a.h.ptr, w.ffn_sub_norm(), c.n_ff, c.eps, &w.down.lin, p, &resid)?;
        }
        Ok(())
    }

    /// `t` prompt tokens (already in `a.tokens`) at positions `pos0..`, every layer, batched.
    fn prefill_layers(&self, t: usize, pos0: usize) -> Result<()> {
        let (m, a) = (&*self.m, &self.a);
        let attend = |l| {
            let (kc, vc) = self.caches(l);
            self.k.attn_prefill(a.q.ptr, kc, vc, t, pos0, m.attn_dims(), a.att.ptr)
        };
        m.gemm_layers(&self.k, a, t, pos0, &self.rope, |l| self.kv_dest(l), attend)
    }

    /// The next decode step's token and position, for its graph to copy in (one node of the graph instead
    /// of two memsets queued before it: H100 2B4T tg128 1013-1015 -> 1020-1023 tok/s).
    fn set_params(&mut self, token: u32, pos: usize) {
        let p = self.params_host_ptr as *mut u32;
        // SAFETY: `params_host` holds two values, and no graph that reads them is running: every decode step
        // is waited for (`forward`).
        unsafe {
            p.write_volatile(token);
            p.add(1).write_volatile(pos as u32);
        }
    }

    /// The greedy token the last LM head pass left for this sequence.
    fn best(&self) -> Result<u32> {
        Ok(self.best_host.as_slice()?[0] as u32)
    }
}

impl Sequence for Cuda {
    fn ctx(&self) -> usize {
        self.ctx
    }

    fn forward(&mut self, tokens: &[u32], pos: usize, want: Want) -> Result<Option<u32>> {
        check_input(self.ctx, self.m.c.n_vocab, tokens, pos)?;
        let want_logits = want != Want::Nothing;
        if tokens.len() == 1 {
            self.set_params(tokens[0], pos);
            let graph = if want_logits { &self.step_head } else { &self.step };
            graph.as_ref().expect("captured in new").0.launch()?;
            // Before `params_host` can change again; with the LM head, its logits are then written.
            self.stream.synchronize()?;
        } else {
            let (mut start, mut last) = (pos, 0);
            for chunk in tokens.chunks(MAX_BATCH.min(self.ctx)) {
                self.stream.memcpy_htod(chunk, &mut self.a.tokens.mem)?;
                self.prefill_layers(chunk.len(), start)?;
                (start, last) = (start + chunk.len(), chunk.len());
            }
            if want_logits {
                let x = self.a.x.at((last - 1) * self.m.c.n_embd);
                self.m.lm_head(&self.k, x, self.logits_dev, self.best_dev, &self.scratch)?;
                self.stream.synchronize()?;
            }
        }
        // With the logits, the LM head took their argmax on the device too.
        match want {
            Want::Greedy => Ok(Some(self.best()?)),
            _ => Ok(None),
        }
    }

    fn logits(&self) -> &[f32] {
        // `forward` synchronized the stream after the LM head: this waits for nothing.
        self.logits_host.as_slice().expect("the LM head has completed")
    }

    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
}

/// Steps of many sequences of one [`CudaModel`]: the sequences' decode tokens, and their prompt pieces of
/// up to `FOLD_PROMPTS` tokens, together as the rows of one pass (the GEMM reads each weight once for all
/// of them, where one decode graph per sequence reads them all once per token); longer pieces through each
/// sequence's own prefill path.
pub struct CudaBatcher {
    m: Arc<CudaModel>,
    /// The most rows of one pass.
    rows: usize,
    /// Made on the first step, and again when a longer context comes.
    bufs: Option<BatchBuffers>,
}

/// A batcher's device memory, for rows of contexts up to `ctx`.
struct BatchBuffers {
    stream: Arc<CudaStream>,
    k: Kernels,
    ctx: usize,
    a: Acts,
    rope: Rope,
    scratch: Scratch,
    /// Each row's position, its sequence's key and value caches per layer (`[layer][row][2]`), and where
    /// the LM head writes its logits and argmax (`[row][2]`): see bitlinear.cu and head.cu.
    row_pos: Buf<i32>,
    row_kv: Buf<u64>,
    outs: Buf<u64>,
}

impl BatchBuffers {
    fn new(m: &CudaModel, rows: usize, ctx: usize) -> Result<Self> {
        let c = &m.c;
        let stream = m.stream.context().new_stream()?;
        let k = m.k.on(stream.clone());
        let s = &stream;
        Ok(Self {
            a: Acts::new(s, &k, c, rows, m.kv)?,
            rope: Rope::new(s, c, ctx)?,
            scratch: Scratch::new(s, &k, c, rows, ctx)?,
            row_pos: zeros(s, rows)?,
            row_kv: zeros(s, c.n_layer * rows * 2)?,
            outs: zeros(s, rows * 2)?,
            ctx,
            stream,
            k,
        })
    }
}

/// Prompt pieces of at most this many tokens go through a batched step's pass as rows beside the decode
/// tokens (longer ones through their own prompt pass): an own pass reads every weight once more, and its
/// launches are not a graph's, which costs a serving step more than a few more rows of the pass.
const FOLD_PROMPTS: usize = 64;

impl CudaBatcher {
    /// The buffers for rows of contexts up to `ctx`.
    fn buffers(&mut self, ctx: usize) -> Result<&BatchBuffers> {
        if self.bufs.as_ref().is_none_or(|b| b.ctx < ctx) {
            self.bufs = None; // freed before the larger ones are made
            self.bufs = Some(BatchBuffers::new(&self.m, self.rows, ctx)?);
        }
        Ok(self.bufs.as_ref().expect("made above"))
    }

    /// The rows' tokens (each at its own position of its sequence in `seqs`), in one pass.
    fn decode(&mut self, seqs: &mut [&mut Cuda], rows: &[DecodeRow]) -> Result<Vec<Option<u32>>> {
        let m = self.m.clone();
        let c = &m.c;
        let seq = |r: &DecodeRow| &*seqs[r.seq];
        for r in rows {
            if !Arc::ptr_eq(&seq(r).m, &m) {
                return Err(Error::Invalid("a CUDA batch of sequences of different models".into()));
            }
            check_input(seq(r).ctx, c.n_vocab, &[r.token], r.pos)?;
            // Its own stream's work (a prompt piece) is done before this pass reads its cache.
            seq(r).stream.synchronize()?;
        }
        let ctx = rows.iter().map(|r| seq(r).ctx).max().unwrap_or(1);
        let t = rows.len();
        let tokens: Vec<u32> = rows.iter().map(|r| r.token).collect();
        let pos: Vec<i32> = rows.iter().map(|r| r.pos as i32).collect();
        let kv: Vec<u64> =
            (0..c.n_layer).flat_map(|l| rows.iter().flat_map(move |r| <[u64; 2]>::from(seq(r).caches(l)))).collect();
        // Where the LM head leaves each row's logits and argmax (nothing for a prompt piece's earlier rows).
        let outs: Vec<u64> = rows
            .iter()
            .flat_map(|r| {
                let logits = if r.want == Want::Logits { seq(r).logits_dev } else { 0 };
                [logits, if r.want == Want::Nothing { 0 } else { seq(r).best_dev }]
            })
            .collect();
        self.buffers(ctx)?;
        let b = self.bufs.as_mut().expect("made by buffers");
        b.stream.memcpy_htod(&tokens, &mut b.a.tokens.mem)?;
        b.stream.memcpy_htod(&pos, &mut b.row_pos.mem)?;
        b.stream.memcpy_htod(&kv, &mut b.row_kv.mem)?;
        b.stream.memcpy_htod(&outs, &mut b.outs.mem)?;
        let b = &*b;
        let s = &b.scratch;
        let row_kv = |l: usize| b.row_kv.at(l * t * 2);
        let kv_dest = |l| KvDest { row_pos: b.row_pos.ptr, row_kv: row_kv(l), ..Default::default() };
        let chunks = rows.iter().map(|r| r.pos / DEC_CHUNK + 1).max().unwrap_or(1);
        let attend = |l| {
            let d = DecodeRows { params: 0, row_pos: b.row_pos.ptr, row_kv: row_kv(l), rows: t, chunks };
            let (part_o, part_ml, counters) = (s.part_o.ptr, s.part_ml.ptr, s.att_counters.ptr);
            b.k.attn_decode(b.a.q.ptr, 0, 0, m.attn_dims(), &d, part_o, part_ml, s.max_chunks, counters, b.a.att.ptr)
        };
        m.gemm_layers(&b.k, &b.a, t, 0, &b.rope, kv_dest, attend)?;
        if rows.iter().any(|r| r.want != Want::Nothing) {
            m.lm_head_rows(&b.k, b.a.x.ptr, t, b.outs.ptr, s)?;
        }
        b.stream.synchronize()?;
        rows.iter().map(|r| if r.want == Want::Greedy { seq(r).best().map(Some) } else { Ok(None) }).collect()
    }
}

impl Batcher for CudaBatcher {
    fn forward(&mut self, steps: &mut [Step<'_>]) -> Result<Vec<Option<u32>>> {
        let per_pass = self.rows;
        gpu_step::<Cuda>(steps, "CUDA", per_pass, FOLD_PROMPTS, |seqs, rows| self.decode(seqs, rows))
    }
}

fn all_rows(m: &TernaryMatrix) -> Vec<(&TernaryMatrix, usize)> {
    (0..m.rows).map(|r| (m, r)).collect()
}

/// Shapes the kernels handle: even row counts (row pairs), 16-byte rows of f16 for the head and the
/// caches, head dimensions the attention kernels' register tiles cover, and BitLinear inputs the fused
/// normalization holds in registers.
fn check_shape(c: &Config) -> Result<()> {
    let widest = c.n_embd.max(c.n_ff).max(c.n_head * c.head_dim);
    let ok = c.n_embd.is_multiple_of(8)
        && c.n_ff.is_multiple_of(4)
        && c.head_dim.is_multiple_of(8)
        && c.head_dim <= 256
        && c.rope_dim <= c.head_dim
        && widest <= kernels::MAX_NORM;
    if ok {
        return Ok(());
    }
    Err(Error::Unsupported(format!(
        "CUDA backend: embedding {} (needs a multiple of 8), ff {} (a multiple of 4), head dim {} (a multiple of 8, at most 256), inputs of at most {}",
        c.n_embd, c.n_ff, c.head_dim, kernels::MAX_NORM
    )))
}
