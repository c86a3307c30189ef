//! The `uploadhook` command: parses the command line and calls the library.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use uploadhook::{clock::Clock, config::Config};

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
    #[command(subcommand)]
    command: Command,
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
    },
    /// Lists keys (never the keys themselves).
    List,
    /// Revokes a key by its id (`key_…`); effective at once.
    Revoke { id: String },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("UPLOADHOOK_LOG").unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new("info,sqlx=warn,sea_orm=warn")
            }),
        )
        .with_writer(std::io::stderr)
        .init();

    let cli = Cli::parse();
    if let Command::Openapi = cli.command {
        print!("{}", uploadhook::openapi_json()?);
        return Ok(());
    }
    let cfg = Config::load(cli.config.as_deref()).context("loading configuration")?;
    match cli.command {
        Command::Serve => uploadhook::serve(cfg, uploadhook::Roles::ALL).await,
        Command::Api => uploadhook::serve(cfg, uploadhook::Roles::API).await,
        Command::Worker => uploadhook::serve(cfg, uploadhook::Roles::WORKER).await,
        Command::Migrate => {
            uploadhook::migrate(&cfg).await?;
            println!("migrations applied");
            Ok(())
        }
        Command::Keys { command } => keys(&cfg, command).await,
        Command::Openapi => unreachable!("handled before the configuration is loaded"),
        Command::Status => {
            uploadhook::migrate(&cfg).await?;
            print!("{}", uploadhook::ops::status(&cfg).await?);
            Ok(())
        }
    }
}

async fn keys(cfg: &Config, command: KeysCommand) -> anyhow::Result<()> {
    uploadhook::migrate(cfg).await?;
    let store = uploadhook::open_store(cfg).await?;
    let now = uploadhook::clock::SystemClock.now();
    match command {
        KeysCommand::Create { tenant } => {
            if tenant.trim().is_empty() || tenant.len() > 64 {
                anyhow::bail!("--tenant must be 1 to 64 characters");
            }
            let key = store.create_api_key(tenant.trim(), now).await?;
            println!("tenant: {}", tenant.trim());
            println!("key id: {}", key.id);
            println!("api key (shown once): {}", key.plaintext);
        }
        KeysCommand::List => {
            println!(
                "{:<38} {:<16} {:<14} {:<26} {:<26} last used",
                "id", "tenant", "prefix", "created", "revoked"
            );
            for k in store.list_api_keys().await? {
                let fmt = |t: Option<chrono::DateTime<chrono::Utc>>| {
                    t.map(|t| t.to_rfc3339()).unwrap_or_else(|| "-".into())
                };
                println!(
                    "{:<38} {:<16} {:<14} {:<26} {:<26} {}",
                    k.id,
                    k.tenant,
                    format!("{}…", k.prefix),
                    k.created_at.to_rfc3339(),
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
    }
    Ok(())
}
