//! The store's database connection: a pool, or, on the embedded default,
//! SQLite's one connection kept by the store between uses.
//!
//! sqlx's pool pings every connection given back to it (its
//! `return_to_pool`; sqlx 0.9.1 has no setting to skip it). On SQLite the
//! ping is one more hand-off to the connection's thread and back, with the
//! one connection unusable meanwhile: about four per webhook on the
//! embedded default, as many as the statements themselves (BENCHMARKS.md,
//! "What limits", item 15). The embedded default opens one connection
//! (`database.max_connections` 1), so the store takes it from the pool at
//! its first use and keeps it in a slot behind a lock: one user at a time,
//! in turn, as the pool of one was, without the ping.
//!
//! A use that fails for other than the database's refusal of a statement,
//! or that is dropped unfinished (a cancelled task), gives the connection
//! back to the pool instead: sqlx's return (its ping) waits for whatever
//! the connection's thread still runs, and closes a connection that does
//! not answer. The next use takes it from the pool again. A transaction
//! ([`Open`], [`Txn`]) is ended before its connection is used again: a
//! transaction's connection stays kept once its rollback is queued or
//! done, even after a cancelled statement (sqlx runs the rollback after
//! it), unless one of its statements failed for other than a refusal.
//!
//! Reads go beside that connection: a query outside a transaction
//! (`query_one_raw`, `query_all_raw`) whose text begins with `SELECT`
//! runs on a second connection, opened read-only and kept the same way,
//! when the database is in write-ahead logging mode (the embedded
//! default's; the reader, opened at the first read, says which). In that
//! mode a reader sees every transaction committed before its statement
//! began, and neither it nor the writer waits for the other (a reader
//! only keeps a checkpoint from going past what it reads, for the
//! milliseconds a statement takes), so the worker's row reads and the
//! API's lookups no longer take turns with the write groups on one
//! connection: under load they were seven in eight of its uses
//! (BENCHMARKS.md, "What limits", item 22). A read does not see what a
//! transaction still open on the writer wrote: code that holds a
//! transaction reads through it (as it always had to, the writer being
//! its own). Everything else (writes, statements that return
//! rows from a write, anything in a transaction, `PRAGMA`s, and every
//! statement of a database not in that mode, e.g. in memory) stays on the
//! kept connection; a write sent to the reader by mistake is refused
//! ("attempt to write a readonly database"), never run beside the writer.
//!
//! Every other deployment (PostgreSQL, or SQLite configured with more
//! than one connection) uses the pool as sea-orm does.

use std::sync::Arc;

use sea_orm::{
    ConnAcquireErr, ConnectionTrait, DatabaseConnection, DatabaseTransaction, DbBackend, DbErr,
    ExecResult, QueryResult, RuntimeErr, Statement, TransactionTrait, Value,
    sea_query::Values,
    sqlx::{
        self, Sqlite, SqliteConnection,
        pool::PoolConnection,
        sqlite::{SqliteRow, SqliteTransactionManager},
    },
};
use sea_query_sqlx::SqlxValues;
use sqlx_core::transaction::TransactionManager;
use tokio::sync::{Mutex, OwnedMutexGuard};
use tracing::{debug, warn};

/// The store's database: see the module's documentation.
#[derive(Clone)]
pub enum Db {
    /// A pool, used as sea-orm uses it: PostgreSQL, or SQLite with more
    /// than one connection.
    Pool(DatabaseConnection),
    /// SQLite's one connection, kept between uses.
    Kept(Kept),
}

/// SQLite's one writing connection, and the reader beside it (see the
/// module's documentation).
#[derive(Clone)]
pub struct Kept {
    writer: One,
    /// Set at the first read: `Some` when the database is in write-ahead
    /// logging mode.
    reader: Arc<tokio::sync::OnceCell<Option<One>>>,
}

/// One connection kept in its slot; the pool it came from.
#[derive(Clone)]
struct One {
    pool: DatabaseConnection,
    slot: Arc<Mutex<Slot>>,
}

/// The kept connection's place (empty until the first use, and after a
/// use gave the connection back to the pool).
#[derive(Default)]
struct Slot(Option<PoolConnection<Sqlite>>);

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(conn) = self.0.take() {
            give_back(conn);
        }
    }
}

/// Gives `conn` back to its pool. sqlx's pool needs a runtime to take a
/// connection back; without one (the process is ending) it is left as it
/// is.
fn give_back(conn: PoolConnection<Sqlite>) {
    if tokio::runtime::Handle::try_current().is_ok() {
        drop(conn);
    } else {
        std::mem::forget(conn);
    }
}

impl Db {
    /// The store's use of `db`: kept when it is a SQLite pool of one
    /// connection.
    pub fn new(db: DatabaseConnection) -> Self {
        let one = db.get_database_backend() == DbBackend::Sqlite
            && db
                .get_sqlite_connection_pool()
                .options()
                .get_max_connections()
                == 1;
        if one {
            Self::Kept(Kept {
                writer: One {
                    pool: db,
                    slot: Arc::default(),
                },
                reader: Arc::default(),
            })
        } else {
            Self::Pool(db)
        }
    }

    /// The pool itself, for its options (and PostgreSQL's writers, which
    /// keep connections of their own). While the store keeps the
    /// connection, a statement sent through the pool waits for it (sqlx's
    /// acquire timeout) and fails: statements go through the [`Db`]. For the same
    /// reason one pool of one SQLite connection serves one [`Db`] (one
    /// `Store` and its clones).
    pub fn pool(&self) -> &DatabaseConnection {
        match self {
            Self::Pool(db) => db,
            Self::Kept(k) => &k.writer.pool,
        }
    }

    /// Whether the database answers.
    pub async fn ping(&self) -> Result<(), DbErr> {
        match self {
            Self::Pool(db) => db.ping().await,
            Self::Kept(k) => {
                let mut lease = k.writer.lease().await?;
                let r = sqlx::Connection::ping(lease.conn()).await;
                lease.settle(&r);
                r.map_err(|e| DbErr::Conn(RuntimeErr::SqlxError(Arc::new(e))))
            }
        }
    }

    /// Begins a transaction, ended by [`Txn::commit`], or rolled back when
    /// dropped.
    pub async fn begin(&self) -> Result<Txn, DbErr> {
        match self {
            Self::Pool(db) => Ok(Txn(Tx::Pool(db.begin().await?))),
            Self::Kept(k) => {
                let mut lease = k.writer.lease().await?;
                let r = SqliteTransactionManager::begin(lease.conn(), None).await;
                lease.settle(&r);
                r.map_err(query_error)?;
                Ok(Txn(Tx::Kept(Mutex::new(KeptTxn {
                    lease: Some(lease),
                    broken: false,
                }))))
            }
        }
    }

    /// A SQLite connection for statements of the caller's own: the kept
    /// one, or one of the pool's. `None` on PostgreSQL.
    pub(crate) async fn sqlite(&self) -> Option<Result<Lease, DbErr>> {
        match self {
            Self::Kept(k) => Some(k.writer.lease().await),
            Self::Pool(db) if db.get_database_backend() == DbBackend::Sqlite => Some(
                db.get_sqlite_connection_pool()
                    .acquire()
                    .await
                    .map(|c| Lease(Leased::Pooled(Some(c))))
                    .map_err(acquire_error),
            ),
            Self::Pool(_) => None,
        }
    }

    /// Runs `f` as one use of a SQLite connection of the store (the kept
    /// one, or one of the pool's), for tests and diagnostics that read
    /// what the connection holds. `None` on PostgreSQL.
    #[doc(hidden)]
    pub async fn on_sqlite<R>(
        &self,
        f: impl for<'c> FnOnce(&'c mut SqliteConnection) -> OnConn<'c, R>,
    ) -> Option<Result<R, DbErr>> {
        Some(on_lease(self.sqlite().await?, f).await)
    }

    /// As [`Db::on_sqlite`], on the embedded default's reader (see the
    /// module's documentation). `None` where there is none, or none yet.
    #[doc(hidden)]
    pub async fn on_sqlite_reader<R>(
        &self,
        f: impl for<'c> FnOnce(&'c mut SqliteConnection) -> OnConn<'c, R>,
    ) -> Option<Result<R, DbErr>> {
        match self {
            Self::Kept(k) => Some(on_lease(k.reader_lease().await?, f).await),
            Self::Pool(_) => None,
        }
    }
}

/// What a function given a store's SQLite connection by
/// [`Db::on_sqlite`] or [`Db::on_sqlite_reader`] returns: its work on the
/// connection.
type OnConn<'c, R> = std::pin::Pin<Box<dyn Future<Output = R> + Send + 'c>>;

/// Runs `f` as one use of `lease`'s connection.
async fn on_lease<R>(
    lease: Result<Lease, DbErr>,
    f: impl for<'c> FnOnce(&'c mut SqliteConnection) -> OnConn<'c, R>,
) -> Result<R, DbErr> {
    let mut lease = lease?;
    let r = f(lease.conn()).await;
    lease.settle(&Ok(()));
    Ok(r)
}

impl Kept {
    /// The reader, once a read has opened it.
    async fn reader_lease(&self) -> Option<Result<Lease, DbErr>> {
        match self.reader.get() {
            Some(Some(reader)) => Some(reader.lease().await),
            _ => None,
        }
    }

    /// The connection for `sql`, a statement outside a transaction: the
    /// reader for a `SELECT` when there is one, else the writer.
    ///
    /// The reader is decided once the database has answered: a database
    /// not in WAL mode never gets one. A reader that cannot be opened, or
    /// no longer can, costs nothing but a warning: the read takes the
    /// writer, which is always right, and a later read tries the reader
    /// again.
    async fn lease_for(&self, sql: &str) -> Result<Lease, DbErr> {
        if !is_select(sql) {
            return self.writer.lease().await;
        }
        let reader = match self.reader.get_or_try_init(|| self.open_reader()).await {
            Ok(Some(reader)) => reader,
            Ok(None) => return self.writer.lease().await,
            Err(e) => {
                warn!(error = %e, "SQLite's read-only connection did not open; this read runs on the writer");
                return self.writer.lease().await;
            }
        };
        match reader.lease().await {
            Ok(lease) => Ok(lease),
            Err(e) => {
                warn!(error = %e, "SQLite's read-only connection is unavailable; this read runs on the writer");
                self.writer.lease().await
            }
        }
    }

    /// The reader, if the database is in write-ahead logging mode (in any
    /// other a reader would wait for the writer): a read-only connection
    /// opened with the writer's options, which says the database's mode
    /// (a database in memory says "memory"). An error: it did not open.
    async fn open_reader(&self) -> Result<Option<One>, DbErr> {
        let writer = self.writer.pool.get_sqlite_connection_pool();
        let options = (*writer.connect_options()).clone().read_only(true);
        let pool = sqlx::sqlite::SqlitePoolOptions::new()
            .max_connections(1)
            .acquire_timeout(writer.options().get_acquire_timeout())
            .connect_lazy_with(options);
        let reader = One {
            pool: sea_orm::SqlxSqliteConnector::from_sqlx_sqlite_pool(pool),
            slot: Arc::default(),
        };
        let mode = query_one(
            &mut reader.lease().await?,
            Statement::from_string(DbBackend::Sqlite, "PRAGMA journal_mode"),
        )
        .await?
        .map(|r| r.try_get_by_index::<String>(0))
        .transpose()?;
        if mode
            .as_deref()
            .is_some_and(|m| m.eq_ignore_ascii_case("wal"))
        {
            return Ok(Some(reader));
        }
        debug!(
            ?mode,
            "SQLite reads stay on the one connection: the database is not in WAL mode"
        );
        Ok(None)
    }
}

/// Whether `sql` is a read the reader can run: a `SELECT` (a statement
/// that begins otherwise, `WITH` included, goes to the writer).
fn is_select(sql: &str) -> bool {
    sql.trim_start()
        .get(..6)
        .is_some_and(|w| w.eq_ignore_ascii_case("select"))
}

impl One {
    /// The connection, once the uses before this one are done (waiting at
    /// most the pool's acquire timeout, as a pool of one would).
    async fn lease(&self) -> Result<Lease, DbErr> {
        let pool = self.pool.get_sqlite_connection_pool();
        let deadline = tokio::time::Instant::now() + pool.options().get_acquire_timeout();
        let timed_out = |_| DbErr::ConnectionAcquire(ConnAcquireErr::Timeout);
        let mut slot = tokio::time::timeout_at(deadline, self.slot.clone().lock_owned())
            .await
            .map_err(timed_out)?;
        if slot.0.is_none() {
            let conn = tokio::time::timeout_at(deadline, pool.acquire())
                .await
                .map_err(timed_out)?;
            slot.0 = Some(conn.map_err(acquire_error)?);
        }
        Ok(Lease(Leased::Kept { slot, fine: false }))
    }
}

fn acquire_error(e: sqlx::Error) -> DbErr {
    match e {
        sqlx::Error::PoolTimedOut => DbErr::ConnectionAcquire(ConnAcquireErr::Timeout),
        sqlx::Error::PoolClosed => DbErr::ConnectionAcquire(ConnAcquireErr::ConnectionClosed),
        e => DbErr::Conn(RuntimeErr::SqlxError(Arc::new(e))),
    }
}

fn query_error(e: sqlx::Error) -> DbErr {
    DbErr::Query(RuntimeErr::SqlxError(Arc::new(e)))
}

fn exec_error(e: sqlx::Error) -> DbErr {
    DbErr::Exec(RuntimeErr::SqlxError(Arc::new(e)))
}

/// One use of a SQLite connection. Dropped before [`Lease::settle`] said
/// the use ended well, a kept connection goes back to the pool instead of
/// its slot (see the module's documentation).
pub(crate) struct Lease(Leased);

enum Leased {
    Kept {
        slot: OwnedMutexGuard<Slot>,
        fine: bool,
    },
    /// A connection of a pool of several (`None` once closed).
    Pooled(Option<PoolConnection<Sqlite>>),
}

impl Lease {
    pub(crate) fn conn(&mut self) -> &mut SqliteConnection {
        let conn = match &mut self.0 {
            Leased::Kept { slot, fine } => {
                *fine = false;
                slot.0.as_mut()
            }
            Leased::Pooled(conn) => conn.as_mut(),
        };
        conn.expect("a lease holds its connection until it ends")
    }

    /// After a use: the connection stays in its slot unless the use failed
    /// for other than the database's refusal of a statement.
    fn settle<T>(&mut self, r: &Result<T, sqlx::Error>) {
        if let Leased::Kept { fine, .. } = &mut self.0 {
            *fine = matches!(r, Ok(_) | Err(sqlx::Error::Database(_)));
        }
    }

    /// Closes the connection (the pool opens another when next asked).
    async fn close(mut self) {
        let conn = match &mut self.0 {
            Leased::Kept { slot, .. } => slot.0.take(),
            Leased::Pooled(conn) => conn.take(),
        };
        if let Some(conn) = conn {
            let _ = conn.close().await;
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let Leased::Kept { slot, fine: false } = &mut self.0 else {
            return;
        };
        if let Some(conn) = slot.0.take() {
            give_back(conn);
        }
    }
}

fn query_with(sql: &str, values: Vec<Value>) -> sqlx::query::Query<'_, Sqlite, SqlxValues> {
    sqlx::query_with(sqlx::AssertSqlSafe(sql), SqlxValues(Values(values)))
}

fn statement_parts(stmt: Statement) -> (String, Vec<Value>) {
    (stmt.sql, stmt.values.map(|v| v.0).unwrap_or_default())
}

/// One use of the kept connection: a [`Lease`] of its own, or a
/// [`KeptTxn`]'s, which each decide from how it ended what becomes of the
/// connection.
trait Use: Send {
    fn conn(&mut self) -> &mut SqliteConnection;
    fn settle<T>(&mut self, r: &Result<T, sqlx::Error>);
}

impl Use for Lease {
    fn conn(&mut self) -> &mut SqliteConnection {
        Lease::conn(self)
    }

    fn settle<T>(&mut self, r: &Result<T, sqlx::Error>) {
        Lease::settle(self, r)
    }
}

impl Use for KeptTxn {
    fn conn(&mut self) -> &mut SqliteConnection {
        KeptTxn::conn(self)
    }

    fn settle<T>(&mut self, r: &Result<T, sqlx::Error>) {
        KeptTxn::settle(self, r)
    }
}

// sea-orm's statements on the kept connection, with the results and error
// kinds its SQLite driver gives on a pooled one. (A row that may be absent
// is fetched as optional, where sea-orm fetches one and turns sqlx's
// `RowNotFound` into `None`: that error is not the database's, and would
// give the connection back.)

async fn execute(u: &mut impl Use, stmt: Statement) -> Result<ExecResult, DbErr> {
    let (sql, values) = statement_parts(stmt);
    let r = query_with(&sql, values).execute(u.conn()).await;
    u.settle(&r);
    r.map(ExecResult::from).map_err(exec_error)
}

async fn execute_unprepared(u: &mut impl Use, sql: &str) -> Result<ExecResult, DbErr> {
    let r = sqlx::Executor::execute(u.conn(), sqlx::AssertSqlSafe(sql.to_owned())).await;
    u.settle(&r);
    r.map(ExecResult::from).map_err(exec_error)
}

async fn query_one(u: &mut impl Use, stmt: Statement) -> Result<Option<QueryResult>, DbErr> {
    let (sql, values) = statement_parts(stmt);
    let r = query_with(&sql, values).fetch_optional(u.conn()).await;
    u.settle(&r);
    r.map(|row| row.map(QueryResult::from)).map_err(query_error)
}

async fn query_all(u: &mut impl Use, stmt: Statement) -> Result<Vec<QueryResult>, DbErr> {
    let (sql, values) = statement_parts(stmt);
    let r = query_with(&sql, values).fetch_all(u.conn()).await;
    u.settle(&r);
    r.map(|rows| rows.into_iter().map(QueryResult::from).collect())
        .map_err(query_error)
}

#[async_trait::async_trait]
impl ConnectionTrait for Db {
    fn get_database_backend(&self) -> DbBackend {
        match self {
            Self::Pool(db) => db.get_database_backend(),
            Self::Kept(_) => DbBackend::Sqlite,
        }
    }

    async fn execute_raw(&self, stmt: Statement) -> Result<ExecResult, DbErr> {
        match self {
            Self::Pool(db) => db.execute_raw(stmt).await,
            Self::Kept(k) => execute(&mut k.writer.lease().await?, stmt).await,
        }
    }

    async fn execute_unprepared(&self, sql: &str) -> Result<ExecResult, DbErr> {
        match self {
            Self::Pool(db) => db.execute_unprepared(sql).await,
            Self::Kept(k) => execute_unprepared(&mut k.writer.lease().await?, sql).await,
        }
    }

    async fn query_one_raw(&self, stmt: Statement) -> Result<Option<QueryResult>, DbErr> {
        match self {
            Self::Pool(db) => db.query_one_raw(stmt).await,
            Self::Kept(k) => query_one(&mut k.lease_for(&stmt.sql).await?, stmt).await,
        }
    }

    async fn query_all_raw(&self, stmt: Statement) -> Result<Vec<QueryResult>, DbErr> {
        match self {
            Self::Pool(db) => db.query_all_raw(stmt).await,
            Self::Kept(k) => query_all(&mut k.lease_for(&stmt.sql).await?, stmt).await,
        }
    }

    fn support_returning(&self) -> bool {
        self.pool().support_returning()
    }
}

/// A transaction on the store's database.
pub struct Txn(Tx);

enum Tx {
    Pool(DatabaseTransaction),
    Kept(Mutex<KeptTxn>),
}

/// A transaction on the kept connection, through sqlx's own transaction
/// commands (as sea-orm's transactions are): dropped before it ended, it
/// queues its rollback on the connection, ahead of any later use, as
/// sqlx's `Transaction` does. `lease` is `None` once ended; `broken`, once
/// a use failed for other than the database's refusal (the connection then
/// goes back to the pool, see [`Lease`]).
struct KeptTxn {
    lease: Option<Lease>,
    broken: bool,
}

impl KeptTxn {
    fn conn(&mut self) -> &mut SqliteConnection {
        self.lease
            .as_mut()
            .expect("a transaction holds its connection until it ends")
            .conn()
    }

    /// Notes how a use ended.
    fn settle<T>(&mut self, r: &Result<T, sqlx::Error>) {
        if matches!(r, Err(e) if !matches!(e, sqlx::Error::Database(_))) {
            self.broken = true;
        }
    }

    /// Ends the transaction: commits it, or rolls it back. On failure it
    /// is rolled back when dropped.
    async fn end(mut self, commit: bool) -> Result<(), DbErr> {
        let conn = self.conn();
        let r = if commit {
            SqliteTransactionManager::commit(conn).await
        } else {
            SqliteTransactionManager::rollback(conn).await
        };
        self.settle(&r);
        r.map_err(query_error)?;
        if let Some(mut lease) = self.lease.take()
            && !self.broken
        {
            lease.settle(&Ok(()));
        }
        Ok(())
    }
}

impl Drop for KeptTxn {
    fn drop(&mut self) {
        if let Some(mut lease) = self.lease.take() {
            SqliteTransactionManager::start_rollback(lease.conn());
            if !self.broken {
                lease.settle(&Ok(()));
            }
        }
    }
}

impl Txn {
    pub async fn commit(self) -> Result<(), DbErr> {
        match self.0 {
            Tx::Pool(txn) => txn.commit().await,
            Tx::Kept(t) => t.into_inner().end(true).await,
        }
    }

    pub async fn rollback(self) -> Result<(), DbErr> {
        match self.0 {
            Tx::Pool(txn) => txn.rollback().await,
            Tx::Kept(t) => t.into_inner().end(false).await,
        }
    }
}

#[async_trait::async_trait]
impl ConnectionTrait for Txn {
    fn get_database_backend(&self) -> DbBackend {
        match &self.0 {
            Tx::Pool(txn) => txn.get_database_backend(),
            Tx::Kept(_) => DbBackend::Sqlite,
        }
    }

    async fn execute_raw(&self, stmt: Statement) -> Result<ExecResult, DbErr> {
        match &self.0 {
            Tx::Pool(txn) => txn.execute_raw(stmt).await,
            Tx::Kept(t) => execute(&mut *t.lock().await, stmt).await,
        }
    }

    async fn execute_unprepared(&self, sql: &str) -> Result<ExecResult, DbErr> {
        match &self.0 {
            Tx::Pool(txn) => txn.execute_unprepared(sql).await,
            Tx::Kept(t) => execute_unprepared(&mut *t.lock().await, sql).await,
        }
    }

    async fn query_one_raw(&self, stmt: Statement) -> Result<Option<QueryResult>, DbErr> {
        match &self.0 {
            Tx::Pool(txn) => txn.query_one_raw(stmt).await,
            Tx::Kept(t) => query_one(&mut *t.lock().await, stmt).await,
        }
    }

    async fn query_all_raw(&self, stmt: Statement) -> Result<Vec<QueryResult>, DbErr> {
        match &self.0 {
            Tx::Pool(txn) => txn.query_all_raw(stmt).await,
            Tx::Kept(t) => query_all(&mut *t.lock().await, stmt).await,
        }
    }

    fn support_returning(&self) -> bool {
        match &self.0 {
            Tx::Pool(txn) => txn.support_returning(),
            Tx::Kept(_) => DbBackend::Sqlite.support_returning(),
        }
    }
}

/// A SQLite connection on which a transaction was begun by a statement of
/// ours, which sqlx does not know of: so it is ended here. A failed
/// command leaves it open, and [`Open::rollback`] ends it; dropped during
/// or between commands (a cancelled task), it is rolled back by a task
/// spawned for it, before its connection is used again.
pub(crate) struct Open(Option<Lease>);

impl Open {
    /// `lease`, on which a command of the caller will begin a transaction.
    pub(crate) fn new(lease: Lease) -> Self {
        Self(Some(lease))
    }

    fn conn(&mut self) -> &mut SqliteConnection {
        self.0
            .as_mut()
            .expect("the connection is held until the end")
            .conn()
    }

    /// Runs the statements `sql` (several, parted by `;`), binding
    /// `values` in order, and returns their rows.
    pub(crate) async fn run(
        &mut self,
        sql: String,
        values: Vec<Value>,
    ) -> Result<Vec<SqliteRow>, DbErr> {
        // Prepared and cached on the connection, as sea-orm's own queries
        // are.
        query_with(&sql, values)
            .fetch_all(self.conn())
            .await
            .map_err(query_error)
    }

    /// The transaction was committed by the caller's last command: the
    /// connection goes back.
    pub(crate) fn committed(mut self) {
        if let Some(mut lease) = self.0.take() {
            lease.settle(&Ok(()));
        }
    }

    /// Ends the transaction after `e`, and returns `e`. (Dropped while it
    /// waits, the guard still holds the connection and rolls back again.)
    pub(crate) async fn rollback<E>(mut self, e: E) -> E {
        if let Some(lease) = self.0.as_mut()
            && !rollback(lease).await
            && let Some(lease) = self.0.take()
        {
            lease.close().await;
        }
        self.0 = None;
        e
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        let Some(mut lease) = self.0.take() else {
            return;
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move {
                    if !rollback(&mut lease).await {
                        lease.close().await;
                    }
                });
            }
            // No runtime (the process is ending): nothing can run the
            // rollback, and sqlx's pool needs a runtime even to take a
            // connection back. The connection is left as it is; SQLite
            // discards the uncommitted transaction when the process exits.
            Err(_) => std::mem::forget(lease),
        }
    }
}

/// Rolls back the transaction open on `lease` (if a failed statement has
/// not ended it already). `false`: it could not, and the caller closes
/// the connection, so that no later user finds the transaction open.
async fn rollback(lease: &mut Lease) -> bool {
    let r = sqlx::raw_sql(sqlx::AssertSqlSafe("ROLLBACK"))
        .execute(lease.conn())
        .await;
    match r {
        Ok(_) => {}
        Err(sqlx::Error::Database(e)) if e.message().contains("no transaction is active") => {}
        Err(e) => {
            warn!(error = %e, "rolling back a SQLite transaction failed; closing its connection");
            return false;
        }
    }
    lease.settle(&Ok(()));
    true
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// A store's use of a fresh SQLite file opened as the embedded default
    /// opens it (one connection), with a table `t`.
    async fn kept() -> (tempfile::TempDir, Db) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}?mode=rwc", dir.path().join("t.db").display());
        let db = Db::new(crate::store::connect(&url, 1).await.unwrap());
        assert!(matches!(db, Db::Kept(_)));
        db.execute_unprepared("CREATE TABLE t (n INTEGER PRIMARY KEY)")
            .await
            .unwrap();
        (dir, db)
    }

    /// (connections open, of which idle in the pool), once a connection
    /// given back has had the time to arrive (sqlx pings it first).
    async fn in_pool(db: &Db) -> (u32, usize) {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let pool = db.pool().get_sqlite_connection_pool();
        (pool.size(), pool.num_idle())
    }

    fn insert(n: i64) -> Statement {
        Statement::from_sql_and_values(
            DbBackend::Sqlite,
            "INSERT INTO t (n) VALUES (?)",
            [n.into()],
        )
    }

    async fn rows(db: &Db) -> Vec<i64> {
        rows_on(db).await
    }

    /// The rows, read through `c`.
    async fn rows_on(c: &impl ConnectionTrait) -> Vec<i64> {
        c.query_all_raw(Statement::from_string(
            DbBackend::Sqlite,
            "SELECT n FROM t ORDER BY n",
        ))
        .await
        .unwrap()
        .iter()
        .map(|r| r.try_get("", "n").unwrap())
        .collect()
    }

    /// The rows as the writer sees them, in a transaction of its own (so
    /// once the writer's earlier uses, a rollback included, are done):
    /// `rows` reads on the reader, which never sees uncommitted rows.
    async fn written(db: &Db) -> Vec<i64> {
        let txn = db.begin().await.unwrap();
        let rows = rows_on(&txn).await;
        txn.commit().await.unwrap();
        rows
    }

    /// A second or so of counting.
    fn slow() -> Statement {
        Statement::from_string(
            DbBackend::Sqlite,
            "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 10000000) \
             SELECT count(*) FROM c",
        )
    }

    /// Between uses the connection stays with the store, not in the pool,
    /// also after a statement the database refused.
    #[tokio::test]
    async fn the_connection_stays_kept_between_uses() {
        let (_dir, db) = kept().await;
        db.execute_raw(insert(1)).await.unwrap();
        let refused = db.execute_raw(insert(1)).await.unwrap_err();
        assert!(refused.to_string().contains("UNIQUE"), "{refused}");
        assert_eq!(in_pool(&db).await, (1, 0));
        assert_eq!(rows(&db).await, [1]);
        db.ping().await.unwrap();
        assert_eq!(in_pool(&db).await, (1, 0));
        // A pool of several is used as a pool.
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}?mode=rwc", dir.path().join("t.db").display());
        let several = Db::new(crate::store::connect(&url, 2).await.unwrap());
        assert!(matches!(several, Db::Pool(_)));
        several.ping().await.unwrap();
        // The pool takes a connection back in a task of its own.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let (open, idle) = in_pool(&several).await;
            if open >= 1 && idle == open as usize {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{open} open, {idle} idle"
            );
        }
    }

    /// A use dropped unfinished (its task cancelled during a statement)
    /// gives the connection back to the pool, which takes it once the
    /// statement is over; the next use takes it from there.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_use_dropped_unfinished_gives_the_connection_back() {
        let (_dir, db) = kept().await;
        let cut = tokio::time::timeout(Duration::from_millis(50), db.query_all_raw(slow())).await;
        assert!(cut.is_err(), "the statement ended within 50 ms");
        let mut waited = 0;
        while in_pool(&db).await != (1, 1) {
            waited += 1;
            assert!(waited < 600, "the connection did not go back to the pool");
        }
        db.execute_raw(insert(2)).await.unwrap();
        assert_eq!(rows(&db).await, [2]);
        assert_eq!(in_pool(&db).await, (1, 0));
    }

    /// A transaction commits, rolls back, or, dropped before it ended, is
    /// rolled back before the connection's next use.
    #[tokio::test]
    async fn a_transaction_commits_or_is_rolled_back() {
        let (_dir, db) = kept().await;
        let txn = db.begin().await.unwrap();
        txn.execute_raw(insert(1)).await.unwrap();
        txn.commit().await.unwrap();
        let txn = db.begin().await.unwrap();
        txn.execute_raw(insert(2)).await.unwrap();
        txn.rollback().await.unwrap();
        let txn = db.begin().await.unwrap();
        txn.execute_raw(insert(3)).await.unwrap();
        assert_eq!(
            txn.query_all_raw(Statement::from_string(DbBackend::Sqlite, "SELECT n FROM t"))
                .await
                .unwrap()
                .len(),
            2
        );
        drop(txn);
        assert_eq!(in_pool(&db).await, (1, 0));
        assert_eq!(written(&db).await, [1]);
        // None is left open: another begins, and the connection stays.
        let txn = db.begin().await.unwrap();
        txn.execute_raw(insert(4)).await.unwrap();
        txn.commit().await.unwrap();
        assert_eq!(rows(&db).await, [1, 4]);
        assert_eq!(in_pool(&db).await, (1, 0));
    }

    /// A `SELECT` outside a transaction runs on the reader: it neither
    /// waits for a transaction open on the writer nor sees its rows, and
    /// sees them once committed; inside the transaction, a read is the
    /// transaction's.
    #[tokio::test]
    async fn reads_run_beside_the_writer() {
        let (_dir, db) = kept().await;
        db.execute_raw(insert(1)).await.unwrap();
        let txn = db.begin().await.unwrap();
        txn.execute_raw(insert(2)).await.unwrap();
        let beside = tokio::time::timeout(Duration::from_secs(20), rows(&db))
            .await
            .expect("the read waited for the writer's transaction");
        assert_eq!(beside, [1]);
        let inside = txn
            .query_all_raw(Statement::from_string(DbBackend::Sqlite, "SELECT n FROM t"))
            .await
            .unwrap();
        assert_eq!(inside.len(), 2);
        txn.commit().await.unwrap();
        assert_eq!(rows(&db).await, [1, 2]);
        // A statement that returns rows but writes goes to the writer.
        let returned = db
            .query_all_raw(Statement::from_string(
                DbBackend::Sqlite,
                "INSERT INTO t (n) VALUES (3) RETURNING n",
            ))
            .await
            .unwrap();
        assert_eq!(returned.len(), 1);
        assert_eq!(rows(&db).await, [1, 2, 3]);
    }

    /// A read on the reader dropped unfinished (its task cancelled) gives
    /// the reader's connection back to its pool, as the writer's would;
    /// the next read takes it from there.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_read_dropped_unfinished_gives_the_reader_back() {
        let (_dir, db) = kept().await;
        db.execute_raw(insert(1)).await.unwrap();
        assert_eq!(rows(&db).await, [1]);
        let Db::Kept(k) = &db else { unreachable!() };
        let reader = k
            .reader
            .get()
            .unwrap()
            .as_ref()
            .expect("a reader")
            .pool
            .clone();
        let slow = Statement::from_string(
            DbBackend::Sqlite,
            "SELECT count(*) FROM (WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL \
             SELECT x + 1 FROM c WHERE x < 10000000) SELECT x FROM c)",
        );
        let cut = tokio::time::timeout(Duration::from_millis(50), db.query_all_raw(slow)).await;
        assert!(cut.is_err(), "the statement ended within 50 ms");
        let pool = reader.get_sqlite_connection_pool();
        let mut waited = 0;
        while (pool.size(), pool.num_idle()) != (1, 1) {
            tokio::time::sleep(Duration::from_millis(50)).await;
            waited += 1;
            assert!(waited < 600, "the reader did not go back to its pool");
        }
        // The writer was not involved, and the reader reads again.
        assert_eq!(in_pool(&db).await, (1, 0));
        assert_eq!(rows(&db).await, [1]);
        assert_eq!((pool.size(), pool.num_idle()), (1, 0));
    }

    /// A reader that can no longer be had (its connection gone and its
    /// pool closed) sends reads to the writer instead of failing them.
    #[tokio::test]
    async fn a_read_without_its_reader_runs_on_the_writer() {
        let (_dir, db) = kept().await;
        db.execute_raw(insert(1)).await.unwrap();
        assert_eq!(rows(&db).await, [1]);
        let Db::Kept(k) = &db else { unreachable!() };
        let reader = k.reader.get().unwrap().as_ref().expect("a reader");
        if let Some(conn) = reader.slot.lock().await.0.take() {
            conn.close().await.unwrap();
        }
        reader.pool.get_sqlite_connection_pool().close().await;
        db.execute_raw(insert(2)).await.unwrap();
        assert_eq!(rows(&db).await, [1, 2]);
        assert!(reader.lease().await.is_err(), "the reader is still there");
    }

    /// The reader is read-only: a write on it is refused, not run beside
    /// the writer.
    #[tokio::test]
    async fn the_reader_refuses_writes() {
        let (_dir, db) = kept().await;
        let Db::Kept(k) = &db else { unreachable!() };
        let mut lease = k.lease_for("SELECT n FROM t").await.unwrap();
        let refused = execute(&mut lease, insert(1)).await.unwrap_err();
        assert!(refused.to_string().contains("readonly"), "{refused}");
        drop(lease);
        assert!(rows(&db).await.is_empty());
    }

    /// A database not in write-ahead logging mode (here in memory) has no
    /// reader: reads run on its one connection.
    #[tokio::test]
    async fn a_database_in_memory_reads_on_its_one_connection() {
        let db = Db::new(crate::store::connect("sqlite::memory:", 1).await.unwrap());
        let Db::Kept(k) = &db else { panic!("not kept") };
        db.execute_unprepared("CREATE TABLE t (n INTEGER PRIMARY KEY)")
            .await
            .unwrap();
        db.execute_raw(insert(1)).await.unwrap();
        assert_eq!(rows(&db).await, [1]);
        assert!(k.reader.get().is_some_and(Option::is_none));
    }

    #[test]
    fn only_a_select_is_a_read() {
        for sql in ["SELECT 1", "  select n FROM t", "Select\n1"] {
            assert!(is_select(sql), "{sql}");
        }
        for sql in [
            "",
            "SEL",
            "WITH c AS (SELECT 1) SELECT * FROM c",
            "INSERT INTO t (n) VALUES (1) RETURNING n",
            "UPDATE t SET n = 1 RETURNING *",
            "PRAGMA journal_mode",
            "BEGIN; SELECT 1",
        ] {
            assert!(!is_select(sql), "{sql}");
        }
    }

    /// A transaction dropped during one of its statements (its task
    /// cancelled) is rolled back once that statement is over, before the
    /// connection's next use.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_transaction_dropped_during_a_statement_is_rolled_back() {
        let (_dir, db) = kept().await;
        let txn = db.begin().await.unwrap();
        txn.execute_raw(insert(1)).await.unwrap();
        let cut = tokio::time::timeout(Duration::from_millis(50), txn.query_all_raw(slow())).await;
        assert!(cut.is_err(), "the statement ended within 50 ms");
        drop(txn);
        assert!(written(&db).await.is_empty());
        db.execute_raw(insert(2)).await.unwrap();
        assert_eq!(rows(&db).await, [2]);
    }
}
