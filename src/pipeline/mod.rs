//! The pipeline: verify the object, then deliver the signed webhook.
//!
//! State machine (each arrow is one `Store::transition`, a compare-and-set
//! with its event; see `ARCHITECTURE.md`):
//!
//! ```text
//! PENDING --Confirm--> VERIFYING --HEAD ok--> VERIFIED --take--> DELIVERING --2xx--> COMPLETED
//!                        |  ^ missing: retry         ^                |   |
//!                        |  +----------              |                |   +--410 / last attempt--> DEAD_LETTER
//!                        +--mismatch / gave up--> FAILED   RETRYING <-+ failed, attempts left
//!
//! PENDING --AUTO check or storage event finds the object--> VERIFYING   (see detect.rs)
//! PENDING --past expires_at (sweep, or Confirm)--> EXPIRED
//! ```
//!
//! The worker loop takes leases from the [`Queue`], runs each job under a
//! concurrency limit, stores the outcome, then acks (or schedules the job
//! again). A job whose webhook is no longer in the status the job expects
//! is acked without effect: duplicates and stale jobs are harmless.

pub mod delivery;
pub mod detect;
pub mod lazy;
pub mod leader;
pub mod memory;
pub mod queue;
pub mod r2_events;
pub mod redis_conn;
pub mod redis_queue;
pub mod redrive;
pub mod retry;
pub mod ssrf;
#[cfg(test)]
pub(crate) mod test_cluster;
#[cfg(test)]
pub(crate) mod test_pki;
pub mod verify;

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use secrecy::ExposeSecret;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, error, info, info_span, warn};

use self::{
    delivery::{
        DeliveryClient, EVENT_UPLOAD_COMPLETED, FileInfo, Payload, rfc3339, signed_headers,
    },
    queue::{Job, JobKind, Lease, Queue, enqueue_logged},
    retry::{Decision, RetryPolicy, classify, decide},
};
use crate::{
    clock::Clock,
    config::Config,
    domain::{Status, TenantId, WebhookId, event_type},
    metrics::METRICS,
    signing::SigningKey,
    storage::Storages,
    store::{
        Changes, NewAttempt, RedriveSource, Store, StoreError, Transition, Webhook, WriteBatcher,
        metadata_of, priority_of, status_of, webhooks::Column as C,
    },
};

/// Webhook rows read for a batch of jobs, by id.
struct Rows(std::collections::HashMap<String, Webhook>);

impl Rows {
    /// The row of this job's webhook, of the job's tenant (`None`: gone).
    fn of(&self, job: &Job) -> Option<Webhook> {
        let w = self.0.get(job.webhook.as_str())?;
        // A batch can hold two jobs of one webhook: each gets a copy.
        (w.tenant_id == job.tenant.as_str()).then(|| w.clone())
    }
}

/// What to do with a lease after its job ran.
enum Step {
    Ack,
    Later(DateTime<Utc>),
}

pub struct Pipeline {
    store: Store,
    /// The jobs' status changes go through it: written in groups.
    writes: WriteBatcher,
    queue: Arc<dyn Queue>,
    storages: Arc<Storages>,
    delivery: DeliveryClient,
    policy: RetryPolicy,
    verify_delays: Vec<Duration>,
    clock: Arc<dyn Clock>,
    /// Worker slots: jobs running at once (`worker.concurrency`).
    workers: Arc<Semaphore>,
    /// A DELIVERING webhook unchanged for this long is no longer in flight.
    stale_after: Duration,
    delivery_timeout: Duration,
    head_timeout: Duration,
    batch_size: usize,
    per_host: HostLimits,
    /// A queued job should have been taken within this time; past it the
    /// reconciler enqueues the webhook again.
    lease: Duration,
    reconcile_every: Duration,
    leader: Arc<dyn leader::Leader>,
    detect: crate::config::DetectConfig,
    /// The AUTO checks' HEAD budget of each storage connection.
    head_limits: detect::HeadLimits,
    /// Verification's HEAD budget of each storage connection.
    verify_head_limits: detect::HeadLimits,
    auto_redrive_after: Option<Duration>,
}

/// Deliveries per target host, in two stages. `per_host` requests at most
/// are in the receiver's hand at once ([`Host::in_hand`], held for the POST
/// only). Before a webhook is claimed for delivery, it takes room at its
/// host ([`Host::room`], [`ROOM_PER_HOST_SLOT`] times as many, held until
/// the POST is answered), so that a claimed webhook waits for a request in
/// hand behind at most `per_host` others. A delivery whose host has no
/// room waits for it without holding a worker slot, so other hosts' work
/// goes ahead; up to `waiting` deliveries wait at once (in order of
/// arrival), and beyond that, or after [`HOST_WAIT_MAX`], the job is put
/// back in the queue for a moment.
struct HostLimits {
    per_host: usize,
    hosts: std::sync::Mutex<std::collections::HashMap<String, Arc<Host>>>,
    /// Places for deliveries waiting for their host.
    waiting: Arc<Semaphore>,
}

/// One receiver host's limits (see [`HostLimits`]).
struct Host {
    room: Arc<Semaphore>,
    in_hand: Arc<Semaphore>,
}

/// Room at a host for a delivery about to be claimed: taken before the
/// claim's write, given back when the POST is answered.
struct HostRoom {
    _room: OwnedSemaphorePermit,
    host: Arc<Host>,
}

/// Room at a host per request it may have in hand. The claim's write
/// happens under the room only, not under a request in hand: held across
/// that write (5 to 9 ms on a loaded machine, against a POST of about
/// 1 ms), the requests in hand limited one host's deliveries to about
/// `per_host_concurrency` per write, and most jobs of a burst were put back.
/// Two: a claimed webhook then waits behind at most `per_host_concurrency`
/// requests, so at most one `delivery.timeout`, and a slow host holds at
/// most twice its limit in jobs.
const ROOM_PER_HOST_SLOT: usize = 2;

/// How long a webhook stays DELIVERING at most while its attempt is alive:
/// the wait for a request in hand at its host (at most one delivery
/// timeout, see [`ROOM_PER_HOST_SLOT`]), then the POST. (What happens
/// between the claim and the request, the write's answer and signing,
/// takes milliseconds; a takeover that cut it that fine would send the
/// webhook twice, which at-least-once delivery allows.)
fn longest_attempt(delivery_timeout: Duration) -> Duration {
    delivery_timeout * 2
}

/// Deliveries that may wait for their host at once, per worker slot. A
/// waiting delivery holds only its queue lease and a small task; one put
/// back costs a queue round trip, its row read again and, for a verify
/// job, a write of its own. With as many places as slots, a burst for one
/// busy host put about every second job back; four per slot measured 10 to
/// 16 % more deliveries per second (docs/benchmarks-history.md), sixteen no more.
const WAITING_PER_WORKER_SLOT: usize = 4;

/// A delivery waits this long at most for its host, then goes back to the
/// queue (and says it is still being worked on, see `deliver`).
const HOST_WAIT_MAX: Duration = Duration::from_secs(5);

/// A verification HEAD gives up after this.
const HEAD_TIMEOUT: Duration = Duration::from_secs(30);

/// The longest one job may run under its queue lease: its HEAD, its wait
/// for room at the receiver's host, and the attempt. A lease shorter than
/// this (`queue.visibility_timeout`) may be handed to another worker while
/// the job still runs; the claim is a compare-and-set, so one of them
/// delivers, but the other's work is wasted and a slow attempt may be sent
/// twice (at-least-once allows it).
pub fn longest_job(delivery_timeout: Duration) -> Duration {
    HEAD_TIMEOUT + HOST_WAIT_MAX + longest_attempt(delivery_timeout)
}

/// When a delivery's host stays busy, its job comes back after this.
const HOST_BUSY_RETRY: chrono::Duration = chrono::Duration::milliseconds(200);

/// A permit from `acquire`, unless the deadline passes or the worker begins
/// stopping first.
async fn until<E>(
    stopping: &CancellationToken,
    deadline: tokio::time::Instant,
    acquire: impl std::future::Future<Output = Result<OwnedSemaphorePermit, E>>,
) -> Option<OwnedSemaphorePermit> {
    tokio::select! {
        biased;
        _ = stopping.cancelled() => None,
        got = tokio::time::timeout_at(deadline, acquire) => got.ok().and_then(Result::ok),
    }
}

/// Counts a delivery in `uploadhook_deliveries_waiting_for_host` while it
/// lives, however the wait ends (a task aborted at shutdown included).
struct WaitingGauge;

impl WaitingGauge {
    fn enter() -> Self {
        METRICS.host_waiting.inc();
        WaitingGauge
    }
}

impl Drop for WaitingGauge {
    fn drop(&mut self) {
        METRICS.host_waiting.dec();
    }
}

/// A running job: its worker slot, which it gives up while it waits for its
/// receiver's host, and how many times its lease was handed out.
struct Running {
    slot: Option<OwnedSemaphorePermit>,
    deliveries: u32,
    /// The worker is stopping: a delivery still waiting for its host is put
    /// back at once, for a worker that stays, instead of starting late or
    /// being cut off at the end of the grace period.
    stopping: CancellationToken,
}

impl HostLimits {
    fn host_of(&self, url: &str) -> Arc<Host> {
        let host = reqwest::Url::parse(url)
            .ok()
            .map(|u| {
                format!(
                    "{}:{}",
                    u.host_str().unwrap_or(""),
                    u.port_or_known_default().unwrap_or(0)
                )
            })
            .unwrap_or_default();
        let mut hosts = self.hosts.lock().expect("host limits lock");
        // Forget idle hosts so that the map does not grow without bound.
        if hosts.len() > 10_000 {
            let room = self.per_host * ROOM_PER_HOST_SLOT;
            hosts.retain(|_, h| h.room.available_permits() < room);
        }
        hosts
            .entry(host)
            .or_insert_with(|| {
                Arc::new(Host {
                    room: Arc::new(Semaphore::new(self.per_host * ROOM_PER_HOST_SLOT)),
                    in_hand: Arc::new(Semaphore::new(self.per_host)),
                })
            })
            .clone()
    }
}

/// `last_error` of an attempt handed back after its process stopped.
const INTERRUPTED: &str =
    "attempt interrupted (process stopped or outcome not stored); sending again";
/// An attempt in DELIVERING handed back: RETRYING, due `now`, saying why.
fn hand_back<'a>(
    tenant: &'a TenantId,
    id: &'a WebhookId,
    now: DateTime<Utc>,
    why: &str,
) -> Transition<'a> {
    Transition::new(
        tenant,
        id,
        &[Status::Delivering],
        Status::Retrying,
        event_type::RETRYING,
        now,
    )
    .changes(
        Changes::new()
            .set(C::NextAttemptAt, Some(now))
            .set(C::LastError, Some(why.to_string())),
    )
}

/// `last_error` of an attempt handed back before it was sent.
const NOT_SENT: &str =
    "attempt not sent: its worker stopped while it waited for its host; sending again";
/// Delay between HEADs while the storage answers with errors.
const STORAGE_ERROR_RETRY: Duration = Duration::from_secs(10);

impl Pipeline {
    pub fn new(
        cfg: &Config,
        writes: WriteBatcher,
        queue: Arc<dyn Queue>,
        storages: Arc<Storages>,
        delivery: DeliveryClient,
        clock: Arc<dyn Clock>,
        leader: Arc<dyn leader::Leader>,
    ) -> Self {
        Self {
            store: writes.store().clone(),
            writes,
            queue,
            storages,
            delivery,
            policy: RetryPolicy {
                schedule: cfg.delivery.retry_schedule.clone(),
                jitter: cfg.delivery.jitter,
                min_retry_after: cfg.delivery.min_retry_after,
                max_retry_after: cfg.delivery.max_retry_after,
            },
            verify_delays: cfg.verify.missing_retry_delays.clone(),
            clock,
            workers: Arc::new(Semaphore::new(cfg.worker.concurrency)),
            stale_after: longest_attempt(cfg.delivery.timeout)
                + cfg.server.shutdown_grace
                + Duration::from_secs(30),
            delivery_timeout: cfg.delivery.timeout,
            head_timeout: HEAD_TIMEOUT,
            batch_size: cfg.worker.batch_size,
            per_host: HostLimits {
                per_host: cfg.worker.per_host_concurrency,
                hosts: Default::default(),
                waiting: Arc::new(Semaphore::new(
                    cfg.worker.concurrency * WAITING_PER_WORKER_SLOT,
                )),
            },
            lease: cfg.queue.visibility_timeout,
            reconcile_every: cfg.queue.reconcile_every,
            leader,
            detect: cfg.detect.clone(),
            head_limits: detect::HeadLimits::new(cfg.detect.head_rate, cfg.detect.head_burst),
            verify_head_limits: detect::HeadLimits::new(
                cfg.verify.head_rate,
                cfg.verify.head_burst,
            ),
            auto_redrive_after: cfg.delivery.auto_redrive_after,
        }
    }

    /// Rebuilds the queue from the database: every webhook the pipeline
    /// owes work to is enqueued again. Returns how many were.
    ///
    /// A webhook caught in DELIVERING is handed back only once it is stale
    /// (no change for `stale_after`): another process may still be
    /// delivering it. [`Pipeline::sweep_stale`] catches the rest later.
    pub async fn recover(&self) -> Result<usize, StoreError> {
        let rows = self.store.queued_webhooks().await?;
        let mut n = 0;
        for w in rows {
            let (kind, due) = match status_of(&w) {
                Ok(Status::Verifying) => (JobKind::Verify, None),
                Ok(Status::Verified) => (JobKind::Deliver, None),
                Ok(Status::Retrying) => (JobKind::Deliver, w.next_attempt_at),
                Ok(Status::Delivering) => {
                    n += usize::from(self.hand_back_if_stale(&w).await?);
                    continue;
                }
                Ok(_) => continue,
                Err(e) => {
                    error!(webhook_id = %w.id, error = %e, "skipping a corrupt row at recovery");
                    continue;
                }
            };
            let job = Job {
                kind,
                priority: priority_of(&w),
                tenant: TenantId::from_trusted(w.tenant_id.clone()),
                webhook: WebhookId::from_trusted(w.id.clone()),
            };
            if let Err(e) = self.queue.enqueue(job, due).await {
                warn!(error = %e, "re-enqueueing at start-up failed; the webhook stays in the database");
            } else {
                n += 1;
            }
        }
        n += self.recover_checks().await?;
        Ok(n)
    }

    /// Hands back DELIVERING webhooks whose attempt can no longer be in
    /// flight anywhere: the process that claimed them stopped (or its
    /// outcome write failed). They go to RETRYING, due now, and are sent
    /// again with the same `webhook-id` (at-least-once).
    pub async fn sweep_stale(&self) -> Result<usize, StoreError> {
        let mut n = 0;
        for w in self.store.webhooks_in(Status::Delivering).await? {
            n += usize::from(self.hand_back_if_stale(&w).await?);
        }
        Ok(n)
    }

    /// Puts back what the queue should hold but may not: stale DELIVERING
    /// webhooks, and queued webhooks whose job is overdue by more than the
    /// lease (Redis lost its data, or an enqueue failed after a commit).
    /// Duplicates are harmless: workers act only on the status they expect.
    pub async fn reconcile(&self) -> Result<usize, StoreError> {
        let mut n = self.sweep_stale().await?;
        let before = self.clock.now() - chrono::Duration::from_std(self.lease).unwrap_or_default();
        for w in self.store.overdue_queued(before, 1000).await? {
            let kind = match status_of(&w) {
                Ok(Status::Verifying) => JobKind::Verify,
                Ok(Status::Verified | Status::Retrying) => JobKind::Deliver,
                _ => continue,
            };
            let job = Job {
                kind,
                priority: priority_of(&w),
                tenant: TenantId::from_trusted(w.tenant_id.clone()),
                webhook: WebhookId::from_trusted(w.id.clone()),
            };
            if self.queue.enqueue(job, None).await.is_ok() {
                n += 1;
            }
        }
        n += self.reconcile_checks().await?;
        n += self.auto_redrive().await?;
        Ok(n)
    }

    /// Redrives, once per webhook, dead letters older than
    /// `delivery.auto_redrive_after`. Returns how many were.
    pub async fn auto_redrive(&self) -> Result<usize, StoreError> {
        let Some(after) = self.auto_redrive_after else {
            return Ok(0);
        };
        let now = self.clock.now();
        let before = now - chrono::Duration::from_std(after).unwrap_or(chrono::Duration::MAX);
        let mut n = 0;
        for w in self.store.auto_redrive_due(before, 500).await? {
            if let redrive::Outcome::Redriven(_, job) =
                redrive::redrive(&self.store, &w, RedriveSource::Auto, now).await?
            {
                info!(webhook_id = %w.id, tenant_id = %w.tenant_id, "dead letter redriven automatically");
                enqueue_logged(&*self.queue, job).await;
                n += 1;
            }
        }
        Ok(n)
    }

    async fn hand_back_if_stale(&self, w: &Webhook) -> Result<bool, StoreError> {
        let now = self.clock.now();
        let stale_before = now - chrono::Duration::from_std(self.stale_after).unwrap_or_default();
        if w.updated_at > stale_before {
            return Ok(false);
        }
        let tenant = TenantId::from_trusted(w.tenant_id.clone());
        let id = WebhookId::from_trusted(w.id.clone());
        let moved = self
            .store
            .transition(
                hand_back(&tenant, &id, now, INTERRUPTED).unchanged_since(Some(w.updated_at)),
            )
            .await?;
        if moved.is_none() {
            return Ok(false);
        }
        let job = Job {
            kind: JobKind::Deliver,
            priority: priority_of(w),
            tenant,
            webhook: id,
        };
        if let Err(e) = self.queue.enqueue(job, None).await {
            warn!(error = %e, "re-enqueueing a stale delivery failed; the next sweep retries");
        }
        Ok(true)
    }

    /// Runs the worker loop until `shutdown`, then waits up to `grace` for
    /// jobs in flight. A job cut off by the grace period is not lost: its
    /// status in the database puts it back in the queue at the next start.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken, grace: Duration) {
        let permits = self.workers.clone();
        let mut tasks = tokio::task::JoinSet::new();
        let sweeper = {
            let this = self.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(this.reconcile_every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let mut expiry = tokio::time::interval(this.detect.expiry_sweep_every);
                expiry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    // The expiry sweep runs under the reconciler's lease:
                    // one process at a time (a second would find nothing
                    // to move, since expiry is a compare-and-set).
                    let sweep_expiry = tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tick.tick() => false,
                        _ = expiry.tick() => true,
                    };
                    // Both ticks renew the lease; the reconciler's keeps it
                    // alive however long the expiry interval is.
                    if !this.leader.try_lead(this.reconcile_every * 2).await {
                        continue;
                    }
                    if sweep_expiry {
                        match this.sweep_expired().await {
                            Ok(0) => {}
                            Ok(n) => info!(expired = n, "expiry sweep"),
                            Err(e) => warn!(error = %e, "expiry sweep failed"),
                        }
                        continue;
                    }
                    match this.reconcile().await {
                        Ok(0) => {}
                        Ok(n) => info!(requeued = n, "reconciler put work back in the queue"),
                        Err(e) => warn!(error = %e, "reconciling failed"),
                    }
                }
            })
        };
        loop {
            // Wait for a free slot before taking work, so that taken work
            // starts at once.
            let available = permits.available_permits().min(self.batch_size);
            let want = if available == 0 {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    p = permits.clone().acquire_owned() => { drop(p); 1 }
                }
            } else {
                available
            };
            let leases = tokio::select! {
                _ = shutdown.cancelled() => break,
                r = self.queue.take(want, Duration::from_secs(1)) => r,
            };
            let leases = match leases {
                Ok(l) => l,
                Err(e) => {
                    warn!(error = %e, "taking work from the queue failed; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            // The rows of the jobs taken together, in one query.
            let rows = self.read_rows(&leases).await;
            for lease in leases {
                let permit = permits
                    .clone()
                    .acquire_owned()
                    .await
                    .expect("semaphore open");
                let row = rows.as_ref().map(|rows| rows.of(&lease.job));
                let this = self.clone();
                let stopping = shutdown.clone();
                // A job's future is tens of kilobytes: made and boxed inside
                // the task, it is not copied into the task on spawn.
                tasks.spawn(
                    async move { Box::pin(this.process(lease, row, permit, stopping)).await },
                );
            }
            // Reap finished tasks so that the set does not grow.
            while tasks.try_join_next().is_some() {}
        }
        sweeper.abort();
        info!(in_flight = tasks.len(), "worker stopping");
        let drained =
            tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} }).await;
        if drained.is_err() {
            warn!(
                cut_off = tasks.len(),
                "shutdown grace over; jobs cut off are re-queued from the database at next start"
            );
            tasks.abort_all();
        }
    }

    /// The rows of the taken jobs' webhooks, read together; `None` if that
    /// failed (each job then reads its own, and fails on its own).
    async fn read_rows(&self, leases: &[Lease]) -> Option<Rows> {
        if leases.len() < 2 {
            return None;
        }
        let keys: Vec<(&TenantId, &WebhookId)> = leases
            .iter()
            .map(|l| (&l.job.tenant, &l.job.webhook))
            .collect();
        match self.store.find_webhooks(&keys).await {
            Ok(found) => Some(Rows(found.into_iter().map(|w| (w.id.clone(), w)).collect())),
            Err(e) => {
                warn!(error = %e, jobs = leases.len(), "reading the batch's webhooks failed; each job reads its own");
                None
            }
        }
    }

    /// Runs one job. `row` is its webhook as read with its batch (`None`:
    /// not read yet). `stopping`: the worker's shutdown.
    async fn process(
        &self,
        lease: Lease,
        row: Option<Option<Webhook>>,
        slot: OwnedSemaphorePermit,
        stopping: CancellationToken,
    ) {
        let job = &lease.job;
        let mut running = Running {
            slot: Some(slot),
            deliveries: lease.deliveries,
            stopping,
        };
        // The row first: its trace is the parent of this job's span.
        let row = match row {
            Some(row) => Ok(row),
            None => self.store.find_webhook(&job.tenant, &job.webhook).await,
        };
        let span = info_span!(
            "job",
            otel.name = %format_args!("{} webhook", job.kind.as_str()),
            otel.kind = "consumer",
            kind = job.kind.as_str(),
            webhook_id = %job.webhook,
            tenant_id = %job.tenant,
        );
        if let Ok(Some(w)) = &row {
            crate::telemetry::set_parent(&span, w.traceparent.as_deref());
        }
        async {
            let step = match row {
                // Gone (deleted with its tenant): nothing to do.
                Ok(None) => Ok(Step::Ack),
                Err(e) => Err(e),
                Ok(Some(w)) => match job.kind {
                    // A verify job goes on to deliver (see `verify`); put
                    // back for later, it finds the webhook past VERIFYING.
                    JobKind::Verify if status_of(&w).ok() == Some(Status::Verifying) => {
                        self.verify(job, w, &mut running).await
                    }
                    JobKind::Verify | JobKind::Deliver => self.deliver(job, w, &mut running).await,
                    JobKind::Check => self.check(job, w).await,
                },
            };
            let res = match step {
                Ok(Step::Ack) => self.queue.ack(&lease).await,
                Ok(Step::Later(at)) => self.queue.retry_later(&lease, at).await,
                Err(e @ StoreError::Corrupt(_)) => {
                    error!(error = %e, "corrupt webhook row; job dropped, the row needs repair");
                    self.queue.ack(&lease).await
                }
                Err(e) => {
                    // The database failed: try the job again shortly. Its
                    // status was not changed, so nothing is lost.
                    warn!(error = %e, "job failed; retrying in 5s");
                    let at = self.clock.now() + chrono::Duration::seconds(5);
                    self.queue.retry_later(&lease, at).await
                }
            };
            if let Err(e) = res {
                warn!(error = %e, "queue update failed; the database will re-queue the job");
            }
        }
        .instrument(span)
        .await
    }

    /// HEADs the object; once it is verified, delivers in the same job
    /// (no second trip through the queue and no second read of the row).
    async fn verify(
        &self,
        job: &Job,
        w: Webhook,
        running: &mut Running,
    ) -> Result<Step, StoreError> {
        if status_of(&w)? != Status::Verifying {
            return Ok(Step::Ack);
        }
        let now = self.clock.now();
        let fail = |reason: String| {
            Transition::new(
                &job.tenant,
                &job.webhook,
                &[Status::Verifying],
                Status::Failed,
                event_type::VERIFICATION_FAILED,
                now,
            )
            .changes(Changes::new().set(C::LastError, Some(reason)))
        };
        // Still VERIFYING, with a visible step: the object will be looked
        // at again.
        let look_again = |changes: Changes| {
            Transition::new(
                &job.tenant,
                &job.webhook,
                &[Status::Verifying],
                Status::Verifying,
                event_type::VERIFY_RETRY,
                now,
            )
            .changes(changes)
        };
        let storage = match self.storages.resolve(&w.storage) {
            Ok(s) => s,
            Err(e) => {
                self.writes
                    .transition(fail(format!(
                        "storage connection `{}` is no longer configured: {e}",
                        w.storage
                    )))
                    .await?;
                return Ok(Step::Ack);
            }
        };
        self.verify_head_limits.acquire(&w.storage).await;
        // Boxed: the HEAD's future is large, and the timeout would copy it.
        let head = tokio::time::timeout(self.head_timeout, Box::pin(storage.head(&w.object_key)))
            .await
            .unwrap_or_else(|_| {
                Err(crate::storage::StorageError::InvalidInput(format!(
                    "no answer within {}s",
                    self.head_timeout.as_secs()
                )))
            });
        // The HEAD (and its budget) may have taken a while: what follows
        // is stamped with the time it happens.
        let now = self.clock.now();
        let missing_reason = match head {
            Ok(Some(info)) => {
                match verify::check_object(
                    w.client_etag.as_deref(),
                    w.expected_size,
                    &info.etag,
                    info.size,
                ) {
                    Ok(()) => {
                        METRICS.verification("verified");
                        let changes = Changes::new()
                            .set(C::Size, Some(info.size))
                            .set(C::Etag, Some(verify::normalize_etag(&info.etag)))
                            .set(
                                C::ContentType,
                                info.content_type.clone().unwrap_or(w.content_type.clone()),
                            )
                            .set(C::ObjectLastModified, info.last_modified)
                            .set(C::VerifiedAt, Some(now))
                            .set(C::LastError, None::<String>);
                        let verified = Transition::new(
                            &job.tenant,
                            &job.webhook,
                            &[Status::Verifying],
                            Status::Verified,
                            event_type::VERIFIED,
                            now,
                        )
                        .changes(changes);
                        let deliver_span = info_span!(
                            "deliver",
                            otel.name = "deliver webhook",
                            otel.kind = "consumer",
                        );
                        // Wait for room at the receiver's host first (the
                        // worker slot given back meanwhile), so that the
                        // webhook is verified and claimed in one write
                        // (both events stored). VERIFIED is stored a
                        // little later that way, never lost: if this
                        // process stops while waiting, the job comes back
                        // and verifies again.
                        if let Some(room) = self.wait_for_host(&w.url, running).await {
                            let now = self.clock.now();
                            let claim = Transition {
                                to: Status::Delivering,
                                event: event_type::DELIVERING,
                                now,
                                ..verified
                            }
                            .through(Status::Verified, event_type::VERIFIED);
                            return match self.writes.transition(claim).await? {
                                Some(claimed) => {
                                    self.attempt(job, claimed, room, running)
                                        .instrument(deliver_span)
                                        .await
                                }
                                None => Ok(Step::Ack),
                            };
                        }
                        // The host stayed busy: store VERIFIED and put the
                        // job back, to deliver when it comes round.
                        let verified = Transition {
                            now: self.clock.now(),
                            ..verified
                        };
                        if self.writes.transition(verified).await?.is_some() {
                            return Ok(Step::Later(self.clock.now() + HOST_BUSY_RETRY));
                        }
                    }
                    Err(reason) => {
                        METRICS.verification("mismatch");
                        self.writes.transition(fail(reason)).await?;
                    }
                }
                return Ok(Step::Ack);
            }
            Ok(None) => {
                METRICS.verification("missing");
                format!("object {}/{} not found", w.bucket, w.object_key)
            }
            Err(e) => {
                METRICS.verification("storage_error");
                // The storage did not answer properly: that says nothing
                // about the object. Look again every few seconds, without
                // using up the missing-object checks, until the webhook's
                // own expiry; only then give up, visibly.
                let reason = format!("HEAD {}/{} failed: {e}", w.bucket, w.object_key);
                if now >= w.expires_at {
                    self.writes
                        .transition(fail(format!("{reason}; gave up at expires_at")))
                        .await?;
                    return Ok(Step::Ack);
                }
                if w.last_error.as_deref() != Some(reason.as_str()) {
                    warn!(error = %reason, "storage error during verification; retrying");
                    self.writes
                        .transition(look_again(Changes::new().set(C::LastError, Some(reason))))
                        .await?;
                } else {
                    // Same error again: no new event, but show that the
                    // webhook is being worked on, so that the reconciler
                    // does not queue another copy of this job.
                    self.writes
                        .touch(&job.tenant, &job.webhook, Status::Verifying, now)
                        .await?;
                }
                return Ok(Step::Later(
                    now + chrono::Duration::from_std(STORAGE_ERROR_RETRY).unwrap_or_default(),
                ));
            }
        };
        // Missing: storage can be eventually consistent right after an
        // upload, so look again a few times.
        let done = w.verify_attempts as usize;
        if let Some(delay) = self.verify_delays.get(done) {
            let moved = self
                .writes
                .transition(look_again(
                    Changes::new()
                        .set(C::VerifyAttempts, w.verify_attempts + 1)
                        .set(C::LastError, Some(missing_reason)),
                ))
                .await?;
            if moved.is_some() {
                return Ok(Step::Later(
                    now + chrono::Duration::from_std(*delay).unwrap_or_default(),
                ));
            }
            return Ok(Step::Ack);
        }
        self.writes
            .transition(fail(format!("{missing_reason} after {} checks", done + 1)))
            .await?;
        Ok(Step::Ack)
    }

    async fn deliver(
        &self,
        job: &Job,
        w: Webhook,
        running: &mut Running,
    ) -> Result<Step, StoreError> {
        let deliveries = running.deliveries;
        let status = status_of(&w)?;
        let now = self.clock.now();
        // A job handed out again after its visibility timeout, whose webhook
        // is still DELIVERING for longer than any attempt lasts: the worker
        // that claimed it died mid-attempt. Take the attempt over.
        let taken_over = status == Status::Delivering
            && deliveries > 1
            && w.updated_at
                + chrono::Duration::from_std(longest_attempt(self.delivery_timeout))
                    .unwrap_or_default()
                < now;
        if !matches!(status, Status::Verified | Status::Retrying) && !taken_over {
            return Ok(Step::Ack);
        }
        if status == Status::Retrying
            && let Some(due) = w.next_attempt_at
            && due > now + chrono::Duration::milliseconds(50)
        {
            // An early copy of the job (e.g. a redrive raced a retry): wait.
            return Ok(Step::Later(due));
        }
        let Some(room) = self.wait_for_host(&w.url, running).await else {
            // This receiver already has its share of attempts in flight,
            // and enough deliveries wait for it: put the job back.
            // A job waiting this way for long is still being worked on:
            // say so now and then, or the reconciler would queue copies.
            let now = self.clock.now();
            if now - w.updated_at > chrono::Duration::from_std(self.lease / 2).unwrap_or_default() {
                self.writes
                    .touch(&job.tenant, &job.webhook, status, now)
                    .await?;
            }
            return Ok(Step::Later(now + HOST_BUSY_RETRY));
        };
        // Claim the attempt: only one worker moves it to DELIVERING.
        let now = self.clock.now();
        let Some(w) = self
            .writes
            .transition(
                Transition::new(
                    &job.tenant,
                    &job.webhook,
                    &[status],
                    Status::Delivering,
                    event_type::DELIVERING,
                    now,
                )
                // Unchanged since it was read: while this job waited for
                // the host, another copy of it may have made an attempt and
                // scheduled a retry, which must keep its delay.
                .unchanged_since(Some(w.updated_at)),
            )
            .await?
        else {
            return Ok(Step::Ack);
        };
        self.attempt(job, w, room, running).await
    }

    /// One delivery attempt of a webhook this job claimed (DELIVERING),
    /// under its host's limit: a request in hand at the host, the POST,
    /// then the outcome stored. The host's request and room are given back
    /// as soon as the POST is answered: the limit is on requests the
    /// receiver has in hand, not on our bookkeeping before or after.
    async fn attempt(
        &self,
        job: &Job,
        w: Webhook,
        room: HostRoom,
        running: &mut Running,
    ) -> Result<Step, StoreError> {
        // Held instead of the worker slot by a delivery that waited for its
        // request, until the request is answered.
        let mut place = None;
        let in_hand = match room.host.in_hand.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                // Behind at most `per_host_concurrency` requests (see
                // `ROOM_PER_HOST_SLOT`). With a waiting place free, the
                // worker slot goes back meanwhile, so that a slow host
                // holds no more of them, and the request is sent under
                // the place: deliveries without a slot stay within the
                // places (`WAITING_PER_WORKER_SLOT`). Without one, it
                // waits in its slot.
                if let Ok(p) = self.per_host.waiting.clone().try_acquire_owned() {
                    place = Some(p);
                    running.slot = None;
                }
                let got = {
                    let _waiting = WaitingGauge::enter();
                    tokio::select! {
                        biased;
                        _ = running.stopping.cancelled() => None,
                        p = room.host.in_hand.clone().acquire_owned() => p.ok(),
                    }
                };
                match got {
                    Some(p) => p,
                    None => return self.hand_back_unsent(job, w.updated_at).await,
                }
            }
        };
        let attempt = w.attempt_count + 1;
        let started_at = self.clock.now();
        let keys = self
            .store
            .signing_secrets(&w, started_at)
            .map_err(|e| e.to_string())
            .and_then(|secrets| {
                secrets
                    .iter()
                    .map(|s| SigningKey::from_secret(s.expose_secret()).map_err(|e| e.to_string()))
                    .collect::<Result<Vec<_>, _>>()
            });
        let response = match keys {
            Ok(keys) => {
                let body = self.payload(&w);
                let mut headers = signed_headers(&keys, &w.id, started_at.timestamp(), &body);
                // The receiver's handler can continue this webhook's trace.
                if let Some(tp) = crate::telemetry::current_traceparent() {
                    headers.push(("traceparent", tp));
                }
                self.delivery
                    .post(&w.url, &headers, Bytes::from(body))
                    .await
            }
            Err(e) => delivery::Response {
                error: Some(format!("signing secret is unusable: {e}")),
                ..Default::default()
            },
        };
        drop(in_hand);
        drop(place);
        drop(room);
        let now = self.clock.now();
        let outcome = classify(response.status, response.retry_after.as_deref(), now);
        let round_attempt = (attempt - w.attempt_base).max(1) as u32;
        let decision = decide(
            &self.policy,
            round_attempt,
            &outcome,
            rand::random_range(-1.0..=1.0),
        );
        let error = response.error.clone().or_else(|| match response.status {
            Some(s) if !(200..300).contains(&s) => Some(format!("receiver answered {s}")),
            _ => None,
        });
        let record = NewAttempt {
            number: attempt,
            started_at,
            duration_ms: response.duration.as_millis() as i64,
            response_status: response.status.map(i32::from),
            response_body: response.body.clone(),
            error: error.clone(),
        };
        info!(attempt, status = ?response.status, ?decision, "delivery attempt");
        match &decision {
            Decision::Complete => {
                METRICS.delivery("completed", response.duration);
                METRICS.finished("completed", attempt - w.attempt_base);
                if let Some(verified) = w.verified_at {
                    METRICS
                        .delivery_lag
                        .observe((now - verified).to_std().unwrap_or_default().as_secs_f64());
                }
            }
            Decision::Retry { .. } => METRICS.delivery("retry", response.duration),
            Decision::DeadLetter { .. } => {
                METRICS.delivery("dead_letter", response.duration);
                METRICS.finished("dead_letter", attempt - w.attempt_base);
            }
        }
        let base = Changes::new().set(C::AttemptCount, attempt);
        let (to, event, changes, dead_letter, step) = match decision {
            Decision::Complete => (
                Status::Completed,
                event_type::DELIVERED,
                base.set(C::CompletedAt, Some(now))
                    .set(C::NextAttemptAt, None::<DateTime<Utc>>)
                    .set(C::LastError, None::<String>),
                None,
                Step::Ack,
            ),
            Decision::Retry { delay } => {
                let at = now + chrono::Duration::from_std(delay).unwrap_or_default();
                (
                    Status::Retrying,
                    event_type::RETRYING,
                    base.set(C::NextAttemptAt, Some(at))
                        .set(C::LastError, error.clone()),
                    None,
                    Step::Later(at),
                )
            }
            Decision::DeadLetter { reason } => {
                let reason = match &error {
                    Some(e) => format!("{reason}; last error: {e}"),
                    None => reason,
                };
                (
                    Status::DeadLetter,
                    event_type::DEAD_LETTERED,
                    base.set(C::NextAttemptAt, None::<DateTime<Utc>>)
                        .set(C::LastError, Some(reason.clone())),
                    Some(reason),
                    Step::Ack,
                )
            }
        };
        // The attempt happened: store its outcome, retrying a failing
        // database for a while. If it still fails, the webhook stays
        // DELIVERING and the stale sweep sends it again later.
        let changes = changes.0;
        let mut backoff = Duration::from_millis(100);
        let mut tries = 0;
        let moved = loop {
            let res = self
                .writes
                .moved(
                    Transition::new(
                        &job.tenant,
                        &job.webhook,
                        &[Status::Delivering],
                        to,
                        event,
                        now,
                    )
                    .changes(Changes(changes.clone()))
                    .attempt(record.clone())
                    .dead_letter_opt(dead_letter.clone()),
                )
                .await;
            match res {
                Ok(m) => break m,
                Err(e) if tries < 8 => {
                    tries += 1;
                    warn!(error = %e, tries, "storing the attempt outcome failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
                Err(e) => return Err(e),
            }
        };
        Ok(if moved { step } else { Step::Ack })
    }

    /// A claimed attempt not sent because the worker is stopping goes back
    /// to RETRYING, due now, for a worker that stays (as an interrupted
    /// attempt does, see `hand_back_if_stale`), instead of waiting to be
    /// cut off by the shutdown grace and sent only once it is stale.
    /// `claimed_at`: the claim's time; a copy that took the attempt over
    /// since then keeps it.
    async fn hand_back_unsent(
        &self,
        job: &Job,
        claimed_at: DateTime<Utc>,
    ) -> Result<Step, StoreError> {
        let now = self.clock.now();
        let moved = self
            .writes
            .transition(
                hand_back(&job.tenant, &job.webhook, now, NOT_SENT)
                    .unchanged_since(Some(claimed_at)),
            )
            .await?;
        Ok(if moved.is_some() {
            Step::Later(now)
        } else {
            Step::Ack
        })
    }

    /// Room at `url`'s host for a delivery (see [`HostLimits`]). When the
    /// host has none, waits for it (in order of arrival) after giving the
    /// worker slot back, and takes a worker slot again, both within
    /// [`HOST_WAIT_MAX`]. `None`: too many deliveries wait already, the
    /// wait ran out, or the worker began stopping meanwhile (the job may
    /// then hold no worker slot).
    async fn wait_for_host(&self, url: &str, running: &mut Running) -> Option<HostRoom> {
        let host = self.per_host.host_of(url);
        let room = |p| HostRoom {
            _room: p,
            host: host.clone(),
        };
        if let Ok(p) = host.room.clone().try_acquire_owned() {
            return Some(room(p));
        }
        let place = self.per_host.waiting.clone().try_acquire_owned().ok()?;
        let deadline = tokio::time::Instant::now() + HOST_WAIT_MAX;
        running.slot = None;
        let got = {
            let _waiting = WaitingGauge::enter();
            until(
                &running.stopping,
                deadline,
                host.room.clone().acquire_owned(),
            )
            .await
        };
        drop(place);
        if running.stopping.is_cancelled() {
            return None;
        }
        // A worker slot again, by the same deadline; past it, the host's
        // permit goes back for others, and the job is put back (which
        // needs no slot).
        running.slot = until(
            &running.stopping,
            deadline,
            self.workers.clone().acquire_owned(),
        )
        .await;
        if running.stopping.is_cancelled() {
            // Stopping while it waited for a worker slot (running jobs
            // free theirs during the grace period): put it back rather
            // than start it now.
            return None;
        }
        running.slot.as_ref().and(got).map(room)
    }

    fn payload(&self, w: &Webhook) -> Vec<u8> {
        let object_url = self
            .storages
            .resolve(&w.storage)
            .map(|s| s.object_url(&w.object_key))
            .unwrap_or_default();
        Payload {
            event: EVENT_UPLOAD_COMPLETED,
            webhook_id: &w.id,
            timestamp: rfc3339(w.verified_at.unwrap_or(w.updated_at)),
            file: FileInfo {
                url: &object_url,
                filename: &w.filename,
                key: &w.object_key,
                size: w.size.unwrap_or_default(),
                content_type: &w.content_type,
                etag: w.etag.as_deref().unwrap_or_default(),
            },
            provider: &w.provider,
            metadata: metadata_of(w),
        }
        .to_json()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_lease_outlasts_the_longest_job() {
        let cfg = Config::from_toml("").unwrap();
        // 30 s HEAD + 5 s for the host + twice the 15 s delivery timeout.
        assert_eq!(longest_job(cfg.delivery.timeout), Duration::from_secs(65));
        assert!(cfg.queue.visibility_timeout > longest_job(cfg.delivery.timeout));
    }
}
