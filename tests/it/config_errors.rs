//! Bad configurations: each must be refused with exit 3, pointing at the
//! right line of the file, with a hint that says what to write instead.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::cmd::hasync;

/// A valid two-node config whose password file lives in `dir`.
fn base(dir: &Path) -> String {
    let pw = dir.join("db.secret");
    std::fs::write(&pw, "s3cret\n").unwrap();
    std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o600)).unwrap();
    format!(
        r#"[cluster]
name = "openkm"

[nodes.okm1]
address = "127.0.0.2"
port = 1
root = "/srv/okm1"
role = "primary"

[nodes.okm1.service]
stop = "true"
start = "true"
status = "true"
timeout = "30s"

[nodes.okm2]
address = "127.0.0.3"
port = 1
root = "/srv/okm2"
role = "standby"

[files]
exclude = ["/logs/", "*.tmp"]

[database]
engine = "mysql"
name = "okmdb"
user = "okm"
password_file = "{}"

[schedule]
cron = "0 2 * * *"
"#,
        pw.display()
    )
}

struct Case {
    name: &'static str,
    /// (from, to): a replacement applied to the base text.
    edit: (&'static str, &'static str),
    /// Text of the line the error must point at (its first occurrence after the edit).
    line_with: &'static str,
    /// The column (1-based) its caret points at: the offending value, or
    /// the key or section that is wrong (a string left open: the line's
    /// end, where it should have closed).
    col: usize,
    message: &'static str,
    hint: &'static str,
}

const CASES: &[Case] = &[
    Case {
        name: "syntax error",
        edit: ("name = \"openkm\"", "name = \"openkm"),
        line_with: "name = \"openkm",
        col: 15,
        message: "invalid basic string",
        hint: "strings in double quotes closed on the same line",
    },
    Case {
        name: "unknown key with a typo",
        edit: ("address = \"127.0.0.3\"", "adress = \"127.0.0.3\""),
        line_with: "adress",
        col: 1,
        message: "unknown field `adress`",
        hint: "did you mean `address`?",
    },
    Case {
        name: "wrong type",
        edit: (
            "port = 1\nroot = \"/srv/okm2\"",
            "port = \"22\"\nroot = \"/srv/okm2\"",
        ),
        line_with: "port = \"22\"",
        col: 8,
        message: "invalid type",
        hint: "quotes",
    },
    Case {
        name: "bad duration",
        edit: ("timeout = \"30s\"", "timeout = \"30x\""),
        line_with: "timeout",
        col: 11,
        message: "unknown unit `x`",
        hint: "\"120s\"",
    },
    Case {
        name: "duration without unit",
        edit: ("timeout = \"30s\"", "timeout = \"30\""),
        line_with: "timeout",
        col: 11,
        message: "needs a unit",
        hint: "\"2m\"",
    },
    Case {
        name: "bad cron line",
        edit: ("cron = \"0 2 * * *\"", "cron = \"0 2 * *\""),
        line_with: "cron =",
        col: 8,
        message: "expected 5 fields (minute hour day-of-month month day-of-week) but found 4",
        hint: "cron = \"30 2 * * *\"",
    },
    Case {
        name: "two primaries",
        edit: ("role = \"standby\"", "role = \"primary\""),
        line_with: "root = \"/srv/okm2\"\nrole",
        col: 8,
        message: "two primaries",
        hint: "exactly one node",
    },
    Case {
        name: "unknown role",
        edit: ("role = \"standby\"", "role = \"slave\""),
        line_with: "role = \"slave\"",
        col: 8,
        message: "unknown variant `slave`",
        hint: "one of the values",
    },
    Case {
        name: "relative root",
        edit: ("root = \"/srv/okm2\"", "root = \"srv/okm2\""),
        line_with: "root = \"srv/okm2\"",
        col: 8,
        message: "must be an absolute path",
        hint: "\"/srv/okm2\"",
    },
    Case {
        name: "missing root",
        edit: ("root = \"/srv/okm2\"\n", ""),
        line_with: "[nodes.okm2]",
        col: 1,
        message: "missing field `root`",
        hint: "add the key",
    },
    Case {
        name: "bad exclude pattern",
        edit: ("\"*.tmp\"", "\"[abc\""),
        line_with: "exclude",
        col: 22,
        message: "bad exclude pattern",
        hint: "EXCLUDE PATTERNS",
    },
    Case {
        name: "unknown engine",
        edit: ("engine = \"mysql\"", "engine = \"oracle\""),
        line_with: "engine",
        col: 10,
        message: "unknown variant `oracle`",
        hint: "one of the values",
    },
    Case {
        name: "missing password file",
        edit: ("db.secret", "no-such.secret"),
        line_with: "password_file",
        col: 17,
        message: "cannot read",
        hint: "create the file or fix the path",
    },
    Case {
        name: "database name that cannot be staged",
        edit: ("name = \"okmdb\"", "name = \"okm-db\""),
        line_with: "name = \"okm-db\"",
        col: 8,
        message: "letters, digits and `_`",
        hint: "name = \"okm_db\"",
    },
    Case {
        name: "health url that is not a url",
        edit: (
            "timeout = \"30s\"",
            "timeout = \"30s\"\nhealth_url = \"localhost:8080\"",
        ),
        line_with: "health_url",
        col: 14,
        message: "not an http",
        hint: "health_url = \"http://localhost:8080/OpenKM/\"",
    },
    Case {
        name: "health url over https, which the check cannot speak",
        edit: (
            "timeout = \"30s\"",
            "timeout = \"30s\"\nhealth_url = \"https://localhost:8443/OpenKM/\"",
        ),
        line_with: "health_url",
        col: 14,
        message: "is not an http:// URL (hasync checks it in plain HTTP",
        hint: "health_url = \"http://localhost:8080/OpenKM/\"",
    },
    Case {
        name: "node without an address",
        edit: ("address = \"127.0.0.3\"\n", ""),
        line_with: "[nodes.okm2]",
        col: 1,
        message: "missing field `address`",
        hint: "add the key",
    },
    Case {
        name: "no primary node",
        edit: ("role = \"primary\"", "role = \"standby\""),
        line_with: "[nodes.okm1]",
        col: 1,
        message: "no node has role = \"primary\"",
        hint: "set role = \"primary\" on the node that serves users now",
    },
    Case {
        name: "root of the whole file system",
        edit: ("root = \"/srv/okm2\"", "root = \"/\""),
        line_with: "root = \"/\"",
        col: 8,
        message: "would replicate the whole file system",
        hint: "point root at the application's tree",
    },
    Case {
        name: "empty service command",
        edit: ("stop = \"true\"", "stop = \"\""),
        line_with: "stop = \"\"",
        col: 8,
        message: "service stop command is empty",
        hint: "systemctl stop",
    },
    Case {
        name: "unknown section",
        edit: ("[files]", "[file]"),
        line_with: "[file]",
        col: 2,
        message: "unknown field `file`",
        hint: "did you mean `files`?",
    },
];

/// The first hint line in `stderr`, without `hint: ` (panics if there is
/// none).
fn hint_of(stderr: &str) -> &str {
    let at = stderr
        .find("\n  hint: ")
        .unwrap_or_else(|| panic!("no hint:\n{stderr}"));
    stderr[at + 9..].lines().next().unwrap_or_default()
}

fn line_of(text: &str, needle: &str) -> usize {
    let at = text
        .find(needle)
        .unwrap_or_else(|| panic!("{needle:?} not in the config"));
    // A multi-line needle means its last line.
    text[..at + needle.len()].matches('\n').count() + 1
}

#[test]
fn each_bad_config_names_file_line_and_fix() {
    let dir = tempfile::tempdir().unwrap();
    let base = base(dir.path());
    hasync::config::parse(Path::new("base.toml"), &base).expect("the base config is valid");
    for case in CASES {
        let (from, to) = case.edit;
        assert!(
            base.contains(from),
            "case {}: base lacks {from:?}",
            case.name
        );
        let text = base.replacen(from, to, 1);
        let path = dir
            .path()
            .join(format!("{}.toml", case.name.replace(' ', "-")));
        std::fs::write(&path, &text).unwrap();
        let line = line_of(&text, case.line_with);
        let r = hasync().config(&path).args(["doctor"]).run();
        r.code(3)
            .stderr_has(&format!("{}:{line}:{}: ", path.display(), case.col))
            .stderr_has(case.message);
        // Every case has a hint, and it says what to write.
        let hint = hint_of(&r.stderr);
        assert!(
            hint.contains(case.hint),
            "case {}: the hint lacks {:?}: {hint}\n{}",
            case.name,
            case.hint,
            r.stderr
        );
    }
}

#[test]
fn a_single_node_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let base = base(dir.path());
    let start = base.find("[nodes.okm2]").unwrap();
    let end = base.find("[files]").unwrap();
    let text = format!("{}{}", &base[..start], &base[end..]);
    let path = dir.path().join("single.toml");
    std::fs::write(&path, &text).unwrap();
    let line = line_of(&text, "[nodes.okm1]");
    hasync()
        .config(&path)
        .args(["doctor"])
        .run()
        .code(3)
        .stderr_has(&format!("{}:{line}:", path.display()))
        .stderr_has("only 1 node")
        .stderr_has("add a second");
}

#[test]
fn several_problems_are_reported_together() {
    let dir = tempfile::tempdir().unwrap();
    let text = base(dir.path())
        .replace("root = \"/srv/okm2\"", "root = \"srv\"")
        .replace("0 2 * * *", "99 * * * *");
    let path = dir.path().join("two.toml");
    std::fs::write(&path, &text).unwrap();
    hasync()
        .config(&path)
        .args(["doctor"])
        .run()
        .code(3)
        .stderr_has("absolute path")
        .stderr_has("cron")
        .stderr_has("2 problems");
}

#[test]
fn a_password_file_readable_by_others_draws_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let text = base(dir.path());
    std::fs::set_permissions(
        dir.path().join("db.secret"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let path = dir.path().join("loose.toml");
    std::fs::write(&path, &text).unwrap();
    let line = line_of(&text, "password_file");
    // The config is valid, so doctor goes on (and fails to reach port 1).
    let r = hasync().config(&path).args(["doctor"]).run();
    r.stderr_has("warning")
        .stderr_has(&format!("{}:{line}:", path.display()))
        .stderr_has("chmod 600");
    r.stderr_lacks("s3cret");
    assert_ne!(
        r.code, 3,
        "a loose password file is a warning, not a config error"
    );
}
