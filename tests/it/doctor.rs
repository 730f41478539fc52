//! `hasync init` + `hasync doctor` against the harness's two real nodes:
//! green when everything is in place, red with a clear message and exit 4
//! for each thing that can be wrong.

use std::process::Command;

use crate::cmd::hasync;
use crate::harness::cluster;
use crate::setup::{edit_toml, quoted, Setup};

/// The newcomer's path: init writes the template, the user fills in the two
/// nodes, doctor is all green. Run with `--nocapture` to see it (README).
/// Run hasync with `args` on the demo's config and print the command and
/// its output, as a reader of the demo would see them.
fn shown(path: &std::path::Path, args: &[&str]) -> crate::cmd::Run {
    let r = hasync().config(path).args(args).run();
    println!(
        "$ hasync -c {} {}\n{}{}",
        path.display(),
        args.join(" "),
        r.stdout,
        r.stderr
    );
    r
}

#[test]
fn demo() {
    let c = cluster();
    let s = Setup::new("demo");
    let path = s.dir.join("etc/hasync.toml");
    hasync().config(&path).args(["init"]).run().code(0);
    let template = std::fs::read_to_string(&path).unwrap();
    let mut edits = vec![("cluster", "state_dir", quoted(&s.dir.join("state")))];
    for (i, n) in c.nodes.iter().enumerate() {
        let node = format!("nodes.{}", n.name);
        let svc = format!("nodes.{}.service", n.name);
        let db = format!("nodes.{}.database", n.name);
        let owned: Vec<(String, &str, Option<String>)> = vec![
            (node.clone(), "address", Some(format!("{:?}", n.ip))),
            (node.clone(), "port", Some(n.sshd.port.to_string())),
            (node.clone(), "identity_file", quoted(&c.identity_file)),
            (node.clone(), "known_hosts", quoted(&c.known_hosts)),
            (node.clone(), "root", quoted(&s.roots[i])),
            // Both "nodes" are this machine: each needs a state_dir of its own.
            (node.clone(), "state_dir", quoted(&s.state_dirs[i])),
            (
                node.clone(),
                "agent_path",
                Some(format!("{:?}", env!("CARGO_BIN_EXE_hasync"))),
            ),
            (svc.clone(), "stop", Some(format!("{:?}", n.app.stop_cmd()))),
            (
                svc.clone(),
                "start",
                Some(format!("{:?}", n.app.start_cmd())),
            ),
            (
                svc.clone(),
                "status",
                Some(format!("{:?}", n.app.status_cmd())),
            ),
            (svc.clone(), "health_url", None),
            (db.clone(), "port", Some(n.mariadb.port.to_string())),
        ];
        for (sec, key, val) in owned {
            edits.push((Box::leak(sec.into_boxed_str()), key, val));
        }
    }
    edits.push(("database", "password_file", quoted(&c.db_password_file)));
    // A database of the demo's own (the okm user may create okmdb*).
    edits.push(("database", "name", Some("\"okmdb_demo\"".into())));
    let text = edit_toml(&template, &edits);
    std::fs::write(&path, &text).unwrap();
    println!("--- {} ---\n{text}", path.display());

    // The primary's database (the mirror has none yet: the first sync
    // creates it, and doctor says so).
    use crate::db::{admin, as_okm, drop_dbs, fresh_db, Engine};
    fresh_db(Engine::Mysql, 0, "okmdb_demo");
    drop_dbs(Engine::Mysql, 1, "okmdb_demo");
    as_okm(
        Engine::Mysql,
        0,
        "okmdb_demo",
        "CREATE TABLE OKM_CONFIG (CFG_KEY VARCHAR(255) PRIMARY KEY, CFG_TYPE VARCHAR(32), CFG_VALUE TEXT);\n\
         INSERT INTO OKM_CONFIG VALUES ('system.readonly', 'boolean', 'false');\n\
         CREATE TABLE OKM_NODE_DOCUMENT (NBS_UUID CHAR(36) PRIMARY KEY, NDC_TITLE VARCHAR(255), NDC_SIZE BIGINT);\n\
         INSERT INTO OKM_NODE_DOCUMENT VALUES (UUID(), 'report.pdf', 25), (UUID(), 'notes.txt', 5);",
    );

    let r = shown(&path, &["doctor"]);
    r.code(0).stdout_has("all checks passed");
    for needle in [
        "[ ok ] reachable",
        "[ ok ] host key",
        "[ ok ] auth",
        "[ ok ] root",
        "[ ok ] agent",
        "[ ok ] database",
        "[ ok ] state dir",
        "[ ok ] dump tools",
    ] {
        assert_eq!(
            r.stdout.matches(needle).count(),
            2,
            "{needle:?} not ok on both nodes:\n{}",
            r.stdout
        );
    }
    assert!(!r.stdout.contains("[FAIL]"));
    // The password file's content never shows.
    assert!(!r.stdout.contains(&c.db_password) && !r.stderr.contains(&c.db_password));

    // A first replication of the file tree (the template excludes OpenKM's
    // per-node key and logs).
    let primary = &s.roots[0];
    for (rel, content) in [
        (
            "repository/docs/report.pdf",
            &b"%PDF-1.4 quarterly report"[..],
        ),
        ("repository/docs/notes.txt", b"notes"),
        ("repository/.system.key", b"primary's own key"),
        ("logs/catalina.out", b"primary's log"),
        ("webapps/OpenKM.war", &[0u8; 100_000][..]),
    ] {
        crate::sync::write(primary, rel, content);
    }
    for args in [
        &["sync", "--files-only", "--dry-run"][..],
        &["sync", "--files-only"],
    ] {
        shown(&path, args).code(0);
    }
    let standby = crate::sync::snapshot(&s.roots[1]);
    assert!(
        standby.contains_key("repository/docs/report.pdf")
            && standby.contains_key("webapps/OpenKM.war")
    );
    assert!(!standby.contains_key("repository/.system.key") && !standby.contains_key("logs"));

    // And the database. The template's readonly_sql marks the mirror
    // read-only.
    for args in [
        &["sync", "--db-only", "--dry-run"][..],
        &["sync", "--db-only"],
    ] {
        shown(&path, args).code(0);
    }
    let flag = admin(
        Engine::Mysql,
        1,
        "okmdb_demo",
        "SELECT CFG_VALUE FROM OKM_CONFIG WHERE CFG_KEY = 'system.readonly'",
    );
    assert_eq!(flag.trim(), "true", "the mirror is read-only");

    // And the whole cycle, with both applications running: stop, copy,
    // start again, record; then the nodes' status.
    let _apps = crate::cycle::AppsStopped;
    c.nodes[0].app.start();
    c.nodes[1].app.start();
    crate::sync::write(
        primary,
        "repository/docs/new.txt",
        b"written after the first copy",
    );
    for args in [&["sync", "--dry-run"][..], &["sync"], &["status"]] {
        shown(&path, args).code(0);
    }
    assert!(c.nodes[0].app.is_running() && c.nodes[1].app.is_running());
    assert!(crate::sync::snapshot(&s.roots[1]).contains_key("repository/docs/new.txt"));
    drop_dbs(Engine::Mysql, 0, "okmdb_demo");
    drop_dbs(Engine::Mysql, 1, "okmdb_demo");
}

#[test]
fn postgres_nodes_are_green_and_json_is_data() {
    let mut s = Setup::new("doctor-pg");
    s.engine = Some("postgres");
    let path = s.write();
    let r = hasync().config(&path).args(["doctor", "--json"]).run();
    r.code(0);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).expect("doctor --json prints JSON");
    let nodes = v["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 2);
    for n in nodes {
        for check in n["checks"].as_array().unwrap() {
            assert_eq!(check["status"], "ok", "{}: {check}", n["node"]);
        }
        let db = n["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "database")
            .unwrap();
        assert!(
            db["detail"].as_str().unwrap().contains("PostgreSQL"),
            "{db}"
        );
    }
}

/// The failing node's checklist, for assertions.
fn node_section<'a>(stdout: &'a str, node: &str) -> &'a str {
    let start = stdout
        .find(&format!("\n{node} "))
        .unwrap_or_else(|| panic!("no section for {node}:\n{stdout}"));
    let rest = &stdout[start + 1..];
    let end = rest.find("\n\n").unwrap_or(rest.len());
    &rest[..end]
}

#[test]
fn unknown_host_key_is_refused_with_fingerprint_and_trust_command() {
    let c = cluster();
    let mut s = Setup::new("doctor-unknown-key");
    // known_hosts that knows okm1 only.
    let kh = s.dir.join("known_hosts");
    std::fs::write(&kh, format!("{}\n", c.nodes[0].sshd.known_hosts_line())).unwrap();
    s.known_hosts = kh;
    let path = s.write();
    let r = hasync().config(&path).args(["doctor"]).run();
    r.code(4).stdout_has("checks failed");
    let okm2 = node_section(&r.stdout, "okm2");
    assert!(okm2.contains("[FAIL] host key"), "{okm2}");
    assert!(okm2.contains("SHA256:"), "{okm2}");
    assert!(okm2.contains("ssh-keyscan"), "{okm2}");
    assert!(okm2.contains("[skip] root"), "{okm2}");
    // The fingerprint shown is the server's real one.
    let fp = Command::new("ssh-keygen")
        .arg("-lf")
        .arg(format!("{}.pub", c.nodes[1].sshd.host_key.display()))
        .output()
        .unwrap();
    let fp = String::from_utf8_lossy(&fp.stdout);
    let fp = fp.split_whitespace().nth(1).unwrap();
    assert!(okm2.contains(fp), "fingerprint {fp} not shown:\n{okm2}");
    assert!(node_section(&r.stdout, "okm1").contains("[ ok ] host key"));
}

#[test]
fn changed_host_key_is_refused_loudly() {
    let c = cluster();
    let mut s = Setup::new("doctor-changed-key");
    // okm2's entry carries some other server's key.
    let other = s.dir.join("other_key");
    let st = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&other)
        .status()
        .unwrap();
    assert!(st.success());
    let other_pub = std::fs::read_to_string(other.with_extension("pub")).unwrap();
    let other_pub: Vec<&str> = other_pub.split_whitespace().take(2).collect();
    let kh = s.dir.join("known_hosts");
    std::fs::write(
        &kh,
        format!(
            "{}\n[{}]:{} {}\n",
            c.nodes[0].sshd.known_hosts_line(),
            c.nodes[1].ip,
            c.nodes[1].sshd.port,
            other_pub.join(" ")
        ),
    )
    .unwrap();
    s.known_hosts = kh;
    let path = s.write();
    let r = hasync().config(&path).args(["doctor"]).run();
    r.code(4);
    let okm2 = node_section(&r.stdout, "okm2");
    assert!(okm2.contains("[FAIL] host key"), "{okm2}");
    assert!(okm2.to_lowercase().contains("changed"), "{okm2}");
    assert!(okm2.contains("ssh-keygen -R"), "{okm2}");
}

#[test]
fn wrong_database_password_is_named() {
    let c = cluster();
    let mut s = Setup::new("doctor-bad-pw");
    let pw = s.dir.join("wrong.secret");
    crate::harness::write_file(&pw, "not-the-password\n", 0o600);
    s.password_file = pw;
    let path = s.write();
    let r = hasync().config(&path).args(["doctor"]).run();
    r.code(4);
    for node in ["okm1", "okm2"] {
        let sec = node_section(&r.stdout, node);
        assert!(sec.contains("[FAIL] database"), "{sec}");
        assert!(sec.contains("refused the login of user \"okm\""), "{sec}");
        assert!(sec.contains("password_file"), "{sec}");
    }
    assert!(!r.stdout.contains("not-the-password") && !r.stderr.contains("not-the-password"));
    assert!(!r.stdout.contains(&c.db_password));
}

#[test]
fn missing_root_is_named_with_the_fix() {
    let mut s = Setup::new("doctor-no-root");
    s.roots[1] = s.dir.join("does-not-exist");
    let path = s.write();
    let r = hasync().config(&path).args(["doctor"]).run();
    r.code(4);
    let okm2 = node_section(&r.stdout, "okm2");
    assert!(okm2.contains("[FAIL] root"), "{okm2}");
    assert!(okm2.contains("does not exist"), "{okm2}");
    assert!(okm2.contains("mkdir -p"), "{okm2}");
    assert!(node_section(&r.stdout, "okm1").contains("[ ok ] root"));
}

#[test]
fn unreachable_node_is_named_and_the_other_still_checked() {
    let mut s = Setup::new("doctor-unreachable");
    // Nothing listens there: the node is down.
    s.ports[1] = crate::harness::free_port("127.0.0.3");
    let path = s.write();
    let r = hasync().config(&path).args(["doctor"]).run();
    r.code(4);
    let okm2 = node_section(&r.stdout, "okm2");
    assert!(okm2.contains("[FAIL] reachable"), "{okm2}");
    assert!(okm2.contains("cannot reach"), "{okm2}");
    assert!(okm2.contains("[skip] database"), "{okm2}");
    let okm1 = node_section(&r.stdout, "okm1");
    assert!(okm1.contains("[ ok ] database"), "{okm1}");
}

#[test]
fn stopped_sshd_makes_the_node_unreachable() {
    let c = cluster();
    let s = Setup::exclusive("doctor-sshd-down");
    let path = s.write();
    c.nodes[1].sshd.stop();
    let r = hasync().config(&path).args(["doctor"]).run();
    c.nodes[1].sshd.start();
    r.code(4);
    assert!(
        node_section(&r.stdout, "okm2").contains("[FAIL] reachable"),
        "{}",
        r.stdout
    );
}

#[test]
fn missing_agent_says_how_to_install_it() {
    let s = Setup::new("doctor-no-agent");
    let path = s.write();
    let text = std::fs::read_to_string(&path).unwrap();
    let text = text.replacen(env!("CARGO_BIN_EXE_hasync"), "/nonexistent/hasync", 2);
    std::fs::write(&path, text).unwrap();
    let r = hasync().config(&path).args(["doctor"]).run();
    r.code(4);
    let okm1 = node_section(&r.stdout, "okm1");
    assert!(okm1.contains("[FAIL] agent"), "{okm1}");
    assert!(okm1.contains("install hasync"), "{okm1}");
}
