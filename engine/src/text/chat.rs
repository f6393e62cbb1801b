//! Chat templates: a conversation rendered to prompt text by the model's Jinja template, the way Hugging Face's
//! `apply_chat_template` does it (same variables, same whitespace control, Python string methods available).

use crate::{Error, Result};
use minijinja::{context, Environment, ErrorKind};
use serde::Serialize;

/// A message as templates read it (`message.role`, `message.content`, `message.tool_calls`,
/// `message.tool_call_id`, the names Hugging Face's templates use).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
    /// The calls of an assistant message that called tools (absent, not empty, otherwise: templates test
    /// `'tool_calls' in message`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    /// In a `tool` message: the call it answers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

impl ChatMessage {
    pub fn new(role: &str, content: &str) -> Self {
        ChatMessage { role: role.into(), content: content.into(), ..Default::default() }
    }
}

/// One tool call, laid out as OpenAI's (`{"id", "type": "function", "function": {"name", "arguments"}}`),
/// except that `arguments` is the JSON value rather than its text: templates write it with `tojson`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ToolCall {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub function: FunctionCall,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FunctionCall {
    pub name: String,
    pub arguments: serde_json::Value,
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

/// Render `messages` with `template`. Variables as in HF: messages, tools (OpenAI's tool list, or none),
/// add_generation_prompt, bos_token, eos_token, the function raise_exception(message), whose message becomes
/// the error, and Python's `tojson` (see [`tojson`]).
pub fn render(
    template: &str,
    messages: &[ChatMessage],
    tools: Option<&[serde_json::Value]>,
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
    env.add_filter("tojson", tojson);
    let err = |e: minijinja::Error| Error::Template(e.to_string());
    let tmpl = env.template_from_str(template).map_err(err)?;
    let ctx = context! { messages, tools, add_generation_prompt, bos_token => bos, eos_token => eos };
    tmpl.render(ctx).map_err(err)
}

/// HF's `tojson` (Python's `json.dumps(value, ensure_ascii=False, indent=indent)`): `", "` and `": "` between
/// items, or one item a line with `indent`; no HTML escaping (minijinja's own filter writes `<` as `\u003c`,
/// which would change tool descriptions and arguments in the prompt).
fn tojson(value: minijinja::Value, kwargs: minijinja::value::Kwargs) -> std::result::Result<String, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    kwargs.assert_all_used()?;
    let bad = |e: serde_json::Error| minijinja::Error::new(ErrorKind::InvalidOperation, e.to_string());
    let mut out = Vec::new();
    match indent {
        Some(n) => {
            let spaces = vec![b' '; n];
            let mut ser = serde_json::Serializer::with_formatter(&mut out, PrettyFormatter::with_indent(&spaces));
            value.serialize(&mut ser).map_err(bad)?;
        }
        None => value.serialize(&mut serde_json::Serializer::with_formatter(&mut out, PythonFormatter)).map_err(bad)?,
    }
    Ok(String::from_utf8(out).expect("serde_json writes UTF-8"))
}

use serde_json::ser::{Formatter, PrettyFormatter};

/// Python's default JSON separators on one line: `[1, 2]`, `{"a": 1, "b": 2}`.
struct PythonFormatter;

impl Formatter for PythonFormatter {
    fn begin_array_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W, first: bool) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }

    fn begin_object_key<W: ?Sized + std::io::Write>(&mut self, w: &mut W, first: bool) -> std::io::Result<()> {
        self.begin_array_value(w, first)
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        w.write_all(b": ")
    }
}
