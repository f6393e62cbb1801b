//! `--backend cpu|wgpu|auto`: where a model runs, and `bitnet info --devices`.

use bitnet_engine::backend::{Backend, Cpu};
use bitnet_engine::kernels;
use bitnet_engine::model::Model;
use bitnet_engine::Error;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendChoice {
    /// The CPU, with the fastest kernels it supports.
    Cpu,
    /// The best GPU adapter through wgpu (Vulkan, Metal, DX12), a CPU-type one such as llvmpipe included.
    Wgpu,
    /// An NVIDIA GPU through CUDA (the `cuda` feature; needs the driver and NVRTC).
    Cuda,
    /// A real GPU if there is one (CUDA first), else the CPU.
    Auto,
}

/// The backend a model runs on: what `--backend` chose, with the weights uploaded to the GPU once and
/// shared by every session (`bitnet serve` opens one per slot).
pub struct Devices {
    choice: BackendChoice,
    #[cfg(feature = "wgpu")]
    gpu: std::sync::Mutex<Option<Option<std::sync::Arc<bitnet_engine::wgpu::GpuModel>>>>,
}

impl Devices {
    pub fn new(choice: BackendChoice) -> Self {
        Self {
            choice,
            #[cfg(feature = "wgpu")]
            gpu: Default::default(),
        }
    }

    /// A backend for one session of `ctx` tokens.
    pub fn backend<'m>(&self, model: &'m Model, ctx: usize) -> Result<Box<dyn Backend + 'm>, Error> {
        #[cfg(feature = "cuda")]
        if self.choice == BackendChoice::Cuda
            || (self.choice == BackendChoice::Auto && bitnet_engine::cuda::available())
        {
            return Ok(Box::new(bitnet_engine::cuda::Cuda::new(model, ctx)?));
        }
        #[cfg(not(feature = "cuda"))]
        if self.choice == BackendChoice::Cuda {
            return Err(Error::Unsupported("this bitnet was built without the `cuda` feature".into()));
        }
        #[cfg(feature = "wgpu")]
        if let Some(m) = self.gpu_model(model)? {
            return Ok(Box::new(bitnet_engine::wgpu::Wgpu::with_model(m, ctx)?));
        }
        #[cfg(not(feature = "wgpu"))]
        if self.choice == BackendChoice::Wgpu {
            return Err(Error::Unsupported("this bitnet was built without the `wgpu` feature".into()));
        }
        Ok(Box::new(Cpu::new(model, kernels::best(), ctx)?))
    }

    /// The model on the GPU, uploaded on first use; `None` when it runs on the CPU.
    #[cfg(feature = "wgpu")]
    fn gpu_model(&self, model: &Model) -> Result<Option<std::sync::Arc<bitnet_engine::wgpu::GpuModel>>, Error> {
        use bitnet_engine::wgpu::{Gpu, GpuModel};
        use std::sync::Arc;
        let mut slot = self.gpu.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            let gpu = match self.choice {
                BackendChoice::Cpu => None,
                choice => Gpu::open(choice == BackendChoice::Wgpu)?,
            };
            if gpu.is_none() && self.choice == BackendChoice::Wgpu {
                return Err(Error::Gpu("no adapter found (for llvmpipe: apt-get install mesa-vulkan-drivers)".into()));
            }
            *slot = Some(gpu.map(|g| GpuModel::upload(Arc::new(g), model).map(Arc::new)).transpose()?);
        }
        Ok(slot.clone().flatten())
    }
}

/// Mesa's Vulkan device-select layer looks for a display server when the GPUs are listed and, on a
/// headless machine, prints "error: XDG_RUNTIME_DIR is invalid..." to stderr on every run. With no
/// display there is nothing for it to select by, so it is turned off (its documented switch). Called
/// first thing in `main`, before any other thread exists.
pub fn quiet_headless_vulkan() {
    let no_display = std::env::var_os("WAYLAND_DISPLAY").is_none() && std::env::var_os("DISPLAY").is_none();
    if no_display && std::env::var_os("NODEVICE_SELECT").is_none() {
        std::env::set_var("NODEVICE_SELECT", "1");
    }
}

/// `bitnet info --devices`: every adapter wgpu finds, in the order `--backend wgpu` prefers them.
pub fn list() -> Result<(), Error> {
    #[cfg(feature = "wgpu")]
    {
        let all = bitnet_engine::wgpu::adapters();
        if all.is_empty() {
            println!("no wgpu adapters (for llvmpipe: apt-get install mesa-vulkan-drivers)");
        }
        for (i, a) in all.iter().enumerate() {
            let auto = if a.is_cpu { "" } else { " (usable by --backend auto)" };
            println!("{i}: {} | {} | {} | {}{auto}", a.name, a.kind, a.backend, a.driver);
        }
    }
    #[cfg(not(feature = "wgpu"))]
    println!("this bitnet was built without the `wgpu` feature: CPU only");
    println!(
        "cpu: {} kernels, {} threads",
        kernels::best().name(),
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    Ok(())
}
