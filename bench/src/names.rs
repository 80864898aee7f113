//! Which server name each connection asks for: `--names NAME | @FILE | random:PREFIX`.

use std::fmt;
use std::fs;
use std::sync::atomic::{AtomicUsize, Ordering};

use rustls_pki_types::DnsName;

use crate::rng::Rng;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Names {
    /// Used round-robin across all threads; a single NAME is a list of one.
    List(Vec<String>),
    /// Every connection a new name: `PREFIX-<thread>-<counter>-<8 hex>.example`.
    Random { prefix: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NamesError {
    Read { path: String, error: String },
    EmptyFile { path: String },
    BadName { name: String, line: Option<usize> },
    BadPrefix { prefix: String },
}

impl fmt::Display for NamesError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NamesError::Read { path, error } => write!(f, "cannot read names file {path}: {error}"),
            NamesError::EmptyFile { path } => write!(f, "names file {path} has no names"),
            NamesError::BadName { name, line: Some(line) } => {
                write!(f, "line {line}: {name:?} is not a valid DNS name")
            }
            NamesError::BadName { name, line: None } => {
                write!(f, "{name:?} is not a valid DNS name")
            }
            NamesError::BadPrefix { prefix } => write!(
                f,
                "random:{prefix} gives names that are not valid DNS names \
                 (labels at most 63 characters, letters, digits, '-' and '.')"
            ),
        }
    }
}

impl std::error::Error for NamesError {}

impl Names {
    /// Interprets a `--names` argument, reading the file of `@FILE`.
    pub fn load(spec: &str) -> Result<Names, NamesError> {
        if let Some(path) = spec.strip_prefix('@') {
            let text = fs::read_to_string(path)
                .map_err(|e| NamesError::Read { path: path.to_owned(), error: e.to_string() })?;
            return Names::from_lines(path, &text);
        }
        Names::parse(spec)
    }

    /// A `--names` argument that is not `@FILE`.
    pub fn parse(spec: &str) -> Result<Names, NamesError> {
        if let Some(prefix) = spec.strip_prefix("random:") {
            // The longest name this run could make: every counter digit and the highest thread.
            let longest = random_name(prefix, usize::MAX, u64::MAX, u32::MAX);
            if prefix.is_empty() || !is_dns_name(&longest) {
                return Err(NamesError::BadPrefix { prefix: prefix.to_owned() });
            }
            return Ok(Names::Random { prefix: prefix.to_owned() });
        }
        if !is_dns_name(spec) {
            return Err(NamesError::BadName { name: spec.to_owned(), line: None });
        }
        Ok(Names::List(vec![spec.to_owned()]))
    }

    /// One name a line; blank lines and lines starting with '#' are skipped.
    pub fn from_lines(path: &str, text: &str) -> Result<Names, NamesError> {
        let mut names = Vec::new();
        for (index, line) in text.lines().enumerate() {
            let name = line.trim();
            if name.is_empty() || name.starts_with('#') {
                continue;
            }
            if !is_dns_name(name) {
                return Err(NamesError::BadName { name: name.to_owned(), line: Some(index + 1) });
            }
            names.push(name.to_owned());
        }
        if names.is_empty() {
            return Err(NamesError::EmptyFile { path: path.to_owned() });
        }
        Ok(Names::List(names))
    }
}

/// Only names a real client could send: rustls would refuse the rest in full mode, and hello
/// mode keeps to the same set so that both modes measure the same traffic.
pub fn is_dns_name(name: &str) -> bool {
    DnsName::try_from(name).is_ok()
}

pub fn random_name(prefix: &str, thread: usize, counter: u64, random: u32) -> String {
    format!("{prefix}-{thread}-{counter}-{random:08x}.example")
}

/// The name of one connection: an index into the list, or a name made for this connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pick {
    Listed(usize),
    Fresh(String),
}

/// One thread's view of the names. The list position is shared by all threads so that a file
/// of names is walked in order as a whole, not once per thread.
pub struct Picker<'a> {
    names: &'a Names,
    position: &'a AtomicUsize,
    thread: usize,
    counter: u64,
    rng: Rng,
}

impl<'a> Picker<'a> {
    pub fn new(names: &'a Names, position: &'a AtomicUsize, thread: usize, rng: Rng) -> Self {
        Picker { names, position, thread, counter: 0, rng }
    }

    pub fn next(&mut self) -> Pick {
        match self.names {
            Names::List(list) if list.len() <= 1 => Pick::Listed(0),
            Names::List(list) => {
                Pick::Listed(self.position.fetch_add(1, Ordering::Relaxed) % list.len())
            }
            Names::Random { prefix } => {
                let counter = self.counter;
                self.counter += 1;
                // Truncation intended: 32 random bits are the 8 hex digits of the name.
                let random = self.rng.next_u64() as u32;
                Pick::Fresh(random_name(prefix, self.thread, counter, random))
            }
        }
    }

    /// The name text of a pick, borrowed from the list when possible.
    pub fn text<'p>(&self, pick: &'p Pick) -> &'p str
    where
        'a: 'p,
    {
        match (pick, self.names) {
            (Pick::Fresh(name), _) => name,
            (Pick::Listed(i), Names::List(list)) => list.get(*i).map_or("", String::as_str),
            (Pick::Listed(_), Names::Random { .. }) => "",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn parse_specs() {
        let cases: &[(&str, Result<Names, NamesError>)] = &[
            ("a.example", Ok(Names::List(vec!["a.example".into()]))),
            ("localhost", Ok(Names::List(vec!["localhost".into()]))),
            ("random:bench", Ok(Names::Random { prefix: "bench".into() })),
            ("random:a.b", Ok(Names::Random { prefix: "a.b".into() })),
            ("random:", Err(NamesError::BadPrefix { prefix: "".into() })),
            ("random:a b", Err(NamesError::BadPrefix { prefix: "a b".into() })),
            ("a b.example", Err(NamesError::BadName { name: "a b.example".into(), line: None })),
            ("127.0.0.1", Err(NamesError::BadName { name: "127.0.0.1".into(), line: None })),
            ("-a.example", Err(NamesError::BadName { name: "-a.example".into(), line: None })),
        ];
        for (spec, want) in cases {
            assert_eq!(&Names::parse(spec), want, "{spec:?}");
        }
    }

    #[test]
    fn prefix_too_long_for_a_label() {
        // A label holds 63 characters; the suffix after the prefix takes up to 52 of them.
        let ok = "p".repeat(63 - "-18446744073709551615-18446744073709551615-ffffffff".len());
        assert!(Names::parse(&format!("random:{ok}")).is_ok());
        let long = format!("{ok}p");
        assert_eq!(
            Names::parse(&format!("random:{long}")),
            Err(NamesError::BadPrefix { prefix: long.clone() })
        );
    }

    #[test]
    fn file_lines() {
        let cases: &[(&str, Result<Names, NamesError>)] = &[
            (
                "a.example\nb.example\n",
                Ok(Names::List(vec!["a.example".into(), "b.example".into()])),
            ),
            ("# list\n\n  a.example  \r\n", Ok(Names::List(vec!["a.example".into()]))),
            ("", Err(NamesError::EmptyFile { path: "f".into() })),
            ("# only\n\n", Err(NamesError::EmptyFile { path: "f".into() })),
            (
                "a.example\nbad name\n",
                Err(NamesError::BadName { name: "bad name".into(), line: Some(2) }),
            ),
        ];
        for (text, want) in cases {
            assert_eq!(&Names::from_lines("f", text), want, "{text:?}");
        }
    }

    #[test]
    fn missing_file() {
        let err = Names::load("@/nonexistent/sni-load-names").unwrap_err();
        assert!(matches!(err, NamesError::Read { .. }), "{err:?}");
    }

    #[test]
    fn round_robin_across_pickers() {
        let names = Names::List(vec!["a.example".into(), "b.example".into(), "c.example".into()]);
        let position = AtomicUsize::new(0);
        let mut one = Picker::new(&names, &position, 0, Rng::from_seed(1));
        let mut two = Picker::new(&names, &position, 1, Rng::from_seed(2));
        let picks: Vec<String> = (0..6)
            .map(|i| {
                let picker = if i % 2 == 0 { &mut one } else { &mut two };
                let pick = picker.next();
                picker.text(&pick).to_owned()
            })
            .collect();
        assert_eq!(
            picks,
            ["a.example", "b.example", "c.example", "a.example", "b.example", "c.example"]
        );
    }

    #[test]
    fn single_name_every_time() {
        let names = Names::List(vec!["only.example".into()]);
        let position = AtomicUsize::new(0);
        let mut picker = Picker::new(&names, &position, 3, Rng::from_seed(1));
        for _ in 0..5 {
            let pick = picker.next();
            assert_eq!(picker.text(&pick), "only.example");
        }
    }

    #[test]
    fn random_names_are_distinct_and_valid() {
        let names = Names::Random { prefix: "bench".into() };
        let position = AtomicUsize::new(0);
        let mut seen = HashSet::new();
        for thread in 0..3 {
            // The same seed for every thread: the thread number alone must keep names apart.
            let mut picker = Picker::new(&names, &position, thread, Rng::from_seed(7));
            for counter in 0..1000u64 {
                let pick = picker.next();
                let name = picker.text(&pick).to_owned();
                let expected_start = format!("bench-{thread}-{counter}-");
                assert!(name.starts_with(&expected_start), "{name}");
                assert!(name.ends_with(".example"), "{name}");
                assert!(is_dns_name(&name), "{name}");
                assert!(seen.insert(name.clone()), "repeated {name}");
            }
        }
    }
}
