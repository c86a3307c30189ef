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
}

impl JobKind {
    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::Verify => "verify",
            JobKind::Deliver => "deliver",
        }
    }
}

/// Which work is drained first. High-priority work goes first without
/// starving normal work (a weighted read).
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
}
