//! How a command or a byte stream reaches a node.
//!
//! Everything hasync does to a node goes through the [`Transport`] trait: run a
//! command ([`Transport::exec`]), stream a long-running one both ways
//! ([`Transport::spawn`], used for `hasync agent` and database dumps), reach a
//! TCP service as seen from the node ([`Transport::tunnel`]), and drop a small
//! secret file ([`Transport::write_file`]). Two implementations exist and both
//! are real: `local` runs processes on this machine, `ssh` speaks SSH with
//! libssh2. The engines never know which one they hold, so the same cycle code
//! runs against `localhost` and against a remote mirror.
//!
//! Decisions that shape the module:
//!
//! * **Host keys are always verified.** There is no "accept new keys" switch:
//!   an unknown or changed key stops the run with the fingerprint and the one
//!   command that trusts it after the operator checked it out of band.
//! * **Secrets never reach a command line.** `write_file` carries them over
//!   SFTP (or plain file I/O locally), created with their final mode.
//! * **Callers get plain blocking `Read`/`Write`.** The SSH side hides
//!   libssh2's non-blocking machinery behind a pump thread and a socket pair
//!   (see `pump.rs`), so an engine streams through a [`Process`] exactly as it
//!   would through a local child process.
//! * **Exit codes follow the shell convention everywhere**: a command killed by
//!   signal `n` reports `128 + n` on both transports.
//! * **Every error names the node and says what to do next**; the messages in
//!   [`TransportError`] are product text read by sysadmins.

mod known_hosts;
mod local;
pub mod openssh;
mod pump;
mod ssh;

use std::fmt;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How long a node may stay silent (not one packet back, although hasync
/// asks: SSH keepalives go out every [`KEEPALIVE_EVERY`] of quiet) before
/// its connection is given up on. A dropped link or a firewall that drops
/// packets is not a closed connection: without this bound TCP takes two
/// minutes or more to notice, and the primary's service stays down all that
/// time. One bound for every stream of both SSH clients (the libssh2 pumps,
/// `ssh`'s `ServerAlive*`), for blocking SSH requests, and through the
/// tunnels for the database control connections.
pub const SILENCE_TIMEOUT: Duration = Duration::from_secs(10);
/// Quiet after which a keepalive asks the node for an answer.
pub const KEEPALIVE_EVERY: Duration = Duration::from_secs(2);

/// The TCP connect timeout for a node that went silent in this run: the
/// link may be back (then it answers at once), but each later step must not
/// spend the full connect timeout finding out that it is not.
pub const RECONNECT_AFTER_SILENCE: Duration = Duration::from_secs(3);

/// `host:port`s that went silent in this process (see [`SILENCE_TIMEOUT`]).
/// Every transport and `ssh` process to the same address shares what one
/// of them found: the network path is the same.
static SILENT: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

fn silent_list() -> std::sync::MutexGuard<'static, Vec<String>> {
    SILENT.lock().unwrap_or_else(|p| p.into_inner())
}

/// `addr` gave no answer within [`SILENCE_TIMEOUT`].
pub(crate) fn note_silent(addr: &str) {
    let mut list = silent_list();
    if !list.iter().any(|a| a == addr) {
        list.push(addr.to_string());
    }
}

/// `addr` answered (a connection was set up): it is not silent any more.
pub(crate) fn note_answered(addr: &str) {
    silent_list().retain(|a| a != addr);
}

/// Whether `addr` went silent and has not answered since.
pub(crate) fn went_silent(addr: &str) -> bool {
    silent_list().iter().any(|a| a == addr)
}

/// The TCP connect timeout for `addr`: `normal`, or
/// [`RECONNECT_AFTER_SILENCE`] once it went silent.
pub(crate) fn connect_timeout_for(addr: &str, normal: Duration) -> Duration {
    if went_silent(addr) {
        normal.min(RECONNECT_AFTER_SILENCE)
    } else {
        normal
    }
}

/// How to reach one node. Built by the config module from the user's TOML; plain types only.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// Node name, used in every error message.
    pub node: String,
    pub address: Address,
    /// Bounds the TCP connect, the SSH handshake and authentication.
    pub connect_timeout: Duration,
}

#[derive(Debug, Clone)]
pub enum Address {
    /// The machine hasync runs on: local processes, no SSH.
    Local,
    Ssh {
        host: String,
        port: u16,
        user: String,
        identity_file: Option<PathBuf>,
        known_hosts: PathBuf,
    },
}

/// What a finished command left behind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    /// Exit code; a command killed by signal `n` reports `128 + n`.
    pub status: i32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// How many stderr lines [`ExecOutput::stderr_tail`] keeps.
const TAIL_LINES: usize = 5;
/// Longest single line [`ExecOutput::stderr_tail`] keeps, in characters.
const TAIL_LINE_CHARS: usize = 300;

impl ExecOutput {
    pub fn success(&self) -> bool {
        self.status == 0
    }

    /// The last few non-empty stderr lines (lossy UTF-8), for error messages.
    pub fn stderr_tail(&self) -> String {
        let text = String::from_utf8_lossy(&self.stderr);
        let lines: Vec<&str> = text
            .lines()
            .map(str::trim_end)
            .filter(|l| !l.is_empty())
            .collect();
        let start = lines.len().saturating_sub(TAIL_LINES);
        lines[start..]
            .iter()
            .map(|line| match line.char_indices().nth(TAIL_LINE_CHARS) {
                Some((cut, _)) => format!("{}...", &line[..cut]),
                None => (*line).to_string(),
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// One way of reaching a node. Implementations are cheap to share between
/// threads; each call may run concurrently with the others.
pub trait Transport: Send + Sync {
    fn node(&self) -> &str;

    /// `"root@127.0.0.2:2222"` or `"local"`.
    fn describe(&self) -> String;

    /// Run `command` through the node's shell (`sh -c` locally; the login
    /// shell over SSH, as ssh does), feeding `stdin`, capturing stdout and
    /// stderr concurrently, with an optional timeout after which the command is
    /// killed and [`TransportError::Timeout`] returned.
    ///
    /// Like ssh, the call returns once the command exited *and* closed its
    /// output: a daemon started without redirecting its stdout/stderr keeps the
    /// call waiting (until the timeout, if any).
    fn exec(
        &self,
        command: &str,
        stdin: &[u8],
        timeout: Option<Duration>,
    ) -> Result<ExecOutput, TransportError>;

    /// Start a long-running command with full-duplex streaming.
    fn spawn(&self, command: &str) -> Result<Process, TransportError>;

    /// A TCP tunnel to `host:port` as seen from the node. Ordinary TCP clients
    /// connect to [`Tunnel::local_addr`]; dropping the handle stops it.
    fn tunnel(&self, host: &str, port: u16) -> Result<Tunnel, TransportError>;

    /// Write a small file atomically, created with `mode` from the start (never
    /// briefly world-readable). Used for secrets: the content never appears on
    /// a command line.
    fn write_file(&self, path: &str, contents: &[u8], mode: u32) -> Result<(), TransportError>;

    /// Remove a file; a file that is already gone is not an error.
    fn remove_file(&self, path: &str) -> Result<(), TransportError>;
}

/// Open a transport to `endpoint`. For SSH this connects, verifies the host key
/// and authenticates right away, so configuration problems surface here.
pub fn connect(endpoint: &Endpoint) -> Result<Box<dyn Transport>, TransportError> {
    match &endpoint.address {
        Address::Local => Ok(Box::new(local::LocalTransport::new(&endpoint.node))),
        Address::Ssh { .. } => Ok(Box::new(ssh::SshTransport::connect(endpoint)?)),
    }
}

/// This machine as node `node`, whatever its configured address: for what
/// runs on the node itself (the health server probing its own service).
pub fn on_this_machine(node: &str) -> Box<dyn Transport> {
    Box::new(local::LocalTransport::new(node))
}

/// A running command started by [`Transport::spawn`].
///
/// `stdin` and `stdout` are ordinary blocking streams; use them from different
/// threads to stream both ways at once.
pub struct Process {
    /// Dropping it sends EOF to the command.
    pub stdin: Option<Box<dyn Write + Send>>,
    pub stdout: Box<dyn Read + Send>,
    control: Box<dyn ProcessControl>,
}

/// The transport-specific half of a [`Process`].
pub(crate) trait ProcessControl: Send {
    fn wait(self: Box<Self>) -> Result<ExecOutput, TransportError>;
    fn kill(&mut self);
}

/// Bytes of stderr a [`Process`] keeps (the most recent ones).
pub const PROCESS_STDERR_KEEP: usize = 64 * 1024;

impl Process {
    pub(crate) fn new(
        stdin: Box<dyn Write + Send>,
        stdout: Box<dyn Read + Send>,
        control: Box<dyn ProcessControl>,
    ) -> Process {
        Process {
            stdin: Some(stdin),
            stdout,
            control,
        }
    }

    /// Take the command's stdin; dropping it sends EOF to the command.
    pub fn take_stdin(&mut self) -> Option<Box<dyn Write + Send>> {
        self.stdin.take()
    }

    /// Wait for the command to exit. Returns its status and the last
    /// [`PROCESS_STDERR_KEEP`] bytes of stderr (`stdout` is empty).
    ///
    /// Drops `stdin` and `stdout` first, as a shell pipeline would: a command
    /// still writing output nobody reads gets SIGPIPE instead of blocking
    /// forever (over SSH the channel is closed and the status is 141), so read
    /// `stdout` to the end first if the output matters. After
    /// [`Process::kill`] the status is 137 (SIGKILL), unless the command had
    /// already finished.
    pub fn wait(self) -> Result<ExecOutput, TransportError> {
        let Process {
            stdin,
            stdout,
            control,
        } = self;
        drop(stdin);
        drop(stdout);
        control.wait()
    }

    /// Stop the command now. Locally: SIGKILL to its process group. Over SSH:
    /// the channel and its connection are closed and the remote process group
    /// is sent SIGKILL through a second connection.
    pub fn kill(&mut self) {
        self.control.kill();
    }
}

/// A forwarded TCP port; see [`Transport::tunnel`].
pub struct Tunnel {
    /// Where ordinary TCP clients connect.
    pub local_addr: SocketAddr,
    forwarder: Option<Box<dyn TunnelControl>>,
}

/// The transport-specific half of a [`Tunnel`]; dropping it stops forwarding.
pub(crate) trait TunnelControl: Send {
    fn last_error(&self) -> Option<String>;
}

impl Tunnel {
    pub(crate) fn new(local_addr: SocketAddr, forwarder: Option<Box<dyn TunnelControl>>) -> Tunnel {
        Tunnel {
            local_addr,
            forwarder,
        }
    }

    /// Why the most recent forwarded connection failed, if one did (e.g. the
    /// node refused the connection to the target port). A client that sees its
    /// connection closed right away should put this in its error message.
    pub fn last_error(&self) -> Option<String> {
        self.forwarder.as_ref().and_then(|f| f.last_error())
    }
}

impl fmt::Debug for Tunnel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tunnel")
            .field("local_addr", &self.local_addr)
            .finish_non_exhaustive()
    }
}

/// `host:port`, with an IPv6 host in brackets.
pub(crate) fn host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Quote a string for a POSIX shell. Every command hasync builds uses this.
///
/// Words made only of characters no shell treats specially come back as they
/// are (readable logs and dry-run output); everything else is wrapped in `'...'`
/// with each `'` written as `'\''`.
pub fn shell_quote(s: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "_-+,./:@%".contains(c);
    if !s.is_empty() && s.chars().all(plain) {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len() + 2);
    out.push('\'');
    for c in s.chars() {
        if c == '\'' {
            out.push_str("'\\''");
        } else {
            out.push(c);
        }
    }
    out.push('\'');
    out
}

/// Collects a command's stderr, optionally keeping only the most recent
/// `limit` bytes so a chatty long-running command cannot exhaust memory.
#[derive(Debug, Default)]
pub(crate) struct StderrBuf {
    buf: Vec<u8>,
    limit: Option<usize>,
}

impl StderrBuf {
    pub(crate) fn unbounded() -> StderrBuf {
        StderrBuf::default()
    }

    pub(crate) fn bounded(limit: usize) -> StderrBuf {
        StderrBuf {
            buf: Vec::new(),
            limit: Some(limit),
        }
    }

    pub(crate) fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
        // Trim only once the buffer is twice the limit, so the cost of moving
        // bytes is amortised over many writes.
        match self.limit {
            Some(limit) if self.buf.len() > 2 * limit => {
                let excess = self.buf.len() - limit;
                self.buf.drain(..excess);
            }
            _ => {}
        }
    }

    pub(crate) fn into_vec(mut self) -> Vec<u8> {
        match self.limit {
            Some(limit) if self.buf.len() > limit => {
                let excess = self.buf.len() - limit;
                self.buf.drain(..excess);
            }
            _ => {}
        }
        self.buf
    }
}

/// A unique sibling name for a temporary file.
pub(crate) fn temp_name(path: &Path) -> PathBuf {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let name = path
        .file_name()
        .map_or_else(|| "file".into(), |n| n.to_string_lossy().into_owned());
    path.with_file_name(format!(
        ".{name}.hasync-{}-{nanos}-{n}.tmp",
        std::process::id()
    ))
}

/// Commands in error messages: long SQL or scripts are cut.
pub(crate) fn shorten(command: &str) -> String {
    const MAX: usize = 200;
    match command.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{}...", &command[..cut]),
        None => command.to_string(),
    }
}

/// An I/O error as a sysadmin wants to read it: "Connection refused", without
/// std's " (os error 111)" suffix.
pub(crate) fn io_text(e: &io::Error) -> String {
    let text = e.to_string();
    match text.find(" (os error ") {
        Some(i) if text.ends_with(')') => text[..i].to_string(),
        _ => text,
    }
}

/// `128 + n`, the shell's way of reporting death by signal `n`.
pub(crate) fn signal_status(signal: i32) -> i32 {
    128 + signal
}

/// Human-friendly duration for messages: "30s", "1.5s", "250ms", "2m 5s".
pub(crate) fn fmt_duration(d: &Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms < 60_000 {
        if ms % 1000 == 0 {
            format!("{}s", ms / 1000)
        } else {
            format!("{:.1}s", d.as_secs_f64())
        }
    } else {
        let s = d.as_secs();
        match s % 60 {
            0 => format!("{}m", s / 60),
            r => format!("{}m {}s", s / 60, r),
        }
    }
}

/// A host key the server presented, with what an operator needs to judge it.
/// Boxed inside [`TransportError`] to keep the error small.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostKey {
    pub host: String,
    pub port: u16,
    /// As in known_hosts, e.g. `ssh-ed25519`.
    pub key_type: String,
    /// `SHA256:...`, as `ssh-keygen -lf` prints it.
    pub fingerprint: String,
    /// The file that was consulted.
    pub known_hosts: PathBuf,
}

impl HostKey {
    /// What to run on the node to see the fingerprint of its real key.
    pub fn verify_command(&self) -> String {
        known_hosts::verify_command(&self.key_type)
    }

    /// The one command that trusts the key (after it was verified).
    pub fn trust_command(&self) -> String {
        known_hosts::trust_command(&self.host, self.port, &self.key_type, &self.known_hosts)
    }

    /// The command that forgets the node's old keys.
    pub fn remove_command(&self) -> String {
        known_hosts::remove_command(&self.host, self.port, &self.known_hosts)
    }
}

/// Everything that can go wrong reaching a node. Each message says what failed,
/// on which node, and what to do about it.
///
/// The underlying I/O or libssh2 error is part of the message and kept in a
/// field named `error`, deliberately not exposed as `source()`: hasync prints
/// errors with their chain (`{:#}`), which would repeat it.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error(
        "node {node}: cannot reach {addr} ({cause}); check that the host is up, sshd runs and \
         the address/port in the config are right",
        cause = io_text(error),
    )]
    Unreachable {
        node: String,
        addr: String,
        error: io::Error,
    },

    #[error(
        "node {node}: the SSH host key of {host}:{port} is not trusted: it is not in {path}{note}. \
         The server presents {key_type} {fingerprint}. Verify that fingerprint on the node itself \
         (`{verify}` must print it), then trust the key with: {trust}",
        host = .key.host,
        port = .key.port,
        key_type = .key.key_type,
        fingerprint = .key.fingerprint,
        path = .key.known_hosts.display(),
        verify = .key.verify_command(),
        trust = .key.trust_command(),
    )]
    UnknownHostKey {
        node: String,
        key: Box<HostKey>,
        /// Why it is unknown beyond "no entry", e.g. " (that file does not exist yet)".
        note: String,
    },

    #[error(
        "WARNING: the SSH host key of node {node} ({host}:{port}) has CHANGED: the server now \
         presents {key_type} {fingerprint}, which does not match the key recorded in {path}. \
         Someone may be intercepting the connection, or the server was reinstalled; hasync will \
         not connect. If you know it was reinstalled, check the new fingerprint on the node \
         (`{verify}`), remove the old key with `{remove}` and trust the new one with `{trust}`",
        host = .key.host,
        port = .key.port,
        key_type = .key.key_type,
        fingerprint = .key.fingerprint,
        path = .key.known_hosts.display(),
        verify = .key.verify_command(),
        remove = .key.remove_command(),
        trust = .key.trust_command(),
    )]
    ChangedHostKey { node: String, key: Box<HostKey> },

    #[error(
        "node {node}: the SSH host key of {host}:{port} ({key_type} {fingerprint}) is marked \
         @revoked in {path}; hasync will not connect. Give the node a new host key and trust that \
         one instead",
        host = .key.host,
        port = .key.port,
        key_type = .key.key_type,
        fingerprint = .key.fingerprint,
        path = .key.known_hosts.display(),
    )]
    RevokedHostKey { node: String, key: Box<HostKey> },

    #[error(
        "node {node}: cannot read the known_hosts file {path} ({cause}); fix its permissions or \
         point known_hosts in the config at a readable file",
        path = .path.display(),
        cause = io_text(error),
    )]
    KnownHostsUnreadable {
        node: String,
        path: PathBuf,
        error: io::Error,
    },

    #[error(
        "node {node}: SSH authentication as {user} failed; tried {tried}; add the public key to \
         ~{user}/.ssh/authorized_keys on the node or set identity_file in the config",
        tried = .tried.join(", "),
    )]
    AuthFailed {
        node: String,
        user: String,
        tried: Vec<String>,
    },

    #[error("node {node}: {what} timed out after {after}", after = fmt_duration(after))]
    Timeout {
        node: String,
        what: String,
        after: Duration,
    },

    #[error(
        "node {node}: no answer for {after} while {during}: the network to it or the node \
         itself went silent (a dropped link, a firewall dropping packets, a hung server); \
         hasync gave up on it; check the link and that sshd answers there",
        after = fmt_duration(after),
    )]
    Silent {
        node: String,
        during: String,
        after: Duration,
    },

    #[error(
        "node {node}: the SSH connection was lost while {during} ({detail}); check the network \
         and that sshd still runs on the node"
    )]
    ConnectionLost {
        node: String,
        during: String,
        detail: String,
    },

    #[error("node {node}: could not start `{command}` ({detail})")]
    Start {
        node: String,
        command: String,
        detail: String,
    },

    #[error("node {node}: {context}: {msg}", msg = .error.message())]
    Ssh {
        node: String,
        context: String,
        error: ssh2::Error,
    },

    #[error("node {node}: {context}: {cause}", cause = io_text(error))]
    Io {
        node: String,
        context: String,
        error: io::Error,
    },
}

impl TransportError {
    /// The node the error is about.
    pub fn node(&self) -> &str {
        match self {
            TransportError::Unreachable { node, .. }
            | TransportError::UnknownHostKey { node, .. }
            | TransportError::ChangedHostKey { node, .. }
            | TransportError::RevokedHostKey { node, .. }
            | TransportError::KnownHostsUnreadable { node, .. }
            | TransportError::AuthFailed { node, .. }
            | TransportError::Timeout { node, .. }
            | TransportError::Silent { node, .. }
            | TransportError::ConnectionLost { node, .. }
            | TransportError::Start { node, .. }
            | TransportError::Ssh { node, .. }
            | TransportError::Io { node, .. } => node,
        }
    }

    pub(crate) fn io(node: &str, context: impl Into<String>, error: io::Error) -> TransportError {
        TransportError::Io {
            node: node.to_string(),
            context: context.into(),
            error,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_quote_leaves_plain_words_alone() {
        assert_eq!(shell_quote("abc"), "abc");
        assert_eq!(
            shell_quote("/var/lib/okm-1.2/x_y,z:@%+"),
            "/var/lib/okm-1.2/x_y,z:@%+"
        );
    }

    #[test]
    fn shell_quote_wraps_everything_else() {
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
        assert_eq!(shell_quote("$(rm -rf /)"), "'$(rm -rf /)'");
        assert_eq!(shell_quote("A=B"), "'A=B'");
        assert_eq!(shell_quote("~root"), "'~root'");
        assert_eq!(shell_quote("a\nb"), "'a\nb'");
        assert_eq!(shell_quote("[127.0.0.3]:2222"), "'[127.0.0.3]:2222'");
    }

    #[test]
    fn shell_quote_round_trips_through_sh() {
        let nasty = "it's \"quoted\" $HOME `id` \\ \n\t*?[a] ~ ; & | é";
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("printf %s {}", shell_quote(nasty)))
            .output()
            .unwrap();
        assert_eq!(String::from_utf8(out.stdout).unwrap(), nasty);
    }

    #[test]
    fn stderr_tail_keeps_last_lines() {
        let out = ExecOutput {
            status: 1,
            stdout: vec![],
            stderr: b"1\n2\n\n3\n4\n5\n6\n7  \n".to_vec(),
        };
        assert_eq!(out.stderr_tail(), "3\n4\n5\n6\n7");
        let long = ExecOutput {
            status: 1,
            stdout: vec![],
            stderr: "é".repeat(400).into_bytes(),
        };
        assert_eq!(long.stderr_tail().chars().count(), TAIL_LINE_CHARS + 3);
    }

    #[test]
    fn bounded_stderr_keeps_the_end() {
        let mut b = StderrBuf::bounded(10);
        for i in 0..100u8 {
            b.push(&[i]);
        }
        assert_eq!(b.into_vec(), (90..100u8).collect::<Vec<_>>());
    }

    #[test]
    fn temp_names_are_hidden_siblings() {
        let t = temp_name(Path::new("/etc/hasync/my.cnf"));
        assert_eq!(t.parent(), Some(Path::new("/etc/hasync")));
        let name = t.file_name().unwrap().to_string_lossy().into_owned();
        assert!(name.starts_with(".my.cnf.hasync-") && name.ends_with(".tmp"));
        assert_ne!(t, temp_name(Path::new("/etc/hasync/my.cnf")));
    }

    #[test]
    fn errors_stay_small() {
        // clippy::result_large_err flags anything above 128 bytes, in every
        // module whose Result carries a TransportError.
        assert!(std::mem::size_of::<TransportError>() <= 128);
    }

    #[test]
    fn host_key_messages_carry_the_commands() {
        let err = TransportError::ChangedHostKey {
            node: "okm2".into(),
            key: Box::new(HostKey {
                host: "127.0.0.3".into(),
                port: 2222,
                key_type: "ssh-ed25519".into(),
                fingerprint: "SHA256:abc".into(),
                known_hosts: PathBuf::from("/root/.ssh/known_hosts"),
            }),
        };
        let msg = err.to_string();
        assert!(
            msg.starts_with("WARNING: the SSH host key of node okm2 (127.0.0.3:2222) has CHANGED")
        );
        assert!(msg.contains("ssh-keygen -R '[127.0.0.3]:2222' -f /root/.ssh/known_hosts"));
        assert!(msg.contains("ssh-keyscan -p 2222 -t ed25519 127.0.0.3 >> /root/.ssh/known_hosts"));
        assert!(msg.contains("ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub"));
        assert_eq!(err.node(), "okm2");
    }

    #[test]
    fn causes_are_in_the_message_not_the_chain() {
        use std::error::Error as _;
        let err = TransportError::Unreachable {
            node: "okm2".into(),
            addr: "127.0.0.3:22".into(),
            error: io::Error::from_raw_os_error(libc::ECONNREFUSED),
        };
        assert_eq!(
            err.to_string(),
            "node okm2: cannot reach 127.0.0.3:22 (Connection refused); check that the host is \
             up, sshd runs and the address/port in the config are right"
        );
        assert!(err.source().is_none());
    }

    #[test]
    fn io_errors_read_well() {
        let e = io::Error::from_raw_os_error(libc::ECONNREFUSED);
        assert_eq!(io_text(&e), "Connection refused");
        assert_eq!(io_text(&io::Error::other("plain")), "plain");
    }

    #[test]
    fn durations_read_well() {
        assert_eq!(fmt_duration(&Duration::from_millis(250)), "250ms");
        assert_eq!(fmt_duration(&Duration::from_secs(30)), "30s");
        assert_eq!(fmt_duration(&Duration::from_millis(1500)), "1.5s");
        assert_eq!(fmt_duration(&Duration::from_secs(125)), "2m 5s");
        assert_eq!(fmt_duration(&Duration::from_secs(120)), "2m");
    }
}
