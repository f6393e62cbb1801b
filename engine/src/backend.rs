//! Where the forward pass runs. A [`Backend`] owns one sequence's KV cache on its device and runs
//! tokens through the model; [`Cpu`] is the CPU backend (its inner loops are the [`Kernels`] of the
//! running CPU, scalar being the reference). GPU backends implement the same trait.

use crate::kernels::Kernels;
use crate::model::{Model, State};
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
}

/// The CPU backend: the model's weights in host memory, threads from the current rayon pool.
pub struct Cpu<'m> {
    model: &'m Model,
    kernels: &'static dyn Kernels,
    state: State,
}

impl<'m> Cpu<'m> {
    pub fn new(model: &'m Model, kernels: &'static dyn Kernels, ctx: usize) -> Result<Self> {
        Ok(Self { model, kernels, state: State::new(&model.config, ctx)? })
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
        for (i, &t) in tokens.iter().enumerate() {
            let last = i + 1 == tokens.len();
            self.model.forward(self.kernels, &mut self.state, t, pos + i, want_logits && last)?;
        }
        Ok(())
    }

    fn logits(&self) -> &[f32] {
        &self.state.logits
    }
}
