//! The fault suite: a cycle against the harness's real nodes while something
//! breaks under it — the mirror's agent killed mid-transfer, the mirror's
//! disk full, the mirror's database server killed mid-load, the primary's
//! database down at preflight, a stop command that hangs, SIGINT / SIGTERM
//! in every phase — and no password anywhere during a full cycle.
//!
//! Each test checks what a sysadmin would check afterwards: the exit code
//! and the message, that both applications run, that the mirror holds its
//! previous files and database, what the state records say, and that the
//! next cycle converges. (Two cycles at once: see the database row of the
//! signal table, [`sigint_and_sigterm_in_the_database_phase`].)

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::cmd::hasync;
use crate::cycle::{cycle_setup, engine_cycle_setup, record, AppsStopped};
use crate::db::{
    admin, as_okm, assert_same_dump, big_table, drop_dbs, dump_text, fresh_db, small_schema,
    staging_rows, Engine,
};
use crate::harness::{cluster, proc};
use crate::setup::{edit_toml, quoted, Setup};
use crate::sync::{assert_same_tree, snapshot, write};

const LONG: Duration = Duration::from_secs(120);

/// Runs its closure when dropped: puts back what a test broke (a server, a
/// mount) even when the test panics.
pub(crate) struct Defer<F: FnMut()>(pub(crate) F);

impl<F: FnMut()> Drop for Defer<F> {
    fn drop(&mut self) {
        (self.0)()
    }
}

/// Write the test's config with `edits` applied (see [`edit_toml`]).
pub(crate) fn write_config(s: &Setup, edits: &[(&str, &str, Option<String>)]) -> PathBuf {
    let cfg = s.write();
    std::fs::write(&cfg, edit_toml(&s.config_text(), edits)).unwrap();
    cfg
}

pub(crate) fn toml_str(s: &str) -> Option<String> {
    Some(format!("{s:?}"))
}

/// The pids of both applications (`None`: not running).
fn app_pids() -> Vec<Option<i32>> {
    cluster().nodes.iter().map(|n| n.app.pid()).collect()
}

#[track_caller]
fn assert_both_apps_run() {
    for n in &cluster().nodes {
        assert!(
            n.app.is_running(),
            "{}: the application is not running",
            n.name
        );
    }
}

#[track_caller]
fn assert_outcome(s: &Setup, outcome: &str, reason_has: &str) {
    for i in 0..2 {
        let r = record(s, i);
        assert_eq!(r["last_cycle"]["outcome"], outcome, "node {i}: {r}");
        let reason = r["last_cycle"]["reason"].as_str().unwrap_or_default();
        assert!(reason.contains(reason_has), "node {i}: {r}");
    }
}

/// Regular files and symlinks of a tree, without directories (whose mtimes
/// change when a temporary file comes and goes).
fn files_of(root: &Path) -> Vec<(String, crate::sync::Node)> {
    snapshot(root)
        .into_iter()
        .filter(|(_, n)| !matches!(n, crate::sync::Node::Dir { .. }))
        .collect()
}

/// Our temporary files under `dir` (`.<name>.hasync-<hex>.tmp`).
fn temp_files(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with('.') && n.contains(".hasync-") && n.ends_with(".tmp"))
                .collect()
        })
        .unwrap_or_default()
}

/// Item 1: the mirror's agent dies (SIGKILL) in the middle of a file's
/// transfer in the final pass, while both services are stopped. The cycle
/// fails naming the step and the node, both services run again, the file
/// never appears under its real name, and the next cycle leaves an exact
/// mirror (the temporary file removed).
#[test]
fn agent_killed_mid_transfer_fails_cleanly_and_the_next_cycle_converges() {
    let db = "okmdb_fault_agent";
    let s = cycle_setup("fault-agent", db);
    let c = cluster();
    // The standby's stop command, the first of the quiesce, writes a big
    // file on the primary: the final pass has it to send, not the warm one.
    let big = s.roots[0].join("repository/big.bin");
    let stop = format!(
        "head -c 256M /dev/urandom > {}; {}",
        big.display(),
        c.nodes[1].app.stop_cmd()
    );
    let cfg = write_config(&s, &[("nodes.okm2.service", "stop", toml_str(&stop))]);
    let _apps = AppsStopped::start_both();
    let mut running = hasync().config(&cfg).args(["sync"]).spawn().follow();
    running.wait_for("BEGIN final file pass", LONG);
    let mirror_dir = s.roots[1].join("repository");
    let t0 = Instant::now();
    while !temp_files(&mirror_dir)
        .iter()
        .any(|n| n.starts_with(".big.bin."))
    {
        assert!(
            !running.has_exited() && t0.elapsed() < LONG,
            "big.bin was never seen in transfer: make it bigger"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let root = s.roots[1].display().to_string();
    let agents: Vec<i32> = proc::all_procs()
        .into_iter()
        .filter(|p| p.comm == "hasync" && !p.is_zombie())
        .filter(|p| {
            let line = proc::cmdline(p.pid);
            line.contains(" agent ") && line.contains(&root)
        })
        .map(|p| p.pid)
        .collect();
    assert_eq!(agents.len(), 1, "the mirror's agent: {agents:?}");
    proc::signal(agents[0], libc::SIGKILL);
    let run = running.wait();
    run.code(1)
        .stderr_has("cycle failed: final file pass: okm1 -> okm2")
        .stderr_has("okm2");
    assert_both_apps_run();
    assert_outcome(&s, "failed", "final file pass");
    assert!(
        !s.roots[1].join("repository/big.bin").exists(),
        "a half-sent file under its real name"
    );
    // The next cycle (without the big file's maker) cleans the leftover
    // and converges.
    s.write();
    hasync().config(&cfg).args(["sync"]).run().code(0);
    assert_same_tree(&s.roots[0], &s.roots[1]);
    assert!(temp_files(&mirror_dir).is_empty());
    assert_both_apps_run();
    drop_both(db);
}

/// Item 2: the mirror's root is a 2 MiB tmpfs; a file that does not fit
/// fails the warm pass with "no space left" naming the node and the path,
/// the mirror's previous files are intact and nothing was stopped.
#[test]
fn a_full_mirror_disk_is_named_and_leaves_the_mirror_intact() {
    let db = "okmdb_fault_full";
    let s = cycle_setup("fault-full", db);
    let mnt = s.roots[1].clone();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=2m", "hasync-it-full"])
        .arg(&mnt)
        .status()
        .unwrap();
    assert!(mounted.success(), "mount a tmpfs on {}", mnt.display());
    let _umount = Defer(|| {
        let _ = std::process::Command::new("umount").arg(&mnt).status();
    });
    let cfg = s.write();
    let _apps = AppsStopped::start_both();
    hasync().config(&cfg).args(["sync"]).run().code(0);
    let before = files_of(&mnt);
    assert!(before.iter().any(|(p, _)| p == "repository/a.txt"));
    let pids = app_pids();

    write(&s.roots[0], "repository/big.bin", &vec![7u8; 3 << 20]);
    let run = hasync().config(&cfg).args(["sync"]).run();
    run.code(1)
        .stderr_has("cycle failed: warm file pass")
        .stderr_has(&format!(
            "changes failed on okm2; first: repository/big.bin: no space left on {} (",
            mnt.display()
        ))
        .stderr_has("then run again");
    assert_eq!(pids, app_pids(), "nothing was stopped");
    assert_eq!(files_of(&mnt), before, "the mirror's files changed");
    assert_outcome(&s, "failed", "no space left");
    drop_both(db);
}

/// Item 3: the mirror's database server is killed while the dump loads
/// into staging. The cycle fails naming the step, the primary runs again,
/// and once the server is back the live mirror database is as before.
fn mirror_server_killed_mid_load(e: Engine) {
    let db = format!("okmdb_fault_srv_{}", e.name());
    let staging = format!("{db}__hasync_new");
    let s = engine_cycle_setup(e, &format!("fault-srv-{}", e.name()), &db, 300_000);
    fresh_db(e, 1, &db);
    as_okm(e, 1, &db, small_schema(e));
    if e == Engine::Postgres {
        // PostgreSQL logs sequences 32 values ahead: crash recovery from
        // before a checkpoint moves `doc_id_seq` on by itself.
        admin(e, 1, "postgres", "CHECKPOINT");
    }
    let before = dump_text(e, 1, &db);
    let cfg = s.write();
    let mirror = &cluster().nodes[1];
    let restart = || match e {
        Engine::Mysql => mirror.mariadb.start(),
        Engine::Postgres => mirror.postgres.start(),
    };
    let _apps = AppsStopped::start_both();
    let mut running = hasync().config(&cfg).args(["sync"]).spawn().follow();
    running.wait_for("BEGIN database", LONG);
    let t0 = Instant::now();
    while staging_rows(e, &staging) == 0 {
        assert!(
            !running.has_exited() && t0.elapsed() < LONG,
            "no rows ever arrived in {staging}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // PostgreSQL's 300,000 rows are past SPLIT_MIN: they load in two
    // streams (FAULTS #3), both running when the server dies. (MariaDB's
    // estimate of them is below it: one stream.)
    let loaders = crate::db::loaders(e, &staging);
    if e == Engine::Postgres {
        assert_eq!(
            loaders.len(),
            2,
            "the load is not in two streams; loaders on the mirror: {loaders:#?}"
        );
    }
    let server_back = Defer(restart);
    match e {
        Engine::Mysql => mirror.mariadb.kill(),
        Engine::Postgres => mirror.postgres.kill(),
    }
    let run = running.wait();
    run.code(1)
        .stderr_has("cycle failed: database: database load on okm2")
        .stderr_has("the live database was not touched");
    assert_both_apps_run();
    assert_outcome(&s, "failed", "database");
    drop(server_back);
    assert_same_dump(
        &before,
        &dump_text(e, 1, &db),
        "live mirror database after its server was killed mid-load",
    );
    drop_dbs(e, 0, &db);
    drop_dbs(e, 1, &db);
}

#[test]
fn mirror_mariadb_killed_mid_load() {
    mirror_server_killed_mid_load(Engine::Mysql);
}

#[test]
fn mirror_postgres_killed_mid_load() {
    mirror_server_killed_mid_load(Engine::Postgres);
}

/// Item 4: the primary's database is down at preflight: a clear error,
/// exit 1, and neither application was touched (same pids).
#[test]
fn primary_database_down_at_preflight_stops_nothing() {
    let db = "okmdb_fault_pre";
    let s = cycle_setup("fault-preflight", db);
    let cfg = s.write();
    let primary_db = &cluster().nodes[0].mariadb;
    let _apps = AppsStopped::start_both();
    let pids = app_pids();
    primary_db.stop();
    let server_back = Defer(|| primary_db.start());
    let run = hasync().config(&cfg).args(["sync"]).run();
    drop(server_back);
    run.code(1)
        .stderr_has("cycle failed: preflight: node okm1")
        .stderr_has("nothing was stopped")
        .stderr_lacks("service stopped");
    assert_eq!(pids, app_pids(), "an application was restarted");
    assert_outcome(&s, "failed", "preflight");
    drop_both(db);
}

/// Item 5: the primary's stop command hangs. The stop times out, the
/// cycle stops there, the standby (really stopped) and the primary run
/// again, the record says failed, and the hung command was ended.
#[test]
fn a_hanging_stop_command_times_out_and_everything_restarts() {
    let db = "okmdb_fault_hang";
    let s = cycle_setup("fault-hang", db);
    let hang = "sleep 599";
    let cfg = write_config(
        &s,
        &[
            ("nodes.okm1.service", "stop", toml_str(hang)),
            ("nodes.okm1.service", "timeout", toml_str("3s")),
        ],
    );
    let _apps = AppsStopped::start_both();
    let standby_pid = cluster().nodes[1].app.pid();
    let run = hasync().config(&cfg).args(["sync"]).run();
    run.code(1)
        .stderr_has(&format!(
            "cycle failed: quiesce: node okm1: `{hang}` did not finish within 3 s (the service's timeout) and was ended"
        ))
        .stderr_has("okm2: service started");
    assert_both_apps_run();
    assert_ne!(
        cluster().nodes[1].app.pid(),
        standby_pid,
        "the standby was stopped and started again"
    );
    assert_outcome(&s, "failed", "timeout");
    let left: Vec<i32> = proc::all_procs()
        .into_iter()
        .filter(|p| !p.is_zombie() && proc::cmdline(p.pid).trim() == hang)
        .map(|p| p.pid)
        .collect();
    for &p in &left {
        proc::signal(p, libc::SIGKILL);
    }
    assert!(
        left.is_empty(),
        "the timed-out `{hang}` still runs: {left:?}"
    );
    drop_both(db);
}

/// Item 6: SIGINT, then SIGTERM, in `phase` (made long enough by `edits`):
/// exit 130, the message names the signal and the phase, both services
/// run, the record says interrupted, and the services of the nodes in
/// `untouched` were never stopped (same pid), not even one the cycle was
/// about to stop when the signal came. The lock is free after each: the
/// SIGTERM cycle has to take it to reach the phase, and a last cycle runs
/// through and converges.
fn interrupted_in(
    phase: &str,
    s: &Setup,
    edits: &[(&str, &str, Option<String>)],
    untouched: &[usize],
) {
    let cfg = write_config(s, edits);
    let _apps = AppsStopped::start_both();
    let c = cluster();
    for sig in [libc::SIGINT, libc::SIGTERM] {
        let pids: Vec<_> = untouched.iter().map(|&i| c.nodes[i].app.pid()).collect();
        let name = if sig == libc::SIGINT {
            "SIGINT"
        } else {
            "SIGTERM"
        };
        let running = hasync().config(&cfg).args(["sync"]).spawn().follow();
        running.wait_for(&format!("BEGIN {phase}"), LONG);
        if phase == "database" && sig == libc::SIGTERM {
            // Item 7: meanwhile a second cycle is refused, naming the holder.
            hasync()
                .config(&cfg)
                .args(["sync"])
                .run()
                .code(1)
                .stderr_has("another replication cycle is running")
                .stderr_has(&format!("pid {}", running.pid()))
                .stderr_lacks("not running before the cycle");
            // The refused cycle did not write over the records.
            assert_outcome(s, "interrupted", "interrupted by SIGINT");
        }
        running.signal(sig);
        let run = running.wait();
        run.code(130)
            .stderr_has(&format!("{name} received during {phase}"));
        assert_both_apps_run();
        let after: Vec<_> = untouched.iter().map(|&i| c.nodes[i].app.pid()).collect();
        assert_eq!(
            pids, after,
            "{name} in {phase}: a service of {untouched:?} was stopped"
        );
        assert_outcome(s, "interrupted", &format!("interrupted by {name}"));
    }
    hasync().config(&cfg).args(["sync"]).run().code(0);
    assert_outcome(s, "ok", "");
    assert_same_tree(&s.roots[0], &s.roots[1]);
    assert_both_apps_run();
}

/// `<agent_path>` for the standby: a wrapper that waits `secs` before it
/// runs the agent, so a file pass lasts at least that long (the final
/// pass's agents start before the quiesce, so its wait is what is left).
fn slow_agent(s: &Setup, secs: u32) -> Option<String> {
    let path = s.dir.join("slow-agent.sh");
    std::fs::write(
        &path,
        format!(
            "#!/bin/sh\nsleep {secs}\nexec {} \"$@\"\n",
            env!("CARGO_BIN_EXE_hasync")
        ),
    )
    .unwrap();
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    quoted(&path)
}

fn signal_setup(phase: &str) -> (Setup, String) {
    let db = format!("okmdb_fault_sig_{}", phase.replace(' ', "_"));
    (cycle_setup(&format!("fault-sig-{phase}"), &db), db)
}

fn drop_both(db: &str) {
    drop_dbs(Engine::Mysql, 0, db);
    drop_dbs(Engine::Mysql, 1, db);
}

#[test]
fn sigint_and_sigterm_in_the_warm_file_pass() {
    let (s, db) = signal_setup("warm file pass");
    let edits = [("nodes.okm2", "agent_path", slow_agent(&s, 3))];
    interrupted_in("warm file pass", &s, &edits, &[0, 1]);
    drop_both(&db);
}

#[test]
fn sigint_and_sigterm_in_the_quiesce() {
    let (s, db) = signal_setup("quiesce");
    let stop = format!("sleep 3; {}", cluster().nodes[1].app.stop_cmd());
    let edits = [("nodes.okm2.service", "stop", toml_str(&stop))];
    interrupted_in("quiesce", &s, &edits, &[0]);
    drop_both(&db);
}

#[test]
fn sigint_and_sigterm_in_the_final_file_pass() {
    let (s, db) = signal_setup("final file pass");
    let edits = [("nodes.okm2", "agent_path", slow_agent(&s, 6))];
    interrupted_in("final file pass", &s, &edits, &[]);
    drop_both(&db);
}

/// Also item 7: two cycles at once, the second refused.
#[test]
fn sigint_and_sigterm_in_the_database_phase() {
    let (s, db) = signal_setup("database");
    big_table(Engine::Mysql, 0, &db, 400_000);
    interrupted_in("database", &s, &[], &[]);
    drop_both(&db);
}

#[test]
fn sigint_and_sigterm_in_the_restart() {
    let (s, db) = signal_setup("restart");
    let start = format!("sleep 3; {}", cluster().nodes[0].app.start_cmd());
    let edits = [("nodes.okm1.service", "start", toml_str(&start))];
    interrupted_in("restart", &s, &edits, &[]);
    drop_both(&db);
}

/// Item 11: no password on any process's command line during a whole
/// cycle (dump, load, swap, read-only SQL, services, lock), nor in its
/// output at -vvv, nor in any file left in the state directories.
fn no_password_anywhere_in_a_full_cycle(e: Engine) {
    let pw = cluster().db_password.clone();
    let db = format!("okmdb_fault_pw_{}", e.name());
    // Exclusive (the cycle stops the apps): no other test's helper puts
    // the password on a command line meanwhile.
    let s = engine_cycle_setup(e, &format!("fault-pw-{}", e.name()), &db, 150_000);
    let cfg = s.write();
    crate::db::prove_the_scan_sees(&pw);
    let _apps = AppsStopped::start_both();
    let running = hasync().config(&cfg).args(["-vvv", "sync"]).spawn();
    let run = crate::db::watch_command_lines(e, running, &pw);
    run.code(0).stderr_has("END database");
    let mut files = 0;
    for dir in &s.state_dirs {
        for entry in walkdir(dir) {
            let text = std::fs::read(&entry).unwrap();
            assert!(
                !String::from_utf8_lossy(&text).contains(&pw),
                "password in {}",
                entry.display()
            );
            files += 1;
        }
    }
    assert!(files >= 2, "no state records: the check proved nothing");
    drop_dbs(e, 0, &db);
    drop_dbs(e, 1, &db);
}

/// Every regular file under `dir`.
fn walkdir(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let t = e.file_type().unwrap();
        if t.is_dir() {
            out.extend(walkdir(&e.path()));
        } else if t.is_file() {
            out.push(e.path());
        }
    }
    out
}

#[test]
fn no_password_anywhere_in_a_full_cycle_mysql() {
    no_password_anywhere_in_a_full_cycle(Engine::Mysql);
}

#[test]
fn no_password_anywhere_in_a_full_cycle_postgres() {
    no_password_anywhere_in_a_full_cycle(Engine::Postgres);
}
