//! bitnet-engine: one portable engine for BitNet b1.58 (ternary-weight) language models.
//!
//! The pieces, in the order a token flows through them:
//! - [`gguf`]: parse (and write) GGUF files from a byte slice; every count, offset and size is checked.
//! - [`quant`]: the ggml tensor types (F32, F16, BF16, Q8_0, Q5_0, Q4_0, Q6_K, Q4_K, TQ1_0, TQ2_0, I2_S).
//! - [`ternary`]: ternary weight matrices in the engine's own 2-bit layout, decoded from any storage type.
//! - [`backend`]: where the forward pass runs ([`backend::Backend`]: CPU now, GPUs alike).
//! - [`kernels`]: the CPU's hot loops, one implementation per target behind the [`kernels::Kernels`] trait;
//!   the scalar one is the reference every other is tested against.
//! - [`model`]: the BitNet b1.58 2B4T transformer as plain structs and one forward pass.
//! - [`tokenizer`] and [`chat`]: text to token ids and back, chat templates.
//! - [`sampling`] and [`session`]: choosing the next token, the KV cache, generation with stop rules.
//! - [`convert`]: Hugging Face BitNet checkpoints to GGUF.
//! - `wgpu` (cargo feature `wgpu`): the GPU backend, WGSL kernels for Vulkan, Metal, DX12 and WebGPU.
//! - `cuda` (cargo feature `cuda`): the CUDA backend, kernels in CUDA C compiled at run time by NVRTC.

pub mod backend;
pub mod chat;
pub mod convert;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod error;
pub mod gguf;
pub mod kernels;
pub mod model;
pub mod quant;
pub mod sampling;
pub mod session;
pub mod ternary;
pub mod tokenizer;
#[cfg(feature = "wgpu")]
pub mod wgpu;

pub use error::{Error, Result};
