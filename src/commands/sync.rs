//! `hasync sync`: replicate the primary to its standbys. For now the file
//! pass alone (`--files-only`); the database phase and the full cycle come
//! with their issues, and the command says so instead of pretending.

use anyhow::{bail, Result};
use hasync::agent::wire::Record;
use hasync::config::{Config, Node};
use hasync::db::{self, replicate::DbPlan};
use hasync::roles::{self, Resolved, RoleError};
use hasync::state::{self, StateRecord};
use hasync::sync::plan::{human_bytes, itemize, Action};
use hasync::sync::{self, Conn, SyncOptions};

use crate::cli::{Cli, SyncArgs};
use crate::exit::Exit;
use crate::output::{self, Log};
use crate::progress::{DbReporter, Reporter};

pub fn run(cli: &Cli, args: &SyncArgs, log: &Log) -> Result<Exit> {
    if args.db_only {
        return run_db(cli, args, log);
    }
    if !args.files_only {
        return super::cycle::run(cli, args, log);
    }
    let config = super::load_config(cli, log)?;
    let (resolved, mut early) = if config.nodes.len() == 2 {
        direction_from_agents(&config, args, log)
    } else {
        (direction(&config, args, log), Vec::new())
    };
    let (primary, standbys, epoch) = resolved?;
    let primary = &primary;
    let mut take_early = |n: &Node| -> Option<Conn> {
        let i = config.nodes.iter().position(|c| c.name == n.name)?;
        early.get_mut(i)?.take()
    };
    let mut json_out = Vec::new();
    for standby in &standbys {
        let pair = match (take_early(primary), take_early(standby)) {
            (Some(src), Some(dst)) => Ok((src, dst)),
            // One did not open: again, for its error.
            _ => Conn::open_pair(primary, standby),
        };
        let defaults = SyncOptions::from_config(&config.files, primary, standby, epoch);
        let opts = SyncOptions {
            max_delete: args.max_delete.unwrap_or(defaults.max_delete),
            checksum: args.checksum,
            dry_run: args.dry_run,
            ..defaults
        };
        let reporter = Reporter::new(
            &standby.name,
            cli.global.no_progress || args.dry_run,
            cli.global.quiet > 0,
        );
        let started = std::time::Instant::now();
        let outcome = pair.and_then(|(src, dst)| sync::run(src, dst, &opts, &reporter));
        reporter.finish();
        let outcome = outcome
            .map_err(|e| anyhow::anyhow!("file sync {} -> {}: {e}", primary.name, standby.name))?;
        let t = outcome.summary.totals;
        if cli.global.json {
            json_out.push(serde_json::json!({
                "from": primary.name,
                "to": standby.name,
                "dry_run": args.dry_run,
                "actions": outcome.plan.actions.iter().map(action_json).collect::<Vec<_>>(),
                "summary": outcome.summary,
            }));
            continue;
        }
        if args.dry_run || cli.global.verbose > 0 {
            let mut s = String::new();
            for a in &outcome.plan.actions {
                s.push_str(&itemize(a));
                s.push('\n');
            }
            output::stdout(&s);
        }
        let [create, update, attrs, delete] = if args.dry_run {
            ["would create", "update", "change attributes of", "delete"]
        } else {
            ["created", "updated", "changed attributes of", "deleted"]
        };
        let totals = format!(
            "{} -> {}: {create} {} ({}), {update} {} ({}), {attrs} {}, {delete} {} ({})",
            primary.name,
            standby.name,
            t.created,
            human_bytes(t.created_bytes),
            t.updated,
            human_bytes(t.updated_bytes),
            t.attrs,
            t.deleted,
            human_bytes(t.deleted_bytes)
        );
        if args.dry_run {
            output::stdout(&format!("{totals}\ndry run: nothing was changed\n"));
        } else {
            let s = &outcome.summary;
            log.info(&totals);
            log.info(&format!(
                "{}: literal {} matched {}, wire {} sent {} received, speedup {:.1}, {} resent, scan {:.1}s transfer {:.1}s, total {:.1}s",
                standby.name,
                human_bytes(s.literal_bytes),
                human_bytes(s.matched_bytes),
                human_bytes(s.wire_sent),
                human_bytes(s.wire_received),
                // As rsync reports it: the bytes the standby now holds anew
                // per byte that crossed the wire.
                (t.created_bytes + t.updated_bytes) as f64 / (s.wire_sent + s.wire_received).max(1) as f64,
                s.resent,
                s.scan_secs,
                s.transfer_secs,
                started.elapsed().as_secs_f64()
            ));
        }
        if outcome.summary.changed > 0 {
            log.warn(&format!(
                "{} files changed or vanished on {} while being read and were not copied; the next run copies them",
                outcome.summary.changed, primary.name
            ));
        }
        if outcome.summary.skipped_special > 0 {
            log.warn(&format!(
                "{} special files (sockets, fifos, devices) on {} were not replicated",
                outcome.summary.skipped_special, primary.name
            ));
        }
    }
    if cli.global.json {
        output::stdout(&format!("{}\n", serde_json::to_string_pretty(&json_out)?));
    }
    Ok(Exit::Ok)
}

/// The primary, the standbys to copy to and the primary's epoch.
type Direction = (Node, Vec<Node>, u64);

/// The direction of a run, from the nodes' state records (see
/// `hasync::roles`): the primary, the standbys to copy to (all, or the one
/// `--to` names) and the primary's epoch. An old primary found on the way
/// is fenced, except in a dry run, which changes nothing.
pub fn direction(config: &Config, args: &SyncArgs, log: &Log) -> Result<Direction> {
    let (transports, mut records) = roles::connect_all(config).map_err(|e| anyhow::anyhow!(e))?;
    let resolved = if args.dry_run {
        roles::resolve(&config.nodes, &records, args.to.as_deref())
    } else {
        roles::resolve_and_fence(config, &transports, &mut records, args.to.as_deref())
    }?;
    Ok(chosen(config, args, log, &resolved, &records))
}

/// What [`direction`] returns for `resolved`, after a warning for each node
/// left out (unless `--to` chose).
fn chosen(
    config: &Config,
    args: &SyncArgs,
    log: &Log,
    resolved: &Resolved,
    records: &[StateRecord],
) -> Direction {
    for s in &resolved.skipped {
        if args.to.is_none() {
            log.warn(&format!("left out: {s}"));
        }
    }
    (
        config.nodes[resolved.primary].clone(),
        resolved
            .standbys
            .iter()
            .map(|&i| config.nodes[i].clone())
            .collect(),
        records[resolved.primary].epoch,
    )
}

/// [`direction`] for `sync --files-only` between two nodes, with one SSH
/// connection per node: both agents start at once, before the direction is
/// known, and each one's Welcome carries its node's state record (an agent
/// writes only once told the primary's epoch, and checks its own record
/// then). Also returns the agents, in config order (None: it did not
/// start), for the run to use; one not needed ends when it is dropped.
///
/// [`direction`] itself decides (over its own connections, as it always
/// did) when an agent did not start or could not send a readable record
/// (its errors say why), and when an old primary must be fenced (it writes
/// the record and says so).
fn direction_from_agents(
    config: &Config,
    args: &SyncArgs,
    log: &Log,
) -> (Result<Direction>, Vec<Option<Conn>>) {
    let opened: Vec<Option<(Conn, Record)>> = std::thread::scope(|s| {
        let handles: Vec<_> = config
            .nodes
            .iter()
            .map(|n| {
                s.spawn(move || {
                    let mut c = Conn::open(n).ok()?;
                    let record = c.handshake(&n.root).ok()?;
                    Some((c, record))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("connect thread panicked"))
            .collect()
    });
    let records: Option<Vec<StateRecord>> = config
        .nodes
        .iter()
        .zip(&opened)
        .map(|(n, o)| match &o.as_ref()?.1 {
            Record::Absent => Some(StateRecord::initial(n)),
            Record::Present(bytes) => state::parse(n, bytes).ok(),
            Record::Unreadable(_) | Record::NotSent => None,
        })
        .collect();
    let conns = opened.into_iter().map(|o| o.map(|(c, _)| c)).collect();
    let Some(records) = records else {
        return (direction(config, args, log), conns);
    };
    match roles::resolve(&config.nodes, &records, args.to.as_deref()) {
        Err(RoleError::StalePrimary { .. }) if !args.dry_run => {
            (direction(config, args, log), conns)
        }
        Err(e) => (Err(e.into()), conns),
        Ok(resolved) => (Ok(chosen(config, args, log, &resolved, &records)), conns),
    }
}

/// `hasync sync --db-only`: the database phase alone, to every standby.
fn run_db(cli: &Cli, args: &SyncArgs, log: &Log) -> Result<Exit> {
    let config = super::load_config(cli, log)?;
    if config.database.is_none() {
        bail!(
            "{}: there is no [database] section, so no database to replicate; add one (see `hasync init --stdout`) or run `hasync sync --files-only`",
            config.path.display()
        );
    }
    let (primary, standbys, _) = direction(&config, args, log)?;
    let primary = &primary;
    let mut json_out = Vec::new();
    for standby in &standbys {
        if args.dry_run {
            let plan = db::replicate::plan(primary, standby)?;
            if cli.global.json {
                json_out.push(serde_json::to_value(&plan)?);
                continue;
            }
            output::stdout(&render_db_plan(&plan));
            continue;
        }
        let reporter = DbReporter::new(&standby.name, cli.global.no_progress, cli.global.quiet > 0);
        let started = std::time::Instant::now();
        let outcome = db::replicate::replicate(primary, standby, &reporter, None);
        reporter.finish();
        let s = outcome?;
        for w in &s.warnings {
            log.warn(w);
        }
        if cli.global.json {
            json_out.push(serde_json::to_value(&s)?);
            continue;
        }
        log.info(&format!(
            "{} -> {}: database {} ({}) replicated: {} tables, {} rows, {} objects verified, {} of dump, {:.1}s; {}",
            s.from,
            s.to,
            s.database,
            s.engine,
            s.tables,
            s.rows,
            s.objects,
            human_bytes(s.bytes),
            started.elapsed().as_secs_f64(),
            match &s.previous {
                Some(p) => format!("the previous copy is kept as {p}"),
                None => "the mirror had no previous copy".into(),
            }
        ));
        for p in &s.phases {
            let mut line = format!("{}: {:<13} {:>7.2}s", s.to, p.name, p.secs);
            if let Some(r) = p.rows {
                line += &format!(", {r} rows");
            }
            if let Some(b) = p.bytes {
                line += &format!(
                    ", {} ({}/s)",
                    human_bytes(b),
                    human_bytes((b as f64 / p.secs.max(0.001)) as u64)
                );
            }
            if p.name == "dump and load" && s.streams > 1 {
                line += &format!(", {} streams in parallel", s.streams);
            }
            if p.name == "read-only" {
                line += &format!(
                    ", {} readonly_sql statement(s) checked",
                    s.readonly_statements
                );
            }
            log.info(&line);
        }
    }
    if cli.global.json {
        output::stdout(&format!("{}\n", serde_json::to_string_pretty(&json_out)?));
    }
    Ok(Exit::Ok)
}

fn render_db_plan(plan: &DbPlan) -> String {
    let mut s = format!(
        "{} -> {}: database {} ({}); the mirror's {} {}\n",
        plan.from,
        plan.to,
        plan.database,
        plan.engine,
        plan.database,
        if plan.mirror_database_exists {
            format!("exists and would be kept as {}", plan.previous)
        } else {
            "does not exist yet and would be created".to_string()
        }
    );
    let width = plan
        .tables
        .iter()
        .map(|t| t.0.len())
        .max()
        .unwrap_or(5)
        .max(5);
    s += &format!("{:<width$} {:>12} {:>10}\n", "table", "rows", "data");
    for (name, rows, bytes) in &plan.tables {
        s += &format!("{name:<width$} {rows:>12} {:>10}\n", human_bytes(*bytes));
    }
    let rows: u64 = plan.tables.iter().map(|t| t.1).sum();
    s += &format!(
        "{} tables, {rows} rows; objects: {}\nestimated dump size: about {} (the table data)\n",
        plan.tables.len(),
        plan.objects
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect::<Vec<_>>()
            .join(", "),
        human_bytes(plan.estimated_bytes)
    );
    if !plan.unpopulated.is_empty() {
        s += &format!(
            "materialized views not populated: {} (copied as they are, unpopulated; no rows to count)\n",
            plan.unpopulated.join(", ")
        );
    }
    s += "would run:\n";
    for (node, step) in &plan.steps {
        s += &format!("  [{node}] {step}\n");
    }
    s += "dry run: nothing was changed\n";
    s
}

fn action_json(a: &Action) -> serde_json::Value {
    let p = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    let kind = |k: hasync::sync::manifest::Kind| format!("{k:?}").to_lowercase();
    match a {
        Action::Create(e) => {
            serde_json::json!({"op": "create", "path": p(&e.path), "kind": kind(e.kind), "size": e.size})
        }
        Action::Update {
            entry, old_size, ..
        } => {
            serde_json::json!({"op": "update", "path": p(&entry.path), "kind": "file", "size": entry.size, "old_size": old_size})
        }
        Action::Attrs { entry, .. } => {
            serde_json::json!({"op": "attrs", "path": p(&entry.path), "kind": kind(entry.kind)})
        }
        Action::Relink { entry, .. } => {
            serde_json::json!({"op": "relink", "path": p(&entry.path), "kind": "symlink",
            "target": p(entry.target.as_deref().unwrap_or_default())})
        }
        Action::Delete {
            path,
            kind: k,
            size,
            ..
        } => serde_json::json!({"op": "delete", "path": p(path), "kind": kind(*k), "size": size}),
    }
}
