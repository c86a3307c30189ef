//! One Redis, or a Redis Cluster, behind one connection type.
//!
//! `queue.redis_url` names either a single Redis (`redis://host:port`, or a
//! proxy in front of several), or a Redis Cluster through one of its nodes:
//! `redis+cluster://host:port` (user, password and TLS as in a `redis://`
//! URL; `rediss+cluster://` for TLS). The scheme decides, not the number of
//! hosts: a cluster reached through a single configuration endpoint looks
//! like one host. The client asks that node for the cluster's layout
//! (`CLUSTER SLOTS`), connects to every primary, routes each command by its
//! first key, follows `MOVED`/`ASK` redirections and reconnects by itself;
//! when every known node is gone it starts over from the URL's node.
//!
//! [`Conn`] is what the queue and the leader send commands over. It
//! implements [`ConnectionLike`] by delegation, so commands, pipelines and
//! scripts run unchanged on either kind. On a cluster that holds only
//! because every command, `MULTI` block and script of one queue names keys
//! of one hash tag (`{<prefix>:jobs}`), and scripts declare every key they
//! touch in `KEYS`: the client routes a script by its first key, and Redis
//! refuses a key of another slot (`CROSSSLOT`).
//!
//! Response timeouts: on a cluster the client's `response_timeout` bounds
//! each attempt and, unless set apart, the whole request with its retries
//! and redirections. A [`ClusterConfig`](redis::cluster::ClusterConfig)
//! passed at connection time changes only the per-attempt bound, not the
//! overall one, so a connection that needs another timeout (a blocking
//! read) gets a client of its own, built with that timeout.

use std::time::Duration;

use redis::{
    AsyncConnectionConfig, Client, Cmd, ConnectionInfo, IntoConnectionInfo, Pipeline, RedisFuture,
    RedisResult, Value,
    aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection},
    cluster::ClusterClientBuilder,
    cluster_async::ClusterConnection,
};

/// The URL scheme that marks a Redis Cluster (`rediss+cluster` with TLS).
pub const CLUSTER_SCHEME: &str = "redis+cluster";

/// Where Redis is, as `queue.redis_url` says.
#[derive(Clone)]
pub enum RedisTarget {
    /// One Redis, or a proxy.
    Single(Client),
    /// A Redis Cluster, found through this node.
    Cluster(ConnectionInfo),
}

impl std::fmt::Debug for RedisTarget {
    // By hand: the connection info may hold a password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Single(_) => "RedisTarget::Single",
            Self::Cluster(_) => "RedisTarget::Cluster",
        })
    }
}

/// Timeouts of a connection.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// Opening a connection (to each node, on a cluster).
    pub connect: Duration,
    /// Waiting for one answer.
    pub response: Duration,
}

impl RedisTarget {
    /// Reads a URL: `redis+cluster://…` (or `rediss+cluster://…`) is a
    /// cluster, anything else a single Redis.
    pub fn parse(url: &str) -> RedisResult<Self> {
        match cluster_seed(url) {
            Some(seed) => Ok(Self::Cluster(seed.into_connection_info()?)),
            None => Ok(Self::Single(Client::open(url)?)),
        }
    }

    /// Whether this is a cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self, Self::Cluster(_))
    }

    /// A connection for ordinary commands, shared by cloning: a
    /// [`ConnectionManager`] on one Redis (reconnecting with backoff), a
    /// [`ClusterConnection`] on a cluster.
    pub async fn connect(&self, t: Timeouts) -> RedisResult<Conn> {
        match self {
            Self::Single(client) => {
                let cfg = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(t.connect))
                    .set_response_timeout(Some(t.response))
                    .set_max_delay(Duration::from_secs(2));
                ConnectionManager::new_with_config(client.clone(), cfg)
                    .await
                    .map(Conn::Manager)
            }
            Self::Cluster(seed) => self.cluster(seed, t).await,
        }
    }

    /// A connection of its own, for a blocking command: a
    /// [`MultiplexedConnection`] on one Redis, a [`ClusterConnection`] (one
    /// socket per node) on a cluster. Dropping it closes its sockets.
    pub async fn dedicated(&self, t: Timeouts) -> RedisResult<Conn> {
        match self {
            Self::Single(client) => {
                let cfg = AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(t.connect))
                    .set_response_timeout(Some(t.response));
                client
                    .get_multiplexed_async_connection_with_config(&cfg)
                    .await
                    .map(Conn::Direct)
            }
            Self::Cluster(seed) => self.cluster(seed, t).await,
        }
    }

    async fn cluster(&self, seed: &ConnectionInfo, t: Timeouts) -> RedisResult<Conn> {
        // `response_timeout` is also the overall bound of a request, retries
        // and redirections included (see the module docs).
        ClusterClientBuilder::new([seed.clone()])
            .connection_timeout(t.connect)
            .response_timeout(t.response)
            .build()?
            .get_async_connection()
            .await
            .map(|c| Conn::Cluster(Box::new(c)))
    }
}

/// The same URL with `redis://` (or `rediss://`) in place of the cluster
/// scheme, when it has that scheme.
fn cluster_seed(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let plain = match scheme.to_ascii_lowercase().as_str() {
        "redis+cluster" => "redis",
        "rediss+cluster" => "rediss",
        _ => return None,
    };
    Some(format!("{plain}://{rest}"))
}

/// A connection to one Redis or to a cluster; cheap to clone (clones share
/// the connection).
#[derive(Clone)]
pub enum Conn {
    /// One Redis, reconnecting by itself.
    Manager(ConnectionManager),
    /// One Redis, one socket, not reconnecting (a blocking read's).
    Direct(MultiplexedConnection),
    /// A Redis Cluster: routes by key, follows redirections, reconnects.
    Cluster(Box<ClusterConnection>),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Manager(c) => c.req_packed_command(cmd),
            Self::Direct(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Manager(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Direct(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Manager(c) => c.get_db(),
            Self::Direct(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scheme_decides() {
        assert_eq!(
            cluster_seed("redis+cluster://u:p@10.0.0.1:7000/").as_deref(),
            Some("redis://u:p@10.0.0.1:7000/")
        );
        assert_eq!(
            cluster_seed("REDISS+CLUSTER://h:7000").as_deref(),
            Some("rediss://h:7000")
        );
        assert_eq!(cluster_seed("redis://h:6379"), None);
        assert_eq!(cluster_seed("unix:///tmp/redis.sock"), None);
        assert!(
            RedisTarget::parse("redis+cluster://127.0.0.1:7000")
                .unwrap()
                .is_cluster()
        );
        assert!(
            !RedisTarget::parse("redis://127.0.0.1:6379")
                .unwrap()
                .is_cluster()
        );
        assert!(RedisTarget::parse("redis+cluster://").is_err());
        assert!(RedisTarget::parse("nonsense").is_err());
    }
}
