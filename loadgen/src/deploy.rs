//! Starting a deployment from the release `uploadhook` binary: config
//! files, a fresh database (and Redis prefix), an API key, the processes,
//! and cleaning all of it up afterwards.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use anyhow::{Context, bail};
use std::process::{Child, Command, Output};

use crate::stages;

#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
pub enum Kind {
    /// `serve`: SQLite, in-process queue, embedded S3 server.
    Embedded,
    /// PostgreSQL + Redis, one `api` and one `worker`.
    PgRedis1,
    /// PostgreSQL + Redis, one `api` and two `worker`s.
    PgRedis2,
}

pub struct Options {
    pub kind: Kind,
    pub bin: PathBuf,
    pub database_url: String,
    pub redis_url: String,
    /// TOML lines added to every process's `[delivery]` section (e.g. a
    /// retry schedule).
    pub delivery_toml: String,
    /// Environment variables for every process (`UPLOADHOOK_SECTION__KEY`).
    pub env: Vec<(String, String)>,
    /// Run the service processes under `valgrind --tool=callgrind`.
    pub callgrind: bool,
}

pub struct Process {
    pub name: String,
    pub child: Child,
    /// Its HTTP port (`/readyz`, `/metrics`).
    pub http_port: u16,
}

impl Process {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

pub struct Deployment {
    pub grpc_url: String,
    pub api_key: String,
    /// The storage connection to name in Create ("" when there is one).
    pub storage: String,
    pub s3_endpoint: String,
    /// The base config (for building the floor's clients from it).
    pub base_toml: String,
    pub processes: Vec<Process>,
    /// The S3 server: this binary with `--serve-s3`, a process of its own.
    s3: Option<Child>,
    pub dir: PathBuf,
    /// The PostgreSQL database and Redis prefix to drop afterwards.
    pg: Option<(String, String)>,
    redis: Option<(String, String)>,
    env: Vec<(String, String)>,
    callgrind: bool,
}

/// The `_count` and `_sum` of the write-group histogram in a Prometheus
/// text exposition (0 where absent).
fn write_groups_in(text: &str) -> (u64, u64) {
    let value = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .map_or(0, |v| v as u64)
    };
    (
        value("uploadhook_write_group_size_count"),
        value("uploadhook_write_group_size_sum"),
    )
}

/// The `totals:` line of a callgrind profile: the instructions counted
/// in it, over every thread.
fn instructions_in(profile: &str) -> Option<u64> {
    profile
        .lines()
        .find_map(|l| l.strip_prefix("totals:"))
        .and_then(|n| n.trim().parse().ok())
}

async fn callgrind_control(args: &[&str]) -> anyhow::Result<String> {
    let mut cmd = Command::new("callgrind_control");
    cmd.args(args);
    let out = tokio::time::timeout(Duration::from_secs(120), output(cmd))
        .await
        .context("callgrind_control did not answer within 120 s")?
        .context("running callgrind_control (valgrind)")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    // It exits with 0 whatever happened; "OK." says the command was done.
    if !out.status.success() || !text.contains("OK.") {
        bail!(
            "callgrind_control {}: {text}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(text)
}

/// Runs a short command to completion off the async runtime.
async fn output(mut cmd: Command) -> std::io::Result<Output> {
    tokio::task::spawn_blocking(move || cmd.output())
        .await
        .map_err(std::io::Error::other)?
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn random_name(prefix: &str) -> String {
    format!("{prefix}{}", uuid::Uuid::new_v4().simple())[..prefix.len() + 12].to_string()
}

/// Replaces the database name of a postgres:// URL, keeping its
/// parameters (`?sslmode=disable`, whose value may hold a `/`).
fn with_database(url: &str, db: &str) -> anyhow::Result<String> {
    let (path, query) = match url.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (url, None),
    };
    // A `dbname=` parameter would take the service to another database
    // than the one this tool creates, measures and drops.
    if query.is_some_and(|q| q.split('&').any(|kv| kv.starts_with("dbname="))) {
        bail!("--database-url: give the database in the path, not as ?dbname=");
    }
    let (base, _) = path
        .rsplit_once('/')
        .filter(|(b, _)| b.contains("://"))
        .context("--database-url must end with /<database>, before any ?parameters")?;
    Ok(match query {
        Some(q) => format!("{base}/{db}?{q}"),
        None => format!("{base}/{db}"),
    })
}

/// Runs `cmd` to completion and returns what it printed; an error, with
/// what it printed on stderr, if it failed. `what` names it in errors.
async fn capture(cmd: Command, what: &str) -> anyhow::Result<String> {
    let out = output(cmd)
        .await
        .with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        bail!("{what}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

async fn psql(url: &str, sql: &str) -> anyhow::Result<String> {
    let mut cmd = Command::new("psql");
    cmd.args([url, "-XAtq", "-v", "ON_ERROR_STOP=1", "-c", sql]);
    capture(cmd, "psql (PostgreSQL client)").await
}

async fn run_cli(bin: &Path, config: &Path, args: &[&str]) -> anyhow::Result<String> {
    let mut cmd = Command::new(bin);
    cmd.arg("--config")
        .arg(config)
        .args(args)
        .env("NO_COLOR", "1");
    capture(cmd, &format!("uploadhook {}", args.join(" "))).await
}

/// The master key of a throwaway benchmark deployment (its database is
/// dropped after the run). The per-tenant rate limit is off: the load
/// generator is one tenant by design.
const BENCH_MASTER_KEY: &str = "bench:YmVuY2htYXJrLW9ubHktbWFzdGVyLWtleS0zMmJ5dGU=";

impl Deployment {
    pub async fn start(opts: &Options) -> anyhow::Result<Deployment> {
        if !opts.bin.exists() {
            bail!(
                "--bin {}: not found; build it with `cargo build --release -p loadgen -p uploadhook`",
                opts.bin.display()
            );
        }
        let dir = std::env::temp_dir().join(random_name("uploadhook-loadgen-"));
        std::fs::create_dir_all(&dir)?;
        let (grpc, http, s3) = (free_port()?, free_port()?, free_port()?);
        let s3_endpoint = format!("http://127.0.0.1:{s3}");
        // Every process reaches the S3 server as a configured connection
        // (so the embedded one is off), with the stand-in's default keys.
        let common = format!(
            "[delivery]\nallow_cidrs = [\"127.0.0.1/32\"]\n{}\
             [api]\nrate_limit_per_second = 0.0\n\
             [encryption]\nkeys = \"{BENCH_MASTER_KEY}\"\n\
             [bootstrap]\ndev_tenant = \"\"\n\
             [embedded_s3]\nmode = \"off\"\n\
             [storage.main]\nkind = \"s3-compatible\"\nbucket = \"uploads\"\n\
             endpoint = \"{s3_endpoint}\"\npath_style = true\naccess_key_id = \"uploadhook-dev\"\n\
             secret_access_key = \"uploadhook-dev-secret\"\n",
            opts.delivery_toml,
        );
        let mut d = Deployment {
            grpc_url: format!("http://127.0.0.1:{grpc}"),
            api_key: String::new(),
            storage: "main".into(),
            s3_endpoint,
            base_toml: common.clone(),
            processes: Vec::new(),
            s3: None,
            dir: dir.clone(),
            pg: None,
            redis: None,
            env: Vec::new(),
            callgrind: opts.callgrind,
        };
        let api_toml;
        let mut worker_tomls = Vec::new();
        match opts.kind {
            Kind::Embedded => {
                api_toml = format!(
                    "{common}[server]\ngrpc_addr = \"127.0.0.1:{grpc}\"\nhttp_addr = \"127.0.0.1:{http}\"\n\
                     [database]\nurl = \"sqlite://{}?mode=rwc\"\n",
                    dir.join("uploadhook.db").display(),
                );
            }
            Kind::PgRedis1 | Kind::PgRedis2 => {
                let db = random_name("uh_bench_");
                psql(&opts.database_url, &format!("CREATE DATABASE {db}")).await?;
                d.pg = Some((opts.database_url.clone(), db.clone()));
                let prefix = random_name("uhbench-");
                d.redis = Some((opts.redis_url.clone(), prefix.clone()));
                let url = with_database(&opts.database_url, &db)?;
                let shared = format!(
                    "{common}[database]\nurl = \"{url}\"\n\
                     [queue]\nbackend = \"redis\"\nredis_url = \"{}\"\nprefix = \"{prefix}\"\n",
                    opts.redis_url
                );
                api_toml = format!(
                    "{shared}[server]\ngrpc_addr = \"127.0.0.1:{grpc}\"\nhttp_addr = \"127.0.0.1:{http}\"\n"
                );
                let workers = if opts.kind == Kind::PgRedis1 { 1 } else { 2 };
                for _ in 0..workers {
                    worker_tomls.push(format!(
                        "{shared}[server]\nhttp_addr = \"127.0.0.1:{}\"\n",
                        free_port()?,
                    ));
                }
            }
        }
        d.base_toml = api_toml.clone();
        d.start_s3(s3).await?;
        let api_cfg = dir.join("api.toml");
        std::fs::write(&api_cfg, &api_toml)?;
        run_cli(&opts.bin, &api_cfg, &["migrate"]).await?;
        let out = run_cli(
            &opts.bin,
            &api_cfg,
            &["keys", "create", "--tenant", "bench"],
        )
        .await?;
        d.api_key = out
            .lines()
            .find_map(|l| l.strip_prefix("api key (shown once): "))
            .context("`uploadhook keys create` printed no key")?
            .trim()
            .to_string();

        let role = if opts.kind == Kind::Embedded {
            "serve"
        } else {
            "api"
        };
        d.env = opts.env.clone();
        d.spawn(&opts.bin, "api", &api_cfg, role, http).await?;
        for (i, toml) in worker_tomls.iter().enumerate() {
            let cfg = dir.join(format!("worker-{i}.toml"));
            std::fs::write(&cfg, toml)?;
            let port: u16 = toml
                .split("http_addr = \"127.0.0.1:")
                .nth(1)
                .and_then(|r| r.split('"').next())
                .and_then(|p| p.parse().ok())
                .context("worker port")?;
            d.spawn(&opts.bin, &format!("worker-{i}"), &cfg, "worker", port)
                .await?;
        }
        Ok(d)
    }

    /// Starts the S3 server (this binary with `--serve-s3`) on `port` and
    /// waits until it accepts connections.
    async fn start_s3(&mut self, port: u16) -> anyhow::Result<()> {
        let log = self.dir.join("s3.log");
        let file = std::fs::File::create(&log)?;
        let child = Command::new(std::env::current_exe()?)
            .arg("--serve-s3")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--s3-root")
            .arg(self.dir.join("objects"))
            .stdout(Stdio::from(file.try_clone()?))
            .stderr(Stdio::from(file))
            .spawn()
            .context("starting the S3 server")?;
        let child = self.s3.insert(child);
        for _ in 0..300 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return Ok(());
            }
            if let Ok(Some(status)) = child.try_wait() {
                bail!(
                    "the S3 server exited ({status}); log:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!(
            "the S3 server did not listen within 30 s; log in {}",
            log.display()
        )
    }

    /// Write groups so far, summed over the service's processes: (database
    /// transactions, writes), from each process's
    /// `uploadhook_write_group_size` histogram. Best effort: a scrape that
    /// fails leaves the figure out (with a warning), not the run.
    pub async fn write_groups(&self) -> Option<(u64, u64)> {
        self.scrape_write_groups()
            .await
            .map_err(|e| eprintln!("write groups not reported: /metrics: {e:#}"))
            .ok()
    }

    async fn scrape_write_groups(&self) -> anyhow::Result<(u64, u64)> {
        let http = reqwest::Client::new();
        let (mut groups, mut writes) = (0, 0);
        for p in &self.processes {
            let url = format!("http://127.0.0.1:{}/metrics", p.http_port);
            let text = http
                .get(&url)
                .send()
                .await?
                .error_for_status()?
                .text()
                .await?;
            let (g, w) = write_groups_in(&text);
            groups += g;
            writes += w;
        }
        Ok((groups, writes))
    }

    /// Zeroes the instruction counters of the service processes (run
    /// under callgrind).
    pub async fn callgrind_zero(&self) -> anyhow::Result<()> {
        for p in &self.processes {
            callgrind_control(&["-z", &p.pid().to_string()]).await?;
        }
        Ok(())
    }

    /// Instructions each service process executed since its counters were
    /// zeroed, by name: each writes a profile (`<name>.callgrind.<n>`, every
    /// thread's counts in one file), whose totals are read.
    pub async fn callgrind_instructions(&self) -> anyhow::Result<Vec<(String, u64)>> {
        let mut out = Vec::new();
        for p in &self.processes {
            callgrind_control(&["--dump=confirm-phase", &p.pid().to_string()]).await?;
            let prefix = format!("{}.callgrind.", p.name);
            let latest = std::fs::read_dir(&self.dir)?
                .flatten()
                .filter_map(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    let n: u32 = name.strip_prefix(&prefix)?.parse().ok()?;
                    Some((n, e.path()))
                })
                .max()
                .with_context(|| format!("{}: no callgrind profile was written", p.name))?;
            let n = instructions_in(&std::fs::read_to_string(&latest.1)?)
                .with_context(|| format!("{}: no totals", latest.1.display()))?;
            out.push((p.name.clone(), n));
        }
        Ok(out)
    }

    /// The S3 server's process id.
    pub fn s3_pid(&self) -> Option<u32> {
        self.s3.as_ref().map(Child::id)
    }

    async fn spawn(
        &mut self,
        bin: &Path,
        name: &str,
        cfg: &Path,
        role: &str,
        http_port: u16,
    ) -> anyhow::Result<()> {
        let log = self.dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log)?;
        let mut cmd = if self.callgrind {
            let mut c = Command::new("valgrind");
            c.arg("--tool=callgrind")
                .arg(format!(
                    "--callgrind-out-file={}",
                    self.dir.join(format!("{name}.callgrind")).display()
                ))
                .arg(bin);
            c
        } else {
            Command::new(bin)
        };
        let child = cmd
            .arg("--config")
            .arg(cfg)
            .arg(role)
            .env("NO_COLOR", "1")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::from(file.try_clone()?))
            .stderr(Stdio::from(file))
            .spawn()
            .with_context(|| {
                let under = if self.callgrind {
                    " under valgrind"
                } else {
                    ""
                };
                format!("starting {}{under}", bin.display())
            })?;
        self.processes.push(Process {
            name: name.to_string(),
            child,
            http_port,
        });
        // Ready when /readyz answers 200 (database and queue reachable).
        let url = format!("http://127.0.0.1:{http_port}/readyz");
        let http = reqwest::Client::new();
        // Under callgrind, start-up is many times slower.
        let tries = if self.callgrind { 3000 } else { 600 };
        for _ in 0..tries {
            if let Ok(r) = http.get(&url).send().await
                && r.status().is_success()
            {
                return Ok(());
            }
            if let Some(p) = self.processes.last_mut()
                && let Ok(Some(status)) = p.child.try_wait()
            {
                bail!(
                    "{name} exited ({status}); log:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!(
            "{name} not ready after {} s; log in {}",
            tries / 10,
            log.display()
        )
    }

    /// PostgreSQL processes serving this deployment's database (backends),
    /// and the server's shared ones (WAL writer, checkpointer, ...), which
    /// other databases on the same server use too.
    pub async fn postgres_pids(&self) -> anyhow::Result<Option<(Vec<u32>, Vec<u32>)>> {
        let Some((url, db)) = &self.pg else {
            return Ok(None);
        };
        let pids =
            |s: String| -> Vec<u32> { s.lines().filter_map(|l| l.trim().parse().ok()).collect() };
        let backends = pids(
            psql(
                url,
                &format!("SELECT pid FROM pg_stat_activity WHERE datname = '{db}'"),
            )
            .await?,
        );
        let aux = pids(
            psql(
                url,
                // Not tied to a database (autovacuum and parallel
                // workers of this one are among the backends above).
                "SELECT pid FROM pg_stat_activity WHERE datname IS NULL",
            )
            .await?,
        );
        Ok(Some((backends, aux)))
    }

    /// Where PostgreSQL's write-ahead log has been written up to, in bytes
    /// from its start (`pg_current_wal_insert_lsn`, read at once, unlike
    /// the statistics views, which backends update up to seconds late).
    /// The log is the server's: other databases' writes during a run count
    /// too.
    pub async fn postgres_wal_bytes(&self) -> Option<u64> {
        let (url, _) = self.pg.as_ref()?;
        psql(
            url,
            "SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), '0/0')::bigint",
        )
        .await
        .map_err(|e| eprintln!("WAL position not read: {e:#}"))
        .ok()?
        .trim()
        .parse()
        .ok()
    }

    /// How many of the service's connections to its PostgreSQL database
    /// use TLS, and how many there are (`pg_stat_ssl`). A URL without
    /// `sslmode` uses TLS whenever the server offers it, which changes the
    /// figures (docs/benchmarks-history.md, "Session 23").
    pub async fn postgres_tls(&self) -> Option<(u64, u64)> {
        let (url, db) = self.pg.as_ref()?;
        // Quoted as a literal below: a name of this tool's own making.
        debug_assert!(db.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'));
        let out = psql(
            url,
            &format!(
                "SELECT count(*) FILTER (WHERE s.ssl), count(*) FROM pg_stat_ssl s \
                 JOIN pg_stat_activity a USING (pid) WHERE a.datname = '{db}' \
                 AND a.application_name <> 'psql'"
            ),
        )
        .await
        .map_err(|e| eprintln!("TLS of the connections not read: {e:#}"))
        .ok()?;
        let (tls, all) = out.trim().split_once('|')?;
        Some((tls.parse().ok()?, all.parse().ok()?))
    }

    /// What the service stored of each webhook's way: see
    /// [`stages::Stored`]. PostgreSQL through `psql`; SQLite (embedded)
    /// through the `sqlite3` shell, read-only and without its rc file, when
    /// it is installed.
    pub async fn stage_times(&self) -> Option<HashMap<String, stages::Stored>> {
        let read = match &self.pg {
            Some((url, db)) => {
                async {
                    let out = psql(&with_database(url, db)?, stages::QUERY).await?;
                    Ok(stages::parse(&out, stages::micros))
                }
                .await
            }
            None => {
                let mut cmd = Command::new("sqlite3");
                cmd.args(["-readonly", "-batch", "-init", "/dev/null", "-list"])
                    .args(["-separator", "|", "-noheader", "-cmd", ".timeout 2000"])
                    .arg(self.dir.join("uploadhook.db"))
                    .arg(stages::SQLITE_QUERY);
                capture(cmd, "sqlite3 (the SQLite shell)")
                    .await
                    .map(|out| stages::parse(&out, stages::rfc3339_micros))
            }
        };
        read.map_err(|e| eprintln!("the service's stage times not read: {e:#}"))
            .ok()
    }

    /// The redis-server process (from `INFO server`).
    pub async fn redis_pid(&self) -> anyhow::Result<Option<u32>> {
        let Some((url, _)) = &self.redis else {
            return Ok(None);
        };
        let mut cmd = Command::new("redis-cli");
        cmd.args(["-u", url, "INFO", "server"]);
        let out = output(cmd).await.context("running redis-cli")?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| l.strip_prefix("process_id:"))
            .and_then(|p| p.trim().parse().ok()))
    }

    /// Stops the processes (SIGTERM, then SIGKILL after 20 s) and drops
    /// the database, the Redis keys and the data folder.
    pub async fn stop(mut self) {
        for p in &self.processes {
            let mut kill = Command::new("kill");
            kill.args(["-TERM", &p.pid().to_string()]);
            let _ = output(kill).await;
        }
        for p in &mut self.processes {
            // Under callgrind, stopping and writing the profile is slow.
            let grace = Duration::from_secs(if self.callgrind { 180 } else { 20 });
            let deadline = std::time::Instant::now() + grace;
            while matches!(p.child.try_wait(), Ok(None)) && std::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
        if let Some(mut s3) = self.s3.take() {
            let _ = s3.kill();
            let _ = s3.wait();
        }
        if let Some((url, db)) = self.pg.take()
            && let Err(e) = psql(&url, &format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)")).await
        {
            eprintln!("dropping database {db}: {e}");
        }
        if let Some((url, prefix)) = self.redis.take() {
            let script = "local n = 0 for _, k in ipairs(redis.call('KEYS', ARGV[1])) do \
                          redis.call('DEL', k) n = n + 1 end return n";
            let mut cmd = Command::new("redis-cli");
            cmd.args(["-u", &url, "EVAL", script, "0", &format!("*{prefix}*")]);
            let _ = output(cmd).await;
        }
        if self.callgrind {
            // Each process's profile of the Confirm phase (and of its
            // shutdown), written at exit: for `callgrind_annotate`.
            let kept = std::env::current_dir()
                .unwrap_or_default()
                .join(format!("callgrind-{}", random_name("")));
            let _ = std::fs::create_dir_all(&kept);
            for p in &self.processes {
                if !self.dir.join(format!("{}.callgrind", p.name)).exists() {
                    eprintln!("{}: callgrind wrote no final profile (killed?)", p.name);
                }
            }
            for entry in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
                let name = entry.file_name();
                if name.to_string_lossy().contains(".callgrind") {
                    // (copied: the data folder may be on another file system)
                    let _ = std::fs::copy(entry.path(), kept.join(&name));
                }
            }
            eprintln!("callgrind profiles in {}", kept.display());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Drop for Deployment {
    /// Never leaves a service process behind, even on an error or a panic
    /// (`stop` has already reaped them on the normal path).
    fn drop(&mut self) {
        for child in self
            .processes
            .iter_mut()
            .map(|p| &mut p.child)
            .chain(self.s3.as_mut())
        {
            if matches!(child.try_wait(), Ok(None)) {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_write_group_histogram() {
        let text = "# TYPE uploadhook_write_group_size histogram\n\
                    uploadhook_write_group_size_sum 42.0\n\
                    uploadhook_write_group_size_count 10\n\
                    uploadhook_write_group_size_bucket{le=\"1.0\"} 3\n";
        assert_eq!(write_groups_in(text), (10, 42));
        assert_eq!(write_groups_in("# EOF\n"), (0, 0));
    }

    #[test]
    fn reads_callgrinds_totals() {
        let profile = "# callgrind format\nversion: 1\ncreator: callgrind-3.19.0\n\
                       events: Ir\nsummary: 0\ntotals: 1213561085\n\nfl=(1) ???\n";
        assert_eq!(instructions_in(profile), Some(1_213_561_085));
        assert_eq!(instructions_in("events: Ir\n"), None);
    }

    #[test]
    fn replaces_the_database_of_a_url() {
        assert_eq!(
            with_database("postgres://postgres@127.0.0.1:5432/test", "x").unwrap(),
            "postgres://postgres@127.0.0.1:5432/x"
        );
        assert_eq!(
            with_database(
                "postgres://postgres@127.0.0.1:5432/test?sslmode=verify-ca&sslrootcert=/etc/ca.crt",
                "x"
            )
            .unwrap(),
            "postgres://postgres@127.0.0.1:5432/x?sslmode=verify-ca&sslrootcert=/etc/ca.crt"
        );
        assert!(with_database("nothing", "x").is_err());
        assert!(with_database("nothing?path=/a/b", "x").is_err());
        assert_eq!(
            with_database("postgres:///test?host=/run/postgresql", "x").unwrap(),
            "postgres:///x?host=/run/postgresql"
        );
        assert!(with_database("postgres://h/test?sslmode=disable&dbname=other", "x").is_err());
    }
}
