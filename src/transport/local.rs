//! The local transport: the node is the machine hasync runs on.
//!
//! It behaves like the SSH transport so engines need no special case: commands
//! run through `sh -c` (as sshd runs them through the login shell), exit codes
//! follow the same `128 + signal` rule, and `exec` returns once the command
//! exited and closed its output. Each command runs in its own process group so
//! a timeout or [`Process::kill`] takes down everything it started, the way
//! killing the remote process group does over SSH. There is nothing to tunnel:
//! a tunnel simply resolves to the target address.

use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{self, Read, Write};
use std::net::ToSocketAddrs;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use super::{
    io_text, shorten, signal_status, temp_name, ExecOutput, Process, ProcessControl, StderrBuf,
    Transport, TransportError, Tunnel, PROCESS_STDERR_KEEP,
};

/// After a timeout kill, how long to wait for the output pipes to close (a
/// process that left the group could hold them open forever).
const KILL_GRACE: Duration = Duration::from_secs(2);
/// Pipe capacity asked for, for fewer context switches when streaming.
const PIPE_SIZE: libc::c_int = 1024 * 1024;

/// Grow a child's stdin and stdout pipes to [`PIPE_SIZE`]: fewer wakeups per
/// GiB streamed. Failure is harmless (the default size still works).
pub(crate) fn enlarge_pipes(child: &std::process::Child) {
    for fd in [
        child.stdin.as_ref().map(|p| p.as_raw_fd()),
        child.stdout.as_ref().map(|p| p.as_raw_fd()),
    ]
    .into_iter()
    .flatten()
    {
        // SAFETY: fcntl on a pipe descriptor the child handle owns.
        unsafe {
            libc::fcntl(fd, libc::F_SETPIPE_SZ, PIPE_SIZE);
        }
    }
}

/// The machine hasync runs on.
pub struct LocalTransport {
    node: String,
}

impl LocalTransport {
    pub fn new(node: &str) -> LocalTransport {
        LocalTransport {
            node: node.to_string(),
        }
    }

    fn start(&self, command: &str) -> Result<Child, TransportError> {
        let child = Command::new("sh")
            .arg("-c")
            .arg(command)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .map_err(|e| TransportError::Start {
                node: self.node.clone(),
                command: shorten(command),
                detail: io_text(&e),
            })?;
        enlarge_pipes(&child);
        Ok(child)
    }
}

/// What the helper threads of `exec` report.
enum Event {
    Exited(io::Result<ExitStatus>),
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
}

impl Transport for LocalTransport {
    fn node(&self) -> &str {
        &self.node
    }

    fn describe(&self) -> String {
        "local".to_string()
    }

    fn exec(
        &self,
        command: &str,
        stdin: &[u8],
        timeout: Option<Duration>,
    ) -> Result<ExecOutput, TransportError> {
        let mut child = self.start(command)?;
        let pgid = child.id() as libc::pid_t;
        let (tx, rx) = mpsc::channel();

        // One thread per pipe, so a full stderr never blocks stdout (or stdin).
        let input = stdin.to_vec();
        let mut child_stdin = child.stdin.take().expect("piped");
        thread::spawn(move || {
            // EPIPE just means the command did not read all its input.
            let _ = child_stdin.write_all(&input);
        });
        let mut out = child.stdout.take().expect("piped");
        let out_tx = tx.clone();
        thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = out.read_to_end(&mut buf);
            let _ = out_tx.send(Event::Stdout(buf));
        });
        let mut err = child.stderr.take().expect("piped");
        let err_tx = tx.clone();
        thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = err.read_to_end(&mut buf);
            let _ = err_tx.send(Event::Stderr(buf));
        });
        thread::spawn(move || {
            let _ = tx.send(Event::Exited(child.wait()));
        });

        // Collect all three reports. At the deadline, kill the group and give
        // the pipes a short grace period to close.
        let mut limit = timeout.map(|t| Instant::now() + t);
        let mut timed_out = false;
        let (mut status, mut stdout, mut stderr) = (None, None, None);
        while status.is_none() || stdout.is_none() || stderr.is_none() {
            let event = match limit {
                None => rx.recv().ok(),
                Some(l) => match rx.recv_timeout(l.saturating_duration_since(Instant::now())) {
                    Ok(event) => Some(event),
                    Err(mpsc::RecvTimeoutError::Timeout) if !timed_out => {
                        timed_out = true;
                        kill_group(pgid);
                        limit = Some(Instant::now() + KILL_GRACE);
                        continue;
                    }
                    Err(_) => None,
                },
            };
            match event {
                Some(Event::Exited(s)) => status = Some(s),
                Some(Event::Stdout(b)) => stdout = Some(b),
                Some(Event::Stderr(b)) => stderr = Some(b),
                None => break,
            }
        }
        if timed_out {
            return Err(TransportError::Timeout {
                node: self.node.clone(),
                what: format!("`{}`", shorten(command)),
                after: timeout.unwrap_or_default(),
            });
        }
        let status = status.transpose().map_err(|e| {
            let context = format!("waiting for `{}`", shorten(command));
            TransportError::io(&self.node, context, e)
        })?;
        let status = status.map_or(-1, exit_code);
        Ok(ExecOutput {
            status,
            stdout: stdout.unwrap_or_default(),
            stderr: stderr.unwrap_or_default(),
        })
    }

    fn spawn(&self, command: &str) -> Result<Process, TransportError> {
        let mut child = self.start(command)?;
        let stdin = child.stdin.take().expect("piped");
        let stdout = child.stdout.take().expect("piped");
        let mut err = child.stderr.take().expect("piped");
        let stderr = thread::spawn(move || {
            let mut keep = StderrBuf::bounded(PROCESS_STDERR_KEEP);
            let mut chunk = vec![0u8; 64 * 1024];
            loop {
                match err.read(&mut chunk) {
                    Ok(0) => break,
                    Ok(n) => keep.push(&chunk[..n]),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
            keep.into_vec()
        });
        Ok(Process::new(
            Box::new(stdin),
            Box::new(stdout),
            Box::new(LocalProcess {
                child: Some(child),
                stderr: Some(stderr),
                node: self.node.clone(),
            }),
        ))
    }

    fn tunnel(&self, host: &str, port: u16) -> Result<Tunnel, TransportError> {
        let addr = (host, port)
            .to_socket_addrs()
            .and_then(|mut addrs| {
                addrs
                    .next()
                    .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no address"))
            })
            .map_err(|e| TransportError::io(&self.node, format!("resolving {host}:{port}"), e))?;
        Ok(Tunnel::new(addr, None))
    }

    fn write_file(&self, path: &str, contents: &[u8], mode: u32) -> Result<(), TransportError> {
        let target = Path::new(path);
        let tmp = temp_name(target);
        let result = (|| {
            let mut file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode)
                .open(&tmp)?;
            // open(2) applied the umask, which only ever removes bits; now set
            // exactly what was asked for.
            file.set_permissions(Permissions::from_mode(mode))?;
            file.write_all(contents)?;
            file.sync_all()?;
            fs::rename(&tmp, target)?;
            // Make the rename itself durable.
            if let Some(dir) = target.parent().filter(|d| !d.as_os_str().is_empty()) {
                File::open(dir)?.sync_all()?;
            }
            Ok(())
        })();
        result.map_err(|e| {
            let _ = fs::remove_file(&tmp);
            TransportError::io(&self.node, format!("writing {path}"), e)
        })
    }

    fn remove_file(&self, path: &str) -> Result<(), TransportError> {
        match fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(TransportError::io(
                &self.node,
                format!("removing {path}"),
                e,
            )),
            _ => Ok(()),
        }
    }
}

/// The shell's exit code: `128 + n` for death by signal `n`.
fn exit_code(status: ExitStatus) -> i32 {
    match (status.code(), status.signal()) {
        (Some(code), _) => code,
        (None, Some(sig)) => signal_status(sig),
        (None, None) => -1,
    }
}

fn kill_group(pgid: libc::pid_t) {
    // SAFETY: plain kill(2) on a process group we created.
    unsafe {
        libc::kill(-pgid, libc::SIGKILL);
    }
}

struct LocalProcess {
    child: Option<Child>,
    stderr: Option<JoinHandle<Vec<u8>>>,
    node: String,
}

impl ProcessControl for LocalProcess {
    fn wait(mut self: Box<Self>) -> Result<ExecOutput, TransportError> {
        let mut child = self.child.take().expect("waited once");
        let status = child
            .wait()
            .map_err(|e| TransportError::io(&self.node, "waiting for a command", e))?;
        let stderr = self
            .stderr
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default();
        Ok(ExecOutput {
            status: exit_code(status),
            stdout: Vec::new(),
            stderr,
        })
    }

    fn kill(&mut self) {
        // Only while not reaped, so the group id cannot have been reused.
        if let Some(child) = &self.child {
            kill_group(child.id() as libc::pid_t);
        }
    }
}

impl Drop for LocalProcess {
    fn drop(&mut self) {
        // Dropped without wait(): reap it in the background, no zombies.
        if let Some(mut child) = self.child.take() {
            thread::spawn(move || {
                let _ = child.wait();
            });
        }
    }
}
