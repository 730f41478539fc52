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
        content: Vec<u8>,
    },
    Dir {
        mode: u32,
    },
    Link {
        target: String,
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
        let m = std::fs::symlink_metadata(&p).unwrap();
        let node = if m.file_type().is_symlink() {
            Node::Link {
                target: std::fs::read_link(&p)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned(),
            }
        } else if m.is_dir() {
            walk(root, &p, out);
            Node::Dir {
                mode: m.mode() & 0o7777,
            }
        } else {
            Node::File {
                mode: m.mode() & 0o7777,
                mtime: (m.mtime(), m.mtime_nsec()),
                content: std::fs::read(&p).unwrap(),
            }
        };
        out.insert(rel, node);
    }
}

/// Assert two trees are equal, showing the first differences.
#[track_caller]
pub fn assert_same_tree(a: &Path, b: &Path) {
    let (sa, sb) = (snapshot(a), snapshot(b));
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
            content,
        } => format!("file {mode:o} {mtime:?} {} bytes", content.len()),
        Node::Dir { mode } => format!("dir {mode:o}"),
        Node::Link { target } => format!("link -> {target}"),
    }
}

pub fn write(root: &Path, rel: &str, content: &[u8]) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, content).unwrap();
}

/// Set a file's mtime in the past so size+mtime detection sees a change.
pub fn age(root: &Path, rel: &str, secs_ago: i64) {
    let p = root.join(rel);
    let c = std::ffi::CString::new(p.to_string_lossy().as_bytes()).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let t = libc::timespec {
        tv_sec: now - secs_ago,
        tv_nsec: 0,
    };
    let ts = [t, t];
    // SAFETY: a valid C string and two timespecs.
    let rc = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            ts.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    assert_eq!(rc, 0, "utimensat {}", p.display());
}

fn sync(config: &Path, extra: &[&str]) -> crate::cmd::Run {
    let mut args = vec!["sync", "--files-only"];
    args.extend_from_slice(extra);
    hasync().config(config).args(args).run()
}

fn files_only(label: &str) -> Setup {
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
    let s = files_only("sync-dry-run");
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
    let real = hasync()
        .config(&cfg)
        .args(["sync", "--files-only", "--json"])
        .run();
    real.code(0);
    let dv: serde_json::Value = serde_json::from_str(&dry.stdout).unwrap();
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
    // The itemized text form names each path.
    let text = hasync()
        .config(&cfg)
        .args(["sync", "--files-only", "--dry-run"])
        .run();
    text.code(0).stdout_has("dry run: nothing was changed");
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
