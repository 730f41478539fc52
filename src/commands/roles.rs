//! `hasync status`, `hasync check` and `hasync promote`: the roles the
//! nodes' state records hold (see `hasync::roles`).

use std::io::Write;
use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use hasync::config::{Config, Node};
use hasync::roles::{self, NodeStatus, RoleError};
use hasync::state::{self, NodeRole};
use hasync::transport;

use crate::cli::{CheckArgs, Cli, PromoteArgs};
use crate::exit::Exit;
use crate::output::{self, Log};

/// Seconds since an RFC 3339 time.
fn age_secs(rfc3339: &str) -> Option<f64> {
    let t = chrono::DateTime::parse_from_rfc3339(rfc3339).ok()?;
    Some((chrono::Utc::now() - t.with_timezone(&chrono::Utc)).num_milliseconds() as f64 / 1000.0)
}

fn human_age(secs: f64) -> String {
    let s = secs.max(0.0) as u64;
    match s {
        0..=119 => format!("{s}s ago"),
        120..=7199 => format!("{}m ago", s / 60),
        7200..=172_799 => format!("{}h ago", s / 3600),
        _ => format!("{}d ago", s / 86400),
    }
}

/// What is wrong, by severity (1 warning, 2 critical), for status and check.
fn problems(config: &Config, nodes: &[NodeStatus], max_age: Duration) -> Vec<(u8, String)> {
    let mut out = Vec::new();
    for n in nodes.iter().filter(|n| !n.reachable) {
        let was_primary = config
            .node(&n.node)
            .is_some_and(|c| c.initial_role == hasync::config::Role::Primary);
        out.push((
            1,
            format!(
                "{} unreachable ({})",
                n.node,
                n.error.as_deref().unwrap_or("?")
            ),
        ));
        if was_primary
            && !nodes
                .iter()
                .any(|m| m.reachable && m.role == Some(NodeRole::Primary))
        {
            out.push((2, format!("no reachable primary ({} is down)", n.node)));
        }
    }
    let reachable: Vec<&NodeStatus> = nodes.iter().filter(|n| n.record.is_some()).collect();
    let cfg_nodes: Vec<Node> = reachable
        .iter()
        .filter_map(|n| config.node(&n.node).cloned())
        .collect();
    let records: Vec<_> = reachable
        .iter()
        .map(|n| n.record.clone().expect("filtered"))
        .collect();
    match roles::resolve(&cfg_nodes, &records, None) {
        Ok(r) => {
            for &s in &r.standbys {
                let n = reachable[s];
                match &n.last_ok {
                    None => out.push((2, format!("{}: no successful cycle yet", n.node))),
                    Some(c) => {
                        let age = age_secs(&c.ended).unwrap_or(f64::MAX);
                        if age > max_age.as_secs_f64() {
                            out.push((
                                2,
                                format!(
                                    "{}: stale, last successful cycle {} (max {})",
                                    n.node,
                                    human_age(age),
                                    hasync::config::duration::format_duration(max_age)
                                ),
                            ));
                        }
                    }
                }
                if let Some(c) = &n.last_cycle {
                    if c.outcome != "ok" {
                        out.push((
                            1,
                            format!(
                                "{}: the last cycle {} ({})",
                                n.node,
                                c.outcome,
                                c.reason.as_deref().unwrap_or("")
                            ),
                        ));
                    }
                }
            }
            for s in r.skipped {
                out.push((1, s));
            }
            let p = reachable[r.primary];
            // A run that stops and starts the service on purpose says so
            // (and reports its own failures); outside one, users get what
            // the probes see.
            let in_run = |n: &NodeStatus| {
                n.activity
                    .as_ref()
                    .and_then(|a| a.step.as_ref())
                    .is_some_and(|s| s.service != hasync::lock::ServiceStep::Untouched)
            };
            if let Some(app) = p.application.as_ref().filter(|_| !in_run(p)) {
                if !app.up {
                    out.push((
                        2,
                        format!(
                            "{}: the primary's application is DOWN ({})",
                            p.node, app.detail
                        ),
                    ));
                } else if app.writable == Some(false) {
                    out.push((
                        2,
                        format!(
                            "{}: the primary's application runs read-only: users cannot write; restart it (it reads its flag at startup)",
                            p.node
                        ),
                    ));
                }
            }
            for &s in &r.standbys {
                let n = reachable[s];
                if n.application
                    .as_ref()
                    .is_some_and(|a| a.writable == Some(true))
                {
                    out.push((
                        2,
                        format!(
                            "{}: the standby's application accepts writes: they are lost at the next cycle; restart it read-only",
                            n.node
                        ),
                    ));
                }
            }
        }
        Err(e @ RoleError::NoStandby { .. }) => out.push((1, e.to_string())),
        Err(e) if nodes.iter().any(|n| !n.reachable) && matches!(e, RoleError::NoPrimary(_)) => {
            let _ = e;
        }
        // Its own "CRITICAL: " would be said twice.
        Err(e) => out.push((2, e.to_string().trim_start_matches("CRITICAL: ").into())),
    }
    out
}

pub fn status(cli: &Cli, log: &Log) -> Result<Exit> {
    let config = super::load_config(cli, log)?;
    let nodes = roles::gather(&config);
    let problems = problems(&config, &nodes, Duration::from_secs(26 * 3600));
    if cli.global.json {
        let v = serde_json::json!({
            "cluster": config.cluster_name,
            "nodes": nodes,
            "warnings": problems.iter().map(|(_, p)| p).collect::<Vec<_>>(),
        });
        output::stdout(&format!("{}\n", serde_json::to_string_pretty(&v)?));
        return Ok(Exit::Ok);
    }
    let mut s = String::new();
    for n in &nodes {
        if !n.reachable {
            s += &format!(
                "{:<10} UNREACHABLE  {}\n",
                n.node,
                n.error.as_deref().unwrap_or("")
            );
            continue;
        }
        let role = n.role.map(|r| r.to_string()).unwrap_or_else(|| "?".into());
        let yesno = |b: Option<bool>, y: &str, no: &str| match b {
            Some(true) => y.to_string(),
            Some(false) => no.to_string(),
            None => "-".to_string(),
        };
        let last = match &n.last_cycle {
            Some(c) => format!(
                "last cycle {} {} ({}, {:.0} s, {})",
                c.outcome,
                age_secs(&c.ended).map(human_age).unwrap_or_default(),
                c.ended,
                c.phases.iter().map(|p| p.secs).sum::<f64>(),
                hasync::sync::plan::human_bytes(c.bytes)
            ),
            None => "no cycle yet".into(),
        };
        let app = match &n.application {
            Some(a) => a.describe(),
            None => "-".into(),
        };
        let run = match n.activity.as_ref() {
            Some(a) => format!(
                " [{}, {}]",
                a.step
                    .as_ref()
                    .map(|s| s.step.as_str())
                    .unwrap_or("a run holds the lock"),
                a.holder
            ),
            None => String::new(),
        };
        s += &format!(
            "{:<10} {:<8} epoch {:<3} app {:<13} db {:<10} {}{}{run}\n",
            n.node,
            role,
            n.epoch.unwrap_or(0),
            app,
            yesno(n.db_read_only, "read-only", "writable"),
            last,
            if n.has_record {
                ""
            } else {
                " [no state record yet: role from the config]"
            }
        );
    }
    for (sev, p) in &problems {
        s += &format!("{}: {p}\n", if *sev >= 2 { "CRITICAL" } else { "WARNING" });
    }
    output::stdout(&s);
    Ok(Exit::Ok)
}

pub fn check(cli: &Cli, args: &CheckArgs, log: &Log) -> Result<Exit> {
    let config = match hasync::config::load(&cli.global.config) {
        Ok(c) => c,
        Err(e) => {
            output::stdout(&format!(
                "HASYNC UNKNOWN - cannot read the config: {}\n",
                e.to_string().lines().next().unwrap_or("")
            ));
            return Ok(Exit::Plugin(3));
        }
    };
    let _ = log;
    let nodes = roles::gather(&config);
    if nodes.iter().all(|n| !n.reachable) {
        output::stdout("HASYNC UNKNOWN - no node reachable\n");
        return Ok(Exit::Plugin(3));
    }
    let problems = problems(&config, &nodes, args.max_age);
    let worst = problems.iter().map(|p| p.0).max().unwrap_or(0);
    let label = ["OK", "WARNING", "CRITICAL", "UNKNOWN"][worst as usize];
    let primary = nodes
        .iter()
        .filter(|n| n.role == Some(NodeRole::Primary))
        .max_by_key(|n| n.epoch);
    let standby_ok = nodes
        .iter()
        .filter(|n| n.role == Some(NodeRole::Standby))
        .filter_map(|n| n.last_ok.as_ref())
        .max_by(|a, b| a.ended.cmp(&b.ended));
    let summary = match (primary, standby_ok) {
        (Some(p), Some(c)) => format!(
            "{} primary (epoch {}), last successful cycle {} ({:.0} s)",
            p.node,
            p.epoch.unwrap_or(0),
            age_secs(&c.ended).map(human_age).unwrap_or_default(),
            c.phases.iter().map(|p| p.secs).sum::<f64>()
        ),
        (Some(p), None) => format!(
            "{} primary (epoch {}), no successful cycle",
            p.node,
            p.epoch.unwrap_or(0)
        ),
        _ => "no primary".into(),
    };
    let detail = if problems.is_empty() {
        summary
    } else {
        format!(
            "{}; {summary}",
            problems
                .iter()
                .map(|p| p.1.as_str())
                .collect::<Vec<_>>()
                .join("; ")
        )
    };
    let max = args.max_age.as_secs();
    let perf = match standby_ok {
        Some(c) => format!(
            "age={:.0}s;{max};{max} duration={:.1}s bytes={}B outage={:.1}s epoch={}",
            age_secs(&c.ended).unwrap_or(0.0),
            c.phases.iter().map(|p| p.secs).sum::<f64>(),
            c.bytes,
            c.outage_secs.unwrap_or(0.0),
            primary.and_then(|p| p.epoch).unwrap_or(0)
        ),
        None => format!("epoch={}", primary.and_then(|p| p.epoch).unwrap_or(0)),
    };
    output::stdout(&format!("HASYNC {label} - {detail} | {perf}\n"));
    if let Some(path) = &args.prom_file {
        write_prom(path, &config, &nodes)?;
    }
    Ok(Exit::Plugin(worst))
}

fn write_prom(path: &std::path::Path, config: &Config, nodes: &[NodeStatus]) -> Result<()> {
    let c = &config.cluster_name;
    let mut s = String::new();
    let mut metric = |name: &str, help: &str, kind: &str, lines: Vec<String>| {
        s += &format!("# HELP {name} {help}\n# TYPE {name} {kind}\n");
        for l in lines {
            s += &format!("{name}{l}\n");
        }
    };
    let per = |f: &dyn Fn(&NodeStatus) -> Option<String>| -> Vec<String> {
        nodes
            .iter()
            .filter_map(|n| f(n).map(|v| format!("{{cluster=\"{c}\",node=\"{}\"}} {v}", n.node)))
            .collect()
    };
    metric(
        "hasync_up",
        "1 if hasync could reach the node and read its state",
        "gauge",
        per(&|n| {
            Some(if n.record.is_some() {
                "1".into()
            } else {
                "0".into()
            })
        }),
    );
    metric(
        "hasync_last_success_timestamp_seconds",
        "end of the last successful cycle recorded on the node",
        "gauge",
        per(&|n| {
            n.last_ok
                .as_ref()
                .and_then(|c| chrono::DateTime::parse_from_rfc3339(&c.ended).ok())
                .map(|t| t.timestamp().to_string())
        }),
    );
    metric(
        "hasync_last_cycle_duration_seconds",
        "duration of the last cycle",
        "gauge",
        per(&|n| {
            n.last_cycle
                .as_ref()
                .map(|c| format!("{:.3}", c.phases.iter().map(|p| p.secs).sum::<f64>()))
        }),
    );
    metric(
        "hasync_last_cycle_bytes",
        "bytes copied by the last cycle (files and dump)",
        "gauge",
        per(&|n| n.last_cycle.as_ref().map(|c| c.bytes.to_string())),
    );
    metric(
        "hasync_last_cycle_outage_seconds",
        "how long the primary's service was down in the last cycle",
        "gauge",
        per(&|n| {
            n.last_cycle
                .as_ref()
                .and_then(|c| c.outage_secs)
                .map(|o| format!("{o:.3}"))
        }),
    );
    metric(
        "hasync_last_cycle_ok",
        "1 if the last cycle ended ok",
        "gauge",
        per(&|n| {
            n.last_cycle.as_ref().map(|c| {
                if c.outcome == "ok" {
                    "1".into()
                } else {
                    "0".into()
                }
            })
        }),
    );
    metric(
        "hasync_epoch",
        "the node's epoch",
        "gauge",
        per(&|n| n.epoch.map(|e| e.to_string())),
    );
    let roles_lines: Vec<String> = nodes
        .iter()
        .filter_map(|n| {
            n.role.map(|r| {
                ["primary", "standby", "fenced"]
                    .iter()
                    .map(|x| {
                        format!(
                            "{{cluster=\"{c}\",node=\"{}\",role=\"{x}\"}} {}",
                            n.node,
                            u8::from(r.to_string() == *x)
                        )
                    })
                    .collect::<Vec<_>>()
            })
        })
        .flatten()
        .collect();
    metric(
        "hasync_role",
        "1 for the node's current role",
        "gauge",
        roles_lines,
    );
    metric(
        "hasync_cycle_failures_total",
        "cycles that did not end ok",
        "counter",
        per(&|n| n.record.as_ref().map(|r| r.failures_total.to_string())),
    );
    let tmp = path.with_extension("prom.tmp");
    let mut f = std::fs::File::create(&tmp).map_err(|e| anyhow!("{}: {e}", tmp.display()))?;
    f.write_all(s.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).map_err(|e| anyhow!("{}: {e}", path.display()))?;
    Ok(())
}

pub fn promote(cli: &Cli, args: &PromoteArgs, log: &Log) -> Result<Exit> {
    let config = super::load_config(cli, log)?;
    let nodes = roles::gather(&config);
    let find = |name: &str| nodes.iter().position(|n| n.node == name);
    let target = match &args.node {
        Some(name) => find(name)
            .ok_or_else(|| anyhow!("no node named {name:?} in {}", config.path.display()))?,
        None => {
            let standbys: Vec<usize> = (0..nodes.len())
                .filter(|&i| nodes[i].role == Some(NodeRole::Standby))
                .collect();
            match standbys.as_slice() {
                [one] => *one,
                [] => bail!("no reachable standby to promote; name the node: hasync promote NODE"),
                _ => bail!("several standbys: name the one to promote: hasync promote NODE"),
            }
        }
    };
    let t = &nodes[target];
    let tnode = &config.nodes[target];
    if !t.reachable {
        bail!(
            "cannot promote {}: it is not reachable ({})",
            t.node,
            t.error.as_deref().unwrap_or("?")
        );
    }
    let Some(trec) = t.record.clone() else {
        bail!(
            "cannot promote {}: its state could not be read ({})",
            t.node,
            t.error.as_deref().unwrap_or("?")
        );
    };
    let others: Vec<usize> = (0..nodes.len()).filter(|&i| i != target).collect();
    // Refusals (--force overrides).
    let mut refusals = Vec::new();
    match trec.role {
        NodeRole::Primary => bail!("{} is already the primary (epoch {})", t.node, trec.epoch),
        NodeRole::Fenced => refusals.push(format!(
            "{} is fenced (an old primary): `hasync rejoin {}` first",
            t.node, t.node
        )),
        NodeRole::Standby => {}
    }
    for &i in &others {
        let o = &nodes[i];
        if o.reachable && o.role == Some(NodeRole::Primary) && o.service_running == Some(true) {
            refusals.push(format!(
                "the primary {} is reachable and its service runs: that is a switchover (`hasync switchover`), not a failover",
                o.node
            ));
        }
    }
    match (&trec.last_cycle, trec.last_ok()) {
        (Some(c), _) if c.outcome != "ok" => refusals.push(format!(
            "{}'s last cycle {} ({}): its copy may be incomplete",
            t.node,
            c.outcome,
            c.reason.as_deref().unwrap_or("")
        )),
        (_, None) => refusals.push(format!(
            "{} never completed a cycle: its copy may be empty",
            t.node
        )),
        (_, Some(c)) => {
            let age = age_secs(&c.ended).unwrap_or(f64::MAX);
            if age > args.max_age.as_secs_f64() {
                refusals.push(format!(
                    "{}'s last successful cycle was {}, older than --max-age {}",
                    t.node,
                    human_age(age),
                    hasync::config::duration::format_duration(args.max_age)
                ));
            }
        }
    }
    if !refusals.is_empty() && !args.force {
        bail!(
            "not promoting {}: {}; add --force to promote anyway",
            t.node,
            refusals.join("; ")
        );
    }
    let new_epoch = nodes.iter().filter_map(|n| n.epoch).max().unwrap_or(1) + 1;
    let old_primaries: Vec<usize> = others
        .iter()
        .copied()
        .filter(|&i| nodes[i].role == Some(NodeRole::Primary) || !nodes[i].reachable)
        .collect();
    if args.dry_run {
        let mut s = format!("would promote {} to primary at epoch {new_epoch}\n", t.node);
        for r in &refusals {
            s += &format!("  (--force overrides: {r})\n");
        }
        if let Some(h) = &config.hooks.pre_promote {
            s += &format!("  run pre_promote {} (non-zero aborts)\n", h.display());
        }
        s += &format!(
            "  [{}] state record: role primary, epoch {new_epoch}\n",
            t.node
        );
        for &i in &old_primaries {
            let o = &nodes[i];
            if o.reachable {
                s += &format!("  [{}] stop the service, run readonly_sql, state record: fenced at epoch {new_epoch}\n", o.node);
            } else {
                s += &format!("  [{}] unreachable: it will be fenced when it is seen again (any cycle refuses it)\n", o.node);
            }
        }
        // In the order it runs: the application reads its read-only flag
        // at startup, so it is stopped before the SQL and started after.
        let svc = tnode.service.as_ref();
        if let Some(svc) = svc {
            s += &format!("  [{}] stop: {}\n", t.node, svc.stop);
        }
        if let Some(db) = &tnode.database {
            for q in &db.readwrite_sql {
                s += &format!("  [{}] readwrite_sql: {q}\n", t.node);
            }
        }
        if let Some(svc) = svc {
            s += &format!("  [{}] start: {}\n", t.node, svc.start);
            match &svc.writable_check {
                Some(w) => s += &format!(
                    "  [{}] wait until its writable_check says it accepts writes: {w}\n",
                    t.node
                ),
                None => s += &format!(
                    "  [{}] (no writable_check: whether the application accepts writes is not checked)\n",
                    t.node
                ),
            }
        }
        if let Some(h) = &config.hooks.post_promote {
            s += &format!("  run post_promote {}\n", h.display());
        }
        s += "dry run: nothing was changed\n";
        output::stdout(&s);
        return Ok(Exit::Ok);
    }
    if !refusals.is_empty() {
        log.warn(&format!(
            "--force: promoting despite: {}",
            refusals.join("; ")
        ));
    }
    let tt = transport::connect(&tnode.endpoint).map_err(|e| anyhow!("{e}"))?;
    // Not while a cycle copies into it (a forced promote of a standby whose
    // primary is alive): the cycle would go on writing into the new primary.
    let mut lock = hasync::lock::acquire(&[(tnode, &*tt)], &hasync::lock::Holder::me())
        .map_err(|e| anyhow!("{e}; nothing was changed"))?;
    promote_hook(&config, true, &t.node, new_epoch, "pre")
        .map_err(|e| anyhow!("pre_promote refused the promote: {e}; nothing was changed"))?;
    // The epoch first: from now on the old primary can never sync onto it.
    let mut rec = state::read_or_initial(&*tt, tnode)?;
    rec.change_role(NodeRole::Primary, new_epoch, "promote");
    state::write(&*tt, tnode, &rec)?;
    log.info(&format!("{}: primary at epoch {new_epoch}", t.node));
    // The application reads its read-only flag at startup (OpenKM does):
    // the standby's runs read-only whatever the flag says now, and an LSB
    // `start` of a running service does nothing. So: stop it, make the
    // database writable while it is down, start it, and (with a
    // writable_check) wait until it says it accepts writes.
    let step = |lock: &mut hasync::lock::CycleLock, what: &str, down: bool| {
        use hasync::lock::{ServiceStep, Step};
        lock.announce(
            &t.node,
            &Step {
                step: format!("promote: {what}"),
                service: if down {
                    ServiceStep::Down
                } else {
                    ServiceStep::Starting
                },
            },
        );
    };
    let manual = |what: &str| {
        let svc = tnode.service.as_ref();
        format!(
            "{} is primary (epoch {new_epoch}) but {what}; by hand: {}run readwrite_sql on its database, then {}",
            t.node,
            svc.map(|s| format!("`{}`, ", s.stop)).unwrap_or_default(),
            svc.map(|s| format!("`{}`", s.start)).unwrap_or_else(|| "start the application".into()),
        )
    };
    // The old primary is fenced before the new one takes writes: a forced
    // promote while it still runs would otherwise leave two writable
    // primaries (a load balancer sends users to both) until the fence.
    for &i in &old_primaries {
        let o = &config.nodes[i];
        if !nodes[i].reachable {
            log.warn(&format!(
                "{}: unreachable, not fenced now; any cycle run from or to it refuses and fences it when it is back",
                o.name
            ));
            continue;
        }
        match fence(o, new_epoch, &t.node) {
            Ok(()) => log.info(&format!("{}: fenced (service stopped, read-only)", o.name)),
            Err(e) => log.warn(&format!("{}: could not fence it: {e}", o.name)),
        }
    }
    step(&mut lock, "stopping the read-only application", true);
    hasync::service::stop(&*tt, tnode)
        .map_err(|e| anyhow!("{e}; {}", manual("its application still runs read-only")))?;
    if let Some(db) = &tnode.database {
        step(&mut lock, "readwrite_sql", true);
        hasync::db::replicate::run_on_live(&*tt, tnode, &db.readwrite_sql).map_err(|e| {
            anyhow!(
                "readwrite_sql: {e}; {}",
                manual("its database may still be read-only and its application is stopped")
            )
        })?;
        log.info(&format!("{}: readwrite_sql done", t.node));
    }
    step(&mut lock, "starting the application writable", false);
    hasync::service::start(&*tt, tnode, hasync::service::Mode::Writable).map_err(|e| {
        anyhow!(
            "{e}; {} is primary (epoch {new_epoch}) but its application is not up writable",
            t.node
        )
    })?;
    log.info(&format!(
        "{}: application restarted writable{}",
        t.node,
        if tnode
            .service
            .as_ref()
            .is_some_and(|s| s.writable_check.is_some())
        {
            " (its writable_check says it accepts writes)"
        } else {
            ""
        }
    ));
    if let Err(e) = promote_hook(&config, false, &t.node, new_epoch, "ok") {
        log.warn(&format!("post_promote: {e}"));
    }
    log.info(&format!(
        "{} is the primary now (epoch {new_epoch})",
        t.node
    ));
    Ok(Exit::Ok)
}

/// Run the pre_promote (`pre`) or post_promote hook, if configured, for
/// `node` becoming the primary at `epoch` (promote and switchover).
pub fn promote_hook(
    config: &Config,
    pre: bool,
    node: &str,
    epoch: u64,
    outcome: &str,
) -> Result<(), String> {
    let hook = if pre {
        &config.hooks.pre_promote
    } else {
        &config.hooks.post_promote
    };
    let Some(h) = hook else {
        return Ok(());
    };
    let env = [
        ("HASYNC_NODE", node.to_string()),
        ("HASYNC_EPOCH", epoch.to_string()),
        ("HASYNC_OUTCOME", outcome.to_string()),
        ("HASYNC_CLUSTER", config.cluster_name.clone()),
    ]
    .map(|(k, v)| (k.to_string(), v));
    let json = serde_json::json!({"node": node, "epoch": epoch, "outcome": outcome});
    hasync::hooks::run(h, &env, &json.to_string())
}

fn fence(node: &Node, epoch: u64, by: &str) -> Result<()> {
    let t = transport::connect(&node.endpoint)?;
    hasync::service::stop(&*t, node)?;
    if let Some(db) = &node.database {
        hasync::db::replicate::run_on_live(&*t, node, &db.readonly_sql)?;
    }
    let mut rec = state::read_or_initial(&*t, node)?;
    rec.change_role(
        NodeRole::Fenced,
        epoch,
        &format!("fenced by the promote of {by}"),
    );
    state::write(&*t, node, &rec)?;
    Ok(())
}
