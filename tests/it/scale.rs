//! The scaled-out deployment: PostgreSQL + Redis Streams, with `api` and
//! `worker` processes apart (started in-process, each with its own pools).

use std::{sync::Arc, time::Duration};

use uploadhook::{
    Roles,
    clock::SystemClock,
    proto::{self, Status},
};

use crate::helpers::{
    Backend, Receiver, SharedS3, TestDb, authed, confirm_request, create_request, start_process,
    upload,
};

struct Deployment {
    db: TestDb,
    s3: SharedS3,
    api: Option<uploadhook::Running>,
    key: String,
}

impl Deployment {
    async fn new(extra: &str) -> Option<Deployment> {
        let db = TestDb::new(Backend::PostgresRedis).await?;
        let s3 = SharedS3::start().await;
        let api = start_process(&db, &[&s3.toml, extra], Roles::API, Arc::new(SystemClock)).await;
        let key = api
            .store
            .create_api_key("tenant-a", chrono::Utc::now())
            .await
            .unwrap()
            .plaintext;
        Some(Deployment {
            db,
            s3,
            api: Some(api),
            key,
        })
    }

    async fn worker(&self, extra: &str) -> uploadhook::Running {
        start_process(
            &self.db,
            &[&self.s3.toml, extra],
            Roles::WORKER,
            Arc::new(SystemClock),
        )
        .await
    }

    async fn client(
        &self,
    ) -> proto::webhook_service_client::WebhookServiceClient<tonic::transport::Channel> {
        let addr = self.api.as_ref().unwrap().grpc_addr.unwrap();
        proto::webhook_service_client::WebhookServiceClient::connect(format!("http://{addr}"))
            .await
            .unwrap()
    }

    async fn create_confirmed(&self, url: &str, priority: proto::Priority) -> String {
        let mut client = self.client().await;
        let mut req = create_request(url, "a.txt");
        req.priority = priority as i32;
        let created = client
            .create_upload_webhook(authed(&self.key, req))
            .await
            .unwrap()
            .into_inner();
        upload(&created, b"hello").await;
        let id = created.webhook.unwrap().id;
        client
            .confirm(authed(&self.key, confirm_request(&id)))
            .await
            .unwrap();
        id
    }

    async fn status(&self, id: &str) -> proto::Webhook {
        self.client()
            .await
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

    async fn wait_for(&self, id: &str, status: Status, within: Duration) -> proto::Webhook {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let w = self.status(id).await;
            if w.status == status as i32 {
                return w;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{id} stuck in {:?}, wanted {status:?}",
                w.status()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    async fn stop(mut self) {
        if let Some(api) = self.api.take() {
            api.stop().await;
        }
        self.db.cleanup().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_api_two_workers_deliver_each_webhook_once() {
    let Some(d) = Deployment::new("").await else {
        return;
    };
    let w1 = d.worker("").await;
    let w2 = d.worker("").await;
    let rx = Receiver::start().await;
    let mut ids = Vec::new();
    for i in 0..30 {
        let p = if i % 3 == 0 {
            proto::Priority::High
        } else {
            proto::Priority::Normal
        };
        ids.push(d.create_confirmed(&rx.url, p).await);
    }
    for id in &ids {
        d.wait_for(id, Status::Completed, Duration::from_secs(30))
            .await;
    }
    let got = rx.received();
    let mut seen: Vec<String> = got
        .iter()
        .map(|r| r.headers["webhook-id"].clone())
        .collect();
    seen.sort();
    let mut want = ids.clone();
    want.sort();
    assert_eq!(seen, want, "every webhook delivered exactly once");

    // `uploadhook status` sees the same deployment.
    let cfg = uploadhook::config::Config::from_toml_layers(&[
        crate::helpers::FAST,
        &format!("[database]\nurl = \"{}\"\n", d.db.url),
        &d.db.queue_toml,
        &d.s3.toml,
    ])
    .unwrap();
    let report = uploadhook::ops::status(&cfg).await.unwrap();
    let completed = report
        .by_status
        .iter()
        .find(|(s, _)| *s == uploadhook::domain::Status::Completed)
        .unwrap()
        .1;
    assert_eq!(completed, 30);
    let q = report.queue.as_ref().unwrap();
    assert_eq!((q.pending, q.delayed, q.poison), (0, 0, 0));
    assert!(report.to_string().contains("completed    30"));
    w1.stop().await;
    w2.stop().await;
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_workers_attempt_is_taken_over() {
    // The job comes back 9 s after it was taken, past the 6 s an attempt
    // may take (a wait for a request at its host, then the POST), so
    // that the survivor takes the attempt over within the test. The crash
    // must come before the attempt's own timeout (3 s), or the crashing
    // worker records a failed attempt first: the test waits for the
    // request at the receiver, not for the status, so that a loaded
    // machine leaves it seconds, not a poll.
    let fast = "[delivery]\ntimeout = \"3s\"\n[queue]\nvisibility_timeout = \"9s\"\n";
    let Some(d) = Deployment::new(fast).await else {
        return;
    };
    let rx = Receiver::start().await;
    // The first request is held past the attempt timeout.
    rx.hold_next(Duration::from_secs(30));
    let crashing = d.worker(fast).await;
    let id = d.create_confirmed(&rx.url, proto::Priority::Normal).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while rx.in_flight() == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the first attempt never reached the receiver"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    // The worker dies mid-attempt: its tasks are dropped, nothing is acked.
    drop(crashing);
    assert_eq!(
        d.status(&id).await.status(),
        Status::Delivering,
        "the crash came before the attempt ended"
    );
    let survivor = d.worker(fast).await;
    let w = d
        .wait_for(&id, Status::Completed, Duration::from_secs(30))
        .await;
    let got = rx.received();
    assert_eq!(
        got.len(),
        2,
        "the attempt was made again by the surviving worker"
    );
    assert!(got.iter().all(|r| r.headers["webhook-id"] == id));
    assert_eq!(w.attempt_count, 1, "only the finished attempt is recorded");
    survivor.stop().await;
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reconciler_requeues_after_redis_loses_its_data() {
    let fast = "[delivery]\ntimeout = \"3s\"\nretry_schedule = [\"1s\"]\n[queue]\nvisibility_timeout = \"4s\"\n";
    let Some(d) = Deployment::new(fast).await else {
        return;
    };
    let worker = d.worker(fast).await;
    let rx = Receiver::start().await;
    rx.answer(&[503]);
    let id = d.create_confirmed(&rx.url, proto::Priority::Normal).await;
    d.wait_for(&id, Status::Retrying, Duration::from_secs(20))
        .await;
    // Redis loses everything of this deployment (a restart without
    // persistence): the delayed retry is gone.
    let (url, prefix) = (
        std::env::var("UPLOADHOOK_TEST_REDIS_URL").unwrap(),
        d.db.queue_toml
            .split("prefix = \"")
            .nth(1)
            .unwrap()
            .split('"')
            .next()
            .unwrap()
            .to_string(),
    );
    let client = redis::Client::open(url).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{{{prefix}:*"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(!keys.is_empty());
    let _: () = redis::cmd("DEL")
        .arg(&keys)
        .query_async(&mut conn)
        .await
        .unwrap();
    // The database still says RETRYING: the reconciler puts it back.
    d.wait_for(&id, Status::Completed, Duration::from_secs(30))
        .await;
    assert_eq!(rx.received().len(), 2);
    worker.stop().await;
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_queue_refuses_split_roles() {
    let db = TestDb::new(Backend::Sqlite).await.unwrap();
    let cfg = uploadhook::config::Config::from_toml_layers(&[
        crate::helpers::FAST,
        &format!("[database]\nurl = \"{}\"\n", db.url),
    ])
    .unwrap();
    let listeners = uploadhook::Listeners {
        grpc: None,
        http: tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        s3: None,
    };
    let err = uploadhook::start(cfg, listeners, Arc::new(SystemClock), Roles::WORKER)
        .await
        .err()
        .expect("a worker cannot share an in-process queue");
    assert!(err.to_string().contains("queue.backend"), "{err}");
}

/// A private Redis server on its own port, killed on drop.
struct PrivateRedis {
    child: std::process::Child,
}

impl PrivateRedis {
    fn start(port: u16) -> PrivateRedis {
        let child = std::process::Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server is installed");
        PrivateRedis { child }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_at_start_then_back_loses_nothing() {
    // A port with nothing on it (yet).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let queue = format!(
        "[delivery]\ntimeout = \"3s\"\n[queue]\nredis_url = \"redis://127.0.0.1:{port}\"\nvisibility_timeout = \"4s\"\n"
    );
    let Some(d) = Deployment::new(&queue).await else {
        return;
    };
    let worker = d.worker(&queue).await;
    // Without Redis the API stays ready (it records work), a worker not.
    let ready = |addr: std::net::SocketAddr| async move {
        reqwest::get(format!("http://{addr}/readyz"))
            .await
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!(ready(d.api.as_ref().unwrap().http_addr).await, 200);
    assert_eq!(ready(worker.http_addr).await, 503);
    let rx = Receiver::start().await;
    // The API answers and records the Confirm without Redis.
    let id = d.create_confirmed(&rx.url, proto::Priority::Normal).await;
    assert_eq!(d.status(&id).await.status(), Status::Verifying);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(rx.received().is_empty());
    // Redis comes up: the reconciler finds the overdue webhook.
    let _redis = PrivateRedis::start(port);
    d.wait_for(&id, Status::Completed, Duration::from_secs(30))
        .await;
    assert_eq!(rx.received().len(), 1);
    assert_eq!(ready(worker.http_addr).await, 200);
    worker.stop().await;
    d.stop().await;
}

/// A process opens `database.min_connections` of its pool before it
/// serves, so that a burst after start does not wait for PostgreSQL to
/// start backends; a pool opened whole closes none for being idle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_process_opens_its_pool_at_start() {
    // The whole pool of the tests (`TestDb::pool_toml`: 5) in the API.
    let Some(d) = Deployment::new("[database]\nmin_connections = 5\n").await else {
        return;
    };
    let worker = d.worker("[database]\nmin_connections = 2\n").await;
    for (process, running, min, whole) in [
        ("api", d.api.as_ref().unwrap(), 5, true),
        ("worker", &worker, 2, false),
    ] {
        let pool = running.store.db().pool().get_postgres_connection_pool();
        let options = pool.options();
        assert_eq!(options.get_min_connections(), min, "{process}");
        assert_eq!(options.get_max_connections(), 5, "{process}");
        assert!(pool.size() >= min, "{process}: {} open", pool.size());
        assert_eq!(options.get_idle_timeout().is_none(), whole, "{process}");
    }
    worker.stop().await;
    d.stop().await;
}
