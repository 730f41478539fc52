//! The command line itself: help, exit codes, init, generated docs that must
//! not drift, and the shipped templates.

use std::path::{Path, PathBuf};

use crate::cmd::hasync;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn help_lists_commands_and_exit_codes() {
    let r = hasync().args(["--help"]).run();
    r.code(0)
        .stdout_has("doctor")
        .stdout_has("init")
        .stdout_has("Exit status:")
        .stdout_has("130");
    // The agent is for hasync itself, not for people.
    assert!(
        !r.stdout
            .lines()
            .any(|l| l.trim_start().starts_with("agent ")),
        "the hidden agent shows in --help:\n{}",
        r.stdout
    );
}

#[test]
fn unknown_subcommand_is_a_usage_error() {
    hasync()
        .args(["frobnicate"])
        .run()
        .code(2)
        .stderr_has("frobnicate");
}

#[test]
fn agent_reports_version_and_protocol() {
    let r = hasync().args(["agent", "--version"]).run();
    r.code(0);
    let (v, p) =
        hasync::version::parse_agent_version_line(r.stdout.trim()).expect("parsable version line");
    assert_eq!(v, env!("CARGO_PKG_VERSION"));
    assert_eq!(p, hasync::version::PROTOCOL);
}

#[test]
fn agent_refuses_garbage_on_its_input() {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new(env!("CARGO_BIN_EXE_hasync"))
        .arg("agent")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A length prefix of 1 GiB: over the frame limit.
    child
        .stdin
        .take()
        .unwrap()
        .write_all(&(1u32 << 30).to_le_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("exceeds the limit"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn init_writes_template_and_never_overwrites() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("etc/hasync.toml");
    hasync()
        .config(&path)
        .args(["init"])
        .run()
        .code(0)
        .stderr_has("doctor");
    let written = std::fs::read_to_string(&path).unwrap();
    assert_eq!(written, hasync::config::TEMPLATE);
    std::fs::write(&path, "# edited by the admin\n").unwrap();
    hasync()
        .config(&path)
        .args(["init"])
        .run()
        .code(1)
        .stderr_has("already exists");
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        "# edited by the admin\n"
    );
}

#[test]
fn missing_config_names_the_file_and_init() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nope.toml");
    hasync()
        .config(&path)
        .args(["doctor"])
        .run()
        .code(3)
        .stderr_has("nope.toml")
        .stderr_has("init");
}

#[test]
fn config_comes_from_env_when_no_flag() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("from-env.toml");
    hasync()
        .env("HASYNC_CONFIG", &path.display().to_string())
        .args(["doctor"])
        .run()
        .code(3)
        .stderr_has("from-env.toml");
}

/// `hasync init --stdout | head -0`: a stdout whose reader is gone is no
/// error. The pipe's read end is closed before hasync starts, so its first
/// write fails with EPIPE whatever the output's size (a reader dropped
/// after the spawn may go only after hasync wrote everything into the
/// pipe's buffer, and the pipe never breaks).
#[test]
fn broken_pipe_is_not_an_error() {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = hasync().args(["init", "--stdout"]).stdout(writer).run();
    assert_eq!(out.code, 0, "stderr: {}", out.stderr);
    assert!(out.stderr.is_empty(), "stderr: {}", out.stderr);
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn man_pages_match_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().display().to_string();
    hasync().args(["man", "--out-dir", &out]).run().code(0);
    let fresh = files_in(dir.path());
    let checked_in = files_in(&repo().join("man"));
    assert_eq!(
        fresh, checked_in,
        "man/ drifted: run `cargo run -- man --out-dir man`"
    );
    for f in fresh {
        let a = std::fs::read_to_string(dir.path().join(&f)).unwrap();
        let b = std::fs::read_to_string(repo().join("man").join(&f)).unwrap();
        assert!(
            a == b,
            "man/{f} drifted from the CLI: run `cargo run -- man --out-dir man`"
        );
    }
    let main_page = std::fs::read_to_string(repo().join("man/hasync.1")).unwrap();
    assert!(main_page.contains("EXIT STATUS") && main_page.contains("HASYNC_CONFIG"));
}

#[test]
fn completions_match_the_cli() {
    for (shell, file) in [
        ("bash", "hasync.bash"),
        ("zsh", "_hasync"),
        ("fish", "hasync.fish"),
    ] {
        let r = hasync().args(["completions", shell]).run();
        r.code(0);
        let checked_in = std::fs::read_to_string(repo().join("completions").join(file))
            .unwrap_or_else(|e| panic!("completions/{file}: {e}"));
        assert!(
            r.stdout == checked_in,
            "completions/{file} drifted: run `cargo run -- completions {shell} > completions/{file}`"
        );
        assert!(r.stdout.contains("doctor"));
    }
}

/// `[Section]` -> key -> value of a systemd unit file.
fn systemd_unit(
    text: &str,
) -> std::collections::BTreeMap<String, std::collections::BTreeMap<String, String>> {
    let mut out = std::collections::BTreeMap::new();
    let mut section = String::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(s) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = s.to_string();
            out.entry(section.clone())
                .or_insert_with(std::collections::BTreeMap::new);
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("not key=value: {line}"));
        out.get_mut(&section)
            .unwrap_or_else(|| panic!("{line}: outside a section"))
            .insert(k.to_string(), v.to_string());
    }
    out
}

/// A template's `/usr/local/bin/hasync ARGS` must be a command line hasync
/// accepts: run with a config that does not exist, it must fail on the
/// config (exit 3), not on the arguments (exit 2).
fn hasync_arguments_parse(template: &str, command: &[&str]) {
    assert_eq!(command[0], "/usr/local/bin/hasync", "templates/{template}");
    let mut args: Vec<String> = command[1..].iter().map(|s| s.to_string()).collect();
    let c = args.iter().position(|a| a == "-c").expect("-c CONFIG");
    args[c + 1] = "/nonexistent/hasync.toml".into();
    let r = hasync().args(&args).run();
    assert_eq!(
        r.code,
        3,
        "templates/{template}: `hasync {}`:\n{}",
        args.join(" "),
        r.stderr
    );
}

/// Every shipped template is parsed, so an example can never rot.
#[test]
fn every_template_parses() {
    let dir = repo().join("templates");
    let mut seen = 0;
    for name in files_in(&dir) {
        let path = dir.join(&name);
        let text = std::fs::read_to_string(&path).unwrap();
        match Path::new(&name).extension().and_then(|e| e.to_str()) {
            Some("toml") => {
                // Local files it names (password file, hooks) exist only on a real install.
                let cfg = hasync::config::parse_without_files(&path, &text)
                    .unwrap_or_else(|e| panic!("templates/{name} does not parse:\n{e}"));
                assert!(cfg.nodes.len() >= 2);
                assert!(cfg.database.is_some() && cfg.schedule.is_some());
            }
            // Run for real against MariaDB and PostgreSQL by
            // db::readonly_templates_work.
            Some("sql") if name.starts_with("readonly-") => {
                assert!(
                    !crate::db::sql_statements(&text).is_empty(),
                    "templates/{name}"
                );
            }
            Some("cron") => {
                let mut jobs = 0;
                for line in text.lines().map(str::trim) {
                    if line.is_empty()
                        || line.starts_with('#')
                        || line.contains('=')
                            && !line
                                .starts_with(|c: char| c.is_ascii_digit() || c == '*' || c == '@')
                    {
                        continue;
                    }
                    let fields: Vec<&str> = line.split_whitespace().collect();
                    let when = fields[..5].join(" ");
                    when.parse::<hasync::schedule::cron::CronSchedule>()
                        .unwrap_or_else(|e| panic!("templates/{name}: {when:?}: {e}"));
                    assert_eq!(fields[5], "root", "templates/{name}: the user field");
                    let command: Vec<&str> = fields[6..]
                        .iter()
                        .take_while(|f| !f.starts_with(">>"))
                        .copied()
                        .collect();
                    hasync_arguments_parse(&name, &command);
                    jobs += 1;
                }
                assert_eq!(jobs, 1, "templates/{name}");
            }
            Some("service") | Some("timer") => {
                let ini = systemd_unit(&text);
                assert!(ini.contains_key("Unit"), "templates/{name}: no [Unit]");
                if name.ends_with(".service") {
                    let exec = ini["Service"]
                        .get("ExecStart")
                        .unwrap_or_else(|| panic!("templates/{name}: no ExecStart"));
                    hasync_arguments_parse(&name, &exec.split_whitespace().collect::<Vec<_>>());
                } else {
                    let unit = &ini["Timer"]["Unit"];
                    assert!(
                        repo().join("templates").join(unit).exists(),
                        "templates/{name}: Unit={unit} is not a template"
                    );
                    assert!(ini["Timer"].contains_key("OnCalendar"));
                }
            }
            Some("cfg") if name.starts_with("haproxy") => {
                assert!(
                    text.contains("option httpchk GET /primary"),
                    "templates/{name}"
                );
                assert!(
                    text.contains("http-check expect status 200"),
                    "templates/{name}"
                );
                let servers = text
                    .lines()
                    .filter(|l| l.trim_start().starts_with("server ") && l.contains(" check port "))
                    .count();
                assert!(servers >= 2, "templates/{name}: a checked server per node");
                assert!(
                    text.lines()
                        .any(|l| l.trim_start().starts_with("server ") && l.ends_with(" backup")),
                    "templates/{name}: a backup server (the maintenance page)"
                );
                // HAProxy itself reads it (.ci/run installs haproxy).
                let check = std::process::Command::new("haproxy")
                    .args(["-c", "-f"])
                    .arg(&path)
                    .output()
                    .expect("haproxy is not installed (.ci/run installs it)");
                let said = String::from_utf8_lossy(&check.stderr).into_owned()
                    + &String::from_utf8_lossy(&check.stdout);
                assert!(
                    check.status.success() && !said.contains("WARNING"),
                    "templates/{name}: haproxy -c says:\n{said}"
                );
            }
            _ => panic!("templates/{name}: no test parses this kind of template; add one here"),
        }
        seen += 1;
    }
    assert!(seen >= 1);
}

#[test]
fn agent_pinned_to_a_root_refuses_another() {
    use hasync::agent::wire::{self, Msg};
    use std::io::Write;
    use std::process::{Command, Stdio};
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_hasync"))
        .args(["agent", "--root"])
        .arg(dir.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let hello = Msg::Hello {
        protocol: hasync::version::PROTOCOL,
        version: "x".into(),
        root: b"/".to_vec(),
        epoch: 1,
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(&hello.encode())
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let reply = wire::recv(&mut out, &mut Vec::new()).unwrap();
    match reply {
        Some(Msg::Fatal { message }) => assert!(message.contains("serves only"), "{message}"),
        other => panic!("expected Fatal, got {other:?}"),
    }
    assert_eq!(child.wait().unwrap().code(), Some(1));
}
