//! Directory times after an interrupted transfer (issue 14, item 4): the
//! next `hasync sync --files-only` must leave every attribute hasync
//! replicates right on every path, the root `./` and the directories whose
//! leftover temporary files its scan removed included. Checked as a
//! sysadmin would: `rsync -anci` from the primary lists nothing, and a
//! direct comparison of mode, owner, mtime (to the nanosecond), content and
//! link target of every path finds no difference.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::cmd::hasync;
use crate::harness::proc;
use crate::sync::{assert_same_snapshot, files_only, snapshot_with_root, write, Node};

/// A name of the kind the agent writes files under (`.<name>.hasync-<16
/// hex>.tmp`, see `fsroot::temp_name`).
fn temp_name(name: &str, n: u64) -> String {
    format!(".{name}.hasync-{n:016x}.tmp")
}

/// Our temporary files anywhere under `root`.
fn temps_under(root: &Path) -> Vec<String> {
    crate::sync::snapshot(root)
        .into_keys()
        .filter(|k| {
            let name = k.rsplit('/').next().unwrap();
            name.starts_with('.') && name.contains(".hasync-") && name.ends_with(".tmp")
        })
        .collect()
}

/// Sets every path under `root` (and `root`) to `secs` since the epoch,
/// without following symlinks: whole seconds apart from anything a run
/// writes, so `rsync`'s one-second comparison sees every difference.
fn touch_all(root: &Path, secs: u64) {
    let ok = std::process::Command::new("find")
        .arg(root)
        .args(["-exec", "touch", "-h", "-d", &format!("@{secs}"), "{}", "+"])
        .status()
        .unwrap()
        .success();
    assert!(ok, "touch {}", root.display());
}

/// Sets `path` (not what is below it) to `secs` since the epoch.
fn touch_one(path: &Path, secs: u64) {
    let ok = std::process::Command::new("touch")
        .args(["-h", "-d", &format!("@{secs}")])
        .arg(path)
        .status()
        .unwrap()
        .success();
    assert!(ok, "touch {}", path.display());
}

/// Gives `dst` the mtime of `src` (`touch -r`).
fn same_time(src: &Path, dst: &Path) {
    let ok = std::process::Command::new("touch")
        .arg("-h")
        .arg("-r")
        .arg(src)
        .arg(dst)
        .status()
        .unwrap()
        .success();
    assert!(ok, "touch -r {} {}", src.display(), dst.display());
}

/// What `rsync -anci --delete` from `src` to `dst` would still change.
fn rsync_itemized(src: &Path, dst: &Path, excludes: &[String]) -> String {
    let mut rsync = std::process::Command::new("rsync");
    rsync.args(["-anci", "--delete"]);
    for e in excludes {
        rsync.arg(format!("--exclude={e}"));
    }
    let out = rsync
        .arg(format!("{}/", src.display()))
        .arg(format!("{}/", dst.display()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "rsync failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Without the excluded `*.lock` files, which each side keeps its own of.
fn replicated(snap: BTreeMap<String, Node>) -> BTreeMap<String, Node> {
    snap.into_iter()
        .filter(|(k, _)| !k.ends_with(".lock"))
        .collect()
}

/// The mirror's agent is killed (SIGKILL) while a big file is on its way,
/// leaving its temporary file; other leftovers of the same kind sit in
/// directories whose times are already right (as after an interrupted run
/// whose directory times were set, or a repair with `rsync -a`, which
/// leaves unknown files alone). The next run removes every leftover, makes
/// the deletions and the creates, and then nothing differs anywhere: not
/// the root, not a directory whose leftovers the scan removed, not one that
/// lost an entry or holds excluded files.
#[test]
fn after_an_interrupted_transfer_the_next_run_restores_every_directory_time() {
    let mut s = files_only("dirtimes-interrupted");
    s.excludes = vec!["*.lock".into()];
    let cfg = s.write();
    let (src, dst) = (s.roots[0].clone(), s.roots[1].clone());
    write(&src, "config.xml", b"<config/>");
    for d in ["0a/1b", "0a/2c", "3d/4e", "3d/5f"] {
        for i in 0..3 {
            write(
                &src,
                &format!("repository/datastore/{d}/doc-{i}.bin"),
                format!("{d} {i}").repeat(100).as_bytes(),
            );
        }
    }
    write(&src, "repository/index/segment-1", b"segment 1");
    write(&src, "repository/index/write.lock", b"primary lock");
    std::os::unix::fs::symlink("datastore", src.join("repository/store")).unwrap();
    std::fs::create_dir_all(src.join("repository/empty")).unwrap();
    write(&dst, "repository/index/write.lock", b"mirror lock");
    write(
        &dst,
        "repository/index/old-segment",
        b"goes in the first run",
    );
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    touch_all(&src, now - 2000);
    hasync()
        .config(&cfg)
        .args(["sync", "--files-only"])
        .run()
        .code(0);

    // The primary gains files, one of them big, and loses one; the mirror
    // gets an extra the next run deletes from a directory that also holds
    // an excluded file.
    let mut big = vec![0u8; 96 << 20];
    for (i, c) in big.chunks_exact_mut(8).enumerate() {
        c.copy_from_slice(&(i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15).to_le_bytes());
    }
    write(&src, "repository/datastore/0a/1b/new.bin", b"new document");
    write(&src, "repository/datastore/6a/7b/big.bin", &big);
    std::fs::remove_file(src.join("repository/datastore/3d/5f/doc-2.bin")).unwrap();
    // Only what changed gets a new time: the directories with leftovers
    // below have nothing else for the run to do.
    for p in [
        "repository/datastore",
        "repository/datastore/0a/1b",
        "repository/datastore/0a/1b/new.bin",
        "repository/datastore/3d/5f",
    ] {
        touch_one(&src.join(p), now - 1000);
    }
    touch_all(&src.join("repository/datastore/6a"), now - 1000);
    write(
        &dst,
        "repository/index/segment-0",
        b"the primary never had it",
    );
    same_time(&src.join("repository/index"), &dst.join("repository/index"));

    let child = crate::cmd::hasync()
        .config(&cfg)
        .args(["sync", "--files-only"])
        .spawn();
    let big_dir = dst.join("repository/datastore/6a/7b");
    let deadline = Instant::now() + Duration::from_secs(60);
    let victim = loop {
        assert!(Instant::now() < deadline, "big.bin was never in transfer");
        let temp = std::fs::read_dir(&big_dir).ok().and_then(|d| {
            d.flatten().map(|e| e.path()).find(|p| {
                p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with(".big.bin.")
            })
        });
        if let Some(pid) = temp.as_deref().and_then(crate::sync::holder_of) {
            break pid;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let root = dst.display().to_string();
    let line = proc::cmdline(victim);
    assert!(
        line.contains(" agent ") && line.contains(&root),
        "the temp file's holder is not the mirror's agent: {line}"
    );
    proc::signal(victim, libc::SIGKILL);
    let run = child.wait();
    assert_ne!(run.code, 0, "the interrupted run exited 0");
    assert!(
        !temps_under(&dst).is_empty(),
        "the kill left no temporary file: the test proves nothing"
    );
    // For the next run: a create at the top level and a delete beside an
    // excluded file.
    write(&src, "added-later.txt", b"after the kill");
    touch_one(&src.join("added-later.txt"), now - 500);
    touch_one(&src, now - 500);
    write(&dst, "repository/index/segment-0b", b"goes in the next run");
    // Leftovers in directories whose time is right, the root among them.
    for (dir, name) in [
        ("", "config.xml"),
        ("repository", "index"),
        ("repository/datastore", "0a"),
        ("repository/datastore/0a/2c", "doc-1.bin"),
        ("repository/datastore/3d", "4e"),
        ("repository/datastore/3d/4e", "doc-0.bin"),
        ("repository/index", "segment-1"),
    ] {
        let (s_dir, d_dir) = (src.join(dir), dst.join(dir));
        std::fs::write(d_dir.join(temp_name(name, 0x5eed)), b"half a file").unwrap();
        same_time(&s_dir, &d_dir);
    }

    hasync()
        .config(&cfg)
        .args(["sync", "--files-only"])
        .run()
        .code(0);
    assert_eq!(temps_under(&dst), Vec::<String>::new(), "leftovers remain");
    assert_eq!(
        std::fs::read(dst.join("repository/index/write.lock")).unwrap(),
        b"mirror lock",
        "an excluded file was touched"
    );
    let itemized = rsync_itemized(&src, &dst, &s.excludes);
    assert!(
        itemized.is_empty(),
        "rsync -anci from the primary still finds differences:\n{itemized}"
    );
    // To the nanosecond (rsync compares whole seconds).
    assert_same_snapshot(
        &src,
        &dst,
        replicated(snapshot_with_root(&src)),
        replicated(snapshot_with_root(&dst)),
    );
    // And a run after that has nothing to do.
    hasync()
        .config(&cfg)
        .args(["sync", "--files-only", "--dry-run"])
        .run()
        .code(0)
        .stdout_has("would create 0 (0 B), update 0 (0 B), change attributes of 0, delete 0 (0 B)");
}
