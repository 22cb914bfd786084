//! What a daemon does about a failed unit of work. Each crate's error type decides its
//! [`Remedy`] from the error's kind, where the error arose; the daemons' loops only act on it,
//! so the policy for every kind of failure is written once.

/// What a daemon does after a unit of work failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Remedy {
    /// The connection is gone or was never made: connect again (with backoff), then retry.
    Reconnect,
    /// Keep the connections and try the same work again after a pause (backoff): the cause
    /// may go away by itself or by the user's fix (a missing column added, a row's blocker
    /// removed), and nothing is skipped meanwhile.
    RetryLater,
    /// Waiting cannot fix it (unusable settings, corrupt data, a broken invariant): stop the
    /// daemon with the error, exit code 1 or 2.
    Stop,
}
