//! `hasync doctor`: check, node by node, everything a cycle will need.
//!
//! A cycle that fails at 2 a.m. halfway through has already stopped services;
//! doctor finds the same problems at install time, with nothing stopped. Each
//! check says what it saw and, when it fails, what to do. The engine returns
//! plain data; the CLI decides how to print it.

use std::time::{Duration, Instant};

use crate::config::{Config, Engine, Node, Role};
use crate::transport::{self, shell_quote, Address, Transport, TransportError};
use crate::version;

/// The outcome of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Warn,
    Fail,
    /// Not run because an earlier check failed (no SSH, no checks behind it).
    Skip,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Check {
    pub name: &'static str,
    pub status: Status,
    /// What was seen ("127.0.0.2:22 in 3 ms", "MariaDB 10.11.6").
    pub detail: String,
    /// What to do about a failure or warning.
    pub fix: Option<String>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct NodeReport {
    pub node: String,
    /// "root@127.0.0.2:22" or "local".
    pub address: String,
    pub role: Role,
    pub checks: Vec<Check>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    pub config: String,
    pub nodes: Vec<NodeReport>,
}

impl Report {
    /// True when no check failed (warnings allowed).
    pub fn ok(&self) -> bool {
        self.nodes
            .iter()
            .flat_map(|n| &n.checks)
            .all(|c| c.status != Status::Fail)
    }
}

const CHECK_TIMEOUT: Duration = Duration::from_secs(30);

/// Run every check on every node, the nodes in parallel.
pub fn run(config: &Config) -> Report {
    let nodes = std::thread::scope(|s| {
        let handles: Vec<_> = config
            .nodes
            .iter()
            .map(|n| s.spawn(move || check_node(n)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("doctor thread panicked"))
            .collect()
    });
    Report {
        config: config.path.display().to_string(),
        nodes,
    }
}

struct Checks(Vec<Check>);

impl Checks {
    fn push(
        &mut self,
        name: &'static str,
        status: Status,
        detail: impl Into<String>,
        fix: Option<String>,
    ) {
        self.0.push(Check {
            name,
            status,
            detail: detail.into(),
            fix,
        });
    }
    fn ok(&mut self, name: &'static str, detail: impl Into<String>) {
        self.push(name, Status::Ok, detail, None);
    }
    fn fail(&mut self, name: &'static str, detail: impl Into<String>, fix: impl Into<String>) {
        self.push(name, Status::Fail, detail, Some(fix.into()));
    }
    fn skip(&mut self, names: &[&'static str], why: &str) {
        for n in names {
            self.push(n, Status::Skip, why, None);
        }
    }
}

const AFTER_SSH: &[&str] = &[
    "root",
    "agent",
    "service",
    "dump tools",
    "database",
    "state dir",
];

fn check_node(node: &Node) -> NodeReport {
    let mut c = Checks(Vec::new());
    let address = match &node.endpoint.address {
        Address::Local => "local".to_string(),
        Address::Ssh {
            host, port, user, ..
        } => format!("{user}@{host}:{port}"),
    };
    let started = Instant::now();
    let conn = transport::connect(&node.endpoint);
    match (&conn, &node.endpoint.address) {
        (Ok(_), Address::Local) => c.ok("ssh", "local node: no SSH needed"),
        (Ok(t), Address::Ssh { .. }) => {
            c.ok(
                "reachable",
                format!("connected in {} ms", started.elapsed().as_millis()),
            );
            c.ok("host key", "matches known_hosts");
            c.ok("auth", format!("logged in as {}", t.describe()));
        }
        (Err(e), _) => {
            let (ok_before, failed): (&[&'static str], &'static str) = match e {
                TransportError::Unreachable { .. } | TransportError::Timeout { .. } => {
                    (&[], "reachable")
                }
                TransportError::UnknownHostKey { .. }
                | TransportError::ChangedHostKey { .. }
                | TransportError::KnownHostsUnreadable { .. } => (&["reachable"], "host key"),
                TransportError::AuthFailed { .. } => (&["reachable", "host key"], "auth"),
                _ => (&[], "ssh"),
            };
            for name in ok_before {
                c.ok(name, "yes");
            }
            c.fail(
                failed,
                e.to_string(),
                "fix the SSH problem above, then run `hasync doctor` again",
            );
            c.skip(AFTER_SSH, "skipped: no connection");
            return NodeReport {
                node: node.name.clone(),
                address,
                role: node.initial_role,
                checks: c.0,
            };
        }
    }
    let t = conn.expect("checked above");
    check_root(&mut c, t.as_ref(), node);
    check_agent(&mut c, t.as_ref(), node);
    check_service(&mut c, t.as_ref(), node);
    check_database(&mut c, t.as_ref(), node);
    check_state_dir(&mut c, t.as_ref(), node);
    NodeReport {
        node: node.name.clone(),
        address,
        role: node.initial_role,
        checks: c.0,
    }
}

/// Run a check command; a transport failure becomes the check's failure.
fn run_check(
    c: &mut Checks,
    name: &'static str,
    t: &dyn Transport,
    cmd: &str,
    timeout: Duration,
) -> Option<transport::ExecOutput> {
    match t.exec(cmd, b"", Some(timeout)) {
        Ok(out) => Some(out),
        Err(e) => {
            c.fail(
                name,
                e.to_string(),
                "check the node's shell and SSH session; run the command by hand to see why",
            );
            None
        }
    }
}

fn check_root(c: &mut Checks, t: &dyn Transport, node: &Node) {
    let root = shell_quote(&node.root);
    let cmd = format!("if [ ! -d {root} ]; then echo missing; elif [ -w {root} ]; then echo writable; else echo readonly; fi");
    let Some(out) = run_check(c, "root", t, &cmd, CHECK_TIMEOUT) else {
        return;
    };
    match String::from_utf8_lossy(&out.stdout).trim() {
        "writable" => c.ok("root", format!("{} exists, writable", node.root)),
        "readonly" if node.initial_role == Role::Primary => {
            c.ok("root", format!("{} exists", node.root))
        }
        "readonly" => c.fail(
            "root",
            format!("{} is not writable by {}", node.root, t.describe()),
            "a standby's root receives the files: make it writable by the SSH user",
        ),
        _ => c.fail(
            "root",
            format!("{} does not exist on node {}", node.root, node.name),
            format!(
                "create it (`mkdir -p {}` on {}) or fix `root` in [nodes.{}]",
                node.root, node.name, node.name
            ),
        ),
    }
}

fn check_agent(c: &mut Checks, t: &dyn Transport, node: &Node) {
    let cmd = format!("{} agent --version", shell_quote(&node.agent_path));
    let Some(out) = run_check(c, "agent", t, &cmd, CHECK_TIMEOUT) else {
        return;
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let install = format!(
        "install hasync {} on {} (copy this binary, same architecture, to e.g. /usr/local/bin/hasync) or set agent_path in [nodes.{}]",
        version::VERSION,
        node.name,
        node.name
    );
    if out.status == 127 || out.status == 126 {
        c.fail(
            "agent",
            format!(
                "`{}` not found or not executable on {}",
                node.agent_path, node.name
            ),
            install,
        );
        return;
    }
    match version::parse_agent_version_line(stdout.trim()) {
        Some((v, p)) if p == version::PROTOCOL && v == version::VERSION => {
            c.ok("agent", format!("{} (protocol {p})", node.agent_path))
        }
        Some((v, p)) if p == version::PROTOCOL => c.push(
            "agent",
            Status::Warn,
            format!(
                "hasync {v} on the node, {} here (same protocol {p})",
                version::VERSION
            ),
            Some(install),
        ),
        Some((v, p)) => c.fail(
            "agent",
            format!(
                "hasync {v} speaks protocol {p}, this one protocol {}",
                version::PROTOCOL
            ),
            install,
        ),
        None => c.fail(
            "agent",
            format!(
                "`{} agent --version` did not answer as hasync (exit {}): {}",
                node.agent_path,
                out.status,
                out.stderr_tail()
            ),
            install,
        ),
    }
}

fn check_service(c: &mut Checks, t: &dyn Transport, node: &Node) {
    let Some(svc) = &node.service else {
        c.push(
            "service",
            Status::Warn,
            "no [nodes.NAME.service] section",
            Some(format!("add [nodes.{}.service] with stop, start and status commands: a cycle must stop the application to copy a consistent state", node.name)),
        );
        return;
    };
    match t.exec(&svc.status, b"", Some(svc.timeout)) {
        Err(TransportError::Timeout { .. }) => c.fail(
            "service",
            format!(
                "status command did not finish within {}",
                crate::config::duration::format_duration(svc.timeout)
            ),
            "the status command must answer quickly; fix it or raise `timeout`",
        ),
        Err(e) => c.fail("service", e.to_string(), "check the status command"),
        Ok(out) => match out.status {
            0 => c.ok("service", "running (status exit 0)"),
            3 => c.ok("service", "stopped (status exit 3)"),
            1 | 2 | 4 => c.push(
                "service",
                Status::Warn,
                format!(
                    "status exit {} (LSB: {})",
                    out.status,
                    lsb_meaning(out.status)
                ),
                Some("the status command works, but the service is in a doubtful state".into()),
            ),
            127 | 126 => c.fail(
                "service",
                format!(
                    "status command not found on {}: {}",
                    node.name,
                    out.stderr_tail()
                ),
                format!("fix `status` in [nodes.{}.service]", node.name),
            ),
            n => c.fail(
                "service",
                format!("status command exited {n}: {}", out.stderr_tail()),
                "a status command must exit 0 when running and 3 when stopped (LSB)",
            ),
        },
    }
}

fn lsb_meaning(code: i32) -> &'static str {
    match code {
        1 => "dead but pid file exists",
        2 => "dead but lock file exists",
        4 => "status unknown",
        _ => "",
    }
}

fn check_database(c: &mut Checks, t: &dyn Transport, node: &Node) {
    let Some(db) = &node.database else {
        return;
    };
    // The vendor tools carry the data; they must be on the node.
    let tools = match db.engine {
        Engine::Mysql => "for t in 'mariadb-dump mysqldump' 'mariadb mysql'; do found=; for x in $t; do command -v $x >/dev/null 2>&1 && found=$x && break; done; [ -n \"$found\" ] && echo $found || echo \"missing:$t\"; done",
        Engine::Postgres => "for x in pg_dump psql; do command -v $x >/dev/null 2>&1 && echo $x || echo missing:$x; done",
    };
    if let Some(out) = run_check(c, "dump tools", t, tools, CHECK_TIMEOUT) {
        let text = String::from_utf8_lossy(&out.stdout);
        let missing: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("missing:"))
            .collect();
        if missing.is_empty() {
            c.ok(
                "dump tools",
                text.split_whitespace().collect::<Vec<_>>().join(", "),
            );
        } else {
            let pkg = match db.engine {
                Engine::Mysql => "mariadb-client (or mysql-client)",
                Engine::Postgres => "postgresql-client",
            };
            c.fail(
                "dump tools",
                format!("not on PATH on {}: {}", node.name, missing.join(", ")),
                format!("install {pkg} on {}", node.name),
            );
        }
    }
    let password = match db.password() {
        Ok(p) => p,
        Err(e) => {
            c.fail("database", e.to_string(), "fix password_file");
            return;
        }
    };
    let tunnel = match t.tunnel(&db.host, db.port) {
        Ok(tun) => tun,
        Err(e) => {
            c.fail(
                "database",
                format!("cannot open a tunnel to {}:{}: {e}", db.host, db.port),
                "check that the node's sshd allows TCP forwarding (AllowTcpForwarding)",
            );
            return;
        }
    };
    let probe = match crate::db::probe(db, password.as_deref(), tunnel.local_addr) {
        // A standby's database is created by its first sync: check the login.
        Err(crate::db::DbError::NoSuchDatabase { .. }) if node.initial_role == Role::Standby => {
            crate::db::probe_server(db, password.as_deref(), tunnel.local_addr).map(|v| {
                format!(
                    "{v}; {} does not exist yet, the first sync creates it",
                    db.name
                )
            })
        }
        other => other,
    };
    match probe {
        Ok(v) => c.ok(
            "database",
            format!(
                "{} {}@{}:{}/{} — {}",
                db.engine, db.user, db.host, db.port, db.name, v
            ),
        ),
        Err(e) => c.fail(
            "database",
            format!("node {}: {e}", node.name),
            "fix the [database] settings or the server, then run doctor again",
        ),
    }
}

fn check_state_dir(c: &mut Checks, t: &dyn Transport, node: &Node) {
    let dir = shell_quote(&node.state_dir);
    // Walk up to the first existing ancestor: the directory is created on first use.
    let cmd = format!(
        "d={dir}; while [ ! -e \"$d\" ]; do d=$(dirname \"$d\"); done; if [ ! -d \"$d\" ]; then echo notdir \"$d\"; elif [ -w \"$d\" ]; then echo ok \"$d\"; else echo readonly \"$d\"; fi"
    );
    let Some(out) = run_check(c, "state dir", t, &cmd, CHECK_TIMEOUT) else {
        return;
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let (word, at) = text.trim().split_once(' ').unwrap_or((text.trim(), ""));
    match word {
        "ok" if at == node.state_dir => c.ok("state dir", format!("{} writable", node.state_dir)),
        "ok" => c.ok(
            "state dir",
            format!("{} will be created (under {at})", node.state_dir),
        ),
        "notdir" => c.fail(
            "state dir",
            format!("{at} is not a directory"),
            format!("fix state_dir or remove {at} on {}", node.name),
        ),
        _ => c.fail(
            "state dir",
            format!(
                "{} is not writable by {} ({at})",
                node.state_dir,
                t.describe()
            ),
            format!(
                "create it writable for the SSH user: `mkdir -p {}` on {}",
                node.state_dir, node.name
            ),
        ),
    }
}
