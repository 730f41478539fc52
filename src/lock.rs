//! The cycle lock: one replication cycle at a time on a pair of nodes.
//!
//! Each node's `state_dir/cycle.lock` is held with flock(1) by a process
//! started on the node through the node's transport: `flock -n` takes the
//! lock and runs a `cat` that reads the channel hasync keeps open. The lock
//! lives exactly as long as that channel: when hasync exits, crashes or is
//! killed, the channel closes, `cat` ends and the kernel drops the lock, so
//! there are no stale lock files to clean up. The holder writes who it is
//! (host, pid, start time, the `cat`'s pid) next to the lock, for the message
//! a second cycle prints. If the holder's channel outlived it (a dead hasync
//! on *this* host whose SSH session has not noticed yet), the second cycle
//! ends that `cat` and takes the lock over.

use std::io::{Read, Write};
use std::time::Duration;

use crate::config::Node;
use crate::transport::{shell_quote, Process, Transport};

/// Who holds (or wants) the lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub host: String,
    pub pid: u32,
    /// RFC 3339.
    pub started: String,
}

impl Holder {
    /// This process.
    pub fn me() -> Holder {
        Holder {
            host: hostname(),
            pid: std::process::id(),
            started: chrono::Local::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, false),
        }
    }

    fn line(&self) -> String {
        format!(
            "host={} pid={} started={}",
            self.host, self.pid, self.started
        )
    }
}

pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into our buffer.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "unknown-host".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("another replication cycle is running: it holds the lock on {node} ({holder}); wait for it to finish, or stop it (pid {pid} on {host})")]
    Held {
        node: String,
        holder: String,
        host: String,
        pid: String,
    },
    #[error("cannot take the cycle lock on {node}: {detail}")]
    Failed { node: String, detail: String },
}

/// Held locks; dropping it releases them.
pub struct CycleLock {
    holders: Vec<(String, Process)>,
}

impl CycleLock {
    pub fn nodes(&self) -> Vec<&str> {
        self.holders.iter().map(|(n, _)| n.as_str()).collect()
    }

    /// Say on `node` what the run is doing there: one line into the
    /// channel its lock's `cat` reads, which the `cat` writes into
    /// `state_dir/cycle.step` for [`activity`] (the health server, status
    /// and check). No command runs for it. Best effort: a line that cannot
    /// be written is left out, the run goes on.
    pub fn announce(&mut self, node: &str, step: &Step) {
        let Some((_, p)) = self.holders.iter_mut().find(|(n, _)| n == node) else {
            return;
        };
        if let Some(w) = p.stdin.as_mut() {
            let mut line = serde_json::to_vec(step).unwrap_or_default();
            line.push(b'\n');
            let _ = w.write_all(&line).and_then(|()| w.flush());
        }
    }
}

/// What a run holding the lock says it does on a node: its step, and
/// what it did to the node's service. Written by [`CycleLock::announce`],
/// read by [`activity`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Step {
    /// "cycle: final file pass", "promote: starting the service writable".
    pub step: String,
    /// Where the run left this node's service.
    pub service: ServiceStep,
}

/// Where a run holding the lock left a node's service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ServiceStep {
    /// Not touched (yet): it serves as it did.
    Untouched,
    /// Being stopped, stopped, or being started: users get nothing from
    /// it now, whatever a probe of a moment ago said.
    Down,
    /// Being started again by this run, or started: it holds it down no
    /// more, and the application's own probes tell whether it serves.
    Starting,
}

/// A run that holds a node's lock now, as the node's files say.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Activity {
    /// "host=.. pid=.. started=..": who runs it.
    pub holder: String,
    /// Its last announced step (none yet: it only took the lock).
    pub step: Option<Step>,
}

/// The shell snippet behind [`activity`] over a transport: prints the
/// holder line and the last step line while the lock's `cat` lives.
fn activity_script(node: &Node) -> String {
    let (_, holder) = paths(node);
    format!(
        "h={h}; s={s}; [ -r \"$h\" ] || exit 0; p=$(sed -n 's/.* lockpid=\\([0-9]*\\).*/\\1/p' \"$h\"); \
         [ -n \"$p\" ] && [ -r \"/proc/$p/cmdline\" ] && [ \"$(tr '\\0' ' ' < \"/proc/$p/cmdline\" | cut -d' ' -f1)\" = cat ] || exit 0; \
         head -n 1 \"$h\"; tail -n 1 \"$s\" 2>/dev/null; exit 0",
        h = shell_quote(&holder),
        s = shell_quote(&step_path(node)),
    )
}

fn step_path(node: &Node) -> String {
    format!("{}/cycle.step", node.state_dir)
}

/// The run holding `node`'s lock now, if one does. The lock lives as long
/// as its `cat` (see the module docs), so a crashed run is never reported
/// as running.
pub fn activity(t: &dyn Transport, node: &Node) -> Result<Option<Activity>, String> {
    let out = t
        .exec(&activity_script(node), b"", Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    if !out.success() {
        return Err(format!("exit {}: {}", out.status, out.stderr_tail()));
    }
    Ok(parse_activity(&String::from_utf8_lossy(&out.stdout)))
}

/// [`activity`] from this machine's own files, without a process: for the
/// health server, which runs on the node and answers often.
pub fn local_activity(node: &Node) -> Option<Activity> {
    let (_, holder) = paths(node);
    let h = std::fs::read_to_string(&holder).ok()?;
    let pid = h
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix("lockpid="))?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    if cmdline.split(|&b| b == 0).next() != Some(b"cat") {
        return None;
    }
    let steps = std::fs::read_to_string(step_path(node)).unwrap_or_default();
    let last = steps.lines().last().unwrap_or("");
    parse_activity(&format!("{}\n{last}\n", h.lines().next().unwrap_or("")))
}

fn parse_activity(text: &str) -> Option<Activity> {
    let mut lines = text.lines();
    let holder = lines.next()?.trim();
    if holder.is_empty() {
        return None;
    }
    let holder = holder
        .split_whitespace()
        .filter(|kv| !kv.starts_with("lockpid="))
        .collect::<Vec<_>>()
        .join(" ");
    let step = lines.next().and_then(|l| serde_json::from_str(l).ok());
    Some(Activity { holder, step })
}

impl Drop for CycleLock {
    fn drop(&mut self) {
        for (_, mut p) in self.holders.drain(..) {
            // Closing stdin ends the `cat`; kill in case the channel lingers.
            drop(p.take_stdin());
            p.kill();
            let _ = p.wait();
        }
    }
}

fn paths(node: &Node) -> (String, String) {
    (
        format!("{}/cycle.lock", node.state_dir),
        format!("{}/cycle.holder", node.state_dir),
    )
}

fn try_one(t: &dyn Transport, node: &Node, me: &Holder) -> Result<Option<Process>, LockError> {
    let (lock, holder) = paths(node);
    let script = format!(
        "d={dir}; mkdir -p -m 700 \"$d\" || exit 1; command -v flock >/dev/null || {{ echo 'flock (util-linux) is not on PATH' >&2; exit 1; }}; \
         exec flock -n -E 75 {lock} sh -c ': > \"$3\"; printf \"%s lockpid=%s\\n\" \"$1\" \"$$\" > \"$2\"; echo locked; exec cat > \"$3\"' sh {me} {holder} {step}",
        dir = shell_quote(&node.state_dir),
        lock = shell_quote(&lock),
        me = shell_quote(&me.line()),
        holder = shell_quote(&holder),
        step = shell_quote(&step_path(node)),
    );
    let fail = |detail: String| LockError::Failed {
        node: node.name.clone(),
        detail,
    };
    let mut p = t.spawn(&script).map_err(|e| fail(e.to_string()))?;
    let mut got = Vec::new();
    let mut byte = [0u8; 1];
    while got.len() < 7 {
        match p.stdout.read(&mut byte) {
            Ok(1) => got.push(byte[0]),
            _ => break,
        }
    }
    if got == b"locked\n" {
        return Ok(Some(p));
    }
    let out = p.wait().map_err(|e| fail(e.to_string()))?;
    if out.status == 75 {
        return Ok(None);
    }
    Err(fail(format!(
        "exit {}: {}; check state_dir {}",
        out.status,
        out.stderr_tail(),
        node.state_dir
    )))
}

/// The holder line a node's lock file names, parsed.
fn read_holder(t: &dyn Transport, node: &Node) -> Vec<(String, String)> {
    let (_, holder) = paths(node);
    let out = t
        .exec(
            &format!("cat {}", shell_quote(&holder)),
            b"",
            Some(Duration::from_secs(30)),
        )
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    out.split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn pid_alive(pid: &str) -> bool {
    let Ok(pid) = pid.parse::<i32>() else {
        return true;
    };
    // SAFETY: signal 0 only checks that the process exists.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Take the lock on every node, in order; all or none.
pub fn acquire(nodes: &[(&Node, &dyn Transport)], me: &Holder) -> Result<CycleLock, LockError> {
    let mut lock = CycleLock {
        holders: Vec::new(),
    };
    for (node, t) in nodes {
        let mut taken = try_one(*t, node, me)?;
        if taken.is_none() {
            let h = read_holder(*t, node);
            let get = |k: &str| {
                h.iter()
                    .find(|(key, _)| key == k)
                    .map(|(_, v)| v.clone())
                    .unwrap_or_else(|| "?".into())
            };
            let (host, pid, lockpid) = (get("host"), get("pid"), get("lockpid"));
            // A holder on this host that no longer exists left its channel
            // open: end its `cat` and try once more.
            if host == me.host && !pid_alive(&pid) && lockpid != "?" {
                let _ = t.exec(
                    &format!("kill {}", shell_quote(&lockpid)),
                    b"",
                    Some(Duration::from_secs(30)),
                );
                std::thread::sleep(Duration::from_millis(300));
                taken = try_one(*t, node, me)?;
            }
            if taken.is_none() && host == me.host && pid == me.pid.to_string() {
                return Err(LockError::Failed {
                    node: node.name.clone(),
                    detail: format!(
                        "this cycle already holds {}/cycle.lock for another node: two nodes share this state_dir; give each node a state_dir of its own",
                        node.state_dir
                    ),
                });
            }
            if taken.is_none() {
                return Err(LockError::Held {
                    node: node.name.clone(),
                    holder: format!("host {host}, pid {pid}, started {}", get("started")),
                    host,
                    pid,
                });
            }
        }
        lock.holders
            .push((node.name.clone(), taken.expect("lock taken")));
    }
    Ok(lock)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn activity_is_the_holder_and_its_last_step() {
        let step = Step {
            step: "cycle: database".into(),
            service: ServiceStep::Down,
        };
        let text = format!(
            "host=a pid=7 started=2026-12-08T01:00:00+00:00 lockpid=99\n{}\n",
            serde_json::to_string(&step).unwrap()
        );
        let a = parse_activity(&text).unwrap();
        assert_eq!(a.holder, "host=a pid=7 started=2026-12-08T01:00:00+00:00");
        assert_eq!(a.step, Some(step));
        // Only the lock taken, nothing announced yet.
        let a = parse_activity("host=a pid=7 started=x lockpid=99\n").unwrap();
        assert_eq!(a.step, None);
        // No live holder: nothing printed, no activity.
        assert_eq!(parse_activity(""), None);
        // A torn last line is no step, not an error.
        assert_eq!(
            parse_activity("host=a lockpid=9\n{\"step\": \"cyc")
                .unwrap()
                .step,
            None
        );
    }

    /// The shell snippet `status` and `check` run over SSH, and the
    /// health server's own reading, against a real `cat` as the lock's.
    #[test]
    fn activity_follows_the_lock_holders_cat() {
        let dir = tempfile::tempdir().unwrap();
        let mut node = crate::config::parse_without_files(
            std::path::Path::new("t.toml"),
            crate::config::TEMPLATE,
        )
        .unwrap()
        .nodes
        .remove(0);
        node.state_dir = dir.path().display().to_string();
        let t = crate::transport::on_this_machine(&node.name);
        assert_eq!(activity(&*t, &node).unwrap(), None, "no holder file");
        let mut cat = std::process::Command::new("cat")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let (_, holder) = paths(&node);
        std::fs::write(
            &holder,
            format!("host=h pid=1 started=s lockpid={}\n", cat.id()),
        )
        .unwrap();
        let step = Step {
            step: "cycle: final file pass".into(),
            service: ServiceStep::Down,
        };
        std::fs::write(
            step_path(&node),
            format!(
                "{{\"step\":\"cycle: preflight\",\"service\":\"untouched\"}}\n{}\n",
                serde_json::to_string(&step).unwrap()
            ),
        )
        .unwrap();
        let want = Some(Activity {
            holder: "host=h pid=1 started=s".into(),
            step: Some(step),
        });
        assert_eq!(activity(&*t, &node).unwrap(), want);
        assert_eq!(local_activity(&node), want);
        cat.kill().unwrap();
        cat.wait().unwrap();
        assert_eq!(
            activity(&*t, &node).unwrap(),
            None,
            "the holder's cat is gone"
        );
        assert_eq!(local_activity(&node), None);
    }
}
