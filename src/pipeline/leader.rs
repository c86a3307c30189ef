//! One reconciler at a time across processes.
//!
//! The reconciler re-enqueues webhooks that the database says are owed
//! work; several running at once would only waste queries (workers' status
//! checks make duplicates harmless), so a lease in Redis is enough: `SET NX
//! PX`, renewed by its holder, expiring by itself when the holder dies.
//!
//! The lease's key carries the queue's hash tag (`{<prefix>:jobs}:lock:…`),
//! and its script names it in `KEYS`, so on a Redis Cluster (see
//! [`super::redis_conn`]) it is routed like any other command. A failover
//! that loses the key's latest write may let two processes lead for up to
//! one `ttl`, which is harmless here.

use std::time::Duration;

use async_trait::async_trait;

use super::{
    redis_conn::{Conn, RedisTarget},
    redis_queue::COMMAND_TIMEOUTS,
};

#[async_trait]
pub trait Leader: Send + Sync + 'static {
    /// Takes or renews the lease for `ttl`; false when another holds it.
    async fn try_lead(&self, ttl: Duration) -> bool;
}

/// A single process leads by itself (the embedded deployment).
pub struct Alone;

#[async_trait]
impl Leader for Alone {
    async fn try_lead(&self, _: Duration) -> bool {
        true
    }
}

/// A lease on one Redis key, holding this process's random token.
pub struct RedisLeader {
    conn: Conn,
    key: String,
    token: String,
}

const TAKE_OR_RENEW: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return 1
end
return 0
"#;

impl RedisLeader {
    pub async fn connect(
        target: &RedisTarget,
        prefix: &str,
        name: &str,
    ) -> Result<Self, redis::RedisError> {
        let conn = target.connect(COMMAND_TIMEOUTS).await?;
        let mut raw = [0u8; 16];
        rand::fill(&mut raw);
        Ok(Self {
            conn,
            key: format!("{{{prefix}:jobs}}:lock:{name}"),
            token: hex::encode(raw),
        })
    }
}

#[async_trait]
impl Leader for RedisLeader {
    async fn try_lead(&self, ttl: Duration) -> bool {
        let mut conn = self.conn.clone();
        let res: Result<i64, _> = redis::Script::new(TAKE_OR_RENEW)
            .key(&self.key)
            .arg(&self.token)
            .arg(ttl.as_millis().max(1) as u64)
            .invoke_async(&mut conn)
            .await;
        match res {
            Ok(n) => n == 1,
            Err(e) => {
                tracing::warn!(error = %e, "leader lease: Redis error; not leading this round");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::test_cluster::TestCluster;

    #[tokio::test]
    async fn one_holder_at_a_time_and_expiry_hands_over() {
        let Ok(url) = std::env::var("UPLOADHOOK_TEST_REDIS_URL") else {
            assert_ne!(
                std::env::var("UPLOADHOOK_REQUIRE_SERVICES").as_deref(),
                Ok("1"),
                "UPLOADHOOK_REQUIRE_SERVICES=1 but UPLOADHOOK_TEST_REDIS_URL is not set"
            );
            eprintln!("skipping: UPLOADHOOK_TEST_REDIS_URL is not set");
            return;
        };
        one_holder_at_a_time(&url).await;
    }

    #[tokio::test]
    async fn one_holder_at_a_time_on_a_cluster() {
        let Some(cluster) = TestCluster::get() else {
            return;
        };
        one_holder_at_a_time(&cluster.url()).await;
    }

    async fn one_holder_at_a_time(url: &str) {
        // Long enough that each step's round trip stays within the lease
        // on a machine loaded by the tests beside this one.
        const LEASE: Duration = Duration::from_secs(2);
        let prefix = format!("uh-test-{}", uuid::Uuid::new_v4().simple());
        let target = RedisTarget::parse(url).unwrap();
        let a = RedisLeader::connect(&target, &prefix, "reconciler")
            .await
            .unwrap();
        let b = RedisLeader::connect(&target, &prefix, "reconciler")
            .await
            .unwrap();
        assert!(a.try_lead(LEASE).await);
        assert!(!b.try_lead(LEASE).await);
        assert!(a.try_lead(LEASE).await, "the holder renews");
        tokio::time::sleep(LEASE + Duration::from_millis(200)).await;
        assert!(b.try_lead(LEASE).await, "an expired lease is taken over");
        assert!(!a.try_lead(LEASE).await);
        let mut conn = b.conn.clone();
        let _: () = redis::cmd("DEL")
            .arg(&b.key)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
}
