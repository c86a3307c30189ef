//! Security: secrets sealed at rest and master-key rotation, idempotency,
//! limits and rate limits, API keys, secret rotation.

use std::sync::Arc;

use sea_orm::{ConnectionTrait, EntityTrait};
use secrecy::{ExposeSecret, SecretString};
use tokio::net::TcpListener;
use uploadhook::{
    Listeners,
    clock::{Clock, SystemClock},
    config::Config,
    proto::{self, Status},
    secrets::Keyring,
    store::webhooks,
};

use crate::{
    backend_tests,
    helpers::{
        FAST, Receiver, TestApp, TestDb, authed, confirm_request, create_request, get, upload,
        wait_for,
    },
};

backend_tests!(
    secrets_are_sealed_at_rest,
    rotate_master_reseals_every_secret_and_the_old_key_can_go,
    idempotent_replay_returns_the_same_webhook_and_one_row,
    idempotency_key_with_another_request_conflicts,
    idempotency_keys_expire,
    expired_and_revoked_keys_are_refused_at_once,
    a_revoked_key_is_refused_within_the_cache_ttl_an_expired_one_at_once,
    secret_rotation_signs_with_both_secrets_during_the_grace_period,
    authorization_matrix_another_tenants_ids_look_unknown,
);

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

fn keys_layer(spec: &str) -> String {
    format!("[encryption]\nkeys = \"{spec}\"\n")
}

async fn row(app: &TestApp, id: &str) -> webhooks::Model {
    webhooks::Entity::find_by_id(id)
        .one(app.store().db())
        .await
        .unwrap()
        .unwrap()
}

async fn create_with_secret(app: &TestApp, url: &str) -> proto::CreateUploadWebhookResponse {
    let mut req = create_request(url, "a.txt");
    req.webhook.as_mut().unwrap().secret = SECRET.into();
    app.client()
        .await
        .create_upload_webhook(authed(&app.key_a, req))
        .await
        .unwrap()
        .into_inner()
}

/// Confirms an uploaded webhook, waits for delivery and checks the
/// signature with `secret`.
async fn deliver_and_verify(
    app: &TestApp,
    rx: &Receiver,
    created: &proto::CreateUploadWebhookResponse,
    secret: &str,
) {
    let id = created.webhook.as_ref().unwrap().id.clone();
    app.client()
        .await
        .confirm(authed(&app.key_a, confirm_request(&id)))
        .await
        .unwrap();
    wait_for(app, &app.key_a, &id, Status::Completed).await;
    let got = rx.received();
    let r = got
        .iter()
        .find(|r| r.headers["webhook-id"] == id)
        .expect("delivered");
    uploadhook::verify(
        secret,
        &id,
        r.headers["webhook-timestamp"].parse().unwrap(),
        &r.body,
        &r.headers["webhook-signature"],
        chrono::Utc::now().timestamp(),
        300,
    )
    .expect("signature verifies with the original secret");
}

async fn secrets_are_sealed_at_rest(db: &TestDb) {
    let mut app = TestApp::start(db, "").await;
    let rx = Receiver::start().await;
    let created = create_with_secret(&app, &rx.url).await;
    assert_eq!(
        created.signing_secret, "",
        "a caller's own secret is never echoed"
    );
    let id = created.webhook.as_ref().unwrap().id.clone();

    let w = row(&app, &id).await;
    assert_eq!(w.secret_key_id.as_deref(), Some("test"));
    assert_ne!(w.secret.0, SECRET);
    assert!(!w.secret.0.contains("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"));
    assert!(
        !format!("{w:?}").contains("MfKQ9r8GKYqr"),
        "Debug is redacted"
    );
    assert_eq!(app.store().open_secret(&w).unwrap().expose_secret(), SECRET);

    // A generated secret is sealed too, and returned by Create only.
    let gen_ = app
        .client()
        .await
        .create_upload_webhook(authed(&app.key_a, create_request(&rx.url, "b.txt")))
        .await
        .unwrap()
        .into_inner();
    assert!(gen_.signing_secret.starts_with("whsec_"));
    let g = row(&app, &gen_.webhook.as_ref().unwrap().id).await;
    assert!(!g.secret.0.contains(&gen_.signing_secret["whsec_".len()..]));
    let status = app
        .client()
        .await
        .get_status(authed(
            &app.key_a,
            proto::GetStatusRequest {
                webhook_id: g.id.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(!format!("{status:?}").contains(&gen_.signing_secret["whsec_".len()..]));
    let list = app
        .client()
        .await
        .list_webhooks(authed(&app.key_a, proto::ListWebhooksRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert!(!format!("{list:?}").contains(&gen_.signing_secret["whsec_".len()..]));

    upload(&created, b"hello").await;
    deliver_and_verify(&app, &rx, &created, SECRET).await;
    app.stop().await;
}

async fn rotate_master_reseals_every_secret_and_the_old_key_can_go(db: &TestDb) {
    let k1 = Keyring::generate_entry("k1");
    let k2 = Keyring::generate_entry("k2");
    let rx = Receiver::start().await;

    let mut app = TestApp::start(db, &keys_layer(&k1)).await;
    let s3 = app.s3_root.clone();
    let a = create_with_secret(&app, &rx.url).await;
    let b = create_with_secret(&app, &rx.url).await;
    let c = create_with_secret(&app, &rx.url).await;
    let (ida, idb, idc) = (
        a.webhook.as_ref().unwrap().id.clone(),
        b.webhook.as_ref().unwrap().id.clone(),
        c.webhook.as_ref().unwrap().id.clone(),
    );
    // Uploaded now: the S3 server's port changes with each start.
    upload(&a, b"hello").await;
    upload(&c, b"hello").await;
    // `c` as a row from before encryption: plain text, no key id.
    app.store()
        .db()
        .execute_unprepared(&format!(
            "UPDATE webhooks SET secret = '{SECRET}', secret_key_id = NULL WHERE id = '{idc}'"
        ))
        .await
        .unwrap();
    app.stop().await;

    // k2 becomes active, k1 still opens.
    let mut app = TestApp::start_with(
        db,
        &keys_layer(&format!("{k2},{k1}")),
        Arc::new(SystemClock),
        Some(s3.clone()),
    )
    .await;
    assert_eq!(
        row(&app, &idc).await.secret_key_id,
        None,
        "legacy rows still read"
    );
    let report = app.store().rotate_master(1).await.unwrap();
    assert_eq!(report.resealed, 3, "{report:?}");
    assert!(report.failed.is_empty());
    for id in [&ida, &idb, &idc] {
        let w = row(&app, id).await;
        assert_eq!(w.secret_key_id.as_deref(), Some("k2"));
        assert_ne!(w.secret.0, SECRET);
        assert_eq!(app.store().open_secret(&w).unwrap().expose_secret(), SECRET);
    }
    // Again: nothing left to do.
    assert_eq!(app.store().rotate_master(100).await.unwrap().resealed, 0);
    app.stop().await;

    // Without k2, the process refuses to start and says which key is missing.
    let k3 = Keyring::generate_entry("k3");
    let err = match try_start(db, &keys_layer(&k3)).await {
        Ok(running) => {
            running.stop().await;
            panic!("started without the key that seals the stored secrets");
        }
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("encryption.keys") && err.contains("k2"),
        "{err}"
    );

    // k1 removed: everything still delivers, signed with the same secrets.
    let mut app = TestApp::start_with(db, &keys_layer(&k2), Arc::new(SystemClock), Some(s3)).await;
    deliver_and_verify(&app, &rx, &a, SECRET).await;
    deliver_and_verify(&app, &rx, &c, SECRET).await;
    app.stop().await;
}

async fn try_start(db: &TestDb, extra: &str) -> anyhow::Result<uploadhook::Running> {
    let local = format!("[database]\nurl = \"{}\"\n", db.url);
    let config = Config::from_toml_layers(&[FAST, &local, &db.queue_toml, extra])?;
    let listeners = Listeners {
        grpc: Some(TcpListener::bind("127.0.0.1:0").await?),
        http: TcpListener::bind("127.0.0.1:0").await?,
        s3: Some(TcpListener::bind("127.0.0.1:0").await?),
    };
    uploadhook::start(
        config,
        listeners,
        Arc::new(SystemClock),
        uploadhook::Roles::ALL,
    )
    .await
}

#[test]
fn without_keys_sqlite_generates_a_private_key_file_and_postgres_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}?mode=rwc", dir.path().join("d/u.db").display());
    let cfg = Config::from_toml(&format!("[database]\nurl = \"{url}\"")).unwrap();
    let first = uploadhook::master_keyring(&cfg).unwrap();
    let file = dir.path().join("d/uploadhook.master-key");
    assert!(file.exists());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
    let sealed = first.seal(&SecretString::from(SECRET.to_string()), "wh_x");
    let second = uploadhook::master_keyring(&cfg).unwrap();
    assert_eq!(
        second
            .open(Some(&sealed.key_id), &sealed.ciphertext, "wh_x")
            .unwrap()
            .expose_secret(),
        SECRET,
        "the same key is read back"
    );

    let pg = Config::from_toml("[database]\nurl = \"postgres://u@127.0.0.1:1/db\"").unwrap();
    let err = uploadhook::master_keyring(&pg).unwrap_err().to_string();
    assert!(err.contains("encryption.keys"), "{err}");
    let with_keys = Config::from_toml(&format!(
        "[database]\nurl = \"postgres://u@127.0.0.1:1/db\"\n{}",
        keys_layer(&Keyring::generate_entry("prod"))
    ))
    .unwrap();
    assert_eq!(
        uploadhook::master_keyring(&with_keys).unwrap().active_id(),
        "prod"
    );
}

async fn webhook_rows(app: &TestApp) -> usize {
    webhooks::Entity::find()
        .all(app.store().db())
        .await
        .unwrap()
        .len()
}

async fn idempotent_replay_returns_the_same_webhook_and_one_row(db: &TestDb) {
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
    assert_eq!(wa.key, wb.key, "the same object key");
    assert!(a.signing_secret.starts_with("whsec_"));
    assert_eq!(
        a.signing_secret, b.signing_secret,
        "the generated secret again"
    );
    assert_eq!(webhook_rows(&app).await, 1);
    let stored = row(&app, &wa.id).await;
    assert_eq!(
        stored.request_fingerprint.as_ref().map(String::len),
        Some(64)
    );

    // The same over REST, with the same JSON twice.
    let http = reqwest::Client::new();
    let body = serde_json::json!({
        "filename": "r.txt",
        "webhook": {"url": "http://127.0.0.1:1/hook", "metadata": {"a": "1", "b": "2"}},
        "idempotencyKey": "rest-1",
    });
    let mut ids = Vec::new();
    for _ in 0..2 {
        let r: serde_json::Value = http
            .post(app.http_url("/v1/webhooks"))
            .bearer_auth(&app.key_a)
            .json(&body)
            .send()
            .await
            .unwrap()
            .error_for_status()
            .unwrap()
            .json()
            .await
            .unwrap();
        ids.push(r["webhook"]["id"].as_str().unwrap().to_string());
    }
    assert_eq!(ids[0], ids[1]);
    assert_eq!(webhook_rows(&app).await, 2);
    app.stop().await;
}

async fn idempotency_key_with_another_request_conflicts(db: &TestDb) {
    let mut app = TestApp::start(db, "").await;
    let mut client = app.client().await;
    let mut req = create_request("http://127.0.0.1:1/hook", "a.txt");
    req.idempotency_key = "order-18".into();
    let first = client
        .create_upload_webhook(authed(&app.key_a, req.clone()))
        .await
        .unwrap()
        .into_inner()
        .webhook
        .unwrap();
    type Change = Box<dyn Fn(&mut proto::CreateUploadWebhookRequest)>;
    let variants: Vec<Change> = vec![
        Box::new(|r| r.filename = "b.txt".into()),
        Box::new(|r| r.content_length = Some(3)),
        Box::new(|r| {
            r.webhook
                .as_mut()
                .unwrap()
                .metadata
                .insert("user".into(), "43".into());
        }),
        Box::new(|r| r.webhook.as_mut().unwrap().url = "http://127.0.0.1:2/hook".into()),
        Box::new(|r| r.webhook.as_mut().unwrap().secret = SECRET.into()),
    ];
    for change in variants {
        let mut other = req.clone();
        change(&mut other);
        let err = client
            .create_upload_webhook(authed(&app.key_a, other))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::AlreadyExists, "{err:?}");
        let msg = err.message();
        assert!(
            msg.starts_with("idempotency_key:")
                && msg.contains("order-18")
                && msg.contains(&first.id),
            "{msg}"
        );
    }
    assert_eq!(webhook_rows(&app).await, 1);

    // 409 over REST.
    let http = reqwest::Client::new();
    let r = http
        .post(app.http_url("/v1/webhooks"))
        .bearer_auth(&app.key_a)
        .json(&serde_json::json!({
            "filename": "other.txt",
            "webhook": {"url": "http://127.0.0.1:1/hook"},
            "idempotencyKey": "order-18",
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), reqwest::StatusCode::CONFLICT);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["code"], 6);
    assert!(body["message"].as_str().unwrap().contains("order-18"));
    app.stop().await;
}

async fn idempotency_keys_expire(db: &TestDb) {
    let clock = uploadhook::clock::ManualClock::new(chrono::Utc::now());
    let mut app = TestApp::start_with(
        db,
        "[webhooks]\nidempotency_ttl = \"1h\"\n",
        Arc::new(clock.clone()),
        None,
    )
    .await;
    let mut client = app.client().await;
    let mut req = create_request("http://127.0.0.1:1/hook", "a.txt");
    req.idempotency_key = "order-19".into();
    let first = client
        .create_upload_webhook(authed(&app.key_a, req.clone()))
        .await
        .unwrap()
        .into_inner()
        .webhook
        .unwrap();
    clock.advance(chrono::Duration::minutes(59));
    let again = client
        .create_upload_webhook(authed(&app.key_a, req.clone()))
        .await
        .unwrap()
        .into_inner()
        .webhook
        .unwrap();
    assert_eq!(again.id, first.id, "still within the ttl");
    clock.advance(chrono::Duration::minutes(2));
    // Past the ttl, even another request with that key creates a webhook.
    req.filename = "b.txt".into();
    let fresh = client
        .create_upload_webhook(authed(&app.key_a, req.clone()))
        .await
        .unwrap()
        .into_inner()
        .webhook
        .unwrap();
    assert_ne!(fresh.id, first.id);
    assert_eq!(webhook_rows(&app).await, 2);
    assert_eq!(row(&app, &first.id).await.idempotency_key, None);
    // And the key now answers for the new webhook.
    let replay = client
        .create_upload_webhook(authed(&app.key_a, req))
        .await
        .unwrap()
        .into_inner()
        .webhook
        .unwrap();
    assert_eq!(replay.id, fresh.id);
    app.stop().await;
}

async fn sqlite() -> TestDb {
    TestDb::new(crate::helpers::Backend::Sqlite).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_limit_is_named_in_its_error() {
    let db = sqlite().await;
    let mut app = TestApp::start(
        &db,
        "[webhooks]\nmax_metadata_entries = 3\nmax_metadata_bytes = 64\n",
    )
    .await;
    let mut client = app.client().await;
    type Change = Box<dyn Fn(&mut proto::CreateUploadWebhookRequest)>;
    let cases: Vec<(&str, &str, Change)> = vec![
        (
            "webhook.url",
            "longer than 2048",
            Box::new(|r| {
                r.webhook.as_mut().unwrap().url = format!("http://127.0.0.1/{}", "a".repeat(2100))
            }),
        ),
        (
            "key",
            "longer than 1024",
            Box::new(|r| r.key = "k".repeat(1100)),
        ),
        (
            "key",
            "control characters",
            Box::new(|r| r.key = "a\u{7}b".into()),
        ),
        ("key", "`..`", Box::new(|r| r.key = "a/../b".into())),
        (
            "filename",
            "longer than 255",
            Box::new(|r| r.filename = "f".repeat(300)),
        ),
        ("filename", "`/`", Box::new(|r| r.filename = "a/b".into())),
        (
            "webhook.metadata",
            "at most 3",
            Box::new(|r| {
                let m = &mut r.webhook.as_mut().unwrap().metadata;
                for i in 0..4 {
                    m.insert(format!("k{i}"), "v".into());
                }
            }),
        ),
        (
            "webhook.metadata",
            "at most 64",
            Box::new(|r| {
                r.webhook
                    .as_mut()
                    .unwrap()
                    .metadata
                    .insert("big".into(), "v".repeat(100));
            }),
        ),
    ];
    for (field, says, change) in cases {
        let mut req = create_request("http://127.0.0.1:1/hook", "a.txt");
        change(&mut req);
        let err = client
            .create_upload_webhook(authed(&app.key_a, req))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{field}: {err:?}");
        assert!(
            err.message().starts_with(&format!("{field}: ")) && err.message().contains(says),
            "{field}: {}",
            err.message()
        );
    }
    app.stop().await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_requests_are_refused_on_both_protocols() {
    let db = sqlite().await;
    let mut app = TestApp::start(&db, "[api]\nmax_request_bytes = 4096\n").await;
    let mut req = create_request("http://127.0.0.1:1/hook", "a.txt");
    req.webhook
        .as_mut()
        .unwrap()
        .metadata
        .insert("pad".into(), "x".repeat(5000));
    let err = app
        .client()
        .await
        .create_upload_webhook(authed(&app.key_a, req))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::OutOfRange, "{err:?}");
    assert!(err.message().contains("4096"), "{}", err.message());

    let r = reqwest::Client::new()
        .post(app.http_url("/v1/webhooks"))
        .bearer_auth(&app.key_a)
        .json(&serde_json::json!({
            "filename": "a.txt",
            "webhook": {"url": "http://127.0.0.1:1/hook", "metadata": {"pad": "x".repeat(5000)}},
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), reqwest::StatusCode::PAYLOAD_TOO_LARGE);
    let body: serde_json::Value = r.json().await.unwrap();
    assert!(body["message"].as_str().unwrap().contains("4096"), "{body}");
    app.stop().await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_answers_with_a_retry_hint_and_spares_other_tenants() {
    let db = sqlite().await;
    // A burst of 3, refilling so slowly that no token comes back during
    // the test.
    let mut app = TestApp::start(
        &db,
        "[api]\nrate_limit_per_second = 0.001\nrate_limit_burst = 3\n",
    )
    .await;
    let mut client = app.client().await;
    let list = |key: &str| authed(key, proto::ListWebhooksRequest::default());
    for _ in 0..2 {
        client.list_webhooks(list(&app.key_a)).await.unwrap();
    }
    // The third of the burst over REST, then REST is refused too.
    let http = reqwest::Client::new();
    let rest = || {
        http.get(app.http_url("/v1/webhooks"))
            .bearer_auth(&app.key_a)
            .send()
    };
    assert!(rest().await.unwrap().status().is_success());
    let err = client.list_webhooks(list(&app.key_a)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    let hint: u64 = err
        .metadata()
        .get("retry-after")
        .expect("retry-after metadata")
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(hint >= 1, "{hint}");
    assert!(
        err.message().contains(&format!("{hint}s")),
        "{}",
        err.message()
    );

    let r = rest().await.unwrap();
    assert_eq!(r.status(), reqwest::StatusCode::TOO_MANY_REQUESTS);
    let retry_after: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry_after >= 1);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["code"], 8);

    // Tenant B has its own bucket.
    client.list_webhooks(list(&app.key_b)).await.unwrap();
    // An unauthenticated caller is told so, not rate limited.
    let err = client.list_webhooks(list("uhk_nope")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    app.stop().await;
    db.cleanup().await;
}

async fn expired_and_revoked_keys_are_refused_at_once(db: &TestDb) {
    // Whole seconds: PostgreSQL keeps microseconds.
    let start = chrono::DateTime::from_timestamp(chrono::Utc::now().timestamp(), 0).unwrap();
    let clock = uploadhook::clock::ManualClock::new(start);
    // No key cache: every call reads its key.
    let mut app = TestApp::start_with(
        db,
        "[api]\nkey_cache_ttl = \"0s\"\n",
        Arc::new(clock.clone()),
        None,
    )
    .await;
    let store = app.store().clone();
    let t0 = clock.now();
    let expiring = store
        .create_api_key_expiring("tenant-a", t0, Some(t0 + chrono::Duration::hours(1)))
        .await
        .unwrap();
    let revocable = store.create_api_key("tenant-a", t0).await.unwrap();
    let mut client = app.client().await;
    let list = |key: &str| authed(key, proto::ListWebhooksRequest::default());
    let http = reqwest::Client::new();
    let rest = |key: String| {
        http.get(app.http_url("/v1/webhooks"))
            .bearer_auth(key)
            .send()
    };
    let last_used = |id: String| {
        let store = store.clone();
        async move {
            store
                .list_api_keys()
                .await
                .unwrap()
                .into_iter()
                .find(|k| k.id == id)
                .unwrap()
                .last_used_at
        }
    };

    client
        .list_webhooks(list(&expiring.plaintext))
        .await
        .unwrap();
    client
        .list_webhooks(list(&revocable.plaintext))
        .await
        .unwrap();
    // last_used_at is written on use, then at most once a minute.
    assert_eq!(last_used(expiring.id.to_string()).await, Some(t0));
    clock.advance(chrono::Duration::seconds(30));
    client
        .list_webhooks(list(&expiring.plaintext))
        .await
        .unwrap();
    assert_eq!(last_used(expiring.id.to_string()).await, Some(t0));
    clock.advance(chrono::Duration::seconds(31));
    client
        .list_webhooks(list(&expiring.plaintext))
        .await
        .unwrap();
    assert_eq!(
        last_used(expiring.id.to_string()).await,
        Some(t0 + chrono::Duration::seconds(61))
    );

    // Revoked: the very next call is refused, on both protocols.
    assert!(
        store
            .revoke_api_key(revocable.id.as_str(), clock.now())
            .await
            .unwrap()
    );
    let err = client
        .list_webhooks(list(&revocable.plaintext))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    assert_eq!(
        rest(revocable.plaintext.clone()).await.unwrap().status(),
        reqwest::StatusCode::UNAUTHORIZED
    );
    assert!(
        !store
            .revoke_api_key(revocable.id.as_str(), clock.now())
            .await
            .unwrap()
    );

    // Expired: refused from its expiry on.
    assert!(
        rest(expiring.plaintext.clone())
            .await
            .unwrap()
            .status()
            .is_success()
    );
    clock.advance(chrono::Duration::minutes(59));
    let err = client
        .list_webhooks(list(&expiring.plaintext))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    assert_eq!(
        rest(expiring.plaintext.clone()).await.unwrap().status(),
        reqwest::StatusCode::UNAUTHORIZED
    );
    // Other keys of the tenant still work.
    client.list_webhooks(list(&app.key_a)).await.unwrap();
    app.stop().await;
}

async fn a_revoked_key_is_refused_within_the_cache_ttl_an_expired_one_at_once(db: &TestDb) {
    let start = chrono::DateTime::from_timestamp(chrono::Utc::now().timestamp(), 0).unwrap();
    let clock = uploadhook::clock::ManualClock::new(start);
    let mut app = TestApp::start_with(
        db,
        "[api]\nkey_cache_ttl = \"5s\"\n",
        Arc::new(clock.clone()),
        None,
    )
    .await;
    let store = app.store().clone();
    let t0 = clock.now();
    let revocable = store.create_api_key("tenant-a", t0).await.unwrap();
    let expiring = store
        .create_api_key_expiring("tenant-a", t0, Some(t0 + chrono::Duration::seconds(3)))
        .await
        .unwrap();
    let mut client = app.client().await;
    let list = |key: &str| authed(key, proto::ListWebhooksRequest::default());
    let code = |r: Result<tonic::Response<proto::ListWebhooksResponse>, tonic::Status>| {
        r.map(|_| tonic::Code::Ok).unwrap_or_else(|e| e.code())
    };
    // Both keys authenticate and are cached.
    for key in [&revocable.plaintext, &expiring.plaintext] {
        assert_eq!(code(client.list_webhooks(list(key)).await), tonic::Code::Ok);
    }
    assert!(
        store
            .revoke_api_key(revocable.id.as_str(), clock.now())
            .await
            .unwrap()
    );
    // Until its entry is 5 s old, the revoked key still works in this
    // process (the documented trade); from then on it is refused.
    clock.advance(chrono::Duration::milliseconds(2999));
    assert_eq!(
        code(client.list_webhooks(list(&revocable.plaintext)).await),
        tonic::Code::Ok
    );
    assert_eq!(
        code(client.list_webhooks(list(&expiring.plaintext)).await),
        tonic::Code::Ok
    );
    // The key's own expiry is exact, cache or not.
    clock.advance(chrono::Duration::milliseconds(1));
    assert_eq!(
        code(client.list_webhooks(list(&expiring.plaintext)).await),
        tonic::Code::Unauthenticated
    );
    clock.advance(chrono::Duration::seconds(2));
    assert_eq!(
        code(client.list_webhooks(list(&revocable.plaintext)).await),
        tonic::Code::Unauthenticated
    );
    // A wrong key is never cached as a right one.
    assert_eq!(
        code(client.list_webhooks(list("uhk_not-a-key")).await),
        tonic::Code::Unauthenticated
    );
    client.list_webhooks(list(&app.key_a)).await.unwrap();
    app.stop().await;
}

/// Log lines written while `f` runs on this thread.
struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "current_thread")]
async fn key_creation_and_revocation_are_audited_without_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = Config::from_toml(&format!(
        "[database]\nurl = \"sqlite://{}?mode=rwc\"\n{}",
        dir.path().join("a.db").display(),
        keys_layer(&Keyring::generate_entry("k"))
    ))
    .unwrap();
    uploadhook::migrate(&cfg).await.unwrap();
    let store = uploadhook::open_store(&cfg).await.unwrap();
    let buf = Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = buf.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_writer(move || Captured(sink.clone()))
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let now = chrono::Utc::now();
    let key = store
        .create_api_key_expiring("audited", now, Some(now + chrono::Duration::days(1)))
        .await
        .unwrap();
    assert!(store.revoke_api_key(key.id.as_str(), now).await.unwrap());
    let text = String::from_utf8(buf.lock().unwrap().clone()).unwrap();
    let lines: Vec<&str> = text.lines().filter(|l| l.contains(" audit:")).collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(
        lines[0].contains("api_key.created") && lines[0].contains(key.id.as_str()),
        "{text}"
    );
    assert!(
        lines[0].contains("audited") && lines[0].contains("expires_at"),
        "{text}"
    );
    assert!(
        lines[1].contains("api_key.revoked") && lines[1].contains(key.id.as_str()),
        "{text}"
    );
    assert!(
        !text.contains(&key.plaintext),
        "the key never reaches the log"
    );
    assert!(
        !text.contains(&key.plaintext["uhk_".len()..]),
        "nor its random part"
    );
}

#[test]
fn cli_creates_expiring_keys_and_rotates_the_master_key() {
    let dir = tempfile::tempdir().unwrap();
    let run = |keys: &str, args: &[&str]| {
        let config = dir.path().join("c.toml");
        std::fs::write(
            &config,
            format!(
                "[database]\nurl = \"sqlite://{}?mode=rwc\"\n[bootstrap]\ndev_tenant = \"\"\n{}",
                dir.path().join("cli.db").display(),
                keys_layer(keys)
            ),
        )
        .unwrap();
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_uploadhook"));
        cmd.arg("--config").arg(&config).args(args);
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("UPLOADHOOK_") {
                cmd.env_remove(name);
            }
        }
        let out = cmd.output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (ok, k1, err) = run("", &["keys", "new-master-key", "--id", "k1"]);
    assert!(ok, "{err}");
    let k1 = k1.trim().to_string();
    Keyring::parse(&k1).unwrap();

    let (ok, out, err) = run(
        &k1,
        &["keys", "create", "--tenant", "t", "--expires-in", "2h"],
    );
    assert!(ok, "{err}");
    assert!(out.contains("expires: "), "{out}");
    assert!(
        err.contains("api_key.created"),
        "audit line on stderr: {err}"
    );
    let (ok, _, err) = run(
        &k1,
        &[
            "keys",
            "create",
            "--tenant",
            "t",
            "--expires-in",
            "2 parsecs",
        ],
    );
    assert!(!ok && err.contains("--expires-in"), "{err}");
    let (ok, out, _) = run(&k1, &["keys", "list"]);
    assert!(ok && out.contains("expires"), "{out}");

    // Nothing sealed yet: the rotation has nothing to do, and says so.
    let k2 = Keyring::generate_entry("k2");
    let (ok, out, err) = run(&format!("{k2},{k1}"), &["keys", "rotate-master"]);
    assert!(ok, "{err}");
    assert!(out.contains("re-sealed 0") && out.contains("`k2`"), "{out}");
}

/// The signatures of the delivery of `id`, checked against `secret`.
fn verifies(rx: &Receiver, id: &str, secret: &str) -> Result<(), uploadhook::signing::VerifyError> {
    let got = rx.received();
    let r = got
        .iter()
        .find(|r| r.headers["webhook-id"] == id)
        .expect("delivered");
    let ts: i64 = r.headers["webhook-timestamp"].parse().unwrap();
    uploadhook::verify(
        secret,
        id,
        ts,
        &r.body,
        &r.headers["webhook-signature"],
        ts,
        300,
    )
}

fn signature_entries(rx: &Receiver, id: &str) -> usize {
    rx.received()
        .iter()
        .find(|r| r.headers["webhook-id"] == id)
        .map(|r| r.headers["webhook-signature"].split(' ').count())
        .unwrap()
}

async fn secret_rotation_signs_with_both_secrets_during_the_grace_period(db: &TestDb) {
    let start = chrono::DateTime::from_timestamp(chrono::Utc::now().timestamp(), 0).unwrap();
    let clock = uploadhook::clock::ManualClock::new(start);
    let mut app = TestApp::start_with(db, "", Arc::new(clock.clone()), None).await;
    let rx = Receiver::start().await;
    let mut client = app.client().await;
    let confirm = |id: String| confirm_request(&id);

    // An explicit new secret, one hour of grace.
    let w1 = create_with_secret(&app, &rx.url).await;
    let id1 = w1.webhook.as_ref().unwrap().id.clone();
    upload(&w1, b"one").await;
    let new_secret = uploadhook::signing::SigningKey::generate_secret();
    let rotated = client
        .rotate_secret(authed(
            &app.key_a,
            proto::RotateSecretRequest {
                webhook_id: id1.clone(),
                secret: new_secret.clone(),
                grace_period: Some(prost_types::Duration {
                    seconds: 3600,
                    nanos: 0,
                }),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        rotated.signing_secret, "",
        "the caller's secret is not echoed"
    );
    assert_eq!(
        rotated.previous_secret_expires_at.unwrap().seconds,
        start.timestamp() + 3600
    );
    let stored = row(&app, &id1).await;
    assert_eq!(stored.secret_key_id.as_deref(), Some("test"));
    assert!(
        !stored
            .previous_secret
            .as_ref()
            .unwrap()
            .0
            .contains("MfKQ9r8GKYqr")
    );
    client
        .confirm(authed(&app.key_a, confirm(id1.clone())))
        .await
        .unwrap();
    wait_for(&app, &app.key_a, &id1, Status::Completed).await;
    assert_eq!(signature_entries(&rx, &id1), 2);
    verifies(&rx, &id1, SECRET).expect("a receiver with only the old secret verifies");
    verifies(&rx, &id1, &new_secret).expect("a receiver with only the new secret verifies");

    // Over REST, generated, a minute of grace that has passed at delivery.
    let w2 = create_with_secret(&app, &rx.url).await;
    let id2 = w2.webhook.as_ref().unwrap().id.clone();
    upload(&w2, b"two").await;
    let r: serde_json::Value = reqwest::Client::new()
        .post(app.http_url(&format!("/v1/webhooks/{id2}:rotateSecret")))
        .bearer_auth(&app.key_a)
        .json(&serde_json::json!({"gracePeriod": "60s"}))
        .send()
        .await
        .unwrap()
        .error_for_status()
        .unwrap()
        .json()
        .await
        .unwrap();
    let generated = r["signingSecret"].as_str().unwrap().to_string();
    assert!(generated.starts_with("whsec_"), "{r}");
    assert_eq!(r["webhook"]["id"], id2.as_str());
    clock.advance(chrono::Duration::minutes(2));
    client
        .confirm(authed(&app.key_a, confirm(id2.clone())))
        .await
        .unwrap();
    wait_for(&app, &app.key_a, &id2, Status::Completed).await;
    assert_eq!(signature_entries(&rx, &id2), 1);
    verifies(&rx, &id2, &generated).unwrap();
    assert!(
        verifies(&rx, &id2, SECRET).is_err(),
        "the grace period is over"
    );
    // The generated secret is never shown again.
    let status = client
        .get_status(authed(
            &app.key_a,
            proto::GetStatusRequest {
                webhook_id: id2.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(!format!("{status:?}").contains(&generated["whsec_".len()..]));

    // Another tenant's webhook does not exist; bad input names the field.
    let req = |id: &str, secret: &str, grace: i64| proto::RotateSecretRequest {
        webhook_id: id.into(),
        secret: secret.into(),
        grace_period: Some(prost_types::Duration {
            seconds: grace,
            nanos: 0,
        }),
    };
    let err = client
        .rotate_secret(authed(&app.key_b, req(&id1, "", 60)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    let err = client
        .rotate_secret(authed(&app.key_a, req(&id1, "nope", 60)))
        .await
        .unwrap_err();
    assert!(err.message().starts_with("secret: "), "{}", err.message());
    let err = client
        .rotate_secret(authed(&app.key_a, req(&id1, "", 31 * 86400)))
        .await
        .unwrap_err();
    assert!(
        err.message().starts_with("grace_period: "),
        "{}",
        err.message()
    );
    // Zero grace: the old secret stops at once.
    let out = client
        .rotate_secret(authed(&app.key_a, req(&id1, "", 0)))
        .await
        .unwrap()
        .into_inner();
    assert!(out.previous_secret_expires_at.is_none());
    assert!(row(&app, &id1).await.previous_secret.is_none());
    app.stop().await;
}

/// A full flow on one thread, so that a thread-local subscriber sees every
/// log line of the service's tasks: neither the signing secret nor the API
/// key appears in them, at debug level.
#[tokio::test(flavor = "current_thread")]
async fn secrets_and_keys_never_reach_the_logs() {
    let buf = Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = buf.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_env_filter(tracing_subscriber::EnvFilter::new("debug"))
        .with_writer(move || Captured(sink.clone()))
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let db = sqlite().await;
    let mut app = TestApp::start(&db, "").await;
    let rx = Receiver::start().await;
    let generated = app
        .client()
        .await
        .create_upload_webhook(authed(&app.key_a, create_request(&rx.url, "g.txt")))
        .await
        .unwrap()
        .into_inner();
    let given = create_with_secret(&app, &rx.url).await;
    for created in [&generated, &given] {
        upload(created, b"hello").await;
    }
    let secret = generated.signing_secret.clone();
    deliver_and_verify(&app, &rx, &generated, &secret).await;
    deliver_and_verify(&app, &rx, &given, SECRET).await;
    let rotated = app
        .client()
        .await
        .rotate_secret(authed(
            &app.key_a,
            proto::RotateSecretRequest {
                webhook_id: given.webhook.as_ref().unwrap().id.clone(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    // A failed authentication is audited, without the key it presented.
    let wrong_key = "uhk_00112233445566778899aabbccddeeff00112233";
    let _ = app
        .client()
        .await
        .list_webhooks(authed(wrong_key, proto::ListWebhooksRequest::default()))
        .await
        .unwrap_err();
    app.stop().await;

    let text = String::from_utf8(buf.lock().unwrap().clone()).unwrap();
    assert!(
        text.contains("delivery attempt"),
        "logs were captured: {text}"
    );
    assert!(text.contains("auth.failed"), "{text}");
    assert!(text.contains("webhook.secret_rotated"), "{text}");
    for needle in [
        &secret["whsec_".len()..],
        &SECRET["whsec_".len()..],
        &rotated.signing_secret["whsec_".len()..],
        &app.key_a["uhk_".len()..],
        &wrong_key["uhk_".len()..],
    ] {
        assert!(!text.contains(needle), "`{needle}` is in the logs");
    }
    db.cleanup().await;
}

/// Every RPC that takes an id, called by tenant B with tenant A's id,
/// answers exactly as for an id that does not exist, and changes nothing.
async fn authorization_matrix_another_tenants_ids_look_unknown(db: &TestDb) {
    let mut app = TestApp::start(db, "").await;
    let rx = Receiver::start().await;
    let mut client = app.client().await;
    let mut req = create_request(&rx.url, "a.txt");
    req.idempotency_key = "order-1".into();
    let created = client
        .create_upload_webhook(authed(&app.key_a, req))
        .await
        .unwrap()
        .into_inner();
    upload(&created, b"a's file").await;
    let id = created.webhook.unwrap().id;
    let unknown = format!("wh_{}", "0".repeat(32));

    // (rpc, answer for A's id, answer for an unknown id), both as B.
    let b = app.key_b.clone();
    let mut answers: Vec<(&str, tonic::Status, tonic::Status)> = Vec::new();
    for target in [&id, &unknown] {
        let webhook_id = target.clone();
        let calls: Vec<(&str, tonic::Status)> = vec![
            (
                "GetStatus",
                client
                    .get_status(authed(
                        &b,
                        proto::GetStatusRequest {
                            webhook_id: webhook_id.clone(),
                        },
                    ))
                    .await
                    .unwrap_err(),
            ),
            (
                "Confirm",
                client
                    .confirm(authed(&b, confirm_request(&webhook_id)))
                    .await
                    .unwrap_err(),
            ),
            (
                "Redeliver",
                client
                    .redeliver(authed(
                        &b,
                        proto::RedeliverRequest {
                            webhook_id: webhook_id.clone(),
                        },
                    ))
                    .await
                    .unwrap_err(),
            ),
            (
                "CancelWebhook",
                client
                    .cancel_webhook(authed(
                        &b,
                        proto::CancelWebhookRequest {
                            webhook_id: webhook_id.clone(),
                        },
                    ))
                    .await
                    .unwrap_err(),
            ),
            (
                "RotateSecret",
                client
                    .rotate_secret(authed(
                        &b,
                        proto::RotateSecretRequest {
                            webhook_id: webhook_id.clone(),
                            ..Default::default()
                        },
                    ))
                    .await
                    .unwrap_err(),
            ),
            (
                "StreamEvents",
                client
                    .stream_events(authed(
                        &b,
                        proto::StreamEventsRequest {
                            webhook_id: webhook_id.clone(),
                            ..Default::default()
                        },
                    ))
                    .await
                    .map(drop)
                    .unwrap_err(),
            ),
        ];
        for (rpc, status) in calls {
            match answers.iter_mut().find(|(r, _, _)| *r == rpc) {
                Some(entry) => entry.2 = status,
                None => answers.push((rpc, status.clone(), status)),
            }
        }
    }
    assert_eq!(answers.len(), 6);
    for (rpc, theirs, missing) in &answers {
        assert_eq!(theirs.code(), tonic::Code::NotFound, "{rpc}: {theirs:?}");
        assert_eq!(
            theirs.message().replace(&id, "ID"),
            missing.message().replace(&unknown, "ID"),
            "{rpc}: another tenant's webhook must look like an unknown one"
        );
    }

    // Listing and idempotency keys are per tenant too: B sees nothing, and
    // B's "order-1" is its own (a new webhook, not a conflict with A's).
    let listed = client
        .list_webhooks(authed(&b, proto::ListWebhooksRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert!(listed.webhooks.is_empty());
    let mut req = create_request(&rx.url, "other.txt");
    req.idempotency_key = "order-1".into();
    let theirs = client
        .create_upload_webhook(authed(&b, req))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(theirs.webhook.unwrap().id, id);

    // A's webhook is untouched: still PENDING, its secret not rotated.
    let w = get(&app, &app.key_a, &id).await;
    assert_eq!(w.status(), Status::Pending);
    assert_eq!(w.attempt_count, 0);
    assert!(rx.received().is_empty());
    app.stop().await;
}
