//! The per-tenant rate limit of the API: a token bucket per tenant, in
//! memory, checked right after authentication (so it covers gRPC and REST
//! alike). Each API process limits on its own: with N API processes a
//! tenant gets up to N times the rate.
//!
//! Memory is bounded: beyond `max_tenants` buckets, the ones that have
//! refilled (which behave exactly like absent ones) are dropped, then, if
//! still too many, the least recently used.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use crate::domain::TenantId;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

#[derive(Debug)]
pub struct RateLimiter {
    per_second: f64,
    burst: f64,
    max_tenants: usize,
    buckets: Mutex<HashMap<TenantId, Bucket>>,
}

impl RateLimiter {
    /// `per_second` tokens refill each second, up to `burst`.
    pub fn new(per_second: f64, burst: u32, max_tenants: usize) -> Self {
        Self {
            per_second,
            burst: f64::from(burst.max(1)),
            max_tenants: max_tenants.max(1),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one token for `tenant`, or says how long until one is there.
    pub fn check(&self, tenant: &TenantId, now: Instant) -> Result<(), Duration> {
        let mut buckets = self.buckets.lock().expect("rate limiter lock");
        if !buckets.contains_key(tenant) && buckets.len() >= self.max_tenants {
            self.evict(&mut buckets, now);
        }
        let b = buckets.entry(tenant.clone()).or_insert(Bucket {
            tokens: self.burst,
            last: now,
        });
        let elapsed = now.saturating_duration_since(b.last).as_secs_f64();
        b.tokens = (b.tokens + elapsed * self.per_second).min(self.burst);
        b.last = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - b.tokens) / self.per_second))
        }
    }

    fn evict(&self, buckets: &mut HashMap<TenantId, Bucket>, now: Instant) {
        let full_after = |b: &Bucket| (self.burst - b.tokens) / self.per_second;
        buckets.retain(|_, b| now.saturating_duration_since(b.last).as_secs_f64() < full_after(b));
        while buckets.len() >= self.max_tenants {
            let Some(oldest) = buckets
                .iter()
                .min_by_key(|(_, b)| b.last)
                .map(|(t, _)| t.clone())
            else {
                break;
            };
            buckets.remove(&oldest);
        }
    }

    /// Buckets held (tests).
    pub fn len(&self) -> usize {
        self.buckets.lock().expect("rate limiter lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Whole seconds to wait, at least 1 (the `Retry-After` value).
pub fn retry_after_secs(wait: Duration) -> u64 {
    wait.as_secs_f64().ceil().max(1.0) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(n: u32) -> TenantId {
        TenantId::from_trusted(format!("tn_{n:032x}"))
    }

    #[test]
    fn burst_then_refill_at_the_rate() {
        let l = RateLimiter::new(2.0, 3, 100);
        let start = Instant::now();
        for _ in 0..3 {
            l.check(&t(1), start).unwrap();
        }
        let wait = l.check(&t(1), start).unwrap_err();
        assert_eq!(wait, Duration::from_millis(500));
        assert_eq!(retry_after_secs(wait), 1);
        // Another tenant is not affected.
        l.check(&t(2), start).unwrap();
        // Half a second later one token is back, and only one.
        let later = start + Duration::from_millis(500);
        l.check(&t(1), later).unwrap();
        assert!(l.check(&t(1), later).is_err());
        // Never more than the burst, however long the pause.
        let much_later = later + Duration::from_secs(3600);
        for _ in 0..3 {
            l.check(&t(1), much_later).unwrap();
        }
        assert!(l.check(&t(1), much_later).is_err());
    }

    #[test]
    fn slow_rates_ask_for_long_waits() {
        let l = RateLimiter::new(0.1, 1, 10);
        let now = Instant::now();
        l.check(&t(1), now).unwrap();
        let wait = l.check(&t(1), now).unwrap_err();
        assert_eq!(retry_after_secs(wait), 10);
    }

    #[test]
    fn memory_is_bounded() {
        let l = RateLimiter::new(1.0, 2, 3);
        let now = Instant::now();
        for n in 0..3 {
            l.check(&t(n), now).unwrap();
        }
        // Full: the least recently used goes.
        l.check(&t(9), now + Duration::from_millis(1)).unwrap();
        assert_eq!(l.len(), 3);
        // Refilled buckets are dropped first, all of them.
        let later = now + Duration::from_secs(10);
        l.check(&t(10), later).unwrap();
        assert_eq!(l.len(), 1);
        // A tenant that was dropped starts with a full bucket again, which
        // is what it would have had.
        l.check(&t(0), later).unwrap();
        l.check(&t(0), later).unwrap();
        assert!(l.check(&t(0), later).is_err());
    }
}
