//! `hasync completions` and `hasync man`: generated from the clap definition,
//! checked in under `completions/` and `man/`, and compared by a test so they
//! never drift from the real command line.

use std::io::Write;

use anyhow::{Context, Result};
use clap::CommandFactory;
use clap_mangen::Man;

use crate::cli::{Cli, CompletionsArgs, ManArgs};
use crate::exit::Exit;
use crate::output::{self, Log};

pub fn completions(args: &CompletionsArgs) -> Result<Exit> {
    let mut cmd = Cli::command();
    let mut buf = Vec::new();
    clap_complete::generate(args.shell, &mut cmd, "hasync", &mut buf);
    output::stdout(&String::from_utf8_lossy(&buf));
    Ok(Exit::Ok)
}

/// Hand-written sections appended to hasync(1): what clap cannot know.
fn extra_sections() -> String {
    let mut s = String::new();
    s.push_str(".SH \"EXIT STATUS\"\n");
    for e in crate::exit::Exit::ALL {
        s.push_str(&format!(
            ".TP\n\\fB{}\\fR\n{}\n",
            e.code(),
            roff_escape(e.meaning())
        ));
    }
    s.push_str(concat!(
        ".SH FILES\n",
        ".TP\n\\fB/etc/hasync/hasync.toml\\fR\n",
        "The configuration, documented key by key in the template that \\fBhasync init\\fR writes.\n",
        ".TP\n\\fB/var/lib/hasync\\fR\n",
        "On every node: the node's state record (role, epoch, history, last cycle); see \\fBstate_dir\\fR.\n",
        ".SH ENVIRONMENT\n",
        ".TP\n\\fBHASYNC_CONFIG\\fR\n",
        "The configuration file when \\fB\\-c\\fR is not given.\n",
        ".TP\n\\fBSSH_AUTH_SOCK\\fR\n",
        "The ssh\\-agent whose keys are tried when a node has no \\fBidentity_file\\fR.\n",
        ".TP\n\\fBHASYNC_DB_SPLIT_MIN\\fR\n",
        "Bytes of table data (the server's estimate) from which the database loads in two streams into the mirror ",
        "(default 67108864, 64 MiB). MySQL/MariaDB: the one dump is split by statement between two loaders, ",
        "each INSERT whole to one of them, everything else in order on the first. PostgreSQL: a second loader ",
        "takes the largest tables' rows while the first loads the rest, both from one exported snapshot. ",
        "A huge value keeps one stream.\n",
        ".SH \"EXCLUDE PATTERNS\"\n",
        "The \\fB[files] exclude\\fR patterns follow rsync's \\fB\\-\\-exclude\\fR rules for the common cases. ",
        "A pattern without a slash matches a name at any depth (\\fB*.tmp\\fR). ",
        "A leading \\fB/\\fR anchors it at the replicated root (\\fB/logs/\\fR). ",
        "A trailing \\fB/\\fR matches directories only. ",
        "\\fB*\\fR matches within one path component, \\fB**\\fR across components, \\fB?\\fR one character, ",
        "\\fB[...]\\fR a character class, \\fBdir/***\\fR a directory and everything in it. ",
        "A pattern with a slash inside but no leading slash matches at any depth on whole components. ",
        "Excluded paths on the standby are never deleted (rsync without \\-\\-delete\\-excluded), nor are the ",
        "directories that still hold them. Include rules (\\fB+ \\fR) and per\\-directory filter files are not supported.\n",
        ".SH SECURITY\n",
        "Host keys are always verified against \\fBknown_hosts\\fR: an unknown or changed key stops the run and shows its ",
        "SHA256 fingerprint. Database passwords are read from \\fBpassword_file\\fR and never appear on a command line or in a log.\n",
        ".SH \"SEE ALSO\"\n",
        "\\fBrsync\\fR(1), \\fBssh\\fR(1), \\fBsshd_config\\fR(5), \\fBcrontab\\fR(5)\n",
    ));
    s
}

fn roff_escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('-', "\\-")
}

fn render_page(man: &Man, extra: Option<&str>) -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    man.render_title(&mut buf)?;
    man.render_name_section(&mut buf)?;
    man.render_synopsis_section(&mut buf)?;
    man.render_description_section(&mut buf)?;
    man.render_options_section(&mut buf)?;
    man.render_subcommands_section(&mut buf)?;
    if let Some(extra) = extra {
        buf.write_all(extra.as_bytes())?;
    }
    man.render_version_section(&mut buf)?;
    Ok(buf)
}

pub fn man(args: &ManArgs, log: &Log) -> Result<Exit> {
    std::fs::create_dir_all(&args.out_dir)
        .with_context(|| format!("cannot create {}", args.out_dir.display()))?;
    let cmd = Cli::command();
    let mut pages = vec![(
        "hasync.1".to_string(),
        render_page(&Man::new(cmd.clone()), Some(&extra_sections()))?,
    )];
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let name = format!("hasync-{}", sub.get_name());
        let sub = sub
            .clone()
            .name(name.clone())
            .version(hasync::version::VERSION);
        pages.push((format!("{name}.1"), render_page(&Man::new(sub), None)?));
    }
    for (file, content) in pages {
        let path = args.out_dir.join(&file);
        std::fs::write(&path, content)
            .with_context(|| format!("cannot write {}", path.display()))?;
        log.info(&format!("wrote {}", path.display()));
    }
    Ok(Exit::Ok)
}
