//! Pure delivery decisions: what an attempt's result means, and what comes
//! next. The worker only fetches, calls these, writes and acks.

use std::time::Duration;

use chrono::{DateTime, Utc};

/// What one attempt came to, as far as retrying is concerned.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// 2xx: the receiver has it.
    Delivered,
    /// 410 Gone: the receiver asks never to be called again.
    Gone,
    /// Anything else: a non-2xx status, a timeout, a connection error.
    Failed { retry_after: Option<Duration> },
}

/// What happens next.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    Complete,
    Retry { delay: Duration },
    DeadLetter { reason: String },
}

/// The retry policy from config.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Delay after attempt n (1-based) is `schedule[n - 1]`; attempts
    /// beyond its length are final.
    pub schedule: Vec<Duration>,
    /// Fraction of random spread, e.g. 0.2 for +-20 %.
    pub jitter: f64,
    pub min_retry_after: Duration,
    pub max_retry_after: Duration,
}

impl RetryPolicy {
    pub fn max_attempts(&self) -> u32 {
        self.schedule.len() as u32 + 1
    }
}

/// Classifies an HTTP response (or its absence).
pub fn classify(status: Option<u16>, retry_after: Option<&str>, now: DateTime<Utc>) -> Outcome {
    match status {
        Some(s) if (200..300).contains(&s) => Outcome::Delivered,
        Some(410) => Outcome::Gone,
        _ => Outcome::Failed {
            retry_after: retry_after.and_then(|v| parse_retry_after(v, now)),
        },
    }
}

/// `Retry-After` as delay-seconds or an HTTP-date.
pub fn parse_retry_after(value: &str, now: DateTime<Utc>) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = DateTime::parse_from_rfc2822(value)
        .ok()?
        .with_timezone(&Utc);
    Some((at - now).to_std().unwrap_or(Duration::ZERO))
}

/// Decides after attempt number `attempt` (1-based). `jitter_sample` is a
/// uniform sample in [-1, 1], passed in so that this stays pure.
pub fn decide(
    policy: &RetryPolicy,
    attempt: u32,
    outcome: &Outcome,
    jitter_sample: f64,
) -> Decision {
    match outcome {
        Outcome::Delivered => Decision::Complete,
        Outcome::Gone => Decision::DeadLetter {
            reason: "receiver answered 410 Gone; not retried".into(),
        },
        Outcome::Failed { retry_after } => {
            if attempt >= policy.max_attempts() {
                return Decision::DeadLetter {
                    reason: format!("all {attempt} attempts failed"),
                };
            }
            let delay = match retry_after {
                Some(ra) => (*ra).clamp(policy.min_retry_after, policy.max_retry_after),
                None => {
                    let base = policy.schedule[(attempt - 1) as usize];
                    let factor = 1.0 + policy.jitter * jitter_sample.clamp(-1.0, 1.0);
                    base.mul_f64(factor.max(0.0))
                }
            };
            Decision::Retry { delay }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            schedule: vec![Duration::from_secs(5), Duration::from_secs(300)],
            jitter: 0.2,
            min_retry_after: Duration::from_secs(1),
            max_retry_after: Duration::from_secs(3600),
        }
    }

    #[test]
    fn success_completes() {
        assert_eq!(
            decide(&policy(), 1, &Outcome::Delivered, 0.0),
            Decision::Complete
        );
    }

    #[test]
    fn failures_follow_the_schedule_then_dead_letter() {
        let f = Outcome::Failed { retry_after: None };
        assert_eq!(
            decide(&policy(), 1, &f, 0.0),
            Decision::Retry {
                delay: Duration::from_secs(5)
            }
        );
        assert_eq!(
            decide(&policy(), 2, &f, 0.0),
            Decision::Retry {
                delay: Duration::from_secs(300)
            }
        );
        assert!(matches!(
            decide(&policy(), 3, &f, 0.0),
            Decision::DeadLetter { .. }
        ));
        assert_eq!(policy().max_attempts(), 3);
    }

    #[test]
    fn jitter_stays_within_bounds() {
        let f = Outcome::Failed { retry_after: None };
        for sample in [-1.0, -0.5, 0.0, 0.5, 1.0, 7.0] {
            let Decision::Retry { delay } = decide(&policy(), 1, &f, sample) else {
                panic!()
            };
            assert!(
                delay >= Duration::from_secs(4) && delay <= Duration::from_secs(6),
                "{delay:?}"
            );
        }
    }

    #[test]
    fn retry_after_is_honoured_within_bounds() {
        let f = |s| Outcome::Failed {
            retry_after: Some(Duration::from_secs(s)),
        };
        assert_eq!(
            decide(&policy(), 1, &f(42), 1.0),
            Decision::Retry {
                delay: Duration::from_secs(42)
            }
        );
        assert_eq!(
            decide(&policy(), 1, &f(0), 0.0),
            Decision::Retry {
                delay: Duration::from_secs(1)
            }
        );
        assert_eq!(
            decide(&policy(), 1, &f(99999), 0.0),
            Decision::Retry {
                delay: Duration::from_secs(3600)
            }
        );
        // Retry-After never extends the number of attempts.
        assert!(matches!(
            decide(&policy(), 3, &f(42), 0.0),
            Decision::DeadLetter { .. }
        ));
    }

    #[test]
    fn gone_stops_at_once() {
        assert!(matches!(
            decide(&policy(), 1, &Outcome::Gone, 0.0),
            Decision::DeadLetter { .. }
        ));
    }

    #[test]
    fn classify_statuses() {
        let now = Utc::now();
        assert_eq!(classify(Some(200), None, now), Outcome::Delivered);
        assert_eq!(classify(Some(204), None, now), Outcome::Delivered);
        assert_eq!(classify(Some(410), None, now), Outcome::Gone);
        assert_eq!(
            classify(Some(301), None, now),
            Outcome::Failed { retry_after: None }
        );
        assert_eq!(
            classify(None, None, now),
            Outcome::Failed { retry_after: None }
        );
        assert_eq!(
            classify(Some(503), Some("120"), now),
            Outcome::Failed {
                retry_after: Some(Duration::from_secs(120))
            }
        );
    }

    #[test]
    fn retry_after_http_date() {
        let now = DateTime::parse_from_rfc3339("2015-10-21T07:27:00Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now),
            Some(Duration::from_secs(60))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:20:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", now), None);
    }
}
