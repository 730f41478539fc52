//! Progress on a terminal: the real binary under a pseudo-terminal (as in
//! tmux or an ssh session), its raw output kept with the time each piece
//! arrived, and what was drawn read back frame by frame. A bar that is drawn
//! once and then frozen (issue 14, item 5: `[00:00:00] 0 B/140.64 MiB ...
//! 9/669` from start to end) fails here: the drawn elapsed time, bytes and
//! files must advance during the run, not only at its end.

use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::setup::Setup;
use crate::sync::{files_only, write};

/// A run under a pseudo-terminal: its exit code and every piece of output
/// with the seconds since the start at which it was read.
pub struct PtyRun {
    pub line: String,
    pub code: i32,
    pub chunks: Vec<(f64, Vec<u8>)>,
}

/// One line as drawn (escape sequences removed; a `\r` or `\n` ends it), with
/// the time its last byte arrived.
#[derive(Debug, Clone)]
pub struct Drawn {
    pub at: f64,
    pub text: String,
}

impl PtyRun {
    /// Everything drawn, in order.
    pub fn drawn(&self) -> Vec<Drawn> {
        let mut out = Vec::new();
        let mut cur = String::new();
        let mut esc = 0u8; // 0: text, 1: after ESC, 2: in a CSI
        for (at, bytes) in &self.chunks {
            for ch in String::from_utf8_lossy(bytes).chars() {
                match (esc, ch) {
                    (0, '\x1b') => esc = 1,
                    (0, '\r' | '\n') => {
                        if !cur.trim().is_empty() {
                            out.push(Drawn {
                                at: *at,
                                text: std::mem::take(&mut cur),
                            });
                        }
                        cur.clear();
                    }
                    (0, c) => cur.push(c),
                    (1, '[') => esc = 2,
                    (1, _) => esc = 0,
                    (2, c) if ('\x40'..='\x7e').contains(&c) => esc = 0,
                    (2, _) => {}
                    _ => esc = 0,
                }
            }
            // A redraw without a line end (a bar drawn in place) is seen
            // when the next one starts.
        }
        if !cur.trim().is_empty() {
            let at = self.chunks.last().map(|c| c.0).unwrap_or(0.0);
            out.push(Drawn { at, text: cur });
        }
        out
    }

    /// The whole output as text, escapes kept out, for failure messages.
    pub fn dump(&self) -> String {
        let mut s = format!("\n$ {}\nexit {}\n", self.line, self.code);
        for d in self.drawn() {
            s += &format!("{:7.3} | {}\n", d.at, d.text);
        }
        s
    }
}

/// Run the hasync binary with `args` under a fresh pseudo-terminal of
/// `cols` x 50 (stdout and stderr both on it, stdin from /dev/null), for
/// at most `timeout`.
pub fn run_in_pty(args: &[&str], env: &[(&str, &str)], cols: u16, timeout: Duration) -> PtyRun {
    let (mut master, slave) = openpty(cols, 50);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hasync"));
    cmd.args(args)
        .env_remove("HASYNC_CONFIG")
        .env_remove("SSH_AUTH_SOCK")
        .env("TERM", "xterm-256color")
        .stdin(Stdio::null())
        .stdout(Stdio::from(slave.try_clone().expect("dup pty")))
        .stderr(Stdio::from(slave));
    for (k, v) in env {
        cmd.env(k, v);
    }
    let line = format!("hasync {}", args.join(" "));
    let t0 = Instant::now();
    let mut child = cmd.spawn().expect("cannot run the hasync binary");
    // The parent's copies of the slave side go with `cmd`: once the child
    // (and whatever it started) is gone, reads of the master end.
    drop(cmd);
    let reader = std::thread::spawn(move || {
        let mut chunks = Vec::new();
        let mut buf = [0u8; 65536];
        loop {
            match master.read(&mut buf) {
                Ok(0) | Err(_) => break, // EIO: no slave left
                Ok(n) => chunks.push((t0.elapsed().as_secs_f64(), buf[..n].to_vec())),
            }
        }
        chunks
    });
    let code = loop {
        if let Some(st) = child.try_wait().expect("waiting for hasync") {
            break st.code().unwrap_or(-1);
        }
        if t0.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            panic!("`{line}` under a pty did not end within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let chunks = reader.join().expect("pty reader");
    PtyRun { line, code, chunks }
}

fn openpty(cols: u16, rows: u16) -> (std::fs::File, OwnedFd) {
    let mut master = -1;
    let mut slave = -1;
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: openpty writes two descriptors into the given ints; the
    // name buffer may be null and the termios pointer may be null.
    let r = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            &ws,
        )
    };
    assert_eq!(r, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors were just opened and are owned here only.
    unsafe {
        (
            std::fs::File::from_raw_fd(master),
            OwnedFd::from_raw_fd(slave),
        )
    }
}

/// Bytes in a size as the bar draws it ("12.50 MiB", "0 B").
fn parse_size(num: &str, unit: &str) -> Option<f64> {
    let n: f64 = num.parse().ok()?;
    let m = match unit {
        "B" => 1.0,
        "KiB" => 1024.0,
        "MiB" => 1024.0 * 1024.0,
        "GiB" => 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    Some(n * m)
}

/// What a transfer bar line says: elapsed seconds, bytes done, bytes in
/// all, files done, files in all.
#[derive(Debug, Clone, PartialEq)]
pub struct BarLine {
    pub elapsed: u64,
    pub bytes: f64,
    pub total: f64,
    pub files: u64,
    pub files_total: u64,
}

/// `okm2 [00:00:03] ███░░ 12.50 MiB/40.00 MiB 4.10 MiB/s ETA 6s 50/160 ...`
pub fn bar_line(text: &str) -> Option<BarLine> {
    let open = text.find('[')?;
    let close = open + text[open..].find(']')?;
    let hms: Vec<u64> = text[open + 1..close]
        .split(':')
        .map(|p| p.parse().ok())
        .collect::<Option<_>>()?;
    let [h, m, s] = hms[..] else { return None };
    let words: Vec<&str> = text[close + 1..].split_whitespace().collect();
    // "12.50" "MiB/40.00" "MiB": the bytes pair.
    let at = words.iter().position(|w| {
        w.split_once('/').is_some_and(|(u, rest)| {
            parse_size("0", u).is_some() && !rest.is_empty() && rest != "s"
        })
    })?;
    let (unit, total_num) = words[at].split_once('/')?;
    let bytes = parse_size(words.get(at.checked_sub(1)?)?, unit)?;
    let total = parse_size(total_num, words.get(at + 1)?)?;
    let (files, files_total) = words[at + 2..].iter().find_map(|w| {
        let (a, b) = w.split_once('/')?;
        Some((a.parse().ok()?, b.parse().ok()?))
    })?;
    Some(BarLine {
        elapsed: h * 3600 + m * 60 + s,
        bytes,
        total,
        files,
        files_total,
    })
}

/// A standby agent behind a slow link: what the client sends reaches it in
/// slices of at most 64 KiB, `pause` apart (about 64 KiB / pause per
/// second), so a transfer of a few MiB takes seconds on any machine. Only
/// the pace changes: every byte arrives, in order, and nothing waits for a
/// full slice (a short request still reaches the agent after one pause).
fn slow_agent(s: &Setup, pause: &str) -> String {
    let path = s.dir.join("slow-agent.sh");
    std::fs::write(
        &path,
        format!(
            "#!/bin/sh\n\
             while n=$(dd bs=65536 count=1 status=none | tee /dev/fd/3 | wc -c) && [ \"$n\" -gt 0 ]; do sleep {pause}; done 3>&1 | {} \"$@\"\n",
            env!("CARGO_BIN_EXE_hasync")
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path.display().to_string()
}

/// The config of `s` with the standby's agent behind [`slow_agent`].
fn slow_config(s: &Setup, pause: &str) -> std::path::PathBuf {
    let cfg = s.write();
    let text = std::fs::read_to_string(&cfg).unwrap();
    let agent = env!("CARGO_BIN_EXE_hasync");
    let at = text.rfind(&format!("agent_path = \"{agent}\"")).unwrap();
    let slow = slow_agent(s, pause);
    let text = format!(
        "{}agent_path = \"{slow}\"{}",
        &text[..at],
        &text[at + format!("agent_path = \"{agent}\"").len()..]
    );
    std::fs::write(&cfg, text).unwrap();
    cfg
}

/// `files` files of `size` bytes under `dir`/dNN/ of `root`, content
/// that does not compress.
fn tree(root: &Path, files: usize, size: usize) {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for i in 0..files {
        let mut data = vec![0u8; size];
        for b in data.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        write(root, &format!("d{:02}/file-{i:03}.bin", i % 8), &data);
    }
}

#[test]
fn the_transfer_bar_ticks_on_a_terminal() {
    let s = files_only("progress-tty");
    // 48 files, 12 MiB through a link of about 2.5 MiB/s: some 5 s.
    tree(&s.roots[0], 48, 256 * 1024);
    let cfg = slow_config(&s, "0.025");
    let c = cfg.display().to_string();
    let run = run_in_pty(
        &["-c", &c, "sync", "--files-only"],
        &[],
        200,
        Duration::from_secs(120),
    );
    let dump = run.dump();
    assert_eq!(run.code, 0, "the run failed:{dump}");
    let drawn = run.drawn();
    let bars: Vec<(f64, BarLine)> = drawn
        .iter()
        .filter_map(|d| Some((d.at, bar_line(&d.text)?)))
        .filter(|(_, b)| b.total >= 12.0 * 1024.0 * 1024.0 * 0.99)
        .collect();
    assert!(!bars.is_empty(), "no transfer bar was drawn:{dump}");
    let (first, last) = (bars[0].0, bars[bars.len() - 1].0);
    // Drawn with some bytes done but not all, at distinct moments: the bar
    // moved while the files went across.
    let mut moving: Vec<(f64, f64)> = bars
        .iter()
        .filter(|(_, b)| b.bytes > 0.0 && b.bytes < b.total)
        .map(|(at, b)| (*at, b.bytes))
        .collect();
    moving.dedup_by(|a, b| a.1 == b.1);
    assert!(
        moving.len() >= 4,
        "the drawn byte count did not advance during the transfer (distinct values between 0 and the total: {moving:?}):{dump}"
    );
    assert!(
        moving.windows(2).all(|w| w[1].1 > w[0].1),
        "the drawn byte count went backwards: {moving:?}:{dump}"
    );
    let spread = moving[moving.len() - 1].0 - moving[0].0;
    assert!(
        spread >= 2.0,
        "the byte count moved only within {spread:.1} s of a {:.1} s transfer:{dump}",
        last - first
    );
    let mut files: Vec<u64> = bars.iter().map(|(_, b)| b.files).collect();
    files.dedup();
    assert!(
        files.len() >= 4,
        "the drawn file count did not advance: {files:?}:{dump}"
    );
    let mut elapsed: Vec<u64> = bars.iter().map(|(_, b)| b.elapsed).collect();
    elapsed.dedup();
    assert!(
        elapsed.len() >= 3 && elapsed.iter().any(|&e| e >= 2),
        "the drawn elapsed time did not advance: {elapsed:?}:{dump}"
    );
    // On a wide terminal the bar names a file being sent.
    assert!(
        drawn
            .iter()
            .any(|d| bar_line(&d.text).is_some() && d.text.contains("file-")),
        "no bar named the current file on a 200-column terminal:{dump}"
    );
    crate::sync::assert_same_tree(&s.roots[0], &s.roots[1]);
}

/// Services in `cfg` that take 2 s to stop and to start, as a Tomcat does.
fn slow_services(cfg: &Path) {
    let text = std::fs::read_to_string(cfg).unwrap();
    let mut slow = String::new();
    for line in text.lines() {
        match line.split_once(" = \"") {
            Some(("stop" | "start", cmd)) => {
                let key = line.split_once(' ').unwrap().0;
                slow += &format!("{key} = \"sleep 2 && {cmd}\n");
            }
            _ => slow += &format!("{line}\n"),
        }
    }
    std::fs::write(cfg, slow).unwrap();
}

/// Whether the lines drawn with `needle` moved: at least `n` different
/// frames (a spinner turning, the elapsed time or a count changing),
/// drawn over at least `secs` seconds. Returns what was seen otherwise.
fn moved(drawn: &[Drawn], needle: &str, n: usize, secs: f64) -> Result<(), String> {
    let mut frames: Vec<&Drawn> = drawn.iter().filter(|d| d.text.contains(needle)).collect();
    frames.dedup_by(|a, b| a.text == b.text);
    let span = match (frames.first(), frames.last()) {
        (Some(a), Some(b)) => b.at - a.at,
        _ => 0.0,
    };
    if frames.len() >= n && span >= secs {
        Ok(())
    } else {
        Err(format!(
            "{needle:?}: {} distinct frames over {span:.1} s (wanted {n} over {secs} s)",
            frames.len()
        ))
    }
}

/// The seconds a spinner line shows (`[00:00:03]`).
fn elapsed_of(text: &str) -> Option<u64> {
    let open = text.find('[')?;
    let close = open + text[open..].find(']')?;
    let hms: Vec<u64> = text[open + 1..close]
        .split(':')
        .map(|p| p.parse().ok())
        .collect::<Option<_>>()?;
    let [h, m, s] = hms[..] else { return None };
    Some(h * 3600 + m * 60 + s)
}

#[test]
fn every_slow_phase_of_a_cycle_shows_something_moving() {
    use crate::db::{drop_dbs, Engine};
    let db = "okmdb_progress";
    // A table big enough for a dump of some seconds.
    let s = crate::cycle::engine_cycle_setup(Engine::Mysql, "progress-cycle", db, 150_000);
    tree(&s.roots[0], 24, 256 * 1024);
    let cfg = slow_config(&s, "0.025");
    slow_services(&cfg);
    let _apps = crate::cycle::AppsStopped::start_both();
    let c = cfg.display().to_string();
    let run = run_in_pty(&["-c", &c, "sync"], &[], 200, Duration::from_secs(300));
    let dump = run.dump();
    assert_eq!(run.code, 0, "the cycle failed:{dump}");
    if std::env::var_os("HASYNC_IT_SHOW").is_some() {
        eprintln!("{dump}");
    }
    let drawn = run.drawn();
    let mut problems = Vec::new();
    // The scan spinner, the bar of the warm pass (the final one has little
    // to do), each service wait, the database phase.
    for (needle, n, secs) in [
        ("scanning", 1, 0.0),
        ("ETA", 4, 2.0),
        ("stopping the service", 4, 1.5),
        ("starting the service", 4, 1.5),
        ("database:", 3, 0.5),
    ] {
        if let Err(e) = moved(&drawn, needle, n, secs) {
            problems.push(e);
        }
    }
    // A wait says what it waits for, and its elapsed time counts up.
    for needle in ["stopping the service", "starting the service"] {
        let mut secs: Vec<u64> = drawn
            .iter()
            .filter(|d| d.text.contains(needle))
            .filter_map(|d| elapsed_of(&d.text))
            .collect();
        secs.dedup();
        if secs.len() < 2 {
            problems.push(format!(
                "{needle:?}: the elapsed time did not advance: {secs:?}"
            ));
        }
    }
    if !drawn
        .iter()
        .any(|d| d.text.contains("stopping the service") && d.text.contains("app.py status"))
    {
        problems.push("the stop spinner does not name the status command it waits on".into());
    }
    assert!(problems.is_empty(), "{}:{dump}", problems.join("\n"));
    // The log lines stay readable: none was drawn into a display's line.
    for line in [
        "BEGIN quiesce",
        "okm2: service stopped",
        "END database",
        "cycle ok",
    ] {
        assert!(
            drawn
                .iter()
                .any(|d| d.text.contains(line) && elapsed_of(&d.text).is_none()),
            "no clean line with {line:?}:{dump}"
        );
    }
    drop_dbs(Engine::Mysql, 0, db);
    drop_dbs(Engine::Mysql, 1, db);
}

#[test]
fn without_a_terminal_waits_and_the_database_are_logged_in_lines() {
    use crate::db::{drop_dbs, Engine};
    let db = "okmdb_progress_lines";
    let s = crate::cycle::engine_cycle_setup(Engine::Mysql, "progress-lines", db, 100_000);
    let cfg = s.write();
    slow_services(&cfg);
    let _apps = crate::cycle::AppsStopped::start_both();
    let r = crate::cmd::hasync()
        .config(&cfg)
        .env("HASYNC_PROGRESS_EVERY", "500ms")
        .args(["sync"])
        .run();
    r.code(0)
        .stderr_has("okm2: still stopping the service: `sleep 2 && ")
        .stderr_has("okm1: still stopping the service")
        .stderr_has("okm1: still starting the service")
        .stderr_has("okm2: database: dump and load")
        .stderr_has("of dump streamed")
        // No bar, no spinner, no escape sequence in a log.
        .stderr_lacks("\x1b[")
        .stderr_lacks("ETA");
    drop_dbs(Engine::Mysql, 0, db);
    drop_dbs(Engine::Mysql, 1, db);
}
