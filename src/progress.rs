//! How a run's progress is shown: indicatif bars on a terminal, a plain log
//! line every few seconds otherwise (cron mails, journald), nothing with -q.
//! The engines only call [`hasync::sync::Progress`] and
//! [`hasync::db::replicate::DbProgress`]; the cycle asks for a spinner while
//! it waits for a service. This is the CLI's choice.
//!
//! On a terminal every display ticks on its own (`enable_steady_tick`), so
//! the elapsed time, the rate and the ETA move even while no event comes (a
//! large file, a slow commit on the standby, a service taking its time); a
//! display drawn only when the engine calls stands still between calls, and
//! indicatif's draw rate limit swallows the last update before a pause
//! (issue 14, item 5: the bar read `[00:00:00] 0 B/140.64 MiB ... 9/669`
//! from start to end).
//!
//! All displays live in one [`MultiProgress`]; log lines printed while one
//! is drawn go above it ([`eprintln_above`]) instead of being overwritten by
//! its next redraw.

use std::fmt::Write as _;
use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use hasync::sync::plan::{human_bytes, Plan};
use hasync::sync::Progress;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressState, ProgressStyle};

/// How often a terminal display redraws by itself.
const TICK: Duration = Duration::from_millis(200);

/// Every display of the process, stacked on stderr.
static MULTI: LazyLock<MultiProgress> =
    LazyLock::new(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()));

/// A line on stderr; while a display is drawn, above it (not into it).
pub fn eprintln_above(line: &str) {
    MULTI.suspend(|| eprintln!("{line}"));
}

/// Columns of the terminal on stderr (80 when it says nothing).
fn columns() -> usize {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes a winsize into the given pointer.
    let r = unsafe { libc::ioctl(libc::STDERR_FILENO, libc::TIOCGWINSZ, &mut ws) };
    if r == 0 && ws.ws_col > 0 {
        ws.ws_col as usize
    } else {
        80
    }
}

/// Where progress goes, shared by the reporters: a bar (or spinner) on a
/// terminal, a throttled log line otherwise, nothing when quiet.
struct Display {
    node: String,
    bar: Option<ProgressBar>,
    lines: bool,
    started: Instant,
    last_line: Mutex<Instant>,
    every: Duration,
}

fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template)
        .expect("valid template")
        .tick_chars("⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏ ")
}

/// A spinner: elapsed time, and what is going on in the message.
const SPINNER: &str = "{prefix} [{elapsed_precise}] {spinner} {wide_msg}";

impl Display {
    /// A spinner that ticks by itself, showing `msg`; a reporter turns it
    /// into a bar once a total is known.
    fn new(node: &str, no_progress: bool, quiet: bool, msg: &str) -> Display {
        let tty = std::io::stderr().is_terminal();
        let bar = (tty && !no_progress && !quiet).then(|| {
            let b = MULTI.add(ProgressBar::new_spinner());
            b.set_style(style(SPINNER));
            b.set_prefix(node.to_string());
            b.set_message(msg.to_string());
            b.enable_steady_tick(TICK);
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
            MULTI.remove(b);
        }
    }
}

impl Drop for Display {
    /// A display goes away with its reporter: not left drawn under the
    /// lines that follow.
    fn drop(&mut self) {
        self.finish();
    }
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

/// The file pass: a spinner while both sides scan, then a bar of the
/// plan's bytes with elapsed time, rate, ETA, files done and (room
/// permitting) the file being sent.
pub struct Reporter {
    d: Display,
    files_total: Arc<AtomicU64>,
    bytes_total: AtomicU64,
    files: Arc<AtomicU64>,
    bytes: AtomicU64,
    /// Entries scanned per node, for the spinner.
    scanned: Mutex<Vec<(String, u64)>>,
}

impl Reporter {
    /// Bars when stderr is a terminal and progress is wanted; log lines when
    /// it is not; nothing when `quiet`.
    pub fn new(node: &str, no_progress: bool, quiet: bool) -> Reporter {
        Reporter {
            d: Display::new(node, no_progress, quiet, "scanning both sides"),
            files_total: Arc::default(),
            bytes_total: AtomicU64::new(0),
            files: Arc::default(),
            bytes: AtomicU64::new(0),
            scanned: Mutex::new(Vec::new()),
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

    /// The bar's style for this terminal: the bar narrows on a narrow
    /// terminal; the file name (`{wide_msg}`) gets whatever room is left.
    fn bar_style(&self) -> ProgressStyle {
        let width = columns().saturating_sub(110).clamp(10, 40);
        let (f, ft) = (self.files.clone(), self.files_total.clone());
        style(&format!(
            "{{prefix}} [{{elapsed_precise}}] {{bar:{width}}} {{binary_bytes}}/{{binary_total_bytes}} {{binary_bytes_per_sec}} ETA {{eta}} {{files}} {{wide_msg}}"
        ))
        .with_key(
            "files",
            move |_: &ProgressState, w: &mut dyn std::fmt::Write| {
                let _ = write!(
                    w,
                    "{}/{}",
                    f.load(Ordering::Relaxed),
                    ft.load(Ordering::Relaxed)
                );
            },
        )
        .progress_chars("█▉▊▋▌▍▎▏░")
    }

    fn add(&self, bytes: u64) {
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        if let Some(b) = &self.d.bar {
            b.inc(bytes);
        } else if self.d.line_due() {
            self.line();
        }
    }
}

/// `path` cut from the left to at most `room` columns, the file name kept.
fn tail(path: &str, room: usize) -> String {
    let n = path.chars().count();
    if n <= room {
        return path.to_string();
    }
    let keep = room.saturating_sub(1);
    let mut s = String::from("…");
    s.extend(path.chars().skip(n - keep));
    s
}

impl Progress for Reporter {
    fn scanning(&self, node: &str, entries: u64) {
        let mut seen = self.scanned.lock().expect("progress lock");
        match seen.iter_mut().find(|(n, _)| n == node) {
            Some(e) => e.1 = entries,
            None => seen.push((node.to_string(), entries)),
        }
        if let Some(b) = &self.d.bar {
            let mut msg = String::from("scanning:");
            for (n, e) in seen.iter() {
                let _ = write!(msg, " {n} {e} entries");
            }
            b.set_message(msg);
        }
    }

    fn planned(&self, plan: &Plan) {
        let t = plan.totals();
        let files = plan.actions.len() as u64;
        let bytes = t.created_bytes + t.updated_bytes;
        self.files_total.store(files, Ordering::Relaxed);
        self.bytes_total.store(bytes, Ordering::Relaxed);
        if let Some(b) = &self.d.bar {
            // Totals come from the plan, so the bar never goes backwards.
            b.set_style(self.bar_style());
            b.set_length(bytes);
            b.set_position(0);
            b.set_message("");
        }
    }

    fn sending(&self, path: &[u8]) {
        if let Some(b) = &self.d.bar {
            // What the fixed part of the bar leaves (see `bar_style`).
            let room = columns().saturating_sub(130);
            if room >= 12 {
                b.set_message(tail(&String::from_utf8_lossy(path), room));
            }
        }
    }

    fn advanced(&self, bytes: u64) {
        self.add(bytes);
    }

    fn done(&self, _path: &[u8], bytes: u64) {
        self.files.fetch_add(1, Ordering::Relaxed);
        self.add(bytes);
    }

    fn note(&self, msg: &str) {
        match &self.d.bar {
            Some(b) => b.println(format!("{}: {msg}", self.d.node)),
            None => eprintln!("{}: {msg}", self.d.node),
        }
    }
}

/// Progress of the database phase: the step, bytes of dump streamed and the
/// rate (the dump's size is not known in advance, so a spinner, not a bar).
pub struct DbReporter {
    d: Display,
    phase: Mutex<String>,
}

impl DbReporter {
    pub fn new(node: &str, no_progress: bool, quiet: bool) -> DbReporter {
        let d = Display::new(node, no_progress, quiet, "database: connecting");
        if let Some(b) = &d.bar {
            b.set_style(style(
                "{prefix} [{elapsed_precise}] {spinner} {msg}: {binary_bytes} {binary_bytes_per_sec}",
            ));
        }
        DbReporter {
            d,
            phase: Mutex::new("connecting".into()),
        }
    }

    pub fn finish(&self) {
        self.d.finish();
    }
}

impl hasync::db::replicate::DbProgress for DbReporter {
    fn phase(&self, name: &str) {
        *self.phase.lock().expect("progress lock") = name.to_string();
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
                "{}: database: {}: {} of dump streamed, {}/s",
                self.d.node,
                self.phase.lock().expect("progress lock"),
                human_bytes(bytes),
                self.d.rate(bytes)
            );
        }
    }
}

/// A wait with no total (a service stopping or starting): a spinner with
/// the elapsed time and what is awaited on a terminal, a line every few
/// seconds otherwise. Ends when dropped.
pub struct Waiting {
    d: Display,
    /// Tells the line thread to stop (dropped: it ends).
    stop: Option<mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Waiting {
    pub fn new(node: &str, what: &str, no_progress: bool, quiet: bool) -> Waiting {
        let d = Display::new(node, no_progress, quiet, what);
        let (mut stop, mut thread) = (None, None);
        if d.bar.is_none() && d.lines {
            let (tx, rx) = mpsc::channel::<()>();
            let (node, what, every, t0) = (d.node.clone(), what.to_string(), d.every, d.started);
            thread = std::thread::Builder::new()
                .name("progress-wait".into())
                .spawn(move || {
                    while let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(every) {
                        eprintln!("{node}: still {what} ({:.0} s)", t0.elapsed().as_secs_f64());
                    }
                })
                .ok();
            stop = Some(tx);
        }
        Waiting { d, stop, thread }
    }
}

impl hasync::cycle::Waiting for Waiting {}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.stop.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.d.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::tail;

    #[test]
    fn a_long_path_keeps_its_file_name() {
        assert_eq!(tail("a/b.txt", 20), "a/b.txt");
        assert_eq!(tail("repository/2024/03/scan-0001.pdf", 12), "…an-0001.pdf");
    }
}
