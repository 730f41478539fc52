//! `transport::openssh::spawn_openssh`, the bulk-stream path through the
//! system `ssh` client, against the harness's real sshd: full-duplex
//! streaming, exit status and stderr, kill, and the refusals (unknown or
//! changed host key, wrong identity, nothing listening), after which nothing
//! may have run on the node.
//!
//! `openssh_throughput` (ignored) compares it with libssh2's `spawn`:
//!
//! ```text
//! cargo test --release --test it openssh_throughput -- --ignored --nocapture
//! ```

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use hasync::transport::openssh::spawn_openssh;
use hasync::transport::{self, Address, Endpoint, Process, TransportError};

use crate::harness::{self, cluster, Node};

fn endpoint(node: &Node, known_hosts: &Path, identity: &Path) -> Endpoint {
    Endpoint {
        node: node.name.clone(),
        address: Address::Ssh {
            host: node.ip.clone(),
            port: node.sshd.port,
            user: "root".into(),
            identity_file: Some(identity.to_path_buf()),
            known_hosts: known_hosts.to_path_buf(),
        },
        connect_timeout: Duration::from_secs(10),
    }
}

/// okm2 as the config of the harness reaches it.
fn okm2() -> Endpoint {
    let c = cluster();
    endpoint(c.node("okm2"), &c.known_hosts, &c.identity_file)
}

/// Start a command, expecting it to be refused; panics if it ran.
fn refused(ep: &Endpoint, command: &str) -> TransportError {
    match spawn_openssh(ep, command) {
        Ok(p) => panic!(
            "`{command}` was started: {:?}",
            p.wait().map(|o| o.stderr_tail())
        ),
        Err(e) => {
            println!("`{command}` refused: {e}");
            e
        }
    }
}

/// A command that leaves a marker file if it ever runs, and the marker.
fn marker_command(dir: &Path) -> (String, PathBuf) {
    let marker = dir.join("it-ran");
    (format!("touch {}; cat", marker.display()), marker)
}

/// 1 MiB of random bytes; chunk `i` of a stream is it with `i` in front.
fn chunk(base: &[u8], i: u64) -> Vec<u8> {
    let mut c = base.to_vec();
    c[..8].copy_from_slice(&i.to_le_bytes());
    c
}

#[test]
fn openssh_streams_both_ways_at_once() {
    let _g = cluster().share();
    const CHUNKS: u64 = 200; // 200 MiB
    let base = harness::random_bytes(1 << 20);
    let mut p = spawn_openssh(&okm2(), "cat").unwrap();
    let mut stdin = p.take_stdin().unwrap();
    let writer_base = base.clone();
    let writer = thread::spawn(move || {
        for i in 0..CHUNKS {
            stdin.write_all(&chunk(&writer_base, i)).unwrap();
        }
        // Dropping stdin sends EOF; cat then exits.
    });
    let mut got = vec![0u8; base.len()];
    for i in 0..CHUNKS {
        p.stdout.read_exact(&mut got).unwrap();
        assert!(got == chunk(&base, i), "chunk {i} differs");
    }
    assert_eq!(p.stdout.read(&mut got).unwrap(), 0, "more than was sent");
    writer.join().unwrap();
    let out = p.wait().unwrap();
    assert_eq!(out.status, 0, "{}", out.stderr_tail());
}

#[test]
fn openssh_reports_exit_status_and_stderr() {
    let _g = cluster().share();
    let mut p = spawn_openssh(
        &okm2(),
        "read line; echo \"got $line\"; echo oops >&2; exit 7",
    )
    .unwrap();
    p.take_stdin().unwrap().write_all(b"hello\n").unwrap();
    let mut out = String::new();
    p.stdout.read_to_string(&mut out).unwrap();
    assert_eq!(out, "got hello\n");
    let done = p.wait().unwrap();
    assert_eq!(done.status, 7);
    // The pgid line of the wrapper is not part of it.
    assert_eq!(String::from_utf8_lossy(&done.stderr), "oops\n");
}

#[test]
fn openssh_kill_stops_the_remote_command() {
    let _g = cluster().share();
    // A distinctive command line to look for.
    let sleep = format!("sleep {}.7", 3000 + std::process::id() % 1000);
    let mut p = spawn_openssh(&okm2(), &format!("{sleep}; echo done")).unwrap();
    let sleeper = wait_for_process(&sleep);
    let t0 = Instant::now();
    p.kill();
    let out = p.wait().unwrap();
    assert_eq!(out.status, 137);
    assert!(t0.elapsed() < Duration::from_secs(5));
    let gone = Instant::now() + Duration::from_secs(3);
    while alive(sleeper) {
        assert!(Instant::now() < gone, "the remote sleep survived the kill");
        thread::sleep(Duration::from_millis(20));
    }
}

/// Pid of the process whose command line is exactly `cmdline`, waiting up to
/// 5 s for it to appear.
fn wait_for_process(cmdline: &str) -> u32 {
    let t0 = Instant::now();
    loop {
        let out = Command::new("pgrep")
            .args(["-f", &format!("^{cmdline}$")])
            .output()
            .unwrap();
        if let Some(pid) = String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .and_then(|l| l.trim().parse().ok())
        {
            return pid;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "`{cmdline}` does not run"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// Running, not a zombie waiting to be reaped.
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let state = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .next()?
                .to_string();
            Some(state != "Z")
        })
        .unwrap_or(false)
}

fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ppid ...", comm may contain spaces.
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

#[test]
fn openssh_reports_a_lost_connection() {
    let _g = cluster().share();
    let okm2_sshd = &cluster().node("okm2").sshd;
    let sleep = format!("sleep {}.3", 4000 + std::process::id() % 1000);
    let p = spawn_openssh(&okm2(), &format!("{sleep}; echo done")).unwrap();
    let sleeper = wait_for_process(&sleep);
    // The per-connection sshd: the ancestor whose parent is the listener.
    let listener = okm2_sshd.pid().expect("sshd runs");
    let mut session = sleeper;
    while let Some(parent) = parent_of(session).filter(|&pp| pp != listener && pp > 1) {
        session = parent;
    }
    assert_eq!(parent_of(session), Some(listener));
    // SAFETY: kill(2) on pids of this test's own sshd session and command.
    unsafe { libc::kill(session as libc::pid_t, libc::SIGKILL) };
    let err = p.wait().unwrap_err();
    // SAFETY: as above; the orphaned sleep is ours to end.
    unsafe { libc::kill(sleeper as libc::pid_t, libc::SIGKILL) };
    assert!(
        matches!(err, TransportError::ConnectionLost { .. }),
        "{err}"
    );
    // ssh words it "closed by remote host" or "send disconnect: Broken
    // pipe", depending on which side of the race it sees first.
    assert!(err.to_string().contains("connection was lost"), "{err}");
}

#[test]
fn openssh_refuses_an_unknown_host_key() {
    let _g = cluster().share();
    let c = cluster();
    let dir = c.scratch_dir("openssh-unknown-key");
    // Knows okm1 only.
    let kh = dir.join("known_hosts");
    std::fs::write(&kh, c.node("okm1").sshd.known_hosts_line() + "\n").unwrap();
    let ep = endpoint(c.node("okm2"), &kh, &c.identity_file);
    let (command, marker) = marker_command(&dir);
    let err = refused(&ep, &command);
    let msg = err.to_string();
    assert!(
        matches!(err, TransportError::UnknownHostKey { .. }),
        "{msg}"
    );
    assert!(msg.contains("is not trusted"), "{msg}");
    assert!(msg.contains("SHA256:"), "{msg}");
    assert!(!marker.exists(), "the command ran");
    assert_eq!(std::fs::read_to_string(&kh).unwrap().lines().count(), 1);

    // A known_hosts file that does not exist at all.
    let ep = endpoint(c.node("okm2"), &dir.join("absent"), &c.identity_file);
    let err = refused(&ep, &command);
    assert!(
        err.to_string().contains("that file does not exist yet"),
        "{err}"
    );
    assert!(!dir.join("absent").exists() && !marker.exists());

    // The control: with the harness's known_hosts the same command runs.
    let p = spawn_openssh(&okm2(), &command).unwrap();
    assert_eq!(p.wait().unwrap().status, 0);
    assert!(marker.exists());
}

#[test]
fn openssh_refuses_a_changed_host_key() {
    let _g = cluster().share();
    let c = cluster();
    let dir = c.scratch_dir("openssh-changed-key");
    let (okm1, okm2) = (c.node("okm1"), c.node("okm2"));
    // okm2's address with okm1's key.
    let kh = dir.join("known_hosts");
    let line = format!(
        "[{}]:{} {}\n",
        okm2.ip, okm2.sshd.port, okm1.sshd.host_key_pub
    );
    std::fs::write(&kh, &line).unwrap();
    let ep = endpoint(okm2, &kh, &c.identity_file);
    let (command, marker) = marker_command(&dir);
    let err = refused(&ep, &command);
    let msg = err.to_string();
    assert!(
        matches!(err, TransportError::ChangedHostKey { .. }),
        "{msg}"
    );
    assert!(msg.contains("has CHANGED"), "{msg}");
    assert!(!marker.exists(), "the command ran");
    assert_eq!(std::fs::read_to_string(&kh).unwrap(), line);
}

#[test]
fn openssh_refuses_a_wrong_identity() {
    let _g = cluster().share();
    let c = cluster();
    let dir = c.scratch_dir("openssh-wrong-identity");
    let key = dir.join("id_other");
    let status = harness::sshd::keygen_cmd(&key, "not-authorised")
        .status()
        .unwrap();
    assert!(status.success());
    let ep = endpoint(c.node("okm2"), &c.known_hosts, &key);
    let (command, marker) = marker_command(&dir);
    let err = refused(&ep, &command);
    let msg = err.to_string();
    assert!(matches!(err, TransportError::AuthFailed { .. }), "{msg}");
    assert!(msg.contains("authentication as root failed"), "{msg}");
    assert!(msg.contains("id_other"), "{msg}");
    assert!(!marker.exists(), "the command ran");
}

#[test]
fn openssh_reports_an_unreachable_node() {
    let mut ep = okm2();
    if let Address::Ssh { port, .. } = &mut ep.address {
        *port = harness::free_port(&cluster().node("okm2").ip);
    }
    let err = refused(&ep, "true");
    assert!(matches!(err, TransportError::Unreachable { .. }), "{err}");
    assert!(err.to_string().contains("Connection refused"), "{err}");
}

#[test]
fn openssh_runs_local_endpoints_locally() {
    let ep = Endpoint {
        node: "here".into(),
        address: Address::Local,
        connect_timeout: Duration::from_secs(1),
    };
    let mut p = spawn_openssh(&ep, "echo local; exit 3").unwrap();
    let mut out = String::new();
    p.stdout.read_to_string(&mut out).unwrap();
    assert_eq!(out, "local\n");
    assert_eq!(p.wait().unwrap().status, 3);
}

/// CPU seconds of this process and its reaped children so far.
fn cpu_seconds() -> (f64, f64) {
    let get = |who| {
        // SAFETY: getrusage fills the struct we own.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        unsafe { libc::getrusage(who, &mut ru) };
        let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        secs(ru.ru_utime) + secs(ru.ru_stime)
    };
    (get(libc::RUSAGE_SELF), get(libc::RUSAGE_CHILDREN))
}

const GIB: u64 = 1 << 30;

/// Push 1 GiB into `p`'s stdin, or read it all from its stdout.
fn pump_gib(mut p: Process, upload: bool) {
    let mut buf = vec![0u8; 256 * 1024];
    if upload {
        let mut stdin = p.take_stdin().unwrap();
        let mut left = GIB;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            stdin.write_all(&buf[..n]).unwrap();
            left -= n as u64;
        }
        drop(stdin);
    } else {
        drop(p.take_stdin());
        let mut total = 0u64;
        loop {
            match p.stdout.read(&mut buf).unwrap() {
                0 => break,
                n => total += n as u64,
            }
        }
        assert_eq!(total, GIB);
    }
    let out = p.wait().unwrap();
    assert_eq!(out.status, 0, "{}", out.stderr_tail());
}

/// 1 GiB each way through OpenSSH and through libssh2, on the harness sshd.
/// Client CPU = this process plus its `ssh` children; sshd's is not
/// included. Run it alone (the filter above): other tests' threads would
/// count as this process's CPU.
#[test]
#[ignore]
fn openssh_throughput() {
    let _g = cluster().lock();
    let ep = okm2();
    let libssh2 = transport::connect(&ep).unwrap();
    let reps: usize = std::env::var("HASYNC_BENCH_REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    for (direction, upload, command) in [
        ("upload  ", true, "cat > /dev/null"),
        ("download", false, "head -c 1073741824 /dev/zero"),
    ] {
        for path in ["openssh", "libssh2"] {
            for _ in 0..reps {
                let (self0, children0) = cpu_seconds();
                let t0 = Instant::now();
                let p = match path {
                    "openssh" => spawn_openssh(&ep, command).unwrap(),
                    _ => libssh2.spawn(command).unwrap(),
                };
                pump_gib(p, upload);
                let wall = t0.elapsed().as_secs_f64();
                let (self1, children1) = cpu_seconds();
                println!(
                    "{direction} {path:8} 1 GiB: {:6.0} MB/s, {:5.2} s wall, client CPU {:5.2} s \
                     (hasync {:5.2} + ssh {:5.2})",
                    GIB as f64 / 1e6 / wall,
                    wall,
                    (self1 - self0) + (children1 - children0),
                    self1 - self0,
                    children1 - children0,
                );
            }
        }
    }
}
