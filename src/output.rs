//! Where output goes: data on stdout, everything else on stderr.
//!
//! A closed stdout (`hasync status | head -1`) is not an error: writes that hit
//! a broken pipe end the process quietly with success, as ripgrep does.

use std::io::Write;

/// Print data on stdout; a broken pipe ends the process with status 0.
pub fn stdout(text: &str) {
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("hasync: cannot write to stdout: {e}");
        std::process::exit(1);
    }
}

/// A message line on stderr, above any progress display being drawn.
fn above(line: &str) {
    crate::progress::eprintln_above(line);
}

/// Messages on stderr, filtered by -v / -q.
#[derive(Clone, Copy)]
pub struct Log {
    /// 0 = errors only, 1 = warnings, 2 = normal, 3+ = verbose.
    level: i8,
}

impl Log {
    pub fn new(verbose: u8, quiet: u8) -> Self {
        Log {
            level: 2 + verbose.min(4) as i8 - quiet.min(2) as i8,
        }
    }

    pub fn error(&self, msg: &str) {
        above(&format!("hasync: error: {msg}"));
    }

    pub fn warn(&self, msg: &str) {
        if self.level >= 1 {
            above(&format!("hasync: warning: {msg}"));
        }
    }

    pub fn info(&self, msg: &str) {
        if self.level >= 2 {
            above(msg);
        }
    }

    #[allow(dead_code)] // used as commands grow verbose output
    pub fn debug(&self, msg: &str) {
        if self.level >= 3 {
            above(&format!("hasync: {msg}"));
        }
    }
}
