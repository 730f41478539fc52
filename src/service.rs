//! Stopping, starting and probing the application on a node.
//!
//! The configured commands run through the node's transport. A stop counts
//! only when `status` says the service is down (LSB: exit 0 = running); a
//! start only when `status` says it runs and, with `health_url`, the URL
//! answers 2xx. Both are bounded by the service's `timeout`. The health
//! check goes through an SSH tunnel, so the URL is as seen from the node
//! (`http://localhost:8080/OpenKM/` works).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::config::{Node, Service};
use crate::transport::Transport;

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("node {node}: `{command}` failed (exit {status}): {stderr}")]
    Command {
        node: String,
        command: String,
        status: i32,
        stderr: String,
    },
    #[error("node {node}: the service is still {state} {secs:.0} s after `{command}` (timeout); check it by hand with `{status_cmd}`")]
    Timeout {
        node: String,
        command: String,
        state: &'static str,
        secs: f64,
        status_cmd: String,
    },
    /// The command itself did not end in time. Said apart from
    /// [`ServiceError::Timeout`], whose wording ("the service is still
    /// not done") fit a hung command badly.
    #[error("node {node}: `{command}` did not finish within {secs:.0} s (the service's timeout) and was ended; check the service by hand with `{status_cmd}`")]
    CommandTimeout {
        node: String,
        command: String,
        secs: f64,
        status_cmd: String,
    },
    #[error("node {node}: the service runs but {url} did not answer 2xx within the timeout (last: {last})")]
    Unhealthy {
        node: String,
        url: String,
        last: String,
    },
    /// The application runs, but not in the mode its role demands (its
    /// `writable_check` said so until the timeout).
    #[error("node {node}: the application runs {actual} but its role wants it {wanted} (`{check}` said so for {secs:.0} s after the start); {hint}")]
    WrongMode {
        node: String,
        actual: &'static str,
        wanted: &'static str,
        check: String,
        secs: f64,
        hint: &'static str,
    },
    #[error("node {node}: {detail}")]
    Transport { node: String, detail: String },
}

/// The mode a node's role demands of its application.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The primary: it takes the users' writes.
    Writable,
    /// A standby: it serves reads at most; every write would be lost.
    ReadOnly,
}

impl Mode {
    fn word(self) -> &'static str {
        match self {
            Mode::Writable => "writable",
            Mode::ReadOnly => "read-only",
        }
    }
}

/// What the application on a node is doing, as far as it can be known:
/// what `hasync status`, `hasync check` and the health server report.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AppState {
    /// It runs (`status` exit 0) and, with a `health_url`, answers 2xx.
    pub up: bool,
    /// From `writable_check`, while it is up: `Some(true)` it accepts
    /// writes, `Some(false)` it runs read-only, `None` unknown.
    pub writable: Option<bool>,
    /// What the probes said, for people.
    pub detail: String,
}

impl AppState {
    /// "up, writable", "up (mode unknown)", "DOWN".
    pub fn describe(&self) -> String {
        match (self.up, self.writable) {
            (false, _) => "DOWN".into(),
            (true, Some(true)) => "up, writable".into(),
            (true, Some(false)) => "up, read-only".into(),
            (true, None) => "up".into(),
        }
    }

    /// Whether it serves in `mode`: up, and not known to be in the other
    /// mode (a node without `writable_check` is judged on up alone).
    pub fn serves_in(&self, mode: Mode) -> bool {
        self.up && self.writable != Some(mode == Mode::ReadOnly)
    }
}

const POLL: Duration = Duration::from_millis(200);

fn transport_error(node: &Node, e: impl std::fmt::Display) -> ServiceError {
    ServiceError::Transport {
        node: node.name.clone(),
        detail: e.to_string(),
    }
}

/// Whether the service runs (`status` exit 0). A node without a service
/// section has nothing to run: `None`.
pub fn running(t: &dyn Transport, node: &Node) -> Result<Option<bool>, ServiceError> {
    let Some(svc) = &node.service else {
        return Ok(None);
    };
    let out = t
        .exec(&svc.status, b"", Some(svc.timeout))
        .map_err(|e| transport_error(node, e))?;
    Ok(Some(out.status == 0))
}

fn run_command(
    t: &dyn Transport,
    node: &Node,
    svc: &Service,
    command: &str,
    deadline: Instant,
) -> Result<(), ServiceError> {
    let left = deadline.saturating_duration_since(Instant::now());
    let out = t
        .exec(command, b"", Some(left.max(Duration::from_secs(1))))
        .map_err(|e| match e {
            crate::transport::TransportError::Timeout { .. } => ServiceError::CommandTimeout {
                node: node.name.clone(),
                command: command.to_string(),
                secs: svc.timeout.as_secs_f64(),
                status_cmd: svc.status.clone(),
            },
            other => transport_error(node, other),
        })?;
    if !out.success() {
        return Err(ServiceError::Command {
            node: node.name.clone(),
            command: command.to_string(),
            status: out.status,
            stderr: out.stderr_tail(),
        });
    }
    Ok(())
}

fn wait_status(
    t: &dyn Transport,
    node: &Node,
    svc: &Service,
    command: &str,
    want_running: bool,
    deadline: Instant,
) -> Result<(), ServiceError> {
    loop {
        let out = t
            .exec(&svc.status, b"", Some(svc.timeout))
            .map_err(|e| transport_error(node, e))?;
        if (out.status == 0) == want_running {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(ServiceError::Timeout {
                node: node.name.clone(),
                command: command.to_string(),
                state: if want_running {
                    "not running"
                } else {
                    "running"
                },
                secs: svc.timeout.as_secs_f64(),
                status_cmd: svc.status.clone(),
            });
        }
        std::thread::sleep(POLL);
    }
}

/// Ask the application how it is, each probe bounded by `deadline`: its
/// `status` command, then its `health_url`, then its `writable_check`. A
/// probe that does not answer in time counts as down (or mode unknown).
/// `None`: the node has no service section.
pub fn probe(t: &dyn Transport, node: &Node, deadline: Duration) -> Option<AppState> {
    let svc = node.service.as_ref()?;
    let down = |detail: String| AppState {
        up: false,
        writable: None,
        detail,
    };
    match t.exec(&svc.status, b"", Some(deadline)) {
        Ok(out) if out.status == 0 => {}
        Ok(out) => return Some(down(format!("`{}` exit {}", svc.status, out.status))),
        Err(crate::transport::TransportError::Timeout { .. }) => {
            return Some(down(format!(
                "`{}` did not answer within {:.1} s",
                svc.status,
                deadline.as_secs_f64()
            )))
        }
        Err(e) => return Some(down(format!("`{}`: {e}", svc.status))),
    }
    if let Some(url) = &svc.health_url {
        match http_status_within(t, url, deadline) {
            Ok(code) if (200..300).contains(&code) => {}
            Ok(code) => return Some(down(format!("{url}: HTTP {code}"))),
            Err(e) => return Some(down(format!("{url}: {e}"))),
        }
    }
    let (writable, detail) = match &svc.writable_check {
        None => (None, "running".to_string()),
        Some(cmd) => match t.exec(cmd, b"", Some(deadline)) {
            Ok(out) if out.status == 0 => (Some(true), "running, accepts writes".into()),
            Ok(out) if out.status == 1 => (Some(false), "running read-only".into()),
            Ok(out) => (
                None,
                format!("running; `{cmd}` exit {}: mode unknown", out.status),
            ),
            Err(e) => (None, format!("running; `{cmd}`: {e}: mode unknown")),
        },
    };
    Some(AppState {
        up: true,
        writable,
        detail,
    })
}

/// After a start: wait until the application's `writable_check` says it
/// runs in `mode` (nothing to wait for without one), within the
/// service's timeout counted from `deadline`.
fn wait_mode(
    t: &dyn Transport,
    node: &Node,
    svc: &Service,
    mode: Mode,
    deadline: Instant,
) -> Result<(), ServiceError> {
    let Some(check) = &svc.writable_check else {
        return Ok(());
    };
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let got = match t.exec(check, b"", Some(left.max(Duration::from_secs(1)))) {
            Ok(out) if out.status == 0 => Some(Mode::Writable),
            Ok(out) if out.status == 1 => Some(Mode::ReadOnly),
            _ => None,
        };
        if got == Some(mode) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(ServiceError::WrongMode {
                node: node.name.clone(),
                actual: got.map_or("in an unknown mode", Mode::word),
                wanted: mode.word(),
                check: check.clone(),
                secs: svc.timeout.as_secs_f64(),
                hint: match mode {
                    Mode::Writable => {
                        "check readwrite_sql and the application's read-only flag, then restart it"
                    }
                    Mode::ReadOnly => {
                        "check readonly_sql and the application's read-only flag, then restart it"
                    }
                },
            });
        }
        std::thread::sleep(POLL);
    }
}

/// Stop the service and wait until `status` says it is down.
pub fn stop(t: &dyn Transport, node: &Node) -> Result<(), ServiceError> {
    let Some(svc) = &node.service else {
        return Ok(());
    };
    let deadline = Instant::now() + svc.timeout;
    run_command(t, node, svc, &svc.stop, deadline)?;
    wait_status(t, node, svc, &svc.stop, false, deadline)
}

/// Start the service, wait until `status` says it runs, with a
/// `health_url` until the URL answers 2xx, and with a `writable_check`
/// until the application says it runs in `mode`.
///
/// An LSB `start` of a running service does nothing, and applications
/// read their read-only flag at startup: a role change that changes the
/// flag stops the application first (see `hasync promote`).
pub fn start(t: &dyn Transport, node: &Node, mode: Mode) -> Result<(), ServiceError> {
    let Some(svc) = &node.service else {
        return Ok(());
    };
    let deadline = Instant::now() + svc.timeout;
    run_command(t, node, svc, &svc.start, deadline)?;
    wait_status(t, node, svc, &svc.start, true, deadline)?;
    if let Some(url) = &svc.health_url {
        wait_healthy(t, node, url, deadline)?;
    }
    wait_mode(t, node, svc, mode, deadline)
}

/// `http://host[:port]/path` -> (host, port, path).
pub fn parse_http_url(url: &str) -> Option<(String, u16, String)> {
    let rest = url.strip_prefix("http://")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || authority.starts_with('[') => {
            (h.trim_matches(|c| c == '[' || c == ']'), p.parse().ok()?)
        }
        _ => (authority, 80),
    };
    if host.is_empty() {
        return None;
    }
    Some((host.to_string(), port, path.to_string()))
}

/// One GET through `t`'s tunnel: the status code, or why there is none.
pub fn http_status(t: &dyn Transport, url: &str) -> Result<u16, String> {
    http_status_within(t, url, Duration::from_secs(10))
}

/// [`http_status`] with the connection and the answer each bounded by
/// `deadline`.
pub fn http_status_within(t: &dyn Transport, url: &str, deadline: Duration) -> Result<u16, String> {
    let (host, port, path) =
        parse_http_url(url).ok_or_else(|| format!("not an http:// URL: {url}"))?;
    let tunnel = t
        .tunnel(&host, port)
        .map_err(|e| format!("tunnel to {host}:{port}: {e}"))?;
    let mut s =
        TcpStream::connect_timeout(&tunnel.local_addr, deadline.min(Duration::from_secs(5)))
            .map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(deadline)).ok();
    s.set_write_timeout(Some(deadline)).ok();
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: {host}:{port}\r\nUser-Agent: hasync/{}\r\nConnection: close\r\n\r\n",
        crate::version::VERSION
    )
    .map_err(|e| e.to_string())?;
    let mut head = [0u8; 64];
    let mut n = 0;
    while n < 12 {
        match s.read(&mut head[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) => return Err(e.to_string()),
        }
    }
    let line = String::from_utf8_lossy(&head[..n]);
    line.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("no HTTP status line (got {:?})", line.trim()))
}

fn wait_healthy(
    t: &dyn Transport,
    node: &Node,
    url: &str,
    deadline: Instant,
) -> Result<(), ServiceError> {
    loop {
        let last = match http_status(t, url) {
            Ok(code) if (200..300).contains(&code) => return Ok(()),
            Ok(code) => format!("HTTP {code}"),
            Err(e) => e,
        };
        if Instant::now() >= deadline {
            return Err(ServiceError::Unhealthy {
                node: node.name.clone(),
                url: url.to_string(),
                last,
            });
        }
        std::thread::sleep(POLL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            parse_http_url("http://localhost:8080/OpenKM/"),
            Some(("localhost".into(), 8080, "/OpenKM/".into()))
        );
        assert_eq!(
            parse_http_url("http://10.0.0.5"),
            Some(("10.0.0.5".into(), 80, "/".into()))
        );
        assert_eq!(
            parse_http_url("http://[::1]:81/x"),
            Some(("::1".into(), 81, "/x".into()))
        );
        assert_eq!(parse_http_url("https://x/"), None);
        assert_eq!(parse_http_url("http://:80/"), None);
    }
}
