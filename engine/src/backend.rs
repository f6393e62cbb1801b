//! Where the forward pass runs. A [`Backend`] owns one sequence's KV cache on its device and runs
//! tokens through the model; [`Cpu`] is the CPU backend (its inner loops are the [`Kernels`] of the
//! running CPU, scalar being the reference). GPU backends implement the same trait.

use crate::kernels::Kernels;
use crate::model::{BatchItem, BatchScratch, Model, State};
use crate::Result;

pub trait Backend: Send {
    /// What runs the model, for logs and `bitnet bench` (e.g. "cpu/avx2").
    fn name(&self) -> String;

    /// The context size: how many tokens the KV cache holds.
    fn ctx(&self) -> usize;

    /// Runs `tokens` at positions `pos..pos + tokens.len()`, storing their keys and values (later
    /// positions are forgotten). With `want_logits`, [`Backend::logits`] then holds the next-token
    /// logits of the last token.
    fn forward(&mut self, tokens: &[u32], pos: usize, want_logits: bool) -> Result<()>;

    /// The logits of the last `forward` that asked for them.
    fn logits(&self) -> &[f32];

    /// Like `forward` with logits, but returns only the greedy next token: the argmax of the logits
    /// (the lowest id among equal maxima). A backend that can take it faster on its device does so (CUDA:
    /// the LM head's own argmax); `logits` may then be out of date.
    fn forward_greedy(&mut self, tokens: &[u32], pos: usize) -> Result<u32> {
        self.forward(tokens, pos, true)?;
        crate::sampling::check_logits(self.logits())?;
        Ok(crate::sampling::argmax(self.logits().iter().copied()))
    }
}

/// The CPU backend: the model's weights in host memory, threads from the current rayon pool.
pub struct Cpu<'m> {
    model: &'m Model,
    kernels: &'static dyn Kernels,
    state: State,
    scratch: BatchScratch,
}

/// Prompt tokens per tile: each weight matrix is read once per tile. Past a few dozen tokens the
/// weight traffic is negligible next to the arithmetic; more would only grow the scratch.
const PROMPT_TILE: usize = 64;

impl<'m> Cpu<'m> {
    pub fn new(model: &'m Model, kernels: &'static dyn Kernels, ctx: usize) -> Result<Self> {
        let state = State::new(&model.config, ctx)?;
        Ok(Self { model, kernels, state, scratch: BatchScratch::new(&model.config, PROMPT_TILE) })
    }
}

impl Backend for Cpu<'_> {
    fn name(&self) -> String {
        format!("cpu/{}", self.kernels.name())
    }

    fn ctx(&self) -> usize {
        self.state.ctx
    }

    fn forward(&mut self, tokens: &[u32], pos: usize, want_logits: bool) -> Result<()> {
        if tokens.is_empty() {
            return Ok(());
        }
        let mut item = [BatchItem { state: &mut self.state, tokens, pos, want_logits }];
        self.model.forward_batch(self.kernels, &mut self.scratch, &mut item)
    }

    fn logits(&self) -> &[f32] {
        &self.state.logits
    }
}
