//! Database replication and control connections.
//!
//! The vendor dump tools (mysqldump / pg_dump) carry the data, streamed from
//! the primary node through hasync into the vendor client on the mirror (see
//! [`replicate`]). Control work (probes, row counts, the swap DDL and the
//! read-only SQL) goes over connections made with the `mysql` and `postgres`
//! crates through an SSH tunnel to the node's own database port.

pub mod mysql;
pub mod pg;
pub mod replicate;
pub mod stream;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use crate::config::{Database, Engine};

/// A table as the catalogs and the dumps name it. `schema` is empty for
/// MySQL/MariaDB (one database is one schema).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct TableName {
    pub schema: String,
    pub name: String,
}

impl std::fmt::Display for TableName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.schema.is_empty() {
            f.write_str(&self.name)
        } else {
            write!(f, "{}.{}", self.schema, self.name)
        }
    }
}

/// What a database holds, by (kind, name), and the tables whose rows are
/// counted. Built from the catalogs the same way on both sides, so two
/// catalogs can be compared.
#[derive(Debug, Default, Clone)]
pub struct Catalog {
    pub objects: BTreeSet<(String, String)>,
    pub tables: Vec<TableName>,
    /// PostgreSQL sequence positions (`None`: never used). Sequences are not
    /// transactional, so a copy may be ahead of the snapshot, never behind.
    pub sequences: std::collections::BTreeMap<String, Option<i64>>,
    /// PostgreSQL materialized views that are not populated (created `WITH
    /// NO DATA` and never refreshed, or refreshed `WITH NO DATA`): copied
    /// as they are, not counted (a count of one is an error), and they must
    /// be unpopulated in the copy too.
    pub unpopulated: BTreeSet<String>,
    /// Populated materialized views that read (directly or through views
    /// and other materialized views) an unpopulated one, with the first
    /// such one. pg_dump does not refresh them, so their copy is
    /// unpopulated: the one difference a copy may show (see
    /// [`replicate`]'s verification).
    pub reads_unpopulated: std::collections::BTreeMap<String, String>,
}

/// "missing on the mirror: view v1, trigger t on x; only on the mirror: ..."
pub fn describe_difference(
    want: &BTreeSet<(String, String)>,
    got: &BTreeSet<(String, String)>,
) -> String {
    let list = |items: Vec<&(String, String)>| {
        let n = items.len();
        let mut s: Vec<String> = items
            .into_iter()
            .take(10)
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        if n > 10 {
            s.push(format!("and {} more", n - 10));
        }
        s.join(", ")
    };
    let missing: Vec<_> = want.difference(got).collect();
    let extra: Vec<_> = got.difference(want).collect();
    let mut parts = Vec::new();
    if !missing.is_empty() {
        parts.push(format!("missing after the load: {}", list(missing)));
    }
    if !extra.is_empty() {
        parts.push(format!("not on the primary: {}", list(extra)));
    }
    parts.join("; ")
}

/// The staging database the dump is loaded into, next to the live one.
pub fn staging_name(live: &str) -> String {
    format!("{live}__hasync_new")
}

/// The previous copy, kept after a swap until the next successful one.
pub fn previous_name(live: &str) -> String {
    format!("{live}__hasync_old")
}

/// Why a control connection failed, phrased for the person fixing it.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("{engine} refused the login of user {user:?} ({detail}); check password_file and that the user may connect from {host}")]
    AccessDenied {
        engine: Engine,
        user: String,
        host: String,
        detail: String,
    },
    #[error("database {name:?} does not exist on the {engine} server; create it, or fix `name` in [database]")]
    NoSuchDatabase { engine: Engine, name: String },
    #[error("cannot talk to {engine} at {host}:{port} as seen from the node ({detail}); is the server running and listening there?")]
    Connect {
        engine: Engine,
        host: String,
        port: u16,
        detail: String,
    },
    #[error("{engine}: {context}: {detail}")]
    Query {
        engine: Engine,
        context: String,
        detail: String,
    },
}

/// Connect to the database at `via` (a tunnel's local end, or the address
/// itself for a local node) and return the server's version string.
pub fn probe(db: &Database, password: Option<&str>, via: SocketAddr) -> Result<String, DbError> {
    match db.engine {
        Engine::Mysql => probe_mysql(db, password, via),
        Engine::Postgres => probe_postgres(db, password, via),
    }
}

/// Like [`probe`], without the database itself: the server and the login
/// (for a standby whose database the first sync will create).
pub fn probe_server(
    db: &Database,
    password: Option<&str>,
    via: SocketAddr,
) -> Result<String, DbError> {
    match db.engine {
        Engine::Mysql => {
            use ::mysql::prelude::Queryable;
            let mut conn = mysql_connect(db, password, via, None)?;
            let version: Option<String> = conn
                .query_first("SELECT VERSION()")
                .map_err(|e| query_error(db.engine, "SELECT VERSION()", e))?;
            Ok(version.unwrap_or_default())
        }
        Engine::Postgres => {
            let mut client = pg_connect(db, password, via, "postgres")?;
            let row = client
                .query_one("SELECT version()", &[])
                .map_err(|e| query_error(db.engine, "SELECT version()", pg_text(&e)))?;
            Ok(row.get::<_, String>(0))
        }
    }
}

fn probe_mysql(db: &Database, password: Option<&str>, via: SocketAddr) -> Result<String, DbError> {
    use ::mysql::prelude::Queryable;
    let mut conn = mysql_connect(db, password, via, Some(&db.name))?;
    let version: Option<String> = conn
        .query_first("SELECT VERSION()")
        .map_err(|e| query_error(db.engine, "SELECT VERSION()", e))?;
    Ok(version.unwrap_or_default())
}

/// A MySQL/MariaDB control connection to `via` (a tunnel's local end),
/// optionally with a default database. Affected-row counts are "found rows"
/// (CLIENT_FOUND_ROWS), so an UPDATE that sets a value it already has still
/// counts its row.
pub fn mysql_connect(
    db: &Database,
    password: Option<&str>,
    via: SocketAddr,
    database: Option<&str>,
) -> Result<::mysql::Conn, DbError> {
    // prefer_socket(false): through a tunnel on loopback, the mysql crate would
    // otherwise ask the server for its socket path and silently reach a *local*
    // server instead of the node's.
    let opts = ::mysql::OptsBuilder::new()
        .ip_or_hostname(Some(via.ip().to_string()))
        .tcp_port(via.port())
        .prefer_socket(false)
        .user(Some(db.user.clone()))
        .pass(password.map(str::to_string))
        .db_name(database.map(str::to_string))
        .additional_capabilities(::mysql::consts::CapabilityFlags::CLIENT_FOUND_ROWS)
        .init(vec!["SET NAMES utf8mb4"])
        .tcp_connect_timeout(Some(Duration::from_secs(10)));
    ::mysql::Conn::new(opts).map_err(|e| mysql_error(db, e))
}

/// The text of a PostgreSQL error: severity, message, SQLSTATE, detail and
/// hint (the crate's Display says only "db error" for server errors).
pub fn pg_text(e: &::postgres::Error) -> String {
    match e.as_db_error() {
        Some(d) => {
            let mut s = format!(
                "{}: {} (SQLSTATE {})",
                d.severity(),
                d.message(),
                d.code().code()
            );
            if let Some(x) = d.detail() {
                s += &format!("; {x}");
            }
            if let Some(x) = d.hint() {
                s += &format!("; hint: {x}");
            }
            s
        }
        None => e.to_string(),
    }
}

/// A [`DbError::Query`] naming what was being done.
pub fn query_error(engine: Engine, context: &str, e: impl std::fmt::Display) -> DbError {
    DbError::Query {
        engine,
        context: context.to_string(),
        detail: e.to_string(),
    }
}

pub fn mysql_error(db: &Database, e: ::mysql::Error) -> DbError {
    match &e {
        // 1045 ER_ACCESS_DENIED_ERROR, 1044 ER_DBACCESS_DENIED_ERROR
        ::mysql::Error::MySqlError(me) if me.code == 1045 || me.code == 1044 => {
            DbError::AccessDenied {
                engine: db.engine,
                user: db.user.clone(),
                host: db.host.clone(),
                detail: me.message.clone(),
            }
        }
        // 1049 ER_BAD_DB_ERROR
        ::mysql::Error::MySqlError(me) if me.code == 1049 => DbError::NoSuchDatabase {
            engine: db.engine,
            name: db.name.clone(),
        },
        _ => DbError::Connect {
            engine: db.engine,
            host: db.host.clone(),
            port: db.port,
            detail: match &e {
                // The crate's Display of an I/O error is its Debug form
                // ("IoError { server disconnected }").
                ::mysql::Error::IoError(io) => io.to_string(),
                _ => e.to_string(),
            },
        },
    }
}

fn probe_postgres(
    db: &Database,
    password: Option<&str>,
    via: SocketAddr,
) -> Result<String, DbError> {
    let mut client = pg_connect(db, password, via, &db.name)?;
    let row = client
        .query_one("SELECT version()", &[])
        .map_err(|e| query_error(db.engine, "SELECT version()", pg_text(&e)))?;
    Ok(row.get::<_, String>(0))
}

/// A PostgreSQL control connection to database `dbname` at `via`.
pub fn pg_connect(
    db: &Database,
    password: Option<&str>,
    via: SocketAddr,
    dbname: &str,
) -> Result<::postgres::Client, DbError> {
    let mut cfg = ::postgres::Config::new();
    cfg.host(&via.ip().to_string())
        .port(via.port())
        .user(&db.user)
        .dbname(dbname)
        .application_name("hasync")
        .connect_timeout(Duration::from_secs(10));
    if let Some(p) = password {
        cfg.password(p);
    }
    cfg.connect(::postgres::NoTls).map_err(|e| {
        let mut e = postgres_error(db, e);
        if let DbError::NoSuchDatabase { name, .. } = &mut e {
            *name = dbname.to_string();
        }
        e
    })
}

pub fn postgres_error(db: &Database, e: ::postgres::Error) -> DbError {
    use ::postgres::error::SqlState;
    if let Some(dbe) = e.as_db_error() {
        let code = dbe.code();
        if *code == SqlState::INVALID_PASSWORD
            || *code == SqlState::INVALID_AUTHORIZATION_SPECIFICATION
        {
            return DbError::AccessDenied {
                engine: db.engine,
                user: db.user.clone(),
                host: db.host.clone(),
                detail: dbe.message().to_string(),
            };
        }
        if *code == SqlState::INVALID_CATALOG_NAME {
            return DbError::NoSuchDatabase {
                engine: db.engine,
                name: db.name.clone(),
            };
        }
    }
    DbError::Connect {
        engine: db.engine,
        host: db.host.clone(),
        port: db.port,
        detail: pg_text(&e),
    }
}
