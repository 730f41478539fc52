//! The database benchmark: hasync's database phase against the old script's
//! plain pipe, side by side in one run, on both engines.
//!
//! ```text
//! cargo test --release --test it bench_db -- --ignored --nocapture
//! ```
//!
//! For each engine, `tests/it/fixtures/bench-<engine>.sql` builds an
//! OpenKM-like database on okm1 (at scale 1: 3 million rows, ~600 MB of table
//! data; `HASYNC_BENCH_DB_SCALE` changes it). Then, `HASYNC_BENCH_DB_REPS`
//! times (default 2, the order alternating), two contenders copy it to okm2:
//!
//! * **pipe**: what the old script ran, on the primary:
//!   `mariadb-dump --single-transaction DB | ssh okm2 mariadb DB_pipe`, or
//!   `pg_dump DB | ssh okm2 psql DB_pipe`, into an empty database (created
//!   before the timing starts), through OpenSSH to okm2's sshd; credentials in
//!   option / password files (the script's `-p$PASS` would be as fast).
//! * **hasync**: `hasync sync --db-only` with the primary as `address =
//!   "local"` (hasync runs on the primary, as from cron): dump, stream through
//!   hasync and libssh2 into the staging database, verify (objects and every
//!   table's row count), readonly_sql, swap. The copy before the previous one
//!   is dropped before the timing starts, as the pipe's target is created.
//!
//! Printed: wall times (best of the runs), the ratio hasync / pipe (target now
//! <= 1.0), hasync's phases, and the peak RSS of hasync with its children.
//! Afterwards both copies are checked: every table has the primary's rows.

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use crate::db::{admin, as_okm, databases, drop_dbs, fresh_db, Engine};
use crate::harness::{cluster, write_file, DB_USER};
use crate::setup::{edit_toml, Setup};

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// CPU seconds (user + system) of process `pid` from /proc: its own, plus
/// with `children` those of the children it reaped (a PostgreSQL
/// postmaster reaps its backends). `None` once the process is gone.
fn proc_cpu(pid: u32, children: bool) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name in parentheses: state is field 3, utime 14.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<u64> = rest
        .split(' ')
        .skip(11)
        .take(4)
        .filter_map(|x| x.parse().ok())
        .collect();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let ticks = f[0] + f[1] + if children { f[2] + f[3] } else { 0 };
    Some(ticks as f64 / hz)
}

/// What one timed run cost.
struct Run {
    wall: f64,
    /// Peak RSS in KiB of the command and the children it waited for.
    rss: u64,
    /// CPU seconds of the command and every child it waited for (dump tool,
    /// ssh, bash, ...).
    tree_cpu: f64,
    /// CPU seconds of the command's own process (hasync's relay and control
    /// work), sampled from /proc until it exits.
    own_cpu: f64,
    stdout: String,
}

/// Run `cmd` and measure it; see [`Run`].
// Reaped with wait4(2), which also gives the rusage `Child::wait` does not.
#[allow(clippy::zombie_processes)]
fn timed(mut cmd: Command) -> Run {
    let t = Instant::now();
    let child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    let pid = child.id() as i32;
    let out_pipe = child.stdout.expect("stdout");
    let err_pipe = child.stderr.expect("stderr");
    let out = std::thread::spawn(move || std::io::read_to_string(out_pipe).unwrap_or_default());
    let err = std::thread::spawn(move || std::io::read_to_string(err_pipe).unwrap_or_default());
    // The last reading before the reap (a zombie's /proc entry still has its
    // final times) is the process's own CPU.
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut last = 0.0;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                match proc_cpu(pid as u32, false) {
                    Some(c) => last = c,
                    None => break,
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            last
        })
    };
    // Wait without reaping first, so the sampler reads the final times.
    // SAFETY: all-zero is a valid siginfo_t; waitid on our own child's pid.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    let rc = unsafe {
        libc::waitid(
            libc::P_PID,
            pid as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOWAIT,
        )
    };
    assert_eq!(rc, 0, "waitid");
    let wall = t.elapsed().as_secs_f64();
    std::thread::sleep(std::time::Duration::from_millis(40));
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let own_cpu = sampler.join().unwrap();
    let mut status = 0;
    // SAFETY: all-zero is a valid rusage; wait4 on our own child's pid.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(rc, pid, "wait4");
    let (stdout, stderr) = (out.join().unwrap(), err.join().unwrap());
    let st = std::process::ExitStatus::from_raw(status);
    assert!(st.success(), "{cmd:?} failed ({st}):\n{stdout}\n{stderr}");
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Run {
        wall,
        rss: usage.ru_maxrss as u64,
        tree_cpu: tv(usage.ru_utime) + tv(usage.ru_stime),
        own_cpu,
        stdout,
    }
}

fn table_counts(e: Engine, node: usize, db: &str) -> BTreeMap<String, String> {
    let list = match e {
        Engine::Mysql => admin(
            e,
            node,
            db,
            &format!("SELECT TABLE_NAME FROM information_schema.TABLES WHERE TABLE_SCHEMA = '{db}' AND TABLE_TYPE = 'BASE TABLE'"),
        ),
        Engine::Postgres => admin(
            e,
            node,
            db,
            "SELECT quote_ident(tablename) FROM pg_tables WHERE schemaname = 'public'",
        ),
    };
    list.lines()
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|t| {
            let q = if e == Engine::Mysql {
                format!("`{t}`")
            } else {
                t.to_string()
            };
            (
                t.to_string(),
                admin(e, node, db, &format!("SELECT count(*) FROM {q}"))
                    .trim()
                    .to_string(),
            )
        })
        .collect()
}

fn size_of(e: Engine, db: &str) -> (u64, u64) {
    let counts = table_counts(e, 0, db);
    let rows = counts.values().map(|v| v.parse::<u64>().unwrap_or(0)).sum();
    let bytes = match e {
        Engine::Mysql => admin(
            e,
            0,
            db,
            &format!("SELECT SUM(DATA_LENGTH) FROM information_schema.TABLES WHERE TABLE_SCHEMA = '{db}'"),
        ),
        Engine::Postgres => admin(
            e,
            0,
            db,
            "SELECT SUM(pg_relation_size(c.oid)) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'public' AND c.relkind = 'r'",
        ),
    };
    (rows, bytes.trim().parse().unwrap_or(0))
}

/// The best of the runs: on a shared machine, noise only ever adds time,
/// and each contender gets the same treatment.
fn best(v: Vec<f64>) -> f64 {
    v.into_iter().fold(f64::INFINITY, f64::min)
}

#[test]
#[ignore = "benchmark: cargo test --release --test it bench_db -- --ignored --nocapture"]
fn bench_db() {
    let scale: f64 = env_or("HASYNC_BENCH_DB_SCALE", 1.0);
    let reps: usize = env_or("HASYNC_BENCH_DB_REPS", 2).max(1);
    let engines: String = env_or("HASYNC_BENCH_DB_ENGINES", "mysql,postgres".to_string());
    let c = cluster();
    let _lock = c.lock();
    let mut report = Vec::new();
    for e in [Engine::Mysql, Engine::Postgres] {
        let name = if e == Engine::Mysql {
            "mysql"
        } else {
            "postgres"
        };
        if !engines.split(',').any(|x| x == name) {
            continue;
        }
        let db = "okmdb_bench".to_string();
        let pipe_db = "okmdb_bench_pipe".to_string();
        let mut s = Setup::new_unlocked(&format!("bench-db-{name}"));
        s.engine = Some(name);
        s.db_name = db.clone();
        s.readonly_sql = match e {
            Engine::Mysql => vec!["INSERT INTO OKM_CONFIG (CFG_KEY, CFG_TYPE, CFG_VALUE) VALUES ('system.readonly', 'boolean', 'true') ON DUPLICATE KEY UPDATE CFG_VALUE = 'true'".into()],
            Engine::Postgres => vec!["INSERT INTO okm_config (cfg_key, cfg_type, cfg_value) VALUES ('system.readonly', 'boolean', 'true') ON CONFLICT (cfg_key) DO UPDATE SET cfg_value = 'true'".into()],
        };
        let cfg = s.dir.join("hasync-local.toml");
        std::fs::write(
            &cfg,
            edit_toml(
                &s.config_text(),
                &[("nodes.okm1", "address", Some("\"local\"".into()))],
            ),
        )
        .unwrap();

        fresh_db(e, 0, &db);
        drop_dbs(e, 1, &db);
        drop_dbs(e, 1, &pipe_db);
        let t = Instant::now();
        let gen = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join(format!("tests/it/fixtures/bench-{name}.sql")),
        )
        .unwrap()
        .replace("{SCALE}", &scale.to_string());
        as_okm(e, 0, &db, &gen);
        let gen_secs = t.elapsed().as_secs_f64();
        let (rows, bytes) = size_of(e, &db);
        eprintln!(
            "{name}: generated {rows} rows, {} MB of table data in {gen_secs:.0}s",
            bytes / 1_000_000
        );

        // The pipe's credentials, in files (same machine for both nodes).
        let pw = &c.db_password;
        let (n1, n2) = (&c.nodes[0], &c.nodes[1]);
        let rsh = c.rsync_rsh("okm2");
        let pipe_cmd = match e {
            Engine::Mysql => {
                let f1 = s.dir.join("pipe-dump.cnf");
                let f2 = s.dir.join("pipe-load.cnf");
                write_file(
                    &f1,
                    &format!(
                        "[client]\nuser={DB_USER}\npassword={pw}\nhost=127.0.0.1\nport={}\n",
                        n1.mariadb.port
                    ),
                    0o600,
                );
                write_file(
                    &f2,
                    &format!(
                        "[client]\nuser={DB_USER}\npassword={pw}\nhost=127.0.0.1\nport={}\n",
                        n2.mariadb.port
                    ),
                    0o600,
                );
                format!(
                    "set -o pipefail; mariadb-dump --defaults-extra-file={} --single-transaction {db} | {rsh} root@{} 'mariadb --defaults-extra-file={} {pipe_db}'",
                    f1.display(), n2.ip, f2.display()
                )
            }
            Engine::Postgres => {
                let f = s.dir.join("pipe.pgpass");
                write_file(&f, &format!("*:*:*:*:{pw}\n"), 0o600);
                format!(
                    "set -o pipefail; PGPASSFILE={f} pg_dump -h 127.0.0.1 -p {} -U {DB_USER} {db} | {rsh} root@{} 'PGPASSFILE={f} psql -X -q -h 127.0.0.1 -p {} -U {DB_USER} {pipe_db} >/dev/null'",
                    n1.postgres.port, n2.ip, n2.postgres.port, f = f.display()
                )
            }
        };

        // Opt-in (HASYNC_BENCH_DB_SPLIT=1): the ceiling of a parallel load
        // without hasync, two plain pipes at once on disjoint tables (the
        // largest table alone; PostgreSQL: pre-data, the two data halves in
        // parallel, post-data). Not consistent across the two dumps: a
        // measurement, not a contender.
        let split_cmd = match e {
            Engine::Mysql => {
                let f1 = s.dir.join("pipe-dump.cnf");
                let f2 = s.dir.join("pipe-load.cnf");
                let one = |tables: &str| {
                    format!(
                        "mariadb-dump --defaults-extra-file={} --single-transaction {db} {tables} | {rsh} root@{} 'mariadb --defaults-extra-file={} {pipe_db}'",
                        f1.display(), n2.ip, f2.display()
                    )
                };
                format!(
                    "set -o pipefail; ( {} ) & a=$!; ( {} ) & b=$!; wait $a && wait $b",
                    one("OKM_NODE_DOCUMENT"),
                    one("OKM_ACTIVITY OKM_CONFIG OKM_NODE_BASE OKM_NODE_DOCUMENT_VERSION")
                )
            }
            Engine::Postgres => {
                let f = s.dir.join("pipe.pgpass");
                let one = |args: &str| {
                    format!(
                        "PGPASSFILE={f} pg_dump -h 127.0.0.1 -p {} -U {DB_USER} {args} {db} | {rsh} root@{} 'PGPASSFILE={f} psql -X -q -h 127.0.0.1 -p {} -U {DB_USER} {pipe_db} >/dev/null'",
                        n1.postgres.port, n2.ip, n2.postgres.port, f = f.display()
                    )
                };
                format!(
                    "set -o pipefail; {pre} && {{ ( {a} ) & a=$!; ( {b} ) & b=$!; wait $a && wait $b; }} && {post}",
                    pre = one("--section=pre-data"),
                    a = one("--section=data -t okm_node_document"),
                    b = one("--section=data --exclude-table-data=okm_node_document"),
                    post = one("--section=post-data")
                )
            }
        };
        let split = env_or("HASYNC_BENCH_DB_SPLIT", 0) == 1;
        // The servers' CPU seconds (mariadbd is one process; a postmaster
        // reaps its backends, so their times are in its children's).
        let server = |node: usize| match e {
            Engine::Mysql => c.nodes[node].mariadb.pid(),
            Engine::Postgres => c.nodes[node].postgres.pid(),
        };
        let server_cpu = |node: usize| server(node).and_then(|p| proc_cpu(p, true)).unwrap_or(0.0);
        let mut walls: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
        let mut cpus: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
        let mut hasync_rss = 0;
        let mut relay_cpu = Vec::new();
        let mut phases: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        let mut dump_bytes = 0;
        let mut streams = 1;
        for rep in 0..reps {
            let mut order = if rep % 2 == 0 {
                vec!["pipe", "hasync"]
            } else {
                vec!["hasync", "pipe"]
            };
            if split {
                order.push("split");
            }
            for who in order {
                let cmd = if who == "hasync" {
                    let old = format!("{db}__hasync_old");
                    match e {
                        Engine::Mysql => {
                            admin(e, 1, "mysql", &format!("DROP DATABASE IF EXISTS `{old}`"))
                        }
                        Engine::Postgres => admin(
                            e,
                            1,
                            "postgres",
                            &format!("DROP DATABASE IF EXISTS \"{old}\" WITH (FORCE)"),
                        ),
                    };
                    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hasync"));
                    cmd.arg("-c")
                        .arg(&cfg)
                        .args(["--json", "--no-progress", "sync", "--db-only"]);
                    cmd
                } else {
                    fresh_db(e, 1, &pipe_db);
                    let mut cmd = Command::new("bash");
                    cmd.args(["-c", if who == "pipe" { &pipe_cmd } else { &split_cmd }]);
                    cmd
                };
                let (m0, p0) = (server_cpu(1), server_cpu(0));
                let run = timed(cmd);
                let (m, p) = (server_cpu(1) - m0, server_cpu(0) - p0);
                let total = run.tree_cpu + m + p;
                eprintln!(
                    "{name} rep {rep}: {who} {:.1}s; CPU s: {:.1} total = {:.1} client side + {m:.1} mirror server + {p:.1} primary server{}; load {}",
                    run.wall,
                    total,
                    run.tree_cpu,
                    if who == "hasync" { format!(" (hasync itself {:.1})", run.own_cpu) } else { String::new() },
                    std::fs::read_to_string("/proc/loadavg").unwrap_or_default().split(' ').take(3).collect::<Vec<_>>().join(" "),
                );
                walls.entry(who).or_default().push(run.wall);
                cpus.entry(who).or_default().push(total);
                if who == "hasync" {
                    let v: serde_json::Value =
                        serde_json::from_str(&run.stdout).expect("hasync JSON");
                    for p in v[0]["phases"].as_array().unwrap() {
                        phases
                            .entry(p["name"].as_str().unwrap().to_string())
                            .or_default()
                            .push(p["secs"].as_f64().unwrap());
                    }
                    dump_bytes = v[0]["bytes"].as_u64().unwrap();
                    streams = v[0]["streams"].as_u64().unwrap_or(1);
                    hasync_rss = hasync_rss.max(run.rss);
                    relay_cpu.push(run.own_cpu);
                }
            }
        }
        // Both copies hold the primary's rows, table by table.
        let want = table_counts(e, 0, &db);
        // hasync's copy has one row more in the config table: readonly_sql.
        let mut got = table_counts(e, 1, &db);
        let mut want_ro = want.clone();
        for m in [&mut got, &mut want_ro] {
            m.retain(|t, _| !t.eq_ignore_ascii_case("okm_config"));
        }
        assert_eq!(got, want_ro, "{name}: hasync's copy");
        assert_eq!(
            table_counts(e, 1, &pipe_db),
            want,
            "{name}: the pipe's copy"
        );
        assert!(databases(e, 1, &db)
            .iter()
            .all(|d| !d.ends_with("__hasync_new")));

        // Per-run ratios pair each hasync run with the pipe run of the same
        // repetition (adjacent in time, so under similar load).
        let ratios = |a: &[f64], b: &[f64]| {
            a.iter()
                .zip(b)
                .map(|(h, p)| format!("{:.2}", h / p))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let (pw, hw, pc, hc) = (
            &walls["pipe"],
            &walls["hasync"],
            &cpus["pipe"],
            &cpus["hasync"],
        );
        let (p, h) = (best(pw.clone()), best(hw.clone()));
        report.push(format!(
            "| {name} | {rows} | {} MB | {} MB | {p:.1} s | {h:.1} s | **{:.2}** | {} | {:.2} ({}) | {}{} | {:.1} s | {} MiB |",
            bytes / 1_000_000,
            dump_bytes / 1_000_000,
            h / p,
            ratios(hw, pw),
            best(hc.clone()) / best(pc.clone()),
            ratios(hc, pc),
            phases
                .iter()
                .map(|(k, v)| format!("{k} {:.1} s", best(v.clone())))
                .chain([format!("{streams} stream(s)")])
                .collect::<Vec<_>>()
                .join(", "),
            walls
                .get("split")
                .map(|s| format!("; split pipes {:.1} s ({:.2} of the pipe)", best(s.clone()), best(s.clone()) / p))
                .unwrap_or_default(),
            best(relay_cpu.clone()),
            hasync_rss / 1024,
        ));
        drop_dbs(e, 0, &db);
        drop_dbs(e, 1, &db);
        drop_dbs(e, 1, &pipe_db);
    }
    println!(
        "\nDatabase phase vs the plain pipe ({}; scale {scale}, best of {reps} runs each; target ratio <= 1.0)\n",
        if cfg!(debug_assertions) { "DEBUG build: timings meaningless" } else { "release build" }
    );
    println!("| engine | rows | table data | dump | pipe wall | hasync wall | hasync / pipe | per-run ratios | CPU ratio (per run) | hasync phases | hasync's own CPU | hasync peak RSS (with dump tool) |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for line in report {
        println!("{line}");
    }
}
