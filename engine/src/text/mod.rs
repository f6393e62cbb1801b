//! Text: the tokenizer (text to token ids and back) and chat templates.

pub mod chat;
pub mod tokenizer;
