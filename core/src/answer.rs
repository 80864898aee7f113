//! What a lookup service reply means: the status code and the optional JSON body turned into
//! an [`Answer`], or a [`LookupError`] that says why there is no answer.
//!
//! The contract is the one of Caddy's on-demand TLS "ask" endpoint: 2xx means registered,
//! 403, 404 and 410 mean not registered, everything else is an error. A JSON object body may
//! carry `ttl`, the number of seconds the answer may be cached.

use std::fmt;

/// Longest cache lifetime a reply may ask for: one week.
pub const MAX_TTL: u32 = 604_800;

/// The lookup service's verdict on one name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// The name is registered; the handshake may go on.
    Registered {
        /// Seconds to cache this answer, when the reply said so (0 = do not cache).
        ttl: Option<u32>,
    },
    /// The name is not registered; the handshake is refused.
    NotRegistered {
        /// Seconds to cache this answer, when the reply said so (0 = do not cache).
        ttl: Option<u32>,
    },
}

impl Answer {
    /// Whether the name is registered.
    pub fn is_registered(&self) -> bool {
        matches!(self, Answer::Registered { .. })
    }

    /// The cache lifetime the reply asked for, if any.
    pub fn ttl(&self) -> Option<u32> {
        match *self {
            Answer::Registered { ttl } | Answer::NotRegistered { ttl } => ttl,
        }
    }
}

/// Why a lookup produced no answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LookupError {
    /// The whole lookup did not finish within its time budget.
    Timeout,
    /// The service refused the connection.
    Refused,
    /// The service reset or aborted the connection.
    Reset,
    /// The service closed the connection before the reply was complete.
    Closed,
    /// Connecting failed for a reason other than a refusal or a timeout.
    Connect(String),
    /// The service answered with a redirect, which is never followed.
    Redirect(u16),
    /// The service answered with a status that is neither an answer nor a redirect.
    Status(u16),
    /// The reply broke HTTP or the JSON contract.
    Malformed(String),
    /// The reply's header block or body is larger than allowed.
    TooLarge,
    /// TLS with the service failed (handshake, certificate, alert).
    Tls(String),
    /// Any other input/output failure.
    Io(String),
    /// The request could not be made at all; a bug or a configuration the client cannot use.
    Internal(String),
}

impl fmt::Display for LookupError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LookupError::Timeout => f.write_str("timed out"),
            LookupError::Refused => f.write_str("connection refused"),
            LookupError::Reset => f.write_str("connection reset"),
            LookupError::Closed => f.write_str("connection closed prematurely"),
            LookupError::Connect(m) => write!(f, "connect failed: {m}"),
            LookupError::Redirect(code) => write!(f, "redirect {code} not followed"),
            LookupError::Status(code) => write!(f, "unexpected status {code}"),
            LookupError::Malformed(m) => write!(f, "malformed reply: {m}"),
            LookupError::TooLarge => f.write_str("reply too large"),
            LookupError::Tls(m) => write!(f, "tls failure: {m}"),
            LookupError::Io(m) => write!(f, "i/o error: {m}"),
            LookupError::Internal(m) => write!(f, "internal error: {m}"),
        }
    }
}

impl std::error::Error for LookupError {}

/// Turns a complete reply into an answer.
///
/// `content_type` is the raw `Content-Type` header value, `body` the whole body (already
/// bounded by the caller). The body is only looked at for answers, and only when it is JSON.
pub fn classify(
    status: u16,
    content_type: Option<&str>,
    body: &[u8],
) -> Result<Answer, LookupError> {
    let registered = match status {
        200..=299 => true,
        403 | 404 | 410 => false,
        301 | 302 | 303 | 307 | 308 => return Err(LookupError::Redirect(status)),
        _ => return Err(LookupError::Status(status)),
    };
    let ttl = match content_type {
        Some(ct) if is_json(ct) => ttl_from_json(body)?,
        _ => None,
    };
    Ok(if registered { Answer::Registered { ttl } } else { Answer::NotRegistered { ttl } })
}

/// `application/json` or any `type/subtype+json`, parameters ignored, case-insensitive.
fn is_json(content_type: &str) -> bool {
    let media = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    let Some((kind, subtype)) = media.split_once('/') else {
        return false;
    };
    if kind.is_empty() || subtype.is_empty() {
        return false;
    }
    media == "application/json" || (subtype.ends_with("+json") && subtype.len() > "+json".len())
}

fn ttl_from_json(body: &[u8]) -> Result<Option<u32>, LookupError> {
    // Some services start JSON with a UTF-8 byte order mark; JSON itself does not allow one.
    let body = body.strip_prefix(b"\xef\xbb\xbf").unwrap_or(body);
    // A body of only whitespace (a service that prints an empty line) counts as no body.
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    let value: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| LookupError::Malformed(format!("invalid json: {e}")))?;
    let serde_json::Value::Object(members) = value else {
        return Err(LookupError::Malformed("json body is not an object".into()));
    };
    let ttl = match members.get("ttl") {
        None | Some(serde_json::Value::Null) => return Ok(None),
        Some(ttl) => ttl,
    };
    // JSON has one number type: 3600, 3600.0 and 3.6e3 are all the same whole number.
    let seconds = ttl.as_u64().or_else(|| {
        ttl.as_f64()
            .filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f <= u32::MAX as f64)
            .map(|f| f as u64)
    });
    match seconds.map(u32::try_from) {
        Some(Ok(seconds)) if seconds <= MAX_TTL => Ok(Some(seconds)),
        Some(_) => Err(LookupError::Malformed(format!("ttl above {MAX_TTL}"))),
        None => Err(LookupError::Malformed(format!("ttl is not a non-negative integer: {ttl}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const JSON: Option<&str> = Some("application/json");

    fn reg(ttl: Option<u32>) -> Result<Answer, LookupError> {
        Ok(Answer::Registered { ttl })
    }

    fn unreg(ttl: Option<u32>) -> Result<Answer, LookupError> {
        Ok(Answer::NotRegistered { ttl })
    }

    type Outcome = Result<Answer, LookupError>;

    fn malformed() -> Result<Answer, LookupError> {
        Err(LookupError::Malformed(String::new()))
    }

    /// Malformed messages are free text; compare the variant only.
    fn same(got: &Result<Answer, LookupError>, want: &Result<Answer, LookupError>) -> bool {
        match (got, want) {
            (Err(LookupError::Malformed(_)), Err(LookupError::Malformed(_))) => true,
            _ => got == want,
        }
    }

    #[test]
    fn statuses_without_body() {
        let cases: &[(u16, Result<Answer, LookupError>)] = &[
            (100, Err(LookupError::Status(100))),
            (101, Err(LookupError::Status(101))),
            (103, Err(LookupError::Status(103))),
            (199, Err(LookupError::Status(199))),
            (200, reg(None)),
            (201, reg(None)),
            (204, reg(None)),
            (299, reg(None)),
            (300, Err(LookupError::Status(300))),
            (301, Err(LookupError::Redirect(301))),
            (302, Err(LookupError::Redirect(302))),
            (303, Err(LookupError::Redirect(303))),
            (304, Err(LookupError::Status(304))),
            (307, Err(LookupError::Redirect(307))),
            (308, Err(LookupError::Redirect(308))),
            (399, Err(LookupError::Status(399))),
            (400, Err(LookupError::Status(400))),
            (401, Err(LookupError::Status(401))),
            (403, unreg(None)),
            (404, unreg(None)),
            (405, Err(LookupError::Status(405))),
            (410, unreg(None)),
            (429, Err(LookupError::Status(429))),
            (500, Err(LookupError::Status(500))),
            (502, Err(LookupError::Status(502))),
            (503, Err(LookupError::Status(503))),
            (0, Err(LookupError::Status(0))),
            (999, Err(LookupError::Status(999))),
        ];
        for (status, want) in cases {
            let got = classify(*status, None, b"");
            assert_eq!(&got, want, "status {status}");
            // A body that is not JSON never changes the verdict.
            let got = classify(*status, Some("text/plain"), b"{\"ttl\": 5}");
            assert_eq!(&got, want, "status {status} with text body");
        }
    }

    #[test]
    fn json_bodies() {
        let cases: &[(u16, Option<&str>, &str, Outcome)] = &[
            (200, JSON, "", reg(None)),
            (200, JSON, " \r\n", reg(None)),
            (200, JSON, "{}", reg(None)),
            (200, JSON, r#"{"ttl": 0}"#, reg(Some(0))),
            (200, JSON, r#"{"ttl": 300}"#, reg(Some(300))),
            (200, JSON, r#"{"ttl": 604800}"#, reg(Some(MAX_TTL))),
            (200, JSON, r#"{"ttl": 604801}"#, malformed()),
            (200, JSON, r#"{"ttl": 18446744073709551616}"#, malformed()),
            (200, JSON, r#"{"ttl": -1}"#, malformed()),
            (200, JSON, r#"{"ttl": 1.5}"#, malformed()),
            (200, JSON, r#"{"ttl": 300.0}"#, reg(Some(300))),
            (200, JSON, r#"{"ttl": 3e2}"#, reg(Some(300))),
            (200, JSON, r#"{"ttl": "300"}"#, malformed()),
            (200, JSON, r#"{"ttl": null}"#, reg(None)),
            (200, JSON, r#"{"ttl": 3600.0}"#, reg(Some(3600))),
            (200, JSON, r#"{"ttl": 3.6e3}"#, reg(Some(3600))),
            (200, JSON, r#"{"ttl": -0.0}"#, reg(Some(0))),
            (200, JSON, "\u{feff}{\"ttl\": 7}", reg(Some(7))),
            (200, JSON, r#"{"ttl": 1e300}"#, malformed()),
            (200, JSON, r#"{"ttl": true}"#, malformed()),
            (200, JSON, r#"{"ttl": [300]}"#, malformed()),
            (200, JSON, r#"{"ok": true, "note": "x", "ttl": 60}"#, reg(Some(60))),
            (200, JSON, r#"{"TTL": 60}"#, reg(None)),
            (200, JSON, "[]", malformed()),
            (200, JSON, "300", malformed()),
            (200, JSON, "\"ok\"", malformed()),
            (200, JSON, "null", malformed()),
            (200, JSON, "{", malformed()),
            (200, JSON, "{} {}", malformed()),
            (200, JSON, "ok", malformed()),
            (404, JSON, r#"{"ttl": 30}"#, unreg(Some(30))),
            (403, JSON, r#"{"ttl": 0}"#, unreg(Some(0))),
            (410, JSON, "[]", malformed()),
            (404, JSON, r#"{"ttl": -5}"#, malformed()),
            // Error replies are errors whatever their body says.
            (500, JSON, r#"{"ttl": 30}"#, Err(LookupError::Status(500))),
            (500, JSON, "not json", Err(LookupError::Status(500))),
            (302, JSON, "[]", Err(LookupError::Redirect(302))),
            // Content types.
            (200, Some("application/json; charset=utf-8"), r#"{"ttl": 7}"#, reg(Some(7))),
            (200, Some("Application/JSON ;charset=UTF-8"), r#"{"ttl": 7}"#, reg(Some(7))),
            (200, Some("application/problem+json"), r#"{"ttl": 8}"#, reg(Some(8))),
            (404, Some("application/problem+json"), "[]", malformed()),
            (200, Some("application/vnd.x+json; v=1"), r#"{"ttl": 9}"#, reg(Some(9))),
            (200, Some("text/plain"), "[]", reg(None)),
            (200, Some("text/plain"), r#"{"ttl": 9}"#, reg(None)),
            (200, Some("text/html"), "<html>", reg(None)),
            (200, Some("application/jsonx"), "[]", reg(None)),
            (200, Some("application/json-seq"), "[]", reg(None)),
            (200, Some("application/+json"), "[]", reg(None)),
            (200, Some("+json"), "[]", reg(None)),
            (200, Some("/json"), "[]", reg(None)),
            (200, Some(""), "[]", reg(None)),
            (200, None, "[]", reg(None)),
        ];
        for (status, ct, body, want) in cases {
            let got = classify(*status, *ct, body.as_bytes());
            assert!(same(&got, want), "{status} {ct:?} {body:?}: got {got:?}, want {want:?}");
        }
    }

    #[test]
    fn invalid_utf8_json_is_malformed() {
        let got = classify(200, JSON, b"{\"ttl\": \xff}");
        assert!(same(&got, &malformed()), "{got:?}");
    }

    #[test]
    fn deeply_nested_json_is_malformed_not_a_crash() {
        let body = "[".repeat(100_000);
        assert!(same(&classify(200, JSON, body.as_bytes()), &malformed()));
    }

    #[test]
    fn answer_accessors() {
        let cases = [
            (Answer::Registered { ttl: None }, true, None),
            (Answer::Registered { ttl: Some(3) }, true, Some(3)),
            (Answer::NotRegistered { ttl: None }, false, None),
            (Answer::NotRegistered { ttl: Some(0) }, false, Some(0)),
        ];
        for (answer, registered, ttl) in cases {
            assert_eq!(answer.is_registered(), registered, "{answer:?}");
            assert_eq!(answer.ttl(), ttl, "{answer:?}");
        }
    }

    #[test]
    fn error_messages() {
        let cases = [
            (LookupError::Timeout, "timed out"),
            (LookupError::Refused, "connection refused"),
            (LookupError::Reset, "connection reset"),
            (LookupError::Closed, "connection closed prematurely"),
            (LookupError::Connect("no route".into()), "connect failed: no route"),
            (LookupError::Redirect(302), "redirect 302 not followed"),
            (LookupError::Status(500), "unexpected status 500"),
            (
                LookupError::Malformed("json body is not an object".into()),
                "malformed reply: json body is not an object",
            ),
            (LookupError::TooLarge, "reply too large"),
            (LookupError::Tls("bad certificate".into()), "tls failure: bad certificate"),
            (LookupError::Io("broken".into()), "i/o error: broken"),
            (LookupError::Internal("x".into()), "internal error: x"),
        ];
        for (err, text) in cases {
            assert_eq!(err.to_string(), text);
        }
    }
}
