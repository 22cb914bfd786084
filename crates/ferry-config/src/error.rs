//! Configuration errors: one line naming the file, the section and the key.

use std::fmt;
use std::path::{Path, PathBuf};

/// What is wrong with a configuration file.
#[derive(Debug)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The file could not be read.
    Unreadable {
        /// The operating system's error.
        source: std::io::Error,
    },
    /// A line is not valid ini.
    Malformed {
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        message: String,
    },
    /// A section the command needs is absent.
    MissingSection {
        /// What the section is for.
        purpose: String,
    },
    /// A required key is absent.
    MissingKey,
    /// A value does not have the expected form.
    WrongType {
        /// The value found.
        value: String,
        /// What was expected instead.
        expected: &'static str,
    },
    /// A `%(key)s` reference could not be resolved.
    Interpolation {
        /// Why.
        message: String,
    },
}

/// An error in a configuration file. Displays as one line: `FILE: [SECTION] KEY: problem`.
#[derive(Debug)]
pub struct ConfigError {
    path: PathBuf,
    section: Option<String>,
    key: Option<String>,
    kind: ErrorKind,
}

impl ConfigError {
    pub(crate) fn new(path: &Path, kind: ErrorKind) -> ConfigError {
        ConfigError {
            path: path.to_path_buf(),
            section: None,
            key: None,
            kind,
        }
    }

    pub(crate) fn in_section(mut self, section: &str) -> ConfigError {
        self.section = Some(section.to_string());
        self
    }

    pub(crate) fn at_key(mut self, key: &str) -> ConfigError {
        self.key = Some(key.to_string());
        self
    }

    /// The kind of problem.
    pub fn kind(&self) -> &ErrorKind {
        &self.kind
    }

    /// The file the problem is in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The section, when the problem is in one.
    pub fn section(&self) -> Option<&str> {
        self.section.as_deref()
    }

    /// The key, when the problem is about one.
    pub fn key(&self) -> Option<&str> {
        self.key.as_deref()
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.path.display())?;
        match (&self.section, &self.key) {
            (Some(section), Some(key)) => write!(f, "[{section}] {key}: ")?,
            (Some(section), None) => write!(f, "[{section}]: ")?,
            _ => {}
        }
        match &self.kind {
            ErrorKind::Unreadable { source } => write!(f, "cannot read the file: {source}"),
            ErrorKind::Malformed { line, message } => write!(f, "line {line}: {message}"),
            ErrorKind::MissingSection { purpose } => {
                write!(f, "section is missing ({purpose})")
            }
            ErrorKind::MissingKey => write!(f, "required key is missing"),
            ErrorKind::WrongType { value, expected } => {
                write!(f, "'{value}' is not {expected}")
            }
            ErrorKind::Interpolation { message } => write!(f, "{message}"),
        }
    }
}

impl std::error::Error for ConfigError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.kind {
            ErrorKind::Unreadable { source } => Some(source),
            _ => None,
        }
    }
}
