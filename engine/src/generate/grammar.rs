//! Constrained generation (structured output): at each step only the tokens that keep the text valid for
//! a grammar may be picked, so a JSON schema's output always parses and validates (unless the token limit
//! cuts it short). The grammar engine is llguidance, which llama.cpp and mistral.rs use too: it turns a
//! JSON schema or a Lark grammar into a token mask per step, quickly enough for every step.
//!
//! [`Grammars`] is built once per tokenizer (a trie of the vocabulary; a fraction of a second for 128k
//! tokens); each request gets a [`Constraint`] from it, which [`super::Generation`] applies.

use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{ApproximateTokEnv, TokEnv, TokRxInfo, TokTrie};
use llguidance::{Matcher, ParserFactory};

use crate::text::tokenizer::Tokenizer;
use crate::{Error, Result};

/// What the output must be.
#[derive(Clone, Debug)]
pub enum GrammarSpec {
    /// Any JSON object (OpenAI's `response_format: {"type": "json_object"}`).
    JsonObject,
    /// JSON valid against this JSON schema.
    JsonSchema(serde_json::Value),
    /// A grammar in llguidance's Lark syntax.
    Lark(String),
}

/// OpenAI's `response_format`: `{"type": "text" | "json_object" | "json_schema", "json_schema": {...}}`.
#[derive(Clone, Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResponseFormat {
    #[serde(rename = "type")]
    pub kind: String,
    pub json_schema: Option<JsonSchemaFormat>,
}

/// OpenAI's `json_schema` object; `name`, `description` and `strict` are accepted (the output always follows
/// the schema, as `strict: true` asks).
#[derive(Clone, Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonSchemaFormat {
    pub name: Option<String>,
    pub description: Option<String>,
    pub schema: Option<serde_json::Value>,
    pub strict: Option<bool>,
}

impl GrammarSpec {
    /// What a request's `response_format` (OpenAI's) or `grammar` (llama-server's field, a Lark grammar here)
    /// asks for, with the field it came from; None for free text. The one reading of these fields for the
    /// server and the browser; the error is a message about `response_format`.
    pub fn from_request(
        format: Option<&ResponseFormat>,
        grammar: Option<&str>,
    ) -> std::result::Result<Option<(GrammarSpec, &'static str)>, String> {
        let format = match (format, grammar) {
            (Some(f), Some(_)) if f.kind != "text" => {
                return Err("response_format and grammar cannot be combined: give one".into())
            }
            (_, Some(lark)) => return Ok(Some((GrammarSpec::Lark(lark.to_string()), "grammar"))),
            (Some(f), None) => f,
            (None, None) => return Ok(None),
        };
        let spec = match (format.kind.as_str(), &format.json_schema) {
            ("text", None) => return Ok(None),
            ("json_object", None) => GrammarSpec::JsonObject,
            ("json_schema", Some(f)) => match &f.schema {
                Some(schema @ (serde_json::Value::Object(_) | serde_json::Value::Bool(_))) => {
                    GrammarSpec::JsonSchema(schema.clone())
                }
                _ => return Err("response_format.json_schema.schema must be a JSON schema (an object)".into()),
            },
            ("json_schema", None) => return Err("response_format of type json_schema needs json_schema".into()),
            ("text" | "json_object", Some(_)) => {
                return Err(format!("response_format of type {} takes no json_schema", format.kind))
            }
            (other, _) => {
                return Err(format!("response_format type '{other}' is not supported (text, json_object, json_schema)"))
            }
        };
        Ok(Some((spec, "response_format")))
    }
}

/// The grammar engine for one tokenizer.
pub struct Grammars {
    factory: ParserFactory,
}

impl Grammars {
    pub fn new(tok: &Tokenizer) -> Result<Self> {
        let eos =
            tok.eos().ok_or_else(|| Error::Invalid("structured output needs a model with an EOS token".into()))?;
        let info = TokRxInfo {
            vocab_size: tok.vocab_size() as u32,
            tok_eos: eos,
            tok_bos: tok.bos(),
            tok_pad: None,
            tok_unk: None,
            tok_end_of_turn: None,
        };
        // Control tokens are marked as such (never text a grammar can produce).
        let words: Vec<Vec<u8>> = (0..tok.vocab_size() as u32)
            .map(|id| match tok.is_special(id) {
                true => [&[TokTrie::SPECIAL_TOKEN_MARKER][..], &tok.token_bytes(id)].concat(),
                false => tok.token_bytes(id),
            })
            .collect();
        let env: TokEnv = Arc::new(ApproximateTokEnv::new(TokTrie::from(&info, &words)));
        let mut factory = ParserFactory::new_simple(&env).map_err(grammar_error)?;
        // Grammar problems are returned as errors, not printed.
        factory.quiet();
        Ok(Grammars { factory })
    }

    /// A fresh constraint for one generation; an error for a schema or grammar llguidance cannot compile.
    pub fn constraint(&self, spec: &GrammarSpec) -> Result<Constraint> {
        let grammar = match spec {
            GrammarSpec::JsonObject => {
                TopLevelGrammar::from_json_schema(compact(serde_json::json!({ "type": "object" })))
            }
            GrammarSpec::JsonSchema(schema) => TopLevelGrammar::from_json_schema(compact(schema.clone())),
            GrammarSpec::Lark(lark) => TopLevelGrammar::from_lark(lark.clone()),
        };
        let parser = self.factory.create_parser(grammar).map_err(grammar_error)?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(Error::Invalid(format!("the grammar does not compile: {e}")));
        }
        Ok(Constraint { matcher })
    }
}

/// The schema with compact JSON as the default layout (no whitespace between tokens: a small model left free
/// to add whitespace may pad forever); a schema's own `x-guidance` options win.
fn compact(mut schema: serde_json::Value) -> serde_json::Value {
    if let Some(object) = schema.as_object_mut() {
        object.entry("x-guidance").or_insert_with(|| serde_json::json!({ "whitespace_flexible": false }));
    }
    schema
}

fn grammar_error(e: impl std::fmt::Display) -> Error {
    Error::Invalid(format!("the grammar does not compile: {e}"))
}

/// One generation's grammar state.
pub struct Constraint {
    matcher: Matcher,
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Constraint")
    }
}

impl Constraint {
    /// Sets the logits of the tokens the grammar does not allow next to -infinity (once the grammar is
    /// complete, only EOS is allowed).
    pub fn mask(&mut self, logits: &mut [f32]) -> Result<()> {
        let allowed = self.matcher.compute_mask_or_eos().map_err(grammar_error)?;
        for (id, l) in logits.iter_mut().enumerate() {
            if !allowed.is_allowed(id as u32) {
                *l = f32::NEG_INFINITY;
            }
        }
        Ok(())
    }

    /// Advances the grammar past the picked token.
    pub fn accept(&mut self, token: u32) -> Result<()> {
        self.matcher.consume_token(token).map_err(grammar_error)
    }
}
