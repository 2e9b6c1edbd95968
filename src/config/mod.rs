//! Configuration: model shapes and presets, optimizer and schedule settings, and the errors
//! that name the offending field and how to fix it.

mod model;
mod run;

pub use model::ModelConfig;
pub use run::{apply_set, set_path, RunConfig};

use std::fmt;

/// A configuration problem: where it is (file and/or field), what is wrong, how to fix it.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigError {
    pub file: Option<String>,
    pub field: String,
    pub problem: String,
    pub fix: String,
}

impl ConfigError {
    pub fn new(field: &str, problem: impl Into<String>, fix: impl Into<String>) -> Self {
        ConfigError {
            file: None,
            field: field.to_string(),
            problem: problem.into(),
            fix: fix.into(),
        }
    }

    /// Attach the file the field came from (kept if already set).
    pub fn in_file(mut self, file: &str) -> Self {
        if self.file.is_none() {
            self.file = Some(file.to_string());
        }
        self
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.file {
            Some(file) => write!(
                f,
                "{file}: field `{}`: {}; fix: {}",
                self.field, self.problem, self.fix
            ),
            None => write!(
                f,
                "field `{}`: {}; fix: {}",
                self.field, self.problem, self.fix
            ),
        }
    }
}

impl std::error::Error for ConfigError {}
