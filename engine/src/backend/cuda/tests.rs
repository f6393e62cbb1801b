//! Each CUDA kernel against the CPU reference (run on a machine with an NVIDIA GPU; see README,
//! development section). Integer accumulators must match exactly: inputs whose RMSNorm every summation
//! order computes alike (integer-valued activations) make the kernels' float outputs bit-identical to the
//! CPU's. Attention and the LM head sum floats in another order, and the KV cache is f16: tolerances.

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaStream, DeviceRepr, ValidAsZeroBits};
use half::f16;

use super::kernels::{AttnDims, DecodeRows, Epilogue, Kernels, Linear, SplitK, DEC_CHUNK, EPI_GLU, EPI_QKV, EPI_RESID};
use super::{pack, upload, zeros, Buf};
use crate::backend::cpu::kernels::{quantize_activations, scalar::Scalar, Kernels as _};
use crate::backend::KvType;
use crate::generate::sampler::SplitMix64;
use crate::model::{Activation, Config};
use crate::tensor::ternary::TernaryMatrix;

struct Gpu {
    s: Arc<CudaStream>,
    k: Kernels,
}

fn gpu() -> Gpu {
    let dev = CudaContext::new(0).expect("a CUDA device (these tests need one)");
    // SAFETY: one stream per test.
    unsafe { dev.disable_event_tracking() };
    let s = dev.new_stream().unwrap();
    let k = Kernels::new(&dev, s.clone()).unwrap();
    Gpu { s, k }
}

impl Gpu {
    fn up<T: DeviceRepr>(&self, v: &[T]) -> Buf<T> {
        upload(&self.s, v).unwrap()
    }
    fn zeros<T: DeviceRepr + ValidAsZeroBits>(&self, n: usize) -> Buf<T> {
        zeros(&self.s, n).unwrap()
    }
    fn down<T: DeviceRepr + Default + Clone>(&self, b: &Buf<T>, n: usize) -> Vec<T> {
        let mut out = vec![T::default(); b.mem.len()];
        self.s.memcpy_dtoh(&b.mem, &mut out).unwrap();
        self.s.synchronize().unwrap();
        out.truncate(n);
        out
    }
    /// A packed matrix for the decode kernel on `blocks` blocks (None: the planned grid).
    fn linear(
        &self,
        m: &[(&TernaryMatrix, usize)],
        cols: usize,
        blocks: Option<usize>,
    ) -> (Linear, Buf<u32>, Buf<f32>) {
        let p = pack::pack(m, cols);
        let (w, sc) = (self.up(&p.data), self.up(&p.scales));
        let (blocks, chunk) = self.k.plan_gemv(m.len() / 2, p.words, cols, blocks).unwrap();
        (Linear { w: w.ptr, scales: sc.ptr, words: p.words, pairs: m.len() / 2, blocks, chunk }, w, sc)
    }
}

fn rng(seed: u64) -> SplitMix64 {
    SplitMix64::new(seed)
}

fn uniform(r: &mut SplitMix64, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n).map(|_| lo + (hi - lo) * r.uniform() as f32).collect()
}

/// Integer-valued activations: their sum of squares is exact in any order.
fn int_valued(r: &mut SplitMix64, n: usize) -> Vec<f32> {
    (0..n).map(|_| (r.next_u64() % 17) as f32 - 8.0).collect()
}

fn ternary(r: &mut SplitMix64, rows: usize, cols: usize, scale: f32) -> TernaryMatrix {
    let codes: Vec<i8> = (0..rows * cols).map(|_| (r.next_u64() % 3) as i8 - 1).collect();
    TernaryMatrix::from_codes(rows, cols, &codes, scale)
}

/// The CPU's rmsnorm (model.rs), sequential sum.
fn rmsnorm(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let inv = 1.0 / (ms + eps).sqrt();
    x.iter().zip(w).map(|(&v, &w)| w * (v * inv)).collect()
}

/// The CPU's BitLinear of rmsnorm(x): (acc / s · scale) per row, with the scalar kernel.
fn cpu_bitlinear(m: &TernaryMatrix, x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let xn = rmsnorm(x, w, eps);
    let mut xq = vec![0i8; m.padded_cols()];
    let s = quantize_activations(&xn, &mut xq);
    let mut acc = vec![0i32; m.rows];
    Scalar.ternary_rows(m, 0..m.rows, &xq, &mut acc);
    acc.iter().map(|&a| a as f32 / s * m.scale).collect()
}

fn close(got: &[f32], want: &[f32], tol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol * scale, "{what}[{i}]: got {g}, want {w} (tolerance {tol} × {scale})");
    }
}

const EPS: f32 = 1e-5;

#[test]
fn norm_quant_matches_the_cpu() {
    let g = gpu();
    let mut r = rng(1);
    for n in [96, 2560, 6912, 16384] {
        let kp = pack::words(n) * 16;
        for exact in [true, false] {
            let t = 3;
            let x: Vec<f32> = if exact { int_valued(&mut r, t * n) } else { uniform(&mut r, t * n, -3.0, 3.0) };
            let w = uniform(&mut r, n, 0.5, 1.5);
            let (xb, wb, xq, sc) = (g.up(&x), g.up(&w), g.zeros::<i8>(t * kp), g.zeros::<f32>(t));
            g.k.norm_quant_rows(xb.ptr, wb.ptr, n, kp, EPS, xq.ptr, sc.ptr, t).unwrap();
            let (got_q, got_s) = (g.down(&xq, t * kp), g.down(&sc, t));
            for row in 0..t {
                let mut want = vec![0i8; kp];
                let s = quantize_activations(&rmsnorm(&x[row * n..(row + 1) * n], &w, EPS), &mut want);
                let got = &got_q[row * kp..(row + 1) * kp];
                if exact {
                    assert_eq!(got_s[row], s, "n {n}: scale");
                    assert_eq!(got, &want[..], "n {n}: codes");
                } else {
                    assert!((got_s[row] - s).abs() <= 1e-5 * s, "n {n}: scale {} vs {s}", got_s[row]);
                    assert!(got.iter().zip(&want).all(|(a, b)| (*a as i32 - *b as i32).abs() <= 1), "n {n}: codes");
                }
            }
        }
    }
}

/// Decode and prompt BitLinear with the residual epilogue into zeros: y = acc / s · scale, bit for bit.
#[test]
fn bitlinear_kernels_are_exact() {
    let g = gpu();
    let mut r = rng(2);
    for (rows, cols) in [(160, 96), (258, 200), (640, 2560), (2560, 6912)] {
        let m = ternary(&mut r, rows, cols, 0.75);
        let w = uniform(&mut r, cols, 0.5, 1.5);
        let all: Vec<_> = (0..rows).map(|i| (&m, i)).collect();
        let params = g.up(&[0i32, 0]);
        // Decode: the planned grid, and grids whose blocks own uneven shares, or more pairs than their shared
        // memory holds (then they load them in several chunks).
        let x = int_valued(&mut r, cols);
        let want = cpu_bitlinear(&m, &x, &w, EPS);
        let (xb, wb) = (g.up(&x), g.up(&w));
        for blocks in [None, Some(1), Some(3)] {
            let (lin, _w, _s) = g.linear(&all, cols, blocks);
            let out = g.zeros::<f32>(rows);
            let e = Epilogue { out: out.ptr, kind: EPI_RESID, out_stride: rows as i32, ..Default::default() };
            g.k.gemv(xb.ptr, wb.ptr, cols, EPS, &lin, params.ptr, &e).unwrap();
            let what = format!("gemv {rows}x{cols}, {} blocks of {} chunked pairs", lin.blocks, lin.chunk);
            assert_eq!(g.down(&out, rows), want, "{what}");
        }
        // Prompt: tokens not a multiple of the 64-token tile; K whole in each block, and split over blocks
        // where the grid is small (the split-K scratch given).
        let (lin, _w, _s) = g.linear(&all, cols, None);
        let (part, done) = g.k.split_k_sizes();
        let (part, done) = (g.zeros::<i32>(part), g.zeros::<u32>(done));
        for (t, sk) in [1, 77, 130]
            .into_iter()
            .flat_map(|t| [(t, SplitK::default()), (t, SplitK { part: part.ptr, done: done.ptr })])
        {
            let x = int_valued(&mut r, t * cols);
            let kp = lin.words * 16;
            let (xb, xq, sc, out) = (g.up(&x), g.zeros::<i8>(t * kp), g.zeros::<f32>(t), g.zeros::<f32>(t * rows));
            g.k.norm_quant_rows(xb.ptr, wb.ptr, cols, kp, EPS, xq.ptr, sc.ptr, t).unwrap();
            let e = Epilogue { out: out.ptr, kind: EPI_RESID, out_stride: rows as i32, ..Default::default() };
            g.k.gemm(xq.ptr, sc.ptr, t, &lin, 0, &e, &sk).unwrap();
            let got = g.down(&out, t * rows);
            for tok in 0..t {
                let want = cpu_bitlinear(&m, &x[tok * cols..(tok + 1) * cols], &w, EPS);
                assert_eq!(
                    &got[tok * rows..(tok + 1) * rows],
                    &want[..],
                    "gemm {rows}x{cols}, {t} tokens, token {tok}, split-K scratch {}",
                    sk.part != 0
                );
            }
        }
    }
}

fn config(n_embd: usize, n_head: usize, n_head_kv: usize, head_dim: usize, rope_dim: usize) -> Config {
    Config {
        arch: "bitnet-b1.58".into(),
        n_vocab: 0,
        n_ctx_train: 4096,
        n_embd,
        n_layer: 1,
        n_head,
        n_head_kv,
        head_dim,
        rope_dim,
        n_ff: 0,
        eps: EPS,
        rope_base: 10000.0,
        activation: Activation::Relu2,
        activation_reason: String::new(),
    }
}

fn rope_cpu(head: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = cos.len();
    for j in 0..half {
        let (a, b) = (head[j], head[j + half]);
        head[j] = a * cos[j] - b * sin[j];
        head[j + half] = b * cos[j] + a * sin[j];
    }
}

fn f16_round(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| f16::from_f32(x).to_f32()).collect()
}

/// The q/k/v epilogue: rotary pairs, q out, k and v into the f16 caches at the token's position.
#[test]
fn qkv_epilogue_ropes_and_fills_the_cache() {
    let g = gpu();
    let mut r = rng(3);
    for (c, pos0) in [(config(64, 4, 2, 16, 16), 5), (config(256, 4, 2, 64, 32), 200)] {
        let (q_dim, kv_dim, hd) = (c.n_head * c.head_dim, c.n_head_kv * c.head_dim, c.head_dim);
        let (wq, wk, wv) = (
            ternary(&mut r, q_dim, c.n_embd, 0.5),
            ternary(&mut r, kv_dim, c.n_embd, 0.25),
            ternary(&mut r, kv_dim, c.n_embd, 2.0),
        );
        let (dst, rope) = pack::qkv_pairs(&c);
        let rows: Vec<_> = dst
            .iter()
            .map(|&d| {
                let d = d as usize;
                if d < q_dim {
                    (&wq, d)
                } else if d < q_dim + kv_dim {
                    (&wk, d - q_dim)
                } else {
                    (&wv, d - q_dim - kv_dim)
                }
            })
            .collect();
        let ctx = 256;
        let (cos, sin) = c.rope_table(ctx);
        let half = c.rope_dim / 2;
        let (lin, _w, _s) = g.linear(&rows, c.n_embd, Some(5));
        let (dst_b, rope_b, cos_b, sin_b) = (g.up(&dst), g.up(&rope), g.up(&cos), g.up(&sin));
        let norm = uniform(&mut r, c.n_embd, 0.5, 1.5);
        let wb = g.up(&norm);
        let t = 9;
        let x = int_valued(&mut r, t * c.n_embd);
        let (q, kc, vc) = (g.zeros::<f32>(t * q_dim), g.zeros::<u16>(ctx * kv_dim), g.zeros::<u16>(ctx * kv_dim));
        let e = Epilogue {
            dst: dst_b.ptr,
            rope: rope_b.ptr,
            out: q.ptr,
            kc: kc.ptr,
            vc: vc.ptr,
            cos: cos_b.ptr,
            sin: sin_b.ptr,
            kind: EPI_QKV,
            out_stride: q_dim as i32,
            q_dim: q_dim as i32,
            kv_dim: kv_dim as i32,
            rope_half: half as i32,
            silu: 0,
            ..Default::default()
        };
        // Prompt path for t tokens at pos0.., then the decode path for one more token at pos0 + t.
        let kp = lin.words * 16;
        let (xb, xq, sc) = (g.up(&x), g.zeros::<i8>(t * kp), g.zeros::<f32>(t));
        g.k.norm_quant_rows(xb.ptr, wb.ptr, c.n_embd, kp, EPS, xq.ptr, sc.ptr, t).unwrap();
        g.k.gemm(xq.ptr, sc.ptr, t, &lin, pos0, &e, &SplitK::default()).unwrap();
        let got_q_prompt = g.down(&q, t * q_dim);
        let xd = int_valued(&mut r, c.n_embd);
        let (xdb, params) = (g.up(&xd), g.up(&[0i32, (pos0 + t) as i32]));
        g.k.gemv(xdb.ptr, wb.ptr, c.n_embd, EPS, &lin, params.ptr, &e).unwrap();
        let (got_q_dec, got_k, got_v) = (g.down(&q, q_dim), g.down(&kc, ctx * kv_dim), g.down(&vc, ctx * kv_dim));
        for tok in 0..=t {
            let (xt, pos) =
                if tok < t { (&x[tok * c.n_embd..(tok + 1) * c.n_embd], pos0 + tok) } else { (&xd[..], pos0 + t) };
            let (mut wq_out, mut wk_out) = (cpu_bitlinear(&wq, xt, &norm, EPS), cpu_bitlinear(&wk, xt, &norm, EPS));
            let wv_out = cpu_bitlinear(&wv, xt, &norm, EPS);
            let (cs, sn) = (&cos[pos * half..(pos + 1) * half], &sin[pos * half..(pos + 1) * half]);
            for head in wq_out.chunks_exact_mut(hd).chain(wk_out.chunks_exact_mut(hd)) {
                rope_cpu(&mut head[..c.rope_dim], cs, sn);
            }
            let got_q = if tok < t { &got_q_prompt[tok * q_dim..(tok + 1) * q_dim] } else { &got_q_dec[..] };
            close(got_q, &wq_out, 1e-6, &format!("q, token {tok}"));
            let cache = |c: &[u16]| {
                c[pos * kv_dim..(pos + 1) * kv_dim].iter().map(|&h| f16::from_bits(h).to_f32()).collect::<Vec<_>>()
            };
            close(&cache(&got_k), &f16_round(&wk_out), 1e-3, &format!("k cache, token {tok}"));
            assert_eq!(cache(&got_v), f16_round(&wv_out), "v cache, token {tok}");
        }
    }
}

/// The FFN epilogue: act(gate) · up, with relu² and SiLU.
#[test]
fn glu_epilogue_matches_the_cpu() {
    let g = gpu();
    let mut r = rng(4);
    let (n_ff, n_embd) = (320, 128);
    let (gate, up) = (ternary(&mut r, n_ff, n_embd, 0.5), ternary(&mut r, n_ff, n_embd, 0.3));
    let rows: Vec<_> = (0..n_ff).flat_map(|i| [(&gate, i), (&up, i)]).collect();
    let (lin, _w, _s) = g.linear(&rows, n_embd, Some(7));
    let norm = uniform(&mut r, n_embd, 0.5, 1.5);
    let x = int_valued(&mut r, n_embd);
    let (xb, wb, params, h) = (g.up(&x), g.up(&norm), g.up(&[0i32, 0]), g.zeros::<f32>(n_ff));
    let (gv, uv) = (cpu_bitlinear(&gate, &x, &norm, EPS), cpu_bitlinear(&up, &x, &norm, EPS));
    for silu in [0, 1] {
        let e = Epilogue { out: h.ptr, kind: EPI_GLU, out_stride: n_ff as i32, silu, ..Default::default() };
        g.k.gemv(xb.ptr, wb.ptr, n_embd, EPS, &lin, params.ptr, &e).unwrap();
        let want: Vec<f32> = gv
            .iter()
            .zip(&uv)
            .map(|(&g, &u)| if silu == 1 { g / (1.0 + (-g).exp()) * u } else { g.max(0.0) * g.max(0.0) * u })
            .collect();
        close(&g.down(&h, n_ff), &want, 1e-6, &format!("glu silu={silu}"));
    }
}

/// Reference attention in f64 over f16-rounded keys and values: query `qh` of one head at `pos`.
fn attention_ref(qh: &[f32], k: &[f32], v: &[f32], kv_dim: usize, off: usize, pos: usize) -> Vec<f32> {
    let hd = qh.len();
    let scores: Vec<f64> = (0..=pos)
        .map(|t| (0..hd).map(|d| qh[d] as f64 * k[t * kv_dim + off + d] as f64).sum::<f64>() / (hd as f64).sqrt())
        .collect();
    let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let p: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
    let sum: f64 = p.iter().sum();
    (0..hd).map(|d| ((0..=pos).map(|t| p[t] * v[t * kv_dim + off + d] as f64).sum::<f64>() / sum) as f32).collect()
}

#[test]
fn attention_kernels_match_the_reference() {
    let g = gpu();
    let mut r = rng(5);
    for (n_head, n_kv, hd) in [(6, 2, 16), (4, 4, 64), (20, 5, 128)] {
        let dims = AttnDims { n_head, hd, kv_dim: n_kv * hd, group: n_head / n_kv, kv: KvType::F16 };
        let (q_dim, kv_dim, ctx) = (n_head * hd, n_kv * hd, 1100);
        let (k, v) = (
            f16_round(&uniform(&mut r, ctx * kv_dim, -2.0, 2.0)),
            f16_round(&uniform(&mut r, ctx * kv_dim, -2.0, 2.0)),
        );
        let bits = |x: &[f32]| x.iter().map(|&v| f16::from_f32(v).to_bits()).collect::<Vec<_>>();
        let (kc, vc) = (g.up(&bits(&k)), g.up(&bits(&v)));
        // Decode at positions inside the first chunk, on chunk edges, and over many chunks (twice each:
        // the merge must reset its counters).
        let max_chunks = ctx.div_ceil(DEC_CHUNK);
        let (part_o, part_ml, counters) =
            (g.zeros::<f32>(n_head * max_chunks * hd), g.zeros::<f32>(n_head * max_chunks * 2), g.zeros::<u32>(n_head));
        for pos in [0, 5, 127, 128, 300, 1099] {
            let q = uniform(&mut r, q_dim, -1.0, 1.0);
            let (qb, params, out) = (g.up(&q), g.up(&[0i32, pos as i32]), g.zeros::<f32>(q_dim));
            let want: Vec<f32> = (0..n_head)
                .flat_map(|h| attention_ref(&q[h * hd..(h + 1) * hd], &k, &v, kv_dim, (h / dims.group) * hd, pos))
                .collect();
            let one = DecodeRows { params: params.ptr, row_pos: 0, row_kv: 0, rows: 1, chunks: max_chunks };
            for run in 0..2 {
                let (po, pm) = (part_o.ptr, part_ml.ptr);
                g.k.attn_decode(qb.ptr, kc.ptr, vc.ptr, dims, &one, po, pm, max_chunks, counters.ptr, out.ptr).unwrap();
                close(&g.down(&out, q_dim), &want, 2e-5, &format!("decode hd {hd} pos {pos} run {run}"));
            }
        }
        // Many sequences' rows at once (a batched decode step): each at its own position over its own
        // caches (the second row's are the first's shifted by one token, so every row reads other keys).
        let positions = [5usize, 1099 - 1, 300, 127];
        let rows = positions.len();
        let q = uniform(&mut r, rows * q_dim, -1.0, 1.0);
        let caches: Vec<u64> = (0..rows).flat_map(|i| [kc.at((i % 2) * kv_dim), vc.at((i % 2) * kv_dim)]).collect();
        let (qb, out) = (g.up(&q), g.zeros::<f32>(rows * q_dim));
        let (row_pos, row_kv) = (g.up(&positions.map(|p| p as i32)), g.up(&caches));
        let (part_o, part_ml, counters) = (
            g.zeros::<f32>(rows * n_head * max_chunks * hd),
            g.zeros::<f32>(rows * n_head * max_chunks * 2),
            g.zeros::<u32>(rows * n_head),
        );
        let many = DecodeRows { params: 0, row_pos: row_pos.ptr, row_kv: row_kv.ptr, rows, chunks: max_chunks };
        for run in 0..2 {
            let (po, pm) = (part_o.ptr, part_ml.ptr);
            g.k.attn_decode(qb.ptr, 0, 0, dims, &many, po, pm, max_chunks, counters.ptr, out.ptr).unwrap();
            let got = g.down(&out, rows * q_dim);
            for (i, &pos) in positions.iter().enumerate() {
                let (k, v) = (&k[(i % 2) * kv_dim..], &v[(i % 2) * kv_dim..]);
                let want: Vec<f32> = (0..n_head)
                    .flat_map(|h| {
                        let qh = &q[i * q_dim + h * hd..i * q_dim + (h + 1) * hd];
                        attention_ref(qh, k, v, kv_dim, (h / dims.group) * hd, pos)
                    })
                    .collect();
                close(&got[i * q_dim..(i + 1) * q_dim], &want, 2e-5, &format!("rows hd {hd} row {i} run {run}"));
            }
        }
        // Prompt: t queries at pos0.., against keys 0..pos0+t.
        for (t, pos0) in [(1, 0), (40, 0), (37, 20), (100, 900)] {
            let q = uniform(&mut r, t * q_dim, -1.0, 1.0);
            let (qb, out) = (g.up(&q), g.zeros::<f32>(t * q_dim));
            g.k.attn_prefill(qb.ptr, kc.ptr, vc.ptr, t, pos0, dims, out.ptr).unwrap();
            let got = g.down(&out, t * q_dim);
            for i in 0..t {
                let want: Vec<f32> = (0..n_head)
                    .flat_map(|h| {
                        attention_ref(
                            &q[i * q_dim + h * hd..i * q_dim + (h + 1) * hd],
                            &k,
                            &v,
                            kv_dim,
                            (h / dims.group) * hd,
                            pos0 + i,
                        )
                    })
                    .collect();
                close(
                    &got[i * q_dim..(i + 1) * q_dim],
                    &want,
                    2e-5,
                    &format!("prefill hd {hd} t {t} pos0 {pos0} query {i}"),
                );
            }
        }
    }
}

#[test]
fn embedding_and_lm_head_match_the_cpu() {
    let g = gpu();
    let mut r = rng(6);
    // 1001 rows: the last block has a single row.
    for (rows, n) in [(768, 96), (1001, 64), (5000, 2560)] {
        let e = f16_round(&uniform(&mut r, rows * n, -1.0, 1.0));
        let eb = g.up(&e.iter().map(|&v| f16::from_f32(v).to_bits()).collect::<Vec<_>>());
        // Embedding: exact rows.
        let tokens = [3u32, 0, (rows - 1) as u32];
        let (tb, x) = (g.up(&tokens), g.zeros::<f32>(3 * n));
        g.k.embed(eb.ptr, n, tb.ptr, x.ptr, 3).unwrap();
        let got = g.down(&x, 3 * n);
        for (i, &t) in tokens.iter().enumerate() {
            assert_eq!(&got[i * n..(i + 1) * n], &e[t as usize * n..(t as usize + 1) * n], "embedding of {t}");
        }
        // LM head and argmax of one token, of 11 (one token tile, partly filled; one token without a logits
        // address, as a greedy-only step) and of 77 (two tiles), twice (the argmax merge resets its counters).
        let norm = uniform(&mut r, n, 0.5, 1.5);
        let nb = g.up(&norm);
        let blocks = g.k.lm_head_blocks(rows).max(Kernels::lm_head_mma_blocks(rows));
        for nt in [1, 11, 77] {
            let xv = uniform(&mut r, nt * n, -3.0, 3.0);
            let (xb, logits, best) = (g.up(&xv), g.zeros::<f32>(nt * rows), g.zeros::<i32>(nt));
            let greedy_only = if nt > 1 { 9 } else { usize::MAX };
            let outs: Vec<u64> =
                (0..nt).flat_map(|t| [if t == greedy_only { 0 } else { logits.at(t * rows) }, best.at(t)]).collect();
            let outs = g.up(&outs);
            let (bv, bi, counters) = (g.zeros::<f32>(nt * blocks), g.zeros::<i32>(nt * blocks), g.zeros::<u32>(nt));
            let split_rows = Kernels::head_split_rows_for(nt);
            let (xh, xl, inv) =
                (g.zeros::<u16>(split_rows * n), g.zeros::<u16>(split_rows * n), g.zeros::<f32>(split_rows));
            // One token's own kernel (the decode graph's), then the many-token kernel, twice each.
            for run in 0..4 {
                let (b, i, ctr) = (bv.ptr, bi.ptr, counters.ptr);
                if run < 2 && nt == 1 {
                    g.k.lm_head(xb.ptr, nb.ptr, n, EPS, eb.ptr, rows, logits.ptr, b, i, ctr, best.ptr).unwrap();
                } else {
                    let split = [xh.ptr, xl.ptr, inv.ptr];
                    g.k.lm_head_rows(xb.ptr, nt, nb.ptr, n, EPS, eb.ptr, rows, outs.ptr, split, [b, i, ctr]).unwrap();
                }
                let (got, picked) = (g.down(&logits, nt * rows), g.down(&best, nt));
                for t in 0..nt {
                    let xn = rmsnorm(&xv[t * n..(t + 1) * n], &norm, EPS);
                    let want: Vec<f32> = (0..rows)
                        .map(|row| (0..n).map(|c| e[row * n + c] as f64 * xn[c] as f64).sum::<f64>() as f32)
                        .collect();
                    let what = format!("{rows}x{n}, token {t} of {nt}, run {run}");
                    let argmax = want.iter().enumerate().fold(0, |b, (i, &v)| if v > want[b] { i } else { b });
                    if t == greedy_only {
                        assert!(got[t * rows..(t + 1) * rows].iter().all(|&v| v == 0.0), "no logits: {what}");
                    } else {
                        let got = &got[t * rows..(t + 1) * rows];
                        close(got, &want, 1e-5, &format!("logits {what}"));
                        let own = got.iter().enumerate().fold(0, |b, (i, &v)| if v > got[b] { i } else { b });
                        assert_eq!(picked[t] as usize, own, "argmax of its own logits: {what}");
                    }
                    // Against the f64 reference only where its top two are apart.
                    let mut top = want.clone();
                    top.sort_by(|a, b| b.total_cmp(a));
                    if top[0] - top[1] > 1e-3 {
                        assert_eq!(picked[t] as usize, argmax, "argmax {what}");
                    }
                }
            }
        }
    }
}

/// Hand-run: the time of each decode kernel at 2B4T shapes, launched back to back in a CUDA graph
/// (`cargo test -p bitnet-engine --features cuda --lib cuda::tests::decode_kernel_times -- --ignored --nocapture`).
#[test]
#[ignore = "timing: run by hand on a GPU"]
fn decode_kernel_times() {
    use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
    let g = gpu();
    let time = |what: &str, bytes: usize, launch: &dyn Fn()| {
        let reps = 20;
        g.s.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).unwrap();
        (0..reps).for_each(|_| launch());
        let graph = g.s.end_capture(CUgraphInstantiate_flags(0)).unwrap().unwrap();
        graph.launch().unwrap();
        let event = || g.s.context().new_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT)).unwrap();
        let (start, end) = (event(), event());
        start.record(&g.s).unwrap();
        (0..5).for_each(|_| graph.launch().unwrap());
        end.record(&g.s).unwrap();
        end.synchronize().unwrap();
        let us = start.elapsed_ms(&end).unwrap() as f64 * 1000.0 / (5 * reps) as f64;
        println!("{what:<36} {us:8.2} µs {:8.0} GB/s", bytes as f64 / us / 1e3);
    };
    let mut r = rng(7);
    let params = g.up(&[0i32, 63]);
    let (table, row) = (g.zeros::<u16>(8), g.zeros::<f32>(8));
    time("embed (a near-empty kernel)", 0, &|| g.k.embed(table.ptr, 8, params.ptr, row.ptr, 1).unwrap());
    for (name, rows, cols) in [
        ("qkv 3840x2560", 3840, 2560),
        ("wo 2560x2560", 2560, 2560),
        ("gate_up 13824x2560", 13824, 2560),
        ("down 2560x6912", 2560, 6912),
    ] {
        let m = ternary(&mut r, rows, cols, 0.01);
        let all: Vec<_> = (0..rows).map(|i| (&m, i)).collect();
        let p = pack::pack(&all, cols);
        let (w, sc) = (g.up(&p.data), g.up(&p.scales));
        let (x, nw, out) = (g.up(&uniform(&mut r, cols, -1.0, 1.0)), g.up(&vec![1f32; cols]), g.zeros::<f32>(rows));
        let e = Epilogue { out: out.ptr, kind: EPI_RESID, out_stride: rows as i32, ..Default::default() };
        // The planned grid, then a block per multiprocessor, half and twice as many.
        let sms = g.k.sms as usize;
        for blocks in [None, Some(sms), Some(sms / 2), Some(2 * sms)] {
            let (blocks, chunk) = g.k.plan_gemv(rows / 2, p.words, cols, blocks).unwrap();
            let lin = Linear { w: w.ptr, scales: sc.ptr, words: p.words, pairs: rows / 2, blocks, chunk };
            let what = format!("gemv {name} b{blocks} c{chunk}");
            time(&what, p.data.len() * 4, &|| g.k.gemv(x.ptr, nw.ptr, cols, EPS, &lin, params.ptr, &e).unwrap());
        }
    }
    let dims = AttnDims { n_head: 20, hd: 128, kv_dim: 640, group: 4, kv: KvType::F16 };
    let ctx = 4096;
    let (kc, vc) = (g.zeros::<u16>(ctx * 640), g.zeros::<u16>(ctx * 640));
    let max_chunks = ctx.div_ceil(DEC_CHUNK);
    let (q, out) = (g.up(&uniform(&mut r, 2560, -1.0, 1.0)), g.zeros::<f32>(2560));
    let (part_o, part_ml, counters) =
        (g.zeros::<f32>(20 * max_chunks * 128), g.zeros::<f32>(20 * max_chunks * 2), g.zeros::<u32>(20));
    for pos in [63, 1023] {
        let params = g.up(&[0i32, pos]);
        let bytes = (pos as usize + 1) * 640 * 2 * 2;
        let one = DecodeRows { params: params.ptr, row_pos: 0, row_kv: 0, rows: 1, chunks: max_chunks };
        time(&format!("attn_decode pos {pos}"), bytes, &|| {
            let (po, pm) = (part_o.ptr, part_ml.ptr);
            g.k.attn_decode(q.ptr, kc.ptr, vc.ptr, dims, &one, po, pm, max_chunks, counters.ptr, out.ptr).unwrap()
        });
    }
    let (rows, n) = (128256, 2560);
    let e = g.zeros::<u16>(rows * n);
    let blocks = g.k.lm_head_blocks(rows).max(Kernels::lm_head_mma_blocks(rows));
    let nw = g.up(&vec![1f32; n]);
    let split_rows = Kernels::head_split_rows_for(64);
    let (xh, xl, inv) = (g.zeros::<u16>(split_rows * n), g.zeros::<u16>(split_rows * n), g.zeros::<f32>(split_rows));
    // As the backend runs it: the logits written into mapped page-locked host memory; for 64 tokens (a
    // batched step), into device memory and to host.
    let (_host, mapped) = super::mapped::<f32>(&g.s, 64 * rows).unwrap();
    for (nt, to_host) in [(1, false), (1, true), (64, false), (64, true)] {
        let (x, logits, best) =
            (g.up(&uniform(&mut r, nt * n, -1.0, 1.0)), g.zeros::<f32>(nt * rows), g.zeros::<i32>(nt));
        let base = if to_host { mapped } else { logits.ptr };
        let outs = g.up(&(0..nt).flat_map(|t| [base + (4 * t * rows) as u64, best.at(t)]).collect::<Vec<_>>());
        let (bv, bi, counters) = (g.zeros::<f32>(nt * blocks), g.zeros::<i32>(nt * blocks), g.zeros::<u32>(nt));
        let to = if to_host { "host" } else { "device" };
        if nt == 1 {
            let logits = if to_host { mapped } else { logits.ptr };
            time(&format!("lm_head 128256x2560, logits to {to}"), rows * n * 2, &|| {
                g.k.lm_head(x.ptr, nw.ptr, n, EPS, e.ptr, rows, logits, bv.ptr, bi.ptr, counters.ptr, best.ptr).unwrap()
            });
        }
        time(&format!("lm_head_rows 128256x2560, {nt} token(s), logits to {to}"), rows * n * 2, &|| {
            let (split, best) = ([xh.ptr, xl.ptr, inv.ptr], [bv.ptr, bi.ptr, counters.ptr]);
            g.k.lm_head_rows(x.ptr, nt, nw.ptr, n, EPS, e.ptr, rows, outs.ptr, split, best).unwrap()
        });
    }
}
