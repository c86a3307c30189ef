//! Redis that is down at start-up must not stop the process: the API still
//! records Confirms (the database is the truth) and workers wait. These
//! wrappers connect on first use and keep trying, at most once a second,
//! until Redis answers; after that the connection manager reconnects by
//! itself.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::{
    leader::{Leader, RedisLeader},
    queue::{Job, Lease, Queue, QueueError},
    redis_conn::RedisTarget,
    redis_queue::{QueueStats, RedisQueue, RedisQueueConfig},
};
use crate::clock::Clock;

const RETRY_EVERY: Duration = Duration::from_secs(1);

/// A value that is connected on first use, in the background: a caller
/// never waits for a connection attempt (a refused connection may be
/// retried with backoff inside the client for seconds); it gets an error
/// at once until the connection is up.
struct Lazy<T> {
    state: Arc<std::sync::Mutex<LazyState<T>>>,
}

struct LazyState<T> {
    value: Option<Arc<T>>,
    connecting: bool,
    last_try: Option<Instant>,
}

impl<T: Send + Sync + 'static> Lazy<T> {
    fn new() -> Self {
        Self {
            state: Arc::new(std::sync::Mutex::new(LazyState {
                value: None,
                connecting: false,
                last_try: None,
            })),
        }
    }

    fn get<F, Fut, E>(&self, connect: F) -> Result<Arc<T>, String>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<T, E>> + Send + 'static,
        E: std::fmt::Display,
    {
        let mut st = self.state.lock().expect("lazy lock");
        if let Some(v) = &st.value {
            return Ok(v.clone());
        }
        if !st.connecting && st.last_try.is_none_or(|at| at.elapsed() >= RETRY_EVERY) {
            st.connecting = true;
            st.last_try = Some(Instant::now());
            let state = self.state.clone();
            let fut = connect();
            tokio::spawn(async move {
                let res = fut.await;
                let mut st = state.lock().expect("lazy lock");
                st.connecting = false;
                match res {
                    Ok(v) => {
                        st.value = Some(Arc::new(v));
                        tracing::info!("connected to Redis");
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "Redis is unreachable; the database keeps the work until it is back");
                    }
                }
            });
        }
        Err("redis is unreachable; connecting in the background".into())
    }
}

/// [`RedisQueue`], connected on first use.
pub struct LazyRedisQueue {
    target: RedisTarget,
    cfg: RedisQueueConfig,
    clock: Arc<dyn Clock>,
    inner: Lazy<RedisQueue>,
}

impl LazyRedisQueue {
    pub fn new(target: RedisTarget, cfg: RedisQueueConfig, clock: Arc<dyn Clock>) -> Self {
        Self {
            target,
            cfg,
            clock,
            inner: Lazy::new(),
        }
    }

    pub fn get(&self) -> Result<Arc<RedisQueue>, QueueError> {
        let (target, cfg, clock) = (self.target.clone(), self.cfg.clone(), self.clock.clone());
        self.inner
            .get(move || async move { RedisQueue::connect_target(target, cfg, clock).await })
            .map_err(QueueError::Backend)
    }
}

#[async_trait]
impl Queue for LazyRedisQueue {
    async fn enqueue(&self, job: Job, due: Option<DateTime<Utc>>) -> Result<(), QueueError> {
        self.get()?.enqueue(job, due).await
    }

    async fn take(&self, max: usize, wait: Duration) -> Result<Vec<Lease>, QueueError> {
        match self.get() {
            Ok(q) => q.take(max, wait).await,
            Err(e) => {
                // Wait as a take would, rather than spin.
                tokio::time::sleep(wait.min(RETRY_EVERY)).await;
                Err(e)
            }
        }
    }

    async fn ack(&self, lease: &Lease) -> Result<(), QueueError> {
        self.get()?.ack(lease).await
    }

    async fn retry_later(&self, lease: &Lease, due: DateTime<Utc>) -> Result<(), QueueError> {
        self.get()?.retry_later(lease, due).await
    }

    async fn ping(&self) -> Result<(), QueueError> {
        self.get()?.ping().await
    }

    async fn stats(&self) -> Result<QueueStats, QueueError> {
        self.get()?.stats().await
    }
}

/// [`RedisLeader`], connected on first use; never leads while Redis is
/// unreachable.
pub struct LazyRedisLeader {
    target: RedisTarget,
    prefix: String,
    inner: Lazy<RedisLeader>,
}

impl LazyRedisLeader {
    pub fn new(target: RedisTarget, prefix: &str) -> Self {
        Self {
            target,
            prefix: prefix.to_string(),
            inner: Lazy::new(),
        }
    }
}

#[async_trait]
impl Leader for LazyRedisLeader {
    async fn try_lead(&self, ttl: Duration) -> bool {
        let (target, prefix) = (self.target.clone(), self.prefix.clone());
        match self
            .inner
            .get(move || async move { RedisLeader::connect(&target, &prefix, "reconciler").await })
        {
            Ok(l) => l.try_lead(ttl).await,
            Err(_) => false,
        }
    }
}
