//! Claims of the README (and FAULTS.md) that no other test held to
//! (issue 23, "Claims with no test"): each test here asserts what the
//! sentence says, against the real cluster and the real binary.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::cmd::hasync;
use crate::cycle::{cycle_setup, phase_names, record, AppsStopped};
use crate::db::{drop_dbs, wait_until, Engine};
use crate::faults::{toml_str, write_config, Defer as Restart};
use crate::harness::{cluster, proc};
use crate::setup::Setup;

const LONG: Duration = Duration::from_secs(120);

fn drop_both(db: &str) {
    drop_dbs(Engine::Mysql, 0, db);
    drop_dbs(Engine::Mysql, 1, db);
}

/// An executable shell script `name` in the test's dir.
fn script(s: &Setup, name: &str, body: &str) -> PathBuf {
    let path = s.dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}")).unwrap();
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    path
}

/// `<agent_path>` for the standby: waits `secs` before it runs the agent,
/// so a file pass lasts at least that long.
fn slow_agent(s: &Setup, secs: u32) -> Option<String> {
    let p = script(
        s,
        "slow-agent.sh",
        &format!(
            "sleep {secs}\nexec {} \"$@\"\n",
            env!("CARGO_BIN_EXE_hasync")
        ),
    );
    toml_str(&p.display().to_string())
}

/// Whether some process's command line contains `needle` (a marker the
/// test put into a command, so only its own processes match).
fn a_process_mentions(needle: &str) -> bool {
    proc::all_procs()
        .iter()
        .any(|p| proc::cmdline(p.pid).contains(needle))
}

/// Whether `lock` (a cycle.lock) can be taken right now.
fn lock_is_free(lock: &Path) -> bool {
    std::process::Command::new("flock")
        .args(["-n", "-E", "75"])
        .arg(lock)
        .arg("true")
        .status()
        .is_ok_and(|st| st.success())
}

/// README, restart guarantee: "a second signal aborts at once". The first
/// SIGINT comes while the primary is being stopped (the standby already
/// is), so the cycle restarts the standby — whose start command takes 20 s
/// here. A second SIGINT during that restart ends the process within
/// seconds, exit 130, saying so; it does not wait for the restart.
#[test]
fn a_second_signal_aborts_at_once() {
    let db = "okmdb_claims_sig2";
    let s = cycle_setup("claims-second-signal", db);
    let c = cluster();
    // A marker no other process has, to wait for the slow start's end.
    let marker = "sleep 19.75";
    let edits = [
        (
            "nodes.okm1.service",
            "stop",
            toml_str(&format!("sleep 4; {}", c.nodes[0].app.stop_cmd())),
        ),
        (
            "nodes.okm2.service",
            "start",
            toml_str(&format!("{marker}; {}", c.nodes[1].app.start_cmd())),
        ),
    ];
    let cfg = write_config(&s, &edits);
    let _apps = AppsStopped::start_both();
    let running = hasync().config(&cfg).args(["sync"]).spawn().follow();
    running.wait_for("okm2: service stopped", LONG);
    running.signal(libc::SIGINT);
    running.wait_for("restarting what was stopped", LONG);
    // The restart of okm2 is under way (its start command sleeps).
    wait_until("okm2's slow start command", Duration::from_secs(20), || {
        a_process_mentions(marker)
    });
    let t0 = Instant::now();
    running.signal(libc::SIGINT);
    let run = running.wait();
    let took = t0.elapsed();
    run.code(130).stderr_has("second SIGINT: aborting at once");
    assert!(
        took < Duration::from_secs(5),
        "the second SIGINT took {took:?} to end hasync (the restart it cut short takes 20 s){}",
        run.stderr
    );
    // Do not leave okm2's delayed start behind for the next test.
    wait_until(
        "the aborted start command's end",
        Duration::from_secs(40),
        || !a_process_mentions(marker),
    );
    drop_both(db);
}

/// README, lock: "a crashed or killed cycle never leaves a stale lock".
/// hasync is SIGKILLed in the warm file pass (no destructor, no handler
/// runs); within seconds both nodes' cycle.lock can be taken again, and
/// the next cycle runs through without a word about another cycle.
#[test]
fn a_killed_cycle_leaves_no_stale_lock() {
    let db = "okmdb_claims_kill";
    let s = cycle_setup("claims-killed-lock", db);
    let cfg = write_config(&s, &[("nodes.okm2", "agent_path", slow_agent(&s, 6))]);
    let c = cluster();
    let _apps = AppsStopped::start_both();
    let pids: Vec<_> = c.nodes.iter().map(|n| n.app.pid()).collect();
    let running = hasync().config(&cfg).args(["sync"]).spawn().follow();
    running.wait_for("BEGIN warm file pass", LONG);
    let locks: Vec<PathBuf> = s.state_dirs.iter().map(|d| d.join("cycle.lock")).collect();
    for l in &locks {
        assert!(
            !lock_is_free(l),
            "{}: not held by the running cycle",
            l.display()
        );
    }
    running.signal(libc::SIGKILL);
    let killed = running.wait();
    assert_eq!(killed.code, -1, "SIGKILLed{}", killed.stderr);
    for l in &locks {
        wait_until(
            &format!("{} free after the SIGKILL", l.display()),
            Duration::from_secs(10),
            || lock_is_free(l),
        );
    }
    let after: Vec<_> = c.nodes.iter().map(|n| n.app.pid()).collect();
    assert_eq!(pids, after, "killed in the warm pass: nothing was stopped");
    // Plain agent again: the next cycle is not slowed.
    let cfg = write_config(&s, &[]);
    hasync()
        .config(&cfg)
        .args(["sync"])
        .run()
        .code(0)
        .stderr_lacks("another replication cycle");
    assert_eq!(record(&s, 1)["last_cycle"]["outcome"], "ok");
    crate::sync::assert_same_tree(&s.roots[0], &s.roots[1]);
    drop_both(db);
}

/// README, restart guarantee: "If a service cannot be started, the error
/// says which node's service is down and why, and the exit code is 1."
/// okm2's start command fails (exit 1, a reason on stderr): the primary
/// runs again, the error names okm2, its command and the reason, and the
/// record says failed.
#[test]
fn a_failing_start_command_names_the_node_and_exits_1() {
    let db = "okmdb_claims_start";
    let s = cycle_setup("claims-failing-start", db);
    let c = cluster();
    let start = "echo 'tomcat: port 8080 already in use' >&2; exit 1";
    let cfg = write_config(&s, &[("nodes.okm2.service", "start", toml_str(start))]);
    let _apps = AppsStopped::start_both();
    let run = hasync().config(&cfg).args(["sync"]).run();
    run.code(1)
        .stderr_has(
            "node okm2: `echo 'tomcat: port 8080 already in use' >&2; exit 1` failed (exit 1)",
        )
        .stderr_has("tomcat: port 8080 already in use");
    assert!(c.nodes[0].app.is_running(), "the primary runs again");
    assert!(!c.nodes[1].app.is_running(), "okm2 could not be started");
    run.stderr_has("node okm2: its service is DOWN: restart: node okm2: `echo");
    for i in 0..2 {
        let r = record(&s, i);
        assert_eq!(r["last_cycle"]["outcome"], "failed", "{r}");
        let reason = r["last_cycle"]["reason"].as_str().unwrap_or_default();
        assert!(reason.contains("node okm2: its service is DOWN"), "{r}");
    }
    drop_both(db);
}

/// README, restart: "the primary first (and, with `health_url`, until it
/// answers 2xx)". Both applications take 4 s after `start` before they
/// serve HTTP; when the cycle has ended, both answer at once. And a
/// `health_url` that never answers 2xx fails the cycle within the
/// service's timeout, naming the node and the URL.
#[test]
fn the_restart_waits_for_the_health_url() {
    let db = "okmdb_claims_health";
    let s = cycle_setup("claims-health", db);
    let c = cluster();
    let cfg = s.write();
    let _apps = AppsStopped::start_both();
    for n in &c.nodes {
        // Read at the next start; AppsStopped removes it.
        crate::harness::write_file(&n.app.dir.join("app.json"), r#"{"startup": 4}"#, 0o644);
    }
    let run = hasync().config(&cfg).args(["sync"]).run();
    run.code(0);
    for n in &c.nodes {
        assert_eq!(
            n.app.http("GET", "/").map(|(code, _)| code),
            Some(200),
            "{}: not serving when the cycle ended{}",
            n.name,
            run.stderr
        );
    }

    // A URL where nothing answers (a closed port): the primary's restart
    // fails within its timeout (5 s here), naming the node and the URL.
    for n in &c.nodes {
        n.app.unconfigure();
    }
    let ip = &c.nodes[0].ip;
    let dead = format!("http://{ip}:{}/", crate::harness::free_port(ip));
    let cfg = write_config(
        &s,
        &[
            ("nodes.okm1.service", "health_url", toml_str(&dead)),
            ("nodes.okm1.service", "timeout", toml_str("5s")),
        ],
    );
    let t0 = Instant::now();
    let run = hasync().config(&cfg).args(["sync"]).run();
    run.code(1).stderr_has(&format!(
        "node okm1: the service runs but {dead} did not answer 2xx within the timeout"
    ));
    assert!(t0.elapsed() < Duration::from_secs(60), "{:?}", t0.elapsed());
    assert_eq!(record(&s, 0)["last_cycle"]["outcome"], "failed");
    drop_both(db);
}

/// A hook script that appends its `HASYNC_*` environment, its stdin and
/// the role okm2's record gives at that moment to `out`, then exits with
/// the number in `rc` (0 when that file is missing).
fn recording_hook(s: &Setup, name: &str, out: &Path, rc: &Path) -> PathBuf {
    let okm2_record = s.state_dirs[1].join("state.json");
    script(
        s,
        name,
        &format!(
            "{{ echo '--- {name}'; env | grep ^HASYNC_ | sort; cat; echo; \
             printf 'okm2 record: '; grep -o '\"role\": *\"[a-z]*\"' {rec} | head -n 1; }} >> {out}\n\
             exit $(cat {rc} 2>/dev/null || echo 0)\n",
            rec = okm2_record.display(),
            out = out.display(),
            rc = rc.display(),
        ),
    )
}

/// README, cycle record and roles: the `on_failure` hook runs after a
/// failed cycle with the outcome in its environment and as JSON on stdin;
/// `promote` refuses a standby whose last cycle failed or is older than
/// `--max-age` (nothing written, pre_promote not even run); a non-zero
/// `pre_promote` aborts it before the epoch moves; otherwise pre_promote
/// runs before the standby's record changes and `post_promote` after, both
/// told the node and the new epoch.
#[test]
fn promote_refusals_and_the_hooks() {
    let mut s = Setup::exclusive("claims-promote-hooks");
    s.engine = None;
    let c = cluster();
    let out = s.dir.join("hooks.out");
    let pre_rc = s.dir.join("pre.rc");
    let pre = recording_hook(&s, "pre", &out, &pre_rc);
    let post = recording_hook(&s, "post", &out, &s.dir.join("post.rc"));
    let fail = recording_hook(&s, "fail", &out, &s.dir.join("fail.rc"));
    let hooks = |edits: &[(&str, &str, Option<String>)]| {
        let cfg = write_config(&s, edits);
        let mut text = std::fs::read_to_string(&cfg).unwrap();
        text += &format!(
            "\n[hooks]\npre_promote = {:?}\npost_promote = {:?}\non_failure = {:?}\n",
            pre.display().to_string(),
            post.display().to_string(),
            fail.display().to_string()
        );
        std::fs::write(&cfg, text).unwrap();
        cfg
    };
    let hooks_out = || std::fs::read_to_string(&out).unwrap_or_default();
    crate::sync::write(&s.roots[0], "repository/a.txt", b"a");
    let _apps = AppsStopped::start_both();

    // A cycle that fails (okm2 cannot be started): on_failure runs.
    let cfg = hooks(&[("nodes.okm2.service", "start", toml_str("exit 1"))]);
    hasync().config(&cfg).args(["sync"]).run().code(1);
    let h = hooks_out();
    assert!(h.contains("--- fail\nHASYNC_CLUSTER=it\n"), "{h}");
    assert!(h.contains("HASYNC_OUTCOME=failed\n"), "{h}");
    assert!(h.contains("HASYNC_PRIMARY=okm1\n"), "{h}");
    let reason = h
        .lines()
        .find(|l| l.starts_with("HASYNC_REASON="))
        .unwrap_or_default();
    assert!(reason.contains("node okm2: its service is DOWN"), "{h}");
    assert!(h.contains("\"outcome\":\"failed\""), "JSON on stdin: {h}");
    std::fs::remove_file(&out).unwrap();

    // The primary's application is down (a failover, not a switchover).
    c.nodes[0].app.stop();
    let cfg = hooks(&[]);
    let before = std::fs::read_to_string(s.state_dirs[1].join("state.json")).unwrap();
    hasync()
        .config(&cfg)
        .args(["promote", "okm2"])
        .run()
        .code(1)
        .stderr_has("not promoting okm2: okm2's last cycle failed (")
        .stderr_has("add --force");
    let unchanged = |what: &str| {
        assert_eq!(
            before,
            std::fs::read_to_string(s.state_dirs[1].join("state.json")).unwrap(),
            "{what}: okm2's record was written"
        );
    };
    unchanged("last cycle failed");
    assert_eq!(hooks_out(), "", "refused before pre_promote");

    // A good cycle, then 3 s: older than --max-age 2s.
    c.nodes[0].app.start();
    hasync().config(&cfg).args(["sync"]).run().code(0);
    assert_eq!(hooks_out(), "", "on_failure after a good cycle");
    c.nodes[0].app.stop();
    std::thread::sleep(Duration::from_secs(3));
    let before = std::fs::read_to_string(s.state_dirs[1].join("state.json")).unwrap();
    let stale = hasync()
        .config(&cfg)
        .args(["promote", "okm2", "--max-age", "2s"])
        .run();
    stale
        .code(1)
        .stderr_has("okm2's last successful cycle was ")
        .stderr_has(", older than --max-age 2s");
    assert_eq!(
        before,
        std::fs::read_to_string(s.state_dirs[1].join("state.json")).unwrap(),
        "older than --max-age: okm2's record was written"
    );
    assert_eq!(hooks_out(), "", "refused before pre_promote");

    // pre_promote says no: nothing changes.
    std::fs::write(&pre_rc, "3").unwrap();
    hasync()
        .config(&cfg)
        .args(["promote", "okm2"])
        .run()
        .code(1)
        .stderr_has("pre_promote refused the promote: hook ")
        .stderr_has("nothing was changed");
    assert_eq!(
        before,
        std::fs::read_to_string(s.state_dirs[1].join("state.json")).unwrap(),
        "pre_promote failed: okm2's record was written"
    );
    let h = hooks_out();
    assert!(h.contains("--- pre\n"), "{h}");
    assert!(
        !h.contains("--- post"),
        "post_promote after an aborted promote: {h}"
    );
    std::fs::remove_file(&out).unwrap();

    // pre_promote says yes: the promote runs, post_promote after it.
    std::fs::write(&pre_rc, "0").unwrap();
    hasync()
        .config(&cfg)
        .args(["promote", "okm2"])
        .run()
        .code(0)
        .stderr_has("okm2 is the primary now (epoch 2)");
    let h = hooks_out();
    let (pre_part, post_part) = h
        .split_once("--- post\n")
        .unwrap_or_else(|| panic!("post_promote did not run: {h}"));
    assert!(pre_part.starts_with("--- pre\n"), "{h}");
    for part in [pre_part, post_part] {
        assert!(part.contains("HASYNC_NODE=okm2\n"), "{h}");
        assert!(part.contains("HASYNC_EPOCH=2\n"), "{h}");
        assert!(part.contains("\"node\":\"okm2\""), "{h}");
    }
    assert!(
        pre_part.contains("okm2 record: \"role\": \"standby\""),
        "pre_promote runs before the record changes: {h}"
    );
    assert!(
        post_part.contains("okm2 record: \"role\": \"primary\""),
        "post_promote runs after: {h}"
    );
    assert_eq!(record(&s, 1)["role"], "primary");
}

/// README: "`hasync sync --json`: the report as JSON (outcome, outage,
/// phases, files, databases)", and `sync --db-only --json`: on stdout,
/// nothing else there, with what was copied: the numbers match what the
/// mirror holds.
#[test]
fn sync_json_and_db_only_json_reports() {
    let db = "okmdb_claims_json";
    let s = cycle_setup("claims-json", db);
    let cfg = s.write();
    let _apps = AppsStopped::start_both();
    let run = hasync().config(&cfg).args(["--json", "sync"]).run();
    run.code(0);
    let v: serde_json::Value = serde_json::from_str(&run.stdout).unwrap_or_else(|e| {
        panic!(
            "sync --json: stdout is not one JSON document ({e}):\n{}",
            run.stdout
        )
    });
    assert_eq!(v["outcome"], "ok", "{v:#}");
    assert_eq!(v["primary"], "okm1", "{v:#}");
    assert_eq!(v["standbys"], serde_json::json!(["okm2"]), "{v:#}");
    let outage = v["outage_secs"].as_f64().expect("outage_secs");
    let secs = v["secs"].as_f64().expect("secs");
    assert!(outage > 0.0 && outage <= secs, "{v:#}");
    assert_eq!(phase_names(&v), crate::cycle::CYCLE_PHASES, "{v:#}");
    // The warm pass created the two files (and their directories); the
    // final pass had nothing left to do.
    let files = v["files"].as_array().expect("files");
    assert_eq!(files.len(), 2, "a warm and a final pass: {v:#}");
    assert_eq!(files[0]["standby"], "okm2");
    assert_eq!(
        files[0]["created"], 4,
        "repository/, logs/ and a file in each: {v:#}"
    );
    assert_eq!(files[0]["bytes"], 4, "b\"a\" + b\"log\": {v:#}");
    assert_eq!(files[1]["created"], 0, "{v:#}");
    let dbs = v["databases"].as_array().expect("databases");
    assert_eq!(dbs.len(), 1, "{v:#}");
    assert_eq!(dbs[0]["to"], "okm2");
    assert_eq!(dbs[0]["database"], db);
    assert_eq!(dbs[0]["tables"], 2, "OKM_CONFIG and doc: {v:#}");
    assert_eq!(
        dbs[0]["rows"], 1,
        "one doc row (OKM_CONFIG is empty on the primary): {v:#}"
    );

    // --db-only --json: a list, one summary per standby.
    crate::db::as_okm(
        Engine::Mysql,
        0,
        db,
        "INSERT INTO doc VALUES (2, 'repository/b.txt');",
    );
    let run = hasync()
        .config(&cfg)
        .args(["--json", "sync", "--db-only"])
        .run();
    run.code(0);
    let v: serde_json::Value = serde_json::from_str(&run.stdout)
        .unwrap_or_else(|e| panic!("--db-only --json: not JSON ({e}):\n{}", run.stdout));
    let list = v.as_array().expect("a list of summaries");
    assert_eq!(list.len(), 1, "{v:#}");
    let d = &list[0];
    assert_eq!(
        (d["from"].as_str(), d["to"].as_str()),
        (Some("okm1"), Some("okm2")),
        "{v:#}"
    );
    assert_eq!(d["engine"], "mysql", "{v:#}");
    assert_eq!(d["database"], db, "{v:#}");
    assert_eq!(d["rows"], 2, "{v:#}");
    assert_eq!(
        d["previous"].as_str(),
        Some(format!("{db}__hasync_old").as_str()),
        "the copy the cycle made is kept: {v:#}"
    );
    assert!(d["bytes"].as_u64().unwrap() > 0, "{v:#}");
    let names: Vec<&str> = d["phases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"dump and load") && names.contains(&"read-only"),
        "{names:?}"
    );
    assert_eq!(
        crate::db::admin(Engine::Mysql, 1, db, "SELECT count(*) FROM doc").trim(),
        "2"
    );
    drop_both(db);
}

/// README, database step 4: MySQL/MariaDB "recreates views, triggers,
/// routines and events, which cannot move between schemas (a failure
/// there moves the tables back)". The mirror holds a copy without views;
/// the primary now has 1,000 views. While hasync creates them in the live
/// database after the `RENAME TABLE`, a session on the mirror takes the
/// last view's name first, so creating it fails: the swap is rolled back,
/// and the live database is what it was before, dump for dump.
#[test]
fn a_failed_mysql_swap_moves_the_tables_back() {
    let e = Engine::Mysql;
    let db = "okmdb_claims_rollback";
    let s = crate::db::setup(e, "claims-rollback", db);
    let cfg = s.write();
    crate::db::fresh_db(e, 0, db);
    drop_dbs(e, 1, db);
    crate::db::as_okm(
        e,
        0,
        db,
        "CREATE TABLE doc (id INT PRIMARY KEY, path VARCHAR(200));\n\
         INSERT INTO doc VALUES (1, 'a');",
    );
    hasync()
        .config(&cfg)
        .args(["sync", "--db-only"])
        .run()
        .code(0);
    let before = crate::db::dump_text(e, 1, db);
    let mut views = String::from("INSERT INTO doc VALUES (2, 'b');\n");
    for i in 0..1000 {
        views += &format!("CREATE VIEW v_{i:04} AS SELECT id FROM doc WHERE id > {i};\n");
    }
    crate::db::as_okm(e, 0, db, &views);
    // The intruder: waits (server-side, no round trip) for the first new
    // view in the live database, then creates the last one itself.
    let intruder_sql = format!(
        "DELIMITER //\n\
         BEGIN NOT ATOMIC\n\
           DECLARE n INT DEFAULT 0;\n\
           WHILE n < 60000 AND NOT EXISTS (SELECT 1 FROM information_schema.VIEWS \
             WHERE TABLE_SCHEMA = '{db}' AND TABLE_NAME = 'v_0000') DO\n\
             DO SLEEP(0.002); SET n = n + 1;\n\
           END WHILE;\n\
           CREATE VIEW `{db}`.`v_0999` AS SELECT 1 AS intruder;\n\
           SELECT 'intruded';\n\
         END//\n"
    );
    let mut cmd = cluster().nodes[1].mariadb.admin_client();
    cmd.arg("--database=mysql")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut intruder = cmd.spawn().unwrap();
    {
        use std::io::Write;
        let mut stdin = intruder.stdin.take().unwrap();
        stdin.write_all(intruder_sql.as_bytes()).unwrap();
    }
    let run = hasync().config(&cfg).args(["sync", "--db-only"]).run();
    let intruded = intruder.wait_with_output().unwrap();
    let said = String::from_utf8_lossy(&intruded.stdout).into_owned()
        + &String::from_utf8_lossy(&intruded.stderr);
    assert!(
        said.contains("intruded"),
        "the intruder did not get in: {said}{}",
        run.stderr
    );
    run.code(1)
        .stderr_has("creating view v_0999")
        .stderr_has(&format!("the swap was rolled back, {db} is as before"));
    assert_eq!(
        crate::db::admin(e, 1, db, "SELECT count(*) FROM doc").trim(),
        "1",
        "the live database has its own rows again"
    );
    crate::db::assert_same_dump(
        &before,
        &crate::db::dump_text(e, 1, db),
        "the mirror after the rolled-back swap",
    );
    drop_both(db);
}

/// `[database] early_restart = true` keeps the copy consistent: the
/// primary's application runs again (and writes) from the dump's snapshot
/// on, so what it writes then is in neither the files nor the dump; every
/// row the mirror gets has its file there. Six cycles back to back while
/// okm1's application adds a document (file, then row) every 20 ms; after
/// each: ok, the primary was started early, the mirror's rows grew, and no
/// row lacks its file on the mirror.
#[test]
fn early_restart_cycles_leave_no_row_without_its_file() {
    let db = "okmdb_claims_early_soak";
    let s = cycle_setup("claims-early-soak", db);
    let cfg = write_config(&s, &[("database", "early_restart", Some("true".into()))]);
    let c = cluster();
    c.nodes[0].app.configure(&crate::harness::app::AppConfig {
        root: Some(s.roots[0].clone()),
        database: Some(("mysql", c.nodes[0].mariadb.port, db.to_string())),
        write_every: Some(Duration::from_millis(20)),
    });
    let _apps = AppsStopped::start_both();
    let mirror_rows = || -> Vec<(u64, String)> {
        crate::db::admin(Engine::Mysql, 1, db, "SELECT id, path FROM doc ORDER BY id")
            .lines()
            .filter_map(|l| l.split_once('\t'))
            .map(|(id, p)| (id.trim().parse().unwrap(), p.trim().to_string()))
            .collect()
    };
    wait_until("okm1's first document", Duration::from_secs(20), || {
        crate::db::admin(Engine::Mysql, 0, db, "SELECT count(*) FROM doc").trim() != "1"
    });
    let mut last = 0;
    for i in 1..=6 {
        let run = hasync().config(&cfg).args(["--no-progress", "sync"]).run();
        run.code(0).stderr_has("starting the primary early");
        assert!(
            c.nodes[0].app.is_running() && c.nodes[1].app.is_running(),
            "cycle {i}"
        );
        let rows = mirror_rows();
        let missing: Vec<String> = rows
            .iter()
            .filter(|(_, p)| !s.roots[1].join(p).is_file())
            .map(|(id, p)| format!("row {id}: {p}"))
            .collect();
        assert!(
            missing.is_empty(),
            "cycle {i}: {} of {} rows on the mirror lack their file: {}",
            missing.len(),
            rows.len(),
            missing.join(", ")
        );
        assert!(
            rows.len() > last,
            "cycle {i}: {} rows, {last} before",
            rows.len()
        );
        last = rows.len();
    }
    println!("early_restart soak: 6 cycles, {last} rows on the mirror, each with its file");
    drop_both(db);
}

/// okm2's host key's SHA256 fingerprint, as `ssh-keygen -l` prints it.
fn okm2_fingerprint(s: &Setup) -> String {
    let pubfile = s.dir.join("okm2-host-key.pub");
    std::fs::write(
        &pubfile,
        format!("{}\n", cluster().node("okm2").sshd.host_key_pub),
    )
    .unwrap();
    let out = std::process::Command::new("ssh-keygen")
        .args(["-l", "-E", "sha256", "-f"])
        .arg(&pubfile)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let fp = text
        .split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .to_string();
    assert!(fp.starts_with("SHA256:"), "ssh-keygen -l: {text}");
    fp
}

/// FAULTS.md #8, the messages it quotes: an unknown standby host key
/// names the fingerprint the server presents and the `ssh-keyscan` line
/// that trusts it; a changed one says WARNING ... has CHANGED, the new
/// fingerprint and the `ssh-keygen -R` that removes the old key. Both
/// before anything is stopped.
#[test]
fn host_key_refusals_quote_fingerprint_and_fix() {
    let s = Setup::new("claims-host-keys");
    let (okm1, okm2) = (cluster().node("okm1"), cluster().node("okm2"));
    let fp = okm2_fingerprint(&s);
    let kh = s.dir.join("known_hosts");
    let kh_q = || toml_str(&kh.display().to_string());

    std::fs::write(&kh, okm1.sshd.known_hosts_line() + "\n").unwrap();
    let cfg = write_config(&s, &[("nodes.okm2", "known_hosts", kh_q())]);
    hasync()
        .config(&cfg)
        .args(["sync"])
        .run()
        .code(1)
        .stderr_has(&format!(
            "node okm2: the SSH host key of {}:{} is not trusted: it is not in {}",
            okm2.ip,
            okm2.sshd.port,
            kh.display()
        ))
        .stderr_has(&format!("The server presents ssh-ed25519 {fp}"))
        .stderr_has(&format!(
            "ssh-keyscan -p {} -t ed25519 {} >> {}",
            okm2.sshd.port,
            okm2.ip,
            kh.display()
        ))
        .stderr_has("nothing was stopped");

    // okm2's address with okm1's key: what a reinstalled okm2 looks like.
    let forged = format!(
        "[{}]:{} {}\n",
        okm2.ip, okm2.sshd.port, okm1.sshd.host_key_pub
    );
    std::fs::write(&kh, forged).unwrap();
    hasync()
        .config(&cfg)
        .args(["sync"])
        .run()
        .code(1)
        .stderr_has(&format!(
            "WARNING: the SSH host key of node okm2 ({}:{}) has CHANGED: the server now presents ssh-ed25519 {fp}",
            okm2.ip, okm2.sshd.port
        ))
        .stderr_has(&format!(
            "ssh-keygen -R '[{}]:{}' -f {}",
            okm2.ip,
            okm2.sshd.port,
            kh.display()
        ))
        .stderr_has("nothing was stopped");
    assert!(!s.state_dirs[1].exists(), "okm2's state dir appeared");
}

/// FAULTS.md #4, the message it quotes: the primary's database down at
/// preflight names the node, the engine, the address as seen from the node
/// and what to check; nothing is stopped.
#[test]
fn primary_database_down_at_preflight_names_server_and_fix() {
    let db = "okmdb_claims_predown";
    let s = cycle_setup("claims-db-down", db);
    let cfg = s.write();
    let primary_db = &cluster().nodes[0].mariadb;
    let _apps = AppsStopped::start_both();
    let pids: Vec<_> = cluster().nodes.iter().map(|n| n.app.pid()).collect();
    primary_db.stop();
    let server_back = Restart(|| primary_db.start());
    let run = hasync().config(&cfg).args(["sync"]).run();
    drop(server_back);
    run.code(1)
        .stderr_has(&format!(
            "cycle failed: preflight: node okm1: cannot talk to mysql at 127.0.0.1:{} as seen from the node (",
            primary_db.port
        ))
        .stderr_has("); is the server running and listening there?")
        .stderr_has("nothing was stopped");
    let after: Vec<_> = cluster().nodes.iter().map(|n| n.app.pid()).collect();
    assert_eq!(pids, after, "an application was stopped");
    drop_both(db);
}
