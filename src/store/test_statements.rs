//! Tests only: the prepared statements of a SQLite connection, as SQLite
//! counts them. Shared with the integration tests (`#[path]`).

use std::ffi::CStr;

use sea_orm::sqlx::SqliteConnection;

/// One prepared statement on the connection.
#[derive(Debug)]
pub struct Prepared {
    pub sql: String,
    /// How often it ran.
    pub runs: i32,
    /// How often SQLite compiled it again before a run.
    pub recompiled: i32,
}

/// Each prepared statement on `conn` (one of a store's kept connections:
/// see `Db::on_sqlite` for the writer's, `Db::on_sqlite_reader` for the
/// reader's).
pub async fn statements(conn: &mut SqliteConnection) -> Vec<Prepared> {
    let mut handle = conn.lock_handle().await.unwrap();
    let db = handle.as_raw_handle().as_ptr();
    let mut out = Vec::new();
    // SAFETY: the handle is locked for us (no other statement runs on the
    // connection meanwhile); the loop only reads each statement's SQL and
    // counters.
    unsafe {
        let mut stmt = libsqlite3_sys::sqlite3_next_stmt(db, std::ptr::null_mut());
        while !stmt.is_null() {
            // Without the space and `;` that part it from the other
            // statements of a command of several.
            let sql = CStr::from_ptr(libsqlite3_sys::sqlite3_sql(stmt))
                .to_string_lossy()
                .trim()
                .trim_end_matches(';')
                .to_string();
            let count = |op| libsqlite3_sys::sqlite3_stmt_status(stmt, op, 0);
            out.push(Prepared {
                sql,
                runs: count(libsqlite3_sys::SQLITE_STMTSTATUS_RUN),
                recompiled: count(libsqlite3_sys::SQLITE_STMTSTATUS_REPREPARE),
            });
            stmt = libsqlite3_sys::sqlite3_next_stmt(db, stmt);
        }
    }
    out
}
