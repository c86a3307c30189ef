//! Detection without Confirm: expiry, AUTO checks, the HEAD budget.

use std::{sync::Arc, time::Duration};

use tonic::Code;
use uploadhook::{
    clock::ManualClock,
    proto::{self, Status},
};

use crate::{
    backend_tests,
    helpers::{
        Receiver, TestApp, TestDb, authed, confirm_request, create_request, get, upload, wait_for,
    },
};

backend_tests!(
    pending_webhooks_expire_at_expires_at,
    confirm_past_expires_at_expires_before_any_sweep,
    auto_webhook_is_delivered_without_confirm,
    auto_upload_that_never_happens_expires_and_stops_checking,
    confirm_racing_auto_detection_delivers_once,
    lost_check_jobs_come_back_from_the_database,
    storage_event_starts_delivery_at_once,
    bad_storage_events_are_refused_and_change_nothing,
    sns_subscription_and_notification,
    r2_notifications_pulled_from_the_queue_deliver,
    multipart_etags_are_verified_and_reported_as_given,
);

/// Checks every 100-200 ms; expiry swept every 50 ms.
const QUICK: &str = r#"
[detect]
first_check = "100ms"
max_check_interval = "200ms"
jitter = 0.0
expiry_sweep_every = "50ms"
"#;

fn auto_request(url: &str, name: &str, expires_secs: i64) -> proto::CreateUploadWebhookRequest {
    let mut req = create_request(url, name);
    req.webhook.as_mut().unwrap().trigger = proto::Trigger::Auto as i32;
    req.expires_in = Some(prost_types::Duration {
        seconds: expires_secs,
        nanos: 0,
    });
    req
}

async fn create(
    app: &TestApp,
    req: proto::CreateUploadWebhookRequest,
) -> proto::CreateUploadWebhookResponse {
    app.client()
        .await
        .create_upload_webhook(authed(&app.key_a, req))
        .await
        .unwrap()
        .into_inner()
}

async fn confirm(app: &TestApp, id: &str) -> Result<proto::Webhook, tonic::Status> {
    app.client()
        .await
        .confirm(authed(&app.key_a, confirm_request(id)))
        .await
        .map(|r| r.into_inner().webhook.unwrap())
}

async fn pending_webhooks_expire_at_expires_at(db: &TestDb) {
    let clock = ManualClock::new(chrono::Utc::now());
    let mut app = TestApp::start_with(db, QUICK, Arc::new(clock.clone()), None).await;
    let mut req = create_request("http://127.0.0.1:1/hook", "a.txt");
    req.expires_in = Some(prost_types::Duration {
        seconds: 60,
        nanos: 0,
    });
    let manual = create(&app, req).await.webhook.unwrap();
    let auto = create(&app, auto_request("http://127.0.0.1:1/hook", "b.txt", 60))
        .await
        .webhook
        .unwrap();

    // One second before expiry: many sweeps later, still PENDING.
    clock.advance(chrono::Duration::seconds(59));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        get(&app, &app.key_a, &manual.id).await.status(),
        Status::Pending
    );
    assert_eq!(
        get(&app, &app.key_a, &auto.id).await.status(),
        Status::Pending
    );

    // One second after: the sweep expires both, without any Confirm.
    clock.advance(chrono::Duration::seconds(2));
    let m = wait_for(&app, &app.key_a, &manual.id, Status::Expired).await;
    assert_eq!(m.last_error, "not confirmed before expires_at");
    let a = wait_for(&app, &app.key_a, &auto.id, Status::Expired).await;
    assert_eq!(a.last_error, "upload not detected before expires_at");

    // Confirm after expiry is refused.
    let err = confirm(&app, &manual.id).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("expired"), "{}", err.message());
    let err = confirm(&app, &auto.id).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);

    // The event log has one expiry each.
    for id in [&manual.id, &auto.id] {
        let kinds = event_kinds(&app, id).await;
        assert_eq!(
            kinds.iter().filter(|k| *k == "webhook.expired").count(),
            1,
            "{kinds:?}"
        );
    }
    app.stop().await;
}

/// Confirm after `expires_at`, with no sweep due for an hour: the webhook
/// expires then and there, and is never verified.
async fn confirm_past_expires_at_expires_before_any_sweep(db: &TestDb) {
    let clock = ManualClock::new(chrono::Utc::now());
    let cfg = "[detect]\nexpiry_sweep_every = \"1h\"\n";
    let mut app = TestApp::start_with(db, cfg, Arc::new(clock.clone()), None).await;
    let rx = Receiver::start().await;
    let mut req = create_request(&rx.url, "late.txt");
    req.expires_in = Some(prost_types::Duration {
        seconds: 60,
        nanos: 0,
    });
    let created = create(&app, req).await;
    upload(&created, b"too late").await;
    let id = created.webhook.unwrap().id;
    clock.advance(chrono::Duration::seconds(61));
    let err = confirm(&app, &id).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("expired"), "{}", err.message());
    let w = get(&app, &app.key_a, &id).await;
    assert_eq!(w.status(), Status::Expired);
    assert_eq!(w.last_error, "not confirmed before expires_at");
    let kinds = event_kinds(&app, &id).await;
    assert!(
        !kinds.contains(&"upload.confirmed".to_string()),
        "{kinds:?}"
    );
    assert_eq!(rx.received().len(), 0);
    app.stop().await;
}

/// The event types of a webhook of tenant A, oldest first.
async fn event_kinds(app: &TestApp, id: &str) -> Vec<String> {
    let tenant = app
        .store()
        .authenticate(&app.key_a, chrono::Utc::now())
        .await
        .unwrap()
        .unwrap();
    let id = uploadhook::domain::WebhookId::parse(id).unwrap();
    app.store()
        .events_after(&tenant, Some(&id), 0, 1000)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.kind)
        .collect()
}

async fn auto_webhook_is_delivered_without_confirm(db: &TestDb) {
    let mut app = TestApp::start(db, QUICK).await;
    let rx = Receiver::start().await;
    let created = create(&app, auto_request(&rx.url, "auto.txt", 600)).await;
    let w = created.webhook.clone().unwrap();
    assert_eq!(w.trigger(), proto::Trigger::Auto);
    assert_eq!(w.status(), Status::Pending);
    // Not there yet: checks find nothing, and the webhook waits.
    wait_for_heads(&app, 1).await;
    assert_eq!(get(&app, &app.key_a, &w.id).await.status(), Status::Pending);

    upload(&created, b"landed by itself").await;
    let done = wait_for(&app, &app.key_a, &w.id, Status::Completed).await;
    assert_eq!(done.size, 16);
    let got = rx.received();
    assert_eq!(got.len(), 1);
    let p: serde_json::Value = serde_json::from_slice(&got[0].body).unwrap();
    assert_eq!(p["event"], "upload.completed");
    assert_eq!(p["file"]["size"], 16);
    let kinds = event_kinds(&app, &w.id).await;
    assert!(kinds.contains(&"upload.detected".to_string()), "{kinds:?}");
    assert!(
        !kinds.contains(&"upload.confirmed".to_string()),
        "{kinds:?}"
    );
    // Confirm afterwards answers the current state.
    assert_eq!(
        confirm(&app, &w.id).await.unwrap().status(),
        Status::Completed
    );
    app.stop().await;
}

/// Waits (bounded) until the storage has had at least `n` HEADs.
async fn wait_for_heads(app: &TestApp, n: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while app.heads() < n {
        assert!(tokio::time::Instant::now() < deadline, "no HEAD came");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn auto_upload_that_never_happens_expires_and_stops_checking(db: &TestDb) {
    let mut app = TestApp::start(db, QUICK).await;
    let rx = Receiver::start().await;
    let before = app.heads();
    let w = create(&app, auto_request(&rx.url, "never.txt", 5))
        .await
        .webhook
        .unwrap();
    wait_for_heads(&app, before + 1).await;
    let expired = wait_for(&app, &app.key_a, &w.id, Status::Expired).await;
    assert_eq!(expired.last_error, "upload not detected before expires_at");
    let tenant = app
        .store()
        .authenticate(&app.key_a, chrono::Utc::now())
        .await
        .unwrap()
        .unwrap();
    let id = uploadhook::domain::WebhookId::parse(&w.id).unwrap();
    let row = app
        .store()
        .find_webhook(&tenant, &id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(row.next_check_at, None, "nothing owed in the row");
    // Checks are claimed while PENDING, so the count is final now; a check
    // claimed just before expiry may still be sending its HEAD (for as
    // long as a loaded machine holds it).
    let checks = row.check_count as u64;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while app.heads() - before < checks {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{checks} checks claimed, {} HEADs sent",
            app.heads() - before
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // No further HEAD, no delivery.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        app.heads() - before,
        checks,
        "one HEAD per check, none after expiry"
    );
    assert!(rx.received().is_empty());
    app.stop().await;
}

async fn confirm_racing_auto_detection_delivers_once(db: &TestDb) {
    // settle = 0: the first check that sees the object detects it, so the
    // check and Confirm race for PENDING → VERIFYING.
    let cfg =
        format!("{QUICK}settle = \"0s\"\nfirst_check = \"20ms\"\nmax_check_interval = \"20ms\"\n");
    let cfg = cfg.replace(
        "first_check = \"100ms\"\nmax_check_interval = \"200ms\"\n",
        "",
    );
    let mut app = TestApp::start(db, &cfg).await;
    let rx = Receiver::start().await;
    let mut ids = Vec::new();
    for i in 0..5 {
        let created = create(&app, auto_request(&rx.url, &format!("race{i}.txt"), 600)).await;
        upload(&created, b"race").await;
        let id = created.webhook.unwrap().id;
        // Confirm at about the time the check runs.
        tokio::time::sleep(Duration::from_millis(5 * i)).await;
        let c = confirm(&app, &id).await.unwrap();
        assert_ne!(c.status(), Status::Pending);
        ids.push(id);
    }
    for id in &ids {
        wait_for(&app, &app.key_a, id, Status::Completed).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got = rx.received();
    for id in &ids {
        let n = got
            .iter()
            .filter(|r| &r.headers["webhook-id"] == id)
            .count();
        assert_eq!(n, 1, "{id} delivered {n} times");
        let kinds = event_kinds(&app, id).await;
        let moved = kinds
            .iter()
            .filter(|k| *k == "upload.detected" || *k == "upload.confirmed")
            .count();
        assert_eq!(moved, 1, "one of Confirm and detection wins: {kinds:?}");
    }
    app.stop().await;
}

async fn lost_check_jobs_come_back_from_the_database(db: &TestDb) {
    // Checks every 10 min: the only way the webhook is seen soon is the
    // database bringing its lost check job back.
    let slow = "[detect]\nfirst_check = \"1m\"\nmax_check_interval = \"10m\"\njitter = 0.0\nsettle = \"1s\"\n";
    let mut app = TestApp::start(db, slow).await;
    let root = app.s3_root.clone();
    let rx = Receiver::start().await;
    let created = create(&app, auto_request(&rx.url, "lost.txt", 3600)).await;
    upload(&created, b"x").await;
    let id = created.webhook.unwrap().id;
    let key_a = app.key_a.clone();
    app.stop().await;
    // The queue loses the job (Redis data loss; the in-process queue is
    // empty after a restart anyway).
    db.flush_queue().await;
    // Restarted two minutes later: the check is overdue by more than the
    // visibility timeout, so the reconciler (Redis) or start-up recovery
    // (in-process) queues it again.
    let later = ManualClock::new(chrono::Utc::now() + chrono::Duration::minutes(2));
    let mut app2 = TestApp::start_with(db, slow, Arc::new(later), Some(root)).await;
    wait_for(&app2, &key_a, &id, Status::Completed).await;
    assert_eq!(rx.received().len(), 1);
    app2.stop().await;
}

/// A thousand pending AUTO webhooks with the HEAD budget set: over a
/// window, the HEADs sent stay within what the budget allows (the burst,
/// plus the rate times the window, plus the checks already holding a token
/// when the window opened: at most the worker concurrency). An upper bound
/// only, so a slow machine cannot make it fail. (Without the budget, this
/// machine sent 583 HEADs in 3 s where the budget allows 82.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_pending_auto_webhooks_stay_within_the_head_budget() {
    let db = TestDb::new(crate::helpers::Backend::Sqlite).await.unwrap();
    let (rate, burst, concurrency) = (20.0, 5u64, 16u64);
    let cfg = format!(
        "[detect]\nfirst_check = \"100ms\"\nmax_check_interval = \"200ms\"\nhead_rate = {rate}\n\
         head_burst = {burst}\n[worker]\nconcurrency = {concurrency}\n"
    );
    let mut app = TestApp::start(&db, &cfg).await;
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..4 {
        let (addr, key) = (app.grpc_addr, app.key_a.clone());
        tasks.spawn(async move {
            let mut client = proto::webhook_service_client::WebhookServiceClient::connect(format!(
                "http://{addr}"
            ))
            .await
            .unwrap();
            for i in 0..250 {
                let req = auto_request("http://127.0.0.1:1/hook", &format!("f{t}-{i}.txt"), 3600);
                client
                    .create_upload_webhook(authed(&key, req))
                    .await
                    .unwrap();
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    let (t0, h0) = (std::time::Instant::now(), app.heads());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (h1, window) = (app.heads(), t0.elapsed());
    let sent = h1 - h0;
    let allowed = burst + (rate * window.as_secs_f64()).ceil() as u64 + concurrency;
    assert!(sent > 0, "checks go on under the budget");
    assert!(
        sent <= allowed,
        "{sent} HEADs in {window:?}, budget allows {allowed}"
    );
    app.stop().await;
    db.cleanup().await;
}

/// Verification has its own HEAD budget: an exhausted checks' budget does
/// not hold up confirmed uploads, and `verify.head_rate` limits
/// verification itself (its burst of 2 goes at once, the third waits).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verification_has_its_own_head_budget() {
    let db = TestDb::new(crate::helpers::Backend::Sqlite).await.unwrap();
    // One check token a quarter of an hour, one verification token a
    // quarter of an hour after a burst of 2.
    let cfg = "[detect]\nhead_rate = 0.001\nhead_burst = 1\n\
               [verify]\nhead_rate = 0.001\nhead_burst = 2\n";
    let mut app = TestApp::start(&db, cfg).await;
    let rx = Receiver::start().await;
    // A pending AUTO webhook takes the checks' only token.
    create(&app, auto_request(&rx.url, "auto.txt", 600)).await;
    wait_for_heads(&app, 1).await;
    let mut ids = Vec::new();
    for i in 0..3 {
        let created = create(&app, create_request(&rx.url, &format!("m{i}.txt"))).await;
        upload(&created, b"confirmed").await;
        let id = created.webhook.unwrap().id;
        confirm(&app, &id).await.unwrap();
        ids.push(id);
    }
    // The first two are verified within verification's burst, whatever
    // the checks' budget says.
    let mut done = 0;
    let mut waiting = None;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while done < 2 && tokio::time::Instant::now() < deadline {
        done = 0;
        for id in &ids {
            match get(&app, &app.key_a, id).await.status() {
                Status::Completed => done += 1,
                Status::Verifying => waiting = Some(id.clone()),
                _ => {}
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(done, 2, "two confirmed uploads delivered");
    // The third waits for a verification token.
    let waiting = waiting.expect("one webhook waits for its HEAD");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        get(&app, &app.key_a, &waiting).await.status(),
        Status::Verifying
    );
    assert_eq!(rx.received().len(), 2);
    app.stop().await;
    db.cleanup().await;
}

/// AUTO checks only once an hour, and storage events on.
const EVENTS: &str = r#"
[detect]
first_check = "1h"
max_check_interval = "1h"
[events]
token = "events-token-0123456789"
sns_subscribe_hosts = ["127.0.0.1"]
"#;
const TOKEN: &str = "events-token-0123456789";

fn s3_event(key: &str, etag: &str, size: i64) -> serde_json::Value {
    // Keys are URL-encoded in events, with `+` for a space.
    let encoded = percent_encoding::utf8_percent_encode(key, percent_encoding::NON_ALPHANUMERIC)
        .to_string()
        .replace("%20", "+")
        .replace("%2F", "/");
    serde_json::json!({"Records": [{
        "eventVersion": "2.0",
        "eventSource": "minio:s3",
        "eventName": "s3:ObjectCreated:Put",
        "s3": {
            "bucket": {"name": "uploads"},
            "object": {"key": encoded, "size": size, "eTag": etag, "sequencer": "17A9C1D8E2F0B3C4"}
        }
    }]})
}

async fn post_event(
    app: &TestApp,
    storage: &str,
    auth: Option<&str>,
    body: &str,
) -> (u16, serde_json::Value) {
    let mut req = reqwest::Client::new()
        .post(app.http_url(&format!("/v1/storage-events/{storage}")))
        .header("content-type", "application/json")
        .body(body.to_string());
    if let Some(t) = auth {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or_default())
}

async fn row(app: &TestApp, id: &str) -> uploadhook::store::Webhook {
    let tenant = app
        .store()
        .authenticate(&app.key_a, chrono::Utc::now())
        .await
        .unwrap()
        .unwrap();
    let id = uploadhook::domain::WebhookId::parse(id).unwrap();
    app.store()
        .find_webhook(&tenant, &id)
        .await
        .unwrap()
        .unwrap()
}

async fn storage_event_starts_delivery_at_once(db: &TestDb) {
    let mut app = TestApp::start(db, EVENTS).await;
    let rx = Receiver::start().await;
    let mut req = auto_request(&rx.url, "my file.txt", 3600);
    req.key = "dir/my file+x.txt".into();
    let created = create(&app, req).await;
    let w = created.webhook.clone().unwrap();
    let put = upload(&created, b"hello events").await;
    let etag = put.headers()["etag"]
        .to_str()
        .unwrap()
        .trim_matches('"')
        .to_string();

    // Out of order: a stale event (an older version) first, then the real
    // one; then the real one again (at-least-once senders).
    let stale = s3_event(&w.key, "0123456789abcdef0123456789abcdef", 3).to_string();
    let (code, body) = post_event(&app, "embedded", Some(TOKEN), &stale).await;
    assert_eq!(code, 200, "{body}");
    let good = s3_event(&w.key, &etag, 12).to_string();
    let (code, body) = post_event(&app, "embedded", Some(TOKEN), &good).await;
    assert_eq!(code, 200, "{body}");
    // Delivered long before the hourly check.
    wait_for(&app, &app.key_a, &w.id, Status::Completed).await;
    let (code, body) = post_event(&app, "embedded", Some(TOKEN), &good).await;
    assert_eq!((code, body["matched"].as_u64()), (200, Some(0)), "{body}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(rx.received().len(), 1, "delivered once");
    let kinds = event_kinds(&app, &w.id).await;
    assert_eq!(
        kinds.iter().filter(|k| *k == "upload.detected").count(),
        1,
        "{kinds:?}"
    );
    app.stop().await;
}

async fn bad_storage_events_are_refused_and_change_nothing(db: &TestDb) {
    let mut app = TestApp::start(db, EVENTS).await;
    let created = create(&app, auto_request("http://127.0.0.1:1/hook", "x.txt", 3600)).await;
    upload(&created, b"x").await;
    let w = created.webhook.unwrap();
    let before = row(&app, &w.id).await;
    let good = s3_event(&w.key, "e", 1).to_string();

    let (code, body) = post_event(&app, "embedded", None, &good).await;
    assert_eq!(code, 401, "{body}");
    let (code, _) = post_event(&app, "embedded", Some("events-token-0123456788"), &good).await;
    assert_eq!(code, 401);
    let (code, body) = post_event(&app, "nope", Some(TOKEN), &good).await;
    assert_eq!(code, 404, "{body}");
    let (code, body) = post_event(&app, "embedded", Some(TOKEN), "{not json").await;
    assert_eq!(code, 400);
    assert!(
        body["message"].as_str().unwrap().starts_with("body: "),
        "{body}"
    );
    let missing_key = r#"{"Records":[{"eventName":"s3:ObjectCreated:Put","s3":{"bucket":{"name":"uploads"},"object":{}}}]}"#;
    let (code, body) = post_event(&app, "embedded", Some(TOKEN), missing_key).await;
    assert_eq!(code, 400);
    assert_eq!(body["message"], "Records[0].s3.object.key: is required");
    // Another bucket's object of the same key matches nothing.
    let other = good.replace("\"uploads\"", "\"other\"");
    let (code, body) = post_event(&app, "embedded", Some(TOKEN), &other).await;
    assert_eq!((code, body["matched"].as_u64()), (200, Some(0)), "{body}");

    let after = row(&app, &w.id).await;
    assert_eq!(after.status, "pending");
    assert_eq!(after.next_check_at, before.next_check_at);
    assert_eq!(after.check_count, before.check_count);
    assert_eq!(after.seen_etag, None);
    app.stop().await;
}

async fn sns_subscription_and_notification(db: &TestDb) {
    let mut app = TestApp::start(db, EVENTS).await;
    let rx = Receiver::start().await;
    // A local stand-in for SNS's SubscribeURL.
    let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sns_addr = listener.local_addr().unwrap();
    let h = hits.clone();
    let sns = axum::Router::new().route(
        "/confirm",
        axum::routing::get(move || {
            let h = h.clone();
            async move {
                h.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                "<ConfirmSubscriptionResponse/>"
            }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, sns).await.ok() });
    let url = app.http_url(&format!("/v1/storage-events/embedded?token={TOKEN}"));
    let client = reqwest::Client::new();
    let sns_post = |body: serde_json::Value, kind: &'static str| {
        client
            .post(&url)
            .header("x-amz-sns-message-type", kind)
            .header("content-type", "text/plain; charset=UTF-8")
            .body(body.to_string())
            .send()
    };

    // A SubscribeURL on a host not listed is not fetched.
    let r = sns_post(
        serde_json::json!({"Type": "SubscriptionConfirmation", "TopicArn": "arn:aws:sns:eu-west-1:1:t",
            "SubscribeURL": format!("http://localhost:{}/confirm", sns_addr.port())}),
        "SubscriptionConfirmation",
    )
    .await
    .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 0);
    // A listed one is.
    let r = sns_post(
        serde_json::json!({"Type": "SubscriptionConfirmation", "TopicArn": "arn:aws:sns:eu-west-1:1:t",
            "SubscribeURL": format!("http://{sns_addr}/confirm?Action=ConfirmSubscription")}),
        "SubscriptionConfirmation",
    )
    .await
    .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 1);

    let created = create(&app, auto_request(&rx.url, "sns.txt", 3600)).await;
    let put = upload(&created, b"via sns").await;
    let etag = put.headers()["etag"]
        .to_str()
        .unwrap()
        .trim_matches('"')
        .to_string();
    let w = created.webhook.unwrap();
    let message = s3_event(&w.key, &etag, 7).to_string();
    let r = sns_post(
        serde_json::json!({"Type": "Notification", "MessageId": "m1", "Message": message}),
        "Notification",
    )
    .await
    .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    wait_for(&app, &app.key_a, &w.id, Status::Completed).await;
    assert_eq!(rx.received().len(), 1);
    app.stop().await;
}

/// A local stand-in for the Cloudflare Queues pull-consumer API.
#[derive(Default)]
struct FakeQueue {
    /// (lease id, body, handed out)
    messages: Vec<(String, serde_json::Value, bool)>,
    acked: Vec<String>,
    bad_auth: usize,
}

async fn fake_cloudflare() -> (String, Arc<std::sync::Mutex<FakeQueue>>) {
    use axum::{Json, extract::State, http::HeaderMap, routing::post};
    type S = Arc<std::sync::Mutex<FakeQueue>>;
    async fn pull(
        State(q): State<S>,
        h: HeaderMap,
        Json(req): Json<serde_json::Value>,
    ) -> Json<serde_json::Value> {
        let mut q = q.lock().unwrap();
        if h.get("authorization").and_then(|v| v.to_str().ok()) != Some("Bearer r2-api-token") {
            q.bad_auth += 1;
            return Json(
                serde_json::json!({"success": false, "errors": [{"code": 10000, "message": "Authentication error"}]}),
            );
        }
        assert!(req["visibility_timeout_ms"].as_u64().unwrap() > 0);
        let max = req["batch_size"].as_u64().unwrap() as usize;
        let out: Vec<serde_json::Value> = q
            .messages
            .iter_mut()
            .filter(|m| !m.2)
            .take(max)
            .map(|m| {
                m.2 = true;
                serde_json::json!({"id": m.0, "lease_id": m.0, "attempts": 1,
                    "timestamp_ms": 1_764_331_200_000u64, "body": m.1.to_string(),
                    "metadata": {"CF-Content-Type": "json"}})
            })
            .collect();
        Json(
            serde_json::json!({"success": true, "errors": [], "messages": [],
            "result": {"messages": out, "message_backlog_count": 0}}),
        )
    }
    async fn ack(
        State(q): State<S>,
        Json(req): Json<serde_json::Value>,
    ) -> Json<serde_json::Value> {
        let mut q = q.lock().unwrap();
        let ids: Vec<String> = req["acks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["lease_id"].as_str().unwrap().to_string())
            .collect();
        q.messages.retain(|m| !ids.contains(&m.0));
        let n = ids.len();
        q.acked.extend(ids);
        Json(
            serde_json::json!({"success": true, "errors": [], "result": {"ackCount": n, "retryCount": 0, "warnings": []}}),
        )
    }
    let state: S = Arc::default();
    let app = axum::Router::new()
        .route(
            "/client/v4/accounts/acc123/queues/q456/messages/pull",
            post(pull),
        )
        .route(
            "/client/v4/accounts/acc123/queues/q456/messages/ack",
            post(ack),
        )
        .with_state(state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}/client/v4", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.ok() });
    (base, state)
}

async fn r2_notifications_pulled_from_the_queue_deliver(db: &TestDb) {
    let (base, fake) = fake_cloudflare().await;
    let cfg = format!(
        "[detect]\nfirst_check = \"1h\"\nmax_check_interval = \"1h\"\n\
         [r2_events]\nenabled = true\napi_base = \"{base}\"\naccount_id = \"acc123\"\n\
         queue_id = \"q456\"\napi_token = \"r2-api-token\"\nstorage = \"embedded\"\n\
         batch_size = 10\nvisibility_timeout = \"5s\"\npoll_every = \"50ms\"\n"
    );
    let mut app = TestApp::start(db, &cfg).await;
    let rx = Receiver::start().await;
    let mut req = auto_request(&rx.url, "r2.txt", 3600);
    req.key = "r2 dir/r2.txt".into();
    let created = create(&app, req).await;
    let put = upload(&created, b"from r2").await;
    let etag = put.headers()["etag"]
        .to_str()
        .unwrap()
        .trim_matches('"')
        .to_string();
    let w = created.webhook.unwrap();
    let note = |action: &str, etag: &str| {
        serde_json::json!({"account": "acc123", "action": action, "bucket": "uploads",
            "object": {"key": w.key, "size": 7, "eTag": etag},
            "eventTime": "2026-11-28T12:00:00.000Z"})
    };
    {
        let mut q = fake.lock().unwrap();
        // A removal (ignored), a malformed message (dropped), the upload,
        // and the upload again (at least once).
        q.messages.push(("l1".into(), serde_json::json!({"action": "DeleteObject", "bucket": "uploads", "object": {"key": "x"}}), false));
        q.messages
            .push(("l2".into(), serde_json::json!({"bucket": "uploads"}), false));
        q.messages
            .push(("l3".into(), note("PutObject", &etag), false));
        q.messages
            .push(("l4".into(), note("PutObject", &etag), false));
    }
    wait_for(&app, &app.key_a, &w.id, Status::Completed).await;
    // Every message is acked once handled.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while fake.lock().unwrap().acked.len() < 4 {
        assert!(tokio::time::Instant::now() < deadline, "messages not acked");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(rx.received().len(), 1, "delivered once");
    {
        let q = fake.lock().unwrap();
        let mut acked = q.acked.clone();
        acked.sort();
        assert_eq!(acked, ["l1", "l2", "l3", "l4"]);
        assert!(q.messages.is_empty());
        assert_eq!(q.bad_auth, 0);
    }
    app.stop().await;
}

/// A multipart upload through the storage client: its ETag as completed
/// (`"<hex>-<parts>"`).
async fn multipart_put(app: &TestApp, key: &str, parts: &[&[u8]]) -> String {
    let storage = app.running.as_ref().unwrap().storages.resolve("").unwrap();
    let client = storage.client();
    let up = client
        .create_multipart_upload()
        .bucket(storage.bucket())
        .key(key)
        .content_type("text/plain")
        .send()
        .await
        .unwrap();
    let upload_id = up.upload_id().unwrap();
    let mut done = Vec::new();
    for (i, body) in parts.iter().enumerate() {
        let n = i as i32 + 1;
        let part = client
            .upload_part()
            .bucket(storage.bucket())
            .key(key)
            .upload_id(upload_id)
            .part_number(n)
            .body(body.to_vec().into())
            .send()
            .await
            .unwrap();
        done.push(
            aws_sdk_s3::types::CompletedPart::builder()
                .part_number(n)
                .e_tag(part.e_tag().unwrap())
                .build(),
        );
    }
    let out = client
        .complete_multipart_upload()
        .bucket(storage.bucket())
        .key(key)
        .upload_id(upload_id)
        .multipart_upload(
            aws_sdk_s3::types::CompletedMultipartUpload::builder()
                .set_parts(Some(done))
                .build(),
        )
        .send()
        .await
        .unwrap();
    out.e_tag().unwrap().to_string()
}

async fn multipart_etags_are_verified_and_reported_as_given(db: &TestDb) {
    let mut app = TestApp::start(db, QUICK).await;
    let rx = Receiver::start().await;
    // MANUAL, confirmed with the multipart ETag (quoted, as storage gives it).
    let manual = create(&app, create_request(&rx.url, "parts.txt")).await;
    let m = manual.webhook.unwrap();
    // Every part but the last is at least 5 MiB, as S3 requires.
    let big = vec![b'p'; 5 * 1024 * 1024];
    let etag = multipart_put(&app, &m.key, &[&big, b"second part"]).await;
    assert!(etag.trim_matches('"').ends_with("-2"), "{etag}");
    app.client()
        .await
        .confirm(authed(
            &app.key_a,
            proto::ConfirmRequest {
                webhook_id: m.id.clone(),
                etag: etag.clone(),
            },
        ))
        .await
        .unwrap();
    let done = wait_for(&app, &app.key_a, &m.id, Status::Completed).await;
    assert_eq!(done.etag, etag.trim_matches('"'));
    assert_eq!(done.size, 5 * 1024 * 1024 + 11);
    // AUTO: detected and verified with the same opaque ETag.
    let auto = create(&app, auto_request(&rx.url, "auto-parts.txt", 600)).await;
    let a = auto.webhook.unwrap();
    let etag_a = multipart_put(&app, &a.key, &[&big, &big, b"c"]).await;
    assert!(etag_a.trim_matches('"').ends_with("-3"), "{etag_a}");
    let done = wait_for(&app, &app.key_a, &a.id, Status::Completed).await;
    assert_eq!(done.etag, etag_a.trim_matches('"'));
    // The payloads report the ETags as given.
    let got = rx.received();
    assert_eq!(got.len(), 2);
    let etags: Vec<String> = got
        .iter()
        .map(|r| {
            let p: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
            p["file"]["etag"].as_str().unwrap().to_string()
        })
        .collect();
    assert!(
        etags.contains(&etag.trim_matches('"').to_string()),
        "{etags:?}"
    );
    assert!(
        etags.contains(&etag_a.trim_matches('"').to_string()),
        "{etags:?}"
    );
    // A wrong part count does not pass.
    let wrong = create(&app, create_request(&rx.url, "wrong.txt")).await;
    let w = wrong.webhook.unwrap();
    let real = multipart_put(&app, &w.key, &[&big, b"y"]).await;
    let forged = real.trim_matches('"').replace("-2", "-3");
    app.client()
        .await
        .confirm(authed(
            &app.key_a,
            proto::ConfirmRequest {
                webhook_id: w.id.clone(),
                etag: forged,
            },
        ))
        .await
        .unwrap();
    let failed = wait_for(&app, &app.key_a, &w.id, Status::Failed).await;
    assert!(
        failed.last_error.contains("etag mismatch"),
        "{}",
        failed.last_error
    );
    app.stop().await;
}
