//! The `uploadhook` command: parses the command line and calls the library.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use uploadhook::{clock::Clock, config::Config};

/// mimalloc instead of the system allocator: glibc's malloc and free were
/// about a fifth of the service's own CPU under load (docs/benchmarks-history.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "uploadhook",
    version,
    about = "Signed webhooks when a file has really landed in object storage"
)]
struct Cli {
    /// Config file (TOML) layered over the defaults; environment variables
    /// UPLOADHOOK_<SECTION>__<KEY> override both.
    #[arg(long, global = true, env = "UPLOADHOOK_CONFIG")]
    config: Option<PathBuf>,
    /// Log lines as human-readable text or as one JSON object per line.
    /// The level filter is UPLOADHOOK_LOG (default "info").
    #[arg(long, global = true, env = "UPLOADHOOK_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Runs the API and the pipeline in one process (migrates first unless
    /// disabled).
    Serve,
    /// Runs the API only (gRPC, REST); needs queue.backend = "redis".
    Api,
    /// Runs the pipeline only (verify, deliver, reconcile); needs
    /// queue.backend = "redis".
    Worker,
    /// Applies database migrations.
    Migrate,
    /// Prints queue depth, delayed and poison counts, dead letters and
    /// webhooks by status.
    Status,
    /// Redrives webhooks in bulk (operators): dead letters by default.
    /// Attempts restart; the history is kept.
    Redrive {
        /// Only this tenant's webhooks (by name).
        #[arg(long)]
        tenant: Option<String>,
        /// Statuses to redrive, comma-separated: dead_letter, failed,
        /// completed.
        #[arg(long, value_delimiter = ',', default_value = "dead_letter")]
        status: Vec<String>,
        /// Only webhooks that entered their status at or after this time:
        /// RFC 3339, or a duration ago such as `24h`.
        #[arg(long)]
        since: Option<String>,
        /// Only webhooks that entered their status before this time.
        #[arg(long)]
        until: Option<String>,
        /// At most this many webhooks.
        #[arg(long)]
        limit: Option<u64>,
        /// Counts what would be redriven; changes nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Prints the OpenAPI 3 document of the REST API (as served at
    /// /openapi.json): `uploadhook openapi > docs/openapi.json`.
    Openapi,
    /// Manages API keys.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Creates a key for a tenant (created when missing) and prints it once.
    Create {
        #[arg(long)]
        tenant: String,
        /// The key stops working after this long (e.g. 90d, 12h); no
        /// expiry when left out.
        #[arg(long, value_parser = uploadhook::config::parse_duration)]
        expires_in: Option<std::time::Duration>,
    },
    /// Lists keys (never the keys themselves).
    List,
    /// Revokes a key by its id (`key_…`); effective at once.
    Revoke { id: String },
    /// Re-seals every stored webhook signing secret under the active
    /// master key (the first of encryption.keys), in batches. Safe to run
    /// again and beside running processes; afterwards the older master
    /// keys can be removed from encryption.keys.
    RotateMaster {
        /// Rows read and written per batch.
        #[arg(long, default_value_t = 500)]
        batch: u64,
    },
    /// Prints a new random master key entry `ID:BASE64` for encryption.keys.
    NewMasterKey {
        #[arg(long)]
        id: String,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Command::Openapi = cli.command {
        return out(&uploadhook::openapi_json()?);
    }
    let cfg = Config::load(cli.config.as_deref()).context("loading configuration")?;
    let format = match cli.log_format {
        LogFormat::Text => uploadhook::telemetry::LogFormat::Text,
        LogFormat::Json => uploadhook::telemetry::LogFormat::Json,
    };
    // Flushes the last spans when main returns.
    let _telemetry = uploadhook::telemetry::init(&cfg.telemetry, format)?;
    match cli.command {
        Command::Serve => uploadhook::serve(cfg, uploadhook::Roles::ALL).await,
        Command::Api => uploadhook::serve(cfg, uploadhook::Roles::API).await,
        Command::Worker => uploadhook::serve(cfg, uploadhook::Roles::WORKER).await,
        Command::Migrate => {
            uploadhook::migrate(&cfg).await?;
            println!("migrations applied");
            Ok(())
        }
        // Needs no database: print a fresh master key entry.
        Command::Keys {
            command: KeysCommand::NewMasterKey { id },
        } => {
            let entry = uploadhook::secrets::Keyring::generate_entry(&id);
            uploadhook::secrets::Keyring::parse(&entry).context("--id")?;
            println!("{entry}");
            Ok(())
        }
        Command::Keys { command } => keys(&cfg, command).await,
        Command::Redrive {
            tenant,
            status,
            since,
            until,
            limit,
            dry_run,
        } => {
            uploadhook::migrate(&cfg).await?;
            let now = uploadhook::clock::SystemClock.now();
            let tenant = match tenant {
                None => None,
                Some(name) => Some(
                    uploadhook::open_store(&cfg)
                        .await?
                        .tenant_by_name(&name)
                        .await?
                        .with_context(|| format!("--tenant: no tenant named {name:?}"))?,
                ),
            };
            let filter = uploadhook::store::RedriveFilter {
                tenant,
                statuses: status
                    .iter()
                    .map(|s| parse_redrivable(s))
                    .collect::<anyhow::Result<_>>()?,
                since: since.map(|s| parse_time("--since", &s, now)).transpose()?,
                until: until.map(|s| parse_time("--until", &s, now)).transpose()?,
            };
            let report = uploadhook::ops::bulk_redrive(&cfg, &filter, limit, dry_run).await?;
            out(&report.to_string())
        }
        Command::Openapi => unreachable!("handled before the configuration is loaded"),
        Command::Status => {
            uploadhook::migrate(&cfg).await?;
            out(&uploadhook::ops::status(&cfg).await?.to_string())
        }
    }
}

/// Writes a command's report to stdout. A reader that went away
/// (`uploadhook status | head`) is not an error.
fn out(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => Ok(r?),
    }
}

fn parse_redrivable(s: &str) -> anyhow::Result<uploadhook::domain::Status> {
    use uploadhook::domain::Status;
    match Status::parse(s.trim()) {
        Some(st @ (Status::DeadLetter | Status::Failed | Status::Completed)) => Ok(st),
        _ => anyhow::bail!("--status: {s:?} is not one of dead_letter, failed, completed"),
    }
}

/// RFC 3339, or a duration before `now` (`24h`, `30m`).
fn parse_time(
    flag: &str,
    s: &str,
    now: chrono::DateTime<chrono::Utc>,
) -> anyhow::Result<chrono::DateTime<chrono::Utc>> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Ok(t.to_utc());
    }
    let ago = uploadhook::config::parse_duration(s)
        .map_err(|e| anyhow::anyhow!("{flag}: not an RFC 3339 time nor a duration ago ({e})"))?;
    Ok(now - chrono::Duration::from_std(ago)?)
}

async fn keys(cfg: &Config, command: KeysCommand) -> anyhow::Result<()> {
    uploadhook::migrate(cfg).await?;
    let store = uploadhook::open_store(cfg).await?;
    let now = uploadhook::clock::SystemClock.now();
    match command {
        KeysCommand::Create { tenant, expires_in } => {
            if tenant.trim().is_empty() || tenant.len() > 64 {
                anyhow::bail!("--tenant must be 1 to 64 characters");
            }
            let expires_at = match expires_in {
                Some(d) if d.is_zero() => anyhow::bail!("--expires-in must be positive"),
                Some(d) => Some(
                    chrono::Duration::from_std(d)
                        .ok()
                        .and_then(|d| now.checked_add_signed(d))
                        .context("--expires-in is too long")?,
                ),
                None => None,
            };
            let key = store
                .create_api_key_expiring(tenant.trim(), now, expires_at)
                .await?;
            println!("tenant: {}", tenant.trim());
            println!("key id: {}", key.id);
            if let Some(at) = expires_at {
                println!("expires: {}", at.to_rfc3339());
            }
            println!("api key (shown once): {}", key.plaintext);
        }
        KeysCommand::List => {
            println!(
                "{:<38} {:<16} {:<14} {:<26} {:<26} {:<26} last used",
                "id", "tenant", "prefix", "created", "expires", "revoked"
            );
            for k in store.list_api_keys().await? {
                let fmt = |t: Option<chrono::DateTime<chrono::Utc>>| {
                    t.map(|t| t.to_rfc3339()).unwrap_or_else(|| "-".into())
                };
                println!(
                    "{:<38} {:<16} {:<14} {:<26} {:<26} {:<26} {}",
                    k.id,
                    k.tenant,
                    format!("{}…", k.prefix),
                    k.created_at.to_rfc3339(),
                    fmt(k.expires_at),
                    fmt(k.revoked_at),
                    fmt(k.last_used_at)
                );
            }
        }
        KeysCommand::Revoke { id } => {
            if store.revoke_api_key(&id, now).await? {
                println!("revoked {id}");
            } else {
                anyhow::bail!("no active key with id {id}");
            }
        }
        KeysCommand::RotateMaster { batch } => {
            if batch == 0 {
                anyhow::bail!("--batch must be at least 1");
            }
            let report = store.rotate_master(batch).await?;
            println!(
                "re-sealed {} webhook(s) under master key `{}`",
                report.resealed,
                store.keyring().active_id()
            );
            if report.skipped > 0 {
                println!(
                    "{} changed meanwhile and were left alone: run again",
                    report.skipped
                );
            }
            for (id, err) in &report.failed {
                eprintln!("{id}: {err}");
            }
            if !report.failed.is_empty() {
                anyhow::bail!(
                    "{} webhook(s) could not be opened; keep their master keys configured",
                    report.failed.len()
                );
            }
        }
        KeysCommand::NewMasterKey { .. } => anyhow::bail!("handled without a database"),
    }
    Ok(())
}
