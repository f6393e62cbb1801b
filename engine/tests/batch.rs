//! The batched forward pass against the one-token path, on the fixture models and every kernel set:
//! a prompt run in tiles gives the logits of running it token by token, and one step of several
//! sequences gives each the logits of stepping it alone. Every token is quantized with its own scale
//! and the integer parts are exact, so the two agree to float rounding (in practice bit for bit).

use bitnet_engine::gguf::GgufFile;
use bitnet_engine::kernels::{self, Kernels};
use bitnet_engine::model::{BatchItem, BatchScratch, LoadOptions, Model, State};
use bitnet_engine::Error;

fn fixture_models() -> Vec<(String, Model)> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models");
    let mut models = Vec::new();
    for name in ["tiny-a-i2_s.gguf", "tiny-a-f16.gguf", "tiny-b-tq2_0.gguf", "tiny-b-scale.gguf"] {
        let bytes = std::fs::read(dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        let g = GgufFile::parse(&bytes).unwrap();
        models.push((name.to_string(), Model::load(&g, &bytes, &LoadOptions::default(), &mut |_, _| {}).unwrap()));
    }
    models
}

fn tokens(model: &Model, n: usize, seed: u32) -> Vec<u32> {
    let vocab = model.config.n_vocab as u32;
    (0..n as u32).map(|i| (i * 7919 + seed * 104_729 + 13) % vocab).collect()
}

/// Runs `tokens` from `pos` one at a time (a tile of one), as decoding does.
fn one_by_one(model: &Model, k: &dyn Kernels, state: &mut State, tokens: &[u32], pos: usize) {
    let mut scratch = BatchScratch::new(&model.config, 1);
    for (i, t) in tokens.iter().enumerate() {
        let mut item =
            [BatchItem { state: &mut *state, tokens: std::slice::from_ref(t), pos: pos + i, want_logits: true }];
        model.forward_batch(k, &mut scratch, &mut item).unwrap();
    }
}

fn assert_close(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= 1e-4 * w.abs().max(1.0), "{what}: logit {i}: {g} vs {w}");
    }
}

#[test]
fn a_prompt_in_tiles_equals_token_by_token() {
    for (name, model) in fixture_models() {
        let prompt = tokens(&model, 23, 1);
        for k in kernels::available() {
            let what = format!("{name}, {} kernels", k.name());
            let mut want = State::new(&model.config, 64).unwrap();
            one_by_one(&model, k, &mut want, &prompt, 0);
            // Tiles of 5 split the prompt unevenly; 64 takes it whole.
            for tile in [5, 64] {
                let mut got = State::new(&model.config, 64).unwrap();
                let mut scratch = BatchScratch::new(&model.config, tile);
                let mut item = [BatchItem { state: &mut got, tokens: &prompt, pos: 0, want_logits: true }];
                model.forward_batch(k, &mut scratch, &mut item).unwrap();
                assert_close(&got.logits, &want.logits, &format!("{what}, tile {tile}"));
                // The caches agree too: the next token sees the same past.
                one_by_one(&model, k, &mut got, &[5], prompt.len());
                let mut next = State::new(&model.config, 64).unwrap();
                one_by_one(&model, k, &mut next, &prompt, 0);
                one_by_one(&model, k, &mut next, &[5], prompt.len());
                assert_close(&got.logits, &next.logits, &format!("{what}, tile {tile}, next token"));
            }
        }
    }
}

#[test]
fn one_step_of_several_sequences_equals_separate_steps() {
    for (name, model) in fixture_models() {
        let k = kernels::best();
        let prompts: Vec<Vec<u32>> = [3, 11, 1].iter().zip(1..).map(|(&n, seed)| tokens(&model, n, seed)).collect();
        let mut states: Vec<State> = prompts.iter().map(|_| State::new(&model.config, 32).unwrap()).collect();
        for (s, p) in states.iter_mut().zip(&prompts) {
            one_by_one(&model, k, s, p, 0);
        }
        // Alone: each sequence takes one more token (and a fourth sequence runs its whole prompt).
        let next = [7u32, 8, 9];
        let fresh = tokens(&model, 6, 9);
        let mut alone: Vec<State> = prompts.iter().map(|_| State::new(&model.config, 32).unwrap()).collect();
        for ((s, p), t) in alone.iter_mut().zip(&prompts).zip(&next) {
            one_by_one(&model, k, s, p, 0);
            one_by_one(&model, k, s, &[*t], p.len());
        }
        let mut fresh_alone = State::new(&model.config, 32).unwrap();
        one_by_one(&model, k, &mut fresh_alone, &fresh, 0);

        // Together, in tiles of 4 that cut across sequences; the third one does not ask for logits.
        let mut fresh_state = State::new(&model.config, 32).unwrap();
        let mut scratch = BatchScratch::new(&model.config, 4);
        let [s0, s1, s2] = &mut states[..] else { unreachable!() };
        let mut items = [
            BatchItem { state: s0, tokens: &next[0..1], pos: prompts[0].len(), want_logits: true },
            BatchItem { state: &mut fresh_state, tokens: &fresh, pos: 0, want_logits: true },
            BatchItem { state: s1, tokens: &next[1..2], pos: prompts[1].len(), want_logits: true },
            BatchItem { state: s2, tokens: &next[2..3], pos: prompts[2].len(), want_logits: false },
        ];
        model.forward_batch(k, &mut scratch, &mut items).unwrap();
        assert_close(&states[0].logits, &alone[0].logits, &format!("{name}: sequence 0"));
        assert_close(&states[1].logits, &alone[1].logits, &format!("{name}: sequence 1"));
        assert_close(&fresh_state.logits, &fresh_alone.logits, &format!("{name}: the prompt in the batch"));
        // The third sequence's cache took its token although its logits were not computed.
        one_by_one(&model, k, &mut states[2], &[4], prompts[2].len() + 1);
        one_by_one(&model, k, &mut alone[2], &[4], prompts[2].len() + 1);
        assert_close(&states[2].logits, &alone[2].logits, &format!("{name}: sequence 2, a step later"));
    }
}

#[test]
fn bad_batches_are_errors() {
    let (_, model) = fixture_models().swap_remove(0);
    let k = kernels::best();
    let mut scratch = BatchScratch::new(&model.config, 4);
    let mut state = State::new(&model.config, 8).unwrap();
    let vocab = model.config.n_vocab as u32;
    let mut run = |tokens: &[u32], pos: usize| {
        let mut item = [BatchItem { state: &mut state, tokens, pos, want_logits: true }];
        model.forward_batch(k, &mut scratch, &mut item)
    };
    assert!(matches!(run(&[], 0), Err(Error::Invalid(_))), "no tokens");
    assert!(matches!(run(&[1; 9], 0), Err(Error::ContextFull { needed: 9, ctx: 8 })));
    assert!(matches!(run(&[1], 8), Err(Error::ContextFull { needed: 9, ctx: 8 })));
    assert!(matches!(run(&[1, vocab], 0), Err(Error::Invalid(_))), "token outside the vocabulary");
    run(&[1; 8], 0).expect("a full context");

    // A state or a scratch made for another model is refused, not a panic.
    let (_, other) = fixture_models().swap_remove(2);
    let mut foreign = State::new(&other.config, 8).unwrap();
    let mut item = [BatchItem { state: &mut foreign, tokens: &[1], pos: 0, want_logits: true }];
    assert!(model.forward_batch(k, &mut scratch, &mut item).is_err(), "a state of another model");
    let mut foreign_scratch = BatchScratch::new(&other.config, 4);
    let mut item = [BatchItem { state: &mut state, tokens: &[1], pos: 0, want_logits: true }];
    assert!(model.forward_batch(k, &mut foreign_scratch, &mut item).is_err(), "a scratch of another model");
}

/// `LoadOptions::head`: the requantized head gives logits close to the float head's, through the
/// batched path as through the one-token path; Q6_K refuses rows that are not whole super-blocks.
#[test]
fn a_requantized_head_stays_close_to_the_float_head() {
    use bitnet_engine::quant::GgmlType;
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models");
    let load = |name: &str, head| {
        let bytes = std::fs::read(dir.join(name)).unwrap();
        let g = GgufFile::parse(&bytes).unwrap();
        Model::load(&g, &bytes, &LoadOptions { head, ..Default::default() }, &mut |_, _| {})
    };
    let float = load("tiny-b-tq2_0.gguf", None).unwrap();
    let prompt = tokens(&float, 9, 3);
    let k = kernels::best();
    let mut want = State::new(&float.config, 32).unwrap();
    one_by_one(&float, k, &mut want, &prompt, 0);
    let spread = want.logits.iter().fold(0f32, |m, v| m.max(v.abs()));
    for ty in [GgmlType::Q8_0, GgmlType::Q6_K] {
        let model = load("tiny-b-tq2_0.gguf", Some(ty)).unwrap();
        assert!(model.quant_head.is_some());
        let mut one = State::new(&model.config, 32).unwrap();
        one_by_one(&model, k, &mut one, &prompt, 0);
        let mut batched = State::new(&model.config, 32).unwrap();
        let mut item = [BatchItem { state: &mut batched, tokens: &prompt, pos: 0, want_logits: true }];
        model.forward_batch(k, &mut BatchScratch::new(&model.config, 4), &mut item).unwrap();
        assert_close(&batched.logits, &one.logits, &format!("{ty:?} head, batched"));
        let diff = one.logits.iter().zip(&want.logits).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(diff < 0.05 * spread, "{ty:?} head: logits moved by {diff} (spread {spread})");
    }
    // tiny-a rows have 96 values: Q8_0 fits, Q6_K does not.
    assert!(load("tiny-a-i2_s.gguf", Some(GgmlType::Q8_0)).is_ok());
    assert!(matches!(load("tiny-a-i2_s.gguf", Some(GgmlType::Q6_K)), Err(Error::Invalid(_))));
}
