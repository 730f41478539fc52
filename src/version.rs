//! The version handshake between hasync and the agent it starts on a node.
//!
//! `hasync agent --version` prints one line that the caller parses. The
//! protocol number changes whenever the wire format does; the two sides must
//! agree on it exactly. The package version is shown so a mismatch message can
//! say which binary to install.

/// The package version of this binary.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The agent wire protocol version.
pub const PROTOCOL: u32 = 4;

/// The line `hasync agent --version` prints.
pub fn agent_version_line() -> String {
    format!("hasync-agent {VERSION} protocol {PROTOCOL}")
}

/// Parse an agent's version line into (package version, protocol).
pub fn parse_agent_version_line(line: &str) -> Option<(String, u32)> {
    let mut it = line.split_whitespace();
    if it.next()? != "hasync-agent" {
        return None;
    }
    let version = it.next()?.to_string();
    if it.next()? != "protocol" {
        return None;
    }
    let protocol = it.next()?.parse().ok()?;
    Some((version, protocol))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let (v, p) = parse_agent_version_line(&agent_version_line()).unwrap();
        assert_eq!(v, VERSION);
        assert_eq!(p, PROTOCOL);
        assert!(parse_agent_version_line("bash: hasync: command not found").is_none());
    }
}
