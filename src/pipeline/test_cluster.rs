//! A private three-node Redis Cluster for tests: `redis-server` child
//! processes on free loopback ports, joined with `redis-cli --cluster
//! create`, without persistence, in a temporary directory; killed when the
//! last test holding it lets go.
//!
//! Tests running at the same time share one cluster (each works under a
//! key prefix of its own). Skipped, with a message, when `redis-server` or
//! `redis-cli` is missing, unless `UPLOADHOOK_REQUIRE_SERVICES=1`.

use std::{
    net::TcpListener,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex, Weak},
    time::{Duration, Instant},
};

const NODES: usize = 3;
/// Each of the start-up steps must be done within this.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);

/// A running cluster; its processes are killed when this is dropped.
pub(crate) struct TestCluster {
    children: Vec<Child>,
    ports: Vec<u16>,
    _dir: tempfile::TempDir,
}

impl TestCluster {
    /// The shared cluster, started if none is running; `None` (skip) when
    /// the Redis binaries are missing.
    pub(crate) fn get() -> Option<Arc<Self>> {
        static SHARED: Mutex<Weak<TestCluster>> = Mutex::new(Weak::new());
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
        let mut shared = SHARED.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = shared.upgrade() {
            return Some(c);
        }
        let c = Arc::new(Self::start());
        *shared = Arc::downgrade(&c);
        Some(c)
    }

    /// `redis+cluster://` through the first node.
    pub(crate) fn url(&self) -> String {
        format!("redis+cluster://127.0.0.1:{}", self.ports[0])
    }

    fn start() -> Self {
        let began = Instant::now();
        let dir = tempfile::tempdir().expect("temporary directory");
        let ports = free_ports(NODES);
        let mut cluster = Self {
            children: Vec::new(),
            ports: ports.clone(),
            _dir: dir,
        };
        let dir = cluster._dir.path().to_path_buf();
        for &port in &ports {
            let child = Command::new("redis-server")
                .args(["--port", &port.to_string()])
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
            wait_until(|| cli(port, &["PING"]).is_some_and(|o| o.trim() == "PONG"));
        }
        let nodes: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let out = Command::new("redis-cli")
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
                cli(port, &["CLUSTER", "INFO"]).is_some_and(|o| o.contains("cluster_state:ok"))
            });
        }
        eprintln!(
            "started a Redis Cluster on ports {ports:?} in {:?}",
            began.elapsed()
        );
        cluster
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

/// `redis-cli -p port args…`'s output, or None when it failed.
fn cli(port: u16, args: &[&str]) -> Option<String> {
    let out = Command::new("redis-cli")
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
