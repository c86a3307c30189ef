//! Presigning and HEAD without the SDK's orchestrator.
//!
//! Every call through aws-sdk-s3 runs its orchestrator: runtime plugins,
//! a merged config bag, interceptors, endpoint rules, identity and auth
//! scheme resolution, then SigV4. For the two calls on the hot path (the
//! presigned PUT of each Create and the HEAD of each verification) that
//! machinery cost more CPU than the signing and the request themselves
//! (profiles in `BENCHMARKS.md`). [`Signer`] signs the same requests with
//! `aws-sigv4` (the SDK's own signer) and sends the HEAD with a plain
//! HTTP client.
//!
//! The SDK stays the reference. A connection uses the [`Signer`] only after
//! `Storage::check_signer` has found that, for a probe key and a fixed
//! time, it writes exactly the URL and headers the SDK's presigning
//! writes, for a HEAD and for PUTs with and without a length: same
//! endpoint (virtual host or path style, as the SDK's endpoint rules
//! chose), same key encoding, same credential scope and signature. A
//! connection where they differ (an endpoint shape this module does not
//! know) keeps using the SDK, with a log line.
//!
//! A HEAD is signed in its headers (`authorization`, `x-amz-date`,
//! `x-amz-content-sha256` of the empty body), as the SDK sends it, so that
//! bucket policies on the kind of authentication see no change. That form
//! is not compared with the SDK at run time (the check compares presigned
//! forms, which share the endpoint, the encoding and the signer but not
//! the signed headers); the tests send it to a real SigV4 verifier (the
//! embedded S3 server). Like the SDK's default client, the HEAD's client
//! follows `HTTPS_PROXY` / `NO_PROXY`, follows no redirect, and tries
//! [`HEAD_TRIES`] times on a connection error or a 5xx. Errors never
//! carry a URL (a presigned URL's query is a credential).

use std::time::{Duration, SystemTime};

use aws_credential_types::Credentials;
use aws_sigv4::{
    http_request::{
        PayloadChecksumKind, PercentEncodingMode, SignableBody, SignableRequest, SignatureLocation,
        SigningSettings, UriPathNormalizationMode, sign,
    },
    sign::v4,
};
use aws_smithy_runtime_api::client::identity::Identity;
use chrono::{DateTime, Utc};
use percent_encoding::utf8_percent_encode;

use super::{KEY_ENCODE, ObjectInfo, normalize_etag};

/// Tries of one HEAD (the SDK's standard retry makes three attempts too).
pub(super) const HEAD_TRIES: u32 = 3;

/// The key `Storage::check_signer` signs: characters that S3 encodes and that
/// it leaves alone, and a `/`.
pub(super) const PROBE_KEY: &str = "uploadhook-probe/a b+c~d_e.f%g(h)&=é";

/// A signed request: the URL and the headers the sender must send
/// (lower-case names, sorted, `host` left out).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Signed {
    pub url: String,
    pub headers: Vec<(String, String)>,
}

/// The headers a presigned PUT signs: the content type, and the length
/// when it is known. Used by the uploads and by the check against the SDK,
/// so that the check covers what uploads sign.
pub(super) fn put_headers<'a>(
    content_type: &'a str,
    length: Option<&'a str>,
) -> Vec<(&'static str, &'a str)> {
    let mut headers = vec![("content-type", content_type)];
    if let Some(length) = length {
        headers.push(("content-length", length));
    }
    headers
}

pub(super) struct Signer {
    identity: Identity,
    region: String,
    /// `scheme://authority[/path]`: an object's URL is this, `/` and its
    /// encoded key.
    object_base: String,
    http: reqwest::Client,
}

impl Signer {
    pub fn new(
        credentials: Credentials,
        region: &str,
        object_base: &str,
    ) -> Result<Signer, reqwest::Error> {
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(10))
            .build()?;
        Ok(Signer {
            identity: credentials.into(),
            region: region.to_string(),
            object_base: object_base.trim_end_matches('/').to_string(),
            http,
        })
    }

    /// Signs `method` on `key`, with `headers` signed (they must be sent as
    /// they are): presigned in the query string, valid for `expires_in`,
    /// or with `None` in headers, for a request without a body sent now.
    /// `x_id` is the operation name that the SDK adds to some requests
    /// (`PutObject`, not `HeadObject`).
    pub fn sign(
        &self,
        method: &str,
        key: &str,
        x_id: Option<&str>,
        headers: &[(&str, &str)],
        expires_in: Option<Duration>,
        at: SystemTime,
    ) -> Result<Signed, String> {
        let mut url = format!(
            "{}/{}",
            self.object_base,
            utf8_percent_encode(key, KEY_ENCODE)
        );
        let mut separator = '?';
        if let Some(x_id) = x_id {
            url.push_str("?x-id=");
            url.push_str(x_id);
            separator = '&';
        }
        let mut settings = SigningSettings::default();
        let body = match expires_in {
            Some(expires_in) => {
                settings.signature_location = SignatureLocation::QueryParams;
                settings.expires_in = Some(expires_in);
                SignableBody::UnsignedPayload
            }
            None => {
                settings.signature_location = SignatureLocation::Headers;
                settings.payload_checksum_kind = PayloadChecksumKind::XAmzSha256;
                SignableBody::Bytes(&[])
            }
        };
        // S3: the path is signed as it is sent, encoded once, never
        // normalised (a key may contain `//` or `..`).
        settings.percent_encoding_mode = PercentEncodingMode::Single;
        settings.uri_path_normalization_mode = UriPathNormalizationMode::Disabled;
        let params = v4::SigningParams::builder()
            .identity(&self.identity)
            .region(&self.region)
            .name("s3")
            .time(at)
            .settings(settings)
            .build()
            .map_err(|e| e.to_string())?
            .into();
        let signable = SignableRequest::new(method, url.as_str(), headers.iter().copied(), body)
            .map_err(|e| e.to_string())?;
        let (instructions, _) = sign(signable, &params)
            .map_err(|e| e.to_string())?
            .into_parts();
        for (name, value) in instructions.params() {
            url.push(separator);
            separator = '&';
            url.push_str(name);
            url.push('=');
            url.extend(percent_encoding::utf8_percent_encode(value, QUERY_ENCODE));
        }
        let mut headers: Vec<(String, String)> = headers
            .iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v.to_string()))
            .chain(
                instructions
                    .headers()
                    .map(|(k, v)| (k.to_ascii_lowercase(), v.to_string())),
            )
            .filter(|(k, _)| k != "host")
            .collect();
        headers.sort();
        Ok(Signed { url, headers })
    }

    /// HEADs `key`: `Ok(None)` when the storage answers 404. A connection
    /// error or a 5xx is tried again, [`HEAD_TRIES`] times in all.
    pub async fn head(&self, key: &str) -> Result<Option<ObjectInfo>, HeadError> {
        let mut tries = 0;
        let resp = loop {
            tries += 1;
            // Signed again for each try: the signature carries the time.
            let signed = self
                .sign("HEAD", key, None, &[], None, SystemTime::now())
                .map_err(HeadError::Sign)?;
            let mut request = self.http.head(&signed.url);
            for (name, value) in &signed.headers {
                request = request.header(name, value);
            }
            let again = match request.send().await {
                Ok(resp) if resp.status().is_server_error() && tries < HEAD_TRIES => {
                    HeadError::Status(resp.status().as_u16())
                }
                Ok(resp) => break resp,
                Err(e) if tries < HEAD_TRIES && (e.is_connect() || e.is_request()) => {
                    HeadError::Http(e.without_url())
                }
                Err(e) => return Err(HeadError::Http(e.without_url())),
            };
            tracing::debug!(key, tries, error = %again, "HEAD failed; trying again");
            tokio::time::sleep(Duration::from_millis(50 * tries as u64)).await;
        };
        match resp.status().as_u16() {
            200..=299 => {}
            404 => return Ok(None),
            status => return Err(HeadError::Status(status)),
        }
        let header = |name: &str| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        // Not `content_length()`: a HEAD response has no body. Absent is 0,
        // as the SDK reads it; present and not a number is an error.
        let size = match header("content-length") {
            None => 0,
            Some(v) => v
                .trim()
                .parse()
                .map_err(|_| HeadError::BadHeader("content-length"))?,
        };
        Ok(Some(ObjectInfo {
            size,
            etag: normalize_etag(&header("etag").unwrap_or_default()),
            content_type: header("content-type"),
            last_modified: header("last-modified").and_then(|v| {
                DateTime::parse_from_rfc2822(&v)
                    .ok()
                    .map(|t| t.with_timezone(&Utc))
            }),
        }))
    }
}

/// Query values as `aws-sigv4` encodes them for the canonical request:
/// everything but RFC 3986 unreserved characters.
const QUERY_ENCODE: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Why a HEAD sent by [`Signer::head`] failed. Never holds the URL.
#[derive(Debug, thiserror::Error)]
pub(super) enum HeadError {
    #[error("the request could not be signed: {0}")]
    Sign(String),
    #[error("{0}")]
    Http(reqwest::Error),
    #[error("the service answered {0}")]
    Status(u16),
    #[error("the service answered with an invalid `{0}` header")]
    BadHeader(&'static str),
}
