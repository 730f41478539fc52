//! A real PostgreSQL 15 server per node.
//!
//! hasync also supports PostgreSQL-backed installations (dump/restore into
//! `okmdb__hasync_new`, then a rename swap). That only means something
//! against a real server with real authentication, so each node gets a
//! private cluster created by `initdb`.
//!
//! PostgreSQL refuses to run as root, so `initdb` and `postgres` run as the
//! `postgres` system user: the Debian package creates it, and the harness
//! creates it with `useradd` if it is missing. The uid and gid are set on
//! the `Command`, and the parent-death signal is set afterwards (see
//! [`super::proc`]). Access:
//!
//! * Unix socket in `socket_dir`: `trust`, so the harness's admin helper
//!   ([`Postgres::sql`]) connects as superuser `postgres` without a password.
//! * TCP 127.0.0.1:`port`: `scram-sha-256` for everyone, so a wrong password
//!   for role `okm` really fails.
//!
//! `fsync=off`, `synchronous_commit=off` and `full_page_writes=off` trade
//! durability, which tests do not need, for speed.

use std::ffi::CString;
use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use super::mariadb::run_client;
use super::proc::{self, Server};
use super::{free_port, make_dir, scrub_env};

use super::{DATABASE, DB_HOST, DB_USER, READY_TIMEOUT};

/// Where Debian installs the PostgreSQL 15 server binaries. If that
/// version is missing, [`pg_bin`] falls back to the newest installed one.
pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";
/// The system user that runs the servers, and the superuser role.
pub const PG_SYSTEM_USER: &str = "postgres";

/// One node's PostgreSQL server. See the module docs.
pub struct Postgres {
    pub node: String,
    /// TCP address: always 127.0.0.1.
    pub host: String,
    /// TCP port on 127.0.0.1. The socket file in `socket_dir` uses it too.
    /// It stays the same across stop/start.
    pub port: u16,
    /// Directory that holds the Unix socket `.s.PGSQL.<port>`.
    pub socket_dir: PathBuf,
    /// `okmdb`, owned by `okm`.
    pub database: String,
    /// `okm` (LOGIN, CREATEDB).
    pub user: String,
    /// Password of `okm` (same as `Cluster::db_password`).
    pub password: String,
    /// Superuser role used by the admin helpers (`postgres`).
    pub superuser: String,
    pub datadir: PathBuf,
    /// Server log (stderr), appended across restarts.
    pub log: PathBuf,
    server: Server,
}

/// uid and gid of the `postgres` system user. If the user does not exist,
/// it is created with `useradd`.
pub fn service_user() -> (u32, u32) {
    if let Some(ids) = lookup_user(PG_SYSTEM_USER) {
        return ids;
    }
    let out = Command::new("/usr/sbin/useradd")
        .args([
            "--system",
            "--user-group",
            "--no-create-home",
            "--home-dir",
            "/nonexistent",
            "--shell",
            "/usr/sbin/nologin",
            PG_SYSTEM_USER,
        ])
        .output();
    // A concurrent test process may have created it meanwhile; look again.
    lookup_user(PG_SYSTEM_USER).unwrap_or_else(|| {
        panic!("hasync-it: no `{PG_SYSTEM_USER}` user and useradd failed: {out:?}")
    })
}

fn lookup_user(name: &str) -> Option<(u32, u32)> {
    let cname = CString::new(name).ok()?;
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: all-zero is a valid `passwd` (null pointers, zero ids).
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: valid pointers and buffer length; getpwnam_r is reentrant.
    let rc = unsafe {
        libc::getpwnam_r(
            cname.as_ptr(),
            &mut pwd,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        )
    };
    (rc == 0 && !result.is_null()).then_some((pwd.pw_uid, pwd.pw_gid))
}

/// Directory with `initdb` and `postgres`: [`PG_BIN`] if it exists,
/// otherwise the newest `/usr/lib/postgresql/<N>/bin`.
pub fn pg_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if Path::new(PG_BIN).join("postgres").exists() {
            return PathBuf::from(PG_BIN);
        }
        fs::read_dir("/usr/lib/postgresql")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let n: u32 = e.file_name().to_str()?.parse().ok()?;
                let bin = e.path().join("bin");
                bin.join("postgres").exists().then_some((n, bin))
            })
            .max()
            .map(|(_, bin)| bin)
            .unwrap_or_else(|| PathBuf::from(PG_BIN))
    })
    .clone()
}

fn chown(path: &Path, (uid, gid): (u32, u32)) {
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
        .unwrap_or_else(|e| panic!("hasync-it: cannot chown {}: {e}", path.display()));
}

/// A command that runs `program` from [`pg_bin`] as the postgres system
/// user, with a minimal, predictable environment.
fn pg_command(program: &str, ids: (u32, u32), cwd: &Path) -> Command {
    let mut cmd = Command::new(pg_bin().join(program));
    cmd.uid(ids.0)
        .gid(ids.1)
        .current_dir(cwd)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("HOME", cwd)
        .env("LANG", "C")
        .env("TZ", "UTC");
    cmd
}

impl Postgres {
    /// Runs `initdb` under `dir`, starts the server, and creates role `okm`
    /// with `password` and database `okmdb` owned by it.
    pub(super) fn setup(
        dir: &Path,
        node: &str,
        password: &str,
        ids: (u32, u32),
        pids: &Path,
    ) -> Postgres {
        // dir itself stays root-owned and world-traversable. The data
        // directory (which must be 0700) and the socket directory belong to
        // postgres.
        make_dir(dir, 0o755);
        let datadir = dir.join("data");
        let socket_dir = dir.join("run");
        make_dir(&datadir, 0o700);
        make_dir(&socket_dir, 0o755);
        chown(&datadir, ids);
        chown(&socket_dir, ids);
        let log = dir.join("postgres.log");
        let port = free_port(DB_HOST);

        let mut init = pg_command("initdb", ids, dir);
        init.arg("-D")
            .arg(&datadir)
            .args(["-U", PG_SYSTEM_USER])
            .args(["--encoding=UTF8", "--locale=C"])
            .args(["--auth-local=trust", "--auth-host=scram-sha-256"])
            .args(["--no-sync", "--no-instructions"]);
        proc::run_logged(init, "initdb", &log, Duration::from_secs(120));

        let (d, s, cwd) = (datadir.clone(), socket_dir.clone(), dir.to_path_buf());
        let server = Server::new(
            &format!("{node}-postgres"),
            &log,
            pids,
            // SIGINT = "fast" shutdown: it does not wait for clients to leave
            // (SIGTERM = "smart" would).
            libc::SIGINT,
            Box::new(move || {
                let mut cmd = pg_command("postgres", ids, &cwd);
                cmd.arg("-D").arg(&d);
                for setting in [
                    format!("listen_addresses={DB_HOST}"),
                    format!("port={port}"),
                    format!("unix_socket_directories={}", s.display()),
                    "shared_buffers=32MB".into(),
                    "max_connections=100".into(),
                    "fsync=off".into(),
                    "synchronous_commit=off".into(),
                    "full_page_writes=off".into(),
                    "jit=off".into(),
                    "password_encryption=scram-sha-256".into(),
                ] {
                    cmd.arg("-c").arg(setting);
                }
                cmd
            }),
        );

        let pg = Postgres {
            node: node.to_string(),
            host: DB_HOST.to_string(),
            port,
            socket_dir,
            database: DATABASE.to_string(),
            user: DB_USER.to_string(),
            password: password.to_string(),
            superuser: PG_SYSTEM_USER.to_string(),
            datadir,
            log,
            server,
        };
        pg.start();
        pg.sql_in(
            "postgres",
            &format!(
                "CREATE ROLE {DB_USER} LOGIN CREATEDB PASSWORD {};\n\
                 CREATE DATABASE {DATABASE} OWNER {DB_USER} ENCODING 'UTF8' TEMPLATE template0;\n",
                quote(password)
            ),
        );
        pg
    }

    /// Starts the server if it is not running and waits until it answers
    /// queries. The TCP port opens before recovery finishes, so a real query
    /// is used as the probe.
    pub fn start(&self) {
        self.server.spawn();
        self.server
            .wait_ready("answering queries", READY_TIMEOUT, || {
                self.try_sql_in("postgres", "SELECT 1").is_ok()
            });
    }

    /// Fast shutdown (SIGINT). No-op if not running.
    pub fn stop(&self) {
        self.server.stop();
    }

    /// SIGKILL of the postmaster and all its backends, as in a crash. The
    /// next start runs crash recovery.
    pub fn kill(&self) {
        self.server.kill();
    }

    pub fn is_running(&self) -> bool {
        self.server.is_running()
    }

    pub fn pid(&self) -> Option<u32> {
        self.server.pid()
    }

    /// Runs `sql` in `okmdb` as superuser `postgres` through the socket:
    /// `psql -X -A -t -q -v ON_ERROR_STOP=1`, with the script on stdin.
    /// `-q` suppresses command tags such as `INSERT 0 1`. Returns stdout;
    /// panics with stderr on failure.
    pub fn sql(&self, sql: &str) -> String {
        self.sql_in(&self.database, sql)
    }

    /// Like [`Postgres::sql`], but in database `db` (`"postgres"` always
    /// exists). Needed for statements such as `DROP DATABASE okmdb`.
    pub fn sql_in(&self, db: &str, sql: &str) -> String {
        self.try_sql_in(db, sql).unwrap_or_else(|e| {
            panic!(
                "hasync-it: SQL failed on {} PostgreSQL ({db}): {e}\n--- SQL:\n{sql}",
                self.node
            )
        })
    }

    /// [`Postgres::sql`] with surrounding whitespace trimmed, for single
    /// values.
    pub fn sql_value(&self, sql: &str) -> String {
        self.sql(sql).trim().to_string()
    }

    fn try_sql_in(&self, db: &str, sql: &str) -> Result<String, String> {
        let mut cmd = self.admin_client();
        cmd.args(["-d", db]);
        run_client(cmd, sql)
    }

    /// Runs `sql` over TCP (127.0.0.1:`port`, scram-sha-256) as `user` with
    /// `password` in database `db`. Returns stdout, or stderr on failure
    /// (for example a wrong password).
    pub fn sql_as(
        &self,
        user: &str,
        password: &str,
        db: &str,
        sql: &str,
    ) -> Result<String, String> {
        let mut cmd = Command::new("psql");
        scrub_env(&mut cmd, &["PG"]);
        cmd.args(["-X", "-A", "-t", "-q", "-w", "-v", "ON_ERROR_STOP=1"])
            .args(["-h", &self.host, "-p", &self.port.to_string()])
            .args(["-U", user, "-d", db])
            .env("PGPASSWORD", password)
            .env("PGCONNECT_TIMEOUT", "10");
        run_client(cmd, sql)
    }

    /// A `psql` command for the superuser through the socket, without `-d`
    /// and without SQL (`-X -A -t -q -v ON_ERROR_STOP=1`).
    pub fn admin_client(&self) -> Command {
        let mut cmd = Command::new("psql");
        scrub_env(&mut cmd, &["PG"]);
        cmd.args(["-X", "-A", "-t", "-q", "-w", "-v", "ON_ERROR_STOP=1"])
            .arg("-h")
            .arg(&self.socket_dir)
            .args(["-p", &self.port.to_string(), "-U", &self.superuser])
            .env("PGCONNECT_TIMEOUT", "10");
        cmd
    }

    /// The last `lines` lines of the server log.
    pub fn log_tail(&self, lines: usize) -> String {
        proc::log_tail(&self.log, lines)
    }
}

/// Quotes `s` as a PostgreSQL string literal (standard_conforming_strings
/// is on: only `'` needs doubling).
pub fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}
