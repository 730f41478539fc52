//! hasync's integration tests: one binary (one link, one shared cluster of
//! real servers), run with `cargo test`. Every test drives the real `hasync`
//! binary; `harness` starts real sshd, MariaDB and PostgreSQL servers once
//! per run and removes them at exit.

mod agent_attacks;
mod bench;
mod bench_cycle;
mod bench_db;
mod claims;
mod cli;
mod cmd;
mod config_errors;
mod cycle;
mod db;
mod differential;
mod dirtimes;
mod doctor;
mod faults;
mod faults_data;
mod filter_rsync;
mod haproxy;
mod harness;
mod harness_selftest;
mod openssh;
mod partition;
mod progress;
mod roles;
mod setup;
mod sync;
