//! The parts of sni_guard that know nothing of nginx.
//!
//! Everything here is plain Rust with no nginx symbols, so `cargo test -p sni_guard_core` links
//! and runs on any toolchain. Time is always passed in as milliseconds of a monotonic clock,
//! never read here, so expiry is tested without sleeping.

pub mod allow;
pub mod answer;
pub mod cache;
pub mod lookup;
pub mod names;
pub mod panics;
pub mod policy;
pub mod query;
pub mod shared;
pub mod status;
