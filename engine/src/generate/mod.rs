//! Generation: one loop for every front end. [`Generation`] decides each next token and the text it
//! adds (sampling, stop strings, UTF-8-safe pieces, the finish reason) without running anything itself;
//! [`Session`] drives it over one sequence, the server's scheduler over many in batched steps, the
//! browser one awaited step at a time.

pub mod embed;
pub mod generation;
#[cfg(feature = "grammar")]
pub mod grammar;
pub mod perplexity;
pub mod sampler;
pub mod session;
pub mod stop;

pub use generation::{GenParams, Generation, Output, StopReason, TextStep};
pub use session::{GenStats, Session};

/// How many of `prompt`'s tokens a cache holding `cached` can keep: their common prefix, less the
/// prompt's last token, which is always evaluated again so that its logits are fresh. (The one prefix
/// rule of the session, the server's slots and the browser.)
pub fn reusable_prefix(cached: &[u32], prompt: &[u32]) -> usize {
    let common = cached.iter().zip(prompt).take_while(|(a, b)| a == b).count();
    common.min(prompt.len().saturating_sub(1))
}
