//! Choosing the next token from the logits.
//!
//! The chain is llama.cpp's: penalties (repetition, frequency, presence), then top-k, top-p and min-p truncation, then
//! temperature, then a draw. The draw walks the surviving candidates in token-id order with a
//! SplitMix64 uniform number (inverse CDF), which makes a seed reproduce the same text on every
//! target, and reproduces the sampler of smolbit's PyTorch reference (`reference.py`) exactly.
//!
//! Logits that are NaN or +infinity mean the model's arithmetic broke down (a NaN weight, a bad norm
//! epsilon): no token is a meaningful pick then, so sampling is an error rather than an arbitrary token.

use crate::backend::{argmax, check_logits};
use crate::{Error, Result};

/// Sampling settings; the defaults are llama.cpp's.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplerParams {
    /// 0 means greedy (exact argmax).
    pub temperature: f32,
    /// 0 disables top-k.
    pub top_k: usize,
    /// 1 disables top-p.
    pub top_p: f32,
    /// 0 disables min-p.
    pub min_p: f32,
    /// 1 disables the penalty.
    pub repeat_penalty: f32,
    /// How many recent tokens the penalties look at.
    pub repeat_last_n: usize,
    /// OpenAI's frequency penalty (llama.cpp's penalty_freq): subtracted once per occurrence. 0 disables it.
    pub frequency_penalty: f32,
    /// OpenAI's presence penalty (llama.cpp's penalty_present): subtracted once per distinct token. 0
    /// disables it.
    pub presence_penalty: f32,
    pub seed: u64,
    /// Added to the logits of these tokens before anything else (OpenAI's `logit_bias`); -infinity bans a token.
    pub logit_bias: Vec<(u32, f32)>,
    /// Never pick an end-of-generation token: generation goes on to its length limit. The
    /// [`Generation`](super::Generation) stepper bans them through `logit_bias` (the sampler knows no tokenizer).
    pub ignore_eos: bool,
    /// Report, for each picked token, its log-probability and those of the `n` most likely tokens
    /// ([`token_logprobs`]); None: no report.
    pub n_probs: Option<usize>,
}

impl Default for SamplerParams {
    fn default() -> Self {
        Self {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            seed: 0,
            logit_bias: Vec::new(),
            ignore_eos: false,
            n_probs: None,
        }
    }
}

impl SamplerParams {
    pub fn greedy() -> Self {
        Self { temperature: 0.0, ..Self::default() }
    }

    fn penalizes(&self) -> bool {
        self.repeat_penalty != 1.0 || self.frequency_penalty != 0.0 || self.presence_penalty != 0.0
    }

    /// Settings outside these ranges would leave no candidate (min-p above 1) or make every
    /// probability NaN (a NaN temperature, a zero penalty).
    pub fn check(&self) -> Result<()> {
        let bad =
            |name: &str, v: f32, range: &str| Err(Error::Invalid(format!("{name} {v} is out of range ({range})")));
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return bad("temperature", self.temperature, "0 or more");
        }
        if !(0.0..=1.0).contains(&self.top_p) {
            return bad("top-p", self.top_p, "0 to 1");
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad("min-p", self.min_p, "0 to 1");
        }
        if !(self.repeat_penalty > 0.0 && self.repeat_penalty.is_finite()) {
            return bad("repeat penalty", self.repeat_penalty, "more than 0");
        }
        if !self.frequency_penalty.is_finite() {
            return bad("frequency penalty", self.frequency_penalty, "a finite number");
        }
        if !self.presence_penalty.is_finite() {
            return bad("presence penalty", self.presence_penalty, "a finite number");
        }
        if let Some(&(_, b)) = self.logit_bias.iter().find(|(_, b)| b.is_nan() || *b == f32::INFINITY) {
            return bad("logit bias", b, "a number or -infinity");
        }
        Ok(())
    }
}

/// A seed for a run that was given none: the clock's nanoseconds (what `bitnet run` prints with its statistics).
pub fn clock_seed() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

/// SplitMix64: tiny, fast, and the same sequence on every platform.
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1) with 53 random bits.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

pub struct Sampler {
    pub params: SamplerParams,
    rng: SplitMix64,
    /// Scratch: (token id, logit) of the candidates still in play.
    candidates: Vec<(u32, f32)>,
}

impl Sampler {
    pub fn new(params: SamplerParams) -> Self {
        let rng = SplitMix64::new(params.seed);
        Self { params, rng, candidates: Vec::new() }
    }

    /// Whether the pick is the plain argmax of the logits and nothing else needs them, so that a GPU backend
    /// can take it on its device ([`crate::backend::Want::Greedy`]).
    pub fn is_plain_greedy(&self) -> bool {
        let p = &self.params;
        p.temperature <= 0.0 && !p.penalizes() && p.logit_bias.is_empty() && !p.ignore_eos && p.n_probs.is_none()
    }

    /// Picks the next token. `history` is every token so far (prompt included), for the penalty.
    /// An error when the logits are broken ([`check_logits`]) or the settings out of range.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> Result<u32> {
        check_logits(logits)?;
        self.params.check()?;
        let p = &self.params;
        self.candidates.clear();
        if p.temperature > 0.0 && p.top_k > 0 && p.logit_bias.is_empty() && !p.penalizes() {
            // Nothing changes the logits before top-k: take its candidates straight from them.
            top_k_of(logits, p.top_k, &mut self.candidates);
            return self.truncate_and_draw();
        }
        self.candidates.extend(logits.iter().enumerate().map(|(i, &l)| (i as u32, l)));
        for &(token, bias) in &p.logit_bias {
            if let Some(c) = self.candidates.get_mut(token as usize) {
                c.1 += bias;
            }
        }
        if p.penalizes() {
            let recent = &history[history.len().saturating_sub(p.repeat_last_n)..];
            penalize(&mut self.candidates, recent, p);
        }
        if p.temperature <= 0.0 {
            return Ok(argmax(self.candidates.iter().map(|c| c.1))); // still every token, in id order
        }
        if p.top_k > 0 && p.top_k < self.candidates.len() {
            top_k(&mut self.candidates, p.top_k);
        }
        self.truncate_and_draw()
    }

    /// Top-p and min-p over the candidates, then the draw.
    fn truncate_and_draw(&mut self) -> Result<u32> {
        let p = &self.params;
        if p.top_p < 1.0 {
            top_p(&mut self.candidates, p.top_p);
        }
        if p.min_p > 0.0 {
            min_p(&mut self.candidates, p.min_p);
        }
        let u = self.rng.uniform();
        draw(&self.candidates, p.temperature, u)
            .ok_or_else(|| Error::Invalid("no token is possible: every logit is -infinity".into()))
    }
}

/// A picked token's log-probability and the `n` most likely tokens', most likely first (ties: lower id first).
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprob {
    pub token: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// The log-probabilities of the model's distribution (the softmax of the raw logits, before bias, penalties
/// and truncation, as llama-server reports them by default) for `token` and the `n` most likely tokens.
pub fn token_logprobs(logits: &[f32], token: u32, n: usize) -> TokenLogprob {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &l| m.max(l)) as f64;
    let log_sum = max + logits.iter().map(|&l| (l as f64 - max).exp()).sum::<f64>().ln();
    let logprob = |id: u32| logits.get(id as usize).map_or(f32::NEG_INFINITY, |&l| (l as f64 - log_sum) as f32);
    let mut order: Vec<u32> = (0..logits.len() as u32).collect();
    let by_logit = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]).then(a.cmp(b));
    let n = n.min(order.len());
    if n > 0 && n < order.len() {
        order.select_nth_unstable_by(n - 1, by_logit);
    }
    order.truncate(n);
    order.sort_by(by_logit);
    TokenLogprob { token, logprob: logprob(token), top: order.into_iter().map(|id| (id, logprob(id))).collect() }
}

/// llama.cpp's penalties sampler: for each distinct recent token, the repetition penalty (divide a
/// positive logit, multiply a negative one), then `count · frequency + presence` subtracted.
fn penalize(c: &mut [(u32, f32)], recent: &[u32], p: &SamplerParams) {
    let mut sorted = recent.to_vec();
    sorted.sort_unstable();
    for run in sorted.chunk_by(|a, b| a == b) {
        if let Some((_, l)) = c.get_mut(run[0] as usize) {
            *l = if *l > 0.0 { *l / p.repeat_penalty } else { *l * p.repeat_penalty };
            *l -= run.len() as f32 * p.frequency_penalty + p.presence_penalty;
        }
    }
}

/// Keeps the k largest logits (all of those tied with the k-th), in id order.
fn top_k(c: &mut Vec<(u32, f32)>, k: usize) {
    let kth = kth_largest(c, k);
    c.retain(|x| x.1 >= kth);
}

/// The candidates `top_k` keeps from every token (the logits at least the k-th largest, in id order), in one
/// pass over the logits that keeps only those above a rising floor: the k-th largest of what it has kept so
/// far, which never exceeds the final k-th largest. (Candidates for all of Llama 3's 128k tokens, as `top_k`
/// takes them, cost a serving step more than its sampling.)
fn top_k_of(logits: &[f32], k: usize, out: &mut Vec<(u32, f32)>) {
    let prune_at = 2 * k + 64;
    let mut floor = f32::NEG_INFINITY;
    // Most blocks of 64 have no logit above the floor: their maximum says so.
    for (b, block) in logits.chunks(64).enumerate() {
        if block_max(block) < floor {
            continue;
        }
        for (i, &l) in block.iter().enumerate() {
            if l >= floor {
                out.push(((b * 64 + i) as u32, l));
                if out.len() >= prune_at {
                    floor = kth_largest(out, k);
                    out.retain(|x| x.1 >= floor);
                }
            }
        }
    }
    if k < out.len() {
        let kth = kth_largest(out, k);
        out.retain(|x| x.1 >= kth);
    }
}

/// The largest of `x` (no NaN), in 8 independent lanes that the compiler turns into vector maxima.
fn block_max(x: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let chunks = x.chunks_exact(8);
    let rest = chunks.remainder().iter().fold(f32::NEG_INFINITY, |m, &l| m.max(l));
    for c in chunks {
        lanes.iter_mut().zip(c).for_each(|(m, &l)| *m = if l > *m { l } else { *m });
    }
    lanes.into_iter().fold(rest, f32::max)
}

/// The k-th largest logit among the candidates (k ≤ their number).
fn kth_largest(c: &[(u32, f32)], k: usize) -> f32 {
    let mut logits: Vec<f32> = c.iter().map(|x| x.1).collect();
    *logits.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a)).1
}

/// Softmax probabilities of the candidates (at temperature 1, as llama.cpp's truncation uses), in f64.
fn probs(c: &[(u32, f32)]) -> Vec<f64> {
    let max = c.iter().fold(f32::NEG_INFINITY, |m, x| m.max(x.1)) as f64;
    let e: Vec<f64> = c.iter().map(|x| (x.1 as f64 - max).exp()).collect();
    let sum: f64 = e.iter().sum();
    e.into_iter().map(|v| v / sum).collect()
}

/// Keeps the smallest set of most likely tokens whose probability reaches `p`.
fn top_p(c: &mut Vec<(u32, f32)>, p: f32) {
    let pr = probs(c);
    let mut order: Vec<usize> = (0..c.len()).collect();
    order.sort_by(|&a, &b| pr[b].total_cmp(&pr[a]).then(a.cmp(&b)));
    let mut keep = vec![false; c.len()];
    let mut cum = 0.0;
    for &i in &order {
        keep[i] = true;
        cum += pr[i];
        if cum >= p as f64 {
            break;
        }
    }
    let mut it = keep.iter();
    c.retain(|_| *it.next().unwrap());
}

/// Keeps tokens at least `m` times as likely as the most likely one.
fn min_p(c: &mut Vec<(u32, f32)>, m: f32) {
    let max = c.iter().fold(f32::NEG_INFINITY, |a, x| a.max(x.1));
    // p_i / p_max = exp(l_i - l_max) >= m
    let floor = max + m.ln();
    c.retain(|x| x.1 >= floor);
}

/// Inverse-CDF draw over softmax(logits / temperature), candidates in id order; None when no candidate
/// has a finite logit.
fn draw(c: &[(u32, f32)], temperature: f32, u: f64) -> Option<u32> {
    let t = temperature as f64;
    let max = c.iter().fold(f32::NEG_INFINITY, |m, x| m.max(x.1)) as f64;
    if !max.is_finite() {
        return None;
    }
    let e: Vec<f64> = c.iter().map(|x| ((x.1 as f64 - max) / t).exp()).collect();
    let total: f64 = e.iter().sum();
    let target = u * total;
    let mut cum = 0.0;
    for (x, p) in c.iter().zip(&e) {
        cum += p;
        if cum > target {
            return Some(x.0);
        }
    }
    // Rounding left `target` at the very top: the last candidate with any probability.
    c.iter().zip(&e).rev().find(|(_, &p)| p > 0.0).map(|(x, _)| x.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix_matches_reference_sequence() {
        // First outputs of SplitMix64(1), as computed by smolbit's reference.py.
        let mut r = SplitMix64::new(1);
        assert_eq!(r.next_u64(), 0x910a2dec89025cc1);
        assert_eq!(r.next_u64(), 0xbeeb8da1658eec67);
    }

    #[test]
    fn greedy_is_argmax_with_low_id_ties() {
        let mut s = Sampler::new(SamplerParams::greedy());
        assert_eq!(s.sample(&[0.5, 2.0, -1.0, 2.0], &[]).unwrap(), 1);
    }

    #[test]
    fn same_seed_same_tokens_and_distribution_follows_probabilities() {
        let logits = [0.0f32, (3f32).ln(), f32::NEG_INFINITY];
        let params =
            SamplerParams { temperature: 1.0, top_k: 0, top_p: 1.0, min_p: 0.0, seed: 7, ..Default::default() };
        let run = |p: SamplerParams| {
            let mut s = Sampler::new(p);
            (0..4000).map(|_| s.sample(&logits, &[]).unwrap()).collect::<Vec<_>>()
        };
        let a = run(params.clone());
        assert_eq!(a, run(params));
        let ones = a.iter().filter(|&&t| t == 1).count() as f64 / a.len() as f64;
        assert!((ones - 0.75).abs() < 0.03, "P(token 1) = {ones}, expected 0.75");
        assert!(!a.contains(&2));
    }

    #[test]
    fn truncations_keep_the_right_sets() {
        let c: Vec<(u32, f32)> = [1.0f32, 4.0, 3.0, 2.0].iter().enumerate().map(|(i, &l)| (i as u32, l)).collect();
        let mut k = c.clone();
        top_k(&mut k, 2);
        assert_eq!(k.iter().map(|x| x.0).collect::<Vec<_>>(), vec![1, 2]);
        let mut p = c.clone();
        top_p(&mut p, 0.5); // p(4.0) = 0.64 alone reaches 0.5
        assert_eq!(p.iter().map(|x| x.0).collect::<Vec<_>>(), vec![1]);
        let mut m = c.clone();
        min_p(&mut m, 0.3); // exp(-1) = 0.37 passes, exp(-2) = 0.14 does not
        assert_eq!(m.iter().map(|x| x.0).collect::<Vec<_>>(), vec![1, 2]);
    }

    /// The one-pass top-k keeps what top-k over every token keeps, ties at the k-th and -infinity included.
    #[test]
    fn top_k_from_the_logits_equals_top_k_of_every_token() {
        let mut r = SplitMix64::new(3);
        for (n, k, levels) in [(5000, 40, 0), (5000, 40, 50), (3000, 1, 7), (100, 99, 0), (2000, 500, 20), (10, 40, 3)]
        {
            let logits: Vec<f32> = (0..n)
                .map(|_| {
                    let u = r.uniform() as f32;
                    match levels {
                        0 => 20.0 * u - 10.0,                                                     // distinct values
                        l => (u * l as f32).floor() - if u < 0.05 { f32::INFINITY } else { 0.0 }, // ties, -inf
                    }
                })
                .collect();
            let mut all: Vec<(u32, f32)> = logits.iter().enumerate().map(|(i, &l)| (i as u32, l)).collect();
            if k < all.len() {
                top_k(&mut all, k);
            }
            let mut fast = Vec::new();
            top_k_of(&logits, k, &mut fast);
            assert_eq!(fast, all, "n {n}, k {k}, levels {levels}");
            assert!(fast.len() >= k.min(n), "n {n}, k {k}: {} kept", fast.len());
        }
    }

    #[test]
    fn penalties_follow_llama_cpp() {
        let mut c = vec![(0, 2.0), (1, -1.0), (2, 3.0)];
        let p =
            SamplerParams { repeat_penalty: 2.0, frequency_penalty: 0.5, presence_penalty: 0.25, ..Default::default() };
        penalize(&mut c, &[0, 0, 1], &p);
        // token 0: 2/2 - 2·0.5 - 0.25; token 1: -1·2 - 0.5 - 0.25; token 2 untouched
        assert_eq!(c, vec![(0, -0.25), (1, -2.75), (2, 3.0)]);
    }

    #[test]
    fn repetition_penalty_lowers_seen_tokens() {
        let mut s = Sampler::new(SamplerParams { repeat_penalty: 2.0, ..SamplerParams::greedy() });
        // Token 0 wins without the penalty; with it, 2.0 / 2 = 1.0 < 1.5.
        assert_eq!(s.sample(&[2.0, 1.5], &[0]).unwrap(), 1);
    }

    #[test]
    fn logit_bias_forces_and_bans() {
        let logits = [1.0, 3.0, 2.0];
        let biased = |bias: Vec<(u32, f32)>| SamplerParams { logit_bias: bias, ..SamplerParams::greedy() };
        assert_eq!(Sampler::new(biased(vec![])).sample(&logits, &[]).unwrap(), 1);
        assert_eq!(Sampler::new(biased(vec![(1, f32::NEG_INFINITY)])).sample(&logits, &[]).unwrap(), 2);
        assert_eq!(Sampler::new(biased(vec![(0, 2.5)])).sample(&logits, &[]).unwrap(), 0);
        let sampled = |bias| SamplerParams { logit_bias: bias, seed: 3, ..Default::default() };
        let mut s = Sampler::new(sampled(vec![(1, -100.0), (2, -100.0)]));
        assert!((0..200).all(|_| s.sample(&logits, &[]).unwrap() == 0));
        assert!(Sampler::new(biased(vec![])).is_plain_greedy());
        assert!(!Sampler::new(biased(vec![(0, 1.0)])).is_plain_greedy());
        assert!(Sampler::new(biased(vec![(0, f32::NAN)])).sample(&logits, &[]).is_err());
    }

    #[test]
    fn logprobs_are_the_log_softmax_in_order() {
        let logits = [0.0f32, 2.0, 1.0, 2.0];
        let z: f64 = logits.iter().map(|&l| (l as f64).exp()).sum();
        let lp = |l: f32| ((l as f64).exp() / z).ln() as f32;
        let r = token_logprobs(&logits, 2, 3);
        assert_eq!(r.token, 2);
        assert!((r.logprob - lp(1.0)).abs() < 1e-6);
        // Most likely first, the tie between 1 and 3 broken by id.
        assert_eq!(r.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 3, 2]);
        assert!((r.top[0].1 - lp(2.0)).abs() < 1e-6);
        assert!(token_logprobs(&logits, 0, 0).top.is_empty());
        assert_eq!(token_logprobs(&logits, 0, 10).top.len(), 4);
    }

    /// NaN logits (a model with a NaN weight) made the truncations keep nothing and the draw index an
    /// empty list; they are an error, for the greedy pick too.
    #[test]
    fn broken_logits_are_an_error_not_a_panic() {
        let sampled = SamplerParams { seed: 1, ..Default::default() };
        for params in
            [sampled.clone(), SamplerParams::greedy(), SamplerParams { top_k: 0, min_p: 0.0, ..sampled.clone() }]
        {
            for logits in [vec![f32::NAN; 8], vec![1.0, f32::NAN, 0.5], vec![0.0, f32::INFINITY], vec![]] {
                let err = Sampler::new(params.clone()).sample(&logits, &[]).unwrap_err();
                assert!(err.to_string().contains("logit"), "{logits:?}: {err}");
            }
        }
        let none_possible = Sampler::new(SamplerParams::default()).sample(&[f32::NEG_INFINITY; 4], &[]);
        assert!(none_possible.unwrap_err().to_string().contains("no token"));
        // Settings that would leave no candidate are refused too.
        for bad in [
            SamplerParams { min_p: 2.0, ..sampled.clone() },
            SamplerParams { temperature: f32::NAN, ..sampled.clone() },
        ] {
            assert!(Sampler::new(bad).sample(&[1.0, 2.0], &[]).is_err());
        }
    }
}
