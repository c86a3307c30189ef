//! The one place where the webhook HTTP client is built, and the payload.
//!
//! Redirects are never followed (a 3xx is a failed attempt), each attempt
//! has a timeout, and at most `max_response_bytes` of a response are read.
//! Private-network (SSRF) checks at connect time belong here too, as a
//! resolver of this client, so that no other client can deliver.

use std::{collections::BTreeMap, time::Duration};

use bytes::Bytes;
use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;

use crate::{config::DeliveryConfig, signing::SigningKey};

pub const USER_AGENT: &str = concat!("uploadhook/", env!("CARGO_PKG_VERSION"));
pub const EVENT_UPLOAD_COMPLETED: &str = "upload.completed";
/// Stored (and shown by GetStatus) from a response body.
pub const STORED_BODY_BYTES: usize = 4096;

/// The `upload.completed` payload. Field order is fixed, so the body is the
/// same on every attempt.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Payload<'a> {
    pub event: &'a str,
    pub webhook_id: &'a str,
    /// When the object was verified: the moment the upload was known done.
    pub timestamp: String,
    pub file: FileInfo<'a>,
    pub provider: &'a str,
    pub metadata: BTreeMap<String, String>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FileInfo<'a> {
    pub url: &'a str,
    pub filename: &'a str,
    pub key: &'a str,
    pub size: i64,
    pub content_type: &'a str,
    pub etag: &'a str,
}

impl Payload<'_> {
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("payload serializes")
    }
}

pub fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// The headers of one attempt: Standard Webhooks plus the seed plan's.
pub fn signed_headers(
    key: &SigningKey,
    msg_id: &str,
    timestamp: i64,
    body: &[u8],
) -> Vec<(&'static str, String)> {
    vec![
        ("content-type", "application/json".to_string()),
        ("webhook-id", msg_id.to_string()),
        ("webhook-timestamp", timestamp.to_string()),
        ("webhook-signature", key.sign(msg_id, timestamp, body)),
        ("x-webhook-signature", key.sign_body_hex(body)),
        ("x-webhook-id", msg_id.to_string()),
        ("x-webhook-event", EVENT_UPLOAD_COMPLETED.to_string()),
    ]
}

/// What came back from one POST.
#[derive(Debug, Clone, Default)]
pub struct Response {
    /// None when no response arrived (connect error, timeout).
    pub status: Option<u16>,
    pub retry_after: Option<String>,
    /// At most `STORED_BODY_BYTES` of the body, lossy UTF-8.
    pub body: Option<String>,
    pub error: Option<String>,
    pub duration: Duration,
}

#[derive(Clone)]
pub struct DeliveryClient {
    http: reqwest::Client,
    max_response_bytes: usize,
}

impl DeliveryClient {
    pub fn new(cfg: &DeliveryConfig) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .user_agent(USER_AGENT)
            .redirect(reqwest::redirect::Policy::none())
            .timeout(cfg.timeout)
            .connect_timeout(cfg.timeout.min(Duration::from_secs(10)))
            .pool_idle_timeout(Duration::from_secs(90))
            .build()?;
        Ok(Self {
            http,
            max_response_bytes: cfg.max_response_bytes,
        })
    }

    /// POSTs `body` with `headers`; never fails, the outcome is in Response.
    pub async fn post(
        &self,
        url: &str,
        headers: &[(&'static str, String)],
        body: Bytes,
    ) -> Response {
        let started = std::time::Instant::now();
        let mut req = self.http.post(url).body(body);
        for (name, value) in headers {
            req = req.header(*name, value);
        }
        let mut out = Response::default();
        match req.send().await {
            Ok(resp) => {
                out.status = Some(resp.status().as_u16());
                out.retry_after = resp
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                let (body, err) = read_capped(resp, self.max_response_bytes).await;
                out.body = Some(body);
                out.error = err;
            }
            Err(e) => out.error = Some(describe(&e)),
        }
        out.duration = started.elapsed();
        out
    }
}

async fn read_capped(mut resp: reqwest::Response, cap: usize) -> (String, Option<String>) {
    let mut buf = Vec::new();
    let mut err = None;
    loop {
        match resp.chunk().await {
            Ok(None) => break,
            Ok(Some(c)) => {
                let room = cap.saturating_sub(buf.len());
                buf.extend_from_slice(&c[..c.len().min(room)]);
                if buf.len() >= cap {
                    break;
                }
            }
            Err(e) => {
                err = Some(format!("reading response: {}", describe(&e)));
                break;
            }
        }
    }
    buf.truncate(STORED_BODY_BYTES);
    (String::from_utf8_lossy(&buf).into_owned(), err)
}

/// A short description of a request error, without the URL (it may carry
/// credentials in its query).
fn describe(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timeout"
    } else if e.is_connect() {
        "connection failed"
    } else if e.is_redirect() {
        "redirect"
    } else if e.is_body() || e.is_decode() {
        "body error"
    } else {
        "request failed"
    };
    let mut source = std::error::Error::source(e);
    let mut detail = String::new();
    while let Some(s) = source {
        detail = s.to_string();
        source = s.source();
    }
    if detail.is_empty() {
        kind.to_string()
    } else {
        format!("{kind}: {detail}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_has_the_documented_fields() {
        let p = Payload {
            event: EVENT_UPLOAD_COMPLETED,
            webhook_id: "wh_1",
            timestamp: "2026-01-01T00:00:00.000Z".into(),
            file: FileInfo {
                url: "http://x/b/k",
                filename: "a.png",
                key: "k",
                size: 3,
                content_type: "image/png",
                etag: "abc",
            },
            provider: "s3",
            metadata: BTreeMap::from([("user".into(), "42".into())]),
        };
        let v: serde_json::Value = serde_json::from_slice(&p.to_json()).unwrap();
        assert_eq!(v["event"], "upload.completed");
        assert_eq!(v["webhookId"], "wh_1");
        assert_eq!(v["file"]["contentType"], "image/png");
        assert_eq!(v["file"]["size"], 3);
        assert_eq!(v["metadata"]["user"], "42");
        assert_eq!(v["provider"], "s3");
    }

    #[test]
    fn headers_carry_both_signatures() {
        let key = SigningKey::from_secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let h = signed_headers(
            &key,
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            b"{\"test\": 2432232314}",
        );
        let get = |n| h.iter().find(|(k, _)| *k == n).unwrap().1.clone();
        assert_eq!(
            get("webhook-signature"),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
        assert!(get("x-webhook-signature").starts_with("sha256="));
        assert_eq!(get("x-webhook-event"), "upload.completed");
    }
}
