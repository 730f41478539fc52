//! `hasync agent`: the remote side of a replication, started over SSH.

use anyhow::{bail, Result};

use crate::cli::AgentArgs;
use crate::exit::Exit;
use crate::output;

pub fn run(args: &AgentArgs) -> Result<Exit> {
    if args.print_version {
        output::stdout(&format!("{}\n", hasync::version::agent_version_line()));
        return Ok(Exit::Ok);
    }
    bail!(
        "the agent's file-transfer protocol is not built yet (hasync {}); only `hasync agent --version` works",
        hasync::version::VERSION
    )
}
