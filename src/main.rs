//! The `hasync` binary: parse the command line, run one command, map the
//! outcome to an exit code. Everything else lives in the library or in
//! `commands/`, one file per subcommand.

mod cli;
mod commands;
mod exit;
mod output;
mod progress;

use std::process::ExitCode;

use clap::Parser;

use crate::exit::Exit;

fn main() -> ExitCode {
    let cli = match cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // --help and --version are not errors; clap knows which is which.
            let _ = e.print();
            return if e.use_stderr() {
                Exit::Usage.into()
            } else {
                Exit::Ok.into()
            };
        }
    };
    let log = output::Log::new(cli.global.verbose, cli.global.quiet);
    match commands::run(&cli, &log) {
        Ok(exit) => exit.into(),
        Err(e) => {
            let exit = commands::classify(&e);
            log.error(&format!("{e:#}"));
            exit.into()
        }
    }
}
