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
                (
                    3,
                    "rollout order",
                    include_str!("../../../migrations/sqlite/0003_rollout_order.sql"),
                ),
            ],
            Self::Postgres => &[
                (
                    1,
                    "schema",
                    include_str!("../../../migrations/postgres/0001_schema.sql"),
                ),
                (
                    2,
                    "rollout order",
                    include_str!("../../../migrations/postgres/0002_rollout_order.sql"),
                ),
            ],
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

/// The connections the store uses: `writes` for every statement that
/// changes something (and the transactions that read before they write),
/// `reads` for plain reads. On PostgreSQL they are one pool.
pub(super) struct Pools {
    pub writes: AnyPool,
    pub reads: AnyPool,
    pub backend: Backend,
}

/// How many read-only connections a SQLite store opens: sqlx runs each on
/// its own thread, so reads (the API, metrics, the rollout engine's counts)
/// run beside the writer and beside each other instead of queueing behind
/// every ingest batch.
const SQLITE_READERS: u32 = 4;

/// Opens the database (creating a SQLite file if needed) and brings its
/// schema up to date.
pub(super) async fn connect(url: &DatabaseUrl) -> Result<Pools> {
    sqlx::any::install_default_drivers();
    let backend = url.backend();
    let pools = match backend {
        Backend::Sqlite => {
            let path = url.0.trim_start_matches("sqlite://");
            let options = SqliteConnectOptions::new()
                .filename(path)
                .create_if_missing(true);
            let options = AnyConnectOptions::from_str(options.to_url_lossy().as_str())?;
            // One writing connection: SQLite has one writer at a time, and a
            // transaction that reads before it writes would otherwise meet
            // SQLITE_BUSY rather than wait. Statements here are short.
            let writes = AnyPoolOptions::new()
                .max_connections(1)
                .after_connect(|conn, _| {
                    Box::pin(async move {
                        conn.execute("PRAGMA journal_mode = WAL").await?;
                        conn.execute("PRAGMA synchronous = NORMAL").await?;
                        Ok(())
                    })
                })
                .connect_with(options)
                .await?;
            migrate(backend, &writes).await?;
            // Readers open only after the schema is there and the file is in
            // WAL mode (which the file keeps), so they never block the
            // writer and each sees the last committed state.
            let read_options = SqliteConnectOptions::new().filename(path).read_only(true);
            let read_options = AnyConnectOptions::from_str(read_options.to_url_lossy().as_str())?;
            let reads = AnyPoolOptions::new()
                .max_connections(SQLITE_READERS)
                .connect_with(read_options)
                .await?;
            Pools {
                writes,
                reads,
                backend,
            }
        }
        Backend::Postgres => {
            let pool = AnyPoolOptions::new()
                .max_connections(16)
                .connect(&url.0)
                .await?;
            migrate(backend, &pool).await?;
            Pools {
                writes: pool.clone(),
                reads: pool,
                backend,
            }
        }
    };
    Ok(pools)
}

async fn migrate(backend: Backend, pool: &AnyPool) -> Result<()> {
    backend
        .migrator()
        .run(pool)
        .await
        .map_err(|e| StoreError::Invalid(format!("migrating the schema: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A migration file that is written but not listed here never runs (the
    /// rollout indexes once sat unapplied that way): every file under
    /// `migrations/<backend>/` must be in its migrator, in order.
    #[test]
    fn every_migration_file_is_applied() {
        for (backend, folder) in [(Backend::Sqlite, "sqlite"), (Backend::Postgres, "postgres")] {
            let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("migrations")
                .join(folder);
            let mut files: Vec<String> = std::fs::read_dir(&dir)
                .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
                .filter_map(|entry| entry.ok())
                .map(|entry| entry.file_name().to_string_lossy().into_owned())
                .filter(|name| name.ends_with(".sql"))
                .collect();
            files.sort();
            let listed: Vec<i64> = backend.migrator().iter().map(|m| m.version).collect();
            let on_disk: Vec<i64> = files
                .iter()
                .map(|name| name[..4].parse().unwrap_or(-1))
                .collect();
            assert_eq!(listed, on_disk, "{folder}: migrator against {files:?}");
        }
    }
}
