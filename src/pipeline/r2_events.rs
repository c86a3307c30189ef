//! Cloudflare R2 event notifications, pulled from a Cloudflare Queue over
//! the Queues pull-consumer HTTP API: `POST …/messages/pull` with
//! `batch_size` and `visibility_timeout_ms`, then `POST …/messages/ack`
//! with the handled messages' `lease_id`s.
//!
//! A message whose object was written (`PutObject`,
//! `CompleteMultipartUpload`, `CopyObject`) makes the PENDING AUTO webhooks
//! of that object check it now ([`detect::object_created`]); the HEAD
//! still decides. A message is acked once handled, including one that is
//! malformed or about another bucket (logged, so that it does not come back
//! forever). One the database failed on is not acked: the Queue hands it
//! out again after the visibility timeout. Every source is at least once,
//! and duplicates are harmless.

use std::{sync::Arc, time::Duration};

use base64::Engine;
use secrecy::ExposeSecret;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{
    detect::{self, ObjectCreated},
    queue::Queue,
};
use crate::{clock::Clock, config::R2EventsConfig, storage::Storage, store::Store};

/// The actions that write an object.
const CREATED: [&str; 3] = ["PutObject", "CompleteMultipartUpload", "CopyObject"];

/// What one R2 notification says, when it is about a written object.
/// Errors name the field.
pub fn parse_notification(body: &Value) -> Result<Option<ObjectCreated>, String> {
    let action = body
        .get("action")
        .and_then(Value::as_str)
        .ok_or("action: is required")?;
    if !CREATED.contains(&action) {
        return Ok(None);
    }
    let bucket = body
        .get("bucket")
        .and_then(Value::as_str)
        .ok_or("bucket: is required")?;
    let key = body
        .pointer("/object/key")
        .and_then(Value::as_str)
        .ok_or("object.key: is required")?;
    let size = match body.pointer("/object/size") {
        None | Some(Value::Null) => None,
        Some(n) => Some(
            n.as_i64()
                .filter(|n| *n >= 0)
                .ok_or("object.size: must be a non-negative integer")?,
        ),
    };
    let etag = body
        .pointer("/object/eTag")
        .and_then(Value::as_str)
        .filter(|e| !e.is_empty())
        .map(str::to_string);
    Ok(Some(ObjectCreated {
        bucket: bucket.to_string(),
        key: key.to_string(),
        size,
        etag,
    }))
}

/// A pulled message's body as JSON: an object as is, or a string holding
/// JSON (or base64 of JSON, as bytes messages come).
pub fn message_body(m: &Value) -> Result<Value, String> {
    match m.get("body") {
        Some(Value::Object(_)) => Ok(m["body"].clone()),
        Some(Value::String(s)) => serde_json::from_str(s).or_else(|_| {
            let raw = base64::engine::general_purpose::STANDARD
                .decode(s.trim())
                .map_err(|_| "body: neither JSON nor base64 of JSON".to_string())?;
            serde_json::from_slice(&raw).map_err(|e| format!("body: not JSON: {e}"))
        }),
        _ => Err("body: is required".into()),
    }
}

pub struct R2Consumer {
    pub cfg: R2EventsConfig,
    pub http: reqwest::Client,
    pub store: Store,
    pub queue: Arc<dyn Queue>,
    pub storage: Arc<Storage>,
    pub clock: Arc<dyn Clock>,
}

impl R2Consumer {
    fn url(&self, op: &str) -> String {
        format!(
            "{}/accounts/{}/queues/{}/messages/{op}",
            self.cfg.api_base.trim_end_matches('/'),
            self.cfg.account_id,
            self.cfg.queue_id
        )
    }

    async fn call(&self, op: &str, body: Value) -> Result<Value, String> {
        let r = self
            .http
            .post(self.url(op))
            .bearer_auth(self.cfg.api_token.expose_secret())
            .json(&body)
            .send()
            .await
            .map_err(|e| format!("{op}: {}", e.without_url()))?;
        let status = r.status();
        let v: Value = r
            .json()
            .await
            .map_err(|e| format!("{op}: answer is not JSON: {}", e.without_url()))?;
        if !status.is_success() || v.get("success") == Some(&Value::Bool(false)) {
            return Err(format!(
                "{op}: answered {status}: {}",
                v.get("errors").unwrap_or(&Value::Null)
            ));
        }
        Ok(v)
    }

    /// Pulls one batch, handles it and acks what was handled. Returns how
    /// many messages the batch had.
    pub async fn pull_once(&self) -> Result<usize, String> {
        let v = self
            .call(
                "pull",
                json!({
                    "batch_size": self.cfg.batch_size,
                    "visibility_timeout_ms": self.cfg.visibility_timeout.as_millis() as u64,
                }),
            )
            .await?;
        let messages = v
            .pointer("/result/messages")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let mut acks = Vec::new();
        let now = self.clock.now();
        for m in &messages {
            let Some(lease) = m.get("lease_id").and_then(Value::as_str) else {
                warn!("R2 event: a message without lease_id; skipped");
                continue;
            };
            let created = message_body(m).and_then(|b| parse_notification(&b));
            match created {
                Ok(Some(ev)) if ev.bucket == self.storage.bucket() => {
                    match detect::object_created(
                        &self.store,
                        self.queue.as_ref(),
                        self.storage.name(),
                        &ev,
                        now,
                    )
                    .await
                    {
                        Ok(n) => {
                            if n > 0 {
                                info!(matched = n, "R2 event triggered checks");
                            }
                        }
                        Err(e) => {
                            // Not acked: handed out again later.
                            warn!(error = %e, "R2 event: database error; the message comes back");
                            continue;
                        }
                    }
                }
                Ok(Some(ev)) => {
                    warn!(bucket = %ev.bucket, "R2 event for another bucket than the connection's; ignored");
                }
                Ok(None) => {}
                Err(e) => warn!(error = %e, "R2 event: malformed message; acked and dropped"),
            }
            acks.push(json!({"lease_id": lease}));
        }
        if !acks.is_empty() {
            self.call("ack", json!({"acks": acks, "retries": []}))
                .await?;
        }
        Ok(messages.len())
    }

    /// Pulls until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut backoff = Duration::from_millis(500);
        loop {
            let pause = match self.pull_once().await {
                Ok(0) => self.cfg.poll_every,
                Ok(_) => {
                    backoff = Duration::from_millis(500);
                    Duration::ZERO
                }
                Err(e) => {
                    warn!(error = %e, "R2 events: pulling failed; retrying");
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                    backoff
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(pause) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notifications_parse_and_name_bad_fields() {
        let put = json!({"account": "3f4b", "action": "CompleteMultipartUpload", "bucket": "b",
            "object": {"key": "a b/c.txt", "size": 10, "eTag": "abc-2"},
            "eventTime": "2026-11-28T12:00:00Z"});
        let ev = parse_notification(&put).unwrap().unwrap();
        assert_eq!(ev.key, "a b/c.txt", "R2 keys are not URL-encoded");
        assert_eq!(ev.etag.as_deref(), Some("abc-2"));
        assert_eq!(ev.size, Some(10));
        let del = json!({"action": "DeleteObject", "bucket": "b", "object": {"key": "k"}});
        assert_eq!(parse_notification(&del).unwrap(), None);
        assert_eq!(
            parse_notification(&json!({"action": "PutObject", "bucket": "b", "object": {}}))
                .unwrap_err(),
            "object.key: is required"
        );
        assert_eq!(
            parse_notification(&json!({})).unwrap_err(),
            "action: is required"
        );
    }

    #[test]
    fn bodies_come_as_json_a_json_string_or_base64() {
        let inner = json!({"action": "PutObject"});
        assert_eq!(message_body(&json!({"body": inner})).unwrap(), inner);
        assert_eq!(
            message_body(&json!({"body": inner.to_string()})).unwrap(),
            inner
        );
        let b64 = base64::engine::general_purpose::STANDARD.encode(inner.to_string());
        assert_eq!(message_body(&json!({"body": b64})).unwrap(), inner);
        assert!(message_body(&json!({"body": "%%%"})).is_err());
        assert!(message_body(&json!({})).is_err());
    }
}
