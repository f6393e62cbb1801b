//! Kernel throughput on BitNet b1.58 2B4T shapes, in GB/s of weight bytes streamed, next to the
//! machine's own memory bandwidth measured in the same run (`memory/read` and `memory/memcpy`).
//!
//!     cargo bench -p bitnet-engine --bench kernels                  # everything
//!     cargo bench -p bitnet-engine --bench kernels -- 'matvec'      # a filter (regex)
//!     cargo bench -p bitnet-engine --bench kernels -- 'attention'   # attention over an f16 KV cache
//!
//! Decoding reads every weight once per token, so the matrix-vector benchmarks rotate through
//! copies of each matrix totalling `STREAM_BYTES`, more than the last-level cache: the bytes come
//! from DRAM, as in a real token step. Each runs on 1 and 2 threads (rows split as the model splits
//! them). `gemm` is prompt processing (128 tokens per weight pass): compute-bound, reported in
//! weight bytes per second too (×128 for multiply-accumulates per second... see BENCHMARKS.md).

use std::hint::black_box;
use std::time::Duration;

use bitnet_engine::backend::cpu::forward::attend;
use bitnet_engine::backend::cpu::kernels;
use bitnet_engine::backend::cpu::kernels::qhead::{HeadActivations, QuantHead};
use bitnet_engine::backend::cpu::kv::KvRows;
use bitnet_engine::format::quant::{self, GgmlType};
use bitnet_engine::tensor::float::FloatMatrix;
use bitnet_engine::tensor::ternary::TernaryMatrix;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use half::f16;
use rayon::prelude::*;

#[path = "../tests/common/mod.rs"]
mod common;
use common::{valid_ternary_bytes, Rng};

/// Bytes of weights a streaming benchmark cycles through: well past the last-level cache.
const STREAM_BYTES: usize = 1 << 30;
const THREADS: [usize; 2] = [1, 2];
/// (rows, cols) of 2B4T's BitLinear weights: q/o, gate/up, down (k and v are 640 × 2560).
const SHAPES: [(usize, usize); 3] = [(2560, 2560), (6912, 2560), (2560, 6912)];
const PROMPT: usize = 128;

/// `copies` stacked random ternary matrices of `rows × cols`, as one matrix (valid codes 0..=2 in every field).
fn ternary(rows: usize, cols: usize, copies: usize) -> TernaryMatrix {
    let valid = valid_ternary_bytes();
    let mut rng = Rng(7);
    let bytes = rows * copies * cols.div_ceil(128) * 32;
    let data = (0..bytes).map(|_| valid[(rng.next() % valid.len() as u64) as usize]).collect();
    TernaryMatrix { rows: rows * copies, cols, scale: 1.0, data }
}

fn activations(n: usize, rng: &mut Rng) -> Vec<i8> {
    (0..n).map(|_| (rng.next() >> 56) as i8).collect()
}

fn pool(threads: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("thread pool")
}

/// Rows per task, as the model chooses them.
fn chunk(rows: usize) -> usize {
    (rows / (rayon::current_num_threads() * 4)).max(16)
}

fn memory(c: &mut Criterion) {
    let mut g = c.benchmark_group("memory");
    g.throughput(Throughput::BytesDecimal(STREAM_BYTES as u64));
    let src = vec![1u8; STREAM_BYTES];
    let mut dst = vec![0u8; STREAM_BYTES];
    for threads in THREADS {
        let pool = pool(threads);
        g.bench_function(BenchmarkId::new("read", threads), |b| {
            b.iter(|| {
                pool.install(|| {
                    src.par_chunks(1 << 20)
                        .map(|c| {
                            c.chunks_exact(64).fold(0u64, |s, l| {
                                s ^ u64::from_le_bytes(l[..8].try_into().unwrap())
                                    ^ u64::from_le_bytes(l[56..].try_into().unwrap())
                            })
                        })
                        .reduce(|| 0, |a, b| a ^ b)
                })
            })
        });
        g.bench_function(BenchmarkId::new("memcpy", threads), |b| {
            b.iter(|| {
                pool.install(|| {
                    dst.par_chunks_mut(1 << 20).zip(src.par_chunks(1 << 20)).for_each(|(d, s)| d.copy_from_slice(s))
                })
            })
        });
    }
    g.finish();
}

fn matvec(c: &mut Criterion) {
    let mut rng = Rng(1);
    let mut g = c.benchmark_group("matvec");
    for (rows, cols) in SHAPES {
        let one = rows * cols.div_ceil(128) * 32;
        let copies = STREAM_BYTES.div_ceil(one);
        let w = ternary(rows, cols, copies);
        let xq = activations(w.padded_cols(), &mut rng);
        let mut out = vec![0i32; rows];
        g.throughput(Throughput::BytesDecimal(one as u64));
        for k in kernels::available().into_iter().skip(1) {
            for threads in THREADS {
                let pool = pool(threads);
                let mut copy = 0;
                g.bench_function(BenchmarkId::new(format!("{rows}x{cols}/{}", k.name()), threads), |b| {
                    b.iter(|| {
                        let base = copy * rows;
                        copy = (copy + 1) % copies;
                        pool.install(|| {
                            let n = chunk(rows);
                            out.par_chunks_mut(n).enumerate().for_each(|(i, o)| {
                                let r = base + i * n;
                                k.ternary_rows(&w, r..r + o.len(), &xq, o)
                            })
                        });
                        black_box(&out);
                    })
                });
            }
        }
    }
    g.finish();
}

fn gemm(c: &mut Criterion) {
    let mut rng = Rng(2);
    let mut g = c.benchmark_group("gemm128");
    g.sample_size(10);
    for (rows, cols) in SHAPES {
        let w = ternary(rows, cols, 1);
        let xq = activations(PROMPT * w.padded_cols(), &mut rng);
        // Weight bytes × tokens: what a token-by-token pass would stream.
        g.throughput(Throughput::BytesDecimal((PROMPT * w.data.len()) as u64));
        for k in kernels::available().into_iter().skip(1) {
            for threads in THREADS {
                let pool = pool(threads);
                let mut out = vec![0i32; PROMPT * rows];
                g.bench_function(BenchmarkId::new(format!("{rows}x{cols}/{}", k.name()), threads), |b| {
                    b.iter(|| {
                        pool.install(|| {
                            let n = chunk(rows);
                            out.par_chunks_mut(n * PROMPT).enumerate().for_each(|(i, o)| {
                                let r = i * n;
                                k.ternary_gemm(&w, r..r + o.len() / PROMPT, &xq, PROMPT, o)
                            })
                        });
                        black_box(&out);
                    })
                });
            }
        }
    }
    g.finish();
}

/// The tied LM head of 2B4T (128256 × 2560) in F16 and the quantized types a head may have, then the
/// int8 head kernels.
fn head(c: &mut Criterion) {
    let (rows, cols) = (128_256, 2560);
    let mut rng = Rng(3);
    let src: Vec<f32> = (0..rows * cols).map(|_| (rng.next() >> 40) as f32 / (1u64 << 24) as f32 - 0.5).collect();
    let x: Vec<f32> = (0..cols).map(|_| (rng.next() >> 40) as f32 / (1u64 << 24) as f32 - 0.5).collect();
    let mut out = vec![0f32; rows];
    let mut g = c.benchmark_group("head");
    g.sample_size(10);
    for ty in [GgmlType::F16, GgmlType::Q8_0, GgmlType::Q6_K, GgmlType::Q5_0] {
        let data = quant::quantize(ty, &src).expect("quantize");
        let w = FloatMatrix { ty, rows, cols, row_bytes: ty.row_bytes(cols).expect("row size"), data };
        g.throughput(Throughput::BytesDecimal(w.data.len() as u64));
        for k in kernels::available().into_iter().skip(1) {
            for threads in THREADS {
                let pool = pool(threads);
                g.bench_function(BenchmarkId::new(format!("{}/{}", ty.name(), k.name()), threads), |b| {
                    b.iter(|| {
                        pool.install(|| {
                            let n = chunk(rows);
                            out.par_chunks_mut(n)
                                .enumerate()
                                .for_each(|(i, o)| k.float_rows(&w, i * n..i * n + o.len(), &x, o))
                        });
                        black_box(&out);
                    })
                });
            }
        }
    }
    // The opt-in int8 head (`--head q8_0|q6_k`): the same rows requantized into the kernels' lane layout.
    for ty in [GgmlType::Q8_0, GgmlType::Q6_K] {
        let ggml = quant::quantize(ty, &src).expect("quantize");
        let h = QuantHead::from_ggml(ty, rows, cols, &ggml).expect("head");
        let mut a = HeadActivations::default();
        a.quantize(&h, &x);
        g.throughput(Throughput::BytesDecimal(h.data.len() as u64));
        for k in kernels::available().into_iter().skip(1) {
            for threads in THREADS {
                let pool = pool(threads);
                g.bench_function(BenchmarkId::new(format!("int8-{}/{}", ty.name(), k.name()), threads), |b| {
                    b.iter(|| {
                        pool.install(|| {
                            let n = chunk(rows);
                            out.par_chunks_mut(n)
                                .enumerate()
                                .for_each(|(i, o)| k.quant_head_rows(&h, i * n..i * n + o.len(), &a, o))
                        });
                        black_box(&out);
                    })
                });
            }
        }
    }
    g.finish();
}

/// One token's attention over one layer's f16 KV cache in 2B4T's shape (20 query heads over 5 kv heads
/// of 128) at 512 and 4096 cached positions, heads in parallel as the model runs them; in GB/s of cache
/// read (keys and values). A token reads every layer's cache once, so the runs rotate through copies
/// totalling `STREAM_BYTES`, as the matrix-vector ones do.
fn attention(c: &mut Criterion) {
    let (n_head, n_head_kv, hd) = (20, 5, 128);
    let kv_dim = n_head_kv * hd;
    let scale = 1.0 / (hd as f32).sqrt();
    let mut rng = Rng(4);
    let q = rng.vec(n_head * hd, 1.0);
    let mut out = vec![0f32; n_head * hd];
    let mut g = c.benchmark_group("attention");
    for n in [512, 4096] {
        let layer = n * kv_dim; // halves of keys, and as many of values
        let copies = STREAM_BYTES.div_ceil(4 * layer);
        let mut halves = |len| (0..len).map(|_| f16::from_f32(rng.f32() * 2.0)).collect::<Vec<f16>>();
        let (keys, values) = (halves(copies * layer), halves(copies * layer));
        g.throughput(Throughput::BytesDecimal(4 * layer as u64));
        for k in kernels::available() {
            for threads in THREADS {
                let pool = pool(threads);
                let mut copy = 0;
                g.bench_function(BenchmarkId::new(format!("{n}/{}", k.name()), threads), |b| {
                    b.iter(|| {
                        let base = copy * layer;
                        copy = (copy + 1) % copies;
                        pool.install(|| {
                            out.par_chunks_mut(hd).enumerate().for_each(|(h, o)| {
                                let at = base + h / (n_head / n_head_kv) * hd;
                                let (kr, vr) = (KvRows::F16(&keys[at..]), KvRows::F16(&values[at..]));
                                attend(k, &q[h * hd..(h + 1) * hd], kr, vr, kv_dim, n, scale, o);
                            })
                        });
                        black_box(&out);
                    })
                });
            }
        }
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(3));
    targets = memory, matvec, gemm, head, attention
}
criterion_main!(benches);
