//! The agent's view of the replicated tree: every filesystem operation the
//! standby performs on behalf of the primary, and the scan both sides use to
//! build their manifests.
//!
//! # Threat model
//!
//! `hasync agent` runs on the standby (usually as root) and applies changes
//! named by its peer under one root directory. The peer may be malicious
//! (a compromised primary) or buggy, and other processes may modify the tree
//! while we work. Whatever it sends, the agent must not:
//!
//! - **create, modify, chmod/chown or delete anything outside the root.**
//!   Paths are validated ([`validate`]): relative, `/`-separated, no empty,
//!   `.` or `..` components, no NUL, at most [`MAX_PATH`] bytes and
//!   [`MAX_NAME`] bytes per component. Validation alone is not enough:
//!   a symlink inside the tree (one the peer created, which it may, because
//!   symlink targets are data) would redirect a later write. So no path is
//!   ever handed to the kernel whole. Every operation starts at an
//!   `O_DIRECTORY` descriptor of the root and opens each directory component
//!   with `openat(O_NOFOLLOW | O_DIRECTORY)`; a symlink there is refused
//!   ("refusing to write through symlink `a/link`"). The last component is
//!   then acted on relative to its parent's descriptor with `*at` calls that
//!   never follow it either (`O_NOFOLLOW`, `O_EXCL`, `AT_SYMLINK_NOFOLLOW`,
//!   `renameat`/`unlinkat`, which do not follow by definition), and
//!   attributes are set on an opened descriptor (`fchown`, `fchmod`,
//!   `futimens`) rather than by name. Because the kernel resolves one
//!   component at a time against descriptors we hold, swapping a directory
//!   for a symlink concurrently cannot redirect us either: the swap is
//!   either seen (and refused) or irrelevant. The tests race exactly that.
//! - **leave a half-written file under a real name.** Files are written to
//!   `.<name>.hasync-<16 hex>.tmp` in the target directory (`O_CREAT |
//!   O_EXCL | O_NOFOLLOW`, mode 0600 so nobody reads a partial file), given
//!   their attributes, made durable, and only then `renameat`ed over the
//!   final name.
//!   A crash leaves at most such a temporary file; [`Root::scan`] with
//!   cleanup deletes them and [`scan`] never reports them. The pattern is reserved:
//!   a peer path with a component matching it is refused, so the peer cannot
//!   create files that cleanup would later delete or that collide with ours.
//! - **plant privilege escalations.** A peer could otherwise create a
//!   root-owned setuid executable inside the tree. By default setuid and
//!   setgid are dropped from regular files (setgid on directories, which only
//!   means group inheritance, is kept); [`Root::set_preserve_setid`] turns
//!   full fidelity back on. Devices, fifos and sockets are never created
//!   (there is no operation for them) and the scan skips them. Hard links are
//!   never created.
//!
//! Not in scope: exhausting disk space or inodes (the peer is allowed to
//! replicate a large tree); what *other* software on the standby does with
//! the symlinks it finds after a promotion (targets are replicated verbatim,
//! like `rsync -l`); local users who can write to the tree and also move its
//! directories *out of* the root (they need write access outside it, at which
//! point they do not need us), and hard links that a local user placed inside
//! the tree to a file outside it ([`Root::set_attrs`] on such a name changes
//! the shared inode; file *contents* are always replaced by rename, never
//! written in place, so those are safe). The root path itself is trusted
//! configuration and is opened normally (symlinks in it are followed once).
//!
//! # Decisions
//!
//! - **Order of a commit**: flush, `fchown`, `fchmod` (after chown, which
//!   clears setuid/setgid), `futimens` (last, so nothing bumps the mtime
//!   afterwards), then make data and metadata durable, then `renameat`.
//!   Durability before the rename is not optional: without it a crash after
//!   the rename can show an empty or partial file under the real name on
//!   XFS, btrfs or ext4 without `auto_da_alloc`. [`TempFile::commit`] does
//!   it for one file with its own `fsync`. Many files are cheaper together:
//!   [`TempFile::stage`] leaves each complete under its temporary name, and
//!   [`Root::commit_batch`] makes the whole batch durable at once, renames
//!   every file of it, then makes the renames durable. With
//!   [`Durability::Syncfs`] that is two `syncfs(2)` per batch instead of
//!   one `fsync` per file and per directory (50,000 small files in 35,000
//!   directories: ~85,000 fsyncs became ~25 syncfs pairs); the fallback,
//!   [`Durability::FsyncEach`], fsyncs the files of a batch from
//!   [`SYNC_THREADS`] threads, so that the journal commits many at once.
//!   A file whose durability step failed is never renamed.
//! - **Directory fsync is batched**: every operation records the directory
//!   it changed; [`Root::sync_dirs`] fsyncs each once (the `Sync` request of
//!   the protocol, and every [`Root::commit_batch`]), or with
//!   [`Durability::Syncfs`] and more than a few directories calls `syncfs`
//!   once. Until then a crash may lose renames, deletes and mkdirs,
//!   i.e. roll a name back to its previous complete version, never expose a
//!   partial one.
//! - **Replacing across types** (a file where a directory is, and so on) is
//!   the caller's job: delete, then create. The one convenience: a commit or
//!   symlink over an *empty* directory removes it first; over a non-empty one
//!   it fails with [`FsError::DirectoryInTheWay`].
//! - **Idempotence**: `mkdir` of an existing directory succeeds (leaving its
//!   attributes alone; use [`Root::set_attrs`]); `remove` and
//!   `remove_if_empty` of a missing path succeed.
//! - **Errors** ([`FsError`]) name the operation and the path relative to
//!   the root, with non-UTF-8 bytes shown as `\xNN`. The OS error is part of
//!   the message and deliberately *not* exposed as `source()`: the binary
//!   prints chains with `{:#}`, and the agent sends `to_string()` to its peer,
//!   so both show it exactly once; [`FsError::io_error`] gives it to code.
//!   Validation failures are [`FsError::InvalidPath`] ([`PathError`]) so the
//!   agent can answer them with a protocol error and count them;
//!   [`FsError::is_refusal`] also covers symlinks in the path.
//! - **Temporary files** are buffered ([`WRITE_BUFFER`]) and hash what is
//!   written ([`TempFile::hash`], [`TempFile::bytes_written`]), so the
//!   agent can check the result against the sender's `End` without reading
//!   it back. The agent scans with cleanup ([`Root::scan`]) when asked to
//!   clean up (the protocol's `cleanup` flag): the walk that lists the tree
//!   deletes the leftovers it meets, no second walk. Unlinking them changes
//!   their directory's mtime after the parent's listing recorded it, so a
//!   directory that lost a leftover is `fstat`ed again through the
//!   descriptor the walk holds and reported with its time from after the
//!   cleanup: the plan then sees it differ from the primary's and sets it
//!   back. A directory without leftovers costs nothing more.
//! - **Owner and mode** as given (`owner: None` leaves the owner, which is
//!   what a non-root agent must pass). Mode bits are masked to `0o7777`.
//!   Setting attributes opens the file or directory read-only (regular
//!   files and directories) and so needs read permission when not root;
//!   symlinks get `fchownat`/`utimensat` with `AT_SYMLINK_NOFOLLOW` (Linux
//!   symlinks have no mode).
//! - **The scan** walks with `openat`/`getdents64`/`fstatat`, never following
//!   symlinks, with [`SCAN_THREADS`] threads sharing a LIFO stack of
//!   directories (a child directory is opened relative to its parent's
//!   descriptor, so the number of open descriptors stays bounded by depth).
//!   Two threads pay off with cold caches, where they overlap disk reads
//!   (50,000 files in ~35,000 directories of a 256×256 hashed layout:
//!   3.0 s → 1.9 s); warm, the
//!   walk is bound by system calls and costs 75–350 ms for 50,000 files
//!   depending on how many directories hold them.
//!   Entries are sorted by the raw bytes of their full relative path, which
//!   both sides compute identically, so manifests merge-join. The root
//!   itself is [`Scan::root`] (one `fstat` of its descriptor, after its
//!   cleanup): the agent sends it as the empty path, and
//!   [`Root::set_root_attrs`] sets it, so its mode, owner and mtime are
//!   replicated like rsync's `./`. Directories
//!   report size 0 (their `st_size` is filesystem noise), symlinks the length
//!   of their target. It does not stop at mount points (like rsync without
//!   `-x`): a filesystem mounted inside the root is replicated as part of the
//!   tree. An unreadable directory aborts the scan rather than being skipped:
//!   a manifest silently missing a subtree would make the standby delete it.
//!   Entries that vanish while scanning are reported as
//!   [`SkipReason::Vanished`]; the cycle stops the services first, so the
//!   tree is normally quiescent. With `with_hash`, files are hashed with
//!   BLAKE3 through 1 MiB reads: files up to 1 MiB by the walking threads
//!   through the directory descriptor they hold (no second path walk), larger
//!   ones afterwards by one thread per CPU (up to 8). Exactly the `st_size`
//!   bytes of the opened descriptor are hashed and its stat replaces the
//!   walk's, so size and hash always agree. A file that cannot be read
//!   aborts a hashing scan.
//! - **Linux only**: `O_PATH`, `getdents64`, `/proc`-free.

use std::collections::BTreeSet;
use std::ffi::CStr;
use std::fmt::{self, Write as _};
use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// The longest relative path accepted, in bytes.
pub const MAX_PATH: usize = 4096;
/// The longest path component accepted, in bytes.
pub const MAX_NAME: usize = 255;
/// The write buffer of a [`TempFile`].
pub const WRITE_BUFFER: usize = 256 << 10;
/// The read buffer used for hashing during a scan.
pub const HASH_BUFFER: usize = 1 << 20;
/// Threads used to walk the tree in [`scan`].
pub const SCAN_THREADS: usize = 2;
/// Files up to this size are hashed by the walking thread, through the
/// directory descriptor it holds; larger ones afterwards, in parallel.
const INLINE_HASH_MAX: u64 = HASH_BUFFER as u64;
/// The longest symlink target accepted (`PATH_MAX` minus the NUL).
pub const MAX_TARGET: usize = 4095;

const TEMP_MARK: &[u8] = b".hasync-";
const TEMP_SUFFIX: &[u8] = b".tmp";
const TEMP_HEX: usize = 16;
/// `.` + mark + hex + suffix: the bytes a temporary name adds to a name.
const TEMP_FIXED: usize = 1 + TEMP_MARK.len() + TEMP_HEX + TEMP_SUFFIX.len();
/// Directory descriptors are shared with queued children only this deep;
/// deeper directories are reopened from the root, so a pathologically deep
/// tree cannot exhaust descriptors.
const SHARE_FD_DEPTH: usize = 64;

// ---------------------------------------------------------------------------
// Paths and errors
// ---------------------------------------------------------------------------

/// Raw path bytes that display readably: UTF-8 as is, control characters
/// escaped, other bytes as `\xNN`, very long paths shortened.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PathBytes(pub Vec<u8>);

impl PathBytes {
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl From<&[u8]> for PathBytes {
    fn from(b: &[u8]) -> Self {
        PathBytes(b.to_vec())
    }
}

impl fmt::Display for PathBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const SHOW: usize = 200;
        let (shown, cut) = if self.0.len() > 2 * SHOW {
            (&self.0[..SHOW], true)
        } else {
            (&self.0[..], false)
        };
        for chunk in shown.utf8_chunks() {
            for c in chunk.valid().chars() {
                if c == '\\' {
                    f.write_str("\\\\")?;
                } else if c.is_control() {
                    write!(f, "{}", c.escape_default())?;
                } else {
                    f.write_char(c)?;
                }
            }
            for b in chunk.invalid() {
                write!(f, "\\x{b:02x}")?;
            }
        }
        if cut {
            write!(f, "…({} bytes)", self.0.len())?;
        }
        Ok(())
    }
}

impl fmt::Debug for PathBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{self}`")
    }
}

/// Why a path from the peer was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathProblem {
    #[error("the path is empty")]
    Empty,
    #[error("absolute paths are not allowed")]
    Absolute,
    #[error("empty component (doubled or trailing `/`)")]
    EmptyComponent,
    #[error("`.` components are not allowed")]
    Dot,
    #[error("`..` components are not allowed")]
    DotDot,
    #[error("contains a NUL byte")]
    Nul,
    #[error("longer than {MAX_PATH} bytes")]
    TooLong,
    #[error("a component is longer than {MAX_NAME} bytes")]
    NameTooLong,
    #[error("a component matches hasync's temporary-file names (`.*.hasync-*.tmp`)")]
    Reserved,
}

/// A path that failed [`validate`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid path `{path}`: {problem}")]
pub struct PathError {
    pub path: PathBytes,
    pub problem: PathProblem,
}

/// Everything that can go wrong in this module.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// The peer sent a path that fails [`validate`].
    #[error(transparent)]
    InvalidPath(#[from] PathError),
    /// A directory component of the path is a symlink.
    #[error("refusing to {access} through symlink `{path}`")]
    SymlinkInPath {
        /// "write" or "read".
        access: &'static str,
        /// The path up to and including the symlink.
        path: PathBytes,
    },
    /// A directory component of the path does not exist.
    #[error("cannot {op} `{path}`: directory `{dir}` does not exist")]
    MissingDir {
        op: &'static str,
        path: PathBytes,
        dir: PathBytes,
    },
    /// A directory component of the path is not a directory.
    #[error("cannot {op} `{path}`: `{dir}` is not a directory")]
    NotADirectory {
        op: &'static str,
        path: PathBytes,
        dir: PathBytes,
    },
    /// The final name exists with the wrong type.
    #[error("cannot {op} `{path}`: it is {found}")]
    WrongType {
        op: &'static str,
        path: PathBytes,
        found: &'static str,
    },
    /// A file or symlink would replace a non-empty directory.
    #[error("cannot replace `{path}`: it is a directory that is not empty (delete it first)")]
    DirectoryInTheWay { path: PathBytes },
    /// A value from the peer the kernel would reject (symlink target, time).
    #[error("cannot {op} `{path}`: {problem}")]
    Invalid {
        op: &'static str,
        path: PathBytes,
        problem: &'static str,
    },
    /// A system call failed.
    #[error("cannot {op} `{path}`: {err}")]
    Io {
        op: &'static str,
        path: PathBytes,
        err: io::Error,
    },
}

impl FsError {
    /// An [`FsError::Io`] for callers' own operations on our files (for
    /// example reading one opened with [`Root::open_read`]).
    pub fn io(op: &'static str, path: &[u8], err: io::Error) -> FsError {
        io_err(op, path, err)
    }

    /// A path that fails validation.
    pub fn is_path_error(&self) -> bool {
        matches!(self, FsError::InvalidPath(_))
    }

    /// Something the peer should never ask for: an invalid path or a path
    /// through a symlink.
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            FsError::InvalidPath(_) | FsError::SymlinkInPath { .. }
        )
    }

    /// The OS error behind an [`FsError::Io`].
    pub fn io_error(&self) -> Option<&io::Error> {
        match self {
            FsError::Io { err, .. } => Some(err),
            _ => None,
        }
    }

    /// The path the error is about.
    pub fn path(&self) -> &[u8] {
        match self {
            FsError::InvalidPath(e) => e.path.as_bytes(),
            FsError::SymlinkInPath { path, .. }
            | FsError::MissingDir { path, .. }
            | FsError::NotADirectory { path, .. }
            | FsError::WrongType { path, .. }
            | FsError::DirectoryInTheWay { path }
            | FsError::Invalid { path, .. }
            | FsError::Io { path, .. } => path.as_bytes(),
        }
    }
}

fn io_err(op: &'static str, path: &[u8], err: io::Error) -> FsError {
    FsError::Io {
        op,
        path: path.into(),
        err,
    }
}

/// Checks a relative path from the peer; see the module documentation.
pub fn validate(rel: &[u8]) -> Result<(), PathError> {
    match path_problem(rel) {
        None => Ok(()),
        Some(problem) => Err(PathError {
            path: rel.into(),
            problem,
        }),
    }
}

fn path_problem(rel: &[u8]) -> Option<PathProblem> {
    if rel.is_empty() {
        return Some(PathProblem::Empty);
    }
    if rel.len() > MAX_PATH {
        return Some(PathProblem::TooLong);
    }
    if rel[0] == b'/' {
        return Some(PathProblem::Absolute);
    }
    if rel.contains(&0) {
        return Some(PathProblem::Nul);
    }
    for comp in rel.split(|&b| b == b'/') {
        let p = match comp {
            b"" => PathProblem::EmptyComponent,
            b"." => PathProblem::Dot,
            b".." => PathProblem::DotDot,
            c if c.len() > MAX_NAME => PathProblem::NameTooLong,
            c if is_temp_name(c) => PathProblem::Reserved,
            _ => continue,
        };
        return Some(p);
    }
    None
}

/// Whether `name` is one of our temporary names:
/// `.<some name>.hasync-<16 lowercase hex>.tmp`.
pub fn is_temp_name(name: &[u8]) -> bool {
    if name.len() <= TEMP_FIXED || name[0] != b'.' || !name.ends_with(TEMP_SUFFIX) {
        return false;
    }
    let hex_end = name.len() - TEMP_SUFFIX.len();
    let hex_start = hex_end - TEMP_HEX;
    name[hex_start..hex_end]
        .iter()
        .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        && name[..hex_start].ends_with(TEMP_MARK)
}

/// The temporary name for `name`, shortened so it fits in [`MAX_NAME`].
fn temp_name(name: &[u8], random: u64) -> Vec<u8> {
    let keep = name.len().min(MAX_NAME - TEMP_FIXED);
    let mut t = Vec::with_capacity(keep + TEMP_FIXED + 1);
    t.push(b'.');
    t.extend_from_slice(&name[..keep]);
    t.extend_from_slice(TEMP_MARK);
    t.extend_from_slice(format!("{random:016x}").as_bytes());
    t.extend_from_slice(TEMP_SUFFIX);
    t
}

fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: the buffer is valid for 8 bytes of writes.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), libc::GRND_NONBLOCK) };
    if n == 8 {
        return u64::from_ne_bytes(b);
    }
    // No entropy yet (early boot) or no getrandom: uniqueness is all we need,
    // O_EXCL does the rest.
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mut h = blake3::Hasher::new();
    h.update(&t.to_le_bytes());
    h.update(&std::process::id().to_le_bytes());
    h.update(&COUNTER.fetch_add(1, Ordering::Relaxed).to_le_bytes());
    let out = h.finalize();
    u64::from_le_bytes(out.as_bytes()[..8].try_into().expect("8 bytes"))
}

/// Splits a relative path into its directory part (possibly empty) and name.
fn split_last(rel: &[u8]) -> (&[u8], &[u8]) {
    match rel.iter().rposition(|&b| b == b'/') {
        Some(i) => (&rel[..i], &rel[i + 1..]),
        None => (&[], rel),
    }
}

fn join(dir: &[u8], name: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(dir.len() + 1 + name.len());
    if !dir.is_empty() {
        p.extend_from_slice(dir);
        p.push(b'/');
    }
    p.extend_from_slice(name);
    p
}

// ---------------------------------------------------------------------------
// System calls
// ---------------------------------------------------------------------------

mod sys {
    use super::*;

    /// A NUL-terminated copy of a name known to contain no NUL.
    pub(super) struct CName(Vec<u8>);

    impl CName {
        pub(super) fn new(name: &[u8]) -> io::Result<CName> {
            if name.contains(&0) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "name contains a NUL byte",
                ));
            }
            let mut v = Vec::with_capacity(name.len() + 1);
            v.extend_from_slice(name);
            v.push(0);
            Ok(CName(v))
        }

        pub(super) fn as_ptr(&self) -> *const libc::c_char {
            self.0.as_ptr().cast()
        }

        pub(super) fn as_cstr(&self) -> &CStr {
            CStr::from_bytes_with_nul(&self.0).expect("one NUL, at the end")
        }
    }

    fn cvt(mut f: impl FnMut() -> libc::c_int) -> io::Result<libc::c_int> {
        loop {
            let r = f();
            if r != -1 {
                return Ok(r);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    pub(super) fn errno(e: &io::Error) -> i32 {
        e.raw_os_error().unwrap_or(0)
    }

    pub(super) fn openat(
        dir: BorrowedFd<'_>,
        name: &CStr,
        flags: libc::c_int,
        mode: libc::mode_t,
    ) -> io::Result<OwnedFd> {
        // SAFETY: `name` is NUL-terminated; the fd is owned by nobody else.
        let fd = cvt(|| unsafe {
            libc::openat(
                dir.as_raw_fd(),
                name.as_ptr(),
                flags | libc::O_CLOEXEC,
                mode,
            )
        })?;
        // SAFETY: openat returned a fresh descriptor that we now own.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    pub(super) fn openat_n(
        dir: BorrowedFd<'_>,
        name: &[u8],
        flags: libc::c_int,
        mode: libc::mode_t,
    ) -> io::Result<OwnedFd> {
        openat(dir, CName::new(name)?.as_cstr(), flags, mode)
    }

    pub(super) fn fstatat(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<libc::stat> {
        let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
        // SAFETY: valid pointers; AT_SYMLINK_NOFOLLOW: never follow.
        cvt(|| unsafe {
            libc::fstatat(
                dir.as_raw_fd(),
                name.as_ptr(),
                st.as_mut_ptr(),
                libc::AT_SYMLINK_NOFOLLOW,
            )
        })?;
        // SAFETY: fstatat succeeded and filled the struct.
        Ok(unsafe { st.assume_init() })
    }

    pub(super) fn fstatat_n(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<libc::stat> {
        fstatat(dir, CName::new(name)?.as_cstr())
    }

    pub(super) fn fstat(fd: BorrowedFd<'_>) -> io::Result<libc::stat> {
        let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
        // SAFETY: valid fd and pointer.
        cvt(|| unsafe { libc::fstat(fd.as_raw_fd(), st.as_mut_ptr()) })?;
        // SAFETY: fstat succeeded and filled the struct.
        Ok(unsafe { st.assume_init() })
    }

    pub(super) fn mkdirat(dir: BorrowedFd<'_>, name: &[u8], mode: libc::mode_t) -> io::Result<()> {
        let c = CName::new(name)?;
        // SAFETY: valid fd, NUL-terminated name.
        cvt(|| unsafe { libc::mkdirat(dir.as_raw_fd(), c.as_ptr(), mode) }).map(drop)
    }

    pub(super) fn symlinkat(target: &[u8], dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<()> {
        let t = CName::new(target)?;
        let c = CName::new(name)?;
        // SAFETY: valid fd, NUL-terminated strings.
        cvt(|| unsafe { libc::symlinkat(t.as_ptr(), dir.as_raw_fd(), c.as_ptr()) }).map(drop)
    }

    pub(super) fn renameat(dir: BorrowedFd<'_>, from: &[u8], to: &[u8]) -> io::Result<()> {
        let f = CName::new(from)?;
        let t = CName::new(to)?;
        // SAFETY: valid fds, NUL-terminated names.
        cvt(|| unsafe { libc::renameat(dir.as_raw_fd(), f.as_ptr(), dir.as_raw_fd(), t.as_ptr()) })
            .map(drop)
    }

    pub(super) fn unlinkat(dir: BorrowedFd<'_>, name: &[u8], flags: libc::c_int) -> io::Result<()> {
        let c = CName::new(name)?;
        // SAFETY: valid fd, NUL-terminated name.
        cvt(|| unsafe { libc::unlinkat(dir.as_raw_fd(), c.as_ptr(), flags) }).map(drop)
    }

    pub(super) fn readlinkat(dir: BorrowedFd<'_>, name: &CStr, hint: usize) -> io::Result<Vec<u8>> {
        let mut cap = (hint + 1).clamp(64, 4096);
        loop {
            let mut buf = vec![0u8; cap];
            // SAFETY: buf is valid for `cap` bytes of writes.
            let n = unsafe {
                libc::readlinkat(dir.as_raw_fd(), name.as_ptr(), buf.as_mut_ptr().cast(), cap)
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            let n = n as usize;
            if n < cap {
                buf.truncate(n);
                return Ok(buf);
            }
            cap *= 2;
        }
    }

    pub(super) fn fchown(fd: BorrowedFd<'_>, uid: u32, gid: u32) -> io::Result<()> {
        // SAFETY: valid fd.
        cvt(|| unsafe { libc::fchown(fd.as_raw_fd(), uid, gid) }).map(drop)
    }

    pub(super) fn fchmod(fd: BorrowedFd<'_>, mode: u32) -> io::Result<()> {
        // SAFETY: valid fd.
        cvt(|| unsafe { libc::fchmod(fd.as_raw_fd(), mode as libc::mode_t) }).map(drop)
    }

    pub(super) fn fchownat_nofollow(
        dir: BorrowedFd<'_>,
        name: &[u8],
        uid: u32,
        gid: u32,
    ) -> io::Result<()> {
        let c = CName::new(name)?;
        // SAFETY: valid fd, NUL-terminated name.
        cvt(|| unsafe {
            libc::fchownat(
                dir.as_raw_fd(),
                c.as_ptr(),
                uid,
                gid,
                libc::AT_SYMLINK_NOFOLLOW,
            )
        })
        .map(drop)
    }

    fn times(sec: i64, nsec: u32) -> [libc::timespec; 2] {
        [
            libc::timespec {
                tv_sec: 0,
                tv_nsec: libc::UTIME_OMIT,
            },
            libc::timespec {
                tv_sec: sec as libc::time_t,
                tv_nsec: nsec as libc::c_long,
            },
        ]
    }

    /// Sets the mtime (and leaves the atime) of an open file.
    pub(super) fn futimens(fd: BorrowedFd<'_>, sec: i64, nsec: u32) -> io::Result<()> {
        let t = times(sec, nsec);
        // SAFETY: valid fd and a two-element array.
        cvt(|| unsafe { libc::futimens(fd.as_raw_fd(), t.as_ptr()) }).map(drop)
    }

    pub(super) fn utimensat_nofollow(
        dir: BorrowedFd<'_>,
        name: &[u8],
        sec: i64,
        nsec: u32,
    ) -> io::Result<()> {
        let c = CName::new(name)?;
        let t = times(sec, nsec);
        // SAFETY: valid fd, NUL-terminated name, two-element array.
        cvt(|| unsafe {
            libc::utimensat(
                dir.as_raw_fd(),
                c.as_ptr(),
                t.as_ptr(),
                libc::AT_SYMLINK_NOFOLLOW,
            )
        })
        .map(drop)
    }

    pub(super) fn fsync(fd: BorrowedFd<'_>) -> io::Result<()> {
        // SAFETY: valid fd.
        cvt(|| unsafe { libc::fsync(fd.as_raw_fd()) }).map(drop)
    }

    /// `sync_file_range(SYNC_FILE_RANGE_WRITE)`: start writing the range
    /// back, without waiting. A hint: errors are ignored (the later sync
    /// reports them).
    pub(super) fn start_writeback(fd: BorrowedFd<'_>, offset: u64, len: u64) {
        let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
            return;
        };
        // SAFETY: valid fd; no memory is passed.
        unsafe {
            libc::sync_file_range(fd.as_raw_fd(), offset, len, libc::SYNC_FILE_RANGE_WRITE);
        }
    }

    pub(super) fn syncfs(fd: BorrowedFd<'_>) -> io::Result<()> {
        // SAFETY: valid fd.
        cvt(|| unsafe { libc::syncfs(fd.as_raw_fd()) }).map(drop)
    }

    /// The `f_type` of the file system holding `fd`.
    pub(super) fn fstatfs_type(fd: BorrowedFd<'_>) -> io::Result<i64> {
        // SAFETY: statfs is plain data; fstatfs fills it.
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        // SAFETY: valid fd and a valid out pointer.
        cvt(|| unsafe { libc::fstatfs(fd.as_raw_fd(), &mut st) })?;
        #[allow(clippy::unnecessary_cast)]
        Ok(st.f_type as i64)
    }

    /// The running kernel's (major, minor) version.
    pub(super) fn kernel_release() -> Option<(u32, u32)> {
        // SAFETY: utsname is plain data; uname fills it.
        let mut u: libc::utsname = unsafe { std::mem::zeroed() };
        // SAFETY: a valid out pointer.
        if unsafe { libc::uname(&mut u) } != 0 {
            return None;
        }
        // SAFETY: uname NUL-terminates release.
        let release = unsafe { CStr::from_ptr(u.release.as_ptr()) }.to_bytes();
        let mut parts = release
            .split(|b| !b.is_ascii_digit())
            .map(|p| std::str::from_utf8(p).ok()?.parse::<u32>().ok());
        Some((parts.next()??, parts.next()??))
    }

    /// The names in a directory, without `.` and `..`, in one reusable
    /// arena. Each name is stored NUL-terminated.
    #[derive(Default)]
    pub(super) struct DirList {
        buf: Vec<u64>,
        names: Vec<u8>,
        items: Vec<(u32, u32, u8)>,
    }

    impl DirList {
        pub(super) fn len(&self) -> usize {
            self.items.len()
        }

        /// Name `i` without its NUL, and its `d_type`.
        pub(super) fn get(&self, i: usize) -> (&[u8], u8) {
            let (s, l, t) = self.items[i];
            (&self.names[s as usize..(s + l) as usize], t)
        }

        /// Name `i` as a C string.
        pub(super) fn cstr(&self, i: usize) -> &CStr {
            let (s, l, _) = self.items[i];
            CStr::from_bytes_with_nul(&self.names[s as usize..=(s + l) as usize])
                .expect("names are stored NUL-terminated")
        }

        /// Reads every entry of the directory open at `fd` (from its current
        /// offset, normally the start).
        pub(super) fn read(&mut self, fd: BorrowedFd<'_>) -> io::Result<()> {
            const BUF_WORDS: usize = 4096; // 32 KiB, as glibc's readdir
            if self.buf.len() < BUF_WORDS {
                self.buf.resize(BUF_WORDS, 0);
            }
            self.names.clear();
            self.items.clear();
            loop {
                // SAFETY: the buffer is valid for its length in bytes; the
                // kernel writes at most that many.
                let n = unsafe {
                    libc::syscall(
                        libc::SYS_getdents64,
                        fd.as_raw_fd(),
                        self.buf.as_mut_ptr(),
                        self.buf.len() * 8,
                    )
                };
                if n < 0 {
                    let e = io::Error::last_os_error();
                    if e.kind() == io::ErrorKind::Interrupted {
                        continue;
                    }
                    return Err(e);
                }
                if n == 0 {
                    return Ok(());
                }
                // SAFETY: the kernel initialised the first `n` bytes; u64 to
                // u8 reinterpretation is always valid.
                let bytes = unsafe {
                    std::slice::from_raw_parts(self.buf.as_ptr().cast::<u8>(), n as usize)
                };
                // struct linux_dirent64 { u64 ino; i64 off; u16 reclen; u8 type; char name[]; }
                let mut off = 0;
                while off + 19 <= bytes.len() {
                    let reclen = u16::from_ne_bytes([bytes[off + 16], bytes[off + 17]]) as usize;
                    if reclen < 19 || off + reclen > bytes.len() {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            "malformed getdents64 record",
                        ));
                    }
                    let d_type = bytes[off + 18];
                    let raw = &bytes[off + 19..off + reclen];
                    let len = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
                    let name = &raw[..len];
                    off += reclen;
                    if name == b"." || name == b".." {
                        continue;
                    }
                    let start = self.names.len();
                    self.names.extend_from_slice(name);
                    self.names.push(0);
                    self.items.push((start as u32, len as u32, d_type));
                }
            }
        }
    }
}

use sys::{errno, DirList};

const O_DIR_PATH: libc::c_int = libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW;
const O_DIR_READ: libc::c_int = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW;
const O_FILE_READ: libc::c_int =
    libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY;

fn file_type(mode: libc::mode_t) -> libc::mode_t {
    mode & libc::S_IFMT
}

fn type_name(mode: libc::mode_t) -> &'static str {
    match file_type(mode) {
        libc::S_IFREG => "a regular file",
        libc::S_IFDIR => "a directory",
        libc::S_IFLNK => "a symbolic link",
        libc::S_IFIFO => "a fifo",
        libc::S_IFSOCK => "a socket",
        libc::S_IFCHR => "a character device",
        libc::S_IFBLK => "a block device",
        _ => "a file of unknown type",
    }
}

/// A descriptor we either borrow (the root) or own (a subdirectory).
enum Dir<'a> {
    Root(BorrowedFd<'a>),
    Owned(OwnedFd),
}

impl Dir<'_> {
    fn fd(&self) -> BorrowedFd<'_> {
        match self {
            Dir::Root(fd) => *fd,
            Dir::Owned(fd) => fd.as_fd(),
        }
    }

    fn into_owned(self) -> io::Result<OwnedFd> {
        match self {
            Dir::Root(fd) => fd.try_clone_to_owned(),
            Dir::Owned(fd) => Ok(fd),
        }
    }
}

/// Why opening the directory `dir` (a prefix of `full`) failed.
enum WalkError {
    Symlink(Vec<u8>),
    Missing(Vec<u8>),
    NotDir(Vec<u8>),
    Io(Vec<u8>, io::Error),
}

impl WalkError {
    fn into_fs(self, access: &'static str, op: &'static str, full: &[u8]) -> FsError {
        match self {
            WalkError::Symlink(p) => FsError::SymlinkInPath {
                access,
                path: PathBytes(p),
            },
            WalkError::Missing(d) => FsError::MissingDir {
                op,
                path: full.into(),
                dir: PathBytes(d),
            },
            WalkError::NotDir(d) => FsError::NotADirectory {
                op,
                path: full.into(),
                dir: PathBytes(d),
            },
            WalkError::Io(d, err) => FsError::Io {
                op,
                path: if d.len() < full.len() {
                    PathBytes(d)
                } else {
                    full.into()
                },
                err,
            },
        }
    }
}

/// Opens directory `dir` (validated or empty) below `root`, one component at
/// a time, never following a symlink. Returns an `O_PATH` descriptor, or the
/// root itself for an empty `dir`.
fn walk<'r>(root: BorrowedFd<'r>, dir: &[u8]) -> Result<Dir<'r>, WalkError> {
    let mut cur = Dir::Root(root);
    if dir.is_empty() {
        return Ok(cur);
    }
    let mut end = 0;
    for comp in dir.split(|&b| b == b'/') {
        end += comp.len();
        let prefix = &dir[..end];
        end += 1;
        let mut attempts = 0;
        let fd = loop {
            let e = match sys::openat_n(cur.fd(), comp, O_DIR_PATH, 0) {
                Ok(fd) => break fd,
                Err(e) => e,
            };
            return Err(match errno(&e) {
                libc::ENOENT => WalkError::Missing(prefix.to_vec()),
                libc::ELOOP | libc::ENOTDIR => match sys::fstatat_n(cur.fd(), comp) {
                    Ok(st) if file_type(st.st_mode) == libc::S_IFLNK => {
                        WalkError::Symlink(prefix.to_vec())
                    }
                    Ok(st) if file_type(st.st_mode) != libc::S_IFDIR => {
                        WalkError::NotDir(prefix.to_vec())
                    }
                    // A directory again: swapped back and forth under us.
                    Ok(_) if attempts < 3 => {
                        attempts += 1;
                        continue;
                    }
                    _ => WalkError::Io(prefix.to_vec(), e),
                },
                _ => WalkError::Io(prefix.to_vec(), e),
            });
        };
        cur = Dir::Owned(fd);
    }
    Ok(cur)
}

// ---------------------------------------------------------------------------
// Root
// ---------------------------------------------------------------------------

/// Attributes applied to a file, directory or symlink.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Attrs {
    /// Permission bits including setuid/setgid/sticky; type bits are ignored.
    pub mode: u32,
    pub mtime_sec: i64,
    pub mtime_nsec: u32,
    /// `(uid, gid)` to set, or `None` to leave the owner alone.
    pub owner: Option<(u32, u32)>,
}

impl Attrs {
    fn check(&self, op: &'static str, path: &[u8]) -> Result<(), FsError> {
        if self.mtime_nsec >= 1_000_000_000 {
            return Err(FsError::Invalid {
                op,
                path: path.into(),
                problem: "mtime nanoseconds out of range",
            });
        }
        Ok(())
    }
}

/// The replicated tree on this node: a descriptor of its root directory.
/// `Send + Sync`; operations may run concurrently.
#[derive(Debug)]
pub struct Root {
    fd: OwnedFd,
    path: PathBuf,
    dirty: Arc<Mutex<BTreeSet<Vec<u8>>>>,
    preserve_setid: bool,
    durability: Durability,
}

/// How [`Root::commit_batch`] makes a batch of staged files durable before
/// renaming them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// One `syncfs(2)` of the root's file system for the whole batch (and
    /// one more for the renamed names): the kernel writes every dirty page
    /// and commits the journal once. Chosen on Linux >= 5.8, where `syncfs`
    /// reports writeback errors, for local file systems known to implement
    /// it ([`SYNCFS_FILESYSTEMS`]).
    Syncfs,
    /// `fsync` of every file of the batch, from up to [`SYNC_THREADS`]
    /// threads at once (so that a journaling file system commits many in one
    /// transaction), then of every directory that got a new name.
    FsyncEach,
}

/// A file being written has its writeback started every this many bytes
/// ([`TempFile`]).
pub const WRITE_BEHIND: u64 = 8 << 20;

/// Threads that fsync a batch's files at once ([`Durability::FsyncEach`]).
pub const SYNC_THREADS: usize = 8;

/// `statfs` magic numbers of the file systems [`Durability::Syncfs`] is used
/// on: ext2/3/4, XFS, btrfs, F2FS, tmpfs. Anything else (network and FUSE
/// file systems, overlayfs, ...) fsyncs each file.
pub const SYNCFS_FILESYSTEMS: [i64; 5] =
    [0xEF53, 0x5846_5342, 0x9123_683E, 0xF2F5_2010, 0x0102_1994];

/// More dirty directories than this are made durable by one `syncfs` rather
/// than one `fsync` each ([`Durability::Syncfs`] only).
const SYNCFS_DIRS: usize = 4;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn mark_dirty(dirty: &Mutex<BTreeSet<Vec<u8>>>, dir: &[u8]) {
    let mut set = lock(dirty);
    if !set.contains(dir) {
        set.insert(dir.to_vec());
    }
}

fn effective_mode(mode: u32, is_dir: bool, preserve_setid: bool) -> u32 {
    let mode = mode & 0o7777;
    if preserve_setid {
        mode
    } else if is_dir {
        mode & !libc::S_ISUID
    } else {
        mode & !(libc::S_ISUID | libc::S_ISGID)
    }
}

/// Renames `tmp` over `name` in `dir`; an empty directory in the way is
/// removed, a non-empty one is an error. The caller removes `tmp` on error.
fn rename_into_place(
    dir: BorrowedFd<'_>,
    tmp: &[u8],
    name: &[u8],
    rel: &[u8],
) -> Result<(), FsError> {
    match sys::renameat(dir, tmp, name) {
        Ok(()) => Ok(()),
        Err(e) if errno(&e) == libc::EISDIR => match sys::unlinkat(dir, name, libc::AT_REMOVEDIR) {
            Ok(()) => sys::renameat(dir, tmp, name).map_err(|e| io_err("rename into", rel, e)),
            Err(e2) if matches!(errno(&e2), libc::ENOTEMPTY | libc::EEXIST) => {
                Err(FsError::DirectoryInTheWay { path: rel.into() })
            }
            Err(e2) => Err(io_err("remove the empty directory at", rel, e2)),
        },
        Err(e) => Err(io_err("rename into", rel, e)),
    }
}

/// The durability step of a batch failed for the file `temp_rel`.
fn durability_error(temp_rel: &[u8], code: Option<i32>) -> FsError {
    io_err(
        "make durable",
        temp_rel,
        code.map_or_else(
            || io::Error::other("syncfs failed"),
            io::Error::from_raw_os_error,
        ),
    )
}

/// fsyncs every staged file from up to [`SYNC_THREADS`] threads; a file
/// whose fsync failed is dropped (its temporary file removed).
fn fsync_all(files: Vec<Staged>) -> Vec<Result<Staged, FsError>> {
    let n = files.len();
    if n == 0 {
        return Vec::new();
    }
    let threads = SYNC_THREADS.min(n);
    let per = n.div_ceil(threads);
    let mut slots: Vec<Option<Staged>> = files.into_iter().map(Some).collect();
    let mut errors: Vec<Option<io::Error>> = (0..n).map(|_| None).collect();
    std::thread::scope(|s| {
        for (fs, es) in slots.chunks_mut(per).zip(errors.chunks_mut(per)) {
            s.spawn(move || {
                for (f, e) in fs.iter().zip(es.iter_mut()) {
                    let f = f.as_ref().expect("staged file present");
                    let r = match &f.file {
                        Some(file) => file.sync_all(),
                        None => Err(io::Error::other("the file was closed before its sync")),
                    };
                    *e = r.err();
                }
            });
        }
    });
    slots
        .into_iter()
        .zip(errors)
        .map(|(f, e)| {
            let f = f.expect("staged file present");
            match e {
                None => Ok(f),
                Some(e) => Err(io_err("sync", &f.temp_rel, e)),
            }
        })
        .collect()
}

/// [`Durability::Syncfs`] on Linux >= 5.8 (where `syncfs` reports writeback
/// errors) for the file systems in [`SYNCFS_FILESYSTEMS`], else
/// [`Durability::FsyncEach`].
fn default_durability(fd: BorrowedFd<'_>) -> Durability {
    let kernel_ok = sys::kernel_release().is_some_and(|(major, minor)| (major, minor) >= (5, 8));
    let fs_ok = sys::fstatfs_type(fd).is_ok_and(|t| SYNCFS_FILESYSTEMS.contains(&t));
    if kernel_ok && fs_ok {
        Durability::Syncfs
    } else {
        Durability::FsyncEach
    }
}

impl Root {
    /// Opens the root directory, which must exist. The path itself is
    /// trusted configuration: symlinks in it are followed.
    pub fn open(path: &Path) -> Result<Root, FsError> {
        let fd = open_root(path)?;
        let durability = default_durability(fd.as_fd());
        Ok(Root {
            fd,
            path: path.to_path_buf(),
            dirty: Arc::default(),
            preserve_setid: false,
            durability,
        })
    }

    /// How batches are made durable (chosen by [`Root::open`] for the
    /// kernel and file system; see [`Durability`]).
    pub fn durability(&self) -> Durability {
        self.durability
    }

    /// Overrides the choice of [`Root::open`] (tests, measurements).
    pub fn set_durability(&mut self, d: Durability) {
        self.durability = d;
    }

    /// The path the root was opened with.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Keep setuid/setgid bits on files (off by default; see the module
    /// documentation).
    pub fn set_preserve_setid(&mut self, preserve: bool) {
        self.preserve_setid = preserve;
    }

    /// See [`validate`].
    pub fn validate(rel: &[u8]) -> Result<(), PathError> {
        validate(rel)
    }

    /// Validates `rel` and opens the directory holding its last component.
    fn parent<'p>(
        &self,
        rel: &'p [u8],
        access: &'static str,
        op: &'static str,
    ) -> Result<(Dir<'_>, &'p [u8]), FsError> {
        validate(rel)?;
        let (dir, name) = split_last(rel);
        let d = walk(self.fd.as_fd(), dir).map_err(|e| e.into_fs(access, op, rel))?;
        Ok((d, name))
    }

    /// Starts writing the file `rel`: returns a temporary file in the same
    /// directory that [`TempFile::commit`] renames over `rel`.
    pub fn begin_file(&self, rel: &[u8]) -> Result<TempFile, FsError> {
        let (dir, name) = self.parent(rel, "write", "create")?;
        let dir = dir.into_owned().map_err(|e| io_err("create", rel, e))?;
        let name_at = rel.len() - name.len();
        let mut attempts = 0;
        loop {
            let tmp = temp_name(name, random_u64());
            let mut temp_rel = rel[..name_at].to_vec();
            temp_rel.extend_from_slice(&tmp);
            let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW;
            match sys::openat_n(dir.as_fd(), &tmp, flags, 0o600) {
                Ok(fd) => {
                    return Ok(TempFile {
                        parent: Arc::new(dir),
                        rel: rel.to_vec(),
                        name_at,
                        temp_rel,
                        temp_at: name_at,
                        writer: Some(BufWriter::with_capacity(WRITE_BUFFER, File::from(fd))),
                        hasher: blake3::Hasher::new(),
                        written: 0,
                        kicked: 0,
                        dirty: self.dirty.clone(),
                        preserve_setid: self.preserve_setid,
                        done: false,
                    })
                }
                Err(e) if errno(&e) == libc::EEXIST && attempts < 8 => attempts += 1,
                Err(e) => return Err(io_err("create", &temp_rel, e)),
            }
        }
    }

    /// Creates directory `rel` with `mode` (exactly, whatever the umask).
    /// An existing directory is fine and left as it is; anything else there
    /// is an error.
    pub fn mkdir(&self, rel: &[u8], mode: u32) -> Result<(), FsError> {
        const OP: &str = "create directory";
        let (dir, name) = self.parent(rel, "write", OP)?;
        match sys::mkdirat(dir.fd(), name, 0o700) {
            Ok(()) => {
                mark_dirty(&self.dirty, split_last(rel).0);
                let fd =
                    sys::openat_n(dir.fd(), name, O_DIR_READ, 0).map_err(|e| io_err(OP, rel, e))?;
                sys::fchmod(fd.as_fd(), effective_mode(mode, true, self.preserve_setid))
                    .map_err(|e| io_err("set permissions of", rel, e))
            }
            Err(e) if errno(&e) == libc::EEXIST => match sys::fstatat_n(dir.fd(), name) {
                Ok(st) if file_type(st.st_mode) == libc::S_IFDIR => Ok(()),
                Ok(st) => Err(FsError::WrongType {
                    op: OP,
                    path: rel.into(),
                    found: type_name(st.st_mode),
                }),
                Err(_) => Err(io_err(OP, rel, e)),
            },
            Err(e) => Err(io_err(OP, rel, e)),
        }
    }

    /// Creates (or atomically replaces) the symlink `rel` pointing to
    /// `target`. The target is data: stored as is, never followed or checked
    /// beyond what the kernel requires (non-empty, no NUL, < 4096 bytes).
    pub fn symlink(&self, rel: &[u8], target: &[u8]) -> Result<(), FsError> {
        const OP: &str = "create symlink";
        let problem = if target.is_empty() {
            Some("the target is empty")
        } else if target.contains(&0) {
            Some("the target contains a NUL byte")
        } else if target.len() > MAX_TARGET {
            Some("the target is longer than 4095 bytes")
        } else {
            None
        };
        if let Some(problem) = problem {
            validate(rel)?;
            return Err(FsError::Invalid {
                op: OP,
                path: rel.into(),
                problem,
            });
        }
        let (dir, name) = self.parent(rel, "write", OP)?;
        let mut attempts = 0;
        let tmp = loop {
            let tmp = temp_name(name, random_u64());
            match sys::symlinkat(target, dir.fd(), &tmp) {
                Ok(()) => break tmp,
                Err(e) if errno(&e) == libc::EEXIST && attempts < 8 => attempts += 1,
                Err(e) => return Err(io_err(OP, rel, e)),
            }
        };
        if let Err(e) = rename_into_place(dir.fd(), &tmp, name, rel) {
            let _ = sys::unlinkat(dir.fd(), &tmp, 0);
            return Err(e);
        }
        mark_dirty(&self.dirty, split_last(rel).0);
        Ok(())
    }

    /// Removes `rel`: a file or symlink is unlinked, a directory removed
    /// recursively without ever following a symlink. A missing path is not
    /// an error.
    pub fn remove(&self, rel: &[u8]) -> Result<(), FsError> {
        let Some((dir, name)) = self.parent_if_present(rel, "remove")? else {
            return Ok(());
        };
        if remove_at(dir.fd(), name, rel)? {
            mark_dirty(&self.dirty, split_last(rel).0);
        }
        Ok(())
    }

    /// Removes `rel` if it is a file, a symlink or an empty directory; a
    /// directory with anything in it is an error ("Directory not empty").
    /// A missing path is not an error.
    pub fn remove_if_empty(&self, rel: &[u8]) -> Result<(), FsError> {
        const OP: &str = "remove";
        let Some((dir, name)) = self.parent_if_present(rel, OP)? else {
            return Ok(());
        };
        let r = match sys::unlinkat(dir.fd(), name, 0) {
            Err(e) if errno(&e) == libc::EISDIR => {
                sys::unlinkat(dir.fd(), name, libc::AT_REMOVEDIR)
            }
            r => r,
        };
        match r {
            Ok(()) => {
                mark_dirty(&self.dirty, split_last(rel).0);
                Ok(())
            }
            Err(e) if errno(&e) == libc::ENOENT => Ok(()),
            Err(e) => Err(io_err(OP, rel, e)),
        }
    }

    /// [`Root::parent`], or `None` when a directory on the way is missing
    /// or not a directory (so `rel` cannot exist).
    fn parent_if_present<'p>(
        &self,
        rel: &'p [u8],
        op: &'static str,
    ) -> Result<Option<(Dir<'_>, &'p [u8])>, FsError> {
        match self.parent(rel, "write", op) {
            Ok(p) => Ok(Some(p)),
            Err(FsError::MissingDir { .. } | FsError::NotADirectory { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Sets mode, owner and mtime of an existing file or directory (on an
    /// open descriptor, mtime last), or owner and mtime of a symlink (by
    /// name, never following it). Set a directory's attributes after
    /// filling it: creating entries bumps its mtime. The root itself is
    /// [`Root::set_root_attrs`]; here the empty path is refused like any
    /// invalid one.
    pub fn set_attrs(&self, rel: &[u8], attrs: &Attrs) -> Result<(), FsError> {
        const OP: &str = "set attributes of";
        attrs.check(OP, rel)?;
        let (dir, name) = self.parent(rel, "write", OP)?;
        match sys::openat_n(dir.fd(), name, O_FILE_READ, 0) {
            Ok(fd) => {
                let st = sys::fstat(fd.as_fd()).map_err(|e| io_err(OP, rel, e))?;
                let is_dir = match file_type(st.st_mode) {
                    libc::S_IFDIR => true,
                    libc::S_IFREG => false,
                    _ => {
                        return Err(FsError::WrongType {
                            op: OP,
                            path: rel.into(),
                            found: type_name(st.st_mode),
                        })
                    }
                };
                apply_attrs(fd.as_fd(), attrs, is_dir, self.preserve_setid, rel)
            }
            Err(e) if errno(&e) == libc::ELOOP => {
                if let Some((uid, gid)) = attrs.owner {
                    sys::fchownat_nofollow(dir.fd(), name, uid, gid)
                        .map_err(|e| io_err("set owner of", rel, e))?;
                }
                sys::utimensat_nofollow(dir.fd(), name, attrs.mtime_sec, attrs.mtime_nsec)
                    .map_err(|e| io_err("set mtime of", rel, e))
            }
            Err(e) => Err(io_err(OP, rel, e)),
        }
    }

    /// Sets mode, owner and mtime of the root directory itself (rsync's
    /// `./`, the empty path of a scan), on the descriptor [`Root::open`]
    /// opened. Set it last: every change at the top level bumps its mtime.
    pub fn set_root_attrs(&self, attrs: &Attrs) -> Result<(), FsError> {
        attrs.check("set attributes of", b".")?;
        apply_attrs(self.fd.as_fd(), attrs, true, self.preserve_setid, b".")
    }

    /// Opens the regular file `rel` for reading (the sender's content, or
    /// the receiver's delta base). A symlink or anything but a regular file
    /// is an error.
    pub fn open_read(&self, rel: &[u8]) -> Result<File, FsError> {
        const OP: &str = "open";
        let (dir, name) = self.parent(rel, "read", OP)?;
        let fd = sys::openat_n(dir.fd(), name, O_FILE_READ, 0).map_err(|e| {
            if errno(&e) == libc::ELOOP {
                FsError::WrongType {
                    op: OP,
                    path: rel.into(),
                    found: "a symbolic link",
                }
            } else {
                io_err(OP, rel, e)
            }
        })?;
        let st = sys::fstat(fd.as_fd()).map_err(|e| io_err(OP, rel, e))?;
        if file_type(st.st_mode) != libc::S_IFREG {
            return Err(FsError::WrongType {
                op: OP,
                path: rel.into(),
                found: type_name(st.st_mode),
            });
        }
        // O_NONBLOCK (which kept a fifo swapped in from blocking the open)
        // has no effect on regular files, so it can stay.
        Ok(File::from(fd))
    }

    /// The receiver's current version of `rel`, as a delta base: same as
    /// [`Root::open_read`].
    pub fn open_base(&self, rel: &[u8]) -> Result<File, FsError> {
        self.open_read(rel)
    }

    /// fsyncs every directory changed since the last call, so renames,
    /// creations and deletions survive a crash.
    pub fn sync_dirs(&self) -> Result<(), FsError> {
        let dirs = std::mem::take(&mut *lock(&self.dirty));
        if self.durability == Durability::Syncfs && dirs.len() > SYNCFS_DIRS {
            if let Err(e) = self.syncfs() {
                lock(&self.dirty).extend(dirs);
                return Err(e);
            }
            return Ok(());
        }
        let mut it = dirs.into_iter();
        while let Some(d) = it.next() {
            if let Err(e) = self.sync_dir(&d) {
                let mut set = lock(&self.dirty);
                set.insert(d);
                set.extend(it);
                return Err(e);
            }
        }
        Ok(())
    }

    fn sync_dir(&self, d: &[u8]) -> Result<(), FsError> {
        const OP: &str = "sync directory";
        if d.is_empty() {
            return sys::fsync(self.fd.as_fd()).map_err(|e| io_err(OP, b"." as &[u8], e));
        }
        let (dir, name) = match self.parent(d, "write", OP) {
            Ok(p) => p,
            // Gone since: nothing to make durable.
            Err(FsError::MissingDir { .. } | FsError::NotADirectory { .. }) => return Ok(()),
            Err(e) => return Err(e),
        };
        match sys::openat_n(dir.fd(), name, O_DIR_READ, 0) {
            Ok(fd) => sys::fsync(fd.as_fd()).map_err(|e| io_err(OP, d, e)),
            Err(e) if matches!(errno(&e), libc::ENOENT | libc::ENOTDIR | libc::ELOOP) => Ok(()),
            Err(e) => Err(io_err(OP, d, e)),
        }
    }

    /// `syncfs(2)` of the root's file system: every dirty page and inode
    /// on it reaches the disk. Since Linux 5.8 it fails if writeback failed
    /// since the descriptor was opened ([`Root::open`] only picks
    /// [`Durability::Syncfs`] there).
    fn syncfs(&self) -> Result<(), FsError> {
        sys::syncfs(self.fd.as_fd())
            .map_err(|e| io_err("sync the file system of", b"." as &[u8], e))
    }

    /// Commits staged files together: makes all of them durable at once
    /// (see [`Durability`]), then renames each over its final name, then
    /// makes the renames durable ([`Root::sync_dirs`]). No file is renamed
    /// before its content is durable: a file whose durability step failed
    /// is not renamed and its temporary file is removed. Returns one result
    /// per file, in order; an error after the renames (syncing the
    /// directories) fails every renamed file of the batch, whose names
    /// may then roll back to their previous complete versions in a crash.
    pub fn commit_batch(&self, files: Vec<Staged>) -> Vec<Result<(), FsError>> {
        let synced: Vec<Result<Staged, FsError>> = match self.durability {
            Durability::Syncfs => match self.syncfs() {
                Ok(()) => files.into_iter().map(Ok).collect(),
                Err(e) => {
                    let code = e.io_error().and_then(io::Error::raw_os_error);
                    files
                        .into_iter()
                        .map(|f| Err(durability_error(&f.temp_rel, code)))
                        .collect()
                }
            },
            Durability::FsyncEach => fsync_all(files),
        };
        let mut results: Vec<Result<(), FsError>> = synced
            .into_iter()
            .map(|r| r.and_then(Staged::publish))
            .collect();
        if results.iter().any(Result::is_ok) {
            if let Err(e) = self.sync_dirs() {
                let code = e.io_error().and_then(io::Error::raw_os_error);
                for r in results.iter_mut().filter(|r| r.is_ok()) {
                    *r = Err(io_err(
                        "sync the directories of the batch of",
                        e.path(),
                        code.map_or_else(
                            || io::Error::other(e.to_string()),
                            io::Error::from_raw_os_error,
                        ),
                    ));
                }
            }
        }
        results
    }

    /// [`scan`] of this root. With `cleanup` it also deletes the leftover
    /// temporary files (and temporary symlinks) a crash or a kill left
    /// wherever it walks (counted in [`Scan::removed`]), with no second
    /// walk of the tree; a directory it removed something from is reported
    /// with its mtime from after the removal. Excluded directories are not
    /// entered, so
    /// leftovers in a directory excluded since the interrupted run stay
    /// (hasync never touches an excluded path).
    pub fn scan(
        &self,
        exclude: &(dyn Fn(&[u8], bool) -> bool + Sync),
        with_hash: bool,
        cleanup: bool,
    ) -> Result<Scan, FsError> {
        scan_fd(
            self.fd.as_fd(),
            exclude,
            with_hash,
            ScanConfig {
                cleanup,
                ..ScanConfig::default_for_host()
            },
        )
    }
}

fn open_root(path: &Path) -> Result<OwnedFd, FsError> {
    let c = sys::CName::new(path.as_os_str().as_bytes())
        .map_err(|e| io_err("open root directory", path.as_os_str().as_bytes(), e))?;
    // SAFETY: NUL-terminated path.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io_err(
            "open root directory",
            path.as_os_str().as_bytes(),
            io::Error::last_os_error(),
        ));
    }
    // SAFETY: fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn apply_attrs(
    fd: BorrowedFd<'_>,
    attrs: &Attrs,
    is_dir: bool,
    preserve_setid: bool,
    rel: &[u8],
) -> Result<(), FsError> {
    // chown first: it clears setuid/setgid, which chmod then sets.
    if let Some((uid, gid)) = attrs.owner {
        sys::fchown(fd, uid, gid).map_err(|e| io_err("set owner of", rel, e))?;
    }
    sys::fchmod(fd, effective_mode(attrs.mode, is_dir, preserve_setid))
        .map_err(|e| io_err("set permissions of", rel, e))?;
    sys::futimens(fd, attrs.mtime_sec, attrs.mtime_nsec).map_err(|e| io_err("set mtime of", rel, e))
}

/// Removes `name` in `dir` whatever it is; `Ok(false)` if it was not there.
fn remove_at(dir: BorrowedFd<'_>, name: &[u8], rel: &[u8]) -> Result<bool, FsError> {
    match sys::unlinkat(dir, name, 0) {
        Ok(()) => Ok(true),
        Err(e) if errno(&e) == libc::ENOENT => Ok(false),
        Err(e) if errno(&e) == libc::EISDIR => remove_tree(dir, name, rel),
        Err(e) => Err(io_err("remove", rel, e)),
    }
}

/// Removes the directory `name` in `dir` and everything below it. Only
/// descriptors are followed, never symlinks: a symlink inside is unlinked
/// itself. Uses one descriptor per level of depth.
fn remove_tree(dir: BorrowedFd<'_>, name: &[u8], rel: &[u8]) -> Result<bool, FsError> {
    let fd = match sys::openat_n(dir, name, O_DIR_READ, 0) {
        Ok(fd) => fd,
        Err(e) if errno(&e) == libc::ENOENT => return Ok(false),
        // Swapped for a non-directory since we looked.
        Err(e) if matches!(errno(&e), libc::ELOOP | libc::ENOTDIR) => {
            return remove_at(dir, name, rel)
        }
        Err(e) => return Err(io_err("remove", rel, e)),
    };
    let mut list = DirList::default();
    // Read everything before deleting anything: deleting while reading may
    // make getdents skip entries on some filesystems.
    list.read(fd.as_fd())
        .map_err(|e| io_err("read directory", rel, e))?;
    for i in 0..list.len() {
        let (child, d_type) = list.get(i);
        let child_rel = join(rel, child);
        if d_type == libc::DT_DIR {
            remove_tree(fd.as_fd(), child, &child_rel)?;
        } else {
            remove_at(fd.as_fd(), child, &child_rel)?;
        }
    }
    drop(list);
    match sys::unlinkat(dir, name, libc::AT_REMOVEDIR) {
        Ok(()) => Ok(true),
        Err(e) if errno(&e) == libc::ENOENT => Ok(true),
        Err(e) => Err(io_err("remove", rel, e)),
    }
}

// ---------------------------------------------------------------------------
// TempFile
// ---------------------------------------------------------------------------

/// A file being written under a temporary name; see [`Root::begin_file`].
/// Buffered ([`WRITE_BUFFER`]); hashes what is written (BLAKE3) so the agent
/// can check it against the sender's hash. Dropping it without
/// [`TempFile::commit`] deletes it.
pub struct TempFile {
    parent: Arc<OwnedFd>,
    rel: Vec<u8>,
    name_at: usize,
    temp_rel: Vec<u8>,
    temp_at: usize,
    writer: Option<BufWriter<File>>,
    hasher: blake3::Hasher,
    written: u64,
    /// Bytes whose writeback was started ([`WRITE_BEHIND`]).
    kicked: u64,
    dirty: Arc<Mutex<BTreeSet<Vec<u8>>>>,
    preserve_setid: bool,
    done: bool,
}

impl fmt::Debug for TempFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TempFile")
            .field("path", &PathBytes(self.rel.clone()))
            .field("temp", &PathBytes(self.temp_rel.clone()))
            .field("written", &self.written)
            .finish()
    }
}

impl TempFile {
    /// The final path, relative to the root.
    pub fn path(&self) -> &[u8] {
        &self.rel
    }

    /// The temporary file's path, relative to the root.
    pub fn temp_path(&self) -> &[u8] {
        &self.temp_rel
    }

    /// Bytes written so far.
    pub fn bytes_written(&self) -> u64 {
        self.written
    }

    /// BLAKE3 of everything written so far.
    pub fn hash(&self) -> [u8; 32] {
        *self.hasher.finalize().as_bytes()
    }

    /// Starts writeback of what the buffer has passed to the file, every
    /// [`WRITE_BEHIND`] bytes, so that a large file's final sync does not
    /// find all of it still dirty: the disk writes while the rest arrives.
    /// Only a hint (`sync_file_range(SYNC_FILE_RANGE_WRITE)`); durability
    /// still comes from the sync before the rename.
    fn write_behind(&mut self) {
        if self.written - self.kicked < WRITE_BEHIND {
            return;
        }
        let Some(w) = self.writer.as_ref() else {
            return;
        };
        let end = self.written - w.buffer().len() as u64;
        if end > self.kicked {
            sys::start_writeback(w.get_ref().as_fd(), self.kicked, end - self.kicked);
            self.kicked = end;
        }
    }

    fn write_error(&self, e: io::Error) -> io::Error {
        io::Error::new(e.kind(), io_err("write", &self.temp_rel, e))
    }

    /// Flushes, sets owner, mode and (last) mtime, fsyncs, and renames the
    /// file over its final name (replacing a file or symlink there, or an
    /// empty directory). On error the temporary file is deleted. Many files
    /// are cheaper together: [`TempFile::stage`] and [`Root::commit_batch`].
    pub fn commit(self, attrs: &Attrs) -> Result<(), FsError> {
        let staged = self.stage(attrs, true)?;
        let file = staged.file.as_ref().expect("kept open");
        file.sync_all()
            .map_err(|e| io_err("sync", &staged.temp_rel, e))?;
        staged.publish()
    }

    /// Flushes and sets owner, mode and (last) mtime, but neither syncs nor
    /// renames: the file stays under its temporary name until
    /// [`Root::commit_batch`] makes it durable and renames it (dropping the
    /// [`Staged`] file instead deletes it). `keep_open`: keep the
    /// descriptor for [`Durability::FsyncEach`]; with
    /// [`Durability::Syncfs`] only the directory's is kept.
    pub fn stage(mut self, attrs: &Attrs, keep_open: bool) -> Result<Staged, FsError> {
        attrs.check("commit", &self.rel)?;
        let writer = self.writer.take().expect("writer present until commit");
        let file = match writer.into_inner() {
            Ok(f) => f,
            Err(e) => {
                let (err, writer) = e.into_parts();
                // Drop the unwritten buffer without a second flush attempt.
                drop(writer.into_parts());
                return Err(io_err("write", &self.temp_rel, err));
            }
        };
        apply_attrs(
            file.as_fd(),
            attrs,
            false,
            self.preserve_setid,
            &self.temp_rel,
        )?;
        // From here on the Staged file owns the temporary name.
        self.done = true;
        Ok(Staged {
            parent: self.parent.clone(),
            rel: std::mem::take(&mut self.rel),
            name_at: self.name_at,
            temp_rel: std::mem::take(&mut self.temp_rel),
            temp_at: self.temp_at,
            file: keep_open.then_some(file),
            dirty: self.dirty.clone(),
            done: false,
        })
    }
}

/// A complete temporary file with its attributes, not yet durable and not
/// yet under its final name; see [`TempFile::stage`] and
/// [`Root::commit_batch`]. Dropping it deletes the temporary file.
pub struct Staged {
    parent: Arc<OwnedFd>,
    rel: Vec<u8>,
    name_at: usize,
    temp_rel: Vec<u8>,
    temp_at: usize,
    file: Option<File>,
    dirty: Arc<Mutex<BTreeSet<Vec<u8>>>>,
    done: bool,
}

impl fmt::Debug for Staged {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Staged")
            .field("path", &PathBytes(self.rel.clone()))
            .field("temp", &PathBytes(self.temp_rel.clone()))
            .finish()
    }
}

impl Staged {
    /// The final path, relative to the root.
    pub fn path(&self) -> &[u8] {
        &self.rel
    }

    /// The temporary file's path, relative to the root.
    pub fn temp_path(&self) -> &[u8] {
        &self.temp_rel
    }

    /// Renames the file into place. Only after its content is durable.
    fn publish(mut self) -> Result<(), FsError> {
        drop(self.file.take());
        rename_into_place(
            self.parent.as_fd(),
            &self.temp_rel[self.temp_at..],
            &self.rel[self.name_at..],
            &self.rel,
        )?;
        self.done = true;
        mark_dirty(&self.dirty, split_last(&self.rel).0);
        Ok(())
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.done {
            let _ = sys::unlinkat(self.parent.as_fd(), &self.temp_rel[self.temp_at..], 0);
        }
    }
}

impl Write for TempFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let w = self.writer.as_mut().expect("writer present until commit");
        match w.write(buf) {
            Ok(n) => {
                self.hasher.update(&buf[..n]);
                self.written += n as u64;
                self.write_behind();
                Ok(n)
            }
            Err(e) => Err(self.write_error(e)),
        }
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        let w = self.writer.as_mut().expect("writer present until commit");
        match w.write_all(buf) {
            Ok(()) => {
                self.hasher.update(buf);
                self.written += buf.len() as u64;
                self.write_behind();
                Ok(())
            }
            Err(e) => Err(self.write_error(e)),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        let w = self.writer.as_mut().expect("writer present until commit");
        w.flush().map_err(|e| self.write_error(e))
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        // Discard the buffer instead of flushing it into a file we delete.
        if let Some(w) = self.writer.take() {
            drop(w.into_parts());
        }
        let _ = sys::unlinkat(self.parent.as_fd(), &self.temp_rel[self.temp_at..], 0);
    }
}

// ---------------------------------------------------------------------------
// Scan
// ---------------------------------------------------------------------------

// The scan produces the manifest entries the planner merge-joins.
pub use crate::sync::manifest::{Attrs as EntryAttrs, Entry, Kind};

/// Why the scan left a path out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipReason {
    Socket,
    Fifo,
    CharDevice,
    BlockDevice,
    UnknownType,
    /// Longer than [`MAX_PATH`] or a component longer than [`MAX_NAME`]:
    /// the other side would refuse it.
    TooLong,
    /// A directory or special file named like our temporary files.
    Reserved,
    /// It disappeared (or changed type) while being scanned.
    Vanished,
}

impl fmt::Display for SkipReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SkipReason::Socket => "a socket",
            SkipReason::Fifo => "a fifo",
            SkipReason::CharDevice => "a character device",
            SkipReason::BlockDevice => "a block device",
            SkipReason::UnknownType => "a file of unknown type",
            SkipReason::TooLong => "path or name too long to replicate",
            SkipReason::Reserved => "named like a hasync temporary file",
            SkipReason::Vanished => "vanished during the scan",
        })
    }
}

/// A path the scan left out, for the caller to warn about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub path: Vec<u8>,
    pub reason: SkipReason,
}

/// The result of [`scan`].
#[derive(Debug, Default)]
pub struct Scan {
    /// Sorted by `path` bytes.
    pub entries: Vec<Entry>,
    /// Sorted by `path` bytes.
    pub skipped: Vec<Skipped>,
    /// Leftover temporary files deleted (a [`Root::scan`] with cleanup).
    pub removed: u64,
    /// The root directory itself (path empty), stat'ed after its listing
    /// and cleanup; `None` only from a scan that failed.
    pub root: Option<Entry>,
}

/// Scans the tree under `root` (the root itself is [`Scan::root`]), never following
/// symlinks. `exclude(rel_path, is_dir)` returning true leaves a path out
/// (and does not descend into an excluded directory); it is not called for
/// our temporary files, which are always left out silently. See the module
/// documentation for the rest.
pub fn scan(
    root: &Path,
    exclude: &(dyn Fn(&[u8], bool) -> bool + Sync),
    with_hash: bool,
) -> Result<Scan, FsError> {
    let fd = open_root(root)?;
    scan_fd(
        fd.as_fd(),
        exclude,
        with_hash,
        ScanConfig::default_for_host(),
    )
}

struct Job {
    /// The parent directory, if shared; else reopened from the root.
    parent: Option<Arc<OwnedFd>>,
    rel: Vec<u8>,
}

struct Queue {
    jobs: Vec<Job>,
    busy: usize,
    failed: bool,
}

struct Walker<'a> {
    root: BorrowedFd<'a>,
    exclude: &'a (dyn Fn(&[u8], bool) -> bool + Sync),
    /// Hash files up to this size while walking (`None`: no hashing).
    inline_hash: Option<u64>,
    /// Delete the leftover temporary files met on the way.
    cleanup: bool,
    queue: Mutex<Queue>,
    wake: Condvar,
}

/// How a scan uses threads (tunable for the benchmark).
#[derive(Clone, Copy)]
struct ScanConfig {
    walk_threads: usize,
    hash_threads: usize,
    inline_hash_max: u64,
    cleanup: bool,
}

impl ScanConfig {
    fn default_for_host() -> ScanConfig {
        ScanConfig {
            walk_threads: SCAN_THREADS,
            hash_threads: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
                .clamp(1, 8),
            inline_hash_max: INLINE_HASH_MAX,
            cleanup: false,
        }
    }
}

#[derive(Default)]
struct Found {
    entries: Vec<Entry>,
    skipped: Vec<Skipped>,
    removed: u64,
    /// Directories stat'ed again after their listing: the root (always)
    /// and those whose leftovers cleanup removed (unlinking changed their
    /// mtime after the parent's listing recorded it).
    restat: Vec<Entry>,
}

fn scan_fd(
    root: BorrowedFd<'_>,
    exclude: &(dyn Fn(&[u8], bool) -> bool + Sync),
    with_hash: bool,
    config: ScanConfig,
) -> Result<Scan, FsError> {
    let walker = Walker {
        root,
        exclude,
        inline_hash: with_hash.then_some(config.inline_hash_max),
        cleanup: config.cleanup,
        queue: Mutex::new(Queue {
            jobs: vec![Job {
                parent: None,
                rel: Vec::new(),
            }],
            busy: 0,
            failed: false,
        }),
        wake: Condvar::new(),
    };
    let threads = config.walk_threads.max(1);
    let results: Vec<Result<Found, FsError>> = if threads == 1 {
        vec![walker.work()]
    } else {
        std::thread::scope(|s| {
            let helpers: Vec<_> = (1..threads).map(|_| s.spawn(|| walker.work())).collect();
            let mut results = vec![walker.work()];
            for h in helpers {
                match h.join() {
                    Ok(r) => results.push(r),
                    Err(panic) => std::panic::resume_unwind(panic),
                }
            }
            results
        })
    };
    let mut scan = Scan::default();
    let mut restat = Vec::new();
    for r in results {
        let found = r?;
        scan.entries.extend(found.entries);
        scan.skipped.extend(found.skipped);
        scan.removed += found.removed;
        restat.extend(found.restat);
    }
    scan.entries.sort_unstable_by(|a, b| a.path.cmp(&b.path));
    // What a directory holds after the cleanup is what the plan compares,
    // so its mtime is the one after the unlinks (one binary search per
    // cleaned directory; none on a tree without leftovers).
    for d in restat {
        if d.path.is_empty() {
            scan.root = Some(d);
        } else if let Ok(i) = scan.entries.binary_search_by(|e| e.path.cmp(&d.path)) {
            if scan.entries[i].kind == Kind::Dir {
                scan.entries[i].attrs = d.attrs;
            }
        }
    }
    if with_hash {
        hash_files(root, &mut scan, config.hash_threads)?;
    }
    scan.skipped.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(scan)
}

fn entry_from_stat(path: Vec<u8>, kind: Kind, st: &libc::stat) -> Entry {
    Entry {
        path,
        kind,
        size: if kind == Kind::Dir {
            0
        } else {
            st.st_size as u64
        },
        attrs: EntryAttrs {
            mtime_sec: st.st_mtime,
            mtime_nsec: st.st_mtime_nsec as u32,
            mode: st.st_mode & 0o7777,
            uid: st.st_uid,
            gid: st.st_gid,
        },
        target: None,
        hash: None,
    }
}

impl Walker<'_> {
    fn work(&self) -> Result<Found, FsError> {
        let mut found = Found::default();
        let mut list = DirList::default();
        let mut new_jobs = Vec::new();
        let mut buf = Vec::new();
        loop {
            let job = {
                let mut q = lock(&self.queue);
                loop {
                    if q.failed {
                        return Ok(found);
                    }
                    if let Some(job) = q.jobs.pop() {
                        q.busy += 1;
                        break job;
                    }
                    if q.busy == 0 {
                        return Ok(found);
                    }
                    q = self.wake.wait(q).unwrap_or_else(|e| e.into_inner());
                }
            };
            let r = self.scan_dir(job, &mut list, &mut found, &mut new_jobs, &mut buf);
            let mut q = lock(&self.queue);
            q.busy -= 1;
            let wake = !new_jobs.is_empty() || q.busy == 0 || r.is_err();
            q.jobs.append(&mut new_jobs);
            if r.is_err() {
                q.failed = true;
            }
            drop(q);
            if wake {
                self.wake.notify_all();
            }
            r?;
        }
    }

    fn scan_dir(
        &self,
        job: Job,
        list: &mut DirList,
        found: &mut Found,
        new_jobs: &mut Vec<Job>,
        buf: &mut Vec<u8>,
    ) -> Result<(), FsError> {
        let rel = job.rel;
        let vanished = |found: &mut Found, rel: Vec<u8>| {
            found.skipped.push(Skipped {
                path: rel,
                reason: SkipReason::Vanished,
            })
        };
        let opened = if rel.is_empty() {
            sys::openat(self.root, c".", O_DIR_READ & !libc::O_NOFOLLOW, 0)
        } else {
            let (dir, name) = split_last(&rel);
            match &job.parent {
                Some(p) => sys::openat_n(p.as_fd(), name, O_DIR_READ, 0),
                None => match walk(self.root, dir) {
                    Ok(d) => sys::openat_n(d.fd(), name, O_DIR_READ, 0),
                    Err(WalkError::Io(p, e)) if !matches!(errno(&e), libc::ELOOP) => {
                        return Err(io_err("scan", &p, e))
                    }
                    Err(_) => {
                        vanished(found, rel);
                        return Ok(());
                    }
                },
            }
        };
        drop(job.parent);
        let fd = match opened {
            Ok(fd) => Arc::new(fd),
            Err(e) if matches!(errno(&e), libc::ENOENT | libc::ELOOP | libc::ENOTDIR) => {
                vanished(found, rel);
                return Ok(());
            }
            Err(e) => {
                let shown = if rel.is_empty() { b"." as &[u8] } else { &rel };
                return Err(io_err("scan", shown, e));
            }
        };
        match list.read(fd.as_fd()) {
            Ok(()) => {}
            Err(e) if errno(&e) == libc::ENOENT => {
                vanished(found, rel);
                return Ok(());
            }
            Err(e) => {
                let shown = if rel.is_empty() { b"." as &[u8] } else { &rel };
                return Err(io_err("read directory", shown, e));
            }
        }
        let share = rel.iter().filter(|&&b| b == b'/').count() < SHARE_FD_DEPTH;
        let removed_before = found.removed;
        for i in 0..list.len() {
            let (name, _) = list.get(i);
            let path = join(&rel, name);
            let st = match sys::fstatat(fd.as_fd(), list.cstr(i)) {
                Ok(st) => st,
                Err(e) if errno(&e) == libc::ENOENT => {
                    vanished(found, path);
                    continue;
                }
                Err(e) => return Err(io_err("scan", &path, e)),
            };
            let ft = file_type(st.st_mode);
            if is_temp_name(name) {
                if ft != libc::S_IFREG && ft != libc::S_IFLNK {
                    found.skipped.push(Skipped {
                        path,
                        reason: SkipReason::Reserved,
                    });
                } else if self.cleanup {
                    match sys::unlinkat(fd.as_fd(), name, 0) {
                        Ok(()) => found.removed += 1,
                        Err(e) if errno(&e) == libc::ENOENT => {}
                        Err(e) => return Err(io_err("remove leftover", &path, e)),
                    }
                }
                continue;
            }
            if (self.exclude)(&path, ft == libc::S_IFDIR) {
                continue;
            }
            if path.len() > MAX_PATH || name.len() > MAX_NAME {
                found.skipped.push(Skipped {
                    path,
                    reason: SkipReason::TooLong,
                });
                continue;
            }
            match ft {
                libc::S_IFDIR => {
                    found
                        .entries
                        .push(entry_from_stat(path.clone(), Kind::Dir, &st));
                    new_jobs.push(Job {
                        parent: share.then(|| fd.clone()),
                        rel: path,
                    });
                }
                libc::S_IFREG => match self.inline_hash {
                    Some(max) if st.st_size as u64 <= max => {
                        if buf.is_empty() {
                            buf.resize(HASH_BUFFER, 0);
                        }
                        match hash_one(fd.as_fd(), list.cstr(i), &path, buf)? {
                            Hashed::Done(hash, st, len) => {
                                let mut e = entry_from_stat(path, Kind::File, &st);
                                e.size = len;
                                e.hash = Some(hash);
                                found.entries.push(e);
                            }
                            Hashed::Vanished => vanished(found, path),
                        }
                    }
                    _ => found.entries.push(entry_from_stat(path, Kind::File, &st)),
                },
                libc::S_IFLNK => {
                    match sys::readlinkat(fd.as_fd(), list.cstr(i), st.st_size as usize) {
                        Ok(target) => {
                            let mut e = entry_from_stat(path, Kind::Symlink, &st);
                            e.size = target.len() as u64;
                            e.target = Some(target);
                            found.entries.push(e);
                        }
                        Err(e) if matches!(errno(&e), libc::ENOENT | libc::EINVAL) => {
                            vanished(found, path)
                        }
                        Err(e) => return Err(io_err("read symlink", &path, e)),
                    }
                }
                other => found.skipped.push(Skipped {
                    path,
                    reason: match other {
                        libc::S_IFSOCK => SkipReason::Socket,
                        libc::S_IFIFO => SkipReason::Fifo,
                        libc::S_IFCHR => SkipReason::CharDevice,
                        libc::S_IFBLK => SkipReason::BlockDevice,
                        _ => SkipReason::UnknownType,
                    },
                }),
            }
        }
        // The root has no parent listing to record it; a directory whose
        // leftovers were just unlinked has a newer mtime than the one its
        // parent's listing recorded. Either costs one fstat of the
        // descriptor held; an unchanged directory costs nothing more.
        if rel.is_empty() || found.removed != removed_before {
            let st = sys::fstat(fd.as_fd()).map_err(|e| {
                let shown = if rel.is_empty() { b"." as &[u8] } else { &rel };
                io_err("scan", shown, e)
            })?;
            found.restat.push(entry_from_stat(rel, Kind::Dir, &st));
        }
        Ok(())
    }
}

enum Hashed {
    /// The hash, the stat of the descriptor hashed, the bytes hashed.
    Done([u8; 32], Box<libc::stat>, u64),
    Vanished,
}

/// Hashes the files of `scan` the walk left unhashed (the large ones) in
/// parallel, refreshing their metadata from the descriptor hashed; files
/// that vanished move to `skipped`.
fn hash_files(root: BorrowedFd<'_>, scan: &mut Scan, threads: usize) -> Result<(), FsError> {
    let files: Vec<usize> = (0..scan.entries.len())
        .filter(|&i| scan.entries[i].kind == Kind::File && scan.entries[i].hash.is_none())
        .collect();
    if files.is_empty() {
        return Ok(());
    }
    let threads = threads.clamp(1, files.len());
    let next = AtomicUsize::new(0);
    let entries = &scan.entries;
    let work = || -> Result<Vec<(usize, Hashed)>, FsError> {
        let mut buf = vec![0u8; HASH_BUFFER];
        let mut cached: Option<(Vec<u8>, OwnedFd)> = None;
        let mut out = Vec::new();
        loop {
            let k = next.fetch_add(1, Ordering::Relaxed);
            let Some(&i) = files.get(k) else {
                return Ok(out);
            };
            let path = &entries[i].path;
            let (dir, name) = split_last(path);
            let parent: BorrowedFd<'_> = if dir.is_empty() {
                root
            } else {
                if cached.as_ref().map(|(d, _)| d.as_slice()) != Some(dir) {
                    cached = match walk(root, dir) {
                        Ok(d) => Some((
                            dir.to_vec(),
                            d.into_owned().map_err(|e| io_err("hash", path, e))?,
                        )),
                        Err(WalkError::Io(p, e)) if errno(&e) != libc::ELOOP => {
                            return Err(io_err("hash", &p, e))
                        }
                        Err(_) => {
                            out.push((i, Hashed::Vanished));
                            continue;
                        }
                    };
                }
                cached.as_ref().expect("just set").1.as_fd()
            };
            let name = sys::CName::new(name).map_err(|e| io_err("hash", path, e))?;
            out.push((i, hash_one(parent, name.as_cstr(), path, &mut buf)?));
        }
    };
    let results: Vec<Result<Vec<(usize, Hashed)>, FsError>> = std::thread::scope(|s| {
        let helpers: Vec<_> = (1..threads).map(|_| s.spawn(work)).collect();
        let mut results = vec![work()];
        for h in helpers {
            match h.join() {
                Ok(r) => results.push(r),
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        results
    });
    let mut gone = vec![false; scan.entries.len()];
    let mut any_gone = false;
    for r in results {
        for (i, h) in r? {
            match h {
                Hashed::Done(hash, st, len) => {
                    let e = &mut scan.entries[i];
                    let fresh = entry_from_stat(Vec::new(), Kind::File, &st);
                    e.size = len;
                    e.attrs = fresh.attrs;
                    e.hash = Some(hash);
                }
                Hashed::Vanished => {
                    gone[i] = true;
                    any_gone = true;
                }
            }
        }
    }
    if any_gone {
        let mut i = 0;
        scan.entries.retain(|e| {
            let keep = !gone[i];
            i += 1;
            if !keep {
                scan.skipped.push(Skipped {
                    path: e.path.clone(),
                    reason: SkipReason::Vanished,
                });
            }
            keep
        });
    }
    Ok(())
}

/// Hashes the regular file `name` in `parent`: exactly the `st_size`
/// bytes its descriptor had when opened (fewer if it shrinks meanwhile; the
/// count is returned), so size and hash in the manifest always agree.
fn hash_one(
    parent: BorrowedFd<'_>,
    name: &CStr,
    path: &[u8],
    buf: &mut [u8],
) -> Result<Hashed, FsError> {
    let fd = match sys::openat(parent, name, O_FILE_READ | libc::O_NOATIME, 0) {
        // O_NOATIME is only for the owner or root.
        Err(e) if errno(&e) == libc::EPERM => sys::openat(parent, name, O_FILE_READ, 0),
        r => r,
    };
    let fd = match fd {
        Ok(fd) => fd,
        Err(e) if matches!(errno(&e), libc::ENOENT | libc::ELOOP) => return Ok(Hashed::Vanished),
        Err(e) => return Err(io_err("hash", path, e)),
    };
    let st = sys::fstat(fd.as_fd()).map_err(|e| io_err("hash", path, e))?;
    if file_type(st.st_mode) != libc::S_IFREG {
        return Ok(Hashed::Vanished);
    }
    let size = st.st_size as u64;
    let mut file = File::from(fd);
    let mut hasher = blake3::Hasher::new();
    let mut done = 0u64;
    while done < size {
        let want = (size - done).min(buf.len() as u64) as usize;
        match file.read(&mut buf[..want]) {
            Ok(0) => break,
            Ok(n) => {
                hasher.update(&buf[..n]);
                done += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_err("hash", path, e)),
        }
    }
    Ok(Hashed::Done(
        *hasher.finalize().as_bytes(),
        Box::new(st),
        done,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use std::time::{Duration, Instant};

    struct Fixture {
        _tmp: tempfile::TempDir,
        root_path: PathBuf,
        outside: PathBuf,
        root: Root,
    }

    fn fixture() -> Fixture {
        let tmp = tempfile::tempdir().unwrap();
        let root_path = tmp.path().join("root");
        let outside = tmp.path().join("outside");
        fs::create_dir(&root_path).unwrap();
        fs::create_dir(&outside).unwrap();
        let root = Root::open(&root_path).unwrap();
        Fixture {
            _tmp: tmp,
            root_path,
            outside,
            root,
        }
    }

    fn is_root() -> bool {
        // SAFETY: geteuid cannot fail.
        unsafe { libc::geteuid() == 0 }
    }

    fn listing(dir: &Path) -> Vec<Vec<u8>> {
        let mut v: Vec<Vec<u8>> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().as_bytes().to_vec())
            .collect();
        v.sort();
        v
    }

    fn write_file(root: &Root, rel: &[u8], content: &[u8], attrs: &Attrs) {
        let mut t = root.begin_file(rel).unwrap();
        t.write_all(content).unwrap();
        t.commit(attrs).unwrap();
    }

    fn attrs(mode: u32) -> Attrs {
        Attrs {
            mode,
            mtime_sec: 1_600_000_000,
            mtime_nsec: 123_456_789,
            owner: None,
        }
    }

    fn p(root: &Path, rel: &str) -> PathBuf {
        root.join(rel)
    }

    #[test]
    fn types_are_thread_safe() {
        fn send_sync<T: Send + Sync>() {}
        fn send<T: Send>() {}
        send_sync::<Root>();
        send_sync::<FsError>();
        send::<TempFile>();
    }

    #[test]
    fn validation() {
        let ok: &[&[u8]] = &[
            b"a",
            b"a/b/c",
            b".a",
            b"..a",
            b"a..",
            b"...",
            b"a b/c\td",
            b"\xff\xfe/caf\xc3\xa9",
            b".x.hasync-0123456789abcdeZ.tmp",
            b".x.hasync-0123.tmp",
        ];
        for rel in ok {
            assert_eq!(validate(rel), Ok(()), "{:?}", PathBytes(rel.to_vec()));
        }
        let long_name = vec![b'n'; 255];
        assert_eq!(validate(&long_name), Ok(()));
        let mut long_path = Vec::new();
        while long_path.len() + 101 <= MAX_PATH {
            long_path.extend_from_slice(&[b'd'; 100]);
            long_path.push(b'/');
        }
        long_path.resize(MAX_PATH, b'f');
        assert_eq!(validate(&long_path), Ok(()));

        let bad: &[(&[u8], PathProblem)] = &[
            (b"", PathProblem::Empty),
            (b"../x", PathProblem::DotDot),
            (b"..", PathProblem::DotDot),
            (b"/etc/passwd", PathProblem::Absolute),
            (b"/", PathProblem::Absolute),
            (b"a/../../x", PathProblem::DotDot),
            (b"a/..", PathProblem::DotDot),
            (b"a//b", PathProblem::EmptyComponent),
            (b"a/", PathProblem::EmptyComponent),
            (b".", PathProblem::Dot),
            (b"a/./b", PathProblem::Dot),
            (b"a\0b", PathProblem::Nul),
            (b"d/.f.hasync-0123456789abcdef.tmp", PathProblem::Reserved),
            (b".f.hasync-0123456789abcdef.tmp/x", PathProblem::Reserved),
        ];
        for (rel, problem) in bad {
            let e = validate(rel).unwrap_err();
            assert_eq!(e.problem, *problem, "{:?}", PathBytes(rel.to_vec()));
        }
        let mut too_long = long_path.clone();
        too_long.push(b'x');
        assert_eq!(
            validate(&too_long).unwrap_err().problem,
            PathProblem::TooLong
        );
        let mut name_256 = b"a/".to_vec();
        name_256.extend_from_slice(&[b'n'; 256]);
        assert_eq!(
            validate(&name_256).unwrap_err().problem,
            PathProblem::NameTooLong
        );

        let e = validate(b"a/../../x").unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid path `a/../../x`: `..` components are not allowed"
        );
        let e = validate(b"\xffx\n/..").unwrap_err();
        assert!(
            e.to_string().starts_with("invalid path `\\xffx\\n/..`"),
            "{e}"
        );
        // Overlong paths are shortened in messages.
        let e = validate(&vec![b'z'; 100_000]).unwrap_err();
        assert!(e.to_string().len() < 400, "{e}");
    }

    #[test]
    fn every_operation_refuses_bad_paths() {
        let f = fixture();
        fs::write(f.outside.join("victim"), b"keep").unwrap();
        let r = &f.root;
        let bad: &[&[u8]] = &[
            b"../outside/victim",
            b"/etc/passwd",
            b"a/../../outside/victim",
            b"a//b",
            b".",
            b"",
            b"a\0b",
        ];
        for rel in bad {
            let errs = [
                r.begin_file(rel).map(drop).unwrap_err(),
                r.mkdir(rel, 0o755).unwrap_err(),
                r.symlink(rel, b"x").unwrap_err(),
                r.symlink(rel, b"").unwrap_err(),
                r.remove(rel).unwrap_err(),
                r.set_attrs(rel, &attrs(0o777)).unwrap_err(),
                r.open_read(rel).unwrap_err(),
            ];
            for e in errs {
                assert!(e.is_path_error() && e.is_refusal(), "{e}");
            }
        }
        assert_eq!(fs::read(f.outside.join("victim")).unwrap(), b"keep");
        assert!(listing(&f.root_path).is_empty());
    }

    #[test]
    fn symlinked_directory_is_never_written_through() {
        let f = fixture();
        fs::write(f.outside.join("victim"), b"keep").unwrap();
        fs::create_dir(f.outside.join("sub")).unwrap();
        fs::create_dir(p(&f.root_path, "a")).unwrap();
        std::os::unix::fs::symlink(&f.outside, p(&f.root_path, "a/link")).unwrap();
        std::os::unix::fs::symlink(&f.outside, p(&f.root_path, "top")).unwrap();
        let r = &f.root;

        let e = r.begin_file(b"a/link/new").unwrap_err();
        assert_eq!(e.to_string(), "refusing to write through symlink `a/link`");
        assert!(e.is_refusal() && !e.is_path_error());
        let e = r.begin_file(b"top/sub/new").unwrap_err();
        assert_eq!(e.to_string(), "refusing to write through symlink `top`");
        assert!(matches!(
            r.mkdir(b"a/link/d", 0o755),
            Err(FsError::SymlinkInPath { .. })
        ));
        assert!(matches!(
            r.symlink(b"a/link/s", b"x"),
            Err(FsError::SymlinkInPath { .. })
        ));
        assert!(matches!(
            r.remove(b"a/link/victim"),
            Err(FsError::SymlinkInPath { .. })
        ));
        assert!(matches!(
            r.remove(b"a/link/sub"),
            Err(FsError::SymlinkInPath { .. })
        ));
        assert!(matches!(
            r.set_attrs(b"a/link/victim", &attrs(0o777)),
            Err(FsError::SymlinkInPath { .. })
        ));
        let e = r.open_read(b"a/link/victim").unwrap_err();
        assert_eq!(e.to_string(), "refusing to read through symlink `a/link`");

        assert_eq!(
            listing(&f.outside),
            vec![b"sub".to_vec(), b"victim".to_vec()]
        );
        assert!(listing(&f.outside.join("sub")).is_empty());
        assert_eq!(fs::read(f.outside.join("victim")).unwrap(), b"keep");
        let m = fs::metadata(f.outside.join("victim")).unwrap();
        assert_ne!(m.mode() & 0o777, 0o777);
    }

    #[test]
    fn final_symlink_is_replaced_not_followed() {
        let f = fixture();
        let secret = f.outside.join("secret");
        fs::write(&secret, b"outside").unwrap();
        fs::set_permissions(&secret, fs::Permissions::from_mode(0o600)).unwrap();
        std::os::unix::fs::symlink(&secret, p(&f.root_path, "t")).unwrap();
        let r = &f.root;

        // Reading through it is refused.
        let e = r.open_read(b"t").unwrap_err();
        assert_eq!(e.to_string(), "cannot open `t`: it is a symbolic link");

        // set_attrs changes the link itself.
        r.set_attrs(b"t", &attrs(0o777)).unwrap();
        let lm = fs::symlink_metadata(p(&f.root_path, "t")).unwrap();
        assert_eq!((lm.mtime(), lm.mtime_nsec()), (1_600_000_000, 123_456_789));
        let sm = fs::metadata(&secret).unwrap();
        assert_eq!(sm.mode() & 0o777, 0o600);
        assert_ne!(sm.mtime(), 1_600_000_000);

        // A file written to that name replaces the link.
        write_file(r, b"t", b"inside", &attrs(0o644));
        let m = fs::symlink_metadata(p(&f.root_path, "t")).unwrap();
        assert!(m.file_type().is_file());
        assert_eq!(fs::read(p(&f.root_path, "t")).unwrap(), b"inside");
        assert_eq!(fs::read(&secret).unwrap(), b"outside");
        assert_eq!(fs::metadata(&secret).unwrap().mode() & 0o777, 0o600);
    }

    #[test]
    fn commit_is_atomic_and_sets_attributes() {
        let f = fixture();
        let r = &f.root;
        fs::create_dir(p(&f.root_path, "d")).unwrap();
        fs::write(p(&f.root_path, "d/f.txt"), b"old").unwrap();

        let mut t = r.begin_file(b"d/f.txt").unwrap();
        assert_eq!(t.path(), b"d/f.txt");
        let temp = t.temp_path().to_vec();
        assert!(temp.starts_with(b"d/.f.txt.hasync-") && temp.ends_with(b".tmp"));
        assert!(is_temp_name(split_last(&temp).1));
        let content: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
        t.write_all(&content).unwrap();
        t.write_all(b"tail").unwrap();
        // Until commit the real name keeps its old content.
        assert_eq!(fs::read(p(&f.root_path, "d/f.txt")).unwrap(), b"old");
        let temp_meta = fs::metadata(f.root_path.join(std::ffi::OsStr::from_bytes(&temp))).unwrap();
        assert_eq!(temp_meta.mode() & 0o7777, 0o600);
        let mut all = content.clone();
        all.extend_from_slice(b"tail");
        assert_eq!(t.bytes_written(), all.len() as u64);
        assert_eq!(t.hash(), *blake3::hash(&all).as_bytes());

        let owner = if is_root() { Some((1234, 5678)) } else { None };
        t.commit(&Attrs {
            mode: 0o100640,
            mtime_sec: 1_234_567_890,
            mtime_nsec: 987_654_321,
            owner,
        })
        .unwrap();
        let path = p(&f.root_path, "d/f.txt");
        assert_eq!(fs::read(&path).unwrap(), all);
        let m = fs::metadata(&path).unwrap();
        assert_eq!(m.mode() & 0o7777, 0o640);
        assert_eq!((m.mtime(), m.mtime_nsec()), (1_234_567_890, 987_654_321));
        if is_root() {
            assert_eq!((m.uid(), m.gid()), (1234, 5678));
        }
        assert_eq!(listing(&p(&f.root_path, "d")), vec![b"f.txt".to_vec()]);
        r.sync_dirs().unwrap();
        assert!(lock(&r.dirty).is_empty());
    }

    fn staged(root: &Root, rel: &[u8], content: &[u8], keep_open: bool) -> Staged {
        let mut t = root.begin_file(rel).unwrap();
        t.write_all(content).unwrap();
        t.stage(&attrs(0o644), keep_open).unwrap()
    }

    fn temps_under(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for e in fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                out.extend(temps_under(&e.path()));
            } else if is_temp_name(e.file_name().as_bytes()) {
                out.push(e.path());
            }
        }
        out
    }

    #[test]
    fn staged_files_appear_only_when_the_batch_commits() {
        for durability in [Durability::Syncfs, Durability::FsyncEach] {
            let mut f = fixture();
            f.root.set_durability(durability);
            let r = &f.root;
            fs::create_dir(p(&f.root_path, "d")).unwrap();
            fs::write(p(&f.root_path, "d/old"), b"old").unwrap();
            let keep = durability == Durability::FsyncEach;
            let batch = vec![
                staged(r, b"d/old", b"new content", keep),
                staged(r, b"d/fresh", b"fresh", keep),
                staged(r, b"top", b"top", keep),
            ];
            // Staged: complete under temporary names, the real ones untouched.
            assert_eq!(fs::read(p(&f.root_path, "d/old")).unwrap(), b"old");
            assert!(!p(&f.root_path, "d/fresh").exists());
            assert!(!p(&f.root_path, "top").exists());
            assert_eq!(temps_under(&f.root_path).len(), 3);
            let results = r.commit_batch(batch);
            assert!(
                results.iter().all(Result::is_ok),
                "{durability:?}: {results:?}"
            );
            assert_eq!(fs::read(p(&f.root_path, "d/old")).unwrap(), b"new content");
            assert_eq!(fs::read(p(&f.root_path, "d/fresh")).unwrap(), b"fresh");
            assert_eq!(fs::read(p(&f.root_path, "top")).unwrap(), b"top");
            let m = fs::metadata(p(&f.root_path, "top")).unwrap();
            assert_eq!(m.mode() & 0o7777, 0o644);
            assert_eq!(m.mtime(), 1_600_000_000);
            assert!(temps_under(&f.root_path).is_empty());
            // The batch made its renames durable too.
            assert!(lock(&r.dirty).is_empty(), "{durability:?}");
        }
    }

    #[test]
    fn a_file_that_could_not_be_made_durable_is_never_renamed() {
        let mut f = fixture();
        f.root.set_durability(Durability::FsyncEach);
        let r = &f.root;
        fs::write(p(&f.root_path, "a"), b"old a").unwrap();
        // Staged without its descriptor, so its fsync cannot happen.
        let batch = vec![
            staged(r, b"a", b"new a", false),
            staged(r, b"b", b"new b", true),
        ];
        let results = r.commit_batch(batch);
        let e = results[0].as_ref().unwrap_err();
        assert!(e.to_string().contains("sync"), "{e}");
        assert!(results[1].is_ok());
        assert_eq!(fs::read(p(&f.root_path, "a")).unwrap(), b"old a");
        assert_eq!(fs::read(p(&f.root_path, "b")).unwrap(), b"new b");
        assert!(temps_under(&f.root_path).is_empty());
    }

    #[test]
    fn a_dropped_batch_leaves_nothing() {
        let f = fixture();
        fs::write(p(&f.root_path, "a"), b"old a").unwrap();
        let batch = vec![
            staged(&f.root, b"a", b"new a", false),
            staged(&f.root, b"b", b"new b", true),
        ];
        assert_eq!(temps_under(&f.root_path).len(), 2);
        drop(batch);
        assert!(temps_under(&f.root_path).is_empty());
        assert_eq!(fs::read(p(&f.root_path, "a")).unwrap(), b"old a");
        assert!(!p(&f.root_path, "b").exists());
    }

    #[test]
    fn durability_is_chosen_for_this_kernel_and_file_system() {
        let f = fixture();
        let local =
            sys::fstatfs_type(f.root.fd.as_fd()).is_ok_and(|t| SYNCFS_FILESYSTEMS.contains(&t));
        let new_kernel = sys::kernel_release().unwrap() >= (5, 8);
        let expect = if local && new_kernel {
            Durability::Syncfs
        } else {
            Durability::FsyncEach
        };
        assert_eq!(f.root.durability(), expect);
    }

    #[test]
    fn setid_bits_are_dropped_unless_preserved() {
        let mut f = fixture();
        let mut a = attrs(0o6755);
        if is_root() {
            a.owner = Some((0, 0));
        }
        write_file(&f.root, b"suid", b"#!/bin/sh\n", &a);
        let m = fs::metadata(p(&f.root_path, "suid")).unwrap();
        assert_eq!(m.mode() & 0o7777, 0o755);
        f.root.mkdir(b"dir", 0o3775).unwrap();
        let m = fs::metadata(p(&f.root_path, "dir")).unwrap();
        assert_eq!(m.mode() & 0o7777, 0o3775);

        f.root.set_preserve_setid(true);
        write_file(&f.root, b"suid2", b"#!/bin/sh\n", &a);
        let m = fs::metadata(p(&f.root_path, "suid2")).unwrap();
        assert_eq!(m.mode() & 0o7777, 0o6755);
    }

    #[test]
    fn long_names_get_shortened_temp_names() {
        let f = fixture();
        let name = vec![b'x'; 255];
        let t = f.root.begin_file(&name).unwrap();
        assert_eq!(t.temp_path().len(), 255);
        t.commit(&attrs(0o644)).unwrap();
        assert_eq!(listing(&f.root_path), vec![name]);
    }

    #[test]
    fn dropped_or_failed_temp_files_are_removed() {
        let f = fixture();
        let r = &f.root;
        let mut t = r.begin_file(b"f").unwrap();
        t.write_all(b"partial").unwrap();
        let temp = t.temp_path().to_vec();
        assert_eq!(listing(&f.root_path), vec![temp]);
        drop(t);
        assert!(listing(&f.root_path).is_empty());

        // Over a non-empty directory: a clear error, and no leftover.
        fs::create_dir_all(p(&f.root_path, "full/x")).unwrap();
        let mut t = r.begin_file(b"full").unwrap();
        t.write_all(b"data").unwrap();
        let e = t.commit(&attrs(0o644)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "cannot replace `full`: it is a directory that is not empty (delete it first)"
        );
        assert_eq!(listing(&f.root_path), vec![b"full".to_vec()]);

        // Over an empty directory: replaced.
        fs::create_dir(p(&f.root_path, "empty")).unwrap();
        write_file(r, b"empty", b"now a file", &attrs(0o644));
        assert_eq!(fs::read(p(&f.root_path, "empty")).unwrap(), b"now a file");

        // Bad times are refused before anything happens.
        let t = r.begin_file(b"g").unwrap();
        let mut a = attrs(0o644);
        a.mtime_nsec = 1_000_000_000;
        assert!(matches!(t.commit(&a), Err(FsError::Invalid { .. })));
        assert!(!p(&f.root_path, "g").exists());
        assert_eq!(listing(&f.root_path).len(), 2);

        // Missing parent directory.
        let e = r.begin_file(b"nope/deeper/x").unwrap_err();
        assert_eq!(
            e.to_string(),
            "cannot create `nope/deeper/x`: directory `nope` does not exist"
        );
        fs::write(p(&f.root_path, "plain"), b"").unwrap();
        let e = r.begin_file(b"plain/x").unwrap_err();
        assert_eq!(
            e.to_string(),
            "cannot create `plain/x`: `plain` is not a directory"
        );
    }

    #[test]
    fn leftovers_are_cleaned_and_never_scanned() {
        let f = fixture();
        let r = &f.root;
        r.mkdir(b"a", 0o755).unwrap();
        r.mkdir(b"a/b", 0o755).unwrap();
        write_file(r, b"a/b/real", b"x", &attrs(0o644));
        let leave_leftovers = || {
            fs::write(p(&f.root_path, ".x.hasync-0123456789abcdef.tmp"), b"").unwrap();
            std::os::unix::fs::symlink("t", p(&f.root_path, "a/.l.hasync-fedcba9876543210.tmp"))
                .unwrap();
            // A forgotten temp file, as after a crash (leaks an fd, fine here).
            let mut t = r.begin_file(b"a/b/crashed").unwrap();
            t.write_all(b"half").unwrap();
            t.flush().unwrap();
            std::mem::forget(t);
        };
        leave_leftovers();
        // Look-alikes that are not ours stay.
        fs::write(p(&f.root_path, ".x.hasync-0123.tmp"), b"").unwrap();
        fs::write(p(&f.root_path, ".x.hasync-0123456789ABCDEF.tmp"), b"").unwrap();
        // A directory named like a temp file is reported, not removed.
        fs::create_dir(p(&f.root_path, ".d.hasync-0123456789abcdef.tmp")).unwrap();

        let s = r.scan(&|_, _| false, false, false).unwrap();
        let paths: Vec<&[u8]> = s.entries.iter().map(|e| e.path.as_slice()).collect();
        assert_eq!(
            paths,
            vec![
                &b".x.hasync-0123.tmp"[..],
                b".x.hasync-0123456789ABCDEF.tmp",
                b"a",
                b"a/b",
                b"a/b/real",
            ]
        );
        assert_eq!(
            s.skipped,
            vec![Skipped {
                path: b".d.hasync-0123456789abcdef.tmp".to_vec(),
                reason: SkipReason::Reserved
            }]
        );

        // A scan with cleanup lists what the plain scan listed and deletes
        // the leftovers on the way.
        let c = r.scan(&|_, _| false, false, true).unwrap();
        // (The directories' mtimes moved with the leftovers' removal.)
        let kinds = |s: &Scan| -> Vec<(Vec<u8>, Kind)> {
            s.entries.iter().map(|e| (e.path.clone(), e.kind)).collect()
        };
        assert_eq!(kinds(&c), kinds(&s));
        assert_eq!(c.skipped, s.skipped);
        assert_eq!(c.removed, 3);
        assert_eq!(s.removed, 0);
        let cleaned = || {
            assert_eq!(listing(&p(&f.root_path, "a/b")), vec![b"real".to_vec()]);
            assert_eq!(listing(&p(&f.root_path, "a")), vec![b"b".to_vec()]);
            assert_eq!(listing(&f.root_path).len(), 4);
        };
        cleaned();
        assert_eq!(r.scan(&|_, _| false, false, true).unwrap().removed, 0);

        // The same leftovers again: removed again.
        leave_leftovers();
        assert_eq!(r.scan(&|_, _| false, false, true).unwrap().removed, 3);
        cleaned();
    }

    /// A directory's mtime as the scan reports it is the one after the
    /// cleanup unlinked its leftovers (the plan compares that, and sets the
    /// time back when it differs); the root is reported too, also after
    /// its cleanup, and [`Root::set_root_attrs`] sets it.
    #[test]
    fn cleaned_directories_and_the_root_are_reported_as_left() {
        use std::os::unix::fs::MetadataExt;
        let f = fixture();
        let r = &f.root;
        for d in ["a", "a/b", "c"] {
            r.mkdir(d.as_bytes(), 0o755).unwrap();
        }
        write_file(r, b"a/b/real", b"x", &attrs(0o644));
        for leftover in [
            ".x.hasync-0123456789abcdef.tmp",
            "a/b/.real.hasync-0123456789abcdef.tmp",
            "c/.y.hasync-0123456789abcdef.tmp",
        ] {
            fs::write(p(&f.root_path, leftover), b"half").unwrap();
        }
        // Every directory's time is right before the scan, as after an
        // interrupted run whose directory times were already set.
        r.set_root_attrs(&attrs(0o755)).unwrap();
        for d in ["a", "a/b", "c"] {
            r.set_attrs(d.as_bytes(), &attrs(0o755)).unwrap();
        }
        let mtime = |rel: &str| {
            let m = fs::metadata(p(&f.root_path, rel)).unwrap();
            (m.mtime(), m.mtime_nsec() as u32)
        };
        let set = (1_600_000_000, 123_456_789);
        assert_eq!(mtime(""), set, "set_root_attrs sets the root");
        let plain = r.scan(&|_, _| false, false, false).unwrap();
        let root = plain.root.as_ref().expect("the root is reported");
        assert_eq!((root.path.as_slice(), root.kind), (&b""[..], Kind::Dir));
        assert_eq!((root.attrs.mtime_sec, root.attrs.mtime_nsec), set);
        let c = r.scan(&|_, _| false, false, true).unwrap();
        assert_eq!(c.removed, 3);
        let reported = |rel: &str| {
            let e = if rel.is_empty() {
                c.root.as_ref().unwrap()
            } else {
                c.entries.iter().find(|e| e.path == rel.as_bytes()).unwrap()
            };
            (e.attrs.mtime_sec, e.attrs.mtime_nsec)
        };
        for d in ["", "a/b", "c"] {
            assert_ne!(mtime(d), set, "{d:?}: the unlink did not move its mtime");
            assert_eq!(reported(d), mtime(d), "{d:?}: reported before its cleanup");
        }
        // Nothing was removed from `a`: its time is right and reported so.
        assert_eq!(reported("a"), set);
        assert_eq!(mtime("a"), set);
    }

    #[test]
    fn mkdir_cases() {
        let f = fixture();
        let r = &f.root;
        // SAFETY: umask cannot fail; it is restored below.
        let old = unsafe { libc::umask(0o077) };
        let res = r.mkdir(b"d", 0o755);
        // SAFETY: as above.
        unsafe { libc::umask(old) };
        res.unwrap();
        assert_eq!(
            fs::metadata(p(&f.root_path, "d")).unwrap().mode() & 0o7777,
            0o755
        );
        fs::set_permissions(p(&f.root_path, "d"), fs::Permissions::from_mode(0o700)).unwrap();
        r.mkdir(b"d", 0o755).unwrap();
        assert_eq!(
            fs::metadata(p(&f.root_path, "d")).unwrap().mode() & 0o7777,
            0o700,
            "an existing directory is left alone"
        );
        r.mkdir(b"d/e", 0o750).unwrap();
        fs::write(p(&f.root_path, "file"), b"").unwrap();
        let e = r.mkdir(b"file", 0o755).unwrap_err();
        assert_eq!(
            e.to_string(),
            "cannot create directory `file`: it is a regular file"
        );
        std::os::unix::fs::symlink(&f.outside, p(&f.root_path, "ln")).unwrap();
        let e = r.mkdir(b"ln", 0o755).unwrap_err();
        assert_eq!(
            e.to_string(),
            "cannot create directory `ln`: it is a symbolic link"
        );
        assert!(matches!(
            r.mkdir(b"x/y", 0o755),
            Err(FsError::MissingDir { .. })
        ));
    }

    #[test]
    fn symlinks_are_data() {
        let f = fixture();
        let r = &f.root;
        let target: &[u8] = b"../../../etc/\xffpasswd";
        r.symlink(b"l", target).unwrap();
        let got = fs::read_link(p(&f.root_path, "l")).unwrap();
        assert_eq!(got.as_os_str().as_bytes(), target);
        // Replaces a symlink and a file atomically.
        r.symlink(b"l", b"/abs/other").unwrap();
        assert_eq!(
            fs::read_link(p(&f.root_path, "l")).unwrap(),
            Path::new("/abs/other")
        );
        fs::write(p(&f.root_path, "f"), b"x").unwrap();
        r.symlink(b"f", b"f-target").unwrap();
        assert!(fs::symlink_metadata(p(&f.root_path, "f"))
            .unwrap()
            .file_type()
            .is_symlink());
        // Replacing a symlink that points at a directory outside replaces
        // the link, not anything behind it.
        std::os::unix::fs::symlink(&f.outside, p(&f.root_path, "o")).unwrap();
        r.symlink(b"o", b"elsewhere").unwrap();
        assert!(listing(&f.outside).is_empty());
        // Impossible targets.
        assert!(matches!(r.symlink(b"z", b""), Err(FsError::Invalid { .. })));
        assert!(matches!(
            r.symlink(b"z", b"a\0b"),
            Err(FsError::Invalid { .. })
        ));
        assert!(matches!(
            r.symlink(b"z", &[b'a'; 4096]),
            Err(FsError::Invalid { .. })
        ));
        r.symlink(b"z", &[b'a'; 4095]).unwrap();
        fs::create_dir_all(p(&f.root_path, "full/x")).unwrap();
        assert!(matches!(
            r.symlink(b"full", b"t"),
            Err(FsError::DirectoryInTheWay { .. })
        ));
        assert_eq!(
            listing(&f.root_path),
            vec![
                b"f".to_vec(),
                b"full".to_vec(),
                b"l".to_vec(),
                b"o".to_vec(),
                b"z".to_vec()
            ]
        );
        // Owner and mtime of the link itself.
        let mut a = attrs(0);
        if is_root() {
            a.owner = Some((4321, 8765));
        }
        r.set_attrs(b"l", &a).unwrap();
        let m = fs::symlink_metadata(p(&f.root_path, "l")).unwrap();
        assert_eq!((m.mtime(), m.mtime_nsec()), (1_600_000_000, 123_456_789));
        if is_root() {
            assert_eq!((m.uid(), m.gid()), (4321, 8765));
        }
    }

    #[test]
    fn remove_never_follows_symlinks() {
        let f = fixture();
        let r = &f.root;
        fs::write(f.outside.join("victim"), b"keep").unwrap();
        fs::create_dir(f.outside.join("sub")).unwrap();
        fs::write(f.outside.join("sub/inner"), b"keep").unwrap();
        let tree = p(&f.root_path, "tree");
        fs::create_dir_all(tree.join("a/b/c")).unwrap();
        fs::write(tree.join("a/b/c/f"), b"x").unwrap();
        fs::write(tree.join("top"), b"x").unwrap();
        std::os::unix::fs::symlink(&f.outside, tree.join("a/out")).unwrap();
        std::os::unix::fs::symlink(f.outside.join("victim"), tree.join("a/b/v")).unwrap();
        std::os::unix::fs::symlink(f.outside.join("sub"), tree.join("sub")).unwrap();
        std::os::unix::net::UnixListener::bind(tree.join("sock")).unwrap();

        r.remove(b"tree").unwrap();
        assert!(!tree.exists());
        assert_eq!(
            listing(&f.outside),
            vec![b"sub".to_vec(), b"victim".to_vec()]
        );
        assert_eq!(fs::read(f.outside.join("victim")).unwrap(), b"keep");
        assert_eq!(fs::read(f.outside.join("sub/inner")).unwrap(), b"keep");

        // Files and symlinks.
        fs::write(p(&f.root_path, "f"), b"x").unwrap();
        std::os::unix::fs::symlink(&f.outside, p(&f.root_path, "l")).unwrap();
        r.remove(b"f").unwrap();
        r.remove(b"l").unwrap();
        assert!(f.outside.exists());
        assert!(listing(&f.root_path).is_empty());
        // Missing things.
        r.remove(b"f").unwrap();
        r.remove(b"no/such/thing").unwrap();
        r.remove_if_empty(b"f").unwrap();
        r.remove_if_empty(b"f/x").unwrap();
        assert!(listing(&f.root_path).is_empty());
    }

    #[test]
    fn remove_if_empty_cases() {
        let f = fixture();
        let r = &f.root;
        fs::create_dir_all(p(&f.root_path, "full/sub")).unwrap();
        fs::write(p(&f.root_path, "file"), b"x").unwrap();
        std::os::unix::fs::symlink(&f.outside, p(&f.root_path, "ln")).unwrap();
        let e = r.remove_if_empty(b"full").unwrap_err();
        assert_eq!(e.io_error().unwrap().raw_os_error(), Some(libc::ENOTEMPTY));
        assert!(
            e.to_string()
                .starts_with("cannot remove `full`: Directory not empty"),
            "{e}"
        );
        r.remove_if_empty(b"full/sub").unwrap();
        r.remove_if_empty(b"full").unwrap();
        r.remove_if_empty(b"file").unwrap();
        r.remove_if_empty(b"ln").unwrap();
        assert!(f.outside.exists());
        assert!(listing(&f.root_path).is_empty());
        std::os::unix::fs::symlink(&f.outside, p(&f.root_path, "ln")).unwrap();
        fs::create_dir(f.outside.join("x")).unwrap();
        assert!(matches!(
            r.remove_if_empty(b"ln/x"),
            Err(FsError::SymlinkInPath { .. })
        ));
        assert!(f.outside.join("x").exists());
        let e = FsError::io("sign", b"a/b", io::Error::from_raw_os_error(libc::EIO));
        assert!(e.to_string().starts_with("cannot sign `a/b`: "), "{e}");
    }

    #[test]
    fn set_attrs_on_directories_and_files() {
        let f = fixture();
        let r = &f.root;
        r.mkdir(b"d", 0o700).unwrap();
        write_file(r, b"d/f", b"x", &attrs(0o600));
        let mut a = Attrs {
            mode: 0o40751,
            mtime_sec: -1,
            mtime_nsec: 5,
            owner: None,
        };
        if is_root() {
            a.owner = Some((1, 2));
        }
        r.set_attrs(b"d", &a).unwrap();
        let m = fs::metadata(p(&f.root_path, "d")).unwrap();
        assert_eq!(m.mode() & 0o7777, 0o751);
        assert_eq!((m.mtime(), m.mtime_nsec()), (-1, 5));
        if is_root() {
            assert_eq!((m.uid(), m.gid()), (1, 2));
        }
        r.set_attrs(b"d/f", &attrs(0o444)).unwrap();
        let m = fs::metadata(p(&f.root_path, "d/f")).unwrap();
        assert_eq!(m.mode() & 0o7777, 0o444);
        assert_eq!((m.mtime(), m.mtime_nsec()), (1_600_000_000, 123_456_789));
        assert!(matches!(
            r.set_attrs(b"d/missing", &attrs(0o644)),
            Err(FsError::Io { .. })
        ));
        // A fifo is refused without blocking.
        let fifo = sys::CName::new(p(&f.root_path, "fifo").as_os_str().as_bytes()).unwrap();
        // SAFETY: NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
        let e = r.set_attrs(b"fifo", &attrs(0o600)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "cannot set attributes of `fifo`: it is a fifo"
        );
        let e = r.open_read(b"fifo").unwrap_err();
        assert_eq!(e.to_string(), "cannot open `fifo`: it is a fifo");
        let e = r.open_base(b"d").unwrap_err();
        assert_eq!(e.to_string(), "cannot open `d`: it is a directory");
        let mut s = String::new();
        r.open_base(b"d/f").unwrap().read_to_string(&mut s).unwrap();
        assert_eq!(s, "x");
    }

    #[test]
    fn scan_order_kinds_excludes_and_hashes() {
        let f = fixture();
        let root = &f.root_path;
        for d in ["a", "a/b", "a-b", "skip", "skip/deep", "B", "kept"] {
            fs::create_dir(root.join(d)).unwrap();
        }
        fs::write(root.join("a.txt"), b"hello").unwrap();
        fs::write(root.join("a/b/c"), b"").unwrap();
        fs::write(root.join("a/z"), vec![7u8; 3 << 20]).unwrap();
        fs::write(root.join("skip/deep/f"), b"x").unwrap();
        fs::write(root.join("kept/x.log"), b"x").unwrap();
        fs::write(root.join("kept/y"), b"y").unwrap();
        fs::write(root.join(std::ffi::OsStr::from_bytes(b"\xff")), b"bin").unwrap();
        std::os::unix::fs::symlink("../../nowhere", root.join("a/l")).unwrap();
        std::os::unix::fs::symlink(&f.outside, root.join("out")).unwrap();
        fs::write(f.outside.join("never"), b"x").unwrap();
        fs::set_permissions(root.join("a.txt"), fs::Permissions::from_mode(0o4751)).unwrap();
        let t = sys::CName::new(root.join("a.txt").as_os_str().as_bytes()).unwrap();
        let times = [
            libc::timespec {
                tv_sec: 0,
                tv_nsec: libc::UTIME_OMIT,
            },
            libc::timespec {
                tv_sec: 1_700_000_000,
                tv_nsec: 42,
            },
        ];
        // SAFETY: valid path and times.
        assert_eq!(
            unsafe { libc::utimensat(libc::AT_FDCWD, t.as_ptr(), times.as_ptr(), 0) },
            0
        );

        let calls = Mutex::new(Vec::new());
        let exclude = |rel: &[u8], is_dir: bool| {
            lock(&calls).push((rel.to_vec(), is_dir));
            (rel == b"skip" && is_dir) || rel.ends_with(b".log")
        };
        let s = scan(root, &exclude, true).unwrap();
        let got: Vec<(&[u8], Kind)> = s
            .entries
            .iter()
            .map(|e| (e.path.as_slice(), e.kind))
            .collect();
        use Kind::*;
        assert_eq!(
            got,
            vec![
                (&b"B"[..], Dir),
                (b"a", Dir),
                (b"a-b", Dir),
                (b"a.txt", File),
                (b"a/b", Dir),
                (b"a/b/c", File),
                (b"a/l", Symlink),
                (b"a/z", File),
                (b"kept", Dir),
                (b"kept/y", File),
                (b"out", Symlink),
                (b"\xff", File),
            ]
        );
        assert!(s.skipped.is_empty());
        let calls = calls.into_inner().unwrap();
        assert!(calls.contains(&(b"skip".to_vec(), true)));
        assert!(calls.contains(&(b"out".to_vec(), false)));
        assert!(!calls.iter().any(|(p, _)| p.starts_with(b"skip/")));

        let by = |p: &[u8]| s.entries.iter().find(|e| e.path == p).unwrap().clone();
        let a = by(b"a.txt");
        assert_eq!(a.size, 5);
        assert_eq!(a.attrs.mode, 0o4751);
        assert_eq!((a.attrs.mtime_sec, a.attrs.mtime_nsec), (1_700_000_000, 42));
        assert_eq!(a.hash, Some(*blake3::hash(b"hello").as_bytes()));
        assert_eq!(a.target, None);
        let m = fs::metadata(root.join("a.txt")).unwrap();
        assert_eq!((a.attrs.uid, a.attrs.gid), (m.uid(), m.gid()));
        let z = by(b"a/z");
        assert_eq!(z.hash, Some(*blake3::hash(&vec![7u8; 3 << 20]).as_bytes()));
        assert_eq!(by(b"a/b/c").hash, Some(*blake3::hash(b"").as_bytes()));
        let l = by(b"a/l");
        assert_eq!(l.target.as_deref(), Some(&b"../../nowhere"[..]));
        assert_eq!(l.size, 13);
        assert_eq!(l.hash, None);
        let d = by(b"a");
        assert_eq!((d.size, d.hash, d.target), (0, None, None));

        let plain = scan(root, &|_, _| false, false).unwrap();
        assert!(plain.entries.iter().all(|e| e.hash.is_none()));
        assert_eq!(plain.entries.len(), 16);
        // Single-threaded and Root::scan agree.
        let one_thread = ScanConfig {
            walk_threads: 1,
            hash_threads: 1,
            inline_hash_max: 0,
            cleanup: false,
        };
        let one = scan_fd(f.root.fd.as_fd(), &|_, _| false, false, one_thread).unwrap();
        assert_eq!(one.entries, plain.entries);
        // Hashing inline (small files) and afterwards (large) agree.
        let hashed = scan(root, &|_, _| false, true).unwrap();
        let deferred = ScanConfig {
            walk_threads: 2,
            hash_threads: 3,
            inline_hash_max: 0,
            cleanup: false,
        };
        let later = scan_fd(f.root.fd.as_fd(), &|_, _| false, true, deferred).unwrap();
        assert_eq!(hashed.entries, later.entries);
        assert_eq!(
            hashed.entries.iter().filter(|e| e.hash.is_some()).count(),
            7
        );
        assert_eq!(
            f.root.scan(&|_, _| false, false, false).unwrap().entries,
            plain.entries
        );
    }

    #[test]
    fn scan_skips_special_files() {
        let f = fixture();
        let root = &f.root_path;
        fs::create_dir(root.join("d")).unwrap();
        let _sock = std::os::unix::net::UnixListener::bind(root.join("d/sock")).unwrap();
        let fifo = sys::CName::new(root.join("fifo").as_os_str().as_bytes()).unwrap();
        // SAFETY: NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
        let mut expected = vec![
            Skipped {
                path: b"d/sock".to_vec(),
                reason: SkipReason::Socket,
            },
            Skipped {
                path: b"fifo".to_vec(),
                reason: SkipReason::Fifo,
            },
        ];
        if is_root() {
            let dev = sys::CName::new(root.join("null").as_os_str().as_bytes()).unwrap();
            // SAFETY: NUL-terminated path.
            let r =
                unsafe { libc::mknod(dev.as_ptr(), libc::S_IFCHR | 0o600, libc::makedev(1, 3)) };
            if r == 0 {
                expected.push(Skipped {
                    path: b"null".to_vec(),
                    reason: SkipReason::CharDevice,
                });
            }
        }
        let s = scan(root, &|_, _| false, true).unwrap();
        assert_eq!(s.entries.len(), 1);
        assert_eq!(s.skipped, expected);
        assert_eq!(SkipReason::Socket.to_string(), "a socket");
        // Excluded special files are not reported.
        let s = scan(root, &|p, _| p == b"fifo", false).unwrap();
        assert_eq!(s.skipped.len(), expected.len() - 1);
    }

    #[test]
    fn scan_errors_on_missing_root() {
        let f = fixture();
        let e = scan(&f.root_path.join("nope"), &|_, _| false, false).unwrap_err();
        assert!(
            e.to_string().starts_with("cannot open root directory `"),
            "{e}"
        );
        assert!(Root::open(&f.root_path.join("nope")).is_err());
        fs::write(f.root_path.join("file"), b"").unwrap();
        let e = Root::open(&f.root_path.join("file")).unwrap_err();
        assert_eq!(e.io_error().unwrap().raw_os_error(), Some(libc::ENOTDIR));
    }

    #[test]
    fn deep_trees_do_not_exhaust_descriptors() {
        let f = fixture();
        let mut rel = Vec::new();
        for _ in 0..300 {
            if !rel.is_empty() {
                rel.push(b'/');
            }
            rel.push(b'd');
            f.root.mkdir(&rel, 0o755).unwrap();
        }
        rel.extend_from_slice(b"/f");
        write_file(&f.root, &rel, b"deep", &attrs(0o644));
        let s = f.root.scan(&|_, _| false, true, false).unwrap();
        assert_eq!(s.entries.len(), 301);
        assert_eq!(s.entries[300].hash, Some(*blake3::hash(b"deep").as_bytes()));
        f.root.sync_dirs().unwrap();
        f.root.remove(b"d").unwrap();
        assert!(listing(&f.root_path).is_empty());
    }

    /// Another thread keeps swapping a directory for a symlink to outside
    /// while we write through its name: nothing may ever land outside.
    #[test]
    fn racing_symlink_swaps_never_escape() {
        let f = fixture();
        let root = f.root_path.clone();
        fs::create_dir(root.join("d")).unwrap();
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            struct StopOnDrop<'a>(&'a std::sync::atomic::AtomicBool);
            impl Drop for StopOnDrop<'_> {
                fn drop(&mut self) {
                    self.0.store(true, Ordering::Relaxed);
                }
            }
            let _stop = StopOnDrop(&stop);
            s.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    fs::rename(root.join("d"), root.join("real")).unwrap();
                    std::os::unix::fs::symlink(&f.outside, root.join("d")).unwrap();
                    std::thread::yield_now();
                    fs::remove_file(root.join("d")).unwrap();
                    fs::rename(root.join("real"), root.join("d")).unwrap();
                    std::thread::yield_now();
                }
            });
            let deadline = Instant::now() + Duration::from_millis(500);
            let (mut ok, mut refused, mut through_symlink) = (0, 0, 0);
            while Instant::now() < deadline {
                let r = &f.root;
                let res = r.begin_file(b"d/x").and_then(|mut t| {
                    t.write_all(b"data").unwrap();
                    t.commit(&attrs(0o644))
                });
                let res = res
                    .and_then(|()| r.mkdir(b"d/sub", 0o755))
                    .and_then(|()| r.symlink(b"d/ln", b"t"))
                    .and_then(|()| r.set_attrs(b"d/x", &attrs(0o666)))
                    .and_then(|()| r.remove(b"d/sub"));
                match res {
                    Ok(()) => ok += 1,
                    Err(FsError::SymlinkInPath { .. }) => through_symlink += 1,
                    Err(FsError::MissingDir { .. }) => refused += 1,
                    // Names vanishing or changing type under us.
                    Err(FsError::Io { err, .. })
                        if matches!(
                            err.raw_os_error(),
                            Some(libc::ENOENT | libc::ENOTDIR | libc::ELOOP)
                        ) =>
                    {
                        refused += 1
                    }
                    Err(e) => panic!("unexpected: {e}"),
                }
            }
            eprintln!(
                "race: {ok} rounds succeeded, {through_symlink} refused as symlinks, \
                 {refused} failed otherwise"
            );
            assert!(through_symlink > 0);
        });
        assert!(listing(&f.outside).is_empty(), "{:?}", listing(&f.outside));
    }

    /// User + system CPU time of the whole process so far.
    fn cpu_time() -> Duration {
        let mut ru = std::mem::MaybeUninit::<libc::rusage>::uninit();
        // SAFETY: valid pointer; getrusage fills it.
        let ru = unsafe {
            assert_eq!(libc::getrusage(libc::RUSAGE_SELF, ru.as_mut_ptr()), 0);
            ru.assume_init()
        };
        let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
        tv(ru.ru_utime) + tv(ru.ru_stime)
    }

    /// Runs `f` `runs` times; the minimum wall and CPU times.
    fn measure(runs: usize, mut f: impl FnMut()) -> (Duration, Duration) {
        let (mut wall, mut cpu) = (Duration::MAX, Duration::MAX);
        for _ in 0..runs {
            let (w, c) = (Instant::now(), cpu_time());
            f();
            wall = wall.min(w.elapsed());
            cpu = cpu.min(cpu_time() - c);
        }
        (wall, cpu)
    }

    /// `cargo test --release -- --ignored --nocapture scan_speed`
    /// HASYNC_BENCH_DIR: where to keep the trees (reused between runs);
    /// HASYNC_DROP_CACHES=1 (root): also measure with cold caches.
    #[test]
    #[ignore]
    fn scan_speed() {
        let base = std::env::var_os("HASYNC_BENCH_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| std::env::temp_dir().join("hasync-scan-bench"));
        let none = |_: &[u8], _: bool| false;
        let config = |threads| ScanConfig {
            walk_threads: threads,
            hash_threads: threads,
            inline_hash_max: INLINE_HASH_MAX,
            cleanup: false,
        };
        let drop_caches = std::env::var_os("HASYNC_DROP_CACHES").is_some();
        for (label, fanout) in [("256x256", 256u32), ("16x16", 16)] {
            let root = base.join(label);
            if !root.join("done").exists() {
                let _ = fs::remove_dir_all(&root);
                fs::create_dir_all(&root).unwrap();
                let start = Instant::now();
                for i in 0..50_000u32 {
                    let h = blake3::hash(&i.to_le_bytes());
                    let b = h.as_bytes();
                    let dir = root
                        .join(format!("{:02x}", b[0] as u32 % fanout))
                        .join(format!("{:02x}", b[1] as u32 % fanout));
                    fs::create_dir_all(&dir).unwrap();
                    let name = format!("{}.bin", h.to_hex());
                    fs::write(dir.join(name), &b[..(i % 32) as usize]).unwrap();
                }
                fs::write(root.join("done"), b"").unwrap();
                eprintln!("{label}: created 50,000 files in {:?}", start.elapsed());
            }
            let fd = open_root(&root).unwrap();
            let n = scan_fd(fd.as_fd(), &none, false, config(1))
                .unwrap()
                .entries
                .len();
            eprintln!("{label}: {n} entries");
            for hash in [false, true] {
                for threads in [1, 2, 4] {
                    if drop_caches && threads < 4 {
                        std::process::Command::new("sync").status().unwrap();
                        fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
                        let (wall, cpu) = measure(1, || {
                            scan_fd(fd.as_fd(), &none, hash, config(threads)).unwrap();
                        });
                        eprintln!(
                            "{label}: cold hash={hash} threads={threads}: wall {} ms, cpu {} ms",
                            wall.as_millis(),
                            cpu.as_millis()
                        );
                    }
                    let (wall, cpu) = measure(9, || {
                        scan_fd(fd.as_fd(), &none, hash, config(threads)).unwrap();
                    });
                    eprintln!(
                        "{label}: warm hash={hash} threads={threads}: wall {} ms, cpu {} ms",
                        wall.as_millis(),
                        cpu.as_millis()
                    );
                }
            }
            let (wall, cpu) = measure(9, || {
                let mut stack = vec![root.clone()];
                while let Some(d) = stack.pop() {
                    for e in fs::read_dir(&d).unwrap() {
                        let e = e.unwrap();
                        if fs::symlink_metadata(e.path()).unwrap().is_dir() {
                            stack.push(e.path());
                        }
                    }
                }
            });
            eprintln!(
                "{label}: warm std read_dir + symlink_metadata, 1 thread, unsorted, no entries built: wall {} ms, cpu {} ms", wall.as_millis(), cpu.as_millis()
            );
        }
    }

    /// `cargo test --release -- --ignored --nocapture commit_speed`
    #[test]
    #[ignore]
    fn commit_speed() {
        let f = fixture();
        f.root.mkdir(b"d", 0o755).unwrap();
        let n = 2000;
        let t = Instant::now();
        for i in 0..n {
            write_file(
                &f.root,
                format!("d/f{i}").as_bytes(),
                b"small content",
                &attrs(0o644),
            );
        }
        let e = t.elapsed();
        let t2 = Instant::now();
        f.root.sync_dirs().unwrap();
        eprintln!(
            "{n} small-file commits: {e:?} ({:?} each); sync_dirs {:?}",
            e / n,
            t2.elapsed()
        );
    }
}
