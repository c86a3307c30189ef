//! The schema's migrations on each database: the latest ones go down and
//! up again, and what they changed holds.

use migration::{Migrator, MigratorTrait};
use sea_orm::{ConnectionTrait, DatabaseBackend, DatabaseConnection, Statement};

use crate::{backend_tests, helpers::TestDb};

backend_tests!(partial_indexes_go_down_and_up_and_keep_keys_unique);

/// The indexes `m0007_partial_indexes` made partial (`m0008` one more).
const PARTIAL: [&str; 3] = [
    "uq_webhooks_tenant_idempotency",
    "idx_webhooks_status_next_attempt",
    "idx_webhooks_status_next_check",
];

/// The index's definition as the database prints it.
async fn definition(conn: &DatabaseConnection, name: &str) -> String {
    let sql = match conn.get_database_backend() {
        DatabaseBackend::Postgres => "SELECT indexdef AS def FROM pg_indexes WHERE indexname = $1",
        _ => "SELECT sql AS def FROM sqlite_master WHERE type = 'index' AND name = $1",
    };
    let row = conn
        .query_one_raw(Statement::from_sql_and_values(
            conn.get_database_backend(),
            sql,
            [name.into()],
        ))
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("index {name} is missing"));
    row.try_get::<String>("", "def").unwrap()
}

async fn assert_partial(conn: &DatabaseConnection, partial: bool) {
    for name in PARTIAL {
        let def = definition(conn, name).await;
        assert_eq!(def.contains(" IS NOT NULL"), partial, "{name}: {def}");
    }
    // `m0008_object_key_index`: PENDING AUTO webhooks only.
    let def = definition(conn, "idx_webhooks_object_key").await;
    assert_eq!(
        def.contains("'pending'") && def.contains("'auto'"),
        partial,
        "{def}"
    );
}

/// Inserts a webhook row of tenant `tn_a` with this idempotency key.
async fn insert(
    conn: &DatabaseConnection,
    id: &str,
    key: Option<&str>,
) -> Result<(), sea_orm::DbErr> {
    let key = key.map_or("NULL".to_string(), |k| format!("'{k}'"));
    conn.execute_unprepared(&format!(
        "INSERT INTO webhooks (id, tenant_id, status, \"trigger\", provider, storage, bucket, \
         object_key, filename, content_type, url, secret, secret_generated, metadata, \
         attempt_count, attempt_base, verify_attempts, created_at, updated_at, expires_at, \
         priority, check_count, idempotency_key) VALUES ('{id}', 'tn_a', 'pending', 'manual', \
         's3', 'main', 'b', 'k/{id}', 'f.txt', 'text/plain', 'https://example.com/h', 's', \
         false, '{{}}', 0, 0, 0, '2026-12-06T00:00:00Z', '2026-12-06T00:00:00Z', \
         '2026-12-07T00:00:00Z', 'normal', 0, {key})"
    ))
    .await
    .map(|_| ())
}

async fn partial_indexes_go_down_and_up_and_keep_keys_unique(db: &TestDb) {
    // Connected as the service connects (a pool, WAL on SQLite).
    let conn = uploadhook::store::connect(&db.url, 4).await.unwrap();
    Migrator::up(&conn, None).await.unwrap();
    assert_partial(&conn, true).await;
    // Down to just before migration 7, however many came after it.
    let after_m0006 = Migrator::migrations().len() - 6;
    Migrator::down(&conn, Some(after_m0006 as u32))
        .await
        .unwrap();
    assert_partial(&conn, false).await;
    Migrator::up(&conn, None).await.unwrap();
    assert_partial(&conn, true).await;

    // Keys stay unique per tenant; webhooks without a key never collide.
    conn.execute_unprepared(
        "INSERT INTO tenants (id, name, created_at) VALUES ('tn_a', 'a', '2026-12-06T00:00:00Z')",
    )
    .await
    .unwrap();
    insert(&conn, "wh_1", None).await.unwrap();
    insert(&conn, "wh_2", None).await.unwrap();
    insert(&conn, "wh_3", Some("order-7")).await.unwrap();
    let dup = insert(&conn, "wh_4", Some("order-7")).await;
    assert!(dup.is_err(), "a second webhook with key order-7 was stored");
    conn.close().await.unwrap();
}
