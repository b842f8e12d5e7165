//! Policies: the model, the policy file (read in [`file`], its shapes in [`doc`], its values in
//! [`values`]), the compiler to kernel map entries, and the reference evaluator the compiled maps
//! must agree with. The file's `settings:` are the daemon's, in [`crate::settings`].

pub mod compile;
pub mod delegation;
mod doc;
pub mod domain;
pub mod file;
pub mod judge;
pub mod model;
pub mod reference;
pub mod validate;
mod values;

pub use crate::yaml::ConfigError;
pub use compile::{compile_set, protocol_number, CompileError, CompiledPolicy, CompiledSet};
pub use file::{parse_policy_file, parse_policy_str};
pub use model::{
    cgroup_glob_matches, Action, DomainPattern, Mode, NameRule, Policy, PolicySet, PortRange, Protocol, Rule, Selector,
};
pub use validate::{validate_policy_file, validate_policy_str};

#[cfg(test)]
mod fuzz;
#[cfg(test)]
mod tests;
