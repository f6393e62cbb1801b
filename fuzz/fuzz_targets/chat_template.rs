//! Any chat template (a GGUF file's `tokenizer.chat_template`) rendering any conversation: an error or
//! text, in bounded time (the rendering's fuel), never a panic. Input: the template, then NUL-separated
//! role and content pairs.
#![no_main]

use bitnet_engine::text::chat::{self, ChatMessage};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let mut parts = text.split('\0');
    let template = parts.next().unwrap_or_default();
    let rest: Vec<&str> = parts.collect();
    let messages: Vec<ChatMessage> = rest.chunks(2).map(|p| ChatMessage::new(p[0], p.get(1).unwrap_or(&""))).collect();
    let _ = chat::render(template, &messages, None, true, "<s>", "</s>");
});
