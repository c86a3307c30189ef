//! Paired comparison (`--pairs N` with `--b-bin` and/or `--b-set`): the
//! same run, A then B, N times over, each run a fresh deployment started by
//! a child `loadgen` process; then, per figure, the ratio B / A of each
//! pair and their median.
//!
//! The machine's speed drifts by tens of per cent within minutes (other
//! tenants of the host), so figures of runs far apart in time do not
//! compare; the two runs of a pair are next to each other, and pairs
//! alternate their order (A B, B A, A B, …) so that neither variant always
//! runs second. The median of the pairs' ratios, with their range and how
//! many pairs favour B, is what BENCHMARKS quotes for a change.

use std::{ffi::OsString, path::PathBuf, process::Stdio};

use anyhow::{Context, bail};
use serde_json::{Map, Value, json};

/// The figures compared, each with whether a higher value is better.
const FIGURES: [(&str, bool); 8] = [
    ("delivered_per_s", true),
    ("cpu_ms_per_webhook_service", false),
    ("arrival_p50_ms", false),
    ("arrival_p99_ms", false),
    ("arrival_p99_ms_after_warm_up", false),
    ("create_p99_ms", false),
    ("wakeups_per_webhook_service", false),
    ("writes_per_transaction", true),
];

/// The options that describe the comparison itself, taken out of the
/// arguments a child run gets; each takes a value.
const OWN_OPTIONS: [&str; 4] = ["--pairs", "--b-bin", "--b-set", "--bin"];

/// One side of the comparison.
pub struct Variant {
    pub bin: PathBuf,
    /// `NAME=VALUE` environment for its service processes.
    pub set: Vec<String>,
}

/// The arguments of a child run: this process's own (`args`, without the
/// program name), less the comparison's options, with the variant's
/// binary and environment.
pub fn child_args(args: &[OsString], v: &Variant) -> Vec<OsString> {
    let mut out = Vec::with_capacity(args.len() + 2 + 2 * v.set.len());
    let mut skip_value = false;
    for a in args {
        if std::mem::take(&mut skip_value) {
            continue;
        }
        let text = a.to_string_lossy();
        if let Some(&own) = OWN_OPTIONS
            .iter()
            .find(|o| text == **o || text.strip_prefix(**o).is_some_and(|r| r.starts_with('=')))
        {
            // `--pairs 5` takes the next argument along; `--pairs=5` not.
            skip_value = text == own;
            continue;
        }
        out.push(a.clone());
    }
    out.push("--bin".into());
    out.push(v.bin.clone().into_os_string());
    for kv in &v.set {
        out.push("--set".into());
        out.push(kv.into());
    }
    out
}

/// The `RESULT` JSON object of a run's output.
pub fn result_of(stdout: &str) -> Option<Map<String, Value>> {
    stdout
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("RESULT "))
        .and_then(|r| serde_json::from_str::<Value>(r).ok())
        .and_then(|v| match v {
            Value::Object(m) => Some(m),
            _ => None,
        })
}

/// The median of `xs` (the mean of the two middle ones for an even count).
pub fn median(xs: &[f64]) -> Option<f64> {
    let mut s: Vec<f64> = xs.iter().copied().filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return None;
    }
    s.sort_by(f64::total_cmp);
    let m = s.len() / 2;
    Some(if s.len() % 2 == 1 {
        s[m]
    } else {
        (s[m - 1] + s[m]) / 2.0
    })
}

/// One figure over the pairs: each pair's ratio B / A, their median and
/// range, and how many pairs favour B.
#[derive(Debug, PartialEq)]
pub struct Summary {
    pub figure: &'static str,
    pub ratios: Vec<f64>,
    pub median: f64,
    pub b_better: usize,
}

/// The figures that every run of both variants reported, each summed up.
pub fn summarize(a: &[Map<String, Value>], b: &[Map<String, Value>]) -> Vec<Summary> {
    FIGURES
        .iter()
        .filter_map(|&(figure, higher_is_better)| {
            let ratios: Vec<f64> = a
                .iter()
                .zip(b)
                .map(|(a, b)| {
                    let a = a.get(figure)?.as_f64()?;
                    let b = b.get(figure)?.as_f64()?;
                    (a > 0.0).then_some(b / a)
                })
                .collect::<Option<_>>()?;
            let median = median(&ratios)?;
            let b_better = ratios
                .iter()
                .filter(|&&r| if higher_is_better { r > 1.0 } else { r < 1.0 })
                .count();
            Some(Summary {
                figure,
                ratios,
                median,
                b_better,
            })
        })
        .collect()
}

/// Runs the comparison and prints each run's main figures, then the
/// summary and a `RESULT` line with every run's results.
pub async fn run(pairs: usize, a: Variant, b: Variant) -> anyhow::Result<()> {
    if pairs == 0 {
        bail!("--pairs: must be at least 1");
    }
    let exe = std::env::current_exe()?;
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let mut results: [Vec<Map<String, Value>>; 2] = [Vec::new(), Vec::new()];
    println!(
        "paired comparison, {pairs} pairs: A = {} {:?}, B = {} {:?}",
        a.bin.display(),
        a.set,
        b.bin.display(),
        b.set
    );
    for pair in 0..pairs {
        // A B, then B A, …
        let order = if pair % 2 == 0 { [0, 1] } else { [1, 0] };
        for side in order {
            let v = [&a, &b][side];
            let mut cmd = std::process::Command::new(&exe);
            cmd.args(child_args(&args, v))
                .stdin(Stdio::null())
                .stderr(Stdio::inherit());
            let out = tokio::task::spawn_blocking(move || cmd.output())
                .await?
                .context("starting a run")?;
            let stdout = String::from_utf8_lossy(&out.stdout);
            let label = ["A", "B"][side];
            if !out.status.success() {
                bail!(
                    "pair {}, run {label} failed ({}):\n{stdout}",
                    pair + 1,
                    out.status
                );
            }
            let r = result_of(&stdout)
                .with_context(|| format!("pair {}, run {label}: no RESULT line", pair + 1))?;
            let get = |k: &str| r.get(k).and_then(Value::as_f64);
            println!(
                "pair {} {label}: {:.0} webhooks/s · {} ms per webhook · Confirm to arrival p50 {} ms, p99 {} ms",
                pair + 1,
                get("delivered_per_s").unwrap_or(f64::NAN),
                get("cpu_ms_per_webhook_service").map_or("-".into(), |c| format!("{c:.3}")),
                get("arrival_p50_ms").map_or("-".into(), |c| format!("{c:.1}")),
                get("arrival_p99_ms").map_or("-".into(), |c| format!("{c:.1}")),
            );
            results[side].push(r);
        }
    }
    let [ra, rb] = &results;
    let summary = summarize(ra, rb);
    println!("B / A, pair by pair (median; range; pairs where B is better):");
    let mut ratios = Map::new();
    for s in &summary {
        let (lo, hi) = s
            .ratios
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), r| {
                (lo.min(*r), hi.max(*r))
            });
        println!(
            "  {:<30} {:.3} ({lo:.3}–{hi:.3}; {} of {})",
            s.figure,
            s.median,
            s.b_better,
            s.ratios.len()
        );
        ratios.insert(
            s.figure.into(),
            json!({"median": s.median, "min": lo, "max": hi, "b_better": s.b_better, "ratios": s.ratios}),
        );
    }
    let result = json!({
        "pairs": pairs,
        "a": {"bin": a.bin, "set": a.set, "runs": ra},
        "b": {"bin": b.bin, "set": b.set, "runs": rb},
        "ratios": ratios,
    });
    println!("RESULT {result}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(xs: &[&str]) -> Vec<OsString> {
        xs.iter().map(OsString::from).collect()
    }

    #[test]
    fn a_child_run_gets_the_arguments_less_the_comparison() {
        let v = Variant {
            bin: "/b/uploadhook".into(),
            set: vec!["K=V".into()],
        };
        let args = os(&[
            "--deployment",
            "embedded",
            "--pairs",
            "3",
            "--b-set=K=V",
            "--webhooks",
            "100",
            "--b-bin",
            "/b/uploadhook",
            "--bin=/a/uploadhook",
            "--set",
            "X=1",
        ]);
        assert_eq!(
            child_args(&args, &v),
            os(&[
                "--deployment",
                "embedded",
                "--webhooks",
                "100",
                "--set",
                "X=1",
                "--bin",
                "/b/uploadhook",
                "--set",
                "K=V",
            ])
        );
        // An option that only starts like one of them is kept.
        let args = os(&["--pairsx", "1"]);
        assert_eq!(child_args(&args, &v)[..2], os(&["--pairsx", "1"])[..]);
    }

    #[test]
    fn the_result_line_is_found_among_the_output() {
        let out = "== Phase 1\nRESULT {\"delivered_per_s\": 10.5}\nlater line\n";
        assert_eq!(
            result_of(out).unwrap()["delivered_per_s"].as_f64(),
            Some(10.5)
        );
        assert!(result_of("no result\n").is_none());
        assert!(result_of("RESULT [1]\n").is_none());
    }

    #[test]
    fn the_median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[f64::NAN, 1.0]), Some(1.0));
    }

    #[test]
    fn ratios_say_which_side_is_better_per_figure() {
        let run = |per_s: f64, cpu: f64| {
            let mut m = Map::new();
            m.insert("delivered_per_s".into(), per_s.into());
            m.insert("cpu_ms_per_webhook_service".into(), cpu.into());
            m
        };
        let a = [run(100.0, 1.0), run(200.0, 1.0), run(100.0, 2.0)];
        let b = [run(110.0, 0.5), run(180.0, 1.5), run(120.0, 1.0)];
        let s = summarize(&a, &b);
        // Figures some run did not report are left out.
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].figure, "delivered_per_s");
        assert_eq!(s[0].ratios, vec![1.1, 0.9, 1.2]);
        assert_eq!(s[0].median, 1.1);
        assert_eq!(s[0].b_better, 2, "higher throughput is better");
        assert_eq!(s[1].figure, "cpu_ms_per_webhook_service");
        assert_eq!(s[1].median, 0.5);
        assert_eq!(s[1].b_better, 2, "less CPU is better");
    }
}
