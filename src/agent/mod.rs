//! `hasync agent`: the far side of a file replication, like `rsync --server`.
//!
//! hasync starts it over an SSH exec channel (or in a thread, for a local
//! node) and talks to it with the framed protocol of [`wire`]. The same agent
//! serves both directions: on the primary it scans and reads files and
//! computes deltas; on the standby it scans, computes signatures, and applies
//! creates, deltas and deletes atomically under its root. Everything the peer
//! names is checked by [`fsroot`]: no path escapes the root, not even through
//! a symlinked directory.

pub mod fsroot;
pub mod wire;

use std::collections::{HashMap, HashSet};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::sync::delta;
use crate::sync::filter::Filter;
use crate::version;
use fsroot::{Durability, FsError, Root, Staged, TempFile};
use wire::{Msg, WireError, CHUNK};

/// Why an agent session ended badly.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("protocol error: {0}")]
    Wire(#[from] WireError),
    #[error("{0}")]
    Refused(String),
    #[error("i/o error on the connection: {0}")]
    Io(#[from] io::Error),
}

/// The largest signature the agent buffers for one delta request (a
/// signature is well under 1% of its file; this allows files of terabytes).
const MAX_SIGNATURE: usize = 512 << 20;

// Received files are committed in batches (see [`Batch`]): written under
// their temporary names, made durable together, renamed, and only then
// acknowledged. A batch is committed when it holds BATCH_FILES files (fewer
// if the descriptor limit is low) or BATCH_BYTES bytes, or when its oldest
// file waited BATCH_AGE: on a thread of its own ([`InFlight`]), while the
// session receives the next batch, so that the disk's writeback overlaps the
// transfer instead of stopping it. Everything received is committed and
// answered (waiting for it) when no request arrives within BATCH_IDLE (the
// stream paused: the client is waiting for the answers), and before any
// request that is not part of a file transfer.
const BATCH_FILES: usize = 4096;
const BATCH_BYTES: u64 = 128 << 20;
const BATCH_AGE: Duration = Duration::from_secs(1);
const BATCH_IDLE: Duration = Duration::from_millis(5);
/// Files at least this large are committed alone with their own fsync
/// (their writeback dominates; batching gains nothing).
const SOLO_FILE: u64 = 32 << 20;
/// The longest an answer waits in the output buffer while requests keep
/// coming. Answers are otherwise flushed only when the input runs dry, which
/// in a steady transfer is never: every `Done` of a run reached the client at
/// its end, and its progress bar stood still (issue 14, item 5).
const FLUSH_EVERY: Duration = Duration::from_millis(100);

/// Files written, verified and staged, waiting to be committed together.
#[derive(Default)]
struct Batch {
    files: Vec<(u64, u64, Staged)>,
    /// Their final paths, to commit first when a request touches one.
    paths: HashSet<Vec<u8>>,
    bytes: u64,
    since: Option<Instant>,
}

/// A commit running on its own thread: the files it answers for, their
/// paths (a request touching one waits for it), and its results.
struct InFlight {
    ids: Vec<(u64, u64)>,
    paths: HashSet<Vec<u8>>,
    handle: std::thread::JoinHandle<Vec<Result<(), FsError>>>,
}

/// How many files a batch may hold open at once: each staged file keeps its
/// directory's descriptor (and its own with [`Durability::FsyncEach`]), and
/// two batches are open at once (one committing, one being received).
fn batch_files_limit(durability: Durability) -> usize {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid out pointer.
    let soft = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
        usize::try_from(lim.rlim_cur).unwrap_or(usize::MAX)
    } else {
        1024
    };
    let per_file = if durability == Durability::FsyncEach {
        2
    } else {
        1
    };
    (soft.saturating_sub(128) / per_file / 2).clamp(16, BATCH_FILES)
}

/// Whether `fd` becomes readable within `wait`.
fn readable_within(fd: BorrowedFd<'_>, wait: Duration) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = libc::c_int::try_from(wait.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut p, 1, ms) };
    // An error or a hang-up: let the read find out.
    n != 0
}

/// A file being written: its temp file, fed directly or through a delta
/// applier, and what it must hash to.
enum Writing {
    /// The temp file hashes what it is given.
    Whole {
        id: u64,
        temp: Box<TempFile>,
        attrs: wire::Attrs,
    },
    Delta {
        id: u64,
        applier: Box<delta::Applier<TempFile>>,
        attrs: wire::Attrs,
    },
    /// The write failed; the rest of this file's frames are discarded.
    Failed { id: u64 },
}

impl Writing {
    fn id(&self) -> u64 {
        match self {
            Writing::Whole { id, .. } | Writing::Delta { id, .. } | Writing::Failed { id } => *id,
        }
    }
}

struct Session<W: Write> {
    out: W,
    pinned_root: Option<PathBuf>,
    /// Where this node's state record lives (see [`Session::may_write`]).
    state_dir: Option<PathBuf>,
    /// The epoch the caller's Hello claimed for its primary.
    caller_epoch: u64,
    /// The state record allowed writes (checked once, at the first).
    write_allowed: bool,
    root: Option<Arc<Root>>,
    superuser: bool,
    signatures: HashMap<u64, Vec<u8>>,
    /// Bytes in `signatures`, all ids together (capped at MAX_SIGNATURE).
    signature_bytes: usize,
    writing: Option<Writing>,
    batch: Batch,
    batch_files: usize,
    /// The batch being committed meanwhile, at most one.
    committing: Option<InFlight>,
}

/// Serve one session on `input` / `output` until the client says Bye or
/// closes the connection.
///
/// `pinned_root`: the only root this agent may serve (`hasync agent --root
/// DIR`, which hasync always passes). With an SSH key restricted to that
/// command in `authorized_keys`, a hostile peer cannot point the agent at `/`.
///
/// `state_dir`: where this node's state record is; before its first write
/// the agent checks that the record (if there is one) says standby, at the
/// epoch the caller's Hello names — the receiving side's own guard against
/// a wrong-direction copy, whatever the caller believes.
///
/// `input` must be a descriptor `poll(2)` works on (a pipe or a socket):
/// received files are committed in batches, and a pause in the input is
/// what commits a batch the client is waiting for.
pub fn serve(
    input: impl Read + AsFd,
    output: impl Write,
    pinned_root: Option<&Path>,
    state_dir: Option<&Path>,
) -> Result<(), AgentError> {
    let mut input = BufReader::with_capacity(CHUNK + 64, input);
    let mut s = Session {
        out: BufWriter::with_capacity(CHUNK + 64, output),
        pinned_root: pinned_root.map(Path::to_path_buf),
        state_dir: state_dir.map(Path::to_path_buf),
        caller_epoch: 0,
        write_allowed: false,
        root: None,
        // SAFETY: geteuid has no preconditions.
        superuser: unsafe { libc::geteuid() } == 0,
        signatures: HashMap::new(),
        signature_bytes: 0,
        writing: None,
        batch: Batch::default(),
        batch_files: BATCH_FILES,
        committing: None,
    };
    let mut buf = Vec::new();
    let mut flushed = Instant::now();
    loop {
        // About to wait for the client: make sure it has everything we said.
        if input.buffer().is_empty() {
            s.out.flush()?;
            flushed = Instant::now();
            // Nothing more coming for now: the client may be waiting for
            // the answers of the batch.
            if s.uncommitted() && !readable_within(input.get_ref().as_fd(), BATCH_IDLE) {
                s.commit_batch()?;
                s.out.flush()?;
            }
        } else if !s.out.buffer().is_empty() && flushed.elapsed() >= FLUSH_EVERY {
            // More requests are queued, but the client counts on the answers
            // (and shows them as progress): they leave within FLUSH_EVERY.
            s.out.flush()?;
            flushed = Instant::now();
        }
        match wire::read_frame(&mut input, &mut buf) {
            Ok(Some(())) => {}
            Ok(None) => {
                // The client closed the connection: what it sent completely
                // is committed, as without batching.
                s.commit_batch()?;
                break;
            }
            Err(e) => return Err(s.fatal(e.into())),
        }
        // File content goes from the frame buffer to the file, uncopied.
        let handled = match wire::data_view(&buf) {
            Some(Ok((id, bytes))) => s.data(id, bytes).map(|()| true),
            Some(Err(e)) => Err(e.into()),
            None => match Msg::decode(&buf) {
                Ok(msg) => {
                    if s.uncommitted() && s.batch_conflicts(&msg) {
                        s.commit_batch()?;
                    }
                    s.handle(msg)
                }
                Err(e) => Err(e.into()),
            },
        };
        match handled {
            Ok(true) => {
                s.poll_commit()?;
                if s.batch.since.is_some_and(|t| t.elapsed() >= BATCH_AGE) {
                    s.start_commit()?;
                }
            }
            Ok(false) => break,
            Err(e @ (AgentError::Refused(_) | AgentError::Wire(_))) => return Err(s.fatal(e)),
            Err(e) => return Err(e),
        }
    }
    s.out.flush()?;
    Ok(())
}

/// What a `Fail` says about an error under `root`. A full disk (or quota)
/// is said in words, with the file system and what to do: the bare OS
/// error ("cannot write `.x.hasync-….tmp`: No space left on device (os
/// error 28)") named a temporary file and neither the place nor the remedy.
fn fail_message(
    root: Option<&std::path::Path>,
    kind: Option<std::io::ErrorKind>,
    e: &dyn std::fmt::Display,
) -> String {
    use std::io::ErrorKind::{QuotaExceeded, StorageFull};
    match (kind, root) {
        (Some(k @ (StorageFull | QuotaExceeded)), Some(root)) => format!(
            "no space left on {}{} ({e}); free space there or enlarge that file system, then run again",
            root.display(),
            if k == QuotaExceeded {
                " (disk quota exceeded)"
            } else {
                ""
            },
        ),
        _ => e.to_string(),
    }
}

impl<W: Write> Session<W> {
    fn root(&self) -> Result<&Root, AgentError> {
        self.root
            .as_deref()
            .ok_or_else(|| AgentError::Refused("the client sent a request before Hello".into()))
    }

    fn send_fs_fail(&mut self, id: u64, e: &FsError) -> Result<(), AgentError> {
        let kind = e.io_error().map(std::io::Error::kind);
        self.send(&Msg::Fail {
            id,
            mismatch: false,
            message: fail_message(self.root.as_deref().map(Root::path), kind, e),
        })
    }

    fn send(&mut self, m: &Msg) -> Result<(), AgentError> {
        wire::send(&mut self.out, m)?;
        Ok(())
    }

    /// Tells the client why the session ends (best effort) and returns
    /// the error. A refusal (a request this agent will not serve) or a
    /// malformed frame is `Fatal`; i/o errors are not reported.
    fn fatal(&mut self, e: AgentError) -> AgentError {
        let message = match &e {
            AgentError::Refused(m) => m.clone(),
            AgentError::Wire(w) => w.to_string(),
            AgentError::Io(_) => return e,
        };
        let _ = wire::send(&mut self.out, &Msg::Fatal { message });
        let _ = self.out.flush();
        e
    }

    /// Whether this node may be written to: its state record (when it has
    /// one) must say standby, at the caller's epoch. A primary or a fenced
    /// old primary is never written to, nor a standby of another epoch: a
    /// caller with stale records, an old binary or a hand-run command
    /// cannot copy in the wrong direction.
    fn may_write(&mut self) -> Result<(), AgentError> {
        if self.write_allowed {
            return Ok(());
        }
        if let Some(dir) = &self.state_dir {
            let path = dir.join("state.json");
            match std::fs::read(&path) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(AgentError::Refused(format!(
                        "cannot read this node's state record {}: {e}; refusing to write",
                        path.display()
                    )))
                }
                Ok(bytes) => {
                    let rec: crate::state::StateRecord =
                        serde_json::from_slice(&bytes).map_err(|e| {
                            AgentError::Refused(format!(
                                "this node's state record {} is unreadable ({e}); refusing to write",
                                path.display()
                            ))
                        })?;
                    if rec.role != crate::state::NodeRole::Standby {
                        return Err(AgentError::Refused(format!(
                            "{} is {} at epoch {} in its state record ({}): hasync writes only into a standby; see `hasync status`",
                            rec.node,
                            rec.role,
                            rec.epoch,
                            path.display()
                        )));
                    }
                    if rec.epoch != self.caller_epoch {
                        return Err(AgentError::Refused(format!(
                            "{} is a standby at epoch {}, but the caller copies from a primary at epoch {}: refusing to write; see `hasync status` (`hasync rejoin {}` makes it a standby of the current primary)",
                            rec.node,
                            rec.epoch,
                            self.caller_epoch,
                            rec.node
                        )));
                    }
                }
            }
        }
        self.write_allowed = true;
        Ok(())
    }

    /// Handle one message; false ends the session.
    fn handle(&mut self, msg: Msg) -> Result<bool, AgentError> {
        if matches!(
            msg,
            Msg::Begin { .. }
                | Msg::Mkdir { .. }
                | Msg::Symlink { .. }
                | Msg::Delete { .. }
                | Msg::SetAttrs { .. }
        ) {
            self.may_write()?;
        }
        match msg {
            Msg::Hello {
                protocol,
                version: client_version,
                root,
                epoch,
            } => {
                self.caller_epoch = epoch;
                if protocol != version::PROTOCOL {
                    return Err(AgentError::Refused(format!(
                        "protocol mismatch: this agent is hasync {} (protocol {}), the caller hasync {client_version} (protocol {protocol}); install the same hasync version on both nodes",
                        version::VERSION,
                        version::PROTOCOL
                    )));
                }
                let path = PathBuf::from(std::ffi::OsStr::from_bytes(&root));
                if let Some(pinned) = &self.pinned_root {
                    if pinned != &path {
                        return Err(AgentError::Refused(format!(
                            "this agent serves only {} (--root), not {}",
                            pinned.display(),
                            fsroot::PathBytes(root.clone())
                        )));
                    }
                }
                let r = Root::open(&path).map_err(|e| {
                    // Shortened: the peer may send megabytes of root.
                    let shown = fsroot::PathBytes(root.clone());
                    AgentError::Refused(format!("root {shown}: {e}"))
                })?;
                self.batch_files = batch_files_limit(r.durability());
                self.root = Some(Arc::new(r));
                // The caller learns this node's role from it (no second
                // connection to read it); writes are still checked against
                // the file itself (see may_write).
                let record = match &self.state_dir {
                    Some(dir) => crate::state::read_local(dir),
                    None => wire::Record::NotSent,
                };
                self.send(&Msg::Welcome {
                    protocol: version::PROTOCOL,
                    version: version::VERSION.into(),
                    superuser: self.superuser,
                    record,
                })?;
            }
            Msg::Claim { epoch } => {
                // After Hello only; the record is checked again at the next
                // write, against the epoch claimed now.
                self.root()?;
                self.caller_epoch = epoch;
                self.write_allowed = false;
            }
            Msg::Scan {
                id,
                excludes,
                checksum,
                cleanup,
            } => self.scan(id, &excludes, checksum, cleanup)?,
            Msg::SigReq { id, path } => {
                let res = self.root()?.open_read(&path).and_then(|f| {
                    delta::signature_of_file(&f).map_err(|e| FsError::io("sign", &path, e))
                });
                match res {
                    Ok(sig) => {
                        for c in sig.chunks(CHUNK) {
                            wire::send_data(&mut self.out, id, c)?;
                        }
                        self.send(&Msg::Done { id, bytes: 0 })?;
                    }
                    Err(e) => self.send_fs_fail(id, &e)?,
                }
            }
            // Normally handled before decoding (see serve).
            Msg::Data { id, bytes } => self.data(id, &bytes)?,
            Msg::DeltaReq { id, path } => {
                let sig = self.signatures.remove(&id).unwrap_or_default();
                self.signature_bytes -= sig.len();
                self.read_out(id, &path, Some(&sig))?;
            }
            Msg::ReadReq { id, path } => self.read_out(id, &path, None)?,
            Msg::Begin {
                id,
                path,
                delta,
                attrs,
            } => self.begin(id, &path, delta, attrs)?,
            Msg::End { id, size, hash, .. } => self.end(id, size, hash)?,
            Msg::Fail { id, message, .. } => {
                // The sender could not finish a file it started: drop ours.
                if self.writing.as_ref().map(Writing::id) == Some(id) {
                    self.writing = None;
                }
                self.send(&Msg::Fail {
                    id,
                    mismatch: false,
                    message: format!("sender: {message}"),
                })?;
            }
            Msg::Mkdir { id, path, attrs } => {
                let r = self.root()?.mkdir(&path, attrs.mode & 0o7777);
                self.reply(id, r)?;
            }
            Msg::Symlink {
                id,
                path,
                target,
                attrs,
            } => {
                let owner = self.owner(&attrs);
                let root = self.root()?;
                let r = root.symlink(&path, &target).and_then(|()| match owner {
                    Some(_) => root.set_attrs(&path, &fs_attrs(&attrs, owner)),
                    None => Ok(()),
                });
                self.reply(id, r)?;
            }
            Msg::Delete {
                id,
                path,
                recursive,
            } => {
                let root = self.root()?;
                let r = if recursive {
                    root.remove(&path)
                } else {
                    match root.remove_if_empty(&path) {
                        // A directory that still holds excluded files stays, as
                        // with rsync; if something must take its place, that
                        // create fails and says so.
                        Err(e)
                            if e.io_error().and_then(io::Error::raw_os_error)
                                == Some(libc::ENOTEMPTY) =>
                        {
                            Ok(())
                        }
                        r => r,
                    }
                };
                self.reply(id, r)?;
            }
            Msg::SetAttrs { id, path, attrs } => {
                let owner = self.owner(&attrs);
                let (root, attrs) = (self.root()?, fs_attrs(&attrs, owner));
                // The empty path is the root itself, as in a scan.
                let r = if path.is_empty() {
                    root.set_root_attrs(&attrs)
                } else {
                    root.set_attrs(&path, &attrs)
                };
                self.reply(id, r)?;
            }
            Msg::Sync { id } => {
                let r = self.root()?.sync_dirs();
                self.reply(id, r)?;
            }
            Msg::Bye => {
                self.send(&Msg::Bye)?;
                return Ok(false);
            }
            other => {
                return Err(AgentError::Refused(format!(
                    "unexpected message from the client: {}",
                    other.kind()
                )));
            }
        }
        Ok(true)
    }

    fn owner(&self, a: &wire::Attrs) -> Option<(u32, u32)> {
        self.superuser.then_some((a.uid, a.gid))
    }

    fn reply(&mut self, id: u64, r: Result<(), FsError>) -> Result<(), AgentError> {
        match r {
            Ok(()) => self.send(&Msg::Done { id, bytes: 0 }),
            Err(e) => self.send_fs_fail(id, &e),
        }
    }

    fn scan(
        &mut self,
        id: u64,
        excludes: &[String],
        checksum: bool,
        cleanup: bool,
    ) -> Result<(), AgentError> {
        let filter = match Filter::new(excludes) {
            Ok(f) => f,
            Err(e) => {
                return self.send(&Msg::Fail {
                    id,
                    mismatch: false,
                    message: e.to_string(),
                })
            }
        };
        let exclude =
            |p: &[u8], is_dir: bool| filter.is_excluded(&String::from_utf8_lossy(p), is_dir);
        match self.root()?.scan(&exclude, checksum, cleanup) {
            Ok(scan) => {
                // The root itself comes first, as the empty path: its mode,
                // owner and mtime are replicated like any directory's.
                if let Some(root) = scan.root {
                    self.send(&Msg::Entries {
                        id,
                        entries: vec![root],
                    })?;
                }
                let entries: Vec<wire::Entry> = scan.entries;
                for batch in entries.chunks(2048) {
                    self.send(&Msg::Entries {
                        id,
                        entries: batch.to_vec(),
                    })?;
                }
                self.send(&Msg::Done {
                    id,
                    bytes: scan.skipped.len() as u64,
                })?;
            }
            Err(e) => self.send_fs_fail(id, &e)?,
        }
        Ok(())
    }

    /// Sender side: stream a file, whole or as a delta against `sig`.
    ///
    /// A file gone since the scan is answered with a `Fail` marked
    /// `mismatch`, like one that changed (below). A file written to while it is read (the application appends to it,
    /// rewrites it in place) may reach the standby torn: bytes of two
    /// versions, or fewer than it has. The hash only proves the transfer, not
    /// that the bytes were ever the file's content. So the file is stat'ed
    /// before and after the read; if its size, mtime or ctime moved, the
    /// data is disowned with a `Fail` marked `mismatch` (the standby drops
    /// its temp file, the client reads the file again or leaves it for the
    /// next run; see `sync::execute`). ctime catches writers that put the
    /// mtime back; the kernel's fine-grained timestamps for an inode whose
    /// times were just queried make a write right after the first stat show.
    fn read_out(&mut self, id: u64, path: &[u8], sig: Option<&[u8]>) -> Result<(), AgentError> {
        let file = match self.root()?.open_read(path) {
            Ok(f) => f,
            // Removed since the scan (a temp file of the application):
            // a change like any other, not a failure.
            Err(e) if e.io_error().and_then(io::Error::raw_os_error) == Some(libc::ENOENT) => {
                return self.send(&Msg::Fail {
                    id,
                    mismatch: true,
                    message: "vanished before it could be read".into(),
                })
            }
            Err(e) => return self.send_fs_fail(id, &e),
        };
        let stamp = |f: &std::fs::File| {
            use std::os::unix::fs::MetadataExt;
            f.metadata().ok().map(|m| {
                (
                    m.size(),
                    (m.mtime(), m.mtime_nsec()),
                    (m.ctime(), m.ctime_nsec()),
                )
            })
        };
        let before = stamp(&file);
        let out = &mut self.out;
        let mut sink = |c: &[u8]| wire::send_data(out, id, c);
        let res = match sig {
            Some(sig) => delta::delta_of_file(&file, sig, CHUNK, &mut sink)
                .map(|s| (s.size, s.hash, s.literal_bytes, s.matched_bytes))
                .map_err(|e| e.to_string()),
            None => delta::stream_file(&file, CHUNK, &mut sink)
                .map(|(size, hash)| (size, *hash.as_bytes(), size, 0))
                .map_err(|e| e.to_string()),
        };
        let after = stamp(&file);
        match res {
            Ok((size, _, _, _)) if before.is_none() || before != after => {
                let (was, now) = (before.map_or(0, |b| b.0), after.map_or(0, |a| a.0));
                self.send(&Msg::Fail {
                    id,
                    mismatch: true,
                    message: format!(
                        "changed while being read ({was} bytes when opened, {size} read, {now} now)"
                    ),
                })
            }
            Ok((size, hash, literal, matched)) => self.send(&Msg::End {
                id,
                size,
                hash,
                literal,
                matched,
            }),
            Err(message) => self.send(&Msg::Fail {
                id,
                mismatch: false,
                message: format!("reading {}: {message}", String::from_utf8_lossy(path)),
            }),
        }
    }

    fn begin(
        &mut self,
        id: u64,
        path: &[u8],
        is_delta: bool,
        attrs: wire::Attrs,
    ) -> Result<(), AgentError> {
        let root = self.root()?;
        let started = root.begin_file(path).and_then(|temp| {
            if is_delta {
                let base = root.open_read(path)?;
                Ok(Writing::Delta {
                    id,
                    applier: Box::new(delta::Applier::new(base, temp)),
                    attrs,
                })
            } else {
                Ok(Writing::Whole {
                    id,
                    temp: Box::new(temp),
                    attrs,
                })
            }
        });
        match started {
            Ok(w) => self.writing = Some(w),
            Err(e) => {
                self.writing = Some(Writing::Failed { id });
                self.send_fs_fail(id, &e)?;
            }
        }
        Ok(())
    }

    fn data(&mut self, id: u64, bytes: &[u8]) -> Result<(), AgentError> {
        let result = match &mut self.writing {
            Some(Writing::Whole { id: wid, temp, .. }) if *wid == id => temp
                .write_all(bytes)
                .map_err(|e| (Some(e.kind()), e.to_string())),
            Some(Writing::Delta {
                id: wid, applier, ..
            }) if *wid == id => applier.push(bytes).map_err(|e| {
                let kind = match &e {
                    crate::sync::delta::DeltaError::Io(io) => Some(io.kind()),
                    _ => None,
                };
                (kind, e.to_string())
            }),
            Some(Writing::Failed { id: wid }) if *wid == id => Ok(()),
            _ => {
                // Signature chunks for a coming DeltaReq: capped for the
                // session, not per id (ids are the peer's to choose).
                self.root()?;
                if self.signature_bytes + bytes.len() > MAX_SIGNATURE {
                    return Err(AgentError::Refused(format!(
                        "signature data (request {id}) exceeds {MAX_SIGNATURE} bytes"
                    )));
                }
                self.signature_bytes += bytes.len();
                self.signatures
                    .entry(id)
                    .or_default()
                    .extend_from_slice(bytes);
                Ok(())
            }
        };
        if let Err((kind, message)) = result {
            self.writing = Some(Writing::Failed { id });
            let root = self.root.as_deref().map(Root::path);
            self.send(&Msg::Fail {
                id,
                mismatch: false,
                message: fail_message(root, kind, &message),
            })?;
        }
        Ok(())
    }

    fn end(&mut self, id: u64, size: u64, hash: [u8; 32]) -> Result<(), AgentError> {
        let Some(w) = self.writing.take() else {
            return Err(AgentError::Refused(format!(
                "End for request {id} without Begin"
            )));
        };
        if w.id() != id {
            return Err(AgentError::Refused(format!(
                "End for request {id} while writing request {}",
                w.id()
            )));
        }
        let superuser = self.superuser;
        let (got_size, got_hash, temp, attrs) = match w {
            Writing::Failed { .. } => return Ok(()), // already answered
            Writing::Whole {
                mut temp, attrs, ..
            } => {
                // Flush first: the hash covers what reached the file.
                if let Err(e) = temp.flush() {
                    return self.send(&Msg::Fail {
                        id,
                        mismatch: false,
                        message: e.to_string(),
                    });
                }
                (temp.bytes_written(), temp.hash(), *temp, attrs)
            }
            Writing::Delta { applier, attrs, .. } => match applier.finish() {
                Ok((size, hash, temp)) => (size, hash, temp, attrs),
                Err(e) => {
                    return self.send(&Msg::Fail {
                        id,
                        mismatch: true,
                        message: format!("delta: {e}"),
                    })
                }
            },
        };
        if got_size != size || got_hash != hash {
            drop(temp);
            return self.send(&Msg::Fail {
                id,
                mismatch: true,
                message: format!("content check failed: wrote {got_size} bytes hashing {}, expected {size} bytes hashing {}", hex(&got_hash[..8]), hex(&hash[..8])),
            });
        }
        let owner = superuser.then_some((attrs.uid, attrs.gid));
        let attrs = fs_attrs(&attrs, owner);
        if size >= SOLO_FILE {
            // Committed alone with its own fsync (its writeback dominates),
            // on the commit thread while the next files arrive.
            self.finish_commit()?;
            let paths = HashSet::from([temp.path().to_vec()]);
            return self.spawn_commit(vec![(id, size)], paths, move || vec![temp.commit(&attrs)]);
        }
        let keep_open = self.root()?.durability() == Durability::FsyncEach;
        match temp.stage(&attrs, keep_open) {
            Ok(staged) => {
                let b = &mut self.batch;
                b.paths.insert(staged.path().to_vec());
                b.files.push((id, size, staged));
                b.bytes += size;
                b.since.get_or_insert_with(Instant::now);
                if b.files.len() >= self.batch_files || b.bytes >= BATCH_BYTES {
                    self.start_commit()?;
                }
                Ok(())
            }
            Err(e) => self.send_fs_fail(id, &e),
        }
    }

    /// Whether received files are not yet committed and answered.
    fn uncommitted(&self) -> bool {
        !self.batch.files.is_empty() || self.committing.is_some()
    }

    /// Whether `msg` must wait until every received file is committed: any
    /// request but a file transfer, and a transfer that touches a path of
    /// the pending or committing batch (a second version of it, a delta
    /// against it).
    fn batch_conflicts(&self, msg: &Msg) -> bool {
        match msg {
            Msg::Data { .. } | Msg::End { .. } | Msg::Fail { .. } => false,
            Msg::Begin { path, .. }
            | Msg::SigReq { path, .. }
            | Msg::ReadReq { path, .. }
            | Msg::DeltaReq { path, .. } => {
                self.batch.paths.contains(path)
                    || self
                        .committing
                        .as_ref()
                        .is_some_and(|c| c.paths.contains(path))
            }
            _ => true,
        }
    }

    /// Commits everything received and answers it: the commit in flight,
    /// then the pending batch ([`Root::commit_batch`]: durable, renamed,
    /// renames durable). `Done` is only ever sent after that.
    fn commit_batch(&mut self) -> Result<(), AgentError> {
        self.start_commit()?;
        self.finish_commit()
    }

    /// Starts committing the pending batch on a thread of its own, once the
    /// previous commit is done and answered.
    fn start_commit(&mut self) -> Result<(), AgentError> {
        if self.batch.files.is_empty() {
            return Ok(());
        }
        self.finish_commit()?;
        let root =
            Arc::clone(self.root.as_ref().ok_or_else(|| {
                AgentError::Refused("the client sent a request before Hello".into())
            })?);
        let batch = std::mem::take(&mut self.batch);
        let (ids, staged): (Vec<(u64, u64)>, Vec<Staged>) = batch
            .files
            .into_iter()
            .map(|(id, size, f)| ((id, size), f))
            .unzip();
        self.spawn_commit(ids, batch.paths, move || root.commit_batch(staged))
    }

    /// Runs `work` (one result per file of `ids`) as the commit in flight.
    fn spawn_commit(
        &mut self,
        ids: Vec<(u64, u64)>,
        paths: HashSet<Vec<u8>>,
        work: impl FnOnce() -> Vec<Result<(), FsError>> + Send + 'static,
    ) -> Result<(), AgentError> {
        debug_assert!(self.committing.is_none());
        match std::thread::Builder::new()
            .name("commit".into())
            .spawn(work)
        {
            Ok(handle) => {
                self.committing = Some(InFlight { ids, paths, handle });
                Ok(())
            }
            // The staged files went with `work`: their temporary files are
            // removed, the client resends them next run.
            Err(e) => self.fail_all(&ids, &format!("cannot start a commit thread: {e}")),
        }
    }

    /// Answers the commit in flight once it is done, without waiting.
    fn poll_commit(&mut self) -> Result<(), AgentError> {
        if self
            .committing
            .as_ref()
            .is_some_and(|c| c.handle.is_finished())
        {
            self.finish_commit()?;
        }
        Ok(())
    }

    /// Waits for the commit in flight (if any) and answers its files.
    fn finish_commit(&mut self) -> Result<(), AgentError> {
        let Some(c) = self.committing.take() else {
            return Ok(());
        };
        let Ok(results) = c.handle.join() else {
            return self.fail_all(&c.ids, "the commit thread panicked");
        };
        for ((id, size), r) in c.ids.into_iter().zip(results) {
            match r {
                Ok(()) => self.send(&Msg::Done { id, bytes: size })?,
                Err(e) => self.send_fs_fail(id, &e)?,
            }
        }
        Ok(())
    }

    fn fail_all(&mut self, ids: &[(u64, u64)], message: &str) -> Result<(), AgentError> {
        for &(id, _) in ids {
            self.send(&Msg::Fail {
                id,
                mismatch: false,
                message: message.to_string(),
            })?;
        }
        Ok(())
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn fs_attrs(a: &wire::Attrs, owner: Option<(u32, u32)>) -> fsroot::Attrs {
    fsroot::Attrs {
        mode: a.mode & 0o7777,
        mtime_sec: a.mtime_sec,
        mtime_nsec: a.mtime_nsec,
        owner,
    }
}
