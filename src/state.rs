//! Each node's state record: `state_dir/state.json` on the node, written
//! atomically (a temp file renamed over it, over SFTP or locally).
//!
//! It starts from the config's `role` on first use. A cycle writes its
//! outcome into the record of every node it touched: start and end, ok /
//! failed / interrupted and why, files, bytes, rows, the outage and each
//! phase's duration. Role changes and epochs (promote, rejoin) come with the
//! roles issue; the fields exist already so records stay readable.

use serde::{Deserialize, Serialize};
use std::time::Duration;

use crate::config::{Node, Role};

/// A node's role as its state record says: the config's two, plus fenced
/// (an old primary that must not be written from or to until `rejoin`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeRole {
    Primary,
    Standby,
    Fenced,
}

impl From<Role> for NodeRole {
    fn from(r: Role) -> Self {
        match r {
            Role::Primary => NodeRole::Primary,
            Role::Standby => NodeRole::Standby,
        }
    }
}

impl std::fmt::Display for NodeRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            NodeRole::Primary => "primary",
            NodeRole::Standby => "standby",
            NodeRole::Fenced => "fenced",
        })
    }
}
use crate::transport::{shell_quote, Transport};

/// How many past cycles a record keeps.
const KEEP_CYCLES: usize = 20;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PhaseTime {
    pub name: String,
    pub secs: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CycleRecord {
    /// RFC 3339.
    pub started: String,
    pub ended: String,
    /// "ok", "failed" or "interrupted".
    pub outcome: String,
    pub reason: Option<String>,
    pub primary: String,
    pub standbys: Vec<String>,
    pub files: u64,
    pub bytes: u64,
    pub rows: u64,
    /// How long the primary's service was down.
    pub outage_secs: Option<f64>,
    pub phases: Vec<PhaseTime>,
    /// Who ran it: host and pid.
    pub host: String,
    pub pid: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RoleChange {
    pub at: String,
    pub from: Option<NodeRole>,
    pub to: NodeRole,
    #[serde(default)]
    pub epoch: u64,
    pub reason: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StateRecord {
    pub node: String,
    pub role: NodeRole,
    pub epoch: u64,
    #[serde(default)]
    pub history: Vec<RoleChange>,
    #[serde(default)]
    pub last_cycle: Option<CycleRecord>,
    /// The last cycles, newest last (at most 20).
    #[serde(default)]
    pub cycles: Vec<CycleRecord>,
    /// Cycles that did not end ok, ever (a counter for monitoring).
    #[serde(default)]
    pub failures_total: u64,
}

impl StateRecord {
    /// A node's first record, from the config.
    pub fn initial(node: &Node) -> StateRecord {
        StateRecord {
            node: node.name.clone(),
            role: node.initial_role.into(),
            epoch: 1,
            history: vec![RoleChange {
                at: now(),
                from: None,
                to: node.initial_role.into(),
                epoch: 1,
                reason: "first use: role from the config".into(),
            }],
            last_cycle: None,
            cycles: Vec::new(),
            failures_total: 0,
        }
    }

    /// The last cycle that ended ok.
    pub fn last_ok(&self) -> Option<&CycleRecord> {
        self.cycles.iter().rev().find(|c| c.outcome == "ok")
    }

    /// Change the role and epoch, with a history entry.
    pub fn change_role(&mut self, to: NodeRole, epoch: u64, reason: &str) {
        self.history.push(RoleChange {
            at: now(),
            from: Some(self.role),
            to,
            epoch,
            reason: reason.to_string(),
        });
        self.role = to;
        self.epoch = epoch;
    }

    pub fn record_cycle(&mut self, c: CycleRecord) {
        if c.outcome != "ok" {
            self.failures_total += 1;
        }
        self.cycles.push(c.clone());
        let excess = self.cycles.len().saturating_sub(KEEP_CYCLES);
        self.cycles.drain(..excess);
        self.last_cycle = Some(c);
    }
}

pub fn now() -> String {
    chrono::Local::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, false)
}

fn path(node: &Node) -> String {
    format!("{}/state.json", node.state_dir)
}

#[derive(Debug, thiserror::Error)]
#[error("state record of {node} ({path}): {detail}")]
pub struct StateError {
    pub node: String,
    pub path: String,
    pub detail: String,
}

/// The node's record, or `None` if it has none yet.
pub fn read(t: &dyn Transport, node: &Node) -> Result<Option<StateRecord>, StateError> {
    let p = path(node);
    let err = |detail: String| StateError {
        node: node.name.clone(),
        path: p.clone(),
        detail,
    };
    let out = t
        .exec(
            &format!(
                "if [ -e {q} ]; then cat {q}; else echo absent >&2; exit 3; fi",
                q = shell_quote(&p)
            ),
            b"",
            Some(Duration::from_secs(30)),
        )
        .map_err(|e| err(e.to_string()))?;
    match out.status {
        0 => parse(node, &out.stdout).map(Some),
        3 => Ok(None),
        s => Err(err(format!("exit {s}: {}", out.stderr_tail()))),
    }
}

/// The record of `node` from the bytes of its state.json (read by [`read`]
/// or sent by the node's agent in its Welcome): it must parse, and be this
/// node's.
pub fn parse(node: &Node, bytes: &[u8]) -> Result<StateRecord, StateError> {
    let err = |detail: String| StateError {
        node: node.name.clone(),
        path: path(node),
        detail,
    };
    let rec: StateRecord = serde_json::from_slice(bytes).map_err(|e| {
        err(format!(
            "unreadable ({e}); move it aside to start from the config again"
        ))
    })?;
    if rec.node != node.name {
        return Err(err(format!(
            "it is the record of node {}: two nodes share this state_dir; give each node a state_dir of its own",
            rec.node
        )));
    }
    Ok(rec)
}

/// The largest record an agent sends in its Welcome; a larger one is
/// reported unreadable there (and read by the caller the usual way).
pub const MAX_SENT_RECORD: u64 = 1 << 20;

/// This node's record in `state_dir`, unparsed, as an agent sends it.
pub fn read_local(state_dir: &std::path::Path) -> crate::agent::wire::Record {
    use crate::agent::wire::Record;
    use std::io::Read;
    let p = state_dir.join("state.json");
    let f = match std::fs::File::open(&p) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Record::Absent,
        Err(e) => return Record::Unreadable(format!("{}: {e}", p.display())),
    };
    let mut bytes = Vec::new();
    match f.take(MAX_SENT_RECORD + 1).read_to_end(&mut bytes) {
        Err(e) => Record::Unreadable(format!("{}: {e}", p.display())),
        Ok(n) if n as u64 > MAX_SENT_RECORD => Record::Unreadable(format!(
            "{}: larger than {MAX_SENT_RECORD} bytes",
            p.display()
        )),
        Ok(_) => Record::Present(bytes),
    }
}

/// The node's record, or a fresh one from the config.
pub fn read_or_initial(t: &dyn Transport, node: &Node) -> Result<StateRecord, StateError> {
    Ok(read(t, node)?.unwrap_or_else(|| StateRecord::initial(node)))
}

pub fn write(t: &dyn Transport, node: &Node, rec: &StateRecord) -> Result<(), StateError> {
    let p = path(node);
    let err = |detail: String| StateError {
        node: node.name.clone(),
        path: p.clone(),
        detail,
    };
    let mk = t
        .exec(
            &format!("mkdir -p -m 700 -- {}", shell_quote(&node.state_dir)),
            b"",
            Some(Duration::from_secs(30)),
        )
        .map_err(|e| err(e.to_string()))?;
    if !mk.success() {
        return Err(err(format!(
            "cannot create state_dir: {}",
            mk.stderr_tail()
        )));
    }
    let mut json = serde_json::to_vec_pretty(rec).map_err(|e| err(e.to_string()))?;
    json.push(b'\n');
    t.write_file(&p, &json, 0o644)
        .map_err(|e| err(e.to_string()))
}
