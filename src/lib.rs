//! hasync: a warm standby of a document-management server.
//!
//! The library holds the engines; the binary (`src/main.rs`, `src/cli.rs`,
//! `src/commands/`) is a thin layer of clap definitions and output. Modules,
//! in reading order:
//!
//! - [`config`] — the TOML file, validated into plain types with located errors.
//! - [`transport`] — how commands, byte streams and tunnels reach a node:
//!   SSH (libssh2, host keys always verified) or local processes.
//! - [`doctor`] — per-node checks of everything a cycle needs.
//! - [`schedule`] — crontab(5) lines and the next times they fire.
//! - [`version`] — the agent handshake line both sides compare.
//!
//! Still to come (see the issues): `agent` and `sync` (file replication),
//! `db` (database replication), `cycle`, `roles`, `report`.

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
