//! The SSH transport, on libssh2 (the `ssh2` crate).
//!
//! Connections: every SSH connection is a [`Session`] that is connected, checked
//! against known_hosts and authenticated in one place ([`Shared::connect_session`]).
//! Idle authenticated sessions wait in a small pool, so a cycle's many short
//! commands pay for one handshake, while concurrent callers each get a
//! connection of their own: libssh2 serialises a session's I/O, so sharing one
//! between threads would make a slow command stall every other one.
//!
//! * `exec` borrows a pooled session and pumps it in the calling thread.
//! * `spawn` gives each [`Process`] its own session and a pump thread that
//!   bridges the channel to a Unix socket pair, so callers use plain blocking
//!   `Read`/`Write` and each stream gets its own TCP connection (and CPU core
//!   for the crypto).
//! * `tunnel` gives each [`Tunnel`] its own session and pump thread, with one
//!   direct-tcpip channel per accepted connection.
//! * `write_file`/`remove_file` use SFTP on a pooled session.
//!
//! Killing a remote command: libssh2 cannot send the SSH "signal" request once
//! a channel ran `exec` ("Channel can not be reused"), and closing the channel
//! only gives the command EOF and SIGPIPE. So each command is wrapped to print
//! its process group id first (see [`pump::wrap_command`]), and a timeout or
//! [`Process::kill`] runs `kill -KILL -- -<pgid>` over a second connection.

use std::env;
use std::ffi::CStr;
use std::fs;
use std::io::{self, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use base64::Engine as _;
use ssh2::{Channel, CheckResult, ErrorCode, HashType, KnownHostFileKind, MethodType, Session};

use super::known_hosts::{self, Entry};
use super::pump::{
    self, code, is_connection_lost, session_code, Bridge, Exit, Forwarder, LocalEnd, Pump,
    PumpError,
};
use super::{
    io_text, shell_quote, shorten, signal_status, temp_name, Address, Endpoint, ExecOutput,
    HostKey, Process, ProcessControl, StderrBuf, Transport, TransportError, Tunnel, TunnelControl,
    PROCESS_STDERR_KEEP,
};

/// Cipher preference, cheapest for libssh2 first. Counter-intuitively, AES-GCM
/// (OpenSSH's fastest) is libssh2's slowest: libssh2 feeds OpenSSL one 16-byte
/// block per call, which defeats AES-NI/CLMUL batching. Its chacha20-poly1305
/// is portable C but works on whole packets. Measured on the test machine, CPU
/// seconds per GiB received: chacha20 3.7-4.0, aes128-ctr 4.1-4.4, aes128-gcm
/// 5.3-6.9 (OpenSSH's client: 0.7 with aes128-gcm).
const CIPHERS: &str = "chacha20-poly1305@openssh.com,aes128-ctr,aes256-ctr,\
                       aes128-gcm@openssh.com,aes256-gcm@openssh.com,aes192-ctr";
/// Receive window of our command channels. libssh2's default is 2 MiB; a
/// larger window keeps a high-latency link full.
const CHANNEL_WINDOW: u32 = 16 * 1024 * 1024;
/// Largest packet we accept; libssh2 cannot take more than about 32 KiB.
const CHANNEL_PACKET: u32 = 32 * 1024;
/// Idle sessions kept for reuse.
const POOL_MAX: usize = 4;
/// Bound for blocking requests (channel open, SFTP) beyond the handshake:
/// a live sshd answers them at once, so waiting longer is waiting on a
/// silent node.
const MIN_OP_TIMEOUT: Duration = super::SILENCE_TIMEOUT;
/// Bound for the second-connection kill of a timed-out command.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);
/// Unacknowledged data older than this fails the TCP connection: the
/// kernel's backstop behind the pumps' own silence check (which comes first,
/// at [`super::SILENCE_TIMEOUT`], with the clearer message).
const TCP_USER_TIMEOUT_MS: libc::c_int = super::SILENCE_TIMEOUT.as_millis() as libc::c_int + 5_000;

/// An SSH node.
pub struct SshTransport {
    shared: Arc<Shared>,
}

/// Settings and the session pool; shared with pump threads, which need it to
/// give sessions back and to kill remote commands.
struct Shared {
    node: String,
    host: String,
    port: u16,
    user: String,
    identity_file: Option<PathBuf>,
    known_hosts: PathBuf,
    connect_timeout: Duration,
    pool: Mutex<Vec<Session>>,
}

impl SshTransport {
    /// Connect, verify the host key and authenticate once, so that a wrong
    /// address, key or identity is reported now.
    pub fn connect(endpoint: &Endpoint) -> Result<SshTransport, TransportError> {
        let Address::Ssh {
            host,
            port,
            user,
            identity_file,
            known_hosts,
        } = &endpoint.address
        else {
            unreachable!("transport::connect routes only SSH endpoints here");
        };
        let shared = Arc::new(Shared {
            node: endpoint.node.clone(),
            host: host.clone(),
            port: *port,
            user: user.clone(),
            identity_file: identity_file.clone(),
            known_hosts: known_hosts.clone(),
            connect_timeout: endpoint.connect_timeout,
            pool: Mutex::new(Vec::new()),
        });
        let session = shared.connect_session()?;
        shared.give_back(session);
        Ok(SshTransport { shared })
    }
}

impl Transport for SshTransport {
    fn node(&self) -> &str {
        &self.shared.node
    }

    fn describe(&self) -> String {
        format!("{}@{}", self.shared.user, self.shared.addr())
    }

    fn exec(
        &self,
        command: &str,
        stdin: &[u8],
        timeout: Option<Duration>,
    ) -> Result<ExecOutput, TransportError> {
        self.shared.exec(command, stdin, timeout, true)
    }

    fn spawn(&self, command: &str) -> Result<Process, TransportError> {
        let shared = &self.shared;
        let (session, chan) = shared.start(command, shared.op_timeout())?;
        let (ours, theirs) =
            UnixStream::pair().map_err(|e| shared.io("creating a socket pair", e))?;
        let (ctrl_tx, mut ctrl_rx) =
            UnixStream::pair().map_err(|e| shared.io("creating a socket pair", e))?;
        for s in [&ours, &theirs] {
            set_socket_buffers(s);
        }
        ours.set_nonblocking(true)
            .and_then(|()| ctrl_rx.set_nonblocking(true))
            .map_err(|e| shared.io("setting up a socket pair", e))?;
        let stdout = theirs
            .try_clone()
            .map_err(|e| shared.io("setting up a socket pair", e))?;

        let bridge = Bridge::command(
            chan,
            LocalEnd::Unix(ours),
            StderrBuf::bounded(PROCESS_STDERR_KEEP),
        );
        let thread_shared = Arc::clone(shared);
        let shown = command.to_string();
        let handle = thread::Builder::new()
            .name(format!("hasync-ssh-{}", shared.node))
            .spawn(move || {
                let mut pump = Pump::new(session, vec![bridge], None);
                let outcome = pump.run(None, Some(&mut ctrl_rx), false);
                thread_shared.finish(pump, outcome, &shown, None, true)
            })
            .map_err(|e| shared.io("starting a pump thread", e))?;
        Ok(Process::new(
            Box::new(StdinWriter(theirs)),
            Box::new(stdout),
            Box::new(SshProcess {
                ctrl: Some(ctrl_tx),
                handle: Some(handle),
                node: shared.node.clone(),
            }),
        ))
    }

    fn tunnel(&self, host: &str, port: u16) -> Result<Tunnel, TransportError> {
        let shared = &self.shared;
        let listener = TcpListener::bind(("127.0.0.1", 0))
            .map_err(|e| shared.io("listening on a local port for a tunnel", e))?;
        let local_addr = listener
            .local_addr()
            .map_err(|e| shared.io("listening on a local port for a tunnel", e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| shared.io("listening on a local port for a tunnel", e))?;
        let session = shared.take()?;
        let forwarder = Forwarder::new(listener, host, port);
        let last_error = Arc::clone(&forwarder.last_error);
        let (ctrl_tx, mut ctrl_rx) =
            UnixStream::pair().map_err(|e| shared.io("creating a socket pair", e))?;
        ctrl_rx
            .set_nonblocking(true)
            .map_err(|e| shared.io("setting up a socket pair", e))?;
        let thread_shared = Arc::clone(shared);
        let thread_last_error = Arc::clone(&last_error);
        let target = format!("{host}:{port}");
        let handle = thread::Builder::new()
            .name(format!("hasync-tunnel-{}", shared.node))
            .spawn(move || {
                let mut pump = Pump::new(session, Vec::new(), Some(forwarder));
                let outcome = pump.run(None, Some(&mut ctrl_rx), true);
                if let Err(e) = outcome {
                    // The listener closes with the pump, so clients now get
                    // "connection refused"; this says why.
                    let err = thread_shared.pump_error(e, &format!("tunnelling to {target}"));
                    *thread_last_error.lock().unwrap_or_else(|p| p.into_inner()) =
                        Some(err.to_string());
                }
                pump.abandon();
            })
            .map_err(|e| shared.io("starting a tunnel thread", e))?;
        Ok(Tunnel::new(
            local_addr,
            Some(Box::new(SshTunnel {
                ctrl: Some(ctrl_tx),
                handle: Some(handle),
                last_error,
            })),
        ))
    }

    fn write_file(&self, path: &str, contents: &[u8], mode: u32) -> Result<(), TransportError> {
        self.shared.with_sftp(&format!("writing {path}"), |sftp| {
            sftp_write_atomic(sftp, Path::new(path), contents, mode)
        })
    }

    fn remove_file(&self, path: &str) -> Result<(), TransportError> {
        self.shared.with_sftp(&format!("removing {path}"), |sftp| {
            match sftp.unlink(Path::new(path)) {
                Err(e) if is_sftp_not_found(&e) => Ok(()),
                other => other,
            }
        })
    }
}

impl Shared {
    fn addr(&self) -> String {
        super::host_port(&self.host, self.port)
    }

    fn op_timeout(&self) -> Duration {
        self.connect_timeout.max(MIN_OP_TIMEOUT)
    }

    fn io(&self, context: &str, e: io::Error) -> TransportError {
        TransportError::io(&self.node, context, e)
    }

    fn ssh(&self, context: impl Into<String>, e: ssh2::Error) -> TransportError {
        if is_connection_lost(&e) {
            // libssh2's own texts ("transport read") mean little to an operator.
            let detail = match session_code(&e) {
                Some(code::SOCKET_NONE | code::SOCKET_DISCONNECT) => {
                    "the connection was closed or broke off"
                }
                Some(code::SOCKET_RECV) => "receiving from the node failed",
                Some(code::SOCKET_SEND) => "sending to the node failed",
                _ => e.message(),
            };
            return TransportError::ConnectionLost {
                node: self.node.clone(),
                during: context.into(),
                detail: detail.to_string(),
            };
        }
        if session_code(&e) == Some(code::TIMEOUT) {
            // A blocking request the node did not answer in time.
            self.went_silent();
            return TransportError::Silent {
                node: self.node.clone(),
                during: context.into(),
                after: self.op_timeout(),
            };
        }
        TransportError::Ssh {
            node: self.node.clone(),
            context: context.into(),
            error: e,
        }
    }

    fn pump_error(&self, e: PumpError, during: &str) -> TransportError {
        match e {
            PumpError::Ssh(e) => self.ssh(during, e),
            PumpError::Io(e) => self.io(during, e),
            PumpError::Silent(quiet) => {
                self.went_silent();
                TransportError::Silent {
                    node: self.node.clone(),
                    during: during.to_string(),
                    after: Duration::from_secs(quiet.as_secs()),
                }
            }
            PumpError::Timeout => unreachable!("timeouts are handled by the caller"),
        }
    }

    /// The node stopped answering: say so to every later connection to it
    /// (see [`super::connect_timeout_for`]), and forget the idle sessions,
    /// which ride the same dead link (each would cost a timeout to find out).
    fn went_silent(&self) {
        super::note_silent(&self.addr());
        let pool = std::mem::take(&mut *self.pool.lock().unwrap_or_else(|p| p.into_inner()));
        for session in pool {
            // SAFETY: shutdown(2) on a descriptor the session still owns;
            // freeing it then cannot block on the network.
            unsafe {
                libc::shutdown(session.as_raw_fd(), libc::SHUT_RDWR);
            }
            drop(session);
        }
    }

    /// An idle authenticated session, unless the node went silent (seen by
    /// any transport to it): then the pool is emptied, see
    /// [`Shared::went_silent`].
    fn pooled(&self) -> Option<Session> {
        if super::went_silent(&self.addr()) {
            self.went_silent();
            return None;
        }
        self.pool.lock().unwrap_or_else(|p| p.into_inner()).pop()
    }

    /// An idle authenticated session, or a new one.
    fn take(&self) -> Result<Session, TransportError> {
        let pooled = self.pooled();
        match pooled {
            Some(s) => Ok(s),
            None => self.connect_session(),
        }
    }

    /// Return a session that finished its work cleanly.
    fn give_back(&self, session: Session) {
        session.set_blocking(true);
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        if pool.len() < POOL_MAX {
            pool.push(session);
        } else {
            drop(pool);
            say_goodbye(&session);
        }
    }

    /// Open a session channel running `command` (wrapped to report its
    /// pgid). A pooled session may have died while idle (sshd restarted, NAT
    /// timeout), so a failure there is retried once on a fresh connection.
    fn start(
        &self,
        command: &str,
        timeout: Duration,
    ) -> Result<(Session, Channel), TransportError> {
        let wrapped = pump::wrap_command(command);
        let pooled = self.pooled();
        if let Some(chan) = pooled
            .as_ref()
            .and_then(|session| start_command(session, &wrapped, timeout).ok())
        {
            return Ok((pooled.expect("checked"), chan));
        }
        let session = self.connect_session()?;
        match start_command(&session, &wrapped, timeout) {
            Ok(chan) => Ok((session, chan)),
            Err(e) if is_connection_lost(&e) || session_code(&e) == Some(code::TIMEOUT) => {
                Err(self.ssh(format!("starting `{}`", shorten(command)), e))
            }
            Err(e) => Err(TransportError::Start {
                node: self.node.clone(),
                command: shorten(command),
                detail: e.message().to_string(),
            }),
        }
    }

    /// `kill_on_timeout` is false only for the kill command itself, so a hung
    /// node cannot make kills chase each other.
    fn exec(
        &self,
        command: &str,
        stdin: &[u8],
        timeout: Option<Duration>,
        kill_on_timeout: bool,
    ) -> Result<ExecOutput, TransportError> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let open_timeout = timeout.map_or(self.op_timeout(), |t| t.min(self.op_timeout()));
        let (session, chan) = self.start(command, open_timeout)?;
        let local = LocalEnd::Memory {
            input: stdin.to_vec(),
            pos: 0,
            output: Vec::new(),
        };
        let bridge = Bridge::command(chan, local, StderrBuf::unbounded());
        let mut pump = Pump::new(session, vec![bridge], None);
        let outcome = pump.run(deadline, None, false);
        self.finish(pump, outcome, command, timeout, kill_on_timeout)
    }

    /// Turn a pump's end into the command's result; gives a clean session back
    /// to the pool and kills the remote process group after a timeout or kill.
    fn finish(
        &self,
        mut pump: Pump,
        outcome: Result<Exit, PumpError>,
        command: &str,
        timeout: Option<Duration>,
        kill_remote: bool,
    ) -> Result<ExecOutput, TransportError> {
        match outcome {
            Ok(Exit::Finished) => {
                let mut bridge = pump.bridges.pop().expect("one bridge");
                let out = ExecOutput {
                    status: bridge.exit_status.unwrap_or(-1),
                    stdout: bridge.take_stdout(),
                    stderr: bridge.take_stderr(),
                };
                drop(bridge);
                self.give_back(pump.session);
                Ok(out)
            }
            Ok(Exit::Killed | Exit::Stopped) | Err(PumpError::Timeout) => {
                let (pgid, stderr) = match pump.bridges.first_mut() {
                    Some(b) => (b.pgid, b.take_stderr()),
                    None => (None, Vec::new()),
                };
                pump.abandon();
                // Not through a silent node: the kill could not get there,
                // and trying costs a connect timeout.
                let reachable = !super::went_silent(&self.addr());
                if let Some(pgid) = pgid.filter(|_| kill_remote && reachable) {
                    // Best effort: the command may have ended meanwhile, or
                    // the node be unreachable.
                    let kill = format!("kill -KILL -- -{pgid}");
                    let _ = self.exec(&kill, &[], Some(KILL_TIMEOUT), false);
                }
                match (outcome, timeout) {
                    (Err(PumpError::Timeout), Some(after)) => Err(TransportError::Timeout {
                        node: self.node.clone(),
                        what: format!("`{}`", shorten(command)),
                        after,
                    }),
                    _ => Ok(ExecOutput {
                        status: signal_status(libc::SIGKILL),
                        stdout: Vec::new(),
                        stderr,
                    }),
                }
            }
            Err(e) => {
                pump.abandon();
                Err(self.pump_error(e, &format!("running `{}`", shorten(command))))
            }
        }
    }

    /// Run SFTP work on a pooled session (blocking mode). A pooled session that
    /// died while idle is replaced once by a fresh connection.
    fn with_sftp<T>(
        &self,
        what: &str,
        f: impl Fn(&ssh2::Sftp) -> Result<T, ssh2::Error>,
    ) -> Result<T, TransportError> {
        let attempt = |session: &Session| {
            session.set_blocking(true);
            session.set_timeout(millis(self.op_timeout()));
            let sftp = session.sftp().map_err(|e| {
                (
                    format!(
                        "{what}: starting SFTP (is the sftp subsystem enabled in sshd_config?)"
                    ),
                    e,
                )
            })?;
            f(&sftp).map_err(|e| (what.to_string(), e))
        };
        // An SFTP status (no such file, permission denied) leaves the session
        // healthy; anything else may not.
        let healthy = |r: &Result<T, (String, ssh2::Error)>| match r {
            Ok(_) => true,
            Err((_, e)) => matches!(e.code(), ErrorCode::SFTP(_)),
        };
        let pooled = self.pooled();
        if let Some(session) = pooled {
            let result = attempt(&session);
            if healthy(&result) {
                self.give_back(session);
                return result.map_err(|(context, e)| self.ssh(context, e));
            }
        }
        let session = self.connect_session()?;
        let result = attempt(&session);
        if healthy(&result) {
            self.give_back(session);
        }
        result.map_err(|(context, e)| self.ssh(context, e))
    }

    /// TCP connect, SSH handshake, host key check, authentication.
    fn connect_session(&self) -> Result<Session, TransportError> {
        let addr = self.addr();
        let tcp = self.tcp_connect(&addr)?;
        let text = self.read_known_hosts()?;
        let entries = text.as_deref().map(known_hosts::parse);
        let lookup = known_hosts::lookup_name(&self.host, self.port);

        let mut session = Session::new().map_err(|e| self.ssh("creating an SSH session", e))?;
        session.set_timeout(millis(self.connect_timeout));
        if let Some(entries) = &entries {
            let known_types = known_hosts::key_types_for(entries, &lookup);
            let supported = session
                .supported_algs(MethodType::HostKey)
                .map_err(|e| self.ssh("listing host key algorithms", e))?;
            if let Some(pref) = known_hosts::hostkey_preference(&known_types, &supported) {
                session
                    .method_pref(MethodType::HostKey, &pref)
                    .map_err(|e| self.ssh("setting host key preferences", e))?;
            }
        }
        for kind in [MethodType::CryptCs, MethodType::CryptSc] {
            session
                .method_pref(kind, CIPHERS)
                .map_err(|e| self.ssh("setting cipher preferences", e))?;
        }
        session.set_tcp_stream(tcp);
        session.handshake().map_err(|e| match session_code(&e) {
            Some(code::TIMEOUT) => TransportError::Timeout {
                node: self.node.clone(),
                what: format!("the SSH handshake with {addr}"),
                after: self.connect_timeout,
            },
            _ => self.ssh(
                format!("the SSH handshake with {addr} failed (is an SSH server listening there?)"),
                e,
            ),
        })?;
        let known = text.as_deref().zip(entries.as_deref());
        self.verify_host_key(&session, &lookup, known)?;
        self.authenticate(&session)?;
        session.set_keepalive(true, pump::KEEPALIVE_SECS);
        super::note_answered(&addr);
        Ok(session)
    }

    fn tcp_connect(&self, addr: &str) -> Result<TcpStream, TransportError> {
        let unreachable = |error| TransportError::Unreachable {
            node: self.node.clone(),
            addr: addr.to_string(),
            error,
        };
        let addrs: Vec<SocketAddr> = (self.host.as_str(), self.port)
            .to_socket_addrs()
            .map_err(unreachable)?
            .collect();
        let mut last_err = io::Error::new(io::ErrorKind::NotFound, "the name has no address");
        let timeout = super::connect_timeout_for(addr, self.connect_timeout);
        for a in &addrs {
            match TcpStream::connect_timeout(a, timeout) {
                Ok(tcp) => {
                    let _ = tcp.set_nodelay(true);
                    set_tcp_user_timeout(&tcp);
                    return Ok(tcp);
                }
                Err(e) => last_err = e,
            }
        }
        Err(unreachable(last_err))
    }

    /// The known_hosts file as text; `None` if it does not exist.
    fn read_known_hosts(&self) -> Result<Option<String>, TransportError> {
        match fs::read(&self.known_hosts) {
            Ok(bytes) => Ok(Some(String::from_utf8_lossy(&bytes).into_owned())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(error) => Err(TransportError::KnownHostsUnreadable {
                node: self.node.clone(),
                path: self.known_hosts.clone(),
                error,
            }),
        }
    }

    /// `known`: the known_hosts text and its parsed entries, if the file exists.
    fn verify_host_key(
        &self,
        session: &Session,
        lookup: &str,
        known: Option<(&str, &[Entry])>,
    ) -> Result<(), TransportError> {
        let (key, kind) = session.host_key().ok_or_else(|| {
            self.ssh(
                "reading the server's host key",
                ssh2::Error::new(ErrorCode::Session(code::HOSTKEY_INIT), "no host key"),
            )
        })?;
        let key_type = known_hosts::key_type_name(kind).to_string();
        let fingerprint =
            known_hosts::fingerprint(session.host_key_hash(HashType::Sha256).unwrap_or_default());
        let details = || {
            Box::new(HostKey {
                host: self.host.clone(),
                port: self.port,
                key_type: key_type.clone(),
                fingerprint: fingerprint.clone(),
                known_hosts: self.known_hosts.clone(),
            })
        };
        let unknown = |note: String| TransportError::UnknownHostKey {
            node: self.node.clone(),
            key: details(),
            note,
        };
        let Some((text, entries)) = known else {
            return Err(unknown(" (that file does not exist yet)".to_string()));
        };
        let key_b64 = base64::engine::general_purpose::STANDARD.encode(key);
        if known_hosts::is_revoked(entries, lookup, &key_b64) {
            return Err(TransportError::RevokedHostKey {
                node: self.node.clone(),
                key: details(),
            });
        }

        // libssh2 decides; its file reader gives up on the first line it
        // cannot parse, so lines are fed one by one and bad ones skipped.
        let mut checker = session
            .known_hosts()
            .map_err(|e| self.ssh("initialising the known hosts check", e))?;
        for line in text.lines() {
            if !line.trim_start().starts_with('@') {
                let _ = checker.read_str(line, KnownHostFileKind::OpenSSH);
            }
        }
        match checker.check_port(&self.host, self.port, key) {
            CheckResult::Match => Ok(()),
            CheckResult::NotFound => Err(unknown(String::new())),
            CheckResult::Mismatch => {
                // libssh2 compares against entries of every key type; only an
                // entry of the presented type makes this a changed key.
                let types = known_hosts::key_types_for(entries, lookup);
                if types.contains(&key_type) {
                    Err(TransportError::ChangedHostKey {
                        node: self.node.clone(),
                        key: details(),
                    })
                } else if types.is_empty() && self.port != 22 {
                    // libssh2 also accepts plain `host` entries, which are for port 22.
                    Err(unknown(format!(
                        " (it only has a key for {} on port 22)",
                        self.host
                    )))
                } else if types.is_empty() {
                    Err(unknown(String::new()))
                } else {
                    Err(unknown(format!(
                        " (it only has {} keys for this host, and the server presented another type)",
                        types.join("/")
                    )))
                }
            }
            CheckResult::Failure => Err(self.ssh(
                "checking the host key",
                ssh2::Error::new(
                    ErrorCode::Session(code::INVAL),
                    "libssh2 could not check the key",
                ),
            )),
        }
    }

    /// Public key authentication: the configured identity file only, or else
    /// ssh-agent and then the default key files, like ssh does.
    fn authenticate(&self, session: &Session) -> Result<(), TransportError> {
        let user = &self.user;
        let mut tried = Vec::new();
        let methods = match session.auth_methods(user) {
            Ok(m) => m.to_string(),
            // "none" authentication succeeded (an unusual server).
            Err(_) if session.authenticated() => return Ok(()),
            Err(e) => {
                return Err(self.ssh(format!("asking which authentication {user} may use"), e));
            }
        };
        if !methods.split(',').any(|m| m == "publickey") {
            tried.push(format!(
                "nothing: the server only offers {methods} and hasync authenticates with keys"
            ));
            return Err(self.auth_failed(tried));
        }

        if let Some(identity) = &self.identity_file {
            if self.try_key_file(session, identity, &mut tried)? {
                return Ok(());
            }
            return Err(self.auth_failed(tried));
        }
        if self.try_agent(session, &mut tried)? {
            return Ok(());
        }
        let ssh_dir = home_dir().map(|h| h.join(".ssh"));
        let mut any_default = false;
        for name in ["id_ed25519", "id_ecdsa", "id_rsa"] {
            let Some(path) = ssh_dir.as_ref().map(|d| d.join(name)) else {
                break;
            };
            if path.exists() {
                any_default = true;
                if self.try_key_file(session, &path, &mut tried)? {
                    return Ok(());
                }
            }
        }
        if !any_default {
            let dir = ssh_dir.map_or("~/.ssh".to_string(), |d| d.display().to_string());
            tried.push(format!(
                "default keys in {dir} (none of id_ed25519, id_ecdsa, id_rsa exists)"
            ));
        }
        Err(self.auth_failed(tried))
    }

    fn auth_failed(&self, tried: Vec<String>) -> TransportError {
        TransportError::AuthFailed {
            node: self.node.clone(),
            user: self.user.clone(),
            tried,
        }
    }

    /// Ok(true) when authenticated; connection-level failures are errors.
    fn try_key_file(
        &self,
        session: &Session,
        path: &Path,
        tried: &mut Vec<String>,
    ) -> Result<bool, TransportError> {
        let shown = path.display();
        let text = match fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) => {
                tried.push(format!("{shown} (cannot read it: {})", io_text(&e)));
                return Ok(false);
            }
        };
        if key_is_encrypted(&text) {
            tried.push(format!(
                "{shown} (protected by a passphrase: load it into ssh-agent with `ssh-add {}` \
                 and run hasync with SSH_AUTH_SOCK set, or use a key without passphrase)",
                shell_quote(&path.to_string_lossy())
            ));
            return Ok(false);
        }
        match session.userauth_pubkey_file(&self.user, None, path, None) {
            Ok(()) => Ok(true),
            Err(e) => self.note_auth_failure(e, shown.to_string(), tried),
        }
    }

    fn try_agent(
        &self,
        session: &Session,
        tried: &mut Vec<String>,
    ) -> Result<bool, TransportError> {
        if env::var_os("SSH_AUTH_SOCK").is_none() {
            tried.push("ssh-agent (not running: SSH_AUTH_SOCK is not set)".to_string());
            return Ok(false);
        }
        let mut agent = match session.agent() {
            Ok(a) => a,
            Err(e) => {
                tried.push(format!("ssh-agent ({})", e.message()));
                return Ok(false);
            }
        };
        if let Err(e) = agent.connect() {
            tried.push(format!("ssh-agent (cannot connect: {})", e.message()));
            return Ok(false);
        }
        let identities = agent
            .list_identities()
            .and_then(|()| agent.identities())
            .unwrap_or_default();
        if identities.is_empty() {
            tried.push("ssh-agent (no identities)".to_string());
        }
        for identity in &identities {
            let shown = format!("ssh-agent key {}", identity.comment());
            match agent.userauth(&self.user, identity) {
                Ok(()) => {
                    let _ = agent.disconnect();
                    return Ok(true);
                }
                Err(e) => {
                    if let Err(fatal) = self.note_auth_failure(e, shown, tried) {
                        let _ = agent.disconnect();
                        return Err(fatal);
                    }
                }
            }
        }
        let _ = agent.disconnect();
        Ok(false)
    }

    /// Record why a key did not work; a lost connection ends authentication.
    fn note_auth_failure(
        &self,
        e: ssh2::Error,
        shown: String,
        tried: &mut Vec<String>,
    ) -> Result<bool, TransportError> {
        match session_code(&e) {
            Some(code::AUTHENTICATION_FAILED | code::PUBLICKEY_UNVERIFIED) => {
                tried.push(format!("{shown} (rejected)"))
            }
            _ if is_connection_lost(&e) => {
                tried.push(format!("{shown} (the server closed the connection)"));
                return Err(self.auth_failed(std::mem::take(tried)));
            }
            Some(code::TIMEOUT) => {
                return Err(TransportError::Timeout {
                    node: self.node.clone(),
                    what: "SSH authentication".to_string(),
                    after: self.connect_timeout,
                });
            }
            _ => tried.push(format!("{shown} (unusable: {})", e.message())),
        }
        Ok(false)
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        if super::went_silent(&self.addr()) {
            // No goodbyes into a dead link (a second each).
            self.went_silent();
            return;
        }
        let pool = std::mem::take(self.pool.get_mut().unwrap_or_else(|p| p.into_inner()));
        for session in pool {
            say_goodbye(&session);
        }
    }
}

/// A polite disconnect, so the node logs a normal logout rather than a reset.
fn say_goodbye(session: &Session) {
    session.set_blocking(true);
    session.set_timeout(1000);
    let _ = session.disconnect(None, "hasync done", None);
}

/// Open a session channel with our window and run `command` in it.
fn start_command(
    session: &Session,
    command: &str,
    timeout: Duration,
) -> Result<Channel, ssh2::Error> {
    session.set_blocking(true);
    session.set_timeout(millis(timeout));
    let mut chan = session.channel_open("session", CHANNEL_WINDOW, CHANNEL_PACKET, None)?;
    chan.exec(command)?;
    Ok(chan)
}

/// SFTP part of `write_file`: temp file with the final mode, fsync, rename.
fn sftp_write_atomic(
    sftp: &ssh2::Sftp,
    path: &Path,
    contents: &[u8],
    mode: u32,
) -> Result<(), ssh2::Error> {
    let tmp = temp_name(path);
    let flags = ssh2::OpenFlags::WRITE | ssh2::OpenFlags::TRUNCATE | ssh2::OpenFlags::EXCLUSIVE;
    let mut file = sftp.open_mode(&tmp, flags, mode as i32, ssh2::OpenType::File)?;
    let written = (|| {
        // The server applies its umask at creation; set the exact mode.
        file.setstat(ssh2::FileStat {
            size: None,
            uid: None,
            gid: None,
            perm: Some(mode),
            atime: None,
            mtime: None,
        })?;
        file.write_all(contents).map_err(pump::ssh_error)?;
        // fsync@openssh.com; servers without it still get the rename.
        let _ = file.fsync();
        Ok(())
    })();
    drop(file);
    let renamed = written.and_then(|()| match sftp.rename(&tmp, path, None) {
        // SFTP v3 (what OpenSSH speaks) cannot rename over an existing file:
        // remove the old one first. Not atomic, but never leaves a partial
        // file in place.
        Err(e) if sftp.lstat(path).is_ok() => {
            sftp.unlink(path).map_err(|_| e)?;
            sftp.rename(&tmp, path, None)
        }
        other => other,
    });
    if renamed.is_err() {
        let _ = sftp.unlink(&tmp);
    }
    renamed
}

fn is_sftp_not_found(e: &ssh2::Error) -> bool {
    matches!(
        e.code(),
        ErrorCode::SFTP(code::FX_NO_SUCH_FILE | code::FX_NO_SUCH_PATH)
    )
}

/// Does this private key file need a passphrase? (PEM "ENCRYPTED" headers, or
/// an OpenSSH-format key whose cipher is not "none".)
fn key_is_encrypted(text: &str) -> bool {
    const BEGIN: &str = "-----BEGIN OPENSSH PRIVATE KEY-----";
    const END: &str = "-----END OPENSSH PRIVATE KEY-----";
    if let (Some(b), Some(e)) = (text.find(BEGIN), text.find(END)) {
        let body: String = text[b + BEGIN.len()..e]
            .chars()
            .filter(|c| !c.is_whitespace())
            .collect();
        let Ok(raw) = base64::engine::general_purpose::STANDARD.decode(body) else {
            return false;
        };
        let Some(rest) = raw.strip_prefix(b"openssh-key-v1\0") else {
            return false;
        };
        if rest.len() < 4 {
            return false;
        }
        let len = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        return rest.get(4..4 + len).is_some_and(|cipher| cipher != b"none");
    }
    text.contains("ENCRYPTED")
}

fn home_dir() -> Option<PathBuf> {
    if let Some(home) = env::var_os("HOME").filter(|h| !h.is_empty()) {
        return Some(PathBuf::from(home));
    }
    let mut buf = vec![0 as libc::c_char; 4096];
    // SAFETY: all-zero bytes are a valid `passwd` (null pointers, zero ids).
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: getpwuid_r writes into the buffers we own and passes their size.
    let rc = unsafe {
        libc::getpwuid_r(
            libc::getuid(),
            &mut pw,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        )
    };
    if rc != 0 || result.is_null() || pw.pw_dir.is_null() {
        return None;
    }
    // SAFETY: getpwuid_r succeeded, so pw_dir is a NUL-terminated string in `buf`.
    let dir = unsafe { CStr::from_ptr(pw.pw_dir) };
    Some(PathBuf::from(dir.to_string_lossy().into_owned()))
}

fn millis(d: Duration) -> u32 {
    d.as_millis().clamp(1, u32::MAX as u128) as u32
}

fn set_tcp_user_timeout(tcp: &TcpStream) {
    let value = TCP_USER_TIMEOUT_MS;
    // SAFETY: setsockopt with a pointer to a live c_int and its size.
    unsafe {
        libc::setsockopt(
            tcp.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_USER_TIMEOUT,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// Bigger socket buffers between the pump and the caller: fewer wakeups per
/// gigabyte. The kernel caps the value (net.core.wmem_max/rmem_max).
fn set_socket_buffers(s: &UnixStream) {
    let size: libc::c_int = 1024 * 1024;
    for opt in [libc::SO_SNDBUF, libc::SO_RCVBUF] {
        // SAFETY: setsockopt with a pointer to a live c_int and its size.
        unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&size as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
}

/// The caller's stdin: dropping it half-closes the socket, which the pump
/// turns into an SSH EOF.
struct StdinWriter(UnixStream);

impl Write for StdinWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for StdinWriter {
    fn drop(&mut self) {
        let _ = self.0.shutdown(Shutdown::Write);
    }
}

struct SshProcess {
    /// Writing a byte kills; dropping it lets the pump finish on its own.
    ctrl: Option<UnixStream>,
    handle: Option<JoinHandle<Result<ExecOutput, TransportError>>>,
    node: String,
}

impl ProcessControl for SshProcess {
    fn wait(mut self: Box<Self>) -> Result<ExecOutput, TransportError> {
        let handle = self.handle.take().expect("waited once");
        handle.join().unwrap_or_else(|_| {
            Err(TransportError::io(
                &self.node,
                "waiting for a remote command",
                io::Error::other("the pump thread panicked"),
            ))
        })
    }

    fn kill(&mut self) {
        if let Some(ctrl) = self.ctrl.as_mut() {
            let _ = ctrl.write_all(b"k");
        }
    }
}

struct SshTunnel {
    /// Dropping it stops the pump thread.
    ctrl: Option<UnixStream>,
    handle: Option<JoinHandle<()>>,
    last_error: Arc<Mutex<Option<String>>>,
}

impl TunnelControl for SshTunnel {
    fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl Drop for SshTunnel {
    fn drop(&mut self) {
        drop(self.ctrl.take());
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_passphrase_protected_keys() {
        // ssh-keygen -t ed25519 -N '' and -N secret, bodies shortened to the header.
        let plain = "-----BEGIN OPENSSH PRIVATE KEY-----\n\
                     b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW\n\
                     -----END OPENSSH PRIVATE KEY-----\n";
        let protected = "-----BEGIN OPENSSH PRIVATE KEY-----\n\
                         b3BlbnNzaC1rZXktdjEAAAAACmFlczI1Ni1jdHIAAAAGYmNyeXB0AAAAGAAAABA=\n\
                         -----END OPENSSH PRIVATE KEY-----\n";
        assert!(!key_is_encrypted(plain));
        assert!(key_is_encrypted(protected));
        assert!(key_is_encrypted(
            "-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\n"
        ));
        assert!(!key_is_encrypted("-----BEGIN RSA PRIVATE KEY-----\nMIIE\n"));
    }
}
