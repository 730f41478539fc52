//! A small fluent runner for the real `hasync` binary, in the style of just's
//! `Test::new().args(..)`: every integration test drives the binary the way a
//! sysadmin would, and a failed assertion prints the whole run.

use std::cell::RefCell;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

pub struct Hasync {
    cmd: Command,
    line: String,
}

/// `hasync` with a clean environment: no inherited `HASYNC_*` variable
/// (`HASYNC_CONFIG`, `HASYNC_DB_SPLIT_MIN`, ...: a test that wants one sets
/// it with [`Hasync::env`]), no ssh-agent (tests must name their keys), no
/// terminal.
pub fn hasync() -> Hasync {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hasync"));
    for (k, _) in std::env::vars_os() {
        if k.as_encoded_bytes().starts_with(b"HASYNC_") {
            cmd.env_remove(k);
        }
    }
    cmd.env_remove("SSH_AUTH_SOCK").stdin(Stdio::null());
    Hasync {
        cmd,
        line: "hasync".into(),
    }
}

impl Hasync {
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        for a in args {
            self.line.push(' ');
            self.line.push_str(a.as_ref());
            self.cmd.arg(a.as_ref());
        }
        self
    }

    pub fn config(self, path: &Path) -> Self {
        let p = path.display().to_string();
        self.args(["-c", &p])
    }

    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.cmd.env(k, v);
        self
    }

    /// Where its stdout goes instead of being captured ([`Run::stdout`] is
    /// then empty).
    pub fn stdout(mut self, out: impl Into<Stdio>) -> Self {
        self.cmd.stdout(out);
        self
    }

    /// Start it in the background, output captured; [`Running::wait`] gives
    /// the [`Run`].
    pub fn spawn(mut self) -> Running {
        let child = self
            .cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot run the hasync binary");
        Running {
            line: self.line,
            child,
        }
    }

    pub fn run(mut self) -> Run {
        let out = self.cmd.output().expect("cannot run the hasync binary");
        Run::new(self.line, out)
    }
}

pub struct Running {
    pub line: String,
    pub child: std::process::Child,
}

impl Running {
    pub fn wait(self) -> Run {
        let out = self.child.wait_with_output().expect("waiting for hasync");
        Run::new(self.line, out)
    }

    /// Read its stderr line by line while it runs, for a test that acts
    /// when hasync reaches a point (a `BEGIN <phase>` line, say).
    pub fn follow(mut self) -> Following {
        let stderr = self.child.stderr.take().expect("stderr is piped");
        let (tx, lines) = mpsc::channel::<String>();
        let reader = thread::spawn(move || {
            use std::io::BufRead;
            let mut all = String::new();
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                all += &line;
                all.push('\n');
                let _ = tx.send(line);
            }
            all
        });
        Following {
            running: self,
            lines,
            seen: RefCell::new(String::new()),
            reader,
        }
    }
}

/// A [`Running`] hasync whose stderr is read as it comes.
pub struct Following {
    running: Running,
    lines: Receiver<String>,
    /// The lines handed out so far, for failure messages.
    seen: RefCell<String>,
    reader: JoinHandle<String>,
}

impl Following {
    pub fn pid(&self) -> u32 {
        self.running.child.id()
    }

    /// Whether the process has ended (it is not reaped here).
    pub fn has_exited(&mut self) -> bool {
        !matches!(self.running.child.try_wait(), Ok(None))
    }

    /// Send it a signal.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on the child this test spawned and has not reaped.
        unsafe { libc::kill(self.pid() as i32, sig) };
    }

    /// The next line of stderr; `None` at its end or after `timeout`.
    pub fn next_line(&self, timeout: Duration) -> Option<String> {
        let line = self.lines.recv_timeout(timeout).ok()?;
        let mut seen = self.seen.borrow_mut();
        seen.push_str(&line);
        seen.push('\n');
        Some(line)
    }

    /// Wait for a line of stderr containing `needle` and return it; panics
    /// with what was seen if stderr ends or `timeout` passes first.
    #[track_caller]
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_line(left) {
                Some(line) if line.contains(needle) => return line,
                Some(_) => {}
                None => panic!(
                    "`{}` printed no line with {needle:?}:\n{}",
                    self.running.line,
                    self.seen.borrow()
                ),
            }
        }
    }

    /// Wait for the end; the [`Run`] has the whole stderr.
    pub fn wait(self) -> Run {
        let mut run = self.running.wait();
        run.stderr = self.reader.join().expect("the stderr reader");
        run
    }
}

pub struct Run {
    pub line: String,
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    fn new(line: String, out: std::process::Output) -> Run {
        Run {
            line,
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    fn dump(&self) -> String {
        format!(
            "\n$ {}\nexit {}\n--- stdout ---\n{}\n--- stderr ---\n{}\n",
            self.line, self.code, self.stdout, self.stderr
        )
    }

    #[track_caller]
    pub fn code(&self, expected: i32) -> &Self {
        assert_eq!(self.code, expected, "unexpected exit code{}", self.dump());
        self
    }

    #[track_caller]
    pub fn stdout_has(&self, needle: &str) -> &Self {
        assert!(
            self.stdout.contains(needle),
            "stdout lacks {needle:?}{}",
            self.dump()
        );
        self
    }

    #[track_caller]
    pub fn stderr_has(&self, needle: &str) -> &Self {
        assert!(
            self.stderr.contains(needle),
            "stderr lacks {needle:?}{}",
            self.dump()
        );
        self
    }

    #[track_caller]
    pub fn stderr_lacks(&self, needle: &str) -> &Self {
        assert!(
            !self.stderr.contains(needle),
            "stderr has {needle:?}{}",
            self.dump()
        );
        self
    }
}
