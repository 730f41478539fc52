//! The cycle benchmark: the application's *outage* under the old script and
//! under one `hasync sync` cycle, side by side in one run, with a writing
//! application, and the consistency of both copies.
//!
//! ```text
//! cargo test --release --test it bench_cycle -- --ignored --nocapture
//! ```
//!
//! On okm1 runs a *writer*: an LSB-style `writer.sh {start|stop|status}`
//! whose daemon, every 20 ms, writes a new file
//! `<root>/repository/docs/<n>.txt`, then inserts its row
//! `(n, path, sha256, NOW(3))` into table `docs` of the primary's database
//! (through one `mariadb` client it feeds, credentials in a 0600
//! `--defaults-extra-file`), then appends `n <epoch-ms>` to a log outside
//! root. The application is down exactly while it does not write, so the
//! *outage* of a run is the longest gap between consecutive log lines that
//! overlaps the run. okm2's service is the harness's ordinary fake app.
//!
//! The writer writes for `HASYNC_BENCH_CYCLE_WARMUP` seconds (default 30,
//! about 1,500 files and rows); halfway through, the script's standby is
//! seeded with an rsync of the tree as it is then (the steady state of a
//! nightly job: only what changed since is copied). Then, once each:
//!
//! * **script**: the old cron script, run on the primary: stop the standby's
//!   app (over ssh), stop the writer, `rsync -a --delete --exclude /logs/`
//!   over OpenSSH into the script's own standby root,
//!   `mariadb-dump --single-transaction DB | ssh okm2 mariadb DB_script`, start
//!   the writer, start the standby's app;
//! * 10 s more of writing;
//! * **hasync**: `hasync sync` with the primary as `address = "local"`
//!   (hasync runs on the primary, as from cron) and the writer as okm1's
//!   service: preflight, warm file pass, stop okm2 then okm1, final file
//!   pass, database phase, start okm1, start okm2, record.
//!
//! `HASYNC_BENCH_CYCLE_EARLY_RESTART=1` sets `[database] early_restart = true`
//! in hasync's config (the primary starts once the dump's snapshot is taken).
//!
//! Printed: outage and wall time of both and the ratio hasync / script
//! (target <= 0.3), each run's timeline (its output lines stamped on arrival,
//! against the writer's last write before and first write after the gap)
//! and hasync's phases. Then the writer stops and both copies on okm2 are
//! checked: every row of the standby's database copy has its file in the
//! standby's root with the row's sha256, and equals the primary's row.
//! Files without rows are fine (the writer writes the file first). The test
//! fails on an inconsistency, not on a missed target.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::cmd::hasync;
use crate::db::{admin, as_okm, drop_dbs, fresh_db, wait_until, Engine};
use crate::harness::{cluster, make_dir, proc, write_file, DB_USER};
use crate::setup::{edit_toml, Setup};

/// The database hasync replicates (okm2 gets the same name).
const DB: &str = "okmdb_bcycle";
/// The old script's copy on okm2.
const SCRIPT_DB: &str = "okmdb_bcycle_script";
/// How long the writer writes between the two runs.
const BETWEEN: Duration = Duration::from_secs(10);

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Milliseconds since the epoch, the clock of the writer's `date +%s%3N`.
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as u64
}

/// The writer application on okm1. See the module docs.
pub struct Writer {
    script: PathBuf,
    pidfile: PathBuf,
    /// `n <epoch-ms>` per completed write.
    wlog: PathBuf,
    /// The daemon's stdout and stderr (the `mariadb` client's errors).
    pub out: PathBuf,
}

impl Writer {
    /// Writes `dir/writer.sh` for a writer into `root` and database `db`
    /// with the `[client]` option file `cnf`.
    pub fn setup(dir: &Path, root: &Path, cnf: &Path, db: &str) -> Writer {
        make_dir(dir, 0o755);
        let w = Writer {
            script: dir.join("writer.sh"),
            pidfile: dir.join("writer.pid"),
            wlog: dir.join("writes.log"),
            out: dir.join("writer.out"),
        };
        let text = WRITER_SCRIPT
            .replace("@SCRIPT@", &w.script.display().to_string())
            .replace("@PIDFILE@", &w.pidfile.display().to_string())
            .replace("@OUT@", &w.out.display().to_string())
            .replace("@WLOG@", &w.wlog.display().to_string())
            .replace("@COUNTER@", &dir.join("counter").display().to_string())
            .replace("@ROOT@", &root.display().to_string())
            .replace("@CNF@", &cnf.display().to_string())
            .replace("@DB@", db);
        write_file(&w.script, &text, 0o755);
        proc::register_pidfile(&w.pidfile);
        w
    }

    pub fn cmd(&self, action: &str) -> String {
        format!("{} {action}", self.script.display())
    }

    /// Runs `writer.sh action` locally; its exit code.
    pub fn run(&self, action: &str) -> Option<i32> {
        Command::new("/bin/sh")
            .arg(&self.script)
            .arg(action)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .status()
            .ok()
            .and_then(|s| s.code())
    }

    /// The completed writes so far: (n, epoch ms), in order.
    pub fn writes(&self) -> Vec<(u64, u64)> {
        std::fs::read_to_string(&self.wlog)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let (n, t) = l.split_once(' ')?;
                Some((n.parse().ok()?, t.trim().parse().ok()?))
            })
            .collect()
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        let _ = self.run("stop");
    }
}

/// A `[client]` option file (0600) at `path` for user `okm` on the MariaDB
/// at `port`; returns the path.
pub fn client_cnf(path: &Path, port: u16) -> PathBuf {
    let pw = &cluster().db_password;
    write_file(
        path,
        &format!("[client]\nuser={DB_USER}\npassword={pw}\nhost=127.0.0.1\nport={port}\n"),
        0o600,
    );
    path.to_path_buf()
}

/// The writer's init script. POSIX sh, daemonised and stopped like the
/// harness's `app.py` (setsid, stdio detached, the daemon writes its own
/// pid, which is its process-group id; stop = SIGTERM to the group), but it
/// must be down within a second. `start` runs the script itself as
/// `writer.sh _run PIDFILE` for the daemon, so no quoting of SQL inside
/// `sh -c '...'` is needed; its command line still names the pidfile.
///
/// The loop feeds one `mariadb` client (the application's connection), so a
/// write costs a few forks, not a login. The counter file is written before
/// the document: a restarted writer never reuses a number, even if it was
/// killed between the file and its row. It is replaced by a rename: written
/// in place, a SIGTERM often left it empty (the restarted writer then began
/// at 1 again, and its client died of a duplicate key).
const WRITER_SCRIPT: &str = r#"#!/bin/sh
# Writer application of the hasync cycle benchmark (node okm1).
# Generated by tests/it/bench_cycle.rs; LSB-style init script.
# Usage: writer.sh {start|stop|status}   (status: 0 = running, 3 = stopped)
set -u
SCRIPT='@SCRIPT@'
PIDFILE='@PIDFILE@'
OUT='@OUT@'
WLOG='@WLOG@'
COUNTER='@COUNTER@'
DOCS='@ROOT@/repository/docs'
CNF='@CNF@'
DB='@DB@'

running_pid() {
    [ -s "$PIDFILE" ] || return 1
    pid=$(cat "$PIDFILE" 2>/dev/null) || return 1
    case "$pid" in ''|*[!0-9]*) return 1 ;; esac
    [ -r "/proc/$pid/stat" ] || return 1
    state=$(cut -d' ' -f3 "/proc/$pid/stat" 2>/dev/null) || return 1
    [ "$state" != Z ] || return 1
    tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -qF "$PIDFILE" || return 1
    echo "$pid"
}

case "${1:-}" in
_run)
    # The daemon. $$ is this shell: the session and process-group leader.
    echo $$ > "$PIDFILE.tmp" && mv "$PIDFILE.tmp" "$PIDFILE"
    mkdir -p "$DOCS" || exit 1
    n=0
    [ -e "$COUNTER" ] && n=$(cat "$COUNTER")
    case "$n" in ''|*[!0-9]*) echo "writer: bad counter $COUNTER" >&2; exit 1 ;; esac
    pad='Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt ut labore et dolore magna aliqua. Ut enim ad minim veniam, quis nostrud exercitation ullamco laboris nisi ut aliquip ex ea commodo consequat. Duis aute irure dolor in reprehenderit in voluptate velit esse cillum dolore.'
    # One write every 20 ms: sleep what the forks left of the period.
    next=$(date +%s%3N)
    while :; do
        n=$((n + 1))
        echo "$n" > "$COUNTER.tmp" && mv "$COUNTER.tmp" "$COUNTER"
        f="$DOCS/$n.txt"
        printf 'document %s of the hasync cycle benchmark, written at %s\n%s\n' \
            "$n" "$(date +%s%3N)" "$pad" > "$f"
        sum=$(sha256sum "$f")
        echo "INSERT INTO docs (id, path, sha256, at) VALUES ($n, 'repository/docs/$n.txt', '${sum%% *}', NOW(3));"
        now=$(date +%s%3N)
        echo "$n $now" >> "$WLOG"
        next=$((next + 20))
        if [ "$next" -gt "$now" ]; then
            sleep "0.$(printf %03d $((next - now)))"
        else
            next=$now
        fi
    done | mariadb --defaults-extra-file="$CNF" --batch "$DB"
    ;;
start)
    if pid=$(running_pid); then
        echo "writer already running (pid $pid)"
        exit 0
    fi
    rm -f "$PIDFILE"
    setsid /bin/sh "$SCRIPT" _run "$PIDFILE" </dev/null >>"$OUT" 2>&1 &
    i=0
    while ! running_pid >/dev/null; do
        i=$((i + 1))
        if [ "$i" -gt 250 ]; then
            echo "writer did not start" >&2
            exit 1
        fi
        sleep 0.02
    done
    echo "writer started (pid $(running_pid))"
    ;;
stop)
    if ! pid=$(running_pid); then
        rm -f "$PIDFILE"
        echo "writer not running"
        exit 0
    fi
    kill -TERM "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null
    i=0
    while running_pid >/dev/null; do
        i=$((i + 1))
        if [ "$i" -eq 25 ]; then
            kill -KILL "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null
        fi
        if [ "$i" -gt 50 ]; then
            echo "writer (pid $pid) does not stop" >&2
            exit 1
        fi
        sleep 0.02
    done
    rm -f "$PIDFILE"
    echo "writer stopped"
    ;;
status)
    if pid=$(running_pid); then
        echo "writer is running (pid $pid)"
        exit 0
    fi
    echo "writer is not running"
    exit 3
    ;;
*)
    echo "usage: $0 {start|stop|status}" >&2
    exit 2
    ;;
esac
"#;

/// A finished run: exit code, stdout, its output lines stamped (epoch ms) as
/// they arrived, and when it started and ended.
struct Stamped {
    code: i32,
    stdout: String,
    lines: Vec<(u64, String)>,
    t0: u64,
    t1: u64,
}

impl Stamped {
    fn wall(&self) -> f64 {
        (self.t1 - self.t0) as f64 / 1000.0
    }

    #[track_caller]
    fn ok(&self, what: &str) {
        let text: Vec<&str> = self.lines.iter().map(|(_, l)| l.as_str()).collect();
        assert_eq!(
            self.code,
            0,
            "{what} failed:\n{}\n{}",
            text.join("\n"),
            self.stdout
        );
    }
}

/// Waits for `child` (started at `t0`, stdout and stderr piped), stamping
/// each stderr line as it arrives; stdout is kept whole (hasync's JSON).
fn stamped(mut child: Child, t0: u64) -> Stamped {
    let mut out_pipe = child.stdout.take().expect("piped stdout");
    let err_pipe = child.stderr.take().expect("piped stderr");
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out_pipe.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        BufReader::new(err_pipe)
            .lines()
            .map_while(Result::ok)
            .map(|l| (now_ms(), l))
            .collect::<Vec<_>>()
    });
    let status = child.wait().expect("wait");
    let t1 = now_ms();
    Stamped {
        code: status.code().unwrap_or(-1),
        stdout: out.join().unwrap(),
        lines: err.join().unwrap(),
        t0,
        t1,
    }
}

/// The longest gap between consecutive writes that overlaps `[t0, t1]`:
/// (gap ms, last write before it, first write after it).
fn longest_gap(writes: &[(u64, u64)], t0: u64, t1: u64) -> (u64, (u64, u64), (u64, u64)) {
    assert!(
        writes.iter().any(|w| w.1 > t1),
        "the writer did not write again after the run"
    );
    writes
        .windows(2)
        .filter(|w| w[1].1 >= t0 && w[0].1 <= t1)
        .map(|w| (w[1].1.saturating_sub(w[0].1), w[0], w[1]))
        .max_by_key(|g| g.0)
        .expect("writes around the run")
}

/// The run's lines with times relative to the last write before its
/// outage, the gap's ends marked.
fn timeline(run: &Stamped, gap: &(u64, (u64, u64), (u64, u64))) -> String {
    let base = gap.1 .1;
    let rel = |t: u64| (t as i64 - base as i64) as f64 / 1000.0;
    let mut ev: Vec<(u64, String)> = run.lines.clone();
    ev.push((run.t0, "(run starts)".into()));
    ev.push((run.t1, "(run ends)".into()));
    ev.push((
        gap.1 .1,
        format!("** last write before the outage: #{}", gap.1 .0),
    ));
    ev.push((
        gap.2 .1,
        format!("** first write after the outage: #{}", gap.2 .0),
    ));
    ev.sort_by_key(|e| e.0);
    ev.iter()
        .map(|(t, l)| format!("  {:+8.3} s  {l}\n", rel(*t)))
        .collect()
}

/// (path, sha256) of every row of `docs`, by id.
pub fn rows(node: usize, db: &str) -> BTreeMap<u64, (String, String)> {
    admin(Engine::Mysql, node, db, "SELECT id, path, sha256 FROM docs")
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            assert_eq!(f.len(), 3, "row {l:?}");
            (
                f[0].parse().expect("id"),
                (f[1].to_string(), f[2].to_string()),
            )
        })
        .collect()
}

/// sha256 of every file under `root/repository`, by path relative to root.
fn file_sums(root: &Path) -> BTreeMap<String, String> {
    if !root.join("repository").exists() {
        return BTreeMap::new();
    }
    let out = Command::new("find")
        .current_dir(root)
        .args(["repository", "-type", "f", "-exec", "sha256sum", "{}", "+"])
        .output()
        .expect("find | sha256sum");
    assert!(out.status.success(), "sha256sum under {}", root.display());
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let (sum, path) = l.split_once("  ")?;
            Some((path.to_string(), sum.to_string()))
        })
        .collect()
}

/// Checks one copy on okm2 against its root and the primary's rows. Returns
/// a report line and the problems found.
pub fn check_copy(
    what: &str,
    db: &str,
    root: &Path,
    primary: &BTreeMap<u64, (String, String)>,
) -> (String, Vec<String>) {
    let rows = rows(1, db);
    let files = file_sums(root);
    let mut problems = Vec::new();
    if rows.is_empty() {
        problems.push(format!("{what}: no rows in {db} on okm2"));
    }
    for (id, (path, sum)) in &rows {
        match files.get(path) {
            None => problems.push(format!("{what}: row {id}: {path} is missing")),
            Some(s) if s != sum => problems.push(format!(
                "{what}: row {id}: {path} has sha256 {s}, the row {sum}"
            )),
            Some(_) => {}
        }
        if primary.get(id) != Some(&(path.clone(), sum.clone())) {
            problems.push(format!("{what}: row {id} differs from the primary's"));
        }
    }
    let paths: std::collections::BTreeSet<&String> = rows.values().map(|(p, _)| p).collect();
    let orphans = files.keys().filter(|p| !paths.contains(p)).count();
    let line = format!(
        "| {what} | {} | {} | {} | {orphans} | {} |",
        rows.len(),
        rows.keys().next_back().map_or(0, |n| *n),
        files.len(),
        if problems.is_empty() {
            "consistent".to_string()
        } else {
            format!("{} PROBLEMS", problems.len())
        }
    );
    (line, problems)
}

#[test]
#[ignore = "benchmark: cargo test --release --test it bench_cycle -- --ignored --nocapture"]
fn bench_cycle() {
    let warmup: u64 = env_or("HASYNC_BENCH_CYCLE_WARMUP", 30);
    let early_restart = env_or("HASYNC_BENCH_CYCLE_EARLY_RESTART", 0) != 0;
    let c = cluster();
    let mut s = Setup::exclusive("bench-cycle");
    s.db_name = DB.into();
    s.excludes = vec!["/logs/".into()];
    let (n1, n2) = (&c.nodes[0], &c.nodes[1]);

    // Databases: the primary's with table docs, none yet on okm2 for hasync,
    // an empty one for the script (its pipe loads into an existing one).
    fresh_db(Engine::Mysql, 0, DB);
    drop_dbs(Engine::Mysql, 1, DB);
    fresh_db(Engine::Mysql, 1, SCRIPT_DB);
    as_okm(
        Engine::Mysql,
        0,
        DB,
        "CREATE TABLE docs (id INT PRIMARY KEY, path VARCHAR(255), sha256 CHAR(64), at TIMESTAMP(3))",
    );

    // Client option files (0600): the writer's and the dump's on okm1, the
    // script's load on okm2.
    let cnf1 = client_cnf(&s.dir.join("okm1-client.cnf"), n1.mariadb.port);
    let cnf2 = client_cnf(&s.dir.join("okm2-client.cnf"), n2.mariadb.port);

    // Per-node files the copies must leave alone.
    crate::sync::write(&s.roots[0], "logs/app.log", b"okm1's log\n");
    let script_root = s.dir.join("okm2-script-root");
    make_dir(&script_root, 0o755);

    let writer = Writer::setup(&s.dir.join("writer"), &s.roots[0], &cnf1, DB);
    let standby_app = &n2.app;
    let standby_was_running = standby_app.is_running();
    standby_app.start();
    assert_eq!(writer.run("start"), Some(0), "writer.sh start");
    wait_until("the writer's first write", Duration::from_secs(10), || {
        !writer.writes().is_empty()
    });
    eprintln!("bench_cycle: the writer writes; warm-up {warmup} s");
    // Steady state, as from a nightly cron: halfway through, the script's
    // standby gets what the primary has then ("yesterday's" copy), so its
    // rsync copies only what was written since, not the whole tree.
    std::thread::sleep(Duration::from_secs(warmup / 2));
    let seed = Command::new("rsync")
        .args([
            "-a",
            "--delete",
            "--exclude",
            "/logs/",
            "-e",
            &c.rsync_rsh("okm2"),
        ])
        .arg(format!("{}/", s.roots[0].display()))
        .arg(format!("root@{}:{}/", c.nodes[1].ip, script_root.display()))
        .status()
        .expect("rsync");
    assert!(seed.success(), "seeding the script's standby");
    std::thread::sleep(Duration::from_secs(warmup - warmup / 2));
    let warm = writer.writes();
    let mut intervals: Vec<u64> = warm.windows(2).map(|w| w[1].1 - w[0].1).collect();
    intervals.sort_unstable();
    let interval = intervals.get(intervals.len() / 2).copied().unwrap_or(0);
    let warm_rows: u64 = admin(Engine::Mysql, 0, DB, "SELECT count(*) FROM docs")
        .trim()
        .parse()
        .unwrap();
    eprintln!(
        "bench_cycle: {} writes in the warm-up (median interval {interval} ms), {warm_rows} rows",
        warm.len()
    );
    assert!(
        warm_rows + 10 >= warm.len() as u64,
        "the writer's rows lag its writes: is the mariadb client inserting? see {}",
        writer.out.display()
    );

    // The old script, on the primary.
    let rsh = c.rsync_rsh("okm2");
    let script = s.dir.join("old-sync.sh");
    write_file(
        &script,
        &format!(
            r#"#!/bin/bash
# The old way, from cron on the primary: stop both, copy, start both.
set -eu -o pipefail
RSH='{rsh}'
echo "== stop the standby's app" >&2
$RSH root@{ip2} '{stop2}' >/dev/null
echo "== stop the primary's app" >&2
{stop1} >/dev/null
echo "== rsync" >&2
rsync -a --delete --exclude /logs/ -e "$RSH" {src}/ root@{ip2}:{dst}/
echo "== mariadb-dump | ssh okm2 mariadb" >&2
mariadb-dump --defaults-extra-file={cnf1} --single-transaction {db} | $RSH root@{ip2} 'mariadb --defaults-extra-file={cnf2} {script_db}'
echo "== start the primary's app" >&2
{start1} >/dev/null
echo "== start the standby's app" >&2
$RSH root@{ip2} '{start2}' >/dev/null
echo "== done" >&2
"#,
            ip2 = n2.ip,
            stop2 = standby_app.stop_cmd(),
            start2 = standby_app.start_cmd(),
            stop1 = writer.cmd("stop"),
            start1 = writer.cmd("start"),
            src = s.roots[0].display(),
            dst = script_root.display(),
            cnf1 = cnf1.display(),
            cnf2 = cnf2.display(),
            db = DB,
            script_db = SCRIPT_DB,
        ),
        0o755,
    );
    let t0 = now_ms();
    let child = Command::new("bash")
        .arg(&script)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the old script");
    let old = stamped(child, t0);
    old.ok("the old script");
    std::thread::sleep(Duration::from_secs(1));
    let old_gap = longest_gap(&writer.writes(), old.t0, old.t1);
    eprintln!(
        "bench_cycle: old script: outage {:.2} s, wall {:.2} s",
        old_gap.0 as f64 / 1000.0,
        old.wall()
    );

    std::thread::sleep(BETWEEN);

    // One hasync cycle, the writer as okm1's service.
    let q = |v: String| Some(format!("{v:?}"));
    let mut edits = vec![
        ("nodes.okm1", "address", q("local".into())),
        ("nodes.okm1.service", "start", q(writer.cmd("start"))),
        ("nodes.okm1.service", "stop", q(writer.cmd("stop"))),
        ("nodes.okm1.service", "status", q(writer.cmd("status"))),
        // The writer is okm1's application here; it serves no HTTP.
        ("nodes.okm1.service", "health_url", None),
    ];
    if early_restart {
        edits.push(("database", "early_restart", Some("true".into())));
    }
    let cfg = s.dir.join("hasync-cycle.toml");
    std::fs::write(&cfg, edit_toml(&s.config_text(), &edits)).unwrap();
    let t0 = now_ms();
    let running = hasync()
        .config(&cfg)
        .args(["--json", "--no-progress", "sync"])
        .spawn();
    let cycle = stamped(running.child, t0);
    cycle.ok("hasync sync");
    std::thread::sleep(Duration::from_secs(1));
    let writes = writer.writes();
    let cycle_gap = longest_gap(&writes, cycle.t0, cycle.t1);
    let report: serde_json::Value = serde_json::from_str(&cycle.stdout).expect("hasync's JSON");
    let phases: Vec<String> = report["phases"]
        .as_array()
        .expect("phases")
        .iter()
        .map(|p| {
            format!(
                "{} {:.2} s",
                p["name"].as_str().unwrap(),
                p["secs"].as_f64().unwrap()
            )
        })
        .collect();

    // The results, before the checks: a failed check still shows them.
    let (o_old, o_cyc) = (old_gap.0 as f64 / 1000.0, cycle_gap.0 as f64 / 1000.0);
    println!(
        "\nOutage of the application, old script vs one hasync cycle ({}; warm-up {warmup} s, {} writes in all, one every {interval} ms; early_restart = {early_restart})\n",
        if cfg!(debug_assertions) {
            "DEBUG build: timings meaningless"
        } else {
            "release build"
        },
        writes.len()
    );
    println!("| run | outage (longest gap between writes) | wall time |");
    println!("|---|---|---|");
    println!(
        "| old script (stop both, rsync, dump \\| mariadb, start both) | {o_old:.2} s | {:.2} s |",
        old.wall()
    );
    println!(
        "| hasync sync (one cycle) | {o_cyc:.2} s | {:.2} s |",
        cycle.wall()
    );
    println!(
        "| **hasync / script** (target <= 0.3) | **{:.2}** | {:.2} |",
        o_cyc / o_old,
        cycle.wall() / old.wall()
    );
    println!(
        "\nhasync's own account: outage {:.2} s, cycle {:.2} s; phases: {}",
        report["outage_secs"].as_f64().unwrap_or(f64::NAN),
        report["secs"].as_f64().unwrap_or(f64::NAN),
        phases.join(", ")
    );
    println!(
        "\nOld script timeline (s, from the last write before the outage):\n{}",
        timeline(&old, &old_gap)
    );
    println!(
        "hasync timeline (s, from the last write before the outage):\n{}",
        timeline(&cycle, &cycle_gap)
    );

    // Consistency of both copies on okm2.
    assert_eq!(writer.run("stop"), Some(0), "writer.sh stop");
    let primary = rows(0, DB);
    let (l1, p1) = check_copy("old script", SCRIPT_DB, &script_root, &primary);
    let (l2, p2) = check_copy("hasync", DB, &s.roots[1], &primary);
    println!("Consistency on okm2 (every row's file present with its sha256; files without rows are fine)\n");
    println!("| copy | rows | highest id | files | files without a row | result |");
    println!("|---|---|---|---|---|---|");
    println!("{l1}\n{l2}\n");
    println!(
        "(the primary: {} rows, {} files)",
        primary.len(),
        file_sums(&s.roots[0]).len()
    );
    let mut problems: Vec<String> = p1.into_iter().chain(p2).collect();
    // The writer's client must not have failed (a lost connection, a
    // duplicate id): its stdout and stderr are in writer.out.
    let wout = std::fs::read_to_string(&writer.out).unwrap_or_default();
    if wout.contains("ERROR") {
        problems.push(format!("the writer's mariadb client failed:\n{wout}"));
    }
    assert!(
        problems.is_empty(),
        "inconsistent copies:\n{}",
        problems
            .iter()
            .take(20)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        s.roots[1].join("logs").read_dir().is_err() && script_root.join("logs").read_dir().is_err(),
        "/logs/ is excluded"
    );

    if !standby_was_running {
        standby_app.stop();
    }
    drop_dbs(Engine::Mysql, 0, DB);
    drop_dbs(Engine::Mysql, 1, DB);
    drop_dbs(Engine::Mysql, 1, SCRIPT_DB);
}
