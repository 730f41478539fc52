//! Configs for the harness's two nodes, so each test states only what it
//! changes.

use std::path::{Path, PathBuf};

use std::sync::{RwLockReadGuard, RwLockWriteGuard};

use crate::harness::{cluster, Cluster};

/// How a test holds the shared cluster while it runs.
#[allow(dead_code)] // held for its Drop
enum Guard {
    Shared(RwLockReadGuard<'static, ()>),
    Exclusive(RwLockWriteGuard<'static, ()>),
    None,
}

/// What a test config says; `Setup::new` fills in a working default.
pub struct Setup {
    pub dir: PathBuf,
    pub engine: Option<&'static str>,
    pub known_hosts: PathBuf,
    pub password_file: PathBuf,
    /// Per node: (ssh port, root).
    pub ports: [u16; 2],
    pub roots: [PathBuf; 2],
    pub state_dirs: [PathBuf; 2],
    /// `[files] exclude` and `max_delete`.
    pub excludes: Vec<String>,
    pub max_delete: Option<u64>,
    /// `ssh_client` of both nodes (None: the default, auto).
    pub ssh_client: Option<&'static str>,
    /// `[database] name` (default `okmdb`) and `readonly_sql`.
    pub db_name: String,
    pub readonly_sql: Vec<String>,
    /// `health_url` of both services: the fake application's HTTP root
    /// (default on, as a Tomcat's would be configured).
    pub health_url: bool,
    /// `writable_check` of both services: ask the running application its
    /// mode (`app.py writable`). Off by default: an application without a
    /// configured database always runs writable.
    pub writable_check: bool,
    _guard: Guard,
}

impl Setup {
    /// Fresh roots and state dirs under a scratch dir named after the test;
    /// the cluster is shared with other tests that only use it.
    pub fn new(label: &str) -> Setup {
        Self::with_guard(label, Guard::Shared(cluster().share()))
    }

    /// The same, for a test that stops servers or changes shared databases:
    /// no other cluster test runs meanwhile.
    pub fn exclusive(label: &str) -> Setup {
        Self::with_guard(label, Guard::Exclusive(cluster().lock()))
    }

    /// For a test that already holds the cluster's exclusive lock.
    pub fn new_unlocked(label: &str) -> Setup {
        Self::with_guard(label, Guard::None)
    }

    fn with_guard(label: &str, guard: Guard) -> Setup {
        let c = cluster();
        let dir = c.scratch_dir(label);
        let roots = [dir.join("okm1-root"), dir.join("okm2-root")];
        for r in &roots {
            std::fs::create_dir_all(r).unwrap();
        }
        Setup {
            engine: Some("mysql"),
            known_hosts: c.known_hosts.clone(),
            password_file: c.db_password_file.clone(),
            ports: [c.nodes[0].sshd.port, c.nodes[1].sshd.port],
            roots,
            state_dirs: [dir.join("okm1-state"), dir.join("okm2-state")],
            dir,
            excludes: Vec::new(),
            max_delete: None,
            ssh_client: None,
            db_name: "okmdb".into(),
            readonly_sql: Vec::new(),
            health_url: true,
            writable_check: false,
            _guard: guard,
        }
    }

    pub fn config_text(&self) -> String {
        let c: &Cluster = cluster();
        let mut s = String::from("[cluster]\nname = \"it\"\n");
        for (i, n) in c.nodes.iter().enumerate() {
            s.push_str(&format!(
                r#"
[nodes.{name}]
address = "{ip}"
port = {port}
user = "root"
identity_file = "{id}"
known_hosts = "{kh}"
root = "{root}"
state_dir = "{state}"
role = "{role}"
agent_path = "{agent}"
{ssh_client}

[nodes.{name}.service]
stop = "{stop}"
start = "{start}"
status = "{status}"
timeout = "30s"
{checks}"#,
                name = n.name,
                ip = n.ip,
                port = self.ports[i],
                id = c.identity_file.display(),
                kh = self.known_hosts.display(),
                root = self.roots[i].display(),
                state = self.state_dirs[i].display(),
                role = if i == 0 { "primary" } else { "standby" },
                agent = env!("CARGO_BIN_EXE_hasync"),
                ssh_client = self
                    .ssh_client
                    .map(|c| format!("ssh_client = {c:?}"))
                    .unwrap_or_default(),
                stop = n.app.stop_cmd(),
                start = n.app.start_cmd(),
                status = n.app.status_cmd(),
                checks = self.checks(&n.app),
            ));
            if let Some(engine) = self.engine {
                let port = if engine == "mysql" {
                    n.mariadb.port
                } else {
                    n.postgres.port
                };
                s.push_str(&format!("\n[nodes.{}.database]\nport = {port}\n", n.name));
            }
        }
        s.push_str(&format!("\n[files]\nexclude = {:?}\n", self.excludes));
        if let Some(m) = self.max_delete {
            s.push_str(&format!("max_delete = {m}\n"));
        }
        if let Some(engine) = self.engine {
            s.push_str(&format!(
                "\n[database]\nengine = \"{engine}\"\nname = \"{}\"\nhost = \"127.0.0.1\"\nuser = \"okm\"\npassword_file = \"{}\"\nreadonly_sql = {:?}\n",
                self.db_name,
                self.password_file.display(),
                self.readonly_sql
            ));
        }
        s
    }

    /// The service's `health_url` and `writable_check` lines for `app`.
    fn checks(&self, app: &crate::harness::FakeApp) -> String {
        let mut s = String::new();
        if self.health_url {
            s += &format!("health_url = {:?}\n", app.url());
        }
        if self.writable_check {
            s += &format!("writable_check = {:?}\n", app.writable_cmd());
        }
        s
    }

    /// Write the config into the test's dir and return its path.
    pub fn write(&self) -> PathBuf {
        let path = self.dir.join("hasync.toml");
        std::fs::write(&path, self.config_text()).unwrap();
        path
    }
}

/// Rewrite `key = value` lines of a TOML file section by section (a tiny
/// editor for the template: tests fill it in the way a person would).
/// `None` comments the line out; keys missing from a section are added
/// right after its header.
pub fn edit_toml(text: &str, edits: &[(&str, &str, Option<String>)]) -> String {
    let mut out = Vec::new();
    let mut section = String::new();
    let mut done = vec![false; edits.len()];
    let lines: Vec<&str> = text.lines().collect();
    for (idx, line) in lines.iter().enumerate() {
        let trimmed = line.trim();
        if trimmed.starts_with('[') && !trimmed.starts_with("[[") {
            section = trimmed.trim_matches(|c| c == '[' || c == ']').to_string();
            out.push(line.to_string());
            // Add missing keys once the section's existing keys are known.
            let end = lines[idx + 1..]
                .iter()
                .position(|l| l.trim().starts_with('['))
                .map_or(lines.len(), |p| idx + 1 + p);
            let present: Vec<String> = lines[idx + 1..end]
                .iter()
                .filter_map(|l| l.split_once('=').map(|(k, _)| k.trim().to_string()))
                .filter(|k| !k.starts_with('#'))
                .collect();
            for (i, (sec, key, val)) in edits.iter().enumerate() {
                if *sec == section && !present.iter().any(|p| p == key) {
                    if let Some(v) = val {
                        out.push(format!("{key} = {v}"));
                    }
                    done[i] = true;
                }
            }
            continue;
        }
        if let Some((k, _)) = trimmed.split_once('=') {
            let k = k.trim();
            if let Some(i) = edits
                .iter()
                .position(|(sec, key, _)| *sec == section && *key == k)
            {
                match &edits[i].2 {
                    Some(v) => out.push(format!("{k} = {v}")),
                    None => out.push(format!("# {line}")),
                }
                done[i] = true;
                continue;
            }
        }
        out.push(line.to_string());
    }
    // Sections the text lacks are appended, like a person adding them.
    for (i, (sec, key, val)) in edits.iter().enumerate() {
        if !done[i] {
            if let Some(v) = val {
                out.push(format!("\n[{sec}]\n{key} = {v}"));
            }
            done[i] = true;
        }
    }
    out.join("\n") + "\n"
}

pub fn quoted(p: &Path) -> Option<String> {
    Some(format!("{:?}", p.display().to_string()))
}
