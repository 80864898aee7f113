//! Panics caught at the edge of nginx.
//!
//! A panic must never unwind into nginx's C frames, so the hook's checks and lookups run under
//! [`catch`]. Rust's default panic hook would also print the panic to stderr, which nginx sends
//! to its error log unformatted and unlimited; under [`catch`] the message is handed back
//! instead, for the caller to log the nginx way. Panics elsewhere in the process (another Rust
//! module) still reach the hook that was installed before.

use std::any::Any;
use std::cell::{Cell, RefCell};
use std::panic::{self, AssertUnwindSafe};
use std::sync::Once;

thread_local! {
    /// Whether this thread is inside [`catch`].
    static CATCHING: Cell<bool> = const { Cell::new(false) };
    /// The message of the last panic caught on this thread.
    static MESSAGE: RefCell<Option<String>> = const { RefCell::new(None) };
}

static INSTALL: Once = Once::new();

/// Runs `f`; a panic in it becomes `Err` with the panic's message and where it was raised.
pub fn catch<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    INSTALL.call_once(|| {
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if CATCHING.get() {
                let at = info.location().map(|l| format!(" at {}:{}", short(l.file()), l.line()));
                let text = format!("{}{}", payload_text(info.payload()), at.unwrap_or_default());
                MESSAGE.set(Some(text));
            } else {
                previous(info);
            }
        }));
    });

    let outer = CATCHING.replace(true);
    let result = panic::catch_unwind(AssertUnwindSafe(f));
    CATCHING.set(outer);

    result.map_err(|payload| {
        MESSAGE.take().unwrap_or_else(|| payload_text(payload.as_ref()).to_owned())
    })
}

/// The last three parts of a source path, `crate-1.0/src/file.rs`: where the build ran is no
/// one's business in a log.
fn short(path: &str) -> &str {
    let cut = path.char_indices().rev().filter(|&(_, c)| c == '/').nth(2);
    cut.map_or(path, |(i, _)| &path[i + 1..])
}

fn payload_text(payload: &(dyn Any + Send)) -> &str {
    match (payload.downcast_ref::<&str>(), payload.downcast_ref::<String>()) {
        (Some(s), _) => s,
        (_, Some(s)) => s,
        _ => "panic",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_its_message() {
        type Case = (fn() -> u32, Result<u32, &'static str>);
        let cases: [Case; 4] = [
            (|| 7, Ok(7)),
            (|| panic!("plain"), Err("plain at ")),
            (|| panic!("formatted {}", 42), Err("formatted 42 at ")),
            (|| std::panic::panic_any(13_u8), Err("panic at ")),
        ];
        for (f, want) in cases {
            match (catch(f), want) {
                (Ok(got), Ok(want)) => assert_eq!(got, want),
                (Err(got), Err(want)) => {
                    assert!(got.starts_with(want), "{got:?} does not start with {want:?}");
                    assert!(got.contains("panics.rs:"), "{got:?} says where");
                }
                (got, want) => panic!("{got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn paths_are_shortened() {
        let cases = [
            (
                "/root/.cargo/registry/src/x/ureq-proto-0.5.3/src/parser.rs",
                "ureq-proto-0.5.3/src/parser.rs",
            ),
            ("core/src/panics.rs", "core/src/panics.rs"),
            ("src/panics.rs", "src/panics.rs"),
            ("panics.rs", "panics.rs"),
            ("", ""),
        ];
        for (path, want) in cases {
            assert_eq!(short(path), want, "{path}");
        }
    }

    #[test]
    fn nested_catches_each_get_their_own() {
        let outer: Result<(), String> = catch(|| {
            let inner = catch(|| -> () { panic!("inner") });
            assert!(inner.unwrap_err().starts_with("inner"));
            panic!("outer")
        });
        assert!(outer.unwrap_err().starts_with("outer"));
    }
}
