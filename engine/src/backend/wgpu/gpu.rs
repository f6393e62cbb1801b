//! The device: choosing an adapter, creating buffers, compiling kernels, reading results back.

use std::sync::{Arc, Mutex};
use std::task::{Poll, Waker};

use wgpu::util::DeviceExt;

use crate::{Error, Result};

/// One adapter as `bitnet info --devices` lists it.
#[derive(Clone, Debug)]
pub struct AdapterDesc {
    pub name: String,
    pub backend: String,
    /// "discrete GPU", "integrated GPU", "virtual GPU", "CPU" or "other".
    pub kind: &'static str,
    pub driver: String,
    /// A software rasterizer such as llvmpipe or SwiftShader: used only when asked for.
    pub is_cpu: bool,
}

impl AdapterDesc {
    fn new(a: &wgpu::Adapter) -> Self {
        let info = a.get_info();
        let kind = match info.device_type {
            wgpu::DeviceType::DiscreteGpu => "discrete GPU",
            wgpu::DeviceType::IntegratedGpu => "integrated GPU",
            wgpu::DeviceType::VirtualGpu => "virtual GPU",
            wgpu::DeviceType::Cpu => "CPU",
            wgpu::DeviceType::Other => "other",
        };
        let driver = format!("{} {}", info.driver, info.driver_info).trim().to_string();
        // Browsers may keep the adapter's description to themselves (Chromium's SwiftShader does).
        let name = if info.name.is_empty() { format!("unnamed {kind} adapter") } else { info.name };
        Self {
            name,
            backend: info.backend.to_string(),
            kind,
            driver,
            is_cpu: info.device_type == wgpu::DeviceType::Cpu,
        }
    }

    /// Preference order: discrete, integrated, virtual, other, CPU.
    fn rank(&self) -> u8 {
        ["discrete GPU", "integrated GPU", "virtual GPU", "other", "CPU"]
            .iter()
            .position(|k| *k == self.kind)
            .unwrap_or(4) as u8
    }
}

fn instance() -> wgpu::Instance {
    // WGPU_BACKEND and friends still apply, for debugging.
    wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env())
}

/// Every adapter wgpu finds, best first.
pub async fn adapters_async() -> Vec<AdapterDesc> {
    let mut all: Vec<AdapterDesc> =
        instance().enumerate_adapters(wgpu::Backends::all()).await.iter().map(AdapterDesc::new).collect();
    all.sort_by_key(AdapterDesc::rank);
    all
}

#[cfg(not(target_arch = "wasm32"))]
pub fn adapters() -> Vec<AdapterDesc> {
    pollster::block_on(adapters_async())
}

/// A device and its queue, with what the kernels need to know about it.
pub struct Gpu {
    pub(crate) device: wgpu::Device,
    pub(crate) queue: wgpu::Queue,
    pub(crate) limits: wgpu::Limits,
    adapter: AdapterDesc,
    /// Whether WGSL's `dot4I8Packed` is there (else the kernels use a plain-WGSL version).
    pub(crate) dot4: bool,
    /// The first error the device reported since the last check (wgpu reports errors asynchronously).
    error: Arc<Mutex<Option<String>>>,
    /// A lower bound than the adapter's on the bytes of one binding (to test sharding on small models).
    binding_cap: u64,
    /// Positions per workgroup where a decode step's attention is split over the sequence.
    pub(crate) attn_chunk: usize,
}

impl Gpu {
    /// The best adapter (a real GPU first; a CPU-type adapter such as llvmpipe only when `allow_cpu`),
    /// or `None` when there is none.
    pub async fn open_async(allow_cpu: bool) -> Result<Option<Gpu>> {
        let inst = instance();
        let mut found: Vec<(AdapterDesc, wgpu::Adapter)> = inst
            .enumerate_adapters(wgpu::Backends::all())
            .await
            .into_iter()
            .map(|a| (AdapterDesc::new(&a), a))
            .filter(|(d, _)| allow_cpu || !d.is_cpu)
            .collect();
        found.sort_by_key(|(d, _)| d.rank());
        let Some((desc, adapter)) = found.into_iter().next() else { return Ok(None) };
        // Ask for everything the adapter allows: the 2B4T embedding alone is 657 MB.
        let limits = adapter.limits();
        let (device, queue) = adapter
            .request_device(&wgpu::DeviceDescriptor {
                label: Some("bitnet"),
                required_features: wgpu::Features::empty(),
                required_limits: limits.clone(),
                memory_hints: wgpu::MemoryHints::Performance,
                ..Default::default()
            })
            .await
            .map_err(|e| Error::Gpu(format!("{}: {e}", desc.name)))?;
        let error = Arc::new(Mutex::new(None));
        let sink = error.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            let mut slot = lock(&sink);
            slot.get_or_insert_with(|| e.to_string());
        }));
        let dot4 = inst.wgsl_language_features().contains(wgpu::WgslLanguageFeatures::Packed4x8IntegerDotProduct);
        let attn_chunk = super::kernels::ATTN_CHUNK;
        Ok(Some(Gpu { device, queue, limits, adapter: desc, dot4, error, binding_cap: u64::MAX, attn_chunk }))
    }

    #[cfg(not(target_arch = "wasm32"))]
    pub fn open(allow_cpu: bool) -> Result<Option<Gpu>> {
        pollster::block_on(Self::open_async(allow_cpu))
    }

    pub fn adapter(&self) -> &AdapterDesc {
        &self.adapter
    }

    /// The backend's name for logs and `bitnet bench`: "wgpu/<adapter> (<graphics API>)".
    pub fn backend_name(&self) -> String {
        format!("wgpu/{} ({})", self.adapter.name, self.adapter.backend)
    }

    /// Uses the plain-WGSL integer dot product even where `dot4I8Packed` exists (to test the fallback).
    pub fn without_dot4(mut self) -> Self {
        self.dot4 = false;
        self
    }

    /// Splits float matrices (the LM head, the embedding) into shards of at most `bytes` even where one
    /// binding could hold more: tests use it to exercise sharding on small models.
    pub fn with_max_shard(mut self, bytes: u64) -> Self {
        self.binding_cap = bytes;
        self
    }

    /// Splits a decode step's attention over the sequence in chunks of `positions` (from two chunks on)
    /// instead of [`ATTN_CHUNK`](super::kernels::ATTN_CHUNK): tests use it to cross chunk boundaries on
    /// short contexts.
    pub fn with_attention_chunk(mut self, positions: usize) -> Self {
        self.attn_chunk = positions.max(1);
        self
    }

    /// Turns an error the device reported since the last check into an `Err`.
    pub(crate) fn check(&self, what: &str) -> Result<()> {
        match lock(&self.error).take() {
            Some(e) => Err(Error::Gpu(format!("{what}: {e}"))),
            None => Ok(()),
        }
    }

    /// The largest storage binding, a multiple of 16 bytes.
    pub(crate) fn max_binding(&self) -> u64 {
        self.limits.max_storage_buffer_binding_size.min(self.limits.max_buffer_size) & !15
    }

    /// The most bytes one shard of a float matrix may take.
    pub(crate) fn max_shard(&self) -> u64 {
        self.max_binding().min(self.binding_cap) & !15
    }

    pub(crate) fn storage(&self, label: &str, bytes: &[u8]) -> wgpu::Buffer {
        // A binding cannot be empty, and the kernels read f32 arrays as whole vec4s: sizes are multiples
        // of 16, the padding zeros.
        let mut padded;
        let contents = if bytes.is_empty() || !bytes.len().is_multiple_of(16) {
            padded = bytes.to_vec();
            padded.resize(bytes.len().div_ceil(16).max(1) * 16, 0);
            &padded[..]
        } else {
            bytes
        };
        self.device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some(label),
            contents,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
        })
    }

    /// A zeroed storage buffer of `bytes` bytes (padded as [`Gpu::storage`] pads).
    pub(crate) fn zeros(&self, label: &str, bytes: u64) -> wgpu::Buffer {
        self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: bytes.max(16).next_multiple_of(16),
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        })
    }

    pub(crate) fn uniform<T: bytemuck::Pod>(&self, label: &str, value: &T) -> wgpu::Buffer {
        self.device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some(label),
            contents: bytemuck::bytes_of(value),
            usage: wgpu::BufferUsages::UNIFORM,
        })
    }

    /// A buffer the host can map to read `bytes` bytes copied into it.
    pub(crate) fn readback(&self, label: &str, bytes: u64) -> wgpu::Buffer {
        self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: bytes.max(4).next_multiple_of(4),
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        })
    }

    /// Waits for the submitted work and copies the first `out.len()` values of a readback buffer.
    #[cfg(not(target_arch = "wasm32"))]
    pub(crate) fn read<T: bytemuck::Pod>(&self, buf: &wgpu::Buffer, out: &mut [T]) -> Result<()> {
        pollster::block_on(self.read_async(buf, out))
    }

    /// [`Gpu::read`] for the browser, where nothing may block: the map completes from the event loop.
    pub(crate) async fn read_async<T: bytemuck::Pod>(&self, buf: &wgpu::Buffer, out: &mut [T]) -> Result<()> {
        let bytes = std::mem::size_of_val(out) as u64;
        let slice = buf.slice(..bytes);
        let mapped = Arc::new(Mutex::new(Mapped::default()));
        let callback = mapped.clone();
        slice.map_async(wgpu::MapMode::Read, move |r| {
            let mut m = lock(&callback);
            m.result = Some(r);
            if let Some(waker) = m.waker.take() {
                waker.wake();
            }
        });
        // Natively only a poll runs the device (and the callback); a browser runs both on its own.
        #[cfg(not(target_arch = "wasm32"))]
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| Error::Gpu(format!("waiting for the device: {e}")))?;
        let result = std::future::poll_fn(|cx| {
            let mut m = lock(&mapped);
            match m.result.take() {
                Some(r) => Poll::Ready(r),
                None => {
                    m.waker = Some(cx.waker().clone());
                    Poll::Pending
                }
            }
        })
        .await;
        self.check("running the kernels")?;
        result.map_err(|e| Error::Gpu(format!("reading back results: {e}")))?;
        {
            let view = slice.get_mapped_range().map_err(|e| Error::Gpu(format!("reading back results: {e}")))?;
            bytemuck::cast_slice_mut::<T, u8>(out).copy_from_slice(&view);
        }
        buf.unmap();
        Ok(())
    }
}

/// A buffer map's outcome, which wgpu hands to a callback (wgpu always calls it, with an error if the map
/// fails), and the task waiting for it.
#[derive(Default)]
struct Mapped {
    result: Option<std::result::Result<(), wgpu::BufferAsyncError>>,
    waker: Option<Waker>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
