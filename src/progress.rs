//! How a run's progress is shown: indicatif bars on a terminal, a plain log
//! line every few seconds otherwise (cron mails, journald), nothing with -q.
//! The engines only call [`hasync::sync::Progress`]; this is the CLI's choice.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hasync::sync::plan::{human_bytes, Plan};
use hasync::sync::Progress;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Where progress goes, shared by both reporters: a bar (or spinner) on a
/// terminal, a throttled log line otherwise, nothing when quiet.
struct Display {
    node: String,
    bar: Option<ProgressBar>,
    lines: bool,
    started: Instant,
    last_line: Mutex<Instant>,
    every: Duration,
}

impl Display {
    /// `length` `None` makes a spinner (a total not known in advance).
    fn new(
        node: &str,
        no_progress: bool,
        quiet: bool,
        length: Option<u64>,
        template: &str,
    ) -> Display {
        let tty = std::io::stderr().is_terminal();
        let bar = (tty && !no_progress && !quiet).then(|| {
            let b = ProgressBar::with_draw_target(length, ProgressDrawTarget::stderr());
            b.set_style(ProgressStyle::with_template(template).expect("valid template"));
            b.set_prefix(node.to_string());
            if length.is_none() {
                b.enable_steady_tick(Duration::from_millis(200));
            }
            b
        });
        Display {
            node: node.to_string(),
            bar,
            lines: !tty && !quiet,
            started: Instant::now(),
            last_line: Mutex::new(Instant::now()),
            every: line_every(),
        }
    }

    /// Whether a log line is due now (no bar, lines wanted, the interval
    /// passed); if so, the interval starts again.
    fn line_due(&self) -> bool {
        if self.bar.is_some() || !self.lines {
            return false;
        }
        let mut last = self.last_line.lock().expect("progress lock");
        if last.elapsed() >= self.every {
            *last = Instant::now();
            true
        } else {
            false
        }
    }

    fn rate(&self, bytes: u64) -> String {
        let secs = self.started.elapsed().as_secs_f64().max(0.001);
        human_bytes((bytes as f64 / secs) as u64)
    }

    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

pub struct Reporter {
    d: Display,
    files_total: AtomicU64,
    bytes_total: AtomicU64,
    files: AtomicU64,
    bytes: AtomicU64,
}

/// How often a log line is written when stderr is not a terminal;
/// `HASYNC_PROGRESS_EVERY` (e.g. "1s") overrides it.
const LINE_EVERY: Duration = Duration::from_secs(10);

fn line_every() -> Duration {
    std::env::var("HASYNC_PROGRESS_EVERY")
        .ok()
        .and_then(|v| hasync::config::duration::parse_duration(&v).ok())
        .unwrap_or(LINE_EVERY)
}

impl Reporter {
    /// Bars when stderr is a terminal and progress is wanted; log lines when
    /// it is not; nothing when `quiet`.
    pub fn new(node: &str, no_progress: bool, quiet: bool) -> Reporter {
        Reporter {
            d: Display::new(
                node,
                no_progress,
                quiet,
                Some(0),
                "{prefix} [{elapsed_precise}] {wide_bar} {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} ETA {eta} {msg}",
            ),
            files_total: AtomicU64::new(0),
            bytes_total: AtomicU64::new(0),
            files: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
        }
    }

    pub fn finish(&self) {
        self.d.finish();
    }

    fn line(&self) {
        let (f, ft) = (
            self.files.load(Ordering::Relaxed),
            self.files_total.load(Ordering::Relaxed),
        );
        let (b, bt) = (
            self.bytes.load(Ordering::Relaxed),
            self.bytes_total.load(Ordering::Relaxed),
        );
        let pct = if bt > 0 {
            b as f64 * 100.0 / bt as f64
        } else {
            100.0
        };
        eprintln!(
            "{}: {f}/{ft} changes, {}/{} ({pct:.0}%), {}/s",
            self.d.node,
            human_bytes(b),
            human_bytes(bt),
            self.d.rate(b)
        );
    }
}

impl Progress for Reporter {
    fn planned(&self, plan: &Plan) {
        let t = plan.totals();
        let files = plan.actions.len() as u64;
        let bytes = t.created_bytes + t.updated_bytes;
        self.files_total.store(files, Ordering::Relaxed);
        self.bytes_total.store(bytes, Ordering::Relaxed);
        if let Some(b) = &self.d.bar {
            // Totals come from the plan, so the bar never goes backwards.
            b.set_length(bytes);
            b.set_message(format!("0/{files}"));
        }
    }

    fn done(&self, _path: &[u8], bytes: u64) {
        let f = self.files.fetch_add(1, Ordering::Relaxed) + 1;
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        if let Some(b) = &self.d.bar {
            b.inc(bytes);
            b.set_message(format!("{f}/{}", self.files_total.load(Ordering::Relaxed)));
        } else if self.d.line_due() {
            self.line();
        }
    }

    fn note(&self, msg: &str) {
        match &self.d.bar {
            Some(b) => b.println(format!("{}: {msg}", self.d.node)),
            None => eprintln!("{}: {msg}", self.d.node),
        }
    }
}

/// Progress of the database phase: bytes of dump streamed and the rate (the
/// dump's size is not known in advance, so a spinner, not a bar).
pub struct DbReporter {
    d: Display,
}

impl DbReporter {
    pub fn new(node: &str, no_progress: bool, quiet: bool) -> DbReporter {
        DbReporter {
            d: Display::new(
                node,
                no_progress,
                quiet,
                None,
                "{prefix} [{elapsed_precise}] {spinner} {msg}: {binary_bytes} {binary_bytes_per_sec}",
            ),
        }
    }

    pub fn finish(&self) {
        self.d.finish();
    }
}

impl hasync::db::replicate::DbProgress for DbReporter {
    fn phase(&self, name: &str) {
        match &self.d.bar {
            Some(b) => b.set_message(format!("database: {name}")),
            None if self.d.lines => eprintln!("{}: database: {name}", self.d.node),
            None => {}
        }
    }

    fn streamed(&self, bytes: u64) {
        if let Some(b) = &self.d.bar {
            b.set_position(bytes);
        } else if self.d.line_due() {
            eprintln!(
                "{}: database: {} of dump streamed, {}/s",
                self.d.node,
                human_bytes(bytes),
                self.d.rate(bytes)
            );
        }
    }
}
