//! Where a webhook's time goes between Confirm and arrival: this tool's
//! own times (the Confirm sent and answered, the arrival) between the
//! times the service stored for the webhook (PostgreSQL through `psql`,
//! SQLite through the `sqlite3` shell). Both sides read the same
//! machine's clock.

use std::{
    collections::HashMap,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde_json::json;

use crate::measure::{Latencies, ms};

/// One webhook's times as the service stored them, in Unix microseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Stored {
    /// Confirm's handler took it (the `upload.confirmed` event's time).
    pub confirmed: Option<i64>,
    /// The HEAD answered (`verified_at`).
    pub verified: Option<i64>,
    /// A worker had room at the receiver's host and asked to claim the
    /// delivery (the `delivery.started` event's time).
    pub claim: Option<i64>,
    /// The claim was written, a request slot at the host taken, and the
    /// first POST began (the first attempt's `started_at`).
    pub post: Option<i64>,
    /// The receiver's answer was read (`completed_at`).
    pub answered: Option<i64>,
}

/// Where both queries read from: one pass over each table (a subquery per
/// webhook made PostgreSQL plan, and JIT compile, a query of millions).
macro_rules! from_tables {
    () => {
        " FROM webhooks w \
         LEFT JOIN (SELECT webhook_id, \
           min(occurred_at) FILTER (WHERE \"type\" = 'upload.confirmed') AS confirmed, \
           min(occurred_at) FILTER (WHERE \"type\" = 'delivery.started') AS claim \
           FROM events GROUP BY webhook_id) e ON e.webhook_id = w.id \
         LEFT JOIN attempts a ON a.webhook_id = w.id AND a.number = 1"
    };
}

/// The SELECT that [`parse`] reads on PostgreSQL, one row per webhook,
/// its times in Unix microseconds.
pub const QUERY: &str = concat!(
    "SELECT w.id, \
     (extract(epoch FROM e.confirmed) * 1e6)::bigint, \
     (extract(epoch FROM w.verified_at) * 1e6)::bigint, \
     (extract(epoch FROM e.claim) * 1e6)::bigint, \
     (extract(epoch FROM a.started_at) * 1e6)::bigint, \
     (extract(epoch FROM w.completed_at) * 1e6)::bigint",
    from_tables!()
);

/// [`QUERY`] on SQLite, which stores times as RFC 3339 text: the times
/// come back as stored, for [`rfc3339_micros`].
pub const SQLITE_QUERY: &str = concat!(
    "SELECT w.id, e.confirmed, w.verified_at, e.claim, a.started_at, w.completed_at",
    from_tables!()
);

/// A field of [`QUERY`]'s output: Unix microseconds.
pub fn micros(v: &str) -> Option<i64> {
    v.parse().ok()
}

/// A field of [`SQLITE_QUERY`]'s output: a time as SQLite holds it
/// (`2026-12-07T03:06:10.123456+00:00`).
pub fn rfc3339_micros(v: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(v)
        .ok()
        .map(|t| t.timestamp_micros())
}

/// Reads the rows of [`QUERY`] (psql's unaligned output) or of
/// [`SQLITE_QUERY`] (the sqlite3 shell's list mode), each field through
/// `time`: `id|confirmed|verified|claim|post|answered`, a NULL empty.
pub fn parse(text: &str, time: fn(&str) -> Option<i64>) -> HashMap<String, Stored> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split('|');
            let id = fields.next()?.to_string();
            let mut next = || fields.next().and_then(|v| time(v.trim()));
            let stored = Stored {
                confirmed: next(),
                verified: next(),
                claim: next(),
                post: next(),
                answered: next(),
            };
            Some((id, stored))
        })
        .collect()
}

/// Turns this tool's `Instant`s into Unix microseconds, the service's
/// clock.
pub struct WallClock {
    at: Instant,
    unix_us: i64,
}

impl WallClock {
    pub fn now() -> Self {
        let at = Instant::now();
        let unix_us = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as i64);
        Self { at, unix_us }
    }

    pub fn unix_us(&self, t: Instant) -> i64 {
        match t.checked_duration_since(self.at) {
            Some(after) => self.unix_us + after.as_micros() as i64,
            None => self.unix_us - self.at.duration_since(t).as_micros() as i64,
        }
    }
}

/// This tool's times of one webhook, in Unix microseconds.
#[derive(Clone, Copy)]
pub struct Ours {
    pub sent: i64,
    pub confirm_answered: i64,
    pub arrived: i64,
}

/// The stages, in the order a webhook goes through them: the key in the
/// `RESULT` line's `stages`, the stage's p50 as a figure of its own (for
/// `--pairs`), and what the report calls it.
pub const STAGES: [(&str, &str, &str); 7] = [
    (
        "to_handler",
        "stage_to_handler_p50_ms",
        "Confirm sent -> its handler",
    ),
    (
        "confirm_write",
        "stage_confirm_write_p50_ms",
        "handler -> Confirm answered (its write, the enqueue)",
    ),
    (
        "queue_and_head",
        "stage_queue_and_head_p50_ms",
        "Confirm answered -> HEAD answered (queue, row read, HEAD budget, HEAD)",
    ),
    (
        "host_room",
        "stage_host_room_p50_ms",
        "HEAD answered -> room at the receiver's host",
    ),
    (
        "claim_write",
        "stage_claim_write_p50_ms",
        "the claim's write, then a request slot at the host",
    ),
    (
        "post_to_arrival",
        "stage_post_to_arrival_p50_ms",
        "POST begun -> arrived at the receiver",
    ),
    (
        "arrival_to_answer",
        "stage_arrival_to_answer_p50_ms",
        "arrived -> the worker read the answer",
    ),
];

/// Each stage's durations, over the delivered webhooks whose times are
/// all known. A stage that ends before it begins counts zero (a worker
/// can take the job and HEAD the object before the Confirm's answer
/// reaches this tool); the stage before it then holds the overlap.
pub struct Breakdown {
    pub webhooks: usize,
    pub incomplete: usize,
    stages: Vec<Latencies>,
}

pub fn breakdown<'a>(rows: impl Iterator<Item = (Ours, Option<&'a Stored>)>) -> Breakdown {
    let mut stages = vec![Vec::new(); STAGES.len()];
    let (mut webhooks, mut incomplete) = (0, 0);
    for (ours, stored) in rows {
        let points = stored.and_then(|s| {
            Some([
                ours.sent,
                s.confirmed?,
                ours.confirm_answered,
                s.verified?,
                s.claim?,
                s.post?,
                ours.arrived,
                s.answered?,
            ])
        });
        let Some(points) = points else {
            incomplete += 1;
            continue;
        };
        webhooks += 1;
        for (stage, ends) in stages.iter_mut().zip(points.windows(2)) {
            stage.push(Duration::from_micros((ends[1] - ends[0]).max(0) as u64));
        }
    }
    Breakdown {
        webhooks,
        incomplete,
        stages: stages.into_iter().map(Latencies::new).collect(),
    }
}

impl Breakdown {
    pub fn print(&self) {
        if self.webhooks == 0 {
            println!(
                "where the time went: not known, none of the {} delivered webhooks has every time stored",
                self.incomplete
            );
            return;
        }
        println!(
            "where the time went, stage by stage (p50 · p90 · p99 of {} webhooks{}; \
             the percentiles of the stages do not add up to the whole):",
            self.webhooks,
            if self.incomplete > 0 {
                format!(", {} without every time", self.incomplete)
            } else {
                String::new()
            }
        );
        for ((_, _, name), l) in STAGES.iter().zip(&self.stages) {
            println!(
                "  {name:<72} {} · {} · {}",
                ms(l.pct(50.0)),
                ms(l.pct(90.0)),
                ms(l.pct(99.0))
            );
        }
    }

    /// Puts `stages` (see [`Breakdown::json`]) and each stage's p50 (the
    /// figures of [`STAGES`]) in `result`; nothing when no webhook had
    /// every time (a 0 would read as a figure).
    pub fn report_into(&self, result: &mut serde_json::Value) {
        if self.webhooks == 0 {
            return;
        }
        result["stages"] = self.json();
        for ((_, figure, _), l) in STAGES.iter().zip(&self.stages) {
            result[*figure] = l.pct_ms(50.0).into();
        }
    }

    /// `{"to_handler": {"p50_ms": …, "p90_ms": …, "p99_ms": …}, …}`
    pub fn json(&self) -> serde_json::Value {
        STAGES
            .iter()
            .zip(&self.stages)
            .map(|((key, _, _), l)| {
                (
                    key.to_string(),
                    json!({
                        "p50_ms": l.pct_ms(50.0),
                        "p90_ms": l.pct_ms(90.0),
                        "p99_ms": l.pct_ms(99.0),
                    }),
                )
            })
            .collect::<serde_json::Map<_, _>>()
            .into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_psqls_rows_with_nulls() {
        let rows = parse("wh_a|10|20|30|40|50\nwh_b|10||||\n", micros);
        assert_eq!(
            rows["wh_a"],
            Stored {
                confirmed: Some(10),
                verified: Some(20),
                claim: Some(30),
                post: Some(40),
                answered: Some(50),
            }
        );
        assert_eq!(
            rows["wh_b"],
            Stored {
                confirmed: Some(10),
                ..Stored::default()
            }
        );
    }

    #[test]
    fn reads_sqlites_times() {
        // As sqlx writes a `DateTime<Utc>` to SQLite.
        let stored = |t: chrono::DateTime<chrono::Utc>| {
            t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, false)
        };
        let base = chrono::DateTime::from_timestamp(1_796_612_770, 0).unwrap();
        let at = |us: i64| base + chrono::Duration::microseconds(us);
        let nanos = base + chrono::Duration::nanoseconds(1_500);
        let line = format!(
            "wh_a|{}|{}||{}|garbage\n",
            stored(at(123)),
            stored(at(500_000)),
            stored(nanos)
        );
        assert!(line.contains("+00:00"), "{line}");
        let rows = parse(&line, rfc3339_micros);
        let us = base.timestamp() * 1_000_000;
        assert_eq!(
            rows["wh_a"],
            Stored {
                confirmed: Some(us + 123),
                verified: Some(us + 500_000),
                claim: None,
                post: Some(us + 1),
                answered: None,
            }
        );
    }

    /// One webhook's stored times, every one known.
    fn a_way() -> Stored {
        Stored {
            confirmed: Some(1_100),
            verified: Some(4_000),
            claim: Some(4_100),
            post: Some(6_000),
            answered: Some(6_900),
        }
    }

    #[test]
    fn splits_a_webhooks_way_into_stages() {
        let stored = a_way();
        let ours = Ours {
            sent: 1_000,
            // Answered after the HEAD: that stage counts zero.
            confirm_answered: 5_000,
            arrived: 6_500,
        };
        let b = breakdown([(ours, Some(&stored))].into_iter());
        assert_eq!((b.webhooks, b.incomplete), (1, 0));
        let us: Vec<u128> = b.stages.iter().map(|l| l.pct(50.0).as_micros()).collect();
        assert_eq!(us, [100, 3_900, 0, 100, 1_900, 500, 400]);
        let missing = breakdown([(ours, None), (ours, Some(&Stored::default()))].into_iter());
        assert_eq!((missing.webhooks, missing.incomplete), (0, 2));
    }

    #[test]
    fn each_stage_has_its_p50_figure() {
        for (key, figure, _) in STAGES {
            assert_eq!(figure, format!("stage_{key}_p50_ms"));
        }
        let stored = a_way();
        let ours = Ours {
            sent: 1_000,
            confirm_answered: 2_000,
            arrived: 6_500,
        };
        let mut result = serde_json::json!({});
        breakdown([(ours, Some(&stored))].into_iter()).report_into(&mut result);
        assert_eq!(result["stage_queue_and_head_p50_ms"], 2.0);
        assert_eq!(result["stages"]["claim_write"]["p99_ms"], 1.9);
        // No webhook with every time: no figures, rather than zeros.
        let mut empty = serde_json::json!({});
        breakdown([(ours, None)].into_iter()).report_into(&mut empty);
        assert_eq!(empty, serde_json::json!({}));
    }

    #[test]
    fn converts_instants_to_unix_time_both_ways() {
        let clock = WallClock::now();
        let wall = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
        let off = clock.unix_us(Instant::now()) - wall.as_micros() as i64;
        assert!(off.abs() < 1_000_000, "{off} µs from the wall clock");
        let later = clock.at + Duration::from_millis(3);
        assert_eq!(clock.unix_us(later) - clock.unix_us(clock.at), 3_000);
        if let Some(earlier) = clock.at.checked_sub(Duration::from_millis(2)) {
            assert_eq!(clock.unix_us(clock.at) - clock.unix_us(earlier), 2_000);
        }
    }
}
