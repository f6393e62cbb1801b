//! The generation stepper. It owns no model and runs nothing: each [`Generation::step`] takes what the
//! last forward pass produced and says which token to evaluate next and what text that token completes.
//! Every front end (the CLI's session, each server slot, the browser worker) drives this one loop, so a
//! seed gives the same text everywhere.

use super::sampler::{token_logprobs, Sampler, SamplerParams, TokenLogprob};
use super::stop::StopMatcher;
use crate::backend::Want;
use crate::text::tokenizer::{StreamDecoder, Tokenizer};
use crate::Result;

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
    /// The caller stopped it (a callback, a client that went away, an abort).
    Cancelled,
}

/// What the last forward pass produced for the stepper to pick from.
#[derive(Clone, Copy, Debug)]
pub enum Output<'a> {
    /// The next-token logits.
    Logits(&'a [f32]),
    /// The greedy token, taken on the device ([`Want::Greedy`]).
    Token(u32),
}

/// What one step produced.
#[derive(Debug, PartialEq)]
pub struct TextStep {
    /// The text the new token completes (often empty: a character cut across tokens, or text that might
    /// start a stop string, is held back). When generation stops, whatever was held back comes out here.
    pub text: String,
    /// The new token, which the caller evaluates next (its output feeds the next step); None when
    /// generation stopped at this step.
    pub eval: Option<u32>,
    /// The new token's log-probabilities, when [`SamplerParams::n_probs`] asks for them (an end token, which
    /// stops generation and is not part of the output, has none).
    pub logprob: Option<TokenLogprob>,
}

pub struct Generation {
    sampler: Sampler,
    /// The grammar the output must follow ([`Generation::constrain`]), and scratch for the masked logits.
    #[cfg(feature = "grammar")]
    constraint: Option<(super::grammar::Constraint, Vec<f32>)>,
    decoder: StreamDecoder,
    stops: StopMatcher,
    max_tokens: usize,
    /// Prompt tokens evaluated for it (those not already in the cache).
    pub n_prompt_eval: usize,
    pub n_generated: usize,
    /// Why it stopped; None while it runs.
    pub stop: Option<StopReason>,
}

impl Generation {
    /// A generation whose prompt has been evaluated (`n_prompt_eval` tokens of it; the rest was cached).
    pub fn new(params: &GenParams, n_prompt_eval: usize) -> Self {
        Generation {
            sampler: Sampler::new(params.sampler.clone()),
            #[cfg(feature = "grammar")]
            constraint: None,
            decoder: StreamDecoder::new(),
            stops: StopMatcher::new(&params.stop),
            max_tokens: params.max_tokens,
            n_prompt_eval,
            n_generated: 0,
            stop: None,
        }
    }

    /// Makes the output follow a grammar: each pick is among the tokens it allows, and once it is
    /// complete only the end token is.
    #[cfg(feature = "grammar")]
    pub fn constrain(&mut self, constraint: super::grammar::Constraint) {
        self.constraint = Some((constraint, Vec::new()));
    }

    fn constrained(&self) -> bool {
        #[cfg(feature = "grammar")]
        return self.constraint.is_some();
        #[cfg(not(feature = "grammar"))]
        false
    }

    /// What the forward pass of the token to evaluate must produce: only the greedy token when the pick
    /// is a plain argmax (a GPU then returns the id alone), else the logits.
    pub fn want(&self) -> Want {
        if self.sampler.is_plain_greedy() && !self.constrained() {
            Want::Greedy
        } else {
            Want::Logits
        }
    }

    /// Picks the next token from `out` (the output for the last of the `history` tokens, in a cache of
    /// `ctx`); None once generation has stopped, an error when the logits are broken (NaN: a broken model).
    pub fn step(&mut self, tok: &Tokenizer, out: Output<'_>, history: &[u32], ctx: usize) -> Result<Option<TextStep>> {
        if self.stop.is_some() {
            return Ok(None);
        }
        let stopped = |text, logprob| Ok(Some(TextStep { text, eval: None, logprob }));
        if self.n_generated == self.max_tokens {
            return stopped(self.finish(StopReason::MaxTokens), None);
        }
        if self.sampler.params.ignore_eos {
            // Once: from now on the bans stand in the bias (which also keeps the pick off the device).
            self.sampler.params.ignore_eos = false;
            let end_tokens = (0..tok.vocab_size() as u32).filter(|&t| tok.is_end_of_generation(t));
            self.sampler.params.logit_bias.extend(end_tokens.map(|t| (t, f32::NEG_INFINITY)));
        }
        let (next, logprob) = match out {
            Output::Logits(logits) => {
                let next = self.sample(logits, history)?;
                (next, self.sampler.params.n_probs.map(|n| token_logprobs(logits, next, n)))
            }
            Output::Token(t) => (t, None),
        };
        if tok.is_end_of_generation(next) {
            return stopped(self.finish(StopReason::EndToken), None);
        }
        #[cfg(feature = "grammar")]
        if let Some((constraint, _)) = &mut self.constraint {
            constraint.accept(next)?;
        }
        self.n_generated += 1;
        let (text, hit) = self.stops.feed(&self.decoder.push(tok, next));
        if hit {
            self.stop = Some(StopReason::StopString);
            return stopped(text, logprob);
        }
        if history.len() == ctx {
            return stopped(text + &self.finish(StopReason::ContextFull), logprob);
        }
        Ok(Some(TextStep { text, eval: Some(next), logprob }))
    }

    /// The sampler's pick, among the tokens the grammar allows if there is one.
    fn sample(&mut self, logits: &[f32], history: &[u32]) -> Result<u32> {
        #[cfg(feature = "grammar")]
        if let Some((constraint, masked)) = &mut self.constraint {
            masked.clear();
            masked.extend_from_slice(logits);
            constraint.mask(masked)?;
            return self.sampler.sample(masked, history);
        }
        self.sampler.sample(logits, history)
    }

    /// Ends it because the caller stopped it: nothing more comes out.
    pub fn cancel(&mut self) {
        self.stop = Some(StopReason::Cancelled);
    }

    /// Ends it without a stop string: whatever the decoder and the stop matcher still hold comes out.
    fn finish(&mut self, reason: StopReason) -> String {
        self.stop = Some(reason);
        let (text, _) = self.stops.feed(&self.decoder.flush());
        text + &self.stops.finish()
    }
}
