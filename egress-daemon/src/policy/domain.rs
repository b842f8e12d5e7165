//! Domain names in rules: `api.github.com` (that name only), `*.example.com` (exactly one more
//! label), `**.example.com` (one or more labels). The apex `example.com` matches only when listed.
//! Names are compared in their ASCII form: lower case, no trailing dot, IDNA (punycode).

use std::fmt;

/// Why a name cannot be a domain name.
#[derive(Debug, thiserror::Error)]
pub enum NameError {
    #[error("the name is empty")]
    Empty,
    #[error("not a valid internationalised domain name")]
    Idna,
    #[error("longer than {MAX_NAME_LEN} characters")]
    TooLong,
    #[error("empty label")]
    EmptyLabel,
    #[error("a label is longer than {MAX_LABEL_LEN} characters")]
    LabelTooLong,
    #[error("`{0}` has characters a host name cannot have")]
    Characters(String),
}

/// Why a text cannot be a domain pattern.
#[derive(Debug, thiserror::Error)]
pub enum PatternError {
    #[error("`{text}`: {name}")]
    Name { text: String, name: NameError },
    #[error(
        "`{0}`: a wildcard is only allowed as the whole first label (`*.example.com` for one \
         label, `**.example.com` for one or more)"
    )]
    Wildcard(String),
}

/// Longest name in presentation form without the trailing dot (RFC 1035: 255 octets on the wire).
const MAX_NAME_LEN: usize = 253;
const MAX_LABEL_LEN: usize = 63;

/// A domain pattern of a name rule.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum DomainPattern {
    /// Exactly this name.
    Exact(String),
    /// One label followed by this suffix.
    OneLabel(String),
    /// One or more labels followed by this suffix.
    AnyLabels(String),
}

impl DomainPattern {
    /// Parses and normalises a pattern as written in a policy file.
    pub fn parse(text: &str) -> Result<Self, PatternError> {
        let trimmed = text.trim();
        let in_text = |name| PatternError::Name { text: text.to_owned(), name };
        if let Some(rest) = trimmed.strip_prefix("**.") {
            return Ok(Self::AnyLabels(normalise(rest).map_err(in_text)?));
        }
        if let Some(rest) = trimmed.strip_prefix("*.") {
            return Ok(Self::OneLabel(normalise(rest).map_err(in_text)?));
        }
        if trimmed.contains('*') {
            return Err(PatternError::Wildcard(text.to_owned()));
        }
        Ok(Self::Exact(normalise(trimmed).map_err(in_text)?))
    }

    /// Whether a normalised name (see [`normalise`]) matches.
    pub fn matches(&self, name: &str) -> bool {
        match self {
            Self::Exact(exact) => name == exact,
            Self::OneLabel(suffix) => {
                strip_label_suffix(name, suffix).is_some_and(|labels| !labels.is_empty() && !labels.contains('.'))
            }
            Self::AnyLabels(suffix) => strip_label_suffix(name, suffix).is_some_and(|labels| !labels.is_empty()),
        }
    }
}

/// The labels before `.suffix` in `name`, if `name` ends with it.
fn strip_label_suffix<'a>(name: &'a str, suffix: &str) -> Option<&'a str> {
    name.strip_suffix(suffix)?.strip_suffix('.')
}

impl fmt::Display for DomainPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exact(name) => f.write_str(name),
            Self::OneLabel(suffix) => write!(f, "*.{suffix}"),
            Self::AnyLabels(suffix) => write!(f, "**.{suffix}"),
        }
    }
}

/// A name in the form rules compare: ASCII (IDNA), lower case, without the trailing dot.
pub fn normalise(name: &str) -> Result<String, NameError> {
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    let ascii = if name.is_ascii() {
        name.to_ascii_lowercase()
    } else {
        idna::domain_to_ascii(name).map_err(|_| NameError::Idna)?
    };
    if ascii.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong);
    }
    for label in ascii.split('.') {
        if label.is_empty() {
            return Err(NameError::EmptyLabel);
        }
        if label.len() > MAX_LABEL_LEN {
            return Err(NameError::LabelTooLong);
        }
        if !label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
            return Err(NameError::Characters(label.to_owned()));
        }
    }
    Ok(ascii)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_names_are_normalised() {
        assert_eq!(DomainPattern::parse("API.GitHub.com.").unwrap(), DomainPattern::Exact("api.github.com".into()));
        assert_eq!(
            DomainPattern::parse("bücher.example").unwrap(),
            DomainPattern::Exact("xn--bcher-kva.example".into())
        );
    }

    #[test]
    fn one_label_wildcard_matches_exactly_one_label() {
        let p = DomainPattern::parse("*.example.com").unwrap();
        assert!(p.matches("a.example.com"));
        assert!(!p.matches("example.com"));
        assert!(!p.matches("a.b.example.com"));
        assert!(!p.matches("aexample.com"));
    }

    #[test]
    fn any_labels_wildcard_matches_one_or_more() {
        let p = DomainPattern::parse("**.example.com").unwrap();
        assert!(p.matches("a.example.com"));
        assert!(p.matches("a.b.example.com"));
        assert!(!p.matches("example.com"));
        assert!(!p.matches("badexample.com"));
    }

    #[test]
    fn bad_patterns_are_refused() {
        for bad in ["", ".", "a..b", "foo*.example.com", "*", "a.*.com", "exa mple.com", "*.", &"a".repeat(64)] {
            assert!(DomainPattern::parse(bad).is_err(), "{bad:?}");
        }
    }
}
