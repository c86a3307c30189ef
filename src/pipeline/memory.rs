//! The in-process queue of the embedded deployment.
//!
//! Jobs live in memory only: a restart loses them, and
//! `Pipeline::recover` rebuilds them from the database at start-up, so
//! nothing accepted is lost. Due jobs sit in two FIFOs, one per
//! [`Priority`]; delayed jobs of both classes in one heap ordered by due
//! time, and a job that falls due joins its class's FIFO. Taken jobs are
//! tracked until acked so that a job can be put back.
//!
//! A take applies the weighting of [`HighShare`]: it reserves a quota of
//! the batch for high-priority jobs and fills the rest from the normal FIFO,
//! each class leaving what it cannot use to the other ([`split`]). Within
//! a take, high-priority jobs come first. The count of single takes that
//! decides which class a take of one prefers is kept per queue.

use std::{
    cmp::Reverse,
    collections::{BinaryHeap, HashMap, VecDeque},
    sync::{Arc, Mutex},
    time::Duration,
};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tokio::sync::Notify;

use super::queue::{HighShare, Job, Lease, Priority, Queue, QueueError, split};
use crate::clock::Clock;

#[derive(Default)]
struct State {
    high: VecDeque<Job>,
    normal: VecDeque<Job>,
    delayed: BinaryHeap<Reverse<(DateTime<Utc>, u64, DelayedJob)>>,
    in_flight: HashMap<String, Job>,
    seq: u64,
    /// Single takes that got a job (see [`HighShare::high_quota`]).
    single_turn: u64,
}

impl State {
    fn make_ready(&mut self, job: Job) {
        match job.priority {
            Priority::High => self.high.push_back(job),
            Priority::Normal => self.normal.push_back(job),
        }
    }

    fn ready_len(&self) -> usize {
        self.high.len() + self.normal.len()
    }
}

/// Wrapper so that heap order only looks at (due, seq).
#[derive(Debug, Clone)]
struct DelayedJob(Job);

impl PartialEq for DelayedJob {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}
impl Eq for DelayedJob {}
impl PartialOrd for DelayedJob {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for DelayedJob {
    fn cmp(&self, _: &Self) -> std::cmp::Ordering {
        std::cmp::Ordering::Equal
    }
}

pub struct MemoryQueue {
    state: Mutex<State>,
    notify: Notify,
    clock: Arc<dyn Clock>,
    share: HighShare,
}

impl MemoryQueue {
    /// A queue with the default weighting ([`HighShare::DEFAULT`]).
    pub fn new(clock: Arc<dyn Clock>) -> Self {
        Self::with_high_share(clock, HighShare::DEFAULT)
    }

    pub fn with_high_share(clock: Arc<dyn Clock>, share: HighShare) -> Self {
        Self {
            state: Mutex::new(State::default()),
            notify: Notify::new(),
            clock,
            share,
        }
    }

    /// Jobs waiting (due, of both classes, and delayed) and taken.
    pub fn len(&self) -> (usize, usize, usize) {
        let s = self.state.lock().expect("queue lock");
        (s.ready_len(), s.delayed.len(), s.in_flight.len())
    }

    pub fn is_empty(&self) -> bool {
        let (r, d, f) = self.len();
        r + d + f == 0
    }

    fn push(&self, s: &mut State, job: Job, due: Option<DateTime<Utc>>) {
        match due {
            Some(at) if at > self.clock.now() => {
                s.seq += 1;
                let seq = s.seq;
                s.delayed.push(Reverse((at, seq, DelayedJob(job))));
            }
            _ => s.make_ready(job),
        }
    }

    /// Moves due delayed jobs to their FIFOs; returns how long until the
    /// next.
    fn promote(&self, s: &mut State) -> Option<Duration> {
        let now = self.clock.now();
        while let Some(Reverse((at, _, _))) = s.delayed.peek() {
            if *at > now {
                return Some((*at - now).to_std().unwrap_or(Duration::ZERO));
            }
            let Reverse((_, _, DelayedJob(job))) = s.delayed.pop().expect("peeked");
            s.make_ready(job);
        }
        None
    }
}

#[async_trait]
impl Queue for MemoryQueue {
    async fn enqueue(&self, job: Job, due: Option<DateTime<Utc>>) -> Result<(), QueueError> {
        {
            let mut s = self.state.lock().expect("queue lock");
            self.push(&mut s, job, due);
        }
        self.notify.notify_one();
        Ok(())
    }

    async fn take(&self, max: usize, wait: Duration) -> Result<Vec<Lease>, QueueError> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            // Register interest before looking, so that an enqueue between
            // the look and the wait is not missed.
            let notified = self.notify.notified();
            let next_due = {
                let mut s = self.state.lock().expect("queue lock");
                let next_due = self.promote(&mut s);
                if s.ready_len() > 0 {
                    let quota = self.share.high_quota(max, s.single_turn);
                    let (high, normal) = split(max, quota, s.high.len(), s.normal.len());
                    if max == 1 {
                        s.single_turn = s.single_turn.wrapping_add(1);
                    }
                    let mut jobs: Vec<Job> = s.high.drain(..high).collect();
                    jobs.extend(s.normal.drain(..normal));
                    let mut out = Vec::with_capacity(jobs.len());
                    for job in jobs {
                        s.seq += 1;
                        let receipt = s.seq.to_string();
                        s.in_flight.insert(receipt.clone(), job.clone());
                        out.push(Lease {
                            job,
                            receipt,
                            deliveries: 1,
                        });
                    }
                    if s.ready_len() > 0 {
                        // Let another taker in for the rest.
                        self.notify.notify_one();
                    }
                    return Ok(out);
                }
                next_due
            };
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Ok(Vec::new());
            }
            let mut until = deadline;
            if let Some(d) = next_due {
                until = until.min(now + d);
            }
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep_until(until) => {}
            }
        }
    }

    async fn ack(&self, lease: &Lease) -> Result<(), QueueError> {
        self.state
            .lock()
            .expect("queue lock")
            .in_flight
            .remove(&lease.receipt);
        Ok(())
    }

    async fn retry_later(&self, lease: &Lease, due: DateTime<Utc>) -> Result<(), QueueError> {
        {
            let mut s = self.state.lock().expect("queue lock");
            s.in_flight.remove(&lease.receipt);
            self.push(&mut s, lease.job.clone(), Some(due));
        }
        self.notify.notify_one();
        Ok(())
    }

    async fn stats(&self) -> Result<super::redis_queue::QueueStats, QueueError> {
        let s = self.state.lock().expect("queue lock");
        let waiting = (s.high.len() + s.normal.len() + s.in_flight.len()) as u64;
        Ok(super::redis_queue::QueueStats {
            stream: waiting,
            high: s.high.len() as u64,
            pending: s.in_flight.len() as u64,
            delayed: s.delayed.len() as u64,
            poison: 0,
            // Jobs carry no enqueue time here; the Redis queue reads it
            // from its entry ids.
            oldest_age: None,
        })
    }

    async fn ping(&self) -> Result<(), QueueError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::queue::suite::{Backend, Counts, queue_suite};

    /// The in-process queue under the shared suite. There is one queue per
    /// test, made by the first `consumer` call with that call's clock;
    /// further consumers share it (takers in one process).
    #[derive(Default)]
    struct Memory(Mutex<Option<Arc<MemoryQueue>>>);

    #[async_trait]
    impl Backend for Memory {
        async fn setup() -> Option<Self> {
            Some(Self::default())
        }

        async fn consumer(&self, clock: Arc<dyn Clock>) -> Arc<dyn Queue> {
            self.0
                .lock()
                .expect("lock")
                .get_or_insert_with(|| Arc::new(MemoryQueue::new(clock)))
                .clone()
        }

        async fn counts(&self) -> Counts {
            let q = self.0.lock().expect("lock").clone().expect("a consumer");
            let (ready, delayed, taken) = q.len();
            Counts {
                ready,
                delayed,
                taken,
            }
        }
    }

    queue_suite!(Memory);
}
