//! The file-replication benchmark: `hasync sync --files-only` against
//! `rsync -a --delete` over OpenSSH, side by side, on the harness's loopback
//! cluster (primary okm1, standby okm2, each its own real sshd).
//!
//! Ignored by default; run it by hand (BENCHMARKS.md explains the output):
//!
//! ```text
//! cargo test --release --test it bench_files -- --ignored --nocapture
//! ```
//!
//! Cases, each against the same source tree and, per contender, a standby
//! directory of its own on okm2 in an identical starting state:
//!
//! - (a) initial copy of 50,000 small files (1-20 KiB) in a two-level hashed
//!   layout (`ab/cd/<name>`) plus 4 files of 256 MiB;
//! - (b) a pass with nothing to do;
//! - (c) 1% of each large file rewritten in 64 scattered pieces, 1% of the
//!   small files appended to, 100 deleted, 100 added;
//! - (d) a 2 GiB file: initial copy (d0), then 1% rewritten in 256 scattered
//!   pieces (d); peak RSS of every process involved.
//!
//! Wall time, CPU time and peak RSS of each process come from a tiny Python
//! wrapper (the `wait4` rusage of its child) around the local `hasync` /
//! `rsync` process, as the nodes' `agent_path`, and as rsync's
//! `--rsync-path`. A child's peak RSS includes the memory its parent had
//! when it exec'd, so every figure has the wrapper's ~9 MiB as a floor
//! (printed at the start). The test fails only if a standby tree differs
//! from the source; missed targets are printed as MISS.
//!
//! Contenders: `hasync` runs on the primary (`address = "local"` for okm1:
//! its agent in process, one SSH hop to the standby), the topology of the
//! deployment (cron on the primary) and of rsync, which runs on the source.
//!
//! Environment:
//! - `HASYNC_BENCH_SCALE` (default 1.0): multiplies file counts and sizes
//!   (0.05 is a quick check of the code);
//! - `HASYNC_BENCH_REPS_A` (default 2) and `HASYNC_BENCH_REPS` (default 3):
//!   runs of (a), and of (b) and (c); medians are reported;
//! - `HASYNC_BENCH_EXTRA`: two reference contenders, `hasync-remote` (hasync
//!   on a third machine: the primary reached over SSH too, every byte
//!   crossing two SSH hops) and `rsync --fsync`.
//!   0: not run; 1: run in every case but (a), where their standbys are
//!   seeded with `cp -a` instead (saves ~50 s per run of (a)); 2 (default):
//!   run everywhere. The defaults take about 7 minutes on 2 vCPUs.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use crate::harness::cluster;
use crate::setup::{edit_toml, quoted, Setup};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const RSS_TARGET_KIB: u64 = 128 * 1024;

// ---------------------------------------------------------------------------
// Parameters and data
// ---------------------------------------------------------------------------

struct Params {
    scale: f64,
    /// Repetitions of (a), and of (b) and (c).
    reps_a: usize,
    reps: usize,
    /// 0: only hasync and rsync; 1: the reference contenders too, except in
    /// (a) (their standbys are seeded with `cp -a` instead); 2: everywhere.
    extra: u32,
    small_files: u64,
    large_files: usize,
    large_size: u64,
    huge_size: u64,
    /// Deleted and added small files in (c).
    churn: usize,
}

impl Params {
    fn from_env() -> Params {
        let scale: f64 = env_parse("HASYNC_BENCH_SCALE", 1.0);
        assert!(
            scale > 0.0 && scale <= 4.0,
            "HASYNC_BENCH_SCALE must be in (0, 4]"
        );
        let reps: usize = env_parse("HASYNC_BENCH_REPS", 3);
        let reps_a: usize = env_parse("HASYNC_BENCH_REPS_A", 2);
        let extra = env_parse::<u32>("HASYNC_BENCH_EXTRA", 2);
        // Sizes stay multiples of 4 KiB.
        let scaled = |n: u64| (((n as f64 * scale) as u64) / (4 * KIB)).max(1) * 4 * KIB;
        Params {
            scale,
            reps: reps.max(1),
            reps_a: reps_a.max(1),
            extra,
            small_files: ((50_000.0 * scale) as u64).max(200),
            large_files: 4,
            large_size: scaled(256 * MIB),
            huge_size: scaled(2 * GIB),
            churn: ((100.0 * scale).round() as usize).max(1),
        }
    }
}

fn env_parse<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a valid value")),
        Err(_) => default,
    }
}

/// xorshift64*: fast enough to fill gigabytes in seconds, and reproducible.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn fill(&mut self, buf: &mut [u8]) {
        let mut chunks = buf.chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&self.next().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        let v = self.next().to_le_bytes();
        rest.copy_from_slice(&v[..rest.len()]);
    }
}

/// The hashed two-level layout of document stores: `ab/cd/doc-<n>.bin`.
fn small_path(i: u64) -> String {
    let mut h = i.wrapping_add(0x9E37_79B9_7F4A_7C15);
    h = (h ^ (h >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    h ^= h >> 31;
    format!("{:02x}/{:02x}/doc-{i:07}.bin", h >> 56, (h >> 48) & 0xff)
}

/// A source tree and what the benchmark put in it.
struct Tree {
    root: PathBuf,
    /// Indices of the small files present.
    small: Vec<u64>,
    next_small: u64,
    /// Relative paths of the large files.
    large: Vec<String>,
}

impl Tree {
    fn new(root: PathBuf) -> Tree {
        fs::create_dir_all(&root).unwrap();
        Tree {
            root,
            small: Vec::new(),
            next_small: 0,
            large: Vec::new(),
        }
    }

    fn add_small(&mut self, rng: &mut Rng, buf: &mut Vec<u8>) {
        let i = self.next_small;
        self.next_small += 1;
        let p = self.root.join(small_path(i));
        let size = 1024 + rng.below(20 * 1024 - 1024 + 1) as usize;
        buf.resize(size, 0);
        rng.fill(buf);
        if let Err(e) = fs::write(&p, &buf[..]) {
            if e.kind() != std::io::ErrorKind::NotFound {
                panic!("write {}: {e}", p.display());
            }
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(&p, &buf[..]).unwrap();
        }
        self.small.push(i);
    }

    fn add_large(&mut self, rel: &str, size: u64, rng: &mut Rng) {
        let p = self.root.join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        let mut f = fs::File::create(&p).unwrap();
        let mut buf = vec![0u8; (8 * MIB).min(size) as usize];
        let mut left = size;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            rng.fill(&mut buf[..n]);
            f.write_all(&buf[..n]).unwrap();
            left -= n as u64;
        }
        self.large.push(rel.to_string());
    }
}

/// Rewrite `fraction` of a file in `pieces` pieces at random offsets, in
/// place (same size, new mtime). Returns the bytes written.
fn scatter(path: &Path, fraction: f64, pieces: u64, rng: &mut Rng) -> u64 {
    let f = fs::OpenOptions::new().write(true).open(path).unwrap();
    let size = f.metadata().unwrap().len();
    let len = ((size as f64 * fraction) as u64 / pieces).max(1);
    let mut buf = vec![0u8; len as usize];
    for _ in 0..pieces {
        rng.fill(&mut buf);
        f.write_at(&buf, rng.below(size - len)).unwrap();
    }
    len * pieces
}

/// `k` distinct numbers below `n`.
fn distinct(rng: &mut Rng, n: usize, k: usize) -> Vec<usize> {
    assert!(k <= n);
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    while out.len() < k {
        let x = rng.below(n as u64) as usize;
        if seen.insert(x) {
            out.push(x);
        }
    }
    out
}

/// Case (c)'s changes. Returns a description.
fn mutate(tree: &mut Tree, p: &Params, rng: &mut Rng) -> String {
    let mut rewritten = 0;
    for rel in &tree.large {
        rewritten += scatter(&tree.root.join(rel), 0.01, 64, rng);
    }
    let appends = (tree.small.len() / 100).max(1);
    let picks = distinct(rng, tree.small.len(), appends + p.churn);
    let (app, del) = picks.split_at(appends);
    let mut appended = 0;
    let mut buf = Vec::new();
    for &k in app {
        let n = 1024 + rng.below(3 * 1024 + 1) as usize;
        buf.resize(n, 0);
        rng.fill(&mut buf);
        let path = tree.root.join(small_path(tree.small[k]));
        let mut f = fs::OpenOptions::new().append(true).open(path).unwrap();
        f.write_all(&buf).unwrap();
        appended += n as u64;
    }
    let mut del = del.to_vec();
    del.sort_unstable_by(|a, b| b.cmp(a));
    for k in del {
        fs::remove_file(tree.root.join(small_path(tree.small[k]))).unwrap();
        tree.small.swap_remove(k);
    }
    for _ in 0..p.churn {
        tree.add_small(rng, &mut buf);
    }
    format!(
        "rewrote {} in {} large files, appended {} to {appends} small files, deleted {} and added {} small files",
        fmt_bytes(rewritten),
        tree.large.len(),
        fmt_bytes(appended),
        p.churn,
        p.churn
    )
}

// ---------------------------------------------------------------------------
// Tree comparison
// ---------------------------------------------------------------------------

#[derive(Clone, Debug, PartialEq, Eq)]
enum Content {
    Dir,
    File([u8; 32]),
    Link(Vec<u8>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Meta {
    size: u64,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: (i64, i64),
    content: Content,
}

/// Stat key under which a file's hash stays valid: any write changes the
/// ctime (which nobody can set), a new file is a new inode or a new ctime.
type StatKey = (u64, u64, u64, i64, i64, i64, i64);

/// Snapshots trees with content hashes, re-hashing only files whose
/// (device, inode, size, mtime, ctime) changed since they were last hashed:
/// every file a run wrote is hashed in full.
#[derive(Default)]
struct Checker {
    cache: HashMap<StatKey, [u8; 32]>,
    hashed: u64,
    secs: f64,
}

impl Checker {
    fn snapshot(&mut self, root: &Path) -> BTreeMap<Vec<u8>, Meta> {
        let t = Instant::now();
        let mut out = BTreeMap::new();
        let mut buf = vec![0u8; MIB as usize];
        self.walk(root, root, &mut out, &mut buf);
        self.secs += t.elapsed().as_secs_f64();
        out
    }

    fn walk(&mut self, root: &Path, dir: &Path, out: &mut BTreeMap<Vec<u8>, Meta>, buf: &mut [u8]) {
        for e in fs::read_dir(dir).unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display())) {
            let p = e.unwrap().path();
            let rel = p
                .strip_prefix(root)
                .unwrap()
                .as_os_str()
                .as_bytes()
                .to_vec();
            let m = fs::symlink_metadata(&p).unwrap();
            let ft = m.file_type();
            let content = if ft.is_symlink() {
                Content::Link(fs::read_link(&p).unwrap().as_os_str().as_bytes().to_vec())
            } else if ft.is_dir() {
                self.walk(root, &p, out, buf);
                Content::Dir
            } else {
                let key = (
                    m.dev(),
                    m.ino(),
                    m.size(),
                    m.mtime(),
                    m.mtime_nsec(),
                    m.ctime(),
                    m.ctime_nsec(),
                );
                let hash = match self.cache.get(&key) {
                    Some(h) => *h,
                    None => {
                        let h = hash_file(&p, buf);
                        self.hashed += m.size();
                        self.cache.insert(key, h);
                        h
                    }
                };
                Content::File(hash)
            };
            let meta = Meta {
                size: if ft.is_dir() { 0 } else { m.size() },
                mode: m.mode() & 0o7777,
                uid: m.uid(),
                gid: m.gid(),
                // Symlink times are not compared (rsync -a sets them, but
                // neither tool is measured on it here: there are none).
                mtime: if ft.is_symlink() {
                    (0, 0)
                } else {
                    (m.mtime(), m.mtime_nsec())
                },
                content,
            };
            out.insert(rel, meta);
        }
    }
}

fn hash_file(p: &Path, buf: &mut [u8]) -> [u8; 32] {
    let mut f = fs::File::open(p).unwrap_or_else(|e| panic!("open {}: {e}", p.display()));
    let mut h = blake3::Hasher::new();
    loop {
        let n = f.read(buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    *h.finalize().as_bytes()
}

/// How a standby differs from the source: the first real differences (the
/// test fails on any), and directories that differ only in their mtime.
/// Those are counted, not failed on: the brief's equality is paths, types,
/// sizes, modes, owners and contents, and a directory's mtime is metadata
/// one tool may restore later than another.
#[derive(Default)]
struct Differences {
    errors: Vec<String>,
    dir_mtimes: usize,
    dir_example: Option<String>,
}

fn differences(src: &BTreeMap<Vec<u8>, Meta>, dst: &BTreeMap<Vec<u8>, Meta>) -> Differences {
    let mut d = Differences::default();
    let name = |k: &[u8]| String::from_utf8_lossy(k).into_owned();
    for (k, v) in src {
        match dst.get(k) {
            None => d
                .errors
                .push(format!("missing on the standby: {}", name(k))),
            Some(w) if w != v => {
                if v.content == Content::Dir && w.content == Content::Dir && v.mtime != w.mtime {
                    let same = Meta {
                        mtime: v.mtime,
                        ..w.clone()
                    };
                    if &same == v {
                        d.dir_mtimes += 1;
                        d.dir_example.get_or_insert_with(|| {
                            format!(
                                "{}/ mtime {:?} on the source, {:?} on the standby",
                                name(k),
                                v.mtime,
                                w.mtime
                            )
                        });
                        continue;
                    }
                }
                d.errors
                    .push(format!("differs: {}: {v:?} vs {w:?}", name(k)))
            }
            _ => {}
        }
        if d.errors.len() >= 20 {
            return d;
        }
    }
    let room = 20 - d.errors.len();
    for k in dst.keys().filter(|k| !src.contains_key(*k)).take(room) {
        d.errors.push(format!("only on the standby: {}", name(k)));
    }
    d
}

// ---------------------------------------------------------------------------
// Running the contenders
// ---------------------------------------------------------------------------

/// Resource use of one process (and its waited-for descendants), as the
/// wrapper reports it.
#[derive(Clone, Copy, Debug, Default)]
struct Usage {
    rss_kib: u64,
    user: f64,
    sys: f64,
    wall: f64,
}

/// One run of one contender.
#[derive(Clone, Debug, Default)]
struct Sample {
    /// The local process: `hasync` or `rsync` (with its `ssh` child).
    local: Usage,
    /// Remote processes by label: `agent okm1`, `agent okm2`, `rsync-server`.
    remote: Vec<(String, Usage)>,
    sent: u64,
    received: u64,
    literal: u64,
    matched: u64,
    scan: Option<f64>,
    transfer: Option<f64>,
    /// Directories whose mtime differed from the source's after the run.
    dir_mtimes: usize,
}

impl Sample {
    fn wire(&self) -> u64 {
        self.sent + self.received
    }
    /// The largest peak RSS of any process of this contender.
    fn max_rss(&self) -> u64 {
        self.remote
            .iter()
            .map(|(_, u)| u.rss_kib)
            .chain([self.local.rss_kib])
            .max()
            .unwrap_or(0)
    }
}

enum Tool {
    Hasync { config: PathBuf },
    Rsync { extra: Vec<&'static str> },
}

struct Contender {
    name: &'static str,
    /// A reference contender, not one the targets compare.
    extra: bool,
    tool: Tool,
    dst: PathBuf,
}

/// Paths and tools shared by every run.
struct Bench {
    dir: PathBuf,
    /// `wrap.py OUT PROG ARGS...`
    wrapper: PathBuf,
    /// Where the wrappers write: one file per process label.
    usage_dir: PathBuf,
    /// `agent_path` wrappers for okm1 and okm2.
    agents: [PathBuf; 2],
    rsh: String,
    okm2_ip: String,
}

const WRAPPER: &str = r#"#!/usr/bin/python3 -S
# Generated by hasync's tests/it/bench.rs. Runs a program and appends its
# peak RSS (KiB), user and system CPU seconds and wall seconds to a file.
# stdin, stdout and stderr are inherited untouched.
import os, signal, sys, time
OUT = @OUT@
PROG = @PROG@
args = sys.argv[1:]
if OUT is None:
    OUT = args.pop(0)
argv = ([PROG] + args) if PROG is not None else args
t0 = time.monotonic()
pid = os.posix_spawnp(argv[0], argv, os.environ,
                      setsigdef=(signal.SIGPIPE, signal.SIGXFSZ))
_, status, ru = os.wait4(pid, 0)
wall = time.monotonic() - t0
with open(OUT, "a") as f:
    f.write("%d %.6f %.6f %.6f\n" % (ru.ru_maxrss, ru.ru_utime, ru.ru_stime, wall))
code = os.waitstatus_to_exitcode(status)
sys.exit(code if code >= 0 else 128 - code)
"#;

fn write_wrapper(path: &Path, out: Option<&Path>, prog: Option<&str>) {
    let py = |s: Option<String>| s.map_or("None".to_string(), |s| format!("{s:?}"));
    let text = WRAPPER
        .replace("@OUT@", &py(out.map(|p| p.display().to_string())))
        .replace("@PROG@", &py(prog.map(str::to_string)));
    fs::write(path, text).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).unwrap();
}

impl Bench {
    fn new(dir: &Path) -> Bench {
        assert!(
            Path::new("/usr/bin/python3").exists(),
            "the benchmark measures peak RSS with a /usr/bin/python3 wrapper: install python3"
        );
        let c = cluster();
        let usage_dir = dir.join("usage");
        fs::create_dir_all(&usage_dir).unwrap();
        let wrapper = dir.join("wrap.py");
        write_wrapper(&wrapper, None, None);
        let agents = ["okm1", "okm2"].map(|n| {
            let p = dir.join(format!("agent-{n}"));
            write_wrapper(
                &p,
                Some(&usage_dir.join(format!("agent {n}"))),
                Some(env!("CARGO_BIN_EXE_hasync")),
            );
            p
        });
        Bench {
            dir: dir.to_path_buf(),
            wrapper,
            usage_dir,
            agents,
            rsh: c.rsync_rsh("okm2"),
            okm2_ip: c.node("okm2").ip.clone(),
        }
    }

    /// Run `argv` under the wrapper; returns its usage, stdout and stderr.
    fn run(&self, argv: &[String]) -> (Usage, Vec<(String, Usage)>, String, String) {
        for e in fs::read_dir(&self.usage_dir).unwrap() {
            fs::remove_file(e.unwrap().path()).unwrap();
        }
        let local = self.usage_dir.join("local");
        let out = Command::new(&self.wrapper)
            .arg(&local)
            .args(argv)
            .env_remove("HASYNC_CONFIG")
            .env_remove("SSH_AUTH_SOCK")
            .stdin(Stdio::null())
            .output()
            .expect("cannot run the wrapper");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            out.status.success(),
            "{} failed ({}):\n--- stdout ---\n{}\n--- stderr ---\n{stderr}",
            argv.join(" "),
            out.status,
            tail(&stdout, 4000)
        );
        let mut local_usage = None;
        let mut remote = Vec::new();
        // The remote wrappers have written before the local process exits
        // (its SSH channel closes after them); allow a moment anyway.
        let read = |p: &Path| -> Option<Usage> {
            let text = fs::read_to_string(p).ok()?;
            let line = text.lines().last()?;
            let f: Vec<&str> = line.split_whitespace().collect();
            Some(Usage {
                rss_kib: f[0].parse().ok()?,
                user: f[1].parse().ok()?,
                sys: f[2].parse().ok()?,
                wall: f[3].parse().ok()?,
            })
        };
        for _ in 0..50 {
            local_usage = read(&local);
            if local_usage.is_some() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let mut names: Vec<PathBuf> = fs::read_dir(&self.usage_dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p != &local)
            .collect();
        names.sort();
        for p in names {
            if let Some(u) = read(&p) {
                remote.push((p.file_name().unwrap().to_string_lossy().into_owned(), u));
            }
        }
        (
            local_usage.expect("the wrapper wrote no usage"),
            remote,
            stdout,
            stderr,
        )
    }

    fn run_contender(&self, c: &Contender, src: &Path) -> Sample {
        match &c.tool {
            Tool::Hasync { config } => {
                let argv: Vec<String> = [
                    env!("CARGO_BIN_EXE_hasync"),
                    "-c",
                    &config.display().to_string(),
                    "--no-progress",
                    "sync",
                    "--files-only",
                    "--json",
                ]
                .iter()
                .map(|s| s.to_string())
                .collect();
                let (local, remote, stdout, stderr) = self.run(&argv);
                let v: serde_json::Value = serde_json::from_str(&stdout).unwrap_or_else(|e| {
                    panic!("hasync --json: {e}:\n{}\n{stderr}", tail(&stdout, 2000))
                });
                let s = &v[0]["summary"];
                let n = |k: &str| s[k].as_u64().unwrap_or_else(|| panic!("no {k} in {s}"));
                Sample {
                    local,
                    remote,
                    sent: n("wire_sent"),
                    received: n("wire_received"),
                    literal: n("literal_bytes"),
                    matched: n("matched_bytes"),
                    scan: s["scan_secs"].as_f64(),
                    transfer: s["transfer_secs"].as_f64(),
                    dir_mtimes: 0,
                }
            }
            Tool::Rsync { extra } => {
                let mut argv: Vec<String> = ["rsync", "-a", "--delete", "--stats"]
                    .iter()
                    .chain(extra)
                    .map(|s| s.to_string())
                    .collect();
                argv.push("-e".into());
                argv.push(self.rsh.clone());
                argv.push(format!(
                    "--rsync-path={} {} rsync",
                    self.wrapper.display(),
                    self.usage_dir.join("rsync-server").display()
                ));
                argv.push(format!("{}/", src.display()));
                argv.push(format!("root@{}:{}/", self.okm2_ip, c.dst.display()));
                let (local, remote, stdout, _) = self.run(&argv);
                let stat = |prefix: &str| -> u64 {
                    let line = stdout
                        .lines()
                        .find(|l| l.starts_with(prefix))
                        .unwrap_or_else(|| panic!("rsync --stats lacks {prefix:?}:\n{stdout}"));
                    line[prefix.len()..]
                        .chars()
                        .take_while(|c| c.is_ascii_digit() || *c == ',' || *c == ' ')
                        .filter(char::is_ascii_digit)
                        .collect::<String>()
                        .parse()
                        .unwrap()
                };
                Sample {
                    local,
                    remote,
                    sent: stat("Total bytes sent:"),
                    received: stat("Total bytes received:"),
                    literal: stat("Literal data:"),
                    matched: stat("Matched data:"),
                    scan: None,
                    transfer: None,
                    dir_mtimes: 0,
                }
            }
        }
    }
}

/// The contenders for one source tree; `tag` names their standby dirs.
fn contenders(b: &Bench, s: &mut Setup, p: &Params, src: &Path, tag: &str) -> Vec<Contender> {
    let mut out = Vec::new();
    let mut add = |name: &'static str, tool: Tool, dst: PathBuf| {
        fs::create_dir_all(&dst).unwrap();
        let extra = !out.is_empty() && name != "rsync";
        out.push(Contender {
            name,
            extra,
            tool,
            dst,
        });
    };
    let mut hasync_config = |name: &str, dst: &Path, local: bool| -> PathBuf {
        s.roots = [src.to_path_buf(), dst.to_path_buf()];
        let mut edits = vec![
            ("nodes.okm1", "agent_path", quoted(&b.agents[0])),
            ("nodes.okm2", "agent_path", quoted(&b.agents[1])),
        ];
        if local {
            edits.push(("nodes.okm1", "address", Some("\"local\"".into())));
        }
        let path = b.dir.join(format!("{name}-{tag}.toml"));
        fs::write(&path, edit_toml(&s.config_text(), &edits)).unwrap();
        path
    };
    let dst = |name: &str| b.dir.join(format!("dst-{name}-{tag}"));
    // The headline: hasync run on the primary (its agent in process, one SSH
    // hop to the standby), the deployment topology and rsync's own.
    let cfg = hasync_config("hasync", &dst("hasync"), true);
    add("hasync", Tool::Hasync { config: cfg }, dst("hasync"));
    add("rsync", Tool::Rsync { extra: vec![] }, dst("rsync"));
    if p.extra > 0 {
        let cfg = hasync_config("hasync-remote", &dst("hasync-remote"), false);
        add(
            "hasync-remote",
            Tool::Hasync { config: cfg },
            dst("hasync-remote"),
        );
        add(
            "rsync-fsync",
            Tool::Rsync {
                extra: vec!["--fsync"],
            },
            dst("rsync-fsync"),
        );
    }
    out
}

// ---------------------------------------------------------------------------
// Results
// ---------------------------------------------------------------------------

/// All samples of one case.
struct CaseResult {
    id: &'static str,
    title: String,
    /// Per contender (in contender order), one sample per repetition.
    samples: Vec<Vec<Sample>>,
    load: String,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn median_u(v: Vec<u64>) -> u64 {
    median(v.into_iter().map(|x| x as f64).collect()).round() as u64
}

impl CaseResult {
    fn wall(&self, c: usize) -> f64 {
        median(self.samples[c].iter().map(|s| s.local.wall).collect())
    }
    fn wire(&self, c: usize) -> u64 {
        median_u(self.samples[c].iter().map(Sample::wire).collect())
    }
    /// Wall ratio of contender `a` to `b` in each repetition (both ran in
    /// the same round, a few seconds apart).
    fn per_run(&self, a: usize, b: usize) -> String {
        self.samples[a]
            .iter()
            .zip(&self.samples[b])
            .map(|(x, y)| format!("{:.2}", x.local.wall / y.local.wall))
            .collect::<Vec<_>>()
            .join(", ")
    }
    fn max_rss(&self, c: usize) -> u64 {
        self.samples[c]
            .iter()
            .map(Sample::max_rss)
            .max()
            .unwrap_or(0)
    }
}

fn fmt_bytes(n: u64) -> String {
    if n < 10 * KIB {
        format!("{n} B")
    } else if n < 10 * MIB {
        format!("{:.1} KiB", n as f64 / KIB as f64)
    } else if n < 10 * GIB {
        format!("{:.1} MiB", n as f64 / MIB as f64)
    } else {
        format!("{:.2} GiB", n as f64 / GIB as f64)
    }
}

fn fmt_rss(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

fn tail(s: &str, n: usize) -> &str {
    let mut start = s.len().saturating_sub(n);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

fn command_line(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .map(|o| {
            let text = if o.stdout.is_empty() {
                o.stderr
            } else {
                o.stdout
            };
            String::from_utf8_lossy(&text)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_string()
        })
        .unwrap_or_else(|e| format!("({cmd}: {e})"))
}

fn machine_facts() -> String {
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_default();
    let mem = fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("MemTotal"))
        .map(|l| {
            l.split_whitespace()
                .nth(1)
                .unwrap_or("0")
                .parse::<u64>()
                .unwrap_or(0)
        })
        .unwrap_or(0);
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let manifest = env!("CARGO_MANIFEST_DIR");
    let commit = command_line("git", &["-C", manifest, "rev-parse", "--short", "HEAD"]);
    let dirty = Command::new("git")
        .args([
            "-C",
            manifest,
            "status",
            "--porcelain",
            "--untracked-files=no",
        ])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| {
            if o.stdout.is_empty() {
                "clean".to_string()
            } else {
                format!(
                    "uncommitted changes in {}",
                    String::from_utf8_lossy(&o.stdout)
                        .lines()
                        .map(|l| l[3..].to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }
        })
        .unwrap_or_else(|| "not a git checkout".into());
    format!(
        "machine: {nproc} CPUs ({model}), {:.1} GiB RAM, Linux {}\n\
         build: {} ({}), commit {commit}, working tree {dirty}\n\
         tools: {} / {}",
        mem as f64 / (1024.0 * 1024.0),
        kernel.trim(),
        if cfg!(debug_assertions) {
            "DEBUG build: timings meaningless"
        } else {
            "release"
        },
        env!("CARGO_BIN_EXE_hasync"),
        command_line("rsync", &["--version"]),
        command_line("ssh", &["-V"]),
    )
}

// ---------------------------------------------------------------------------
// The benchmark
// ---------------------------------------------------------------------------

fn sync_disks() {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
}

/// Run every contender once, in an order rotated by `rep`, each starting
/// from the same state; check each standby against the source.
fn round(
    b: &Bench,
    cs: &[&Contender],
    src: &Path,
    rep: usize,
    checker: &mut Checker,
) -> Vec<Sample> {
    let want = checker.snapshot(src);
    let mut out = vec![Sample::default(); cs.len()];
    for k in 0..cs.len() {
        let i = (k + rep) % cs.len();
        let c = cs[i];
        sync_disks();
        let mut s = b.run_contender(c, src);
        let diffs = differences(&want, &checker.snapshot(&c.dst));
        assert!(
            diffs.errors.is_empty(),
            "after {} the standby {} differs from the source:\n{}",
            c.name,
            c.dst.display(),
            diffs.errors.join("\n")
        );
        s.dir_mtimes = diffs.dir_mtimes;
        if let Some(e) = diffs.dir_example {
            println!(
                "    WARNING: after {}, {} directories have another mtime than on the source, e.g. {e}",
                c.name, diffs.dir_mtimes
            );
        }
        println!(
            "    {:<13} {:>8.2}s  wire {:>10}  rss {:>9}  {}",
            c.name,
            s.local.wall,
            fmt_bytes(s.wire()),
            fmt_rss(s.max_rss()),
            s.scan
                .map(|sc| format!("scan {sc:.2}s transfer {:.2}s", s.transfer.unwrap_or(0.0)))
                .unwrap_or_default()
        );
        let _ = std::io::stdout().flush();
        out[i] = s;
    }
    out
}

/// Which case, how often, and whether the reference contenders run in it.
struct Case {
    id: &'static str,
    title: String,
    reps: usize,
    extras: bool,
}

fn run_case(
    case: Case,
    mut before: impl FnMut(usize) -> Option<String>,
    b: &Bench,
    cs: &[Contender],
    src: &Path,
    checker: &mut Checker,
) -> CaseResult {
    let Case {
        id,
        title,
        reps,
        extras,
    } = case;
    let load = loadavg();
    println!("\n({id}) {title}  [load {load}]");
    let t = Instant::now();
    let timed: Vec<usize> = (0..cs.len()).filter(|&i| extras || !cs[i].extra).collect();
    let run: Vec<&Contender> = timed.iter().map(|&i| &cs[i]).collect();
    let mut samples = vec![Vec::new(); cs.len()];
    for rep in 0..reps {
        if let Some(what) = before(rep) {
            println!("  rep {}: {what}", rep + 1);
        } else {
            println!("  rep {}", rep + 1);
        }
        for (k, s) in round(b, &run, src, rep, checker).into_iter().enumerate() {
            samples[timed[k]].push(s);
        }
    }
    // Contenders not timed here still need the state the others reached:
    // a copy of rsync's standby (checked like a run).
    let want = checker.snapshot(src);
    for c in cs.iter().filter(|c| !extras && c.extra) {
        let _ = fs::remove_dir_all(&c.dst);
        let st = Command::new("cp")
            .arg("-a")
            .arg(&cs[1].dst)
            .arg(&c.dst)
            .status()
            .unwrap();
        assert!(st.success(), "cp -a to {}", c.dst.display());
        let d = differences(&want, &checker.snapshot(&c.dst));
        assert!(
            d.errors.is_empty() && d.dir_mtimes == 0,
            "cp -a: {:?}",
            d.errors
        );
        println!(
            "    {:<13} (not timed here: standby seeded with cp -a)",
            c.name
        );
    }
    println!("  ({id}) took {:.0}s", t.elapsed().as_secs_f64());
    CaseResult {
        id,
        title,
        samples,
        load,
    }
}

fn reset(dst: &Path) {
    fs::remove_dir_all(dst).unwrap();
    fs::create_dir_all(dst).unwrap();
}

#[test]
#[ignore = "a benchmark of several minutes: run by hand, see BENCHMARKS.md"]
fn bench_files() {
    let t0 = Instant::now();
    let p = Params::from_env();
    let mut s = Setup::exclusive("bench-files");
    s.engine = None;
    s.max_delete = Some(1_000_000);
    let load_start = loadavg();
    let facts = machine_facts();
    println!("\n=== hasync file-replication benchmark ===\n{facts}");
    println!(
        "scale {} ({} small files, {} x {}, huge file {}), reps: (a) {}, (b) and (c) {}, extra contenders: {}",
        p.scale,
        p.small_files,
        p.large_files,
        fmt_bytes(p.large_size),
        fmt_bytes(p.huge_size),
        p.reps_a,
        p.reps,
        match p.extra {
            0 => "none",
            1 => "in (b), (c), (d0), (d)",
            _ => "in every case",
        }
    );
    println!("load average at start: {load_start}");
    let b = Bench::new(&s.dir);
    let mut checker = Checker::default();

    // The wrapper's own floor: the peak RSS it reports for a trivial program.
    let (floor, _, _, _) = b.run(&["/bin/true".to_string()]);
    println!(
        "RSS floor of the wrapper (/bin/true): {}",
        fmt_rss(floor.rss_kib)
    );

    // The trees.
    let t = Instant::now();
    let mut rng = Rng::new(0x4841_5359_4E43);
    let mut files = Tree::new(s.dir.join("src-files"));
    let mut buf = Vec::new();
    for _ in 0..p.small_files {
        files.add_small(&mut rng, &mut buf);
    }
    for k in 0..p.large_files {
        files.add_large(&format!("large/big-{k}.bin"), p.large_size, &mut rng);
    }
    let mut huge = Tree::new(s.dir.join("src-huge"));
    huge.add_large("huge.bin", p.huge_size, &mut rng);
    sync_disks();
    println!("generated the trees in {:.1}s", t.elapsed().as_secs_f64());
    let cf = contenders(&b, &mut s, &p, &files.root, "files");
    let ch = contenders(&b, &mut s, &p, &huge.root, "huge");
    println!(
        "contenders: {}",
        cf.iter().map(|c| c.name).collect::<Vec<_>>().join(", ")
    );

    let mut results = Vec::new();
    results.push(run_case(
        Case {
            id: "a",
            title: format!(
                "initial copy: {} small files + {} x {}",
                p.small_files,
                p.large_files,
                fmt_bytes(p.large_size)
            ),
            reps: p.reps_a,
            extras: p.extra >= 2,
        },
        |rep| {
            if rep > 0 {
                for c in &cf {
                    reset(&c.dst);
                }
                Some("standbys emptied".into())
            } else {
                None
            }
        },
        &b,
        &cf,
        &files.root,
        &mut checker,
    ));
    results.push(run_case(
        Case {
            id: "b",
            title: "no-change pass".into(),
            reps: p.reps,
            extras: true,
        },
        |_| None,
        &b,
        &cf,
        &files.root,
        &mut checker,
    ));
    let files_root = files.root.clone();
    let mut mut_rng = Rng::new(0xC0FFEE);
    results.push(run_case(
        Case {
            id: "c",
            title: format!(
                "1% of each large file rewritten in 64 pieces, 1% of the small files appended to, {} deleted, {} added",
                p.churn, p.churn
            ),
            reps: p.reps,
            extras: true,
        },
        |_| Some(mutate(&mut files, &p, &mut mut_rng)),
        &b,
        &cf,
        &files_root,
        &mut checker,
    ));
    results.push(run_case(
        Case {
            id: "d0",
            title: format!("initial copy of one {} file", fmt_bytes(p.huge_size)),
            reps: 1,
            extras: true,
        },
        |_| None,
        &b,
        &ch,
        &huge.root,
        &mut checker,
    ));
    let huge_path = huge.root.join("huge.bin");
    results.push(run_case(
        Case {
            id: "d",
            title: format!(
                "1% of the {} file rewritten in 256 pieces",
                fmt_bytes(p.huge_size)
            ),
            reps: 1,
            extras: true,
        },
        |_| {
            let n = scatter(&huge_path, 0.01, 256, &mut mut_rng);
            Some(format!("rewrote {}", fmt_bytes(n)))
        },
        &b,
        &ch,
        &huge.root,
        &mut checker,
    ));

    let report = report(&results, &cf, &p, &facts, &load_start, floor.rss_kib);
    println!("\n{report}");
    println!(
        "content checks hashed {} in {:.1}s; total run {:.0}s",
        fmt_bytes(checker.hashed),
        checker.secs,
        t0.elapsed().as_secs_f64()
    );
}

fn report(
    results: &[CaseResult],
    cs: &[Contender],
    p: &Params,
    facts: &str,
    load_start: &str,
    floor: u64,
) -> String {
    let mut r = String::new();
    let _ = writeln!(
        r,
        "=== results (medians of {} runs for (a), {} for (b) and (c), 1 for (d0) and (d)) ===",
        p.reps_a, p.reps
    );
    let _ = writeln!(r, "{facts}");
    let _ = writeln!(
        r,
        "load average: start {load_start}, end {}; files warm in the page cache, sync(2) before every run",
        loadavg()
    );
    let _ = writeln!(r);
    let _ = writeln!(
        r,
        "hasync runs on the primary (`address = \"local\"`: its agent in process, one SSH hop to the standby), as rsync does"
    );
    let _ = writeln!(
        r,
        "| case | hasync wall | rsync wall | ratio | per-run wall ratios | hasync wire | rsync wire | ratio | target | result |"
    );
    let _ = writeln!(r, "|---|---:|---:|---:|---|---:|---:|---:|---|---|");
    let (h, rs) = (0, 1);
    for c in results {
        let (hw, rw) = (c.wall(h), c.wall(rs));
        let (hb, rb) = (c.wire(h), c.wire(rs));
        let wall_ratio = hw / rw;
        let wire_ratio = hb as f64 / rb.max(1) as f64;
        let rss = c.max_rss(h);
        let (target, pass) = match c.id {
            "a" => ("wall <= 0.7".to_string(), wall_ratio <= 0.7),
            "b" => ("wall <= 0.5".to_string(), wall_ratio <= 0.5),
            "c" => (
                "wall <= 0.8, wire <= 1.2".to_string(),
                wall_ratio <= 0.8 && wire_ratio <= 1.2,
            ),
            _ => (
                format!("peak RSS <= 128 MiB (hasync max {})", fmt_rss(rss)),
                rss <= RSS_TARGET_KIB,
            ),
        };
        let verdict = if pass {
            "pass".to_string()
        } else {
            let mut why = Vec::new();
            match c.id {
                "a" | "b" | "c" => {
                    let limit = match c.id {
                        "a" => 0.7,
                        "b" => 0.5,
                        _ => 0.8,
                    };
                    if wall_ratio > limit {
                        why.push(format!("wall x{:.2} over", wall_ratio / limit));
                    }
                    if c.id == "c" && wire_ratio > 1.2 {
                        why.push(format!("wire x{:.2} over", wire_ratio / 1.2));
                    }
                }
                _ => why.push(format!(
                    "RSS x{:.2} over",
                    rss as f64 / RSS_TARGET_KIB as f64
                )),
            }
            format!("MISS ({})", why.join(", "))
        };
        let _ = writeln!(
            r,
            "| ({}) | {hw:.2}s | {rw:.2}s | {wall_ratio:.2} | {} | {} | {} | {wire_ratio:.2} | {target} | {verdict} |",
            c.id,
            c.per_run(h, rs),
            fmt_bytes(hb),
            fmt_bytes(rb),
        );
    }

    // The reference contenders separate the costs: the second SSH hop
    // (hasync vs hasync-remote) and per-file fsync (rsync vs rsync --fsync).
    if cs.len() == 4 {
        let _ = writeln!(
            r,
            "\nReference wall ratios (hasync-remote: hasync on a third machine, the primary reached over SSH too, \
             so every byte crosses two SSH hops; rsync-fsync: rsync --fsync):"
        );
        let _ = writeln!(
            r,
            "| case | hasync-remote / rsync (per run) | hasync / rsync-fsync | hasync-remote / rsync-fsync | rsync-fsync / rsync |"
        );
        let _ = writeln!(r, "|---|---:|---:|---:|---:|");
        for c in results {
            if c.samples[2].is_empty() || c.samples[3].is_empty() {
                continue;
            }
            let _ = writeln!(
                r,
                "| ({}) | {:.2} ({}) | {:.2} | {:.2} | {:.2} |",
                c.id,
                c.wall(2) / c.wall(1),
                c.per_run(2, 1),
                c.wall(0) / c.wall(3),
                c.wall(2) / c.wall(3),
                c.wall(3) / c.wall(1)
            );
        }
    }

    let _ = writeln!(r, "\nPeak RSS (wrapper floor {}):", fmt_rss(floor));
    let _ = writeln!(r, "| case | contender | local process | remote processes |");
    let _ = writeln!(r, "|---|---|---:|---|");
    for c in results {
        for (i, con) in cs.iter().enumerate() {
            let s = &c.samples[i];
            if s.is_empty() {
                continue;
            }
            let local = s.iter().map(|x| x.local.rss_kib).max().unwrap_or(0);
            let mut remote: BTreeMap<&str, u64> = BTreeMap::new();
            for x in s {
                for (n, u) in &x.remote {
                    let e = remote.entry(n.as_str()).or_default();
                    *e = (*e).max(u.rss_kib);
                }
            }
            let remote = remote
                .iter()
                .map(|(n, k)| format!("{n} {}", fmt_rss(*k)))
                .collect::<Vec<_>>()
                .join(", ");
            let _ = writeln!(
                r,
                "| ({}) | {} | {} | {remote} |",
                c.id,
                con.name,
                fmt_rss(local)
            );
        }
    }

    let _ = writeln!(
        r,
        "\nDetail per contender (medians; CPU = user+system seconds):"
    );
    let _ = writeln!(
        r,
        "| case | contender | wall (min-max) | local CPU | remote CPU | sent | received | literal | matched | scan / transfer | dirs with wrong mtime |"
    );
    let _ = writeln!(r, "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|");
    for c in results {
        for (i, con) in cs.iter().enumerate() {
            let s = &c.samples[i];
            if s.is_empty() {
                continue;
            }
            let walls: Vec<f64> = s.iter().map(|x| x.local.wall).collect();
            let lo = walls.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = walls.iter().copied().fold(0.0, f64::max);
            let cpu = median(s.iter().map(|x| x.local.user + x.local.sys).collect());
            let mut remote: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
            for x in s {
                for (n, u) in &x.remote {
                    remote.entry(n.as_str()).or_default().push(u.user + u.sys);
                }
            }
            let remote = remote
                .into_iter()
                .map(|(n, v)| format!("{n} {:.2}s", median(v)))
                .collect::<Vec<_>>()
                .join(", ");
            let mu = |f: fn(&Sample) -> u64| fmt_bytes(median_u(s.iter().map(f).collect()));
            let split = match (s[0].scan, s[0].transfer) {
                (Some(_), Some(_)) => format!(
                    "{:.2}s / {:.2}s",
                    median(s.iter().filter_map(|x| x.scan).collect()),
                    median(s.iter().filter_map(|x| x.transfer).collect())
                ),
                _ => "-".into(),
            };
            let _ = writeln!(
                r,
                "| ({}) | {} | {:.2}s ({lo:.2}-{hi:.2}) | {cpu:.2}s | {remote} | {} | {} | {} | {} | {split} | {} |",
                c.id,
                con.name,
                c.wall(i),
                mu(|x| x.sent),
                mu(|x| x.received),
                mu(|x| x.literal),
                mu(|x| x.matched),
                s.iter().map(|x| x.dir_mtimes).max().unwrap_or(0),
            );
        }
    }
    let _ = writeln!(r, "\nCases:");
    for c in results {
        let _ = writeln!(r, "  ({}) {} [load at start {}]", c.id, c.title, c.load);
    }
    r
}
