//! `hasync sync` without `--files-only` / `--db-only`: the whole cycle (see
//! `hasync::cycle`), or with `--dry-run` its plan.

use std::sync::Arc;

use anyhow::{anyhow, bail, Result};
use hasync::cycle::{self, Cycle, CycleOptions, CycleUi};
use hasync::db::replicate::DbProgress;
use hasync::sync::Progress;

use crate::cli::{Cli, SwitchoverArgs, SyncArgs};
use crate::exit::Exit;
use crate::output::{self, Log};
use crate::progress::{DbReporter, Reporter, Waiting};

struct Ui {
    log: Log,
    no_progress: bool,
    quiet: bool,
}

impl CycleUi for Ui {
    fn info(&self, msg: &str) {
        self.log.info(msg);
    }
    fn warn(&self, msg: &str) {
        self.log.warn(msg);
    }
    fn files_progress(&self, node: &str) -> Box<dyn Progress> {
        Box::new(Reporter::new(node, self.no_progress, self.quiet))
    }
    fn db_progress(&self, node: &str) -> Box<dyn DbProgress> {
        Box::new(DbReporter::new(node, self.no_progress, self.quiet))
    }
    fn waiting(&self, node: &str, what: &str) -> Box<dyn cycle::Waiting> {
        Box::new(Waiting::new(node, what, self.no_progress, self.quiet))
    }
}

pub fn run(cli: &Cli, args: &SyncArgs, log: &Log) -> Result<Exit> {
    let config = super::load_config(cli, log)?;
    if args.dry_run {
        return dry_run(cli, args, log, &config, false);
    }
    let opts = CycleOptions {
        checksum: args.checksum,
        max_delete: args.max_delete,
        to: args.to.clone(),
        switchover: false,
    };
    run_cycle(cli, log, &config, &opts)
}

/// `hasync switchover`: a cycle that ends with the roles swapped.
pub fn switchover(cli: &Cli, args: &SwitchoverArgs, log: &Log) -> Result<Exit> {
    let config = super::load_config(cli, log)?;
    if args.dry_run {
        let sync_args = SyncArgs {
            files_only: false,
            db_only: false,
            dry_run: true,
            checksum: false,
            max_delete: None,
            to: args.to.clone(),
        };
        return dry_run(cli, &sync_args, log, &config, true);
    }
    let opts = CycleOptions {
        to: args.to.clone(),
        switchover: true,
        ..CycleOptions::default()
    };
    run_cycle(cli, log, &config, &opts)
}

fn run_cycle(
    cli: &Cli,
    log: &Log,
    config: &hasync::config::Config,
    opts: &CycleOptions,
) -> Result<Exit> {
    hasync::signals::install();
    let ui = Arc::new(Ui {
        log: *log,
        no_progress: cli.global.no_progress,
        quiet: cli.global.quiet > 0,
    });
    let c = Cycle::connect(config, opts, ui).map_err(|e| anyhow!("{e}; nothing was stopped"))?;
    let (primary, standbys, epoch) = c.direction();
    let target = standbys.first().cloned().unwrap_or_default();
    if opts.switchover {
        super::roles::promote_hook(config, true, &target, epoch + 1, "pre")
            .map_err(|e| anyhow!("pre_promote refused the switchover: {e}; nothing was stopped"))?;
    }
    let report = c.run(opts);
    if cli.global.json {
        output::stdout(&format!("{}\n", serde_json::to_string_pretty(&report)?));
    }
    let line = cycle::summary_line(&report);
    if report.outcome != "ok" {
        if report.roles_swapped {
            bail!(
                "the roles were swapped ({target} is the primary at epoch {}, {primary} its standby), but: {line}",
                epoch + 1
            );
        }
        if opts.switchover {
            bail!("switchover failed, the roles are unchanged ({primary} is the primary): {line}");
        }
        bail!("{line}");
    }
    log.info(&line);
    if opts.switchover {
        log.info(&format!(
            "switchover done: {target} is the primary at epoch {}, {primary} its standby",
            epoch + 1
        ));
        if let Err(e) = super::roles::promote_hook(config, false, &target, epoch + 1, "ok") {
            log.warn(&format!("post_promote: {e}"));
        }
    }
    Ok(Exit::Ok)
}

/// The plan of a cycle: the service commands on each node, the file plan
/// and the database plan. Changes nothing anywhere.
fn dry_run(
    cli: &Cli,
    args: &SyncArgs,
    log: &Log,
    config: &hasync::config::Config,
    switchover: bool,
) -> Result<Exit> {
    let (primary, standbys, _) = super::sync::direction(config, args, log)?;
    let primary = &primary;
    let svc = |n: &hasync::config::Node, what: &str| match &n.service {
        Some(s) => {
            let cmd = if what == "stop" { &s.stop } else { &s.start };
            let mut line = format!(
                "  [{}] {what}: {cmd}  (then `{}` until it says {}, at most {} s",
                n.name,
                s.status,
                if what == "stop" { "stopped" } else { "running" },
                s.timeout.as_secs()
            );
            if what == "start" {
                if let Some(u) = &s.health_url {
                    line += &format!(", and {u} until 2xx");
                }
            }
            line + ")\n"
        }
        None => format!(
            "  [{}] {what}: no [nodes.{}.service]: nothing to {what}\n",
            n.name, n.name
        ),
    };
    let mut s = format!(
        "cycle plan: {} -> {}\n  preflight: every service answers status, every database a login; lock {}/cycle.lock on each node\n  warm file pass (services still running)\n",
        primary.name,
        standbys.iter().map(|n| n.name.as_str()).collect::<Vec<_>>().join(", "),
        "state_dir"
    );
    for n in &standbys {
        s += &svc(n, "stop");
    }
    s += &svc(primary, "stop");
    s += "  final file pass: what changed since the warm pass (the plan below is for now)\n";
    if config.database.is_some() {
        let early = primary.database.as_ref().is_some_and(|d| d.early_restart);
        s += &format!(
            "  database phase (plan below){}\n",
            if early {
                "; early_restart: the primary starts once the dump's snapshot is taken"
            } else {
                ""
            }
        );
    }
    if switchover {
        let [new] = standbys.as_slice() else {
            bail!(
                "{} standbys; name the one to switch to: hasync switchover --to NODE",
                standbys.len()
            );
        };
        let sql = |n: &hasync::config::Node, readwrite: bool| -> String {
            let Some(db) = &n.database else {
                return String::new();
            };
            let (name, list) = if readwrite {
                ("readwrite_sql", &db.readwrite_sql)
            } else {
                ("readonly_sql", &db.readonly_sql)
            };
            list.iter()
                .map(|q| format!("  [{}] {name}: {q}\n", n.name))
                .collect()
        };
        s += &sql(new, true);
        s += &format!(
            "  [{}] state record: primary at the next epoch (the point of no return: a failure before it starts {} again as the primary)\n  [{}] state record: standby at that epoch\n",
            new.name, primary.name, primary.name
        );
        s += &sql(primary, false);
        s += &svc(new, "start");
        s += &svc(primary, "start");
        if let Some(h) = &config.hooks.pre_promote {
            s += &format!(
                "  before all: pre_promote {} (non-zero aborts)\n",
                h.display()
            );
        }
        if let Some(h) = &config.hooks.post_promote {
            s += &format!("  after all: post_promote {}\n", h.display());
        }
    } else {
        s += &svc(primary, "start");
        for n in &standbys {
            s += &svc(n, "start");
        }
    }
    s += "  record the outcome in each node's state_dir/state.json; run the on_success / on_failure hook\n\n";
    output::stdout(&s);
    let files_args = SyncArgs {
        files_only: true,
        db_only: false,
        dry_run: true,
        checksum: args.checksum,
        max_delete: args.max_delete,
        to: args.to.clone(),
    };
    super::sync::run(cli, &files_args, log)?;
    if config.database.is_some() {
        output::stdout("\n");
        let db_args = SyncArgs {
            files_only: false,
            db_only: true,
            ..files_args
        };
        super::sync::run(cli, &db_args, log)?;
    }
    Ok(Exit::Ok)
}
