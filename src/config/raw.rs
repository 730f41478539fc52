//! The file's shape, as serde sees it, and its validation into [`Config`].
//!
//! Every struct refuses unknown keys (a typo must never be silently ignored:
//! `max_delte = 10` would otherwise leave the default cap in force), and every
//! value that needs a semantic check is `Spanned`, so its error can point at it.

use std::collections::BTreeMap;
use std::ops::Range;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::duration::parse_duration;
use super::error::{did_you_mean, ConfigError, ConfigErrors};
use super::{
    check_identifier, expand_tilde, Config, Database, Engine, Files, Hooks, Node, Role, Service,
    SshClient,
};
use crate::schedule::cron::CronSchedule;
use crate::transport::{Address, Endpoint};

const DEFAULT_STATE_DIR: &str = "/var/lib/hasync";
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);
const DEFAULT_MAX_DELETE: u64 = 1000;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    cluster: Option<RawCluster>,
    nodes: Option<BTreeMap<String, Spanned<RawNode>>>,
    files: Option<RawFiles>,
    database: Option<Spanned<RawDatabase>>,
    schedule: Option<RawSchedule>,
    hooks: Option<RawHooks>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCluster {
    name: Spanned<String>,
    state_dir: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    address: Spanned<String>,
    port: Option<u16>,
    user: Option<String>,
    identity_file: Option<Spanned<String>>,
    known_hosts: Option<Spanned<String>>,
    root: Spanned<String>,
    state_dir: Option<Spanned<String>>,
    role: Option<Spanned<Role>>,
    agent_path: Option<Spanned<String>>,
    ssh_client: Option<SshClient>,
    service: Option<RawService>,
    database: Option<RawNodeDatabase>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    stop: Spanned<String>,
    start: Spanned<String>,
    status: Spanned<String>,
    health_url: Option<Spanned<String>>,
    writable_check: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNodeDatabase {
    name: Option<Spanned<String>>,
    host: Option<String>,
    port: Option<u16>,
    user: Option<String>,
    password_file: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFiles {
    exclude: Option<Vec<Spanned<String>>>,
    delete: Option<bool>,
    max_delete: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDatabase {
    engine: Engine,
    name: Spanned<String>,
    host: Option<String>,
    port: Option<u16>,
    user: Spanned<String>,
    password_file: Option<Spanned<String>>,
    #[serde(default)]
    readonly_sql: Vec<String>,
    #[serde(default)]
    readwrite_sql: Vec<String>,
    #[serde(default)]
    early_restart: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSchedule {
    cron: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHooks {
    pre_promote: Option<Spanned<String>>,
    post_promote: Option<Spanned<String>>,
    on_failure: Option<Spanned<String>>,
    on_success: Option<Spanned<String>>,
}

/// Collects every problem of one file, so the user sees them all at once.
struct Checker<'a> {
    check_files: bool,
    path: &'a Path,
    text: &'a str,
    errors: Vec<ConfigError>,
    warnings: Vec<String>,
}

impl Checker<'_> {
    fn err(
        &mut self,
        span: Range<usize>,
        message: impl Into<String>,
        hint: impl Into<Option<String>>,
    ) {
        self.errors.push(ConfigError::at(
            self.path,
            self.text,
            span,
            message,
            hint.into(),
        ));
    }

    fn warn(&mut self, span: Range<usize>, message: String) {
        let (line, _) = super::error::line_col(self.text, span.start);
        self.warnings
            .push(format!("{}:{line}: {message}", self.path.display()));
    }

    fn absolute(&mut self, key: &str, value: &Spanned<String>) -> String {
        let v = value.get_ref();
        if !v.starts_with('/') {
            self.err(
                value.span(),
                format!("{key} = {v:?} must be an absolute path on the node"),
                Some(format!(
                    "write the full path, e.g. \"/{}\"",
                    v.trim_start_matches("./")
                )),
            );
        }
        match v.trim_end_matches('/') {
            "" => "/".to_string(),
            t => t.to_string(),
        }
    }

    /// A local file that must exist (identity file, password file, hook).
    fn existing_file(&mut self, key: &str, value: &Spanned<String>) -> PathBuf {
        let p = expand_tilde(value.get_ref());
        if !self.check_files {
            return p;
        }
        match std::fs::metadata(&p) {
            Ok(m) if m.is_file() => {}
            Ok(_) => self.err(value.span(), format!("{key}: {} is not a regular file", p.display()), None),
            Err(e) => self.err(
                value.span(),
                format!("{key}: cannot read {}: {e}", p.display()),
                Some("create the file or fix the path (a leading ~ means the home directory of the user running hasync)".into()),
            ),
        }
        p
    }

    fn password_file(&mut self, value: &Spanned<String>) -> PathBuf {
        let p = self.existing_file("password_file", value);
        if !self.check_files {
            return p;
        }
        if let Ok(m) = std::fs::metadata(&p) {
            if m.is_file() && m.permissions().mode() & 0o077 != 0 {
                self.warn(
                    value.span(),
                    format!(
                        "password file {} is readable by other users (mode {:o}); run `chmod 600 {}`",
                        p.display(),
                        m.permissions().mode() & 0o777,
                        p.display()
                    ),
                );
            }
        }
        p
    }
}

/// Turn a toml/serde error into one with a location and, for typos, a hint.
fn toml_error(path: &Path, text: &str, e: toml::de::Error) -> ConfigError {
    let message = e.message().trim().to_string();
    let hint = unknown_field_hint(&message).or_else(|| {
        if message.contains("unknown variant") {
            Some("use one of the values listed".to_string())
        } else if message.contains("missing field") {
            Some("add the key; templates/hasync.toml documents each one".to_string())
        } else if message.contains("invalid type") {
            Some("strings need quotes, numbers and true/false do not".to_string())
        } else {
            // What is left is the TOML syntax itself.
            Some("write `key = value`, strings in double quotes closed on the same line, each [section] once; `hasync init --stdout` prints a valid file to compare".to_string())
        }
    });
    match e.span() {
        Some(span) => ConfigError::at(path, text, span, message, hint),
        None => ConfigError::file(path, message, hint),
    }
}

/// What a database name could be instead: its other characters as `_`
/// (the database itself must be renamed to match, or created so).
fn identifier_hint(name: &str) -> String {
    let mut s: String = name
        .chars()
        .map(|ch| {
            if ch.is_ascii_alphanumeric() || ch == '_' {
                ch
            } else {
                '_'
            }
        })
        .collect();
    if s.is_empty() || s.starts_with(|ch: char| ch.is_ascii_digit()) {
        s.insert(0, 'x');
    }
    s.truncate(48);
    format!(
        "the database's name on both nodes, e.g. name = {s:?}; rename or create it so if needed"
    )
}

/// serde says "unknown field `adress`, expected one of `address`, `port`";
/// turn that into "did you mean `address`?".
fn unknown_field_hint(message: &str) -> Option<String> {
    let rest = message.strip_prefix("unknown field `")?;
    let (field, rest) = rest.split_once('`')?;
    let expected: Vec<&str> = rest.split('`').skip(1).step_by(2).collect();
    match did_you_mean(field, &expected) {
        Some(s) => Some(format!("did you mean `{s}`?")),
        None if !expected.is_empty() => Some(format!(
            "remove it; the keys allowed here are {}",
            expected
                .iter()
                .map(|e| format!("`{e}`"))
                .collect::<Vec<_>>()
                .join(", ")
        )),
        None => Some("remove it".into()),
    }
}

pub(super) fn parse(path: &Path, text: &str, check_files: bool) -> Result<Config, ConfigErrors> {
    let raw: RawConfig =
        toml::from_str(text).map_err(|e| ConfigErrors(vec![toml_error(path, text, e)]))?;
    let mut c = Checker {
        check_files,
        path,
        text,
        errors: Vec::new(),
        warnings: Vec::new(),
    };

    let Some(cluster) = raw.cluster else {
        return Err(ConfigErrors(vec![ConfigError::file(
            path,
            "the [cluster] section is missing",
            Some("add [cluster] with name = \"...\" (see templates/hasync.toml)".into()),
        )]));
    };
    let cluster_name = cluster.name.get_ref().clone();
    if cluster_name.trim().is_empty() {
        c.err(
            cluster.name.span(),
            "[cluster] name is empty",
            Some("name the pair, e.g. \"openkm\"".into()),
        );
    }
    let default_state_dir = match &cluster.state_dir {
        Some(s) => c.absolute("state_dir", s),
        None => DEFAULT_STATE_DIR.to_string(),
    };

    // [database] first: nodes inherit it.
    let database = raw.database.as_ref().map(|db| {
        let d = db.get_ref();
        if let Err(why) = check_identifier(d.name.get_ref()) {
            c.err(
                d.name.span(),
                format!("database name {:?}: {why}", d.name.get_ref()),
                Some(identifier_hint(d.name.get_ref())),
            );
        }
        let password_file = d.password_file.as_ref().map(|p| c.password_file(p));
        if d.user.get_ref().is_empty() {
            c.err(d.user.span(), "database user is empty", None);
        }
        Database {
            engine: d.engine,
            name: d.name.get_ref().clone(),
            host: d.host.clone().unwrap_or_else(|| "127.0.0.1".into()),
            port: d.port.unwrap_or(d.engine.default_port()),
            user: d.user.get_ref().clone(),
            password_file,
            readonly_sql: d.readonly_sql.clone(),
            readwrite_sql: d.readwrite_sql.clone(),
            early_restart: d.early_restart,
        }
    });

    // Nodes, in file order (the map is sorted by name; spans give the order).
    let mut nodes = Vec::new();
    let mut role_spans = Vec::new();
    let nodes_span;
    match raw.nodes {
        None => {
            return Err(ConfigErrors(vec![ConfigError::file(
                path,
                "no [nodes.NAME] sections: hasync needs two nodes",
                Some("add [nodes.okm1] and [nodes.okm2] (see templates/hasync.toml)".into()),
            )]))
        }
        Some(map) => {
            let mut entries: Vec<(String, Spanned<RawNode>)> = map.into_iter().collect();
            nodes_span = entries
                .iter()
                .map(|(_, n)| n.span())
                .min_by_key(|s| s.start)
                .unwrap_or(0..0);
            entries.sort_by_key(|(_, n)| n.span().start);
            for (name, node) in entries {
                let role_span = node
                    .get_ref()
                    .role
                    .as_ref()
                    .map(Spanned::span)
                    .unwrap_or(node.span());
                nodes.push(check_node(
                    &mut c,
                    &name,
                    node,
                    &default_state_dir,
                    database.as_ref(),
                ));
                role_spans.push(role_span);
            }
        }
    }
    if nodes.len() < 2 {
        c.err(
            nodes_span.clone(),
            format!(
                "only {} node defined; hasync replicates between two or more",
                nodes.len()
            ),
            Some("add a second [nodes.NAME] section for the mirror".into()),
        );
    }
    let primaries: Vec<(&Node, &Range<usize>)> = nodes
        .iter()
        .zip(&role_spans)
        .filter(|(n, _)| n.initial_role == Role::Primary)
        .collect();
    match primaries.len() {
        0 if nodes.len() >= 2 => c.err(
            nodes_span.clone(),
            "no node has role = \"primary\"",
            Some("set role = \"primary\" on the node that serves users now, role = \"standby\" on the others".into()),
        ),
        1 | 0 => {}
        _ => {
            let names: Vec<&str> = primaries.iter().map(|(n, _)| n.name.as_str()).collect();
            c.err(
                primaries[1].1.clone(),
                format!("two primaries: {} all have role = \"primary\"", names.join(", ")),
                Some("exactly one node starts as primary; make the others role = \"standby\"".into()),
            )
        }
    }
    let locals: Vec<&str> = nodes
        .iter()
        .filter(|n| matches!(n.endpoint.address, Address::Local))
        .map(|n| n.name.as_str())
        .collect();
    if locals.len() > 1 {
        c.err(
            nodes_span.clone(),
            format!("nodes {} all say address = \"local\"; only the machine hasync runs on can be local", locals.join(", ")),
            Some("give the other nodes their host name or IP address".into()),
        );
    }

    let files = match raw.files {
        Some(f) => {
            let mut exclude = Vec::new();
            for p in f.exclude.unwrap_or_default() {
                // The compiler the sync itself uses, so the config and the run agree.
                if let Err(e) = crate::sync::filter::Filter::new(&[p.get_ref()]) {
                    c.err(
                        p.span(),
                        e.to_string(),
                        Some("see `man hasync` (EXCLUDE PATTERNS): rsync --exclude rules".into()),
                    );
                }
                exclude.push(p.into_inner());
            }
            Files {
                exclude,
                delete: f.delete.unwrap_or(true),
                max_delete: f.max_delete.unwrap_or(DEFAULT_MAX_DELETE),
            }
        }
        None => Files {
            exclude: Vec::new(),
            delete: true,
            max_delete: DEFAULT_MAX_DELETE,
        },
    };

    let schedule = raw
        .schedule
        .and_then(|s| match s.cron.get_ref().parse::<CronSchedule>() {
            Ok(sched) => Some(sched),
            Err(e) => {
                c.err(
                    s.cron.span(),
                    format!("[schedule] cron = {:?}: {e}", s.cron.get_ref()),
                    Some("five fields as in a crontab, e.g. cron = \"30 2 * * *\" for every day at 02:30".into()),
                );
                None
            }
        });

    let hooks = match raw.hooks {
        Some(h) => {
            let mut hook = |key: &str, v: Option<Spanned<String>>| {
                v.map(|v| {
                    let p = c.existing_file(key, &v);
                    if !c.check_files {
                        return p;
                    }
                    if let Ok(m) = std::fs::metadata(&p) {
                        if m.is_file() && m.permissions().mode() & 0o111 == 0 {
                            c.err(
                                v.span(),
                                format!("hook {key}: {} is not executable", p.display()),
                                Some(format!("chmod +x {}", p.display())),
                            );
                        }
                    }
                    p
                })
            };
            Hooks {
                pre_promote: hook("pre_promote", h.pre_promote),
                post_promote: hook("post_promote", h.post_promote),
                on_failure: hook("on_failure", h.on_failure),
                on_success: hook("on_success", h.on_success),
            }
        }
        None => Hooks::default(),
    };

    if !c.errors.is_empty() {
        return Err(ConfigErrors(c.errors));
    }
    Ok(Config {
        path: path.to_path_buf(),
        cluster_name,
        nodes,
        files,
        database,
        schedule,
        hooks,
        warnings: c.warnings,
    })
}

fn check_node(
    c: &mut Checker<'_>,
    name: &str,
    node: Spanned<RawNode>,
    default_state_dir: &str,
    database: Option<&Database>,
) -> Node {
    let span = node.span();
    let n = node.into_inner();
    if name.is_empty()
        || !name
            .chars()
            .all(|ch| ch.is_ascii_alphanumeric() || "-_.".contains(ch))
    {
        c.err(
            span.clone(),
            format!("node name {name:?}: use letters, digits, `-`, `_` and `.` only"),
            None,
        );
    }
    let address = n.address.get_ref().trim().to_string();
    let address = if address == "local" {
        Address::Local
    } else {
        if address.is_empty() || address.contains(char::is_whitespace) || address.contains('@') {
            c.err(
                n.address.span(),
                format!("node {name}: address {:?} is not a host name or IP address", n.address.get_ref()),
                Some("write the host only (user and port have their own keys), or \"local\" for this machine".into()),
            );
        }
        let user = n.user.clone().unwrap_or_else(current_user);
        let identity_file = n
            .identity_file
            .as_ref()
            .map(|f| c.existing_file("identity_file", f));
        let known_hosts = n
            .known_hosts
            .as_ref()
            .map(|k| expand_tilde(k.get_ref()))
            .unwrap_or_else(|| expand_tilde("~/.ssh/known_hosts"));
        Address::Ssh {
            host: address,
            port: n.port.unwrap_or(22),
            user,
            identity_file,
            known_hosts,
        }
    };
    let root = c.absolute("root", &n.root);
    if root == "/" {
        c.err(
            n.root.span(),
            format!("node {name}: root = \"/\" would replicate the whole file system"),
            Some("point root at the application's tree, e.g. \"/home/openkm/tomcat\"".into()),
        );
    }
    let state_dir = match &n.state_dir {
        Some(s) => c.absolute("state_dir", s),
        None => default_state_dir.to_string(),
    };
    let initial_role = n
        .role
        .as_ref()
        .map(|r| *r.get_ref())
        .unwrap_or(Role::Standby);
    let agent_path = match &n.agent_path {
        Some(a) if a.get_ref().trim().is_empty() => {
            c.err(
                a.span(),
                "agent_path is empty",
                Some("the hasync binary on that node, e.g. \"/usr/local/bin/hasync\"".into()),
            );
            String::new()
        }
        Some(a) => a.get_ref().clone(),
        None => "hasync".to_string(),
    };
    let service = n.service.map(|s| {
        let timeout = match &s.timeout {
            Some(t) => match parse_duration(t.get_ref()) {
                Ok(d) if d.is_zero() => {
                    c.err(t.span(), "timeout must be more than zero", None);
                    DEFAULT_TIMEOUT
                }
                Ok(d) => d,
                Err(e) => {
                    c.err(
                        t.span(),
                        format!("bad duration {e}"),
                        Some("write e.g. \"120s\", \"2m\" or \"1h30m\"".into()),
                    );
                    DEFAULT_TIMEOUT
                }
            },
            None => DEFAULT_TIMEOUT,
        };
        for (key, cmd) in [
            ("stop", &s.stop),
            ("start", &s.start),
            ("status", &s.status),
        ] {
            if cmd.get_ref().trim().is_empty() {
                c.err(
                    cmd.span(),
                    format!("node {name}: service {key} command is empty"),
                    // Every error says what to write instead.
                    Some(format!(
                        "the shell command that does it on the node, e.g. {key} = \"systemctl {key} tomcat\""
                    )),
                );
            }
        }
        if let Some(w) = &s.writable_check {
            if w.get_ref().trim().is_empty() {
                c.err(
                    w.span(),
                    format!("node {name}: service writable_check command is empty"),
                    Some("a shell command that exits 0 while the running application accepts writes and 1 while it runs read-only; or leave the key out".into()),
                );
            }
        }
        if let Some(u) = &s.health_url {
            let v = u.get_ref();
            // The check speaks plain HTTP through the node's SSH tunnel
            // (the URL is as seen from the node): an https:// URL would
            // fail every start, so it is refused here.
            if !v.starts_with("http://") {
                c.err(
                    u.span(),
                    format!("health_url {v:?} is not an http:// URL (hasync checks it in plain HTTP, on the node, through its SSH tunnel)"),
                    Some("the whole URL as seen from the node, e.g. health_url = \"http://localhost:8080/OpenKM/\"".into()),
                );
            }
        }
        Service {
            stop: s.stop.into_inner(),
            start: s.start.into_inner(),
            status: s.status.into_inner(),
            health_url: s.health_url.map(Spanned::into_inner),
            writable_check: s.writable_check.map(Spanned::into_inner),
            timeout,
        }
    });
    let database = match (database, n.database) {
        (None, Some(_)) => {
            c.err(span.clone(), format!("node {name} has a [nodes.{name}.database] section but there is no [database] section"), Some("add [database] with the engine, name and user".into()));
            None
        }
        (None, None) => None,
        (Some(db), None) => Some(db.clone()),
        (Some(db), Some(o)) => {
            let mut db = db.clone();
            if let Some(nm) = &o.name {
                if let Err(why) = check_identifier(nm.get_ref()) {
                    c.err(
                        nm.span(),
                        format!("database name {:?}: {why}", nm.get_ref()),
                        Some(identifier_hint(nm.get_ref())),
                    );
                }
                db.name = nm.get_ref().clone();
            }
            if let Some(h) = o.host {
                db.host = h;
            }
            if let Some(p) = o.port {
                db.port = p;
            }
            if let Some(u) = o.user {
                db.user = u;
            }
            if let Some(p) = &o.password_file {
                db.password_file = Some(c.password_file(p));
            }
            Some(db)
        }
    };
    Node {
        name: name.to_string(),
        endpoint: Endpoint {
            node: name.to_string(),
            address,
            connect_timeout: CONNECT_TIMEOUT,
        },
        root,
        state_dir,
        initial_role,
        agent_path,
        ssh_client: n.ssh_client.unwrap_or(SshClient::Auto),
        service,
        database,
    }
}

/// The user hasync runs as: the default SSH login, as with `ssh host`.
fn current_user() -> String {
    std::env::var("USER")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| {
            // SAFETY: getuid cannot fail; getpwuid returns a pointer into static storage or null.
            unsafe {
                let pw = libc::getpwuid(libc::getuid());
                if pw.is_null() {
                    "root".into()
                } else {
                    std::ffi::CStr::from_ptr((*pw).pw_name)
                        .to_string_lossy()
                        .into_owned()
                }
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_field_suggests() {
        let h =
            unknown_field_hint("unknown field `adress`, expected one of `address`, `port`, `user`");
        assert_eq!(h.as_deref(), Some("did you mean `address`?"));
    }
}
