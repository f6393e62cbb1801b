//! The CUDA C kernels of shaders/cuda/, compiled at run time with NVRTC for the device's architecture, and one
//! typed launch function per kernel. Buffers are passed as raw device addresses: every buffer is allocated
//! once and outlives the launches (and the CUDA graphs) that use it.

use std::ffi::c_void;
use std::sync::Arc;

use cudarc::driver::sys::{self, CUdevice_attribute, CUfunction_attribute, CUlaunchAttribute, CUlaunchAttributeID};
use cudarc::driver::{CudaContext, CudaFunction, CudaStream, DeviceRepr};
use cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions};

use crate::backend::KvType;
use crate::{Error, Result};

const SOURCES: [&str; 4] = [
    include_str!("../../../../shaders/cuda/common.cuh"),
    include_str!("../../../../shaders/cuda/bitlinear.cu"),
    include_str!("../../../../shaders/cuda/attention.cu"),
    include_str!("../../../../shaders/cuda/head.cu"),
];

/// Epilogue kinds of the BitLinear kernels (EPI_* in bitlinear.cu).
pub const EPI_QKV: i32 = 0;
pub const EPI_GLU: i32 = 1;
pub const EPI_RESID: i32 = 2;

/// What a BitLinear kernel does with each finished row pair: `struct Epilogue` of bitlinear.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Epilogue {
    pub dst: u64,
    pub rope: u64,
    pub out: u64,
    pub kc: u64,
    pub vc: u64,
    pub cos: u64,
    pub sin: u64,
    pub kind: i32,
    pub out_stride: i32,
    pub q_dim: i32,
    pub kv_dim: i32,
    pub rope_half: i32,
    pub silu: i32,
    pub row_pos: u64,
    pub row_kv: u64,
    pub stage: u64,
    /// [`kv_code`] of the caches' type.
    pub kv_type: i32,
}

// SAFETY: plain old data with the C layout of the kernel parameter it is passed as.
unsafe impl DeviceRepr for Epilogue {}

/// A cache type's number in the kernels (KV_* in common.cuh), which also indexes the kernels made per type.
pub fn kv_code(kv: KvType) -> usize {
    match kv {
        KvType::F16 => 0,
        KvType::F32 => 1,
        KvType::Q8_0 => 2,
    }
}

/// Bytes of one token's keys (or values) of `kv_dim` values in a cache of type `kv`: as `kv_row_bytes` in
/// common.cuh (q8_0: the int8 values, then an f16 scale per 32, padded to 16 bytes).
pub fn kv_row_bytes(kv: KvType, kv_dim: usize) -> usize {
    match kv {
        KvType::F16 => 2 * kv_dim,
        KvType::F32 => 4 * kv_dim,
        KvType::Q8_0 => (kv_dim + kv_dim / 16).div_ceil(16) * 16,
    }
}

/// Where `bitlinear_gemm` leaves and counts its split-K partial sums (`struct SplitK` of bitlinear.cu):
/// [`Kernels::split_k_sizes`] entries each; the default (null) one never splits.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SplitK {
    pub part: u64,
    pub done: u64,
}

// SAFETY: plain old data with the C layout of the kernel parameter it is passed as.
unsafe impl DeviceRepr for SplitK {}

/// A BitLinear weight on the device: packed rows (in pairs) and each row's scale.
pub struct Linear {
    pub w: u64,
    pub scales: u64,
    pub words: usize,
    pub pairs: usize,
    /// Blocks of the decode kernel, each owning a contiguous range of pairs.
    pub blocks: usize,
    /// Pairs a decode block holds in shared memory at once.
    pub chunk: usize,
}

/// Queries per block of the prompt attention kernel, and keys per step (PQ, PK in attention.cu).
const PQ: usize = 16;
const PK: usize = 32;
/// Keys per block of the decode attention kernel (DEC_CHUNK).
pub const DEC_CHUNK: usize = 128;
/// Accumulators of a `bitlinear_gemm` tile: 64 tokens × 128 rows.
const GEMM_TILE: usize = 64 * 128;
/// Rows of E and tokens of a block of `lm_head_mma` (HR, HT in head.cu), and its dynamic shared memory.
const HEAD_ROWS: usize = 256;
const HEAD_TOKENS: usize = 64;
const HEAD_MMA_SMEM: usize = 2 * HEAD_TOKENS * (256 + 32) * 2;

/// Where the queries of a decode attention are: one sequence's token (position `params[1]`, the caches
/// passed along), or `rows` tokens of as many sequences (`row_pos`, `row_kv`: see attention.cu). `chunks`:
/// the key chunks of the longest row.
pub struct DecodeRows {
    pub params: u64,
    pub row_pos: u64,
    pub row_kv: u64,
    pub rows: usize,
    pub chunks: usize,
}

/// The compiled kernels, launched on one stream (each sequence has its own: [`Kernels::on`]).
#[derive(Clone)]
pub struct Kernels {
    stream: Arc<CudaStream>,
    pub sms: u32,
    /// The dynamic shared memory of a block of `bitlinear_gemv`, at most.
    max_smem: usize,
    /// Launch with programmatic dependent launch (see common.cuh), on by default on sm_90+.
    pdl: bool,
    norm_quant_rows: CudaFunction,
    gemv: CudaFunction,
    gemm: CudaFunction,
    /// The attention kernels per cache type ([`kv_code`]), and the q8_0 cache store.
    attn_decode: [CudaFunction; 3],
    attn_prefill: [CudaFunction; 3],
    kv_quant: CudaFunction,
    /// The most dynamic shared memory a block may ask for.
    optin: usize,
    embed: CudaFunction,
    lm_head: CudaFunction,
    head_split_rows: CudaFunction,
    lm_head_mma: CudaFunction,
}

fn i(v: usize) -> i32 {
    v as i32
}

/// Kernel parameters as the driver takes them: pointers to each value, in order (the driver copies the
/// values at launch). `addr_of!` accepts only places (locals, fields), never a temporary that could die
/// before the launch.
macro_rules! params {
    ($($v:expr),* $(,)?) => { &mut [$(std::ptr::addr_of!($v) as *mut c_void),*] };
}

/// Bytes of a row pair's constants in shared memory (`PairConst` in bitlinear.cu).
const PAIR_CONST: usize = 36;
/// The longest input the fused RMSNorm + quantization takes: 8 float4 per thread of a 512-thread block.
pub const MAX_NORM: usize = 16384;
/// Dynamic shared memory a decode block aims to stay under, so that the next kernel's block fits beside it.
const GEMV_SMEM_BUDGET: usize = 100 * 1024;

/// Dynamic shared memory of `bitlinear_gemv`: the norm weights (n floats), the input's int8 quantization,
/// and `chunk` row pairs of weights with their constants.
fn gemv_smem(n: usize, words: usize, chunk: usize) -> usize {
    4 * n + 16 * words + chunk * (8 * words + PAIR_CONST)
}

/// Dynamic shared memory of `attn_decode` for heads of `hd` and caches of type `kv`: a chunk's keys (rows
/// padded by 16 bytes) and values as they are cached (q8_0: with their scales as floats), then q, the
/// probabilities and four partial outputs in f32.
fn attn_decode_smem(hd: usize, kv: KvType) -> usize {
    let bytes = [2, 4, 1][kv_code(kv)];
    let scales = if kv == KvType::Q8_0 { 2 * DEC_CHUNK * hd / 32 * 4 } else { 0 };
    DEC_CHUNK * (2 * hd * bytes + 16) + scales + 4 * (5 * hd + DEC_CHUNK)
}

/// Dynamic shared memory of `attn_prefill` for heads of `hd`: f16 keys and values stay packed (4 bytes a
/// pair), the other types are staged as floats (8).
fn attn_prefill_smem(hd: usize, kv: KvType) -> usize {
    let pair = if kv == KvType::F16 { 4 } else { 8 };
    4 * (PQ * hd + PQ * PK + 2 * PQ) + pair * (PK * (hd / 2 + 1) + PK * hd / 2)
}

impl Kernels {
    /// Compiles the kernels for the context's device and loads them.
    pub fn new(ctx: &Arc<CudaContext>, stream: Arc<CudaStream>) -> Result<Self> {
        let (major, minor) = ctx.compute_capability()?;
        if major < 8 {
            return Err(Error::Unsupported(format!(
                "CUDA device of compute capability {major}.{minor} (8.0 or newer needed)"
            )));
        }
        let opts = CompileOptions {
            options: vec![format!("--gpu-architecture=compute_{major}{minor}")],
            ..Default::default()
        };
        let ptx = compile_ptx_with_opts(SOURCES.concat(), opts).map_err(|e| Error::Gpu(format!("NVRTC: {e}")))?;
        let module = ctx.load_module(ptx)?;
        let f = |name: &str| module.load_function(name);
        let pdl = major >= 9 && std::env::var("BITNET_CUDA_PDL").map_or(true, |v| v != "0");
        let optin = ctx.attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)?;
        let gemv = f("bitlinear_gemv")?;
        let fixed = |f: &CudaFunction| f.get_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES);
        let k = Kernels {
            pdl,
            max_smem: (optin - fixed(&gemv)?) as usize,
            sms: ctx.attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as u32,
            norm_quant_rows: f("norm_quant_rows")?,
            gemv,
            gemm: f("bitlinear_gemm")?,
            attn_decode: [f("attn_decode_f16")?, f("attn_decode_f32")?, f("attn_decode_q8")?],
            attn_prefill: [f("attn_prefill_f16")?, f("attn_prefill_f32")?, f("attn_prefill_q8")?],
            kv_quant: f("kv_quant")?,
            optin: optin as usize,
            embed: f("embed")?,
            lm_head: f("lm_head")?,
            head_split_rows: f("head_split_rows")?,
            lm_head_mma: f("lm_head_mma")?,
            stream,
        };
        // Inputs of more than 48 KB of shared memory (the default limit) take the device's opt-in limit.
        let attr = CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;
        for f in k.attn_prefill.iter().chain(&k.attn_decode).chain([
            &k.gemv,
            &k.norm_quant_rows,
            &k.lm_head,
            &k.head_split_rows,
            &k.lm_head_mma,
        ]) {
            let fixed = f.get_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES)?;
            f.set_attribute(attr, optin - fixed)?;
        }
        // Every kernel asks for the same split of each multiprocessor's L1 and shared memory (all shared
        // memory: the kernels stage what they reuse there), so that consecutive kernels never wait for a
        // multiprocessor to drain and change it.
        let carveout = CUfunction_attribute::CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT;
        for f in [
            &k.norm_quant_rows,
            &k.gemv,
            &k.gemm,
            &k.kv_quant,
            &k.embed,
            &k.lm_head,
            &k.head_split_rows,
            &k.lm_head_mma,
        ]
        .into_iter()
        .chain(&k.attn_decode)
        .chain(&k.attn_prefill)
        {
            f.set_attribute(carveout, 100)?;
        }
        Ok(k)
    }

    /// The same kernels, launched on `stream`.
    pub fn on(&self, stream: Arc<CudaStream>) -> Self {
        Self { stream, ..self.clone() }
    }

    /// Launches `f` on the stream: `grid` blocks of `block` threads with `smem` bytes of dynamic
    /// shared memory, with programmatic dependent launch when enabled.
    fn launch(
        &self,
        f: &CudaFunction,
        grid: (usize, usize),
        block: u32,
        smem: usize,
        params: &mut [*mut c_void],
    ) -> Result<()> {
        self.launch_3d(f, (grid.0, grid.1, 1), block, smem, params)
    }

    fn launch_3d(
        &self,
        f: &CudaFunction,
        grid: (usize, usize, usize),
        block: u32,
        smem: usize,
        params: &mut [*mut c_void],
    ) -> Result<()> {
        self.stream.context().bind_to_thread()?;
        // SAFETY: all-zero is a valid value of the attribute (a C union); one field is then set.
        let mut attr: CUlaunchAttribute = unsafe { std::mem::zeroed() };
        attr.id = CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
        attr.value.programmaticStreamSerializationAllowed = 1;
        let config = sys::CUlaunchConfig {
            gridDimX: grid.0 as u32,
            gridDimY: grid.1 as u32,
            gridDimZ: grid.2 as u32,
            blockDimX: block,
            blockDimY: 1,
            blockDimZ: 1,
            sharedMemBytes: smem as u32,
            hStream: self.stream.cu_stream(),
            attrs: &mut attr,
            numAttrs: self.pdl as u32,
        };
        // SAFETY: each caller passes exactly the kernel's parameters, by type and order (see the .cu
        // signatures), and buffers large enough for the launch.
        unsafe { sys::cuLaunchKernelEx(&config, f.cu_function(), params.as_mut_ptr(), std::ptr::null_mut()) }
            .result()?;
        Ok(())
    }

    /// The grid and the chunk of the decode kernel for `pairs` row pairs of `words` words and an input of `n`
    /// floats: `blocks`, or about 32 KB of weights per block (16 KB for inputs longer than 4096, whose
    /// normalization takes longer), between half a block and one and a half blocks per multiprocessor: on
    /// an H100 the small 2B4T matrices ran fastest on half the multiprocessors; gate/up and down, alone, on
    /// two blocks per multiprocessor, but in the decode step 1.5 did better (2B4T tg128 1010 -> 1021 tok/s):
    /// with two, the registers left no room for the next kernel's blocks to start early and load their
    /// weights. Each block holds as many of its pairs in shared memory as the budget allows.
    pub fn plan_gemv(&self, pairs: usize, words: usize, n: usize, blocks: Option<usize>) -> Result<(usize, usize)> {
        let sms = self.sms as usize;
        let by_size = ((pairs * 8 * words).div_ceil(32 * 1024) * n.div_ceil(4096)).clamp(sms.div_ceil(2), 3 * sms / 2);
        let blocks = blocks.unwrap_or(by_size).clamp(1, pairs.max(1));
        let per_block = pairs.div_ceil(blocks);
        let room = GEMV_SMEM_BUDGET.saturating_sub(gemv_smem(n, words, 0)) / (8 * words + PAIR_CONST);
        let chunk = room.clamp(1, per_block.max(1));
        if n > MAX_NORM || gemv_smem(n, words, chunk) > self.max_smem {
            return Err(Error::Unsupported(format!(
                "CUDA backend: BitLinear of {n} inputs ({} columns packed)",
                words * 16
            )));
        }
        Ok((blocks, chunk))
    }

    /// Rows `0..t` of `x` (n floats each): RMSNorm by `w` and int8 quantization into `xq` (rows of `kp`
    /// bytes) and `scales`. A block per row with a thread per float4 of it (up to 512: then each holds
    /// several): small models' rows need no 512-thread reductions.
    #[allow(clippy::too_many_arguments)]
    pub fn norm_quant_rows(
        &self,
        x: u64,
        w: u64,
        n: usize,
        kp: usize,
        eps: f32,
        xq: u64,
        scales: u64,
        t: usize,
    ) -> Result<()> {
        let threads = (n / 4).next_multiple_of(32).clamp(32, 512) as u32;
        let (smem, n, kp) = (4 * n, i(n), i(kp));
        self.launch(&self.norm_quant_rows, (t, 1), threads, smem, params![x, w, n, kp, eps, xq, scales])
    }

    /// Decode BitLinear of one token: `x` (n floats) normalized by `norm_w`, quantized, times `lin`,
    /// then the epilogue `e` at the position `params[1]`.
    #[allow(clippy::too_many_arguments)]
    pub fn gemv(&self, x: u64, norm_w: u64, n: usize, eps: f32, lin: &Linear, params: u64, e: &Epilogue) -> Result<()> {
        let smem = gemv_smem(n, lin.words, lin.chunk);
        let (n, words, pairs, chunk) = (i(n), i(lin.words), i(lin.pairs), i(lin.chunk));
        let p = params![x, norm_w, n, eps, lin.w, words, lin.scales, pairs, chunk, params, *e];
        self.launch(&self.gemv, (lin.blocks, 1), 512, smem, p)
    }

    /// The entries of a [`SplitK`]'s partial sums and counters that any `gemm` launch needs.
    pub fn split_k_sizes(&self) -> (usize, usize) {
        let sms = self.sms as usize;
        (3 * sms * GEMM_TILE, sms)
    }

    /// Prompt BitLinear of `t` tokens already quantized (`xq`, `scales`) at positions `pos0..`. A grid of
    /// fewer blocks than multiprocessors splits K over about two blocks per multiprocessor (see bitlinear.cu):
    /// on an H100 a step of 55 tokens of the 2B4T shape gave its small matrices 20 blocks for 132
    /// multiprocessors, each walking all 40 (down: 108) k tiles in turn.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm(
        &self,
        xq: u64,
        scales: u64,
        t: usize,
        lin: &Linear,
        pos0: usize,
        e: &Epilogue,
        sk: &SplitK,
    ) -> Result<()> {
        let (sms, ktiles) = (self.sms as usize, lin.words / 4);
        let (gx, gy) = ((2 * lin.pairs).div_ceil(128), t.div_ceil(64));
        let blocks = gx * gy;
        // blocks × splits < 3 × sms: within `split_k_sizes`.
        let splits = if blocks >= sms || sk.part == 0 { 1 } else { (2 * sms).div_ceil(blocks).min(ktiles / 2).max(1) };
        let (ti, words, pairs, pos0) = (i(t), i(lin.words), i(lin.pairs), i(pos0));
        let p = params![xq, scales, ti, lin.w, words, lin.scales, pairs, pos0, *e, *sk];
        self.launch_3d(&self.gemm, (gx, gy, splits), 256, 0, p)
    }

    /// Decode attention of the queries `r` says (q, out: rows of n_head × hd floats) over their caches.
    #[allow(clippy::too_many_arguments)]
    pub fn attn_decode(
        &self,
        q: u64,
        kc: u64,
        vc: u64,
        d: AttnDims,
        r: &DecodeRows,
        part_o: u64,
        part_ml: u64,
        max_chunks: usize,
        counters: u64,
        out: u64,
    ) -> Result<()> {
        let (hd, kv_dim, group, scale, mc) = (i(d.hd), i(d.kv_dim), i(d.group), d.scale(), i(max_chunks));
        let (params, row_pos, row_kv) = (r.params, r.row_pos, r.row_kv);
        let p =
            params![q, kc, vc, hd, kv_dim, group, scale, params, row_pos, row_kv, part_o, part_ml, mc, counters, out];
        let (f, smem) = (&self.attn_decode[kv_code(d.kv)], attn_decode_smem(d.hd, d.kv));
        self.launch_3d(f, (r.chunks.min(max_chunks), d.n_head, r.rows), 128, smem, p)
    }

    /// Causal attention of `t` prompt tokens at positions `pos0..` (`q`, `out`: rows of n_head × hd floats).
    #[allow(clippy::too_many_arguments)]
    pub fn attn_prefill(&self, q: u64, kc: u64, vc: u64, t: usize, pos0: usize, d: AttnDims, out: u64) -> Result<()> {
        let (ti, pos0, hd, q_dim, kv_dim, group, scale) =
            (i(t), i(pos0), i(d.hd), i(d.n_head * d.hd), i(d.kv_dim), i(d.group), d.scale());
        let p = params![q, kc, vc, ti, pos0, hd, q_dim, kv_dim, group, scale, out];
        // The shared memory limit was raised in `new`; `check_attention` checked it is enough.
        let (f, smem) = (&self.attn_prefill[kv_code(d.kv)], attn_prefill_smem(d.hd, d.kv));
        self.launch(f, (t.div_ceil(PQ), d.n_head), 256, smem, p)
    }

    /// Whether the attention kernels fit heads of this shape and cache type in a block's shared memory.
    pub fn check_attention(&self, d: &AttnDims) -> Result<()> {
        let need = attn_decode_smem(d.hd, d.kv).max(attn_prefill_smem(d.hd, d.kv));
        if need > self.optin {
            return Err(Error::Unsupported(format!(
                "CUDA attention over a {} KV cache with heads of {}: {need} bytes of shared memory a block, the device has {}",
                d.kv.name(),
                d.hd,
                self.optin
            )));
        }
        Ok(())
    }

    /// Quantizes `t` rows of keys and values from `stage` into q8_0 caches: see `kv_quant` in attention.cu.
    #[allow(clippy::too_many_arguments)]
    pub fn kv_quant(&self, stage: u64, kv_dim: usize, t: usize, pos0: usize, params: u64, kv: KvDest) -> Result<()> {
        let (kv_dimi, pos0) = (i(kv_dim), i(pos0));
        let p = params![stage, kv_dimi, pos0, params, kv.row_pos, kv.row_kv, kv.kc, kv.vc];
        self.launch(&self.kv_quant, (t, 2 * kv_dim / 32), 32, 0, p)
    }

    /// `x[i] = E[tokens[i]]` for `t` tokens (f16 rows of n; ids checked against the vocabulary by the caller).
    pub fn embed(&self, e: u64, n: usize, tokens: u64, x: u64, t: usize) -> Result<()> {
        let n = i(n);
        self.launch(&self.embed, (t, 1), 256, 0, params![e, n, tokens, x])
    }

    /// Blocks of the LM head kernel for `rows` rows (the size of its per-block scratch): about four per
    /// multiprocessor (one wave), as many as give every block the same number of 16-row groups.
    pub fn lm_head_blocks(&self, rows: usize) -> usize {
        let groups = rows.div_ceil(16);
        groups.div_ceil(groups.div_ceil(self.sms as usize * 4))
    }

    /// `logits = E · rmsnorm(x, norm_w)` and `*best = argmax(logits)`.
    #[allow(clippy::too_many_arguments)]
    pub fn lm_head(
        &self,
        x: u64,
        norm_w: u64,
        n: usize,
        eps: f32,
        e: u64,
        rows: usize,
        logits: u64,
        block_val: u64,
        block_idx: u64,
        counter: u64,
        best: u64,
    ) -> Result<()> {
        let (blocks, smem, n, rows) = (self.lm_head_blocks(rows), 4 * n, i(n), i(rows));
        let p = params![x, norm_w, n, eps, e, rows, logits, block_val, block_idx, counter, best];
        self.launch(&self.lm_head, (blocks, 1), 256, smem, p)
    }

    /// Rows of the `head_split_rows` output for `nt` tokens (whole token tiles of `lm_head_mma`).
    pub fn head_split_rows_for(nt: usize) -> usize {
        nt.next_multiple_of(16)
    }

    /// Blocks of `lm_head_mma` along E's `rows` (the size of its per-token scratch).
    pub fn lm_head_mma_blocks(rows: usize) -> usize {
        rows.div_ceil(HEAD_ROWS)
    }

    /// [`Kernels::lm_head`] for the `nt` hidden states at `x` (rows of n floats) of a step of many
    /// sequences, on the tensor cores (see head.cu): token t's logits and argmax to the addresses `outs[2t]`
    /// (none if 0) and `outs[2t + 1]`. Scratch: `xh`, `xl` of `head_split_rows_for(nt)` rows of n halves and
    /// `inv_scale` of as many floats; `block_val`, `block_idx` of nt × `lm_head_mma_blocks(rows)` entries,
    /// `counters` of `nt / 64` rounded up.
    #[allow(clippy::too_many_arguments)]
    pub fn lm_head_rows(
        &self,
        x: u64,
        nt: usize,
        norm_w: u64,
        n: usize,
        eps: f32,
        e: u64,
        rows: usize,
        outs: u64,
        split: [u64; 3],
        best: [u64; 3],
    ) -> Result<()> {
        let [xh, xl, inv_scale] = split;
        let [block_val, block_idx, counters] = best;
        let (nti, ni, rowsi) = (i(nt), i(n), i(rows));
        let p = params![x, nti, norm_w, ni, eps, xh, xl, inv_scale];
        self.launch(&self.head_split_rows, (Self::head_split_rows_for(nt), 1), 256, 4 * n, p)?;
        let grid = (Self::lm_head_mma_blocks(rows), nt.div_ceil(HEAD_TOKENS));
        let p = params![xh, xl, inv_scale, nti, ni, e, rowsi, outs, block_val, block_idx, counters];
        self.launch(&self.lm_head_mma, grid, 256, HEAD_MMA_SMEM, p)
    }
}

/// The attention shape.
#[derive(Clone, Copy, Debug)]
pub struct AttnDims {
    pub n_head: usize,
    pub hd: usize,
    pub kv_dim: usize,
    /// Query heads per kv head.
    pub group: usize,
    pub kv: KvType,
}

/// Where a layer's keys and values go: one sequence's caches (`kc`, `vc`; positions from the pass's
/// `pos0` or the decode step's parameters), or in a step of many sequences each row's own (`row_pos`,
/// `row_kv`: device arrays, see `Epilogue` in bitlinear.cu).
#[derive(Clone, Copy, Default)]
pub struct KvDest {
    pub kc: u64,
    pub vc: u64,
    pub row_pos: u64,
    pub row_kv: u64,
}

impl AttnDims {
    fn scale(&self) -> f32 {
        1.0 / (self.hd as f32).sqrt()
    }
}
