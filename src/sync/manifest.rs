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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink,
}

/// One path of a scanned tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub path: Vec<u8>,
    pub kind: Kind,
    pub size: u64,
    pub attrs: Attrs,
    pub target: Option<Vec<u8>>,
    pub hash: Option<[u8; 32]>,
}
