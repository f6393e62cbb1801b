//! A conversation with a model: the KV cache, prefix reuse, and the generation loop with its stop rules.

use std::time::{Duration, Instant};

use crate::backend::Backend;
use crate::sampling::{Sampler, SamplerParams};
use crate::tokenizer::{StreamDecoder, Tokenizer};
use crate::{Error, Result};

/// What to generate and when to stop.
#[derive(Clone, Debug)]
pub struct GenParams {
    pub max_tokens: usize,
    pub sampler: SamplerParams,
    /// Generation stops before any of these strings; they are not part of the output.
    pub stop: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// An end-of-generation token (EOS, `<|eot_id|>`, ...).
    EndToken,
    StopString,
    MaxTokens,
    ContextFull,
    /// The caller's callback asked to stop.
    Cancelled,
}

#[derive(Clone, Debug)]
pub struct GenStats {
    /// Prompt tokens actually evaluated (those not already in the cache).
    pub n_prompt_eval: usize,
    pub n_generated: usize,
    pub prompt_time: Duration,
    pub gen_time: Duration,
    pub stop: StopReason,
}

/// One sequence on one backend: its KV cache and the tokens that fill it.
pub struct Session<'m> {
    backend: Box<dyn Backend + 'm>,
    /// The tokens whose keys and values are in the cache, in order.
    tokens: Vec<u32>,
}

impl<'m> Session<'m> {
    pub fn new(backend: Box<dyn Backend + 'm>) -> Self {
        Self { backend, tokens: Vec::new() }
    }

    pub fn backend_name(&self) -> String {
        self.backend.name()
    }

    pub fn ctx(&self) -> usize {
        self.backend.ctx()
    }

    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    pub fn logits(&self) -> &[f32] {
        self.backend.logits()
    }

    /// Forgets the cache from position `len` on.
    pub fn truncate(&mut self, len: usize) {
        self.tokens.truncate(len);
    }

    /// The position of the next token, if `n` more tokens fit in the context.
    fn next_pos(&self, n: usize) -> Result<usize> {
        let pos = self.tokens.len();
        if pos + n > self.ctx() {
            return Err(Error::ContextFull { needed: pos + n, ctx: self.ctx() });
        }
        Ok(pos)
    }

    /// Appends tokens; with `want_logits`, `logits()` then belongs to the last one.
    pub fn push(&mut self, tokens: &[u32], want_logits: bool) -> Result<()> {
        let pos = self.next_pos(tokens.len())?;
        self.backend.forward(tokens, pos, want_logits)?;
        self.tokens.extend_from_slice(tokens);
        Ok(())
    }

    /// Appends one token and returns the greedy next token ([`Backend::forward_greedy`]).
    pub fn push_greedy(&mut self, token: u32) -> Result<u32> {
        let pos = self.next_pos(1)?;
        let next = self.backend.forward_greedy(&[token], pos)?;
        self.tokens.push(token);
        Ok(next)
    }

    /// Makes the cache hold exactly `tokens`, evaluating only what differs from what is already
    /// cached (the longest common prefix is kept: a chat turn re-evaluates only the new messages).
    /// Afterwards `logits()` belongs to the last token. Returns how many tokens were evaluated.
    pub fn prefill(&mut self, tokens: &[u32]) -> Result<usize> {
        if tokens.is_empty() {
            return Err(Error::Invalid("empty prompt".into()));
        }
        if tokens.len() > self.ctx() {
            return Err(Error::ContextFull { needed: tokens.len(), ctx: self.ctx() });
        }
        let common = self.tokens.iter().zip(tokens).take_while(|(a, b)| a == b).count();
        // The last token is always evaluated again so that its logits are fresh.
        let keep = common.min(tokens.len() - 1);
        self.truncate(keep);
        self.push(&tokens[keep..], true)?;
        Ok(tokens.len() - keep)
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
        let t0 = Instant::now();
        let n_prompt_eval = self.prefill(prompt)?;
        let prompt_time = t0.elapsed();
        let t1 = Instant::now();
        let mut sampler = Sampler::new(params.sampler.clone());
        let mut decoder = StreamDecoder::new();
        let mut stops = StopMatcher::new(&params.stop);
        let mut n_generated = 0;
        // A plain greedy pick is taken by the backend with each step (on a GPU only the id comes back).
        let mut picked = None;
        let stop = loop {
            if n_generated == params.max_tokens {
                break StopReason::MaxTokens;
            }
            let next = match picked.take() {
                Some(t) => t,
                None => sampler.sample(self.backend.logits(), &self.tokens)?,
            };
            if tok.is_end_of_generation(next) {
                break StopReason::EndToken;
            }
            n_generated += 1;
            let (text, hit) = stops.feed(&decoder.push(tok, next));
            if !text.is_empty() && !on_text(&text) {
                break StopReason::Cancelled;
            }
            if hit {
                break StopReason::StopString;
            }
            if self.tokens.len() == self.ctx() {
                break StopReason::ContextFull;
            }
            if sampler.is_plain_greedy() {
                picked = Some(self.push_greedy(next)?);
            } else {
                self.push(&[next], true)?;
            }
        };
        if !matches!(stop, StopReason::StopString | StopReason::Cancelled) {
            let (rest, _) = stops.feed(&decoder.flush());
            let rest = rest + &stops.finish();
            if !rest.is_empty() {
                on_text(&rest);
            }
        }
        Ok(GenStats { n_prompt_eval, n_generated, prompt_time, gen_time: t1.elapsed(), stop })
    }
}

/// Finds stop strings in streamed text. Text that might be the start of a stop string is held back
/// until it is clear that it is not.
/// It owns its strings so that a server can keep one per running request.
pub struct StopMatcher {
    stops: Vec<String>,
    pending: String,
}

impl StopMatcher {
    pub fn new(stops: &[String]) -> Self {
        Self { stops: stops.to_vec(), pending: String::new() }
    }

    /// Adds `text`; returns the text that is safe to emit, and whether a stop string was hit
    /// (then the returned text ends right before it).
    pub fn feed(&mut self, text: &str) -> (String, bool) {
        self.pending.push_str(text);
        let hit = self.stops.iter().filter(|s| !s.is_empty()).filter_map(|s| self.pending.find(s.as_str())).min();
        if let Some(at) = hit {
            let out = self.pending[..at].to_string();
            self.pending.clear();
            return (out, true);
        }
        // Hold back the longest suffix that is a proper prefix of some stop string.
        let hold = self
            .stops
            .iter()
            .flat_map(|s| (1..s.len()).filter(move |&n| s.is_char_boundary(n)).map(move |n| &s[..n]))
            .filter(|p| self.pending.ends_with(p))
            .map(str::len)
            .max()
            .unwrap_or(0);
        let out = self.pending[..self.pending.len() - hold].to_string();
        self.pending.drain(..self.pending.len() - hold);
        (out, false)
    }

    /// The held-back text, once the stream has ended without a stop.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_strings_are_cut_even_across_pieces() {
        let stops = vec!["\nUser:".to_string()];
        let mut m = StopMatcher::new(&stops);
        assert_eq!(m.feed("Hello"), ("Hello".into(), false));
        assert_eq!(m.feed(" there\nUs"), (" there".into(), false));
        assert_eq!(m.feed("er: hi"), ("".into(), true));
    }

    #[test]
    fn held_text_is_released_when_it_is_not_a_stop() {
        let stops = vec!["END".to_string()];
        let mut m = StopMatcher::new(&stops);
        assert_eq!(m.feed("the EN"), ("the ".into(), false));
        assert_eq!(m.feed("D"), ("".into(), true));
        let mut m = StopMatcher::new(&stops);
        assert_eq!(m.feed("E"), ("".into(), false));
        assert_eq!(m.feed("nd"), ("End".into(), false));
        assert_eq!(m.feed("EN"), ("".into(), false));
        assert_eq!(m.finish(), "EN");
    }
}
