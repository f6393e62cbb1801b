//! Text: the tokenizer (text to token ids and back) chat templates, and the tool-call formats of those templates.

pub mod chat;
pub mod spm_model;
pub mod tokenizer;
pub mod tools;
