//! Detection without Confirm (AUTO trigger and storage events).
//!
//! - `next_check_at`: when an AUTO webhook's object is HEADed next; NULL
//!   when no check is owed (MANUAL, or past the last check before expiry).
//!   The reconciler re-creates lost check jobs from it, hence the index.
//! - `check_count`: checks made so far (the backoff position).
//! - `seen_etag` / `seen_size`: what the previous check saw, so that an
//!   object is taken as complete only once it is stable.
//! - An index on the object key, so that a storage event finds its
//!   webhooks without a scan.

use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Webhooks {
    Table,
    Status,
    NextCheckAt,
    CheckCount,
    SeenEtag,
    SeenSize,
    ObjectKey,
    Bucket,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        // SQLite takes one column per ALTER TABLE.
        let columns = [
            timestamp_with_time_zone_null(Webhooks::NextCheckAt),
            integer(Webhooks::CheckCount).default(0).to_owned(),
            string_null(Webhooks::SeenEtag),
            big_integer_null(Webhooks::SeenSize),
        ];
        for mut col in columns {
            m.alter_table(
                Table::alter()
                    .table(Webhooks::Table)
                    .add_column(&mut col)
                    .to_owned(),
            )
            .await?;
        }
        m.create_index(
            Index::create()
                .name("idx_webhooks_status_next_check")
                .table(Webhooks::Table)
                .col(Webhooks::Status)
                .col(Webhooks::NextCheckAt)
                .to_owned(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name("idx_webhooks_object_key")
                .table(Webhooks::Table)
                .col(Webhooks::ObjectKey)
                .col(Webhooks::Bucket)
                .to_owned(),
        )
        .await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        for name in ["idx_webhooks_object_key", "idx_webhooks_status_next_check"] {
            m.drop_index(Index::drop().name(name).table(Webhooks::Table).to_owned())
                .await?;
        }
        for col in [
            Webhooks::SeenSize,
            Webhooks::SeenEtag,
            Webhooks::CheckCount,
            Webhooks::NextCheckAt,
        ] {
            m.alter_table(
                Table::alter()
                    .table(Webhooks::Table)
                    .drop_column(col)
                    .to_owned(),
            )
            .await?;
        }
        Ok(())
    }
}
