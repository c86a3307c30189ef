//! A webhook receiver for trying uploadhook out: prints every webhook it
//! gets and whether its Standard Webhooks signature verifies.
//!
//! ```text
//! cargo run --example receiver -- --secret whsec_... [--listen 127.0.0.1:9999]
//! ```
//!
//! It answers 200 to a valid signature and 401 to anything else.

use axum::{Router, body::Bytes, extract::State, http::HeaderMap, http::StatusCode, routing::post};

#[derive(Clone)]
struct Secret(String);

async fn hook(State(Secret(secret)): State<Secret>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let (id, ts, sig) = (
        header("webhook-id"),
        header("webhook-timestamp"),
        header("webhook-signature"),
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default();
    let verdict = match ts.parse::<i64>() {
        Ok(ts) => uploadhook::verify(&secret, &id, ts, &body, &sig, now, 300),
        Err(_) => Err(uploadhook::signing::VerifyError::Timestamp),
    };
    println!("--- {} webhook-id={id}", header("x-webhook-event"));
    println!("{}", String::from_utf8_lossy(&body));
    match verdict {
        Ok(()) => {
            println!("signature: valid");
            StatusCode::OK
        }
        Err(e) => {
            println!("signature: INVALID ({e})");
            StatusCode::UNAUTHORIZED
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut secret = None;
    let mut listen = "127.0.0.1:9999".to_string();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--secret" => secret = args.next(),
            "--listen" => listen = args.next().unwrap_or(listen),
            other => anyhow::bail!(
                "unknown argument {other}; usage: receiver --secret whsec_... [--listen ADDR]"
            ),
        }
    }
    let secret = secret.ok_or_else(|| anyhow::anyhow!("--secret whsec_... is required"))?;
    uploadhook::signing::SigningKey::from_secret(&secret)
        .map_err(|e| anyhow::anyhow!("--secret {e}"))?;
    let listener = tokio::net::TcpListener::bind(&listen).await?;
    println!(
        "receiving webhooks on http://{}/hook",
        listener.local_addr()?
    );
    let app = Router::new()
        .route("/hook", post(hook))
        .with_state(Secret(secret));
    axum::serve(listener, app).await?;
    Ok(())
}
