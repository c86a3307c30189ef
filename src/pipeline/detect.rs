//! Detection without Confirm: AUTO checks, expiry, and the HEAD budget.
//!
//! An AUTO webhook is owed checks. Each check is a delayed job of kind
//! `check` (no loop polls the table): it HEADs the object once and either
//! finds it complete (PENDING → VERIFYING, `upload.detected`; verification
//! and delivery then go exactly as after Confirm) or schedules the next
//! check, later each time ([`check_delay`]). The row holds the time of the
//! next check (`next_check_at`), so that the reconciler re-creates a check
//! job that a queue lost, and `check_count`, the compare-and-set that
//! makes one check one HEAD however many copies of its job run. A check
//! that would fall after `expires_at` is not scheduled: the expiry sweep
//! turns the webhook EXPIRED, and nothing HEADs it again.
//!
//! Confirm races a check cleanly: both move PENDING → VERIFYING by
//! compare-and-set, so only one of them queues the verification.
//!
//! The checks' HEADs of one storage connection share a budget
//! ([`HeadLimiter`], a token bucket per connection and process), so that
//! many pending webhooks never become a storm. Verification has a budget
//! of its own (`verify.head_rate`), so that checks never slow down
//! confirmed uploads.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use chrono::{DateTime, Utc};
use tokio::time::Instant;
use tracing::{info, warn};

use super::{Pipeline, Step, queue::Job, queue::JobKind};
use crate::{
    config::DetectConfig,
    domain::{Status, TenantId, WebhookId, event_type},
    storage::ObjectInfo,
    store::{
        Changes, StoreError, Transition, Webhook, priority_of, status_of, webhooks::Column as C,
    },
};

/// A check waits at most this long in its worker slot for a HEAD token;
/// beyond it, the job is put back in the queue for when a token is due.
const MAX_TOKEN_WAIT: Duration = Duration::from_secs(1);

/// The delay before check number `done + 1`, given that `done` checks
/// were made: `first_check × 2^done`, capped at `max_check_interval`, then
/// scaled by `1 + jitter × sample` (`sample` in [-1, 1]).
pub fn check_delay(cfg: &DetectConfig, done: u32, sample: f64) -> Duration {
    let base = cfg
        .first_check
        .saturating_mul(1u32 << done.min(20))
        .min(cfg.max_check_interval);
    jittered(base, cfg.jitter, sample)
}

/// `d × (1 + jitter × sample)`, never negative.
pub fn jittered(d: Duration, jitter: f64, sample: f64) -> Duration {
    d.mul_f64((1.0 + jitter * sample.clamp(-1.0, 1.0)).max(0.0))
}

/// What one check concludes about an object that exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// Complete: verify and deliver.
    Stable,
    /// Possibly still being written: look again shortly.
    Unsettled,
}

/// An object is complete when the previous check saw the same ETag and
/// size, or when it was last modified more than `settle` ago (a finished
/// upload stops changing; multipart ETags are compared as opaque strings).
pub fn judge(
    seen_etag: Option<&str>,
    seen_size: Option<i64>,
    head: &ObjectInfo,
    now: DateTime<Utc>,
    settle: Duration,
) -> Seen {
    if seen_etag == Some(head.etag.as_str()) && seen_size == Some(head.size) {
        return Seen::Stable;
    }
    let settle = chrono::Duration::from_std(settle).unwrap_or_default();
    match head.last_modified {
        Some(at) if at + settle <= now => Seen::Stable,
        _ => Seen::Unsettled,
    }
}

/// A token bucket, as the generic cell rate algorithm: a request is
/// allowed once the theoretical arrival time, less the burst, has come.
#[derive(Debug)]
pub struct HeadLimiter {
    interval: Duration,
    burst_span: Duration,
    tat: Mutex<Option<Instant>>,
}

impl HeadLimiter {
    /// `rate` requests per second with bursts of `burst`; None when
    /// `rate` is 0 (no limit).
    pub fn new(rate: f64, burst: u32) -> Option<HeadLimiter> {
        if rate <= 0.0 {
            return None;
        }
        let interval = Duration::from_secs_f64(1.0 / rate);
        Some(HeadLimiter {
            interval,
            burst_span: interval.saturating_mul(burst.max(1)),
            tat: Mutex::new(None),
        })
    }

    /// Reserves the next token when it is due within `max_wait` of `now`
    /// and returns how long to wait for it; otherwise reserves nothing and
    /// returns `Err` with how long the wait would be.
    pub fn reserve(&self, now: Instant, max_wait: Duration) -> Result<Duration, Duration> {
        let mut tat = self.tat.lock().expect("head limiter lock");
        let next = tat.map_or(now, |t| t.max(now)) + self.interval;
        let wait = next.saturating_duration_since(now + self.burst_span);
        if wait > max_wait {
            return Err(wait);
        }
        *tat = Some(next);
        Ok(wait)
    }
}

/// One [`HeadLimiter`] per storage connection, made on first use.
pub struct HeadLimits {
    rate: f64,
    burst: u32,
    by_storage: Mutex<HashMap<String, Arc<HeadLimiter>>>,
}

impl HeadLimits {
    /// `rate` HEADs per second (0: no limit) with bursts of `burst`, per
    /// storage connection.
    pub fn new(rate: f64, burst: u32) -> Self {
        Self {
            rate,
            burst,
            by_storage: Mutex::default(),
        }
    }

    fn of(&self, storage: &str) -> Option<Arc<HeadLimiter>> {
        let mut map = self.by_storage.lock().expect("head limits lock");
        if let Some(l) = map.get(storage) {
            return Some(l.clone());
        }
        let l = Arc::new(HeadLimiter::new(self.rate, self.burst)?);
        map.insert(storage.to_string(), l.clone());
        Some(l)
    }

    /// Waits for a HEAD token of `storage`, however long (verification's
    /// own budget).
    pub async fn acquire(&self, storage: &str) {
        if let Some(l) = self.of(storage)
            && let Ok(wait) = l.reserve(Instant::now(), Duration::MAX)
            && !wait.is_zero()
        {
            tokio::time::sleep(wait).await;
        }
    }

    /// Waits for a token due within [`MAX_TOKEN_WAIT`]; `Err(wait)` when
    /// the next one is further away (nothing reserved).
    async fn try_acquire(&self, storage: &str) -> Result<(), Duration> {
        let Some(l) = self.of(storage) else {
            return Ok(());
        };
        let wait = l.reserve(Instant::now(), MAX_TOKEN_WAIT)?;
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        Ok(())
    }
}

fn sample() -> f64 {
    rand::random_range(-1.0..=1.0)
}

fn to_chrono(d: Duration) -> chrono::Duration {
    chrono::Duration::from_std(d).unwrap_or_default()
}

/// `last_error` of a webhook that expired.
const NOT_DETECTED: &str = "upload not detected before expires_at";
const NOT_CONFIRMED: &str = "not confirmed before expires_at";

impl Pipeline {
    /// When the first check of a new AUTO webhook is due.
    pub fn first_check_at(cfg: &DetectConfig, now: DateTime<Utc>) -> DateTime<Utc> {
        now + to_chrono(check_delay(cfg, 0, sample()))
    }

    /// PENDING → EXPIRED (compare-and-set, with its event). False when the
    /// webhook had moved on.
    pub(super) async fn expire(&self, w: &Webhook, now: DateTime<Utc>) -> Result<bool, StoreError> {
        let tenant = TenantId::from_trusted(w.tenant_id.clone());
        let id = WebhookId::from_trusted(w.id.clone());
        let reason = if w.trigger == crate::domain::Trigger::Auto.as_str() {
            NOT_DETECTED
        } else {
            NOT_CONFIRMED
        };
        let moved = self
            .store
            .transition(
                Transition::new(
                    &tenant,
                    &id,
                    &[Status::Pending],
                    Status::Expired,
                    event_type::EXPIRED,
                    now,
                )
                .changes(
                    Changes::new()
                        .set(C::LastError, Some(reason.to_string()))
                        .set(C::NextCheckAt, None::<DateTime<Utc>>),
                ),
            )
            .await?;
        Ok(moved.is_some())
    }

    /// Expires every PENDING webhook past `expires_at`, a batch at a time.
    /// Run by one process at a time; a second run would find nothing to
    /// move (compare-and-set).
    pub async fn sweep_expired(&self) -> Result<usize, StoreError> {
        let now = self.clock.now();
        let mut n = 0;
        // Bounded per round, so that a huge backlog does not hold the lease
        // forever; the next round goes on.
        for _ in 0..100 {
            let rows = self
                .store
                .expired_pending(now, self.detect.expiry_batch)
                .await?;
            let full = rows.len() as u64 == self.detect.expiry_batch;
            let mut moved = 0;
            for w in &rows {
                moved += usize::from(self.expire(w, now).await?);
            }
            n += moved;
            if !full || moved == 0 {
                break;
            }
        }
        Ok(n)
    }

    /// Check jobs that the queue should hold but does not: AUTO webhooks
    /// whose check is overdue by more than the lease.
    pub(super) async fn reconcile_checks(&self) -> Result<usize, StoreError> {
        let now = self.clock.now();
        let before = now - to_chrono(self.lease);
        let mut n = 0;
        for w in self.store.overdue_checks(before, now, 1000).await? {
            if self.queue.enqueue(check_job(&w), None).await.is_ok() {
                n += 1;
            }
        }
        Ok(n)
    }

    /// Start-up: the in-process queue gets back every owed check, at its
    /// time.
    pub(super) async fn recover_checks(&self) -> Result<usize, StoreError> {
        let mut n = 0;
        let mut after: Option<String> = None;
        loop {
            let rows = self.store.pending_checks(after.as_deref(), 1000).await?;
            let Some(last) = rows.last() else { break };
            after = Some(last.id.clone());
            for w in &rows {
                if let Err(e) = self.queue.enqueue(check_job(w), w.next_check_at).await {
                    warn!(error = %e, "re-enqueueing a check at start-up failed");
                } else {
                    n += 1;
                }
            }
        }
        Ok(n)
    }

    /// One check of an AUTO webhook's object: at most one HEAD.
    pub(super) async fn check(&self, job: &Job, w: Webhook) -> Result<Step, StoreError> {
        if status_of(&w)? != Status::Pending {
            return Ok(Step::Ack);
        }
        let now = self.clock.now();
        if now >= w.expires_at {
            self.expire(&w, now).await?;
            return Ok(Step::Ack);
        }
        let Some(due) = w.next_check_at else {
            // No check owed (the last one before expiry was made).
            return Ok(Step::Ack);
        };
        if due > now + chrono::Duration::milliseconds(50) {
            // An early copy of the job (e.g. after a storage event moved
            // the check): wait for its time.
            return Ok(Step::Later(due));
        }
        let storage = match self.storages.resolve(&w.storage) {
            Ok(s) => s,
            Err(e) => {
                // No check is owed any more: the webhook will expire.
                warn!(error = %e, storage = %w.storage, "storage connection gone; the webhook will expire");
                self.store
                    .claim_check(&job.tenant, &job.webhook, w.check_count, None)
                    .await?;
                return Ok(Step::Ack);
            }
        };
        if let Err(wait) = self.head_limits.try_acquire(&w.storage).await {
            // Over the HEAD budget: come back when a token is due, spread.
            let wait = wait + jittered(wait, 0.5, sample().abs());
            return Ok(Step::Later(now + to_chrono(wait)));
        }
        let delay = check_delay(&self.detect, w.check_count.max(0) as u32, sample());
        let next = Some(now + to_chrono(delay)).filter(|t| *t < w.expires_at);
        if !self
            .store
            .claim_check(&job.tenant, &job.webhook, w.check_count, next)
            .await?
        {
            // Another copy of this job made this check.
            return Ok(Step::Ack);
        }
        let later = |at: Option<DateTime<Utc>>| Ok(at.map_or(Step::Ack, Step::Later));
        let head = tokio::time::timeout(self.head_timeout, storage.head(&w.object_key)).await;
        let info = match head {
            Ok(Ok(Some(info))) => info,
            Ok(Ok(None)) => return later(next),
            Ok(Err(e)) => {
                warn!(error = %e, "AUTO check: HEAD failed; checking again later");
                return later(next);
            }
            Err(_) => {
                warn!("AUTO check: HEAD timed out; checking again later");
                return later(next);
            }
        };
        match judge(
            w.seen_etag.as_deref(),
            w.seen_size,
            &info,
            now,
            self.detect.settle,
        ) {
            Seen::Stable => {
                self.detected(&job.tenant, &job.webhook, "a check", now)
                    .await?;
                Ok(Step::Ack)
            }
            Seen::Unsettled => {
                // Look again soon, not after the grown backoff.
                let again = Some(now + to_chrono(check_delay(&self.detect, 0, sample())))
                    .filter(|t| *t < w.expires_at);
                let recorded = self
                    .store
                    .record_seen(
                        &job.tenant,
                        &job.webhook,
                        w.check_count + 1,
                        &info.etag,
                        info.size,
                        again,
                    )
                    .await?;
                if recorded {
                    later(again)
                } else {
                    Ok(Step::Ack)
                }
            }
        }
    }

    /// PENDING → VERIFYING because the object was found without Confirm;
    /// queues the verification (which HEADs and compares, as after
    /// Confirm). False when the webhook had moved on (Confirm won).
    pub(crate) async fn detected(
        &self,
        tenant: &TenantId,
        id: &WebhookId,
        by: &str,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let moved = self
            .store
            .transition(
                Transition::new(
                    tenant,
                    id,
                    &[Status::Pending],
                    Status::Verifying,
                    event_type::DETECTED,
                    now,
                )
                .changes(
                    Changes::new()
                        .set(C::VerifyAttempts, 0)
                        .set(C::NextCheckAt, None::<DateTime<Utc>>),
                ),
            )
            .await?;
        let Some(w) = moved else {
            return Ok(false);
        };
        info!(webhook_id = %id, by, "upload detected without Confirm");
        let job = Job {
            kind: JobKind::Verify,
            priority: priority_of(&w),
            tenant: tenant.clone(),
            webhook: id.clone(),
        };
        if let Err(e) = self.queue.enqueue(job, None).await {
            warn!(error = %e, "enqueueing verification failed; recovered from the database");
        }
        Ok(true)
    }
}

/// What a storage event says was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectCreated {
    pub bucket: String,
    pub key: String,
    pub size: Option<i64>,
    pub etag: Option<String>,
}

/// A storage event: every PENDING AUTO webhook of the object (on this
/// storage connection and bucket) gets its check now. The check still
/// HEADs the object before anything is delivered; the event only saves
/// the wait. Duplicate and out-of-order events are harmless: a webhook
/// that moved on is not PENDING any more, and a check compares what it
/// sees now. Returns how many webhooks were triggered.
pub async fn object_created(
    store: &crate::store::Store,
    queue: &dyn super::queue::Queue,
    storage: &str,
    ev: &ObjectCreated,
    now: DateTime<Utc>,
) -> Result<usize, StoreError> {
    let etag = ev.etag.as_deref().map(crate::storage::normalize_etag);
    let mut n = 0;
    for w in store
        .pending_auto_for_object(storage, &ev.bucket, &ev.key, 100)
        .await?
    {
        let tenant = TenantId::from_trusted(w.tenant_id.clone());
        let id = WebhookId::from_trusted(w.id.clone());
        if !store
            .check_now(&tenant, &id, etag.as_deref(), ev.size, now)
            .await?
        {
            continue;
        }
        if let Err(e) = queue.enqueue(check_job(&w), None).await {
            warn!(error = %e, webhook_id = %w.id, "enqueueing an event's check failed; the reconciler queues it");
        }
        n += 1;
    }
    Ok(n)
}

/// The check job of a webhook.
pub fn check_job(w: &Webhook) -> Job {
    Job {
        kind: JobKind::Check,
        priority: priority_of(w),
        tenant: TenantId::from_trusted(w.tenant_id.clone()),
        webhook: WebhookId::from_trusted(w.id.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> DetectConfig {
        crate::config::Config::from_toml("").unwrap().detect
    }

    #[test]
    fn checks_back_off_to_the_cap_with_jitter() {
        let c = cfg();
        let d: Vec<u64> = (0..10).map(|n| check_delay(&c, n, 0.0).as_secs()).collect();
        assert_eq!(d, [2, 4, 8, 16, 32, 64, 128, 256, 300, 300]);
        assert_eq!(check_delay(&c, 1000, 0.0), Duration::from_secs(300));
        assert_eq!(check_delay(&c, 0, 1.0), Duration::from_millis(2400));
        assert_eq!(check_delay(&c, 0, -1.0), Duration::from_millis(1600));
        assert_eq!(check_delay(&c, 9, 1.0), Duration::from_secs(360));
    }

    fn info(etag: &str, size: i64, modified: Option<DateTime<Utc>>) -> ObjectInfo {
        ObjectInfo {
            size,
            etag: etag.into(),
            content_type: None,
            last_modified: modified,
        }
    }

    #[test]
    fn an_object_is_complete_when_stable_or_settled() {
        let now = Utc::now();
        let settle = Duration::from_secs(10);
        let fresh = Some(now - chrono::Duration::seconds(1));
        let old = Some(now - chrono::Duration::seconds(11));
        // First sight of a fresh object: look again.
        assert_eq!(
            judge(None, None, &info("a", 1, fresh), now, settle),
            Seen::Unsettled
        );
        // The same twice: complete.
        assert_eq!(
            judge(Some("a"), Some(1), &info("a", 1, fresh), now, settle),
            Seen::Stable
        );
        // Changed since: look again.
        assert_eq!(
            judge(Some("a"), Some(1), &info("b", 2, fresh), now, settle),
            Seen::Unsettled
        );
        assert_eq!(
            judge(Some("a"), Some(1), &info("a", 2, fresh), now, settle),
            Seen::Unsettled
        );
        // Old enough at first sight: complete.
        assert_eq!(
            judge(None, None, &info("a", 1, old), now, settle),
            Seen::Stable
        );
        // No last-modified: only stability counts.
        assert_eq!(
            judge(None, None, &info("a", 1, None), now, settle),
            Seen::Unsettled
        );
        // Multipart ETags are opaque strings.
        assert_eq!(
            judge(Some("abc-3"), Some(9), &info("abc-3", 9, None), now, settle),
            Seen::Stable
        );
    }

    #[test]
    fn the_bucket_allows_the_burst_then_the_rate() {
        let l = HeadLimiter::new(10.0, 3).unwrap();
        let t0 = Instant::now();
        let max = Duration::from_secs(1);
        for _ in 0..3 {
            assert_eq!(l.reserve(t0, max), Ok(Duration::ZERO));
        }
        // Then one every 100 ms.
        assert_eq!(l.reserve(t0, max), Ok(Duration::from_millis(100)));
        assert_eq!(l.reserve(t0, max), Ok(Duration::from_millis(200)));
        // Beyond the longest wait: refused, nothing reserved.
        let small = Duration::from_millis(250);
        assert_eq!(l.reserve(t0, small), Err(Duration::from_millis(300)));
        assert_eq!(l.reserve(t0, small), Err(Duration::from_millis(300)));
        // Later, tokens are due again.
        let t1 = t0 + Duration::from_millis(500);
        assert_eq!(l.reserve(t1, max), Ok(Duration::ZERO));
        // Over any window, the count stays within burst + rate × window.
        let l = HeadLimiter::new(50.0, 5).unwrap();
        let granted = (0..1000)
            .filter(|_| l.reserve(t0, Duration::from_secs(2)).is_ok())
            .count();
        assert_eq!(granted, 5 + 100, "2 s at 50/s plus the burst");
        assert!(HeadLimiter::new(0.0, 5).is_none(), "0 means no limit");
    }
}
