//! TLS and mutual TLS on the gRPC and HTTP listeners (`server.tls`).
//!
//! One acceptor serves both: it accepts TCP, runs each handshake in its own
//! task (a slow or silent client never holds up the accept loop), and hands
//! finished connections to tonic (`serve_with_incoming`) or axum (a
//! `Listener`). Each connection carries a [`PeerInfo`]: the peer address
//! and, when the client sent a certificate that chains to the configured
//! CA, its subject and subject alternative names. The API turns that into a
//! tenant through `server.tls.client_tenants` ([`ClientTenants`]).
//!
//! The certificate, key and CA files are checked for changes every
//! `reload_every` and loaded again, so a renewed certificate is served
//! without a restart; a broken new file is reported and the last good
//! configuration stays.

use std::{
    io,
    net::SocketAddr,
    path::{Path, PathBuf},
    pin::Pin,
    sync::{Arc, RwLock},
    task::{Context, Poll},
    time::{Duration, SystemTime},
};

use rustls::{
    RootCertStore, ServerConfig,
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::WebPkiClientVerifier,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::mpsc,
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use x509_cert::{
    Certificate,
    der::Decode,
    ext::pkix::{SubjectAltName, name::GeneralName},
};

use crate::{
    config::{ClientAuth, ClientTenant, TlsConfig},
    domain::TenantId,
};

/// How long a client has to finish its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Finished handshakes waiting for the server to take them.
const BACKLOG: usize = 256;

/// What the server knows of a connection's peer. A request extension on
/// every call that came over TLS (gRPC directly; REST through the
/// gateway, wrapped in axum's `ConnectInfo`).
#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub remote_addr: SocketAddr,
    /// The verified client certificate, when one was sent.
    pub client: Option<Arc<ClientCert>>,
}

/// The names of a verified client certificate.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClientCert {
    /// The subject distinguished name, RFC 4514 (`CN=billing,O=Acme`).
    pub subject: String,
    pub dns_names: Vec<String>,
    pub uris: Vec<String>,
}

impl ClientCert {
    /// Reads the names of a DER certificate (already verified by rustls).
    pub fn parse(der: &[u8]) -> Result<ClientCert, String> {
        let cert = Certificate::from_der(der).map_err(|e| format!("certificate: {e}"))?;
        let tbs = cert.tbs_certificate();
        let mut names = ClientCert {
            subject: tbs.subject().to_string(),
            ..ClientCert::default()
        };
        let san = tbs
            .get_extension::<SubjectAltName>()
            .map_err(|e| format!("subject alternative names: {e}"))?;
        for name in san.map(|(_, san)| san.0).unwrap_or_default() {
            match name {
                GeneralName::DnsName(dns) => names.dns_names.push(dns.to_string()),
                GeneralName::UniformResourceIdentifier(uri) => names.uris.push(uri.to_string()),
                _ => {}
            }
        }
        Ok(names)
    }

    /// A short description for errors and logs (names are not secret).
    pub fn describe(&self) -> String {
        let mut parts = vec![format!("subject `{}`", self.subject)];
        parts.extend(self.dns_names.iter().map(|d| format!("DNS `{d}`")));
        parts.extend(self.uris.iter().map(|u| format!("URI `{u}`")));
        parts.join(", ")
    }
}

/// The peer of a request, from either transport.
pub fn peer_of(extensions: &http::Extensions) -> Option<&PeerInfo> {
    extensions.get::<PeerInfo>().or_else(|| {
        extensions
            .get::<axum::extract::ConnectInfo<PeerInfo>>()
            .map(|c| &c.0)
    })
}

/// `server.tls.client_tenants` with the tenant names resolved to ids.
#[derive(Debug, Clone, Default)]
pub struct ClientTenants {
    entries: Vec<(Matcher, TenantId)>,
}

#[derive(Debug, Clone)]
enum Matcher {
    Subject(String),
    Dns(String),
    Uri(String),
}

impl ClientTenants {
    /// `resolved` holds the tenant id of each entry, in order.
    pub fn new(entries: &[ClientTenant], resolved: Vec<TenantId>) -> ClientTenants {
        let entries = entries
            .iter()
            .zip(resolved)
            .filter_map(|(e, tenant)| {
                let matcher = match (&e.subject, &e.san_dns, &e.san_uri) {
                    (Some(s), _, _) => Matcher::Subject(normalize_dn(s)),
                    (_, Some(d), _) => Matcher::Dns(d.trim().to_ascii_lowercase()),
                    (_, _, Some(u)) => Matcher::Uri(u.trim().to_string()),
                    _ => return None, // refused by config validation
                };
                Some((matcher, tenant))
            })
            .collect();
        ClientTenants { entries }
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The tenant of the first entry the certificate matches. DNS names
    /// compare without case; subjects without spaces after separators;
    /// URIs exactly.
    pub fn tenant_for(&self, cert: &ClientCert) -> Option<&TenantId> {
        let subject = normalize_dn(&cert.subject);
        self.entries
            .iter()
            .find(|(m, _)| match m {
                Matcher::Subject(s) => *s == subject,
                Matcher::Dns(d) => cert.dns_names.iter().any(|n| n.eq_ignore_ascii_case(d)),
                Matcher::Uri(u) => cert.uris.iter().any(|n| n == u),
            })
            .map(|(_, t)| t)
    }
}

/// `CN=a, O=b` and `CN=a,O=b` are the same name.
fn normalize_dn(dn: &str) -> String {
    dn.split(',').map(str::trim).collect::<Vec<_>>().join(",")
}

/// Which listener a configuration is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    /// gRPC: HTTP/2 only; with `client_auth = "required"` the handshake
    /// itself fails without a client certificate.
    Grpc,
    /// HTTP/1.1: probes and scrapers cannot present certificates, so the
    /// handshake only asks for one; the REST routes then require it.
    Http,
}

/// The TLS configurations of both listeners, loaded from the files and
/// reloaded when they change.
pub struct Tls {
    files: Files,
    client_auth: ClientAuth,
    grpc: RwLock<Arc<ServerConfig>>,
    http: RwLock<Arc<ServerConfig>>,
    stamp: RwLock<Vec<Option<SystemTime>>>,
}

#[derive(Debug, Clone)]
struct Files {
    cert: PathBuf,
    key: PathBuf,
    client_ca: Option<PathBuf>,
}

impl Files {
    fn all(&self) -> Vec<&Path> {
        let mut v = vec![self.cert.as_path(), self.key.as_path()];
        v.extend(self.client_ca.as_deref());
        v
    }

    fn stamp(&self) -> Vec<Option<SystemTime>> {
        self.all()
            .iter()
            .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
            .collect()
    }
}

impl Tls {
    /// Loads the files; None when `server.tls.cert_file` is empty. Every
    /// error names the key of the file at fault.
    pub fn load(cfg: &TlsConfig) -> anyhow::Result<Option<Arc<Tls>>> {
        if !cfg.enabled() {
            return Ok(None);
        }
        let files = Files {
            cert: PathBuf::from(&cfg.cert_file),
            key: PathBuf::from(&cfg.key_file),
            client_ca: (!cfg.client_ca_file.is_empty()).then(|| PathBuf::from(&cfg.client_ca_file)),
        };
        let stamp = files.stamp();
        let (grpc, http) = build(&files, cfg.client_auth)?;
        Ok(Some(Arc::new(Tls {
            files,
            client_auth: cfg.client_auth,
            grpc: RwLock::new(grpc),
            http: RwLock::new(http),
            stamp: RwLock::new(stamp),
        })))
    }

    pub fn client_auth(&self) -> ClientAuth {
        self.client_auth
    }

    fn config(&self, listener: Listener) -> Arc<ServerConfig> {
        let lock = match listener {
            Listener::Grpc => &self.grpc,
            Listener::Http => &self.http,
        };
        lock.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Loads the files again if any changed since the last load. Returns
    /// whether a new configuration is in use.
    pub fn reload_if_changed(&self) -> anyhow::Result<bool> {
        let stamp = self.files.stamp();
        if *self.stamp.read().unwrap_or_else(|e| e.into_inner()) == stamp {
            return Ok(false);
        }
        // Remember the stamp even when loading fails, so that a broken
        // file is reported once, not at every check.
        *self.stamp.write().unwrap_or_else(|e| e.into_inner()) = stamp;
        let (grpc, http) = build(&self.files, self.client_auth)?;
        *self.grpc.write().unwrap_or_else(|e| e.into_inner()) = grpc;
        *self.http.write().unwrap_or_else(|e| e.into_inner()) = http;
        Ok(true)
    }

    /// Checks the files every `every` until `shutdown`.
    pub async fn watch(self: Arc<Self>, every: Duration, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let this = self.clone();
            match tokio::task::spawn_blocking(move || this.reload_if_changed()).await {
                Ok(Ok(true)) => info!("TLS certificate files changed; new connections use them"),
                Ok(Ok(false)) => {}
                Ok(Err(e)) => warn!(
                    error = format!("{e:#}"),
                    "TLS files changed but cannot be loaded; still serving the previous ones"
                ),
                Err(e) => warn!(error = %e, "TLS reload task failed"),
            }
        }
    }

    /// Accepts TLS connections on `listener` until `shutdown`.
    pub fn incoming(
        self: &Arc<Self>,
        listener: TcpListener,
        which: Listener,
        shutdown: CancellationToken,
    ) -> io::Result<Incoming> {
        let local_addr = listener.local_addr()?;
        let (tx, rx) = mpsc::channel(BACKLOG);
        let tls = self.clone();
        tokio::spawn(async move {
            loop {
                let (tcp, remote_addr) = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok(a) => a,
                        Err(e) => {
                            // Out of file descriptors, say: wait, go on.
                            warn!(error = %e, "accepting a connection failed");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    },
                };
                let _ = tcp.set_nodelay(true);
                let acceptor = TlsAcceptor::from(tls.config(which));
                let tx = tx.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            let client = client_cert(&stream);
                            let conn = TlsConn {
                                stream,
                                peer: PeerInfo {
                                    remote_addr,
                                    client,
                                },
                            };
                            let _ = tx.send(conn).await;
                        }
                        Ok(Err(e)) => debug!(%remote_addr, error = %e, "TLS handshake failed"),
                        Err(_) => debug!(%remote_addr, "TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(Incoming { rx, local_addr })
    }
}

/// The names of the client certificate of a finished handshake.
fn client_cert(stream: &TlsStream<TcpStream>) -> Option<Arc<ClientCert>> {
    let leaf = stream.get_ref().1.peer_certificates()?.first()?;
    match ClientCert::parse(leaf) {
        Ok(c) => Some(Arc::new(c)),
        Err(e) => {
            // rustls verified it, so this is a certificate x509-cert cannot
            // read: the connection goes on without a client identity.
            warn!(error = %e, "client certificate verified but unreadable");
            None
        }
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn build(
    files: &Files,
    client_auth: ClientAuth,
) -> anyhow::Result<(Arc<ServerConfig>, Arc<ServerConfig>)> {
    use anyhow::Context as _;
    let chain = CertificateDer::pem_file_iter(&files.cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| pem_error("server.tls.cert_file", &files.cert, e))?;
    if chain.is_empty() {
        anyhow::bail!(
            "server.tls.cert_file: {} holds no PEM certificate",
            files.cert.display()
        );
    }
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| pem_error("server.tls.key_file", &files.key, e))?;
    let roots = match &files.client_ca {
        None => None,
        Some(path) => {
            let mut roots = RootCertStore::empty();
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|e| pem_error("server.tls.client_ca_file", path, e))?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                anyhow::bail!(
                    "server.tls.client_ca_file: {} holds no usable CA certificate",
                    path.display()
                );
            }
            Some(Arc::new(roots))
        }
    };
    let one = |which: Listener| -> anyhow::Result<Arc<ServerConfig>> {
        let builder = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?;
        let builder = match (&roots, client_auth) {
            (Some(roots), ClientAuth::Optional | ClientAuth::Required) => {
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(roots.clone(), provider());
                let verifier = if client_auth == ClientAuth::Required && which == Listener::Grpc {
                    verifier
                } else {
                    verifier.allow_unauthenticated()
                };
                builder.with_client_cert_verifier(
                    verifier
                        .build()
                        .context("server.tls.client_ca_file: building the client verifier")?,
                )
            }
            _ => builder.with_no_client_auth(),
        };
        let mut config = builder
            .with_single_cert(chain.clone(), key.clone_key())
            .context("server.tls.key_file: the key does not fit server.tls.cert_file")?;
        config.alpn_protocols = match which {
            Listener::Grpc => vec![b"h2".to_vec()],
            Listener::Http => vec![b"http/1.1".to_vec()],
        };
        Ok(Arc::new(config))
    };
    Ok((one(Listener::Grpc)?, one(Listener::Http)?))
}

fn pem_error(key: &str, path: &Path, e: rustls::pki_types::pem::Error) -> anyhow::Error {
    match e {
        rustls::pki_types::pem::Error::Io(io) => {
            anyhow::anyhow!("{key}: cannot read {}: {io}", path.display())
        }
        rustls::pki_types::pem::Error::NoItemsFound => {
            anyhow::anyhow!(
                "{key}: {} holds no PEM item of the right kind",
                path.display()
            )
        }
        other => anyhow::anyhow!("{key}: {} is not valid PEM: {other:?}", path.display()),
    }
}

/// A finished TLS connection and what is known of its peer.
pub struct TlsConn {
    stream: TlsStream<TcpStream>,
    peer: PeerInfo,
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

impl tonic::transport::server::Connected for TlsConn {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.peer.clone()
    }
}

/// The finished connections of one listener.
pub struct Incoming {
    rx: mpsc::Receiver<TlsConn>,
    local_addr: SocketAddr,
}

impl Incoming {
    /// For tonic's `serve_with_incoming`.
    pub fn into_stream(self) -> impl futures_util::Stream<Item = io::Result<TlsConn>> {
        use futures_util::StreamExt;
        tokio_stream::wrappers::ReceiverStream::new(self.rx).map(Ok::<_, io::Error>)
    }
}

impl axum::serve::Listener for Incoming {
    type Io = TlsConn;
    type Addr = PeerInfo;

    async fn accept(&mut self) -> (TlsConn, PeerInfo) {
        match self.rx.recv().await {
            Some(conn) => {
                let peer = conn.peer.clone();
                (conn, peer)
            }
            // The acceptor stopped (shutdown): accept nothing more.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<PeerInfo> {
        Ok(PeerInfo {
            remote_addr: self.local_addr,
            client: None,
        })
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, Incoming>>
    for PeerInfo
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, Incoming>) -> PeerInfo {
        stream.remote_addr().clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(subject: &[(rcgen::DnType, &str)], dns: &[&str], uris: &[&str]) -> Vec<u8> {
        let mut params =
            rcgen::CertificateParams::new(dns.iter().map(|d| d.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        for (t, v) in subject {
            params.distinguished_name.push(t.clone(), *v);
        }
        for u in uris {
            params
                .subject_alt_names
                .push(rcgen::SanType::URI((*u).try_into().unwrap()));
        }
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    fn entry(
        tenant: &str,
        subject: Option<&str>,
        dns: Option<&str>,
        uri: Option<&str>,
    ) -> ClientTenant {
        ClientTenant {
            tenant: tenant.into(),
            subject: subject.map(Into::into),
            san_dns: dns.map(Into::into),
            san_uri: uri.map(Into::into),
        }
    }

    #[test]
    fn reads_subject_in_rfc4514_order_and_both_kinds_of_san() {
        let der = cert(
            &[
                (rcgen::DnType::CountryName, "DE"),
                (rcgen::DnType::OrganizationName, "Acme"),
                (rcgen::DnType::CommonName, "billing"),
            ],
            &["billing.internal", "billing"],
            &["spiffe://cluster.local/ns/billing/sa/api"],
        );
        let c = ClientCert::parse(&der).unwrap();
        assert_eq!(c.subject, "CN=billing,O=Acme,C=DE");
        assert_eq!(c.dns_names, vec!["billing.internal", "billing"]);
        assert_eq!(c.uris, vec!["spiffe://cluster.local/ns/billing/sa/api"]);
        assert!(ClientCert::parse(b"not der").is_err());
    }

    #[test]
    fn first_matching_entry_decides_the_tenant() {
        let entries = [
            entry("by-uri", None, None, Some("spiffe://a/b")),
            entry("by-subject", Some("CN=ops, O=Acme"), None, None),
            entry("by-dns", None, Some("Media.Internal"), None),
            entry("second-dns", None, Some("media.internal"), None),
        ];
        let ids: Vec<TenantId> = ["t1", "t2", "t3", "t4"]
            .iter()
            .map(|t| TenantId::from_trusted(t.to_string()))
            .collect();
        let map = ClientTenants::new(&entries, ids);
        let of = |subject: &str, dns: &[&str], uris: &[&str]| {
            map.tenant_for(&ClientCert {
                subject: subject.into(),
                dns_names: dns.iter().map(|s| s.to_string()).collect(),
                uris: uris.iter().map(|s| s.to_string()).collect(),
            })
            .map(|t| t.as_str().to_string())
        };
        assert_eq!(of("CN=x", &[], &["spiffe://a/b"]).as_deref(), Some("t1"));
        // URIs compare exactly.
        assert_eq!(of("CN=x", &[], &["SPIFFE://a/b"]), None);
        assert_eq!(of("CN=ops,O=Acme", &[], &[]).as_deref(), Some("t2"));
        // Order of RDNs matters: this is another name.
        assert_eq!(of("O=Acme,CN=ops", &[], &[]), None);
        assert_eq!(of("CN=m", &["MEDIA.internal"], &[]).as_deref(), Some("t3"));
        assert_eq!(of("CN=nobody", &["other.internal"], &[]), None);
    }
}
