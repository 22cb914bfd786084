//! The replication error type: what was being done, why (one [`ErrorKind`] per cause, decided
//! where the error arises), and the cause behind it as its `source()`.

use ferry_connect::ConnectError;
use ferry_daemon::Remedy;
use ferry_queue::QueueError;
use tokio_postgres::error::SqlState;

use crate::names::RelName;

/// An error from a replication operation. Displays what was being done; the database's, the
/// queue's or the connection's error is its [`source`](std::error::Error::source).
#[derive(Debug, thiserror::Error)]
#[error("{context}")]
pub struct ReplicaError {
    kind: ErrorKind,
    context: String,
    /// The replicated table the failure is about, when it is about one.
    table: Option<Box<RelName>>,
    #[source]
    source: Option<Cause>,
}

/// Why a replication operation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// A connection was lost, or a server could not be reached.
    ConnectionLost,
    /// A setup step is missing (an install, a `provider add`, a registration, a privilege);
    /// the message names it.
    NeedsSetup,
    /// What the user typed names nothing usable (a table that does not exist, a bad name).
    InvalidInput,
    /// The subscriber refused a replicated row (a constraint, a trigger, a row missing or
    /// extra there).
    RowRefused,
    /// The two sides' definitions differ (a table or column missing, another type, no
    /// primary key).
    SchemaMismatch,
    /// Data ferry itself wrote is malformed (an event, a stored state), or an invariant of
    /// ferry's is broken: a bug or tampering, not something the user set up wrong.
    Corrupt,
    /// The connection settings are unusable.
    Configuration,
    /// A wait (`wait-sync`) ran out of time.
    TimedOut,
    /// Any other database error.
    Db,
    /// A batch set-wise apply cannot take (it holds SQL run through the queue): apply goes
    /// on in event order. Never leaves the batch protocol.
    NeedsEventOrder,
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
    /// An error of `kind` said in one sentence, with no cause behind it.
    pub(crate) fn new(kind: ErrorKind, message: impl Into<String>) -> ReplicaError {
        ReplicaError {
            kind,
            context: message.into(),
            table: None,
            source: None,
        }
    }

    /// A missing setup step, said with what to run.
    pub(crate) fn needs_setup(message: impl Into<String>) -> ReplicaError {
        ReplicaError::new(ErrorKind::NeedsSetup, message)
    }

    /// A difference between the provider's and the subscriber's definitions.
    pub(crate) fn schema_mismatch(message: impl Into<String>) -> ReplicaError {
        ReplicaError::new(ErrorKind::SchemaMismatch, message)
    }

    /// Input that names nothing usable.
    pub(crate) fn invalid_input(message: impl Into<String>) -> ReplicaError {
        ReplicaError::new(ErrorKind::InvalidInput, message)
    }

    /// Malformed data written by ferry, or a broken invariant.
    pub(crate) fn corrupt(message: impl Into<String>) -> ReplicaError {
        ReplicaError::new(
            ErrorKind::Corrupt,
            format!(
                "{} (ferry's own data is inconsistent: please report this as a bug)",
                message.into()
            ),
        )
    }

    /// A row the subscriber refused or did not have.
    pub(crate) fn row_refused(message: impl Into<String>) -> ReplicaError {
        ReplicaError::new(ErrorKind::RowRefused, message)
    }

    /// A database error while doing `context`, classified by its SQLSTATE.
    pub(crate) fn db(context: String, source: tokio_postgres::Error) -> ReplicaError {
        let kind = kind_of(&source);
        // ferry's own functions refuse with a message meant for the user: show just that
        if let Some(db) = source.as_db_error() {
            if kind != ErrorKind::Db && db.message().starts_with("ferry: ") {
                let mut message = db.message().trim_start_matches("ferry: ").to_string();
                if let Some(hint) = db.hint() {
                    message.push_str(": ");
                    message.push_str(hint);
                }
                return ReplicaError::new(kind, message);
            }
        }
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

    /// A database error of `kind` said in one sentence, with that error as its cause. A lost
    /// connection or a missing privilege is said as such, whatever `kind` expected.
    pub(crate) fn with_cause(
        kind: ErrorKind,
        message: impl Into<String>,
        source: tokio_postgres::Error,
    ) -> ReplicaError {
        let mut context = message.into();
        let kind = match kind_of(&source) {
            ErrorKind::ConnectionLost => ErrorKind::ConnectionLost,
            _ if source.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE) => {
                context = format!("{context}: {}", ferry_queue::NOT_PERMITTED_HINT);
                ErrorKind::NeedsSetup
            }
            _ => kind,
        };
        ReplicaError {
            kind,
            context,
            table: None,
            source: Some(Cause::Db(source)),
        }
    }

    /// Marks this error as being about `table` (a row it refused, a column it lacks).
    pub(crate) fn about(mut self, table: &RelName) -> ReplicaError {
        self.table = Some(Box::new(table.clone()));
        self
    }

    pub(crate) fn connect(side: &str, source: ConnectError) -> ReplicaError {
        ReplicaError {
            kind: if source.is_configuration() {
                ErrorKind::Configuration
            } else {
                ErrorKind::ConnectionLost
            },
            context: format!("the {side}"),
            table: None,
            source: Some(Cause::Connect(source)),
        }
    }

    /// Why it failed.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The replicated table this failure is about, when it is about one.
    pub fn table(&self) -> Option<&RelName> {
        self.table.as_deref()
    }

    /// The SQLSTATE of the database error behind this, if any.
    pub fn code(&self) -> Option<&SqlState> {
        match &self.source {
            Some(Cause::Db(e)) => e.code(),
            Some(Cause::Queue(e)) => e.code(),
            _ => None,
        }
    }

    /// Whether the user must change something (set up, fix a row, align a table, type
    /// another name) before retrying can help.
    pub fn needs_user(&self) -> bool {
        matches!(
            self.kind,
            ErrorKind::NeedsSetup
                | ErrorKind::InvalidInput
                | ErrorKind::RowRefused
                | ErrorKind::SchemaMismatch
        )
    }

    /// Whether the connection settings themselves are wrong (bad conninfo, unsupported TLS).
    pub fn is_configuration(&self) -> bool {
        self.kind == ErrorKind::Configuration
    }

    /// Whether a connection was lost or could not be made: reconnecting is the remedy.
    pub fn is_connection_lost(&self) -> bool {
        self.kind == ErrorKind::ConnectionLost
    }

    /// What a daemon does about this error: the one place that decides it.
    pub fn remedy(&self) -> Remedy {
        match self.kind {
            ErrorKind::ConnectionLost => Remedy::Reconnect,
            ErrorKind::Configuration | ErrorKind::Corrupt => Remedy::Stop,
            ErrorKind::NeedsSetup
            | ErrorKind::InvalidInput
            | ErrorKind::RowRefused
            | ErrorKind::SchemaMismatch
            | ErrorKind::TimedOut
            | ErrorKind::NeedsEventOrder
            | ErrorKind::Db => Remedy::RetryLater,
        }
    }
}

impl From<QueueError> for ReplicaError {
    fn from(error: QueueError) -> ReplicaError {
        let kind = if error.is_connection_lost() {
            ErrorKind::ConnectionLost
        } else if error.is_not_installed() {
            ErrorKind::NeedsSetup
        } else {
            ErrorKind::Db
        };
        ReplicaError {
            kind,
            context: "queue operation failed".into(),
            table: None,
            source: Some(Cause::Queue(error)),
        }
    }
}

/// The kind of a database error, from its SQLSTATE.
fn kind_of(error: &tokio_postgres::Error) -> ErrorKind {
    if ferry_connect::is_connection_lost(error) {
        return ErrorKind::ConnectionLost;
    }
    let Some(code) = error.code() else {
        return ErrorKind::Db;
    };
    if *code == SqlState::UNDEFINED_TABLE
        || *code == SqlState::UNDEFINED_COLUMN
        || *code == SqlState::WRONG_OBJECT_TYPE
        || *code == SqlState::DATATYPE_MISMATCH
    {
        ErrorKind::SchemaMismatch
    } else if *code == SqlState::UNDEFINED_OBJECT
        || *code == SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE
        || *code == SqlState::INVALID_SCHEMA_NAME
        || *code == SqlState::UNDEFINED_FUNCTION
        || *code == SqlState::INSUFFICIENT_PRIVILEGE
    {
        ErrorKind::NeedsSetup
    } else {
        ErrorKind::Db
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_has_one_remedy() {
        let remedy = |kind| ReplicaError::new(kind, "x").remedy();
        assert_eq!(remedy(ErrorKind::ConnectionLost), Remedy::Reconnect);
        assert_eq!(remedy(ErrorKind::Corrupt), Remedy::Stop);
        assert_eq!(remedy(ErrorKind::Configuration), Remedy::Stop);
        for kind in [
            ErrorKind::NeedsSetup,
            ErrorKind::InvalidInput,
            ErrorKind::RowRefused,
            ErrorKind::SchemaMismatch,
            ErrorKind::TimedOut,
            ErrorKind::Db,
        ] {
            assert_eq!(remedy(kind), Remedy::RetryLater, "{kind:?}");
        }
    }

    #[test]
    fn corrupt_data_is_not_the_users_to_fix() {
        let error = ReplicaError::corrupt("event 7 of public.t has unknown type \"X\"");
        assert!(!error.needs_user());
        assert!(error.to_string().contains("bug"), "{error}");
    }
}
