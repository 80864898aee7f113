//! What happens to a valid name on a guarded server: the cache, the lookup budget, the breaker,
//! the lookup itself, and the answer kept for next time.

use std::cell::RefCell;
use std::time::{Duration, Instant};

use nginx_sys::{
    ngx_connection_t, ngx_current_msec, ngx_log_t, ngx_shm_zone_t, ngx_time_update, sockaddr,
    sockaddr_in, sockaddr_in6, AF_INET, AF_INET6, NGX_LOG_NOTICE, NGX_LOG_WARN,
};
use ngx::{ngx_log_debug, ngx_log_error};
use sni_guard_core::answer::{Answer, LookupError};
use sni_guard_core::cache::State;
use sni_guard_core::names::Name;
use sni_guard_core::policy::{self, Step};
use sni_guard_core::shared::{
    check_budget, client_slot, Admission, Allowance, Decision, LogLimit, Outcome, Refusal,
    Transition,
};

use crate::conf::{OnError, SrvConf};
use crate::{hook, refresh, zone};

/// Lookup errors are logged at most a hundred times a second per worker; the rest are counted
/// and reported with the next line. The breaker keeps failing lookups rarer than that; this
/// bounds the log where the breaker is off.
const ERROR_LOG: (u64, u32) = (1000, 100);

/// Answers that could not be cached are logged at most once a minute per worker.
const STORE_LOG: (u64, u32) = (60_000, 1);

thread_local! {
    static ERROR_LINES: RefCell<LogLimit> = RefCell::new(LogLimit::default());
    static STORE_LINES: RefCell<LogLimit> = RefCell::new(LogLimit::default());
}

/// What the zone said, with the lock held, about a name.
enum Plan {
    Cached(State),
    Stale { refresh: bool },
    Lookup,
    OverBudget,
    Shut,
}

/// Decides on a valid name.
pub fn decide(conf: &'static SrvConf, name: &Name, c: &ngx_connection_t) -> Decision {
    let log = c.log;

    if conf.allows(name) {
        ngx_log_debug!(log, "sni_guard: \"{name}\" on the allow list");
        return Decision::Allow(Allowance::AllowListed);
    }

    // SAFETY: a server with the guard on has a zone (checked at configuration time).
    let Some(zone) = (unsafe { conf.zone.as_ref() }) else {
        return refuse(conf, log, name, Refusal::LookupError, "no zone");
    };

    let now = current_msec();
    let times = conf.times();
    let (rate, per_client) = conf.rate();
    let breaker = conf.breaker();
    let address = client_address(c);

    let plan = zone::with_zone(zone, log, |z| {
        match policy::consult(z.cache.get(name.as_bytes()), &times, now) {
            Step::Cached(state) => Plan::Cached(state),

            Step::Stale { refresh } => {
                let refresh = refresh
                    && refresh::has_room()
                    && z.state.breaker.admit(&breaker, now) != Admission::Shut;
                if refresh {
                    z.cache.set_busy(name.as_bytes(), now as u32);
                }
                Plan::Stale { refresh }
            }

            Step::Lookup => {
                let slot = address.as_deref().map(|a| client_slot(z.state.seed, a));
                let client = slot.zip(per_client).map(|(s, r)| (&z.state.clients[s], r));

                let Some((zone_next, client_next)) =
                    check_budget((&z.state.budget, rate), client, now)
                else {
                    return Plan::OverBudget;
                };

                if z.state.breaker.admit(&breaker, now) == Admission::Shut {
                    return Plan::Shut;
                }

                if let Some(next) = zone_next {
                    z.state.budget.commit(next);
                }
                if let (Some(next), Some(slot)) = (client_next, slot) {
                    z.state.clients[slot].commit(next);
                }
                Plan::Lookup
            }
        }
    })
    .unwrap_or(Plan::Lookup);

    let stats = zone::stats(zone);
    let count = |hit: bool| {
        if let Some(stats) = stats {
            let counter = if hit { &stats.hits } else { &stats.misses };
            sni_guard_core::shared::bump(counter);
        }
    };

    match plan {
        Plan::Cached(State::Registered) => {
            count(true);
            ngx_log_debug!(log, "sni_guard: \"{name}\" registered, from the cache");
            Decision::Allow(Allowance::Cache)
        }
        Plan::Cached(State::NotRegistered) => {
            count(true);
            refuse(conf, log, name, Refusal::NotRegistered, "not registered")
        }
        Plan::Stale { refresh } => {
            count(true);
            ngx_log_debug!(log, "sni_guard: \"{name}\" registered, stale, refresh: {refresh}");
            if refresh {
                refresh::start(conf, zone, name);
            }
            Decision::Allow(Allowance::Stale)
        }
        Plan::OverBudget => {
            count(false);
            refuse(conf, log, name, Refusal::OverBudget, "over the lookup budget")
        }
        Plan::Shut => {
            count(false);
            if let Some(stats) = stats {
                sni_guard_core::shared::bump(&stats.breaker_shut);
            }
            on_error(conf, log, name, "lookup service failing, not asked")
        }
        Plan::Lookup => {
            count(false);
            look_up(conf, zone, name, log)
        }
    }
}

/// Asks the lookup service on this handshake, blocking the worker for at most the timeout.
fn look_up(conf: &SrvConf, zone: &ngx_shm_zone_t, name: &Name, log: *mut ngx_log_t) -> Decision {
    let Some(client) = conf.client.as_ref() else {
        return refuse(conf, log, name, Refusal::LookupError, "no lookup");
    };

    let started = Instant::now();
    let result = client.check(name.as_str(), Duration::from_millis(conf.timeout as u64));
    let micros = started.elapsed().as_micros() as u64;

    // The worker was blocked for the lookup: bring nginx's clock up to date.
    // SAFETY: called on the worker's own thread, as the event loop does.
    unsafe { ngx_time_update() };

    finish(conf, zone, name, &result, micros, false, log);

    match result {
        Ok(Answer::Registered { .. }) => Decision::Allow(Allowance::Lookup),
        Ok(Answer::NotRegistered { .. }) => {
            refuse(conf, log, name, Refusal::NotRegistered, "not registered")
        }
        Err(_) => on_error(conf, log, name, "lookup error"),
    }
}

/// Records a lookup's outcome, on a handshake or in the background: the breaker, the cache,
/// the counters, and a log line for an error.
pub fn finish(
    conf: &SrvConf,
    zone: &ngx_shm_zone_t,
    name: &Name,
    result: &Result<Answer, LookupError>,
    micros: u64,
    background: bool,
    log: *mut ngx_log_t,
) {
    let now = current_msec();
    let breaker = conf.breaker();
    let store = match result {
        Ok(answer) => policy::to_store(*answer, &conf.times(), now),
        Err(_) => None,
    };

    let mut transition = None;
    let stored = zone::with_zone(zone, log, |z| {
        transition = z.state.breaker.record(result.is_ok(), &breaker, now);
        match store {
            Some((state, expires, keep)) => {
                z.cache.put(name.as_bytes(), state, expires, keep, now).is_ok()
            }
            None => {
                if background && result.is_err() {
                    // The next refresh of the name waits a whole interval from now.
                    z.cache.set_busy(name.as_bytes(), now as u32);
                }
                true
            }
        }
    });

    let zone_name = String::from_utf8_lossy(zone.shm.name.as_bytes());
    match transition {
        Some(Transition::Opened) => {
            ngx_log_error!(
                NGX_LOG_WARN,
                log,
                "sni_guard zone \"{zone_name}\": {} lookup errors in a row, \
                 not asking the lookup service for {} ms",
                breaker.errors,
                breaker.cooldown
            );
        }
        Some(Transition::Closed) => {
            ngx_log_error!(
                NGX_LOG_NOTICE,
                log,
                "sni_guard zone \"{zone_name}\": the lookup service answers again"
            );
        }
        None => {}
    }

    let stats = zone::stats(zone);
    let outcome = match result {
        Ok(Answer::Registered { .. }) => Outcome::Registered,
        Ok(Answer::NotRegistered { .. }) => Outcome::NotRegistered,
        Err(_) => Outcome::Error,
    };
    if let Some(stats) = stats {
        stats.lookup(outcome, micros, background);
    }

    if stored != Some(true) {
        if let Some(stats) = stats {
            sni_guard_core::shared::bump(&stats.store_failures);
        }
        if let Some(held) =
            STORE_LINES.with(|l| l.borrow_mut().admit(now, STORE_LOG.0, STORE_LOG.1))
        {
            ngx_log_error!(
                NGX_LOG_WARN,
                log,
                "sni_guard zone \"{zone_name}\" is full, answers are not cached{}",
                held_back(held)
            );
        }
    }

    if let (Err(e), Some(client)) = (result, conf.client.as_ref()) {
        if let Some(held) =
            ERROR_LINES.with(|l| l.borrow_mut().admit(now, ERROR_LOG.0, ERROR_LOG.1))
        {
            ngx_log_error!(
                NGX_LOG_WARN,
                log,
                "sni_guard {} \"{}\" failed: {e}{}",
                if background { "refresh" } else { "lookup" },
                client.url().request_url(name.as_str()),
                held_back(held)
            );
        }
    }
}

fn held_back(held: u64) -> String {
    if held == 0 {
        String::new()
    } else {
        format!(" ({held} more like it not logged)")
    }
}

/// Applies `sni_guard_on_error` to a name that could not be looked up.
fn on_error(conf: &SrvConf, log: *mut ngx_log_t, name: &Name, reason: &str) -> Decision {
    match conf.on_error() {
        OnError::Refuse => refuse(conf, log, name, Refusal::LookupError, reason),
        OnError::Allow => {
            ngx_log_debug!(log, "sni_guard: \"{name}\" allowed on error: {reason}");
            Decision::Allow(Allowance::OnError)
        }
    }
}

fn refuse(
    conf: &SrvConf,
    log: *mut ngx_log_t,
    name: &Name,
    why: Refusal,
    reason: &str,
) -> Decision {
    hook::log_refusal(conf, log, name.as_str(), reason);
    Decision::Refuse(why)
}

/// The client's address, for its share of the lookup budget: behind a proxy that speaks the
/// PROXY protocol (`listen ... proxy_protocol`), the address it reports, as
/// `$proxy_protocol_addr` is, since every connection comes from the proxy itself.
fn client_address(c: &ngx_connection_t) -> Option<Vec<u8>> {
    // SAFETY: nginx reads the PROXY protocol header before the TLS handshake starts, and keeps
    // what it read in the connection's pool.
    if let Some(proxied) = unsafe { c.proxy_protocol.as_ref() } {
        if !proxied.src_addr.is_empty() {
            return Some(proxied.src_addr.as_bytes().to_vec());
        }
    }
    // SAFETY: nginx sets `sockaddr` for every accepted connection, of the family it names.
    unsafe {
        let sa = c.sockaddr.cast_const();
        match (*sa.cast::<sockaddr>()).sa_family as u32 {
            AF_INET => {
                let sin = &*sa.cast::<sockaddr_in>();
                Some(sin.sin_addr.s_addr.to_ne_bytes().to_vec())
            }
            AF_INET6 => {
                let sin6 = &*sa.cast::<sockaddr_in6>();
                Some(sin6.sin6_addr.__in6_u.__u6_addr8.to_vec())
            }
            _ => None,
        }
    }
}

pub fn current_msec() -> u64 {
    // SAFETY: nginx's cached clock, updated on the worker's own thread.
    unsafe { ngx_current_msec as u64 }
}
