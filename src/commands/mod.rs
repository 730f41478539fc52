//! One file per subcommand. Each takes the parsed CLI, calls the library, and
//! prints; none holds logic an engine should own.

mod agent;
mod cycle;
mod docs;
mod doctor;
mod health;
mod init;
mod rejoin;
mod roles;
mod schedule;
pub mod sync;

use anyhow::Result;
use hasync::config::{Config, ConfigErrors};

use crate::cli::{Cli, Command};
use crate::exit::Exit;
use crate::output::Log;

pub fn run(cli: &Cli, log: &Log) -> Result<Exit> {
    match &cli.command {
        Command::Init(args) => init::run(cli, args, log),
        Command::Doctor => doctor::run(cli, log),
        Command::Sync(args) => sync::run(cli, args, log),
        Command::Completions(args) => docs::completions(args),
        Command::Man(args) => docs::man(args, log),
        Command::Schedule(args) => schedule::run(cli, args, log),
        Command::Status(_) => roles::status(cli, log),
        Command::Check(args) => roles::check(cli, args, log),
        Command::Promote(args) => roles::promote(cli, args, log),
        Command::Switchover(args) => cycle::switchover(cli, args, log),
        Command::Rejoin(args) => rejoin::run(cli, args, log),
        Command::HealthServer(args) => health::run(cli, args, log),
        Command::Agent(args) => agent::run(args),
    }
}

/// The exit code an error maps to.
pub fn classify(e: &anyhow::Error) -> Exit {
    if e.downcast_ref::<ConfigErrors>().is_some() {
        Exit::Config
    } else {
        Exit::Failure
    }
}

/// Load and validate the config named on the command line, printing its
/// warnings.
pub fn load_config(cli: &Cli, log: &Log) -> Result<Config> {
    let config = hasync::config::load(&cli.global.config)?;
    for w in &config.warnings {
        log.warn(w);
    }
    Ok(config)
}
