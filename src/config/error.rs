//! Configuration errors that point at the exact place in the file.
//!
//! A sysadmin editing `/etc/hasync/hasync.toml` at 2 a.m. needs `file:line:col`,
//! the offending line, and what to write instead — not a serde backtrace. Every
//! error the config module produces goes through [`ConfigError`], which keeps
//! the byte span and renders it against the source text.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// One problem in a configuration file.
#[derive(Debug, Clone)]
pub struct ConfigError {
    pub path: PathBuf,
    /// 1-based line and column; `None` when the problem concerns the file as a
    /// whole (unreadable, missing section).
    pub location: Option<(usize, usize)>,
    /// The source line the location points at, for context.
    pub source_line: Option<String>,
    pub message: String,
    pub hint: Option<String>,
}

impl ConfigError {
    /// An error about the whole file (it cannot be read, it lacks a section).
    pub fn file(path: &Path, message: impl Into<String>, hint: Option<String>) -> Self {
        ConfigError {
            path: path.to_path_buf(),
            location: None,
            source_line: None,
            message: message.into(),
            hint,
        }
    }

    /// An error at a byte span of the file's text.
    pub fn at(
        path: &Path,
        text: &str,
        span: Range<usize>,
        message: impl Into<String>,
        hint: Option<String>,
    ) -> Self {
        let (line, col) = line_col(text, span.start);
        let source_line = text.lines().nth(line - 1).map(str::to_string);
        ConfigError {
            path: path.to_path_buf(),
            location: Some((line, col)),
            source_line,
            message: message.into(),
            hint,
        }
    }

    /// The 1-based line number, if the error has a location.
    pub fn line(&self) -> Option<usize> {
        self.location.map(|(l, _)| l)
    }
}

/// 1-based line and column (in characters) of a byte offset.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let col = text[line_start..offset].chars().count() + 1;
    (line, col)
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.location {
            Some((line, col)) => write!(
                f,
                "{}:{}:{}: {}",
                self.path.display(),
                line,
                col,
                self.message
            )?,
            None => write!(f, "{}: {}", self.path.display(), self.message)?,
        }
        if let (Some(src), Some((line, col))) = (&self.source_line, self.location) {
            let gutter = line.to_string();
            write!(f, "\n  {gutter} | {src}")?;
            write!(
                f,
                "\n  {} | {}^",
                " ".repeat(gutter.len()),
                " ".repeat(col.saturating_sub(1))
            )?;
        }
        if let Some(hint) = &self.hint {
            write!(f, "\n  hint: {hint}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// Several errors found in one pass, so a user fixes them all at once instead
/// of one per run.
#[derive(Debug, Clone)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        if self.0.len() > 1 {
            write!(f, "\n{} problems in the configuration", self.0.len())?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// The closest of `candidates` to `word`, if it is close enough to be a likely
/// typo ("adress" → "address").
pub fn did_you_mean<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    candidates
        .iter()
        .map(|c| (edit_distance(word, c), *c))
        .filter(|(d, c)| *d <= 2.max(c.len() / 4))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_col_counts_from_one() {
        let t = "a = 1\nbb = 2\n";
        assert_eq!(line_col(t, 0), (1, 1));
        assert_eq!(line_col(t, 6), (2, 1));
        assert_eq!(line_col(t, 8), (2, 3));
    }

    #[test]
    fn suggestions_catch_typos_only() {
        assert_eq!(
            did_you_mean("adress", &["address", "port"]),
            Some("address")
        );
        assert_eq!(did_you_mean("zzzzzz", &["address", "port"]), None);
    }
}
