//! Perplexity of a text, as llama-perplexity computes it (`bitnet perplexity`, Python's `Model.perplexity`).

use super::Session;
use crate::backend::Want;
use crate::text::tokenizer::Tokenizer;
use crate::{Error, Result};

/// The scores so far: `nll` is the summed negative log-likelihood (natural log) of `scored` tokens.
#[derive(Clone, Debug, PartialEq)]
pub struct Perplexity {
    pub windows: usize,
    pub ctx: usize,
    pub scored: usize,
    pub nll: f64,
}

impl Perplexity {
    pub fn ppl(&self) -> f64 {
        (self.nll / self.scored as f64).exp()
    }
}

/// llama-perplexity's method: the text is cut into non-overlapping windows of the session's context,
/// each evaluated from an empty cache (its first token replaced by BOS when the model adds one), and only
/// the second half of each window is scored, so every scored token has at least ctx/2 of context.
/// `on_window` sees the running score after each window and returns false to stop there.
pub fn perplexity(
    session: &mut Session,
    tok: &Tokenizer,
    text: &str,
    on_window: &mut dyn FnMut(&Perplexity) -> bool,
) -> Result<Perplexity> {
    let add_bos = tok.add_bos();
    let tokens = tok.encode(text, add_bos)?;
    let n_ctx = session.ctx();
    // Positions ctx/2 to ctx - 2 are scored (each predicts the next): none below 3.
    if n_ctx < 3 {
        return Err(Error::Invalid(format!("perplexity needs a context of at least 3 tokens (--ctx {n_ctx})")));
    }
    let n_chunks = tokens.len() / n_ctx;
    if n_chunks == 0 {
        return Err(Error::Invalid(format!(
            "the text has {} tokens; at least one window of {n_ctx} is needed (lower --ctx)",
            tokens.len()
        )));
    }
    let first = n_ctx / 2;
    let mut score = Perplexity { windows: 0, ctx: n_ctx, scored: 0, nll: 0.0 };
    for chunk in tokens.chunks_exact(n_ctx) {
        let mut window = chunk.to_vec();
        if let Some(bos) = tok.bos().filter(|_| add_bos) {
            window[0] = bos;
        }
        session.truncate(0);
        for (j, &t) in window.iter().enumerate() {
            let scored = j >= first && j + 1 < n_ctx;
            session.push(&[t], if scored { Want::Logits } else { Want::Nothing })?;
            if scored {
                let next = window[j + 1];
                // A file whose tokenizer has more tokens than the model has logits.
                let logp = log_softmax_at(session.logits(), next as usize).ok_or_else(|| {
                    Error::Invalid(format!("token {next} has no logit (the model's vocabulary is smaller)"))
                })?;
                score.nll -= logp;
                score.scored += 1;
            }
        }
        if !score.nll.is_finite() {
            return Err(Error::Invalid(format!("the model computed non-finite logits (log-likelihood {})", score.nll)));
        }
        score.windows += 1;
        if !on_window(&score) {
            break;
        }
    }
    Ok(score)
}

/// log softmax(logits)[i], in f64; None when there is no logit `i`.
pub fn log_softmax_at(logits: &[f32], i: usize) -> Option<f64> {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
    let sum: f64 = logits.iter().map(|&v| (v as f64 - max).exp()).sum();
    Some(*logits.get(i)? as f64 - max - sum.ln())
}
