//! `hasync sync --db-only` against the harness's real MariaDB and
//! PostgreSQL servers: a round trip of a schema with every feature the
//! issue lists, compared object by object and row by row (the vendor dumps
//! of both sides must be identical); a load killed midway; passwords never
//! on a command line; a dry run that changes nothing; readonly_sql checked.
//!
//! Each test uses databases of its own (`okmdb_<label>...`, which the
//! harness's `okm` user may create), so the tests share the cluster.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::cmd::{hasync, Run, Running};
use crate::harness::{cluster, scrub_env, Node, DB_USER};
use crate::setup::Setup;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Engine {
    Mysql,
    Postgres,
}

impl Engine {
    pub fn name(self) -> &'static str {
        match self {
            Engine::Mysql => "mysql",
            Engine::Postgres => "postgres",
        }
    }
}

fn node(i: usize) -> &'static Node {
    &cluster().nodes[i]
}

/// Admin SQL in database `db` of node `i`.
pub fn admin(e: Engine, i: usize, db: &str, sql: &str) -> String {
    match e {
        Engine::Mysql => node(i).mariadb.sql_in(db, sql),
        Engine::Postgres => node(i).postgres.sql_in(db, sql),
    }
}

/// SQL as the application user `okm` (what owns the objects, as in
/// production), over TCP with the password.
pub fn as_okm(e: Engine, i: usize, db: &str, sql: &str) -> String {
    let pw = &cluster().db_password;
    let r = match e {
        Engine::Mysql => node(i).mariadb.sql_as(DB_USER, pw, db, sql),
        Engine::Postgres => node(i).postgres.sql_as(DB_USER, pw, db, sql),
    };
    r.unwrap_or_else(|err| panic!("SQL as okm on node {i} ({db}) failed: {err}\n--- SQL:\n{sql}"))
}

/// A fresh, empty database `name` owned by `okm` on node `i` (dropping
/// any leftovers of an earlier run, staging and previous copies included).
pub fn fresh_db(e: Engine, i: usize, name: &str) {
    drop_dbs(e, i, name);
    match e {
        Engine::Mysql => {
            admin(
                e,
                i,
                "mysql",
                &format!(
                    "CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci"
                ),
            );
        }
        Engine::Postgres => {
            admin(
                e,
                i,
                "postgres",
                &format!("CREATE DATABASE \"{name}\" OWNER okm"),
            );
        }
    }
}

pub fn drop_dbs(e: Engine, i: usize, name: &str) {
    for db in [
        name.to_string(),
        format!("{name}__hasync_new"),
        format!("{name}__hasync_old"),
    ] {
        match e {
            Engine::Mysql => {
                admin(e, i, "mysql", &format!("DROP DATABASE IF EXISTS `{db}`"));
            }
            Engine::Postgres => {
                admin(
                    e,
                    i,
                    "postgres",
                    &format!("DROP DATABASE IF EXISTS \"{db}\" WITH (FORCE)"),
                );
            }
        }
    }
}

/// The databases on node `i` whose name starts with `prefix`.
pub fn databases(e: Engine, i: usize, prefix: &str) -> Vec<String> {
    let out = match e {
        Engine::Mysql => admin(e, i, "mysql", "SHOW DATABASES"),
        Engine::Postgres => admin(
            e,
            i,
            "postgres",
            "SELECT datname FROM pg_database ORDER BY 1",
        ),
    };
    let mut v: Vec<String> = out
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with(prefix))
        .map(String::from)
        .collect();
    v.sort();
    v
}

/// The vendor dump of database `db` on node `i`, as the admin, without the
/// lines that differ between any two dumps (comments with dates and hosts,
/// PostgreSQL's random `\restrict` keys). Two databases with the same
/// objects and rows give the same text.
pub fn dump_text(e: Engine, i: usize, db: &str) -> String {
    let n = node(i);
    let mut cmd = match e {
        Engine::Mysql => {
            let mut c = Command::new("mariadb-dump");
            c.arg("--no-defaults")
                .arg(format!("--socket={}", n.mariadb.socket.display()))
                .args([
                    "--user=root",
                    "--skip-comments",
                    "--skip-dump-date",
                    "--routines",
                    "--triggers",
                    "--events",
                    "--hex-blob",
                    "--default-character-set=utf8mb4",
                    "--order-by-primary",
                    db,
                ]);
            scrub_env(&mut c, &["MYSQL_", "MARIADB_"]);
            c
        }
        Engine::Postgres => {
            let mut c = Command::new("pg_dump");
            scrub_env(&mut c, &["PG"]);
            c.arg("-h").arg(&n.postgres.socket_dir).args([
                "-p",
                &n.postgres.port.to_string(),
                "-U",
                "postgres",
                db,
            ]);
            c
        }
    };
    let out = cmd.output().expect("run the dump tool");
    assert!(
        out.status.success(),
        "dump of {db} on node {i} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| {
            !l.starts_with("--") && !l.starts_with("\\restrict") && !l.starts_with("\\unrestrict")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Assert two dumps are equal, showing the first differing lines.
#[track_caller]
pub fn assert_same_dump(a: &str, b: &str, what: &str) {
    if a == b {
        return;
    }
    let (la, lb): (Vec<&str>, Vec<&str>) = (a.lines().collect(), b.lines().collect());
    let first = la
        .iter()
        .zip(&lb)
        .position(|(x, y)| x != y)
        .unwrap_or(la.len().min(lb.len()));
    let show = |v: &[&str]| {
        v.iter()
            .skip(first.saturating_sub(2))
            .take(6)
            .map(|l| l.chars().take(300).collect::<String>())
            .collect::<Vec<_>>()
            .join("\n")
    };
    panic!(
        "{what}: dumps differ at line {} ({} vs {} lines)\n--- primary ---\n{}\n--- mirror ---\n{}",
        first + 1,
        la.len(),
        lb.len(),
        show(&la),
        show(&lb)
    );
}

pub fn setup(e: Engine, label: &str, db: &str) -> Setup {
    let mut s = Setup::new(label);
    s.engine = Some(e.name());
    s.db_name = db.to_string();
    s
}

const SMALL_MYSQL: &str = "
CREATE TABLE doc (id INT PRIMARY KEY AUTO_INCREMENT, name VARCHAR(100), body BLOB);
INSERT INTO doc (name, body) VALUES ('a', 0x00FF), ('b''s', NULL), ('ü\\n', '');
CREATE TABLE OKM_CONFIG (CFG_KEY VARCHAR(255) PRIMARY KEY, CFG_TYPE VARCHAR(32), CFG_VALUE TEXT);
INSERT INTO OKM_CONFIG VALUES ('x', 'string', 'y');
CREATE VIEW doc_names AS SELECT name FROM doc;
";

const SMALL_PG: &str = "
CREATE TABLE doc (id serial PRIMARY KEY, name text, body bytea);
INSERT INTO doc (name, body) VALUES ('a', '\\x00ff'), ('b''s', NULL), (E'ü\\n', '');
CREATE TABLE okm_config (cfg_key varchar(255) PRIMARY KEY, cfg_type varchar(32), cfg_value text);
INSERT INTO okm_config VALUES ('x', 'string', 'y');
CREATE VIEW doc_names AS SELECT name FROM doc;
";

pub fn small_schema(e: Engine) -> &'static str {
    match e {
        Engine::Mysql => SMALL_MYSQL,
        Engine::Postgres => SMALL_PG,
    }
}

fn readonly_upsert(e: Engine) -> Vec<String> {
    match e {
        Engine::Mysql => vec![
            "INSERT INTO OKM_CONFIG (CFG_KEY, CFG_TYPE, CFG_VALUE) VALUES ('system.readonly', 'boolean', 'true') ON DUPLICATE KEY UPDATE CFG_VALUE = 'true'".into(),
            "SELECT CFG_VALUE = 'true' FROM OKM_CONFIG WHERE CFG_KEY = 'system.readonly'".into(),
        ],
        Engine::Postgres => vec![
            "INSERT INTO okm_config (cfg_key, cfg_type, cfg_value) VALUES ('system.readonly', 'boolean', 'true') ON CONFLICT (cfg_key) DO UPDATE SET cfg_value = 'true'".into(),
            "SELECT cfg_value = 'true' FROM okm_config WHERE cfg_key = 'system.readonly'".into(),
        ],
    }
}

fn config_table(e: Engine) -> &'static str {
    match e {
        Engine::Mysql => "OKM_CONFIG",
        Engine::Postgres => "okm_config",
    }
}

fn small_round_trip(e: Engine) {
    let db = format!("okmdb_small_{}", e.name());
    let mut s = setup(e, &format!("db-small-{}", e.name()), &db);
    s.readonly_sql = readonly_upsert(e);
    let cfg = s.write();
    fresh_db(e, 0, &db);
    drop_dbs(e, 1, &db);
    as_okm(e, 0, &db, small_schema(e));

    // First run: the mirror has no such database yet.
    let run = hasync().config(&cfg).args(["sync", "--db-only"]).run();
    run.code(0);
    run.stderr_has("replicated");
    let t = config_table(e);
    let ro = admin(
        e,
        1,
        &db,
        &format!("SELECT CFG_VALUE FROM {t} WHERE CFG_KEY = 'system.readonly'"),
    );
    assert_eq!(ro.trim(), "true", "the mirror is marked read-only");
    admin(
        e,
        1,
        &db,
        &format!("DELETE FROM {t} WHERE CFG_KEY = 'system.readonly'"),
    );
    assert_same_dump(&dump_text(e, 0, &db), &dump_text(e, 1, &db), "first run");

    // Second run over an existing copy: the previous one is kept.
    admin(e, 0, &db, "INSERT INTO doc (name) VALUES ('new')");
    hasync()
        .config(&cfg)
        .args(["sync", "--db-only"])
        .run()
        .code(0);
    admin(
        e,
        1,
        &db,
        &format!("DELETE FROM {t} WHERE CFG_KEY = 'system.readonly'"),
    );
    assert_same_dump(&dump_text(e, 0, &db), &dump_text(e, 1, &db), "second run");
    assert_eq!(
        databases(e, 1, &db),
        vec![db.clone(), format!("{db}__hasync_old")],
        "staging is gone, the previous copy kept"
    );
    let old_rows = admin(
        e,
        1,
        &format!("{db}__hasync_old"),
        "SELECT count(*) FROM doc",
    );
    assert_eq!(
        old_rows.trim(),
        "3",
        "the previous copy has the previous rows"
    );
    drop_dbs(e, 0, &db);
    drop_dbs(e, 1, &db);
}

#[test]
fn small_round_trip_mysql() {
    small_round_trip(Engine::Mysql);
}

#[test]
fn small_round_trip_postgres() {
    small_round_trip(Engine::Postgres);
}

pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn fixture(name: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/it/fixtures")
        .join(name);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// A table `big` of `rows` (at most a million) rows of ~240 bytes, made by
/// the server itself.
pub fn big_table(e: Engine, i: usize, db: &str, rows: u32) {
    const DIGITS: &str = "(SELECT 0 d UNION ALL SELECT 1 UNION ALL SELECT 2 UNION ALL SELECT 3 UNION ALL SELECT 4 \
         UNION ALL SELECT 5 UNION ALL SELECT 6 UNION ALL SELECT 7 UNION ALL SELECT 8 UNION ALL SELECT 9)";
    let sql = match e {
        Engine::Mysql => format!(
            "CREATE TABLE big (id INT PRIMARY KEY, k CHAR(32), body VARCHAR(400));\n\
             INSERT INTO big SELECT n, md5(n), repeat(md5(n * 7), 6) FROM (SELECT 1 + a.d + 10 * b.d + 100 * c.d + 1000 * e.d + 10000 * f.d + 100000 * g.d AS n \
             FROM {DIGITS} a, {DIGITS} b, {DIGITS} c, {DIGITS} e, {DIGITS} f, {DIGITS} g) x WHERE n <= {rows};"
        ),
        Engine::Postgres => format!(
            "CREATE TABLE big (id int PRIMARY KEY, k char(32), body varchar(400));\n\
             INSERT INTO big SELECT g, md5(g::text), repeat(md5((g * 7)::text), 6) FROM generate_series(1, {rows}) g;"
        ),
    };
    as_okm(e, i, db, &sql);
}

/// Every process's command line, as (pid, arguments joined by spaces).
pub fn command_lines() -> Vec<(u32, String)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("read /proc").flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if let Ok(raw) = std::fs::read(entry.path().join("cmdline")) {
            let line = raw
                .split(|&b| b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect::<Vec<_>>()
                .join(" ");
            out.push((pid, line));
        }
    }
    out
}

/// The vendor clients loading `staging` on the mirror, as (pid, command
/// line): one per stream.
pub fn loaders(e: Engine, staging: &str) -> Vec<(u32, String)> {
    let want = match e {
        Engine::Mysql => format!("--database={staging}"),
        Engine::Postgres => format!("--dbname={staging}"),
    };
    let tool = match e {
        Engine::Mysql => "mariadb",
        Engine::Postgres => "psql",
    };
    command_lines()
        .into_iter()
        .filter(|(_, l)| l.contains(&want) && l.contains(tool) && !l.contains("command -v"))
        .collect()
}

/// Whether rows of `big` are being loaded into staging (MySQL: an INSERT
/// into it is running; PostgreSQL: its COPY has processed rows).
pub fn staging_rows(e: Engine, staging: &str) -> u64 {
    let pw = &cluster().db_password;
    let r = match e {
        // mariadb-dump wraps the INSERTs in LOCK TABLES: count(*) would wait
        // for the end of the table, the process list does not.
        Engine::Mysql => Ok(admin(
            e,
            1,
            "mysql",
            &format!(
                "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE DB = '{staging}' AND INFO LIKE 'INSERT INTO `big`%'"
            ),
        )),
        Engine::Postgres => node(1).postgres.sql_as(
            DB_USER,
            pw,
            "postgres",
            &format!(
                "SELECT COALESCE(max(tuples_processed), 0) FROM pg_stat_progress_copy WHERE datname = '{staging}'"
            ),
        ),
    };
    r.ok().and_then(|v| v.trim().parse().ok()).unwrap_or(0)
}

/// The mirror's loader dies mid-stream: hasync fails naming the step and
/// the node, the staging database is dropped, and the live mirror database
/// is exactly as before.
/// `streams`: 1 (HASYNC_DB_SPLIT_MIN beyond any size) or 2
/// (HASYNC_DB_SPLIT_MIN=0: the load is in two streams, and one of its two
/// loaders is killed); the loaders running when the rows arrive must be
/// that many.
fn load_killed_midway(e: Engine, streams: usize) {
    // (Not a name that starts with another test's: `databases` lists by
    // prefix.)
    let kill = if streams > 1 { "killsplit" } else { "kill" };
    let db = format!("okmdb_{kill}_{}", e.name());
    let staging = format!("{db}__hasync_new");
    let s = setup(e, &format!("db-{kill}-{}", e.name()), &db);
    let cfg = s.write();
    fresh_db(e, 0, &db);
    fresh_db(e, 1, &db);
    // Two tables at least: PostgreSQL splits a load by table.
    as_okm(e, 0, &db, small_schema(e));
    big_table(e, 0, &db, 300_000);
    as_okm(e, 1, &db, small_schema(e));
    let before = dump_text(e, 1, &db);

    let split_min = if streams > 1 {
        "0".to_string()
    } else {
        u64::MAX.to_string()
    };
    let running = hasync()
        .config(&cfg)
        .env("HASYNC_DB_SPLIT_MIN", &split_min)
        .args(["sync", "--db-only"])
        .spawn();
    wait_until("rows arriving in staging", Duration::from_secs(120), || {
        staging_rows(e, &staging) > 0
    });
    let loaders = loaders(e, &staging);
    assert_eq!(
        loaders.len(),
        streams,
        "{streams} stream(s) expected, but these loaders run on the mirror: {loaders:#?}\n\
         processes naming {staging}: {:#?}",
        command_lines()
            .into_iter()
            .filter(|(_, l)| l.contains(&staging))
            .collect::<Vec<_>>()
    );
    let pid = loaders[0].0;
    // SAFETY: kill(2) on a pid we just found; at worst it already exited.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let run = running.wait();
    assert_ne!(run.code, 0, "hasync must fail: {}", run.stderr);
    run.stderr_has("database load on okm2");
    run.stderr_has("the live database was not touched");
    assert_same_dump(
        &before,
        &dump_text(e, 1, &db),
        "live mirror database after a killed load",
    );
    assert_eq!(databases(e, 1, &db), vec![db.clone()], "staging dropped");
    drop_dbs(e, 0, &db);
    drop_dbs(e, 1, &db);
}

#[test]
fn load_killed_midway_mysql() {
    load_killed_midway(Engine::Mysql, 1);
}

#[test]
fn load_killed_midway_mysql_two_streams() {
    load_killed_midway(Engine::Mysql, 2);
}

#[test]
fn load_killed_midway_postgres() {
    load_killed_midway(Engine::Postgres, 1);
}

#[test]
fn load_killed_midway_postgres_two_streams() {
    load_killed_midway(Engine::Postgres, 2);
}

/// The /proc scan of [`watch_command_lines`] can see `secret` on a command
/// line (a canary process shows it), so its silence means something.
pub fn prove_the_scan_sees(secret: &str) {
    let mut canary = Command::new("sh")
        .args(["-c", "sleep 30", "sh", secret])
        .spawn()
        .unwrap();
    wait_until(
        "the /proc scan to see a canary's command line",
        Duration::from_secs(10),
        || command_lines().iter().any(|(_, l)| l.contains(secret)),
    );
    canary.kill().unwrap();
    canary.wait().unwrap();
}

/// Scan every process's command line for `secret` until `running` ends,
/// then check its output at whatever verbosity it was given. The vendor
/// dump tool of `e` must have been seen running, or the scan proved
/// nothing.
pub fn watch_command_lines(e: Engine, mut running: Running, secret: &str) -> Run {
    let dump_tool = match e {
        Engine::Mysql => "mariadb-dump",
        Engine::Postgres => "pg_dump",
    };
    let mut seen_dump = false;
    let mut scans = 0;
    while running.child.try_wait().unwrap().is_none() {
        for (pid, line) in command_lines() {
            assert!(
                !line.contains(secret),
                "password on the command line of pid {pid}: {line}"
            );
            seen_dump |= line.contains(dump_tool)
                && (line.contains("--defaults-extra-file") || line.contains("--snapshot="));
        }
        scans += 1;
    }
    let run = running.wait();
    assert!(
        seen_dump,
        "never saw {dump_tool} running ({scans} scans): the check proved nothing"
    );
    assert!(
        !run.stdout.contains(secret) && !run.stderr.contains(secret),
        "password in the output of `{}`",
        run.line
    );
    run
}

/// No password on any process's command line while dumps and loads run,
/// nor in the output at the highest verbosity, nor left on disk.
#[test]
fn passwords_never_on_a_command_line() {
    let pw = cluster().db_password.clone();
    for e in [Engine::Mysql, Engine::Postgres] {
        let db = format!("okmdb_proc_{}", e.name());
        fresh_db(e, 0, &db);
        drop_dbs(e, 1, &db);
        big_table(e, 0, &db, 150_000);
    }
    // Exclusive: other tests' helpers pass the password to clients on their
    // command lines (tests only), which this scan would see.
    let _lock = cluster().lock();
    prove_the_scan_sees(&pw);

    for e in [Engine::Mysql, Engine::Postgres] {
        let db = format!("okmdb_proc_{}", e.name());
        let mut s = Setup::new_unlocked(&format!("db-proc-{}", e.name()));
        s.engine = Some(e.name());
        s.db_name = db.clone();
        let cfg = s.write();
        let running = hasync()
            .config(&cfg)
            .args(["-vvv", "sync", "--db-only"])
            .spawn();
        watch_command_lines(e, running, &pw).code(0);
        for dir in &s.state_dirs {
            let leftovers: Vec<_> = std::fs::read_dir(dir)
                .map(|d| d.flatten().map(|e| e.file_name()).collect())
                .unwrap_or_default();
            assert!(
                leftovers.is_empty(),
                "credential files left in {}: {leftovers:?}",
                dir.display()
            );
        }
        drop_dbs(e, 0, &db);
        drop_dbs(e, 1, &db);
    }
}

/// `--dry-run` lists the tables with their rows and the commands, shows no
/// password, and changes nothing on either node.
fn dry_run_changes_nothing(e: Engine) {
    let db = format!("okmdb_dry_{}", e.name());
    let s = setup(e, &format!("db-dry-{}", e.name()), &db);
    let cfg = s.write();
    fresh_db(e, 0, &db);
    fresh_db(e, 1, &db);
    as_okm(e, 0, &db, small_schema(e));
    as_okm(e, 1, &db, &small_schema(e).replace("'a'", "'mirror'"));
    let before = [dump_text(e, 0, &db), dump_text(e, 1, &db)];
    let dbs_before = [databases(e, 0, &db), databases(e, 1, &db)];

    // The default threshold (64 MiB), whatever this test's environment says.
    let run = hasync()
        .config(&cfg)
        .env("HASYNC_DB_SPLIT_MIN", "67108864")
        .args(["-vv", "sync", "--db-only", "--dry-run"])
        .run();
    run.code(0);
    let dump_tool = if e == Engine::Mysql {
        "--single-transaction"
    } else {
        "pg_dump"
    };
    run.stdout_has("doc")
        .stdout_has("2 tables, 4 rows")
        .stdout_has(dump_tool)
        .stdout_has("<redacted>")
        .stdout_has(&format!("{db}__hasync_new"))
        .stdout_has("dry run: nothing was changed");
    assert!(
        !run.stdout.contains(&cluster().db_password)
            && !run.stderr.contains(&cluster().db_password)
    );
    assert!(
        !run.stdout.contains("two such loaders"),
        "a small database loads in one stream: {}",
        run.stdout
    );
    // With the threshold at 0 it would load in two, and says so.
    let split = hasync()
        .config(&cfg)
        .env("HASYNC_DB_SPLIT_MIN", "0")
        .args(["sync", "--db-only", "--dry-run"])
        .run();
    split.code(0).stdout_has("two such loaders");
    if e == Engine::Mysql {
        split.stdout_has("--skip-add-locks");
    }

    let json = hasync()
        .config(&cfg)
        .args(["--json", "sync", "--db-only", "--dry-run"])
        .run();
    json.code(0);
    let v: serde_json::Value = serde_json::from_str(&json.stdout).expect("JSON plan");
    let tables = v[0]["tables"].as_array().expect("tables");
    assert!(
        tables
            .iter()
            .any(|t| t[0].as_str().is_some_and(|n| n.ends_with("doc")) && t[1] == 3),
        "{tables:?}"
    );
    assert_eq!(v[0]["mirror_database_exists"], true);

    assert_same_dump(&before[0], &dump_text(e, 0, &db), "primary after a dry run");
    assert_same_dump(&before[1], &dump_text(e, 1, &db), "mirror after a dry run");
    assert_eq!(dbs_before, [databases(e, 0, &db), databases(e, 1, &db)]);
    for dir in &s.state_dirs {
        assert!(!dir.exists(), "a dry run created {}", dir.display());
    }
    drop_dbs(e, 0, &db);
    drop_dbs(e, 1, &db);
}

#[test]
fn dry_run_changes_nothing_mysql() {
    dry_run_changes_nothing(Engine::Mysql);
}

#[test]
fn dry_run_changes_nothing_postgres() {
    dry_run_changes_nothing(Engine::Postgres);
}

/// A readonly_sql statement that changes nothing (the row it updates is
/// missing) or a check that is not true stops the phase before the swap:
/// the live mirror database stays as it was, staging is dropped.
fn readonly_sql_failure_stops_before_the_swap(e: Engine, statements: Vec<String>, expect: &str) {
    let db = format!("okmdb_ro_{}", e.name());
    let mut s = setup(e, &format!("db-ro-{}", e.name()), &db);
    s.readonly_sql = statements;
    let cfg = s.write();
    fresh_db(e, 0, &db);
    fresh_db(e, 1, &db);
    as_okm(e, 0, &db, small_schema(e));
    as_okm(
        e,
        0,
        &db,
        "INSERT INTO doc (name) VALUES ('only on the primary')",
    );
    let before = dump_text(e, 1, &db);
    let run = hasync().config(&cfg).args(["sync", "--db-only"]).run();
    run.code(1)
        .stderr_has("database read-only SQL on okm2")
        .stderr_has(expect);
    assert_same_dump(
        &before,
        &dump_text(e, 1, &db),
        "live mirror after a failed readonly_sql",
    );
    assert_eq!(databases(e, 1, &db), vec![db.clone()]);
    drop_dbs(e, 0, &db);
    drop_dbs(e, 1, &db);
}

#[test]
fn readonly_update_of_a_missing_row_fails_mysql() {
    readonly_sql_failure_stops_before_the_swap(
        Engine::Mysql,
        vec!["UPDATE OKM_CONFIG SET CFG_VALUE = 'true' WHERE CFG_KEY = 'system.readonly'".into()],
        "readonly_sql[0] on okm2",
    );
}

#[test]
fn readonly_check_that_is_false_fails_postgres() {
    readonly_sql_failure_stops_before_the_swap(
        Engine::Postgres,
        vec![
            "UPDATE okm_config SET cfg_value = 'true' WHERE cfg_key = 'x'".into(),
            "SELECT count(*) = 2 FROM okm_config".into(),
        ],
        "readonly_sql[1] on okm2",
    );
}

/// The statements of an SQL file: `--` comment lines dropped, split at `;`
/// line ends (as the templates are written).
pub fn sql_statements(text: &str) -> Vec<String> {
    text.lines()
        .filter(|l| !l.trim_start().starts_with("--"))
        .collect::<Vec<_>>()
        .join("\n")
        .split(";\n")
        .map(|s| s.trim().trim_end_matches(';').trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

/// templates/readonly-*.sql, used as readonly_sql, mark an OpenKM-like
/// database read-only whether or not the row existed.
#[test]
fn readonly_templates_work() {
    for e in [Engine::Mysql, Engine::Postgres] {
        let db = format!("okmdb_tpl_{}", e.name());
        let mut s = setup(e, &format!("db-tpl-{}", e.name()), &db);
        let text = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join(format!("templates/readonly-{}.sql", e.name())),
        )
        .unwrap();
        s.readonly_sql = sql_statements(&text);
        assert_eq!(s.readonly_sql.len(), 2, "{:?}", s.readonly_sql);
        let cfg = s.write();
        fresh_db(e, 0, &db);
        drop_dbs(e, 1, &db);
        as_okm(e, 0, &db, small_schema(e));
        let t = config_table(e);
        let flag = || {
            admin(
                e,
                1,
                &db,
                &format!("SELECT CFG_VALUE FROM {t} WHERE CFG_KEY = 'system.readonly'"),
            )
        };
        // The row is missing on the primary: inserted.
        hasync()
            .config(&cfg)
            .args(["sync", "--db-only"])
            .run()
            .code(0);
        assert_eq!(flag().trim(), "true");
        // The row exists, writable, on the primary: updated.
        as_okm(
            e,
            0,
            &db,
            &format!("INSERT INTO {t} VALUES ('system.readonly', 'boolean', 'false')"),
        );
        hasync()
            .config(&cfg)
            .args(["sync", "--db-only"])
            .run()
            .code(0);
        assert_eq!(flag().trim(), "true");
        let primary = admin(
            e,
            0,
            &db,
            &format!("SELECT CFG_VALUE FROM {t} WHERE CFG_KEY = 'system.readonly'"),
        );
        assert_eq!(primary.trim(), "false", "the primary stays writable");
        drop_dbs(e, 0, &db);
        drop_dbs(e, 1, &db);
    }
}

/// Every feature the issue lists, through a real sync, twice (the second
/// time over an existing copy, with changes on the primary): the vendor
/// dumps of the primary and the mirror are identical, object by object and
/// row by row; and the copy works (its trigger fires, its sequence goes on
/// where the primary's was, its view and routines answer).
fn full_round_trip(e: Engine) {
    let db = format!("okmdb_full_{}", e.name());
    let mut s = setup(e, &format!("db-full-{}", e.name()), &db);
    s.readonly_sql = readonly_upsert(e);
    let cfg = s.write();
    fresh_db(e, 0, &db);
    fresh_db(e, 1, &db);
    as_okm(e, 0, &db, &fixture(&format!("schema-{}.sql", e.name())));
    as_okm(e, 1, &db, small_schema(e));
    let t = config_table(e);
    let unflag = || {
        admin(
            e,
            1,
            &db,
            &format!("DELETE FROM {t} WHERE CFG_KEY = 'system.readonly'"),
        )
    };

    // The first run loads in two streams (forced on this small database),
    // the second in one (the default threshold).
    let run = hasync()
        .config(&cfg)
        .env("HASYNC_DB_SPLIT_MIN", "0")
        .args(["-v", "sync", "--db-only"])
        .run();
    run.code(0);
    run.stderr_has("2 streams in parallel");
    unflag();
    let primary = dump_text(e, 0, &db);
    for needle in [
        "TRIGGER",
        "VIEW",
        "FUNCTION",
        "PROCEDURE",
        "café_données",
        "名前",
        "PARTITION",
    ]
    .into_iter()
    .chain(match e {
        Engine::Mysql => [
            "geometry",
            "SPATIAL KEY",
            "FULLTEXT KEY",
            "year(4)",
            "DEFINER",
            "SQL SECURITY INVOKER",
        ],
        Engine::Postgres => [
            "MATERIALIZED VIEW",
            "CREATE AGGREGATE",
            "tsvector",
            "SECURITY DEFINER",
            "PARTITION BY HASH",
            "\"médiathèque\".\"évaluation\"",
        ],
    }) {
        assert!(
            primary.contains(needle),
            "the fixture lacks {needle}: the comparison would prove little"
        );
    }
    if e == Engine::Postgres {
        // Populated and not, as on the primary (the dumps say so only by
        // a REFRESH line that is there or not).
        let states = "SELECT string_agg(matviewname || '=' || ispopulated, ' ' ORDER BY matviewname) FROM pg_matviews";
        assert_eq!(
            admin(e, 1, &db, states).trim(),
            "okm_mv_mime_stats=true rental_by_rating=false sales_by_film=true"
        );
    }
    assert_same_dump(&primary, &dump_text(e, 1, &db), "first run");
    let old = format!("{db}__hasync_old");
    assert_eq!(
        admin(e, 1, &old, "SELECT count(*) FROM doc").trim(),
        "3",
        "previous copy kept"
    );

    // Changes on the primary, then a second run over the existing copy.
    match e {
        Engine::Mysql => {
            as_okm(e, 0, &db, "INSERT INTO okm_document_version (doc_id, ver_name, created, author) VALUES (3, '9.0', NOW(), 'it');\nSELECT NEXTVAL(okm_seq_ticket);");
        }
        Engine::Postgres => {
            as_okm(e, 0, &db, "INSERT INTO okm_document_version (doc_id, ver_name, created, author) VALUES (3, '9.0', now(), 'it');\nSELECT nextval('okm_seq_ticket');");
        }
    }
    hasync()
        .config(&cfg)
        .args(["sync", "--db-only"])
        .run()
        .code(0);
    unflag();
    assert_same_dump(&dump_text(e, 0, &db), &dump_text(e, 1, &db), "second run");
    assert!(
        admin(e, 1, &old, "SELECT count(*) FROM okm_document_version").trim() != "0",
        "the previous copy is the first run's"
    );

    // The copy works: the trigger fires, the sequence continues.
    let activity = |i| {
        admin(e, i, &db, "SELECT count(*) FROM okm_activity")
            .trim()
            .to_string()
    };
    let before = activity(1);
    as_okm(e, 1, &db, "INSERT INTO okm_document_version (doc_id, ver_name, created, author) VALUES (3, '10.0', '2026-01-01 00:00:00', 'it')");
    assert_ne!(before, activity(1), "the trigger fires on the mirror");
    let next = match e {
        Engine::Mysql => "SELECT NEXTVAL(okm_seq_ticket)",
        Engine::Postgres => "SELECT nextval('okm_seq_ticket')",
    };
    assert_eq!(
        as_okm(e, 1, &db, next).trim(),
        as_okm(e, 0, &db, next).trim(),
        "sequences carried"
    );
    drop_dbs(e, 0, &db);
    drop_dbs(e, 1, &db);
}

#[test]
fn full_round_trip_mysql() {
    full_round_trip(Engine::Mysql);
}

#[test]
fn full_round_trip_postgres() {
    full_round_trip(Engine::Postgres);
}

/// An object whose DEFINER (MySQL) or OWNER (PostgreSQL) is an account the
/// mirror lacks: a clear error saying what to create, the live database
/// untouched.
fn foreign_owner_is_a_clear_error(e: Engine) {
    let db = format!("okmdb_owner_{}", e.name());
    let s = setup(e, &format!("db-owner-{}", e.name()), &db);
    let cfg = s.write();
    fresh_db(e, 0, &db);
    fresh_db(e, 1, &db);
    as_okm(e, 0, &db, small_schema(e));
    as_okm(e, 1, &db, small_schema(e));
    let expect = match e {
        Engine::Mysql => {
            // The admin (root@localhost) defines a view: okm may not
            // create a view with another account as its DEFINER.
            admin(
                e,
                0,
                &db,
                "CREATE DEFINER = `root`@`localhost` VIEW root_view AS SELECT 1 AS one",
            );
            "DEFINER"
        }
        Engine::Postgres => {
            admin(
                e,
                0,
                &db,
                "DROP ROLE IF EXISTS okm_other; CREATE ROLE okm_other; CREATE TABLE other_owned (id int); ALTER TABLE other_owned OWNER TO okm_other; GRANT SELECT ON other_owned TO okm;",
            );
            "create that role on the mirror"
        }
    };
    let before = dump_text(e, 1, &db);
    let run = hasync().config(&cfg).args(["sync", "--db-only"]).run();
    run.code(1)
        .stderr_has("database load on okm2")
        .stderr_has(expect);
    assert_same_dump(
        &before,
        &dump_text(e, 1, &db),
        "live mirror after a refused load",
    );
    assert_eq!(databases(e, 1, &db), vec![db.clone()]);
    drop_dbs(e, 0, &db);
    drop_dbs(e, 1, &db);
    if e == Engine::Postgres {
        admin(e, 0, "postgres", "DROP ROLE IF EXISTS okm_other");
    }
}

#[test]
fn foreign_definer_is_a_clear_error_mysql() {
    foreign_owner_is_a_clear_error(Engine::Mysql);
}

#[test]
fn foreign_owner_is_a_clear_error_postgres() {
    foreign_owner_is_a_clear_error(Engine::Postgres);
}

/// A superuser session on the mirror's live PostgreSQL database (hasync's
/// user may not end it) blocks the swap: a clear error saying what to do,
/// the live database untouched, staging dropped.
#[test]
fn a_session_hasync_may_not_end_blocks_the_swap_clearly() {
    let e = Engine::Postgres;
    let db = "okmdb_busy_postgres";
    let s = setup(e, "db-busy-postgres", db);
    let cfg = s.write();
    fresh_db(e, 0, db);
    fresh_db(e, 1, db);
    as_okm(e, 0, db, small_schema(e));
    as_okm(e, 1, db, small_schema(e));
    let before = dump_text(e, 1, db);
    let mut busy = node(1).postgres.admin_client();
    busy.args(["-d", db, "-c", "SELECT pg_sleep(60)"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut busy = busy.spawn().unwrap();
    wait_until("the superuser session", Duration::from_secs(10), || {
        admin(e, 1, "postgres", &format!("SELECT count(*) FROM pg_stat_activity WHERE datname = '{db}' AND query LIKE '%pg_sleep%'"))
            .trim()
            == "1"
    });
    let run = hasync().config(&cfg).args(["sync", "--db-only"]).run();
    let _ = busy.kill();
    let _ = busy.wait();
    run.code(1)
        .stderr_has("database swap on okm2")
        .stderr_has("is being accessed by other users")
        .stderr_has("pg_signal_backend");
    assert_same_dump(
        &before,
        &dump_text(e, 1, db),
        "live mirror after a refused swap",
    );
    assert_eq!(databases(e, 1, db), vec![db.to_string()]);
    drop_dbs(e, 0, db);
    drop_dbs(e, 1, db);
}

/// Two materialized views, one populated and one created `WITH NO DATA`
/// and never refreshed (what `pg_dump` of many real schemas holds).
const MATVIEWS_PG: &str = "
CREATE MATERIALIZED VIEW doc_names_mv AS SELECT name FROM doc WITH DATA;
CREATE MATERIALIZED VIEW doc_stats_mv AS SELECT count(*) AS docs FROM doc WITH NO DATA;
";

/// Whether each materialized view of `db` on node `i` is populated, as
/// "name=t" or "name=f", in name order.
fn matview_states(i: usize, db: &str) -> String {
    admin(
        Engine::Postgres,
        i,
        db,
        "SELECT string_agg(matviewname || '=' || ispopulated, ' ' ORDER BY matviewname) FROM pg_matviews",
    )
    .trim()
    .to_string()
}

/// An unpopulated materialized view is copied as it is (unpopulated on the
/// mirror too), not counted; a populated one is counted. The states flip
/// on the primary and the next run follows. `split_min`: as in
/// [`load_killed_midway`].
fn unpopulated_matview_is_copied_as_it_is(split_min: Option<&str>) {
    let e = Engine::Postgres;
    let db = match split_min {
        Some(_) => "okmdb_mvsplit_postgres",
        None => "okmdb_mv_postgres",
    };
    let s = setup(e, &db.replace('_', "-"), db);
    let cfg = s.write();
    fresh_db(e, 0, db);
    drop_dbs(e, 1, db);
    // A populated view that reads the unpopulated one (through a view):
    // pg_dump does not refresh it, so its copy is unpopulated, with a
    // warning, and it is not counted.
    let reader = "
REFRESH MATERIALIZED VIEW doc_stats_mv;
CREATE VIEW doc_stats_v AS SELECT docs FROM doc_stats_mv;
CREATE MATERIALIZED VIEW doc_stats_copy_mv AS SELECT docs FROM doc_stats_v WITH DATA;
REFRESH MATERIALIZED VIEW doc_stats_mv WITH NO DATA;
";
    as_okm(
        e,
        0,
        db,
        &format!("{}{MATVIEWS_PG}{reader}", small_schema(e)),
    );
    let sync = || {
        let run = hasync()
            .config(&cfg)
            .env("HASYNC_DB_SPLIT_MIN", split_min.unwrap_or("67108864"))
            .args(["-v", "sync", "--db-only"])
            .run();
        run.code(0);
        if split_min.is_some() {
            run.stderr_has("2 streams in parallel");
        }
        run
    };
    sync().stderr_has(
        "materialized view public.doc_stats_copy_mv is populated on the primary, but its copy on okm2 is not: it reads public.doc_stats_mv",
    );
    assert_eq!(
        matview_states(0, db),
        "doc_names_mv=true doc_stats_copy_mv=true doc_stats_mv=false"
    );
    assert_eq!(
        matview_states(1, db),
        "doc_names_mv=true doc_stats_copy_mv=false doc_stats_mv=false"
    );
    assert_same_dump(&dump_text(e, 0, db), &dump_text(e, 1, db), "first run");

    // The dry run says which view it would not count.
    let dry = hasync()
        .config(&cfg)
        .args(["sync", "--db-only", "--dry-run"])
        .run();
    dry.code(0).stdout_has("not populated: public.doc_stats_mv");

    // Both flip on the primary; the next run follows.
    as_okm(
        e,
        0,
        db,
        "REFRESH MATERIALIZED VIEW doc_stats_mv; REFRESH MATERIALIZED VIEW doc_names_mv WITH NO DATA;",
    );
    let run = sync();
    assert!(!run.stderr.contains("warning"), "{}", run.stderr);
    assert_eq!(
        matview_states(1, db),
        "doc_names_mv=false doc_stats_copy_mv=true doc_stats_mv=true"
    );
    assert_same_dump(&dump_text(e, 0, db), &dump_text(e, 1, db), "second run");
    assert_eq!(
        admin(e, 1, db, "SELECT docs FROM doc_stats_mv").trim(),
        "3",
        "the refreshed view's rows came across"
    );
    drop_dbs(e, 0, db);
    drop_dbs(e, 1, db);
}

#[test]
fn unpopulated_matview_is_copied_as_it_is_postgres() {
    unpopulated_matview_is_copied_as_it_is(None);
}

#[test]
fn unpopulated_matview_is_copied_as_it_is_postgres_two_streams() {
    unpopulated_matview_is_copied_as_it_is(Some("0"));
}

/// A count that fails inside the snapshot's transaction reports the
/// server's own first error, not the "current transaction is aborted" of
/// whatever ran after it.
#[test]
fn a_failed_count_names_the_first_error_postgres() {
    let e = Engine::Postgres;
    let db = "okmdb_mvcount_postgres";
    fresh_db(e, 0, db);
    as_okm(e, 0, db, &format!("{}{MATVIEWS_PG}", small_schema(e)));
    let pg = &node(0).postgres;
    let mut client = postgres::Config::new()
        .host(&pg.host)
        .port(pg.port)
        .user(DB_USER)
        .password(&cluster().db_password)
        .dbname(db)
        .connect(postgres::NoTls)
        .expect("connect as okm");
    hasync::db::pg::export_snapshot(&mut client).expect("a snapshot");
    let table = |name: &str| hasync::db::TableName {
        schema: "public".into(),
        name: name.into(),
    };
    let e = hasync::db::pg::counts(&mut client, &[table("doc"), table("doc_stats_mv")])
        .expect_err("an unpopulated view cannot be counted")
        .to_string();
    assert!(e.contains("has not been populated"), "{e}");
    assert!(!e.contains("current transaction is aborted"), "{e}");
    drop(client);
    drop_dbs(Engine::Postgres, 0, db);
}
