//! The behaviour every [`Queue`] must have, as one suite run against each
//! implementation (the model is quickwit's `metastore_test_suite!`).
//!
//! An implementation's tests module provides a [`Backend`] and expands
//! [`queue_suite!`] with it, which makes one `#[tokio::test]` per function
//! below in a `suite` module. Tests of what only one implementation does
//! (Redis's reclaim, poison stream, lost-group recovery, …) stay next to
//! it.

use std::{sync::Arc, time::Duration};

use async_trait::async_trait;
use chrono::Utc;

use super::{Job, JobKind, Lease, Priority, Queue};
use crate::{
    clock::{Clock, ManualClock, SystemClock},
    domain::{TenantId, WebhookId},
};

/// What is in a queue, for assertions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Counts {
    /// Due and not taken.
    pub ready: usize,
    pub delayed: usize,
    /// Taken and not yet acked.
    pub taken: usize,
}

const EMPTY: Counts = Counts {
    ready: 0,
    delayed: 0,
    taken: 0,
};

/// One implementation under test, on a fresh and empty queue per test.
#[async_trait]
pub(crate) trait Backend: Sized + Send + Sync + 'static {
    /// A fresh queue, or `None` to skip the test (its service is not
    /// configured; the implementation says so on stderr).
    async fn setup() -> Option<Self>;

    /// A consumer of this test's queue whose due times follow `clock`.
    /// Every call gives a taker of the same queue (another process where
    /// that means something); tests pass the same clock to each.
    async fn consumer(&self, clock: Arc<dyn Clock>) -> Arc<dyn Queue>;

    /// What the queue holds now.
    async fn counts(&self) -> Counts;
}

/// Expands to a `suite` module with one test per suite function, run on
/// the given [`Backend`].
macro_rules! queue_suite {
    ($backend:ty) => {
        $crate::pipeline::queue::suite::queue_suite!(
            @tests $backend;
            due_jobs_come_out_in_order_and_ack_removes,
            take_respects_max,
            delayed_jobs_wait_for_their_time,
            retry_later_puts_the_job_back,
            a_waiting_taker_wakes_on_enqueue,
            two_takers_never_get_the_same_job,
            high_priority_is_drained_first,
            normal_jobs_are_not_starved_in_batches,
            normal_jobs_are_not_starved_by_single_takes,
        );
    };
    (@tests $backend:ty; $($name:ident),* $(,)?) => {
        mod suite {
            use super::*;
            $(
                #[tokio::test]
                async fn $name() {
                    let Some(b) =
                        <$backend as $crate::pipeline::queue::suite::Backend>::setup().await
                    else {
                        return;
                    };
                    $crate::pipeline::queue::suite::$name(&b).await;
                }
            )*
        }
    };
}
pub(crate) use queue_suite;

fn job(priority: Priority) -> Job {
    Job {
        kind: JobKind::Deliver,
        priority,
        tenant: TenantId::generate(),
        webhook: WebhookId::generate(),
    }
}

fn jobs(priority: Priority, n: usize) -> Vec<Job> {
    (0..n).map(|_| job(priority)).collect()
}

fn jobs_of(leases: &[Lease]) -> Vec<Job> {
    leases.iter().map(|l| l.job.clone()).collect()
}

async fn enqueue_all(q: &dyn Queue, jobs: &[Job]) {
    for j in jobs {
        q.enqueue(j.clone(), None).await.unwrap();
    }
}

fn system() -> Arc<dyn Clock> {
    Arc::new(SystemClock)
}

pub(crate) async fn due_jobs_come_out_in_order_and_ack_removes(b: &impl Backend) {
    let q = b.consumer(system()).await;
    let normal = jobs(Priority::Normal, 3);
    let high = jobs(Priority::High, 2);
    enqueue_all(&*q, &normal).await;
    enqueue_all(&*q, &high).await;
    assert_eq!(b.counts().await, Counts { ready: 5, ..EMPTY });
    let got = q.take(10, Duration::from_millis(10)).await.unwrap();
    // Each class in the order it came in, high priority first.
    assert_eq!(jobs_of(&got), [high, normal].concat());
    assert!(got.iter().all(|l| l.deliveries == 1));
    assert_eq!(b.counts().await, Counts { taken: 5, ..EMPTY });
    for l in &got {
        q.ack(l).await.unwrap();
    }
    assert_eq!(b.counts().await, EMPTY);
    assert!(q.take(10, Duration::ZERO).await.unwrap().is_empty());
    q.ping().await.unwrap();
}

pub(crate) async fn take_respects_max(b: &impl Backend) {
    let q = b.consumer(system()).await;
    enqueue_all(&*q, &jobs(Priority::Normal, 4)).await;
    enqueue_all(&*q, &jobs(Priority::High, 4)).await;
    assert!(q.take(0, Duration::ZERO).await.unwrap().is_empty());
    let sizes = [
        q.take(3, Duration::ZERO).await.unwrap().len(),
        q.take(3, Duration::ZERO).await.unwrap().len(),
        q.take(3, Duration::ZERO).await.unwrap().len(),
        q.take(3, Duration::ZERO).await.unwrap().len(),
    ];
    assert_eq!(sizes, [3, 3, 2, 0]);
}

pub(crate) async fn delayed_jobs_wait_for_their_time(b: &impl Backend) {
    let clock = ManualClock::new(Utc::now());
    let q = b.consumer(Arc::new(clock.clone())).await;
    let later = clock.now() + chrono::Duration::seconds(60);
    let (normal, high) = (job(Priority::Normal), job(Priority::High));
    q.enqueue(normal.clone(), Some(later)).await.unwrap();
    q.enqueue(high.clone(), Some(later)).await.unwrap();
    // A due time in the past is due now.
    let past = job(Priority::Normal);
    q.enqueue(
        past.clone(),
        Some(clock.now() - chrono::Duration::seconds(1)),
    )
    .await
    .unwrap();
    let got = q.take(10, Duration::from_millis(20)).await.unwrap();
    assert_eq!(jobs_of(&got), [past]);
    q.ack(&got[0]).await.unwrap();
    clock.advance(chrono::Duration::seconds(59));
    assert!(
        q.take(10, Duration::from_millis(20))
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        b.counts().await,
        Counts {
            delayed: 2,
            ..EMPTY
        }
    );
    clock.advance(chrono::Duration::seconds(1));
    // Each falls due into its own class: the high one comes out first,
    // though it was scheduled second.
    let got = q.take(10, Duration::from_millis(20)).await.unwrap();
    assert_eq!(jobs_of(&got), [high, normal]);
    assert_eq!(b.counts().await, Counts { taken: 2, ..EMPTY });
}

pub(crate) async fn retry_later_puts_the_job_back(b: &impl Backend) {
    let clock = ManualClock::new(Utc::now());
    let q = b.consumer(Arc::new(clock.clone())).await;
    let (high, normal) = (job(Priority::High), job(Priority::Normal));
    q.enqueue(high.clone(), None).await.unwrap();
    let l = q.take(1, Duration::ZERO).await.unwrap().pop().unwrap();
    assert_eq!(l.job, high);
    q.retry_later(&l, clock.now() + chrono::Duration::seconds(5))
        .await
        .unwrap();
    assert_eq!(
        b.counts().await,
        Counts {
            delayed: 1,
            ..EMPTY
        }
    );
    assert!(q.take(1, Duration::ZERO).await.unwrap().is_empty());
    clock.advance(chrono::Duration::seconds(5));
    q.enqueue(normal.clone(), None).await.unwrap();
    // The retried job kept its priority: it comes out before the normal
    // job that is waiting too.
    let got = q.take(2, Duration::ZERO).await.unwrap();
    assert_eq!(jobs_of(&got), [high, normal]);
    assert_eq!(got[0].deliveries, 1, "a retry is a new entry");
}

pub(crate) async fn a_waiting_taker_wakes_on_enqueue(b: &impl Backend) {
    let taker = b.consumer(system()).await;
    let producer = b.consumer(system()).await;
    for priority in [Priority::Normal, Priority::High] {
        let q = taker.clone();
        let waiting = tokio::spawn(async move { q.take(1, Duration::from_secs(30)).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        // Other commands are not held up by the waiting take.
        taker.ping().await.unwrap();
        let j = job(priority);
        producer.enqueue(j.clone(), None).await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .unwrap_or_else(|_| panic!("a waiting taker did not wake for a {priority:?} job"))
            .unwrap()
            .unwrap();
        assert_eq!(jobs_of(&got), [j]);
    }
}

pub(crate) async fn two_takers_never_get_the_same_job(b: &impl Backend) {
    let a = b.consumer(system()).await;
    let c = b.consumer(system()).await;
    let n = 60;
    let all: Vec<Job> = (0..n)
        .map(|i| {
            job(if i % 3 == 0 {
                Priority::High
            } else {
                Priority::Normal
            })
        })
        .collect();
    enqueue_all(&*a, &all).await;
    let drain = |q: Arc<dyn Queue>| {
        tokio::spawn(async move {
            let mut got = Vec::new();
            loop {
                let batch = q.take(7, Duration::from_millis(20)).await.unwrap();
                if batch.is_empty() {
                    return got;
                }
                got.extend(batch);
            }
        })
    };
    let (ga, gc) = tokio::join!(drain(a), drain(c));
    let got: Vec<Lease> = ga.unwrap().into_iter().chain(gc.unwrap()).collect();
    assert_eq!(got.len(), n);
    let mut hooks: Vec<_> = got.iter().map(|l| l.job.webhook.clone()).collect();
    hooks.sort();
    hooks.dedup();
    assert_eq!(hooks.len(), n, "a job went to both takers");
    assert_eq!(b.counts().await, Counts { taken: n, ..EMPTY });
}

pub(crate) async fn high_priority_is_drained_first(b: &impl Backend) {
    let q = b.consumer(system()).await;
    // Normal jobs that came first wait behind high-priority ones.
    let normal = jobs(Priority::Normal, 3);
    let high = jobs(Priority::High, 3);
    enqueue_all(&*q, &normal).await;
    enqueue_all(&*q, &high).await;
    let mut got = Vec::new();
    for _ in 0..6 {
        got.extend(jobs_of(&q.take(1, Duration::ZERO).await.unwrap()));
    }
    assert_eq!(got, [high, normal].concat());

    // In batches, high-priority jobs get the weighted share of each one
    // while both classes wait (8 of 10 at the default 80 %), and the
    // whole batch once normal ones run out.
    let normal = jobs(Priority::Normal, 3);
    let high = jobs(Priority::High, 20);
    enqueue_all(&*q, &normal).await;
    enqueue_all(&*q, &high).await;
    let first = jobs_of(&q.take(10, Duration::ZERO).await.unwrap());
    assert_eq!(first, [&high[..8], &normal[..2]].concat());
    // One normal job left: it gets one place, high-priority jobs the rest.
    let second = jobs_of(&q.take(10, Duration::ZERO).await.unwrap());
    assert_eq!(second, [&high[8..17], &normal[2..]].concat());
    let third = jobs_of(&q.take(10, Duration::ZERO).await.unwrap());
    assert_eq!(third, &high[17..]);
}

/// Where, in the order taken, the last normal job came out (1-based).
fn last_normal(taken: &[Job]) -> usize {
    taken
        .iter()
        .rposition(|j| j.priority == Priority::Normal)
        .map_or(0, |i| i + 1)
}

async fn queue_many_high_few_normal(q: &dyn Queue) {
    enqueue_all(q, &jobs(Priority::High, 50)).await;
    enqueue_all(q, &jobs(Priority::Normal, 10)).await;
    enqueue_all(q, &jobs(Priority::High, 50)).await;
}

pub(crate) async fn normal_jobs_are_not_starved_in_batches(b: &impl Backend) {
    let q = b.consumer(system()).await;
    queue_many_high_few_normal(&*q).await;
    let mut taken = Vec::new();
    loop {
        let batch = q.take(10, Duration::ZERO).await.unwrap();
        if batch.is_empty() {
            break;
        }
        assert!(batch.len() <= 10);
        taken.extend(jobs_of(&batch));
    }
    assert_eq!(taken.len(), 110);
    let at = last_normal(&taken);
    assert!(at <= 60, "the last normal job came out {at}th of 110");
}

pub(crate) async fn normal_jobs_are_not_starved_by_single_takes(b: &impl Backend) {
    let q = b.consumer(system()).await;
    queue_many_high_few_normal(&*q).await;
    let mut taken = Vec::new();
    for _ in 0..110 {
        taken.extend(jobs_of(&q.take(1, Duration::ZERO).await.unwrap()));
    }
    assert_eq!(taken.len(), 110);
    let at = last_normal(&taken);
    assert!(at <= 60, "the last normal job came out {at}th of 110");
    // High-priority work still goes first most of the time.
    let high_first = taken[..at]
        .iter()
        .filter(|j| j.priority == Priority::High)
        .count();
    assert!(high_first >= at / 2, "{high_first} of the first {at}");
}
