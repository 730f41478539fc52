//! `hasync agent` against a hostile peer, at the protocol level: the test
//! speaks the wire format itself to a real agent process and sends what no
//! honest hasync would (escaping paths, writes through planted symlinks,
//! malformed frames and deltas, floods, a kill in the middle of a file).
//!
//! Every case checks the same four things: the request is refused (a `Fail`
//! for it, or a `Fatal` for the session); nothing outside the root changed;
//! the agent did not crash (exit 0 or 1, never a panic or a signal); and when
//! the session goes on, a legitimate request afterwards still works.

use std::collections::BTreeMap;
use std::io::{self, BufReader, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hasync::agent::fsroot::is_temp_name;
use hasync::agent::wire::{self, Attrs, Entry, Kind, Msg, CHUNK, MAX_FRAME};
use hasync::sync::delta;

/// The longest the test waits for any one answer or exit.
const TIMEOUT: Duration = Duration::from_secs(30);
/// Id of the `Sync` that [`Agent::answers`] uses as a barrier.
const BARRIER: u64 = u64::MAX;
/// The agent's per-request signature cap (`agent::MAX_SIGNATURE`, private).
const MAX_SIGNATURE: usize = 512 << 20;
const OLD: &[u8] = b"old content of keep.txt";

/// Attributes the peer sends. The owner is not the test's (the agent runs
/// as root in CI and then applies it): a chown through a symlink would show.
fn attrs(mode: u32) -> Attrs {
    Attrs {
        mode,
        mtime_sec: 1_700_000_000,
        mtime_nsec: 0,
        uid: 4242,
        gid: 4242,
    }
}

// ---------------------------------------------------------------------------
// A tree: root/ and outside/ side by side
// ---------------------------------------------------------------------------

struct Tree {
    _tmp: tempfile::TempDir,
    /// The temporary directory holding `root` and `outside`.
    top: PathBuf,
    root: PathBuf,
    outside: PathBuf,
}

/// `root/keep.txt` (OLD), `root/link -> <outside>` (absolute),
/// `root/f -> ../outside/target`, and `outside/{victim,secret,target}`.
fn tree() -> Tree {
    let tmp = tempfile::tempdir().unwrap();
    let top = tmp.path().to_path_buf();
    let root = top.join("root");
    let outside = top.join("outside");
    std::fs::create_dir(&root).unwrap();
    std::fs::create_dir(&outside).unwrap();
    for (name, content) in [
        ("victim", &b"victim"[..]),
        ("secret", b"secret outside the root"),
        ("target", b"target outside the root"),
    ] {
        std::fs::write(outside.join(name), content).unwrap();
        set_mode(&outside.join(name), 0o640);
    }
    set_mode(&outside, 0o750);
    std::fs::write(root.join("keep.txt"), OLD).unwrap();
    symlink(&outside, root.join("link")).unwrap();
    symlink("../outside/target", root.join("f")).unwrap();
    Tree {
        _tmp: tmp,
        top,
        root,
        outside,
    }
}

fn set_mode(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Everything under `top` except `root/`, keyed by path (the directory `top`
/// itself included).
type Snapshot = BTreeMap<PathBuf, Node>;

#[derive(Debug, PartialEq, Eq)]
struct Node {
    /// Type and permission bits.
    mode: u32,
    owner: (u32, u32),
    mtime: (i64, i64),
    /// File content or symlink target.
    content: Vec<u8>,
}

fn node(m: &std::fs::Metadata, content: Vec<u8>) -> Node {
    Node {
        mode: m.mode(),
        owner: (m.uid(), m.gid()),
        mtime: (m.mtime(), m.mtime_nsec()),
        content,
    }
}

impl Tree {
    fn snapshot(&self) -> Snapshot {
        let mut out = BTreeMap::new();
        let m = std::fs::symlink_metadata(&self.top).unwrap();
        out.insert(self.top.clone(), node(&m, Vec::new()));
        self.walk(&self.top, &mut out);
        out
    }

    fn walk(&self, dir: &Path, out: &mut Snapshot) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p == self.root {
                continue;
            }
            let m = std::fs::symlink_metadata(&p).unwrap();
            let content = if m.file_type().is_symlink() {
                std::fs::read_link(&p)
                    .unwrap()
                    .as_os_str()
                    .as_bytes()
                    .to_vec()
            } else if m.is_dir() {
                self.walk(&p, out);
                Vec::new()
            } else {
                std::fs::read(&p).unwrap()
            };
            out.insert(p, node(&m, content));
        }
    }

    /// Nothing outside the root changed since `before`, and nothing was
    /// created at the absolute paths the tests try.
    #[track_caller]
    fn assert_outside_untouched(&self, before: &Snapshot) {
        let after = self.snapshot();
        if &after != before {
            let mut diffs = Vec::new();
            for (k, v) in before {
                match after.get(k) {
                    None => diffs.push(format!("removed: {}", k.display())),
                    Some(w) if w != v => {
                        diffs.push(format!("changed: {}: {v:?} -> {w:?}", k.display()))
                    }
                    Some(_) => {}
                }
            }
            for k in after.keys().filter(|k| !before.contains_key(*k)) {
                diffs.push(format!("created: {}", k.display()));
            }
            panic!(
                "the agent changed things outside its root:\n{}",
                diffs.join("\n")
            );
        }
        for p in ["/etc/hasync-pwned", "/absolute/in/root"] {
            assert!(
                std::fs::symlink_metadata(p).is_err(),
                "the agent created {p}"
            );
        }
    }

    fn read(&self, rel: &str) -> Vec<u8> {
        std::fs::read(self.root.join(rel)).unwrap()
    }

    /// Every hasync temporary file under the root.
    fn temps(&self) -> Vec<PathBuf> {
        fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
            for e in std::fs::read_dir(dir).unwrap() {
                let e = e.unwrap();
                let p = e.path();
                if is_temp_name(e.file_name().as_bytes()) {
                    out.push(p);
                } else if e.file_type().unwrap().is_dir() {
                    walk(&p, out);
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.root, &mut out);
        out
    }

    #[track_caller]
    fn assert_no_temps(&self) {
        let t = self.temps();
        assert!(t.is_empty(), "temporary files left behind: {t:?}");
    }
}

// ---------------------------------------------------------------------------
// An agent process and its protocol
// ---------------------------------------------------------------------------

struct Agent {
    child: Child,
    stdin: Option<ChildStdin>,
    /// Frames from the agent's stdout, decoded by a reader thread that keeps
    /// draining the pipe (so the agent never blocks on its output).
    rx: Receiver<Result<Msg, String>>,
    stderr: Option<JoinHandle<String>>,
    reaped: bool,
}

/// How an agent process ended.
struct Exit {
    code: i32,
    stderr: String,
    /// Peak resident set size in bytes (0 if reaped elsewhere).
    max_rss: u64,
}

impl Agent {
    fn spawn() -> Agent {
        let mut child = Command::new(env!("CARGO_BIN_EXE_hasync"))
            .arg("agent")
            .env_remove("HASYNC_CONFIG")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot start hasync agent");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut r = BufReader::new(stdout);
            let mut buf = Vec::new();
            loop {
                match wire::recv(&mut r, &mut buf) {
                    Ok(Some(m)) => {
                        let _ = tx.send(Ok(m));
                    }
                    Ok(None) => break,
                    Err(e) => {
                        let _ = tx.send(Err(e.to_string()));
                        let _ = io::copy(&mut r, &mut io::sink());
                        break;
                    }
                }
            }
        });
        let mut stderr = child.stderr.take().unwrap();
        let stderr = std::thread::spawn(move || {
            let mut s = Vec::new();
            let _ = stderr.read_to_end(&mut s);
            String::from_utf8_lossy(&s).into_owned()
        });
        Agent {
            stdin: child.stdin.take(),
            child,
            rx,
            stderr: Some(stderr),
            reaped: false,
        }
    }

    /// An agent that has answered Hello for `root`.
    fn start(root: &Path) -> Agent {
        let mut a = Agent::spawn();
        a.send(&hello(root));
        match a.recv() {
            Msg::Welcome { protocol, .. } => assert_eq!(protocol, hasync::version::PROTOCOL),
            m => panic!("expected Welcome, got {m:?}"),
        }
        a
    }

    /// Writes raw bytes; a closed pipe (the agent already gave up) is
    /// ignored: the answers show what happened.
    fn raw(&mut self, bytes: &[u8]) {
        let Some(w) = self.stdin.as_mut() else {
            return;
        };
        match w.write_all(bytes) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => self.stdin = None,
            Err(e) => panic!("writing to the agent: {e}"),
        }
    }

    fn send(&mut self, m: &Msg) {
        self.raw(&m.encode());
    }

    /// The next frame, `None` at the end of the agent's output.
    fn next(&mut self) -> Option<Result<Msg, String>> {
        match self.rx.recv_timeout(TIMEOUT) {
            Ok(r) => Some(r),
            Err(RecvTimeoutError::Disconnected) => None,
            Err(RecvTimeoutError::Timeout) => panic!("no answer from the agent in {TIMEOUT:?}"),
        }
    }

    #[track_caller]
    fn recv(&mut self) -> Msg {
        match self.next() {
            Some(Ok(m)) => m,
            Some(Err(e)) => panic!("undecodable frame from the agent: {e}"),
            None => {
                let exit = self.finish_any();
                panic!(
                    "the agent closed its output (exit {}), stderr:\n{}",
                    exit.code, exit.stderr
                )
            }
        }
    }

    /// Sends a `Sync` barrier and returns everything the agent answered
    /// before it (the barrier's own `Done` excluded).
    #[track_caller]
    fn answers(&mut self) -> Vec<Msg> {
        self.send(&Msg::Sync { id: BARRIER });
        let mut got = Vec::new();
        loop {
            match self.recv() {
                Msg::Done { id: BARRIER, .. } => return got,
                Msg::Fail {
                    id: BARRIER,
                    message,
                    ..
                } => panic!("the barrier Sync failed: {message}"),
                m => got.push(m),
            }
        }
    }

    /// The answers to what was sent since the last barrier must be exactly
    /// one `Fail` for `id`; returns its message.
    #[track_caller]
    fn expect_fail(&mut self, id: u64, what: &str) -> String {
        let a = self.answers();
        match &a[..] {
            [Msg::Fail {
                id: got, message, ..
            }] if *got == id => message.clone(),
            _ => panic!("{what}: expected one Fail for request {id}, got {a:?}"),
        }
    }

    /// Exactly one `Done` for `id`.
    #[track_caller]
    fn expect_done(&mut self, id: u64, what: &str) {
        let a = self.answers();
        assert!(
            matches!(&a[..], [Msg::Done { id: got, .. }] if *got == id),
            "{what}: expected Done for request {id}, got {a:?}"
        );
    }

    /// A whole-file write: Begin, Data, End with the right size and hash.
    fn put(&mut self, id: u64, path: &[u8], content: &[u8]) {
        self.send(&Msg::Begin {
            id,
            path: path.to_vec(),
            delta: false,
            attrs: attrs(0o644),
        });
        for c in content.chunks(CHUNK) {
            self.send(&Msg::Data {
                id,
                bytes: c.to_vec(),
            });
        }
        self.send(&Msg::End {
            id,
            size: content.len() as u64,
            hash: *blake3::hash(content).as_bytes(),
            literal: content.len() as u64,
            matched: 0,
        });
    }

    /// A legitimate write after the attacks still works.
    #[track_caller]
    fn assert_still_works(&mut self, t: &Tree) {
        let content = b"written after the attacks";
        self.put(9_000, b"still-works.txt", content);
        self.expect_done(9_000, "legitimate write after the attacks");
        assert_eq!(t.read("still-works.txt"), content);
    }

    /// Collects a `Data*`, `Done|Fail` answer stream for `id`.
    fn data_then_end(&mut self, id: u64) -> (Vec<u8>, Msg) {
        let mut data = Vec::new();
        loop {
            match self.recv() {
                Msg::Data { id: got, bytes } if got == id => data.extend_from_slice(&bytes),
                m => return (data, m),
            }
        }
    }

    fn scan(&mut self, id: u64, cleanup: bool) -> Vec<Entry> {
        self.send(&Msg::Scan {
            id,
            excludes: Vec::new(),
            checksum: true,
            cleanup,
        });
        let mut entries = Vec::new();
        loop {
            match self.recv() {
                Msg::Entries {
                    id: got,
                    entries: e,
                } if got == id => entries.extend(e),
                Msg::Done { id: got, .. } if got == id => return entries,
                m => panic!("scan: unexpected {m:?}"),
            }
        }
    }

    /// Says Bye and expects a clean exit.
    #[track_caller]
    fn bye(mut self) {
        self.send(&Msg::Bye);
        let m = self.recv();
        assert_eq!(m, Msg::Bye);
        let exit = self.finish();
        assert_eq!(exit.code, 0, "stderr:\n{}", exit.stderr);
    }

    /// The next frame must be a `Fatal`, then the end of the output and exit
    /// code 1; returns the message.
    #[track_caller]
    fn expect_fatal(mut self, what: &str) -> String {
        let message = match self.next() {
            Some(Ok(Msg::Fatal { message })) => message,
            other => {
                let exit = self.finish_any();
                panic!(
                    "{what}: expected Fatal, got {other:?} (exit {}); stderr:\n{}",
                    exit.code, exit.stderr
                )
            }
        };
        let rest = self.next();
        assert!(rest.is_none(), "{what}: frame after Fatal: {rest:?}");
        let exit = self.finish();
        assert_eq!(exit.code, 1, "{what}: stderr:\n{}", exit.stderr);
        message
    }

    /// Closes stdin, waits for the exit, and checks it was not a crash.
    #[track_caller]
    fn finish(mut self) -> Exit {
        let exit = self.finish_any();
        assert!(
            exit.code == 0 || exit.code == 1,
            "the agent crashed: {} ; stderr:\n{}",
            describe_status(exit.code),
            exit.stderr
        );
        assert!(
            !exit.stderr.contains("panicked"),
            "the agent panicked:\n{}",
            exit.stderr
        );
        exit
    }

    /// Closes stdin and reaps the process (killing it after [`TIMEOUT`]).
    /// `code` is the exit code, or -(signal) for a signal.
    fn finish_any(&mut self) -> Exit {
        self.stdin = None;
        let deadline = Instant::now() + TIMEOUT;
        let mut status = 0;
        // SAFETY: an all-zero rusage is a valid value.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        if !self.reaped {
            loop {
                // SAFETY: our own child's pid; valid pointers.
                let r = unsafe {
                    libc::wait4(
                        self.child.id() as libc::pid_t,
                        &mut status,
                        libc::WNOHANG,
                        &mut ru,
                    )
                };
                if r == self.child.id() as libc::pid_t {
                    break;
                }
                assert!(r == 0, "wait4: {}", io::Error::last_os_error());
                if Instant::now() > deadline {
                    let _ = self.child.kill();
                    panic!("the agent did not exit within {TIMEOUT:?}");
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            self.reaped = true;
        }
        let code = if libc::WIFEXITED(status) {
            libc::WEXITSTATUS(status)
        } else {
            -libc::WTERMSIG(status)
        };
        let stderr = self
            .stderr
            .take()
            .map(|h| h.join().unwrap())
            .unwrap_or_default();
        Exit {
            code,
            stderr,
            max_rss: ru.ru_maxrss as u64 * 1024,
        }
    }

    /// SIGKILL, and reap.
    fn kill(mut self) {
        self.child.kill().unwrap();
        let exit = self.finish_any();
        assert_eq!(exit.code, -libc::SIGKILL);
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if !self.reaped {
            // A failed assertion left it running: do not leak the process.
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn describe_status(code: i32) -> String {
    if code < 0 {
        format!("killed by signal {}", -code)
    } else {
        format!("exit code {code}")
    }
}

fn hello(root: &Path) -> Msg {
    Msg::Hello {
        protocol: hasync::version::PROTOCOL,
        version: hasync::version::VERSION.into(),
        root: root.as_os_str().as_bytes().to_vec(),
        epoch: 1,
    }
}

/// A frame with an arbitrary type byte and payload.
fn frame(ty: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = ((payload.len() + 1) as u32).to_le_bytes().to_vec();
    f.push(ty);
    f.extend_from_slice(payload);
    f
}

// ---------------------------------------------------------------------------
// 1. Paths that fail validation
// ---------------------------------------------------------------------------

fn bad_paths(t: &Tree) -> Vec<(String, Vec<u8>)> {
    let mut inside_abs = t.root.as_os_str().as_bytes().to_vec();
    inside_abs.extend_from_slice(b"/inside.txt");
    let mut long = b"ab/".repeat(1666);
    long.extend_from_slice(b"ab");
    assert_eq!(long.len(), 5000);
    vec![
        ("`../escape.txt`".into(), b"../escape.txt".to_vec()),
        ("`a/../../escape`".into(), b"a/../../escape".to_vec()),
        ("`..`".into(), b"..".to_vec()),
        ("`/etc/hasync-pwned`".into(), b"/etc/hasync-pwned".to_vec()),
        ("`/absolute/in/root`".into(), b"/absolute/in/root".to_vec()),
        ("absolute path into the root".into(), inside_abs),
        ("empty".into(), Vec::new()),
        ("`a//b`".into(), b"a//b".to_vec()),
        ("trailing slash".into(), b"a/".to_vec()),
        ("`./a`".into(), b"./a".to_vec()),
        ("`a/./b`".into(), b"a/./b".to_vec()),
        ("`.`".into(), b".".to_vec()),
        ("NUL byte".into(), b"a\0b".to_vec()),
        ("NUL then escape".into(), b"x\0/../../escape".to_vec()),
        ("5000-byte path".into(), long),
        ("300-byte component".into(), vec![b'x'; 300]),
        (
            "temporary-file name".into(),
            b".keep.txt.hasync-0123456789abcdef.tmp".to_vec(),
        ),
    ]
}

#[test]
fn invalid_paths_are_refused_by_every_operation() {
    let t = tree();
    let before = t.snapshot();
    let mut a = Agent::start(&t.root);
    let mut id = 1;
    for (what, path) in bad_paths(&t) {
        let p = || path.clone();
        // A whole file: one Fail at Begin, the Data and End are discarded.
        a.put(id, &path, b"pwned");
        let m = a.expect_fail(id, &format!("Begin {what}"));
        assert!(m.contains("invalid path"), "Begin {what}: {m}");
        id += 1;
        a.send(&Msg::Begin {
            id,
            path: p(),
            delta: true,
            attrs: attrs(0o644),
        });
        a.send(&Msg::Data {
            id,
            bytes: b"rs\x026\x41\x05pwned\x00".to_vec(),
        });
        a.send(&Msg::End {
            id,
            size: 5,
            hash: *blake3::hash(b"pwned").as_bytes(),
            literal: 5,
            matched: 0,
        });
        a.expect_fail(id, &format!("delta Begin {what}"));
        id += 1;
        let requests = [
            (
                "Mkdir",
                Msg::Mkdir {
                    id,
                    path: p(),
                    attrs: attrs(0o777),
                },
            ),
            (
                "Symlink",
                Msg::Symlink {
                    id,
                    path: p(),
                    target: b"/etc".to_vec(),
                    attrs: attrs(0o777),
                },
            ),
            (
                "Delete",
                Msg::Delete {
                    id,
                    path: p(),
                    recursive: false,
                },
            ),
            (
                "recursive Delete",
                Msg::Delete {
                    id,
                    path: p(),
                    recursive: true,
                },
            ),
            (
                "SetAttrs",
                Msg::SetAttrs {
                    id,
                    path: p(),
                    attrs: attrs(0o777),
                },
            ),
            ("SigReq", Msg::SigReq { id, path: p() }),
            ("ReadReq", Msg::ReadReq { id, path: p() }),
            ("DeltaReq", Msg::DeltaReq { id, path: p() }),
        ];
        for (op, m) in requests {
            // SetAttrs of the empty path sets the root itself (below).
            if path.is_empty() && op == "SetAttrs" {
                continue;
            }
            let id = match &m {
                Msg::Mkdir { id, .. }
                | Msg::Symlink { id, .. }
                | Msg::Delete { id, .. }
                | Msg::SetAttrs { id, .. }
                | Msg::SigReq { id, .. }
                | Msg::ReadReq { id, .. }
                | Msg::DeltaReq { id, .. } => *id,
                _ => unreachable!(),
            };
            a.send(&m);
            let msg = a.expect_fail(id, &format!("{op} {what}"));
            assert!(msg.contains("invalid path"), "{op} {what}: {msg}");
            // Messages quote long paths shortened, never whole.
            assert!(msg.len() < 1000, "{op} {what}: {} bytes", msg.len());
        }
        id += 1;
    }
    // The empty path is the root for SetAttrs alone (a scan reports the
    // root so, rsync's `./`): its mode and time, nothing outside it.
    a.send(&Msg::SetAttrs {
        id,
        path: Vec::new(),
        attrs: attrs(0o750),
    });
    a.expect_done(id, "SetAttrs of the root");
    let m = std::fs::metadata(&t.root).unwrap();
    assert_eq!(
        (m.mode() & 0o7777, m.mtime()),
        (0o750, attrs(0).mtime_sec),
        "the root's attributes"
    );
    t.assert_outside_untouched(&before);
    t.assert_no_temps();
    assert_eq!(t.read("keep.txt"), OLD);
    assert!(!t.root.join("inside.txt").exists());
    assert!(!t.top.join("escape.txt").exists());
    a.assert_still_works(&t);
    a.bye();
    t.assert_outside_untouched(&before);
}

// ---------------------------------------------------------------------------
// 2. A symlinked directory inside the root
// ---------------------------------------------------------------------------

#[test]
fn symlinked_directory_is_never_followed() {
    let t = tree();
    let before = t.snapshot();
    let mut a = Agent::start(&t.root);

    a.put(1, b"link/pwned.txt", b"pwned");
    let m = a.expect_fail(1, "Begin link/pwned.txt");
    assert!(m.contains("symlink"), "{m}");
    a.send(&Msg::Begin {
        id: 2,
        path: b"link/secret".to_vec(),
        delta: true,
        attrs: attrs(0o644),
    });
    a.send(&Msg::Data {
        id: 2,
        bytes: b"rs\x026\x00".to_vec(),
    });
    a.send(&Msg::End {
        id: 2,
        size: 0,
        hash: *blake3::hash(b"").as_bytes(),
        literal: 0,
        matched: 0,
    });
    a.expect_fail(2, "delta Begin link/secret");
    a.send(&Msg::Mkdir {
        id: 3,
        path: b"link/newdir".to_vec(),
        attrs: attrs(0o777),
    });
    a.expect_fail(3, "Mkdir link/newdir");
    a.send(&Msg::Symlink {
        id: 4,
        path: b"link/l".to_vec(),
        target: b"/etc/passwd".to_vec(),
        attrs: attrs(0o777),
    });
    a.expect_fail(4, "Symlink link/l");
    for (id, recursive) in [(5, false), (6, true)] {
        a.send(&Msg::Delete {
            id,
            path: b"link/victim".to_vec(),
            recursive,
        });
        a.expect_fail(id, "Delete link/victim");
    }
    a.send(&Msg::SetAttrs {
        id: 7,
        path: b"link/secret".to_vec(),
        attrs: attrs(0o777),
    });
    a.expect_fail(7, "SetAttrs link/secret");
    // SetAttrs of the symlink itself may succeed (symlinks get their mtime
    // set), but must act on the link, never on the directory it points to.
    a.send(&Msg::SetAttrs {
        id: 8,
        path: b"link".to_vec(),
        attrs: attrs(0o777),
    });
    let ans = a.answers();
    assert!(
        matches!(
            &ans[..],
            [Msg::Done { id: 8, .. } | Msg::Fail { id: 8, .. }]
        ),
        "SetAttrs link: {ans:?}"
    );
    assert!(std::fs::symlink_metadata(t.root.join("link"))
        .unwrap()
        .file_type()
        .is_symlink());
    // Reading through the link: no content served.
    for (id, m) in [
        (
            9,
            Msg::ReadReq {
                id: 9,
                path: b"link/secret".to_vec(),
            },
        ),
        (
            10,
            Msg::SigReq {
                id: 10,
                path: b"link/secret".to_vec(),
            },
        ),
        (
            11,
            Msg::DeltaReq {
                id: 11,
                path: b"link/secret".to_vec(),
            },
        ),
    ] {
        let what = format!("{m:?}");
        a.send(&m);
        let msg = a.expect_fail(id, &what);
        assert!(msg.contains("symlink"), "{what}: {msg}");
    }
    // Nested below the link, too.
    a.put(12, b"link/sub/deeper.txt", b"pwned");
    a.expect_fail(12, "Begin link/sub/deeper.txt");
    // The scan lists the link as a link and nothing behind it.
    let entries = a.scan(13, false);
    let link = entries.iter().find(|e| e.path == b"link").unwrap();
    assert_eq!(link.kind, Kind::Symlink);
    assert!(
        !entries.iter().any(|e| e.path.starts_with(b"link/")),
        "{entries:?}"
    );

    t.assert_outside_untouched(&before);
    t.assert_no_temps();
    a.assert_still_works(&t);
    a.bye();
    t.assert_outside_untouched(&before);
}

// ---------------------------------------------------------------------------
// 3. A final-component symlink
// ---------------------------------------------------------------------------

#[test]
fn final_symlink_is_replaced_never_followed() {
    let t = tree();
    symlink("../outside/secret", t.root.join("g")).unwrap();
    let before = t.snapshot();
    let mut a = Agent::start(&t.root);

    // Reading: the outside file is not served, not signed, not a delta base.
    a.send(&Msg::SigReq {
        id: 1,
        path: b"f".to_vec(),
    });
    let (data, end) = a.data_then_end(1);
    match end {
        Msg::Fail { id: 1, .. } => assert!(data.is_empty()),
        Msg::Done { id: 1, .. } => {
            let outside_sig = delta::signature_of_file(&t.outside.join("target")).unwrap();
            assert_ne!(
                data, outside_sig,
                "SigReq f signed the file outside the root"
            );
        }
        m => panic!("SigReq f: {m:?}"),
    }
    a.send(&Msg::ReadReq {
        id: 2,
        path: b"f".to_vec(),
    });
    let m = a.expect_fail(2, "ReadReq f");
    assert!(m.contains("symbolic link"), "{m}");
    a.send(&Msg::Begin {
        id: 3,
        path: b"f".to_vec(),
        delta: true,
        attrs: attrs(0o644),
    });
    // COPY the whole "base": would copy the outside file if it were followed.
    let mut d = delta::DELTA_MAGIC.to_be_bytes().to_vec();
    d.extend_from_slice(&[0x45, 0, 23, 0]);
    a.send(&Msg::Data { id: 3, bytes: d });
    let target = b"target outside the root";
    a.send(&Msg::End {
        id: 3,
        size: target.len() as u64,
        hash: *blake3::hash(target).as_bytes(),
        literal: 0,
        matched: target.len() as u64,
    });
    a.expect_fail(3, "delta Begin f");
    assert!(std::fs::symlink_metadata(t.root.join("f"))
        .unwrap()
        .file_type()
        .is_symlink());
    // Attributes of a symlink: the link's own, never its target's.
    a.send(&Msg::SetAttrs {
        id: 4,
        path: b"g".to_vec(),
        attrs: attrs(0o4777),
    });
    let ans = a.answers();
    assert!(
        matches!(
            &ans[..],
            [Msg::Done { id: 4, .. } | Msg::Fail { id: 4, .. }]
        ),
        "SetAttrs g: {ans:?}"
    );
    t.assert_outside_untouched(&before);

    // Writing: the link is replaced by a regular file.
    a.put(5, b"f", b"new content");
    a.expect_done(5, "Begin f");
    let m = std::fs::symlink_metadata(t.root.join("f")).unwrap();
    assert!(m.is_file(), "f is still not a regular file");
    assert_eq!(t.read("f"), b"new content");
    assert_eq!(m.mode() & 0o7777, 0o644);

    // And a symlink made by the peer over an existing one is a link again,
    // not a write through it.
    a.send(&Msg::Symlink {
        id: 6,
        path: b"g".to_vec(),
        target: b"../outside/victim".to_vec(),
        attrs: attrs(0o777),
    });
    a.expect_done(6, "Symlink g over a symlink");
    assert_eq!(
        std::fs::read_link(t.root.join("g")).unwrap(),
        Path::new("../outside/victim")
    );
    t.assert_outside_untouched(&before);
    t.assert_no_temps();
    a.assert_still_works(&t);
    a.bye();
    t.assert_outside_untouched(&before);
}

// ---------------------------------------------------------------------------
// 4. Deletes
// ---------------------------------------------------------------------------

#[test]
fn deletes_never_leave_the_root() {
    let t = tree();
    // A real directory holding a link to outside and a file.
    std::fs::create_dir(t.root.join("dir")).unwrap();
    symlink(&t.outside, t.root.join("dir/inner")).unwrap();
    symlink(t.outside.join("victim"), t.root.join("dir/victim-link")).unwrap();
    std::fs::write(t.root.join("dir/file"), b"x").unwrap();
    let before = t.snapshot();
    let mut a = Agent::start(&t.root);

    let mut id = 1;
    for path in [&b".."[..], b"", b".", b"/", b"../outside", b"link/.."] {
        for recursive in [false, true] {
            a.send(&Msg::Delete {
                id,
                path: path.to_vec(),
                recursive,
            });
            a.expect_fail(
                id,
                &format!(
                    "Delete {:?} recursive={recursive}",
                    String::from_utf8_lossy(path)
                ),
            );
            id += 1;
        }
    }
    assert!(t.root.is_dir());
    assert_eq!(t.read("keep.txt"), OLD);

    // Removing the link itself is fine; following it is not.
    a.send(&Msg::Delete {
        id,
        path: b"link".to_vec(),
        recursive: true,
    });
    a.expect_done(id, "recursive Delete link");
    assert!(std::fs::symlink_metadata(t.root.join("link")).is_err());
    id += 1;
    a.send(&Msg::Delete {
        id,
        path: b"f".to_vec(),
        recursive: false,
    });
    a.expect_done(id, "Delete f");
    id += 1;
    a.send(&Msg::Delete {
        id,
        path: b"dir".to_vec(),
        recursive: true,
    });
    a.expect_done(id, "recursive Delete dir");
    assert!(std::fs::symlink_metadata(t.root.join("dir")).is_err());

    t.assert_outside_untouched(&before);
    a.assert_still_works(&t);
    a.bye();
    t.assert_outside_untouched(&before);
}

// ---------------------------------------------------------------------------
// 5. Frames
// ---------------------------------------------------------------------------

/// Starts an agent on a fresh tree with a file half-written (Begin and one
/// Data frame acknowledged by a barrier), sends `bytes`, and expects a Fatal
/// whose message contains `expect`; the half-written file must be gone.
#[track_caller]
fn fatal_mid_file(what: &str, bytes: &[u8], expect: &str) {
    let t = tree();
    let before = t.snapshot();
    let mut a = Agent::start(&t.root);
    a.send(&Msg::Begin {
        id: 1,
        path: b"keep.txt".to_vec(),
        delta: false,
        attrs: attrs(0o644),
    });
    a.send(&Msg::Data {
        id: 1,
        bytes: vec![b'N'; 300_000],
    });
    assert!(a.answers().is_empty());
    assert_eq!(
        t.temps().len(),
        1,
        "{what}: no temporary file while writing"
    );
    a.raw(bytes);
    // End of input right after: a truncated frame must not wait for more.
    a.stdin = None;
    let m = a.expect_fatal(what);
    assert!(m.contains(expect), "{what}: {m}");
    t.assert_no_temps();
    assert_eq!(t.read("keep.txt"), OLD, "{what}");
    t.assert_outside_untouched(&before);
}

#[test]
fn oversized_frame_is_fatal() {
    fatal_mid_file(
        "length prefix over MAX_FRAME",
        &((MAX_FRAME + 1) as u32).to_le_bytes(),
        "exceeds the limit",
    );
    fatal_mid_file(
        "length prefix u32::MAX",
        &u32::MAX.to_le_bytes(),
        "exceeds the limit",
    );
    fatal_mid_file("empty frame", &0u32.to_le_bytes(), "empty frame");
}

#[test]
fn truncated_frame_is_fatal() {
    let data = Msg::Data {
        id: 1,
        bytes: vec![b'N'; 1000],
    }
    .encode();
    fatal_mid_file(
        "frame cut mid-payload",
        &data[..500],
        "stream ends inside a frame",
    );
    fatal_mid_file(
        "frame cut in its header",
        &data[..2],
        "stream ends inside a frame header",
    );
}

#[test]
fn malformed_frames_are_fatal() {
    fatal_mid_file(
        "unknown message type",
        &frame(200, &[1, 2, 3]),
        "unknown message type 200",
    );
    let mut sync = Msg::Sync { id: 7 }.encode();
    sync.extend_from_slice(b"garbage");
    let len = (sync.len() - 4) as u32;
    sync[..4].copy_from_slice(&len.to_le_bytes());
    fatal_mid_file("trailing garbage in a frame", &sync, "trailing bytes");
    // A Data frame whose byte string claims more than the frame holds.
    let mut p = 1u64.to_le_bytes().to_vec();
    p.extend_from_slice(&u32::MAX.to_le_bytes());
    p.extend_from_slice(b"short");
    fatal_mid_file("Data longer than its frame", &frame(9, &p), "malformed");
    let mut p = 1u64.to_le_bytes().to_vec();
    p.extend_from_slice(&1000u32.to_le_bytes());
    p.extend_from_slice(&[0; 999]);
    fatal_mid_file("Data one byte short", &frame(9, &p), "malformed");
    // Huge element counts with nothing behind them: no allocation, a Fatal.
    let mut p = 1u64.to_le_bytes().to_vec();
    p.extend_from_slice(&u32::MAX.to_le_bytes());
    fatal_mid_file(
        "Entries claiming 2^32-1 entries",
        &frame(4, &p),
        "malformed",
    );
    fatal_mid_file("Scan claiming 2^32-1 excludes", &frame(3, &p), "malformed");
    // A bad boolean and a non-UTF-8 string.
    let mut p = 1u64.to_le_bytes().to_vec();
    p.extend_from_slice(&1u32.to_le_bytes());
    p.push(b'x');
    p.push(2);
    fatal_mid_file("Delete with boolean 2", &frame(13, &p), "bad boolean");
    let mut p = 0u32.to_le_bytes().to_vec();
    p.extend_from_slice(&2u32.to_le_bytes());
    p.extend_from_slice(&[0xff, 0xfe]);
    p.extend_from_slice(&0u32.to_le_bytes());
    fatal_mid_file("Hello with a non-UTF-8 version", &frame(1, &p), "UTF-8");
    // Messages only the agent sends.
    for m in [
        Msg::Welcome {
            protocol: 1,
            version: "x".into(),
            superuser: true,
            record: hasync::agent::wire::Record::Absent,
        },
        Msg::Done { id: 1, bytes: 0 },
        Msg::Fatal {
            message: "from the client".into(),
        },
        Msg::Entries {
            id: 1,
            entries: Vec::new(),
        },
    ] {
        fatal_mid_file(&format!("{m:?}"), &m.encode(), "unexpected message");
    }
}

/// Answers that quote what the peer sent must still be frames the peer can
/// read (at most [`MAX_FRAME`]); today three of them are not:
/// - an unexpected message is quoted whole with `{:?}` in the Fatal (a 4 MiB
///   Entries frame becomes a 16 MiB Fatal, and 16 MiB on stderr);
/// - the client's `Fail` message is echoed back with a `sender: ` prefix;
/// - a Hello root the agent cannot open is quoted whole.
#[test]
fn answers_quoting_peer_data_fit_in_a_frame() {
    let t = tree();
    let mut problems = Vec::new();
    let mut check = |what: &str, got: Option<Result<Msg, String>>, exit: Exit| {
        match got {
            Some(Ok(Msg::Fatal { message } | Msg::Fail { message, .. }))
                if message.len() < 64 << 10 => {}
            Some(Ok(Msg::Fatal { message } | Msg::Fail { message, .. })) => {
                problems.push(format!("{what}: a message of {} bytes", message.len()))
            }
            Some(Err(e)) => problems.push(format!("{what}: unreadable answer: {e}")),
            other => problems.push(format!("{what}: {other:?}")),
        }
        if exit.stderr.len() > 64 << 10 {
            problems.push(format!("{what}: {} bytes on stderr", exit.stderr.len()));
        }
    };

    // An Entries frame (only the agent sends those) just under the limit.
    let mut a = Agent::start(&t.root);
    let entry = Entry {
        path: vec![b'a'; 200],
        kind: Kind::File,
        size: 1,
        attrs: attrs(0o644),
        target: None,
        hash: Some([0xab; 32]),
    };
    let n = (MAX_FRAME - 64) / (200 + 4 + 1 + 8 + 28 + 1 + 1 + 32);
    let f = Msg::Entries {
        id: 1,
        entries: vec![entry; n],
    }
    .encode();
    assert!(f.len() - 4 <= MAX_FRAME);
    a.raw(&f);
    let got = a.next();
    check("unexpected Entries", got, a.finish());

    // The client abandons a file with a message as long as a frame allows.
    let mut a = Agent::start(&t.root);
    a.send(&Msg::Begin {
        id: 1,
        path: b"keep.txt".to_vec(),
        delta: false,
        attrs: attrs(0o644),
    });
    // By hand: Msg::encode may cut long messages.
    let mut p = 1u64.to_le_bytes().to_vec();
    p.push(0);
    p.extend_from_slice(&((MAX_FRAME - 14) as u32).to_le_bytes());
    p.resize(MAX_FRAME - 1, b'x');
    let f = frame(17, &p);
    assert_eq!(f.len() - 4, MAX_FRAME);
    assert!(Msg::decode(&f[4..]).is_ok());
    a.raw(&f);
    let got = a.next();
    check("echoed sender Fail", got, a.finish());

    // A root that cannot be opened, named at length.
    let mut a = Agent::spawn();
    let mut root = b"/".to_vec();
    root.extend_from_slice(&vec![b'r'; MAX_FRAME - 14]);
    a.send(&Msg::Hello {
        protocol: hasync::version::PROTOCOL,
        version: String::new(),
        root,
        epoch: 1,
    });
    let got = a.next();
    check("Hello with a long root", got, a.finish());

    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn requests_before_hello_are_fatal() {
    let t = tree();
    let before = t.snapshot();
    let requests = [
        Msg::Scan {
            id: 1,
            excludes: Vec::new(),
            checksum: false,
            cleanup: true,
        },
        Msg::SigReq {
            id: 1,
            path: b"keep.txt".to_vec(),
        },
        Msg::DeltaReq {
            id: 1,
            path: b"keep.txt".to_vec(),
        },
        Msg::ReadReq {
            id: 1,
            path: b"keep.txt".to_vec(),
        },
        Msg::Begin {
            id: 1,
            path: b"keep.txt".to_vec(),
            delta: false,
            attrs: attrs(0o644),
        },
        Msg::End {
            id: 1,
            size: 0,
            hash: [0; 32],
            literal: 0,
            matched: 0,
        },
        Msg::Mkdir {
            id: 1,
            path: b"d".to_vec(),
            attrs: attrs(0o755),
        },
        Msg::Symlink {
            id: 1,
            path: b"l".to_vec(),
            target: b"t".to_vec(),
            attrs: attrs(0o755),
        },
        Msg::Delete {
            id: 1,
            path: b"keep.txt".to_vec(),
            recursive: true,
        },
        Msg::SetAttrs {
            id: 1,
            path: b"keep.txt".to_vec(),
            attrs: attrs(0o777),
        },
        Msg::Sync { id: 1 },
    ];
    for m in requests {
        let what = format!("{m:?} before Hello");
        let mut a = Agent::spawn();
        a.send(&m);
        let msg = a.expect_fatal(&what);
        assert!(
            msg.contains("before Hello") || msg.contains("without Begin"),
            "{what}: {msg}"
        );
    }
    // Data before Hello (today buffered as a signature, unanswered): the
    // session still demands Hello for anything real.
    let mut a = Agent::spawn();
    a.send(&Msg::Data {
        id: 1,
        bytes: b"early".to_vec(),
    });
    a.send(&Msg::Delete {
        id: 1,
        path: b"keep.txt".to_vec(),
        recursive: false,
    });
    a.expect_fatal("Data then Delete before Hello");
    assert_eq!(t.read("keep.txt"), OLD);
    t.assert_outside_untouched(&before);
}

#[test]
fn hello_is_checked() {
    let t = tree();
    let mut a = Agent::spawn();
    a.send(&Msg::Hello {
        protocol: hasync::version::PROTOCOL + 41,
        version: "9.9.9-future".into(),
        root: t.root.as_os_str().as_bytes().to_vec(),
        epoch: 1,
    });
    let m = a.expect_fatal("wrong protocol");
    for needle in [
        format!("protocol {}", hasync::version::PROTOCOL),
        format!("protocol {}", hasync::version::PROTOCOL + 41),
        hasync::version::VERSION.to_string(),
        "9.9.9-future".to_string(),
    ] {
        assert!(m.contains(&needle), "lacks {needle:?}: {m}");
    }
    for (what, root) in [
        ("missing root", t.top.join("nope")),
        ("root that is a file", t.root.join("keep.txt")),
    ] {
        let mut a = Agent::spawn();
        a.send(&hello(&root));
        let m = a.expect_fatal(what);
        assert!(m.starts_with("root "), "{what}: {m}");
    }
    let mut a = Agent::spawn();
    a.send(&Msg::Hello {
        protocol: hasync::version::PROTOCOL,
        version: String::new(),
        root: b"/a\0b".to_vec(),
        epoch: 1,
    });
    a.expect_fatal("root with a NUL byte");
}

#[test]
fn end_without_matching_begin_is_fatal() {
    let t = tree();
    let mut a = Agent::start(&t.root);
    a.send(&Msg::End {
        id: 1,
        size: 0,
        hash: *blake3::hash(b"").as_bytes(),
        literal: 0,
        matched: 0,
    });
    let m = a.expect_fatal("End without Begin");
    assert!(m.contains("without Begin"), "{m}");
    // End for another id while a file is being written.
    fatal_mid_file(
        "End for the wrong id",
        &Msg::End {
            id: 2,
            size: 0,
            hash: [0; 32],
            literal: 0,
            matched: 0,
        }
        .encode(),
        "while writing request 1",
    );
}

/// Sends `frames` Data frames of 1 MiB for each of `ids` in turn; returns
/// the agent's exit.
fn flood(ids: &[u64], frames: usize) -> (Vec<Option<Result<Msg, String>>>, Exit) {
    let t = tree();
    let mut a = Agent::start(&t.root);
    let chunk: Vec<Vec<u8>> = ids
        .iter()
        .map(|&id| {
            Msg::Data {
                id,
                bytes: vec![0x5a; 1 << 20],
            }
            .encode()
        })
        .collect();
    for c in &chunk {
        for _ in 0..frames {
            a.raw(c);
            if a.stdin.is_none() {
                break;
            }
        }
    }
    a.send(&Msg::Sync { id: 1 });
    a.stdin = None;
    let mut got = Vec::new();
    loop {
        let m = a.next();
        let end = m.is_none();
        got.push(m);
        if end {
            break;
        }
    }
    (got, a.finish())
}

#[test]
fn signature_flood_is_capped() {
    let frames = MAX_SIGNATURE / (1 << 20) + 1;
    let (got, exit) = flood(&[3], frames);
    assert!(
        matches!(&got[..], [Some(Ok(Msg::Fatal { message })), None]
            if message.contains("signature") && message.contains(&MAX_SIGNATURE.to_string())),
        "{got:?}"
    );
    assert_eq!(exit.code, 1);
    let rss = exit.max_rss;
    assert!(
        rss < (MAX_SIGNATURE + (128 << 20)) as u64,
        "agent peak RSS {} MiB",
        rss >> 20
    );
}

/// The cap is per request id: the same bytes spread over two ids are all
/// buffered, so the agent's memory has no bound at all.
#[test]
fn signature_flood_over_many_ids_is_capped() {
    let frames = MAX_SIGNATURE / (1 << 20) / 2 + 1;
    let (got, exit) = flood(&[3, 4], frames);
    let rss = exit.max_rss;
    assert!(
        matches!(&got[..], [Some(Ok(Msg::Fatal { .. })), None]),
        "{} MiB of signature data accepted (agent peak RSS {} MiB), answers: {got:?}",
        2 * frames,
        rss >> 20
    );
    assert_eq!(exit.code, 1);
    assert!(
        rss < (MAX_SIGNATURE + (128 << 20)) as u64,
        "agent peak RSS {} MiB",
        rss >> 20
    );
}

// ---------------------------------------------------------------------------
// 6. Content checks
// ---------------------------------------------------------------------------

#[test]
fn content_that_does_not_match_its_end_is_not_committed() {
    let t = tree();
    let before = t.snapshot();
    let mut a = Agent::start(&t.root);
    let new = vec![b'n'; 700_000];
    let good = *blake3::hash(&new).as_bytes();
    let mut bad = good;
    bad[0] ^= 1;
    let cases = [
        ("wrong hash", new.len() as u64, bad),
        ("wrong size", new.len() as u64 + 1, good),
        ("short size", new.len() as u64 - 1, good),
    ];
    for (id, (what, size, hash)) in (1..).zip(cases) {
        a.send(&Msg::Begin {
            id,
            path: b"keep.txt".to_vec(),
            delta: false,
            attrs: attrs(0o600),
        });
        for c in new.chunks(CHUNK) {
            a.send(&Msg::Data {
                id,
                bytes: c.to_vec(),
            });
        }
        a.send(&Msg::End {
            id,
            size,
            hash,
            literal: size,
            matched: 0,
        });
        let ans = a.answers();
        assert!(
            matches!(&ans[..], [Msg::Fail { id: got, mismatch: true, .. }] if *got == id),
            "{what}: {ans:?}"
        );
        assert_eq!(t.read("keep.txt"), OLD, "{what}");
        t.assert_no_temps();
    }
    // A new file with a wrong hash is not created at all.
    a.send(&Msg::Begin {
        id: 10,
        path: b"new.txt".to_vec(),
        delta: false,
        attrs: attrs(0o644),
    });
    a.send(&Msg::Data {
        id: 10,
        bytes: b"abc".to_vec(),
    });
    a.send(&Msg::End {
        id: 10,
        size: 3,
        hash: *blake3::hash(b"abd").as_bytes(),
        literal: 3,
        matched: 0,
    });
    let ans = a.answers();
    assert!(
        matches!(
            &ans[..],
            [Msg::Fail {
                id: 10,
                mismatch: true,
                ..
            }]
        ),
        "{ans:?}"
    );
    assert!(!t.root.join("new.txt").exists());
    t.assert_no_temps();
    // The client abandoning a file (Fail for its id) drops it too.
    a.send(&Msg::Begin {
        id: 11,
        path: b"keep.txt".to_vec(),
        delta: false,
        attrs: attrs(0o644),
    });
    a.send(&Msg::Data {
        id: 11,
        bytes: b"partial".to_vec(),
    });
    a.send(&Msg::Fail {
        id: 11,
        mismatch: false,
        message: "sender could not read".into(),
    });
    a.expect_fail(11, "abandoned file");
    assert_eq!(t.read("keep.txt"), OLD);
    t.assert_no_temps();
    t.assert_outside_untouched(&before);
    a.assert_still_works(&t);
    a.bye();
}

/// The delta of `new` against the agent's current `path` (via SigReq).
fn delta_against(a: &mut Agent, id: u64, path: &[u8], new: &[u8]) -> (Vec<u8>, [u8; 32]) {
    a.send(&Msg::SigReq {
        id,
        path: path.to_vec(),
    });
    let (sig, end) = a.data_then_end(id);
    assert!(matches!(end, Msg::Done { .. }), "SigReq: {end:?}");
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("new");
    std::fs::write(&f, new).unwrap();
    let mut out = Vec::new();
    let s = delta::delta_of_file(&f, &sig, CHUNK, |c| {
        out.extend_from_slice(c);
        Ok(())
    })
    .unwrap();
    assert!(
        s.matched_bytes > 0,
        "the delta copies nothing from the base"
    );
    (out, s.hash)
}

fn send_delta(a: &mut Agent, id: u64, path: &[u8], d: &[u8], size: u64, hash: [u8; 32]) {
    a.send(&Msg::Begin {
        id,
        path: path.to_vec(),
        delta: true,
        attrs: attrs(0o644),
    });
    for c in d.chunks(CHUNK) {
        a.send(&Msg::Data {
            id,
            bytes: c.to_vec(),
        });
    }
    a.send(&Msg::End {
        id,
        size,
        hash,
        literal: 0,
        matched: 0,
    });
}

#[test]
fn malformed_deltas_keep_the_old_content() {
    let t = tree();
    let base: Vec<u8> = (0..200_000u32).flat_map(|i| i.to_le_bytes()).collect();
    std::fs::write(t.root.join("big.bin"), &base).unwrap();
    let before = t.snapshot();
    let mut a = Agent::start(&t.root);
    let mut new = base.clone();
    new[400_000..400_010].copy_from_slice(b"0123456789");
    let (good, hash) = delta_against(&mut a, 1, b"big.bin", &new);
    let size = new.len() as u64;
    let magic = delta::DELTA_MAGIC.to_be_bytes();
    let with_magic = |rest: &[u8]| [&magic[..], rest].concat();
    let base_len = base.len() as u64;
    let mut copy_past_end = with_magic(&[0x54]);
    copy_past_end.extend_from_slice(&(base_len - 10).to_be_bytes());
    copy_past_end.extend_from_slice(&11u64.to_be_bytes());
    copy_past_end.push(0);
    let mut copy_overflow = with_magic(&[0x54]);
    copy_overflow.extend_from_slice(&u64::MAX.to_be_bytes());
    copy_overflow.extend_from_slice(&2u64.to_be_bytes());
    copy_overflow.push(0);
    let mut huge_literal = with_magic(&[0x44]);
    huge_literal.extend_from_slice(&u64::MAX.to_be_bytes());
    huge_literal.extend_from_slice(b"abc");
    let mut corrupted = good.clone();
    let mid = corrupted.len() / 2;
    corrupted[mid] ^= 0x40;
    // Some(false): refused while streaming; Some(true): at End, as a content
    // mismatch; None: either.
    let cases: Vec<(&str, Vec<u8>, Option<bool>)> = vec![
        ("bad magic", b"XXXX\x00".to_vec(), Some(false)),
        (
            "rsync signature magic",
            b"rs\x016\x00".to_vec(),
            Some(false),
        ),
        ("empty delta", Vec::new(), Some(true)),
        ("magic only", magic.to_vec(), Some(true)),
        ("COPY beyond the base end", copy_past_end, Some(false)),
        ("COPY whose end overflows", copy_overflow, Some(false)),
        (
            "zero-length COPY",
            with_magic(&[0x45, 0, 0, 0]),
            Some(false),
        ),
        ("unknown command", with_magic(&[0x60, 0]), Some(false)),
        ("LITERAL of 2^64-1 bytes, cut", huge_literal, Some(true)),
        (
            "data after END",
            with_magic(&[0x00, 0x01, b'x']),
            Some(false),
        ),
        (
            "good delta truncated",
            good[..good.len() - 1].to_vec(),
            Some(true),
        ),
        ("good delta, one byte flipped", corrupted, None),
    ];
    for (id, (what, d, at_end)) in (10..).zip(cases) {
        send_delta(&mut a, id, b"big.bin", &d, size, hash);
        let ans = a.answers();
        let ok = match &ans[..] {
            [Msg::Fail {
                id: got, mismatch, ..
            }] => *got == id && at_end.is_none_or(|m| m == *mismatch),
            _ => false,
        };
        assert!(ok, "{what}: {ans:?}");
        assert_eq!(t.read("big.bin"), base, "{what}: base changed");
        t.assert_no_temps();
    }
    // Right delta, wrong End: a mismatch, base kept.
    let mut wrong = hash;
    wrong[31] ^= 1;
    send_delta(&mut a, 30, b"big.bin", &good, size, wrong);
    let ans = a.answers();
    assert!(
        matches!(
            &ans[..],
            [Msg::Fail {
                id: 30,
                mismatch: true,
                ..
            }]
        ),
        "{ans:?}"
    );
    assert_eq!(t.read("big.bin"), base);
    // No base at all.
    send_delta(&mut a, 31, b"missing.bin", &good, size, hash);
    a.expect_fail(31, "delta against a missing base");
    assert!(!t.root.join("missing.bin").exists());
    t.assert_no_temps();
    // And the well-formed delta applies.
    send_delta(&mut a, 32, b"big.bin", &good, size, hash);
    a.expect_done(32, "good delta");
    assert_eq!(t.read("big.bin"), new);
    t.assert_no_temps();
    t.assert_outside_untouched(&before);
    a.assert_still_works(&t);
    a.bye();
}

/// The sending side given hostile signatures: a Fail, never a crash.
#[test]
fn hostile_signatures_are_refused() {
    let t = tree();
    let mut a = Agent::start(&t.root);
    let header = |base_len: u64, block: u32, strong: u32| {
        let mut s = b"HSG1".to_vec();
        s.extend_from_slice(&base_len.to_be_bytes());
        s.extend_from_slice(&0x7273_0136u32.to_be_bytes());
        s.extend_from_slice(&block.to_be_bytes());
        s.extend_from_slice(&strong.to_be_bytes());
        s
    };
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("no signature", Vec::new()),
        ("garbage", b"not a signature at all".to_vec()),
        ("block size 0", header(0, 0, 8)),
        ("strong length 0", header(0, 2048, 0)),
        ("strong length 33", header(0, 2048, 33)),
        ("block size 2^32-1", header(0, u32::MAX, 8)),
        ("block count mismatch", header(u64::MAX, 1, 8)),
        (
            "partial block entry",
            [header(1, 1, 8), vec![0; 5]].concat(),
        ),
    ];
    for (id, (what, sig)) in (1..).zip(cases) {
        if !sig.is_empty() {
            a.send(&Msg::Data { id, bytes: sig });
        }
        a.send(&Msg::DeltaReq {
            id,
            path: b"keep.txt".to_vec(),
        });
        let (_, end) = a.data_then_end(id);
        assert!(
            matches!(end, Msg::Fail { id: got, .. } if got == id),
            "{what}: {end:?}"
        );
    }
    // A valid signature of an empty base: a delta of all literals.
    let empty = tempfile::NamedTempFile::new().unwrap();
    let sig = delta::signature_of_file(empty.path()).unwrap();
    a.send(&Msg::Data { id: 50, bytes: sig });
    a.send(&Msg::DeltaReq {
        id: 50,
        path: b"keep.txt".to_vec(),
    });
    let (_, end) = a.data_then_end(50);
    assert!(
        matches!(&end, Msg::End { id: 50, size, hash, .. }
            if *size == OLD.len() as u64 && hash == blake3::hash(OLD).as_bytes()),
        "{end:?}"
    );
    a.assert_still_works(&t);
    a.bye();
}

// ---------------------------------------------------------------------------
// 7. Killed in the middle of a file
// ---------------------------------------------------------------------------

#[test]
fn killed_mid_file_leaves_only_a_hidden_temp_that_cleanup_removes() {
    let t = tree();
    std::fs::create_dir(t.root.join("sub")).unwrap();
    let before = t.snapshot();
    let new = vec![b'N'; 2 << 20];
    // Half of a replacement for keep.txt, acknowledged by a barrier (so
    // the agent has processed it), then SIGKILL: no destructor runs.
    let mut a = Agent::start(&t.root);
    a.send(&Msg::Begin {
        id: 1,
        path: b"keep.txt".to_vec(),
        delta: false,
        attrs: attrs(0o644),
    });
    for c in new[..new.len() / 2].chunks(CHUNK) {
        a.send(&Msg::Data {
            id: 1,
            bytes: c.to_vec(),
        });
    }
    assert!(a.answers().is_empty());
    a.kill();

    assert_eq!(
        t.read("keep.txt"),
        OLD,
        "partial content under the real name"
    );
    let temps = t.temps();
    assert_eq!(temps.len(), 1, "{temps:?}");
    let temp = &temps[0];
    let name = temp.file_name().unwrap().as_bytes();
    assert!(name.starts_with(b".keep.txt.hasync-"), "{temp:?}");
    let m = std::fs::metadata(temp).unwrap();
    assert_eq!(m.mode() & 0o777, 0o600, "a partial file readable by others");
    assert!(m.len() <= (new.len() / 2) as u64);

    // The same for a file that did not exist, in a subdirectory.
    let mut a = Agent::start(&t.root);
    a.send(&Msg::Begin {
        id: 2,
        path: b"sub/fresh.txt".to_vec(),
        delta: false,
        attrs: attrs(0o644),
    });
    a.send(&Msg::Data {
        id: 2,
        bytes: new[..CHUNK].to_vec(),
    });
    assert!(a.answers().is_empty());
    a.kill();
    assert!(!t.root.join("sub/fresh.txt").exists());
    assert_eq!(t.temps().len(), 2);

    // A new agent: the scan never lists them; cleanup removes them.
    let mut a = Agent::start(&t.root);
    let listed = |e: &[Entry]| {
        e.iter()
            .filter(|e| is_temp_name(e.path.rsplit(|&b| b == b'/').next().unwrap()))
            .count()
    };
    let plain = a.scan(1, false);
    assert_eq!(listed(&plain), 0, "{plain:?}");
    assert_eq!(t.temps().len(), 2, "a scan without cleanup removed files");
    let cleaned = a.scan(2, true);
    assert_eq!(listed(&cleaned), 0);
    // The same entries (a directory's mtime changes with the cleanup).
    let paths = |e: &[Entry]| {
        e.iter()
            .map(|e| (e.path.clone(), e.kind))
            .collect::<Vec<_>>()
    };
    assert_eq!(paths(&cleaned), paths(&plain));
    t.assert_no_temps();
    assert_eq!(t.read("keep.txt"), OLD);
    t.assert_outside_untouched(&before);
    a.put(3, b"keep.txt", &new);
    a.expect_done(3, "rewrite after the kill");
    assert_eq!(t.read("keep.txt"), new);
    a.bye();
}

/// Received files are committed in batches: no `Sync` is needed for the
/// answers (the agent commits when the stream pauses), and a `Done` comes
/// only once its file is in place.
#[test]
fn batched_files_are_acknowledged_once_in_place_without_a_barrier() {
    let t = tree();
    let before = t.snapshot();
    let mut a = Agent::start(&t.root);
    let files: Vec<(String, Vec<u8>)> = (1..=50)
        .map(|i| {
            (
                format!("batch-{i:03}.txt"),
                format!("content {i};").repeat(i).into_bytes(),
            )
        })
        .collect();
    for (i, (name, content)) in files.iter().enumerate() {
        a.put(i as u64 + 1, name.as_bytes(), content);
    }
    let mut done = std::collections::BTreeSet::new();
    while done.len() < files.len() {
        match a.recv() {
            Msg::Done { id, bytes } => {
                let (name, content) = &files[id as usize - 1];
                assert_eq!(bytes, content.len() as u64);
                assert_eq!(&t.read(name), content, "Done before {name} was in place");
                assert!(done.insert(id), "two answers for {id}");
            }
            m => panic!("expected Done, got {m:?}"),
        }
    }
    t.assert_no_temps();
    t.assert_outside_untouched(&before);
    a.bye();
}

/// A kill at any moment of a batch (written, being made durable, being
/// renamed): every name holds its old content or its complete new one,
/// never a partial file, and cleanup removes what is left. At least one
/// kill must land inside the batch (a temp file left, or some names new
/// and some old): a kill before anything arrived, or after all of it was
/// in place, proves nothing.
#[test]
fn killed_mid_batch_leaves_old_or_complete_files() {
    let t = tree();
    let names: Vec<String> = (0..40).map(|i| format!("b/f-{i:02}")).collect();
    std::fs::create_dir(t.root.join("b")).unwrap();
    let old = |i: usize| format!("old {i}").into_bytes();
    let new = |i: usize| vec![b'0' + (i % 10) as u8; 20_000 + i * 1000];
    for (i, n) in names.iter().enumerate() {
        std::fs::write(t.root.join(n), old(i)).unwrap();
    }
    // The fixed delays, then 0, 1, 2, ... ms until a kill landed mid-batch
    // (at most 60 more rounds).
    let fixed = [0u64, 1, 2, 4, 8, 16, 40];
    let (mut rounds, mut mid_batch) = (Vec::new(), 0);
    for round in 0.. {
        let delay_ms = match fixed.get(round) {
            Some(&d) => d,
            None if mid_batch == 0 && round < fixed.len() + 60 => (round - fixed.len()) as u64,
            None => break,
        };
        let mut a = Agent::start(&t.root);
        for (i, n) in names.iter().enumerate() {
            a.put(i as u64 + 1, n.as_bytes(), &new(i));
        }
        std::thread::sleep(Duration::from_millis(delay_ms));
        a.kill();
        let temps = t.temps().len();
        let mut renewed = 0;
        for (i, n) in names.iter().enumerate() {
            let got = t.read(n);
            assert!(
                got == old(i) || got == new(i),
                "after a kill {delay_ms} ms in, {n} holds {} bytes, neither old nor new",
                got.len()
            );
            renewed += (got == new(i)) as usize;
        }
        if temps > 0 || (renewed > 0 && renewed < names.len()) {
            mid_batch += 1;
        }
        rounds.push(format!("{delay_ms} ms: {renewed} new, {temps} temp(s)"));
        // Back to the old state for the next round, cleanup first.
        let mut a = Agent::start(&t.root);
        a.scan(1, true);
        t.assert_no_temps();
        a.bye();
        for (i, n) in names.iter().enumerate() {
            std::fs::write(t.root.join(n), old(i)).unwrap();
        }
    }
    eprintln!("after each kill: {}", rounds.join("; "));
    assert!(
        mid_batch > 0,
        "no kill landed inside the batch, nothing was checked: {}",
        rounds.join("; ")
    );
}
