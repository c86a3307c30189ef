//! The trace a webhook belongs to (W3C `traceparent`), so that every job of
//! it continues one trace across the queue, retries and restarts.

use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Webhooks {
    Table,
    Traceparent,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.alter_table(
            Table::alter()
                .table(Webhooks::Table)
                .add_column(string_null(Webhooks::Traceparent))
                .to_owned(),
        )
        .await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.alter_table(
            Table::alter()
                .table(Webhooks::Table)
                .drop_column(Webhooks::Traceparent)
                .to_owned(),
        )
        .await
    }
}
