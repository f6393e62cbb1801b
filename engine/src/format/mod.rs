//! File formats: GGUF (read and written) and the ggml tensor types stored in it.

pub mod gguf;
pub mod quant;
