//! The shared memory zone: the cache, the lookup budget, the breaker and the counters, and the
//! lock around them.
//!
//! The zone is an nginx slab pool. `shpool->data` points at a [`ZoneState`], which holds the
//! offset of the cache laid out by `sni_guard_core::cache`. Both store offsets, not pointers, and
//! carry a magic number and a layout version, so a worker never reads a layout it does not
//! understand: it lays the zone out afresh instead.
//!
//! Every change holds the pool's own mutex (`ngx_shmtx_t`), which the master process releases
//! when a worker dies holding it. A worker that dies in the middle of a change leaves a mark in
//! the cache's header; the next holder sees it and lays the zone out afresh. The counters are
//! atomics and are read and bumped without the lock.

use core::ffi::c_void;
use core::ptr::NonNull;
use std::hash::{BuildHasher, RandomState};

use nginx_sys::{
    ngx_cycle, ngx_int_t, ngx_list_part_t, ngx_log_t, ngx_pid, ngx_shm_zone_t, ngx_shmtx_lock,
    ngx_shmtx_unlock, ngx_slab_alloc_locked, ngx_slab_free_locked, ngx_slab_init, ngx_slab_pool_t,
    NGX_LOG_EMERG, NGX_LOG_NOTICE, NGX_LOG_WARN,
};
use ngx::core::Status;
use ngx::ngx_log_error;
use sni_guard_core::cache::{Arena, Cache};
use sni_guard_core::lookup::LookupUrl;
use sni_guard_core::shared::{service_id, BreakerSettings, Rate, Stats, ZoneState};

/// Smallest zone accepted: the slab pool's own pages, the shared state and some cache.
pub const MIN_SIZE: usize = 64 * 1024;

/// Largest zone accepted: the cache addresses the zone with 32-bit offsets.
pub const MAX_SIZE: usize = u32::MAX as usize;

/// What the configuration knows of a zone. Every server that uses the zone must agree on these,
/// since the state behind them is the zone's.
pub struct ZoneCtx {
    pub name: String,
    /// The lookup service whose answers the zone caches.
    pub url: Option<LookupUrl>,
    pub rate: Option<(Option<Rate>, Option<Rate>)>,
    pub breaker: Option<BreakerSettings>,
    /// The `sni_guard_lookup_trusted_certificate` of its servers, as written; empty for none.
    pub trusted_certificate: Option<Vec<u8>>,
}

impl ZoneCtx {
    pub fn new(name: &nginx_sys::ngx_str_t) -> Self {
        ZoneCtx {
            name: String::from_utf8_lossy(name.as_bytes()).into_owned(),
            url: None,
            rate: None,
            breaker: None,
            trusted_certificate: None,
        }
    }
}

/// nginx's slab allocator as the cache's [`Arena`]. Used only with the pool's mutex held.
pub struct SlabArena(NonNull<ngx_slab_pool_t>);

impl Arena for SlabArena {
    fn base(&self) -> NonNull<u8> {
        self.0.cast()
    }

    fn size(&self) -> usize {
        // SAFETY: the pool header is at the start of the zone and `end` is its end.
        unsafe { (*self.0.as_ptr()).end as usize - self.0.as_ptr() as usize }
    }

    fn alloc(&mut self, size: usize) -> Option<u32> {
        // SAFETY: the caller holds the pool's mutex.
        let p = unsafe { ngx_slab_alloc_locked(self.0.as_ptr(), size) };
        if p.is_null() {
            return None;
        }
        u32::try_from(p as usize - self.0.as_ptr() as usize).ok()
    }

    fn free(&mut self, offset: u32) {
        // SAFETY: the offset came from `alloc` on this pool, and the mutex is held.
        unsafe {
            let p = self.0.as_ptr().cast::<u8>().add(offset as usize);
            ngx_slab_free_locked(self.0.as_ptr(), p.cast());
        }
    }
}

/// The zone, locked: its shared state and its cache.
pub struct Locked<'a> {
    pub state: &'a mut ZoneState,
    pub cache: Cache<SlabArena>,
}

/// Initialises a zone: nginx calls it for a new zone, and for a zone kept across a reload with
/// `data` set to the previous configuration's context.
pub unsafe extern "C" fn init(shm_zone: *mut ngx_shm_zone_t, data: *mut c_void) -> ngx_int_t {
    // SAFETY: nginx passes the zone being initialised; its memory starts with the slab pool.
    let shm_zone = unsafe { &mut *shm_zone };
    let Some(pool) = NonNull::new(shm_zone.shm.addr.cast::<ngx_slab_pool_t>()) else {
        return Status::NGX_ERROR.into();
    };
    // SAFETY: `data` of our zones is always a `ZoneCtx`, set by `sni_guard_zone`.
    let ctx = unsafe { &*shm_zone.data.cast::<ZoneCtx>() };
    let name = ctx.name.clone();
    let service = ctx
        .url
        .as_ref()
        .map(|u| service_id(u.scheme().as_str(), u.host(), u.port(), u.path_and_query()));
    let log = shm_zone.shm.log;

    if !data.is_null() || shm_zone.shm.exists != 0 {
        // The zone survived a reload: keep it when this build understands its layout.
        if with_lock(pool, || open(pool).is_some_and(|z| !z.cache.interrupted())) {
            adopt(pool, service, &name, log);
            return Status::NGX_OK.into();
        }
        ngx_log_error!(
            NGX_LOG_NOTICE,
            log,
            "sni_guard zone \"{name}\" holds data of another version of the module, emptied"
        );
    }

    if !with_lock(pool, || relay_out(pool, &name)) {
        ngx_log_error!(NGX_LOG_EMERG, log, "sni_guard zone \"{name}\" is too small");
        return Status::NGX_ERROR.into();
    }

    if data.is_null() {
        // SAFETY: during a reload `ngx_cycle` is still the previous cycle, whose zones stay
        // mapped until the new one is complete.
        if let Some(old) = unsafe { previous_zone(shm_zone) } {
            carry_over(old, shm_zone, &name);
        }
    }

    adopt(pool, service, &name, log);
    Status::NGX_OK.into()
}

/// Records which lookup service the zone caches answers of; answers kept from another service
/// (the zone kept, or carried over, across a reload that changed `sni_guard_lookup`) are
/// dropped.
fn adopt(pool: NonNull<ngx_slab_pool_t>, service: Option<u64>, name: &str, log: *mut ngx_log_t) {
    let Some(service) = service else {
        return;
    };

    let dropped = with_lock(pool, || {
        let mut zone = open(pool)?;
        // Answers of another service are asked again: "registered" ones are used stale
        // while they are, so that customers keep working meanwhile.
        let expired = if zone.state.service != service && zone.state.service != 0 {
            // SAFETY: nginx's clock, read on the thread that loads the configuration.
            zone.cache.expire_all(unsafe { nginx_sys::ngx_current_msec } as u64)
        } else {
            0
        };
        zone.state.service = service;
        Some(expired)
    });

    if let Some(expired @ 1..) = dropped {
        ngx_log_error!(
            NGX_LOG_NOTICE,
            log,
            "sni_guard zone \"{name}\" now caches another lookup service, \
             {expired} answers to be looked up again"
        );
    }
}

/// The same zone in the configuration being replaced, if it had one of another size.
///
/// # Safety
///
/// Must be called from a zone's `init`, while nginx builds a new cycle.
unsafe fn previous_zone(zone: &ngx_shm_zone_t) -> Option<&'static ngx_shm_zone_t> {
    // SAFETY: the previous cycle and its list of zones are intact during `init`.
    let cycle = unsafe { ngx_cycle.as_ref()? };
    let mut part: *const ngx_list_part_t = &cycle.shared_memory.part;

    while let Some(p) = unsafe { part.as_ref() } {
        let zones =
            unsafe { core::slice::from_raw_parts(p.elts.cast::<ngx_shm_zone_t>(), p.nelts) };
        for old in zones {
            if old.tag == zone.tag
                && old.shm.name.as_bytes() == zone.shm.name.as_bytes()
                && old.shm.addr != zone.shm.addr
            {
                return Some(old);
            }
        }
        part = p.next;
    }

    None
}

/// Copies the answers of a zone being replaced by one of another size, most recently used
/// last so that they keep their order.
fn carry_over(old: &ngx_shm_zone_t, new: &ngx_shm_zone_t, name: &str) {
    let mut entries = Vec::new();
    let Some(old_pool) = NonNull::new(old.shm.addr.cast::<ngx_slab_pool_t>()) else {
        return;
    };

    let mut kept_state = None;
    with_lock(old_pool, || {
        if let Some(zone) = open(old_pool).filter(|z| !z.cache.interrupted()) {
            zone.cache.for_each(|name, found| entries.push((name.to_vec(), found)));
            kept_state = Some((
                zone.state.service,
                zone.state.budget,
                zone.state.breaker,
                zone.cache.evictions(),
            ));
        }
    });

    let total = entries.len();
    let Some(new_pool) = NonNull::new(new.shm.addr.cast::<ngx_slab_pool_t>()) else {
        return;
    };

    let kept = with_lock(new_pool, || {
        let Some(mut zone) = open(new_pool) else {
            return 0;
        };
        if let Some((service, budget, breaker, evictions)) = kept_state {
            zone.state.service = service;
            zone.state.budget = budget;
            zone.state.breaker = breaker;
            zone.cache.add_evictions(evictions);
        }
        // A smaller zone may evict some of the entries copied before: those count as evicted.
        for (name, f) in entries.iter().rev() {
            let _ = zone.cache.put(name, f.state, f.expires, f.keep, 0);
        }
        zone.cache.len()
    });

    // The counters go on from where they were.
    if let (Some(old_stats), Some(new_stats)) = (stats(old), stats(new)) {
        new_stats.add(old_stats);
    }

    ngx_log_error!(
        NGX_LOG_NOTICE,
        new.shm.log,
        "sni_guard zone \"{name}\" resized from {} to {} bytes, {kept} of {total} entries kept",
        old.shm.size,
        new.shm.size
    );
}

/// Runs `f` on a zone, locked.
///
/// A zone left half-changed by a worker that died holding the lock is emptied first, and the
/// event logged on `log`. Returns `None` when the zone cannot even be laid out again.
pub fn with_zone<R>(
    shm_zone: &ngx_shm_zone_t,
    log: *mut ngx_log_t,
    f: impl FnOnce(&mut Locked<'_>) -> R,
) -> Option<R> {
    let pool = NonNull::new(shm_zone.shm.addr.cast::<ngx_slab_pool_t>())?;

    with_lock(pool, || {
        if open(pool).is_none_or(|z| z.cache.interrupted()) {
            let name = String::from_utf8_lossy(shm_zone.shm.name.as_bytes()).into_owned();
            ngx_log_error!(
                NGX_LOG_WARN,
                log,
                "sni_guard zone \"{name}\" was left inconsistent by a worker that exited while \
                 changing it, emptied"
            );
            if !relay_out(pool, &name) {
                return None;
            }
        }

        let mut zone = open(pool)?;

        // SAFETY: `ngx_pid` is set once at process start.
        zone.cache.begin(unsafe { ngx_pid } as u32);
        let result = f(&mut zone);
        // Not reached if `f` panics: the mark stays and the next holder starts afresh.
        zone.cache.end();

        Some(result)
    })
}

/// The counters of a zone, for bumping without the lock.
pub fn stats(shm_zone: &ngx_shm_zone_t) -> Option<&Stats> {
    let pool = NonNull::new(shm_zone.shm.addr.cast::<ngx_slab_pool_t>())?;
    // SAFETY: `data` is set once the zone is laid out and points into the zone, which stays
    // mapped for the life of the process. A zone laid out afresh after a crash moves its
    // counters; a worker that read the old pointer bumps a stale copy once, which is harmless.
    let state = unsafe { state_ptr(pool)?.as_ref() };
    state.is_understood().then_some(&state.stats)
}

/// Opens the state and cache of a locked pool, when this build understands their layout.
fn open<'a>(pool: NonNull<ngx_slab_pool_t>) -> Option<Locked<'a>> {
    // SAFETY: the caller holds the mutex; `state_ptr` checks the pointer is inside the zone.
    let state = unsafe { state_ptr(pool)?.as_mut() };
    if !state.is_understood() {
        return None;
    }

    // SAFETY: the mutex is held; `open` checks the header it finds at the offset.
    let cache = unsafe { Cache::open(SlabArena(pool), state.cache) }?;

    Some(Locked { state, cache })
}

/// Where the zone's state is, when `data` points inside the zone at enough room for it.
///
/// # Safety
///
/// `pool` must be the start of a mapped zone.
unsafe fn state_ptr(pool: NonNull<ngx_slab_pool_t>) -> Option<NonNull<ZoneState>> {
    let (start, end) = unsafe { (pool.as_ptr() as usize, (*pool.as_ptr()).end as usize) };
    let data = unsafe { (*pool.as_ptr()).data } as usize;

    let inside = data > start
        && data % core::mem::align_of::<ZoneState>() == 0
        && data.checked_add(core::mem::size_of::<ZoneState>()).is_some_and(|e| e <= end);

    inside.then(|| NonNull::new(data as *mut ZoneState)).flatten()
}

/// Empties the pool and lays a fresh zone out in it. The pool's mutex must be held.
fn relay_out(pool: NonNull<ngx_slab_pool_t>, name: &str) -> bool {
    let p = pool.as_ptr();

    // SAFETY: the mutex is held, so nobody else uses the pool; re-initialisation does not touch
    // the pool's mutex or lock word.
    unsafe {
        ngx_slab_init(p);
        // Allocation failures are reported by the module, once in a while, not by the slab.
        (*p).set_log_nomem(0);
        (*p).data = core::ptr::null_mut();

        let ctx = format!(" in sni_guard zone \"{name}\"\0");
        let buf = ngx_slab_alloc_locked(p, ctx.len()).cast::<u8>();
        if !buf.is_null() {
            core::ptr::copy_nonoverlapping(ctx.as_ptr(), buf, ctx.len());
            (*p).log_ctx = buf;
        }
    }

    let mut arena = SlabArena(pool);

    let Some(state) = arena.alloc(core::mem::size_of::<ZoneState>()) else {
        return false;
    };

    let seed = || [RandomState::new().hash_one(1u8), RandomState::new().hash_one(2u8)];
    let Some(cache) = Cache::create(SlabArena(pool), seed()).map(|c| c.offset()) else {
        return false;
    };

    // SAFETY: `state` was allocated with room for a ZoneState; the slab aligns it to at least
    // 8 bytes, all ZoneState needs.
    unsafe {
        let state = p.cast::<u8>().add(state as usize).cast::<ZoneState>();
        state.write(ZoneState::new(cache, seed()));
        (*p).data = state.cast();
    }

    true
}

/// Runs `f` holding the pool's mutex; a panic in `f` releases it on the way out.
fn with_lock<R>(pool: NonNull<ngx_slab_pool_t>, f: impl FnOnce() -> R) -> R {
    struct Unlock(NonNull<ngx_slab_pool_t>);

    impl Drop for Unlock {
        fn drop(&mut self) {
            // SAFETY: the mutex was taken below by this process.
            unsafe { ngx_shmtx_unlock(&mut (*self.0.as_ptr()).mutex) };
        }
    }

    // SAFETY: the pool's mutex was created by nginx with the zone.
    unsafe { ngx_shmtx_lock(&mut (*pool.as_ptr()).mutex) };
    let _unlock = Unlock(pool);
    f()
}
