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
//!
//! TLS: `rediss://` (and `rediss+cluster://`) connects over TLS (rustls),
//! checking the server's certificate against the system's CA roots, or
//! against the CA bundle of `queue.redis_ca_file`, and the host name of the
//! URL; `queue.redis_client_cert_file` and `queue.redis_client_key_file`
//! add a client certificate (mutual TLS). On a cluster every node is
//! reached with the same TLS settings, by the address it announces.
//! `#insecure` (no certificate check) is refused.

use std::{path::Path, time::Duration};

use anyhow::Context as _;
use redis::{
    AsyncConnectionConfig, Client, ClientTlsConfig, Cmd, ConnectionAddr, ConnectionInfo, ErrorKind,
    IntoConnectionInfo, Pipeline, RedisError, RedisFuture, RedisResult, TlsCertificates, Value,
    aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection},
    cluster::ClusterClientBuilder,
    cluster_async::ClusterConnection,
    io::tcp::TcpSettings,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use secrecy::ExposeSecret;

use crate::config::QueueConfig;

/// The URL scheme that marks a Redis Cluster (`rediss+cluster` with TLS).
pub const CLUSTER_SCHEME: &str = "redis+cluster";

/// Where Redis is, as `queue.redis_url` says, and how to reach it.
#[derive(Clone)]
pub enum RedisTarget {
    /// One Redis, or a proxy (its TLS settings inside the client).
    Single(Client),
    /// A Redis Cluster, found through this node; every node is reached
    /// with these TLS certificates (when set).
    Cluster {
        seed: ConnectionInfo,
        certs: Option<TlsCertificates>,
    },
}

impl std::fmt::Debug for RedisTarget {
    // By hand: the connection info may hold a password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Single(_) => "RedisTarget::Single",
            Self::Cluster { .. } => "RedisTarget::Cluster",
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
    /// cluster, anything else a single Redis. A TLS URL trusts the
    /// system's CA roots.
    pub fn parse(url: &str) -> RedisResult<Self> {
        Self::open(url, None)
    }

    /// Like [`RedisTarget::parse`], with the CA to trust and the client
    /// certificate to show over TLS; an error when `certs` is given and
    /// the URL is not a TLS one.
    pub fn open(url: &str, certs: Option<TlsCertificates>) -> RedisResult<Self> {
        let (info, cluster) = match cluster_seed(url) {
            Some(seed) => (seed.into_connection_info()?, true),
            None => (url.into_connection_info()?, false),
        };
        let info = info.set_tcp_settings(tcp_settings());
        match info.addr() {
            ConnectionAddr::TcpTls { insecure: true, .. } => {
                return Err(RedisError::from((
                    ErrorKind::InvalidClientConfig,
                    "`#insecure` (TLS without checking the server's certificate) is not \
                     supported; trust the server's CA with queue.redis_ca_file instead",
                )));
            }
            ConnectionAddr::TcpTls { .. } => install_crypto_provider(),
            _ if certs.is_some() => {
                return Err(RedisError::from((
                    ErrorKind::InvalidClientConfig,
                    "TLS certificates are set, but the URL is not a rediss:// \
                     (or rediss+cluster://) one",
                )));
            }
            _ => {}
        }
        Ok(match (cluster, certs) {
            (true, certs) => Self::Cluster { seed: info, certs },
            (false, Some(certs)) => Self::Single(Client::build_with_tls(info, certs)?),
            (false, None) => Self::Single(Client::open(info)?),
        })
    }

    /// `queue.redis_url` with the TLS files of `[queue]`, read now. Errors
    /// name the config key at fault (a file that cannot be read, a PEM that
    /// does not parse, a key that is not the certificate's); they never
    /// show the URL, which may hold a password.
    pub fn from_config(q: &QueueConfig) -> anyhow::Result<Self> {
        let certs = tls_certificates(q)?;
        Self::open(q.redis_url.expose_secret(), certs).context("config key `queue.redis_url`")
    }

    /// Whether this is a cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self, Self::Cluster { .. })
    }

    /// A client of one Redis: this one, or a cluster's seed node (where
    /// classic pub/sub reaches every node's subscribers).
    pub fn seed_client(&self) -> RedisResult<Client> {
        match self {
            Self::Single(c) => Ok(c.clone()),
            Self::Cluster {
                seed,
                certs: Some(certs),
            } => Client::build_with_tls(seed.clone(), certs.clone()),
            Self::Cluster { seed, certs: None } => Client::open(seed.clone()),
        }
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
            Self::Cluster { .. } => self.cluster(t).await,
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
            Self::Cluster { .. } => self.cluster(t).await,
        }
    }

    async fn cluster(&self, t: Timeouts) -> RedisResult<Conn> {
        let Self::Cluster { seed, certs } = self else {
            unreachable!("called on a cluster only");
        };
        // `response_timeout` is also the overall bound of a request, retries
        // and redirections included (see the module docs).
        let mut builder = ClusterClientBuilder::new([seed.clone()])
            .tcp_settings(tcp_settings())
            .connection_timeout(t.connect)
            .response_timeout(t.response);
        if let Some(certs) = certs {
            builder = builder.certs(certs.clone());
        }
        builder
            .build()?
            .get_async_connection()
            .await
            .map(|c| Conn::Cluster(Box::new(c)))
    }
}

/// Every connection's socket options: `TCP_NODELAY`, which redis-rs
/// leaves off. A multiplexed connection writes a command while earlier
/// ones await their answers; without it the kernel holds such a write
/// back until the earlier one is acknowledged (Nagle); a command of more
/// than one TLS record can then wait for the server's delayed ACK, up to
/// 40 ms, as PostgreSQL statements did with sqlx 0.9.0 (docs/benchmarks-history.md,
/// session 23).
fn tcp_settings() -> TcpSettings {
    TcpSettings::default().set_nodelay(true)
}

/// Makes aws-lc-rs rustls' process-wide provider, unless one is already.
/// The redis client builds its TLS config with the process default, and
/// rustls cannot choose one by itself here: both its ring (through sqlx)
/// and aws-lc-rs (reqwest, the AWS SDK) features are on.
fn install_crypto_provider() {
    // An error only says that a provider is installed already.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// The TLS certificates that `[queue]` names, read and checked; None when
/// it names none (a `rediss://` URL then trusts the system's roots).
fn tls_certificates(q: &QueueConfig) -> anyhow::Result<Option<TlsCertificates>> {
    let root_cert = match &q.redis_ca_file {
        None => None,
        Some(path) => {
            let key = "queue.redis_ca_file";
            let pem = read_pem(key, path)?;
            let certs = parse_certs(key, path, &pem)?;
            let mut store = rustls::RootCertStore::empty();
            for cert in certs {
                store.add(cert).map_err(|e| {
                    anyhow::anyhow!(
                        "config key `{key}`: {} holds a certificate that cannot be a trust anchor: {e}",
                        path.display()
                    )
                })?;
            }
            Some(pem)
        }
    };
    let client_tls = match (&q.redis_client_cert_file, &q.redis_client_key_file) {
        (None, None) => None,
        (Some(cert_path), Some(key_path)) => {
            let cert_key = "queue.redis_client_cert_file";
            let key_key = "queue.redis_client_key_file";
            let client_cert = read_pem(cert_key, cert_path)?;
            let chain = parse_certs(cert_key, cert_path, &client_cert)?;
            let client_key = read_pem(key_key, key_path)?;
            let key = PrivateKeyDer::from_pem_slice(&client_key).map_err(|e| {
                anyhow::anyhow!(
                    "config key `{key_key}`: no PEM private key (PKCS#8, PKCS#1 or SEC1) in {}: {e}",
                    key_path.display()
                )
            })?;
            // What the client will do at each connection, done once now:
            // the key must be one rustls can sign with, and the
            // certificate's.
            let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
            rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .context("rustls protocol versions")?
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_client_auth_cert(chain, key)
                .map_err(|e| {
                    anyhow::anyhow!(
                        "config key `{key_key}`: the key in {} does not go with the certificate \
                         in {} (queue.redis_client_cert_file): {e}",
                        key_path.display(),
                        cert_path.display()
                    )
                })?;
            Some(ClientTlsConfig {
                client_cert,
                client_key,
            })
        }
        (Some(_), None) => anyhow::bail!(
            "config key `queue.redis_client_key_file`: must be set with queue.redis_client_cert_file"
        ),
        (None, Some(_)) => anyhow::bail!(
            "config key `queue.redis_client_cert_file`: must be set with queue.redis_client_key_file"
        ),
    };
    if root_cert.is_none() && client_tls.is_none() {
        return Ok(None);
    }
    Ok(Some(TlsCertificates {
        client_tls,
        root_cert,
    }))
}

fn read_pem(key: &str, path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("config key `{key}`: reading {}", path.display()))
}

/// Every certificate of a PEM file; an error when it has none.
fn parse_certs(key: &str, path: &Path, pem: &[u8]) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            anyhow::anyhow!(
                "config key `{key}`: {} is not valid PEM: {e}",
                path.display()
            )
        })?;
    if certs.is_empty() {
        anyhow::bail!(
            "config key `{key}`: {} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
            path.display()
        );
    }
    Ok(certs)
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
    use crate::pipeline::test_pki::{TestCa, write_pem};

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

    /// A `[queue]` with Redis at `url` and these extra lines.
    fn queue(url: &str, extra: &str) -> Result<QueueConfig, crate::config::ConfigError> {
        crate::config::Config::from_toml(&format!(
            "[queue]\nbackend = \"redis\"\nredis_url = \"{url}\"\n{extra}"
        ))
        .map(|c| c.queue)
    }

    fn err(q: &QueueConfig) -> String {
        format!("{:#}", RedisTarget::from_config(q).unwrap_err())
    }

    /// PEM files of a CA and of a client certificate it signed, in a
    /// temporary directory.
    struct Files {
        dir: tempfile::TempDir,
    }

    impl Files {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let ca = TestCa::new("test CA");
            let (cert, key) = ca.issue(&["client.example"]);
            let (_, other_key) = ca.issue(&["other.example"]);
            write_pem(dir.path(), "ca.pem", &ca.cert_pem);
            write_pem(dir.path(), "client.pem", &cert);
            write_pem(dir.path(), "client.key", &key);
            write_pem(dir.path(), "other.key", &other_key);
            write_pem(dir.path(), "junk.pem", "not a certificate\n");
            write_pem(
                dir.path(),
                "broken.pem",
                "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
            );
            Self { dir }
        }

        fn path(&self, name: &str) -> String {
            self.dir.path().join(name).display().to_string()
        }
    }

    #[test]
    fn tls_files_are_read_at_start_and_checked() {
        let f = Files::new();
        let url = "rediss://127.0.0.1:6380";
        let ca = format!("redis_ca_file = \"{}\"", f.path("ca.pem"));
        let client = format!(
            "redis_client_cert_file = \"{}\"\nredis_client_key_file = \"{}\"",
            f.path("client.pem"),
            f.path("client.key")
        );

        // Good files: a TLS client, with the CA, the client certificate or
        // both, on one Redis or a cluster.
        for extra in [ca.clone(), client.clone(), format!("{ca}\n{client}")] {
            let t = RedisTarget::from_config(&queue(url, &extra).unwrap()).unwrap();
            let RedisTarget::Single(c) = &t else {
                panic!("one Redis")
            };
            assert!(matches!(
                c.get_connection_info().addr(),
                ConnectionAddr::TcpTls {
                    insecure: false,
                    tls_params: Some(_),
                    ..
                }
            ));
        }
        let t = RedisTarget::from_config(
            &queue(
                "rediss+cluster://127.0.0.1:7000",
                &format!("{ca}\n{client}"),
            )
            .unwrap(),
        )
        .unwrap();
        assert!(matches!(t, RedisTarget::Cluster { certs: Some(_), .. }));
        // No files: the system's roots.
        let t = RedisTarget::from_config(&queue(url, "").unwrap()).unwrap();
        assert!(matches!(
            t.seed_client().unwrap().get_connection_info().addr(),
            ConnectionAddr::TcpTls {
                tls_params: None,
                ..
            }
        ));

        // A file that is not there, or not PEM.
        let missing =
            err(&queue(url, &format!("redis_ca_file = \"{}\"", f.path("nope.pem"))).unwrap());
        assert!(
            missing.starts_with("config key `queue.redis_ca_file`: reading ")
                && missing.contains("nope.pem"),
            "{missing}"
        );
        let junk =
            err(&queue(url, &format!("redis_ca_file = \"{}\"", f.path("junk.pem"))).unwrap());
        assert!(
            junk.starts_with("config key `queue.redis_ca_file`:")
                && junk.contains("no PEM certificate"),
            "{junk}"
        );
        let broken = err(&queue(
            url,
            &format!("redis_ca_file = \"{}\"", f.path("broken.pem")),
        )
        .unwrap());
        assert!(
            broken.starts_with("config key `queue.redis_ca_file`:"),
            "{broken}"
        );
        // A key that is not a key, or not the certificate's.
        let not_a_key = err(&queue(
            url,
            &format!(
                "redis_client_cert_file = \"{}\"\nredis_client_key_file = \"{}\"",
                f.path("client.pem"),
                f.path("ca.pem")
            ),
        )
        .unwrap());
        assert!(
            not_a_key.starts_with("config key `queue.redis_client_key_file`: no PEM private key"),
            "{not_a_key}"
        );
        let wrong_key = err(&queue(
            url,
            &format!(
                "redis_client_cert_file = \"{}\"\nredis_client_key_file = \"{}\"",
                f.path("client.pem"),
                f.path("other.key")
            ),
        )
        .unwrap());
        assert!(
            wrong_key.starts_with("config key `queue.redis_client_key_file`:")
                && wrong_key.contains("does not go with the certificate"),
            "{wrong_key}"
        );
        let junk_cert = err(&queue(
            url,
            &format!(
                "redis_client_cert_file = \"{}\"\nredis_client_key_file = \"{}\"",
                f.path("junk.pem"),
                f.path("client.key")
            ),
        )
        .unwrap());
        assert!(
            junk_cert.starts_with("config key `queue.redis_client_cert_file`:"),
            "{junk_cert}"
        );
    }

    #[test]
    fn tls_settings_that_cannot_work_are_refused_at_load() {
        let f = Files::new();
        // Half a client identity.
        let e = queue(
            "rediss://h:6380",
            &format!("redis_client_cert_file = \"{}\"", f.path("client.pem")),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("config key `queue.redis_client_key_file`"),
            "{e}"
        );
        let e = queue(
            "rediss://h:6380",
            &format!("redis_client_key_file = \"{}\"", f.path("client.key")),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("config key `queue.redis_client_cert_file`"),
            "{e}"
        );
        // TLS files with a plain URL: the files would be ignored.
        for (url, key) in [
            ("redis://:secret@h:6379", "redis_ca_file"),
            ("redis+cluster://h:7000", "redis_client_cert_file"),
        ] {
            let extra = if key == "redis_ca_file" {
                format!("redis_ca_file = \"{}\"", f.path("ca.pem"))
            } else {
                format!(
                    "redis_client_cert_file = \"{}\"\nredis_client_key_file = \"{}\"",
                    f.path("client.pem"),
                    f.path("client.key")
                )
            };
            let e = queue(url, &extra).unwrap_err().to_string();
            assert!(e.starts_with(&format!("config key `queue.{key}`")), "{e}");
            assert!(e.contains("rediss://") && !e.contains("secret"), "{e}");
        }
        // Other schemes' case does not matter; an empty path is unset.
        assert!(
            queue(
                "REDISS://h:6380",
                &format!("redis_ca_file = \"{}\"", f.path("ca.pem"))
            )
            .is_ok()
        );
        assert!(queue("redis://h:6379", "redis_ca_file = \"\"").is_ok());
        // Without a Redis queue the files are not looked at.
        assert!(crate::config::Config::from_toml("[queue]\nredis_ca_file = \"/nope.pem\"").is_ok());
    }

    #[test]
    fn insecure_tls_is_refused_and_the_password_not_shown() {
        let q = queue("rediss://user:hunter2@127.0.0.1:6380/#insecure", "").unwrap();
        let e = err(&q);
        assert!(e.starts_with("config key `queue.redis_url`"), "{e}");
        assert!(
            e.contains("#insecure") && e.contains("queue.redis_ca_file"),
            "{e}"
        );
        assert!(!e.contains("hunter2"), "{e}");
        let e = RedisTarget::parse("rediss+cluster://127.0.0.1:7000/#insecure")
            .expect_err("refused")
            .to_string();
        assert!(e.contains("#insecure"), "{e}");
        // Certificates with a plain URL, past the config check.
        let certs = TlsCertificates {
            client_tls: None,
            root_cert: Some(TestCa::new("x").cert_pem.into_bytes()),
        };
        let e = RedisTarget::open("redis://127.0.0.1:6379", Some(certs))
            .expect_err("refused")
            .to_string();
        assert!(e.contains("not a rediss://"), "{e}");
    }
}
