//! The answer cache: a hash table of names with a least-recently-used list, laid out in one
//! region of memory that every nginx worker maps at the same address.
//!
//! Everything stored in the region is plain data: offsets from the start of the region instead of
//! pointers, no function pointers, and a header with a magic number and a layout version. A
//! worker built from another version of this code refuses a region it does not understand
//! instead of misreading it (see [`Cache::open`]).
//!
//! The cache does not lock. The caller holds the zone's mutex around every use and records in
//! the header that a change is under way ([`Cache::begin`], [`Cache::end`]), so that a worker
//! killed in the middle of a change is noticed by the next one to take the lock
//! ([`Cache::interrupted`]), which then lays the cache out afresh: losing a cache is cheap,
//! following a half-updated list is not.
//!
//! Memory comes from an [`Arena`]: nginx's slab allocator in the module, [`HeapArena`] in tests.
//! When the arena is full, [`Cache::put`] evicts entries from the cold end of the list until the
//! new one fits or a bounded number of evictions did not help.

use core::mem::{align_of, size_of};
use core::ptr::NonNull;

/// Identifies a region laid out by this module ("sniguard" in ASCII).
const MAGIC: u64 = u64::from_le_bytes(*b"sniguard");

/// Bumped whenever [`Header`] or [`Entry`] changes shape.
const LAYOUT: u32 = 1;

/// Entries looked at for expiry at the cold end of the list on each insertion.
const EXPIRE_PER_PUT: usize = 2;

/// Evictions tried to make room for one insertion before giving up on caching it.
const MAX_EVICTIONS_PER_PUT: usize = 64;

/// Entries looked at, from the cold end, for one to evict before a registered one.
const VICTIM_SCAN: usize = 32;

/// Expected bytes per entry, used to size the bucket array; a 20-byte name takes one 64-byte
/// slab chunk.
const BYTES_PER_ENTRY_ESTIMATE: usize = 64;

/// Where the memory of a cache comes from.
///
/// Offsets are relative to [`Arena::base`]; offset 0 is never a valid allocation (the arena's own
/// bookkeeping lives there), which lets the cache use 0 as "none".
pub trait Arena {
    /// The start of the region.
    fn base(&self) -> NonNull<u8>;

    /// Total size of the region in bytes.
    fn size(&self) -> usize;

    /// Allocates `size` bytes aligned to at least 8, or returns `None` when the region is full.
    fn alloc(&mut self, size: usize) -> Option<u32>;

    /// Frees an allocation made by [`Arena::alloc`].
    fn free(&mut self, offset: u32);
}

/// What the lookup service said about a name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum State {
    Registered = 1,
    NotRegistered = 2,
}

/// A cached answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Found {
    pub state: State,
    /// When the answer stops being fresh, in milliseconds of the caller's monotonic clock.
    pub expires: u64,
    /// How long after `expires` the entry is kept (for stale answers); it is dropped after that.
    pub keep: u32,
    /// When a refresh of this entry was started (the low 32 bits of the clock), or 0.
    pub busy: u32,
}

/// The cache could not store an entry: the region is full even after evictions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Full;

impl core::fmt::Display for Full {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("no memory in the cache zone")
    }
}

#[repr(C)]
struct Header {
    magic: u64,
    layout: u32,
    /// Pid of the process in the middle of a change, 0 when the structure is consistent.
    writer: u32,
    /// Keys of the name hash; random per zone, so that names colliding in one bucket cannot be
    /// computed in advance.
    key: [u64; 2],
    nbuckets: u32,
    buckets: u32,
    /// Most recently used entry.
    head: u32,
    /// Least recently used entry.
    tail: u32,
    entries: u32,
    _reserved: u32,
    evictions: u64,
    failures: u64,
}

#[repr(C)]
struct Entry {
    /// Next entry in the same bucket.
    chain: u32,
    /// Neighbours in the recency list, towards the head and towards the tail.
    newer: u32,
    older: u32,
    busy: u32,
    expires: u64,
    keep: u32,
    state: u8,
    len: u8,
    _pad: [u8; 2],
    // the name's bytes follow
}

const ENTRY_SIZE: usize = size_of::<Entry>();

/// An arena borrowed for a while is an arena too.
impl<A: Arena + ?Sized> Arena for &mut A {
    fn base(&self) -> NonNull<u8> {
        (**self).base()
    }

    fn size(&self) -> usize {
        (**self).size()
    }

    fn alloc(&mut self, size: usize) -> Option<u32> {
        (**self).alloc(size)
    }

    fn free(&mut self, offset: u32) {
        (**self).free(offset)
    }
}

/// A cache laid out in an arena. Every method expects the caller to hold the region's lock.
pub struct Cache<A: Arena> {
    arena: A,
    hdr: u32,
}

impl<A: Arena> Cache<A> {
    /// Lays out an empty cache in `arena` and returns it; `seed` keys the name hash.
    ///
    /// Returns `None` when the arena cannot hold even the header and the bucket array.
    pub fn create(mut arena: A, seed: [u64; 2]) -> Option<Self> {
        let expected = (arena.size() / BYTES_PER_ENTRY_ESTIMATE).max(16);
        let nbuckets = expected.checked_next_power_of_two()?.min(1 << 24) as u32;

        let hdr = arena.alloc(size_of::<Header>())?;
        let Some(buckets) = arena.alloc(nbuckets as usize * size_of::<u32>()) else {
            arena.free(hdr);
            return None;
        };

        let cache = Cache { arena, hdr };

        // SAFETY: both offsets were just allocated with the sizes written here.
        unsafe {
            cache.header_ptr().write(Header {
                magic: MAGIC,
                layout: LAYOUT,
                writer: 0,
                key: seed,
                nbuckets,
                buckets,
                head: 0,
                tail: 0,
                entries: 0,
                _reserved: 0,
                evictions: 0,
                failures: 0,
            });
            cache.at::<u32>(buckets).write_bytes(0, nbuckets as usize);
        }

        Some(cache)
    }

    /// Opens the cache whose header is at `offset`, as laid out by [`Cache::create`] in this or
    /// an earlier process.
    ///
    /// Returns `None` when the header is not one this build understands: another program's data,
    /// or a layout of another version of this module.
    ///
    /// # Safety
    ///
    /// `offset` must be 0 or the offset of at least `size_of::<Header>()` readable bytes in the
    /// arena, and nothing else may use the region while the returned value lives.
    pub unsafe fn open(arena: A, offset: u32) -> Option<Self> {
        if offset == 0 || offset as usize + size_of::<Header>() > arena.size() {
            return None;
        }

        let cache = Cache { arena, hdr: offset };
        let h = cache.header();

        let valid = h.magic == MAGIC
            && h.layout == LAYOUT
            && h.nbuckets.is_power_of_two()
            && h.buckets as usize + h.nbuckets as usize * size_of::<u32>() <= cache.arena.size();

        valid.then_some(cache)
    }

    /// The offset of the header, to find the cache again with [`Cache::open`].
    pub fn offset(&self) -> u32 {
        self.hdr
    }

    /// Whether a process was killed in the middle of a change, leaving the structure in an
    /// unknown state. The caller then lays the cache out afresh.
    pub fn interrupted(&self) -> bool {
        self.header().writer != 0
    }

    /// Records that `pid` is changing the cache. Call right after taking the lock.
    pub fn begin(&mut self, pid: u32) {
        self.header_mut().writer = pid.max(1);
    }

    /// Records that the structure is consistent again. Call right before releasing the lock.
    pub fn end(&mut self) {
        self.header_mut().writer = 0;
    }

    /// Number of cached names.
    pub fn len(&self) -> usize {
        self.header().entries as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Entries evicted to make room, in this cache and in those it replaced.
    pub fn evictions(&self) -> u64 {
        self.header().evictions
    }

    /// Adds the evictions of the cache this one replaces, so that the count goes on.
    pub fn add_evictions(&mut self, n: u64) {
        self.header_mut().evictions += n;
    }

    /// Insertions that failed for lack of memory since the cache was laid out.
    pub fn failures(&self) -> u64 {
        self.header().failures
    }

    /// Looks a name up and marks it most recently used.
    pub fn get(&mut self, name: &[u8]) -> Option<Found> {
        let entry = self.find(name)?;
        self.touch(entry);
        Some(self.found(entry))
    }

    /// Looks a name up without changing the recency order.
    pub fn peek(&self, name: &[u8]) -> Option<Found> {
        self.find(name).map(|entry| self.found(entry))
    }

    /// Stores an answer for a name, replacing any earlier one, as the most recently used entry.
    ///
    /// `now` is the caller's clock; entries whose `expires + keep` has passed are dropped along
    /// the way. When memory runs out, the least recently used entries give way; [`Full`] means
    /// even that did not make room, and nothing was stored.
    pub fn put(
        &mut self,
        name: &[u8],
        state: State,
        expires: u64,
        keep: u32,
        now: u64,
    ) -> Result<(), Full> {
        if name.is_empty() || name.len() > u8::MAX as usize {
            return Err(Full);
        }

        if let Some(entry) = self.find(name) {
            // SAFETY: `find` returns offsets of live entries.
            let e = unsafe { &mut *self.at::<Entry>(entry) };
            e.state = state as u8;
            e.expires = expires;
            e.keep = keep;
            e.busy = 0;
            self.touch(entry);
            return Ok(());
        }

        self.expire(now, EXPIRE_PER_PUT);

        let size = ENTRY_SIZE + name.len();
        let mut entry = self.arena.alloc(size);
        let mut evicted = 0;

        while entry.is_none() && evicted < MAX_EVICTIONS_PER_PUT {
            let victim = self.victim(now);
            if victim == 0 {
                break;
            }
            self.unlink(victim);
            self.header_mut().evictions += 1;
            evicted += 1;
            entry = self.arena.alloc(size);
        }

        let Some(entry) = entry else {
            self.header_mut().failures += 1;
            return Err(Full);
        };

        let bucket = self.bucket_of(name);

        // SAFETY: `entry` was just allocated with room for the header and the name; `bucket`
        // is inside the bucket array.
        unsafe {
            let b = self.at::<u32>(bucket);
            self.at::<Entry>(entry).write(Entry {
                chain: *b,
                newer: 0,
                older: 0,
                busy: 0,
                expires,
                keep,
                state: state as u8,
                len: name.len() as u8,
                _pad: [0; 2],
            });
            let bytes = self.at::<u8>(entry + ENTRY_SIZE as u32);
            core::ptr::copy_nonoverlapping(name.as_ptr(), bytes, name.len());
            *b = entry;
        }

        self.push_front(entry);
        self.header_mut().entries += 1;

        Ok(())
    }

    /// The entry to give way for a new one: among the least recently used few, one whose time
    /// is over or that says "not registered", else the least recently used. A flood of invented
    /// names fills the cache with "not registered"; they go before the names it protects.
    fn victim(&self, now: u64) -> u32 {
        let mut entry = self.header().tail;
        let mut looked = 0;

        while entry != 0 && looked < VICTIM_SCAN {
            // SAFETY: the list links only live entries.
            let e = unsafe { &*self.at::<Entry>(entry) };
            if e.state == State::NotRegistered as u8
                || e.expires.saturating_add(e.keep as u64) <= now
            {
                return entry;
            }
            entry = e.newer;
            looked += 1;
        }

        self.header().tail
    }

    /// Marks a cached name as being refreshed since `since` (the low 32 bits of the clock; 0 is
    /// taken as 1). Returns false when the name is not cached.
    pub fn set_busy(&mut self, name: &[u8], since: u32) -> bool {
        let Some(entry) = self.find(name) else {
            return false;
        };
        // SAFETY: `find` returns offsets of live entries.
        unsafe { (*self.at::<Entry>(entry)).busy = since.max(1) };
        true
    }

    /// Removes a name. Returns whether it was cached.
    pub fn remove(&mut self, name: &[u8]) -> bool {
        match self.find(name) {
            Some(entry) => {
                self.unlink(entry);
                true
            }
            None => false,
        }
    }

    /// Makes every answer expire at `now`, as if its time were up: "registered" answers become
    /// stale (used while refreshed, for their `keep` time), the others are looked up again.
    /// Returns how many answers were still fresh.
    pub fn expire_all(&mut self, now: u64) -> usize {
        let mut expired = 0;
        let mut entry = self.header().head;
        while entry != 0 {
            // SAFETY: the list links only live entries.
            let e = unsafe { &mut *self.at::<Entry>(entry) };
            if e.expires > now {
                e.expires = now;
                expired += 1;
            }
            entry = e.older;
        }
        expired
    }

    /// Removes every name.
    pub fn clear(&mut self) {
        while self.header().tail != 0 {
            self.unlink(self.header().tail);
        }
    }

    /// Drops up to `max` entries whose time, `expires + keep`, has passed, from the cold end.
    pub fn expire(&mut self, now: u64, max: usize) -> usize {
        let mut dropped = 0;

        while dropped < max {
            let tail = self.header().tail;
            if tail == 0 {
                break;
            }

            // SAFETY: the tail is a live entry.
            let e = unsafe { &*self.at::<Entry>(tail) };
            if e.expires.saturating_add(e.keep as u64) > now {
                break;
            }

            self.unlink(tail);
            dropped += 1;
        }

        dropped
    }

    /// Visits every cached name, most recently used first.
    pub fn for_each(&self, mut f: impl FnMut(&[u8], Found)) {
        let mut entry = self.header().head;
        while entry != 0 {
            f(self.name_of(entry), self.found(entry));
            // SAFETY: the list links only live entries.
            entry = unsafe { (*self.at::<Entry>(entry)).older };
        }
    }

    fn find(&self, name: &[u8]) -> Option<u32> {
        // SAFETY: `bucket_of` stays inside the bucket array.
        let mut entry = unsafe { *self.at::<u32>(self.bucket_of(name)) };

        while entry != 0 {
            if self.name_of(entry) == name {
                return Some(entry);
            }
            // SAFETY: chains link only live entries.
            entry = unsafe { (*self.at::<Entry>(entry)).chain };
        }

        None
    }

    /// Unlinks an entry from its bucket and from the recency list, and frees it.
    fn unlink(&mut self, entry: u32) {
        let name = self.name_of(entry);
        let bucket = self.bucket_of(name);

        // SAFETY: `entry` is live, so it is on the chain of its bucket and on the list.
        unsafe {
            let e = &*self.at::<Entry>(entry);
            let (chain, newer, older) = (e.chain, e.newer, e.older);

            let mut link = self.at::<u32>(bucket);
            while *link != entry && *link != 0 {
                link = core::ptr::addr_of_mut!((*self.at::<Entry>(*link)).chain);
            }
            if *link == entry {
                *link = chain;
            }

            self.link_older(newer, older);
        }

        self.arena.free(entry);
        let h = self.header_mut();
        h.entries = h.entries.saturating_sub(1);
    }

    /// Makes `entry` the most recently used.
    fn touch(&mut self, entry: u32) {
        if self.header().head == entry {
            return;
        }
        // SAFETY: `entry` is live.
        let (newer, older) = unsafe {
            let e = &*self.at::<Entry>(entry);
            (e.newer, e.older)
        };
        self.link_older(newer, older);
        self.push_front(entry);
    }

    /// Joins the neighbours of an entry being taken off the list.
    fn link_older(&mut self, newer: u32, older: u32) {
        // SAFETY: `newer` and `older` are 0 or live entries.
        unsafe {
            if newer == 0 {
                self.header_mut().head = older;
            } else {
                (*self.at::<Entry>(newer)).older = older;
            }
            if older == 0 {
                self.header_mut().tail = newer;
            } else {
                (*self.at::<Entry>(older)).newer = newer;
            }
        }
    }

    fn push_front(&mut self, entry: u32) {
        let head = self.header().head;
        // SAFETY: `entry` and `head` (when not 0) are live entries.
        unsafe {
            let e = &mut *self.at::<Entry>(entry);
            e.newer = 0;
            e.older = head;
            if head != 0 {
                (*self.at::<Entry>(head)).newer = entry;
            }
        }
        let h = self.header_mut();
        h.head = entry;
        if h.tail == 0 {
            h.tail = entry;
        }
    }

    fn found(&self, entry: u32) -> Found {
        // SAFETY: `entry` is live.
        let e = unsafe { &*self.at::<Entry>(entry) };
        let state = if e.state == State::Registered as u8 {
            State::Registered
        } else {
            State::NotRegistered
        };
        Found { state, expires: e.expires, keep: e.keep, busy: e.busy }
    }

    fn name_of(&self, entry: u32) -> &[u8] {
        // SAFETY: a live entry is followed by `len` bytes of its name.
        unsafe {
            let len = (*self.at::<Entry>(entry)).len as usize;
            core::slice::from_raw_parts(self.at::<u8>(entry + ENTRY_SIZE as u32), len)
        }
    }

    fn bucket_of(&self, name: &[u8]) -> u32 {
        let h = self.header();
        let index = siphash13(h.key, name) as u32 & (h.nbuckets - 1);
        h.buckets + index * size_of::<u32>() as u32
    }

    fn header(&self) -> &Header {
        // SAFETY: `hdr` points at a header, checked by `create` or `open`.
        unsafe { &*self.header_ptr() }
    }

    fn header_mut(&mut self) -> &mut Header {
        // SAFETY: as in `header`, and `self` is borrowed mutably.
        unsafe { &mut *self.header_ptr() }
    }

    fn header_ptr(&self) -> *mut Header {
        self.at::<Header>(self.hdr)
    }

    fn at<T>(&self, offset: u32) -> *mut T {
        debug_assert!(offset as usize + size_of::<T>() <= self.arena.size());
        debug_assert!(offset as usize % align_of::<T>() == 0);
        // SAFETY: offsets handed to `at` come from the arena and stay inside the region.
        unsafe { self.arena.base().as_ptr().add(offset as usize).cast() }
    }
}

/// SipHash-1-3 of `data` under `key`: a keyed hash, so that an attacker who does not know the
/// key cannot pick names that all land in one bucket.
pub fn siphash13(key: [u64; 2], data: &[u8]) -> u64 {
    siphash::<1, 3>(key, data)
}

fn siphash<const C: usize, const D: usize>(key: [u64; 2], data: &[u8]) -> u64 {
    let mut v = [
        key[0] ^ 0x736f_6d65_7073_6575,
        key[1] ^ 0x646f_7261_6e64_6f6d,
        key[0] ^ 0x6c79_6765_6e65_7261,
        key[1] ^ 0x7465_6462_7974_6573,
    ];

    fn round(v: &mut [u64; 4]) {
        v[0] = v[0].wrapping_add(v[1]);
        v[1] = v[1].rotate_left(13) ^ v[0];
        v[0] = v[0].rotate_left(32);
        v[2] = v[2].wrapping_add(v[3]);
        v[3] = v[3].rotate_left(16) ^ v[2];
        v[0] = v[0].wrapping_add(v[3]);
        v[3] = v[3].rotate_left(21) ^ v[0];
        v[2] = v[2].wrapping_add(v[1]);
        v[1] = v[1].rotate_left(17) ^ v[2];
        v[2] = v[2].rotate_left(32);
    }

    let mut chunks = data.chunks_exact(8);
    for chunk in &mut chunks {
        let m = u64::from_le_bytes(chunk.try_into().unwrap_or([0; 8]));
        v[3] ^= m;
        for _ in 0..C {
            round(&mut v);
        }
        v[0] ^= m;
    }

    let mut last = [0u8; 8];
    last[..chunks.remainder().len()].copy_from_slice(chunks.remainder());
    let m = u64::from_le_bytes(last) | ((data.len() as u64 & 0xff) << 56);
    v[3] ^= m;
    for _ in 0..C {
        round(&mut v);
    }
    v[0] ^= m;

    v[2] ^= 0xff;
    for _ in 0..D {
        round(&mut v);
    }

    v[0] ^ v[1] ^ v[2] ^ v[3]
}

/// An [`Arena`] on the heap with a fixed capacity, for tests, fuzzing and benchmarks.
///
/// It hands out power-of-two chunks from 16 bytes up, as nginx's slab allocator does, keeps a
/// free list per size, and never returns offset 0.
pub struct HeapArena {
    memory: Vec<u64>,
    next: usize,
    free: Vec<Vec<u32>>,
    live: std::collections::HashMap<u32, u32>,
    used: usize,
}

impl HeapArena {
    /// An arena of `size` bytes (rounded up to 8).
    pub fn new(size: usize) -> Self {
        HeapArena {
            memory: vec![0; size.div_ceil(8)],
            next: 16,
            free: vec![Vec::new(); usize::BITS as usize],
            live: std::collections::HashMap::new(),
            used: 0,
        }
    }

    /// Bytes currently handed out, counted in whole chunks.
    pub fn used(&self) -> usize {
        self.used
    }
}

impl Arena for HeapArena {
    fn base(&self) -> NonNull<u8> {
        NonNull::new(self.memory.as_ptr().cast_mut().cast()).unwrap_or(NonNull::dangling())
    }

    fn size(&self) -> usize {
        self.memory.len() * 8
    }

    fn alloc(&mut self, size: usize) -> Option<u32> {
        let chunk = size.max(16).checked_next_power_of_two()?;
        let class = chunk.trailing_zeros();

        let offset = match self.free[class as usize].pop() {
            Some(offset) => offset,
            None => {
                if self.next + chunk > self.size() {
                    return None;
                }
                let offset = u32::try_from(self.next).ok()?;
                self.next += chunk;
                offset
            }
        };

        self.live.insert(offset, class);
        self.used += chunk;
        Some(offset)
    }

    fn free(&mut self, offset: u32) {
        let class = self.live.remove(&offset).expect("free of an offset never allocated");
        self.used -= 1 << class;
        self.free[class as usize].push(offset);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    const SEED: [u64; 2] = [0x0123_4567_89ab_cdef, 0xfedc_ba98_7654_3210];

    /// Walks the structure both ways and through the buckets and checks that it hangs together.
    fn check<A: Arena>(cache: &Cache<A>) -> Vec<Vec<u8>> {
        let mut names = Vec::new();
        cache.for_each(|name, _| names.push(name.to_vec()));
        assert_eq!(names.len(), cache.len(), "list length and entry count differ");

        let mut back = Vec::new();
        let mut entry = cache.header().tail;
        while entry != 0 {
            back.push(cache.name_of(entry).to_vec());
            entry = unsafe { (*cache.at::<Entry>(entry)).newer };
        }
        back.reverse();
        assert_eq!(names, back, "list differs walked from either end");

        for name in &names {
            assert!(cache.peek(name).is_some(), "{name:?} on the list but not in its bucket");
        }
        names
    }

    fn put(cache: &mut Cache<&mut HeapArena>, name: &str, state: State, expires: u64) {
        cache.put(name.as_bytes(), state, expires, 0, 0).expect("room for the entry");
    }

    /// The round structure is shared with SipHash-2-4, which std still ships: same code with
    /// two and four rounds must agree with it on every length around the 8-byte block edges.
    #[test]
    #[allow(deprecated)]
    fn siphash_matches_std_siphash24() {
        use std::hash::Hasher;

        let key = [0x0706_0504_0302_0100, 0x0f0e_0d0c_0b0a_0908];
        let data: Vec<u8> = (0..=64).collect();
        for len in 0..data.len() {
            let mut std = std::hash::SipHasher::new_with_keys(key[0], key[1]);
            std.write(&data[..len]);
            assert_eq!(siphash::<2, 4>(key, &data[..len]), std.finish(), "length {len}");
        }
        assert_ne!(siphash13(key, b"a"), siphash13([0, 0], b"a"), "the key changes the hash");
    }

    #[test]
    fn answers_are_stored_and_replaced() {
        let mut arena = HeapArena::new(64 * 1024);
        let mut cache = Cache::create(&mut arena, SEED).unwrap();

        let cases: [(&str, State, u64); 4] = [
            ("example.com", State::Registered, 100),
            ("nope.example", State::NotRegistered, 200),
            ("example.com", State::NotRegistered, 300),
            ("a", State::Registered, 400),
        ];
        for (name, state, expires) in cases {
            put(&mut cache, name, state, expires);
            let found = cache.get(name.as_bytes()).unwrap();
            assert_eq!((found.state, found.expires), (state, expires), "{name}");
        }

        assert_eq!(cache.len(), 3);
        assert_eq!(cache.get(b"example.co"), None);
        assert_eq!(cache.get(b"example.comx"), None);
        check(&cache);
    }

    #[test]
    fn get_moves_to_front_and_peek_does_not() {
        let mut arena = HeapArena::new(64 * 1024);
        let mut cache = Cache::create(&mut arena, SEED).unwrap();
        for name in ["a.example", "b.example", "c.example"] {
            put(&mut cache, name, State::Registered, 10);
        }
        assert_eq!(
            check(&cache),
            [b"c.example".to_vec(), b"b.example".into(), b"a.example".into()]
        );

        cache.peek(b"a.example").unwrap();
        assert_eq!(check(&cache)[0], b"c.example");

        cache.get(b"a.example").unwrap();
        assert_eq!(
            check(&cache),
            [b"a.example".to_vec(), b"c.example".into(), b"b.example".into()]
        );
    }

    #[test]
    fn remove_and_clear() {
        let mut arena = HeapArena::new(64 * 1024);
        let mut cache = Cache::create(&mut arena, SEED).unwrap();
        for name in ["a.example", "b.example", "c.example"] {
            put(&mut cache, name, State::Registered, 10);
        }

        assert!(cache.remove(b"b.example"));
        assert!(!cache.remove(b"b.example"));
        assert_eq!(check(&cache), [b"c.example".to_vec(), b"a.example".into()]);

        cache.clear();
        assert!(cache.is_empty());
        assert!(check(&cache).is_empty());

        let base = arena.used();
        let mut cache = unsafe { Cache::open(&mut arena, 16) }.unwrap();
        put(&mut cache, "again.example", State::Registered, 1);
        assert!(cache.remove(b"again.example"));
        assert_eq!(arena.used(), base, "removing frees the memory");
    }

    #[test]
    fn expire_all_makes_every_answer_stale_and_keeps_it() {
        let mut arena = HeapArena::new(64 * 1024);
        let mut cache = Cache::create(&mut arena, SEED).unwrap();
        cache.put(b"fresh", State::Registered, 1000, 500, 0).unwrap();
        cache.put(b"negative", State::NotRegistered, 1000, 0, 0).unwrap();
        cache.put(b"old", State::Registered, 50, 500, 0).unwrap();

        assert_eq!(cache.expire_all(100), 2, "two answers were still fresh");
        let cases = [("fresh", 100, 500), ("negative", 100, 0), ("old", 50, 500)];
        for (name, expires, keep) in cases {
            let found = cache.peek(name.as_bytes()).unwrap();
            assert_eq!((found.expires, found.keep), (expires, keep), "{name}");
        }
        assert_eq!(cache.len(), 3);
        check(&cache);
    }

    #[test]
    fn expire_drops_only_entries_past_expires_plus_keep() {
        let mut arena = HeapArena::new(64 * 1024);
        let mut cache = Cache::create(&mut arena, SEED).unwrap();
        // oldest first: (name, expires, keep)
        let entries = [("old", 100, 0), ("stale", 100, 50), ("fresh", 1000, 0)];
        for (name, expires, keep) in entries {
            cache.put(name.as_bytes(), State::Registered, expires, keep, 0).unwrap();
        }

        assert_eq!(cache.expire(120, 10), 1, "only the entry past its time goes");
        assert_eq!(cache.peek(b"old"), None);
        assert!(cache.peek(b"stale").is_some(), "kept for its stale window");

        assert_eq!(cache.expire(150, 10), 1);
        assert_eq!(cache.peek(b"stale"), None);
        assert!(cache.peek(b"fresh").is_some());
        check(&cache);
    }

    #[test]
    fn a_full_arena_evicts_the_least_recently_used() {
        let mut arena = HeapArena::new(16 * 1024);
        let mut cache = Cache::create(&mut arena, SEED).unwrap();

        let mut stored = 0;
        while cache.evictions() == 0 {
            put(&mut cache, &format!("name-{stored}.example"), State::Registered, 10);
            // keep the first name hot: it must survive eviction
            cache.get(b"name-0.example").unwrap();
            stored += 1;
            assert!(stored < 10_000, "the arena never filled");
        }

        assert!(cache.peek(b"name-0.example").is_some(), "recently used entry was evicted");
        assert_eq!(cache.peek(b"name-1.example"), None, "the coldest entry gives way first");
        assert_eq!(cache.failures(), 0);
        check(&cache);
    }

    #[test]
    fn not_registered_entries_give_way_before_registered_ones() {
        let mut arena = HeapArena::new(16 * 1024);
        let mut cache = Cache::create(&mut arena, SEED).unwrap();

        // registered names first: the least recently used
        for n in 0..10 {
            put(&mut cache, &format!("customer-{n}.example"), State::Registered, 10_000);
        }
        // then a flood of invented names, until the arena is full and evictions begin
        let mut n = 0;
        while cache.evictions() < 20 {
            put(&mut cache, &format!("junk-{n}.example"), State::NotRegistered, 10_000);
            n += 1;
            assert!(n < 10_000, "the arena never filled");
        }

        for n in 0..10 {
            let name = format!("customer-{n}.example");
            assert!(cache.peek(name.as_bytes()).is_some(), "{name} was evicted by the flood");
        }
        assert_eq!(cache.peek(b"junk-0.example"), None, "the oldest junk went first");
        check(&cache);
    }

    #[test]
    fn when_evictions_cannot_make_room_nothing_is_stored_and_nothing_breaks() {
        let mut arena = HeapArena::new(8 * 1024);
        let mut cache = Cache::create(&mut arena, SEED).unwrap();

        // fill the arena with small entries; the heap arena never merges freed small chunks,
        // so evicting them cannot make room for a 512-byte chunk
        let mut n = 0;
        while cache.evictions() == 0 {
            put(&mut cache, &format!("f{n}"), State::Registered, 10);
            n += 1;
        }
        let before = cache.len();
        let evictions = cache.evictions();

        let long = [b'a'; 255];
        assert_eq!(cache.put(&long, State::Registered, 10, 0, 0), Err(Full));
        assert_eq!(cache.failures(), 1);
        assert_eq!(cache.evictions() - evictions, MAX_EVICTIONS_PER_PUT as u64, "bounded work");
        assert_eq!(cache.len(), before - MAX_EVICTIONS_PER_PUT);
        assert_eq!(cache.peek(&long), None);
        check(&cache);

        // small names still fit in the room the evictions made
        put(&mut cache, "after.example", State::Registered, 10);

        assert_eq!(cache.put(b"", State::Registered, 1, 0, 0), Err(Full));
        assert_eq!(cache.put(&[b'a'; 256], State::Registered, 1, 0, 0), Err(Full));
    }

    #[test]
    fn open_refuses_foreign_or_other_layouts() {
        let mut arena = HeapArena::new(64 * 1024);
        let offset = Cache::create(&mut arena, SEED).unwrap().offset();
        assert!(unsafe { Cache::open(&mut arena, offset) }.is_some());
        assert!(unsafe { Cache::open(&mut arena, 0) }.is_none());
        assert!(unsafe { Cache::open(&mut arena, 1 << 30) }.is_none());

        // another layout version of the same module
        unsafe { (*arena.base().as_ptr().add(offset as usize + 8).cast::<u32>()) += 1 };
        assert!(unsafe { Cache::open(&mut arena, offset) }.is_none());

        // memory that never held a cache
        let mut other = HeapArena::new(64 * 1024);
        let junk = other.alloc(size_of::<Header>()).unwrap();
        assert!(unsafe { Cache::open(&mut other, junk) }.is_none());
    }

    #[test]
    fn an_interrupted_change_is_visible_to_the_next_holder() {
        let mut arena = HeapArena::new(64 * 1024);
        let offset = {
            let mut cache = Cache::create(&mut arena, SEED).unwrap();
            assert!(!cache.interrupted());
            cache.begin(4242);
            put(&mut cache, "x.example", State::Registered, 1);
            // the process dies here, before `end`
            cache.offset()
        };
        let mut cache = unsafe { Cache::open(&mut arena, offset) }.unwrap();
        assert!(cache.interrupted());
        cache.end();
        assert!(!cache.interrupted());
    }

    #[test]
    fn busy_marks_survive_until_the_answer_is_replaced() {
        let mut arena = HeapArena::new(64 * 1024);
        let mut cache = Cache::create(&mut arena, SEED).unwrap();
        assert!(!cache.set_busy(b"x.example", 5));
        put(&mut cache, "x.example", State::Registered, 1);
        assert!(cache.set_busy(b"x.example", 0));
        assert_eq!(cache.peek(b"x.example").unwrap().busy, 1, "0 is taken as 1");
        put(&mut cache, "x.example", State::Registered, 2);
        assert_eq!(cache.peek(b"x.example").unwrap().busy, 0);
    }

    /// Random operations against a small arena, checked against a plain map: whatever the cache
    /// still holds is the last answer stored for that name, and the structure stays whole.
    #[test]
    fn random_operations_keep_the_structure_whole() {
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };

        let mut arena = HeapArena::new(12 * 1024);
        let mut cache = Cache::create(&mut arena, SEED).unwrap();
        let mut model: HashMap<Vec<u8>, (State, u64)> = HashMap::new();

        for step in 0..20_000u64 {
            let len = 1 + next() as usize % 80;
            let name: Vec<u8> =
                (0..len).map(|i| b'a' + ((next() as usize + i) % 4) as u8).collect();
            match next() % 10 {
                0..=4 => {
                    let state =
                        if next() % 2 == 0 { State::Registered } else { State::NotRegistered };
                    let expires = step + next() % 500;
                    if cache.put(&name, state, expires, 0, step).is_ok() {
                        model.insert(name, (state, expires));
                    } else {
                        model.remove(&name);
                    }
                }
                5..=7 => {
                    if let Some(found) = cache.get(&name) {
                        assert_eq!(Some(&(found.state, found.expires)), model.get(&name));
                    }
                }
                8 => {
                    cache.remove(&name);
                    model.remove(&name);
                }
                _ => {
                    cache.expire(step, 4);
                }
            }
            if step % 1000 == 0 {
                for name in check(&cache) {
                    assert!(model.contains_key(&name), "{name:?} cached but never stored");
                }
            }
        }
        assert!(cache.evictions() > 0, "the test never filled the arena");
    }
}
