//! Reading a policy file: its bytes, its text, its shapes, then the [`PolicySet`] they say.

use std::path::Path;

use super::{doc, model::PolicySet};
use crate::yaml::{self, ConfigError};

/// Reads and checks the policy file at `path`.
pub fn parse_policy_file(path: &Path) -> Result<PolicySet, ConfigError> {
    parse_policy_str(&read_policy_file(path)?, &path.display().to_string())
}

/// The text of the policy file at `path`. An unreadable file is the only error without a
/// position.
pub fn read_policy_file(path: &Path) -> Result<String, ConfigError> {
    let file = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|err| ConfigError {
        file: file.clone(),
        line: 0,
        column: 0,
        message: format!("cannot read the policy file: {err}"),
    })?;
    yaml::file_text(bytes, &file)
}

/// Checks a policy file's text; `file` names it in errors.
pub fn parse_policy_str(text: &str, file: &str) -> Result<PolicySet, ConfigError> {
    doc::read(text).map_err(|err| yaml::from_yaml(&err, text, file))?.into_set(file)
}
