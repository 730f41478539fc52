//! Reading OpenSSH `known_hosts` files, for the two things libssh2 does not do
//! for us.
//!
//! The trust decision itself is libssh2's (`KnownHosts::check_port` in
//! [`super::ssh`]). This module answers the questions around it:
//!
//! * **Which host-key algorithms to ask for.** A server offers several host
//!   keys (ed25519, ecdsa, rsa) and the client's preference picks one. If
//!   known_hosts holds the ed25519 key but libssh2 negotiates ecdsa, a trusted
//!   host looks unknown or, worse, changed. Like OpenSSH, we list the
//!   algorithms already known for this host first.
//! * **Whether a mismatch is really a change.** libssh2 compares the presented
//!   key with every entry for the host regardless of its type, so "file has
//!   only ed25519, server presented ecdsa" comes back as a mismatch. We only
//!   call a key *changed* when an entry of the same type disagrees.
//!
//! Matching follows OpenSSH: the name looked up is `host` on port 22 and
//! `[host]:port` otherwise, host fields are comma-separated patterns with `*`,
//! `?` and `!negation`, and hashed entries (`|1|salt|hash`, HMAC-SHA1 of the
//! name keyed with the salt) are supported; the small SHA-1 below exists only
//! for those. `@cert-authority` lines are ignored (hasync does not use host
//! certificates); `@revoked` keys are refused.

use std::path::Path;

use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
use base64::Engine as _;

use super::shell_quote;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Marker {
    None,
    CertAuthority,
    Revoked,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Hosts {
    Patterns(Vec<String>),
    Hashed { salt: Vec<u8>, hash: Vec<u8> },
}

/// One usable line of a known_hosts file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub marker: Marker,
    hosts: Hosts,
    /// e.g. `ssh-ed25519`
    pub key_type: String,
    /// The key blob, base64 as in the file.
    pub key: String,
}

/// Parse a known_hosts file; comments, blank and unparsable lines are skipped
/// (as OpenSSH does).
pub fn parse(contents: &str) -> Vec<Entry> {
    contents.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<Entry> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let mut fields = line.split_whitespace();
    let mut first = fields.next()?;
    let marker = match first {
        "@cert-authority" => Marker::CertAuthority,
        "@revoked" => Marker::Revoked,
        m if m.starts_with('@') => return None,
        _ => Marker::None,
    };
    if marker != Marker::None {
        first = fields.next()?;
    }
    let key_type = fields.next()?;
    let key = fields.next()?;
    // Old SSH1 lines ("host bits exponent modulus") have a number here.
    if key_type.starts_with(|c: char| c.is_ascii_digit()) {
        return None;
    }
    let hosts = match first.strip_prefix("|1|") {
        Some(rest) => {
            let (salt, hash) = rest.split_once('|')?;
            Hosts::Hashed {
                salt: STANDARD.decode(salt).ok()?,
                hash: STANDARD.decode(hash).ok()?,
            }
        }
        None => Hosts::Patterns(first.split(',').map(str::to_ascii_lowercase).collect()),
    };
    Some(Entry {
        marker,
        hosts,
        key_type: key_type.to_string(),
        key: key.to_string(),
    })
}

impl Entry {
    /// Does this entry apply to `name` (as built by [`lookup_name`])?
    pub fn matches(&self, name: &str) -> bool {
        let name = name.to_ascii_lowercase();
        match &self.hosts {
            Hosts::Hashed { salt, hash } => hmac_sha1(salt, name.as_bytes()).as_slice() == hash,
            Hosts::Patterns(patterns) => {
                let mut matched = false;
                for pattern in patterns {
                    match pattern.strip_prefix('!') {
                        // A matching negated pattern vetoes the whole line.
                        Some(negated) if wildcard_match(negated, &name) => return false,
                        Some(_) => {}
                        None => matched |= wildcard_match(pattern, &name),
                    }
                }
                matched
            }
        }
    }
}

/// The name OpenSSH (and ssh-keyscan) records for a host: `host` on port 22,
/// `[host]:port` elsewhere.
pub fn lookup_name(host: &str, port: u16) -> String {
    if port == 22 {
        host.to_string()
    } else {
        format!("[{host}]:{port}")
    }
}

/// Key types recorded (and not revoked) for `name`, in file order, without
/// duplicates.
pub fn key_types_for(entries: &[Entry], name: &str) -> Vec<String> {
    let mut types: Vec<String> = Vec::new();
    for e in entries {
        if e.marker == Marker::None && e.matches(name) && !types.contains(&e.key_type) {
            types.push(e.key_type.clone());
        }
    }
    types
}

/// Is this exact key marked `@revoked` for `name`?
pub fn is_revoked(entries: &[Entry], name: &str, key_b64: &str) -> bool {
    entries
        .iter()
        .any(|e| e.marker == Marker::Revoked && e.key == key_b64 && e.matches(name))
}

/// The signature algorithms that prove possession of a key of `key_type`.
fn algorithms_for(key_type: &str) -> &'static [&'static str] {
    match key_type {
        "ssh-ed25519" => &["ssh-ed25519"],
        "ecdsa-sha2-nistp256" => &["ecdsa-sha2-nistp256"],
        "ecdsa-sha2-nistp384" => &["ecdsa-sha2-nistp384"],
        "ecdsa-sha2-nistp521" => &["ecdsa-sha2-nistp521"],
        "ssh-rsa" => &["rsa-sha2-512", "rsa-sha2-256", "ssh-rsa"],
        "ssh-dss" => &["ssh-dss"],
        _ => &[],
    }
}

/// Host-key algorithm preference for libssh2's `method_pref`: the algorithms
/// of the known key types first, then every other supported one, each group in
/// libssh2's own order (what OpenSSH does). `None` when nothing is known, so
/// libssh2 keeps its default.
pub fn hostkey_preference(known_types: &[String], supported: &[&str]) -> Option<String> {
    let known = |alg: &str| known_types.iter().any(|t| algorithms_for(t).contains(&alg));
    let (first, rest): (Vec<&str>, Vec<&str>) = supported.iter().partition(|alg| known(alg));
    if first.is_empty() {
        return None;
    }
    Some(first.into_iter().chain(rest).collect::<Vec<_>>().join(","))
}

/// The known_hosts key type name for what libssh2 reports.
pub fn key_type_name(kind: ssh2::HostKeyType) -> &'static str {
    use ssh2::HostKeyType::*;
    match kind {
        Rsa => "ssh-rsa",
        Dss => "ssh-dss",
        Ecdsa256 => "ecdsa-sha2-nistp256",
        Ecdsa384 => "ecdsa-sha2-nistp384",
        Ecdsa521 => "ecdsa-sha2-nistp521",
        Ed25519 => "ssh-ed25519",
        Unknown => "unknown",
    }
}

/// `SHA256:<base64 without padding>`, the way OpenSSH prints fingerprints.
pub fn fingerprint(sha256: &[u8]) -> String {
    format!("SHA256:{}", STANDARD_NO_PAD.encode(sha256))
}

/// The key file name part and the `-t` argument of ssh-keyscan.
fn short_type(key_type: &str) -> &str {
    match key_type {
        "ssh-ed25519" => "ed25519",
        "ssh-rsa" => "rsa",
        "ssh-dss" => "dsa",
        t if t.starts_with("ecdsa-") => "ecdsa",
        t => t,
    }
}

/// What to run on the node to see its real fingerprint.
pub fn verify_command(key_type: &str) -> String {
    format!(
        "ssh-keygen -lf /etc/ssh/ssh_host_{}_key.pub",
        short_type(key_type)
    )
}

/// The one command that trusts the node's key (after it was verified).
pub fn trust_command(host: &str, port: u16, key_type: &str, known_hosts: &Path) -> String {
    format!(
        "ssh-keyscan -p {port} -t {} {} >> {}",
        short_type(key_type),
        shell_quote(host),
        shell_quote(&known_hosts.to_string_lossy())
    )
}

/// The command that forgets the node's old keys.
pub fn remove_command(host: &str, port: u16, known_hosts: &Path) -> String {
    format!(
        "ssh-keygen -R {} -f {}",
        shell_quote(&lookup_name(host, port)),
        shell_quote(&known_hosts.to_string_lossy())
    )
}

/// Glob match with `*` and `?`, as in OpenSSH's `match_pattern`.
fn wildcard_match(pattern: &str, s: &str) -> bool {
    let (p, s) = (pattern.as_bytes(), s.as_bytes());
    let (mut pi, mut si) = (0, 0);
    // Where the last `*` was, and where in `s` it is currently matched up to.
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        if pi < p.len() && (p[pi] == b'?' || p[pi] == s[si]) {
            pi += 1;
            si += 1;
        } else if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, si));
            pi += 1;
        } else if let Some((sp, ss)) = star {
            pi = sp + 1;
            si = ss + 1;
            star = Some((sp, ss + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

/// HMAC-SHA1 (RFC 2104), for hashed known_hosts names.
fn hmac_sha1(key: &[u8], msg: &[u8]) -> [u8; 20] {
    let mut block = [0u8; 64];
    if key.len() > 64 {
        block[..20].copy_from_slice(&sha1(&[key]));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let ipad: Vec<u8> = block.iter().map(|b| b ^ 0x36).collect();
    let opad: Vec<u8> = block.iter().map(|b| b ^ 0x5c).collect();
    let inner = sha1(&[&ipad, msg]);
    sha1(&[&opad, &inner])
}

/// SHA-1 (FIPS 180-4) of the concatenation of `parts`. Only used to match
/// hashed known_hosts names, where SHA-1's weaknesses do not matter.
fn sha1(parts: &[&[u8]]) -> [u8; 20] {
    let mut data: Vec<u8> = parts.concat();
    let bit_len = (data.len() as u64).wrapping_mul(8);
    data.push(0x80);
    while data.len() % 64 != 56 {
        data.push(0);
    }
    data.extend_from_slice(&bit_len.to_be_bytes());

    let mut h: [u32; 5] = [0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476, 0xC3D2E1F0];
    for chunk in data.chunks_exact(64) {
        let mut w = [0u32; 80];
        for (i, word) in chunk.chunks_exact(4).enumerate() {
            w[i] = u32::from_be_bytes([word[0], word[1], word[2], word[3]]);
        }
        for i in 16..80 {
            w[i] = (w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16]).rotate_left(1);
        }
        let [mut a, mut b, mut c, mut d, mut e] = h;
        for (i, wi) in w.iter().enumerate() {
            let (f, k) = match i {
                0..=19 => ((b & c) | (!b & d), 0x5A827999),
                20..=39 => (b ^ c ^ d, 0x6ED9EBA1),
                40..=59 => ((b & c) | (b & d) | (c & d), 0x8F1BBCDC),
                _ => (b ^ c ^ d, 0xCA62C1D6),
            };
            let t = a
                .rotate_left(5)
                .wrapping_add(f)
                .wrapping_add(e)
                .wrapping_add(k)
                .wrapping_add(*wi);
            e = d;
            d = c;
            c = b.rotate_left(30);
            b = a;
            a = t;
        }
        for (hv, v) in h.iter_mut().zip([a, b, c, d, e]) {
            *hv = hv.wrapping_add(v);
        }
    }
    let mut out = [0u8; 20];
    for (i, v) in h.iter().enumerate() {
        out[i * 4..i * 4 + 4].copy_from_slice(&v.to_be_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn sha1_known_answers() {
        assert_eq!(
            hex(&sha1(&[b""])),
            "da39a3ee5e6b4b0d3255bfef95601890afd80709"
        );
        assert_eq!(
            hex(&sha1(&[b"abc"])),
            "a9993e364706816aba3e25717850c26c9cd0d89d"
        );
        let long = b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";
        assert_eq!(
            hex(&sha1(&[long])),
            "84983e441c3bd26ebaae4aa1f95129e5e54670f1"
        );
        let million = vec![b'a'; 1_000_000];
        assert_eq!(
            hex(&sha1(&[&million])),
            "34aa973cd4c4daa4f61eeb2bdbad27316534016f"
        );
    }

    #[test]
    fn hmac_sha1_rfc2202() {
        assert_eq!(
            hex(&hmac_sha1(&[0x0b; 20], b"Hi There")),
            "b617318655057264e28bc0b6fb378c8ef146be00"
        );
        assert_eq!(
            hex(&hmac_sha1(b"Jefe", b"what do ya want for nothing?")),
            "effcdf6ae5eb2fa2d27416d5f184df9c259a7c79"
        );
        assert_eq!(
            hex(&hmac_sha1(
                &[0xaa; 80],
                b"Test Using Larger Than Block-Size Key - Hash Key First"
            )),
            "aa4ae5e15272d00e95705637ce8a3b55ed402112"
        );
    }

    const ED: &str = "AAAAC3NzaC1lZDI1NTE5AAAAIKKYKsAoVCDjQ8uB+zkSwEvMwh6njcdtLHu9X+4qjG1u";

    #[test]
    fn plain_bracketed_and_listed_names() {
        let file = format!(
            "# comment\n\n[127.0.0.3]:2222 ssh-ed25519 {ED}\n\
             okm2.example.com,10.0.0.5 ecdsa-sha2-nistp256 AAAAE2Vj\n\
             host1 ssh-rsa AAAAB3Nz comment with spaces\n\
             garbage\n"
        );
        let entries = parse(&file);
        assert_eq!(entries.len(), 3);
        assert_eq!(
            key_types_for(&entries, &lookup_name("127.0.0.3", 2222)),
            ["ssh-ed25519"]
        );
        // The port-22 name does not match the [host]:port entry, as in OpenSSH.
        assert!(key_types_for(&entries, &lookup_name("127.0.0.3", 22)).is_empty());
        assert_eq!(key_types_for(&entries, "10.0.0.5"), ["ecdsa-sha2-nistp256"]);
        assert_eq!(
            key_types_for(&entries, "OKM2.example.com"),
            ["ecdsa-sha2-nistp256"]
        );
        assert_eq!(key_types_for(&entries, "host1"), ["ssh-rsa"]);
        assert!(key_types_for(&entries, "host").is_empty());
    }

    #[test]
    fn hashed_names_from_ssh_keygen_h() {
        // Produced by `ssh-keygen -H` from "[127.0.0.3]:2222" and "okm2.example.com,10.0.0.5".
        let file = format!(
            "|1|d9hD7vYs0oCCYqjQwflHQfLv8Xo=|iv562RQ619U8pNkoMmDaQOwcKCQ= ssh-ed25519 {ED}\n\
             |1|mIXYQ+jqWWYO+Y5/dEppkDiaABU=|MfmDuzv73HfiO+DvT0jOCTAGyfo= ecdsa-sha2-nistp256 AAAAE2Vj\n\
             |1|TxnAQjhqhNe1q87O4tjyxmhT9zc=|+NkdXIw93nQ0rU9lCWZFDI74teg= ecdsa-sha2-nistp256 AAAAE2Vj\n\
             |1|notbase64!|x ssh-rsa AAAA\n"
        );
        let entries = parse(&file);
        assert_eq!(entries.len(), 3);
        assert_eq!(key_types_for(&entries, "[127.0.0.3]:2222"), ["ssh-ed25519"]);
        assert_eq!(
            key_types_for(&entries, "okm2.example.com"),
            ["ecdsa-sha2-nistp256"]
        );
        assert_eq!(key_types_for(&entries, "10.0.0.5"), ["ecdsa-sha2-nistp256"]);
        assert!(key_types_for(&entries, "127.0.0.3").is_empty());
    }

    #[test]
    fn wildcards_and_negation() {
        let entries =
            parse("*.example.com,!bad.example.com ssh-ed25519 AAAA\n10.0.0.? ssh-rsa BBBB\n");
        assert_eq!(key_types_for(&entries, "okm2.example.com"), ["ssh-ed25519"]);
        assert!(key_types_for(&entries, "bad.example.com").is_empty());
        assert!(key_types_for(&entries, "example.com").is_empty());
        assert_eq!(key_types_for(&entries, "10.0.0.7"), ["ssh-rsa"]);
        assert!(key_types_for(&entries, "10.0.0.17").is_empty());
        assert!(wildcard_match("a*b*c", "aXXbYYc"));
        assert!(wildcard_match("*", ""));
        assert!(!wildcard_match("a*b", "aXXc"));
    }

    #[test]
    fn markers() {
        let entries = parse(&format!(
            "@cert-authority *.example.com ssh-ed25519 CCCC\n\
             @revoked * ssh-ed25519 {ED}\n\
             @unknown-marker host ssh-ed25519 DDDD\n"
        ));
        assert_eq!(entries.len(), 2);
        assert!(key_types_for(&entries, "okm2.example.com").is_empty());
        assert!(is_revoked(&entries, "anything", ED));
        assert!(!is_revoked(&entries, "anything", "CCCC"));
    }

    #[test]
    fn preference_puts_known_algorithms_first() {
        let supported = [
            "ssh-ed25519",
            "ecdsa-sha2-nistp256",
            "rsa-sha2-512",
            "rsa-sha2-256",
            "ssh-rsa",
        ];
        assert_eq!(hostkey_preference(&[], &supported), None);
        assert_eq!(
            hostkey_preference(&["ecdsa-sha2-nistp256".to_string()], &supported).unwrap(),
            "ecdsa-sha2-nistp256,ssh-ed25519,rsa-sha2-512,rsa-sha2-256,ssh-rsa"
        );
        assert_eq!(
            hostkey_preference(&["ssh-rsa".to_string()], &supported).unwrap(),
            "rsa-sha2-512,rsa-sha2-256,ssh-rsa,ssh-ed25519,ecdsa-sha2-nistp256"
        );
    }

    #[test]
    fn operator_commands() {
        let kh = Path::new("/root/.ssh/known_hosts");
        assert_eq!(
            trust_command("127.0.0.3", 2222, "ssh-ed25519", kh),
            "ssh-keyscan -p 2222 -t ed25519 127.0.0.3 >> /root/.ssh/known_hosts"
        );
        assert_eq!(
            remove_command("127.0.0.3", 2222, kh),
            "ssh-keygen -R '[127.0.0.3]:2222' -f /root/.ssh/known_hosts"
        );
        assert_eq!(
            remove_command("okm2", 22, Path::new("/etc/my hosts")),
            "ssh-keygen -R okm2 -f '/etc/my hosts'"
        );
        assert_eq!(
            verify_command("ecdsa-sha2-nistp256"),
            "ssh-keygen -lf /etc/ssh/ssh_host_ecdsa_key.pub"
        );
        assert_eq!(
            fingerprint(&[0u8; 32]),
            "SHA256:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
        );
    }
}
