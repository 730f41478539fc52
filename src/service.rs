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
    #[error("node {node}: {detail}")]
    Transport { node: String, detail: String },
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

/// Stop the service and wait until `status` says it is down.
pub fn stop(t: &dyn Transport, node: &Node) -> Result<(), ServiceError> {
    let Some(svc) = &node.service else {
        return Ok(());
    };
    let deadline = Instant::now() + svc.timeout;
    run_command(t, node, svc, &svc.stop, deadline)?;
    wait_status(t, node, svc, &svc.stop, false, deadline)
}

/// Start the service, wait until `status` says it runs and, with a
/// `health_url`, until the URL answers 2xx.
pub fn start(t: &dyn Transport, node: &Node) -> Result<(), ServiceError> {
    let Some(svc) = &node.service else {
        return Ok(());
    };
    let deadline = Instant::now() + svc.timeout;
    run_command(t, node, svc, &svc.start, deadline)?;
    wait_status(t, node, svc, &svc.start, true, deadline)?;
    if let Some(url) = &svc.health_url {
        wait_healthy(t, node, url, deadline)?;
    }
    Ok(())
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
    let (host, port, path) =
        parse_http_url(url).ok_or_else(|| format!("not an http:// URL: {url}"))?;
    let tunnel = t
        .tunnel(&host, port)
        .map_err(|e| format!("tunnel to {host}:{port}: {e}"))?;
    let mut s = TcpStream::connect_timeout(&tunnel.local_addr, Duration::from_secs(5))
        .map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok();
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
        std::thread::sleep(Duration::from_millis(500));
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
