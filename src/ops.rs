//! `uploadhook status`: the figures an operator looks at first. The same
//! numbers are what the metrics endpoint will export.

use std::fmt;

use anyhow::Context;
use secrecy::ExposeSecret;

use crate::{
    config::{Config, QueueBackend},
    domain::Status,
    pipeline::redis_queue::{QueueStats, RedisQueue, RedisQueueConfig},
};

pub struct StatusReport {
    pub backend: QueueBackend,
    pub queue: Option<QueueStats>,
    pub by_status: Vec<(Status, u64)>,
    pub dead_letters: u64,
}

/// Reads the database and, for the Redis backend, the queue.
pub async fn status(cfg: &Config) -> anyhow::Result<StatusReport> {
    let store = crate::open_store(cfg).await?;
    let by_status = store
        .counts_by_status()
        .await
        .context("reading webhook counts")?;
    let dead_letters = store
        .open_dead_letters()
        .await
        .context("reading dead letters")?;
    let queue = match cfg.queue.backend {
        QueueBackend::Memory => None,
        QueueBackend::Redis => {
            let q = RedisQueue::connect(
                cfg.queue.redis_url.expose_secret(),
                RedisQueueConfig {
                    prefix: cfg.queue.prefix.clone(),
                    ..RedisQueueConfig::default()
                },
            )
            .await
            .context("connecting to Redis (queue.redis_url)")?;
            Some(q.stats().await.context("reading queue figures")?)
        }
    };
    Ok(StatusReport {
        backend: cfg.queue.backend,
        queue,
        by_status,
        dead_letters,
    })
}

impl fmt::Display for StatusReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.backend, &self.queue) {
            (QueueBackend::Redis, Some(q)) => {
                writeln!(f, "queue (redis)")?;
                writeln!(
                    f,
                    "  in the streams:             {} ({} high priority)",
                    q.stream, q.high
                )?;
                match q.oldest_age {
                    Some(age) => {
                        writeln!(f, "  oldest unfinished entry:    {:.1}s", age.as_secs_f64())?
                    }
                    None => writeln!(f, "  oldest unfinished entry:    -")?,
                }
                writeln!(f, "  taken, not yet acked:       {}", q.pending)?;
                writeln!(f, "  delayed (retries):          {}", q.delayed)?;
                writeln!(f, "  poison (parked):            {}", q.poison)?;
            }
            _ => writeln!(
                f,
                "queue (memory): lives inside the serving process; the statuses below are what it holds"
            )?,
        }
        writeln!(f, "dead letters (not redriven): {}", self.dead_letters)?;
        writeln!(f, "webhooks by status")?;
        for (s, n) in &self.by_status {
            writeln!(f, "  {:<12} {n}", s.as_str())?;
        }
        Ok(())
    }
}
