//! A conversation with a model on one device: its sequence (KV cache), the tokens in it, prefix reuse,
//! and [`Session::generate`], which drives the [`Generation`] stepper to the end.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::generation::{GenParams, Generation, Output, StopReason};
use super::reusable_prefix;
use crate::backend::{Sequence, Want, Weights};
use crate::text::tokenizer::Tokenizer;
use crate::{Error, Result};

#[derive(Clone, Debug)]
pub struct GenStats {
    /// Prompt tokens actually evaluated (those not already in the cache).
    pub n_prompt_eval: usize,
    pub n_generated: usize,
    pub prompt_time: Duration,
    pub gen_time: Duration,
    pub stop: StopReason,
}

/// One sequence on one device, and the tokens that fill its cache.
pub struct Session {
    name: String,
    seq: Box<dyn Sequence>,
    /// The tokens whose keys and values are in the cache, in order.
    tokens: Vec<u32>,
    /// [`Session::step`]'s state: the token picked but not yet evaluated, and the device's greedy pick
    /// after the last evaluation (when the pick is a plain argmax; see [`Want::Greedy`]).
    to_eval: Option<u32>,
    greedy: Option<u32>,
}

impl Session {
    /// A new sequence of `ctx` tokens on the device that holds `weights`.
    pub fn open(weights: &Arc<dyn Weights>, ctx: usize) -> Result<Self> {
        Ok(Self {
            name: weights.name(),
            seq: weights.clone().sequence(ctx)?,
            tokens: Vec::new(),
            to_eval: None,
            greedy: None,
        })
    }

    pub fn backend_name(&self) -> &str {
        &self.name
    }

    pub fn ctx(&self) -> usize {
        self.seq.ctx()
    }

    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    pub fn logits(&self) -> &[f32] {
        self.seq.logits()
    }

    /// The final normed hidden state behind `logits()`, where the backend keeps it (the CPU).
    pub fn hidden(&self) -> Option<&[f32]> {
        self.seq.hidden()
    }

    /// Forgets the cache from position `len` on.
    pub fn truncate(&mut self, len: usize) {
        self.tokens.truncate(len);
        (self.to_eval, self.greedy) = (None, None);
    }

    /// Appends tokens; `want` says what the last one's forward pass produces ([`Want`]).
    pub fn push(&mut self, tokens: &[u32], want: Want) -> Result<Option<u32>> {
        let pos = self.tokens.len();
        if pos + tokens.len() > self.ctx() {
            return Err(Error::ContextFull { needed: pos + tokens.len(), ctx: self.ctx() });
        }
        let out = self.seq.forward(tokens, pos, want)?;
        self.tokens.extend_from_slice(tokens);
        (self.to_eval, self.greedy) = (None, None);
        Ok(out)
    }

    /// Makes the cache hold exactly `tokens`, evaluating only what differs from what is already
    /// cached (a chat turn re-evaluates only the new messages). Afterwards `logits()` belongs to the
    /// last token. Returns how many tokens were evaluated.
    pub fn prefill(&mut self, tokens: &[u32]) -> Result<usize> {
        if tokens.is_empty() {
            return Err(Error::Invalid("empty prompt".into()));
        }
        if tokens.len() > self.ctx() {
            return Err(Error::ContextFull { needed: tokens.len(), ctx: self.ctx() });
        }
        let keep = reusable_prefix(&self.tokens, tokens);
        self.truncate(keep);
        self.push(&tokens[keep..], Want::Logits)?;
        Ok(tokens.len() - keep)
    }

    /// Evaluates `prompt` (what the cache does not already hold) and returns the generation that
    /// [`Session::step`] then drives.
    pub fn start(&mut self, prompt: &[u32], params: &GenParams) -> Result<Generation> {
        Ok(Generation::new(params, self.prefill(prompt)?))
    }

    /// One token of `gen`: evaluates the token the last step picked, then picks the next one. Returns
    /// the text it completes (often empty), or None once generation has stopped. Stepping one token at
    /// a time lets a caller stop between tokens (a Python iterator, Ctrl+C).
    pub fn step(&mut self, gen: &mut Generation, tok: &Tokenizer) -> Result<Option<String>> {
        if let Some(t) = self.to_eval.take() {
            self.greedy = self.push(&[t], gen.want())?;
        }
        let out = self.greedy.take().map_or(Output::Logits(self.seq.logits()), Output::Token);
        let Some(step) = gen.step(tok, out, &self.tokens, self.ctx())? else { return Ok(None) };
        self.to_eval = step.eval;
        Ok(Some(step.text))
    }

    /// Generates a continuation of `prompt`, calling `on_text` with each new piece of text (always
    /// valid UTF-8, never part of a stop string); `on_text` returns false to stop early.
    /// The generated tokens stay in the cache, so a chat can continue from them.
    pub fn generate(
        &mut self,
        tok: &Tokenizer,
        prompt: &[u32],
        params: &GenParams,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<GenStats> {
        self.generate_with(tok, prompt, params, |_| {}, on_text)
    }

    /// [`Session::generate`], with `setup` applied to the generation before its first step (a grammar
    /// constraint, say).
    pub fn generate_with(
        &mut self,
        tok: &Tokenizer,
        prompt: &[u32],
        params: &GenParams,
        setup: impl FnOnce(&mut Generation),
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<GenStats> {
        let t0 = Instant::now();
        let mut gen = self.start(prompt, params)?;
        setup(&mut gen);
        let prompt_time = t0.elapsed();
        let t1 = Instant::now();
        while let Some(text) = self.step(&mut gen, tok)? {
            if !text.is_empty() && !on_text(&text) {
                gen.cancel();
                break;
            }
        }
        Ok(GenStats {
            n_prompt_eval: gen.n_prompt_eval,
            n_generated: gen.n_generated,
            prompt_time,
            gen_time: t1.elapsed(),
            stop: gen.stop.unwrap_or(StopReason::Cancelled),
        })
    }
}
