//! The work queue seam.
//!
//! The database is the source of truth; a queue only says *which* webhook
//! to look at *when*. A job whose webhook has moved on is acked and
//! dropped by the worker, so duplicates are harmless, and every queue can
//! be rebuilt from the database (see `Pipeline::recover`).

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::domain::{TenantId, WebhookId};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobKind {
    /// HEAD the object and compare it with what the client said.
    Verify,
    /// POST the signed webhook.
    Deliver,
    /// AUTO: HEAD the object of a PENDING webhook to see whether it landed.
    Check,
}

impl JobKind {
    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::Verify => "verify",
            JobKind::Deliver => "deliver",
            JobKind::Check => "check",
        }
    }
}

/// Which work is drained first. High-priority work goes first without
/// starving normal work: see [`HighShare`] for the weighting both queues
/// apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Priority {
    #[default]
    Normal,
    High,
}

impl Priority {
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Normal => "normal",
            Priority::High => "high",
        }
    }

    pub fn parse(s: &str) -> Option<Priority> {
        match s {
            "normal" => Some(Priority::Normal),
            "high" => Some(Priority::High),
            _ => None,
        }
    }
}

/// The share of a take that goes to high-priority jobs while both classes
/// wait, in percent: the weight of the weighted take.
///
/// A take of `max` jobs reserves a *quota* for high-priority jobs
/// ([`HighShare::high_quota`]) and the rest for normal ones, and a class that
/// has fewer waiting than its part leaves the rest to the other
/// ([`split`]). So with both classes waiting, high-priority work gets about
/// this share of the throughput and normal work the remainder, never
/// nothing; with one class waiting, it gets the whole take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HighShare(u8);

impl HighShare {
    /// 80 %: four high-priority jobs for each normal one while both wait.
    pub const DEFAULT: HighShare = HighShare(80);

    /// `percent` must be within 1..=99: 0 or 100 would starve one class.
    pub fn new(percent: u8) -> Option<HighShare> {
        (1..=99).contains(&percent).then_some(HighShare(percent))
    }

    pub fn percent(self) -> u8 {
        self.0
    }

    /// How many of a take of `max` jobs are reserved for high-priority
    /// jobs: `max × share` rounded down, but at least 1 and at most
    /// `max − 1`, so that each class gets a place in every take of two or
    /// more.
    ///
    /// A take of one cannot be split, so single takes share it out over
    /// time: `turn` counts the single takes that got a job (each queue keeps
    /// the count), and a single take prefers normal work when
    /// `⌈(turn + 1) × share⌉ = ⌈turn × share⌉`, i.e. at 80 % every 5th one
    /// (turns 4, 9, 14, …), at 50 % every other one.
    pub fn high_quota(self, max: usize, turn: u64) -> usize {
        let pct = u64::from(self.0);
        match max {
            0 => 0,
            1 => {
                // The pattern repeats every 100 turns.
                let t = turn % 100;
                let ceil = |t: u64| (t * pct).div_ceil(100);
                usize::from(ceil(t + 1) > ceil(t))
            }
            _ => (max.saturating_mul(usize::from(self.0)) / 100).clamp(1, max - 1),
        }
    }
}

impl Default for HighShare {
    fn default() -> Self {
        HighShare::DEFAULT
    }
}

/// How many high-priority and normal jobs a take of `max` gets, given the
/// high-priority `quota` and how many of each class wait: normal jobs fill
/// what the high-priority ones leave of their quota, and high-priority
/// jobs fill what normal ones leave after that. Returns `(high, normal)`.
///
/// Both queues follow it: the in-process one directly, the Redis one as
/// three reads in one script (high up to the quota, normal up to the rest,
/// high again up to what is left), which come to the same.
pub fn split(
    max: usize,
    quota: usize,
    high_waiting: usize,
    normal_waiting: usize,
) -> (usize, usize) {
    let normal = normal_waiting.min(max - high_waiting.min(quota).min(max));
    let high = high_waiting.min(max - normal);
    (high, normal)
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Job {
    pub kind: JobKind,
    pub priority: Priority,
    pub tenant: TenantId,
    pub webhook: WebhookId,
}

/// A job taken from the queue, held until acked or put back.
#[derive(Debug, Clone)]
pub struct Lease {
    pub job: Job,
    /// Opaque to the worker; identifies the taken entry to its queue
    /// (a sequence number in memory, a stream entry id in Redis).
    pub receipt: String,
    /// How many times this entry has been handed out, this time included
    /// (more than 1 after a consumer died holding it).
    pub deliveries: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("queue is closed")]
    Closed,
    #[error("queue backend: {0}")]
    Backend(String),
}

#[async_trait]
pub trait Queue: Send + Sync + 'static {
    /// Adds a job, due now (`None`) or at a time.
    async fn enqueue(&self, job: Job, due: Option<DateTime<Utc>>) -> Result<(), QueueError>;

    /// Takes up to `max` due jobs, waiting up to `wait` for the first.
    async fn take(&self, max: usize, wait: Duration) -> Result<Vec<Lease>, QueueError>;

    /// The job is done (its outcome is stored).
    async fn ack(&self, lease: &Lease) -> Result<(), QueueError>;

    /// Acks the lease and schedules the same job again at `due`.
    async fn retry_later(&self, lease: &Lease, due: DateTime<Utc>) -> Result<(), QueueError>;

    /// Whether the backend answers (readiness).
    async fn ping(&self) -> Result<(), QueueError>;

    /// Depth figures for `uploadhook status` and `/metrics`.
    async fn stats(&self) -> Result<super::redis_queue::QueueStats, QueueError>;
}

/// Enqueues a job whose status is already stored, due now. A failure
/// loses nothing: the row says the work is owed, and the reconciler (or
/// the next start, on the in-process queue) puts it back.
pub async fn enqueue_logged(queue: &dyn Queue, job: Job) {
    let id = job.webhook.clone();
    if let Err(e) = queue.enqueue(job, None).await {
        tracing::warn!(error = %e, webhook_id = %id, "enqueue failed; the webhook is recovered from the database");
    }
}

// The suite every implementation runs; declared here rather than in
// `mod.rs` so that it sits next to the trait it tests.
#[cfg(test)]
#[path = "queue_suite.rs"]
pub(crate) mod suite;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_quota_is_the_share_of_the_take_leaving_each_class_one() {
        let s = HighShare::DEFAULT;
        let q: Vec<usize> = [0, 2, 3, 4, 5, 10, 16, 100]
            .iter()
            .map(|&m| s.high_quota(m, 0))
            .collect();
        assert_eq!(q, [0, 1, 2, 3, 4, 8, 12, 80]);
        let low = HighShare::new(10).unwrap();
        assert_eq!(low.high_quota(2, 0), 1);
        assert_eq!(low.high_quota(5, 0), 1, "at least one high");
        assert_eq!(low.high_quota(20, 0), 2);
        let high = HighShare::new(99).unwrap();
        assert_eq!(high.high_quota(10, 0), 9, "at least one normal");
    }

    #[test]
    fn single_takes_prefer_normal_in_proportion() {
        let singles = |pct: u8, n: u64| -> Vec<usize> {
            let s = HighShare::new(pct).unwrap();
            (0..n).map(|t| s.high_quota(1, t)).collect()
        };
        assert_eq!(singles(80, 10), [1, 1, 1, 1, 0, 1, 1, 1, 1, 0]);
        assert_eq!(singles(50, 4), [1, 0, 1, 0]);
        assert_eq!(singles(75, 8), [1, 1, 1, 0, 1, 1, 1, 0]);
        for pct in [1, 33, 80, 99] {
            let normal = singles(pct, 100).iter().filter(|&&q| q == 0).count();
            assert_eq!(normal, 100 - usize::from(pct), "{pct} %");
        }
        // Any count works, however large.
        assert_eq!(HighShare::DEFAULT.high_quota(1, u64::MAX), 1);
    }

    #[test]
    fn a_class_short_of_its_part_leaves_the_rest_to_the_other() {
        // Both plentiful: the quota decides.
        assert_eq!(split(10, 8, 100, 100), (8, 2));
        // Few high: normal fills.
        assert_eq!(split(10, 8, 3, 100), (3, 7));
        // Few normal: high fills.
        assert_eq!(split(10, 8, 100, 1), (9, 1));
        assert_eq!(split(10, 8, 100, 0), (10, 0));
        assert_eq!(split(10, 8, 0, 100), (0, 10));
        // Not enough of either.
        assert_eq!(split(10, 8, 2, 3), (2, 3));
        assert_eq!(split(1, 0, 5, 5), (0, 1));
        assert_eq!(split(1, 1, 5, 5), (1, 0));
        assert_eq!(split(1, 0, 5, 0), (1, 0));
        assert_eq!(split(0, 0, 5, 5), (0, 0));
    }

    #[test]
    fn shares_outside_1_to_99_are_refused() {
        assert_eq!(HighShare::new(0), None);
        assert_eq!(HighShare::new(100), None);
        assert_eq!(HighShare::new(80), Some(HighShare::DEFAULT));
        assert_eq!(HighShare::default().percent(), 80);
    }
}
