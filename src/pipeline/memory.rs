//! The in-process queue of the embedded deployment.
//!
//! Jobs live in memory only: a restart loses them, and
//! `Pipeline::recover` rebuilds them from the database at start-up, so
//! nothing accepted is lost. Due jobs sit in a FIFO; delayed jobs in a heap
//! ordered by due time. Taken jobs are tracked until acked so that a job
//! can be put back.

use std::{
    cmp::Reverse,
    collections::{BinaryHeap, HashMap, VecDeque},
    sync::{Arc, Mutex},
    time::Duration,
};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tokio::sync::Notify;

use super::queue::{Job, Lease, Queue, QueueError};
use crate::clock::Clock;

#[derive(Default)]
struct State {
    ready: VecDeque<Job>,
    delayed: BinaryHeap<Reverse<(DateTime<Utc>, u64, DelayedJob)>>,
    in_flight: HashMap<String, Job>,
    seq: u64,
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
}

impl MemoryQueue {
    pub fn new(clock: Arc<dyn Clock>) -> Self {
        Self {
            state: Mutex::new(State::default()),
            notify: Notify::new(),
            clock,
        }
    }

    /// Jobs waiting (due and delayed) and taken.
    pub fn len(&self) -> (usize, usize, usize) {
        let s = self.state.lock().expect("queue lock");
        (s.ready.len(), s.delayed.len(), s.in_flight.len())
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
            _ => s.ready.push_back(job),
        }
    }

    /// Moves due delayed jobs to the FIFO; returns how long until the next.
    fn promote(&self, s: &mut State) -> Option<Duration> {
        let now = self.clock.now();
        while let Some(Reverse((at, _, _))) = s.delayed.peek() {
            if *at > now {
                return Some((*at - now).to_std().unwrap_or(Duration::ZERO));
            }
            let Reverse((_, _, DelayedJob(job))) = s.delayed.pop().expect("peeked");
            s.ready.push_back(job);
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
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            // Register interest before looking, so that an enqueue between
            // the look and the wait is not missed.
            let notified = self.notify.notified();
            let next_due = {
                let mut s = self.state.lock().expect("queue lock");
                let next_due = self.promote(&mut s);
                if !s.ready.is_empty() {
                    let n = max.min(s.ready.len());
                    let mut out = Vec::with_capacity(n);
                    for _ in 0..n {
                        let job = s.ready.pop_front().expect("len checked");
                        s.seq += 1;
                        let receipt = s.seq.to_string();
                        s.in_flight.insert(receipt.clone(), job.clone());
                        out.push(Lease {
                            job,
                            receipt,
                            deliveries: 1,
                        });
                    }
                    if !s.ready.is_empty() {
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

    async fn ping(&self) -> Result<(), QueueError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        clock::{ManualClock, SystemClock},
        domain::{TenantId, WebhookId},
        pipeline::queue::JobKind,
    };

    fn job() -> Job {
        Job {
            kind: JobKind::Deliver,
            priority: Default::default(),
            tenant: TenantId::generate(),
            webhook: WebhookId::generate(),
        }
    }

    #[tokio::test]
    async fn due_jobs_come_out_in_order_and_ack_removes() {
        let q = MemoryQueue::new(Arc::new(SystemClock));
        let (a, b) = (job(), job());
        q.enqueue(a.clone(), None).await.unwrap();
        q.enqueue(b.clone(), None).await.unwrap();
        let got = q.take(10, Duration::from_millis(10)).await.unwrap();
        assert_eq!(
            got.iter().map(|l| l.job.clone()).collect::<Vec<_>>(),
            vec![a, b]
        );
        assert_eq!(q.len(), (0, 0, 2));
        for l in &got {
            q.ack(l).await.unwrap();
        }
        assert!(q.is_empty());
    }

    #[tokio::test]
    async fn delayed_jobs_wait_for_their_time() {
        let clock = ManualClock::new(Utc::now());
        let q = MemoryQueue::new(Arc::new(clock.clone()));
        let j = job();
        q.enqueue(j.clone(), Some(clock.now() + chrono::Duration::seconds(60)))
            .await
            .unwrap();
        assert!(
            q.take(10, Duration::from_millis(5))
                .await
                .unwrap()
                .is_empty()
        );
        clock.advance(chrono::Duration::seconds(61));
        let got = q.take(10, Duration::from_millis(5)).await.unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].job, j);
    }

    #[tokio::test]
    async fn retry_later_puts_the_job_back() {
        let clock = ManualClock::new(Utc::now());
        let q = MemoryQueue::new(Arc::new(clock.clone()));
        q.enqueue(job(), None).await.unwrap();
        let l = q.take(1, Duration::ZERO).await.unwrap().pop().unwrap();
        q.retry_later(&l, clock.now() + chrono::Duration::seconds(5))
            .await
            .unwrap();
        assert_eq!(q.len(), (0, 1, 0));
        clock.advance(chrono::Duration::seconds(5));
        assert_eq!(q.take(1, Duration::ZERO).await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn a_waiting_taker_wakes_on_enqueue() {
        let q = Arc::new(MemoryQueue::new(Arc::new(SystemClock)));
        let q2 = q.clone();
        let taker = tokio::spawn(async move { q2.take(1, Duration::from_secs(30)).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        q.enqueue(job(), None).await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), taker)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(got.len(), 1);
    }

    #[tokio::test]
    async fn take_respects_max() {
        let q = MemoryQueue::new(Arc::new(SystemClock));
        for _ in 0..5 {
            q.enqueue(job(), None).await.unwrap();
        }
        assert_eq!(q.take(3, Duration::ZERO).await.unwrap().len(), 3);
        assert_eq!(q.take(3, Duration::ZERO).await.unwrap().len(), 2);
    }
}
