//! The command line, as clap sees it. Nothing here runs anything: `main`
//! turns these types into calls on the library's engines, which never see
//! clap. Man pages and completions are generated from this definition.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Keep a warm standby of a document-management server.
///
/// hasync replicates an application's file tree and database (MySQL/MariaDB or
/// PostgreSQL) from the primary node to a standby over SSH, keeps the standby
/// read-only, and swaps the roles when the primary dies. Start with `hasync
/// init` to write an annotated configuration, then `hasync doctor` to check
/// both nodes.
#[derive(Debug, Parser)]
#[command(
    name = "hasync",
    version,
    propagate_version = false,
    max_term_width = 100
)]
#[command(after_long_help = crate::exit::help_text())]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// The configuration file.
    #[arg(
        short = 'c',
        long,
        global = true,
        value_name = "FILE",
        env = "HASYNC_CONFIG",
        default_value = hasync::config::DEFAULT_CONFIG_PATH
    )]
    pub config: PathBuf,
    /// More detail on stderr (repeat for more).
    #[arg(short = 'v', long, global = true, action = clap::ArgAction::Count, conflicts_with = "quiet")]
    pub verbose: u8,
    /// Less on stderr: only warnings and errors (repeat for errors only).
    #[arg(short = 'q', long, global = true, action = clap::ArgAction::Count)]
    pub quiet: u8,
    /// Print data as JSON on stdout (for scripts and monitoring).
    #[arg(long, global = true)]
    pub json: bool,
    /// No progress bars, even on a terminal.
    #[arg(long, global = true)]
    pub no_progress: bool,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Write an annotated configuration file to start from (never overwrites).
    Init(InitArgs),
    /// Check every node: SSH, host key, root, agent, service, database, state dir.
    ///
    /// Prints a checklist per node and exits 4 if anything a replication cycle
    /// needs is missing, with what to do about it.
    Doctor,
    /// Replicate the primary to its standbys: the whole cycle, or one part of it.
    ///
    /// Without --files-only or --db-only, one cycle: preflight, lock, a warm
    /// file pass while the services run, stop the standbys' services then the
    /// primary's, a final file pass, the database, start the primary (health)
    /// then the standbys, record the outcome in each node's state record, run
    /// the on_success / on_failure hook. Whatever it stopped it starts again,
    /// on errors and on SIGINT / SIGTERM (a second signal aborts at once). The
    /// direction comes from the nodes' state records (roles and epochs).
    ///
    /// --files-only makes each standby's root equal to the primary's, minus
    /// [files] exclude patterns, with rsync-style delta transfers. Files are
    /// written to a temporary name, verified by hash and renamed, so an
    /// interrupted run never leaves a half-written file under a real name.
    /// The next run removes the leftover temporary files and restores the
    /// times of their directories; the root directory's mode, owner and
    /// mtime are replicated like any directory's.
    ///
    /// --db-only dumps the primary's database (mariadb-dump/mysqldump
    /// --single-transaction, or pg_dump) and streams it into NAME__hasync_new
    /// on the standby, never into the live database. It then checks that the
    /// copy has the primary's tables, views, routines, triggers and events and
    /// exactly the rows of the dump's snapshot, runs readonly_sql there, and
    /// swaps it in atomically; the previous copy stays as NAME__hasync_old
    /// until the next swap. Any failure leaves the live database untouched.
    /// Passwords reach the vendor tools in 0600 files, never on a command line.
    Sync(SyncArgs),
    /// One line per node: role, epoch, reachable, service, database read-only, last cycle.
    ///
    /// Reads every node's state record over SSH. Unreachable nodes are shown,
    /// not fatal. Warns about two primaries, an old primary, epoch mismatches
    /// and a stale standby.
    Status(StatusArgs),
    /// A Nagios / Icinga plugin: one status line with perfdata, and Prometheus metrics.
    ///
    /// Exit codes are the plugin's own: 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN.
    /// CRITICAL: no primary, two primaries, an old primary back, the primary
    /// unreachable, or no successful cycle within --max-age. WARNING: the last
    /// cycle failed, a standby unreachable or fenced, a service down.
    /// --prom-file writes node_exporter text-file metrics atomically.
    Check(CheckArgs),
    /// Make a standby the primary (failover), and fence the old primary.
    ///
    /// Runs the pre_promote hook (non-zero aborts), raises the epoch in the
    /// node's state record (from then on the old primary can never sync onto
    /// it), runs readwrite_sql, starts the service and waits for health; then,
    /// if the old primary can be reached, stops its service, runs
    /// readonly_sql there and marks it fenced; then runs post_promote.
    /// Refused without --force when the old primary is reachable and its
    /// service runs (that is a switchover), or when the standby's last cycle
    /// failed or is older than --max-age. Never while a cycle holds the
    /// standby's lock, even with --force.
    Promote(PromoteArgs),
    /// Planned, lossless role swap: the standby becomes the primary.
    ///
    /// Runs a whole cycle (warm pass, both services stopped, final file pass,
    /// database copied, staged, verified and swapped), then swaps the roles:
    /// readwrite_sql on the standby's database, its state record says primary
    /// at a new epoch (the point of no return), the old primary's says standby
    /// at that epoch and readonly_sql runs on its database; the new primary
    /// starts first, then the old one. A failure before the swap leaves the
    /// old primary the primary and starts it writable again. pre_promote runs
    /// first (non-zero aborts, nothing stopped), post_promote after.
    Switchover(SwitchoverArgs),
    /// Turn a fenced old primary into a standby of the current primary.
    ///
    /// Stops the node's service and runs readonly_sql there, then sets aside
    /// what it holds that the next cycle would replace: every file a copy from
    /// the primary would overwrite or delete, and a dump of its live database,
    /// into state_dir/quarantine/TIMESTAMP/ on the node (with a README listing
    /// them). Then its state record says standby at the primary's epoch; the
    /// next `hasync sync` makes it an exact mirror and starts it.
    Rejoin(RejoinArgs),
    /// Serve /primary, /standby and /health over HTTP for a load balancer.
    ///
    /// Runs on a node (in the foreground, for systemd) and answers what users
    /// get from it: /primary is 200 only while the node's state record says
    /// primary AND its application is up (its status command exits 0, its
    /// health_url answers 2xx) AND, with a writable_check, accepts writes;
    /// /standby likewise for a standby running read-only. While a cycle or a
    /// role change has the node's service stopped (from just before the stop
    /// until it is started again) both answer 503 with the step in the body
    /// ("cycle: final file pass"), so a load balancer can send users to a
    /// backup server or a maintenance page. /health gives the same as JSON
    /// (200 while the application is up). HAProxy:
    /// templates/haproxy-hasync.cfg.
    HealthServer(HealthArgs),
    /// Run cycles on the [schedule] cron line, in the foreground (for systemd).
    ///
    /// Fires `hasync sync` cycles at the times of the crontab(5) line in
    /// [schedule] cron, one at a time (a cycle that runs past the next time
    /// skips it), and logs each outcome. SIGTERM between cycles stops it
    /// cleanly (exit 0); during a cycle, the cycle restarts what it stopped
    /// first. With --next N it only prints the next N times.
    Schedule(ScheduleArgs),
    /// Print a shell completion script on stdout.
    Completions(CompletionsArgs),
    /// Write the man pages into a directory.
    Man(ManArgs),
    /// The remote side of a replication, started by hasync over SSH.
    #[command(hide = true)]
    Agent(AgentArgs),
}

#[derive(Debug, Args)]
pub struct InitArgs {
    /// Print the template on stdout instead of writing the config file.
    #[arg(long)]
    pub stdout: bool,
}

#[derive(Debug, Args)]
pub struct SyncArgs {
    /// Replicate only the file tree.
    #[arg(long, conflicts_with = "db_only")]
    pub files_only: bool,
    /// Replicate only the database: stage, verify, mark read-only, swap.
    #[arg(long)]
    pub db_only: bool,
    /// Show what would change (itemized, like rsync -n -i) and change nothing.
    #[arg(short = 'n', long)]
    pub dry_run: bool,
    /// Compare file contents by hash instead of size and modification time.
    #[arg(long)]
    pub checksum: bool,
    /// Allow this many deletions this time (overrides [files] max_delete).
    #[arg(long, value_name = "N")]
    pub max_delete: Option<u64>,
    /// Only this standby (default: every standby).
    #[arg(long, value_name = "NODE")]
    pub to: Option<String>,
}

fn duration(s: &str) -> Result<std::time::Duration, String> {
    hasync::config::duration::parse_duration(s).map_err(|e| e.to_string())
}

#[derive(Debug, Args)]
pub struct StatusArgs {}

#[derive(Debug, Args)]
pub struct HealthArgs {
    /// Address and port to listen on.
    #[arg(long, value_name = "ADDR:PORT")]
    pub listen: std::net::SocketAddr,
    /// The node this runs on (default: the one with address = "local").
    #[arg(long, value_name = "NODE")]
    pub node: Option<String>,
    /// How long an answer about the application is reused, so that a
    /// check every few hundred ms does not run the probes each time.
    #[arg(long, value_name = "TIME", default_value = "1s", value_parser = duration)]
    pub probe_cache: std::time::Duration,
    /// How long the probes (status, health_url, writable_check) may take
    /// together; a probe that has not answered by then counts as down.
    #[arg(long, value_name = "TIME", default_value = "2s", value_parser = duration)]
    pub probe_timeout: std::time::Duration,
}

#[derive(Debug, Args)]
pub struct SwitchoverArgs {
    /// Show the plan (the cycle's, then the swap) and change nothing.
    #[arg(short = 'n', long)]
    pub dry_run: bool,
    /// The standby that becomes the primary (default: the only standby).
    #[arg(long, value_name = "NODE")]
    pub to: Option<String>,
}

#[derive(Debug, Args)]
pub struct RejoinArgs {
    /// The old primary (fenced) to make a standby.
    pub node: String,
    /// Show what would be quarantined and changed, and change nothing.
    #[arg(short = 'n', long)]
    pub dry_run: bool,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// CRITICAL when the standby's last successful cycle is older than this.
    #[arg(long, value_name = "AGE", default_value = "26h", value_parser = duration)]
    pub max_age: std::time::Duration,
    /// Also write Prometheus text-file metrics here (atomically).
    #[arg(long, value_name = "PATH")]
    pub prom_file: Option<std::path::PathBuf>,
}

#[derive(Debug, Args)]
pub struct PromoteArgs {
    /// The standby to promote (default: the only standby).
    pub node: Option<String>,
    /// Show what would be done and change nothing.
    #[arg(short = 'n', long)]
    pub dry_run: bool,
    /// Promote even if the old primary is up or the standby is stale.
    #[arg(long)]
    pub force: bool,
    /// Refuse (without --force) when the standby's last successful cycle is older.
    #[arg(long, value_name = "AGE", default_value = "26h", value_parser = duration)]
    pub max_age: std::time::Duration,
}

#[derive(Debug, Args)]
pub struct ScheduleArgs {
    /// Print the next N run times and exit.
    #[arg(long, value_name = "N")]
    pub next: Option<usize>,
}

#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell to complete for.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

#[derive(Debug, Args)]
pub struct ManArgs {
    /// Where to write hasync.1 and one page per subcommand.
    #[arg(long, value_name = "DIR", default_value = "man")]
    pub out_dir: PathBuf,
}

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// Serve only this root (refuse a session naming another one).
    #[arg(long, value_name = "DIR")]
    pub root: Option<PathBuf>,
    /// This node's state_dir: the agent writes only if the state record
    /// there says standby at the caller's epoch (or there is none yet).
    #[arg(long, value_name = "DIR", default_value = "/var/lib/hasync")]
    pub state_dir: PathBuf,
    /// Print the agent's version and protocol line and exit.
    #[arg(long = "version")]
    pub print_version: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn verify_cli() {
        Cli::command().debug_assert();
    }

    #[test]
    fn config_defaults_to_etc() {
        // HASYNC_CONFIG may be set in a developer's shell; only check when unset.
        if std::env::var_os("HASYNC_CONFIG").is_none() {
            let cli = Cli::try_parse_from(["hasync", "doctor"]).unwrap();
            assert_eq!(cli.global.config, PathBuf::from("/etc/hasync/hasync.toml"));
        }
    }
}
