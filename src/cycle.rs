//! The replication cycle: what `hasync sync` runs, from cron or the daemon.
//!
//! preflight → lock → warm file pass (services still running) → stop the
//! standbys' services, then the primary's → final file pass (only what
//! changed since the warm pass) → database phase → start the primary
//! (health) → start the standbys (read-only) → record, hooks.
//!
//! **Restart guarantee.** Whatever the cycle stopped it starts again before
//! it returns: on success, on every error, and on SIGINT / SIGTERM (the
//! signal thread runs the same [`Cycle::finish`], then exits 130; a second
//! signal aborts at once). The primary is started first and as early as
//! consistency allows: after the database phase, or, with `[database]
//! early_restart`, as soon as the dump's snapshot is taken. If a start
//! fails, the error says which node's service is down and why.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Serialize;

use crate::config::{Config, Node};
use crate::db::replicate::{self as dbrep, DbProgress, DbSummary};
use crate::lock::{self, CycleLock, Holder, ServiceStep, Step};
use crate::roles;
use crate::service;
use crate::state::{self, CycleRecord, PhaseTime};
use crate::sync::{self, Conn, Progress, SyncOptions};
use crate::transport::Transport;

/// What the CLI gives the cycle: log lines and progress displays.
pub trait CycleUi: Send + Sync {
    fn info(&self, msg: &str);
    fn warn(&self, msg: &str);
    fn files_progress(&self, node: &str) -> Box<dyn Progress>;
    fn db_progress(&self, node: &str) -> Box<dyn DbProgress>;
    /// A wait without a total begins on `node` (`what`: what is awaited,
    /// e.g. a service stopping, with its command and deadline); shown until
    /// the returned value is dropped.
    fn waiting(&self, _node: &str, _what: &str) -> Box<dyn Waiting> {
        Box::new(())
    }
}

/// A wait being shown (a spinner, a log line now and then); it ends when
/// dropped.
pub trait Waiting: Send {}
impl Waiting for () {}

/// What a service wait on `node` is for, as a progress display says it.
fn service_wait(node: &Node, starting: bool) -> String {
    let Some(s) = &node.service else {
        return String::new();
    };
    if starting {
        format!(
            "starting the service: `{}`, then `{}` until running{} (at most {} s)",
            s.start,
            s.status,
            s.health_url
                .as_ref()
                .map(|u| format!(" and {u} answers 2xx"))
                .unwrap_or_default()
                + if s.writable_check.is_some() {
                    " and its writable_check says it runs in its role's mode"
                } else {
                    ""
                },
            s.timeout.as_secs()
        )
    } else {
        format!(
            "stopping the service: `{}`, then `{}` until stopped (at most {} s)",
            s.stop,
            s.status,
            s.timeout.as_secs()
        )
    }
}

#[derive(Debug, Clone, Default)]
pub struct CycleOptions {
    pub checksum: bool,
    pub max_delete: Option<u64>,
    /// Only this standby.
    pub to: Option<String>,
    /// A planned switchover: after the database phase, the standby becomes
    /// the primary (see [`Cycle::switch_roles`]).
    pub switchover: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct FilePass {
    pub standby: String,
    pub created: u64,
    pub updated: u64,
    pub deleted: u64,
    pub bytes: u64,
    pub secs: f64,
}

/// What a cycle did.
#[derive(Debug, Clone, Serialize)]
pub struct CycleReport {
    pub outcome: String,
    pub reason: Option<String>,
    pub primary: String,
    pub standbys: Vec<String>,
    pub started: String,
    pub ended: String,
    pub secs: f64,
    /// How long the primary's service was down.
    pub outage_secs: Option<f64>,
    pub phases: Vec<PhaseTime>,
    pub files: Vec<FilePass>,
    pub databases: Vec<DbSummary>,
    /// Services that could not be started again, with why.
    pub still_down: Vec<String>,
    /// A switchover got past its point of no return: the standby's record
    /// says primary (whatever failed after that).
    pub roles_swapped: bool,
    pub warnings: Vec<String>,
}

#[derive(Default)]
struct Progress_ {
    /// Indices into `Cycle::nodes` of the services this cycle stopped, in
    /// stop order, not yet started again.
    stopped: Vec<usize>,
    phases: Vec<PhaseTime>,
    outage_start: Option<Instant>,
    outage: Option<f64>,
    files: Vec<FilePass>,
    databases: Vec<DbSummary>,
    warnings: Vec<String>,
    /// Set by the first `finish`; nothing runs after it.
    finished: bool,
}

pub struct Cycle {
    config: Config,
    nodes: Vec<Node>,
    transports: Vec<Arc<dyn Transport>>,
    primary: usize,
    standbys: Vec<usize>,
    /// The primary's epoch (the standbys share it).
    epoch: u64,
    /// A switchover's cycle (see [`Cycle::switch_roles`]).
    switchover: bool,
    /// Set by a switchover once the standby's record says primary: from
    /// then on the standby is the node whose service serves users (it is
    /// started first, and its start ends the outage).
    switched: std::sync::atomic::AtomicBool,
    ui: Arc<dyn CycleUi>,
    started_at: String,
    started: Instant,
    state: Mutex<Progress_>,
    /// The phase running now, under its own lock: `state` is held while a
    /// service stops or starts (minutes, for a Tomcat), and a signal must
    /// be able to name the phase and stop the cycle at once.
    phase: Mutex<Option<(String, Instant)>>,
    /// Set by the signal handler before anything else: from then on no
    /// service is stopped and no phase begins (a signal during the
    /// standby's stop used to let the cycle stop the primary as well).
    interruption: Mutex<Option<CycleError>>,
    lock: Mutex<Option<CycleLock>>,
    /// Per node (index into `nodes`): where this cycle left its service,
    /// as announced to the node (see [`Cycle::announce`]).
    service_steps: Mutex<Vec<ServiceStep>>,
}

/// Why a cycle stopped early.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{step}: {detail}")]
pub struct CycleError {
    pub step: String,
    pub detail: String,
}

/// The step of a start whose application came up in the wrong mode.
const MODE_CHECK: &str = "mode check";

fn err(step: &str, detail: impl std::fmt::Display) -> CycleError {
    CycleError {
        step: step.to_string(),
        detail: detail.to_string(),
    }
}

impl Cycle {
    /// Connect to every node (in parallel) and decide the direction from
    /// their state records (see [`crate::roles`]). Nothing is changed, but
    /// for fencing an old primary found on the way.
    pub fn connect(
        config: &Config,
        opts: &CycleOptions,
        ui: Arc<dyn CycleUi>,
    ) -> Result<Arc<Cycle>, CycleError> {
        let (transports, mut records) =
            roles::connect_all(config).map_err(|e| err("preflight", e))?;
        let resolved =
            roles::resolve_and_fence(config, &transports, &mut records, opts.to.as_deref())
                .map_err(|e| err("roles", e))?;
        if opts.switchover && resolved.standbys.len() != 1 {
            return Err(err(
                "switchover",
                format!(
                    "{} standbys; name the one to switch to: hasync switchover --to NODE",
                    resolved.standbys.len()
                ),
            ));
        }
        for s in &resolved.skipped {
            ui.warn(&format!("left out of this cycle: {s}"));
        }
        Ok(Arc::new(Cycle {
            config: config.clone(),
            nodes: config.nodes.clone(),
            transports,
            primary: resolved.primary,
            epoch: records[resolved.primary].epoch,
            switchover: opts.switchover,
            standbys: resolved.standbys,
            switched: std::sync::atomic::AtomicBool::new(false),
            ui,
            started_at: state::now(),
            started: Instant::now(),
            state: Mutex::new(Progress_::default()),
            phase: Mutex::new(None),
            interruption: Mutex::new(None),
            lock: Mutex::new(None),
            service_steps: Mutex::new(vec![ServiceStep::Untouched; config.nodes.len()]),
        }))
    }

    /// The primary's name, its standbys' names and its epoch.
    pub fn direction(&self) -> (String, Vec<String>, u64) {
        (
            self.nodes[self.primary].name.clone(),
            self.standbys
                .iter()
                .map(|&s| self.nodes[s].name.clone())
                .collect(),
            self.epoch,
        )
    }

    /// The node whose service users reach: the primary, or after a
    /// switchover's swap the old standby.
    fn serving(&self) -> usize {
        if self.switched.load(std::sync::atomic::Ordering::SeqCst) {
            self.standbys[0]
        } else {
            self.primary
        }
    }

    /// The primary, then the standbys of this cycle.
    fn participants(&self) -> Vec<usize> {
        let mut v = vec![self.primary];
        v.extend(&self.standbys);
        v
    }

    fn st(&self) -> std::sync::MutexGuard<'_, Progress_> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn t(&self, i: usize) -> &dyn Transport {
        &*self.transports[i]
    }

    fn phase(&self) -> std::sync::MutexGuard<'_, Option<(String, Instant)>> {
        self.phase.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn interruption(&self) -> std::sync::MutexGuard<'_, Option<CycleError>> {
        self.interruption.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the cycle must not go on: a signal came, or it is finishing.
    fn aborting(&self, st: &Progress_) -> bool {
        st.finished || self.interruption().is_some()
    }

    fn begin(&self, phase: &str) -> Result<(), CycleError> {
        if self.aborting(&self.st()) {
            return Err(err(phase, "the cycle is being aborted"));
        }
        *self.phase() = Some((phase.to_string(), Instant::now()));
        self.ui.info(&format!("{} BEGIN {phase}", state::now()));
        for i in self.participants() {
            self.announce(i, None);
        }
        Ok(())
    }

    /// Tell node `i`, through the channel of its lock, the phase and where
    /// this cycle left its service (`service`: it changed now). The
    /// node's health server answers from it: 503 from the moment its
    /// service is about to stop until it is started again.
    fn announce(&self, i: usize, service: Option<ServiceStep>) {
        let mut steps = self.service_steps.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = service {
            steps[i] = s;
        }
        let step = Step {
            step: format!(
                "{}: {}",
                if self.switchover {
                    "switchover"
                } else {
                    "cycle"
                },
                self.current_phase()
            ),
            service: steps[i],
        };
        if let Some(l) = self.lock.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
            l.announce(&self.nodes[i].name, &step);
        }
    }

    fn end(&self) {
        let Some((name, t)) = self.phase().take() else {
            return;
        };
        let secs = t.elapsed().as_secs_f64();
        self.st().phases.push(PhaseTime {
            name: name.clone(),
            secs,
        });
        self.ui
            .info(&format!("{} END {name} ({secs:.1} s)", state::now()));
    }

    fn current_phase(&self) -> String {
        self.phase()
            .as_ref()
            .map(|(n, _)| n.clone())
            .unwrap_or_else(|| "between phases".into())
    }

    /// Preflight: every node's service answers `status`, every node's
    /// database answers a login. Nothing is stopped yet.
    fn preflight(&self) -> Result<(), CycleError> {
        self.begin("preflight")?;
        for i in self.participants() {
            let n = &self.nodes[i];
            match service::running(self.t(i), n) {
                Ok(Some(true)) | Ok(None) => {}
                Ok(Some(false)) => self.ui.warn(&format!(
                    "node {}: the service is not running before the cycle; it will be started at the end",
                    n.name
                )),
                Err(e) => return Err(err("preflight", e)),
            }
            if let Some(db) = &n.database {
                let pw = db.password().map_err(|e| err("preflight", e))?;
                let tunnel = self
                    .t(i)
                    .tunnel(&db.host, db.port)
                    .map_err(|e| err("preflight", format!("node {}: {e}", n.name)))?;
                let probe = if i == self.primary {
                    crate::db::probe(db, pw.as_deref(), tunnel.local_addr)
                } else {
                    crate::db::probe_server(db, pw.as_deref(), tunnel.local_addr)
                };
                probe.map_err(|e| {
                    err(
                        "preflight",
                        format!("node {}: {e}; nothing was stopped", n.name),
                    )
                })?;
            }
        }
        self.end();
        Ok(())
    }

    /// Agent connections to the primary and each standby, opened ahead so
    /// that the SSH handshakes are not part of the outage.
    fn open_conns(&self, phase: &str) -> Result<Vec<(Conn, Conn)>, CycleError> {
        let primary = &self.nodes[self.primary];
        let mut out = Vec::new();
        for &s in &self.standbys {
            let standby = &self.nodes[s];
            let pair = Conn::open_pair(primary, standby)
                .map_err(|e| err(phase, format!("{} -> {}: {e}", primary.name, standby.name)))?;
            out.push(pair);
        }
        Ok(out)
    }

    fn file_pass(
        &self,
        phase: &str,
        opts: &CycleOptions,
        conns: Option<Vec<(Conn, Conn)>>,
    ) -> Result<(), CycleError> {
        self.begin(phase)?;
        let primary = &self.nodes[self.primary];
        let conns = match conns {
            Some(c) => c,
            None => self.open_conns(phase)?,
        };
        for (&s, (src, dst)) in self.standbys.iter().zip(conns) {
            let standby = &self.nodes[s];
            let defaults =
                SyncOptions::from_config(&self.config.files, primary, standby, self.epoch);
            let sync_opts = SyncOptions {
                max_delete: opts.max_delete.unwrap_or(defaults.max_delete),
                checksum: opts.checksum,
                ..defaults
            };
            let progress = self.ui.files_progress(&standby.name);
            let t0 = Instant::now();
            let outcome = sync::run(src, dst, &sync_opts, &*progress);
            // The display goes before the lines that follow it.
            drop(progress);
            let outcome = outcome
                .map_err(|e| err(phase, format!("{} -> {}: {e}", primary.name, standby.name)))?;
            let t = outcome.summary.totals;
            let pass = FilePass {
                standby: standby.name.clone(),
                created: t.created,
                updated: t.updated,
                deleted: t.deleted,
                bytes: t.created_bytes + t.updated_bytes,
                secs: t0.elapsed().as_secs_f64(),
            };
            self.ui.info(&format!(
                "{}: {phase}: {} created, {} updated, {} deleted, {} in {:.1} s",
                standby.name,
                pass.created,
                pass.updated,
                pass.deleted,
                crate::sync::plan::human_bytes(pass.bytes),
                pass.secs
            ));
            self.st().files.push(pass);
        }
        self.end();
        Ok(())
    }

    fn stop(&self, i: usize) -> Result<(), CycleError> {
        let node = &self.nodes[i];
        // Hold the state lock while stopping: a signal waits for the stop
        // to finish, then starts the service again.
        let mut st = self.st();
        if self.aborting(&st) {
            return Err(err("quiesce", "the cycle is being aborted"));
        }
        if i == self.primary {
            st.outage_start = Some(Instant::now());
        }
        // Recorded before the stop: a stop that half-worked is started again.
        st.stopped.push(i);
        self.announce(i, Some(ServiceStep::Down));
        let shown = self.ui.waiting(&node.name, &service_wait(node, false));
        let r = service::stop(self.t(i), node);
        drop(shown);
        drop(st);
        r.map_err(|e| err("quiesce", e))?;
        self.ui.info(&format!("{}: service stopped", node.name));
        Ok(())
    }

    /// Start node `i`'s service if this cycle stopped it.
    fn start(&self, i: usize) -> Result<(), CycleError> {
        let mut st = self.st();
        let Some(pos) = st.stopped.iter().position(|&s| s == i) else {
            return Ok(());
        };
        let mode = if i == self.serving() {
            service::Mode::Writable
        } else {
            service::Mode::ReadOnly
        };
        self.announce(i, Some(ServiceStep::Starting));
        let shown = self
            .ui
            .waiting(&self.nodes[i].name, &service_wait(&self.nodes[i], true));
        let r = service::start(self.t(i), &self.nodes[i], mode);
        drop(shown);
        // Running in the wrong mode is running: it is not started again,
        // and the error says which mode it is in.
        let wrong_mode = matches!(r, Err(service::ServiceError::WrongMode { .. }));
        if r.is_ok() || wrong_mode {
            st.stopped.remove(pos);
            if i == self.serving() {
                st.outage = st.outage_start.map(|t| t.elapsed().as_secs_f64());
            }
        } else {
            self.announce(i, Some(ServiceStep::Down));
        }
        drop(st);
        r.map_err(|e| err(if wrong_mode { MODE_CHECK } else { "restart" }, e))?;
        self.ui
            .info(&format!("{}: service started", self.nodes[i].name));
        Ok(())
    }

    fn database(&self) -> Result<(), CycleError> {
        if self.config.database.is_none() {
            return Ok(());
        }
        self.begin("database")?;
        let primary = &self.nodes[self.primary];
        let early = self
            .nodes
            .get(self.primary)
            .and_then(|n| n.database.as_ref())
            .is_some_and(|d| d.early_restart);
        if early && self.standbys.len() > 1 {
            self.warn("early_restart applies to a single standby; the primary starts after all database copies");
        }
        // Never in a switchover: the old primary would take writes that no
        // copy carries to the new one.
        let early = early && self.standbys.len() == 1 && !self.switchover;
        for &s in &self.standbys {
            let standby = &self.nodes[s];
            let progress = self.ui.db_progress(&standby.name);
            let restart_primary = || {
                self.ui.info(&format!(
                    "{}: the dump's snapshot is taken; starting the primary early",
                    primary.name
                ));
                if let Err(e) = self.start(self.primary) {
                    // Not fatal here: finish() tries again and reports it.
                    self.warn(&format!("early restart: {e}"));
                }
            };
            let hook: Option<&dbrep::SnapshotHook<'_>> =
                if early { Some(&restart_primary) } else { None };
            let summary = dbrep::replicate(primary, standby, &*progress, hook);
            drop(progress);
            let summary = summary.map_err(|e| err("database", e))?;
            self.ui.info(&format!(
                "{}: database {}: {} tables, {} rows, {} of dump",
                standby.name,
                summary.database,
                summary.tables,
                summary.rows,
                crate::sync::plan::human_bytes(summary.bytes)
            ));
            for w in &summary.warnings {
                self.warn(w);
            }
            self.st().databases.push(summary);
        }
        self.end();
        Ok(())
    }

    /// A switchover's swap, with both services stopped and the standby an
    /// exact copy: the standby's database made writable (`readwrite_sql`),
    /// then its record says primary at a new epoch — the point of no
    /// return; a failure before it leaves the old primary the primary, and
    /// `finish` starts it writable as after any failed cycle. Then the old
    /// primary's record says standby at that epoch and its database gets
    /// `readonly_sql`; the new primary starts first, then the old one.
    fn switch_roles(&self) -> Result<(), CycleError> {
        use crate::state::NodeRole;
        const STEP: &str = "switchover";
        self.begin(STEP)?;
        let (old, new) = (self.primary, self.standbys[0]);
        let (on, nn) = (&self.nodes[old], &self.nodes[new]);
        let epoch = self.epoch + 1;
        let set_role = |i: usize, role: NodeRole, reason: &str| {
            let n = &self.nodes[i];
            state::read_or_initial(self.t(i), n).and_then(|mut r| {
                r.change_role(role, epoch, reason);
                state::write(self.t(i), n, &r)
            })
        };
        let back_to_read_only = || {
            if let Some(db) = &nn.database {
                if let Err(e) = dbrep::run_on_live(self.t(new), nn, &db.readonly_sql) {
                    self.warn(&format!(
                        "{}: readonly_sql after the rollback: {e}; its database may be writable",
                        nn.name
                    ));
                }
            }
        };
        if let Some(db) = &nn.database {
            if let Err(e) = dbrep::run_on_live(self.t(new), nn, &db.readwrite_sql) {
                back_to_read_only();
                return Err(err(
                    STEP,
                    format!(
                        "{}: readwrite_sql: {e}; nothing was swapped: {} stays the primary",
                        nn.name, on.name
                    ),
                ));
            }
        }
        if let Err(e) = set_role(
            new,
            NodeRole::Primary,
            &format!("switchover from {}", on.name),
        ) {
            back_to_read_only();
            return Err(err(
                STEP,
                format!("{e}; nothing was swapped: {} stays the primary", on.name),
            ));
        }
        self.switched
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.ui.info(&format!(
            "{}: primary at epoch {epoch} (switchover)",
            nn.name
        ));
        if let Err(e) = set_role(
            old,
            NodeRole::Standby,
            &format!("switchover to {}", nn.name),
        ) {
            // Still a primary of the old epoch in its record: every later
            // run sees a stale primary and fences it, never copies from it.
            self.warn(&format!(
                "{}: {e}; it still says primary at epoch {}: the next cycle will fence it; `hasync rejoin {}` then makes it a standby",
                on.name, self.epoch, on.name
            ));
        }
        if let Some(db) = &on.database {
            if let Err(e) = dbrep::run_on_live(self.t(old), on, &db.readonly_sql) {
                // Started, it would take writes no cycle copies: left down.
                self.st().stopped.retain(|&i| i != old);
                self.warn(&format!(
                    "{}: readonly_sql: {e}; its service was left STOPPED so that it takes no writes; make its database read-only, then start it",
                    on.name
                ));
            }
        }
        self.end();
        self.begin("restart")?;
        self.start(new)?;
        self.start(old)?;
        self.end();
        Ok(())
    }

    fn warn(&self, msg: &str) {
        self.ui.warn(msg);
        self.st().warnings.push(msg.to_string());
    }

    /// Take the lock on every node of the cycle.
    fn lock(&self) -> Result<(), CycleError> {
        let pairs: Vec<(&Node, &dyn Transport)> = self
            .participants()
            .into_iter()
            .map(|i| (&self.nodes[i], self.t(i)))
            .collect();
        let l = lock::acquire(&pairs, &Holder::me()).map_err(|e| err("lock", e))?;
        *self.lock.lock().unwrap_or_else(|p| p.into_inner()) = Some(l);
        Ok(())
    }

    /// The body of a cycle; `finish` follows whatever happens.
    fn body(&self, opts: &CycleOptions) -> Result<(), CycleError> {
        // The lock first: a cycle refused because another one runs must not
        // probe services that one has stopped (it warned "not running
        // before the cycle; it will be started at the end", and started
        // nothing), and whatever it records afterwards is written locked.
        self.lock()?;
        self.preflight()?;
        self.file_pass("warm file pass", opts, None)?;
        // Connected before the services stop: the handshakes stay out of
        // the outage.
        let conns = self.open_conns("final file pass")?;
        self.begin("quiesce")?;
        for &s in &self.standbys {
            self.stop(s)?;
        }
        self.stop(self.primary)?;
        self.end();
        self.file_pass("final file pass", opts, Some(conns))?;
        self.database()?;
        if opts.switchover {
            return self.switch_roles();
        }
        self.begin("restart")?;
        self.start(self.primary)?;
        for &s in &self.standbys {
            self.start(s)?;
        }
        self.end();
        Ok(())
    }

    /// Run the whole cycle. Installs the signal handler for its duration.
    pub fn run(self: &Arc<Self>, opts: &CycleOptions) -> CycleReport {
        let me = Arc::clone(self);
        crate::signals::set_handler(move |sig| {
            // Neither lock waits here for a service command: the cycle
            // stops going on at once, and the message comes at once.
            let phase = me.current_phase();
            let why = err(
                &phase,
                format!("interrupted by {}", crate::signals::name(sig)),
            );
            *me.interruption() = Some(why.clone());
            me.ui.warn(&format!(
                "{} received during {phase}: restarting what was stopped (a second signal aborts at once)",
                crate::signals::name(sig)
            ));
            let report = me.finish(Err(why));
            me.ui.warn(&summary_line(&report));
            std::process::exit(130);
        });
        let result = self.body(opts);
        let report = self.finish(result);
        crate::signals::clear_handler();
        if report.outcome == "interrupted" {
            // The signal came while this thread was finishing (or about
            // to); the handler waits in `finish`, so it ends the process
            // here as it would have: 130, after the summary.
            self.ui.warn(&summary_line(&report));
            std::process::exit(130);
        }
        report
    }

    /// Restart what is still stopped (the primary first), record the outcome
    /// on every node, release the lock, run the hooks. Runs once. After a
    /// signal the outcome is "interrupted", whichever thread gets here.
    pub fn finish(&self, result: Result<(), CycleError>) -> CycleReport {
        {
            let mut st = self.st();
            if st.finished {
                drop(st);
                // The other path is finishing; wait for the process to end.
                loop {
                    std::thread::park();
                }
            }
            st.finished = true;
        }
        let interruption = self.interruption().clone();
        let interrupted = interruption.is_some();
        // Whatever the body made of it ("the cycle is being aborted", or
        // nothing), the signal is the reason.
        let result = match interruption {
            Some(why) => Err(why),
            None => result,
        };
        if let Err(e) = &result {
            let open = self.phase().take();
            if let Some((phase, t)) = open {
                let secs = t.elapsed().as_secs_f64();
                self.st().phases.push(PhaseTime {
                    name: format!("{phase} (aborted)"),
                    secs,
                });
            }
            self.ui.warn(&format!("cycle failed: {e}"));
        }
        // Restart: primary first.
        let mut still_down = Vec::new();
        let mut order: Vec<usize> = self.st().stopped.clone();
        order.sort_by_key(|&i| i != self.serving());
        for i in order {
            // `start` needs `finished` unset only for `begin`; it checks `stopped`.
            if let Err(e) = self.start(i) {
                still_down.push(if e.step == MODE_CHECK {
                    e.detail.clone()
                } else {
                    format!("node {}: its service is DOWN: {e}", self.nodes[i].name)
                });
            }
        }
        let st = self.st();
        let outcome = match (&result, interrupted) {
            (_, true) => "interrupted",
            (Err(_), _) => "failed",
            (Ok(()), _) if !still_down.is_empty() => "failed",
            _ => "ok",
        };
        let mut reason = result.as_ref().err().map(|e| e.to_string());
        if !still_down.is_empty() {
            let down = still_down.join("; ");
            reason = Some(match reason {
                Some(r) => format!("{r}; {down}"),
                None => down,
            });
        }
        let report = CycleReport {
            outcome: outcome.into(),
            reason,
            primary: self.nodes[self.primary].name.clone(),
            standbys: self
                .standbys
                .iter()
                .map(|&s| self.nodes[s].name.clone())
                .collect(),
            started: self.started_at.clone(),
            ended: state::now(),
            secs: self.started.elapsed().as_secs_f64(),
            outage_secs: st.outage,
            phases: st.phases.clone(),
            files: st.files.clone(),
            databases: st.databases.clone(),
            still_down,
            warnings: st.warnings.clone(),
            roles_swapped: self.switched.load(std::sync::atomic::Ordering::SeqCst),
        };
        drop(st);
        // A cycle refused the lock records nothing: the node records belong
        // to the cycle holding it, and an unlocked read-modify-write could
        // lose that cycle's own record (it said "failed: lock" on both
        // nodes while the other cycle was fine).
        if self
            .lock
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
        {
            self.record(&report);
        }
        // Release the lock before the hooks: they may start another cycle.
        self.lock.lock().unwrap_or_else(|p| p.into_inner()).take();
        self.hooks(&report);
        report
    }

    fn record(&self, r: &CycleReport) {
        let rec = CycleRecord {
            started: r.started.clone(),
            ended: r.ended.clone(),
            outcome: r.outcome.clone(),
            reason: r.reason.clone(),
            primary: r.primary.clone(),
            standbys: r.standbys.clone(),
            files: r
                .files
                .iter()
                .map(|f| f.created + f.updated + f.deleted)
                .sum(),
            bytes: r.files.iter().map(|f| f.bytes).sum::<u64>()
                + r.databases.iter().map(|d| d.bytes).sum::<u64>(),
            rows: r.databases.iter().map(|d| d.rows).sum(),
            outage_secs: r.outage_secs,
            phases: r.phases.clone(),
            host: lock::hostname(),
            pid: std::process::id(),
        };
        for i in self.participants() {
            let n = &self.nodes[i];
            let result = state::read_or_initial(self.t(i), n).and_then(|mut s| {
                s.record_cycle(rec.clone());
                state::write(self.t(i), n, &s)
            });
            if let Err(e) = result {
                self.ui.warn(&format!("cannot record the cycle: {e}"));
            }
        }
    }

    fn hooks(&self, r: &CycleReport) {
        let hook = if r.outcome == "ok" {
            &self.config.hooks.on_success
        } else {
            &self.config.hooks.on_failure
        };
        let Some(hook) = hook else {
            return;
        };
        let env = vec![
            ("HASYNC_OUTCOME".to_string(), r.outcome.clone()),
            (
                "HASYNC_REASON".to_string(),
                r.reason.clone().unwrap_or_default(),
            ),
            ("HASYNC_PRIMARY".to_string(), r.primary.clone()),
            ("HASYNC_STANDBYS".to_string(), r.standbys.join(" ")),
            ("HASYNC_STARTED".to_string(), r.started.clone()),
            ("HASYNC_ENDED".to_string(), r.ended.clone()),
            ("HASYNC_DURATION".to_string(), format!("{:.1}", r.secs)),
            (
                "HASYNC_OUTAGE".to_string(),
                r.outage_secs.map(|o| format!("{o:.1}")).unwrap_or_default(),
            ),
            (
                "HASYNC_CLUSTER".to_string(),
                self.config.cluster_name.clone(),
            ),
        ];
        let json = serde_json::to_string(r).unwrap_or_default();
        if let Err(e) = crate::hooks::run(hook, &env, &json) {
            self.ui.warn(&e);
        }
    }
}

/// One line for the end of a cycle.
pub fn summary_line(r: &CycleReport) -> String {
    let mut s = format!(
        "cycle {} in {:.1} s ({} -> {})",
        r.outcome,
        r.secs,
        r.primary,
        r.standbys.join(", ")
    );
    if let Some(o) = r.outage_secs {
        s += &format!("; the primary's service was down {o:.1} s");
    }
    if let Some(reason) = &r.reason {
        s += &format!("; {reason}");
    }
    s
}
