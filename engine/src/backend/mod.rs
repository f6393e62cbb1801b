//! Where the forward pass runs. One seam for every device:
//! - [`Weights`]: a model's weights on one device, uploaded once and shared (`Arc`) by every sequence;
//! - [`Sequence`]: one sequence's KV cache on that device, which runs tokens through the model;
//! - [`Batcher`]: one step of many sequences (each with its own tokens, position and [`Want`]);
//! - [`open`]: a model on the device a user chose (`cpu`, `wgpu`, `cuda` or `auto`).
//!
//! The CPU ([`cpu`]) is the reference; the GPU backends (`wgpu`, `cuda`, behind cargo features) implement
//! the same traits.

use std::any::Any;
use std::sync::Arc;

use crate::format::quant::GgmlType;
use crate::model::{Config, Model};
use crate::{Error, Result};

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(feature = "wgpu")]
pub mod wgpu;

/// What a forward pass must produce for the last of its tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Want {
    /// Only the keys and values (a prompt piece whose continuation is still to come).
    Nothing,
    /// The next-token logits, then in [`Sequence::logits`].
    Logits,
    /// Only the greedy next token: the argmax of the logits, lowest id among equal maxima. A device that
    /// can take it on the device does so (no logits come back; [`Sequence::logits`] may be out of date).
    Greedy,
}

/// One sequence on one device: its KV cache, and the tokens through the model.
pub trait Sequence: Send + Any {
    /// The context size: how many tokens the KV cache holds.
    fn ctx(&self) -> usize;

    /// Runs `tokens` at positions `pos..pos + tokens.len()`, storing their keys and values (later
    /// positions are forgotten). Returns the greedy next token when `want` is [`Want::Greedy`].
    fn forward(&mut self, tokens: &[u32], pos: usize, want: Want) -> Result<Option<u32>>;

    /// The logits of the last `forward` that asked for them.
    fn logits(&self) -> &[f32];

    /// The final normed hidden state of the token whose logits were last asked for (what an embedding
    /// model pools), where the device keeps it.
    fn hidden(&self) -> Option<&[f32]> {
        None
    }

    /// For a device's [`Batcher`], which reaches its own sequence type through this.
    fn as_any_mut(&mut self) -> &mut dyn Any;
}

/// A model's weights on one device.
pub trait Weights: Send + Sync {
    /// What runs the model, for logs and `bitnet bench` (e.g. "cpu/avx2").
    fn name(&self) -> String;

    fn config(&self) -> &Config;

    /// A new sequence with a KV cache of `ctx` tokens.
    fn sequence(self: Arc<Self>, ctx: usize) -> Result<Box<dyn Sequence>>;

    /// What runs a step of many of this device's sequences. Devices without a batched pass run them one
    /// after another.
    fn batcher(self: Arc<Self>, _max_tokens: usize) -> Box<dyn Batcher> {
        Box::new(OneByOne)
    }
}

/// The GPU batchers run a step's decode tokens together only from this many on: fewer go one sequence at a
/// time, through each sequence's single-token path (a recorded CUDA graph or wgpu command buffer, which is
/// faster for one token than a batched pass recorded for the step; H200, default model, serve at 1 stream:
/// CUDA 460 tok/s batched against 1,213 one by one).
pub const MIN_GPU_BATCH: usize = 4;

/// One token of a GPU batcher's pass: `token` at position `pos` of the sequence `seq` (an index into the
/// pass's sequences), and what its step wants after it.
#[cfg(all(any(feature = "wgpu", feature = "cuda"), not(target_arch = "wasm32")))]
#[derive(Clone, Copy, Debug)]
pub(crate) struct DecodeRow {
    pub seq: usize,
    pub token: u32,
    pub pos: usize,
    pub want: Want,
}

/// A GPU batcher's step: from [`MIN_GPU_BATCH`] decode tokens on, they go through `decode` together, in
/// passes of at most `per_pass` rows, with the prompt pieces of at most `fold_prompts` tokens as rows of
/// the same passes (one row per token, in order: each row's keys and values are in its sequence's cache
/// before any row attends, so a piece's rows see each other causally, as in its own prompt pass; only its
/// last row wants anything). Longer pieces, and everything of smaller steps, go through each sequence's
/// own forward pass. `decode` gets the batched sequences (every one an `S`: `device` names it in the error)
/// and a pass's rows.
#[cfg(all(any(feature = "wgpu", feature = "cuda"), not(target_arch = "wasm32")))]
pub(crate) fn gpu_step<S: 'static>(
    steps: &mut [Step<'_>],
    device: &str,
    per_pass: usize,
    fold_prompts: usize,
    mut decode: impl FnMut(&mut [&mut S], &[DecodeRow]) -> Result<Vec<Option<u32>>>,
) -> Result<Vec<Option<u32>>> {
    let mut out = vec![None; steps.len()];
    let decode_rows = steps.iter().filter(|s| s.tokens.len() == 1).count();
    let (mut seqs, mut rows, mut last_row_of) = (Vec::new(), Vec::new(), Vec::new());
    for (i, s) in steps.iter_mut().enumerate() {
        if decode_rows < MIN_GPU_BATCH || s.tokens.is_empty() || s.tokens.len() > fold_prompts.max(1) {
            out[i] = s.seq.forward(s.tokens, s.pos, s.want)?;
            continue;
        }
        let seq = s.seq.as_any_mut().downcast_mut::<S>();
        let seq = seq.ok_or_else(|| Error::Invalid(format!("a {device} batch with a sequence of another device")))?;
        let last = s.tokens.len() - 1;
        for (j, &token) in s.tokens.iter().enumerate() {
            let want = if j == last { s.want } else { Want::Nothing };
            rows.push(DecodeRow { seq: seqs.len(), token, pos: s.pos + j, want });
        }
        seqs.push(seq);
        last_row_of.push((i, rows.len() - 1));
    }
    let mut picked = Vec::with_capacity(rows.len());
    for pass in rows.chunks(per_pass) {
        picked.extend(decode(&mut seqs, pass)?);
    }
    for (i, row) in last_row_of {
        out[i] = picked[row];
    }
    Ok(out)
}

/// One sequence's share of a batched step: `tokens` at positions `pos..` of `seq`.
pub struct Step<'a> {
    pub seq: &'a mut dyn Sequence,
    pub tokens: &'a [u32],
    pub pos: usize,
    pub want: Want,
}

pub trait Batcher: Send {
    /// Runs every step's tokens; returns each one's greedy token where it asked for it. After an error,
    /// what the batch's caches hold is unknown.
    fn forward(&mut self, steps: &mut [Step<'_>]) -> Result<Vec<Option<u32>>>;
}

/// The batcher of devices without a batched pass: one forward pass per sequence.
pub struct OneByOne;

impl Batcher for OneByOne {
    fn forward(&mut self, steps: &mut [Step<'_>]) -> Result<Vec<Option<u32>>> {
        steps.iter_mut().map(|s| s.seq.forward(s.tokens, s.pos, s.want)).collect()
    }
}

/// The first index of the largest logit (ties go to the lower id, like argmax everywhere).
pub fn argmax(logits: impl IntoIterator<Item = f32>) -> u32 {
    let mut it = logits.into_iter().enumerate();
    let Some(mut best) = it.next() else { return 0 };
    for x in it {
        if x.1 > best.1 {
            best = x;
        }
    }
    best.0 as u32
}

/// Errors on NaN or +infinity among the logits (see the module documentation); -infinity is a token
/// that cannot be picked, which is fine.
pub fn check_logits(logits: &[f32]) -> Result<()> {
    let broken = |l: &f32| l.is_nan() || *l == f32::INFINITY;
    // Blocks without an early exit vectorize; the position is looked for only when there is one.
    if !logits.is_empty() && !logits.chunks(256).any(|b| b.iter().fold(false, |any, l| any | broken(l))) {
        return Ok(());
    }
    match logits.iter().position(broken) {
        Some(i) => Err(Error::Invalid(format!(
            "the model computed a logit of {} for token {i}: its weights or metadata are broken",
            logits[i]
        ))),
        None if logits.is_empty() => Err(Error::Invalid("the model computed no logits".into())),
        None => Ok(()),
    }
}

/// The one check of a forward pass's input, on every device: some tokens, inside the vocabulary,
/// inside the context.
pub fn check_input(ctx: usize, n_vocab: usize, tokens: &[u32], pos: usize) -> Result<()> {
    if tokens.is_empty() {
        return Err(Error::Invalid("no tokens to evaluate".into()));
    }
    if pos + tokens.len() > ctx {
        return Err(Error::ContextFull { needed: pos + tokens.len(), ctx });
    }
    if let Some(&t) = tokens.iter().find(|&&t| t as usize >= n_vocab) {
        return Err(Error::Invalid(format!("token id {t} is outside the vocabulary of {n_vocab}")));
    }
    Ok(())
}

/// What a device backend runs: `backend` is "wgpu", "CUDA", or "a GPU" (the choice of `auto`, which keeps
/// to what every GPU backend runs). All of them run ternary projections (the BitNet and Llama-ternary
/// families); wgpu also Qwen3 (BitNet embedding models included) with projections in ggml's Q1_0, Q2_0 or
/// Q8_0 blocks. Anything else (Qwen3 on CUDA, float projections) is refused by name.
pub fn check_runs(model: &Model, backend: &str) -> Result<()> {
    use crate::tensor::Linear;
    let wgpu = backend == "wgpu";
    if model.family == crate::model::Family::Qwen3 && !wgpu {
        return Err(Error::Unsupported(format!("the qwen3 architecture on {backend} (it runs on the CPU and wgpu)")));
    }
    let runs = |w: &&Linear| match w {
        Linear::Ternary(_) => true,
        Linear::Ggml(m) => wgpu && cpu::kernels::blocks::reads(m.ty), // Q1_0, Q2_0, Q8_0
    };
    for (i, l) in model.layers.iter().enumerate() {
        let all = [&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down];
        if let Some(Linear::Ggml(m)) = all.iter().find(|w| !runs(w)) {
            let which = if wgpu { "ternary, Q1_0, Q2_0 and Q8_0 ones" } else { "ternary ones only" };
            return Err(Error::Unsupported(format!(
                "{} projections (layer {i}) on {backend}: it runs {which} (the CPU runs every type)",
                m.ty.name()
            )));
        }
    }
    Ok(())
}

/// The one check of a context size, on every device.
pub fn check_ctx(c: &Config, ctx: usize) -> Result<()> {
    if ctx == 0 || ctx > c.n_ctx_train {
        return Err(Error::Invalid(format!("context {ctx} must be between 1 and the model's {}", c.n_ctx_train)));
    }
    Ok(())
}

/// How a KV cache stores keys and values (llama.cpp's `--cache-type-k/v`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KvType {
    /// Exact: the keys and values as computed.
    F32,
    /// Rounded to the nearest f16: half the memory, and half the bytes a token's attention reads.
    #[default]
    F16,
    /// llama.cpp's Q8_0: blocks of 32 values as int8 times an f16 scale (34 bytes per 32 values).
    Q8_0,
}

impl KvType {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "f32" => Some(Self::F32),
            "f16" => Some(Self::F16),
            "q8_0" => Some(Self::Q8_0),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Q8_0 => "q8_0",
        }
    }

    /// Bytes of keys and values a model of shape `c` caches per token of context.
    pub fn bytes_per_token(self, c: &Config) -> usize {
        let values = 2 * c.n_layer * c.kv_dim();
        match self {
            Self::F32 => values * 4,
            Self::F16 => values * 2,
            Self::Q8_0 => values / 32 * 34,
        }
    }
}

/// Bytes of host memory a sequence of `ctx` tokens takes on the CPU (KV cache, RoPE table, logits), None
/// past u64: what a front end checks against the memory there is before making one.
pub fn sequence_bytes(c: &Config, ctx: usize, kv: KvType) -> Option<u64> {
    let cache = (kv.bytes_per_token(c) as u64).checked_mul(ctx as u64)?;
    let rope = (ctx as u64).checked_mul(c.rope_dim as u64 / 2)?.checked_mul(2 * 4)?;
    cache.checked_add(rope)?.checked_add((c.n_vocab as u64).checked_mul(4)?)
}

/// Where a model runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceChoice {
    /// The CPU, with the fastest kernels it supports.
    Cpu,
    /// The best GPU adapter through wgpu (Vulkan, Metal, DX12), a CPU-type one such as llvmpipe included.
    Wgpu,
    /// An NVIDIA GPU through CUDA (the `cuda` feature; needs the driver and NVRTC).
    Cuda,
    /// A real GPU if there is one (CUDA first), else the CPU.
    Auto,
}

impl DeviceChoice {
    /// `cpu`, `wgpu`, `cuda` or `auto`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "cpu" => Some(Self::Cpu),
            "wgpu" => Some(Self::Wgpu),
            "cuda" => Some(Self::Cuda),
            "auto" => Some(Self::Auto),
            _ => None,
        }
    }
}

/// Device choices a user makes when a model is opened.
#[derive(Clone, Debug)]
pub struct DeviceOptions {
    pub device: DeviceChoice,
    /// CPU threads (default: rayon's, one per core).
    pub threads: Option<usize>,
    /// CPU: requantize the LM head to this type for the int8 head kernels (see [`cpu::CpuModel::new`]).
    pub head: Option<GgmlType>,
    /// The KV cache type of every sequence (the CPU and CUDA: every type; wgpu: f32 and f16).
    pub kv: KvType,
}

impl Default for DeviceOptions {
    fn default() -> Self {
        Self { device: DeviceChoice::Cpu, threads: None, head: None, kv: KvType::F16 }
    }
}

/// Puts `model` on the device `opts` chooses. A model goes to one device; the host copy of its weights is
/// dropped when the device has its own.
pub fn open(model: Model, opts: &DeviceOptions) -> Result<Arc<dyn Weights>> {
    let cpu = |model| -> Result<Arc<dyn Weights>> {
        let m = cpu::CpuModel::new(model, cpu::kernels::best(), opts.head, opts.threads)?;
        Ok(Arc::new(m.with_kv(opts.kv)))
    };
    if opts.device == DeviceChoice::Cpu {
        return cpu(model);
    }
    // A model the GPU backends do not run yet (qwen3) keeps `auto` on the CPU.
    if opts.device == DeviceChoice::Auto && check_runs(&model, "a GPU").is_err() {
        return cpu(model);
    }
    #[cfg(feature = "cuda")]
    if opts.device == DeviceChoice::Cuda || (opts.device == DeviceChoice::Auto && cuda::available()) {
        return Ok(Arc::new(cuda::CudaModel::new(model)?.with_kv(opts.kv)?));
    }
    if opts.device == DeviceChoice::Cuda {
        return Err(Error::Unsupported("this build has no CUDA backend (cargo feature `cuda`)".into()));
    }
    // wgpu caches f32 and f16: a q8_0 cache keeps `auto` on the CPU (and is an error when wgpu is named).
    if opts.device == DeviceChoice::Auto && opts.kv == KvType::Q8_0 {
        return cpu(model);
    }
    #[cfg(all(feature = "wgpu", not(target_arch = "wasm32")))]
    {
        let named = opts.device == DeviceChoice::Wgpu;
        match wgpu::Gpu::open(named)? {
            Some(gpu) => return Ok(Arc::new(wgpu::GpuModel::upload(Arc::new(gpu), &model)?.with_kv(opts.kv)?)),
            None if named => {
                return Err(Error::Gpu("no adapter found (for llvmpipe: apt-get install mesa-vulkan-drivers)".into()))
            }
            None => {}
        }
    }
    #[cfg(not(all(feature = "wgpu", not(target_arch = "wasm32"))))]
    if opts.device == DeviceChoice::Wgpu {
        return Err(Error::Unsupported("this build has no wgpu backend (cargo feature `wgpu`)".into()));
    }
    cpu(model)
}

#[cfg(all(test, any(feature = "wgpu", feature = "cuda"), not(target_arch = "wasm32")))]
mod tests {
    use super::*;

    /// A sequence that records what goes through its own forward pass; its greedy pick is 1000 + its id.
    struct Fake {
        id: u32,
        own: Vec<(Vec<u32>, usize)>,
    }

    impl Sequence for Fake {
        fn ctx(&self) -> usize {
            64
        }

        fn forward(&mut self, tokens: &[u32], pos: usize, want: Want) -> Result<Option<u32>> {
            self.own.push((tokens.to_vec(), pos));
            Ok((want == Want::Greedy).then_some(1000 + self.id))
        }

        fn logits(&self) -> &[f32] {
            &[]
        }

        fn as_any_mut(&mut self) -> &mut dyn Any {
            self
        }
    }

    /// Runs one step through `gpu_step` (passes of 3 rows, pieces of up to 4 tokens folded in) with a
    /// decode that answers a Greedy row with 2000 + its sequence's id; returns the step's picks, the
    /// rows each pass got (sequence id, token, position, want) and what each sequence ran alone.
    #[allow(clippy::type_complexity)]
    fn run(
        tokens: &[Vec<u32>],
        wants: &[Want],
    ) -> (Vec<Option<u32>>, Vec<Vec<(u32, u32, usize, Want)>>, Vec<Vec<(Vec<u32>, usize)>>) {
        let mut seqs: Vec<Fake> = (0..tokens.len() as u32).map(|id| Fake { id, own: vec![] }).collect();
        let mut steps: Vec<Step> = seqs
            .iter_mut()
            .zip(tokens)
            .zip(wants)
            .map(|((s, t), &want)| Step { seq: s, tokens: t, pos: 10, want })
            .collect();
        let mut passes = Vec::new();
        let picked = gpu_step::<Fake>(&mut steps, "test", 3, 4, |seqs, rows| {
            passes.push(rows.iter().map(|r| (seqs[r.seq].id, r.token, r.pos, r.want)).collect());
            Ok(rows.iter().map(|r| (r.want == Want::Greedy).then(|| 2000 + seqs[r.seq].id)).collect())
        })
        .unwrap();
        drop(steps);
        (picked, passes, seqs.into_iter().map(|s| s.own).collect())
    }

    #[test]
    fn prompt_pieces_fold_into_the_decode_rows() {
        use Want::{Greedy, Logits, Nothing};
        let tokens = vec![vec![1], vec![2], vec![3, 4, 5], vec![6], vec![7; 9], vec![8]];
        let wants = [Greedy, Logits, Greedy, Nothing, Greedy, Greedy];
        let (picked, passes, own) = run(&tokens, &wants);
        // Sequence 4's piece is too long: it runs alone; the others are rows, in order, 3 per pass, only a
        // piece's last row wanting anything.
        assert_eq!(picked, vec![Some(2000), None, Some(2002), None, Some(1004), Some(2005)]);
        let rows: Vec<_> = passes.concat();
        assert_eq!(
            rows,
            vec![
                (0, 1, 10, Greedy),
                (1, 2, 10, Logits),
                (2, 3, 10, Nothing),
                (2, 4, 11, Nothing),
                (2, 5, 12, Greedy),
                (3, 6, 10, Nothing),
                (5, 8, 10, Greedy),
            ]
        );
        assert!(passes.iter().all(|p| p.len() <= 3));
        assert_eq!(own[4], vec![(vec![7; 9], 10)]);
        assert!(own.iter().enumerate().all(|(i, o)| i == 4 || o.is_empty()));
        // Fewer decode tokens than MIN_GPU_BATCH: everything alone; an empty piece is left to the sequence's
        // own check.
        let (picked, passes, own) = run(&[vec![1], vec![2, 3], vec![]], &[Greedy, Greedy, Logits]);
        assert!(passes.is_empty());
        assert_eq!(picked, vec![Some(1000), Some(1001), None]);
        assert_eq!(own[2], vec![(vec![], 10)]);
    }
}
