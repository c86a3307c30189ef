//! Health: `/healthz` (alive), `/readyz` (ready for traffic), the
//! `grpc.health.v1` statuses, and the `/metrics` endpoint, which reads the
//! same queue and database.
//!
//! What "ready" needs depends on the role:
//! - the API needs the database with every migration applied. It does not
//!   need the queue: with Redis down it still records Creates and
//!   Confirms, and the reconciler queues them once Redis is back. Taking
//!   API pods out of a Service while Redis is down would turn a queue
//!   outage into an API outage.
//! - a worker needs the database and the queue.
//!
//! gRPC health says the same: `uploadhook.v1.WebhookService` is SERVING
//! when the API is ready; the overall status (`""`) is SERVING when the
//! database, the migrations and the queue are all fine.

use std::{
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::{Roles, metrics::METRICS, pipeline::queue::Queue, store::Store};

#[derive(Clone)]
pub struct Health {
    store: Store,
    queue: Arc<dyn Queue>,
    roles: Roles,
    /// Set once every migration is seen applied (never checked again).
    migrated: Arc<AtomicBool>,
}

/// One look at the dependencies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Check {
    pub database: bool,
    pub migrations: bool,
    pub queue: bool,
}

impl Check {
    /// Ready for this role's traffic.
    pub fn ready(&self, roles: Roles) -> bool {
        self.database && self.migrations && (!roles.worker || self.queue)
    }
}

impl Health {
    pub fn new(store: Store, queue: Arc<dyn Queue>, roles: Roles) -> Self {
        Self {
            store,
            queue,
            roles,
            migrated: Arc::new(AtomicBool::new(false)),
        }
    }

    pub async fn check(&self) -> Check {
        const LIMIT: Duration = Duration::from_secs(3);
        let database = match tokio::time::timeout(LIMIT, self.store.ping()).await {
            Ok(Ok(())) => true,
            Ok(Err(e)) => {
                warn!(error = %e, "health: database unreachable");
                false
            }
            Err(_) => {
                warn!("health: database did not answer within 3s");
                false
            }
        };
        let migrations = database
            && (self.migrated.load(Ordering::Relaxed)
                || match self.store.pending_migrations().await {
                    Ok(0) => {
                        self.migrated.store(true, Ordering::Relaxed);
                        true
                    }
                    Ok(n) => {
                        warn!(
                            pending = n,
                            "health: migrations not applied; run `uploadhook migrate`"
                        );
                        false
                    }
                    Err(e) => {
                        warn!(error = %e, "health: reading the migration table failed");
                        false
                    }
                });
        let queue = match tokio::time::timeout(LIMIT, self.queue.ping()).await {
            Ok(Ok(())) => true,
            Ok(Err(e)) => {
                warn!(error = %e, "health: queue unreachable");
                false
            }
            Err(_) => {
                warn!("health: queue did not answer within 3s");
                false
            }
        };
        Check {
            database,
            migrations,
            queue,
        }
    }

    /// `/healthz`, `/readyz` and `/metrics`.
    pub fn router(self) -> Router {
        Router::new()
            .route("/healthz", get(|| async { "ok" }))
            .route("/readyz", get(readyz))
            .route("/metrics", get(metrics))
            .with_state(self)
    }

    /// Sets the gRPC health statuses now, then returns the task that
    /// keeps them true (checked every `every`) until `shutdown`.
    pub async fn grpc_reporter(
        self,
        reporter: tonic_health::server::HealthReporter,
        api_service: &'static str,
        every: Duration,
        shutdown: CancellationToken,
    ) -> impl Future<Output = ()> + Send + 'static {
        let first = self.check().await;
        publish(&reporter, api_service, first).await;
        async move {
            let mut last = first;
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => {
                        let down = Check { database: false, migrations: false, queue: false };
                        publish(&reporter, api_service, down).await;
                        return;
                    }
                    _ = tokio::time::sleep(every) => {}
                }
                let c = self.check().await;
                if c != last {
                    publish(&reporter, api_service, c).await;
                    last = c;
                }
            }
        }
    }
}

async fn publish(reporter: &tonic_health::server::HealthReporter, api_service: &str, c: Check) {
    use tonic_health::ServingStatus::{NotServing, Serving};
    let api = if c.ready(Roles::API) {
        Serving
    } else {
        NotServing
    };
    let all = if c.database && c.migrations && c.queue {
        Serving
    } else {
        NotServing
    };
    reporter.set_service_status(api_service, api).await;
    reporter.set_service_status("", all).await;
}

/// 200 when ready for this role; the body says what was checked, with no
/// details (those go to the log, not to an unauthenticated caller).
async fn readyz(State(h): State<Health>) -> (StatusCode, String) {
    let c = h.check().await;
    let word = |ok: bool| if ok { "ok" } else { "unavailable" };
    let body = format!(
        "database: {}\nmigrations: {}\nqueue: {}{}\n",
        word(c.database),
        if !c.database {
            "unknown"
        } else {
            word(c.migrations)
        },
        word(c.queue),
        if !c.queue && !h.roles.worker {
            " (not needed by the API: Confirms are recorded and queued once it is back)"
        } else {
            ""
        }
    );
    if c.ready(h.roles) {
        (StatusCode::OK, body)
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, body)
    }
}

async fn metrics(State(h): State<Health>) -> impl IntoResponse {
    let body = METRICS
        .render(&h.store, &*h.queue, Duration::from_secs(5))
        .await;
    (
        [(
            http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_api_is_ready_without_the_queue_a_worker_is_not() {
        let no_queue = Check {
            database: true,
            migrations: true,
            queue: false,
        };
        assert!(no_queue.ready(Roles::API));
        assert!(!no_queue.ready(Roles::WORKER));
        assert!(!no_queue.ready(Roles::ALL));
        let unmigrated = Check {
            database: true,
            migrations: false,
            queue: true,
        };
        assert!(!unmigrated.ready(Roles::API));
        let all = Check {
            database: true,
            migrations: true,
            queue: true,
        };
        assert!(all.ready(Roles::ALL));
    }
}
