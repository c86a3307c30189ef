//! The upload-webhook flow through gRPC, on SQLite and on PostgreSQL.

use std::sync::Arc;

use sea_orm::ConnectionTrait;
use tonic::Code;
use uploadhook::{
    clock::ManualClock,
    proto::{self, Status},
};

use crate::{
    backend_tests,
    helpers::{
        Receiver, TestApp, TestDb, authed, confirm_request, create_confirmed, create_request,
        create_uploaded, get, upload, wait_for,
    },
};

backend_tests!(
    full_flow_delivers_a_signed_webhook,
    confirm_before_upload_fails_after_head_retries,
    wrong_etag_fails,
    size_mismatch_fails,
    receiver_errors_are_retried_until_completed,
    receiver_always_failing_dead_letters_and_redelivers,
    tenants_cannot_see_each_other,
    restart_keeps_queued_webhooks,
    attempt_cut_off_by_shutdown_is_sent_again,
    tenant_keys_are_separate,
    bad_input_names_the_field,
    idempotency_key_returns_the_same_webhook,
    list_and_cancel,
    a_slow_host_does_not_hold_up_other_hosts,
    deliveries_to_one_host_stay_within_its_limit,
    the_host_limit_is_on_requests_not_on_claims,
    a_delivery_that_waits_too_long_for_its_host_is_put_back,
    a_stopping_worker_puts_back_what_waits_for_its_host,
);

async fn full_flow_delivers_a_signed_webhook(db: &TestDb) {
    let mut app = TestApp::start(db, "").await;
    let rx = Receiver::start().await;
    let mut client = app.client().await;

    let mut req = create_request(&rx.url, "report.txt");
    req.content_length = Some(11);
    let created = client
        .create_upload_webhook(authed(&app.key_a, req))
        .await
        .unwrap()
        .into_inner();
    let w = created.webhook.clone().unwrap();
    assert!(w.id.starts_with("wh_") && w.id.len() == 35, "{}", w.id);
    assert_eq!(w.status(), Status::Pending);
    assert_eq!(created.upload_method, "PUT");
    assert!(created.signing_secret.starts_with("whsec_"));
    assert!(w.key.ends_with("/report.txt"), "{}", w.key);
    assert_eq!(
        created
            .upload_headers
            .get("content-type")
            .map(String::as_str),
        Some("text/plain")
    );

    let put = upload(&created, b"hello world").await;
    let put_etag = put
        .headers()
        .get("etag")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();

    let confirmed = client
        .confirm(authed(
            &app.key_a,
            proto::ConfirmRequest {
                webhook_id: w.id.clone(),
                etag: put_etag.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .webhook
        .unwrap();
    assert_eq!(confirmed.status(), Status::Verifying);

    let done = wait_for(&app, &app.key_a, &w.id, Status::Completed).await;
    assert_eq!(done.size, 11);
    assert_eq!(done.etag, put_etag.trim_matches('"'));
    assert_eq!(done.attempt_count, 1);
    assert_eq!(done.attempts.len(), 1);
    assert_eq!(done.attempts[0].response_status, 200);
    assert_eq!(done.attempts[0].response_body, "receiver says hi");
    assert!(done.verified_at.is_some() && done.completed_at.is_some());

    // Confirming again is idempotent.
    let again = client
        .confirm(authed(&app.key_a, confirm_request(&w.id)))
        .await
        .unwrap()
        .into_inner()
        .webhook
        .unwrap();
    assert_eq!(again.status(), Status::Completed);

    let got = rx.received();
    assert_eq!(got.len(), 1, "delivered exactly once");
    let r = &got[0];
    let ts: i64 = r.headers["webhook-timestamp"].parse().unwrap();
    assert_eq!(r.headers["webhook-id"], w.id);
    uploadhook::verify(
        &created.signing_secret,
        &r.headers["webhook-id"],
        ts,
        &r.body,
        &r.headers["webhook-signature"],
        chrono::Utc::now().timestamp(),
        300,
    )
    .expect("Standard Webhooks signature verifies");
    // The seed plan's body signature, hex HMAC-SHA256 with the same key.
    use base64::Engine;
    use hmac::{KeyInit, Mac};
    let key = base64::engine::general_purpose::STANDARD
        .decode(created.signing_secret.strip_prefix("whsec_").unwrap())
        .unwrap();
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&key).unwrap();
    mac.update(&r.body);
    assert_eq!(
        r.headers["x-webhook-signature"],
        format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
    );
    assert_eq!(r.headers["x-webhook-event"], "upload.completed");
    assert_eq!(r.headers["x-webhook-id"], w.id);
    assert!(r.headers["user-agent"].starts_with("uploadhook/"));

    let p: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(p["event"], "upload.completed");
    assert_eq!(p["webhookId"], w.id.as_str());
    assert_eq!(p["file"]["filename"], "report.txt");
    assert_eq!(p["file"]["key"], w.key.as_str());
    assert_eq!(p["file"]["size"], 11);
    assert_eq!(p["file"]["contentType"], "text/plain");
    assert_eq!(p["file"]["etag"], put_etag.trim_matches('"'));
    assert!(p["file"]["url"].as_str().unwrap().ends_with(&w.key));
    assert_eq!(p["provider"], "s3-compatible");
    assert_eq!(p["metadata"]["user"], "42");
    assert!(chrono::DateTime::parse_from_rfc3339(p["timestamp"].as_str().unwrap()).is_ok());
    app.stop().await;
}

pub(crate) async fn create_and_upload(
    app: &TestApp,
    url: &str,
    body: Option<&[u8]>,
    size: Option<i64>,
) -> proto::CreateUploadWebhookResponse {
    let mut req = create_request(url, "a.txt");
    req.content_length = size;
    let created = app
        .client()
        .await
        .create_upload_webhook(authed(&app.key_a, req))
        .await
        .unwrap()
        .into_inner();
    if let Some(b) = body {
        upload(&created, b).await;
    }
    created
}

pub(crate) async fn confirm(
    app: &TestApp,
    id: &str,
    etag: &str,
) -> Result<proto::Webhook, tonic::Status> {
    app.client()
        .await
        .confirm(authed(
            &app.key_a,
            proto::ConfirmRequest {
                webhook_id: id.into(),
                etag: etag.into(),
            },
        ))
        .await
        .map(|r| r.into_inner().webhook.unwrap())
}

async fn confirm_before_upload_fails_after_head_retries(db: &TestDb) {
    let mut app = TestApp::start(db, "").await;
    let rx = Receiver::start().await;
    let created = create_and_upload(&app, &rx.url, None, None).await;
    let id = created.webhook.unwrap().id;
    confirm(&app, &id, "").await.unwrap();
    let w = wait_for(&app, &app.key_a, &id, Status::Failed).await;
    assert!(
        w.last_error.contains("not found after 3 checks"),
        "{}",
        w.last_error
    );
    assert!(
        rx.received().is_empty(),
        "a failed verification is not delivered"
    );
    app.stop().await;
}

async fn wrong_etag_fails(db: &TestDb) {
    let mut app = TestApp::start(db, "").await;
    let rx = Receiver::start().await;
    let created = create_and_upload(&app, &rx.url, Some(b"abc"), None).await;
    let id = created.webhook.unwrap().id;
    confirm(&app, &id, "\"0123456789abcdef0123456789abcdef\"")
        .await
        .unwrap();
    let w = wait_for(&app, &app.key_a, &id, Status::Failed).await;
    assert!(w.last_error.contains("etag mismatch"), "{}", w.last_error);
    assert!(rx.received().is_empty());
    app.stop().await;
}

async fn size_mismatch_fails(db: &TestDb) {
    let mut app = TestApp::start(db, "").await;
    let rx = Receiver::start().await;
    // The expected size is a signed header of the presigned PUT, so the
    // store itself refuses a different length; upload the expected length
    // through a second webhook's URL to the same key instead.
    let mut first = create_request(&rx.url, "a.txt");
    first.key = "same/object.txt".into();
    first.content_length = Some(10);
    let created = app
        .client()
        .await
        .create_upload_webhook(authed(&app.key_a, first))
        .await
        .unwrap()
        .into_inner();
    let w = created.webhook.clone().unwrap();
    let mut other = create_request(&rx.url, "a.txt");
    other.key = "same/object.txt".into();
    let other = app
        .client()
        .await
        .create_upload_webhook(authed(&app.key_a, other))
        .await
        .unwrap()
        .into_inner();
    upload(&other, b"only 12 byte").await;
    confirm(&app, &w.id, "").await.unwrap();
    let w = wait_for(&app, &app.key_a, &w.id, Status::Failed).await;
    assert!(
        w.last_error
            .contains("size mismatch: expected 10 bytes, object has 12"),
        "{}",
        w.last_error
    );
    assert!(rx.received().is_empty());
    app.stop().await;
}

async fn receiver_errors_are_retried_until_completed(db: &TestDb) {
    let mut app = TestApp::start(db, "").await;
    let rx = Receiver::start().await;
    rx.answer(&[500, 500]);
    let created = create_and_upload(&app, &rx.url, Some(b"x"), None).await;
    let id = created.webhook.unwrap().id;
    confirm(&app, &id, "").await.unwrap();
    let w = wait_for(&app, &app.key_a, &id, Status::Completed).await;
    assert_eq!(w.attempt_count, 3);
    let statuses: Vec<i32> = w.attempts.iter().map(|a| a.response_status).collect();
    assert_eq!(statuses, vec![500, 500, 200]);
    assert_eq!(
        w.attempts.iter().map(|a| a.number).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    assert!(w.attempts[0].error.contains("500"));
    let got = rx.received();
    assert_eq!(got.len(), 3);
    // The same webhook-id on every attempt, so receivers can deduplicate.
    assert!(got.iter().all(|r| r.headers["webhook-id"] == id));
    // The body is identical across attempts.
    assert!(got.iter().all(|r| r.body == got[0].body));
    app.stop().await;
}

async fn receiver_always_failing_dead_letters_and_redelivers(db: &TestDb) {
    let mut app = TestApp::start(db, "").await;
    let rx = Receiver::start().await;
    rx.always(Some(500));
    let created = create_and_upload(&app, &rx.url, Some(b"x"), None).await;
    let id = created.webhook.unwrap().id;
    confirm(&app, &id, "").await.unwrap();
    let w = wait_for(&app, &app.key_a, &id, Status::DeadLetter).await;
    assert_eq!(w.attempt_count, 3, "1 + the 2 retries of the schedule");
    assert!(
        w.last_error.contains("all 3 attempts failed"),
        "{}",
        w.last_error
    );
    let tenant = app
        .store()
        .authenticate(&app.key_a, chrono::Utc::now())
        .await
        .unwrap()
        .unwrap();
    let wid = uploadhook::domain::WebhookId::parse(&id).unwrap();
    let dead = app.store().dead_letters(&tenant, &wid).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert!(dead[0].redriven_at.is_none());

    // Redrive: the receiver is fixed, the webhook completes.
    rx.always(None);
    let mut client = app.client().await;
    let r = client
        .redeliver(authed(
            &app.key_a,
            proto::RedeliverRequest {
                webhook_id: id.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .webhook
        .unwrap();
    assert_eq!(r.status(), Status::Retrying);
    let w = wait_for(&app, &app.key_a, &id, Status::Completed).await;
    assert_eq!(w.attempt_count, 4);
    assert_eq!(w.attempts.len(), 4);
    let dead = app.store().dead_letters(&tenant, &wid).await.unwrap();
    assert!(dead[0].redriven_at.is_some());
    app.stop().await;
}

async fn tenants_cannot_see_each_other(db: &TestDb) {
    let mut app = TestApp::start(db, "").await;
    let rx = Receiver::start().await;
    let created = create_and_upload(&app, &rx.url, Some(b"x"), None).await;
    let id = created.webhook.unwrap().id;
    let mut client = app.client().await;

    let err = client
        .get_status(authed(
            &app.key_b,
            proto::GetStatusRequest {
                webhook_id: id.clone(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let unknown = client
        .get_status(authed(
            &app.key_b,
            proto::GetStatusRequest {
                webhook_id: format!("wh_{}", "0".repeat(32)),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
    assert_eq!(
        err.message().replace(&id, "ID"),
        unknown
            .message()
            .replace(&format!("wh_{}", "0".repeat(32)), "ID"),
        "another tenant's webhook looks exactly like an unknown one"
    );
    let err = client
        .confirm(authed(&app.key_b, confirm_request(&id)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let listed = client
        .list_webhooks(authed(&app.key_b, proto::ListWebhooksRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert!(listed.webhooks.is_empty());
    // Still pending: B's Confirm did nothing.
    assert_eq!(get(&app, &app.key_a, &id).await.status(), Status::Pending);

    let err = client
        .get_status(tonic::Request::new(proto::GetStatusRequest {
            webhook_id: id.clone(),
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let err = client
        .get_status(authed(
            "uhk_not_a_key",
            proto::GetStatusRequest {
                webhook_id: id.clone(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    app.stop().await;
}

async fn restart_keeps_queued_webhooks(db: &TestDb) {
    // The retry is due in an hour: only the restarted process, whose clock
    // is two hours ahead, can deliver it. Recovery is what sends it.
    let slow = "[delivery]\nretry_schedule = [\"1h\"]\n";
    let mut app = TestApp::start(db, slow).await;
    let root = app.s3_root.clone();
    let rx = Receiver::start().await;
    rx.answer(&[503]);
    let created = create_and_upload(&app, &rx.url, Some(b"x"), None).await;
    let id = created.webhook.unwrap().id;
    confirm(&app, &id, "").await.unwrap();
    let w = wait_for(&app, &app.key_a, &id, Status::Retrying).await;
    assert_eq!(w.attempt_count, 1);
    let key_a = app.key_a.clone();
    app.stop().await;
    assert_eq!(rx.received().len(), 1);

    let later = ManualClock::new(chrono::Utc::now() + chrono::Duration::hours(2));
    let mut app2 = TestApp::start_with(db, slow, Arc::new(later), Some(root)).await;
    let w = wait_for(&app2, &key_a, &id, Status::Completed).await;
    assert_eq!(w.attempt_count, 2);
    assert_eq!(rx.received().len(), 2);
    app2.stop().await;
}

async fn attempt_cut_off_by_shutdown_is_sent_again(db: &TestDb) {
    // The attempt may last 20 s, so that only the shutdown cuts it off,
    // however late the stop comes on a loaded machine.
    let cfg = "[delivery]\ntimeout = \"20s\"\n[queue]\nvisibility_timeout = \"40s\"\n";
    let mut app = TestApp::start(db, cfg).await;
    let root = app.s3_root.clone();
    let rx = Receiver::start().await;
    // The receiver holds the first request past the 2 s shutdown grace.
    rx.hold_next(std::time::Duration::from_secs(30));
    let created = create_and_upload(&app, &rx.url, Some(b"x"), None).await;
    let id = created.webhook.unwrap().id;
    confirm(&app, &id, "").await.unwrap();
    // In the receiver's hand (claimed DELIVERING before it was sent).
    while rx.in_flight() == 0 {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    assert_eq!(
        get(&app, &app.key_a, &id).await.status(),
        Status::Delivering
    );
    let key_a = app.key_a.clone();
    app.stop().await;

    // Restarted once the attempt is stale: sent again, same webhook-id.
    let later = ManualClock::new(chrono::Utc::now() + chrono::Duration::minutes(10));
    let mut app2 = TestApp::start_with(db, "", Arc::new(later), Some(root)).await;
    let w = wait_for(&app2, &key_a, &id, Status::Completed).await;
    let got = rx.received();
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].headers["webhook-id"], got[1].headers["webhook-id"]);
    assert_eq!(
        w.attempts.len(),
        1,
        "the cut-off attempt has no stored outcome"
    );
    app2.stop().await;
}

async fn tenant_keys_are_separate(db: &TestDb) {
    let mut app = TestApp::start(db, "").await;
    let rx = Receiver::start().await;
    let mut client = app.client().await;
    let mut req = create_request(&rx.url, "a.txt");
    req.key = "shared/name.txt".into();
    let a = client
        .create_upload_webhook(authed(&app.key_a, req.clone()))
        .await
        .unwrap()
        .into_inner();
    let b = client
        .create_upload_webhook(authed(&app.key_b, req))
        .await
        .unwrap()
        .into_inner();
    let (ka, kb) = (
        a.webhook.clone().unwrap().key,
        b.webhook.clone().unwrap().key,
    );
    assert_ne!(
        ka, kb,
        "the same client key lands in each tenant's own folder"
    );
    assert!(ka.ends_with("/shared/name.txt") && kb.ends_with("/shared/name.txt"));
    // Each upload lands in its own tenant's object.
    upload(&a, b"from a!").await;
    upload(&b, b"from b").await;
    confirm(&app, &get_id(&a), "").await.unwrap();
    let wa = wait_for(&app, &app.key_a, &get_id(&a), Status::Completed).await;
    assert_eq!(wa.size, 7);
    client
        .confirm(authed(&app.key_b, confirm_request(&get_id(&b))))
        .await
        .unwrap();
    let wb = wait_for(&app, &app.key_b, &get_id(&b), Status::Completed).await;
    assert_eq!(wb.size, 6);
    // Cancel and Redeliver of another tenant's webhook: NOT_FOUND.
    let err = client
        .cancel_webhook(authed(
            &app.key_b,
            proto::CancelWebhookRequest {
                webhook_id: get_id(&a),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = client
        .redeliver(authed(
            &app.key_b,
            proto::RedeliverRequest {
                webhook_id: get_id(&a),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    app.stop().await;
}

fn get_id(r: &proto::CreateUploadWebhookResponse) -> String {
    r.webhook.as_ref().unwrap().id.clone()
}

async fn bad_input_names_the_field(db: &TestDb) {
    let mut app = TestApp::start(db, "").await;
    let mut client = app.client().await;
    type Mutation = Box<dyn Fn(&mut proto::CreateUploadWebhookRequest)>;
    let cases: Vec<(&str, Mutation)> = vec![
        (
            "webhook.url",
            Box::new(|r| r.webhook.as_mut().unwrap().url.clear()),
        ),
        (
            "webhook.url",
            Box::new(|r| r.webhook.as_mut().unwrap().url = "file:///etc/passwd".into()),
        ),
        ("storage", Box::new(|r| r.storage = "nope".into())),
        ("key", Box::new(|r| r.key = "a/../b".into())),
        ("key", Box::new(|r| r.key = "/etc/passwd".into())),
        (
            "webhook.metadata",
            Box::new(|r| {
                r.webhook
                    .as_mut()
                    .unwrap()
                    .metadata
                    .insert("k".into(), "v".repeat(10_000));
            }),
        ),
        ("filename", Box::new(|r| r.filename.clear())),
    ];
    for (field, mutate) in cases {
        let mut req = create_request("http://127.0.0.1:1/hook", "a.txt");
        mutate(&mut req);
        let err = client
            .create_upload_webhook(authed(&app.key_a, req))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err:?}");
        assert!(
            err.message().starts_with(&format!("{field}: ")),
            "{field}: {}",
            err.message()
        );
        assert!(
            !err.message().contains(&format!("{field}: {field}:")),
            "{}",
            err.message()
        );
    }
    let err = client
        .confirm(authed(&app.key_a, confirm_request("nope")))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().starts_with("webhook_id: "),
        "{}",
        err.message()
    );
    app.stop().await;
}

async fn idempotency_key_returns_the_same_webhook(db: &TestDb) {
    let mut app = TestApp::start(db, "").await;
    let mut client = app.client().await;
    let mut req = create_request("http://127.0.0.1:1/hook", "a.txt");
    req.idempotency_key = "order-17".into();
    let a = client
        .create_upload_webhook(authed(&app.key_a, req.clone()))
        .await
        .unwrap()
        .into_inner();
    let b = client
        .create_upload_webhook(authed(&app.key_a, req.clone()))
        .await
        .unwrap()
        .into_inner();
    let (wa, wb) = (a.webhook.unwrap(), b.webhook.unwrap());
    assert_eq!(wa.id, wb.id);
    assert_eq!(wa.key, wb.key);
    // Another tenant's identical key is its own.
    let c = client
        .create_upload_webhook(authed(&app.key_b, req))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(c.webhook.unwrap().id, wa.id);
    let listed = client
        .list_webhooks(authed(&app.key_a, proto::ListWebhooksRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.webhooks.len(), 1);
    app.stop().await;
}

async fn list_and_cancel(db: &TestDb) {
    let mut app = TestApp::start(db, "").await;
    let mut client = app.client().await;
    let mut ids = Vec::new();
    for _ in 0..5 {
        let r = client
            .create_upload_webhook(authed(
                &app.key_a,
                create_request("http://127.0.0.1:1/hook", "a.txt"),
            ))
            .await
            .unwrap()
            .into_inner();
        ids.push(r.webhook.unwrap().id);
    }
    // Newest first, two per page.
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = client
            .list_webhooks(authed(
                &app.key_a,
                proto::ListWebhooksRequest {
                    page_size: 2,
                    page_token: token,
                    status: 0,
                },
            ))
            .await
            .unwrap()
            .into_inner();
        seen.extend(page.webhooks.into_iter().map(|w| w.id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    let mut expected = ids.clone();
    expected.reverse();
    assert_eq!(seen, expected);

    let cancelled = client
        .cancel_webhook(authed(
            &app.key_a,
            proto::CancelWebhookRequest {
                webhook_id: ids[0].clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .webhook
        .unwrap();
    assert_eq!(cancelled.status(), Status::Cancelled);
    let err = confirm(&app, &ids[0], "").await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    let only_cancelled = client
        .list_webhooks(authed(
            &app.key_a,
            proto::ListWebhooksRequest {
                page_size: 0,
                page_token: String::new(),
                status: Status::Cancelled as i32,
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(only_cancelled.webhooks.len(), 1);
    app.stop().await;
}

/// Deliveries waiting for a slow host give their worker slot back: with
/// two slots and one delivery at a time per host, a backlog for a slow
/// receiver does not stop another receiver's webhook. (Had the waiting
/// deliveries kept their slots, it would arrive only after most of the
/// backlog, 10 s each.)
async fn a_slow_host_does_not_hold_up_other_hosts(db: &TestDb) {
    // Held 10 s each (an attempt may take 30 s here), so that the seven
    // webhooks are created well within the second slow delivery, however
    // slow the machine.
    let cfg = "[worker]\nconcurrency = 2\nper_host_concurrency = 1\n\
               [delivery]\ntimeout = \"30s\"\n[queue]\nvisibility_timeout = \"60s\"\n";
    let mut app = TestApp::start(db, cfg).await;
    let slow = Receiver::start().await;
    slow.hold_every(std::time::Duration::from_secs(10));
    let fast = Receiver::start().await;
    for i in 0..6 {
        create_confirmed(&app, &slow.url, &format!("slow-{i}.txt")).await;
    }
    let id = create_confirmed(&app, &fast.url, "fast.txt").await;
    wait_for(&app, &app.key_a, &id, Status::Completed).await;
    assert!(
        slow.received().len() <= 2,
        "the other host's webhook waited for {} slow deliveries",
        slow.received().len()
    );
    assert_eq!(slow.max_in_flight(), 1);
    app.stop().await;
}

/// A backlog for one host is delivered whole, once each, never more than
/// `per_host_concurrency` at a time, while the worker has more slots.
async fn deliveries_to_one_host_stay_within_its_limit(db: &TestDb) {
    let mut app = TestApp::start(db, "[worker]\nconcurrency = 8\nper_host_concurrency = 2\n").await;
    let rx = Receiver::start().await;
    rx.hold_every(std::time::Duration::from_millis(100));
    // Every upload first, then every Confirm at once, so that the backlog
    // is there however slow the machine: confirmed one by one, more than
    // 100 ms apart, the deliveries would never overlap.
    let mut ids = Vec::new();
    for i in 0..20 {
        ids.push(create_uploaded(&app, &rx.url, &format!("f{i}.txt")).await);
    }
    let confirms = ids.iter().map(|id| confirm(&app, id, ""));
    for confirmed in futures_util::future::join_all(confirms).await {
        confirmed.unwrap();
    }
    assert_each_delivered_once(&app, &rx, &mut ids).await;
    assert_eq!(rx.max_in_flight(), 2);
    app.stop().await;
}

/// `per_host_concurrency` limits the requests in the receiver's hand, not
/// the writes before them: with one request at a time and each held, the
/// next delivery is already claimed (DELIVERING) while the request before
/// it is in hand, and the one after it waits unclaimed (room for two).
/// Each still arrives once, one at a time.
async fn the_host_limit_is_on_requests_not_on_claims(db: &TestDb) {
    // The first request is held 6 s (an attempt may take 15 s here), so
    // that the other two are created and claimed while it is in hand
    // however slow the machine; the others 700 ms each.
    let cfg = "[worker]\nconcurrency = 8\nper_host_concurrency = 1\n\
               [delivery]\ntimeout = \"15s\"\n[queue]\nvisibility_timeout = \"30s\"\n";
    let mut app = TestApp::start(db, cfg).await;
    let rx = Receiver::start().await;
    rx.hold_next(std::time::Duration::from_secs(6));
    rx.hold_every(std::time::Duration::from_millis(700));
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(create_confirmed(&app, &rx.url, &format!("f{i}.txt")).await);
    }
    // While the first request is held (and only then: once it is
    // answered, the next is claimed anyway): two claimed, never three.
    let first_held = || rx.received().len() == 1 && rx.in_flight() == 1;
    let mut most = 0;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while most < 2 && tokio::time::Instant::now() < deadline {
        let before = first_held();
        let mut delivering = 0;
        for id in &ids {
            delivering +=
                usize::from(get(&app, &app.key_a, id).await.status() == Status::Delivering);
        }
        if before && first_held() {
            assert!(
                delivering <= 2,
                "{delivering} claimed at once, room is for two"
            );
            most = most.max(delivering);
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(
        most, 2,
        "the next delivery was not claimed while a request was in hand"
    );
    assert_each_delivered_once(&app, &rx, &mut ids).await;
    assert_eq!(rx.max_in_flight(), 1);
    app.stop().await;
}

/// A delivery waits at most 5 s for room at its host; then its job goes
/// back to the queue and comes round again. With one request at a time and
/// the first held for 12 s, the second is claimed and waits for the request
/// (room for two), the third waits out its 5 s and is put back (stored
/// VERIFIED, where it rests only when put back: a claim goes through
/// VERIFIED to DELIVERING in one write), and all three still arrive, once
/// each, one at a time. Had the wait no bound, the third would stay
/// VERIFYING until the first is answered.
async fn a_delivery_that_waits_too_long_for_its_host_is_put_back(db: &TestDb) {
    // An attempt may take 20 s here (the tests' default is 5 s). The
    // first is held 12 s: the third's 5 s wait begins once it is created,
    // which a loaded machine may take seconds to do.
    let cfg = "[worker]\nconcurrency = 4\nper_host_concurrency = 1\n\
               [delivery]\ntimeout = \"20s\"\n[queue]\nvisibility_timeout = \"40s\"\n";
    let mut app = TestApp::start(db, cfg).await;
    let rx = Receiver::start().await;
    rx.hold_next(std::time::Duration::from_secs(12));
    let first = create_confirmed(&app, &rx.url, "first.txt").await;
    // The first is in flight (held) before the others arrive.
    while rx.received().is_empty() {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let mut ids = vec![first];
    for i in 0..2 {
        ids.push(create_confirmed(&app, &rx.url, &format!("later-{i}.txt")).await);
    }
    let first_held = || rx.received().len() == 1 && rx.in_flight() == 1;
    let mut put_back = false;
    while !put_back && first_held() {
        for id in &ids[1..] {
            put_back |= get(&app, &app.key_a, id).await.status() == Status::Verified;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(
        put_back,
        "no delivery was put back while the first was held for 12 s"
    );
    assert_each_delivered_once(&app, &rx, &mut ids).await;
    assert_eq!(rx.max_in_flight(), 1);
    app.stop().await;
}

/// A worker that stops puts back at once the deliveries still waiting for
/// their host, for a worker that stays: they neither start late nor sit
/// until the shutdown grace cuts them off (and, with Redis, until their
/// lease runs out). Behind an attempt held past the 2 s grace, with one
/// request at a time: the second webhook is claimed and waits for the
/// request, and is handed back RETRYING, due now; the third waits for room
/// at the host, and is put back VERIFIED. Cut off while waiting, they
/// would still be DELIVERING and VERIFYING.
async fn a_stopping_worker_puts_back_what_waits_for_its_host(db: &TestDb) {
    // The first attempt may last 30 s, so that only the shutdown cuts it
    // off, however late the stop comes on a loaded machine.
    let cfg = "[worker]\nper_host_concurrency = 1\n\
               [delivery]\ntimeout = \"30s\"\n[queue]\nvisibility_timeout = \"60s\"\n";
    let mut app = TestApp::start(db, cfg).await;
    let rx = Receiver::start().await;
    rx.hold_next(std::time::Duration::from_secs(40));
    create_confirmed(&app, &rx.url, "first.txt").await;
    while rx.received().is_empty() {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let claimed = create_confirmed(&app, &rx.url, "claimed.txt").await;
    wait_for(&app, &app.key_a, &claimed, Status::Delivering).await;
    let waiting = create_confirmed(&app, &rx.url, "waiting.txt").await;
    // Its object looked at (the HEAD sent, then answered: the embedded S3
    // server stops with the app, and would fail a HEAD still in flight),
    // then waiting for the host. The gauge is the process's, shared with
    // tests running beside this one: it can only make this wait shorter,
    // hence the margin after it.
    while app.heads() < 3 || uploadhook::metrics::METRICS.host_waiting.get() < 2 {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    app.stop().await;

    let conn = sea_orm::Database::connect(&db.url).await.unwrap();
    let status_of = async |id: &str| -> (String, Option<String>) {
        let row = conn
            .query_one_raw(sea_orm::Statement::from_string(
                conn.get_database_backend(),
                format!("SELECT status, last_error FROM webhooks WHERE id = '{id}'"),
            ))
            .await
            .unwrap()
            .unwrap();
        (
            row.try_get("", "status").unwrap(),
            row.try_get("", "last_error").unwrap(),
        )
    };
    let (status, error) = status_of(&claimed).await;
    assert_eq!(
        status, "retrying",
        "the claimed delivery was not handed back"
    );
    assert!(error.unwrap_or_default().contains("not sent"));
    let (status, _) = status_of(&waiting).await;
    assert_eq!(status, "verified", "the waiting delivery was not put back");
    assert_eq!(rx.received().len(), 1, "nothing started after the stop");
    conn.close().await.unwrap();
}

/// Waits until every webhook of `ids` is COMPLETED, then checks that the
/// receiver got each exactly once.
async fn assert_each_delivered_once(app: &TestApp, rx: &Receiver, ids: &mut [String]) {
    for id in ids.iter() {
        wait_for(app, &app.key_a, id, Status::Completed).await;
    }
    let mut got: Vec<String> = rx
        .received()
        .iter()
        .map(|r| r.headers["webhook-id"].clone())
        .collect();
    got.sort();
    ids.sort();
    assert_eq!(got, ids, "each delivered once");
}
