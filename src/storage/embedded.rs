//! The embedded S3-compatible server: FOR DEVELOPMENT AND TESTS ONLY.
//!
//! It exists so that `uploadhook serve` works out of the box with nothing
//! else installed, and so that tests exercise the real path (presigned URL,
//! an upload over HTTP, a signed HEAD) against a real S3 protocol
//! implementation instead of a mock. It is [s3s] with the [s3s_fs] backend:
//! objects are plain files under `embedded_s3.root`, one folder per bucket,
//! one access key, plain HTTP, path-style addressing only. It has none of
//! the durability, security or performance of a real object store, which is
//! why it logs a warning when it starts.
//!
//! Shutdown is graceful: once the shutdown future completes, the listener is
//! closed, every open connection finishes the request it is serving (idle
//! keep-alive connections close at once), and [`EmbeddedS3::wait`] returns.

use std::{future::Future, net::SocketAddr, time::Duration};

use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use s3s::{auth::SimpleAuth, service::S3Service, service::S3ServiceBuilder};
use secrecy::ExposeSecret;
use tokio::{net::TcpListener, sync::watch, task::JoinSet};

use super::StorageError;
use crate::config::EmbeddedS3Config;

/// A running embedded server.
///
/// Dropping it leaves the server running until the shutdown future given to
/// [`start`] completes.
#[derive(Debug)]
pub struct EmbeddedS3 {
    local_addr: SocketAddr,
    endpoint: String,
    task: tokio::task::JoinHandle<()>,
}

impl EmbeddedS3 {
    /// The address the listener is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The URL clients use, e.g. `http://127.0.0.1:9000` (an unspecified
    /// bind address such as `0.0.0.0` is reached through loopback).
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Waits until the server has stopped: the shutdown future has
    /// completed and every connection has finished its in-flight request.
    ///
    /// Cancelling this future (for example with a timeout at the end of a
    /// shutdown grace period) aborts the connections that are still open.
    pub async fn wait(self) -> Result<(), StorageError> {
        let mut guard = AbortOnDrop(Some(self.task));
        let result = match guard.0.as_mut() {
            Some(task) => task.await,
            None => Ok(()),
        };
        guard.0 = None;
        result.map_err(|e| StorageError::EmbeddedTask(e.to_string()))
    }
}

/// Aborts the server task when [`EmbeddedS3::wait`] is cancelled.
struct AbortOnDrop(Option<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(task) = self.0.take() {
            task.abort();
        }
    }
}

/// Starts the embedded server on `listener` and returns once it accepts
/// connections. It creates `cfg.root/<cfg.bucket>` (s3s-fs maps the
/// top-level folders of its root to buckets) and accepts only
/// `cfg.access_key` / `cfg.secret_key`.
pub async fn start(
    cfg: &EmbeddedS3Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<EmbeddedS3, StorageError> {
    if !valid_bucket_name(&cfg.bucket) {
        return Err(StorageError::Config {
            key: "embedded_s3.bucket".into(),
            message: "must be 3-63 of [a-z0-9.-], starting and ending with a letter or digit"
                .into(),
        });
    }
    let bucket_dir = cfg.root.join(&cfg.bucket);
    tokio::fs::create_dir_all(&bucket_dir)
        .await
        .map_err(|source| StorageError::Io {
            context: format!("creating {}", bucket_dir.display()),
            source,
        })?;
    // s3s-fs canonicalizes the root too, but its error type has no
    // `Display`: doing it here first gives a readable error.
    let root = tokio::fs::canonicalize(&cfg.root)
        .await
        .map_err(|source| StorageError::Io {
            context: format!("opening {}", cfg.root.display()),
            source,
        })?;
    let fs = s3s_fs::FileSystem::new(&root).map_err(|e| StorageError::EmbeddedStart {
        message: format!("opening {}: {e:?}", root.display()),
    })?;
    let mut builder = S3ServiceBuilder::new(fs);
    builder.set_auth(SimpleAuth::from_single(
        cfg.access_key.as_str(),
        cfg.secret_key.expose_secret(),
    ));
    let service = builder.build();

    let local_addr = listener.local_addr().map_err(|source| StorageError::Io {
        context: "reading the embedded server's bound address".into(),
        source,
    })?;
    let endpoint = endpoint_for(local_addr);
    tracing::warn!(
        %endpoint,
        root = %cfg.root.display(),
        bucket = %cfg.bucket,
        "embedded S3-compatible server started: FOR DEVELOPMENT AND TESTS ONLY \
         (plain files, one access key, no TLS); configure a [storage.<name>] \
         connection and set embedded_s3.mode = \"off\" in production"
    );
    let task = tokio::spawn(serve(listener, service, shutdown));
    Ok(EmbeddedS3 {
        local_addr,
        endpoint,
        task,
    })
}

/// The URL for a bound address: loopback when bound to all interfaces.
fn endpoint_for(addr: SocketAddr) -> String {
    let ip = match addr.ip() {
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => std::net::Ipv4Addr::LOCALHOST.into(),
        std::net::IpAddr::V6(ip) if ip.is_unspecified() => std::net::Ipv6Addr::LOCALHOST.into(),
        ip => ip,
    };
    format!("http://{}", SocketAddr::new(ip, addr.port()))
}

/// S3's bucket naming rule, which also keeps the bucket a single folder
/// directly under the root (no `/`, no `..`).
fn valid_bucket_name(name: &str) -> bool {
    let b = name.as_bytes();
    (3..=63).contains(&b.len())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'.' || *c == b'-')
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && !name.contains("..")
}

/// The accept loop: one task per connection, all owned by a `JoinSet` so
/// that aborting this task aborts them too.
async fn serve(
    listener: TcpListener,
    service: S3Service,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut conns = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    conns.spawn(serve_connection(stream, peer, service.clone(), stop_rx.clone()));
                }
                Err(e) => {
                    // Usually running out of file descriptors: back off
                    // instead of spinning.
                    tracing::warn!(error = %e, "embedded s3: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(joined) = conns.join_next(), if !conns.is_empty() => {
                if let Err(e) = joined {
                    tracing::warn!(error = %e, "embedded s3: connection task failed");
                }
            }
        }
    }
    drop(listener);
    let _ = stop_tx.send(true);
    while conns.join_next().await.is_some() {}
    tracing::info!("embedded s3: stopped");
}

async fn serve_connection(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    service: S3Service,
    mut stop: watch::Receiver<bool>,
) {
    let conn = http1::Builder::new()
        // A timer enables hyper's header read timeout (30 s by default).
        .timer(TokioTimer::new())
        .serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let result = tokio::select! {
        result = conn.as_mut() => result,
        () = async {
            // The guard `wait_for` returns must not live across an await.
            let _ = stop.wait_for(|stopped| *stopped).await;
        } => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "embedded s3: connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_uses_loopback_for_unspecified_addresses() {
        assert_eq!(
            endpoint_for("0.0.0.0:9000".parse().unwrap()),
            "http://127.0.0.1:9000"
        );
        assert_eq!(
            endpoint_for("[::]:9000".parse().unwrap()),
            "http://[::1]:9000"
        );
        assert_eq!(
            endpoint_for("127.0.0.1:4321".parse().unwrap()),
            "http://127.0.0.1:4321"
        );
    }

    #[test]
    fn bucket_names() {
        assert!(valid_bucket_name("uploads"));
        assert!(valid_bucket_name("my.bucket-1"));
        assert!(!valid_bucket_name("ab"));
        assert!(!valid_bucket_name("Uploads"));
        assert!(!valid_bucket_name("a/b/c"));
        assert!(!valid_bucket_name("a..b"));
        assert!(!valid_bucket_name("-ab"));
    }

    #[tokio::test]
    async fn stops_on_shutdown() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = crate::config::Config::from_toml("").unwrap().embedded_s3;
        cfg.root = dir.path().to_path_buf();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = start(&cfg, listener, async {
            let _ = rx.await;
        })
        .await
        .unwrap();
        assert!(dir.path().join(&cfg.bucket).is_dir());
        let addr = server.local_addr();
        // An idle keep-alive connection must not hold shutdown up.
        let idle = tokio::net::TcpStream::connect(addr).await.unwrap();
        tx.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), server.wait())
            .await
            .expect("server stops")
            .unwrap();
        drop(idle);
        assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    }
}
