//! hasync: a warm standby of a document-management server.
//!
//! The library holds the engines; the binary (`src/main.rs`, `src/cli.rs`,
//! `src/commands/`) is a thin layer of clap definitions and output. Modules,
//! in reading order:
//!
//! - [`config`] — the TOML file, validated into plain types with located errors.
//! - [`transport`] — how commands, byte streams and tunnels reach a node:
//!   SSH (the system OpenSSH client or libssh2, host keys always verified)
//!   or local processes.
//! - [`state`] — each node's state record (role, epoch, history, last cycle).
//! - [`roles`] — who is primary: resolving the records, fencing, status.
//! - [`lock`] — one run at a time per node, and the step it announces there.
//! - [`service`] — stopping, starting and probing the application, in the
//!   mode its role demands.
//! - [`agent`] — `hasync agent`, the far side of a file replication.
//! - [`sync`] — the file engine: manifests, filters, plans, delta transfer.
//! - [`db`] — database replication: dump, staged load, verify, swap.
//! - [`cycle`] — the replication cycle, with the restart guarantee.
//! - [`hooks`] — the operator's programs run after cycles and promotes.
//! - [`signals`] — SIGINT/SIGTERM as a call on an ordinary thread.
//! - [`doctor`] — per-node checks of everything a cycle needs.
//! - [`schedule`] — crontab(5) lines and the next times they fire.
//! - [`version`] — the agent handshake line both sides compare.

pub mod agent;
pub mod config;
pub mod cycle;
pub mod db;
pub mod doctor;
pub mod hooks;
pub mod lock;
pub mod roles;
pub mod schedule;
pub mod service;
pub mod signals;
pub mod state;
pub mod sync;
pub mod transport;
pub mod version;
