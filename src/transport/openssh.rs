//! Bulk streams through the system OpenSSH client (`ssh`).
//!
//! Why this exists: the SSH transport proper (`ssh.rs`) runs on libssh2, whose
//! ciphers are slow. Measured on the test machine, client CPU seconds
//! per GiB streamed: libssh2 3.7 (chacha20-poly1305, its fastest), OpenSSH
//! 1.4 with chacha20-poly1305 and 0.7-0.9 with aes128-gcm. hasync has to beat
//! `rsync -a` over OpenSSH, and the file-sync agent stream (`<agent_path>
//! agent`, full duplex, gigabytes) is its bulk path, so that one stream runs
//! through `ssh` while all control work (exec, tunnels, SFTP) stays on
//! libssh2. [`spawn_openssh`] returns the same [`Process`] as
//! [`super::Transport::spawn`], and the command runs the same way. Through
//! the [`Process`] pipes against the harness sshd (`openssh_throughput` in
//! the integration tests, release build), 1 GiB each way: this path 310-455
//! MB/s at 1.2-1.4 client CPU seconds (hasync plus `ssh`), libssh2's `spawn`
//! 110-165 MB/s at 4.2-5.2.
//!
//! Safety argument: `ssh` verifies the host key *strictly* against the same
//! known_hosts file the config names and libssh2 uses, and nothing else:
//! `StrictHostKeyChecking=yes` (an unknown or changed key is refused, never
//! added), `UserKnownHostsFile=<that file>`, `GlobalKnownHostsFile=/dev/null`,
//! `CheckHostIP=no`, `UpdateHostKeys=no` (the file is never written),
//! `VerifyHostKeyDNS=no`, `-F none` (no user or system config can add
//! options, proxies or a `KnownHostsCommand`), and `BatchMode=yes` (it never
//! asks anything). Only public-key authentication is offered; agent and X11
//! forwarding, port forwarding and connection sharing are off. Nothing secret
//! is on the command line: keys are files. So this path trusts exactly what
//! that file says. (One nuance: OpenSSH also honours `@cert-authority` lines
//! in it, host certificates libssh2 cannot check; that is still trust the
//! operator wrote into that file.)
//!
//! Like libssh2's `spawn`, [`spawn_openssh`] returns only once the command
//! runs on the node (the wrapper of `pump::wrap_command` reports the remote
//! process group id on stderr first): connection, host key and authentication
//! failures come back from [`spawn_openssh`] itself as the usual
//! [`TransportError`]s, and when `ssh` refuses a host key, nothing ran on the
//! node. For the fingerprint and the commands that fix a host key problem,
//! the refusal is re-checked with libssh2 (as `hasync doctor` does), which
//! reports the key the server presents.
//!
//! Differences from the libssh2 path an engine may notice: OpenSSH's client
//! does not pass on a remote death by signal (`exit-signal`); when the
//! command the login shell `exec`s is killed by a signal (SIGPIPE too, after
//! [`Process::wait`] dropped unread output), or the connection
//! is lost without `ssh` saying why, the status is 255. A node that stops
//! answering (`ServerAlive*`: [`super::SILENCE_TIMEOUT`] without a packet)
//! is [`TransportError::Silent`], as on the libssh2 path.

use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use super::local::LocalTransport;
use super::ssh::SshTransport;
use super::{
    io_text, pump, shorten, signal_status, Address, Endpoint, ExecOutput, Process, ProcessControl,
    StderrBuf, Transport, TransportError, PROCESS_STDERR_KEEP,
};

/// The client program, looked up on `PATH`.
const SSH_PROGRAM: &str = "ssh";

/// Whether the OpenSSH client is on `PATH` (for `ssh_client = "auto"`).
pub fn available() -> bool {
    std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|dir| {
            let p = dir.join(SSH_PROGRAM);
            std::fs::metadata(&p).is_ok_and(|m| {
                m.is_file() && {
                    use std::os::unix::fs::PermissionsExt;
                    m.permissions().mode() & 0o111 != 0
                }
            })
        })
    })
}

/// Cipher preference, cheapest first. Measured on the test machine (2 cores
/// with AES-NI, shared with other work, so wall times are noisy), `ssh` to a
/// local sshd, 1 GiB each way, CPU seconds of `ssh` plus the process at the
/// other end of its pipe: aes128-gcm 1.0-1.7 (240-570 MB/s),
/// chacha20-poly1305 1.9-2.5 (200-250 MB/s), aes128-ctr with umac 2.0-2.7
/// (165-245 MB/s). aes128-ctr is there for servers without the other two.
pub const CIPHERS: &str = "aes128-gcm@openssh.com,chacha20-poly1305@openssh.com,aes128-ctr";

/// A keepalive after every [`super::KEEPALIVE_EVERY`] of silence from the
/// server; when the count of unanswered ones would pass the maximum, `ssh`
/// ends the connection: (max + 1) intervals = [`super::SILENCE_TIMEOUT`]
/// without a packet from the node, as on the libssh2 path.
const SERVER_ALIVE_INTERVAL: u32 = super::KEEPALIVE_EVERY.as_secs() as u32;
const SERVER_ALIVE_COUNT_MAX: u32 =
    (super::SILENCE_TIMEOUT.as_secs() / super::KEEPALIVE_EVERY.as_secs()) as u32 - 1;
/// Bound for the steps after the TCP connect (key exchange, authentication,
/// starting the command), as the libssh2 transport's MIN_OP_TIMEOUT: a node
/// that answers does all that in well under a second.
const MIN_OP_TIMEOUT: Duration = super::SILENCE_TIMEOUT;
/// Bound for the second connection that kills a remote process group.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);
/// How much stderr may come before the pgid marker (ssh warnings, login
/// shell noise) before we stop looking for it.
const MARKER_SEARCH_LIMIT: usize = 64 * 1024;
/// What [`pump::wrap_command`] prints first.
const PGID_MARKER: &[u8] = b"hasync-pgid:";

/// Start `command` on the node of `endpoint` through the system OpenSSH
/// client, with full-duplex streaming, exactly as
/// [`super::Transport::spawn`] would run it (through the node's login shell).
///
/// Returns once the command runs on the node; connection, host key and
/// authentication failures are returned here. A local endpoint
/// ([`Address::Local`]) runs the command locally, like the local transport.
/// See the module docs for the `ssh` options and why they are safe.
/// Whether a node's bulk streams go through the system `ssh` client.
pub fn use_for(node: &crate::config::Node) -> bool {
    match node.ssh_client {
        crate::config::SshClient::Libssh2 => false,
        crate::config::SshClient::Openssh => true,
        crate::config::SshClient::Auto => available(),
    }
}

pub fn spawn_openssh(endpoint: &Endpoint, command: &str) -> Result<Process, TransportError> {
    let target = match Target::from_endpoint(endpoint) {
        Some(target) => Arc::new(target),
        None => return LocalTransport::new(&endpoint.node).spawn(command),
    };
    let mut child = target
        .command(&pump::wrap_command(command))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| target.start_error(command, &e))?;
    super::local::enlarge_pipes(&child);
    let stdin = child.stdin.take().expect("piped");
    let stdout = child.stdout.take().expect("piped");
    let err_pipe = child.stderr.take().expect("piped");
    let watch = Arc::new(StderrWatch::default());
    let thread_watch = Arc::clone(&watch);
    let reader = thread::Builder::new()
        .name(format!("hasync-openssh-{}", target.node))
        .spawn(move || read_stderr(err_pipe, &thread_watch));
    if let Err(e) = reader {
        reap(child);
        return Err(TransportError::io(
            &target.node,
            "starting a stderr thread",
            e,
        ));
    }

    // Wait until the command runs (its pgid arrived) or ssh gave up.
    let after = target.start_timeout();
    let deadline = Instant::now() + after;
    let mut state = watch.lock();
    while state.pgid.is_none() && state.done.is_none() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            drop(state);
            let _ = child.kill();
            reap(child);
            return Err(TransportError::Timeout {
                node: target.node.clone(),
                what: format!(
                    "connecting to {} and starting `{}` with OpenSSH",
                    target.addr(),
                    shorten(command)
                ),
                after,
            });
        }
        state = watch
            .changed
            .wait_timeout(state, left)
            .unwrap_or_else(|p| p.into_inner())
            .0;
    }
    let started = state.pgid.is_some();
    let stderr_so_far = state.done.clone();
    drop(state);
    if started {
        super::note_answered(&target.addr());
    }

    if !started {
        // ssh exited (its stderr closed) before the command printed its pgid.
        let status = child
            .wait()
            .map_err(|e| TransportError::io(&target.node, "waiting for ssh", e))?;
        let stderr = stderr_so_far.unwrap_or_default();
        if exit_code(status) == 255 {
            return Err(target.refusal(endpoint, command, &stderr));
        }
        // The login shell itself failed (e.g. no such shell): a finished
        // process, as the libssh2 path would report it.
    }
    Ok(Process::new(
        Box::new(stdin),
        Box::new(stdout),
        Box::new(OpensshProcess {
            child: Some(child),
            watch,
            target,
            command: command.to_string(),
            remote_kill: None,
            killed: false,
        }),
    ))
}

/// Everything `ssh` needs to reach one node; owned, so a kill can use it
/// from another thread.
#[derive(Debug)]
struct Target {
    node: String,
    host: String,
    port: u16,
    user: String,
    identity_file: Option<PathBuf>,
    known_hosts: PathBuf,
    connect_timeout: Duration,
}

impl Target {
    fn from_endpoint(endpoint: &Endpoint) -> Option<Target> {
        match &endpoint.address {
            Address::Local => None,
            Address::Ssh {
                host,
                port,
                user,
                identity_file,
                known_hosts,
            } => Some(Target {
                node: endpoint.node.clone(),
                host: host.clone(),
                port: *port,
                user: user.clone(),
                identity_file: identity_file.clone(),
                known_hosts: known_hosts.clone(),
                connect_timeout: endpoint.connect_timeout,
            }),
        }
    }

    fn addr(&self) -> String {
        super::host_port(&self.host, self.port)
    }

    /// How long `ssh` may take to run the command: the TCP connect, then
    /// the handshake, authentication and the command's start.
    fn start_timeout(&self) -> Duration {
        self.connect_timeout + self.connect_timeout.max(MIN_OP_TIMEOUT)
    }

    /// The arguments of `ssh`, without the program name.
    fn args(&self, remote_command: &str) -> Vec<OsString> {
        let mut args: Vec<OsString> = Vec::new();
        let mut push = |a: &str| args.push(a.into());
        // No config files: everything that matters is said here.
        push("-F");
        push("none");
        // No tty, no escape character: a clean 8-bit stream.
        push("-T");
        push("-e");
        push("none");
        push("-p");
        push(&self.port.to_string());
        push("-l");
        push(&self.user);
        push("-c");
        push(CIPHERS);
        let connect_timeout = super::connect_timeout_for(&self.addr(), self.connect_timeout)
            .as_secs_f64()
            .ceil()
            .max(1.0) as u64;
        let options = [
            // Never prompt, never accept a key that is not in known_hosts.
            "BatchMode=yes".to_string(),
            "StrictHostKeyChecking=yes".to_string(),
            format!(
                "UserKnownHostsFile={}",
                config_path_value(&self.known_hosts)
            ),
            "GlobalKnownHostsFile=/dev/null".to_string(),
            "CheckHostIP=no".to_string(),
            "UpdateHostKeys=no".to_string(),
            "VerifyHostKeyDNS=no".to_string(),
            // Keys only, like the libssh2 transport.
            "PreferredAuthentications=publickey".to_string(),
            // Nothing but the one session channel.
            "ForwardAgent=no".to_string(),
            "ForwardX11=no".to_string(),
            "ClearAllForwardings=yes".to_string(),
            "PermitLocalCommand=no".to_string(),
            "ControlMaster=no".to_string(),
            "ControlPath=none".to_string(),
            "ProxyCommand=none".to_string(),
            "ProxyJump=none".to_string(),
            format!("ConnectTimeout={connect_timeout}"),
            format!("ServerAliveInterval={SERVER_ALIVE_INTERVAL}"),
            format!("ServerAliveCountMax={SERVER_ALIVE_COUNT_MAX}"),
            "Compression=no".to_string(),
            // INFO, not ERROR: `ssh` says "Timeout, server ... not
            // responding" at INFO, and that line tells a silent node from
            // a command that exited 255.
            "LogLevel=INFO".to_string(),
        ];
        for option in &options {
            push("-o");
            push(option);
        }
        if let Some(identity) = &self.identity_file {
            // `-o IdentityFile=` rather than `-i`: `-i` checks the path
            // before ssh expands `%` in it, so a path with `%` cannot work.
            push("-o");
            push("IdentitiesOnly=yes");
            push("-o");
            push(&format!("IdentityFile={}", config_path_value(identity)));
        }
        push("--");
        push(&self.host);
        push(remote_command);
        args
    }

    fn command(&self, remote_command: &str) -> Command {
        let mut cmd = Command::new(SSH_PROGRAM);
        cmd.args(self.args(remote_command));
        cmd
    }

    fn start_error(&self, command: &str, e: &io::Error) -> TransportError {
        let detail = if e.kind() == io::ErrorKind::NotFound {
            "the OpenSSH client `ssh` is not installed or not on PATH; install it \
             (Debian: apt install openssh-client)"
                .to_string()
        } else {
            format!("cannot run `ssh`: {}", io_text(e))
        };
        TransportError::Start {
            node: self.node.clone(),
            command: shorten(command),
            detail,
        }
    }

    /// `ssh` exited 255 before the command started: turn what it printed
    /// into the error the libssh2 transport would give.
    fn refusal(&self, endpoint: &Endpoint, command: &str, stderr: &[u8]) -> TransportError {
        let text = String::from_utf8_lossy(stderr);
        let said = ssh_said(&text);
        let generic = |detail: String| TransportError::Start {
            node: self.node.clone(),
            command: shorten(command),
            detail,
        };
        match classify(&text) {
            Refusal::HostKey => {
                // libssh2 sees the key the server presents and reports it with
                // the commands that fix it, as `hasync doctor` does.
                match SshTransport::connect(endpoint) {
                    Err(
                        e @ (TransportError::UnknownHostKey { .. }
                        | TransportError::ChangedHostKey { .. }
                        | TransportError::RevokedHostKey { .. }
                        | TransportError::KnownHostsUnreadable { .. }),
                    ) => e,
                    _ => generic(format!(
                        "OpenSSH refused the host key of {} as not matching {} ({said}); \
                         run `hasync doctor` to see the key the server presents and how to \
                         trust it",
                        self.addr(),
                        self.known_hosts.display()
                    )),
                }
            }
            Refusal::Auth => match SshTransport::connect(endpoint) {
                Err(e @ TransportError::AuthFailed { .. }) => e,
                _ => TransportError::AuthFailed {
                    node: self.node.clone(),
                    user: self.user.clone(),
                    tried: self.tried(&said),
                },
            },
            Refusal::Unreachable(error) => TransportError::Unreachable {
                node: self.node.clone(),
                addr: self.addr(),
                error,
            },
            Refusal::HandshakeTimeout => TransportError::Timeout {
                node: self.node.clone(),
                what: format!("the SSH handshake with {}", self.addr()),
                after: self.connect_timeout,
            },
            Refusal::Closed => TransportError::ConnectionLost {
                node: self.node.clone(),
                during: format!("connecting to {}", self.addr()),
                detail: said,
            },
            Refusal::Other => generic(format!("ssh failed: {said}")),
        }
    }

    /// The keys OpenSSH offered, for [`TransportError::AuthFailed`].
    fn tried(&self, said: &str) -> Vec<String> {
        match &self.identity_file {
            Some(path) => match File::open(path) {
                Err(e) => vec![format!(
                    "{} (cannot read it: {})",
                    path.display(),
                    io_text(&e)
                )],
                Ok(_) => vec![format!("{} (rejected: {said})", path.display())],
            },
            None => vec![format!(
                "ssh-agent and the default keys in ~/.ssh, with OpenSSH (rejected: {said})"
            )],
        }
    }
}

/// A path as an `ssh -o` value: double-quoted (spaces), with `\` and `"`
/// escaped for ssh's argument splitter and `%` doubled for its token
/// expansion.
fn config_path_value(path: &Path) -> String {
    let mut out = String::from("\"");
    for c in path.to_string_lossy().chars() {
        match c {
            '\\' | '"' => {
                out.push('\\');
                out.push(c);
            }
            '%' => out.push_str("%%"),
            _ => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Why `ssh` gave up before the command started.
#[derive(Debug)]
enum Refusal {
    HostKey,
    Auth,
    Unreachable(io::Error),
    HandshakeTimeout,
    Closed,
    Other,
}

/// Sort what `ssh` printed (at `LogLevel=INFO`) when it exited 255.
fn classify(text: &str) -> Refusal {
    if text.contains("Host key verification failed")
        || text.contains("REMOTE HOST IDENTIFICATION HAS CHANGED")
        || text.contains("host key is known for")
    {
        return Refusal::HostKey;
    }
    if text.contains("Permission denied") || text.contains("Too many authentication failures") {
        return Refusal::Auth;
    }
    if text.contains("timed out during banner exchange") {
        return Refusal::HandshakeTimeout;
    }
    // "ssh: connect to host H port P: <reason>", "ssh: Could not resolve
    // hostname H: <reason>".
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("ssh: connect to host ") {
            let reason = rest.rsplit_once(": ").map_or(rest, |(_, r)| r).trim();
            let errno = match reason {
                "Connection refused" => Some(libc::ECONNREFUSED),
                "No route to host" => Some(libc::EHOSTUNREACH),
                "Network is unreachable" => Some(libc::ENETUNREACH),
                "Connection timed out" => Some(libc::ETIMEDOUT),
                _ => None,
            };
            let error = match errno {
                Some(n) => io::Error::from_raw_os_error(n),
                None => io::Error::other(reason.to_string()),
            };
            return Refusal::Unreachable(error);
        }
        if let Some(rest) = line.strip_prefix("ssh: Could not resolve hostname ") {
            let reason = rest.rsplit_once(": ").map_or(rest, |(_, r)| r).trim();
            return Refusal::Unreachable(io::Error::other(format!(
                "cannot resolve the name: {reason}"
            )));
        }
    }
    if text.contains("Connection closed by")
        || text.contains("Connection reset")
        || text.contains("kex_exchange_identification")
        || text.contains("closed by remote host")
    {
        return Refusal::Closed;
    }
    Refusal::Other
}

/// The most telling line `ssh` printed, for messages: the last non-empty
/// one that is not its closing "Host key verification failed.".
fn ssh_said(text: &str) -> String {
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('@'))
        .collect();
    let pick = lines
        .iter()
        .rev()
        .find(|l| !l.starts_with("Host key verification failed"))
        .or(lines.last());
    match pick {
        Some(line) => shorten(line.trim_end_matches('.')),
        None => "it exited with status 255 without saying why".to_string(),
    }
}

/// After the command started: a line in which `ssh` reports that the
/// connection broke, if there is one.
fn connection_lost(text: &str) -> Option<String> {
    const SIGNS: [&str; 8] = [
        "closed by remote host",
        "Connection reset by peer",
        "Broken pipe",
        "client_loop:",
        "packet_write_wait:",
        "ssh_dispatch_run_fatal:",
        "Timeout, server",
        "Connection timed out",
    ];
    text.lines()
        .rev()
        .map(str::trim)
        .find(|l| SIGNS.iter().any(|s| l.contains(s)))
        .map(|l| shorten(l.trim_end_matches('.')))
}

/// What the stderr thread found so far.
#[derive(Default)]
struct WatchState {
    /// The remote process group, once the command printed it.
    pgid: Option<u32>,
    /// All of stderr (the most recent bytes, marker removed), once `ssh`
    /// closed it.
    done: Option<Vec<u8>>,
}

#[derive(Default)]
struct StderrWatch {
    state: Mutex<WatchState>,
    changed: Condvar,
}

impl StderrWatch {
    fn lock(&self) -> MutexGuard<'_, WatchState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Stderr of `ssh`: its own messages and the remote command's stderr. The
/// pgid marker line is taken out and published; everything else is kept
/// (the last [`PROCESS_STDERR_KEEP`] bytes).
fn read_stderr(mut pipe: impl Read, watch: &StderrWatch) {
    let mut scan = MarkerScan::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        match pipe.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => {
                if let Some(pgid) = scan.push(&chunk[..n]) {
                    watch.lock().pgid = Some(pgid);
                    watch.changed.notify_all();
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    watch.lock().done = Some(scan.finish());
    watch.changed.notify_all();
}

/// Finds the marker line among the first lines of stderr.
struct MarkerScan {
    keep: StderrBuf,
    /// The current incomplete line while still searching.
    line: Vec<u8>,
    searching: bool,
    seen: usize,
}

impl MarkerScan {
    fn new() -> MarkerScan {
        MarkerScan {
            keep: StderrBuf::bounded(PROCESS_STDERR_KEEP),
            line: Vec::new(),
            searching: true,
            seen: 0,
        }
    }

    /// Feed stderr bytes; returns the pgid when the marker line completes.
    fn push(&mut self, mut data: &[u8]) -> Option<u32> {
        let mut found = None;
        while self.searching && !data.is_empty() {
            let Some(i) = data.iter().position(|&b| b == b'\n') else {
                self.line.extend_from_slice(data);
                data = &[];
                if self.line.len() > MARKER_SEARCH_LIMIT {
                    self.give_up();
                }
                break;
            };
            self.line.extend_from_slice(&data[..=i]);
            data = &data[i + 1..];
            let line = std::mem::take(&mut self.line);
            if let Some(pgid) = parse_marker(&line) {
                found = Some(pgid);
                self.searching = false;
            } else {
                self.seen += line.len();
                self.keep.push(&line);
                if self.seen > MARKER_SEARCH_LIMIT {
                    self.give_up();
                }
            }
        }
        if !data.is_empty() {
            self.keep.push(data);
        }
        found
    }

    fn give_up(&mut self) {
        self.searching = false;
        let line = std::mem::take(&mut self.line);
        self.keep.push(&line);
    }

    fn finish(mut self) -> Vec<u8> {
        self.give_up();
        self.keep.into_vec()
    }
}

fn parse_marker(line: &[u8]) -> Option<u32> {
    let digits = line.strip_prefix(PGID_MARKER)?.strip_suffix(b"\n")?;
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// The shell's exit code: `128 + n` for death by signal `n`.
fn exit_code(status: ExitStatus) -> i32 {
    match (status.code(), status.signal()) {
        (Some(code), _) => code,
        (None, Some(sig)) => signal_status(sig),
        (None, None) => -1,
    }
}

/// Wait for a child in the background: no zombies.
fn reap(mut child: Child) {
    let _ = thread::Builder::new()
        .name("hasync-openssh-reap".into())
        .spawn(move || {
            let _ = child.wait();
        });
}

/// `kill -KILL -- -<pgid>` on the node over a second connection, bounded by
/// [`KILL_TIMEOUT`]. Best effort: the command may have ended meanwhile, or
/// the node be unreachable.
fn kill_remote(target: &Target, pgid: u32) {
    // Not through a silent node: it could not get there.
    if super::went_silent(&target.addr()) {
        return;
    }
    let spawned = target
        .command(&format!("kill -KILL -- -{pgid}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let Ok(mut child) = spawned else {
        return;
    };
    let deadline = Instant::now() + KILL_TIMEOUT;
    loop {
        match child.try_wait() {
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return;
            }
            _ => return,
        }
    }
}

/// The [`ProcessControl`] of a command run through `ssh`.
struct OpensshProcess {
    child: Option<Child>,
    watch: Arc<StderrWatch>,
    target: Arc<Target>,
    command: String,
    /// The second connection killing the remote process group, if started.
    remote_kill: Option<thread::JoinHandle<()>>,
    killed: bool,
}

impl ProcessControl for OpensshProcess {
    fn wait(mut self: Box<Self>) -> Result<ExecOutput, TransportError> {
        let mut child = self.child.take().expect("waited once");
        let status = child
            .wait()
            .map_err(|e| TransportError::io(&self.target.node, "waiting for ssh", e));
        if let Some(h) = self.remote_kill.take() {
            let _ = h.join();
        }
        let status = exit_code(status?);
        // ssh is gone, so its stderr pipe is closed and the thread finishes.
        let stderr = {
            let mut state = self.watch.lock();
            loop {
                if let Some(done) = state.done.take() {
                    break done;
                }
                state = self
                    .watch
                    .changed
                    .wait(state)
                    .unwrap_or_else(|p| p.into_inner());
            }
        };
        if status == 255 && !self.killed {
            let text = String::from_utf8_lossy(&stderr);
            if text.contains("Timeout, server") && text.contains("not responding") {
                super::note_silent(&self.target.addr());
                return Err(TransportError::Silent {
                    node: self.target.node.clone(),
                    during: format!("running `{}`", shorten(&self.command)),
                    after: super::SILENCE_TIMEOUT,
                });
            }
            if let Some(detail) = connection_lost(&text) {
                return Err(TransportError::ConnectionLost {
                    node: self.target.node.clone(),
                    during: format!("running `{}`", shorten(&self.command)),
                    detail,
                });
            }
        }
        Ok(ExecOutput {
            status,
            stdout: Vec::new(),
            stderr,
        })
    }

    fn kill(&mut self) {
        let Some(child) = self.child.as_mut() else {
            return;
        };
        // Finished already (and now reaped): nothing to kill, and its pgid
        // may not be ours any more.
        if !matches!(child.try_wait(), Ok(None)) || self.killed {
            return;
        }
        self.killed = true;
        let _ = child.kill();
        // The remote command got EOF at most; kill its process group, as the
        // libssh2 transport does.
        let pgid = self.watch.lock().pgid;
        if let Some(pgid) = pgid {
            let target = Arc::clone(&self.target);
            self.remote_kill = thread::Builder::new()
                .name("hasync-openssh-kill".into())
                .spawn(move || kill_remote(&target, pgid))
                .ok();
        }
    }
}

impl Drop for OpensshProcess {
    fn drop(&mut self) {
        // Dropped without wait(): reap ssh in the background, no zombies.
        if let Some(child) = self.child.take() {
            reap(child);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target() -> Target {
        Target {
            node: "okm2".into(),
            host: "127.0.0.3".into(),
            port: 2222,
            user: "root".into(),
            identity_file: Some(PathBuf::from("/etc/hasync/id 50%")),
            known_hosts: PathBuf::from("/etc/hasync/known_hosts"),
            connect_timeout: Duration::from_millis(2500),
        }
    }

    #[test]
    fn arguments_verify_strictly_and_end_with_the_command() {
        let args: Vec<String> = target()
            .args("echo hi")
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        let has = |pair: [&str; 2]| args.windows(2).any(|w| w == pair);
        assert!(has(["-F", "none"]));
        assert!(has(["-o", "StrictHostKeyChecking=yes"]));
        assert!(has(["-o", "BatchMode=yes"]));
        assert!(has([
            "-o",
            "UserKnownHostsFile=\"/etc/hasync/known_hosts\""
        ]));
        assert!(has(["-o", "GlobalKnownHostsFile=/dev/null"]));
        assert!(has(["-o", "IdentityFile=\"/etc/hasync/id 50%%\""]));
        assert!(has(["-o", "ConnectTimeout=3"]));
        // 5 intervals of 2 s without a packet: the 10 s of SILENCE_TIMEOUT.
        assert!(has(["-o", "ServerAliveInterval=2"]));
        assert!(has(["-o", "ServerAliveCountMax=4"]));
        assert!(has(["-o", "LogLevel=INFO"]));
        assert!(has(["-p", "2222"]));
        assert!(has(["-l", "root"]));
        assert_eq!(&args[args.len() - 3..], ["--", "127.0.0.3", "echo hi"]);
    }

    #[test]
    fn paths_are_quoted_for_ssh() {
        assert_eq!(
            config_path_value(Path::new("/a b/c\"d\\e%f")),
            "\"/a b/c\\\"d\\\\e%%f\""
        );
    }

    #[test]
    fn refusals_are_recognised() {
        let unknown = "No ED25519 host key is known for [127.0.0.5]:2299 and you have \
                       requested strict checking.\nHost key verification failed.\n";
        assert!(matches!(classify(unknown), Refusal::HostKey));
        assert_eq!(
            ssh_said(unknown),
            "No ED25519 host key is known for [127.0.0.5]:2299 and you have requested \
             strict checking"
        );
        let auth = "root@127.0.0.5: Permission denied (publickey).\n";
        assert!(matches!(classify(auth), Refusal::Auth));
        match classify("ssh: connect to host 127.0.0.5 port 2298: Connection refused\n") {
            Refusal::Unreachable(e) => assert_eq!(io_text(&e), "Connection refused"),
            other => panic!("{other:?}"),
        }
        match classify("ssh: Could not resolve hostname x.invalid: Name or service not known\n") {
            Refusal::Unreachable(e) => assert_eq!(
                io_text(&e),
                "cannot resolve the name: Name or service not known"
            ),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            classify("Connection timed out during banner exchange\n"),
            Refusal::HandshakeTimeout
        ));
        assert!(matches!(
            classify("kex_exchange_identification: read: Connection reset by peer\n"),
            Refusal::Closed
        ));
        assert!(matches!(
            classify("Unable to negotiate with 127.0.0.5 port 22: no matching cipher found\n"),
            Refusal::Other
        ));
        assert_eq!(ssh_said(""), "it exited with status 255 without saying why");
    }

    #[test]
    fn lost_connections_are_recognised() {
        assert_eq!(
            connection_lost("some output\nConnection to 127.0.0.5 closed by remote host.\n")
                .as_deref(),
            Some("Connection to 127.0.0.5 closed by remote host")
        );
        assert_eq!(connection_lost("just the command's own error\n"), None);
    }

    #[test]
    fn the_marker_is_found_and_removed() {
        let mut scan = MarkerScan::new();
        assert_eq!(scan.push(b"Warning: something\nhasync-pg"), None);
        assert_eq!(scan.push(b"id:4242\nreal stderr\n"), Some(4242));
        assert_eq!(scan.push(b"hasync-pgid:1\n"), None);
        assert_eq!(
            scan.finish(),
            b"Warning: something\nreal stderr\nhasync-pgid:1\n"
        );
        let mut scan = MarkerScan::new();
        assert_eq!(scan.push(b"hasync-pgid:12x\nno newline"), None);
        assert_eq!(scan.finish(), b"hasync-pgid:12x\nno newline");
    }
}
