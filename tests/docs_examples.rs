//! Every example of README.md and docs/ runs: the `faultline` command lines of their code
//! blocks (and the README's TOML config), so an example that stops working fails CI.
//!
//! How each line is tried:
//! - `faultline run ...` runs for real and must succeed (exit 0), except `--kernel FILE`
//!   (a Linux kernel cannot boot to the end on these hosts; `tests/linux_boot.rs` covers
//!   it), which is parsed and validated only;
//! - `faultline run ... &` runs in the background; the `faultline ctl` lines after it run
//!   against it and must succeed (after `balloon set` the test polls `balloon get` until
//!   the guest has followed, as docs/control-api.md says to); then the VM either ends by
//!   itself within a minute and must succeed, or (a long chaos run) is stopped;
//! - `faultline guest-image FILE`, `faultline snapshot ...` and `faultline restore ...`
//!   run for real and must succeed;
//! - `faultline bench ...` is parsed only (a benchmark takes minutes; the bench tests and
//!   CI run them); `cargo ...` lines are skipped (this is `cargo test`).
//!
//! `/tmp/` paths are moved into a scratch directory; `--config vm.toml` gets the README's
//! TOML block. Lines that follow a command in the same block without `faultline` are its
//! output, not commands.

mod common;
use common::*;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One command of an example.
#[derive(Debug)]
struct Example {
    /// Where it is (file:line), for messages.
    at: String,
    /// The words after `faultline`.
    args: Vec<String>,
    /// Ends with `&`.
    background: bool,
}

/// Splits a command line into words: whitespace-separated, `"..."` quoted.
fn words(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut word = String::new();
    let (mut quoted, mut any) = (false, false);
    for c in line.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                any = true;
            }
            c if c.is_whitespace() && !quoted => {
                if any || !word.is_empty() {
                    out.push(std::mem::take(&mut word));
                }
                any = false;
            }
            c => word.push(c),
        }
    }
    if any || !word.is_empty() {
        out.push(word);
    }
    out
}

/// The code blocks of a Markdown file: (info string, first line number, lines).
fn code_blocks(text: &str) -> Vec<(String, usize, Vec<String>)> {
    let mut blocks = Vec::new();
    let mut current: Option<(String, usize, Vec<String>)> = None;
    for (number, line) in text.lines().enumerate() {
        if let Some(info) = line.trim_start().strip_prefix("```") {
            match current.take() {
                Some(block) => blocks.push(block),
                None => current = Some((info.trim().to_string(), number + 2, Vec::new())),
            }
        } else if let Some(block) = current.as_mut() {
            block.2.push(line.to_string());
        }
    }
    blocks
}

/// The `faultline` commands of `file`'s code blocks, with `/tmp/` moved into `scratch`.
fn examples_of(file: &Path, scratch: &Path) -> Vec<Example> {
    let text = std::fs::read_to_string(file).unwrap();
    let mut out = Vec::new();
    for (_, first_line, lines) in code_blocks(&text) {
        let mut joined: Vec<(usize, String)> = Vec::new();
        let mut continuing = false;
        for (i, line) in lines.iter().enumerate() {
            if continuing {
                let last = joined.last_mut().unwrap();
                last.1.push(' ');
                last.1.push_str(line.trim());
            } else {
                joined.push((first_line + i, line.clone()));
            }
            continuing = joined.last().unwrap().1.ends_with('\\');
            if continuing {
                let last = joined.last_mut().unwrap();
                last.1.pop();
            }
        }
        for (number, line) in joined {
            let command = line.split(" #").next().unwrap().trim();
            let command = strip_binary_dir(command);
            let command = command.strip_prefix("cargo run --release -- ").map(|c| format!("faultline {c}"));
            let command = command.as_deref().unwrap_or(line.split(" #").next().unwrap().trim());
            let command = strip_binary_dir(command);
            let Some(rest) = command.strip_prefix("faultline ") else { continue };
            let background = rest.ends_with('&');
            let rest = rest.trim_end_matches('&').replace("/tmp/", &format!("{}/", scratch.display()));
            let at = format!("{}:{number}", file.file_name().unwrap().to_string_lossy());
            let args = words(&rest);
            // Output that starts with the program's name ("faultline 0.1.0 (...)").
            if !["run", "bench", "ctl", "guest-image", "snapshot", "restore", "trace"]
                .contains(&args.first().map_or("", String::as_str))
            {
                continue;
            }
            out.push(Example { at, args, background });
        }
    }
    out
}

/// The README's TOML config (its only `toml` block).
fn readme_toml(readme: &str) -> String {
    let blocks: Vec<_> = code_blocks(readme).into_iter().filter(|b| b.0 == "toml").collect();
    assert_eq!(blocks.len(), 1, "the README has one TOML example, used for --config vm.toml");
    blocks[0].2.join("\n")
}

fn faultline_in(dir: &Path, args: &[String]) -> Command {
    let mut command = faultline();
    command.current_dir(dir).args(args);
    command
}

/// Waits for `child` up to `limit`; `None` if it is still running then.
fn wait_up_to(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        if started.elapsed() > limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs `args` to its end (killing it, and failing, after five minutes).
fn run_to_end(dir: &Path, example: &Example) {
    let mut child = faultline_in(dir, &example.args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let status = wait_up_to(&mut child, Duration::from_secs(300));
    if status.is_none() {
        child.kill().unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        status.is_some_and(|s| s.success()),
        "{}: `faultline {}` failed ({status:?})\nstdout: {}\nstderr: {}",
        example.at,
        example.args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Parses (and for `run`, validates) a command without running it.
fn parse_only(example: &Example) {
    use clap::Parser;
    let cli = faultline::cli::Cli::try_parse_from(std::iter::once("faultline".to_string()).chain(example.args.clone()))
        .unwrap_or_else(|e| panic!("{}: `faultline {}` does not parse: {e}", example.at, example.args.join(" ")));
    if let faultline::cli::Command::Run(run) = cli.command {
        run.to_config().unwrap_or_else(|e| panic!("{}: {e}", example.at));
    }
}

fn socket_of(args: &[String]) -> Option<PathBuf> {
    args.iter().position(|a| a == "--api-socket" || a == "-s" || a == "--socket").map(|i| PathBuf::from(&args[i + 1]))
}

/// Polls `balloon get` until the guest has followed its target (or the VM ended: a last
/// change can end the guest's balloon step and with it the run).
fn wait_for_balloon(dir: &Path, socket: &Path, at: &str, vm: &mut Child) {
    let args: Vec<String> = ["ctl", "--json", "-s", &socket.display().to_string(), "balloon", "get"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(120) {
        let out = faultline_in(dir, &args).output().unwrap();
        let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        if out.status.success() && info["actual_pages"] == info["target_pages"] {
            return;
        }
        if vm.try_wait().unwrap().is_some() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{at}: the guest never followed its balloon target");
}

fn run_examples(file: &str) {
    if !kvm_available() {
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let scratch = ScratchDir::new(&format!("examples-{}", file.replace(['/', '.'], "-")));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    std::fs::write(scratch.0.join("vm.toml"), readme_toml(&readme)).unwrap();
    let examples = examples_of(&root.join(file), &scratch.0);
    assert!(!examples.is_empty(), "no examples found in {file}");
    let needs_huge = examples.iter().any(|e| e.args.iter().any(|a| a.contains("hugetlb") || a == "vm.toml"));
    // The largest hugetlb example is 1 GiB of 2 MiB pages.
    let _pool = if needs_huge {
        match HugepagePool::reserve(512) {
            Some(pool) => Some(pool),
            None => return,
        }
    } else {
        None
    };
    let mut background: Option<(Child, String, bool)> = None;
    for example in &examples {
        eprintln!("{}: faultline {}", example.at, example.args.join(" "));
        let command = example.args.first().map(String::as_str);
        if command != Some("ctl") {
            finish_background(background.take());
        }
        match command {
            Some("run") if example.args.iter().any(|a| a == "--kernel") => parse_only(example),
            Some("run") if example.background => {
                let child =
                    faultline_in(&scratch.0, &example.args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn();
                let socket = socket_of(&example.args).expect("a background example serves a control socket");
                let mut child = child.unwrap();
                while faultline_in(
                    &scratch.0,
                    &["ctl".into(), "-s".into(), socket.display().to_string(), "status".into()],
                )
                .output()
                .map_or(true, |o| !o.status.success())
                {
                    assert!(child.try_wait().unwrap().is_none(), "{}: the VM ended before serving", example.at);
                    std::thread::sleep(Duration::from_millis(20));
                }
                background = Some((child, example.at.clone(), false));
            }
            Some("run") | Some("guest-image") | Some("snapshot") | Some("restore") | Some("trace") => {
                run_to_end(&scratch.0, example)
            }
            Some("ctl") => {
                assert!(background.is_some(), "{}: a ctl example needs a VM started before it", example.at);
                let out = faultline_in(&scratch.0, &example.args).output().unwrap();
                assert!(
                    out.status.success(),
                    "{}: `faultline {}` failed: {}",
                    example.at,
                    example.args.join(" "),
                    String::from_utf8_lossy(&out.stderr)
                );
                if example.args.iter().any(|a| a == "--stop") {
                    // The VM is stopped on purpose: its own exit status is not success.
                    background.as_mut().unwrap().2 = true;
                }
                if example.args.windows(2).any(|w| w == ["balloon", "set"]) {
                    let vm = &mut background.as_mut().unwrap().0;
                    wait_for_balloon(&scratch.0, &socket_of(&example.args).unwrap(), &example.at, vm);
                }
            }
            Some("bench") => parse_only(example),
            other => unreachable!("{}: {other:?} is filtered out by examples_of", example.at),
        }
    }
    finish_background(background.take());
}

/// A background VM after its ctl lines: one that ends by itself must have succeeded
/// (unless a ctl line stopped it: then it must not have crashed); one that runs on (a
/// long chaos run) is stopped.
fn finish_background(background: Option<(Child, String, bool)>) {
    let Some((mut child, at, stopped)) = background else { return };
    match wait_up_to(&mut child, Duration::from_secs(60)) {
        Some(status) => {
            let out = child.wait_with_output().unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            let ok = if stopped { matches!(status.code(), Some(0 | 1)) } else { status.success() };
            assert!(ok && !stderr.contains("panicked"), "{at}: the background VM failed ({status}): {stderr}");
        }
        None => {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }
}

#[test]
fn every_readme_example_works() {
    run_examples("README.md");
}

#[test]
fn every_example_in_docs_works() {
    for file in ["docs/control-api.md", "docs/benchmarks.md", "docs/platform.md"] {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        if examples_of(&root.join(file), Path::new("/x")).is_empty() {
            continue;
        }
        run_examples(file);
    }
}

#[test]
fn the_example_reader_finds_commands_continuations_and_output() {
    let text = "```sh\nfaultline run -m 1G \\\n  --vcpus 2   # two\ncargo test\nfaultline run --api-socket /tmp/s &\n```\n```\nfaultline ctl -s /tmp/s status\nrunning: 2 vCPUs\n```\n";
    let dir = ScratchDir::new("example-reader");
    let file = dir.0.join("x.md");
    std::fs::write(&file, text).unwrap();
    let examples = examples_of(&file, Path::new("/scratch"));
    let args: Vec<_> = examples.iter().map(|e| (e.args.join(" "), e.background)).collect();
    assert_eq!(
        args,
        vec![
            ("run -m 1G --vcpus 2".to_string(), false),
            ("run --api-socket /scratch/s".to_string(), true),
            ("ctl -s /scratch/s status".to_string(), false)
        ]
    );
    assert_eq!(words("--cmdline \"console=ttyS0 quiet\" x"), vec!["--cmdline", "console=ttyS0 quiet", "x"]);
}

/// A command as the docs write it with the binary's path (`target/<triple>/release/`,
/// or `target/release/`) taken off, so that it starts with `faultline`.
fn strip_binary_dir(command: &str) -> &str {
    ["target/x86_64-unknown-linux-gnu/release/", "target/release/"]
        .iter()
        .find_map(|dir| command.strip_prefix(dir))
        .unwrap_or(command)
}
