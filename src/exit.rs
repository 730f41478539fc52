//! Exit codes, defined once: `main` maps outcomes to them and the man page
//! lists them from the same table, so the two cannot disagree.

/// What a run of hasync came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Everything asked for was done.
    Ok,
    /// The operation failed; the message says what, on which node, and what to do.
    Failure,
    /// The command line was wrong (clap's own code).
    Usage,
    /// The configuration file is missing, unreadable or invalid.
    Config,
    /// `doctor` (and later `check`) found a problem on a node.
    ChecksFailed,
    /// Interrupted by SIGINT or SIGTERM.
    Interrupted,
    /// `check`: the monitoring plugin's own code (0 OK, 1 WARNING,
    /// 2 CRITICAL, 3 UNKNOWN), documented with the command.
    Plugin(u8),
}

impl Exit {
    pub const ALL: [Exit; 6] = [
        Exit::Ok,
        Exit::Failure,
        Exit::Usage,
        Exit::Config,
        Exit::ChecksFailed,
        Exit::Interrupted,
    ];

    pub fn code(self) -> u8 {
        match self {
            Exit::Ok => 0,
            Exit::Failure => 1,
            Exit::Usage => 2,
            Exit::Config => 3,
            Exit::ChecksFailed => 4,
            Exit::Interrupted => 130,
            Exit::Plugin(c) => c,
        }
    }

    pub fn meaning(self) -> &'static str {
        match self {
            Exit::Ok => "success",
            Exit::Failure => {
                "the operation failed; the message names the step, the node and what to do"
            }
            Exit::Usage => "bad command-line arguments",
            Exit::Config => {
                "the configuration file is missing, unreadable or invalid (file:line is shown)"
            }
            Exit::ChecksFailed => "doctor found a problem on a node",
            Exit::Interrupted => "interrupted by a signal (SIGINT or SIGTERM)",
            Exit::Plugin(_) => "hasync check: 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN",
        }
    }
}

impl From<Exit> for std::process::ExitCode {
    fn from(e: Exit) -> Self {
        std::process::ExitCode::from(e.code())
    }
}

/// The exit-code table as plain text, for `--help`.
pub fn help_text() -> String {
    let mut s = String::from("Exit status:\n");
    for e in Exit::ALL {
        s.push_str(&format!("  {:>3}  {}\n", e.code(), e.meaning()));
    }
    s
}
