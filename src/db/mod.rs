//! Database control connections.
//!
//! The vendor dump tools (mysqldump / pg_dump) will carry the data; these
//! connections, made with the `mysql` and `postgres` crates through an SSH
//! tunnel to the node's own database port, carry the control work: probes,
//! row counts, the swap DDL and the read-only SQL. For now: the probe that
//! `doctor` runs.

use std::net::SocketAddr;
use std::time::Duration;

use crate::config::{Database, Engine};

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

fn probe_mysql(db: &Database, password: Option<&str>, via: SocketAddr) -> Result<String, DbError> {
    use mysql::prelude::Queryable;
    // prefer_socket(false): through a tunnel on loopback, the mysql crate would
    // otherwise ask the server for its socket path and silently reach a *local*
    // server instead of the node's.
    let opts = mysql::OptsBuilder::new()
        .ip_or_hostname(Some(via.ip().to_string()))
        .tcp_port(via.port())
        .prefer_socket(false)
        .user(Some(db.user.clone()))
        .pass(password.map(str::to_string))
        .db_name(Some(db.name.clone()))
        .tcp_connect_timeout(Some(Duration::from_secs(10)));
    let mut conn = mysql::Conn::new(opts).map_err(|e| mysql_error(db, e))?;
    let version: Option<String> =
        conn.query_first("SELECT VERSION()")
            .map_err(|e| DbError::Query {
                engine: db.engine,
                context: "SELECT VERSION()".into(),
                detail: e.to_string(),
            })?;
    Ok(version.unwrap_or_default())
}

fn mysql_error(db: &Database, e: mysql::Error) -> DbError {
    match &e {
        // 1045 ER_ACCESS_DENIED_ERROR, 1044 ER_DBACCESS_DENIED_ERROR
        mysql::Error::MySqlError(me) if me.code == 1045 || me.code == 1044 => {
            DbError::AccessDenied {
                engine: db.engine,
                user: db.user.clone(),
                host: db.host.clone(),
                detail: me.message.clone(),
            }
        }
        // 1049 ER_BAD_DB_ERROR
        mysql::Error::MySqlError(me) if me.code == 1049 => DbError::NoSuchDatabase {
            engine: db.engine,
            name: db.name.clone(),
        },
        _ => DbError::Connect {
            engine: db.engine,
            host: db.host.clone(),
            port: db.port,
            detail: e.to_string(),
        },
    }
}

fn probe_postgres(
    db: &Database,
    password: Option<&str>,
    via: SocketAddr,
) -> Result<String, DbError> {
    let mut cfg = postgres::Config::new();
    cfg.host(&via.ip().to_string())
        .port(via.port())
        .user(&db.user)
        .dbname(&db.name)
        .application_name("hasync")
        .connect_timeout(Duration::from_secs(10));
    if let Some(p) = password {
        cfg.password(p);
    }
    let mut client = cfg
        .connect(postgres::NoTls)
        .map_err(|e| postgres_error(db, e))?;
    let row = client
        .query_one("SELECT version()", &[])
        .map_err(|e| DbError::Query {
            engine: db.engine,
            context: "SELECT version()".into(),
            detail: e.to_string(),
        })?;
    Ok(row.get::<_, String>(0))
}

fn postgres_error(db: &Database, e: postgres::Error) -> DbError {
    use postgres::error::SqlState;
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
        detail: e.to_string(),
    }
}
