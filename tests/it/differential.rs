//! Random change, checked against rsync's own eye (issue 23): rounds of
//! random mutations of the primary's tree, each followed by
//! `hasync sync --files-only`, after which
//! `rsync -anci --delete --modify-window=-1 SRC/ MIRROR/` must list nothing.
//!
//! rsync is the oracle for every attribute hasync replicates: kind, content
//! (`-c` compares checksums, so a missed content change shows even when size
//! and mtime agree), symlink target, permission bits, owner and group (the
//! harness runs as root, so both sides carry owners), and the mtime of every
//! file, directory, symlink and of the root `./`. `--modify-window=-1`
//! makes rsync compare mtimes to the nanosecond (by default it compares
//! whole seconds and would miss a time replicated with the wrong fraction).
//! hasync is also held to its own word: every fifth round its dry run must
//! announce exactly the actions the run then performs, and after the last
//! round its dry run must find nothing left to do.
//!
//! The mutations: creates (files of 0 bytes to ~200 kB, so some travel as
//! deltas, directories, symlinks, dangling or not), appends, in-place edits
//! (same size), renames of files and of whole directories, deletes (files,
//! symlinks, whole subtrees), a file, directory or symlink replaced by
//! another kind under the same name, chmod (files and directories,
//! including the root), chown to other uids and gids (symlinks included),
//! mtimes set far in the past (before 1970 too) and in the future (after
//! 2038), with nanoseconds, on files, directories, symlinks and the root.
//! Names have spaces, tabs, newlines, brackets, globs, backslashes, a
//! leading dash, UTF-8 and non-UTF-8 bytes, and 200 and 255 bytes.
//!
//! Not generated, on purpose: setuid/setgid bits on regular files (the
//! agent drops them by design, see `agent::fsroot`'s threat model, and rsync
//! would rightly list every one), hard links, devices, fifos and sockets,
//! ACLs and xattrs (hasync replicates none of them), and content edits that
//! keep both size and mtime (every time the test sets is random to the
//! nanosecond, so that never happens by chance; `--checksum` is the tool
//! for it, as with rsync).
//!
//! Seeded and reproducible: the seed comes from `HASYNC_IT_SEED` or the
//! clock, and is printed; a failing round prints the seed, the round, the
//! round's operations, what rsync still lists and hasync's output.

use std::ffi::OsString;
use std::fs;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::cmd::hasync;
use crate::sync::files_only;

/// A tiny deterministic PRNG (splitmix64): the same seed gives the same
/// numbers on every run (also the filter test's random sets).
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub(crate) fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    pub(crate) fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }

    pub(crate) fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// The odd names the issue lists, and a few more.
fn name_pool() -> Vec<Vec<u8>> {
    let mut pool: Vec<Vec<u8>> = [
        &b"a"[..],
        b"doc.pdf",
        b"with space",
        b"trailing space ",
        b"tab\there",
        b"new\nline",
        b"[brackets]",
        b"[ab].txt",
        b"star*",
        b"q?",
        b"back\\slash",
        b"-leading-dash",
        b".hidden",
        b"\xc3\xa9t\xc3\xa9",
        b"\xe6\x97\xa5\xe6\x9c\xac",
        b"not-utf8-\xff\xfe",
        b"{braces,x}",
        b"percent%s",
        b"quote'\"",
    ]
    .iter()
    .map(|n| n.to_vec())
    .collect();
    pool.push(vec![b'l'; 200]);
    // The longest name Linux allows: the agent's temporary name for it
    // must be shortened to fit.
    pool.push(vec![b'm'; 255]);
    pool
}

/// Modes for files: no setuid/setgid (dropped by design, see the module
/// doc); sticky, which is harmless, is kept.
const FILE_MODES: &[u32] = &[0o644, 0o600, 0o755, 0o400, 0o000, 0o666, 0o1644, 0o750];
/// Modes for directories (setgid on directories is replicated).
const DIR_MODES: &[u32] = &[0o755, 0o700, 0o2775, 0o1777, 0o500, 0o711, 0o750];
/// Owners other than root, existing users or not.
const OWNERS: &[(u32, u32)] = &[
    (0, 0),
    (1000, 1000),
    (4242, 4343),
    (65534, 65534),
    (0, 1234),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    File,
    Dir,
    Link,
}

/// Every path below `root` (not the root itself), parents before children.
fn list(root: &Path) -> Vec<(PathBuf, Kind)> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<(PathBuf, Kind)>) {
        let mut entries: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        for p in entries {
            let ft = fs::symlink_metadata(&p).unwrap().file_type();
            let kind = if ft.is_symlink() {
                Kind::Link
            } else if ft.is_dir() {
                Kind::Dir
            } else {
                Kind::File
            };
            out.push((p.strip_prefix(root).unwrap().to_path_buf(), kind));
            if kind == Kind::Dir {
                walk(root, &p, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out
}

/// A path as the operations list prints it: escaped, so tabs and newlines
/// and non-UTF-8 bytes are visible.
fn show(p: &Path) -> String {
    let b = p.as_os_str().as_bytes();
    if b.is_empty() {
        return "./".into();
    }
    let mut s = String::new();
    for chunk in b.utf8_chunks() {
        for c in chunk.valid().chars() {
            s.extend(c.escape_debug());
        }
        for x in chunk.invalid() {
            s.push_str(&format!("\\x{x:02x}"));
        }
    }
    if s.len() > 60 {
        // 200- and 255-byte names: say how long, not what.
        let n = b.len();
        s = format!("{}…({n} bytes)", &s[..s.char_indices().nth(40).unwrap().0]);
    }
    format!("\"{s}\"")
}

/// Random content; big enough now and then for a delta transfer.
fn content(rng: &mut Rng) -> Vec<u8> {
    let len = match rng.below(10) {
        0 => 0,
        1..=6 => rng.below(300),
        7 | 8 => 1000 + rng.below(20_000),
        _ => 100_000 + rng.below(100_000),
    };
    let seed = rng.next();
    let mut r = Rng(seed);
    (0..len).map(|_| (r.next() % 251) as u8).collect()
}

/// A random mtime with nanoseconds: far past (before 1970 too), recent
/// past, or future (after 2038 too).
fn random_time(rng: &mut Rng) -> (i64, i64) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let sec = match rng.below(5) {
        0 => -(rng.below(1_000_000_000) as i64),
        1 => rng.below(1_500_000_000) as i64,
        2 => now - 1 - rng.below(10_000_000) as i64,
        3 => now + 1 + rng.below(10_000_000) as i64,
        _ => 2_200_000_000 + rng.below(2_000_000_000) as i64,
    };
    (sec, rng.below(1_000_000_000) as i64)
}

/// `utimensat(AT_SYMLINK_NOFOLLOW)`: works on files, directories and
/// symlinks alike.
fn set_time(path: &Path, (sec, nsec): (i64, i64)) {
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    let ts = libc::timespec {
        tv_sec: sec,
        tv_nsec: nsec,
    };
    let times = [ts, ts];
    // SAFETY: a valid NUL-terminated path and two timespecs.
    let rc = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    assert_eq!(
        rc,
        0,
        "set mtime of {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
}

fn remove(path: &Path, kind: Kind) {
    if kind == Kind::Dir {
        fs::remove_dir_all(path).unwrap();
    } else {
        fs::remove_file(path).unwrap();
    }
}

/// A directory (the root included) to put something new into.
fn random_dir(rng: &mut Rng, entries: &[(PathBuf, Kind)]) -> PathBuf {
    let dirs: Vec<&PathBuf> = entries
        .iter()
        .filter(|(_, k)| *k == Kind::Dir)
        .map(|(p, _)| p)
        .collect();
    if dirs.is_empty() || rng.chance(30) {
        PathBuf::new()
    } else {
        rng.pick(&dirs).to_path_buf()
    }
}

/// A name not yet present in `dir` (of `root`).
fn fresh_name(rng: &mut Rng, pool: &[Vec<u8>], root: &Path, dir: &Path) -> PathBuf {
    loop {
        let mut n = rng.pick(pool).clone();
        if rng.chance(50) && n.len() < 250 {
            n.extend_from_slice(format!("-{}", rng.below(100)).as_bytes());
        }
        let p = dir.join(OsString::from_vec(n));
        if fs::symlink_metadata(root.join(&p)).is_err() {
            return p;
        }
    }
}

fn symlink_target(rng: &mut Rng, entries: &[(PathBuf, Kind)]) -> OsString {
    match rng.below(4) {
        0 if !entries.is_empty() => rng.pick(entries).0.clone().into_os_string(),
        1 => OsString::from("../outside/of/the/tree"),
        2 => OsString::from("/etc/passwd"),
        _ => OsString::from(format!("dangling-{}", rng.below(1000))),
    }
}

/// Apply one random mutation under `root`; describe it.
fn mutate(rng: &mut Rng, pool: &[Vec<u8>], root: &Path) -> String {
    let entries = list(root);
    let of = |k: Kind| -> Vec<&PathBuf> {
        entries
            .iter()
            .filter(|(_, e)| *e == k)
            .map(|(p, _)| p)
            .collect()
    };
    let (files, dirs, links) = (of(Kind::File), of(Kind::Dir), of(Kind::Link));
    let abs = |p: &Path| root.join(p);
    // Fall through to a create when the chosen kind of target is missing.
    let op = rng.below(100);
    match op {
        // Append.
        0..=7 if !files.is_empty() => {
            let p = rng.pick(&files).to_path_buf();
            let more = content(rng);
            let mut f = fs::OpenOptions::new().append(true).open(abs(&p)).unwrap();
            std::io::Write::write_all(&mut f, &more).unwrap();
            format!("append {} bytes to {}", more.len(), show(&p))
        }
        // In-place edit, same size.
        8..=14 if !files.is_empty() => {
            let p = rng.pick(&files).to_path_buf();
            let mut data = fs::read(abs(&p)).unwrap();
            if data.is_empty() {
                return format!("edit {} (empty: no-op)", show(&p));
            }
            let at = rng.below(data.len());
            let n = 1 + rng.below((data.len() - at).min(64));
            for b in &mut data[at..at + n] {
                *b = b.wrapping_add(1);
            }
            use std::io::{Seek, Write};
            let mut f = fs::OpenOptions::new().write(true).open(abs(&p)).unwrap();
            f.seek(std::io::SeekFrom::Start(at as u64)).unwrap();
            f.write_all(&data[at..at + n]).unwrap();
            format!("edit {n} bytes at {at} of {} in place", show(&p))
        }
        // Rename a file, symlink or directory (never into itself).
        15..=24 if !entries.is_empty() => {
            let (from, kind) = rng.pick(&entries).clone();
            let candidates: Vec<(PathBuf, Kind)> = entries
                .iter()
                .filter(|(p, _)| kind != Kind::Dir || !p.starts_with(&from))
                .cloned()
                .collect();
            let dir = random_dir(rng, &candidates);
            let to = fresh_name(rng, pool, root, &dir);
            fs::rename(abs(&from), abs(&to)).unwrap();
            format!("rename {kind:?} {} to {}", show(&from), show(&to))
        }
        // Delete.
        25..=31 if !entries.is_empty() => {
            let (p, kind) = rng.pick(&entries).clone();
            remove(&abs(&p), kind);
            format!("delete {kind:?} {}", show(&p))
        }
        // Replace by another kind under the same name.
        32..=41 if !entries.is_empty() => {
            let (p, kind) = rng.pick(&entries).clone();
            let target = symlink_target(rng, &entries);
            remove(&abs(&p), kind);
            let new = match (kind, rng.chance(50)) {
                (Kind::File, true) | (Kind::Link, false) => Kind::Dir,
                (Kind::Dir, true) | (Kind::Link, true) => Kind::File,
                (Kind::File, false) | (Kind::Dir, false) => Kind::Link,
            };
            match new {
                Kind::File => fs::write(abs(&p), content(rng)).unwrap(),
                Kind::Dir => {
                    fs::create_dir(abs(&p)).unwrap();
                    if rng.chance(50) {
                        fs::write(abs(&p).join("inside"), content(rng)).unwrap();
                    }
                }
                Kind::Link => symlink(&target, abs(&p)).unwrap(),
            }
            format!("replace {kind:?} {} by a {new:?}", show(&p))
        }
        // chmod a file or a directory (the root too).
        42..=49 => {
            let (p, mode) = if rng.chance(50) && !files.is_empty() {
                (rng.pick(&files).to_path_buf(), *rng.pick(FILE_MODES))
            } else if rng.chance(70) && !dirs.is_empty() {
                (rng.pick(&dirs).to_path_buf(), *rng.pick(DIR_MODES))
            } else {
                (PathBuf::new(), *rng.pick(DIR_MODES))
            };
            fs::set_permissions(abs(&p), fs::Permissions::from_mode(mode)).unwrap();
            format!("chmod {mode:o} {}", show(&p))
        }
        // chown anything, symlinks included (never following them).
        50..=55 if !entries.is_empty() => {
            let (p, kind) = rng.pick(&entries).clone();
            let (uid, gid) = *rng.pick(OWNERS);
            std::os::unix::fs::lchown(abs(&p), Some(uid), Some(gid)).unwrap();
            format!("chown {uid}:{gid} {kind:?} {}", show(&p))
        }
        // Old or future mtime on anything, the root too.
        56..=67 => {
            let (p, kind) = if rng.chance(15) || entries.is_empty() {
                (PathBuf::new(), Kind::Dir)
            } else if rng.chance(20) && !links.is_empty() {
                (rng.pick(&links).to_path_buf(), Kind::Link)
            } else {
                rng.pick(&entries).clone()
            };
            let t = random_time(rng);
            set_time(&abs(&p), t);
            format!("mtime {}.{:09} on {kind:?} {}", t.0, t.1, show(&p))
        }
        // Create a directory (sometimes a chain of them).
        68..=75 => {
            let dir = random_dir(rng, &entries);
            let p = fresh_name(rng, pool, root, &dir);
            let mut deep = p.clone();
            fs::create_dir(abs(&p)).unwrap();
            if rng.chance(30) {
                deep = fresh_name(rng, pool, root, &p);
                fs::create_dir(abs(&deep)).unwrap();
            }
            format!("mkdir {}", show(&deep))
        }
        // Create a symlink.
        76..=81 => {
            let dir = random_dir(rng, &entries);
            let p = fresh_name(rng, pool, root, &dir);
            let target = symlink_target(rng, &entries);
            symlink(&target, abs(&p)).unwrap();
            format!(
                "symlink {} -> {}",
                show(&p),
                show(Path::new(target.as_os_str()))
            )
        }
        // Create a file (the default when a chosen op had no target).
        _ => {
            let dir = random_dir(rng, &entries);
            let p = fresh_name(rng, pool, root, &dir);
            let data = content(rng);
            fs::write(abs(&p), &data).unwrap();
            format!("create {} ({} bytes)", show(&p), data.len())
        }
    }
}

fn with_slash(p: &Path) -> OsString {
    let mut s = p.as_os_str().to_owned();
    s.push("/");
    s
}

/// What `rsync -anci --delete --modify-window=-1` from `src` to `dst`
/// would still change (empty: nothing).
fn rsync_itemized(src: &Path, dst: &Path) -> String {
    let out = std::process::Command::new("rsync")
        .args(["-anci", "--delete", "--modify-window=-1"])
        .arg(with_slash(src))
        .arg(with_slash(dst))
        .env("LC_ALL", "C")
        .output()
        .unwrap_or_else(|e| panic!("cannot run rsync (is it installed?): {e}"));
    assert!(
        out.status.success(),
        "rsync -anci failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The seed: `HASYNC_IT_SEED` (decimal or 0x-hex) or the clock.
fn seed() -> u64 {
    match std::env::var("HASYNC_IT_SEED") {
        Ok(s) => {
            let s = s.trim();
            let parsed = match s.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => s.parse(),
            };
            parsed.unwrap_or_else(|e| panic!("HASYNC_IT_SEED={s:?}: {e}"))
        }
        Err(_) => SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
    }
}

/// Run `rounds` rounds of `per_round` mutations, each followed by a sync
/// and the rsync check; panic with everything needed to reproduce at the
/// first round rsync finds anything in.
fn differential(label: &str, rounds: usize, per_round: usize) {
    let seed = seed();
    println!("{label}: seed {seed:#x} (reproduce with HASYNC_IT_SEED={seed:#x}), {rounds} rounds of {per_round} mutations");
    let s = files_only(label);
    let cfg = s.write();
    let (src, dst) = (s.roots[0].clone(), s.roots[1].clone());
    let pool = name_pool();
    let mut rng = Rng(seed);
    let started = Instant::now();
    let mut sync_time = Duration::ZERO;
    for round in 1..=rounds {
        let ops: Vec<String> = (0..per_round)
            .map(|_| mutate(&mut rng, &pool, &src))
            .collect();
        let fail = |what: &str, run: &crate::cmd::Run| -> ! {
            panic!(
                "round {round} of {rounds}, seed {seed:#x} (rerun with HASYNC_IT_SEED={seed:#x} \
                 HASYNC_DIFF_ROUNDS={round}): {what}\n\
                 operations of this round:\n  {}\n\
                 hasync ({}) exited {}; stdout:\n{}\nstderr:\n{}",
                ops.join("\n  "),
                run.line,
                run.code,
                run.stdout,
                run.stderr
            )
        };
        // Every fifth round, the dry run first: it must announce exactly
        // what the run then does.
        let dry = (round % 5 == 0).then(|| {
            let dry = sync_json(&cfg, true);
            if dry.code != 0 {
                fail("the dry run failed", &dry);
            }
            dry
        });
        let t = Instant::now();
        let run = sync_json(&cfg, false);
        sync_time += t.elapsed();
        if run.code != 0 {
            fail("the sync failed", &run);
        }
        if let Some(dry) = dry {
            if actions(&dry) != actions(&run) {
                fail(
                    &format!(
                        "the run did other than its dry run said:\ndry run: {:#}\nrun: {:#}",
                        actions(&dry),
                        actions(&run)
                    ),
                    &run,
                );
            }
        }
        let left = rsync_itemized(&src, &dst);
        if !left.is_empty() {
            fail(
                &format!("rsync -anci --delete --modify-window=-1 still lists:\n{left}"),
                &run,
            );
        }
    }
    // hasync agrees with rsync that nothing is left to do.
    let again = sync_json(&cfg, true);
    let left = actions(&again);
    assert!(
        again.code == 0 && left.as_array().is_some_and(|a| a.is_empty()),
        "seed {seed:#x}: after the last round rsync lists nothing but hasync's dry run \
         would still do: {left:#}\n{}",
        again.stderr
    );
    let total = started.elapsed();
    println!(
        "{label}: {rounds} rounds converged (seed {seed:#x}); {:.2} s per round, of which {:.2} s hasync sync; {} entries at the end",
        total.as_secs_f64() / rounds as f64,
        sync_time.as_secs_f64() / rounds as f64,
        list(&src).len()
    );
}

/// `hasync sync --files-only --json`, a dry run or not.
fn sync_json(cfg: &Path, dry_run: bool) -> crate::cmd::Run {
    let mut args = vec!["sync", "--files-only", "--json"];
    if dry_run {
        args.push("--dry-run");
    }
    hasync().config(cfg).args(args).run()
}

/// The actions a `--json` run reports.
fn actions(run: &crate::cmd::Run) -> serde_json::Value {
    let v: serde_json::Value = serde_json::from_str(&run.stdout)
        .unwrap_or_else(|e| panic!("{}: not JSON ({e}): {}", run.line, run.stdout));
    v[0]["actions"].clone()
}

/// How many rounds the long variant runs (`HASYNC_DIFF_ROUNDS`).
fn rounds_from_env(default: usize) -> usize {
    std::env::var("HASYNC_DIFF_ROUNDS")
        .ok()
        .map(|v| {
            v.trim()
                .parse()
                .unwrap_or_else(|e| panic!("HASYNC_DIFF_ROUNDS={v:?}: {e}"))
        })
        .unwrap_or(default)
}

/// The CI variant: a few dozen rounds.
#[test]
fn random_changes_converge_as_rsync_sees_it() {
    differential("differential", rounds_from_env(30), 30);
}

/// The long variant, for the benchmarks: a few hundred rounds.
///
/// ```text
/// HASYNC_DIFF_ROUNDS=300 cargo test --release --locked --test it -- \
///     --ignored --nocapture differential::many_random_changes_converge
/// ```
///
/// Add `HASYNC_IT_SEED=0x…` to replay the seed a failure printed.
#[test]
#[ignore = "long: a few hundred rounds; see the doc comment for the command"]
fn many_random_changes_converge_as_rsync_sees_it() {
    differential("differential-long", rounds_from_env(300), 30);
}
