//! Counting outcomes per thread, merging them, and the one JSON object the tool prints.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use crate::outcome::Outcome;

#[derive(Debug, Default)]
pub struct ErrorCount {
    pub count: u64,
    /// The first message of this kind, for stderr: counts alone do not say what went wrong.
    pub example: String,
}

/// What one thread saw; merged into one at the end of the run.
#[derive(Debug, Default)]
pub struct Tally {
    pub attempts: u64,
    pub completed: u64,
    pub alerts: BTreeMap<u8, u64>,
    pub errors: BTreeMap<&'static str, ErrorCount>,
    /// One sample per attempt, in nanoseconds; runs are bounded, so all are kept for exact
    /// percentiles.
    pub latencies_ns: Vec<u64>,
}

impl Tally {
    pub fn record(&mut self, outcome: &Outcome, latency: Duration) {
        self.attempts += 1;
        self.latencies_ns.push(u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX));
        match outcome {
            Outcome::Completed => self.completed += 1,
            Outcome::Alert(n) => *self.alerts.entry(*n).or_default() += 1,
            Outcome::Failed(f) => {
                let entry = self.errors.entry(f.kind()).or_default();
                if entry.count == 0 {
                    entry.example = f.to_string();
                }
                entry.count += 1;
            }
        }
    }

    pub fn merge(&mut self, other: Tally) {
        self.attempts += other.attempts;
        self.completed += other.completed;
        for (n, c) in other.alerts {
            *self.alerts.entry(n).or_default() += c;
        }
        for (kind, e) in other.errors {
            let entry = self.errors.entry(kind).or_default();
            if entry.count == 0 {
                entry.example = e.example;
            }
            entry.count += e.count;
        }
        self.latencies_ns.extend(other.latencies_ns);
    }

    pub fn error_total(&self) -> u64 {
        self.errors.values().map(|e| e.count).sum()
    }
}

/// The nearest-rank percentile `p` (0 < p <= 100) of sorted samples: the smallest sample that
/// at least p% of all samples are at or below.
pub fn percentile(sorted: &[u64], p: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len()) - 1).copied()
}

/// Renders the report. Sorts the latencies in place.
pub fn report_json(mode: &str, tally: &mut Tally, elapsed: Duration) -> String {
    tally.latencies_ns.sort_unstable();
    let secs = elapsed.as_secs_f64();
    let per_sec = |n: u64| if secs > 0.0 { n as f64 / secs } else { 0.0 };
    let mut out = String::new();
    // Writing to a String cannot fail; the results are ignored for that reason.
    let _ = write!(
        out,
        "{{\"mode\":\"{mode}\",\"attempts\":{},\"completed\":{},\"alerts\":{{",
        tally.attempts, tally.completed
    );
    for (i, (n, c)) in tally.alerts.iter().enumerate() {
        let _ = write!(out, "{}\"{n}\":{c}", if i > 0 { "," } else { "" });
    }
    let _ = write!(out, "}},\"errors\":{},\"error_kinds\":{{", tally.error_total());
    for (i, (kind, e)) in tally.errors.iter().enumerate() {
        let _ = write!(out, "{}\"{kind}\":{}", if i > 0 { "," } else { "" }, e.count);
    }
    let _ = write!(
        out,
        "}},\"duration_s\":{secs:.3},\"rate\":{:.1},\"completed_rate\":{:.1},\"latency_ms\":{{",
        per_sec(tally.attempts),
        per_sec(tally.completed)
    );
    let points = [("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("max", 100.0)];
    for (i, (key, p)) in points.iter().enumerate() {
        let sep = if i > 0 { "," } else { "" };
        match percentile(&tally.latencies_ns, *p) {
            Some(ns) => {
                let _ = write!(out, "{sep}\"{key}\":{:.3}", ns as f64 / 1e6);
            }
            None => {
                let _ = write!(out, "{sep}\"{key}\":null");
            }
        }
    }
    out.push_str("}}");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outcome::{Failure, Phase};
    use serde_json::Value;

    #[test]
    fn percentiles() {
        let hundred: Vec<u64> = (1..=100).collect();
        let cases: &[(&[u64], f64, Option<u64>)] = &[
            (&[], 50.0, None),
            (&[7], 50.0, Some(7)),
            (&[7], 100.0, Some(7)),
            (&[1, 2], 50.0, Some(1)),
            (&[1, 2], 51.0, Some(2)),
            (&[1, 2, 3, 4], 90.0, Some(4)),
            (&hundred, 50.0, Some(50)),
            (&hundred, 90.0, Some(90)),
            (&hundred, 99.0, Some(99)),
            (&hundred, 99.5, Some(100)),
            (&hundred, 100.0, Some(100)),
            (&hundred, 0.5, Some(1)),
        ];
        for (samples, p, want) in cases {
            assert_eq!(percentile(samples, *p), *want, "p{p} of {} samples", samples.len());
        }
    }

    fn failure(kind: &str) -> Outcome {
        Outcome::Failed(match kind {
            "eof" => Failure::Eof(Phase::Handshake),
            _ => Failure::Timeout(Phase::Handshake),
        })
    }

    #[test]
    fn merged_report() {
        let ms = Duration::from_millis;
        let mut one = Tally::default();
        one.record(&Outcome::Completed, ms(1));
        one.record(&Outcome::Alert(112), ms(4));
        one.record(&failure("eof"), ms(2));
        let mut two = Tally::default();
        two.record(&Outcome::Completed, ms(3));
        two.record(&Outcome::Alert(112), ms(5));
        two.record(&Outcome::Alert(80), ms(6));
        two.record(&failure("timeout"), ms(10));
        two.record(&failure("eof"), ms(7));
        one.merge(two);
        assert_eq!(
            one.errors["eof"].example,
            "handshake: connection closed by server without alert"
        );

        let json = report_json("hello", &mut one, Duration::from_secs(2));
        let v: Value = serde_json::from_str(&json).expect("valid JSON");
        assert_eq!(v["mode"], "hello");
        assert_eq!(v["attempts"], 8);
        assert_eq!(v["completed"], 2);
        assert_eq!(v["alerts"]["112"], 2);
        assert_eq!(v["alerts"]["80"], 1);
        assert_eq!(v["errors"], 3);
        assert_eq!(v["error_kinds"]["eof"], 2);
        assert_eq!(v["error_kinds"]["timeout"], 1);
        assert_eq!(v["duration_s"], 2.0);
        assert_eq!(v["rate"], 4.0);
        assert_eq!(v["completed_rate"], 1.0);
        // Sorted: 1 2 3 4 5 6 7 10 -> p50 is the 4th, p90 and p99 the 8th.
        assert_eq!(v["latency_ms"]["p50"], 4.0);
        assert_eq!(v["latency_ms"]["p90"], 10.0);
        assert_eq!(v["latency_ms"]["p99"], 10.0);
        assert_eq!(v["latency_ms"]["max"], 10.0);
    }

    #[test]
    fn empty_report() {
        let json = report_json("full", &mut Tally::default(), Duration::from_millis(1500));
        let v: Value = serde_json::from_str(&json).expect("valid JSON");
        assert_eq!(v["attempts"], 0);
        assert_eq!(v["alerts"], serde_json::json!({}));
        assert_eq!(v["error_kinds"], serde_json::json!({}));
        assert_eq!(v["duration_s"], 1.5);
        assert_eq!(v["rate"], 0.0);
        assert!(v["latency_ms"]["p50"].is_null());
        assert!(v["latency_ms"]["max"].is_null());
    }
}
