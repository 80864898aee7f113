//! A small, fast, non-cryptographic generator for the random parts of names and ClientHellos.
//!
//! Nothing here needs secrecy: the bytes only have to differ between runs and threads, so that
//! no two runs ask a server for the same "random" names. A syscall per connection would show up
//! in hello mode, where the client is meant to cost almost nothing.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};

/// splitmix64: one add and three multiply/xor-shift rounds per output.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    #[cfg(test)]
    pub fn from_seed(seed: u64) -> Self {
        Rng(seed)
    }

    /// Seeded from the keys std draws from the OS for `HashMap`, mixed with `stream` so that
    /// threads started together do not share a sequence.
    pub fn from_os(stream: u64) -> Self {
        let mut h = RandomState::new().build_hasher();
        h.write_u64(stream);
        Rng(h.finish())
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn fill(&mut self, out: &mut [u8]) {
        for chunk in out.chunks_mut(8) {
            let bytes = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn outputs_do_not_repeat_quickly() {
        for seed in [0, 1, u64::MAX] {
            let mut rng = Rng::from_seed(seed);
            let seen: HashSet<u64> = (0..10_000).map(|_| rng.next_u64()).collect();
            assert_eq!(seen.len(), 10_000, "seed {seed}");
        }
    }

    #[test]
    fn streams_differ() {
        let a = Rng::from_os(0).next_u64();
        let b = Rng::from_os(1).next_u64();
        assert_ne!(a, b);
    }

    #[test]
    fn fill_covers_every_byte() {
        for len in [0, 1, 7, 8, 9, 32, 33] {
            let mut rng = Rng::from_seed(42);
            // Start from a pattern the generator is unlikely to reproduce byte for byte.
            let mut buf = vec![0xa5u8; len];
            rng.fill(&mut buf);
            let mut again = Rng::from_seed(42);
            let mut expected = Vec::new();
            while expected.len() < len {
                expected.extend_from_slice(&again.next_u64().to_le_bytes());
            }
            expected.truncate(len);
            assert_eq!(buf, expected, "len {len}");
        }
    }
}
