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
    let (ticks, _) = stat_ticks(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)?;
    Some(ticks / clk_tck_cached())
}

/// From the text of a `stat` file (a process's or a thread's): utime +
/// stime and the start time, both in clock ticks.
fn stat_ticks(stat: &str) -> Option<(f64, u64)> {
    // The command name may hold spaces and parentheses: fields start
    // after the last ')'.
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After ')': state is field 3, utime 14, stime 15, starttime 22
    // (1-based).
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    let start: u64 = fields.get(19)?.parse().ok()?;
    Some((utime + stime, start))
}

/// `voluntary_ctxt_switches` from the text of a `status` file.
fn voluntary_switches(status: &str) -> u64 {
    status
        .lines()
        .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(0)
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
    std::fs::metadata(format!("/proc/{pid}/task")).ok()?;
    Some(threads(&[pid]).iter().map(|t| t.used.wakeups).sum())
}

/// One thread at one moment: its process, id, start time (to tell a
/// thread from a later one that took its id), name (`comm`, at most 15
/// bytes: `tokio-rt-worker`, `sqlx-sqlite-wor`) and what it had used.
#[derive(Clone)]
pub struct Thread {
    pid: u32,
    tid: u32,
    start: u64,
    name: String,
    used: Used,
}

/// The threads of `pids` at one moment (a process that is gone has none;
/// a pid given twice counts once).
pub fn threads(pids: &[u32]) -> Vec<Thread> {
    let mut out = Vec::new();
    for (i, &pid) in pids.iter().enumerate() {
        if pids[..i].contains(&pid) {
            continue;
        }
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            let Some(tid) = task.file_name().to_str().and_then(|t| t.parse().ok()) else {
                continue;
            };
            let dir = task.path();
            // A name is bytes, cut at 15 (possibly inside a character).
            let read = |f: &str| {
                std::fs::read(dir.join(f))
                    .ok()
                    .map(|b| String::from_utf8_lossy(&b).into_owned())
            };
            let (Some(name), Some((ticks, start))) =
                (read("comm"), read("stat").as_deref().and_then(stat_ticks))
            else {
                continue; // the thread ended meanwhile
            };
            out.push(Thread {
                pid,
                tid,
                start,
                name: name.strip_suffix('\n').unwrap_or(&name).to_string(),
                used: Used {
                    cpu: ticks / clk_tck_cached(),
                    wakeups: voluntary_switches(&read("status").unwrap_or_default()),
                },
            });
        }
    }
    out
}

/// What the threads of one name in one process used between two
/// snapshots.
#[derive(Debug, PartialEq)]
pub struct ThreadUse {
    pub pid: u32,
    pub name: String,
    /// Threads of that name seen in `after`.
    pub threads: usize,
    pub cpu: f64,
    pub wakeups: u64,
}

/// What the threads used between two snapshots, summed by process and
/// thread name, in the order of `after` (by process, then the most CPU
/// first). A thread only in `after` counts from zero; one that ended
/// meanwhile is not counted, so short-lived threads (tokio's blocking
/// pool) can be missed.
pub fn thread_delta(before: &[Thread], after: &[Thread]) -> Vec<ThreadUse> {
    let mut out: Vec<ThreadUse> = Vec::new();
    for t in after {
        // The same thread: the same process, id and start time (an id
        // can be taken again by a new thread once the old one ended).
        let was = before
            .iter()
            .find(|b| b.pid == t.pid && b.tid == t.tid && b.start == t.start)
            .map(|b| b.used);
        let cpu = (t.used.cpu - was.map_or(0.0, |u| u.cpu)).max(0.0);
        let wakeups = t.used.wakeups.saturating_sub(was.map_or(0, |u| u.wakeups));
        match out.iter_mut().find(|u| u.pid == t.pid && u.name == t.name) {
            Some(u) => {
                u.threads += 1;
                u.cpu += cpu;
                u.wakeups += wakeups;
            }
            None => out.push(ThreadUse {
                pid: t.pid,
                name: t.name.clone(),
                threads: 1,
                cpu,
                wakeups,
            }),
        }
    }
    let first_seen = |pid: u32| after.iter().position(|t| t.pid == pid);
    out.sort_by(|a, b| {
        first_seen(a.pid)
            .cmp(&first_seen(b.pid))
            .then(b.cpu.total_cmp(&a.cpu))
    });
    out
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

    #[test]
    fn reads_own_threads_by_name() {
        let (started, stop) = (std::sync::mpsc::channel(), std::sync::mpsc::channel::<()>());
        let worker = std::thread::Builder::new()
            .name("uh-measure-test".into())
            .spawn(move || {
                started.0.send(()).unwrap();
                let _ = stop.1.recv();
            })
            .unwrap();
        started.1.recv().unwrap();
        let me = std::process::id();
        let now = threads(&[me]);
        let named: Vec<&Thread> = now.iter().filter(|t| t.name == "uh-measure-test").collect();
        assert_eq!(
            named.len(),
            1,
            "{:?}",
            now.iter().map(|t| &t.name).collect::<Vec<_>>()
        );
        assert!(named[0].pid == me && named[0].tid != me);
        assert!(threads(&[u32::MAX]).is_empty());
        stop.0.send(()).unwrap();
        worker.join().unwrap();
    }

    #[test]
    fn thread_use_is_summed_by_process_and_name_from_what_each_thread_had() {
        let t = |pid, tid, start, name: &str, cpu, wakeups| Thread {
            pid,
            tid,
            start,
            name: name.into(),
            used: Used { cpu, wakeups },
        };
        let before = vec![
            t(1, 10, 5, "tokio-rt-worker", 1.0, 100),
            t(1, 11, 5, "tokio-rt-worker", 2.0, 200),
            t(1, 12, 5, "sqlx-sqlite-wor", 0.5, 50),
            // Ends during the phase; a new thread takes its id.
            t(1, 13, 5, "tokio-rt-worker", 9.0, 900),
            // Another process, the same thread id.
            t(2, 10, 6, "tokio-rt-worker", 0.0, 0),
        ];
        // Not in the result's order: a process's rows come by CPU.
        let after = vec![
            t(2, 10, 6, "tokio-rt-worker", 0.25, 7),
            t(1, 12, 5, "sqlx-sqlite-wor", 1.5, 90),
            t(1, 10, 5, "tokio-rt-worker", 1.5, 130),
            t(1, 11, 5, "tokio-rt-worker", 2.25, 210),
            // The new thread with the old id: counted from zero.
            t(1, 13, 9, "tokio-rt-worker", 0.5, 5),
        ];
        let used = thread_delta(&before, &after);
        let row = |pid, name: &str, threads, cpu, wakeups| ThreadUse {
            pid,
            name: name.into(),
            threads,
            cpu,
            wakeups,
        };
        assert_eq!(
            used,
            vec![
                row(2, "tokio-rt-worker", 1, 0.25, 7),
                row(1, "tokio-rt-worker", 3, 1.25, 45),
                row(1, "sqlx-sqlite-wor", 1, 1.0, 40),
            ]
        );
    }

    #[test]
    fn stat_fields_are_counted_after_the_last_parenthesis() {
        // A name with spaces and parentheses; utime 11, stime 4, starttime 777.
        let stat = "42 (a) (b c) S 1 42 42 0 -1 4194560 100 0 0 0 11 4 0 0 20 0 3 0 777 1000 50";
        assert_eq!(stat_ticks(stat), Some((15.0, 777)));
        assert_eq!(stat_ticks("42 (cut"), None);
        assert_eq!(stat_ticks("42 (x) S 1"), None);
    }
}
