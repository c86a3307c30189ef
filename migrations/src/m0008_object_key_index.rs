//! The object-key index holds only the webhooks a storage event can
//! detect: PENDING ones with the `AUTO` trigger.
//!
//! The index exists for one query, the lookup of a storage event's
//! webhooks (`Store::pending_auto_for_object`), which asks for exactly
//! those. Every status change of a webhook is a non-HOT update (the status
//! is indexed elsewhere), so the full index took an entry for each of a
//! webhook's row versions, about four per webhook, also for webhooks
//! confirmed by `Confirm` that no storage event ever looks up. Partial, it
//! takes entries only for an AUTO webhook's row versions while it is
//! PENDING (its insert, and each HEAD check, which sets `next_check_at`)
//! and none for the others, and stays as small as the set of webhooks
//! still waiting for their object. The predicate compares with constants, and so does the query
//! (`status = 'pending' AND "trigger" = 'auto'` written inline), so the
//! planner proves it with a prepared statement's generic plan too.
//!
//! Rebuilt inside the migration's transaction, as `m0007`; on PostgreSQL
//! `DROP INDEX` locks `webhooks` until it commits.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Webhooks {
    Table,
    Status,
    Trigger,
    ObjectKey,
    Bucket,
}

const NAME: &str = "idx_webhooks_object_key";

async fn rebuild(m: &SchemaManager<'_>, partial: bool) -> Result<(), DbErr> {
    m.drop_index(Index::drop().name(NAME).table(Webhooks::Table).to_owned())
        .await?;
    let mut index = Index::create();
    index
        .name(NAME)
        .table(Webhooks::Table)
        .col(Webhooks::ObjectKey)
        .col(Webhooks::Bucket);
    if partial {
        index
            .and_where(Expr::col(Webhooks::Status).eq("pending"))
            .and_where(Expr::col(Webhooks::Trigger).eq("auto"));
    }
    m.create_index(index).await
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    /// One connection for the drop and the create (see `m0007`).
    fn use_transaction(&self) -> Option<bool> {
        Some(true)
    }

    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        rebuild(m, true).await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        rebuild(m, false).await
    }
}
