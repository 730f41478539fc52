//! Exclude rules with the exact semantics of `rsync --exclude PATTERN`.
//!
//! Why: hasync replaces `rsync -a --delete --exclude ...` jobs, and users
//! port their old `--exclude` lines unchanged. A pattern must therefore
//! select exactly the files rsync would select, including the surprising
//! cases (`/foo/**/bar` does not match `foo/bar`; `?` matches one *byte*).
//! This module is a port of rsync's matching code (`rule_matches()` in
//! `exclude.c` and `wildmatch()` in `lib/wildmatch.c`, rsync 3.x), and the
//! integration test `tests/it/filter_rsync.rs` compares it with the real
//! `rsync` binary on generated trees.
//!
//! # How a pattern matches (as in rsync)
//!
//! Paths are relative to the transfer root (the replicated directory),
//! `/`-separated, without leading or trailing slash: `repository/docs/a.pdf`.
//! A path is excluded when any pattern matches it.
//!
//! - A trailing `/` makes the pattern match directories only (the slash is
//!   not part of what is matched). A symlink is never a directory, even if
//!   it points to one.
//! - A leading `/` anchors the pattern at the transfer root: `/logs/` is
//!   only the top-level `logs` directory.
//! - A pattern with no `/` (other than a trailing one) and no `**` is
//!   matched against the last path component: `*.tmp`, `logs/`.
//! - Otherwise it is matched against the whole path. Unanchored, it may
//!   match at any depth: without `**`, it must match the last *n*+1
//!   components where *n* is its number of slashes (`a/b` matches `a/b` and
//!   `x/a/b`); with `**` not at the start, it is tried on the whole path and
//!   on every suffix that starts right after a `/`; a pattern that starts
//!   with `**` matches as if the path had a leading `/` (`**/x` matches `x`
//!   and `a/x`).
//! - Wildcards, recognised only if the pattern contains `*`, `?` or `[`:
//!   `*` matches any run of bytes without `/`; `**` any run including `/`;
//!   `?` one byte other than `/`; `[...]` one byte other than `/` from a
//!   class, with ranges (`a-z`), negation (`[!...]` or `[^...]`), a leading
//!   `]` as a member (`[]a]`), `\`-escaped members, and the POSIX classes
//!   `[:alnum:]` `[:alpha:]` `[:blank:]` `[:cntrl:]` `[:digit:]` `[:graph:]`
//!   `[:lower:]` `[:print:]` `[:punct:]` `[:space:]` `[:upper:]` `[:xdigit:]`
//!   (ASCII only, as rsync in the C or a UTF-8 locale). Elsewhere too, `\`
//!   makes the next character literal. In a pattern without any of `*?[`, a
//!   backslash is an ordinary character (`foo\bar` matches that name).
//! - `?` and classes match one byte, not one character, like rsync: a
//!   non-ASCII name such as `é` (two bytes in UTF-8) needs `??` or `*`.
//! - A trailing `***` also matches the directory itself: `dir/***` excludes
//!   `dir` and everything inside it (rsync 2.6.7+).
//! - `**` does not match "zero directories" between slashes: `/foo/**/bar`
//!   excludes `foo/x/bar` but not `foo/bar` (this differs from git).
//! - Matching is case-sensitive, and spaces are part of the pattern
//!   (`"foo "` does not match `foo`).
//!
//! When a directory is excluded, nothing below it is visited: the walker
//! skips it, so [`Filter::is_excluded`] is only asked about paths whose
//! ancestors are all included (as in rsync, excluding `foo/` hides
//! `foo/keep.txt` even if no pattern matches `keep.txt`).
//!
//! # Receiver side: excluded files are protected from deletion
//!
//! As with rsync without `--delete-excluded`, excludes also protect files on
//! the standby: the same [`Filter`] is applied to the standby's tree (with
//! the standby's file kinds), and what it excludes is left alone, with
//! everything below it. The matcher needs nothing special for this, but the
//! deleting code must do what rsync does (the differential test models it
//! and checks the model against rsync):
//!
//! - An entry the primary does not send (absent there, or excluded there)
//!   is deleted unless it is excluded on the standby. A directory is deleted
//!   entry by entry: excluded entries inside it stay, and so do the
//!   directories that lead to them (rsync: "cannot delete non-empty
//!   directory").
//! - Where the primary sends a file or symlink and the standby has a
//!   directory, the directory is emptied the same way, even if it is itself
//!   excluded (say by `logs/`, which does not match the primary's file
//!   `logs`), and replaced; if excluded entries remain inside, the directory
//!   stays and the file is not copied (rsync exits with code 23).
//! - Where the primary sends a directory and the standby has a file, the
//!   file is replaced.
//!
//! # Supported
//!
//! - Everything `--exclude PATTERN` accepts, as described above, including
//!   `/`-anchoring, trailing-`/` directory rules, `*`, `**`, `***`, `?`,
//!   `[...]` with ranges, negation, POSIX classes and escapes.
//! - The optional `- ` (dash, space) prefix, which rsync's `--exclude` and
//!   `--exclude-from` accept: `- *.o` is the same as `*.o`. Only one prefix
//!   is removed, and `-_` is not a prefix.
//!
//! # Not supported
//!
//! - Include rules (`--include`, or a `+ ` prefix): refused with an error,
//!   since hasync has no include list and dropping the rule would copy or
//!   delete files the user meant to keep.
//! - `!` (clear the list so far): refused with an error.
//! - `--filter` syntax and modifiers (`-p`, `-s`, `-r`, `-!`, `-/`, `-x`,
//!   `-C`, `H`, `S`, `P`, `R`, `merge`, `dir-merge`): not parsed. Exactly as
//!   with rsync's `--exclude`, such text is an ordinary pattern (`-p foo`
//!   matches a file named `-p foo`).
//! - Per-directory merge files (`.rsync-filter`, `-F`, `dir-merge`): not
//!   read; only the configured patterns apply.
//! - `--delete-excluded`: not available; excluded files on the standby are
//!   always protected (see above).
//! - `--exclude-from` file syntax: the caller passes one pattern per entry,
//!   so `#` and `;` start no comment here and blank entries are errors.
//! - `--cvs-exclude`, `--relative`, several source directories: there is
//!   one transfer root, and `/` always means that root.
//!
//! Deliberate differences, where rsync silently accepts a pattern that can
//! never do what was meant: an empty pattern (rsync ignores `--exclude=`),
//! `/` alone, an unclosed `[`, an unknown `[:class:]`, a NUL byte, and a
//! trailing lone `\` (in a pattern without wildcards rsync would match a
//! literal backslash) are all errors.

use std::error::Error;
use std::fmt;

/// A compiled list of exclude patterns.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    patterns: Vec<String>,
    rules: Vec<Rule>,
}

/// A pattern that cannot be used, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PatternError {
    /// The pattern as given.
    pub pattern: String,
    /// What is wrong with it.
    pub reason: String,
}

impl fmt::Display for PatternError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "bad exclude pattern `{}`: {}", self.pattern, self.reason)
    }
}

impl Error for PatternError {}

impl Filter {
    /// Compile `patterns`, in rsync `--exclude` syntax.
    pub fn new<S: AsRef<str>>(patterns: &[S]) -> Result<Filter, PatternError> {
        let mut filter = Filter {
            patterns: Vec::with_capacity(patterns.len()),
            rules: Vec::with_capacity(patterns.len()),
        };
        for p in patterns {
            let p = p.as_ref();
            let rule = Rule::compile(p).map_err(|reason| PatternError {
                pattern: p.to_string(),
                reason,
            })?;
            filter.patterns.push(p.to_string());
            filter.rules.push(rule);
        }
        Ok(filter)
    }

    /// A filter that excludes nothing.
    pub fn empty() -> Filter {
        Filter::default()
    }

    /// Whether `path` is excluded.
    ///
    /// `path`: relative, '/'-separated, no leading or trailing slash.
    /// `is_dir`: whether it is a directory (a symlink is not, whatever it
    /// points to). Callers skip excluded directories without asking about
    /// their contents, as rsync does.
    pub fn is_excluded(&self, path: &str, is_dir: bool) -> bool {
        debug_assert!(
            !path.starts_with('/') && !path.ends_with('/'),
            "path must be relative without leading or trailing slash: {path:?}"
        );
        let path = path.as_bytes();
        if path.is_empty() || self.rules.is_empty() {
            return false;
        }
        let name_start = path.iter().rposition(|&b| b == b'/').map_or(0, |i| i + 1);
        self.rules
            .iter()
            .any(|r| r.matches(path, name_start, is_dir))
    }

    /// The patterns as given to [`Filter::new`].
    pub fn patterns(&self) -> &[String] {
        &self.patterns
    }
}

/// One compiled pattern.
#[derive(Debug, Clone)]
struct Rule {
    /// The pattern had a trailing `/`.
    dir_only: bool,
    /// Which part of the path is matched.
    scope: Scope,
    /// The pattern starts with `**`: match as if the path started with `/`
    /// (rsync's `FILTRULE_WILD2_PREFIX`).
    lead_slash: bool,
    /// The pattern ends with `***`: a directory is matched as if its path
    /// ended with `/` (rsync's `FILTRULE_WILD3_SUFFIX`).
    dir_trail_slash: bool,
    matcher: Matcher,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scope {
    /// No `/` and no `**`: the last component.
    Name,
    /// Anchored, or starting with `**`: the whole path, from its start.
    Whole,
    /// Unanchored, with slashes but no `**`: the last `n` components.
    Last(usize),
    /// Unanchored with `**` (not at the start): the whole path or any
    /// suffix starting right after a `/`.
    AnySuffix,
}

#[derive(Debug, Clone)]
enum Matcher {
    /// No wildcard characters: plain byte comparison.
    Literal(Box<[u8]>),
    Wild(Wild),
}

#[derive(Debug, Clone)]
struct Wild {
    toks: Box<[Tok]>,
    /// A faster equivalent of `toks` for common shapes.
    shape: Shape,
}

#[derive(Debug, Clone)]
enum Shape {
    General,
    /// `*` followed by literal bytes (`*.tmp`).
    StarSuffix(Box<[u8]>),
    /// Literal bytes followed by a single `*` (`core.*`).
    PrefixStar(Box<[u8]>),
    /// `**` followed by literal bytes (`**/x`).
    DoubleStarSuffix(Box<[u8]>),
}

#[derive(Debug, Clone)]
enum Tok {
    Byte(u8),
    /// `?`
    AnyByte,
    /// `[...]`, already resolved to a byte set (never containing `/`).
    Class(Box<ByteSet>),
    /// `*`
    Star,
    /// `**` (or more stars)
    DoubleStar,
}

#[derive(Debug, Clone, Default)]
struct ByteSet([u64; 4]);

impl ByteSet {
    fn insert(&mut self, b: u8) {
        self.0[usize::from(b >> 6)] |= 1u64 << (b & 63);
    }
    fn remove(&mut self, b: u8) {
        self.0[usize::from(b >> 6)] &= !(1u64 << (b & 63));
    }
    fn contains(&self, b: u8) -> bool {
        self.0[usize::from(b >> 6)] & (1u64 << (b & 63)) != 0
    }
}

const UNCLOSED_CLASS: &str = "`[` opens a character class that is never closed";

impl Rule {
    /// Compile one pattern, following rsync's `parse_rule_tok()` (with the
    /// old-style `- `/`+ ` prefixes of `--exclude`) and `add_rule()`.
    fn compile(orig: &str) -> Result<Rule, String> {
        if orig.is_empty() {
            return Err("the pattern is empty".into());
        }
        if orig.contains('\0') {
            return Err("the pattern contains a NUL character".into());
        }
        if orig == "!" {
            return Err("`!` (clear the exclude list) is not supported; \
                        remove the patterns before it instead"
                .into());
        }
        if orig.starts_with("+ ") {
            return Err("include rules (`+ ` prefix) are not supported, \
                        only excludes"
                .into());
        }
        let mut pat = orig.strip_prefix("- ").unwrap_or(orig).as_bytes();
        if pat.is_empty() {
            return Err("nothing follows the `- ` prefix".into());
        }

        let mut dir_only = false;
        if pat.len() > 1 && pat.ends_with(b"/") {
            pat = &pat[..pat.len() - 1];
            dir_only = true;
        }
        let slash_cnt = pat.iter().filter(|&&b| b == b'/').count();
        let wild = pat.iter().any(|&b| matches!(b, b'*' | b'?' | b'['));
        let wild2 = wild && pat.windows(2).any(|w| w == b"**");
        let lead_slash = wild2 && pat.starts_with(b"**");
        let dir_trail_slash = wild2 && pat.ends_with(b"***");
        let anchored = pat[0] == b'/';
        let body = if anchored { &pat[1..] } else { pat };
        if body.is_empty() {
            return Err("`/` alone matches nothing (the transfer root itself \
                        cannot be excluded)"
                .into());
        }
        let trailing_backslashes = body.iter().rev().take_while(|&&b| b == b'\\').count();
        if trailing_backslashes % 2 == 1 {
            return Err("the pattern ends with a lone `\\` that escapes nothing".into());
        }

        let scope = if slash_cnt == 0 && !wild2 {
            Scope::Name
        } else if !anchored && !wild2 {
            Scope::Last(slash_cnt + 1)
        } else if !anchored && !lead_slash {
            Scope::AnySuffix
        } else {
            Scope::Whole
        };
        let matcher = if wild {
            Matcher::Wild(Wild::compile(body)?)
        } else {
            Matcher::Literal(body.into())
        };
        Ok(Rule {
            dir_only,
            scope,
            lead_slash,
            dir_trail_slash,
            matcher,
        })
    }

    /// rsync's `rule_matches()`, for a path without leading slash whose last
    /// component starts at `name_start`.
    fn matches(&self, path: &[u8], name_start: usize, is_dir: bool) -> bool {
        if self.dir_only && !is_dir {
            return false;
        }
        let subject = if self.scope == Scope::Name {
            &path[name_start..]
        } else {
            path
        };
        match &self.matcher {
            Matcher::Literal(lit) => match self.scope {
                Scope::Name | Scope::Whole => **lit == *subject,
                // A literal with n slashes matches the last n+1 components
                // exactly when it is a suffix starting at a component.
                Scope::Last(_) | Scope::AnySuffix => {
                    subject.ends_with(lit)
                        && (subject.len() == lit.len()
                            || subject[subject.len() - lit.len() - 1] == b'/')
                }
            },
            Matcher::Wild(w) => {
                let text = Text {
                    body: subject,
                    lead_slash: self.lead_slash,
                    trail_slash: self.dir_trail_slash && is_dir,
                };
                w.matches(&text, self.scope)
            }
        }
    }
}

impl Wild {
    /// Tokenize a wildcard pattern (without its anchoring `/`), resolving
    /// character classes the way rsync's `dowild()` reads them.
    fn compile(p: &[u8]) -> Result<Wild, String> {
        let mut toks = Vec::with_capacity(p.len());
        let mut i = 0;
        while i < p.len() {
            match p[i] {
                b'\\' => {
                    // compile() has rejected a trailing lone backslash.
                    toks.push(Tok::Byte(p[i + 1]));
                    i += 2;
                }
                b'?' => {
                    toks.push(Tok::AnyByte);
                    i += 1;
                }
                b'*' => {
                    let run = p[i..].iter().take_while(|&&b| b == b'*').count();
                    toks.push(if run == 1 { Tok::Star } else { Tok::DoubleStar });
                    i += run;
                }
                b'[' => {
                    let (set, next) = parse_class(p, i)?;
                    toks.push(Tok::Class(Box::new(set)));
                    i = next;
                }
                b => {
                    toks.push(Tok::Byte(b));
                    i += 1;
                }
            }
        }
        let shape = Shape::of(&toks);
        Ok(Wild {
            toks: toks.into(),
            shape,
        })
    }

    /// rsync's `wildmatch_array()` with the `where` argument given by
    /// `scope`.
    fn matches(&self, text: &Text, scope: Scope) -> bool {
        match scope {
            Scope::Name | Scope::Whole => self.match_from(text, 0),
            Scope::Last(n) => match text.last_components(n) {
                Some(start) => self.match_from(text, start),
                None => false,
            },
            Scope::AnySuffix => {
                let mut m = dowild(&self.toks, text, 0);
                if m == Outcome::Match || m == Outcome::AbortAll {
                    return m == Outcome::Match;
                }
                let len = text.len();
                let mut i = 0;
                loop {
                    if i == len {
                        return false;
                    }
                    let c = text.at(i);
                    i += 1;
                    if c == b'/' {
                        m = dowild(&self.toks, text, i);
                        if m != Outcome::NoMatch && m != Outcome::AbortToDoubleStar {
                            return m == Outcome::Match;
                        }
                    }
                }
            }
        }
    }

    fn match_from(&self, text: &Text, start: usize) -> bool {
        match (&self.shape, text.plain()) {
            (Shape::StarSuffix(lit), Some(s)) => {
                let s = &s[start..];
                s.ends_with(lit) && !s[..s.len() - lit.len()].contains(&b'/')
            }
            (Shape::PrefixStar(lit), Some(s)) => {
                let s = &s[start..];
                s.starts_with(lit) && !s[lit.len()..].contains(&b'/')
            }
            (Shape::DoubleStarSuffix(lit), _) => text.ends_with(start, lit),
            _ => dowild(&self.toks, text, start) == Outcome::Match,
        }
    }
}

impl Shape {
    fn of(toks: &[Tok]) -> Shape {
        let bytes = |ts: &[Tok]| -> Option<Box<[u8]>> {
            ts.iter()
                .map(|t| match t {
                    Tok::Byte(b) => Some(*b),
                    _ => None,
                })
                .collect()
        };
        match toks {
            [Tok::Star, rest @ ..] => bytes(rest).map_or(Shape::General, Shape::StarSuffix),
            [rest @ .., Tok::Star] => bytes(rest).map_or(Shape::General, Shape::PrefixStar),
            [Tok::DoubleStar, rest @ ..] if !rest.is_empty() => {
                bytes(rest).map_or(Shape::General, Shape::DoubleStarSuffix)
            }
            _ => Shape::General,
        }
    }
}

/// Parse the class starting at `p[open] == b'['`; return its byte set and
/// the index just after its closing `]`.
fn parse_class(p: &[u8], open: usize) -> Result<(ByteSet, usize), String> {
    let at = |i: usize| p.get(i).copied().unwrap_or(0);
    let mut set = ByteSet::default();
    let mut i = open + 1;
    let negated = matches!(at(i), b'!' | b'^');
    if negated {
        i += 1;
    }
    // `prev` is the previous member, the start of a possible range; 0 after
    // a range or a POSIX class (as in rsync).
    let mut prev = 0u8;
    // The first member may be `]`: the class closes at the next `]`.
    loop {
        let mut ch = at(i);
        if ch == 0 {
            return Err(UNCLOSED_CLASS.into());
        }
        if ch == b'\\' {
            i += 1;
            ch = at(i);
            if ch == 0 {
                return Err(UNCLOSED_CLASS.into());
            }
            set.insert(ch);
        } else if ch == b'-' && prev != 0 && at(i + 1) != 0 && at(i + 1) != b']' {
            i += 1;
            let mut hi = at(i);
            if hi == b'\\' {
                i += 1;
                hi = at(i);
                if hi == 0 {
                    return Err(UNCLOSED_CLASS.into());
                }
            }
            for b in prev..=hi {
                set.insert(b);
            }
            ch = 0;
        } else if ch == b'[' && at(i + 1) == b':' {
            let s = i + 2;
            let Some(close) = p[s.min(p.len())..].iter().position(|&b| b == b']') else {
                return Err(UNCLOSED_CLASS.into());
            };
            let close = s + close;
            if close == s || p[close - 1] != b':' {
                // No `:]`: the `[` is an ordinary member.
                set.insert(b'[');
            } else {
                let name = &p[s..close - 1];
                let Some(class) = posix_class(name) else {
                    return Err(format!(
                        "unknown character class `[:{}:]` (known: alnum, alpha, blank, \
                         cntrl, digit, graph, lower, print, punct, space, upper, xdigit)",
                        String::from_utf8_lossy(name)
                    ));
                };
                for b in 0..=255u8 {
                    if class(b) {
                        set.insert(b);
                    }
                }
                i = close;
                ch = 0;
            }
        } else {
            set.insert(ch);
        }
        prev = ch;
        i += 1;
        if at(i) == b']' {
            break;
        }
    }
    if negated {
        for w in &mut set.0 {
            *w = !*w;
        }
    }
    // A class never matches `/`, negated or not.
    set.remove(b'/');
    // A NUL never occurs in a path; keep the set tidy anyway.
    set.remove(0);
    Ok((set, i + 1))
}

/// The POSIX classes of rsync's wildmatch, for bytes as C's `<ctype.h>`
/// classifies them in the C and UTF-8 locales (nothing above 0x7f).
fn posix_class(name: &[u8]) -> Option<fn(u8) -> bool> {
    let class: fn(u8) -> bool = match name {
        b"alnum" => |b: u8| b.is_ascii_alphanumeric(),
        b"alpha" => |b: u8| b.is_ascii_alphabetic(),
        b"blank" => |b: u8| b == b' ' || b == b'\t',
        b"cntrl" => |b: u8| b.is_ascii_control(),
        b"digit" => |b: u8| b.is_ascii_digit(),
        b"graph" => |b: u8| b.is_ascii_graphic(),
        b"lower" => |b: u8| b.is_ascii_lowercase(),
        b"print" => |b: u8| (0x20..0x7f).contains(&b),
        b"punct" => |b: u8| b.is_ascii_punctuation(),
        b"space" => |b: u8| matches!(b, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r'),
        b"upper" => |b: u8| b.is_ascii_uppercase(),
        b"xdigit" => |b: u8| b.is_ascii_hexdigit(),
        _ => return None,
    };
    Some(class)
}

/// The string a pattern is matched against: part of a path, optionally with
/// a `/` before it and/or after it (rsync's array of strings that
/// `wildmatch_array()` joins virtually). Never allocated.
struct Text<'a> {
    body: &'a [u8],
    lead_slash: bool,
    trail_slash: bool,
}

impl Text<'_> {
    fn len(&self) -> usize {
        self.body.len() + usize::from(self.lead_slash) + usize::from(self.trail_slash)
    }

    fn at(&self, mut i: usize) -> u8 {
        if self.lead_slash {
            if i == 0 {
                return b'/';
            }
            i -= 1;
        }
        match self.body.get(i) {
            Some(&b) => b,
            None => b'/', // the trailing slash
        }
    }

    /// The text as one slice, when no slash was added.
    fn plain(&self) -> Option<&[u8]> {
        (!self.lead_slash && !self.trail_slash).then_some(self.body)
    }

    /// Whether the text from `start` ends with `lit`.
    fn ends_with(&self, start: usize, lit: &[u8]) -> bool {
        let len = self.len();
        if len - start < lit.len() {
            return false;
        }
        if !self.trail_slash && self.body.len() >= lit.len() {
            return self.body.ends_with(lit);
        }
        let from = len - lit.len();
        lit.iter().enumerate().all(|(k, &b)| self.at(from + k) == b)
    }

    /// Where the last `n` components start (rsync's
    /// `trailing_N_elements()`), or `None` if there are fewer.
    fn last_components(&self, n: usize) -> Option<usize> {
        let mut count = n;
        for i in (0..self.len()).rev() {
            if self.at(i) == b'/' {
                count -= 1;
                if count == 0 {
                    return Some(i + 1);
                }
            }
        }
        (count == 1).then_some(0)
    }
}

/// The result of rsync's `dowild()`: besides match / no match, the two
/// "abort" results let a caller stop trying later start positions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    NoMatch,
    Match,
    /// The text ran out: no later start can match either.
    AbortAll,
    /// A `*` reached a `/`: only an enclosing `**` may go on.
    AbortToDoubleStar,
}

/// rsync's `dowild()`: match `toks` against `text` from byte `ti`.
fn dowild(toks: &[Tok], text: &Text, mut ti: usize) -> Outcome {
    let len = text.len();
    for (k, tok) in toks.iter().enumerate() {
        let ok = match tok {
            Tok::Star | Tok::DoubleStar => {
                let double = matches!(tok, Tok::DoubleStar);
                let rest = &toks[k + 1..];
                if rest.is_empty() {
                    // A trailing `**` matches everything; a trailing `*`
                    // only if no `/` is left.
                    let slash_left = (ti..len).any(|i| text.at(i) == b'/');
                    return if double || !slash_left {
                        Outcome::Match
                    } else {
                        Outcome::NoMatch
                    };
                }
                // When the rest starts with a byte, only the positions
                // holding it can match; the others behave as a mismatch.
                let first = match rest[0] {
                    Tok::Byte(b) => Some(b),
                    _ => None,
                };
                while ti < len {
                    if first.is_some_and(|b| text.at(ti) != b) {
                        if !double && text.at(ti) == b'/' {
                            return Outcome::AbortToDoubleStar;
                        }
                        ti += 1;
                        continue;
                    }
                    let m = dowild(rest, text, ti);
                    if m != Outcome::NoMatch {
                        if !double || m != Outcome::AbortToDoubleStar {
                            return m;
                        }
                    } else if !double && text.at(ti) == b'/' {
                        return Outcome::AbortToDoubleStar;
                    }
                    ti += 1;
                }
                return Outcome::AbortAll;
            }
            _ if ti >= len => return Outcome::AbortAll,
            Tok::Byte(b) => text.at(ti) == *b,
            Tok::AnyByte => text.at(ti) != b'/',
            Tok::Class(set) => set.contains(text.at(ti)),
        };
        if !ok {
            return Outcome::NoMatch;
        }
        ti += 1;
    }
    if ti == len {
        Outcome::Match
    } else {
        Outcome::NoMatch
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(patterns: &[&str]) -> Filter {
        Filter::new(patterns).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Files and directories `patterns` exclude, out of `paths` (a trailing
    /// `/` in `paths` marks a directory).
    fn excluded(patterns: &[&str], paths: &[&'static str]) -> Vec<&'static str> {
        let filter = f(patterns);
        paths
            .iter()
            .copied()
            .filter(|p| match p.strip_suffix('/') {
                Some(dir) => filter.is_excluded(dir, true),
                None => filter.is_excluded(p, false),
            })
            .collect()
    }

    fn err(pattern: &str) -> PatternError {
        match Filter::new(&[pattern]) {
            Ok(_) => panic!("{pattern:?} should be refused"),
            Err(e) => e,
        }
    }

    #[test]
    fn empty_filter_excludes_nothing() {
        let filter = Filter::empty();
        assert!(!filter.is_excluded("a", false));
        assert!(!filter.is_excluded("a/b", true));
        assert!(filter.patterns().is_empty());
        let none: [&str; 0] = [];
        assert!(!Filter::new(&none).unwrap().is_excluded("x", false));
    }

    #[test]
    fn patterns_are_kept_as_given() {
        let filter = f(&["- *.o", "/logs/", "a b"]);
        assert_eq!(filter.patterns(), ["- *.o", "/logs/", "a b"]);
        let owned = vec![String::from("x")];
        assert_eq!(Filter::new(&owned).unwrap().patterns(), ["x"]);
    }

    // The examples of the rsync man page, "PATTERN MATCHING RULES".

    #[test]
    fn man_star_dot_o() {
        // "-f'- *.o' would exclude all filenames ending with .o"
        let paths = ["a.o", "src/b.o", "src/deep/c.o/", "a.oo", "o", "src/x.c"];
        assert_eq!(
            excluded(&["*.o"], &paths),
            ["a.o", "src/b.o", "src/deep/c.o/"]
        );
    }

    #[test]
    fn man_anchored_foo() {
        // "-f'- /foo' would exclude a file (or directory) named foo in the
        // transfer-root directory"
        let paths = ["foo", "foo/", "x/foo", "x/foo/", "foobar", "foo/bar"];
        assert_eq!(excluded(&["/foo"], &paths), ["foo", "foo/"]);
    }

    #[test]
    fn man_dir_only_foo() {
        // "-f'- foo/' would exclude any directory named foo"
        let paths = ["foo/", "a/b/foo/", "foo", "a/foo", "foox/"];
        assert_eq!(excluded(&["foo/"], &paths), ["foo/", "a/b/foo/"]);
    }

    #[test]
    fn man_foo_star_bar() {
        // "-f'- foo/*/bar' would exclude any file/directory named bar which
        // is at two levels below a directory named foo"
        let paths = [
            "foo/x/bar",
            "foo/x/bar/",
            "a/foo/x/bar",
            "foo/bar",
            "foo/x/y/bar",
            "foo/x/bars",
        ];
        assert_eq!(
            excluded(&["foo/*/bar"], &paths),
            ["foo/x/bar", "foo/x/bar/", "a/foo/x/bar"]
        );
        // Anchored: only at the root.
        assert_eq!(
            excluded(&["/foo/*/bar"], &paths),
            ["foo/x/bar", "foo/x/bar/"]
        );
    }

    #[test]
    fn man_foo_double_star_bar() {
        // "-f'- /foo/**/bar' would exclude any file/directory named bar that
        // was two or more levels below a top-level directory named foo (note
        // that /foo/bar is not excluded by this)"
        let paths = [
            "foo/x/bar",
            "foo/x/y/z/bar/",
            "foo/bar",
            "a/foo/x/bar",
            "foo/x/bar/baz",
        ];
        assert_eq!(
            excluded(&["/foo/**/bar"], &paths),
            ["foo/x/bar", "foo/x/y/z/bar/"]
        );
    }

    #[test]
    fn man_triple_star() {
        // "dir_name/***" matches the directory and everything in it.
        let paths = [
            "dir_name/",
            "dir_name/f",
            "dir_name/sub/",
            "dir_name/sub/g",
            "a/dir_name/",
            "a/dir_name/f",
            "dir_name",
            "dir_names/",
        ];
        assert_eq!(
            excluded(&["dir_name/***"], &paths),
            [
                "dir_name/",
                "dir_name/f",
                "dir_name/sub/",
                "dir_name/sub/g",
                "a/dir_name/",
                "a/dir_name/f"
            ]
        );
        // A file named like the directory is not "the directory".
        let paths = ["foo", "foo/", "foo/x", "x/foo/"];
        assert_eq!(excluded(&["foo/***"], &paths), ["foo/", "foo/x", "x/foo/"]);
        assert_eq!(excluded(&["/foo/***"], &paths), ["foo/", "foo/x"]);
    }

    #[test]
    fn openkm_defaults() {
        let filter = f(&["/repository/.system.key", "/logs/"]);
        assert!(filter.is_excluded("repository/.system.key", false));
        assert!(!filter.is_excluded(".system.key", false));
        assert!(!filter.is_excluded("repository/sub/.system.key", false));
        assert!(!filter.is_excluded("x/repository/.system.key", false));
        assert!(filter.is_excluded("logs", true));
        assert!(!filter.is_excluded("logs", false));
        assert!(!filter.is_excluded("repository/logs", true));
        assert!(!filter.is_excluded("repository", true));
    }

    #[test]
    fn trailing_slash_only_matches_directories() {
        let filter = f(&["cache/", "*.d/", "/a/b/"]);
        assert!(filter.is_excluded("cache", true));
        assert!(filter.is_excluded("x/y/cache", true));
        assert!(!filter.is_excluded("cache", false));
        assert!(filter.is_excluded("conf.d", true));
        assert!(!filter.is_excluded("conf.d", false));
        assert!(filter.is_excluded("a/b", true));
        assert!(!filter.is_excluded("a/b", false));
    }

    #[test]
    fn unanchored_slash_patterns_match_the_last_components() {
        let paths = ["a/b", "x/a/b", "x/y/a/b/", "a/b/c", "xa/b", "b"];
        assert_eq!(excluded(&["a/b"], &paths), ["a/b", "x/a/b", "x/y/a/b/"]);
        assert_eq!(excluded(&["a/*"], &paths), ["a/b", "x/a/b", "x/y/a/b/"]);
        assert_eq!(
            excluded(&["*/b"], &paths),
            ["a/b", "x/a/b", "x/y/a/b/", "xa/b"]
        );
        // Leading `/` anchors.
        assert_eq!(excluded(&["/a/b"], &paths), ["a/b"]);
        assert_eq!(excluded(&["/a/*"], &paths), ["a/b"]);
        // Fewer components than the pattern: no match.
        assert_eq!(excluded(&["x/a/b"], &["a/b", "x/a/b"]), ["x/a/b"]);
    }

    #[test]
    fn anchored_star_patterns() {
        let paths = ["a/x/c", "a/y/c/", "a/c", "a/x/y/c", "z/a/x/c", "a/x/cc"];
        assert_eq!(excluded(&["/a/*/c"], &paths), ["a/x/c", "a/y/c/"]);
    }

    #[test]
    fn double_star_crosses_levels() {
        let paths = ["x", "x/", "a/x", "a/b/c/x/", "ax", "a/xy", "x/y"];
        assert_eq!(excluded(&["**/x"], &paths), ["x", "x/", "a/x", "a/b/c/x/"]);
        assert_eq!(
            excluded(&["**x"], &paths),
            ["x", "x/", "a/x", "a/b/c/x/", "ax"]
        );
        assert_eq!(excluded(&["/**/x"], &paths), ["a/x", "a/b/c/x/"]);
        // An infix `**` may start at any depth.
        let paths = ["a/b", "a/x/b", "a/x/y/b", "z/a/x/b", "a/b/c", "za/x/b"];
        assert_eq!(
            excluded(&["a/**/b"], &paths),
            ["a/x/b", "a/x/y/b", "z/a/x/b"]
        );
        assert_eq!(excluded(&["a/**b"], &paths), paths[..4]);
        // A trailing `**` matches everything below.
        let paths = ["logs", "logs/", "logs/a", "logs/a/b", "x/logs/a", "logsx/a"];
        assert_eq!(excluded(&["/logs/**"], &paths), ["logs/a", "logs/a/b"]);
        assert_eq!(
            excluded(&["logs/**"], &paths),
            ["logs/a", "logs/a/b", "x/logs/a"]
        );
        // `**` alone matches everything.
        assert_eq!(excluded(&["**"], &paths), paths);
    }

    #[test]
    fn single_star_stops_at_slash() {
        let paths = ["ab", "a/b", "a/x/b", "a", "b"];
        assert_eq!(excluded(&["/a*b"], &paths), ["ab"]);
        assert_eq!(excluded(&["/a/*b"], &paths), ["a/b"]);
        assert_eq!(excluded(&["*"], &paths), paths);
        // `*` matches the empty string.
        assert_eq!(excluded(&["a*"], &paths), ["ab", "a"]);
    }

    #[test]
    fn question_mark() {
        let paths = ["ab.txt", "a.txt", "abc.txt", "x/bb.txt", "é", "e", "a/b"];
        assert_eq!(excluded(&["??.txt"], &paths), ["ab.txt", "x/bb.txt"]);
        // One byte, like rsync: `é` is two bytes in UTF-8.
        assert_eq!(excluded(&["?"], &paths), ["e", "a/b"]);
        assert_eq!(excluded(&["/??"], &paths), ["é"]);
        // Never a slash.
        assert_eq!(excluded(&["/a?b"], &paths), Vec::<&str>::new());
    }

    #[test]
    fn character_classes() {
        let paths = ["ab.txt", "bb.txt", "cb.txt", "[ab].txt", "a.txt"];
        assert_eq!(excluded(&["[ab]?.txt"], &paths), ["ab.txt", "bb.txt"]);
        assert_eq!(excluded(&["[!ab]?.txt"], &paths), ["cb.txt"]);
        assert_eq!(excluded(&["[^ab]?.txt"], &paths), ["cb.txt"]);
        assert_eq!(excluded(&["\\[ab]*"], &paths), ["[ab].txt"]);
        let paths = ["a1", "b2", "z9", "A1", "-1", "]1"];
        assert_eq!(excluded(&["[a-c]?"], &paths), ["a1", "b2"]);
        assert_eq!(excluded(&["[a-]?"], &paths), ["a1", "-1"]);
        assert_eq!(excluded(&["[-z]?"], &paths), ["z9", "-1"]);
        assert_eq!(excluded(&["[]a]?"], &paths), ["a1", "]1"]);
        assert_eq!(excluded(&["[!]a]?"], &paths), ["b2", "z9", "A1", "-1"]);
        assert_eq!(excluded(&["[[:upper:]]?"], &paths), ["A1"]);
        assert_eq!(excluded(&["[[:alpha:]-]1"], &paths), ["a1", "A1", "-1"]);
        assert_eq!(excluded(&["?[[:digit:]]"], &paths), paths);
        assert_eq!(excluded(&["[[:punct:]]?"], &paths), ["-1", "]1"]);
        // `[:` without `:]` is an ordinary `[` member.
        assert_eq!(
            excluded(&["[[:a]1"], &["a1", "[1", ":1", "b1"]),
            ["a1", "[1", ":1"]
        );
        // Escapes inside a class; a reversed range is empty...
        assert_eq!(excluded(&["[\\]]?"], &paths), ["]1"]);
        // The range start is a member on its own (as in rsync).
        assert_eq!(excluded(&["[z-a]?"], &paths), ["z9"]);
        // A class never matches `/`, even negated.
        assert!(!f(&["/a[!x]b"]).is_excluded("a/b", false));
        // Bytes, not characters: `é` is 0xc3 0xa9.
        assert_eq!(excluded(&["[!a]?"], &["é", "ab"]), ["é"]);
        assert_eq!(excluded(&["[[:alpha:]]*"], &["é", "e"]), ["e"]);
    }

    #[test]
    fn backslash_escapes_only_in_wildcard_patterns() {
        let paths = [
            "star*.txt",
            "starx.txt",
            "q?",
            "qx",
            "br[a]",
            "bra",
            "a\\b",
            "ab",
        ];
        assert_eq!(excluded(&["star\\*.txt"], &paths), ["star*.txt"]);
        assert_eq!(excluded(&["q\\?"], &paths), ["q?"]);
        assert_eq!(excluded(&["br\\[a]"], &paths), ["br[a]"]);
        // No wildcard: the backslash is literal.
        assert_eq!(excluded(&["a\\b"], &paths), ["a\\b"]);
        // With a wildcard, `\b` is `b` and `\\` a backslash.
        assert_eq!(excluded(&["a\\b*"], &paths), ["ab"]);
        assert_eq!(excluded(&["a\\\\b*"], &paths), ["a\\b"]);
    }

    #[test]
    fn literal_patterns() {
        let paths = [
            "logs", "logs/", "a/logs", "a/logs/", "logsx", "xlogs", "logs/x",
        ];
        assert_eq!(
            excluded(&["logs"], &paths),
            ["logs", "logs/", "a/logs", "a/logs/"]
        );
        let paths = ["a/b/c", "x/a/b/c", "xa/b/c", "a/b/c/d", "b/c"];
        assert_eq!(excluded(&["a/b/c"], &paths), ["a/b/c", "x/a/b/c"]);
        assert_eq!(excluded(&["/a/b/c"], &paths), ["a/b/c"]);
    }

    #[test]
    fn names_with_spaces_unicode_and_dots() {
        let paths = [
            "with space/",
            "with space/a b.txt",
            "ünï/çà.txt",
            ".hidden",
            "a.b.c",
        ];
        assert_eq!(excluded(&["with space/"], &paths), ["with space/"]);
        assert_eq!(excluded(&["* *.txt"], &paths), ["with space/a b.txt"]);
        assert_eq!(excluded(&["ünï/*"], &paths), ["ünï/çà.txt"]);
        assert_eq!(excluded(&[".*"], &paths), [".hidden"]);
        assert_eq!(excluded(&["*.c"], &paths), ["a.b.c"]);
        // Trailing spaces are significant, as in rsync.
        assert_eq!(excluded(&["a.b.c "], &paths), Vec::<&str>::new());
    }

    #[test]
    fn dash_space_prefix_is_stripped() {
        let filter = f(&["- *.o", "- /logs/"]);
        assert!(filter.is_excluded("x/a.o", false));
        assert!(filter.is_excluded("logs", true));
        // Only one prefix, and only with a space.
        assert!(f(&["- - x"]).is_excluded("- x", false));
        assert!(f(&["-x"]).is_excluded("-x", false));
        assert!(f(&["-_x"]).is_excluded("-_x", false));
        // Filter-rule modifiers are not parsed: a literal name.
        assert!(f(&["-p foo"]).is_excluded("-p foo", false));
        assert!(!f(&["-p foo"]).is_excluded("foo", false));
        // `!` is special only alone.
        assert!(f(&["!x"]).is_excluded("!x", false));
    }

    #[test]
    fn any_pattern_may_exclude() {
        let filter = f(&["*.tmp", "cache/", "/a/*/c"]);
        assert!(filter.is_excluded("x.tmp", false));
        assert!(filter.is_excluded("z/cache", true));
        assert!(filter.is_excluded("a/b/c", false));
        assert!(!filter.is_excluded("a/b/d", false));
        assert!(!filter.is_excluded("", true));
    }

    #[test]
    fn star_shapes_agree_with_the_general_matcher() {
        // The fast paths for `*lit`, `lit*` and `**lit` must give dowild's
        // answers.
        let patterns = [
            "*.tmp", "*", "core.*", "a/*", "*/b", "/x*", "*x/y", "x/y*", "**/x", "**x", "/**/x",
            "/**x", "**/x/y", "**/x/",
        ];
        let paths = [
            "a.tmp", ".tmp", "a.tmpx", "core.1", "core.", "core", "a/b", "a/b/c", "x/y", "x/yz",
            "xx/y", "x", "b", "a/x", "ax", "a/b/x", "a/x/y", "z/x/y",
        ];
        for p in patterns {
            let fast = f(&[p]);
            let mut slow = fast.clone();
            for rule in &mut slow.rules {
                if let Matcher::Wild(w) = &mut rule.matcher {
                    assert!(!matches!(w.shape, Shape::General), "{p} has no fast shape");
                    w.shape = Shape::General;
                }
            }
            for path in paths {
                for is_dir in [false, true] {
                    assert_eq!(
                        fast.is_excluded(path, is_dir),
                        slow.is_excluded(path, is_dir),
                        "{p} on {path}"
                    );
                }
            }
        }
    }

    #[test]
    fn errors() {
        let e = err("[abc");
        assert_eq!(
            e.to_string(),
            "bad exclude pattern `[abc`: `[` opens a character class that is never closed"
        );
        assert_eq!(e.pattern, "[abc");
        for p in [
            "[",
            "a[b",
            "[]",
            "[!]",
            "x[a-",
            "[a\\]",
            "[[:alpha:]",
            "[[:alpha",
        ] {
            assert_eq!(err(p).reason, UNCLOSED_CLASS, "{p}");
        }
        assert!(err("").reason.contains("empty"));
        assert!(err("- ").reason.contains("nothing follows"));
        assert!(err("foo\\").reason.contains("lone `\\`"));
        assert!(err("[\\").reason.contains("lone `\\`"));
        assert!(err("*\\").reason.contains("lone `\\`"));
        assert!(err("a\\\\\\").reason.contains("lone `\\`"));
        assert!(err("foo\\/").reason.contains("lone `\\`"));
        assert!(err("+ foo").reason.contains("include"));
        assert!(err("!").reason.contains("clear"));
        assert!(err("/").reason.contains("nothing"));
        assert!(err("//").reason.contains("nothing"));
        assert!(err("[[:foo:]]")
            .reason
            .contains("unknown character class `[:foo:]`"));
        assert!(err("a\0b").reason.contains("NUL"));
        // The first bad pattern is reported.
        let e = Filter::new(&["ok", "[x", "["]).unwrap_err();
        assert_eq!(e.pattern, "[x");
        // An even number of trailing backslashes is fine.
        assert!(f(&["foo\\\\"]).is_excluded("foo\\\\", false));
        assert!(f(&["*\\\\"]).is_excluded("a\\", false));
        // `-` not followed by a space, and `]` outside a class, are literal.
        assert!(f(&["a]"]).is_excluded("a]", false));
    }

    #[test]
    fn error_trait() {
        let e: Box<dyn Error> = Box::new(err("["));
        assert!(e.to_string().starts_with("bad exclude pattern `[`: "));
    }

    #[test]
    fn pathological_patterns_finish() {
        let filter = f(&["**a**a**a**a**a**a**b", "*a*a*a*a*a*a*a*b"]);
        let long = "a/".repeat(40) + &"a".repeat(200);
        assert!(!filter.is_excluded(&long, false));
    }
}
