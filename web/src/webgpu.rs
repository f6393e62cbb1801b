//! The WebGPU backend: the engine's wgpu context ([`Wgpu`]), awaited token by token.
//!
//! The engine's `Session` cannot hold it: its `Backend` trait is synchronous, and a browser can only await a
//! readback; it is also `Send`, which wgpu's browser objects are not. So [`GpuSession`] keeps the session's
//! bookkeeping itself: which tokens the KV cache holds, so that a prompt sharing a prefix with them (the
//! next turn of a chat) evaluates only the rest.

use std::sync::Arc;

use bitnet_engine::backend::wgpu::{Gpu, GpuModel, Wgpu};
use bitnet_engine::backend::KvType;
use bitnet_engine::generate::reusable_prefix;
use bitnet_engine::model::Model;
use bitnet_engine::{Error, Result};

pub struct GpuSession {
    dev: Wgpu,
    name: String,
    ctx: usize,
    /// The tokens whose keys and values are in the cache, in order.
    tokens: Vec<u32>,
}

impl GpuSession {
    /// Opens the browser's WebGPU adapter (a software one such as SwiftShader too: WebGPU was asked for by
    /// name; the worker's `auto` skips those), uploads the weights and creates a context of `ctx` tokens.
    pub async fn open(model: &Model, ctx: usize, kv: KvType) -> Result<Self> {
        let gpu =
            Gpu::open_async(true).await?.ok_or_else(|| Error::Gpu("the browser found no WebGPU adapter".into()))?;
        let name = gpu.backend_name();
        // The engine shares these by `Arc` (natively across threads); in a browser they stay on this one.
        #[allow(clippy::arc_with_non_send_sync)]
        let uploaded = Arc::new(GpuModel::upload(Arc::new(gpu), model)?.with_kv(kv)?);
        Ok(GpuSession { dev: Wgpu::with_model(uploaded, ctx)?, name, ctx, tokens: Vec::new() })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn ctx(&self) -> usize {
        self.ctx
    }

    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// The logits of the last token evaluated.
    pub fn logits(&self) -> &[f32] {
        self.dev.logits()
    }

    /// Forgets the cache from position `len` on.
    pub fn truncate(&mut self, len: usize) {
        self.tokens.truncate(len);
    }

    /// Appends tokens and reads back the logits of the last one.
    pub async fn push(&mut self, tokens: &[u32]) -> Result<()> {
        self.dev.forward_async(tokens, self.tokens.len()).await?;
        self.tokens.extend_from_slice(tokens);
        Ok(())
    }

    /// `Session::prefill`: makes the cache hold exactly `tokens`, evaluating only what differs from what is
    /// cached (the last token always, for its logits). Returns how many tokens were evaluated.
    pub async fn prefill(&mut self, tokens: &[u32]) -> Result<usize> {
        if tokens.is_empty() {
            return Err(Error::Invalid("empty prompt".into()));
        }
        let keep = reusable_prefix(&self.tokens, tokens);
        self.truncate(keep);
        self.push(&tokens[keep..]).await?;
        Ok(tokens.len() - keep)
    }
}
