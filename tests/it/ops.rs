//! gRPC health, reflection (what grpcurl uses), and expiry.

use std::sync::Arc;

use tonic::Code;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use tonic_reflection::pb::v1::{
    ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
    server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
};
use uploadhook::{clock::ManualClock, proto::Status};

use crate::{
    backend_tests,
    flow::{confirm, create_and_upload},
    helpers::{Receiver, TestApp, TestDb, authed, confirm_request, create_request, get, wait_for},
};

backend_tests!(
    health_and_reflection_answer,
    confirm_after_expiry_fails_and_expires,
    metrics_count_what_happened,
);

async fn health_and_reflection_answer(db: &TestDb) {
    let mut app = TestApp::start(db, "").await;
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", app.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel.clone());
    let status = health
        .check(HealthCheckRequest {
            service: "uploadhook.v1.WebhookService".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status();
    assert_eq!(status, ServingStatus::Serving);

    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let resp = stream.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
        panic!("unexpected reflection answer: {resp:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"uploadhook.v1.WebhookService".to_string()),
        "{names:?}"
    );
    app.stop().await;
}

async fn confirm_after_expiry_fails_and_expires(db: &TestDb) {
    let clock = ManualClock::new(chrono::Utc::now());
    let mut app = TestApp::start_with(db, "", Arc::new(clock.clone()), None).await;
    let mut client = app.client().await;
    let mut req = create_request("http://127.0.0.1:1/hook", "a.txt");
    req.expires_in = Some(prost_types::Duration {
        seconds: 60,
        nanos: 0,
    });
    let mut req2 = req.clone();
    req2.filename = "b.txt".into();
    let a = client
        .create_upload_webhook(authed(&app.key_a, req))
        .await
        .unwrap()
        .into_inner();
    let b = client
        .create_upload_webhook(authed(&app.key_a, req2))
        .await
        .unwrap()
        .into_inner();
    let (a, b) = (a.webhook.unwrap(), b.webhook.unwrap());
    assert_eq!(
        a.expires_at.unwrap().seconds - a.created_at.unwrap().seconds,
        60
    );

    // One second before expiry, Confirm is accepted.
    clock.advance(chrono::Duration::seconds(59));
    let ok = client
        .confirm(authed(&app.key_a, confirm_request(&a.id)))
        .await
        .unwrap();
    assert_eq!(ok.into_inner().webhook.unwrap().status(), Status::Verifying);

    // One second after, it is refused and the webhook is EXPIRED.
    clock.advance(chrono::Duration::seconds(2));
    let err = client
        .confirm(authed(&app.key_a, confirm_request(&b.id)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("expired"), "{}", err.message());
    assert_eq!(get(&app, &app.key_a, &b.id).await.status(), Status::Expired);
    app.stop().await;
}

/// The value of the first sample line that starts with `prefix` and
/// contains every one of `having`.
fn sample(text: &str, prefix: &str, having: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(prefix) && having.iter().all(|h| l.contains(h)))
        .find_map(|l| l.rsplit(' ').next()?.parse().ok())
}

async fn metrics_count_what_happened(db: &TestDb) {
    // An attempt may take 15 s here: the held one below stays in hand
    // while the metrics are read, however slow the machine.
    let cfg = "[delivery]\ntimeout = \"15s\"\n[queue]\nvisibility_timeout = \"30s\"\n";
    let mut app = TestApp::start(db, cfg).await;
    let rx = Receiver::start().await;
    let created = create_and_upload(&app, &rx.url, Some(b"hello"), None).await;
    let id = created.webhook.unwrap().id;
    confirm(&app, &id, "").await.unwrap();
    wait_for(&app, &app.key_a, &id, Status::Completed).await;
    // One call over REST as well.
    let http = reqwest::Client::new();
    let r = http
        .get(app.http_url(&format!("/v1/webhooks/{id}")))
        .header("authorization", format!("Bearer {}", app.key_a))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    let r = http.get(app.http_url("/metrics")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let text = r.text().await.unwrap();
    // Counters are per process and the tests share one: at least ours.
    let at_least_one = |prefix: &str, having: &[&str]| {
        let v = sample(&text, prefix, having);
        assert!(
            v.unwrap_or(0.0) >= 1.0,
            "{prefix} {having:?}: {v:?}\n{text}"
        );
    };
    at_least_one("uploadhook_deliveries_total", &["outcome=\"completed\""]);
    at_least_one("uploadhook_verifications_total", &["outcome=\"verified\""]);
    at_least_one(
        "uploadhook_rpc_server_duration_seconds_count",
        &[
            "rpc_method=\"Confirm\"",
            "rpc_grpc_status_code=\"OK\"",
            "transport=\"grpc\"",
        ],
    );
    at_least_one(
        "uploadhook_rpc_server_duration_seconds_count",
        &["rpc_method=\"GetStatus\"", "transport=\"http\""],
    );
    at_least_one("uploadhook_delivery_lag_seconds_count", &[]);
    // Gauges read from this deployment's database and queue.
    at_least_one("uploadhook_webhooks", &["status=\"completed\""]);
    assert!(
        sample(&text, "uploadhook_queue_delayed", &[]).is_some(),
        "{text}"
    );
    assert!(
        sample(&text, "uploadhook_dead_letters", &[]).is_some(),
        "{text}"
    );
    // Bounded labels: no webhook id, no URL.
    assert!(!text.contains(&id), "a webhook id leaked into a label");
    assert!(!text.contains("127.0.0.1"), "a URL leaked into a label");

    // While a delivery is held by the receiver, its job is in the queue
    // (taken, not acked) and the webhook is DELIVERING.
    rx.hold_next(std::time::Duration::from_secs(6));
    let held = create_and_upload(&app, &rx.url, Some(b"held"), None).await;
    let held_id = held.webhook.unwrap().id;
    confirm(&app, &held_id, "").await.unwrap();
    // In the receiver's hand (claimed DELIVERING before it was sent).
    while rx.in_flight() == 0 {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let text = http
        .get(app.http_url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let pending = sample(&text, "uploadhook_queue_pending", &[]).unwrap_or(0.0);
    assert!(pending >= 1.0, "queue_pending {pending}\n{text}");
    let delivering = sample(&text, "uploadhook_webhooks", &["status=\"delivering\""]);
    assert!(delivering.unwrap_or(0.0) >= 1.0, "{text}");
    wait_for(&app, &app.key_a, &held_id, Status::Completed).await;

    let readyz = http.get(app.http_url("/readyz")).send().await.unwrap();
    assert_eq!(readyz.status(), 200);
    let body = readyz.text().await.unwrap();
    assert!(
        body.contains("database: ok")
            && body.contains("migrations: ok")
            && body.contains("queue: ok"),
        "{body}"
    );
    app.stop().await;
}

/// `/readyz` answers 503 while the database is unreachable (a loopback
/// proxy in front of PostgreSQL refuses connections), and 200 again once
/// it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_fails_while_the_database_is_unreachable_and_recovers() {
    let Some(db) = TestDb::new(crate::helpers::Backend::Postgres).await else {
        return;
    };
    let mut url = reqwest::Url::parse(&db.url).unwrap();
    let upstream = std::net::ToSocketAddrs::to_socket_addrs(&(
        url.host_str().unwrap().to_string(),
        url.port().unwrap_or(5432),
    ))
    .unwrap()
    .next()
    .unwrap();
    let proxy = crate::helpers::CuttableProxy::start(upstream).await;
    url.set_host(Some("127.0.0.1")).unwrap();
    url.set_port(Some(proxy.addr.port())).unwrap();
    let mut app = TestApp::start(&db, &format!("[database]\nurl = \"{url}\"\n")).await;
    let http = reqwest::Client::new();
    let readyz = || async {
        let r = http.get(app.http_url("/readyz")).send().await.unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    };
    let wait_for = |want: u16| async move {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let (status, body) = readyz().await;
            if status == want {
                return body;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "/readyz still {status}: {body}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    };
    assert_eq!(readyz().await.0, 200);
    proxy.set_down(true);
    let body = wait_for(503).await;
    assert!(body.contains("database: unavailable"), "{body}");
    proxy.set_down(false);
    let body = wait_for(200).await;
    assert!(body.contains("database: ok"), "{body}");
    app.stop().await;
    db.cleanup().await;
}
