//! PostgreSQL: the dump and load commands, the catalog, the snapshot, and
//! the swap.
//!
//! The primary's rows are counted inside the very snapshot pg_dump reads:
//! a control transaction exports it (`pg_export_snapshot()`), counts every
//! table in it, and stays open while `pg_dump --snapshot` runs. The swap is
//! two `ALTER DATABASE ... RENAME` statements in one transaction, after the
//! sessions still connected to either database were ended.

use std::collections::BTreeMap;
use std::time::Duration;

use ::postgres::Client;

use super::{query_error, Catalog, DbError, TableName};
use crate::config::{Database, Engine};
use crate::transport::shell_quote;

const E: Engine = Engine::Postgres;

/// A [`DbError::Query`] with the server's own message (the `postgres`
/// crate's Display says only "db error").
fn pg_error(context: &str, e: impl PgText) -> DbError {
    query_error(E, context, e.text())
}

trait PgText {
    fn text(self) -> String;
}

impl PgText for ::postgres::Error {
    fn text(self) -> String {
        super::pg_text(&self)
    }
}

impl PgText for &str {
    fn text(self) -> String {
        self.to_string()
    }
}

/// Quote an identifier with double quotes.
pub fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A password file (`PGPASSFILE`) for the vendor tools on the node; written
/// 0600 over SFTP, named in the environment, never on a command line.
pub fn passfile(password: &str) -> String {
    let escaped = password.replace('\\', "\\\\").replace(':', "\\:");
    format!("*:*:*:*:{escaped}\n")
}

fn env(passfile: Option<&str>) -> String {
    match passfile {
        Some(p) => format!("env PGPASSFILE={} PGCONNECT_TIMEOUT=10 ", shell_quote(p)),
        None => "env PGCONNECT_TIMEOUT=10 ".to_string(),
    }
}

fn need(tool: &str) -> String {
    format!(
        "command -v {tool} >/dev/null || {{ echo 'hasync: {tool} is not on PATH; install postgresql-client' >&2; exit 127; }}; "
    )
}

fn conn_args(db: &Database) -> String {
    format!(
        "--no-password --host={} --port={} --username={}",
        shell_quote(&db.host),
        db.port,
        shell_quote(&db.user)
    )
}

/// The dump, run on the primary node, reading the exported snapshot (or
/// its own, without one).
pub fn dump_command(db: &Database, passfile: Option<&str>, snapshot: Option<&str>) -> String {
    format!(
        "{}exec {}pg_dump {} --format=plain {}--dbname={}",
        need("pg_dump"),
        env(passfile),
        conn_args(db),
        snapshot
            .map(|s| format!("--snapshot={} ", shell_quote(s)))
            .unwrap_or_default(),
        shell_quote(&db.name)
    )
}

/// The load, run on the mirror node, into the staging database; the first
/// error stops it.
pub fn load_command(db: &Database, passfile: Option<&str>, staging: &str) -> String {
    format!(
        "{} >/dev/null",
        load_command_with_output(db, passfile, staging)
    )
}

/// [`load_command`] with psql's standard output kept: the query results of
/// the dump's `SELECT`s, and the lines of the `\echo`s hasync adds (psql
/// flushes after each), which say how far the load got.
pub fn load_command_with_output(db: &Database, passfile: Option<&str>, staging: &str) -> String {
    format!(
        "{}exec {}psql -X -q {} -v ON_ERROR_STOP=1 --dbname={}",
        need("psql"),
        env(passfile),
        conn_args(db),
        shell_quote(staging)
    )
}

/// One section of the dump for a load in two streams, in the exported
/// `snapshot`: `section` is `pre-data`, `data` or `post-data`; for `data`,
/// `side` selects the tables whose rows are dumped (`Some(true)`: only
/// theirs; `Some(false)`: everyone else's, sequences and large objects
/// included). Table names are plain (see [`second_stream_tables`]), so the
/// patterns match exactly one table each.
pub fn dump_part_command(
    db: &Database,
    passfile: Option<&str>,
    snapshot: &str,
    section: &str,
    side: &[TableName],
    only: Option<bool>,
) -> String {
    let tables: String = match only {
        None => String::new(),
        Some(only) => side
            .iter()
            .map(|t| {
                format!(
                    "{}={}.{} ",
                    if only {
                        "--table"
                    } else {
                        "--exclude-table-data"
                    },
                    t.schema,
                    t.name
                )
            })
            .collect(),
    };
    format!(
        "{}exec {}pg_dump {} --format=plain --snapshot={} --section={section} {tables}--dbname={}",
        need("pg_dump"),
        env(passfile),
        conn_args(db),
        shell_quote(snapshot),
        shell_quote(&db.name)
    )
}

/// Whether `name` needs no quoting anywhere: a lowercase SQL identifier,
/// which a pg_dump `--table` pattern matches exactly.
fn plain_identifier(name: &str) -> bool {
    name.bytes()
        .next()
        .is_some_and(|b| b.is_ascii_lowercase() || b == b'_')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// Which tables a second loader takes, for a load in two streams: the
/// largest base tables, greedily, until they hold about half of the table
/// data (the first stream keeps the schema, every other table's rows, and
/// the indexes and constraints, built after both). A table whose name
/// would need quoting in a pg_dump pattern is never taken (it loads on the
/// first stream). `None` when a second stream would not pay (less than
/// `min_bytes` of table data, a single table) or could take no table.
pub fn second_stream_tables(
    client: &mut Client,
    min_bytes: u64,
) -> Result<Option<Vec<TableName>>, DbError> {
    let sql = format!(
        "SELECT n.nspname, c.relname, pg_table_size(c.oid)::bigint \
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE c.relkind = 'r' AND {USER_NAMESPACES} \
         AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass \
                         AND d.objid = c.oid AND d.deptype = 'e') \
         ORDER BY 3 DESC, 1, 2"
    );
    let tables: Vec<(TableName, u64)> = q(client, &sql)?
        .iter()
        .map(|r| {
            let size: i64 = r.get(2);
            (
                TableName {
                    schema: r.get(0),
                    name: r.get(1),
                },
                size.max(0) as u64,
            )
        })
        .collect();
    Ok(split_by_size(&tables, min_bytes))
}

fn split_by_size(tables: &[(TableName, u64)], min_bytes: u64) -> Option<Vec<TableName>> {
    let total: u64 = tables.iter().map(|(_, s)| s).sum();
    if tables.len() < 2 || total < min_bytes {
        return None;
    }
    // A table whose name a pattern cannot match exactly stays on the
    // first stream (it is never named there: that one excludes the
    // second's tables), whatever its size.
    let nameable = |t: &TableName| plain_identifier(&t.schema) && plain_identifier(&t.name);
    let mut rest_bytes: u64 = tables
        .iter()
        .filter(|(t, _)| !nameable(t))
        .map(|(_, s)| s)
        .sum();
    let (mut side, mut side_bytes) = (Vec::new(), 0u64);
    for (t, size) in tables.iter().filter(|(t, _)| nameable(t)) {
        if side_bytes <= rest_bytes {
            side.push(t.clone());
            side_bytes += size;
        } else {
            rest_bytes += size;
        }
    }
    (!side.is_empty()).then_some(side)
}

fn q(client: &mut Client, sql: &str) -> Result<Vec<::postgres::Row>, DbError> {
    client.query(sql, &[]).map_err(|e| pg_error(sql, e))
}

pub fn run(client: &mut Client, sql: &str) -> Result<(), DbError> {
    client.batch_execute(sql).map_err(|e| pg_error(sql, e))
}

/// Start a repeatable-read transaction, export its snapshot and return the
/// snapshot's name. Commit (or drop the client) only after pg_dump ended.
pub fn export_snapshot(client: &mut Client) -> Result<String, DbError> {
    run(client, "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")?;
    let rows = q(client, "SELECT pg_export_snapshot()")?;
    Ok(rows[0].get(0))
}

/// Start a repeatable-read transaction that reads `snapshot` (exported by
/// another session still open).
pub fn import_snapshot(client: &mut Client, snapshot: &str) -> Result<(), DbError> {
    let lit = snapshot.replace('\'', "''");
    run(
        client,
        &format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY; SET TRANSACTION SNAPSHOT '{lit}'"
        ),
    )
}

const USER_NAMESPACES: &str = "n.nspname NOT IN ('pg_catalog', 'information_schema') \
     AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp\\_%'";

/// Everything in the current database that a dump carries, the tables
/// (and populated materialized views) whose rows are counted, and the
/// materialized views that are not populated (a count of one would fail).
pub fn catalog(client: &mut Client) -> Result<Catalog, DbError> {
    let mut cat = Catalog::default();
    let sql = format!(
        "SELECT n.nspname, c.relname, c.relkind::text, c.relispopulated FROM pg_class c \
         JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f') AND {USER_NAMESPACES}"
    );
    for row in q(client, &sql)? {
        let (schema, name, kind): (String, String, String) = (row.get(0), row.get(1), row.get(2));
        let populated: bool = row.get(3);
        let label = match kind.as_str() {
            "r" => "table",
            "p" => "partitioned table",
            "v" => "view",
            "m" => "materialized view",
            "S" => "sequence",
            _ => "foreign table",
        };
        if kind == "m" && !populated {
            cat.unpopulated.insert(format!("{schema}.{name}"));
        } else if kind == "r" || kind == "m" {
            cat.tables.push(TableName {
                schema: schema.clone(),
                name: name.clone(),
            });
        }
        cat.objects
            .insert((label.to_string(), format!("{schema}.{name}")));
    }
    let sql = format!(
        "SELECT n.nspname FROM pg_namespace n WHERE {USER_NAMESPACES} AND n.nspname <> 'public'"
    );
    for row in q(client, &sql)? {
        cat.objects.insert(("schema".into(), row.get(0)));
    }
    let sql = format!(
        "SELECT n.nspname, p.proname || '(' || pg_get_function_identity_arguments(p.oid) || ')', \
         p.prokind::text FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE {USER_NAMESPACES}"
    );
    for row in q(client, &sql)? {
        let (schema, sig, kind): (String, String, String) = (row.get(0), row.get(1), row.get(2));
        let label = match kind.as_str() {
            "p" => "procedure",
            "a" => "aggregate",
            "w" => "window function",
            _ => "function",
        };
        cat.objects
            .insert((label.into(), format!("{schema}.{sig}")));
    }
    let sql = format!(
        "SELECT n.nspname, c.relname, t.tgname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid \
         JOIN pg_namespace n ON n.oid = c.relnamespace WHERE NOT t.tgisinternal AND {USER_NAMESPACES}"
    );
    for row in q(client, &sql)? {
        let (schema, table, name): (String, String, String) = (row.get(0), row.get(1), row.get(2));
        cat.objects
            .insert(("trigger".into(), format!("{name} on {schema}.{table}")));
    }
    let sql = format!(
        "SELECT n.nspname, t.typname, t.typtype::text FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace \
         WHERE {USER_NAMESPACES} AND (t.typtype IN ('e', 'd', 'r') \
         OR (t.typtype = 'c' AND (SELECT relkind FROM pg_class WHERE oid = t.typrelid) = 'c'))"
    );
    for row in q(client, &sql)? {
        let (schema, name, kind): (String, String, String) = (row.get(0), row.get(1), row.get(2));
        let label = match kind.as_str() {
            "e" => "enum type",
            "d" => "domain",
            "r" => "range type",
            _ => "composite type",
        };
        cat.objects
            .insert((label.into(), format!("{schema}.{name}")));
    }
    if !cat.unpopulated.is_empty() {
        cat.reads_unpopulated = reads_unpopulated(client)?;
    }
    // Sequence positions are part of the data: a mirror whose sequences lag
    // would hand out ids the primary already used.
    for row in q(
        client,
        "SELECT schemaname || '.' || sequencename, last_value FROM pg_sequences",
    )? {
        cat.sequences
            .insert(row.get(0), row.get::<_, Option<i64>>(1));
    }
    cat.tables.sort();
    Ok(cat)
}

/// The populated materialized views that read an unpopulated one, each
/// with the first (by name) it reads: through the rules of the views and
/// materialized views in between, as far as they go. pg_dump leaves such a
/// view unrefreshed (its REFRESH would fail on the load), so its copy is
/// unpopulated.
fn reads_unpopulated(client: &mut Client) -> Result<BTreeMap<String, String>, DbError> {
    // (view, relation its rule reads), followed through views and
    // materialized views to the unpopulated materialized views.
    let sql = "WITH RECURSIVE reads(mv, rel) AS ( \
           SELECT r.ev_class, d.refobjid FROM pg_rewrite r \
           JOIN pg_depend d ON d.classid = 'pg_rewrite'::regclass AND d.objid = r.oid \
             AND d.refclassid = 'pg_class'::regclass AND d.refobjid <> r.ev_class \
           JOIN pg_class c ON c.oid = r.ev_class AND c.relkind = 'm' AND c.relispopulated \
         UNION \
           SELECT reads.mv, d.refobjid FROM reads \
           JOIN pg_class via ON via.oid = reads.rel AND via.relkind IN ('v', 'm') \
           JOIN pg_rewrite r ON r.ev_class = via.oid \
           JOIN pg_depend d ON d.classid = 'pg_rewrite'::regclass AND d.objid = r.oid \
             AND d.refclassid = 'pg_class'::regclass AND d.refobjid <> r.ev_class) \
         SELECT mn.nspname || '.' || m.relname, min(un.nspname || '.' || u.relname) FROM reads \
         JOIN pg_class m ON m.oid = reads.mv JOIN pg_namespace mn ON mn.oid = m.relnamespace \
         JOIN pg_class u ON u.oid = reads.rel AND u.relkind = 'm' AND NOT u.relispopulated \
         JOIN pg_namespace un ON un.oid = u.relnamespace GROUP BY 1";
    Ok(q(client, sql)?
        .into_iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
}

/// Exact row counts of `tables` (a table's own rows, as COPY dumps them).
/// The first failure is the error: in a transaction, every statement after
/// it would only say the transaction is aborted.
pub fn counts(
    client: &mut Client,
    tables: &[TableName],
) -> Result<BTreeMap<TableName, u64>, DbError> {
    let mut out = BTreeMap::new();
    for t in tables {
        // (ONLY: a partitioned table's rows are its partitions'; for a
        // materialized view it changes nothing.)
        let rows = q(
            client,
            &format!(
                "SELECT count(*) FROM ONLY {}.{}",
                ident(&t.schema),
                ident(&t.name)
            ),
        )?;
        let n: i64 = rows[0].get(0);
        out.insert(t.clone(), n as u64);
    }
    Ok(out)
}

/// Table data sizes (for a dry run).
pub fn sizes(client: &mut Client) -> Result<Vec<(String, u64)>, DbError> {
    let sql = format!(
        "SELECT n.nspname || '.' || c.relname, pg_relation_size(c.oid) FROM pg_class c \
         JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind IN ('r', 'm') AND {USER_NAMESPACES} ORDER BY 1"
    );
    Ok(q(client, &sql)?
        .into_iter()
        .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1) as u64))
        .collect())
}

/// `ENCODING ... LC_COLLATE ... LC_CTYPE ...` of the current database, for
/// creating its copy.
pub fn database_options(client: &mut Client) -> Result<String, DbError> {
    let rows = q(
        client,
        "SELECT pg_encoding_to_char(encoding), datcollate, datctype FROM pg_database \
         WHERE datname = current_database()",
    )?;
    let lit = |s: String| format!("'{}'", s.replace('\'', "''"));
    let r = &rows[0];
    Ok(format!(
        "ENCODING {} LC_COLLATE {} LC_CTYPE {}",
        lit(r.get(0)),
        lit(r.get(1)),
        lit(r.get(2))
    ))
}

pub fn database_exists(client: &mut Client, name: &str) -> Result<bool, DbError> {
    let rows = client
        .query("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
        .map_err(|e| pg_error("looking up a database", e))?;
    Ok(!rows.is_empty())
}

/// End the other client sessions connected to `names` that hasync's role
/// may end: its own, or any but superusers' with pg_signal_backend.
/// Autovacuum workers are left alone (the rename stops them itself), and so
/// are sessions it may not end: the rename then fails and says so.
fn disconnect(client: &mut Client, names: &[&str]) -> Result<(), DbError> {
    let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    client
        .query(
            "SELECT pg_terminate_backend(a.pid) FROM pg_stat_activity a \
             WHERE a.datname = ANY($1) AND a.pid <> pg_backend_pid() \
             AND a.backend_type = 'client backend' \
             AND (a.usename = current_user OR (pg_has_role(current_user, 'pg_signal_backend', 'MEMBER') \
                  AND NOT COALESCE((SELECT rolsuper FROM pg_roles r WHERE r.rolname = a.usename), true)))",
            &[&names],
        )
        .map_err(|e| pg_error("ending sessions on the databases to swap", e))?;
    Ok(())
}

pub fn drop_database(client: &mut Client, name: &str) -> Result<(), DbError> {
    retry_in_use(|| {
        disconnect(client, &[name])?;
        run(client, &format!("DROP DATABASE IF EXISTS {}", ident(name)))
    })
}

/// Drop and create the staging database (on a connection to the node's
/// maintenance database).
pub fn create_staging(client: &mut Client, staging: &str, options: &str) -> Result<(), DbError> {
    drop_database(client, staging)?;
    run(
        client,
        &format!(
            "CREATE DATABASE {} TEMPLATE template0 {options}",
            ident(staging)
        ),
    )
}

/// Rename live -> old and staging -> live in one transaction, after
/// dropping the copy before the previous one. On error nothing was renamed.
/// Returns whether there was a live database (now the previous copy).
pub fn swap(client: &mut Client, live: &str, staging: &str, old: &str) -> Result<bool, DbError> {
    drop_database(client, old)?;
    let live_exists = database_exists(client, live)?;
    retry_in_use(|| {
        disconnect(client, &[live, staging])?;
        let mut sql = String::from("BEGIN;\n");
        if live_exists {
            sql += &format!("ALTER DATABASE {} RENAME TO {};\n", ident(live), ident(old));
        }
        sql += &format!(
            "ALTER DATABASE {} RENAME TO {};\nCOMMIT;",
            ident(staging),
            ident(live)
        );
        let r = run(client, &sql);
        if r.is_err() {
            let _ = client.batch_execute("ROLLBACK");
        }
        r
    })?;
    Ok(live_exists)
}

/// Retry `f` while it fails because a session (re)connected in between.
fn retry_in_use(mut f: impl FnMut() -> Result<(), DbError>) -> Result<(), DbError> {
    let mut attempt = 0;
    loop {
        match f() {
            Err(DbError::Query { detail, .. })
                if attempt < 3 && detail.contains("is being accessed by other users") =>
            {
                // Each attempt already waited 5 s for the sessions to end.
                attempt += 1;
                std::thread::sleep(Duration::from_millis(200 * attempt));
            }
            Err(DbError::Query {
                engine,
                context,
                detail,
            }) if detail.contains("is being accessed by other users") => {
                return Err(DbError::Query {
                    engine,
                    context,
                    detail: format!(
                        "{detail}; hasync ends its own user's sessions, not others': end them (see pg_stat_activity) or grant pg_signal_backend to the [database] user"
                    ),
                })
            }
            other => return other,
        }
    }
}

/// Run `statements` in the current database, in one transaction; see
/// [`super::replicate::check_statement`].
pub fn run_checked(
    client: &mut Client,
    statements: &[String],
    node: &str,
) -> Result<usize, DbError> {
    use super::replicate::{check_statement, is_query, Outcome};
    let mut tx = client.transaction().map_err(|e| pg_error("BEGIN", e))?;
    for (i, stmt) in statements.iter().enumerate() {
        let outcome = if is_query(stmt) {
            // simple_query returns text, whatever the column type.
            let msgs = tx.simple_query(stmt).map_err(|e| pg_error(stmt, e))?;
            let first = msgs.into_iter().find_map(|m| match m {
                ::postgres::SimpleQueryMessage::Row(r) => {
                    Some(r.get(0).unwrap_or("NULL").to_string())
                }
                _ => None,
            });
            Outcome::Value(first)
        } else {
            Outcome::Rows(
                tx.execute(stmt.as_str(), &[])
                    .map_err(|e| pg_error(stmt, e))?,
            )
        };
        check_statement(E, i, stmt, &outcome, node)?;
    }
    tx.commit().map_err(|e| pg_error("COMMIT", e))?;
    Ok(statements.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(schema: &str, name: &str) -> TableName {
        TableName {
            schema: schema.into(),
            name: name.into(),
        }
    }

    #[test]
    fn the_second_stream_takes_the_largest_tables_up_to_about_half() {
        let tables = [
            (t("public", "docs"), 330),
            (t("public", "activity"), 214),
            (t("public", "versions"), 140),
            (t("public", "nodes"), 90),
            (t("public", "config"), 1),
        ];
        // docs (330) vs activity + versions (354); then nodes to docs.
        assert_eq!(
            split_by_size(&tables, 100),
            Some(vec![t("public", "docs"), t("public", "nodes")])
        );
        assert_eq!(split_by_size(&tables, 1000), None, "too little data");
        assert_eq!(split_by_size(&tables[..1], 0), None, "one table");
        // A name that needs quoting stays on the first stream.
        let mut quoted = tables.clone();
        quoted[0].0 = t("public", "Docs");
        assert_eq!(
            split_by_size(&quoted, 0),
            Some(vec![
                t("public", "activity"),
                t("public", "versions"),
                t("public", "config")
            ])
        );
        let mut all_quoted = tables.clone();
        for (i, (table, _)) in all_quoted.iter_mut().enumerate() {
            *table = t("médiathèque", &format!("t{i}"));
        }
        assert_eq!(split_by_size(&all_quoted, 0), None, "none can be named");
        // Only the second stream's tables are named in patterns.
        let mut other = tables.clone();
        other[1].0 = t("public", "Activity Log");
        assert!(split_by_size(&other, 0).is_some());
    }

    #[test]
    fn dump_parts_name_their_tables_exactly() {
        let db = Database {
            engine: crate::config::Engine::Postgres,
            name: "okmdb".into(),
            host: "127.0.0.1".into(),
            port: 5432,
            user: "okm".into(),
            password_file: None,
            readonly_sql: vec![],
            readwrite_sql: vec![],
            early_restart: false,
        };
        let side = [t("public", "docs"), t("s2", "nodes")];
        let only = dump_part_command(&db, None, "00000003-1", "data", &side, Some(true));
        assert!(only.contains("--section=data --table=public.docs --table=s2.nodes --dbname="));
        let rest = dump_part_command(&db, None, "00000003-1", "data", &side, Some(false));
        assert!(rest
            .contains("--exclude-table-data=public.docs --exclude-table-data=s2.nodes --dbname="));
        let pre = dump_part_command(&db, None, "00000003-1", "pre-data", &side, None);
        assert!(pre.contains("00000003-1 --section=pre-data --dbname="));
        assert!(!pre.contains("docs"));
    }
}
