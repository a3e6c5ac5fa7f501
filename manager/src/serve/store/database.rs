//! Which database the store runs on, and getting it ready: SQLite (a file
//! under the data directory, the default) or PostgreSQL (shared by manager
//! replicas). The store's queries are one code path over both, through
//! sqlx's `Any` driver; only the schema and row locking differ, here.

use std::borrow::Cow;
use std::path::Path;
use std::str::FromStr;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{AnyPool, ConnectOptions, Executor};

use super::{Result, StoreError};

/// The database behind the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// One file, one manager.
    Sqlite,
    /// A server every replica reaches.
    Postgres,
}

impl Backend {
    /// What a read that is about to be changed in the same transaction
    /// appends: PostgreSQL locks the rows, so two replicas cannot both read
    /// "pending" and both send; SQLite has one writer at a time anyway.
    pub(super) fn for_update(self) -> &'static str {
        match self {
            Self::Sqlite => "",
            Self::Postgres => " FOR UPDATE",
        }
    }

    fn migrator(self) -> Migrator {
        let files: &[(i64, &str, &'static str)] = match self {
            Self::Sqlite => &[
                (
                    1,
                    "schema",
                    include_str!("../../../migrations/sqlite/0001_schema.sql"),
                ),
                (
                    2,
                    "certificate order",
                    include_str!("../../../migrations/sqlite/0002_certificate_order.sql"),
                ),
            ],
            Self::Postgres => &[(
                1,
                "schema",
                include_str!("../../../migrations/postgres/0001_schema.sql"),
            )],
        };
        Migrator::with_migrations(
            files
                .iter()
                .map(|&(version, description, sql)| {
                    Migration::new(
                        version,
                        Cow::Borrowed(description),
                        MigrationType::Simple,
                        sqlx::SqlSafeStr::into_sql_str(sql),
                        false,
                    )
                })
                .collect(),
        )
    }
}

/// Where the store lives, as the operator names it: `sqlite://PATH` or
/// `postgres://USER:PASSWORD@HOST/DATABASE` (a plain path is SQLite).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatabaseUrl(String);

impl FromStr for DatabaseUrl {
    type Err = String;

    fn from_str(text: &str) -> std::result::Result<Self, String> {
        if text.starts_with("postgres://") || text.starts_with("postgresql://") {
            AnyConnectOptions::from_str(text).map_err(|e| format!("{text:?}: {e}"))?;
            Ok(Self(text.to_string()))
        } else if let Some(path) = text.strip_prefix("sqlite://") {
            if path.is_empty() {
                return Err("sqlite:// needs a file's path".into());
            }
            Ok(Self(text.to_string()))
        } else if text.contains("://") {
            Err(format!(
                "{text:?}: the database is sqlite://PATH or postgres://USER:PASSWORD@HOST/NAME"
            ))
        } else {
            Ok(Self(format!("sqlite://{text}")))
        }
    }
}

impl DatabaseUrl {
    /// The SQLite file at `path`.
    pub fn sqlite(path: &Path) -> Self {
        Self(format!("sqlite://{}", path.display()))
    }

    /// Which database it names.
    pub fn backend(&self) -> Backend {
        if self.0.starts_with("sqlite://") {
            Backend::Sqlite
        } else {
            Backend::Postgres
        }
    }

    /// The URL with any password left out, for logs.
    pub fn redacted(&self) -> String {
        match AnyConnectOptions::from_str(&self.0) {
            Ok(mut options) if options.database_url.password().is_some() => {
                let _ = options.database_url.set_password(Some("***"));
                options.database_url.to_string()
            }
            _ => self.0.clone(),
        }
    }
}

/// Opens the database (creating a SQLite file if needed) and brings its
/// schema up to date.
pub(super) async fn connect(url: &DatabaseUrl) -> Result<(AnyPool, Backend)> {
    sqlx::any::install_default_drivers();
    let backend = url.backend();
    let pool = match backend {
        Backend::Sqlite => {
            let path = url.0.trim_start_matches("sqlite://");
            let options = SqliteConnectOptions::new()
                .filename(path)
                .create_if_missing(true);
            let options = AnyConnectOptions::from_str(options.to_url_lossy().as_str())?;
            // One connection: SQLite has one writer at a time, and a
            // transaction that reads before it writes would otherwise meet
            // SQLITE_BUSY rather than wait. Statements here are short.
            AnyPoolOptions::new()
                .max_connections(1)
                .after_connect(|conn, _| {
                    Box::pin(async move {
                        conn.execute("PRAGMA journal_mode = WAL").await?;
                        conn.execute("PRAGMA synchronous = NORMAL").await?;
                        Ok(())
                    })
                })
                .connect_with(options)
                .await?
        }
        Backend::Postgres => {
            AnyPoolOptions::new()
                .max_connections(16)
                .connect(&url.0)
                .await?
        }
    };
    backend
        .migrator()
        .run(&pool)
        .await
        .map_err(|e| StoreError::Invalid(format!("migrating the schema: {e}")))?;
    Ok((pool, backend))
}
