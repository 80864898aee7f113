//! State that the workers of one zone share besides the cache: the lookup budget, the circuit
//! breaker and the counters. It lives in the zone, so it is plain `repr(C)` data with no
//! pointers; the budget and the breaker are changed only with the zone locked, the counters are
//! atomics changed without the lock.

use core::sync::atomic::{AtomicU64, Ordering};

/// Identifies zone state laid out by this module ("sniguard" backwards).
const MAGIC: u64 = u64::from_le_bytes(*b"draugins");

/// Bumped whenever [`ZoneState`] or anything in it changes shape.
const LAYOUT: u32 = 2;

/// Slots of the per-client budgets; clients whose addresses hash alike share one.
pub const CLIENT_SLOTS: usize = 1024;

/// Everything a zone holds besides the cache, which it points to.
#[repr(C)]
pub struct ZoneState {
    magic: u64,
    layout: u32,
    /// Offset of the cache's header in the zone.
    pub cache: u32,
    /// Keys of the client address hash.
    pub seed: [u64; 2],
    /// Which lookup service the cached answers came from (see [`service_id`]); 0 for none yet.
    pub service: u64,
    pub budget: Bucket,
    pub clients: [Bucket; CLIENT_SLOTS],
    pub breaker: Breaker,
    pub stats: Stats,
}

impl ZoneState {
    /// Fresh state for a zone whose cache header is at offset `cache`.
    pub fn new(cache: u32, seed: [u64; 2]) -> Self {
        ZoneState {
            magic: MAGIC,
            layout: LAYOUT,
            cache,
            seed,
            service: 0,
            budget: Bucket::default(),
            clients: [Bucket::default(); CLIENT_SLOTS],
            breaker: Breaker::default(),
            stats: Stats::default(),
        }
    }

    /// Whether this is state this build laid out, rather than other data or another layout.
    pub fn is_understood(&self) -> bool {
        self.magic == MAGIC && self.layout == LAYOUT
    }
}

/// Names a lookup service, so that a zone kept across a reload can tell whether its answers
/// came from the service now configured: scheme, host (any case), port, path and query.
pub fn service_id(scheme: &str, host: &str, port: u16, path_and_query: &str) -> u64 {
    let key = format!("{scheme}://{}:{port}{path_and_query}", host.to_ascii_lowercase());
    crate::cache::siphash13([0x7365_7276_6963_6573, 0], key.as_bytes()).max(1)
}

/// A lookup budget: a rate in requests per second and a burst.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    /// Requests per second, in thousandths (nginx's limit_req counts the same way).
    pub per_second_milli: u64,
    /// Requests that may be made at once beyond the rate.
    pub burst: u64,
}

impl Rate {
    /// Parses a rate as nginx's limit_req writes one: "20r/s" or "600r/m", in thousandths of a
    /// request per second. Zero is not a rate.
    pub fn parse_per_second_milli(text: &str) -> Option<u64> {
        let (count, scale) = if let Some(n) = text.strip_suffix("r/s") {
            (n, 1)
        } else {
            (text.strip_suffix("r/m")?, 60)
        };
        if count.is_empty() || !count.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let count: u64 = count.parse().ok()?;
        let milli = count.checked_mul(1000)? / scale;
        (milli > 0).then_some(milli)
    }
}

/// A leaky bucket, as nginx's limit_req keeps one: `excess` is how far, in thousandths of a
/// request, the requests admitted so far are ahead of the rate, counting the last one.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Bucket {
    excess: u64,
    last: u64,
}

impl Bucket {
    /// The bucket after admitting one more request at `now` (milliseconds), or `None` when the
    /// request is over the budget. Nothing changes until [`Bucket::commit`].
    pub fn check(&self, rate: Rate, now: u64) -> Option<Bucket> {
        let elapsed = now.saturating_sub(self.last);
        let drained = rate.per_second_milli.saturating_mul(elapsed) / 1000;
        let excess = self.excess.saturating_sub(drained).saturating_add(1000);

        (excess <= rate.burst.saturating_mul(1000).saturating_add(1000))
            .then_some(Bucket { excess, last: now.max(self.last) })
    }

    pub fn commit(&mut self, next: Bucket) {
        *self = next;
    }
}

/// The zone's bucket and the client slot's bucket after admitting one more lookup at `now`, or
/// `None` when either is over its budget. Nothing is charged until the caller commits them, so
/// a lookup refused for another reason costs nothing.
pub fn check_budget(
    zone: (&Bucket, Option<Rate>),
    client: Option<(&Bucket, Rate)>,
    now: u64,
) -> Option<(Option<Bucket>, Option<Bucket>)> {
    let zone_next = match zone {
        (bucket, Some(rate)) => Some(bucket.check(rate, now)?),
        (_, None) => None,
    };
    let client_next = match client {
        Some((bucket, rate)) => Some(bucket.check(rate, now)?),
        None => None,
    };
    Some((zone_next, client_next))
}

/// The slot of a client address in [`ZoneState::clients`].
pub fn client_slot(seed: [u64; 2], address: &[u8]) -> usize {
    crate::cache::siphash13(seed, address) as usize % CLIENT_SLOTS
}

/// When to stop calling a failing lookup service, and for how long.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BreakerSettings {
    /// Consecutive lookup errors that open the breaker; 0 means never.
    pub errors: u32,
    /// How long it stays open before one probe lookup is let through, in milliseconds.
    pub cooldown: u64,
    /// How long a probe may take before another one is let through, in milliseconds.
    pub probe_timeout: u64,
}

/// A change of the breaker's state worth logging.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transition {
    Opened,
    Closed,
}

/// What the breaker says about making a lookup now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// The service is believed healthy: go ahead.
    Go,
    /// The cool-down is over: this one lookup probes the service.
    Probe,
    /// The breaker is open: do not call the service.
    Shut,
}

/// A circuit breaker over the lookup service, shared by the workers of a zone.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Breaker {
    /// Consecutive lookup errors so far.
    errors: u32,
    /// 0 closed, 1 open, 2 a probe is out.
    state: u32,
    /// Open: when the cool-down ends. Probing: when the probe is given up on.
    until: u64,
}

impl Breaker {
    const CLOSED: u32 = 0;
    const OPEN: u32 = 1;
    const PROBING: u32 = 2;

    /// Decides whether a lookup may be made at `now`.
    pub fn admit(&mut self, settings: &BreakerSettings, now: u64) -> Admission {
        match self.state {
            Self::CLOSED => Admission::Go,
            _ if now < self.until => Admission::Shut,
            _ => {
                self.state = Self::PROBING;
                self.until = now.saturating_add(settings.probe_timeout);
                Admission::Probe
            }
        }
    }

    /// Records the outcome of a lookup made at the breaker's word; tells when that opened or
    /// closed the breaker.
    pub fn record(&mut self, ok: bool, settings: &BreakerSettings, now: u64) -> Option<Transition> {
        let was_closed = self.state == Self::CLOSED;

        if ok {
            *self = Breaker::default();
            return (!was_closed).then_some(Transition::Closed);
        }

        self.errors = self.errors.saturating_add(1);

        let opens = self.state == Self::PROBING
            || (was_closed && settings.errors > 0 && self.errors >= settings.errors);
        if opens {
            self.state = Self::OPEN;
            self.until = now.saturating_add(settings.cooldown);
        }
        (opens && was_closed).then_some(Transition::Opened)
    }

    /// "closed"; "open" during the cool-down; "half-open" once it is over and the next miss
    /// will probe; "probing" while a probe lookup is out.
    pub fn state_name(&self, now: u64) -> &'static str {
        match self.state {
            Self::CLOSED => "closed",
            Self::OPEN if now < self.until => "open",
            Self::OPEN => "half-open",
            _ => "probing",
        }
    }

    /// Whether misses are answered without the service at `now`.
    pub fn is_shut(&self, now: u64) -> bool {
        self.state == Self::OPEN && now < self.until
    }

    /// Consecutive lookup errors so far.
    pub fn errors(&self) -> u32 {
        self.errors
    }
}

/// What was decided for a handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Allow(Allowance),
    Refuse(Refusal),
}

impl Decision {
    /// A small non-zero number for the decision, to keep with the connection.
    pub fn code(self) -> usize {
        match self {
            Decision::Allow(a) => 1 + a as usize,
            Decision::Refuse(r) => 16 + r as usize,
        }
    }

    pub fn from_code(code: usize) -> Option<Decision> {
        match code {
            1..=15 => Allowance::ALL.get(code - 1).copied().map(Decision::Allow),
            16.. => Refusal::ALL.get(code - 16).copied().map(Decision::Refuse),
            0 => None,
        }
    }
}

/// Why a handshake was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    NotRegistered,
    InvalidName,
    LookupError,
    OverBudget,
    NoSni,
}

impl Refusal {
    pub const ALL: [Refusal; 5] = [
        Refusal::NotRegistered,
        Refusal::InvalidName,
        Refusal::LookupError,
        Refusal::OverBudget,
        Refusal::NoSni,
    ];

    /// The name used in logs and in the status report.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::NotRegistered => "not_registered",
            Refusal::InvalidName => "invalid_name",
            Refusal::LookupError => "lookup_error",
            Refusal::OverBudget => "over_budget",
            Refusal::NoSni => "no_sni",
        }
    }
}

/// How an allowed handshake was decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Allowance {
    /// The name is on the server's static allow list.
    AllowListed,
    /// A fresh answer in the cache.
    Cache,
    /// An expired "registered" answer, used while it is refreshed or while lookups fail.
    Stale,
    /// A lookup made for this handshake.
    Lookup,
    /// No server name, and `sni_guard_no_sni allow`.
    NoSni,
    /// A lookup error, and `sni_guard_on_error allow`.
    OnError,
}

impl Allowance {
    pub const ALL: [Allowance; 6] = [
        Allowance::AllowListed,
        Allowance::Cache,
        Allowance::Stale,
        Allowance::Lookup,
        Allowance::NoSni,
        Allowance::OnError,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Allowance::AllowListed => "allow_list",
            Allowance::Cache => "cache",
            Allowance::Stale => "stale",
            Allowance::Lookup => "lookup",
            Allowance::NoSni => "no_sni",
            Allowance::OnError => "on_error",
        }
    }
}

/// What a lookup came back with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Registered,
    NotRegistered,
    Error,
}

impl Outcome {
    pub const ALL: [Outcome; 3] = [Outcome::Registered, Outcome::NotRegistered, Outcome::Error];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Registered => "registered",
            Outcome::NotRegistered => "not_registered",
            Outcome::Error => "error",
        }
    }
}

/// Upper bounds, in milliseconds, of the lookup latency histogram; the last bucket is the rest.
pub const LATENCY_BOUNDS: [u64; 10] = [1, 2, 5, 10, 25, 50, 100, 250, 500, 1000];

/// Counters of one zone, summed over all its workers.
#[repr(C)]
#[derive(Default)]
pub struct Stats {
    pub allowed: [AtomicU64; Allowance::ALL.len()],
    pub refused: [AtomicU64; Refusal::ALL.len()],
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    /// Lookups for handshakes (on a miss) and in the background (refreshes), by outcome.
    pub lookups: [AtomicU64; Outcome::ALL.len()],
    pub refreshes: [AtomicU64; Outcome::ALL.len()],
    /// Lookup latency, as counts per bucket of [`LATENCY_BOUNDS`] plus one for the rest.
    pub latency: [AtomicU64; LATENCY_BOUNDS.len() + 1],
    pub latency_sum_us: AtomicU64,
    /// Misses answered without the service because the breaker was open.
    pub breaker_shut: AtomicU64,
    /// Answers that could not be cached for lack of memory.
    pub store_failures: AtomicU64,
}

impl Stats {
    pub fn allowed(&self, how: Allowance) {
        bump(&self.allowed[how as usize]);
    }

    pub fn refused(&self, why: Refusal) {
        bump(&self.refused[why as usize]);
    }

    /// Counts a lookup and its latency, in microseconds; `background` for refreshes.
    pub fn lookup(&self, outcome: Outcome, micros: u64, background: bool) {
        let by_outcome = if background { &self.refreshes } else { &self.lookups };
        bump(&by_outcome[outcome as usize]);

        let bucket = LATENCY_BOUNDS
            .iter()
            .position(|&ms| micros <= ms * 1000)
            .unwrap_or(LATENCY_BOUNDS.len());
        bump(&self.latency[bucket]);
        self.latency_sum_us.fetch_add(micros, Ordering::Relaxed);
    }

    /// Adds another zone's counters to these: a zone resized on reload keeps its counts.
    pub fn add(&self, other: &Stats) {
        let arrays = self
            .allowed
            .iter()
            .zip(&other.allowed)
            .chain(self.refused.iter().zip(&other.refused))
            .chain(self.lookups.iter().zip(&other.lookups))
            .chain(self.refreshes.iter().zip(&other.refreshes))
            .chain(self.latency.iter().zip(&other.latency));
        let singles = [
            (&self.hits, &other.hits),
            (&self.misses, &other.misses),
            (&self.latency_sum_us, &other.latency_sum_us),
            (&self.breaker_shut, &other.breaker_shut),
            (&self.store_failures, &other.store_failures),
        ];
        for (mine, theirs) in arrays.chain(singles) {
            mine.fetch_add(theirs.load(Ordering::Relaxed), Ordering::Relaxed);
        }
    }
}

pub fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Keeps a kind of log line from being written more than `lines` times per interval; counts
/// what it held back, to be reported with the next line let through.
#[derive(Debug, Default)]
pub struct LogLimit {
    start: Option<u64>,
    written: u32,
    held: u64,
}

impl LogLimit {
    /// Whether a line may be written at `now`; `Some(n)` with the number of lines held back
    /// since the last one written.
    pub fn admit(&mut self, now: u64, interval: u64, lines: u32) -> Option<u64> {
        match self.start {
            Some(start) if now.saturating_sub(start) < interval => {}
            _ => {
                self.start = Some(now);
                self.written = 0;
            }
        }

        if self.written >= lines {
            self.held += 1;
            return None;
        }

        self.written += 1;
        Some(core::mem::take(&mut self.held))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEN: Rate = Rate { per_second_milli: 10_000, burst: 0 };

    /// Admits a request at each time in `times` and tells which got through.
    fn run(rate: Rate, times: &[u64]) -> Vec<bool> {
        let mut bucket = Bucket::default();
        times
            .iter()
            .map(|&now| match bucket.check(rate, now) {
                Some(next) => {
                    bucket.commit(next);
                    true
                }
                None => false,
            })
            .collect()
    }

    #[test]
    fn buckets_admit_the_rate_and_the_burst() {
        let cases: [(Rate, &[u64], &[bool], &str); 5] = [
            (TEN, &[1000, 1000], &[true, false], "one at a time at 10r/s"),
            (TEN, &[1000, 1100], &[true, true], "one every 100ms at 10r/s"),
            (TEN, &[1000, 1050, 1100], &[true, false, true], "rejected ones are not charged"),
            (
                Rate { per_second_milli: 10_000, burst: 2 },
                &[1000, 1000, 1000, 1000],
                &[true, true, true, false],
                "burst of 2 on top",
            ),
            (
                Rate { per_second_milli: 500, burst: 0 },
                &[1000, 2000, 3000],
                &[true, false, true],
                "half a request per second",
            ),
        ];
        for (rate, times, want, why) in cases {
            assert_eq!(run(rate, times), want, "{why}");
        }
    }

    #[test]
    fn over_a_long_run_a_bucket_admits_rate_times_time_plus_burst() {
        let rate = Rate { per_second_milli: 20_000, burst: 5 };
        let times: Vec<u64> = (0..10_000).collect();
        let admitted = run(rate, &times).iter().filter(|&&ok| ok).count() as u64;
        // 10 seconds at 20r/s, plus the burst, plus the first request
        assert!(admitted <= 20 * 10 + 5 + 1, "admitted {admitted}");
        assert!(admitted >= 20 * 10, "admitted {admitted}");
    }

    #[test]
    fn a_lookup_over_either_budget_charges_neither() {
        let zone_rate = Rate { per_second_milli: 100_000, burst: 0 };
        let client_rate = Rate { per_second_milli: 1_000, burst: 0 };
        let (zone, client) = (Bucket::default(), Bucket::default());

        let (z, c) = check_budget((&zone, Some(zone_rate)), Some((&client, client_rate)), 1000)
            .expect("both have room");
        let (zone, client) = (z.unwrap(), c.unwrap());

        assert_eq!(
            check_budget((&zone, Some(zone_rate)), Some((&client, client_rate)), 1010),
            None,
            "the client is over its share"
        );
        assert!(
            check_budget((&zone, Some(zone_rate)), Some((&Bucket::default(), client_rate)), 1010)
                .is_some(),
            "another client is not"
        );

        let full = Bucket::default().check(TEN, 5000).unwrap();
        assert_eq!(check_budget((&full, Some(TEN)), Some((&client, client_rate)), 5000), None);
        assert_eq!(check_budget((&full, None), None, 5000), Some((None, None)), "no budget set");
    }

    #[test]
    fn rates_parse_as_limit_req_writes_them() {
        let cases = [
            ("20r/s", Some(20_000)),
            ("1r/s", Some(1_000)),
            ("60r/m", Some(1_000)),
            ("1r/m", Some(16)),
            ("0r/s", None),
            ("r/s", None),
            ("20", None),
            ("20r/h", None),
            ("-1r/s", None),
            (" 1r/s", None),
            ("99999999999999999999r/s", None),
        ];
        for (text, want) in cases {
            assert_eq!(Rate::parse_per_second_milli(text), want, "{text}");
        }
    }

    const BREAKER: BreakerSettings =
        BreakerSettings { errors: 3, cooldown: 1000, probe_timeout: 500 };

    #[test]
    fn breaker_opens_after_a_run_of_errors_and_probes_after_the_cooldown() {
        let mut b = Breaker::default();
        let s = &BREAKER;

        for now in [10, 20] {
            assert_eq!(b.admit(s, now), Admission::Go);
            b.record(false, s, now);
        }
        b.record(true, s, 25);
        assert_eq!(b.errors(), 0, "a success ends the run");

        for now in [30, 40, 50] {
            assert_eq!(b.admit(s, now), Admission::Go);
            b.record(false, s, now);
        }
        assert!(b.is_shut(60));
        assert_eq!(b.state_name(60), "open");
        assert_eq!(b.admit(s, 60), Admission::Shut);
        assert_eq!(b.admit(s, 1049), Admission::Shut, "still cooling down");

        assert_eq!(b.admit(s, 1050), Admission::Probe);
        assert_eq!(b.state_name(1055), "probing");
        assert_eq!(b.admit(s, 1060), Admission::Shut, "one probe at a time");
        b.record(false, s, 1100);
        assert_eq!(b.admit(s, 1200), Admission::Shut, "a failed probe opens it again");

        assert_eq!(b.admit(s, 2100), Admission::Probe);
        b.record(true, s, 2110);
        assert!(!b.is_shut(2111));
        assert_eq!(b.state_name(2111), "closed");
        assert_eq!(b.admit(s, 2120), Admission::Go, "a good probe closes it");
    }

    #[test]
    fn a_lost_probe_is_replaced_after_its_timeout() {
        let mut b = Breaker::default();
        for now in [1, 2, 3] {
            b.record(false, &BREAKER, now);
        }
        assert_eq!(b.admit(&BREAKER, 1003), Admission::Probe);
        assert_eq!(b.admit(&BREAKER, 1502), Admission::Shut);
        assert_eq!(b.admit(&BREAKER, 1503), Admission::Probe, "the prober never reported");
    }

    #[test]
    fn a_breaker_with_no_threshold_never_opens() {
        let s = BreakerSettings { errors: 0, ..BREAKER };
        let mut b = Breaker::default();
        for now in 0..100 {
            b.record(false, &s, now);
        }
        assert_eq!(b.admit(&s, 100), Admission::Go);
    }

    #[test]
    fn stats_count_latency_into_buckets() {
        let stats = Stats::default();
        let cases =
            [(0, 0), (1000, 0), (1001, 1), (2000, 1), (7500, 3), (1_000_000, 9), (5_000_000, 10)];
        for (micros, bucket) in cases {
            let before = stats.latency[bucket].load(Ordering::Relaxed);
            stats.lookup(Outcome::Registered, micros, false);
            assert_eq!(stats.latency[bucket].load(Ordering::Relaxed), before + 1, "{micros}us");
        }
        assert_eq!(stats.lookups[Outcome::Registered as usize].load(Ordering::Relaxed), 7);
        assert_eq!(stats.latency_sum_us.load(Ordering::Relaxed), 6_011_501);

        let copy = Stats::default();
        copy.add(&stats);
        copy.add(&stats);
        assert_eq!(copy.latency_sum_us.load(Ordering::Relaxed), 2 * 6_011_501);
        assert_eq!(copy.latency[10].load(Ordering::Relaxed), 2);
    }

    #[test]
    fn breaker_transitions_are_reported_once() {
        let mut b = Breaker::default();
        let s = &BREAKER;
        let seen: Vec<Option<Transition>> = [false, false, false, false]
            .iter()
            .enumerate()
            .map(|(i, &ok)| b.record(ok, s, i as u64))
            .collect();
        assert_eq!(seen, [None, None, Some(Transition::Opened), None]);
        assert_eq!(b.state_name(2000), "half-open");
        assert_eq!(b.admit(s, 2000), Admission::Probe);
        assert_eq!(b.record(false, s, 2001), None, "a failed probe: still open");
        assert_eq!(b.record(true, s, 4000), Some(Transition::Closed));
        assert_eq!(b.record(true, s, 4001), None);
    }

    #[test]
    fn log_limit_lets_some_lines_per_interval_and_counts_the_rest() {
        let mut limit = LogLimit::default();
        let seen: Vec<Option<u64>> = [0, 10, 20, 999, 1000, 1001, 1002, 5000]
            .iter()
            .map(|&now| limit.admit(now, 1000, 2))
            .collect();
        assert_eq!(seen, [Some(0), Some(0), None, None, Some(2), Some(0), None, Some(1)]);
    }

    #[test]
    fn decisions_survive_their_codes() {
        let all = Allowance::ALL
            .iter()
            .map(|&a| Decision::Allow(a))
            .chain(Refusal::ALL.iter().map(|&r| Decision::Refuse(r)));
        for decision in all {
            assert_ne!(decision.code(), 0);
            assert_eq!(Decision::from_code(decision.code()), Some(decision));
        }
        assert_eq!(Decision::from_code(0), None);
        assert_eq!(Decision::from_code(15), None);
        assert_eq!(Decision::from_code(99), None);
    }

    #[test]
    fn service_ids_ignore_host_case_only() {
        let id = service_id("http", "Lookup.Example", 80, "/check");
        assert_eq!(id, service_id("http", "lookup.example", 80, "/check"));
        assert_ne!(id, service_id("https", "lookup.example", 80, "/check"));
        assert_ne!(id, service_id("http", "lookup.example", 81, "/check"));
        assert_ne!(id, service_id("http", "lookup.example", 80, "/check?x=1"));
        assert_ne!(id, 0);
    }

    #[test]
    fn zone_state_knows_its_own_layout() {
        let state = ZoneState::new(64, [1, 2]);
        assert!(state.is_understood());
        let mut other = ZoneState::new(64, [1, 2]);
        other.layout += 1;
        assert!(!other.is_understood());
    }
}
