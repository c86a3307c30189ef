//! Object storage: the named S3-compatible connections (`[storage.<name>]`,
//! plus `embedded` when the embedded server runs), presigned uploads, and
//! the HEAD that proves an object has landed.
//!
//! # Why there is no `aws-config`
//!
//! `aws-config` brings the whole AWS credential chain (profiles, SSO, IMDS,
//! ECS, web identity) and the crates behind it, for a service whose
//! connections are configured explicitly and often are not AWS at all (R2,
//! MinIO, the embedded server). The clients are therefore built from
//! `aws_sdk_s3::Config::builder()` directly. Credentials come from the
//! connection's `access_key_id` / `secret_access_key`, or, when those are not
//! set, from `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` /
//! `AWS_SESSION_TOKEN` read once at start-up. They are static: a temporary
//! session token from the environment is not refreshed, so use long-lived
//! keys (or restart before the token expires).
//!
//! # Presigned uploads
//!
//! A presigned PUT signs `content-type` (and `content-length` when it is
//! known), so the uploader must send exactly those headers with exactly
//! those values: [`PresignedUpload::headers`] lists them. A presigned PUT
//! must carry no `x-amz-checksum-*` or `x-amz-sdk-checksum-algorithm`: the
//! uploader (a browser, say) cannot compute a checksum of a body the server
//! never saw. aws-sdk-s3 1.x skips request checksums on presigned requests
//! already; request checksums are also set to "when required" so that a
//! change of that default cannot add them. A test holds this.
//!
//! Each connection has one SDK client, built once at start-up and shared by
//! every request (the client is a cheap handle over one connection pool).
//! Connections do not share one HTTP client: that would need the
//! `aws-smithy-http-client` crate as a direct dependency, and connections to
//! different endpoints share no pooled sockets anyway.

pub mod embedded;
mod sigv4;

use std::{
    collections::BTreeMap,
    fmt,
    sync::Arc,
    time::{Duration, SystemTime},
};

use aws_sdk_s3::{
    config::{
        BehaviorVersion, Region, RequestChecksumCalculation, ResponseChecksumValidation,
        http::HttpResponse,
    },
    error::{ProvideErrorMetadata, SdkError},
    presigning::PresigningConfig,
};
use chrono::{DateTime, Utc};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use secrecy::ExposeSecret;

use crate::config::{Config, StorageConfig, StorageKind};

pub use embedded::EmbeddedS3;

/// The name under which the embedded server is registered.
pub const EMBEDDED_NAME: &str = "embedded";

/// The request field that names a storage connection.
pub const STORAGE_FIELD: &str = "storage";

/// Lifetime of presigned URLs on the embedded connection (the same as the
/// default of `storage.<name>.presign_expiry`).
const EMBEDDED_PRESIGN_EXPIRY: Duration = Duration::from_secs(3600);

/// S3 accepts presigned URLs valid for at most seven days.
const MAX_PRESIGN_EXPIRY: Duration = Duration::from_secs(7 * 24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("config key `{key}`: {message}")]
    Config { key: String, message: String },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("embedded s3 server: {message}")]
    EmbeddedStart { message: String },
    #[error("embedded s3 server task failed: {0}")]
    EmbeddedTask(String),
    #[error("{0}")]
    InvalidInput(String),
    /// A call to the storage service failed. The message says what kind of
    /// failure it was; the source has the SDK's details. Neither holds a
    /// credential or a presigned URL.
    #[error("storage `{storage}`: {operation} `{key}`: {message}")]
    Service {
        storage: String,
        operation: &'static str,
        key: String,
        message: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// A client named no storage connection, or an unknown one. The message
/// names the field, so it is a client error (`INVALID_ARGUMENT`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    #[error("storage: is required when more than one storage connection is configured (one of: {})", .names.join(", "))]
    Required { names: Vec<String> },
    #[error("storage: unknown storage connection {name:?} (configured: {})", .names.join(", "))]
    Unknown { name: String, names: Vec<String> },
}

impl ResolveError {
    /// The message without the field name.
    pub fn message(&self) -> String {
        let full = self.to_string();
        full.strip_prefix("storage: ").unwrap_or(&full).to_string()
    }
}

impl From<ResolveError> for crate::error::ApiError {
    fn from(e: ResolveError) -> Self {
        crate::error::ApiError::invalid(STORAGE_FIELD, e.message())
    }
}

/// What the uploader needs to PUT the object.
#[derive(Clone, PartialEq, Eq)]
pub struct PresignedUpload {
    pub url: String,
    pub method: String,
    /// Exactly the headers the uploader must send, with lower-case names
    /// (`host` excluded: the HTTP client sets it from the URL).
    pub headers: BTreeMap<String, String>,
    pub expires_at: DateTime<Utc>,
}

impl fmt::Debug for PresignedUpload {
    /// The query string is a bearer credential until `expires_at`: it is
    /// left out.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let base = self.url.split('?').next().unwrap_or_default();
        f.debug_struct("PresignedUpload")
            .field("url", &format_args!("{base}?…"))
            .field("method", &self.method)
            .field("headers", &self.headers)
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

/// What a HEAD says about a stored object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    pub size: i64,
    /// Without quotes or `W/` (see [`normalize_etag`]).
    pub etag: String,
    pub content_type: Option<String>,
    pub last_modified: Option<DateTime<Utc>>,
}

/// One storage connection.
pub struct Storage {
    name: String,
    kind: StorageKind,
    bucket: String,
    region: String,
    endpoint: Option<String>,
    path_style: bool,
    presign_expiry: Duration,
    /// `object_url(key)` is this plus `/` plus the encoded key.
    url_base: String,
    client: aws_sdk_s3::Client,
    /// What `signer` is built from, on first use.
    credentials: aws_credential_types::Credentials,
    /// `url_base` without `public_base_url`: where the S3 API has the
    /// objects.
    object_base: String,
    /// Presigns and HEADs without the SDK's orchestrator, once it has been
    /// found to sign exactly as the SDK does (`None`: it did not, the SDK
    /// is used). See `sigv4`.
    signer: tokio::sync::OnceCell<Option<sigv4::Signer>>,
    /// HEAD requests sent so far (operators' figures, and tests of the
    /// HEAD budget).
    heads: std::sync::atomic::AtomicU64,
}

impl fmt::Debug for Storage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Storage")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("bucket", &self.bucket)
            .field("region", &self.region)
            .field("endpoint", &self.endpoint)
            .field("path_style", &self.path_style)
            .field("presign_expiry", &self.presign_expiry)
            .field("url_base", &self.url_base)
            .finish_non_exhaustive()
    }
}

/// Credentials as they were found, before they become SDK credentials.
#[derive(PartialEq, Eq)]
struct Keys {
    access_key_id: String,
    secret_access_key: String,
    session_token: Option<String>,
    source: &'static str,
}

impl fmt::Debug for Keys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keys")
            .field("access_key_id", &self.access_key_id)
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

/// The connection's own keys, else the standard AWS environment variables.
/// `env` is passed in so that the choice is testable.
fn find_keys(
    name: &str,
    sc: &StorageConfig,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Keys, StorageError> {
    if let (Some(id), Some(secret)) = (&sc.access_key_id, &sc.secret_access_key) {
        return Ok(Keys {
            access_key_id: id.clone(),
            secret_access_key: secret.expose_secret().to_string(),
            session_token: None,
            source: "uploadhook-config",
        });
    }
    let var = |k: &str| env(k).filter(|v| !v.is_empty());
    match (var("AWS_ACCESS_KEY_ID"), var("AWS_SECRET_ACCESS_KEY")) {
        (Some(id), Some(secret)) => Ok(Keys {
            access_key_id: id,
            secret_access_key: secret,
            session_token: var("AWS_SESSION_TOKEN"),
            source: "uploadhook-env",
        }),
        _ => Err(StorageError::Config {
            key: format!("storage.{name}.access_key_id"),
            message: format!(
                "no credentials: set storage.{name}.access_key_id and \
                 storage.{name}.secret_access_key, or AWS_ACCESS_KEY_ID and \
                 AWS_SECRET_ACCESS_KEY"
            ),
        }),
    }
}

/// The region the client signs for. R2 signs for `auto`; it also accepts
/// `us-east-1`, which is the config default, so that default becomes
/// `auto` for R2.
fn effective_region(kind: StorageKind, region: &str) -> String {
    match kind {
        StorageKind::R2 if region.is_empty() || region == "us-east-1" => "auto".into(),
        _ if region.is_empty() => "us-east-1".into(),
        _ => region.to_string(),
    }
}

/// Characters of a key that stay as they are in a URL: RFC 3986 unreserved
/// characters and `/`, as S3 itself encodes them.
const KEY_ENCODE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~')
    .remove(b'/');

/// Where objects of a connection can be read, without the key: the public
/// base URL when set, else the bucket's URL at the endpoint.
fn url_base(
    kind: StorageKind,
    bucket: &str,
    region: &str,
    endpoint: Option<&str>,
    path_style: bool,
    public_base_url: Option<&str>,
) -> String {
    if let Some(base) = public_base_url.filter(|b| !b.is_empty()) {
        return base.trim_end_matches('/').to_string();
    }
    match endpoint.filter(|e| !e.is_empty()) {
        Some(endpoint) => {
            let endpoint = endpoint.trim_end_matches('/');
            if path_style {
                return format!("{endpoint}/{bucket}");
            }
            match endpoint.parse::<http::Uri>() {
                Ok(uri) if uri.authority().is_some() => {
                    let scheme = uri.scheme_str().unwrap_or("https");
                    let authority = uri.authority().map(|a| a.as_str()).unwrap_or_default();
                    let path = uri.path().trim_end_matches('/');
                    format!("{scheme}://{bucket}.{authority}{path}")
                }
                _ => format!("{endpoint}/{bucket}"),
            }
        }
        None if kind == StorageKind::S3 && !path_style => {
            format!("https://{bucket}.s3.{region}.amazonaws.com")
        }
        None => format!("https://s3.{region}.amazonaws.com/{bucket}"),
    }
}

/// An ETag as a plain opaque string: no surrounding quotes, no weak `W/`
/// prefix. A multipart ETag (`<hex>-<parts>`) is not an MD5 of the object
/// and stays as it is.
pub fn normalize_etag(s: &str) -> String {
    let s = s.trim();
    let s = s.strip_prefix("W/").unwrap_or(s);
    let s = s.strip_prefix('"').unwrap_or(s);
    let s = s.strip_suffix('"').unwrap_or(s);
    s.to_string()
}

/// A short, secret-free description of an SDK failure; the error itself
/// goes along as the source. A HEAD response has no body, so often the
/// status is all there is.
fn describe<E: ProvideErrorMetadata>(err: &SdkError<E, HttpResponse>) -> String {
    match err {
        SdkError::ConstructionFailure(_) => "the request could not be built".into(),
        SdkError::TimeoutError(_) => "timed out".into(),
        SdkError::DispatchFailure(_) => "could not reach the storage endpoint".into(),
        SdkError::ResponseError(_) => "the response could not be read".into(),
        SdkError::ServiceError(e) => {
            let status = e.raw().status().as_u16();
            let meta = e.err();
            match (meta.code(), meta.message()) {
                (Some(code), Some(msg)) => format!("the service answered {status} {code}: {msg}"),
                (Some(code), None) => format!("the service answered {status} {code}"),
                _ => format!("the service answered {status}"),
            }
        }
        _ => "unexpected error".into(),
    }
}

fn to_chrono(t: &aws_sdk_s3::primitives::DateTime) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp(t.secs(), t.subsec_nanos())
}

impl Storage {
    fn new(
        name: &str,
        sc: &StorageConfig,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, StorageError> {
        let keys = find_keys(name, sc, env)?;
        let region = effective_region(sc.kind, &sc.region);
        let endpoint = sc.endpoint.clone().filter(|e| !e.is_empty());
        let credentials = aws_credential_types::Credentials::new(
            keys.access_key_id,
            keys.secret_access_key,
            keys.session_token,
            None,
            keys.source,
        );
        let mut builder = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(region.clone()))
            .credentials_provider(credentials.clone())
            .force_path_style(sc.path_style)
            // No checksum headers or query parameters the uploader would
            // have to compute; S3-compatible servers vary in support too.
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired);
        if let Some(endpoint) = &endpoint {
            builder = builder.endpoint_url(endpoint.clone());
        }
        let client = aws_sdk_s3::Client::from_conf(builder.build());
        let object_base = url_base(
            sc.kind,
            &sc.bucket,
            &region,
            endpoint.as_deref(),
            sc.path_style,
            None,
        );
        let url_base = url_base(
            sc.kind,
            &sc.bucket,
            &region,
            endpoint.as_deref(),
            sc.path_style,
            sc.public_base_url.as_deref(),
        );
        Ok(Storage {
            name: name.to_string(),
            kind: sc.kind,
            bucket: sc.bucket.clone(),
            region,
            endpoint,
            path_style: sc.path_style,
            presign_expiry: sc.presign_expiry,
            url_base,
            client,
            credentials,
            object_base,
            signer: Default::default(),
            heads: Default::default(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn kind(&self) -> StorageKind {
        self.kind
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    pub fn region(&self) -> &str {
        &self.region
    }

    pub fn endpoint(&self) -> Option<&str> {
        self.endpoint.as_deref()
    }

    /// The configured lifetime of presigned upload URLs.
    pub fn presign_expiry(&self) -> Duration {
        self.presign_expiry
    }

    pub fn client(&self) -> &aws_sdk_s3::Client {
        &self.client
    }

    /// Presigns a PUT of `key`. The uploader must send `content-type:
    /// <content_type>` (and `content-length` when given): both are signed.
    pub async fn presign_put(
        &self,
        key: &str,
        content_type: &str,
        content_length: Option<i64>,
        expires_in: Duration,
    ) -> Result<PresignedUpload, StorageError> {
        if content_type.is_empty() {
            return Err(StorageError::InvalidInput(
                "content type must not be empty: it is a signed header".into(),
            ));
        }
        if content_length.is_some_and(|n| n < 0) {
            return Err(StorageError::InvalidInput(
                "content length must not be negative".into(),
            ));
        }
        if expires_in.is_zero() || expires_in > MAX_PRESIGN_EXPIRY {
            return Err(StorageError::InvalidInput(
                "presigned URL lifetime must be between 1 s and 7 days".into(),
            ));
        }
        // Sign from an explicit start so that `expires_at` is exact.
        let start = SystemTime::now();
        let expires_at = DateTime::<Utc>::from(start + expires_in);
        if let Some(signer) = self.signer().await {
            let length = content_length.map(|n| n.to_string());
            let headers = sigv4::put_headers(content_type, length.as_deref());
            let p = signer
                .sign(
                    "PUT",
                    key,
                    Some("PutObject"),
                    &headers,
                    Some(expires_in),
                    start,
                )
                .map_err(|message| StorageError::Service {
                    storage: self.name.clone(),
                    operation: "presign put",
                    key: key.to_string(),
                    source: message.clone().into(),
                    message,
                })?;
            return Ok(PresignedUpload {
                url: p.url,
                method: "PUT".into(),
                headers: p.headers.into_iter().collect(),
                expires_at,
            });
        }
        let presigning = PresigningConfig::builder()
            .start_time(start)
            .expires_in(expires_in)
            .build()
            .map_err(|e| StorageError::InvalidInput(e.to_string()))?;
        let request = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .content_type(content_type)
            .set_content_length(content_length)
            .presigned(presigning)
            .await
            .map_err(|e| StorageError::Service {
                storage: self.name.clone(),
                operation: "presign put",
                key: key.to_string(),
                message: describe(&e),
                source: Box::new(e),
            })?;
        let headers = request
            .headers()
            .map(|(k, v)| (k.to_ascii_lowercase(), v.to_string()))
            .filter(|(k, _)| k != "host")
            .collect();
        Ok(PresignedUpload {
            url: request.uri().to_string(),
            method: request.method().to_string(),
            headers,
            expires_at,
        })
    }

    /// The SDK-free signer, if it signs as the SDK does for this
    /// connection (checked once, on first use).
    async fn signer(&self) -> Option<&sigv4::Signer> {
        self.signer
            .get_or_init(|| async {
                match self.check_signer().await {
                    Ok(signer) => Some(signer),
                    Err(why) => {
                        tracing::info!(
                            storage = %self.name,
                            %why,
                            "presigning and HEAD go through the AWS SDK for this connection"
                        );
                        None
                    }
                }
            })
            .await
            .as_ref()
    }

    /// Builds the SDK-free signer and compares what it writes with what
    /// the SDK's presigning writes, for the probe key at one fixed time: a
    /// HEAD, and PUTs with and without a length. Any difference (endpoint,
    /// key encoding, headers, signature) is a refusal.
    async fn check_signer(&self) -> Result<sigv4::Signer, String> {
        let signer = sigv4::Signer::new(self.credentials.clone(), &self.region, &self.object_base)
            .map_err(|e| e.to_string())?;
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_767_225_600);
        let expiry = Duration::from_secs(900);
        let config = || {
            PresigningConfig::builder()
                .start_time(at)
                .expires_in(expiry)
                .build()
                .map_err(|e| e.to_string())
        };
        let sdk = |r: aws_sdk_s3::presigning::PresignedRequest| {
            let mut headers: Vec<(String, String)> = r
                .headers()
                .map(|(k, v)| (k.to_ascii_lowercase(), v.to_string()))
                .filter(|(k, _)| k != "host")
                .collect();
            headers.sort();
            sigv4::Signed {
                url: r.uri().to_string(),
                headers,
            }
        };
        let key = sigv4::PROBE_KEY;
        let head = self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(key)
            .presigned(config()?)
            .await
            .map_err(|e| describe(&e))?;
        let ours = signer.sign("HEAD", key, None, &[], Some(expiry), at)?;
        if ours != sdk(head) {
            return Err("its presigned HEAD differs from the SDK's".into());
        }
        for length in [Some(42), None] {
            let put = self
                .client
                .put_object()
                .bucket(&self.bucket)
                .key(key)
                .content_type("text/plain")
                .set_content_length(length)
                .presigned(config()?)
                .await
                .map_err(|e| describe(&e))?;
            let length = length.map(|n| n.to_string());
            let headers = sigv4::put_headers("text/plain", length.as_deref());
            let ours = signer.sign("PUT", key, Some("PutObject"), &headers, Some(expiry), at)?;
            if ours != sdk(put) {
                return Err("its presigned PUT differs from the SDK's".into());
            }
        }
        Ok(signer)
    }

    /// HEAD requests this connection has sent since start.
    pub fn heads_sent(&self) -> u64 {
        self.heads.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// HEADs `key`: `None` when there is no such object.
    pub async fn head(&self, key: &str) -> Result<Option<ObjectInfo>, StorageError> {
        self.heads
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Some(signer) = self.signer().await {
            return signer.head(key).await.map_err(|e| StorageError::Service {
                storage: self.name.clone(),
                operation: "head",
                key: key.to_string(),
                message: e.to_string(),
                source: Box::new(e),
            });
        }
        let out = match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
        {
            Ok(out) => out,
            Err(e) if e.as_service_error().is_some_and(|s| s.is_not_found()) => return Ok(None),
            Err(e) => {
                return Err(StorageError::Service {
                    storage: self.name.clone(),
                    operation: "head",
                    key: key.to_string(),
                    message: describe(&e),
                    source: Box::new(e),
                });
            }
        };
        Ok(Some(ObjectInfo {
            size: out.content_length().unwrap_or(0),
            etag: normalize_etag(out.e_tag().unwrap_or_default()),
            content_type: out.content_type().map(str::to_string),
            last_modified: out.last_modified().and_then(to_chrono),
        }))
    }

    /// The URL where the object can be read: `public_base_url/key` when
    /// configured, else the object's URL at the storage endpoint (which
    /// needs credentials unless the bucket is public).
    pub fn object_url(&self, key: &str) -> String {
        format!("{}/{}", self.url_base, utf8_percent_encode(key, KEY_ENCODE))
    }
}

/// The storage connections, by name; never empty.
#[derive(Debug, Clone)]
pub struct Storages {
    by_name: BTreeMap<String, Arc<Storage>>,
}

impl Storages {
    /// Builds a client per configured connection, plus `embedded` when
    /// `embedded_endpoint` is given (the embedded server is running there).
    /// Credentials missing from the config are read from the environment.
    pub fn from_config(
        cfg: &Config,
        embedded_endpoint: Option<&str>,
    ) -> Result<Storages, StorageError> {
        Self::from_config_with_env(cfg, embedded_endpoint, &|k| std::env::var(k).ok())
    }

    /// [`Storages::from_config`] with the environment passed in.
    pub fn from_config_with_env(
        cfg: &Config,
        embedded_endpoint: Option<&str>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Storages, StorageError> {
        let mut by_name = BTreeMap::new();
        for (name, sc) in &cfg.storage {
            by_name.insert(name.clone(), Arc::new(Storage::new(name, sc, env)?));
        }
        match embedded_endpoint {
            Some(endpoint) => {
                if by_name.contains_key(EMBEDDED_NAME) {
                    return Err(StorageError::Config {
                        key: format!("storage.{EMBEDDED_NAME}"),
                        message: "the name is taken by the embedded server".into(),
                    });
                }
                let e = &cfg.embedded_s3;
                let sc = StorageConfig {
                    kind: StorageKind::S3Compatible,
                    bucket: e.bucket.clone(),
                    region: "us-east-1".into(),
                    endpoint: Some(endpoint.to_string()),
                    path_style: true,
                    access_key_id: Some(e.access_key.clone()),
                    secret_access_key: Some(e.secret_key.clone()),
                    public_base_url: None,
                    presign_expiry: EMBEDDED_PRESIGN_EXPIRY,
                };
                let storage = Storage::new(EMBEDDED_NAME, &sc, env)?;
                by_name.insert(EMBEDDED_NAME.to_string(), Arc::new(storage));
            }
            None if cfg.embedded_s3_enabled() => {
                return Err(StorageError::Config {
                    key: "embedded_s3.mode".into(),
                    message: "the embedded server is enabled but was not started".into(),
                });
            }
            None => {}
        }
        if by_name.is_empty() {
            return Err(StorageError::Config {
                key: "storage".into(),
                message: "no storage connection: configure [storage.<name>] or set \
                          embedded_s3.mode = \"on\""
                    .into(),
            });
        }
        Ok(Storages { by_name })
    }

    /// The connection a request names; an empty name means the only one.
    pub fn resolve(&self, name: &str) -> Result<Arc<Storage>, ResolveError> {
        if name.is_empty() {
            if self.by_name.len() == 1
                && let Some(only) = self.by_name.values().next()
            {
                return Ok(only.clone());
            }
            return Err(ResolveError::Required {
                names: self.by_name.keys().cloned().collect(),
            });
        }
        self.by_name
            .get(name)
            .cloned()
            .ok_or_else(|| ResolveError::Unknown {
                name: name.to_string(),
                names: self.by_name.keys().cloned().collect(),
            })
    }

    /// The names of the connections, sorted.
    pub fn names(&self) -> Vec<&str> {
        self.by_name.keys().map(String::as_str).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::SecretString;

    fn storage_config(kind: StorageKind, endpoint: Option<&str>) -> StorageConfig {
        StorageConfig {
            kind,
            bucket: "b".into(),
            region: "us-east-1".into(),
            endpoint: endpoint.map(str::to_string),
            path_style: false,
            access_key_id: Some("id".into()),
            secret_access_key: Some(SecretString::from("secret")),
            public_base_url: None,
            presign_expiry: Duration::from_secs(60),
        }
    }

    fn no_env(_: &str) -> Option<String> {
        None
    }

    /// The signer is used only where it writes what the SDK writes; these
    /// are the endpoint shapes it must agree on (no request is sent).
    #[tokio::test]
    async fn the_signer_agrees_with_the_sdk_for_every_endpoint_shape() {
        let shapes: Vec<(&str, StorageConfig)> = vec![
            ("s3, virtual host", storage_config(StorageKind::S3, None)),
            (
                "s3 in eu-west-1, path style",
                StorageConfig {
                    region: "eu-west-1".into(),
                    path_style: true,
                    ..storage_config(StorageKind::S3, None)
                },
            ),
            (
                "r2",
                StorageConfig {
                    region: String::new(),
                    ..storage_config(
                        StorageKind::R2,
                        Some("https://0123456789abcdef.r2.cloudflarestorage.com"),
                    )
                },
            ),
            (
                "minio, path style",
                StorageConfig {
                    path_style: true,
                    ..storage_config(StorageKind::S3Compatible, Some("http://127.0.0.1:9000"))
                },
            ),
            (
                "s3-compatible, virtual host",
                storage_config(
                    StorageKind::S3Compatible,
                    Some("https://objects.example.com"),
                ),
            ),
            (
                "s3-compatible with a port and a path, path style",
                StorageConfig {
                    path_style: true,
                    ..storage_config(
                        StorageKind::S3Compatible,
                        Some("https://example.com:8443/s3/"),
                    )
                },
            ),
        ];
        for (what, sc) in shapes {
            let sc = StorageConfig {
                bucket: "my-uploads".into(),
                ..sc
            };
            let storage = Storage::new("s", &sc, &no_env).unwrap();
            if let Err(e) = storage.check_signer().await {
                panic!("{what}: {e}");
            }
        }
        // Temporary credentials: the session token is signed as the SDK
        // signs it.
        let env = |k: &str| match k {
            "AWS_ACCESS_KEY_ID" => Some("AKIDEXAMPLE".to_string()),
            "AWS_SECRET_ACCESS_KEY" => Some("secret".to_string()),
            "AWS_SESSION_TOKEN" => Some("token/with+odd=chars".to_string()),
            _ => None,
        };
        let sc = StorageConfig {
            bucket: "my-uploads".into(),
            access_key_id: None,
            secret_access_key: None,
            ..storage_config(StorageKind::S3, None)
        };
        let storage = Storage::new("s", &sc, &env).unwrap();
        if let Err(e) = storage.check_signer().await {
            panic!("session token: {e}");
        }

        // A bucket name too short for a host name: the SDK falls back to
        // path style where the signer would not. The difference is caught,
        // and the SDK keeps signing for that connection.
        let storage = Storage::new("s", &storage_config(StorageKind::S3, None), &no_env).unwrap();
        let err = storage.check_signer().await.err().unwrap();
        assert!(err.contains("differs from the SDK"), "{err}");
    }

    #[test]
    fn etags_are_normalized() {
        assert_eq!(normalize_etag("\"abc123\""), "abc123");
        assert_eq!(normalize_etag("W/\"abc123\""), "abc123");
        assert_eq!(normalize_etag("abc123"), "abc123");
        assert_eq!(normalize_etag(" \"abc\" "), "abc");
        assert_eq!(normalize_etag("\"d41d8cd9-3\""), "d41d8cd9-3");
        assert_eq!(normalize_etag(""), "");
    }

    #[test]
    fn object_urls() {
        let enc =
            |base: &str, key: &str| format!("{base}/{}", utf8_percent_encode(key, KEY_ENCODE));
        let b = url_base(
            StorageKind::S3,
            "bk",
            "eu-west-1",
            None,
            false,
            Some("https://cdn.example.com/"),
        );
        assert_eq!(
            enc(&b, "a b/ü+x.txt"),
            "https://cdn.example.com/a%20b/%C3%BC%2Bx.txt"
        );
        let b = url_base(StorageKind::S3, "bk", "eu-west-1", None, false, None);
        assert_eq!(b, "https://bk.s3.eu-west-1.amazonaws.com");
        let b = url_base(StorageKind::S3, "bk", "eu-west-1", None, true, None);
        assert_eq!(b, "https://s3.eu-west-1.amazonaws.com/bk");
        let b = url_base(
            StorageKind::S3Compatible,
            "bk",
            "us-east-1",
            Some("http://127.0.0.1:9000/"),
            true,
            None,
        );
        assert_eq!(b, "http://127.0.0.1:9000/bk");
        let b = url_base(
            StorageKind::R2,
            "bk",
            "auto",
            Some("https://acct.r2.cloudflarestorage.com"),
            false,
            None,
        );
        assert_eq!(b, "https://bk.acct.r2.cloudflarestorage.com");
    }

    #[test]
    fn r2_signs_for_auto() {
        assert_eq!(effective_region(StorageKind::R2, "us-east-1"), "auto");
        assert_eq!(effective_region(StorageKind::R2, "auto"), "auto");
        assert_eq!(effective_region(StorageKind::R2, "wnam"), "wnam");
        assert_eq!(effective_region(StorageKind::S3, "us-east-1"), "us-east-1");
        assert_eq!(effective_region(StorageKind::S3, ""), "us-east-1");
    }

    #[test]
    fn keys_from_config_then_environment() {
        let sc = storage_config(StorageKind::S3, None);
        let keys = find_keys("main", &sc, &no_env).unwrap();
        assert_eq!(keys.access_key_id, "id");
        assert_eq!(keys.source, "uploadhook-config");

        let mut sc = sc;
        sc.access_key_id = None;
        sc.secret_access_key = None;
        let env = |k: &str| match k {
            "AWS_ACCESS_KEY_ID" => Some("envid".to_string()),
            "AWS_SECRET_ACCESS_KEY" => Some("envsecret".to_string()),
            "AWS_SESSION_TOKEN" => Some("tok".to_string()),
            _ => None,
        };
        let keys = find_keys("main", &sc, &env).unwrap();
        assert_eq!(keys.access_key_id, "envid");
        assert_eq!(keys.session_token.as_deref(), Some("tok"));
        assert_eq!(keys.source, "uploadhook-env");

        let err = find_keys("main", &sc, &no_env).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("storage.main.access_key_id"), "{msg}");
    }

    #[test]
    fn resolve_names_the_field() {
        let cfg = Config::from_toml(
            "[storage.alpha]\nkind = \"s3\"\nbucket = \"a\"\n\
             access_key_id = \"id\"\nsecret_access_key = \"s\"\n\
             [storage.beta]\nkind = \"s3-compatible\"\nbucket = \"b\"\n\
             endpoint = \"http://127.0.0.1:1\"\npath_style = true\n\
             access_key_id = \"id\"\nsecret_access_key = \"s\"\n",
        )
        .unwrap();
        let storages = Storages::from_config_with_env(&cfg, None, &no_env).unwrap();
        assert_eq!(storages.names(), vec!["alpha", "beta"]);
        assert_eq!(storages.resolve("beta").unwrap().bucket(), "b");

        let err = storages.resolve("").unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with("storage: "), "{msg}");
        assert!(
            msg.contains("required") && msg.contains("alpha, beta"),
            "{msg}"
        );

        let err = storages.resolve("gamma").unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with("storage: "), "{msg}");
        assert!(
            msg.contains("\"gamma\"") && msg.contains("alpha, beta"),
            "{msg}"
        );

        let api: crate::error::ApiError = err.into();
        assert_eq!(
            api,
            crate::error::ApiError::invalid(
                "storage",
                "unknown storage connection \"gamma\" (configured: alpha, beta)"
            )
        );
    }

    #[test]
    fn the_only_connection_is_the_default() {
        let cfg = Config::from_toml(
            "[storage.main]\nkind = \"s3\"\nbucket = \"a\"\n\
             access_key_id = \"id\"\nsecret_access_key = \"s\"\n",
        )
        .unwrap();
        let storages = Storages::from_config_with_env(&cfg, None, &no_env).unwrap();
        assert_eq!(storages.resolve("").unwrap().name(), "main");
    }

    #[test]
    fn embedded_must_be_started_when_enabled() {
        let cfg = Config::from_toml("").unwrap();
        assert!(cfg.embedded_s3_enabled());
        let err = Storages::from_config_with_env(&cfg, None, &no_env).unwrap_err();
        assert!(err.to_string().contains("embedded_s3.mode"), "{err}");
    }

    /// The whole path against the embedded server over real HTTP:
    /// presign, upload with exactly the returned headers, HEAD.
    mod against_embedded_server {
        use super::*;
        use tokio::net::TcpListener;

        struct Running {
            _dir: tempfile::TempDir,
            _stop: tokio::sync::oneshot::Sender<()>,
            storages: Storages,
        }

        async fn running() -> Running {
            let dir = tempfile::tempdir().unwrap();
            let mut cfg = Config::from_toml("").unwrap();
            cfg.embedded_s3.root = dir.path().to_path_buf();
            cfg.embedded_s3.bucket = "test-uploads".into();
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let server = embedded::start(&cfg.embedded_s3, listener, async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
            assert!(server.endpoint().starts_with("http://127.0.0.1:"));
            let storages =
                Storages::from_config_with_env(&cfg, Some(server.endpoint()), &no_env).unwrap();
            Running {
                _dir: dir,
                _stop: stop,
                storages,
            }
        }

        fn put(p: &PresignedUpload, body: &'static [u8]) -> reqwest::RequestBuilder {
            let mut req = reqwest::Client::new()
                .request(p.method.parse().unwrap(), &p.url)
                .body(body);
            for (k, v) in &p.headers {
                req = req.header(k, v);
            }
            req
        }

        #[tokio::test]
        async fn presigned_put_then_head() {
            let r = running().await;
            let storage = r.storages.resolve("").unwrap();
            assert_eq!(storage.name(), EMBEDDED_NAME);
            let body: &'static [u8] = b"hello, uploadhook";
            let p = storage
                .presign_put(
                    "dir/hello world.txt",
                    "text/plain",
                    Some(body.len() as i64),
                    Duration::from_secs(300),
                )
                .await
                .unwrap();

            assert_eq!(p.method, "PUT");
            let expected: BTreeMap<String, String> = [
                ("content-length".to_string(), body.len().to_string()),
                ("content-type".to_string(), "text/plain".to_string()),
            ]
            .into();
            assert_eq!(p.headers, expected);
            let query = p.url.split_once('?').unwrap().1.to_ascii_lowercase();
            assert!(
                query.contains("x-amz-signedheaders=content-length%3bcontent-type%3bhost"),
                "{query}"
            );
            assert!(!query.contains("checksum"), "{query}");
            let left = p.expires_at - Utc::now();
            assert!(
                left > chrono::Duration::seconds(290) && left <= chrono::Duration::seconds(300)
            );
            assert!(!format!("{p:?}").contains("x-amz-signature"));

            let resp = put(&p, body).send().await.unwrap();
            assert!(resp.status().is_success(), "{}", resp.status());

            let info = storage.head("dir/hello world.txt").await.unwrap().unwrap();
            assert_eq!(info.size, body.len() as i64);
            // MD5 of the body, as `printf 'hello, uploadhook' | md5sum` gives.
            assert_eq!(info.etag, "f5e41d9efcf18cdb5522bf5b01771697");
            assert_eq!(info.content_type.as_deref(), Some("text/plain"));
            assert!(info.last_modified.is_some());

            assert_eq!(
                storage.object_url("dir/hello world.txt"),
                format!(
                    "{}/test-uploads/dir/hello%20world.txt",
                    storage.endpoint().unwrap()
                )
            );
        }

        #[tokio::test]
        async fn the_embedded_connection_signs_without_the_sdk() {
            let r = running().await;
            let storage = r.storages.resolve("").unwrap();
            assert!(
                storage.signer().await.is_some(),
                "{:?}",
                storage.check_signer().await.err()
            );
        }

        /// A connection to the same server and bucket as `good`, with the
        /// embedded server's key id and `secret`.
        fn like(good: &Storage, secret: &str) -> StorageConfig {
            StorageConfig {
                kind: StorageKind::S3Compatible,
                bucket: good.bucket().to_string(),
                region: "us-east-1".into(),
                endpoint: good.endpoint().map(str::to_string),
                path_style: true,
                access_key_id: Some("uploadhook-dev".into()),
                secret_access_key: Some(SecretString::from(secret)),
                public_base_url: None,
                presign_expiry: Duration::from_secs(60),
            }
        }

        /// A storage that answers each connection's request with the next
        /// of `answers` (raw HTTP), then closes it.
        async fn scripted(answers: Vec<&'static str>) -> Storage {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let endpoint = format!("http://{}", listener.local_addr().unwrap());
            tokio::spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                for answer in answers {
                    let (mut conn, _) = listener.accept().await.unwrap();
                    let mut buf = vec![0; 8192];
                    let _ = conn.read(&mut buf).await;
                    let _ = conn.write_all(answer.as_bytes()).await;
                }
            });
            let sc = StorageConfig {
                path_style: true,
                ..storage_config(StorageKind::S3Compatible, Some(&endpoint))
            };
            let storage = Storage::new("scripted", &sc, &no_env).unwrap();
            assert!(storage.signer().await.is_some());
            storage
        }

        #[tokio::test]
        async fn a_head_is_tried_again_after_a_5xx() {
            let storage = scripted(vec![
                "HTTP/1.1 503 Slow Down\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                "HTTP/1.1 200 OK\r\ncontent-length: 7\r\netag: \"abc\"\r\ncontent-type: text/plain\r\nlast-modified: Sun, 06 Dec 2026 09:00:00 GMT\r\nconnection: close\r\n\r\n",
            ])
            .await;
            let info = storage.head("k").await.unwrap().unwrap();
            assert_eq!(info.size, 7);
            assert_eq!(info.etag, "abc");
            assert_eq!(info.content_type.as_deref(), Some("text/plain"));
            assert_eq!(
                info.last_modified,
                DateTime::parse_from_rfc3339("2026-12-06T09:00:00Z")
                    .ok()
                    .map(|t| t.with_timezone(&Utc))
            );
        }

        #[tokio::test]
        async fn a_head_gives_up_after_three_5xx_and_names_the_status() {
            let answer = "HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";
            let storage = scripted(vec![answer; 3]).await;
            let err = storage.head("k").await.unwrap_err();
            assert_eq!(
                err.to_string(),
                "storage `scripted`: head `k`: the service answered 500"
            );
        }

        #[tokio::test]
        async fn an_invalid_content_length_is_an_error_not_a_size() {
            let storage = scripted(vec![
                "HTTP/1.1 200 OK\r\ncontent-length: 7x\r\nconnection: close\r\n\r\n",
            ])
            .await;
            let err = storage.head("k").await.unwrap_err().to_string();
            assert!(err.contains("invalid `content-length`"), "{err}");
        }

        #[tokio::test]
        async fn a_signer_that_disagrees_with_the_sdk_is_not_used() {
            let r = running().await;
            let good = r.storages.resolve("").unwrap();
            let sc = like(&good, "uploadhook-dev-secret");
            let mut storage = Storage::new("odd", &sc, &no_env).unwrap();
            // An endpoint shape the signer gets wrong: the object base
            // without the bucket.
            storage.object_base = good.endpoint().unwrap().to_string();
            let err = storage.check_signer().await.err().unwrap();
            assert!(err.contains("differs from the SDK"), "{err}");
            assert!(storage.signer().await.is_none());
            // Everything still works, through the SDK.
            let p = storage
                .presign_put("via-sdk", "text/plain", Some(2), Duration::from_secs(60))
                .await
                .unwrap();
            let resp = put(&p, b"ok").send().await.unwrap();
            assert!(resp.status().is_success(), "{}", resp.status());
            let info = storage.head("via-sdk").await.unwrap().unwrap();
            assert_eq!(info.size, 2);
            assert_eq!(storage.head("absent").await.unwrap(), None);
        }

        #[tokio::test]
        async fn without_a_length_only_the_content_type_is_signed() {
            let r = running().await;
            let storage = r.storages.resolve("").unwrap();
            let p = storage
                .presign_put("any-size", "application/pdf", None, Duration::from_secs(60))
                .await
                .unwrap();
            let expected: BTreeMap<String, String> =
                [("content-type".to_string(), "application/pdf".to_string())].into();
            assert_eq!(p.headers, expected);
            let resp = put(&p, b"%PDF-1.7").send().await.unwrap();
            assert!(resp.status().is_success(), "{}", resp.status());
            let info = storage.head("any-size").await.unwrap().unwrap();
            assert_eq!(info.size, 8);
            assert_eq!(info.content_type.as_deref(), Some("application/pdf"));
        }

        #[tokio::test]
        async fn other_failures_are_errors_without_secrets() {
            let r = running().await;
            let good = r.storages.resolve("").unwrap();
            let sc = like(&good, "wrong-secret-value");
            let bad = Storage::new("bad", &sc, &no_env).unwrap();
            let err = bad.head("k").await.unwrap_err();
            let msg = err.to_string();
            assert_eq!(msg, "storage `bad`: head `k`: the service answered 403");
            assert!(!msg.contains("wrong-secret-value"), "{msg}");
            assert!(!format!("{err:?}").contains("wrong-secret-value"));
        }

        #[tokio::test]
        async fn head_of_a_missing_key_is_none() {
            let r = running().await;
            let storage = r.storages.resolve(EMBEDDED_NAME).unwrap();
            assert_eq!(storage.head("no/such/key").await.unwrap(), None);
        }

        #[tokio::test]
        async fn unsigned_headers_are_rejected() {
            let r = running().await;
            let storage = r.storages.resolve("").unwrap();
            let p = storage
                .presign_put("k", "image/png", Some(3), Duration::from_secs(60))
                .await
                .unwrap();

            // Without the signed content-type.
            let resp = reqwest::Client::new()
                .put(&p.url)
                .body(&b"abc"[..])
                .send()
                .await
                .unwrap();
            assert!(
                matches!(resp.status().as_u16(), 400 | 403),
                "{}",
                resp.status()
            );

            // Another content type than the signed one.
            let mut wrong = p.clone();
            wrong
                .headers
                .insert("content-type".into(), "text/html".into());
            let resp = put(&wrong, b"abc").send().await.unwrap();
            assert!(
                matches!(resp.status().as_u16(), 400 | 403),
                "{}",
                resp.status()
            );

            // Another length than the signed one.
            let mut longer = p.clone();
            longer.headers.remove("content-length");
            let resp = put(&longer, b"abcd").send().await.unwrap();
            assert!(
                matches!(resp.status().as_u16(), 400 | 403),
                "{}",
                resp.status()
            );

            assert_eq!(storage.head("k").await.unwrap(), None);
        }
    }
}
