//! The engine in a real browser, in a dedicated worker as the npm package runs it (`wasm-pack test
//! --headless --chrome`; tests/scripts/test_web.sh runs them in the threaded build): GGUF files loaded
//! through the chunked [`Loader`], tokenizer ids and logits against the fixture references (the same ones
//! the native tests use), the WebGPU backend against the CPU (on Chromium's SwiftShader adapter, which
//! webdriver.json's --enable-unsafe-webgpu provides), this build's kernels (SIMD128) against the scalar
//! reference, and the thread pool.
#![cfg(target_arch = "wasm32")]

use bitnet_engine::backend::cpu::kernels;
use bitnet_engine::format::gguf::GgufFile;
use bitnet_engine::format::quant::{self, GgmlType};
use bitnet_engine::tensor::float::FloatMatrix;
use bitnet_engine::tensor::ternary::TernaryMatrix;
use bitnet_engine::text::tokenizer::{StreamDecoder, Tokenizer};
use bitnet_web::{Engine, Loader};
use serde_json::Value;
use wasm_bindgen::{JsCast, JsError, JsValue};
use wasm_bindgen_test::*;

wasm_bindgen_test_configure!(run_in_dedicated_worker);

const REFS: &str = include_str!("../../tests/fixtures/models/references.json");
const TINY_A: &[u8] = include_bytes!("../../tests/fixtures/models/tiny-a-i2_s.gguf");
const TINY_B: &[u8] = include_bytes!("../../tests/fixtures/models/tiny-b-tq2_0.gguf");

/// In the threaded build, rayon's pool of Web Workers starts before anything uses rayon (all tests run in
/// one module instance, one after the other).
async fn setup() {
    #[cfg(feature = "threads")]
    {
        use std::sync::atomic::{AtomicBool, Ordering};
        static STARTED: AtomicBool = AtomicBool::new(false);
        if !STARTED.swap(true, Ordering::SeqCst) {
            wasm_bindgen_futures::JsFuture::from(bitnet_web::init_thread_pool(2)).await.expect("thread pool");
        }
    }
}

fn message(e: JsError) -> String {
    JsValue::from(e).unchecked_into::<js_sys::Error>().message().into()
}

/// Loads a GGUF file the way the worker does: the size first, then the bytes in chunks.
async fn load(bytes: &[u8], options: &str) -> Result<Engine, String> {
    let mut loader = Loader::new(bytes.len() as f64).map_err(message)?;
    for chunk in bytes.chunks(7000) {
        loader.push(chunk).map_err(message)?;
    }
    loader.load(options.into(), None).await.map_err(message)
}

fn refs() -> Value {
    serde_json::from_str(REFS).unwrap()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn argmax(v: &[f32]) -> usize {
    (0..v.len()).fold(0, |best, i| if v[i] > v[best] { i } else { best })
}

#[wasm_bindgen_test]
async fn gguf_files_load_from_chunks() {
    setup().await;
    let engine = load(TINY_A, r#"{"backend": "wasm", "ctx": 64}"#).await.unwrap();
    let info: Value = serde_json::from_str(&engine.info()).unwrap();
    assert_eq!(
        (info["arch"].as_str(), info["nLayer"].as_u64(), info["nEmbd"].as_u64()),
        (Some("bitnet-b1.58"), Some(2), Some(96))
    );
    assert_eq!((info["nVocab"].as_u64(), info["ctx"].as_u64()), (Some(768), Some(64)));
    assert_eq!(engine.backend(), format!("cpu/{}", kernels::best().name()));
    let threads = if cfg!(feature = "threads") { 2 } else { 1 };
    assert_eq!(info["threads"].as_u64(), Some(threads));
}

#[wasm_bindgen_test]
async fn bad_input_is_an_exception_with_a_reason() {
    setup().await;
    let too_big = Loader::new(3.0 * (1u64 << 30) as f64).err().map(message).expect("3 GiB cannot load in wasm32");
    assert!(too_big.contains("3072 MB") && too_big.contains("4096 MB"), "{too_big}");
    let truncated = load(&TINY_A[..5000], "{}").await.err().expect("a truncated file");
    assert!(truncated.starts_with("invalid GGUF file") && truncated.contains("bytes left"), "{truncated}");
    let backend = load(TINY_A, r#"{"backend": "cuda"}"#).await.err().expect("an unknown backend");
    assert!(backend.contains("unknown backend 'cuda'"), "{backend}");
    let ctx = load(TINY_A, r#"{"ctx": 100000}"#).await.err().expect("a context beyond the model's");
    assert!(ctx.contains("context 100000"), "{ctx}");
    let mut engine = load(TINY_A, "{}").await.unwrap();
    let options = engine.start("Hello".into(), r#"{"maxTokens": 3, "temprature": 0}"#.into()).await.err().map(message);
    let options = options.expect("a misspelt option");
    assert!(options.contains("temprature"), "{options}");
}

#[wasm_bindgen_test]
async fn tokenizer_ids_match_huggingface() {
    setup().await;
    let refs = refs();
    let engine = load(TINY_A, "{}").await.unwrap();
    let mut checked = 0;
    for case in refs["models"]["tiny-a"]["cases"].as_array().unwrap() {
        if case["add_special"].as_bool() == Some(true) {
            let got = engine.tokenize(case["text"].as_str().unwrap(), true).unwrap();
            assert_eq!(got, ids(&case["ids"]), "{}", case["name"]);
            checked += 1;
        }
    }
    assert_eq!(checked, 4);
}

/// The same checks as the native tests (tests/models.rs): top-1 equal, and within 1e-3 of the float64
/// reference where float noise cannot flip an int8 rounding.
#[wasm_bindgen_test]
async fn logits_match_the_references() {
    setup().await;
    let refs = refs();
    for (name, bytes, model) in [("tiny-a-i2_s", TINY_A, "tiny-a"), ("tiny-b-tq2_0", TINY_B, "tiny-b")] {
        let mut engine = load(bytes, "{}").await.unwrap();
        for case in refs["models"][model]["cases"].as_array().unwrap() {
            let got = engine.logits(ids(&case["ids"])).await.unwrap();
            let want = floats(&case["logits_f64"]);
            let what = format!("{name} / {}", case["name"]);
            assert_eq!(argmax(&got), argmax(&want), "{what}: top-1");
            let diff = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            let tolerance = if case["stable"].as_bool() == Some(true) { 1e-3 } else { 0.5 };
            assert!(diff < tolerance, "{what}: max |Δ| = {diff}");
        }
    }
}

/// Greedy generation through `start`/`step` streams the reference's continuation, on the CPU and on WebGPU.
#[wasm_bindgen_test]
async fn generation_streams_the_greedy_reference() {
    setup().await;
    let refs = refs();
    let tok = Tokenizer::from_metadata(&GgufFile::parse(TINY_A).unwrap().metadata).unwrap();
    let case = &refs["models"]["tiny-a"]["cases"][2]; // "special": stable, wide top-2 margins
    assert_eq!(case["name"], "special");
    let mut decoder = StreamDecoder::new();
    let want: String =
        ids(&case["greedy"]).iter().map(|&t| decoder.push(&tok, t)).collect::<String>() + &decoder.flush();
    for backend in ["wasm", "webgpu"] {
        let mut engine = load(TINY_A, &format!(r#"{{"backend": "{backend}"}}"#)).await.unwrap();
        let n = engine.start(case["text"].as_str().unwrap().into(), r#"{"maxTokens": 10, "temperature": 0}"#.into());
        assert_eq!(n.await.unwrap() as usize, ids(&case["ids"]).len());
        let mut got = String::new();
        while let Some(text) = engine.step().await.unwrap() {
            got.push_str(&text);
        }
        assert_eq!(got, want, "{backend}");
        let stats: Value = serde_json::from_str(&engine.stats()).unwrap();
        assert_eq!(
            (stats["generatedTokens"].as_u64(), stats["stop"].as_str()),
            (Some(10), Some("MaxTokens")),
            "{backend}"
        );
    }
}

/// WebGPU against the CPU as engine/tests/wgpu.rs checks the native wgpu backend (`compare_with_cpu`): each
/// reference prompt, then 6 greedy tokens one at a time (the cache's prefix is reused); the same top-1 where
/// the CPU's top two are more than 0.05 apart, and max |Δ| within 1e-3 after a stable prompt (no int8
/// rounding flips under float noise), 0.5 elsewhere (a flip or two: WGSL sums in another order).
/// SwiftShader has no shader-f16, which the kernels do not need.
#[wasm_bindgen_test]
async fn webgpu_logits_match_the_cpu() {
    setup().await;
    let refs = refs();
    let mut checked = 0;
    for (name, bytes, model) in [("tiny-a-i2_s", TINY_A, "tiny-a"), ("tiny-b-tq2_0", TINY_B, "tiny-b")] {
        let mut cpu = load(bytes, r#"{"backend": "wasm", "ctx": 64}"#).await.unwrap();
        let mut gpu = load(bytes, r#"{"backend": "webgpu", "ctx": 64}"#).await.unwrap();
        assert!(gpu.backend().starts_with("wgpu/") && gpu.backend().ends_with("(webgpu)"), "{}", gpu.backend());
        let (mut stable_worst, mut worst) = (0f32, 0f32);
        for case in refs["models"][model]["cases"].as_array().unwrap() {
            let mut ids = ids(&case["ids"]);
            let tol = if case["stable"].as_bool() == Some(true) { 1e-3 } else { 0.5 };
            for step in 0..=6 {
                let what = format!("{name} / {} + {step} tokens", case["name"]);
                let want = cpu.logits(ids.clone()).await.unwrap();
                let got = gpu.logits(ids.clone()).await.unwrap();
                let diff = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                assert!(diff <= if step == 0 { tol } else { 0.5 }, "{what}: max |Δ| = {diff}");
                let top = argmax(&want);
                let mut sorted = want.clone();
                sorted.sort_by(|a, b| b.total_cmp(a));
                if sorted[0] - sorted[1] > 0.05 {
                    assert_eq!(argmax(&got), top, "{what}: top-1");
                }
                if step == 0 && tol < 0.5 {
                    stable_worst = stable_worst.max(diff);
                }
                worst = worst.max(diff);
                ids.push(top as u32);
            }
            checked += 1;
        }
        console_log!("{name}: WebGPU vs CPU: max |Δ| {stable_worst} after stable prompts, {worst} anywhere");
    }
    assert_eq!(checked, 10, "2 models × 5 prompts");
}

/// SIMD128 against the scalar reference in the browser's own wasm engine (engine/tests/kernels.rs has the
/// full set, which tests/scripts/test_cross.sh runs under Node's WASI): integer sums bit for bit, float rows
/// to float tolerance, on shapes that are not multiples of the blocks.
#[wasm_bindgen_test]
async fn this_builds_kernels_match_the_scalar_reference() {
    setup().await;
    let all = kernels::available();
    let names: Vec<&str> = all.iter().map(|k| k.name()).collect();
    assert_eq!(names, ["scalar", "simd128"], "both wasm builds have SIMD128");
    assert_eq!(kernels::best().name(), "simd128");
    let (scalar, simd) = (all[0], all[1]);
    let mut seed = 0x9E37_79B9u32;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 17;
        seed ^= seed << 5;
        seed
    };
    for (rows, cols) in [(3, 127), (17, 128), (33, 320), (9, 1536)] {
        let codes: Vec<i8> = (0..rows * cols).map(|_| (next() % 3) as i8 - 1).collect();
        let w = TernaryMatrix::from_codes(rows, cols, &codes, 0.5);
        let x: Vec<f32> = (0..cols).map(|_| next() as f32 / u32::MAX as f32 * 6.0 - 3.0).collect();
        let mut xq = vec![0i8; w.padded_cols()];
        kernels::quantize_activations(&x, &mut xq);
        let (mut want, mut got) = (vec![0i32; rows], vec![0i32; rows]);
        scalar.ternary_rows(&w, 0..rows, &xq, &mut want);
        simd.ternary_rows(&w, 0..rows, &xq, &mut got);
        assert_eq!(got, want, "ternary {rows}x{cols}");
    }
    for ty in [GgmlType::F32, GgmlType::F16, GgmlType::Q8_0, GgmlType::Q5_0, GgmlType::Q4_0, GgmlType::Q6_K] {
        let (rows, cols) = (37, if ty.block_size() == 256 { 512 } else { 576 });
        let src: Vec<f32> = (0..rows * cols).map(|_| next() as f32 / u32::MAX as f32 * 2.0 - 1.0).collect();
        let data = quant::quantize(ty, &src).unwrap();
        let w = FloatMatrix { ty, rows, cols, row_bytes: ty.row_bytes(cols).unwrap(), data };
        let x = &src[..cols];
        let (mut want, mut got) = (vec![0f32; rows], vec![0f32; rows]);
        scalar.float_rows(&w, 0..rows, x, &mut want);
        simd.float_rows(&w, 0..rows, x, &mut got);
        for (g, e) in got.iter().zip(&want) {
            assert!((g - e).abs() <= 1e-4 * (1.0 + e.abs()), "{ty:?}: {g} vs {e}");
        }
    }
}

#[cfg(feature = "threads")]
#[wasm_bindgen_test]
async fn the_thread_pool_runs_on_two_workers() {
    setup().await;
    assert_eq!(rayon::current_num_threads(), 2);
    let mut seen = rayon::broadcast(|ctx| ctx.index());
    seen.sort();
    assert_eq!(seen, [0, 1]);
    let sum: u64 =
        rayon::iter::ParallelIterator::sum(rayon::iter::IntoParallelIterator::into_par_iter(0..1_000_000u64));
    assert_eq!(sum, 499_999_500_000);
}

/// Not a test: what one parallel loop costs in this browser, started from the worker (outside rayon's pool, as a
/// forward pass's loops are) and from inside the pool, against the same loop run serially: 8 tasks (as
/// `rows_per_task` splits a matrix for 2 threads), of no work and of about as much work as one matrix of the default
/// model takes per token. Prints; run it with `wasm-pack test ... --test web -- --include-ignored fork_join
/// --nocapture` (with build.sh's `mt` flags).
#[wasm_bindgen_test]
#[ignore = "a measurement"]
async fn fork_join_cost() {
    use rayon::prelude::*;
    setup().await;
    const LOOPS: u32 = 500;
    fn work(c: &mut [u32], rounds: u32) {
        for x in c {
            for _ in 0..rounds {
                *x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            }
        }
    }
    let micros = |f: &mut dyn FnMut()| {
        let t = js_sys::Date::now();
        f();
        (js_sys::Date::now() - t) * 1000.0 / LOOPS as f64
    };
    for rounds in [0, 8] {
        let mut data = vec![0u32; 8 * 2048];
        let parallel =
            |data: &mut [u32]| (0..LOOPS).for_each(|_| data.par_chunks_mut(2048).for_each(|c| work(c, rounds)));
        for _ in 0..3 {
            let serial = micros(&mut || (0..LOOPS).for_each(|_| data.chunks_mut(2048).for_each(|c| work(c, rounds))));
            let outside = micros(&mut || parallel(&mut data));
            let inside = micros(&mut || rayon::scope(|_| parallel(&mut data)));
            console_log!(
                "one loop of 8 tasks ({rounds} rounds), {} threads: serial {serial:.1} µs, from the worker {outside:.1} µs, inside the pool {inside:.1} µs",
                rayon::current_num_threads()
            );
        }
    }
}
