//! Webhook rows decoded from the driver's row directly.
//!
//! sea-orm's derived decoder reads an optional column through its
//! non-optional type and turns the NULL error into `None`, so every NULL
//! column of every row first formats an error naming the column. A
//! webhook row has 41 columns, a dozen or more of them NULL on the hot
//! path, and rows are decoded for every write group's answer and every
//! batch of jobs a worker reads: session 19's call graphs put the decoding
//! at about 5 % of the worker's and the embedded process's CPU, a fifth of
//! it those errors. Here each column is read as the type sea-orm asks sqlx
//! for (`Option<T>` included), by name, so the values are the same; only
//! the NULL errors are gone. The struct literal names every field, so a
//! column added to the entity does not compile until it is read here too.

use sea_orm::{
    DbErr, FromQueryResult, QueryResult,
    sqlx::{Row, postgres::PgRow, sqlite::SqliteRow},
};

use super::{Webhook, webhooks::StoredSecret};

macro_rules! webhook_from {
    ($name:ident, $row:ty) => {
        fn $name(row: &$row) -> Result<Webhook, sea_orm::sqlx::Error> {
            Ok(Webhook {
                id: row.try_get("id")?,
                tenant_id: row.try_get("tenant_id")?,
                status: row.try_get("status")?,
                trigger: row.try_get("trigger")?,
                provider: row.try_get("provider")?,
                storage: row.try_get("storage")?,
                bucket: row.try_get("bucket")?,
                object_key: row.try_get("object_key")?,
                filename: row.try_get("filename")?,
                content_type: row.try_get("content_type")?,
                expected_size: row.try_get("expected_size")?,
                size: row.try_get("size")?,
                client_etag: row.try_get("client_etag")?,
                etag: row.try_get("etag")?,
                object_last_modified: row.try_get("object_last_modified")?,
                url: row.try_get("url")?,
                secret: StoredSecret(row.try_get("secret")?),
                secret_generated: row.try_get("secret_generated")?,
                secret_key_id: row.try_get("secret_key_id")?,
                previous_secret: row
                    .try_get::<Option<String>, _>("previous_secret")?
                    .map(StoredSecret),
                previous_secret_key_id: row.try_get("previous_secret_key_id")?,
                previous_secret_until: row.try_get("previous_secret_until")?,
                request_fingerprint: row.try_get("request_fingerprint")?,
                metadata: row.try_get("metadata")?,
                idempotency_key: row.try_get("idempotency_key")?,
                attempt_count: row.try_get("attempt_count")?,
                attempt_base: row.try_get("attempt_base")?,
                verify_attempts: row.try_get("verify_attempts")?,
                next_attempt_at: row.try_get("next_attempt_at")?,
                last_error: row.try_get("last_error")?,
                created_at: row.try_get("created_at")?,
                updated_at: row.try_get("updated_at")?,
                verified_at: row.try_get("verified_at")?,
                completed_at: row.try_get("completed_at")?,
                expires_at: row.try_get("expires_at")?,
                priority: row.try_get("priority")?,
                next_check_at: row.try_get("next_check_at")?,
                check_count: row.try_get("check_count")?,
                seen_etag: row.try_get("seen_etag")?,
                seen_size: row.try_get("seen_size")?,
                traceparent: row.try_get("traceparent")?,
            })
        }
    };
}

webhook_from!(from_postgres, PgRow);
webhook_from!(from_sqlite, SqliteRow);

/// The webhook in a row holding (at least) all of `webhooks`' columns.
pub(crate) fn webhook(r: &QueryResult) -> Result<Webhook, DbErr> {
    let decoded = if let Some(row) = r.try_as_pg_row() {
        from_postgres(row)
    } else if let Some(row) = r.try_as_sqlite_row() {
        from_sqlite(row)
    } else {
        return Webhook::from_query_result(r, "");
    };
    decoded.map_err(|e| DbErr::Type(format!("decoding a webhook row: {e}")))
}
