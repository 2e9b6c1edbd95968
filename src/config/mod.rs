//! Configuration: model shapes and presets, optimizer and schedule settings, and the errors
//! that name the offending field and how to fix it.

pub mod memory;
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

/// A config section from JSON (the Python package's keyword arguments), strictly: an unknown
/// key is refused with the valid ones listed, a wrong type with the field named. `section`
/// prefixes field names (`guard`, `init`).
pub fn from_json_strict<T>(section: &str, v: &serde_json::Value) -> Result<T, ConfigError>
where
    T: serde::de::DeserializeOwned + serde::Serialize + Default,
{
    let obj = v.as_object().ok_or_else(|| {
        ConfigError::new(
            section,
            "expected a mapping of keys to values",
            "pass keyword arguments or a dict",
        )
    })?;
    let known = serde_json::to_value(T::default()).unwrap_or_default();
    let known: Vec<&String> = known
        .as_object()
        .map(|o| o.keys().collect())
        .unwrap_or_default();
    for k in obj.keys() {
        if !known.contains(&k) {
            let valid: Vec<&str> = known.iter().map(|s| s.as_str()).collect();
            return Err(ConfigError::new(
                &format!("{section}.{k}"),
                format!("unknown key '{k}'"),
                format!("use one of: {}", valid.join(", ")),
            ));
        }
    }
    serde_json::from_value(v.clone()).map_err(|e| {
        // serde names the field in its message ("invalid type: ... for key `x`" or similar)
        ConfigError::new(section, e.to_string(), "give each key a value of its type")
    })
}
