//! Getting a GGUF file into wasm memory without surprises.
//!
//! Loading costs about twice the file's size at its peak: the file is copied into wasm memory, then
//! `Model::load` copies every tensor into the engine's layout (the file's copy is freed afterwards).
//! A wasm32 module addresses at most 4 GiB, and a browser may refuse to grow memory well before that,
//! so both are checked before any big copy and reported as errors rather than as a crash.

use std::fmt;

use bitnet_engine::backend::KvType;
use bitnet_engine::model::Config;

/// The most memory a wasm32 module can address.
pub const WASM32_LIMIT: u64 = 4 << 30;

const MB: u64 = 1 << 20;

/// Bytes of wasm memory already taken (the linear memory's size; the allocator may hold some free).
pub fn memory_in_use() -> u64 {
    #[cfg(target_arch = "wasm32")]
    return core::arch::wasm32::memory_size::<0>() as u64 * 65536;
    #[cfg(not(target_arch = "wasm32"))]
    0
}

#[derive(Debug)]
pub struct MemoryError(String);

impl fmt::Display for MemoryError {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Refuses a file whose loading cannot fit in wasm32's 4 GiB.
pub fn check_file_size(size: u64) -> Result<(), MemoryError> {
    let needed = size.saturating_mul(2);
    if memory_in_use() + needed <= WASM32_LIMIT {
        return Ok(());
    }
    Err(MemoryError(format!(
        "the model file is {} MB: loading it needs about {} MB of WebAssembly memory (the file is copied in, then \
         its weights are copied into the engine's layout), more than the {} MB a wasm32 module can address. \
         Use a smaller model, or the native `bitnet` command",
        size.div_ceil(MB),
        needed.div_ceil(MB),
        WASM32_LIMIT / MB
    )))
}

/// Refuses a context whose KV cache cannot fit next to the weights.
pub fn check_kv_cache(c: &Config, ctx: usize, kv_type: KvType, weights: u64) -> Result<(), MemoryError> {
    let kv = (kv_type.bytes_per_token(c) * ctx) as u64;
    if memory_in_use() + weights + kv <= WASM32_LIMIT {
        return Ok(());
    }
    Err(MemoryError(format!(
        "a context of {ctx} tokens needs a {} MB KV cache, which does not fit in wasm32's {} MB next to the \
         model's {} MB of weights: ask for a smaller context (option ctx)",
        kv.div_ceil(MB),
        WASM32_LIMIT / MB,
        weights.div_ceil(MB)
    )))
}

/// A GGUF file arriving in chunks (a download, a cached response, a user's file).
pub struct FileBuffer {
    pub bytes: Vec<u8>,
}

impl FileBuffer {
    /// `size` is the file's length when known (Content-Length, File.size), else 0.
    pub fn new(size: u64) -> Result<Self, MemoryError> {
        check_file_size(size)?;
        let mut bytes = Vec::new();
        reserve(&mut bytes, size)?;
        Ok(FileBuffer { bytes })
    }

    pub fn push(&mut self, chunk: &[u8]) -> Result<(), MemoryError> {
        if self.bytes.capacity() - self.bytes.len() < chunk.len() {
            // Only when the size was not known up front (or was wrong).
            check_file_size(self.bytes.len() as u64 + chunk.len() as u64)?;
            reserve(&mut self.bytes, chunk.len() as u64)?;
        }
        self.bytes.extend_from_slice(chunk);
        Ok(())
    }
}

/// Grows `v` by `extra` bytes, reporting a browser's refusal instead of aborting.
fn reserve(v: &mut Vec<u8>, extra: u64) -> Result<(), MemoryError> {
    let extra =
        usize::try_from(extra).map_err(|_| MemoryError(format!("{extra} bytes do not fit in wasm32 memory")))?;
    v.try_reserve(extra).map_err(|_| {
        MemoryError(format!(
            "the browser refused to grow WebAssembly memory to {} MB for the model file (the device may be short \
             of memory; loading needs about twice the file's size)",
            (memory_in_use() + extra as u64).div_ceil(MB)
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_too_big_for_wasm32_are_refused_with_the_sizes() {
        let e = FileBuffer::new(3 << 30).err().expect("a 3 GiB file cannot load in 4 GiB");
        assert!(e.0.contains("3072 MB") && e.0.contains("6144 MB") && e.0.contains("4096 MB"), "{e}");
        assert!(check_file_size(1 << 30).is_ok());
    }

    #[test]
    fn chunks_add_up_whether_or_not_the_size_was_known() {
        for size in [0, 10] {
            let mut f = FileBuffer::new(size).unwrap();
            for chunk in [&b"GGUF"[..], b"", b"123456"] {
                f.push(chunk).unwrap();
            }
            assert_eq!(f.bytes, b"GGUF123456");
        }
    }
}
