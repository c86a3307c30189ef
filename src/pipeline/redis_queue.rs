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
//! - `{p:jobs}:stream` and `{p:jobs}:stream:high`: the entries due now (and
//!   those taken, until acked), normal and high priority. Each stream has a
//!   consumer group of the same name, `workers`. Acked entries are deleted
//!   (`XDEL`), so the streams only hold work not yet done and need no
//!   trimming.
//! - `{p:jobs}:delayed`: a sorted set of jobs of both priorities due later,
//!   scored by their due time in unix milliseconds.
//! - `{p:jobs}:poison`: entries parked after too many deliveries, for a
//!   human to look at (capped at about [`POISON_MAXLEN`] entries).
//!
//! A lease's receipt is `<stream>/<entry id>` (`stream/1712345678901-0`,
//! `stream:high/1712345678901-1`): it names the stream the entry came from,
//! so acking and putting back find it without being told its priority.
//!
//! # Priority: a weighted take
//!
//! A stream per priority, rather than one stream in priority order (which a
//! stream cannot be) or a sorted set (which loses the PEL). Each take
//! applies the weighting of [`HighShare`] ([`RedisQueueConfig::high_share`],
//! 80 % by default): of `max` entries, a quota goes to high-priority
//! entries, the rest to normal ones, and a class with fewer waiting leaves
//! its part to the other ([`split`]), so normal work is slowed by a flood
//! of high-priority work but never stopped. A job's priority is also a
//! field of its entry (`priority`); an entry without one, written before
//! there were priorities, is normal work.
//!
//! Every `take` runs `TAKE`, one Lua script that first moves due delayed
//! jobs (below), then reads with `XREADGROUP` without blocking: high
//! entries up to the quota, normal entries up to what that leaves, then high
//! entries again up to what is left. Reading inside the script costs one
//! round trip and reads exactly the split, never more: an entry read by
//! `XREADGROUP` is this consumer's until acked, and cannot be "unread".
//!
//! Only when that finds nothing does the take block, in one `XREADGROUP …
//! COUNT <want> BLOCK … STREAMS high normal > >`, which wakes for an entry
//! in either stream and, among the consumers blocked on a stream, hands a
//! new entry to one. Redis 7.0 answers a read blocked on several streams
//! with the entries of the stream that got one first, so this read
//! returns at most `want`. A Redis that re-runs the whole read on wake-up,
//! or entries that arrive in both streams between the script and the read,
//! can give up to `want` from each: the excess beyond the split is given
//! back at once, as new entries at the end of their streams (in one
//! `MULTI`: `XADD` the same fields, `XACK`, `XDEL`). Both streams were
//! empty a moment before, so this reorders next to nothing.
//!
//! A take of one cannot be split; each queue counts its single takes that
//! got a job, and one in five (at 80 %) reads normal entries first. The
//! count is per process, so with several workers the proportion holds per
//! worker, not exactly across them.
//!
//! # Delayed jobs: the Lua mover
//!
//! Streams have no "visible from" time, so jobs due later wait in the
//! sorted set. The first part of `TAKE` reads the due members
//! (`ZRANGEBYSCORE … LIMIT`), `XADD`s each to the stream its `priority`
//! field names and `ZREM`s it. A script runs atomically, so of several
//! workers racing, whichever runs it first moves the due jobs and the
//! others find nothing: a delayed job enters a stream exactly once (short of
//! a Redis failover losing a write, which the database-backed recovery
//! covers). The script also returns the next due time, and `take` blocks
//! no longer than until then, so a job falling due while every worker is
//! blocked in `XREADGROUP` is late by at most a few milliseconds.
//!
//! A delayed member is the job's fields and nothing else (no nonce), so
//! scheduling the same job twice keeps one member, and `ZADD LT` keeps the
//! earlier of the two times. That is deliberate: the database holds one
//! next-attempt time per webhook, the reconciler may re-enqueue a delayed
//! webhook, and a Redis that outlives the process would otherwise collect
//! more copies over time. Keeping the earlier
//! time never loses a wake-up; a job that comes out early is harmless (a
//! delivery that is not yet due schedules itself again, see
//! `Pipeline::deliver`). (Members written before there were priorities
//! lack the field, so the first start after an upgrade may add a second
//! member for such a job: one harmless duplicate, once.)
//!
//! # Visibility timeout and reclaim
//!
//! An entry a consumer took and never acked (the process died, or the job
//! is stuck) sits in its stream's PEL. A `take` runs `RECLAIM` when the
//! last run was more than a tenth of the visibility timeout ago (clamped to
//! 10 ms … 5 s), so an orphan waits at most about 1.1 visibility timeouts:
//! `XAUTOCLAIM`, on the high stream first and then on the normal one (each
//! with its own cursor), hands entries idle for longer than the visibility
//! timeout to this consumer (raising their delivery count), and returns
//! them as leases with their delivery count. Reclaimed entries are not
//! weighted: they are few, and late already. The visibility timeout must
//! be longer than the longest job (the delivery timeout plus the database
//! writes); a job that outlives it runs twice, which the database's
//! compare-and-set transitions make harmless but not free (a receiver may
//! get the webhook twice, deduplicated by its id).
//!
//! Each process start adds a consumer to a group, once it gets its first
//! entry from that group's stream. Every ten minutes a `take` also deletes,
//! from each group, consumers that hold nothing there and were idle for an
//! hour (or ten visibility timeouts); one that holds entries is kept, or
//! its entries could never be reclaimed.
//!
//! # Poison
//!
//! An entry whose delivery count would exceed `max_deliveries` has made
//! that many workers die or time out: it is parked in the poison stream
//! (with its stream, entry id and delivery count), acked and deleted from
//! its stream, and logged at error level with its webhook id. Its webhook
//! keeps its status in the database, so the next start's recovery queues
//! it again. A job put back with `retry_later` is a new entry with a fresh
//! count: only crashes and timeouts count towards poison, not failed
//! deliveries (those have the retry policy).
//!
//! # Data loss
//!
//! Redis may run without persistence. When a stream or its group is gone
//! (`NOGROUP`), the queue recreates the groups at id `0` (not `$`, which
//! would skip jobs `XADD`ed since the loss) and retries the command once.
//! The scripts read a stream without its group as empty and say so, rather
//! than fail after reading the other stream. Jobs queued before the loss
//! are gone from Redis but not from the database: the reconciler
//! (`Pipeline::reconcile`) queues them again once they are overdue by the
//! visibility timeout. [`RedisQueue::group_recreations`] counts the losses
//! for operators and tests.
//!
//! # Connections
//!
//! Commands go through one shared [`Conn`] (see [`super::redis_conn`]): on
//! one Redis a `ConnectionManager`, a multiplexed connection that reconnects
//! by itself with backoff; on a Redis Cluster (`redis+cluster://…`) a
//! `ClusterConnection`, which keeps one such connection per primary, routes
//! each command by its first key and follows `MOVED`/`ASK`. The blocking
//! `XREADGROUP` must not share it: Redis answers one connection's commands
//! in order, so while a read blocks, every command pipelined behind it on
//! that connection waits too, and the command timeout would fail them.
//! Blocking reads use connections of their own from a small pool instead
//! (a plain multiplexed connection, or on a cluster a `ClusterConnection`
//! of its own, built by a client whose response timeout, which there is
//! also the overall bound of a request, is longer than the longest block);
//! a connection that failed, or whose read was cancelled, is dropped rather
//! than reused. Dropping it closes its sockets at once (a cluster
//! connection's background task is aborted with it), and Redis forgets a
//! blocked read of a closed client, so a `take` cancelled mid-read (the
//! worker loop does that at shutdown) swallows no entry.
//!
//! Due times are compared with the caller's [`Clock`] (the workers'
//! clocks, passed to the mover), not Redis's: a worker whose clock runs
//! ahead moves jobs a little early, which is harmless. The visibility
//! timeout, on the other hand, is measured by Redis.
//!
//! # Cluster
//!
//! `queue.redis_url = "redis+cluster://host:port"` runs the queue on a Redis
//! Cluster, found through that node (the scheme, not the number of hosts,
//! decides; see [`super::redis_conn`]). Nothing else changes, because the
//! queue was built for it:
//!
//! - Every key of one queue carries the hash tag `{<prefix>:jobs}`, so one
//!   queue lives in one slot, on one primary: a queue is not spread over
//!   the cluster (several prefixes are, one slot each).
//! - Each script (`TAKE`, `RECLAIM`, `PRUNE`, `STATS`, and the leader's
//!   lease) names every key it touches in `KEYS`, all of that one tag, and
//!   builds no key names of its own; the client routes it by its first key.
//!   `SCRIPT LOAD` after a `NOSCRIPT` goes to every node.
//! - Each `MULTI` block (a group of acks, `retry_later`, parking, giving
//!   back) and each `XREADGROUP … STREAMS high normal` touches only keys
//!   of the tag, so Redis never answers `CROSSSLOT`.
//!
//! A failover of the queue's primary can lose its latest writes (Redis
//! replication is asynchronous), as a restart without persistence does;
//! the same recovery covers it (see *Data loss*).
//!
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
    RedisError, Script, Value,
    streams::{StreamId, StreamReadOptions, StreamReadReply},
};
use tokio::{
    sync::{mpsc, oneshot, watch},
    time::Instant,
};
use tracing::{error, warn};

use super::{
    queue::{HighShare, Job, JobKind, Lease, Priority, Queue, QueueError, split},
    redis_conn::{Conn, RedisTarget, Timeouts},
};
use crate::{
    clock::{Clock, SystemClock},
    domain::{TenantId, WebhookId},
};

/// The consumer group every worker joins (the same name on both streams).
const GROUP: &str = "workers";
/// The stream of normal-priority jobs, as named in keys and receipts.
const MAIN_STREAM: &str = "stream";
/// The stream of high-priority jobs, as named in keys and receipts.
const HIGH_STREAM: &str = "stream:high";
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
/// The timeouts of the connection for ordinary commands (the leader's too).
pub(crate) const COMMAND_TIMEOUTS: Timeouts = Timeouts {
    connect: CONNECT_TIMEOUT,
    response: COMMAND_TIMEOUT,
};
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
    /// The weighting of high-priority jobs against normal ones.
    pub high_share: HighShare,
}

impl Default for RedisQueueConfig {
    fn default() -> Self {
        Self {
            prefix: "uploadhook".to_string(),
            consumer: default_consumer_name(),
            visibility_timeout: Duration::from_secs(60),
            max_deliveries: 10,
            block: Duration::from_secs(1),
            high_share: HighShare::DEFAULT,
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
    /// Normal-priority jobs.
    stream: String,
    /// High-priority jobs.
    high: String,
    delayed: String,
    poison: String,
}

/// Acking and deleting an entry always go together: acked entries are
/// deleted so that a stream only holds unfinished work.
trait AckAndDelete {
    fn ack_and_delete(&mut self, stream: &str, id: &str) -> &mut Self;
}

impl AckAndDelete for redis::Pipeline {
    fn ack_and_delete(&mut self, stream: &str, id: &str) -> &mut Self {
        self.cmd("XACK")
            .arg(stream)
            .arg(GROUP)
            .arg(id)
            .ignore()
            .cmd("XDEL")
            .arg(stream)
            .arg(id)
            .ignore()
    }
}

/// The name of a class's stream, as in its key and in receipts.
fn stream_name(p: Priority) -> &'static str {
    match p {
        Priority::High => HIGH_STREAM,
        Priority::Normal => MAIN_STREAM,
    }
}

/// A lease's receipt: the stream's name and the entry id.
fn receipt(p: Priority, id: &str) -> String {
    format!("{}/{id}", stream_name(p))
}

impl Keys {
    fn new(prefix: &str) -> Self {
        let tag = format!("{{{prefix}:jobs}}");
        Self {
            stream: format!("{tag}:{MAIN_STREAM}"),
            high: format!("{tag}:{HIGH_STREAM}"),
            delayed: format!("{tag}:delayed"),
            poison: format!("{tag}:poison"),
        }
    }

    /// The stream of a class.
    fn stream_for(&self, p: Priority) -> &str {
        match p {
            Priority::High => &self.high,
            Priority::Normal => &self.stream,
        }
    }

    /// The stream key a receipt names.
    fn stream_of(&self, name: &str) -> Option<&str> {
        match name {
            MAIN_STREAM => Some(&self.stream),
            HIGH_STREAM => Some(&self.high),
            _ => None,
        }
    }
}

/// Sizes of the queue's parts, for metrics and operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueStats {
    /// Entries in both streams: waiting, and taken but not yet acked.
    pub stream: u64,
    /// Of those, in the high-priority stream.
    pub high: u64,
    /// Of those, taken and not yet acked.
    pub pending: u64,
    /// Jobs due later.
    pub delayed: u64,
    /// Parked entries.
    pub poison: u64,
    /// Age of the oldest unfinished entry (waiting or taken) in either
    /// stream, by its entry id's time; None when both are empty.
    pub oldest_age: Option<Duration>,
}

struct ReclaimState {
    /// `XAUTOCLAIM` cursors of the high and the normal stream: where the
    /// last scan of each PEL stopped.
    cursors: [String; 2],
    last: Option<Instant>,
    last_prune: Option<Instant>,
}

/// A [`Queue`] on Redis Streams; see the module documentation.
pub struct RedisQueue {
    target: RedisTarget,
    conn: Conn,
    readers: Mutex<Vec<Conn>>,
    keys: Keys,
    cfg: RedisQueueConfig,
    clock: Arc<dyn Clock>,
    reclaim: Mutex<ReclaimState>,
    recreations: AtomicU64,
    recreated: watch::Sender<u64>,
    /// Single takes that got a job (see [`HighShare::high_quota`]).
    single_turn: AtomicU64,
    /// The writer of grouped acks, started by the first ack.
    /// (Started again if it stopped.)
    acks: Mutex<Option<mpsc::UnboundedSender<PendingAck>>>,
}

/// An ack waiting for the next group.
struct PendingAck {
    stream: String,
    id: String,
    done: oneshot::Sender<Result<(), String>>,
}

/// Acks written in one `MULTI` at most.
const ACK_GROUP_MAX: usize = 512;

/// Writes acks in groups: one `MULTI` with one `XACK` and one `XDEL` per
/// stream for whatever acks are waiting, then the next group. One group is
/// in flight at a time: an ack that arrives meanwhile waits for it, then
/// goes with the next (two round trips at most, unless more than
/// [`ACK_GROUP_MAX`] are waiting). Ends when the queue is dropped, with
/// the number of groups it wrote.
async fn write_acks(mut conn: Conn, mut waiting: mpsc::UnboundedReceiver<PendingAck>) -> u64 {
    let mut groups = 0;
    while let Some(first) = waiting.recv().await {
        let mut group = vec![first];
        while group.len() < ACK_GROUP_MAX {
            match waiting.try_recv() {
                Ok(ack) => group.push(ack),
                Err(_) => break,
            }
        }
        let mut by_stream: std::collections::BTreeMap<&str, Vec<&str>> = Default::default();
        for ack in &group {
            by_stream.entry(&ack.stream).or_default().push(&ack.id);
        }
        let mut pipe = redis::pipe();
        pipe.atomic();
        for (stream, ids) in &by_stream {
            pipe.cmd("XACK")
                .arg(*stream)
                .arg(GROUP)
                .arg(ids)
                .ignore()
                .cmd("XDEL")
                .arg(*stream)
                .arg(ids)
                .ignore();
        }
        let res = pipe
            .query_async::<()>(&mut conn)
            .await
            .map_err(|e| format!("redis XACK: {e}"));
        groups += 1;
        for ack in group {
            let _ = ack.done.send(res.clone());
        }
    }
    groups
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
    /// Connects, and creates the streams and their consumer groups if
    /// needed.
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
        let target = RedisTarget::parse(url).map_err(|e| backend("url", e))?;
        Self::connect_target(target, cfg, clock).await
    }

    /// Like [`RedisQueue::connect_with_clock`], to a target already read
    /// (with its TLS settings, see [`RedisTarget::from_config`]).
    pub async fn connect_target(
        target: RedisTarget,
        cfg: RedisQueueConfig,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, QueueError> {
        validate(&cfg)?;
        let conn = target
            .connect(COMMAND_TIMEOUTS)
            .await
            .map_err(|e| backend("connect", e))?;
        let q = Self {
            target,
            conn,
            readers: Mutex::new(Vec::new()),
            keys: Keys::new(&cfg.prefix),
            cfg,
            clock,
            reclaim: Mutex::new(ReclaimState {
                cursors: ["0-0".to_string(), "0-0".to_string()],
                last: None,
                last_prune: None,
            }),
            recreations: AtomicU64::new(0),
            recreated: watch::Sender::new(0),
            single_turn: AtomicU64::new(0),
            acks: Default::default(),
        };
        q.create_group().await?;
        Ok(q)
    }

    /// Counts the times a consumer group was found missing and recreated
    /// (Redis lost its data): jobs queued before are gone from Redis until
    /// the reconciler queues them again.
    pub fn group_recreations(&self) -> watch::Receiver<u64> {
        self.recreated.subscribe()
    }

    /// Sizes of the streams, the pending lists, the delayed set and the
    /// poison stream.
    pub async fn stats(&self) -> Result<QueueStats, QueueError> {
        let (stream, high, pending, delayed, poison): (u64, u64, u64, u64, u64) = STATS
            .key(&self.keys.high)
            .key(&self.keys.stream)
            .key(&self.keys.delayed)
            .key(&self.keys.poison)
            .arg(GROUP)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(|e| backend("stats", e))?;
        // Acked entries are deleted, so the first entry of a stream is its
        // oldest unfinished one; its id starts with its unix milliseconds.
        let mut oldest_ms: Option<u64> = None;
        for key in [&self.keys.high, &self.keys.stream] {
            let first: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
                .arg(key)
                .arg("-")
                .arg("+")
                .arg("COUNT")
                .arg(1)
                .query_async(&mut self.conn.clone())
                .await
                .map_err(|e| backend("XRANGE", e))?;
            if let Some(ms) = first
                .ids
                .first()
                .and_then(|e| e.id.split('-').next())
                .and_then(|ms| ms.parse::<u64>().ok())
            {
                oldest_ms = Some(oldest_ms.map_or(ms, |o| o.min(ms)));
            }
        }
        let now_ms = self.clock.now().timestamp_millis().max(0) as u64;
        Ok(QueueStats {
            stream,
            high,
            pending,
            delayed,
            poison,
            oldest_age: oldest_ms.map(|ms| Duration::from_millis(now_ms.saturating_sub(ms))),
        })
    }

    /// `XGROUP CREATE … 0 MKSTREAM` on both streams, ignoring BUSYGROUP
    /// (it exists). Whether a group was created.
    async fn create_group(&self) -> Result<bool, QueueError> {
        let mut created = false;
        for stream in [&self.keys.high, &self.keys.stream] {
            let res: Result<(), RedisError> = redis::cmd("XGROUP")
                .arg("CREATE")
                .arg(stream)
                .arg(GROUP)
                .arg("0")
                .arg("MKSTREAM")
                .query_async(&mut self.conn.clone())
                .await;
            match res {
                Ok(()) => created = true,
                Err(e) if e.code() == Some("BUSYGROUP") => {}
                Err(e) => return Err(backend("XGROUP CREATE", e)),
            }
        }
        Ok(created)
    }

    /// After a NOGROUP: recreate the group, and tell whoever listens.
    async fn recreate_group(&self) -> Result<(), QueueError> {
        if self.create_group().await? {
            let n = self.recreations.fetch_add(1, Ordering::Relaxed) + 1;
            self.recreated.send_replace(n);
            warn!(
                stream = %self.keys.stream,
                high = %self.keys.high,
                "a consumer group of the queue was missing (Redis lost its data?); recreated it; jobs queued before are only in the database now"
            );
        }
        Ok(())
    }

    /// Runs `TAKE`: moves due delayed jobs into their streams, then reads
    /// up to `want` new entries, `quota` of them reserved for high-priority
    /// ones (see [`split`]). Returns the leases, high-priority first, and
    /// the next due time (unix ms) of the delayed jobs left.
    async fn take_due(
        &self,
        want: usize,
        quota: usize,
    ) -> Result<(Vec<Lease>, Option<i64>), QueueError> {
        let mut recreated = false;
        loop {
            let (next, high, normal, nogroup): (Option<i64>, Vec<Entry>, Vec<Entry>, bool) = TAKE
                .key(&self.keys.delayed)
                .key(&self.keys.high)
                .key(&self.keys.stream)
                .key(&self.keys.poison)
                .arg(self.clock.now().timestamp_millis())
                .arg(MOVE_BATCH)
                .arg(POISON_MAXLEN)
                .arg(GROUP)
                .arg(&self.cfg.consumer)
                .arg(want)
                .arg(quota)
                .invoke_async(&mut self.conn.clone())
                .await
                .map_err(|e| backend("taking due jobs", e))?;
            if nogroup {
                // A stream or its group is gone; the other stream was still
                // read. With nothing read, try once more with both.
                self.recreate_group().await?;
                if high.is_empty() && normal.is_empty() && !recreated {
                    recreated = true;
                    continue;
                }
            }
            let mut out = Vec::with_capacity(high.len() + normal.len());
            for (p, entries) in [(Priority::High, high), (Priority::Normal, normal)] {
                for (id, fields) in entries {
                    match decode(fields_of(&fields)) {
                        Some(job) => out.push(Lease {
                            job,
                            receipt: receipt(p, &id),
                            deliveries: 1,
                        }),
                        None => self.park_malformed(self.keys.stream_for(p), &id).await?,
                    }
                }
            }
            return Ok((out, next));
        }
    }

    /// Reclaims up to `max` entries idle past the visibility timeout, if
    /// the last look was long enough ago.
    async fn reclaim_if_due(&self, max: usize) -> Result<Vec<Lease>, QueueError> {
        let every = (self.cfg.visibility_timeout / 10)
            .clamp(Duration::from_millis(10), Duration::from_secs(5));
        let (cursors, prune) = {
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
            (s.cursors.clone(), prune)
        };
        if prune {
            let idle = (self.cfg.visibility_timeout * 10).max(Duration::from_secs(3600));
            if let Err(e) = self.prune_consumers(idle).await {
                warn!(error = %e, "pruning consumers that are gone failed");
            }
        }
        let (high_cursor, normal_cursor, claimed, parked, nogroup): (
            String,
            String,
            Vec<Claimed>,
            Vec<Claimed>,
            bool,
        ) = RECLAIM
            .key(&self.keys.high)
            .key(&self.keys.stream)
            .key(&self.keys.poison)
            .arg(GROUP)
            .arg(&self.cfg.consumer)
            .arg(ms(self.cfg.visibility_timeout))
            .arg(&cursors[0])
            .arg(&cursors[1])
            .arg(max)
            .arg(self.cfg.max_deliveries)
            .arg(POISON_MAXLEN)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(|e| backend("XAUTOCLAIM", e))?;
        self.reclaim.lock().expect("reclaim lock").cursors = [high_cursor, normal_cursor];
        if nogroup {
            // A lost group has no pending entries to reclaim.
            self.recreate_group().await?;
        }
        for (stream, id, fields, n) in parked {
            match decode(fields_of(&fields)) {
                Some(job) => error!(
                    webhook_id = %job.webhook,
                    tenant_id = %job.tenant,
                    kind = job.kind.as_str(),
                    priority = job.priority.as_str(),
                    stream = %stream,
                    entry = %id,
                    deliveries = n,
                    "job parked in the poison stream: handed out too many times without an ack"
                ),
                None => error!(
                    stream = %stream,
                    entry = %id,
                    deliveries = n,
                    "malformed entry parked in the poison stream after too many deliveries"
                ),
            }
        }
        let mut out = Vec::with_capacity(claimed.len());
        for (stream, id, fields, n) in claimed {
            let p = if stream == self.keys.high {
                Priority::High
            } else {
                Priority::Normal
            };
            match decode(fields_of(&fields)) {
                Some(job) => out.push(Lease {
                    job,
                    receipt: receipt(p, &id),
                    deliveries: n,
                }),
                None => self.park_malformed(self.keys.stream_for(p), &id).await?,
            }
        }
        Ok(out)
    }

    /// Removes consumers of the groups idle for longer than `idle` that
    /// hold nothing in that group (each process start adds one; a consumer
    /// holding entries is kept, or its entries could not be reclaimed).
    /// Returns how many were removed, a consumer counting once per stream.
    async fn prune_consumers(&self, idle: Duration) -> Result<u64, QueueError> {
        PRUNE
            .key(&self.keys.high)
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
            .ack_and_delete(stream, id)
            .query_async::<()>(&mut self.conn.clone())
            .await
            .map_err(|e| backend("parking an entry", e))
    }

    /// A connection for a blocking read: an idle one from the pool, or a new
    /// one.
    async fn reader(&self) -> Result<Conn, QueueError> {
        if let Some(c) = self.readers.lock().expect("reader pool").pop() {
            return Ok(c);
        }
        self.target
            .dedicated(Timeouts {
                connect: CONNECT_TIMEOUT,
                response: self.cfg.block + BLOCK_MARGIN,
            })
            .await
            .map_err(|e| backend("connecting a reader", e))
    }

    fn put_back(&self, c: Conn) {
        let mut pool = self.readers.lock().expect("reader pool");
        if pool.len() < READER_POOL {
            pool.push(c);
        }
    }

    /// `XREADGROUP … COUNT want BLOCK block STREAMS high normal > >`: waits
    /// for an entry in either stream. Should entries come from both and
    /// number more than `want`, the excess beyond the weighted split is
    /// given back.
    async fn read_blocking(
        &self,
        want: usize,
        quota: usize,
        block: Duration,
    ) -> Result<Vec<Lease>, QueueError> {
        // Taken out of the pool for the read: if this future is dropped
        // mid-read, the connection goes with it instead of coming back with
        // a read still blocking on it.
        let mut conn = self.reader().await?;
        // BLOCK 0 would mean "forever".
        let opts = StreamReadOptions::default()
            .group(GROUP, &self.cfg.consumer)
            .count(want)
            .block(usize::try_from(ms(block).max(1)).unwrap_or(usize::MAX));
        let read = |conn: &mut Conn| {
            let cmd = redis::cmd("XREADGROUP")
                .arg(&opts)
                .arg("STREAMS")
                .arg(&self.keys.high)
                .arg(&self.keys.stream)
                .arg(">")
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
        let (mut high, mut normal) = (Vec::new(), Vec::new());
        for key in reply.map(|r| r.keys).unwrap_or_default() {
            let p = if key.key == self.keys.high {
                Priority::High
            } else {
                Priority::Normal
            };
            for entry in key.ids {
                match decode_entry(&entry) {
                    Some(job) => {
                        let lease = Lease {
                            job,
                            receipt: receipt(p, &entry.id),
                            deliveries: 1,
                        };
                        match p {
                            Priority::High => high.push(lease),
                            Priority::Normal => normal.push(lease),
                        }
                    }
                    None => {
                        self.park_malformed(self.keys.stream_for(p), &entry.id)
                            .await?
                    }
                }
            }
        }
        if high.len() + normal.len() > want {
            let (h, n) = split(want, quota, high.len(), normal.len());
            let excess: Vec<Lease> = high
                .split_off(h)
                .into_iter()
                .chain(normal.split_off(n))
                .collect();
            self.give_back(&excess).await?;
        }
        high.append(&mut normal);
        Ok(high)
    }

    /// Puts taken entries back, as new entries at the end of their streams,
    /// in one `MULTI`. Only a blocking read that was served from both
    /// streams at once needs it (see the module docs).
    async fn give_back(&self, leases: &[Lease]) -> Result<(), QueueError> {
        let mut pipe = redis::pipe();
        pipe.atomic();
        for lease in leases {
            let (stream, id) = self.locate(&lease.receipt)?;
            pipe.cmd("XADD")
                .arg(stream)
                .arg("*")
                .arg(&encode(&lease.job)[..])
                .ignore()
                .ack_and_delete(stream, id);
        }
        pipe.query_async::<()>(&mut self.conn.clone())
            .await
            .map_err(|e| backend("giving entries back", e))
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

/// A new entry: id, flat field/value list.
type Entry = (String, Vec<String>);

/// A reclaimed entry: stream name, id, flat field/value list, delivery
/// count.
type Claimed = (String, String, Vec<String>, u32);

/// A flat field/value list as pairs.
fn fields_of(flat: &[String]) -> impl Iterator<Item = (&str, &str)> {
    flat.chunks_exact(2).map(|p| (p[0].as_str(), p[1].as_str()))
}

/// The stream fields of a job, in order; also the delayed set's member (as
/// a JSON array), which is why it must be deterministic. `TAKE` reads the
/// `priority` field of a member to pick its stream.
fn encode(job: &Job) -> [&str; 10] {
    [
        "kind",
        job.kind.as_str(),
        "priority",
        job.priority.as_str(),
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

/// A job from its fields; `None` when one it cannot do without is missing.
/// The priority is not one of those: an entry without it (written before
/// there were priorities), or with a value this version does not know, is
/// normal work.
fn decode<'a>(fields: impl Iterator<Item = (&'a str, &'a str)>) -> Option<Job> {
    let (mut kind, mut tenant, mut webhook) = (None, None, None);
    let mut priority = Priority::Normal;
    for (k, v) in fields {
        match k {
            "kind" => {
                kind = match v {
                    "verify" => Some(JobKind::Verify),
                    "deliver" => Some(JobKind::Deliver),
                    "check" => Some(JobKind::Check),
                    _ => None,
                }
            }
            "priority" => priority = Priority::parse(v).unwrap_or_default(),
            "tenant" if !v.is_empty() => tenant = Some(TenantId::from_trusted(v.to_string())),
            "webhook" if !v.is_empty() => webhook = Some(WebhookId::from_trusted(v.to_string())),
            _ => {}
        }
    }
    Some(Job {
        kind: kind?,
        priority,
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
                .arg(self.keys.stream_for(job.priority))
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
        let turn = self.single_turn.load(Ordering::Relaxed);
        let deadline = Instant::now() + wait;
        let leases = loop {
            let mut leases = self.reclaim_if_due(max).await?;
            let want = max - leases.len();
            if want == 0 {
                break leases;
            }
            let quota = self.cfg.high_share.high_quota(want, turn);
            let (taken, next_due) = self.take_due(want, quota).await?;
            leases.extend(taken);
            let remaining = deadline.saturating_duration_since(Instant::now());
            if !leases.is_empty() || remaining.is_zero() {
                break leases;
            }
            let mut block = remaining.min(self.cfg.block);
            if let Some(due) = next_due {
                let until = u64::try_from(due - self.clock.now().timestamp_millis()).unwrap_or(0);
                block = block.min(Duration::from_millis(until).max(MIN_BLOCK));
            }
            let leases = self.read_blocking(want, quota, block).await?;
            if !leases.is_empty() || Instant::now() >= deadline {
                break leases;
            }
        };
        if max == 1 && !leases.is_empty() {
            self.single_turn.fetch_add(1, Ordering::Relaxed);
        }
        Ok(leases)
    }

    async fn ack(&self, lease: &Lease) -> Result<(), QueueError> {
        let (stream, id) = self.locate(&lease.receipt)?;
        // Written with the other acks waiting (`write_acks`). XACK answers
        // 0, not NOGROUP, when the group is gone: after a data loss there
        // is nothing to ack, and nothing fails.
        let (done, written) = oneshot::channel();
        let ack = PendingAck {
            stream: stream.to_string(),
            id: id.to_string(),
            done,
        };
        let sent = {
            let mut writer = self.acks.lock().expect("ack writer lock");
            let writer = match writer.as_ref() {
                Some(tx) if !tx.is_closed() => tx,
                // First ack, or the writer stopped (its runtime went away):
                // start one.
                _ => writer.insert({
                    let (tx, rx) = mpsc::unbounded_channel();
                    tokio::spawn(write_acks(self.conn.clone(), rx));
                    tx
                }),
            };
            writer.send(ack).is_ok()
        };
        match written.await {
            Ok(res) if sent => res.map_err(QueueError::Backend),
            // The writer went away with this ack: write it alone (acking
            // twice is harmless).
            _ => redis::pipe()
                .atomic()
                .ack_and_delete(stream, id)
                .query_async::<()>(&mut self.conn.clone())
                .await
                .map_err(|e| backend("XACK", e)),
        }
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
            .ack_and_delete(stream, id)
            .query_async::<()>(&mut self.conn.clone())
            .await
            .map_err(|e| backend("retry_later", e))
    }

    async fn stats(&self) -> Result<QueueStats, QueueError> {
        RedisQueue::stats(self).await
    }

    async fn ping(&self) -> Result<(), QueueError> {
        redis::cmd("PING")
            .query_async::<()>(&mut self.conn.clone())
            .await
            .map_err(|e| backend("PING", e))
    }
}

/// KEYS: delayed, high stream, normal stream, poison. ARGV: now (unix ms),
/// move batch, poison maxlen, group, consumer, want, high quota.
///
/// First moves due members to the stream of their `priority` field (a
/// member that does not decode goes to the poison stream). Then reads new
/// entries as [`split`] says: high up to the quota, normal up to what that
/// leaves, high again up to what is left. A stream without the group
/// (`NOGROUP`) reads as empty and sets the flag, so that entries read from
/// the other are not lost with an error. Returns {next due score or nil,
/// high entries, normal entries, nogroup}, each entry {id, {field, value,
/// …}}.
static TAKE: std::sync::LazyLock<Script> = std::sync::LazyLock::new(|| {
    Script::new(
        r#"
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
for _, member in ipairs(due) do
  local ok, fields = pcall(cjson.decode, member)
  if ok and type(fields) == 'table' and #fields > 0 and #fields % 2 == 0 then
    local stream = KEYS[3]
    for i = 1, #fields, 2 do
      if fields[i] == 'priority' and fields[i + 1] == 'high' then stream = KEYS[2] end
    end
    redis.call('XADD', stream, '*', unpack(fields))
  else
    redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[3], '*', 'delayed', member)
  end
  redis.call('ZREM', KEYS[1], member)
end
local nxt = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
local score = false
if nxt[2] then score = tonumber(nxt[2]) end

local nogroup = 0
local function read(stream, count, into)
  if count <= 0 then return 0 end
  local r = redis.pcall('XREADGROUP', 'GROUP', ARGV[4], ARGV[5], 'COUNT', count, 'STREAMS', stream, '>')
  if type(r) == 'table' and r.err then
    if string.sub(r.err, 1, 7) == 'NOGROUP' then
      nogroup = 1
      return 0
    end
    error(r)
  end
  if not r then return 0 end
  for _, e in ipairs(r[1][2]) do into[#into + 1] = e end
  return #r[1][2]
end
local want, quota = tonumber(ARGV[6]), math.min(tonumber(ARGV[7]), tonumber(ARGV[6]))
local high, normal = {}, {}
local h = read(KEYS[2], quota, high)
local n = read(KEYS[3], want - h, normal)
if h == quota then read(KEYS[2], want - h - n, high) end
return {score, high, normal, nogroup}
"#,
    )
});

/// KEYS: high stream, normal stream, poison. ARGV: group, consumer, min
/// idle (ms), high cursor, normal cursor, count, max deliveries, poison
/// maxlen. Claims up to count idle entries, from the high stream first;
/// parks those handed out more than max deliveries times. A stream without
/// the group is skipped and sets the flag. Returns {next high cursor, next
/// normal cursor, claimed, parked, nogroup}, each entry {stream key, id,
/// {field, value, …}, deliveries}.
static RECLAIM: std::sync::LazyLock<Script> = std::sync::LazyLock::new(|| {
    Script::new(
        r#"
local max = tonumber(ARGV[7])
local left = tonumber(ARGV[6])
local cursors = {ARGV[4], ARGV[5]}
local claimed, parked = {}, {}
local nogroup = 0
for i = 1, 2 do
  if left > 0 then
    local r = redis.pcall('XAUTOCLAIM', KEYS[i], ARGV[1], ARGV[2], ARGV[3], cursors[i], 'COUNT', left)
    if r.err then
      if string.sub(r.err, 1, 7) ~= 'NOGROUP' then return redis.error_reply(r.err) end
      nogroup = 1
    else
      cursors[i] = r[1]
      for _, e in ipairs(r[2]) do
        -- Redis 6.2 reports entries deleted meanwhile as nil.
        if e then
          local id, fields = e[1], e[2] or {}
          local p = redis.call('XPENDING', KEYS[i], ARGV[1], id, id, 1)
          local n = 1
          if p[1] then n = p[1][4] end
          if n > max then
            local rec = {'stream', KEYS[i], 'entry', id, 'deliveries', tostring(n)}
            for _, f in ipairs(fields) do rec[#rec + 1] = f end
            redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[8], '*', unpack(rec))
            redis.call('XACK', KEYS[i], ARGV[1], id)
            redis.call('XDEL', KEYS[i], id)
            parked[#parked + 1] = {KEYS[i], id, fields, n}
          else
            claimed[#claimed + 1] = {KEYS[i], id, fields, n}
            left = left - 1
          end
        end
      end
    end
  end
end
return {cursors[1], cursors[2], claimed, parked, nogroup}
"#,
    )
});

/// KEYS: the streams. ARGV: group, min idle (ms), own consumer name.
/// Deletes, from each stream's group, consumers that hold nothing there and
/// were idle that long; returns how many it deleted.
static PRUNE: std::sync::LazyLock<Script> = std::sync::LazyLock::new(|| {
    Script::new(
        r#"
local min_idle = tonumber(ARGV[2])
local n = 0
for _, key in ipairs(KEYS) do
  local list = redis.pcall('XINFO', 'CONSUMERS', key, ARGV[1])
  if not list.err then
    for _, c in ipairs(list) do
      local name, pending, idle
      for i = 1, #c, 2 do
        if c[i] == 'name' then name = c[i + 1]
        elseif c[i] == 'pending' then pending = c[i + 1]
        elseif c[i] == 'idle' then idle = c[i + 1] end
      end
      if name and name ~= ARGV[3] and pending == 0 and idle and idle > min_idle then
        redis.call('XGROUP', 'DELCONSUMER', key, ARGV[1], name)
        n = n + 1
      end
    end
  end
end
return n
"#,
    )
});

/// KEYS: high stream, normal stream, delayed, poison. ARGV: group. Returns
/// {length of both streams, of the high one, pending in both, delayed,
/// poison length}.
static STATS: std::sync::LazyLock<Script> = std::sync::LazyLock::new(|| {
    Script::new(
        r#"
local pending = 0
for i = 1, 2 do
  local p = redis.pcall('XPENDING', KEYS[i], ARGV[1])
  if not p.err then pending = pending + p[1] end
end
local high = redis.call('XLEN', KEYS[1])
return {high + redis.call('XLEN', KEYS[2]), high, pending, redis.call('ZCARD', KEYS[3]), redis.call('XLEN', KEYS[4])}
"#,
    )
});

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        clock::ManualClock,
        pipeline::{
            queue::suite::{Backend, Counts, queue_suite},
            test_cluster::TestCluster,
        },
    };

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

    /// A fresh key prefix on the configured Redis, or on the shared test
    /// cluster; on the former, its keys are deleted when this is dropped
    /// (even when the test panics). The cluster is private and goes away.
    struct Space {
        url: String,
        prefix: String,
        cluster: Option<Arc<TestCluster>>,
    }

    impl Space {
        fn new(cluster: bool) -> Option<Self> {
            let (url, cluster) = if cluster {
                let c = TestCluster::get()?;
                (c.url(), Some(c))
            } else {
                (redis_url()?, None)
            };
            Some(Self {
                url,
                prefix: format!("uploadhook-test-{:016x}", rand::random::<u64>()),
                cluster,
            })
        }

        fn cfg(&self, consumer: &str) -> RedisQueueConfig {
            RedisQueueConfig {
                prefix: self.prefix.clone(),
                consumer: consumer.to_string(),
                visibility_timeout: Duration::from_secs(60),
                max_deliveries: 10,
                block: Duration::from_millis(200),
                high_share: HighShare::DEFAULT,
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

        /// A connection of the same kind as the queue's, for looking behind
        /// its back.
        async fn raw(&self) -> Conn {
            RedisTarget::parse(&self.url)
                .unwrap()
                .connect(COMMAND_TIMEOUTS)
                .await
                .unwrap()
        }
    }

    impl Drop for Space {
        fn drop(&mut self) {
            if self.cluster.is_some() {
                return;
            }
            let k = self.keys();
            if let Ok(mut c) = redis::Client::open(self.url.as_str())
                .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(1)))
            {
                let _: Result<(), _> = redis::cmd("DEL")
                    .arg(&k.stream)
                    .arg(&k.high)
                    .arg(&k.delayed)
                    .arg(&k.poison)
                    .query(&mut c);
            }
        }
    }

    /// The Redis queue under the shared suite, on one Redis or on the test
    /// cluster: each consumer is a connection of its own with a consumer
    /// name of its own, as another process would be, on the test's key
    /// prefix.
    struct Redis<const CLUSTER: bool> {
        space: Space,
        consumers: Mutex<Vec<Arc<RedisQueue>>>,
    }

    #[async_trait]
    impl<const CLUSTER: bool> Backend for Redis<CLUSTER> {
        async fn setup() -> Option<Self> {
            Some(Self {
                space: Space::new(CLUSTER)?,
                consumers: Mutex::new(Vec::new()),
            })
        }

        async fn consumer(&self, clock: Arc<dyn Clock>) -> Arc<dyn Queue> {
            let name = format!("c{}", self.consumers.lock().expect("lock").len());
            let q = Arc::new(
                RedisQueue::connect_with_clock(&self.space.url, self.space.cfg(&name), clock)
                    .await
                    .unwrap(),
            );
            self.consumers.lock().expect("lock").push(q.clone());
            q
        }

        async fn counts(&self) -> Counts {
            let q = self.consumers.lock().expect("lock")[0].clone();
            let st = q.stats().await.unwrap();
            let n = |v: u64| usize::try_from(v).unwrap();
            Counts {
                ready: n(st.stream - st.pending),
                delayed: n(st.delayed),
                taken: n(st.pending),
            }
        }
    }

    /// The shared suite and the Redis tests below, once on the Redis of
    /// `UPLOADHOOK_TEST_REDIS_URL` (`single::…`) and once on a private
    /// three-node Redis Cluster (`cluster::…`).
    macro_rules! on_each_redis {
        ($($name:ident),* $(,)?) => {
            mod single {
                use super::*;
                queue_suite!(Redis<false>);
                $(
                    #[tokio::test]
                    async fn $name() {
                        if let Some(s) = Space::new(false) {
                            super::$name(s).await;
                        }
                    }
                )*
            }
            mod cluster {
                use super::*;
                queue_suite!(Redis<true>);
                $(
                    #[tokio::test]
                    async fn $name() {
                        if let Some(s) = Space::new(true) {
                            super::$name(s).await;
                        }
                    }
                )*
            }
        };
    }

    on_each_redis!(
        acks_waiting_together_are_written_as_one_group,
        each_priority_has_its_stream_named_by_its_receipts,
        entries_and_members_without_a_priority_are_normal,
        a_read_served_from_both_streams_gives_the_excess_back,
        a_blocked_taker_wakes_when_a_delayed_job_falls_due,
        scheduling_the_same_job_twice_keeps_the_earlier_time,
        an_entry_of_a_dead_consumer_is_reclaimed_after_the_visibility_timeout,
        an_entry_handed_out_too_often_is_parked,
        a_lost_stream_and_group_are_recreated,
        malformed_entries_are_parked_not_returned,
        consumers_that_are_gone_and_hold_nothing_are_pruned,
        a_cancelled_take_swallows_nothing,
    );

    fn job() -> Job {
        job_of(Priority::Normal)
    }

    async fn acks_waiting_together_are_written_as_one_group(s: Space) {
        let q = s.queue("c0").await;
        for i in 0..300 {
            let p = if i % 3 == 0 {
                Priority::High
            } else {
                Priority::Normal
            };
            q.enqueue(job_of(p), None).await.unwrap();
        }
        let mut leases = Vec::new();
        while leases.len() < 300 {
            let taken = q
                .take(300 - leases.len(), Duration::from_secs(1))
                .await
                .unwrap();
            assert!(!taken.is_empty());
            leases.extend(taken);
        }
        // 300 acks waiting when the writer starts: one group.
        let (tx, rx) = mpsc::unbounded_channel();
        let mut answers = Vec::new();
        for l in &leases[..290] {
            let (stream, id) = q.locate(&l.receipt).unwrap();
            let (done, answer) = oneshot::channel();
            tx.send(PendingAck {
                stream: stream.to_string(),
                id: id.to_string(),
                done,
            })
            .unwrap();
            answers.push(answer);
        }
        drop(tx);
        assert_eq!(write_acks(s.raw().await, rx).await, 1);
        for answer in answers {
            answer.await.unwrap().unwrap();
        }
        // Through `ack`, one at a time and together.
        q.ack(&leases[290]).await.unwrap();
        let acked = futures_util::future::join_all(leases[291..].iter().map(|l| q.ack(l))).await;
        assert!(acked.iter().all(Result::is_ok), "{acked:?}");
        // Acked and deleted from both streams.
        let st = q.stats().await.unwrap();
        assert_eq!((st.stream, st.pending), (0, 0), "{st:?}");
    }

    fn job_of(priority: Priority) -> Job {
        Job {
            kind: JobKind::Deliver,
            priority,
            tenant: TenantId::generate(),
            webhook: WebhookId::generate(),
        }
    }

    fn stats(stream: u64, high: u64, pending: u64, delayed: u64, poison: u64) -> QueueStats {
        QueueStats {
            stream,
            high,
            pending,
            delayed,
            poison,
            oldest_age: None,
        }
    }

    /// The counts, without the age (which depends on the time).
    fn counts(s: QueueStats) -> QueueStats {
        QueueStats {
            oldest_age: None,
            ..s
        }
    }

    async fn each_priority_has_its_stream_named_by_its_receipts(s: Space) {
        let q = s.queue("a").await;
        let (normal, high) = (job(), job_of(Priority::High));
        q.enqueue(normal.clone(), None).await.unwrap();
        q.enqueue(high.clone(), None).await.unwrap();
        assert_eq!(counts(q.stats().await.unwrap()), stats(2, 1, 0, 0, 0));
        assert!(q.stats().await.unwrap().oldest_age.is_some());
        let got = q.take(10, Duration::ZERO).await.unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].job, high);
        assert!(
            got[0].receipt.starts_with("stream:high/"),
            "{}",
            got[0].receipt
        );
        assert_eq!(got[1].job, normal);
        assert!(got[1].receipt.starts_with("stream/"), "{}", got[1].receipt);
        let entries: Vec<(String, Vec<String>)> = redis::cmd("XRANGE")
            .arg(&s.keys().high)
            .arg("-")
            .arg("+")
            .query_async(&mut s.raw().await)
            .await
            .unwrap();
        assert_eq!(entries.len(), 1);
        assert_eq!(got[0].receipt, format!("stream:high/{}", entries[0].0));
        assert!(entries[0].1.windows(2).any(|p| p == ["priority", "high"]));
        assert_eq!(counts(q.stats().await.unwrap()), stats(2, 1, 2, 0, 0));
        for l in &got {
            q.ack(l).await.unwrap();
        }
        assert_eq!(counts(q.stats().await.unwrap()), stats(0, 0, 0, 0, 0));
        assert_eq!(q.stats().await.unwrap().oldest_age, None);
        assert!(
            q.ack(&Lease {
                receipt: "elsewhere/1-0".into(),
                ..got[0].clone()
            })
            .await
            .is_err()
        );
    }

    async fn entries_and_members_without_a_priority_are_normal(s: Space) {
        let q = s.queue("a").await;
        let (old, old_delayed) = (job(), job());
        let mut raw = s.raw().await;
        // As written before there were priorities.
        let _: () = redis::cmd("XADD")
            .arg(&s.keys().stream)
            .arg("*")
            .arg("kind")
            .arg("deliver")
            .arg("tenant")
            .arg(old.tenant.as_str())
            .arg("webhook")
            .arg(old.webhook.as_str())
            .arg("traceparent")
            .arg("")
            .query_async(&mut raw)
            .await
            .unwrap();
        let member = serde_json::to_string(&[
            "kind",
            "deliver",
            "tenant",
            old_delayed.tenant.as_str(),
            "webhook",
            old_delayed.webhook.as_str(),
            "traceparent",
            "",
        ])
        .unwrap();
        let _: () = redis::cmd("ZADD")
            .arg(&s.keys().delayed)
            .arg(0)
            .arg(member)
            .query_async(&mut raw)
            .await
            .unwrap();
        let got = q.take(10, Duration::ZERO).await.unwrap();
        assert_eq!(
            got.iter().map(|l| l.job.clone()).collect::<Vec<_>>(),
            [old, old_delayed]
        );
        assert!(got.iter().all(|l| l.receipt.starts_with("stream/")));
        assert_eq!(counts(q.stats().await.unwrap()), stats(2, 0, 2, 0, 0));
    }

    async fn a_read_served_from_both_streams_gives_the_excess_back(s: Space) {
        let q = s.queue("a").await;
        let (normal, high) = (job(), job_of(Priority::High));
        q.enqueue(normal.clone(), None).await.unwrap();
        q.enqueue(high.clone(), None).await.unwrap();
        // As when entries arrive in both streams between the script and the
        // blocking read: it is answered from both at once.
        let got = q
            .read_blocking(1, 1, Duration::from_millis(10))
            .await
            .unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].job, high);
        assert_eq!(counts(q.stats().await.unwrap()), stats(2, 1, 1, 0, 0));
        let back = q.take(1, Duration::ZERO).await.unwrap();
        assert_eq!(back.len(), 1);
        assert_eq!(back[0].job, normal);
        assert_eq!(back[0].deliveries, 1);
        // With room for both, nothing goes back.
        let (n2, h2) = (job(), job_of(Priority::High));
        q.enqueue(n2.clone(), None).await.unwrap();
        q.enqueue(h2.clone(), None).await.unwrap();
        let got = q
            .read_blocking(2, 1, Duration::from_millis(10))
            .await
            .unwrap();
        assert_eq!(
            got.iter().map(|l| l.job.clone()).collect::<Vec<_>>(),
            [h2, n2]
        );
        assert_eq!(counts(q.stats().await.unwrap()), stats(4, 2, 4, 0, 0));
    }

    async fn a_blocked_taker_wakes_when_a_delayed_job_falls_due(s: Space) {
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

    async fn scheduling_the_same_job_twice_keeps_the_earlier_time(s: Space) {
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

    async fn an_entry_of_a_dead_consumer_is_reclaimed_after_the_visibility_timeout(s: Space) {
        let mut cfg = s.cfg("dies");
        // Long enough that the second consumer connects and looks within
        // it, however loaded the machine.
        cfg.visibility_timeout = Duration::from_secs(1);
        let dies = RedisQueue::connect(&s.url, cfg.clone()).await.unwrap();
        let (normal, high) = (job(), job_of(Priority::High));
        dies.enqueue(normal.clone(), None).await.unwrap();
        dies.enqueue(high.clone(), None).await.unwrap();
        let taken = dies.take(2, Duration::ZERO).await.unwrap();
        assert_eq!(taken.len(), 2);
        drop(dies);

        cfg.consumer = "lives".to_string();
        let lives = RedisQueue::connect(&s.url, cfg).await.unwrap();
        assert!(
            lives.take(2, Duration::ZERO).await.unwrap().is_empty(),
            "not before the visibility timeout"
        );
        tokio::time::sleep(Duration::from_millis(1050)).await;
        // From both streams, high priority first.
        let got = lives.take(2, Duration::from_millis(100)).await.unwrap();
        assert_eq!(
            got.iter().map(|l| l.job.clone()).collect::<Vec<_>>(),
            [high, normal]
        );
        for (got, taken) in got.iter().zip(&taken) {
            assert_eq!(got.receipt, taken.receipt);
            assert_eq!(got.deliveries, 2);
            lives.ack(got).await.unwrap();
            // The dead consumer's late ack is harmless.
            lives.ack(taken).await.unwrap();
        }
        assert_eq!(counts(lives.stats().await.unwrap()), stats(0, 0, 0, 0, 0));
    }

    async fn an_entry_handed_out_too_often_is_parked(s: Space) {
        let mut cfg = s.cfg("a");
        cfg.visibility_timeout = Duration::from_millis(100);
        cfg.max_deliveries = 2;
        let q = RedisQueue::connect(&s.url, cfg).await.unwrap();
        let j = job_of(Priority::High);
        q.enqueue(j.clone(), None).await.unwrap();
        let first = q.take(1, Duration::ZERO).await.unwrap();
        assert_eq!(first[0].deliveries, 1);
        tokio::time::sleep(Duration::from_millis(120)).await;
        let second = q.take(1, Duration::ZERO).await.unwrap();
        assert_eq!(second[0].deliveries, 2);
        tokio::time::sleep(Duration::from_millis(120)).await;
        assert!(q.take(1, Duration::ZERO).await.unwrap().is_empty());
        assert_eq!(counts(q.stats().await.unwrap()), stats(0, 0, 0, 0, 1));
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
        assert_eq!(get("priority").as_deref(), Some("high"));
        assert_eq!(get("deliveries").as_deref(), Some("3"));
        assert_eq!(get("stream"), Some(s.keys().high));
        assert_eq!(
            get("entry"),
            Some(first[0].receipt["stream:high/".len()..].to_string())
        );
    }

    async fn a_lost_stream_and_group_are_recreated(s: Space) {
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
        assert_eq!(*recreations.borrow_and_update(), 2);
        // The high-priority stream alone is lost: the normal one is still
        // read, and the group of the other recreated.
        let _: () = redis::cmd("DEL")
            .arg(&s.keys().high)
            .query_async(&mut s.raw().await)
            .await
            .unwrap();
        let j = job();
        q.enqueue(j.clone(), None).await.unwrap();
        let got = q.take(10, Duration::from_millis(50)).await.unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].job, j);
        assert_eq!(*recreations.borrow_and_update(), 3);
        let h = job_of(Priority::High);
        q.enqueue(h.clone(), None).await.unwrap();
        let got = q.take(10, Duration::from_millis(50)).await.unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].job, h);
    }

    async fn malformed_entries_are_parked_not_returned(s: Space) {
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
        let _: () = redis::cmd("XADD")
            .arg(&s.keys().high)
            .arg("*")
            .arg("priority")
            .arg("high")
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
        assert_eq!(counts(q.stats().await.unwrap()), stats(1, 0, 1, 0, 3));
    }

    async fn consumers_that_are_gone_and_hold_nothing_are_pruned(s: Space) {
        let gone = s.queue("gone").await;
        let holds = s.queue("holds").await;
        let me = s.queue("me").await;
        // A consumer joins a stream's group when it first gets an entry
        // from it.
        gone.enqueue(job_of(Priority::High), None).await.unwrap();
        gone.enqueue(job(), None).await.unwrap();
        for l in gone.take(2, Duration::ZERO).await.unwrap() {
            gone.ack(&l).await.unwrap();
        }
        gone.enqueue(job_of(Priority::High), None).await.unwrap();
        gone.enqueue(job(), None).await.unwrap();
        let held = holds.take(2, Duration::ZERO).await.unwrap();
        assert_eq!(held.len(), 2);
        holds.ack(&held[1]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
        // "gone" goes from both groups; "holds" only from the normal
        // stream's, where it holds nothing.
        assert_eq!(me.prune_consumers(Duration::ZERO).await.unwrap(), 3);
        let names = |stream: String| {
            let s = &s;
            async move {
                let consumers: Vec<std::collections::HashMap<String, Value>> = redis::cmd("XINFO")
                    .arg("CONSUMERS")
                    .arg(stream)
                    .arg(GROUP)
                    .query_async(&mut s.raw().await)
                    .await
                    .unwrap();
                consumers
                    .iter()
                    .filter_map(|c| redis::from_redis_value_ref(c.get("name")?).ok())
                    .collect::<Vec<String>>()
            }
        };
        assert!(names(s.keys().stream).await.is_empty());
        assert_eq!(names(s.keys().high).await, ["holds"]);
    }

    async fn a_cancelled_take_swallows_nothing(s: Space) {
        // A read left blocking on a kept connection would stay blocked for
        // the whole `block`, far past the waits below, and take the entry.
        let mut cfg = s.cfg("cancelled");
        cfg.block = Duration::from_secs(30);
        let a = Arc::new(RedisQueue::connect(&s.url, cfg).await.unwrap());
        let b = s.queue("b").await;
        let a2 = a.clone();
        let taker = tokio::spawn(async move { a2.take(1, Duration::from_secs(30)).await });
        // Let it reach its blocking read, then cancel it as the worker loop
        // does at shutdown.
        tokio::time::sleep(Duration::from_millis(300)).await;
        taker.abort();
        let _ = taker.await;
        // The dropped connection closes in the background and Redis frees
        // its blocked read when it reads the close: give a loaded machine
        // time for both (a read it still held would take the entry).
        tokio::time::sleep(Duration::from_secs(1)).await;
        b.enqueue(job(), None).await.unwrap();
        let got = b.take(1, Duration::from_millis(500)).await.unwrap();
        assert_eq!(got.len(), 1, "the cancelled read took the entry");
    }

    #[test]
    fn keys_share_one_hash_tag() {
        let k = Keys::new("uploadhook");
        assert_eq!(k.stream, "{uploadhook:jobs}:stream");
        assert_eq!(k.high, "{uploadhook:jobs}:stream:high");
        assert_eq!(k.delayed, "{uploadhook:jobs}:delayed");
        assert_eq!(k.poison, "{uploadhook:jobs}:poison");
        assert_eq!(k.stream_of("stream"), Some(k.stream.as_str()));
        assert_eq!(k.stream_of("stream:high"), Some(k.high.as_str()));
        assert_eq!(k.stream_of("other"), None);
        assert_eq!(k.stream_for(Priority::High), k.high);
        assert_eq!(receipt(Priority::High, "1-0"), "stream:high/1-0");
        assert_eq!(receipt(Priority::Normal, "1-0"), "stream/1-0");
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

    /// `rediss+cluster://`: the queue on a Redis Cluster that speaks TLS
    /// only, its nodes' certificate from a private CA named by
    /// `queue.redis_ca_file`; a blocking read's own connection and the
    /// reconciler's lease go over TLS too. Without that CA (the system's
    /// roots) the nodes are refused.
    #[tokio::test]
    async fn works_on_a_tls_cluster() {
        let Some(cluster) = TestCluster::get_tls() else {
            return;
        };
        let ca = cluster
            .ca_file()
            .expect("a TLS cluster")
            .display()
            .to_string();
        let queue_cfg = crate::config::Config::from_toml(&format!(
            "[queue]\nbackend = \"redis\"\nredis_url = \"{}\"\nredis_ca_file = \"{ca}\"\n",
            cluster.url()
        ))
        .unwrap()
        .queue;
        let target = RedisTarget::from_config(&queue_cfg).unwrap();
        assert!(target.is_cluster());
        let cfg = RedisQueueConfig {
            prefix: format!("uploadhook-test-{:016x}", rand::random::<u64>()),
            block: Duration::from_millis(200),
            ..RedisQueueConfig::default()
        };
        let q = RedisQueue::connect_target(target.clone(), cfg, Arc::new(SystemClock))
            .await
            .unwrap();
        let jobs = [job(), job_of(Priority::High), job()];
        for j in &jobs {
            q.enqueue(j.clone(), None).await.unwrap();
        }
        assert_eq!(counts(q.stats().await.unwrap()), stats(3, 1, 0, 0, 0));
        // Waiting: a blocking read on a connection of its own.
        let mut got = Vec::new();
        while got.len() < jobs.len() {
            let leases = q.take(10, Duration::from_secs(1)).await.unwrap();
            assert!(!leases.is_empty(), "no job came back");
            got.extend(leases);
        }
        assert_eq!(got[0].job, jobs[1], "high priority first");
        for l in &got {
            q.ack(l).await.unwrap();
        }
        assert_eq!(counts(q.stats().await.unwrap()), stats(0, 0, 0, 0, 0));
        q.ping().await.unwrap();
        let leader = super::super::leader::RedisLeader::connect(&target, &q.cfg.prefix, "tls")
            .await
            .unwrap();
        assert!(super::super::leader::Leader::try_lead(&leader, Duration::from_secs(1)).await);
        // The system's roots do not know the test's CA.
        let e = RedisTarget::parse(&cluster.url())
            .unwrap()
            .connect(COMMAND_TIMEOUTS)
            .await
            .err()
            .expect("a certificate from an unknown CA is refused")
            .to_string();
        assert!(e.to_lowercase().contains("certificate"), "{e}");
    }

    #[test]
    fn fields_round_trip() {
        for j in [job(), job_of(Priority::High)] {
            let f = encode(&j);
            assert_eq!(decode(f.chunks_exact(2).map(|p| (p[0], p[1]))), Some(j));
        }
        assert_eq!(decode([("kind", "deliver")].into_iter()), None);
        // Without a priority, or with one this version does not know:
        // normal work.
        let j = job();
        for p in [None, Some("urgent")] {
            let mut f = vec![
                ("kind", "deliver"),
                ("tenant", j.tenant.as_str()),
                ("webhook", j.webhook.as_str()),
            ];
            f.extend(p.map(|p| ("priority", p)));
            assert_eq!(decode(f.into_iter()), Some(j.clone()));
        }
    }

    /// Connections to one Redis and to a cluster send without delay
    /// (`TCP_NODELAY`; redis-rs leaves it off): a multiplexed connection
    /// writes a command while earlier ones await their answers.
    #[tokio::test]
    async fn connections_send_without_delay() {
        for cluster in [false, true] {
            let Some(space) = Space::new(cluster) else {
                continue;
            };
            // One connection: both kinds are made from the same settings.
            let target = RedisTarget::parse(&space.url).unwrap();
            let mut c = target.dedicated(COMMAND_TIMEOUTS).await.unwrap();
            // This connection's own ports, as the server sees them.
            let info: String = redis::cmd("CLIENT")
                .arg("INFO")
                .query_async(&mut c)
                .await
                .unwrap();
            let port_of = |field: &str| -> u16 {
                info.split_whitespace()
                    .find_map(|kv| kv.strip_prefix(field))
                    .and_then(|addr| addr.rsplit(':').next())
                    .and_then(|p| p.parse().ok())
                    .unwrap_or_else(|| panic!("no {field} in CLIENT INFO: {info}"))
            };
            let (ours, server) = (port_of("addr="), port_of("laddr="));
            assert_eq!(
                crate::test_sockets::nodelay_between(ours, server),
                Some(true),
                "cluster: {cluster}"
            );
        }
    }
}
