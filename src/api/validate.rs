//! Wire input to validated domain input. Every error names its field.

use std::{collections::BTreeMap, time::Duration};

use crate::{
    config::WebhooksConfig,
    domain::{Trigger, WebhookId},
    error::ApiError,
    pipeline::{queue::Priority, ssrf},
    proto,
    signing::SigningKey,
};

pub const MAX_URL_LEN: usize = 2048;
pub const MAX_KEY_LEN: usize = 1024;
pub const MAX_FILENAME_LEN: usize = 255;
pub const MAX_CONTENT_TYPE_LEN: usize = 255;
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 255;
pub const MAX_METADATA_KEY_LEN: usize = 128;
/// S3's limit for one object.
pub const MAX_CONTENT_LENGTH: i64 = 5 * 1024 * 1024 * 1024 * 1024;

/// A validated CreateUploadWebhook request. No `Debug`: it holds the
/// signing secret.
pub struct CreateInput {
    pub storage: String,
    /// None: derive one from the filename.
    pub key: Option<String>,
    pub filename: String,
    pub content_type: String,
    pub content_length: Option<i64>,
    pub url: String,
    /// None: generate one.
    pub secret: Option<String>,
    pub trigger: Trigger,
    pub metadata: BTreeMap<String, String>,
    pub idempotency_key: Option<String>,
    pub expires_in: Duration,
    pub priority: Priority,
}

/// The longest grace period of a secret rotation.
pub const MAX_ROTATION_GRACE: Duration = Duration::from_secs(30 * 86_400);

/// RotateSecret's optional new secret: empty means generate one.
pub fn new_secret(secret: &str) -> Result<Option<String>, ApiError> {
    if secret.is_empty() {
        return Ok(None);
    }
    SigningKey::from_secret(secret).map_err(|e| ApiError::invalid("secret", e.to_string()))?;
    Ok(Some(secret.to_string()))
}

/// RotateSecret's optional grace period: 0 to 30 days.
pub fn grace_period(d: Option<prost_types::Duration>) -> Result<Option<Duration>, ApiError> {
    let Some(d) = d else { return Ok(None) };
    if d.seconds < 0 || d.nanos < 0 {
        return Err(ApiError::invalid("grace_period", "must not be negative"));
    }
    let d = Duration::new(d.seconds as u64, d.nanos as u32);
    if d > MAX_ROTATION_GRACE {
        return Err(ApiError::invalid(
            "grace_period",
            format!("must be at most {}s", MAX_ROTATION_GRACE.as_secs()),
        ));
    }
    Ok(Some(d))
}

pub const MAX_ETAG_LEN: usize = 256;

/// Confirm's optional ETag: printable ASCII, bounded.
pub fn etag(s: &str) -> Result<Option<String>, ApiError> {
    let s = s.trim();
    if s.is_empty() {
        return Ok(None);
    }
    if s.len() > MAX_ETAG_LEN || !s.bytes().all(|b| (0x21..0x7f).contains(&b)) {
        return Err(ApiError::invalid(
            "etag",
            format!("must be at most {MAX_ETAG_LEN} printable ASCII characters"),
        ));
    }
    Ok(Some(s.to_string()))
}

pub fn webhook_id(field: &str, s: &str) -> Result<WebhookId, ApiError> {
    if s.is_empty() {
        return Err(ApiError::invalid(field, "is required"));
    }
    WebhookId::parse(s).map_err(|m| ApiError::invalid(field, m))
}

/// Event type names of a StreamEvents filter: `a.b` style, lowercase.
pub fn event_types(types: &[String]) -> Result<Vec<String>, ApiError> {
    const MAX: usize = 32;
    if types.len() > MAX {
        return Err(ApiError::invalid("types", format!("at most {MAX} entries")));
    }
    types
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let ok = !t.is_empty()
                && t.len() <= 64
                && t.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '_');
            if ok {
                Ok(t.clone())
            } else {
                Err(ApiError::invalid(
                    format!("types[{i}]"),
                    "must be an event type such as `delivery.succeeded`",
                ))
            }
        })
        .collect()
}

fn has_control(s: &str) -> bool {
    s.chars().any(char::is_control)
}

/// `allow` holds the private networks a URL may name anyway
/// (`delivery.allow_cidrs`).
pub fn create(
    req: proto::CreateUploadWebhookRequest,
    limits: &WebhooksConfig,
    allow: &ssrf::AllowList,
) -> Result<CreateInput, ApiError> {
    let target = req.webhook.ok_or_else(|| {
        ApiError::invalid(
            "webhook",
            "is required (url, optional secret, trigger, metadata)",
        )
    })?;

    let url = target.url.trim().to_string();
    check_url(&url, allow)?;

    let secret = if target.secret.is_empty() {
        None
    } else {
        SigningKey::from_secret(&target.secret)
            .map_err(|e| ApiError::invalid("webhook.secret", e.to_string()))?;
        Some(target.secret)
    };

    let trigger = match proto::Trigger::try_from(target.trigger) {
        Ok(proto::Trigger::Unspecified | proto::Trigger::Manual) => Trigger::Manual,
        Ok(proto::Trigger::Auto) => Trigger::Auto,
        Err(_) => {
            return Err(ApiError::invalid(
                "webhook.trigger",
                format!("unknown value {}", target.trigger),
            ));
        }
    };

    let metadata: BTreeMap<String, String> = target.metadata.into_iter().collect();
    if metadata.len() > limits.max_metadata_entries {
        return Err(ApiError::invalid(
            "webhook.metadata",
            format!(
                "has {} entries; at most {} are allowed",
                metadata.len(),
                limits.max_metadata_entries
            ),
        ));
    }
    let bytes: usize = metadata.iter().map(|(k, v)| k.len() + v.len()).sum();
    if bytes > limits.max_metadata_bytes {
        return Err(ApiError::invalid(
            "webhook.metadata",
            format!(
                "is {bytes} bytes; at most {} are allowed",
                limits.max_metadata_bytes
            ),
        ));
    }
    for k in metadata.keys() {
        if k.is_empty() || k.len() > MAX_METADATA_KEY_LEN || has_control(k) {
            return Err(ApiError::invalid(
                "webhook.metadata",
                format!("keys must be 1-{MAX_METADATA_KEY_LEN} bytes without control characters"),
            ));
        }
    }

    let filename = req.filename;
    if filename.trim().is_empty() {
        return Err(ApiError::invalid("filename", "is required"));
    }
    if filename.len() > MAX_FILENAME_LEN {
        return Err(ApiError::invalid(
            "filename",
            format!("is longer than {MAX_FILENAME_LEN} bytes"),
        ));
    }
    if has_control(&filename) || filename.contains(['/', '\\']) {
        return Err(ApiError::invalid(
            "filename",
            "must not contain `/`, `\\` or control characters",
        ));
    }

    let key = if req.key.is_empty() {
        None
    } else {
        check_key(&req.key)?;
        Some(req.key)
    };

    let content_type = if req.content_type.is_empty() {
        "application/octet-stream".to_string()
    } else {
        check_content_type(&req.content_type)?;
        req.content_type
    };

    if let Some(n) = req.content_length
        && !(0..=MAX_CONTENT_LENGTH).contains(&n)
    {
        return Err(ApiError::invalid(
            "content_length",
            format!("must be between 0 and {MAX_CONTENT_LENGTH}"),
        ));
    }

    let expires_in = match req.expires_in {
        None => limits.default_expires_in,
        Some(d) => {
            if d.seconds < 0 || d.nanos < 0 || (d.seconds == 0 && d.nanos == 0) {
                return Err(ApiError::invalid("expires_in", "must be positive"));
            }
            let d = Duration::new(d.seconds as u64, d.nanos as u32);
            if d > limits.max_expires_in {
                return Err(ApiError::invalid(
                    "expires_in",
                    format!("must be at most {}s", limits.max_expires_in.as_secs()),
                ));
            }
            d
        }
    };

    let idempotency_key = if req.idempotency_key.is_empty() {
        None
    } else if req.idempotency_key.len() > MAX_IDEMPOTENCY_KEY_LEN
        || has_control(&req.idempotency_key)
    {
        return Err(ApiError::invalid(
            "idempotency_key",
            format!("must be at most {MAX_IDEMPOTENCY_KEY_LEN} bytes without control characters"),
        ));
    } else {
        Some(req.idempotency_key)
    };

    let priority = match proto::Priority::try_from(req.priority) {
        Ok(proto::Priority::Unspecified | proto::Priority::Normal) => Priority::Normal,
        Ok(proto::Priority::High) => Priority::High,
        Err(_) => {
            return Err(ApiError::invalid(
                "priority",
                format!("unknown value {}", req.priority),
            ));
        }
    };

    Ok(CreateInput {
        priority,
        storage: req.storage,
        key,
        filename,
        content_type,
        content_length: req.content_length,
        url,
        secret,
        trigger,
        metadata,
        idempotency_key,
        expires_in,
    })
}

/// A webhook URL: http(s), with a host. A host that is a literal address
/// in a blocked range (see `pipeline::ssrf`) is refused here, so that the
/// client learns at once; a hostname can only be judged by what it
/// resolves to, which the delivery client checks at every attempt.
fn check_url(url: &str, allow: &ssrf::AllowList) -> Result<(), ApiError> {
    const F: &str = "webhook.url";
    if url.is_empty() {
        return Err(ApiError::invalid(F, "is required"));
    }
    if url.len() > MAX_URL_LEN {
        return Err(ApiError::invalid(
            F,
            format!("is longer than {MAX_URL_LEN} bytes"),
        ));
    }
    let parsed = reqwest::Url::parse(url)
        .map_err(|e| ApiError::invalid(F, format!("is not a valid URL: {e}")))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(ApiError::invalid(
            F,
            format!("scheme must be http or https, not `{}`", parsed.scheme()),
        ));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(ApiError::invalid(F, "has no host"));
    }
    if let Some(ip) = ssrf::literal_host(&parsed)
        && let Err(blocked) = allow.check(ip)
    {
        return Err(ApiError::invalid(
            F,
            format!(
                "host {ip} is in a blocked range ({}): webhooks cannot target private networks",
                blocked.range
            ),
        ));
    }
    Ok(())
}

/// Object keys: no leading `/`, no `.`/`..` segments, no backslashes or
/// control characters, at most 1024 bytes (S3's limit).
pub fn check_key(key: &str) -> Result<(), ApiError> {
    const F: &str = "key";
    if key.len() > MAX_KEY_LEN {
        return Err(ApiError::invalid(
            F,
            format!("is longer than {MAX_KEY_LEN} bytes"),
        ));
    }
    if key.starts_with('/') {
        return Err(ApiError::invalid(F, "must not start with `/`"));
    }
    if key.split('/').any(|seg| seg == ".." || seg == ".") {
        return Err(ApiError::invalid(
            F,
            "must not contain `.` or `..` segments",
        ));
    }
    if key.contains("//") || key.ends_with('/') {
        return Err(ApiError::invalid(
            F,
            "must not contain empty segments or end with `/`",
        ));
    }
    if has_control(key) || key.contains('\\') {
        return Err(ApiError::invalid(
            F,
            "must not contain `\\` or control characters",
        ));
    }
    Ok(())
}

fn check_content_type(ct: &str) -> Result<(), ApiError> {
    const F: &str = "content_type";
    let valid = ct.len() <= MAX_CONTENT_TYPE_LEN
        && !has_control(ct)
        && ct.split(';').next().is_some_and(|essence| {
            let mut parts = essence.trim().splitn(2, '/');
            let (a, b) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            let token = |s: &str| {
                !s.is_empty()
                    && s.bytes()
                        .all(|c| c.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(&c))
            };
            token(a) && token(b)
        });
    if valid {
        Ok(())
    } else {
        Err(ApiError::invalid(
            F,
            "must be a media type like `image/png`",
        ))
    }
}

/// A safe, unique key from a filename:
/// `<prefix><yyyy>/<mm>/<dd>/<32 hex>/<sanitized filename>`.
pub fn derive_key(prefix: &str, filename: &str, now: chrono::DateTime<chrono::Utc>) -> String {
    let mut clean: String = filename
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                c
            } else {
                '_'
            }
        })
        .collect();
    clean = clean.trim_start_matches('.').to_string();
    if clean.len() > 100 {
        // Keep the extension when cutting.
        let ext = clean
            .rfind('.')
            .map(|i| clean[i..].to_string())
            .filter(|e| e.len() <= 16)
            .unwrap_or_default();
        clean.truncate(100 - ext.len());
        clean.push_str(&ext);
    }
    if clean.is_empty() {
        clean = "file".into();
    }
    format!(
        "{prefix}{}/{}/{}",
        now.format("%Y/%m/%d"),
        uuid::Uuid::now_v7().simple(),
        clean
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn limits() -> WebhooksConfig {
        Config::from_toml("").unwrap().webhooks
    }

    fn no_allow() -> ssrf::AllowList {
        ssrf::AllowList::default()
    }

    fn valid() -> proto::CreateUploadWebhookRequest {
        proto::CreateUploadWebhookRequest {
            filename: "a.png".into(),
            webhook: Some(proto::WebhookTarget {
                url: "https://example.com/hook".into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn field_of(r: Result<CreateInput, ApiError>) -> String {
        match r.err().expect("an error") {
            ApiError::InvalidArgument { field, .. } => field,
            other => panic!("not invalid argument: {other}"),
        }
    }

    #[test]
    fn valid_request_gets_defaults() {
        let c = create(valid(), &limits(), &no_allow()).unwrap();
        assert_eq!(c.content_type, "application/octet-stream");
        assert_eq!(c.expires_in, Duration::from_secs(86400));
        assert_eq!(c.trigger, Trigger::Manual);
        assert!(c.key.is_none() && c.secret.is_none());
    }

    #[test]
    fn bad_input_names_the_field() {
        let mut r = valid();
        r.webhook = None;
        assert_eq!(field_of(create(r, &limits(), &no_allow())), "webhook");
        let mut r = valid();
        r.webhook.as_mut().unwrap().url = String::new();
        assert_eq!(field_of(create(r, &limits(), &no_allow())), "webhook.url");
        let mut r = valid();
        r.webhook.as_mut().unwrap().url = "ftp://example.com/x".into();
        assert_eq!(field_of(create(r, &limits(), &no_allow())), "webhook.url");
        let mut r = valid();
        r.filename = String::new();
        assert_eq!(field_of(create(r, &limits(), &no_allow())), "filename");
        for key in ["/abs", "a/../b", "..", "a//b", "a\\b"] {
            let mut r = valid();
            r.key = key.into();
            assert_eq!(field_of(create(r, &limits(), &no_allow())), "key", "{key}");
        }
        let mut r = valid();
        r.webhook
            .as_mut()
            .unwrap()
            .metadata
            .insert("big".into(), "x".repeat(5000));
        assert_eq!(
            field_of(create(r, &limits(), &no_allow())),
            "webhook.metadata"
        );
        let mut r = valid();
        r.webhook.as_mut().unwrap().secret = "nope".into();
        assert_eq!(
            field_of(create(r, &limits(), &no_allow())),
            "webhook.secret"
        );
        let mut r = valid();
        r.content_type = "not a type".into();
        assert_eq!(field_of(create(r, &limits(), &no_allow())), "content_type");
        let mut r = valid();
        r.content_length = Some(-1);
        assert_eq!(
            field_of(create(r, &limits(), &no_allow())),
            "content_length"
        );
        let mut r = valid();
        r.expires_in = Some(prost_types::Duration {
            seconds: 30 * 86400,
            nanos: 0,
        });
        assert_eq!(field_of(create(r, &limits(), &no_allow())), "expires_in");
    }

    fn with_url(url: &str) -> proto::CreateUploadWebhookRequest {
        let mut r = valid();
        r.webhook.as_mut().unwrap().url = url.into();
        r
    }

    #[test]
    fn literal_private_addresses_are_refused_naming_the_range() {
        for (url, range) in [
            ("http://127.0.0.1:9999/hook", "loopback"),
            ("http://2130706433/hook", "loopback"),
            ("http://[::1]/hook", "loopback"),
            ("http://169.254.169.254/latest/meta-data", "link-local"),
            ("https://10.0.0.1/", "private (RFC 1918)"),
            ("http://[::ffff:192.168.1.1]/", "private (RFC 1918)"),
            ("http://100.64.0.1/", "shared (CGNAT)"),
            ("http://0.0.0.0:80/", "unspecified"),
            ("http://[fd00::1]/", "unique-local"),
        ] {
            match create(with_url(url), &limits(), &no_allow()).err() {
                Some(ApiError::InvalidArgument { field, message }) => {
                    assert_eq!(field, "webhook.url", "{url}");
                    assert!(message.contains(range), "{url}: {message}");
                }
                other => panic!("{url}: {:?}", other.map(|e| e.to_string())),
            }
        }
        // Public literals, and hostnames (judged at delivery), pass.
        for url in [
            "http://8.8.8.8/hook",
            "http://[2606:4700:4700::1111]/",
            "http://localhost:9999/hook",
            "http://internal.example/hook",
        ] {
            assert!(
                create(with_url(url), &limits(), &no_allow()).is_ok(),
                "{url}"
            );
        }
    }

    #[test]
    fn allow_list_opens_literal_addresses() {
        let allow = ssrf::AllowList::parse(&["127.0.0.1/32", "10.1.0.0/16"]).unwrap();
        assert!(create(with_url("http://127.0.0.1:9999/hook"), &limits(), &allow).is_ok());
        assert!(create(with_url("http://10.1.2.3/hook"), &limits(), &allow).is_ok());
        assert_eq!(
            field_of(create(with_url("http://10.2.0.1/hook"), &limits(), &allow)),
            "webhook.url"
        );
        assert_eq!(
            field_of(create(with_url("http://127.0.0.2/hook"), &limits(), &allow)),
            "webhook.url"
        );
    }

    #[test]
    fn derived_keys_are_safe_and_unique() {
        let now = chrono::Utc::now();
        let a = derive_key("uploads/", "../../etc/passwd", now);
        let b = derive_key("uploads/", "../../etc/passwd", now);
        assert_ne!(a, b);
        check_key(&a).unwrap();
        assert!(
            a.starts_with("uploads/") && a.ends_with("_.._etc_passwd"),
            "{a}"
        );
        let long = derive_key("", &format!("{}.jpeg", "x".repeat(300)), now);
        assert!(long.ends_with(".jpeg"));
        check_key(&derive_key("", "...", now)).unwrap();
    }
}
