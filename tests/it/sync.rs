//! `hasync sync --files-only` over real sshd: the standby's tree must become
//! an exact mirror of the primary's (minus exclusions), the dry run must
//! show exactly what the run then does, and the agent must refuse paths
//! that escape its root.

use std::collections::BTreeMap;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::Path;

use crate::cmd::hasync;
use crate::setup::Setup;

/// Everything rsync -a would carry, per relative path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    File {
        mode: u32,
        mtime: (i64, i64),
        owner: (u32, u32),
        content: Vec<u8>,
    },
    Dir {
        mode: u32,
        mtime: (i64, i64),
        owner: (u32, u32),
    },
    Link {
        target: String,
        owner: (u32, u32),
    },
}

pub fn snapshot(root: &Path) -> BTreeMap<String, Node> {
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Node>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let p = e.path();
        let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
        let node = node_of(&p);
        if matches!(node, Node::Dir { .. }) {
            walk(root, &p, out);
        }
        out.insert(rel, node);
    }
}

fn node_of(p: &Path) -> Node {
    let m = std::fs::symlink_metadata(p).unwrap();
    if m.file_type().is_symlink() {
        Node::Link {
            target: std::fs::read_link(p)
                .unwrap()
                .to_string_lossy()
                .into_owned(),
            owner: (m.uid(), m.gid()),
        }
    } else if m.is_dir() {
        Node::Dir {
            mode: m.mode() & 0o7777,
            mtime: (m.mtime(), m.mtime_nsec()),
            owner: (m.uid(), m.gid()),
        }
    } else {
        Node::File {
            mode: m.mode() & 0o7777,
            mtime: (m.mtime(), m.mtime_nsec()),
            owner: (m.uid(), m.gid()),
            content: std::fs::read(p).unwrap(),
        }
    }
}

/// [`snapshot`] with the root itself as `./`, whose mode, owner and mtime
/// are replicated like any directory's (as `rsync -a src/ dst/` does).
pub fn snapshot_with_root(root: &Path) -> BTreeMap<String, Node> {
    let mut out = snapshot(root);
    out.insert("./".into(), node_of(root));
    out
}

/// Assert two trees are equal, the roots' own attributes included, showing
/// the first differences.
#[track_caller]
pub fn assert_same_tree(a: &Path, b: &Path) {
    assert_same_snapshot(a, b, snapshot_with_root(a), snapshot_with_root(b));
}

/// [`assert_same_tree`] of two snapshots taken of `a` and `b`.
#[track_caller]
pub fn assert_same_snapshot(
    a: &Path,
    b: &Path,
    sa: BTreeMap<String, Node>,
    sb: BTreeMap<String, Node>,
) {
    if sa != sb {
        let mut diffs = Vec::new();
        for (k, v) in &sa {
            match sb.get(k) {
                None => diffs.push(format!("only in {}: {k}", a.display())),
                Some(w) if w != v => {
                    diffs.push(format!("differs: {k}: {} vs {}", short(v), short(w)))
                }
                _ => {}
            }
        }
        for k in sb.keys().filter(|k| !sa.contains_key(*k)) {
            diffs.push(format!("only in {}: {k}", b.display()));
        }
        diffs.truncate(20);
        panic!("trees differ:\n{}", diffs.join("\n"));
    }
}

fn short(n: &Node) -> String {
    match n {
        Node::File {
            mode,
            mtime,
            owner,
            content,
        } => format!("file {mode:o} {owner:?} {mtime:?} {} bytes", content.len()),
        Node::Dir { mode, mtime, owner } => format!("dir {mode:o} {owner:?} {mtime:?}"),
        Node::Link { target, owner } => format!("link -> {target} {owner:?}"),
    }
}

pub fn write(root: &Path, rel: &str, content: &[u8]) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, content).unwrap();
}

/// Set a regular file's mtime.
pub fn set_mtime(path: &Path, t: std::time::SystemTime) {
    std::fs::File::options()
        .write(true)
        .open(path)
        .and_then(|f| f.set_modified(t))
        .unwrap_or_else(|e| panic!("set mtime of {}: {e}", path.display()));
}

/// Set a file's mtime in the past so size+mtime detection sees a change.
pub fn age(root: &Path, rel: &str, secs_ago: u64) {
    let t = std::time::SystemTime::now() - std::time::Duration::from_secs(secs_ago);
    set_mtime(&root.join(rel), t);
}

fn sync(config: &Path, extra: &[&str]) -> crate::cmd::Run {
    let mut args = vec!["sync", "--files-only"];
    args.extend_from_slice(extra);
    hasync().config(config).args(args).run()
}

pub fn files_only(label: &str) -> Setup {
    let mut s = Setup::new(label);
    s.engine = None;
    s
}

#[test]
fn mirror_follows_every_kind_of_change() {
    let s = files_only("sync-mirror");
    let cfg = s.write();
    let (src, dst) = (&s.roots[0], &s.roots[1]);
    write(src, "a.txt", b"hello");
    write(src, "dir/b.bin", &vec![7u8; 300_000]);
    write(src, "dir/sub/c.txt", b"deep");
    write(src, "with space/ünïcødé 名前.txt", b"unicode");
    std::fs::create_dir_all(src.join("empty/dir")).unwrap();
    symlink("dir/b.bin", src.join("link")).unwrap();
    symlink("/nonexistent/target", src.join("dangling")).unwrap();
    std::fs::set_permissions(src.join("a.txt"), std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::set_permissions(src.join("dir/sub"), std::fs::Permissions::from_mode(0o750)).unwrap();
    // Owners are carried when both sides run as root (the tests do).
    std::os::unix::fs::chown(src.join("dir/b.bin"), Some(1234), Some(5678)).unwrap();
    std::os::unix::fs::lchown(src.join("link"), Some(4321), Some(8765)).unwrap();
    // Something on the standby the primary does not have.
    write(dst, "stale/old.txt", b"old");
    sync(&cfg, &[]).code(0);
    assert_same_tree(src, dst);

    // Modify (same size, other content and mtime), append, delete, rename,
    // mode change, retarget a link, file -> dir, dir -> file.
    write(src, "a.txt", b"HELLO");
    age(src, "a.txt", 100);
    let mut big = std::fs::read(src.join("dir/b.bin")).unwrap();
    big.extend_from_slice(b"appended");
    big[1000] = 1;
    write(src, "dir/b.bin", &big);
    std::fs::remove_file(src.join("dir/sub/c.txt")).unwrap();
    std::fs::rename(src.join("with space"), src.join("renamed dir")).unwrap();
    std::fs::set_permissions(
        src.join("renamed dir/ünïcødé 名前.txt"),
        std::fs::Permissions::from_mode(0o640),
    )
    .unwrap();
    std::fs::remove_file(src.join("link")).unwrap();
    symlink("a.txt", src.join("link")).unwrap();
    std::fs::remove_dir_all(src.join("empty")).unwrap();
    write(src, "empty", b"now a file");
    std::fs::remove_file(src.join("dangling")).unwrap();
    write(src, "dangling/inside.txt", b"now a dir");
    let r = sync(&cfg, &[]);
    r.code(0);
    assert_same_tree(src, dst);
    // Nothing left behind: no temp files on the standby.
    assert!(
        !snapshot(dst).keys().any(|k| k.contains(".hasync-")),
        "temp files left: {:?}",
        snapshot(dst).keys()
    );

    // A second run finds nothing to do.
    let r = sync(&cfg, &["--dry-run"]);
    r.code(0)
        .stdout_has("would create 0 (0 B), update 0 (0 B), change attributes of 0, delete 0 (0 B)");
}

#[test]
fn dry_run_changes_nothing_and_matches_the_run() {
    dry_run_matches_run(files_only("sync-dry-run"));
}

/// The same over the built-in libssh2 client instead of OpenSSH's `ssh`.
#[test]
fn dry_run_matches_run_over_libssh2() {
    let mut s = files_only("sync-dry-run-libssh2");
    s.ssh_client = Some("libssh2");
    dry_run_matches_run(s);
}

fn dry_run_matches_run(s: Setup) {
    let cfg = s.write();
    let (src, dst) = (&s.roots[0], &s.roots[1]);
    for i in 0..20 {
        write(
            src,
            &format!("d{}/f{i}.txt", i % 3),
            format!("file {i}").as_bytes(),
        );
    }
    write(dst, "d0/f0.txt", b"older content");
    age(dst, "d0/f0.txt", 1000);
    write(dst, "gone.txt", b"delete me");
    let before = snapshot(dst);
    let dry = hasync()
        .config(&cfg)
        .args(["sync", "--files-only", "--dry-run", "--json"])
        .run();
    dry.code(0);
    assert_eq!(snapshot(dst), before, "the dry run changed the standby");
    let dv: serde_json::Value = serde_json::from_str(&dry.stdout).unwrap();
    // The itemized text form names each path, one line per action, then
    // the totals and the dry run's last line.
    let text = hasync()
        .config(&cfg)
        .args(["sync", "--files-only", "--dry-run"])
        .run();
    text.code(0).stdout_has("dry run: nothing was changed");
    assert_eq!(snapshot(dst), before, "the dry run changed the standby");
    let actions = dv[0]["actions"].as_array().unwrap();
    let lines: Vec<&str> = text.stdout.lines().collect();
    assert_eq!(
        lines.len(),
        actions.len() + 2,
        "not one line per action:\n{}",
        text.stdout
    );
    // rsync's itemized lines: 11 flag characters, then the path and maybe
    // a "/", " (size)" or " -> target".
    let names = |l: &str, path: &str| {
        let rest = l.get(11..).unwrap_or("").trim_start();
        rest.strip_prefix(path)
            .is_some_and(|r| r.is_empty() || r.starts_with(' ') || r.starts_with('/'))
    };
    for a in actions {
        let path = a["path"].as_str().unwrap();
        assert!(
            lines.iter().any(|l| names(l, path)),
            "the itemized dry run does not name {path}:\n{}",
            text.stdout
        );
    }
    let real = hasync()
        .config(&cfg)
        .args(["sync", "--files-only", "--json"])
        .run();
    real.code(0);
    let rv: serde_json::Value = serde_json::from_str(&real.stdout).unwrap();
    assert_eq!(
        dv[0]["actions"], rv[0]["actions"],
        "the run did something other than the dry run said"
    );
    let ops: Vec<&str> = dv[0]["actions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["op"].as_str().unwrap())
        .collect();
    assert!(
        ops.contains(&"create") && ops.contains(&"update") && ops.contains(&"delete"),
        "{ops:?}"
    );
    assert_same_tree(src, dst);
}

#[test]
fn excluded_paths_are_neither_sent_nor_deleted() {
    let mut s = files_only("sync-exclude");
    s.excludes = vec![
        "/repository/.system.key".into(),
        "/logs/".into(),
        "*.tmp".into(),
    ];
    let cfg = s.write();
    let (src, dst) = (&s.roots[0], &s.roots[1]);
    write(src, "repository/.system.key", b"primary key");
    write(src, "repository/docs/a.pdf", b"pdf");
    write(src, "logs/catalina.out", b"primary log");
    write(src, "x/logs/kept.txt", b"not anchored: kept");
    write(src, "x/y.tmp", b"tmp");
    write(dst, "repository/.system.key", b"standby key");
    write(dst, "logs/catalina.out", b"standby log");
    write(dst, "z.tmp", b"standby tmp");
    sync(&cfg, &[]).code(0);
    let snap = snapshot(dst);
    assert_eq!(
        std::fs::read(dst.join("repository/.system.key")).unwrap(),
        b"standby key"
    );
    assert_eq!(
        std::fs::read(dst.join("logs/catalina.out")).unwrap(),
        b"standby log"
    );
    assert!(snap.contains_key("z.tmp") && !snap.contains_key("x/y.tmp"));
    assert_eq!(
        std::fs::read(dst.join("x/logs/kept.txt")).unwrap(),
        b"not anchored: kept"
    );
    assert_eq!(
        std::fs::read(dst.join("repository/docs/a.pdf")).unwrap(),
        b"pdf"
    );
}

#[test]
fn max_delete_stops_before_deleting_anything() {
    let mut s = files_only("sync-max-delete");
    s.max_delete = Some(3);
    let cfg = s.write();
    let dst = &s.roots[1];
    for i in 0..5 {
        write(dst, &format!("f{i}"), b"x");
    }
    write(&s.roots[0], "new", b"new");
    let r = sync(&cfg, &[]);
    r.code(1)
        .stderr_has("refusing to delete 5 paths")
        .stderr_has("max_delete");
    assert_eq!(snapshot(dst).len(), 5, "something was deleted or created");
    sync(&cfg, &["--max-delete", "5"]).code(0);
    assert_same_tree(&s.roots[0], dst);
}

/// The same trees and patterns through real rsync (over OpenSSH, to the
/// same sshd) and through hasync give identical standby trees.
#[test]
fn same_result_as_rsync() {
    let c = crate::harness::cluster();
    let mut s = files_only("sync-vs-rsync");
    let excludes = [
        "/repository/.system.key",
        "/logs/",
        "*.tmp",
        "cache/",
        "/a/*/c",
        "deep/**/x",
    ];
    s.excludes = excludes.iter().map(|e| e.to_string()).collect();
    let by_rsync = s.dir.join("by-rsync");
    let src = s.roots[0].clone();
    // The tree: OpenKM-like, plus names that exercise each pattern.
    write(&src, "repository/.system.key", b"k");
    write(&src, "repository/store/ab/cd/doc1.bin", &vec![3u8; 70_000]);
    write(&src, "repository/store/ab/ce/doc2.bin", b"doc2");
    write(&src, "repository/logs/keep.txt", b"not the root logs");
    write(&src, "logs/catalina.out", b"log");
    write(&src, "x.tmp", b"t");
    write(&src, "sub/y.tmp", b"t");
    write(&src, "sub/cache/z", b"z");
    write(&src, "a/b/c", b"anchored");
    write(&src, "q/a/b/c", b"not anchored");
    write(&src, "deep/1/2/x", b"x");
    write(&src, "deep/x", b"x at depth 0 of deep");
    write(&src, "sp ace/ünï/файл.txt", b"u");
    symlink("../repository", src.join("sub/link")).unwrap();
    std::fs::create_dir_all(src.join("empty")).unwrap();
    std::os::unix::fs::chown(src.join("sp ace/ünï/файл.txt"), Some(1000), Some(1000)).unwrap();
    // Both standbys start alike, with extras: some excluded (must survive), some not.
    let dst = &s.roots[1];
    write(dst, "repository/.system.key", b"standby key");
    write(dst, "logs/standby.log", b"standby log");
    write(dst, "old.txt", b"old");
    write(dst, "olddir/keep.tmp", b"excluded inside a deleted dir");
    write(dst, "olddir/gone.txt", b"gone");
    let cp = std::process::Command::new("cp")
        .arg("-a")
        .arg(dst)
        .arg(&by_rsync)
        .status()
        .unwrap();
    assert!(cp.success());
    // All source times a whole second apart from anything the runs write:
    // rsync compares times at one-second granularity and would skip a
    // directory whose mtime differs only in nanoseconds.
    let past = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        - 1000;
    let touch = std::process::Command::new("find")
        .arg(&src)
        .args(["-exec", "touch", "-h", "-d", &format!("@{past}"), "{}", "+"])
        .status()
        .unwrap();
    assert!(touch.success());
    let cfg = s.write();
    let mut rsync = std::process::Command::new("rsync");
    rsync.args(["-a", "--delete"]);
    for e in excludes {
        rsync.arg(format!("--exclude={e}"));
    }
    let rsync_out = rsync
        .arg("-e")
        .arg(c.rsync_rsh("okm2"))
        .arg(format!("{}/", src.display()))
        .arg(format!(
            "root@{}:{}/",
            c.node("okm2").ip,
            by_rsync.display()
        ))
        .output()
        .unwrap();
    assert!(
        rsync_out.status.success(),
        "rsync failed: {}",
        String::from_utf8_lossy(&rsync_out.stderr)
    );
    sync(&cfg, &[]).code(0);
    // `olddir` is not on the primary and stays only for its excluded file:
    // neither tool owns its mtime (each deleted inside it at its own time).
    let touch = std::process::Command::new("touch")
        .arg("-r")
        .arg(by_rsync.join("olddir"))
        .arg(s.roots[1].join("olddir"))
        .status()
        .unwrap();
    assert!(touch.success());
    assert_same_tree(&by_rsync, &s.roots[1]);
    assert_eq!(
        std::fs::read(s.roots[1].join("olddir/keep.tmp")).unwrap(),
        b"excluded inside a deleted dir"
    );
}

/// Kill the standby's agent while a file is being written: no half-written
/// file under a real name; the next run cleans up and converges.
#[test]
fn killed_agent_leaves_no_half_written_file() {
    let s = files_only("sync-killed");
    let cfg = s.write();
    let (src, dst) = (&s.roots[0], &s.roots[1]);
    let mut big = vec![0u8; 96 << 20];
    for (i, c) in big.chunks_exact_mut(8).enumerate() {
        c.copy_from_slice(&(i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15).to_le_bytes());
    }
    write(src, "big.bin", &big);
    write(dst, "big.bin", b"the old content");
    let child = crate::cmd::hasync()
        .config(&cfg)
        .args(["sync", "--files-only"])
        .spawn();
    // Wait for the temp file, then kill whoever holds it open (the standby's agent).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let victim = loop {
        assert!(
            std::time::Instant::now() < deadline,
            "no temp file appeared"
        );
        let temps: Vec<_> = std::fs::read_dir(dst)
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .contains(".hasync-")
            })
            .collect();
        if let Some(t) = temps.first() {
            if let Some(pid) = holder_of(t) {
                break pid;
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    };
    // SAFETY: plain kill(2) of a process we found holding our temp file.
    unsafe { libc::kill(victim, libc::SIGKILL) };
    let run = child.wait();
    let stderr = &run.stderr;
    assert_ne!(run.code, 0, "the run should fail");
    assert!(
        stderr.contains("okm2"),
        "the error names the node: {stderr}"
    );
    // The real name holds the old content, whole.
    assert_eq!(
        std::fs::read(dst.join("big.bin")).unwrap(),
        b"the old content"
    );
    // The next run removes the leftover temp and converges.
    sync(&cfg, &[]).code(0);
    assert_same_tree(src, dst);
}

/// The pid of a process that has `path` open.
pub fn holder_of(path: &Path) -> Option<i32> {
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(e.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if std::fs::read_link(fd.path()).ok().as_deref() == Some(path) {
                return Some(pid);
            }
        }
    }
    None
}

#[test]
fn checksum_mode_finds_same_size_same_mtime_changes() {
    let s = files_only("sync-checksum");
    let cfg = s.write();
    let (src, dst) = (&s.roots[0], &s.roots[1]);
    write(src, "f.txt", b"AAAA");
    sync(&cfg, &[]).code(0);
    // Same size and mtime, other content: invisible to size+mtime.
    let m = std::fs::metadata(dst.join("f.txt")).unwrap();
    write(dst, "f.txt", b"BBBB");
    set_mtime(&dst.join("f.txt"), m.modified().unwrap());
    sync(&cfg, &["--dry-run"]).code(0).stdout_has("update 0");
    sync(&cfg, &["--checksum", "--dry-run"])
        .code(0)
        .stdout_has(">fc");
    sync(&cfg, &["--checksum"]).code(0);
    assert_eq!(std::fs::read(dst.join("f.txt")).unwrap(), b"AAAA");
}

#[test]
fn missing_agent_binary_says_how_to_install_it() {
    let s = files_only("sync-no-agent");
    let cfg = s.write();
    let text = std::fs::read_to_string(&cfg).unwrap();
    // Only the standby lacks it.
    let at = text.rfind(env!("CARGO_BIN_EXE_hasync")).unwrap();
    let text = format!(
        "{}/opt/none/hasync{}",
        &text[..at],
        &text[at + env!("CARGO_BIN_EXE_hasync").len()..]
    );
    std::fs::write(&cfg, text).unwrap();
    write(&s.roots[0], "f", b"x");
    sync(&cfg, &[])
        .code(1)
        .stderr_has("okm2")
        .stderr_has("/opt/none/hasync")
        .stderr_has("install hasync");
    assert!(snapshot(&s.roots[1]).is_empty());
}

#[test]
fn progress_is_logged_in_plain_lines_without_a_terminal() {
    let s = files_only("sync-progress");
    let cfg = s.write();
    for i in 0..30 {
        write(&s.roots[0], &format!("f{i}"), &vec![i as u8; 50_000]);
    }
    let r = hasync()
        .config(&cfg)
        .env("HASYNC_PROGRESS_EVERY", "1ms")
        .args(["sync", "--files-only"])
        .run();
    r.code(0)
        .stderr_has("okm2: ")
        .stderr_has("changes,")
        .stderr_has("/s");
    r.stderr_has("created 30 (1.4 MiB)")
        .stderr_has("literal 1.4 MiB matched 0 B")
        .stderr_has("speedup");
    // -q: only warnings and errors.
    write(&s.roots[0], "g", b"x");
    let r = hasync()
        .config(&cfg)
        .env("HASYNC_PROGRESS_EVERY", "1ms")
        .args(["-q", "sync", "--files-only"])
        .run();
    r.code(0);
    assert!(r.stderr.is_empty(), "-q printed: {}", r.stderr);
}
