//! The work queue on Redis Streams, for deployments with more than one
//! worker process.
//!
//! # Why streams
//!
//! A Redis stream read through a consumer group gives the three things a
//! work queue needs without any bookkeeping of our own: each entry goes to
//! exactly one consumer of the group (`XREADGROUP … >`), an entry handed out
//! stays in the group's pending entries list (PEL) until it is acked, and
//! the PEL remembers who holds an entry, since when, and how many times it
//! was handed out. A list with `BLMOVE` gives the first but needs a second
//! structure and a sweeper for the other two.
//!
//! # Keys
//!
//! All keys of one queue share the hash tag `{<prefix>:jobs}`, so that they
//! live in one Redis Cluster slot and the Lua scripts and `MULTI` blocks
//! below, which touch several of them at once, are legal there:
//!
//! - `{p:jobs}:stream`: the entries due now (and those taken, until acked);
//!   one consumer group, `workers`. Acked entries are deleted (`XDEL`), so
//!   the stream only holds work not yet done and needs no trimming.
//! - `{p:jobs}:delayed`: a sorted set of jobs due later, scored by their due
//!   time in unix milliseconds.
//! - `{p:jobs}:poison`: entries parked after too many deliveries, for a
//!   human to look at (capped at about [`POISON_MAXLEN`] entries).
//!
//! A lease's receipt is `<stream>/<entry id>` (`stream/1712345678901-0`):
//! it names the stream the entry came from, so that priority streams can be
//! added later (`{p:jobs}:stream:high`) without changing the receipt format
//! or the ack path.
//!
//! # Delayed jobs: the Lua mover
//!
//! Streams have no "visible from" time, so jobs due later wait in the
//! sorted set. Every `take` first runs `MOVE_DUE`, one Lua script that
//! reads the due members (`ZRANGEBYSCORE … LIMIT`), `XADD`s each to the
//! stream and `ZREM`s it. A script runs atomically, so of several workers
//! racing, whichever runs it first moves the due jobs and the others find
//! nothing: a delayed job enters the stream exactly once (short of a Redis
//! failover losing a write, which the database-backed recovery covers). The
//! script also returns the next due time, and `take` blocks no longer than
//! until then, so a job falling due while every worker is blocked in
//! `XREADGROUP` is late by at most a few milliseconds.
//!
//! A delayed member is the job's fields and nothing else (no nonce), so
//! scheduling the same job twice keeps one member, and `ZADD LT` keeps the
//! earlier of the two times. That is deliberate: the database holds one
//! next-attempt time per webhook, `Pipeline::recover` re-enqueues every
//! delayed webhook at each start, and a Redis that outlives the process
//! would otherwise collect one more copy per restart. Keeping the earlier
//! time never loses a wake-up; a job that comes out early is harmless (a
//! delivery that is not yet due schedules itself again, see
//! `Pipeline::deliver`).
//!
//! # Visibility timeout and reclaim
//!
//! An entry a consumer took and never acked (the process died, or the job
//! is stuck) sits in the PEL. A `take` runs `RECLAIM` when the last run
//! was more than a tenth of the visibility timeout ago (clamped to 10 ms …
//! 5 s), so an orphan waits at most about 1.1 visibility timeouts: `XAUTOCLAIM` hands entries idle for longer than
//! the visibility timeout to this consumer (raising their delivery count),
//! and returns them as leases with their delivery count. The visibility
//! timeout must therefore be longer than the longest job (the delivery
//! timeout plus the database writes); a job that outlives it runs twice,
//! which the database's compare-and-set transitions make harmless but not
//! free (a receiver may get the webhook twice, deduplicated by its id).
//!
//! Each process start adds a consumer to the group. Every ten minutes a
//! `take` also deletes consumers that hold nothing and were idle for an
//! hour (or ten visibility timeouts); one that holds entries is kept, or
//! its entries could never be reclaimed.
//!
//! # Poison
//!
//! An entry whose delivery count would exceed `max_deliveries` has made
//! that many workers die or time out: it is parked in the poison stream
//! (with its entry id and delivery count), acked and deleted from the main
//! stream, and logged at error level with its webhook id. Its webhook keeps
//! its status in the database, so the next start's recovery queues it
//! again. A job put back with `retry_later` is a new entry with a fresh
//! count: only crashes and timeouts count towards poison, not failed
//! deliveries (those have the retry policy).
//!
//! # Data loss
//!
//! Redis may run without persistence. When the stream or its group is gone
//! (`NOGROUP`), the queue recreates the group at id `0` (not `$`, which would
//! skip jobs `XADD`ed since the loss) and retries the command once. Jobs
//! queued before the loss are gone from Redis but not from the database:
//! [`RedisQueue::group_recreations`] lets the caller run
//! `Pipeline::recover` again.
//!
//! # Connections
//!
//! Commands go through one [`ConnectionManager`], a multiplexed connection
//! that reconnects by itself with backoff. The blocking `XREADGROUP` must
//! not: Redis answers one connection's commands in order, so while a read
//! blocks, every command pipelined behind it on that connection waits too,
//! and the redis crate's default response timeout (500 ms) would fail them.
//! Blocking reads use their own connections from a small pool instead, with
//! a response timeout longer than the longest block; a connection that
//! failed, or whose read was cancelled, is dropped rather than reused.
//! Dropping it closes the socket at once, and Redis forgets a blocked read
//! of a closed client, so a `take` cancelled mid-read (the worker loop does
//! that at shutdown) swallows no entry.
//!
//! Due times are compared with the caller's [`Clock`] (the workers'
//! clocks, passed to the mover), not Redis's: a worker whose clock runs
//! ahead moves jobs a little early, which is harmless. The visibility
//! timeout, on the other hand, is measured by Redis.
//!
//! # Cluster
//!
//! The hash tag keeps one queue in one slot, but a [`ConnectionManager`]
//! talks to a single node (or a proxy). Pointing at Redis Cluster needs the
//! crate's `cluster-async` feature and its `ClusterConnection`, which routes
//! by key; the scripts already declare every key they touch in `KEYS`.
//! Needs Redis 6.2 or later (`XAUTOCLAIM`, `ZADD LT`).

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use redis::{
    AsyncConnectionConfig, Client, RedisError, Script, Value,
    aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection},
    streams::{StreamId, StreamReadOptions, StreamReadReply},
};
use tokio::{sync::watch, time::Instant};
use tracing::{error, warn};

use super::queue::{Job, JobKind, Lease, Queue, QueueError};
use crate::{
    clock::{Clock, SystemClock},
    domain::{TenantId, WebhookId},
};

/// The consumer group every worker joins.
const GROUP: &str = "workers";
/// The name of the only stream so far, as it appears in receipts.
const MAIN_STREAM: &str = "stream";
/// How many delayed jobs one run of the mover moves at most.
const MOVE_BATCH: usize = 256;
/// The poison stream is capped (approximately) at this many entries.
pub const POISON_MAXLEN: usize = 10_000;
/// The shortest `BLOCK` a take asks for, so that a job due "now" does not
/// make it spin.
const MIN_BLOCK: Duration = Duration::from_millis(5);
/// Response timeout of ordinary (non-blocking) commands.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(3);
/// Time allowed to open a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// A blocking read may take this much longer than its `BLOCK` before its
/// connection is given up.
const BLOCK_MARGIN: Duration = Duration::from_secs(2);
/// Idle blocking-read connections kept for reuse.
const READER_POOL: usize = 4;
/// How often a queue looks for consumers that are gone.
const PRUNE_EVERY: Duration = Duration::from_secs(600);

/// Settings of a [`RedisQueue`].
#[derive(Debug, Clone)]
pub struct RedisQueueConfig {
    /// Key prefix; the keys are `{<prefix>:jobs}:…`. Must not contain `{`
    /// or `}` (the braces are the cluster hash tag).
    pub prefix: String,
    /// This process's name in the consumer group; unique per process.
    pub consumer: String,
    /// How long a taken entry may stay unacked before another consumer
    /// takes it over. Longer than the longest job.
    pub visibility_timeout: Duration,
    /// An entry handed out this many times without an ack is parked in the
    /// poison stream instead of being handed out again.
    pub max_deliveries: u32,
    /// The longest single `XREADGROUP … BLOCK`; a take with a longer wait
    /// blocks several times.
    pub block: Duration,
}

impl Default for RedisQueueConfig {
    fn default() -> Self {
        Self {
            prefix: "uploadhook".to_string(),
            consumer: default_consumer_name(),
            visibility_timeout: Duration::from_secs(60),
            max_deliveries: 10,
            block: Duration::from_secs(1),
        }
    }
}

/// `hostname-pid-random`: unique per process, and telling an operator
/// reading `XINFO CONSUMERS` where a consumer ran.
pub fn default_consumer_name() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "host".to_string());
    format!(
        "{host}-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    )
}

/// The keys of one queue.
#[derive(Debug, Clone)]
struct Keys {
    stream: String,
    delayed: String,
    poison: String,
}

impl Keys {
    fn new(prefix: &str) -> Self {
        let tag = format!("{{{prefix}:jobs}}");
        Self {
            stream: format!("{tag}:{MAIN_STREAM}"),
            delayed: format!("{tag}:delayed"),
            poison: format!("{tag}:poison"),
        }
    }

    /// The stream key a receipt names.
    fn stream_of(&self, name: &str) -> Option<&str> {
        (name == MAIN_STREAM).then_some(self.stream.as_str())
    }
}

/// Sizes of the queue's parts, for metrics and operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueStats {
    /// Entries in the stream: waiting, and taken but not yet acked.
    pub stream: u64,
    /// Of those, taken and not yet acked.
    pub pending: u64,
    /// Jobs due later.
    pub delayed: u64,
    /// Parked entries.
    pub poison: u64,
}

struct ReclaimState {
    /// `XAUTOCLAIM` cursor: where the last scan of the PEL stopped.
    cursor: String,
    last: Option<Instant>,
    last_prune: Option<Instant>,
}

/// A [`Queue`] on Redis Streams; see the module documentation.
pub struct RedisQueue {
    client: Client,
    conn: ConnectionManager,
    readers: Mutex<Vec<MultiplexedConnection>>,
    keys: Keys,
    cfg: RedisQueueConfig,
    clock: Arc<dyn Clock>,
    reclaim: Mutex<ReclaimState>,
    recreations: AtomicU64,
    recreated: watch::Sender<u64>,
}

impl std::fmt::Debug for RedisQueue {
    // By hand: the client's connection info may hold a password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisQueue")
            .field("keys", &self.keys)
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

fn backend(what: &str, e: RedisError) -> QueueError {
    QueueError::Backend(format!("redis {what}: {e}"))
}

fn is_nogroup(e: &RedisError) -> bool {
    e.code() == Some("NOGROUP")
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl RedisQueue {
    /// Connects, and creates the stream and its consumer group if needed.
    pub async fn connect(url: &str, cfg: RedisQueueConfig) -> Result<Self, QueueError> {
        Self::connect_with_clock(url, cfg, Arc::new(SystemClock)).await
    }

    /// Like [`RedisQueue::connect`], with the clock that decides when a
    /// delayed job is due (the visibility timeout runs on Redis's clock).
    pub async fn connect_with_clock(
        url: &str,
        cfg: RedisQueueConfig,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, QueueError> {
        validate(&cfg)?;
        let client = Client::open(url).map_err(|e| backend("url", e))?;
        let manager_cfg = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(COMMAND_TIMEOUT))
            .set_max_delay(Duration::from_secs(2));
        let conn = ConnectionManager::new_with_config(client.clone(), manager_cfg)
            .await
            .map_err(|e| backend("connect", e))?;
        let q = Self {
            client,
            conn,
            readers: Mutex::new(Vec::new()),
            keys: Keys::new(&cfg.prefix),
            cfg,
            clock,
            reclaim: Mutex::new(ReclaimState {
                cursor: "0-0".to_string(),
                last: None,
                last_prune: None,
            }),
            recreations: AtomicU64::new(0),
            recreated: watch::Sender::new(0),
        };
        q.create_group().await?;
        Ok(q)
    }

    /// Counts the times the consumer group was found missing and recreated
    /// (Redis lost its data): jobs queued before are gone from Redis, and
    /// the caller may want to run `Pipeline::recover` again.
    pub fn group_recreations(&self) -> watch::Receiver<u64> {
        self.recreated.subscribe()
    }

    /// Sizes of the stream, the pending list, the delayed set and the
    /// poison stream.
    pub async fn stats(&self) -> Result<QueueStats, QueueError> {
        let (stream, pending, delayed, poison): (u64, u64, u64, u64) = STATS
            .key(&self.keys.stream)
            .key(&self.keys.delayed)
            .key(&self.keys.poison)
            .arg(GROUP)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(|e| backend("stats", e))?;
        Ok(QueueStats {
            stream,
            pending,
            delayed,
            poison,
        })
    }

    /// `XGROUP CREATE … 0 MKSTREAM`, ignoring BUSYGROUP (it exists).
    async fn create_group(&self) -> Result<bool, QueueError> {
        let res: Result<(), RedisError> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&self.keys.stream)
            .arg(GROUP)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut self.conn.clone())
            .await;
        match res {
            Ok(()) => Ok(true),
            Err(e) if e.code() == Some("BUSYGROUP") => Ok(false),
            Err(e) => Err(backend("XGROUP CREATE", e)),
        }
    }

    /// After a NOGROUP: recreate the group, and tell whoever listens.
    async fn recreate_group(&self) -> Result<(), QueueError> {
        if self.create_group().await? {
            let n = self.recreations.fetch_add(1, Ordering::Relaxed) + 1;
            self.recreated.send_replace(n);
            warn!(
                stream = %self.keys.stream,
                "the queue's consumer group was missing (Redis lost its data?); recreated it; jobs queued before are only in the database now"
            );
        }
        Ok(())
    }

    /// Moves due delayed jobs into the stream; returns the next due time
    /// (unix ms) of those left.
    async fn move_due(&self) -> Result<Option<i64>, QueueError> {
        let (_moved, next): (u64, Option<i64>) = MOVE_DUE
            .key(&self.keys.delayed)
            .key(&self.keys.stream)
            .key(&self.keys.poison)
            .arg(self.clock.now().timestamp_millis())
            .arg(MOVE_BATCH)
            .arg(POISON_MAXLEN)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(|e| backend("moving due jobs", e))?;
        Ok(next)
    }

    /// Reclaims up to `max` entries idle past the visibility timeout, if
    /// the last look was long enough ago.
    async fn reclaim_if_due(&self, max: usize) -> Result<Vec<Lease>, QueueError> {
        let every = (self.cfg.visibility_timeout / 10)
            .clamp(Duration::from_millis(10), Duration::from_secs(5));
        let (cursor, prune) = {
            let mut s = self.reclaim.lock().expect("reclaim lock");
            let now = Instant::now();
            if s.last.is_some_and(|t| now.duration_since(t) < every) {
                return Ok(Vec::new());
            }
            s.last = Some(now);
            let prune = s
                .last_prune
                .is_none_or(|t| now.duration_since(t) >= PRUNE_EVERY);
            if prune {
                s.last_prune = Some(now);
            }
            (s.cursor.clone(), prune)
        };
        if prune {
            let idle = (self.cfg.visibility_timeout * 10).max(Duration::from_secs(3600));
            if let Err(e) = self.prune_consumers(idle).await {
                warn!(error = %e, "pruning consumers that are gone failed");
            }
        }
        let res = self.reclaim(&cursor, max).await;
        let res = match res {
            Err(e) if is_nogroup(&e) => {
                self.recreate_group().await?;
                self.reclaim(&cursor, max).await
            }
            r => r,
        };
        let (next, claimed, parked) = res.map_err(|e| backend("XAUTOCLAIM", e))?;
        self.reclaim.lock().expect("reclaim lock").cursor = next;
        for (id, fields, n) in parked {
            let job = decode(
                fields
                    .chunks_exact(2)
                    .map(|p| (p[0].as_str(), p[1].as_str())),
            );
            match job {
                Some(job) => error!(
                    webhook_id = %job.webhook,
                    tenant_id = %job.tenant,
                    kind = job.kind.as_str(),
                    entry = %id,
                    deliveries = n,
                    "job parked in the poison stream: handed out too many times without an ack"
                ),
                None => error!(
                    entry = %id,
                    deliveries = n,
                    "malformed entry parked in the poison stream after too many deliveries"
                ),
            }
        }
        let mut out = Vec::with_capacity(claimed.len());
        for (id, fields, n) in claimed {
            match decode(
                fields
                    .chunks_exact(2)
                    .map(|p| (p[0].as_str(), p[1].as_str())),
            ) {
                Some(job) => out.push(Lease {
                    job,
                    receipt: format!("{MAIN_STREAM}/{id}"),
                    deliveries: n,
                }),
                None => self.park_malformed(&self.keys.stream, &id).await?,
            }
        }
        Ok(out)
    }

    async fn reclaim(
        &self,
        cursor: &str,
        max: usize,
    ) -> Result<(String, Vec<Claimed>, Vec<Claimed>), RedisError> {
        RECLAIM
            .key(&self.keys.stream)
            .key(&self.keys.poison)
            .arg(GROUP)
            .arg(&self.cfg.consumer)
            .arg(ms(self.cfg.visibility_timeout))
            .arg(cursor)
            .arg(max)
            .arg(self.cfg.max_deliveries)
            .arg(POISON_MAXLEN)
            .invoke_async(&mut self.conn.clone())
            .await
    }

    /// Removes consumers of the group idle for longer than `idle` that hold
    /// nothing (each process start adds one; a consumer holding entries is
    /// kept, or its entries could not be reclaimed). Returns how many.
    async fn prune_consumers(&self, idle: Duration) -> Result<u64, QueueError> {
        PRUNE
            .key(&self.keys.stream)
            .arg(GROUP)
            .arg(ms(idle))
            .arg(&self.cfg.consumer)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(|e| backend("pruning consumers", e))
    }

    /// An entry this code cannot read (another writer, an older version):
    /// parks it at once, since no worker will ever process it.
    async fn park_malformed(&self, stream: &str, id: &str) -> Result<(), QueueError> {
        error!(entry = %id, "malformed queue entry parked in the poison stream");
        redis::pipe()
            .atomic()
            .cmd("XADD")
            .arg(&self.keys.poison)
            .arg("MAXLEN")
            .arg("~")
            .arg(POISON_MAXLEN)
            .arg("*")
            .arg("stream")
            .arg(stream)
            .arg("entry")
            .arg(id)
            .arg("malformed")
            .arg("1")
            .ignore()
            .cmd("XACK")
            .arg(stream)
            .arg(GROUP)
            .arg(id)
            .ignore()
            .cmd("XDEL")
            .arg(stream)
            .arg(id)
            .ignore()
            .query_async::<()>(&mut self.conn.clone())
            .await
            .map_err(|e| backend("parking an entry", e))
    }

    /// A connection for a blocking read: an idle one from the pool, or a new
    /// one.
    async fn reader(&self) -> Result<MultiplexedConnection, QueueError> {
        if let Some(c) = self.readers.lock().expect("reader pool").pop() {
            return Ok(c);
        }
        let cfg = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(self.cfg.block + BLOCK_MARGIN));
        self.client
            .get_multiplexed_async_connection_with_config(&cfg)
            .await
            .map_err(|e| backend("connecting a reader", e))
    }

    fn put_back(&self, c: MultiplexedConnection) {
        let mut pool = self.readers.lock().expect("reader pool");
        if pool.len() < READER_POOL {
            pool.push(c);
        }
    }

    /// `XREADGROUP … COUNT count [BLOCK block] STREAMS stream >`.
    async fn read_new(
        &self,
        count: usize,
        block: Option<Duration>,
    ) -> Result<Vec<Lease>, QueueError> {
        // Taken out of the pool for the read: if this future is dropped
        // mid-read, the connection goes with it instead of coming back with
        // a read still blocking on it.
        let mut conn = self.reader().await?;
        let mut opts = StreamReadOptions::default()
            .group(GROUP, &self.cfg.consumer)
            .count(count);
        if let Some(b) = block {
            // BLOCK 0 would mean "forever".
            opts = opts.block(usize::try_from(ms(b).max(1)).unwrap_or(usize::MAX));
        }
        let read = |conn: &mut MultiplexedConnection| {
            let cmd = redis::cmd("XREADGROUP")
                .arg(&opts)
                .arg("STREAMS")
                .arg(&self.keys.stream)
                .arg(">")
                .to_owned();
            let mut conn = conn.clone();
            async move { cmd.query_async::<Option<StreamReadReply>>(&mut conn).await }
        };
        let res = match read(&mut conn).await {
            Err(e) if is_nogroup(&e) => {
                self.recreate_group().await?;
                read(&mut conn).await
            }
            r => r,
        };
        let reply = match res {
            Ok(r) => {
                self.put_back(conn);
                r
            }
            // The connection may be broken: do not reuse it.
            Err(e) => return Err(backend("XREADGROUP", e)),
        };
        let mut out = Vec::new();
        for key in reply.map(|r| r.keys).unwrap_or_default() {
            for entry in key.ids {
                match decode_entry(&entry) {
                    Some(job) => out.push(Lease {
                        job,
                        receipt: format!("{MAIN_STREAM}/{}", entry.id),
                        deliveries: 1,
                    }),
                    None => self.park_malformed(&self.keys.stream, &entry.id).await?,
                }
            }
        }
        Ok(out)
    }

    /// The stream key and entry id a receipt names.
    fn locate<'a>(&'a self, receipt: &'a str) -> Result<(&'a str, &'a str), QueueError> {
        receipt
            .split_once('/')
            .and_then(|(name, id)| Some((self.keys.stream_of(name)?, id)))
            .ok_or_else(|| QueueError::Backend(format!("not a redis queue receipt: {receipt:?}")))
    }
}

fn validate(cfg: &RedisQueueConfig) -> Result<(), QueueError> {
    let bad = |m: &str| Err(QueueError::Backend(format!("redis queue config: {m}")));
    if cfg.prefix.is_empty() || cfg.prefix.contains(['{', '}']) {
        return bad("`prefix` must be non-empty and without `{` or `}`");
    }
    if cfg.consumer.is_empty() {
        return bad("`consumer` must be non-empty");
    }
    if cfg.visibility_timeout < Duration::from_millis(1) {
        return bad("`visibility_timeout` must be at least 1ms");
    }
    if cfg.max_deliveries == 0 {
        return bad("`max_deliveries` must be at least 1");
    }
    if cfg.block < Duration::from_millis(1) {
        return bad("`block` must be at least 1ms");
    }
    Ok(())
}

/// A reclaimed entry: id, flat field/value list, delivery count.
type Claimed = (String, Vec<String>, u32);

/// The stream fields of a job, in order; also the delayed set's member (as
/// a JSON array), which is why it must be deterministic.
fn encode(job: &Job) -> [&str; 8] {
    [
        "kind",
        job.kind.as_str(),
        "tenant",
        job.tenant.as_str(),
        "webhook",
        job.webhook.as_str(),
        // Filled in when trace context is propagated. A delayed member must
        // stay the same for the same job, so it will have to live elsewhere
        // (or duplicates will be kept); see the module docs.
        "traceparent",
        "",
    ]
}

fn decode<'a>(fields: impl Iterator<Item = (&'a str, &'a str)>) -> Option<Job> {
    let (mut kind, mut tenant, mut webhook) = (None, None, None);
    for (k, v) in fields {
        match k {
            "kind" => {
                kind = match v {
                    "verify" => Some(JobKind::Verify),
                    "deliver" => Some(JobKind::Deliver),
                    _ => None,
                }
            }
            "tenant" if !v.is_empty() => tenant = Some(TenantId::from_trusted(v.to_string())),
            "webhook" if !v.is_empty() => webhook = Some(WebhookId::from_trusted(v.to_string())),
            _ => {}
        }
    }
    Some(Job {
        kind: kind?,
        priority: Default::default(),
        tenant: tenant?,
        webhook: webhook?,
    })
}

fn text(v: &Value) -> Option<&str> {
    match v {
        Value::BulkString(b) => std::str::from_utf8(b).ok(),
        Value::SimpleString(s) => Some(s.as_str()),
        _ => None,
    }
}

fn decode_entry(entry: &StreamId) -> Option<Job> {
    let fields: Vec<(&str, &str)> = entry
        .map
        .iter()
        .filter_map(|(k, v)| Some((k.as_str(), text(v)?)))
        .collect();
    decode(fields.into_iter())
}

#[async_trait]
impl Queue for RedisQueue {
    async fn enqueue(&self, job: Job, due: Option<DateTime<Utc>>) -> Result<(), QueueError> {
        let fields = encode(&job);
        match due {
            Some(at) if at > self.clock.now() => {
                let member = serde_json::to_string(&fields).expect("strings serialize");
                redis::cmd("ZADD")
                    .arg(&self.keys.delayed)
                    .arg("LT")
                    .arg(at.timestamp_millis())
                    .arg(member)
                    .query_async::<()>(&mut self.conn.clone())
                    .await
                    .map_err(|e| backend("ZADD", e))
            }
            _ => redis::cmd("XADD")
                .arg(&self.keys.stream)
                .arg("*")
                .arg(&fields[..])
                .query_async::<()>(&mut self.conn.clone())
                .await
                .map_err(|e| backend("XADD", e)),
        }
    }

    async fn take(&self, max: usize, wait: Duration) -> Result<Vec<Lease>, QueueError> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let deadline = Instant::now() + wait;
        loop {
            let next_due = self.move_due().await?;
            let mut leases = self.reclaim_if_due(max).await?;
            let want = max - leases.len();
            if want == 0 {
                return Ok(leases);
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            let block = if !leases.is_empty() || remaining.is_zero() {
                None
            } else {
                let mut b = remaining.min(self.cfg.block);
                if let Some(due) = next_due {
                    let until =
                        u64::try_from(due - self.clock.now().timestamp_millis()).unwrap_or(0);
                    b = b.min(Duration::from_millis(until).max(MIN_BLOCK));
                }
                Some(b)
            };
            leases.extend(self.read_new(want, block).await?);
            if !leases.is_empty() || Instant::now() >= deadline {
                return Ok(leases);
            }
        }
    }

    async fn ack(&self, lease: &Lease) -> Result<(), QueueError> {
        let (stream, id) = self.locate(&lease.receipt)?;
        // XACK answers 0, not NOGROUP, when the group is gone: after a data
        // loss there is nothing to ack, and nothing fails.
        redis::pipe()
            .atomic()
            .cmd("XACK")
            .arg(stream)
            .arg(GROUP)
            .arg(id)
            .ignore()
            .cmd("XDEL")
            .arg(stream)
            .arg(id)
            .ignore()
            .query_async::<()>(&mut self.conn.clone())
            .await
            .map_err(|e| backend("XACK", e))
    }

    async fn retry_later(&self, lease: &Lease, due: DateTime<Utc>) -> Result<(), QueueError> {
        let (stream, id) = self.locate(&lease.receipt)?;
        let member = serde_json::to_string(&encode(&lease.job)).expect("strings serialize");
        // One MULTI: the job is never both in the delayed set and pending,
        // nor in neither. A due time already past goes through the delayed
        // set too; the next take moves it.
        redis::pipe()
            .atomic()
            .cmd("ZADD")
            .arg(&self.keys.delayed)
            .arg("LT")
            .arg(due.timestamp_millis())
            .arg(member)
            .ignore()
            .cmd("XACK")
            .arg(stream)
            .arg(GROUP)
            .arg(id)
            .ignore()
            .cmd("XDEL")
            .arg(stream)
            .arg(id)
            .ignore()
            .query_async::<()>(&mut self.conn.clone())
            .await
            .map_err(|e| backend("retry_later", e))
    }

    async fn ping(&self) -> Result<(), QueueError> {
        redis::cmd("PING")
            .query_async::<()>(&mut self.conn.clone())
            .await
            .map_err(|e| backend("PING", e))
    }
}

/// KEYS: delayed, stream, poison. ARGV: now (unix ms), batch, poison maxlen.
/// Moves due members to the stream (a member that does not decode goes to
/// the poison stream); returns {moved, next due score or nil}.
static MOVE_DUE: std::sync::LazyLock<Script> = std::sync::LazyLock::new(|| {
    Script::new(
        r#"
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
for _, member in ipairs(due) do
  local ok, fields = pcall(cjson.decode, member)
  if ok and type(fields) == 'table' and #fields > 0 and #fields % 2 == 0 then
    redis.call('XADD', KEYS[2], '*', unpack(fields))
  else
    redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[3], '*', 'delayed', member)
  end
  redis.call('ZREM', KEYS[1], member)
end
local nxt = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
local score = false
if nxt[2] then score = tonumber(nxt[2]) end
return {#due, score}
"#,
    )
});

/// KEYS: stream, poison. ARGV: group, consumer, min idle (ms), cursor,
/// count, max deliveries, poison maxlen. Claims idle entries; parks those
/// handed out more than max deliveries times. Returns {next cursor,
/// claimed, parked}, each entry {id, {field, value, …}, deliveries}.
static RECLAIM: std::sync::LazyLock<Script> = std::sync::LazyLock::new(|| {
    Script::new(
        r#"
local r = redis.pcall('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4], 'COUNT', ARGV[5])
if r.err then return redis.error_reply(r.err) end
local max = tonumber(ARGV[6])
local claimed, parked = {}, {}
for _, e in ipairs(r[2]) do
  -- Redis 6.2 reports entries deleted meanwhile as nil.
  if e then
    local id, fields = e[1], e[2] or {}
    local p = redis.call('XPENDING', KEYS[1], ARGV[1], id, id, 1)
    local n = 1
    if p[1] then n = p[1][4] end
    if n > max then
      local rec = {'stream', KEYS[1], 'entry', id, 'deliveries', tostring(n)}
      for _, f in ipairs(fields) do rec[#rec + 1] = f end
      redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[7], '*', unpack(rec))
      redis.call('XACK', KEYS[1], ARGV[1], id)
      redis.call('XDEL', KEYS[1], id)
      parked[#parked + 1] = {id, fields, n}
    else
      claimed[#claimed + 1] = {id, fields, n}
    end
  end
end
return {r[1], claimed, parked}
"#,
    )
});

/// KEYS: stream. ARGV: group, min idle (ms), own consumer name. Deletes
/// consumers that hold nothing and were idle that long; returns how many.
static PRUNE: std::sync::LazyLock<Script> = std::sync::LazyLock::new(|| {
    Script::new(
        r#"
local list = redis.pcall('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])
if list.err then return 0 end
local min_idle = tonumber(ARGV[2])
local n = 0
for _, c in ipairs(list) do
  local name, pending, idle
  for i = 1, #c, 2 do
    if c[i] == 'name' then name = c[i + 1]
    elseif c[i] == 'pending' then pending = c[i + 1]
    elseif c[i] == 'idle' then idle = c[i + 1] end
  end
  if name and name ~= ARGV[3] and pending == 0 and idle and idle > min_idle then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], name)
    n = n + 1
  end
end
return n
"#,
    )
});

/// KEYS: stream, delayed, poison. ARGV: group. Returns {stream length,
/// pending, delayed, poison length}.
static STATS: std::sync::LazyLock<Script> = std::sync::LazyLock::new(|| {
    Script::new(
        r#"
local pending = 0
local p = redis.pcall('XPENDING', KEYS[1], ARGV[1])
if not p.err then pending = p[1] end
return {redis.call('XLEN', KEYS[1]), pending, redis.call('ZCARD', KEYS[2]), redis.call('XLEN', KEYS[3])}
"#,
    )
});

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;

    /// The Redis to test against, or `None` (skip) when not configured.
    fn redis_url() -> Option<String> {
        match std::env::var("UPLOADHOOK_TEST_REDIS_URL") {
            Ok(u) => Some(u),
            Err(_) => {
                if std::env::var("UPLOADHOOK_REQUIRE_SERVICES").as_deref() == Ok("1") {
                    panic!(
                        "UPLOADHOOK_REQUIRE_SERVICES=1 but UPLOADHOOK_TEST_REDIS_URL is not set"
                    );
                }
                eprintln!("skipping Redis: UPLOADHOOK_TEST_REDIS_URL is not set");
                None
            }
        }
    }

    /// A fresh key prefix, whose keys are deleted when this is dropped (even
    /// when the test panics).
    struct Space {
        url: String,
        prefix: String,
    }

    impl Space {
        fn new() -> Option<Self> {
            Some(Self {
                url: redis_url()?,
                prefix: format!("uploadhook-test-{:016x}", rand::random::<u64>()),
            })
        }

        fn cfg(&self, consumer: &str) -> RedisQueueConfig {
            RedisQueueConfig {
                prefix: self.prefix.clone(),
                consumer: consumer.to_string(),
                visibility_timeout: Duration::from_secs(60),
                max_deliveries: 10,
                block: Duration::from_millis(200),
            }
        }

        async fn queue(&self, consumer: &str) -> RedisQueue {
            RedisQueue::connect(&self.url, self.cfg(consumer))
                .await
                .unwrap()
        }

        fn keys(&self) -> Keys {
            Keys::new(&self.prefix)
        }

        async fn raw(&self) -> MultiplexedConnection {
            Client::open(self.url.as_str())
                .unwrap()
                .get_multiplexed_async_connection()
                .await
                .unwrap()
        }
    }

    impl Drop for Space {
        fn drop(&mut self) {
            let k = self.keys();
            if let Ok(mut c) = Client::open(self.url.as_str())
                .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(1)))
            {
                let _: Result<(), _> = redis::cmd("DEL")
                    .arg(&k.stream)
                    .arg(&k.delayed)
                    .arg(&k.poison)
                    .query(&mut c);
            }
        }
    }

    fn job() -> Job {
        Job {
            kind: JobKind::Deliver,
            priority: Default::default(),
            tenant: TenantId::generate(),
            webhook: WebhookId::generate(),
        }
    }

    #[tokio::test]
    async fn due_jobs_come_out_in_order_and_ack_removes() {
        let Some(s) = Space::new() else { return };
        let q = s.queue("a").await;
        let (a, b) = (job(), job());
        q.enqueue(a.clone(), None).await.unwrap();
        q.enqueue(b.clone(), None).await.unwrap();
        let got = q.take(10, Duration::from_millis(10)).await.unwrap();
        assert_eq!(
            got.iter().map(|l| l.job.clone()).collect::<Vec<_>>(),
            vec![a, b]
        );
        assert!(got.iter().all(|l| l.deliveries == 1));
        assert!(got.iter().all(|l| l.receipt.starts_with("stream/")));
        let st = q.stats().await.unwrap();
        assert_eq!((st.stream, st.pending), (2, 2));
        for l in &got {
            q.ack(l).await.unwrap();
        }
        assert_eq!(
            q.stats().await.unwrap(),
            QueueStats {
                stream: 0,
                pending: 0,
                delayed: 0,
                poison: 0
            }
        );
        q.ping().await.unwrap();
    }

    #[tokio::test]
    async fn take_respects_max() {
        let Some(s) = Space::new() else { return };
        let q = s.queue("a").await;
        for _ in 0..5 {
            q.enqueue(job(), None).await.unwrap();
        }
        assert_eq!(q.take(3, Duration::ZERO).await.unwrap().len(), 3);
        assert_eq!(q.take(3, Duration::ZERO).await.unwrap().len(), 2);
        assert!(q.take(3, Duration::ZERO).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn delayed_jobs_wait_for_their_time() {
        let Some(s) = Space::new() else { return };
        let clock = ManualClock::new(Utc::now());
        let q = RedisQueue::connect_with_clock(&s.url, s.cfg("a"), Arc::new(clock.clone()))
            .await
            .unwrap();
        let j = job();
        q.enqueue(j.clone(), Some(clock.now() + chrono::Duration::seconds(60)))
            .await
            .unwrap();
        // A due time in the past is due now.
        let k = job();
        q.enqueue(k.clone(), Some(clock.now() - chrono::Duration::seconds(1)))
            .await
            .unwrap();
        let got = q.take(10, Duration::from_millis(20)).await.unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].job, k);
        clock.advance(chrono::Duration::seconds(59));
        assert!(
            q.take(10, Duration::from_millis(20))
                .await
                .unwrap()
                .is_empty()
        );
        clock.advance(chrono::Duration::seconds(1));
        let got = q.take(10, Duration::from_millis(20)).await.unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].job, j);
        assert_eq!(q.stats().await.unwrap().delayed, 0);
    }

    #[tokio::test]
    async fn a_blocked_taker_wakes_when_a_delayed_job_falls_due() {
        let Some(s) = Space::new() else { return };
        let mut cfg = s.cfg("a");
        cfg.block = Duration::from_secs(10);
        let q = RedisQueue::connect(&s.url, cfg).await.unwrap();
        let due = Utc::now() + chrono::Duration::milliseconds(300);
        q.enqueue(job(), Some(due)).await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), q.take(1, Duration::from_secs(10)))
            .await
            .expect("the block is bounded by the next due time")
            .unwrap();
        assert_eq!(got.len(), 1);
        assert!(Utc::now() >= due, "not before its time");
    }

    #[tokio::test]
    async fn scheduling_the_same_job_twice_keeps_the_earlier_time() {
        let Some(s) = Space::new() else { return };
        let clock = ManualClock::new(Utc::now());
        let q = RedisQueue::connect_with_clock(&s.url, s.cfg("a"), Arc::new(clock.clone()))
            .await
            .unwrap();
        let j = job();
        let t = clock.now();
        q.enqueue(j.clone(), Some(t + chrono::Duration::seconds(30)))
            .await
            .unwrap();
        q.enqueue(j.clone(), Some(t + chrono::Duration::seconds(60)))
            .await
            .unwrap();
        q.enqueue(j.clone(), Some(t + chrono::Duration::seconds(10)))
            .await
            .unwrap();
        assert_eq!(q.stats().await.unwrap().delayed, 1);
        clock.advance(chrono::Duration::seconds(10));
        assert_eq!(q.take(10, Duration::ZERO).await.unwrap().len(), 1);
        assert_eq!(q.stats().await.unwrap().delayed, 0);
    }

    #[tokio::test]
    async fn retry_later_moves_the_job_to_delayed() {
        let Some(s) = Space::new() else { return };
        let clock = ManualClock::new(Utc::now());
        let q = RedisQueue::connect_with_clock(&s.url, s.cfg("a"), Arc::new(clock.clone()))
            .await
            .unwrap();
        let j = job();
        q.enqueue(j.clone(), None).await.unwrap();
        let l = q.take(1, Duration::ZERO).await.unwrap().pop().unwrap();
        q.retry_later(&l, clock.now() + chrono::Duration::seconds(5))
            .await
            .unwrap();
        assert_eq!(
            q.stats().await.unwrap(),
            QueueStats {
                stream: 0,
                pending: 0,
                delayed: 1,
                poison: 0
            }
        );
        assert!(q.take(1, Duration::ZERO).await.unwrap().is_empty());
        clock.advance(chrono::Duration::seconds(5));
        let got = q.take(1, Duration::ZERO).await.unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].job, j);
        assert_eq!(got[0].deliveries, 1, "a retry is a new entry");
    }

    #[tokio::test]
    async fn a_waiting_taker_wakes_on_enqueue() {
        let Some(s) = Space::new() else { return };
        let q = Arc::new(s.queue("a").await);
        let producer = s.queue("producer").await;
        let q2 = q.clone();
        let taker = tokio::spawn(async move { q2.take(1, Duration::from_secs(30)).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        // Commands on the shared connection are not stuck behind the read.
        q.ping().await.unwrap();
        producer.enqueue(job(), None).await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), taker)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(got.len(), 1);
    }

    #[tokio::test]
    async fn two_consumers_never_get_the_same_entry() {
        let Some(s) = Space::new() else { return };
        let a = Arc::new(s.queue("a").await);
        let b = Arc::new(s.queue("b").await);
        let n = 60;
        for _ in 0..n {
            a.enqueue(job(), None).await.unwrap();
        }
        let drain = |q: Arc<RedisQueue>| {
            tokio::spawn(async move {
                let mut got = Vec::new();
                loop {
                    let batch = q.take(7, Duration::from_millis(20)).await.unwrap();
                    if batch.is_empty() {
                        return got;
                    }
                    got.extend(batch);
                }
            })
        };
        let (ga, gb) = tokio::join!(drain(a), drain(b));
        let (ga, gb) = (ga.unwrap(), gb.unwrap());
        let mut all: Vec<String> = ga.iter().chain(&gb).map(|l| l.receipt.clone()).collect();
        assert_eq!(all.len(), n);
        all.sort();
        all.dedup();
        assert_eq!(all.len(), n, "an entry went to both consumers");
        let mut hooks: Vec<_> = ga
            .iter()
            .chain(&gb)
            .map(|l| l.job.webhook.clone())
            .collect();
        hooks.sort();
        hooks.dedup();
        assert_eq!(hooks.len(), n);
    }

    #[tokio::test]
    async fn an_entry_of_a_dead_consumer_is_reclaimed_after_the_visibility_timeout() {
        let Some(s) = Space::new() else { return };
        let mut cfg = s.cfg("dies");
        cfg.visibility_timeout = Duration::from_millis(200);
        let dies = RedisQueue::connect(&s.url, cfg.clone()).await.unwrap();
        let j = job();
        dies.enqueue(j.clone(), None).await.unwrap();
        let taken = dies.take(1, Duration::ZERO).await.unwrap().pop().unwrap();
        drop(dies);

        cfg.consumer = "lives".to_string();
        let lives = RedisQueue::connect(&s.url, cfg).await.unwrap();
        assert!(
            lives.take(1, Duration::ZERO).await.unwrap().is_empty(),
            "not before the visibility timeout"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
        let got = lives.take(1, Duration::from_millis(100)).await.unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].job, j);
        assert_eq!(got[0].receipt, taken.receipt);
        assert_eq!(got[0].deliveries, 2);
        lives.ack(&got[0]).await.unwrap();
        // The dead consumer's late ack is harmless.
        lives.ack(&taken).await.unwrap();
        let st = lives.stats().await.unwrap();
        assert_eq!((st.stream, st.pending), (0, 0));
    }

    #[tokio::test]
    async fn an_entry_handed_out_too_often_is_parked() {
        let Some(s) = Space::new() else { return };
        let mut cfg = s.cfg("a");
        cfg.visibility_timeout = Duration::from_millis(100);
        cfg.max_deliveries = 2;
        let q = RedisQueue::connect(&s.url, cfg).await.unwrap();
        let j = job();
        q.enqueue(j.clone(), None).await.unwrap();
        let first = q.take(1, Duration::ZERO).await.unwrap();
        assert_eq!(first[0].deliveries, 1);
        tokio::time::sleep(Duration::from_millis(120)).await;
        let second = q.take(1, Duration::ZERO).await.unwrap();
        assert_eq!(second[0].deliveries, 2);
        tokio::time::sleep(Duration::from_millis(120)).await;
        assert!(q.take(1, Duration::ZERO).await.unwrap().is_empty());
        assert_eq!(
            q.stats().await.unwrap(),
            QueueStats {
                stream: 0,
                pending: 0,
                delayed: 0,
                poison: 1
            }
        );
        let parked: Vec<(String, Vec<String>)> = redis::cmd("XRANGE")
            .arg(&s.keys().poison)
            .arg("-")
            .arg("+")
            .query_async(&mut s.raw().await)
            .await
            .unwrap();
        let fields = &parked[0].1;
        let get = |k: &str| {
            fields
                .chunks_exact(2)
                .find(|p| p[0] == k)
                .map(|p| p[1].clone())
        };
        assert_eq!(get("webhook").as_deref(), Some(j.webhook.as_str()));
        assert_eq!(get("deliveries").as_deref(), Some("3"));
        assert_eq!(
            get("entry"),
            Some(first[0].receipt["stream/".len()..].to_string())
        );
    }

    #[tokio::test]
    async fn a_lost_stream_and_group_are_recreated() {
        let Some(s) = Space::new() else { return };
        let q = s.queue("a").await;
        let mut recreations = q.group_recreations();
        q.enqueue(job(), None).await.unwrap();
        let l = q.take(1, Duration::ZERO).await.unwrap().pop().unwrap();
        // Redis loses its data: the stream, its group and the PEL go.
        let _: () = redis::cmd("DEL")
            .arg(&s.keys().stream)
            .query_async(&mut s.raw().await)
            .await
            .unwrap();
        // Acking an entry that is gone is not an error.
        q.ack(&l).await.unwrap();
        // An enqueue after the loss recreates the stream without a group;
        // the next take recreates the group and still gets the job.
        let j = job();
        q.enqueue(j.clone(), None).await.unwrap();
        let got = q.take(1, Duration::from_millis(50)).await.unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].job, j);
        assert!(recreations.has_changed().unwrap());
        assert_eq!(*recreations.borrow_and_update(), 1);
        // Without any enqueue, a take after a loss is just empty.
        let _: () = redis::cmd("DEL")
            .arg(&s.keys().stream)
            .query_async(&mut s.raw().await)
            .await
            .unwrap();
        assert!(
            q.take(1, Duration::from_millis(20))
                .await
                .unwrap()
                .is_empty()
        );
        assert_eq!(*recreations.borrow(), 2);
    }

    #[tokio::test]
    async fn malformed_entries_are_parked_not_returned() {
        let Some(s) = Space::new() else { return };
        let q = s.queue("a").await;
        let mut raw = s.raw().await;
        let _: () = redis::cmd("XADD")
            .arg(&s.keys().stream)
            .arg("*")
            .arg("kind")
            .arg("explode")
            .query_async(&mut raw)
            .await
            .unwrap();
        let _: () = redis::cmd("ZADD")
            .arg(&s.keys().delayed)
            .arg(0)
            .arg("not json")
            .query_async(&mut raw)
            .await
            .unwrap();
        q.enqueue(job(), None).await.unwrap();
        let got = q.take(10, Duration::ZERO).await.unwrap();
        assert_eq!(got.len(), 1);
        let st = q.stats().await.unwrap();
        assert_eq!((st.stream, st.delayed, st.poison), (1, 0, 2));
    }

    #[tokio::test]
    async fn consumers_that_are_gone_and_hold_nothing_are_pruned() {
        let Some(s) = Space::new() else { return };
        let gone = s.queue("gone").await;
        let holds = s.queue("holds").await;
        let me = s.queue("me").await;
        gone.enqueue(job(), None).await.unwrap();
        gone.enqueue(job(), None).await.unwrap();
        let done = gone.take(1, Duration::ZERO).await.unwrap().pop().unwrap();
        gone.ack(&done).await.unwrap();
        assert_eq!(holds.take(1, Duration::ZERO).await.unwrap().len(), 1);
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert_eq!(me.prune_consumers(Duration::ZERO).await.unwrap(), 1);
        let consumers: Vec<std::collections::HashMap<String, Value>> = redis::cmd("XINFO")
            .arg("CONSUMERS")
            .arg(&s.keys().stream)
            .arg(GROUP)
            .query_async(&mut s.raw().await)
            .await
            .unwrap();
        let names: Vec<String> = consumers
            .iter()
            .filter_map(|c| redis::from_redis_value_ref(c.get("name")?).ok())
            .collect();
        assert!(!names.contains(&"gone".to_string()), "{names:?}");
        assert!(names.contains(&"holds".to_string()), "{names:?}");
    }

    #[tokio::test]
    async fn a_cancelled_take_swallows_nothing() {
        let Some(s) = Space::new() else { return };
        let mut cfg = s.cfg("cancelled");
        cfg.block = Duration::from_secs(5);
        let a = Arc::new(RedisQueue::connect(&s.url, cfg).await.unwrap());
        let b = s.queue("b").await;
        let a2 = a.clone();
        let taker = tokio::spawn(async move { a2.take(1, Duration::from_secs(5)).await });
        // Let it reach its blocking read, then cancel it as the worker loop
        // does at shutdown.
        tokio::time::sleep(Duration::from_millis(50)).await;
        taker.abort();
        let _ = taker.await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        b.enqueue(job(), None).await.unwrap();
        let got = b.take(1, Duration::from_millis(500)).await.unwrap();
        assert_eq!(got.len(), 1, "the cancelled read took the entry");
    }

    #[test]
    fn keys_share_one_hash_tag() {
        let k = Keys::new("uploadhook");
        assert_eq!(k.stream, "{uploadhook:jobs}:stream");
        assert_eq!(k.delayed, "{uploadhook:jobs}:delayed");
        assert_eq!(k.poison, "{uploadhook:jobs}:poison");
        assert_eq!(k.stream_of("stream"), Some(k.stream.as_str()));
        assert_eq!(k.stream_of("other"), None);
    }

    #[test]
    fn config_is_validated() {
        let ok = RedisQueueConfig::default();
        assert!(validate(&ok).is_ok());
        for bad in [
            RedisQueueConfig {
                prefix: "a{b}".into(),
                ..ok.clone()
            },
            RedisQueueConfig {
                max_deliveries: 0,
                ..ok.clone()
            },
            RedisQueueConfig {
                block: Duration::ZERO,
                ..ok.clone()
            },
        ] {
            assert!(validate(&bad).is_err());
        }
    }

    #[test]
    fn fields_round_trip() {
        let j = job();
        let f = encode(&j);
        assert_eq!(
            decode(f.chunks_exact(2).map(|p| (p[0], p[1]))),
            Some(j.clone())
        );
        assert_eq!(decode([("kind", "deliver")].into_iter()), None);
    }
}
