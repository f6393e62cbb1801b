//! `bitnet chat`: a conversation in the terminal, as llama-cli and Ollama's REPL behave.
//!
//! - Ctrl+C stops the reply being written and keeps the conversation; at the prompt it only reminds how to
//!   leave; twice within a second it exits. Ctrl+D (end of input) and `/exit` end the chat.
//! - A line ending in `\` continues on the next line; a line `"""` starts a block that ends at a line ending
//!   in `"""` (for pasted text).
//! - Commands: `/clear`, `/system TEXT`, `/save FILE`, `/exit`, `/help`.
//! - When the conversation outgrows the context, the oldest turns are dropped (said on stderr); the system
//!   message stays.

use std::io::{BufRead, Write};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bitnet_engine::text::chat::ChatMessage;
use bitnet_engine::Error;

use crate::model_file::Loaded;
use crate::{print_stats, stream_to_stdout, ChatArgs};

const HELP: &str = "commands: /clear (forget the conversation), /system TEXT (set the system message; empty: none), \
/save FILE (the conversation as JSON), /exit; a line ending in \\ continues, \"\"\" starts and ends a block; \
Ctrl+C stops a reply, twice exits";

pub fn chat(a: ChatArgs) -> Result<(), Error> {
    let params = a.sampling.gen_params()?;
    let m = Loaded::open(&a.model)?;
    let schema = crate::Schema::load(&a.sampling, &m)?;
    let mut session = m.session()?;
    let mut messages: Vec<ChatMessage> = a.system.iter().map(|s| message("system", s)).collect();
    let interactive = std::io::IsTerminal::is_terminal(&std::io::stdin());
    let ctrl_c = CtrlC::watch()?;
    let mut lines = std::io::stdin().lock().lines();
    while let Some(input) = read_message(&mut lines, interactive)? {
        if input.trim().is_empty() {
            continue;
        }
        if input.starts_with('/') {
            match command(&input, &mut messages) {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    eprintln!("{e}");
                    continue;
                }
            }
        }
        messages.push(message("user", &input));
        let Some(prompt) = fit_history(&m, &mut messages, session.ctx(), params.max_tokens)? else {
            eprintln!("error: the message does not fit in the context of {} tokens", session.ctx());
            messages.pop();
            continue;
        };
        let (mut reply, mut interrupted) = (String::new(), false);
        ctrl_c.generating.store(true, Relaxed);
        let mut constrained = Ok(());
        let setup = |gen: &mut bitnet_engine::generate::Generation| constrained = crate::Schema::apply(&schema, gen);
        let stats = session.generate_with(&m.tokenizer, &prompt, &params, setup, &mut |t| {
            if ctrl_c.stop.swap(false, Relaxed) {
                interrupted = true;
                return false;
            }
            reply.push_str(t);
            stream_to_stdout(t)
        });
        ctrl_c.generating.store(false, Relaxed);
        // A Ctrl+C that came after the last piece of text: the reply was over anyway.
        ctrl_c.stop.store(false, Relaxed);
        let stats = stats?;
        constrained?;
        println!();
        if interrupted {
            eprintln!("(reply stopped)");
        }
        if interactive {
            print_stats(&stats, &params);
        }
        // What was written stays in the conversation, a reply stopped by Ctrl+C included.
        messages.push(message("assistant", reply.trim()));
    }
    Ok(())
}

fn message(role: &str, content: &str) -> ChatMessage {
    ChatMessage::new(role, content)
}

/// Runs a `/command`; Ok(false) to end the chat, an error for a command that is not one.
fn command(input: &str, messages: &mut Vec<ChatMessage>) -> Result<bool, String> {
    let (name, arg) = input.split_once(char::is_whitespace).unwrap_or((input, ""));
    let arg = arg.trim();
    match name {
        "/exit" | "/quit" | "/bye" => return Ok(false),
        "/help" | "/?" => eprintln!("{HELP}"),
        "/clear" => {
            messages.retain(|m| m.role == "system");
            eprintln!("(conversation cleared)");
        }
        "/system" => {
            messages.retain(|m| m.role != "system");
            if arg.is_empty() {
                eprintln!("(no system message)");
            } else {
                messages.insert(0, message("system", arg));
                eprintln!("(system message set)");
            }
        }
        "/save" if !arg.is_empty() => {
            let json: Vec<_> =
                messages.iter().map(|m| serde_json::json!({ "role": m.role, "content": m.content })).collect();
            let text = serde_json::to_string_pretty(&serde_json::json!({ "messages": json })).unwrap_or_default();
            match std::fs::write(arg, text + "\n") {
                Ok(()) => eprintln!("(saved {} messages to {arg})", messages.len()),
                Err(e) => return Err(format!("error: /save {arg}: {e}")),
            }
        }
        "/save" => return Err("usage: /save FILE".into()),
        _ => return Err(format!("unknown command {name} ({HELP})")),
    }
    Ok(true)
}

/// One message from the input; None at its end. A line ending in `\` continues on the next; a line that is
/// `"""` (or starts with it) opens a block closed by a line ending in `"""`.
fn read_message(
    lines: &mut impl Iterator<Item = std::io::Result<String>>,
    interactive: bool,
) -> Result<Option<String>, Error> {
    let mut next = |prompt: &str| -> Result<Option<String>, Error> {
        if interactive {
            eprint!("{prompt}");
            let _ = std::io::stderr().flush();
        }
        lines.next().transpose().map_err(|e| Error::Invalid(format!("reading stdin: {e}")))
    };
    let Some(first) = next("> ")? else { return Ok(None) };
    if let Some(rest) = first.strip_prefix("\"\"\"") {
        // A block: its lines up to the closing quotes (the opening line counts only if it has text).
        let mut block: Vec<String> = Vec::new();
        let mut line = rest.to_string();
        let mut opening = true;
        loop {
            if let Some(last) = line.strip_suffix("\"\"\"") {
                // A closing line of only quotes adds no line of its own.
                if !last.is_empty() || block.is_empty() {
                    block.push(last.to_string());
                }
                return Ok(Some(block.join("\n")));
            }
            if !(opening && line.is_empty()) {
                block.push(line);
            }
            opening = false;
            match next("... ")? {
                Some(l) => line = l,
                None => return Ok(Some(block.join("\n"))),
            }
        }
    }
    let mut text = String::new();
    let mut line = first;
    while let Some(part) = line.strip_suffix('\\') {
        text.push_str(part);
        text.push('\n');
        match next("... ")? {
            Some(l) => line = l,
            None => return Ok(Some(text)),
        }
    }
    text.push_str(&line);
    Ok(Some(text))
}

/// The conversation's prompt, with the oldest turns forgotten (the system message kept, and said on stderr)
/// until it leaves room for a reply of up to half the context; None if even the last message alone does not
/// fit.
fn fit_history(
    m: &Loaded,
    messages: &mut Vec<ChatMessage>,
    ctx: usize,
    max_reply: usize,
) -> Result<Option<Vec<u32>>, Error> {
    let room = max_reply.clamp(1, ctx / 2);
    let mut dropped = 0;
    let prompt = loop {
        let prompt = m.tokenizer.encode_chat(messages, true)?;
        if prompt.len() + room <= ctx {
            break Some(prompt);
        }
        let first_turn = messages.iter().position(|msg| msg.role != "system");
        match first_turn {
            // Never the message just typed, which is the last.
            Some(i) if i + 1 < messages.len() => {
                messages.remove(i);
                dropped += 1;
            }
            _ => break None,
        }
    };
    if dropped > 0 {
        eprintln!("(the conversation outgrew the context of {ctx} tokens: dropped the {dropped} oldest messages)");
    }
    Ok(prompt)
}

/// Ctrl+C while chatting: stops the reply being generated; at the prompt, says how to leave; a second one
/// within a second exits (status 130, as a shell reports SIGINT).
struct CtrlC {
    /// A reply is being generated (Ctrl+C stops it rather than reminding how to exit).
    generating: AtomicBool,
    /// Set by Ctrl+C during a reply; the generation callback takes it.
    stop: AtomicBool,
}

impl CtrlC {
    /// Catches SIGINT from now on, on a thread of its own (tokio's signal handling, already a dependency).
    fn watch() -> Result<Arc<CtrlC>, Error> {
        let state = Arc::new(CtrlC { generating: AtomicBool::new(false), stop: AtomicBool::new(false) });
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Error::Invalid(format!("signal handling: {e}")))?;
        // Installed before returning, so that no Ctrl+C falls between and kills the process.
        let signals = {
            let _in_runtime = rt.enter();
            #[cfg(unix)]
            let signals = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt());
            #[cfg(windows)]
            let signals = tokio::signal::windows::ctrl_c();
            signals
        };
        let mut signals = signals.map_err(|e| Error::Invalid(format!("signal handling: {e}")))?;
        let watched = state.clone();
        let last = Mutex::new(None::<Instant>);
        std::thread::Builder::new()
            .name("ctrl-c".into())
            .spawn(move || {
                rt.block_on(async move {
                    while signals.recv().await.is_some() {
                        let now = Instant::now();
                        let previous = last.lock().map(|mut l| l.replace(now)).unwrap_or(None);
                        if previous.is_some_and(|p| now - p < Duration::from_secs(1)) {
                            eprintln!();
                            std::process::exit(130);
                        }
                        if watched.generating.load(Relaxed) {
                            watched.stop.store(true, Relaxed);
                        } else {
                            eprint!("\n(Ctrl+C again to exit, or /exit)\n> ");
                        }
                    }
                })
            })
            .map_err(|e| Error::Invalid(format!("signal handling: {e}")))?;
        Ok(state)
    }
}
