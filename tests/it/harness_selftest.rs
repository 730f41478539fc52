//! Self-tests of the integration-test harness.
//!
//! They prove with the system clients (`ssh`, `rsync`, `sftp`, `mariadb`,
//! `mariadb-dump`, `psql`, `pg_dump`) that the cluster really works as the
//! hasync tests assume. The cleanup guarantees are tested too: the test
//! binary re-runs itself as a child that starts its own cluster, then exits
//! normally, panics, gets SIGTERM, or gets SIGKILL, and the parent checks
//! that nothing is left behind.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};
use std::{env, fs};

use crate::harness::{cluster, proc};

use crate::harness::{Cluster, DATABASE, DB_USER, NODES};

fn check(cmd: &mut Command) -> String {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The exact ssh invocation a human would use, spelled out (rather than
/// `Cluster::ssh`) to prove the published fields are enough.
fn plain_ssh(c: &Cluster, node: &str, remote: &str) -> Command {
    let n = c.node(node);
    let mut cmd = Command::new("ssh");
    cmd.arg("-i")
        .arg(&c.identity_file)
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}", c.known_hosts.display()))
        .args(["-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes"])
        .args(["-o", "IdentitiesOnly=yes", "-F", "none"])
        .args(["-p", &n.sshd.port.to_string()])
        .arg(format!("root@{}", n.ip))
        .arg(remote);
    cmd
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

fn wait_exit(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(st)) = child.try_wait() {
            return Some(st);
        }
        if Instant::now() > deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn cluster_starts_and_is_laid_out_as_documented() {
    let c = cluster();
    eprintln!(
        "hasync-it self-test: cluster start took {:.2}s",
        c.start_duration.as_secs_f64()
    );
    assert!(c.base.starts_with("/tmp"));
    let base_name = c.base.file_name().unwrap().to_str().unwrap();
    assert_eq!(base_name, format!("hasync-it-{}", std::process::id()));
    assert_eq!(mode(&c.base), 0o755);
    assert_eq!(mode(&c.db_password_file), 0o600);
    assert_eq!(mode(&c.identity_file), 0o600);
    assert_eq!(
        fs::read_to_string(&c.db_password_file).unwrap(),
        format!("{}\n", c.db_password)
    );
    assert!(c.db_password.len() >= 16);

    let names: Vec<(&str, &str)> = c
        .nodes
        .iter()
        .map(|n| (n.name.as_str(), n.ip.as_str()))
        .collect();
    assert_eq!(names, NODES.to_vec());

    let kh = fs::read_to_string(&c.known_hosts).unwrap();
    for n in &c.nodes {
        assert!(n.sshd.host_key_pub.starts_with("ssh-ed25519 AAAA"));
        assert_eq!(n.sshd.host_key_pub.split_whitespace().count(), 2);
        let line = format!("[{}]:{} {}", n.ip, n.sshd.port, n.sshd.host_key_pub);
        assert!(kh.lines().any(|l| l == line), "{line} missing in:\n{kh}");
        assert!(n.sshd.is_running() && n.mariadb.is_running() && n.postgres.is_running());
        assert_eq!(n.mariadb.database, DATABASE);
        assert_eq!(n.postgres.user, DB_USER);
    }
    assert_ne!(c.nodes[0].sshd.host_key_pub, c.nodes[1].sshd.host_key_pub);
}

#[test]
fn scratch_dirs_are_unique_and_empty() {
    let c = cluster();
    let a = c.scratch_dir("some test/label");
    let b = c.scratch_dir("some test/label");
    assert_ne!(a, b);
    assert!(a.starts_with(&c.base) && a.is_dir() && b.is_dir());
    assert_eq!(fs::read_dir(&a).unwrap().count(), 0);
}

#[test]
fn ssh_login_with_strict_host_key_checking_on_both_nodes() {
    let c = cluster();
    let _guard = c.lock(); // another test stops and starts sshds
    for n in &c.nodes {
        check(&mut plain_ssh(c, &n.name, "true"));
        let out = check(&mut c.ssh(&n.name, "id -u; echo $SSH_CONNECTION"));
        let mut lines = out.lines();
        assert_eq!(lines.next(), Some("0"));
        // SSH_CONNECTION = client_ip client_port server_ip server_port
        let conn: Vec<&str> = lines.next().unwrap().split(' ').collect();
        assert_eq!(conn[2], n.ip);
        assert_eq!(conn[3], n.sshd.port.to_string());
    }

    // A known_hosts that holds only okm1's key must not verify okm2.
    let dir = c.scratch_dir("wrong-known-hosts");
    let kh = dir.join("known_hosts");
    let okm1 = c.node("okm1");
    let okm2 = c.node("okm2");
    fs::write(
        &kh,
        format!(
            "[{}]:{} {}\n",
            okm2.ip, okm2.sshd.port, okm1.sshd.host_key_pub
        ),
    )
    .unwrap();
    // Not plain_ssh: ssh uses the *first* -o UserKnownHostsFile it sees.
    let out = Command::new("ssh")
        .args(["-F", "none", "-i"])
        .arg(&c.identity_file)
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}", kh.display()))
        .args(["-o", "GlobalKnownHostsFile=/dev/null"])
        .args(["-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes"])
        .args([
            "-p",
            &okm2.sshd.port.to_string(),
            &okm2.ssh_target(),
            "true",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("REMOTE HOST IDENTIFICATION HAS CHANGED")
            || stderr.contains("Host key verification failed"),
        "{stderr}"
    );
}

#[test]
fn rsync_and_sftp_work_over_ssh() {
    let c = cluster();
    let _guard = c.lock();
    let src = c.scratch_dir("rsync-src");
    let dst = c.scratch_dir("rsync-dst");
    fs::create_dir(src.join("sub")).unwrap();
    fs::write(src.join("a.txt"), "hello").unwrap();
    fs::write(src.join("sub/b.bin"), vec![7u8; 100_000]).unwrap();
    check(
        Command::new("rsync")
            .args(["-a", "--delete", "-e", &c.rsync_rsh("okm2")])
            .arg(format!("{}/", src.display()))
            .arg(format!(
                "{}:{}/",
                c.node("okm2").ssh_target(),
                dst.display()
            )),
    );
    assert_eq!(fs::read_to_string(dst.join("a.txt")).unwrap(), "hello");
    assert_eq!(fs::read(dst.join("sub/b.bin")).unwrap().len(), 100_000);

    let batch = c.scratch_dir("sftp").join("batch");
    fs::write(&batch, format!("ls {}\n", dst.display())).unwrap();
    let n = c.node("okm1");
    let out = check(
        Command::new("sftp")
            .args(["-b"])
            .arg(&batch)
            .args(c.ssh_options())
            .args(["-P", &n.sshd.port.to_string(), &n.ssh_target()]),
    );
    assert!(out.contains("a.txt"), "{out}");
}

#[test]
fn mariadb_admin_app_user_and_dump() {
    let c = cluster();
    let _guard = c.lock();
    for n in &c.nodes {
        let db = &n.mariadb;
        assert_eq!(db.sql_value("SELECT 1"), "1");
        // No anonymous accounts that could shadow okm@localhost.
        let anon = db.sql_in("mysql", "SELECT COUNT(*) FROM mysql.user WHERE user = ''");
        assert_eq!(anon.trim(), "0");
        assert_eq!(db.sql_value("SELECT DATABASE()"), DATABASE);
        assert_eq!(db.sql_value("SELECT @@character_set_database"), "utf8mb4");

        // App user over TCP with the password.
        let pw = &c.db_password;
        db.sql_as(&db.user, pw, DATABASE, "DROP TABLE IF EXISTS selftest; CREATE TABLE selftest (id INT PRIMARY KEY, s VARCHAR(20)); INSERT INTO selftest VALUES (1, 'é€');")
            .unwrap();
        assert_eq!(
            db.sql_as(&db.user, pw, DATABASE, "SELECT s FROM selftest")
                .unwrap()
                .trim(),
            "é€"
        );
        // Wrong password fails.
        let err = db
            .sql_as(&db.user, "wrong", DATABASE, "SELECT 1")
            .unwrap_err();
        assert!(err.contains("Access denied"), "{err}");
        // Scratch databases for the swap.
        for scratch in ["okmdb__hasync_new", "okmdb__hasync_old"] {
            db.sql_as(&db.user, pw, DATABASE, &format!("CREATE DATABASE {scratch}; CREATE TABLE {scratch}.t (x INT); DROP DATABASE {scratch};"))
                .unwrap();
        }
        // Other databases are off limits.
        let other = db.sql_as(&db.user, pw, DATABASE, "CREATE DATABASE otherdb");
        assert!(other.is_err());

        // A consistent dump as the app user.
        let out = check(
            Command::new("mariadb-dump")
                .arg("--no-defaults")
                .args(["--protocol=TCP", "-h", &db.host, "-P", &db.port.to_string()])
                .args(["-u", &db.user, &format!("--password={pw}")])
                .args([
                    "--single-transaction",
                    "--routines",
                    "--events",
                    "--triggers",
                ])
                .arg(DATABASE),
        );
        assert!(out.contains("CREATE TABLE `selftest`"), "{out}");
        db.sql("DROP TABLE selftest");
    }
}

#[test]
fn postgres_admin_app_user_and_dump() {
    let c = cluster();
    let _guard = c.lock();
    for n in &c.nodes {
        let db = &n.postgres;
        assert_eq!(db.sql_value("SELECT current_database()"), DATABASE);
        assert_eq!(db.sql_value("SELECT current_user"), "postgres");
        assert_eq!(
            db.sql_in(
                "postgres",
                "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = 'okmdb'"
            )
            .trim(),
            DB_USER
        );
        // Multiple statements, no command tags in the output.
        assert_eq!(
            db.sql("CREATE TEMP TABLE t (x int); INSERT INTO t VALUES (41); SELECT x + 1 FROM t;"),
            "42\n"
        );

        let pw = &c.db_password;
        db.sql_as(&db.user, pw, DATABASE, "DROP TABLE IF EXISTS selftest; CREATE TABLE selftest (id int PRIMARY KEY, s text); INSERT INTO selftest VALUES (1, 'é€');")
            .unwrap();
        assert_eq!(
            db.sql_as(&db.user, pw, DATABASE, "SELECT s FROM selftest")
                .unwrap()
                .trim(),
            "é€"
        );
        let err = db
            .sql_as(&db.user, "wrong", DATABASE, "SELECT 1")
            .unwrap_err();
        assert!(err.contains("password authentication failed"), "{err}");
        // The superuser has no password, so it cannot use TCP at all.
        assert!(db.sql_as("postgres", "", "postgres", "SELECT 1").is_err());
        // CREATEDB lets okm build and swap scratch databases.
        db.sql_as(&db.user, pw, "postgres", "CREATE DATABASE okmdb__hasync_new; ALTER DATABASE okmdb__hasync_new RENAME TO okmdb__hasync_old; DROP DATABASE okmdb__hasync_old;")
            .unwrap();

        let out = check(
            Command::new("pg_dump")
                .args(["-h", &db.host, "-p", &db.port.to_string(), "-U", &db.user])
                .args(["-w", "-d", DATABASE])
                .env("PGPASSWORD", pw),
        );
        assert!(out.contains("CREATE TABLE public.selftest"), "{out}");
        db.sql("DROP TABLE selftest");
    }
}

#[test]
fn servers_stop_and_restart_on_the_same_port() {
    let c = cluster();
    let _guard = c.lock();
    let n = c.node("okm2");

    // An open session must break when sshd stops.
    let mut session = c
        .ssh("okm2", "echo connected; cat")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(session.stdout.as_mut().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert_eq!(first.trim(), "connected");

    let port = n.sshd.port;
    let t = Instant::now();
    n.sshd.stop();
    eprintln!("sshd stop took {:?}", t.elapsed());
    assert!(!n.sshd.is_running());
    assert!(
        wait_exit(&mut session, Duration::from_secs(10)).is_some(),
        "ssh session survived sshd stop"
    );
    let out = c.ssh("okm2", "true").stdin(Stdio::null()).output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(255),
        "ssh to a stopped node must fail"
    );
    // okm1 is unaffected.
    check(&mut c.ssh("okm1", "true"));
    n.sshd.stop(); // idempotent
    let t = Instant::now();
    n.sshd.start();
    eprintln!("sshd start took {:?}", t.elapsed());
    n.sshd.start(); // idempotent
    assert_eq!(n.sshd.port, port);
    assert!(n.sshd.is_running());
    check(&mut c.ssh("okm2", "true"));
    // A crash also works.
    n.sshd.kill();
    n.sshd.start();
    check(&mut c.ssh("okm2", "true"));

    let m = &n.mariadb;
    m.sql(
        "CREATE TABLE IF NOT EXISTS restart_probe (x INT); INSERT INTO restart_probe VALUES (1);",
    );
    let t = Instant::now();
    m.stop();
    eprintln!("mariadb stop took {:?}", t.elapsed());
    assert!(!m.is_running());
    let down = m.sql_as(&m.user, &c.db_password, DATABASE, "SELECT 1");
    assert!(down.is_err());
    let t = Instant::now();
    m.start();
    eprintln!("mariadb start took {:?}", t.elapsed());
    assert_eq!(m.sql_value("SELECT COUNT(*) FROM restart_probe"), "1");
    m.kill();
    m.start();
    assert_eq!(
        m.sql_as(
            &m.user,
            &c.db_password,
            DATABASE,
            "SELECT COUNT(*) FROM restart_probe"
        )
        .unwrap()
        .trim(),
        "1"
    );
    m.sql("DROP TABLE restart_probe");

    let p = &n.postgres;
    p.sql_as(
        &p.user,
        &c.db_password,
        DATABASE,
        "CREATE TABLE IF NOT EXISTS restart_probe (x int); INSERT INTO restart_probe VALUES (1);",
    )
    .unwrap();
    let t = Instant::now();
    p.stop();
    eprintln!("postgres stop took {:?}", t.elapsed());
    assert!(!p.is_running());
    let down = p.sql_as(&p.user, &c.db_password, DATABASE, "SELECT 1");
    assert!(down.is_err());
    let t = Instant::now();
    p.start();
    eprintln!("postgres start took {:?}", t.elapsed());
    assert_eq!(p.sql_value("SELECT count(*) FROM restart_probe"), "1");
    // Crash with an open client connection; restart must still work.
    let mut client = p
        .admin_client()
        .args(["-d", DATABASE, "-c", "SELECT pg_sleep(30)"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    thread::sleep(Duration::from_millis(300));
    p.kill();
    p.start();
    assert_eq!(
        p.sql_as(
            &p.user,
            &c.db_password,
            DATABASE,
            "SELECT count(*) FROM restart_probe"
        )
        .unwrap()
        .trim(),
        "1"
    );
    let _ = client.wait();
    p.sql("DROP TABLE restart_probe");
}

#[test]
fn fake_app_is_controlled_over_ssh() {
    let c = cluster();
    let _guard = c.lock();
    for n in &c.nodes {
        let app = &n.app;
        let status = |c: &Cluster| {
            c.ssh(&n.name, &app.status_cmd())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .status()
                .unwrap()
                .code()
        };
        assert_eq!(status(c), Some(3));
        assert!(!app.is_running());

        // `start` must return promptly even though the daemon keeps running
        // (its stdio is detached from the SSH session).
        let t = Instant::now();
        let out = check(&mut c.ssh(&n.name, &app.start_cmd()));
        assert!(t.elapsed() < Duration::from_secs(5), "start hung");
        assert!(out.contains("started"), "{out}");
        assert!(app.is_running());
        assert_eq!(status(c), Some(0));
        let pid = app.pid().unwrap();
        // Idempotent start: same daemon.
        check(&mut c.ssh(&n.name, &app.start_cmd()));
        assert_eq!(app.pid(), Some(pid));

        check(&mut c.ssh(&n.name, &app.stop_cmd()));
        assert!(!app.is_running());
        assert!(!proc::is_alive(pid));
        assert_eq!(status(c), Some(3));
        check(&mut c.ssh(&n.name, &app.stop_cmd())); // idempotent

        // Local control works too.
        app.start();
        assert!(app.is_running());
        app.stop();
        assert!(!app.is_running());
    }
}

// ---------------------------------------------------------------------------
// Cleanup: the test binary re-runs itself as a child process
// ---------------------------------------------------------------------------

const CHILD_ENV: &str = "HASYNC_IT_SELFTEST_CHILD_MODE";

/// The libtest name of `cleanup_child`, without the crate name.
fn child_test_name() -> String {
    let module = module_path!().split_once("::").map_or("", |(_, rest)| rest);
    format!("{module}::cleanup_child")
}

/// Runs in a child process started by `cleanup_after_exit_panic_sigterm_and_sigkill`.
/// It starts a cluster, puts some load on it that the harness does not own
/// directly (a daemonised app, an open SSH session), reports, and then
/// ends as told by the mode.
#[test]
#[ignore = "helper for the cleanup self-test; does nothing unless started by it"]
fn cleanup_child() {
    let Ok(mode) = env::var(CHILD_ENV) else {
        return;
    };
    let c = cluster();
    c.node("okm1").app.start();
    let mut session = c
        .ssh("okm2", "echo connected; cat")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(session.stdout.as_mut().unwrap())
        .read_line(&mut first)
        .unwrap();
    let pids: Vec<String> = fs::read_dir(c.base.join("pids"))
        .unwrap()
        .map(|e| {
            fs::read_to_string(e.unwrap().path())
                .unwrap()
                .trim()
                .to_string()
        })
        .collect();
    println!(
        "READY base={} pids={} app={} session={}",
        c.base.display(),
        pids.join(","),
        c.node("okm1").app.pid().unwrap(),
        session.id()
    );
    // Keep the session open.
    std::mem::forget(session);

    // Wait for the parent's go-ahead (or its signal).
    let mut go = String::new();
    let _ = std::io::stdin().read_line(&mut go);
    match mode.as_str() {
        "exit" => {}
        "panic" => panic!("deliberate panic to test cleanup"),
        _ => loop {
            thread::sleep(Duration::from_secs(3600));
        },
    }
}

/// Ends a self-test child when dropped, even if the parent test panics
/// midway. Otherwise a child in "wait" mode would keep its cluster alive.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            proc::signal(self.0.id() as i32, libc::SIGTERM);
            if wait_exit(&mut self.0, Duration::from_secs(15)).is_none() {
                let _ = self.0.kill();
                let _ = self.0.wait();
            }
        }
    }
}

struct ChildRun {
    mode: &'static str,
    child: ChildGuard,
    base: PathBuf,
    pids: Vec<i32>,
    stderr: mpsc::Receiver<String>,
}

fn start_child(mode: &'static str) -> (ChildGuard, mpsc::Receiver<String>, mpsc::Receiver<String>) {
    let mut child = Command::new(env::current_exe().unwrap())
        .args([&child_test_name(), "--exact", "--ignored", "--nocapture"])
        .arg("--test-threads=1")
        .env(CHILD_ENV, mode)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (ready_tx, ready_rx) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            // libtest prints "test <name> ... " without a newline first.
            if let Some(i) = line.find("READY ") {
                let _ = ready_tx.send(line[i..].to_string());
            }
        }
    });
    let (err_tx, err_rx) = mpsc::channel();
    let mut stderr = child.stderr.take().unwrap();
    thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        let _ = err_tx.send(s);
    });
    (ChildGuard(child), ready_rx, err_rx)
}

fn procs_mentioning(dir: &Path) -> Vec<String> {
    let needle = format!("{}/", dir.display());
    proc::all_procs()
        .into_iter()
        .filter(|p| !p.is_zombie())
        .map(|p| (p.pid, proc::cmdline(p.pid)))
        .filter(|(_, cmd)| cmd.contains(&needle))
        .map(|(pid, cmd)| format!("{pid}: {cmd}"))
        .collect()
}

fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        thread::sleep(Duration::from_millis(50));
    }
    f()
}

#[test]
fn cleanup_after_exit_panic_sigterm_and_sigkill() {
    // Make sure this process's own cluster (and its startup sweep) is done,
    // so that sweep cannot interfere with the children's directories.
    cluster();

    // Start all children in parallel and wait until all are ready, so that
    // no child's startup sweep races with another child's kill -9.
    let modes: [&'static str; 4] = ["exit", "panic", "sigterm", "sigkill"];
    let started: Vec<_> = modes.iter().map(|&m| (m, start_child(m))).collect();
    let mut runs = Vec::new();
    for (mode, (child, ready, stderr)) in started {
        let line = match ready.recv_timeout(Duration::from_secs(90)) {
            Ok(line) => line,
            Err(_) => {
                drop(child);
                panic!(
                    "child {mode} never became ready:\n{}",
                    stderr.recv().unwrap_or_default()
                );
            }
        };
        let field = |k: &str| {
            line.split_whitespace()
                .find_map(|f| f.strip_prefix(k))
                .unwrap()
                .to_string()
        };
        let base = PathBuf::from(field("base="));
        let mut pids: Vec<i32> = field("pids=")
            .split(',')
            .map(|p| p.parse().unwrap())
            .collect();
        pids.push(field("app=").parse().unwrap());
        pids.push(field("session=").parse().unwrap());
        assert_eq!(pids.len(), 2 * 3 + 2, "{line}");
        assert!(pids.iter().all(|&p| proc::is_alive(p)), "{line}");
        runs.push(ChildRun {
            mode,
            child,
            base,
            pids,
            stderr,
        });
    }

    for run in &mut runs {
        let pid = run.child.0.id() as i32;
        match run.mode {
            "sigterm" => proc::signal(pid, libc::SIGTERM),
            "sigkill" => proc::signal(pid, libc::SIGKILL),
            _ => {
                let stdin = run.child.0.stdin.as_mut().unwrap();
                stdin.write_all(b"go\n").unwrap();
            }
        }
    }

    for mut run in runs {
        let status = wait_exit(&mut run.child.0, Duration::from_secs(60));
        let stderr = run
            .stderr
            .recv_timeout(Duration::from_secs(10))
            .unwrap_or_default();
        let ctx = format!(
            "mode {}: status {status:?}\nchild stderr:\n{stderr}",
            run.mode
        );
        let status = status.unwrap_or_else(|| panic!("child did not exit; {ctx}"));
        match run.mode {
            "exit" => assert_eq!(status.code(), Some(0), "{ctx}"),
            "panic" => assert_eq!(status.code(), Some(101), "{ctx}"),
            "sigterm" => assert_eq!(status.code(), Some(128 + libc::SIGTERM), "{ctx}"),
            _ => assert_eq!(status.signal(), Some(libc::SIGKILL), "{ctx}"),
        }
        if run.mode == "sigkill" {
            // No atexit: PR_SET_PDEATHSIG must have killed the servers. The
            // fake app (not our child) and the ssh client survive until the
            // next run's sweep.
            let servers = &run.pids[..6];
            assert!(
                wait_until(Duration::from_secs(10), || servers
                    .iter()
                    .all(|&p| !proc::is_alive(p))),
                "servers survived kill -9 of the test process; {ctx}"
            );
            let swept = proc::sweep_stale_run_dirs();
            // Another process may have swept it first; either way it must be
            // gone now.
            assert!(
                swept.contains(&run.base) || !run.base.exists(),
                "sweep missed {}; {ctx}",
                run.base.display()
            );
        }
        assert!(
            wait_until(Duration::from_secs(10), || run
                .pids
                .iter()
                .all(|&p| !proc::is_alive(p))),
            "processes survived: {:?}; {ctx}",
            run.pids
                .iter()
                .filter(|&&p| proc::is_alive(p))
                .map(|&p| format!("{p}: {}", proc::cmdline(p)))
                .collect::<Vec<_>>()
        );
        let left = procs_mentioning(&run.base);
        assert!(left.is_empty(), "leftover processes {left:?}; {ctx}");
        assert!(
            !run.base.exists(),
            "{} was not removed; {ctx}",
            run.base.display()
        );
    }
}
