//! Generation one token per call: `Session::generate`'s loop turned inside out.
//!
//! In the browser the loop cannot run to the end in one call: the worker must return to its event loop
//! between tokens to post each piece of text and to see an abort message, a WebGPU forward pass can only
//! be awaited, and wasm32 has no `Instant` (the worker times the calls with `performance.now()`). So a
//! [`Generation`] only decides: the caller evaluates each token it picks. The stop rules are the
//! session's, in the same order, so a seed gives the same text as `bitnet run` (tested against it below).

use bitnet_engine::sampling::Sampler;
use bitnet_engine::session::{GenParams, StopMatcher, StopReason};
use bitnet_engine::tokenizer::{StreamDecoder, Tokenizer};
use bitnet_engine::Result;

pub struct Generation {
    sampler: Sampler,
    decoder: StreamDecoder,
    stops: StopMatcher,
    max_tokens: usize,
    pub n_prompt_eval: usize,
    pub n_generated: usize,
    pub stop: Option<StopReason>,
}

/// What one step produced.
pub struct Step {
    /// The text the new token completes (often empty: a character cut across tokens, or text that might
    /// start a stop string, is held back).
    pub text: String,
    /// The new token, which the caller evaluates next (its logits feed the next step); None when
    /// generation stopped at this step.
    pub eval: Option<u32>,
}

impl Generation {
    /// A generation whose prompt has been evaluated (`n_prompt_eval` tokens of it, the rest was cached).
    pub fn new(params: &GenParams, n_prompt_eval: usize) -> Self {
        Generation {
            sampler: Sampler::new(params.sampler.clone()),
            decoder: StreamDecoder::new(),
            stops: StopMatcher::new(&params.stop),
            max_tokens: params.max_tokens,
            n_prompt_eval,
            n_generated: 0,
            stop: None,
        }
    }

    /// Picks the next token from `logits` (those of the last of the `history` tokens in a cache of `ctx`);
    /// None once generation has stopped, an error when the logits are broken.
    pub fn step(&mut self, tok: &Tokenizer, logits: &[f32], history: &[u32], ctx: usize) -> Result<Option<Step>> {
        if self.stop.is_some() {
            return Ok(None);
        }
        let stopped = |text| Ok(Some(Step { text, eval: None }));
        if self.n_generated == self.max_tokens {
            return stopped(self.finish(StopReason::MaxTokens));
        }
        let next = self.sampler.sample(logits, history)?;
        if tok.is_end_of_generation(next) {
            return stopped(self.finish(StopReason::EndToken));
        }
        self.n_generated += 1;
        let piece = self.decoder.push(tok, next);
        let (text, hit) = self.stops.feed(&piece);
        if hit {
            self.stop = Some(StopReason::StopString);
            return stopped(text);
        }
        if history.len() == ctx {
            return stopped(text + &self.finish(StopReason::ContextFull));
        }
        Ok(Some(Step { text, eval: Some(next) }))
    }

    /// Ends without a stop string: whatever the decoder and the stop matcher still hold comes out.
    fn finish(&mut self, reason: StopReason) -> String {
        self.stop = Some(reason);
        let rest = self.decoder.flush();
        let (text, _) = self.stops.feed(&rest);
        text + &self.stops.finish()
    }
}

#[cfg(all(test, not(target_arch = "wasm32")))]
mod tests {
    use super::*;
    use bitnet_engine::backend::Cpu;
    use bitnet_engine::gguf::GgufFile;
    use bitnet_engine::kernels;
    use bitnet_engine::model::{LoadOptions, Model};
    use bitnet_engine::sampling::SamplerParams;
    use bitnet_engine::session::Session;

    const TINY_A: &[u8] = include_bytes!("../../tests/fixtures/models/tiny-a-i2_s.gguf");

    /// Step by step gives exactly `Session::generate`'s text and stop reason, for sampled and greedy
    /// runs, with stop strings, and into a full context.
    #[test]
    fn steps_reproduce_session_generate() {
        let g = GgufFile::parse(TINY_A).unwrap();
        let model = Model::load(&g, TINY_A, &LoadOptions::default(), &mut |_, _| {}).unwrap();
        let tok = Tokenizer::from_metadata(&g.metadata).unwrap();
        let prompt = tok.encode("Hello world, the", true).unwrap();
        let sampled = |seed| SamplerParams { temperature: 1.0, seed, ..SamplerParams::default() };
        let cases = [
            (GenParams { max_tokens: 30, sampler: SamplerParams::greedy(), stop: vec![] }, 64),
            (GenParams { max_tokens: 40, sampler: sampled(7), stop: vec![] }, 64),
            (GenParams { max_tokens: 40, sampler: sampled(3), stop: vec!["e".into(), "th".into()] }, 64),
            (GenParams { max_tokens: 40, sampler: sampled(5), stop: vec![] }, 12),
        ];
        for (params, ctx) in cases {
            let session = || Session::new(Box::new(Cpu::new(&model, kernels::best(), ctx).unwrap()));
            let mut want = String::new();
            let mut s1 = session();
            let stats = s1.generate(&tok, &prompt, &params, &mut |t| {
                want.push_str(t);
                true
            });
            let stats = stats.unwrap();

            let mut s2 = session();
            let mut gen = Generation::new(&params, s2.prefill(&prompt).unwrap());
            let mut got = String::new();
            while let Some(step) = gen.step(&tok, s2.logits(), s2.tokens(), s2.ctx()).unwrap() {
                got.push_str(&step.text);
                if let Some(t) = step.eval {
                    s2.push(&[t], true).unwrap();
                }
            }
            assert_eq!(got, want, "{params:?}");
            assert_eq!(gen.stop, Some(stats.stop), "{params:?}");
            assert_eq!(gen.n_generated, stats.n_generated, "{params:?}");
            assert_eq!(s2.tokens(), s1.tokens(), "{params:?}: the cache holds the same tokens afterwards");
        }
    }
}
