//! `hasync health-server`: HTTP answers for a load balancer, from this
//! node's own state record (read from its local state_dir at each request,
//! so a promote or a fence shows at once).

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use hasync::config::Node;
use hasync::state::{NodeRole, StateRecord};
use hasync::transport::Address;

use crate::cli::{Cli, HealthArgs};
use crate::exit::Exit;
use crate::output::Log;

pub fn run(cli: &Cli, args: &HealthArgs, log: &Log) -> Result<Exit> {
    let config = super::load_config(cli, log)?;
    let node = match &args.node {
        Some(name) => config
            .node(name)
            .ok_or_else(|| anyhow!("no node named {name:?} in {}", config.path.display()))?
            .clone(),
        None => {
            let local: Vec<&Node> = config
                .nodes
                .iter()
                .filter(|n| matches!(n.endpoint.address, Address::Local))
                .collect();
            match local.as_slice() {
                [one] => (*one).clone(),
                _ => bail!(
                    "which node is this? name it with --node NODE (or give it address = \"local\" in {})",
                    config.path.display()
                ),
            }
        }
    };
    let listener = TcpListener::bind(args.listen)
        .map_err(|e| anyhow!("cannot listen on {}: {e}", args.listen))?;
    log.info(&format!(
        "hasync health-server: node {} on http://{}/primary, /standby, /health",
        node.name,
        listener.local_addr()?
    ));
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let node = node.clone();
        std::thread::spawn(move || {
            let _ = answer(stream, &node);
        });
    }
    Ok(Exit::Ok)
}

/// The node's record from its local state_dir (the config's role before the
/// first cycle), or why it cannot be read.
fn record(node: &Node) -> Result<StateRecord, String> {
    let path = format!("{}/state.json", node.state_dir);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice::<StateRecord>(&bytes)
            .map_err(|e| format!("{path}: {e}"))
            .and_then(|r| {
                if r.node == node.name {
                    Ok(r)
                } else {
                    Err(format!("{path} is the record of node {}", r.node))
                }
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(StateRecord::initial(node)),
        Err(e) => Err(format!("{path}: {e}")),
    }
}

fn answer(mut stream: TcpStream, node: &Node) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request = String::new();
    reader.read_line(&mut request)?;
    // Skip the headers (bounded).
    let mut line = String::new();
    for _ in 0..100 {
        line.clear();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" || line == "\n" {
            break;
        }
    }
    let path = request.split_whitespace().nth(1).unwrap_or("/");
    let rec = record(node);
    let (code, body) = match (path, &rec) {
        (_, Err(e)) if path != "/health" => (503, format!("state unreadable: {e}\n")),
        ("/primary", Ok(r)) => role_answer(r, NodeRole::Primary),
        ("/standby", Ok(r)) => role_answer(r, NodeRole::Standby),
        ("/health", Ok(r)) => (
            200,
            serde_json::json!({
                "node": r.node,
                "role": r.role,
                "epoch": r.epoch,
                "last_cycle": r.last_cycle.as_ref().map(|c| serde_json::json!({
                    "outcome": c.outcome, "ended": c.ended, "reason": c.reason,
                })),
            })
            .to_string()
                + "\n",
        ),
        ("/health", Err(e)) => (503, format!("state unreadable: {e}\n")),
        _ => (404, "try /primary, /standby or /health\n".to_string()),
    };
    let reason = match code {
        200 => "OK",
        404 => "Not Found",
        _ => "Service Unavailable",
    };
    write!(
        stream,
        "HTTP/1.0 {code} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

fn role_answer(r: &StateRecord, want: NodeRole) -> (u16, String) {
    let text = format!("{} is {} at epoch {}\n", r.node, r.role, r.epoch);
    if r.role == want {
        (200, text)
    } else {
        (503, text)
    }
}
