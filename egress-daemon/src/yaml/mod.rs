//! YAML read with positions, the framework the policy file's reader is built on.
//!
//! Values are [`Scalar`]s checked while they are read, so `serde_norway` attaches the position of
//! the offending scalar to the error; checks across fields run inside a mapping's visitor and get
//! the mapping's position; checks made later use positions captured with [`Located`]. Every
//! error becomes a [`ConfigError`] (`FILE:LINE:COL: message`).

mod error;
mod one_or_many;
mod scalar;

pub use error::ConfigError;
pub(crate) use error::{file_text, from_yaml};
pub(crate) use one_or_many::{Bounds, OneOrMany};
pub use scalar::Keyword;
pub(crate) use scalar::{Checked, Located, Scalar};
