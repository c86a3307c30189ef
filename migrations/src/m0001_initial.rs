//! Tenants, API keys, webhooks, attempts, dead letters and events.

use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Tenants {
    Table,
    Id,
    Name,
    CreatedAt,
}

#[derive(DeriveIden)]
enum ApiKeys {
    Table,
    Id,
    TenantId,
    Prefix,
    KeyHash,
    CreatedAt,
    ExpiresAt,
    RevokedAt,
    LastUsedAt,
}

#[derive(DeriveIden)]
enum Webhooks {
    Table,
    Id,
    TenantId,
    Status,
    Trigger,
    Provider,
    Storage,
    Bucket,
    ObjectKey,
    Filename,
    ContentType,
    ExpectedSize,
    Size,
    ClientEtag,
    Etag,
    ObjectLastModified,
    Url,
    Secret,
    SecretGenerated,
    Metadata,
    IdempotencyKey,
    AttemptCount,
    AttemptBase,
    VerifyAttempts,
    NextAttemptAt,
    LastError,
    CreatedAt,
    UpdatedAt,
    VerifiedAt,
    CompletedAt,
    ExpiresAt,
}

#[derive(DeriveIden)]
enum Attempts {
    Table,
    Id,
    WebhookId,
    Number,
    StartedAt,
    DurationMs,
    ResponseStatus,
    ResponseBody,
    Error,
}

#[derive(DeriveIden)]
enum DeadLetters {
    Table,
    Id,
    TenantId,
    WebhookId,
    Reason,
    CreatedAt,
    RedrivenAt,
}

#[derive(DeriveIden)]
enum Events {
    Table,
    Id,
    TenantId,
    WebhookId,
    Type,
    Status,
    OccurredAt,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.create_table(
            Table::create()
                .table(Tenants::Table)
                .col(string(Tenants::Id).primary_key())
                .col(string_uniq(Tenants::Name))
                .col(timestamp_with_time_zone(Tenants::CreatedAt))
                .to_owned(),
        )
        .await?;

        m.create_table(
            Table::create()
                .table(ApiKeys::Table)
                .col(string(ApiKeys::Id).primary_key())
                .col(string(ApiKeys::TenantId))
                .col(string(ApiKeys::Prefix))
                .col(string_uniq(ApiKeys::KeyHash))
                .col(timestamp_with_time_zone(ApiKeys::CreatedAt))
                .col(timestamp_with_time_zone_null(ApiKeys::ExpiresAt))
                .col(timestamp_with_time_zone_null(ApiKeys::RevokedAt))
                .col(timestamp_with_time_zone_null(ApiKeys::LastUsedAt))
                .foreign_key(
                    ForeignKey::create()
                        .from(ApiKeys::Table, ApiKeys::TenantId)
                        .to(Tenants::Table, Tenants::Id),
                )
                .to_owned(),
        )
        .await?;

        m.create_table(
            Table::create()
                .table(Webhooks::Table)
                .col(string(Webhooks::Id).primary_key())
                .col(string(Webhooks::TenantId))
                .col(string(Webhooks::Status))
                .col(string(Webhooks::Trigger))
                .col(string(Webhooks::Provider))
                .col(string(Webhooks::Storage))
                .col(string(Webhooks::Bucket))
                .col(text(Webhooks::ObjectKey))
                .col(text(Webhooks::Filename))
                .col(string(Webhooks::ContentType))
                .col(big_integer_null(Webhooks::ExpectedSize))
                .col(big_integer_null(Webhooks::Size))
                .col(string_null(Webhooks::ClientEtag))
                .col(string_null(Webhooks::Etag))
                .col(timestamp_with_time_zone_null(Webhooks::ObjectLastModified))
                .col(text(Webhooks::Url))
                .col(text(Webhooks::Secret))
                .col(boolean(Webhooks::SecretGenerated).default(false))
                .col(text(Webhooks::Metadata))
                .col(string_null(Webhooks::IdempotencyKey))
                .col(integer(Webhooks::AttemptCount).default(0))
                .col(integer(Webhooks::AttemptBase).default(0))
                .col(integer(Webhooks::VerifyAttempts).default(0))
                .col(timestamp_with_time_zone_null(Webhooks::NextAttemptAt))
                .col(text_null(Webhooks::LastError))
                .col(timestamp_with_time_zone(Webhooks::CreatedAt))
                .col(timestamp_with_time_zone(Webhooks::UpdatedAt))
                .col(timestamp_with_time_zone_null(Webhooks::VerifiedAt))
                .col(timestamp_with_time_zone_null(Webhooks::CompletedAt))
                .col(timestamp_with_time_zone(Webhooks::ExpiresAt))
                .foreign_key(
                    ForeignKey::create()
                        .from(Webhooks::Table, Webhooks::TenantId)
                        .to(Tenants::Table, Tenants::Id),
                )
                .to_owned(),
        )
        .await?;
        // Due work: the queue is rebuilt from here at start-up, and sweepers
        // look for due or expired rows by status and time.
        m.create_index(
            Index::create()
                .name("idx_webhooks_status_next_attempt")
                .table(Webhooks::Table)
                .col(Webhooks::Status)
                .col(Webhooks::NextAttemptAt)
                .to_owned(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name("idx_webhooks_status_expires")
                .table(Webhooks::Table)
                .col(Webhooks::Status)
                .col(Webhooks::ExpiresAt)
                .to_owned(),
        )
        .await?;
        // A tenant's webhooks, newest first (ids are time-ordered).
        m.create_index(
            Index::create()
                .name("idx_webhooks_tenant_id")
                .table(Webhooks::Table)
                .col(Webhooks::TenantId)
                .col(Webhooks::Id)
                .to_owned(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name("uq_webhooks_tenant_idempotency")
                .table(Webhooks::Table)
                .col(Webhooks::TenantId)
                .col(Webhooks::IdempotencyKey)
                .unique()
                .to_owned(),
        )
        .await?;

        m.create_table(
            Table::create()
                .table(Attempts::Table)
                .col(big_pk_auto(Attempts::Id))
                .col(string(Attempts::WebhookId))
                .col(integer(Attempts::Number))
                .col(timestamp_with_time_zone(Attempts::StartedAt))
                .col(big_integer(Attempts::DurationMs))
                .col(integer_null(Attempts::ResponseStatus))
                .col(text_null(Attempts::ResponseBody))
                .col(text_null(Attempts::Error))
                .foreign_key(
                    ForeignKey::create()
                        .from(Attempts::Table, Attempts::WebhookId)
                        .to(Webhooks::Table, Webhooks::Id),
                )
                .to_owned(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name("idx_attempts_webhook")
                .table(Attempts::Table)
                .col(Attempts::WebhookId)
                .col(Attempts::Number)
                .to_owned(),
        )
        .await?;

        m.create_table(
            Table::create()
                .table(DeadLetters::Table)
                .col(big_pk_auto(DeadLetters::Id))
                .col(string(DeadLetters::TenantId))
                .col(string(DeadLetters::WebhookId))
                .col(text(DeadLetters::Reason))
                .col(timestamp_with_time_zone(DeadLetters::CreatedAt))
                .col(timestamp_with_time_zone_null(DeadLetters::RedrivenAt))
                .foreign_key(
                    ForeignKey::create()
                        .from(DeadLetters::Table, DeadLetters::WebhookId)
                        .to(Webhooks::Table, Webhooks::Id),
                )
                .to_owned(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name("idx_dead_letters_tenant")
                .table(DeadLetters::Table)
                .col(DeadLetters::TenantId)
                .col(DeadLetters::Id)
                .to_owned(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name("idx_dead_letters_webhook")
                .table(DeadLetters::Table)
                .col(DeadLetters::WebhookId)
                .to_owned(),
        )
        .await?;

        m.create_table(
            Table::create()
                .table(Events::Table)
                .col(big_pk_auto(Events::Id))
                .col(string(Events::TenantId))
                .col(string(Events::WebhookId))
                .col(string(Events::Type))
                .col(string(Events::Status))
                .col(timestamp_with_time_zone(Events::OccurredAt))
                .to_owned(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name("idx_events_tenant")
                .table(Events::Table)
                .col(Events::TenantId)
                .col(Events::Id)
                .to_owned(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name("idx_events_webhook")
                .table(Events::Table)
                .col(Events::WebhookId)
                .col(Events::Id)
                .to_owned(),
        )
        .await?;
        Ok(())
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        for t in [
            Events::Table.into_iden(),
            DeadLetters::Table.into_iden(),
            Attempts::Table.into_iden(),
            Webhooks::Table.into_iden(),
            ApiKeys::Table.into_iden(),
            Tenants::Table.into_iden(),
        ] {
            m.drop_table(Table::drop().table(t).to_owned()).await?;
        }
        Ok(())
    }
}
