//! What `egress check` asks of a file: it parses, and it compiles into the kernel maps' limits.
//! Compiler errors get the position of the rule they are about, like parser errors.

use std::path::Path;

use super::{
    compile::{compile_set, CompileError},
    file::{parse_policy_str, read_policy_file},
    model::PolicySet,
};
use crate::yaml::ConfigError;

/// Parses and compiles the policy file at `path`.
pub fn validate_policy_file(path: &Path) -> Result<PolicySet, ConfigError> {
    validate_policy_str(&read_policy_file(path)?, &path.display().to_string())
}

/// Parses and compiles a policy file's text; `file` names it in errors.
pub fn validate_policy_str(text: &str, file: &str) -> Result<PolicySet, ConfigError> {
    let set = parse_policy_str(text, file)?;
    let slots: Vec<u32> = (0..).take(set.policies.len()).collect();
    match compile_set(&set, &slots, 1) {
        Ok(_) => Ok(set),
        Err(error) => {
            let line = rule_line(&set, &error).unwrap_or(1);
            let column = first_column(text, line);
            Err(ConfigError { file: file.to_owned(), line, column, message: error.to_string() })
        }
    }
}

/// The line of the first rule the error is about, where it is about rules.
fn rule_line(set: &PolicySet, error: &CompileError) -> Option<usize> {
    let (name, cidr) = match error {
        CompileError::TooManyPortRules { policy, cidr, .. } => (policy, Some(cidr)),
        CompileError::TooManyRules { policy } => (policy, None),
        // Set-wide limits (and slot errors, which `check` cannot make) point at the file's start.
        _ => return None,
    };
    let policy = set.policies.iter().find(|p| &p.name == name)?;
    let rule = policy.rules.iter().find(|r| cidr.is_none_or(|c| &r.net == c))?;
    (rule.line > 0).then_some(rule.line)
}

/// The column of the first character of `line` that is neither blank nor a list dash: where the
/// rule's first key is written.
fn first_column(text: &str, line: usize) -> usize {
    let Some(content) = text.lines().nth(line.saturating_sub(1)) else { return 1 };
    content.chars().position(|c| !matches!(c, ' ' | '\t' | '-')).map_or(1, |i| i + 1)
}
