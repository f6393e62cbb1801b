//! The one generation loop: `Session::generate` (which lets the device take greedy picks) against the
//! same `Generation` stepped by hand from the logits, as the browser and the server step it.

mod common;

use std::path::Path;
use std::sync::Arc;

use bitnet_engine::backend::cpu::{kernels, CpuModel};
use bitnet_engine::backend::{Want, Weights};
use bitnet_engine::generate::sampler::SamplerParams;
use bitnet_engine::generate::{reusable_prefix, GenParams, Generation, Output, Session};

/// Step by step from the logits gives exactly `Session::generate`'s text, stop reason and cache, for
/// sampled and greedy runs, with stop strings, and into a full context.
#[test]
fn stepping_reproduces_session_generate() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models");
    let (model, tok) = common::load(&dir.join("tiny-a-i2_s.gguf"));
    let weights: Arc<dyn Weights> = Arc::new(CpuModel::new(model, kernels::best(), None, None).unwrap());
    let prompt = tok.encode("Hello world, the", true).unwrap();
    let sampled = |seed| SamplerParams { temperature: 1.0, seed, ..SamplerParams::default() };
    let penalized = SamplerParams { frequency_penalty: 0.5, presence_penalty: 0.3, ..sampled(9) };
    let cases = [
        (GenParams { max_tokens: 30, sampler: SamplerParams::greedy(), stop: vec![] }, 64),
        (GenParams { max_tokens: 40, sampler: sampled(7), stop: vec![] }, 64),
        (GenParams { max_tokens: 40, sampler: sampled(3), stop: vec!["e".into(), "th".into()] }, 64),
        (GenParams { max_tokens: 40, sampler: sampled(5), stop: vec![] }, 12),
        (GenParams { max_tokens: 40, sampler: penalized, stop: vec![] }, 64),
    ];
    for (params, ctx) in cases {
        let mut want = String::new();
        let mut s1 = Session::open(&weights, ctx).unwrap();
        let stats = s1.generate(&tok, &prompt, &params, &mut |t| {
            want.push_str(t);
            true
        });
        let stats = stats.unwrap();

        let mut s2 = Session::open(&weights, ctx).unwrap();
        let mut gen = Generation::new(&params, s2.prefill(&prompt).unwrap());
        let mut got = String::new();
        while let Some(step) = gen.step(&tok, Output::Logits(s2.logits()), s2.tokens(), s2.ctx()).unwrap() {
            got.push_str(&step.text);
            if let Some(t) = step.eval {
                s2.push(&[t], Want::Logits).unwrap();
            }
        }
        assert!(!got.is_empty(), "{params:?}");
        assert_eq!(got, want, "{params:?}");
        assert_eq!(gen.stop, Some(stats.stop), "{params:?}");
        assert_eq!(gen.n_generated, stats.n_generated, "{params:?}");
        assert_eq!(s2.tokens(), s1.tokens(), "{params:?}: the cache holds the same tokens afterwards");
    }
}

/// A caller that stops reading ends the generation as cancelled, with no more text.
#[test]
fn a_callback_that_returns_false_cancels() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models");
    let (model, tok) = common::load(&dir.join("tiny-a-i2_s.gguf"));
    let weights: Arc<dyn Weights> = Arc::new(CpuModel::new(model, kernels::best(), None, None).unwrap());
    let prompt = tok.encode("Hello world, the", true).unwrap();
    let params = GenParams { max_tokens: 40, sampler: SamplerParams::greedy(), stop: vec![] };
    let mut s = Session::open(&weights, 64).unwrap();
    let mut pieces = 0;
    let stats = s
        .generate(&tok, &prompt, &params, &mut |_| {
            pieces += 1;
            pieces < 3
        })
        .unwrap();
    assert_eq!(pieces, 3);
    assert_eq!(stats.stop, bitnet_engine::generate::StopReason::Cancelled);
    assert!(stats.n_generated < 40);
}

#[test]
fn the_prompts_last_token_is_always_evaluated_again() {
    assert_eq!(reusable_prefix(&[1, 2, 3], &[1, 2, 3]), 2);
    assert_eq!(reusable_prefix(&[1, 2, 3], &[1, 2, 3, 4]), 3);
    assert_eq!(reusable_prefix(&[1, 9], &[1, 2, 3]), 1);
    assert_eq!(reusable_prefix(&[], &[5]), 0);
    assert_eq!(reusable_prefix(&[5], &[]), 0);
}
