//! Security: signing secrets sealed under a master key (its id beside the
//! ciphertext; rows without one are legacy plain text), the previous
//! secret during a rotation's grace period, and the fingerprint of the
//! request that an idempotency key was first used with.

use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Webhooks {
    Table,
    SecretKeyId,
    PreviousSecret,
    PreviousSecretKeyId,
    PreviousSecretUntil,
    RequestFingerprint,
}

fn columns() -> Vec<ColumnDef> {
    vec![
        string_null(Webhooks::SecretKeyId),
        text_null(Webhooks::PreviousSecret),
        string_null(Webhooks::PreviousSecretKeyId),
        timestamp_with_time_zone_null(Webhooks::PreviousSecretUntil),
        string_null(Webhooks::RequestFingerprint),
    ]
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        // One column per statement: SQLite alters one thing at a time.
        for mut col in columns() {
            m.alter_table(
                Table::alter()
                    .table(Webhooks::Table)
                    .add_column(&mut col)
                    .to_owned(),
            )
            .await?;
        }
        Ok(())
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        for col in [
            Webhooks::SecretKeyId,
            Webhooks::PreviousSecret,
            Webhooks::PreviousSecretKeyId,
            Webhooks::PreviousSecretUntil,
            Webhooks::RequestFingerprint,
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
