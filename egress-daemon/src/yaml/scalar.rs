//! Scalars checked as they are read, with or without their position, and keywords from a closed
//! set.

use std::{borrow::Cow, convert::Infallible, fmt, marker::PhantomData};

use serde::{
    de::{self, Deserializer, Visitor},
    Deserialize,
};

/// A word of the policy language from a closed set. Each is spelled once, in its type's
/// `as_str`: files are parsed by these spellings and everything that prints a policy uses them.
pub trait Keyword: Copy + 'static {
    /// What the word is, in messages ("action", "mode", ...).
    const KIND: &'static str;
    /// Every word of the set, in the order messages list them.
    const ALL: &'static [Self];
    fn keyword(self) -> &'static str;
}

/// "a, b or c": the words of a set, for messages.
pub fn one_of<K: Keyword>() -> String {
    let words: Vec<&str> = K::ALL.iter().map(|k| k.keyword()).collect();
    match words.split_last() {
        Some((last, [])) => (*last).to_string(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
        None => String::new(),
    }
}

/// A word that is not one of its set's.
#[derive(Debug, thiserror::Error)]
#[error("unknown {kind} `{text}`; expected {expected}")]
pub struct UnknownKeyword {
    kind: &'static str,
    text: String,
    expected: String,
}

/// A value written as one YAML scalar and checked as it is read, so that errors point at it.
pub(crate) trait Scalar: Sized {
    /// Why a text is not this value: the message the error at the scalar's position carries.
    type Error: fmt::Display;

    /// Completes "expected ..." in type errors.
    fn expecting() -> Cow<'static, str>;

    fn parse(text: &str) -> Result<Self, Self::Error>;
}

/// A [`Scalar`] read from YAML.
#[derive(Default)]
pub(crate) struct Checked<T>(pub(crate) T);

impl<'de, T: Scalar> Deserialize<'de> for Checked<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_str(ScalarVisitor(PhantomData)).map(Checked)
    }
}

struct ScalarVisitor<T>(PhantomData<T>);

impl<'de, T: Scalar> Visitor<'de> for ScalarVisitor<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&T::expecting())
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<T, E> {
        T::parse(text).map_err(E::custom)
    }

    fn visit_u64<E: de::Error>(self, number: u64) -> Result<T, E> {
        self.visit_str(&number.to_string())
    }

    fn visit_i64<E: de::Error>(self, number: i64) -> Result<T, E> {
        self.visit_str(&number.to_string())
    }

    // Only a single value standing for a list is read as YAML typed it (see `OneOrMany`).
    fn visit_f64<E: de::Error>(self, number: f64) -> Result<T, E> {
        self.visit_str(&number.to_string())
    }

    fn visit_bool<E: de::Error>(self, value: bool) -> Result<T, E> {
        self.visit_str(&value.to_string())
    }
}

/// A [`Scalar`] and where it was written (1-based; 0 when the position is unknown).
pub(crate) struct Located<T> {
    pub(crate) value: T,
    pub(crate) line: usize,
    pub(crate) column: usize,
}

/// Message of the error [`Located`] provokes to learn a position.
const CAPTURED: &str = "position captured";

impl<'de, T: Scalar> Deserialize<'de> for Located<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // serde_norway has no spans, but it stamps the position of the scalar being read on any
        // error its visitor returns. So the visitor stores the value and fails on purpose, and the
        // position is read back from the error. Only scalars: one event, so nothing is left half
        // read when the error is dropped.
        let mut value = None;
        let Err(err) = deserializer.deserialize_str(Capture { value: &mut value });
        match value {
            Some(value) => {
                let (line, column) = position_in(&err.to_string());
                Ok(Located { value, line, column })
            }
            None => Err(err),
        }
    }
}

struct Capture<'a, T> {
    value: &'a mut Option<T>,
}

impl<'de, T: Scalar> Visitor<'de> for Capture<'_, T> {
    type Value = Infallible;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&T::expecting())
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<Infallible, E> {
        *self.value = Some(T::parse(text).map_err(E::custom)?);
        Err(E::custom(CAPTURED))
    }

    fn visit_u64<E: de::Error>(self, number: u64) -> Result<Infallible, E> {
        self.visit_str(&number.to_string())
    }

    fn visit_i64<E: de::Error>(self, number: i64) -> Result<Infallible, E> {
        self.visit_str(&number.to_string())
    }
}

/// `(line, column)` from `serde_norway`'s `... at line L column C`, `(0, 0)` when absent.
fn position_in(message: &str) -> (usize, usize) {
    let Some((_, at)) = message.rsplit_once(" at line ") else {
        return (0, 0);
    };
    let Some((line, column)) = at.split_once(" column ") else {
        return (0, 0);
    };
    match (line.parse(), column.trim_end().parse()) {
        (Ok(line), Ok(column)) => (line, column),
        _ => (0, 0),
    }
}

impl<K: Keyword> Scalar for K {
    type Error = UnknownKeyword;

    fn expecting() -> Cow<'static, str> {
        one_of::<K>().into()
    }

    fn parse(text: &str) -> Result<Self, UnknownKeyword> {
        K::ALL
            .iter()
            .copied()
            .find(|keyword| keyword.keyword().eq_ignore_ascii_case(text))
            .ok_or_else(|| UnknownKeyword { kind: K::KIND, text: text.to_owned(), expected: one_of::<K>() })
    }
}
