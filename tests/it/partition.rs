//! A silent network partition between hasync and the mirror while both
//! services are stopped (issue 14, item 3): every packet to and from the
//! mirror's sshd is dropped with nftables (a failed link or a firewall, not
//! a closed connection), in the final file pass (the agent stream) or in
//! the database phase (the dump stream and the control connections).
//!
//! What a sysadmin needs: the primary's service runs again within 30 s of
//! the mirror going silent, whatever TCP would take to notice; hasync exits
//! 1 naming the node that went silent and the step; once the link heals,
//! the next cycle converges.
//!
//! A frozen sshd (SIGSTOP: the node's kernel acknowledges, nothing
//! answers) is the same silence to hasync and gets the same bound; a node
//! that is quiet but answers is never given up on.
//!
//! The drop matches only this test process's mirror sshd port on
//! 127.0.0.3, in a table of its own (`hasync_it_<pid>`), removed by a Drop
//! guard: other test processes on the machine are not affected.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::cmd::hasync;
use crate::cycle::{cycle_setup, engine_cycle_setup, record, AppsStopped};
use crate::db::{admin, drop_dbs, staging_rows, Engine};
use crate::harness::{cluster, proc};
use crate::setup::{edit_toml, Setup};
use crate::sync::assert_same_tree;

/// The bound: the primary runs again this soon after the mirror
/// went silent.
const PRIMARY_BACK_WITHIN: Duration = Duration::from_secs(30);
/// How long the test keeps the link down at most while it waits for the
/// primary (long enough to measure the unfixed code, which took 126 s).
const PARTITION_MAX: Duration = Duration::from_secs(200);
const LONG: Duration = Duration::from_secs(120);

fn nft(args: &str) -> std::process::Output {
    Command::new("nft")
        .args(args.split_whitespace())
        .output()
        .unwrap_or_else(|e| {
            panic!("hasync-it: cannot run `nft` ({e}); install nftables to run the partition tests")
        })
}

/// Drops every packet to and from `ip:port` (both directions, as a dead
/// link does) until dropped.
struct Partition {
    table: String,
}

impl Partition {
    fn start(ip: &str, port: u16) -> Partition {
        let table = format!("hasync_it_{}", std::process::id());
        let p = Partition { table };
        let t = &p.table;
        for cmd in [
            format!("add table inet {t}"),
            format!(
                "add chain inet {t} out {{ type filter hook output priority 0 ; policy accept ; }}"
            ),
            format!("add rule inet {t} out ip daddr {ip} tcp dport {port} drop"),
            format!("add rule inet {t} out ip saddr {ip} tcp sport {port} drop"),
        ] {
            let out = nft(&cmd);
            assert!(
                out.status.success(),
                "nft {cmd}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        p
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        // Never panic here (it may run while unwinding).
        let _ = nft(&format!("delete table inet {}", self.table));
    }
}

/// Freezes (SIGSTOP) the mirror's sshd and its per-connection processes
/// until dropped: the node's kernel still acknowledges every packet, but
/// nothing answers (a hung server rather than a dead link).
struct Frozen(Vec<i32>);

impl Frozen {
    fn start(sshd: &crate::harness::Sshd) -> Frozen {
        let root = sshd.pid().expect("the mirror's sshd runs") as i32;
        let procs = proc::all_procs();
        let mut pids = vec![root];
        pids.extend(
            proc::descendants(&procs, root)
                .into_iter()
                .filter(|&p| proc::proc_info(p).is_some_and(|i| i.comm.starts_with("sshd"))),
        );
        for &p in &pids {
            proc::signal(p, libc::SIGSTOP);
        }
        Frozen(pids)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        for &p in &self.0 {
            // SAFETY: kill(2) with a pid and a signal; no memory involved.
            unsafe { libc::kill(p, libc::SIGCONT) };
        }
    }
}

/// How the mirror goes silent.
#[derive(Clone, Copy, PartialEq)]
enum How {
    /// Every packet to and from its sshd dropped ([`Partition`]).
    Dropped,
    /// Its sshd frozen ([`Frozen`]).
    Frozen,
}

/// Where the partition strikes.
#[derive(Clone, Copy, PartialEq)]
enum Step {
    /// A 256 MiB file is on its way to the mirror (the agent stream).
    FinalFilePass,
    /// Rows are arriving in the mirror's staging database (the dump
    /// stream, the tunnels of the control connections).
    Database,
    /// A `readonly_sql` statement runs in the mirror's staging database: a
    /// control connection (the `mysql` crate, through a tunnel) waits for
    /// its answer.
    ControlConnection,
}

impl Step {
    /// The cycle's step, as hasync names it.
    fn name(self) -> &'static str {
        match self {
            Step::FinalFilePass => "final file pass",
            Step::Database | Step::ControlConnection => "database",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Step::FinalFilePass => "files",
            Step::Database => "db",
            Step::ControlConnection => "sql",
        }
    }
}

/// The statement the control connection waits on.
const SLOW_SQL: &str = "DO SLEEP(60)";

fn partition_while_stopped(step: Step, ssh_client: Option<&'static str>, how: How) {
    let client = ssh_client.unwrap_or("auto");
    let kind = if how == How::Frozen {
        "frozen"
    } else {
        "dropped"
    };
    let label = format!("partition-{}-{client}-{kind}", step.label());
    let db = format!("okmdb_part_{}_{client}_{kind}", step.label());
    let c = cluster();
    let mut s: Setup = match step {
        Step::FinalFilePass | Step::ControlConnection => cycle_setup(&label, &db),
        Step::Database => engine_cycle_setup(Engine::Mysql, &label, &db, 300_000),
    };
    s.ssh_client = ssh_client;
    let readonly_sql = s.readonly_sql.clone();
    if step == Step::ControlConnection {
        s.readonly_sql.push(SLOW_SQL.into());
    }
    let mut text = s.config_text();
    if step == Step::FinalFilePass {
        // The standby's stop, the first of the quiesce, writes a big file on
        // the primary: the final pass has it to send.
        let big = s.roots[0].join("repository/big.bin");
        let stop = format!(
            "head -c 256M /dev/urandom > {}; {}",
            big.display(),
            c.nodes[1].app.stop_cmd()
        );
        text = edit_toml(
            &text,
            &[("nodes.okm2.service", "stop", Some(format!("{stop:?}")))],
        );
    }
    let cfg = s.write();
    std::fs::write(&cfg, &text).unwrap();

    let _apps = AppsStopped::start_both();
    let mut running = hasync().config(&cfg).args(["sync"]).spawn().follow();
    running.wait_for(&format!("BEGIN {}", step.name()), LONG);
    let slow_sql_runs = || {
        let n = admin(
            Engine::Mysql,
            1,
            "mysql",
            &format!(
                "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE INFO = '{SLOW_SQL}'"
            ),
        );
        n.trim() != "0"
    };
    // Wait until the step really moves bytes to the mirror.
    let t0 = Instant::now();
    let moving = || match step {
        Step::FinalFilePass => std::fs::read_dir(s.roots[1].join("repository"))
            .map(|d| {
                d.flatten()
                    .any(|e| e.file_name().to_string_lossy().starts_with(".big.bin."))
            })
            .unwrap_or(false),
        Step::Database => staging_rows(Engine::Mysql, &format!("{db}__hasync_new")) > 0,
        Step::ControlConnection => slow_sql_runs(),
    };
    while !moving() {
        assert!(
            !running.has_exited() && t0.elapsed() < LONG,
            "the {} never moved bytes to the mirror",
            step.name()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(!c.nodes[0].app.is_running(), "the primary is stopped");

    let mirror = &c.nodes[1].sshd;
    let partition: Box<dyn std::any::Any> = match how {
        How::Dropped => Box::new(Partition::start(&mirror.ip, mirror.port)),
        How::Frozen => Box::new(Frozen::start(mirror)),
    };
    let dropped = Instant::now();
    while !c.nodes[0].app.is_running() && dropped.elapsed() < PARTITION_MAX {
        std::thread::sleep(Duration::from_millis(50));
    }
    let primary_back = dropped.elapsed();
    eprintln!(
        "partition ({kind}) in the {} ({client}): the primary ran again {:.1} s after the drop",
        step.name(),
        primary_back.as_secs_f64()
    );
    // hasync ends on its own while the link is still down: it gives up on
    // the silent mirror instead of waiting for it.
    let exit_deadline = Instant::now() + LONG;
    while !running.has_exited() && Instant::now() < exit_deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let exited_in_partition = running.has_exited();
    let ended = dropped.elapsed();
    drop(partition);
    let run = running.wait();
    eprintln!(
        "partition in the {}: hasync exited {:.1} s after the drop; its stderr:\n{}",
        step.name(),
        ended.as_secs_f64(),
        run.stderr
    );
    assert!(
        primary_back < PRIMARY_BACK_WITHIN,
        "the primary ran again only {:.1} s after the mirror went silent (bound: {} s):\n{}",
        primary_back.as_secs_f64(),
        PRIMARY_BACK_WITHIN.as_secs(),
        run.stderr
    );
    assert!(
        exited_in_partition,
        "hasync was still running {:.0} s after the drop:\n{}",
        ended.as_secs_f64(),
        run.stderr
    );
    run.code(1)
        .stderr_has(&format!("cycle failed: {}: ", step.name()))
        .stderr_has("node okm2: no answer for")
        .stderr_has("okm1: service started");
    let reason = record(&s, 0)["last_cycle"]["reason"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        reason.contains(step.name()) && reason.contains("okm2"),
        "the primary's record: {reason}"
    );

    // The link is back: the next cycle converges, both applications run.
    s.readonly_sql = readonly_sql;
    let next = hasync().config(&s.write()).args(["sync"]).run();
    next.code(0);
    assert_same_tree(&s.roots[0], &s.roots[1]);
    for n in &c.nodes {
        assert!(
            n.app.is_running(),
            "{}: the application is not running",
            n.name
        );
    }
    for i in 0..2 {
        assert_eq!(record(&s, i)["last_cycle"]["outcome"], "ok");
    }
    drop_dbs(Engine::Mysql, 0, &db);
    drop_dbs(Engine::Mysql, 1, &db);
}

#[test]
fn a_silent_mirror_in_the_final_file_pass_restarts_the_primary_within_30s() {
    partition_while_stopped(Step::FinalFilePass, None, How::Dropped);
}

#[test]
fn a_silent_mirror_in_the_final_file_pass_libssh2() {
    partition_while_stopped(Step::FinalFilePass, Some("libssh2"), How::Dropped);
}

#[test]
fn a_silent_mirror_in_the_database_phase_restarts_the_primary_within_30s() {
    partition_while_stopped(Step::Database, None, How::Dropped);
}

#[test]
fn a_silent_mirror_under_a_database_control_connection() {
    partition_while_stopped(Step::ControlConnection, None, How::Dropped);
}

/// A hung mirror (its sshd stopped) rather than a dead link: its kernel
/// acknowledges, nothing answers the keepalives.
#[test]
fn a_frozen_mirror_sshd_in_the_final_file_pass_libssh2() {
    partition_while_stopped(Step::FinalFilePass, Some("libssh2"), How::Frozen);
}

/// The other side of the bound: a node that is quiet but answers (a command
/// that prints nothing for longer than the silence bound, an idle tunnel)
/// is never given up on, on either SSH client.
#[test]
fn a_quiet_but_live_node_is_not_given_up_on() {
    use hasync::transport::{self, openssh::spawn_openssh, Address, Endpoint};
    use std::io::Read;

    let _shared = Setup::new("partition-quiet");
    let c = cluster();
    let node = c.node("okm2");
    let ep = Endpoint {
        node: node.name.clone(),
        address: Address::Ssh {
            host: node.ip.clone(),
            port: node.sshd.port,
            user: "root".into(),
            identity_file: Some(c.identity_file.clone()),
            known_hosts: c.known_hosts.clone(),
        },
        connect_timeout: Duration::from_secs(10),
    };
    let quiet = transport::SILENCE_TIMEOUT + Duration::from_secs(4);
    let cmd = format!("sleep {}; echo done", quiet.as_secs());
    let t = transport::connect(&ep).unwrap();
    std::thread::scope(|s| {
        let exec = s.spawn(|| t.exec(&cmd, &[], None));
        let spawned = s.spawn(|| {
            let mut p = t.spawn(&cmd).unwrap();
            let mut out = String::new();
            p.stdout.read_to_string(&mut out).unwrap();
            (out, p.wait())
        });
        let openssh = s.spawn(|| {
            let mut p = spawn_openssh(&ep, &cmd).unwrap();
            let mut out = String::new();
            p.stdout.read_to_string(&mut out).unwrap();
            (out, p.wait())
        });
        let tunnel = t.tunnel("127.0.0.1", node.mariadb.port).unwrap();
        std::thread::sleep(quiet);
        // The idle tunnel still forwards: MariaDB greets through it.
        let mut conn = std::net::TcpStream::connect(tunnel.local_addr).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut greeting = [0u8; 16];
        let n = conn.read(&mut greeting).unwrap();
        assert!(
            n > 4,
            "no greeting through the idle tunnel: {:?}",
            tunnel.last_error()
        );

        let out = exec.join().unwrap().expect("exec of a quiet command");
        assert_eq!(String::from_utf8_lossy(&out.stdout), "done\n");
        for (name, h) in [("libssh2 spawn", spawned), ("openssh", openssh)] {
            let (text, end) = h.join().unwrap();
            assert_eq!(text, "done\n", "{name}");
            assert_eq!(end.expect(name).status, 0, "{name}");
        }
    });
}
