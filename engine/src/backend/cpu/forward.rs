//! The CPU's forward pass: one batched pass over the model's plain structs, its inner loops the
//! [`Kernels`] of the running CPU.

use rayon::prelude::*;

use super::kernels::blocks::{self, Q8Activations};
use super::kernels::qhead::HeadActivations;
use super::kernels::{self, Kernels};
use super::kv::{KvRows, KvStore};
use super::CpuModel;
use crate::backend::{check_ctx, check_input, sequence_bytes, KvType};
use crate::model::{Activation, Config, Family};
use crate::tensor::float::FloatMatrix;
use crate::tensor::ternary::TernaryMatrix;
use crate::tensor::Linear;
use crate::{Error, Result};

/// One sequence: its KV cache, RoPE tables and next-token logits. The working buffers of the forward
/// pass live in a [`BatchScratch`], which any number of sequences can share.
pub struct State {
    pub ctx: usize,
    kv_dim: usize,
    // [layer][pos][kv_dim], keys after RoPE, in the cache type chosen (f16 by default, as llama.cpp's
    // default cache and our GPU backends: half the memory and half the bytes each token's attention
    // reads at long contexts; f32 is exact).
    k_cache: KvStore,
    v_cache: KvStore,
    rope_cos: Vec<f32>, // [pos][rope_dim / 2]
    rope_sin: Vec<f32>,
    pub logits: Vec<f32>,
    /// The final normed hidden state that gave `logits` (what embedding models pool).
    pub hidden: Vec<f32>,
}

impl State {
    /// A cache of `ctx` tokens (at most the trained context) of type `kv`.
    pub fn new(c: &Config, ctx: usize, kv: KvType) -> Result<Self> {
        check_ctx(c, ctx)?;
        // Every size below is a factor of this one, so none of them overflows once it fits in usize.
        if sequence_bytes(c, ctx, kv).and_then(|b| usize::try_from(b).ok()).is_none() {
            return Err(Error::Invalid(format!("a context of {ctx} tokens needs more memory than can be addressed")));
        }
        if kv == KvType::Q8_0 && !c.head_dim.is_multiple_of(32) {
            return Err(Error::Unsupported(format!(
                "a q8_0 KV cache with head dim {} (not a multiple of 32)",
                c.head_dim
            )));
        }
        let (rope_cos, rope_sin) = c.rope_table(ctx);
        let len = c.n_layer * ctx * c.kv_dim();
        Ok(State {
            ctx,
            kv_dim: c.kv_dim(),
            k_cache: KvStore::new(kv, len),
            v_cache: KvStore::new(kv, len),
            rope_cos,
            rope_sin,
            logits: vec![0f32; c.n_vocab],
            hidden: vec![0f32; c.n_embd],
        })
    }

    /// Keys and values of layer `l` from element `off` of each position's row: `[pos][kv_dim]`.
    fn layer_kv(&self, l: usize, off: usize) -> (KvRows<'_>, KvRows<'_>) {
        let at = l * self.ctx * self.kv_dim + off;
        (self.k_cache.rows(at), self.v_cache.rows(at))
    }

    /// Stores a position's keys and values in the cache's type.
    fn store_kv(&mut self, l: usize, pos: usize, k: &[f32], v: &[f32]) {
        let at = (l * self.ctx + pos) * self.kv_dim;
        self.k_cache.store(at, k);
        self.v_cache.store(at, v);
    }

    fn rope(&self, pos: usize) -> (&[f32], &[f32]) {
        let half = self.rope_cos.len() / self.ctx;
        (&self.rope_cos[pos * half..(pos + 1) * half], &self.rope_sin[pos * half..(pos + 1) * half])
    }
}

/// One sequence's share of a [`CpuModel::forward_batch`] call: `tokens` at positions
/// `pos..pos + tokens.len()` of `state`'s cache (later positions are forgotten). With `want_logits`,
/// `state.logits` afterwards holds the next-token logits of the last token.
pub struct BatchItem<'a> {
    pub state: &'a mut State,
    pub tokens: &'a [u32],
    pub pos: usize,
    pub want_logits: bool,
}

/// A token of the tile in flight: which item it belongs to, and where.
struct Row {
    item: usize,
    token: u32,
    pos: usize,
    logits: bool,
}

/// The working buffers of [`CpuModel::forward_batch`] for a tile of up to `tile` tokens, each row of
/// each buffer one token. Made once; nothing is allocated per token.
pub struct BatchScratch {
    tile: usize,
    dims: [usize; 4], // n_embd, q_dim, kv_dim, n_ff: the model this was made for
    rows: Vec<Row>,
    x: Vec<f32>,                  // [tile][n_embd] the residual stream
    xn: Vec<f32>,                 // [tile][widest] normed activations, the inputs of projections
    xin: Vec<f32>,                // [tile][widest] one projection's own input norm of them (BitNet embedding)
    y: Vec<f32>,                  // [tile][n_embd] the outputs of o and down
    quant: Quantized,             // the projections' inputs quantized
    q: Vec<f32>,                  // [tile][q_dim]
    k: Vec<f32>,                  // [tile][kv_dim]
    v: Vec<f32>,                  // [tile][kv_dim]
    att: Vec<f32>,                // [tile][q_dim] attention outputs
    gate: Vec<f32>,               // [tile][n_ff]
    up: Vec<f32>,                 // [tile][n_ff]
    logits: Vec<f32>,             // [tokens wanting logits][n_vocab] (grown on first use)
    head_x: Vec<HeadActivations>, // per token wanting logits, for a quantized head (grown on first use)
}

impl BatchScratch {
    /// Buffers for tiles of up to `tile` tokens (at least 1). Bigger tiles read the weights fewer
    /// times per prompt; one token is all a single sequence's decoding needs.
    pub fn new(c: &Config, tile: usize) -> Self {
        let tile = tile.max(1);
        let (q_dim, kv_dim, widest) = (c.q_dim(), c.kv_dim(), c.widest());
        let padded = widest.div_ceil(128) * 128;
        BatchScratch {
            tile,
            dims: [c.n_embd, q_dim, kv_dim, c.n_ff],
            rows: Vec::with_capacity(tile),
            x: vec![0f32; tile * c.n_embd],
            xn: vec![0f32; tile * widest],
            xin: Vec::new(),
            y: vec![0f32; tile * c.n_embd],
            quant: Quantized {
                xq: vec![0i8; tile * padded],
                sx: vec![0f32; tile],
                acc: vec![0i32; tile * (q_dim + 2 * kv_dim).max(2 * c.n_ff).max(widest)],
                blocks: Vec::new(),
                tmp: Vec::new(),
            },
            q: vec![0f32; tile * q_dim],
            k: vec![0f32; tile * kv_dim],
            v: vec![0f32; tile * kv_dim],
            att: vec![0f32; tile * q_dim],
            gate: vec![0f32; tile * c.n_ff],
            up: vec![0f32; tile * c.n_ff],
            logits: Vec::new(),
            head_x: Vec::new(),
        }
    }
}

/// Rows per rayon task: a few tasks per thread so that uneven cores still finish together.
fn rows_per_task(rows: usize) -> usize {
    (rows / (rayon::current_num_threads() * 4)).max(16)
}

/// BitLinear of the matrices `ws`, which share their input (q, k and v; gate and up), for the `n`
/// tokens of a tile: `ys[j][t] = (ws[j]·xq[t]) / s[t] · ws[j].scale`, with `xq` rows of
/// `padded_cols()` and `ys[j]` rows of `ws[j].rows`. All their rows are one parallel loop, so the
/// threads meet once per input, not once per matrix. Threads take chunks of rows; each chunk's
/// accumulators come back token-major inside the chunk (`Kernels::ternary_gemm`'s layout).
fn bitlinear<const M: usize>(
    k: &dyn Kernels,
    ws: [&TernaryMatrix; M],
    xq: &[i8],
    s: &[f32],
    n: usize,
    acc: &mut [i32],
    ys: [&mut [f32]; M],
) {
    let mut rest = acc;
    let accs = ws.map(|w| {
        let (acc, r) = std::mem::take(&mut rest).split_at_mut(n * w.rows);
        rest = r;
        acc
    });
    let xq = &xq[..n * ws[0].padded_cols()];
    ws.into_par_iter().zip(accs).zip(ys).for_each(|((w, acc), y)| {
        let chunk = rows_per_task(w.rows);
        acc.par_chunks_mut(chunk * n).enumerate().for_each(|(i, o)| {
            let start = i * chunk;
            k.ternary_gemm(w, start..start + o.len() / n, xq, n, o);
        });
        for (i, o) in acc.chunks(chunk * n).enumerate() {
            let len = o.len() / n;
            for t in 0..n {
                let y = &mut y[t * w.rows + i * chunk..][..len];
                for (y, &a) in y.iter_mut().zip(&o[t * len..(t + 1) * len]) {
                    *y = a as f32 / s[t] * w.scale;
                }
            }
        }
    });
}

/// RMSNorm of one head (Qwen3's q/k norms), in place.
fn rmsnorm_in_place(x: &mut [f32], w: &[f32], eps: f32) {
    let inv = inv_rms(x, eps);
    x.iter_mut().zip(w).for_each(|(v, &w)| *v = w * (*v * inv));
}

fn rmsnorm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let inv = inv_rms(x, eps);
    for ((o, &v), &w) in out.iter_mut().zip(x).zip(w) {
        *o = w * (v * inv);
    }
}

/// `1 / sqrt(mean(x²) + eps)`.
fn inv_rms(x: &[f32], eps: f32) -> f32 {
    // Σ x² in 16 lanes, which vectorizes; a single running sum is a chain of dependent additions.
    let mut lanes = [0f32; 16];
    for c in x.chunks(16) {
        lanes.iter_mut().zip(c).for_each(|(l, v)| *l += v * v);
    }
    let ms = lanes.iter().sum::<f32>() / x.len() as f32;
    1.0 / (ms + eps).sqrt()
}

/// RMSNorm of the `n` rows of `x` (each `w.len()` long) into `out`.
fn norm_rows(x: &[f32], w: &[f32], eps: f32, n: usize, out: &mut [f32]) {
    let d = w.len();
    for (x, o) in x[..n * d].chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        rmsnorm(x, w, eps, o);
    }
}

/// The input of `o` or `down`: its `n` rows of `d` through the sub-norm `w` into `out`, or as they are for a
/// family without sub-norms (empty `w`).
fn sub_norm_rows(x: &[f32], w: &[f32], d: usize, eps: f32, n: usize, out: &mut [f32]) {
    match w.is_empty() {
        true => out[..n * d].copy_from_slice(&x[..n * d]),
        false => norm_rows(x, w, eps, n, out),
    }
}

/// The quantized inputs of a projection, each token with its own scales.
struct Quantized {
    xq: Vec<i8>,                // [tile][padded widest] per-token int8 (BitLinear)
    sx: Vec<f32>,               // [tile] their scales
    acc: Vec<i32>,              // [tile][rows of one `bitlinear`] integer accumulators, in row chunks
    blocks: Vec<Q8Activations>, // [tile] Q8_0 blocks (Q1_0, Q2_0, Q8_0 weights; grown on first use)
    tmp: Vec<f32>,              // [tile][rows] outputs of `ggml_rows`, in row chunks (grown on first use)
}

/// The per-projection input norms of layer `w` from projection `first` on (q, k, v, o, gate, up, down), for a
/// BitNet embedding model.
fn norms_in<const M: usize>(w: &crate::model::Layer, first: usize) -> Option<[&[f32]; M]> {
    (!w.norm_in.is_empty()).then(|| std::array::from_fn(|j| w.norm_in[first + j].as_slice()))
}

/// [`project`], or with `norms` (BitNet embedding models) each matrix on its own RMSNorm of `x` (in `tmp`).
#[allow(clippy::too_many_arguments)]
fn project_in<const M: usize>(
    k: &dyn Kernels,
    ws: [&Linear; M],
    norms: Option<[&[f32]; M]>,
    x: &[f32],
    d: usize,
    n: usize,
    eps: f32,
    tmp: &mut Vec<f32>,
    qz: &mut Quantized,
    ys: [&mut [f32]; M],
) {
    let Some(norms) = norms else { return project(k, ws, x, d, n, qz, ys) };
    tmp.resize(n * d, 0.0);
    for ((w, norm), y) in ws.into_iter().zip(norms).zip(ys) {
        norm_rows(x, norm, eps, n, tmp);
        project(k, [w], tmp, d, n, qz, [y]);
    }
}

/// The projections `ws`, which share their input `x` (`n` rows of `d`): `ys[j]` gets `n` rows of
/// `ws[j].rows()`. Ternary matrices run as exact BitLinear (all of them in one parallel loop, see
/// [`bitlinear`]); the others as llama.cpp multiplies their type ([`ggml_rows`]).
fn project<const M: usize>(
    k: &dyn Kernels,
    ws: [&Linear; M],
    x: &[f32],
    d: usize,
    n: usize,
    qz: &mut Quantized,
    ys: [&mut [f32]; M],
) {
    let ternary = ws.map(Linear::ternary);
    if ternary.iter().all(Option::is_some) {
        return ternary_project(k, ternary.map(Option::unwrap), x, d, n, qz, ys);
    }
    for (w, y) in ws.into_iter().zip(ys) {
        match w {
            Linear::Ternary(t) => ternary_project(k, [t], x, d, n, qz, [y]),
            Linear::Ggml(m) => ggml_rows(k, m, x, n, qz, y),
        }
    }
}

/// [`bitlinear`] of `ts` on `x` (`n` rows of `d`), each token quantized to int8 with its own scale.
fn ternary_project<const M: usize>(
    k: &dyn Kernels,
    ts: [&TernaryMatrix; M],
    x: &[f32],
    d: usize,
    n: usize,
    qz: &mut Quantized,
    ys: [&mut [f32]; M],
) {
    let stride = ts[0].padded_cols();
    for t in 0..n {
        qz.sx[t] = kernels::quantize_activations(&x[t * d..(t + 1) * d], &mut qz.xq[t * stride..(t + 1) * stride]);
    }
    bitlinear(k, ts, &qz.xq, &qz.sx, n, &mut qz.acc, ys);
}

/// `y = W·x` for the `n` rows of `x` (each `w.cols` long), `y` rows of `w.rows`: Q1_0, Q2_0 and Q8_0 against
/// Q8_0 activations (ggml's `vec_dot_type` for them), the other types in float. Threads take chunks of rows and
/// run each for every token, so a tile reads the weights from memory once; a chunk's results come back
/// token-major in `tmp`, then go to their rows of `y`.
fn ggml_rows(k: &dyn Kernels, w: &FloatMatrix, x: &[f32], n: usize, qz: &mut Quantized, y: &mut [f32]) {
    let (rows, chunk) = (w.rows, rows_per_task(w.rows));
    let quantized = blocks::reads(w.ty);
    if quantized {
        qz.blocks.resize_with(n.max(qz.blocks.len()), Q8Activations::default);
        qz.blocks[..n].par_iter_mut().zip(x.par_chunks(w.cols)).for_each(|(a, x)| a.quantize(x));
    }
    let acts = &qz.blocks[..if quantized { n } else { 0 }];
    qz.tmp.resize(n * rows, 0.0);
    qz.tmp.par_chunks_mut(chunk * n).enumerate().for_each(|(i, o)| {
        let (start, len) = (i * chunk, o.len() / n);
        match quantized {
            true => {
                acts.iter().zip(o.chunks_exact_mut(len)).for_each(|(a, o)| k.block_rows(w, start..start + len, a, o))
            }
            false => k.float_gemm(w, start..start + len, &x[..n * w.cols], n, o),
        }
    });
    for (i, o) in qz.tmp.chunks(chunk * n).enumerate() {
        let len = o.len() / n;
        for (t, o) in o.chunks_exact(len).enumerate() {
            y[t * rows + i * chunk..][..len].copy_from_slice(o);
        }
    }
}

/// NeoX-style rotary embedding of one head: element i pairs with i + rope_dim/2. The halves are zipped, so
/// the loop has no bounds checks and the compiler may vectorize it.
fn rope(head: &mut [f32], cos: &[f32], sin: &[f32]) {
    let (lo, hi) = head.split_at_mut(cos.len());
    for (((a, b), &c), &s) in lo.iter_mut().zip(hi).zip(cos).zip(sin) {
        (*a, *b) = (*a * c - *b * s, *b * c + *a * s);
    }
}

impl CpuModel {
    /// Runs a batch through the network: each item's tokens at its own positions of its own cache.
    /// One call serves both (a) a prompt: one item, many consecutive tokens (causal within the call),
    /// and (b) one decoding step of many sequences: many items, one token each. Tokens are run in
    /// tiles of up to `scratch`'s size, so each weight matrix is read once per tile, not per token;
    /// every token is quantized with its own scale, so results do not depend on the tiling.
    pub fn forward_batch(&self, scratch: &mut BatchScratch, items: &mut [BatchItem<'_>]) -> Result<()> {
        self.check_batch(scratch, items)?;
        let (mut item, mut i) = (0, 0); // the next token to run: items[item].tokens[i]
        while item < items.len() {
            scratch.rows.clear();
            while scratch.rows.len() < scratch.tile && item < items.len() {
                let it = &items[item];
                let last = i + 1 == it.tokens.len();
                scratch.rows.push(Row { item, token: it.tokens[i], pos: it.pos + i, logits: last && it.want_logits });
                (item, i) = if last { (item + 1, 0) } else { (item, i + 1) };
            }
            self.install(|| self.forward_tile(scratch, items));
        }
        Ok(())
    }

    fn check_batch(&self, scratch: &BatchScratch, items: &[BatchItem<'_>]) -> Result<()> {
        let c = &self.model.config;
        if scratch.dims != [c.n_embd, c.q_dim(), c.kv_dim(), c.n_ff] {
            return Err(Error::Invalid("the batch scratch was made for another model".into()));
        }
        for it in items {
            let s = &it.state;
            if s.kv_dim != c.kv_dim()
                || s.k_cache.values() != c.n_layer * s.ctx * s.kv_dim
                || s.logits.len() != c.n_vocab
            {
                return Err(Error::Invalid("a state was made for another model".into()));
            }
            check_input(s.ctx, self.model.token_embd.rows, it.tokens, it.pos)?;
        }
        Ok(())
    }

    /// Every layer for the tokens in `s.rows`, then the LM head for those that want logits.
    fn forward_tile(&self, s: &mut BatchScratch, items: &mut [BatchItem<'_>]) {
        let (k, m) = (self.kernels, &self.model);
        let c = &m.config;
        let n = s.rows.len();
        let [d, q_dim, kv_dim, n_ff] = s.dims;
        let hd = c.head_dim;
        for (x, row) in s.x.chunks_exact_mut(d).zip(&s.rows) {
            m.token_embd.dequantize_row(row.token as usize, x);
        }
        for (l, w) in m.layers.iter().enumerate() {
            // Attention.
            norm_rows(&s.x, &w.attn_norm, c.eps, n, &mut s.xn);
            let (xn, xin, qz) = (&s.xn, &mut s.xin, &mut s.quant);
            let qkv = [&w.wq, &w.wk, &w.wv];
            project_in(k, qkv, norms_in(w, 0), xn, d, n, c.eps, xin, qz, [&mut s.q, &mut s.k, &mut s.v]);
            for (t, row) in s.rows.iter().enumerate() {
                let state = &mut *items[row.item].state;
                let (q, kk) = (&mut s.q[t * q_dim..(t + 1) * q_dim], &mut s.k[t * kv_dim..(t + 1) * kv_dim]);
                if !w.attn_q_norm.is_empty() {
                    q.chunks_exact_mut(hd).for_each(|h| rmsnorm_in_place(h, &w.attn_q_norm, c.eps));
                    kk.chunks_exact_mut(hd).for_each(|h| rmsnorm_in_place(h, &w.attn_k_norm, c.eps));
                }
                let (cos, sin) = state.rope(row.pos);
                for head in q.chunks_exact_mut(hd).chain(kk.chunks_exact_mut(hd)) {
                    rope(&mut head[..c.rope_dim], cos, sin);
                }
                state.store_kv(l, row.pos, kk, &s.v[t * kv_dim..(t + 1) * kv_dim]);
            }
            attention(k, c, l, &s.rows, items, &s.q, &mut s.att[..n * q_dim]);
            sub_norm_rows(&s.att, &w.attn_sub_norm, q_dim, c.eps, n, &mut s.xn);
            let (xn, xin, qz) = (&s.xn, &mut s.xin, &mut s.quant);
            project_in(k, [&w.wo], norms_in(w, 3), xn, q_dim, n, c.eps, xin, qz, [&mut s.y]);
            s.x[..n * d].iter_mut().zip(&s.y).for_each(|(x, o)| *x += o);

            // Feed-forward.
            norm_rows(&s.x, &w.ffn_norm, c.eps, n, &mut s.xn);
            let (xn, xin, qz) = (&s.xn, &mut s.xin, &mut s.quant);
            project_in(k, [&w.w_gate, &w.w_up], norms_in(w, 4), xn, d, n, c.eps, xin, qz, [&mut s.gate, &mut s.up]);
            for (g, &u) in s.gate[..n * n_ff].iter_mut().zip(&s.up) {
                let a = match c.activation {
                    Activation::Relu2 => g.max(0.0) * g.max(0.0),
                    Activation::Silu => *g / (1.0 + (-*g).exp()),
                };
                *g = a * u;
            }
            sub_norm_rows(&s.gate, &w.ffn_sub_norm, n_ff, c.eps, n, &mut s.xn);
            let (xn, xin, qz) = (&s.xn, &mut s.xin, &mut s.quant);
            project_in(k, [&w.w_down], norms_in(w, 6), xn, n_ff, n, c.eps, xin, qz, [&mut s.y]);
            s.x[..n * d].iter_mut().zip(&s.y).for_each(|(x, o)| *x += o);
        }
        self.head(s, items);
    }

    /// The logits of the tile's tokens that want them, the head's rows read once for all of them.
    fn head(&self, s: &mut BatchScratch, items: &mut [BatchItem<'_>]) {
        let (k, m) = (self.kernels, &self.model);
        let d = m.config.n_embd;
        let mut n = 0; // tokens that want logits
        for (t, row) in s.rows.iter().enumerate() {
            if row.logits {
                let normed = &mut s.xn[n * d..(n + 1) * d];
                rmsnorm(&s.x[t * d..(t + 1) * d], &m.output_norm, m.config.eps, normed);
                items[row.item].state.hidden.copy_from_slice(normed);
                n += 1;
            }
        }
        if n == 0 {
            return;
        }
        let head = m.lm_head();
        s.logits.resize(n * head.rows, 0.0); // grows once, to the largest batch seen
        let chunk = rows_per_task(head.rows);
        let xn = &s.xn[..n * d];
        if let Some(qh) = &self.quant_head {
            s.head_x.resize_with(n.max(s.head_x.len()), HeadActivations::default);
            for (a, x) in s.head_x.iter_mut().zip(xn.chunks_exact(d)) {
                a.quantize(qh, x);
            }
            let acts = &s.head_x[..n];
            s.logits.par_chunks_mut(chunk * n).enumerate().for_each(|(i, o)| {
                let (start, len) = (i * chunk, o.len() / n);
                for (a, o) in acts.iter().zip(o.chunks_exact_mut(len)) {
                    k.quant_head_rows(qh, start..start + len, a, o);
                }
            });
        } else if m.family == Family::Qwen3 && blocks::reads(head.ty) {
            // As llama.cpp multiplies a Q8_0 (Q1_0, Q2_0) head: against Q8_0 activations.
            let acts = &mut s.quant.blocks;
            acts.resize_with(n.max(acts.len()), Q8Activations::default);
            acts[..n].iter_mut().zip(xn.chunks_exact(d)).for_each(|(a, x)| a.quantize(x));
            let acts = &acts[..n];
            s.logits.par_chunks_mut(chunk * n).enumerate().for_each(|(i, o)| {
                let (start, len) = (i * chunk, o.len() / n);
                for (a, o) in acts.iter().zip(o.chunks_exact_mut(len)) {
                    k.block_rows(head, start..start + len, a, o);
                }
            });
        } else {
            s.logits.par_chunks_mut(chunk * n).enumerate().for_each(|(i, o)| {
                let start = i * chunk;
                k.float_gemm(head, start..start + o.len() / n, xn, n, o);
            });
        }
        for (t, row) in s.rows.iter().filter(|r| r.logits).enumerate() {
            let dst = &mut items[row.item].state.logits;
            for (i, o) in s.logits.chunks(chunk * n).enumerate() {
                let len = o.len() / n;
                dst[i * chunk..i * chunk + len].copy_from_slice(&o[t * len..(t + 1) * len]);
            }
        }
    }
}

/// Causal attention for every (token, head) of the tile, in parallel: each token attends to its own
/// sequence's cache up to its own position (the tile's earlier tokens of the same sequence included:
/// their keys and values are already stored).
fn attention(
    k: &dyn Kernels,
    c: &Config,
    layer: usize,
    rows: &[Row],
    items: &[BatchItem<'_>],
    q: &[f32],
    out: &mut [f32],
) {
    let (hd, group, kv_dim) = (c.head_dim, c.n_head / c.n_head_kv, c.kv_dim());
    let scale = 1.0 / (hd as f32).sqrt();
    out.par_chunks_mut(hd).enumerate().for_each(|(i, out)| {
        let row = &rows[i / c.n_head];
        let kv_off = (i % c.n_head / group) * hd; // GQA: `group` query heads share one kv head
        let (keys, values) = items[row.item].state.layer_kv(layer, kv_off);
        attend(k, &q[i * hd..(i + 1) * hd], keys, values, kv_dim, row.pos + 1, scale, out);
    });
}

/// One head: `out = softmax(q·Kᵀ·scale)·V` over the first `n` cached positions (key and value `t` are
/// the rows at `t·stride`), with a two-pass softmax (max, then exponentials) as in the PyTorch
/// reference (a vectorized `exp` measured no faster: the exponentials are a few % of the time). The scores
/// live in a per-thread buffer that grows to the longest context seen, so nothing is allocated per token.
/// Public for the benchmarks.
#[allow(clippy::too_many_arguments)]
pub fn attend(
    k: &dyn Kernels,
    q: &[f32],
    keys: KvRows<'_>,
    values: KvRows<'_>,
    stride: usize,
    n: usize,
    scale: f32,
    out: &mut [f32],
) {
    thread_local!(static SCORES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) });
    SCORES.with_borrow_mut(|scores| {
        scores.resize(n.max(scores.len()), 0.0);
        let scores = &mut scores[..n];
        keys.scores(k, q, stride, scores);
        scores.iter_mut().for_each(|a| *a *= scale);
        let max = scores.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let mut sum = 0.0;
        for a in scores.iter_mut() {
            *a = (*a - max).exp();
            sum += *a;
        }
        scores.iter_mut().for_each(|a| *a /= sum);
        out.fill(0.0);
        values.accumulate(k, scores, stride, out);
    });
}
