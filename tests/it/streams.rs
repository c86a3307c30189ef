//! StreamEvents: resume without loss or repeat, tenant isolation, SSE with
//! `Last-Event-ID` and heartbeats, and events from another process.

use std::{sync::Arc, time::Duration};

use tonic::{Code, Streaming};
use uploadhook::{
    Roles,
    clock::SystemClock,
    proto::{self, stream_events_response::Kind},
};

use crate::{
    backend_tests,
    helpers::{
        Backend, Receiver, SharedS3, TestApp, TestDb, authed, confirm_request, create_request,
        start_process, upload,
    },
};

backend_tests!(
    resume_after_disconnect_loses_no_event_and_repeats_none,
    streams_never_show_another_tenant,
    sse_resumes_with_last_event_id_and_sends_heartbeats
);

const WITHIN: Duration = Duration::from_secs(20);

async fn open(
    app: &TestApp,
    key: &str,
    req: proto::StreamEventsRequest,
) -> Result<Streaming<proto::StreamEventsResponse>, tonic::Status> {
    app.client()
        .await
        .stream_events(authed(key, req))
        .await
        .map(|r| r.into_inner())
}

/// The next event, skipping heartbeats; bounded so that a hang fails.
async fn next_event(s: &mut Streaming<proto::StreamEventsResponse>) -> proto::WebhookEvent {
    // One deadline for the event: heartbeats do not extend it.
    let deadline = tokio::time::Instant::now() + WITHIN;
    loop {
        let msg = tokio::time::timeout_at(deadline, s.message())
            .await
            .expect("no event in time")
            .expect("stream failed")
            .expect("stream ended");
        if let Some(Kind::Event(e)) = msg.kind {
            return e;
        }
    }
}

async fn create(app: &TestApp, key: &str) -> String {
    app.client()
        .await
        .create_upload_webhook(authed(key, create_request("http://127.0.0.1:9/", "a.txt")))
        .await
        .unwrap()
        .into_inner()
        .webhook
        .unwrap()
        .id
}

async fn cancel(app: &TestApp, key: &str, id: &str) {
    app.client()
        .await
        .cancel_webhook(authed(
            key,
            proto::CancelWebhookRequest {
                webhook_id: id.into(),
            },
        ))
        .await
        .unwrap();
}

async fn resume_after_disconnect_loses_no_event_and_repeats_none(db: &TestDb) {
    let mut app = TestApp::start(db, "").await;
    let key = app.key_a.clone();
    let mut s = open(&app, &key, Default::default()).await.unwrap();

    // Live from now: two events arrive, then the client goes away.
    let first = create(&app, &key).await;
    cancel(&app, &key, &first).await;
    let mut got = vec![next_event(&mut s).await, next_event(&mut s).await];
    drop(s);
    assert_eq!(got[0].r#type, "webhook.created");
    assert_eq!(got[1].r#type, "webhook.cancelled");
    assert_eq!(got[1].status, proto::Status::Cancelled as i32);

    // Events committed while disconnected, from both tenants.
    let mut mine = vec![first.clone()];
    for _ in 0..3 {
        mine.push(create(&app, &key).await);
        create(&app, &app.key_b.clone()).await;
    }
    let cursor = got[1].event_id;
    let mut s = open(
        &app,
        &key,
        proto::StreamEventsRequest {
            after_event_id: cursor,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    for _ in 0..3 {
        got.push(next_event(&mut s).await);
    }
    // Then live again, on the same stream.
    cancel(&app, &key, &mine[3]).await;
    got.push(next_event(&mut s).await);

    // Exactly the tenant's stored events, in order, once each.
    let stored = app
        .store()
        .events_after(
            &uploadhook::domain::TenantId::from_trusted(
                app.store()
                    .authenticate(&key, chrono::Utc::now())
                    .await
                    .unwrap()
                    .unwrap()
                    .as_str()
                    .to_string(),
            ),
            None,
            0,
            100,
        )
        .await
        .unwrap();
    let stored: Vec<(i64, String)> = stored.into_iter().map(|e| (e.id, e.kind)).collect();
    let streamed: Vec<(i64, String)> = got.iter().map(|e| (e.event_id, e.r#type.clone())).collect();
    assert_eq!(streamed, stored);
    assert!(got.iter().all(|e| mine.contains(&e.webhook_id)));
    app.stop().await;
}

async fn streams_never_show_another_tenant(db: &TestDb) {
    let mut app = TestApp::start(db, "").await;
    let (a, b) = (app.key_a.clone(), app.key_b.clone());
    let theirs = create(&app, &b).await;

    // Naming another tenant's webhook answers like an unknown one.
    let err = open(
        &app,
        &a,
        proto::StreamEventsRequest {
            webhook_id: theirs.clone(),
            ..Default::default()
        },
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(err.message(), format!("webhook {theirs} not found"));

    // A replay from the start and a live stream see only the caller's.
    let mut replay = open(
        &app,
        &a,
        proto::StreamEventsRequest {
            after_event_id: 1,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let mut live = open(&app, &a, Default::default()).await.unwrap();
    cancel(&app, &b, &theirs).await;
    create(&app, &b).await;
    let mine = create(&app, &a).await;
    assert_eq!(next_event(&mut live).await.webhook_id, mine);
    assert_eq!(next_event(&mut replay).await.webhook_id, mine);

    // Filters: one webhook, by type and status.
    let other = create(&app, &a).await;
    let mut only = open(
        &app,
        &a,
        proto::StreamEventsRequest {
            webhook_id: other.clone(),
            after_event_id: 1,
            types: vec!["webhook.cancelled".into()],
            statuses: vec![proto::Status::Cancelled as i32],
        },
    )
    .await
    .unwrap();
    cancel(&app, &a, &mine).await;
    cancel(&app, &a, &other).await;
    let e = next_event(&mut only).await;
    assert_eq!(
        (e.webhook_id.as_str(), e.r#type.as_str()),
        (other.as_str(), "webhook.cancelled")
    );

    // Bad filters name their field; no key, no stream.
    let err = open(
        &app,
        &a,
        proto::StreamEventsRequest {
            types: vec!["Not A Type".into()],
            ..Default::default()
        },
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("types[0]: "), "{}", err.message());
    let err = app
        .client()
        .await
        .stream_events(proto::StreamEventsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    app.stop().await;
}

async fn sse_resumes_with_last_event_id_and_sends_heartbeats(db: &TestDb) {
    let mut app = TestApp::start(db, "[streams]\nheartbeat_every = \"100ms\"\n").await;
    let key = app.key_a.clone();
    let mut live = open(&app, &key, Default::default()).await.unwrap();
    let id = create(&app, &key).await;
    cancel(&app, &key, &id).await;
    let created = next_event(&mut live).await;
    let cancelled = next_event(&mut live).await;
    drop(live);

    // Resumed after the first event: only the second, with its id, then
    // heartbeats as comments.
    let mut r = reqwest::Client::new()
        .get(app.http_url(&format!("/v1/events:stream?webhookId={id}")))
        .header("authorization", format!("Bearer {key}"))
        .header("last-event-id", created.event_id.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let mut text = String::new();
    while !text.contains("\n\n: ") {
        let chunk = tokio::time::timeout(WITHIN, r.chunk())
            .await
            .expect("no SSE data in time")
            .unwrap()
            .expect("SSE stream ended");
        text.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    let first = text.split("\n\n").next().unwrap();
    let mut lines = first.lines();
    assert_eq!(lines.next().unwrap(), format!("id: {}", cancelled.event_id));
    let data: serde_json::Value =
        serde_json::from_str(lines.next().unwrap().strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!(data["event"]["eventId"], cancelled.event_id.to_string());
    assert_eq!(data["event"]["type"], "webhook.cancelled");
    assert_eq!(data["event"]["status"], "STATUS_CANCELLED");
    let comment = text.split("\n\n").nth(1).unwrap();
    assert!(
        comment.starts_with(": {\"heartbeat\":{\"sentAt\":"),
        "{comment}"
    );
    drop(r);

    // A bad Last-Event-ID names the header.
    let r = reqwest::Client::new()
        .get(app.http_url("/v1/events:stream"))
        .header("authorization", format!("Bearer {key}"))
        .header("last-event-id", "yesterday")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: serde_json::Value = r.json().await.unwrap();
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .starts_with("Last-Event-ID: "),
        "{body}"
    );
    app.stop().await;
}

/// The API process serves the stream; a worker process commits the
/// verification and delivery events. Only Redis pub/sub connects them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_from_another_process_arrives_on_a_stream() {
    let Some(db) = TestDb::new(Backend::PostgresRedis).await else {
        return;
    };
    let s3 = SharedS3::start().await;
    // Polling would also find the events: make it too slow to matter.
    let slow_poll = "[streams]\npoll_every = \"1h\"\n";
    let api = start_process(
        &db,
        &[&s3.toml, slow_poll],
        Roles::API,
        Arc::new(SystemClock),
    )
    .await;
    let key = api
        .store
        .create_api_key("tenant-a", chrono::Utc::now())
        .await
        .unwrap()
        .plaintext;
    let worker = start_process(
        &db,
        &[&s3.toml, slow_poll],
        Roles::WORKER,
        Arc::new(SystemClock),
    )
    .await;
    // No stream listens yet: the API process is not subscribed. The
    // worker serves no stream: it publishes and never subscribes.
    assert!(!api.store.bus().live());
    assert!(!worker.store.bus().live());
    let rx = Receiver::start().await;
    let mut client = proto::webhook_service_client::WebhookServiceClient::connect(format!(
        "http://{}",
        api.grpc_addr.unwrap()
    ))
    .await
    .unwrap();
    let created = client
        .create_upload_webhook(authed(&key, create_request(&rx.url, "a.txt")))
        .await
        .unwrap()
        .into_inner();
    let id = created.webhook.clone().unwrap().id;
    upload(&created, b"hello").await;

    let mut s = client
        .stream_events(authed(
            &key,
            proto::StreamEventsRequest {
                webhook_id: id.clone(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    // The stream made the API process subscribe (the stream waited for it
    // if the subscriber was connected; it may have started just now).
    let deadline = tokio::time::Instant::now() + WITHIN;
    while !api.store.bus().live() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never subscribed to Redis"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    client
        .confirm(authed(&key, confirm_request(&id)))
        .await
        .unwrap();
    let mut types = vec![];
    while types.last().map(String::as_str) != Some("delivery.succeeded") {
        types.push(next_event(&mut s).await.r#type);
    }
    assert_eq!(
        types,
        [
            "upload.confirmed",
            "upload.verified",
            "delivery.started",
            "delivery.succeeded"
        ]
    );
    worker.stop().await;
    api.stop().await;
    db.cleanup().await;
}

/// An event of tenant `ten_x`, as a bus carries it.
fn bus_event(id: i64) -> uploadhook::events::Event {
    use uploadhook::domain::{Status, TenantId, WebhookId};
    uploadhook::events::Event {
        id,
        tenant_id: TenantId::from_trusted("ten_x".into()),
        webhook_id: WebhookId::from_trusted("wh_x".into()),
        kind: "webhook.completed".into(),
        status: Status::Completed,
        occurred_at: chrono::Utc::now(),
    }
}

/// A pub/sub connection that breaks is made again by itself; meanwhile
/// the bus says it is not live (so followers poll), and afterwards events
/// from another process wake it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_redis_subscription_reconnects_by_itself() {
    use uploadhook::{
        events::{EventBus, redis::RedisEventBus},
        pipeline::redis_conn::RedisTarget,
    };
    let Some(url) = crate::helpers::required_env("UPLOADHOOK_TEST_REDIS_URL") else {
        return;
    };
    let upstream = {
        let hostport = url.trim_start_matches("redis://").trim_end_matches('/');
        tokio::net::lookup_host(hostport)
            .await
            .unwrap()
            .next()
            .unwrap()
    };
    let proxy = crate::helpers::CuttableProxy::start(upstream).await;
    let prefix = format!("test-bus-{}", uuid::Uuid::new_v4().simple());
    let stop = tokio_util::sync::CancellationToken::new();
    let through_proxy = RedisEventBus::start(
        RedisTarget::parse(&format!("redis://{}", proxy.addr)).unwrap(),
        &prefix,
        16,
        stop.clone(),
    )
    .unwrap();
    let direct =
        RedisEventBus::start(RedisTarget::parse(&url).unwrap(), &prefix, 16, stop.clone()).unwrap();
    let wait = |cond: Box<dyn Fn() -> bool + Send>, what: &'static str| async move {
        let deadline = tokio::time::Instant::now() + WITHIN;
        while !cond() {
            assert!(tokio::time::Instant::now() < deadline, "{what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    // A bus subscribes while a stream of its process listens.
    let mut rx = through_proxy.subscribe();
    let _on_direct = direct.subscribe();
    let (a, b) = (through_proxy.clone(), direct.clone());
    wait(Box::new(move || a.live() && b.live()), "never subscribed").await;

    proxy.cut();
    let a = through_proxy.clone();
    wait(Box::new(move || !a.live()), "the cut was not noticed").await;
    let a = through_proxy.clone();
    wait(Box::new(move || a.live()), "never subscribed again").await;

    let event = bus_event(7);
    direct.publish(event.clone());
    let got = tokio::time::timeout(WITHIN, rx.recv())
        .await
        .expect("no wake-up after reconnecting")
        .unwrap();
    assert_eq!(got.id, event.id);
    assert_eq!(got.tenant_id, event.tenant_id);
    stop.cancel();
}

/// The subscriber pings its connection every 5 s to notice one that died
/// silently. Subscribed, Redis answers a ping with `["pong", ""]`, not
/// `PONG`: an answer taken for a failure would drop the subscription at
/// every ping (streams polling for a second of every six, and a warning
/// each time). It stays live across several pings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_outlives_its_pings() {
    use uploadhook::{
        events::{EventBus, redis::RedisEventBus},
        pipeline::redis_conn::RedisTarget,
    };
    let Some(url) = crate::helpers::required_env("UPLOADHOOK_TEST_REDIS_URL") else {
        return;
    };
    let prefix = format!("test-bus-{}", uuid::Uuid::new_v4().simple());
    let stop = tokio_util::sync::CancellationToken::new();
    let bus =
        RedisEventBus::start(RedisTarget::parse(&url).unwrap(), &prefix, 16, stop.clone()).unwrap();
    let _stream = bus.subscribe();
    let deadline = tokio::time::Instant::now() + WITHIN;
    while !bus.live() {
        assert!(tokio::time::Instant::now() < deadline, "never subscribed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Two pings (5 s apart), each answered within the 5 s it may take.
    let until = tokio::time::Instant::now() + Duration::from_secs(11);
    while tokio::time::Instant::now() < until {
        assert!(bus.live(), "the subscription was dropped");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.cancel();
}

/// A worker-only process publishes its events and never subscribes: no
/// stream is served there, and subscribed it would receive every
/// process's events. An API process subscribes only while a stream of its
/// own listens (and `LINGER` after the last one left): an API replica
/// with no stream open receives nothing. It hears the worker while
/// subscribed, and subscribes again for the next stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bus_subscribes_only_while_a_stream_listens() {
    use uploadhook::{
        events::{
            EventBus,
            redis::{LINGER, RedisEventBus},
        },
        pipeline::redis_conn::RedisTarget,
    };
    let Some(url) = crate::helpers::required_env("UPLOADHOOK_TEST_REDIS_URL") else {
        return;
    };
    let prefix = format!("test-bus-{}", uuid::Uuid::new_v4().simple());
    let stop = tokio_util::sync::CancellationToken::new();
    let target = || RedisTarget::parse(&url).unwrap();
    let api = RedisEventBus::start(target(), &prefix, 16, stop.clone()).unwrap();
    let worker = RedisEventBus::publisher(target(), &prefix, 16, stop.clone());
    let mut conn = redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let channel = format!("{prefix}:events");
    let mut subscribers = async || -> i64 {
        let (_, n): (String, i64) = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg(&channel)
            .query_async(&mut conn)
            .await
            .unwrap();
        n
    };
    // Connected, and still not subscribed.
    let deadline = tokio::time::Instant::now() + WITHIN;
    while !api.connected() {
        assert!(tokio::time::Instant::now() < deadline, "never connected");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!worker.connected());
    // A while later, still not: nothing subscribes without a stream.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!api.live());
    assert_eq!(subscribers().await, 0, "subscribed with no stream");

    let mut rx = api.subscribe();
    // One round trip once woken: well within the 5 s after which the
    // subscriber's ping would have noticed the stream by itself.
    api.ready(Duration::from_secs(4)).await;
    assert!(api.live(), "ready before subscribing");
    assert!(!worker.live());
    assert_eq!(subscribers().await, 1, "only the API process subscribes");
    let event = bus_event(9);
    worker.publish(event.clone());
    let got = tokio::time::timeout(WITHIN, rx.recv())
        .await
        .expect("the API process did not hear the worker")
        .unwrap();
    assert_eq!(got.id, event.id);

    // The last stream goes: unsubscribed after the linger, not before.
    drop(rx);
    let gone = tokio::time::Instant::now();
    let deadline = gone + WITHIN;
    while subscribers().await > 0 {
        assert!(tokio::time::Instant::now() < deadline, "never unsubscribed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(gone.elapsed() >= LINGER, "unsubscribed before the linger");
    assert!(!api.live());

    // The next stream subscribes again and hears the worker again.
    let mut rx = api.subscribe();
    let deadline = tokio::time::Instant::now() + WITHIN;
    while !api.live() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not subscribed again"
        );
        api.ready(WITHIN).await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(subscribers().await, 1);
    worker.publish(bus_event(10));
    let got = tokio::time::timeout(WITHIN, rx.recv())
        .await
        .expect("nothing heard after subscribing again")
        .unwrap();
    assert_eq!(got.id, 10);
    stop.cancel();
}
