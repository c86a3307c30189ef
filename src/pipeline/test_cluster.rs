//! A private three-node Redis Cluster for tests: `redis-server` child
//! processes on free loopback ports, joined with `redis-cli --cluster
//! create`, without persistence, in a temporary directory; killed when the
//! last test holding it lets go.
//!
//! Tests running at the same time share one cluster (each works under a
//! key prefix of its own). Skipped, with a message, when `redis-server` or
//! `redis-cli` is missing, unless `UPLOADHOOK_REQUIRE_SERVICES=1`.
//!
//! [`TestCluster::get_tls`] starts another one that speaks TLS only (no
//! plain port; `tls-cluster yes`), with a CA and a certificate made by
//! the test.

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex, Weak},
    time::{Duration, Instant},
};

use super::test_pki::{TestCa, write_pem};

const NODES: usize = 3;
/// Each of the start-up steps must be done within this.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);

/// A running cluster; its processes are killed when this is dropped.
pub(crate) struct TestCluster {
    children: Vec<Child>,
    ports: Vec<u16>,
    tls: Option<Tls>,
    _dir: tempfile::TempDir,
}

/// The PEM files of a TLS cluster: the CA, and the one certificate (for
/// 127.0.0.1) that every node shows as a server and to each other.
struct Tls {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

impl TestCluster {
    /// The shared cluster, started if none is running; `None` (skip) when
    /// the Redis binaries are missing.
    pub(crate) fn get() -> Option<Arc<Self>> {
        static SHARED: Mutex<Weak<TestCluster>> = Mutex::new(Weak::new());
        Self::shared(&SHARED, false)
    }

    /// The shared TLS cluster, as [`TestCluster::get`].
    pub(crate) fn get_tls() -> Option<Arc<Self>> {
        static SHARED: Mutex<Weak<TestCluster>> = Mutex::new(Weak::new());
        Self::shared(&SHARED, true)
    }

    fn shared(shared: &Mutex<Weak<TestCluster>>, tls: bool) -> Option<Arc<Self>> {
        if !tools_present() {
            assert_ne!(
                std::env::var("UPLOADHOOK_REQUIRE_SERVICES").as_deref(),
                Ok("1"),
                "UPLOADHOOK_REQUIRE_SERVICES=1 but redis-server or redis-cli is not on PATH"
            );
            eprintln!("skipping Redis Cluster: redis-server or redis-cli is not on PATH");
            return None;
        }
        // A poisoned lock only means a test panicked while holding it.
        let mut shared = shared.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = shared.upgrade() {
            return Some(c);
        }
        let c = Arc::new(Self::start(tls));
        *shared = Arc::downgrade(&c);
        Some(c)
    }

    /// `redis+cluster://` (`rediss+cluster://` on TLS) through the first
    /// node.
    pub(crate) fn url(&self) -> String {
        let scheme = if self.tls.is_some() {
            "rediss+cluster"
        } else {
            "redis+cluster"
        };
        format!("{scheme}://127.0.0.1:{}", self.ports[0])
    }

    /// The CA that signed a TLS cluster's certificate (PEM file).
    pub(crate) fn ca_file(&self) -> Option<&Path> {
        self.tls.as_ref().map(|t| t.ca.as_path())
    }

    fn start(tls: bool) -> Self {
        let began = Instant::now();
        let dir = tempfile::tempdir().expect("temporary directory");
        let ports = free_ports(NODES);
        let tls = tls.then(|| {
            let ca = TestCa::new("uploadhook test cluster CA");
            let (cert, key) = ca.issue(&["127.0.0.1", "localhost"]);
            Tls {
                ca: write_pem(dir.path(), "ca.pem", &ca.cert_pem),
                cert: write_pem(dir.path(), "node.pem", &cert),
                key: write_pem(dir.path(), "node.key", &key),
            }
        });
        let mut cluster = Self {
            children: Vec::new(),
            ports: ports.clone(),
            tls,
            _dir: dir,
        };
        let dir = cluster._dir.path().to_path_buf();
        for &port in &ports {
            let mut cmd = Command::new("redis-server");
            match &cluster.tls {
                None => {
                    cmd.args(["--port", &port.to_string()]);
                }
                Some(t) => {
                    cmd.args(["--port", "0", "--tls-port", &port.to_string()])
                        .args(["--tls-cluster", "yes", "--tls-auth-clients", "no"])
                        .arg("--tls-cert-file")
                        .arg(&t.cert)
                        .arg("--tls-key-file")
                        .arg(&t.key)
                        .arg("--tls-ca-cert-file")
                        .arg(&t.ca);
                }
            }
            let child = cmd
                .args(["--bind", "127.0.0.1"])
                .args(["--cluster-enabled", "yes"])
                .arg("--cluster-config-file")
                .arg(dir.join(format!("nodes-{port}.conf")))
                .arg("--dir")
                .arg(&dir)
                .args(["--save", ""])
                .args(["--appendonly", "no"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("starting redis-server");
            cluster.children.push(child);
        }
        for &port in &ports {
            wait_until(|| {
                cluster
                    .cli(port, &["PING"])
                    .is_some_and(|o| o.trim() == "PONG")
            });
        }
        let nodes: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let out = cluster
            .cli_command()
            .arg("--cluster")
            .arg("create")
            .args(&nodes)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("running redis-cli --cluster create");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        // Every node, not just one, must agree before a client asks any of
        // them for the layout.
        for &port in &ports {
            wait_until(|| {
                cluster
                    .cli(port, &["CLUSTER", "INFO"])
                    .is_some_and(|o| o.contains("cluster_state:ok"))
            });
        }
        eprintln!(
            "started a{} Redis Cluster on ports {ports:?} in {:?}",
            if cluster.tls.is_some() { " TLS" } else { "" },
            began.elapsed()
        );
        cluster
    }

    /// `redis-cli`, with the TLS options a TLS cluster needs.
    fn cli_command(&self) -> Command {
        let mut cmd = Command::new("redis-cli");
        if let Some(t) = &self.tls {
            cmd.arg("--tls")
                .arg("--cacert")
                .arg(&t.ca)
                .arg("--cert")
                .arg(&t.cert)
                .arg("--key")
                .arg(&t.key);
        }
        cmd
    }

    /// `redis-cli -p port args…`'s output, or None when it failed.
    fn cli(&self, port: u16, args: &[&str]) -> Option<String> {
        let out = self
            .cli_command()
            .args(["-h", "127.0.0.1", "-p", &port.to_string()])
            .args(args)
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn tools_present() -> bool {
    ["redis-server", "redis-cli"].iter().all(|bin| {
        Command::new(bin)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
}

/// Polls `ready` every 20 ms, for at most [`STEP_TIMEOUT`].
fn wait_until(mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + STEP_TIMEOUT;
    while !ready() {
        assert!(
            Instant::now() < deadline,
            "the test Redis Cluster did not come up"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Ports free now whose cluster bus port (port + 10000) is free too. Held
/// open until all are chosen, so that they differ.
fn free_ports(n: usize) -> Vec<u16> {
    let mut held = Vec::new();
    let mut ports = Vec::new();
    for _ in 0..1000 {
        if ports.len() == n {
            break;
        }
        let Ok(l) = TcpListener::bind("127.0.0.1:0") else {
            continue;
        };
        let port = l.local_addr().expect("local address").port();
        let Some(bus) = port.checked_add(10_000) else {
            continue;
        };
        let Ok(b) = TcpListener::bind(("127.0.0.1", bus)) else {
            continue;
        };
        ports.push(port);
        held.push((l, b));
    }
    assert_eq!(ports.len(), n, "no free ports for the test Redis Cluster");
    ports
}
