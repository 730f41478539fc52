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
    // Received files are committed in batches, each holding a descriptor
    // per file until then: allow more than the usual 1024 (this process
    // never uses select(2)).
    raise_fd_limit(16 << 10);
    // stdin/stdout carry the protocol; stderr reaches the caller's error messages.
    hasync::agent::serve(
        std::io::stdin().lock(),
        std::io::stdout().lock(),
        args.root.as_deref(),
        Some(&args.state_dir),
    )?;
    Ok(Exit::Ok)
}

/// Raises the soft limit on open descriptors to `want` (at most the hard
/// limit); failure leaves it as it was (batches are then smaller).
fn raise_fd_limit(want: libc::rlim_t) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid out pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 || lim.rlim_cur >= want {
        return;
    }
    lim.rlim_cur = want.min(lim.rlim_max);
    // SAFETY: a valid rlimit.
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
}
