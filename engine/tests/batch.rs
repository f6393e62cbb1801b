//! The batched forward pass against the one-token path, on the fixture models and every kernel set:
//! a prompt run in tiles gives the logits of running it token by token, and one step of several
//! sequences gives each the logits of stepping it alone. Every token is quantized with its own scale
//! and the integer parts are exact, so the two agree to float rounding (in practice bit for bit).

use std::sync::Arc;

use bitnet_engine::backend::cpu::forward::{BatchItem, BatchScratch, State};
use bitnet_engine::backend::cpu::kernels::{self, Kernels};
use bitnet_engine::backend::cpu::CpuModel;
use bitnet_engine::backend::{Sequence, Step, Want, Weights};
use bitnet_engine::format::gguf::GgufFile;
use bitnet_engine::format::quant::GgmlType;
use bitnet_engine::model::{LoadOptions, Model};
use bitnet_engine::Error;

const FIXTURES: [&str; 4] = ["tiny-a-i2_s.gguf", "tiny-a-f16.gguf", "tiny-b-tq2_0.gguf", "tiny-b-scale.gguf"];

fn load(name: &str) -> Model {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models");
    let bytes = std::fs::read(dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    let g = GgufFile::parse(&bytes).unwrap();
    Model::load(&g, &bytes, &LoadOptions::default(), &mut |_, _| {}).unwrap()
}

/// A fixture model on the CPU with kernels `k` and LM head `head`.
fn cpu(name: &str, k: &'static dyn Kernels, head: Option<GgmlType>) -> Result<CpuModel, Error> {
    CpuModel::new(load(name), k, head, None)
}

fn fixture_models(k: &'static dyn Kernels) -> Vec<(String, CpuModel)> {
    FIXTURES.iter().map(|name| (name.to_string(), cpu(name, k, None).unwrap())).collect()
}

fn tokens(m: &CpuModel, n: usize, seed: u32) -> Vec<u32> {
    let vocab = m.model.config.n_vocab as u32;
    (0..n as u32).map(|i| (i * 7919 + seed * 104_729 + 13) % vocab).collect()
}

fn state(m: &CpuModel, ctx: usize) -> State {
    State::new(&m.model.config, ctx, m.kv).unwrap()
}

/// Runs `tokens` from `pos` one at a time (a tile of one), as decoding does.
fn one_by_one(m: &CpuModel, state: &mut State, tokens: &[u32], pos: usize) {
    let mut scratch = BatchScratch::new(&m.model.config, 1);
    for (i, t) in tokens.iter().enumerate() {
        let mut item =
            [BatchItem { state: &mut *state, tokens: std::slice::from_ref(t), pos: pos + i, want_logits: true }];
        m.forward_batch(&mut scratch, &mut item).unwrap();
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
    for k in kernels::available() {
        for (name, m) in fixture_models(k) {
            let prompt = tokens(&m, 23, 1);
            let what = format!("{name}, {} kernels", k.name());
            let mut want = state(&m, 64);
            one_by_one(&m, &mut want, &prompt, 0);
            // Tiles of 5 split the prompt unevenly; 64 takes it whole.
            for tile in [5, 64] {
                let mut got = state(&m, 64);
                let mut scratch = BatchScratch::new(&m.model.config, tile);
                let mut item = [BatchItem { state: &mut got, tokens: &prompt, pos: 0, want_logits: true }];
                m.forward_batch(&mut scratch, &mut item).unwrap();
                assert_close(&got.logits, &want.logits, &format!("{what}, tile {tile}"));
                // The caches agree too: the next token sees the same past.
                one_by_one(&m, &mut got, &[5], prompt.len());
                let mut next = state(&m, 64);
                one_by_one(&m, &mut next, &prompt, 0);
                one_by_one(&m, &mut next, &[5], prompt.len());
                assert_close(&got.logits, &next.logits, &format!("{what}, tile {tile}, next token"));
            }
        }
    }
}

#[test]
fn one_step_of_several_sequences_equals_separate_steps() {
    for (name, m) in fixture_models(kernels::best()) {
        let prompts: Vec<Vec<u32>> = [3, 11, 1].iter().zip(1..).map(|(&n, seed)| tokens(&m, n, seed)).collect();
        let mut states: Vec<State> = prompts.iter().map(|_| state(&m, 32)).collect();
        for (s, p) in states.iter_mut().zip(&prompts) {
            one_by_one(&m, s, p, 0);
        }
        // Alone: each sequence takes one more token (and a fourth sequence runs its whole prompt).
        let next = [7u32, 8, 9];
        let fresh = tokens(&m, 6, 9);
        let mut alone: Vec<State> = prompts.iter().map(|_| state(&m, 32)).collect();
        for ((s, p), t) in alone.iter_mut().zip(&prompts).zip(&next) {
            one_by_one(&m, s, p, 0);
            one_by_one(&m, s, &[*t], p.len());
        }
        let mut fresh_alone = state(&m, 32);
        one_by_one(&m, &mut fresh_alone, &fresh, 0);

        // Together, in tiles of 4 that cut across sequences; the third one does not ask for logits.
        let mut fresh_state = state(&m, 32);
        let mut scratch = BatchScratch::new(&m.model.config, 4);
        let [s0, s1, s2] = &mut states[..] else { unreachable!() };
        let mut items = [
            BatchItem { state: s0, tokens: &next[0..1], pos: prompts[0].len(), want_logits: true },
            BatchItem { state: &mut fresh_state, tokens: &fresh, pos: 0, want_logits: true },
            BatchItem { state: s1, tokens: &next[1..2], pos: prompts[1].len(), want_logits: true },
            BatchItem { state: s2, tokens: &next[2..3], pos: prompts[2].len(), want_logits: false },
        ];
        m.forward_batch(&mut scratch, &mut items).unwrap();
        assert_close(&states[0].logits, &alone[0].logits, &format!("{name}: sequence 0"));
        assert_close(&states[1].logits, &alone[1].logits, &format!("{name}: sequence 1"));
        assert_close(&fresh_state.logits, &fresh_alone.logits, &format!("{name}: the prompt in the batch"));
        // The third sequence's cache took its token although its logits were not computed.
        one_by_one(&m, &mut states[2], &[4], prompts[2].len() + 1);
        one_by_one(&m, &mut alone[2], &[4], prompts[2].len() + 1);
        assert_close(&states[2].logits, &alone[2].logits, &format!("{name}: sequence 2, a step later"));
    }
}

#[test]
fn bad_batches_are_errors() {
    let m = cpu(FIXTURES[0], kernels::best(), None).unwrap();
    let mut scratch = BatchScratch::new(&m.model.config, 4);
    let mut st = state(&m, 8);
    let vocab = m.model.config.n_vocab as u32;
    let mut run = |tokens: &[u32], pos: usize| {
        let mut item = [BatchItem { state: &mut st, tokens, pos, want_logits: true }];
        m.forward_batch(&mut scratch, &mut item)
    };
    assert!(matches!(run(&[], 0), Err(Error::Invalid(_))), "no tokens");
    assert!(matches!(run(&[1; 9], 0), Err(Error::ContextFull { needed: 9, ctx: 8 })));
    assert!(matches!(run(&[1], 8), Err(Error::ContextFull { needed: 9, ctx: 8 })));
    assert!(matches!(run(&[1, vocab], 0), Err(Error::Invalid(_))), "token outside the vocabulary");
    run(&[1; 8], 0).expect("a full context");

    // A state or a scratch made for another model is refused, not a panic.
    let other = cpu(FIXTURES[2], kernels::best(), None).unwrap();
    let mut foreign = state(&other, 8);
    let mut item = [BatchItem { state: &mut foreign, tokens: &[1], pos: 0, want_logits: true }];
    assert!(m.forward_batch(&mut scratch, &mut item).is_err(), "a state of another model");
    let mut foreign_scratch = BatchScratch::new(&other.model.config, 4);
    let mut item = [BatchItem { state: &mut st, tokens: &[1], pos: 0, want_logits: true }];
    assert!(m.forward_batch(&mut foreign_scratch, &mut item).is_err(), "a scratch of another model");
}

/// `CpuModel::new`'s `head`: the requantized head gives logits close to the float head's, through the
/// batched path as through the one-token path; Q6_K refuses rows that are not whole super-blocks.
#[test]
fn a_requantized_head_stays_close_to_the_float_head() {
    let k = kernels::best();
    let float = cpu("tiny-b-tq2_0.gguf", k, None).unwrap();
    let prompt = tokens(&float, 9, 3);
    let mut want = state(&float, 32);
    one_by_one(&float, &mut want, &prompt, 0);
    let spread = want.logits.iter().fold(0f32, |m, v| m.max(v.abs()));
    for ty in [GgmlType::Q8_0, GgmlType::Q6_K] {
        let m = cpu("tiny-b-tq2_0.gguf", k, Some(ty)).unwrap();
        assert!(m.quant_head.is_some());
        let mut one = state(&m, 32);
        one_by_one(&m, &mut one, &prompt, 0);
        let mut batched = state(&m, 32);
        let mut item = [BatchItem { state: &mut batched, tokens: &prompt, pos: 0, want_logits: true }];
        m.forward_batch(&mut BatchScratch::new(&m.model.config, 4), &mut item).unwrap();
        assert_close(&batched.logits, &one.logits, &format!("{ty:?} head, batched"));
        let diff = one.logits.iter().zip(&want.logits).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(diff < 0.05 * spread, "{ty:?} head: logits moved by {diff} (spread {spread})");
    }
    // tiny-a rows have 96 values: Q8_0 fits, Q6_K does not.
    assert!(cpu("tiny-a-i2_s.gguf", k, Some(GgmlType::Q8_0)).is_ok());
    assert!(matches!(cpu("tiny-a-i2_s.gguf", k, Some(GgmlType::Q6_K)), Err(Error::Invalid(_))));
}

/// The device seam's batched step (`Weights::batcher`, what `bitnet serve` drives): sequences of
/// different lengths join and leave between steps, prompt pieces ride along with decode tokens, greedy
/// picks come back; each sequence gets exactly what stepping it alone through `Sequence::forward` gives.
#[test]
fn the_batcher_equals_one_sequence_steps_as_sequences_join_and_leave() {
    let w: Arc<dyn Weights> = Arc::new(cpu(FIXTURES[2], kernels::best(), None).unwrap());
    let vocab = w.config().n_vocab as u32;
    let prompt =
        |n: usize, seed: u32| -> Vec<u32> { (0..n as u32).map(|i| (i * 31 + seed * 977 + 5) % vocab).collect() };
    let prompts = [prompt(5, 1), prompt(12, 2), prompt(1, 3), prompt(7, 4)];
    // Sequence i joins at step `join[i]` with its whole prompt, then decodes `len[i]` tokens greedily.
    let (join, len) = ([0, 0, 2, 3], [6, 2, 4, 3]);
    let mut batcher = w.clone().batcher(32);
    let mut seqs: Vec<Box<dyn Sequence>> = (0..4).map(|_| w.clone().sequence(32).unwrap()).collect();
    let mut history: Vec<Vec<u32>> = vec![Vec::new(); 4];
    let mut next: Vec<Option<u32>> = vec![None; 4];
    let mut batched_logits: Vec<Vec<Vec<f32>>> = vec![Vec::new(); 4];
    for step in 0..10 {
        let mut work: Vec<(usize, Vec<u32>)> = Vec::new();
        for i in 0..4 {
            let done = history[i].len() == prompts[i].len() + len[i];
            if step == join[i] {
                work.push((i, prompts[i].clone()));
            } else if step > join[i] && !done {
                work.push((i, vec![next[i].unwrap()]));
            }
        }
        let want = |i: usize| if i == 1 { Want::Logits } else { Want::Greedy };
        let mut steps: Vec<Step> = Vec::new();
        let mut order = Vec::new();
        for (i, s) in seqs.iter_mut().enumerate() {
            if let Some((_, t)) = work.iter().find(|(j, _)| *j == i) {
                steps.push(Step { seq: s.as_mut(), tokens: t, pos: history[i].len(), want: want(i) });
                order.push(i);
            }
        }
        let picked = batcher.forward(&mut steps).unwrap();
        drop(steps);
        for (&i, p) in order.iter().zip(picked) {
            let t = &work.iter().find(|(j, _)| *j == i).unwrap().1;
            history[i].extend_from_slice(t);
            batched_logits[i].push(seqs[i].logits().to_vec());
            next[i] = match want(i) {
                Want::Greedy => Some(p.expect("a greedy step returns its token")),
                _ => {
                    assert!(p.is_none());
                    Some(bitnet_engine::backend::argmax(seqs[i].logits().iter().copied()))
                }
            };
        }
    }
    for i in 0..4 {
        assert_eq!(history[i].len(), prompts[i].len() + len[i], "sequence {i} ran to its end");
        // Alone: the prompt, then the same tokens one by one.
        let mut alone = w.clone().sequence(32).unwrap();
        alone.forward(&prompts[i], 0, Want::Logits).unwrap();
        assert_close(alone.logits(), &batched_logits[i][0], &format!("sequence {i}, prompt"));
        for (j, &t) in history[i][prompts[i].len()..].iter().enumerate() {
            let pos = prompts[i].len() + j;
            let g = alone.forward(&[t], pos, Want::Greedy).unwrap().unwrap();
            assert_close(alone.logits(), &batched_logits[i][j + 1], &format!("sequence {i}, token {j}"));
            assert_eq!(g, bitnet_engine::backend::argmax(alone.logits().iter().copied()));
        }
    }
}
