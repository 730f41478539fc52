//! The shipped HAProxy example, run for real in front of the two fake
//! applications and a `hasync health-server` on each node: users get the
//! primary's application or the maintenance page, never an error, through
//! a cycle's outage and a promote.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::cmd::hasync;
use crate::db::{wait_until, Engine};
use crate::harness::{cluster, free_port};

/// Ends HAProxy when dropped.
struct Haproxy(Child);

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What a user got for `GET /` through HAProxy.
#[derive(Debug, Clone, PartialEq)]
enum Got {
    /// The application of this node answered.
    App(String),
    /// HAProxy's maintenance page (the backup server).
    Maintenance,
    /// Anything else: a refused connection, a 502/503 of HAProxy's own.
    Error(String),
}

fn get(port: u16) -> Got {
    let mut s = match TcpStream::connect_timeout(
        &format!("127.0.0.1:{port}").parse().unwrap(),
        Duration::from_secs(2),
    ) {
        Ok(s) => s,
        Err(e) => return Got::Error(e.to_string()),
    };
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    if let Err(e) = write!(s, "GET / HTTP/1.0\r\nHost: openkm\r\n\r\n") {
        return Got::Error(e.to_string());
    }
    let mut out = String::new();
    if let Err(e) = s.read_to_string(&mut out) {
        return Got::Error(e.to_string());
    }
    let status = out.lines().next().unwrap_or("").to_string();
    if out.contains("OpenKM is being maintained") && status.contains(" 503 ") {
        Got::Maintenance
    } else if status.contains(" 200 ") && out.contains("okm app on ") {
        let node = out
            .split("okm app on ")
            .nth(1)
            .unwrap_or("")
            .split(':')
            .next()
            .unwrap_or("");
        Got::App(node.to_string())
    } else {
        Got::Error(status)
    }
}

/// `templates/haproxy-hasync.cfg` as shipped, with this cluster's
/// addresses, a frontend for users, and checks every 100 ms.
fn config(app_ports: [u16; 2], health_ports: [u16; 2], users: u16, maint: u16) -> String {
    let c = cluster();
    let t = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("templates/haproxy-hasync.cfg"),
    )
    .unwrap();
    let t = t
        .replace(
            "server okm1 10.0.0.11:8080 check port 8008",
            &format!(
                "server okm1 {}:{} check port {}",
                c.nodes[0].ip, app_ports[0], health_ports[0]
            ),
        )
        .replace(
            "server okm2 10.0.0.12:8080 check port 8008",
            &format!(
                "server okm2 {}:{} check port {}",
                c.nodes[1].ip, app_ports[1], health_ports[1]
            ),
        )
        .replace("127.0.0.1:8099", &format!("127.0.0.1:{maint}"))
        .replace("inter 1s fall 2 rise 2", "inter 100ms fall 1 rise 1");
    assert!(
        t.contains(&format!("check port {}", health_ports[1])),
        "the template's servers changed:\n{t}"
    );
    format!(
        "global\n    log stderr format raw local0\n\n{t}\nfrontend users\n    log global\n    option httplog\n    mode http\n    bind 127.0.0.1:{users}\n    timeout client 30s\n    default_backend openkm\n"
    )
}

#[test]
fn users_get_the_primary_or_the_maintenance_page_never_an_error() {
    let db = "okmdb_haproxy";
    let (s, cfg, _apps) = crate::roles::roles_setup("haproxy", db);
    let c = cluster();
    let health_ports = [free_port(&c.nodes[0].ip), free_port(&c.nodes[1].ip)];
    let mut servers = Vec::new();
    for (i, n) in c.nodes.iter().enumerate() {
        let listen = format!("{}:{}", n.ip, health_ports[i]);
        servers.push(
            hasync()
                .config(&cfg)
                .args([
                    "health-server",
                    "--listen",
                    &listen,
                    "--node",
                    &n.name,
                    "--probe-cache",
                    "100ms",
                ])
                .spawn(),
        );
    }
    let (users, maint) = (free_port("127.0.0.1"), free_port("127.0.0.1"));
    let hcfg = s.dir.join("haproxy.cfg");
    std::fs::write(
        &hcfg,
        config(
            [c.nodes[0].app.port, c.nodes[1].app.port],
            health_ports,
            users,
            maint,
        ),
    )
    .unwrap();
    let _haproxy = Haproxy(
        Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&hcfg)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(s.dir.join("haproxy.log")).unwrap())
            .spawn()
            .expect("haproxy (.ci/run installs it)"),
    );
    // HAProxy starts every server up until its first check: wait until
    // the checks have settled and users reach okm1 only.
    let mut in_a_row = 0;
    wait_until(
        "users reach okm1 only, through HAProxy",
        Duration::from_secs(20),
        || {
            in_a_row = if get(users) == Got::App("okm1".into()) {
                in_a_row + 1
            } else {
                0
            };
            std::thread::sleep(Duration::from_millis(20));
            in_a_row >= 20
        },
    );

    // Users, every 20 ms, through a cycle and then a promote.
    let sample = |what: &str, run: &dyn Fn()| -> Vec<(u128, Got)> {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let user = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let t0 = Instant::now();
                let mut got = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::SeqCst) && got.len() < 5000 {
                    got.push((t0.elapsed().as_millis(), get(users)));
                    std::thread::sleep(Duration::from_millis(20));
                }
                got
            })
        };
        // And what HAProxy's checks of okm1 are told, beside it.
        let checks = {
            let stop = stop.clone();
            let addr = format!("{}:{}", cluster().nodes[0].ip, health_ports[0]);
            std::thread::spawn(move || {
                let t0 = Instant::now();
                let mut seen: Vec<(u128, String)> = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::SeqCst) && seen.len() < 5000 {
                    let answer = (|| {
                        let mut s = TcpStream::connect(&addr).ok()?;
                        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
                        write!(s, "GET /primary HTTP/1.0\r\n\r\n").ok()?;
                        let mut out = String::new();
                        s.read_to_string(&mut out).ok()?;
                        let code = out.split_whitespace().nth(1)?.to_string();
                        Some(format!("{code} {}", out.split_once("\r\n\r\n")?.1.trim()))
                    })()
                    .unwrap_or_else(|| "no answer".into());
                    if seen.last().map(|l| &l.1) != Some(&answer) {
                        seen.push((t0.elapsed().as_millis(), answer));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                seen
            })
        };
        run();
        std::thread::sleep(Duration::from_millis(1500));
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let got = user.join().unwrap();
        let checks: String = checks
            .join()
            .unwrap()
            .iter()
            .map(|(ms, a)| format!("{ms:>6} ms  /primary of okm1: {a}\n"))
            .collect();
        eprintln!("{checks}");
        let mut shown = String::new();
        let mut last = None;
        for (ms, g) in &got {
            if last.as_ref() != Some(g) {
                shown += &format!("{ms:>6} ms  {g:?}\n");
                last = Some(g.clone());
            }
        }
        eprintln!(
            "users through HAProxy during {what} ({} requests):\n{shown}",
            got.len()
        );
        let errors: Vec<_> = got
            .iter()
            .filter(|(_, g)| matches!(g, Got::Error(_)))
            .collect();
        assert!(
            errors.is_empty(),
            "{what}: users got errors: {errors:?}\n{shown}"
        );
        got
    };
    let got = sample("a cycle", &|| {
        hasync().config(&cfg).args(["sync"]).run().code(0);
    });
    assert!(
        got.iter().any(|(_, g)| *g == Got::Maintenance),
        "the outage never showed the maintenance page"
    );
    assert_eq!(got.last().unwrap().1, Got::App("okm1".into()));

    let got = sample("a promote of okm2", &|| {
        hasync()
            .config(&cfg)
            .args(["promote", "okm2", "--force"])
            .run()
            .code(0);
    });
    assert_eq!(
        got.last().unwrap().1,
        Got::App("okm2".into()),
        "users follow the promote"
    );
    // Never both: once a user reached the new primary, none reaches the old.
    let first = got
        .iter()
        .position(|(_, g)| *g == Got::App("okm2".into()))
        .unwrap();
    let back: Vec<_> = got[first..]
        .iter()
        .filter(|(_, g)| *g == Got::App("okm1".into()))
        .collect();
    assert!(
        back.is_empty(),
        "users reached both primaries after the promote: {back:?}"
    );
    for mut srv in servers {
        let _ = srv.child.kill();
        let _ = srv.child.wait();
    }
    crate::db::drop_dbs(Engine::Mysql, 0, db);
    crate::db::drop_dbs(Engine::Mysql, 1, db);
}
