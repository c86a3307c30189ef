//! TLS and mutual TLS on both listeners: a real CA, real handshakes
//! (rustls on both sides), certificates mapped to tenants, and a renewed
//! certificate picked up without a restart.

use std::{sync::Arc, time::Duration};

use hyper_util::rt::TokioIo;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType, IsCa, KeyPair,
    SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject};
use tokio::net::TcpStream;
use tonic::{
    Code,
    transport::{Channel, Endpoint},
};
use uploadhook::proto::{self, Status, webhook_service_client::WebhookServiceClient};

use crate::helpers::{Backend, Receiver, TestApp, TestDb, authed, create_request, upload};

/// A test CA, and the files of a server certificate for 127.0.0.1.
struct Pki {
    dir: tempfile::TempDir,
    ca: CertifiedIssuer<'static, KeyPair>,
}

/// A client's certificate and key, PEM.
struct ClientId {
    cert: String,
    key: String,
}

impl Pki {
    fn new(name: &str) -> Pki {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        let pki = Pki {
            dir: tempfile::tempdir().unwrap(),
            ca,
        };
        std::fs::write(pki.path("ca.pem"), pki.ca.pem()).unwrap();
        pki.write_server_cert("server one");
        pki
    }

    fn path(&self, file: &str) -> String {
        self.dir.path().join(file).display().to_string()
    }

    /// (Re)writes server.pem and server.key: a certificate for 127.0.0.1
    /// and `localhost` whose organisation is `org` (to tell two apart).
    fn write_server_cert(&self, org: &str) -> CertificateDer<'static> {
        let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        params
            .subject_alt_names
            .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
        params
            .distinguished_name
            .push(DnType::OrganizationName, org);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        // Key first: a reload that sees the new certificate with the old
        // key would fail (and keep the old pair, which is also correct).
        write_atomically(&self.path("server.key"), &key.serialize_pem());
        write_atomically(&self.path("server.pem"), &cert.pem());
        cert.der().clone()
    }

    fn client(&self, cn: &str, dns: Option<&str>, uri: Option<&str>) -> ClientId {
        let mut params =
            CertificateParams::new(dns.map(str::to_string).into_iter().collect::<Vec<_>>())
                .unwrap();
        // Most significant first, as `openssl req -subj /O=Acme/CN=…` does:
        // RFC 4514 prints it `CN=…,O=Acme`. (rcgen starts with a CN.)
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::OrganizationName, "Acme");
        params.distinguished_name.push(DnType::CommonName, cn);
        if let Some(uri) = uri {
            params
                .subject_alt_names
                .push(SanType::URI(uri.try_into().unwrap()));
        }
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        ClientId {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }

    /// The `[server.tls]` layer for this PKI.
    fn config(&self, client_auth: &str, extra: &str) -> String {
        let ca = if client_auth == "off" {
            String::new()
        } else {
            self.path("ca.pem")
        };
        format!(
            "[server.tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\nclient_auth = \"{client_auth}\"\nclient_ca_file = \"{ca}\"\n{extra}",
            self.path("server.pem"),
            self.path("server.key"),
        )
    }
}

fn write_atomically(path: &str, text: &str) {
    let tmp = format!("{path}.tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A rustls client that trusts `ca`, with an optional client identity.
fn client_config(ca_pem: &str, id: Option<&ClientId>, alpn: &[u8]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let mut config = match id {
        Some(id) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(id.cert.as_bytes()).unwrap()],
                PrivateKeyDer::from_pem_slice(id.key.as_bytes()).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![alpn.to_vec()];
    Arc::new(config)
}

/// A gRPC channel over TLS to the app.
async fn tls_channel(
    app: &TestApp,
    ca_pem: &str,
    id: Option<&ClientId>,
) -> Result<WebhookServiceClient<Channel>, tonic::transport::Error> {
    let config = client_config(ca_pem, id, b"h2");
    let addr = app.grpc_addr;
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_| {
            let config = config.clone();
            async move {
                let tcp = TcpStream::connect(addr).await?;
                let tls = tokio_rustls::TlsConnector::from(config)
                    .connect(ServerName::try_from("localhost").unwrap(), tcp)
                    .await?;
                Ok::<_, std::io::Error>(TokioIo::new(tls))
            }
        }))
        .await?;
    Ok(WebhookServiceClient::new(channel))
}

/// `msg` as a request, with `key` as its API key when given.
fn request<T>(key: Option<&str>, msg: T) -> tonic::Request<T> {
    match key {
        Some(key) => authed(key, msg),
        None => tonic::Request::new(msg),
    }
}

/// Creates, uploads and confirms a webhook over `client`, then waits until
/// it is delivered. Returns its id.
async fn deliver(
    client: &mut WebhookServiceClient<Channel>,
    key: Option<&str>,
    url: &str,
) -> String {
    let created = client
        .create_upload_webhook(request(key, create_request(url, "a.txt")))
        .await
        .unwrap()
        .into_inner();
    upload(&created, b"hello").await;
    let id = created.webhook.as_ref().unwrap().id.clone();
    let confirm = proto::ConfirmRequest {
        webhook_id: id.clone(),
        ..Default::default()
    };
    client.confirm(request(key, confirm)).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let get = proto::GetStatusRequest {
            webhook_id: id.clone(),
        };
        let w = client
            .get_status(request(key, get))
            .await
            .unwrap()
            .into_inner();
        if w.webhook.unwrap().status == Status::Completed as i32 {
            return id;
        }
        assert!(tokio::time::Instant::now() < deadline, "not delivered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An HTTPS client for the REST gateway.
fn https_client(ca_pem: &str, id: Option<&ClientId>) -> reqwest::Client {
    let mut builder = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(ca_pem.as_bytes()).unwrap()]);
    if let Some(id) = id {
        builder = builder.identity(
            reqwest::Identity::from_pem(format!("{}{}", id.cert, id.key).as_bytes()).unwrap(),
        );
    }
    builder.build().unwrap()
}

/// One GetStatus of an unknown id over a new TLS channel, without key.
async fn one_call(app: &TestApp, ca: &str, id: Option<&ClientId>) -> Result<(), String> {
    tls_channel(app, ca, id)
        .await
        .map_err(|e| format!("connect: {e:?}"))?
        .get_status(tonic::Request::new(proto::GetStatusRequest {
            webhook_id: format!("wh_{}", "0".repeat(32)),
        }))
        .await
        .map(drop)
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
}

async fn sqlite() -> TestDb {
    TestDb::new(Backend::Sqlite).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_serves_grpc_and_rest_and_refuses_plain_text() {
    let db = sqlite().await;
    let pki = Pki::new("uploadhook test CA");
    let mut app = TestApp::start(&db, &pki.config("off", "")).await;
    let ca = pki.ca.pem();
    let rx = Receiver::start().await;

    // A whole flow over gRPC with TLS, authenticated by API key.
    let mut client = tls_channel(&app, &ca, None).await.unwrap();
    let id = deliver(&mut client, Some(&app.key_a), &rx.url).await;
    let status = || {
        authed(
            &app.key_a,
            proto::GetStatusRequest {
                webhook_id: id.clone(),
            },
        )
    };

    // REST over HTTPS (127.0.0.1 is in the certificate's IP names).
    let https = https_client(&ca, None);
    let base = format!("https://127.0.0.1:{}", app.http_addr.port());
    let r = https.get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = https
        .get(format!("{base}/v1/webhooks/{id}"))
        .bearer_auth(&app.key_a)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("COMPLETED"));

    // Plain text is refused on both listeners.
    let plain = reqwest::Client::new()
        .get(app.http_url("/healthz"))
        .send()
        .await;
    assert!(plain.is_err(), "plain HTTP answered: {plain:?}");
    let plain_grpc = async {
        WebhookServiceClient::connect(format!("http://{}", app.grpc_addr))
            .await?
            .get_status(status())
            .await
            .map_err(|s| anyhow_status(&s))?;
        Ok::<_, Box<dyn std::error::Error>>(())
    }
    .await;
    assert!(plain_grpc.is_err(), "plain gRPC answered");

    // A client that does not trust the server's CA refuses it.
    let other = Pki::new("another CA");
    assert!(tls_channel(&app, &other.ca.pem(), None).await.is_err());
    app.stop().await;
    db.cleanup().await;
}

fn anyhow_status(s: &tonic::Status) -> Box<dyn std::error::Error> {
    format!("{s:?}").into()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_maps_client_certificates_to_tenants() {
    let db = sqlite().await;
    let pki = Pki::new("uploadhook test CA");
    let tenants = r#"
[[server.tls.client_tenants]]
tenant = "billing"
san_uri = "spiffe://cluster.local/ns/billing/sa/api"
[[server.tls.client_tenants]]
tenant = "ops"
subject = "CN=ops, O=Acme"
[[server.tls.client_tenants]]
tenant = "media"
san_dns = "Media.Internal"
"#;
    let mut app = TestApp::start(&db, &pki.config("required", tenants)).await;
    let ca = pki.ca.pem();
    let rx = Receiver::start().await;
    let billing = pki.client(
        "billing-api",
        None,
        Some("spiffe://cluster.local/ns/billing/sa/api"),
    );
    let ops = pki.client("ops", None, None);
    let media = pki.client("media-worker", Some("media.internal"), None);
    let stranger = pki.client("stranger", Some("stranger.internal"), None);

    // No certificate: the gRPC handshake fails (not the API's check).
    let no_cert = one_call(&app, &ca, None).await.unwrap_err();
    assert!(!no_cert.contains("Unauthenticated"), "{no_cert}");

    // A certificate from another CA: refused at the handshake too.
    let other = Pki::new("another CA");
    let forged = other.client(
        "billing-api",
        None,
        Some("spiffe://cluster.local/ns/billing/sa/api"),
    );
    let forged = one_call(&app, &ca, Some(&forged)).await.unwrap_err();
    assert!(!forged.contains("Unauthenticated"), "{forged}");
    // (The same call with a good certificate reaches the API.)
    let mapped = one_call(&app, &ca, Some(&billing)).await.unwrap_err();
    assert!(mapped.contains("NotFound"), "{mapped}");

    // billing's certificate, no API key: the webhook is billing's.
    let mut as_billing = tls_channel(&app, &ca, Some(&billing)).await.unwrap();
    let id = deliver(&mut as_billing, None, &rx.url).await;
    let get = |id: &str| proto::GetStatusRequest {
        webhook_id: id.to_string(),
    };
    assert_eq!(rx.received().len(), 1);

    // It is billing's: another tenant's key does not see it, even over
    // billing's connection (a key, when sent, decides the tenant) ...
    let err = as_billing
        .get_status(authed(&app.key_a, get(&id)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    // ... and billing's own API key does.
    let billing_key = app
        .store()
        .create_api_key("billing", chrono::Utc::now())
        .await
        .unwrap()
        .plaintext;
    let mut as_ops = tls_channel(&app, &ca, Some(&ops)).await.unwrap();
    let w = as_ops
        .get_status(authed(&billing_key, get(&id)))
        .await
        .unwrap()
        .into_inner()
        .webhook
        .unwrap();
    assert_eq!(w.status, Status::Completed as i32);

    // ops (by subject) and media (by DNS name, any case) are other tenants.
    let err = as_ops
        .get_status(tonic::Request::new(get(&id)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    let mut as_media = tls_channel(&app, &ca, Some(&media)).await.unwrap();
    let err = as_media
        .get_status(tonic::Request::new(get(&id)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");

    // A trusted certificate that maps to no tenant, without a key.
    let mut as_stranger = tls_channel(&app, &ca, Some(&stranger)).await.unwrap();
    let err = as_stranger
        .get_status(tonic::Request::new(get(&id)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(
        err.message().contains("server.tls.client_tenants")
            && err.message().contains("stranger.internal"),
        "{err:?}"
    );

    // REST: probes need no certificate; the API does.
    let base = format!("https://127.0.0.1:{}", app.http_addr.port());
    let anonymous = https_client(&ca, None);
    let r = anonymous
        .get(format!("{base}/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = anonymous
        .get(format!("{base}/v1/webhooks/{id}"))
        .bearer_auth(&billing_key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(
        r.text()
            .await
            .unwrap()
            .contains("client certificate is required")
    );
    let r = https_client(&ca, Some(&billing))
        .get(format!("{base}/v1/webhooks/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains(&id));

    app.stop().await;
    db.cleanup().await;
}

/// The leaf certificate a fresh TLS connection to `addr` is served.
async fn served_cert(
    addr: std::net::SocketAddr,
    ca_pem: &str,
    alpn: &[u8],
) -> CertificateDer<'static> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(client_config(ca_pem, None, alpn))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0]
        .clone()
        .into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_certificate_is_served_without_a_restart() {
    let db = sqlite().await;
    let pki = Pki::new("uploadhook test CA");
    let mut app = TestApp::start(&db, &pki.config("off", "reload_every = \"100ms\"\n")).await;
    let ca = pki.ca.pem();
    let first = served_cert(app.http_addr, &ca, b"http/1.1").await;
    assert_eq!(first, served_cert(app.grpc_addr, &ca, b"h2").await);

    // A broken file is not loaded: the old certificate is still served.
    std::fs::write(pki.path("server.pem"), "not a certificate").unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(served_cert(app.http_addr, &ca, b"http/1.1").await, first);

    let renewed = pki.write_server_cert("server two");
    assert_ne!(renewed, first);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let http = served_cert(app.http_addr, &ca, b"http/1.1").await;
        let grpc = served_cert(app.grpc_addr, &ca, b"h2").await;
        if http == renewed && grpc == renewed {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the renewed certificate was not picked up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    app.stop().await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tls_files_fail_the_start_naming_the_key() {
    let db = sqlite().await;
    let pki = Pki::new("uploadhook test CA");
    let start = |extra: String| {
        let db = &db;
        async move {
            let config = uploadhook::config::Config::from_toml_layers(&[
                crate::helpers::FAST,
                &format!("[database]\nurl = \"{}\"\n", db.url),
                &extra,
            ])
            .map_err(|e| e.to_string())?;
            let listeners = uploadhook::Listeners {
                grpc: Some(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap()),
                http: tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
                s3: None,
            };
            match uploadhook::start(
                config,
                listeners,
                Arc::new(uploadhook::clock::SystemClock),
                uploadhook::Roles::ALL,
            )
            .await
            {
                Ok(r) => {
                    r.stop().await;
                    Err("started".to_string())
                }
                Err(e) => Ok(format!("{e:#}")),
            }
        }
    };
    let missing = pki.config("off", "").replace("server.pem", "nope.pem");
    let err = start(missing).await.unwrap();
    assert!(
        err.contains("server.tls.cert_file") && err.contains("nope.pem"),
        "{err}"
    );

    // The key of another certificate.
    let other = Pki::new("another CA");
    let mismatched = pki
        .config("off", "")
        .replace(&pki.path("server.key"), &other.path("server.key"));
    let err = start(mismatched).await.unwrap();
    assert!(err.contains("server.tls.key_file"), "{err}");

    // A CA file without certificates.
    std::fs::write(pki.path("empty.pem"), "").unwrap();
    let no_ca = pki.config("required", "").replace("ca.pem", "empty.pem");
    let err = start(no_ca).await.unwrap();
    assert!(err.contains("server.tls.client_ca_file"), "{err}");
    db.cleanup().await;
}
