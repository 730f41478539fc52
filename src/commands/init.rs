//! `hasync init`: write the annotated template where the config will live.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;

use anyhow::{Context, Result};

use crate::cli::{Cli, InitArgs};
use crate::exit::Exit;
use crate::output::{self, Log};

pub fn run(cli: &Cli, args: &InitArgs, log: &Log) -> Result<Exit> {
    if args.stdout {
        output::stdout(hasync::config::TEMPLATE);
        return Ok(Exit::Ok);
    }
    let path = &cli.global.config;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    // create_new: never overwrite a config someone has edited. 0640: it names
    // hosts and paths, not secrets, but needs no world access.
    let mut file = match std::fs::OpenOptions::new().write(true).create_new(true).mode(0o640).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => anyhow::bail!(
            "{} already exists; hasync init never overwrites a config. Edit it, or move it away and run init again \
             (`hasync init --stdout` prints the template)",
            path.display()
        ),
        Err(e) => return Err(e).with_context(|| format!("cannot create {}", path.display())),
    };
    file.write_all(hasync::config::TEMPLATE.as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot write {}", path.display()))?;
    log.info(&format!(
        "wrote {}: edit the nodes, service commands and database, then run `hasync -c {} doctor`",
        path.display(),
        path.display()
    ));
    Ok(Exit::Ok)
}
