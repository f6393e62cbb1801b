//! Any text through the default model's tokenizer (byte-level BPE, 49,152 tokens): decoding what was
//! encoded gives the text back, whole and streamed, and a chat message's text comes back inside the
//! rendered template. Any bytes as token ids decode without a panic.
//!
//! The round trip holds for text made of bytes the vocabulary has a token for: SmolLM's lacks a few
//! control bytes (0x04, ...), which encoding drops, as Hugging Face's tokenizer does with the same vocabulary.
#![no_main]

use std::sync::OnceLock;

use bitnet_engine::text::chat::ChatMessage;
use bitnet_engine::format::gguf::GgufFile;
use bitnet_engine::text::tokenizer::{StreamDecoder, Tokenizer};
use libfuzzer_sys::fuzz_target;

/// Bytes that no token of the vocabulary stands for alone.
fn missing_bytes() -> &'static [bool; 256] {
    static MISSING: OnceLock<[bool; 256]> = OnceLock::new();
    MISSING.get_or_init(|| {
        let tk = tokenizer();
        let mut missing = [true; 256];
        for id in 0..tk.vocab_size() as u32 {
            if let [b] = tk.token_bytes(id)[..] {
                missing[b as usize] = false;
            }
        }
        missing
    })
}

fn tokenizer() -> &'static Tokenizer {
    static TK: OnceLock<Tokenizer> = OnceLock::new();
    TK.get_or_init(|| {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../engine/models/smolbit-135m.gguf");
        let bytes = std::fs::read(path).expect("the default model");
        Tokenizer::from_metadata(&GgufFile::parse(&bytes).expect("a valid GGUF").metadata).expect("its tokenizer")
    })
}

fuzz_target!(|data: &[u8]| {
    let tk = tokenizer();
    let ids: Vec<u32> = data.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    let _ = tk.decode(&ids);
    let Ok(text) = std::str::from_utf8(data) else { return };
    let representable = !text.bytes().any(|b| missing_bytes()[b as usize]);

    let ids = tk.encode(text, false).expect("any text encodes");
    if !representable {
        let _ = tk.encode_chat(&[ChatMessage::new("user", text)], true);
        return;
    }
    assert_eq!(tk.decode(&ids), text, "decode(encode(text))");
    let mut stream = StreamDecoder::new();
    let mut streamed: String = ids.iter().map(|&id| stream.push(tk, id)).collect();
    streamed += &stream.flush();
    assert_eq!(streamed, text, "streamed decoding");

    let messages = [ChatMessage::new("user", text)];
    let rendered = tk.render_chat(&messages, true).expect("the default template renders any text");
    let ids = tk.encode_chat(&messages, true).expect("any message encodes");
    let bos = tk.bos().filter(|_| tk.add_bos()).map_or(0, |_| 1);
    assert_eq!(tk.decode(&ids[bos..]), rendered, "a message's text comes back as text");
});
