//! `POST /v1/storage-events/{storage}`: storage event notifications, for
//! instant detection of `AUTO` uploads (HEAD checks stay the fallback).
//!
//! It accepts S3 event notification JSON (`Records[].eventName`
//! `ObjectCreated:*`, `s3.bucket.name`, `s3.object.key` URL-encoded with
//! `+` for a space, `size`, `eTag`), as MinIO's webhook target sends it,
//! and the same wrapped in an SNS HTTP(S) subscription's messages.
//!
//! **Authentication** is a shared secret (`events.token`), compared in
//! constant time: `Authorization: Bearer <token>` (MinIO), or `?token=` in
//! the subscription URL (SNS, which cannot set headers). SNS message
//! signatures (RSA over an X.509 certificate fetched from AWS) are not
//! verified: that would take an RSA and X.509 stack for what the token in
//! the URL, over https, already gives. A SubscriptionConfirmation is
//! answered by fetching its `SubscribeURL`, only on a host of
//! `events.sns_subscribe_hosts`.
//!
//! An event only makes the matching webhooks check their object now
//! ([`detect::object_created`]): nothing is delivered without a HEAD, so a
//! forged, duplicate or out-of-order event can cost a HEAD, never a false
//! webhook.

use std::{collections::HashMap, sync::Arc, time::Duration};

use axum::{
    Json, Router,
    body::Bytes,
    extract::{Path, Query, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::post,
};
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tracing::{info, warn};

use crate::{
    clock::Clock,
    pipeline::{
        detect::{self, ObjectCreated},
        queue::Queue,
    },
    storage::Storages,
    store::Store,
};

/// What the endpoint needs.
#[derive(Clone)]
pub struct StorageEvents {
    pub store: Store,
    pub queue: Arc<dyn Queue>,
    pub storages: Arc<Storages>,
    pub clock: Arc<dyn Clock>,
    pub token: SecretString,
    pub sns_hosts: Vec<String>,
    pub http: reqwest::Client,
}

impl StorageEvents {
    /// The HTTP client that confirms SNS subscriptions: no redirects, no
    /// proxy, a timeout.
    pub fn client() -> reqwest::Result<reqwest::Client> {
        reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .timeout(Duration::from_secs(10))
            .build()
    }
}

pub fn router(state: StorageEvents) -> Router {
    Router::new()
        .route("/v1/storage-events/{storage}", post(receive))
        .with_state(Arc::new(state))
}

/// An error answer shaped like the gateway's (`google.rpc.Status`).
fn error(status: StatusCode, code: i32, message: impl Into<String>) -> Response {
    let message = message.into();
    (
        status,
        Json(json!({"code": code, "message": message, "details": []})),
    )
        .into_response()
}

/// Equal secrets, compared in time independent of where they differ (and
/// of their lengths: digests are compared).
pub fn token_matches(expected: &str, given: &str) -> bool {
    let (a, b) = (Sha256::digest(expected), Sha256::digest(given));
    !expected.is_empty()
        && a.iter()
            .zip(b.iter())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// Whether `host` matches one of `patterns`, where `*` stands for exactly
/// one DNS label (`sns.*.amazonaws.com`).
pub fn host_allowed(patterns: &[String], host: &str) -> bool {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    let labels: Vec<&str> = host.split('.').collect();
    patterns.iter().any(|p| {
        let p = p.to_ascii_lowercase();
        let pl: Vec<&str> = p.split('.').collect();
        pl.len() == labels.len()
            && pl
                .iter()
                .zip(&labels)
                .all(|(p, l)| !l.is_empty() && (*p == "*" || p == l))
    })
}

/// An S3 event key: URL-encoded, with `+` for a space.
pub fn decode_key(raw: &str) -> Result<String, String> {
    let spaced = raw.replace('+', " ");
    percent_encoding::percent_decode_str(&spaced)
        .decode_utf8()
        .map(|k| k.into_owned())
        .map_err(|_| "is not URL-encoded UTF-8".to_string())
}

/// The created objects of an S3 event notification. Other events
/// (removals, S3's `s3:TestEvent`) give none. Errors name the field.
pub fn parse_s3_event(v: &Value) -> Result<Vec<ObjectCreated>, String> {
    let Some(records) = v.get("Records") else {
        if v.get("Event").and_then(Value::as_str) == Some("s3:TestEvent") {
            return Ok(Vec::new());
        }
        return Err("Records: is required".into());
    };
    let records = records.as_array().ok_or("Records: must be an array")?;
    let mut out = Vec::new();
    for (i, r) in records.iter().enumerate() {
        let field = |path: &str| format!("Records[{i}].{path}");
        let name = r
            .get("eventName")
            .and_then(Value::as_str)
            .ok_or_else(|| format!("{}: is required", field("eventName")))?;
        if !name.contains("ObjectCreated:") {
            continue;
        }
        let s3 = r
            .get("s3")
            .ok_or_else(|| format!("{}: is required", field("s3")))?;
        let bucket = s3
            .pointer("/bucket/name")
            .and_then(Value::as_str)
            .ok_or_else(|| format!("{}: is required", field("s3.bucket.name")))?;
        let raw_key = s3
            .pointer("/object/key")
            .and_then(Value::as_str)
            .ok_or_else(|| format!("{}: is required", field("s3.object.key")))?;
        let key = decode_key(raw_key).map_err(|m| format!("{}: {m}", field("s3.object.key")))?;
        let size = match s3.pointer("/object/size") {
            None | Some(Value::Null) => None,
            Some(n) => Some(n.as_i64().filter(|n| *n >= 0).ok_or_else(|| {
                format!(
                    "{}: must be a non-negative integer",
                    field("s3.object.size")
                )
            })?),
        };
        let etag = s3
            .pointer("/object/eTag")
            .and_then(Value::as_str)
            .filter(|e| !e.is_empty())
            .map(str::to_string);
        out.push(ObjectCreated {
            bucket: bucket.to_string(),
            key,
            size,
            etag,
        });
    }
    Ok(out)
}

async fn receive(
    State(st): State<Arc<StorageEvents>>,
    Path(storage): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let expected = st.token.expose_secret();
    let given = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .or(query.get("token").map(String::as_str))
        .unwrap_or("");
    if !token_matches(expected, given) {
        return error(
            StatusCode::UNAUTHORIZED,
            16,
            "missing or invalid token (Authorization: Bearer, or ?token=)",
        );
    }
    let Ok(conn) = st.storages.resolve(&storage) else {
        return error(
            StatusCode::NOT_FOUND,
            5,
            format!("storage: unknown storage connection {storage:?}"),
        );
    };
    let v: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return error(StatusCode::BAD_REQUEST, 3, format!("body: not JSON: {e}")),
    };
    // SNS wraps the S3 event in its own message.
    let sns_type = headers
        .get("x-amz-sns-message-type")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or_else(|| v.get("Type").and_then(Value::as_str).map(str::to_string));
    let event = match sns_type.as_deref() {
        None => v,
        Some("SubscriptionConfirmation") => return confirm_subscription(&st, &v).await,
        Some("UnsubscribeConfirmation") => {
            return (StatusCode::OK, Json(json!({"matched": 0}))).into_response();
        }
        Some("Notification") => {
            let Some(message) = v.get("Message").and_then(Value::as_str) else {
                return error(StatusCode::BAD_REQUEST, 3, "Message: is required");
            };
            match serde_json::from_str(message) {
                Ok(m) => m,
                Err(e) => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        3,
                        format!("Message: not JSON: {e}"),
                    );
                }
            }
        }
        Some(other) => {
            return error(
                StatusCode::BAD_REQUEST,
                3,
                format!("Type: unknown SNS message type {other:?}"),
            );
        }
    };
    let created = match parse_s3_event(&event) {
        Ok(c) => c,
        Err(m) => return error(StatusCode::BAD_REQUEST, 3, m),
    };
    let now = st.clock.now();
    let mut matched = 0;
    for ev in created.iter().filter(|ev| ev.bucket == conn.bucket()) {
        match detect::object_created(&st.store, st.queue.as_ref(), conn.name(), ev, now).await {
            Ok(n) => matched += n,
            Err(e) => {
                // The sender retries (MinIO and SNS both do): nothing lost.
                warn!(error = %e, "storage event: database error");
                return error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    13,
                    "database error; retry",
                );
            }
        }
    }
    if matched > 0 {
        info!(
            storage = conn.name(),
            matched, "storage event triggered checks"
        );
    }
    (
        StatusCode::OK,
        Json(json!({"records": created.len(), "matched": matched})),
    )
        .into_response()
}

/// Fetches `SubscribeURL` when its host is allowed (https, or http on a
/// loopback host).
async fn confirm_subscription(st: &StorageEvents, v: &Value) -> Response {
    let Some(raw) = v.get("SubscribeURL").and_then(Value::as_str) else {
        return error(StatusCode::BAD_REQUEST, 3, "SubscribeURL: is required");
    };
    let Ok(url) = reqwest::Url::parse(raw) else {
        return error(StatusCode::BAD_REQUEST, 3, "SubscribeURL: is not a URL");
    };
    let host = url.host_str().unwrap_or("");
    let loopback = host
        .trim_matches(['[', ']'])
        .parse::<std::net::IpAddr>()
        .is_ok_and(|ip| ip.is_loopback());
    let scheme_ok = url.scheme() == "https" || (url.scheme() == "http" && loopback);
    if !scheme_ok || !host_allowed(&st.sns_hosts, host) {
        return error(
            StatusCode::BAD_REQUEST,
            3,
            format!(
                "SubscribeURL: host {host:?} is not in events.sns_subscribe_hosts (or the scheme is not https)"
            ),
        );
    }
    match st.http.get(url).send().await {
        Ok(r) if r.status().is_success() => {
            let topic = v.get("TopicArn").and_then(Value::as_str).unwrap_or("");
            info!(topic, "SNS subscription confirmed");
            (StatusCode::OK, Json(json!({"confirmed": true}))).into_response()
        }
        Ok(r) => error(
            StatusCode::BAD_GATEWAY,
            14,
            format!("SubscribeURL answered {}", r.status().as_u16()),
        ),
        Err(e) => error(
            StatusCode::BAD_GATEWAY,
            14,
            format!("SubscribeURL could not be fetched: {}", e.without_url()),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_url_decoded_with_plus_as_space() {
        assert_eq!(decode_key("a+b%2Bc/%C3%A9.txt").unwrap(), "a b+c/é.txt");
        assert!(decode_key("%FF").is_err());
    }

    #[test]
    fn hosts_match_label_by_label() {
        let p = vec!["sns.*.amazonaws.com".to_string()];
        assert!(host_allowed(&p, "sns.eu-west-1.amazonaws.com"));
        assert!(host_allowed(&p, "SNS.us-east-1.amazonaws.com."));
        assert!(!host_allowed(&p, "sns.a.b.amazonaws.com"));
        assert!(!host_allowed(
            &p,
            "sns.eu-west-1.amazonaws.com.evil.example"
        ));
        assert!(!host_allowed(&p, "evil.example"));
        assert!(!host_allowed(&p, "sns..amazonaws.com"));
    }

    #[test]
    fn tokens_compare_whole() {
        assert!(token_matches("0123456789abcdef", "0123456789abcdef"));
        assert!(!token_matches("0123456789abcdef", "0123456789abcdeF"));
        assert!(!token_matches("0123456789abcdef", "0123456789abcde"));
        assert!(!token_matches("", ""), "an empty token never matches");
    }

    #[test]
    fn s3_events_parse_and_name_bad_fields() {
        let v = json!({"Records": [
            {"eventName": "s3:ObjectCreated:Put", "s3": {"bucket": {"name": "b"},
              "object": {"key": "uploads/a+b.txt", "size": 5, "eTag": "abc", "sequencer": "01"}}},
            {"eventName": "ObjectCreated:CompleteMultipartUpload", "s3": {"bucket": {"name": "b"},
              "object": {"key": "k", "eTag": "d41d-3"}}},
            {"eventName": "s3:ObjectRemoved:Delete", "s3": {}}
        ]});
        let got = parse_s3_event(&v).unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].key, "uploads/a b.txt");
        assert_eq!(got[0].size, Some(5));
        assert_eq!(got[1].etag.as_deref(), Some("d41d-3"));
        assert_eq!(got[1].size, None);
        assert!(
            parse_s3_event(&json!({"Event": "s3:TestEvent"}))
                .unwrap()
                .is_empty()
        );
        let err = |v: Value| parse_s3_event(&v).unwrap_err();
        assert_eq!(err(json!({})), "Records: is required");
        assert_eq!(err(json!({"Records": 1})), "Records: must be an array");
        assert_eq!(
            err(
                json!({"Records": [{"eventName": "ObjectCreated:Put", "s3": {"bucket": {"name": "b"}, "object": {}}}]})
            ),
            "Records[0].s3.object.key: is required"
        );
        assert_eq!(
            err(
                json!({"Records": [{"eventName": "ObjectCreated:Put", "s3": {"bucket": {"name": "b"}, "object": {"key": "k", "size": -1}}}]})
            ),
            "Records[0].s3.object.size: must be a non-negative integer"
        );
    }
}
