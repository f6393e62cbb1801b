//! `bitnet bench`: prompt processing and generation speed, measured as llama-bench does:
//! `pp`: a prompt of `p` tokens evaluated from an empty cache; `tg`: `n` tokens generated one at a
//! time, each with its logits. One warm-up run, then `r` repetitions; mean and standard deviation.

use std::time::Instant;

use bitnet_engine::backend::{Step, Want};
use bitnet_engine::Error;
use clap::Args;

use crate::model_file::Loaded;
use crate::ModelArgs;

#[derive(Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompt tokens for the prompt-processing test (0 skips it).
    #[arg(short = 'p', long = "n-prompt", default_value_t = 128)]
    n_prompt: usize,
    /// Tokens for the generation test (0 skips it).
    #[arg(short = 'n', long = "n-gen", default_value_t = 64)]
    n_gen: usize,
    /// Repetitions.
    #[arg(short = 'r', long = "repetitions", default_value_t = 5)]
    reps: usize,
    /// Sequences that generate together for the `tg` test, one batched step for all of them per token (as
    /// `bitnet serve` steps its slots): tokens/s is then their total.
    #[arg(short = 'b', long = "batch", default_value_t = 1)]
    batch: usize,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

/// Mean and standard deviation of tokens/s over the repetitions.
fn stats(samples: &[f64]) -> (f64, f64) {
    let n = samples.len() as f64;
    let mean = samples.iter().sum::<f64>() / n;
    let var = samples.iter().map(|s| (s - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    (mean, var.sqrt())
}

pub fn bench(a: BenchArgs) -> Result<(), Error> {
    if a.reps == 0 {
        return Err(Error::Invalid("--repetitions must be at least 1".into()));
    }
    let m = Loaded::open(&a.model)?;
    let mut session = m.session()?;
    // Saturating: a huge -n is refused by the check below, not an overflow.
    let needed = a.n_prompt.max(a.n_gen.saturating_add(1));
    if needed > session.ctx() {
        return Err(Error::ContextFull { needed, ctx: session.ctx() });
    }
    let vocab = m.weights.config().n_vocab as u64;
    // Fixed pseudo-random tokens: the speed does not depend on which tokens they are.
    let tokens: Vec<u32> = (0..needed as u64).map(|i| ((i * 7919 + 13) % vocab) as u32).collect();
    let mut run = |pp: bool| -> Result<f64, Error> {
        session.truncate(0);
        let t = Instant::now();
        let n = if pp {
            session.prefill(&tokens[..a.n_prompt])?;
            a.n_prompt
        } else {
            for &tok in &tokens[..a.n_gen] {
                session.push(&[tok], Want::Logits)?;
            }
            a.n_gen
        };
        Ok(n as f64 / t.elapsed().as_secs_f64())
    };
    let mut measure = |pp: bool, n: usize| -> Result<Option<(f64, f64)>, Error> {
        if n == 0 {
            return Ok(None);
        }
        run(pp)?; // warm-up
        let samples = (0..a.reps).map(|_| run(pp)).collect::<Result<Vec<_>, _>>()?;
        Ok(Some(stats(&samples)))
    };
    let pp = measure(true, a.n_prompt)?;
    let tg = if a.batch > 1 && a.n_gen > 0 { Some(batched_tg(&m, &a, &tokens)?) } else { measure(false, a.n_gen)? };
    let threads = m.threads;
    if a.json {
        let entry =
            |n: usize, s: Option<(f64, f64)>| s.map(|(tps, sd)| serde_json::json!({"n": n, "tps": tps, "sd": sd}));
        let out = serde_json::json!({
            "threads": threads,
            "backend": session.backend_name(),
            "pp": entry(a.n_prompt, pp),
            "tg": entry(a.n_gen, tg),
            "batch": a.batch,
        });
        println!("{out}");
    } else {
        println!("| backend | threads | test | tokens/s |");
        println!("| --- | --- | --- | --- |");
        let batch = if a.batch > 1 { format!(" x{}", a.batch) } else { String::new() };
        for (name, n, s, b) in [("pp", a.n_prompt, pp, ""), ("tg", a.n_gen, tg, &batch[..])] {
            if let Some((tps, sd)) = s {
                println!("| {} | {threads} | {name}{n}{b} | {tps:.2} ± {sd:.2} |", session.backend_name());
            }
        }
    }
    Ok(())
}

/// The `tg` test for `a.batch` sequences stepped together through the device's batcher, each generating
/// `a.n_gen` tokens with their logits: mean and standard deviation of the total tokens/s.
fn batched_tg(m: &Loaded, a: &BenchArgs, tokens: &[u32]) -> Result<(f64, f64), Error> {
    let mut seqs = (0..a.batch).map(|_| m.weights.clone().sequence(a.n_gen + 1)).collect::<Result<Vec<_>, _>>()?;
    let mut batcher = m.weights.clone().batcher(a.batch);
    let mut run = || -> Result<f64, Error> {
        let t = Instant::now();
        for (pos, tok) in tokens[..a.n_gen].iter().enumerate() {
            let tok = std::slice::from_ref(tok);
            let mut steps: Vec<Step<'_>> =
                seqs.iter_mut().map(|s| Step { seq: s.as_mut(), tokens: tok, pos, want: Want::Logits }).collect();
            batcher.forward(&mut steps)?;
        }
        Ok((a.batch * a.n_gen) as f64 / t.elapsed().as_secs_f64())
    };
    run()?; // warm-up
    let samples = (0..a.reps).map(|_| run()).collect::<Result<Vec<_>, _>>()?;
    Ok(stats(&samples))
}
