//! The shared memory zone that holds the cache, and its lock.
//!
//! The zone is an nginx slab pool. The cache is laid out in it by `sni_guard_core::cache`, which
//! stores offsets, not pointers, and a versioned header; `shpool->data` points at that header.
//!
//! Every use of the cache holds the pool's own mutex (`ngx_shmtx_t`), which the master process
//! releases when a worker dies holding it. A worker that dies in the middle of a change leaves a
//! mark in the header; the next holder sees it and lays the cache out afresh.

use core::ffi::c_void;
use core::ptr::NonNull;
use std::hash::{BuildHasher, RandomState};

use nginx_sys::{
    ngx_int_t, ngx_log_t, ngx_pid, ngx_shm_zone_t, ngx_shmtx_lock, ngx_shmtx_unlock,
    ngx_slab_alloc_locked, ngx_slab_free_locked, ngx_slab_init, ngx_slab_pool_t, NGX_LOG_NOTICE,
    NGX_LOG_WARN,
};
use ngx::core::Status;
use ngx::ngx_log_error;
use sni_guard_core::cache::{Arena, Cache};
use sni_guard_core::lookup::LookupUrl;

/// Smallest zone accepted: the slab pool needs a few pages for itself.
pub const MIN_SIZE: usize = 8 * 4096;

/// Largest zone accepted: the cache addresses the zone with 32-bit offsets.
pub const MAX_SIZE: usize = u32::MAX as usize;

/// What the configuration knows of a zone.
pub struct ZoneCtx {
    pub name: String,
    /// The lookup service whose answers the zone caches; one per zone.
    pub url: Option<LookupUrl>,
}

impl ZoneCtx {
    pub fn new(name: &nginx_sys::ngx_str_t) -> Self {
        ZoneCtx { name: String::from_utf8_lossy(name.as_bytes()).into_owned(), url: None }
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

/// Initialises a zone: nginx calls it for a new zone, and for a zone kept across a reload with
/// `data` set to the previous configuration's context.
pub unsafe extern "C" fn init(shm_zone: *mut ngx_shm_zone_t, data: *mut c_void) -> ngx_int_t {
    // SAFETY: nginx passes the zone being initialised; its memory starts with the slab pool.
    let shm_zone = unsafe { &mut *shm_zone };
    let pool = shm_zone.shm.addr.cast::<ngx_slab_pool_t>();
    let Some(pool) = NonNull::new(pool) else {
        return Status::NGX_ERROR.into();
    };
    // SAFETY: `data` of our zones is always a `ZoneCtx`, set by `sni_guard_zone`.
    let ctx = unsafe { &*shm_zone.data.cast::<ZoneCtx>() };
    let log = shm_zone.shm.log;

    if !data.is_null() || shm_zone.shm.exists != 0 {
        // The zone survived a reload: keep the cache when this build understands its layout.
        let kept = with_lock(pool, || {
            let mut arena = SlabArena(pool);
            // SAFETY: the mutex is held; `data` points at the header or is foreign.
            unsafe { Cache::open(&mut arena, header_offset(pool)) }
                .is_some_and(|cache| !cache.interrupted())
        });

        if kept {
            return Status::NGX_OK.into();
        }

        ngx_log_error!(
            NGX_LOG_NOTICE,
            log,
            "sni_guard zone \"{}\" holds data of another version of the module, emptied",
            ctx.name
        );
    }

    let laid_out = with_lock(pool, || relay_out(pool, &ctx.name));
    if laid_out {
        Status::NGX_OK.into()
    } else {
        ngx_log_error!(
            nginx_sys::NGX_LOG_EMERG,
            log,
            "sni_guard zone \"{}\" is too small for its cache",
            ctx.name
        );
        Status::NGX_ERROR.into()
    }
}

/// Runs `f` on the cache of a zone, with the zone locked.
///
/// A cache left half-changed by a worker that died holding the lock is emptied first, and the
/// event logged on `log`.
pub fn with_cache<R>(
    shm_zone: &ngx_shm_zone_t,
    log: *mut ngx_log_t,
    f: impl FnOnce(&mut Cache<'_, SlabArena>) -> R,
) -> Option<R> {
    let pool = NonNull::new(shm_zone.shm.addr.cast::<ngx_slab_pool_t>())?;

    with_lock(pool, || {
        let mut arena = SlabArena(pool);

        // SAFETY: the mutex is held; the header offset was set by `lay_out`.
        let sound = unsafe { Cache::open(&mut arena, header_offset(pool)) }
            .is_some_and(|cache| !cache.interrupted());

        if !sound {
            ngx_log_error!(
                NGX_LOG_WARN,
                log,
                "sni_guard zone \"{}\" was left inconsistent by a worker that exited while \
                 changing it, emptied",
                String::from_utf8_lossy(shm_zone.shm.name.as_bytes())
            );
            let name = String::from_utf8_lossy(shm_zone.shm.name.as_bytes()).into_owned();
            if !relay_out(pool, &name) {
                return None;
            }
        }

        // SAFETY: the layout was checked or made just now, under the mutex.
        let mut cache = unsafe { Cache::open(&mut arena, header_offset(pool)) }?;

        // SAFETY: `ngx_pid` is set once at process start.
        cache.begin(unsafe { ngx_pid } as u32);
        let result = f(&mut cache);
        // Not reached if `f` panics: the mark stays and the next holder starts afresh.
        cache.end();

        Some(result)
    })
}

/// Empties the pool and lays a fresh cache out in it. The pool's mutex must be held.
fn relay_out(pool: NonNull<ngx_slab_pool_t>, name: &str) -> bool {
    // SAFETY: the mutex is held, so nobody else uses the pool; the slab's own mutex and lock
    // word are not touched by re-initialisation.
    unsafe { ngx_slab_init(pool.as_ptr()) };
    lay_out(pool, name)
}

/// Lays a fresh cache out in an empty pool. The pool's mutex must be held.
fn lay_out(pool: NonNull<ngx_slab_pool_t>, name: &str) -> bool {
    let mut arena = SlabArena(pool);

    // SAFETY: the mutex is held. The log context tells slab messages which zone they are
    // about; we report allocation failures ourselves, so the slab's own reports are off.
    unsafe {
        let p = pool.as_ptr();
        (*p).set_log_nomem(0);
        let ctx = format!(" in sni_guard zone \"{name}\"\0");
        let buf = ngx_slab_alloc_locked(p, ctx.len()).cast::<u8>();
        if !buf.is_null() {
            core::ptr::copy_nonoverlapping(ctx.as_ptr(), buf, ctx.len());
            (*p).log_ctx = buf;
        }
    }

    let seed = [RandomState::new().hash_one(1u8), RandomState::new().hash_one(2u8)];
    let Some(cache) = Cache::create(&mut arena, seed) else {
        return false;
    };
    let offset = cache.offset();

    // SAFETY: the header lies inside the pool at `offset`.
    unsafe { (*pool.as_ptr()).data = pool.as_ptr().cast::<u8>().add(offset as usize).cast() };
    true
}

/// Where the cache's header is, as an offset from the pool: 0 when none was laid out.
///
/// # Safety
///
/// The pool's mutex must be held.
unsafe fn header_offset(pool: NonNull<ngx_slab_pool_t>) -> u32 {
    let data = unsafe { (*pool.as_ptr()).data } as usize;
    let base = pool.as_ptr() as usize;
    if data <= base {
        return 0;
    }
    u32::try_from(data - base).unwrap_or(0)
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
