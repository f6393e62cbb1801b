//! A GGUF file described for people (`bitnet info`, Python's `Model.info`): its metadata, the choices the
//! engine makes about the model, and the tensor table.

use std::fmt::Write;

use crate::backend::KvType;
use crate::format::gguf::{GgufFile, Value};
use crate::model::{Config, LoadOptions};
use crate::text::tokenizer::Tokenizer;
use crate::Result;

/// The report of the GGUF file in `bytes`, one line per item; an error only when the file is not GGUF.
/// A model the engine cannot run is still described, with the reason.
pub fn report(bytes: &[u8]) -> Result<String> {
    let g = GgufFile::parse(bytes)?;
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = write_report(&mut out, &g, bytes.len());
    Ok(out)
}

fn write_report(out: &mut String, g: &GgufFile, n_bytes: usize) -> std::fmt::Result {
    writeln!(
        out,
        "GGUF v{}, {n_bytes} bytes, {} metadata keys, {} tensors, alignment {}",
        g.version,
        g.metadata.len(),
        g.tensors.len(),
        g.alignment
    )?;
    writeln!(out, "\nmetadata:")?;
    for (k, v) in &g.metadata {
        writeln!(out, "  {k:<45} {}", show_value(v))?;
    }
    match Config::from_gguf(g, &LoadOptions::default()) {
        Ok(c) => {
            writeln!(
                out,
                "\nmodel: arch {}, {} layers, embd {}, ff {}, heads {}/{} (kv), head dim {}, vocab {}, context {}",
                c.arch, c.n_layer, c.n_embd, c.n_ff, c.n_head, c.n_head_kv, c.head_dim, c.n_vocab, c.n_ctx_train
            )?;
            if let Ok((family, why)) = crate::model::Family::detect(g) {
                writeln!(out, "family: {family} ({why})")?;
            }
            writeln!(out, "activation: {} ({})", c.activation, c.activation_reason)?;
            let per_token: Vec<String> = [KvType::F32, KvType::F16, KvType::Q8_0]
                .iter()
                .map(|t| format!("{} {} B", t.name(), t.bytes_per_token(&c)))
                .collect();
            writeln!(out, "KV cache per token of context: {}", per_token.join(", "))?;
        }
        Err(e) => writeln!(out, "\nmodel: not runnable: {e}")?,
    }
    match Tokenizer::from_metadata(&g.metadata) {
        Ok(t) => {
            let kind = if t.model() == "llama" { "SentencePiece BPE" } else { "byte-level BPE" };
            writeln!(
                out,
                "tokenizer: {} ({kind}), {} tokens, pre-tokenizer {}, add BOS {}",
                t.model(),
                t.vocab_size(),
                t.pre(),
                t.add_bos()
            )?;
            match t.template_choice() {
                (Some(template), why) => writeln!(out, "chat template: {} bytes ({why})", template.len())?,
                (None, why) => writeln!(out, "chat template: {why}")?,
            }
        }
        Err(e) => writeln!(out, "tokenizer: unusable: {e}")?,
    }
    writeln!(out, "\n{:<32} {:<6} {:<18} {:>12}", "tensor", "type", "shape", "bytes")?;
    for t in &g.tensors {
        writeln!(out, "{:<32} {:<6} {:<18} {:>12}", t.name, t.ty.name(), format!("{:?}", t.dims), t.size)?;
    }
    Ok(())
}

/// A metadata value for humans: long strings and arrays are summarized.
pub fn show_value(v: &Value) -> String {
    match v {
        Value::Str(s) if s.len() > 80 => format!("{:?}... ({} bytes)", &s[..s.floor_char_boundary(60)], s.len()),
        Value::Str(s) => format!("{s:?}"),
        Value::Array(a) if a.len() > 8 => {
            let head: Vec<String> = a.iter().take(3).map(show_value).collect();
            format!("[{} items: {}, ...]", a.len(), head.join(", "))
        }
        Value::Array(a) => format!("[{}]", a.iter().map(show_value).collect::<Vec<_>>().join(", ")),
        Value::Bool(b) => b.to_string(),
        Value::F32(x) => x.to_string(),
        Value::F64(x) => x.to_string(),
        // The integer types; negative ones through f64, which holds every i32 exactly.
        other => {
            other.as_u64().map(|n| n.to_string()).or_else(|| other.as_f64().map(|x| x.to_string())).unwrap_or_default()
        }
    }
}
