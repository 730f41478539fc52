//! MySQL / MariaDB: the dump and load commands, the catalog, and the swap.
//!
//! MySQL has no `RENAME DATABASE`. The swap moves every table of the live
//! database to the previous-copy database and every table of the staging
//! database to the live one in a single `RENAME TABLE` statement, which the
//! server performs atomically (all or none). Views, triggers, routines and
//! events cannot move between schemas: their definitions are read from the
//! staging database (`SHOW CREATE ...`, printed without the schema name
//! because the connection's default database is the staging one) and
//! created again in the live database right after the move. Triggers must
//! be dropped before their tables can move. A failure after the move moves
//! the tables back and recreates the live database's own objects.

use ::mysql::prelude::Queryable;
use ::mysql::{Conn, Row, Value};

use super::{query_error, Catalog, DbError, TableName};
use crate::config::{Database, Engine};
use crate::transport::shell_quote;

const E: Engine = Engine::Mysql;

/// Quote an identifier with backticks.
pub fn ident(name: &str) -> String {
    format!("`{}`", name.replace('`', "``"))
}

/// A `[client]` option file: how the vendor tools on the node log in
/// without a password on their command line. Written 0600 over SFTP.
pub fn defaults_file(db: &Database, password: Option<&str>) -> String {
    let q = |s: &str| format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""));
    let mut s = format!(
        "# written by hasync for one run; removed afterwards\n[client]\nuser={}\nhost={}\nport={}\n",
        q(&db.user),
        q(&db.host),
        db.port
    );
    if let Some(p) = password {
        s.push_str(&format!("password={}\n", q(p)));
    }
    s
}

fn pick(tools: &[&str], package: &str) -> String {
    let alternatives = tools
        .iter()
        .map(|t| format!("command -v {t}"))
        .collect::<Vec<_>>()
        .join(" || ");
    format!(
        "t=$({alternatives}) || {{ echo 'hasync: neither {} is on PATH; install {package}' >&2; exit 127; }}; ",
        tools.join(" nor ")
    )
}

/// The dump, run on the primary node: one consistent snapshot of InnoDB
/// tables (`--single-transaction`), with routines, triggers and events,
/// binary data as hex so the stream stays text. (`--no-autocommit`, one
/// transaction per table, made the benchmark's load 1.9x slower on MariaDB
/// with a small buffer pool: 88 s against the plain pipe's 46 s.) `split`:
/// for a load in two streams, without `LOCK TABLES` around each table's
/// rows (one loader's lock would stop the other's rows).
pub fn dump_command(db: &Database, defaults: &str, split: bool) -> String {
    format!(
        "{}exec \"$t\" --defaults-extra-file={} --single-transaction --quick --routines --triggers --events \
         --hex-blob --no-tablespaces --default-character-set=utf8mb4 --max-allowed-packet=1G {}{}",
        pick(&["mariadb-dump", "mysqldump"], "mariadb-client or mysql-client"),
        shell_quote(defaults),
        if split { "--skip-add-locks " } else { "" },
        shell_quote(&db.name)
    )
}

/// The load, run on the mirror node, into the staging database. `answers`:
/// its output is kept, one line per query result and each as soon as it is
/// there (the sync queries of a load in two streams).
pub fn load_command(defaults: &str, staging: &str, answers: bool) -> String {
    format!(
        "{}exec \"$t\" --defaults-extra-file={} --default-character-set=utf8mb4 --max-allowed-packet=1G \
         --batch --database={}{}",
        pick(&["mariadb", "mysql"], "mariadb-client or mysql-client"),
        shell_quote(defaults),
        shell_quote(staging),
        if answers { " --skip-column-names --unbuffered" } else { " >/dev/null" }
    )
}

fn q<T: ::mysql::prelude::FromRow>(conn: &mut Conn, sql: &str) -> Result<Vec<T>, DbError> {
    conn.query(sql).map_err(|e| query_error(E, sql, e))
}

fn exec_params<T: ::mysql::prelude::FromRow>(
    conn: &mut Conn,
    sql: &str,
    schema: &str,
) -> Result<Vec<T>, DbError> {
    conn.exec(sql, (schema,))
        .map_err(|e| query_error(E, sql, e))
}

pub fn run(conn: &mut Conn, sql: &str) -> Result<(), DbError> {
    conn.query_drop(sql).map_err(|e| query_error(E, sql, e))
}

pub fn schema_exists(conn: &mut Conn, schema: &str) -> Result<bool, DbError> {
    let n: Vec<u64> = exec_params(
        conn,
        "SELECT COUNT(*) FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = ?",
        schema,
    )?;
    Ok(n.first().copied().unwrap_or(0) > 0)
}

/// The default character set and collation of a database.
pub fn charset(conn: &mut Conn, schema: &str) -> Result<(String, String), DbError> {
    let rows: Vec<(String, String)> = exec_params(
        conn,
        "SELECT DEFAULT_CHARACTER_SET_NAME, DEFAULT_COLLATION_NAME FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = ?",
        schema,
    )?;
    rows.into_iter().next().ok_or_else(|| DbError::Query {
        engine: E,
        context: format!("reading the character set of {schema}"),
        detail: "no such database".into(),
    })
}

/// Drop and create the staging database with the primary's character set.
pub fn create_staging(
    conn: &mut Conn,
    staging: &str,
    (cs, coll): &(String, String),
) -> Result<(), DbError> {
    run(conn, &format!("DROP DATABASE IF EXISTS {}", ident(staging)))?;
    run(
        conn,
        &format!(
            "CREATE DATABASE {} CHARACTER SET {cs} COLLATE {coll}",
            ident(staging)
        ),
    )
}

pub fn drop_database(conn: &mut Conn, name: &str) -> Result<(), DbError> {
    run(conn, &format!("DROP DATABASE IF EXISTS {}", ident(name)))
}

/// Everything of a schema that a dump carries, by kind and name, and the
/// tables whose rows are counted.
pub fn catalog(conn: &mut Conn, schema: &str) -> Result<Catalog, DbError> {
    let mut cat = Catalog::default();
    let tables: Vec<(String, String)> = exec_params(
        conn,
        "SELECT TABLE_NAME, TABLE_TYPE FROM information_schema.TABLES WHERE TABLE_SCHEMA = ?",
        schema,
    )?;
    for (name, ty) in tables {
        let kind = match ty.as_str() {
            "VIEW" => "view",
            "SEQUENCE" => "sequence",
            _ => {
                cat.tables.push(TableName {
                    schema: String::new(),
                    name: name.clone(),
                });
                "table"
            }
        };
        cat.objects.insert((kind.to_string(), name));
    }
    let routines: Vec<(String, String)> = exec_params(
        conn,
        "SELECT ROUTINE_TYPE, ROUTINE_NAME FROM information_schema.ROUTINES WHERE ROUTINE_SCHEMA = ?",
        schema,
    )?;
    for (ty, name) in routines {
        cat.objects.insert((ty.to_lowercase(), name));
    }
    let triggers: Vec<(String, String)> = exec_params(
        conn,
        "SELECT TRIGGER_NAME, EVENT_OBJECT_TABLE FROM information_schema.TRIGGERS WHERE TRIGGER_SCHEMA = ?",
        schema,
    )?;
    for (name, table) in triggers {
        cat.objects
            .insert(("trigger".into(), format!("{name} on {table}")));
    }
    let events: Vec<String> = exec_params(
        conn,
        "SELECT EVENT_NAME FROM information_schema.EVENTS WHERE EVENT_SCHEMA = ?",
        schema,
    )?;
    for name in events {
        cat.objects.insert(("event".into(), name));
    }
    cat.tables.sort();
    Ok(cat)
}

pub fn count(conn: &mut Conn, schema: &str, table: &TableName) -> Result<u64, DbError> {
    let sql = format!(
        "SELECT COUNT(*) FROM {}.{}",
        ident(schema),
        ident(&table.name)
    );
    let n: Vec<u64> = q(conn, &sql)?;
    Ok(n.first().copied().unwrap_or(0))
}

/// Table data sizes as the server estimates them (for a dry run).
pub fn sizes(conn: &mut Conn, schema: &str) -> Result<Vec<(String, u64)>, DbError> {
    exec_params(
        conn,
        "SELECT TABLE_NAME, COALESCE(DATA_LENGTH, 0) FROM information_schema.TABLES \
         WHERE TABLE_SCHEMA = ? AND TABLE_TYPE <> 'VIEW' ORDER BY TABLE_NAME",
        schema,
    )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum DefKind {
    // Creation order: routines may be used by views and triggers.
    Function,
    Procedure,
    View,
    Trigger,
    Event,
}

impl DefKind {
    fn keyword(self) -> &'static str {
        match self {
            DefKind::Function => "FUNCTION",
            DefKind::Procedure => "PROCEDURE",
            DefKind::View => "VIEW",
            DefKind::Trigger => "TRIGGER",
            DefKind::Event => "EVENT",
        }
    }
}

/// An object that cannot move between schemas, as `SHOW CREATE` prints it.
#[derive(Debug, Clone)]
pub struct Def {
    pub kind: DefKind,
    pub name: String,
    pub sql_mode: Option<String>,
    pub time_zone: Option<String>,
    /// The client character set and collation the object was created with
    /// (they are part of its definition).
    pub charset_client: Option<String>,
    pub collation_connection: Option<String>,
    pub create: String,
}

fn col(row: &Row, name: &str) -> Option<String> {
    match row.get_opt::<Value, &str>(name) {
        Some(Ok(Value::NULL)) | None => None,
        Some(Ok(v)) => ::mysql::from_value_opt::<String>(v).ok(),
        Some(Err(_)) => None,
    }
}

/// The definitions of a schema's routines, views, triggers and events, in
/// an order in which they can be created again.
pub fn definitions(conn: &mut Conn, schema: &str) -> Result<Vec<Def>, DbError> {
    run(conn, &format!("USE {}", ident(schema)))?;
    let mut names: Vec<(DefKind, String)> = Vec::new();
    let routines: Vec<(String, String)> = exec_params(
        conn,
        "SELECT ROUTINE_TYPE, ROUTINE_NAME FROM information_schema.ROUTINES WHERE ROUTINE_SCHEMA = ? \
         AND ROUTINE_TYPE IN ('FUNCTION', 'PROCEDURE') ORDER BY ROUTINE_NAME",
        schema,
    )?;
    for (ty, name) in routines {
        let kind = if ty == "FUNCTION" {
            DefKind::Function
        } else {
            DefKind::Procedure
        };
        names.push((kind, name));
    }
    let views: Vec<String> = exec_params(
        conn,
        "SELECT TABLE_NAME FROM information_schema.VIEWS WHERE TABLE_SCHEMA = ? ORDER BY TABLE_NAME",
        schema,
    )?;
    names.extend(views.into_iter().map(|v| (DefKind::View, v)));
    let triggers: Vec<String> = exec_params(
        conn,
        "SELECT TRIGGER_NAME FROM information_schema.TRIGGERS WHERE TRIGGER_SCHEMA = ? \
         ORDER BY EVENT_OBJECT_TABLE, ACTION_TIMING, EVENT_MANIPULATION, ACTION_ORDER",
        schema,
    )?;
    names.extend(triggers.into_iter().map(|t| (DefKind::Trigger, t)));
    let events: Vec<String> = exec_params(
        conn,
        "SELECT EVENT_NAME FROM information_schema.EVENTS WHERE EVENT_SCHEMA = ? ORDER BY EVENT_NAME",
        schema,
    )?;
    names.extend(events.into_iter().map(|e| (DefKind::Event, e)));

    let mut defs = Vec::new();
    for (kind, name) in names {
        let sql = format!("SHOW CREATE {} {}", kind.keyword(), ident(&name));
        let row: Option<Row> = conn
            .query_first(&sql)
            .map_err(|e| query_error(E, &sql, e))?;
        let row = row.ok_or_else(|| query_error(E, &sql, "no result"))?;
        let column = match kind {
            DefKind::Function => "Create Function",
            DefKind::Procedure => "Create Procedure",
            DefKind::View => "Create View",
            DefKind::Trigger => "SQL Original Statement",
            DefKind::Event => "Create Event",
        };
        let create = col(&row, column).ok_or_else(|| {
            query_error(
                E,
                &sql,
                format!(
                    "the definition is hidden from user; grant it SELECT on mysql.proc \
                     (or SHOW_ROUTINE) so hasync can copy {} {name}",
                    kind.keyword().to_lowercase()
                ),
            )
        })?;
        defs.push(Def {
            kind,
            name,
            sql_mode: col(&row, "sql_mode"),
            time_zone: col(&row, "time_zone"),
            charset_client: col(&row, "character_set_client"),
            collation_connection: col(&row, "collation_connection"),
            create,
        });
    }
    Ok(defs)
}

/// Tables (and sequences) that `RENAME TABLE` moves.
fn movable(conn: &mut Conn, schema: &str) -> Result<Vec<String>, DbError> {
    exec_params(
        conn,
        "SELECT TABLE_NAME FROM information_schema.TABLES WHERE TABLE_SCHEMA = ? \
         AND TABLE_TYPE <> 'VIEW' ORDER BY TABLE_NAME",
        schema,
    )
}

fn drop_defs<'a>(
    conn: &mut Conn,
    schema: &str,
    defs: impl IntoIterator<Item = &'a Def>,
) -> Result<(), DbError> {
    for d in defs {
        run(
            conn,
            &format!(
                "DROP {} IF EXISTS {}.{}",
                d.kind.keyword(),
                ident(schema),
                ident(&d.name)
            ),
        )?;
    }
    Ok(())
}

/// Create `defs` in `schema`. Views may depend on views not yet created:
/// those are retried as long as each pass creates something.
fn create_defs<'a>(
    conn: &mut Conn,
    schema: &str,
    defs: impl IntoIterator<Item = &'a Def>,
) -> Result<(), DbError> {
    run(conn, &format!("USE {}", ident(schema)))?;
    let mut pending: Vec<&Def> = defs.into_iter().collect();
    pending.sort_by_key(|d| d.kind);
    let saved_mode: Option<String> = conn
        .query_first("SELECT @@SESSION.sql_mode")
        .map_err(|e| query_error(E, "SELECT @@SESSION.sql_mode", e))?;
    let result = loop {
        let mut failed = Vec::new();
        let mut first_error = None;
        let before = pending.len();
        for d in pending {
            match create_one(conn, d) {
                Ok(()) => {}
                Err(e) => {
                    first_error.get_or_insert(e);
                    failed.push(d);
                }
            }
        }
        if failed.is_empty() {
            break Ok(());
        }
        if failed.len() == before {
            break Err(first_error.expect("an error for each failure"));
        }
        pending = failed;
    };
    if let Some(mode) = saved_mode {
        let _ = conn.exec_drop("SET SESSION sql_mode = ?", (mode,));
    }
    let _ = conn.query_drop("SET time_zone = DEFAULT");
    let _ = conn.query_drop("SET NAMES utf8mb4");
    result
}

fn create_one(conn: &mut Conn, d: &Def) -> Result<(), DbError> {
    if let Some(mode) = &d.sql_mode {
        conn.exec_drop("SET SESSION sql_mode = ?", (mode,))
            .map_err(|e| query_error(E, "SET sql_mode", e))?;
    }
    if let Some(tz) = &d.time_zone {
        conn.exec_drop("SET time_zone = ?", (tz,))
            .map_err(|e| query_error(E, "SET time_zone", e))?;
    }
    // The definition travels as UTF-8: keep the original client character set
    // when it is a UTF-8 one (utf8mb3 / utf8mb4), else create it as utf8mb4.
    match (&d.charset_client, &d.collation_connection) {
        (Some(cs), Some(coll)) if cs.starts_with("utf8") => {
            conn.exec_drop(
                "SET character_set_client = ?, character_set_results = ?, collation_connection = ?",
                (cs, cs, coll),
            )
            .map_err(|e| query_error(E, "SET character_set_client", e))?;
        }
        _ => {
            let _ = conn.query_drop("SET NAMES utf8mb4");
        }
    }
    conn.query_drop(&d.create).map_err(|e| {
        let hint = match &e {
            ::mysql::Error::MySqlError(me) if me.code == 1227 => {
                "; its DEFINER is another account: create that account on the mirror, \
                 or make the [database] user the DEFINER on the primary"
            }
            _ => "",
        };
        query_error(
            E,
            &format!("creating {} {}", d.kind.keyword().to_lowercase(), d.name),
            format!("{e}{hint}"),
        )
    })
}

/// What a swap did besides the move.
#[derive(Debug, Default)]
pub struct SwapReport {
    /// Whether the live database existed (and is now the previous copy).
    pub had_live: bool,
    pub tables_moved: usize,
    pub objects_created: usize,
    /// Problems that did not stop the swap (the previous copy's views could
    /// not be recreated, say).
    pub warnings: Vec<String>,
}

fn rename_statement(moves: &[(&str, &str, &str)]) -> String {
    let parts: Vec<String> = moves
        .iter()
        .map(|(from, to, t)| format!("{}.{} TO {}.{}", ident(from), ident(t), ident(to), ident(t)))
        .collect();
    format!("RENAME TABLE {}", parts.join(", "))
}

/// Replace the live database's contents with the staging database's. See
/// the module docs. On error the live database is as it was.
pub fn swap(conn: &mut Conn, live: &str, staging: &str, old: &str) -> Result<SwapReport, DbError> {
    let new_defs = definitions(conn, staging)?;
    let live_exists = schema_exists(conn, live)?;
    let mut report = SwapReport {
        had_live: live_exists,
        ..SwapReport::default()
    };
    let live_defs = if live_exists {
        definitions(conn, live)?
    } else {
        Vec::new()
    };
    let (cs, coll) = charset(conn, staging)?;
    // RENAME TABLE waits for open transactions on the tables, by default for
    // a day: a session left open on the mirror should fail the swap, not hang.
    run(conn, "SET SESSION lock_wait_timeout = 60")?;
    run(conn, &format!("USE {}", ident(staging)))?;
    drop_database(conn, old)?;
    run(
        conn,
        &format!(
            "CREATE DATABASE {} CHARACTER SET {cs} COLLATE {coll}",
            ident(old)
        ),
    )?;
    if !live_exists {
        run(
            conn,
            &format!(
                "CREATE DATABASE {} CHARACTER SET {cs} COLLATE {coll}",
                ident(live)
            ),
        )?;
    }
    let live_tables = movable(conn, live)?;
    let new_tables = movable(conn, staging)?;
    let forward: Vec<(&str, &str, &str)> = live_tables
        .iter()
        .map(|t| (live, old, t.as_str()))
        .chain(new_tables.iter().map(|t| (staging, live, t.as_str())))
        .collect();
    let backward: Vec<(&str, &str, &str)> = new_tables
        .iter()
        .map(|t| (live, staging, t.as_str()))
        .chain(live_tables.iter().map(|t| (old, live, t.as_str())))
        .collect();

    // Triggers pin their tables to their schema; the live database's other
    // objects are replaced by the staging database's.
    drop_defs(
        conn,
        staging,
        new_defs.iter().filter(|d| d.kind == DefKind::Trigger),
    )?;
    if let Err(e) = drop_defs(conn, live, &live_defs) {
        let _ = create_defs(conn, live, &live_defs);
        return Err(e);
    }
    if !forward.is_empty() {
        if let Err(e) = run(conn, &rename_statement(&forward)) {
            // RENAME TABLE is all or nothing: only the objects need restoring.
            let _ = create_defs(conn, live, &live_defs);
            return Err(e);
        }
    }
    report.tables_moved = new_tables.len();
    if let Err(e) = create_defs(conn, live, &new_defs) {
        let _ = drop_defs(conn, live, &new_defs);
        let back = if backward.is_empty() {
            Ok(())
        } else {
            run(conn, &rename_statement(&backward))
        };
        let restored = back.and_then(|()| create_defs(conn, live, &live_defs));
        return Err(DbError::Query {
            engine: E,
            context: "swap".into(),
            detail: match restored {
                Ok(()) => format!("{e}; the swap was rolled back, {live} is as before"),
                Err(r) => format!(
                    "{e}; rolling back failed too ({r}): {live}'s previous tables are in {old}"
                ),
            },
        });
    }
    report.objects_created = new_defs.len();
    // The previous copy keeps its views, triggers and routines, so a rollback
    // is a RENAME away (events are left out: they would fire there).
    if let Err(e) = create_defs(
        conn,
        old,
        live_defs.iter().filter(|d| d.kind != DefKind::Event),
    ) {
        report.warnings.push(format!(
            "the previous copy {old} lacks some of its views, triggers or routines: {e}"
        ));
    }
    run(conn, &format!("USE {}", ident(live)))?;
    drop_database(conn, staging)?;
    Ok(report)
}

/// Run `statements` in `schema`, in one transaction; see
/// [`super::replicate::check_statement`] for what is checked.
pub fn run_checked(
    conn: &mut Conn,
    schema: &str,
    statements: &[String],
    node: &str,
) -> Result<usize, DbError> {
    run(conn, &format!("USE {}", ident(schema)))?;
    run(conn, "START TRANSACTION")?;
    let result = (|| {
        for (i, stmt) in statements.iter().enumerate() {
            let outcome = if super::replicate::is_query(stmt) {
                let v: Option<Row> = conn
                    .query_first(stmt)
                    .map_err(|e| query_error(E, stmt, e))?;
                super::replicate::Outcome::Value(v.and_then(|r| {
                    r.get_opt::<Value, usize>(0)
                        .and_then(|v| v.ok())
                        .map(|v| value_text(&v))
                }))
            } else {
                conn.query_drop(stmt).map_err(|e| query_error(E, stmt, e))?;
                super::replicate::Outcome::Rows(conn.affected_rows())
            };
            super::replicate::check_statement(E, i, stmt, &outcome, node)?;
        }
        Ok(statements.len())
    })();
    match &result {
        Ok(_) => run(conn, "COMMIT")?,
        Err(_) => {
            let _ = conn.query_drop("ROLLBACK");
        }
    }
    result
}

fn value_text(v: &Value) -> String {
    match v {
        Value::NULL => "NULL".into(),
        Value::Bytes(b) => String::from_utf8_lossy(b).into_owned(),
        Value::Int(i) => i.to_string(),
        Value::UInt(u) => u.to_string(),
        other => other.as_sql(true),
    }
}
