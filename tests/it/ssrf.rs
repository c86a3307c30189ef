//! Private-network (SSRF) protection end to end, with no exceptions
//! (`delivery.allow_cidrs = []`). The blocked target is loopback itself:
//! the receiver listens on 127.0.0.1, and must get nothing. No test here
//! connects to, or asks to connect to, anything outside 127.0.0.0/8; the
//! other ranges are tested on `pipeline::ssrf::classify` alone.

use tonic::Code;
use uploadhook::proto::Status;

use crate::{
    backend_tests,
    helpers::{
        Receiver, TestApp, TestDb, authed, confirm_request, create_confirmed, create_request,
        upload, wait_for,
    },
};

backend_tests!(
    literal_loopback_url_is_refused_at_create,
    hostname_resolving_to_loopback_is_refused_at_connect_time,
    literal_url_allowed_at_create_is_refused_at_delivery_once_disallowed,
);

const NO_EXCEPTIONS: &str = "[delivery]\nallow_cidrs = []\n";

async fn literal_loopback_url_is_refused_at_create(db: &TestDb) {
    let mut app = TestApp::start(db, NO_EXCEPTIONS).await;
    let rx = Receiver::start().await;
    assert!(rx.url.starts_with("http://127.0.0.1:"), "{}", rx.url);
    let err = app
        .client()
        .await
        .create_upload_webhook(authed(&app.key_a, create_request(&rx.url, "a.txt")))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("webhook.url"), "{}", err.message());
    assert!(err.message().contains("loopback"), "{}", err.message());
    assert!(rx.received().is_empty());
    app.stop().await;
}

/// A blocked target is a failed attempt like any other: each attempt
/// stores the refusal, retries follow the schedule (two in the tests'
/// config), then the webhook is dead-lettered. Nothing is ever sent.
async fn assert_refused_every_attempt(app: &TestApp, rx: &Receiver, id: &str, says: &str) {
    let w = wait_for(app, &app.key_a, id, Status::DeadLetter).await;
    assert_eq!(w.attempt_count, 3, "{w:?}");
    assert_eq!(w.attempts.len(), 3);
    for a in &w.attempts {
        assert_eq!(a.response_status, 0, "{a:?}");
        assert!(a.error.contains(says), "{a:?}");
    }
    assert!(w.last_error.contains(says), "{}", w.last_error);
    assert!(rx.received().is_empty(), "the receiver got nothing");
}

async fn hostname_resolving_to_loopback_is_refused_at_connect_time(db: &TestDb) {
    let mut app = TestApp::start(db, NO_EXCEPTIONS).await;
    let rx = Receiver::start().await;
    // `localhost` is a name: Create cannot judge it and accepts it.
    let url = rx.url.replace("127.0.0.1", "localhost");
    let id = create_confirmed(&app, &url, "a.txt").await;
    assert_refused_every_attempt(
        &app,
        &rx,
        &id,
        "blocked: localhost resolves only to loopback addresses",
    )
    .await;
    app.stop().await;
}

/// reqwest never resolves an IP-literal host, so the delivery client
/// checks it itself: a webhook created while 127.0.0.1 was allowed is
/// refused once the operator removes the exception.
async fn literal_url_allowed_at_create_is_refused_at_delivery_once_disallowed(db: &TestDb) {
    let mut app = TestApp::start(db, "").await;
    let rx = Receiver::start().await;
    let mut client = app.client().await;
    let created = client
        .create_upload_webhook(authed(&app.key_a, create_request(&rx.url, "a.txt")))
        .await
        .unwrap()
        .into_inner();
    upload(&created, b"hello").await;
    let id = created.webhook.unwrap().id;
    let root = app.s3_root.clone();
    app.stop().await;

    let mut app = TestApp::start_with(
        db,
        NO_EXCEPTIONS,
        std::sync::Arc::new(uploadhook::clock::SystemClock),
        Some(root),
    )
    .await;
    app.client()
        .await
        .confirm(authed(&app.key_a, confirm_request(&id)))
        .await
        .unwrap();
    assert_refused_every_attempt(&app, &rx, &id, "blocked: 127.0.0.1 is a loopback address").await;
    app.stop().await;
}
