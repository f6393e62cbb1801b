//! The CUDA backend (feature `cuda`): the whole forward pass on an NVIDIA GPU, computing what the CPU
//! backend computes (W1.58A8 BitLinear exact in its integer part; keys and values cached in f16).
//!
//! - Weights are uploaded once: ternary rows repacked to 2-bit codes, 16 columns per u32 word ([`pack`]),
//!   the q/k/v and gate/up matrices fused; the embedding and LM head as f16.
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

use crate::backend::{check_ctx, check_input, Sequence, Want, Weights};
use crate::model::{Activation, Config, Model};
use crate::tensor::ternary::TernaryMatrix;
use crate::{Error, Result};
use kernels::{AttnDims, Epilogue, Kernels, Linear, DEC_CHUNK, EPI_GLU, EPI_QKV, EPI_RESID};

impl From<DriverError> for Error {
    fn from(e: DriverError) -> Self {
        Error::Gpu(format!("CUDA: {e}"))
    }
}

/// Prompt tokens per batch of the prefill path (the activation buffers hold this many rows).
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
    attn_sub_norm: Buf<f32>,
    ffn_norm: Buf<f32>,
    ffn_sub_norm: Buf<f32>,
    qkv: DeviceLinear,
    wo: DeviceLinear,
    gate_up: DeviceLinear,
    down: DeviceLinear,
}

/// Activations of up to MAX_BATCH tokens (row 0 is the decode step's), caches and kernel scratch.
struct Buffers {
    x: Buf<f32>,
    q: Buf<f32>,
    att: Buf<f32>,
    h: Buf<f32>,
    xq: Buf<i8>,
    scales: Buf<f32>,
    tokens: Buf<u32>,
    /// The decode step's token and position: copied by the step's graph, as its first node, from the
    /// page-locked `_params_host`, where `set_params` writes them.
    params: Buf<i32>,
    _params_host: PinnedHostSlice<u32>,
    /// Its address, taken once (as `logits_dev`).
    params_host_ptr: usize,
    kc: Buf<u16>,
    vc: Buf<u16>,
    part_o: Buf<f32>,
    part_ml: Buf<f32>,
    att_counters: Buf<u32>,
    max_chunks: usize,
    /// The logits and their argmax, in page-locked host memory mapped into the device's address space:
    /// the LM head writes them there itself while it runs (no copy after it). With their device addresses,
    /// taken once: a graph being captured may not ask a `PinnedHostSlice` for anything (that waits on an
    /// event).
    logits_host: PinnedHostSlice<f32>,
    logits_dev: u64,
    best_host: PinnedHostSlice<i32>,
    best_dev: u64,
    block_val: Buf<f32>,
    block_idx: Buf<i32>,
    head_counter: Buf<u32>,
}

/// A captured CUDA graph.
struct Graph(CudaGraph);

// SAFETY: a graph is used only through `&mut Cuda`, so by one thread at a time; CUDA graphs may move
// between threads as long as calls on them are not concurrent.
unsafe impl Send for Graph {}

/// The CUDA backend: the model's weights on the first CUDA device, one sequence's KV cache.
pub struct Cuda {
    c: Config,
    ctx: usize,
    stream: Arc<CudaStream>,
    k: Kernels,
    layers: Vec<Layer>,
    embd: Buf<u16>,
    /// `output.weight` when the LM head is not tied to the embedding.
    head: Option<Buf<u16>>,
    output_norm: Buf<f32>,
    qkv_dst: Buf<i32>,
    qkv_rope: Buf<i32>,
    rope_cos: Buf<f32>,
    rope_sin: Buf<f32>,
    b: Buffers,
    /// The decode step, without and with the LM head.
    step: Option<Graph>,
    step_head: Option<Graph>,
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

impl Cuda {
    /// Uploads `model` to the first CUDA device, with a KV cache of `ctx` tokens.
    pub fn new(model: &Model, ctx: usize) -> Result<Self> {
        let c = model.config.clone();
        check_ctx(&c, ctx)?;
        check_shape(&c)?;
        let dev = device()?;
        // One stream, ordered: the per-buffer event tracking of cudarc is not needed (and graphs
        // must not record it).
        // SAFETY: every buffer below is used on this one stream only.
        unsafe { dev.disable_event_tracking() };
        let stream = dev.new_stream()?;
        let k = Kernels::new(&dev, stream.clone())?;
        let s = &stream;

        let (dst, rope) = pack::qkv_pairs(&c);
        let mut layers = Vec::with_capacity(c.n_layer);
        for l in &model.layers {
            let q_dim = c.n_head * c.head_dim;
            let kv_dim = c.n_head_kv * c.head_dim;
            let qkv_rows: Vec<_> = dst
                .iter()
                .map(|&r| {
                    let r = r as usize;
                    if r < q_dim {
                        (&l.wq, r)
                    } else if r < q_dim + kv_dim {
                        (&l.wk, r - q_dim)
                    } else {
                        (&l.wv, r - q_dim - kv_dim)
                    }
                })
                .collect();
            let gate_up: Vec<_> = (0..c.n_ff).flat_map(|r| [(&l.w_gate, r), (&l.w_up, r)]).collect();
            layers.push(Layer {
                attn_norm: upload(s, &l.attn_norm)?,
                attn_sub_norm: upload(s, &l.attn_sub_norm)?,
                ffn_norm: upload(s, &l.ffn_norm)?,
                ffn_sub_norm: upload(s, &l.ffn_sub_norm)?,
                qkv: DeviceLinear::new(s, &k, &qkv_rows, c.n_embd)?,
                wo: DeviceLinear::new(s, &k, &all_rows(&l.wo), q_dim)?,
                gate_up: DeviceLinear::new(s, &k, &gate_up, c.n_embd)?,
                down: DeviceLinear::new(s, &k, &all_rows(&l.w_down), c.n_ff)?,
            });
        }
        let (cos, sin) = c.rope_table(ctx);
        let b = Self::buffers(s, &k, &c, ctx)?;
        let mut cuda = Cuda {
            embd: upload(s, &pack::to_f16(&model.token_embd))?,
            head: model.output.as_ref().map(|m| upload(s, &pack::to_f16(m))).transpose()?,
            output_norm: upload(s, &model.output_norm)?,
            qkv_dst: upload(s, &dst)?,
            qkv_rope: upload(s, &rope)?,
            rope_cos: upload(s, &cos)?,
            rope_sin: upload(s, &sin)?,
            c,
            ctx,
            stream: stream.clone(),
            k,
            layers,
            b,
            step: None,
            step_head: None,
        };
        cuda.step = Some(cuda.capture(|g| g.decode_layers())?);
        cuda.step_head = Some(cuda.capture(|g| {
            g.decode_layers()?;
            g.lm_head(g.b.x.ptr)
        })?);
        stream.synchronize()?;
        Ok(cuda)
    }

    fn buffers(s: &Arc<CudaStream>, k: &Kernels, c: &Config, ctx: usize) -> Result<Buffers> {
        let t = MAX_BATCH.min(ctx);
        let (q_dim, kv_dim) = (c.n_head * c.head_dim, c.n_head_kv * c.head_dim);
        let kp = [c.n_embd, q_dim, c.n_ff].into_iter().map(|n| pack::words(n) * 16).max().unwrap_or(0);
        let max_chunks = ctx.div_ceil(DEC_CHUNK);
        let blocks = k.lm_head_blocks(c.n_vocab);
        let (logits_host, logits_dev) = mapped(s, c.n_vocab)?;
        let (best_host, best_dev) = mapped(s, 1)?;
        // SAFETY: a plain page-locked allocation, freed with the buffers.
        let mut params_host = unsafe { s.context().alloc_pinned_with_flags::<u32>(2, 0) }?;
        Ok(Buffers {
            x: zeros(s, t * c.n_embd)?,
            q: zeros(s, t * q_dim)?,
            att: zeros(s, t * q_dim)?,
            h: zeros(s, t * c.n_ff)?,
            xq: zeros(s, t * kp)?,
            scales: zeros(s, t)?,
            tokens: zeros(s, t)?,
            params: zeros(s, 2)?,
            params_host_ptr: params_host.as_mut_ptr()? as usize,
            _params_host: params_host,
            kc: zeros(s, c.n_layer * ctx * kv_dim)?,
            vc: zeros(s, c.n_layer * ctx * kv_dim)?,
            part_o: zeros(s, c.n_head * max_chunks * c.head_dim)?,
            part_ml: zeros(s, c.n_head * max_chunks * 2)?,
            att_counters: zeros(s, c.n_head)?,
            max_chunks,
            logits_dev,
            logits_host,
            block_val: zeros(s, blocks)?,
            block_idx: zeros(s, blocks)?,
            head_counter: zeros(s, 1)?,
            best_host,
            best_dev,
        })
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

    fn attn_dims(&self) -> AttnDims {
        let c = &self.c;
        AttnDims { n_head: c.n_head, hd: c.head_dim, kv_dim: c.n_head_kv * c.head_dim, group: c.n_head / c.n_head_kv }
    }

    /// This layer's key and value caches.
    fn caches(&self, l: usize) -> (u64, u64) {
        let off = l * self.ctx * self.c.n_head_kv * self.c.head_dim;
        (self.b.kc.at(off), self.b.vc.at(off))
    }

    /// The epilogues of a layer: q/k/v store with RoPE, relu²·up (or SiLU), residual add into x.
    fn epilogues(&self, l: usize) -> [Epilogue; 3] {
        let c = &self.c;
        let q_dim = c.n_head * c.head_dim;
        let (kc, vc) = self.caches(l);
        let qkv = Epilogue {
            dst: self.qkv_dst.ptr,
            rope: self.qkv_rope.ptr,
            out: self.b.q.ptr,
            kc,
            vc,
            cos: self.rope_cos.ptr,
            sin: self.rope_sin.ptr,
            kind: EPI_QKV,
            out_stride: q_dim as i32,
            q_dim: q_dim as i32,
            kv_dim: (c.n_head_kv * c.head_dim) as i32,
            rope_half: (c.rope_dim / 2) as i32,
            silu: 0,
        };
        let glu = Epilogue {
            out: self.b.h.ptr,
            kind: EPI_GLU,
            out_stride: c.n_ff as i32,
            silu: (c.activation == Activation::Silu) as i32,
            ..Default::default()
        };
        let resid = Epilogue { out: self.b.x.ptr, kind: EPI_RESID, out_stride: c.n_embd as i32, ..Default::default() };
        [qkv, glu, resid]
    }

    /// The decode step: its token and position copied in (`set_params` wrote them), the embedding, then
    /// every layer, for the token in row 0.
    fn decode_layers(&self) -> Result<()> {
        let (c, k, b) = (&self.c, &self.k, &self.b);
        let q_dim = c.n_head * c.head_dim;
        self.stream.context().bind_to_thread()?;
        // SAFETY: both buffers hold two 32-bit values and live as long as `self`, which owns the graphs that
        // replay this copy.
        unsafe {
            sys::cuMemcpyHtoDAsync_v2(b.params.ptr, b.params_host_ptr as *const c_void, 8, self.stream.cu_stream())
        }
        .result()?;
        k.embed(self.embd.ptr, c.n_embd, b.params.ptr, b.x.ptr, 1)?;
        for (l, w) in self.layers.iter().enumerate() {
            let [qkv, glu, resid] = self.epilogues(l);
            let (kc, vc) = self.caches(l);
            k.gemv(b.x.ptr, w.attn_norm.ptr, c.n_embd, c.eps, &w.qkv.lin, b.params.ptr, &qkv)?;
            let (part_o, part_ml, counters) = (b.part_o.ptr, b.part_ml.ptr, b.att_counters.ptr);
            k.attn_decode(
                b.q.ptr,
                kc,
                vc,
                self.attn_dims(),
                b.params.ptr,
                part_o,
                part_ml,
                b.max_chunks,
                counters,
                b.att.ptr,
            )?;
            k.gemv(b.att.ptr, w.attn_sub_norm.ptr, q_dim, c.eps, &w.wo.lin, b.params.ptr, &resid)?;
            k.gemv(b.x.ptr, w.ffn_norm.ptr, c.n_embd, c.eps, &w.gate_up.lin, b.params.ptr, &glu)?;
            k.gemv(b.h.ptr, w.ffn_sub_norm.ptr, c.n_ff, c.eps, &w.down.lin, b.params.ptr, &resid)?;
        }
        Ok(())
    }

    /// `t` prompt tokens (already in `tokens`) at positions `pos0..`, every layer, batched.
    fn prefill_layers(&self, t: usize, pos0: usize) -> Result<()> {
        let (c, k, b) = (&self.c, &self.k, &self.b);
        let q_dim = c.n_head * c.head_dim;
        let kp = |n: usize| pack::words(n) * 16;
        k.embed(self.embd.ptr, c.n_embd, b.tokens.ptr, b.x.ptr, t)?;
        for (l, w) in self.layers.iter().enumerate() {
            let [qkv, glu, resid] = self.epilogues(l);
            let (kc, vc) = self.caches(l);
            let (xq, sc) = (b.xq.ptr, b.scales.ptr);
            k.norm_quant_rows(b.x.ptr, w.attn_norm.ptr, c.n_embd, kp(c.n_embd), c.eps, xq, sc, t)?;
            k.gemm(xq, sc, t, &w.qkv.lin, pos0, &qkv)?;
            k.attn_prefill(b.q.ptr, kc, vc, t, pos0, self.attn_dims(), b.att.ptr)?;
            k.norm_quant_rows(b.att.ptr, w.attn_sub_norm.ptr, q_dim, kp(q_dim), c.eps, xq, sc, t)?;
            k.gemm(xq, sc, t, &w.wo.lin, pos0, &resid)?;
            k.norm_quant_rows(b.x.ptr, w.ffn_norm.ptr, c.n_embd, kp(c.n_embd), c.eps, xq, sc, t)?;
            k.gemm(xq, sc, t, &w.gate_up.lin, pos0, &glu)?;
            k.norm_quant_rows(b.h.ptr, w.ffn_sub_norm.ptr, c.n_ff, kp(c.n_ff), c.eps, xq, sc, t)?;
            k.gemm(xq, sc, t, &w.down.lin, pos0, &resid)?;
        }
        Ok(())
    }

    /// Logits and argmax of the hidden state at `x`.
    fn lm_head(&self, x: u64) -> Result<()> {
        let (c, b) = (&self.c, &self.b);
        let e = self.head.as_ref().unwrap_or(&self.embd).ptr;
        let (val, idx, counter) = (b.block_val.ptr, b.block_idx.ptr, b.head_counter.ptr);
        self.k.lm_head(
            x,
            self.output_norm.ptr,
            c.n_embd,
            c.eps,
            e,
            c.n_vocab,
            b.logits_dev,
            val,
            idx,
            counter,
            b.best_dev,
        )
    }

    /// The next decode step's token and position, for its graph to copy in (one node of the graph instead
    /// of two memsets queued before it: H100 2B4T tg128 1013-1015 -> 1020-1023 tok/s).
    fn set_params(&mut self, token: u32, pos: usize) {
        let p = self.b.params_host_ptr as *mut u32;
        // SAFETY: `params_host` holds two values, and no graph that reads them is running: every decode step
        // is waited for (`forward`).
        unsafe {
            p.write_volatile(token);
            p.add(1).write_volatile(pos as u32);
        }
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

impl Sequence for Cuda {
    fn ctx(&self) -> usize {
        self.ctx
    }

    fn forward(&mut self, tokens: &[u32], pos: usize, want: Want) -> Result<Option<u32>> {
        check_input(self.ctx, self.c.n_vocab, tokens, pos)?;
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
                self.stream.memcpy_htod(chunk, &mut self.b.tokens.mem)?;
                self.prefill_layers(chunk.len(), start)?;
                (start, last) = (start + chunk.len(), chunk.len());
            }
            if want_logits {
                self.lm_head(self.b.x.at((last - 1) * self.c.n_embd))?;
                self.stream.synchronize()?;
            }
        }
        // With the logits, the LM head took their argmax on the device too.
        match want {
            Want::Greedy => Ok(Some(self.b.best_host.as_slice()?[0] as u32)),
            _ => Ok(None),
        }
    }

    fn logits(&self) -> &[f32] {
        // `forward` synchronized the stream after the LM head: this waits for nothing.
        self.b.logits_host.as_slice().expect("the LM head has completed")
    }

    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
}

/// The model for the CUDA device. Each sequence uploads its own copy of the weights for now (the
/// decode graphs are captured over one sequence's buffers); sharing them is still to be done.
pub struct CudaModel {
    model: Model,
    name: String,
}

impl CudaModel {
    pub fn new(model: Model) -> Result<Self> {
        check_shape(&model.config)?;
        let name = format!("cuda/{}", device()?.name()?);
        Ok(Self { model, name })
    }
}

impl Weights for CudaModel {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn config(&self) -> &Config {
        &self.model.config
    }

    fn sequence(self: Arc<Self>, ctx: usize) -> Result<Box<dyn Sequence>> {
        Ok(Box::new(Cuda::new(&self.model, ctx)?))
    }
}
