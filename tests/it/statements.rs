//! The embedded database's statements, as SQLite runs them.

use uploadhook::proto::Status;

use crate::{
    helpers::{Backend, Receiver, TestApp, TestDb, create_confirmed, wait_for},
    test_statements::statements,
};

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
    // The writer's statements, then the reader's (reads beside the writer).
    let db = app.store().db();
    let mut stmts = db
        .on_sqlite(|conn| Box::pin(statements(conn)))
        .await
        .unwrap()
        .unwrap();
    stmts.extend(
        db.on_sqlite_reader(|conn| Box::pin(statements(conn)))
            .await
            .expect("the reads ran on the reader")
            .unwrap(),
    );
    app.stop().await;
    let by_id = stmts
        .iter()
        .filter(|s| {
            s.sql
                .contains(r#"FROM "webhooks" WHERE "webhooks"."id" = ?"#)
        })
        .map(|s| s.runs)
        .sum::<i32>();
    assert!(by_id >= 20, "the webhook was read by id {by_id} times");
    let again: Vec<_> = stmts
        .iter()
        .filter(|s| {
            // The migrations change the schema between their statements.
            s.runs >= 5 && s.recompiled > 0 && !s.sql.contains("seaql_migrations")
        })
        .collect();
    assert!(again.is_empty(), "compiled again: {again:#?}");
}
