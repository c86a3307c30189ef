//! Event fan-out: wakes readers of the event log (StreamEvents), and the
//! follower that turns the log into one resumable stream.
//!
//! The stored events are the truth; a bus only tells subscribers that an
//! event was committed. The embedded deployment uses an in-process
//! broadcast ([`LocalEventBus`]); a scaled-out deployment adds Redis
//! pub/sub ([`redis::RedisEventBus`]) so that an event committed by a
//! worker in another process wakes the streams of an API process.
//!
//! [`follow`] is the one reader: it subscribes to the bus *before* it reads
//! the store, then re-reads the store after its cursor on every wake-up, so
//! the switch from replay to live has no gap and no duplicate, and a lagged
//! or lost wake-up costs only latency (a lagged receiver re-reads; while
//! the bus is down the follower polls the store).
//!
//! Event ids come from a database sequence, and transactions may commit out
//! of id order: id 11 can be visible while id 10 is still being committed.
//! A cursor that jumped to 11 would lose 10. The follower therefore only
//! advances over ids that are contiguous among committed events. A hole
//! waits until its event commits (its commit wakes the follower), or, after
//! `gap_grace`, is taken for an id that will never commit (a rolled-back
//! transaction, a sequence jump after a crash) and skipped.

pub mod redis;

use std::{
    sync::{
        Arc,
        atomic::{AtomicI64, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures_util::future::BoxFuture;
use tokio::{
    sync::{OwnedSemaphorePermit, broadcast, mpsc, oneshot},
    time::{Instant, sleep, sleep_until, timeout},
};
use tokio_util::sync::CancellationToken;

use crate::domain::{Status, TenantId, WebhookId};

/// One committed step in a webhook's life.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Monotonic per deployment (the database sequence): the resume cursor.
    pub id: i64,
    pub tenant_id: TenantId,
    pub webhook_id: WebhookId,
    pub kind: String,
    pub status: Status,
    pub occurred_at: DateTime<Utc>,
}

pub trait EventBus: Send + Sync + 'static {
    /// Called after the event's transaction committed.
    fn publish(&self, event: Event);
    /// Receives every event published from now on. A lagging receiver
    /// misses events (`RecvError::Lagged`) and must re-read the store.
    fn subscribe(&self) -> broadcast::Receiver<Arc<Event>>;
    /// Whether every committed event is being announced. `false` while a
    /// cross-process bus is disconnected, or not subscribed because no
    /// stream listened here: followers then poll the store.
    fn live(&self) -> bool {
        true
    }
    /// Changes each time the bus becomes live again (a new subscription):
    /// what was published before it was not announced here, so a follower
    /// that saw another value reads the store, even if it never saw
    /// `live()` false in between.
    fn epoch(&self) -> u64 {
        0
    }
    /// Resolves when the bus is live, or when it will not be soon: a bus
    /// that subscribes once a stream listens (the Redis bus) is given
    /// `within` to do so, one that is disconnected is not waited for.
    /// Called by a new stream after [`EventBus::subscribe`] and before it
    /// reads the store, so that its first read comes after the
    /// subscription. The in-process bus is always live.
    fn ready(&self, within: Duration) -> BoxFuture<'_, ()> {
        let _ = within;
        Box::pin(std::future::ready(()))
    }
}

/// In-process fan-out over a bounded broadcast channel.
pub struct LocalEventBus {
    tx: broadcast::Sender<Arc<Event>>,
}

impl LocalEventBus {
    pub fn new(capacity: usize) -> Self {
        let (tx, _) = broadcast::channel(capacity);
        Self { tx }
    }

    /// Whether anything (a stream's follower) listens now. A follower
    /// subscribes before it reads the store, so an event published while
    /// nothing listens wakes no one that needs it.
    pub fn has_subscribers(&self) -> bool {
        self.tx.receiver_count() > 0
    }
}

impl EventBus for LocalEventBus {
    fn publish(&self, event: Event) {
        // No subscriber is not an error: the event is stored either way.
        let _ = self.tx.send(Arc::new(event));
    }

    fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        self.tx.subscribe()
    }
}

/// What a follower reads: the event log (the `Store`, or a fake in tests).
#[async_trait]
pub trait EventLog: Send + Sync + 'static {
    /// Ids of committed events after `after`, ascending, of every tenant.
    /// Only ids: the follower needs them to find holes in the sequence.
    async fn committed_ids_after(&self, after: i64, limit: u64) -> Result<Vec<i64>, String>;
    /// The tenant's events in `(after, upto]`, ascending.
    async fn events_between(
        &self,
        tenant: &TenantId,
        webhook: Option<&WebhookId>,
        after: i64,
        upto: i64,
        limit: u64,
    ) -> Result<Vec<Event>, String>;
    /// The highest committed event id (0 when there is none).
    async fn last_event_id(&self) -> Result<i64, String>;
}

/// Which events a stream carries. Always one tenant's.
#[derive(Debug, Clone)]
pub struct EventFilter {
    pub tenant: TenantId,
    pub webhook: Option<WebhookId>,
    /// Empty: every type.
    pub types: Vec<String>,
    /// Empty: every status.
    pub statuses: Vec<Status>,
}

impl EventFilter {
    pub fn matches(&self, e: &Event) -> bool {
        e.tenant_id == self.tenant
            && self.webhook.as_ref().is_none_or(|w| *w == e.webhook_id)
            && (self.types.is_empty() || self.types.contains(&e.kind))
            && (self.statuses.is_empty() || self.statuses.contains(&e.status))
    }

    /// Whether a wake-up about `e` may concern this stream.
    fn concerns(&self, e: &Event) -> bool {
        e.tenant_id == self.tenant && self.webhook.as_ref().is_none_or(|w| *w == e.webhook_id)
    }
}

/// Tuning of one stream (`[streams]` in the configuration).
#[derive(Debug, Clone)]
pub struct StreamConfig {
    /// Messages queued for a reader before the follower waits.
    pub buffer: usize,
    /// A heartbeat is sent after this long without a message.
    pub heartbeat_every: Duration,
    /// A reader that takes nothing for this long loses its stream.
    pub slow_reader_timeout: Duration,
    /// How often the store is polled while the bus is not live, or while
    /// a hole in the ids is pending.
    pub poll_every: Duration,
    /// How long a hole in the ids may stay open before it is skipped.
    pub gap_grace: Duration,
}

/// One message of a stream.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamItem {
    Event(Event),
    Heartbeat(DateTime<Utc>),
}

/// Why a stream ended early.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamEnd {
    /// The reader did not keep up; it should resume after `resume_after`.
    SlowReader { resume_after: i64, waited: Duration },
    /// The store failed (logged); the reader may resume after `resume_after`.
    Failed { resume_after: i64, cause: String },
    /// The server is shutting down; resume after `resume_after` elsewhere.
    ShuttingDown { resume_after: i64 },
}

/// The reading end of a followed stream. Dropping it stops the follower.
pub struct EventStream {
    rx: mpsc::Receiver<StreamItem>,
    end: Option<oneshot::Receiver<StreamEnd>>,
}

impl EventStream {
    /// The next message, `Some(Err)` once if the stream ended early, then
    /// `None`.
    pub async fn next(&mut self) -> Option<Result<StreamItem, StreamEnd>> {
        if let Some(item) = self.rx.recv().await {
            return Some(Ok(item));
        }
        self.end.take()?.await.ok().map(Err)
    }

    pub fn into_stream(self) -> impl futures_util::Stream<Item = Result<StreamItem, StreamEnd>> {
        futures_util::stream::unfold(self, |mut s| async move {
            let item = s.next().await?;
            Some((item, s))
        })
    }
}

/// Ids read per query.
const PAGE: u64 = 500;

/// The longest a new stream waits for its bus to subscribe (a round trip
/// to Redis on a connected bus) before it reads the store; past that it
/// starts by polling.
const READY_WITHIN: Duration = Duration::from_secs(2);

/// The longest the check before a heartbeat (`Follower::missed_any`) may
/// hold that heartbeat.
const MISSED_CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// Follows the event log for `filter`: the stored events after `after`,
/// then live; with `after = None`, live events only, from the last event
/// committed when this returns. `permit` (a slot of the per-process cap)
/// is held until the follower stops. Cancelling `shutdown` ends the stream
/// with [`StreamEnd::ShuttingDown`], so that open streams never hold up a
/// graceful shutdown.
pub async fn follow(
    log: Arc<dyn EventLog>,
    bus: Arc<dyn EventBus>,
    filter: EventFilter,
    after: Option<i64>,
    cfg: StreamConfig,
    permit: Option<OwnedSemaphorePermit>,
    shutdown: CancellationToken,
) -> Result<EventStream, String> {
    // Subscribed before anything is read: whatever commits from here on
    // wakes the follower, so nothing falls between replay and live.
    let wake = bus.subscribe();
    bus.ready(READY_WITHIN).await;
    // The bus's state as of before the first read: a subscription that
    // comes up after it makes the first poll read the store again.
    let seen = (bus.live(), bus.epoch());
    let start = match after {
        Some(after) => after,
        None => log.last_event_id().await?,
    };
    let (tx, rx) = mpsc::channel(cfg.buffer.max(1));
    let (end_tx, end_rx) = oneshot::channel();
    let follower = Follower {
        log,
        bus,
        filter,
        cfg,
        tx,
        cursor: start,
        resume_after: Arc::new(AtomicI64::new(start)),
        gap: None,
        last_sent: Instant::now(),
    };
    tokio::spawn(async move {
        let _permit = permit;
        // Counted while the stream's task runs (`/metrics`).
        let _open = OpenStream::new();
        let resume_after = follower.resume_after.clone();
        let stopped = tokio::select! {
            stopped = follower.run(wake, after.is_some(), seen) => stopped,
            _ = shutdown.cancelled() => Err(Stop::End(StreamEnd::ShuttingDown {
                resume_after: resume_after.load(Ordering::Relaxed),
            })),
        };
        if let Err(Stop::End(end)) = stopped {
            let _ = end_tx.send(end);
        }
    });
    Ok(EventStream {
        rx,
        end: Some(end_rx),
    })
}

enum Stop {
    /// The reader went away.
    Closed,
    End(StreamEnd),
}

struct Follower {
    log: Arc<dyn EventLog>,
    bus: Arc<dyn EventBus>,
    filter: EventFilter,
    cfg: StreamConfig,
    tx: mpsc::Sender<StreamItem>,
    /// Every committed id up to here has been read (and sent if it matched).
    cursor: i64,
    /// The last event id sent (or the start cursor): where to resume.
    resume_after: Arc<AtomicI64>,
    /// The first missing id after `cursor`, and when it was first seen.
    gap: Option<(i64, Instant)>,
    last_sent: Instant,
}

impl Follower {
    async fn run(
        mut self,
        mut wake: broadcast::Receiver<Arc<Event>>,
        replay: bool,
        mut seen: (bool, u64),
    ) -> Result<(), Stop> {
        let mut poll = tokio::time::interval(self.cfg.poll_every);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut must_read = replay;
        loop {
            if must_read {
                self.catch_up().await?;
                must_read = false;
            }
            let heartbeat_at = self.last_sent + self.cfg.heartbeat_every;
            tokio::select! {
                _ = self.tx.closed() => return Err(Stop::Closed),
                woken = wake.recv() => match woken {
                    Ok(event) => {
                        must_read = self.gap.is_some() || self.filter.concerns(&event);
                        // Coalesce a burst into one read.
                        while let Ok(event) = wake.try_recv() {
                            must_read |= self.filter.concerns(&event);
                        }
                    }
                    // Missed wake-ups: the store has them.
                    Err(broadcast::error::RecvError::Lagged(_)) => must_read = true,
                    Err(broadcast::error::RecvError::Closed) => {
                        // No bus any more: polling alone carries the stream.
                        wake = self.bus.subscribe();
                        must_read = true;
                        sleep(self.cfg.poll_every).await;
                    }
                },
                _ = poll.tick() => {
                    let now = (self.bus.live(), self.bus.epoch());
                    // Not live, or live again since the last look (what
                    // was published in between was never announced, even
                    // if the bus was down and back between two ticks):
                    // read the store.
                    must_read = !now.0 || now != seen || self.gap.is_some();
                    seen = now;
                }
                _ = sleep_until(heartbeat_at) => {
                    // The store first: while the bus is live, a wake-up
                    // lost on its way (a publish that failed, another
                    // process's full outbox) is caught up here, so an
                    // event is at most one heartbeat late, never held
                    // until the next wake-up.
                    // Only when the stream's tenant (or webhook) has a
                    // stored event past the cursor (an indexed read of one
                    // row at most): reading every tenant's ids since the
                    // cursor would cost an idle stream on a busy
                    // deployment a page per 500 events at every heartbeat.
                    if self.missed_any().await {
                        self.catch_up().await?;
                    }
                    if self.last_sent + self.cfg.heartbeat_every <= Instant::now() {
                        self.send(StreamItem::Heartbeat(Utc::now())).await?;
                    }
                }
            }
        }
    }

    fn failed(&self, cause: String) -> Stop {
        tracing::warn!(error = %cause, "event stream: reading the event log failed");
        Stop::End(StreamEnd::Failed {
            resume_after: self.resume_after.load(Ordering::Relaxed),
            cause,
        })
    }

    /// Queues one message, waiting at most `slow_reader_timeout` for room.
    async fn send(&mut self, item: StreamItem) -> Result<(), Stop> {
        let id = match &item {
            StreamItem::Event(e) => Some(e.id),
            StreamItem::Heartbeat(_) => None,
        };
        match timeout(self.cfg.slow_reader_timeout, self.tx.send(item)).await {
            Ok(Ok(())) => {
                if let Some(id) = id {
                    self.resume_after.store(id, Ordering::Relaxed);
                }
                self.last_sent = Instant::now();
                Ok(())
            }
            Ok(Err(_)) => Err(Stop::Closed),
            Err(_) => Err(Stop::End(StreamEnd::SlowReader {
                resume_after: self.resume_after.load(Ordering::Relaxed),
                waited: self.cfg.slow_reader_timeout,
            })),
        }
    }

    /// Whether an event of the stream's tenant (and webhook, if it has
    /// one) is stored past the cursor. A store that fails this check, or
    /// takes longer than [`MISSED_CHECK_TIMEOUT`], answers no: the stream
    /// stays open and gets its heartbeat as it did before the check
    /// existed (a blip would otherwise end every idle stream at once, and
    /// a slow store would hold the heartbeats that keep proxies from
    /// closing streams), and the next wake-up or heartbeat reads again.
    async fn missed_any(&self) -> bool {
        let after = timeout(
            MISSED_CHECK_TIMEOUT,
            self.log.events_between(
                &self.filter.tenant,
                self.filter.webhook.as_ref(),
                self.cursor,
                i64::MAX,
                1,
            ),
        )
        .await;
        match after {
            Ok(Ok(after)) => !after.is_empty(),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "event stream: the heartbeat's check of the store failed");
                false
            }
            Err(_) => {
                tracing::debug!("event stream: the heartbeat's check of the store timed out");
                false
            }
        }
    }

    /// Sends every matching event committed after the cursor, up to the
    /// first hole that may still fill.
    async fn catch_up(&mut self) -> Result<(), Stop> {
        loop {
            let ids = self
                .log
                .committed_ids_after(self.cursor, PAGE)
                .await
                .map_err(|e| self.failed(e))?;
            let mut horizon = self.cursor;
            let mut blocked = false;
            for &id in &ids {
                if id == horizon + 1 {
                    horizon = id;
                    continue;
                }
                let missing = horizon + 1;
                match self.gap {
                    Some((g, since)) if g == missing && since.elapsed() >= self.cfg.gap_grace => {
                        // Never committed: skip the hole.
                        tracing::debug!(from = missing, to = id - 1, "event ids skipped");
                        horizon = id;
                        self.gap = None;
                    }
                    Some((g, _)) if g == missing => {
                        blocked = true;
                        break;
                    }
                    _ => {
                        self.gap = Some((missing, Instant::now()));
                        blocked = true;
                        break;
                    }
                }
            }
            if !blocked {
                self.gap = None;
            }
            if horizon > self.cursor {
                self.send_between(horizon).await?;
                self.cursor = horizon;
            }
            if blocked || (ids.len() as u64) < PAGE {
                return Ok(());
            }
        }
    }

    async fn send_between(&mut self, upto: i64) -> Result<(), Stop> {
        let mut from = self.cursor;
        loop {
            let events = self
                .log
                .events_between(
                    &self.filter.tenant,
                    self.filter.webhook.as_ref(),
                    from,
                    upto,
                    PAGE,
                )
                .await
                .map_err(|e| self.failed(e))?;
            let n = events.len() as u64;
            for e in events {
                from = e.id;
                if self.filter.matches(&e) {
                    self.send(StreamItem::Event(e)).await?;
                }
            }
            if n < PAGE {
                return Ok(());
            }
        }
    }
}

/// One open stream in `uploadhook_event_streams_open`, for as long as it
/// lives.
struct OpenStream;

impl OpenStream {
    fn new() -> Self {
        crate::metrics::METRICS.event_streams.inc();
        OpenStream
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        crate::metrics::METRICS.event_streams.dec();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    #[test]
    fn a_bus_knows_whether_anything_listens() {
        let bus = LocalEventBus::new(4);
        assert!(!bus.has_subscribers());
        let rx = bus.subscribe();
        assert!(bus.has_subscribers());
        drop(rx);
        assert!(!bus.has_subscribers());
    }

    /// An event log in memory; `hidden` ids are "not committed yet".
    #[derive(Default)]
    struct FakeLog {
        events: Mutex<Vec<Event>>,
        hidden: Mutex<Vec<i64>>,
        /// Reads of every tenant's ids.
        id_reads: std::sync::atomic::AtomicUsize,
        /// Reads of a tenant's events fail while set.
        events_fail: std::sync::atomic::AtomicBool,
        /// Reads of a tenant's events take 10 s while set.
        events_slow: std::sync::atomic::AtomicBool,
    }

    impl FakeLog {
        fn visible(&self) -> Vec<Event> {
            let hidden = self.hidden.lock().unwrap().clone();
            let mut v: Vec<Event> = self
                .events
                .lock()
                .unwrap()
                .iter()
                .filter(|e| !hidden.contains(&e.id))
                .cloned()
                .collect();
            v.sort_by_key(|e| e.id);
            v
        }
    }

    #[async_trait]
    impl EventLog for FakeLog {
        async fn committed_ids_after(&self, after: i64, limit: u64) -> Result<Vec<i64>, String> {
            self.id_reads.fetch_add(1, Ordering::Relaxed);
            Ok(self
                .visible()
                .iter()
                .map(|e| e.id)
                .filter(|&id| id > after)
                .take(limit as usize)
                .collect())
        }
        async fn events_between(
            &self,
            tenant: &TenantId,
            webhook: Option<&WebhookId>,
            after: i64,
            upto: i64,
            limit: u64,
        ) -> Result<Vec<Event>, String> {
            if self.events_fail.load(Ordering::Relaxed) {
                return Err("the store is down".into());
            }
            if self.events_slow.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_secs(10)).await;
            }
            Ok(self
                .visible()
                .into_iter()
                .filter(|e| e.id > after && e.id <= upto && e.tenant_id == *tenant)
                .filter(|e| webhook.is_none_or(|w| *w == e.webhook_id))
                .take(limit as usize)
                .collect())
        }
        async fn last_event_id(&self) -> Result<i64, String> {
            Ok(self.visible().last().map_or(0, |e| e.id))
        }
    }

    fn event(id: i64, tenant: &str) -> Event {
        Event {
            id,
            tenant_id: TenantId::from_trusted(tenant.into()),
            webhook_id: WebhookId::from_trusted("wh_1".into()),
            kind: "webhook.created".into(),
            status: Status::Pending,
            occurred_at: Utc::now(),
        }
    }

    fn cfg() -> StreamConfig {
        StreamConfig {
            buffer: 4,
            heartbeat_every: Duration::from_secs(3600),
            slow_reader_timeout: Duration::from_millis(200),
            poll_every: Duration::from_millis(20),
            gap_grace: Duration::from_secs(3600),
        }
    }

    fn filter(tenant: &str) -> EventFilter {
        EventFilter {
            tenant: TenantId::from_trusted(tenant.into()),
            webhook: None,
            types: vec![],
            statuses: vec![],
        }
    }

    /// The next event's id, skipping heartbeats; bounded, so that an event
    /// that never comes fails the test instead of hanging it.
    async fn next_event_id(s: &mut EventStream) -> i64 {
        let deadline = Duration::from_secs(5);
        tokio::time::timeout(deadline, async {
            loop {
                match s.next().await {
                    Some(Ok(StreamItem::Event(e))) => return e.id,
                    Some(Ok(StreamItem::Heartbeat(_))) => continue,
                    other => panic!("expected an event, got {other:?}"),
                }
            }
        })
        .await
        .expect("no event within 5 s")
    }

    async fn next_id(s: &mut EventStream) -> i64 {
        match s.next().await {
            Some(Ok(StreamItem::Event(e))) => e.id,
            other => panic!("expected an event, got {other:?}"),
        }
    }

    fn add(log: &FakeLog, bus: &LocalEventBus, e: Event) {
        log.events.lock().unwrap().push(e.clone());
        bus.publish(e);
    }

    #[tokio::test]
    async fn a_slow_reader_is_cut_off_with_its_cursor_and_memory_stays_bounded() {
        let log = Arc::new(FakeLog::default());
        for id in 1..=100 {
            log.events.lock().unwrap().push(event(id, "t"));
        }
        let bus = Arc::new(LocalEventBus::new(16));
        let mut s = follow(
            log,
            bus,
            filter("t"),
            Some(0),
            cfg(),
            None,
            CancellationToken::new(),
        )
        .await
        .unwrap();
        // The reader takes nothing for longer than the timeout.
        tokio::time::sleep(Duration::from_millis(600)).await;
        // Only the buffer was filled, then the stream ended.
        let mut got = vec![];
        let end = loop {
            match s.next().await {
                Some(Ok(StreamItem::Event(e))) => got.push(e.id),
                Some(Ok(StreamItem::Heartbeat(_))) => {}
                Some(Err(end)) => break end,
                None => panic!("stream ended without its error"),
            }
        };
        assert_eq!(got, vec![1, 2, 3, 4]);
        assert_eq!(
            end,
            StreamEnd::SlowReader {
                resume_after: 4,
                waited: Duration::from_millis(200)
            }
        );
        assert!(s.next().await.is_none());
    }

    #[tokio::test]
    async fn replay_then_live_without_gap_or_duplicate_and_only_the_tenant() {
        let log = Arc::new(FakeLog::default());
        let bus = Arc::new(LocalEventBus::new(16));
        for id in 1..=3 {
            log.events.lock().unwrap().push(event(id, "t"));
        }
        log.events.lock().unwrap().push(event(4, "other"));
        let mut s = follow(
            log.clone(),
            bus.clone(),
            filter("t"),
            Some(1),
            cfg(),
            None,
            CancellationToken::new(),
        )
        .await
        .unwrap();
        assert_eq!(next_id(&mut s).await, 2);
        assert_eq!(next_id(&mut s).await, 3);
        add(&log, &bus, event(5, "other"));
        add(&log, &bus, event(6, "t"));
        assert_eq!(next_id(&mut s).await, 6);
    }

    #[tokio::test]
    async fn a_hole_in_the_ids_holds_later_events_until_it_commits() {
        let log = Arc::new(FakeLog::default());
        let bus = Arc::new(LocalEventBus::new(16));
        let mut s = follow(
            log.clone(),
            bus.clone(),
            filter("t"),
            Some(0),
            cfg(),
            None,
            CancellationToken::new(),
        )
        .await
        .unwrap();
        // 1 is being committed while 2 is already visible.
        log.hidden.lock().unwrap().push(1);
        log.events.lock().unwrap().push(event(1, "t"));
        add(&log, &bus, event(2, "t"));
        tokio::time::sleep(Duration::from_millis(100)).await;
        log.hidden.lock().unwrap().clear();
        bus.publish(event(1, "t"));
        assert_eq!(next_id(&mut s).await, 1);
        assert_eq!(next_id(&mut s).await, 2);
    }

    #[tokio::test]
    async fn a_hole_that_never_fills_is_skipped_after_the_grace() {
        let log = Arc::new(FakeLog::default());
        let bus = Arc::new(LocalEventBus::new(16));
        let cfg = StreamConfig {
            gap_grace: Duration::from_millis(50),
            ..cfg()
        };
        let mut s = follow(
            log.clone(),
            bus.clone(),
            filter("t"),
            Some(0),
            cfg,
            None,
            CancellationToken::new(),
        )
        .await
        .unwrap();
        add(&log, &bus, event(3, "t"));
        assert_eq!(next_id(&mut s).await, 3);
    }

    #[tokio::test]
    async fn a_bus_that_is_down_is_replaced_by_polling() {
        struct DeadBus(LocalEventBus);
        impl EventBus for DeadBus {
            fn publish(&self, _: Event) {}
            fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
                self.0.subscribe()
            }
            fn live(&self) -> bool {
                false
            }
        }
        let log = Arc::new(FakeLog::default());
        let bus = Arc::new(DeadBus(LocalEventBus::new(4)));
        let mut s = follow(
            log.clone(),
            bus,
            filter("t"),
            Some(0),
            cfg(),
            None,
            CancellationToken::new(),
        )
        .await
        .unwrap();
        log.events.lock().unwrap().push(event(1, "t"));
        assert_eq!(next_id(&mut s).await, 1);
    }

    /// A new stream reads the store only once its bus is ready (a bus that
    /// subscribes on demand has subscribed), so that what commits between
    /// its first read and the subscription is not left to polling.
    #[tokio::test]
    async fn a_new_stream_reads_the_store_once_its_bus_is_ready() {
        struct SlowBus {
            local: LocalEventBus,
            ready: tokio::sync::Semaphore,
            waited: Mutex<Option<Duration>>,
        }
        impl EventBus for SlowBus {
            fn publish(&self, e: Event) {
                self.local.publish(e)
            }
            fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
                self.local.subscribe()
            }
            fn ready(&self, within: Duration) -> BoxFuture<'_, ()> {
                *self.waited.lock().unwrap() = Some(within);
                Box::pin(async move {
                    let _ = self.ready.acquire().await;
                })
            }
        }
        let log = Arc::new(FakeLog::default());
        log.events.lock().unwrap().push(event(1, "t"));
        let bus = Arc::new(SlowBus {
            local: LocalEventBus::new(4),
            ready: tokio::sync::Semaphore::new(0),
            waited: Mutex::new(None),
        });
        let started = tokio::spawn(follow(
            log.clone(),
            bus.clone(),
            filter("t"),
            Some(0),
            cfg(),
            None,
            CancellationToken::new(),
        ));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(bus.local.has_subscribers(), "subscribed first");
        assert_eq!(*bus.waited.lock().unwrap(), Some(READY_WITHIN));
        assert!(!started.is_finished(), "the stream waits for its bus");
        assert_eq!(log.id_reads.load(Ordering::Relaxed), 0, "read too early");
        bus.ready.add_permits(1);
        let mut s = started.await.unwrap().unwrap();
        assert_eq!(next_id(&mut s).await, 1);
    }

    /// A bus that went down and came back between two of a follower's
    /// ticks (it never saw `live()` false) announced nothing in between:
    /// the new epoch makes the follower read the store.
    #[tokio::test]
    async fn a_bus_back_between_two_ticks_makes_the_follower_read() {
        struct Resubscribed {
            local: LocalEventBus,
            epoch: std::sync::atomic::AtomicU64,
        }
        impl EventBus for Resubscribed {
            fn publish(&self, e: Event) {
                self.local.publish(e)
            }
            fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
                self.local.subscribe()
            }
            fn epoch(&self) -> u64 {
                self.epoch.load(Ordering::SeqCst)
            }
        }
        let log = Arc::new(FakeLog::default());
        let bus = Arc::new(Resubscribed {
            local: LocalEventBus::new(4),
            epoch: std::sync::atomic::AtomicU64::new(1),
        });
        let mut s = follow(
            log.clone(),
            bus.clone(),
            filter("t"),
            None,
            cfg(),
            None,
            CancellationToken::new(),
        )
        .await
        .unwrap();
        // Stored while the bus was down: never announced.
        tokio::time::sleep(Duration::from_millis(50)).await;
        log.events.lock().unwrap().push(event(1, "t"));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            tokio::time::timeout(Duration::from_millis(100), s.next())
                .await
                .is_err(),
            "read without a reason"
        );
        bus.epoch.store(2, Ordering::SeqCst);
        let got = tokio::time::timeout(Duration::from_secs(5), next_id(&mut s)).await;
        assert_eq!(got.expect("the new epoch was not noticed"), 1);
    }

    /// Tenant `t`'s live stream on `log`, through a live bus that nothing
    /// publishes to, with heartbeats `every`.
    async fn live_stream(log: &Arc<FakeLog>, every: Duration) -> EventStream {
        let bus = Arc::new(LocalEventBus::new(4));
        assert!(bus.live());
        let cfg = StreamConfig {
            heartbeat_every: every,
            ..cfg()
        };
        follow(
            log.clone(),
            bus,
            filter("t"),
            None,
            cfg,
            None,
            CancellationToken::new(),
        )
        .await
        .unwrap()
    }

    /// A live bus whose wake-up never came (lost between processes): the
    /// event still goes out, at a heartbeat.
    #[tokio::test]
    async fn a_lost_wake_up_is_caught_up_at_the_heartbeat() {
        let log = Arc::new(FakeLog::default());
        let mut s = live_stream(&log, Duration::from_millis(100)).await;
        // Another tenant's event moves nothing; then one of ours, stored,
        // never published.
        log.events.lock().unwrap().push(event(1, "other"));
        assert!(matches!(s.next().await, Some(Ok(StreamItem::Heartbeat(_)))));
        // Checked through the tenant's events, without reading every
        // tenant's ids.
        assert_eq!(log.id_reads.load(Ordering::Relaxed), 0);
        log.events.lock().unwrap().push(event(2, "t"));
        assert_eq!(next_event_id(&mut s).await, 2);
    }

    /// The heartbeat's check of the store failing does not end an idle
    /// stream: it gets its heartbeat, and its event once the store is back.
    #[tokio::test]
    async fn a_failed_check_at_the_heartbeat_keeps_the_stream() {
        let log = Arc::new(FakeLog::default());
        log.events_fail.store(true, Ordering::Relaxed);
        let mut s = live_stream(&log, Duration::from_millis(50)).await;
        log.events.lock().unwrap().push(event(1, "t"));
        assert!(matches!(s.next().await, Some(Ok(StreamItem::Heartbeat(_)))));
        log.events_fail.store(false, Ordering::Relaxed);
        assert_eq!(next_event_id(&mut s).await, 1);
    }

    /// A store slow to answer the check holds the heartbeat for at most
    /// `MISSED_CHECK_TIMEOUT` (2 s), not until the store answers.
    #[tokio::test]
    async fn a_slow_check_does_not_hold_the_heartbeat() {
        let log = Arc::new(FakeLog::default());
        log.events_slow.store(true, Ordering::Relaxed);
        let mut s = live_stream(&log, Duration::from_millis(50)).await;
        // Well before the store's 10 s.
        let first = tokio::time::timeout(Duration::from_secs(5), s.next()).await;
        assert!(
            matches!(first, Ok(Some(Ok(StreamItem::Heartbeat(_))))),
            "{first:?}"
        );
    }

    #[tokio::test]
    async fn an_idle_stream_gets_heartbeats_and_a_dropped_reader_stops_it() {
        let log = Arc::new(FakeLog::default());
        let bus = Arc::new(LocalEventBus::new(4));
        let cfg = StreamConfig {
            heartbeat_every: Duration::from_millis(30),
            ..cfg()
        };
        let permits = Arc::new(tokio::sync::Semaphore::new(1));
        let permit = permits.clone().try_acquire_owned().unwrap();
        let mut s = follow(
            log,
            bus,
            filter("t"),
            None,
            cfg,
            Some(permit),
            CancellationToken::new(),
        )
        .await
        .unwrap();
        assert!(matches!(s.next().await, Some(Ok(StreamItem::Heartbeat(_)))));
        assert_eq!(permits.available_permits(), 0);
        drop(s);
        // The follower notices and gives its slot back.
        let _again = permits.acquire().await.unwrap();
    }
}
