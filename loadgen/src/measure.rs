//! What the report is made of: latency percentiles, and CPU time and peak
//! memory of processes read from /proc.

use std::time::Duration;

/// Nearest-rank percentiles of a set of durations.
pub struct Latencies(Vec<Duration>);

impl Latencies {
    pub fn new(mut v: Vec<Duration>) -> Self {
        v.sort_unstable();
        Self(v)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// `p` in 0..=100; zero when empty.
    pub fn pct(&self, p: f64) -> Duration {
        if self.0.is_empty() {
            return Duration::ZERO;
        }
        let rank = ((p / 100.0) * self.0.len() as f64).ceil() as usize;
        self.0[rank.clamp(1, self.0.len()) - 1]
    }

    pub fn max(&self) -> Duration {
        self.0.last().copied().unwrap_or_default()
    }

    /// [`Latencies::pct`] in milliseconds, as the `RESULT` line gives it.
    pub fn pct_ms(&self, p: f64) -> f64 {
        self.pct(p).as_secs_f64() * 1e3
    }

    /// [`Latencies::max`] in milliseconds.
    pub fn max_ms(&self) -> f64 {
        self.max().as_secs_f64() * 1e3
    }

    /// `p50 1.23 ms, p95 …, p99 …, max …`
    pub fn line(&self) -> String {
        format!(
            "p50 {} · p95 {} · p99 {} · max {} (n={})",
            ms(self.pct(50.0)),
            ms(self.pct(95.0)),
            ms(self.pct(99.0)),
            ms(self.max()),
            self.len()
        )
    }
}

/// Each delivered webhook's send time (since its phase began) and its
/// latency to arrival: when the slow ones happened.
pub struct Timeline(Vec<(Duration, Duration)>);

impl Timeline {
    /// Sorted by send time.
    pub fn new(mut v: Vec<(Duration, Duration)>) -> Self {
        v.sort_unstable();
        Self(v)
    }

    /// The latencies of the webhooks sent at or after `from`: the steady
    /// state, without the first moments after an idle worker started on
    /// the phase.
    pub fn sent_from(&self, from: Duration) -> Latencies {
        Latencies::new(
            self.0
                .iter()
                .filter(|(sent, _)| *sent >= from)
                .map(|&(_, took)| took)
                .collect(),
        )
    }

    /// `sent_ms,latency_ms`, a line per webhook in send order.
    pub fn write_csv(&self, out: &mut impl std::io::Write) -> std::io::Result<()> {
        writeln!(out, "sent_ms,latency_ms")?;
        for (sent, took) in &self.0 {
            writeln!(
                out,
                "{:.3},{:.3}",
                sent.as_secs_f64() * 1e3,
                took.as_secs_f64() * 1e3
            )?;
        }
        Ok(())
    }
}

pub fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

/// Clock ticks per second of /proc/<pid>/stat times (`getconf CLK_TCK`;
/// 100 on every Linux this runs on).
fn clk_tck() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// utime + stime of one process in seconds; None when it is gone.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces: fields start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After ')': state is field 3, utime 14, stime 15 (1-based).
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / clk_tck_cached())
}

fn clk_tck_cached() -> f64 {
    static TCK: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TCK.get_or_init(clk_tck)
}

/// A `/proc/<pid>/status` value in kB (e.g. `VmHWM`, `VmRSS`).
pub fn status_kb(pid: u32, key: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// A named group of processes whose CPU time is summed.
#[derive(Clone)]
pub struct Group {
    pub name: String,
    pub pids: Vec<u32>,
}

/// Voluntary context switches of all threads of one process: how often
/// one of them went to sleep to wait (for a socket, a lock, a timer) and
/// was woken again. On a VM where a wake-up across CPUs is costly, this
/// counts the round trips a run paid for. None when the process is gone.
pub fn wakeups(pid: u32) -> Option<u64> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut total = 0;
    for task in tasks.flatten() {
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        total += status
            .lines()
            .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
    }
    Some(total)
}

/// What one process had used at one moment.
#[derive(Clone, Copy)]
struct Used {
    cpu: f64,
    wakeups: u64,
}

/// CPU seconds and wake-ups of every group at one moment.
pub struct Snapshot(Vec<(String, Vec<(u32, Used)>)>);

pub fn snapshot(groups: &[Group]) -> Snapshot {
    Snapshot(
        groups
            .iter()
            .map(|g| {
                let per = g
                    .pids
                    .iter()
                    .filter_map(|&p| {
                        let cpu = cpu_seconds(p)?;
                        let wakeups = wakeups(p).unwrap_or(0);
                        Some((p, Used { cpu, wakeups }))
                    })
                    .collect();
                (g.name.clone(), per)
            })
            .collect(),
    )
}

/// What each group used between two snapshots. A pid that is only in
/// `after` (a connection opened meanwhile) counts from zero.
fn delta<T: std::ops::Sub<Output = T> + std::iter::Sum + Default + Copy>(
    before: &Snapshot,
    after: &Snapshot,
    of: impl Fn(&Used) -> T,
) -> Vec<(String, T)> {
    after
        .0
        .iter()
        .map(|(name, pids)| {
            let old = before.0.iter().find(|(n, _)| n == name).map(|(_, p)| p);
            let used: T = pids
                .iter()
                .map(|(pid, u)| {
                    let was = old
                        .and_then(|o| o.iter().find(|(p, _)| p == pid))
                        .map(|(_, u)| of(u))
                        .unwrap_or_default();
                    of(u) - was
                })
                .sum();
            (name.clone(), used)
        })
        .collect()
}

/// CPU seconds used by each group between two snapshots.
pub fn cpu_delta(before: &Snapshot, after: &Snapshot) -> Vec<(String, f64)> {
    delta(before, after, |u| u.cpu)
}

/// Wake-ups (voluntary context switches) of each group between two
/// snapshots.
pub fn wakeup_delta(before: &Snapshot, after: &Snapshot) -> Vec<(String, u64)> {
    delta(before, after, |u| u.wakeups)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let l = Latencies::new((1..=100).rev().map(Duration::from_millis).collect());
        assert_eq!(l.pct(50.0), Duration::from_millis(50));
        assert_eq!(l.pct(99.0), Duration::from_millis(99));
        assert_eq!(l.pct(100.0), Duration::from_millis(100));
        assert_eq!(l.max(), Duration::from_millis(100));
        assert_eq!(Latencies::new(vec![]).pct(50.0), Duration::ZERO);
    }

    #[test]
    fn a_timeline_is_written_in_send_order_and_cut_by_send_time() {
        let d = Duration::from_millis;
        let t = Timeline::new(vec![(d(1500), d(3)), (d(20), d(250)), (d(1000), d(7))]);
        let mut csv = Vec::new();
        t.write_csv(&mut csv).unwrap();
        assert_eq!(
            String::from_utf8(csv).unwrap(),
            "sent_ms,latency_ms\n20.000,250.000\n1000.000,7.000\n1500.000,3.000\n"
        );
        let steady = t.sent_from(Duration::from_secs(1));
        assert_eq!(steady.len(), 2);
        assert_eq!(steady.max(), d(7));
        assert_eq!(t.sent_from(Duration::ZERO).max(), d(250));
    }

    #[test]
    fn reads_own_cpu_and_memory() {
        let me = std::process::id();
        assert!(cpu_seconds(me).is_some());
        assert!(status_kb(me, "VmHWM").unwrap() > 0);
        assert!(cpu_seconds(u32::MAX).is_none());
        assert!(wakeups(me).is_some());
        assert!(wakeups(u32::MAX).is_none());
    }
}
