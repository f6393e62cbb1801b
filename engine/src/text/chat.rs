//! Chat templates: a conversation rendered to prompt text by the model's Jinja template, the way Hugging Face's
//! `apply_chat_template` does it (same variables, same whitespace control, Python string methods available).

use crate::{Error, Result};
use minijinja::{context, Environment, ErrorKind};

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: &str, content: &str) -> Self {
        ChatMessage { role: role.into(), content: content.into() }
    }
}

/// BitNet b1.58 2B4T's template (from its tokenizer_config.json), for GGUF files that carry none:
/// `<|begin_of_text|>System: ...<|eot_id|>User: ...<|eot_id|>Assistant: `, contents trimmed.
pub const BITNET_TEMPLATE: &str = "{% set loop_messages = messages %}{% for message in loop_messages %}\
{% set content = message['role'] | capitalize + ': '+ message['content'] | trim + '<|eot_id|>' %}\
{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}\
{{ content }}{% endfor %}\
{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}";

/// Template instructions one rendering may run: a real template takes a few dozen per message, and a
/// template from a hostile file (nested loops over long ranges) must end in a bounded time, with an error.
const TEMPLATE_FUEL: u64 = 20_000_000;

/// Render `messages` with `template`. Variables as in HF: messages, add_generation_prompt, bos_token, eos_token,
/// and the function raise_exception(message), whose message becomes the error.
pub fn render(
    template: &str,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
    bos: &str,
    eos: &str,
) -> Result<String> {
    let mut env = Environment::new();
    env.set_fuel(Some(TEMPLATE_FUEL));
    // HF renders with trim_blocks and lstrip_blocks; templates are written for that.
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    // Templates call Python string methods (.strip(), .startswith(), ...).
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", |msg: String| -> std::result::Result<String, minijinja::Error> {
        Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
    });
    let err = |e: minijinja::Error| Error::Template(e.to_string());
    let tmpl = env.template_from_str(template).map_err(err)?;
    let ctx = context! { messages, add_generation_prompt, bos_token => bos, eos_token => eos };
    tmpl.render(ctx).map_err(err)
}
