//! sea-orm entities, one module per table (see `migrations/`).

pub mod tenants {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "tenants")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        pub name: String,
        pub created_at: DateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod api_keys {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "api_keys")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        pub tenant_id: String,
        pub prefix: String,
        pub key_hash: String,
        pub created_at: DateTimeUtc,
        pub expires_at: Option<DateTimeUtc>,
        pub revoked_at: Option<DateTimeUtc>,
        pub last_used_at: Option<DateTimeUtc>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod webhooks {
    use sea_orm::entity::prelude::*;

    /// The signing secret as stored. Its `Debug` is redacted, so that a
    /// logged row never shows it.
    #[derive(Clone, PartialEq, Eq, DeriveValueType)]
    pub struct StoredSecret(pub String);

    impl std::fmt::Debug for StoredSecret {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("StoredSecret(<redacted>)")
        }
    }

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "webhooks")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        pub tenant_id: String,
        pub status: String,
        pub trigger: String,
        pub provider: String,
        pub storage: String,
        pub bucket: String,
        pub object_key: String,
        pub filename: String,
        pub content_type: String,
        pub expected_size: Option<i64>,
        pub size: Option<i64>,
        pub client_etag: Option<String>,
        pub etag: Option<String>,
        pub object_last_modified: Option<DateTimeUtc>,
        pub url: String,
        /// Sealed (see `crate::secrets`) under master key `secret_key_id`;
        /// plain text when that is None (a row from before encryption).
        pub secret: StoredSecret,
        pub secret_generated: bool,
        pub secret_key_id: Option<String>,
        /// The secret before the last rotation, sealed the same way; it
        /// still signs until `previous_secret_until`.
        pub previous_secret: Option<StoredSecret>,
        pub previous_secret_key_id: Option<String>,
        pub previous_secret_until: Option<DateTimeUtc>,
        /// SHA-256 of the canonical create request, for idempotency.
        pub request_fingerprint: Option<String>,
        pub metadata: String,
        pub idempotency_key: Option<String>,
        pub attempt_count: i32,
        /// Attempts made before the current round (a redrive starts a new one).
        pub attempt_base: i32,
        pub verify_attempts: i32,
        pub next_attempt_at: Option<DateTimeUtc>,
        pub last_error: Option<String>,
        pub created_at: DateTimeUtc,
        pub updated_at: DateTimeUtc,
        pub verified_at: Option<DateTimeUtc>,
        pub completed_at: Option<DateTimeUtc>,
        pub expires_at: DateTimeUtc,
        /// `normal` or `high`.
        pub priority: String,
        /// AUTO: when the object is HEADed next (None: no check owed).
        pub next_check_at: Option<DateTimeUtc>,
        /// AUTO: checks made so far (the backoff position).
        pub check_count: i32,
        /// AUTO: what the previous check saw (stability).
        pub seen_etag: Option<String>,
        pub seen_size: Option<i64>,
        /// W3C traceparent of the trace this webhook's jobs continue.
        pub traceparent: Option<String>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod attempts {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "attempts")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i64,
        pub webhook_id: String,
        pub number: i32,
        pub started_at: DateTimeUtc,
        pub duration_ms: i64,
        pub response_status: Option<i32>,
        pub response_body: Option<String>,
        pub error: Option<String>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod dead_letters {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "dead_letters")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i64,
        pub tenant_id: String,
        pub webhook_id: String,
        pub reason: String,
        pub created_at: DateTimeUtc,
        pub redriven_at: Option<DateTimeUtc>,
        /// `auto`, `api` or `cli` once redriven.
        pub redriven_by: Option<String>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod events {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "events")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i64,
        pub tenant_id: String,
        pub webhook_id: String,
        #[sea_orm(column_name = "type")]
        pub kind: String,
        pub status: String,
        pub occurred_at: DateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}
