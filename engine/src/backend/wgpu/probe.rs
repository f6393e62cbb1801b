//! Test hooks: one kernel at a time on the device, through the same upload and dispatch code as the
//! forward pass, for comparison with the CPU reference kernels (engine/tests/wgpu.rs).
#![cfg(not(target_arch = "wasm32"))]

use super::gpu::Gpu;
use super::kernels::{
    grid, AttnParams, Dispatch, FloatParams, Kernel, NormParams, Step, TernaryParams, MODE_ADD, MODE_GATE_UP, MODE_RAW,
    MODE_STORE, SHORT_ROW, TILE,
};
use super::weights::{FloatGpu, LinearGpu};
use crate::model::Activation;
use crate::tensor::float::FloatMatrix;
use crate::tensor::ternary::TernaryMatrix;
use crate::Result;

impl Gpu {
    fn probe_step(&self, token: u32) -> wgpu::Buffer {
        self.uniform("step", &Step { token, pos: 0, row: 0, n: 1 })
    }

    /// Runs `dispatches` (step 0) and reads back the first `n` values of `out`.
    fn probe_run<T: bytemuck::Pod>(&self, dispatches: &[Dispatch], out: &wgpu::Buffer, n: usize) -> Result<Vec<T>> {
        let bytes = (n * std::mem::size_of::<T>()) as u64;
        let read = self.readback("probe", bytes);
        let mut enc = self.device.create_command_encoder(&Default::default());
        {
            let mut pass = enc.begin_compute_pass(&Default::default());
            dispatches.iter().for_each(|d| d.record(&mut pass, 0));
        }
        enc.copy_buffer_to_buffer(out, 0, &read, 0, bytes);
        self.queue.submit([enc.finish()]);
        let mut v = vec![T::zeroed(); n];
        self.read(&read, &mut v)?;
        Ok(v)
    }

    fn probe_ternary(
        &self,
        w: &LinearGpu,
        p: TernaryParams,
        x: &[f32],
        norm: &[f32],
        out: &[f32],
        n: usize,
    ) -> Result<Vec<u32>> {
        let cols = p.vpr as usize * 64;
        let k = Kernel::ternary(self, cols, cols > SHORT_ROW)?;
        let (x, norm, out) = (
            self.storage("x", bytemuck::cast_slice(x)),
            self.storage("norm", bytemuck::cast_slice(norm)),
            self.storage("out", bytemuck::cast_slice(out)),
        );
        let d = k.dispatch(
            self,
            &self.probe_step(0),
            &[&self.uniform("params", &p), &w.buf, &x, &norm, &out],
            grid(p.rows as usize, k.rows_per_group),
        );
        self.probe_run(&[d], &out, n)
    }

    /// BitLinear's integer part: quantizes `x` as it is (no norm) to int8 on the device and returns the
    /// accumulators `Σ_c code(r, c)·q[c]` of every row and the activation scale `s`.
    pub fn probe_bitlinear_acc(&self, w: &TernaryMatrix, x: &[f32]) -> Result<(Vec<i32>, f32)> {
        let g = LinearGpu::upload(self, "w", &[w], false)?;
        let p = TernaryParams { mode: MODE_RAW, prenorm: 0, ..g.params };
        let raw = self.probe_ternary(&g, p, x, x, &vec![0.0; w.rows + 1], w.rows + 1)?;
        Ok((raw[..w.rows].iter().map(|&a| a as i32).collect(), f32::from_bits(raw[w.rows])))
    }

    /// A prompt's BitLinear integer part (tile.wgsl): quantizes each of `xs` as it is (no norm) and runs
    /// the GEMM, in tiles as the forward pass does; returns each token's accumulators and activation scale.
    pub fn probe_gemm_acc(&self, w: &TernaryMatrix, xs: &[Vec<f32>]) -> Result<Vec<(Vec<i32>, f32)>> {
        let g = LinearGpu::upload(self, "w", &[w], false)?;
        let stride = w.cols.next_multiple_of(4);
        let p = TernaryParams {
            mode: MODE_RAW,
            prenorm: 0,
            x_stride: (stride / 4) as u32,
            out_stride: w.rows as u32,
            ..g.params
        };
        let (quantize, gemm, params) =
            (Kernel::tile(self, "quantize"), Kernel::tile(self, "gemm"), self.uniform("params", &p));
        let (words, scales) =
            (self.zeros("words", (TILE * g.params.vpr as usize * 64) as u64), self.zeros("scales", TILE as u64 * 8));
        let (x, out) = (self.zeros("x", (TILE * stride * 4) as u64), self.zeros("out", (TILE * w.rows * 4) as u64));
        let mut got = Vec::with_capacity(xs.len());
        for chunk in xs.chunks(TILE) {
            let mut rows = vec![0f32; TILE * stride];
            rows.chunks_exact_mut(stride).zip(chunk).for_each(|(r, x)| r[..x.len()].copy_from_slice(x));
            self.queue.write_buffer(&x, 0, bytemuck::cast_slice(&rows));
            let step = self.uniform("step", &Step { token: 0, pos: 0, row: 0, n: chunk.len() as u32 });
            let d = [
                // No norm: the norm weights' binding goes unused.
                quantize.dispatch(self, &step, &[&params, &words, &x, &x, &scales], (TILE as u32, 1)),
                gemm.dispatch(
                    self,
                    &step,
                    &[&params, &g.buf, &words, &scales, &out],
                    grid(w.rows, gemm.rows_per_group),
                ),
            ];
            let acc: Vec<i32> = self.probe_run(&d, &out, chunk.len() * w.rows)?;
            let s: Vec<f32> = self.probe_run(&[], &scales, 2 * chunk.len())?;
            got.extend(acc.chunks_exact(w.rows).zip(s.chunks_exact(2)).map(|(a, s)| (a.to_vec(), s[0])));
        }
        Ok(got)
    }

    /// A decode step's attention at position `keys.len() / kv_dim - 1` (`q`: the token's query heads;
    /// `keys`, `values`: rows of `n_head_kv` heads for positions 0 to the token's own), with no rotary
    /// embedding: in one pass (`chunk` 0), or split over the sequence in chunks of `chunk` positions.
    pub fn probe_attention(
        &self,
        head_dim: usize,
        n_head_kv: usize,
        q: &[f32],
        keys: &[f32],
        values: &[f32],
        chunk: usize,
    ) -> Result<Vec<f32>> {
        let (q_dim, kv_dim) = (q.len(), n_head_kv * head_dim);
        let (n_head, ctx) = (q_dim / head_dim, keys.len() / kv_dim);
        let pos = ctx - 1;
        let p = AttnParams {
            head_dim: head_dim as u32,
            group: (n_head / n_head_kv) as u32,
            q_dim: q_dim as u32,
            kv_dim: kv_dim as u32,
            rope_half: 0,
            ctx: ctx as u32,
            scale: 1.0 / (head_dim as f32).sqrt(),
            qkv_stride: 0,
            out_stride: 0,
            cached: 0,
            chunk: chunk as u32,
            exact: 0,
        };
        let qkv = [q, &keys[pos * kv_dim..], &values[pos * kv_dim..]].concat();
        let f32s = |label: &str, v: &[f32]| self.storage(label, bytemuck::cast_slice(v));
        let (qkv, kc, vc) = (f32s("qkv", &qkv), f32s("keys", keys), f32s("values", values));
        let (rope, att, out) =
            (self.zeros("rope", 16), self.zeros("att", (n_head * ctx * 4) as u64), self.zeros("out", q_dim as u64 * 4));
        let part = self.zeros("part", (n_head * ctx.div_ceil(chunk.max(1)) * (head_dim + 2) * 4) as u64);
        let step = self.uniform("step", &Step { token: 0, pos: pos as u32, row: 0, n: 1 });
        let resources = [&self.uniform("params", &p), &qkv, &rope, &kc, &vc, &att, &out, &part];
        let (main, combine) = (Kernel::attention(self, head_dim, "main"), Kernel::attention(self, head_dim, "combine"));
        let dispatches = if chunk == 0 {
            vec![main.dispatch(self, &step, &resources, (n_head as u32, 1))]
        } else {
            vec![
                main.dispatch(self, &step, &resources, (n_head as u32, ctx.div_ceil(chunk) as u32)),
                combine.dispatch(self, &step, &resources, (n_head as u32, 1)),
            ]
        };
        self.probe_run(&dispatches, &out, q_dim)
    }

    /// The fused kernel as the forward pass runs it: `rmsnorm(x, norm)`, quantization, and BitLinear of
    /// `parts` stacked (each with its scale); added to `residual` when given.
    pub fn probe_bitlinear(
        &self,
        parts: &[&TernaryMatrix],
        x: &[f32],
        norm: &[f32],
        eps: f32,
        residual: Option<&[f32]>,
    ) -> Result<Vec<f32>> {
        let g = LinearGpu::upload(self, "w", parts, false)?;
        let rows = g.params.rows as usize;
        let mode = if residual.is_some() { MODE_ADD } else { MODE_STORE };
        let p = TernaryParams { mode, prenorm: 1, eps, ..g.params };
        let out = residual.map_or_else(|| vec![0.0; rows], <[f32]>::to_vec);
        Ok(self.probe_ternary(&g, p, x, norm, &out, rows)?.into_iter().map(f32::from_bits).collect())
    }

    /// `act(gate)·up` of BitLinear outputs on `rmsnorm(x, norm)`.
    pub fn probe_gate_up(
        &self,
        gate: &TernaryMatrix,
        up: &TernaryMatrix,
        act: Activation,
        x: &[f32],
        norm: &[f32],
        eps: f32,
    ) -> Result<Vec<f32>> {
        let g = LinearGpu::upload(self, "w", &[gate, up], true)?;
        let p =
            TernaryParams { mode: MODE_GATE_UP, prenorm: 1, eps, act: u32::from(act == Activation::Silu), ..g.params };
        Ok(self
            .probe_ternary(&g, p, x, norm, &vec![0.0; gate.rows], gate.rows)?
            .into_iter()
            .map(f32::from_bits)
            .collect())
    }

    /// A projection in ggml blocks (Q1_0, Q2_0, Q8_0) as blocks.wgsl runs it: `rmsnorm(x, norm)` (no norm where
    /// `norm` is empty), Q8_0 quantization, the block dot products; `y` of every row.
    pub fn probe_blocks(&self, m: &FloatMatrix, x: &[f32], norm: &[f32], eps: f32) -> Result<Vec<f32>> {
        let g = LinearGpu::upload_blocks(self, "w", &[m], false)?;
        let k = Kernel::blocks(self, m.cols.next_multiple_of(128))?;
        let prenorm = u32::from(!norm.is_empty());
        let p = TernaryParams { mode: MODE_STORE, prenorm, eps, ..g.params };
        let (x, out) = (self.storage("x", bytemuck::cast_slice(x)), self.zeros("out", m.rows as u64 * 4));
        let norm = if norm.is_empty() { &x } else { &self.storage("norm", bytemuck::cast_slice(norm)) };
        let grid = grid(m.rows, k.rows_per_group);
        let d = k.dispatch(self, &self.probe_step(0), &[&self.uniform("params", &p), &g.buf, &x, norm, &out], grid);
        self.probe_run(&[d], &out, m.rows)
    }

    fn probe_float(&self, m: &FloatMatrix, entry: &str, x: &[f32], token: u32, n: usize) -> Result<Vec<f32>> {
        let fm = FloatGpu::upload(self, "m", m)?;
        let k = Kernel::float(self, fm.format, entry);
        let mut xp = x.to_vec();
        xp.resize(fm.vpr * fm.format.per_vec4(), 0.0);
        let (x, out, step) =
            (self.storage("x", bytemuck::cast_slice(&xp)), self.zeros("out", n as u64 * 4), self.probe_step(token));
        let dispatches: Vec<Dispatch> = fm
            .shards
            .iter()
            .map(|s| {
                let p = FloatParams {
                    rows: s.rows.len() as u32,
                    row_offset: s.rows.start as u32,
                    vpr: fm.vpr as u32,
                    k: fm.cols as u32,
                };
                let g = if entry == "lookup" { (1, 1) } else { grid(s.rows.len(), k.rows_per_group) };
                k.dispatch(self, &step, &[&self.uniform("params", &p), &s.m, &s.d, &x, &out], g)
            })
            .collect();
        self.probe_run(&dispatches, &out, n)
    }

    /// The LM head kernel: `W·x` for every row of `m` (split into shards as the binding limit demands).
    pub fn probe_matvec(&self, m: &FloatMatrix, x: &[f32]) -> Result<Vec<f32>> {
        self.probe_float(m, "matvec", x, 0, m.rows)
    }

    /// The embedding lookup: row `row` of `m`, decoded.
    pub fn probe_lookup(&self, m: &FloatMatrix, row: u32) -> Result<Vec<f32>> {
        self.probe_float(m, "lookup", &[], row, m.cols)
    }

    /// The greedy argmax kernel.
    pub fn probe_argmax(&self, x: &[f32]) -> Result<u32> {
        let k = Kernel::norm(self, "argmax");
        let p = NormParams { n: x.len() as u32, eps: 0.0, q_heads: 0, stride: 0 };
        let (xb, w, out, best) = (
            self.storage("x", bytemuck::cast_slice(x)),
            self.zeros("w", 4),
            self.zeros("out", 4),
            self.zeros("best", 4),
        );
        let d = k.dispatch(self, &self.probe_step(0), &[&self.uniform("params", &p), &xb, &w, &out, &best], (1, 1));
        Ok(self.probe_run::<u32>(&[d], &best, 1)?[0])
    }
}
