//! A fake document-management application per node.
//!
//! On a real node, hasync stops the application on the mirror before it
//! replaces files and database, starts it again afterwards, and checks
//! whether it is running and in which mode. It does this by running
//! configured shell commands over SSH and by asking the application over
//! HTTP. So the fake app is controlled the same way, and behaves like
//! OpenKM's Tomcat where hasync cares (the generated `app.py`, from
//! `app.py` beside this file, says how):
//!
//! * `app.py {start|stop|status}` with LSB semantics: `start` daemonises
//!   (its own session, stdio detached, so the SSH session can end) and
//!   succeeds if already running; `stop` sends SIGTERM to the process group,
//!   SIGKILL after 5 s; `status` exits 0 running, 3 stopped.
//! * Once started, after a short startup delay, it serves HTTP on its
//!   node's address ([`FakeApp::url`]): `/mode` says `writable` or
//!   `read-only`, `POST /documents` adds a document (403 while read-only).
//! * It reads its read-only flag (`OKM_CONFIG` `system.readonly`) once, at
//!   startup, from the database [`FakeApp::configure`] names; changing the
//!   flag later changes nothing until it is restarted, as with OpenKM.
//! * With `write_every`, it keeps adding documents while it runs writable:
//!   the file first (never rewriting a stored one), then its row in `doc`.
//! * `app.py writable` asks the running application its mode (exit 0
//!   writable, 1 read-only, 3 no answer): the `writable_check` of tests.
//!
//! The daemon is not a child of the test process (sshd's session spawned
//! it), so the harness registers its pidfile with
//! [`super::proc::register_pidfile`] to have it killed at exit.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use super::proc;
use super::{free_port, make_dir, write_file};

/// One node's fake application. See the module docs.
pub struct FakeApp {
    pub node: String,
    /// Where it serves HTTP: its node's address.
    pub ip: String,
    pub port: u16,
    /// Directory with the script, its config, pidfile and log.
    pub dir: PathBuf,
    /// The generated `app.py` (mode 0755).
    pub script: PathBuf,
    /// Written by the daemon itself; holds its pid, which is also its
    /// process-group id.
    pub pidfile: PathBuf,
    /// stdout/stderr of the daemon.
    pub log: PathBuf,
}

/// What the application does once started ([`FakeApp::configure`]).
#[derive(Debug, Clone, Default)]
pub struct AppConfig {
    /// The replicated tree its documents go into.
    pub root: Option<PathBuf>,
    /// Its database: ("mysql" | "postgres", server port, database name).
    pub database: Option<(&'static str, u16, String)>,
    /// Add a document this often while writable.
    pub write_every: Option<Duration>,
}

impl FakeApp {
    /// Writes `dir/app.py` for `node`, serving on `ip` at a free port.
    pub(super) fn setup(dir: &Path, node: &str, ip: &str, password_file: &Path) -> FakeApp {
        make_dir(dir, 0o755);
        let app = FakeApp {
            node: node.to_string(),
            ip: ip.to_string(),
            port: free_port(ip),
            dir: dir.to_path_buf(),
            script: dir.join("app.py"),
            pidfile: dir.join("app.pid"),
            log: dir.join("app.log"),
        };
        let text = include_str!("app.py")
            .replace("@NODE@", &app.node)
            .replace("@IP@", &app.ip)
            .replace("@PORT@", &app.port.to_string())
            .replace("@DIR@", &app.dir.display().to_string())
            .replace("@PWFILE@", &password_file.display().to_string());
        write_file(&app.script, &text, 0o755);
        proc::register_pidfile(&app.pidfile);
        app
    }

    /// Shell command that starts the app, e.g.
    /// `/tmp/hasync-it-123/okm1/app/app.py start`.
    pub fn start_cmd(&self) -> String {
        format!("{} start", self.script.display())
    }

    /// Shell command that stops the app.
    pub fn stop_cmd(&self) -> String {
        format!("{} stop", self.script.display())
    }

    /// Shell command that exits 0 if the app is running and 3 if not.
    pub fn status_cmd(&self) -> String {
        format!("{} status", self.script.display())
    }

    /// Shell command that exits 0 while the running app accepts writes, 1
    /// while it runs read-only (a `writable_check`).
    pub fn writable_cmd(&self) -> String {
        format!("{} writable", self.script.display())
    }

    /// Its HTTP root, e.g. `http://127.0.0.2:12345/` (a `health_url`).
    pub fn url(&self) -> String {
        format!("http://{}:{}/", self.ip, self.port)
    }

    /// What it does at its next start. [`FakeApp::unconfigure`] (or a
    /// stopped-apps guard) undoes it.
    pub fn configure(&self, c: &AppConfig) {
        let mut v = serde_json::json!({});
        if let Some(r) = &c.root {
            v["root"] = r.display().to_string().into();
        }
        if let Some((engine, port, db)) = &c.database {
            v["engine"] = (*engine).into();
            v["port"] = (*port).into();
            v["database"] = db.clone().into();
        }
        if let Some(w) = c.write_every {
            v["write_every"] = w.as_secs_f64().into();
        }
        write_file(&self.dir.join("app.json"), &v.to_string(), 0o644);
    }

    /// Back to an app that only serves HTTP, writable, with no database.
    pub fn unconfigure(&self) {
        let _ = std::fs::remove_file(self.dir.join("app.json"));
    }

    /// Runs `status` locally (all nodes share this host).
    pub fn is_running(&self) -> bool {
        self.run_local("status") == Some(0)
    }

    /// Starts the app locally, bypassing SSH. Panics on failure.
    pub fn start(&self) {
        let rc = self.run_local("start");
        assert_eq!(rc, Some(0), "hasync-it: {} app.py start failed", self.node);
    }

    /// Stops the app locally, bypassing SSH. Panics on failure.
    pub fn stop(&self) {
        let rc = self.run_local("stop");
        assert_eq!(rc, Some(0), "hasync-it: {} app.py stop failed", self.node);
    }

    /// pid of the running daemon, from the pidfile, if it is alive.
    pub fn pid(&self) -> Option<i32> {
        proc::read_pidfile(&self.pidfile).filter(|&p| proc::is_alive(p))
    }

    /// `GET path` (or `POST` with `post`): the status code and body, or
    /// `None` if it does not answer within 2 s.
    pub fn http(&self, method: &str, path: &str) -> Option<(u16, String)> {
        let addr = format!("{}:{}", self.ip, self.port).parse().ok()?;
        let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        write!(
            s,
            "{method} {path} HTTP/1.0\r\nHost: {}\r\nContent-Length: 0\r\n\r\n",
            self.ip
        )
        .ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        let code = out.split_whitespace().nth(1)?.parse().ok()?;
        let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
        Some((code, body))
    }

    /// What the running app says of its mode: "writable", "read-only", or
    /// `None` if it does not serve.
    pub fn mode(&self) -> Option<String> {
        self.http("GET", "/mode").map(|(_, b)| b.trim().to_string())
    }

    /// Ask it to store a document, as a user would: 201 stored, 403 read-only.
    pub fn try_write(&self) -> Option<u16> {
        self.http("POST", "/documents").map(|(c, _)| c)
    }

    fn run_local(&self, action: &str) -> Option<i32> {
        Command::new(&self.script)
            .arg(action)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .status()
            .ok()
            .and_then(|s| s.code())
    }
}
