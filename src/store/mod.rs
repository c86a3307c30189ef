//! The database: the source of truth for tenants, keys, webhooks, attempts,
//! dead letters and the event log.
//!
//! Every status change goes through [`Store::transition`]: a compare-and-set
//! on the current status plus the event row (and the attempt or dead-letter
//! row, when there is one) in one transaction. Two workers can therefore
//! never both complete a webhook, and the event log never disagrees with
//! the status. Events are published to the bus only after commit.
//!
//! Every query on tenant data takes the tenant id.

mod batch;
mod decode;
mod detect;
pub mod entities;
mod kept;
#[cfg(test)]
pub(crate) mod test_statements;

pub use batch::WriteBatcher;
pub use kept::{Db, Txn};

use std::{
    collections::BTreeMap,
    sync::{Arc, OnceLock},
};

use chrono::{DateTime, Utc};
use sea_orm::{
    ActiveModelTrait, ColumnTrait, ConnectOptions, ConnectionTrait, Database, DatabaseBackend,
    DatabaseConnection, DbErr, EntityTrait, PaginatorTrait, QueryFilter, QueryOrder, QuerySelect,
    QueryTrait, Set, Statement,
    sea_query::{Expr, Query},
};
use sha2::{Digest, Sha256};

use entities::{api_keys, events, tenants};
pub use entities::{attempts, dead_letters, webhooks};

use crate::{
    domain::{ApiKeyId, Status, TenantId, WebhookId},
    events::{Event, EventBus, EventLog},
    secrets::{Keyring, SealError, Sealed},
};
use secrecy::SecretString;

/// A webhook row. Holds the signing secret: never log it whole.
pub type Webhook = webhooks::Model;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Db(#[from] DbErr),
    #[error("corrupt row: {0}")]
    Corrupt(String),
    #[error("signing secret: {0}")]
    Seal(#[from] SealError),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// How long a pooled connection may sit idle before it is pinged again
/// before use.
pub const PING_IF_IDLE_FOR: std::time::Duration = std::time::Duration::from_secs(30);

/// Opens a connection pool whose connections are opened on demand.
pub async fn connect(url: &str, max_connections: u32) -> Result<DatabaseConnection> {
    connect_pool(url, max_connections, 0).await
}

/// Opens a connection pool of up to `max_connections`, of which
/// `min_connections` are opened before this returns (one after another;
/// sqlx gives up after its 30 s acquire timeout, e.g. when the server has
/// no slots left) and kept: sqlx opens new ones whenever fewer are open.
/// A pool opened whole (`min_connections` = `max_connections`) closes no
/// connection for being idle, so that it stays warm (its prepared
/// statements cached) through quiet spells; sqlx still replaces each
/// connection after 30 minutes (except SQLite's one connection, which the
/// store keeps: see `kept`). Otherwise idle connections are closed
/// after 10 minutes (sqlx's defaults).
pub async fn connect_pool(
    url: &str,
    max_connections: u32,
    min_connections: u32,
) -> Result<DatabaseConnection> {
    let mut opts = ConnectOptions::new(url.to_string());
    opts.max_connections(max_connections)
        .min_connections(min_connections)
        .sqlx_logging(false);
    if min_connections >= max_connections {
        opts.idle_timeout(None);
    }
    // A pooled connection is pinged before it is handed out only when it
    // has been idle for a while (it may have been cut meanwhile). Pinging
    // on every acquire, sqlx's default, costs a round trip per statement.
    opts.test_before_acquire_if_idle_for(PING_IF_IDLE_FOR);
    // SQLite: write-ahead logging lets readers run beside the one writer,
    // and a busy timeout makes writers wait instead of failing at once.
    opts.map_sqlx_sqlite_opts(|o| {
        o.journal_mode(sea_orm::sqlx::sqlite::SqliteJournalMode::Wal)
            .busy_timeout(std::time::Duration::from_secs(10))
            .synchronous(sea_orm::sqlx::sqlite::SqliteSynchronous::Normal)
    });
    Ok(Database::connect(opts).await?)
}

/// The row with this unique key (a primary key, or a column under a unique
/// index), if any. Without `LIMIT`: sea-orm's `one()` binds its `LIMIT 1`
/// as a parameter, and SQLite compiles a statement again before every run
/// when a bound value may change its plan, which a `LIMIT` may. For the
/// embedded default's reads by id that was about a tenth of the process's
/// CPU under load. More than one row is a corrupt table.
async fn by_unique_key<E: EntityTrait>(
    select: sea_orm::Select<E>,
    db: &impl ConnectionTrait,
) -> Result<Option<E::Model>> {
    at_most_one(select.all(db).await?, E::default().table_name())
}

/// The one row of a lookup by a unique key, if any.
fn at_most_one<M>(mut rows: Vec<M>, table: &str) -> Result<Option<M>> {
    if rows.len() > 1 {
        return Err(StoreError::Corrupt(format!(
            "a lookup by a unique key in {table} matched {} rows",
            rows.len()
        )));
    }
    Ok(rows.pop())
}

/// The webhooks a select finds, decoded by [`decode::webhook`] (not
/// sea-orm's derived decoder, which formats an error for every NULL
/// column).
async fn webhook_rows(
    select: sea_orm::Select<webhooks::Entity>,
    db: &impl ConnectionTrait,
) -> Result<Vec<Webhook>> {
    let rows = db
        .query_all_raw(select.build(db.get_database_backend()))
        .await?;
    Ok(rows
        .iter()
        .map(decode::webhook)
        .collect::<std::result::Result<_, _>>()?)
}

/// The text of [`Store::find_webhook`]'s query, built by sea-query once
/// per backend instead of on every call (a select of 41 columns took more
/// instructions to build than SQLite took to run it; BENCHMARKS.md,
/// session 28). Its parameters: the webhook id, then the tenant.
fn find_webhook_sql(backend: DatabaseBackend) -> String {
    static POSTGRES: OnceLock<String> = OnceLock::new();
    static SQLITE: OnceLock<String> = OnceLock::new();
    let cell = match backend {
        DatabaseBackend::Postgres => &POSTGRES,
        DatabaseBackend::Sqlite => &SQLITE,
        _ => return find_webhook_select("", "").build(backend).sql,
    };
    cell.get_or_init(|| find_webhook_select("", "").build(backend).sql)
        .clone()
}

/// The select of one webhook by id, scoped by its tenant.
fn find_webhook_select(id: &str, tenant: &str) -> sea_orm::Select<webhooks::Entity> {
    webhooks::Entity::find_by_id(id).filter(webhooks::Column::TenantId.eq(tenant))
}

/// Applies pending migrations.
pub async fn migrate(db: &DatabaseConnection) -> Result<()> {
    use migration::MigratorTrait;
    migration::Migrator::up(db, None).await?;
    Ok(())
}

/// What changes with a status, besides the status.
#[derive(Default, Clone)]
pub struct Changes(pub Vec<(webhooks::Column, sea_orm::Value)>);

impl Changes {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn set(mut self, col: webhooks::Column, value: impl Into<sea_orm::Value>) -> Self {
        self.0.push((col, value.into()));
        self
    }
}

/// One delivery attempt, recorded with the status change that ends it.
#[derive(Debug, Clone)]
pub struct NewAttempt {
    pub number: i32,
    pub started_at: DateTime<Utc>,
    pub duration_ms: i64,
    pub response_status: Option<i32>,
    pub response_body: Option<String>,
    pub error: Option<String>,
}

/// A compare-and-set status change with its event.
#[derive(Clone)]
pub struct Transition<'a> {
    pub tenant: &'a TenantId,
    pub id: &'a WebhookId,
    pub from: &'a [Status],
    pub to: Status,
    pub event: &'static str,
    pub changes: Changes,
    pub attempt: Option<NewAttempt>,
    /// Writes a dead-letter row with this reason.
    pub dead_letter: Option<String>,
    pub now: DateTime<Utc>,
    /// Also require that the row has not changed since this time (a
    /// takeover of a stale attempt must not race another takeover).
    pub unchanged_since: Option<DateTime<Utc>>,
    /// Who moved it out of DEAD_LETTER, recorded on its dead letters.
    pub redriven_by: Option<RedriveSource>,
    /// Also require that the webhook's `expires_at` is after this time.
    pub unexpired_at: Option<DateTime<Utc>>,
    /// A status passed through on the way to `to`, with its event, stored
    /// before `event` (two steps that follow each other at once, in one
    /// write: VERIFYING → VERIFIED → DELIVERING).
    pub through: Option<(Status, &'static str)>,
}

/// Who redrove a dead letter. A webhook is redriven automatically at most
/// once; after that only a person (the API or the CLI) redrives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedriveSource {
    Auto,
    Api,
    Cli,
}

impl RedriveSource {
    pub fn as_str(self) -> &'static str {
        match self {
            RedriveSource::Auto => "auto",
            RedriveSource::Api => "api",
            RedriveSource::Cli => "cli",
        }
    }
}

impl<'a> Transition<'a> {
    /// A move from one of `from` to `to`, with its event; nothing else
    /// changes until the builder methods say so.
    pub fn new(
        tenant: &'a TenantId,
        id: &'a WebhookId,
        from: &'a [Status],
        to: Status,
        event: &'static str,
        now: DateTime<Utc>,
    ) -> Self {
        Self {
            tenant,
            id,
            from,
            to,
            event,
            changes: Changes::new(),
            attempt: None,
            dead_letter: None,
            now,
            unchanged_since: None,
            redriven_by: None,
            unexpired_at: None,
            through: None,
        }
    }

    pub fn changes(mut self, changes: Changes) -> Self {
        self.changes = changes;
        self
    }

    pub fn attempt(mut self, attempt: NewAttempt) -> Self {
        self.attempt = Some(attempt);
        self
    }

    pub fn dead_letter_opt(mut self, reason: Option<String>) -> Self {
        self.dead_letter = reason;
        self
    }

    pub fn unchanged_since(mut self, at: Option<DateTime<Utc>>) -> Self {
        self.unchanged_since = at;
        self
    }

    pub fn redriven_by(mut self, by: RedriveSource) -> Self {
        self.redriven_by = Some(by);
        self
    }

    /// Moves only a webhook whose `expires_at` is after `now`.
    pub fn unexpired_at(mut self, now: DateTime<Utc>) -> Self {
        self.unexpired_at = Some(now);
        self
    }

    /// Passes through `status` on the way, recording its `event` first.
    pub fn through(mut self, status: Status, event: &'static str) -> Self {
        self.through = Some((status, event));
        self
    }
}

/// Which webhooks a bulk redrive takes: in one of `statuses`, of one
/// tenant or all, that entered their status (`updated_at`) in
/// `[since, until)`.
#[derive(Debug, Clone)]
pub struct RedriveFilter {
    pub tenant: Option<TenantId>,
    pub statuses: Vec<Status>,
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
}

/// A freshly created API key; `plaintext` is shown once and never stored.
pub struct NewApiKey {
    pub id: ApiKeyId,
    pub tenant_id: TenantId,
    pub plaintext: String,
}

/// An API key as listed (no secret).
#[derive(Debug, Clone)]
pub struct ApiKeyInfo {
    pub id: String,
    pub tenant: String,
    pub prefix: String,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub last_used_at: Option<DateTime<Utc>>,
}

/// The outcome of inserting a webhook.
pub enum Created {
    New(Webhook),
    /// A webhook with the same idempotency key already existed.
    Existing(Webhook),
}

pub const API_KEY_PREFIX: &str = "uhk_";

fn hash_key(plaintext: &str) -> String {
    hex::encode(api_key_digest(plaintext))
}

/// The SHA-256 of an API key: what is stored (hex) and what caches key on.
pub fn api_key_digest(plaintext: &str) -> [u8; 32] {
    Sha256::digest(plaintext.as_bytes()).into()
}

/// What a valid key grants: its tenant, until when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyGrant {
    pub tenant: TenantId,
    pub expires_at: Option<DateTime<Utc>>,
}

/// Event `id` on webhook `webhook` of `tenant`: of type `kind`, recording
/// `status`, at `at`.
pub(crate) fn event_on(
    tenant: &str,
    webhook: &str,
    id: i64,
    kind: &str,
    status: Status,
    at: DateTime<Utc>,
) -> Event {
    Event {
        id,
        tenant_id: TenantId::from_trusted(tenant.to_string()),
        webhook_id: WebhookId::from_trusted(webhook.to_string()),
        kind: kind.to_string(),
        status,
        occurred_at: at,
    }
}

pub fn event_of(row: &events::Model) -> Result<Event> {
    Ok(Event {
        id: row.id,
        tenant_id: TenantId::from_trusted(row.tenant_id.clone()),
        webhook_id: WebhookId::from_trusted(row.webhook_id.clone()),
        kind: row.kind.clone(),
        status: Status::parse(&row.status)
            .ok_or_else(|| StoreError::Corrupt(format!("event status {}", row.status)))?,
        occurred_at: row.occurred_at,
    })
}

pub fn status_of(w: &Webhook) -> Result<Status> {
    Status::parse(&w.status).ok_or_else(|| StoreError::Corrupt(format!("status {}", w.status)))
}

pub fn priority_of(w: &Webhook) -> crate::pipeline::queue::Priority {
    crate::pipeline::queue::Priority::parse(&w.priority).unwrap_or_default()
}

pub fn metadata_of(w: &Webhook) -> BTreeMap<String, String> {
    serde_json::from_str(&w.metadata).unwrap_or_default()
}

/// What `Store::rotate_master` did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RotateReport {
    /// Rows whose secrets are now sealed under the active key.
    pub resealed: u64,
    /// Rows changed by someone else meanwhile (run again to cover them).
    pub skipped: u64,
    /// Rows that did not open, with the reason (never the secret).
    pub failed: Vec<(String, String)>,
}

#[derive(Clone)]
pub struct Store {
    db: Db,
    bus: Arc<dyn EventBus>,
    keyring: Arc<Keyring>,
}

impl Store {
    /// The store on `db`. On a SQLite pool of one connection the store
    /// keeps that connection (see `kept`): nothing else may use the pool,
    /// and one store (with its clones) serves it.
    pub fn new(db: DatabaseConnection, bus: Arc<dyn EventBus>, keyring: Arc<Keyring>) -> Self {
        Self {
            db: Db::new(db),
            bus,
            keyring,
        }
    }

    /// The master keys that seal signing secrets.
    pub fn keyring(&self) -> &Keyring {
        &self.keyring
    }

    /// Seals a signing secret for the webhook `id` under the active key.
    pub fn seal_secret(&self, id: &WebhookId, secret: &SecretString) -> Sealed {
        self.keyring.seal(secret, id.as_str())
    }

    /// The webhook's current signing secret, opened.
    pub fn open_secret(&self, w: &Webhook) -> Result<SecretString> {
        Ok(self
            .keyring
            .open(w.secret_key_id.as_deref(), &w.secret.0, &w.id)?)
    }

    /// The secrets that sign the webhook's deliveries at `now`: the
    /// current one, then the previous one while a rotation's grace lasts.
    pub fn signing_secrets(&self, w: &Webhook, now: DateTime<Utc>) -> Result<Vec<SecretString>> {
        let mut out = vec![self.open_secret(w)?];
        if let (Some(prev), Some(until)) = (&w.previous_secret, w.previous_secret_until)
            && now < until
        {
            out.push(
                self.keyring
                    .open(w.previous_secret_key_id.as_deref(), &prev.0, &w.id)?,
            );
        }
        Ok(out)
    }

    /// The master key ids that some stored secret is sealed with.
    pub async fn master_key_ids_in_use(&self) -> Result<Vec<String>> {
        let mut ids = std::collections::BTreeSet::new();
        for col in [
            webhooks::Column::SecretKeyId,
            webhooks::Column::PreviousSecretKeyId,
        ] {
            let found: Vec<Option<String>> = webhooks::Entity::find()
                .select_only()
                .column(col)
                .distinct()
                .filter(col.is_not_null())
                .into_tuple()
                .all(&self.db)
                .await?;
            ids.extend(found.into_iter().flatten());
        }
        Ok(ids.into_iter().collect())
    }

    /// Seals every stored secret (and previous secret) that is not under
    /// the active master key with it, `batch` rows at a time, legacy
    /// plain-text rows included. Each row is written only if its secrets
    /// did not change meanwhile, so it is safe beside a running service
    /// and safe to run again. Every tenant: operators only.
    pub async fn rotate_master(&self, batch: u64) -> Result<RotateReport> {
        use sea_orm::Condition;
        let active = self.keyring.active_id().to_string();
        let stale = |col: webhooks::Column| {
            Condition::any()
                .add(col.is_null())
                .add(col.ne(active.clone()))
        };
        let mut report = RotateReport::default();
        let mut after = String::new();
        loop {
            let rows = webhooks::Entity::find()
                .filter(webhooks::Column::Id.gt(after.clone()))
                .filter(
                    Condition::any()
                        .add(stale(webhooks::Column::SecretKeyId))
                        .add(
                            Condition::all()
                                .add(webhooks::Column::PreviousSecret.is_not_null())
                                .add(stale(webhooks::Column::PreviousSecretKeyId)),
                        ),
                )
                .order_by_asc(webhooks::Column::Id)
                .limit(batch)
                .all(&self.db)
                .await?;
            let Some(last) = rows.last() else { break };
            after = last.id.clone();
            for w in rows {
                let opened = self.open_secret(&w).and_then(|cur| {
                    let prev = match &w.previous_secret {
                        Some(p) => Some(self.keyring.open(
                            w.previous_secret_key_id.as_deref(),
                            &p.0,
                            &w.id,
                        )?),
                        None => None,
                    };
                    Ok((cur, prev))
                });
                let (cur, prev) = match opened {
                    Ok(v) => v,
                    Err(e) => {
                        report.failed.push((w.id.clone(), e.to_string()));
                        continue;
                    }
                };
                let sealed = self.keyring.seal(&cur, &w.id);
                let mut update = webhooks::Entity::update_many()
                    .col_expr(webhooks::Column::Secret, Expr::value(sealed.ciphertext))
                    .col_expr(webhooks::Column::SecretKeyId, Expr::value(sealed.key_id))
                    .filter(webhooks::Column::Id.eq(w.id.clone()))
                    .filter(webhooks::Column::Secret.eq(w.secret.0.clone()));
                if let (Some(prev), Some(old)) = (prev, &w.previous_secret) {
                    let sealed = self.keyring.seal(&prev, &w.id);
                    update = update
                        .col_expr(
                            webhooks::Column::PreviousSecret,
                            Expr::value(sealed.ciphertext),
                        )
                        .col_expr(
                            webhooks::Column::PreviousSecretKeyId,
                            Expr::value(sealed.key_id),
                        )
                        .filter(webhooks::Column::PreviousSecret.eq(old.0.clone()));
                }
                if update.exec(&self.db).await?.rows_affected == 1 {
                    report.resealed += 1;
                } else {
                    report.skipped += 1;
                }
            }
        }
        Ok(report)
    }

    pub fn db(&self) -> &Db {
        &self.db
    }

    pub fn bus(&self) -> &Arc<dyn EventBus> {
        &self.bus
    }

    /// Whether the database answers (readiness).
    pub async fn ping(&self) -> Result<()> {
        self.db.ping().await?;
        Ok(())
    }

    /// How many migrations this binary knows that the database lacks.
    pub async fn pending_migrations(&self) -> Result<usize> {
        use migration::MigratorTrait;
        Ok(migration::Migrator::get_pending_migrations(&self.db)
            .await?
            .len())
    }

    // ---- tenants and API keys -------------------------------------------

    pub async fn tenant_count(&self) -> Result<u64> {
        Ok(tenants::Entity::find().count(&self.db).await?)
    }

    /// The tenant of this name, if it exists.
    pub async fn tenant_by_name(&self, name: &str) -> Result<Option<TenantId>> {
        Ok(by_unique_key(
            tenants::Entity::find().filter(tenants::Column::Name.eq(name)),
            &self.db,
        )
        .await?
        .map(|t| TenantId::from_trusted(t.id)))
    }

    /// The tenant of this name, created when missing.
    pub async fn ensure_tenant(&self, name: &str, now: DateTime<Utc>) -> Result<TenantId> {
        if let Some(t) = self.tenant_by_name(name).await? {
            return Ok(t);
        }
        let id = TenantId::generate();
        tenants::ActiveModel {
            id: Set(id.as_str().to_string()),
            name: Set(name.to_string()),
            created_at: Set(now),
        }
        .insert(&self.db)
        .await?;
        Ok(id)
    }

    /// Creates an API key for a tenant (created when missing), without
    /// expiry.
    pub async fn create_api_key(&self, tenant: &str, now: DateTime<Utc>) -> Result<NewApiKey> {
        self.create_api_key_expiring(tenant, now, None).await
    }

    /// Creates an API key for a tenant (created when missing), valid until
    /// `expires_at` when given. Only the SHA-256 of the key is stored:
    /// keys are 160 random bits, so a fast hash is enough (no salt or slow
    /// hash is needed against guessing), and the lookup is by that hash.
    pub async fn create_api_key_expiring(
        &self,
        tenant: &str,
        now: DateTime<Utc>,
        expires_at: Option<DateTime<Utc>>,
    ) -> Result<NewApiKey> {
        let tenant_id = self.ensure_tenant(tenant, now).await?;
        let mut raw = [0u8; 20];
        rand::fill(&mut raw);
        let plaintext = format!("{API_KEY_PREFIX}{}", hex::encode(raw));
        let id = ApiKeyId::generate();
        api_keys::ActiveModel {
            id: Set(id.as_str().to_string()),
            tenant_id: Set(tenant_id.as_str().to_string()),
            prefix: Set(plaintext[..API_KEY_PREFIX.len() + 8].to_string()),
            key_hash: Set(hash_key(&plaintext)),
            created_at: Set(now),
            expires_at: Set(expires_at),
            revoked_at: Set(None),
            last_used_at: Set(None),
        }
        .insert(&self.db)
        .await?;
        tracing::info!(
            target: "audit",
            event = "api_key.created",
            key_id = %id,
            tenant = %tenant_id,
            tenant_name = tenant,
            expires_at = ?expires_at.map(|t| t.to_rfc3339()),
            "API key created"
        );
        Ok(NewApiKey {
            id,
            tenant_id,
            plaintext,
        })
    }

    pub async fn list_api_keys(&self) -> Result<Vec<ApiKeyInfo>> {
        let tenants: BTreeMap<String, String> = tenants::Entity::find()
            .all(&self.db)
            .await?
            .into_iter()
            .map(|t| (t.id, t.name))
            .collect();
        Ok(api_keys::Entity::find()
            .order_by_asc(api_keys::Column::CreatedAt)
            .all(&self.db)
            .await?
            .into_iter()
            .map(|k| ApiKeyInfo {
                tenant: tenants.get(&k.tenant_id).cloned().unwrap_or_default(),
                id: k.id,
                prefix: k.prefix,
                created_at: k.created_at,
                expires_at: k.expires_at,
                revoked_at: k.revoked_at,
                last_used_at: k.last_used_at,
            })
            .collect())
    }

    /// Revokes a key; effective for the next request. False when unknown.
    pub async fn revoke_api_key(&self, id: &str, now: DateTime<Utc>) -> Result<bool> {
        let res = api_keys::Entity::update_many()
            .col_expr(api_keys::Column::RevokedAt, Expr::value(now))
            .filter(api_keys::Column::Id.eq(id))
            .filter(api_keys::Column::RevokedAt.is_null())
            .exec(&self.db)
            .await?;
        let revoked = res.rows_affected == 1;
        if revoked {
            tracing::info!(target: "audit", event = "api_key.revoked", key_id = id, "API key revoked");
        }
        Ok(revoked)
    }

    /// The tenant of a valid, unrevoked, unexpired key, read from the
    /// database (the API may cache the answer for `api.key_cache_ttl`, see
    /// `api::keycache`).
    ///
    /// No timing side channel: the lookup is by the SHA-256 of the key, so
    /// how long the index search takes depends on the hash, which a caller
    /// cannot steer toward a stored one (that would need a preimage). The
    /// plain key is never compared byte by byte. Only the public `uhk_`
    /// prefix is checked before hashing.
    pub async fn authenticate(
        &self,
        plaintext: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<TenantId>> {
        Ok(self
            .authenticate_key(plaintext, now)
            .await?
            .map(|g| g.tenant))
    }

    /// [`Store::authenticate`], with the key's expiry.
    pub async fn authenticate_key(
        &self,
        plaintext: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<KeyGrant>> {
        if !plaintext.starts_with(API_KEY_PREFIX) {
            return Ok(None);
        }
        let Some(key) = by_unique_key(
            api_keys::Entity::find().filter(api_keys::Column::KeyHash.eq(hash_key(plaintext))),
            &self.db,
        )
        .await?
        else {
            return Ok(None);
        };
        if key.revoked_at.is_some() || key.expires_at.is_some_and(|e| e <= now) {
            return Ok(None);
        }
        // last_used_at is advisory: written at most once a minute per key.
        if key
            .last_used_at
            .is_none_or(|t| now - t > chrono::Duration::minutes(1))
        {
            api_keys::Entity::update_many()
                .col_expr(api_keys::Column::LastUsedAt, Expr::value(now))
                .filter(api_keys::Column::Id.eq(key.id.clone()))
                .exec(&self.db)
                .await?;
        }
        Ok(Some(KeyGrant {
            tenant: TenantId::from_trusted(key.tenant_id),
            expires_at: key.expires_at,
        }))
    }

    // ---- webhooks --------------------------------------------------------

    /// Inserts a new webhook and its `webhook.created` event. With an
    /// idempotency key that the tenant already used, returns that webhook,
    /// unless it was created at or before `keys_expired_at`: such a key is
    /// released (cleared from the old webhook) and used afresh.
    pub async fn create_webhook(
        &self,
        new: Webhook,
        event: &'static str,
        keys_expired_at: DateTime<Utc>,
    ) -> Result<Created> {
        if let Some(key) = &new.idempotency_key {
            let tenant = TenantId::from_trusted(new.tenant_id.clone());
            webhooks::Entity::update_many()
                .col_expr(
                    webhooks::Column::IdempotencyKey,
                    Expr::value(None::<String>),
                )
                .filter(webhooks::Column::TenantId.eq(tenant.as_str()))
                .filter(webhooks::Column::IdempotencyKey.eq(key.as_str()))
                .filter(webhooks::Column::CreatedAt.lte(keys_expired_at))
                .exec(&self.db)
                .await?;
            if let Some(existing) = self.find_by_idempotency_key(&tenant, key).await? {
                return Ok(Created::Existing(existing));
            }
        }
        match self.insert_webhook(&new, event).await {
            Ok(events) => {
                self.publish_all(events);
                Ok(Created::New(new))
            }
            Err(e) => {
                // A concurrent create with the same idempotency key won the
                // unique index: answer with its webhook.
                if let Some(key) = &new.idempotency_key {
                    let tenant = TenantId::from_trusted(new.tenant_id.clone());
                    if let Some(existing) = self.find_by_idempotency_key(&tenant, key).await? {
                        return Ok(Created::Existing(existing));
                    }
                }
                Err(e)
            }
        }
    }

    /// Inserts the webhook row and its event, atomically: on PostgreSQL
    /// one statement (the event inserted from the webhook's `RETURNING`,
    /// so one round trip and no `BEGIN` / `COMMIT`), elsewhere a
    /// transaction. Returns the event, not yet published.
    async fn insert_webhook(&self, new: &Webhook, event: &'static str) -> Result<Vec<Event>> {
        use sea_orm::sea_query::PostgresQueryBuilder;

        let status = status_of(new)?;
        let row: webhooks::ActiveModel = new.clone().into();
        let mut insert = webhooks::Entity::insert(row).into_query();
        if self.db.get_database_backend() != DatabaseBackend::Postgres {
            let txn = self.db.begin().await?;
            txn.execute(&insert).await?;
            let events = batch::insert_events(
                &txn,
                &[(&new.tenant_id, &new.id, event, status, new.created_at)],
            )
            .await?;
            txn.commit().await?;
            return Ok(events);
        }
        insert.returning(
            Query::returning().columns([webhooks::Column::TenantId, webhooks::Column::Id]),
        );
        let (insert_sql, mut values) = insert.build(PostgresQueryBuilder);
        let n = values.0.len();
        values
            .0
            .extend([event.into(), status.as_str().into(), new.created_at.into()]);
        let sql = format!(
            "WITH w AS ({insert_sql}) \
             INSERT INTO events (tenant_id, webhook_id, \"type\", status, occurred_at) \
             SELECT w.tenant_id, w.id, ${}, ${}, ${} FROM w RETURNING id",
            n + 1,
            n + 2,
            n + 3
        );
        let id: i64 = self
            .db
            .query_one_raw(Statement::from_sql_and_values(
                DatabaseBackend::Postgres,
                sql,
                values.0,
            ))
            .await?
            .ok_or_else(|| StoreError::Corrupt("the webhook insert returned no row".into()))?
            .try_get("", "id")?;
        Ok(vec![event_on(
            &new.tenant_id,
            &new.id,
            id,
            event,
            status,
            new.created_at,
        )])
    }

    async fn find_by_idempotency_key(
        &self,
        tenant: &TenantId,
        key: &str,
    ) -> Result<Option<Webhook>> {
        let select = webhooks::Entity::find()
            .filter(webhooks::Column::TenantId.eq(tenant.as_str()))
            .filter(webhooks::Column::IdempotencyKey.eq(key));
        at_most_one(webhook_rows(select, &self.db).await?, "webhooks")
    }

    /// Replaces the webhook's signing secret with `new`; the current one
    /// becomes the previous secret, which still signs until `until` (None:
    /// dropped at once). A compare-and-set on the current secret, so that
    /// of two concurrent rotations one wins and the other gets `None`.
    /// Neither the status nor `updated_at` changes.
    pub async fn rotate_secret(
        &self,
        w: &Webhook,
        new: &SecretString,
        until: Option<DateTime<Utc>>,
    ) -> Result<Option<Webhook>> {
        let id = WebhookId::from_trusted(w.id.clone());
        let sealed = self.seal_secret(&id, new);
        let (prev, prev_key) = match until {
            Some(_) => (Some(w.secret.0.clone()), w.secret_key_id.clone()),
            None => (None, None),
        };
        let res = webhooks::Entity::update_many()
            .col_expr(webhooks::Column::Secret, Expr::value(sealed.ciphertext))
            .col_expr(webhooks::Column::SecretKeyId, Expr::value(sealed.key_id))
            .col_expr(webhooks::Column::SecretGenerated, Expr::value(false))
            .col_expr(webhooks::Column::PreviousSecret, Expr::value(prev))
            .col_expr(webhooks::Column::PreviousSecretKeyId, Expr::value(prev_key))
            .col_expr(webhooks::Column::PreviousSecretUntil, Expr::value(until))
            .filter(webhooks::Column::Id.eq(w.id.as_str()))
            .filter(webhooks::Column::TenantId.eq(w.tenant_id.as_str()))
            .filter(webhooks::Column::Secret.eq(w.secret.0.as_str()))
            .exec(&self.db)
            .await?;
        if res.rows_affected != 1 {
            return Ok(None);
        }
        let select = webhooks::Entity::find_by_id(w.id.as_str())
            .filter(webhooks::Column::TenantId.eq(w.tenant_id.as_str()));
        at_most_one(webhook_rows(select, &self.db).await?, "webhooks")
    }

    pub async fn find_webhook(&self, tenant: &TenantId, id: &WebhookId) -> Result<Option<Webhook>> {
        let backend = self.db.get_database_backend();
        let rows = self
            .db
            .query_all_raw(Statement::from_sql_and_values(
                backend,
                find_webhook_sql(backend),
                [id.as_str().into(), tenant.as_str().into()],
            ))
            .await?;
        let rows = rows
            .iter()
            .map(decode::webhook)
            .collect::<std::result::Result<Vec<_>, _>>()?;
        at_most_one(rows, "webhooks")
    }

    /// Changes the status from one of `t.from` to `t.to`, atomically with
    /// its event (and attempt / dead-letter rows). `None` when the webhook
    /// was not in one of `t.from` (someone else moved it first). A group of
    /// one write (see `batch.rs`); the event is published after commit.
    pub async fn transition(&self, t: Transition<'_>) -> Result<Option<Webhook>> {
        let applied = self
            .write_group(&[batch::Write::Transition(t.into())])
            .await?;
        self.publish_all(applied.events);
        applied
            .rows
            .into_iter()
            .next()
            .map_or(Ok(None), batch::Done::into_row)
    }

    /// The webhooks of these (tenant, id) pairs that exist, in one query
    /// (the jobs a worker took together). Scoped by the tenants named, and
    /// each row is kept only if its own tenant is the one paired with its
    /// id.
    pub async fn find_webhooks(&self, keys: &[(&TenantId, &WebhookId)]) -> Result<Vec<Webhook>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let wanted: std::collections::HashSet<(&str, &str)> = keys
            .iter()
            .map(|(t, id)| (t.as_str(), id.as_str()))
            .collect();
        let tenants: std::collections::BTreeSet<&str> = wanted.iter().map(|(t, _)| *t).collect();
        let ids: std::collections::BTreeSet<&str> = wanted.iter().map(|(_, id)| *id).collect();
        let select = webhooks::Entity::find()
            .filter(webhooks::Column::Id.is_in(ids))
            .filter(webhooks::Column::TenantId.is_in(tenants));
        let mut rows = webhook_rows(select, &self.db).await?;
        rows.retain(|w| wanted.contains(&(w.tenant_id.as_str(), w.id.as_str())));
        Ok(rows)
    }

    /// Delivery attempts of a webhook, oldest first.
    pub async fn attempts(
        &self,
        tenant: &TenantId,
        id: &WebhookId,
    ) -> Result<Vec<attempts::Model>> {
        // Scoped through the webhook: attempts of another tenant's webhook
        // are never read.
        if self.find_webhook(tenant, id).await?.is_none() {
            return Ok(Vec::new());
        }
        Ok(attempts::Entity::find()
            .filter(attempts::Column::WebhookId.eq(id.as_str()))
            .order_by_asc(attempts::Column::Number)
            .order_by_asc(attempts::Column::Id)
            .all(&self.db)
            .await?)
    }

    pub async fn dead_letters(
        &self,
        tenant: &TenantId,
        id: &WebhookId,
    ) -> Result<Vec<dead_letters::Model>> {
        Ok(dead_letters::Entity::find()
            .filter(dead_letters::Column::TenantId.eq(tenant.as_str()))
            .filter(dead_letters::Column::WebhookId.eq(id.as_str()))
            .order_by_asc(dead_letters::Column::Id)
            .all(&self.db)
            .await?)
    }

    /// A page of a tenant's webhooks, newest first, strictly older than
    /// `before` (the previous page's last id).
    pub async fn list_webhooks(
        &self,
        tenant: &TenantId,
        status: Option<Status>,
        before: Option<&WebhookId>,
        limit: u64,
    ) -> Result<Vec<Webhook>> {
        let mut q = webhooks::Entity::find().filter(webhooks::Column::TenantId.eq(tenant.as_str()));
        if let Some(s) = status {
            q = q.filter(webhooks::Column::Status.eq(s.as_str()));
        }
        if let Some(b) = before {
            q = q.filter(webhooks::Column::Id.lt(b.as_str()));
        }
        Ok(q.order_by_desc(webhooks::Column::Id)
            .limit(limit)
            .all(&self.db)
            .await?)
    }

    /// Webhooks the pipeline owes work to (the queue is rebuilt from these).
    pub async fn queued_webhooks(&self) -> Result<Vec<Webhook>> {
        Ok(webhooks::Entity::find()
            .filter(webhooks::Column::Status.is_in(Status::QUEUED.iter().map(|s| s.as_str())))
            .order_by_asc(webhooks::Column::Id)
            .all(&self.db)
            .await?)
    }

    /// Queued webhooks whose job is overdue: VERIFYING or VERIFIED and
    /// untouched since `before`, or RETRYING, due before `before` and
    /// untouched since (a job waiting for its host's turn touches its row).
    pub async fn overdue_queued(&self, before: DateTime<Utc>, limit: u64) -> Result<Vec<Webhook>> {
        use sea_orm::Condition;
        Ok(webhooks::Entity::find()
            .filter(
                Condition::any()
                    .add(
                        Condition::all()
                            .add(
                                webhooks::Column::Status
                                    .is_in([Status::Verifying.as_str(), Status::Verified.as_str()]),
                            )
                            .add(webhooks::Column::UpdatedAt.lt(before)),
                    )
                    .add(
                        Condition::all()
                            .add(webhooks::Column::Status.eq(Status::Retrying.as_str()))
                            .add(webhooks::Column::NextAttemptAt.lt(before))
                            .add(webhooks::Column::UpdatedAt.lt(before)),
                    ),
            )
            .limit(limit)
            .all(&self.db)
            .await?)
    }

    /// How many webhooks are in each status (every tenant: operators only).
    pub async fn counts_by_status(&self) -> Result<Vec<(Status, u64)>> {
        // One GROUP BY (each /metrics scrape runs it), every status listed.
        let rows: Vec<(String, i64)> = webhooks::Entity::find()
            .select_only()
            .column(webhooks::Column::Status)
            .column_as(webhooks::Column::Id.count(), "n")
            .group_by(webhooks::Column::Status)
            .into_tuple()
            .all(&self.db)
            .await?;
        Ok(Status::ALL
            .into_iter()
            .map(|s| {
                let n = rows
                    .iter()
                    .find(|(name, _)| name == s.as_str())
                    .map_or(0, |(_, n)| u64::try_from(*n).unwrap_or(0));
                (s, n)
            })
            .collect())
    }

    /// Dead letters not redriven yet (every tenant: operators only).
    pub async fn open_dead_letters(&self) -> Result<u64> {
        Ok(dead_letters::Entity::find()
            .filter(dead_letters::Column::RedrivenAt.is_null())
            .count(&self.db)
            .await?)
    }

    /// Dead-lettered webhooks whose open dead letter is older than
    /// `before` and that were never redriven automatically, oldest first.
    pub async fn auto_redrive_due(
        &self,
        before: DateTime<Utc>,
        limit: u64,
    ) -> Result<Vec<Webhook>> {
        use sea_orm::sea_query::Query;
        let ids: Vec<String> = dead_letters::Entity::find()
            .select_only()
            .column(dead_letters::Column::WebhookId)
            .filter(dead_letters::Column::RedrivenAt.is_null())
            .filter(dead_letters::Column::CreatedAt.lt(before))
            .filter(
                dead_letters::Column::WebhookId.not_in_subquery(
                    Query::select()
                        .column(dead_letters::Column::WebhookId)
                        .from(dead_letters::Entity)
                        .and_where(
                            dead_letters::Column::RedrivenBy.eq(RedriveSource::Auto.as_str()),
                        )
                        .to_owned(),
                ),
            )
            .order_by_asc(dead_letters::Column::CreatedAt)
            .limit(limit)
            .into_tuple()
            .all(&self.db)
            .await?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        Ok(webhooks::Entity::find()
            .filter(webhooks::Column::Id.is_in(ids))
            .filter(webhooks::Column::Status.eq(Status::DeadLetter.as_str()))
            .all(&self.db)
            .await?)
    }

    /// A page of webhooks for a bulk redrive (operators only: every tenant
    /// unless `filter.tenant` says one), by id after `after`.
    pub async fn redrive_page(
        &self,
        filter: &RedriveFilter,
        after: Option<&str>,
        limit: u64,
    ) -> Result<Vec<Webhook>> {
        let mut q = webhooks::Entity::find()
            .filter(webhooks::Column::Status.is_in(filter.statuses.iter().map(|s| s.as_str())));
        if let Some(t) = &filter.tenant {
            q = q.filter(webhooks::Column::TenantId.eq(t.as_str()));
        }
        if let Some(since) = filter.since {
            q = q.filter(webhooks::Column::UpdatedAt.gte(since));
        }
        if let Some(until) = filter.until {
            q = q.filter(webhooks::Column::UpdatedAt.lt(until));
        }
        if let Some(after) = after {
            q = q.filter(webhooks::Column::Id.gt(after));
        }
        Ok(q.order_by_asc(webhooks::Column::Id)
            .limit(limit)
            .all(&self.db)
            .await?)
    }

    /// Marks a webhook as worked on (`updated_at`) without changing its
    /// status or writing an event; only while it is in `status`.
    pub async fn touch(
        &self,
        tenant: &TenantId,
        id: &WebhookId,
        status: Status,
        now: DateTime<Utc>,
    ) -> Result<()> {
        batch::touch_query(tenant, id, status, now)
            .exec(&self.db)
            .await?;
        Ok(())
    }

    /// Every webhook in one status (used for the few in DELIVERING).
    pub async fn webhooks_in(&self, status: Status) -> Result<Vec<Webhook>> {
        Ok(webhooks::Entity::find()
            .filter(webhooks::Column::Status.eq(status.as_str()))
            .all(&self.db)
            .await?)
    }

    /// Stored events after a cursor, oldest first (StreamEvents replay).
    pub async fn events_after(
        &self,
        tenant: &TenantId,
        webhook: Option<&WebhookId>,
        after: i64,
        limit: u64,
    ) -> Result<Vec<Event>> {
        let mut q = events::Entity::find()
            .filter(events::Column::TenantId.eq(tenant.as_str()))
            .filter(events::Column::Id.gt(after));
        if let Some(w) = webhook {
            q = q.filter(events::Column::WebhookId.eq(w.as_str()));
        }
        q.order_by_asc(events::Column::Id)
            .limit(limit)
            .all(&self.db)
            .await?
            .iter()
            .map(event_of)
            .collect()
    }
}

/// The follower's view of the log. `committed_ids_after` and
/// `last_event_id` are the only queries on the events table not scoped by
/// tenant: they return bare ids, never shown to a caller, so that a
/// follower can tell a hole in the sequence (a transaction still
/// committing) from another tenant's event.
#[async_trait::async_trait]
impl EventLog for Store {
    async fn committed_ids_after(&self, after: i64, limit: u64) -> Result<Vec<i64>, String> {
        events::Entity::find()
            .select_only()
            .column(events::Column::Id)
            .filter(events::Column::Id.gt(after))
            .order_by_asc(events::Column::Id)
            .limit(limit)
            .into_tuple::<i64>()
            .all(&self.db)
            .await
            .map_err(|e| e.to_string())
    }

    async fn events_between(
        &self,
        tenant: &TenantId,
        webhook: Option<&WebhookId>,
        after: i64,
        upto: i64,
        limit: u64,
    ) -> Result<Vec<Event>, String> {
        let mut q = events::Entity::find()
            .filter(events::Column::TenantId.eq(tenant.as_str()))
            .filter(events::Column::Id.gt(after))
            .filter(events::Column::Id.lte(upto));
        if let Some(w) = webhook {
            q = q.filter(events::Column::WebhookId.eq(w.as_str()));
        }
        q.order_by_asc(events::Column::Id)
            .limit(limit)
            .all(&self.db)
            .await
            .map_err(|e| e.to_string())?
            .iter()
            .map(|row| event_of(row).map_err(|e| e.to_string()))
            .collect()
    }

    async fn last_event_id(&self) -> Result<i64, String> {
        let max: Option<Option<i64>> = events::Entity::find()
            .select_only()
            .column_as(events::Column::Id.max(), "max")
            .into_tuple()
            .one(&self.db)
            .await
            .map_err(|e| e.to_string())?;
        Ok(max.flatten().unwrap_or(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kept text, with the id then the tenant as its values, is the
    /// statement sea-query builds for the same select.
    #[test]
    fn find_webhook_sql_is_the_select_built_each_time() {
        for backend in [DatabaseBackend::Postgres, DatabaseBackend::Sqlite] {
            let built = find_webhook_select("wh_1", "t_2").build(backend);
            assert_eq!(find_webhook_sql(backend), built.sql);
            let values: Vec<sea_orm::Value> = vec!["wh_1".into(), "t_2".into()];
            assert_eq!(built.values.map(|v| v.0), Some(values));
        }
    }
}
