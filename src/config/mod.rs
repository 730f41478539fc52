//! The configuration: one TOML file, validated into plain types.
//!
//! Parsing happens in two stages, like ripgrep's LowArgs → HiArgs: [`raw`]
//! mirrors the file with serde (unknown keys refused, spans kept), and
//! [`load`] turns it into the [`Config`] below, which the engines take. The
//! engines never see TOML, serde or clap, and every problem is reported with
//! `file:line:col` and a hint (see [`error`]).

pub mod duration;
pub mod error;
mod raw;

use std::path::{Path, PathBuf};
use std::time::Duration;

pub use error::{ConfigError, ConfigErrors};

use crate::schedule::cron::CronSchedule;
use crate::transport::Endpoint;

/// Where the config is read from when `-c` is not given and `$HASYNC_CONFIG`
/// is unset.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/hasync/hasync.toml";
/// The annotated template `hasync init` writes; parsed by a test.
pub const TEMPLATE: &str = include_str!("../../templates/hasync.toml");

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it came from, for messages.
    pub path: PathBuf,
    pub cluster_name: String,
    /// Nodes in the order the file lists them.
    pub nodes: Vec<Node>,
    pub files: Files,
    pub database: Option<Database>,
    pub schedule: Option<CronSchedule>,
    pub hooks: Hooks,
    /// Problems that do not stop a run but deserve a look (a password file
    /// readable by others). The CLI prints them on stderr.
    pub warnings: Vec<String>,
}

/// The role a node starts with. The nodes' own state records rule afterwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Primary,
    Standby,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Primary => "primary",
            Role::Standby => "standby",
        })
    }
}

/// One node of the pair (or more).
#[derive(Debug, Clone)]
pub struct Node {
    pub name: String,
    /// How to reach it; `Address::Local` for `address = "local"`.
    pub endpoint: Endpoint,
    /// The replicated tree, an absolute path on the node.
    pub root: String,
    /// Where the node keeps its state record, an absolute path on the node.
    pub state_dir: String,
    pub initial_role: Role,
    /// The hasync binary on the node, run as `<agent_path> agent`.
    pub agent_path: String,
    /// Which SSH client carries the agent's bulk stream.
    pub ssh_client: SshClient,
    pub service: Option<Service>,
    /// The `[database]` settings with this node's overrides applied.
    pub database: Option<Database>,
}

/// Which SSH implementation carries file data to and from a node's agent.
/// Control work (commands, tunnels, SFTP) always uses the built-in client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SshClient {
    /// OpenSSH's `ssh` when it is on PATH (about 3x faster), else built-in.
    Auto,
    /// The system `ssh` client, with strict host key checking against the
    /// node's known_hosts.
    Openssh,
    /// The built-in libssh2 client.
    Libssh2,
}

/// How to stop, start and query the application on a node.
#[derive(Debug, Clone)]
pub struct Service {
    pub stop: String,
    pub start: String,
    /// Exit 0 = running, as LSB init scripts do.
    pub status: String,
    pub health_url: Option<String>,
    /// Asks the running application (not its database) which mode it is
    /// in: exit 0 = it accepts writes, 1 = it runs read-only, anything else
    /// (or no answer within the timeout) = unknown. Applications read their
    /// read-only flag at startup, so the flag alone does not say this.
    pub writable_check: Option<String>,
    pub timeout: Duration,
}

/// What `[files]` says about the replicated tree.
#[derive(Debug, Clone)]
pub struct Files {
    /// rsync `--exclude` patterns.
    pub exclude: Vec<String>,
    /// Delete on the standby what the primary no longer has.
    pub delete: bool,
    /// Abort before deleting anything when a run would delete more than this.
    pub max_delete: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    Mysql,
    Postgres,
}

impl Engine {
    pub fn default_port(self) -> u16 {
        match self {
            Engine::Mysql => 3306,
            Engine::Postgres => 5432,
        }
    }
}

impl std::fmt::Display for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Engine::Mysql => "mysql",
            Engine::Postgres => "postgres",
        })
    }
}

/// Database settings (global, or one node's effective settings).
#[derive(Debug, Clone)]
pub struct Database {
    pub engine: Engine,
    pub name: String,
    /// As seen from the node itself; reached through an SSH tunnel.
    pub host: String,
    pub port: u16,
    pub user: String,
    /// A local file holding the password; `None` for socket/peer auth.
    pub password_file: Option<PathBuf>,
    pub readonly_sql: Vec<String>,
    pub readwrite_sql: Vec<String>,
    /// Start the primary's service again as soon as the dump's snapshot is
    /// taken instead of after the whole database phase (see the template).
    pub early_restart: bool,
}

impl Database {
    /// Read the password from `password_file` (first line, without the
    /// newline). Never logged, never put on a command line.
    pub fn password(&self) -> std::io::Result<Option<String>> {
        let Some(path) = &self.password_file else {
            return Ok(None);
        };
        let text = std::fs::read_to_string(path).map_err(|e| {
            std::io::Error::new(e.kind(), format!("password file {}: {e}", path.display()))
        })?;
        Ok(Some(text.lines().next().unwrap_or("").to_string()))
    }
}

/// Programs run at role changes and on failures.
#[derive(Debug, Clone, Default)]
pub struct Hooks {
    pub pre_promote: Option<PathBuf>,
    pub post_promote: Option<PathBuf>,
    pub on_failure: Option<PathBuf>,
    pub on_success: Option<PathBuf>,
}

impl Config {
    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// The node whose initial role is primary (validation guarantees one).
    pub fn initial_primary(&self) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.initial_role == Role::Primary)
            .expect("validated config has a primary")
    }
}

/// Which config file to use: `-c`, else `$HASYNC_CONFIG`, else the default.
pub fn resolve_path(cli: Option<&Path>) -> PathBuf {
    if let Some(p) = cli {
        return p.to_path_buf();
    }
    match std::env::var_os("HASYNC_CONFIG") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(DEFAULT_CONFIG_PATH),
    }
}

/// Read and validate a config file.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        let hint = if e.kind() == std::io::ErrorKind::NotFound {
            Some(format!(
                "create one with `hasync -c {} init`, or point -c / $HASYNC_CONFIG at yours",
                path.display()
            ))
        } else {
            None
        };
        ConfigErrors(vec![ConfigError::file(
            path,
            format!("cannot read: {e}"),
            hint,
        )])
    })?;
    parse(path, &text)
}

/// Validate config text that came from `path` (which is used for messages and
/// nothing else).
pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigErrors> {
    raw::parse(path, text, true)
}

/// Validate config text without checking that the local files it names
/// (identity, password, hooks) exist: for templates and examples written for
/// another machine.
pub fn parse_without_files(path: &Path, text: &str) -> Result<Config, ConfigErrors> {
    raw::parse(path, text, false)
}

/// Expand a leading `~` to `$HOME` (local paths only: identity files, known
/// hosts, password files, hooks).
pub fn expand_tilde(p: &str) -> PathBuf {
    if p == "~" || p.starts_with("~/") {
        if let Some(home) = std::env::var_os("HOME") {
            let mut out = PathBuf::from(home);
            if p.len() > 2 {
                out.push(&p[2..]);
            }
            return out;
        }
    }
    PathBuf::from(p)
}

/// A DB, table or role name hasync builds other names from (`okmdb__hasync_new`):
/// plain identifiers only, so no quoting mistakes are possible.
pub fn check_identifier(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > 48 {
        return Err("must be 1 to 48 characters (hasync appends `__hasync_new`)".into());
    }
    if !s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        || s.starts_with(|c: char| c.is_ascii_digit())
    {
        return Err("use letters, digits and `_` only, not starting with a digit".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers() {
        assert!(check_identifier("okmdb").is_ok());
        assert!(check_identifier("okm-db").is_err());
        assert!(check_identifier("1db").is_err());
    }

    #[test]
    fn tilde() {
        let home = PathBuf::from(std::env::var_os("HOME").expect("HOME is set"));
        assert_eq!(expand_tilde("~/.ssh/k"), home.join(".ssh/k"));
        assert_eq!(expand_tilde("/etc/k"), PathBuf::from("/etc/k"));
    }
}
