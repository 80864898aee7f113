//! Query strings: the `domain` parameter a lookup URL must not carry, and what a purge request
//! asks for.

use std::fmt;

/// Decodes `%XX` escapes and leaves everything else alone, as nginx's `ngx_unescape_uri` does
/// for arguments.
pub fn percent_decode(raw: &[u8]) -> Vec<u8> {
    let hex = |b: Option<&u8>| b.and_then(|&b| (b as char).to_digit(16)).map(|d| d as u8);
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        match (raw[i], hex(raw.get(i + 1)), hex(raw.get(i + 2))) {
            (b'%', Some(hi), Some(lo)) => {
                out.push(hi << 4 | lo);
                i += 3;
            }
            (byte, _, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    out
}

/// Whether a query has a parameter that a lookup service could read as `domain`: the module
/// appends its own, and a service that takes the first of two, or an array or object made of
/// both, would answer for the wrong name. Web frameworks differ in what they take for a
/// parameter's name - `;` as a separator, escapes, letter case, a leading `?`, brackets and
/// dots for arrays and objects (`domain[]`, `domain[x]`, `domain.x`) - so a name counts when,
/// decoded, it has `domain` as a word of its own between any characters but letters and
/// digits. That refuses some names no framework reads so (`my_domain`); a lookup URL can do
/// without them. Non-ASCII names are [`has_non_ascii_parameter`]'s.
pub fn has_domain_parameter(query: &str) -> bool {
    parameter_names(query).any(|name| {
        name.split(|b| !b.is_ascii_alphanumeric()).any(|word| word.eq_ignore_ascii_case(b"domain"))
    })
}

/// Whether a query has a parameter whose name, decoded, is not ASCII: a framework that folds
/// case by Unicode rules reads `DOMA\u{130}N` as `domain`.
pub fn has_non_ascii_parameter(query: &str) -> bool {
    parameter_names(query).any(|name| !name.is_ascii())
}

fn parameter_names(query: &str) -> impl Iterator<Item = Vec<u8>> + '_ {
    query.split(['&', ';']).map(|param| {
        let name = param.split('=').next().unwrap_or_default();
        percent_decode(name.as_bytes())
    })
}

/// How many parameters a lookup URL's query may have: parsers stop at a limit (Node's `qs` at
/// 1000), and the module's own parameter, appended last, must not fall beyond it.
pub const MAX_QUERY_PARAMETERS: usize = 100;

/// The number of parameters of a query, `&` or `;` separated.
pub fn parameter_count(query: &str) -> usize {
    query.split(['&', ';']).filter(|p| !p.is_empty()).count()
}

/// What a purge request asks to remove.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PurgeTarget {
    /// No query: every name.
    All,
    /// `name=NAME`: the name, decoded but not yet validated.
    One(Vec<u8>),
}

/// Why a purge request's query was refused. Anything but nothing or exactly one `name=` is
/// refused rather than read as "everything": a misspelt parameter must not empty the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PurgeError {
    /// A query of separators only, as a script that joined empty parameters sends.
    Empty,
    /// A parameter other than `name`.
    Unknown(String),
    /// `name` without `=`.
    NoValue,
    /// `name` more than once.
    Repeated,
}

impl fmt::Display for PurgeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PurgeError::Empty => f.write_str("a query without parameters"),
            PurgeError::Unknown(p) => write!(f, "unknown parameter \"{p}\", expected \"name\""),
            PurgeError::NoValue => f.write_str("\"name\" without a value"),
            PurgeError::Repeated => f.write_str("\"name\" given more than once"),
        }
    }
}

impl std::error::Error for PurgeError {}

/// Reads a purge request's query (without the `?`): empty parts, as in `name=a&&`, are
/// skipped, but a query that is nothing else is refused; only no query at all means everything.
pub fn purge_target(query: &[u8]) -> Result<PurgeTarget, PurgeError> {
    let mut target = PurgeTarget::All;
    for param in query.split(|&b| b == b'&').filter(|p| !p.is_empty()) {
        let (name, value) = match param.iter().position(|&b| b == b'=') {
            Some(i) => (&param[..i], Some(&param[i + 1..])),
            None => (param, None),
        };
        if name != b"name" {
            return Err(PurgeError::Unknown(String::from_utf8_lossy(name).into_owned()));
        }
        let value = value.ok_or(PurgeError::NoValue)?;
        if target != PurgeTarget::All {
            return Err(PurgeError::Repeated);
        }
        target = PurgeTarget::One(percent_decode(value));
    }
    if target == PurgeTarget::All && !query.is_empty() {
        return Err(PurgeError::Empty);
    }
    Ok(target)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_escapes_only() {
        let cases: &[(&[u8], &[u8])] = &[
            (b"a.example", b"a.example"),
            (b"%61%2E%45x", b"a.Ex"),
            (b"%00", b"\0"),
            (b"%zz%4", b"%zz%4"),
            (b"%", b"%"),
            (b"a+b", b"a+b"),
            (b"%%41", b"%A"),
            (b"", b""),
        ];
        for (raw, want) in cases {
            assert_eq!(percent_decode(raw), *want, "{}", String::from_utf8_lossy(raw));
        }
    }

    #[test]
    fn finds_every_spelling_of_domain() {
        let cases = [
            ("domain=x", true),
            ("a=1&domain=x", true),
            ("a=1;domain=x", true),
            ("%64omain=x", true),
            ("Domain=x", true),
            ("DOMAIN", true),
            ("+domain=x", true),
            ("%20domain%20=x", true),
            ("domain", true),
            ("?domain=x", true),
            ("domain%5B%5D=x", true),
            ("domain%5B0%5D=x", true),
            ("%5Bdomain%5D=x", true),
            ("domain%00=x", true),
            ("domain.=x", true),
            ("domain%5Bx%5D=y", true),
            ("domain.x=y", true),
            ("my_domain=x", true),
            ("do-main=x", false),
            ("a=domain", false),
            ("domain0=x", false),
            ("%5B%5D=x", false),
            ("domainname=x", false),
            ("domains=x", false),
            ("do%6dain2=x", false),
            ("", false),
            ("k=v&", false),
        ];
        for (query, want) in cases {
            assert_eq!(has_domain_parameter(query), want, "{query}");
        }
    }

    #[test]
    fn finds_names_outside_ascii() {
        let cases = [
            ("doma%C4%B1n=x", true),
            ("DOMA%C4%B0N=x", true),
            ("a=1&%C3%A9=x", true),
            ("a=%C3%A9", false),
            ("a=1;b=2", false),
            ("", false),
        ];
        for (query, want) in cases {
            assert_eq!(has_non_ascii_parameter(query), want, "{query}");
        }
    }

    #[test]
    fn purge_takes_nothing_or_one_name() {
        let cases: &[(&[u8], Result<PurgeTarget, PurgeError>)] = &[
            (b"", Ok(PurgeTarget::All)),
            (b"&", Err(PurgeError::Empty)),
            (b"&&&", Err(PurgeError::Empty)),
            (b"name=a.example", Ok(PurgeTarget::One(b"a.example".to_vec()))),
            (b"name=A%2Eexample", Ok(PurgeTarget::One(b"A.example".to_vec()))),
            (b"&name=a.example&", Ok(PurgeTarget::One(b"a.example".to_vec()))),
            (b"name=", Ok(PurgeTarget::One(Vec::new()))),
            (b"name", Err(PurgeError::NoValue)),
            (b"domain=a.example", Err(PurgeError::Unknown("domain".into()))),
            (b"nam=a.example", Err(PurgeError::Unknown("nam".into()))),
            (b"foo", Err(PurgeError::Unknown("foo".into()))),
            (b"Name=a.example", Err(PurgeError::Unknown("Name".into()))),
            (b"name=a.example&x=1", Err(PurgeError::Unknown("x".into()))),
            (b"name=a.example&name=b.example", Err(PurgeError::Repeated)),
        ];
        for (query, want) in cases {
            assert_eq!(purge_target(query), *want, "{}", String::from_utf8_lossy(query));
        }
    }
}
