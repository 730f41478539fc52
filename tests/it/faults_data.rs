//! The fault suite, data side (issue 7, items 8, 12 and 13): whole cycles
//! refused at the SSH door with nothing done, files that change while the
//! primary reads them, mtimes in the future, and a soak of back-to-back
//! cycles against a writing application whose every replicated row must
//! find its file on the mirror.

use crate::cmd::hasync;
use crate::cycle::{cycle_setup, AppsStopped};
use crate::db::{databases, drop_dbs, Engine};
use crate::harness::{self, cluster};
use crate::setup::{edit_toml, quoted, Setup};

// ---------------------------------------------------------------------------
// Item 8: unknown host key, changed host key, wrong identity
// ---------------------------------------------------------------------------

/// A full `hasync sync` whose config is `edits` away from a working one must
/// be refused before anything happens: exit 1, a message naming okm2 and
/// `advice`, both applications still running with the same pids, the
/// mirror's root, databases and state dir untouched, the primary's too.
fn cycle_refused_at_the_door(label: &str, edits: impl FnOnce(&Setup) -> Vec<Edit>, advice: &str) {
    let db = &format!("okmdb_{}", label.replace('-', "_"));
    let s = cycle_setup(label, db);
    let cfg = s.dir.join("hasync.toml");
    std::fs::write(&cfg, edit_toml(&s.config_text(), &edits(&s))).unwrap();
    let c = cluster();
    let _apps = AppsStopped;
    c.nodes[0].app.start();
    c.nodes[1].app.start();
    let pids = (c.nodes[0].app.pid(), c.nodes[1].app.pid());
    assert!(pids.0.is_some() && pids.1.is_some(), "both apps run");
    let primary_before = crate::sync::snapshot(&s.roots[0]);

    let run = hasync().config(&cfg).args(["sync"]).run();
    run.code(1)
        .stderr_has("node okm2")
        .stderr_has(advice)
        .stderr_has("nothing was stopped")
        .stderr_lacks("BEGIN warm file pass");

    assert_eq!(
        pids,
        (c.nodes[0].app.pid(), c.nodes[1].app.pid()),
        "an application was stopped or restarted"
    );
    assert_eq!(
        std::fs::read_dir(&s.roots[1]).unwrap().count(),
        0,
        "the mirror's root was written"
    );
    assert!(
        databases(Engine::Mysql, 1, db).is_empty(),
        "a database appeared on the mirror"
    );
    assert!(!s.state_dirs[1].exists(), "the mirror's state dir appeared");
    assert_eq!(primary_before, crate::sync::snapshot(&s.roots[0]));
    drop_dbs(Engine::Mysql, 0, db);
}

type Edit = (&'static str, &'static str, Option<String>);

/// A known_hosts file in the test's dir with `lines`.
fn known_hosts(s: &Setup, lines: &[String]) -> Option<String> {
    let kh = s.dir.join("known_hosts");
    std::fs::write(&kh, lines.join("\n") + "\n").unwrap();
    quoted(&kh)
}

#[test]
fn a_cycle_with_an_unknown_standby_host_key_does_nothing() {
    cycle_refused_at_the_door(
        "faults-unknown-key",
        |s| {
            let okm1 = cluster().node("okm1").sshd.known_hosts_line();
            vec![("nodes.okm2", "known_hosts", known_hosts(s, &[okm1]))]
        },
        "is not trusted",
    );
}

#[test]
fn a_cycle_with_a_changed_standby_host_key_does_nothing() {
    cycle_refused_at_the_door(
        "faults-changed-key",
        |s| {
            let (okm1, okm2) = (cluster().node("okm1"), cluster().node("okm2"));
            // okm2's address with okm1's key: what a reinstalled (or
            // impersonated) okm2 looks like.
            let forged = format!(
                "[{}]:{} {}",
                okm2.ip, okm2.sshd.port, okm1.sshd.host_key_pub
            );
            vec![("nodes.okm2", "known_hosts", known_hosts(s, &[forged]))]
        },
        "has CHANGED",
    );
}

#[test]
fn a_cycle_with_a_wrong_identity_for_the_standby_does_nothing() {
    cycle_refused_at_the_door(
        "faults-wrong-identity",
        |s| {
            let key = s.dir.join("id_other");
            let made = harness::sshd::keygen_cmd(&key, "not-authorised")
                .status()
                .unwrap();
            assert!(made.success());
            vec![("nodes.okm2", "identity_file", quoted(&key))]
        },
        "add the public key to ~root/.ssh/authorized_keys",
    );
}
