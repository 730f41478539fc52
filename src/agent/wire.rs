//! The agent protocol's wire format: length-prefixed frames carrying one
//! message each.
//!
//! A frame is `u32 little-endian length | u8 type | payload`, the length
//! counting the type byte and the payload. Frames are capped at
//! [`MAX_FRAME`], so a hostile or corrupt peer cannot make the other side
//! allocate without bound, and a truncated frame is an error, never a hang on
//! a half-read value. Payloads are encoded by hand (fixed-width integers,
//! `u32`-length-prefixed byte strings): the format is small, stable, versioned
//! by [`crate::version::PROTOCOL`], and has no dependency that could change it
//! under us.
//!
//! Every request carries an id; the peer answers each with data frames for
//! that id and exactly one `Done` or `Fail`. Requests are pipelined: the
//! sender never waits for an answer before sending the next request.

use std::io::{self, Read, Write};

pub use crate::sync::manifest::{Attrs, Entry, Kind};

/// The largest frame either side accepts (data chunks are 256 KiB).
pub const MAX_FRAME: usize = 4 << 20;
/// The size of data chunks in file and delta streams.
pub const CHUNK: usize = 256 << 10;
/// The longest `Fail` or `Fatal` message sent; longer ones are cut. Messages
/// quote what the peer sent (paths, its own messages), and an answer must
/// never be a frame the peer refuses.
pub const MAX_MESSAGE: usize = 16 << 10;

/// `s` cut to [`MAX_MESSAGE`] bytes at a character boundary.
fn clip(s: &str) -> &str {
    if s.len() <= MAX_MESSAGE {
        return s;
    }
    let mut end = MAX_MESSAGE;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A node's state record (`<state_dir>/state.json`) as its agent read it,
/// sent in `Welcome`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// Not read: an agent without `--state-dir`, or a Welcome of protocol 2
    /// (decoded so that the version mismatch can still be reported).
    NotSent,
    /// The node has no record yet.
    Absent,
    /// The record's bytes, unparsed (the caller checks them).
    Present(Vec<u8>),
    /// It exists but could not be read; why.
    Unreadable(String),
}

/// Every message of the protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Msg {
    /// First frame from the client: who it is and which tree to serve.
    Hello {
        protocol: u32,
        version: String,
        root: Vec<u8>,
        /// The epoch of the primary the caller copies from (0: none). An
        /// agent writes only into a standby of that same epoch.
        epoch: u64,
    },
    /// The agent's answer to Hello; `superuser` says it can set owners,
    /// `record` is this node's state record as the agent found it (so the
    /// caller needs no second connection to read it).
    Welcome {
        protocol: u32,
        version: String,
        superuser: bool,
        record: Record,
    },
    /// Sets the epoch of the primary the caller copies from, after Hello
    /// (whose `epoch` it replaces): a caller that said Hello before it knew
    /// the direction claims its epoch once it does. No answer.
    Claim {
        epoch: u64,
    },
    /// Scan the root; answered by `Entries` frames and `Done`. The first
    /// entry is the root itself, with the empty path (protocol 4).
    Scan {
        id: u64,
        excludes: Vec<String>,
        checksum: bool,
        cleanup: bool,
    },
    Entries {
        id: u64,
        entries: Vec<Entry>,
    },
    /// Signature of the receiver's current file; answered by `Data` and `Done`.
    SigReq {
        id: u64,
        path: Vec<u8>,
    },
    /// Delta of the sender's file against a signature sent as `Data` frames
    /// with the same id right before; answered by `Data` and `End`.
    DeltaReq {
        id: u64,
        path: Vec<u8>,
    },
    /// Whole content of the sender's file; answered by `Data` and `End`.
    ReadReq {
        id: u64,
        path: Vec<u8>,
    },
    /// Start writing a file on the receiver: its content (or a delta against
    /// its current one) follows as `Data` frames and an `End`.
    Begin {
        id: u64,
        path: Vec<u8>,
        delta: bool,
        attrs: Attrs,
    },
    Data {
        id: u64,
        bytes: Vec<u8>,
    },
    /// The end of a content or delta stream, with the new file's size and
    /// BLAKE3 hash, and (for deltas) the literal and matched byte counts.
    End {
        id: u64,
        size: u64,
        hash: [u8; 32],
        literal: u64,
        matched: u64,
    },
    Mkdir {
        id: u64,
        path: Vec<u8>,
        attrs: Attrs,
    },
    Symlink {
        id: u64,
        path: Vec<u8>,
        target: Vec<u8>,
        attrs: Attrs,
    },
    /// Remove a path; a directory only when empty unless `recursive`.
    Delete {
        id: u64,
        path: Vec<u8>,
        recursive: bool,
    },
    /// Set mode, owner and mtime; the empty path is the root itself
    /// (protocol 4), refused by every other request.
    SetAttrs {
        id: u64,
        path: Vec<u8>,
        attrs: Attrs,
    },
    /// Flush directory metadata to disk and answer `Done`.
    Sync {
        id: u64,
    },
    /// Request `id` succeeded; `bytes` is what it wrote (files) or 0. For
    /// a file: sent once it is durable under its final name. The receiver
    /// commits files in batches, so it may come after answers to later
    /// requests; a `Sync` (and the end of the input) commits the batch.
    Done {
        id: u64,
        bytes: u64,
    },
    /// Request `id` failed; the session goes on. `mismatch` marks a file
    /// whose written content did not hash to what the sender said.
    Fail {
        id: u64,
        mismatch: bool,
        message: String,
    },
    /// The session cannot go on.
    Fatal {
        message: String,
    },
    Bye,
}

const T_HELLO: u8 = 1;
const T_WELCOME: u8 = 2;
const T_SCAN: u8 = 3;
const T_ENTRIES: u8 = 4;
const T_SIGREQ: u8 = 5;
const T_DELTAREQ: u8 = 6;
const T_READREQ: u8 = 7;
const T_BEGIN: u8 = 8;
const T_DATA: u8 = 9;
const T_END: u8 = 10;
const T_MKDIR: u8 = 11;
const T_SYMLINK: u8 = 12;
const T_DELETE: u8 = 13;
const T_SETATTRS: u8 = 14;
const T_SYNC: u8 = 15;
const T_DONE: u8 = 16;
const T_FAIL: u8 = 17;
const T_FATAL: u8 = 18;
const T_BYE: u8 = 19;
const T_CLAIM: u8 = 20;

/// A protocol violation by the peer.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("connection closed by the peer")]
    Closed,
    #[error("frame of {0} bytes exceeds the limit of {MAX_FRAME}")]
    TooLarge(usize),
    #[error("malformed frame: {0}")]
    Malformed(String),
    #[error("{0}")]
    Io(#[from] io::Error),
}

struct Enc(Vec<u8>);

impl Enc {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn i64(&mut self, v: i64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn bytes(&mut self, v: &[u8]) {
        self.u32(v.len() as u32);
        self.0.extend_from_slice(v);
    }
    fn str(&mut self, v: &str) {
        self.bytes(v.as_bytes());
    }
    fn attrs(&mut self, a: &Attrs) {
        self.u32(a.mode);
        self.i64(a.mtime_sec);
        self.u32(a.mtime_nsec);
        self.u32(a.uid);
        self.u32(a.gid);
    }
}

struct Dec<'a>(&'a [u8]);

impl<'a> Dec<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.0.len() < n {
            return Err(WireError::Malformed(format!(
                "needs {n} more bytes, has {}",
                self.0.len()
            )));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    fn i64(&mut self) -> Result<i64, WireError> {
        Ok(i64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    fn bytes(&mut self) -> Result<Vec<u8>, WireError> {
        let n = self.u32()? as usize;
        Ok(self.take(n)?.to_vec())
    }
    fn str(&mut self) -> Result<String, WireError> {
        String::from_utf8(self.bytes()?)
            .map_err(|_| WireError::Malformed("string is not UTF-8".into()))
    }
    fn hash(&mut self) -> Result<[u8; 32], WireError> {
        Ok(self.take(32)?.try_into().expect("32 bytes"))
    }
    fn bool(&mut self) -> Result<bool, WireError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            b => Err(WireError::Malformed(format!("bad boolean {b}"))),
        }
    }
    fn attrs(&mut self) -> Result<Attrs, WireError> {
        Ok(Attrs {
            mode: self.u32()?,
            mtime_sec: self.i64()?,
            mtime_nsec: self.u32()?,
            uid: self.u32()?,
            gid: self.u32()?,
        })
    }
    fn end(&self) -> Result<(), WireError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(WireError::Malformed(format!(
                "{} trailing bytes",
                self.0.len()
            )))
        }
    }
}

impl Msg {
    /// The message's name, for errors (never its content, which may be
    /// megabytes).
    pub fn kind(&self) -> &'static str {
        match self {
            Msg::Hello { .. } => "Hello",
            Msg::Welcome { .. } => "Welcome",
            Msg::Claim { .. } => "Claim",
            Msg::Scan { .. } => "Scan",
            Msg::Entries { .. } => "Entries",
            Msg::SigReq { .. } => "SigReq",
            Msg::DeltaReq { .. } => "DeltaReq",
            Msg::ReadReq { .. } => "ReadReq",
            Msg::Begin { .. } => "Begin",
            Msg::Data { .. } => "Data",
            Msg::End { .. } => "End",
            Msg::Mkdir { .. } => "Mkdir",
            Msg::Symlink { .. } => "Symlink",
            Msg::Delete { .. } => "Delete",
            Msg::SetAttrs { .. } => "SetAttrs",
            Msg::Sync { .. } => "Sync",
            Msg::Done { .. } => "Done",
            Msg::Fail { .. } => "Fail",
            Msg::Fatal { .. } => "Fatal",
            Msg::Bye => "Bye",
        }
    }

    /// Encode as one frame, header included.
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Enc(Vec::with_capacity(64));
        e.u32(0); // length, patched below
        match self {
            Msg::Hello {
                protocol,
                version,
                root,
                epoch,
            } => {
                e.u8(T_HELLO);
                e.u32(*protocol);
                e.str(version);
                e.bytes(root);
                e.u64(*epoch);
            }
            Msg::Welcome {
                protocol,
                version,
                superuser,
                record,
            } => {
                e.u8(T_WELCOME);
                e.u32(*protocol);
                e.str(version);
                e.u8(u8::from(*superuser));
                // NotSent: no field, as in protocol 2.
                match record {
                    Record::NotSent => {}
                    Record::Absent => e.u8(0),
                    Record::Present(bytes) => {
                        e.u8(1);
                        e.bytes(bytes);
                    }
                    Record::Unreadable(message) => {
                        e.u8(2);
                        e.str(clip(message));
                    }
                }
            }
            Msg::Claim { epoch } => {
                e.u8(T_CLAIM);
                e.u64(*epoch);
            }
            Msg::Scan {
                id,
                excludes,
                checksum,
                cleanup,
            } => {
                e.u8(T_SCAN);
                e.u64(*id);
                e.u32(excludes.len() as u32);
                for x in excludes {
                    e.str(x);
                }
                e.u8(u8::from(*checksum));
                e.u8(u8::from(*cleanup));
            }
            Msg::Entries { id, entries } => {
                e.u8(T_ENTRIES);
                e.u64(*id);
                e.u32(entries.len() as u32);
                for en in entries {
                    e.bytes(&en.path);
                    e.u8(match en.kind {
                        Kind::File => 0,
                        Kind::Dir => 1,
                        Kind::Symlink => 2,
                    });
                    e.u64(en.size);
                    e.attrs(&en.attrs);
                    match &en.target {
                        Some(t) => {
                            e.u8(1);
                            e.bytes(t);
                        }
                        None => e.u8(0),
                    }
                    match &en.hash {
                        Some(h) => {
                            e.u8(1);
                            e.0.extend_from_slice(h);
                        }
                        None => e.u8(0),
                    }
                }
            }
            Msg::SigReq { id, path } => {
                e.u8(T_SIGREQ);
                e.u64(*id);
                e.bytes(path);
            }
            Msg::DeltaReq { id, path } => {
                e.u8(T_DELTAREQ);
                e.u64(*id);
                e.bytes(path);
            }
            Msg::ReadReq { id, path } => {
                e.u8(T_READREQ);
                e.u64(*id);
                e.bytes(path);
            }
            Msg::Begin {
                id,
                path,
                delta,
                attrs,
            } => {
                e.u8(T_BEGIN);
                e.u64(*id);
                e.bytes(path);
                e.u8(u8::from(*delta));
                e.attrs(attrs);
            }
            Msg::Data { id, bytes } => {
                e.u8(T_DATA);
                e.u64(*id);
                e.bytes(bytes);
            }
            Msg::End {
                id,
                size,
                hash,
                literal,
                matched,
            } => {
                e.u8(T_END);
                e.u64(*id);
                e.u64(*size);
                e.0.extend_from_slice(hash);
                e.u64(*literal);
                e.u64(*matched);
            }
            Msg::Mkdir { id, path, attrs } => {
                e.u8(T_MKDIR);
                e.u64(*id);
                e.bytes(path);
                e.attrs(attrs);
            }
            Msg::Symlink {
                id,
                path,
                target,
                attrs,
            } => {
                e.u8(T_SYMLINK);
                e.u64(*id);
                e.bytes(path);
                e.bytes(target);
                e.attrs(attrs);
            }
            Msg::Delete {
                id,
                path,
                recursive,
            } => {
                e.u8(T_DELETE);
                e.u64(*id);
                e.bytes(path);
                e.u8(u8::from(*recursive));
            }
            Msg::SetAttrs { id, path, attrs } => {
                e.u8(T_SETATTRS);
                e.u64(*id);
                e.bytes(path);
                e.attrs(attrs);
            }
            Msg::Sync { id } => {
                e.u8(T_SYNC);
                e.u64(*id);
            }
            Msg::Done { id, bytes } => {
                e.u8(T_DONE);
                e.u64(*id);
                e.u64(*bytes);
            }
            Msg::Fail {
                id,
                mismatch,
                message,
            } => {
                e.u8(T_FAIL);
                e.u64(*id);
                e.u8(u8::from(*mismatch));
                e.str(clip(message));
            }
            Msg::Fatal { message } => {
                e.u8(T_FATAL);
                e.str(clip(message));
            }
            Msg::Bye => e.u8(T_BYE),
        }
        let len = (e.0.len() - 4) as u32;
        e.0[..4].copy_from_slice(&len.to_le_bytes());
        e.0
    }

    /// Decode one frame body (type byte and payload, without the length).
    pub fn decode(body: &[u8]) -> Result<Msg, WireError> {
        let mut d = Dec(body);
        let t = d.u8()?;
        let msg = match t {
            T_HELLO => Msg::Hello {
                protocol: d.u32()?,
                version: d.str()?,
                root: d.bytes()?,
                // Protocol 1 had no epoch: decoded as 0, so that the
                // agent can answer with the protocol mismatch.
                epoch: if d.0.is_empty() { 0 } else { d.u64()? },
            },
            T_WELCOME => Msg::Welcome {
                protocol: d.u32()?,
                version: d.str()?,
                superuser: d.bool()?,
                // Protocol 2 had no record: NotSent, so that the caller
                // can answer with the protocol mismatch.
                record: if d.0.is_empty() {
                    Record::NotSent
                } else {
                    match d.u8()? {
                        0 => Record::Absent,
                        1 => Record::Present(d.bytes()?),
                        2 => Record::Unreadable(d.str()?),
                        k => return Err(WireError::Malformed(format!("bad record kind {k}"))),
                    }
                },
            },
            T_CLAIM => Msg::Claim { epoch: d.u64()? },
            T_SCAN => {
                let id = d.u64()?;
                let n = d.u32()? as usize;
                let mut excludes = Vec::with_capacity(n.min(1024));
                for _ in 0..n {
                    excludes.push(d.str()?);
                }
                Msg::Scan {
                    id,
                    excludes,
                    checksum: d.bool()?,
                    cleanup: d.bool()?,
                }
            }
            T_ENTRIES => {
                let id = d.u64()?;
                let n = d.u32()? as usize;
                let mut entries = Vec::with_capacity(n.min(4096));
                for _ in 0..n {
                    let path = d.bytes()?;
                    let kind = match d.u8()? {
                        0 => Kind::File,
                        1 => Kind::Dir,
                        2 => Kind::Symlink,
                        k => return Err(WireError::Malformed(format!("bad entry kind {k}"))),
                    };
                    let size = d.u64()?;
                    let attrs = d.attrs()?;
                    let target = if d.bool()? { Some(d.bytes()?) } else { None };
                    let hash = if d.bool()? { Some(d.hash()?) } else { None };
                    entries.push(Entry {
                        path,
                        kind,
                        size,
                        attrs,
                        target,
                        hash,
                    });
                }
                Msg::Entries { id, entries }
            }
            T_SIGREQ => Msg::SigReq {
                id: d.u64()?,
                path: d.bytes()?,
            },
            T_DELTAREQ => Msg::DeltaReq {
                id: d.u64()?,
                path: d.bytes()?,
            },
            T_READREQ => Msg::ReadReq {
                id: d.u64()?,
                path: d.bytes()?,
            },
            T_BEGIN => Msg::Begin {
                id: d.u64()?,
                path: d.bytes()?,
                delta: d.bool()?,
                attrs: d.attrs()?,
            },
            T_DATA => Msg::Data {
                id: d.u64()?,
                bytes: d.bytes()?,
            },
            T_END => Msg::End {
                id: d.u64()?,
                size: d.u64()?,
                hash: d.hash()?,
                literal: d.u64()?,
                matched: d.u64()?,
            },
            T_MKDIR => Msg::Mkdir {
                id: d.u64()?,
                path: d.bytes()?,
                attrs: d.attrs()?,
            },
            T_SYMLINK => Msg::Symlink {
                id: d.u64()?,
                path: d.bytes()?,
                target: d.bytes()?,
                attrs: d.attrs()?,
            },
            T_DELETE => Msg::Delete {
                id: d.u64()?,
                path: d.bytes()?,
                recursive: d.bool()?,
            },
            T_SETATTRS => Msg::SetAttrs {
                id: d.u64()?,
                path: d.bytes()?,
                attrs: d.attrs()?,
            },
            T_SYNC => Msg::Sync { id: d.u64()? },
            T_DONE => Msg::Done {
                id: d.u64()?,
                bytes: d.u64()?,
            },
            T_FAIL => Msg::Fail {
                id: d.u64()?,
                mismatch: d.bool()?,
                message: d.str()?,
            },
            T_FATAL => Msg::Fatal { message: d.str()? },
            T_BYE => Msg::Bye,
            t => return Err(WireError::Malformed(format!("unknown message type {t}"))),
        };
        d.end()?;
        Ok(msg)
    }
}

/// Read one frame's body. `Ok(None)` on a clean end of stream between frames.
pub fn read_frame(r: &mut impl Read, buf: &mut Vec<u8>) -> Result<Option<()>, WireError> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match r.read(&mut len[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => {
                return Err(WireError::Malformed(
                    "stream ends inside a frame header".into(),
                ))
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(WireError::TooLarge(len));
    }
    if len == 0 {
        return Err(WireError::Malformed("empty frame".into()));
    }
    buf.clear();
    buf.resize(len, 0);
    r.read_exact(buf).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            WireError::Malformed(format!("stream ends inside a frame of {len} bytes"))
        } else {
            e.into()
        }
    })?;
    Ok(Some(()))
}

/// Read and decode one message; `Ok(None)` at a clean end of stream.
pub fn recv(r: &mut impl Read, buf: &mut Vec<u8>) -> Result<Option<Msg>, WireError> {
    match read_frame(r, buf)? {
        None => Ok(None),
        Some(()) => Msg::decode(buf).map(Some),
    }
}

/// Encode and write one message (not flushed).
pub fn send(w: &mut impl Write, msg: &Msg) -> io::Result<()> {
    w.write_all(&msg.encode())
}

/// Write `Msg::Data { id, bytes }` without building the message: the same
/// frame as [`send`], without copying `bytes` twice on the way. `bytes` must
/// fit a frame (at most [`CHUNK`] is ever sent).
pub fn send_data(w: &mut impl Write, id: u64, bytes: &[u8]) -> io::Result<()> {
    let mut head = [0u8; DATA_HEADER];
    let len = u32::try_from(DATA_HEADER - 4 + bytes.len())
        .ok()
        .filter(|&l| l as usize <= MAX_FRAME)
        .ok_or_else(|| io::Error::other("data chunk larger than a frame"))?;
    head[..4].copy_from_slice(&len.to_le_bytes());
    head[4] = T_DATA;
    head[5..13].copy_from_slice(&id.to_le_bytes());
    head[13..].copy_from_slice(&(bytes.len() as u32).to_le_bytes());
    w.write_all(&head)?;
    w.write_all(bytes)
}

/// Bytes of a `Data` frame before its payload: length, type, id, length of
/// the payload.
const DATA_HEADER: usize = 4 + 1 + 8 + 4;

/// A frame body (as [`read_frame`] returns it) that is a `Data` message:
/// its id and payload, borrowed, after the same checks as [`Msg::decode`].
/// `None` for any other message (decode it).
pub fn data_view(body: &[u8]) -> Option<Result<(u64, &[u8]), WireError>> {
    if body.first() != Some(&T_DATA) {
        return None;
    }
    let mut d = Dec(&body[1..]);
    Some((|| {
        let id = d.u64()?;
        let n = d.u32()? as usize;
        let bytes = d.take(n)?;
        d.end()?;
        Ok((id, bytes))
    })())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(m: Msg) {
        let frame = m.encode();
        let mut r = &frame[..];
        let mut buf = Vec::new();
        assert_eq!(recv(&mut r, &mut buf).unwrap(), Some(m));
        assert!(r.is_empty());
    }

    #[test]
    fn every_message_round_trips() {
        let a = Attrs {
            mode: 0o644,
            mtime_sec: -5,
            mtime_nsec: 999_999_999,
            uid: 1,
            gid: 2,
        };
        round_trip(Msg::Hello {
            protocol: 2,
            version: "0.1.0".into(),
            root: b"/srv/x".to_vec(),
            epoch: 7,
        });
        for record in [
            Record::NotSent,
            Record::Absent,
            Record::Present(br#"{"node":"a","role":"standby","epoch":2}"#.to_vec()),
            Record::Unreadable("permission denied".into()),
        ] {
            round_trip(Msg::Welcome {
                protocol: 3,
                version: "0.1.0".into(),
                superuser: true,
                record,
            });
        }
        round_trip(Msg::Claim { epoch: 9 });
        round_trip(Msg::Scan {
            id: 1,
            excludes: vec!["/logs/".into()],
            checksum: true,
            cleanup: false,
        });
        round_trip(Msg::Entries {
            id: 2,
            entries: vec![
                Entry {
                    path: b"a".to_vec(),
                    kind: Kind::File,
                    size: 3,
                    attrs: a,
                    target: None,
                    hash: Some([7; 32]),
                },
                Entry {
                    path: b"l".to_vec(),
                    kind: Kind::Symlink,
                    size: 0,
                    attrs: a,
                    target: Some(b"../x".to_vec()),
                    hash: None,
                },
            ],
        });
        round_trip(Msg::SigReq {
            id: 3,
            path: b"p".to_vec(),
        });
        round_trip(Msg::DeltaReq {
            id: 3,
            path: b"p".to_vec(),
        });
        round_trip(Msg::ReadReq {
            id: 3,
            path: b"p".to_vec(),
        });
        round_trip(Msg::Begin {
            id: 4,
            path: b"p".to_vec(),
            delta: true,
            attrs: a,
        });
        round_trip(Msg::Data {
            id: 4,
            bytes: vec![0; 1000],
        });
        round_trip(Msg::End {
            id: 4,
            size: 1000,
            hash: [1; 32],
            literal: 10,
            matched: 990,
        });
        round_trip(Msg::Mkdir {
            id: 5,
            path: b"d".to_vec(),
            attrs: a,
        });
        round_trip(Msg::Symlink {
            id: 6,
            path: b"l".to_vec(),
            target: b"t".to_vec(),
            attrs: a,
        });
        round_trip(Msg::Delete {
            id: 7,
            path: b"x".to_vec(),
            recursive: true,
        });
        round_trip(Msg::SetAttrs {
            id: 8,
            path: b"d".to_vec(),
            attrs: a,
        });
        round_trip(Msg::Sync { id: 9 });
        round_trip(Msg::Done { id: 9, bytes: 5 });
        round_trip(Msg::Fail {
            id: 9,
            mismatch: true,
            message: "no".into(),
        });
        round_trip(Msg::Fatal {
            message: "bad".into(),
        });
        round_trip(Msg::Bye);
    }

    #[test]
    fn data_frames_without_copies_match_the_message() {
        for n in [0usize, 1, 1000, CHUNK] {
            let bytes: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
            let m = Msg::Data {
                id: 77,
                bytes: bytes.clone(),
            };
            let mut direct = Vec::new();
            send_data(&mut direct, 77, &bytes).unwrap();
            assert_eq!(direct, m.encode());
            let mut buf = Vec::new();
            read_frame(&mut &direct[..], &mut buf).unwrap().unwrap();
            let (id, view) = data_view(&buf).unwrap().unwrap();
            assert_eq!((id, view), (77, &bytes[..]));
        }
        assert!(data_view(&Msg::Bye.encode()[4..]).is_none());
        // A payload length past the frame, and trailing bytes: refused.
        let mut f = Msg::Data {
            id: 1,
            bytes: vec![1, 2, 3],
        }
        .encode();
        f[13] = 4;
        assert!(data_view(&f[4..]).unwrap().is_err());
        f[13] = 2;
        assert!(data_view(&f[4..]).unwrap().is_err());
    }

    /// A protocol-2 Welcome (no record) still decodes, so that the caller
    /// can say which version the agent is; an unknown record kind does not.
    #[test]
    fn a_protocol_2_welcome_decodes_without_a_record() {
        let mut body = vec![T_WELCOME];
        body.extend_from_slice(&2u32.to_le_bytes());
        body.extend_from_slice(&5u32.to_le_bytes());
        body.extend_from_slice(b"0.1.0");
        body.push(1);
        assert_eq!(
            Msg::decode(&body).unwrap(),
            Msg::Welcome {
                protocol: 2,
                version: "0.1.0".into(),
                superuser: true,
                record: Record::NotSent,
            }
        );
        body.push(7);
        assert!(Msg::decode(&body).is_err());
        // A huge reason is cut, never a frame the peer refuses.
        let m = Msg::Welcome {
            protocol: 3,
            version: "v".into(),
            superuser: false,
            record: Record::Unreadable("x".repeat(MAX_FRAME)),
        };
        assert!(m.encode().len() < MAX_MESSAGE + 64);
    }

    #[test]
    fn hostile_frames_are_refused_without_allocating() {
        let mut buf = Vec::new();
        // Length far over the cap.
        let big = (u32::MAX).to_le_bytes();
        assert!(matches!(
            recv(&mut &big[..], &mut buf),
            Err(WireError::TooLarge(_))
        ));
        // A byte string claiming more than the frame holds.
        let mut f = vec![0, 0, 0, 0, T_DATA];
        f.extend_from_slice(&1u64.to_le_bytes());
        f.extend_from_slice(&u32::MAX.to_le_bytes());
        let len = (f.len() - 4) as u32;
        f[..4].copy_from_slice(&len.to_le_bytes());
        assert!(matches!(
            recv(&mut &f[..], &mut buf),
            Err(WireError::Malformed(_))
        ));
        // Truncated frame and truncated header.
        let frame = Msg::Sync { id: 1 }.encode();
        assert!(matches!(
            recv(&mut &frame[..frame.len() - 1], &mut buf),
            Err(WireError::Malformed(_))
        ));
        assert!(matches!(
            recv(&mut &frame[..2], &mut buf),
            Err(WireError::Malformed(_))
        ));
        // Unknown type, trailing bytes.
        assert!(Msg::decode(&[200]).is_err());
        assert!(Msg::decode(&[T_BYE, 0]).is_err());
        // Clean end of stream.
        assert!(recv(&mut &[][..], &mut buf).unwrap().is_none());
    }
}
