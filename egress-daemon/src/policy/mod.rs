//! Policies: the model, the YAML parser, the compiler to kernel map entries, and the reference
//! evaluator the compiled maps must agree with.

pub mod compile;
pub mod delegation;
pub mod domain;
pub mod model;
mod one_or_many;
pub mod parse;
pub mod reference;
pub mod validate;

pub use compile::{compile_set, protocol_number, CompileError, CompiledPolicy, CompiledSet};
pub use model::{
    cgroup_glob_matches, Action, DnsSettings, DomainPattern, Mode, NameRule, Policy, PolicySet, PortRange, Protocol,
    RefuseWith, Rule, Selector, Settings,
};
pub use parse::{parse_policy_file, parse_policy_str, ConfigError};
pub use validate::{validate_policy_file, validate_policy_str};

#[cfg(test)]
mod fuzz;
#[cfg(test)]
mod tests;
