//! `hasync agent`: the remote side of a replication, started over SSH.

use anyhow::Result;

use crate::cli::AgentArgs;
use crate::exit::Exit;
use crate::output;

pub fn run(args: &AgentArgs) -> Result<Exit> {
    if args.print_version {
        output::stdout(&format!("{}\n", hasync::version::agent_version_line()));
        return Ok(Exit::Ok);
    }
    // stdin/stdout carry the protocol; stderr reaches the caller's error messages.
    hasync::agent::serve(
        std::io::stdin().lock(),
        std::io::stdout().lock(),
        args.root.as_deref(),
    )?;
    Ok(Exit::Ok)
}
