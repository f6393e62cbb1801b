//! `bitnet convert` (Hugging Face folder → GGUF) and `bitnet quantize` (GGUF → GGUF with other weight types).
//! The engine does the work on byte slices; this file maps the files, shows progress, and writes the result to
//! `OUT.tmp` before renaming it, so an interrupted run never leaves a truncated model behind.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use bitnet_engine::convert::{self, ConvertOptions, Converted, HfCheckpoint, HfTokenizer};
use bitnet_engine::format::quant::GgmlType;
use bitnet_engine::Error;
use clap::Args;

#[derive(Args)]
pub struct ConvertArgs {
    /// Hugging Face model folder: config.json, tokenizer.json (or a SentencePiece tokenizer.model alone),
    /// [tokenizer_config.json], model.safetensors (or shards listed by model.safetensors.index.json).
    hf_dir: PathBuf,
    /// Output GGUF file.
    #[arg(short, long)]
    output: PathBuf,
    /// Storage of the ternary weights: i2_s, tq2_0 or tq1_0 (TQ types need rows that are multiples of 256).
    #[arg(long = "type", default_value = "i2_s", value_parser = parse_ternary)]
    ty: GgmlType,
    /// Storage of the embedding (and of an untied LM head): f16, bf16, f32, q8_0, q6_k, q5_0, q4_0 or q4_k.
    #[arg(long, default_value = "f16", value_parser = parse_float)]
    embd: GgmlType,
    /// Convert even if config.json does not declare a BitNet model (its float weights get ternarized).
    #[arg(long)]
    force: bool,
    /// general.name (default: the folder's name).
    #[arg(long)]
    name: Option<String>,
}

#[derive(Args)]
pub struct QuantizeArgs {
    /// Input GGUF model.
    input: PathBuf,
    /// Output GGUF file.
    output: PathBuf,
    /// Storage of the ternary weights: i2_s, tq2_0 or tq1_0.
    #[arg(long = "type", value_parser = parse_ternary)]
    ty: GgmlType,
    /// Also re-encode the embedding (and an untied LM head): f16, bf16, f32, q8_0, q6_k, q5_0, q4_0 or q4_k.
    #[arg(long, value_parser = parse_float)]
    embd: Option<GgmlType>,
    /// Allow a non-BitNet architecture, and re-quantizing an already quantized embedding.
    #[arg(long)]
    force: bool,
}

fn parse_ternary(s: &str) -> Result<GgmlType, String> {
    GgmlType::parse(s)
        .filter(|t| matches!(t, GgmlType::I2_S | GgmlType::TQ2_0 | GgmlType::TQ1_0))
        .ok_or_else(|| format!("'{s}' is not a ternary type (i2_s, tq2_0, tq1_0)"))
}

fn parse_float(s: &str) -> Result<GgmlType, String> {
    GgmlType::parse(s)
        .filter(|t| !matches!(t, GgmlType::I2_S | GgmlType::TQ2_0 | GgmlType::TQ1_0))
        .ok_or_else(|| format!("'{s}' is not an embedding type (f16, bf16, f32, q8_0, q6_k, q5_0, q4_0, q4_k)"))
}

fn io_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Invalid(format!("{}: {e}", path.display()))
}

fn map(path: &Path) -> Result<memmap2::Mmap, Error> {
    let file = File::open(path).map_err(|e| io_err(path, e))?;
    // SAFETY: the file is only read; if another process truncates it while mapped, reads fault.
    unsafe { memmap2::Mmap::map(&file) }.map_err(|e| io_err(path, e))
}

fn read_text(path: &Path) -> Result<String, Error> {
    std::fs::read_to_string(path).map_err(|e| io_err(path, e))
}

/// The safetensors files of a folder: `model.safetensors`, or the shards its index names.
fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>, Error> {
    let index = dir.join("model.safetensors.index.json");
    if !index.exists() {
        return Ok(vec![dir.join("model.safetensors")]);
    }
    let j: serde_json::Value = serde_json::from_str(&read_text(&index)?).map_err(|e| io_err(&index, e))?;
    let map = j["weight_map"].as_object().ok_or_else(|| io_err(&index, "no weight_map"))?;
    let mut files: Vec<&str> = map.values().filter_map(serde_json::Value::as_str).collect();
    files.sort_unstable();
    files.dedup();
    Ok(files.into_iter().map(|f| dir.join(f)).collect())
}

fn progress_bar(what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(1);
    let style =
        indicatif::ProgressStyle::with_template(&format!("{what} {{bar:40}} {{pos}}/{{len}} tensors [{{elapsed}}]"));
    bar.set_style(style.expect("valid template"));
    bar
}

/// Runs a conversion with a progress bar, prints its warnings and writes the result.
fn run(
    what: &str,
    output: &Path,
    work: impl FnOnce(&mut dyn FnMut(usize, usize)) -> Result<Converted, Error>,
) -> Result<(), Error> {
    let bar = progress_bar(what);
    let out = work(&mut |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    });
    bar.finish_and_clear();
    let out = out?;
    for w in &out.warnings {
        eprintln!("warning: {w}");
    }
    let mut tmp = output.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let written = File::create(&tmp).and_then(|f| {
        let mut w = BufWriter::new(f);
        out.gguf.write_to(&mut w)?;
        w.flush()
    });
    if let Err(e) = written.and_then(|()| std::fs::rename(&tmp, output)) {
        let _ = std::fs::remove_file(&tmp);
        return Err(io_err(output, e));
    }
    let size = std::fs::metadata(output).map_or(0, |m| m.len());
    eprintln!("wrote {} ({:.1} MB)", output.display(), size as f64 / 1e6);
    Ok(())
}

pub fn convert(a: ConvertArgs) -> Result<(), Error> {
    let dir = &a.hf_dir;
    let config = read_text(&dir.join("config.json"))?;
    // tokenizer.json, or else a SentencePiece tokenizer.model alone (LLaMA-style folders such as 1bitLLM's).
    let (json_path, model_path) = (dir.join("tokenizer.json"), dir.join("tokenizer.model"));
    let spm = if !json_path.exists() && model_path.exists() {
        Some(std::fs::read(&model_path).map_err(|e| io_err(&model_path, e))?)
    } else {
        None
    };
    let json = if spm.is_none() { read_text(&json_path)? } else { String::new() };
    let tokenizer_config_path = dir.join("tokenizer_config.json");
    let tokenizer_config = if tokenizer_config_path.exists() { Some(read_text(&tokenizer_config_path)?) } else { None };
    let maps = safetensors_files(dir)?.iter().map(|p| map(p)).collect::<Result<Vec<_>, _>>()?;
    let shards: Vec<&[u8]> = maps.iter().map(|m| &m[..]).collect();
    let ckpt = HfCheckpoint {
        config_json: &config,
        tokenizer: match &spm {
            Some(model) => HfTokenizer::SentencePiece(model),
            None => HfTokenizer::Json(&json),
        },
        tokenizer_config_json: tokenizer_config.as_deref(),
        shards: &shards,
    };
    let name = a.name.or_else(|| dir.canonicalize().ok()?.file_name()?.to_str().map(str::to_owned));
    let opts = ConvertOptions { ternary: a.ty, embd: a.embd, force: a.force, name };
    run("converting", &a.output, |progress| convert::convert(&ckpt, &opts, progress))
}

pub fn quantize(a: QuantizeArgs) -> Result<(), Error> {
    let bytes = map(&a.input)?;
    run("quantizing", &a.output, |progress| convert::requantize(&bytes, a.ty, a.embd, a.force, progress))
}
