//! Background refreshes of expired "registered" answers, on one of nginx's thread pools.
//!
//! A handshake that finds an expired "registered" answer still within `sni_guard_stale` is
//! allowed at once; the refresh runs on a pool thread and its answer is stored back on the
//! worker's event loop. The pool thread touches no nginx structure: it runs the lookup client
//! (plain Rust) on data the task owns. The cache entry is marked busy for the time a lookup may
//! take, so that across all workers one refresh of a name runs at a time, and each worker has
//! at most [`MAX_IN_FLIGHT`] refreshes queued or running: when many names expire at once, the
//! rest are served stale and refreshed later, the thread pool's queue never overflows, and a
//! worker that exits (on reload) waits for few of them.

use core::ffi::c_void;
use std::cell::Cell;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nginx_sys::{ngx_event_t, ngx_log_t, ngx_shm_zone_t, NGX_LOG_ALERT};
use ngx::ngx_log_error;
use sni_guard_core::answer::{Answer, LookupError};
use sni_guard_core::lookup::Client;
use sni_guard_core::names::Name;
use sni_guard_core::panics;

use crate::conf::SrvConf;
use crate::guard;

/// Refreshes a worker has queued or running at most.
pub const MAX_IN_FLIGHT: usize = 32;

thread_local! {
    static IN_FLIGHT: Cell<usize> = const { Cell::new(0) };
}

/// Whether this worker may start another refresh now.
pub fn has_room() -> bool {
    IN_FLIGHT.with(Cell::get) < MAX_IN_FLIGHT
}

/// One refresh: the nginx task, and everything the pool thread needs, owned.
#[repr(C)]
struct Refresh {
    task: nginx_sys::ngx_thread_task_t,
    conf: &'static SrvConf,
    zone: *const ngx_shm_zone_t,
    client: Arc<Client>,
    name: Name,
    timeout: Duration,
    result: Option<Result<Answer, LookupError>>,
    micros: u64,
}

/// Starts a refresh of `name` on the server's thread pool.
pub fn start(conf: &'static SrvConf, zone: &ngx_shm_zone_t, name: &Name) {
    let Some(client) = conf.client.clone() else {
        return;
    };

    let refresh = Box::new(Refresh {
        // SAFETY: an all-zero task is what ngx_thread_task_alloc hands out.
        task: unsafe { core::mem::zeroed() },
        conf,
        zone,
        client,
        name: *name,
        timeout: Duration::from_millis(conf.timeout as u64),
        result: None,
        micros: 0,
    });

    IN_FLIGHT.with(|n| n.set(n.get() + 1));
    post(refresh);
}

fn post(refresh: Box<Refresh>) {
    let pool = refresh.conf.thread_pool;
    let r = Box::into_raw(refresh);

    // SAFETY: the task lives in the box until `done` takes it back; nginx runs `run` on a pool
    // thread and then `done` on this worker's event loop, with the event's data.
    unsafe {
        (*r).task.ctx = r.cast();
        (*r).task.handler = Some(run);
        (*r).task.event.data = r.cast();
        (*r).task.event.handler = Some(done);
        (*r).task.event.log = (*nginx_sys::ngx_cycle).log;

        if pool.is_null() || nginx_sys::ngx_thread_task_post(pool, &mut (*r).task) != 0 {
            // The queue is full: the entry stays busy, and the refresh is tried again later.
            IN_FLIGHT.with(|n| n.set(n.get().saturating_sub(1)));
            drop(Box::from_raw(r));
        }
    }
}

/// Runs on a pool thread.
unsafe extern "C" fn run(data: *mut c_void, _log: *mut ngx_log_t) {
    // SAFETY: `data` is the task's context, the box `post` made; nothing else touches it until
    // `done` runs.
    let refresh = unsafe { &mut *data.cast::<Refresh>() };
    // A panic is caught here, on the pool thread; `done` then logs it.
    if let Err(panic) = panics::catch(|| check(refresh)) {
        refresh.result = Some(Err(LookupError::Internal(format!("panic: {panic}"))));
    }
}

/// Runs on the worker's event loop once the pool thread is done.
unsafe extern "C" fn done(ev: *mut ngx_event_t) {
    // SAFETY: the event's data is the box `post` made; nginx calls this once per task.
    let refresh = unsafe { Box::from_raw((*ev).data.cast::<Refresh>()) };
    finish(*refresh);
}

fn check(refresh: &mut Refresh) {
    let started = Instant::now();
    refresh.result = Some(refresh.client.check(refresh.name.as_str(), refresh.timeout));
    refresh.micros = started.elapsed().as_micros() as u64;
}

fn finish(refresh: Refresh) {
    IN_FLIGHT.with(|n| n.set(n.get().saturating_sub(1)));

    // SAFETY: the cycle's log outlives the events of its workers.
    let log = unsafe { (*nginx_sys::ngx_cycle).log };

    let outcome = panics::catch(|| {
        // SAFETY: the zone belongs to the configuration of this worker, which lives as long as
        // the worker does.
        let Some(zone) = (unsafe { refresh.zone.as_ref() }) else {
            return;
        };
        let result = refresh.result.unwrap_or(Err(LookupError::Internal("panic".into())));
        guard::finish(refresh.conf, zone, &refresh.name, &result, refresh.micros, true, log);
    });

    if let Err(panic) = outcome {
        ngx_log_error!(NGX_LOG_ALERT, log, "sni_guard: panic while storing a refresh: {panic}");
    }
}
