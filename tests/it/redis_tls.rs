//! `rediss://`: the queue, the event bus and the reconciler's lease over
//! TLS, against a real `redis-server` of the test's own that speaks TLS
//! only (`--port 0 --tls-port …`), with CAs and certificates the test makes
//! (rcgen): a private CA trusted through `queue.redis_ca_file`; a server
//! certificate of another CA, or for another name, refused; mutual TLS
//! (`--tls-auth-clients yes`) with and without a client certificate.
//!
//! Skipped when `redis-server` is not installed, unless
//! UPLOADHOOK_REQUIRE_SERVICES=1; the flow through the service also needs
//! UPLOADHOOK_TEST_DATABASE_URL. Every redis-server is killed when its
//! guard drops, and every wait has a deadline.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use uploadhook::{
    clock::SystemClock,
    config::Config,
    domain::{Status, TenantId, WebhookId},
    events::{Event, EventBus, redis::RedisEventBus},
    pipeline::{
        leader::{Leader, RedisLeader},
        queue::{Job, JobKind, Priority, Queue},
        redis_conn::{RedisTarget, Timeouts},
        redis_queue::{RedisQueue, RedisQueueConfig},
    },
    proto,
};

use crate::{
    flow::{confirm, create_and_upload},
    helpers::{Backend, FAST, Receiver, TestApp, TestDb, free_port, wait_for},
    test_pki::{TestCa, write_pem},
};

/// Long enough for any step here; a hang fails instead of blocking CI.
const WITHIN: Duration = Duration::from_secs(20);

/// The PEM files of one test: the CA the client trusts and what it signed,
/// and a CA it does not trust with what that one signed.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new("uploadhook test CA");
        let other = TestCa::new("some other CA");
        let d = dir.path();
        write_pem(d, "ca.pem", &ca.cert_pem);
        let leaf = |file: &str, ca: &TestCa, names: &[&str]| {
            let (cert, key) = ca.issue(names);
            write_pem(d, &format!("{file}.pem"), &cert);
            write_pem(d, &format!("{file}.key"), &key);
        };
        leaf("server", &ca, &["127.0.0.1", "localhost"]);
        leaf("client", &ca, &["uploadhook-worker"]);
        leaf("foreign-server", &other, &["127.0.0.1", "localhost"]);
        leaf("misnamed-server", &ca, &["redis.internal.example"]);
        leaf("foreign-client", &other, &["uploadhook-worker"]);
        Pki { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `[queue]` on `redis` with this CA, and a client certificate when
    /// `client` names one (`client`, `foreign-client`).
    fn queue_toml(&self, redis: &TlsRedis, prefix: &str, client: Option<&str>) -> String {
        let mut toml = format!(
            "[queue]\nbackend = \"redis\"\nredis_url = \"{}\"\nprefix = \"{prefix}\"\n\
             redis_ca_file = \"{}\"\nvisibility_timeout = \"6s\"\nreconcile_every = \"300ms\"\n",
            redis.url(),
            self.path("ca.pem").display(),
        );
        if let Some(c) = client {
            toml += &format!(
                "redis_client_cert_file = \"{}\"\nredis_client_key_file = \"{}\"\n",
                self.path(&format!("{c}.pem")).display(),
                self.path(&format!("{c}.key")).display(),
            );
        }
        toml
    }

    /// The target `[queue]` describes, read as the service reads it.
    fn target(&self, redis: &TlsRedis, client: Option<&str>) -> RedisTarget {
        let cfg =
            Config::from_toml_layers(&[FAST, &self.queue_toml(redis, "unused", client)]).unwrap();
        RedisTarget::from_config(&cfg.queue).unwrap()
    }
}

/// A `redis-server` that speaks TLS only, killed (and reaped) on drop.
struct TlsRedis {
    port: u16,
    child: Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl TlsRedis {
    /// Serves `server` (`<server>.pem`, `<server>.key` of `pki`) and checks
    /// client certificates against the trusted CA when `auth_clients` says
    /// so (`no`, `optional`, `yes`). None (skip) when `redis-server` is not
    /// installed, unless UPLOADHOOK_REQUIRE_SERVICES=1.
    async fn start(pki: &Pki, server: &str, auth_clients: &str) -> Option<TlsRedis> {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("redis.log");
        let port = free_port();
        let out = std::fs::File::create(&log).unwrap();
        let spawned = Command::new("redis-server")
            .args(["--port", "0", "--tls-port", &port.to_string()])
            .arg("--tls-cert-file")
            .arg(pki.path(&format!("{server}.pem")))
            .arg("--tls-key-file")
            .arg(pki.path(&format!("{server}.key")))
            .arg("--tls-ca-cert-file")
            .arg(pki.path("ca.pem"))
            .args(["--tls-auth-clients", auth_clients])
            .args(["--save", "", "--appendonly", "no", "--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(dir.path())
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn();
        let child = match spawned {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                assert_ne!(
                    std::env::var("UPLOADHOOK_REQUIRE_SERVICES").as_deref(),
                    Ok("1"),
                    "UPLOADHOOK_REQUIRE_SERVICES=1 but redis-server is not installed"
                );
                eprintln!("skipping: redis-server is not installed");
                return None;
            }
            Err(e) => panic!("starting redis-server: {e}"),
        };
        let mut redis = TlsRedis {
            port,
            child,
            log,
            _dir: dir,
        };
        // Listening is enough: nothing here may speak plain TCP to it.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = redis.child.try_wait().unwrap() {
                panic!(
                    "redis-server exited ({status}); built without TLS?\n{}",
                    std::fs::read_to_string(&redis.log).unwrap_or_default()
                );
            }
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return Some(redis);
            }
            assert!(Instant::now() < deadline, "redis-server did not come up");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn url(&self) -> String {
        format!("rediss://127.0.0.1:{}", self.port)
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- redis-server log ---\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn queue_cfg(prefix: &str) -> RedisQueueConfig {
    RedisQueueConfig {
        prefix: prefix.to_string(),
        block: Duration::from_millis(200),
        ..RedisQueueConfig::default()
    }
}

fn prefix() -> String {
    format!("uh-tls-{}", uuid::Uuid::new_v4().simple())
}

/// Connects a queue, failing the test on a hang rather than waiting.
async fn connect(target: RedisTarget) -> Result<RedisQueue, String> {
    tokio::time::timeout(
        WITHIN,
        RedisQueue::connect_target(target, queue_cfg(&prefix()), Arc::new(SystemClock)),
    )
    .await
    .expect("connecting did not hang")
    .map_err(|e| e.to_string())
}

/// A job in, the same job out (a blocking read), acked.
async fn round_trip(q: &RedisQueue) {
    let job = Job {
        kind: JobKind::Deliver,
        priority: Priority::Normal,
        tenant: TenantId::generate(),
        webhook: WebhookId::generate(),
    };
    q.enqueue(job.clone(), None).await.unwrap();
    let leases = q.take(1, Duration::from_secs(2)).await.unwrap();
    assert_eq!(leases.len(), 1);
    assert_eq!(leases[0].job, job);
    q.ack(&leases[0]).await.unwrap();
    assert_eq!(q.stats().await.unwrap().stream, 0);
}

/// The whole service on PostgreSQL with its queue on a TLS-only Redis of a
/// private CA: a webhook is delivered; the event bus is subscribed and the
/// reconciler holds its lease there too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_is_delivered_through_a_redis_that_speaks_only_tls() {
    let pki = Pki::new();
    let Some(redis) = TlsRedis::start(&pki, "server", "optional").await else {
        return;
    };
    let Some(db) = TestDb::new(Backend::Postgres).await else {
        return;
    };
    let prefix = prefix();
    let mut app = TestApp::start(&db, &pki.queue_toml(&redis, &prefix, None)).await;
    let rx = Receiver::start().await;

    let created = create_and_upload(&app, &rx.url, Some(b"hello"), None).await;
    let id = created.webhook.unwrap().id;
    confirm(&app, &id, "").await.unwrap();
    wait_for(&app, &app.key_a, &id, proto::Status::Completed).await;
    assert_eq!(rx.received().len(), 1);
    let ready = reqwest::get(app.http_url("/readyz")).await.unwrap();
    assert_eq!(ready.status(), 200);
    assert!(ready.text().await.unwrap().contains("queue: ok"));

    // Behind the service's back, over TLS too: its keys are in this Redis,
    // the reconciler's lease among them, and its event bus is subscribed
    // (once a stream listens).
    let _stream = app.store().bus().subscribe();
    let mut conn = RedisTarget::from_config(&app.config.queue)
        .unwrap()
        .connect(Timeouts {
            connect: Duration::from_secs(5),
            response: Duration::from_secs(5),
        })
        .await
        .unwrap();
    let deadline = Instant::now() + WITHIN;
    loop {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{{{prefix}:jobs}}:*"))
            .query_async(&mut conn)
            .await
            .unwrap();
        let clients: String = redis::cmd("CLIENT")
            .arg("LIST")
            .query_async(&mut conn)
            .await
            .unwrap();
        let lease = format!("{{{prefix}:jobs}}:lock:reconciler");
        if keys.contains(&lease) && clients.contains(" sub=1 ") {
            assert!(
                keys.contains(&format!("{{{prefix}:jobs}}:stream")),
                "{keys:?}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no lease or subscriber: {keys:?}\n{clients}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    app.stop().await;
    db.cleanup().await;
}

/// The cross-process event bus and the reconciler's lease, each on its own
/// TLS connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_event_bus_and_the_lease_work_over_tls() {
    let pki = Pki::new();
    let Some(redis) = TlsRedis::start(&pki, "server", "no").await else {
        return;
    };
    let target = pki.target(&redis, None);
    let prefix = prefix();
    let stop = tokio_util::sync::CancellationToken::new();
    let a = RedisEventBus::start(target.clone(), &prefix, 16, stop.clone()).unwrap();
    let b = RedisEventBus::start(target.clone(), &prefix, 16, stop.clone()).unwrap();
    // Each subscribes once a stream of its own listens.
    let _on_a = a.subscribe();
    let mut on_b = b.subscribe();
    let deadline = Instant::now() + WITHIN;
    while !(a.live() && b.live()) {
        assert!(Instant::now() < deadline, "the buses never subscribed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let event = Event {
        id: 7,
        tenant_id: TenantId::generate(),
        webhook_id: WebhookId::generate(),
        kind: "webhook.completed".into(),
        status: Status::Completed,
        occurred_at: chrono::DateTime::from_timestamp_micros(1_700_000_000_000_000).unwrap(),
    };
    a.publish(event.clone());
    let got = tokio::time::timeout(WITHIN, on_b.recv())
        .await
        .expect("the event crossed over")
        .unwrap();
    assert_eq!(got.id, event.id);
    assert_eq!(got.webhook_id, event.webhook_id);
    stop.cancel();

    let one = RedisLeader::connect(&target, &prefix, "reconciler")
        .await
        .unwrap();
    let two = RedisLeader::connect(&target, &prefix, "reconciler")
        .await
        .unwrap();
    assert!(one.try_lead(Duration::from_secs(5)).await);
    assert!(!two.try_lead(Duration::from_secs(5)).await);
}

/// A server certificate that the configured CA did not sign, or that names
/// another host, is refused at once with an error that says so; the
/// service stays up, its /readyz says the queue is down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_certificate_not_from_the_configured_ca_is_refused() {
    let pki = Pki::new();
    let Some(foreign) = TlsRedis::start(&pki, "foreign-server", "no").await else {
        return;
    };
    let e = connect(pki.target(&foreign, None)).await.err().unwrap();
    assert!(
        e.contains("invalid peer certificate") && e.contains("UnknownIssuer"),
        "{e}"
    );
    let Some(misnamed) = TlsRedis::start(&pki, "misnamed-server", "no").await else {
        return;
    };
    let e = connect(pki.target(&misnamed, None)).await.err().unwrap();
    assert!(
        e.contains("invalid peer certificate") && e.contains("not valid for name"),
        "{e}"
    );
    // Without redis_ca_file the system's roots do not know the private CA.
    let Some(good) = TlsRedis::start(&pki, "server", "no").await else {
        return;
    };
    let e = connect(RedisTarget::parse(&good.url()).unwrap())
        .await
        .err()
        .unwrap();
    assert!(e.contains("UnknownIssuer"), "{e}");
    // The same CA file works against the server it did sign.
    round_trip(&connect(pki.target(&good, None)).await.unwrap()).await;

    // The service: up, answering, not ready to work.
    let db = TestDb::new(Backend::Sqlite).await.unwrap();
    let mut app = TestApp::start(&db, &pki.queue_toml(&foreign, &prefix(), None)).await;
    // Past the first connection attempt's end (its retries take ~8 s),
    // and each answer quick.
    let until = Instant::now() + Duration::from_secs(10);
    while Instant::now() < until {
        let began = Instant::now();
        let ready = reqwest::get(app.http_url("/readyz")).await.unwrap();
        assert!(began.elapsed() < Duration::from_secs(5), "/readyz hung");
        assert_eq!(ready.status(), 503);
        let body = ready.text().await.unwrap();
        assert!(body.contains("queue: unavailable"), "{body}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    app.stop().await;
    db.cleanup().await;
}

/// `--tls-auth-clients yes`: the client certificate of `[queue]` gets in;
/// without one, or with one of another CA, the connection is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_needs_the_client_certificate() {
    let pki = Pki::new();
    let Some(redis) = TlsRedis::start(&pki, "server", "yes").await else {
        return;
    };
    let q = connect(pki.target(&redis, Some("client"))).await.unwrap();
    round_trip(&q).await;
    for client in [None, Some("foreign-client")] {
        let e = connect(pki.target(&redis, client)).await.err();
        assert!(e.is_some(), "{client:?} got in");
        eprintln!("{client:?} refused: {}", e.unwrap());
    }
}

/// TLS files that cannot work stop `uploadhook` at start with the key at
/// fault, before it connects anywhere, and never print the URL's password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tls_files_stop_the_binary_naming_the_key() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let ca = pki.path("ca.pem").display().to_string();
    let not_pem = write_pem(dir.path(), "notes.txt", "my CA is the blue one\n")
        .display()
        .to_string();
    let missing = dir.path().join("missing.pem").display().to_string();
    let client_cert = pki.path("client.pem").display().to_string();
    let wrong_key = pki.path("server.key").display().to_string();
    let cases: [(&str, String, &str); 5] = [
        (
            "rediss",
            format!("redis_ca_file = \"{missing}\""),
            "config key `queue.redis_ca_file`: reading",
        ),
        (
            "rediss",
            format!("redis_ca_file = \"{not_pem}\""),
            "config key `queue.redis_ca_file`:",
        ),
        (
            "rediss",
            format!("redis_client_cert_file = \"{client_cert}\""),
            "config key `queue.redis_client_key_file`",
        ),
        (
            "rediss",
            format!(
                "redis_client_cert_file = \"{client_cert}\"\nredis_client_key_file = \"{wrong_key}\""
            ),
            "config key `queue.redis_client_key_file`:",
        ),
        (
            "redis",
            format!("redis_ca_file = \"{ca}\""),
            "config key `queue.redis_ca_file`",
        ),
    ];
    for (i, (scheme, extra, want)) in cases.iter().enumerate() {
        let config = dir.path().join(format!("config-{i}.toml"));
        std::fs::write(
            &config,
            format!(
                "[database]\nurl = \"sqlite://{}?mode=rwc\"\n\
                 [queue]\nbackend = \"redis\"\nredis_url = \"{scheme}://:hunter2@127.0.0.1:1\"\n{extra}\n",
                dir.path().join("db.sqlite").display()
            ),
        )
        .unwrap();
        let out = uploadhook(&config, "worker");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "case {i} started");
        assert!(
            stderr.contains(want),
            "case {i}: wanted {want:?} in\n{stderr}"
        );
        assert!(
            !stderr.contains("hunter2"),
            "case {i} shows the password\n{stderr}"
        );
    }
}

/// Runs `uploadhook --config <config> <command>` to its end (bounded),
/// without the test's own `UPLOADHOOK_…` variables.
fn uploadhook(config: &Path, command: &str) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_uploadhook"));
    cmd.arg("--config").arg(config).arg(command);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("UPLOADHOOK_") {
            cmd.env_remove(name);
        }
    }
    let mut child = cmd
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + WITHIN;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("uploadhook {command} did not stop on a bad configuration");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}
