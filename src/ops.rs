//! Operator commands: `uploadhook status` (the figures an operator looks
//! at first; the same numbers are what the metrics endpoint exports) and
//! `uploadhook redrive` (bulk redrive by filter).

use std::{fmt, sync::Arc};

use anyhow::Context;

use crate::{
    clock::{Clock, SystemClock},
    config::{Config, QueueBackend},
    domain::Status,
    pipeline::{
        queue::enqueue_logged,
        redis_conn::RedisTarget,
        redis_queue::{QueueStats, RedisQueue, RedisQueueConfig},
        redrive::{self, Outcome},
    },
    store::{RedriveFilter, RedriveSource},
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
    let queue = match redis_queue(cfg).await? {
        None => None,
        Some(q) => Some(q.stats().await.context("reading queue figures")?),
    };
    Ok(StatusReport {
        backend: cfg.queue.backend,
        queue,
        by_status,
        dead_letters,
    })
}

/// The Redis queue of a Redis deployment, for an operator command.
async fn redis_queue(cfg: &Config) -> anyhow::Result<Option<RedisQueue>> {
    Ok(match cfg.queue.backend {
        QueueBackend::Memory => None,
        QueueBackend::Redis => Some(
            RedisQueue::connect_target(
                RedisTarget::from_config(&cfg.queue)?,
                RedisQueueConfig {
                    prefix: cfg.queue.prefix.clone(),
                    visibility_timeout: cfg.queue.visibility_timeout,
                    max_deliveries: cfg.queue.max_deliveries,
                    ..RedisQueueConfig::default()
                },
                Arc::new(SystemClock),
            )
            .await
            .context("connecting to Redis (queue.redis_url)")?,
        ),
    })
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct RedriveReport {
    /// Webhooks the filter matched.
    pub matched: u64,
    /// Moved back into the pipeline (0 on a dry run).
    pub redriven: u64,
    /// Moved on between the read and the redrive (left as they are).
    pub moved_on: u64,
    /// Whether the jobs were queued by this command (Redis), or are picked
    /// up by the serving process's reconciler (in-process queue).
    pub queued_here: bool,
}

/// Redrives every webhook the filter matches, page by page, at most
/// `limit`. The same step as the `Redeliver` RPC, recorded as `cli`.
pub async fn bulk_redrive(
    cfg: &Config,
    filter: &RedriveFilter,
    limit: Option<u64>,
    dry_run: bool,
) -> anyhow::Result<RedriveReport> {
    let store = crate::open_store(cfg).await?;
    let queue = if dry_run {
        None
    } else {
        redis_queue(cfg).await?
    };
    let mut report = RedriveReport {
        queued_here: queue.is_some(),
        ..RedriveReport::default()
    };
    let mut after: Option<String> = None;
    let limit = limit.unwrap_or(u64::MAX);
    while report.matched < limit {
        let page = store
            .redrive_page(filter, after.as_deref(), (limit - report.matched).min(500))
            .await
            .context("reading webhooks to redrive")?;
        let Some(last) = page.last() else { break };
        after = Some(last.id.clone());
        for w in &page {
            report.matched += 1;
            if dry_run {
                continue;
            }
            match redrive::redrive(&store, w, RedriveSource::Cli, SystemClock.now())
                .await
                .with_context(|| format!("redriving {}", w.id))?
            {
                Outcome::Redriven(_, job) => {
                    report.redriven += 1;
                    if let Some(q) = &queue {
                        enqueue_logged(q, job).await;
                    }
                }
                Outcome::NotRedrivable(_) | Outcome::MovedOn => report.moved_on += 1,
            }
        }
    }
    Ok(report)
}

impl fmt::Display for RedriveReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "matched:   {}", self.matched)?;
        writeln!(f, "redriven:  {}", self.redriven)?;
        writeln!(f, "moved on:  {}", self.moved_on)?;
        if self.redriven > 0 && !self.queued_here {
            writeln!(
                f,
                "queue (memory): the serving process's reconciler sends them within \
                 queue.visibility_timeout + queue.reconcile_every"
            )?;
        }
        Ok(())
    }
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
