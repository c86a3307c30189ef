//! The webhook receiver: a real HTTP server on 127.0.0.1 that checks every
//! Standard Webhooks signature and records when each `webhook-id` arrived.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use axum::{
    Router,
    body::Bytes,
    extract::State,
    http::{HeaderMap, StatusCode},
    routing::post,
};

/// How the receiver answers.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Mode {
    /// 200 to every valid request.
    Accept,
    /// 500 to the first attempt of each webhook, 200 afterwards.
    FailFirst,
    /// Never answers (webhooks stay in flight or queued).
    Hold,
}

/// What arrived for one webhook-id.
#[derive(Clone, Debug)]
pub struct Arrival {
    /// Every request, in order.
    pub times: Vec<Instant>,
    /// The first request answered 200.
    pub ok_at: Option<Instant>,
}

pub struct Receiver {
    pub addr: SocketAddr,
    pub state: Arc<Shared>,
}

pub struct Shared {
    secret: String,
    mode: Mode,
    pub arrivals: Mutex<HashMap<String, Arrival>>,
    pub delivered: AtomicU64,
    pub bad_signatures: AtomicU64,
}

impl Receiver {
    pub async fn start(secret: &str, mode: Mode) -> anyhow::Result<Receiver> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(Shared {
            secret: secret.to_string(),
            mode,
            arrivals: Mutex::new(HashMap::new()),
            delivered: AtomicU64::new(0),
            bad_signatures: AtomicU64::new(0),
        });
        let app = Router::new()
            .route("/hook", post(hook))
            .with_state(state.clone());
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                eprintln!("receiver stopped: {e}");
            }
        });
        Ok(Receiver { addr, state })
    }

    pub fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }
}

async fn hook(State(s): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let now = Instant::now();
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    };
    let id = header("webhook-id");
    let unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default();
    let valid = header("webhook-timestamp")
        .parse::<i64>()
        .ok()
        .is_some_and(|ts| {
            uploadhook::verify(
                &s.secret,
                id,
                ts,
                &body,
                header("webhook-signature"),
                unix,
                300,
            )
            .is_ok()
        });
    if !valid {
        s.bad_signatures.fetch_add(1, Ordering::Relaxed);
        return StatusCode::UNAUTHORIZED;
    }
    if s.mode == Mode::Hold {
        std::future::pending::<()>().await;
    }
    let accept = {
        let mut map = s.arrivals.lock().expect("arrivals lock");
        let a = map.entry(id.to_string()).or_insert_with(|| Arrival {
            times: Vec::new(),
            ok_at: None,
        });
        a.times.push(now);
        let accept = s.mode == Mode::Accept || a.times.len() > 1;
        if accept && a.ok_at.is_none() {
            a.ok_at = Some(now);
            s.delivered.fetch_add(1, Ordering::Relaxed);
        }
        accept
    };
    if accept {
        StatusCode::OK
    } else {
        StatusCode::INTERNAL_SERVER_ERROR
    }
}
