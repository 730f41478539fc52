//! Process supervision and cleanup for the integration-test cluster.
//!
//! The cluster is made of real servers (sshd, mariadbd, postgres) that the
//! test binary starts as child processes. They must never outlive the test
//! process: not after a panicking test, not after Ctrl-C, and not after
//! `kill -9`. Leaked servers hold ports, memory and files in `/tmp`, and
//! they make the next run flaky. There are three layers of defence:
//!
//! 1. **Parent-death signal.** Every server (and every long initialiser such
//!    as `initdb`) is forked by one dedicated, never-exiting *spawner* thread
//!    that sets `prctl(PR_SET_PDEATHSIG, SIGKILL)` in `pre_exec`. Linux sends
//!    that signal when the **thread** that forked the child exits, not when
//!    the process exits. If short-lived libtest worker threads did the
//!    spawning, every server would be SIGKILLed as soon as the test that
//!    happened to start the cluster finished. That is why the spawner thread
//!    exists and must live forever. This layer also covers `kill -9` of the
//!    test binary.
//! 2. **`atexit` handler.** libtest leaves through `exit()` (via
//!    `process::exit` when a test failed, by returning from `main`
//!    otherwise), so C `atexit` handlers run. Ours stops every live child
//!    (its stop signal, a short grace period, then SIGKILL). It also kills
//!    processes that are *not* our children: the fake application
//!    daemonised by `app.py start` over SSH, which is found by pidfile,
//!    sshd's per-connection processes, and anything else whose command line
//!    mentions the run directory. Then it removes the run directory.
//!    SIGINT, SIGTERM and SIGHUP are turned into a normal `exit()` by a
//!    watcher thread, so Ctrl-C and CI timeouts get the same cleanup.
//! 3. **Stale sweep.** Whatever survives a `kill -9` (the run directory and
//!    the daemonised fake app) is removed by the next run. Each
//!    `/tmp/hasync-it-<pid>` whose owner process is gone is swept: first
//!    every process whose command line mentions that directory is killed,
//!    then the directory is deleted. The owner is identified by pid *and*
//!    process start time, so pid reuse (for example the same pid in every
//!    fresh CI container) cannot fool the sweep.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::mpsc;
use std::sync::{Mutex, MutexGuard, Once, OnceLock, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

/// Parent directory of the run directories. It is always `/tmp`, not
/// `$TMPDIR`: Unix socket paths must stay below 108 bytes, and the
/// unprivileged `postgres` user must be able to traverse the path.
pub const RUN_DIR_PARENT: &str = "/tmp";
/// Run directories are named `<RUN_DIR_PARENT>/<RUN_DIR_PREFIX><pid>`.
pub const RUN_DIR_PREFIX: &str = "hasync-it-";
/// File in the run directory that records "`<pid> <start time>`" of its owner.
pub const OWNER_FILE: &str = ".owner";
/// If this environment variable is set (to anything but `0`), the run
/// directory is kept at exit for post-mortem inspection. Processes are still
/// stopped, and the next run sweeps the directory.
pub const KEEP_ENV: &str = "HASYNC_IT_KEEP";

/// How long the exit handler waits for children to stop politely before
/// killing them outright.
const EXIT_GRACE: Duration = Duration::from_secs(3);

/// Writes a line to stderr and ignores errors. `eprintln!` panics when
/// stderr is a broken pipe, for example when the process that read our output
/// is gone. A panic in the cleanup path would leave the servers running.
pub fn note(msg: &str) {
    let _ = writeln!(io::stderr(), "{msg}");
}

/// Locks a mutex and ignores poisoning. A test that panics while holding a
/// harness lock must not break every later test.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Panics unless we run as root. sshd can only log in as root when run as
/// root, and `postgres` can only be started under another uid by root.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        panic!(
            "hasync integration tests must run as root: the harness starts sshd that \
             accepts logins as root and runs PostgreSQL as the `postgres` user"
        );
    }
}

/// One-time process-wide setup: spawner thread, `atexit` handler, and
/// signal handlers. Idempotent.
pub fn init() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        spawner();
        // SAFETY: registering a plain `extern "C" fn()` is always sound.
        unsafe {
            libc::atexit(at_exit);
        }
        install_signal_handlers();
    });
}

// ---------------------------------------------------------------------------
// Global bookkeeping used by the exit handler
// ---------------------------------------------------------------------------

struct LiveChild {
    pid: i32,
    stop_signal: i32,
}

struct State {
    base: Option<PathBuf>,
    live: Vec<LiveChild>,
    pidfiles: Vec<PathBuf>,
}

static STATE: Mutex<State> = Mutex::new(State {
    base: None,
    live: Vec::new(),
    pidfiles: Vec::new(),
});

fn register_child(pid: i32, stop_signal: i32) {
    lock(&STATE).live.push(LiveChild { pid, stop_signal });
}

fn unregister_child(pid: i32) {
    lock(&STATE).live.retain(|c| c.pid != pid);
}

/// Registers a pidfile of a process that is *not* our child, for example
/// the fake app daemonised over SSH. At exit the process named in it is
/// killed together with its process group, but only if its command line
/// mentions the run directory, which guards against pid reuse.
pub fn register_pidfile(path: &Path) {
    lock(&STATE).pidfiles.push(path.to_path_buf());
}

// ---------------------------------------------------------------------------
// Run directory
// ---------------------------------------------------------------------------

/// Creates the private run directory `/tmp/hasync-it-<pid>` (mode 0755),
/// after sweeping stale ones. Must be called at most once per process.
pub fn create_run_dir() -> PathBuf {
    static CREATED: AtomicBool = AtomicBool::new(false);
    assert!(
        !CREATED.swap(true, Ordering::SeqCst),
        "hasync-it: create_run_dir called twice"
    );
    init();
    sweep_stale_run_dirs();
    let me = std::process::id();
    let base = Path::new(RUN_DIR_PARENT).join(format!("{RUN_DIR_PREFIX}{me}"));
    if base.exists() {
        // An earlier process had our pid (common in containers) and died
        // hard. We have not created this directory, so it is stale.
        kill_processes_mentioning(&base);
        remove_dir_all_retry(&base);
    }
    fs::create_dir(&base)
        .unwrap_or_else(|e| panic!("hasync-it: cannot create {}: {e}", base.display()));
    fs::set_permissions(&base, fs::Permissions::from_mode(0o755))
        .unwrap_or_else(|e| panic!("hasync-it: chmod {}: {e}", base.display()));
    // Written atomically: a concurrent sweep must never see a half-written
    // owner file.
    let start = proc_info(me as i32).map_or(0, |p| p.starttime);
    let tmp = base.join(format!("{OWNER_FILE}.tmp"));
    fs::write(&tmp, format!("{me} {start}\n"))
        .and_then(|()| fs::rename(&tmp, base.join(OWNER_FILE)))
        .unwrap_or_else(|e| panic!("hasync-it: cannot write owner file: {e}"));
    fs::create_dir(base.join("pids"))
        .unwrap_or_else(|e| panic!("hasync-it: cannot create pids dir: {e}"));
    lock(&STATE).base = Some(base.clone());
    base
}

/// The run directory of this process, if it has been created.
pub fn run_dir() -> Option<PathBuf> {
    lock(&STATE).base.clone()
}

/// True if the process that owns run directory `dir` (named after `pid`) is
/// still alive. Ownership is checked by pid and start time.
fn owner_alive(dir: &Path, pid: i32) -> bool {
    let owner = fs::read_to_string(dir.join(OWNER_FILE)).ok().and_then(|s| {
        let mut it = s.split_whitespace();
        Some((
            it.next()?.parse::<i32>().ok()?,
            it.next()?.parse::<u64>().ok()?,
        ))
    });
    match owner {
        Some((opid, start)) => {
            proc_info(opid).is_some_and(|p| p.starttime == start && !p.is_zombie())
        }
        // No (valid) owner file: the directory is being created right now,
        // or it is broken. Trust the pid in the name only.
        None => is_alive(pid),
    }
}

/// Removes every `/tmp/hasync-it-<pid>` whose owner process is gone. Before
/// deleting a directory it kills every process that still mentions it (a
/// daemonised fake app, or servers that somehow survived). Returns the swept
/// directories.
pub fn sweep_stale_run_dirs() -> Vec<PathBuf> {
    let mut swept = Vec::new();
    let Ok(entries) = fs::read_dir(RUN_DIR_PARENT) else {
        return swept;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(RUN_DIR_PREFIX))
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        if !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let dir = entry.path();
        if owner_alive(&dir, pid) {
            continue;
        }
        kill_processes_mentioning(&dir);
        remove_dir_all_retry(&dir);
        swept.push(dir);
    }
    swept
}

/// `remove_dir_all` with a few retries. Processes that were just SIGKILLed
/// may still create files for a few milliseconds.
pub fn remove_dir_all_retry(dir: &Path) {
    for _ in 0..20 {
        match fs::remove_dir_all(dir) {
            Ok(()) => return,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return,
            Err(_) => thread::sleep(Duration::from_millis(50)),
        }
    }
    if let Err(e) = fs::remove_dir_all(dir) {
        note(&format!(
            "hasync-it: warning: cannot remove {}: {e}",
            dir.display()
        ));
    }
}

// ---------------------------------------------------------------------------
// /proc helpers
// ---------------------------------------------------------------------------

/// The fields of `/proc/<pid>/stat` that the harness needs.
#[derive(Clone, Debug)]
pub struct ProcInfo {
    pub pid: i32,
    pub ppid: i32,
    pub pgrp: i32,
    pub state: char,
    pub comm: String,
    /// Start time in clock ticks since boot. Together with `pid` it
    /// identifies a process uniquely.
    pub starttime: u64,
}

impl ProcInfo {
    pub fn is_zombie(&self) -> bool {
        matches!(self.state, 'Z' | 'X' | 'x')
    }
}

/// Parses `/proc/<pid>/stat`. Returns `None` if the process does not exist.
pub fn proc_info(pid: i32) -> Option<ProcInfo> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // comm may contain spaces and parentheses: it spans from the first '('
    // to the last ')'.
    let open = s.find('(')?;
    let close = s.rfind(')')?;
    let comm = s.get(open + 1..close)?.to_string();
    let rest: Vec<&str> = s.get(close + 1..)?.split_whitespace().collect();
    Some(ProcInfo {
        pid,
        state: rest.first()?.chars().next()?,
        ppid: rest.get(1)?.parse().ok()?,
        pgrp: rest.get(2)?.parse().ok()?,
        // field 22 of stat; `rest` starts at field 3
        starttime: rest.get(19)?.parse().ok()?,
        comm,
    })
}

/// All processes currently visible in `/proc`.
pub fn all_procs() -> Vec<ProcInfo> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(proc_info)
        .collect()
}

/// True if `pid` exists and is not a zombie. Zombies count as dead because
/// in containers without a reaping init they linger forever.
pub fn is_alive(pid: i32) -> bool {
    pid > 0 && proc_info(pid).is_some_and(|p| !p.is_zombie())
}

/// The command line of `pid`, with NULs replaced by spaces. Empty if gone.
pub fn cmdline(pid: i32) -> String {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

/// All transitive descendants of `root`, found by following parent pids.
/// Processes that were reparented after their parent died are not found.
pub fn descendants(procs: &[ProcInfo], root: i32) -> Vec<i32> {
    let mut children: HashMap<i32, Vec<i32>> = HashMap::new();
    for p in procs {
        children.entry(p.ppid).or_default().push(p.pid);
    }
    let mut out = Vec::new();
    let mut todo = vec![root];
    while let Some(pid) = todo.pop() {
        for &c in children.get(&pid).map(Vec::as_slice).unwrap_or(&[]) {
            out.push(c);
            todo.push(c);
        }
    }
    out
}

/// Sends `sig` to `pid`. A negative `pid` means a process group. Errors
/// such as ESRCH are ignored.
pub fn signal(pid: i32, sig: i32) {
    if pid == 0 || pid == -1 {
        return; // never signal our own group or everything
    }
    // SAFETY: kill has no memory-safety preconditions.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// SIGKILLs every process (and the process group it leads) whose command
/// line mentions `dir/`, except this process and its own process group.
/// Then it waits up to 2 s for them to disappear. Returns how many
/// processes were hit.
pub fn kill_processes_mentioning(dir: &Path) -> usize {
    let needle = format!("{}/", dir.display());
    let me = std::process::id() as i32;
    // SAFETY: getpgrp has no preconditions.
    let my_pgrp = unsafe { libc::getpgrp() };
    let mut hit = Vec::new();
    for p in all_procs() {
        if p.pid == me || p.pid <= 1 || p.is_zombie() || !cmdline(p.pid).contains(&needle) {
            continue;
        }
        if p.pgrp == p.pid && p.pgrp != my_pgrp {
            signal(-p.pgrp, libc::SIGKILL);
        }
        signal(p.pid, libc::SIGKILL);
        hit.push(p.pid);
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    while hit.iter().any(|&p| is_alive(p)) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(10));
    }
    hit.len()
}

/// Reads the first whitespace-separated token of a pidfile as a pid.
pub fn read_pidfile(path: &Path) -> Option<i32> {
    fs::read_to_string(path)
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
        .filter(|&p: &i32| p > 1)
}

// ---------------------------------------------------------------------------
// The spawner thread
// ---------------------------------------------------------------------------

struct SpawnRequest {
    cmd: Command,
    reply: mpsc::Sender<io::Result<Child>>,
}

fn spawner() -> &'static mpsc::Sender<SpawnRequest> {
    static SPAWNER: OnceLock<mpsc::Sender<SpawnRequest>> = OnceLock::new();
    SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        thread::Builder::new()
            .name("hasync-it-spawner".into())
            .spawn(move || {
                // The sender lives in a static and is never dropped, so this
                // loop never ends. That matters: if this thread exited, the
                // kernel would SIGKILL every server it spawned
                // (PR_SET_PDEATHSIG). For the same reason a panic must not
                // unwind out of it.
                while let Ok(SpawnRequest { mut cmd, reply }) = rx.recv() {
                    let res = panic::catch_unwind(AssertUnwindSafe(|| spawn_here(&mut cmd)))
                        .unwrap_or_else(|_| Err(io::Error::other("spawn panicked")));
                    let _ = reply.send(res);
                }
            })
            .expect("hasync-it: cannot start the spawner thread");
        tx
    })
}

fn spawn_here(cmd: &mut Command) -> io::Result<Child> {
    // SAFETY: getpid has no preconditions.
    let parent = unsafe { libc::getpid() };
    // SAFETY: the closure only calls async-signal-safe functions (prctl,
    // getppid) and allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            // std applies setuid/setgid *before* pre_exec hooks, so this runs
            // after the credential change that would otherwise clear the
            // parent-death signal.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) == -1 {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died between fork and prctl.
            if libc::getppid() != parent {
                return Err(io::Error::other("test process died during spawn"));
            }
            Ok(())
        });
    }
    cmd.spawn()
}

/// Spawns `cmd` from the spawner thread, with a parent-death SIGKILL.
pub fn spawn(cmd: Command) -> io::Result<Child> {
    let (reply, rx) = mpsc::channel();
    let gone = || io::Error::other("hasync-it spawner thread is gone");
    spawner()
        .send(SpawnRequest { cmd, reply })
        .map_err(|_| gone())?;
    rx.recv().map_err(|_| gone())?
}

/// Opens `path` for appending (creating it with mode 0644).
pub fn open_log(path: &Path) -> File {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("hasync-it: cannot open log {}: {e}", path.display()))
}

/// The last `lines` lines of a log file (at most the last 16 KiB are read).
pub fn log_tail(path: &Path, lines: usize) -> String {
    let Ok(mut f) = File::open(path) else {
        return format!("(no log at {})", path.display());
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(16 * 1024)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Runs a one-shot helper (`initdb`, `mariadb-install-db`, `ssh-keygen`,
/// ...) through the spawner. Its output is appended to `log`. Panics with
/// the tail of the log on failure or after `timeout`.
pub fn run_logged(mut cmd: Command, what: &str, log: &Path, timeout: Duration) {
    let mut f = open_log(log);
    let _ = writeln!(f, "---- hasync-it: running {what}: {cmd:?}");
    let out = f.try_clone().expect("hasync-it: dup log fd");
    cmd.stdin(Stdio::null())
        .stdout(out)
        .stderr(f)
        .process_group(0);
    let mut child = spawn(cmd).unwrap_or_else(|e| panic!("hasync-it: cannot run {what}: {e}"));
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(st)) if st.success() => return,
            Ok(Some(st)) => panic!(
                "hasync-it: {what} failed ({st}); last lines of {}:\n{}",
                log.display(),
                log_tail(log, 40)
            ),
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(10)),
            Ok(None) => {
                signal(-(child.id() as i32), libc::SIGKILL);
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "hasync-it: {what} timed out after {timeout:?}; last lines of {}:\n{}",
                    log.display(),
                    log_tail(log, 40)
                );
            }
            Err(e) => panic!("hasync-it: waiting for {what}: {e}"),
        }
    }
}

// ---------------------------------------------------------------------------
// Supervised long-running servers
// ---------------------------------------------------------------------------

/// Builds a fresh `Command` for each (re)start of a server.
pub type CommandBuilder = Box<dyn Fn() -> Command + Send + Sync>;

/// A long-running server child that can be stopped and restarted with the
/// same command line (and therefore the same port). stdout and stderr go
/// to `log` (appended across restarts). The child runs in its own process
/// group, so a terminal's Ctrl-C reaches only the test binary, which then
/// cleans up in order.
pub struct Server {
    name: String,
    log: PathBuf,
    pidfile: PathBuf,
    build: CommandBuilder,
    stop_signal: i32,
    /// Descendants whose `comm` starts with this are killed on stop. For
    /// sshd these are the per-connection processes (`sshd`, or
    /// `sshd-session` in OpenSSH 9.8+). They call `setsid()`, so they are not
    /// in the listener's process group, and they would keep established
    /// connections alive after the listener is gone.
    kill_descendants_named: Option<&'static str>,
    child: Mutex<Option<Child>>,
}

impl Server {
    /// `pids_dir` receives `<name>.pid` while the server runs, for humans
    /// and for the self-tests. `stop_signal` is the signal for a clean,
    /// fast shutdown.
    pub fn new(
        name: &str,
        log: &Path,
        pids_dir: &Path,
        stop_signal: i32,
        build: CommandBuilder,
    ) -> Server {
        Server {
            name: name.to_string(),
            log: log.to_path_buf(),
            pidfile: pids_dir.join(format!("{name}.pid")),
            build,
            stop_signal,
            kill_descendants_named: None,
            child: Mutex::new(None),
        }
    }

    /// See the field doc of `kill_descendants_named`.
    pub fn kill_descendants_named(mut self, comm_prefix: &'static str) -> Server {
        self.kill_descendants_named = Some(comm_prefix);
        self
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn log(&self) -> &Path {
        &self.log
    }

    /// Spawns the server unless it is already running. It does not wait for
    /// readiness (see [`Server::wait_ready`]). Returns the pid.
    pub fn spawn(&self) -> u32 {
        let mut guard = lock(&self.child);
        if let Some(child) = guard.as_mut() {
            if matches!(child.try_wait(), Ok(None)) {
                return child.id();
            }
            unregister_child(child.id() as i32); // it died on its own
        }
        let mut cmd = (self.build)();
        let mut log = open_log(&self.log);
        let _ = writeln!(log, "---- hasync-it: starting {}: {cmd:?}", self.name);
        let out = log.try_clone().expect("hasync-it: dup log fd");
        cmd.stdin(Stdio::null())
            .stdout(out)
            .stderr(log)
            .process_group(0);
        let child =
            spawn(cmd).unwrap_or_else(|e| panic!("hasync-it: cannot start {}: {e}", self.name));
        let pid = child.id();
        register_child(pid as i32, self.stop_signal);
        let _ = fs::write(&self.pidfile, format!("{pid}\n"));
        *guard = Some(child);
        pid
    }

    /// Polls `probe` every 20 ms until it returns true. Panics with the log
    /// tail if the server exits first or `timeout` elapses.
    pub fn wait_ready(&self, what: &str, timeout: Duration, mut probe: impl FnMut() -> bool) {
        let t0 = Instant::now();
        loop {
            if let Some(status) = self.exit_status() {
                panic!(
                    "hasync-it: {} exited ({status}) before {what}; last lines of {}:\n{}",
                    self.name,
                    self.log.display(),
                    log_tail(&self.log, 40)
                );
            }
            if probe() {
                return;
            }
            if t0.elapsed() > timeout {
                panic!(
                    "hasync-it: {} not ready ({what}) after {timeout:?}; last lines of {}:\n{}",
                    self.name,
                    self.log.display(),
                    log_tail(&self.log, 40)
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// `Some(description)` if the server is not running.
    fn exit_status(&self) -> Option<String> {
        match lock(&self.child).as_mut() {
            None => Some("not started".into()),
            Some(c) => match c.try_wait() {
                Ok(None) => None,
                Ok(Some(st)) => Some(st.to_string()),
                Err(e) => Some(e.to_string()),
            },
        }
    }

    pub fn is_running(&self) -> bool {
        self.exit_status().is_none()
    }

    pub fn pid(&self) -> Option<u32> {
        let mut guard = lock(&self.child);
        let child = guard.as_mut()?;
        matches!(child.try_wait(), Ok(None)).then(|| child.id())
    }

    /// Clean shutdown with the stop signal. Escalates to SIGKILL after 30 s.
    /// No-op if not running.
    pub fn stop(&self) {
        self.terminate(self.stop_signal, Duration::from_secs(30));
    }

    /// Abrupt SIGKILL of the server and its whole process group, as in a
    /// crash or power loss. No-op if not running.
    pub fn kill(&self) {
        self.terminate(libc::SIGKILL, Duration::from_secs(10));
    }

    fn terminate(&self, sig: i32, grace: Duration) {
        let mut guard = lock(&self.child);
        let Some(mut child) = guard.take() else {
            return;
        };
        let pid = child.id() as i32;
        let extra: Vec<i32> = match self.kill_descendants_named {
            Some(comm) => {
                let procs = all_procs();
                descendants(&procs, pid)
                    .into_iter()
                    .filter(|d| {
                        procs
                            .iter()
                            .any(|p| p.pid == *d && p.comm.starts_with(comm))
                    })
                    .collect()
            }
            None => Vec::new(),
        };
        if matches!(child.try_wait(), Ok(None)) {
            signal(pid, sig);
            let deadline = Instant::now() + grace;
            loop {
                match child.try_wait() {
                    Ok(Some(_)) => break,
                    Ok(None) if Instant::now() < deadline => {
                        thread::sleep(Duration::from_millis(10));
                    }
                    _ => {
                        note(&format!(
                            "hasync-it: {} did not stop within {grace:?}; killing it",
                            self.name
                        ));
                        signal(-pid, libc::SIGKILL);
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                }
            }
        } else {
            let _ = child.wait();
        }
        // Leftover group members (postgres backends after a SIGKILL of the
        // postmaster) would block an immediate restart, so wait for them.
        signal(-pid, libc::SIGKILL);
        for d in extra {
            signal(d, libc::SIGKILL);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline
            && all_procs()
                .iter()
                .any(|p| p.pgrp == pid && p.pid != pid && !p.is_zombie())
        {
            thread::sleep(Duration::from_millis(10));
        }
        unregister_child(pid);
        let _ = fs::remove_file(&self.pidfile);
        let mut log = open_log(&self.log);
        let _ = writeln!(log, "---- hasync-it: stopped {} (signal {sig})", self.name);
    }
}

// ---------------------------------------------------------------------------
// Exit and signal handling
// ---------------------------------------------------------------------------

extern "C" fn at_exit() {
    // A panic must not unwind into libc.
    let _ = panic::catch_unwind(cleanup_at_exit);
}

/// Stops everything this process started and removes the run directory.
/// Runs from `atexit`. Exposed for the self-tests.
pub fn cleanup_at_exit() {
    // Another thread may hold the lock while the process exits; do not
    // deadlock. PR_SET_PDEATHSIG still kills the servers in that case.
    let deadline = Instant::now() + Duration::from_secs(1);
    let mut state = loop {
        match STATE.try_lock() {
            Ok(g) => break g,
            Err(std::sync::TryLockError::Poisoned(p)) => break p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) if Instant::now() < deadline => {
                thread::sleep(Duration::from_millis(10));
            }
            Err(std::sync::TryLockError::WouldBlock) => return,
        }
    };
    let live = std::mem::take(&mut state.live);
    let pidfiles = std::mem::take(&mut state.pidfiles);
    let base = state.base.take();
    drop(state);
    if live.is_empty() && pidfiles.is_empty() && base.is_none() {
        return;
    }

    // Collect descendants (sshd connection processes and what runs under
    // them) before the parents die and they get reparented.
    let procs = all_procs();
    let desc: Vec<i32> = live
        .iter()
        .flat_map(|c| descendants(&procs, c.pid))
        .collect();

    // Polite stop, short grace, then SIGKILL for the whole process group.
    for c in &live {
        signal(c.pid, c.stop_signal);
    }
    let deadline = Instant::now() + EXIT_GRACE;
    let mut pending: Vec<i32> = live.iter().map(|c| c.pid).collect();
    while !pending.is_empty() && Instant::now() < deadline {
        // SAFETY: waitpid with a valid out-pointer. It returns 0 while the
        // child runs, its pid when reaped, and -1 if it was reaped elsewhere.
        pending
            .retain(|&pid| unsafe { libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG) } == 0);
        if !pending.is_empty() {
            thread::sleep(Duration::from_millis(10));
        }
    }
    for c in &live {
        signal(-c.pid, libc::SIGKILL);
        signal(c.pid, libc::SIGKILL);
    }
    for d in desc {
        signal(d, libc::SIGKILL);
    }

    // Processes that are not our children: the fake app (by pidfile) and
    // anything else mentioning the run directory.
    if let Some(base) = &base {
        let needle = format!("{}/", base.display());
        for f in &pidfiles {
            let pid = read_pidfile(f).filter(|&pid| cmdline(pid).contains(&needle));
            if let Some(pid) = pid {
                signal(-pid, libc::SIGKILL);
                signal(pid, libc::SIGKILL);
            }
        }
        kill_processes_mentioning(base);
        if std::env::var_os(KEEP_ENV).is_some_and(|v| v != "0") {
            note(&format!(
                "hasync-it: keeping {} ({KEEP_ENV} is set)",
                base.display()
            ));
        } else {
            remove_dir_all_retry(base);
        }
    }
}

static SIGNAL_PIPE: AtomicI32 = AtomicI32::new(-1);
const CLEANUP_SIGNALS: [i32; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

extern "C" fn on_signal(sig: libc::c_int) {
    // Only async-signal-safe work here: hand the signal to the watcher thread.
    let fd = SIGNAL_PIPE.load(Ordering::Relaxed);
    let byte = sig as u8;
    if fd >= 0 {
        // SAFETY: write(2) is async-signal-safe; the buffer is valid.
        unsafe {
            libc::write(fd, (&byte as *const u8).cast(), 1);
        }
    }
}

/// Turns SIGINT, SIGTERM and SIGHUP into `exit(128 + sig)` from a watcher
/// thread, so the `atexit` cleanup runs. Signals that are not at their
/// default disposition (for example SIGHUP ignored under `nohup`) are left
/// alone. A second signal kills the process the default way.
fn install_signal_handlers() {
    let mut fds = [-1; 2];
    // SAFETY: fds is a valid two-element array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return;
    }
    let rd = fds[0];
    SIGNAL_PIPE.store(fds[1], Ordering::Relaxed);
    let watcher = thread::Builder::new()
        .name("hasync-it-signals".into())
        .spawn(move || {
            let mut byte = 0u8;
            loop {
                // SAFETY: reading one byte into a valid buffer.
                let n = unsafe { libc::read(rd, (&mut byte as *mut u8).cast(), 1) };
                if n == 1 {
                    break;
                }
                if n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return;
            }
            let sig = i32::from(byte);
            for s in CLEANUP_SIGNALS {
                // SAFETY: restoring the default disposition.
                unsafe {
                    libc::signal(s, libc::SIG_DFL);
                }
            }
            note(&format!(
                "hasync-it: caught signal {sig}; stopping the test cluster"
            ));
            std::process::exit(128 + sig);
        });
    if watcher.is_err() {
        return;
    }
    for sig in CLEANUP_SIGNALS {
        // SAFETY: sigaction with valid pointers; the handler is
        // async-signal-safe.
        unsafe {
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(sig, std::ptr::null(), &mut old) != 0
                || old.sa_sigaction != libc::SIG_DFL
            {
                continue;
            }
            let mut new: libc::sigaction = std::mem::zeroed();
            new.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            new.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut new.sa_mask);
            libc::sigaction(sig, &new, std::ptr::null_mut());
        }
    }
}
