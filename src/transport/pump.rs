//! The engine that moves bytes between libssh2 channels and local file
//! descriptors without ever blocking on one of them.
//!
//! Why it exists: a libssh2 session serialises all I/O of its channels, and a
//! blocking read waits for data on *one* stream. A blocking stdout read while
//! the remote command fills its stderr window deadlocks; a blocking read on one
//! tunnelled connection starves the others. So every session runs in
//! non-blocking mode, driven by one loop (this pump) that tries every possible
//! transfer, and only when nothing moved sleeps in `poll(2)` on the session's
//! socket (in the directions libssh2 says it is blocked on) plus the local
//! descriptors. Each channel is a [`Bridge`] with two big buffers (one per
//! direction) so neither direction ever waits for the other, and stderr is
//! always drained into a buffer.
//!
//! libssh2's non-blocking API has rules this code is built around:
//!
//! * After `EAGAIN` from a call that started sending a packet, that packet is
//!   already encrypted and half-queued; libssh2 refuses any *other* packet until
//!   the same call is repeated. Channel writes, window adjustments and closes
//!   keep their packet in the channel, so repeating them is safe, and a bridge
//!   never abandons such a write. (A write that found the peer's window closed
//!   also says `EAGAIN` but queued nothing; it may be dropped, which matters
//!   when the peer stops reading and closes.)
//! * `send_eof` and `keepalive_send` build their packet on the C stack; they
//!   are only ever called from one non-inlined call site each (so a repeat
//!   passes the same address), keepalives only when the session is idle, and
//!   `close` only after our EOF went out (otherwise it would send one from a
//!   different stack frame).
//! * libssh2 reads whole packets off the socket for *any* channel, so data for
//!   one channel may already sit in memory while its socket is quiet: before
//!   sleeping the pump checks each channel's queued bytes.
//!
//! **Silence.** A dropped link is not a closed connection: nothing arrives,
//! and TCP alone takes minutes to say so. libssh2 sends keepalives but never
//! counts the answers, so the pump asks the kernel instead (`TCP_INFO`: when
//! the last segment from the node arrived, data or acknowledgement). After
//! [`super::KEEPALIVE_EVERY`] of quiet a keepalive (which sshd answers)
//! goes out; after [`super::SILENCE_TIMEOUT`] without one packet back, or
//! with a keepalive that long unanswered (the node's kernel acknowledges,
//! its sshd says nothing), the pump fails with [`PumpError::Silent`], like
//! `ssh`'s `ServerAliveCountMax`. While the pump pushes bulk data it cannot
//! send keepalives; the node's acknowledgements count then. A node that is
//! busy (a long query, a slow disk) still answers: sshd replies to
//! keepalives whatever its commands do.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ssh2::{BlockDirections, Channel, ErrorCode, Session};

use super::StderrBuf;

/// Size of each per-direction buffer. Large buffers mean few syscalls per
/// gigabyte; libssh2 itself moves at most one 32 KiB packet per write call.
const BUF_SIZE: usize = 256 * 1024;
/// Seconds between keepalives on a quiet session (libssh2 counts whole
/// seconds; see [`super::KEEPALIVE_EVERY`]).
pub(crate) const KEEPALIVE_SECS: u32 = super::KEEPALIVE_EVERY.as_secs() as u32;
/// How often a pump asks the kernel when the node last sent anything.
const SILENCE_CHECK: Duration = Duration::from_millis(250);
/// Upper bound for one `poll` sleep; a safety net, not a pacing mechanism.
const MAX_SLEEP: Duration = Duration::from_secs(1);
/// How often a busy pump looks at its control socket.
const CTRL_CHECK: Duration = Duration::from_millis(20);
/// Marker line a wrapped command prints on stderr before running (see
/// [`wrap_command`]); stripped before the caller sees stderr.
const PGID_MARKER: &[u8] = b"hasync-pgid:";

/// Prefix `command` with a line that reports the shell's process id on stderr.
/// sshd starts every session in a new session (`setsid`), so that id is also
/// the process group of everything the command runs: it is what a timeout or
/// [`super::Process::kill`] kills, through a second connection.
pub(crate) fn wrap_command(command: &str) -> String {
    format!("printf 'hasync-pgid:%s\\n' \"$$\" >&2\n{command}")
}

/// A contiguous byte buffer with a read and a write position.
struct Buf {
    data: Box<[u8]>,
    start: usize,
    end: usize,
}

impl Buf {
    fn new(size: usize) -> Buf {
        Buf {
            data: vec![0; size].into_boxed_slice(),
            start: 0,
            end: 0,
        }
    }

    fn is_empty(&self) -> bool {
        self.start == self.end
    }

    fn has_space(&self) -> bool {
        self.end < self.data.len() || self.start > 0
    }

    fn pending(&self) -> &[u8] {
        &self.data[self.start..self.end]
    }

    fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    fn clear(&mut self) {
        self.start = 0;
        self.end = 0;
    }

    /// Free space at the end, moving pending bytes to the front if needed.
    fn space(&mut self) -> &mut [u8] {
        if self.end == self.data.len() && self.start > 0 {
            self.data.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        &mut self.data[self.end..]
    }

    fn commit(&mut self, n: usize) {
        self.end += n;
    }
}

/// The local side of a bridge.
pub(crate) enum LocalEnd {
    /// `exec`: stdin from memory, stdout collected in memory.
    Memory {
        input: Vec<u8>,
        pos: usize,
        output: Vec<u8>,
    },
    /// `spawn`: the pump's half of the socket pair the caller reads and writes.
    Unix(UnixStream),
    /// `tunnel`: an accepted client connection.
    Tcp(TcpStream),
}

impl LocalEnd {
    fn fd(&self) -> Option<RawFd> {
        match self {
            LocalEnd::Memory { .. } => None,
            LocalEnd::Unix(s) => Some(s.as_raw_fd()),
            LocalEnd::Tcp(s) => Some(s.as_raw_fd()),
        }
    }

    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            LocalEnd::Memory { input, pos, .. } => {
                let n = buf.len().min(input.len() - *pos);
                buf[..n].copy_from_slice(&input[*pos..*pos + n]);
                *pos += n;
                Ok(n)
            }
            LocalEnd::Unix(s) => s.read(buf),
            LocalEnd::Tcp(s) => s.read(buf),
        }
    }

    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            LocalEnd::Memory { output, .. } => {
                output.extend_from_slice(buf);
                Ok(buf.len())
            }
            LocalEnd::Unix(s) => s.write(buf),
            LocalEnd::Tcp(s) => s.write(buf),
        }
    }

    fn shutdown_write(&mut self) {
        // Errors mean the peer is gone already, which is what we wanted.
        match self {
            LocalEnd::Memory { .. } => {}
            LocalEnd::Unix(s) => drop(s.shutdown(Shutdown::Write)),
            LocalEnd::Tcp(s) => drop(s.shutdown(Shutdown::Write)),
        }
    }
}

/// Why a pump stopped with an error.
#[derive(Debug)]
pub(crate) enum PumpError {
    /// The deadline passed.
    Timeout,
    /// Not one packet from the node for this long (see the module docs).
    Silent(Duration),
    /// libssh2 failed.
    Ssh(ssh2::Error),
    /// `poll` failed.
    Io(io::Error),
}

impl From<ssh2::Error> for PumpError {
    fn from(e: ssh2::Error) -> PumpError {
        PumpError::Ssh(e)
    }
}

/// The libssh2 error codes this module distinguishes (`LIBSSH2_ERROR_*`).
pub(crate) mod code {
    pub(crate) const SOCKET_NONE: i32 = -1;
    pub(crate) const SOCKET_SEND: i32 = -7;
    pub(crate) const TIMEOUT: i32 = -9;
    pub(crate) const HOSTKEY_INIT: i32 = -10;
    pub(crate) const SOCKET_DISCONNECT: i32 = -13;
    pub(crate) const AUTHENTICATION_FAILED: i32 = -18;
    pub(crate) const PUBLICKEY_UNVERIFIED: i32 = -19;
    pub(crate) const CHANNEL_FAILURE: i32 = -21;
    pub(crate) const CHANNEL_CLOSED: i32 = -26;
    pub(crate) const CHANNEL_EOF_SENT: i32 = -27;
    pub(crate) const SOCKET_TIMEOUT: i32 = -30;
    pub(crate) const INVAL: i32 = -34;
    pub(crate) const EAGAIN: i32 = -37;
    pub(crate) const SOCKET_RECV: i32 = -43;
    /// SFTP status codes (`LIBSSH2_FX_*`).
    pub(crate) const FX_NO_SUCH_FILE: i32 = 2;
    pub(crate) const FX_NO_SUCH_PATH: i32 = 10;
}

/// The ssh2 error behind an `io::Error` from a channel's or SFTP file's
/// Read/Write (which only ever wrap ssh2 errors).
pub(crate) fn ssh_error(e: io::Error) -> ssh2::Error {
    match e.into_inner().map(|inner| inner.downcast::<ssh2::Error>()) {
        Some(Ok(inner)) => *inner,
        _ => ssh2::Error::new(ErrorCode::Session(code::SOCKET_NONE), "SSH I/O failed"),
    }
}

/// The libssh2 session error code, if it is one.
pub(crate) fn session_code(e: &ssh2::Error) -> Option<i32> {
    match e.code() {
        ErrorCode::Session(c) => Some(c),
        ErrorCode::SFTP(_) => None,
    }
}

fn is_eagain(e: &ssh2::Error) -> bool {
    session_code(e) == Some(code::EAGAIN)
}

/// Errors that mean "the other end of this channel is gone", which a bridge
/// treats like a broken pipe rather than a failure of the session.
fn is_channel_gone(e: &ssh2::Error) -> bool {
    matches!(
        session_code(e),
        Some(code::CHANNEL_CLOSED | code::CHANNEL_EOF_SENT)
    )
}

/// Is this libssh2 error a lost connection (rather than a protocol problem)?
pub(crate) fn is_connection_lost(e: &ssh2::Error) -> bool {
    matches!(
        session_code(e),
        Some(
            code::SOCKET_NONE
                | code::SOCKET_SEND
                | code::SOCKET_DISCONNECT
                | code::SOCKET_TIMEOUT
                | code::SOCKET_RECV
        )
    )
}

/// One channel and its local counterpart.
pub(crate) struct Bridge {
    chan: Channel,
    local: LocalEnd,
    up: Buf,
    down: Buf,
    /// `None` for tunnels: direct-tcpip channels have no stderr.
    stderr: Option<StderrBuf>,
    /// Bytes of the first stderr line while we look for [`PGID_MARKER`].
    marker: Option<Vec<u8>>,
    pub(crate) pgid: Option<u32>,

    local_eof: bool,
    local_gone: bool,
    write_pending: bool,
    eof_sent: bool,
    remote_eof: bool,
    local_shut: bool,
    remote_closed: bool,
    closed: bool,
    pub(crate) exit_status: Option<i32>,

    want_local_read: bool,
    want_local_write: bool,
}

impl Bridge {
    /// A command channel (exec/spawn): stderr captured, pgid marker expected.
    pub(crate) fn command(chan: Channel, local: LocalEnd, stderr: StderrBuf) -> Bridge {
        Bridge::new(chan, local, Some(stderr))
    }

    /// A tunnelled TCP connection.
    fn forward(chan: Channel, local: TcpStream) -> Bridge {
        Bridge::new(chan, LocalEnd::Tcp(local), None)
    }

    fn new(chan: Channel, local: LocalEnd, stderr: Option<StderrBuf>) -> Bridge {
        let marker = stderr.as_ref().map(|_| Vec::new());
        Bridge {
            chan,
            local,
            up: Buf::new(BUF_SIZE),
            down: Buf::new(BUF_SIZE),
            stderr,
            marker,
            pgid: None,
            local_eof: false,
            local_gone: false,
            write_pending: false,
            eof_sent: false,
            remote_eof: false,
            local_shut: false,
            remote_closed: false,
            closed: false,
            exit_status: None,
            want_local_read: false,
            want_local_write: false,
        }
    }

    pub(crate) fn done(&self) -> bool {
        self.closed && self.local_shut && self.down.is_empty()
    }

    /// The collected stdout of an `exec` (empty for other local ends).
    pub(crate) fn take_stdout(&mut self) -> Vec<u8> {
        match &mut self.local {
            LocalEnd::Memory { output, .. } => std::mem::take(output),
            _ => Vec::new(),
        }
    }

    pub(crate) fn take_stderr(&mut self) -> Vec<u8> {
        self.flush_marker();
        self.stderr
            .take()
            .map(StderrBuf::into_vec)
            .unwrap_or_default()
    }

    /// Does libssh2 already hold something for us that the socket will not
    /// announce again?
    fn has_buffered_input(&self) -> bool {
        if self.remote_eof || self.local_gone || !self.down.has_space() {
            return false;
        }
        self.chan.read_window().available > 0 || self.chan.eof()
    }

    /// Try every transfer once. Returns whether anything moved.
    fn step(&mut self, session: &Session, want: &mut i16) -> Result<bool, PumpError> {
        let mut progress = false;
        self.want_local_read = false;
        self.want_local_write = false;

        // Stop taking input once the other side is gone for good.
        if (self.remote_closed || self.local_gone) && !self.write_pending {
            if !self.up.is_empty() || !self.local_eof {
                progress = true;
            }
            self.up.clear();
            self.local_eof = true;
        }

        // Local input -> up buffer.
        if !self.local_eof && self.up.has_space() {
            match self.local.read(self.up.space()) {
                Ok(0) => {
                    self.local_eof = true;
                    progress = true;
                }
                Ok(n) => {
                    self.up.commit(n);
                    progress = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.want_local_read = true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => progress = true,
                Err(_) => {
                    self.local_eof = true;
                    self.local_gone = true;
                    progress = true;
                }
            }
        }

        // Up buffer -> channel. A write that returned EAGAIN is repeated even
        // after the remote closed: libssh2 must finish that packet.
        while !self.up.is_empty() && (!self.remote_closed || self.write_pending) {
            match self.chan.write(self.up.pending()) {
                Ok(0) => {
                    *want |= directions(session);
                    break;
                }
                Ok(n) => {
                    self.up.consume(n);
                    self.write_pending = false;
                    progress = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // EAGAIN with an open window means libssh2 built the
                    // packet and must be called again; with a closed window it
                    // built nothing (and, if the remote closed, never will).
                    self.write_pending = self.chan.write_window().remaining > 0;
                    *want |= directions(session);
                    break;
                }
                Err(e) => {
                    let e = ssh_error(e);
                    if !is_channel_gone(&e) {
                        return Err(e.into());
                    }
                    self.write_pending = false;
                    self.up.clear();
                    self.local_eof = true;
                    progress = true;
                }
            }
        }

        // Our EOF, once all input is out.
        if self.local_eof && self.up.is_empty() && !self.write_pending && !self.eof_sent {
            match send_eof(&mut self.chan) {
                Ok(()) => {
                    self.eof_sent = true;
                    progress = true;
                }
                Err(e) if is_eagain(&e) => *want |= directions(session),
                Err(e) if is_channel_gone(&e) => {
                    self.eof_sent = true;
                    progress = true;
                }
                Err(e) => return Err(e.into()),
            }
        }

        // Channel stdout -> down buffer.
        if !self.remote_eof && !self.local_gone && self.down.has_space() {
            match self.chan.read(self.down.space()) {
                Ok(0) => {
                    if self.chan.eof() {
                        self.remote_eof = true;
                        progress = true;
                    } else {
                        *want |= directions(session);
                    }
                }
                Ok(n) => {
                    self.down.commit(n);
                    progress = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => *want |= directions(session),
                Err(e) => {
                    let e = ssh_error(e);
                    if !is_channel_gone(&e) {
                        return Err(e.into());
                    }
                    self.remote_eof = true;
                    progress = true;
                }
            }
        }

        // Channel stderr, always drained so it can never block stdout.
        if self.stderr.is_some() {
            progress |= self.drain_stderr(session, want)?;
        }

        // Down buffer -> local output.
        if !self.down.is_empty() {
            match self.local.write(self.down.pending()) {
                Ok(n) => {
                    self.down.consume(n);
                    progress = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.want_local_write = true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => progress = true,
                Err(_) => {
                    self.local_gone = true;
                    self.down.clear();
                    progress = true;
                }
            }
        }

        // Remote EOF -> local EOF once everything before it was delivered.
        if self.remote_eof && self.down.is_empty() && !self.local_shut {
            self.local.shutdown_write();
            self.local_shut = true;
            progress = true;
        }

        // Remote close: the command has exited and its output is complete.
        if self.remote_eof && !self.remote_closed {
            match self.chan.wait_close() {
                Ok(()) => {
                    self.remote_closed = true;
                    progress = true;
                }
                Err(e) if is_eagain(&e) => *want |= directions(session),
                Err(e) if is_channel_gone(&e) => {
                    self.remote_closed = true;
                    progress = true;
                }
                Err(e) => return Err(e.into()),
            }
        }

        // Our close: after the remote's, or early when the local side vanished
        // (a tunnel client reset, or a caller that dropped unread stdout: like
        // a pipeline, the command then gets SIGPIPE when it writes). Only once
        // our EOF is out, see the module docs.
        let close_now = self.remote_closed || self.local_gone;
        if close_now && self.eof_sent && !self.write_pending && !self.closed {
            if self.stderr.is_some() {
                // Whatever stderr is still queued is part of the output.
                progress |= self.drain_stderr(session, want)?;
            }
            match self.chan.close() {
                Err(e) if is_eagain(&e) => *want |= directions(session),
                // Any other error: the channel is unusable either way.
                _ => {
                    // Cut off by us: sshd sends no exit status for a channel we
                    // closed first (and libssh2 would report 0), so report
                    // what the command gets, SIGPIPE.
                    self.exit_status = Some(if self.remote_closed {
                        self.exit_code()
                    } else {
                        super::signal_status(libc::SIGPIPE)
                    });
                    self.closed = true;
                    self.remote_closed = true;
                    self.remote_eof = true;
                    progress = true;
                }
            }
        }
        Ok(progress)
    }

    fn drain_stderr(&mut self, session: &Session, want: &mut i16) -> Result<bool, PumpError> {
        let mut progress = false;
        let mut chunk = [0u8; 32 * 1024];
        let mut stream = self.chan.stderr();
        loop {
            match stream.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => {
                    self.push_stderr(&chunk[..n]);
                    progress = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    *want |= directions(session);
                    break;
                }
                Err(e) => {
                    let e = ssh_error(e);
                    if is_channel_gone(&e) {
                        break;
                    }
                    return Err(e.into());
                }
            }
        }
        Ok(progress)
    }

    /// Stderr, minus the pgid marker line the wrapper prints first.
    fn push_stderr(&mut self, mut data: &[u8]) {
        if let Some(line) = self.marker.as_mut() {
            let newline = data.iter().position(|&b| b == b'\n');
            let take = newline.map_or(data.len(), |i| i + 1);
            line.extend_from_slice(&data[..take]);
            data = &data[take..];
            if newline.is_some() || line.len() > 64 {
                self.flush_marker();
            }
        }
        if let Some(stderr) = self.stderr.as_mut() {
            stderr.push(data);
        }
    }

    /// Parse the first stderr line: the pgid marker is consumed, anything else
    /// is ordinary stderr.
    fn flush_marker(&mut self) {
        let Some(line) = self.marker.take() else {
            return;
        };
        let pgid = line
            .strip_prefix(PGID_MARKER)
            .and_then(|rest| std::str::from_utf8(rest).ok())
            .and_then(|rest| rest.trim_end().parse::<u32>().ok());
        match pgid {
            Some(pgid) if line.ends_with(b"\n") => self.pgid = Some(pgid),
            _ => {
                if let Some(stderr) = self.stderr.as_mut() {
                    stderr.push(&line);
                }
            }
        }
    }

    /// The command's exit code, `128 + n` if a signal killed it.
    fn exit_code(&self) -> i32 {
        match self.chan.exit_signal().ok().and_then(|s| s.exit_signal) {
            Some(name) => super::signal_status(signal_number(&name)),
            None => self.chan.exit_status().unwrap_or(-1),
        }
    }
}

/// Signal numbers for the names SSH reports (RFC 4254 6.10, without "SIG").
fn signal_number(name: &str) -> i32 {
    match name {
        "HUP" => libc::SIGHUP,
        "INT" => libc::SIGINT,
        "QUIT" => libc::SIGQUIT,
        "ILL" => libc::SIGILL,
        "TRAP" => libc::SIGTRAP,
        "ABRT" => libc::SIGABRT,
        "BUS" => libc::SIGBUS,
        "FPE" => libc::SIGFPE,
        "KILL" => libc::SIGKILL,
        "USR1" => libc::SIGUSR1,
        "SEGV" => libc::SIGSEGV,
        "USR2" => libc::SIGUSR2,
        "PIPE" => libc::SIGPIPE,
        "ALRM" => libc::SIGALRM,
        "TERM" => libc::SIGTERM,
        "XCPU" => libc::SIGXCPU,
        "XFSZ" => libc::SIGXFSZ,
        "SYS" => libc::SIGSYS,
        // Unknown names still must not look like success.
        _ => 127,
    }
}

/// The only call site of `send_eof` (see the module docs for why that matters).
#[inline(never)]
fn send_eof(chan: &mut Channel) -> Result<(), ssh2::Error> {
    chan.send_eof()
}

/// The only call site of `keepalive_send` (see the module docs).
#[inline(never)]
fn send_keepalive(session: &Session) -> Result<u32, ssh2::Error> {
    session.keepalive_send()
}

/// Poll events for the session socket, from what libssh2 is blocked on.
fn directions(session: &Session) -> i16 {
    match session.block_directions() {
        BlockDirections::Inbound => libc::POLLIN,
        BlockDirections::Outbound => libc::POLLOUT,
        BlockDirections::Both => libc::POLLIN | libc::POLLOUT,
        BlockDirections::None => 0,
    }
}

/// Accepts local TCP clients and opens a direct-tcpip channel for each.
pub(crate) struct Forwarder {
    listener: TcpListener,
    host: String,
    port: u16,
    /// Accepted connections waiting for their channel; libssh2 opens one
    /// channel at a time per session.
    waiting: VecDeque<TcpStream>,
    pub(crate) last_error: Arc<Mutex<Option<String>>>,
}

impl Forwarder {
    pub(crate) fn new(listener: TcpListener, host: &str, port: u16) -> Forwarder {
        Forwarder {
            listener,
            host: host.to_string(),
            port,
            waiting: VecDeque::new(),
            last_error: Arc::new(Mutex::new(None)),
        }
    }

    fn record(&self, msg: String) {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(msg);
    }

    fn step(
        &mut self,
        session: &Session,
        bridges: &mut Vec<Bridge>,
        want: &mut i16,
    ) -> Result<bool, PumpError> {
        let mut progress = false;
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if stream.set_nonblocking(true).is_ok() {
                        let _ = stream.set_nodelay(true);
                        self.waiting.push_back(stream);
                    }
                    progress = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // e.g. EMFILE: keep serving the connections we have.
                    self.record(format!("accepting a local connection failed: {e}"));
                    break;
                }
            }
        }
        if let Some(client) = self.waiting.front() {
            let src_port = client.peer_addr().map(|a| a.port()).unwrap_or(0);
            match session.channel_direct_tcpip(&self.host, self.port, Some(("127.0.0.1", src_port)))
            {
                Ok(chan) => {
                    let client = self.waiting.pop_front().expect("front exists");
                    bridges.push(Bridge::forward(chan, client));
                    progress = true;
                }
                Err(e) if is_eagain(&e) => *want |= directions(session),
                Err(e) if session_code(&e) == Some(code::CHANNEL_FAILURE) => {
                    // CHANNEL_FAILURE: the node could not connect, or refused
                    // forwarding. Close this client; the next may do better.
                    self.record(format!(
                        "the node could not open a connection to {}:{} ({}); check that the \
                         service listens there and that sshd allows TCP forwarding \
                         (AllowTcpForwarding)",
                        self.host,
                        self.port,
                        e.message()
                    ));
                    self.waiting.pop_front();
                    progress = true;
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(progress)
    }
}

/// How [`Pump::run`] ended without an error.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Exit {
    /// All bridges finished (commands).
    Finished,
    /// A byte arrived on the control socket: kill.
    Killed,
    /// The control socket was closed and the pump was told to stop then.
    Stopped,
}

/// One non-blocking session and everything flowing through it.
pub(crate) struct Pump {
    pub(crate) session: Session,
    sock: RawFd,
    pub(crate) bridges: Vec<Bridge>,
    forwarder: Option<Forwarder>,
    last_io: Instant,
    /// When this pump took the session: a session that waited in the pool
    /// was quiet without anyone asking it anything.
    started: Instant,
    last_keepalive: Instant,
    /// The first keepalive sent since the node last sent data.
    unanswered: Option<Instant>,
}

impl Pump {
    /// `session` must be authenticated; it is switched to non-blocking mode.
    pub(crate) fn new(
        session: Session,
        bridges: Vec<Bridge>,
        forwarder: Option<Forwarder>,
    ) -> Pump {
        session.set_blocking(false);
        let sock = session.as_raw_fd();
        Pump {
            session,
            sock,
            bridges,
            forwarder,
            last_io: Instant::now(),
            started: Instant::now(),
            last_keepalive: Instant::now(),
            unanswered: None,
        }
    }

    /// How long the node has not answered: nothing at all arrived (no
    /// data, no acknowledgement), or a keepalive went unanswered (the
    /// node's kernel acknowledges, but its sshd sends nothing: a hung
    /// server). Counted from this pump's start at the earliest. Without
    /// `TCP_INFO`: since the pump last moved anything.
    fn quiet(&mut self, now: Instant) -> Duration {
        let since_start = now.duration_since(self.started);
        let Some(heard) = since_heard(self.sock) else {
            return now.duration_since(self.last_io);
        };
        if let Some(asked) = self.unanswered {
            if heard.data < now.duration_since(asked) {
                self.unanswered = None;
            }
        }
        let mut quiet = heard.any.min(since_start);
        if let Some(asked) = self.unanswered {
            quiet = quiet.max(now.duration_since(asked));
        }
        quiet
    }

    /// Drive all transfers until the bridges are done (no forwarder), the
    /// deadline passes, or the control socket says otherwise: a byte means
    /// kill; EOF means stop if `stop_on_ctrl_eof`, else "nobody is watching,
    /// carry on".
    pub(crate) fn run(
        &mut self,
        deadline: Option<Instant>,
        mut ctrl: Option<&mut UnixStream>,
        stop_on_ctrl_eof: bool,
    ) -> Result<Exit, PumpError> {
        let mut last_ctrl_check = Instant::now();
        let mut last_silence_check = Instant::now();
        loop {
            let mut want: i16 = 0;
            let mut progress = false;
            if let Some(fwd) = self.forwarder.as_mut() {
                progress |= fwd.step(&self.session, &mut self.bridges, &mut want)?;
            }
            for bridge in &mut self.bridges {
                progress |= bridge.step(&self.session, &mut want)?;
            }
            if self.forwarder.is_some() {
                self.bridges.retain(|b| !b.done());
            } else if self.bridges.iter().all(Bridge::done) {
                return Ok(Exit::Finished);
            }

            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                return Err(PumpError::Timeout);
            }
            // Busy or not: a pump that still has bytes to push into a dead
            // link is as stuck as an idle one.
            if now.duration_since(last_silence_check) >= SILENCE_CHECK {
                last_silence_check = now;
                let quiet = self.quiet(now);
                if quiet >= super::SILENCE_TIMEOUT {
                    return Err(PumpError::Silent(quiet));
                }
            }
            if progress || self.bridges.iter().any(Bridge::has_buffered_input) {
                if progress {
                    self.last_io = now;
                }
                if now.duration_since(last_ctrl_check) >= CTRL_CHECK {
                    last_ctrl_check = now;
                    if let Some(exit) = check_ctrl(&mut ctrl, stop_on_ctrl_eof)? {
                        return Ok(exit);
                    }
                }
                continue;
            }

            // Idle. Keepalives go out only now: with nothing else queued, the
            // stack-built packet cannot be left half-sent. They ask the node
            // for an answer whenever it has been quiet a while, so a live
            // node is never quiet for long (and NAT state stays fresh).
            let keepalive_every = super::KEEPALIVE_EVERY;
            let quiet = self.quiet(now);
            if quiet >= keepalive_every
                && now.duration_since(self.last_keepalive) >= keepalive_every
                && !self.bridges.iter().any(|b| b.write_pending)
            {
                send_keepalive(&self.session)?;
                self.last_keepalive = now;
                self.unanswered.get_or_insert(now);
            }
            // Until the next keepalive may be due; never a busy spin.
            let until_keepalive = keepalive_every
                .saturating_sub(quiet)
                .max(keepalive_every.saturating_sub(now.duration_since(self.last_keepalive)));
            let mut sleep = MAX_SLEEP
                .min(until_keepalive)
                .max(Duration::from_millis(10));
            if let Some(d) = deadline {
                sleep = sleep.min(d.saturating_duration_since(now));
            }
            let mut fds = Vec::with_capacity(self.bridges.len() + 3);
            fds.push(pollfd(self.sock, want));
            for b in &self.bridges {
                if let Some(fd) = b.local.fd() {
                    let mut ev = 0;
                    if b.want_local_read {
                        ev |= libc::POLLIN;
                    }
                    if b.want_local_write {
                        ev |= libc::POLLOUT;
                    }
                    if ev != 0 {
                        fds.push(pollfd(fd, ev));
                    }
                }
            }
            if let Some(fwd) = &self.forwarder {
                fds.push(pollfd(fwd.listener.as_raw_fd(), libc::POLLIN));
            }
            let ctrl_index = ctrl.as_ref().map(|c| {
                fds.push(pollfd(c.as_raw_fd(), libc::POLLIN));
                fds.len() - 1
            });
            poll(&mut fds, sleep)?;
            if ctrl_index.is_some_and(|i| fds[i].revents != 0) {
                last_ctrl_check = Instant::now();
                if let Some(exit) = check_ctrl(&mut ctrl, stop_on_ctrl_eof)? {
                    return Ok(exit);
                }
            }
        }
    }

    /// Give up on the session: shut the socket so libssh2's cleanup cannot
    /// block, then free everything.
    pub(crate) fn abandon(self) {
        // SAFETY: shutdown(2) on a descriptor the session still owns; it only
        // makes further I/O on it fail.
        unsafe {
            libc::shutdown(self.sock, libc::SHUT_RDWR);
        }
        self.session.set_blocking(true);
        drop(self.bridges);
        drop(self.session);
    }
}

/// Read the control socket without blocking. A byte means kill; EOF means stop
/// (or, if `!stop_on_eof`, forget the control socket).
fn check_ctrl(
    ctrl: &mut Option<&mut UnixStream>,
    stop_on_eof: bool,
) -> Result<Option<Exit>, PumpError> {
    let Some(sock) = ctrl.as_mut() else {
        return Ok(None);
    };
    let mut byte = [0u8; 1];
    match sock.read(&mut byte) {
        Ok(0) if stop_on_eof => Ok(Some(Exit::Stopped)),
        Ok(0) => {
            *ctrl = None;
            Ok(None)
        }
        Ok(_) => Ok(Some(Exit::Killed)),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
        Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(None),
        Err(e) => Err(PumpError::Io(e)),
    }
}

/// How long ago the peer of a TCP socket last sent something.
struct Heard {
    /// Data (an SSH packet: the answer to a keepalive, say).
    data: Duration,
    /// Data or a bare acknowledgement.
    any: Duration,
}

/// [`Heard`] for TCP socket `sock`, from the kernel's `TCP_INFO`.
fn since_heard(sock: RawFd) -> Option<Heard> {
    // SAFETY: all-zero bytes are a valid `tcp_info`.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `info`, which we own.
    let rc = unsafe {
        libc::getsockopt(
            sock,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    // Old kernels fill less; the two fields are in the first 64 bytes.
    if rc != 0 || (len as usize) < 64 {
        return None;
    }
    let ms = |v: u32| Duration::from_millis(v.into());
    Some(Heard {
        data: ms(info.tcpi_last_data_recv),
        any: ms(info.tcpi_last_data_recv.min(info.tcpi_last_ack_recv)),
    })
}

fn pollfd(fd: RawFd, events: i16) -> libc::pollfd {
    libc::pollfd {
        fd,
        events,
        revents: 0,
    }
}

fn poll(fds: &mut [libc::pollfd], timeout: Duration) -> Result<(), PumpError> {
    let ms = timeout.as_millis().clamp(0, i32::MAX as u128) as i32;
    // SAFETY: `fds` is a valid, exclusively borrowed array of pollfd.
    let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
    if rc < 0 {
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(PumpError::Io(err));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buf_compacts_when_full() {
        let mut b = Buf::new(8);
        b.space()[..8].copy_from_slice(b"abcdefgh");
        b.commit(8);
        assert!(!b.has_space() || b.start > 0);
        b.consume(5);
        assert!(b.has_space());
        assert_eq!(b.space().len(), 5);
        assert_eq!(b.pending(), b"fgh");
        b.consume(3);
        assert!(b.is_empty());
        assert_eq!(b.space().len(), 8);
    }

    #[test]
    fn the_kernel_says_when_the_peer_last_sent_something() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        server.write_all(b"x").unwrap();
        let mut byte = [0u8; 1];
        client.read_exact(&mut byte).unwrap();
        let fresh = since_heard(client.as_raw_fd()).expect("TCP_INFO");
        assert!(fresh.data < Duration::from_millis(200), "{:?}", fresh.data);
        std::thread::sleep(Duration::from_millis(300));
        let later = since_heard(client.as_raw_fd()).unwrap();
        assert!(later.data >= Duration::from_millis(250), "{:?}", later.data);
        assert!(later.any <= later.data);
        // A bare acknowledgement counts as "any", not as data.
        client.write_all(b"y").unwrap();
        server.read_exact(&mut byte).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let acked = since_heard(client.as_raw_fd()).unwrap();
        assert!(acked.any < Duration::from_millis(250), "{:?}", acked.any);
        assert!(acked.data >= Duration::from_millis(350), "{:?}", acked.data);
    }

    #[test]
    fn wrapped_command_reports_pgid_first() {
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(wrap_command("echo out; echo err >&2"))
            .output()
            .unwrap();
        assert_eq!(out.stdout, b"out\n");
        let err = String::from_utf8(out.stderr).unwrap();
        let (first, rest) = err.split_once('\n').unwrap();
        assert!(first
            .strip_prefix("hasync-pgid:")
            .unwrap()
            .parse::<u32>()
            .is_ok());
        assert_eq!(rest, "err\n");
    }
}
