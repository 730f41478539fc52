//! `hasync schedule`: the daemon mode. Cycles at the [schedule] cron times,
//! never two at once; `--next N` prints the coming times.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{anyhow, Result};
use chrono::Local;

use crate::cli::{Cli, ScheduleArgs, SyncArgs};
use crate::exit::Exit;
use crate::output::{self, Log};

static STOP: AtomicBool = AtomicBool::new(false);

pub fn run(cli: &Cli, args: &ScheduleArgs, log: &Log) -> Result<Exit> {
    let config = super::load_config(cli, log)?;
    let schedule = config.schedule.clone().ok_or_else(|| {
        anyhow!(
            "{}: there is no [schedule] section; add `[schedule]` with `cron = \"0 2 * * *\"` (see `hasync init --stdout`), or run `hasync sync` from cron instead",
            config.path.display()
        )
    })?;
    if let Some(n) = args.next {
        let mut s = String::new();
        for t in schedule.upcoming(Local::now(), n) {
            s += &format!("{}\n", t.format("%Y-%m-%d %H:%M %a %:z"));
        }
        output::stdout(&s);
        return Ok(Exit::Ok);
    }
    let idle = || {
        hasync::signals::set_handler(|sig| {
            eprintln!(
                "hasync: {} between cycles: stopping the scheduler",
                hasync::signals::name(sig)
            );
            STOP.store(true, Ordering::SeqCst);
            std::process::exit(0);
        })
    };
    idle();
    log.info(&format!(
        "hasync schedule: cycles at \"{}\" ({})",
        schedule.source(),
        config.path.display()
    ));
    let sync_args = SyncArgs {
        files_only: false,
        db_only: false,
        dry_run: false,
        checksum: false,
        max_delete: None,
        to: None,
    };
    loop {
        let Some(next) = schedule.next_after_local(Local::now()) else {
            return Err(anyhow!(
                "the schedule \"{}\" has no next time",
                schedule.source()
            ));
        };
        log.info(&format!(
            "next cycle at {}",
            next.format("%Y-%m-%d %H:%M %:z")
        ));
        // Sleep in short steps: the wall clock may jump (NTP, DST, suspend).
        while Local::now() < next && !STOP.load(Ordering::SeqCst) {
            let left = (next - Local::now()).to_std().unwrap_or(Duration::ZERO);
            std::thread::sleep(left.min(Duration::from_secs(30)));
        }
        log.info(&format!("{} starting a cycle", hasync::state::now()));
        match super::cycle::run(cli, &sync_args, log) {
            Ok(_) => {}
            Err(e) => log.error(&format!("{e:#}")),
        }
        // The cycle installed its own signal handler and cleared it.
        idle();
    }
}
