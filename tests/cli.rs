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
