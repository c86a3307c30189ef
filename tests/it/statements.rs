//! The embedded database's statements, as SQLite runs them.

use std::ffi::CStr;

use sea_orm::sqlx::sqlite::SqlitePool;
use uploadhook::proto::Status;

use crate::helpers::{Backend, Receiver, TestApp, TestDb, create_confirmed, wait_for};

/// Each prepared statement on the connection: its SQL, how often it ran
/// and how often SQLite compiled it again.
async fn statements(pool: &SqlitePool) -> Vec<(String, i32, i32)> {
    let mut conn = pool.acquire().await.unwrap();
    let mut handle = conn.lock_handle().await.unwrap();
    let db = handle.as_raw_handle().as_ptr();
    let mut out = Vec::new();
    // SAFETY: the handle is locked for us (no other statement runs on the
    // connection meanwhile); the loop only reads each statement's SQL and
    // counters.
    unsafe {
        let mut stmt = libsqlite3_sys::sqlite3_next_stmt(db, std::ptr::null_mut());
        while !stmt.is_null() {
            let sql = CStr::from_ptr(libsqlite3_sys::sqlite3_sql(stmt))
                .to_string_lossy()
                .into_owned();
            let runs =
                libsqlite3_sys::sqlite3_stmt_status(stmt, libsqlite3_sys::SQLITE_STMTSTATUS_RUN, 0);
            let reprepared = libsqlite3_sys::sqlite3_stmt_status(
                stmt,
                libsqlite3_sys::SQLITE_STMTSTATUS_REPREPARE,
                0,
            );
            out.push((sql, runs, reprepared));
            stmt = libsqlite3_sys::sqlite3_next_stmt(db, stmt);
        }
    }
    out
}

/// A statement that runs again and again is compiled once. SQLite
/// compiles one again before each run when a bound value may change its
/// plan (a bound `LIMIT`, as sea-orm's `one()` writes), which made the
/// embedded default's reads by id cost a compile each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_statements_are_not_compiled_again() {
    let db = TestDb::new(Backend::Sqlite).await.unwrap();
    let mut app = TestApp::start(&db, "").await;
    let rx = Receiver::start().await;
    // One at a time, so that the worker reads each row on its own and
    // GetStatus polls by id.
    for i in 0..10 {
        let id = create_confirmed(&app, &rx.url, &format!("f{i}.txt")).await;
        wait_for(&app, &app.key_a, &id, Status::Completed).await;
    }
    let pool = app.store().db().get_sqlite_connection_pool().clone();
    let stmts = statements(&pool).await;
    app.stop().await;
    let by_id = stmts
        .iter()
        .filter(|(sql, _, _)| sql.contains(r#"FROM "webhooks" WHERE "webhooks"."id" = ?"#))
        .map(|(_, runs, _)| runs)
        .sum::<i32>();
    assert!(by_id >= 20, "the webhook was read by id {by_id} times");
    let again: Vec<_> = stmts
        .iter()
        .filter(|(sql, runs, reprepared)| {
            // The migrations change the schema between their statements.
            *runs >= 5 && *reprepared > 0 && !sql.contains("seaql_migrations")
        })
        .collect();
    assert!(
        again.is_empty(),
        "compiled again (sql, runs, compiles): {again:#?}"
    );
}
