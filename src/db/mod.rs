//! The database: one schema over SQLite and PostgreSQL through diesel's `MultiConnection`,
//! an r2d2 pool, embedded migrations, and the `Db::read` / `Db::write` helpers that run
//! queries off the async workers.

pub mod epoch;
pub mod models;
pub mod schema;

use std::sync::Arc;
use std::time::Duration;

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::r2d2::{self, ManageConnection};
use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};

use crate::config::{DatabaseUrl, Settings};
use crate::error::{Error, Result};

const SQLITE_MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/sqlite");
const POSTGRES_MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/postgres");

#[derive(diesel::MultiConnection)]
pub enum AnyConnection {
    Postgresql(diesel::PgConnection),
    Sqlite(diesel::SqliteConnection),
}

/// Builds connections of the configured kind, with SQLite's per-connection pragmas applied.
#[derive(Debug, Clone)]
struct Manager {
    url: DatabaseUrl,
}

impl ManageConnection for Manager {
    type Connection = AnyConnection;
    type Error = r2d2::Error;

    fn connect(&self) -> Result<AnyConnection, r2d2::Error> {
        match &self.url {
            DatabaseUrl::Postgres(url) => diesel::PgConnection::establish(url)
                .map(AnyConnection::Postgresql)
                .map_err(r2d2::Error::ConnectionError),
            DatabaseUrl::Sqlite(path) => {
                let mut conn = diesel::SqliteConnection::establish(&path.to_string_lossy())
                    .map_err(r2d2::Error::ConnectionError)?;
                // busy_timeout first: it makes every later statement wait out another
                // connection or process holding the lock instead of failing at once.
                // synchronous = FULL: a commit that was acknowledged survives power loss too.
                conn.batch_execute(
                    "PRAGMA busy_timeout = 10000; PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;",
                )
                .map_err(r2d2::Error::QueryError)?;
                Ok(AnyConnection::Sqlite(conn))
            }
        }
    }

    fn is_valid(&self, conn: &mut AnyConnection) -> Result<(), r2d2::Error> {
        conn.batch_execute("SELECT 1")
            .map_err(r2d2::Error::QueryError)
    }

    /// A connection dropped while its thread unwinds, or left inside a transaction, is not
    /// handed out again.
    fn has_broken(&self, conn: &mut AnyConnection) -> bool {
        use diesel::r2d2::R2D2Connection;
        std::thread::panicking()
            || match conn {
                AnyConnection::Sqlite(c) => c.is_broken(),
                AnyConnection::Postgresql(c) => c.is_broken(),
            }
    }
}

/// A cloneable handle to the pool.
#[derive(Clone)]
pub struct Db {
    pool: r2d2::Pool<Manager>,
    /// SQLite allows one writer: writers in this process queue here rather than
    /// spinning on SQLITE_BUSY. PostgreSQL has no such lock.
    write_lock: Option<Arc<std::sync::Mutex<()>>>,
    pub backend: Backend,
    /// How many migrations ran when this handle was opened.
    pub migrated: usize,
    /// Changes whenever a committed transaction changed the catalog.
    pub epoch: Arc<epoch::Epoch>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Db {
    /// Opens the pool (creating the SQLite file and its folder) and runs pending migrations.
    pub fn open(settings: &Settings) -> anyhow::Result<Db> {
        let url = settings.database_url()?;
        let backend = match &url {
            DatabaseUrl::Sqlite(path) => {
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir)?;
                }
                Backend::Sqlite
            }
            DatabaseUrl::Postgres(_) => Backend::Postgres,
        };
        if let DatabaseUrl::Sqlite(path) = &url {
            // WAL (persistent in the file) lets readers run beside the one writer.
            let mut conn =
                diesel::SqliteConnection::establish(&path.to_string_lossy()).map_err(|e| {
                    anyhow::anyhow!("database.url: cannot open {}: {e}", path.display())
                })?;
            conn.batch_execute("PRAGMA busy_timeout = 10000; PRAGMA journal_mode = WAL;")?;
        }
        let pool = r2d2::Pool::builder()
            // Connections are made on demand only: a background connect still running when
            // a CLI command exits races OpenSSL's exit-time cleanup inside libpq (SIGSEGV).
            .min_idle(Some(0))
            // A SQLite connection is a local file handle that does not go stale, so it is not
            // probed with a query on every checkout; PostgreSQL connections are.
            .test_on_check_out(backend == Backend::Postgres)
            .max_size(settings.database.pool_size)
            .connection_timeout(Duration::from_secs(
                settings.database.pool_timeout_secs.max(1),
            ))
            .build(Manager { url })
            .map_err(|e| anyhow::anyhow!("database.url: cannot connect: {e}"))?;
        let db = Db {
            pool,
            write_lock: (backend == Backend::Sqlite).then(|| Arc::new(std::sync::Mutex::new(()))),
            backend,
            migrated: 0,
            epoch: Arc::new(epoch::Epoch::new(Some(
                settings.data_dir.join("catalog.epoch"),
            ))),
        };
        let mut db = db;
        db.migrated = db.migrate()?;
        db.write_blocking(models::kv::ensure_server_secret)
            .map_err(|e| anyhow::anyhow!("database: {e}"))?;
        Ok(db)
    }

    /// Runs every pending embedded migration; returns how many ran.
    pub fn migrate(&self) -> anyhow::Result<usize> {
        let mut conn = self.pool.get()?;
        let ran = match &mut *conn {
            AnyConnection::Sqlite(c) => {
                c.run_pending_migrations(SQLITE_MIGRATIONS).map(|v| v.len())
            }
            AnyConnection::Postgresql(c) => c
                .run_pending_migrations(POSTGRES_MIGRATIONS)
                .map(|v| v.len()),
        }
        .map_err(|e| anyhow::anyhow!("migrations: {e}"))?;
        Ok(ran)
    }

    /// Runs read-only work on a pooled connection, on the blocking thread pool.
    pub async fn read<T, F>(&self, f: F) -> Result<T>
    where
        F: FnOnce(&mut AnyConnection) -> Result<T> + Send + 'static,
        T: Send + 'static,
    {
        let db = self.clone();
        actix_web::rt::task::spawn_blocking(move || db.read_blocking(f))
            .await
            .map_err(|e| Error::internal(format!("db task: {e}")))?
    }

    /// Runs `f` inside one transaction on the blocking thread pool; commits if it returns Ok.
    pub async fn write<T, F>(&self, f: F) -> Result<T>
    where
        F: FnOnce(&mut AnyConnection) -> Result<T> + Send + 'static,
        T: Send + 'static,
    {
        let db = self.clone();
        actix_web::rt::task::spawn_blocking(move || db.write_blocking(f))
            .await
            .map_err(|e| Error::internal(format!("db task: {e}")))?
    }

    pub fn read_blocking<T>(&self, f: impl FnOnce(&mut AnyConnection) -> Result<T>) -> Result<T> {
        let mut conn = self.pool.get()?;
        f(&mut conn)
    }

    pub fn write_blocking<T>(&self, f: impl FnOnce(&mut AnyConnection) -> Result<T>) -> Result<T> {
        self.write_begun(false, f)
    }

    /// `write_blocking` for appends to the audit chain, with the chain's lock held from the
    /// start: on PostgreSQL the transaction's `BEGIN` takes it in the same round trip (see
    /// `models::audit::lock_chain`); SQLite's write lock serialises appenders already.
    pub fn write_chain_blocking<T>(
        &self,
        f: impl FnOnce(&mut AnyConnection) -> Result<T>,
    ) -> Result<T> {
        self.write_begun(true, f)
    }

    fn write_begun<T>(
        &self,
        chain: bool,
        f: impl FnOnce(&mut AnyConnection) -> Result<T>,
    ) -> Result<T> {
        let _guard = self
            .write_lock
            .as_ref()
            .map(|lock| lock.lock().unwrap_or_else(|p| p.into_inner()));
        let mut pooled = self.pool.get()?;
        let conn: &mut AnyConnection = &mut pooled;
        epoch::take_changed();
        let begin: std::borrow::Cow<str> = match conn {
            AnyConnection::Sqlite(_) => "BEGIN IMMEDIATE".into(),
            AnyConnection::Postgresql(_) if chain => {
                format!("BEGIN; {}", models::audit::CHAIN_LOCK_SQL).into()
            }
            AnyConnection::Postgresql(_) => "BEGIN".into(),
        };
        let result = begun_transaction(conn, &begin, f);
        if epoch::take_changed() && result.is_ok() {
            self.epoch.bump();
        }
        result
    }
}

/// Runs `f` in a transaction opened with `begin`, as diesel's `transaction` does with `BEGIN`.
/// On SQLite that is `BEGIN IMMEDIATE`, which takes the write lock before anything is read,
/// so that a read-then-write transaction never meets another process's commit
/// (SQLITE_BUSY_SNAPSHOT); busy_timeout makes it wait for the lock instead. Transactions that
/// `f` opens itself become savepoints, as with `transaction`.
fn begun_transaction<T>(
    conn: &mut AnyConnection,
    begin: &str,
    f: impl FnOnce(&mut AnyConnection) -> Result<T>,
) -> Result<T> {
    use diesel::connection::{AnsiTransactionManager as Tm, TransactionManager};
    enum Step<'a> {
        Begin(&'a str),
        Commit,
        Rollback,
    }
    fn step(conn: &mut AnyConnection, s: Step<'_>) -> diesel::QueryResult<()> {
        fn on<C>(c: &mut C, s: Step<'_>) -> diesel::QueryResult<()>
        where
            C: diesel::Connection<TransactionManager = Tm>,
        {
            match s {
                Step::Begin(sql) => Tm::begin_transaction_sql(c, sql),
                Step::Commit => Tm::commit_transaction(c),
                Step::Rollback => Tm::rollback_transaction(c),
            }
        }
        match conn {
            AnyConnection::Sqlite(c) => on(c, s),
            AnyConnection::Postgresql(c) => on(c, s),
        }
    }
    if let Err(e) = step(conn, Step::Begin(begin)) {
        // A `begin` of several statements may have opened the transaction before a later one
        // failed (the chain's lock timing out, say), and diesel does not know it is open: end
        // it, so the connection goes back to the pool clean. With none open, this is a no-op
        // on PostgreSQL and an error on SQLite, both ignored.
        let _ = diesel::connection::SimpleConnection::batch_execute(conn, "ROLLBACK");
        return Err(e.into());
    }
    match f(conn) {
        Ok(v) => {
            step(conn, Step::Commit)?;
            Ok(v)
        }
        // As diesel's own `transaction`: a failed rollback is reported unless the
        // transaction manager was already broken by the original error.
        Err(e) => match step(conn, Step::Rollback) {
            Ok(()) | Err(diesel::result::Error::BrokenTransactionManager) => Err(e),
            Err(rollback) => Err(rollback.into()),
        },
    }
}
