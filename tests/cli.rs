//! The `bitnet` command line as people use it: `chat` in a real terminal (a pty driven from Python), `run`'s
//! prompt from a file or standard input, options from `BITNET_*` environment variables, shell completions.

use std::io::Write;
use std::process::{Command, Stdio};

use bitnet_tests::{bitnet, bitnet_bin, bitnet_ok, fixture, repo};

const TINY: &str = "models/tiny-a-i2_s.gguf";

/// Ctrl+C, multi-line input, the commands and a history longer than the context: tests/scripts/chat_pty.py.
#[test]
fn chat_in_a_terminal() {
    let script = repo().join("tests/scripts/chat_pty.py");
    let out = Command::new("python3")
        .arg(&script)
        .arg(bitnet_bin())
        .arg(fixture(TINY))
        .output()
        .expect("python3 is needed for this test");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{} failed:\n{stdout}\n{stderr}", script.display());
    assert!(stdout.contains("chat pty OK"), "{stdout}");
}

/// `run -f FILE` and `run -p -` give what `-p TEXT` gives (one trailing newline dropped, as llama-cli does).
#[test]
fn run_reads_the_prompt_from_a_file_or_stdin() {
    let model = fixture(TINY);
    let m = model.to_str().unwrap();
    let prompt = "Once upon a time there was";
    let args = ["run", "-m", m, "-n", "12", "--temp", "0"];
    let direct = bitnet_ok(&[&args[..], &["-p", prompt]].concat());
    let file = std::env::temp_dir().join(format!("bitnet-prompt-{}.txt", std::process::id()));
    std::fs::write(&file, format!("{prompt}\n")).unwrap();
    assert_eq!(bitnet_ok(&[&args[..], &["-f", file.to_str().unwrap()]].concat()), direct);
    let mut child = Command::new(bitnet_bin())
        .args(args)
        .args(["-p", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(format!("{prompt}\n").as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8(out.stdout).unwrap(), direct);
    let _ = std::fs::remove_file(&file);
    // Neither, both, or a file that is not there: a clear error.
    for (bad, says) in [
        (vec!["run", "-m", m], "--prompt"),
        (vec!["run", "-m", m, "-p", "a", "-f", "x"], "cannot be used with"),
        (vec!["run", "-m", m, "-f", "/nonexistent/prompt.txt"], "/nonexistent/prompt.txt"),
    ] {
        let out = bitnet(&bad);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains(says), "{bad:?}: {stderr}");
    }
}

/// Every option also comes from `BITNET_<OPTION>`; the command line wins over the environment.
#[test]
fn options_come_from_bitnet_environment_variables() {
    let model = fixture(TINY);
    let m = model.to_str().unwrap();
    let direct = bitnet_ok(&["run", "-m", m, "-n", "7", "--temp", "0", "-p", "Once"]);
    let env_run = |vars: &[(&str, &str)], args: &[&str]| {
        let out = Command::new(bitnet_bin()).args(args).envs(vars.iter().copied()).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let vars = [("BITNET_MODEL", m), ("BITNET_N_PREDICT", "7"), ("BITNET_TEMP", "0"), ("BITNET_PROMPT", "Once")];
    assert_eq!(env_run(&vars, &["run"]), direct);
    assert_ne!(env_run(&vars, &["run", "-n", "3"]), direct, "the command line wins");
    // Flags: 1 sets, 0 does not.
    let logits = |all: &str| env_run(&[("BITNET_ALL", all)], &["logits", "-m", m, "-p", "Once"]);
    assert!(logits("1").contains("\"logits\""));
    assert!(!logits("0").contains("\"logits\""));
    // --help names the variables.
    assert!(bitnet_ok(&["serve", "--help"]).contains("BITNET_SHUTDOWN_TIMEOUT"));
}

#[test]
fn shell_completions() {
    let bash = bitnet_ok(&["completions", "bash"]);
    assert!(bash.contains("_bitnet") && bash.contains("serve") && bash.contains("--kv-type"), "{bash}");
    let checked = Command::new("bash").args(["-n", "-c", &bash]).status().expect("bash");
    assert!(checked.success(), "the bash script does not parse");
    assert!(bitnet_ok(&["completions", "zsh"]).contains("#compdef bitnet"));
    assert!(bitnet_ok(&["completions", "fish"]).contains("complete -c bitnet"));
    assert!(!bitnet(&["completions", "tcsh"]).status.success());
}

/// `run --json-schema FILE`: the output parses and follows the schema; a schema that does not compile is an error
/// before anything runs.
#[test]
fn run_with_a_json_schema() {
    let model = fixture(TINY);
    let m = model.to_str().unwrap();
    let dir = std::env::temp_dir().join(format!("bitnet-schema-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let schema = dir.join("schema.json");
    std::fs::write(
        &schema,
        r#"{"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9},
            "color": {"enum": ["red", "blue"]}}, "required": ["n", "color"], "additionalProperties": false}"#,
    )
    .unwrap();
    for temp in ["0", "1.0"] {
        let out = bitnet_ok(&[
            "run",
            "-m",
            m,
            "-p",
            "Data:",
            "-n",
            "60",
            "--temp",
            temp,
            "--seed",
            "2",
            "--json-schema",
            schema.to_str().unwrap(),
        ]);
        let v: serde_json::Value = serde_json::from_str(out.trim_end()).unwrap_or_else(|e| panic!("{e}: {out:?}"));
        assert!((0..=9).contains(&v["n"].as_i64().unwrap()), "{out}");
        assert!(["red", "blue"].contains(&v["color"].as_str().unwrap()), "{out}");
    }
    std::fs::write(&schema, r#"{"type": 5}"#).unwrap();
    let out = bitnet(&["run", "-m", m, "-p", "Data:", "--json-schema", schema.to_str().unwrap()]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("grammar does not compile"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// `run --grammar FILE` and `chat --grammar FILE` (llguidance's Lark): every reply is a sentence of the grammar;
/// a grammar that does not compile is an error naming the file, and --grammar excludes --json-schema.
#[test]
fn run_and_chat_with_a_grammar() {
    let model = fixture(TINY);
    let m = model.to_str().unwrap();
    let dir = std::env::temp_dir().join(format!("bitnet-grammar-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let grammar = dir.join("answer.lark");
    std::fs::write(&grammar, "start: \"Answer: \" NUM \" \" UNIT\nNUM: /[1-9][0-9]{0,2}/\nUNIT: \"cm\" | \"kg\"\n")
        .unwrap();
    let g = grammar.to_str().unwrap();
    // A sentence of the grammar: "Answer: ", 1 to 3 digits not starting with 0, " ", a unit.
    let follows = |line: &str| {
        let Some(rest) = line.strip_prefix("Answer: ") else { return false };
        let Some((num, unit)) = rest.split_once(' ') else { return false };
        let digits = (1..=3).contains(&num.len()) && num.bytes().all(|b| b.is_ascii_digit()) && !num.starts_with('0');
        digits && ["cm", "kg"].contains(&unit)
    };
    for (temp, seed) in [("0", "1"), ("1.0", "2"), ("1.0", "3")] {
        let out =
            bitnet_ok(&["run", "-m", m, "-p", "Size:", "-n", "20", "--temp", temp, "--seed", seed, "--grammar", g]);
        assert!(follows(out.trim_end()), "{out:?}");
    }
    let mut child = Command::new(bitnet_bin())
        .args(["chat", "-m", m, "-n", "20", "--temp", "1.0", "--seed", "4", "-t", "1", "--grammar", g])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    writeln!(stdin, "How tall?\nHow heavy?").unwrap();
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let replies: Vec<&str> = stdout.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(replies.len(), 2, "{stdout:?}");
    assert!(replies.iter().all(|r| follows(r.trim_start_matches("> "))), "{stdout:?}");
    std::fs::write(&grammar, "start: ) (").unwrap();
    let out = bitnet(&["run", "-m", m, "-p", "Data:", "--grammar", g]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("answer.lark") && stderr.contains("grammar does not compile"),
        "{stderr}"
    );
    let out = bitnet(&["run", "-m", m, "-p", "Data:", "--grammar", g, "--json-schema", g]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("cannot be used with"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A running tests/scripts/mock_hub.py (killed when dropped), and its request log.
struct MockHub {
    child: std::process::Child,
    url: String,
    log: std::path::PathBuf,
}

impl MockHub {
    fn start(dir: &std::path::Path, flags: &[&str]) -> MockHub {
        use std::io::BufRead;
        let log = dir.join(format!("hub-{}.log", flags.join("")));
        let mut child = Command::new("python3")
            .arg(repo().join("tests/scripts/mock_hub.py"))
            .arg(dir.join("hub"))
            .arg(&log)
            .args(flags)
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 runs the mock hub");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let url = line.trim().strip_prefix("listening on ").unwrap_or_else(|| panic!("{line:?}")).to_owned();
        MockHub { child, url, log }
    }

    fn requests(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for MockHub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `bitnet ARGS` with the hub's environment variables set.
fn with_hub(args: &[&str], home: &std::path::Path, endpoint: &str, token: &str) -> std::process::Output {
    Command::new(bitnet_bin())
        .args(args)
        .env("HF_HOME", home)
        .env("HF_ENDPOINT", endpoint)
        .env("HF_TOKEN", token)
        .output()
        .unwrap()
}

/// `-hf OWNER/REPO[:FILE]` against a mock hub on loopback: a download cut short fails and resumes from where it
/// stopped (a Range request); the file is the fixture, byte for byte, and runs like it; the token is sent; then the
/// cache works with the hub gone (offline), `bitnet models` lists and removes; a corrupted download fails its
/// SHA-256 check and is deleted; a repository with several GGUFs needs the file named.
#[test]
fn models_by_name_from_a_mock_hub() {
    let dir = std::env::temp_dir().join(format!("bitnet-hub-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let repo_dir = dir.join("hub/owner/tiny");
    std::fs::create_dir_all(&repo_dir).unwrap();
    std::fs::copy(fixture(TINY), repo_dir.join("tiny.gguf")).unwrap();
    std::fs::write(repo_dir.join("README.md"), "a tiny model").unwrap();
    std::fs::create_dir_all(dir.join("hub/owner/two")).unwrap();
    for f in ["a.gguf", "b.gguf"] {
        std::fs::copy(fixture(TINY), dir.join("hub/owner/two").join(f)).unwrap();
    }
    let home = dir.join("home");
    let run = ["run", "-p", "Once", "-n", "6", "--temp", "0", "-t", "1"];
    let want = bitnet_ok(&[&run[..], &["-m", fixture(TINY).to_str().unwrap()]].concat());

    let hub = MockHub::start(&dir, &["--token", "secret", "--cut-after", "100000"]);
    let hf_run =
        |hub: &str, token: &str| with_hub(&[&run[..], &["-hf", "owner/tiny:tiny.gguf"]].concat(), &home, hub, token);
    let cut = hf_run(&hub.url, "secret");
    assert!(!cut.status.success(), "the cut download succeeded");
    let listed = String::from_utf8(with_hub(&["models"], &home, &hub.url, "").stdout).unwrap();
    assert!(listed.contains("download cut short: 97.7 KiB"), "{listed}");
    let resumed = hf_run(&hub.url, "secret");
    assert!(resumed.status.success(), "{}", String::from_utf8_lossy(&resumed.stderr));
    assert_eq!(String::from_utf8(resumed.stdout).unwrap(), want);
    let log = hub.requests();
    assert!(log.contains("bytes=100000- Bearer secret"), "no resumed Range request: {log}");
    assert!(log.lines().all(|l| l.ends_with("Bearer secret")), "{log}");
    let cached = home.join("hub/models--owner--tiny/snapshots/0123456789abcdef0123456789abcdef01234567/tiny.gguf");
    assert_eq!(std::fs::read(&cached).unwrap(), std::fs::read(fixture(TINY)).unwrap());
    let wrong = with_hub(&[&run[..], &["-hf", "owner/tiny:README.md"]].concat(), &home, &hub.url, "nope");
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("401"), "{}", String::from_utf8_lossy(&wrong.stderr));
    drop(hub);

    // The hub gone: the cache answers, with the file named or not (the repository's one GGUF).
    for name in ["owner/tiny:tiny.gguf", "owner/tiny"] {
        let out = with_hub(&[&run[..], &["-hf", name]].concat(), &home, "http://127.0.0.1:9", "");
        assert!(out.status.success(), "{name}: {}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(String::from_utf8(out.stdout).unwrap(), want);
    }
    let info = with_hub(&["info", "-hf", "owner/tiny"], &home, "http://127.0.0.1:9", "");
    assert!(info.status.success(), "{}", String::from_utf8_lossy(&info.stderr));
    let listed = String::from_utf8(with_hub(&["models"], &home, "", "").stdout).unwrap();
    assert!(listed.starts_with("owner/tiny:tiny.gguf\t") && listed.lines().count() == 1, "{listed}");
    assert!(with_hub(&["models", "rm", "owner/tiny:tiny.gguf"], &home, "", "").status.success());
    assert_eq!(with_hub(&["models"], &home, "", "").stdout, b"");
    let again = with_hub(&["models", "rm", "owner/tiny"], &home, "", "");
    assert!(String::from_utf8_lossy(&again.stderr).contains("not in the cache"));

    // A corrupted download fails its SHA-256 check and is not kept.
    let hub = MockHub::start(&dir, &["--corrupt"]);
    let bad = with_hub(&[&run[..], &["-hf", "owner/tiny:tiny.gguf"]].concat(), &home, &hub.url, "");
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success() && err.contains("SHA-256"), "{err}");
    assert_eq!(with_hub(&["models"], &home, "", "").stdout, b"");
    // Several GGUFs: the file must be named; a name that is not OWNER/REPO is refused.
    let two = with_hub(&[&run[..], &["-hf", "owner/two"]].concat(), &home, &hub.url, "");
    assert!(
        String::from_utf8_lossy(&two.stderr).contains("a.gguf, b.gguf"),
        "{}",
        String::from_utf8_lossy(&two.stderr)
    );
    let bad_name = with_hub(&[&run[..], &["-hf", "nonsense"]].concat(), &home, &hub.url, "");
    assert!(String::from_utf8_lossy(&bad_name.stderr).contains("not a model name"));
    drop(hub);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `bitnet convert` of a folder with a SentencePiece tokenizer.model and no tokenizer.json (LLaMA-style
/// checkpoints): the GGUF gets the `llama` vocabulary of that file (tiny-a's weights with fam-1bitllm's
/// tokenizer.model), tokenizing as fam-1bitllm-i2_s.gguf does; a folder with neither file names tokenizer.json.
#[test]
fn convert_reads_a_sentencepiece_tokenizer_model() {
    use bitnet_engine::format::gguf::{GgufFile, Value};
    use bitnet_engine::text::tokenizer::Tokenizer;
    let dir = std::env::temp_dir().join(format!("bitnet-spm-convert-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture("models/tiny-a").join(f), dir.join(f)).unwrap();
    }
    let out = dir.join("out.gguf");
    let (d, o) = (dir.to_str().unwrap(), out.to_str().unwrap());
    let missing = bitnet(&["convert", d, "-o", o]);
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(!missing.status.success() && stderr.contains("tokenizer.json"), "{stderr}");
    std::fs::copy(fixture("models/fam-1bitllm-tokenizer.model"), dir.join("tokenizer.model")).unwrap();
    bitnet_ok(&["convert", d, "-o", o]);
    let bytes = std::fs::read(&out).unwrap();
    let g = GgufFile::parse(&bytes).unwrap();
    assert_eq!(g.get("tokenizer.ggml.model"), Some(&Value::Str("llama".into())));
    let reference_bytes = std::fs::read(fixture("models/fam-1bitllm-i2_s.gguf")).unwrap();
    let reference = Tokenizer::from_metadata(&GgufFile::parse(&reference_bytes).unwrap().metadata).unwrap();
    let ours = Tokenizer::from_metadata(&g.metadata).unwrap();
    for text in ["Hello world", " the nation and you,\n\tfor the station ☃"] {
        assert_eq!(ours.encode(text, true).unwrap(), reference.encode(text, true).unwrap(), "{text:?}");
    }
    std::fs::remove_dir_all(&dir).ok();
}
