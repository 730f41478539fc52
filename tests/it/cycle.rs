//! `hasync sync`: the whole cycle against the harness's real nodes: both
//! fake applications stopped and started again, files and database copied,
//! the outcome recorded on both nodes, the lock, the restart guarantee.

use std::time::Duration;

use crate::cmd::hasync;
use crate::db::{admin, as_okm, assert_same_dump, drop_dbs, dump_text, fresh_db, Engine};
use crate::harness::cluster;
use crate::setup::Setup;

/// Stops both fake applications when dropped: other tests expect them
/// stopped, whatever this test did (or where it panicked).
pub struct AppsStopped;

impl AppsStopped {
    /// Start both fake applications; they are stopped again when the guard
    /// drops.
    pub fn start_both() -> AppsStopped {
        let guard = AppsStopped;
        for n in &cluster().nodes {
            n.app.start();
        }
        guard
    }
}

impl Drop for AppsStopped {
    fn drop(&mut self) {
        // Never panic here: a panic while unwinding aborts the whole run.
        for n in &cluster().nodes {
            n.app.unconfigure();
            let _ = std::process::Command::new(&n.app.script)
                .arg("stop")
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}

/// The phases of a whole cycle that went through, in order.
pub const CYCLE_PHASES: [&str; 6] = [
    "preflight",
    "warm file pass",
    "quiesce",
    "final file pass",
    "database",
    "restart",
];

/// The phase names of a cycle's report or record (its `phases`).
pub fn phase_names(cycle: &serde_json::Value) -> Vec<String> {
    cycle["phases"]
        .as_array()
        .unwrap_or_else(|| panic!("no phases in {cycle}"))
        .iter()
        .map(|p| p["name"].as_str().unwrap().to_string())
        .collect()
}

pub fn record(s: &Setup, i: usize) -> serde_json::Value {
    let p = s.state_dirs[i].join("state.json");
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).unwrap()
}

pub fn cycle_setup(label: &str, db: &str) -> Setup {
    let mut s = Setup::exclusive(label);
    s.db_name = db.to_string();
    s.readonly_sql = vec![
        "INSERT INTO OKM_CONFIG (CFG_KEY, CFG_TYPE, CFG_VALUE) VALUES ('system.readonly', 'boolean', 'true') ON DUPLICATE KEY UPDATE CFG_VALUE = 'true'".into(),
    ];
    fresh_db(Engine::Mysql, 0, db);
    drop_dbs(Engine::Mysql, 1, db);
    as_okm(
        Engine::Mysql,
        0,
        db,
        "CREATE TABLE OKM_CONFIG (CFG_KEY VARCHAR(255) PRIMARY KEY, CFG_TYPE VARCHAR(32), CFG_VALUE TEXT);\n\
         CREATE TABLE doc (id INT PRIMARY KEY, path VARCHAR(200));\n\
         INSERT INTO doc VALUES (1, 'repository/a.txt');",
    );
    crate::sync::write(&s.roots[0], "repository/a.txt", b"a");
    crate::sync::write(&s.roots[0], "logs/x.log", b"log");
    s
}

/// A cycle on engine `e`: the primary's database has the small schema and,
/// with `rows` > 0, a table `big` of that many rows; the mirror has no
/// such database yet.
pub fn engine_cycle_setup(e: Engine, label: &str, db: &str, rows: u32) -> Setup {
    let mut s = Setup::exclusive(label);
    s.engine = Some(e.name());
    s.db_name = db.to_string();
    fresh_db(e, 0, db);
    drop_dbs(e, 1, db);
    as_okm(e, 0, db, crate::db::small_schema(e));
    if rows > 0 {
        crate::db::big_table(e, 0, db, rows);
    }
    crate::sync::write(&s.roots[0], "repository/a.txt", b"a");
    s
}

#[test]
fn a_cycle_copies_files_and_database_and_restarts_both() {
    let db = "okmdb_cycle";
    let s = cycle_setup("cycle-basic", db);
    let cfg = s.write();
    let c = cluster();
    let _apps = AppsStopped::start_both();
    let run = hasync().config(&cfg).args(["sync"]).run();
    run.code(0)
        .stderr_has("BEGIN warm file pass")
        .stderr_has("END final file pass")
        .stderr_has("BEGIN database")
        .stderr_has("the primary's service was down");
    assert!(c.nodes[0].app.is_running() && c.nodes[1].app.is_running());
    crate::sync::assert_same_tree(&s.roots[0], &s.roots[1]);
    // The mirror's database is the primary's, plus the row readonly_sql
    // put in (the primary's OKM_CONFIG is empty).
    let readonly_row = "INSERT INTO `OKM_CONFIG` VALUES\n('system.readonly','boolean','true');\n";
    let (primary, mirror) = (
        dump_text(Engine::Mysql, 0, db),
        dump_text(Engine::Mysql, 1, db),
    );
    assert!(
        !primary.contains("INSERT INTO `OKM_CONFIG`"),
        "the primary's OKM_CONFIG has rows:\n{primary}"
    );
    assert_eq!(
        mirror.matches(readonly_row).count(),
        1,
        "not one {readonly_row:?} in the mirror's dump:\n{mirror}"
    );
    assert_same_dump(
        &primary,
        &mirror.replace(readonly_row, ""),
        "the mirror's database after a cycle, but for readonly_sql's row",
    );
    for i in 0..2 {
        let r = record(&s, i);
        assert_eq!(r["last_cycle"]["outcome"], "ok", "{r}");
        assert!(r["last_cycle"]["outage_secs"].as_f64().is_some(), "{r}");
        assert_eq!(phase_names(&r["last_cycle"]), CYCLE_PHASES, "{r}");
    }
    let ro = admin(
        Engine::Mysql,
        1,
        db,
        "SELECT CFG_VALUE FROM OKM_CONFIG WHERE CFG_KEY = 'system.readonly'",
    );
    assert_eq!(ro.trim(), "true");
    drop_dbs(Engine::Mysql, 0, db);
    drop_dbs(Engine::Mysql, 1, db);
}

/// A failure after the services were stopped (here: readonly_sql finds no
/// row to update, so the database phase stops before its swap): both
/// services run again, the record says failed and why, exit 1.
#[test]
fn a_failing_cycle_restarts_what_it_stopped() {
    let db = "okmdb_cycle_fail";
    let mut s = cycle_setup("cycle-fail", db);
    s.readonly_sql =
        vec!["UPDATE OKM_CONFIG SET CFG_VALUE = 'true' WHERE CFG_KEY = 'system.readonly'".into()];
    let cfg = s.write();
    let c = cluster();
    let _apps = AppsStopped::start_both();
    let run = hasync().config(&cfg).args(["sync"]).run();
    run.code(1)
        .stderr_has("cycle failed")
        .stderr_has("readonly_sql[0]");
    assert!(c.nodes[0].app.is_running(), "primary restarted");
    assert!(c.nodes[1].app.is_running(), "standby restarted");
    for i in 0..2 {
        let r = record(&s, i);
        assert_eq!(r["last_cycle"]["outcome"], "failed", "{r}");
        assert!(
            r["last_cycle"]["reason"]
                .as_str()
                .unwrap()
                .contains("readonly_sql"),
            "{r}"
        );
    }
    drop_dbs(Engine::Mysql, 0, db);
    drop_dbs(Engine::Mysql, 1, db);
}

/// `hasync schedule --next` prints crontab times; the daemon fires a cycle
/// at the next minute, logs it, and stops cleanly on SIGTERM between cycles.
#[test]
fn the_scheduler_fires_cycles_and_stops_on_sigterm() {
    let db = "okmdb_cycle_sched";
    let s = cycle_setup("cycle-sched", db);
    let cfg = s.write();
    let mut text = std::fs::read_to_string(&cfg).unwrap();
    text.push_str("\n[schedule]\ncron = \"30 2 * * 0\"\n");
    std::fs::write(&cfg, &text).unwrap();
    let next = hasync()
        .config(&cfg)
        .args(["schedule", "--next", "3"])
        .run();
    next.code(0);
    let lines: Vec<&str> = next.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{}", next.stdout);
    for l in &lines {
        assert!(l.contains(" 02:30 Sun"), "{l}");
    }

    std::fs::write(&cfg, text.replace("30 2 * * 0", "* * * * *")).unwrap();
    let c = cluster();
    let _apps = AppsStopped::start_both();
    let daemon = hasync().config(&cfg).args(["schedule"]).spawn().follow();
    // Follow its log: after a cycle ended ok, it says when the next one is
    // and sleeps; that is when SIGTERM must stop it cleanly.
    let deadline = std::time::Instant::now() + Duration::from_secs(200);
    let mut cycle_ok = false;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let line = daemon.next_line(left).expect("the scheduler's log");
        if line.starts_with("cycle ok") {
            cycle_ok = true;
        } else if cycle_ok && line.starts_with("next cycle at") {
            // Not right at a minute boundary: the next cycle would start.
            let sec: u32 = chrono::Local::now()
                .format("%S")
                .to_string()
                .parse()
                .unwrap();
            if sec < 55 {
                break;
            }
            cycle_ok = false;
        }
    }
    daemon.signal(libc::SIGTERM);
    let run = daemon.wait();
    let log = &run.stderr;
    assert_eq!(run.code, 0, "{log}");
    assert!(log.contains("stopping the scheduler"), "{log}");
    assert_eq!(record(&s, 1)["last_cycle"]["outcome"], "ok");
    assert!(c.nodes[0].app.is_running() && c.nodes[1].app.is_running());
    crate::sync::assert_same_tree(&s.roots[0], &s.roots[1]);
    drop_dbs(Engine::Mysql, 0, db);
    drop_dbs(Engine::Mysql, 1, db);
}

/// `hasync sync --dry-run` prints the whole cycle — service commands per
/// node, the file plan, the database plan — and changes nothing: the
/// services keep running (same pids), no file, database or record appears.
#[test]
fn a_dry_run_cycle_changes_nothing() {
    let db = "okmdb_cycle_dry";
    let s = cycle_setup("cycle-dry", db);
    let cfg = s.write();
    let c = cluster();
    let _apps = AppsStopped::start_both();
    let pids = (c.nodes[0].app.pid(), c.nodes[1].app.pid());
    let run = hasync().config(&cfg).args(["sync", "--dry-run"]).run();
    run.code(0)
        .stdout_has("cycle plan: okm1 -> okm2")
        .stdout_has(&format!("[okm2] stop: {}", c.nodes[1].app.stop_cmd()))
        .stdout_has(&format!("[okm1] start: {}", c.nodes[0].app.start_cmd()))
        .stdout_has("repository/a.txt")
        .stdout_has("mariadb-dump")
        .stdout_has("dry run: nothing was changed");
    assert_eq!(
        pids,
        (c.nodes[0].app.pid(), c.nodes[1].app.pid()),
        "services untouched"
    );
    assert_eq!(
        std::fs::read_dir(&s.roots[1]).unwrap().count(),
        0,
        "standby root untouched"
    );
    assert!(crate::db::databases(Engine::Mysql, 1, db).is_empty());
    assert!(!s.state_dirs[0].join("state.json").exists() && !s.state_dirs[1].exists());
    drop_dbs(Engine::Mysql, 0, db);
}

/// `early_restart`: the primary starts as soon as the dump's snapshot is
/// taken (PostgreSQL: exported; MySQL: mysqldump's first table), before the
/// copy; the success hook gets the outcome in its environment and as JSON on
/// stdin.
#[test]
fn early_restart_on_postgres_and_the_success_hook() {
    early_restart_and_the_success_hook(Engine::Postgres);
}

#[test]
fn early_restart_on_mysql() {
    early_restart_and_the_success_hook(Engine::Mysql);
}

fn early_restart_and_the_success_hook(e: Engine) {
    let db = &format!("okmdb_cycle_early_{}", e.name());
    let s = engine_cycle_setup(e, &format!("cycle-early-{}", e.name()), db, 200_000);
    let cfg = s.write();
    let hook_out = s.dir.join("hook.out");
    let hook = s.dir.join("hook.sh");
    std::fs::write(
        &hook,
        format!(
            "#!/bin/sh\nenv | grep ^HASYNC_ | sort > {out}\ncat >> {out}\n",
            out = hook_out.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&hook, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("[database]\n", "[database]\nearly_restart = true\n")
        + &format!("\n[hooks]\non_success = \"{}\"\n", hook.display());
    std::fs::write(&cfg, text).unwrap();
    let c = cluster();
    let _apps = AppsStopped::start_both();
    let run = hasync().config(&cfg).args(["sync"]).run();
    run.code(0).stderr_has("starting the primary early");
    // The primary was started before the database phase ended.
    let early = run.stderr.find("okm1: service started").unwrap();
    let db_end = run.stderr.find("END database").unwrap();
    assert!(early < db_end, "{}", run.stderr);
    assert!(c.nodes[0].app.is_running() && c.nodes[1].app.is_running());
    let out = std::fs::read_to_string(&hook_out).unwrap();
    assert!(out.contains("HASYNC_OUTCOME=ok"), "{out}");
    assert!(out.contains("HASYNC_PRIMARY=okm1"), "{out}");
    assert!(out.contains("\"outcome\":\"ok\""), "{out}");
    assert_eq!(admin(e, 1, db, "SELECT count(*) FROM big").trim(), "200000");
    drop_dbs(e, 0, db);
    drop_dbs(e, 1, db);
}
