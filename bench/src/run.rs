//! The run itself: C threads, each doing one connection at a time until the schedule says stop.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::AtomicUsize;
use std::thread;
use std::time::{Duration, Instant};

use rustls_pki_types::ServerName;

use crate::full;
use crate::hello;
use crate::hello_client;
use crate::names::{Names, Pick, Picker};
use crate::outcome::{Failure, Outcome};
use crate::rng::Rng;
use crate::schedule::Schedule;
use crate::stats::Tally;

/// What each attempt does, with everything that can be prepared once per run already prepared.
pub enum Work {
    Full {
        target: full::Target,
        /// The rustls form of each listed name, parallel to `Names::List`.
        listed: Vec<ServerName<'static>>,
    },
    Hello {
        addr: SocketAddr,
        source: Option<IpAddr>,
        /// The ClientHello of each listed name, parallel to `Names::List`.
        listed: Vec<Vec<u8>>,
    },
}

pub struct Plan {
    pub work: Work,
    pub names: Names,
    pub concurrency: usize,
    pub timeout: Duration,
    pub duration: Duration,
    pub max: Option<u64>,
    pub rate: Option<f64>,
}

/// Runs the plan to its end; returns what all threads saw and the wall time from the start until
/// the last thread finished its last attempt.
pub fn run(plan: &Plan) -> io::Result<(Tally, Duration)> {
    let start = Instant::now();
    let schedule = Schedule::new(start, plan.duration, plan.max, plan.rate);
    let position = AtomicUsize::new(0);
    let total = thread::scope(|scope| -> io::Result<Tally> {
        let mut handles = Vec::with_capacity(plan.concurrency);
        for index in 0..plan.concurrency {
            let (schedule, position) = (&schedule, &position);
            let handle = thread::Builder::new()
                .name(format!("sni-load-{index}"))
                .spawn_scoped(scope, move || worker(plan, schedule, position, index))?;
            handles.push(handle);
        }
        let mut total = Tally::default();
        for handle in handles {
            match handle.join() {
                Ok(tally) => total.merge(tally),
                Err(_) => return Err(io::Error::other("a load thread panicked")),
            }
        }
        Ok(total)
    })?;
    Ok((total, start.elapsed()))
}

fn worker(plan: &Plan, schedule: &Schedule, position: &AtomicUsize, index: usize) -> Tally {
    let stream = index as u64 * 2;
    let mut picker = Picker::new(&plan.names, position, index, Rng::from_os(stream));
    let mut rng = Rng::from_os(stream + 1);
    let mut tally = Tally::default();
    while schedule.next().is_some() {
        let pick = picker.next();
        // Whatever a name needs is made before the clock starts: latency is connect to outcome.
        let (outcome, latency) = match &plan.work {
            Work::Full { target, listed } => match server_name(&pick, listed) {
                Ok(name) => {
                    let host = picker.text(&pick);
                    timed(plan.timeout, |deadline| full::attempt(target, name, host, deadline))
                }
                Err(failure) => (Outcome::Failed(failure), Duration::ZERO),
            },
            Work::Hello { addr, source, listed } => {
                let fresh;
                let bytes = match &pick {
                    Pick::Listed(i) => listed
                        .get(*i)
                        .map(Vec::as_slice)
                        .ok_or_else(|| Failure::Name(format!("no hello for name number {i}"))),
                    Pick::Fresh(name) => match hello::client_hello(name, &mut rng) {
                        Ok(b) => {
                            fresh = b;
                            Ok(fresh.as_slice())
                        }
                        Err(e) => Err(Failure::Name(e.to_string())),
                    },
                };
                match bytes {
                    Ok(bytes) => timed(plan.timeout, |deadline| {
                        hello_client::attempt(*addr, *source, bytes, deadline)
                    }),
                    Err(failure) => (Outcome::Failed(failure), Duration::ZERO),
                }
            }
        };
        tally.record(&outcome, latency);
    }
    tally
}

fn timed(timeout: Duration, attempt: impl FnOnce(Instant) -> Outcome) -> (Outcome, Duration) {
    let started = Instant::now();
    let outcome = attempt(started + timeout);
    (outcome, started.elapsed())
}

fn server_name(
    pick: &Pick,
    listed: &[ServerName<'static>],
) -> Result<ServerName<'static>, Failure> {
    match pick {
        Pick::Listed(i) => {
            listed.get(*i).cloned().ok_or_else(|| Failure::Name(format!("no name {i}")))
        }
        Pick::Fresh(name) => {
            ServerName::try_from(name.clone()).map_err(|e| Failure::Name(format!("{name:?}: {e}")))
        }
    }
}
