//! The cross-process bus: Redis pub/sub on `<prefix>:events`.
//!
//! Every process keeps its in-process broadcast for its own streams and
//! also publishes each committed event to Redis; a process that serves
//! streams (the API) subscribes and re-broadcasts what other processes
//! published. A worker-only process serves no stream, so it only publishes
//! ([`RedisEventBus::publisher`]): subscribed, it would receive and decode
//! every event of every process for nothing. A message is only a wake-up
//! (followers re-read the store), so a lost message costs latency, never
//! an event.
//!
//! An API process subscribes only while a stream listens in it: from the
//! first stream's [`EventBus::subscribe`] until [`LINGER`] after the last
//! one closed. Otherwise every API replica would receive every event of
//! the deployment (about five per webhook) to drop it unread, and Redis
//! would send each one to every replica. A new stream waits for the
//! subscription ([`EventBus::ready`], one round trip) before it reads the
//! store, so its replay and its live events still meet without a gap.
//!
//! Both connections are made in the background and remade by themselves:
//! the publisher through a reconnecting connection manager, the subscriber
//! in a loop that pings its connection and starts over when it breaks.
//! While the subscription is down or off [`EventBus::live`] is `false` and
//! followers poll the store instead. On a Redis Cluster, classic pub/sub
//! reaches every node's subscribers, so the subscriber uses one connection
//! to the URL's node.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use chrono::DateTime;
use futures_util::{StreamExt, future::BoxFuture};
use tokio::{
    sync::{Notify, broadcast, mpsc, watch},
    time::Instant,
};
use tokio_util::sync::CancellationToken;

use super::{Event, EventBus, LocalEventBus};
use crate::{
    domain::{Status, TenantId, WebhookId},
    pipeline::redis_conn::{RedisTarget, Timeouts},
};

const TIMEOUTS: Timeouts = Timeouts {
    connect: Duration::from_secs(5),
    response: Duration::from_secs(5),
};
/// Pause between two attempts to (re)connect the subscriber.
const RETRY_EVERY: Duration = Duration::from_secs(1);
/// The subscriber pings this often, to notice a connection that died
/// silently.
const PING_EVERY: Duration = Duration::from_secs(5);
/// Events waiting to be published; beyond this, wake-ups are dropped (the
/// store still has the events; followers on other processes catch up at
/// the next wake-up).
const OUTBOX: usize = 4096;
/// Events published in one pipeline at most.
const PUBLISH_BATCH: usize = 128;
/// How long an API process stays subscribed after its last stream closed:
/// a client that reopens its stream at once finds it live.
pub const LINGER: Duration = Duration::from_secs(5);
/// How often a subscribed process looks whether a stream still listens.
const IDLE_CHECK_EVERY: Duration = Duration::from_secs(1);

pub struct RedisEventBus {
    local: LocalEventBus,
    outbox: mpsc::Sender<String>,
    origin: String,
    /// `"o":"<origin>"`, as `encode` writes it.
    origin_field: String,
    /// Whether every other process's event reaches this one now: the
    /// subscription is confirmed.
    live: watch::Sender<bool>,
    /// Counts the subscriptions made ([`EventBus::epoch`]).
    subscriptions: AtomicU64,
    /// Whether the subscriber holds a connection (subscribed or not): only
    /// then is a stream's [`EventBus::ready`] worth waiting for.
    connected: AtomicBool,
    /// Wakes an idle subscriber when a stream subscribes here.
    wanted: Arc<Notify>,
}

impl RedisEventBus {
    /// Starts publishing and subscribing in the background; stops when
    /// `shutdown` is cancelled.
    pub fn start(
        target: RedisTarget,
        prefix: &str,
        capacity: usize,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Arc<Self>> {
        let client = target.seed_client()?;
        let bus = Self::publisher(target, prefix, capacity, shutdown.clone());
        tokio::spawn(subscribe_loop(
            client,
            format!("{prefix}:events"),
            Arc::downgrade(&bus),
            shutdown,
        ));
        Ok(bus)
    }

    /// Starts publishing only: other processes' events never reach this
    /// one, and [`EventBus::live`] stays `false` (a stream here would poll
    /// the store). For processes that serve no stream.
    pub fn publisher(
        target: RedisTarget,
        prefix: &str,
        capacity: usize,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        let (outbox, rx) = mpsc::channel(OUTBOX);
        tokio::spawn(publish_loop(
            target,
            format!("{prefix}:events"),
            rx,
            shutdown,
        ));
        let origin = uuid::Uuid::new_v4().simple().to_string();
        Arc::new(Self {
            local: LocalEventBus::new(capacity),
            outbox,
            origin_field: format!("\"o\":\"{origin}\""),
            origin,
            live: watch::Sender::new(false),
            subscriptions: AtomicU64::new(0),
            connected: AtomicBool::new(false),
            wanted: Arc::new(Notify::new()),
        })
    }

    /// Whether the subscriber holds a connection to Redis, subscribed or
    /// not (a publisher-only bus never does).
    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::SeqCst)
    }

    fn set_live(&self, live: bool) {
        self.live
            .send_if_modified(|l| std::mem::replace(l, live) != live);
    }

    /// Not live any more, and no connection: a stream waiting in `ready`
    /// stops waiting.
    fn down(&self) {
        self.connected.store(false, Ordering::SeqCst);
        self.live.send_replace(false);
    }

    /// The message of an event: a JSON object written directly (through
    /// `json!` the map and its text cost 4-5 % of a worker's instructions;
    /// BENCHMARKS.md, session 28), origin first.
    fn encode(&self, e: &Event) -> String {
        let mut out = Vec::with_capacity(160);
        out.push(b'{');
        out.extend_from_slice(self.origin_field.as_bytes());
        out.extend_from_slice(b",\"id\":");
        out.extend_from_slice(itoa::Buffer::new().format(e.id).as_bytes());
        for (key, value) in [
            ("t", e.tenant_id.as_str()),
            ("w", e.webhook_id.as_str()),
            ("k", e.kind.as_str()),
            ("s", e.status.as_str()),
        ] {
            out.extend_from_slice(b",\"");
            out.extend_from_slice(key.as_bytes());
            out.extend_from_slice(b"\":");
            // Escaped as serde_json escapes; writing to a `Vec` cannot fail.
            let _ = serde_json::to_writer(&mut out, value);
        }
        out.extend_from_slice(b",\"at\":");
        out.extend_from_slice(
            itoa::Buffer::new()
                .format(e.occurred_at.timestamp_micros())
                .as_bytes(),
        );
        out.push(b'}');
        // ASCII keys and serde_json's output: valid UTF-8.
        String::from_utf8(out)
            .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
    }

    /// The event of a message from another process; `None` for our own
    /// messages (already broadcast locally) and for garbage.
    fn decode(&self, payload: &str) -> Option<Event> {
        // Our own messages (about half of what an API process receives)
        // are told apart before parsing.
        if payload.contains(&self.origin_field) {
            return None;
        }
        let v: serde_json::Value = serde_json::from_str(payload).ok()?;
        if v["o"].as_str()? == self.origin {
            return None;
        }
        Some(Event {
            id: v["id"].as_i64()?,
            tenant_id: TenantId::from_trusted(v["t"].as_str()?.to_string()),
            webhook_id: WebhookId::from_trusted(v["w"].as_str()?.to_string()),
            kind: v["k"].as_str()?.to_string(),
            status: Status::parse(v["s"].as_str()?)?,
            occurred_at: DateTime::from_timestamp_micros(v["at"].as_i64()?)?,
        })
    }
}

impl EventBus for RedisEventBus {
    fn publish(&self, event: Event) {
        if self.outbox.try_send(self.encode(&event)).is_err() {
            tracing::debug!("event bus outbox full; a cross-process wake-up is dropped");
        }
        self.local.publish(event);
    }

    fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        let rx = self.local.subscribe();
        // An idle subscriber subscribes; a busy one has nothing to do (one
        // stored permit at most). On a publisher nothing waits for it.
        self.wanted.notify_one();
        rx
    }

    fn live(&self) -> bool {
        *self.live.borrow()
    }

    fn epoch(&self) -> u64 {
        self.subscriptions.load(Ordering::SeqCst)
    }

    fn ready(&self, within: Duration) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let mut live = self.live.subscribe();
            // While connected, the subscription is one round trip away;
            // without a connection (Redis down, or a publisher-only bus)
            // the stream polls instead of waiting.
            let _ = tokio::time::timeout(
                within,
                live.wait_for(|l| *l || !self.connected.load(Ordering::SeqCst)),
            )
            .await;
        })
    }
}

async fn publish_loop(
    target: RedisTarget,
    channel: String,
    mut rx: mpsc::Receiver<String>,
    shutdown: CancellationToken,
) {
    let mut conn = loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            c = target.connect(TIMEOUTS) => match c {
                Ok(c) => break c,
                Err(e) => {
                    tracing::warn!(error = %e, "event bus: cannot connect to Redis to publish; retrying");
                    tokio::time::sleep(RETRY_EVERY).await;
                }
            },
        }
    };
    let mut payloads = Vec::with_capacity(PUBLISH_BATCH);
    loop {
        // Whatever is waiting (at least one) goes in one pipeline: one
        // round trip for a burst of events, in order.
        let got = tokio::select! {
            _ = shutdown.cancelled() => return,
            n = rx.recv_many(&mut payloads, PUBLISH_BATCH) => n,
        };
        if got == 0 {
            return;
        }
        let mut pipe = redis::pipe();
        for payload in payloads.drain(..) {
            pipe.cmd("PUBLISH").arg(&channel).arg(payload).ignore();
        }
        // The manager reconnects by itself; a failed publish is a lost
        // wake-up only.
        let sent: redis::RedisResult<()> = pipe.query_async(&mut conn).await;
        if let Err(e) = sent {
            tracing::debug!(error = %e, "event bus: publish failed");
        }
    }
}

async fn subscribe_loop(
    client: redis::Client,
    channel: String,
    bus: std::sync::Weak<RedisEventBus>,
    shutdown: CancellationToken,
) {
    let mut logged = false;
    let mut first = true;
    loop {
        let result = tokio::select! {
            _ = shutdown.cancelled() => Ok(()),
            r = subscribed(&client, &channel, &bus, &mut logged, &mut first) => r,
        };
        // Down: a stream opened from here on (during a shutdown's drain
        // too) polls at once instead of waiting for a subscription.
        let Some(b) = bus.upgrade() else { return };
        b.down();
        drop(b);
        match result {
            Ok(()) => return, // shut down, or the bus is gone
            Err(e) => {
                if !logged {
                    tracing::warn!(error = %e, "event bus: Redis connection for the subscription lost; streams poll the database until it is back");
                    logged = true;
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(RETRY_EVERY) => {}
        }
    }
}

/// One connection to Redis for the subscription, until it breaks (`Err`)
/// or the bus is dropped (`Ok`). Subscribed while a stream listens here
/// (and [`LINGER`] after), unsubscribed otherwise; pinged either way.
/// `logged` says whether a loss was logged; cleared once subscribed again
/// (or connected again with no stream that wants a subscription). `first`:
/// no connection was made yet (the first one is logged).
async fn subscribed(
    client: &redis::Client,
    channel: &str,
    bus: &std::sync::Weak<RedisEventBus>,
    logged: &mut bool,
    first: &mut bool,
) -> anyhow::Result<()> {
    let pubsub = tokio::time::timeout(TIMEOUTS.connect, client.get_async_pubsub())
        .await
        .map_err(|_| anyhow::anyhow!("connecting timed out"))??;
    let (mut sink, mut stream) = pubsub.split();
    let Some(wanted) = bus.upgrade().map(|b| {
        b.connected.store(true, Ordering::SeqCst);
        b.wanted.clone()
    }) else {
        return Ok(());
    };
    if std::mem::take(first) {
        tracing::info!("event bus: connected to Redis; subscribed while a stream listens here");
    } else if bus.upgrade().is_some_and(|b| !b.local.has_subscribers()) && std::mem::take(logged) {
        tracing::info!("event bus: connected to Redis again");
    }
    let mut ping = tokio::time::interval(PING_EVERY);
    ping.tick().await;
    // Only ticks while subscribed: no burst of missed ticks after an idle
    // spell.
    let mut idle_check = tokio::time::interval(IDLE_CHECK_EVERY);
    idle_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut on = false;
    let mut idle_since: Option<Instant> = None;
    loop {
        if !on {
            let Some(b) = bus.upgrade() else {
                return Ok(());
            };
            if b.local.has_subscribers() {
                drop(b);
                tokio::time::timeout(TIMEOUTS.response, sink.subscribe(channel))
                    .await
                    .map_err(|_| anyhow::anyhow!("subscribing timed out"))??;
                let Some(b) = bus.upgrade() else {
                    return Ok(());
                };
                // The new epoch before `live`: a follower that sees `live`
                // true (it reads `live` first) sees the new epoch too.
                b.subscriptions.fetch_add(1, Ordering::SeqCst);
                b.set_live(true);
                on = true;
                idle_since = None;
                idle_check.reset();
                if std::mem::take(logged) {
                    tracing::info!("event bus: subscribed to Redis again");
                } else {
                    tracing::debug!("event bus: a stream listens; subscribed to Redis");
                }
            }
        }
        tokio::select! {
            msg = stream.next() => {
                let Some(msg) = msg else {
                    anyhow::bail!("connection closed");
                };
                let Some(bus) = bus.upgrade() else { return Ok(()) };
                // With no stream open here, a wake-up has no one to wake:
                // not decoded (the last messages after an unsubscribe, or
                // while lingering).
                if !on || !bus.local.has_subscribers() {
                    continue;
                }
                if let Some(event) = msg
                    .get_payload::<String>()
                    .ok()
                    .and_then(|p| bus.decode(&p))
                {
                    bus.local.publish(event);
                }
            }
            // A stream subscribed here: the loop's top subscribes.
            _ = wanted.notified(), if !on => {}
            _ = idle_check.tick(), if on => {
                let Some(b) = bus.upgrade() else { return Ok(()) };
                if b.local.has_subscribers() {
                    idle_since = None;
                    continue;
                }
                if idle_since.get_or_insert_with(Instant::now).elapsed() < LINGER {
                    continue;
                }
                // Not live first, then the count again: a stream that
                // subscribes from here on sees `live` false and waits in
                // `ready` until the loop's top subscribes again; one that
                // subscribed before is seen here, and the subscription
                // stays. (The watch's value and the broadcast's count are
                // each read and written under a lock, so one of the two
                // sides sees the other.)
                b.set_live(false);
                if b.local.has_subscribers() {
                    b.set_live(true);
                    idle_since = None;
                    continue;
                }
                drop(b);
                tokio::time::timeout(TIMEOUTS.response, sink.unsubscribe(channel))
                    .await
                    .map_err(|_| anyhow::anyhow!("unsubscribing timed out"))??;
                on = false;
                tracing::debug!("event bus: no stream listens; unsubscribed from Redis");
            }
            _ = ping.tick() => {
                if bus.strong_count() == 0 {
                    return Ok(());
                }
                // Subscribed, Redis answers `["pong", ""]`, otherwise
                // `PONG`: any answer but an error will do (`()` takes
                // both and refuses an error reply).
                tokio::time::timeout(TIMEOUTS.response, sink.ping::<()>())
                    .await
                    .map_err(|_| anyhow::anyhow!("ping timed out"))??;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event() -> Event {
        Event {
            id: 42,
            tenant_id: TenantId::from_trusted("tn_a".into()),
            webhook_id: WebhookId::from_trusted("wh_a".into()),
            kind: "webhook.verified".into(),
            status: Status::Verified,
            occurred_at: DateTime::from_timestamp_micros(1_765_000_000_123_456).unwrap(),
        }
    }

    #[tokio::test]
    async fn own_messages_are_skipped_and_others_decoded() {
        // Nothing listens on port 1: the publishers' connections fail in
        // the background, which this test does not need.
        let target = || RedisTarget::parse("redis://127.0.0.1:1").unwrap();
        let stop = CancellationToken::new();
        let a = RedisEventBus::publisher(target(), "t", 4, stop.clone());
        let b = RedisEventBus::publisher(target(), "t", 4, stop.clone());
        let message = a.encode(&event());
        // Told apart before parsing, not only by the parsed field.
        assert!(message.contains(&a.origin_field), "{message}");
        assert!(a.decode(&message).is_none(), "{message}");
        let got = b.decode(&message).expect("another process's event");
        assert_eq!(
            (got.id, got.tenant_id.as_str(), got.webhook_id.as_str()),
            (42, "tn_a", "wh_a")
        );
        assert_eq!(
            (got.kind.as_str(), got.status),
            ("webhook.verified", Status::Verified)
        );
        assert_eq!(got.occurred_at, event().occurred_at);
        assert!(b.decode("not json").is_none());
        // Every field, as JSON; a kind that needs escaping decodes back.
        let parsed: serde_json::Value = serde_json::from_str(&message).unwrap();
        assert_eq!(
            parsed,
            serde_json::json!({
                "o": a.origin, "id": 42, "t": "tn_a", "w": "wh_a",
                "k": "webhook.verified", "s": "verified", "at": 1_765_000_000_123_456_i64,
            })
        );
        let odd = Event {
            kind: "a \"b\" \\ é\n".into(),
            ..event()
        };
        assert_eq!(b.decode(&a.encode(&odd)).unwrap().kind, odd.kind);
        stop.cancel();
    }
}
