//! bitnet-engine: one portable engine for BitNet b1.58 (ternary-weight) language models.
//!
//! The layers, each using only those above it in this list:
//! - [`format`]: GGUF files (a validating reader and a writer) and the ggml tensor types in them.
//! - [`tensor`]: weight matrices as the engine keeps them (ternary in its 2-bit layout; float).
//! - [`model`]: the BitNet b1.58 transformer's configuration and weights as plain structs.
//! - [`backend`]: where the forward pass runs, one seam for every device: the CPU (its kernels, the
//!   scalar one being the reference), and behind cargo features `wgpu` (WGSL for Vulkan, Metal, DX12
//!   and WebGPU) and `cuda` (CUDA C compiled at run time by NVRTC).
//! - [`text`]: text to token ids and back, chat templates.
//! - [`generate`]: choosing tokens and the one generation loop every front end drives.
//! - [`convert`]: Hugging Face BitNet checkpoints to GGUF.
//! - [`open`]: a model file ready to run (the embedded default, memory mapping), as native shells open one.
//! - [`info`]: a GGUF file described for people.

pub mod backend;
pub mod convert;
pub mod error;
pub mod format;
pub mod generate;
pub mod info;
pub mod model;
pub mod open;
pub mod tensor;
pub mod text;

pub use error::{Error, Result};
