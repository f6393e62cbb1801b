//! `--backend cpu|wgpu|cuda|auto` (the engine's device choice as a flag), and `bitnet info --devices`.

use bitnet_engine::backend::cpu::kernels;
use bitnet_engine::backend::DeviceChoice;
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

impl From<BackendChoice> for DeviceChoice {
    fn from(c: BackendChoice) -> Self {
        match c {
            BackendChoice::Cpu => DeviceChoice::Cpu,
            BackendChoice::Wgpu => DeviceChoice::Wgpu,
            BackendChoice::Cuda => DeviceChoice::Cuda,
            BackendChoice::Auto => DeviceChoice::Auto,
        }
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
        let all = bitnet_engine::backend::wgpu::adapters();
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
