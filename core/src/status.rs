//! The status report of `sni_guard_status`: the counters of every zone, as JSON or in the
//! Prometheus text exposition format.

use core::fmt::Write;
use core::sync::atomic::Ordering;

use serde_json::{json, Map, Value};

use crate::shared::{Allowance, Outcome, Refusal, Stats, LATENCY_BOUNDS};

/// Everything reported of one zone, read at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ZoneReport {
    pub name: String,
    pub allowed: [u64; Allowance::ALL.len()],
    pub refused: [u64; Refusal::ALL.len()],
    pub hits: u64,
    pub misses: u64,
    pub lookups: [u64; Outcome::ALL.len()],
    pub refreshes: [u64; Outcome::ALL.len()],
    /// Lookups per latency bucket of [`LATENCY_BOUNDS`], the last one for the rest.
    pub latency: [u64; LATENCY_BOUNDS.len() + 1],
    pub latency_sum_us: u64,
    pub breaker_shut: u64,
    pub store_failures: u64,
    pub entries: u64,
    pub evictions: u64,
    pub bytes_used: u64,
    pub bytes_total: u64,
    pub breaker: &'static str,
    pub breaker_errors: u32,
}

impl ZoneReport {
    /// Reads the counters; the caller fills in what needs the zone's lock.
    pub fn from_stats(name: &str, stats: &Stats) -> Self {
        fn read<const N: usize>(counters: &[core::sync::atomic::AtomicU64; N]) -> [u64; N] {
            core::array::from_fn(|i| counters[i].load(Ordering::Relaxed))
        }

        ZoneReport {
            name: name.to_owned(),
            allowed: read(&stats.allowed),
            refused: read(&stats.refused),
            hits: stats.hits.load(Ordering::Relaxed),
            misses: stats.misses.load(Ordering::Relaxed),
            lookups: read(&stats.lookups),
            refreshes: read(&stats.refreshes),
            latency: read(&stats.latency),
            latency_sum_us: stats.latency_sum_us.load(Ordering::Relaxed),
            breaker_shut: stats.breaker_shut.load(Ordering::Relaxed),
            store_failures: stats.store_failures.load(Ordering::Relaxed),
            breaker: "closed",
            ..ZoneReport::default()
        }
    }
}

/// The report as a JSON document: `{"zones": {"NAME": {...}}}`.
pub fn to_json(zones: &[ZoneReport]) -> String {
    let mut all = Map::new();

    for z in zones {
        let by = |names: &[&str], values: &[u64]| -> Value {
            names.iter().zip(values).map(|(n, v)| ((*n).to_owned(), json!(v))).collect()
        };
        let allowed: Vec<&str> = Allowance::ALL.iter().map(|a| a.as_str()).collect();
        let refused: Vec<&str> = Refusal::ALL.iter().map(|r| r.as_str()).collect();
        let outcomes: Vec<&str> = Outcome::ALL.iter().map(|o| o.as_str()).collect();

        let buckets: Vec<Value> = LATENCY_BOUNDS
            .iter()
            .map(|b| json!(b))
            .chain([json!("inf")])
            .zip(z.latency)
            .map(|(le, count)| json!({ "le_ms": le, "count": count }))
            .collect();

        all.insert(
            z.name.clone(),
            json!({
                "handshakes": {
                    "allowed": by(&allowed, &z.allowed),
                    "refused": by(&refused, &z.refused),
                },
                "cache": {
                    "hits": z.hits,
                    "misses": z.misses,
                    "stale": z.allowed[Allowance::Stale as usize],
                    "entries": z.entries,
                    "evictions": z.evictions,
                    "store_failures": z.store_failures,
                },
                "zone": {
                    "bytes_used": z.bytes_used,
                    "bytes_total": z.bytes_total,
                },
                "lookups": by(&outcomes, &z.lookups),
                "refreshes": by(&outcomes, &z.refreshes),
                "lookup_latency": {
                    "buckets": buckets,
                    "sum_ms": z.latency_sum_us as f64 / 1000.0,
                    "count": z.latency.iter().sum::<u64>(),
                },
                "breaker": {
                    "state": z.breaker,
                    "errors": z.breaker_errors,
                    "shut": z.breaker_shut,
                },
            }),
        );
    }

    let mut text = json!({ "zones": all }).to_string();
    text.push('\n');
    text
}

/// The report in the Prometheus text exposition format (version 0.0.4).
pub fn to_prometheus(zones: &[ZoneReport]) -> String {
    let mut out = String::new();

    let mut family = |name: &str, kind: &str, help: &str, samples: &mut dyn FnMut(&mut String)| {
        let _ = writeln!(out, "# HELP sni_guard_{name} {help}");
        let _ = writeln!(out, "# TYPE sni_guard_{name} {kind}");
        samples(&mut out);
    };

    family("handshakes_allowed_total", "counter", "Handshakes allowed, by how.", &mut |o| {
        for z in zones {
            for a in Allowance::ALL {
                sample(
                    o,
                    "handshakes_allowed_total",
                    &z.name,
                    &[("how", a.as_str())],
                    z.allowed[a as usize],
                );
            }
        }
    });
    family("handshakes_refused_total", "counter", "Handshakes refused, by reason.", &mut |o| {
        for z in zones {
            for r in Refusal::ALL {
                sample(
                    o,
                    "handshakes_refused_total",
                    &z.name,
                    &[("reason", r.as_str())],
                    z.refused[r as usize],
                );
            }
        }
    });
    // The metrics that are one number per zone.
    type Single = (&'static str, &'static str, &'static str, fn(&ZoneReport) -> u64);
    let singles: [Single; 10] = [
        ("cache_hits_total", "counter", "Valid names answered from the cache.", |z| z.hits),
        ("cache_misses_total", "counter", "Valid names not in the cache.", |z| z.misses),
        ("cache_entries", "gauge", "Names in the cache.", |z| z.entries),
        ("cache_evictions_total", "counter", "Entries evicted to make room.", |z| z.evictions),
        ("cache_store_failures_total", "counter", "Answers not cached for lack of memory.", |z| {
            z.store_failures
        }),
        ("zone_bytes_used", "gauge", "Bytes of the zone in use.", |z| z.bytes_used),
        ("zone_bytes", "gauge", "Size of the zone in bytes.", |z| z.bytes_total),
        ("breaker_open", "gauge", "1 while the breaker keeps misses from the service.", |z| {
            u64::from(matches!(z.breaker, "open" | "probing"))
        }),
        ("breaker_errors", "gauge", "Consecutive lookup errors so far.", |z| {
            z.breaker_errors.into()
        }),
        ("breaker_shut_total", "counter", "Misses answered without the service.", |z| {
            z.breaker_shut
        }),
    ];
    for (name, kind, help, value) in singles {
        family(name, kind, help, &mut |o| {
            for z in zones {
                sample(o, name, &z.name, &[], value(z));
            }
        });
    }
    family("lookups_total", "counter", "Lookups, by kind and outcome.", &mut |o| {
        for z in zones {
            for (kind, counts) in [("handshake", &z.lookups), ("refresh", &z.refreshes)] {
                for out in Outcome::ALL {
                    sample(
                        o,
                        "lookups_total",
                        &z.name,
                        &[("kind", kind), ("outcome", out.as_str())],
                        counts[out as usize],
                    );
                }
            }
        }
    });
    family("lookup_duration_seconds", "histogram", "Time lookups took.", &mut |o| {
        for z in zones {
            let mut cumulative = 0;
            for (i, count) in z.latency.iter().enumerate() {
                cumulative += count;
                let le = match LATENCY_BOUNDS.get(i) {
                    Some(ms) => format!("{}", *ms as f64 / 1000.0),
                    None => "+Inf".to_owned(),
                };
                sample(o, "lookup_duration_seconds_bucket", &z.name, &[("le", &le)], cumulative);
            }
            let _ = writeln!(
                o,
                "sni_guard_lookup_duration_seconds_sum{{zone=\"{}\"}} {}",
                escape(&z.name),
                z.latency_sum_us as f64 / 1e6
            );
            sample(o, "lookup_duration_seconds_count", &z.name, &[], cumulative);
        }
    });

    out
}

fn sample(out: &mut String, name: &str, zone: &str, labels: &[(&str, &str)], value: u64) {
    let _ = write!(out, "sni_guard_{name}{{zone=\"{}\"", escape(zone));
    for (k, v) in labels {
        let _ = write!(out, ",{k}=\"{}\"", escape(v));
    }
    let _ = writeln!(out, "}} {value}");
}

/// A label value as the exposition format wants it: backslash, quote and newline escaped.
fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> ZoneReport {
        let mut z = ZoneReport { name: "guard".into(), ..ZoneReport::default() };
        z.allowed[Allowance::Cache as usize] = 7;
        z.allowed[Allowance::Stale as usize] = 2;
        z.refused[Refusal::OverBudget as usize] = 3;
        z.hits = 9;
        z.misses = 4;
        z.lookups[Outcome::Registered as usize] = 1;
        z.refreshes[Outcome::Error as usize] = 5;
        z.latency[0] = 1;
        z.latency[3] = 2;
        z.latency[LATENCY_BOUNDS.len()] = 1;
        z.latency_sum_us = 1_520_250;
        z.entries = 12;
        z.evictions = 1;
        z.bytes_used = 4096;
        z.bytes_total = 65536;
        z.breaker = "open";
        z.breaker_errors = 5;
        z
    }

    #[test]
    fn json_carries_every_counter_under_its_name() {
        let v: Value = serde_json::from_str(&to_json(&[report()])).unwrap();
        let z = &v["zones"]["guard"];
        let cases = [
            (&z["handshakes"]["allowed"]["cache"], 7),
            (&z["handshakes"]["allowed"]["lookup"], 0),
            (&z["handshakes"]["refused"]["over_budget"], 3),
            (&z["cache"]["hits"], 9),
            (&z["cache"]["misses"], 4),
            (&z["cache"]["stale"], 2),
            (&z["cache"]["entries"], 12),
            (&z["cache"]["evictions"], 1),
            (&z["zone"]["bytes_used"], 4096),
            (&z["lookups"]["registered"], 1),
            (&z["refreshes"]["error"], 5),
            (&z["lookup_latency"]["count"], 4),
            (&z["lookup_latency"]["buckets"][3]["count"], 2),
            (&z["breaker"]["errors"], 5),
        ];
        for (i, (got, want)) in cases.iter().enumerate() {
            assert_eq!(**got, json!(want), "case {i}");
        }
        assert_eq!(z["breaker"]["state"], "open");
        assert_eq!(z["lookup_latency"]["sum_ms"], json!(1520.25));
        assert_eq!(z["lookup_latency"]["buckets"][10]["le_ms"], "inf");
    }

    #[test]
    fn prometheus_lines_have_labels_and_cumulative_buckets() {
        let text = to_prometheus(&[report()]);
        let lines = [
            "sni_guard_handshakes_allowed_total{zone=\"guard\",how=\"cache\"} 7",
            "sni_guard_handshakes_refused_total{zone=\"guard\",reason=\"over_budget\"} 3",
            "sni_guard_cache_hits_total{zone=\"guard\"} 9",
            "sni_guard_lookups_total{zone=\"guard\",kind=\"refresh\",outcome=\"error\"} 5",
            "sni_guard_lookup_duration_seconds_bucket{zone=\"guard\",le=\"0.001\"} 1",
            "sni_guard_lookup_duration_seconds_bucket{zone=\"guard\",le=\"0.01\"} 3",
            "sni_guard_lookup_duration_seconds_bucket{zone=\"guard\",le=\"+Inf\"} 4",
            "sni_guard_lookup_duration_seconds_sum{zone=\"guard\"} 1.52025",
            "sni_guard_lookup_duration_seconds_count{zone=\"guard\"} 4",
            "sni_guard_breaker_open{zone=\"guard\"} 1",
            "# TYPE sni_guard_lookup_duration_seconds histogram",
        ];
        for line in lines {
            assert!(text.lines().any(|l| l == line), "missing: {line}\n{text}");
        }
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (metric, value) = line.rsplit_once(' ').unwrap();
            assert!(metric.starts_with("sni_guard_"), "{line}");
            assert!(value.parse::<f64>().is_ok(), "{line}");
        }
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
