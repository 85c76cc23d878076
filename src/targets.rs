//! Choosing layers by name, as PEFT's `target_modules` does.

use serde::{Deserialize, Serialize};

use crate::error::AdapterError;

/// Which layers get an adapter, by their (Hugging Face style) module name, with PEFT's rules:
///
/// - a list: a name matches when it equals an entry or ends with `.` + an entry
///   (`"output.dense"` matches `encoder.layer.0.output.dense` and
///   `encoder.layer.0.attention.output.dense`);
/// - a string: a regular expression that must match the whole name.
///
/// In JSON: `["query", "value"]` or `"encoder\\.layer\\.[0-2]\\..*(query|value)"`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Targets {
    /// Names or name suffixes.
    List(Vec<String>),
    /// A regex matched against the whole name.
    Regex(String),
}

impl Default for Targets {
    /// Every linear layer of a BERT layer: attention (query, key, value, output) and FFN.
    fn default() -> Self {
        Targets::List(
            [
                "query",
                "key",
                "value",
                "attention.output.dense",
                "intermediate.dense",
                "output.dense",
            ]
            .map(String::from)
            .to_vec(),
        )
    }
}

impl Targets {
    /// From a list of names or suffixes.
    pub fn list<S: Into<String>>(names: impl IntoIterator<Item = S>) -> Self {
        Targets::List(names.into_iter().map(Into::into).collect())
    }

    /// Checks that a regex target compiles.
    pub fn validate(&self) -> Result<(), AdapterError> {
        if let Targets::Regex(r) = self {
            regex::Regex::new(&format!("^(?:{r})$")).map_err(|e| {
                AdapterError::config("targets", "targets", format!("bad regex {r:?}: {e}"))
            })?;
        }
        Ok(())
    }

    /// Does the module `name` match?
    pub fn matches(&self, name: &str) -> bool {
        match self {
            Targets::List(list) => list
                .iter()
                .any(|t| name == t || name.ends_with(&format!(".{t}"))),
            Targets::Regex(r) => regex::Regex::new(&format!("^(?:{r})$"))
                .map(|re| re.is_match(name))
                .unwrap_or(false),
        }
    }
}
