//! The gRPC adapter: authentication, wire-to-domain conversion, and back.
//! The REST gateway calls this same service in-process, so both protocols
//! share every check.

use std::{pin::Pin, sync::Arc};

use chrono::{DateTime, Utc};
use futures_util::{Stream, StreamExt};
use secrecy::ExposeSecret;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status as GrpcStatus};

use super::{audit::AuthFailure, service::WebhookApi, validate};
use crate::{
    domain::{Status, TenantId, Trigger},
    error::ApiError,
    events::{self, EventFilter, StreamConfig, StreamEnd, StreamItem},
    pipeline::queue::Priority,
    proto::{self, webhook_service_server::WebhookService},
    store::{Webhook, attempts, metadata_of},
};

pub const DEFAULT_PAGE_SIZE: u64 = 50;
pub const MAX_PAGE_SIZE: u64 = 500;

pub struct GrpcApi {
    api: Arc<WebhookApi>,
    streams: Streams,
}

/// What StreamEvents needs beyond the service: tuning and the per-process
/// cap on open streams.
#[derive(Clone)]
pub struct Streams {
    pub config: StreamConfig,
    pub open: Arc<Semaphore>,
    /// Ends every open stream (UNAVAILABLE) when the server shuts down.
    pub shutdown: CancellationToken,
}

impl Streams {
    pub fn new(config: StreamConfig, max_open: usize, shutdown: CancellationToken) -> Self {
        Self {
            config,
            open: Arc::new(Semaphore::new(max_open)),
            shutdown,
        }
    }
}

impl GrpcApi {
    pub fn new(api: Arc<WebhookApi>, streams: Streams) -> Self {
        Self { api, streams }
    }

    /// The caller's tenant: by its API key when it sends one, otherwise by
    /// its client certificate (mutual TLS, `server.tls.client_tenants`).
    async fn tenant<T>(&self, req: &Request<T>) -> Result<TenantId, ApiError> {
        let cert = crate::tls::peer_of(req.extensions()).and_then(|p| p.client.as_deref());
        if self.api.require_client_cert && cert.is_none() {
            self.api.auth_failed(AuthFailure::Malformed);
            return Err(ApiError::Unauthenticated(
                "a client certificate is required (server.tls.client_auth = \"required\")".into(),
            ));
        }
        if let Some(cert) = cert
            && req.metadata().get("authorization").is_none()
        {
            return self.api.authenticate_cert(cert);
        }
        let key = bearer(req).inspect_err(|_| self.api.auth_failed(AuthFailure::Malformed))?;
        self.api.authenticate(key.trim()).await
    }
}

/// The API key of `authorization: Bearer <api key>`.
fn bearer<T>(req: &Request<T>) -> Result<&str, ApiError> {
    let header = req.metadata().get("authorization").ok_or_else(|| {
        ApiError::Unauthenticated("missing `authorization: Bearer <api key>`".into())
    })?;
    let value = header
        .to_str()
        .map_err(|_| ApiError::Unauthenticated("authorization header is not ASCII".into()))?;
    value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .ok_or_else(|| ApiError::Unauthenticated("authorization must be `Bearer <api key>`".into()))
}

pub fn timestamp(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    }
}

/// The status view of a webhook. Never carries the secret.
pub fn webhook_view(w: &Webhook, attempts: &[attempts::Model]) -> proto::Webhook {
    let status = Status::parse(&w.status).map_or(proto::Status::Unspecified, Status::to_proto);
    let trigger = Trigger::parse(&w.trigger).map_or(proto::Trigger::Unspecified, Trigger::to_proto);
    proto::Webhook {
        id: w.id.clone(),
        status: status as i32,
        storage: w.storage.clone(),
        bucket: w.bucket.clone(),
        key: w.object_key.clone(),
        filename: w.filename.clone(),
        content_type: w.content_type.clone(),
        size: w.size.or(w.expected_size).unwrap_or_default(),
        etag: w.etag.clone().unwrap_or_default(),
        trigger: trigger as i32,
        metadata: metadata_of(w).into_iter().collect(),
        created_at: Some(timestamp(w.created_at)),
        verified_at: w.verified_at.map(timestamp),
        completed_at: w.completed_at.map(timestamp),
        expires_at: Some(timestamp(w.expires_at)),
        attempt_count: w.attempt_count,
        next_attempt_at: w.next_attempt_at.map(timestamp),
        last_error: w.last_error.clone().unwrap_or_default(),
        attempts: attempts
            .iter()
            .map(|a| proto::Attempt {
                number: a.number,
                started_at: Some(timestamp(a.started_at)),
                duration_ms: a.duration_ms,
                response_status: a.response_status.unwrap_or_default(),
                response_body: a.response_body.clone().unwrap_or_default(),
                error: a.error.clone().unwrap_or_default(),
            })
            .collect(),
        url: w.url.clone(),
        object_last_modified: w.object_last_modified.map(timestamp),
        priority: match Priority::parse(&w.priority) {
            Some(Priority::High) => proto::Priority::High,
            _ => proto::Priority::Normal,
        } as i32,
    }
}

/// The status that ends a stream early, with the cursor to resume after
/// (the events are stored; nothing is lost): RESOURCE_EXHAUSTED for a slow
/// reader or a failed read, UNAVAILABLE at shutdown.
fn stream_end(end: StreamEnd) -> GrpcStatus {
    let message = match end {
        StreamEnd::SlowReader {
            resume_after,
            waited,
        } => format!(
            "the reader did not keep up for {}s; resume with after_event_id = {resume_after} \
             (the last event id received)",
            waited.as_secs_f64()
        ),
        StreamEnd::Failed { resume_after, .. } => format!(
            "the event log could not be read; resume with after_event_id = {resume_after} \
             (the last event id received)"
        ),
        StreamEnd::ShuttingDown { resume_after } => {
            return ApiError::Unavailable(format!(
                "the server is shutting down; resume with after_event_id = {resume_after} \
                 (the last event id received)"
            ))
            .into();
        }
    };
    ApiError::ResourceExhausted(message).into()
}

type EventStream =
    Pin<Box<dyn Stream<Item = Result<proto::StreamEventsResponse, GrpcStatus>> + Send>>;

#[tonic::async_trait]
impl WebhookService for GrpcApi {
    async fn create_upload_webhook(
        &self,
        req: Request<proto::CreateUploadWebhookRequest>,
    ) -> Result<Response<proto::CreateUploadWebhookResponse>, GrpcStatus> {
        let tenant = self.tenant(&req).await?;
        let input = validate::create(req.into_inner(), &self.api.limits, &self.api.allow)?;
        let out = self.api.create(&tenant, input).await?;
        Ok(Response::new(proto::CreateUploadWebhookResponse {
            webhook: Some(webhook_view(&out.webhook, &[])),
            upload_url: out.upload.url,
            upload_method: out.upload.method,
            upload_headers: out.upload.headers.into_iter().collect(),
            upload_expires_at: Some(timestamp(out.upload.expires_at)),
            object_url: out.object_url,
            signing_secret: out
                .signing_secret
                .map(|s| s.expose_secret().to_string())
                .unwrap_or_default(),
        }))
    }

    async fn confirm(
        &self,
        req: Request<proto::ConfirmRequest>,
    ) -> Result<Response<proto::ConfirmResponse>, GrpcStatus> {
        let tenant = self.tenant(&req).await?;
        let req = req.into_inner();
        let id = validate::webhook_id("webhook_id", &req.webhook_id)?;
        let etag = validate::etag(&req.etag)?;
        let w = self.api.confirm(&tenant, &id, etag).await?;
        Ok(Response::new(proto::ConfirmResponse {
            webhook: Some(webhook_view(&w, &[])),
        }))
    }

    async fn get_status(
        &self,
        req: Request<proto::GetStatusRequest>,
    ) -> Result<Response<proto::GetStatusResponse>, GrpcStatus> {
        let tenant = self.tenant(&req).await?;
        let id = validate::webhook_id("webhook_id", &req.get_ref().webhook_id)?;
        let (w, attempts) = self.api.get(&tenant, &id).await?;
        Ok(Response::new(proto::GetStatusResponse {
            webhook: Some(webhook_view(&w, &attempts)),
        }))
    }

    type StreamEventsStream = EventStream;

    async fn stream_events(
        &self,
        req: Request<proto::StreamEventsRequest>,
    ) -> Result<Response<Self::StreamEventsStream>, GrpcStatus> {
        let tenant = self.tenant(&req).await?;
        let req = req.into_inner();
        let webhook = if req.webhook_id.is_empty() {
            None
        } else {
            let id = validate::webhook_id("webhook_id", &req.webhook_id)?;
            // Another tenant's webhook answers like an unknown one.
            self.api
                .store
                .find_webhook(&tenant, &id)
                .await
                .map_err(|e| ApiError::internal("database error", &e))?
                .ok_or_else(|| ApiError::webhook_not_found(id.as_str()))?;
            Some(id)
        };
        let after = match req.after_event_id {
            0 => None,
            n if n < 0 => {
                return Err(ApiError::invalid("after_event_id", "must not be negative").into());
            }
            n => Some(n),
        };
        let types = validate::event_types(&req.types)?;
        let statuses = req
            .statuses
            .iter()
            .enumerate()
            .map(|(i, &s)| {
                proto::Status::try_from(s)
                    .ok()
                    .and_then(Status::from_proto)
                    .ok_or_else(|| {
                        ApiError::invalid(format!("statuses[{i}]"), format!("unknown value {s}"))
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let permit = self.streams.open.clone().try_acquire_owned().map_err(|_| {
            ApiError::ResourceExhausted(
                "too many open event streams on this server; retry later".into(),
            )
        })?;
        let filter = EventFilter {
            tenant,
            webhook,
            types,
            statuses,
        };
        let followed = events::follow(
            Arc::new(self.api.store.clone()),
            self.api.store.bus().clone(),
            filter,
            after,
            self.streams.config.clone(),
            Some(permit),
            self.streams.shutdown.clone(),
        )
        .await
        .map_err(|e| ApiError::internal("reading the event log", &e))?;
        let stream = followed.into_stream().map(|item| match item {
            Ok(StreamItem::Event(e)) => Ok(proto::StreamEventsResponse {
                kind: Some(proto::stream_events_response::Kind::Event(
                    proto::WebhookEvent {
                        event_id: e.id,
                        webhook_id: e.webhook_id.as_str().to_string(),
                        r#type: e.kind,
                        status: e.status.to_proto() as i32,
                        occurred_at: Some(timestamp(e.occurred_at)),
                    },
                )),
            }),
            Ok(StreamItem::Heartbeat(at)) => Ok(proto::StreamEventsResponse {
                kind: Some(proto::stream_events_response::Kind::Heartbeat(
                    proto::Heartbeat {
                        sent_at: Some(timestamp(at)),
                    },
                )),
            }),
            Err(end) => Err(stream_end(end)),
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn list_webhooks(
        &self,
        req: Request<proto::ListWebhooksRequest>,
    ) -> Result<Response<proto::ListWebhooksResponse>, GrpcStatus> {
        let tenant = self.tenant(&req).await?;
        let req = req.into_inner();
        let page_size = match req.page_size {
            0 => DEFAULT_PAGE_SIZE,
            n if n < 0 || n as u64 > MAX_PAGE_SIZE => {
                return Err(ApiError::invalid(
                    "page_size",
                    format!("must be between 0 and {MAX_PAGE_SIZE}"),
                )
                .into());
            }
            n => n as u64,
        };
        let after = if req.page_token.is_empty() {
            None
        } else {
            Some(validate::webhook_id("page_token", &req.page_token)?)
        };
        let status = match proto::Status::try_from(req.status) {
            Ok(s) => Status::from_proto(s),
            Err(_) => {
                return Err(
                    ApiError::invalid("status", format!("unknown value {}", req.status)).into(),
                );
            }
        };
        let (rows, next) = self.api.list(&tenant, status, after, page_size).await?;
        Ok(Response::new(proto::ListWebhooksResponse {
            webhooks: rows.iter().map(|w| webhook_view(w, &[])).collect(),
            next_page_token: next.map(|n| n.as_str().to_string()).unwrap_or_default(),
        }))
    }

    async fn redeliver(
        &self,
        req: Request<proto::RedeliverRequest>,
    ) -> Result<Response<proto::RedeliverResponse>, GrpcStatus> {
        let tenant = self.tenant(&req).await?;
        let id = validate::webhook_id("webhook_id", &req.get_ref().webhook_id)?;
        let w = self.api.redeliver(&tenant, &id).await?;
        Ok(Response::new(proto::RedeliverResponse {
            webhook: Some(webhook_view(&w, &[])),
        }))
    }

    async fn rotate_secret(
        &self,
        req: Request<proto::RotateSecretRequest>,
    ) -> Result<Response<proto::RotateSecretResponse>, GrpcStatus> {
        let tenant = self.tenant(&req).await?;
        let req = req.into_inner();
        let id = validate::webhook_id("webhook_id", &req.webhook_id)?;
        let secret = validate::new_secret(&req.secret)?;
        let grace = validate::grace_period(req.grace_period)?;
        let out = self.api.rotate_secret(&tenant, &id, secret, grace).await?;
        Ok(Response::new(proto::RotateSecretResponse {
            webhook: Some(webhook_view(&out.webhook, &[])),
            signing_secret: out
                .signing_secret
                .map(|s| s.expose_secret().to_string())
                .unwrap_or_default(),
            previous_secret_expires_at: out.previous_until.map(timestamp),
        }))
    }

    async fn cancel_webhook(
        &self,
        req: Request<proto::CancelWebhookRequest>,
    ) -> Result<Response<proto::CancelWebhookResponse>, GrpcStatus> {
        let tenant = self.tenant(&req).await?;
        let id = validate::webhook_id("webhook_id", &req.get_ref().webhook_id)?;
        let w = self.api.cancel(&tenant, &id).await?;
        Ok(Response::new(proto::CancelWebhookResponse {
            webhook: Some(webhook_view(&w, &[])),
        }))
    }
}
