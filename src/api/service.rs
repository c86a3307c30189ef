//! The plain Rust service behind both protocols: tenant-scoped use cases
//! over the store, the storage connections and the queue. It knows neither
//! tonic nor HTTP.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use secrecy::SecretString;

use super::{
    audit::{AuthFailure, AuthFailures},
    keycache::KeyCache,
    ratelimit::{RateLimiter, retry_after_secs},
    validate::{CreateInput, MAX_KEY_LEN, derive_key},
};
use crate::{
    clock::Clock,
    config::WebhooksConfig,
    domain::{Status, TenantId, Trigger, WebhookId, event_type},
    error::ApiError,
    pipeline::{
        queue::{Job, JobKind, Queue, enqueue_logged},
        redrive,
        ssrf::AllowList,
    },
    signing::SigningKey,
    storage::{PresignedUpload, Storages},
    store::{
        Changes, Created, RedriveSource, Store, StoreError, Transition, Webhook, WriteBatcher,
        attempts, priority_of, status_of,
        webhooks::{Column as C, StoredSecret},
    },
    tls::{ClientCert, ClientTenants},
};

pub struct CreateOutput {
    pub webhook: Webhook,
    pub upload: PresignedUpload,
    pub object_url: String,
    /// Only when the server generated the secret.
    pub signing_secret: Option<SecretString>,
}

pub struct RotatedSecret {
    pub webhook: Webhook,
    /// Only when the server generated the new secret.
    pub signing_secret: Option<SecretString>,
    /// Until then the previous secret signs too.
    pub previous_until: Option<DateTime<Utc>>,
}

pub struct WebhookApi {
    pub store: Store,
    /// Confirm's compare-and-sets, written in groups with those of the
    /// Confirms running at the same time (one statement per group on
    /// PostgreSQL).
    pub writes: WriteBatcher,
    pub storages: Arc<Storages>,
    pub queue: Arc<dyn Queue>,
    pub clock: Arc<dyn Clock>,
    pub limits: WebhooksConfig,
    /// Private networks that webhook URLs may name anyway
    /// (`Config::delivery_allow_list`).
    pub allow: Arc<AllowList>,
    /// AUTO checks: when the first one is due.
    pub detect: crate::config::DetectConfig,
    /// The per-tenant rate limit (`api.rate_limit_*`); None: off.
    pub rate_limit: Option<RateLimiter>,
    /// Authentication failures, summarised into audit lines.
    pub auth_failures: AuthFailures,
    /// Client certificates that stand for a tenant (mutual TLS).
    pub client_tenants: ClientTenants,
    /// `server.tls.client_auth = "required"`: every call needs a verified
    /// client certificate (REST calls too; the gRPC handshake already
    /// refuses a client without one).
    pub require_client_cert: bool,
    /// Keys that authenticated lately (`api.key_cache_ttl`); None: off.
    pub key_cache: Option<KeyCache>,
}

fn db(e: StoreError) -> ApiError {
    ApiError::internal("database error", &e)
}

impl WebhookApi {
    /// Counts a failed authentication (audit, summarised).
    pub fn auth_failed(&self, kind: AuthFailure) {
        if let Some(report) = self.auth_failures.record(kind, std::time::Instant::now()) {
            AuthFailures::log(report);
        }
    }

    /// The caller's tenant, within its rate limit.
    pub async fn authenticate(&self, key: &str) -> Result<TenantId, ApiError> {
        let now = self.clock.now();
        let cached = self
            .key_cache
            .as_ref()
            .map(|cache| (cache, crate::store::api_key_digest(key)));
        if let Some((cache, digest)) = &cached
            && let Some(tenant) = cache.get(digest, now)
        {
            return self.admit(tenant);
        }
        let grant = self
            .store
            .authenticate_key(key, now)
            .await
            .map_err(db)?
            .ok_or_else(|| {
                self.auth_failed(AuthFailure::Rejected);
                ApiError::Unauthenticated("invalid, expired or revoked API key".into())
            })?;
        if let Some((cache, digest)) = cached {
            cache.put(digest, &grant, now);
        }
        self.admit(grant.tenant)
    }

    /// The tenant of a verified client certificate
    /// (`server.tls.client_tenants`), within its rate limit.
    pub fn authenticate_cert(&self, cert: &ClientCert) -> Result<TenantId, ApiError> {
        match self.client_tenants.tenant_for(cert) {
            Some(tenant) => self.admit(tenant.clone()),
            None => {
                self.auth_failed(AuthFailure::Rejected);
                Err(ApiError::Unauthenticated(format!(
                    "the client certificate ({}) matches no entry of server.tls.client_tenants; \
                     send `authorization: Bearer <api key>` instead",
                    cert.describe()
                )))
            }
        }
    }

    /// Applies the tenant's rate limit.
    fn admit(&self, tenant: TenantId) -> Result<TenantId, ApiError> {
        if let Some(limit) = &self.rate_limit
            && let Err(wait) = limit.check(&tenant, std::time::Instant::now())
        {
            return Err(ApiError::RateLimited {
                retry_after_secs: retry_after_secs(wait),
            });
        }
        Ok(tenant)
    }

    pub async fn create(
        &self,
        tenant: &TenantId,
        input: CreateInput,
    ) -> Result<CreateOutput, ApiError> {
        let storage = self
            .storages
            .resolve(&input.storage)
            .map_err(ApiError::from)?;
        let now = self.clock.now();
        // Every tenant has its own folder: a client's key is relative to
        // it, so that no tenant can read, confirm or overwrite another's
        // objects by naming their key.
        let tenant_dir = format!("{}{}/", self.limits.key_prefix, tenant.as_str());
        let key = match &input.key {
            Some(k) => format!("{tenant_dir}{k}"),
            None => derive_key(&tenant_dir, &input.filename, now),
        };
        if key.len() > MAX_KEY_LEN {
            return Err(ApiError::invalid(
                "key",
                format!(
                    "is too long: with the tenant folder `{tenant_dir}` it exceeds {MAX_KEY_LEN} bytes"
                ),
            ));
        }
        let fingerprint = fingerprint(&input, storage.name());
        let (secret, generated) = match input.secret {
            Some(s) => (SecretString::from(s), false),
            None => (SecretString::from(SigningKey::generate_secret()), true),
        };
        let id = WebhookId::generate();
        let sealed = self.store.seal_secret(&id, &secret);
        drop(secret);
        let expires_at = now
            + chrono::Duration::from_std(input.expires_in)
                .map_err(|_| ApiError::invalid("expires_in", "is too long"))?;
        // AUTO: the server checks the object by itself, first at this time
        // (a check that would fall after expiry is not owed).
        let next_check_at = (input.trigger == Trigger::Auto)
            .then(|| crate::pipeline::Pipeline::first_check_at(&self.detect, now))
            .filter(|t| *t < expires_at);
        let row = Webhook {
            id: id.as_str().to_string(),
            tenant_id: tenant.as_str().to_string(),
            status: Status::Pending.as_str().to_string(),
            trigger: input.trigger.as_str().to_string(),
            provider: storage.kind().as_str().to_string(),
            storage: storage.name().to_string(),
            bucket: storage.bucket().to_string(),
            object_key: key,
            filename: input.filename,
            content_type: input.content_type,
            expected_size: input.content_length,
            size: None,
            client_etag: None,
            etag: None,
            object_last_modified: None,
            url: input.url,
            secret: StoredSecret(sealed.ciphertext),
            secret_generated: generated,
            secret_key_id: Some(sealed.key_id),
            previous_secret: None,
            previous_secret_key_id: None,
            previous_secret_until: None,
            request_fingerprint: Some(fingerprint.clone()),
            metadata: serde_json::to_string(&input.metadata).expect("map serializes"),
            idempotency_key: input.idempotency_key,
            attempt_count: 0,
            attempt_base: 0,
            verify_attempts: 0,
            next_attempt_at: None,
            last_error: None,
            created_at: now,
            updated_at: now,
            verified_at: None,
            completed_at: None,
            expires_at,
            priority: input.priority.as_str().to_string(),
            next_check_at,
            check_count: 0,
            seen_etag: None,
            seen_size: None,
            traceparent: crate::telemetry::current_traceparent(),
        };
        let keys_expired_at = now
            - chrono::Duration::from_std(self.limits.idempotency_ttl)
                .unwrap_or(chrono::Duration::MAX);
        let webhook = match self
            .writes
            .create(row, event_type::CREATED, keys_expired_at)
            .await
            .map_err(db)?
        {
            Created::New(w) => {
                if let Some(due) = w.next_check_at {
                    let job = crate::pipeline::detect::check_job(&w);
                    if let Err(e) = self.queue.enqueue(job, Some(due)).await {
                        // The row holds the check's time: the reconciler
                        // (or start-up recovery) queues it.
                        tracing::warn!(error = %e, webhook_id = %w.id, "enqueueing the first check failed; recovered from the database");
                    }
                }
                w
            }
            Created::Existing(w) => {
                // The same key with another request is a client bug: say
                // so rather than answer for a request that was not made.
                // (Rows from before fingerprints were stored have none.)
                if w.request_fingerprint
                    .as_ref()
                    .is_some_and(|f| *f != fingerprint)
                {
                    return Err(ApiError::AlreadyExists(format!(
                        "idempotency_key: `{}` was already used for webhook {} with a different request; \
                         send the same request to get that webhook again, or use a new key",
                        w.idempotency_key.as_deref().unwrap_or_default(),
                        w.id
                    )));
                }
                // A replay gets a fresh upload URL only while an upload can
                // still count: never for a webhook that has moved on.
                let status = status_of(&w).map_err(db)?;
                if status != Status::Pending || w.expires_at <= now {
                    return Err(ApiError::FailedPrecondition(format!(
                        "idempotency_key: webhook {} created with this key is {}; no new upload URL is issued",
                        w.id,
                        if status == Status::Pending {
                            "expired"
                        } else {
                            status.as_str()
                        }
                    )));
                }
                w
            }
        };
        // Presigned for the webhook's own key: a retried create with the
        // same idempotency key gets a fresh URL for the same object.
        let upload_expiry = storage.presign_expiry().min(input.expires_in);
        let upload = storage
            .presign_put(
                &webhook.object_key,
                &webhook.content_type,
                webhook.expected_size,
                upload_expiry,
            )
            .await
            .map_err(|e| ApiError::internal("presigning failed", &e))?;
        // A generated secret is returned by Create only (again on a replay
        // of the same request), never by any other call.
        let signing_secret = if webhook.secret_generated {
            Some(self.store.open_secret(&webhook).map_err(db)?)
        } else {
            None
        };
        Ok(CreateOutput {
            object_url: storage.object_url(&webhook.object_key),
            signing_secret,
            webhook,
            upload,
        })
    }

    async fn find(&self, tenant: &TenantId, id: &WebhookId) -> Result<Webhook, ApiError> {
        self.store
            .find_webhook(tenant, id)
            .await
            .map_err(db)?
            .ok_or_else(|| ApiError::webhook_not_found(id.as_str()))
    }

    pub async fn confirm(
        &self,
        tenant: &TenantId,
        id: &WebhookId,
        etag: Option<String>,
    ) -> Result<Webhook, ApiError> {
        let now = self.clock.now();
        let confirmed = Transition::new(
            tenant,
            id,
            &[Status::Pending],
            Status::Verifying,
            event_type::CONFIRMED,
            now,
        )
        .changes({
            let changes = Changes::new()
                .set(C::ClientEtag, etag)
                .set(C::VerifyAttempts, 0);
            // Verification and delivery continue the Confirm's trace,
            // when it has one.
            match crate::telemetry::current_traceparent() {
                Some(tp) => changes.set(C::Traceparent, Some(tp)),
                None => changes,
            }
        });
        // The usual case in one compare-and-set: PENDING, not expired.
        if let Some(w) = self
            .writes
            .transition(confirmed.clone().unexpired_at(now))
            .await
            .map_err(db)?
        {
            self.enqueue(&w, JobKind::Verify).await;
            return Ok(w);
        }
        // Otherwise: unknown, past expires_at, or already on its way.
        let w = self.find(tenant, id).await?;
        match status_of(&w).map_err(db)? {
            Status::Pending if now >= w.expires_at => {
                self.store
                    .transition(
                        Transition::new(
                            tenant,
                            id,
                            &[Status::Pending],
                            Status::Expired,
                            event_type::EXPIRED,
                            now,
                        )
                        .changes(Changes::new().set(
                            C::LastError,
                            Some("not confirmed before expires_at".to_string()),
                        )),
                    )
                    .await
                    .map_err(db)?;
                Err(expired(id, w.expires_at))
            }
            Status::Pending => {
                let moved = self.store.transition(confirmed).await.map_err(db)?;
                match moved {
                    Some(w) => {
                        self.enqueue(&w, JobKind::Verify).await;
                        Ok(w)
                    }
                    // A concurrent Confirm won: answer with where it stands.
                    None => self.find(tenant, id).await,
                }
            }
            Status::Expired => Err(expired(id, w.expires_at)),
            Status::Cancelled => Err(ApiError::FailedPrecondition(format!(
                "webhook {id} was cancelled"
            ))),
            _ => Ok(w),
        }
    }

    async fn enqueue(&self, w: &Webhook, kind: JobKind) {
        let job = Job {
            kind,
            priority: priority_of(w),
            tenant: TenantId::from_trusted(w.tenant_id.clone()),
            webhook: WebhookId::from_trusted(w.id.clone()),
        };
        enqueue_logged(&*self.queue, job).await;
    }

    pub async fn get(
        &self,
        tenant: &TenantId,
        id: &WebhookId,
    ) -> Result<(Webhook, Vec<attempts::Model>), ApiError> {
        let w = self.find(tenant, id).await?;
        let attempts = self.store.attempts(tenant, id).await.map_err(db)?;
        Ok((w, attempts))
    }

    pub async fn list(
        &self,
        tenant: &TenantId,
        status: Option<Status>,
        after: Option<WebhookId>,
        page_size: u64,
    ) -> Result<(Vec<Webhook>, Option<WebhookId>), ApiError> {
        let mut rows = self
            .store
            .list_webhooks(tenant, status, after.as_ref(), page_size + 1)
            .await
            .map_err(db)?;
        let next = if rows.len() as u64 > page_size {
            rows.truncate(page_size as usize);
            rows.last().map(|w| WebhookId::from_trusted(w.id.clone()))
        } else {
            None
        };
        Ok((rows, next))
    }

    pub async fn cancel(&self, tenant: &TenantId, id: &WebhookId) -> Result<Webhook, ApiError> {
        let w = self.find(tenant, id).await?;
        let status = status_of(&w).map_err(db)?;
        if status == Status::Cancelled {
            return Ok(w);
        }
        let cancellable = [
            Status::Pending,
            Status::Verifying,
            Status::Verified,
            Status::Retrying,
        ];
        if !cancellable.contains(&status) {
            return Err(ApiError::FailedPrecondition(format!(
                "webhook {id} is {} and can no longer be cancelled",
                status.as_str()
            )));
        }
        let moved = self
            .store
            .transition(
                Transition::new(
                    tenant,
                    id,
                    &cancellable,
                    Status::Cancelled,
                    event_type::CANCELLED,
                    self.clock.now(),
                )
                .changes(Changes::new().set(C::NextAttemptAt, None::<DateTime<Utc>>)),
            )
            .await
            .map_err(db)?;
        match moved {
            Some(w) => Ok(w),
            None => Err(ApiError::FailedPrecondition(format!(
                "webhook {id} moved on while cancelling (a delivery attempt is under way); try again"
            ))),
        }
    }

    /// Replaces a webhook's signing secret (`new`, or a generated one);
    /// the old one keeps signing beside it for `grace` (default
    /// `webhooks.secret_rotation_grace`; zero: not at all). Returns the
    /// webhook, the generated secret if any, and the end of the grace.
    pub async fn rotate_secret(
        &self,
        tenant: &TenantId,
        id: &WebhookId,
        new: Option<String>,
        grace: Option<std::time::Duration>,
    ) -> Result<RotatedSecret, ApiError> {
        let w = self.find(tenant, id).await?;
        let now = self.clock.now();
        let grace = grace.unwrap_or(self.limits.secret_rotation_grace);
        let until = if grace.is_zero() {
            None
        } else {
            Some(
                now + chrono::Duration::from_std(grace)
                    .map_err(|_| ApiError::invalid("grace_period", "is too long"))?,
            )
        };
        let (secret, generated) = match new {
            Some(s) => (SecretString::from(s), false),
            None => (SecretString::from(SigningKey::generate_secret()), true),
        };
        let webhook = self
            .store
            .rotate_secret(&w, &secret, until)
            .await
            .map_err(db)?
            .ok_or_else(|| {
                ApiError::FailedPrecondition(format!(
                    "webhook {id}: its secret was rotated concurrently; try again"
                ))
            })?;
        tracing::info!(
            target: "audit",
            event = "webhook.secret_rotated",
            webhook_id = %id,
            tenant = %tenant,
            previous_until = ?until.map(|t| t.to_rfc3339()),
            "webhook signing secret rotated"
        );
        Ok(RotatedSecret {
            webhook,
            signing_secret: generated.then_some(secret),
            previous_until: until,
        })
    }

    /// Starts a new round of delivery for a completed or dead-lettered
    /// webhook, or a new verification for one that failed verification.
    pub async fn redeliver(&self, tenant: &TenantId, id: &WebhookId) -> Result<Webhook, ApiError> {
        let w = self.find(tenant, id).await?;
        match redrive::redrive(&self.store, &w, RedriveSource::Api, self.clock.now())
            .await
            .map_err(db)?
        {
            redrive::Outcome::Redriven(moved, job) => {
                enqueue_logged(&*self.queue, job).await;
                Ok(*moved)
            }
            redrive::Outcome::NotRedrivable(other) => Err(ApiError::FailedPrecondition(format!(
                "webhook {id} is {}; only completed, dead-lettered or failed webhooks can be redelivered",
                other.as_str()
            ))),
            redrive::Outcome::MovedOn => Err(ApiError::FailedPrecondition(format!(
                "webhook {id} moved on; try again"
            ))),
        }
    }
}

/// SHA-256 over a canonical encoding of everything in a create request
/// that shapes the webhook (each field length-prefixed, metadata sorted),
/// so that an idempotency key can tell the same request from another one.
/// The caller's secret is part of it: a different secret is a different
/// request.
fn fingerprint(input: &CreateInput, storage: &str) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    let mut field = |name: &str, value: Option<&[u8]>| {
        h.update(name.as_bytes());
        match value {
            Some(v) => {
                h.update([1]);
                h.update((v.len() as u64).to_be_bytes());
                h.update(v);
            }
            None => h.update([0]),
        }
    };
    field("storage", Some(storage.as_bytes()));
    field("key", input.key.as_deref().map(str::as_bytes));
    field("filename", Some(input.filename.as_bytes()));
    field("content_type", Some(input.content_type.as_bytes()));
    field(
        "content_length",
        input
            .content_length
            .map(|n| n.to_be_bytes())
            .as_ref()
            .map(|b| b.as_slice()),
    );
    field("url", Some(input.url.as_bytes()));
    field("secret", input.secret.as_deref().map(str::as_bytes));
    field("trigger", Some(input.trigger.as_str().as_bytes()));
    field(
        "metadata_len",
        Some(&(input.metadata.len() as u64).to_be_bytes()),
    );
    for (k, v) in &input.metadata {
        field("metadata_key", Some(k.as_bytes()));
        field("metadata_value", Some(v.as_bytes()));
    }
    field(
        "expires_in_ms",
        Some(&(input.expires_in.as_millis() as u64).to_be_bytes()),
    );
    field("priority", Some(input.priority.as_str().as_bytes()));
    hex::encode(h.finalize())
}

fn expired(id: &WebhookId, at: DateTime<Utc>) -> ApiError {
    ApiError::FailedPrecondition(format!("webhook {id} expired at {}", at.to_rfc3339()))
}
