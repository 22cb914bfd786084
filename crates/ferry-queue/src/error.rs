//! The queue's error type: what was being done, and the database's error behind it.

use std::fmt;

use tokio_postgres::error::SqlState;

/// What to do about a permission error, for every ferry error that has one.
pub const NOT_PERMITTED_HINT: &str =
    "the role ferry connects as lacks a privilege (README, \"Privileges\", lists what each role needs)";

/// An error from a queue operation. Displays what was being done; the database's own error
/// is its [`source`](std::error::Error::source).
#[derive(Debug)]
pub struct QueueError {
    kind: Kind,
    context: String,
    source: Option<tokio_postgres::Error>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Db,
    NotInstalled,
    NotPermitted,
    /// One of ferry's SQL functions refused with a message meant for the user.
    Refused,
    ServerTooOld,
}

impl QueueError {
    pub(crate) fn db(context: String, source: tokio_postgres::Error) -> QueueError {
        let own_refusal = source
            .as_db_error()
            .is_some_and(|db| db.message().starts_with("ferry: "));
        let kind = match source.code() {
            Some(code) if *code == SqlState::INVALID_SCHEMA_NAME => Kind::NotInstalled,
            Some(code) if *code == SqlState::INSUFFICIENT_PRIVILEGE => Kind::NotPermitted,
            _ if own_refusal => Kind::Refused,
            _ => Kind::Db,
        };
        QueueError {
            kind,
            context,
            source: Some(source),
        }
    }

    pub(crate) fn server_too_old(version_num: i32) -> QueueError {
        QueueError {
            kind: Kind::ServerTooOld,
            context: format!(
                "the server is PostgreSQL {}.{}; ferry's queue needs {} or newer",
                version_num / 10000,
                version_num % 10000 / 100,
                crate::install::MIN_SERVER_VERSION_NUM / 10000
            ),
            source: None,
        }
    }

    /// The SQLSTATE of the database error, if the server sent one.
    pub fn code(&self) -> Option<&SqlState> {
        self.source.as_ref().and_then(|e| e.code())
    }

    /// Whether the queue schema is missing from the database (`ferry CONF install` needed).
    pub fn is_not_installed(&self) -> bool {
        self.kind == Kind::NotInstalled
    }

    /// Whether a value the user gave is not valid for the database (a data exception, class
    /// 22: an interval that does not parse, say): a usage error rather than a failure.
    pub fn is_invalid_value(&self) -> bool {
        self.code()
            .is_some_and(|code| code.code().starts_with("22"))
    }

    /// Whether the connection is gone (closed, terminated by the server, server shutting
    /// down): reconnecting is the remedy.
    pub fn is_connection_lost(&self) -> bool {
        self.source
            .as_ref()
            .is_some_and(ferry_connect::is_connection_lost)
    }

    /// What a daemon does about this error: reconnect when the connection is gone, else try
    /// again later (a missing install, a privilege, a busy server can all be fixed meanwhile).
    pub fn remedy(&self) -> ferry_daemon::Remedy {
        if self.is_connection_lost() {
            ferry_daemon::Remedy::Reconnect
        } else {
            ferry_daemon::Remedy::RetryLater
        }
    }
}

impl fmt::Display for QueueError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            Kind::NotInstalled => write!(
                f,
                "{}: the queue schema is not installed in this database (run `ferry CONFIG install`)",
                self.context
            ),
            Kind::NotPermitted => write!(f, "{}: {}", self.context, NOT_PERMITTED_HINT),
            Kind::Refused => {
                let db = self.source.as_ref().and_then(|e| e.as_db_error());
                let message = db.map_or("", |db| db.message().trim_start_matches("ferry: "));
                write!(f, "{}: {message}", self.context)?;
                match db.and_then(|db| db.hint()) {
                    Some(hint) => write!(f, ": {hint}"),
                    None => Ok(()),
                }
            }
            _ => f.write_str(&self.context),
        }
    }
}

impl std::error::Error for QueueError {
    /// The database's error, except where the message already says all of it (the schema
    /// is missing; one of ferry's functions refused).
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self.kind {
            Kind::NotInstalled | Kind::Refused => None,
            _ => self.source.as_ref().map(|e| e as _),
        }
    }
}

/// Attaches what was being done to a driver error.
pub(crate) trait ResultExt<T> {
    fn context(self, what: &str) -> Result<T, QueueError>;
    fn with_context(self, what: impl FnOnce() -> String) -> Result<T, QueueError>;
}

impl<T> ResultExt<T> for Result<T, tokio_postgres::Error> {
    fn context(self, what: &str) -> Result<T, QueueError> {
        self.map_err(|e| QueueError::db(what.to_string(), e))
    }

    fn with_context(self, what: impl FnOnce() -> String) -> Result<T, QueueError> {
        self.map_err(|e| QueueError::db(what(), e))
    }
}
