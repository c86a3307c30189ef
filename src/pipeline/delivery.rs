//! The one place where the webhook HTTP client is built, and the payload.
//!
//! Redirects are never followed (a 3xx is a failed attempt), each attempt
//! has a timeout, and at most `max_response_bytes` of a response are read.
//! Private-network (SSRF) checks happen here, on the addresses connected
//! to (see `ssrf`): hostnames through this client's resolver, IP-literal
//! hosts (which reqwest never resolves) in [`DeliveryClient::post`]. No
//! proxy is used, because through a proxy the target is never resolved
//! here.
//!
//! A blocked target is an ordinary failed attempt: the error is stored as
//! the attempt's error and retries follow the schedule, then the webhook is
//! dead-lettered. It is not dead-lettered at once because a hostname's
//! addresses change (a receiver moving hosts, a DNS mistake being fixed),
//! and a literal address can be opened later by `delivery.allow_cidrs`. A
//! refused attempt never opens a connection, so retrying it costs only a
//! DNS lookup, and the bounded schedule ends it.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use bytes::Bytes;
use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;

use super::ssrf::{self, AllowList, GuardedResolver};
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
/// `keys` is the current secret, then the previous one during a rotation's
/// grace period: `webhook-signature` carries one space-separated `v1,`
/// entry per key (receivers accept any match), while the older
/// `x-webhook-signature` holds one value and is signed by the first key.
pub fn signed_headers(
    keys: &[SigningKey],
    msg_id: &str,
    timestamp: i64,
    body: &[u8],
) -> Vec<(&'static str, String)> {
    let signatures: Vec<String> = keys
        .iter()
        .map(|k| k.sign(msg_id, timestamp, body))
        .collect();
    vec![
        ("content-type", "application/json".to_string()),
        ("webhook-id", msg_id.to_string()),
        ("webhook-timestamp", timestamp.to_string()),
        ("webhook-signature", signatures.join(" ")),
        (
            "x-webhook-signature",
            keys.first()
                .map(|k| k.sign_body_hex(body))
                .unwrap_or_default(),
        ),
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
    allow: Arc<AllowList>,
}

impl DeliveryClient {
    /// `allow` lists the private networks webhooks may reach anyway
    /// (`Config::delivery_allow_list`).
    pub fn new(cfg: &DeliveryConfig, allow: AllowList) -> Result<Self, reqwest::Error> {
        let allow = Arc::new(allow);
        let http = reqwest::Client::builder()
            .user_agent(USER_AGENT)
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .dns_resolver(GuardedResolver::new(allow.clone()))
            .timeout(cfg.timeout)
            .connect_timeout(cfg.timeout.min(Duration::from_secs(10)))
            .pool_idle_timeout(Duration::from_secs(90))
            .build()?;
        Ok(Self {
            http,
            max_response_bytes: cfg.max_response_bytes,
            allow,
        })
    }

    /// Refuses a URL whose host is an IP literal in a blocked range.
    /// reqwest connects to such a host without asking the resolver, so
    /// this is its connect-time check. Hostnames pass: the resolver
    /// checks the addresses they resolve to.
    fn check_literal_host(&self, url: &reqwest::Url) -> Result<(), String> {
        let Some(ip) = ssrf::literal_host(url) else {
            return Ok(());
        };
        self.allow.check(ip).map_err(|b| format!("blocked: {b}"))
    }

    /// POSTs `body` with `headers`; never fails, the outcome is in Response.
    pub async fn post(
        &self,
        url: &str,
        headers: &[(&'static str, String)],
        body: Bytes,
    ) -> Response {
        let started = std::time::Instant::now();
        // Parsed once: the URL checked is the one requested (reqwest takes
        // a parsed URL as it is).
        let checked = reqwest::Url::parse(url)
            .map_err(|e| format!("invalid URL: {e}"))
            .and_then(|u| self.check_literal_host(&u).map(|()| u));
        let url = match checked {
            Ok(u) => u,
            Err(error) => {
                return Response {
                    error: Some(error),
                    duration: started.elapsed(),
                    ..Default::default()
                };
            }
        };
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
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::config::Config;

    /// A bare HTTP server on 127.0.0.1 that counts the connections it gets
    /// and answers each with 204.
    async fn counting_server() -> (u16, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let count = Arc::new(AtomicUsize::new(0));
        let seen = count.clone();
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                seen.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let _ = sock.read(&mut buf).await;
                    let _ = sock
                        .write_all(b"HTTP/1.1 204 No Content\r\nconnection: close\r\n\r\n")
                        .await;
                });
            }
        });
        (port, count)
    }

    fn client(allow: &[&str]) -> DeliveryClient {
        let cfg = Config::from_toml("").unwrap();
        DeliveryClient::new(&cfg.delivery, AllowList::parse(allow).unwrap()).unwrap()
    }

    // Every connection these tests make or refuse is to 127.0.0.1:
    // `localhost` is 127.0.0.1 in /etc/hosts here, and with "127.0.0.1/32"
    // as the only exception no other address would be connected to.
    #[tokio::test]
    async fn loopback_is_refused_before_connecting_by_literal_and_by_name() {
        let (port, count) = counting_server().await;
        let strict = client(&[]);
        for url in [
            format!("http://127.0.0.1:{port}/hook"),
            format!("http://2130706433:{port}/hook"),
            format!("http://[::ffff:127.0.0.1]:{port}/hook"),
        ] {
            let r = strict.post(&url, &[], Bytes::new()).await;
            assert_eq!(r.status, None, "{url}");
            let err = r.error.unwrap();
            assert!(
                err.starts_with("blocked: ") && err.ends_with("127.0.0.1 is a loopback address"),
                "{url}: {err}"
            );
        }
        let r = strict
            .post(&format!("http://localhost:{port}/hook"), &[], Bytes::new())
            .await;
        assert_eq!(r.status, None);
        let err = r.error.unwrap();
        assert!(
            err.ends_with("blocked: localhost resolves only to loopback addresses"),
            "{err}"
        );
        assert_eq!(
            count.load(Ordering::SeqCst),
            0,
            "nothing reached the server"
        );
    }

    #[tokio::test]
    async fn allowed_loopback_is_delivered_by_literal_and_by_name() {
        let (port, count) = counting_server().await;
        let open = client(&["127.0.0.1/32"]);
        for url in [
            format!("http://127.0.0.1:{port}/hook"),
            format!("http://localhost:{port}/hook"),
        ] {
            let r = open.post(&url, &[], Bytes::new()).await;
            assert_eq!(r.status, Some(204), "{url}: {:?}", r.error);
        }
        assert_eq!(count.load(Ordering::SeqCst), 2);
    }

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
            std::slice::from_ref(&key),
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

    #[test]
    fn several_keys_sign_side_by_side_and_each_verifies() {
        let new = SigningKey::generate_secret();
        let old = SigningKey::generate_secret();
        let keys = [
            SigningKey::from_secret(&new).unwrap(),
            SigningKey::from_secret(&old).unwrap(),
        ];
        let h = signed_headers(&keys, "wh_1", 1000, b"{}");
        let sig = h
            .iter()
            .find(|(k, _)| *k == "webhook-signature")
            .unwrap()
            .1
            .clone();
        assert_eq!(sig.split(' ').count(), 2);
        assert!(sig.split(' ').all(|s| s.starts_with("v1,")));
        for secret in [&new, &old] {
            crate::signing::verify(secret, "wh_1", 1000, b"{}", &sig, 1000, 300).unwrap();
        }
        let stranger = SigningKey::generate_secret();
        assert!(crate::signing::verify(&stranger, "wh_1", 1000, b"{}", &sig, 1000, 300).is_err());
    }
}
