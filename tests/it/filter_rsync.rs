//! The exclude matcher against the real `rsync`: for a table of pattern
//! sets, run `rsync -a --delete --exclude=P1 --exclude=P2 ... src/ dst/`
//! into an empty destination and into one holding extra and conflicting
//! entries, compute the expected result with `Filter`, and compare the two
//! trees (every path with its kind: file, directory or symlink).

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::fs;
use std::os::unix::fs::symlink;
use std::path::Path;
use std::process::Command;

use hasync::sync::filter::Filter;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    File,
    Dir,
    Symlink,
}

/// Relative path → kind, for everything below a root.
type Tree = BTreeMap<String, Kind>;

/// The source tree. `name/` is a directory, `name -> target` a symlink,
/// anything else a file; parent directories are implied.
const SRC: &[&str] = &[
    ".system.key",
    "x",
    "x.tmp -> nowhere",
    "cache",
    "data.txt",
    "foobar.txt",
    "ab.txt",
    "bb.txt",
    "cb.txt",
    "a.txt",
    "[ab].txt",
    "star*.txt",
    "q?",
    "back\\slash.txt",
    "sp ",
    "é",
    "lnk_logs -> logs",
    "logs/app.log",
    "logs/old/2023.log",
    "logs/x/y.log",
    "repository/.system.key",
    "repository/docs/a.pdf",
    "repository/docs/b c.txt",
    "repository/docs/logs",
    "repository/docs/x",
    "repository/docs/cache -> ../cache",
    "repository/docs/tmp.tmp/inner.txt",
    "repository/logs/app.log",
    "repository/cache/entry.tmp",
    "repository/a/b",
    "repository/sub/.system.key",
    "a/b/c",
    "a/b/c.tmp",
    "a/x/c/deep.txt",
    "a/y/c/d/e.txt",
    "a/z/c",
    "b/a/b/f.txt",
    "foo/bar/baz.o",
    "foo/bar.o",
    "foo/x/bar",
    "foo/x/y/bar/z.txt",
    "d1/f",
    "dx/sub/g",
    "data/",
    "dir_name/in.txt",
    "dir_name/sub/deep.txt",
    "with space/file name.txt",
    "with space/logs/",
    "ünï/çà.txt",
    "日本/語.txt",
    ".hidden/.x",
    "deep/l1/l2/l3/logs/leaf.txt",
    "deep/l1/l2/l3/x",
    "deep/l1/logs",
    "deep/l1/.system.key",
    "deep/cache/c.bin",
];

/// What the pre-populated destination holds before the run: copies of
/// source entries with other contents, entries the source does not have,
/// and entries of another kind than in the source.
const DST: &[&str] = &[
    "extra.txt",
    "extra.tmp",
    "x/inner",
    "cache/c.bin",
    "cache/keep.tmp",
    "data.txt/in",
    "d1",
    "logs/app.log",
    "logs/new.log",
    "logs/old/gone.log",
    "repository/.system.key",
    "repository/extra_dir/keep.tmp",
    "repository/extra_dir/gone.txt",
    "repository/extra_dir/sub/x",
    "repository/logs/local.log",
    "repository/docs/logs/",
    "a/x/c/stale.txt",
    "a/b/c.tmp",
    "d9/f",
    "zz/.system.key",
    "zz/x/",
    "foo/bar/old.o",
    "foo/x/y/bar/extra",
    "dangling_extra -> gone",
    "lnk_logs/f",
    "ünï/extra.tmp",
    "with space/logs/old.log",
    "dir_name/extra",
    "sp ",
    "deep/l1/l2/l3/logs/old.txt",
];

/// Fixed pattern sets: the rsync man page examples, the OpenKM defaults,
/// and one or two sets for each rule of the matcher.
const TABLE: &[&[&str]] = &[
    &["/repository/.system.key", "/logs/"],
    &["*.tmp", "cache/"],
    &["/a/*/c"],
    &["**/x"],
    &["/**/x"],
    &["a/b"],
    &["d*/"],
    &["[ab]?.txt"],
    &["foo/***"],
    &["dir_name/***"],
    &["*.o"],
    &["/foo"],
    &["foo/"],
    &["foo/*/bar"],
    &["/foo/**/bar"],
    &["logs"],
    &["logs/"],
    &[".system.key"],
    &["x"],
    &["/x"],
    &["*"],
    &["**"],
    &["?"],
    &["??"],
    &["[[:alpha:]]*"],
    &["[!a-c]*.txt"],
    &["*/"],
    &["with space/"],
    &["* *"],
    &["ünï/"],
    &["é"],
    &["日本/*"],
    &["star\\*.txt", "q\\?", "\\[ab\\].txt"],
    &["back\\slash.txt"],
    &["sp "],
    &["- *.tmp", "- /logs/"],
    &["repository/**"],
    &["/repository/**/logs/"],
    &["a/**/c"],
    &["**/c/"],
    &["l?/l*/"],
    &["deep/**/x"],
    &["lnk_logs/", "x.tmp"],
    &[".*"],
    &["/*/"],
    &["/*"],
    &["*/*/c"],
    &["cache", "*.log"],
    &["extra*", "zz/"],
    &["*.tmp", "/repository/extra_dir/sub/"],
    &["[]ab]b.txt", "*[[:space:]]*"],
    &["[[]*", "[!.a-z]*"],
    &["*\\\\*"],
];

/// Building blocks of the random patterns.
const ATOMS: &[&str] = &[
    "logs",
    "x",
    "c",
    "a",
    "b",
    "bar",
    "foo",
    "cache",
    ".system.key",
    "repository",
    "docs",
    "d1",
    "l1",
    "sub",
    "*.tmp",
    "*.txt",
    "*.log",
    "?",
    "??",
    "*",
    "**",
    "[ab]*",
    "[!a]*",
    "d*",
    "*o*",
    "[[:alpha:]]",
    "é",
    "ünï",
    "with space",
    "extra*",
];

use crate::differential::Rng;

fn random_pattern(rng: &mut Rng) -> String {
    let mut p = String::new();
    match rng.below(6) {
        0 | 1 => p.push('/'),
        2 => p.push_str("**/"),
        _ => {}
    }
    for i in 0..1 + rng.below(3) {
        if i > 0 {
            p.push('/');
        }
        p.push_str(ATOMS[rng.below(ATOMS.len())]);
    }
    match rng.below(6) {
        0 | 1 => p.push('/'),
        2 => p.push_str("/***"),
        _ => {}
    }
    p
}

fn pattern_sets() -> Vec<Vec<String>> {
    let mut sets: Vec<Vec<String>> = TABLE
        .iter()
        .map(|set| set.iter().map(|p| p.to_string()).collect())
        .collect();
    let mut rng = Rng(0x5eed);
    for _ in 0..40 {
        let n = 1 + rng.below(3);
        sets.push((0..n).map(|_| random_pattern(&mut rng)).collect());
    }
    sets
}

/// Create the entries of `spec` below `root`.
fn build(root: &Path, spec: &[&str], content: &str) {
    fs::create_dir_all(root).unwrap();
    for entry in spec {
        if let Some((link, target)) = entry.split_once(" -> ") {
            let path = root.join(link);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            symlink(target, &path).unwrap();
        } else if let Some(dir) = entry.strip_suffix('/') {
            fs::create_dir_all(root.join(dir)).unwrap();
        } else {
            let path = root.join(entry);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(&path, format!("{content} {entry}\n")).unwrap();
        }
    }
}

/// Everything below `root`, unfiltered.
fn read_tree(root: &Path) -> Tree {
    fn walk(dir: &Path, rel: &str, tree: &mut Tree) {
        for entry in fs::read_dir(dir).unwrap() {
            let entry = entry.unwrap();
            let name = entry.file_name().into_string().unwrap();
            let path = join(rel, &name);
            let ft = entry.file_type().unwrap();
            let kind = if ft.is_symlink() {
                Kind::Symlink
            } else if ft.is_dir() {
                Kind::Dir
            } else {
                Kind::File
            };
            tree.insert(path.clone(), kind);
            if kind == Kind::Dir {
                walk(&entry.path(), &path, tree);
            }
        }
    }
    let mut tree = Tree::new();
    walk(root, "", &mut tree);
    tree
}

fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_string()
    } else {
        format!("{dir}/{name}")
    }
}

/// The names directly inside `dir` ("" is the root).
fn children<'a>(tree: &'a Tree, dir: &str) -> Vec<&'a str> {
    tree.keys()
        .filter_map(|p| {
            let rest = if dir.is_empty() {
                p.as_str()
            } else {
                p.strip_prefix(dir)?.strip_prefix('/')?
            };
            (!rest.contains('/')).then_some(rest)
        })
        .collect()
}

fn is_excluded(filter: &Filter, path: &str, kind: Kind) -> bool {
    filter.is_excluded(path, kind == Kind::Dir)
}

/// What the destination should hold after the run, and whether rsync
/// should report that it could not replace a directory (exit code 23).
struct Expected {
    tree: Tree,
    blocked: bool,
}

/// The expected result of `rsync -a --delete` with the excludes of
/// `filter`, from the source `src` into the destination `dst` (as it was
/// before the run). The source side is a walk that skips excluded entries;
/// on the destination, excluded entries are protected from deletion.
fn expected(filter: &Filter, src: &Tree, dst: &Tree) -> Expected {
    let mut out = Expected {
        tree: Tree::new(),
        blocked: false,
    };
    merge(filter, src, dst, "", true, true, &mut out);
    out
}

/// The directory `dir` exists after the run; fill in its contents.
fn merge(
    filter: &Filter,
    src: &Tree,
    dst: &Tree,
    dir: &str,
    in_src: bool,
    in_dst: bool,
    out: &mut Expected,
) {
    let mut names = BTreeSet::new();
    if in_src {
        names.extend(children(src, dir));
    }
    if in_dst {
        names.extend(children(dst, dir));
    }
    for name in names {
        let p = join(dir, name);
        let s = match src.get(&p) {
            Some(&k) if in_src && !is_excluded(filter, &p, k) => Some(k),
            _ => None,
        };
        let d = if in_dst { dst.get(&p).copied() } else { None };
        match (s, d) {
            (Some(Kind::Dir), d) => {
                // A non-directory in the way is simply replaced.
                out.tree.insert(p.clone(), Kind::Dir);
                merge(filter, src, dst, &p, true, d == Some(Kind::Dir), out);
            }
            (Some(k), Some(Kind::Dir)) => {
                // A directory in the way of a file: rsync empties it,
                // honouring the excludes; if something is protected inside,
                // the directory stays and the file is not transferred.
                if delete_contents(filter, dst, &p, out) {
                    out.tree.insert(p, Kind::Dir);
                    out.blocked = true;
                } else {
                    out.tree.insert(p, k);
                }
            }
            (Some(k), _) => {
                out.tree.insert(p, k);
            }
            (None, Some(k)) => {
                if is_excluded(filter, &p, k) {
                    copy_subtree(dst, &p, out);
                } else if k == Kind::Dir && delete_contents(filter, dst, &p, out) {
                    out.tree.insert(p, Kind::Dir);
                }
            }
            (None, None) => {}
        }
    }
}

/// rsync's `delete_dir_contents()`: delete what is below `dir` on the
/// destination except excluded entries and the directories that lead to
/// them. Returns whether anything is left.
fn delete_contents(filter: &Filter, dst: &Tree, dir: &str, out: &mut Expected) -> bool {
    let mut left = false;
    for name in children(dst, dir) {
        let p = join(dir, name);
        let k = dst[&p];
        if is_excluded(filter, &p, k) {
            copy_subtree(dst, &p, out);
            left = true;
        } else if k == Kind::Dir && delete_contents(filter, dst, &p, out) {
            out.tree.insert(p, Kind::Dir);
            left = true;
        }
    }
    left
}

fn copy_subtree(tree: &Tree, path: &str, out: &mut Expected) {
    let prefix = format!("{path}/");
    for (p, &k) in tree {
        if p == path || p.starts_with(&prefix) {
            out.tree.insert(p.clone(), k);
        }
    }
}

fn with_slash(path: &Path) -> OsString {
    let mut s = path.as_os_str().to_owned();
    s.push("/");
    s
}

/// Run rsync; return its exit code and stderr.
fn rsync(patterns: &[String], src: &Path, dst: &Path) -> (i32, String) {
    let mut cmd = Command::new("rsync");
    cmd.arg("-a").arg("--delete");
    for p in patterns {
        cmd.arg(format!("--exclude={p}"));
    }
    // The C locale makes rsync's `[[:alpha:]]` & co. ASCII-only, as ours.
    cmd.arg(with_slash(src))
        .arg(with_slash(dst))
        .env("LC_ALL", "C");
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run rsync (is it installed?): {e}"));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Compare one run; describe the difference, if any.
fn check(
    patterns: &[String],
    scenario: &str,
    got: &Tree,
    rc: i32,
    stderr: &str,
    want: &Expected,
) -> Option<String> {
    let rc_ok = rc == 0 || (rc == 23 && want.blocked);
    if rc_ok && *got == want.tree {
        return None;
    }
    let only = |a: &Tree, b: &Tree| -> String {
        let paths: Vec<String> = a
            .iter()
            .filter(|(p, k)| b.get(*p) != Some(k))
            .map(|(p, k)| format!("{p:?} ({k:?})"))
            .collect();
        if paths.is_empty() {
            "(none)".to_string()
        } else {
            paths.join(", ")
        }
    };
    Some(format!(
        "pattern set {patterns:?}, {scenario}: rsync exit code {rc}{}\n  \
         only in rsync's result: {}\n  only in the Filter model: {}\n  rsync stderr: {}",
        if want.blocked {
            " (0 or 23 expected: a protected directory blocks a file)"
        } else {
            ""
        },
        only(got, &want.tree),
        only(&want.tree, got),
        stderr.trim()
    ))
}

/// What the runs of some pattern sets found.
#[derive(Default)]
struct Outcome {
    failures: Vec<String>,
    runs: usize,
    /// Sets that exclude something from the source.
    excluding: usize,
    /// Sets that leave destination-only entries in place.
    protecting: usize,
    /// Sets where a protected directory blocks a file.
    blocked: usize,
}

/// Run one pattern set in both scenarios, in directories numbered `i`.
fn run_set(
    i: usize,
    patterns: &[String],
    tmp: &Path,
    src: &Tree,
    dst_before: &Tree,
    out: &mut Outcome,
) {
    let src_root = tmp.join("src");
    let filter = match Filter::new(patterns) {
        Ok(f) => f,
        Err(e) => {
            out.failures.push(format!("pattern set {patterns:?}: {e}"));
            return;
        }
    };

    // Into an empty destination.
    let dst = tmp.join(format!("empty-{i}"));
    let (rc, stderr) = rsync(patterns, &src_root, &dst);
    let want = expected(&filter, src, &Tree::new());
    let got = read_tree(&dst);
    let scenario = "empty destination";
    out.failures
        .extend(check(patterns, scenario, &got, rc, &stderr, &want));
    out.runs += 1;
    if want.tree != *src {
        out.excluding += 1;
    }

    // Into a destination with extra and conflicting entries.
    let dst = tmp.join(format!("full-{i}"));
    build(&dst, DST, "old destination version of");
    let (rc, stderr) = rsync(patterns, &src_root, &dst);
    let want = expected(&filter, src, dst_before);
    let got = read_tree(&dst);
    let scenario = "pre-populated destination";
    out.failures
        .extend(check(patterns, scenario, &got, rc, &stderr, &want));
    out.runs += 1;
    if want.tree.keys().any(|p| !src.contains_key(p)) {
        out.protecting += 1;
    }
    if want.blocked {
        out.blocked += 1;
    }
}

#[test]
fn exclude_matches_rsync() {
    let tmp = tempfile::tempdir().unwrap();
    let tmp = tmp.path();
    build(&tmp.join("src"), SRC, "source version of");
    let src = read_tree(&tmp.join("src"));
    build(&tmp.join("dst-template"), DST, "old destination version of");
    let dst_before = read_tree(&tmp.join("dst-template"));

    // rsync runs are mostly waiting on pipes: run several at once.
    let sets = pattern_sets();
    let workers = 8;
    let outcomes: Vec<Outcome> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|w| {
                let (sets, src, dst_before) = (&sets, &src, &dst_before);
                scope.spawn(move || {
                    let mut out = Outcome::default();
                    for (i, patterns) in sets.iter().enumerate().skip(w).step_by(workers) {
                        run_set(i, patterns, tmp, src, dst_before, &mut out);
                    }
                    out
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });

    let mut total = Outcome::default();
    for o in outcomes {
        total.failures.extend(o.failures);
        total.runs += o.runs;
        total.excluding += o.excluding;
        total.protecting += o.protecting;
        total.blocked += o.blocked;
    }
    assert!(
        total.failures.is_empty(),
        "{} of {} rsync runs differ from the Filter model:\n\n{}",
        total.failures.len(),
        total.runs,
        total.failures.join("\n\n")
    );
    // The table must exercise what it claims to.
    assert_eq!(total.runs, 2 * sets.len());
    assert!(
        total.excluding > sets.len() * 3 / 4,
        "too few sets exclude anything"
    );
    assert!(
        total.protecting > 10,
        "too few sets protect destination files"
    );
    assert!(
        total.blocked > 0,
        "no set blocks a file with a protected directory"
    );
    println!(
        "{} rsync runs agree with the Filter model ({} pattern sets)",
        total.runs,
        sets.len()
    );
}
