//! Configuration in layers: `config.default.toml` (compiled in), an optional
//! file, then `UPLOADHOOK_…` environment variables (`__` nests). Validated
//! once at start-up; every error names the key.

use std::{collections::BTreeMap, net::SocketAddr, path::PathBuf, time::Duration};

use figment::{
    Figment,
    providers::{Env, Format, Toml},
};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Deserializer};

use crate::pipeline::ssrf::AllowList;

/// The defaults file, compiled in so that the binary works anywhere.
pub const DEFAULTS: &str = include_str!("../config.default.toml");

/// The longest `api.key_cache_ttl`: how long a revoked key may still work.
const MAX_KEY_CACHE_TTL: Duration = Duration::from_secs(300);

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub api: ApiConfig,
    pub database: DatabaseConfig,
    pub queue: QueueConfig,
    pub embedded_s3: EmbeddedS3Config,
    #[serde(default)]
    pub storage: BTreeMap<String, StorageConfig>,
    pub webhooks: WebhooksConfig,
    pub verify: VerifyConfig,
    pub delivery: DeliveryConfig,
    pub worker: WorkerConfig,
    pub bootstrap: BootstrapConfig,
    pub telemetry: TelemetryConfig,
    pub detect: DetectConfig,
    pub events: EventsConfig,
    pub r2_events: R2EventsConfig,
    pub encryption: EncryptionConfig,
    pub streams: StreamsConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    #[serde(deserialize_with = "de_duration")]
    pub shutdown_grace: Duration,
    pub tls: TlsConfig,
}

/// TLS on the gRPC and HTTP listeners (`server.tls`), and mutual TLS.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain; empty: no TLS.
    pub cert_file: String,
    /// PEM private key of `cert_file`.
    pub key_file: String,
    /// PEM CA bundle that client certificates must chain to.
    pub client_ca_file: String,
    pub client_auth: ClientAuth,
    /// How often the files are checked for changes (certificate renewal).
    #[serde(deserialize_with = "de_duration")]
    pub reload_every: Duration,
    /// Client certificates that authenticate as a tenant without an API key.
    pub client_tenants: Vec<ClientTenant>,
}

impl TlsConfig {
    pub fn enabled(&self) -> bool {
        !self.cert_file.is_empty()
    }
}

fn invalid(key: &str, message: &str) -> Result<(), ConfigError> {
    Err(ConfigError::Invalid {
        key: key.to_string(),
        message: message.to_string(),
    })
}

impl TlsConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let tls_only = |key: &str| {
            invalid(
                &format!("server.tls.{key}"),
                "needs TLS: set server.tls.cert_file and server.tls.key_file",
            )
        };
        if self.cert_file.is_empty() != self.key_file.is_empty() {
            return invalid(
                if self.cert_file.is_empty() {
                    "server.tls.cert_file"
                } else {
                    "server.tls.key_file"
                },
                "cert_file and key_file are set together",
            );
        }
        if !self.enabled() {
            if self.client_auth != ClientAuth::Off {
                return tls_only("client_auth");
            }
            if !self.client_ca_file.is_empty() {
                return tls_only("client_ca_file");
            }
        }
        match (self.client_auth, self.client_ca_file.is_empty()) {
            (ClientAuth::Off, false) => {
                return invalid(
                    "server.tls.client_ca_file",
                    "is set but server.tls.client_auth is \"off\"; set it to \"optional\" or \"required\"",
                );
            }
            (ClientAuth::Optional | ClientAuth::Required, true) => {
                return invalid(
                    "server.tls.client_ca_file",
                    "is required when server.tls.client_auth is not \"off\"",
                );
            }
            _ => {}
        }
        if self.reload_every.is_zero() {
            return invalid("server.tls.reload_every", "must be more than 0");
        }
        let mut seen = std::collections::HashSet::new();
        for (i, entry) in self.client_tenants.iter().enumerate() {
            let key = format!("server.tls.client_tenants[{i}]");
            if self.client_auth == ClientAuth::Off {
                return invalid(
                    &key,
                    "needs server.tls.client_auth \"optional\" or \"required\"",
                );
            }
            if entry.tenant.trim().is_empty() {
                return invalid(&format!("{key}.tenant"), "is empty");
            }
            let matchers = [&entry.subject, &entry.san_dns, &entry.san_uri];
            let set: Vec<&String> = matchers.iter().filter_map(|m| m.as_ref()).collect();
            if set.len() != 1 || set[0].trim().is_empty() {
                return invalid(
                    &key,
                    "needs exactly one non-empty matcher: subject, san_dns or san_uri",
                );
            }
            let matcher = (
                entry.subject.is_some(),
                entry.san_dns.is_some(),
                set[0].to_ascii_lowercase(),
            );
            if !seen.insert(matcher) {
                return invalid(&key, "repeats the matcher of an earlier entry");
            }
        }
        Ok(())
    }
}

/// Whether clients must present a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuth {
    /// No client certificates are asked for.
    Off,
    /// A certificate is checked when the client sends one.
    Optional,
    /// Every API call needs a certificate that chains to `client_ca_file`.
    Required,
}

/// One entry of `server.tls.client_tenants`: a certificate that matches
/// exactly one of `subject`, `san_dns`, `san_uri` is `tenant`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientTenant {
    /// The tenant's name (created when missing, as `keys create` does).
    pub tenant: String,
    /// The subject distinguished name, RFC 4514 (`CN=billing,O=Acme`).
    pub subject: Option<String>,
    /// A DNS name in the certificate's subject alternative names.
    pub san_dns: Option<String>,
    /// A URI in the subject alternative names (a SPIFFE id, say).
    pub san_uri: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// The largest request accepted: a gRPC message, or a REST body.
    pub max_request_bytes: usize,
    /// Requests per second per tenant (a token bucket); 0 turns it off.
    pub rate_limit_per_second: f64,
    /// Requests a tenant may make at once after a pause.
    pub rate_limit_burst: u32,
    /// Tenants tracked at once (bounds the limiter's memory).
    pub rate_limit_tenants: usize,
    /// Unary calls running at once in this process; beyond it, UNAVAILABLE
    /// at once (admission control). 0: no limit.
    pub max_in_flight: usize,
    /// How long an API key that authenticated is trusted without reading
    /// it again (so how long a revocation may take to reach this process).
    /// 0: read on every call.
    #[serde(deserialize_with = "de_duration")]
    pub key_cache_ttl: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    pub url: SecretString,
    pub migrate_on_start: bool,
    /// Connection pool size; unset: see [`DatabaseConfig::pool_size`].
    #[serde(default)]
    pub max_connections: Option<u32>,
    /// Connections opened at start, and as many kept open; unset: see
    /// [`DatabaseConfig::pool_min`].
    #[serde(default)]
    pub min_connections: Option<u32>,
}

impl DatabaseConfig {
    /// `max_connections`, or by default 10 on PostgreSQL and 1 on SQLite.
    ///
    /// SQLite has one writer, and every connection is a thread of its
    /// own: with one connection the statements run back to back on one
    /// thread with a warm page cache, where ten connections contended for
    /// locks and woke threads, and writers waited in SQLite's busy
    /// handler. Measured (docs/benchmarks-history.md, session 16): embedded 4,000-8,000
    /// webhooks at 64 in flight delivered about twice as many per second
    /// with one connection as with ten, at half the CPU per webhook.
    pub fn pool_size(&self) -> u32 {
        self.max_connections
            .unwrap_or(if self.is_sqlite() { 1 } else { 10 })
    }

    /// `min_connections`, or by default 0: connections are opened on
    /// demand. The whole pool opened at start takes most of the delay off
    /// the first half second of a burst (PostgreSQL + Redis at 500/s: its
    /// max from Confirm to arrival 37-142 ms against 130-310 ms), but in
    /// four of five pairs its p50 was higher (likely the work spread over
    /// ten backends on two cores), so it is an option (docs/benchmarks-history.md,
    /// session 21).
    pub fn pool_min(&self) -> u32 {
        self.min_connections.unwrap_or(0)
    }

    pub fn is_sqlite(&self) -> bool {
        self.url.expose_secret().starts_with("sqlite:")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueBackend {
    Memory,
    Redis,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueConfig {
    pub backend: QueueBackend,
    pub redis_url: SecretString,
    pub prefix: String,
    #[serde(deserialize_with = "de_duration")]
    pub visibility_timeout: Duration,
    pub max_deliveries: u32,
    #[serde(deserialize_with = "de_duration")]
    pub reconcile_every: Duration,
    /// PEM CA bundle trusted for a `rediss://` URL instead of the system's
    /// roots; None (`""`) for the system's.
    #[serde(deserialize_with = "de_opt_path")]
    pub redis_ca_file: Option<PathBuf>,
    /// PEM client certificate (chain) for mutual TLS; with the key.
    #[serde(deserialize_with = "de_opt_path")]
    pub redis_client_cert_file: Option<PathBuf>,
    /// PEM private key of `redis_client_cert_file`.
    #[serde(deserialize_with = "de_opt_path")]
    pub redis_client_key_file: Option<PathBuf>,
}

impl QueueConfig {
    /// Whether `redis_url` asks for TLS (`rediss://`, `rediss+cluster://`,
    /// `valkeys://`).
    pub fn redis_tls(&self) -> bool {
        let url = self.redis_url.expose_secret();
        let scheme = url.split_once("://").map_or("", |(s, _)| s);
        ["rediss", "rediss+cluster", "valkeys"]
            .iter()
            .any(|s| scheme.eq_ignore_ascii_case(s))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EmbeddedMode {
    Auto,
    On,
    Off,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbeddedS3Config {
    pub mode: EmbeddedMode,
    pub addr: SocketAddr,
    pub root: PathBuf,
    pub bucket: String,
    pub access_key: String,
    pub secret_key: SecretString,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum StorageKind {
    #[serde(rename = "s3")]
    S3,
    #[serde(rename = "r2")]
    R2,
    #[serde(rename = "s3-compatible")]
    S3Compatible,
}

impl StorageKind {
    pub fn as_str(self) -> &'static str {
        match self {
            StorageKind::S3 => "s3",
            StorageKind::R2 => "r2",
            StorageKind::S3Compatible => "s3-compatible",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    pub kind: StorageKind,
    pub bucket: String,
    #[serde(default = "default_region")]
    pub region: String,
    #[serde(default)]
    pub endpoint: Option<String>,
    #[serde(default)]
    pub path_style: bool,
    #[serde(default)]
    pub access_key_id: Option<String>,
    #[serde(default)]
    pub secret_access_key: Option<SecretString>,
    #[serde(default)]
    pub public_base_url: Option<String>,
    #[serde(default = "default_presign_expiry", deserialize_with = "de_duration")]
    pub presign_expiry: Duration,
}

fn default_region() -> String {
    "us-east-1".into()
}
fn default_presign_expiry() -> Duration {
    Duration::from_secs(3600)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhooksConfig {
    #[serde(deserialize_with = "de_duration")]
    pub default_expires_in: Duration,
    #[serde(deserialize_with = "de_duration")]
    pub max_expires_in: Duration,
    pub max_metadata_entries: usize,
    pub max_metadata_bytes: usize,
    pub key_prefix: String,
    /// How long an idempotency key answers with its webhook; after that
    /// the same key creates a new one.
    #[serde(deserialize_with = "de_duration")]
    pub idempotency_ttl: Duration,
    /// How long the old secret keeps signing after RotateSecret, unless
    /// the request says otherwise.
    #[serde(deserialize_with = "de_duration")]
    pub secret_rotation_grace: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerifyConfig {
    #[serde(deserialize_with = "de_durations")]
    pub missing_retry_delays: Vec<Duration>,
    /// Verification HEADs per second per storage connection, per worker
    /// process; 0: no limit (worker.concurrency still bounds them).
    pub head_rate: f64,
    /// Verification HEADs that may go at once before the rate applies.
    pub head_burst: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeliveryConfig {
    #[serde(deserialize_with = "de_duration")]
    pub timeout: Duration,
    #[serde(deserialize_with = "de_durations")]
    pub retry_schedule: Vec<Duration>,
    pub jitter: f64,
    #[serde(deserialize_with = "de_duration")]
    pub min_retry_after: Duration,
    #[serde(deserialize_with = "de_duration")]
    pub max_retry_after: Duration,
    pub max_response_bytes: usize,
    /// Exceptions to the private-network (SSRF) block, as CIDRs. None
    /// (unset): none, except loopback while the embedded S3 server runs;
    /// see [`Config::delivery_allow_list`].
    #[serde(default)]
    pub allow_cidrs: Option<Vec<String>>,
    /// A dead-lettered webhook is redriven once by itself after this long;
    /// `None` (`"off"`): only by hand.
    #[serde(deserialize_with = "de_duration_or_off")]
    pub auto_redrive_after: Option<Duration>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerConfig {
    pub concurrency: usize,
    pub batch_size: usize,
    pub per_host_concurrency: usize,
    /// Status changes written per database transaction, at most (1: each
    /// its own transaction).
    pub write_batch_max: usize,
    /// Groups written at once on PostgreSQL (SQLite: always one).
    pub write_concurrency: usize,
    /// How long a group waits for more writes before it is written, when
    /// writes are arriving (zero: never waits).
    #[serde(deserialize_with = "de_duration")]
    pub write_linger: Duration,
}

/// StreamEvents (`[streams]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamsConfig {
    #[serde(deserialize_with = "de_duration")]
    pub heartbeat_every: Duration,
    pub stream_buffer: usize,
    #[serde(deserialize_with = "de_duration")]
    pub slow_reader_timeout: Duration,
    pub max_streams: usize,
    #[serde(deserialize_with = "de_duration")]
    pub poll_every: Duration,
    #[serde(deserialize_with = "de_duration")]
    pub gap_grace: Duration,
}

impl StreamsConfig {
    pub fn stream(&self) -> crate::events::StreamConfig {
        crate::events::StreamConfig {
            buffer: self.stream_buffer,
            heartbeat_every: self.heartbeat_every,
            slow_reader_timeout: self.slow_reader_timeout,
            poll_every: self.poll_every,
            gap_grace: self.gap_grace,
        }
    }
}

/// Detection without Confirm: AUTO checks, expiry, the HEAD budget.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DetectConfig {
    /// Delay before an AUTO webhook's first HEAD; each later one doubles,
    /// up to `max_check_interval`.
    #[serde(deserialize_with = "de_duration")]
    pub first_check: Duration,
    #[serde(deserialize_with = "de_duration")]
    pub max_check_interval: Duration,
    /// Each check delay gets +-jitter (fraction), so that webhooks created
    /// together are not checked together.
    pub jitter: f64,
    /// An object last modified longer ago than this is complete at first
    /// sight; a younger one must look the same on two checks in a row.
    #[serde(deserialize_with = "de_duration")]
    pub settle: Duration,
    /// How often PENDING webhooks past `expires_at` become EXPIRED.
    #[serde(deserialize_with = "de_duration")]
    pub expiry_sweep_every: Duration,
    /// Rows read and expired per batch.
    pub expiry_batch: u64,
    /// AUTO check HEADs per second per storage connection, per worker
    /// process (verification has its own, `verify.head_rate`); 0: no limit.
    pub head_rate: f64,
    /// HEADs that may go at once before the rate applies.
    pub head_burst: u32,
}

/// Storage event notifications (`POST /v1/storage-events/{storage}`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsConfig {
    /// The shared secret senders present (`Authorization: Bearer`, or
    /// `?token=` in an SNS subscription URL). Empty: the endpoint is off.
    pub token: SecretString,
    /// Hosts whose SNS `SubscribeURL` is fetched to confirm a
    /// subscription; `*` stands for one DNS label.
    pub sns_subscribe_hosts: Vec<String>,
}

/// Cloudflare R2 event notifications, pulled from a Queue over HTTP.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct R2EventsConfig {
    pub enabled: bool,
    /// The Cloudflare API, up to `/accounts`.
    pub api_base: String,
    pub account_id: String,
    pub queue_id: String,
    /// A Cloudflare API token with Queues read and write.
    pub api_token: SecretString,
    /// The storage connection whose bucket sends these notifications.
    pub storage: String,
    pub batch_size: u32,
    #[serde(deserialize_with = "de_duration")]
    pub visibility_timeout: Duration,
    /// Pause after an empty pull.
    #[serde(deserialize_with = "de_duration")]
    pub poll_every: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OtlpProtocol {
    /// OTLP over gRPC (usually port 4317).
    Grpc,
    /// OTLP over HTTP with protobuf bodies (usually port 4318).
    Http,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    /// The collector's URL; unset: no traces are exported.
    #[serde(default)]
    pub otlp_endpoint: Option<String>,
    pub otlp_protocol: OtlpProtocol,
    /// The share of new traces that are sampled (a caller's sampled
    /// `traceparent` is always followed).
    pub sampling_ratio: f64,
    pub service_name: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootstrapConfig {
    pub dev_tenant: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EncryptionConfig {
    /// Master keys sealing webhook signing secrets at rest:
    /// `id:base64(32 bytes)[,id:base64…]`, the first one active (see
    /// `crate::secrets`). Empty: see `crate::master_keyring`.
    pub keys: SecretString,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0}")]
    Load(String),
    #[error("config key `{key}`: {message}")]
    Invalid { key: String, message: String },
}

impl Config {
    /// Loads defaults, then `file` (when given), then the environment.
    pub fn load(file: Option<&std::path::Path>) -> Result<Self, ConfigError> {
        Self::load_from(file, Env::prefixed("UPLOADHOOK_").split("__"))
    }

    /// Defaults plus one TOML string of overrides, without the environment:
    /// what tests use to build a configuration.
    pub fn from_toml(overrides: &str) -> Result<Self, ConfigError> {
        Self::from_toml_layers(&[overrides])
    }

    /// Defaults plus several TOML layers, later ones winning.
    pub fn from_toml_layers(layers: &[&str]) -> Result<Self, ConfigError> {
        let mut fig = Figment::from(Toml::string(DEFAULTS));
        for layer in layers {
            fig = fig.merge(Toml::string(layer));
        }
        Self::extract(fig)
    }

    fn load_from(file: Option<&std::path::Path>, env: Env) -> Result<Self, ConfigError> {
        let mut fig = Figment::from(Toml::string(DEFAULTS));
        if let Some(path) = file {
            if !path.exists() {
                return Err(ConfigError::Load(format!(
                    "config file {} does not exist",
                    path.display()
                )));
            }
            fig = fig.merge(Toml::file(path));
        }
        // Not config keys: `UPLOADHOOK_CONFIG` names the file,
        // `UPLOADHOOK_LOG` is the log filter, and the test suite's
        // `UPLOADHOOK_TEST_*` / `UPLOADHOOK_REQUIRE_SERVICES`.
        fig = fig.merge(env.filter(|k| {
            let k = k.as_str().to_ascii_lowercase();
            !(k == "config" || k == "log" || k == "require_services" || k.starts_with("test_"))
        }));
        Self::extract(fig)
    }

    fn extract(fig: Figment) -> Result<Self, ConfigError> {
        let cfg: Config = fig.extract().map_err(|e| {
            let errs: Vec<String> = e
                .into_iter()
                .map(|err| {
                    let path = err.path.join(".");
                    if path.is_empty() {
                        err.kind.to_string()
                    } else {
                        format!("config key `{path}`: {}", err.kind)
                    }
                })
                .collect();
            ConfigError::Load(errs.join("; "))
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key: &str, message: &str| {
            Err(ConfigError::Invalid {
                key: key.to_string(),
                message: message.to_string(),
            })
        };
        for (key, d) in [
            ("streams.heartbeat_every", self.streams.heartbeat_every),
            (
                "streams.slow_reader_timeout",
                self.streams.slow_reader_timeout,
            ),
            ("streams.poll_every", self.streams.poll_every),
        ] {
            if d.is_zero() {
                return invalid(key, "must be more than 0");
            }
        }
        if self.streams.stream_buffer == 0 {
            return invalid("streams.stream_buffer", "must be at least 1");
        }
        if self.delivery.retry_schedule.is_empty() {
            return invalid("delivery.retry_schedule", "must have at least one delay");
        }
        if !(0.0..1.0).contains(&self.delivery.jitter) {
            return invalid("delivery.jitter", "must be in [0, 1)");
        }
        if !(0.0..=1.0).contains(&self.telemetry.sampling_ratio) {
            return invalid("telemetry.sampling_ratio", "must be in [0, 1]");
        }
        if let Some(e) = &self.telemetry.otlp_endpoint
            && !(e.starts_with("http://") || e.starts_with("https://"))
        {
            return invalid(
                "telemetry.otlp_endpoint",
                "must be an http:// or https:// URL, e.g. http://otel-collector:4317",
            );
        }
        if self.telemetry.service_name.trim().is_empty() {
            return invalid("telemetry.service_name", "must not be empty");
        }
        if self.delivery.min_retry_after > self.delivery.max_retry_after {
            return invalid(
                "delivery.min_retry_after",
                "must not exceed delivery.max_retry_after",
            );
        }
        let keys = self.encryption.keys.expose_secret();
        if !keys.trim().is_empty()
            && let Err(e) = crate::secrets::Keyring::parse(keys)
        {
            return invalid("encryption.keys", &e.to_string());
        }
        if self.api.max_request_bytes < 1024 {
            return invalid("api.max_request_bytes", "must be at least 1024");
        }
        if !self.api.rate_limit_per_second.is_finite() || self.api.rate_limit_per_second < 0.0 {
            return invalid(
                "api.rate_limit_per_second",
                "must be a number >= 0 (0 turns the limit off)",
            );
        }
        if self.api.rate_limit_burst == 0 {
            return invalid("api.rate_limit_burst", "must be at least 1");
        }
        if self.api.rate_limit_tenants == 0 {
            return invalid("api.rate_limit_tenants", "must be at least 1");
        }
        if self.api.key_cache_ttl > MAX_KEY_CACHE_TTL {
            return invalid(
                "api.key_cache_ttl",
                "must be at most 5m: it is how long a revoked key may still work",
            );
        }
        if self.delivery.timeout.is_zero() {
            return invalid("delivery.timeout", "must be positive");
        }
        if let Some(list) = &self.delivery.allow_cidrs
            && let Err(e) = AllowList::parse(list)
        {
            return invalid("delivery.allow_cidrs", &e);
        }
        if self.webhooks.default_expires_in > self.webhooks.max_expires_in {
            return invalid(
                "webhooks.default_expires_in",
                "must not exceed webhooks.max_expires_in",
            );
        }
        if self.worker.concurrency == 0 {
            return invalid("worker.concurrency", "must be at least 1");
        }
        if self.worker.batch_size == 0 {
            return invalid("worker.batch_size", "must be at least 1");
        }
        if self.worker.per_host_concurrency == 0 {
            return invalid("worker.per_host_concurrency", "must be at least 1");
        }
        if !(1..=1000).contains(&self.worker.write_batch_max) {
            return invalid("worker.write_batch_max", "must be between 1 and 1000");
        }
        if !(1..=64).contains(&self.worker.write_concurrency) {
            return invalid("worker.write_concurrency", "must be between 1 and 64");
        }
        if self.worker.write_linger > Duration::from_millis(50) {
            return invalid("worker.write_linger", "must be at most 50ms");
        }
        if !self.worker.write_linger.is_zero() && self.worker.write_batch_max == 1 {
            return invalid(
                "worker.write_linger",
                "has no effect with worker.write_batch_max = 1 (each write is its own transaction): set it to \"0ms\" or raise write_batch_max",
            );
        }
        if self.queue.backend == QueueBackend::Redis {
            if self.queue.visibility_timeout <= self.delivery.timeout {
                return invalid(
                    "queue.visibility_timeout",
                    "must be longer than delivery.timeout, or jobs in flight are taken over and run twice",
                );
            }
            if self.queue.prefix.is_empty() || self.queue.prefix.contains(['{', '}']) {
                return invalid(
                    "queue.prefix",
                    "must be non-empty and contain no `{` or `}`",
                );
            }
            if self.queue.max_deliveries == 0 {
                return invalid("queue.max_deliveries", "must be at least 1");
            }
            let q = &self.queue;
            match (&q.redis_client_cert_file, &q.redis_client_key_file) {
                (Some(_), None) => {
                    return invalid(
                        "queue.redis_client_key_file",
                        "must be set with queue.redis_client_cert_file (the client certificate's private key)",
                    );
                }
                (None, Some(_)) => {
                    return invalid(
                        "queue.redis_client_cert_file",
                        "must be set with queue.redis_client_key_file",
                    );
                }
                _ => {}
            }
            if !q.redis_tls() {
                for (key, set) in [
                    ("queue.redis_ca_file", q.redis_ca_file.is_some()),
                    (
                        "queue.redis_client_cert_file",
                        q.redis_client_cert_file.is_some(),
                    ),
                ] {
                    if set {
                        return invalid(
                            key,
                            "applies to TLS only, but queue.redis_url is not a rediss:// \
                             (or rediss+cluster://) URL",
                        );
                    }
                }
            }
        }
        let d = &self.detect;
        if d.first_check.is_zero() {
            return invalid("detect.first_check", "must be positive");
        }
        if d.max_check_interval < d.first_check {
            return invalid(
                "detect.max_check_interval",
                "must not be shorter than detect.first_check",
            );
        }
        if !(0.0..1.0).contains(&d.jitter) {
            return invalid("detect.jitter", "must be in [0, 1)");
        }
        if d.expiry_sweep_every.is_zero() {
            return invalid("detect.expiry_sweep_every", "must be positive");
        }
        if d.expiry_batch == 0 {
            return invalid("detect.expiry_batch", "must be at least 1");
        }
        if !d.head_rate.is_finite() || d.head_rate < 0.0 {
            return invalid(
                "detect.head_rate",
                "must be 0 (no limit) or a positive number",
            );
        }
        if d.head_burst == 0 {
            return invalid("detect.head_burst", "must be at least 1");
        }
        let v = &self.verify;
        if !v.head_rate.is_finite() || v.head_rate < 0.0 {
            return invalid(
                "verify.head_rate",
                "must be 0 (no limit) or a positive number",
            );
        }
        if v.head_burst == 0 {
            return invalid("verify.head_burst", "must be at least 1");
        }
        {
            use secrecy::ExposeSecret;
            let t = self.events.token.expose_secret();
            if !t.is_empty() && t.len() < 16 {
                return invalid(
                    "events.token",
                    "must be at least 16 characters (or empty to turn storage events off)",
                );
            }
        }
        let r2 = &self.r2_events;
        if r2.enabled {
            use secrecy::ExposeSecret;
            for (key, value) in [
                ("r2_events.api_base", r2.api_base.as_str()),
                ("r2_events.account_id", r2.account_id.as_str()),
                ("r2_events.queue_id", r2.queue_id.as_str()),
                ("r2_events.api_token", r2.api_token.expose_secret()),
                ("r2_events.storage", r2.storage.as_str()),
            ] {
                if value.is_empty() {
                    return invalid(key, "is required when r2_events.enabled = true");
                }
            }
            if !(1..=100).contains(&r2.batch_size) {
                return invalid("r2_events.batch_size", "must be between 1 and 100");
            }
            if r2.visibility_timeout < Duration::from_secs(1) {
                return invalid("r2_events.visibility_timeout", "must be at least 1s");
            }
        }
        if self.queue.reconcile_every.is_zero() {
            return invalid("queue.reconcile_every", "must be positive");
        }
        if self.database.max_connections == Some(0) {
            return invalid("database.max_connections", "must be at least 1");
        }
        if let Some(min) = self.database.min_connections
            && min > self.database.pool_size()
        {
            return invalid(
                "database.min_connections",
                &format!(
                    "must be at most the pool's size, database.max_connections ({})",
                    self.database.pool_size()
                ),
            );
        }
        for (name, s) in &self.storage {
            if !valid_storage_name(name) {
                return invalid(
                    &format!("storage.{name}"),
                    "name must be 1-63 of [a-z0-9_-]",
                );
            }
            if s.bucket.is_empty() {
                return invalid(&format!("storage.{name}.bucket"), "must not be empty");
            }
            if s.kind == StorageKind::R2 && s.endpoint.as_deref().unwrap_or("").is_empty() {
                return invalid(
                    &format!("storage.{name}.endpoint"),
                    "is required for kind \"r2\" (https://<account>.r2.cloudflarestorage.com)",
                );
            }
            if s.kind == StorageKind::S3Compatible && s.endpoint.as_deref().unwrap_or("").is_empty()
            {
                return invalid(
                    &format!("storage.{name}.endpoint"),
                    "is required for kind \"s3-compatible\"",
                );
            }
            if s.access_key_id.is_some() != s.secret_access_key.is_some() {
                return invalid(
                    &format!("storage.{name}.secret_access_key"),
                    "access_key_id and secret_access_key are set together",
                );
            }
        }
        self.server.tls.validate()?;
        if self.embedded_s3.mode == EmbeddedMode::On && self.storage.contains_key("embedded") {
            return invalid(
                "storage.embedded",
                "the name is taken by the embedded server",
            );
        }
        Ok(())
    }

    /// Whether loopback is allowed as a webhook target only because
    /// `delivery.allow_cidrs` is unset and the embedded S3 server runs:
    /// the development default, where the quick start's receiver is on
    /// 127.0.0.1. Setting `allow_cidrs` (even to `[]`) turns it off.
    pub fn dev_loopback_allowed(&self) -> bool {
        self.delivery.allow_cidrs.is_none() && self.embedded_s3_enabled()
    }

    /// The exceptions to the private-network block that webhooks get:
    /// `delivery.allow_cidrs` as set, or by default none, except 127.0.0.1
    /// and ::1 while the embedded S3 server runs (development).
    pub fn delivery_allow_list(&self) -> AllowList {
        match &self.delivery.allow_cidrs {
            // Validated at load.
            Some(list) => AllowList::parse(list).unwrap_or_default(),
            None if self.embedded_s3_enabled() => AllowList::loopback(),
            None => AllowList::default(),
        }
    }

    /// Whether the embedded S3-compatible server runs.
    pub fn embedded_s3_enabled(&self) -> bool {
        match self.embedded_s3.mode {
            EmbeddedMode::On => true,
            EmbeddedMode::Off => false,
            EmbeddedMode::Auto => self.storage.is_empty(),
        }
    }
}

fn valid_storage_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// Parses `500ms`, `5s`, `5m`, `2h`, `7d` (one unit; a whole number).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("`{s}` has no unit (ms, s, m, h, d)"))?;
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` does not start with a whole number"))?;
    let ms = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(format!("`{s}` has unknown unit `{unit}` (ms, s, m, h, d)")),
    };
    n.checked_mul(ms)
        .map(Duration::from_millis)
        .ok_or_else(|| format!("`{s}` is too long"))
}

fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    parse_duration(&s).map_err(serde::de::Error::custom)
}

fn de_duration_or_off<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let s = String::deserialize(d)?;
    if s == "off" {
        return Ok(None);
    }
    parse_duration(&s)
        .map(Some)
        .map_err(|e| serde::de::Error::custom(format!("{e} (or \"off\")")))
}

/// A path, or None for `""`.
fn de_opt_path<'de, D: Deserializer<'de>>(d: D) -> Result<Option<PathBuf>, D::Error> {
    let s = String::deserialize(d)?;
    Ok((!s.trim().is_empty()).then(|| PathBuf::from(s)))
}

fn de_durations<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Duration>, D::Error> {
    let v = Vec::<String>::deserialize(d)?;
    v.iter()
        .map(|s| parse_duration(s).map_err(serde::de::Error::custom))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_load_and_validate() {
        let cfg = Config::from_toml("").unwrap();
        assert_eq!(cfg.server.grpc_addr.port(), 50051);
        assert_eq!(cfg.delivery.retry_schedule.len(), 7);
        assert_eq!(cfg.delivery.retry_schedule[1], Duration::from_secs(300));
        assert!(cfg.embedded_s3_enabled());
    }

    #[test]
    fn auto_redrive_is_a_day_by_default_and_can_be_off() {
        let cfg = Config::from_toml("").unwrap();
        assert_eq!(
            cfg.delivery.auto_redrive_after,
            Some(Duration::from_secs(86400))
        );
        let cfg = Config::from_toml("[delivery]\nauto_redrive_after = \"off\"").unwrap();
        assert_eq!(cfg.delivery.auto_redrive_after, None);
        let err = Config::from_toml("[delivery]\nauto_redrive_after = \"soon\"").unwrap_err();
        assert!(
            err.to_string().contains("delivery.auto_redrive_after"),
            "{err}"
        );
    }

    #[test]
    fn the_pool_is_one_connection_on_sqlite_and_ten_on_postgres_unless_set() {
        let cfg = Config::from_toml("").unwrap();
        assert_eq!(cfg.database.max_connections, None);
        assert_eq!(cfg.database.pool_size(), 1, "the embedded default");
        let pg = "[database]\nurl = \"postgres://u@h/db\"\n";
        assert_eq!(Config::from_toml(pg).unwrap().database.pool_size(), 10);
        let set = Config::from_toml(&format!("{pg}max_connections = 3")).unwrap();
        assert_eq!(set.database.pool_size(), 3);
        let set = Config::from_toml("[database]\nmax_connections = 4").unwrap();
        assert_eq!(set.database.pool_size(), 4, "SQLite, set");
        let err = Config::from_toml("[database]\nmax_connections = 0").unwrap_err();
        assert!(
            err.to_string().contains("database.max_connections"),
            "{err}"
        );
    }

    #[test]
    fn connections_are_opened_on_demand_unless_set() {
        let pg = "[database]\nurl = \"postgres://u@h/db\"\n";
        assert_eq!(Config::from_toml(pg).unwrap().database.pool_min(), 0);
        let cfg = Config::from_toml(&format!("{pg}min_connections = 10")).unwrap();
        assert_eq!(cfg.database.pool_min(), 10, "the whole pool");
        let cfg =
            Config::from_toml(&format!("{pg}max_connections = 3\nmin_connections = 3")).unwrap();
        assert_eq!(cfg.database.pool_min(), 3);
        assert_eq!(Config::from_toml("").unwrap().database.pool_min(), 0);
        for bad in [
            format!("{pg}min_connections = 11"),
            format!("{pg}max_connections = 3\nmin_connections = 4"),
            "[database]\nmin_connections = 2".to_string(),
        ] {
            let err = Config::from_toml(&bad).unwrap_err().to_string();
            assert!(err.contains("database.min_connections"), "{bad}: {err}");
        }
    }

    #[test]
    fn unknown_key_is_named() {
        let err = Config::from_toml("[server]\ngrpc_adr = \"1.2.3.4:1\"").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("grpc_adr"), "{msg}");
    }

    #[test]
    fn bad_duration_names_key() {
        let err = Config::from_toml("[delivery]\ntimeout = \"15 parsecs\"").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("delivery.timeout"), "{msg}");
    }

    #[test]
    fn tls_settings_are_checked_naming_the_key() {
        let err = |toml: &str| Config::from_toml(toml).unwrap_err().to_string();
        let e = err("[server.tls]\ncert_file = \"c.pem\"");
        assert!(e.contains("server.tls.key_file"), "{e}");
        let e = err("[server.tls]\nclient_auth = \"required\"");
        assert!(
            e.contains("server.tls.client_auth") && e.contains("cert_file"),
            "{e}"
        );
        let tls = "[server.tls]\ncert_file = \"c\"\nkey_file = \"k\"\n";
        let e = err(&format!("{tls}client_auth = \"required\""));
        assert!(e.contains("server.tls.client_ca_file"), "{e}");
        let e = err(&format!("{tls}client_ca_file = \"ca\""));
        assert!(
            e.contains("server.tls.client_ca_file") && e.contains("off"),
            "{e}"
        );
        let e = err(&format!("{tls}client_auth = \"sometimes\""));
        assert!(e.contains("client_auth"), "{e}");
        let mtls = format!("{tls}client_auth = \"optional\"\nclient_ca_file = \"ca\"\n");
        let e = err(&format!(
            "{mtls}[[server.tls.client_tenants]]\ntenant = \"t\"\nsan_dns = \"a\"\nsan_uri = \"b\""
        ));
        assert!(
            e.contains("server.tls.client_tenants[0]") && e.contains("exactly one"),
            "{e}"
        );
        let e = err(&format!(
            "{mtls}[[server.tls.client_tenants]]\ntenant = \"\"\nsan_dns = \"a\""
        ));
        assert!(e.contains("server.tls.client_tenants[0].tenant"), "{e}");
        let e = err(&format!(
            "{mtls}[[server.tls.client_tenants]]\ntenant = \"a\"\nsan_dns = \"x\"\n[[server.tls.client_tenants]]\ntenant = \"b\"\nsan_dns = \"X\""
        ));
        assert!(
            e.contains("server.tls.client_tenants[1]") && e.contains("repeats"),
            "{e}"
        );
        let ok = Config::from_toml(&format!(
            "{mtls}[[server.tls.client_tenants]]\ntenant = \"a\"\nsubject = \"CN=a\""
        ))
        .unwrap();
        assert_eq!(ok.server.tls.client_tenants.len(), 1);
        assert!(!Config::from_toml("").unwrap().server.tls.enabled());
    }

    #[test]
    fn invalid_value_names_key() {
        let err = Config::from_toml("[delivery]\njitter = 1.5").unwrap_err();
        assert!(err.to_string().contains("delivery.jitter"));
        let err = Config::from_toml("[storage.r]\nkind = \"r2\"\nbucket = \"b\"").unwrap_err();
        assert!(err.to_string().contains("storage.r.endpoint"), "{err}");
        for (toml, key) in [
            ("[verify]\nhead_rate = -1", "verify.head_rate"),
            ("[verify]\nhead_rate = nan", "verify.head_rate"),
            ("[verify]\nhead_burst = 0", "verify.head_burst"),
        ] {
            let err = Config::from_toml(toml).unwrap_err();
            assert!(err.to_string().contains(key), "{toml}: {err}");
        }
        for bad in ["0", "65"] {
            let err =
                Config::from_toml(&format!("[worker]\nwrite_concurrency = {bad}")).unwrap_err();
            assert!(
                err.to_string().contains("worker.write_concurrency"),
                "{err}"
            );
        }
        for bad in ["0", "1001"] {
            let err = Config::from_toml(&format!("[worker]\nwrite_batch_max = {bad}")).unwrap_err();
            assert!(err.to_string().contains("worker.write_batch_max"), "{err}");
        }
        let cfg = Config::from_toml("[worker]\nwrite_batch_max = 1").unwrap();
        assert_eq!(cfg.worker.write_batch_max, 1);
        let err = Config::from_toml("[worker]\nwrite_linger = \"51ms\"").unwrap_err();
        assert!(err.to_string().contains("worker.write_linger"), "{err}");
        let cfg = Config::from_toml("[worker]\nwrite_linger = \"2ms\"").unwrap();
        assert_eq!(cfg.worker.write_linger, Duration::from_millis(2));
        // A linger with nothing to group is a mistake, not a silent no-op.
        let err = Config::from_toml("[worker]\nwrite_linger = \"2ms\"\nwrite_batch_max = 1")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("worker.write_linger") && err.contains("write_batch_max"),
            "{err}"
        );
        Config::from_toml("[worker]\nwrite_linger = \"0ms\"\nwrite_batch_max = 1").unwrap();
        assert_eq!(
            Config::from_toml("").unwrap().worker.write_linger,
            Duration::ZERO
        );
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(
            parse_duration("7d").unwrap(),
            Duration::from_secs(7 * 86400)
        );
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("5y").is_err());
        assert!(parse_duration("s").is_err());
    }

    #[test]
    fn allow_cidrs_are_validated_and_named() {
        let err = Config::from_toml("[delivery]\nallow_cidrs = [\"10.0.0.0/8\", \"10.0.0.1/33\"]")
            .unwrap_err()
            .to_string();
        assert!(err.contains("delivery.allow_cidrs"), "{err}");
        assert!(err.contains("10.0.0.1/33"), "{err}");
        let err = Config::from_toml("[delivery]\nallow_cidrs = \"10.0.0.0/8\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("delivery.allow_cidrs"), "{err}");
        let cfg =
            Config::from_toml("[delivery]\nallow_cidrs = [\"10.1.0.0/16\", \"::1/128\"]").unwrap();
        assert_eq!(
            cfg.delivery_allow_list().to_string(),
            "[10.1.0.0/16, ::1/128]"
        );
        assert!(!cfg.dev_loopback_allowed());
    }

    #[test]
    fn loopback_is_allowed_by_default_only_with_the_embedded_server() {
        let dev = Config::from_toml("").unwrap();
        assert!(dev.dev_loopback_allowed());
        assert_eq!(dev.delivery_allow_list(), AllowList::loopback());
        // Set explicitly, even to nothing, the list is exactly that.
        let strict = Config::from_toml("[delivery]\nallow_cidrs = []").unwrap();
        assert!(!strict.dev_loopback_allowed());
        assert!(strict.delivery_allow_list().is_empty());
        let prod = Config::from_toml(
            "[storage.main]\nkind = \"s3\"\nbucket = \"b\"\nregion = \"eu-west-1\"",
        )
        .unwrap();
        assert!(!prod.dev_loopback_allowed());
        assert!(prod.delivery_allow_list().is_empty());
    }

    #[test]
    fn encryption_keys_come_from_the_environment_and_are_validated() {
        let entry = crate::secrets::Keyring::generate_entry("k2");
        let spec = format!("{entry},{}", crate::secrets::Keyring::generate_entry("k1"));
        // A prefix of this test's own, so that no other test sees it.
        // SAFETY: no other thread reads these variables.
        unsafe { std::env::set_var("UHTEST_ENCKEYS_ENCRYPTION__KEYS", &spec) };
        let cfg = Config::load_from(None, Env::prefixed("UHTEST_ENCKEYS_").split("__")).unwrap();
        assert_eq!(cfg.encryption.keys.expose_secret(), spec);
        let ring = crate::secrets::Keyring::parse(cfg.encryption.keys.expose_secret()).unwrap();
        assert_eq!(ring.ids().collect::<Vec<_>>(), ["k2", "k1"]);
        unsafe { std::env::set_var("UHTEST_ENCKEYS_ENCRYPTION__KEYS", "k1:c2hvcnQ=") };
        let err = Config::load_from(None, Env::prefixed("UHTEST_ENCKEYS_").split("__"))
            .unwrap_err()
            .to_string();
        unsafe { std::env::remove_var("UHTEST_ENCKEYS_ENCRYPTION__KEYS") };
        assert!(err.contains("encryption.keys"), "{err}");
        assert!(!err.contains("c2hvcnQ"), "{err}");
    }

    #[test]
    fn configured_storage_disables_embedded_in_auto() {
        let cfg = Config::from_toml(
            "[storage.main]\nkind = \"s3\"\nbucket = \"b\"\nregion = \"eu-west-1\"",
        )
        .unwrap();
        assert!(!cfg.embedded_s3_enabled());
    }
}
