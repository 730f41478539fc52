//! A small fluent runner for the real `hasync` binary, in the style of just's
//! `Test::new().args(..)`: every integration test drives the binary the way a
//! sysadmin would, and a failed assertion prints the whole run.

use std::path::Path;
use std::process::{Command, Stdio};

pub struct Hasync {
    cmd: Command,
    line: String,
}

/// `hasync` with a clean environment: no inherited HASYNC_CONFIG, no
/// ssh-agent (tests must name their keys), no terminal.
pub fn hasync() -> Hasync {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hasync"));
    cmd.env_remove("HASYNC_CONFIG")
        .env_remove("SSH_AUTH_SOCK")
        .stdin(Stdio::null());
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
