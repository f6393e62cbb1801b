//! `bitnet`: the native command-line shell over bitnet-engine.

mod bench;
mod chat;
mod convert;
mod device;
mod http;
mod hub;
mod model_file;
mod serve;
mod serve_www;

use std::io::Write;
use std::process::ExitCode;

use bitnet_engine::backend::KvType;
use bitnet_engine::generate::grammar::{GrammarSpec, Grammars};
use bitnet_engine::generate::sampler::SamplerParams;
use bitnet_engine::generate::{perplexity, GenParams, GenStats, Generation};
use bitnet_engine::model::Activation;
use bitnet_engine::Error;
use clap::{Args, Parser, Subcommand};

use model_file::Loaded;

#[derive(Parser)]
#[command(name = "bitnet", version, about = "Run BitNet b1.58 (ternary) language models", propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Continue a prompt, streaming the generated text to stdout.
    Run(RunArgs),
    /// Chat interactively with the model's chat template (/help lists the commands; Ctrl+C stops a reply).
    Chat(ChatArgs),
    /// Show a GGUF file's metadata and tensors.
    Info(InfoArgs),
    /// Print the next-token logits of a prompt as JSON.
    Logits(LogitsArgs),
    /// Print the sentence embedding of a text (embedding models: last-token pooling, unit length).
    Embed(EmbedArgs),
    /// Perplexity of a text file, as llama-perplexity computes it.
    Perplexity(PerplexityArgs),
    /// Prompt-processing and generation speed, as llama-bench measures them.
    Bench(bench::BenchArgs),
    /// Convert a Hugging Face BitNet checkpoint folder to GGUF.
    Convert(convert::ConvertArgs),
    /// Repack a GGUF between ternary types (I2_S, TQ2_0, TQ1_0) or requantize its embedding.
    Quantize(convert::QuantizeArgs),
    /// Serve the browser demo built by `bash web/build.sh` on 127.0.0.1 (with the headers wasm threads need).
    ServeWww(serve_www::ServeWwwArgs),
    /// Serve the model over HTTP with an OpenAI-compatible API (chat, completions, streaming, batching).
    Serve(serve::ServeArgs),
    /// Print a shell completion script: `source <(bitnet completions bash)`, or save it where the shell looks.
    Completions(CompletionsArgs),
    /// List (`bitnet models`) or remove (`bitnet models rm OWNER/REPO[:FILE]`) models fetched with -hf.
    Models(hub::ModelsArgs),
}

#[derive(Args)]
struct CompletionsArgs {
    /// bash, zsh, fish, elvish or powershell.
    shell: clap_complete::Shell,
}

/// How to load and run a model: shared by every subcommand that runs one.
#[derive(Args, Clone)]
pub struct ModelArgs {
    /// GGUF model file (default: the small model embedded in this binary).
    #[arg(short, long)]
    model: Option<std::path::PathBuf>,
    /// A model by name, OWNER/REPO[:FILE.gguf] on the Hugging Face hub (also -hf): downloaded into the hub's
    /// cache, or taken from it (see `bitnet models`). HF_ENDPOINT and HF_TOKEN are honoured.
    #[arg(long, value_name = "OWNER/REPO[:FILE]", conflicts_with = "model")]
    hf: Option<String>,
    /// Worker threads, 1 to the number of CPUs (default: all of them).
    #[arg(short, long, value_parser = parse_threads)]
    threads: Option<usize>,
    /// Context size in tokens (default: the model's, at most 4096).
    #[arg(long)]
    ctx: Option<usize>,
    /// Override the FFN activation (relu2 or silu) read or inferred from the file.
    #[arg(long, value_parser = parse_activation)]
    activation: Option<Activation>,
    /// Requantize the LM head at load: q8_0, or q6_k (rows a multiple of 256). Faster decoding, slightly less accurate.
    ///
    /// The head becomes ggml's Q8_0 or Q6_K encoding of itself and its input int8 per block of 32 values (16 for
    /// q6_k), so the CPU computes the logits with integer dot products and reads about half the bytes of an f16
    /// head. Cost in accuracy, on the default model's held-out prose: perplexity 39.49 -> 39.79 (+0.8%) with q8_0
    /// from its F16 embedding. The default keeps the file's head (exact).
    #[arg(long, value_parser = parse_head)]
    head: Option<bitnet_engine::format::quant::GgmlType>,
    /// KV cache type: f32 (exact), f16 (half the memory; the default) or q8_0 (about a quarter of f32's).
    /// CUDA has every type, wgpu f32 and f16.
    #[arg(long = "kv-type", value_parser = parse_kv_type, default_value = "f16")]
    kv_type: KvType,
    /// Where to run: cpu, wgpu (the best GPU adapter, a CPU-type one such as llvmpipe included), or auto
    /// (a real GPU if there is one, else the CPU).
    #[arg(long, value_enum, default_value_t = device::BackendChoice::Auto)]
    backend: device::BackendChoice,
}

fn parse_threads(s: &str) -> Result<usize, String> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    match s.parse::<usize>() {
        Ok(n) if (1..=cpus).contains(&n) => Ok(n),
        _ => Err(format!("'{s}' is not a thread count from 1 to {cpus} (the CPUs available)")),
    }
}

fn parse_activation(s: &str) -> Result<Activation, String> {
    Activation::parse(s).ok_or_else(|| format!("unknown activation '{s}' (relu2 or silu)"))
}

fn parse_kv_type(s: &str) -> Result<KvType, String> {
    KvType::parse(s).ok_or_else(|| format!("unknown KV cache type '{s}' (f32, f16 or q8_0)"))
}

fn parse_head(s: &str) -> Result<bitnet_engine::format::quant::GgmlType, String> {
    use bitnet_engine::format::quant::GgmlType;
    GgmlType::parse(s)
        .filter(|t| matches!(t, GgmlType::Q8_0 | GgmlType::Q6_K))
        .ok_or_else(|| format!("unknown head type '{s}' (q8_0 or q6_k)"))
}

#[derive(Args)]
struct SamplingArgs {
    /// Tokens to generate.
    #[arg(short = 'n', long = "n-predict", default_value_t = 128)]
    n_predict: usize,
    /// Temperature; 0 = greedy (exact argmax).
    #[arg(long = "temp", default_value_t = 0.8)]
    temperature: f32,
    #[arg(long, default_value_t = 40)]
    top_k: usize,
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    #[arg(long, default_value_t = 0.05)]
    min_p: f32,
    #[arg(long, default_value_t = 1.0)]
    repeat_penalty: f32,
    #[arg(long, default_value_t = 64)]
    repeat_last_n: usize,
    /// Random seed (default: a new one each run, printed with the statistics on stderr).
    #[arg(long)]
    seed: Option<u64>,
    /// Stop before this string (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Constrain the output to JSON valid against the JSON schema in this file (`{"type": "object"}`: any
    /// object), as the server's response_format does.
    #[arg(long, value_name = "FILE")]
    json_schema: Option<std::path::PathBuf>,
    /// Constrain the output to the grammar in this file, in llguidance's Lark syntax (rule `start`), as the
    /// server's `grammar` field does.
    #[arg(long, value_name = "FILE", conflicts_with = "json_schema")]
    grammar: Option<std::path::PathBuf>,
}

impl SamplingArgs {
    fn gen_params(&self) -> Result<GenParams, Error> {
        let seed = self.seed.unwrap_or_else(bitnet_engine::generate::sampler::clock_seed);
        let sampler = SamplerParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repeat_penalty: self.repeat_penalty,
            repeat_last_n: self.repeat_last_n,
            seed,
            ..SamplerParams::default()
        };
        sampler.check()?;
        Ok(GenParams { max_tokens: self.n_predict, stop: self.stop.clone(), sampler })
    }
}

/// `--json-schema FILE` or `--grammar FILE`: the grammar engine for the model's vocabulary and the schema or
/// grammar, from which each generation gets a fresh constraint.
struct Schema {
    grammars: Grammars,
    spec: GrammarSpec,
}

impl Schema {
    fn load(a: &SamplingArgs, m: &Loaded) -> Result<Option<Schema>, Error> {
        let read = |path: &std::path::Path| {
            std::fs::read_to_string(path).map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))
        };
        let spec = match (&a.json_schema, &a.grammar) {
            (Some(path), _) => GrammarSpec::JsonSchema(
                serde_json::from_str(&read(path)?)
                    .map_err(|e| Error::Invalid(format!("{} is not JSON: {e}", path.display())))?,
            ),
            (None, Some(path)) => GrammarSpec::Lark(read(path)?),
            (None, None) => return Ok(None),
        };
        let grammars = Grammars::new(&m.tokenizer)?;
        // A schema or grammar that does not compile fails now, not at the first reply.
        grammars.constraint(&spec).map_err(|e| {
            let path = a.json_schema.as_ref().or(a.grammar.as_ref()).expect("one of them");
            Error::Invalid(format!("{}: {e}", path.display()))
        })?;
        Ok(Some(Schema { grammars, spec }))
    }

    /// Constrains `gen` (nothing without a schema).
    fn apply(schema: &Option<Schema>, gen: &mut Generation) -> Result<(), Error> {
        if let Some(s) = schema {
            gen.constrain(s.grammars.constraint(&s.spec)?);
        }
        Ok(())
    }
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The prompt to continue; `-` reads it from standard input.
    #[arg(short, long, required_unless_present = "file", conflicts_with = "file")]
    prompt: Option<String>,
    /// Read the prompt from this file (one trailing newline is dropped, as llama-cli does).
    #[arg(short, long, value_name = "FILE")]
    file: Option<std::path::PathBuf>,
    #[command(flatten)]
    sampling: SamplingArgs,
}

#[derive(Args)]
struct ChatArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// An optional system message.
    #[arg(long)]
    system: Option<String>,
    #[command(flatten)]
    sampling: SamplingArgs,
}

#[derive(Args)]
struct InfoArgs {
    /// GGUF model file (default: the embedded model).
    #[arg(short, long)]
    model: Option<std::path::PathBuf>,
    /// A model by name, OWNER/REPO[:FILE.gguf] on the Hugging Face hub (also -hf), as for `run`.
    #[arg(long, value_name = "OWNER/REPO[:FILE]", conflicts_with = "model")]
    hf: Option<String>,
    /// List the devices a model can run on instead (GPU adapters, best first, and the CPU).
    #[arg(long)]
    devices: bool,
}

#[derive(Args)]
struct EmbedArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Text to embed.
    #[arg(short, long)]
    prompt: String,
    /// Print one JSON object ({"tokens", "embedding"}) instead of the values one per line.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct LogitsArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Text to evaluate (BOS is added when the model asks for it).
    #[arg(short, long, conflicts_with = "tokens", required_unless_present = "tokens")]
    prompt: Option<String>,
    /// Token ids to evaluate as they are, comma-separated.
    #[arg(long, value_delimiter = ',')]
    tokens: Option<Vec<u32>>,
    /// How many of the largest logits to print.
    #[arg(long, default_value_t = 10)]
    top: usize,
    /// Also print the whole logit vector.
    #[arg(long)]
    all: bool,
    /// Print one JSON object (the only output format; accepted for compatibility with scripts).
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct PerplexityArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The text file to score.
    #[arg(short, long)]
    file: std::path::PathBuf,
}

fn main() -> ExitCode {
    device::quiet_headless_vulkan();
    let mut cli = cli();
    let result = fetch_model(&mut cli.command).and_then(|()| match cli.command {
        Command::Run(a) => run(a),
        Command::Chat(a) => chat::chat(a),
        Command::Info(a) if a.devices => device::list(),
        Command::Info(a) => model_file::info(a.model.as_deref()),
        Command::Logits(a) => logits(a),
        Command::Embed(a) => embed(a),
        Command::Perplexity(a) => perplexity(a),
        Command::Bench(a) => bench::bench(a),
        Command::Convert(a) => convert::convert(a),
        Command::Quantize(a) => convert::quantize(a),
        Command::ServeWww(a) => serve_www::serve_www(a),
        Command::Serve(a) => serve::serve(a),
        Command::Completions(a) => completions(a),
        Command::Models(a) => hub::models(a),
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn print_stats(s: &GenStats, params: &GenParams) {
    let tps = |n: usize, t: std::time::Duration| n as f64 / t.as_secs_f64().max(1e-9);
    eprintln!(
        "[prompt: {} tokens, {:.1} tokens/s | generated: {} tokens, {:.1} tokens/s | stop: {:?} | seed: {}]",
        s.n_prompt_eval,
        tps(s.n_prompt_eval, s.prompt_time),
        s.n_generated,
        tps(s.n_generated, s.gen_time),
        s.stop,
        params.sampler.seed
    );
}

fn stream_to_stdout(text: &str) -> bool {
    let mut out = std::io::stdout().lock();
    // A closed pipe (e.g. `| head`) ends generation quietly.
    out.write_all(text.as_bytes()).and_then(|_| out.flush()).is_ok()
}

fn run(a: RunArgs) -> Result<(), Error> {
    let params = a.sampling.gen_params()?;
    let text = run_prompt(&a)?;
    let m = Loaded::open(&a.model)?;
    let prompt = m.tokenizer.encode(&text, m.tokenizer.add_bos())?;
    let schema = Schema::load(&a.sampling, &m)?;
    let mut session = m.session()?;
    let mut constrained = Ok(());
    let setup = |gen: &mut Generation| constrained = Schema::apply(&schema, gen);
    let stats = session.generate_with(&m.tokenizer, &prompt, &params, setup, &mut stream_to_stdout)?;
    constrained?;
    println!();
    print_stats(&stats, &params);
    Ok(())
}

/// The prompt of `run`: `-p TEXT`, `-p -` (standard input) or `-f FILE`, less one trailing newline when read.
fn run_prompt(a: &RunArgs) -> Result<String, Error> {
    let read = |what: &str, bytes: std::io::Result<Vec<u8>>| {
        let bytes = bytes.map_err(|e| Error::Invalid(format!("{what}: {e}")))?;
        let mut text = String::from_utf8(bytes).map_err(|_| Error::Invalid(format!("{what} is not valid UTF-8")))?;
        if text.ends_with('\n') {
            text.pop();
            if text.ends_with('\r') {
                text.pop();
            }
        }
        Ok(text)
    };
    match (&a.prompt, &a.file) {
        (Some(p), _) if p == "-" => {
            let mut bytes = Vec::new();
            read("standard input", std::io::Read::read_to_end(&mut std::io::stdin(), &mut bytes).map(|_| bytes))
        }
        (Some(p), _) => Ok(p.clone()),
        (None, Some(f)) => read(&f.display().to_string(), std::fs::read(f)),
        (None, None) => Err(Error::Invalid("give a prompt: -p TEXT, -p - (standard input) or -f FILE".into())),
    }
}

/// The command line, every long option also read from `BITNET_<OPTION>` (`--kv-type` from `BITNET_KV_TYPE`):
/// set here on every argument of every subcommand, so that a new option gets its variable too. Flags take
/// `0`, `false`, `no`, `off` (or an empty value) as unset and anything else as set.
fn cli() -> Cli {
    use clap::{CommandFactory, FromArgMatches};
    fn with_env(cmd: clap::Command) -> clap::Command {
        cmd.mut_args(|arg| match arg.get_long() {
            Some(long) if arg.get_env().is_none() && long != "help" && long != "version" => {
                // clap keeps argument settings as 'static: one short string per option, once per run.
                let var: &'static str = Box::leak(format!("BITNET_{}", long.to_uppercase().replace('-', "_")).into());
                let flag = matches!(arg.get_action(), clap::ArgAction::SetTrue);
                let arg = arg.env(var);
                if flag {
                    arg.value_parser(clap::builder::FalseyValueParser::new())
                } else {
                    arg
                }
            }
            _ => arg,
        })
        .mut_subcommands(with_env)
    }
    // llama.cpp spells the hub option `-hf`: clap's short options are one letter, so it is read as `--hf`.
    let args = std::env::args_os().map(|a| if a == "-hf" { "--hf".into() } else { a });
    let matches = with_env(Cli::command()).get_matches_from(args);
    Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
}

/// `--hf NAME`: the model file from the hub's cache (downloaded first if needed) in place of `-m`.
fn fetch_model(command: &mut Command) -> Result<(), Error> {
    let (model, hf) = match command {
        Command::Run(RunArgs { model: a, .. })
        | Command::Chat(ChatArgs { model: a, .. })
        | Command::Logits(LogitsArgs { model: a, .. })
        | Command::Perplexity(PerplexityArgs { model: a, .. })
        | Command::Bench(bench::BenchArgs { model: a, .. })
        | Command::Serve(serve::ServeArgs { model: a, .. }) => (&mut a.model, &a.hf),
        Command::Info(a) => (&mut a.model, &a.hf),
        _ => return Ok(()),
    };
    if let Some(name) = hf {
        *model = Some(hub::fetch(name)?);
    }
    Ok(())
}

fn completions(a: CompletionsArgs) -> Result<(), Error> {
    use clap::CommandFactory;
    clap_complete::generate(a.shell, &mut Cli::command(), "bitnet", &mut std::io::stdout());
    Ok(())
}

fn logits(a: LogitsArgs) -> Result<(), Error> {
    let m = Loaded::open(&a.model)?;
    let tokens = match (&a.prompt, &a.tokens) {
        (Some(p), _) => m.tokenizer.encode(p, m.tokenizer.add_bos())?,
        (None, Some(t)) => t.clone(),
        (None, None) => unreachable!("clap requires one of them"),
    };
    let mut session = m.session()?;
    session.prefill(&tokens)?;
    let logits = session.logits();
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&i, &j| logits[j].total_cmp(&logits[i]).then(i.cmp(&j)));
    let top: Vec<serde_json::Value> = order.iter().take(a.top).map(|&i| serde_json::json!([i, logits[i]])).collect();
    let mut out = serde_json::json!({ "tokens": tokens, "top": top });
    if a.all {
        out["logits"] = serde_json::json!(logits);
    }
    println!("{out}");
    Ok(())
}

/// `bitnet embed`: the engine's last-token pooling, L2-normalized.
fn embed(a: EmbedArgs) -> Result<(), Error> {
    let m = Loaded::open(&a.model)?;
    let mut session = m.session()?;
    let embedding = bitnet_engine::generate::embed::embed(&mut session, &m.tokenizer, &a.prompt)?;
    if a.json {
        println!("{}", serde_json::json!({ "tokens": session.tokens(), "embedding": embedding }));
    } else {
        embedding.iter().for_each(|v| println!("{v}"));
    }
    Ok(())
}

/// `bitnet perplexity`: the engine's llama-perplexity scoring, each window's running value on stderr.
fn perplexity(a: PerplexityArgs) -> Result<(), Error> {
    let m = Loaded::open(&a.model)?;
    let bytes = std::fs::read(&a.file).map_err(|e| Error::Invalid(format!("{}: {e}", a.file.display())))?;
    let text =
        String::from_utf8(bytes).map_err(|_| Error::Invalid(format!("{} is not valid UTF-8", a.file.display())))?;
    let mut session = m.session()?;
    let score = perplexity::perplexity(&mut session, &m.tokenizer, &text, &mut |s| {
        eprint!("[{:.4}]", s.ppl());
        true
    })?;
    eprintln!();
    println!("windows = {}, ctx = {}, scored tokens = {}", score.windows, score.ctx, score.scored);
    println!("PPL = {:.4}", score.ppl());
    Ok(())
}
