//! Integration-test harness for `hasync`: a real two-node cluster on one host.
//!
//! hasync replicates a document-management server (a file tree plus a
//! MariaDB/MySQL or PostgreSQL database) from a primary node to a mirror
//! over SSH. What breaks such a tool in production is exactly what fakes
//! leave out: host-key checking, remote shells and quoting, rsync over ssh,
//! dump/load privileges, password authentication, servers going away in the
//! middle of a run. So the harness runs the real components. Each node has
//!
//! * an OpenSSH `sshd` on its own loopback address (`okm1` = 127.0.0.2,
//!   `okm2` = 127.0.0.3) with its own host key ([`sshd`]),
//! * a MariaDB server ([`mariadb`]) and a PostgreSQL server ([`postgres`]),
//!   both on 127.0.0.1 with random ports, each with database `okmdb` owned
//!   by user `okm`,
//! * a fake application controlled by an LSB-style `app.py` that serves HTTP and reads its read-only flag at startup ([`app`]).
//!
//! The cluster is started lazily, once per test binary, by [`cluster`].
//! All tests of the binary share it, and it is torn down at process exit
//! ([`proc`] explains how cleanup survives panics, signals and `kill -9`).
//! The servers of all nodes start in parallel, which takes a second or two.
//!
//! Everything lives in a private run directory `/tmp/hasync-it-<pid>`:
//!
//! ```text
//! id_ed25519{,.pub}  known_hosts  db-password  .owner  pids/  scratch/
//! okm1/{sshd,mariadb,postgres,app}/  okm2/...
//! ```
//!
//! Requirements: run as root on Debian 12 with `openssh-server`,
//! `mariadb-server`, `mariadb-client`, `postgresql-15` and `rsync`
//! installed. None of their system services need to run.
//!
//! Tests run in parallel threads but share one cluster, including the
//! databases named `okmdb`. A test that changes shared state (databases,
//! the app, stopping servers) should hold [`Cluster::lock`].
//!
//! Set `HASYNC_IT_KEEP=1` to keep the run directory, with all server logs,
//! after the run.

// Not every test uses every helper.
#![allow(dead_code)]

pub mod app;
pub mod mariadb;
pub mod postgres;
pub mod proc;
pub mod sshd;

use std::collections::BTreeSet;
use std::fs;
use std::io::Read;
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::thread;
use std::time::{Duration, Instant};

pub use app::FakeApp;
pub use mariadb::MariaDb;
pub use postgres::Postgres;
pub use sshd::Sshd;

/// The nodes of the cluster: (name, loopback IP).
pub const NODES: [(&str, &str); 2] = [("okm1", "127.0.0.2"), ("okm2", "127.0.0.3")];
/// Name of the application database on every DB server.
pub const DATABASE: &str = "okmdb";
/// Application DB user on every DB server.
pub const DB_USER: &str = "okm";
/// How long a server may take to become ready.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Address the DB servers listen on.
pub const DB_HOST: &str = "127.0.0.1";

/// The shared test cluster. See the module docs.
pub struct Cluster {
    /// Private run directory of this test process, `/tmp/hasync-it-<pid>`
    /// (mode 0755 so the `postgres` user can traverse it).
    pub base: PathBuf,
    /// `okm1` (127.0.0.2) and `okm2` (127.0.0.3), in that order.
    pub nodes: Vec<Node>,
    /// Client ed25519 private key without passphrase, authorised for root
    /// on both sshds.
    pub identity_file: PathBuf,
    /// The public half, `ssh-ed25519 AAAA... hasync-it-client`.
    pub identity_pub: String,
    /// known_hosts with both nodes' host keys as plain (unhashed)
    /// `[127.0.0.2]:PORT ssh-ed25519 AAAA...` lines.
    pub known_hosts: PathBuf,
    /// Password of DB user `okm` on every DB server. It is alphanumeric.
    pub db_password: String,
    /// File containing `db_password` plus a trailing newline, mode 0600.
    pub db_password_file: PathBuf,
    /// How long starting the cluster took.
    pub start_duration: Duration,
    lock: RwLock<()>,
    scratch_seq: AtomicUsize,
}

/// One simulated server machine.
pub struct Node {
    /// `okm1` or `okm2`.
    pub name: String,
    /// `127.0.0.2` or `127.0.0.3`.
    pub ip: String,
    /// `<base>/<name>`: the node's server directories live under it.
    pub dir: PathBuf,
    pub sshd: Sshd,
    pub mariadb: MariaDb,
    pub postgres: Postgres,
    pub app: FakeApp,
}

impl Node {
    /// `root@<ip>`, the SSH login for this node.
    pub fn ssh_target(&self) -> String {
        format!("root@{}", self.ip)
    }
}

/// The shared cluster. It is started on first use; later calls return the
/// same instance. If startup fails, this and every later call panic with
/// the reason, and startup is not retried.
pub fn cluster() -> &'static Cluster {
    static CLUSTER: OnceLock<Result<Cluster, String>> = OnceLock::new();
    let res = CLUSTER.get_or_init(|| {
        panic::catch_unwind(AssertUnwindSafe(Cluster::start)).map_err(|p| panic_message(&*p))
    });
    match res {
        Ok(c) => c,
        Err(e) => panic!("hasync-it: the test cluster failed to start:\n{e}"),
    }
}

impl Cluster {
    fn start() -> Cluster {
        let t0 = Instant::now();
        proc::require_root();
        sshd::preflight();
        sshd::ensure_privsep_dir();
        let pg_ids = postgres::service_user();
        let base = proc::create_run_dir();

        let db_password = random_token(24);
        let db_password_file = base.join("db-password");
        write_file(&db_password_file, &format!("{db_password}\n"), 0o600);

        let identity_file = base.join("id_ed25519");
        let keygen_log = base.join("ssh-keygen.log");
        proc::run_logged(
            sshd::keygen_cmd(&identity_file, "hasync-it-client"),
            "ssh-keygen (client key)",
            &keygen_log,
            Duration::from_secs(30),
        );
        let identity_pub = read_trimmed(&identity_file.with_extension("pub"));
        let pids = base.join("pids");

        // Start all servers of all nodes in parallel. Every thread is joined
        // explicitly, so all failures are reported and none is left behind.
        let node_dirs: Vec<(&str, &str, PathBuf)> = NODES
            .iter()
            .map(|&(name, ip)| {
                let dir = base.join(name);
                make_dir(&dir, 0o755);
                (name, ip, dir)
            })
            .collect();
        type Started = (
            thread::Result<Sshd>,
            thread::Result<MariaDb>,
            thread::Result<Postgres>,
        );
        let started: Vec<Started> = thread::scope(|s| {
            let handles: Vec<_> = node_dirs
                .iter()
                .map(|(name, ip, dir)| {
                    let (pids, pw, idp) = (&pids, &db_password, &identity_pub);
                    (
                        s.spawn(move || Sshd::setup(&dir.join("sshd"), name, ip, idp, pids)),
                        s.spawn(move || MariaDb::setup(&dir.join("mariadb"), name, pw, pids)),
                        s.spawn(move || {
                            Postgres::setup(&dir.join("postgres"), name, pw, pg_ids, pids)
                        }),
                    )
                })
                .collect();
            handles
                .into_iter()
                .map(|(a, b, c)| (a.join(), b.join(), c.join()))
                .collect()
        });

        let mut errors = Vec::new();
        let mut nodes = Vec::new();
        for ((name, ip, dir), (sshd, maria, pg)) in node_dirs.into_iter().zip(started) {
            match (sshd, maria, pg) {
                (Ok(sshd), Ok(mariadb), Ok(postgres)) => {
                    let app = FakeApp::setup(&dir.join("app"), name, ip, &db_password_file);
                    nodes.push(Node {
                        name: name.to_string(),
                        ip: ip.to_string(),
                        dir,
                        sshd,
                        mariadb,
                        postgres,
                        app,
                    });
                }
                (a, b, c) => {
                    for (what, r) in [
                        ("sshd", a.err()),
                        ("mariadb", b.err()),
                        ("postgres", c.err()),
                    ] {
                        if let Some(p) = r {
                            errors.push(format!("[{name} {what}] {}", panic_message(&*p)));
                        }
                    }
                }
            }
        }
        if !errors.is_empty() {
            panic!("{}", errors.join("\n\n"));
        }

        let known_hosts = base.join("known_hosts");
        let lines: String = nodes
            .iter()
            .map(|n| n.sshd.known_hosts_line() + "\n")
            .collect();
        write_file(&known_hosts, &lines, 0o644);

        let start_duration = t0.elapsed();
        proc::note(&format!(
            "hasync-it: cluster up in {:.2}s ({})",
            start_duration.as_secs_f64(),
            base.display()
        ));
        Cluster {
            base,
            nodes,
            identity_file,
            identity_pub,
            known_hosts,
            db_password,
            db_password_file,
            start_duration,
            lock: RwLock::new(()),
            scratch_seq: AtomicUsize::new(0),
        }
    }

    /// The node called `name` (`"okm1"` or `"okm2"`). Panics if unknown.
    pub fn node(&self, name: &str) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("hasync-it: no node named {name:?}"))
    }

    /// A new, empty, unique directory under `<base>/scratch` for one test,
    /// named after `label` (sanitised) plus a sequence number. Mode 0755.
    pub fn scratch_dir(&self, label: &str) -> PathBuf {
        let n = self.scratch_seq.fetch_add(1, Ordering::SeqCst);
        let clean: String = label
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .take(60)
            .collect();
        let dir = self.base.join("scratch").join(format!("{clean}-{n}"));
        fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("hasync-it: cannot create {}: {e}", dir.display()));
        let _ = fs::set_permissions(&dir, fs::Permissions::from_mode(0o755));
        dir
    }

    /// Exclusive use of the cluster, for tests that change shared state
    /// (the `okmdb` databases, the fake apps, stopping or starting servers):
    /// waits until no other test uses it. Poisoning from a panicking test is
    /// ignored.
    pub fn lock(&self) -> RwLockWriteGuard<'_, ()> {
        self.lock.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Shared use of the cluster, for tests that only need it up (any number
    /// at once, never while a test holds [`Cluster::lock`]).
    pub fn share(&self) -> RwLockReadGuard<'_, ()> {
        self.lock.read().unwrap_or_else(|e| e.into_inner())
    }

    /// ssh client options for the harness: the client key, our
    /// known_hosts, strict host key checking, batch mode, and no user or
    /// system config. The port and target are not included.
    pub fn ssh_options(&self) -> Vec<String> {
        [
            "-F",
            "none",
            "-i",
            &self.identity_file.display().to_string(),
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            &format!("UserKnownHostsFile={}", self.known_hosts.display()),
            "-o",
            "GlobalKnownHostsFile=/dev/null",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "ConnectTimeout=10",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    /// A `Command` for `ssh <options> -p PORT root@IP <remote>` to `node`.
    pub fn ssh(&self, node: &str, remote: &str) -> Command {
        let n = self.node(node);
        let mut cmd = Command::new("ssh");
        cmd.args(self.ssh_options())
            .arg("-p")
            .arg(n.sshd.port.to_string())
            .arg(n.ssh_target())
            .arg(remote);
        cmd
    }

    /// A remote-shell string for `rsync -e` that reaches `node`. It
    /// contains the port; the paths in it contain no spaces.
    pub fn rsync_rsh(&self, node: &str) -> String {
        let n = self.node(node);
        format!("ssh {} -p {}", self.ssh_options().join(" "), n.sshd.port)
    }
}

// ---------------------------------------------------------------------------
// Small shared utilities
// ---------------------------------------------------------------------------

/// Text of a panic payload.
pub fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "(non-string panic payload)".to_string()
    }
}

/// `n` bytes from the kernel CSPRNG.
pub fn random_bytes(n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .expect("hasync-it: cannot read /dev/urandom");
    buf
}

/// A random alphanumeric string of `len` characters.
pub fn random_token(len: usize) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut out = String::with_capacity(len);
    while out.len() < len {
        for b in random_bytes(len * 2) {
            // 248 = 4 * 62; rejecting larger bytes keeps the result unbiased.
            if b < 248 && out.len() < len {
                out.push(ALPHABET[usize::from(b) % ALPHABET.len()] as char);
            }
        }
    }
    out
}

/// A TCP port that is currently free on `ip` and has not been handed out
/// before in this process.
///
/// Ports come from 10000 up to the start of the kernel's ephemeral range,
/// not from `bind(:0)`. An ephemeral port can later be taken by an outgoing
/// client connection (ssh, mysql, psql), which would make restarting a
/// server on the *same* port fail.
pub fn free_port(ip: &str) -> u16 {
    static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    let addr: Ipv4Addr = ip
        .parse()
        .unwrap_or_else(|e| panic!("hasync-it: bad IP {ip}: {e}"));
    let ephemeral_lo = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let (lo, hi) = if ephemeral_lo > 12000 {
        (10000u16, ephemeral_lo)
    } else {
        (ephemeral_lo.max(1025), 65535)
    };
    let mut used = proc::lock(&HANDED_OUT);
    for _ in 0..1000 {
        let r = random_bytes(2);
        let port = lo + (u16::from_le_bytes([r[0], r[1]]) % (hi - lo));
        if used.contains(&port) {
            continue;
        }
        if TcpListener::bind((addr, port)).is_ok() {
            used.insert(port);
            return port;
        }
    }
    panic!("hasync-it: no free TCP port found on {ip}");
}

/// Writes `contents` to `path` and sets `mode`. Panics on error.
pub fn write_file(path: &Path, contents: &str, mode: u32) {
    fs::write(path, contents)
        .unwrap_or_else(|e| panic!("hasync-it: cannot write {}: {e}", path.display()));
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("hasync-it: cannot chmod {}: {e}", path.display()));
}

/// Creates `path` (and its parents) and sets `mode` on it.
pub fn make_dir(path: &Path, mode: u32) {
    fs::create_dir_all(path)
        .unwrap_or_else(|e| panic!("hasync-it: cannot create {}: {e}", path.display()));
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("hasync-it: cannot chmod {}: {e}", path.display()));
}

/// Reads a file and trims surrounding whitespace. Panics on error.
pub fn read_trimmed(path: &Path) -> String {
    fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("hasync-it: cannot read {}: {e}", path.display()))
        .trim()
        .to_string()
}

/// Removes environment variables starting with any of `prefixes` from
/// `cmd`. CI machines sometimes set `PGHOST`, `MYSQL_PWD` and the like,
/// which would redirect the harness's DB clients.
pub fn scrub_env(cmd: &mut Command, prefixes: &[&str]) {
    for (k, _) in std::env::vars_os() {
        let k = k
            .to_str()
            .filter(|k| prefixes.iter().any(|p| k.starts_with(p)));
        if let Some(k) = k {
            cmd.env_remove(k);
        }
    }
}
