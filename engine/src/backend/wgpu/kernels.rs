//! The compute pipelines (WGSL in `shaders/`), their parameter blocks and bind groups.
//!
//! Every bind group has the per-token step (token id, position) at binding 0, a uniform bound with a
//! dynamic offset into one buffer of [`TILE`] entries: the bind groups are created once per context,
//! and a prompt tile's tokens are told apart by the offset alone.

use super::gpu::Gpu;
use super::weights::Format;
use crate::{Error, Result};

/// Workgroup size of every kernel (the WebGPU minimum for `maxComputeInvocationsPerWorkgroup`).
pub(crate) const WG: u32 = 256;
/// Byte distance between step entries (the largest `minUniformBufferOffsetAlignment`).
pub(crate) const STEP_STRIDE: u64 = 256;
/// The longest rows (columns) of a BitLinear that `Kernel::ternary` without `long_rows` is tuned for.
pub(crate) const SHORT_ROW: usize = 4096;
/// Positions per workgroup of a decode step's attention split over the sequence (attention.wgsl): one per
/// thread in the scores' loop.
pub(crate) const ATTN_CHUNK: usize = WG as usize;

/// Prompt tokens per tile (tile.wgsl): each weight row is read once per tile. 32 tokens are one warp of
/// the GEMM's threads per row pair, and keep the tile's buffers small.
pub const TILE: usize = 32;

/// A token's entry in the step buffer. A prompt tile's kernels run at the first token's entry, which
/// holds the tile's first position and its number of tokens.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct Step {
    pub token: u32,
    pub pos: u32,
    /// The token's row in the tile's buffers (0 when decoding).
    pub row: u32,
    /// Tokens in the tile (1 when decoding).
    pub n: u32,
}

/// ternary.wgsl's `Params`.
#[repr(C)]
#[derive(Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct TernaryParams {
    pub rows: u32,
    pub k: u32,
    pub vpr: u32,
    pub mode: u32,
    pub seg1: u32,
    pub seg2: u32,
    pub act: u32,
    pub prenorm: u32,
    pub eps: f32,
    pub scale0: f32,
    pub scale1: f32,
    pub scale2: f32,
    pub x_stride: u32,
    pub out_stride: u32,
    /// 0: ternary (ternary.wgsl); a ggml block type (blocks.wgsl, `weights::TY_*`).
    pub ty: u32,
    /// blocks.wgsl: the vec4 where the weight blocks' scales start.
    pub d_off: u32,
    /// Where the output rows start in the output buffer.
    pub out_off: u32,
    pub _pad: [u32; 3],
}

pub(crate) const MODE_STORE: u32 = 0;
pub(crate) const MODE_ADD: u32 = 1;
pub(crate) const MODE_GATE_UP: u32 = 2;
/// `out = act(out)·y`: the up projection after the gate's, each on its own input (BitNet embedding models).
pub(crate) const MODE_ACT_MUL: u32 = 4;
/// The integer accumulators alone, for the test probes (probe.rs, native only).
#[cfg(all(feature = "probes", not(target_arch = "wasm32")))]
pub(crate) const MODE_RAW: u32 = 3;

/// float.wgsl's `Params`.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct FloatParams {
    pub rows: u32,
    pub row_offset: u32,
    pub vpr: u32,
    pub k: u32,
}

/// norm.wgsl's `Params`.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct NormParams {
    pub n: u32,
    pub eps: f32,
    /// head_norm: the query heads (k's follow), and the floats from one token's q, k, v to the next's.
    pub q_heads: u32,
    pub stride: u32,
}

/// attention.wgsl's `Params`.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct AttnParams {
    pub head_dim: u32,
    pub group: u32,
    pub q_dim: u32,
    pub kv_dim: u32,
    pub rope_half: u32,
    pub ctx: u32,
    pub scale: f32,
    pub qkv_stride: u32,
    pub out_stride: u32,
    pub cached: u32,
    pub chunk: u32,
    pub exact: u32,
}

/// What a binding after the step holds.
#[derive(Clone, Copy)]
pub(crate) enum Slot {
    Uniform,
    Read,
    Write,
}

/// A pipeline and the layout of its bind group.
pub(crate) struct Kernel {
    pub pipeline: wgpu::ComputePipeline,
    layout: wgpu::BindGroupLayout,
    slots: Vec<Slot>,
    /// Matrix rows one workgroup computes (matrix-vector kernels; 1 otherwise).
    pub rows_per_group: usize,
}

/// One recorded dispatch: a kernel, its resources, and its grid.
pub(crate) struct Dispatch {
    pub pipeline: wgpu::ComputePipeline,
    pub bind: wgpu::BindGroup,
    pub grid: (u32, u32),
}

impl Dispatch {
    pub fn record(&self, pass: &mut wgpu::ComputePass, step: usize) {
        pass.set_pipeline(&self.pipeline);
        pass.set_bind_group(0, &self.bind, &[(step as u64 * STEP_STRIDE) as u32]);
        pass.dispatch_workgroups(self.grid.0, self.grid.1, 1);
    }
}

/// Workgroups for `n` work items of `per_group` each, as a 2-D grid within the 65535-per-dimension limit
/// (the kernels flatten it back).
pub(crate) fn grid(n: usize, per_group: usize) -> (u32, u32) {
    let groups = n.div_ceil(per_group).max(1) as u32;
    let x = groups.min(65535);
    (x, groups.div_ceil(x))
}

/// The constants and helpers prepended to a shader.
fn header(gpu: &Gpu, consts: &[(&str, u32)]) -> String {
    let mut h = format!("const WG: u32 = {WG}u;\n");
    for (name, v) in consts {
        h += &format!("const {name}: u32 = {v}u;\n");
    }
    h += if gpu.dot4 {
        "fn dot4(a: u32, b: u32) -> i32 { return dot4I8Packed(a, b); }\n"
    } else {
        "fn dot4(a: u32, b: u32) -> i32 {
            let x = bitcast<i32>(a);
            let y = bitcast<i32>(b);
            return extractBits(x, 0u, 8u) * extractBits(y, 0u, 8u) + extractBits(x, 8u, 8u) * extractBits(y, 8u, 8u)
                + extractBits(x, 16u, 8u) * extractBits(y, 16u, 8u) + extractBits(x, 24u, 8u) * extractBits(y, 24u, 8u);
        }\n"
    };
    h
}

// WGSL has no includes: the workgroup reductions come first in the kernels that use them.
pub(crate) const TERNARY_WGSL: &str =
    concat!(include_str!("../../../../shaders/reduce.wgsl"), include_str!("../../../../shaders/ternary.wgsl"));
pub(crate) const FLOAT_WGSL: &str = include_str!("../../../../shaders/float.wgsl");
pub(crate) const NORM_WGSL: &str =
    concat!(include_str!("../../../../shaders/reduce.wgsl"), include_str!("../../../../shaders/norm.wgsl"));
pub(crate) const TILE_WGSL: &str = concat!(
    include_str!("../../../../shaders/reduce.wgsl"),
    include_str!("../../../../shaders/ternary.wgsl"),
    include_str!("../../../../shaders/tile.wgsl")
);
pub(crate) const ATTENTION_WGSL: &str = concat!(
    include_str!("../../../../shaders/reduce.wgsl"),
    include_str!("../../../../shaders/f16.wgsl"),
    include_str!("../../../../shaders/attention.wgsl")
);
pub(crate) const BLOCKS_WGSL: &str = concat!(
    include_str!("../../../../shaders/reduce.wgsl"),
    include_str!("../../../../shaders/f16.wgsl"),
    include_str!("../../../../shaders/ternary.wgsl"),
    include_str!("../../../../shaders/blocks.wgsl")
);

impl Kernel {
    /// Compiles `entry` of `source` (after a header defining `consts`) for bindings 0 (step) and `slots`.
    pub fn new(gpu: &Gpu, source: &str, entry: &str, consts: &[(&str, u32)], slots: &[Slot]) -> Kernel {
        let device = &gpu.device;
        let code = header(gpu, consts) + source;
        let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some(entry),
            source: wgpu::ShaderSource::Wgsl(code.into()),
        });
        let mut entries = vec![layout_entry(0, Slot::Uniform, true)];
        entries.extend(slots.iter().enumerate().map(|(i, &s)| layout_entry(i as u32 + 1, s, false)));
        let layout =
            device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor { label: Some(entry), entries: &entries });
        let pipeline_layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label: Some(entry),
            bind_group_layouts: &[Some(&layout)],
            immediate_size: 0,
        });
        let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(entry),
            layout: Some(&pipeline_layout),
            module: &module,
            entry_point: Some(entry),
            compilation_options: Default::default(),
            cache: None,
        });
        Kernel { pipeline, layout, slots: slots.to_vec(), rows_per_group: 1 }
    }

    /// ternary.wgsl for inputs of up to `max_cols` (padded) columns, or an error where its workgroup memory
    /// would exceed the adapter's (WebGPU guarantees 16 KiB: inputs of up to 13,184 columns). Its threads
    /// per row suit rows of up to [`SHORT_ROW`] columns (8), or `long_rows` (16): on an H100 the
    /// 2560-column gate/up matrix ran 15 µs with 8 against 20 µs with 16, the 6912-column down matrix 17
    /// against 15.
    pub fn ternary(gpu: &Gpu, max_cols: usize, long_rows: bool) -> Result<Kernel> {
        let xq_vec4 = (max_cols / 16).max(1) as u32;
        // The int8 activations (xq), then reduce.wgsl's two levels, Σq's two, and the row parts.
        let bytes = 16 * xq_vec4 + 3 * 4 * WG + 2 * 4 * (WG / 16);
        let limit = gpu.limits.max_compute_workgroup_storage_size;
        if bytes > limit {
            let why = format!("BitLinear over {max_cols} columns needs {bytes} bytes of workgroup memory");
            return Err(Error::Gpu(format!("{why}, the adapter has {limit}")));
        }
        let default = if long_rows { 16 } else { 8 };
        let tpr = threads_per_row(gpu, "BITNET_WGPU_TPR", default).min(WG / 2); // gate/up pairs need 2 rows a group
        let consts = [("TPR", tpr), ("XQ_VEC4", xq_vec4)];
        let slots = [Slot::Uniform, Slot::Read, Slot::Read, Slot::Read, Slot::Write];
        Ok(Kernel { rows_per_group: (WG / tpr) as usize, ..Kernel::new(gpu, TERNARY_WGSL, "main", &consts, &slots) })
    }

    /// blocks.wgsl for inputs of up to `max_cols` (padded) columns: projections in ggml blocks, for one token
    /// or a tile's (it runs each weight row for every token of the step: rows stay in the cache).
    pub fn blocks(gpu: &Gpu, max_cols: usize) -> Result<Kernel> {
        let xq_vec4 = (max_cols / 16).max(1) as u32;
        // The int8 activations (xq), each block's scale and Σq, reduce.wgsl's two levels, the row parts.
        let bytes = 16 * xq_vec4 + 4 * xq_vec4 + 2 * 4 * WG + 4 * WG;
        let limit = gpu.limits.max_compute_workgroup_storage_size;
        if bytes > limit {
            let why =
                format!("a Q1_0/Q2_0/Q8_0 projection over {max_cols} columns needs {bytes} bytes of workgroup memory");
            return Err(Error::Gpu(format!("{why}, the adapter has {limit}")));
        }
        let tpr = threads_per_row(gpu, "BITNET_WGPU_TPR", 8).min(WG / 2); // gate/up pairs need 2 rows a group
        let consts = [("TPR", tpr), ("XQ_VEC4", xq_vec4)];
        let slots = [Slot::Uniform, Slot::Read, Slot::Read, Slot::Read, Slot::Write];
        Ok(Kernel { rows_per_group: (WG / tpr) as usize, ..Kernel::new(gpu, BLOCKS_WGSL, "blocks", &consts, &slots) })
    }

    /// tile.wgsl's `entry` (quantize or gemm), for a prompt tile. ternary.wgsl's GEMV constants must be
    /// defined but go unused: 1 keeps its unused workgroup arrays small.
    pub fn tile(gpu: &Gpu, entry: &str) -> Kernel {
        let consts = [("TPR", 1), ("XQ_VEC4", 1), ("TILE", TILE as u32)];
        let slots = [
            Slot::Uniform,
            if entry == "quantize" { Slot::Write } else { Slot::Read },
            Slot::Read,
            Slot::Read,
            Slot::Write,
        ];
        // A gemm workgroup takes WG / TILE row pairs.
        Kernel { rows_per_group: 2 * WG as usize / TILE, ..Kernel::new(gpu, TILE_WGSL, entry, &consts, &slots) }
    }

    /// float.wgsl's `entry` (matvec or lookup) for matrices stored as `format`.
    pub fn float(gpu: &Gpu, format: Format, entry: &str) -> Kernel {
        let tpr = threads_per_row(gpu, "BITNET_WGPU_FLOAT_TPR", 32);
        let consts = [("TPR", tpr), ("FORMAT", format as u32)];
        let slots = [Slot::Uniform, Slot::Read, Slot::Read, Slot::Read, Slot::Write];
        // The lookup copies one row with one workgroup; a matvec gives each workgroup WG / TPR rows.
        let rows_per_group = if entry == "lookup" { 1 } else { (WG / tpr) as usize };
        Kernel { rows_per_group, ..Kernel::new(gpu, FLOAT_WGSL, entry, &consts, &slots) }
    }

    /// norm.wgsl's `entry` (rmsnorm, head_norm or argmax).
    pub fn norm(gpu: &Gpu, entry: &str) -> Kernel {
        Kernel::new(gpu, NORM_WGSL, entry, &[], &[Slot::Uniform, Slot::Read, Slot::Read, Slot::Write, Slot::Write])
    }

    /// attention.wgsl's `entry` (main; store_kv for a prompt tile; combine for a split decode step).
    pub fn attention(gpu: &Gpu, head_dim: usize, entry: &str) -> Kernel {
        let slots =
            [Slot::Uniform, Slot::Read, Slot::Read, Slot::Write, Slot::Write, Slot::Write, Slot::Write, Slot::Write];
        Kernel::new(gpu, ATTENTION_WGSL, entry, &[("MAX_HD", head_dim as u32)], &slots)
    }

    /// A dispatch of this kernel over `resources` (one per slot, in order).
    pub fn dispatch(&self, gpu: &Gpu, step: &wgpu::Buffer, resources: &[&wgpu::Buffer], grid: (u32, u32)) -> Dispatch {
        assert_eq!(resources.len(), self.slots.len(), "one resource per binding");
        let mut entries = vec![wgpu::BindGroupEntry {
            binding: 0,
            resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                buffer: step,
                offset: 0,
                size: wgpu::BufferSize::new(std::mem::size_of::<Step>() as u64),
            }),
        }];
        entries.extend(
            resources
                .iter()
                .enumerate()
                .map(|(i, b)| wgpu::BindGroupEntry { binding: i as u32 + 1, resource: b.as_entire_binding() }),
        );
        let bind = gpu.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout: &self.layout,
            entries: &entries,
        });
        Dispatch { pipeline: self.pipeline.clone(), bind, grid }
    }
}

fn layout_entry(binding: u32, slot: Slot, dynamic: bool) -> wgpu::BindGroupLayoutEntry {
    let ty = match slot {
        Slot::Uniform => wgpu::BufferBindingType::Uniform,
        Slot::Read => wgpu::BufferBindingType::Storage { read_only: true },
        Slot::Write => wgpu::BufferBindingType::Storage { read_only: false },
    };
    wgpu::BindGroupLayoutEntry {
        binding,
        visibility: wgpu::ShaderStages::COMPUTE,
        ty: wgpu::BindingType::Buffer { ty, has_dynamic_offset: dynamic, min_binding_size: None },
        count: None,
    }
}

/// Threads per row of the matrix-vector kernels: `BITNET_WGPU_TPR` / `BITNET_WGPU_FLOAT_TPR` (powers of
/// two from 1 to 256) override the defaults, for tuning on a new GPU.
///
/// A browser has no environment; there a CPU-type adapter (SwiftShader) gets one thread per row. On a CPU
/// the reductions' barriers are what costs, and each workgroup repeats the input's norm and quantization:
/// a row per thread means no row reductions and 16 to 32 times fewer workgroups (the default model on
/// SwiftShader: 0.9 s a token instead of 8.5 s).
pub(crate) fn threads_per_row(gpu: &Gpu, var: &str, default: u32) -> u32 {
    let default = if cfg!(target_arch = "wasm32") && gpu.adapter().is_cpu { 1 } else { default };
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|t: &u32| t.is_power_of_two() && *t <= WG)
        .unwrap_or(default)
}
