//! Hooks: programs the operator configures, run on the machine hasync runs
//! on, with the outcome as environment variables (`HASYNC_*`) and as JSON on
//! stdin. A hook's failure is reported, never fatal: the cycle's outcome is
//! what it is.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How long a hook may run.
pub const HOOK_TIMEOUT: Duration = Duration::from_secs(120);

/// Run `hook` with `env` and `json` on stdin. Returns an error text when it
/// could not run, failed or timed out.
pub fn run(hook: &Path, env: &[(String, String)], json: &str) -> Result<(), String> {
    let mut child = Command::new(hook)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("hook {}: cannot run it: {e}", hook.display()))?;
    if let Some(mut stdin) = child.stdin.take() {
        // A hook that ignores stdin closes it early: not an error.
        let _ = stdin.write_all(json.as_bytes());
    }
    let stderr = child.stderr.take();
    let reader = std::thread::spawn(move || {
        stderr
            .map(|s| std::io::read_to_string(s).unwrap_or_default())
            .unwrap_or_default()
    });
    let started = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if started.elapsed() > HOOK_TIMEOUT => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "hook {}: killed after {} s",
                    hook.display(),
                    HOOK_TIMEOUT.as_secs()
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => return Err(format!("hook {}: {e}", hook.display())),
        }
    };
    let err = reader.join().unwrap_or_default();
    if status.success() {
        Ok(())
    } else {
        Err(format!(
            "hook {} failed ({status}): {}",
            hook.display(),
            err.lines().last().unwrap_or("")
        ))
    }
}
