//! The fault suite, data side (issue 7, items 8, 12 and 13): whole cycles
//! refused at the SSH door with nothing done, files that change while the
//! primary reads them, mtimes in the future, and a soak of back-to-back
//! cycles against a writing application whose every replicated row must
//! find its file on the mirror.

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crate::bench_cycle::{check_copy, client_cnf, rows, Writer};
use crate::cmd::hasync;
use crate::cycle::{cycle_setup, record, AppsStopped};
use crate::db::{as_okm, databases, drop_dbs, fresh_db, wait_until, Engine};
use crate::harness::{self, cluster};
use crate::setup::{edit_toml, quoted, Setup};
use crate::sync::{assert_same_tree, files_only, set_mtime, write};

// ---------------------------------------------------------------------------
// Item 8: unknown host key, changed host key, wrong identity
// ---------------------------------------------------------------------------

/// A full `hasync sync` whose config is `edits` away from a working one must
/// be refused before anything happens: exit 1, a message naming okm2 and
/// `advice`, both applications still running with the same pids, the
/// mirror's root, databases and state dir untouched, the primary's too.
fn cycle_refused_at_the_door(label: &str, edits: impl FnOnce(&Setup) -> Vec<Edit>, advice: &str) {
    let db = &format!("okmdb_{}", label.replace('-', "_"));
    let s = cycle_setup(label, db);
    let cfg = s.dir.join("hasync.toml");
    std::fs::write(&cfg, edit_toml(&s.config_text(), &edits(&s))).unwrap();
    let c = cluster();
    let _apps = AppsStopped;
    c.nodes[0].app.start();
    c.nodes[1].app.start();
    let pids = (c.nodes[0].app.pid(), c.nodes[1].app.pid());
    assert!(pids.0.is_some() && pids.1.is_some(), "both apps run");
    let primary_before = crate::sync::snapshot(&s.roots[0]);

    let run = hasync().config(&cfg).args(["sync"]).run();
    run.code(1)
        .stderr_has("node okm2")
        .stderr_has(advice)
        .stderr_has("nothing was stopped")
        .stderr_lacks("BEGIN warm file pass");

    assert_eq!(
        pids,
        (c.nodes[0].app.pid(), c.nodes[1].app.pid()),
        "an application was stopped or restarted"
    );
    assert_eq!(
        std::fs::read_dir(&s.roots[1]).unwrap().count(),
        0,
        "the mirror's root was written"
    );
    assert!(
        databases(Engine::Mysql, 1, db).is_empty(),
        "a database appeared on the mirror"
    );
    assert!(!s.state_dirs[1].exists(), "the mirror's state dir appeared");
    assert_eq!(primary_before, crate::sync::snapshot(&s.roots[0]));
    drop_dbs(Engine::Mysql, 0, db);
}

type Edit = (&'static str, &'static str, Option<String>);

/// A known_hosts file in the test's dir with `lines`.
fn known_hosts(s: &Setup, lines: &[String]) -> Option<String> {
    let kh = s.dir.join("known_hosts");
    std::fs::write(&kh, lines.join("\n") + "\n").unwrap();
    quoted(&kh)
}

#[test]
fn a_cycle_with_an_unknown_standby_host_key_does_nothing() {
    cycle_refused_at_the_door(
        "faults-unknown-key",
        |s| {
            let okm1 = cluster().node("okm1").sshd.known_hosts_line();
            vec![("nodes.okm2", "known_hosts", known_hosts(s, &[okm1]))]
        },
        "is not trusted",
    );
}

#[test]
fn a_cycle_with_a_changed_standby_host_key_does_nothing() {
    cycle_refused_at_the_door(
        "faults-changed-key",
        |s| {
            let (okm1, okm2) = (cluster().node("okm1"), cluster().node("okm2"));
            // okm2's address with okm1's key: what a reinstalled (or
            // impersonated) okm2 looks like.
            let forged = format!(
                "[{}]:{} {}",
                okm2.ip, okm2.sshd.port, okm1.sshd.host_key_pub
            );
            vec![("nodes.okm2", "known_hosts", known_hosts(s, &[forged]))]
        },
        "has CHANGED",
    );
}

#[test]
fn a_cycle_with_a_wrong_identity_for_the_standby_does_nothing() {
    cycle_refused_at_the_door(
        "faults-wrong-identity",
        |s| {
            let key = s.dir.join("id_other");
            let made = harness::sshd::keygen_cmd(&key, "not-authorised")
                .status()
                .unwrap();
            assert!(made.success());
            vec![("nodes.okm2", "identity_file", quoted(&key))]
        },
        "add the public key to ~root/.ssh/authorized_keys",
    );
}

// ---------------------------------------------------------------------------
// Item 12: files changing while the primary reads them; mtimes in the future
// ---------------------------------------------------------------------------

/// Rewrites `rel` in place (same size, a new fill byte each round) and
/// appends to `log_rel`, until told to stop; returns the rounds written.
fn busy_writer(
    root: &Path,
    rel: &str,
    log_rel: &str,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<u64> {
    let (path, log) = (root.join(rel), root.join(log_rel));
    std::thread::spawn(move || {
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        let len = f.metadata().unwrap().len();
        let mut log = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
        let mut round = 0u64;
        while !stop.load(Ordering::Relaxed) {
            round += 1;
            let chunk = vec![round as u8; 1 << 20];
            let mut at = 0;
            while at < len {
                let n = (len - at).min(chunk.len() as u64) as usize;
                f.write_at(&chunk[..n], at).unwrap();
                at += n as u64;
            }
            log.write_all(format!("round {round}\n").as_bytes())
                .unwrap();
        }
        round
    })
}

/// A 32 MiB file rewritten in place and a log appended to, without pause,
/// while `hasync sync --files-only` reads them: the run names the big file
/// as changed while being read, twice, and leaves the mirror's copy from
/// the run before exactly as it was (bytes and mtime: no torn copy is
/// installed, FAULTS #12's "not copied this time"); once the writer stops,
/// the next run makes the mirror equal to the primary, byte for byte and
/// mtime for mtime.
///
/// (Asserting "no copy has the primary's size and mtime with other bytes"
/// instead would prove nothing here: the writer goes on after the run, so
/// the primary's mtime moves past any copy's.)
#[test]
fn files_changing_while_read_are_never_kept_torn() {
    let s = files_only("faults-changing");
    let cfg = s.write();
    let (src, dst) = (&s.roots[0], &s.roots[1]);
    let big = "repository/big.bin";
    let old = vec![0u8; 32 << 20];
    write(src, big, &old);
    write(src, "repository/app.log", b"");
    write(src, "repository/quiet.txt", b"never changes");
    let files_only = || hasync().config(&cfg).args(["sync", "--files-only"]).run();
    files_only().code(0);
    assert_same_tree(src, dst);
    let mtime = |p: &Path| std::fs::metadata(p).unwrap().modified().unwrap();
    let old_mtime = mtime(&dst.join(big));

    let stop = Arc::new(AtomicBool::new(false));
    let writer = busy_writer(src, big, "repository/app.log", stop.clone());
    wait_until("the writer's first rounds", Duration::from_secs(30), || {
        std::fs::metadata(src.join("repository/app.log")).map_or(0, |m| m.len()) > 100
    });
    let busy = files_only();
    stop.store(true, Ordering::Relaxed);
    let rounds = writer.join().unwrap();
    println!("{rounds} rounds written during the run\n{}", busy.stderr);
    busy.code(0);
    // The writer never pauses: the second read is torn too, so the copy
    // from the run before must stay, untouched.
    let copy = std::fs::read(dst.join(big)).unwrap();
    assert!(
        copy == old,
        "{big} on the mirror is not the copy from the run before ({} bytes, {} of them not 0): \
         a torn read was installed\n{}",
        copy.len(),
        copy.iter().filter(|&&b| b != 0).count(),
        busy.stderr
    );
    assert_eq!(
        mtime(&dst.join(big)),
        old_mtime,
        "{big}: the mirror's copy got another mtime"
    );
    let warned = |tail: &str| {
        busy.stderr
            .lines()
            .any(|l| l.contains(&format!("{big}: changed while being read (")) && l.ends_with(tail))
    };
    assert!(
        warned("; reading it again")
            && warned(", again; not copied this time, the next run copies it"),
        "no warnings that {big} changed while read, twice:\n{}",
        busy.stderr
    );
    assert_eq!(
        std::fs::read(dst.join("repository/quiet.txt")).unwrap(),
        b"never changes"
    );
    // The log only grows: whatever copy the mirror has is a prefix of it.
    let (log, log_copy) = (
        std::fs::read(src.join("repository/app.log")).unwrap(),
        std::fs::read(dst.join("repository/app.log")).unwrap(),
    );
    assert!(
        log.starts_with(&log_copy),
        "the mirror's app.log ({} bytes) is no prefix of the primary's ({} bytes)",
        log_copy.len(),
        log.len()
    );

    files_only()
        .code(0)
        .stderr_lacks("changed while being read");
    assert_same_tree(src, dst);
}

/// An mtime in 2100 is carried as it is; when the primary's file then gets
/// other bytes of the same size and an *older* mtime, the next run copies
/// it again (the quick check compares for equality, not "newer").
#[test]
fn mtimes_in_the_future_are_kept_and_compared_for_equality() {
    let s = files_only("faults-future-mtime");
    let cfg = s.write();
    let (src, dst) = (&s.roots[0], &s.roots[1]);
    let rel = "repository/future.txt";
    let year_2100 = SystemTime::UNIX_EPOCH + Duration::from_secs(4_102_444_800);
    write(src, rel, b"written in 2100");
    set_mtime(&src.join(rel), year_2100);
    let files_only = || hasync().config(&cfg).args(["sync", "--files-only"]).run();
    files_only().code(0);
    assert_same_tree(src, dst);
    assert_eq!(
        std::fs::metadata(dst.join(rel))
            .unwrap()
            .modified()
            .unwrap(),
        year_2100
    );

    write(src, rel, b"WRITTEN IN 2001");
    set_mtime(
        &src.join(rel),
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000),
    );
    files_only().code(0);
    assert_same_tree(src, dst);
    assert_eq!(
        std::fs::read(dst.join(rel)).unwrap(),
        b"WRITTEN IN 2001".to_vec()
    );
}

/// A file that appears and disappears without pause while runs copy it
/// (scanned, then gone when read; or the other way round): every run ends,
/// by itself, within the time limit, and once it stops flickering the
/// mirror equals the primary.
#[test]
fn a_file_vanishing_between_scan_and_read_never_hangs_a_run() {
    let s = files_only("faults-vanishing");
    let cfg = s.write();
    let (src, dst) = (s.roots[0].clone(), &s.roots[1]);
    write(&src, "repository/steady.txt", b"steady");
    let stop = Arc::new(AtomicBool::new(false));
    let stop1 = stop.clone();
    let flicker = src.join("repository/flicker.txt");
    let toggler = std::thread::spawn(move || {
        let mut toggles = 0u64;
        while !stop1.load(Ordering::Relaxed) {
            std::fs::write(&flicker, b"now you see me").unwrap();
            std::fs::remove_file(&flicker).unwrap();
            toggles += 1;
        }
        toggles
    });
    // At least 12 runs, and on until one saw the file vanish (the case of
    // the hang), at most 60.
    let (mut runs, mut vanished) = (0u32, 0u32);
    while runs < 12 || (vanished == 0 && runs < 60) {
        runs += 1;
        let mut running = hasync().config(&cfg).args(["sync", "--files-only"]).spawn();
        let t0 = std::time::Instant::now();
        while running.child.try_wait().unwrap().is_none() {
            if t0.elapsed() > Duration::from_secs(30) {
                let _ = running.child.kill();
                stop.store(true, Ordering::Relaxed);
                panic!("hasync sync --files-only hangs:\n{}", running.wait().stderr);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let run = running.wait();
        // A file gone before it could be read is a warning, as with rsync,
        // not a failure of the run.
        run.code(0);
        vanished += run
            .stderr
            .contains("repository/flicker.txt: vanished before it could be read")
            as u32;
    }
    stop.store(true, Ordering::Relaxed);
    let toggles = toggler.join().unwrap();
    println!("{toggles} toggles; {vanished} of {runs} runs saw the file vanish");
    assert!(
        vanished > 0,
        "none of {runs} runs saw flicker.txt vanish between scan and read ({toggles} toggles): \
         the hang this test is for was not exercised"
    );
    hasync()
        .config(&cfg)
        .args(["sync", "--files-only"])
        .run()
        .code(0);
    assert_same_tree(&src, dst);
}

// ---------------------------------------------------------------------------
// Item 13: soak, back-to-back cycles against a writing application
// ---------------------------------------------------------------------------

/// `cycles` full cycles (files and MariaDB) back to back, the primary's
/// application being `bench_cycle`'s writer: every 20 ms a new file under
/// `repository/docs/`, then its row `(id, path, sha256)`. The cycle stops
/// and restarts it like any service. After every cycle: it ended ok, both
/// applications run again, the mirror's database has more rows than after
/// the cycle before, and every row it has finds its file on the mirror with
/// that sha256 (and equals the primary's row).
fn soak(label: &str, cycles: u32) {
    const DB: &str = "okmdb_soak";
    let c = cluster();
    let mut s = Setup::exclusive(label);
    s.db_name = DB.into();
    fresh_db(Engine::Mysql, 0, DB);
    drop_dbs(Engine::Mysql, 1, DB);
    as_okm(
        Engine::Mysql,
        0,
        DB,
        "CREATE TABLE docs (id INT PRIMARY KEY, path VARCHAR(255), sha256 CHAR(64), at TIMESTAMP(3))",
    );
    let cnf = client_cnf(&s.dir.join("okm1-client.cnf"), c.nodes[0].mariadb.port);
    let writer = Writer::setup(&s.dir.join("writer"), &s.roots[0], &cnf, DB);
    let q = |v: String| Some(format!("{v:?}"));
    let cfg = s.dir.join("hasync.toml");
    std::fs::write(
        &cfg,
        edit_toml(
            &s.config_text(),
            &[
                ("nodes.okm1", "address", q("local".into())),
                ("nodes.okm1.service", "start", q(writer.cmd("start"))),
                ("nodes.okm1.service", "stop", q(writer.cmd("stop"))),
                ("nodes.okm1.service", "status", q(writer.cmd("status"))),
                // The writer is okm1's application here; it serves no HTTP.
                ("nodes.okm1.service", "health_url", None),
            ],
        ),
    )
    .unwrap();
    let _apps = AppsStopped;
    c.nodes[1].app.start();
    assert_eq!(writer.run("start"), Some(0), "writer.sh start");
    wait_until("the writer's first write", Duration::from_secs(10), || {
        !writer.writes().is_empty()
    });

    let t0 = Instant::now();
    let mut last_rows = 0;
    for i in 1..=cycles {
        let run = hasync().config(&cfg).args(["--no-progress", "sync"]).run();
        run.code(0);
        assert_eq!(
            writer.run("status"),
            Some(0),
            "cycle {i}: the writer runs again"
        );
        assert!(
            c.nodes[1].app.is_running(),
            "cycle {i}: okm2's app runs again"
        );
        assert_eq!(record(&s, 1)["last_cycle"]["outcome"], "ok", "cycle {i}");
        let (line, problems) = check_copy(&format!("cycle {i}"), DB, &s.roots[1], &rows(0, DB));
        assert!(problems.is_empty(), "{}", problems.join("\n"));
        let n = rows(1, DB).len();
        assert!(
            n > last_rows,
            "cycle {i}: the mirror has {n} rows, {last_rows} before: the writer did not write"
        );
        last_rows = n;
        if i % 10 == 0 || i == cycles {
            println!("{line} ({:.1} s so far)", t0.elapsed().as_secs_f64());
        }
    }
    let total = t0.elapsed().as_secs_f64();
    println!(
        "soak: {cycles} cycles in {total:.1} s, {:.2} s per cycle; {last_rows} rows on the mirror",
        total / f64::from(cycles)
    );
    assert_eq!(writer.run("stop"), Some(0), "writer.sh stop");
    let wout = std::fs::read_to_string(&writer.out).unwrap_or_default();
    assert!(
        !wout.contains("ERROR"),
        "the writer's client failed:\n{wout}"
    );
    drop_dbs(Engine::Mysql, 0, DB);
    drop_dbs(Engine::Mysql, 1, DB);
}

/// Ten cycles: part of every `cargo test`.
#[test]
fn soak_10_cycles_with_a_writing_application() {
    soak("faults-soak-10", 10);
}

/// The full soak, `HASYNC_SOAK_CYCLES` cycles (default 100). Ignored: in a
/// debug build a cycle (with its check) takes 4.3 to 5.6 s, 100 of them
/// 9.3 min (558 s, 20,119 rows checked on the mirror at the end):
///
/// ```text
/// cargo test --test it soak_many_cycles -- --ignored --nocapture
/// ```
#[test]
#[ignore = "soak: cargo test --test it soak_many_cycles -- --ignored --nocapture"]
fn soak_many_cycles_with_a_writing_application() {
    let cycles = std::env::var("HASYNC_SOAK_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    soak("faults-soak", cycles);
}
