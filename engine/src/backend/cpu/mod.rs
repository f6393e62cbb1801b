//! The CPU backend: the model's weights in host memory, its inner loops the [`Kernels`] of the running
//! CPU (scalar being the reference), threads from its own rayon pool or the current one.

pub mod forward;
pub mod kernels;
pub mod kv;

use std::any::Any;
use std::sync::Arc;

use rayon::prelude::*;

use self::forward::{BatchItem, BatchScratch, State};
use self::kernels::qhead::QuantHead;
use self::kernels::Kernels;
use super::{Batcher, KvType, Sequence, Step, Want, Weights};
use crate::format::quant::{self, GgmlType};
use crate::model::{Config, Model};
use crate::tensor::float::FloatMatrix;
use crate::{Error, Result};

/// The model's weights as the CPU's kernels read them.
pub struct CpuModel {
    pub model: Model,
    pub kernels: &'static dyn Kernels,
    /// The LM head requantized for the int8 head kernels (`--head`), used instead of the float head.
    pub quant_head: Option<QuantHead>,
    /// The KV cache type of its sequences.
    pub kv: KvType,
    pool: Option<rayon::ThreadPool>,
}

/// Prompt tokens per tile: each weight matrix is read once per tile. Past a few dozen tokens the
/// weight traffic is negligible next to the arithmetic; more would only grow the scratch.
const PROMPT_TILE: usize = 64;

impl CpuModel {
    /// Prepares `model` for `kernels`. `head`: requantize the LM head to this type (Q8_0, or Q6_K where
    /// rows are a multiple of 256) for the int8 head kernels: the head is most of the bytes a token
    /// reads, so decoding gets faster, for a small loss of accuracy. `threads`: a pool of its own
    /// (default: the current rayon pool).
    pub fn new(
        mut model: Model,
        kernels: &'static dyn Kernels,
        head: Option<GgmlType>,
        threads: Option<usize>,
    ) -> Result<Self> {
        // Most kernel sets read a Q8_0 LM head fast but decode Q4_0/Q5_0 one piece at a time: for them,
        // the head is repacked to Q8_0, which holds the same values exactly (the default model's Q5_0
        // embedding decodes ~8x faster that way on AVX2, NEON and wasm SIMD128).
        let for_kernels = |m: FloatMatrix| match m.ty {
            GgmlType::Q4_0 | GgmlType::Q5_0 if !kernels.reads_fast(m.ty) => m.repacked_q8_0(),
            _ => m,
        };
        match model.output.take() {
            Some(out) => model.output = Some(for_kernels(out)),
            None => model.token_embd = for_kernels(model.token_embd),
        }
        let pool = match threads {
            Some(n) => Some(
                rayon::ThreadPoolBuilder::new()
                    .num_threads(n)
                    .build()
                    .map_err(|e| Error::Invalid(format!("starting {n} threads: {e}")))?,
            ),
            None => None,
        };
        let quant_head = head.map(|ty| requantize(model.lm_head(), ty)).transpose()?;
        Ok(Self { model, kernels, quant_head, kv: KvType::F16, pool })
    }

    /// The same, with sequences caching keys and values as `kv`.
    pub fn with_kv(self, kv: KvType) -> Self {
        Self { kv, ..self }
    }

    /// Runs `f` on this model's threads.
    fn install<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        match &self.pool {
            Some(p) => p.install(f),
            None => f(),
        }
    }

    /// How many threads run the model.
    pub fn threads(&self) -> usize {
        self.pool.as_ref().map_or_else(rayon::current_num_threads, |p| p.current_num_threads())
    }
}

/// Encodes the LM head as `ty` (ggml's Q8_0 or Q6_K quantizer, rows in parallel) in the layout of the
/// int8 head kernels.
fn requantize(head: &FloatMatrix, ty: GgmlType) -> Result<QuantHead> {
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
    QuantHead::from_ggml(ty, rows, cols, &ggml)
}

impl Weights for CpuModel {
    fn name(&self) -> String {
        format!("cpu/{}", self.kernels.name())
    }

    fn config(&self) -> &Config {
        &self.model.config
    }

    fn sequence(self: Arc<Self>, ctx: usize) -> Result<Box<dyn Sequence>> {
        let state = State::new(&self.model.config, ctx, self.kv)?;
        let scratch = BatchScratch::new(&self.model.config, PROMPT_TILE);
        Ok(Box::new(CpuSequence { model: self, state, scratch }))
    }

    fn batcher(self: Arc<Self>, max_tokens: usize) -> Box<dyn Batcher> {
        let scratch = BatchScratch::new(&self.model.config, max_tokens);
        Box::new(CpuBatcher { model: self, scratch })
    }
}

/// One sequence on the CPU: its KV cache, and scratch for prompt tiles.
pub struct CpuSequence {
    model: Arc<CpuModel>,
    state: State,
    scratch: BatchScratch,
}

impl Sequence for CpuSequence {
    fn ctx(&self) -> usize {
        self.state.ctx
    }

    fn forward(&mut self, tokens: &[u32], pos: usize, want: Want) -> Result<Option<u32>> {
        let want_logits = want != Want::Nothing;
        let mut item = [BatchItem { state: &mut self.state, tokens, pos, want_logits }];
        self.model.forward_batch(&mut self.scratch, &mut item)?;
        greedy(want, &self.state.logits)
    }

    fn logits(&self) -> &[f32] {
        &self.state.logits
    }

    fn hidden(&self) -> Option<&[f32]> {
        Some(&self.state.hidden)
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

/// The CPU takes a greedy token from its logits (checked: NaN logits are a broken model, not a token).
fn greedy(want: Want, logits: &[f32]) -> Result<Option<u32>> {
    if want != Want::Greedy {
        return Ok(None);
    }
    super::check_logits(logits)?;
    Ok(Some(super::argmax(logits.iter().copied())))
}

/// Many CPU sequences in one batched pass: each weight matrix is read once per step for all of them.
struct CpuBatcher {
    model: Arc<CpuModel>,
    scratch: BatchScratch,
}

impl Batcher for CpuBatcher {
    fn forward(&mut self, steps: &mut [Step<'_>]) -> Result<Vec<Option<u32>>> {
        let wants: Vec<Want> = steps.iter().map(|s| s.want).collect();
        let mut items = Vec::with_capacity(steps.len());
        for s in steps.iter_mut() {
            let seq = s
                .seq
                .as_any_mut()
                .downcast_mut::<CpuSequence>()
                .ok_or_else(|| Error::Invalid("a batch mixes sequences of different devices".into()))?;
            if !Arc::ptr_eq(&seq.model, &self.model) {
                return Err(Error::Invalid("a batch mixes sequences of different models".into()));
            }
            items.push(BatchItem {
                state: &mut seq.state,
                tokens: s.tokens,
                pos: s.pos,
                want_logits: s.want != Want::Nothing,
            });
        }
        self.model.forward_batch(&mut self.scratch, &mut items)?;
        items.iter().zip(wants).map(|(it, want)| greedy(want, &it.state.logits)).collect()
    }
}
