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
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::time::Instant;

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
    /// Starts another agent on the same node (a second lane for a large
    /// transfer to the standby, see [`LANE_MIN_FILES`]), if possible.
    pub reopen: Option<Reopen>,
}

/// Opens one more connection to a node's agent.
pub type Reopen = Arc<dyn Fn() -> Result<Conn, SyncError> + Send + Sync>;

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
        let (name, dir) = (node.to_string(), state_dir.to_string());
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
            reopen: Some(Arc::new(move || {
                Conn::local(&name, &dir).map_err(|e| SyncError::Agent {
                    node: name.clone(),
                    message: format!("cannot start the local agent: {e}"),
                })
            })),
        })
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
        let again = node.clone();
        Ok(Conn {
            reopen: Some(Arc::new(move || Conn::open(&again))),
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
                    Ok(out) => Some(format!("agent exited with status {}: {}", out.status, out.stderr_tail())),
                    Err(e) => Some(e.to_string()),
                }
            }),
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

/// What the engine tells whoever shows progress. Engines never print.
pub trait Progress: Send + Sync {
    /// The plan is known: totals for the bars.
    fn planned(&self, _plan: &Plan) {}
    /// A file (or other action) finished; `bytes` of its size are now done.
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
    /// Connections to the standby that carried files (2 for a large
    /// transfer, see [`LANE_MIN_FILES`]).
    pub standby_lanes: u32,
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
    r: &mut Reader,
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
    reopen: Option<Reopen>,
    superuser: bool,
    /// The agent already said Bye (the source does at the end of a transfer).
    closed: bool,
    received: Arc<AtomicU64>,
    sent: Arc<AtomicU64>,
}

impl Side {
    fn new(c: Conn) -> Side {
        let received = Arc::new(AtomicU64::new(0));
        let sent = Arc::new(AtomicU64::new(0));
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
            reopen: c.reopen,
            superuser: false,
            closed: false,
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

    fn hello(&mut self, root: &str, epoch: u64) -> Result<(), SyncError> {
        self.send(
            "handshake",
            &Msg::Hello {
                protocol: crate::version::PROTOCOL,
                version: crate::version::VERSION.into(),
                root: root.as_bytes().to_vec(),
                epoch,
            },
        )?;
        let mut buf = Vec::new();
        match recv(&self.node, "handshake", &mut self.reader, &mut buf)? {
            Msg::Welcome { protocol, superuser, .. } if protocol == crate::version::PROTOCOL => {
                self.superuser = superuser;
                Ok(())
            }
            Msg::Welcome { protocol, version, .. } => Err(SyncError::Agent {
                node: self.node.clone(),
                message: format!(
                    "agent is hasync {version} (protocol {protocol}), this is hasync {} (protocol {}); install the same version on both nodes",
                    crate::version::VERSION,
                    crate::version::PROTOCOL
                ),
            }),
            other => Err(SyncError::Agent { node: self.node.clone(), message: format!("unexpected answer to Hello: {other:?}") }),
        }
    }

    /// Scan, returning the sorted manifest and the count of skipped specials.
    fn scan_reply(&mut self, id: u64) -> Result<(Vec<Entry>, u64), SyncError> {
        let mut buf = Vec::new();
        let mut entries = Vec::new();
        loop {
            match recv(&self.node, "scan", &mut self.reader, &mut buf)? {
                Msg::Entries { id: i, entries: e } if i == id => entries.extend(e),
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
            side.scan_reply(0)
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
    execute(
        &mut src,
        &mut dst,
        (&opts.dst_root, opts.epoch),
        &plan,
        &mut summary,
        progress,
    )?;
    summary.transfer_secs = t1.elapsed().as_secs_f64();
    close(src, dst, &mut summary)?;
    Ok(Outcome { plan, summary })
}

/// A lost connection says little; the agent's exit status and stderr say why.
fn explain(side: &mut Side, e: SyncError) -> SyncError {
    if let SyncError::Connection { step, .. } = &e {
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
    summary.wire_sent += dst.sent.load(Ordering::Relaxed);
    summary.wire_received += dst.received.load(Ordering::Relaxed);
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

/// A request id that only wakes a standby reader.
const WAKE: u64 = u64::MAX;

/// A transfer of at least this many files (or [`LANE_MIN_BYTES`]) gets a
/// second connection to the standby ("lane"): a second agent there, with
/// its own SSH channel, so that the standby's share of the work (receiving,
/// writing, hashing, creating inodes, committing batches; signatures and
/// deltas for updates) runs on two CPUs instead of one. Each lane is a
/// complete agent session of its own (Hello with the epoch, atomic verified
/// writes, batched durability); the client splits the files between them.
const LANE_MIN_FILES: usize = 2000;
const LANE_MIN_BYTES: u64 = 256 << 20;
/// Until the second lane may take files (it is connected, and the standby
/// has created every directory of the plan: the first lane does that, before
/// any file), file requests go to the first lane, at most this many ahead
/// of what the source has started sending, so that the rest can still be
/// split.
const LANE_WINDOW: usize = 256;
/// Per-file cost, in bytes, when balancing files between lanes.
const LANE_FILE_COST: u64 = 64 << 10;

/// What the pipeline knows about each request id.
#[derive(Clone)]
struct Job {
    entry: Entry,
    /// A delta against the standby's copy (false: whole file).
    delta: bool,
    /// Begin already forwarded to the standby.
    begun: bool,
    resent: bool,
    /// The source disowned the data it sent: the file changed while it was
    /// being read (a `Fail` marked `mismatch` from the source agent).
    changed: bool,
    /// Which connection to the standby carries it.
    lane: usize,
    /// A delete, directory, symlink or attribute change, sent before any
    /// file (always on lane 0).
    pre: bool,
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
    /// Pre-file operations not yet answered (the second lane waits for 0).
    pre_ops: usize,
    /// File jobs whose first frame came from the source.
    src_seen: usize,
    /// The channel to each lane's writer (lane 0 first); a lane joins only
    /// while work is outstanding.
    lanes: Vec<mpsc::SyncSender<Out>>,
    /// The second lane could not be opened (or is not wanted any more).
    lane_gone: bool,
    failures: Vec<String>,
    fatal: Option<SyncError>,
    literal: u64,
    matched: u64,
    resent: u64,
    changed: u64,
    next_id: u64,
}

impl State {
    /// The channels of every lane, to wake their readers (after unlocking:
    /// a send may block on a full channel).
    fn wake_list(&self) -> Vec<mpsc::SyncSender<Out>> {
        self.lanes.clone()
    }
}

fn wake(lanes: Vec<mpsc::SyncSender<Out>>) {
    for tx in lanes {
        let _ = tx.send(Out::Frame(Msg::Sync { id: WAKE }.encode()));
    }
}

enum Out {
    Frame(Vec<u8>),
}

fn writer_thread(
    mut w: Writer,
    rx: Receiver<Out>,
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
            let Some(Out::Frame(f)) = first else { break };
            if let Err(e) = w.write_all(&f) {
                err = Some(e);
                break;
            }
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

/// Takes a side's writer away (for its writer thread), leaving a sink.
fn take_writer(side: &mut Side) -> Writer {
    std::mem::replace(
        &mut side.writer,
        BufWriter::new(Counted {
            inner: Box::new(std::io::sink()),
            count: Arc::default(),
        }),
    )
}

/// Reads one standby connection during the transfer: completions,
/// signatures, retries. Returns when nothing is outstanding any more, or
/// the run failed.
fn lane_reader(
    node: &str,
    reader: &mut Reader,
    state: &Mutex<State>,
    to_src: &mpsc::Sender<Out>,
    progress: &dyn Progress,
) {
    let frame = |m: &Msg| Out::Frame(m.encode());
    let mut buf = Vec::new();
    loop {
        let msg = match recv(node, "file transfer", reader, &mut buf) {
            Ok(m) => m,
            Err(e) => {
                let mut st = state.lock().expect("state lock");
                if st.fatal.is_none() {
                    st.fatal = Some(e);
                    let lanes = st.wake_list();
                    drop(st);
                    wake(lanes);
                }
                return;
            }
        };
        let mut st = state.lock().expect("state lock");
        if st.fatal.is_some() {
            return;
        }
        match msg {
            // Signature chunks: pass to the source for its delta.
            Msg::Data { id, bytes } => {
                drop(st);
                let _ = to_src.send(frame(&Msg::Data { id, bytes }));
            }
            Msg::Done { id, .. } => {
                let Some(job) = st.jobs.get(&id).cloned() else {
                    // A wake-up: once nothing is left, or the run failed.
                    if st.outstanding == 0 {
                        return;
                    }
                    continue;
                };
                if job.delta && !job.begun {
                    // The signature is complete: ask for the delta.
                    drop(st);
                    let _ = to_src.send(frame(&Msg::DeltaReq {
                        id,
                        path: job.entry.path,
                    }));
                } else {
                    st.jobs.remove(&id);
                    st.outstanding -= 1;
                    if job.pre {
                        st.pre_ops -= 1;
                    }
                    let done = st.outstanding == 0;
                    let lanes = if done { st.wake_list() } else { Vec::new() };
                    drop(st);
                    progress.done(
                        &job.entry.path,
                        if job.entry.kind == Kind::File {
                            job.entry.size
                        } else {
                            0
                        },
                    );
                    if done {
                        // The other lanes' readers wait for an answer.
                        wake(lanes);
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
                    if let Some(again) = changed_while_read(&mut st, id, &message, progress) {
                        drop(st);
                        let _ = to_src.send(frame(&again));
                    } else if st.outstanding == 0 {
                        let lanes = st.wake_list();
                        drop(st);
                        wake(lanes);
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
                    let _ = to_src.send(frame(&Msg::ReadReq {
                        id,
                        path: job.entry.path,
                    }));
                } else {
                    st.jobs.remove(&id);
                    st.failures.push(format!("{path}: {message}"));
                    st.outstanding -= 1;
                    if job.pre {
                        st.pre_ops -= 1;
                    }
                    if st.outstanding == 0 {
                        let lanes = st.wake_list();
                        drop(st);
                        wake(lanes);
                        return;
                    }
                }
            }
            Msg::Bye => return,
            other => {
                st.fatal = Some(SyncError::Agent {
                    node: node.to_string(),
                    message: format!("unexpected message: {other:?}"),
                });
                let lanes = st.wake_list();
                drop(st);
                wake(lanes);
                return;
            }
        }
    }
}

/// The directory part of `path` (empty at the top).
fn parent_dir(path: &[u8]) -> &[u8] {
    path.iter()
        .rposition(|&b| b == b'/')
        .map_or(&path[..0], |i| &path[..i])
}

/// The second lane once it has served: its connection (to close), and its
/// writer thread.
type Lane = (
    Side,
    std::thread::JoinHandle<(Writer, Option<std::io::Error>)>,
    bool,
);

/// Opens the second lane, joins the run if work is still outstanding, and
/// reads its answers until the end. `None` if it could not be opened (the
/// run goes on with one lane) or was not needed any more.
fn second_lane(
    reopen: &Reopen,
    (root, epoch): (&str, u64),
    state: &Mutex<State>,
    to_src: &mpsc::Sender<Out>,
    progress: &dyn Progress,
) -> Option<Lane> {
    let opened = reopen().and_then(|c| {
        let mut side = Side::new(c);
        side.hello(root, epoch).map(|()| side)
    });
    let mut side = match opened {
        Ok(side) => side,
        Err(e) => {
            progress.note(&format!(
                "a second connection to the standby failed ({e}); going on with one"
            ));
            state.lock().expect("state lock").lane_gone = true;
            return None;
        }
    };
    let (tx, rx) = mpsc::sync_channel::<Out>(64);
    let w = writer_thread(take_writer(&mut side), rx);
    {
        let mut st = state.lock().expect("state lock");
        if st.outstanding == 0 || st.fatal.is_some() {
            st.lane_gone = true;
            drop(st);
            drop(tx);
            return Some((side, w, false));
        }
        st.lanes.push(tx);
    }
    let node = side.node.clone();
    lane_reader(&node, &mut side.reader, state, to_src, progress);
    Some((side, w, true))
}

fn execute(
    src: &mut Side,
    dst: &mut Side,
    dst_hello: (&str, u64),
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
    let src_w = writer_thread(take_writer(src), src_rx);
    let dst_w = writer_thread(take_writer(dst), dst_rx);
    let frame = |m: &Msg| Out::Frame(m.encode());
    let src_node = src.node.clone();
    let dst_node = dst.node.clone();

    // Everything the standby must do before file data arrives goes first
    // in its channel: deletes (deepest first) and directories (parents first).
    let mut files = Vec::new();
    let mut dst_ops = 0usize;
    {
        let mut st = state.lock().expect("state lock");
        st.lanes.push(to_dst.clone());
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
                    changed: false,
                    lane: 0,
                    pre: true,
                },
            );
            st.outstanding += 1;
            st.pre_ops += 1;
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
                    changed: false,
                    lane: 0,
                    pre: false,
                },
            );
            st.outstanding += 1;
        }
    }
    let total = dst_ops + files.len();
    if total == 0 {
        // Only directory metadata to set.
        state.lock().expect("state lock").lanes.clear();
        drop((to_src, to_dst));
        src.writer = src_w.join().expect("writer thread").0;
        dst.writer = dst_w.join().expect("writer thread").0;
        return finish_dirs(dst, plan);
    }
    let file_bytes: u64 = files.iter().map(|(_, e, _)| e.size).sum();
    let reopen = dst
        .reopen
        .clone()
        .filter(|_| files.len() >= LANE_MIN_FILES || file_bytes >= LANE_MIN_BYTES)
        .filter(|_| files.len() >= 2);
    if reopen.is_none() {
        state.lock().expect("state lock").lane_gone = true;
    }

    let mut lane = None;
    let result = std::thread::scope(|s| -> Result<(), SyncError> {
        // The second lane connects while the first starts.
        let lane1 = reopen.map(|reopen| {
            let (st, to_src) = (&*state, to_src.clone());
            s.spawn(move || second_lane(&reopen, dst_hello, st, &to_src, progress))
        });

        // Source reader: file content and deltas, forwarded to the standby.
        let src_reader = &mut src.reader;
        let st1 = state.clone();
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
                            // Wake the standby readers: their answer makes
                            // them see the failure.
                            let lanes = st.wake_list();
                            drop(st);
                            wake(lanes);
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
                let lane = job.lane;
                if !job.begun {
                    job.begun = true;
                    st.src_seen += 1;
                    let job = st.jobs.get_mut(&id).expect("job exists");
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
                            // The standby readers wait for an answer; this
                            // one (to an id they do not know) ends them.
                            let lanes = st.wake_list();
                            drop(st);
                            wake(lanes);
                        }
                        continue;
                    }
                    let begin = Msg::Begin {
                        id,
                        path: job.entry.path.clone(),
                        delta: job.delta,
                        attrs: job.entry.attrs,
                    };
                    let tx = st.lanes[lane].clone();
                    drop(st);
                    let _ = tx.send(frame(&begin));
                    st = st1.lock().expect("state lock");
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
                let Some(tx) = st.lanes.get(lane).cloned() else {
                    continue;
                };
                drop(st);
                // Forward the frame as it came.
                let _ = tx.send(Out::Frame(raw));
            }
        });

        // Lane 0's reader.
        let dst_reader = &mut dst.reader;
        let (st2, to_src2, dst_node2) = (&*state, to_src.clone(), dst_node.clone());
        let dr = s.spawn(move || lane_reader(&dst_node2, dst_reader, st2, &to_src2, progress));

        // Requests for every file: signatures from the standby for updates,
        // whole content from the source for creates. With a second lane
        // coming, the files are split between the lanes once it may take
        // them (balanced by size plus a per-file cost; consecutive small
        // files of one directory stay together).
        let mut cost = [0u64; 2];
        let mut last: Option<(&[u8], usize)> = None;
        for (requested, (id, e, delta)) in files.iter().enumerate() {
            let lanes = {
                let mut st = state.lock().expect("state lock");
                loop {
                    let ready = st.lanes.len() > 1 && st.pre_ops == 0;
                    let waiting = !ready && !st.lane_gone && st.fatal.is_none();
                    if !waiting || requested < st.src_seen + LANE_WINDOW {
                        break;
                    }
                    drop(st);
                    std::thread::sleep(std::time::Duration::from_millis(1));
                    st = state.lock().expect("state lock");
                }
                if st.pre_ops == 0 {
                    st.lanes.len()
                } else {
                    1
                }
            };
            let parent = parent_dir(&e.path);
            let lane = match last {
                _ if lanes < 2 => 0,
                Some((p, l)) if p == parent && e.size < LANE_MIN_BYTES / 8 => l,
                _ => usize::from(cost[1] < cost[0]),
            };
            cost[lane] += e.size + LANE_FILE_COST;
            last = Some((parent, lane));
            let tx = {
                let mut st = state.lock().expect("state lock");
                if let Some(j) = st.jobs.get_mut(id) {
                    j.lane = lane;
                }
                st.lanes[lane].clone()
            };
            if *delta {
                let _ = tx.send(frame(&Msg::SigReq {
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
        // Wait for the standby readers to see every completion (or a failure).
        let _ = dr.join();
        lane = lane1.and_then(|h| h.join().expect("lane thread panicked"));
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
        st.lanes.clear();
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
    summary.standby_lanes = 1;
    let mut lane = lane.map(|(mut side, w, joined)| {
        let (w, e) = w.join().expect("writer thread");
        side.writer = w;
        if joined {
            summary.standby_lanes = 2;
        }
        (side, e)
    });
    if let Some(f) = fatal {
        return Err(f);
    }
    for (node, e) in [
        (&dst.node, e2),
        (&src.node, e1),
        (&dst.node, lane.as_mut().and_then(|(_, e)| e.take())),
    ] {
        if let Some(e) = e {
            return Err(SyncError::Connection {
                node: node.clone(),
                step: "file transfer",
                source: e.into(),
            });
        }
    }
    if let Some((side, _)) = lane {
        close_lane(side, summary)?;
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

/// Ends the second lane: the directories it renamed into are made durable
/// (its `Done`s already mean durable files), then the session.
fn close_lane(mut side: Side, summary: &mut Summary) -> Result<(), SyncError> {
    let id = u64::MAX / 2;
    side.send("sync", &Msg::Sync { id })?;
    let mut buf = Vec::new();
    loop {
        match recv(&side.node, "sync", &mut side.reader, &mut buf)? {
            Msg::Done { id: i, .. } if i == id => break,
            Msg::Fail { id: i, message, .. } if i == id => {
                return Err(SyncError::Partial {
                    node: side.node.clone(),
                    failed: 1,
                    total: 1,
                    first: format!("sync: {message}"),
                })
            }
            _ => {}
        }
    }
    side.send("close", &Msg::Bye)?;
    loop {
        if let Msg::Bye = recv(&side.node, "close", &mut side.reader, &mut buf)? {
            break;
        }
    }
    summary.wire_sent += side.sent.load(Ordering::Relaxed);
    summary.wire_received += side.received.load(Ordering::Relaxed);
    drop(side.writer);
    match (side.finish)() {
        Some(message) => Err(SyncError::Agent {
            node: side.node,
            message: format!("agent ended badly: {message}"),
        }),
        None => Ok(()),
    }
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
