//! Sentence embeddings of embedding models (Microsoft's BitNet embeddings, Qwen3-Embedding style): the text's
//! tokens (ending with EOS where the vocabulary says so), the final normed hidden state of the last token
//! (last-token pooling), scaled to unit length (L2).

use super::Session;
use crate::text::tokenizer::Tokenizer;
use crate::{Error, Result};

/// The unit-length embedding of `text`.
pub fn embed(session: &mut Session, tokenizer: &Tokenizer, text: &str) -> Result<Vec<f32>> {
    embed_tokens(session, &tokens(tokenizer, text)?)
}

/// The unit-length embedding of a text's tokens (as [`tokens`] gives them, or ids given by the caller);
/// the session's cache is cleared first.
pub fn embed_tokens(session: &mut Session, ids: &[u32]) -> Result<Vec<f32>> {
    session.truncate(0);
    session.prefill(ids)?;
    let hidden =
        session.hidden().ok_or_else(|| Error::Unsupported(format!("embeddings on {}", session.backend_name())))?;
    Ok(l2_normalized(hidden))
}

/// The tokens the embedding of `text` reads: BOS and EOS where the vocabulary adds them.
pub fn tokens(tokenizer: &Tokenizer, text: &str) -> Result<Vec<u32>> {
    let mut ids = tokenizer.encode(text, tokenizer.add_bos())?;
    if let Some(eos) = tokenizer.eos().filter(|_| tokenizer.add_eos()) {
        ids.push(eos);
    }
    if ids.is_empty() {
        return Err(Error::Invalid("empty text: nothing to embed".into()));
    }
    Ok(ids)
}

/// `v / |v|` (in f64 for the norm); a zero vector stays zero.
pub fn l2_normalized(v: &[f32]) -> Vec<f32> {
    let norm = v.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
    let scale = if norm > 0.0 { (1.0 / norm) as f32 } else { 0.0 };
    v.iter().map(|&x| x * scale).collect()
}
