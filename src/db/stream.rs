//! Counting rows in a dump while it streams through hasync.
//!
//! The dump is the primary's database *inside the dump's own snapshot*: what
//! it holds is exactly what the staging database must hold after the load.
//! Counting the rows as the bytes pass by costs one pass over memory already
//! in cache, needs no second connection to the primary, and works for
//! mysqldump, whose snapshot no other session can share.
//!
//! Two formats are understood, both line oriented and both written by the
//! dump tools in a fixed shape:
//!
//! * mysqldump / mariadb-dump: ``INSERT INTO `t` VALUES (...),(...);`` (the
//!   rows on the same line, or, since mariadb-dump 10.11, each on a line of
//!   its own after ``VALUES``); rows are the top-level parenthesised tuples
//!   outside string literals, up to the `;`. An optional column list
//!   (``INSERT INTO `t` (`a`,`b`) VALUES``) is skipped.
//! * pg_dump plain format: `COPY schema.table (cols) FROM stdin;` followed by
//!   one line per row up to a line `\.`.
//!
//! The counter is a byte-level state machine, so chunk boundaries can fall
//! anywhere, and memory stays bounded whatever the line lengths.

use std::collections::BTreeMap;

use super::TableName;

/// The longest line head kept while deciding whether a line starts a data
/// block (an `INSERT` with a long column list, a `COPY` with many columns).
const HEAD_MAX: usize = 64 * 1024;

/// The comment mysqldump writes before every table's rows, even none.
const MYSQL_DATA_COMMENT: &[u8] = b"-- Dumping data for table `";

/// The mysql client's command that changes the statement delimiter, which
/// mysqldump wraps around triggers, routines and events.
const MYSQL_DELIMITER: &[u8] = b"DELIMITER ";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Mysql,
    Postgres,
}

#[derive(Debug)]
enum State {
    /// Collecting the first bytes of a line.
    Head,
    /// The rest of an uninteresting line.
    Skip,
    /// Inside the VALUES of an INSERT line.
    Values {
        in_str: bool,
        escaped: bool,
        depth: u32,
    },
    /// Inside a COPY block; `at_start` and `line` track the current line.
    Copy { line: Vec<u8> },
}

/// Feed it the dump's bytes in any chunking; read the counts at the end.
#[derive(Debug)]
pub struct RowCounter {
    format: Format,
    state: State,
    head: Vec<u8>,
    table: Option<TableName>,
    rows: BTreeMap<TableName, u64>,
    /// The last bytes seen, to check the dump's completion marker.
    tail: Vec<u8>,
    bytes: u64,
    /// A `CREATE TABLE` has passed: mysqldump has started its transaction.
    tables_started: bool,
    /// mysqldump announced at least one table's data (see [`RowCounter::rows`]).
    data_comments: bool,
    /// A `DELIMITER` other than `;` is in force: the lines are a trigger's,
    /// routine's or event's body, where a line may look like an INSERT.
    body: bool,
}

impl RowCounter {
    pub fn new(format: Format) -> RowCounter {
        RowCounter {
            format,
            state: State::Head,
            head: Vec::new(),
            table: None,
            rows: BTreeMap::new(),
            tail: Vec::new(),
            bytes: 0,
            tables_started: false,
            data_comments: false,
            body: false,
        }
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Rows per table seen so far. A table the dump had no rows for is
    /// there with 0 if the dump announced its data (mysqldump's comment,
    /// pg_dump's COPY), else absent.
    pub fn rows(&self) -> &BTreeMap<TableName, u64> {
        &self.rows
    }

    /// Whether mysqldump announced each table's data with its comment (it
    /// does unless told `--skip-comments`, say by a my.cnf): then a table
    /// absent from [`RowCounter::rows`] had no data section at all.
    pub fn announces_tables(&self) -> bool {
        self.data_comments
    }

    /// Whether the dump has begun writing tables. mysqldump
    /// `--single-transaction` starts its consistent snapshot before it dumps
    /// the first table, so from here on the primary may run again without
    /// changing what the dump contains (for transactional tables).
    pub fn tables_started(&self) -> bool {
        self.tables_started
    }

    /// Inside an INSERT's rows (its head was seen, its `;` not yet).
    pub fn in_rows(&self) -> bool {
        matches!(self.state, State::Values { .. })
    }

    pub fn total_rows(&self) -> u64 {
        self.rows.values().sum()
    }

    /// Whether the stream ended with the dump tool's completion comment
    /// (`-- Dump completed` / `-- PostgreSQL database dump complete`): a dump
    /// cut short by a dying tool or connection lacks it.
    pub fn complete(&self) -> bool {
        let tail = String::from_utf8_lossy(&self.tail);
        let marker = match self.format {
            Format::Mysql => "-- Dump completed",
            Format::Postgres => "-- PostgreSQL database dump complete",
        };
        tail.contains(marker)
    }

    /// Add the rows and bytes of another part of the same dump (the
    /// PostgreSQL load in two streams: one counter per pg_dump run).
    /// Completion is each part's own, checked before.
    pub fn absorb(&mut self, other: &RowCounter) {
        self.bytes += other.bytes;
        for (t, n) in &other.rows {
            *self.rows.entry(t.clone()).or_insert(0) += n;
        }
    }

    pub fn feed(&mut self, chunk: &[u8]) {
        self.feed_until(chunk, false);
    }

    /// Feed `chunk` up to the end of the INSERT whose rows are being
    /// counted (its `;`); returns how many bytes that took (all of them if
    /// the statement goes on).
    pub fn feed_rows(&mut self, chunk: &[u8]) -> usize {
        self.feed_until(chunk, true)
    }

    fn feed_until(&mut self, chunk: &[u8], rows_end: bool) -> usize {
        // Runs of bytes that cannot change the state are skipped without
        // going through the state machine (most of a dump is such runs).
        let mut i = 0;
        while i < chunk.len() {
            let rest = &chunk[i..];
            // memchr's vectorised searches: this loop runs over every byte
            // of the dump on the relay's thread.
            let skip = match &self.state {
                State::Skip => memchr::memchr(b'\n', rest),
                State::Values {
                    in_str: true,
                    escaped: false,
                    ..
                } => memchr::memchr2(b'\'', b'\\', rest),
                // Between rows only a new row, the statement's end or a
                // string matter (a `)` leaves the depth at 0); inside a row,
                // only strings and parentheses (a `;` ends nothing there).
                State::Values {
                    in_str: false,
                    escaped: false,
                    depth: 0,
                } => memchr::memchr3(b'(', b';', b'\'', rest),
                State::Values {
                    in_str: false,
                    escaped: false,
                    ..
                } => memchr::memchr3(b'(', b')', b'\'', rest),
                State::Copy { line } if line.len() > 2 => memchr::memchr(b'\n', rest),
                _ => Some(0),
            };
            match skip {
                Some(n) => {
                    i += n;
                    self.byte(chunk[i]);
                    i += 1;
                    if rows_end && !self.in_rows() {
                        break;
                    }
                }
                None => {
                    i = chunk.len();
                    break;
                }
            }
        }
        self.passed(&chunk[..i]);
        i
    }

    /// Account for bytes fed: their number, and the last ones.
    fn passed(&mut self, bytes: &[u8]) {
        self.bytes += bytes.len() as u64;
        let keep = 256;
        if bytes.len() >= keep {
            self.tail.clear();
            self.tail.extend_from_slice(&bytes[bytes.len() - keep..]);
        } else {
            self.tail.extend_from_slice(bytes);
            if self.tail.len() > keep {
                self.tail.drain(..self.tail.len() - keep);
            }
        }
    }

    fn byte(&mut self, b: u8) {
        match &mut self.state {
            State::Skip => {
                if b == b'\n' {
                    self.state = State::Head;
                }
            }
            State::Head => {
                if b == b'\n' {
                    // mariadb-dump 10.11 puts the rows on lines of their own:
                    // "INSERT INTO `t` VALUES\n(1),\n(2);"
                    if self.format == Format::Mysql && self.head.ends_with(b" VALUES") {
                        self.head.push(b' ');
                        if self.start_values() {
                            return;
                        }
                    }
                    self.end_head_line();
                    self.head.clear();
                    return;
                }
                self.head.push(b);
                if self.format == Format::Mysql
                    && self.head.ends_with(b" VALUES ")
                    && self.start_values()
                {
                    return;
                }
                if !self.tables_started && self.head.as_slice() == b"CREATE TABLE" {
                    self.tables_started = true;
                }
                if self.head.len() > HEAD_MAX || !self.could_be_data_head() {
                    self.head.clear();
                    self.state = State::Skip;
                }
            }
            State::Values {
                in_str,
                escaped,
                depth,
            } => {
                if *escaped {
                    *escaped = false;
                } else if *in_str {
                    match b {
                        b'\\' => *escaped = true,
                        b'\'' => *in_str = false,
                        _ => {}
                    }
                } else {
                    match b {
                        b'\'' => *in_str = true,
                        b'(' => {
                            if *depth == 0 {
                                let t = self.table.clone().expect("table of an INSERT");
                                *self.rows.entry(t).or_insert(0) += 1;
                            }
                            *depth += 1;
                        }
                        b')' => *depth = depth.saturating_sub(1),
                        b';' if *depth == 0 => {
                            self.table = None;
                            self.state = State::Skip;
                        }
                        _ => {}
                    }
                }
            }
            State::Copy { line } => {
                if b == b'\n' {
                    if line.as_slice() == b"\\." {
                        self.table = None;
                        self.state = State::Head;
                    } else {
                        let t = self.table.clone().expect("table of a COPY");
                        *self.rows.entry(t).or_insert(0) += 1;
                        line.clear();
                    }
                } else if line.len() < 2 {
                    // Only the first bytes matter (the `\.` terminator).
                    line.push(b);
                } else if line.len() == 2 {
                    line.push(b'x');
                }
            }
        }
    }

    /// If the head is an INSERT's, switch to counting its rows.
    fn start_values(&mut self) -> bool {
        match mysql_insert_table(&self.head) {
            Some(t) => {
                self.table = Some(t);
                self.head.clear();
                self.state = State::Values {
                    in_str: false,
                    escaped: false,
                    depth: 0,
                };
                true
            }
            None => false,
        }
    }

    /// While a line head is short, can it still become an INSERT or COPY
    /// (or mysqldump's data comment, or the first CREATE TABLE)?
    fn could_be_data_head(&self) -> bool {
        // The head so far agrees with `line`'s start (or all of `line`).
        let agrees = |line: &[u8]| {
            let n = self.head.len().min(line.len());
            self.head[..n] == line[..n]
        };
        match self.format {
            Format::Mysql
                if (!self.body && agrees(b"INSERT INTO `"))
                    || agrees(MYSQL_DATA_COMMENT)
                    || agrees(MYSQL_DELIMITER) =>
            {
                true
            }
            Format::Postgres if agrees(b"COPY ") => true,
            _ => {
                let marker = b"CREATE TABLE";
                !self.tables_started && self.head.len() <= marker.len() && agrees(marker)
            }
        }
    }

    fn end_head_line(&mut self) {
        if self.format == Format::Mysql {
            if let Some(d) = self.head.strip_prefix(MYSQL_DELIMITER) {
                self.body = d.trim_ascii() != b";";
            }
            if let Some(t) = mysql_data_comment_table(&self.head) {
                self.rows.entry(t).or_insert(0);
                self.data_comments = true;
            }
            return;
        }
        if let Some(t) = pg_copy_table(&self.head) {
            self.table = Some(t);
            self.state = State::Copy { line: Vec::new() };
        }
    }
}

/// How many bytes of a line tell whether it belongs to the dump's header.
const HEADER_PROBE: usize = b"/*!40101 SET ".len();

/// Whether a line (its first [`HEADER_PROBE`] bytes, or all of a shorter
/// one) may be part of a dump's header: blank, a comment, a versioned
/// `SET`, or MariaDB's sandbox-mode line. Anything else (a table's or a
/// view stand-in's first statement) ends the header.
fn header_line(head: &[u8]) -> bool {
    let versioned_set = head.len() >= HEADER_PROBE
        && head.starts_with(b"/*!")
        && head[3..8].iter().all(u8::is_ascii_digit)
        && &head[8..HEADER_PROBE] == b" SET ";
    head == b"\n" || head.starts_with(b"--") || head.starts_with(b"/*M!") || versioned_set
}

/// Where a piece of a MySQL dump goes when it loads in two streams
/// ([`Splitter`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// The dump's header: blank lines, comments and the `/*!NNNNN SET ...*/`
    /// session settings before the first statement of the body (character
    /// set, time zone, unique and foreign-key checks off, `sql_mode`). Each
    /// loader needs them before its first row. See [`header_line`].
    Both,
    /// Everything else but the rows: tables, triggers, views, routines,
    /// events, in the dump's order, for the first loader.
    Main,
    /// Part of one INSERT statement: either loader, but all of one
    /// statement to the same one. `first` marks a statement's first piece.
    Rows { first: bool },
}

/// Splits a mysqldump stream at statement boundaries for two loaders, and
/// counts its rows on the way (it owns the [`RowCounter`]). Each INSERT
/// statement is one [`Route::Rows`] unit, whole; the caller chooses its
/// loader and keeps the order that matters: a table's rows after its
/// `CREATE TABLE` has run, and anything after a table's rows (its
/// triggers, the next table) after those rows are in.
///
/// The rows of a line are recognised exactly as the counter recognises
/// them (an ``INSERT INTO `t` `` at a line's start, outside a `DELIMITER`
/// block, up to its `;` outside strings), so every byte the counter counts
/// is routed as rows and no other byte is. The first bytes of each line are
/// held back until the counter has decided (at most [`HEAD_MAX`]), and in
/// the header until it is clear whether the line still belongs to it.
#[derive(Debug)]
pub struct Splitter {
    counter: RowCounter,
    /// The current line's bytes while its route is undecided.
    held: Vec<u8>,
    /// The rest of the current line's route (`None` at a line's start).
    route: Option<Route>,
    /// Still in the header (see [`Route::Both`]).
    header: bool,
}

impl Splitter {
    pub fn new() -> Splitter {
        Splitter {
            counter: RowCounter::new(Format::Mysql),
            held: Vec::new(),
            route: None,
            header: true,
        }
    }

    pub fn into_counter(self) -> RowCounter {
        self.counter
    }

    /// Feed the next bytes of the dump; `out` gets them, each piece with
    /// its route, in order.
    pub fn feed<E>(
        &mut self,
        mut chunk: &[u8],
        out: &mut impl FnMut(Route, &[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        while !chunk.is_empty() {
            let Some(route) = self.route else {
                // A line's start: byte by byte until the counter knows
                // whether an INSERT's rows begin (a few dozen bytes).
                let b = chunk[0];
                chunk = &chunk[1..];
                self.counter.feed(std::slice::from_ref(&b));
                self.held.push(b);
                let line_done = b == b'\n';
                let counted = !matches!(self.counter.state, State::Head);
                let route = if self.counter.in_rows() {
                    self.header = false;
                    self.route = Some(Route::Rows { first: false });
                    Route::Rows { first: true }
                } else if line_done
                    || (counted && (!self.header || self.held.len() >= HEADER_PROBE))
                {
                    self.header &= header_line(&self.held);
                    let route = if self.header {
                        Route::Both
                    } else {
                        Route::Main
                    };
                    self.route = (b != b'\n').then_some(route);
                    route
                } else {
                    continue;
                };
                out(route, &self.held)?;
                self.held.clear();
                continue;
            };
            // Rows: up to the statement's end, whatever the lines; then the
            // rest of the line (a row's line stays with its statement).
            let n = if self.counter.in_rows() {
                self.counter.feed_rows(chunk)
            } else {
                let n = memchr::memchr(b'\n', chunk).map_or(chunk.len(), |i| i + 1);
                self.counter.feed(&chunk[..n]);
                n
            };
            let (piece, rest) = chunk.split_at(n);
            out(route, piece)?;
            chunk = rest;
            if piece.ends_with(b"\n") && !self.counter.in_rows() {
                self.route = None;
            }
        }
        Ok(())
    }
}

impl Default for Splitter {
    fn default() -> Self {
        Splitter::new()
    }
}

/// The table of mysqldump's ``-- Dumping data for table `name` ``.
fn mysql_data_comment_table(head: &[u8]) -> Option<TableName> {
    let quoted = head.strip_prefix(MYSQL_DATA_COMMENT)?.strip_suffix(b"`")?;
    Some(TableName {
        schema: String::new(),
        name: String::from_utf8_lossy(quoted).replace("``", "`"),
    })
}

/// The table of ``INSERT INTO `name` VALUES `` or ``INSERT INTO `name` (...) VALUES ``.
fn mysql_insert_table(head: &[u8]) -> Option<TableName> {
    let rest = head.strip_prefix(b"INSERT INTO `")?;
    let mut name = Vec::new();
    let mut i = 0;
    while i < rest.len() {
        if rest[i] == b'`' {
            if rest.get(i + 1) == Some(&b'`') {
                name.push(b'`');
                i += 2;
                continue;
            }
            let after = &rest[i + 1..];
            if after == b" VALUES " || (after.starts_with(b" (") && after.ends_with(b") VALUES ")) {
                return Some(TableName {
                    schema: String::new(),
                    name: String::from_utf8_lossy(&name).into_owned(),
                });
            }
            return None;
        }
        name.push(rest[i]);
        i += 1;
    }
    None
}

/// The table of `COPY schema.table (cols) FROM stdin;`.
fn pg_copy_table(line: &[u8]) -> Option<TableName> {
    let line = std::str::from_utf8(line).ok()?;
    let rest = line.strip_prefix("COPY ")?;
    if !rest.ends_with(" FROM stdin;") {
        return None;
    }
    let (parts, _) = pg_identifiers(rest)?;
    match parts.as_slice() {
        [schema, name] => Some(TableName {
            schema: schema.clone(),
            name: name.clone(),
        }),
        [name] => Some(TableName {
            schema: "public".into(),
            name: name.clone(),
        }),
        _ => None,
    }
}

/// Parses a dotted, possibly quoted identifier at the start of `s` (quotes
/// removed, `""` undoubled; unquoted parts as written: pg_dump quotes every
/// identifier that is not already lower case). Returns the parts and the rest.
fn pg_identifiers(s: &str) -> Option<(Vec<String>, &str)> {
    let mut parts = Vec::new();
    let mut chars = s.char_indices().peekable();
    loop {
        let mut part = String::new();
        match chars.peek() {
            Some((_, '"')) => {
                chars.next();
                loop {
                    match chars.next()? {
                        (_, '"') => {
                            if matches!(chars.peek(), Some((_, '"'))) {
                                chars.next();
                                part.push('"');
                            } else {
                                break;
                            }
                        }
                        (_, c) => part.push(c),
                    }
                }
            }
            _ => {
                while let Some(&(_, c)) = chars.peek() {
                    if c == '.' || c == ' ' {
                        break;
                    }
                    part.push(c);
                    chars.next();
                }
            }
        }
        parts.push(part);
        match chars.peek() {
            Some(&(_, '.')) => {
                chars.next();
            }
            Some(&(i, _)) => return Some((parts, &s[i..])),
            None => return Some((parts, "")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(format: Format, text: &str, chunk: usize) -> RowCounter {
        let mut c = RowCounter::new(format);
        for piece in text.as_bytes().chunks(chunk) {
            c.feed(piece);
        }
        c
    }

    fn t(schema: &str, name: &str) -> TableName {
        TableName {
            schema: schema.into(),
            name: name.into(),
        }
    }

    #[test]
    fn mysql_extended_inserts_in_any_chunking() {
        let dump = "-- MariaDB dump\n\
            /*!40101 SET NAMES utf8mb4 */;\n\
            INSERT INTO `a` VALUES (1,'x'),(2,'it\\'s (not) a row'),(3,'it''s'),(4,0x28);\n\
            INSERT INTO `we``ird` VALUES (1,'\\\\'),(2,NULL);\n\
            INSERT INTO `g` (`id`, `v`) VALUES (1,'('),(2,')');\n\
            INSERT INTO `a` VALUES (5,'line\\nbreak');\n\
            INSERT INTO `m` VALUES\n(1,'a;b'),\n(2,'(');\n\
            -- INSERT INTO `a` VALUES (6,'comment');\n\
            CREATE TABLE `b` (\n  `id` int\n);\n\
            -- Dump completed on 2026-11-21\n";
        for chunk in [1, 2, 3, 7, 64, 4096] {
            let c = count(Format::Mysql, dump, chunk);
            assert_eq!(c.rows().get(&t("", "a")), Some(&5), "chunk {chunk}");
            assert_eq!(c.rows().get(&t("", "we`ird")), Some(&2), "chunk {chunk}");
            assert_eq!(c.rows().get(&t("", "g")), Some(&2), "chunk {chunk}");
            assert_eq!(c.rows().get(&t("", "m")), Some(&2), "chunk {chunk}");
            assert_eq!(c.rows().len(), 4);
            assert!(c.complete());
            assert!(c.tables_started());
            assert_eq!(c.bytes(), dump.len() as u64);
            assert!(!c.announces_tables());
        }
    }

    #[test]
    fn mysql_data_comments_record_empty_tables() {
        let dump = "--\n\
            -- Dumping data for table `a`\n\
            --\n\n\
            LOCK TABLES `a` WRITE;\n\
            INSERT INTO `a` VALUES (1),(2);\n\
            UNLOCK TABLES;\n\
            --\n\
            -- Dumping data for table `em``pty`\n\
            --\n\n\
            LOCK TABLES `em``pty` WRITE;\n\
            UNLOCK TABLES;\n\
            -- Dumping data for tables `not one`\n\
            -- Dump completed on 2026-11-22\n";
        for chunk in [1, 5, 4096] {
            let c = count(Format::Mysql, dump, chunk);
            assert!(c.announces_tables());
            assert_eq!(c.rows().get(&t("", "a")), Some(&2), "chunk {chunk}");
            assert_eq!(c.rows().get(&t("", "em`pty")), Some(&0), "chunk {chunk}");
            assert_eq!(c.rows().len(), 2, "chunk {chunk}");
        }
    }

    #[test]
    fn postgres_copy_blocks() {
        let dump = "--\n-- PostgreSQL database dump\n--\n\
            COPY public.docs (id, body) FROM stdin;\n\
            1\tline\\nwith escapes\n\
            2\t\\\\.\n\
            \\.\n\
            COPY \"Sché\"\"ma\".\"Tëst\" (id) FROM stdin;\n\
            1\n\
            \\.\n\
            COPY public.empty (id) FROM stdin;\n\
            \\.\n\
            SELECT pg_catalog.setval('public.s', 3, true);\n\
            --\n-- PostgreSQL database dump complete\n--\n";
        for chunk in [1, 5, 4096] {
            let c = count(Format::Postgres, dump, chunk);
            assert_eq!(c.rows().get(&t("public", "docs")), Some(&2));
            assert_eq!(c.rows().get(&t("Sché\"ma", "Tëst")), Some(&1));
            assert_eq!(c.rows().get(&t("public", "empty")), None);
            assert_eq!(c.total_rows(), 3);
            assert!(c.complete());
        }
    }

    /// A dump with a header, two tables (rows on one line and on a line
    /// each), a trigger whose body holds a line like an INSERT's, and the
    /// footer.
    const SPLIT_DUMP: &str = "/*M!999999\\- enable the sandbox mode */ \n\
        -- MariaDB dump 10.19\n\
        \n\
        /*!40101 SET NAMES utf8mb4 */;\n\
        /*!40101 SET @OLD_SQL_MODE=@@SQL_MODE, SQL_MODE='NO_AUTO_VALUE_ON_ZERO' */;\n\
        \n\
        --\n\
        -- Table structure for table `a`\n\
        --\n\
        \n\
        DROP TABLE IF EXISTS `a`;\n\
        CREATE TABLE `a` (\n  `id` int NOT NULL\n) ENGINE=InnoDB;\n\
        --\n\
        -- Dumping data for table `a`\n\
        --\n\
        \n\
        /*!40000 ALTER TABLE `a` DISABLE KEYS */;\n\
        INSERT INTO `a` VALUES (1),(2);\n\
        INSERT INTO `a` VALUES\n(3),\n(4);\n\
        /*!40000 ALTER TABLE `a` ENABLE KEYS */;\n\
        DELIMITER ;;\n\
        /*!50003 CREATE*/ /*!50003 TRIGGER `t` AFTER INSERT ON `a` FOR EACH ROW BEGIN\n\
        INSERT INTO `b` VALUES (NEW.id);\n\
        END */;;\n\
        DELIMITER ;\n\
        CREATE TABLE `b` (\n  `id` int NOT NULL\n);\n\
        INSERT INTO `b` (`id`) VALUES (7),(8),(9);\n\
        /*!40101 SET SQL_MODE=@OLD_SQL_MODE */;\n\
        -- Dump completed on 2026-11-22\n";

    #[test]
    fn mysql_bodies_of_triggers_hold_no_rows() {
        for chunk in [1, 3, 4096] {
            let c = count(Format::Mysql, SPLIT_DUMP, chunk);
            assert_eq!(c.rows().get(&t("", "a")), Some(&4), "chunk {chunk}");
            assert_eq!(c.rows().get(&t("", "b")), Some(&3), "chunk {chunk}");
        }
    }

    #[test]
    fn only_settings_and_comments_make_the_header() {
        for line in [
            "\n",
            "--\n",
            "-- MariaDB dump 10.19\n",
            "/*M!999999\\- enable the sandbox mode */ \n",
            "/*!40101 SET NAMES utf8mb4 */;\n",
        ] {
            assert!(header_line(line.as_bytes()), "{line}");
        }
        for line in [
            "/*!50001 DROP VIEW IF EXISTS `a`*/;\n",
            "/*!50001 CREATE VIEW `a` AS SELECT 1 AS `x` */;\n",
            "/*!40000 ALTER TABLE `a` DISABLE KEYS */;\n",
            "/*!4010 SET\n",
            "DROP TABLE IF EXISTS `a`;\n",
            "SET @saved_cs_client     = @@character_set_client;\n",
        ] {
            assert!(!header_line(line.as_bytes()), "{line}");
        }
        // In a dump: the view stand-in's first statement ends the header.
        let dump = "/*!40101 SET NAMES utf8mb4 */;\n/*!50001 DROP VIEW IF EXISTS `a`*/;\n/*!40101 SET x=1 */;\n";
        for chunk in [1, 4, 4096] {
            let mut sp = Splitter::new();
            let mut both = String::new();
            for piece in dump.as_bytes().chunks(chunk) {
                sp.feed::<()>(piece, &mut |route, bytes| {
                    if route == Route::Both {
                        both.push_str(std::str::from_utf8(bytes).unwrap());
                    }
                    Ok(())
                })
                .unwrap();
            }
            assert_eq!(both, "/*!40101 SET NAMES utf8mb4 */;\n", "chunk {chunk}");
        }
    }

    #[test]
    fn splitter_routes_whole_statements() {
        for chunk in [1, 2, 5, 17, 4096] {
            let mut sp = Splitter::new();
            let (mut both, mut main, mut all) = (Vec::new(), Vec::new(), Vec::new());
            let mut stmts: Vec<Vec<u8>> = Vec::new();
            for piece in SPLIT_DUMP.as_bytes().chunks(chunk) {
                sp.feed::<()>(piece, &mut |route, bytes| {
                    all.extend_from_slice(bytes);
                    match route {
                        Route::Both => both.extend_from_slice(bytes),
                        Route::Main => main.extend_from_slice(bytes),
                        Route::Rows { first: true } => stmts.push(bytes.to_vec()),
                        Route::Rows { first: false } => stmts
                            .last_mut()
                            .expect("a first piece")
                            .extend_from_slice(bytes),
                    }
                    Ok(())
                })
                .unwrap();
            }
            assert_eq!(String::from_utf8(all).unwrap(), SPLIT_DUMP, "chunk {chunk}");
            let both = String::from_utf8(both).unwrap();
            assert!(both.starts_with("/*M!999999"), "chunk {chunk}: {both}");
            assert!(both.ends_with("SQL_MODE='NO_AUTO_VALUE_ON_ZERO' */;\n\n--\n-- Table structure for table `a`\n--\n\n"), "chunk {chunk}: {both}");
            let stmts: Vec<String> = stmts
                .into_iter()
                .map(|s| String::from_utf8(s).unwrap())
                .collect();
            assert_eq!(
                stmts,
                [
                    "INSERT INTO `a` VALUES (1),(2);\n",
                    "INSERT INTO `a` VALUES\n(3),\n(4);\n",
                    "INSERT INTO `b` (`id`) VALUES (7),(8),(9);\n"
                ],
                "chunk {chunk}"
            );
            let main = String::from_utf8(main).unwrap();
            assert!(
                main.starts_with("DROP TABLE IF EXISTS `a`;"),
                "chunk {chunk}"
            );
            assert!(
                main.contains("BEGIN\nINSERT INTO `b` VALUES (NEW.id);\nEND */;;\n"),
                "chunk {chunk}"
            );
            assert!(
                !main.contains("(3)") && !main.contains("(8)"),
                "chunk {chunk}"
            );
            let c = sp.into_counter();
            assert_eq!(c.total_rows(), 7, "chunk {chunk}");
            assert!(c.complete());
        }
    }

    #[test]
    fn a_cut_dump_is_not_complete() {
        let c = count(Format::Mysql, "INSERT INTO `a` VALUES (1),(2", 3);
        assert!(!c.complete());
        assert_eq!(c.total_rows(), 2);
    }
}
