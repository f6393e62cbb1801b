//! Any text through the default model's tokenizer (byte-level BPE, 49,152 tokens): decoding what was
//! encoded gives the text back, whole and streamed, and a chat message's text comes back inside the
//! rendered template. Any bytes as token ids decode without a panic.
#![no_main]

use std::sync::OnceLock;

use bitnet_engine::chat::ChatMessage;
use bitnet_engine::gguf::GgufFile;
use bitnet_engine::tokenizer::{StreamDecoder, Tokenizer};
use libfuzzer_sys::fuzz_target;

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

    let ids = tk.encode(text, false).expect("any text encodes");
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
