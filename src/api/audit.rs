//! Audit lines for authentication failures, summarised: a quiet period's
//! first failure is logged at once, and the rest of a burst as one line
//! per window (`flush`, run by a ticker), never one line per request.
//! Nothing of the presented key is logged. Key creation and revocation
//! are audited where they happen (`Store::create_api_key`,
//! `Store::revoke_api_key`). Every line has the tracing target `audit`.

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

/// Why a call was not authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    /// No `authorization` header, or not `Bearer <key>`.
    Malformed,
    /// A key that is unknown, expired or revoked.
    Rejected,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub malformed: u64,
    pub rejected: u64,
}

impl Counts {
    pub fn total(&self) -> u64 {
        self.malformed + self.rejected
    }
}

#[derive(Debug)]
struct State {
    window_start: Option<Instant>,
    pending: Counts,
}

/// Counts authentication failures per window.
#[derive(Debug)]
pub struct AuthFailures {
    window: Duration,
    state: Mutex<State>,
}

/// What to log now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Report {
    /// The first failure after a quiet window: log it alone.
    First(AuthFailure),
    /// Failures since the last line, over `over`.
    Summary { counts: Counts, over: Duration },
}

impl AuthFailures {
    pub fn new(window: Duration) -> Self {
        Self {
            window,
            state: Mutex::new(State {
                window_start: None,
                pending: Counts::default(),
            }),
        }
    }

    /// Counts one failure; `Some` when it should be logged at once.
    pub fn record(&self, kind: AuthFailure, now: Instant) -> Option<Report> {
        let mut s = self.state.lock().expect("audit lock");
        match s.window_start {
            Some(start) if now.saturating_duration_since(start) < self.window => {
                match kind {
                    AuthFailure::Malformed => s.pending.malformed += 1,
                    AuthFailure::Rejected => s.pending.rejected += 1,
                }
                None
            }
            _ => {
                s.window_start = Some(now);
                Some(Report::First(kind))
            }
        }
    }

    /// The summary of a window that has ended, if it had more failures
    /// than its first; the next failure after it is logged at once again.
    pub fn flush(&self, now: Instant) -> Option<Report> {
        let mut s = self.state.lock().expect("audit lock");
        let start = s.window_start?;
        let over = now.saturating_duration_since(start);
        if over < self.window {
            return None;
        }
        s.window_start = None;
        let counts = std::mem::take(&mut s.pending);
        (counts.total() > 0).then_some(Report::Summary { counts, over })
    }

    /// Writes a report as an audit line.
    pub fn log(report: Report) {
        match report {
            Report::First(kind) => tracing::warn!(
                target: "audit",
                event = "auth.failed",
                reason = ?kind,
                "authentication failed"
            ),
            Report::Summary { counts, over } => tracing::warn!(
                target: "audit",
                event = "auth.failed.burst",
                failures = counts.total(),
                malformed = counts.malformed,
                rejected = counts.rejected,
                seconds = over.as_secs(),
                "more authentication failures"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_is_one_line_then_one_summary() {
        let a = AuthFailures::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(
            a.record(AuthFailure::Rejected, t0),
            Some(Report::First(AuthFailure::Rejected))
        );
        for i in 1..=99u64 {
            let kind = if i % 3 == 0 {
                AuthFailure::Malformed
            } else {
                AuthFailure::Rejected
            };
            assert_eq!(a.record(kind, t0 + Duration::from_millis(i)), None);
        }
        assert_eq!(
            a.flush(t0 + Duration::from_secs(5)),
            None,
            "window still open"
        );
        let t1 = t0 + Duration::from_secs(10);
        assert_eq!(
            a.flush(t1),
            Some(Report::Summary {
                counts: Counts {
                    malformed: 33,
                    rejected: 66
                },
                over: Duration::from_secs(10)
            })
        );
        // Quiet again: nothing to flush, and the next failure is logged.
        assert_eq!(a.flush(t1 + Duration::from_secs(20)), None);
        assert_eq!(
            a.record(AuthFailure::Malformed, t1 + Duration::from_secs(30)),
            Some(Report::First(AuthFailure::Malformed))
        );
    }

    #[test]
    fn a_single_failure_has_no_summary() {
        let a = AuthFailures::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert!(a.record(AuthFailure::Rejected, t0).is_some());
        assert_eq!(a.flush(t0 + Duration::from_secs(11)), None);
        // A failure after the window without a flush starts a new one.
        assert!(
            a.record(AuthFailure::Rejected, t0 + Duration::from_secs(12))
                .is_some()
        );
    }
}
