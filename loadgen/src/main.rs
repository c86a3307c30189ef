//! Load generator for uploadhook (issue 8; see BENCHMARKS.md).
//!
//! ```text
//! cargo build --release -p loadgen -p uploadhook
//! target/release/loadgen --deployment embedded --webhooks 20000 --concurrency 64
//! ```
//!
//! It starts a deployment from the release `uploadhook` binary (or targets
//! a running one with `--target`), runs its own receiver, and drives N
//! webhooks through CreateUploadWebhook, the presigned PUT and Confirm, in
//! two phases: first Create + PUT of all N, then Confirm of all N, so that
//! the second phase measures Confirm-to-delivered on its own. `--floor`
//! replaces the second phase with the same HEAD + signed POST done
//! directly, with no queue and no database.
//!
//! The S3 server the webhooks upload to (the embedded S3 stand-in, the
//! same code `uploadhook serve` runs) is a process of its own, this binary
//! started with `--serve-s3`, so that its CPU is reported apart from the
//! service's.

mod compare;
mod deploy;
mod measure;
mod receiver;
mod stages;

use std::{
    collections::{BTreeMap, HashMap},
    future::Future,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context;
use bytes::Bytes;
use clap::Parser;
use tonic::{Request, metadata::MetadataValue, transport::Channel};
use uploadhook::proto::{self, webhook_service_client::WebhookServiceClient};

use crate::{
    deploy::{Deployment, Kind},
    measure::{Group, Latencies, Timeline},
    receiver::{Mode, Receiver},
};

#[derive(Parser, Debug)]
#[command(about = "Drives webhooks through uploadhook and reports what it measured")]
struct Args {
    /// The deployment to start.
    #[arg(long, value_enum, default_value = "embedded")]
    deployment: Kind,
    /// Target a running deployment instead (its gRPC URL); needs
    /// --api-key, and its delivery.allow_cidrs must allow 127.0.0.1.
    #[arg(long)]
    target: Option<String>,
    #[arg(long)]
    api_key: Option<String>,
    /// Storage connection to name in Create (running deployment).
    #[arg(long, default_value = "")]
    storage: String,
    /// Process ids of a running deployment, for CPU and RSS figures.
    #[arg(long, value_delimiter = ',')]
    pids: Vec<u32>,
    /// Webhooks to drive.
    #[arg(long, default_value_t = 2000)]
    webhooks: usize,
    /// Requests in flight at once (closed loop).
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Open loop: offered requests per second instead of a fixed
    /// concurrency (both phases).
    #[arg(long)]
    rate: Option<f64>,
    /// The receiver fails the first attempt of each webhook; retries are
    /// due 1 s later (delivery.retry_schedule = ["1s", "1s"], jitter 0).
    #[arg(long)]
    retry: bool,
    /// Run the floor: HEAD + signed POST straight from this tool instead
    /// of Confirm (no queue, no database).
    #[arg(long)]
    floor: bool,
    /// Create and upload only: leave the webhooks PENDING and report the
    /// service's memory.
    #[arg(long)]
    no_confirm: bool,
    /// The receiver never answers: confirmed webhooks stay queued (with
    /// delivery.timeout = 1h); reports the service's memory.
    #[arg(long)]
    hold: bool,
    /// Size of each uploaded object.
    #[arg(long, default_value_t = 256)]
    object_bytes: usize,
    /// The release `uploadhook` binary (default: next to this one).
    #[arg(long)]
    bin: Option<PathBuf>,
    /// PostgreSQL server; a fresh database is created on it for the run
    /// and dropped afterwards.
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/test")]
    database_url: String,
    /// Redis; a random key prefix is used and its keys deleted afterwards.
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    redis_url: String,
    /// Extra environment for the service processes, e.g.
    /// `--set UPLOADHOOK_WORKER__PER_HOST_CONCURRENCY=64`.
    #[arg(long = "set")]
    set: Vec<String>,
    /// Give up waiting for deliveries after this many seconds without one.
    #[arg(long, default_value_t = 30)]
    drain_timeout: u64,
    /// Run the service processes under valgrind's callgrind and report the
    /// instructions they execute per delivered webhook in the Confirm
    /// phase: a count that repeats from run to run, unlike CPU time, for
    /// before/after comparisons. About fifty times slower: use a few
    /// hundred webhooks and a low concurrency.
    #[arg(long, conflicts_with = "target")]
    callgrind: bool,
    /// Write one CSV line per delivered webhook to this file: when its
    /// Confirm (or floor run) was sent, in ms since the phase began, and
    /// how long until it arrived, in ms; to see when the slow ones
    /// happened (a stall, or spread out).
    #[arg(long)]
    arrivals_csv: Option<PathBuf>,
    /// Paired comparison: N pairs of runs of variant A (this command as
    /// given) and variant B (--b-bin, --b-set), each run a deployment of
    /// its own, in turn (A B, then B A, …); reports each figure's ratio
    /// B / A pair by pair and the median. With neither --b-bin nor
    /// --b-set, A against itself: the noise.
    #[arg(long, conflicts_with_all = ["target", "arrivals_csv", "callgrind"])]
    pairs: Option<usize>,
    /// Variant B's `uploadhook` binary (default: A's).
    #[arg(long, requires = "pairs")]
    b_bin: Option<PathBuf>,
    /// Variant B's environment for the service processes, on top of --set,
    /// e.g. `--b-set UPLOADHOOK_WORKER__WRITE_CONCURRENCY=2`.
    #[arg(long = "b-set", requires = "pairs")]
    b_set: Vec<String>,
    /// Internal: serve the embedded S3 stand-in on this address (with
    /// --s3-root) until killed; how a deployment's S3 server is started.
    #[arg(long, hide = true, requires = "s3_root")]
    serve_s3: Option<std::net::SocketAddr>,
    #[arg(long, hide = true)]
    s3_root: Option<PathBuf>,
}

/// The start of a phase reported apart from the rest as well.
const WARM_UP: Duration = Duration::from_secs(1);

/// One created and uploaded webhook.
#[derive(Clone)]
struct Created {
    id: String,
    key: String,
    filename: String,
}

const CONTENT_TYPE: &str = "application/octet-stream";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let (Some(addr), Some(root)) = (args.serve_s3, &args.s3_root) {
        return serve_s3(addr, root).await;
    }
    if let Some(pairs) = args.pairs {
        parse_env(&args.set, "--set")?;
        parse_env(&args.b_set, "--b-set")?;
        let a = service_bin(&args)?;
        let b = compare::Variant {
            bin: args.b_bin.clone().unwrap_or_else(|| a.clone()),
            set: args.b_set.clone(),
        };
        let a = compare::Variant {
            bin: a,
            set: Vec::new(),
        };
        return compare::run(pairs, a, b, &args.set).await;
    }
    let secret = uploadhook::signing::SigningKey::generate_secret();
    let mode = if args.retry {
        Mode::FailFirst
    } else if args.hold {
        Mode::Hold
    } else {
        Mode::Accept
    };
    let receiver = Receiver::start(&secret, mode).await?;

    let mut deployment = None;
    let (grpc_url, api_key, storage, procs) = match &args.target {
        Some(url) => {
            let key = args
                .api_key
                .clone()
                .context("--api-key is required with --target")?;
            let procs: Vec<(String, u32)> =
                args.pids.iter().map(|p| (format!("pid {p}"), *p)).collect();
            (url.clone(), key, args.storage.clone(), procs)
        }
        None => {
            let mut delivery_toml = String::new();
            if args.retry {
                delivery_toml.push_str("retry_schedule = [\"1s\", \"1s\"]\njitter = 0.0\n");
            }
            if args.hold {
                delivery_toml.push_str("timeout = \"1h\"\n");
            }
            let env = parse_env(&args.set, "--set")?;
            let d = Deployment::start(&deploy::Options {
                kind: args.deployment,
                bin: service_bin(&args)?,
                database_url: args.database_url.clone(),
                redis_url: args.redis_url.clone(),
                delivery_toml,
                env,
                callgrind: args.callgrind,
            })
            .await?;
            let procs = d
                .processes
                .iter()
                .map(|p| (p.name.clone(), p.pid()))
                .collect();
            let r = (
                d.grpc_url.clone(),
                d.api_key.clone(),
                d.storage.clone(),
                procs,
            );
            deployment = Some(d);
            r
        }
    };
    let result = run(
        &args,
        &receiver,
        &secret,
        &grpc_url,
        &api_key,
        &storage,
        &procs,
        deployment.as_ref(),
    )
    .await;
    if let Some(d) = deployment {
        d.stop().await;
    }
    result
}

/// `NAME=VALUE` arguments of `flag` as pairs.
fn parse_env(list: &[String], flag: &str) -> anyhow::Result<Vec<(String, String)>> {
    list.iter()
        .map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .with_context(|| format!("{flag} {kv}: expected NAME=VALUE"))
        })
        .collect()
}

/// The release `uploadhook` binary to start: --bin, or the one next to
/// this binary.
fn service_bin(args: &Args) -> anyhow::Result<PathBuf> {
    Ok(match &args.bin {
        Some(b) => b.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("no parent folder")?
            .join("uploadhook"),
    })
}

/// Serves the embedded S3 stand-in with its default bucket and keys (the
/// ones `deploy` configures the service with) until the process is killed.
async fn serve_s3(addr: std::net::SocketAddr, root: &std::path::Path) -> anyhow::Result<()> {
    let mut cfg = uploadhook::config::Config::from_toml("")?.embedded_s3;
    cfg.addr = addr;
    cfg.root = root.to_path_buf();
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let s3 = uploadhook::storage::embedded::start(&cfg, listener, std::future::pending()).await?;
    s3.wait().await?;
    Ok(())
}

/// The report's name for a service process (`api`, `worker-0`, …).
fn service_group(process: &str) -> String {
    format!("uploadhook {process}")
}

/// Whether a CPU group counts as the service (with PostgreSQL and Redis),
/// rather than this tool or the S3 server.
fn is_service(group: &str) -> bool {
    !group.starts_with("loadgen") && group != S3_GROUP
}

const S3_GROUP: &str = "s3 server (embedded stand-in, own process)";

/// The service's CPU over the CPU of the processes that do the same work
/// per webhook whatever the service's build: this tool (Confirms, the
/// receiver) and the S3 server (the HEADs). Both run beside the service
/// on the same cores, so their CPU per webhook moves with the machine's
/// speed, which drifts by tens of per cent within minutes; the ratio takes
/// most of that drift out of a paired comparison (BENCHMARKS.md, "Method",
/// item 10). `None` without both sides (a floor run).
fn service_over_control(cpu: &[(String, f64)]) -> Option<f64> {
    let (service, control) = cpu.iter().fold((0.0, 0.0), |(s, c), (name, secs)| {
        if is_service(name) {
            (s + secs, c)
        } else {
            (s, c + secs)
        }
    });
    (service > 0.0 && control > 0.0).then(|| service / control)
}

#[allow(clippy::too_many_arguments)]
async fn run(
    args: &Args,
    receiver: &Receiver,
    secret: &str,
    grpc_url: &str,
    api_key: &str,
    storage: &str,
    procs: &[(String, u32)],
    deployment: Option<&Deployment>,
) -> anyhow::Result<()> {
    let n = args.webhooks;
    let channel = Channel::from_shared(grpc_url.to_string())?
        .connect()
        .await
        .with_context(|| format!("connecting to {grpc_url}"))?;
    let client = WebhookServiceClient::new(channel);
    let auth: MetadataValue<_> = format!("Bearer {api_key}").parse()?;
    let http = reqwest::Client::new();

    // CPU groups: each service process, PostgreSQL, Redis, this tool.
    let mut groups: Vec<Group> = procs
        .iter()
        .map(|(name, pid)| Group {
            name: service_group(name),
            pids: vec![*pid],
        })
        .collect();
    groups.push(Group {
        name: "loadgen (this tool, incl. receiver)".into(),
        pids: vec![std::process::id()],
    });
    if let Some(pid) = deployment.and_then(|d| d.s3_pid()) {
        groups.push(Group {
            name: S3_GROUP.into(),
            pids: vec![pid],
        });
    }
    let mut redis_pid = None;
    if let Some(d) = deployment {
        redis_pid = d.redis_pid().await?;
    }
    if let Some(pid) = redis_pid {
        groups.push(Group {
            name: "redis-server".into(),
            pids: vec![pid],
        });
    }
    let pg_groups = |groups: &mut Vec<Group>, pg: Option<(Vec<u32>, Vec<u32>)>| {
        groups.retain(|g| !g.name.starts_with("postgres"));
        if let Some((backends, aux)) = pg {
            groups.push(Group {
                name: "postgres backends (this database)".into(),
                pids: backends,
            });
            groups.push(Group {
                name: "postgres shared processes (WAL writer etc.)".into(),
                pids: aux,
            });
        }
    };
    let pg_now = match deployment {
        Some(d) => d.postgres_pids().await?,
        None => None,
    };
    pg_groups(&mut groups, pg_now);
    let wal0 = wal_position(deployment).await;

    println!(
        "uploadhook loadgen: {n} webhooks, {}, deployment {}{}",
        match args.rate {
            Some(r) => format!("open loop at {r}/s offered"),
            None => format!("{} in flight", args.concurrency),
        },
        if args.target.is_some() {
            "(running, --target)".to_string()
        } else {
            format!("{:?}", args.deployment)
        },
        if args.retry { ", retry scenario" } else { "" },
    );

    // Phase 1: Create + PUT.
    let body = Bytes::from(vec![b'x'; args.object_bytes]);
    let created: Arc<Mutex<Vec<Created>>> = Arc::new(Mutex::new(Vec::with_capacity(n)));
    let create_lat = Arc::new(Mutex::new(Vec::with_capacity(n)));
    let put_lat = Arc::new(Mutex::new(Vec::with_capacity(n)));
    let errors = Arc::new(Mutex::new(Vec::<String>::new()));
    let cpu0 = measure::snapshot(&groups);
    let t0 = Instant::now();
    let phase1_offered = drive(n, args.concurrency, args.rate, {
        let (client, auth, http, body) = (client.clone(), auth.clone(), http.clone(), body.clone());
        let (created, create_lat, put_lat, errors) = (
            created.clone(),
            create_lat.clone(),
            put_lat.clone(),
            errors.clone(),
        );
        let (url, secret, storage) = (receiver.url(), secret.to_string(), storage.to_string());
        move |i| {
            let (mut client, auth, http, body) =
                (client.clone(), auth.clone(), http.clone(), body.clone());
            let (created, create_lat, put_lat, errors) = (
                created.clone(),
                create_lat.clone(),
                put_lat.clone(),
                errors.clone(),
            );
            let filename = format!("bench-{i}.bin");
            let msg = proto::CreateUploadWebhookRequest {
                storage: storage.clone(),
                filename: filename.clone(),
                content_type: CONTENT_TYPE.into(),
                webhook: Some(proto::WebhookTarget {
                    url: url.clone(),
                    secret: secret.clone(),
                    metadata: [("n".to_string(), i.to_string())].into(),
                    ..Default::default()
                }),
                ..Default::default()
            };
            async move {
                let mut req = Request::new(msg);
                req.metadata_mut().insert("authorization", auth);
                let started = Instant::now();
                let resp = match client.create_upload_webhook(req).await {
                    Ok(r) => r.into_inner(),
                    Err(e) => {
                        errors.lock().unwrap().push(format!("create: {e}"));
                        return;
                    }
                };
                create_lat.lock().unwrap().push(started.elapsed());
                let started = Instant::now();
                let mut put = http.put(&resp.upload_url).body(body);
                for (k, v) in &resp.upload_headers {
                    put = put.header(k, v);
                }
                match put.send().await {
                    Ok(r) if r.status().is_success() => {}
                    Ok(r) => {
                        errors.lock().unwrap().push(format!("put: {}", r.status()));
                        return;
                    }
                    Err(e) => {
                        errors.lock().unwrap().push(format!("put: {e}"));
                        return;
                    }
                }
                put_lat.lock().unwrap().push(started.elapsed());
                let w = resp.webhook.unwrap_or_default();
                created.lock().unwrap().push(Created {
                    id: w.id,
                    key: w.key,
                    filename,
                });
            }
        }
    })
    .await;
    let phase1 = t0.elapsed();
    // Connections the pools opened during the phase are its backends too
    // (a pid first seen now counts from zero).
    if let Some(d) = deployment {
        pg_groups(&mut groups, d.postgres_pids().await?);
    }
    let cpu1 = measure::snapshot(&groups);
    let wal1 = wal_position(deployment).await;
    let created = std::mem::take(&mut *created.lock().unwrap());
    let create_lat = Latencies::new(std::mem::take(&mut *create_lat.lock().unwrap()));
    let put_lat = Latencies::new(std::mem::take(&mut *put_lat.lock().unwrap()));
    println!("\n== Phase 1: CreateUploadWebhook + presigned PUT ==");
    println!(
        "created and uploaded {} of {n} in {:.2} s ({:.0}/s; offered {})",
        created.len(),
        phase1.as_secs_f64(),
        created.len() as f64 / phase1.as_secs_f64(),
        phase1_offered
    );
    println!("Create latency:  {}", create_lat.line());
    println!("PUT latency:     {}", put_lat.line());
    report_errors(&errors);
    let (phase1_cpu, _) = print_cpu(
        &measure::cpu_delta(&cpu0, &cpu1),
        &measure::wakeup_delta(&cpu0, &cpu1),
        created.len(),
    );
    let mut result = serde_json::json!({
        "phase1_cpu_ms_per_webhook_service": phase1_cpu * 1e3 / created.len().max(1) as f64,
        "webhooks": n,
        "deployment": format!("{:?}", args.deployment),
        "concurrency": args.concurrency,
        "rate": args.rate,
        "create_p50_ms": create_lat.pct_ms(50.0),
        "create_p99_ms": create_lat.pct_ms(99.0),
        "phase1_per_s": created.len() as f64 / phase1.as_secs_f64(),
    });

    print_memory(
        procs,
        &mut result,
        "after phase 1, all created webhooks PENDING",
        "pending",
    );
    report_wal(
        &mut result,
        "phase1_wal_bytes_per_webhook",
        "in phase 1, per created webhook",
        (wal0, wal1),
        created.len(),
    );
    if args.no_confirm {
        println!("RESULT {result}");
        return check(0, 0, &errors, created.len(), n);
    }

    // Phase 2: Confirm (or the floor), then wait for the receiver.
    let confirm_lat = Arc::new(Mutex::new(Vec::with_capacity(n)));
    let sent_at: Arc<Mutex<HashMap<String, Instant>>> =
        Arc::new(Mutex::new(HashMap::with_capacity(n)));
    // When each Confirm was answered (for the stages' report).
    let answered_at: Arc<Mutex<HashMap<String, Instant>>> =
        Arc::new(Mutex::new(HashMap::with_capacity(n)));
    let groups2 = match deployment {
        Some(d) => d.write_groups().await,
        None => None,
    };
    let wal2 = wal_position(deployment).await;
    if let Some(d) = deployment {
        pg_groups(&mut groups, d.postgres_pids().await?);
        if args.callgrind {
            d.callgrind_zero().await?;
        }
    }
    let service_pids: Vec<u32> = procs.iter().map(|(_, pid)| *pid).collect();
    let cpu2 = measure::snapshot(&groups);
    let threads2 = measure::threads(&service_pids);
    let t2 = Instant::now();
    let clock = stages::WallClock::now();
    let items = Arc::new(created.clone());
    let phase2_offered = if args.floor {
        let d = deployment.context("--floor needs a deployment that this tool starts")?;
        let cfg = uploadhook::config::Config::from_toml(&d.base_toml)?;
        let storages = uploadhook::storage::Storages::from_config(&cfg, Some(&d.s3_endpoint))?;
        let storage = storages
            .resolve(if storage.is_empty() {
                uploadhook::storage::EMBEDDED_NAME
            } else {
                storage
            })
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let delivery = uploadhook::pipeline::delivery::DeliveryClient::new(
            &cfg.delivery,
            cfg.delivery_allow_list(),
        )?;
        let key = Arc::new(uploadhook::signing::SigningKey::from_secret(secret)?);
        let url = receiver.url();
        drive(items.len(), args.concurrency, args.rate, {
            let (items, sent_at, errors) = (items.clone(), sent_at.clone(), errors.clone());
            move |i| {
                let (storage, delivery, key, url) =
                    (storage.clone(), delivery.clone(), key.clone(), url.clone());
                let (items, sent_at, errors) = (items.clone(), sent_at.clone(), errors.clone());
                async move {
                    let w = &items[i];
                    sent_at.lock().unwrap().insert(w.id.clone(), Instant::now());
                    let info = match storage.head(&w.key).await {
                        Ok(Some(info)) => info,
                        other => {
                            errors.lock().unwrap().push(format!("head: {other:?}"));
                            return;
                        }
                    };
                    use uploadhook::pipeline::delivery::{self as dl, FileInfo, Payload};
                    let object_url = storage.object_url(&w.key);
                    let now = chrono::Utc::now();
                    let body = Payload {
                        event: dl::EVENT_UPLOAD_COMPLETED,
                        webhook_id: &w.id,
                        timestamp: dl::rfc3339(now),
                        file: FileInfo {
                            url: &object_url,
                            filename: &w.filename,
                            key: &w.key,
                            size: info.size,
                            content_type: CONTENT_TYPE,
                            etag: &info.etag,
                        },
                        provider: storage.kind().as_str(),
                        metadata: BTreeMap::from([("n".to_string(), i.to_string())]),
                    }
                    .to_json();
                    let headers = dl::signed_headers(
                        std::slice::from_ref(&*key),
                        &w.id,
                        now.timestamp(),
                        &body,
                    );
                    let r = delivery.post(&url, &headers, Bytes::from(body)).await;
                    if r.status != Some(200) {
                        errors
                            .lock()
                            .unwrap()
                            .push(format!("post: {:?} {:?}", r.status, r.error));
                    }
                }
            }
        })
        .await
    } else {
        drive(items.len(), args.concurrency, args.rate, {
            let (client, auth) = (client.clone(), auth.clone());
            let (items, sent_at, answered_at, confirm_lat, errors) = (
                items.clone(),
                sent_at.clone(),
                answered_at.clone(),
                confirm_lat.clone(),
                errors.clone(),
            );
            move |i| {
                let (mut client, auth) = (client.clone(), auth.clone());
                let (items, sent_at, answered_at, confirm_lat, errors) = (
                    items.clone(),
                    sent_at.clone(),
                    answered_at.clone(),
                    confirm_lat.clone(),
                    errors.clone(),
                );
                async move {
                    let id = items[i].id.clone();
                    let mut req = Request::new(proto::ConfirmRequest {
                        webhook_id: id.clone(),
                        etag: String::new(),
                    });
                    req.metadata_mut().insert("authorization", auth);
                    let started = Instant::now();
                    sent_at.lock().unwrap().insert(id.clone(), started);
                    match client.confirm(req).await {
                        Ok(_) => {
                            let answered = Instant::now();
                            confirm_lat.lock().unwrap().push(answered - started);
                            answered_at.lock().unwrap().insert(id, answered);
                        }
                        Err(e) => errors.lock().unwrap().push(format!("confirm: {e}")),
                    }
                }
            }
        })
        .await
    };
    let sent_phase = t2.elapsed();

    if args.hold {
        // Let the service take what it can, then read its memory.
        tokio::time::sleep(Duration::from_secs(5)).await;
        println!("\n== Phase 2: Confirm, receiver holding every request ==");
        println!(
            "confirmed {} in {:.2} s; Confirm latency: {}",
            items.len(),
            sent_phase.as_secs_f64(),
            Latencies::new(std::mem::take(&mut *confirm_lat.lock().unwrap())).line()
        );
        report_errors(&errors);
        print_memory(procs, &mut result, "confirmed, receiver holding", "held");
        println!("RESULT {result}");
        return check(0, 0, &errors, created.len(), n);
    }

    // Wait for every delivery (or for no progress during drain_timeout).
    let want = items.len();
    let mut last_progress = (0, Instant::now());
    loop {
        let got = receiver.state.delivered.load(Ordering::Relaxed) as usize;
        if got >= want {
            break;
        }
        if got != last_progress.0 {
            last_progress = (got, Instant::now());
        } else if last_progress.1.elapsed() > Duration::from_secs(args.drain_timeout) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if let Some(d) = deployment {
        pg_groups(&mut groups, d.postgres_pids().await?);
    }
    let cpu3 = measure::snapshot(&groups);
    let threads3 = measure::threads(&service_pids);
    let instructions = match deployment {
        Some(d) if args.callgrind => Some(d.callgrind_instructions().await?),
        _ => None,
    };
    let wal3 = wal_position(deployment).await;

    // What arrived.
    let arrivals = receiver.state.arrivals.lock().unwrap().clone();
    let sent_at = std::mem::take(&mut *sent_at.lock().unwrap());
    let mut to_arrival = Vec::with_capacity(want);
    let mut timeline: Vec<(Duration, Duration)> = Vec::new();
    let mut retry_late = Vec::new();
    let (mut delivered, mut duplicates, mut unknown) = (0usize, 0usize, 0usize);
    let mut last = t2;
    let expected_requests = if args.retry { 2 } else { 1 };
    for (id, a) in &arrivals {
        let Some(sent) = sent_at.get(id) else {
            unknown += 1;
            continue;
        };
        duplicates += a.times.len().saturating_sub(expected_requests);
        if let Some(ok) = a.ok_at {
            delivered += 1;
            last = last.max(ok);
            let first = if args.retry { a.times[0] } else { ok };
            to_arrival.push(first.saturating_duration_since(*sent));
            timeline.push((
                sent.saturating_duration_since(t2),
                first.saturating_duration_since(*sent),
            ));
        }
        if args.retry && a.times.len() >= 2 {
            let gap = a.times[1].saturating_duration_since(a.times[0]);
            retry_late.push(gap.saturating_sub(Duration::from_secs(1)));
        }
    }
    let missing = sent_at
        .keys()
        .filter(|id| !arrivals.contains_key(*id))
        .count()
        + arrivals
            .iter()
            .filter(|(id, a)| sent_at.contains_key(*id) && a.ok_at.is_none())
            .count();
    let timeline = Timeline::new(timeline);
    if let Some(path) = &args.arrivals_csv {
        let mut out = std::io::BufWriter::new(
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
        );
        timeline
            .write_csv(&mut out)
            .and_then(|()| std::io::Write::flush(&mut out))
            .with_context(|| format!("writing {}", path.display()))?;
        println!("arrival times written to {}", path.display());
    }
    let window = last.saturating_duration_since(t2);
    let per_s = delivered as f64 / window.as_secs_f64();
    let to_arrival = Latencies::new(to_arrival);
    if args.floor {
        println!("\n== Phase 2: the FLOOR (HEAD + signed POST from this tool) ==");
    } else {
        println!("\n== Phase 2: Confirm -> delivered ==");
        let confirm_lat = Latencies::new(std::mem::take(&mut *confirm_lat.lock().unwrap()));
        println!("Confirm latency: {}", confirm_lat.line());
        result["confirm_p50_ms"] = confirm_lat.pct_ms(50.0).into();
        result["confirm_p99_ms"] = confirm_lat.pct_ms(99.0).into();
    }
    println!(
        "sent {} in {:.2} s (offered {}); delivered {delivered} in {:.2} s = {per_s:.0} webhooks/s",
        items.len(),
        sent_phase.as_secs_f64(),
        phase2_offered,
        window.as_secs_f64(),
    );
    println!(
        "{} to arrival{}: {}",
        if args.floor { "start" } else { "Confirm" },
        if args.retry { " (first attempt)" } else { "" },
        to_arrival.line()
    );
    // The first moments of a phase (a worker idle until then: its
    // prepared statements, PostgreSQL's caches, HTTP connections) weigh
    // on the p99 of a short run: shown apart, never instead.
    let steady = timeline.sent_from(WARM_UP);
    if steady.len() > 0 {
        println!(
            "  of which sent after the first {} s: {}",
            WARM_UP.as_secs(),
            steady.line()
        );
        result["arrival_p50_ms_after_warm_up"] = steady.pct_ms(50.0).into();
        result["arrival_p99_ms_after_warm_up"] = steady.pct_ms(99.0).into();
    }
    println!(
        "duplicates {duplicates} · missing {missing} · unknown ids {unknown} · bad signatures {}",
        receiver.state.bad_signatures.load(Ordering::Relaxed)
    );
    // Where the time went: not for the floor (no service) nor the retry
    // scenario (its arrival is the first, failed, attempt).
    if !args.floor
        && !args.retry
        && let Some(d) = deployment
        && let Some(stored) = stage_times(d, &arrivals).await
    {
        let answered_at = std::mem::take(&mut *answered_at.lock().unwrap());
        let rows = arrivals.iter().filter_map(|(id, a)| {
            let ours = stages::Ours {
                sent: clock.unix_us(*sent_at.get(id)?),
                confirm_answered: clock.unix_us(*answered_at.get(id)?),
                arrived: clock.unix_us(a.ok_at?),
            };
            Some((ours, stored.get(id)))
        });
        let breakdown = stages::breakdown(rows);
        breakdown.print();
        breakdown.report_into(&mut result);
    }
    if args.retry {
        let late = Latencies::new(retry_late);
        println!(
            "retry lateness (second attempt minus first minus 1 s): {}",
            late.line()
        );
        result["retry_late_p50_ms"] = late.pct_ms(50.0).into();
        result["retry_late_p99_ms"] = late.pct_ms(99.0).into();
        result["retry_late_max_ms"] = late.max_ms().into();
    }
    report_errors(&errors);
    let cpu = measure::cpu_delta(&cpu2, &cpu3);
    let wakeups = measure::wakeup_delta(&cpu2, &cpu3);
    let (service_cpu, service_wakeups) = print_cpu(&cpu, &wakeups, delivered);
    // Under valgrind the threads are valgrind's to schedule: not shown.
    if !args.callgrind {
        result["threads"] = print_threads(
            &measure::thread_delta(&threads2, &threads3),
            procs,
            delivered,
        );
    }
    result["delivered"] = delivered.into();
    result["duplicates"] = duplicates.into();
    result["missing"] = missing.into();
    result["delivered_per_s"] = per_s.into();
    result["arrival_p50_ms"] = to_arrival.pct_ms(50.0).into();
    result["arrival_p95_ms"] = to_arrival.pct_ms(95.0).into();
    result["arrival_p99_ms"] = to_arrival.pct_ms(99.0).into();
    result["arrival_max_ms"] = to_arrival.max_ms().into();
    // The service, PostgreSQL and Redis: neither this tool nor the S3
    // server.
    result["cpu_ms_per_webhook_service"] = (service_cpu * 1e3 / delivered.max(1) as f64).into();
    if let Some(ratio) = service_over_control(&cpu) {
        println!("service CPU / (this tool + S3 server) CPU: {ratio:.3}");
        result["cpu_service_over_control"] = ratio.into();
    }
    result["cpu"] = cpu
        .iter()
        .map(|(n, c)| (n.clone(), serde_json::Value::from(*c)))
        .collect::<serde_json::Map<_, _>>()
        .into();
    result["wakeups"] = wakeups
        .iter()
        .map(|(n, w)| (n.clone(), serde_json::Value::from(*w)))
        .collect::<serde_json::Map<_, _>>()
        .into();
    result["wakeups_per_webhook_service"] =
        (service_wakeups as f64 / delivered.max(1) as f64).into();
    if let (Some((g0, w0)), Some(d)) = (groups2, deployment)
        && let Some((g1, w1)) = d.write_groups().await
    {
        let (g, w) = (g1.saturating_sub(g0), w1.saturating_sub(w0));
        println!(
            "write groups: {g} transactions for {w} writes ({:.2} per transaction)",
            w as f64 / g.max(1) as f64
        );
        result["write_groups"] = g.into();
        result["writes_per_transaction"] = (w as f64 / g.max(1) as f64).into();
    }
    if let Some(counts) = instructions {
        let per = |n: u64| n as f64 / delivered.max(1) as f64;
        let total: u64 = counts.iter().map(|(_, n)| n).sum();
        for (name, n) in &counts {
            println!(
                "instructions (callgrind): uploadhook {name} {:.0} per webhook",
                per(*n)
            );
        }
        println!(
            "instructions (callgrind): service {:.0} per webhook",
            per(total)
        );
        result["instructions_per_webhook"] = per(total).into();
        result["instructions_per_webhook_by_process"] = counts
            .iter()
            .map(|(name, n)| (name.clone(), serde_json::Value::from(per(*n))))
            .collect::<serde_json::Map<_, _>>()
            .into();
    }
    report_wal(
        &mut result,
        "wal_bytes_per_webhook",
        "per delivered webhook",
        (wal2, wal3),
        delivered,
    );
    if let Some((tls, all)) = match deployment {
        Some(d) => d.postgres_tls().await,
        None => None,
    } {
        println!("PostgreSQL: {tls} of the service's {all} connections use TLS");
        result["postgres_connections"] = all.into();
        result["postgres_connections_tls"] = tls.into();
    }
    print_memory(procs, &mut result, "end", "end");
    println!("RESULT {result}");
    let bad = receiver.state.bad_signatures.load(Ordering::Relaxed);
    check(missing, bad, &errors, created.len(), n)
}

/// The service's stage times of the run's webhooks. A worker stores the
/// answer (`completed_at`) just after the receiver saw the request: read
/// again, for up to 2 s, until every delivered webhook has all its times.
async fn stage_times(
    d: &Deployment,
    arrivals: &HashMap<String, receiver::Arrival>,
) -> Option<HashMap<String, stages::Stored>> {
    let complete = |s: &stages::Stored| {
        s.confirmed.is_some()
            && s.verified.is_some()
            && s.claim.is_some()
            && s.post.is_some()
            && s.answered.is_some()
    };
    let mut tries = 0;
    loop {
        let stored = d.stage_times().await?;
        let all = arrivals
            .iter()
            .filter(|(_, a)| a.ok_at.is_some())
            .all(|(id, _)| stored.get(id).is_some_and(complete));
        tries += 1;
        if all || tries == 20 {
            return Some(stored);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// PostgreSQL's write-ahead log position, when this tool started a
/// deployment on PostgreSQL.
async fn wal_position(deployment: Option<&Deployment>) -> Option<u64> {
    match deployment {
        Some(d) => d.postgres_wal_bytes().await,
        None => None,
    }
}

/// The WAL written between two positions, per webhook, printed and put in
/// the result under `key`.
fn report_wal(
    result: &mut serde_json::Value,
    key: &str,
    what: &str,
    (from, to): (Option<u64>, Option<u64>),
    webhooks: usize,
) {
    if let (Some(from), Some(to)) = (from, to) {
        let per = to.saturating_sub(from) as f64 / webhooks.max(1) as f64;
        println!("PostgreSQL WAL: {per:.0} bytes {what}");
        result[key] = per.into();
    }
}

/// A run that lost or garbled webhooks, or had failed requests, is a
/// failure (exit code 1), not a figure.
fn check(
    missing: usize,
    bad: u64,
    errors: &Mutex<Vec<String>>,
    created: usize,
    n: usize,
) -> anyhow::Result<()> {
    let failed = errors.lock().unwrap().len();
    if missing > 0 || bad > 0 || failed > 0 || created < n {
        anyhow::bail!(
            "{missing} webhooks missing, {bad} bad signatures, {failed} failed requests, \
             {created} of {n} created"
        );
    }
    Ok(())
}

/// Runs `f(0..n)` with `concurrency` in flight, or open loop at `rate`
/// per second. Returns a description of the rate actually offered.
async fn drive<F, Fut>(n: usize, concurrency: usize, rate: Option<f64>, f: F) -> String
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let f = Arc::new(f);
    let started = Instant::now();
    match rate {
        None => {
            let next = Arc::new(AtomicUsize::new(0));
            let mut tasks = tokio::task::JoinSet::new();
            for _ in 0..concurrency.clamp(1, n.max(1)) {
                let (f, next) = (f.clone(), next.clone());
                tasks.spawn(async move {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= n {
                            return;
                        }
                        f(i).await;
                    }
                });
            }
            while tasks.join_next().await.is_some() {}
            format!("closed loop, {concurrency} in flight")
        }
        Some(rate) => {
            // Each request starts on its own schedule, whatever the ones
            // before it are doing (no coordinated omission), up to a cap
            // on requests in flight so that an overload cannot exhaust
            // memory; hitting it is reported.
            let cap = Arc::new(tokio::sync::Semaphore::new(20_000));
            let mut capped = 0usize;
            let mut tasks = tokio::task::JoinSet::new();
            let period = Duration::from_secs_f64(1.0 / rate);
            for i in 0..n {
                tokio::time::sleep_until((started + period.mul_f64(i as f64)).into()).await;
                let permit = match cap.clone().try_acquire_owned() {
                    Ok(p) => p,
                    Err(_) => {
                        capped += 1;
                        cap.clone().acquire_owned().await.expect("semaphore open")
                    }
                };
                let f = f.clone();
                tasks.spawn(async move {
                    f(i).await;
                    drop(permit);
                });
                while tasks.try_join_next().is_some() {}
            }
            let spread = started.elapsed();
            while tasks.join_next().await.is_some() {}
            format!(
                "open loop at {rate}/s, achieved {:.0}/s{}",
                n as f64 / spread.as_secs_f64().max(1e-9),
                if capped > 0 {
                    format!(", {capped} starts waited for the in-flight cap")
                } else {
                    String::new()
                }
            )
        }
    }
}

fn report_errors(errors: &Mutex<Vec<String>>) {
    let errors = errors.lock().unwrap();
    if !errors.is_empty() {
        println!("ERRORS: {} (first: {})", errors.len(), errors[0]);
    }
}

/// Prints each group's CPU and wake-ups, and their sum over the service,
/// PostgreSQL and Redis, which it returns.
fn print_cpu(cpu: &[(String, f64)], wakeups: &[(String, u64)], webhooks: usize) -> (f64, u64) {
    println!(
        "CPU seconds (from /proc/<pid>/stat) and wake-ups (voluntary context switches), per webhook:"
    );
    let (mut service_cpu, mut service_wakeups) = (0.0, 0);
    for ((name, secs), (_, woke)) in cpu.iter().zip(wakeups) {
        print_usage("  ", name, *secs, *woke, webhooks);
        if is_service(name) {
            service_cpu += secs;
            service_wakeups += woke;
        }
    }
    print_usage(
        "  ",
        "service + PostgreSQL + Redis",
        service_cpu,
        service_wakeups,
        webhooks,
    );
    (service_cpu, service_wakeups)
}

/// One line of the CPU report: seconds, then per webhook.
fn print_usage(indent: &str, label: &str, secs: f64, woke: u64, webhooks: usize) {
    let per = |x: f64| x / webhooks.max(1) as f64;
    let width = 50 - indent.len();
    println!(
        "{indent}{label:<width$} {secs:>8.2} s  {:>8.3} ms/webhook  {:>6.1} wake-ups/webhook",
        per(secs * 1e3),
        per(woke as f64)
    );
}

/// The service processes' CPU and wake-ups by thread name (which threads
/// a webhook wakes, and which of them work), printed and as `RESULT`'s
/// `threads`: `{process: {thread name: {threads, cpu_ms_per_webhook,
/// wakeups_per_webhook}}}`.
fn print_threads(
    used: &[measure::ThreadUse],
    procs: &[(String, u32)],
    webhooks: usize,
) -> serde_json::Value {
    let per = |x: f64| x / webhooks.max(1) as f64;
    println!(
        "  the service processes above, by thread (threads that ended during the phase are not counted):"
    );
    let mut out = serde_json::Map::new();
    for u in used {
        let Some((process, _)) = procs.iter().find(|(_, pid)| *pid == u.pid) else {
            continue;
        };
        let process = service_group(process);
        let label = format!("{process} · {} ×{}", u.name, u.threads);
        print_usage("    ", &label, u.cpu, u.wakeups, webhooks);
        let entry = out
            .entry(process)
            .or_insert_with(|| serde_json::Value::Object(Default::default()));
        entry[u.name.as_str()] = serde_json::json!({
            "threads": u.threads,
            "cpu_ms_per_webhook": per(u.cpu * 1e3),
            "wakeups_per_webhook": per(u.wakeups as f64),
        });
    }
    out.into()
}

fn print_memory(procs: &[(String, u32)], result: &mut serde_json::Value, label: &str, key: &str) {
    println!("Service memory ({label}):");
    for (name, pid) in procs {
        let rss = measure::status_kb(*pid, "VmRSS").unwrap_or(0);
        let hwm = measure::status_kb(*pid, "VmHWM").unwrap_or(0);
        println!(
            "  uploadhook {name:<10} RSS {:.1} MB, peak (VmHWM) {:.1} MB",
            rss as f64 / 1024.0,
            hwm as f64 / 1024.0
        );
        result[format!("rss_mb_{key}_{name}")] = (rss as f64 / 1024.0).into();
        result[format!("peak_rss_mb_{key}_{name}")] = (hwm as f64 / 1024.0).into();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_cpu_over_the_control_processes() {
        let cpu = |groups: &[(&str, f64)]| -> Vec<(String, f64)> {
            groups.iter().map(|(n, c)| (n.to_string(), *c)).collect()
        };
        let run = cpu(&[
            ("loadgen (this tool, incl. receiver)", 1.0),
            (S3_GROUP, 3.0),
            ("uploadhook api", 2.0),
            ("postgres backends (this database)", 4.0),
            ("redis-server", 0.5),
        ]);
        assert_eq!(service_over_control(&run), Some(6.5 / 4.0));
        // A floor run has no service; a run without control, no ratio.
        assert_eq!(service_over_control(&run[..2]), None);
        assert_eq!(service_over_control(&run[2..]), None);
    }
}
