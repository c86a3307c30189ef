//! Starts the real service in-process on port 0, with a fresh database per
//! test (a SQLite file, or a new PostgreSQL database), the embedded S3
//! server over real HTTP, and real HTTP receivers on 127.0.0.1.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    Router, body::Bytes, extract::State, http::HeaderMap, response::IntoResponse, routing::post,
};
use sea_orm::{ConnectionTrait, Database};
use tokio::{net::TcpListener, sync::Notify};
use tonic::{Request, metadata::MetadataValue, transport::Channel};
use uploadhook::{
    Listeners, Running,
    clock::{Clock, SystemClock},
    config::Config,
    proto::{self, webhook_service_client::WebhookServiceClient},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
    /// PostgreSQL and the Redis Streams queue.
    PostgresRedis,
}

/// A database for one test; PostgreSQL databases are dropped at the end.
pub struct TestDb {
    pub url: String,
    /// Config layer selecting the queue (empty: in-process).
    pub queue_toml: String,
    redis: Option<(String, String)>,
    drop_sql: Option<(String, String)>,
    _dir: Option<tempfile::TempDir>,
}

impl TestDb {
    /// The pool size line of the `[database]` section: SQLite keeps the
    /// default (one connection, as users run it); each PostgreSQL test
    /// takes 5, so that parallel tests stay within the server's limit.
    pub fn pool_toml(&self) -> &'static str {
        if self.url.starts_with("sqlite:") {
            ""
        } else {
            "max_connections = 5\n"
        }
    }

    /// None when the backend is not configured and not required.
    pub async fn new(backend: Backend) -> Option<TestDb> {
        match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().unwrap();
                let url = format!("sqlite://{}?mode=rwc", dir.path().join("test.db").display());
                Some(TestDb {
                    url,
                    queue_toml: String::new(),
                    redis: None,
                    drop_sql: None,
                    _dir: Some(dir),
                })
            }
            Backend::Postgres | Backend::PostgresRedis => {
                let redis = if backend == Backend::PostgresRedis {
                    let url = required_env("UPLOADHOOK_TEST_REDIS_URL")?;
                    Some((url, format!("uh-test-{}", uuid::Uuid::new_v4().simple())))
                } else {
                    None
                };
                let admin = required_env("UPLOADHOOK_TEST_DATABASE_URL")?;
                let name = format!("uh_test_{}", uuid::Uuid::new_v4().simple());
                let conn = Database::connect(&admin)
                    .await
                    .unwrap_or_else(|e| panic!("connecting to UPLOADHOOK_TEST_DATABASE_URL: {e}"));
                conn.execute_unprepared(&format!("CREATE DATABASE {name}"))
                    .await
                    .unwrap();
                conn.close().await.ok();
                let (base, query) = match admin.split_once('?') {
                    Some((b, q)) => (b.to_string(), format!("?{q}")),
                    None => (admin.clone(), String::new()),
                };
                let base = base
                    .rsplit_once('/')
                    .map(|(b, _)| b.to_string())
                    .unwrap_or(base);
                let queue_toml = match &redis {
                    Some((url, prefix)) => format!(
                        "[queue]\nbackend = \"redis\"\nredis_url = \"{url}\"\nprefix = \"{prefix}\"\n\
                         visibility_timeout = \"6s\"\nreconcile_every = \"300ms\"\n"
                    ),
                    None => String::new(),
                };
                Some(TestDb {
                    queue_toml,
                    redis,
                    url: format!("{base}/{name}{query}"),
                    drop_sql: Some((
                        admin,
                        format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
                    )),
                    _dir: None,
                })
            }
        }
    }

    /// Deletes every Redis key of this test's queue (a Redis that lost its
    /// data); nothing for the in-process queue.
    pub async fn flush_queue(&self) {
        if let Some((url, prefix)) = &self.redis {
            let client = redis::Client::open(url.as_str()).unwrap();
            let mut conn = client.get_multiplexed_async_connection().await.unwrap();
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg(format!("{{{prefix}:*"))
                .query_async(&mut conn)
                .await
                .unwrap();
            if !keys.is_empty() {
                let _: () = redis::cmd("DEL")
                    .arg(keys)
                    .query_async(&mut conn)
                    .await
                    .unwrap();
            }
        }
    }

    pub async fn cleanup(&self) {
        if let Some((url, prefix)) = &self.redis
            && let Ok(client) = redis::Client::open(url.as_str())
            && let Ok(mut conn) = client.get_multiplexed_async_connection().await
        {
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg(format!("{{{prefix}:*"))
                .query_async(&mut conn)
                .await
                .unwrap_or_default();
            if !keys.is_empty() {
                let _: Result<(), _> = redis::cmd("DEL").arg(keys).query_async(&mut conn).await;
            }
        }
        if let Some((admin, sql)) = &self.drop_sql
            && let Ok(conn) = Database::connect(admin).await
        {
            let _ = conn.execute_unprepared(sql).await;
            let _ = conn.close().await;
        }
    }
}

/// A service's URL from the environment; None (skip) when unset, a panic
/// when UPLOADHOOK_REQUIRE_SERVICES=1.
pub fn required_env(name: &str) -> Option<String> {
    match std::env::var(name) {
        Ok(v) => Some(v),
        Err(_) if std::env::var("UPLOADHOOK_REQUIRE_SERVICES").as_deref() == Ok("1") => {
            panic!("UPLOADHOOK_REQUIRE_SERVICES=1 but {name} is not set")
        }
        Err(_) => {
            eprintln!("skipping: {name} is not set");
            None
        }
    }
}

/// The service under test, with two tenants' keys.
pub struct TestApp {
    pub running: Option<Running>,
    pub key_a: String,
    pub key_b: String,
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub s3_root: Arc<tempfile::TempDir>,
    /// The configuration it runs with (for operator commands in tests).
    pub config: Config,
}

pub const FAST: &str = r#"
[delivery]
retry_schedule = ["100ms", "200ms"]
jitter = 0.0
timeout = "5s"
min_retry_after = "10ms"
allow_cidrs = ["127.0.0.1/32"]
[verify]
missing_retry_delays = ["50ms", "100ms"]
[bootstrap]
dev_tenant = ""
[server]
shutdown_grace = "2s"
[api]
# Off: tests poll GetStatus quickly; the rate-limit tests turn it on.
rate_limit_per_second = 0.0
[encryption]
keys = "test:dGVzdC1tYXN0ZXIta2V5LW9mLTMyLWJ5dGVzLi4uLi4="
"#;

impl TestApp {
    pub async fn start(db: &TestDb, extra: &str) -> TestApp {
        Self::start_with(db, extra, Arc::new(SystemClock), None).await
    }

    pub async fn start_with(
        db: &TestDb,
        extra: &str,
        clock: Arc<dyn Clock>,
        s3_root: Option<Arc<tempfile::TempDir>>,
    ) -> TestApp {
        let s3_root = s3_root.unwrap_or_else(|| Arc::new(tempfile::tempdir().unwrap()));
        let local = format!(
            "[database]\nurl = \"{}\"\n{}[embedded_s3]\nroot = \"{}\"\n",
            db.url,
            db.pool_toml(),
            s3_root.path().display()
        );
        let config = Config::from_toml_layers(&[FAST, &local, &db.queue_toml, extra]).unwrap();
        let listeners = Listeners {
            grpc: Some(TcpListener::bind("127.0.0.1:0").await.unwrap()),
            http: TcpListener::bind("127.0.0.1:0").await.unwrap(),
            s3: Some(TcpListener::bind("127.0.0.1:0").await.unwrap()),
        };
        let running = uploadhook::start(
            config.clone(),
            listeners,
            clock.clone(),
            uploadhook::Roles::ALL,
        )
        .await
        .unwrap();
        let now = clock.now();
        let key_a = running
            .store
            .create_api_key("tenant-a", now)
            .await
            .unwrap()
            .plaintext;
        let key_b = running
            .store
            .create_api_key("tenant-b", now)
            .await
            .unwrap()
            .plaintext;
        TestApp {
            grpc_addr: running.grpc_addr.unwrap(),
            http_addr: running.http_addr,
            running: Some(running),
            key_a,
            key_b,
            s3_root,
            config,
        }
    }

    pub async fn stop(&mut self) {
        if let Some(r) = self.running.take() {
            r.stop().await;
        }
    }

    pub async fn client(&self) -> WebhookServiceClient<Channel> {
        WebhookServiceClient::connect(format!("http://{}", self.grpc_addr))
            .await
            .unwrap()
    }

    pub fn store(&self) -> &uploadhook::store::Store {
        &self.running.as_ref().unwrap().store
    }

    /// HEAD requests sent to the embedded S3 server so far.
    pub fn heads(&self) -> u64 {
        let r = self.running.as_ref().unwrap();
        r.storages.resolve("").unwrap().heads_sent()
    }

    pub fn http_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.http_addr)
    }
}

pub fn authed<T>(key: &str, msg: T) -> Request<T> {
    let mut req = Request::new(msg);
    req.metadata_mut().insert(
        "authorization",
        MetadataValue::try_from(format!("Bearer {key}")).unwrap(),
    );
    req
}

/// Confirm of `id`, with no ETag to check.
pub fn confirm_request(id: &str) -> proto::ConfirmRequest {
    proto::ConfirmRequest {
        webhook_id: id.to_string(),
        etag: String::new(),
    }
}

pub fn create_request(url: &str, filename: &str) -> proto::CreateUploadWebhookRequest {
    proto::CreateUploadWebhookRequest {
        filename: filename.into(),
        content_type: "text/plain".into(),
        webhook: Some(proto::WebhookTarget {
            url: url.into(),
            metadata: [("user".to_string(), "42".to_string())].into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// PUTs `body` to a presigned URL with exactly the headers it lists.
pub async fn upload(resp: &proto::CreateUploadWebhookResponse, body: &[u8]) -> reqwest::Response {
    let client = reqwest::Client::new();
    let mut req = client.put(&resp.upload_url).body(body.to_vec());
    for (k, v) in &resp.upload_headers {
        req = req.header(k, v);
    }
    let r = req.send().await.unwrap();
    assert!(
        r.status().is_success(),
        "upload failed: {} {}",
        r.status(),
        r.text().await.unwrap_or_default()
    );
    r
}

/// Creates a webhook of tenant A for `url`, uploads the object and
/// confirms it; its id.
/// Creates a webhook and uploads its object; its id.
pub async fn create_uploaded(app: &TestApp, url: &str, filename: &str) -> String {
    let created = app
        .client()
        .await
        .create_upload_webhook(authed(&app.key_a, create_request(url, filename)))
        .await
        .unwrap()
        .into_inner();
    upload(&created, b"hello").await;
    created.webhook.unwrap().id
}

pub async fn create_confirmed(app: &TestApp, url: &str, filename: &str) -> String {
    let id = create_uploaded(app, url, filename).await;
    app.client()
        .await
        .confirm(authed(&app.key_a, confirm_request(&id)))
        .await
        .unwrap();
    id
}

pub async fn get(app: &TestApp, key: &str, id: &str) -> proto::Webhook {
    app.client()
        .await
        .get_status(authed(
            key,
            proto::GetStatusRequest {
                webhook_id: id.into(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .webhook
        .unwrap()
}

/// Polls GetStatus until the webhook reaches `status` (bounded: a hang
/// fails the test instead of blocking CI).
pub async fn wait_for(app: &TestApp, key: &str, id: &str, status: proto::Status) -> proto::Webhook {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let w = get(app, key, id).await;
        if w.status == status as i32 {
            return w;
        }
        if tokio::time::Instant::now() > deadline {
            panic!(
                "webhook {id} stuck in {:?}, wanted {status:?}: {w:?}",
                w.status()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One request the receiver got.
#[derive(Debug, Clone)]
pub struct Received {
    pub headers: HashMap<String, String>,
    pub body: Bytes,
}

#[derive(Default)]
struct ReceiverState {
    got: Mutex<Vec<Received>>,
    /// Status codes to answer, in order; 200 once exhausted.
    plan: Mutex<Vec<u16>>,
    /// Answer this status always (overrides the plan).
    always: Mutex<Option<u16>>,
    /// Hold the next request this long before answering.
    hold_next: Mutex<Option<Duration>>,
    /// Hold every request this long before answering (`hold_next` wins).
    hold_every: Mutex<Option<Duration>>,
    notify: Notify,
    /// Requests being answered now, and the most ever at once.
    in_flight: std::sync::atomic::AtomicUsize,
    max_in_flight: std::sync::atomic::AtomicUsize,
}

/// A real HTTP webhook receiver on 127.0.0.1.
#[derive(Clone)]
pub struct Receiver {
    pub url: String,
    state: Arc<ReceiverState>,
}

async fn receive(
    State(s): State<Arc<ReceiverState>>,
    headers: HeaderMap,
    body: Bytes,
) -> impl IntoResponse {
    let headers = headers
        .iter()
        .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or("").to_string()))
        .collect();
    use std::sync::atomic::Ordering::SeqCst;
    let now = s.in_flight.fetch_add(1, SeqCst) + 1;
    s.max_in_flight.fetch_max(now, SeqCst);
    s.got.lock().unwrap().push(Received { headers, body });
    s.notify.notify_waiters();
    let hold = s
        .hold_next
        .lock()
        .unwrap()
        .take()
        .or(*s.hold_every.lock().unwrap());
    if let Some(d) = hold {
        tokio::time::sleep(d).await;
    }
    s.in_flight.fetch_sub(1, SeqCst);
    let status = match *s.always.lock().unwrap() {
        Some(code) => code,
        None => {
            let mut plan = s.plan.lock().unwrap();
            if plan.is_empty() { 200 } else { plan.remove(0) }
        }
    };
    (
        axum::http::StatusCode::from_u16(status).unwrap(),
        "receiver says hi",
    )
}

impl Receiver {
    pub async fn start() -> Receiver {
        Self::start_on(TcpListener::bind("127.0.0.1:0").await.unwrap()).await
    }

    pub async fn start_on(listener: TcpListener) -> Receiver {
        let state = Arc::new(ReceiverState::default());
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let app = Router::new()
            .route("/hook", post(receive))
            .with_state(state.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.ok() });
        Receiver { url, state }
    }

    pub fn answer(&self, plan: &[u16]) {
        *self.state.plan.lock().unwrap() = plan.to_vec();
    }

    pub fn always(&self, status: Option<u16>) {
        *self.state.always.lock().unwrap() = status;
    }

    pub fn hold_next(&self, d: Duration) {
        *self.state.hold_next.lock().unwrap() = Some(d);
    }

    /// Answers every request only after `d` (a slow receiver).
    pub fn hold_every(&self, d: Duration) {
        *self.state.hold_every.lock().unwrap() = Some(d);
    }

    pub fn received(&self) -> Vec<Received> {
        self.state.got.lock().unwrap().clone()
    }

    /// Requests this receiver is answering now.
    pub fn in_flight(&self) -> usize {
        self.state
            .in_flight
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The most requests this receiver was answering at once.
    pub fn max_in_flight(&self) -> usize {
        self.state
            .max_in_flight
            .load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Runs a test body against each backend, skipping PostgreSQL when it is
/// not configured (and failing when UPLOADHOOK_REQUIRE_SERVICES=1).
#[macro_export]
macro_rules! backend_tests {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let db = $crate::helpers::TestDb::new($crate::helpers::Backend::Sqlite).await.unwrap();
                    super::$name(&db).await;
                    db.cleanup().await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let Some(db) = $crate::helpers::TestDb::new($crate::helpers::Backend::Postgres).await else { return };
                    super::$name(&db).await;
                    db.cleanup().await;
                }
            )*
        }
        mod postgres_redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let Some(db) = $crate::helpers::TestDb::new($crate::helpers::Backend::PostgresRedis).await else { return };
                    super::$name(&db).await;
                    db.cleanup().await;
                }
            )*
        }
    };
}

/// An S3-compatible server of the test's own, for processes that run apart
/// (an `api` and `worker`s), all configured with it as `[storage.main]`.
pub struct SharedS3 {
    pub toml: String,
    _dir: tempfile::TempDir,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl SharedS3 {
    pub async fn start() -> SharedS3 {
        let dir = tempfile::tempdir().unwrap();
        let cfg = Config::from_toml(&format!(
            "[embedded_s3]\nroot = \"{}\"\n",
            dir.path().display()
        ))
        .unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let s3 = uploadhook::storage::embedded::start(&cfg.embedded_s3, listener, async move {
            let _ = rx.await;
        })
        .await
        .unwrap();
        let toml = format!(
            "[embedded_s3]\nmode = \"off\"\n[storage.main]\nkind = \"s3-compatible\"\nbucket = \"{}\"\n\
             endpoint = \"{}\"\npath_style = true\naccess_key_id = \"{}\"\nsecret_access_key = \"uploadhook-dev-secret\"\n",
            cfg.embedded_s3.bucket,
            s3.endpoint(),
            cfg.embedded_s3.access_key,
        );
        tokio::spawn(async move { s3.wait().await.ok() });
        SharedS3 {
            toml,
            _dir: dir,
            _stop: tx,
        }
    }
}

/// One process of a scaled-out deployment, started in-process.
pub async fn start_process(
    db: &TestDb,
    layers: &[&str],
    roles: uploadhook::Roles,
    clock: Arc<dyn Clock>,
) -> Running {
    let local = format!("[database]\nurl = \"{}\"\n{}", db.url, db.pool_toml());
    let mut all = vec![FAST, local.as_str(), db.queue_toml.as_str()];
    all.extend_from_slice(layers);
    let config = Config::from_toml_layers(&all).unwrap();
    let listeners = Listeners {
        grpc: roles
            .api
            .then_some(TcpListener::bind("127.0.0.1:0").await.unwrap()),
        http: TcpListener::bind("127.0.0.1:0").await.unwrap(),
        s3: None,
    };
    uploadhook::start(config, listeners, clock, roles)
        .await
        .unwrap()
}

/// Forwards loopback TCP connections to `upstream`; `cut` drops every
/// open connection (as a network failure would) and keeps accepting.
pub struct CuttableProxy {
    down: Arc<std::sync::atomic::AtomicBool>,
    pub addr: std::net::SocketAddr,
    conns: Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl CuttableProxy {
    pub async fn start(upstream: std::net::SocketAddr) -> CuttableProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let conns: Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
        let list = conns.clone();
        let is_down: Arc<std::sync::atomic::AtomicBool> = Arc::default();
        let refusing = is_down.clone();
        tokio::spawn(async move {
            while let Ok((down, _)) = listener.accept().await {
                if refusing.load(std::sync::atomic::Ordering::SeqCst) {
                    // Down: the connection is closed at once.
                    continue;
                }
                let Ok(up) = tokio::net::TcpStream::connect(upstream).await else {
                    continue;
                };
                let (down, up) = (Arc::new(down), Arc::new(up));
                let task = tokio::spawn(async move {
                    tokio::select! {
                        _ = pump(&down, &up) => {}
                        _ = pump(&up, &down) => {}
                    }
                });
                list.lock().unwrap().push(task);
            }
        });
        CuttableProxy {
            down: is_down,
            addr,
            conns,
        }
    }

    /// Down: open connections are cut and new ones closed at once, as
    /// when the upstream is unreachable. Up: forwarding again.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, std::sync::atomic::Ordering::SeqCst);
        if down {
            self.cut();
        }
    }

    pub fn cut(&self) {
        for task in self.conns.lock().unwrap().drain(..) {
            task.abort();
        }
    }
}

async fn pump(from: &tokio::net::TcpStream, to: &tokio::net::TcpStream) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if from.readable().await.is_err() {
            return;
        }
        let n = match from.try_read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(_) => return,
        };
        let mut sent = 0;
        while sent < n {
            if to.writable().await.is_err() {
                return;
            }
            match to.try_write(&buf[sent..n]) {
                Ok(k) => sent += k,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => return,
            }
        }
    }
}

/// A port that was free a moment ago (bound on port 0, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
