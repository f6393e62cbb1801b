//! Weight matrices as the engine keeps them: ternary matrices in its own 2-bit layout (decoded from any
//! storage type) and float matrices (the embedding and the LM head) in their storage type.

pub mod float;
pub mod ternary;
