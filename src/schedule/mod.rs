//! When cycles run: crontab(5) schedules.
//!
//! The daemon mode (`hasync schedule`) is built on top of this later; the
//! parser already validates the config's `[schedule] cron` line.

pub mod cron;
