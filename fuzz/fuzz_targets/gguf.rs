//! Any bytes as a GGUF file: the reader, and everything the engine derives from a file (model
//! configuration, tokenizer, weights), must reject bad input with an error, never a panic, a hang or a
//! huge allocation (libFuzzer's RSS limit catches those).
#![no_main]

use bitnet_engine::format::gguf::GgufFile;
use bitnet_engine::model::{Config, LoadOptions, Model};
use bitnet_engine::text::tokenizer::Tokenizer;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(g) = GgufFile::parse(data) else { return };
    for t in &g.tensors {
        let _ = g.tensor_data(data, t);
    }
    let _ = Tokenizer::from_metadata(&g.metadata);
    if Config::from_gguf(&g, &LoadOptions::default()).is_ok() {
        let _ = Model::load(&g, data, &LoadOptions::default(), &mut |_, _| {});
    }
});
