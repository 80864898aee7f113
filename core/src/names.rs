//! Server names: reading them out of the ClientHello, deciding whether they are host names
//! anyone could have registered, and predicting which `server {}` block nginx will pick.
//!
//! # Name policy
//!
//! [`normalise`] accepts a server name, and gives the form it is looked up and cached under,
//! only if all of these hold:
//!
//! - ASCII upper case is folded to lower case; nothing else is rewritten.
//! - Exactly one trailing dot is dropped (`example.com.` is `example.com`). Two trailing dots
//!   leave an empty label and are refused; a lone `.` is an empty name.
//! - After dropping the dot the name is 1 to 253 bytes long and every label is 1 to 63 bytes.
//! - Labels hold only ASCII letters, digits and hyphens (the LDH rule of RFC 952/1123).
//! - Underscores are refused: they are not host name characters, and since CA/Browser Forum
//!   ballot SC-20 no public CA may issue a certificate for a dNSName that contains one, so
//!   such a name can never be issued for.
//! - A label may not start or end with a hyphen (RFC 1123; CAs refuse such names as well).
//!   Hyphens inside a label are fine, which includes `xn--` punycode labels.
//! - IP literals are refused. A name holding `:`, `[` or `]` is taken as an IPv6 literal; a
//!   name whose last label is all digits is an IPv4 literal, or at any rate not a public name,
//!   since a top-level domain is never all-numeric (RFC 3696 section 2).
//! - Every other byte is refused: NUL, bytes of 0x80 and above (IDNs must arrive as punycode),
//!   spaces, control characters, `*`, `/` and the rest.
//! - Single-label names such as `localhost` pass: whether they are served is for the lookup
//!   service to decide, not for syntax.
//!
//! When a name breaks several rules the reason reported is decided in this order: an empty
//! name, then a name too long, then the first offending byte or label from the left, then the
//! last label being all digits.

use std::borrow::Cow;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::str::FromStr;

/// Longest host name accepted, without the trailing dot (RFC 1035's 255-byte wire limit).
pub const MAX_NAME_LEN: usize = 253;
/// Longest label accepted (RFC 1035).
pub const MAX_LABEL_LEN: usize = 63;

/// The RFC 6066 name_type of a DNS host name, the only type ever defined.
const NAME_TYPE_HOST_NAME: u8 = 0;

/// Why a server_name extension body could not be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ExtError {
    /// The bytes end before a header or a declared length says they should.
    Truncated,
    /// The list length is shorter than the rest of the extension.
    LengthMismatch,
    /// The list has no entries.
    EmptyList,
    /// The first entry has a name_type other than host_name.
    NotHostName,
    /// Something follows the first entry: a second name or stray bytes.
    TrailingData,
    /// The host name has length zero.
    EmptyName,
}

impl ExtError {
    /// Short lowercase reason for log lines.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Truncated => "truncated server_name extension",
            Self::LengthMismatch => "server_name list length does not match the extension",
            Self::EmptyList => "empty server_name list",
            Self::NotHostName => "server name type is not host_name",
            Self::TrailingData => "data after the first server name",
            Self::EmptyName => "empty host name in server_name extension",
        }
    }
}

impl fmt::Display for ExtError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::error::Error for ExtError {}

/// Reads the host name out of a server_name extension body, as
/// `SSL_client_hello_get0_ext(s, TLSEXT_TYPE_server_name, ..)` hands it over (RFC 6066
/// section 3).
///
/// As strict as OpenSSL 3's own parser, so the name seen here is the one OpenSSL would have
/// accepted: the list length covers the rest of the extension exactly, the list holds exactly
/// one entry, of type host_name, whose length covers the rest of the list exactly. An empty
/// host name is refused as well, which OpenSSL lets through.
pub fn parse_server_name_ext(ext: &[u8]) -> Result<&[u8], ExtError> {
    let (list_len, list) = split_u16(ext).ok_or(ExtError::Truncated)?;
    if list.len() < list_len {
        return Err(ExtError::Truncated);
    }
    if list.len() > list_len {
        return Err(ExtError::LengthMismatch);
    }
    let (&name_type, entry) = list.split_first().ok_or(ExtError::EmptyList)?;
    // The type is checked before its length, as OpenSSL does: other types need not share the
    // host_name layout.
    if name_type != NAME_TYPE_HOST_NAME {
        return Err(ExtError::NotHostName);
    }
    let (name_len, name) = split_u16(entry).ok_or(ExtError::Truncated)?;
    if name.len() < name_len {
        return Err(ExtError::Truncated);
    }
    if name.len() > name_len {
        return Err(ExtError::TrailingData);
    }
    if name.is_empty() {
        return Err(ExtError::EmptyName);
    }
    Ok(name)
}

/// Splits a big-endian 16-bit length off the front of `bytes`.
fn split_u16(bytes: &[u8]) -> Option<(usize, &[u8])> {
    match bytes {
        [hi, lo, rest @ ..] => Some((usize::from(u16::from_be_bytes([*hi, *lo])), rest)),
        _ => None,
    }
}

/// Why a server name is not a host name under the policy in the module documentation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Invalid {
    /// Nothing left, or nothing but the trailing dot.
    Empty,
    /// Over [`MAX_NAME_LEN`] bytes after dropping the trailing dot.
    TooLong,
    /// Two dots in a row, a leading dot or two trailing dots.
    EmptyLabel,
    /// A label over [`MAX_LABEL_LEN`] bytes.
    LabelTooLong,
    /// An IPv6 literal (`:`, `[` or `]`) or an all-digit last label.
    IpLiteral,
    /// An underscore anywhere.
    Underscore,
    /// A label that starts or ends with a hyphen.
    Hyphen,
    /// Any other byte that is not a letter, digit, hyphen or dot.
    BadByte,
}

impl Invalid {
    /// Short lowercase reason for log lines.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Empty => "empty name",
            Self::TooLong => "name longer than 253 bytes",
            Self::EmptyLabel => "empty label",
            Self::LabelTooLong => "label longer than 63 bytes",
            Self::IpLiteral => "ip literal",
            Self::Underscore => "underscore",
            Self::Hyphen => "label starts or ends with a hyphen",
            Self::BadByte => "byte not allowed in a host name",
        }
    }
}

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::error::Error for Invalid {}

/// A normalised host name: lower case, no trailing dot, valid under the module's policy.
///
/// Held inline so that building one on every handshake never touches the heap.
#[derive(Clone, Copy)]
pub struct Name {
    // Only `buf[..len]` is meaningful; `len` is 1..=MAX_NAME_LEN and those bytes are ASCII.
    buf: [u8; MAX_NAME_LEN],
    len: u8,
}

impl Name {
    /// The name's bytes, all from `[a-z0-9.-]`.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..usize::from(self.len)]
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        // Only ASCII is ever stored, so this never falls back.
        std::str::from_utf8(self.as_bytes()).unwrap_or_default()
    }

    /// Length in bytes, 1 to [`MAX_NAME_LEN`].
    #[allow(clippy::len_without_is_empty)] // a Name is never empty
    pub fn len(&self) -> usize {
        usize::from(self.len)
    }
}

// Compared and hashed by the meaningful bytes only, not the whole buffer.
impl PartialEq for Name {
    fn eq(&self, other: &Self) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl Eq for Name {}

impl Hash for Name {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_bytes().hash(state);
    }
}

impl PartialEq<str> for Name {
    fn eq(&self, other: &str) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl PartialEq<&str> for Name {
    fn eq(&self, other: &&str) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl AsRef<str> for Name {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<[u8]> for Name {
    fn as_ref(&self) -> &[u8] {
        self.as_bytes()
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

impl fmt::Debug for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl FromStr for Name {
    type Err = Invalid;

    fn from_str(s: &str) -> Result<Self, Invalid> {
        normalise(s.as_bytes())
    }
}

/// Checks a raw server name against the policy in the module documentation and gives its
/// normalised form. One pass over the bytes, no allocation.
pub fn normalise(raw: &[u8]) -> Result<Name, Invalid> {
    let body = match raw.split_last() {
        Some((b'.', rest)) => rest,
        _ => raw,
    };
    if body.is_empty() {
        return Err(Invalid::Empty);
    }
    // Checked before the walk so that `buf` below always has room.
    let len = match u8::try_from(body.len()) {
        Ok(len) if usize::from(len) <= MAX_NAME_LEN => len,
        _ => return Err(Invalid::TooLong),
    };

    let mut buf = [0u8; MAX_NAME_LEN];
    let mut label_len = 0usize;
    let mut label_all_digits = true;
    let mut prev = b'.';
    for (slot, &byte) in buf.iter_mut().zip(body) {
        let out = match byte {
            b'a'..=b'z' | b'0'..=b'9' => byte,
            b'A'..=b'Z' => byte.to_ascii_lowercase(),
            b'-' if label_len == 0 => return Err(Invalid::Hyphen),
            b'-' => byte,
            b'.' => {
                if label_len == 0 {
                    return Err(Invalid::EmptyLabel);
                }
                if prev == b'-' {
                    return Err(Invalid::Hyphen);
                }
                *slot = byte;
                prev = byte;
                label_len = 0;
                label_all_digits = true;
                continue;
            }
            b':' | b'[' | b']' => return Err(Invalid::IpLiteral),
            b'_' => return Err(Invalid::Underscore),
            _ => return Err(Invalid::BadByte),
        };
        label_len += 1;
        if label_len > MAX_LABEL_LEN {
            return Err(Invalid::LabelTooLong);
        }
        label_all_digits &= out.is_ascii_digit();
        *slot = out;
        prev = out;
    }
    // The last label has no dot after it to trigger the checks above.
    if label_len == 0 {
        return Err(Invalid::EmptyLabel);
    }
    if prev == b'-' {
        return Err(Invalid::Hyphen);
    }
    if label_all_digits {
        return Err(Invalid::IpLiteral);
    }
    Ok(Name { buf, len })
}

/// The key nginx looks a raw SNI up under when it picks the virtual server, or `None` when
/// nginx would decline the name and stay with the default server of the address.
///
/// This repeats what nginx's host validation does to the SNI, so the module knows which
/// `server {}` block a name will land in before nginx has chosen: a port suffix after `:` is
/// cut off (but not inside a leading `[...]` literal), one trailing dot is dropped, ASCII upper
/// case is folded, and the name is declined for two dots in a row, a `/`, a control byte, a
/// space or DEL, or if nothing is left. Everything else, including `_` and bytes of 0x80 and
/// above, passes untouched. Borrows `raw` when folding changed nothing.
pub fn selection_key(raw: &[u8]) -> Option<Cow<'_, [u8]>> {
    #[derive(PartialEq)]
    enum State {
        Usual,
        Literal,
        Rest,
    }

    let mut state = State::Usual;
    let mut dot_pos = raw.len();
    let mut host_len = raw.len();
    for (i, &byte) in raw.iter().enumerate() {
        match byte {
            b'.' => {
                // nginx compares against i - 1 in unsigned arithmetic, which never matches at
                // i == 0, so a leading dot is not declined.
                if i > 0 && dot_pos == i - 1 {
                    return None;
                }
                dot_pos = i;
            }
            // A ':' or ']' out of place, or a '[' anywhere but first, is an ordinary byte.
            b':' if state == State::Usual => {
                host_len = i;
                state = State::Rest;
            }
            b'[' if i == 0 => state = State::Literal,
            b']' if state == State::Literal => {
                host_len = i + 1;
                state = State::Rest;
            }
            b'/' => return None,
            _ if byte <= 0x20 || byte == 0x7f => return None,
            _ => {}
        }
    }
    if host_len > 0 && dot_pos == host_len - 1 {
        host_len -= 1;
    }
    let host = raw.get(..host_len).filter(|host| !host.is_empty())?;
    if host.iter().any(u8::is_ascii_uppercase) {
        Some(Cow::Owned(host.to_ascii_lowercase()))
    } else {
        Some(Cow::Borrowed(host))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Shared with the integration tests, which push the same names through nginx.
    const SNI_NAMES: &str = include_str!("../../t/data/sni-names.tsv");

    /// The policy written the slow, obvious way, to check `normalise` against: splitting on
    /// dots and testing each rule on its own.
    fn reference_normalise(raw: &[u8]) -> Option<String> {
        let text = std::str::from_utf8(raw).ok()?;
        let body = text.strip_suffix('.').unwrap_or(text);
        if body.is_empty() || body.len() > MAX_NAME_LEN {
            return None;
        }
        let labels: Vec<&str> = body.split('.').collect();
        for label in &labels {
            let ldh = label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
            if label.is_empty()
                || label.len() > MAX_LABEL_LEN
                || !ldh
                || label.starts_with('-')
                || label.ends_with('-')
            {
                return None;
            }
        }
        if labels.last()?.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        Some(body.to_ascii_lowercase())
    }

    /// `count` labels of `label_len` copies of `fill`, joined with dots.
    fn labels(fill: char, label_len: usize, count: usize) -> String {
        vec![fill.to_string().repeat(label_len); count].join(".")
    }

    /// A name of exactly `len` bytes made of 63-byte labels and a shorter last one.
    fn name_of_len(len: usize) -> String {
        let mut name = String::new();
        let mut left = len;
        while left > MAX_LABEL_LEN {
            // Leave at least one byte after the dot so the last label is never empty.
            let take = MAX_LABEL_LEN.min(left - 2);
            name.push_str(&"a".repeat(take));
            name.push('.');
            left -= take + 1;
        }
        name.push_str(&"a".repeat(left));
        name
    }

    #[test]
    fn name_of_len_builds_what_it_says() {
        for len in [1, 62, 63, 64, 65, 127, 128, 252, 253, 254, 255] {
            let name = name_of_len(len);
            assert_eq!(name.len(), len, "{name}");
            assert!(name.split('.').all(|l| (1..=MAX_LABEL_LEN).contains(&l.len())), "{name}");
        }
    }

    #[test]
    fn shared_table() {
        let mut rows = 0;
        let mut failures = Vec::new();
        for (line_no, line) in SNI_NAMES.lines().enumerate() {
            let line = line.trim_end_matches('\r');
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            rows += 1;
            let fields: Vec<&str> = line.split('\t').collect();
            let [sni, class, normalised, why] = fields[..] else {
                failures.push(format!("line {}: not 4 tab-separated fields", line_no + 1));
                continue;
            };
            let got = normalise(sni.as_bytes());
            let ok = match class {
                "allow-form" => got.is_ok_and(|name| name == normalised),
                "invalid" => got.is_err(),
                _ => {
                    failures.push(format!("line {}: unknown class {class:?}", line_no + 1));
                    continue;
                }
            };
            if !ok {
                failures.push(format!("{why}: {sni:?} is {class} but normalise gave {got:?}"));
            }
        }
        assert!(rows > 0, "t/data/sni-names.tsv has no rows");
        assert!(failures.is_empty(), "failed rows:\n{}", failures.join("\n"));
    }

    #[test]
    fn policy_edges() {
        let at_limit = name_of_len(MAX_NAME_LEN);
        let over_limit = name_of_len(MAX_NAME_LEN + 1);
        let label_63 = format!("{}.example", "a".repeat(63));
        let label_64 = format!("{}.example", "a".repeat(64));
        let last_label_64 = format!("example.{}", "B".repeat(64));
        let upper_limit = at_limit.to_ascii_uppercase();
        let cases: Vec<(Vec<u8>, Result<&str, Invalid>)> = vec![
            (b"localhost".to_vec(), Ok("localhost")),
            (b"LOCALHOST.".to_vec(), Ok("localhost")),
            (b"a".to_vec(), Ok("a")),
            (b"123.example".to_vec(), Ok("123.example")),
            (b"example.1a".to_vec(), Ok("example.1a")),
            (b"example.a1".to_vec(), Ok("example.a1")),
            (b"1.2.3.com".to_vec(), Ok("1.2.3.com")),
            (b"a-b.example".to_vec(), Ok("a-b.example")),
            (b"a--b.example".to_vec(), Ok("a--b.example")),
            (b"xn--bcher-kva.example".to_vec(), Ok("xn--bcher-kva.example")),
            (b"www.xn--fiqs8s".to_vec(), Ok("www.xn--fiqs8s")),
            (b"0-0.example".to_vec(), Ok("0-0.example")),
            (label_63.clone().into_bytes(), Ok(&label_63)),
            (at_limit.clone().into_bytes(), Ok(&at_limit)),
            (format!("{at_limit}.").into_bytes(), Ok(&at_limit)),
            (upper_limit.into_bytes(), Ok(&at_limit)),
            (b"".to_vec(), Err(Invalid::Empty)),
            (b".".to_vec(), Err(Invalid::Empty)),
            (b"..".to_vec(), Err(Invalid::EmptyLabel)),
            (b".example".to_vec(), Err(Invalid::EmptyLabel)),
            (b"a..b".to_vec(), Err(Invalid::EmptyLabel)),
            (b"example..".to_vec(), Err(Invalid::EmptyLabel)),
            (over_limit.clone().into_bytes(), Err(Invalid::TooLong)),
            (format!("{over_limit}.").into_bytes(), Err(Invalid::TooLong)),
            // Length is judged before labels: dropping one dot still leaves 254 bytes.
            (format!("{at_limit}..").into_bytes(), Err(Invalid::TooLong)),
            (vec![b'_'; 300], Err(Invalid::TooLong)),
            (label_64.into_bytes(), Err(Invalid::LabelTooLong)),
            (last_label_64.into_bytes(), Err(Invalid::LabelTooLong)),
            (b"_dmarc.example".to_vec(), Err(Invalid::Underscore)),
            (b"a_b.example".to_vec(), Err(Invalid::Underscore)),
            (b"example.com_".to_vec(), Err(Invalid::Underscore)),
            (b"_".to_vec(), Err(Invalid::Underscore)),
            (b"-a.example".to_vec(), Err(Invalid::Hyphen)),
            (b"a-.example".to_vec(), Err(Invalid::Hyphen)),
            (b"example.com-".to_vec(), Err(Invalid::Hyphen)),
            (b"example.-com".to_vec(), Err(Invalid::Hyphen)),
            (b"xn--.example".to_vec(), Err(Invalid::Hyphen)),
            (b"-".to_vec(), Err(Invalid::Hyphen)),
            (b"-.".to_vec(), Err(Invalid::Hyphen)),
            (b"52.57.163.17".to_vec(), Err(Invalid::IpLiteral)),
            (b"52.57.163.17.".to_vec(), Err(Invalid::IpLiteral)),
            (b"example.123".to_vec(), Err(Invalid::IpLiteral)),
            (b"3232235521".to_vec(), Err(Invalid::IpLiteral)),
            (b"2001:db8::1".to_vec(), Err(Invalid::IpLiteral)),
            (b"[2001:db8::1]".to_vec(), Err(Invalid::IpLiteral)),
            (b"::ffff:52.57.163.17".to_vec(), Err(Invalid::IpLiteral)),
            (b"example.com:443".to_vec(), Err(Invalid::IpLiteral)),
            (b"a]".to_vec(), Err(Invalid::IpLiteral)),
            (b"a\0b.example".to_vec(), Err(Invalid::BadByte)),
            (b"example.com\0".to_vec(), Err(Invalid::BadByte)),
            (b"b\x80cher.example".to_vec(), Err(Invalid::BadByte)),
            (b"\xffexample.com".to_vec(), Err(Invalid::BadByte)),
            ("bücher.example".as_bytes().to_vec(), Err(Invalid::BadByte)),
            (b"a b.example".to_vec(), Err(Invalid::BadByte)),
            (b" example.com".to_vec(), Err(Invalid::BadByte)),
            (b"a\tb.example".to_vec(), Err(Invalid::BadByte)),
            (b"example.com\x7f".to_vec(), Err(Invalid::BadByte)),
            (b"*.example.com".to_vec(), Err(Invalid::BadByte)),
            (b"example.com/x".to_vec(), Err(Invalid::BadByte)),
            (b"a@b.example".to_vec(), Err(Invalid::BadByte)),
        ];
        for (raw, want) in cases {
            let got = normalise(&raw);
            let same = match (&got, want) {
                (Ok(name), Ok(want)) => name == want,
                (Err(got), Err(want)) => *got == want,
                _ => false,
            };
            assert!(same, "{:?}: want {want:?}, got {got:?}", String::from_utf8_lossy(&raw));
        }
    }

    #[test]
    fn length_limits_around_the_boundaries() {
        for len in MAX_NAME_LEN - 3..=MAX_NAME_LEN + 3 {
            let name = name_of_len(len);
            for raw in [name.clone(), format!("{name}.")] {
                let got = normalise(raw.as_bytes());
                if len <= MAX_NAME_LEN {
                    assert!(got.is_ok_and(|n| n == name.as_str()), "{len}: {got:?}");
                } else {
                    assert_eq!(got, Err(Invalid::TooLong), "{len}");
                }
            }
        }
        for label_len in MAX_LABEL_LEN - 2..=MAX_LABEL_LEN + 2 {
            let name = labels('x', label_len, 2);
            let got = normalise(name.as_bytes());
            if label_len <= MAX_LABEL_LEN {
                assert!(got.is_ok_and(|n| n.len() == 2 * label_len + 1), "{label_len}: {got:?}");
            } else {
                assert_eq!(got, Err(Invalid::LabelTooLong), "{label_len}");
            }
        }
    }

    #[test]
    fn name_accessors_and_formatting() {
        let Ok(name) = normalise(b"WWW.Example.COM.") else {
            panic!("a plain name was refused");
        };
        assert_eq!(name.as_str(), "www.example.com");
        assert_eq!(name.as_bytes(), b"www.example.com");
        assert_eq!(name.len(), 15);
        assert_eq!(name.to_string(), "www.example.com");
        assert_eq!(format!("{name:?}"), "\"www.example.com\"");
        assert_eq!(format!("[{name:>17}]"), "[  www.example.com]");
        assert_eq!("www.EXAMPLE.com".parse::<Name>(), Ok(name));
        assert_eq!("www_x.example".parse::<Name>(), Err(Invalid::Underscore));
        assert_eq!(Invalid::LabelTooLong.to_string(), "label longer than 63 bytes");
        assert_eq!(ExtError::Truncated.to_string(), "truncated server_name extension");
    }

    #[test]
    fn equal_names_hash_equal_whatever_the_raw_form() {
        use std::collections::HashSet;
        let mut set = HashSet::new();
        for raw in ["example.com", "EXAMPLE.COM", "Example.Com.", "example.com."] {
            let Ok(name) = normalise(raw.as_bytes()) else {
                panic!("{raw} was refused");
            };
            set.insert(name);
        }
        // A longer name normalised into a fresh buffer must not equal a shorter one.
        let Ok(other) = normalise(b"example.co") else {
            panic!("example.co was refused");
        };
        set.insert(other);
        assert_eq!(set.len(), 2, "{set:?}");
    }

    #[test]
    fn reasons_are_short_lowercase_and_unterminated() {
        let invalid = [
            Invalid::Empty,
            Invalid::TooLong,
            Invalid::EmptyLabel,
            Invalid::LabelTooLong,
            Invalid::IpLiteral,
            Invalid::Underscore,
            Invalid::Hyphen,
            Invalid::BadByte,
        ];
        let ext = [
            ExtError::Truncated,
            ExtError::LengthMismatch,
            ExtError::EmptyList,
            ExtError::NotHostName,
            ExtError::TrailingData,
            ExtError::EmptyName,
        ];
        let reasons: Vec<&str> =
            invalid.iter().map(|e| e.as_str()).chain(ext.iter().map(|e| e.as_str())).collect();
        for reason in &reasons {
            assert!(!reason.is_empty() && !reason.ends_with('.'), "{reason:?}");
            assert!(!reason.bytes().any(|b| b.is_ascii_uppercase()), "{reason:?}");
        }
        let distinct: std::collections::HashSet<_> = reasons.iter().collect();
        assert_eq!(distinct.len(), reasons.len(), "two errors share a reason");
    }

    /// A server_name extension body holding `entries` as (name_type, host name) pairs.
    fn ext_with(entries: &[(u8, &[u8])]) -> Vec<u8> {
        let mut list = Vec::new();
        for (name_type, name) in entries {
            list.push(*name_type);
            list.extend_from_slice(&u16::try_from(name.len()).unwrap_or(u16::MAX).to_be_bytes());
            list.extend_from_slice(name);
        }
        let mut ext = u16::try_from(list.len()).unwrap_or(u16::MAX).to_be_bytes().to_vec();
        ext.extend_from_slice(&list);
        ext
    }

    /// (what the case is, extension body, expected result)
    type ExtCase<'a> = (&'a str, Vec<u8>, Result<&'a [u8], ExtError>);

    #[test]
    fn server_name_ext_table() {
        let good = ext_with(&[(0, b"example.com")]);
        let long_name = vec![b'a'; usize::from(u16::MAX) - 3];
        let mut list_len_long = good.clone();
        list_len_long[1] += 1;
        let mut list_len_short = good.clone();
        list_len_short[1] -= 1;
        let mut trailing_outside = good.clone();
        trailing_outside.push(0);
        let mut trailing_inside = good.clone();
        trailing_inside[1] += 1;
        trailing_inside.push(0);
        let mut name_len_long = good.clone();
        name_len_long[4] += 1;
        let cases: Vec<ExtCase<'_>> = vec![
            ("well formed", good.clone(), Ok(b"example.com")),
            ("one-byte name", ext_with(&[(0, b"a")]), Ok(b"a")),
            ("largest possible list", ext_with(&[(0, &long_name)]), Ok(&long_name)),
            ("bytes are passed through", ext_with(&[(0, b"A_\0\xff")]), Ok(b"A_\0\xff")),
            ("empty", vec![], Err(ExtError::Truncated)),
            ("half a list length", vec![0], Err(ExtError::Truncated)),
            ("empty list", vec![0, 0], Err(ExtError::EmptyList)),
            ("list length too long", list_len_long, Err(ExtError::Truncated)),
            ("list length too short", list_len_short, Err(ExtError::LengthMismatch)),
            ("byte after the list", trailing_outside, Err(ExtError::LengthMismatch)),
            ("byte after the name in the list", trailing_inside, Err(ExtError::TrailingData)),
            ("name length too long", name_len_long, Err(ExtError::Truncated)),
            (
                "two entries",
                ext_with(&[(0, b"a.example"), (0, b"b.example")]),
                Err(ExtError::TrailingData),
            ),
            ("name_type 1", ext_with(&[(1, b"example.com")]), Err(ExtError::NotHostName)),
            ("name_type 255", ext_with(&[(255, b"example.com")]), Err(ExtError::NotHostName)),
            ("zero-length name", ext_with(&[(0, b"")]), Err(ExtError::EmptyName)),
            ("type only", vec![0, 1, 0], Err(ExtError::Truncated)),
            ("half a name length", vec![0, 2, 0, 0], Err(ExtError::Truncated)),
            ("0xffff list length", vec![0xff, 0xff, 0, 0, 1, b'a'], Err(ExtError::Truncated)),
            ("0xffff name length", vec![0, 3, 0, 0xff, 0xff], Err(ExtError::Truncated)),
            ("0xffff both", vec![0xff, 0xff, 0, 0xff, 0xff], Err(ExtError::Truncated)),
        ];
        for (what, ext, want) in cases {
            assert_eq!(parse_server_name_ext(&ext), want, "{what}");
        }
    }

    #[test]
    fn server_name_ext_truncated_anywhere() {
        for name in [&b"example.com"[..], b"a", &[b'x'; 255]] {
            let ext = ext_with(&[(0, name)]);
            assert_eq!(parse_server_name_ext(&ext), Ok(name));
            for cut in 0..ext.len() {
                let got = parse_server_name_ext(&ext[..cut]);
                // Cutting exactly after the list length leaves a list declared non-empty.
                assert_eq!(got, Err(ExtError::Truncated), "{} bytes of {}", cut, ext.len());
            }
        }
    }

    /// (raw SNI, key nginx would use, whether the key is a fresh lower-cased copy)
    type KeyCase = (&'static [u8], Option<&'static [u8]>, bool);

    #[test]
    fn selection_key_table() {
        let cases: &[KeyCase] = &[
            (b"example.com", Some(b"example.com"), false),
            (b"Example.COM", Some(b"example.com"), true),
            (b"A", Some(b"a"), true),
            (b"example.com:443", Some(b"example.com"), false),
            (b"EXAMPLE.com.:443", Some(b"example.com"), true),
            (b"a:b:c", Some(b"a"), false),
            (b"a.b:c.d.", Some(b"a.b"), false),
            (b"a.:b.", Some(b"a."), false),
            (b"[::1]:443", Some(b"[::1]"), false),
            (b"[::1]", Some(b"[::1]"), false),
            (b"[::1].", Some(b"[::1]"), false),
            (b"[::1", Some(b"[::1"), false),
            (b"[a]b]", Some(b"[a]"), false),
            (b"x[y]", Some(b"x[y]"), false),
            (b"x[y]z", Some(b"x[y]z"), false),
            (b"x[y:1", Some(b"x[y"), false),
            (b"a:[b]", Some(b"a"), false),
            (b"x]:1", Some(b"x]"), false),
            (b"example.com.", Some(b"example.com"), false),
            (b".example.com", Some(b".example.com"), false),
            (b"_dmarc.example", Some(b"_dmarc.example"), false),
            (b"*.example", Some(b"*.example"), false),
            (b"b\xc3\xbccher.example", Some(b"b\xc3\xbccher.example"), false),
            (b"\x80\xff", Some(b"\x80\xff"), false),
            (b"\xc3\x9cBER", Some(b"\xc3\x9cber"), true),
            (b"52.57.163.17", Some(b"52.57.163.17"), false),
            (b"a..b", None, false),
            (b"example.com..", None, false),
            (b"..", None, false),
            (b"a:443..", None, false),
            (b"[::1]..", None, false),
            (b".", None, false),
            (b".:443", None, false),
            (b"", None, false),
            (b":443", None, false),
            (b"::1", None, false),
            (b"a/b", None, false),
            (b"example.com:443/", None, false),
            (b"a b", None, false),
            (b"a\0b", None, false),
            (b"a\tb", None, false),
            (b"\x1f", None, false),
            (b"a\x7f", None, false),
        ];
        for &(raw, want, owned) in cases {
            let got = selection_key(raw);
            let what = String::from_utf8_lossy(raw);
            assert_eq!(got.as_deref(), want, "{what:?}");
            if let Some(key) = got {
                assert_eq!(matches!(key, Cow::Owned(_)), owned, "{what:?}: borrowed or owned");
            }
        }
    }

    /// Everything `normalise` must guarantee of any input, checked against the reference
    /// implementation and against nginx's own key for the same bytes.
    fn check_invariants(raw: &[u8]) {
        let got = normalise(raw);
        let want = reference_normalise(raw);
        let what = String::from_utf8_lossy(raw);
        assert_eq!(got.ok().map(|n| n.as_str().to_owned()), want, "{what:?}: {got:?}");
        let key = selection_key(raw);
        if let Some(key) = &key {
            assert!(key.len() <= raw.len(), "{what:?}: key longer than the name");
            assert!(!key.iter().any(u8::is_ascii_uppercase), "{what:?}: key not folded");
        }
        if let Ok(name) = got {
            assert!(
                name.as_bytes()
                    .iter()
                    .all(|&b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'-')),
                "{what:?} gave {name:?}"
            );
            assert_eq!(normalise(name.as_bytes()), Ok(name), "{what:?}: not idempotent");
            // The module looks up `name` but nginx picks the server by its own key: the two
            // must agree on every name the module lets through.
            assert_eq!(key.as_deref(), Some(name.as_bytes()), "{what:?}: keys differ");
        }
    }

    #[test]
    fn all_one_and_two_byte_inputs() {
        for a in 0..=u8::MAX {
            check_invariants(&[a]);
            for b in 0..=u8::MAX {
                check_invariants(&[a, b]);
            }
        }
    }

    #[test]
    fn all_short_inputs_over_an_awkward_alphabet() {
        const ALPHABET: &[u8] = b"aZ09-._:[]\0\x80";
        let mut raw = Vec::new();
        for len in 1..=5u32 {
            let base = ALPHABET.len();
            for mut index in 0..base.pow(len) {
                raw.clear();
                for _ in 0..len {
                    raw.push(ALPHABET[index % base]);
                    index /= base;
                }
                check_invariants(&raw);
            }
        }
    }

    #[test]
    fn random_inputs_never_panic_and_keep_invariants() {
        // xorshift: deterministic, so a failure reproduces.
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        const BIASED: &[u8] = b"abcXYZ0189-.-._:[]\0\x80 ";
        for _ in 0..20_000 {
            let len = usize::try_from(next() % 270).unwrap_or(0);
            let biased = next() % 4 != 0;
            let raw: Vec<u8> = (0..len)
                .map(|_| {
                    let r = next();
                    if biased {
                        BIASED[usize::try_from(r % BIASED.len() as u64).unwrap_or(0)]
                    } else {
                        r.to_le_bytes()[0]
                    }
                })
                .collect();
            check_invariants(&raw);
            if let Ok(name) = parse_server_name_ext(&raw) {
                assert_eq!(raw.len(), name.len() + 5, "{raw:?}");
            }
        }
    }
}
