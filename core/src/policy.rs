//! What to do with a name, given what the cache holds and what the lookup service said.

use crate::answer::Answer;
use crate::cache::{Found, State};

/// How long answers are used, in milliseconds, as configured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Times {
    /// `sni_guard_valid`: how long "registered" is fresh.
    pub valid: u64,
    /// `sni_guard_invalid`: how long "not registered" is fresh.
    pub invalid: u64,
    /// `sni_guard_stale`: how long after that "registered" still allows while it is refreshed
    /// or while lookups fail. At most `u32::MAX`.
    pub stale: u32,
    /// How long a refresh of one name keeps others from starting one, and so how soon a failed
    /// refresh is tried again.
    pub refresh_busy: u32,
}

/// The next step for a name that passed the name rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// The cache holds a fresh answer.
    Cached(State),
    /// The cache holds an expired "registered" answer still within its stale time: allow, and
    /// refresh it in the background unless a refresh is already under way.
    Stale { refresh: bool },
    /// The cache holds nothing usable: ask the lookup service.
    Lookup,
}

/// Decides from a cache entry (or its absence) at time `now`.
pub fn consult(found: Option<Found>, times: &Times, now: u64) -> Step {
    let Some(found) = found else {
        return Step::Lookup;
    };

    if now < found.expires {
        return Step::Cached(found.state);
    }

    if found.state == State::Registered && now < found.expires.saturating_add(found.keep.into()) {
        let busy = found.busy != 0 && (now as u32).wrapping_sub(found.busy) < times.refresh_busy;
        return Step::Stale { refresh: !busy };
    }

    Step::Lookup
}

/// What to store for an answer at time `now`: the state, when it expires and how long it is kept
/// after that; `None` when the answer is not to be cached (a time of 0, configured or sent by
/// the service).
///
/// A `ttl` sent by the lookup service replaces the configured time for that one answer.
pub fn to_store(answer: Answer, times: &Times, now: u64) -> Option<(State, u64, u32)> {
    let (state, configured, ttl, keep) = match answer {
        Answer::Registered { ttl } => (State::Registered, times.valid, ttl, times.stale),
        Answer::NotRegistered { ttl } => (State::NotRegistered, times.invalid, ttl, 0),
    };

    let time = ttl.map_or(configured, |seconds| u64::from(seconds) * 1000);

    (time > 0).then(|| (state, now.saturating_add(time), keep))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMES: Times =
        Times { valid: 600_000, invalid: 60_000, stale: 3_600_000, refresh_busy: 1000 };

    fn found(state: State, expires: u64, keep: u32, busy: u32) -> Option<Found> {
        Some(Found { state, expires, keep, busy })
    }

    #[test]
    fn consult_uses_fresh_answers_and_stale_registered_ones() {
        use State::*;
        let cases = [
            (None, 10, Step::Lookup, "nothing cached"),
            (found(Registered, 100, 0, 0), 99, Step::Cached(Registered), "fresh"),
            (found(Registered, 100, 0, 0), 100, Step::Lookup, "expired, no stale time"),
            (found(NotRegistered, 100, 0, 0), 50, Step::Cached(NotRegistered), "negative"),
            (found(NotRegistered, 100, 50, 0), 101, Step::Lookup, "negative never stale"),
            (found(Registered, 100, 50, 0), 100, Step::Stale { refresh: true }, "stale"),
            (found(Registered, 100, 50, 0), 149, Step::Stale { refresh: true }, "still stale"),
            (found(Registered, 100, 50, 0), 150, Step::Lookup, "past the stale time"),
            (found(Registered, 100, 5000, 120), 130, Step::Stale { refresh: false }, "busy"),
            (found(Registered, 100, 5000, 120), 1119, Step::Stale { refresh: false }, "busy"),
            (found(Registered, 100, 5000, 120), 1120, Step::Stale { refresh: true }, "retry"),
        ];
        for (found, now, want, why) in cases {
            assert_eq!(consult(found, &TIMES, now), want, "{why}");
        }
    }

    #[test]
    fn busy_marks_survive_the_clock_wrapping_32_bits() {
        let now = (1u64 << 32) + 10;
        let busy = u32::MAX - 5; // set 16ms earlier, before the low 32 bits wrapped
        let f = found(State::Registered, now - 100, 10_000, busy);
        assert_eq!(consult(f, &TIMES, now), Step::Stale { refresh: false });
    }

    #[test]
    fn to_store_applies_configured_times_and_service_ttls() {
        use State::*;
        let cases = [
            (Answer::Registered { ttl: None }, Some((Registered, 601_000, 3_600_000)), "valid"),
            (Answer::NotRegistered { ttl: None }, Some((NotRegistered, 61_000, 0)), "invalid"),
            (Answer::Registered { ttl: Some(5) }, Some((Registered, 6_000, 3_600_000)), "ttl"),
            (Answer::NotRegistered { ttl: Some(0) }, None, "ttl 0: not cached"),
        ];
        for (answer, want, why) in cases {
            assert_eq!(to_store(answer, &TIMES, 1_000), want, "{why}");
        }

        let never = Times { valid: 0, invalid: 0, ..TIMES };
        assert_eq!(to_store(Answer::Registered { ttl: None }, &never, 1), None, "valid 0");
        assert_eq!(
            to_store(Answer::Registered { ttl: Some(1) }, &never, 1),
            Some((Registered, 1_001, 3_600_000)),
            "a service ttl still applies"
        );
    }
}
