//! Who redrove a dead letter (`auto`, `api`, `cli`): a webhook is redriven
//! automatically at most once.

use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum DeadLetters {
    Table,
    RedrivenBy,
    CreatedAt,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.alter_table(
            Table::alter()
                .table(DeadLetters::Table)
                .add_column(string_null(DeadLetters::RedrivenBy))
                .to_owned(),
        )
        .await?;
        // The automatic redrive looks for old open dead letters.
        m.create_index(
            Index::create()
                .name("dead_letters_created_at")
                .table(DeadLetters::Table)
                .col(DeadLetters::CreatedAt)
                .to_owned(),
        )
        .await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.drop_index(
            Index::drop()
                .name("dead_letters_created_at")
                .table(DeadLetters::Table)
                .to_owned(),
        )
        .await?;
        m.alter_table(
            Table::alter()
                .table(DeadLetters::Table)
                .drop_column(DeadLetters::RedrivenBy)
                .to_owned(),
        )
        .await
    }
}
