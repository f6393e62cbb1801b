//! Any request body as `bitnet serve` reads it (the server's own `api.rs`): JSON, the typed request and
//! sampling fields, the sampling parameters; those accepted must then sample a token without a panic.
#![no_main]

#[allow(dead_code)]
#[path = "../../native/src/serve/api.rs"]
mod api;

use api::{ChatRequest, CompletionRequest, Sampling};
use bitnet_engine::generate::sampler::Sampler;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(body) = serde_json::from_slice::<serde_json::Value>(data) else { return };
    let _ = serde_path_to_error::deserialize::<_, CompletionRequest>(&body);
    let _ = serde_path_to_error::deserialize::<_, ChatRequest>(&body);
    let Ok(sampling) = serde_path_to_error::deserialize::<_, Sampling>(&body) else { return };
    // A small vocabulary with ties, -infinity and a history longer than repeat_last_n can be.
    let logits = [0.5, 2.0, f32::NEG_INFINITY, 2.0, -1.0, 0.0, 3.5, -7.25];
    let Ok(params) = sampling.gen_params(logits.len()) else { return };
    let history = [1, 3, 3, 6, 0, 9, 1];
    let mut sampler = Sampler::new(params.sampler);
    for _ in 0..4 {
        let token = sampler.sample(&logits, &history).expect("accepted parameters sample");
        assert!((token as usize) < logits.len());
    }
});
