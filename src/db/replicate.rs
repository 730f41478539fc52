//! The database phase: dump on the primary, stream through hasync into a
//! staging database on the mirror, verify, mark read-only, swap.
//!
//! The order is what makes it safe:
//!
//! 1. **Stage.** `<name>__hasync_new` is dropped and created on the mirror;
//!    the vendor dump tool on the primary streams into the vendor client on
//!    the mirror, through this process, which counts every row as it passes
//!    (see [`super::stream`]). The live mirror database is not touched.
//!    Databases of [`SPLIT_MIN`] or more load in two streams: MySQL's one
//!    dump split by statement between two loaders ([`relay_split`]),
//!    PostgreSQL's from the one exported snapshot ([`stream_pg_split`]).
//! 2. **Verify.** The staging database must hold the primary's objects
//!    (tables, views, routines, triggers, events, types, ...) and exactly the
//!    rows of the dump's snapshot, table by table. PostgreSQL's rows are also
//!    counted on the primary itself, inside the exported snapshot pg_dump
//!    reads. A materialized view that is not populated has no rows to
//!    count: it must be unpopulated in staging too ([`verify_matviews`]).
//! 3. **Read-only.** `readonly_sql` runs in the staging database and is
//!    checked (see [`check_statement`]), so the copy that becomes live is
//!    read-only from its first moment, and a failing statement stops the
//!    phase before the swap.
//! 4. **Swap**, atomically (see [`super::mysql`] and [`super::pg`]); the
//!    previous copy stays as `<name>__hasync_old` until the next swap.
//!
//! Any failure before the swap drops the staging database and leaves the live
//! one exactly as it was. Passwords reach the vendor tools in a 0600 file
//! written over SFTP into the node's `state_dir` and removed afterwards; they
//! never appear on a command line.

use std::collections::BTreeMap;
use std::io::{BufRead, Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use serde::Serialize;

use super::stream::{Format, Route, RowCounter, Splitter};
use super::{
    describe_difference, mysql, pg, previous_name, staging_name, Catalog, DbError, TableName,
};
use crate::config::{Database, Engine, Node};
use crate::transport::{self, shell_quote, Transport, Tunnel};

/// What the CLI shows while the phase runs.
pub trait DbProgress: Sync {
    /// A new phase starts ("dump and load", "verify", ...).
    fn phase(&self, name: &str);
    /// Bytes of dump streamed so far.
    fn streamed(&self, bytes: u64);
}

/// No output (tests, `--quiet`).
pub struct Silent;
impl DbProgress for Silent {
    fn phase(&self, _: &str) {}
    fn streamed(&self, _: u64) {}
}

/// A step of the phase failed; `step` and `node` say where.
#[derive(Debug, thiserror::Error)]
#[error("database {step} on {node}: {detail}")]
pub struct StepError {
    pub step: &'static str,
    pub node: String,
    pub detail: String,
}

fn fail(step: &'static str, node: &str, detail: impl std::fmt::Display) -> StepError {
    StepError {
        step,
        node: node.to_string(),
        detail: detail.to_string(),
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct PhaseReport {
    pub name: &'static str,
    pub secs: f64,
    pub rows: Option<u64>,
    pub bytes: Option<u64>,
}

/// What a finished database phase did.
#[derive(Debug, Clone, Serialize)]
pub struct DbSummary {
    pub engine: String,
    pub from: String,
    pub to: String,
    pub database: String,
    /// Where the mirror's previous copy is kept (`None`: it had none).
    pub previous: Option<String>,
    pub tables: usize,
    pub rows: u64,
    /// Bytes of dump streamed.
    pub bytes: u64,
    /// Loads that ran at once (2: see [`stream_pg_split`]).
    pub streams: usize,
    /// Objects compared (tables, views, routines, triggers, ...).
    pub objects: usize,
    pub readonly_statements: usize,
    pub phases: Vec<PhaseReport>,
    pub warnings: Vec<String>,
}

impl DbSummary {
    fn phase(
        &mut self,
        name: &'static str,
        started: Instant,
        rows: Option<u64>,
        bytes: Option<u64>,
    ) {
        self.phases.push(PhaseReport {
            name,
            secs: secs(started),
            rows,
            bytes,
        });
    }
}

/// What a dry run found and would do.
#[derive(Debug, Clone, Serialize)]
pub struct DbPlan {
    pub engine: String,
    pub from: String,
    pub to: String,
    pub database: String,
    pub staging: String,
    pub previous: String,
    pub mirror_database_exists: bool,
    /// (table, exact rows, data bytes as the server estimates them)
    pub tables: Vec<(String, u64, u64)>,
    /// Objects by kind.
    pub objects: BTreeMap<String, usize>,
    /// PostgreSQL materialized views that are not populated: copied as
    /// they are, not counted.
    pub unpopulated: Vec<String>,
    /// The table data size, a rough guide to the dump's size.
    pub estimated_bytes: u64,
    /// (node, what would run there), in order.
    pub steps: Vec<(String, String)>,
}

/// The outcome of one `readonly_sql` statement.
pub enum Outcome {
    Rows(u64),
    Value(Option<String>),
}

/// Whether a statement is a query whose first value is checked.
pub fn is_query(stmt: &str) -> bool {
    let w = first_word(stmt);
    w == "SELECT" || w == "WITH" || w == "SHOW" || w == "VALUES"
}

fn first_word(stmt: &str) -> String {
    let mut s = stmt.trim_start();
    // Leading comments.
    loop {
        if let Some(rest) = s.strip_prefix("--") {
            s = rest.split_once('\n').map_or("", |(_, r)| r).trim_start();
        } else if let Some(rest) = s.strip_prefix("/*") {
            s = rest.split_once("*/").map_or("", |(_, r)| r).trim_start();
        } else {
            break;
        }
    }
    s.chars()
        .take_while(|c| c.is_ascii_alphabetic())
        .collect::<String>()
        .to_ascii_uppercase()
}

/// The check on `readonly_sql`: a query must return a true first value (1,
/// t, true, yes, on); a data change (INSERT, UPDATE, REPLACE, DELETE, MERGE)
/// must affect at least one row, since an UPDATE of a row that does not exist
/// "succeeds" while the mirror stays writable; anything else must succeed.
pub fn check_statement(
    engine: Engine,
    index: usize,
    stmt: &str,
    outcome: &Outcome,
    node: &str,
) -> Result<(), DbError> {
    let short: String = stmt.chars().take(120).collect();
    let fail = |detail: String| DbError::Query {
        engine,
        context: format!("readonly_sql[{index}] on {node} (`{short}`)"),
        detail,
    };
    match outcome {
        Outcome::Value(v) => {
            let truthy = v.as_deref().is_some_and(|v| {
                matches!(
                    v.trim().to_ascii_lowercase().as_str(),
                    "1" | "t" | "true" | "yes" | "on"
                )
            });
            if !truthy {
                return Err(fail(format!(
                    "the check returned {}, not true; the mirror would not be read-only",
                    v.as_deref().unwrap_or("no row")
                )));
            }
        }
        Outcome::Rows(0)
            if matches!(
                first_word(stmt).as_str(),
                "INSERT" | "UPDATE" | "REPLACE" | "DELETE" | "MERGE"
            ) =>
        {
            return Err(fail(
                "changed no rows: the row it should change is missing; write it as an upsert \
                 (see templates/readonly-mysql.sql and templates/readonly-postgres.sql)"
                    .into(),
            ));
        }
        Outcome::Rows(_) => {}
    }
    Ok(())
}

/// A secret file on a node, removed when dropped.
struct Secret<'a> {
    t: &'a dyn Transport,
    path: String,
}

impl<'a> Secret<'a> {
    fn write(
        t: &'a dyn Transport,
        node: &Node,
        name: &str,
        contents: &str,
    ) -> Result<Secret<'a>, StepError> {
        let dir = &node.state_dir;
        let out = t
            .exec(
                &format!("mkdir -p -m 700 -- {}", shell_quote(dir)),
                b"",
                Some(std::time::Duration::from_secs(30)),
            )
            .map_err(|e| fail("credentials", &node.name, e))?;
        if !out.success() {
            return Err(fail(
                "credentials",
                &node.name,
                format!(
                    "cannot create state_dir {dir}: {}; fix state_dir or its parent's permissions",
                    out.stderr_tail()
                ),
            ));
        }
        let nonce: u64 = {
            let mut h = blake3::Hasher::new();
            h.update(&std::process::id().to_le_bytes());
            h.update(format!("{:?}", std::time::SystemTime::now()).as_bytes());
            u64::from_le_bytes(h.finalize().as_bytes()[..8].try_into().expect("8 bytes"))
        };
        let path = format!("{dir}/.hasync-{name}-{nonce:016x}");
        t.write_file(&path, contents.as_bytes(), 0o600)
            .map_err(|e| fail("credentials", &node.name, e))?;
        Ok(Secret { t, path })
    }

    /// A PGPASSFILE for a PostgreSQL client on `node`, if there is a
    /// password (without one the client needs none).
    fn pgpass(
        t: &'a dyn Transport,
        node: &Node,
        name: &str,
        password: Option<&str>,
    ) -> Result<Option<Secret<'a>>, StepError> {
        password
            .map(|p| Secret::write(t, node, name, &pg::passfile(p)))
            .transpose()
    }
}

impl Drop for Secret<'_> {
    fn drop(&mut self) {
        let _ = self.t.remove_file(&self.path);
    }
}

/// The two ends of the phase: node, transport, database settings, password,
/// and a tunnel to the node's database port.
struct End<'a> {
    node: &'a Node,
    t: Box<dyn Transport>,
    db: &'a Database,
    password: Option<String>,
    tunnel: Tunnel,
}

impl<'a> End<'a> {
    fn open(node: &'a Node) -> Result<End<'a>, StepError> {
        let db = node.database.as_ref().ok_or_else(|| {
            fail(
                "settings",
                &node.name,
                "no [database] section applies to this node; add one to the config",
            )
        })?;
        let password = db
            .password()
            .map_err(|e| fail("settings", &node.name, format!("{e}; fix password_file")))?;
        let t = transport::connect(&node.endpoint).map_err(|e| fail("connect", &node.name, e))?;
        let tunnel = t.tunnel(&db.host, db.port).map_err(|e| {
            fail(
                "connect",
                &node.name,
                format!(
                    "cannot open a tunnel to {}:{}: {e}; check AllowTcpForwarding in the node's sshd",
                    db.host, db.port
                ),
            )
        })?;
        Ok(End {
            node,
            t,
            db,
            password,
            tunnel,
        })
    }

    fn name(&self) -> &str {
        &self.node.name
    }

    /// Start a dump or load: the bulk stream goes through the system `ssh`
    /// client when the node's `ssh_client` says so (several times faster
    /// than libssh2's ciphers), like the file agent's stream.
    fn spawn_bulk(
        &self,
        command: &str,
    ) -> Result<crate::transport::Process, crate::transport::TransportError> {
        if transport::openssh::use_for(self.node) {
            transport::openssh::spawn_openssh(&self.node.endpoint, command)
        } else {
            self.t.spawn(command)
        }
    }

    fn mysql(&self, database: Option<&str>) -> Result<::mysql::Conn, StepError> {
        super::mysql_connect(
            self.db,
            self.password.as_deref(),
            self.tunnel.local_addr,
            database,
        )
        .map_err(|e| fail("connect", self.name(), e))
    }

    fn pg(&self, database: &str) -> Result<::postgres::Client, StepError> {
        super::pg_connect(
            self.db,
            self.password.as_deref(),
            self.tunnel.local_addr,
            database,
        )
        .map_err(|e| fail("connect", self.name(), e))
    }

    /// A connection to the node's maintenance database (`postgres`, else
    /// `template1`).
    fn pg_maintenance(&self) -> Result<::postgres::Client, StepError> {
        self.pg("postgres")
            .or_else(|first| self.pg("template1").map_err(|_| first))
    }
}

fn open_both<'a>(primary: &'a Node, mirror: &'a Node) -> Result<(End<'a>, End<'a>), StepError> {
    let (p, m) = std::thread::scope(|s| {
        let p = s.spawn(|| End::open(primary));
        let m = End::open(mirror);
        (p.join().expect("connect thread panicked"), m)
    });
    let (p, m) = (p?, m?);
    if p.db.engine != m.db.engine {
        return Err(fail(
            "settings",
            m.name(),
            "the nodes use different database engines",
        ));
    }
    Ok((p, m))
}

/// Stream the dump from `src` into the loader on `dst`, counting rows.
/// `load` is asked for the loaders' commands only once the dump runs (and,
/// with `on_tables`, once its snapshot is taken and the hook ran), so that
/// preparing the load stays out of an early restart's outage. One command:
/// one loader gets the whole dump. Two (MySQL only): the dump is split by
/// statement between them ([`relay_split`]); both must print the answers
/// to our sync queries (`--skip-column-names --unbuffered`, no
/// `>/dev/null`).
fn stream(
    src: &End,
    dump: &str,
    dst: &End,
    load: &mut dyn FnMut() -> Result<Vec<String>, StepError>,
    format: Format,
    progress: &dyn DbProgress,
    on_tables: Option<&SnapshotHook<'_>>,
) -> Result<RowCounter, StepError> {
    // The dump starts first: with an early restart waiting for its snapshot,
    // its first table is read (and the primary started) while the loader's
    // connection is still being made.
    let mut dumper = src
        .spawn_bulk(dump)
        .map_err(|e| fail("dump", src.name(), e))?;
    let mut prefix = Vec::new();
    let mut read_error = None;
    if let Some(hook) = on_tables {
        // Only to see the first table; every byte is counted below.
        let mut seen = RowCounter::new(format);
        let mut buf = vec![0u8; 256 * 1024];
        while !seen.tables_started() && prefix.len() < 8 << 20 {
            match dumper.stdout.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    seen.feed(&buf[..n]);
                    prefix.extend_from_slice(&buf[..n]);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    read_error = Some(e);
                    break;
                }
            }
        }
        // The first table is there (or the dump ended without one, or
        // failed: then the primary is started all the same).
        hook();
    }
    let mut loaders = Vec::new();
    let spawned = load().and_then(|commands| {
        for cmd in commands {
            loaders.push(
                dst.spawn_bulk(&cmd)
                    .map_err(|e| fail("load", dst.name(), e))?,
            );
        }
        Ok(())
    });
    if let Err(e) = spawned {
        dumper.kill();
        let _ = dumper.wait();
        for mut l in loaders {
            l.kill();
            let _ = l.wait();
        }
        return Err(e);
    }
    let mut stdins: Vec<_> = loaders
        .iter_mut()
        .map(|l| l.take_stdin().expect("loader stdin"))
        .collect();
    let streamed = AtomicU64::new(0);
    let mut counter = RowCounter::new(format);
    let mut write_error = None;
    // A loader whose input broke: it is ending by itself.
    let mut dying = None;
    if read_error.is_none() {
        let mut from = (&prefix[..]).chain(&mut dumper.stdout);
        let relayed = if let [to] = &mut stdins[..] {
            relay(&mut from, to, &mut counter, &streamed, Some(progress))
        } else {
            let answers: Vec<_> = loaders
                .iter_mut()
                .map(|l| std::mem::replace(&mut l.stdout, Box::new(std::io::empty())))
                .collect();
            let mut splitter = Splitter::new();
            let r = relay_split(
                &mut from,
                &mut stdins,
                answers,
                &mut splitter,
                &streamed,
                progress,
            );
            counter = splitter.into_counter();
            r
        };
        match relayed {
            Ok(()) => {}
            Err(Broke::Read(e)) => read_error = Some(e),
            Err(Broke::Write(e)) => (dying, write_error) = (Some(0), Some(e)),
            Err(Broke::Loader(i, e)) => (dying, write_error) = (Some(i), Some(e)),
            Err(Broke::NoSchema | Broke::Other) => unreachable!("a relay breaks on i/o only"),
        }
    }
    let stream_broke = write_error.is_some() || read_error.is_some();
    if stream_broke {
        // Without its input's end a loader would commit a partial load
        // only into staging, which is dropped anyway; stop them all now.
        // The dying one gets a moment to exit by itself first, so that its
        // own status and error reach us rather than our SIGKILL's.
        dumper.kill();
        for (i, l) in loaders.iter_mut().enumerate() {
            if dying != Some(i) {
                l.kill();
            }
        }
        if let Some(l) = dying.and_then(|i| loaders.get_mut(i)) {
            std::thread::sleep(std::time::Duration::from_millis(500));
            l.kill();
        }
    }
    drop(stdins);
    let load_outs = loaders
        .into_iter()
        .map(|l| l.wait())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| fail("load", dst.name(), e))?;
    let dump_out = dumper.wait().map_err(|e| fail("dump", src.name(), e))?;
    let dump_error = (!dump_out.success()).then(|| dump_failed(src.name(), &dump_out));
    let load_error = load_outs
        .iter()
        .find(|o| failed_by_itself(o))
        .or_else(|| load_outs.iter().find(|o| !o.success()))
        .map(|o| load_failed(dst.name(), o, counter.bytes()));
    // The side that failed first is the cause: a loader that died made the
    // writes fail (and the dumper was killed); a dumper that died cut the
    // stream, and the loader may then choke on half a statement.
    let (first, second) = if write_error.is_some() {
        (load_error, dump_error)
    } else {
        (dump_error, load_error)
    };
    if let Some(e) = first.or(second) {
        return Err(e);
    }
    if let Some(e) = write_error.or(read_error) {
        return Err(broken_stream(dst.name(), &e));
    }
    if !counter.complete() {
        return Err(cut_short(src.name(), "the dump", counter.bytes()));
    }
    Ok(counter)
}

/// What a MySQL loader of [`relay_split`] prints for our sync query
/// (`SELECT '<this> <n>'`), once it has run every statement before it.
const SYNCED: &str = "hasync: synced";

/// One loader of [`relay_split`].
struct Lane<'a> {
    /// Its place among the loaders (for [`Broke::Loader`]).
    index: usize,
    to: &'a mut Box<dyn Write + Send>,
    /// The numbers of the sync queries it answered, read from its output.
    answers: std::sync::mpsc::Receiver<u64>,
    asked: u64,
    /// It was sent statements the other loader's next ones depend on.
    unsynced: bool,
    /// Bytes of rows sent to it (to balance the two).
    rows: u64,
}

impl Lane<'_> {
    fn send(&mut self, bytes: &[u8]) -> Result<(), Broke> {
        let index = self.index;
        self.to
            .write_all(bytes)
            .map_err(|e| Broke::Loader(index, e))
    }

    /// Wait until the loader has run everything it was sent.
    fn sync(&mut self) -> Result<(), Broke> {
        self.asked += 1;
        self.send(format!("SELECT '{SYNCED} {}';\n", self.asked).as_bytes())?;
        let index = self.index;
        self.to.flush().map_err(|e| Broke::Loader(index, e))?;
        loop {
            match self.answers.recv() {
                Ok(n) if n == self.asked => break,
                Ok(_) => {}
                Err(_) => {
                    return Err(Broke::Loader(
                        index,
                        std::io::Error::other("the loader ended before it answered"),
                    ))
                }
            }
        }
        self.unsynced = false;
        Ok(())
    }
}

/// MySQL's load in two streams from the one dump (one snapshot, no lock):
/// the first loader gets the dump's header and everything but rows, in
/// order; each INSERT statement goes whole to the loader with fewer bytes
/// of rows so far. Two syncs keep the order that matters (see
/// [`Splitter`]): before the second loader gets rows, the first has run
/// what it was sent (the table's `CREATE TABLE`); before the first gets
/// anything but rows, the second has run its rows (so a table's triggers,
/// its `ENABLE KEYS`, the views and routines come after all of its rows).
/// The dump must not hold `LOCK TABLES` (`--skip-add-locks`): a loader's
/// lock would stop the other's rows until the first was past a sync that
/// waits for them.
fn relay_split(
    from: &mut dyn Read,
    to: &mut [Box<dyn Write + Send>],
    outputs: Vec<Box<dyn Read + Send>>,
    splitter: &mut Splitter,
    streamed: &AtomicU64,
    progress: &dyn DbProgress,
) -> Result<(), Broke> {
    let mut lanes = Vec::new();
    for (index, (to, out)) in to.iter_mut().zip(outputs).enumerate() {
        let (tx, rx) = std::sync::mpsc::channel();
        // Not joined: it ends with its loader's output, when the loader
        // exits after its input's end (or is killed by the caller).
        std::thread::spawn(move || {
            let mut r = std::io::BufReader::new(out);
            let mut line = Vec::new();
            while matches!(r.read_until(b'\n', &mut line), Ok(n) if n > 0) {
                let said = String::from_utf8_lossy(line.trim_ascii_end());
                if let Some(n) = said
                    .strip_prefix(SYNCED)
                    .and_then(|n| n.trim().parse().ok())
                {
                    let _ = tx.send(n);
                }
                line.clear();
            }
        });
        lanes.push(Lane {
            index,
            to,
            answers: rx,
            asked: 0,
            unsynced: false,
            rows: 0,
        });
    }
    let [main, side]: &mut [Lane; 2] = (&mut lanes[..]).try_into().expect("two loaders");
    let mut on_side = false;
    let mut route = |route, bytes: &[u8]| match route {
        Route::Both => {
            main.send(bytes)?;
            side.send(bytes)
        }
        Route::Main => {
            if side.unsynced {
                side.sync()?;
            }
            main.unsynced = true;
            main.send(bytes)
        }
        Route::Rows { first } => {
            if first {
                on_side = side.rows < main.rows;
                if on_side && main.unsynced {
                    main.sync()?;
                }
            }
            let lane = if on_side { &mut *side } else { &mut *main };
            lane.rows += bytes.len() as u64;
            lane.unsynced |= on_side;
            lane.send(bytes)
        }
    };
    pump(from, streamed, Some(progress), &mut |chunk| {
        splitter.feed(chunk, &mut route)
    })
}

/// Databases with at least this much table data (the server's estimate)
/// load in two streams ([`relay_split`], [`stream_pg_split`]); below it a
/// second SSH connection (and on PostgreSQL two more pg_dump runs) cost
/// more than they save.
pub const SPLIT_MIN: u64 = 64 << 20;

/// [`SPLIT_MIN`], unless the environment's `HASYNC_DB_SPLIT_MIN` (bytes)
/// says otherwise: the tests load their small databases in two streams
/// with 0, and a sysadmin can turn the split off with a huge value.
fn split_min() -> u64 {
    std::env::var("HASYNC_DB_SPLIT_MIN")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(SPLIT_MIN)
}

/// What the first loader of [`stream_pg_split`] prints once the schema
/// (pre-data) ran, so that the second may load its tables.
const SCHEMA_LOADED: &str = "hasync: schema loaded";
/// ... and once its rows are in (the indexes and constraints still to come).
const ROWS_LOADED: &str = "hasync: rows loaded";

/// Where a relay of [`stream_pg_split`] stopped.
enum Broke {
    /// Reading the dump failed.
    Read(std::io::Error),
    /// Writing into the loader failed (it died).
    Write(std::io::Error),
    /// Loader `.0` of several died (a write into it failed, or its output
    /// ended before it answered a sync).
    Loader(usize, std::io::Error),
    /// The first loader ended without saying the schema (or its rows) were
    /// loaded.
    NoSchema,
    /// The other stream failed; its own error is the one to report.
    Other,
}

/// Copy a dump into a loader, counting its rows and the bytes streamed.
fn relay(
    from: &mut dyn Read,
    to: &mut dyn Write,
    counter: &mut RowCounter,
    streamed: &AtomicU64,
    progress: Option<&dyn DbProgress>,
) -> Result<(), Broke> {
    pump(from, streamed, progress, &mut |chunk| {
        counter.feed(chunk);
        to.write_all(chunk).map_err(Broke::Write)
    })
}

/// Read a dump to its end, chunk by chunk into `each`, adding the bytes
/// to `streamed` (and telling `progress`).
fn pump(
    from: &mut dyn Read,
    streamed: &AtomicU64,
    progress: Option<&dyn DbProgress>,
    each: &mut dyn FnMut(&[u8]) -> Result<(), Broke>,
) -> Result<(), Broke> {
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Broke::Read(e)),
        };
        each(&buf[..n])?;
        let total = streamed.fetch_add(n as u64, Ordering::Relaxed) + n as u64;
        if let Some(p) = progress {
            p.streamed(total);
        }
    }
}

/// PostgreSQL's load in two streams, both in the exported `snapshot` (one
/// consistent copy, no lock beyond pg_dump's own):
///
/// - the first loader gets the schema (`--section=pre-data`), then the rows
///   of every table but `side`'s (with the sequences and large objects),
///   then, once the second loader has finished, the indexes, constraints
///   and triggers (`--section=post-data`), as one load would;
/// - the second loader gets the rows of the `side` tables, as soon as the
///   first says the schema is loaded (a line psql echoes).
///
/// All four dumps and both loaders start at once (a dump waits on its pipe
/// until it is read), so the two SSH handshakes and the dumps' catalog
/// reads overlap. Once every row is in staging (both loaders said so),
/// `rows_loaded` is called with the tables that got rows, before the
/// indexes and constraints are built: their rows can be counted meanwhile.
/// A failure anywhere kills every process; the error reported is the first
/// loader's or dump's own (as [`stream`] reports them), and staging is
/// dropped by the caller.
#[allow(clippy::too_many_arguments)]
fn stream_pg_split(
    src: &End,
    dst: &End,
    staging: &str,
    snapshot: &str,
    side: &[TableName],
    src_pass: Option<&str>,
    dst_pass: Option<&str>,
    progress: &dyn DbProgress,
    rows_loaded: &mut dyn FnMut(Vec<TableName>),
) -> Result<RowCounter, StepError> {
    const LOADERS: usize = 2;
    let part = |section: &str, only| {
        pg::dump_part_command(src.db, src_pass, snapshot, section, side, only)
    };
    let commands = [
        pg::load_command_with_output(dst.db, dst_pass, staging),
        pg::load_command(dst.db, dst_pass, staging),
        part("pre-data", None),
        part("data", Some(false)),
        part("data", Some(true)),
        part("post-data", None),
    ];
    let mut procs = Vec::new();
    for (i, cmd) in commands.iter().enumerate() {
        let spawned = if i < LOADERS {
            dst.spawn_bulk(cmd).map_err(|e| fail("load", dst.name(), e))
        } else {
            src.spawn_bulk(cmd).map_err(|e| fail("dump", src.name(), e))
        };
        match spawned {
            Ok(p) => procs.push(p),
            Err(e) => {
                for mut p in procs {
                    p.kill();
                    let _ = p.wait();
                }
                return Err(e);
            }
        }
    }
    let mut main_in = procs[0].take_stdin().expect("loader stdin");
    let mut side_in = procs[1].take_stdin().expect("loader stdin");
    let outs: Vec<Box<dyn Read + Send>> = procs
        .iter_mut()
        .map(|p| std::mem::replace(&mut p.stdout, Box::new(std::io::empty())))
        .collect();
    let [schema_said, _, mut pre_out, mut rest_out, mut side_out, mut post_out]: [_; 6] = outs
        .try_into()
        .unwrap_or_else(|_| unreachable!("six processes"));
    let procs: Vec<Mutex<Option<crate::transport::Process>>> =
        procs.into_iter().map(|p| Mutex::new(Some(p))).collect();
    let kill_all = || {
        for p in &procs {
            if let Some(p) = p.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
                p.kill();
            }
        }
    };
    let take = |i: usize| procs[i].lock().unwrap_or_else(|e| e.into_inner()).take();
    let streamed = &AtomicU64::new(0);
    let mut counters: Vec<RowCounter> = (0..4).map(|_| RowCounter::new(Format::Postgres)).collect();
    let [pre_c, rest_c, side_c, post_c]: &mut [RowCounter; 4] =
        (&mut counters[..]).try_into().expect("four counters");

    let (main_result, side_result, side_load) = std::thread::scope(|s| {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
        let (rows_tx, rows_rx) = std::sync::mpsc::channel::<()>();
        // The first loader's output: the query results of the dump's
        // SELECTs, and our lines once the schema, then the rows, are in.
        s.spawn(move || {
            let mut r = std::io::BufReader::new(schema_said);
            let mut line = Vec::new();
            while matches!(r.read_until(b'\n', &mut line), Ok(n) if n > 0) {
                let said = line.trim_ascii_end();
                if said == SCHEMA_LOADED.as_bytes() {
                    let _ = ready_tx.send(());
                } else if said == ROWS_LOADED.as_bytes() {
                    let _ = rows_tx.send(());
                }
                line.clear();
            }
        });
        let side = s.spawn(move || {
            let result = (|| {
                ready_rx.recv().map_err(|_| Broke::NoSchema)?;
                relay(&mut side_out, &mut side_in, side_c, streamed, None)
            })();
            drop(side_in);
            // Its load must be complete before the indexes and constraints.
            let out = if result.is_ok() {
                take(1).map(|p| p.wait())
            } else {
                None
            };
            let ok = matches!(&out, Some(Ok(o)) if o.success());
            if result.is_err() || !ok {
                kill_all();
            }
            let tables: Vec<TableName> = side_c.rows().keys().cloned().collect();
            (result, out, tables)
        });
        let main = (|| {
            relay(&mut pre_out, &mut main_in, pre_c, streamed, Some(progress))?;
            main_in
                .write_all(format!("\\echo {SCHEMA_LOADED}\n").as_bytes())
                .map_err(Broke::Write)?;
            relay(
                &mut rest_out,
                &mut main_in,
                rest_c,
                streamed,
                Some(progress),
            )?;
            main_in
                .write_all(format!("\\echo {ROWS_LOADED}\n").as_bytes())
                .map_err(Broke::Write)?;
            main_in.flush().map_err(Broke::Write)?;
            Ok(())
        })();
        if main.is_err() {
            kill_all();
        }
        let (side_result, side_load, side_tables) = side.join().expect("side stream panicked");
        let side_ok = side_result.is_ok() && matches!(&side_load, Some(Ok(o)) if o.success());
        let main = main.and_then(|()| {
            if !side_ok {
                return Err(Broke::Other);
            }
            rows_rx.recv().map_err(|_| Broke::NoSchema)?;
            let mut tables: Vec<TableName> = rest_c.rows().keys().cloned().collect();
            tables.extend(side_tables);
            rows_loaded(tables);
            relay(
                &mut post_out,
                &mut main_in,
                post_c,
                streamed,
                Some(progress),
            )
        });
        if main.is_err() {
            kill_all();
        }
        drop(main_in);
        (main, side_result, side_load)
    });
    // Every process's fate, loaders first (index 1: the second loader's,
    // waited for above unless it never got that far).
    let outputs: Vec<Option<crate::transport::ExecOutput>> = (0..procs.len())
        .map(|i| match (i, take(i)) {
            (_, Some(p)) => p.wait().ok(),
            (1, None) => side_load.as_ref().and_then(|r| r.as_ref().ok()).cloned(),
            _ => None,
        })
        .collect();
    drop(procs);
    let failed = |i: usize| outputs[i].as_ref().filter(|o| failed_by_itself(o));
    let bytes = streamed.load(Ordering::Relaxed);
    if let Some(o) = (0..LOADERS).find_map(failed) {
        return Err(load_failed(dst.name(), o, bytes));
    }
    if let Some(o) = (LOADERS..outputs.len()).find_map(failed) {
        return Err(dump_failed(src.name(), o));
    }
    // A write into a loader that broke: that loader died (it may have been
    // killed before it could exit by itself, as `stream` reports it too).
    for (loader, r) in [(0, main_result), (1, side_result)] {
        match r {
            Ok(()) | Err(Broke::Other) => {}
            Err(Broke::Write(e) | Broke::Loader(_, e)) => {
                return Err(match outputs[loader].as_ref().filter(|o| !o.success()) {
                    Some(o) => load_failed(dst.name(), o, bytes),
                    None => broken_stream(dst.name(), &e),
                })
            }
            Err(Broke::Read(e)) => return Err(broken_stream(dst.name(), &e)),
            Err(Broke::NoSchema) => {
                return Err(fail(
                    "load",
                    dst.name(),
                    "the first loader ended before it said its schema and rows were loaded; the live database was not touched",
                ))
            }
        }
    }
    if let Some(o) = outputs.iter().flatten().find(|o| !o.success()) {
        return Err(fail(
            "dump and load",
            dst.name(),
            format!(
                "a dump or load was stopped (exit {}): {}; the live database was not touched",
                o.status,
                o.stderr_tail()
            ),
        ));
    }
    if let Some(c) = counters.iter().find(|c| !c.complete()) {
        return Err(cut_short(src.name(), "a part of the dump", c.bytes()));
    }
    let mut total = RowCounter::new(Format::Postgres);
    for c in &counters {
        total.absorb(c);
    }
    Ok(total)
}

/// Whether a dump or load failed by itself, rather than being killed (137)
/// by us after another process failed. A tool that reported an error and
/// exited is that too, though its exit status may be lost: its `ssh` can
/// be killed between the end of its output and its own exit.
fn failed_by_itself(out: &crate::transport::ExecOutput) -> bool {
    !out.success() && (out.status != 137 || out.stderr_tail().contains("ERROR"))
}

/// The dump tool on `node` exited with `out`.
fn dump_failed(node: &str, out: &crate::transport::ExecOutput) -> StepError {
    fail(
        "dump",
        node,
        format!(
            "the dump tool failed (exit {}): {}; the live database was not touched",
            out.status,
            out.stderr_tail()
        ),
    )
}

/// The loader on `node` exited with `out` after `bytes` of dump.
fn load_failed(node: &str, out: &crate::transport::ExecOutput, bytes: u64) -> StepError {
    let tail = out.stderr_tail();
    let hint = load_hint(&tail);
    fail(
        "load",
        node,
        format!(
            "loading into the staging database failed (exit {}) after {} of dump: {tail}{hint}; the live database was not touched",
            out.status,
            crate::sync::plan::human_bytes(bytes)
        ),
    )
}

fn broken_stream(node: &str, e: &std::io::Error) -> StepError {
    fail(
        "dump and load",
        node,
        format!("the stream broke: {e}; the live database was not touched"),
    )
}

/// A dump (or a part of one, `what`) that lacks its completion line.
fn cut_short(node: &str, what: &str, bytes: u64) -> StepError {
    fail(
        "dump",
        node,
        format!(
            "{what} ended after {} without its completion line: it was cut short",
            crate::sync::plan::human_bytes(bytes)
        ),
    )
}

fn load_hint(stderr: &str) -> &'static str {
    if stderr.contains("ERROR 1227") || stderr.contains("SET USER") {
        "\nhint: the dump has objects whose DEFINER is an account the [database] user may not act as. If it is that user with another host part (`okm`@`localhost` while hasync logs in over TCP as `okm`@`127.0.0.1`), set [database] host so hasync logs in as the same account (host = \"localhost\" uses the socket); otherwise create that account on the mirror, or make the [database] user the DEFINER on the primary"
    } else if stderr.contains("role") && stderr.contains("does not exist") {
        "\nhint: the dump names a role (an OWNER or a GRANT) the mirror lacks; create that role on the mirror"
    } else if stderr.contains("must be owner") || stderr.contains("must be member of role") {
        "\nhint: the dump sets an OWNER the [database] user cannot assign; make that user a member of the owning role on the mirror"
    } else {
        ""
    }
}

fn verify_objects(primary: &Catalog, staging: &Catalog, node: &str) -> Result<(), StepError> {
    if primary.objects != staging.objects {
        return Err(fail(
            "verify",
            node,
            format!(
                "the staging database's objects differ from the primary's: {}; the live database was not touched",
                describe_difference(&primary.objects, &staging.objects)
            ),
        ));
    }
    for (name, want) in &primary.sequences {
        let got = staging.sequences.get(name).copied().flatten();
        if want.is_some() && got < *want {
            return Err(fail(
                "verify",
                node,
                format!("sequence {name} is at {got:?} in staging, behind the primary's {want:?}"),
            ));
        }
    }
    Ok(())
}

/// The copy's materialized views are populated as the primary's are: an
/// unpopulated one (nothing to count) must be unpopulated in staging too,
/// a populated one populated, so its rows can be counted. One exception,
/// pg_dump's own: it does not refresh a view that reads an unpopulated one
/// (the REFRESH would fail on the load), so such a view's copy is
/// unpopulated; that is a warning, and the view is not counted. Returns
/// the warnings and the views not to count on the primary.
fn verify_matviews(
    primary: &Catalog,
    staging: &Catalog,
    node: &str,
) -> Result<(Vec<String>, Vec<String>), StepError> {
    let differs = |detail: String| {
        fail(
            "verify",
            node,
            format!("{detail}; the live database was not touched"),
        )
    };
    if let Some(v) = primary.unpopulated.difference(&staging.unpopulated).next() {
        return Err(differs(format!(
            "materialized view {v} is not populated on the primary but populated in staging"
        )));
    }
    let (mut warnings, mut uncounted) = (Vec::new(), Vec::new());
    for v in staging.unpopulated.difference(&primary.unpopulated) {
        match primary.reads_unpopulated.get(v) {
            Some(source) => {
                warnings.push(format!(
                    "materialized view {v} is populated on the primary, but its copy on {node} is not: \
                     it reads {source}, which is not populated, and pg_dump does not refresh such a view; \
                     run REFRESH MATERIALIZED VIEW {source} on the primary (then {v} is copied populated), \
                     or refresh both on the mirror after a promotion"
                ));
                uncounted.push(v.clone());
            }
            None => {
                return Err(differs(format!(
                    "materialized view {v} is populated on the primary but not in staging"
                )))
            }
        }
    }
    Ok((warnings, uncounted))
}

/// Every table of the primary had its data in the dump: mysqldump announces
/// each table's rows with a comment (recorded by the counter, with 0 rows
/// for an empty table), so a table the dump skipped would otherwise look
/// like an empty one, in staging and in the dump alike. Without any such
/// comment (a my.cnf with `skip-comments`), there is nothing to check.
fn verify_data_sections(
    tables: &[TableName],
    counter: &RowCounter,
    primary: &str,
) -> Result<(), StepError> {
    if !counter.announces_tables() {
        return Ok(());
    }
    let missing: Vec<String> = tables
        .iter()
        .filter(|t| !counter.rows().contains_key(*t))
        .map(ToString::to_string)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    Err(fail(
        "verify",
        primary,
        format!(
            "the dump carried no data for {} table(s) of the primary ({}); nothing was swapped, the live database was not touched",
            missing.len(),
            missing.join(", ")
        ),
    ))
}

/// Compare row counts; `want` is what the primary or the dump had.
fn verify_counts(
    want: &BTreeMap<TableName, u64>,
    got: &BTreeMap<TableName, u64>,
    what: &str,
    node: &str,
) -> Result<u64, StepError> {
    let mut bad = Vec::new();
    let tables: std::collections::BTreeSet<&TableName> = want.keys().chain(got.keys()).collect();
    let mut total = 0;
    for t in tables {
        let (w, g) = (
            want.get(t).copied().unwrap_or(0),
            got.get(t).copied().unwrap_or(0),
        );
        total += g;
        if w != g {
            bad.push(format!("{t}: {w} in {what}, {g} in staging"));
        }
    }
    if !bad.is_empty() {
        let n = bad.len();
        bad.truncate(10);
        return Err(fail(
            "verify",
            node,
            format!(
                "row counts differ in {n} table(s): {}; the live database was not touched",
                bad.join(", ")
            ),
        ));
    }
    Ok(total)
}

fn secs(t: Instant) -> f64 {
    t.elapsed().as_secs_f64()
}

/// Called once the dump's snapshot is taken (the early restart of the
/// primary's service).
pub type SnapshotHook<'a> = dyn Fn() + Sync + 'a;

/// Replicate the primary's database into the mirror's. See the module docs.
/// `on_snapshot` runs as soon as the dump's snapshot is fixed: PostgreSQL
/// after the exported snapshot's rows were counted, MySQL once mysqldump has
/// started its transaction (its first table appeared in the stream).
pub fn replicate(
    primary: &Node,
    mirror: &Node,
    progress: &dyn DbProgress,
    on_snapshot: Option<&SnapshotHook<'_>>,
) -> Result<DbSummary, StepError> {
    let (src, dst) = open_both(primary, mirror)?;
    let r = match src.db.engine {
        Engine::Mysql => replicate_mysql(&src, &dst, progress, on_snapshot),
        Engine::Postgres => replicate_pg(&src, &dst, progress, on_snapshot),
    };
    r.map_err(|e| with_tunnel_cause(e, &[&src, &dst]))
}

/// A control connection through a tunnel that broke says only "server
/// disconnected"; the tunnel knows why (the node went silent, say).
fn with_tunnel_cause(mut e: StepError, ends: &[&End<'_>]) -> StepError {
    let cause = ends
        .iter()
        .find(|end| end.name() == e.node)
        .and_then(|end| end.tunnel.last_error());
    if let Some(cause) = cause {
        // Once is enough: a loader's own stream may have said it already.
        let said = e.detail.contains(&cause)
            || (e.detail.contains("no answer for") && cause.contains("no answer for"));
        if !said {
            e.detail = format!("{}; the tunnel to its database: {cause}", e.detail);
        }
    }
    e
}

fn summary(src: &End, dst: &End) -> DbSummary {
    DbSummary {
        engine: src.db.engine.to_string(),
        from: src.name().to_string(),
        to: dst.name().to_string(),
        database: dst.db.name.clone(),
        previous: None,
        tables: 0,
        rows: 0,
        bytes: 0,
        streams: 1,
        objects: 0,
        readonly_statements: 0,
        phases: Vec::new(),
        warnings: Vec::new(),
    }
}

fn replicate_mysql(
    src: &End,
    dst: &End,
    progress: &dyn DbProgress,
    on_snapshot: Option<&SnapshotHook<'_>>,
) -> Result<DbSummary, StepError> {
    let mut out = summary(src, dst);
    let staging = staging_name(&dst.db.name);
    let mut pc = src.mysql(Some(&src.db.name))?;
    let mut mc = dst.mysql(None)?;
    let pcat =
        mysql::catalog(&mut pc, &src.db.name).map_err(|e| fail("preflight", src.name(), e))?;
    let charset =
        mysql::charset(&mut pc, &src.db.name).map_err(|e| fail("preflight", src.name(), e))?;
    let split = mysql_splits(
        &mysql::sizes(&mut pc, &src.db.name).map_err(|e| fail("preflight", src.name(), e))?,
    );
    drop(pc);
    if split {
        out.streams = 2;
    }

    let staged = (|| {
        let t = Instant::now();
        progress.phase("dump and load");
        let counter = {
            let pf = Secret::write(
                &*src.t,
                src.node,
                "dump.cnf",
                &mysql::defaults_file(src.db, src.password.as_deref()),
            )?;
            // Staging and the loader's credentials are prepared once the
            // dump runs (after an early restart of the primary).
            let mut mf = None;
            let mut prepare_load = || {
                mysql::create_staging(&mut mc, &staging, &charset)
                    .map_err(|e| fail("staging", dst.name(), e))?;
                let secret = Secret::write(
                    &*dst.t,
                    dst.node,
                    "load.cnf",
                    &mysql::defaults_file(dst.db, dst.password.as_deref()),
                )?;
                let cmd = mysql::load_command(&secret.path, &staging, split);
                mf = Some(secret);
                Ok(vec![cmd; if split { 2 } else { 1 }])
            };
            let counter = stream(
                src,
                &mysql::dump_command(src.db, &pf.path, split),
                dst,
                &mut prepare_load,
                Format::Mysql,
                progress,
                on_snapshot,
            );
            drop(mf);
            counter?
        };
        out.bytes = counter.bytes();
        out.phase(
            "dump and load",
            t,
            Some(counter.total_rows()),
            Some(counter.bytes()),
        );

        let t = Instant::now();
        progress.phase("verify");
        let scat = mysql::catalog(&mut mc, &staging).map_err(|e| fail("verify", dst.name(), e))?;
        verify_objects(&pcat, &scat, dst.name())?;
        verify_data_sections(&pcat.tables, &counter, src.name())?;
        let mut got = BTreeMap::new();
        for table in &scat.tables {
            let n = mysql::count(&mut mc, &staging, table)
                .map_err(|e| fail("verify", dst.name(), e))?;
            got.insert(table.clone(), n);
        }
        let mut want = counter.rows().clone();
        for table in &scat.tables {
            want.entry(table.clone()).or_insert(0);
        }
        out.rows = verify_counts(&want, &got, "the dump", dst.name())?;
        out.tables = scat.tables.len();
        out.objects = scat.objects.len();
        out.phase("verify", t, Some(out.rows), None);

        let t = Instant::now();
        progress.phase("read-only");
        out.readonly_statements =
            mysql::run_checked(&mut mc, &staging, &dst.db.readonly_sql, dst.name())
                .map_err(|e| fail("read-only SQL", dst.name(), e))?;
        out.phase("read-only", t, None, None);
        Ok(())
    })();
    if let Err(e) = staged {
        let _ = mysql::drop_database(&mut mc, &staging);
        return Err(e);
    }

    let t = Instant::now();
    progress.phase("swap");
    let report = match mysql::swap(
        &mut mc,
        &dst.db.name,
        &staging,
        &previous_name(&dst.db.name),
    ) {
        Ok(r) => r,
        Err(e) => {
            let _ = mysql::drop_database(&mut mc, &staging);
            return Err(fail("swap", dst.name(), e));
        }
    };
    out.warnings.extend(report.warnings);
    out.previous = report.had_live.then(|| previous_name(&dst.db.name));
    let checks = queries(&dst.db.readonly_sql);
    mysql::run_checked(&mut mc, &dst.db.name, &checks, dst.name())
        .map_err(|e| fail("read-only check after the swap", dst.name(), e))?;
    out.phase("swap", t, None, None);
    Ok(out)
}

/// Whether a MySQL database of tables of these sizes loads in two streams
/// (see [`split_min`]).
fn mysql_splits(sizes: &[(String, u64)]) -> bool {
    sizes.iter().map(|(_, n)| n).sum::<u64>() >= split_min()
}

/// The verification queries of `readonly_sql`, re-run on the live database
/// after the swap.
fn queries(statements: &[String]) -> Vec<String> {
    statements.iter().filter(|s| is_query(s)).cloned().collect()
}

fn replicate_pg(
    src: &End,
    dst: &End,
    progress: &dyn DbProgress,
    on_snapshot: Option<&SnapshotHook<'_>>,
) -> Result<DbSummary, StepError> {
    let out = summary(src, dst);
    let mut pc = src.pg(&src.db.name)?;
    let snapshot = pg::export_snapshot(&mut pc).map_err(|e| fail("preflight", src.name(), e))?;
    let pcat = pg::catalog(&mut pc).map_err(|e| fail("preflight", src.name(), e))?;
    if let Some(hook) = on_snapshot {
        hook();
    }
    // The primary's rows are counted in the same snapshot on a second
    // connection while the dump streams, not before it.
    let mut pc2 = src.pg(&src.db.name)?;
    pg::import_snapshot(&mut pc2, &snapshot).map_err(|e| fail("preflight", src.name(), e))?;
    let tables = pcat.tables.clone();
    std::thread::scope(|sc| {
        let counting = sc.spawn(move || pg::counts(&mut pc2, &tables));
        replicate_pg_staged(src, dst, progress, out, pc, &snapshot, &pcat, counting)
    })
}

#[allow(clippy::too_many_arguments)]
fn replicate_pg_staged(
    src: &End,
    dst: &End,
    progress: &dyn DbProgress,
    mut out: DbSummary,
    mut pc: ::postgres::Client,
    snapshot: &str,
    pcat: &Catalog,
    counting: std::thread::ScopedJoinHandle<'_, Result<BTreeMap<TableName, u64>, DbError>>,
) -> Result<DbSummary, StepError> {
    let staging = staging_name(&dst.db.name);
    let options = pg::database_options(&mut pc).map_err(|e| fail("preflight", src.name(), e))?;
    let side = pg::second_stream_tables(&mut pc, split_min())
        .map_err(|e| fail("preflight", src.name(), e))?;
    let mut mm = dst.pg_maintenance()?;
    pg::create_staging(&mut mm, &staging, &options).map_err(|e| fail("staging", dst.name(), e))?;

    type Counting = std::thread::JoinHandle<Result<BTreeMap<TableName, u64>, DbError>>;
    let mut early_counts: Option<Counting> = None;
    let staged = (|| {
        let t = Instant::now();
        progress.phase("dump and load");
        let counter = {
            let pf = Secret::pgpass(&*src.t, src.node, "dump.pgpass", src.password.as_deref())?;
            let mf = Secret::pgpass(&*dst.t, dst.node, "load.pgpass", dst.password.as_deref())?;
            let src_pass = pf.as_ref().map(|s| s.path.as_str());
            let dst_pass = mf.as_ref().map(|s| s.path.as_str());
            match &side {
                Some(side) => {
                    out.streams = 2;
                    // Staging's rows are counted while its indexes and
                    // constraints are built (a count and CREATE INDEX do
                    // not block each other; ALTER TABLE waits for a count
                    // of its table at most).
                    let mut conn = Some(dst.pg(&staging)?);
                    let mut count_early = |tables: Vec<TableName>| {
                        if let Some(mut c) = conn.take() {
                            early_counts =
                                Some(std::thread::spawn(move || pg::counts(&mut c, &tables)));
                        }
                    };
                    stream_pg_split(
                        src,
                        dst,
                        &staging,
                        snapshot,
                        side,
                        src_pass,
                        dst_pass,
                        progress,
                        &mut count_early,
                    )?
                }
                None => {
                    let load = pg::load_command(dst.db, dst_pass, &staging);
                    stream(
                        src,
                        &pg::dump_command(src.db, src_pass, Some(snapshot)),
                        dst,
                        &mut || Ok(vec![load.clone()]),
                        Format::Postgres,
                        progress,
                        None,
                    )?
                }
            }
        };
        // The snapshot is no longer needed once pg_dump ended.
        pg::run(&mut pc, "COMMIT").map_err(|e| fail("dump", src.name(), e))?;
        out.bytes = counter.bytes();
        out.phase(
            "dump and load",
            t,
            Some(counter.total_rows()),
            Some(counter.bytes()),
        );

        let t = Instant::now();
        progress.phase("verify");
        let mut pcounts = counting
            .join()
            .expect("count thread panicked")
            .map_err(|e| fail("verify", src.name(), e))?;
        let mut ms = dst.pg(&staging)?;
        let scat = pg::catalog(&mut ms).map_err(|e| fail("verify", dst.name(), e))?;
        verify_objects(pcat, &scat, dst.name())?;
        let (warnings, uncounted) = verify_matviews(pcat, &scat, dst.name())?;
        out.warnings.extend(warnings);
        pcounts.retain(|t, _| !uncounted.contains(&t.to_string()));
        // Counted during the load's last section, or now (materialized
        // views, filled by that section, always now).
        let mut scounts = match early_counts.take() {
            Some(h) => h
                .join()
                .expect("count thread panicked")
                .map_err(|e| fail("verify", dst.name(), e))?,
            None => BTreeMap::new(),
        };
        let rest: Vec<TableName> = scat
            .tables
            .iter()
            .filter(|t| !scounts.contains_key(*t))
            .cloned()
            .collect();
        scounts.extend(pg::counts(&mut ms, &rest).map_err(|e| fail("verify", dst.name(), e))?);
        out.rows = verify_counts(&pcounts, &scounts, "the primary's snapshot", dst.name())?;
        // The stream must agree too (every COPYed table).
        let streamed: BTreeMap<TableName, u64> = counter
            .rows()
            .keys()
            .map(|t| (t.clone(), pcounts.get(t).copied().unwrap_or(0)))
            .collect();
        verify_counts(
            &streamed,
            counter.rows(),
            "the primary's snapshot",
            dst.name(),
        )
        .map_err(|mut e| {
            e.detail = format!("(counting the dump stream) {}", e.detail);
            e
        })?;
        out.tables = scat.tables.len();
        out.objects = scat.objects.len();
        out.phase("verify", t, Some(out.rows), None);

        let t = Instant::now();
        progress.phase("read-only");
        out.readonly_statements = pg::run_checked(&mut ms, &dst.db.readonly_sql, dst.name())
            .map_err(|e| fail("read-only SQL", dst.name(), e))?;
        out.phase("read-only", t, None, None);
        Ok(())
    })();
    drop(pc);
    if let Err(e) = staged {
        // (Dropping staging ends an early count still running.)
        let _ = pg::drop_database(&mut mm, &staging);
        if let Some(h) = early_counts.take() {
            let _ = h.join();
        }
        return Err(e);
    }

    let t = Instant::now();
    progress.phase("swap");
    match pg::swap(
        &mut mm,
        &dst.db.name,
        &staging,
        &previous_name(&dst.db.name),
    ) {
        Ok(had_live) => out.previous = had_live.then(|| previous_name(&dst.db.name)),
        Err(e) => {
            let _ = pg::drop_database(&mut mm, &staging);
            return Err(fail("swap", dst.name(), e));
        }
    }
    let checks = queries(&dst.db.readonly_sql);
    if !checks.is_empty() {
        let mut live = dst.pg(&dst.db.name)?;
        pg::run_checked(&mut live, &checks, dst.name())
            .map_err(|e| fail("read-only check after the swap", dst.name(), e))?;
    }
    out.phase("swap", t, None, None);
    Ok(out)
}

/// Whether a node's live database is read-only, by the SELECT checks of its
/// `readonly_sql`: `None` when there are none or the database cannot be
/// reached.
/// Dump `node`'s live database into `path` on the node itself (0600, made
/// complete under a temp name, then renamed): the quarantine of `hasync
/// rejoin`. Returns the dump's size in bytes.
pub fn dump_to_file(t: &dyn Transport, node: &Node, path: &str) -> Result<u64, StepError> {
    const STEP: &str = "quarantine dump";
    let Some(db) = node.database.as_ref() else {
        return Ok(0);
    };
    let password = db.password().map_err(|e| fail("settings", &node.name, e))?;
    let (secret, dump) = match db.engine {
        Engine::Mysql => {
            let s = Secret::write(
                t,
                node,
                "dump.cnf",
                &mysql::defaults_file(db, password.as_deref()),
            )?;
            let cmd = mysql::dump_command(db, &s.path, false);
            (Some(s), cmd)
        }
        Engine::Postgres => {
            let s = Secret::pgpass(t, node, "dump.pgpass", password.as_deref())?;
            let cmd = pg::dump_command(db, s.as_ref().map(|s| s.path.as_str()), None);
            (s, cmd)
        }
    };
    let partial = format!("{path}.partial");
    let cmd = format!(
        "umask 077; ( {dump} ) > {p} && mv -- {p} {q} && wc -c < {q}",
        p = shell_quote(&partial),
        q = shell_quote(path)
    );
    let out = t
        .exec(&cmd, b"", None)
        .map_err(|e| fail(STEP, &node.name, e))?;
    drop(secret);
    if !out.success() {
        let _ = t.remove_file(&partial);
        return Err(fail(
            STEP,
            &node.name,
            format!("exit {}: {}", out.status, out.stderr_tail()),
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0))
}

pub fn read_only_flag(t: &dyn Transport, node: &Node) -> Option<bool> {
    let checks = queries(&node.database.as_ref()?.readonly_sql);
    if checks.is_empty() {
        return None;
    }
    match run_on_live(t, node, &checks) {
        Ok(_) => Some(true),
        // check_statement's words for a check that is not true.
        Err(e) if e.detail.contains("not true") => Some(false),
        Err(_) => None,
    }
}

/// Run `statements` (readonly_sql or readwrite_sql) on a node's live
/// database, checked like readonly_sql (see [`check_statement`]).
pub fn run_on_live(
    t: &dyn Transport,
    node: &Node,
    statements: &[String],
) -> Result<usize, StepError> {
    let Some(db) = node.database.as_ref() else {
        return Ok(0);
    };
    if statements.is_empty() {
        return Ok(0);
    }
    let password = db.password().map_err(|e| fail("settings", &node.name, e))?;
    let tunnel = t
        .tunnel(&db.host, db.port)
        .map_err(|e| fail("connect", &node.name, e))?;
    match db.engine {
        Engine::Mysql => {
            let mut c = super::mysql_connect(db, password.as_deref(), tunnel.local_addr, None)
                .map_err(|e| fail("connect", &node.name, e))?;
            mysql::run_checked(&mut c, &db.name, statements, &node.name)
        }
        Engine::Postgres => {
            let mut c = super::pg_connect(db, password.as_deref(), tunnel.local_addr, &db.name)
                .map_err(|e| fail("connect", &node.name, e))?;
            pg::run_checked(&mut c, statements, &node.name)
        }
    }
    .map_err(|e| fail("SQL", &node.name, e))
}

/// What `--dry-run` shows: the primary's tables with exact row counts, the
/// estimated size, and the steps with their commands. Changes nothing
/// anywhere (no staging database, no credential file).
pub fn plan(primary: &Node, mirror: &Node) -> Result<DbPlan, StepError> {
    let (src, dst) = open_both(primary, mirror)?;
    let staging = staging_name(&dst.db.name);
    let previous = previous_name(&dst.db.name);
    // Whether the load would be in two streams, and PostgreSQL's tables
    // for the second (MySQL's rows are split by statement).
    let (cat, counts, sizes, exists, split, side) = match src.db.engine {
        Engine::Mysql => {
            let mut pc = src.mysql(Some(&src.db.name))?;
            let e = |e| fail("preflight", src.name(), e);
            let cat = mysql::catalog(&mut pc, &src.db.name).map_err(e)?;
            let mut counts = BTreeMap::new();
            for t in &cat.tables {
                counts.insert(
                    t.clone(),
                    mysql::count(&mut pc, &src.db.name, t).map_err(e)?,
                );
            }
            let sizes = mysql::sizes(&mut pc, &src.db.name).map_err(e)?;
            let split = mysql_splits(&sizes);
            let mut mc = dst.mysql(None)?;
            let exists = mysql::schema_exists(&mut mc, &dst.db.name)
                .map_err(|e| fail("preflight", dst.name(), e))?;
            (cat, counts, sizes, exists, split, Vec::new())
        }
        Engine::Postgres => {
            let mut pc = src.pg(&src.db.name)?;
            let e = |e| fail("preflight", src.name(), e);
            let cat = pg::catalog(&mut pc).map_err(e)?;
            let counts = pg::counts(&mut pc, &cat.tables).map_err(e)?;
            let sizes = pg::sizes(&mut pc).map_err(e)?;
            let side = pg::second_stream_tables(&mut pc, split_min()).map_err(e)?;
            let mut mm = dst.pg_maintenance()?;
            let exists = pg::database_exists(&mut mm, &dst.db.name)
                .map_err(|e| fail("preflight", dst.name(), e))?;
            (
                cat,
                counts,
                sizes,
                exists,
                side.is_some(),
                side.unwrap_or_default(),
            )
        }
    };
    let size_of: BTreeMap<String, u64> = sizes.into_iter().collect();
    let tables: Vec<(String, u64, u64)> = counts
        .iter()
        .map(|(t, n)| {
            let key = t.to_string();
            let bytes = size_of.get(&key).copied().unwrap_or(0);
            (key, *n, bytes)
        })
        .collect();
    let mut objects = BTreeMap::new();
    for (kind, _) in &cat.objects {
        *objects.entry(kind.clone()).or_insert(0) += 1;
    }
    let (p, m) = (src.name().to_string(), dst.name().to_string());
    let state = |n: &Node| format!("{}/.hasync-...", n.state_dir);
    let mut steps = Vec::new();
    match src.db.engine {
        Engine::Mysql => {
            steps.push((m.clone(), format!("DROP DATABASE IF EXISTS `{staging}`; CREATE DATABASE `{staging}` (the primary's character set)")));
            steps.push((
                p.clone(),
                format!(
                    "write {} (0600, over SFTP): [client] user, host, port, password=<redacted>",
                    state(src.node)
                ),
            ));
            steps.push((
                m.clone(),
                format!(
                    "write {} (0600, over SFTP): [client] user, host, port, password=<redacted>",
                    state(dst.node)
                ),
            ));
            steps.push((
                p.clone(),
                mysql::dump_command(src.db, &state(src.node), split),
            ));
            steps.push((
                m.clone(),
                format!(
                    "| {}",
                    mysql::load_command(&state(dst.node), &staging, split)
                ),
            ));
            if split {
                steps.push((m.clone(), format!("two such loaders: the dump's INSERT statements split between them, everything else in order on the first (at least {} of table data)", crate::sync::plan::human_bytes(split_min()))));
            }
        }
        Engine::Postgres => {
            steps.push((p.clone(), "BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT pg_export_snapshot(); count rows in the snapshot".into()));
            steps.push((m.clone(), format!("DROP DATABASE IF EXISTS \"{staging}\"; CREATE DATABASE \"{staging}\" TEMPLATE template0 (the primary's encoding and locale)")));
            let pf = src.password.as_ref().map(|_| state(src.node));
            let mf = dst.password.as_ref().map(|_| state(dst.node));
            if let Some(f) = &pf {
                steps.push((
                    p.clone(),
                    format!("write {f} (0600, over SFTP): *:*:*:*:<redacted>"),
                ));
            }
            if let Some(f) = &mf {
                steps.push((
                    m.clone(),
                    format!("write {f} (0600, over SFTP): *:*:*:*:<redacted>"),
                ));
            }
            steps.push((
                p.clone(),
                pg::dump_command(src.db, pf.as_deref(), Some("<snapshot>")),
            ));
            steps.push((
                m.clone(),
                format!("| {}", pg::load_command(dst.db, mf.as_deref(), &staging)),
            ));
            if split {
                let side: Vec<String> = side.iter().map(ToString::to_string).collect();
                steps.push((m.clone(), format!("two such loaders, with pg_dump run per section in the same snapshot: the rows of {} on the second, the schema, the other rows, then the indexes and constraints on the first (at least {} of table data)", side.join(", "), crate::sync::plan::human_bytes(split_min()))));
            }
        }
    }
    steps.push((m.clone(), format!("verify {staging}: the same {} objects as the primary and the same rows in each of {} tables", cat.objects.len(), cat.tables.len())));
    for (i, s) in dst.db.readonly_sql.iter().enumerate() {
        steps.push((m.clone(), format!("readonly_sql[{i}] in {staging}: {s}")));
    }
    let swap = match (src.db.engine, exists) {
        (Engine::Mysql, true) => format!("swap: RENAME TABLE {db}.* TO {previous}.*, {staging}.* TO {db}.* (one statement); recreate views, triggers, routines, events in {db}", db = dst.db.name),
        (Engine::Mysql, false) => format!("swap: CREATE DATABASE {db}; RENAME TABLE {staging}.* TO {db}.*; create views, triggers, routines, events", db = dst.db.name),
        (Engine::Postgres, true) => format!("swap: DROP DATABASE IF EXISTS {previous}; ALTER DATABASE {db} RENAME TO {previous}; ALTER DATABASE {staging} RENAME TO {db} (one transaction)", db = dst.db.name),
        (Engine::Postgres, false) => format!("swap: ALTER DATABASE {staging} RENAME TO {}", dst.db.name),
    };
    steps.push((m.clone(), swap));
    Ok(DbPlan {
        engine: src.db.engine.to_string(),
        from: p,
        to: m,
        database: dst.db.name.clone(),
        staging,
        previous,
        mirror_database_exists: exists,
        estimated_bytes: tables.iter().map(|t| t.2).sum(),
        unpopulated: cat.unpopulated.iter().cloned().collect(),
        tables,
        objects,
        steps,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(name: &str) -> TableName {
        TableName {
            schema: "public".into(),
            name: name.into(),
        }
    }

    #[test]
    fn every_table_needs_its_data_section_when_the_dump_announces_them() {
        let counted = |dump: &str| {
            let mut c = RowCounter::new(Format::Mysql);
            c.feed(dump.as_bytes());
            c
        };
        let my = |name: &str| TableName {
            schema: String::new(),
            name: name.into(),
        };
        let tables = [my("a"), my("b")];
        let both = counted(
            "-- Dumping data for table `a`\nINSERT INTO `a` VALUES (1);\n-- Dumping data for table `b`\n",
        );
        assert!(verify_data_sections(&tables, &both, "okm1").is_ok());
        let one = counted("-- Dumping data for table `a`\nINSERT INTO `a` VALUES (1);\n");
        let e = verify_data_sections(&tables, &one, "okm1").unwrap_err();
        assert_eq!(e.node, "okm1");
        assert!(
            e.detail
                .contains("no data for 1 table(s) of the primary (b)"),
            "{e}"
        );
        // Comments turned off: nothing to check against.
        let silent = counted("INSERT INTO `a` VALUES (1);\n");
        assert!(verify_data_sections(&tables, &silent, "okm1").is_ok());
    }

    #[test]
    fn counts_must_match_table_by_table() {
        let want: BTreeMap<_, _> = [(t("a"), 3), (t("b"), 0)].into();
        let same: BTreeMap<_, _> = [(t("a"), 3)].into();
        assert_eq!(verify_counts(&want, &same, "the dump", "okm2").unwrap(), 3);
        let short: BTreeMap<_, _> = [(t("a"), 2), (t("c"), 1)].into();
        let e = verify_counts(&want, &short, "the dump", "okm2").unwrap_err();
        assert_eq!(e.step, "verify");
        assert!(e.detail.contains("2 table(s)"), "{e}");
        assert!(
            e.detail.contains("public.a: 3 in the dump, 2 in staging"),
            "{e}"
        );
        assert!(
            e.detail.contains("public.c: 0 in the dump, 1 in staging"),
            "{e}"
        );
        assert!(
            e.detail.contains("the live database was not touched"),
            "{e}"
        );
    }

    #[test]
    fn objects_and_sequences_must_match() {
        let mut primary = Catalog::default();
        primary.objects.insert(("view".into(), "public.v".into()));
        primary
            .objects
            .insert(("trigger".into(), "tr on public.a".into()));
        primary.sequences.insert("public.s".into(), Some(10));
        let mut staging = primary.clone();
        assert!(verify_objects(&primary, &staging, "okm2").is_ok());
        staging.sequences.insert("public.s".into(), Some(12));
        assert!(
            verify_objects(&primary, &staging, "okm2").is_ok(),
            "ahead is fine"
        );
        staging.sequences.insert("public.s".into(), Some(9));
        let e = verify_objects(&primary, &staging, "okm2").unwrap_err();
        assert!(e.detail.contains("public.s"), "{e}");
        staging.sequences.insert("public.s".into(), Some(10));
        staging.objects.remove(&("view".into(), "public.v".into()));
        staging
            .objects
            .insert(("function".into(), "public.f()".into()));
        let e = verify_objects(&primary, &staging, "okm2")
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing after the load: view public.v"), "{e}");
        assert!(e.contains("not on the primary: function public.f()"), "{e}");
    }

    #[test]
    fn matviews_must_be_populated_as_on_the_primary() {
        let mut primary = Catalog::default();
        primary.unpopulated.insert("public.a".into());
        let mut staging = primary.clone();
        assert_eq!(
            verify_matviews(&primary, &staging, "okm2").unwrap(),
            (vec![], vec![])
        );
        staging.unpopulated.clear();
        let e = verify_matviews(&primary, &staging, "okm2").unwrap_err();
        assert!(
            e.detail
                .contains("public.a is not populated on the primary but populated in staging"),
            "{e}"
        );
        staging = primary.clone();
        staging.unpopulated.insert("public.b".into());
        let e = verify_matviews(&primary, &staging, "okm2").unwrap_err();
        assert!(
            e.detail
                .contains("public.b is populated on the primary but not in staging"),
            "{e}"
        );
        // pg_dump's own: b reads a, so it is not refreshed.
        primary
            .reads_unpopulated
            .insert("public.b".into(), "public.a".into());
        let (warnings, uncounted) = verify_matviews(&primary, &staging, "okm2").unwrap();
        assert_eq!(uncounted, vec!["public.b".to_string()]);
        assert!(warnings[0].contains("it reads public.a"), "{warnings:?}");
    }

    #[test]
    fn statement_checks() {
        let rows = |n| Outcome::Rows(n);
        assert!(check_statement(Engine::Mysql, 0, "UPDATE t SET v = 1", &rows(1), "n").is_ok());
        let e =
            check_statement(Engine::Mysql, 0, "  update t SET v = 1", &rows(0), "n").unwrap_err();
        assert!(e.to_string().contains("changed no rows"), "{e}");
        assert!(check_statement(Engine::Mysql, 0, "SET @x = 1", &rows(0), "n").is_ok());
        assert!(check_statement(
            Engine::Mysql,
            0,
            "/* c */ SELECT 1",
            &Outcome::Value(Some("1".into())),
            "n"
        )
        .is_ok());
        assert!(check_statement(
            Engine::Mysql,
            0,
            "SELECT x",
            &Outcome::Value(Some("t".into())),
            "n"
        )
        .is_ok());
        let e = check_statement(
            Engine::Mysql,
            2,
            "SELECT x",
            &Outcome::Value(Some("false".into())),
            "okm2",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("readonly_sql[2] on okm2"), "{e}");
        assert!(check_statement(Engine::Mysql, 0, "SELECT x", &Outcome::Value(None), "n").is_err());
        assert!(is_query("-- comment\nselect 1"));
        assert!(!is_query("INSERT INTO t SELECT 1"));
    }
}
