//! Manifests: what a scanned tree holds, one entry per path, sorted by the
//! path's bytes so two manifests can be merge-joined in one pass.

/// File metadata carried with creates and updates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Attrs {
    pub mode: u32,
    pub mtime_sec: i64,
    pub mtime_nsec: u32,
    pub uid: u32,
    pub gid: u32,
}

/// What a manifest entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    File,
    Dir,
    Symlink,
}

/// One path of a scanned tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Relative to the root, `/`-separated, raw bytes (Linux names need not be UTF-8).
    pub path: Vec<u8>,
    pub kind: Kind,
    /// Files: their size; symlinks: the target's length; directories: 0.
    pub size: u64,
    /// Permission bits (with setuid/setgid/sticky, no type bits), mtime, owner.
    pub attrs: Attrs,
    /// Symlinks: the target, as stored (never followed).
    pub target: Option<Vec<u8>>,
    /// Files scanned with `--checksum`: BLAKE3 of the content.
    pub hash: Option<[u8; 32]>,
}
