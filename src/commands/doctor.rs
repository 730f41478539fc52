//! `hasync doctor`: print the per-node checklist the library computes.

use anyhow::Result;
use hasync::doctor::{self, Status};

use crate::cli::Cli;
use crate::exit::Exit;
use crate::output::{self, Log};

pub fn run(cli: &Cli, log: &Log) -> Result<Exit> {
    let config = super::load_config(cli, log)?;
    let report = doctor::run(&config);
    if cli.global.json {
        output::stdout(&format!("{}\n", serde_json::to_string_pretty(&report)?));
    } else {
        let mut s = String::new();
        let db = match &config.database {
            Some(d) => format!(", database {} {}", d.engine, d.name),
            None => ", files only".to_string(),
        };
        s.push_str(&format!(
            "config {}: valid ({} nodes{db})\n",
            config.path.display(),
            config.nodes.len()
        ));
        let width = report
            .nodes
            .iter()
            .flat_map(|n| &n.checks)
            .map(|c| c.name.len())
            .max()
            .unwrap_or(0);
        for n in &report.nodes {
            s.push_str(&format!("\n{} {} ({})\n", n.node, n.address, n.role));
            for c in &n.checks {
                let mark = match c.status {
                    Status::Ok => "[ ok ]",
                    Status::Warn => "[warn]",
                    Status::Fail => "[FAIL]",
                    Status::Skip => "[skip]",
                };
                s.push_str(&format!("  {mark} {:<width$}  {}\n", c.name, c.detail));
                if let Some(fix) = &c.fix {
                    s.push_str(&format!("  {:6} {:<width$}  fix: {fix}\n", "", ""));
                }
            }
        }
        let failed: Vec<String> = report
            .nodes
            .iter()
            .filter_map(|n| {
                let k = n.checks.iter().filter(|c| c.status == Status::Fail).count();
                (k > 0).then(|| format!("{} on {}", k, n.node))
            })
            .collect();
        if failed.is_empty() {
            s.push_str("\nall checks passed\n");
        } else {
            s.push_str(&format!("\nchecks failed: {}\n", failed.join(", ")));
        }
        output::stdout(&s);
    }
    Ok(if report.ok() {
        Exit::Ok
    } else {
        Exit::ChecksFailed
    })
}
