//! Where replication of one queue into this subscriber stands (`ferry CONFIG status` with a
//! `[londiste]` config): what replay is doing, how far behind it is, the error holding it up,
//! and each table's state and since when, with a running copy's progress. Read from both sides; replay keeps what only it
//! knows (the last error) in the subscriber's store.

use tokio_postgres::Client;

use crate::error::ReplicaError;
use crate::store::{self, CopyProgress, TableState};

/// What replay is doing, as an operator asks it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReplayState {
    /// `ferry CONFIG pause`: nothing is applied.
    Paused,
    /// An error holds replay up (a refused row, a missing privilege): see `last_error`.
    StoppedOnError,
    /// Tables wait for or are in their initial copy.
    Copying,
    /// Copied tables catch up with the events since their copy.
    CatchingUp,
    /// Every table is `ok`: batches are applied as they come.
    Streaming,
}

impl std::fmt::Display for ReplayState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ReplayState::Paused => "paused",
            ReplayState::StoppedOnError => "stopped on an error",
            ReplayState::Copying => "copying",
            ReplayState::CatchingUp => "catching up",
            ReplayState::Streaming => "streaming",
        })
    }
}

/// One table's line.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TableLine {
    /// The table.
    pub table: String,
    /// Its state here.
    pub state: String,
    /// Seconds since it entered that state.
    pub since_secs: f64,
    /// While it copies: how far the copy has got.
    pub copy: Option<CopyProgress>,
}

/// Replication of one queue into this subscriber.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ReplicationStatus {
    /// The queue.
    pub queue: String,
    /// The consumer (`job_name`).
    pub consumer: String,
    /// What replay is doing.
    pub state: ReplayState,
    /// Age of the subscriber's position (the tick of the last batch finished on the
    /// provider), in seconds; `None` when the consumer is not registered.
    pub lag_secs: Option<f64>,
    /// Events ticked past the consumer's position.
    pub pending_events: Option<i64>,
    /// Seconds since replay last asked the queue for a batch.
    pub last_seen_secs: Option<f64>,
    /// The tick of the last batch applied here.
    pub applied_tick: Option<i64>,
    /// Seconds since it was applied.
    pub applied_secs_ago: f64,
    /// The error holding replay up, as replay recorded it.
    pub last_error: Option<String>,
    /// Seconds since that error was recorded.
    pub last_error_secs_ago: Option<f64>,
    /// Where a switchover or failover moved the provider (then the config's `provider_db`
    /// is not used).
    pub provider_moved_to: Option<String>,
    /// Every table added here.
    pub tables: Vec<TableLine>,
}

/// Another subscriber of the queue and how much it has applied (for choosing whom to promote
/// when the provider is gone).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PeerLine {
    /// Its consumer name.
    pub consumer: String,
    /// The provider's tick it has applied; `None` when it cannot be reached (see `error`).
    pub applied_tick: Option<i64>,
    /// Why it could not be read.
    pub error: Option<String>,
}

/// The other subscribers of `queue` (as the provider last listed them to this one) and the
/// tick each has applied; each given `wait` to answer.
pub async fn peer_positions(
    subscriber: &Client,
    queue: &str,
    wait: std::time::Duration,
) -> Result<Vec<PeerLine>, ReplicaError> {
    let mut lines = Vec::new();
    for (consumer, location) in store::peers(subscriber, queue).await? {
        let read = async {
            let conninfo = ferry_connect::ConnInfo::parse(&location)
                .map_err(|e| ReplicaError::connect("subscriber", e))?;
            let session =
                crate::session::open_session(&conninfo, "subscriber", "ferry status").await?;
            store::position(session.client(), queue).await
        };
        let (applied_tick, error) = match tokio::time::timeout(wait, read).await {
            Ok(Ok(tick)) => (tick, None),
            Ok(Err(e)) => (None, Some(ferry_daemon::logging::one_line(&e))),
            Err(_) => (None, Some("no answer".to_string())),
        };
        lines.push(PeerLine {
            consumer,
            applied_tick,
            error,
        });
    }
    Ok(lines)
}

/// Where replication of `queue` into this subscriber, as `consumer`, stands; `provider` is
/// `None` when it cannot be reached (then what only it knows is missing).
pub async fn status(
    provider: Option<&Client>,
    subscriber: &Client,
    queue: &str,
    consumer: &str,
) -> Result<ReplicationStatus, ReplicaError> {
    let record = store::replay_record(subscriber, queue).await?.ok_or_else(|| {
        ReplicaError::needs_setup(format!(
            "ferry is not installed on the subscriber for queue \"{queue}\": run `ferry CONFIG subscriber install`"
        ))
    })?;
    let tables = store::tables(subscriber, queue).await?;
    let ages = store::state_ages(subscriber, queue).await?;
    let copies = store::copy_progress(subscriber, queue).await?;
    let info = match provider {
        Some(provider) => ferry_queue::consumer_info(provider, Some(queue))
            .await?
            .into_iter()
            .find(|c| c.consumer == consumer),
        None => None,
    };
    let state = if record.paused {
        ReplayState::Paused
    } else if record.last_error.is_some() {
        ReplayState::StoppedOnError
    } else if tables.iter().any(|t| t.state.in_copy()) {
        ReplayState::Copying
    } else if tables
        .iter()
        .any(|t| matches!(t.state, TableState::CatchingUp(_)))
    {
        ReplayState::CatchingUp
    } else {
        ReplayState::Streaming
    };
    Ok(ReplicationStatus {
        queue: queue.to_string(),
        consumer: consumer.to_string(),
        state,
        lag_secs: info.as_ref().map(|c| c.lag_secs),
        pending_events: info.as_ref().map(|c| c.pending_events),
        last_seen_secs: info.as_ref().map(|c| c.last_seen_secs),
        applied_tick: record.applied_tick,
        applied_secs_ago: record.applied_secs_ago,
        last_error: record.last_error,
        last_error_secs_ago: record.last_error_secs_ago,
        provider_moved_to: store::provider_location(subscriber, queue).await?,
        tables: tables
            .iter()
            .map(|t| TableLine {
                table: t.table.to_string(),
                state: t.state.name().to_string(),
                since_secs: ages
                    .iter()
                    .find(|(name, _)| *name == t.table)
                    .map_or(0.0, |(_, secs)| *secs),
                copy: copies
                    .iter()
                    .find(|(name, _)| *name == t.table)
                    .map(|(_, progress)| progress.clone()),
            })
            .collect(),
    })
}
