//! `hasync rejoin NODE`: a fenced old primary (or a standby of an older
//! epoch) becomes a standby of the current primary. Nothing it holds is
//! silently lost: every file the next cycle would overwrite or delete there,
//! and its whole live database, are first copied into a quarantine directory
//! on the node itself; the next cycle then makes it an exact mirror.

use anyhow::{anyhow, bail, Result};
use hasync::config::Node;
use hasync::roles;
use hasync::state::{self, NodeRole};
use hasync::sync::{self, plan::Action, Conn, SyncOptions};
use hasync::transport::{shell_quote, Transport};

use crate::cli::{Cli, RejoinArgs};
use crate::exit::Exit;
use crate::output::{self, Log};

/// The files (and symlinks) of the rejoining node that the next cycle
/// would replace or delete, with their sizes there: the copy from the
/// primary, planned as a dry run (nothing is written).
fn replaced_paths(
    primary: &Node,
    node: &Node,
    config: &hasync::config::Config,
    epoch: u64,
) -> Result<Vec<(Vec<u8>, u64)>> {
    let opts = SyncOptions {
        max_delete: u64::MAX,
        dry_run: true,
        ..SyncOptions::from_config(&config.files, primary, node, epoch)
    };
    let (src, dst) = Conn::open_pair(primary, node)?;
    let outcome = sync::run(src, dst, &opts, &sync::Quiet)
        .map_err(|e| anyhow!("planning the copy {} -> {}: {e}", primary.name, node.name))?;
    use hasync::sync::manifest::Kind;
    Ok(outcome
        .plan
        .actions
        .iter()
        .filter_map(|a| match a {
            Action::Update {
                entry, old_size, ..
            } => Some((entry.path.clone(), *old_size)),
            Action::Relink { entry, .. } => Some((entry.path.clone(), 0)),
            Action::Delete { path, kind, size } if *kind != Kind::Dir => {
                Some((path.clone(), *size))
            }
            _ => None,
        })
        .collect())
}

pub fn run(cli: &Cli, args: &RejoinArgs, log: &Log) -> Result<Exit> {
    let config = super::load_config(cli, log)?;
    let (transports, records) = roles::connect_all(&config).map_err(|e| {
        anyhow!("{e}; rejoin needs both the node and the current primary reachable")
    })?;
    let target = config
        .nodes
        .iter()
        .position(|n| n.name == args.node)
        .ok_or_else(|| anyhow!("no node named {:?} in {}", args.node, config.path.display()))?;
    let primary = (0..config.nodes.len())
        .filter(|&i| i != target && records[i].role == NodeRole::Primary)
        .max_by_key(|&i| records[i].epoch)
        .ok_or_else(|| {
            anyhow!(
                "no other node is primary in its state record: nothing to rejoin {} to; `hasync status` shows the roles",
                args.node
            )
        })?;
    let (node, pnode) = (&config.nodes[target], &config.nodes[primary]);
    let (rec, epoch) = (&records[target], records[primary].epoch);
    match rec.role {
        NodeRole::Primary if rec.epoch >= epoch => bail!(
            "{} is a primary at epoch {}, not older than {}'s ({epoch}): two primaries; decide which one holds the data to keep, `hasync promote --force` it, then rejoin the other",
            node.name,
            rec.epoch,
            pnode.name
        ),
        NodeRole::Standby if rec.epoch == epoch => {
            log.info(&format!(
                "{} is already a standby of {} at epoch {epoch}: nothing to do",
                node.name, pnode.name
            ));
            return Ok(Exit::Ok);
        }
        _ => {}
    }
    let t = &*transports[target];
    let paths = replaced_paths(pnode, node, &config, epoch)?;
    let bytes: u64 = paths.iter().map(|p| p.1).sum();
    let stamp = chrono::Local::now().format("%Y%m%d-%H%M%S");
    let qdir = format!("{}/quarantine/{stamp}", node.state_dir);
    let split = rec
        .last_ok()
        .map(|c| c.started.clone())
        .unwrap_or_else(|| "(no successful cycle recorded)".into());
    if args.dry_run {
        let mut s = format!(
            "would rejoin {} ({} at epoch {}) as a standby of {} at epoch {epoch}\n",
            node.name, rec.role, rec.epoch, pnode.name
        );
        if let Some(svc) = &node.service {
            s += &format!("  [{}] stop: {}\n", node.name, svc.stop);
        }
        if let Some(db) = &node.database {
            for q in &db.readonly_sql {
                s += &format!("  [{}] readonly_sql: {q}\n", node.name);
            }
            s += &format!(
                "  [{}] dump database {} into {qdir}/{}.sql\n",
                node.name, db.name, db.name
            );
        }
        s += &format!(
            "  [{}] copy {} files ({}) that the next cycle replaces or deletes into {qdir}/files/:\n",
            node.name,
            paths.len(),
            sync::plan::human_bytes(bytes)
        );
        for (p, size) in &paths {
            s += &format!("      {}  ({size} bytes)\n", String::from_utf8_lossy(p));
        }
        s += &format!(
            "  [{}] state record: standby at epoch {epoch}\n  then the next `hasync sync` makes it an exact mirror of {}\ndry run: nothing was changed\n",
            node.name, pnode.name
        );
        output::stdout(&s);
        return Ok(Exit::Ok);
    }
    // No more writes from its users while its data is set aside.
    hasync::service::stop(t, node).map_err(|e| anyhow!("{e}; nothing was changed"))?;
    if let Some(db) = &node.database {
        if let Err(e) = hasync::db::replicate::run_on_live(t, node, &db.readonly_sql) {
            log.warn(&format!(
                "{}: readonly_sql: {e}; its service stays stopped, so nothing writes to it",
                node.name
            ));
        }
    }
    quarantine(t, node, &qdir, &paths, &split)?;
    log.info(&format!(
        "{}: {} files ({}) that the next cycle replaces or deletes copied into {qdir}/files",
        node.name,
        paths.len(),
        sync::plan::human_bytes(bytes)
    ));
    if let Some(db) = &node.database {
        let dump = format!("{qdir}/{}.sql", db.name);
        let n = hasync::db::replicate::dump_to_file(t, node, &dump)
            .map_err(|e| anyhow!("{e}; {} is unchanged (still {})", node.name, rec.role))?;
        log.info(&format!(
            "{}: its database {} dumped into {dump} ({})",
            node.name,
            db.name,
            sync::plan::human_bytes(n)
        ));
    }
    let mut rec = rec.clone();
    rec.change_role(
        NodeRole::Standby,
        epoch,
        &format!(
            "rejoin as a standby of {}; what the next cycle replaces is kept in {qdir}",
            pnode.name
        ),
    );
    state::write(t, node, &rec)?;
    log.info(&format!(
        "{} is a standby of {} at epoch {epoch}; its service stays stopped until the next `hasync sync`, which makes it an exact mirror and starts it",
        node.name, pnode.name
    ));
    Ok(Exit::Ok)
}

/// Copy `paths` (relative to the node's root) into `qdir/files`, keeping
/// their directories, owners, modes and times, with a README listing them
/// and which were changed after the split.
fn quarantine(
    t: &dyn Transport,
    node: &Node,
    qdir: &str,
    paths: &[(Vec<u8>, u64)],
    split: &str,
) -> Result<()> {
    let files = format!("{qdir}/files");
    let mut list = Vec::new();
    for (p, _) in paths {
        list.extend_from_slice(p);
        list.push(0);
    }
    let cmd = format!(
        "umask 077; mkdir -p -- {f} && cd {root} && xargs -0 -r cp -a --parents -t {f} --",
        f = shell_quote(&files),
        root = shell_quote(&node.root)
    );
    let out = t
        .exec(&cmd, &list, None)
        .map_err(|e| anyhow!("{}: quarantine: {e}", node.name))?;
    if !out.success() {
        bail!(
            "{}: cannot copy its files into {files}: {}; nothing was changed but that directory (remove it, fix the cause, run rejoin again)",
            node.name,
            out.stderr_tail()
        );
    }
    let mut readme = format!(
        "hasync rejoin of {} on {}\n\nThe files below are this node's versions of what the next cycle\nreplaced or deleted (under files/, same paths as in {}), and\nits database as it was (*.sql). Its last successful cycle started\n{split}: files changed since are the ones it took after the split.\n\n",
        node.name,
        state::now(),
        node.root
    );
    for (p, size) in paths {
        readme += &format!("{}\t{size}\n", String::from_utf8_lossy(p));
    }
    t.write_file(&format!("{qdir}/README.txt"), readme.as_bytes(), 0o600)
        .map_err(|e| anyhow!("{}: {e}", node.name))?;
    Ok(())
}
