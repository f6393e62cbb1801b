//! The one generation loop: `Session::generate` (which lets the device take greedy picks) against the
//! same `Generation` stepped by hand from the logits, as the browser and the server step it.

mod common;

use std::path::Path;
use std::sync::Arc;

use bitnet_engine::backend::cpu::{kernels, CpuModel};
use bitnet_engine::backend::{Want, Weights};
use bitnet_engine::generate::sampler::{SamplerParams, TokenLogprob};
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

/// Steps `params` by hand from the logits of `prompt`; returns the generation, its text and the steps' reported
/// log-probabilities.
fn step_by_hand(
    params: &GenParams,
    prompt: &str,
    setup: impl FnOnce(&mut Generation),
) -> (Generation, String, Vec<TokenLogprob>) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models");
    let (model, tok) = common::load(&dir.join("tiny-a-i2_s.gguf"));
    let weights: Arc<dyn Weights> = Arc::new(CpuModel::new(model, kernels::best(), None, None).unwrap());
    let prompt = tok.encode(prompt, true).unwrap();
    let mut s = Session::open(&weights, 256).unwrap();
    let mut gen = Generation::new(params, s.prefill(&prompt).unwrap());
    setup(&mut gen);
    let (mut text, mut logprobs) = (String::new(), Vec::new());
    while let Some(step) = gen.step(&tok, Output::Logits(s.logits()), s.tokens(), s.ctx()).unwrap() {
        text.push_str(&step.text);
        logprobs.extend(step.logprob);
        if let Some(t) = step.eval {
            s.push(&[t], Want::Logits).unwrap();
        }
    }
    (gen, text, logprobs)
}

/// ignore_eos bans the end tokens: a generation that a bias would end at once runs to its length; each
/// step reports its token's log-probabilities when asked.
#[test]
fn ignore_eos_and_logprobs_in_the_stepper() {
    let eos_forced = SamplerParams { logit_bias: vec![(513, 100.0)], ..SamplerParams::greedy() };
    let params = GenParams { max_tokens: 10, sampler: eos_forced.clone(), stop: vec![] };
    let (gen, _, logprobs) = step_by_hand(&params, "Once upon", |_| {});
    assert_eq!((gen.stop, gen.n_generated), (Some(bitnet_engine::generate::StopReason::EndToken), 0));
    assert!(logprobs.is_empty(), "none asked for");
    let ignoring = SamplerParams { ignore_eos: true, n_probs: Some(3), ..eos_forced };
    let params = GenParams { max_tokens: 10, sampler: ignoring, stop: vec![] };
    let (gen, _, logprobs) = step_by_hand(&params, "Once upon", |_| {});
    assert_eq!((gen.stop, gen.n_generated), (Some(bitnet_engine::generate::StopReason::MaxTokens), 10));
    // One report per generated token; never the banned end token, which the raw logits still rank.
    assert_eq!(logprobs.len(), 10);
    assert!(logprobs.iter().all(|l| l.token != 513 && l.top.len() == 3 && l.top[0].1 >= l.top[2].1));
}

/// A JSON schema constraint: the greedy and sampled outputs parse and follow the schema.
#[cfg(feature = "grammar")]
#[test]
fn a_json_schema_constraint_shapes_the_output() {
    use bitnet_engine::generate::grammar::{GrammarSpec, Grammars};
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models");
    let (_, tok) = common::load(&dir.join("tiny-a-i2_s.gguf"));
    let grammars = Grammars::new(&tok).unwrap();
    let schema = serde_json::json!({
        "type": "object",
        "properties": { "n": { "type": "integer", "minimum": 0, "maximum": 9 }, "ok": { "type": "boolean" } },
        "required": ["n", "ok"], "additionalProperties": false,
    });
    for sampler in [SamplerParams::greedy(), SamplerParams { temperature: 1.0, seed: 4, ..SamplerParams::default() }] {
        let params = GenParams { max_tokens: 60, sampler, stop: vec![] };
        let spec = GrammarSpec::JsonSchema(schema.clone());
        let (gen, text, _) = step_by_hand(&params, "Data:", |g| g.constrain(grammars.constraint(&spec).unwrap()));
        assert_eq!(gen.stop, Some(bitnet_engine::generate::StopReason::EndToken), "{text:?}");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text:?}"));
        assert!((0..=9).contains(&v["n"].as_i64().unwrap()) && v["ok"].is_boolean(), "{text}");
        assert_eq!(v.as_object().unwrap().len(), 2, "{text}");
    }
    assert!(grammars.constraint(&GrammarSpec::JsonSchema(serde_json::json!({ "type": 5 }))).is_err());
}
