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
use uploadhook::{
    clock::ManualClock,
    proto::{self, Status},
};

use crate::{
    backend_tests,
    helpers::{TestApp, TestDb, authed, create_request, get},
};

backend_tests!(
    health_and_reflection_answer,
    confirm_after_expiry_fails_and_expires
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
        .confirm(authed(
            &app.key_a,
            proto::ConfirmRequest {
                webhook_id: a.id.clone(),
                etag: String::new(),
            },
        ))
        .await
        .unwrap();
    assert_eq!(ok.into_inner().webhook.unwrap().status(), Status::Verifying);

    // One second after, it is refused and the webhook is EXPIRED.
    clock.advance(chrono::Duration::seconds(2));
    let err = client
        .confirm(authed(
            &app.key_a,
            proto::ConfirmRequest {
                webhook_id: b.id.clone(),
                etag: String::new(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("expired"), "{}", err.message());
    assert_eq!(get(&app, &app.key_a, &b.id).await.status(), Status::Expired);
    app.stop().await;
}
