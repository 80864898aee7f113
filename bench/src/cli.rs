//! Command line of `sni-load`: parsing and validation, nothing else.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

pub const USAGE: &str = "\
usage: sni-load --addr IP:PORT --mode full|hello --names SPEC --duration SECS [--max N]
                [--concurrency C] [--rate R] [--tls12] [--source IP] [--request] [--timeout MS]

  --addr IP:PORT     server to connect to; loopback addresses only
  --mode full        real TLS client (rustls): full handshake, certificate not verified
  --mode hello       send one pre-built TLS 1.3 ClientHello, read the first reply record
  --names SPEC       NAME | @FILE (one name a line, round-robin) | random:PREFIX
                     (PREFIX-<thread>-<counter>-<8 hex>.example, never repeated in a run)
  --duration SECS    start no attempt after SECS seconds (fractions allowed)
  --max N            start at most N attempts in all
  --concurrency C    C threads, one connection at a time each (default 1, at most 1024)
  --rate R           pace attempts to at most R per second in all, R >= 0.001
                     (default: unpaced)
  --tls12            full mode: TLS 1.2 instead of TLS 1.3
  --source IP        bind this local loopback address before connecting
  --request          full mode: send GET / after the handshake, read the reply to EOF
  --timeout MS       bound for connect + handshake (+ request) of one connection (default 5000)
";

/// Most threads one run may start: more would only measure the scheduler of a small machine.
pub const MAX_CONCURRENCY: usize = 1024;

/// The slowest pace: slower ones would overflow the pacing arithmetic and run unpaced.
pub const MIN_RATE: f64 = 0.001;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Full,
    Hello,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Full => "full",
            Mode::Hello => "hello",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Args {
    pub addr: SocketAddr,
    pub mode: Mode,
    /// The `--names` argument as given; `names::Names::load` interprets it.
    pub names: String,
    pub duration: Duration,
    pub max: Option<u64>,
    pub concurrency: usize,
    pub rate: Option<f64>,
    pub tls12: bool,
    pub source: Option<IpAddr>,
    pub request: bool,
    pub timeout: Duration,
}

/// What `parse` found on the command line: a run, or a request for the usage text.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    Run(Args),
    Help,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CliError {
    UnknownOption(String),
    MissingValue(&'static str),
    Repeated(&'static str),
    Missing(&'static str),
    Invalid { option: &'static str, value: String, why: &'static str },
    NotLoopback { option: &'static str, ip: IpAddr },
    FamilyMismatch { source: IpAddr, addr: SocketAddr },
    HelloOnlyTls13(&'static str),
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CliError::UnknownOption(o) => write!(f, "unknown argument {o:?}"),
            CliError::MissingValue(o) => write!(f, "{o} needs a value"),
            CliError::Repeated(o) => write!(f, "{o} given more than once"),
            CliError::Missing(o) => write!(f, "{o} is required"),
            CliError::Invalid { option, value, why } => {
                write!(f, "bad value {value:?} for {option}: {why}")
            }
            CliError::NotLoopback { option, ip } => {
                write!(f, "{option} {ip} is not a loopback address; this tool only loads loopback")
            }
            CliError::FamilyMismatch { source, addr } => {
                write!(f, "--source {source} and --addr {addr} are of different address families")
            }
            CliError::HelloOnlyTls13(o) => {
                write!(f, "{o} applies to --mode full only; hello mode sends a fixed ClientHello")
            }
        }
    }
}

impl std::error::Error for CliError {}

#[derive(Default)]
struct Raw {
    addr: Option<String>,
    mode: Option<String>,
    names: Option<String>,
    duration: Option<String>,
    max: Option<String>,
    concurrency: Option<String>,
    rate: Option<String>,
    source: Option<String>,
    timeout: Option<String>,
    tls12: bool,
    request: bool,
}

/// Parses the arguments after the program name. Accepts `--opt VALUE` and `--opt=VALUE`.
pub fn parse<I, S>(args: I) -> Result<Command, CliError>
where
    I: IntoIterator<Item = S>,
    S: Into<String>,
{
    let mut raw = Raw::default();
    let mut args = args.into_iter().map(Into::into);
    while let Some(arg) = args.next() {
        let (key, inline) = match arg.split_once('=') {
            Some((k, v)) if k.starts_with("--") => (k.to_owned(), Some(v.to_owned())),
            _ => (arg.clone(), None),
        };
        let (name, slot): (&'static str, &mut Option<String>) = match key.as_str() {
            "-h" | "--help" => return Ok(Command::Help),
            "--tls12" | "--request" => {
                let (name, flag) = if key == "--tls12" {
                    ("--tls12", &mut raw.tls12)
                } else {
                    ("--request", &mut raw.request)
                };
                if inline.is_some() {
                    return Err(CliError::Invalid {
                        option: name,
                        value: arg,
                        why: "takes no value",
                    });
                }
                if *flag {
                    return Err(CliError::Repeated(name));
                }
                *flag = true;
                continue;
            }
            "--addr" => ("--addr", &mut raw.addr),
            "--mode" => ("--mode", &mut raw.mode),
            "--names" => ("--names", &mut raw.names),
            "--duration" => ("--duration", &mut raw.duration),
            "--max" => ("--max", &mut raw.max),
            "--concurrency" => ("--concurrency", &mut raw.concurrency),
            "--rate" => ("--rate", &mut raw.rate),
            "--source" => ("--source", &mut raw.source),
            "--timeout" => ("--timeout", &mut raw.timeout),
            _ => return Err(CliError::UnknownOption(arg)),
        };
        let value = match inline {
            Some(v) => v,
            None => args.next().ok_or(CliError::MissingValue(name))?,
        };
        if slot.replace(value).is_some() {
            return Err(CliError::Repeated(name));
        }
    }
    validate(raw).map(Command::Run)
}

fn validate(raw: Raw) -> Result<Args, CliError> {
    let addr_text = raw.addr.ok_or(CliError::Missing("--addr"))?;
    let addr: SocketAddr = addr_text.parse().map_err(|_| CliError::Invalid {
        option: "--addr",
        value: addr_text.clone(),
        why: "expected IP:PORT, e.g. 127.0.0.1:8443 or [::1]:8443",
    })?;
    if addr.port() == 0 {
        return Err(invalid("--addr", addr_text, "port 0"));
    }
    if !addr.ip().is_loopback() {
        return Err(CliError::NotLoopback { option: "--addr", ip: addr.ip() });
    }

    let mode = match raw.mode.as_deref() {
        Some("full") => Mode::Full,
        Some("hello") => Mode::Hello,
        Some(other) => return Err(invalid("--mode", other.to_owned(), "expected full or hello")),
        None => return Err(CliError::Missing("--mode")),
    };

    let names = raw.names.ok_or(CliError::Missing("--names"))?;
    if names.is_empty() {
        return Err(invalid("--names", names, "empty"));
    }

    let duration_text = raw.duration.ok_or(CliError::Missing("--duration"))?;
    let duration = positive_f64("--duration", &duration_text).and_then(|secs| {
        Duration::try_from_secs_f64(secs)
            .map_err(|_| invalid("--duration", duration_text.clone(), "too large"))
    })?;

    let max = match raw.max {
        Some(text) => Some(positive_u64("--max", &text)?),
        None => None,
    };

    let concurrency = match raw.concurrency {
        Some(text) => {
            let c = positive_u64("--concurrency", &text)?;
            match usize::try_from(c) {
                Ok(c) if c <= MAX_CONCURRENCY => c,
                _ => return Err(invalid("--concurrency", text, "at most 1024")),
            }
        }
        None => 1,
    };

    let rate = match raw.rate {
        Some(text) => match positive_f64("--rate", &text)? {
            r if r < MIN_RATE => return Err(invalid("--rate", text, "at least 0.001 a second")),
            r => Some(r),
        },
        None => None,
    };

    let source = match raw.source {
        Some(text) => {
            let ip: IpAddr = text
                .parse()
                .map_err(|_| invalid("--source", text.clone(), "expected an IP address"))?;
            if !ip.is_loopback() {
                return Err(CliError::NotLoopback { option: "--source", ip });
            }
            if ip.is_ipv4() != addr.is_ipv4() {
                return Err(CliError::FamilyMismatch { source: ip, addr });
            }
            Some(ip)
        }
        None => None,
    };

    let timeout = match raw.timeout {
        Some(text) => Duration::from_millis(positive_u64("--timeout", &text)?),
        None => Duration::from_millis(5000),
    };

    if mode == Mode::Hello {
        if raw.tls12 {
            return Err(CliError::HelloOnlyTls13("--tls12"));
        }
        if raw.request {
            return Err(CliError::HelloOnlyTls13("--request"));
        }
    }

    Ok(Args {
        addr,
        mode,
        names,
        duration,
        max,
        concurrency,
        rate,
        tls12: raw.tls12,
        source,
        request: raw.request,
        timeout,
    })
}

fn invalid(option: &'static str, value: String, why: &'static str) -> CliError {
    CliError::Invalid { option, value, why }
}

fn positive_u64(option: &'static str, text: &str) -> Result<u64, CliError> {
    match text.parse::<u64>() {
        Ok(0) => Err(invalid(option, text.to_owned(), "must be at least 1")),
        Ok(n) => Ok(n),
        Err(_) => Err(invalid(option, text.to_owned(), "expected a whole number")),
    }
}

fn positive_f64(option: &'static str, text: &str) -> Result<f64, CliError> {
    match text.parse::<f64>() {
        Ok(x) if x.is_finite() && x > 0.0 => Ok(x),
        Ok(_) => Err(invalid(option, text.to_owned(), "must be a finite number above 0")),
        Err(_) => Err(invalid(option, text.to_owned(), "expected a number")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: [&str; 8] =
        ["--addr", "127.0.0.1:8443", "--mode", "full", "--names", "a.example", "--duration", "2"];

    fn with(extra: &[&str]) -> Vec<String> {
        BASE.iter().chain(extra).map(|s| s.to_string()).collect()
    }

    fn run(args: Vec<String>) -> Result<Args, CliError> {
        match parse(args)? {
            Command::Run(a) => Ok(a),
            Command::Help => panic!("unexpected help"),
        }
    }

    #[test]
    fn accepted_arguments() {
        type Check = fn(&Args) -> bool;
        let cases: &[(&[&str], Check)] = &[
            (&[], |a| {
                a.concurrency == 1
                    && a.max.is_none()
                    && a.rate.is_none()
                    && a.timeout == Duration::from_millis(5000)
                    && a.duration == Duration::from_secs(2)
                    && a.mode == Mode::Full
                    && !a.tls12
                    && !a.request
            }),
            (&["--max", "7"], |a| a.max == Some(7)),
            (&["--max=9"], |a| a.max == Some(9)),
            (&["--concurrency", "4"], |a| a.concurrency == 4),
            (&["--concurrency", "1024"], |a| a.concurrency == 1024),
            (&["--rate", "2.5"], |a| a.rate == Some(2.5)),
            (&["--tls12", "--request"], |a| a.tls12 && a.request),
            (&["--source", "127.0.0.2"], |a| a.source == Some("127.0.0.2".parse().unwrap())),
            (&["--timeout", "250"], |a| a.timeout == Duration::from_millis(250)),
            (&["--mode", "hello"], |a| a.mode == Mode::Hello),
        ];
        for (extra, check) in cases {
            // A later --mode would be a repeat: build hello cases without the base one.
            let args = if extra.first() == Some(&"--mode") {
                let mut v: Vec<String> = BASE.iter().map(|s| s.to_string()).collect();
                v[3] = extra[1].to_string();
                v
            } else {
                with(extra)
            };
            let parsed = run(args).unwrap_or_else(|e| panic!("{extra:?}: {e}"));
            assert!(check(&parsed), "{extra:?}: {parsed:?}");
        }
    }

    #[test]
    fn fractional_duration() {
        let mut args = with(&[]);
        args[7] = "0.25".into();
        assert_eq!(run(args).map(|a| a.duration), Ok(Duration::from_millis(250)));
    }

    #[test]
    fn help() {
        for flag in ["-h", "--help"] {
            assert_eq!(parse([flag]), Ok(Command::Help));
        }
    }

    #[test]
    fn rejected_arguments() {
        type Want = fn(&CliError) -> bool;
        let cases: &[(&[&str], Want)] = &[
            (&["--bogus"], |e| matches!(e, CliError::UnknownOption(_))),
            (&["--max"], |e| *e == CliError::MissingValue("--max")),
            (&["--max", "0"], |e| matches!(e, CliError::Invalid { option: "--max", .. })),
            (&["--max", "-1"], |e| matches!(e, CliError::Invalid { option: "--max", .. })),
            (&["--max", "1", "--max", "2"], |e| *e == CliError::Repeated("--max")),
            (&["--tls12", "--tls12"], |e| *e == CliError::Repeated("--tls12")),
            (&["--tls12=1"], |e| matches!(e, CliError::Invalid { option: "--tls12", .. })),
            (&["--concurrency", "1025"], |e| {
                matches!(e, CliError::Invalid { option: "--concurrency", .. })
            }),
            (&["--rate", "0"], |e| matches!(e, CliError::Invalid { option: "--rate", .. })),
            (&["--rate", "1e-30"], |e| matches!(e, CliError::Invalid { option: "--rate", .. })),
            (&["--rate", "0.0009"], |e| matches!(e, CliError::Invalid { option: "--rate", .. })),
            (&["--rate", "inf"], |e| matches!(e, CliError::Invalid { option: "--rate", .. })),
            (&["--rate", "NaN"], |e| matches!(e, CliError::Invalid { option: "--rate", .. })),
            (&["--timeout", "x"], |e| matches!(e, CliError::Invalid { option: "--timeout", .. })),
            (&["--source", "10.0.0.1"], |e| {
                matches!(e, CliError::NotLoopback { option: "--source", .. })
            }),
            (&["--source", "::1"], |e| matches!(e, CliError::FamilyMismatch { .. })),
            (&["--source", "localhost"], |e| {
                matches!(e, CliError::Invalid { option: "--source", .. })
            }),
        ];
        for (extra, want) in cases {
            match run(with(extra)) {
                Err(e) => assert!(want(&e), "{extra:?}: got {e:?}"),
                Ok(a) => panic!("{extra:?}: accepted as {a:?}"),
            }
        }
    }

    #[test]
    fn rejected_base_values() {
        // (index in BASE to replace, new value, expected error)
        let cases: &[(usize, &str, CliError)] = &[
            (
                1,
                "192.0.2.1:443",
                CliError::NotLoopback { option: "--addr", ip: "192.0.2.1".parse().unwrap() },
            ),
            (
                1,
                "localhost:443",
                CliError::Invalid {
                    option: "--addr",
                    value: "localhost:443".into(),
                    why: "expected IP:PORT, e.g. 127.0.0.1:8443 or [::1]:8443",
                },
            ),
            (
                1,
                "127.0.0.1:0",
                CliError::Invalid { option: "--addr", value: "127.0.0.1:0".into(), why: "port 0" },
            ),
            (
                3,
                "fast",
                CliError::Invalid {
                    option: "--mode",
                    value: "fast".into(),
                    why: "expected full or hello",
                },
            ),
            (5, "", CliError::Invalid { option: "--names", value: "".into(), why: "empty" }),
            (
                7,
                "0",
                CliError::Invalid {
                    option: "--duration",
                    value: "0".into(),
                    why: "must be a finite number above 0",
                },
            ),
            (
                7,
                "1e300",
                CliError::Invalid { option: "--duration", value: "1e300".into(), why: "too large" },
            ),
        ];
        for (index, value, want) in cases {
            let mut args = with(&[]);
            args[*index] = value.to_string();
            assert_eq!(run(args).as_ref().err(), Some(want), "{index} {value:?}");
        }
    }

    #[test]
    fn missing_required() {
        for (drop, option) in [(0, "--addr"), (2, "--mode"), (4, "--names"), (6, "--duration")] {
            let mut args = with(&[]);
            args.drain(drop..drop + 2);
            assert_eq!(run(args).err(), Some(CliError::Missing(option)));
        }
    }

    #[test]
    fn full_only_flags_refused_in_hello_mode() {
        for flag in ["--tls12", "--request"] {
            let mut args = with(&[flag]);
            args[3] = "hello".into();
            assert_eq!(run(args).err(), Some(CliError::HelloOnlyTls13(flag)));
        }
    }
}
