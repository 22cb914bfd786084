//! Waiting for a subscriber to have everything (`ferry CONFIG wait-sync`): every table `ok`,
//! and the subscriber's position a tick that saw every transaction committed on the provider
//! before the wait began.

use std::time::{Duration, Instant};

use tokio_postgres::Client;

use crate::error::{ErrorKind, ReplicaError, ResultExt};
use crate::names::RelName;
use crate::snapshot::Snapshot;
use crate::store::{self, TableState};

/// How often the wait looks again.
const POLL: Duration = Duration::from_millis(50);

/// Where the subscriber stands when a wait ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncState {
    /// Tables not `ok` yet, with their state.
    pub tables_not_ok: Vec<String>,
    /// The tick the subscriber has applied up to.
    pub applied_tick: Option<i64>,
    /// The tick that holds everything committed before the wait began.
    pub target_tick: i64,
}

/// Waits until every table of `queue` here (or, given `only`, those of them) is `ok` and the
/// subscriber has applied every transaction committed on the provider before this call, at
/// most `timeout`. A timeout is
/// an error of kind [`ErrorKind::TimedOut`] saying how far behind the subscriber is.
pub async fn wait_sync(
    provider: &Client,
    subscriber: &Client,
    queue: &str,
    only: Option<&[RelName]>,
    timeout: Duration,
) -> Result<SyncState, ReplicaError> {
    let deadline = Instant::now() + timeout;
    let wanted: Snapshot = provider
        .query_one("select txid_current_snapshot()::text", &[])
        .await
        .context("taking the provider's snapshot")?
        .get::<_, &str>(0)
        .parse()
        .map_err(ReplicaError::corrupt)?;
    // a tick now, taken after the snapshot, holds all it saw: no wait for the ticker
    let target_tick = ferry_queue::tick(provider, queue).await?;
    loop {
        let tables_not_ok: Vec<String> = store::tables(subscriber, queue)
            .await?
            .into_iter()
            .filter(|t| only.is_none_or(|only| only.contains(&t.table)))
            .filter(|t| t.state != TableState::Ok)
            .map(|t| format!("{} {}", t.table, t.state))
            .collect();
        let applied_tick = store::position(subscriber, queue).await?;
        let covered = match applied_tick {
            Some(tick) if tables_not_ok.is_empty() => {
                match ferry_queue::tick_snapshot(provider, queue, tick).await? {
                    Some(text) => text
                        .parse::<Snapshot>()
                        .map_err(ReplicaError::corrupt)?
                        .sees_all_of(&wanted),
                    None => false,
                }
            }
            _ => false,
        };
        let state = SyncState {
            tables_not_ok,
            applied_tick,
            target_tick,
        };
        if covered {
            return Ok(state);
        }
        if Instant::now() >= deadline {
            let applied = state
                .applied_tick
                .map_or_else(|| "none yet".to_string(), |t| format!("tick {t}"));
            let tables = if state.tables_not_ok.is_empty() {
                String::new()
            } else {
                format!("; not ok: {}", state.tables_not_ok.join(", "))
            };
            return Err(ReplicaError::new(
                ErrorKind::TimedOut,
                format!(
                    "the subscriber is not in sync after {} s: it has applied {applied}, everything committed before the wait is in tick {target_tick}{tables} (is replay running? `ferry CONFIG status` on the ticker's config shows the lag)",
                    timeout.as_secs_f64()
                ),
            ));
        }
        tokio::time::sleep(POLL).await;
    }
}
