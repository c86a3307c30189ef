//! The scaled-out deployment with real `uploadhook worker` OS processes:
//! the API runs in-process, workers are children of the test, configured
//! through a `--config` file as an operator would, and can be SIGKILLed.
//!
//! Skipped unless UPLOADHOOK_TEST_DATABASE_URL and UPLOADHOOK_TEST_REDIS_URL
//! are set (the last test needs neither); the FLUSHALL test also runs a
//! `redis-server` of its own. Every child is killed when its
//! guard drops, so a failing test leaves nothing running, and every wait has
//! a deadline.

use std::{
    collections::{BTreeMap, HashMap},
    fmt::Write as _,
    fs::File,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use sea_orm::{ColumnTrait, EntityTrait, PaginatorTrait, QueryFilter};
use tonic::transport::Channel;
use uploadhook::{
    Roles, Running,
    clock::SystemClock,
    config::Config,
    domain::{TenantId, event_type},
    proto::{self, Status, webhook_service_client::WebhookServiceClient},
    store::webhooks,
};

use crate::helpers::{
    Backend, FAST, Receiver, SharedS3, TestDb, authed, confirm_request, create_request, free_port,
    required_env, start_process,
};

/// The binary under test, built by cargo for this test target.
const BIN: &str = env!("CARGO_BIN_EXE_uploadhook");
/// Client tasks creating webhooks at once.
const CREATORS: usize = 8;

// ---------------------------------------------------------------------------
// Child processes
// ---------------------------------------------------------------------------

/// A child process, SIGKILLed and reaped when dropped. Its stdout and stderr
/// go to a log file, printed (the end of it) when a test fails.
struct ChildProcess {
    name: String,
    child: Child,
    log: PathBuf,
}

impl ChildProcess {
    fn spawn(name: &str, cmd: &mut Command, log: PathBuf) -> std::io::Result<ChildProcess> {
        let out = File::create(&log)?;
        let err = out.try_clone()?;
        let child = cmd.stdin(Stdio::null()).stdout(out).stderr(err).spawn()?;
        Ok(ChildProcess {
            name: name.to_string(),
            child,
            log,
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL (what `Child::kill` sends on unix), then reap.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn log_tail(&self) -> String {
        let text = self.log_text();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Panics, with the end of its log, when the process has exited.
    fn assert_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!(
                "{} (pid {}) exited unexpectedly: {status}\n{}",
                self.name,
                self.pid(),
                self.log_tail()
            );
        }
    }

    /// Waits for the process to exit by itself, at most `within`.
    async fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not exit within {within:?}\n{}",
                self.name,
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- last lines of {} (pid {}) ---\n{}",
                self.name,
                self.pid(),
                self.log_tail()
            );
        }
        self.kill();
    }
}

/// `uploadhook --config <file> <command>` with none of the test's own
/// `UPLOADHOOK_…` variables: the binary reads that prefix as config keys
/// and refuses unknown ones (e.g. UPLOADHOOK_TEST_DATABASE_URL).
fn uploadhook_command(config: &Path, command: &str) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.arg("--config").arg(config).arg(command);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("UPLOADHOOK_") {
            cmd.env_remove(name);
        }
    }
    // Plain log lines, so that the listening address can be read back
    // (a log in a file has no colours anyway; this keeps it so).
    cmd.env("NO_COLOR", "1");
    cmd
}

/// One `uploadhook worker` process.
struct Worker {
    proc: ChildProcess,
}

impl Worker {
    /// Starts the process and waits until it answers /readyz.
    async fn spawn(name: &str, config: &Path, log: PathBuf) -> Worker {
        let proc = ChildProcess::spawn(name, &mut uploadhook_command(config, "worker"), log)
            .unwrap_or_else(|e| panic!("starting {BIN} worker: {e}"));
        let mut w = Worker { proc };
        w.wait_ready(Duration::from_secs(30)).await;
        w
    }

    /// Waits until the process logs its HTTP address (bound on port 0) and
    /// answers /readyz there.
    async fn wait_ready(&mut self, within: Duration) {
        let deadline = Instant::now() + within;
        let http = reqwest::Client::new();
        loop {
            self.proc.assert_running();
            // `uploadhook running … http_addr=127.0.0.1:PORT …` once listening.
            let addr = self
                .proc
                .log_text()
                .lines()
                .filter(|l| l.contains("uploadhook running"))
                .find_map(|l| {
                    l.split_whitespace()
                        .find_map(|f| f.strip_prefix("http_addr="))
                        .and_then(|a| a.parse::<SocketAddr>().ok())
                });
            if let Some(addr) = addr {
                let ready = http
                    .get(format!("http://{addr}/readyz"))
                    .timeout(Duration::from_secs(2))
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success());
                if ready {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "{} not ready within {within:?}\n{}",
                self.proc.name,
                self.proc.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The webhooks this worker made delivery attempts for, from its log.
    fn attempted(&self) -> std::collections::HashSet<String> {
        self.proc
            .log_text()
            .lines()
            .filter(|l| l.contains("delivery attempt"))
            .filter_map(|l| {
                let at = l.find("webhook_id=")? + "webhook_id=".len();
                Some(
                    l[at..]
                        .split(|c: char| !c.is_ascii_alphanumeric() && c != '_')
                        .next()?
                        .to_string(),
                )
            })
            .collect()
    }
}

/// A Redis server of the test's own, which it may FLUSHALL.
struct PrivateRedis {
    url: String,
    proc: ChildProcess,
    _dir: tempfile::TempDir,
}

impl PrivateRedis {
    /// None (skip) when `redis-server` is not installed, unless
    /// UPLOADHOOK_REQUIRE_SERVICES=1.
    async fn start() -> Option<PrivateRedis> {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &port.to_string()])
            .args(["--save", "", "--appendonly", "no", "--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(dir.path());
        let proc = match ChildProcess::spawn("redis-server", &mut cmd, dir.path().join("redis.log"))
        {
            Ok(p) => p,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if std::env::var("UPLOADHOOK_REQUIRE_SERVICES").as_deref() == Ok("1") {
                    panic!("UPLOADHOOK_REQUIRE_SERVICES=1 but redis-server is not installed");
                }
                eprintln!("skipping: redis-server is not installed");
                return None;
            }
            Err(e) => panic!("starting redis-server: {e}"),
        };
        let mut redis = PrivateRedis {
            url: format!("redis://127.0.0.1:{port}"),
            proc,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            redis.proc.assert_running();
            if redis.conn().await.is_some() {
                return Some(redis);
            }
            assert!(Instant::now() < deadline, "redis-server did not come up");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn conn(&self) -> Option<redis::aio::MultiplexedConnection> {
        let client = redis::Client::open(self.url.as_str()).ok()?;
        let mut conn = client.get_multiplexed_async_connection().await.ok()?;
        let _: () = redis::cmd("PING").query_async(&mut conn).await.ok()?;
        Some(conn)
    }
}

// ---------------------------------------------------------------------------
// Config files
// ---------------------------------------------------------------------------

/// Merges TOML layers (later ones win, as in `Config::from_toml_layers`)
/// into one document, for a process that reads one `--config` file.
fn merged_toml(layers: &[&str]) -> String {
    use figment::providers::Format;
    let mut fig = figment::Figment::new();
    for layer in layers {
        fig = fig.merge(figment::providers::Toml::string(layer));
    }
    let value: serde_json::Value = fig.extract().expect("config layers merge");
    let mut out = String::new();
    write_table(&mut out, "", value.as_object().expect("a table"));
    // The file must say what the layers say: load it as the binary will.
    Config::from_toml(&out).unwrap_or_else(|e| panic!("{e}\n{out}"));
    out
}

fn write_table(out: &mut String, path: &str, table: &serde_json::Map<String, serde_json::Value>) {
    let bare = |k: &str| {
        assert!(
            !k.is_empty()
                && k.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'),
            "key `{k}` needs quoting"
        );
    };
    for (k, v) in table.iter().filter(|(_, v)| !v.is_object()) {
        bare(k);
        writeln!(out, "{k} = {}", toml_value(v)).unwrap();
    }
    for (k, v) in table {
        if let Some(sub) = v.as_object() {
            bare(k);
            let path = if path.is_empty() {
                k.clone()
            } else {
                format!("{path}.{k}")
            };
            writeln!(out, "[{path}]").unwrap();
            write_table(out, &path, sub);
        }
    }
}

fn toml_value(v: &serde_json::Value) -> String {
    match v {
        // JSON's string escapes are a subset of TOML basic strings'.
        serde_json::Value::String(s) => serde_json::to_string(s).unwrap(),
        serde_json::Value::Number(n) => n.to_string(),
        serde_json::Value::Bool(b) => b.to_string(),
        serde_json::Value::Array(a) => {
            let items: Vec<String> = a.iter().map(toml_value).collect();
            format!("[{}]", items.join(", "))
        }
        other => panic!("no TOML for {other}"),
    }
}

// ---------------------------------------------------------------------------
// The deployment
// ---------------------------------------------------------------------------

/// PostgreSQL + Redis, one in-process API, workers as child processes.
struct Deployment {
    db: TestDb,
    s3: SharedS3,
    /// Config layers of every process of this deployment, over the queue's.
    shared: String,
    api: Option<Running>,
    key: String,
    tenant: TenantId,
    client: WebhookServiceClient<Channel>,
    http: reqwest::Client,
    dir: tempfile::TempDir,
    next_worker: AtomicUsize,
}

impl Deployment {
    async fn new(shared: &str) -> Option<Deployment> {
        let db = TestDb::new(Backend::PostgresRedis).await?;
        let s3 = SharedS3::start().await;
        let api = start_process(&db, &[&s3.toml, shared], Roles::API, Arc::new(SystemClock)).await;
        let key = api
            .store
            .create_api_key("tenant-a", chrono::Utc::now())
            .await
            .unwrap();
        let client = WebhookServiceClient::connect(format!("http://{}", api.grpc_addr.unwrap()))
            .await
            .unwrap();
        Some(Deployment {
            db,
            s3,
            shared: shared.to_string(),
            api: Some(api),
            key: key.plaintext,
            tenant: key.tenant_id,
            client,
            http: reqwest::Client::new(),
            dir: tempfile::tempdir().unwrap(),
            next_worker: AtomicUsize::new(1),
        })
    }

    fn api(&self) -> &Running {
        self.api.as_ref().unwrap()
    }

    /// Writes a worker's config file: the same database, queue and storage
    /// as the API, HTTP on port 0, then `extra`.
    fn worker_config(&self, name: &str, extra: &str) -> PathBuf {
        let local = format!(
            "[database]\nurl = \"{}\"\n{}[server]\nhttp_addr = \"127.0.0.1:0\"\n",
            self.db.url,
            self.db.pool_toml()
        );
        let text = merged_toml(&[
            FAST,
            &local,
            &self.db.queue_toml,
            &self.s3.toml,
            &self.shared,
            extra,
        ]);
        let path = self.dir.path().join(format!("{name}.toml"));
        std::fs::write(&path, text).unwrap();
        path
    }

    /// Starts `uploadhook worker` processes, at once, and waits until each
    /// is ready.
    async fn workers(&self, n: usize, extra: &str) -> Vec<Worker> {
        let names: Vec<String> = (0..n)
            .map(|_| {
                format!(
                    "worker-{}",
                    self.next_worker.fetch_add(1, Ordering::Relaxed)
                )
            })
            .collect();
        let configs: Vec<PathBuf> = names.iter().map(|n| self.worker_config(n, extra)).collect();
        let starts = names.iter().zip(&configs).map(|(name, config)| {
            let log = self.dir.path().join(format!("{name}.log"));
            Worker::spawn(name, config, log)
        });
        futures_util::future::join_all(starts).await
    }

    /// Creates, uploads and confirms `n` webhooks to `url` with a few
    /// concurrent clients; returns their ids in creation order.
    async fn create_confirmed(
        &self,
        url: &str,
        n: usize,
        priority: proto::Priority,
    ) -> Vec<String> {
        let next = Arc::new(AtomicUsize::new(0));
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..CREATORS.min(n) {
            let (mut client, http, key, url, next) = (
                self.client.clone(),
                self.http.clone(),
                self.key.clone(),
                url.to_string(),
                next.clone(),
            );
            tasks.spawn(async move {
                let mut made = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        return made;
                    }
                    made.push((
                        i,
                        create_one(&mut client, &http, &key, &url, priority).await,
                    ));
                }
            });
        }
        let mut all = tokio::time::timeout(Duration::from_secs(120), async {
            let mut all = Vec::with_capacity(n);
            while let Some(made) = tasks.join_next().await {
                all.extend(made.unwrap());
            }
            all
        })
        .await
        .expect("creating webhooks took over 120 s");
        all.sort();
        all.into_iter().map(|(_, id)| id).collect()
    }

    async fn count_in(&self, status: uploadhook::domain::Status) -> u64 {
        webhooks::Entity::find()
            .filter(webhooks::Column::Status.eq(status.as_str()))
            .count(self.api().store.db())
            .await
            .unwrap()
    }

    /// Waits until `n` webhooks are COMPLETED, checking that the workers
    /// are alive meanwhile.
    async fn wait_completed(&self, n: usize, within: Duration, workers: &mut [&mut Worker]) {
        let deadline = Instant::now() + within;
        loop {
            let done = self.count_in(uploadhook::domain::Status::Completed).await;
            if done as usize >= n {
                return;
            }
            for w in workers.iter_mut() {
                w.proc.assert_running();
            }
            if Instant::now() > deadline {
                let rows = webhooks::Entity::find()
                    .all(self.api().store.db())
                    .await
                    .unwrap();
                let mut by_status = BTreeMap::<String, usize>::new();
                for r in rows {
                    *by_status.entry(r.status).or_default() += 1;
                }
                panic!("{done}/{n} completed after {within:?}; by status: {by_status:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn status(&self, id: &str) -> proto::Webhook {
        self.client
            .clone()
            .get_status(authed(
                &self.key,
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

    /// Every webhook's status, as ListWebhooks shows it.
    async fn listed_statuses(&self) -> HashMap<String, Status> {
        let mut out = HashMap::new();
        let mut token = String::new();
        for _ in 0..1000 {
            let page = self
                .client
                .clone()
                .list_webhooks(authed(
                    &self.key,
                    proto::ListWebhooksRequest {
                        page_size: 500,
                        page_token: token,
                        ..Default::default()
                    },
                ))
                .await
                .unwrap()
                .into_inner();
            for w in page.webhooks {
                let status = w.status();
                out.insert(w.id, status);
            }
            if page.next_page_token.is_empty() {
                return out;
            }
            token = page.next_page_token;
        }
        panic!("ListWebhooks did not end within 1000 pages");
    }

    /// How many stored events of `kind` each webhook has.
    async fn events_per_webhook(&self, kind: &str) -> HashMap<String, usize> {
        let mut out = HashMap::new();
        let mut after = 0;
        for _ in 0..10_000 {
            let page = self
                .api()
                .store
                .events_after(&self.tenant, None, after, 1000)
                .await
                .unwrap();
            let Some(last) = page.last() else {
                return out;
            };
            after = last.id;
            for e in page.iter().filter(|e| e.kind == kind) {
                *out.entry(e.webhook_id.to_string()).or_default() += 1;
            }
        }
        panic!("the event log did not end within 10,000 pages");
    }

    /// Every webhook COMPLETED (ListWebhooks), with exactly one
    /// `delivery.succeeded` event in the database.
    async fn assert_each_completed_once(&self, ids: &[String]) {
        let listed = self.listed_statuses().await;
        assert_eq!(listed.len(), ids.len(), "no webhook missing or extra");
        for id in ids {
            assert_eq!(listed.get(id), Some(&Status::Completed), "{id}");
        }
        let succeeded = self.events_per_webhook(event_type::DELIVERED).await;
        for id in ids {
            assert_eq!(
                succeeded.get(id).copied().unwrap_or(0),
                1,
                "{id}: one `{}` event",
                event_type::DELIVERED
            );
        }
        assert_eq!(succeeded.len(), ids.len());
    }

    async fn stop(mut self) {
        if let Some(api) = self.api.take() {
            api.stop().await;
        }
        self.db.cleanup().await;
    }
}

async fn create_one(
    client: &mut WebhookServiceClient<Channel>,
    http: &reqwest::Client,
    key: &str,
    url: &str,
    priority: proto::Priority,
) -> String {
    let mut req = create_request(url, "a.txt");
    req.priority = priority as i32;
    let created = client
        .create_upload_webhook(authed(key, req))
        .await
        .unwrap()
        .into_inner();
    let mut put = http.put(&created.upload_url).body(&b"hello"[..]);
    for (k, v) in &created.upload_headers {
        put = put.header(k, v);
    }
    let r = put.send().await.unwrap();
    assert!(r.status().is_success(), "upload failed: {}", r.status());
    let id = created.webhook.unwrap().id;
    client
        .confirm(authed(key, confirm_request(&id)))
        .await
        .unwrap();
    id
}

/// The receiver's requests by webhook-id, after checking that each carries
/// its webhook's id in the header and the body alike, and that repeats of a
/// webhook are byte-identical (so that a receiver can deduplicate them).
fn received_by_id(rx: &Receiver, ids: &[String]) -> HashMap<String, usize> {
    let mut bodies: HashMap<String, bytes::Bytes> = HashMap::new();
    let mut counts = HashMap::new();
    for r in rx.received() {
        let id = r.headers["webhook-id"].clone();
        let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(body["webhookId"], id.as_str(), "header and body agree");
        if let Some(first) = bodies.get(&id) {
            assert_eq!(first, &r.body, "a repeat of {id} is the same message");
        } else {
            bodies.insert(id.clone(), r.body.clone());
        }
        *counts.entry(id).or_default() += 1;
    }
    for id in ids {
        assert!(counts.contains_key(id), "{id} never reached the receiver");
    }
    assert_eq!(counts.len(), ids.len(), "nothing foreign was delivered");
    counts
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_worker_processes_share_1000_webhooks() {
    const N: usize = 1000;
    let Some(d) = Deployment::new("").await else {
        return;
    };
    let started = Instant::now();
    let mut workers = d.workers(2, "").await;
    let rx = Receiver::start().await;
    let ids = d
        .create_confirmed(&rx.url, N, proto::Priority::Normal)
        .await;
    let created = started.elapsed();
    let [w1, w2] = &mut workers[..] else {
        unreachable!()
    };
    d.wait_completed(N, Duration::from_secs(90), &mut [w1, w2])
        .await;
    eprintln!(
        "{N} webhooks: created in {created:?}, all delivered after {:?}",
        started.elapsed()
    );

    let counts = received_by_id(&rx, &ids);
    for id in &ids {
        assert_eq!(counts[id], 1, "{id} delivered exactly once");
    }
    d.assert_each_completed_once(&ids).await;
    // Both processes did part of the work.
    let (a, b) = (w1.attempted(), w2.attempted());
    eprintln!("attempts by worker: {} and {}", a.len(), b.len());
    assert!(
        !a.is_empty() && !b.is_empty(),
        "each worker delivered some ({} / {})",
        a.len(),
        b.len()
    );
    assert_eq!(a.len() + b.len(), N, "no webhook attempted by both");
    drop(workers);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_worker_mid_batch_loses_nothing() {
    const N: usize = 300;
    // A job taken by the killed worker is handed to another after the
    // visibility timeout, which must exceed the attempt timeout.
    let fast = "[delivery]\ntimeout = \"1s\"\n[queue]\nvisibility_timeout = \"2s\"\n";
    let Some(d) = Deployment::new(fast).await else {
        return;
    };
    let rx = Receiver::start().await;
    // A slow receiver keeps every worker slot busy with an attempt in
    // flight, so that the kill lands mid-batch.
    rx.hold_every(Duration::from_millis(200));
    let ids = d
        .create_confirmed(&rx.url, N, proto::Priority::Normal)
        .await;
    let started = Instant::now();
    let mut workers = d.workers(2, "[worker]\nconcurrency = 16\n").await;

    // The worker to kill must be under way too: on a loaded machine it
    // can start after the other has delivered a quarter of the backlog.
    let deadline = Instant::now() + Duration::from_secs(30);
    while rx.received().len() < N / 4 || workers[0].attempted().is_empty() {
        assert!(
            Instant::now() < deadline,
            "before the kill: {} of {N} requests received, the worker to kill attempted {}",
            rx.received().len(),
            workers[0].attempted().len()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    workers[0].proc.kill();
    let at_kill = rx.received().len();
    let completed_at_kill = d.count_in(uploadhook::domain::Status::Completed).await;
    assert!(
        (completed_at_kill as usize) < N,
        "the kill came too late to test anything"
    );
    let mut replacement = d.workers(1, "[worker]\nconcurrency = 16\n").await;
    let (survivor, replacement) = (&mut workers[1], &mut replacement[0]);
    d.wait_completed(N, Duration::from_secs(60), &mut [survivor, replacement])
        .await;
    eprintln!(
        "killed a worker after {at_kill} requests ({completed_at_kill} completed); all {N} completed after {:?}",
        started.elapsed()
    );

    let counts = received_by_id(&rx, &ids);
    let repeats: usize = counts.values().map(|c| c - 1).sum();
    let started_events: usize = d
        .events_per_webhook(event_type::DELIVERING)
        .await
        .values()
        .sum();
    eprintln!(
        "{repeats} repeated requests at the receiver; {} attempts taken over",
        started_events - N
    );
    assert!(
        started_events > N,
        "the killed worker had attempts in flight, and another worker took them over"
    );
    d.assert_each_completed_once(&ids).await;
    drop(workers);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flushall_mid_run_loses_nothing() {
    const N: usize = 300;
    if required_env("UPLOADHOOK_TEST_DATABASE_URL").is_none()
        || required_env("UPLOADHOOK_TEST_REDIS_URL").is_none()
    {
        return;
    }
    let Some(redis) = PrivateRedis::start().await else {
        return;
    };
    // A short visibility timeout: the reconciler re-enqueues webhooks whose
    // job is overdue by more than that.
    let fast = format!(
        "[delivery]\ntimeout = \"1s\"\n[queue]\nredis_url = \"{}\"\nvisibility_timeout = \"2s\"\nreconcile_every = \"300ms\"\n",
        redis.url
    );
    let Some(d) = Deployment::new(&fast).await else {
        return;
    };
    let rx = Receiver::start().await;
    rx.hold_every(Duration::from_millis(50));
    // The whole backlog is queued before the workers start, so that most
    // of it is in Redis only (as jobs) when Redis loses everything.
    let ids = d
        .create_confirmed(&rx.url, N, proto::Priority::Normal)
        .await;
    let started = Instant::now();
    let mut workers = d.workers(2, "[worker]\nconcurrency = 8\n").await;

    let deadline = Instant::now() + Duration::from_secs(30);
    while rx.received().len() < N / 3 {
        assert!(Instant::now() < deadline, "no progress before FLUSHALL");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut conn = redis.conn().await.expect("private redis answers");
    let keys: u64 = redis::cmd("DBSIZE").query_async(&mut conn).await.unwrap();
    let _: () = redis::cmd("FLUSHALL").query_async(&mut conn).await.unwrap();
    let completed_at_flush = d.count_in(uploadhook::domain::Status::Completed).await;
    assert!(keys > 0, "the queue lived in the private Redis");
    assert!(
        (completed_at_flush as usize) < N,
        "FLUSHALL came too late to test anything"
    );

    let [w1, w2] = &mut workers[..] else {
        unreachable!()
    };
    d.wait_completed(N, Duration::from_secs(60), &mut [w1, w2])
        .await;
    let requeued: usize = [&*w1, &*w2]
        .iter()
        .map(|w| {
            w.proc
                .log_text()
                .matches("reconciler put work back")
                .count()
        })
        .sum();
    eprintln!(
        "FLUSHALL with {completed_at_flush}/{N} completed; all completed after {:?}; {requeued} reconciler runs re-queued work",
        started.elapsed()
    );
    received_by_id(&rx, &ids);
    d.assert_each_completed_once(&ids).await;
    drop(workers);
    d.stop().await;
}

/// A retry is made when it is due, not a polling interval later. This is a
/// bound on scheduling correctness (the delayed job must wake a worker
/// blocked on the queue), not a performance figure: 1 s is far beyond any
/// legitimate lateness, even on a machine loaded by the tests beside this
/// one, and a worker missing the wake-up would wait out its 1 s blocking
/// read on top of the take, the row read and the claim. (The queue's own
/// test, `a_blocked_taker_wakes_when_a_delayed_job_falls_due`, bounds the
/// wake-up alone, against a 10 s blocking read.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_lands_close_to_its_due_time() {
    let shared = "[delivery]\nretry_schedule = [\"2s\"]\njitter = 0.0\n";
    let Some(d) = Deployment::new(shared).await else {
        return;
    };
    let worker = start_process(
        &d.db,
        &[&d.s3.toml, shared],
        Roles::WORKER,
        Arc::new(SystemClock),
    )
    .await;
    let rx = Receiver::start().await;
    rx.answer(&[503]);
    let id = d
        .create_confirmed(&rx.url, 1, proto::Priority::Normal)
        .await
        .remove(0);
    let deadline = Instant::now() + Duration::from_secs(30);
    let w = loop {
        let w = d.status(&id).await;
        if w.status() == Status::Completed {
            break w;
        }
        assert!(Instant::now() < deadline, "stuck in {:?}", w.status());
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(w.attempts.len(), 2, "{:?}", w.attempts);
    let (first, second) = (&w.attempts[0], &w.attempts[1]);
    assert_eq!(first.response_status, 503);
    assert_eq!(second.response_status, 200);
    let nanos = |t: &Option<prost_types::Timestamp>| {
        let t = t.as_ref().unwrap();
        i128::from(t.seconds) * 1_000_000_000 + i128::from(t.nanos)
    };
    let first_end = nanos(&first.started_at) + i128::from(first.duration_ms) * 1_000_000;
    let gap = Duration::from_nanos(u64::try_from(nanos(&second.started_at) - first_end).unwrap());
    eprintln!("retry due after 2s started {gap:?} after the first attempt ended");
    assert!(
        gap >= Duration::from_secs(2) && gap <= Duration::from_secs(3),
        "retry started {gap:?} after the failed attempt, due after 2s"
    );
    worker.stop().await;
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn high_priority_overtakes_a_backlog() {
    const NORMAL: usize = 200;
    let Some(d) = Deployment::new("").await else {
        return;
    };
    let rx = Receiver::start().await;
    rx.hold_every(Duration::from_millis(25));
    // The backlog is queued before the worker starts, so that the order is
    // the queue's doing, not a race with the test creating webhooks.
    let normal = d
        .create_confirmed(&rx.url, NORMAL, proto::Priority::Normal)
        .await;
    let high = d
        .create_confirmed(&rx.url, 1, proto::Priority::High)
        .await
        .remove(0);
    let mut workers = d
        .workers(1, "[worker]\nconcurrency = 2\nper_host_concurrency = 2\n")
        .await;
    d.wait_completed(NORMAL + 1, Duration::from_secs(180), &mut [&mut workers[0]])
        .await;

    let order: Vec<String> = rx
        .received()
        .iter()
        .map(|r| r.headers["webhook-id"].clone())
        .collect();
    let at = order
        .iter()
        .position(|id| *id == high)
        .expect("high delivered");
    let normal_after = order[at..].iter().filter(|id| normal.contains(id)).count();
    assert!(
        normal_after >= 150,
        "the high-priority webhook arrived at position {} of {}, before only {normal_after} of {NORMAL} normal ones",
        at + 1,
        order.len()
    );
    drop(workers);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_process_refuses_the_memory_queue() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("worker.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nhttp_addr = \"127.0.0.1:0\"\ngrpc_addr = \"127.0.0.1:0\"\n\
             [database]\nurl = \"sqlite://{}?mode=rwc\"\n[queue]\nbackend = \"memory\"\n",
            dir.path().join("db.sqlite").display()
        ),
    )
    .unwrap();
    let mut proc = ChildProcess::spawn(
        "worker",
        &mut uploadhook_command(&config, "worker"),
        dir.path().join("worker.log"),
    )
    .unwrap();
    let status = proc.wait_exit(Duration::from_secs(30)).await;
    let log = proc.log_text();
    assert!(!status.success(), "{status}\n{log}");
    assert!(log.contains("queue.backend"), "{log}");
}

/// The config of an embedded `serve` process in `dir` (SQLite, the
/// embedded S3 server, no dev tenant), listening on free ports, with
/// `extra` sections after it; its path.
fn serve_config(dir: &Path, extra: &str) -> PathBuf {
    let config = dir.join("serve.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nhttp_addr = \"127.0.0.1:0\"\ngrpc_addr = \"127.0.0.1:0\"\n\
             [database]\nurl = \"sqlite://{}/db.sqlite?mode=rwc\"\n\
             [embedded_s3]\naddr = \"127.0.0.1:0\"\nroot = \"{}/s3\"\n\
             [bootstrap]\ndev_tenant = \"\"\n{extra}",
            dir.display(),
            dir.display(),
        ),
    )
    .unwrap();
    config
}

/// A process whose log goes to a file (not a terminal) writes plain lines,
/// without colour codes, even with NO_COLOR unset: containers' and
/// journald's logs are files and pipes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_to_a_file_carry_no_colour_codes() {
    let dir = tempfile::tempdir().unwrap();
    let config = serve_config(dir.path(), "");
    let mut cmd = uploadhook_command(&config, "serve");
    cmd.env_remove("NO_COLOR");
    let mut proc = ChildProcess::spawn("serve", &mut cmd, dir.path().join("serve.log")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let log = loop {
        proc.assert_running();
        let log = proc.log_text();
        if log.contains("uploadhook running") {
            break log;
        }
        assert!(Instant::now() < deadline, "not running within 30 s\n{log}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(!log.contains('\x1b'), "{log:?}");
}

/// OpenTelemetry on a real `serve` process: the trace a caller starts on
/// Confirm continues through the queue into the job spans, reaches the
/// receiver as `traceparent`, and is exported over OTLP/HTTP to a
/// collector (a loopback HTTP server of the test's own).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trace_continues_from_confirm_to_the_receiver_and_the_collector() {
    // The collector: keeps every OTLP export body.
    let bodies: Arc<std::sync::Mutex<Vec<bytes::Bytes>>> = Default::default();
    let collector = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let collector_addr = collector.local_addr().unwrap();
    let kept = bodies.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: bytes::Bytes| {
            let kept = kept.clone();
            async move {
                kept.lock().unwrap().push(body);
                ""
            }
        }),
    );
    tokio::spawn(async move { axum::serve(collector, app).await.unwrap() });

    let dir = tempfile::tempdir().unwrap();
    let config = serve_config(
        dir.path(),
        &format!(
            "[delivery]\nallow_cidrs = [\"127.0.0.1/32\"]\n\
             [telemetry]\notlp_endpoint = \"http://{collector_addr}\"\notlp_protocol = \"http\"\n"
        ),
    );
    let keys = uploadhook_command(&config, "keys")
        .args(["create", "--tenant", "traced"])
        .output()
        .unwrap();
    assert!(
        keys.status.success(),
        "{}",
        String::from_utf8_lossy(&keys.stderr)
    );
    let key = String::from_utf8_lossy(&keys.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("api key (shown once): ").map(str::to_string))
        .expect("the key is printed");

    let mut cmd = uploadhook_command(&config, "serve");
    // Export batches quickly rather than every 5 s.
    cmd.env("OTEL_BSP_SCHEDULE_DELAY", "100");
    let proc = ChildProcess::spawn("serve", &mut cmd, dir.path().join("serve.log")).unwrap();
    let mut serve = Worker { proc };
    serve.wait_ready(Duration::from_secs(30)).await;
    let grpc = serve
        .proc
        .log_text()
        .lines()
        .filter(|l| l.contains("uploadhook running"))
        .find_map(|l| {
            let at = l.find("grpc_addr=Some(")? + "grpc_addr=Some(".len();
            l[at..].split(')').next()?.parse::<SocketAddr>().ok()
        })
        .expect("the gRPC address is logged");

    let rx = Receiver::start().await;
    let mut client = WebhookServiceClient::connect(format!("http://{grpc}"))
        .await
        .unwrap();
    let http = reqwest::Client::new();
    let created = client
        .create_upload_webhook(authed(&key, create_request(&rx.url, "t.txt")))
        .await
        .unwrap()
        .into_inner();
    let mut put = http.put(&created.upload_url).body(&b"traced"[..]);
    for (k, v) in &created.upload_headers {
        put = put.header(k, v);
    }
    assert!(put.send().await.unwrap().status().is_success());
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let mut confirm = authed(&key, confirm_request(&created.webhook.unwrap().id));
    confirm.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-00f067aa0ba902b7-01")
            .parse()
            .unwrap(),
    );
    client.confirm(confirm).await.unwrap();

    let deadline = Instant::now() + Duration::from_secs(30);
    while rx.received().is_empty() {
        assert!(
            Instant::now() < deadline,
            "not delivered\n{}",
            serve.proc.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let got = rx.received();
    let tp = got[0].headers.get("traceparent").expect("traceparent sent");
    assert!(tp.starts_with(&format!("00-{trace_id}-")), "{tp}");
    assert!(
        !tp.contains("00f067aa0ba902b7"),
        "the job's own span, not the caller's"
    );

    // The spans reach the collector, in the caller's trace.
    let raw_id = hex::decode(trace_id).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        // The RPC span and the delivery job's span, both in that trace.
        let spans_of_trace: Vec<bytes::Bytes> = bodies
            .lock()
            .unwrap()
            .iter()
            .filter(|b| b.windows(16).any(|w| w == raw_id.as_slice()))
            .cloned()
            .collect();
        let named = |name: &str| {
            spans_of_trace
                .iter()
                .any(|b| b.windows(name.len()).any(|w| w == name.as_bytes()))
        };
        if named("uploadhook.v1.WebhookService/Confirm") && named("deliver webhook") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no span of trace {trace_id} exported\n{}",
            serve.proc.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
