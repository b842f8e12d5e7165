//! Lists in a YAML file that may also be written as their one element (`ports: 80`,
//! `upstream: 192.0.2.53`, `rules: {allow: 10.0.0.0/8}`).
//!
//! The single value is read from the same YAML event a list element would be, so errors inside
//! it point at the same line and column as they would in a list of one.

use std::{fmt, marker::PhantomData};

use serde::{
    de::{
        self,
        value::{
            BoolDeserializer, F64Deserializer, I64Deserializer, MapAccessDeserializer, StrDeserializer, U64Deserializer,
        },
        Deserializer, MapAccess, SeqAccess, Visitor,
    },
    Deserialize,
};

/// A list, or one element standing for a list of one.
pub(crate) struct OneOrMany<T>(pub Vec<T>);

impl<T> Default for OneOrMany<T> {
    fn default() -> Self {
        Self(Vec::new())
    }
}

/// What a list refuses beyond its elements' own checks. Checked while the list is read, so the
/// errors point into the list.
pub(crate) struct Bounds {
    /// Most elements; more are refused at the first one too many.
    pub max: usize,
    pub too_many: fn() -> String,
    /// Refuses an empty list with this message (`None`: an empty list is fine).
    pub empty: Option<&'static str>,
}

const UNBOUNDED: Bounds = Bounds { max: usize::MAX, too_many: String::new, empty: None };

impl<'de, T: Deserialize<'de>> Deserialize<'de> for OneOrMany<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Self::deserialize_bounded(deserializer, &UNBOUNDED)
    }
}

impl<'de, T: Deserialize<'de>> OneOrMany<T> {
    /// Reads the list, refusing what `bounds` refuses.
    pub fn deserialize_bounded<D: Deserializer<'de>>(deserializer: D, bounds: &Bounds) -> Result<Self, D::Error> {
        // `any`: only the YAML event says whether a list or a single value was written.
        deserializer.deserialize_any(OneOrManyVisitor { bounds, element: PhantomData }).map(OneOrMany)
    }
}

struct OneOrManyVisitor<'b, T> {
    bounds: &'b Bounds,
    element: PhantomData<T>,
}

impl<'de, T: Deserialize<'de>> OneOrManyVisitor<'_, T> {
    /// A single value, read as the element type reads it.
    fn one<D: Deserializer<'de>>(self, value: D) -> Result<Vec<T>, D::Error> {
        T::deserialize(value).map(|element| vec![element])
    }
}

impl<'de, T: Deserialize<'de>> Visitor<'de> for OneOrManyVisitor<'_, T> {
    type Value = Vec<T>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a value or a list of values")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
        let mut elements = Vec::new();
        while let Some(element) = seq.next_element::<T>()? {
            // Checked as the list grows: an aliased list must not expand past the bound first.
            if elements.len() == self.bounds.max {
                return Err(de::Error::custom((self.bounds.too_many)()));
            }
            elements.push(element);
        }
        match self.bounds.empty {
            Some(message) if elements.is_empty() => Err(de::Error::custom(message)),
            _ => Ok(elements),
        }
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Vec<T>, A::Error> {
        self.one(MapAccessDeserializer::new(map))
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<Vec<T>, E> {
        self.one(StrDeserializer::new(text))
    }

    fn visit_u64<E: de::Error>(self, number: u64) -> Result<Vec<T>, E> {
        self.one(U64Deserializer::new(number))
    }

    fn visit_i64<E: de::Error>(self, number: i64) -> Result<Vec<T>, E> {
        self.one(I64Deserializer::new(number))
    }

    fn visit_f64<E: de::Error>(self, number: f64) -> Result<Vec<T>, E> {
        self.one(F64Deserializer::new(number))
    }

    fn visit_bool<E: de::Error>(self, value: bool) -> Result<Vec<T>, E> {
        self.one(BoolDeserializer::new(value))
    }

    /// `key:` with nothing after it (or `~`): an empty list.
    fn visit_unit<E: de::Error>(self) -> Result<Vec<T>, E> {
        match self.bounds.empty {
            Some(message) => Err(E::custom(message)),
            None => Ok(Vec::new()),
        }
    }

    fn visit_none<E: de::Error>(self) -> Result<Vec<T>, E> {
        self.visit_unit()
    }
}
