//! A real MariaDB server per node.
//!
//! hasync copies a MySQL/MariaDB database with dump/load, and it builds the
//! new copy next to the live one (`okmdb__hasync_new`, `okmdb__hasync_old`)
//! before it swaps them. Privileges, character sets and
//! `--single-transaction` behaviour are only tested meaningfully against a
//! real server. Each node gets a private `mariadbd` with its own data
//! directory (created by `mariadb-install-db`). It listens on a Unix socket
//! for the harness's admin access (root via `unix_socket` auth, because the
//! tests run as root) and on TCP 127.0.0.1:`port` for the application user
//! `okm` with a password.
//!
//! The settings are tuned for a fast start and a small footprint: a 64 MiB
//! buffer pool, a small redo log, no doublewrite buffer, relaxed flushing,
//! no native AIO (io_uring/libaio are often unavailable or limited in
//! containers), and no buffer-pool dump or load.

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use super::proc::{self, Server};
use super::{free_port, make_dir, scrub_env};

use super::{DATABASE, DB_HOST, DB_USER, READY_TIMEOUT};

/// Options shared by `mariadb-install-db` (which passes them on to its
/// bootstrap server) and `mariadbd`.
const SERVER_OPTS: &[&str] = &[
    "--user=root",
    "--skip-name-resolve",
    "--innodb-buffer-pool-size=64M",
    "--innodb-log-file-size=16M",
    "--innodb-log-buffer-size=8M",
    "--innodb-use-native-aio=0",
    "--innodb-doublewrite=0",
    "--innodb-flush-log-at-trx-commit=2",
    "--skip-innodb-buffer-pool-dump-at-shutdown",
    "--skip-innodb-buffer-pool-load-at-startup",
    "--character-set-server=utf8mb4",
    "--collation-server=utf8mb4_unicode_ci",
];

/// One node's MariaDB server. See the module docs.
pub struct MariaDb {
    pub node: String,
    /// TCP address: always 127.0.0.1.
    pub host: String,
    /// TCP port on 127.0.0.1. It stays the same across stop/start.
    pub port: u16,
    /// Unix socket (admin access as root).
    pub socket: PathBuf,
    /// `okmdb`.
    pub database: String,
    /// `okm`.
    pub user: String,
    /// Password of `okm` (same as `Cluster::db_password`).
    pub password: String,
    pub datadir: PathBuf,
    /// Server log (stderr), appended across restarts.
    pub log: PathBuf,
    server: Server,
}

impl MariaDb {
    /// Initialises a data directory under `dir`, starts the server, and
    /// creates database `okmdb` and user `okm` with `password`.
    pub(super) fn setup(dir: &Path, node: &str, password: &str, pids: &Path) -> MariaDb {
        make_dir(dir, 0o755);
        let datadir = dir.join("data");
        let run = dir.join("run");
        let tmp = dir.join("tmp");
        make_dir(&run, 0o755);
        make_dir(&tmp, 0o755);
        let log = dir.join("mariadb.log");
        let socket = run.join("mysqld.sock");
        let port = free_port(DB_HOST);

        let mut init = Command::new("/usr/bin/mariadb-install-db");
        init.arg("--no-defaults") // must come first
            .arg(format!("--datadir={}", datadir.display()))
            .arg("--auth-root-authentication-method=socket")
            .arg("--skip-test-db")
            .arg(format!("--tmpdir={}", tmp.display()))
            .args(SERVER_OPTS);
        proc::run_logged(init, "mariadb-install-db", &log, Duration::from_secs(120));

        let (d, s, r, t) = (datadir.clone(), socket.clone(), run.clone(), tmp.clone());
        let server = Server::new(
            &format!("{node}-mariadb"),
            &log,
            pids,
            libc::SIGTERM,
            Box::new(move || {
                let mut cmd = Command::new("/usr/sbin/mariadbd");
                cmd.arg("--no-defaults") // must come first
                    .arg(format!("--datadir={}", d.display()))
                    .arg(format!("--socket={}", s.display()))
                    .arg(format!("--port={port}"))
                    .arg(format!("--bind-address={DB_HOST}"))
                    .arg(format!("--pid-file={}", r.join("mariadbd.pid").display()))
                    .arg(format!("--tmpdir={}", t.display()))
                    .args(SERVER_OPTS)
                    .arg("--max-connections=200")
                    .arg("--max-connect-errors=1000000");
                cmd
            }),
        );

        let db = MariaDb {
            node: node.to_string(),
            host: DB_HOST.to_string(),
            port,
            socket,
            database: DATABASE.to_string(),
            user: DB_USER.to_string(),
            password: password.to_string(),
            datadir,
            log,
            server,
        };
        db.start();

        // `okmdb%` (the `%` is a wildcard) also covers the scratch databases
        // okmdb__hasync_new and okmdb__hasync_old used while swapping.
        // PROCESS is needed by mariadb-dump for tablespace info; RELOAD for
        // FLUSH during consistent dumps.
        let pw = quote(password);
        let mut sql = format!(
            "CREATE DATABASE `{DATABASE}` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci;\n"
        );
        for host in ["localhost", "127.0.0.1", "%"] {
            let account = format!("'{DB_USER}'@'{host}'");
            sql += &format!(
                "CREATE USER {account} IDENTIFIED BY {pw};\n\
                 GRANT ALL PRIVILEGES ON `{DATABASE}%`.* TO {account};\n\
                 GRANT PROCESS, RELOAD ON *.* TO {account};\n"
            );
        }
        db.sql_in("mysql", &sql);
        db
    }

    /// Starts the server if it is not running and waits until both the
    /// socket and the TCP port accept connections.
    pub fn start(&self) {
        self.server.spawn();
        let addr: SocketAddr = format!("{}:{}", self.host, self.port)
            .parse()
            .expect("socket address");
        self.server
            .wait_ready("accepting connections", READY_TIMEOUT, || {
                UnixStream::connect(&self.socket).is_ok()
                    && TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok()
            });
    }

    /// Clean shutdown (SIGTERM). No-op if not running.
    pub fn stop(&self) {
        self.server.stop();
    }

    /// SIGKILL, as in a crash. InnoDB recovers on the next start.
    pub fn kill(&self) {
        self.server.kill();
    }

    pub fn is_running(&self) -> bool {
        self.server.is_running()
    }

    pub fn pid(&self) -> Option<u32> {
        self.server.pid()
    }

    /// Runs `sql` in `okmdb` as the admin (root through the socket) in batch
    /// mode (`-N -B`). Returns stdout; panics with stderr on failure.
    pub fn sql(&self, sql: &str) -> String {
        self.sql_in(&self.database, sql)
    }

    /// Like [`MariaDb::sql`], but in database `db` (`"mysql"` always exists).
    pub fn sql_in(&self, db: &str, sql: &str) -> String {
        let mut cmd = self.admin_client();
        cmd.arg(format!("--database={db}"));
        run_client(cmd, sql).unwrap_or_else(|e| {
            panic!(
                "hasync-it: SQL failed on {} MariaDB ({db}): {e}\n--- SQL:\n{sql}",
                self.node
            )
        })
    }

    /// [`MariaDb::sql`] with surrounding whitespace trimmed, for single
    /// values.
    pub fn sql_value(&self, sql: &str) -> String {
        self.sql(sql).trim().to_string()
    }

    /// Runs `sql` over TCP (127.0.0.1:`port`) as `user` with `password` in
    /// database `db`. Returns stdout, or stderr on failure (for example a
    /// wrong password).
    pub fn sql_as(
        &self,
        user: &str,
        password: &str,
        db: &str,
        sql: &str,
    ) -> Result<String, String> {
        let mut cmd = Command::new("mariadb");
        cmd.arg("--no-defaults")
            .arg("--protocol=TCP")
            .arg(format!("--host={}", self.host))
            .arg(format!("--port={}", self.port))
            .arg(format!("--user={user}"))
            .arg(format!("--password={password}"))
            .arg(format!("--database={db}"))
            .args(["-N", "-B"]);
        scrub_env(&mut cmd, &["MYSQL_", "MARIADB_"]);
        run_client(cmd, sql)
    }

    /// A `mariadb` client command for the admin (root through the socket),
    /// without SQL. Useful for piping dumps in and out.
    pub fn admin_client(&self) -> Command {
        let mut cmd = Command::new("mariadb");
        cmd.arg("--no-defaults")
            .arg(format!("--socket={}", self.socket.display()))
            .arg("--user=root")
            .arg("--default-character-set=utf8mb4")
            .args(["-N", "-B"]);
        scrub_env(&mut cmd, &["MYSQL_", "MARIADB_"]);
        cmd
    }

    /// The last `lines` lines of the server log.
    pub fn log_tail(&self, lines: usize) -> String {
        proc::log_tail(&self.log, lines)
    }
}

/// Quotes `s` as a MariaDB string literal (default SQL mode: backslash
/// escapes are active).
pub fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// Feeds `sql` to a client on stdin. Returns stdout, or an error text with
/// the exit status and stderr.
pub(super) fn run_client(mut cmd: Command, sql: &str) -> Result<String, String> {
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    let mut stdin = child.stdin.take().expect("piped stdin");
    let input = sql.to_string();
    // Write from a thread so a large result cannot deadlock against a large
    // input.
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(input.as_bytes());
    });
    let out = child
        .wait_with_output()
        .map_err(|e| format!("waiting for client: {e}"))?;
    let _ = writer.join();
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}
