//! Clients in other languages, from the proto alone: the Python client
//! (stubs generated with grpcio-tools) drives the whole flow with
//! StreamEvents; the Node client (@grpc/grpc-js) creates and reads back.
//! Skipped when the tools are missing, unless UPLOADHOOK_REQUIRE_SERVICES=1.

use std::{path::PathBuf, process::Command};

use crate::helpers::{Backend, Receiver, TestApp, TestDb};

fn clients_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("clients")
}

/// Whether `check` runs successfully; otherwise skip (or fail in CI).
fn available(what: &str, check: &mut Command) -> bool {
    let ok = check.output().is_ok_and(|o| o.status.success());
    if !ok {
        if std::env::var("UPLOADHOOK_REQUIRE_SERVICES").as_deref() == Ok("1") {
            panic!("UPLOADHOOK_REQUIRE_SERVICES=1 but {what} is not available (see .ci/run)");
        }
        eprintln!("skipping: {what} is not available");
    }
    ok
}

/// Runs a client to completion off the runtime, and returns its stdout.
async fn run(mut cmd: Command) -> String {
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "client failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_client_from_generated_stubs_runs_the_whole_flow() {
    if !available(
        "python3 with grpcio-tools",
        Command::new("python3").args(["-c", "import grpc_tools, grpc"]),
    ) {
        return;
    }
    let db = TestDb::new(Backend::Sqlite).await.unwrap();
    let mut app = TestApp::start(&db, "").await;
    let rx = Receiver::start().await;
    let mut cmd = Command::new("python3");
    cmd.arg(clients_dir().join("python/client.py"))
        .args(["--target", &app.grpc_addr.to_string()])
        .args(["--key", &app.key_a])
        .args(["--webhook-url", &rx.url]);
    let out = run(cmd).await;
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["status"], "STATUS_COMPLETED", "{out}");
    assert_eq!(
        v["events"],
        serde_json::json!([
            "webhook.created",
            "upload.confirmed",
            "upload.verified",
            "delivery.started",
            "delivery.succeeded"
        ])
    );
    let got = rx.received();
    assert_eq!(got.len(), 1);
    let payload: serde_json::Value = serde_json::from_slice(&got[0].body).unwrap();
    assert_eq!(payload["metadata"]["from"], "python");
    app.stop().await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_client_creates_and_reads_status() {
    let node_dir = clients_dir().join("node");
    if !available(
        "node with clients/node/node_modules (npm ci)",
        Command::new("node").current_dir(&node_dir).args([
            "-e",
            "require('@grpc/grpc-js'); require('@grpc/proto-loader')",
        ]),
    ) {
        return;
    }
    let db = TestDb::new(Backend::Sqlite).await.unwrap();
    let mut app = TestApp::start(&db, "").await;
    let mut cmd = Command::new("node");
    cmd.current_dir(&node_dir)
        .arg("client.js")
        .args(["--target", &app.grpc_addr.to_string()])
        .args(["--key", &app.key_a])
        .args(["--webhook-url", "http://127.0.0.1:9/hook"]);
    let out = run(cmd).await;
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["status"], "STATUS_PENDING", "{out}");
    assert_eq!(v["upload_method"], "PUT");
    assert_eq!(v["metadata"]["from"], "node");
    // The server has it, under the caller's tenant.
    let w = crate::helpers::get(&app, &app.key_a, v["webhook_id"].as_str().unwrap()).await;
    assert_eq!(w.filename, "hello.txt");
    app.stop().await;
    db.cleanup().await;
}

/// schemathesis, in a bounded run against the served `/openapi.json`, finds
/// no 5xx answer and no response that breaks the schema. (StreamEvents is
/// left out: an SSE stream does not end by itself.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_server_error_and_no_schema_violation() {
    const RUN: &str = "import sys; from schemathesis.cli import schemathesis; \
                       sys.argv[0] = 'st'; sys.exit(schemathesis())";
    if !available(
        "python3 with schemathesis",
        Command::new("python3").args(["-c", "import schemathesis.cli"]),
    ) {
        return;
    }
    let db = TestDb::new(Backend::Sqlite).await.unwrap();
    let mut app = TestApp::start(&db, "").await;
    // schemathesis keeps a cache in its working directory.
    let workdir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new("python3");
    cmd.current_dir(workdir.path())
        .args(["-c", RUN, "run", &app.http_url("/openapi.json")])
        .args(["-H", &format!("Authorization: Bearer {}", app.key_a)])
        .args(["--exclude-path", "/v1/events:stream"])
        .args(["--max-examples", "25", "--seed", "1"])
        .args(["--checks", "not_a_server_error,response_schema_conformance"])
        .env("NO_COLOR", "1");
    run(cmd).await;
    app.stop().await;
    db.cleanup().await;
}
