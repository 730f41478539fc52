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
use std::time::{Duration, SystemTime};

use crate::cmd::hasync;
use crate::cycle::{cycle_setup, AppsStopped};
use crate::db::{databases, drop_dbs, wait_until, Engine};
use crate::harness::{self, cluster};
use crate::setup::{edit_toml, quoted, Setup};
use crate::sync::{assert_same_tree, files_only, set_mtime, snapshot, write, Node as SyncNode};

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

/// Every file on the mirror that the next run's quick check (size and
/// mtime equal) would take for current must really be: the same bytes as
/// the primary's. A torn copy may exist only if it looks different.
#[track_caller]
fn no_copy_passes_for_current_unless_it_is(primary: &Path, mirror: &Path) {
    let (p, m) = (snapshot(primary), snapshot(mirror));
    for (path, copy) in &m {
        let (
            Some(SyncNode::File {
                mtime, content: c1, ..
            }),
            SyncNode::File {
                mtime: copy_mtime,
                content: c2,
                ..
            },
        ) = (p.get(path), copy)
        else {
            continue;
        };
        if mtime == copy_mtime && c1.len() == c2.len() {
            assert!(
                c1 == c2,
                "{path}: the mirror's copy has the primary's size and mtime but other bytes: \
                 the next run would keep a torn copy"
            );
        }
    }
}

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
/// while `hasync sync --files-only` reads them: the run names them as
/// changed while being read and no torn copy passes for current; once the
/// writer stops, the next run makes the mirror equal to the primary, byte
/// for byte and mtime for mtime.
#[test]
fn files_changing_while_read_are_never_kept_torn() {
    let s = files_only("faults-changing");
    let cfg = s.write();
    let (src, dst) = (&s.roots[0], &s.roots[1]);
    write(src, "repository/big.bin", &vec![0u8; 32 << 20]);
    write(src, "repository/app.log", b"");
    write(src, "repository/quiet.txt", b"never changes");
    let stop = Arc::new(AtomicBool::new(false));
    let writer = busy_writer(
        src,
        "repository/big.bin",
        "repository/app.log",
        stop.clone(),
    );
    wait_until("the writer's first rounds", Duration::from_secs(30), || {
        std::fs::metadata(src.join("repository/app.log")).map_or(0, |m| m.len()) > 100
    });

    let busy = hasync().config(&cfg).args(["sync", "--files-only"]).run();
    stop.store(true, Ordering::Relaxed);
    let rounds = writer.join().unwrap();
    println!("{rounds} rounds written during the run\n{}", busy.stderr);
    busy.code(0)
        .stderr_has("repository/big.bin: changed while being read");
    assert_eq!(
        std::fs::read(dst.join("repository/quiet.txt")).unwrap(),
        b"never changes"
    );
    no_copy_passes_for_current_unless_it_is(src, dst);

    hasync()
        .config(&cfg)
        .args(["sync", "--files-only"])
        .run()
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
    let mut vanished = 0;
    for _ in 0..12 {
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
        vanished += run.stderr.contains("repository/flicker.txt: vanished") as u32;
    }
    stop.store(true, Ordering::Relaxed);
    let toggles = toggler.join().unwrap();
    println!("{toggles} toggles; {vanished} of 12 runs saw the file vanish");
    hasync()
        .config(&cfg)
        .args(["sync", "--files-only"])
        .run()
        .code(0);
    assert_same_tree(&src, dst);
}
