//! The properties every fuzz target asserts, one function per target.
//!
//! core/tests/fuzz_corpus.rs includes this file by path and runs the committed corpus through
//! the same functions under plain `cargo test`, so an input the fuzzer once found interesting
//! keeps being checked on stable Rust without a fuzzer. That is why this file uses nothing but
//! `std` and `sni_guard_core`.
//!
//! Each check panics, which libFuzzer reports as a crash, when a property does not hold. The
//! rules are written out again here the slow, obvious way instead of trusting the code under
//! test to describe itself.

use sni_guard_core::answer::{classify, Answer, LookupError, MAX_TTL};
use sni_guard_core::names::{
    normalise, parse_server_name_ext, selection_key, Invalid, MAX_LABEL_LEN, MAX_NAME_LEN,
};

/// Bytes before the host name in a well-formed extension body: list length (2), name_type (1),
/// host name length (2).
const EXT_HEADER_LEN: usize = 5;

/// `parse_server_name_ext` never panics, accepts exactly the bodies RFC 6066 allows with one
/// non-empty host_name entry, and hands back the host name where it lies in the input.
pub fn check_server_name_ext(data: &[u8]) {
    let got = parse_server_name_ext(data);
    // The encoded host name length, when the body is one that must be accepted.
    let declared_name_len = match data {
        [l0, l1, 0, n0, n1, name @ ..] => {
            let list_len = usize::from(u16::from_be_bytes([*l0, *l1]));
            let name_len = usize::from(u16::from_be_bytes([*n0, *n1]));
            let exact = list_len == data.len() - 2 && name_len == name.len();
            Some(name_len).filter(|&len| exact && len > 0)
        }
        _ => None,
    };
    let name = match (got, declared_name_len) {
        (Ok(name), Some(declared)) => {
            let input = data.as_ptr_range();
            let output = name.as_ptr_range();
            assert!(
                input.start <= output.start && output.end <= input.end,
                "{data:?}: the host name does not lie inside the input"
            );
            assert_eq!(name.len(), declared, "{data:?}: host name length differs from encoded");
            assert_eq!(Some(name), data.get(EXT_HEADER_LEN..), "{data:?}: wrong host name bytes");
            name
        }
        (Ok(name), None) => panic!("{data:?}: malformed extension accepted as {name:?}"),
        (Err(err), Some(_)) => panic!("{data:?}: well-formed extension refused: {err}"),
        (Err(err), None) => {
            assert!(!err.to_string().is_empty(), "{data:?}: {err:?} has no message");
            return;
        }
    };
    // What the module does next with the name, so the name rules also see fuzzed names that
    // arrived through a real extension.
    check_name(name);
}

/// `normalise` never panics, accepts exactly the names the policy allows, and gives them lower
/// cased without one trailing dot; `selection_key` never panics and agrees with it.
pub fn check_name(raw: &[u8]) {
    let got = normalise(raw);
    let key = selection_key(raw);
    let body = raw.strip_suffix(b".").unwrap_or(raw);
    let expected = body.to_ascii_lowercase();
    if let Some(key) = &key {
        assert!(key.len() <= raw.len(), "{raw:?}: key {key:?} longer than the name");
        assert!(!key.iter().any(u8::is_ascii_uppercase), "{raw:?}: key {key:?} not folded");
    }
    match got {
        Ok(name) => {
            let bytes = name.as_bytes();
            assert_eq!(bytes, expected.as_slice(), "{raw:?}: not the lower-cased input");
            if let Some(rule) = broken_rule(bytes) {
                panic!("{raw:?}: accepted as {name:?}, which breaks the rule: {rule}");
            }
            assert_eq!(name.len(), bytes.len(), "{raw:?}: len() disagrees with as_bytes()");
            assert_eq!(name.as_str().as_bytes(), bytes, "{raw:?}: as_str() disagrees");
            assert_eq!(normalise(bytes), Ok(name), "{raw:?}: normalise is not idempotent");
            assert_eq!(key.as_deref(), Some(bytes), "{raw:?}: nginx would pick another key");
        }
        Err(reason) => {
            let rule = broken_rule(&expected);
            assert!(rule.is_some(), "{raw:?}: refused ({reason}) but breaks no rule");
            assert_eq!(reason == Invalid::Empty, body.is_empty(), "{raw:?}: {reason}");
            let too_long = !body.is_empty() && body.len() > MAX_NAME_LEN;
            assert_eq!(reason == Invalid::TooLong, too_long, "{raw:?}: {reason}");
            assert!(reason_fits(reason, &expected), "{raw:?}: reason {reason} does not apply");
        }
    }
}

/// The first rule of the name policy that `name` (already lower-cased, trailing dot already
/// dropped) breaks, or `None` when it is a valid host name.
fn broken_rule(name: &[u8]) -> Option<&'static str> {
    if name.is_empty() {
        return Some("not empty");
    }
    if name.len() > MAX_NAME_LEN {
        return Some("at most 253 bytes");
    }
    if !name.iter().all(|&b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.')) {
        return Some("only letters, digits, hyphens and dots");
    }
    for label in name.split(|&b| b == b'.') {
        if label.is_empty() {
            return Some("no empty label");
        }
        if label.len() > MAX_LABEL_LEN {
            return Some("labels at most 63 bytes");
        }
        if label.starts_with(b"-") || label.ends_with(b"-") {
            return Some("no hyphen at either end of a label");
        }
    }
    if last_label_is_numeric(name) {
        return Some("last label not all digits");
    }
    None
}

/// Whether the part after the last dot is all digits (an IPv4 literal, or no public name).
fn last_label_is_numeric(name: &[u8]) -> bool {
    name.rsplit(|&b| b == b'.').next().is_some_and(|last| last.iter().all(u8::is_ascii_digit))
}

/// Whether the refusal `reason` is borne out by `name` (lower-cased, trailing dot dropped).
fn reason_fits(reason: Invalid, name: &[u8]) -> bool {
    let mut labels = name.split(|&b| b == b'.');
    match reason {
        Invalid::Empty => name.is_empty(),
        Invalid::TooLong => name.len() > MAX_NAME_LEN,
        Invalid::EmptyLabel => labels.any(<[u8]>::is_empty),
        Invalid::LabelTooLong => labels.any(|label| label.len() > MAX_LABEL_LEN),
        Invalid::IpLiteral => {
            name.iter().any(|b| b":[]".contains(b)) || last_label_is_numeric(name)
        }
        Invalid::Underscore => name.contains(&b'_'),
        Invalid::Hyphen => labels.any(|label| label.starts_with(b"-") || label.ends_with(b"-")),
        Invalid::BadByte => name.iter().any(
            |&b| !matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b':' | b'[' | b']'),
        ),
    }
}

/// `classify` never panics on any status, content type and body, and its verdict follows the
/// status code alone; the body can only add a ttl within bounds or make the reply malformed.
///
/// Input layout: status (2 bytes, big-endian), one byte whose high bit means "no content
/// type" and whose low 7 bits are the content type's length, the content type (lossy UTF-8),
/// then the body.
pub fn check_answer(data: &[u8]) {
    let [s0, s1, ct, rest @ ..] = data else {
        return;
    };
    let status = u16::from_be_bytes([*s0, *s1]);
    let (content_type, body) = if ct & 0x80 != 0 {
        (None, rest)
    } else {
        let (ct_bytes, body) = rest.split_at(usize::from(*ct).min(rest.len()));
        (Some(String::from_utf8_lossy(ct_bytes)), body)
    };
    let got = classify(status, content_type.as_deref(), body);
    let what = format!("status {status}, content type {content_type:?}, body {body:?}");
    let registered = match status {
        200..=299 => true,
        403 | 404 | 410 => false,
        300..=399 => {
            assert_eq!(got, Err(LookupError::Redirect(status)), "{what}");
            return;
        }
        _ => {
            assert_eq!(got, Err(LookupError::Status(status)), "{what}");
            return;
        }
    };
    match got {
        Ok(answer) => {
            assert_eq!(answer.is_registered(), registered, "{what}: {answer:?}");
            assert!(answer.ttl().unwrap_or(0) <= MAX_TTL, "{what}: {answer:?}");
            if content_type.is_none() {
                assert_eq!(answer.ttl(), None, "{what}: ttl without a json body");
            }
            let want_kind = if registered {
                Answer::Registered { ttl: answer.ttl() }
            } else {
                Answer::NotRegistered { ttl: answer.ttl() }
            };
            assert_eq!(answer, want_kind, "{what}");
        }
        Err(LookupError::Malformed(message)) => {
            assert!(content_type.is_some(), "{what}: body read without a content type");
            assert!(!message.is_empty(), "{what}: empty message");
        }
        Err(err) => panic!("{what}: an answer status gave {err:?}"),
    }
}
