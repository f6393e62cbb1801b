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
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParsedCall {
    pub name: String,
    /// The arguments' JSON text, as the model wrote it (a JSON object).
    pub arguments: String,
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

/// A piece of a reply of calls, read as it comes (see [`CallReader`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CallPiece {
    /// Call `index` (from 0) begins: its function's name.
    Start { index: usize, name: String },
    /// More of call `index`'s arguments (JSON text; the pieces joined are the whole arguments).
    Arguments { index: usize, text: String },
}

/// Reads a reply of calls made under [`ToolFormat::grammar`] piece by piece, for streaming as OpenAI does: each
/// call's name once it is complete, then its arguments as they come. The grammar fixes the text around the
/// arguments, so only a possible start of the text that ends a call is held back (`}\n</tool_call>`; Llama 3's
/// closing `}`, which ends the reply, is never sent).
pub struct CallReader {
    format: ToolFormat,
    text: String,
    /// How much of `text` has been read.
    read: usize,
    /// The call whose arguments are being read, if any.
    open: Option<usize>,
    calls: usize,
}

impl CallReader {
    pub fn new(format: ToolFormat) -> Self {
        CallReader { format, text: String::new(), read: 0, open: None, calls: 0 }
    }

    /// Reads more of the reply.
    pub fn push(&mut self, text: &str) -> Vec<CallPiece> {
        self.text.push_str(text);
        let mut out = Vec::new();
        loop {
            let rest = &self.text[self.read..];
            match self.open {
                None => {
                    let Some((name, len)) = self.head(rest) else { return out };
                    out.push(CallPiece::Start { index: self.calls, name });
                    self.read += len;
                    self.open = Some(self.calls);
                    self.calls += 1;
                }
                Some(index) => {
                    let end = self.call_end();
                    // The arguments end where the call's end text is (they hold no raw newline: compact JSON).
                    let (args, next) = match rest.find(end).filter(|_| self.format == ToolFormat::Hermes) {
                        Some(at) => (at, Some(at + end.len())),
                        None => (rest.len() - held_back(rest, end), None),
                    };
                    if args > 0 {
                        out.push(CallPiece::Arguments { index, text: rest[..args].to_owned() });
                    }
                    let Some(next) = next else {
                        self.read += args;
                        return out;
                    };
                    self.read += next;
                    self.open = None;
                }
            }
        }
    }

    /// A call's opening text, complete in `rest`: the function's name and the opening's length.
    fn head(&self, rest: &str) -> Option<(String, usize)> {
        let (open, key) = match self.format {
            ToolFormat::Hermes => ("<tool_call>\n{\"name\": \"", "\", \"arguments\": "),
            ToolFormat::Llama3 => ("{\"name\": \"", "\", \"parameters\": "),
        };
        let skipped = rest.len() - rest.trim_start_matches('\n').len(); // between Hermes blocks
        let after = rest[skipped..].strip_prefix(open)?;
        let name_len = after.find(key)?;
        Some((after[..name_len].to_owned(), skipped + open.len() + name_len + key.len()))
    }

    fn call_end(&self) -> &'static str {
        match self.format {
            ToolFormat::Hermes => "}\n</tool_call>",
            ToolFormat::Llama3 => "}",
        }
    }
}

/// The length of the longest end of `text` that begins `end` (it may be the start of `end`: not yet sent).
fn held_back(text: &str, end: &str) -> usize {
    (1..=end.len().min(text.len()))
        .rev()
        .find(|&n| text.is_char_boundary(text.len() - n) && end.starts_with(&text[text.len() - n..]))
        .unwrap_or(0)
}

/// `{"name": "f", key: {...}}` as a call. The arguments' text is kept as written when the call has the
/// grammar's form (so that a streamed call's pieces add up to it), else taken from the parsed value.
fn call_of(json: &str, key: &str) -> Option<ParsedCall> {
    let json = json.trim();
    let v: Value = serde_json::from_str(json).ok()?;
    let name = v.get("name")?.as_str()?.to_owned();
    let arguments = v.get(key).filter(|a| a.is_object())?;
    let head = format!("{{\"name\": {}, \"{key}\": ", Value::from(name.as_str()));
    let written = json.strip_prefix(&head).and_then(|rest| rest.strip_suffix('}'));
    let arguments = written.map_or_else(|| arguments.to_string(), str::to_owned);
    Some(ParsedCall { name, arguments })
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
        assert_eq!((calls[0].name.as_str(), calls[0].arguments.as_str()), ("f", "{\"a\": 1}"));
        assert_eq!(calls[1].name, "g");
        // Cut short, or text: not calls.
        assert_eq!(ToolFormat::Hermes.parse(&hermes[..40]), None);
        assert_eq!(ToolFormat::Hermes.parse("Hello"), None);
        let llama = ToolFormat::Llama3.parse("{\"name\": \"f\", \"parameters\": {\"x\": \"y\"}}").unwrap();
        assert_eq!(llama, vec![ParsedCall { name: "f".into(), arguments: "{\"x\": \"y\"}".into() }]);
        // Another layout parses too.
        let other = ToolFormat::Llama3.parse("{\"parameters\":{\"x\":1},\"name\":\"f\"}").unwrap();
        assert_eq!(other, vec![ParsedCall { name: "f".into(), arguments: "{\"x\":1}".into() }]);
        assert_eq!(ToolFormat::Llama3.parse("{\"name\": \"f\""), None);
    }

    /// Read a token at a time, the pieces put together are the calls `parse` reads from the whole reply.
    #[test]
    fn calls_read_piece_by_piece_are_the_whole_calls() {
        let hermes = "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"a\": {\"b\": \"}\"}}}\n</tool_call>\n<tool_call>\n{\"name\": \"g\", \"arguments\": {}}\n</tool_call>";
        let llama = "{\"name\": \"f\", \"parameters\": {\"x\": [1, {}]}}";
        for (format, text) in [(ToolFormat::Hermes, hermes), (ToolFormat::Llama3, llama)] {
            for step in [1, 2, 3, 7, 1000] {
                let mut reader = CallReader::new(format);
                let mut pieces = Vec::new();
                let chars: Vec<char> = text.chars().collect();
                for chunk in chars.chunks(step) {
                    pieces.extend(reader.push(&chunk.iter().collect::<String>()));
                }
                let mut calls: Vec<(String, String)> = Vec::new();
                for piece in pieces {
                    match piece {
                        CallPiece::Start { index, name } => {
                            assert_eq!(index, calls.len());
                            calls.push((name, String::new()));
                        }
                        CallPiece::Arguments { index, text } => calls[index].1.push_str(&text),
                    }
                }
                let want: Vec<(String, String)> =
                    format.parse(text).unwrap().into_iter().map(|c| (c.name, c.arguments)).collect();
                assert_eq!(calls, want, "{format:?}, {step} chars at a time");
            }
        }
    }
}
