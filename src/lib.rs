//! uploadhook: signed webhooks when a file has really landed in object storage.
//!
//! `main` parses the command line and calls [`start`]; tests start the real
//! service in-process on port 0 with the same call.

pub mod api;
pub mod clock;
pub mod config;
pub mod domain;
pub mod error;
pub mod events;
pub mod health;
pub mod metrics;
pub mod ops;
pub mod pipeline;
pub mod proto;
pub mod secrets;
pub mod signing;
pub mod storage;
pub mod store;
pub mod telemetry;
#[cfg(test)]
pub(crate) mod test_sockets;
pub mod tls;

use std::{net::SocketAddr, sync::Arc};

use anyhow::Context;
use secrecy::ExposeSecret;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use signing::verify;

use crate::{
    api::{
        gateway::{Gateway, SseBinding},
        grpc::{GrpcApi, Streams},
        service::WebhookApi,
    },
    clock::{Clock, SystemClock},
    config::{Config, QueueBackend},
    events::{EventBus, LocalEventBus, redis::RedisEventBus},
    pipeline::{
        Pipeline,
        delivery::DeliveryClient,
        lazy::{LazyRedisLeader, LazyRedisQueue},
        leader::{Alone, Leader},
        memory::MemoryQueue,
        queue::Queue,
        redis_conn::RedisTarget,
        redis_queue::RedisQueueConfig,
    },
    proto::webhook_service_server::WebhookServiceServer,
    storage::Storages,
    store::{Store, WriteBatcher},
};

/// Authentication failures after the first are summarised per window.
const AUTH_FAILURE_WINDOW: std::time::Duration = std::time::Duration::from_secs(10);

/// Which parts a process runs: `serve` runs both; `api` and `worker` run
/// one each, so that they scale separately (Redis queue only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Roles {
    pub api: bool,
    pub worker: bool,
}

impl Roles {
    pub const ALL: Roles = Roles {
        api: true,
        worker: true,
    };
    pub const API: Roles = Roles {
        api: true,
        worker: false,
    };
    pub const WORKER: Roles = Roles {
        api: false,
        worker: true,
    };
}

/// The sockets the service serves on; bound by the caller, so that tests
/// can bind port 0 and read the port back.
pub struct Listeners {
    /// The gRPC API (api role only).
    pub grpc: Option<TcpListener>,
    /// The REST gateway (api role) and /healthz, /readyz (every role).
    pub http: TcpListener,
    /// For the embedded S3 server, when it runs.
    pub s3: Option<TcpListener>,
}

impl Listeners {
    /// Binds the configured addresses that these roles need.
    pub async fn bind(cfg: &Config, roles: Roles) -> anyhow::Result<Self> {
        let bind = |addr: SocketAddr, what: &'static str| async move {
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding {what} listener on {addr}"))
        };
        Ok(Self {
            grpc: if roles.api {
                Some(bind(cfg.server.grpc_addr, "gRPC (server.grpc_addr)").await?)
            } else {
                None
            },
            http: bind(cfg.server.http_addr, "HTTP (server.http_addr)").await?,
            s3: if roles.api && cfg.embedded_s3_enabled() {
                Some(bind(cfg.embedded_s3.addr, "embedded S3 (embedded_s3.addr)").await?)
            } else {
                None
            },
        })
    }
}

/// A running service.
pub struct Running {
    /// The gRPC address, when this process runs the API.
    pub grpc_addr: Option<SocketAddr>,
    pub http_addr: SocketAddr,
    pub s3_endpoint: Option<String>,
    /// The development key, when this start created it.
    pub bootstrap_key: Option<String>,
    pub store: Store,
    /// The storage connections (their HEAD counts, for tests and figures).
    pub storages: Arc<Storages>,
    shutdown: CancellationToken,
    tasks: tokio::task::JoinSet<()>,
}

impl Running {
    /// Asks every part to stop (as SIGTERM does).
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Waits until every part has stopped.
    pub async fn wait(mut self) {
        while self.tasks.join_next().await.is_some() {}
    }

    /// Stops and waits.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.wait().await;
    }
}

/// Opens the database and applies migrations (`uploadhook migrate`).
pub async fn migrate(cfg: &Config) -> anyhow::Result<()> {
    let db = open_db(cfg, 0).await?;
    store::migrate(&db).await.context("applying migrations")?;
    Ok(())
}

/// Opens the store without starting anything (CLI commands).
pub async fn open_store(cfg: &Config) -> anyhow::Result<Store> {
    let keyring = Arc::new(master_keyring(cfg)?);
    let db = open_db(cfg, 0).await?;
    Ok(Store::new(db, Arc::new(LocalEventBus::new(16)), keyring))
}

/// The master keys that seal webhook signing secrets: `encryption.keys`
/// when set. Unset, a SQLite database gets a key generated once into
/// `uploadhook.master-key` beside its file (development; with a warning),
/// an in-memory SQLite database a key for this process only, and a
/// PostgreSQL database none: the process refuses to start, because a key
/// kept on one machine's disk would not reach the others.
pub fn master_keyring(cfg: &Config) -> anyhow::Result<secrets::Keyring> {
    let spec = cfg.encryption.keys.expose_secret();
    if !spec.trim().is_empty() {
        // Validated at load.
        return secrets::Keyring::parse(spec)
            .map_err(|e| anyhow::anyhow!("config key `encryption.keys`: {e}"));
    }
    let url = cfg.database.url.expose_secret();
    let Some(path) = url
        .strip_prefix("sqlite://")
        .or(url.strip_prefix("sqlite:"))
    else {
        anyhow::bail!(
            "config key `encryption.keys`: required with a database other than SQLite, to seal \
             webhook signing secrets; format `id:base64(32 bytes)[,id:base64…]` (set \
             UPLOADHOOK_ENCRYPTION__KEYS; `uploadhook keys new-master-key --id k1` prints one)"
        );
    };
    let path = path.split('?').next().unwrap_or("");
    if path.is_empty() || path == ":memory:" {
        warn!(
            "encryption.keys is unset: signing secrets are sealed with a key that lives only as long as this process"
        );
        return Ok(
            secrets::Keyring::parse(&secrets::Keyring::generate_entry("ephemeral"))
                .expect("a generated entry parses"),
        );
    }
    let dir = std::path::Path::new(path)
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    let file = dir.join("uploadhook.master-key");
    let spec = match std::fs::read_to_string(&file) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            let entry = secrets::Keyring::generate_entry("local");
            write_private(&file, &entry)
                .with_context(|| format!("writing the generated master key {}", file.display()))?;
            entry
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", file.display())),
    };
    warn!(
        file = %file.display(),
        "encryption.keys is unset: signing secrets are sealed with the generated key in this file \
         (development only; losing it makes stored secrets unreadable)"
    );
    secrets::Keyring::parse(&spec).with_context(|| format!("master key file {}", file.display()))
}

/// Creates `file` readable by its owner only, failing if it exists.
fn write_private(file: &std::path::Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    opts.open(file)?.write_all(contents.as_bytes())
}

/// The pool, with `min_connections` of it opened before this returns (a
/// serving process passes `database.pool_min()`; a CLI command, which
/// makes a few statements, 0).
async fn open_db(
    cfg: &Config,
    min_connections: u32,
) -> anyhow::Result<sea_orm::DatabaseConnection> {
    let url = cfg.database.url.expose_secret();
    if let Some(path) = url.strip_prefix("sqlite://") {
        let path = path.split('?').next().unwrap_or("");
        if let Some(dir) = std::path::Path::new(path).parent()
            && !dir.as_os_str().is_empty()
        {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
    }
    store::connect_pool(url, cfg.database.pool_size(), min_connections)
        .await
        .with_context(|| {
            if min_connections > 1 {
                format!(
                    "connecting to the database (database.url) and opening {min_connections} \
                     connections (database.min_connections)"
                )
            } else {
                "connecting to the database (database.url)".to_string()
            }
        })
}

/// The queue and the reconciler's lease for the configured backend.
async fn open_queue(
    cfg: &Config,
    redis: Option<RedisTarget>,
    clock: Arc<dyn Clock>,
) -> anyhow::Result<(Arc<dyn Queue>, Arc<dyn Leader>)> {
    Ok(match redis {
        None => (Arc::new(MemoryQueue::new(clock)), Arc::new(Alone)),
        Some(target) => {
            // Connected on first use and retried while Redis is down, so
            // that the API answers (and records Confirms) without it.
            let queue = LazyRedisQueue::new(
                target.clone(),
                RedisQueueConfig {
                    prefix: cfg.queue.prefix.clone(),
                    visibility_timeout: cfg.queue.visibility_timeout,
                    max_deliveries: cfg.queue.max_deliveries,
                    ..RedisQueueConfig::default()
                },
                clock,
            );
            // Start connecting now; work waits in the database meanwhile.
            let _ = queue.get();
            let leader = LazyRedisLeader::new(target, &cfg.queue.prefix);
            (Arc::new(queue), Arc::new(leader))
        }
    })
}

/// The OpenAPI 3 document of the REST API, generated from the descriptors
/// (served at `GET /openapi.json`; `uploadhook openapi` prints it; checked
/// in as `docs/openapi.json`).
pub fn openapi_json() -> anyhow::Result<String> {
    let gateway = Gateway::from_descriptors(proto::FILE_DESCRIPTOR_SET, proto::SERVICE_NAME)
        .context("building the REST gateway")?;
    let doc = gateway.openapi("uploadhook", "v1");
    Ok(serde_json::to_string_pretty(&doc)? + "\n")
}

/// Refuses roles that the configuration cannot serve.
pub fn check_roles(cfg: &Config, roles: Roles) -> anyhow::Result<()> {
    if cfg.queue.backend == QueueBackend::Memory && roles != Roles::ALL {
        anyhow::bail!(
            "config key `queue.backend`: \"memory\" keeps the queue inside one process; \
             run `uploadhook serve`, or set queue.backend = \"redis\" to run api and worker apart"
        );
    }
    Ok(())
}

/// Starts the parts of `roles` on the given listeners and returns at once.
pub async fn start(
    cfg: Config,
    listeners: Listeners,
    clock: Arc<dyn Clock>,
    roles: Roles,
) -> anyhow::Result<Running> {
    check_roles(&cfg, roles)?;
    if roles.api != listeners.grpc.is_some() {
        anyhow::bail!("a gRPC listener is needed exactly when the process runs the API");
    }
    let shutdown = CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();

    // Read before anything else: a bad URL or TLS file stops the start.
    let redis = match cfg.queue.backend {
        QueueBackend::Memory => None,
        QueueBackend::Redis => Some(RedisTarget::from_config(&cfg.queue)?),
    };
    let keyring = Arc::new(master_keyring(&cfg)?);
    // TLS files first: a wrong path fails the start before anything runs.
    let tls = tls::Tls::load(&cfg.server.tls)?;
    let db = open_db(&cfg, cfg.database.pool_min()).await?;
    if cfg.database.migrate_on_start {
        store::migrate(&db).await.context("applying migrations")?;
    }
    // Streams are woken by this process's events; with Redis, also by
    // every other process's (workers commit most events). A worker-only
    // process serves no stream: it publishes and does not subscribe.
    let bus: Arc<dyn EventBus> = match &redis {
        None => Arc::new(LocalEventBus::new(1024)),
        Some(target) if roles.api => {
            RedisEventBus::start(target.clone(), &cfg.queue.prefix, 1024, shutdown.clone())?
        }
        Some(target) => {
            RedisEventBus::publisher(target.clone(), &cfg.queue.prefix, 1024, shutdown.clone())
        }
    };
    let store = Store::new(db, bus, keyring.clone());
    // A secret sealed under a key that is not configured could never sign:
    // refuse to start rather than fail every delivery.
    let missing: Vec<String> = store
        .master_key_ids_in_use()
        .await
        .context("reading which master keys seal stored secrets")?
        .into_iter()
        .filter(|id| !keyring.contains(id))
        .collect();
    if !missing.is_empty() {
        anyhow::bail!(
            "config key `encryption.keys`: stored signing secrets are sealed with master key(s) {} \
             that are not configured; add them back after the active key (then run `uploadhook \
             keys rotate-master` before removing them)",
            missing.join(", ")
        );
    }

    let mut bootstrap_key = None;
    if roles.api && !cfg.bootstrap.dev_tenant.is_empty() && store.tenant_count().await? == 0 {
        let key = store
            .create_api_key(&cfg.bootstrap.dev_tenant, clock.now())
            .await?;
        // Printed, not logged: shown once, on first start only.
        println!(
            "Created development tenant `{}` with API key (shown once, store it now):\n\n    {}\n",
            cfg.bootstrap.dev_tenant, key.plaintext
        );
        bootstrap_key = Some(key.plaintext);
    }

    // Mutual TLS: the tenants that client certificates stand for.
    let mut client_tenants = tls::ClientTenants::default();
    if roles.api && !cfg.server.tls.client_tenants.is_empty() {
        let mut ids = Vec::new();
        for entry in &cfg.server.tls.client_tenants {
            ids.push(
                store
                    .ensure_tenant(entry.tenant.trim(), clock.now())
                    .await?,
            );
        }
        client_tenants = tls::ClientTenants::new(&cfg.server.tls.client_tenants, ids);
    }

    let mut s3_endpoint = None;
    if let Some(listener) = listeners.s3 {
        let token = shutdown.clone();
        let s3 = storage::embedded::start(&cfg.embedded_s3, listener, async move {
            token.cancelled().await
        })
        .await
        .context("starting the embedded S3 server")?;
        s3_endpoint = Some(s3.endpoint().to_string());
        tasks.spawn(async move {
            if let Err(e) = s3.wait().await {
                warn!(error = %e, "embedded S3 server stopped");
            }
        });
    } else if cfg.storage.is_empty() {
        anyhow::bail!(
            "config key `storage`: this process needs a [storage.<name>] connection \
             (the embedded S3 server runs only with `serve` or `api`)"
        );
    }
    let storages = Arc::new(
        Storages::from_config(&cfg, s3_endpoint.as_deref()).context("storage connections")?,
    );
    let (queue, leader) = open_queue(&cfg, redis, clock.clone()).await?;

    let allow = cfg.delivery_allow_list();
    if cfg.dev_loopback_allowed() {
        warn!(
            "webhooks may target loopback (127.0.0.1, ::1) because the embedded S3 server runs \
             and delivery.allow_cidrs is unset; this is for development only"
        );
    } else if !allow.is_empty() {
        info!(%allow, "webhooks may target these private networks (delivery.allow_cidrs)");
    }
    // The process's one writer of status changes in groups: the worker's
    // jobs and the API's Confirms write through it together.
    let writes = WriteBatcher::start(
        store.clone(),
        cfg.worker.write_batch_max,
        // Each group in flight holds a connection of the pool: at most half
        // of it, so that reads and the API's other calls always find one.
        // (Writers keep theirs between groups only from a pool of more
        // than twice their number: see `store::batch::Held`.)
        cfg.worker
            .write_concurrency
            .min((cfg.database.pool_size() as usize / 2).max(1)),
        cfg.worker.write_linger,
    );
    if roles.worker {
        let longest = pipeline::longest_job(cfg.delivery.timeout);
        if cfg.queue.backend == QueueBackend::Redis && cfg.queue.visibility_timeout < longest {
            warn!(
                visibility_timeout = ?cfg.queue.visibility_timeout,
                longest_job = ?longest,
                "queue.visibility_timeout is shorter than the longest a job may run (its HEAD, \
                 its wait for room at the receiver's host, twice delivery.timeout): a slow job \
                 may be taken over by another worker and its webhook sent twice"
            );
        }
        let delivery = DeliveryClient::new(&cfg.delivery, allow.clone())
            .context("building the delivery HTTP client")?;
        let pipeline = Arc::new(Pipeline::new(
            &cfg,
            writes.clone(),
            queue.clone(),
            storages.clone(),
            delivery,
            clock.clone(),
            leader,
        ));
        // The in-process queue starts empty: rebuild it from the database.
        // A Redis queue outlives the process; what it lost is put back by
        // the reconciler (which runs at once, then every reconcile_every).
        if cfg.queue.backend == QueueBackend::Memory {
            let recovered = pipeline
                .recover()
                .await
                .context("rebuilding the queue from the database")?;
            if recovered > 0 {
                info!(recovered, "re-queued webhooks from the database");
            }
        }
        tasks.spawn(pipeline.run(shutdown.clone(), cfg.server.shutdown_grace));
        if cfg.r2_events.enabled {
            let storage = storages
                .resolve(&cfg.r2_events.storage)
                .map_err(|e| anyhow::anyhow!("config key `r2_events.storage`: {}", e.message()))?;
            let consumer = pipeline::r2_events::R2Consumer {
                cfg: cfg.r2_events.clone(),
                http: reqwest::Client::builder()
                    .redirect(reqwest::redirect::Policy::none())
                    .timeout(std::time::Duration::from_secs(30))
                    .build()
                    .context("building the R2 events HTTP client")?,
                store: store.clone(),
                queue: queue.clone(),
                storage,
                clock: clock.clone(),
            };
            info!(queue = %cfg.r2_events.queue_id, "pulling R2 event notifications");
            tasks.spawn(consumer.run(shutdown.clone()));
        }
    }

    let health = health::Health::new(store.clone(), queue.clone(), roles);
    let mut http = health.clone().router();

    let mut grpc_addr = None;
    if let Some(grpc_listener) = listeners.grpc {
        let (events_queue, events_storages, events_clock) =
            (queue.clone(), storages.clone(), clock.clone());
        let api = Arc::new(WebhookApi {
            store: store.clone(),
            writes: writes.clone(),
            storages: storages.clone(),
            queue,
            clock,
            limits: cfg.webhooks.clone(),
            allow: Arc::new(allow),
            detect: cfg.detect.clone(),
            rate_limit: (cfg.api.rate_limit_per_second > 0.0).then(|| {
                api::ratelimit::RateLimiter::new(
                    cfg.api.rate_limit_per_second,
                    cfg.api.rate_limit_burst,
                    cfg.api.rate_limit_tenants,
                )
            }),
            auth_failures: api::audit::AuthFailures::new(AUTH_FAILURE_WINDOW),
            client_tenants,
            require_client_cert: tls
                .as_ref()
                .is_some_and(|t| t.client_auth() == config::ClientAuth::Required),
            key_cache: api::keycache::KeyCache::new(cfg.api.key_cache_ttl),
        });
        // Summarise bursts of authentication failures once per window.
        let flusher = api.clone();
        let token = shutdown.clone();
        tasks.spawn(async move {
            let mut tick = tokio::time::interval(AUTH_FAILURE_WINDOW);
            loop {
                tokio::select! {
                    _ = token.cancelled() => break,
                    _ = tick.tick() => {
                        if let Some(report) = flusher.auth_failures.flush(std::time::Instant::now()) {
                            api::audit::AuthFailures::log(report);
                        }
                    }
                }
            }
        });
        let streams = Streams::new(
            cfg.streams.stream(),
            cfg.streams.max_streams,
            shutdown.clone(),
        );
        let grpc_service = api::admission::Admission::new(
            WebhookServiceServer::new(GrpcApi::new(api, streams))
                .max_decoding_message_size(cfg.api.max_request_bytes),
            cfg.api.max_in_flight,
        );

        // gRPC: the service, health and reflection.
        let (health_reporter, health_service) = tonic_health::server::health_reporter();
        tasks.spawn(
            health
                .grpc_reporter(
                    health_reporter,
                    proto::SERVICE_NAME,
                    std::time::Duration::from_secs(5),
                    shutdown.clone(),
                )
                .await,
        );
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .build_v1()
            .context("building gRPC reflection")?;
        grpc_addr = Some(grpc_listener.local_addr()?);
        let methods = metrics::served_methods();
        let grpc_router = tonic::transport::Server::builder()
            .layer(metrics::RpcMetricsLayer::new("grpc", methods.clone()))
            .add_service(health_service)
            .add_service(reflection)
            .add_service(grpc_service.clone());
        let token = shutdown.clone();
        let stopped = async move { token.cancelled().await };
        // One server either way; only the connections differ.
        let server: std::pin::Pin<Box<dyn Future<Output = Result<(), _>> + Send>> = match &tls {
            Some(tls) => {
                let incoming = tls
                    .incoming(grpc_listener, tls::Listener::Grpc, shutdown.clone())?
                    .into_stream();
                Box::pin(grpc_router.serve_with_incoming_shutdown(incoming, stopped))
            }
            None => Box::pin(grpc_router.serve_with_incoming_shutdown(
                tokio_stream::StreamExt::map(
                    tokio_stream::wrappers::TcpListenerStream::new(grpc_listener),
                    // Responses go out at once (no Nagle delay behind the
                    // client's delayed ACK: 40 ms per call otherwise).
                    |conn| {
                        conn.inspect(|tcp| {
                            let _ = tcp.set_nodelay(true);
                        })
                    },
                ),
                stopped,
            )),
        };
        tasks.spawn(async move {
            if let Err(e) = server.await {
                warn!(error = %e, "gRPC server stopped");
            }
        });

        let gateway = Arc::new(
            Gateway::from_descriptors(proto::FILE_DESCRIPTOR_SET, proto::SERVICE_NAME)
                .and_then(|g| {
                    g.with_sse(
                        "StreamEvents",
                        SseBinding {
                            id: "event.event_id",
                            comment: "heartbeat",
                            last_event_id: "after_event_id",
                        },
                    )
                })
                .context("building the REST gateway")?
                .with_max_request_bytes(cfg.api.max_request_bytes),
        );
        let grpc_service = tower::Layer::layer(
            &metrics::RpcMetricsLayer::new("http", methods),
            grpc_service,
        );
        let openapi = openapi_json()?;
        http = http
            .route(
                "/openapi.json",
                axum::routing::get(move || async move {
                    ([(http::header::CONTENT_TYPE, "application/json")], openapi)
                }),
            )
            .merge(api::gateway::router(gateway, grpc_service));
        if !cfg.events.token.expose_secret().is_empty() {
            http = http.merge(api::storage_events::router(
                api::storage_events::StorageEvents {
                    store: store.clone(),
                    queue: events_queue,
                    storages: events_storages,
                    clock: events_clock,
                    token: cfg.events.token.clone(),
                    sns_hosts: cfg.events.sns_subscribe_hosts.clone(),
                    http: api::storage_events::StorageEvents::client()
                        .context("building the SNS confirmation HTTP client")?,
                },
            ));
        }
    }

    let http_addr = listeners.http.local_addr()?;
    let token = shutdown.clone();
    let http_listener = listeners.http;
    let stopped = async move { token.cancelled().await };
    let server: std::pin::Pin<Box<dyn Future<Output = std::io::Result<()>> + Send>> = match &tls {
        Some(tls) => {
            let incoming = tls.incoming(http_listener, tls::Listener::Http, shutdown.clone())?;
            let http = http.into_make_service_with_connect_info::<tls::PeerInfo>();
            tasks.spawn(
                tls.clone()
                    .watch(cfg.server.tls.reload_every, shutdown.clone()),
            );
            Box::pin(
                axum::serve(incoming, http)
                    .with_graceful_shutdown(stopped)
                    .into_future(),
            )
        }
        None => Box::pin(
            axum::serve(
                axum::serve::ListenerExt::tap_io(http_listener, |tcp| {
                    let _ = tcp.set_nodelay(true);
                }),
                http,
            )
            .with_graceful_shutdown(stopped)
            .into_future(),
        ),
    };
    tasks.spawn(async move {
        if let Err(e) = server.await {
            warn!(error = %e, "HTTP server stopped");
        }
    });

    info!(?grpc_addr, %http_addr, api = roles.api, worker = roles.worker, "uploadhook running");
    Ok(Running {
        grpc_addr,
        http_addr,
        s3_endpoint,
        bootstrap_key,
        store,
        storages,
        shutdown,
        tasks,
    })
}

/// Starts, then runs until SIGTERM or SIGINT.
pub async fn serve(cfg: Config, roles: Roles) -> anyhow::Result<()> {
    check_roles(&cfg, roles)?;
    let listeners = Listeners::bind(&cfg, roles).await?;
    let running = start(cfg, listeners, Arc::new(SystemClock), roles).await?;
    let token = running.shutdown_token();
    tokio::spawn(async move {
        shutdown_signal().await;
        info!("shutdown requested; finishing work in flight");
        token.cancel();
    });
    running.wait().await;
    info!("stopped");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing the SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
