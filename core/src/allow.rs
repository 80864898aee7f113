//! Names that always pass without a lookup (`sni_guard_allow`): exact names, and `*.suffix`
//! wildcards that match whole labels only.

use std::collections::HashSet;

use crate::names::{self, Invalid, Name};

/// A server's static allow list.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AllowList {
    exact: HashSet<Name>,
    /// Wildcard suffixes with their leading dot: `*.alpha.example` is kept as `.alpha.example`.
    suffixes: HashSet<String>,
}

impl AllowList {
    /// Adds an entry: a name, or `*.` followed by a name for every name below it (not the name
    /// itself, as in nginx's `server_name`). Entries follow the same rules as server names and
    /// are normalised the same way.
    pub fn add(&mut self, entry: &str) -> Result<(), Invalid> {
        match entry.strip_prefix("*.") {
            Some(suffix) => {
                let suffix = names::normalise(suffix.as_bytes())?;
                self.suffixes.insert(format!(".{suffix}"));
            }
            None => {
                self.exact.insert(names::normalise(entry.as_bytes())?);
            }
        }
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.suffixes.is_empty()
    }

    /// Whether a (normalised) name is on the list. One set lookup per label.
    pub fn matches(&self, name: &Name) -> bool {
        if self.exact.contains(name) {
            return true;
        }
        if self.suffixes.is_empty() {
            return false;
        }
        let text = name.as_str();
        text.match_indices('.').any(|(at, _)| self.suffixes.contains(&text[at..]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(entries: &[&str]) -> AllowList {
        let mut list = AllowList::default();
        for entry in entries {
            list.add(entry).unwrap();
        }
        list
    }

    #[test]
    fn wildcards_match_whole_labels_only() {
        let list = list(&["admin.example.com", "*.alpha.example", "*.Internal.EXAMPLE."]);
        let cases = [
            ("admin.example.com", true, "exact"),
            ("x.admin.example.com", false, "exact names have no subdomains"),
            ("x.alpha.example", true, "one label below"),
            ("a.b.alpha.example", true, "two labels below"),
            ("alpha.example", false, "not the name itself"),
            ("x.gw-alpha.example", false, "a label that only ends like the suffix"),
            ("xalpha.example", false, "no dot before the suffix"),
            ("x.alpha.example.net", false, "the suffix in the middle"),
            ("db.internal.example", true, "entries are normalised"),
            ("other.example", false, "unlisted"),
        ];
        for (name, want, why) in cases {
            let name = names::normalise(name.as_bytes()).unwrap();
            assert_eq!(list.matches(&name), want, "{name}: {why}");
        }
    }

    #[test]
    fn entries_follow_the_name_rules() {
        let cases = [
            ("under_score.example", Invalid::Underscore),
            ("*.", Invalid::Empty),
            ("**.example", Invalid::BadByte),
            ("a.*.example", Invalid::BadByte),
            ("127.0.0.1", Invalid::IpLiteral),
            ("", Invalid::Empty),
        ];
        for (entry, want) in cases {
            assert_eq!(AllowList::default().add(entry), Err(want), "{entry}");
        }
        assert!(AllowList::default().is_empty());
        assert!(!list(&["a.example"]).is_empty());
    }
}
