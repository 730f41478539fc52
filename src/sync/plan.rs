//! The plan: what must change on the standby to make it equal to the
//! primary, computed by merge-joining the two sorted manifests.
//!
//! The plan is computed once and both `--dry-run` and the real run use it, so
//! what the dry run prints is exactly what the real run does. Deletions are
//! counted before anything is touched, so `max_delete` can stop a run (a
//! primary whose tree was accidentally emptied) before a single file goes.

use std::cmp::Ordering;

use super::manifest::{Attrs, Entry, Kind};

/// How a file on the standby differs from the primary's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Changes {
    pub size: bool,
    pub mtime: bool,
    /// The content hashes differ (only known with `--checksum`).
    pub content: bool,
    pub mode: bool,
    pub owner: bool,
}

/// One thing to do on the standby.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// A path the standby does not have (or has as another kind).
    Create(Entry),
    /// A file whose content differs: delta against the standby's copy.
    Update {
        entry: Entry,
        old_size: u64,
        changes: Changes,
    },
    /// Same content, other metadata (mode, owner, mtime in checksum mode).
    Attrs { entry: Entry, changes: Changes },
    /// A symlink whose target changed.
    Relink { entry: Entry, old_target: Vec<u8> },
    /// A path the primary no longer has (or has as another kind). A
    /// directory is removed entry by entry, each entry its own Delete, and
    /// the directory itself only if nothing is left: excluded files inside it
    /// survive, with the directories leading to them, as with rsync.
    Delete {
        path: Vec<u8>,
        kind: Kind,
        size: u64,
    },
}

#[derive(Debug, Clone, Copy, Default)]
pub struct PlanOptions {
    /// Compare content hashes instead of size and mtime (`--checksum`).
    pub checksum: bool,
    /// Compare and carry owners (the standby side runs as root).
    pub owners: bool,
    /// Delete what the primary no longer has.
    pub delete: bool,
}

#[derive(Debug, Clone, Default)]
pub struct Plan {
    /// In execution order: deletes (deepest first), then creates and
    /// updates in path order (parents before children).
    pub actions: Vec<Action>,
    /// Directories whose mode and mtime are set last, deepest first (writing
    /// into a directory changes its mtime).
    pub dir_attrs: Vec<Entry>,
}

/// Totals for summaries and the progress bar.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Totals {
    pub created: u64,
    pub created_bytes: u64,
    pub updated: u64,
    pub updated_bytes: u64,
    pub attrs: u64,
    pub deleted: u64,
    pub deleted_bytes: u64,
}

impl Plan {
    pub fn totals(&self) -> Totals {
        let mut t = Totals::default();
        for a in &self.actions {
            match a {
                Action::Create(e) => {
                    t.created += 1;
                    t.created_bytes += e.size;
                }
                Action::Update { entry, .. } => {
                    t.updated += 1;
                    t.updated_bytes += entry.size;
                }
                Action::Relink { .. } => t.updated += 1,
                Action::Attrs { .. } => t.attrs += 1,
                Action::Delete { size, .. } => {
                    t.deleted += 1;
                    t.deleted_bytes += size;
                }
            }
        }
        t
    }

    pub fn deletes(&self) -> usize {
        self.actions
            .iter()
            .filter(|a| matches!(a, Action::Delete { .. }))
            .count()
    }

    pub fn is_empty(&self) -> bool {
        self.actions.is_empty() && self.dir_attrs.is_empty()
    }
}

fn attrs_differ(src: &Attrs, dst: &Attrs, owners: bool) -> (bool, bool) {
    let mode = src.mode & 0o7777 != dst.mode & 0o7777;
    let owner = owners && (src.uid != dst.uid || src.gid != dst.gid);
    (mode, owner)
}

fn mtime_differs(a: &Attrs, b: &Attrs) -> bool {
    a.mtime_sec != b.mtime_sec || a.mtime_nsec != b.mtime_nsec
}

/// Compare the primary's manifest `src` with the standby's `dst` (both
/// sorted by path bytes, both already filtered by the same excludes, so
/// excluded standby files are never deleted).
pub fn plan(src: &[Entry], dst: &[Entry], opts: PlanOptions) -> Plan {
    let mut creates = Vec::new();
    let mut deletes: Vec<Action> = Vec::new();
    let mut dir_attrs = Vec::new();
    let (mut i, mut j) = (0, 0);
    let delete = |e: &Entry, deletes: &mut Vec<Action>| {
        deletes.push(Action::Delete {
            path: e.path.clone(),
            kind: e.kind,
            size: e.size,
        });
    };
    // Standby directories in the way of a primary file or symlink: their
    // contents go even without `delete`, as rsync empties them too.
    let mut replaced: Vec<Vec<u8>> = Vec::new();
    let under_replaced = |p: &[u8], replaced: &[Vec<u8>]| {
        replaced
            .iter()
            .any(|r| p.len() > r.len() && p.starts_with(r) && p[r.len()] == b'/')
    };
    while i < src.len() || j < dst.len() {
        let ord = match (src.get(i), dst.get(j)) {
            (Some(s), Some(d)) => s.path.cmp(&d.path),
            (Some(_), None) => Ordering::Less,
            (None, _) => Ordering::Greater,
        };
        match ord {
            // The root (the empty path, first in a scan) on one side only:
            // it can only have its attributes set, never be created or
            // deleted.
            Ordering::Less if src[i].path.is_empty() => i += 1,
            Ordering::Greater if dst[j].path.is_empty() => j += 1,
            Ordering::Less => {
                let s = &src[i];
                if s.kind == Kind::Dir {
                    dir_attrs.push(s.clone());
                }
                creates.push(Action::Create(s.clone()));
                i += 1;
            }
            Ordering::Greater => {
                if opts.delete || under_replaced(&dst[j].path, &replaced) {
                    delete(&dst[j], &mut deletes);
                }
                j += 1;
            }
            Ordering::Equal => {
                let (s, d) = (&src[i], &dst[j]);
                i += 1;
                j += 1;
                if s.kind != d.kind {
                    // Another kind of thing under the same name: replace it,
                    // even without `delete` (as rsync does).
                    delete(d, &mut deletes);
                    if d.kind == Kind::Dir {
                        replaced.push(d.path.clone());
                    }
                    if s.kind == Kind::Dir {
                        dir_attrs.push(s.clone());
                    }
                    creates.push(Action::Create(s.clone()));
                    continue;
                }
                let (mode, owner) = attrs_differ(&s.attrs, &d.attrs, opts.owners);
                match s.kind {
                    Kind::File => {
                        let size = s.size != d.size;
                        let mtime = mtime_differs(&s.attrs, &d.attrs);
                        // `content`: the hashes differ (known only with --checksum).
                        let content = opts.checksum && (s.hash != d.hash || s.hash.is_none());
                        let transfer = if opts.checksum {
                            size || content
                        } else {
                            size || mtime
                        };
                        let changes = Changes {
                            size,
                            mtime,
                            content,
                            mode,
                            owner,
                        };
                        if transfer {
                            creates.push(Action::Update {
                                entry: s.clone(),
                                old_size: d.size,
                                changes,
                            });
                        } else if mode || owner || mtime {
                            creates.push(Action::Attrs {
                                entry: s.clone(),
                                changes,
                            });
                        }
                    }
                    Kind::Symlink => {
                        if s.target != d.target {
                            creates.push(Action::Relink {
                                entry: s.clone(),
                                old_target: d.target.clone().unwrap_or_default(),
                            });
                        } else if owner || mtime_differs(&s.attrs, &d.attrs) {
                            // Symlinks have no mode (Linux), but an owner
                            // and an mtime, which `rsync -a` both carries.
                            let changes = Changes {
                                owner,
                                mtime: mtime_differs(&s.attrs, &d.attrs),
                                ..Changes::default()
                            };
                            creates.push(Action::Attrs {
                                entry: s.clone(),
                                changes,
                            });
                        }
                    }
                    Kind::Dir => {
                        if mode || owner || mtime_differs(&s.attrs, &d.attrs) {
                            dir_attrs.push(s.clone());
                        }
                    }
                }
            }
        }
    }
    // Deepest first: a child's path sorts after its parent's, so reverse order.
    deletes.sort_by(|a, b| match (a, b) {
        (Action::Delete { path: p, .. }, Action::Delete { path: q, .. }) => q.cmp(p),
        _ => Ordering::Equal,
    });
    let mut actions = deletes;
    actions.extend(creates);
    // Writing into a directory changes its mtime: every directory that gets
    // an entry created, replaced or deleted has its attributes set again
    // afterwards (rsync does the same), the root (the empty path) for the
    // top level.
    let src_dirs: std::collections::HashMap<&[u8], &Entry> = src
        .iter()
        .filter(|e| e.kind == Kind::Dir)
        .map(|e| (&e.path[..], e))
        .collect();
    let mut queued: std::collections::HashSet<Vec<u8>> =
        dir_attrs.iter().map(|e| e.path.clone()).collect();
    for a in &actions {
        let path = match a {
            Action::Create(e)
            | Action::Update { entry: e, .. }
            | Action::Relink { entry: e, .. } => &e.path,
            Action::Delete { path, .. } => path,
            Action::Attrs { .. } => continue,
        };
        let parent = &path[..path.iter().rposition(|b| *b == b'/').unwrap_or(0)];
        if let Some(dir) = src_dirs.get(parent) {
            if queued.insert(parent.to_vec()) {
                dir_attrs.push((*dir).clone());
            }
        }
    }
    dir_attrs.sort_by(|a, b| b.path.cmp(&a.path));
    Plan { actions, dir_attrs }
}

/// rsync-style itemized line (`rsync -i`) for one action.
pub fn itemize(a: &Action) -> String {
    let p = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    match a {
        Action::Create(e) => match e.kind {
            Kind::File => format!(">f+++++++++ {} ({})", p(&e.path), human_bytes(e.size)),
            Kind::Dir => format!("cd+++++++++ {}/", p(&e.path)),
            Kind::Symlink => {
                format!(
                    "cL+++++++++ {} -> {}",
                    p(&e.path),
                    p(e.target.as_deref().unwrap_or_default())
                )
            }
        },
        Action::Update {
            entry,
            old_size,
            changes,
        } => format!(
            ">f{}{}{}{}{}.... {} ({} -> {})",
            if changes.content && !changes.size {
                'c'
            } else {
                '.'
            },
            if changes.size { 's' } else { '.' },
            if changes.mtime { 't' } else { '.' },
            if changes.mode { 'p' } else { '.' },
            if changes.owner { 'o' } else { '.' },
            p(&entry.path),
            human_bytes(*old_size),
            human_bytes(entry.size)
        ),
        Action::Attrs { entry, changes } => format!(
            ".{}..{}{}{}.... {}",
            if entry.kind == Kind::Symlink {
                'L'
            } else {
                'f'
            },
            if changes.mtime { 't' } else { '.' },
            if changes.mode { 'p' } else { '.' },
            if changes.owner { 'o' } else { '.' },
            p(&entry.path)
        ),
        Action::Relink { entry, .. } => {
            format!(
                "cL.......... {} -> {}",
                p(&entry.path),
                p(entry.target.as_deref().unwrap_or_default())
            )
        }
        Action::Delete { path, kind, .. } => {
            format!(
                "*deleting   {}{}",
                p(path),
                if *kind == Kind::Dir { "/" } else { "" }
            )
        }
    }
}

/// 1536 → "1.5 KiB".
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(path: &str, size: u64, mtime: i64) -> Entry {
        Entry {
            path: path.as_bytes().to_vec(),
            kind: Kind::File,
            size,
            attrs: Attrs {
                mode: 0o644,
                mtime_sec: mtime,
                ..Attrs::default()
            },
            target: None,
            hash: None,
        }
    }

    fn d(path: &str) -> Entry {
        Entry {
            kind: Kind::Dir,
            attrs: Attrs {
                mode: 0o755,
                ..Attrs::default()
            },
            ..f(path, 0, 0)
        }
    }

    fn opts() -> PlanOptions {
        PlanOptions {
            checksum: false,
            owners: false,
            delete: true,
        }
    }

    #[test]
    fn creates_updates_and_deletes() {
        let src = vec![d("a"), f("a/new", 5, 1), f("a/same", 3, 1), f("a/x", 9, 2)];
        let dst = vec![
            d("a"),
            f("a/gone", 1, 1),
            f("a/same", 3, 1),
            f("a/x", 9, 1),
            d("z"),
            f("z/q", 1, 1),
        ];
        let p = plan(&src, &dst, opts());
        let lines: Vec<String> = p.actions.iter().map(itemize).collect();
        assert_eq!(
            lines,
            vec![
                "*deleting   z/q",
                "*deleting   z/",
                "*deleting   a/gone",
                ">f+++++++++ a/new (5 B)",
                ">f..t...... a/x (9 B -> 9 B)",
            ]
        );
        assert_eq!(p.totals().deleted, 3);
        // `a` changed inside; `z` goes entirely.
        let dirs: Vec<&[u8]> = p.dir_attrs.iter().map(|e| &e.path[..]).collect();
        assert_eq!(dirs, vec![&b"a"[..]]);
    }

    #[test]
    fn no_delete_keeps_extras_but_replaces_kinds() {
        let src = vec![f("k", 1, 1)];
        let dst = vec![d("k"), f("k/in", 1, 1), f("extra", 1, 1)];
        let p = plan(
            &src,
            &dst,
            PlanOptions {
                delete: false,
                ..opts()
            },
        );
        let lines: Vec<String> = p.actions.iter().map(itemize).collect();
        // Without --delete the extra survives; the directory `k` in the way
        // of the file `k` is emptied and removed, as rsync does.
        assert_eq!(
            lines,
            vec!["*deleting   k/in", "*deleting   k/", ">f+++++++++ k (1 B)"]
        );
    }

    #[test]
    fn checksum_mode_ignores_mtime_for_content() {
        let mut a = f("x", 3, 1);
        a.hash = Some([1; 32]);
        let mut b = f("x", 3, 2);
        b.hash = Some([1; 32]);
        let p = plan(
            &[a.clone()],
            &[b.clone()],
            PlanOptions {
                checksum: true,
                ..opts()
            },
        );
        assert!(matches!(p.actions[..], [Action::Attrs { .. }]));
        b.hash = Some([2; 32]);
        b.attrs.mtime_sec = 1;
        let p = plan(
            &[a],
            &[b],
            PlanOptions {
                checksum: true,
                ..opts()
            },
        );
        assert_eq!(itemize(&p.actions[0]), ">fc........ x (3 B -> 3 B)");
    }

    #[test]
    fn dir_attrs_deepest_first() {
        let src = vec![d("a"), d("a/b"), d("c")];
        let p = plan(&src, &[], opts());
        let order: Vec<&[u8]> = p.dir_attrs.iter().map(|e| &e.path[..]).collect();
        assert_eq!(order, vec![&b"c"[..], b"a/b", b"a"]);
    }

    #[test]
    fn parents_of_changes_get_their_mtime_back() {
        // `a` and `a/b` are unchanged, but a file appears in `a/b` and one
        // goes from `a`: writing there changes their mtimes, so both are reset.
        let src = vec![d("a"), d("a/b"), f("a/b/new", 1, 1), d("c")];
        let dst = vec![d("a"), d("a/b"), f("a/old", 1, 1), d("c")];
        let p = plan(&src, &dst, opts());
        let order: Vec<&[u8]> = p.dir_attrs.iter().map(|e| &e.path[..]).collect();
        assert_eq!(order, vec![&b"a/b"[..], b"a"]);
    }

    #[test]
    fn the_root_gets_its_attributes_back_and_is_never_created_or_deleted() {
        let root = |mtime: i64| {
            let mut r = d("");
            r.attrs.mtime_sec = mtime;
            r
        };
        // A change at the top level resets the root's time, last.
        let p = plan(
            &[root(5), d("a"), f("new", 1, 1)],
            &[root(5), d("a")],
            opts(),
        );
        let order: Vec<&[u8]> = p.dir_attrs.iter().map(|e| &e.path[..]).collect();
        assert_eq!(order, vec![&b""[..]]);
        let p = plan(
            &[root(5), d("a"), f("a/new", 1, 1)],
            &[root(5), d("a")],
            opts(),
        );
        let order: Vec<&[u8]> = p.dir_attrs.iter().map(|e| &e.path[..]).collect();
        assert_eq!(order, vec![&b"a"[..]]);
        // Only its time differs (a leftover removed there): just that.
        let p = plan(&[root(5), d("a")], &[root(6), d("a")], opts());
        assert!(p.actions.is_empty());
        assert_eq!(p.dir_attrs, vec![root(5)]);
        // Nothing to do: nothing planned.
        assert!(plan(&[root(5), d("a")], &[root(5), d("a")], opts()).is_empty());
        // On one side only (a peer that did not send it): never a create
        // or a delete of the root, and nothing for it to get back.
        let p = plan(&[root(5), f("x", 1, 1)], &[f("x", 1, 1)], opts());
        assert!(p.is_empty(), "{p:?}");
        let p = plan(&[f("x", 1, 1)], &[root(5), f("x", 1, 1)], opts());
        assert!(p.is_empty(), "{p:?}");
    }

    /// A symlink whose mtime alone changed (`touch -h`) gets it set, as
    /// `rsync -a` does (`.L..t......`); found by the differential test.
    #[test]
    fn a_symlink_whose_mtime_alone_changed_gets_it_set() {
        let l = |mtime: i64, nsec: u32| Entry {
            kind: Kind::Symlink,
            size: 1,
            target: Some(b"t".to_vec()),
            attrs: Attrs {
                mtime_sec: mtime,
                mtime_nsec: nsec,
                ..Attrs::default()
            },
            ..f("l", 1, 0)
        };
        let p = plan(&[l(5, 7)], &[l(5, 8)], opts());
        assert_eq!(p.actions.len(), 1, "{p:?}");
        match &p.actions[0] {
            Action::Attrs { entry, changes } => {
                assert_eq!(entry.attrs.mtime_nsec, 7);
                assert!(changes.mtime && !changes.owner && !changes.mode);
                assert_eq!(itemize(&p.actions[0]), ".L..t...... l");
            }
            a => panic!("expected attributes, got {a:?}"),
        }
        assert!(plan(&[l(5, 7)], &[l(5, 7)], opts()).is_empty());
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
    }
}
