//! Who is primary: the nodes' state records, not the config.
//!
//! Each record has a role (primary / standby / fenced) and an epoch; a
//! promote raises the epoch. A cycle runs only from the primary with the
//! highest epoch to standbys of that same epoch. A primary with a lower
//! epoch is an old primary that came back after its standby was promoted:
//! it is fenced on sight, and nothing is copied in either direction until
//! `hasync rejoin` turns it into a standby. Two primaries of the same epoch
//! cannot be told apart: hasync refuses and says so.

use std::sync::Arc;

use crate::config::{Config, Node};
use crate::state::{self, NodeRole, StateRecord};
use crate::transport::{self, Transport};

#[derive(Debug, thiserror::Error)]
pub enum RoleError {
    #[error(
        "no node is primary in its state record ({0}); promote one with `hasync promote NODE`"
    )]
    NoPrimary(String),
    #[error("CRITICAL: two primaries at epoch {epoch}: {a} and {b}; nothing was copied. Decide which one holds the data to keep, then `hasync promote --force` it and `hasync rejoin` the other")]
    TwoPrimaries { a: String, b: String, epoch: u64 },
    #[error("CRITICAL: {stale} was primary at epoch {stale_epoch}, but {current} was promoted at epoch {epoch}; {stale} is now marked fenced and nothing was copied. Run `hasync rejoin {stale}` to make it a standby of {current} (what it wrote after the split is kept in quarantine)")]
    StalePrimary {
        stale: String,
        stale_epoch: u64,
        current: String,
        epoch: u64,
    },
    #[error("no standby of {primary} (epoch {epoch}) to copy to: {reasons}")]
    NoStandby {
        primary: String,
        epoch: u64,
        reasons: String,
    },
}

/// The direction of a cycle, from the records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub primary: usize,
    pub standbys: Vec<usize>,
    /// Nodes left out, with why (fenced, other epoch, not the --to node).
    pub skipped: Vec<String>,
}

/// Decide the direction from the nodes' records. `to` limits the standbys.
/// On [`RoleError::StalePrimary`] the caller fences the stale node.
pub fn resolve(
    nodes: &[Node],
    records: &[StateRecord],
    to: Option<&str>,
) -> Result<Resolved, RoleError> {
    let mut primaries: Vec<usize> = (0..nodes.len())
        .filter(|&i| records[i].role == NodeRole::Primary)
        .collect();
    if primaries.is_empty() {
        let roles: Vec<String> = nodes
            .iter()
            .zip(records)
            .map(|(n, r)| format!("{} is {} at epoch {}", n.name, r.role, r.epoch))
            .collect();
        return Err(RoleError::NoPrimary(roles.join(", ")));
    }
    primaries.sort_by_key(|&i| std::cmp::Reverse(records[i].epoch));
    let p = primaries[0];
    if let Some(&q) = primaries.get(1) {
        if records[q].epoch == records[p].epoch {
            return Err(RoleError::TwoPrimaries {
                a: nodes[p].name.clone(),
                b: nodes[q].name.clone(),
                epoch: records[p].epoch,
            });
        }
        return Err(RoleError::StalePrimary {
            stale: nodes[q].name.clone(),
            stale_epoch: records[q].epoch,
            current: nodes[p].name.clone(),
            epoch: records[p].epoch,
        });
    }
    let epoch = records[p].epoch;
    let mut standbys = Vec::new();
    let mut skipped = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        if i == p {
            continue;
        }
        let r = &records[i];
        if to.is_some_and(|t| t != n.name) {
            skipped.push(format!("{}: not the --to node", n.name));
        } else if r.role == NodeRole::Fenced {
            skipped.push(format!(
                "{} is fenced (an old primary); `hasync rejoin {}` makes it a standby",
                n.name, n.name
            ));
        } else if r.epoch != epoch {
            skipped.push(format!(
                "{} is a standby of epoch {}, the primary's is {epoch}; `hasync rejoin {}`",
                n.name, r.epoch, n.name
            ));
        } else {
            standbys.push(i);
        }
    }
    if standbys.is_empty() {
        return Err(RoleError::NoStandby {
            primary: nodes[p].name.clone(),
            epoch,
            reasons: if skipped.is_empty() {
                format!("no node named {:?}", to.unwrap_or(""))
            } else {
                skipped.join("; ")
            },
        });
    }
    Ok(Resolved {
        primary: p,
        standbys,
        skipped,
    })
}

/// One transport per node of the config, in config order.
pub type Transports = Vec<Arc<dyn Transport>>;

/// Every node of the config, connected (in parallel), with its record (or
/// the initial one from the config). The first unreachable node is an error.
pub fn connect_all(config: &Config) -> Result<(Transports, Vec<StateRecord>), String> {
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = config
            .nodes
            .iter()
            .map(|n| {
                s.spawn(move || {
                    // Its errors name the node already.
                    let t = transport::connect(&n.endpoint).map_err(|e| e.to_string())?;
                    let r = state::read_or_initial(&*t, n).map_err(|e| e.to_string())?;
                    Ok::<_, String>((Arc::<dyn Transport>::from(t), r))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("connect thread panicked"))
            .collect()
    });
    let mut ts = Vec::new();
    let mut rs = Vec::new();
    for r in results {
        let (t, rec) = r?;
        ts.push(t);
        rs.push(rec);
    }
    Ok((ts, rs))
}

/// Resolve the direction; fence a stale primary found on the way (the
/// error is still returned: nothing may be copied).
pub fn resolve_and_fence(
    config: &Config,
    transports: &[Arc<dyn Transport>],
    records: &mut [StateRecord],
    to: Option<&str>,
) -> Result<Resolved, RoleError> {
    let r = resolve(&config.nodes, records, to);
    if let Err(RoleError::StalePrimary {
        stale,
        epoch,
        current,
        ..
    }) = &r
    {
        if let Some(i) = config.nodes.iter().position(|n| &n.name == stale) {
            records[i].change_role(
                NodeRole::Fenced,
                records[i].epoch,
                &format!("found primary at a lower epoch than {current} (epoch {epoch})"),
            );
            let _ = state::write(&*transports[i], &config.nodes[i], &records[i]);
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(role: NodeRole, epoch: u64) -> StateRecord {
        StateRecord {
            node: String::new(),
            role,
            epoch,
            history: Vec::new(),
            last_cycle: None,
            cycles: Vec::new(),
            failures_total: 0,
        }
    }

    fn nodes() -> Vec<Node> {
        let text = crate::config::TEMPLATE;
        crate::config::parse_without_files(std::path::Path::new("t.toml"), text)
            .unwrap()
            .nodes
    }

    #[test]
    fn direction_from_records() {
        let n = nodes();
        use NodeRole::*;
        let r = resolve(&n, &[rec(Primary, 1), rec(Standby, 1)], None).unwrap();
        assert_eq!((r.primary, r.standbys.clone()), (0, vec![1]));
        // After a promote of the second node, while the first was away.
        let e = resolve(&n, &[rec(Primary, 1), rec(Primary, 2)], None).unwrap_err();
        assert!(
            matches!(e, RoleError::StalePrimary { ref stale, .. } if stale == &n[0].name),
            "{e}"
        );
        let e = resolve(&n, &[rec(Primary, 2), rec(Primary, 2)], None).unwrap_err();
        assert!(matches!(e, RoleError::TwoPrimaries { .. }), "{e}");
        let e = resolve(&n, &[rec(Fenced, 2), rec(Primary, 2)], None).unwrap_err();
        assert!(e.to_string().contains("fenced"), "{e}");
        let e = resolve(&n, &[rec(Standby, 1), rec(Primary, 2)], None).unwrap_err();
        assert!(e.to_string().contains("epoch 1"), "{e}");
        let r = resolve(&n, &[rec(Standby, 2), rec(Primary, 2)], None).unwrap();
        assert_eq!((r.primary, r.standbys), (1, vec![0]));
        let e = resolve(&n, &[rec(Standby, 1), rec(Standby, 1)], None).unwrap_err();
        assert!(matches!(e, RoleError::NoPrimary(_)), "{e}");
    }
}

/// One node as `hasync status` and `hasync check` see it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct NodeStatus {
    pub node: String,
    pub reachable: bool,
    /// Why it is not reachable, or what could not be read.
    pub error: Option<String>,
    pub role: Option<NodeRole>,
    pub epoch: Option<u64>,
    /// Whether the node has a state record yet (else: the config's role).
    pub has_record: bool,
    pub service_running: Option<bool>,
    /// The application as its probes see it (status, health_url,
    /// writable_check); `None` without a service section.
    pub application: Option<crate::service::AppState>,
    /// A run holding the node's lock now, and its step.
    pub activity: Option<crate::lock::Activity>,
    /// The readonly_sql checks (its SELECTs) on the live database: true =
    /// read-only, false = writable, None = no check configured or unreadable.
    pub db_read_only: Option<bool>,
    pub last_cycle: Option<state::CycleRecord>,
    pub last_ok: Option<state::CycleRecord>,
    pub failures_total: u64,
    #[serde(skip)]
    pub record: Option<StateRecord>,
}

/// Look at every node, in parallel; unreachable nodes are reported, not
/// fatal.
pub fn gather(config: &Config) -> Vec<NodeStatus> {
    std::thread::scope(|s| {
        let handles: Vec<_> = config
            .nodes
            .iter()
            .map(|n| s.spawn(move || status_of(n)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("status thread panicked"))
            .collect()
    })
}

fn status_of(n: &Node) -> NodeStatus {
    let mut st = NodeStatus {
        node: n.name.clone(),
        reachable: false,
        error: None,
        role: None,
        epoch: None,
        has_record: false,
        service_running: None,
        application: None,
        activity: None,
        db_read_only: None,
        last_cycle: None,
        last_ok: None,
        failures_total: 0,
        record: None,
    };
    let t = match transport::connect(&n.endpoint) {
        Ok(t) => t,
        Err(e) => {
            st.error = Some(e.to_string());
            return st;
        }
    };
    st.reachable = true;
    let rec = match state::read(&*t, n) {
        Ok(Some(r)) => {
            st.has_record = true;
            r
        }
        Ok(None) => StateRecord::initial(n),
        Err(e) => {
            st.error = Some(e.to_string());
            return st;
        }
    };
    st.role = Some(rec.role);
    st.epoch = Some(rec.epoch);
    st.last_cycle = rec.last_cycle.clone();
    st.last_ok = rec.last_ok().cloned();
    st.failures_total = rec.failures_total;
    st.record = Some(rec);
    st.application = crate::service::probe(&*t, n, std::time::Duration::from_secs(10));
    st.service_running = st.application.as_ref().map(|a| a.up);
    st.activity = crate::lock::activity(&*t, n).unwrap_or_default();
    st.db_read_only = crate::db::replicate::read_only_flag(&*t, n);
    st
}
