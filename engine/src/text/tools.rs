//! Tool calls (function calling): how a chat template asks for them and how the model writes them.
//!
//! The tools themselves reach the model through its chat template (the `tools` variable, see
//! [`super::chat::render`]); a template that supports them also fixes the form of a call. Two forms are
//! known, those of the templates that define tool use:
//! - Hermes (NousResearch Hermes 2 Pro, Qwen 2.5 and 3; ChatML templates): one or more
//!   `<tool_call>\n{"name": "f", "arguments": {...}}\n</tool_call>` blocks, one a line;
//! - Llama 3.1 to 3.3: the whole reply is one call, `{"name": "f", "parameters": {...}}`.
//!
//! The reply is constrained by a grammar (llguidance's Lark, built by [`ToolFormat::grammar`]) to either
//! plain text or well-formed calls of the given tools, their arguments valid against each tool's JSON
//! schema, so that [`ToolFormat::parse`] always reads the calls back. Plain text may not begin with the
//! first character of a call (`<` or `{`): that character alone tells the two apart, which lets a stream
//! send text at once and hold back only a call.

use serde_json::{json, Value};

/// How a template's model writes a tool call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ToolFormat {
    Hermes,
    Llama3,
}

/// A function the model may call: its name and its parameters' JSON schema.
#[derive(Clone, Debug)]
pub struct Tool {
    pub name: String,
    pub parameters: Value,
}

/// OpenAI's `tool_choice`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ToolChoice {
    /// Text only (the tools are still shown to the model).
    None,
    /// Text or calls, as the model picks.
    Auto,
    /// One or more calls.
    Required,
    /// One call of this function.
    Function(String),
}

/// A call read back from the model's reply.
#[derive(Clone, Debug, PartialEq)]
pub struct ParsedCall {
    pub name: String,
    pub arguments: Value,
}

impl ToolFormat {
    /// The form a template writes calls in, recognised by the text it writes them with; None for a template
    /// that has no tool support.
    pub fn of_template(template: &str) -> Option<ToolFormat> {
        if template.contains("<tool_call>") {
            return Some(ToolFormat::Hermes);
        }
        // Llama 3.1's template writes calls as `{"name": ..., "parameters": ...}` and tool results as
        // `ipython` turns.
        if template.contains("\"parameters\"") && template.contains("ipython") {
            return Some(ToolFormat::Llama3);
        }
        None
    }

    /// The text a call begins with.
    pub fn call_start(self) -> &'static str {
        match self {
            ToolFormat::Hermes => "<tool_call>",
            ToolFormat::Llama3 => "{",
        }
    }

    /// Whether a reply that begins with `text` (non-empty) is a call rather than plain text.
    pub fn starts_call(self, text: &str) -> bool {
        text.starts_with(&self.call_start()[..1])
    }

    /// Whether a reply may hold several calls (Llama 3.1's template allows one).
    pub fn parallel(self) -> bool {
        self == ToolFormat::Hermes
    }

    /// The Lark grammar (llguidance's dialect) of a reply under `choice`: None when the reply is free
    /// (`ToolChoice::None`). `parallel`: more than one call may be made. Tool names must be checked before
    /// (letters, digits, `_` and `-`, as OpenAI requires), and `choice` must name one of `tools`.
    pub fn grammar(self, tools: &[Tool], choice: &ToolChoice, parallel: bool) -> Option<String> {
        let callable: Vec<&Tool> = match choice {
            ToolChoice::None => return None,
            ToolChoice::Function(name) => tools.iter().filter(|t| &t.name == name).collect(),
            ToolChoice::Auto | ToolChoice::Required => tools.iter().collect(),
        };
        let key = match self {
            ToolFormat::Hermes => "arguments",
            ToolFormat::Llama3 => "parameters",
        };
        let calls = match (self, parallel && self.parallel() && !matches!(choice, ToolChoice::Function(_))) {
            (ToolFormat::Hermes, true) => {
                "calls: block (\"\\n\" block)*\nblock: \"<tool_call>\\n\" call \"\\n</tool_call>\""
            }
            (ToolFormat::Hermes, false) => "calls: \"<tool_call>\\n\" call \"\\n</tool_call>\"",
            (ToolFormat::Llama3, _) => "calls: call",
        };
        // One rule per function: its name written out, then its arguments by its schema.
        let alternatives: Vec<String> = (0..callable.len()).map(|i| format!("tool{i}")).collect();
        let rules: Vec<String> = (callable.iter().enumerate())
            .map(|(i, tool)| {
                let head =
                    serde_json::to_string(&format!("{{\"name\": \"{}\", \"{key}\": ", tool.name)).expect("a string");
                format!("tool{i}: {head} %json {} \"}}\"", arguments_schema(&tool.parameters))
            })
            .collect();
        let body = format!("{calls}\ncall: {}\n{}\n", alternatives.join(" | "), rules.join("\n"));
        Some(match choice {
            // Text: anything that does not begin like a call (see the module's comment).
            ToolChoice::Auto => {
                let first = if self == ToolFormat::Llama3 { "\\{" } else { "<" };
                format!("start: TEXT | calls\n{body}TEXT: /(?s:[^{first}].*)/\n")
            }
            _ => format!("start: calls\n{body}"),
        })
    }

    /// The calls of a reply made under [`Self::grammar`], or None if the reply is text (or a call cut short,
    /// by the token limit).
    pub fn parse(self, text: &str) -> Option<Vec<ParsedCall>> {
        let text = text.trim();
        match self {
            ToolFormat::Hermes => {
                let mut calls = Vec::new();
                let mut rest = text;
                while !rest.is_empty() {
                    let body = rest.strip_prefix("<tool_call>")?;
                    let end = body.find("</tool_call>")?;
                    calls.push(call_of(&body[..end], "arguments")?);
                    rest = body[end + "</tool_call>".len()..].trim_start();
                }
                (!calls.is_empty()).then_some(calls)
            }
            ToolFormat::Llama3 => Some(vec![call_of(text, "parameters")?]),
        }
    }
}

/// `{"name": "f", key: {...}}` as a call.
fn call_of(json: &str, key: &str) -> Option<ParsedCall> {
    let mut v: Value = serde_json::from_str(json.trim()).ok()?;
    let name = v.get("name")?.as_str()?.to_owned();
    let arguments = v.get_mut(key)?.take();
    arguments.is_object().then_some(ParsedCall { name, arguments })
}

/// A tool's parameter schema as the grammar takes it: an object (OpenAI's default when none is given), laid
/// out as templates write arguments (Python's `json.dumps`: `{"a": 1, "b": 2}`).
fn arguments_schema(parameters: &Value) -> Value {
    let mut schema = match parameters {
        Value::Object(_) => parameters.clone(),
        _ => json!({ "type": "object" }),
    };
    let layout = json!({ "whitespace_flexible": false, "item_separator": ", ", "key_separator": ": " });
    if let Some(object) = schema.as_object_mut() {
        object.entry("x-guidance").or_insert(layout);
        object.entry("type").or_insert(json!("object"));
    }
    schema
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_are_recognised_by_their_templates() {
        assert_eq!(ToolFormat::of_template("{{ '<tool_call>' }}"), Some(ToolFormat::Hermes));
        let llama = "{{ '{\"name\": ' }}{{ '\"parameters\": ' }}{% if m.role == 'ipython' %}";
        assert_eq!(ToolFormat::of_template(llama), Some(ToolFormat::Llama3));
        assert_eq!(ToolFormat::of_template(super::super::chat::BITNET_TEMPLATE), None);
    }

    #[test]
    fn calls_are_parsed_back() {
        let hermes = "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"a\": 1}}\n</tool_call>\n<tool_call>\n{\"name\": \"g\", \"arguments\": {}}\n</tool_call>";
        let calls = ToolFormat::Hermes.parse(hermes).unwrap();
        assert_eq!(calls.len(), 2);
        assert_eq!((calls[0].name.as_str(), &calls[0].arguments), ("f", &json!({"a": 1})));
        assert_eq!(calls[1].name, "g");
        // Cut short, or text: not calls.
        assert_eq!(ToolFormat::Hermes.parse(&hermes[..40]), None);
        assert_eq!(ToolFormat::Hermes.parse("Hello"), None);
        let llama = ToolFormat::Llama3.parse("{\"name\": \"f\", \"parameters\": {\"x\": \"y\"}}").unwrap();
        assert_eq!(llama, vec![ParsedCall { name: "f".into(), arguments: json!({"x": "y"}) }]);
        assert_eq!(ToolFormat::Llama3.parse("{\"name\": \"f\""), None);
    }
}
