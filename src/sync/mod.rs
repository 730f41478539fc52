//! The file engine: make the standby's tree equal to the primary's, minus
//! exclusions, moving as few bytes as possible.
//!
//! Both sides are agents (see [`crate::agent`]): a process started over SSH,
//! or the same code in a thread for the local node. The engine scans both at
//! once, merge-joins the manifests into a [`plan::Plan`], checks the delete
//! cap, and then runs the plan as one pipeline with no round trip per file:
//!
//! ```text
//!   main ──requests──▶ src agent ──Data/End──▶ [src reader] ──Begin/Data/End──▶ dst agent
//!   main ──requests──▶ dst agent ──Sig data / Done / Fail──▶ [dst reader] ──Data/DeltaReq──▶ src agent
//! ```
//!
//! Each connection has its own writer thread fed by a channel. The channel to
//! the source is unbounded (it carries small requests and signatures), the
//! one to the standby is bounded (it carries file data); the reader of the
//! standby never blocks, so no cycle of full buffers can deadlock the two.
//! Every transferred file is verified by its BLAKE3 hash on the standby
//! before it replaces the old one; a mismatch sends the file again whole.

pub mod delta;
pub mod filter;
pub mod manifest;
pub mod plan;

use std::collections::HashMap;
use std::io::{BufReader, BufWriter, Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::agent::wire::{self, Msg};
use manifest::{Entry, Kind};
use plan::{Action, Plan, PlanOptions};

/// A connection to an agent: a byte stream each way, and whatever keeps the
/// agent alive (a remote process or a local thread).
pub struct Conn {
    /// The node's name, for messages.
    pub node: String,
    pub reader: Box<dyn Read + Send>,
    pub writer: Box<dyn Write + Send>,
    /// Called after the session to collect the agent's fate (exit status,
    /// stderr); returns an error message if it failed.
    pub finish: Box<dyn FnOnce() -> Option<String> + Send>,
    /// Set by [`Conn::handshake`]: the Hello is done, [`run`] claims its
    /// epoch instead.
    welcomed: Option<Welcomed>,
}

/// A Hello done ahead of [`run`] by [`Conn::handshake`].
struct Welcomed {
    root: String,
    superuser: bool,
    /// Protocol bytes it took each way (for the wire counters).
    sent: u64,
    received: u64,
}

/// Hello on a connection to an agent: whether it can set owners, its
/// node's state record, and the bytes sent and received. Reads exactly the
/// Welcome frame, so `r` may be unbuffered.
fn hello(
    node: &str,
    w: &mut dyn Write,
    r: &mut dyn Read,
    root: &str,
    epoch: u64,
) -> Result<(bool, wire::Record, u64, u64), SyncError> {
    let frame = Msg::Hello {
        protocol: crate::version::PROTOCOL,
        version: crate::version::VERSION.into(),
        root: root.as_bytes().to_vec(),
        epoch,
    }
    .encode();
    w.write_all(&frame)
        .and_then(|()| w.flush())
        .map_err(|e| SyncError::Connection {
            node: node.into(),
            step: "handshake",
            source: e.into(),
        })?;
    let mut buf = Vec::new();
    let msg = recv(node, "handshake", &mut &mut *r, &mut buf)?;
    let received = 4 + buf.len() as u64;
    match msg {
        Msg::Welcome { protocol, superuser, record, .. } if protocol == crate::version::PROTOCOL => {
            Ok((superuser, record, frame.len() as u64, received))
        }
        Msg::Welcome { protocol, version, .. } => Err(SyncError::Agent {
            node: node.into(),
            message: format!(
                "agent is hasync {version} (protocol {protocol}), this is hasync {} (protocol {}); install the same version on both nodes",
                crate::version::VERSION,
                crate::version::PROTOCOL
            ),
        }),
        other => Err(SyncError::Agent { node: node.into(), message: format!("unexpected answer to Hello: {other:?}") }),
    }
}

impl Conn {
    /// Agents on both nodes, started at once: each may cost an SSH
    /// handshake.
    pub fn open_pair(
        primary: &crate::config::Node,
        standby: &crate::config::Node,
    ) -> Result<(Conn, Conn), SyncError> {
        let (src, dst) = std::thread::scope(|sc| {
            let src = sc.spawn(|| Conn::open(primary));
            let dst = Conn::open(standby);
            (src.join().expect("connect thread panicked"), dst)
        });
        Ok((src?, dst?))
    }

    /// The agent engine in a thread of this process, for the local node
    /// (`state_dir`: its state record's, as for a remote agent).
    pub fn local(node: &str, state_dir: &str) -> std::io::Result<Conn> {
        let (a, b) = std::os::unix::net::UnixStream::pair()?;
        let b2 = b.try_clone()?;
        let state_dir = std::path::PathBuf::from(state_dir);
        let handle = std::thread::Builder::new()
            .name(format!("agent-{node}"))
            .spawn(move || crate::agent::serve(b, b2, None, Some(&state_dir)))?;
        let reader = a.try_clone()?;
        Ok(Conn {
            node: node.to_string(),
            reader: Box::new(reader),
            writer: Box::new(a),
            finish: Box::new(move || match handle.join() {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e.to_string()),
                Err(_) => Some("the local agent thread panicked".into()),
            }),
            welcomed: None,
        })
    }

    /// Hello ahead of [`run`], for the agent's answer: its node's state
    /// record as the agent read it (so the caller needs no other
    /// connection to learn the node's role). The Hello names no epoch;
    /// [`run`] claims the primary's before anything is written, and
    /// refuses a `root` other than its own for this side.
    pub fn handshake(&mut self, root: &str) -> Result<wire::Record, SyncError> {
        if self.welcomed.is_some() {
            return Err(SyncError::Agent {
                node: self.node.clone(),
                message: "handshake done twice on one connection".into(),
            });
        }
        let (superuser, record, sent, received) =
            hello(&self.node, &mut self.writer, &mut self.reader, root, 0)?;
        self.welcomed = Some(Welcomed {
            root: root.to_string(),
            superuser,
            sent,
            received,
        });
        Ok(record)
    }
}

impl Conn {
    /// Start the agent on `node`: in process for the local node, over SSH
    /// (`<agent_path> agent`) otherwise.
    pub fn open(node: &crate::config::Node) -> Result<Conn, SyncError> {
        use crate::transport::{self, Address};
        if matches!(node.endpoint.address, Address::Local) {
            return Conn::local(&node.name, &node.state_dir).map_err(|e| SyncError::Agent {
                node: node.name.clone(),
                message: format!("cannot start the local agent: {e}"),
            });
        }
        let cmd = format!(
            "{} agent --root {} --state-dir {}",
            transport::shell_quote(&node.agent_path),
            transport::shell_quote(&node.root),
            transport::shell_quote(&node.state_dir)
        );
        let openssh = transport::openssh::use_for(node);
        let agent_err = |e: transport::TransportError| SyncError::Agent {
            node: node.name.clone(),
            message: e.to_string(),
        };
        // OpenSSH verifies the host key itself (strictly, against the same
        // known_hosts, re-checked with libssh2 on refusal for the message),
        // so no built-in session is opened then: one handshake, not two.
        let (session, spawned) = if openssh {
            (
                None,
                transport::openssh::spawn_openssh(&node.endpoint, &cmd),
            )
        } else {
            let t = transport::connect(&node.endpoint).map_err(agent_err)?;
            let p = t.spawn(&cmd);
            (Some(t), p)
        };
        let mut p = spawned.map_err(|e| SyncError::Agent {
            node: node.name.clone(),
            message: format!("cannot start `{cmd}`: {e}"),
        })?;
        let writer = p.take_stdin().expect("a spawned process has stdin");
        let reader = std::mem::replace(&mut p.stdout, Box::new(std::io::empty()));
        let name = node.name.clone();
        let agent_path = node.agent_path.clone();
        Ok(Conn {
            node: node.name.clone(),
            reader,
            writer,
            finish: Box::new(move || {
                // Keep the SSH session alive until the agent is done.
                let _session = session;
                match p.wait() {
                    Ok(out) if out.status == 0 => None,
                    Ok(out) if out.status == 127 || out.status == 126 => Some(format!(
                        "`{agent_path}` not found or not executable on {name}: install hasync {} there (same architecture), or set agent_path",
                        crate::version::VERSION
                    )),
                    Ok(out) => Some(match out.stderr_tail() {
                        tail if tail.is_empty() => format!("agent exited with status {}", out.status),
                        tail => format!("agent exited with status {}: {tail}", out.status),
                    }),
                    Err(e) => Some(e.to_string()),
                }
            }),
            welcomed: None,
        })
    }
}

/// What a run is asked to do.
#[derive(Debug, Clone)]
pub struct SyncOptions {
    pub src_root: String,
    pub dst_root: String,
    pub excludes: Vec<String>,
    pub delete: bool,
    pub max_delete: u64,
    pub checksum: bool,
    pub dry_run: bool,
    /// The primary's epoch, sent in Hello: the receiving agent writes only
    /// if its own state record is a standby of that epoch.
    pub epoch: u64,
}

impl SyncOptions {
    /// A copy from `src` to `dst` as the config's `[files]` says (its
    /// max_delete, no --checksum, not a dry run) for a primary at `epoch`;
    /// callers change what their command line overrides.
    pub fn from_config(
        files: &crate::config::Files,
        src: &crate::config::Node,
        dst: &crate::config::Node,
        epoch: u64,
    ) -> SyncOptions {
        SyncOptions {
            src_root: src.root.clone(),
            dst_root: dst.root.clone(),
            excludes: files.exclude.clone(),
            delete: files.delete,
            max_delete: files.max_delete,
            checksum: false,
            dry_run: false,
            epoch,
        }
    }
}

/// What the engine tells whoever shows progress. Engines never print.
///
/// A run calls, in order: `scanning` (from both sides at once, as their
/// entries arrive), `planned` once, then `sending` / `advanced` / `done` as
/// the files go across, from the engine's reader threads.
pub trait Progress: Send + Sync {
    /// `entries` entries of `node`'s scan have arrived so far (the agent
    /// sends them once its walk is done; until then this is not called).
    fn scanning(&self, _node: &str, _entries: u64) {}
    /// The plan is known: totals for the bars.
    fn planned(&self, _plan: &Plan) {}
    /// The content of `path` starts on its way to the standby.
    fn sending(&self, _path: &[u8]) {}
    /// `bytes` more of a whole file's content went to the standby (deltas
    /// count when they are done: their frames are not file bytes).
    fn advanced(&self, _bytes: u64) {}
    /// A file (or other action) finished; `bytes` more of its size are now
    /// done, beyond what `advanced` reported for it.
    fn done(&self, _path: &[u8], _bytes: u64) {}
    /// Something worth a log line (a retry, a phase).
    fn note(&self, _msg: &str) {}
}

/// Progress that shows nothing.
pub struct Quiet;
impl Progress for Quiet {}

/// The result of a run (or of a dry run, with zero transfer figures).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Summary {
    pub totals: plan::Totals,
    /// Bytes sent as literal data / reconstructed from the standby's copy.
    pub literal_bytes: u64,
    pub matched_bytes: u64,
    /// Protocol bytes sent to and received from the standby's agent.
    pub wire_sent: u64,
    pub wire_received: u64,
    /// Files sent again whole after a failed content check (or because they
    /// changed while being read).
    pub resent: u64,
    /// Files that changed (or vanished) while being read, again when read a
    /// second time: not copied by this run (the standby keeps what it had, which the next
    /// run's quick check sees as different).
    pub changed: u64,
    pub scan_secs: f64,
    pub transfer_secs: f64,
    pub skipped_special: u64,
}

/// Why a run failed. Every message names the node and what to do.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("{node}: {message}")]
    Agent { node: String, message: String },
    #[error("{node}: connection to the agent lost during {step}: {source}")]
    Connection {
        node: String,
        step: &'static str,
        source: wire::WireError,
    },
    #[error(
        "refusing to delete {count} paths on {node}: more than max_delete = {max}. If the primary really lost them, \
         raise [files] max_delete or pass --max-delete {count}; if not, check the primary's tree first"
    )]
    TooManyDeletes {
        node: String,
        count: usize,
        max: u64,
    },
    #[error("{failed} of {total} changes failed on {node}; first: {first}")]
    Partial {
        node: String,
        failed: usize,
        total: usize,
        first: String,
    },
}

/// A plan and, unless dry-run, what carrying it out took.
pub struct Outcome {
    pub plan: Plan,
    pub summary: Summary,
}

/// Counts bytes through a reader or writer.
struct Counted<T> {
    inner: T,
    count: Arc<AtomicU64>,
}

impl<T: Read> Read for Counted<T> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

impl<T: Write> Write for Counted<T> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.count.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// The buffer in front of each connection's writer; see [`Side::new`].
const WRITE_BUFFER: usize = 64 << 10;

type Reader = BufReader<Counted<Box<dyn Read + Send>>>;
type Writer = BufWriter<Counted<Box<dyn Write + Send>>>;

fn recv(
    node: &str,
    step: &'static str,
    r: &mut impl Read,
    buf: &mut Vec<u8>,
) -> Result<Msg, SyncError> {
    match wire::recv(r, buf) {
        Ok(Some(Msg::Fatal { message })) => Err(SyncError::Agent {
            node: node.into(),
            message,
        }),
        Ok(Some(m)) => Ok(m),
        Ok(None) => Err(SyncError::Connection {
            node: node.into(),
            step,
            source: wire::WireError::Closed,
        }),
        Err(e) => Err(SyncError::Connection {
            node: node.into(),
            step,
            source: e,
        }),
    }
}

/// One side during a run.
struct Side {
    node: String,
    reader: Reader,
    writer: Writer,
    finish: Box<dyn FnOnce() -> Option<String> + Send>,
    superuser: bool,
    /// The agent already said Bye (the source does at the end of a transfer).
    closed: bool,
    /// The Hello done by [`Conn::handshake`], if any.
    welcomed: Option<Welcomed>,
    received: Arc<AtomicU64>,
    sent: Arc<AtomicU64>,
}

impl Side {
    fn new(c: Conn) -> Side {
        let early = c.welcomed.as_ref().map_or((0, 0), |w| (w.sent, w.received));
        let received = Arc::new(AtomicU64::new(early.1));
        let sent = Arc::new(AtomicU64::new(early.0));
        Side {
            node: c.node,
            reader: BufReader::with_capacity(
                wire::CHUNK + 64,
                Counted {
                    inner: c.reader,
                    count: received.clone(),
                },
            ),
            // Small frames coalesce; file data (up to CHUNK per frame) is
            // written straight from its frame, not copied into the buffer.
            writer: BufWriter::with_capacity(
                WRITE_BUFFER,
                Counted {
                    inner: c.writer,
                    count: sent.clone(),
                },
            ),
            finish: c.finish,
            superuser: false,
            closed: false,
            welcomed: c.welcomed,
            received,
            sent,
        }
    }

    fn send(&mut self, step: &'static str, m: &Msg) -> Result<(), SyncError> {
        wire::send(&mut self.writer, m)
            .and_then(|()| self.writer.flush())
            .map_err(|e| SyncError::Connection {
                node: self.node.clone(),
                step,
                source: e.into(),
            })
    }

    /// Hello for `root` from a primary at `epoch`; on a connection that
    /// said Hello already ([`Conn::handshake`]), a Claim of `epoch`.
    fn hello(&mut self, root: &str, epoch: u64) -> Result<(), SyncError> {
        if let Some(w) = &self.welcomed {
            if w.root != root {
                return Err(SyncError::Agent {
                    node: self.node.clone(),
                    message: format!("the agent was started for root {}, not {root}", w.root),
                });
            }
            self.superuser = w.superuser;
            return self.send("handshake", &Msg::Claim { epoch });
        }
        let (superuser, _record, _, _) =
            hello(&self.node, &mut self.writer, &mut self.reader, root, epoch)?;
        self.superuser = superuser;
        Ok(())
    }

    /// Scan, returning the sorted manifest and the count of skipped specials.
    fn scan_reply(
        &mut self,
        id: u64,
        progress: &dyn Progress,
    ) -> Result<(Vec<Entry>, u64), SyncError> {
        let mut buf = Vec::new();
        let mut entries = Vec::new();
        loop {
            match recv(&self.node, "scan", &mut self.reader, &mut buf)? {
                Msg::Entries { id: i, entries: e } if i == id => {
                    entries.extend(e);
                    progress.scanning(&self.node, entries.len() as u64);
                }
                Msg::Done { id: i, bytes } if i == id => return Ok((entries, bytes)),
                Msg::Fail { message, .. } => {
                    return Err(SyncError::Agent {
                        node: self.node.clone(),
                        message: format!("scan failed: {message}"),
                    })
                }
                other => {
                    return Err(SyncError::Agent {
                        node: self.node.clone(),
                        message: format!("unexpected during scan: {other:?}"),
                    })
                }
            }
        }
    }
}

/// Run a file replication from `src` to `dst`.
pub fn run(
    src: Conn,
    dst: Conn,
    opts: &SyncOptions,
    progress: &dyn Progress,
) -> Result<Outcome, SyncError> {
    let mut src = Side::new(src);
    let mut dst = Side::new(dst);
    let t0 = Instant::now();
    // Handshakes and scans on both sides at once.
    let scan =
        |side: &mut Side, root: &str, cleanup: bool| -> Result<(Vec<Entry>, u64), SyncError> {
            side.hello(root, opts.epoch)?;
            side.send(
                "scan",
                &Msg::Scan {
                    id: 0,
                    excludes: opts.excludes.clone(),
                    checksum: opts.checksum,
                    cleanup,
                },
            )?;
            side.scan_reply(0, progress)
        };
    let (src_scan, dst_scan) = std::thread::scope(|s| {
        let a = s.spawn(|| scan(&mut src, &opts.src_root, false));
        // The standby removes leftovers of interrupted runs (never on a dry run).
        let b = scan(&mut dst, &opts.dst_root, !opts.dry_run);
        (a.join().expect("scan thread panicked"), b)
    });
    let (src_entries, skipped) = src_scan.map_err(|e| explain(&mut src, e))?;
    let (dst_entries, _) = dst_scan.map_err(|e| explain(&mut dst, e))?;
    let plan = plan::plan(
        &src_entries,
        &dst_entries,
        PlanOptions {
            checksum: opts.checksum,
            owners: src.superuser && dst.superuser,
            delete: opts.delete,
        },
    );
    let mut summary = Summary {
        totals: plan.totals(),
        scan_secs: t0.elapsed().as_secs_f64(),
        skipped_special: skipped,
        ..Summary::default()
    };
    let deletes = plan.deletes();
    if deletes as u64 > opts.max_delete {
        let _ = src.send("close", &Msg::Bye);
        let _ = dst.send("close", &Msg::Bye);
        return Err(SyncError::TooManyDeletes {
            node: dst.node.clone(),
            count: deletes,
            max: opts.max_delete,
        });
    }
    progress.planned(&plan);
    if opts.dry_run || plan.is_empty() {
        close(src, dst, &mut summary)?;
        return Ok(Outcome { plan, summary });
    }
    let t1 = Instant::now();
    execute(&mut src, &mut dst, &plan, &mut summary, progress).map_err(|e| match &e {
        SyncError::Connection { node, .. } if *node == dst.node => explain_transfer(&mut dst, e),
        SyncError::Connection { node, .. } if *node == src.node => explain_transfer(&mut src, e),
        _ => e,
    })?;
    summary.transfer_secs = t1.elapsed().as_secs_f64();
    close(src, dst, &mut summary)?;
    Ok(Outcome { plan, summary })
}

/// A stream lost mid-transfer: the agent's fate said alongside, or instead
/// when the node went silent (then "closed" would mislead: it was `ssh`
/// or the pump that gave up on it).
fn explain_transfer(side: &mut Side, e: SyncError) -> SyncError {
    let lost = e.to_string();
    let step = match &e {
        SyncError::Connection { step, .. } => *step,
        _ => "",
    };
    match explain(side, e) {
        SyncError::Agent { node, message } if !message.contains("no answer for") => {
            let lost = lost.strip_prefix(&format!("{node}: ")).unwrap_or(&lost);
            let why = message
                .strip_prefix(&format!("{step}: "))
                .unwrap_or(&message);
            SyncError::Agent {
                message: format!("{lost}; {why}"),
                node,
            }
        }
        other => other,
    }
}

/// A lost connection says little; the agent's exit status and stderr say why.
fn explain(side: &mut Side, e: SyncError) -> SyncError {
    if let SyncError::Connection { step, .. } = &e {
        // Our ends of its stream first: an agent still alive (garbage on
        // the wire rather than a dead link) then sees EOF and exits, so
        // waiting for it cannot hang.
        let writer = std::mem::replace(
            &mut side.writer,
            BufWriter::new(Counted {
                inner: Box::new(std::io::sink()),
                count: Arc::default(),
            }),
        );
        // Unflushed: a write into a stream nobody reads could block.
        drop(writer.into_parts());
        drop(std::mem::replace(
            &mut side.reader,
            BufReader::new(Counted {
                inner: Box::new(std::io::empty()),
                count: Arc::default(),
            }),
        ));
        let finish = std::mem::replace(&mut side.finish, Box::new(|| None));
        if let Some(why) = finish() {
            return SyncError::Agent {
                node: side.node.clone(),
                message: format!("{step}: {why}"),
            };
        }
    }
    e
}

fn close(mut src: Side, mut dst: Side, summary: &mut Summary) -> Result<(), SyncError> {
    let mut buf = Vec::new();
    for side in [&mut src, &mut dst] {
        if side.closed {
            continue;
        }
        side.send("close", &Msg::Bye)?;
        loop {
            match recv(&side.node, "close", &mut side.reader, &mut buf)? {
                Msg::Bye => break,
                _ => continue,
            }
        }
    }
    summary.wire_sent = dst.sent.load(Ordering::Relaxed);
    summary.wire_received = dst.received.load(Ordering::Relaxed);
    drop(src.writer);
    drop(dst.writer);
    for (node, finish) in [(src.node, src.finish), (dst.node, dst.finish)] {
        if let Some(message) = finish() {
            return Err(SyncError::Agent {
                node,
                message: format!("agent ended badly: {message}"),
            });
        }
    }
    Ok(())
}

/// A frame from the source during the transfer: for a request (with the
/// message unless it is file data, and the frame as received), its Bye, or
/// something to ignore.
enum Frame {
    Job(u64, Option<Msg>, Vec<u8>),
    Bye,
    Other,
}

/// Reads one whole frame, length header included, into a new buffer (to be
/// forwarded as it is).
fn recv_raw(node: &str, step: &'static str, r: &mut Reader) -> Result<Vec<u8>, SyncError> {
    let err = |source| SyncError::Connection {
        node: node.into(),
        step,
        source,
    };
    let mut head = [0u8; 4];
    match r.read_exact(&mut head) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            return Err(err(wire::WireError::Closed))
        }
        Err(e) => return Err(err(e.into())),
    }
    let len = u32::from_le_bytes(head) as usize;
    if len > wire::MAX_FRAME {
        return Err(err(wire::WireError::TooLarge(len)));
    }
    if len == 0 {
        return Err(err(wire::WireError::Malformed("empty frame".into())));
    }
    let mut raw = vec![0u8; 4 + len];
    raw[..4].copy_from_slice(&head);
    r.read_exact(&mut raw[4..]).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            err(wire::WireError::Malformed(format!(
                "stream ends inside a frame of {len} bytes"
            )))
        } else {
            err(e.into())
        }
    })?;
    Ok(raw)
}

/// A request id that only wakes the standby's reader.
const WAKE: u64 = u64::MAX;

/// What the pipeline knows about each request id.
#[derive(Clone)]
struct Job {
    entry: Entry,
    /// A delta against the standby's copy (false: whole file).
    delta: bool,
    /// Begin already forwarded to the standby.
    begun: bool,
    resent: bool,
    /// Bytes of its content reported to [`Progress::advanced`] so far.
    counted: u64,
    /// The source disowned the data it sent: the file changed while it was
    /// being read (a `Fail` marked `mismatch` from the source agent).
    changed: bool,
}

/// A file changed or vanished on the source between the scan and the end
/// of its read (see `agent::read_out`; `message` is the source's): read it
/// again once (whole); if that fails the same way, leave the standby's copy
/// alone and say so. Never a failure of the run, as with rsync's "file has
/// vanished": the application writes (and removes temp files) during the
/// warm pass, and the next run copies (or deletes) them.
/// Returns the request to send to the source, if any.
fn changed_while_read(
    st: &mut State,
    id: u64,
    message: &str,
    progress: &dyn Progress,
) -> Option<Msg> {
    let j = st.jobs.get_mut(&id)?;
    let path = String::from_utf8_lossy(&j.entry.path).into_owned();
    // The standby quotes the source's Fail as "sender: ...".
    let message = message.strip_prefix("sender: ").unwrap_or(message);
    if !j.resent {
        progress.note(&format!("{path}: {message}; reading it again"));
        j.changed = false;
        j.resent = true;
        j.delta = false;
        j.begun = false;
        st.resent += 1;
        return Some(Msg::ReadReq {
            id,
            path: j.entry.path.clone(),
        });
    }
    progress.note(&format!(
        "{path}: {message}, again; not copied this time, the next run copies it"
    ));
    st.jobs.remove(&id);
    st.changed += 1;
    st.outstanding -= 1;
    None
}

#[derive(Default)]
struct State {
    jobs: HashMap<u64, Job>,
    outstanding: usize,
    failures: Vec<String>,
    fatal: Option<SyncError>,
    literal: u64,
    matched: u64,
    resent: u64,
    changed: u64,
    next_id: u64,
}

enum Out {
    Frame(Vec<u8>),
    /// A frame carrying this many bytes of a whole file's content: added to
    /// the writer's count once written (what progress shows as sent).
    Content(Vec<u8>, u64),
}

/// How often the bytes written to the standby are passed on to progress.
const PROGRESS_EVERY: Duration = Duration::from_millis(100);

fn writer_thread(
    mut w: Writer,
    rx: Receiver<Out>,
    written: Arc<AtomicU64>,
) -> std::thread::JoinHandle<(Writer, Option<std::io::Error>)> {
    std::thread::spawn(move || {
        let mut err = None;
        loop {
            // Block for the next frame; flush only when nothing else is queued.
            let first = match rx.try_recv() {
                Ok(f) => Some(f),
                Err(mpsc::TryRecvError::Empty) => {
                    if let Err(e) = w.flush() {
                        err = Some(e);
                        break;
                    }
                    rx.recv().ok()
                }
                Err(mpsc::TryRecvError::Disconnected) => None,
            };
            let (f, content) = match first {
                Some(Out::Frame(f)) => (f, 0),
                Some(Out::Content(f, n)) => (f, n),
                None => break,
            };
            if let Err(e) = w.write_all(&f) {
                err = Some(e);
                break;
            }
            written.fetch_add(content, Ordering::Relaxed);
        }
        if err.is_none() {
            if let Err(e) = w.flush() {
                err = Some(e);
            }
        }
        // Drain until every sender is gone, so none blocks on a dead writer.
        for _ in rx.iter() {}
        (w, err)
    })
}

fn execute(
    src: &mut Side,
    dst: &mut Side,
    plan: &Plan,
    summary: &mut Summary,
    progress: &dyn Progress,
) -> Result<(), SyncError> {
    let state = Arc::new(Mutex::new(State {
        next_id: 1,
        ..State::default()
    }));
    let (to_src, src_rx) = mpsc::channel::<Out>();
    let (to_dst, dst_rx) = mpsc::sync_channel::<Out>(64);
    let src_writer = std::mem::replace(
        &mut src.writer,
        BufWriter::new(Counted {
            inner: Box::new(std::io::sink()),
            count: Arc::default(),
        }),
    );
    let dst_writer = std::mem::replace(
        &mut dst.writer,
        BufWriter::new(Counted {
            inner: Box::new(std::io::sink()),
            count: Arc::default(),
        }),
    );
    // Content bytes handed to the standby's connection, and whether the
    // transfer is over (for the thread that reports them).
    let written = Arc::new(AtomicU64::new(0));
    let over = AtomicBool::new(false);
    let src_w = writer_thread(src_writer, src_rx, Arc::default());
    let dst_w = writer_thread(dst_writer, dst_rx, written.clone());
    let frame = |m: &Msg| Out::Frame(m.encode());
    let src_node = src.node.clone();
    let dst_node = dst.node.clone();

    // Everything the standby must do before file data arrives goes first
    // in its channel: deletes (deepest first) and directories (parents first).
    let mut files = Vec::new();
    let mut dst_ops = 0usize;
    {
        let mut st = state.lock().expect("state lock");
        for a in &plan.actions {
            let id = st.next_id;
            st.next_id += 1;
            let msg = match a {
                Action::Delete { path, .. } => Msg::Delete {
                    id,
                    path: path.clone(),
                    recursive: false,
                },
                Action::Create(e) if e.kind == Kind::Dir => Msg::Mkdir {
                    id,
                    path: e.path.clone(),
                    attrs: e.attrs,
                },
                Action::Create(e) | Action::Relink { entry: e, .. } if e.kind == Kind::Symlink => {
                    Msg::Symlink {
                        id,
                        path: e.path.clone(),
                        target: e.target.clone().unwrap_or_default(),
                        attrs: e.attrs,
                    }
                }
                Action::Attrs { entry, .. } => Msg::SetAttrs {
                    id,
                    path: entry.path.clone(),
                    attrs: entry.attrs,
                },
                Action::Create(e) => {
                    files.push((id, e.clone(), false));
                    continue;
                }
                Action::Update { entry, .. } => {
                    files.push((id, entry.clone(), true));
                    continue;
                }
                Action::Relink { .. } => unreachable!("relink is for symlinks"),
            };
            let entry = match a {
                Action::Delete { path, kind, .. } => Entry {
                    path: path.clone(),
                    kind: *kind,
                    size: 0,
                    attrs: Default::default(),
                    target: None,
                    hash: None,
                },
                Action::Create(e)
                | Action::Relink { entry: e, .. }
                | Action::Attrs { entry: e, .. }
                | Action::Update { entry: e, .. } => e.clone(),
            };
            st.jobs.insert(
                id,
                Job {
                    entry,
                    delta: false,
                    begun: true,
                    resent: false,
                    counted: 0,
                    changed: false,
                },
            );
            st.outstanding += 1;
            dst_ops += 1;
            let _ = to_dst.send(frame(&msg));
        }
        for (id, e, delta) in &files {
            st.jobs.insert(
                *id,
                Job {
                    entry: e.clone(),
                    delta: *delta,
                    begun: false,
                    resent: false,
                    counted: 0,
                    changed: false,
                },
            );
            st.outstanding += 1;
        }
    }
    let total = dst_ops + files.len();
    if total == 0 {
        // Only directory metadata to set.
        drop((to_src, to_dst));
        src.writer = src_w.join().expect("writer thread").0;
        dst.writer = dst_w.join().expect("writer thread").0;
        return finish_dirs(dst, plan);
    }

    let result = std::thread::scope(|s| -> Result<(), SyncError> {
        // However this closure ends, the reporting thread ends with it (the
        // scope waits for it).
        struct Over<'a>(&'a AtomicBool);
        impl Drop for Over<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Release);
            }
        }
        let _over = Over(&over);
        // Bytes sent, as the standby's connection takes them (the source
        // reads far ahead of a slow link): a bar moves at the link's pace.
        s.spawn(|| {
            let mut reported = 0;
            loop {
                let end = over.load(Ordering::Acquire);
                let now = written.load(Ordering::Relaxed);
                if now > reported {
                    progress.advanced(now - reported);
                    reported = now;
                }
                if end {
                    return;
                }
                std::thread::sleep(PROGRESS_EVERY);
            }
        });
        // Source reader: file content and deltas, forwarded to the standby.
        let src_reader = &mut src.reader;
        let st1 = state.clone();
        let to_dst1 = to_dst.clone();
        let to_src1 = to_src.clone();
        let src_node1 = src_node.clone();
        let sr = s.spawn(move || {
            loop {
                // Frames are forwarded as they came, without decoding and
                // re-encoding file content.
                let parsed = recv_raw(&src_node1, "file transfer", src_reader).and_then(|raw| {
                    let conn_err = |e| SyncError::Connection {
                        node: src_node1.clone(),
                        step: "file transfer",
                        source: e,
                    };
                    let msg = match wire::data_view(&raw[4..]) {
                        Some(Ok((id, _))) => return Ok(Frame::Job(id, None, raw)),
                        Some(Err(e)) => return Err(conn_err(e)),
                        None => Msg::decode(&raw[4..]).map_err(conn_err)?,
                    };
                    match msg {
                        Msg::Fatal { message } => Err(SyncError::Agent {
                            node: src_node1.clone(),
                            message,
                        }),
                        Msg::End { id, .. } | Msg::Fail { id, .. } => {
                            Ok(Frame::Job(id, Some(msg), raw))
                        }
                        Msg::Bye => Ok(Frame::Bye),
                        _ => Ok(Frame::Other),
                    }
                });
                let (id, msg, raw) = match parsed {
                    Ok(Frame::Job(id, msg, raw)) => (id, msg, raw),
                    Ok(Frame::Bye) => return,
                    Ok(Frame::Other) => continue,
                    Err(e) => {
                        let mut st = st1.lock().expect("state lock");
                        if st.fatal.is_none() && st.outstanding > 0 {
                            st.fatal = Some(e);
                            // Wake the standby reader: its answer makes it see the failure.
                            let _ = to_dst1.send(frame(&Msg::Sync { id: WAKE }));
                        }
                        return;
                    }
                };
                let mut st = st1.lock().expect("state lock");
                if st.fatal.is_some() {
                    // The run has failed: drain the source, write nothing more.
                    continue;
                }
                let Some(job) = st.jobs.get_mut(&id) else {
                    continue;
                };
                if !job.begun {
                    job.begun = true;
                    if let Some(Msg::Fail {
                        message, mismatch, ..
                    }) = &msg
                    {
                        // Never started on the standby: the failure is ours to count.
                        if *mismatch {
                            if let Some(again) = changed_while_read(&mut st, id, message, progress)
                            {
                                let _ = to_src1.send(frame(&again));
                            }
                        } else {
                            let p = String::from_utf8_lossy(&job.entry.path).into_owned();
                            st.failures.push(format!("{p}: {message}"));
                            st.outstanding -= 1;
                        }
                        if st.outstanding == 0 {
                            // The standby's reader waits for an answer; this
                            // one (to an id it does not know) ends it.
                            let _ = to_dst1.send(frame(&Msg::Sync { id: WAKE }));
                        }
                        continue;
                    }
                    let begin = Msg::Begin {
                        id,
                        path: job.entry.path.clone(),
                        delta: job.delta,
                        attrs: job.entry.attrs,
                    };
                    let path = job.entry.path.clone();
                    drop(st);
                    progress.sending(&path);
                    let _ = to_dst1.send(frame(&begin));
                    st = st1.lock().expect("state lock");
                }
                // Whole-file content counts as it goes (a large file's bar
                // moves before the standby acknowledges it).
                let mut advanced = 0;
                if msg.is_none() {
                    if let (Some(job), Some(Ok((_, bytes)))) =
                        (st.jobs.get_mut(&id), wire::data_view(&raw[4..]))
                    {
                        if !job.delta {
                            advanced = (bytes.len() as u64)
                                .min(job.entry.size.saturating_sub(job.counted));
                            job.counted += advanced;
                        }
                    }
                }
                if let Some(Msg::End {
                    literal, matched, ..
                }) = &msg
                {
                    st.literal += literal;
                    st.matched += matched;
                }
                if let Some(Msg::Fail { mismatch: true, .. }) = &msg {
                    // Forwarded below: the standby drops its temp file and
                    // answers Fail, which its reader handles as a change.
                    if let Some(j) = st.jobs.get_mut(&id) {
                        j.changed = true;
                    }
                }
                drop(st);
                // Forward the frame as it came.
                let _ = to_dst1.send(if advanced > 0 {
                    Out::Content(raw, advanced)
                } else {
                    Out::Frame(raw)
                });
            }
        });

        // Standby reader: completions, signatures, retries.
        let dst_reader = &mut dst.reader;
        let st2 = state.clone();
        let to_src2 = to_src.clone();
        let dst_node2 = dst_node.clone();
        let dr = s.spawn(move || {
            let mut buf = Vec::new();
            loop {
                let msg = match recv(&dst_node2, "file transfer", dst_reader, &mut buf) {
                    Ok(m) => m,
                    Err(e) => {
                        let mut st = st2.lock().expect("state lock");
                        if st.fatal.is_none() {
                            st.fatal = Some(e);
                        }
                        return;
                    }
                };
                let mut st = st2.lock().expect("state lock");
                if st.fatal.is_some() {
                    return;
                }
                match msg {
                    // Signature chunks: pass to the source for its delta.
                    Msg::Data { id, bytes } => {
                        drop(st);
                        let _ = to_src2.send(frame(&Msg::Data { id, bytes }));
                    }
                    Msg::Done { id, .. } => {
                        let Some(job) = st.jobs.get(&id).cloned() else {
                            // The source reader's wake-up once nothing is left.
                            if st.outstanding == 0 {
                                return;
                            }
                            continue;
                        };
                        if job.delta && !job.begun {
                            // The signature is complete: ask for the delta.
                            drop(st);
                            let _ = to_src2.send(frame(&Msg::DeltaReq {
                                id,
                                path: job.entry.path,
                            }));
                        } else {
                            st.jobs.remove(&id);
                            st.outstanding -= 1;
                            let done = st.outstanding == 0;
                            drop(st);
                            progress.done(
                                &job.entry.path,
                                if job.entry.kind == Kind::File {
                                    job.entry.size.saturating_sub(job.counted)
                                } else {
                                    0
                                },
                            );
                            if done {
                                return;
                            }
                        }
                    }
                    Msg::Fail {
                        id,
                        mismatch,
                        message,
                    } => {
                        let Some(job) = st.jobs.get(&id).cloned() else {
                            continue;
                        };
                        if job.changed {
                            if let Some(again) = changed_while_read(&mut st, id, &message, progress)
                            {
                                drop(st);
                                let _ = to_src2.send(frame(&again));
                            } else if st.outstanding == 0 {
                                return;
                            }
                            continue;
                        }
                        let path = String::from_utf8_lossy(&job.entry.path).into_owned();
                        if job.entry.kind == Kind::File
                            && ((job.delta && !job.begun) || (mismatch && !job.resent))
                        {
                            // No usable base, or a content check failed: send it whole.
                            progress.note(&format!("{path}: {message}; sending it whole"));
                            let j = st.jobs.get_mut(&id).expect("job exists");
                            j.delta = false;
                            j.begun = false;
                            if mismatch {
                                j.resent = true;
                                st.resent += 1;
                            }
                            drop(st);
                            let _ = to_src2.send(frame(&Msg::ReadReq {
                                id,
                                path: job.entry.path,
                            }));
                        } else {
                            st.jobs.remove(&id);
                            st.failures.push(format!("{path}: {message}"));
                            st.outstanding -= 1;
                            if st.outstanding == 0 {
                                return;
                            }
                        }
                    }
                    Msg::Bye => return,
                    other => {
                        st.fatal = Some(SyncError::Agent {
                            node: dst_node2.clone(),
                            message: format!("unexpected message: {other:?}"),
                        });
                        return;
                    }
                }
            }
        });

        // Requests for every file: signatures from the standby for updates,
        // whole content from the source for creates. All sent at once.
        for (id, e, delta) in &files {
            if *delta {
                let _ = to_dst.send(frame(&Msg::SigReq {
                    id: *id,
                    path: e.path.clone(),
                }));
            } else {
                let _ = to_src.send(frame(&Msg::ReadReq {
                    id: *id,
                    path: e.path.clone(),
                }));
            }
        }
        // Wait for the standby reader to see every completion (or a failure).
        let _ = dr.join();
        // The source reader would block on its connection: end the source's
        // session, its Bye ends the reader.
        let _ = to_src.send(frame(&Msg::Bye));
        let _ = sr.join();
        src.closed = true;
        Ok(())
    });
    result?;

    // Directory metadata last (writing into a directory changes its mtime),
    // then make the new directory entries durable.
    let (fatal, failures) = {
        let mut st = state.lock().expect("state lock");
        summary.literal_bytes = st.literal;
        summary.matched_bytes = st.matched;
        summary.resent = st.resent;
        summary.changed = st.changed;
        (st.fatal.take(), std::mem::take(&mut st.failures))
    };
    drop(to_src);
    drop(to_dst);
    let (w, e1) = src_w.join().expect("writer thread");
    src.writer = w;
    let (w, e2) = dst_w.join().expect("writer thread");
    dst.writer = w;
    if let Some(f) = fatal {
        return Err(f);
    }
    if let Some(e) = e2 {
        return Err(SyncError::Connection {
            node: dst.node.clone(),
            step: "file transfer",
            source: e.into(),
        });
    }
    if let Some(e) = e1 {
        return Err(SyncError::Connection {
            node: src.node.clone(),
            step: "file transfer",
            source: e.into(),
        });
    }
    finish_dirs(dst, plan)?;
    if let Some(first) = failures.first() {
        return Err(SyncError::Partial {
            node: dst.node.clone(),
            failed: failures.len(),
            total,
            first: first.clone(),
        });
    }
    Ok(())
}

fn finish_dirs(dst: &mut Side, plan: &Plan) -> Result<(), SyncError> {
    let mut id = u64::MAX / 2;
    for e in &plan.dir_attrs {
        id += 1;
        wire::send(
            &mut dst.writer,
            &Msg::SetAttrs {
                id,
                path: e.path.clone(),
                attrs: e.attrs,
            },
        )
        .map_err(|err| SyncError::Connection {
            node: dst.node.clone(),
            step: "directory attributes",
            source: err.into(),
        })?;
    }
    id += 1;
    dst.send("sync", &Msg::Sync { id })?;
    let mut buf = Vec::new();
    let mut failures = Vec::new();
    loop {
        match recv(&dst.node, "directory attributes", &mut dst.reader, &mut buf)? {
            Msg::Done { id: i, .. } if i == id => break,
            Msg::Fail { id: i, message, .. } if i == id => {
                failures.push(format!("sync: {message}"))
            }
            Msg::Fail { message, .. } => failures.push(message),
            _ => {}
        }
    }
    if let Some(first) = failures.first() {
        return Err(SyncError::Partial {
            node: dst.node.clone(),
            failed: failures.len(),
            total: plan.dir_attrs.len(),
            first: first.clone(),
        });
    }
    Ok(())
}
