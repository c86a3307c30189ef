//! The same flow over the REST/JSON gateway, and its error shape.

use serde_json::{Value, json};

use crate::{
    backend_tests,
    helpers::{Receiver, TestApp, TestDb},
};

backend_tests!(
    rest_flow_delivers_and_reports,
    rest_errors_are_google_rpc_status
);

async fn rest_flow_delivers_and_reports(db: &TestDb) {
    let mut app = TestApp::start(db, "").await;
    let rx = Receiver::start().await;
    let http = reqwest::Client::new();
    let auth = format!("Bearer {}", app.key_a);

    let created: Value = http
        .post(app.http_url("/v1/webhooks"))
        .header("authorization", &auth)
        .json(&json!({
            "filename": "photo.png",
            "contentType": "image/png",
            "contentLength": "4",
            "webhook": {"url": rx.url, "metadata": {"album": "summer"}},
        }))
        .send()
        .await
        .unwrap()
        .error_for_status()
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = created["webhook"]["id"].as_str().unwrap().to_string();
    assert_eq!(created["webhook"]["status"], "STATUS_PENDING");
    assert_eq!(created["uploadMethod"], "PUT");
    let secret = created["signingSecret"].as_str().unwrap().to_string();

    let mut put = http
        .put(created["uploadUrl"].as_str().unwrap())
        .body(&b"\x89PNG"[..]);
    for (k, v) in created["uploadHeaders"].as_object().unwrap() {
        put = put.header(k, v.as_str().unwrap());
    }
    let put = put.send().await.unwrap();
    assert!(put.status().is_success(), "{}", put.status());

    let confirmed: Value = http
        .post(app.http_url(&format!("/v1/webhooks/{id}:confirm")))
        .header("authorization", &auth)
        .json(&json!({}))
        .send()
        .await
        .unwrap()
        .error_for_status()
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(confirmed["webhook"]["status"], "STATUS_VERIFYING");

    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    let status = loop {
        let s: Value = http
            .get(app.http_url(&format!("/v1/webhooks/{id}")))
            .header("authorization", &auth)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if s["webhook"]["status"] == "STATUS_COMPLETED" {
            break s;
        }
        assert!(tokio::time::Instant::now() < deadline, "stuck: {s}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    let w = &status["webhook"];
    assert_eq!(w["size"], "4", "int64 as a string, per proto3 JSON");
    assert_eq!(w["contentType"], "image/png");
    assert_eq!(w["attemptCount"], 1);
    assert_eq!(w["attempts"][0]["responseStatus"], 200);
    assert!(w["completedAt"].as_str().unwrap().ends_with('Z'));

    let got = rx.received();
    assert_eq!(got.len(), 1);
    let r = &got[0];
    uploadhook::verify(
        &secret,
        &r.headers["webhook-id"],
        r.headers["webhook-timestamp"].parse().unwrap(),
        &r.body,
        &r.headers["webhook-signature"],
        chrono::Utc::now().timestamp(),
        300,
    )
    .unwrap();
    let p: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(p["metadata"]["album"], "summer");
    assert_eq!(p["file"]["contentType"], "image/png");

    // REST and gRPC return the same data for the same webhook, field by
    // field, in their own encodings.
    let grpc = crate::helpers::get(&app, &app.key_a, &id).await;
    let ts = |t: &Option<prost_types::Timestamp>| {
        let t = t.as_ref().unwrap();
        chrono::DateTime::from_timestamp(t.seconds, t.nanos as u32).unwrap()
    };
    let rest_ts = |v: &Value| {
        chrono::DateTime::parse_from_rfc3339(v.as_str().unwrap())
            .unwrap()
            .to_utc()
    };
    assert_eq!(w["id"], grpc.id.as_str());
    assert_eq!(w["status"], grpc.status().as_str_name());
    assert_eq!(w["storage"], grpc.storage.as_str());
    assert_eq!(w["bucket"], grpc.bucket.as_str());
    assert_eq!(w["key"], grpc.key.as_str());
    assert_eq!(w["filename"], grpc.filename.as_str());
    assert_eq!(w["contentType"], grpc.content_type.as_str());
    assert_eq!(w["size"], grpc.size.to_string());
    assert_eq!(w["etag"], grpc.etag.as_str());
    assert_eq!(w["trigger"], grpc.trigger().as_str_name());
    assert_eq!(w["priority"], grpc.priority().as_str_name());
    assert_eq!(w["url"], grpc.url.as_str());
    assert_eq!(w["attemptCount"], grpc.attempt_count);
    assert_eq!(w["metadata"], serde_json::to_value(&grpc.metadata).unwrap());
    assert_eq!(rest_ts(&w["createdAt"]), ts(&grpc.created_at));
    assert_eq!(rest_ts(&w["verifiedAt"]), ts(&grpc.verified_at));
    assert_eq!(rest_ts(&w["completedAt"]), ts(&grpc.completed_at));
    assert_eq!(rest_ts(&w["expiresAt"]), ts(&grpc.expires_at));
    assert_eq!(
        rest_ts(&w["objectLastModified"]),
        ts(&grpc.object_last_modified)
    );
    let (ra, ga) = (&w["attempts"][0], &grpc.attempts[0]);
    assert_eq!(w["attempts"].as_array().unwrap().len(), grpc.attempts.len());
    assert_eq!(ra["number"], ga.number);
    assert_eq!(ra["responseStatus"], ga.response_status);
    // proto3 JSON leaves out a zero (a delivery can take under 1 ms).
    assert_eq!(
        ra["durationMs"].as_str().unwrap_or("0"),
        ga.duration_ms.to_string()
    );
    assert_eq!(rest_ts(&ra["startedAt"]), ts(&ga.started_at));
    app.stop().await;
}

async fn rest_errors_are_google_rpc_status(db: &TestDb) {
    let mut app = TestApp::start(db, "").await;
    let http = reqwest::Client::new();
    let auth = format!("Bearer {}", app.key_a);

    let r = http
        .post(app.http_url("/v1/webhooks"))
        .header("authorization", &auth)
        .json(&json!({"filename": "a.txt", "webhook": {"url": "gopher://x"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["code"], 3);
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .starts_with("webhook.url: "),
        "{body}"
    );

    let r = http
        .post(app.http_url("/v1/webhooks"))
        .header("authorization", &auth)
        .json(&json!({"filename": "a.txt", "webhook": {"url": "http://x"}, "colour": "red"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert!(
        body["message"].as_str().unwrap().contains("colour"),
        "{body}"
    );

    let r = http
        .get(app.http_url(&format!("/v1/webhooks/wh_{}", "0".repeat(32))))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.json::<Value>().await.unwrap()["code"], 16);

    let r = http
        .get(app.http_url(&format!("/v1/webhooks/wh_{}", "0".repeat(32))))
        .header("authorization", &auth)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);

    let r = http.get(app.http_url("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = http.get(app.http_url("/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    app.stop().await;
}

/// The checked-in OpenAPI document is the one the server serves; it is
/// generated from the descriptors, so a proto change makes it stale.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_is_served_and_the_checked_in_copy_is_current() {
    const REGENERATE: &str = "cargo run -- openapi > docs/openapi.json";
    let generated = uploadhook::openapi_json().unwrap();
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi.json");
    let checked_in = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        checked_in == generated,
        "docs/openapi.json is stale; regenerate it with:\n\n    {REGENERATE}\n"
    );

    let db = TestDb::new(crate::helpers::Backend::Sqlite).await.unwrap();
    let mut app = TestApp::start(&db, "").await;
    let r = reqwest::get(app.http_url("/openapi.json")).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/json");
    assert_eq!(r.text().await.unwrap(), generated);
    app.stop().await;
    db.cleanup().await;
}
