//! The replication error type: what was being done, and the cause behind it.

use ferry_connect::ConnectError;
use ferry_queue::QueueError;
use tokio_postgres::error::SqlState;

use crate::names::RelName;

/// An error from a replication operation. Displays what was being done; the database's or the
/// queue's error is its [`source`](std::error::Error::source).
#[derive(Debug, thiserror::Error)]
#[error("{context}")]
pub struct ReplicaError {
    kind: Kind,
    context: String,
    /// The replicated table the failure is about, when it is about one.
    table: Option<Box<RelName>>,
    #[source]
    source: Option<Cause>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A database error.
    Db,
    /// The user must change something (state, input, schema) before this can work.
    Refused,
    /// The connection settings are unusable.
    Configuration,
    /// A server could not be reached.
    Unreachable,
}

#[derive(Debug, thiserror::Error)]
enum Cause {
    #[error(transparent)]
    Db(tokio_postgres::Error),
    #[error(transparent)]
    Queue(QueueError),
    #[error(transparent)]
    Connect(ConnectError),
}

impl ReplicaError {
    pub(crate) fn db(context: String, source: tokio_postgres::Error) -> ReplicaError {
        // ferry's own functions refuse with a message meant for the user: show just that
        if let Some(db) = source.as_db_error() {
            if is_refusal(source.code()) && db.message().starts_with("ferry: ") {
                let mut message = db.message().trim_start_matches("ferry: ").to_string();
                if let Some(hint) = db.hint() {
                    message.push_str(": ");
                    message.push_str(hint);
                }
                return ReplicaError {
                    kind: Kind::Refused,
                    context: message,
                    table: None,
                    source: None,
                };
            }
        }
        let kind = if is_refusal(source.code()) {
            Kind::Refused
        } else {
            Kind::Db
        };
        let context = if source.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE) {
            format!("{context}: {}", ferry_queue::NOT_PERMITTED_HINT)
        } else {
            context
        };
        ReplicaError {
            kind,
            context,
            table: None,
            source: Some(Cause::Db(source)),
        }
    }

    /// Something the user has to fix first, said in one sentence.
    pub(crate) fn refused(message: impl Into<String>) -> ReplicaError {
        ReplicaError {
            kind: Kind::Refused,
            context: message.into(),
            table: None,
            source: None,
        }
    }

    /// Something the user has to fix first, said in one sentence, with the database error
    /// that showed it.
    pub(crate) fn refused_by(
        message: impl Into<String>,
        source: tokio_postgres::Error,
    ) -> ReplicaError {
        ReplicaError {
            kind: Kind::Refused,
            context: message.into(),
            table: None,
            source: Some(Cause::Db(source)),
        }
    }

    /// Marks this error as being about `table` (a row it refused, a column it lacks).
    pub(crate) fn about(mut self, table: &RelName) -> ReplicaError {
        self.table = Some(Box::new(table.clone()));
        self
    }

    /// The replicated table this failure is about, when it is about one.
    pub fn table(&self) -> Option<&RelName> {
        self.table.as_deref()
    }

    pub(crate) fn connect(side: &str, source: ConnectError) -> ReplicaError {
        ReplicaError {
            kind: if source.is_configuration() {
                Kind::Configuration
            } else {
                Kind::Unreachable
            },
            context: format!("the {side}"),
            table: None,
            source: Some(Cause::Connect(source)),
        }
    }

    /// The SQLSTATE of the database error behind this, if any.
    pub fn code(&self) -> Option<&SqlState> {
        match &self.source {
            Some(Cause::Db(e)) => e.code(),
            Some(Cause::Queue(e)) => e.code(),
            _ => None,
        }
    }

    /// Whether the user must change something (a missing table, an unregistered table, a
    /// table without primary key, ...) before retrying can help.
    pub fn is_refused(&self) -> bool {
        self.kind == Kind::Refused
    }

    /// Whether the connection settings themselves are wrong (bad conninfo, unsupported TLS).
    pub fn is_configuration(&self) -> bool {
        self.kind == Kind::Configuration
    }

    /// Whether a connection was lost or could not be made: reconnecting is the remedy.
    pub fn is_connection_lost(&self) -> bool {
        match &self.source {
            _ if self.kind == Kind::Unreachable => true,
            Some(Cause::Db(e)) => ferry_connect::is_connection_lost(e),
            Some(Cause::Queue(e)) => e.is_connection_lost(),
            _ => false,
        }
    }
}

impl From<QueueError> for ReplicaError {
    fn from(error: QueueError) -> ReplicaError {
        let kind = if error.is_not_installed() {
            Kind::Refused
        } else {
            Kind::Db
        };
        ReplicaError {
            kind,
            context: "queue operation failed".into(),
            table: None,
            source: Some(Cause::Queue(error)),
        }
    }
}

/// SQLSTATEs our own functions raise for problems the user has to fix.
fn is_refusal(code: Option<&SqlState>) -> bool {
    matches!(code, Some(c) if *c == SqlState::UNDEFINED_TABLE
        || *c == SqlState::UNDEFINED_OBJECT
        || *c == SqlState::WRONG_OBJECT_TYPE
        || *c == SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE
        || *c == SqlState::UNDEFINED_COLUMN
        || *c == SqlState::INVALID_SCHEMA_NAME
        || *c == SqlState::UNDEFINED_FUNCTION
        || *c == SqlState::INSUFFICIENT_PRIVILEGE)
}

/// Adds "what was being done" to database errors.
pub(crate) trait ResultExt<T> {
    fn context(self, what: &str) -> Result<T, ReplicaError>;
    fn with_context(self, what: impl FnOnce() -> String) -> Result<T, ReplicaError>;
}

impl<T> ResultExt<T> for Result<T, tokio_postgres::Error> {
    fn context(self, what: &str) -> Result<T, ReplicaError> {
        self.map_err(|e| ReplicaError::db(what.to_string(), e))
    }

    fn with_context(self, what: impl FnOnce() -> String) -> Result<T, ReplicaError> {
        self.map_err(|e| ReplicaError::db(what(), e))
    }
}
