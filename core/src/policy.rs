//! What to do with a name, given what the cache holds and what the lookup service said.

use crate::answer::Answer;
use crate::cache::{Found, State};

/// How long answers are cached, in milliseconds, as configured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Times {
    /// `sni_guard_valid`: how long "registered" is cached.
    pub valid: u64,
    /// `sni_guard_invalid`: how long "not registered" is cached.
    pub invalid: u64,
}

/// The next step for a name that passed the name rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// The cache holds a fresh answer.
    Cached(State),
    /// The cache holds nothing usable: ask the lookup service.
    Lookup,
}

/// Decides from a cache entry (or its absence) at time `now`.
pub fn consult(found: Option<Found>, now: u64) -> Step {
    match found {
        Some(found) if now < found.expires => Step::Cached(found.state),
        _ => Step::Lookup,
    }
}

/// What to store for an answer at time `now`: the state and when it expires, or `None` when the
/// answer is not to be cached (a time of 0, configured or sent by the service).
///
/// A `ttl` sent by the lookup service replaces the configured time for that one answer.
pub fn to_store(answer: Answer, times: &Times, now: u64) -> Option<(State, u64)> {
    let (state, configured, ttl) = match answer {
        Answer::Registered { ttl } => (State::Registered, times.valid, ttl),
        Answer::NotRegistered { ttl } => (State::NotRegistered, times.invalid, ttl),
    };

    let time = ttl.map_or(configured, |seconds| u64::from(seconds) * 1000);

    (time > 0).then(|| (state, now.saturating_add(time)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMES: Times = Times { valid: 600_000, invalid: 60_000 };

    fn found(state: State, expires: u64) -> Option<Found> {
        Some(Found { state, expires, keep: 0, busy: 0 })
    }

    #[test]
    fn consult_uses_only_fresh_answers() {
        let cases = [
            (None, 10, Step::Lookup, "nothing cached"),
            (found(State::Registered, 100), 99, Step::Cached(State::Registered), "fresh"),
            (found(State::Registered, 100), 100, Step::Lookup, "expires at its time"),
            (found(State::NotRegistered, 100), 50, Step::Cached(State::NotRegistered), "negative"),
            (found(State::NotRegistered, 100), 101, Step::Lookup, "negative expired"),
        ];
        for (found, now, want, why) in cases {
            assert_eq!(consult(found, now), want, "{why}");
        }
    }

    #[test]
    fn to_store_applies_configured_times_and_service_ttls() {
        let cases = [
            (Answer::Registered { ttl: None }, Some((State::Registered, 601_000)), "valid"),
            (Answer::NotRegistered { ttl: None }, Some((State::NotRegistered, 61_000)), "invalid"),
            (Answer::Registered { ttl: Some(5) }, Some((State::Registered, 6_000)), "ttl wins"),
            (Answer::NotRegistered { ttl: Some(0) }, None, "ttl 0: not cached"),
        ];
        for (answer, want, why) in cases {
            assert_eq!(to_store(answer, &TIMES, 1_000), want, "{why}");
        }

        let never = Times { valid: 0, invalid: 0 };
        assert_eq!(to_store(Answer::Registered { ttl: None }, &never, 1), None, "valid 0");
        assert_eq!(
            to_store(Answer::Registered { ttl: Some(1) }, &never, 1),
            Some((State::Registered, 1_001)),
            "a service ttl still applies"
        );
    }
}
