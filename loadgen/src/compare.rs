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

/// The figures compared (keys of a run's `RESULT` line), each with
/// whether a higher value is better (`None`: neither, e.g. writes per
/// transaction, which a setting may change on purpose).
const FIGURES: [(&str, Option<bool>); 9] = [
    ("delivered_per_s", Some(true)),
    ("cpu_ms_per_webhook_service", Some(false)),
    ("cpu_service_over_control", Some(false)),
    ("arrival_p50_ms", Some(false)),
    ("arrival_p99_ms", Some(false)),
    ("arrival_p99_ms_after_warm_up", Some(false)),
    ("create_p99_ms", Some(false)),
    ("wakeups_per_webhook_service", Some(false)),
    ("writes_per_transaction", None),
];

/// The options that describe the comparison itself, taken out of the
/// arguments a child run gets; each takes a value.
const OWN_OPTIONS: [&str; 4] = ["--pairs", "--b-bin", "--b-set", "--bin"];

/// loadgen's options that take no value; every other option takes one.
const FLAGS: [&str; 5] = [
    "--retry",
    "--floor",
    "--no-confirm",
    "--hold",
    "--callgrind",
];

/// One side of the comparison.
pub struct Variant {
    pub bin: PathBuf,
    /// `NAME=VALUE` environment for its service processes, on top of the
    /// command's own `--set`.
    pub set: Vec<String>,
}

/// The arguments of a child run: this process's own (`args`, without the
/// program name), less the comparison's options, with the variant's
/// binary and environment.
pub fn child_args(args: &[OsString], v: &Variant) -> Vec<OsString> {
    let mut out = Vec::with_capacity(args.len() + 2 + 2 * v.set.len());
    let mut args = args.iter();
    while let Some(a) = args.next() {
        let text = a.to_string_lossy();
        // `--name=value`, `--name value` (the value taken along, whatever
        // it looks like), or a flag.
        let (name, value) = match text.split_once('=') {
            Some((name, _)) => (name, None),
            None if text.starts_with("--") && !FLAGS.contains(&&*text) => (&*text, args.next()),
            None => (&*text, None),
        };
        if OWN_OPTIONS.contains(&name) {
            continue;
        }
        out.push(a.clone());
        out.extend(value.cloned());
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
    let mut s = xs.to_vec();
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

/// One figure over the pairs: each pair's ratio B / A, their median, and
/// how many pairs favour B (`None` for a figure that is better neither
/// higher nor lower).
#[derive(Debug, PartialEq)]
pub struct Summary {
    pub figure: &'static str,
    pub ratios: Vec<f64>,
    pub median: f64,
    pub b_better: Option<usize>,
}

/// Each figure some run reported: `Ok` when every pair gives a ratio,
/// `Err(figure)` when some run did not report it or A's was 0.
pub fn summarize(
    a: &[Map<String, Value>],
    b: &[Map<String, Value>],
) -> Vec<Result<Summary, &'static str>> {
    // Then where the latency went, stage by stage (a run that read its
    // stages reports them).
    let stages = crate::stages::STAGES.map(|(_, figure, _)| (figure, Some(false)));
    FIGURES
        .iter()
        .chain(&stages)
        .filter(|(figure, _)| a.iter().chain(b).any(|r| r.contains_key(*figure)))
        .map(|&(figure, higher_is_better)| {
            let ratios: Vec<f64> = a
                .iter()
                .zip(b)
                .map(|(a, b)| {
                    let a = a.get(figure)?.as_f64()?;
                    let b = b.get(figure)?.as_f64()?;
                    (a > 0.0).then_some(b / a)
                })
                .collect::<Option<_>>()
                .ok_or(figure)?;
            let median = median(&ratios).ok_or(figure)?;
            let b_better = higher_is_better.map(|higher| {
                ratios
                    .iter()
                    .filter(|&&r| if higher { r > 1.0 } else { r < 1.0 })
                    .count()
            });
            Ok(Summary {
                figure,
                ratios,
                median,
                b_better,
            })
        })
        .collect()
}

/// Which variant runs first in pair `pair` (from 0): A in even pairs, B in
/// odd ones; indexes into `[A, B]`.
pub fn order(pair: usize) -> [usize; 2] {
    if pair.is_multiple_of(2) {
        [0, 1]
    } else {
        [1, 0]
    }
}

/// Runs the comparison and prints each run's main figures, then the
/// summary and a `RESULT` line with every run's results. `common`: the
/// `--set` both variants get. If a run fails, the pairs done so far are
/// summed up before the error.
pub async fn run(pairs: usize, a: Variant, b: Variant, common: &[String]) -> anyhow::Result<()> {
    if pairs == 0 {
        bail!("--pairs: must be at least 1");
    }
    let exe = std::env::current_exe()?;
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let mut results: [Vec<Map<String, Value>>; 2] = [Vec::new(), Vec::new()];
    println!(
        "paired comparison, {pairs} pairs: A = {} {:?}, B = {} {:?}, both {common:?}",
        a.bin.display(),
        a.set,
        b.bin.display(),
        b.set
    );
    for pair in 0..pairs {
        for side in order(pair) {
            let label = ["A", "B"][side];
            match run_one(&exe, &args, [&a, &b][side]).await {
                Ok(r) => {
                    print_run(pair, label, &r);
                    results[side].push(r);
                }
                Err(e) => {
                    // The pairs done so far, then the error.
                    let done = results[0].len().min(results[1].len());
                    report(&results[0][..done], &results[1][..done], &a, &b, common);
                    return Err(e.context(format!("pair {}, run {label}", pair + 1)));
                }
            }
        }
    }
    report(&results[0], &results[1], &a, &b, common);
    Ok(())
}

/// One child run; its `RESULT`, which a failed run has none of.
async fn run_one(
    exe: &std::path::Path,
    args: &[OsString],
    v: &Variant,
) -> anyhow::Result<Map<String, Value>> {
    let mut cmd = std::process::Command::new(exe);
    cmd.args(child_args(args, v))
        .stdin(Stdio::null())
        .stderr(Stdio::inherit());
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await?
        .context("starting a run")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("the run failed ({}):\n{stdout}", out.status);
    }
    result_of(&stdout).context("no RESULT line")
}

fn print_run(pair: usize, label: &str, r: &Map<String, Value>) {
    let get = |k: &str, digits: usize| {
        r.get(k)
            .and_then(Value::as_f64)
            .map_or("-".into(), |v| format!("{v:.digits$}"))
    };
    println!(
        "pair {} {label}: {} webhooks/s · {} ms per webhook · Confirm to arrival p50 {} ms, p99 {} ms",
        pair + 1,
        get("delivered_per_s", 0),
        get("cpu_ms_per_webhook_service", 3),
        get("arrival_p50_ms", 1),
        get("arrival_p99_ms", 1),
    );
}

/// Prints the summary of the pairs `ra`, `rb` and the `RESULT` line.
fn report(
    ra: &[Map<String, Value>],
    rb: &[Map<String, Value>],
    a: &Variant,
    b: &Variant,
    common: &[String],
) {
    println!(
        "B / A over {} pairs (median; range; pairs where B is better):",
        ra.len()
    );
    let mut ratios = Map::new();
    for s in summarize(ra, rb) {
        let s = match s {
            Ok(s) => s,
            Err(figure) => {
                println!("  {figure:<30} not compared: a run did not report it, or A's was 0");
                continue;
            }
        };
        let (lo, hi) = s
            .ratios
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), r| {
                (lo.min(*r), hi.max(*r))
            });
        let better = s
            .b_better
            .map_or("-".into(), |n| format!("{n} of {}", s.ratios.len()));
        println!(
            "  {:<30} {:.3} ({lo:.3}–{hi:.3}; {better})",
            s.figure, s.median
        );
        ratios.insert(
            s.figure.into(),
            json!({"median": s.median, "min": lo, "max": hi, "b_better": s.b_better, "ratios": s.ratios}),
        );
    }
    let result = json!({
        "pairs": ra.len(),
        "set_both": common,
        "a": {"bin": a.bin, "set": a.set, "runs": ra},
        "b": {"bin": b.bin, "set": b.set, "runs": rb},
        "ratios": ratios,
    });
    println!("RESULT {result}");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(xs: &[&str]) -> Vec<OsString> {
        xs.iter().map(OsString::from).collect()
    }

    fn variant() -> Variant {
        Variant {
            bin: "/b/uploadhook".into(),
            set: vec!["K=V".into()],
        }
    }

    #[test]
    fn a_child_run_gets_the_arguments_less_the_comparison() {
        let args = os(&[
            "--deployment",
            "embedded",
            "--pairs",
            "3",
            "--b-set=K=V",
            "--floor",
            "--webhooks",
            "100",
            "--b-bin",
            "/b/uploadhook",
            "--bin=/a/uploadhook",
            "--set",
            "X=1",
            "--b-set",
            "K=V",
            "--pairs=3",
            "--bin",
            "/a/uploadhook",
        ]);
        assert_eq!(
            child_args(&args, &variant()),
            os(&[
                "--deployment",
                "embedded",
                "--floor",
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
    }

    #[test]
    fn a_value_that_looks_like_an_option_stays_with_its_option() {
        // An option that only starts like one of them is kept, and so is
        // a value that looks like one.
        let args = os(&["--pairsx", "1", "--set", "--bin", "--set=--pairs"]);
        assert_eq!(
            child_args(&args, &variant())[..5],
            os(&["--pairsx", "1", "--set", "--bin", "--set=--pairs"])[..]
        );
    }

    #[test]
    fn pairs_alternate_which_variant_runs_first() {
        assert_eq!(
            (0..4).map(order).collect::<Vec<_>>(),
            vec![[0, 1], [1, 0], [0, 1], [1, 0]]
        );
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
    }

    fn run(figures: &[(&str, f64)]) -> Map<String, Value> {
        figures
            .iter()
            .map(|(k, v)| (k.to_string(), Value::from(*v)))
            .collect()
    }

    #[test]
    fn ratios_say_which_side_is_better_per_figure() {
        let a = [
            run(&[
                ("delivered_per_s", 100.0),
                ("cpu_ms_per_webhook_service", 1.0),
            ]),
            run(&[
                ("delivered_per_s", 200.0),
                ("cpu_ms_per_webhook_service", 1.0),
            ]),
            run(&[
                ("delivered_per_s", 100.0),
                ("cpu_ms_per_webhook_service", 2.0),
            ]),
        ];
        let b = [
            run(&[
                ("delivered_per_s", 110.0),
                ("cpu_ms_per_webhook_service", 0.5),
            ]),
            run(&[
                ("delivered_per_s", 180.0),
                ("cpu_ms_per_webhook_service", 1.5),
            ]),
            run(&[
                ("delivered_per_s", 120.0),
                ("cpu_ms_per_webhook_service", 1.0),
            ]),
        ];
        let s: Vec<Summary> = summarize(&a, &b).into_iter().map(Result::unwrap).collect();
        // Figures no run reported are left out.
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].figure, "delivered_per_s");
        assert_eq!(s[0].ratios, vec![1.1, 0.9, 1.2]);
        assert_eq!(s[0].median, 1.1);
        assert_eq!(s[0].b_better, Some(2), "higher throughput is better");
        assert_eq!(s[1].figure, "cpu_ms_per_webhook_service");
        assert_eq!(s[1].median, 0.5);
        assert_eq!(s[1].b_better, Some(2), "less CPU is better");
    }

    #[test]
    fn stage_figures_are_compared_after_the_others() {
        let a = [run(&[
            ("delivered_per_s", 100.0),
            ("stage_claim_write_p50_ms", 4.0),
        ])];
        let b = [run(&[
            ("delivered_per_s", 100.0),
            ("stage_claim_write_p50_ms", 3.0),
        ])];
        let s: Vec<Summary> = summarize(&a, &b).into_iter().map(Result::unwrap).collect();
        assert_eq!(s.len(), 2);
        assert_eq!(s[1].figure, "stage_claim_write_p50_ms");
        assert_eq!(s[1].median, 0.75);
        assert_eq!(s[1].b_better, Some(1), "a shorter stage is better");
    }

    #[test]
    fn a_figure_without_a_ratio_in_some_pair_is_not_compared() {
        let a = [
            run(&[("delivered_per_s", 100.0), ("arrival_p50_ms", 0.0)]),
            run(&[("delivered_per_s", 100.0), ("arrival_p50_ms", 2.0)]),
        ];
        let b = [
            run(&[("delivered_per_s", 100.0), ("arrival_p50_ms", 1.0)]),
            run(&[("arrival_p50_ms", 1.0), ("writes_per_transaction", 3.0)]),
        ];
        let s = summarize(&a, &b);
        assert_eq!(s.len(), 3);
        // B's second run did not report it.
        assert_eq!(s[0], Err("delivered_per_s"));
        // A's first was 0.
        assert_eq!(s[1], Err("arrival_p50_ms"));
        // Reported by one run only.
        assert_eq!(s[2], Err("writes_per_transaction"));
        // A figure better neither way counts no side.
        let a = [run(&[("writes_per_transaction", 4.0)])];
        let b = [run(&[("writes_per_transaction", 8.0)])];
        let s = summarize(&a, &b).pop().unwrap().unwrap();
        assert_eq!((s.median, s.b_better), (2.0, None));
    }
}
