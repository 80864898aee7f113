//! How one connection attempt ended, in the three classes the report counts.

use std::fmt;
use std::io;

use crate::hello::ReplyError;

#[derive(Debug)]
pub enum Outcome {
    /// full mode: handshake done (and, with --request, a 200 answer read to EOF);
    /// hello mode: the server answered with ServerHello.
    Completed,
    /// The server sent an alert with this description number (e.g. 112 unrecognized_name).
    Alert(u8),
    Failed(Failure),
}

/// Why an attempt that is neither a completion nor an alert ended.
#[derive(Debug)]
pub enum Failure {
    Connect(io::Error),
    Timeout(Phase),
    /// The server closed the connection without an alert.
    Eof(Phase),
    Io(Phase, io::Error),
    Tls(rustls::Error),
    /// Hello mode: a reply that is not a TLS handshake or alert record.
    Reply(ReplyError),
    /// --request: an answer that does not start with "HTTP/1.1 200"; holds its first line.
    Http(String),
    /// A name this client cannot send; names are checked before the run, so this is a bug.
    Name(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Connect,
    Handshake,
    Request,
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Phase::Connect => "connect",
            Phase::Handshake => "handshake",
            Phase::Request => "request",
        })
    }
}

impl Failure {
    /// Sorts an I/O error by what it means for the attempt.
    pub fn from_io(phase: Phase, e: io::Error) -> Failure {
        match e.kind() {
            io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => Failure::Timeout(phase),
            io::ErrorKind::UnexpectedEof => Failure::Eof(phase),
            _ if phase == Phase::Connect => Failure::Connect(e),
            _ => Failure::Io(phase, e),
        }
    }

    /// The key under which the report counts this failure in `error_kinds`.
    pub fn kind(&self) -> &'static str {
        match self {
            Failure::Connect(_) => "connect",
            Failure::Timeout(_) => "timeout",
            Failure::Eof(_) => "eof",
            Failure::Io(..) => "io",
            Failure::Tls(_) => "tls",
            Failure::Reply(ReplyError::Eof { .. }) => "eof",
            Failure::Reply(ReplyError::Io(e)) if e.kind() == io::ErrorKind::TimedOut => "timeout",
            Failure::Reply(ReplyError::Io(_)) => "io",
            Failure::Reply(_) => "protocol",
            Failure::Http(_) => "http",
            Failure::Name(_) => "name",
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Connect(e) => write!(f, "connect: {e}"),
            Failure::Timeout(phase) => write!(f, "{phase}: timed out"),
            Failure::Eof(phase) => write!(f, "{phase}: connection closed by server without alert"),
            Failure::Io(phase, e) => write!(f, "{phase}: {e}"),
            Failure::Tls(e) => write!(f, "tls: {e}"),
            Failure::Reply(e) => write!(f, "handshake: {e}"),
            Failure::Http(line) => write!(f, "request: answer {line:?} is not HTTP/1.1 200"),
            Failure::Name(why) => write!(f, "name: {why}"),
        }
    }
}

/// What stops an attempt early; `?` turns failures into it.
#[derive(Debug)]
pub enum Stop {
    Alert(u8),
    Failed(Failure),
}

impl From<Failure> for Stop {
    fn from(f: Failure) -> Self {
        Stop::Failed(f)
    }
}

impl From<Result<(), Stop>> for Outcome {
    fn from(r: Result<(), Stop>) -> Self {
        match r {
            Ok(()) => Outcome::Completed,
            Err(Stop::Alert(n)) => Outcome::Alert(n),
            Err(Stop::Failed(f)) => Outcome::Failed(f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_errors_by_phase() {
        use io::ErrorKind as K;
        let cases = [
            (Phase::Connect, K::ConnectionRefused, "connect"),
            (Phase::Connect, K::TimedOut, "timeout"),
            (Phase::Handshake, K::WouldBlock, "timeout"),
            (Phase::Handshake, K::UnexpectedEof, "eof"),
            (Phase::Handshake, K::ConnectionReset, "io"),
            (Phase::Request, K::BrokenPipe, "io"),
        ];
        for (phase, kind, want) in cases {
            assert_eq!(
                Failure::from_io(phase, io::Error::from(kind)).kind(),
                want,
                "{phase} {kind}"
            );
        }
    }

    #[test]
    fn reply_errors() {
        let cases = [
            (ReplyError::Eof { got: 0 }, "eof"),
            (ReplyError::Io(io::Error::from(io::ErrorKind::TimedOut)), "timeout"),
            (ReplyError::Io(io::Error::from(io::ErrorKind::ConnectionReset)), "io"),
            (ReplyError::UnexpectedRecord(72), "protocol"),
            (ReplyError::BadAlertLength(3), "protocol"),
        ];
        for (e, want) in cases {
            let text = e.to_string();
            assert_eq!(Failure::Reply(e).kind(), want, "{text}");
        }
    }

    #[test]
    fn outcomes_from_results() {
        type Want = fn(&Outcome) -> bool;
        let cases: [(Result<(), Stop>, Want); 3] = [
            (Ok(()), |o| matches!(o, Outcome::Completed)),
            (Err(Stop::Alert(112)), |o| matches!(o, Outcome::Alert(112))),
            (Err(Failure::Eof(Phase::Handshake).into()), |o| {
                matches!(o, Outcome::Failed(Failure::Eof(Phase::Handshake)))
            }),
        ];
        for (r, want) in cases {
            let text = format!("{r:?}");
            assert!(want(&Outcome::from(r)), "{text}");
        }
    }
}
