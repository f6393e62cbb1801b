//! Weight matrices as the engine keeps them: ternary matrices in its own 2-bit layout (decoded from any
//! storage type), and matrices kept in their GGUF storage type (the embedding and the LM head; the
//! projections of models that are not ternary, such as Q1_0/Q2_0 Qwen3).

pub mod float;
pub mod ternary;

use float::FloatMatrix;
use ternary::TernaryMatrix;

/// A projection's weights, and so how it multiplies.
#[derive(Clone)]
pub enum Linear {
    /// BitNet b1.58's BitLinear: exact W1.58A8 (per-token int8 activations, one scale per tensor).
    Ternary(TernaryMatrix),
    /// Kept as the file stores it and multiplied as llama.cpp's CPU does: Q1_0, Q2_0 and Q8_0 against
    /// Q8_0 activations (`backend::cpu::kernels::blocks`), other types in float.
    Ggml(FloatMatrix),
}

impl Linear {
    pub fn rows(&self) -> usize {
        match self {
            Linear::Ternary(m) => m.rows,
            Linear::Ggml(m) => m.rows,
        }
    }

    pub fn ternary(&self) -> Option<&TernaryMatrix> {
        match self {
            Linear::Ternary(m) => Some(m),
            Linear::Ggml(_) => None,
        }
    }
}
