//! Roles over the real harness: status and check in each state, a promote
//! while the primary is unreachable, and the old primary refused and fenced
//! when it comes back.

use std::path::PathBuf;

use crate::cmd::hasync;
use crate::cycle::{cycle_setup, record, AppsStopped};
use crate::db::{admin, as_okm, dump_text, Engine};
use crate::harness::app::AppConfig;
use crate::harness::cluster;
use crate::setup::Setup;

const READWRITE: &str =
    "readwrite_sql = [\"UPDATE OKM_CONFIG SET CFG_VALUE = 'false' WHERE CFG_KEY = 'system.readonly'\"]\n";

/// The cycle's setup (MariaDB, okm1 primary) with a readwrite_sql too,
/// both applications running and a first cycle done.
///
/// The applications behave like OpenKM: each reads `system.readonly` from
/// its node's database once, at startup, and hasync asks the running one
/// its mode (`writable_check`).
pub(crate) fn roles_setup(label: &str, db: &str) -> (Setup, PathBuf, AppsStopped) {
    let mut s = cycle_setup(label, db);
    s.writable_check = true;
    for (i, n) in cluster().nodes.iter().enumerate() {
        n.app.configure(&AppConfig {
            root: Some(s.roots[i].clone()),
            database: Some(("mysql", n.mariadb.port, db.to_string())),
            write_every: None,
        });
    }
    let cfg = s.write();
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("readonly_sql = ", &format!("{READWRITE}readonly_sql = "));
    std::fs::write(&cfg, text).unwrap();
    let apps = AppsStopped;
    for n in &cluster().nodes {
        n.app.start();
    }
    hasync().config(&cfg).args(["sync"]).run().code(0);
    (s, cfg, apps)
}

/// The live database's system.readonly flag on node `i`.
fn readonly_flag(i: usize, db: &str) -> String {
    admin(
        Engine::Mysql,
        i,
        db,
        "SELECT CFG_VALUE FROM OKM_CONFIG WHERE CFG_KEY = 'system.readonly'",
    )
    .trim()
    .to_string()
}

/// `hasync status` shows `primary` and `standby` at `epoch`, and no
/// warning.
fn status_is_healthy(cfg: &std::path::Path, primary: &str, standby: &str, epoch: u64) {
    let st = hasync().config(cfg).args(["status"]).run();
    st.code(0)
        .stdout_has(&format!("{primary:<10} primary  epoch {epoch}"))
        .stdout_has(&format!("{standby:<10} standby  epoch {epoch}"));
    assert!(
        !st.stdout.contains("WARNING") && !st.stdout.contains("CRITICAL"),
        "{}",
        st.stdout
    );
}

/// The ids in node `i`'s `doc` table, in order: "1,2,3".
fn doc_ids(i: usize, db: &str) -> String {
    admin(
        Engine::Mysql,
        i,
        db,
        "SELECT GROUP_CONCAT(id ORDER BY id) FROM doc",
    )
    .trim()
    .to_string()
}

/// The mode each node's running application says it is in.
fn assert_modes(want: [&str; 2]) {
    let got: Vec<Option<String>> = cluster().nodes.iter().map(|n| n.app.mode()).collect();
    assert_eq!(
        got,
        want.map(|w| Some(w.to_string())),
        "okm1, okm2 applications"
    );
}

/// A hand-made state record in `state_dir` (as an outage or a split left it).
fn write_record(state_dir: &std::path::Path, node: &str, role: &str, epoch: u64) {
    std::fs::create_dir_all(state_dir).unwrap();
    let rec = serde_json::json!({"node": node, "role": role, "epoch": epoch});
    std::fs::write(state_dir.join("state.json"), rec.to_string()).unwrap();
}

/// The (only) quarantine `hasync rejoin` made on node `i`.
fn quarantine_of(s: &Setup, i: usize) -> PathBuf {
    std::fs::read_dir(s.state_dirs[i].join("quarantine"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path()
}

/// (role, epoch) in node `i`'s state record.
fn role_of(s: &Setup, i: usize) -> (String, u64) {
    let r = record(s, i);
    (
        r["role"].as_str().unwrap().to_string(),
        r["epoch"].as_u64().unwrap(),
    )
}

/// What the application writes on node `i`: a document row and its file.
fn app_writes(s: &Setup, i: usize, db: &str, id: u32) {
    let path = format!("repository/doc{id}.txt");
    crate::sync::write(&s.roots[i], &path, format!("document {id}").as_bytes());
    as_okm(
        Engine::Mysql,
        i,
        db,
        &format!("INSERT INTO doc VALUES ({id}, '{path}');"),
    );
}

#[test]
fn promote_while_the_primary_is_down_then_the_old_primary_is_fenced() {
    let db = "okmdb_roles";
    let (s, cfg, _apps) = roles_setup("roles-promote", db);
    let c = cluster();

    // Healthy: after a first cycle, status and check say so.
    status_is_healthy(&cfg, "okm1", "okm2", 1);
    let prom = s.dir.join("hasync.prom");
    let chk = hasync()
        .config(&cfg)
        .args(["check", "--prom-file", prom.to_str().unwrap()])
        .run();
    chk.code(0)
        .stdout_has("HASYNC OK - okm1 primary (epoch 1)")
        .stdout_has("| age=");
    let metrics = std::fs::read_to_string(&prom).unwrap();
    assert!(
        metrics.contains("hasync_epoch{cluster=\"it\",node=\"okm2\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("hasync_role{cluster=\"it\",node=\"okm1\",role=\"primary\"} 1"),
        "{metrics}"
    );
    // Stale: a check with a tiny max age is critical.
    let stale = hasync()
        .config(&cfg)
        .args(["check", "--max-age", "1ms"])
        .run();
    stale
        .code(2)
        .stdout_has("HASYNC CRITICAL")
        .stdout_has("stale");

    // The primary dies (its sshd is gone): unreachable, shown, not fatal.
    c.nodes[0].sshd.stop();
    let st = hasync().config(&cfg).args(["status"]).run();
    st.code(0).stdout_has("okm1       UNREACHABLE");
    hasync()
        .config(&cfg)
        .args(["check"])
        .run()
        .code(2)
        .stdout_has("HASYNC CRITICAL - okm1 unreachable")
        .stdout_has("no reachable primary");

    // A dry run changes nothing.
    let dry = hasync().config(&cfg).args(["promote", "--dry-run"]).run();
    dry.code(0)
        .stdout_has("would promote okm2 to primary at epoch 2")
        .stdout_has(&format!("[okm2] stop: {}", c.nodes[1].app.stop_cmd()))
        .stdout_has("[okm2] readwrite_sql: UPDATE OKM_CONFIG")
        .stdout_has(&format!("[okm2] start: {}", c.nodes[1].app.start_cmd()))
        .stdout_has("[okm2] wait until its writable_check says it accepts writes");
    assert_eq!(c.nodes[1].app.mode().as_deref(), Some("read-only"));
    assert_eq!(record(&s, 1)["role"], "standby");

    let p = hasync().config(&cfg).args(["promote"]).run();
    p.code(0).stderr_has("okm2 is the primary now (epoch 2)");
    let r = record(&s, 1);
    assert_eq!(
        (r["role"].as_str(), r["epoch"].as_u64()),
        (Some("primary"), Some(2)),
        "{r}"
    );
    assert!(c.nodes[1].app.is_running());
    // The application read its flag when it started, as OpenKM does: only
    // a restart after readwrite_sql makes it writable.
    assert_eq!(
        c.nodes[1].app.mode().as_deref(),
        Some("writable"),
        "the new primary's application accepts writes"
    );
    assert_eq!(
        c.nodes[1].app.try_write(),
        Some(201),
        "a user can store a document"
    );
    // Its document 2 (file and row) is the new primary's from now on.
    let mirror_files = crate::sync::snapshot(&s.roots[1]);
    let st = hasync().config(&cfg).args(["status"]).run();
    st.code(0)
        .stdout_has("okm2       primary  epoch 2   app up, writable");
    let flag = admin(
        Engine::Mysql,
        1,
        db,
        "SELECT CFG_VALUE FROM OKM_CONFIG WHERE CFG_KEY = 'system.readonly'",
    );
    assert_eq!(flag.trim(), "false", "readwrite_sql ran on the new primary");

    // The old primary comes back and its cron runs a cycle: refused, fenced,
    // nothing on the new primary changes.
    c.nodes[0].sshd.start();
    let before = dump_text(Engine::Mysql, 1, db);
    let run = hasync().config(&cfg).args(["sync"]).run();
    run.code(1)
        .stderr_has("CRITICAL")
        .stderr_has("okm1 was primary at epoch 1");
    assert_eq!(record(&s, 0)["role"], "fenced");
    assert_eq!(
        before,
        dump_text(Engine::Mysql, 1, db),
        "the new primary's database is untouched"
    );
    assert_eq!(
        mirror_files,
        crate::sync::snapshot(&s.roots[1]),
        "the new primary's files are untouched"
    );
    let st = hasync().config(&cfg).args(["status"]).run();
    st.code(0)
        .stdout_has("okm1       fenced")
        .stdout_has("okm2       primary  epoch 2");
    // The new primary serves; only the redundancy is gone until the
    // rejoin: a WARNING (exit 1), not CRITICAL, naming the way back.
    hasync()
        .config(&cfg)
        .args(["check"])
        .run()
        .code(1)
        .stdout_has("HASYNC WARNING - no standby of okm2 (epoch 2) to copy to: okm1 is fenced (an old primary); `hasync rejoin okm1` makes it a standby");

    // Rejoin. What okm1 took after the split (an edit, a new file, a row)
    // goes to quarantine; what okm2 took since the promote reaches okm1.
    crate::sync::write(&s.roots[0], "repository/a.txt", b"edited after the split");
    crate::sync::write(
        &s.roots[0],
        "repository/late.txt",
        b"written after the split",
    );
    as_okm(
        Engine::Mysql,
        0,
        db,
        "INSERT INTO doc VALUES (99, 'repository/late.txt');",
    );
    app_writes(&s, 1, db, 5);
    let okm1_files = crate::sync::snapshot(&s.roots[0]);
    let dry = hasync()
        .config(&cfg)
        .args(["rejoin", "okm1", "--dry-run"])
        .run();
    dry.code(0)
        .stdout_has("would rejoin okm1 (fenced at epoch 1) as a standby of okm2 at epoch 2")
        .stdout_has("repository/a.txt")
        .stdout_has("repository/late.txt")
        .stdout_has("dump database okmdb_roles");
    assert_eq!(record(&s, 0)["role"], "fenced");
    assert_eq!(okm1_files, crate::sync::snapshot(&s.roots[0]));
    assert!(!s.state_dirs[0].join("quarantine").exists());

    hasync()
        .config(&cfg)
        .args(["rejoin", "okm1"])
        .run()
        .code(0)
        .stderr_has("okm1 is a standby of okm2 at epoch 2");
    assert_eq!(role_of(&s, 0), ("standby".into(), 2));
    assert!(!c.nodes[0].app.is_running(), "stopped until the next cycle");
    let q = quarantine_of(&s, 0);
    let kept = |rel: &str| std::fs::read_to_string(q.join("files").join(rel)).unwrap();
    assert_eq!(kept("repository/a.txt"), "edited after the split");
    assert_eq!(kept("repository/late.txt"), "written after the split");
    let sql = std::fs::read_to_string(q.join(format!("{db}.sql"))).unwrap();
    assert!(
        sql.contains("(99,'repository/late.txt')"),
        "the row is in the dump"
    );
    assert!(std::fs::read_to_string(q.join("README.txt"))
        .unwrap()
        .contains("repository/late.txt"));

    // The next cycle (okm2 -> okm1) makes okm1 an exact mirror.
    hasync().config(&cfg).args(["sync"]).run().code(0);
    crate::sync::assert_same_tree(&s.roots[1], &s.roots[0]);
    assert_eq!(doc_ids(0, db), "1,2,5", "okm2's rows, not the split's");
    assert!(c.nodes[0].app.is_running() && c.nodes[1].app.is_running());
    status_is_healthy(&cfg, "okm2", "okm1", 2);
    crate::db::drop_dbs(Engine::Mysql, 0, db);
    crate::db::drop_dbs(Engine::Mysql, 1, db);
}

/// GET `path` from a health server: the status code and body.
fn http(port: u16, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let code = out.split_whitespace().nth(1).unwrap().parse().unwrap();
    (code, out.split_once("\r\n\r\n").unwrap().1.to_string())
}

fn code(port: u16, path: &str) -> u16 {
    http(port, path).0
}

/// `hasync health-server` for node `node` of `cfg` on a free port, with
/// `extra` arguments; the server and its port.
fn health_server(cfg: &std::path::Path, node: &str, extra: &[&str]) -> (crate::cmd::Running, u16) {
    let port = crate::harness::free_port("127.0.0.1");
    let listen = format!("127.0.0.1:{port}");
    let mut args = vec!["health-server", "--listen", &listen, "--node", node];
    args.extend_from_slice(extra);
    let srv = hasync().config(cfg).args(args).spawn();
    crate::db::wait_until(
        "the health server",
        std::time::Duration::from_secs(10),
        || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
    );
    (srv, port)
}

/// One sample of a health check beside what users get.
#[derive(Debug, Clone)]
struct Sample {
    ms: u128,
    /// `/primary` of the watched node, and its body.
    code: u16,
    body: String,
    /// The node's application: its `/mode` answer (None: it does not serve).
    app: Option<String>,
}

/// Sample `/primary` on `port` and the application of node `i` every 50 ms
/// while `during` runs; the samples.
fn watch(port: u16, i: usize, during: impl FnOnce()) -> Vec<Sample> {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let t0 = std::time::Instant::now();
            let mut out = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::SeqCst) && out.len() < 2000 {
                let (code, body) = http(port, "/primary");
                let app = cluster().nodes[i].app.mode();
                out.push(Sample {
                    ms: t0.elapsed().as_millis(),
                    code,
                    body: body.trim().to_string(),
                    app,
                });
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            out
        })
    };
    during();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    sampler.join().unwrap()
}

/// The samples as a table, one line each, for messages.
fn table_of(samples: &[Sample]) -> String {
    samples
        .iter()
        .map(|x| {
            format!(
                "{:>6} ms  /primary {}  app {:<10} {}\n",
                x.ms,
                x.code,
                x.app.as_deref().unwrap_or("DOWN"),
                x.body
            )
        })
        .collect()
}

/// What a load balancer is told follows the application, not only the
/// record: /primary is 200 only while the node is the primary AND its
/// application serves writable; during a cycle it turns 503 (naming the
/// step) before the service stops and 200 again once it serves; a hung
/// status command is 503 within the probe's deadline; after a promote the
/// new primary's /primary is 200 only once its application accepts writes.
#[test]
fn the_health_endpoint_follows_the_application() {
    let db = "okmdb_health";
    let (s, cfg, _apps) = roles_setup("roles-health", db);
    let c = cluster();
    let cache = ["--probe-cache", "100ms", "--probe-timeout", "1s"];
    let (mut h1, p1) = health_server(&cfg, "okm1", &cache);
    let (mut h2, p2) = health_server(&cfg, "okm2", &cache);
    assert_eq!((code(p1, "/primary"), code(p2, "/primary")), (200, 503));
    assert_eq!((code(p1, "/standby"), code(p2, "/standby")), (503, 200));
    assert_eq!(code(p2, "/nothing"), 404);
    let (hc, health) = http(p2, "/health");
    assert_eq!(hc, 200, "{health}");
    let v: serde_json::Value = serde_json::from_str(&health).unwrap();
    assert_eq!(v["role"], "standby", "{v}");
    assert_eq!(v["application"]["writable"], false, "{v}");
    assert_eq!(v["serving"], true, "{v}");

    // The primary's application keeps adding documents (file, then row)
    // from now on, as users would.
    c.nodes[0].app.configure(&AppConfig {
        root: Some(s.roots[0].clone()),
        database: Some(("mysql", c.nodes[0].mariadb.port, db.to_string())),
        write_every: Some(std::time::Duration::from_millis(100)),
    });
    c.nodes[0].app.stop();
    c.nodes[0].app.start();
    crate::db::wait_until(
        "the application's first document",
        std::time::Duration::from_secs(10),
        || doc_ids(0, db).contains(','),
    );

    // A cycle, watched as HAProxy would (every 50 ms) beside the application.
    let samples = watch(p1, 0, || {
        hasync().config(&cfg).args(["sync"]).run().code(0);
    });
    // Every row the mirror got has its file: the application wrote the
    // file first and was stopped before the final pass.
    let paths = admin(Engine::Mysql, 1, db, "SELECT path FROM doc ORDER BY id");
    let paths: Vec<&str> = paths.lines().collect();
    assert!(
        paths.len() > 2,
        "the application wrote during the cycle: {paths:?}"
    );
    for p in &paths {
        assert!(
            s.roots[1].join(p).is_file(),
            "{p}: a row on the mirror without its file"
        );
    }
    let table = table_of(&samples);
    eprintln!("one cycle through the health endpoint:\n{table}");
    let down: Vec<usize> = (0..samples.len())
        .filter(|&k| samples[k].app.is_none())
        .collect();
    assert!(
        !down.is_empty(),
        "the application was never seen down:\n{table}"
    );
    for &k in &down {
        assert_eq!(
            samples[k].code, 503,
            "200 while the application was down:\n{table}"
        );
    }
    assert!(
        samples
            .iter()
            .any(|x| x.code == 503 && x.body.contains("cycle: quiesce")
                || x.body.contains("cycle: final file pass")),
        "no 503 named the cycle's step:\n{table}"
    );
    // 200 again within one interval (and the probe's cache) of serving.
    let back = down.last().unwrap() + 1;
    assert!(
        back < samples.len(),
        "the application did not come back:\n{table}"
    );
    let ok_at = samples[back..]
        .iter()
        .find(|x| x.code == 200)
        .unwrap_or_else(|| panic!("/primary never came back to 200:\n{table}"));
    assert!(
        ok_at.ms - samples[back].ms <= 1000,
        "/primary came back {} ms after the application served:\n{table}",
        ok_at.ms - samples[back].ms
    );
    assert_eq!(code(p1, "/primary"), 200);

    // A status command that hangs: 503 within the probe's deadline.
    let hung = s.dir.join("hung-status.toml");
    std::fs::write(
        &hung,
        std::fs::read_to_string(&cfg).unwrap().replacen(
            &c.nodes[0].app.status_cmd(),
            "sleep 60",
            1,
        ),
    )
    .unwrap();
    let (mut h3, p3) = health_server(&hung, "okm1", &cache);
    let t = std::time::Instant::now();
    let (hung_code, hung_body) = http(p3, "/primary");
    assert_eq!(hung_code, 503, "{hung_body}");
    assert!(
        t.elapsed() < std::time::Duration::from_millis(2500),
        "{:?}",
        t.elapsed()
    );
    assert!(hung_body.contains("did not answer within"), "{hung_body}");
    let _ = h3.child.kill();
    let _ = h3.child.wait();

    // Down outside a cycle: check is CRITICAL, status says so.
    c.nodes[0].app.stop();
    hasync()
        .config(&cfg)
        .args(["check"])
        .run()
        .code(2)
        .stdout_has("okm1: the primary's application is DOWN");
    assert_eq!(code(p1, "/primary"), 503);
    c.nodes[0].app.start();

    // A promote, watched on the new primary: never 200 while its
    // application is read-only.
    let samples = watch(p2, 1, || {
        hasync()
            .config(&cfg)
            .args(["promote", "okm2", "--force"])
            .run()
            .code(0);
    });
    let table = table_of(&samples);
    eprintln!("a promote through the health endpoint:\n{table}");
    for x in &samples {
        if x.code == 200 {
            assert_eq!(
                x.app.as_deref(),
                Some("writable"),
                "200 while not writable:\n{table}"
            );
        }
    }
    assert_eq!(samples.last().unwrap().code, 200, "{table}");
    assert_eq!((code(p1, "/primary"), code(p2, "/primary")), (503, 200));
    assert_eq!(
        code(p1, "/standby"),
        503,
        "a fenced node is no standby either"
    );
    assert_eq!(c.nodes[1].app.try_write(), Some(201));
    for srv in [&mut h1, &mut h2] {
        let _ = srv.child.kill();
        let _ = srv.child.wait();
    }
    crate::db::drop_dbs(Engine::Mysql, 0, db);
    crate::db::drop_dbs(Engine::Mysql, 1, db);
}

/// A planned switchover there and back (okm1 -> okm2 -> okm1): each one
/// copies what the application wrote last, swaps roles and epochs, leaves
/// the new primary writable and running and the old one a read-only
/// standby; the application's rows and files are all there at the end. A
/// dry run changes nothing, and a failing swap leaves the old primary
/// the primary, writable and running.
#[test]
fn switchover_there_and_back_keeps_every_document() {
    let db = "okmdb_switch";
    let (s, cfg, _apps) = roles_setup("roles-switchover", db);
    let c = cluster();
    // early_restart must not restart the old primary in a switchover (it
    // would take writes that no copy carries); normal cycles still use it.
    let text = std::fs::read_to_string(&cfg).unwrap();
    assert!(text.contains("[database]\n"));
    std::fs::write(
        &cfg,
        text.replace("[database]\n", "[database]\nearly_restart = true\n"),
    )
    .unwrap();
    app_writes(&s, 0, db, 2);

    let before = (
        crate::sync::snapshot(&s.roots[1]),
        dump_text(Engine::Mysql, 1, db),
        record(&s, 0),
        record(&s, 1),
    );
    let dry = hasync()
        .config(&cfg)
        .args(["switchover", "--dry-run"])
        .run();
    dry.code(0)
        .stdout_has("[okm2] state record: primary at the next epoch")
        .stdout_has("[okm2] readwrite_sql: UPDATE OKM_CONFIG")
        .stdout_has("[okm1] readonly_sql: INSERT INTO OKM_CONFIG");
    let after = (
        crate::sync::snapshot(&s.roots[1]),
        dump_text(Engine::Mysql, 1, db),
        record(&s, 0),
        record(&s, 1),
    );
    assert!(before == after, "the dry run changed something");

    let run = hasync().config(&cfg).args(["switchover"]).run();
    run.code(0)
        .stderr_lacks("starting the primary early")
        .stderr_has("BEGIN switchover")
        .stderr_has("okm2 is the primary at epoch 2, okm1 its standby");
    assert_eq!(role_of(&s, 0), ("standby".into(), 2));
    assert_eq!(role_of(&s, 1), ("primary".into(), 2));
    assert_eq!(readonly_flag(1, db), "false", "the new primary is writable");
    assert_eq!(readonly_flag(0, db), "true", "the old primary is read-only");
    assert!(c.nodes[0].app.is_running() && c.nodes[1].app.is_running());
    assert_modes(["read-only", "writable"]);
    crate::sync::assert_same_tree(&s.roots[0], &s.roots[1]);
    let history = record(&s, 1)["history"].to_string();
    assert!(history.contains("switchover from okm1"), "{history}");

    // The application now writes on okm2; a normal cycle goes okm2 -> okm1.
    app_writes(&s, 1, db, 3);
    hasync()
        .config(&cfg)
        .args(["sync"])
        .run()
        .code(0)
        .stderr_has("starting the primary early");
    crate::sync::assert_same_tree(&s.roots[1], &s.roots[0]);

    // A swap that fails (readwrite_sql changes no row on okm1) rolls back:
    // okm2 stays the primary, writable and running; okm1 read-only.
    let bad_cfg = s.dir.join("bad-readwrite.toml");
    std::fs::write(
        &bad_cfg,
        std::fs::read_to_string(&cfg).unwrap().replace(
            "WHERE CFG_KEY = 'system.readonly'\"]",
            "WHERE CFG_KEY = 'no.such.key'\"]",
        ),
    )
    .unwrap();
    let failed = hasync().config(&bad_cfg).args(["switchover"]).run();
    failed
        .code(1)
        .stderr_has("switchover failed, the roles are unchanged (okm2 is the primary)")
        .stderr_has("nothing was swapped: okm2 stays the primary");
    assert_eq!(role_of(&s, 1), ("primary".into(), 2));
    assert_eq!(role_of(&s, 0), ("standby".into(), 2));
    assert!(c.nodes[0].app.is_running() && c.nodes[1].app.is_running());
    assert_eq!(readonly_flag(1, db), "false", "okm2 is still writable");
    assert_eq!(readonly_flag(0, db), "true", "okm1 is read-only again");
    assert_modes(["read-only", "writable"]);

    // And back: okm1 is the primary again, at epoch 3, with every document.
    app_writes(&s, 1, db, 4);
    hasync().config(&cfg).args(["switchover"]).run().code(0);
    assert_eq!(role_of(&s, 0), ("primary".into(), 3));
    assert_eq!(role_of(&s, 1), ("standby".into(), 3));
    assert_eq!(readonly_flag(0, db), "false");
    assert_eq!(readonly_flag(1, db), "true");
    assert_modes(["writable", "read-only"]);
    crate::sync::assert_same_tree(&s.roots[0], &s.roots[1]);
    assert_eq!(doc_ids(0, db), "1,2,3,4");
    for id in 2..=4 {
        let p = s.roots[0].join(format!("repository/doc{id}.txt"));
        assert_eq!(
            std::fs::read_to_string(&p).unwrap(),
            format!("document {id}")
        );
    }
    crate::db::drop_dbs(Engine::Mysql, 0, db);
    crate::db::drop_dbs(Engine::Mysql, 1, db);
}

/// The receiving agent's own guard, spoken to directly as a hand-run
/// command or an old caller would: it writes only into a node whose state
/// record says standby at the caller's epoch (or that has no record yet);
/// reading from a primary is fine.
#[test]
fn the_agent_writes_only_into_a_standby_of_the_callers_epoch() {
    use hasync::agent::wire::{self, Attrs, Msg};
    use std::io::Write;
    use std::os::unix::ffi::OsStrExt;
    use std::process::{Command, Stdio};
    let dir = tempfile::tempdir().unwrap();
    let (root, state) = (dir.path().join("root"), dir.path().join("state"));
    std::fs::create_dir_all(&root).unwrap();
    std::fs::create_dir_all(&state).unwrap();
    // One session: Hello with `epoch`, then `msgs` and Bye; the Welcome
    // and the agent's answers (up to its Bye or Fatal).
    let session = |epoch: u64, msgs: &[Msg]| -> (Msg, Vec<Msg>) {
        let mut child = Command::new(env!("CARGO_BIN_EXE_hasync"))
            .arg("agent")
            .arg("--root")
            .arg(&root)
            .arg("--state-dir")
            .arg(&state)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut input = child.stdin.take().unwrap();
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut buf = Vec::new();
        let hello = Msg::Hello {
            protocol: hasync::version::PROTOCOL,
            version: "test".into(),
            root: root.as_os_str().as_bytes().to_vec(),
            epoch,
        };
        input.write_all(&hello.encode()).unwrap();
        let welcome = wire::recv(&mut out, &mut buf).unwrap().unwrap();
        assert!(matches!(welcome, Msg::Welcome { .. }), "{welcome:?}");
        // A refusing agent exits at once: writing the rest may meet a
        // closed pipe (EPIPE), which is no failure; its answers count.
        let _ = msgs
            .iter()
            .chain([&Msg::Bye])
            .try_for_each(|m| input.write_all(&m.encode()));
        let mut replies = Vec::new();
        while let Some(m) = wire::recv(&mut out, &mut buf).unwrap() {
            let last = matches!(m, Msg::Bye | Msg::Fatal { .. });
            replies.push(m);
            if last {
                break;
            }
        }
        drop(input);
        let _ = child.wait();
        (welcome, replies)
    };
    let mkdir_msg = |id: u64, path: &str| Msg::Mkdir {
        id,
        path: path.as_bytes().to_vec(),
        attrs: Attrs {
            mode: 0o755,
            mtime_sec: 1_700_000_000,
            mtime_nsec: 0,
            uid: 0,
            gid: 0,
        },
    };
    // Hello with `epoch`, then a Mkdir; the agent's answer.
    let mkdir = |epoch: u64| -> Msg { session(epoch, &[mkdir_msg(1, "new-dir")]).1.remove(0) };
    let set_record = |role: &str, epoch: u64| write_record(&state, "okm2", role, epoch);
    let refused = |reply: Msg, needle: &str| match reply {
        Msg::Fatal { message } => assert!(message.contains(needle), "{message}"),
        other => panic!("expected a refusal with {needle:?}, got {other:?}"),
    };
    set_record("primary", 2);
    refused(mkdir(2), "okm2 is primary at epoch 2");
    set_record("fenced", 2);
    refused(mkdir(2), "okm2 is fenced at epoch 2");
    set_record("standby", 2);
    refused(mkdir(1), "the caller copies from a primary at epoch 1");
    refused(mkdir(0), "at epoch 0");
    assert!(!root.join("new-dir").exists(), "nothing was written");
    // A standby of the caller's epoch, or a node without a record yet.
    assert!(matches!(mkdir(2), Msg::Done { id: 1, .. }));
    std::fs::remove_dir(root.join("new-dir")).unwrap();
    std::fs::remove_file(state.join("state.json")).unwrap();
    assert!(matches!(mkdir(5), Msg::Done { id: 1, .. }));
    assert!(root.join("new-dir").is_dir());
    std::fs::remove_dir(root.join("new-dir")).unwrap();

    // The Welcome carries the record as the agent read it: none yet, then
    // the file's bytes.
    let record_of = |welcome: Msg| match welcome {
        Msg::Welcome { record, .. } => record,
        other => panic!("{other:?}"),
    };
    assert_eq!(record_of(session(0, &[]).0), wire::Record::Absent);
    set_record("standby", 2);
    let bytes = std::fs::read(state.join("state.json")).unwrap();
    assert_eq!(record_of(session(0, &[]).0), wire::Record::Present(bytes));

    // A caller that said Hello before it knew the direction (epoch 0)
    // claims the primary's epoch: a write is allowed at the standby's...
    let claim = |epoch: u64| Msg::Claim { epoch };
    let (_, replies) = session(0, &[claim(2), mkdir_msg(1, "new-dir")]);
    assert!(matches!(replies[0], Msg::Done { id: 1, .. }), "{replies:?}");
    assert!(root.join("new-dir").is_dir());
    // ...and refused at another, even after Hello named the right one, and
    // even when writes were allowed before the Claim.
    refused(
        session(2, &[claim(1), mkdir_msg(1, "other")]).1.remove(0),
        "the caller copies from a primary at epoch 1",
    );
    let (_, replies) = session(
        2,
        &[mkdir_msg(1, "first"), claim(3), mkdir_msg(2, "second")],
    );
    assert!(matches!(replies[0], Msg::Done { id: 1, .. }), "{replies:?}");
    refused(
        replies[1].clone(),
        "the caller copies from a primary at epoch 3",
    );
    assert!(!root.join("other").exists() && !root.join("second").exists());
}

/// `sync --files-only` between two nodes opens ONE SSH connection to each:
/// the agent's Welcome carries its node's state record, so no second
/// connection reads it (a handshake costs CPU the no-change run cannot
/// spare). With and without records, over OpenSSH and libssh2.
#[test]
fn files_only_opens_one_ssh_connection_per_node() {
    let c = cluster();
    let logins = |i: usize| {
        std::fs::read_to_string(&c.nodes[i].sshd.log)
            .unwrap()
            .lines()
            .filter(|l| l.contains("Accepted publickey"))
            .count()
    };
    for client in ["openssh", "libssh2"] {
        // Exclusive: no other test logs in meanwhile.
        let mut s = Setup::exclusive(&format!("roles-one-connection-{client}"));
        s.engine = None;
        s.ssh_client = Some(client);
        let cfg = s.write();
        crate::sync::write(&s.roots[0], "repository/a.txt", b"a");
        crate::sync::write(&s.roots[0], "repository/b/c.txt", b"c");
        crate::sync::write(&s.roots[1], "stale.txt", b"old");
        let run = |what: &str| {
            let before = [logins(0), logins(1)];
            hasync()
                .config(&cfg)
                .args(["sync", "--files-only"])
                .run()
                .code(0);
            let after = [logins(0), logins(1)];
            assert_eq!(
                (after[0] - before[0], after[1] - before[1]),
                (1, 1),
                "{client}, {what}: SSH logins on (okm1, okm2)"
            );
            crate::sync::assert_same_tree(&s.roots[0], &s.roots[1]);
        };
        // No records yet: the roles come from the config.
        run("no records");
        // Records (the usual case), then a run with nothing to do.
        write_record(&s.state_dirs[0], "okm1", "primary", 4);
        write_record(&s.state_dirs[1], "okm2", "standby", 4);
        crate::sync::write(&s.roots[0], "repository/d.txt", b"d");
        run("records");
        run("nothing to do");
        assert_eq!(role_of(&s, 1), ("standby".into(), 4));
    }
}

/// Rejoin on PostgreSQL: the fenced node's live database is dumped into
/// its quarantine (pg_dump through a PGPASSFILE), then it is a standby.
#[test]
fn rejoin_quarantines_a_postgres_database() {
    let db = "okmdb_rejoin_pg";
    let mut s = Setup::exclusive("roles-rejoin-pg");
    s.engine = Some("postgres");
    s.db_name = db.into();
    let cfg = s.write();
    crate::db::fresh_db(Engine::Postgres, 0, db);
    as_okm(
        Engine::Postgres,
        0,
        db,
        "CREATE TABLE doc (id INT PRIMARY KEY, path TEXT); INSERT INTO doc VALUES (7, 'after the split');",
    );
    let _apps = AppsStopped;
    for (i, role, epoch) in [(0, "fenced", 1), (1, "primary", 2)] {
        write_record(&s.state_dirs[i], &format!("okm{}", i + 1), role, epoch);
    }
    hasync()
        .config(&cfg)
        .args(["rejoin", "okm1"])
        .run()
        .code(0)
        .stderr_has(&format!("its database {db} dumped into"));
    assert_eq!(role_of(&s, 0), ("standby".into(), 2));
    let q = quarantine_of(&s, 0);
    let sql = std::fs::read_to_string(q.join(format!("{db}.sql"))).unwrap();
    assert!(sql.contains("7\tafter the split"), "{sql}");
    let leftovers: Vec<_> = std::fs::read_dir(&s.state_dirs[0])
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".hasync-"))
        .collect();
    assert!(
        leftovers.is_empty(),
        "credentials left behind: {leftovers:?}"
    );
    // Rejoining again is a no-op.
    hasync()
        .config(&cfg)
        .args(["rejoin", "okm1"])
        .run()
        .code(0)
        .stderr_has("already a standby of okm2 at epoch 2");
    crate::db::drop_dbs(Engine::Postgres, 0, db);
}

/// Refusals and the split state without a database: promote refuses a
/// standby while the primary is up (a switchover) or that never completed
/// a cycle; two primaries of one epoch are CRITICAL in status and check,
/// and no cycle runs between them.
#[test]
fn promote_refusals_and_two_primaries() {
    let mut s = Setup::exclusive("roles-split");
    s.engine = None;
    let cfg = s.write();
    let c = cluster();
    let _apps = AppsStopped;
    c.nodes[0].app.start();
    hasync()
        .config(&cfg)
        .args(["promote", "okm2"])
        .run()
        .code(1)
        .stderr_has("that is a switchover")
        .stderr_has("okm2 never completed a cycle")
        .stderr_has("add --force");
    let unwritten = || !s.state_dirs[1].join("state.json").exists();
    assert!(unwritten(), "nothing written");
    // Not even --force while a cycle holds the standby's lock.
    std::fs::create_dir_all(&s.state_dirs[1]).unwrap();
    let lock = s.state_dirs[1].join("cycle.lock");
    let mut holder = std::process::Command::new("flock")
        .arg(&lock)
        .args(["sleep", "60"])
        .spawn()
        .unwrap();
    crate::db::wait_until(
        "the test's lock",
        std::time::Duration::from_secs(10),
        || {
            std::process::Command::new("flock")
                .arg("-n")
                .arg(&lock)
                .arg("true")
                .status()
                .is_ok_and(|st| !st.success())
        },
    );
    let forced = hasync()
        .config(&cfg)
        .args(["promote", "okm2", "--force"])
        .run();
    let _ = holder.kill();
    let _ = holder.wait();
    forced
        .code(1)
        .stderr_has("another replication cycle is running: it holds the lock on okm2");
    assert!(unwritten(), "nothing written");
    for i in 0..2 {
        write_record(&s.state_dirs[i], &format!("okm{}", i + 1), "primary", 3);
    }
    hasync()
        .config(&cfg)
        .args(["status"])
        .run()
        .code(0)
        .stdout_has("CRITICAL: two primaries at epoch 3: okm1 and okm2");
    hasync()
        .config(&cfg)
        .args(["check"])
        .run()
        .code(2)
        .stdout_has("HASYNC CRITICAL - two primaries");
    crate::sync::write(&s.roots[0], "x.txt", b"x");
    hasync()
        .config(&cfg)
        .args(["sync", "--files-only"])
        .run()
        .code(1)
        .stderr_has("two primaries at epoch 3");
    assert!(!s.roots[1].join("x.txt").exists());
}

/// `sync --files-only` decides from the records the agents send, with the
/// same answers as from records read over a connection of their own: an
/// unreadable record and another node's record are refused with the same
/// words, a dry run leaves an old primary as it is while a run fences it,
/// and `--to` picks the standby (or finds none).
#[test]
fn files_only_direction_from_the_agents_records() {
    let s = crate::sync::files_only("roles-files-only-records");
    let cfg = s.write();
    crate::sync::write(&s.roots[0], "a.txt", b"a");
    let files_only = |extra: &[&str]| {
        let mut args = vec!["sync", "--files-only"];
        args.extend_from_slice(extra);
        hasync().config(&cfg).args(args).run()
    };
    let copied = || s.roots[1].join("a.txt").exists();

    std::fs::create_dir_all(&s.state_dirs[1]).unwrap();
    std::fs::write(s.state_dirs[1].join("state.json"), "{ not json").unwrap();
    files_only(&[])
        .code(1)
        .stderr_has("state record of okm2")
        .stderr_has("unreadable (")
        .stderr_has("move it aside to start from the config again");
    write_record(&s.state_dirs[1], "okm1", "standby", 1);
    files_only(&[])
        .code(1)
        .stderr_has("it is the record of node okm1: two nodes share this state_dir");
    assert!(!copied());

    // okm2 was promoted while okm1 was away.
    write_record(&s.state_dirs[0], "okm1", "primary", 1);
    write_record(&s.state_dirs[1], "okm2", "primary", 2);
    files_only(&["--dry-run"])
        .code(1)
        .stderr_has("okm1 was primary at epoch 1, but okm2 was promoted at epoch 2");
    assert_eq!(
        role_of(&s, 0),
        ("primary".into(), 1),
        "a dry run fences nothing"
    );
    files_only(&[])
        .code(1)
        .stderr_has("CRITICAL: okm1 was primary at epoch 1");
    assert_eq!(role_of(&s, 0), ("fenced".into(), 1));
    assert!(!copied());

    write_record(&s.state_dirs[0], "okm1", "primary", 3);
    write_record(&s.state_dirs[1], "okm2", "standby", 3);
    files_only(&["--to", "okm1"])
        .code(1)
        .stderr_has("no standby of okm1 (epoch 3) to copy to: okm2: not the --to node");
    assert!(!copied());
    files_only(&["--to", "okm2"])
        .code(0)
        .stderr_lacks("left out");
    crate::sync::assert_same_tree(&s.roots[0], &s.roots[1]);
}
