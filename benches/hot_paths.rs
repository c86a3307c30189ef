//! Micro-benchmarks of the hot pure code (issue 8; see BENCHMARKS.md):
//! signing a delivery, building its payload, and the REST gateway's JSON
//! transcoding (JSON -> protobuf -> gRPC frame, and back).
//!
//! ```text
//! cargo bench --bench hot_paths
//! ```

use std::{collections::BTreeMap, convert::Infallible, hint::black_box, sync::Arc};

use bytes::Bytes;
use chrono::{TimeZone, Utc};
use criterion::{Criterion, criterion_group, criterion_main};
use http_body_util::BodyExt;
use prost::Message;
use tower::ServiceExt;
use uploadhook::{
    api::gateway::{Gateway, router},
    pipeline::delivery::{EVENT_UPLOAD_COMPLETED, FileInfo, Payload, rfc3339, signed_headers},
    proto,
    signing::SigningKey,
};

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const ID: &str = "wh_0192f0c4a1b27d3e8f90a1b2c3d4e5f6";

fn payload_json() -> Vec<u8> {
    let metadata = BTreeMap::from([
        ("user".to_string(), "42".to_string()),
        ("album".to_string(), "holidays-2026".to_string()),
    ]);
    let verified = Utc.with_ymd_and_hms(2026, 11, 28, 15, 0, 0).unwrap();
    Payload {
        event: EVENT_UPLOAD_COMPLETED,
        webhook_id: ID,
        timestamp: rfc3339(verified),
        file: FileInfo {
            url: "http://127.0.0.1:9000/uploads/uploads/tn_1/2026/11/28/abc/photo.jpg",
            filename: "photo.jpg",
            key: "uploads/tn_1/2026/11/28/abc/photo.jpg",
            size: 1_234_567,
            content_type: "image/jpeg",
            etag: "9b2cf535f27731c974343645a3985328",
        },
        provider: "s3-compatible",
        metadata: metadata.clone(),
    }
    .to_json()
}

fn signing(c: &mut Criterion) {
    let key = SigningKey::from_secret(SECRET).unwrap();
    let body = payload_json();
    c.bench_function("signing/from_secret", |b| {
        b.iter(|| SigningKey::from_secret(black_box(SECRET)).unwrap())
    });
    c.bench_function("signing/sign (Standard Webhooks v1)", |b| {
        b.iter(|| key.sign(black_box(ID), black_box(1_764_342_000), black_box(&body)))
    });
    c.bench_function("signing/signed_headers (both signatures + ids)", |b| {
        b.iter(|| {
            signed_headers(
                std::slice::from_ref(&key),
                black_box(ID),
                black_box(1_764_342_000),
                &body,
            )
        })
    });
    let sig = key.sign(ID, 1_764_342_000, &body);
    c.bench_function("signing/verify (receiver side)", |b| {
        b.iter(|| {
            uploadhook::verify(
                SECRET,
                ID,
                1_764_342_000,
                black_box(&body),
                &sig,
                1_764_342_000,
                300,
            )
            .unwrap()
        })
    });
}

fn payload(c: &mut Criterion) {
    c.bench_function("payload/build + serialize upload.completed", |b| {
        b.iter(payload_json)
    });
}

/// A stand-in for the tonic service behind the gateway: it answers every
/// call with the same encoded CreateUploadWebhookResponse, so that the
/// benchmark measures the gateway's own work (route lookup, JSON -> proto,
/// gRPC framing, proto -> JSON), not the service.
fn canned_grpc() -> impl tower::Service<
    http::Request<tonic::body::Body>,
    Response = http::Response<tonic::body::Body>,
    Error = Infallible,
    Future = impl Send,
> + Clone
+ Send
+ Sync
+ 'static {
    let message = proto::CreateUploadWebhookResponse {
        webhook: Some(proto::Webhook {
            id: ID.into(),
            status: proto::Status::Pending as i32,
            storage: "embedded".into(),
            bucket: "uploads".into(),
            key: "uploads/tn_1/2026/11/28/abc/photo.jpg".into(),
            filename: "photo.jpg".into(),
            content_type: "image/jpeg".into(),
            metadata: [("user".to_string(), "42".to_string())].into(),
            created_at: Some(prost_types::Timestamp {
                seconds: 1_764_342_000,
                nanos: 0,
            }),
            url: "https://example.com/hook".into(),
            ..Default::default()
        }),
        upload_url: "http://127.0.0.1:9000/uploads/uploads/tn_1/photo.jpg?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Signature=0123456789abcdef".into(),
        upload_method: "PUT".into(),
        upload_headers: [("content-type".to_string(), "image/jpeg".to_string())].into(),
        ..Default::default()
    }
    .encode_to_vec();
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
    frame.extend_from_slice(&message);
    let frame = Bytes::from(frame);
    tower::service_fn(move |_req: http::Request<tonic::body::Body>| {
        let frame = frame.clone();
        async move {
            let mut trailers = http::HeaderMap::new();
            trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
            let body = http_body_util::Full::new(frame)
                .map_err(|never: Infallible| match never {})
                .with_trailers(async move { Some(Ok(trailers)) });
            let response = http::Response::builder()
                .header("content-type", "application/grpc")
                .body(tonic::body::Body::new(
                    body.map_err(|e: Infallible| match e {}),
                ))
                .unwrap();
            Ok::<_, Infallible>(response)
        }
    })
}

fn transcoding(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let gateway = Arc::new(
        Gateway::from_descriptors(
            uploadhook::proto::FILE_DESCRIPTOR_SET,
            uploadhook::proto::SERVICE_NAME,
        )
        .unwrap(),
    );
    let app = router(gateway, canned_grpc());
    let body = br#"{"filename": "photo.jpg", "contentType": "image/jpeg",
        "webhook": {"url": "https://example.com/hook",
                    "secret": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
                    "metadata": {"user": "42"}}}"#;
    let request = || {
        http::Request::post("/v1/webhooks")
            .header("authorization", "Bearer uhk_bench")
            .header("content-type", "application/json")
            .body(axum::body::Body::from(&body[..]))
            .unwrap()
    };
    // Check once that the whole round trip works, so the benchmark never
    // measures an error path.
    let (status, json) = runtime.block_on(async {
        let r = app.clone().oneshot(request()).await.unwrap();
        let status = r.status();
        (status, r.into_body().collect().await.unwrap().to_bytes())
    });
    assert_eq!(status, http::StatusCode::OK, "{json:?}");
    assert!(json.starts_with(b"{\"webhook\""), "{json:?}");
    c.bench_function(
        "gateway/POST /v1/webhooks JSON -> gRPC -> JSON (canned service)",
        |b| {
            b.iter(|| {
                runtime.block_on(async {
                    let r = app.clone().oneshot(request()).await.unwrap();
                    r.into_body().collect().await.unwrap().to_bytes()
                })
            })
        },
    );
}

criterion_group!(benches, signing, payload, transcoding);
criterion_main!(benches);
