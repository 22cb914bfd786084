//! One consistent point to read both sides at (Londiste's method): the compared tables are
//! locked on the provider (SHARE: writers wait, readers do not) just long enough to make a
//! tick, hold the subscriber's consumer at it, and take the provider snapshot the comparison
//! reads; then the lock goes. The provider snapshot and the tick see the same committed
//! writes to those tables, because none could commit in between. Replay applies up to that
//! tick and stops there; the subscriber is read in a snapshot whose position is that tick
//! (position and data commit together), and the hold ends.

use std::time::{Duration, Instant};

use tokio_postgres::{Client, IsolationLevel, Transaction};

use crate::error::{ErrorKind, ReplicaError, ResultExt};
use crate::names::RelName;
use crate::store::{self, TableState};

/// How often the wait for replay looks at the subscriber's position.
const POLL: Duration = Duration::from_millis(50);
/// How long a hold outlives the longest wait for replay (a killed command's hold lapses).
const HOLD_MARGIN: Duration = Duration::from_secs(60);

/// The tick both sides are read at, and how long the provider's tables stayed locked.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Tick {
    pub id: i64,
    pub lock_held: Duration,
}

/// Locks `tables` on the provider (`locker`, SHARE mode, in attempts of at most 100 ms until
/// `lock_timeout` has passed: writers hold their tables in any order, and a long wait could
/// deadlock with one of them), makes a tick of `queue`, holds `consumer` at it for `wait` plus
/// a margin, and starts the read-only snapshot the provider side is read in (on `reader`)
/// before the lock goes.
pub(crate) async fn make_tick<'r>(
    locker: &mut Client,
    reader: &'r mut Client,
    queue: &str,
    consumer: &str,
    tables: &[RelName],
    lock_timeout: Duration,
    wait: Duration,
) -> Result<(Tick, Transaction<'r>), ReplicaError> {
    let names: Vec<String> = tables.iter().map(RelName::quoted).collect();
    let lock = format!(
        "set local lock_timeout = {}; lock table {} in share mode",
        crate::switchover::GUARD_ATTEMPT
            .min(lock_timeout)
            .as_millis()
            .max(1),
        names.join(", ")
    );
    let deadline = Instant::now() + lock_timeout;
    let (ltx, locked_at) = loop {
        let ltx = locker
            .transaction()
            .await
            .context("starting the provider's lock transaction")?;
        match ltx.batch_execute(&lock).await {
            Ok(()) => break (ltx, Instant::now()),
            Err(e) if crate::switchover::is_lock_conflict(&e) && Instant::now() < deadline => {
                // the dropped transaction rolls back with the next statement; writers go on
                drop(ltx);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err(e) if crate::switchover::is_lock_conflict(&e) => {
                return Err(ReplicaError::with_cause(
                    ErrorKind::TimedOut,
                    format!(
                        "could not lock {} on the provider within {} ms: long transactions hold them (see pg_locks); try again, or with a longer --lock-timeout",
                        names.join(", "),
                        lock_timeout.as_millis()
                    ),
                    e,
                ));
            }
            Err(e) => return Err(ReplicaError::db("locking the compared tables".into(), e)),
        }
    };
    let tick = ferry_queue::tick(&ltx, queue).await?;
    if !ferry_queue::hold_consumer(&ltx, queue, consumer, tick, wait + HOLD_MARGIN).await? {
        return Err(ReplicaError::needs_setup(format!(
            "consumer \"{consumer}\" is not registered on queue \"{queue}\": run `ferry CONFIG subscriber install`"
        )));
    }
    let rtx = reader
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await
        .context("starting the provider's read")?;
    // the first statement takes the snapshot: while the lock is held
    rtx.batch_execute("select 1")
        .await
        .context("taking the provider's snapshot")?;
    ltx.commit()
        .await
        .context("committing the provider's tick")?;
    Ok((
        Tick {
            id: tick,
            lock_held: locked_at.elapsed(),
        },
        rtx,
    ))
}

/// Waits (at most `wait`) until replay has applied exactly up to `tick` on the subscriber,
/// then starts the subscriber's read there: a repeatable-read transaction whose position is
/// `tick`, with every one of `tables` `ok`. With `lock_position` the position stays locked
/// until the transaction ends, so replay applies nothing meanwhile (repair writes in it).
pub(crate) async fn subscriber_at<'s>(
    subscriber: &'s mut Client,
    queue: &str,
    tick: i64,
    tables: &[RelName],
    lock_position: bool,
    wait: Duration,
) -> Result<Transaction<'s>, ReplicaError> {
    let deadline = Instant::now() + wait;
    loop {
        let position = store::position(&*subscriber, queue).await?;
        match position {
            Some(p) if p == tick => break,
            Some(p) if p > tick => {
                return Err(ReplicaError::new(
                    ErrorKind::TimedOut,
                    format!("replay went past tick {tick} (it is at {p}) before the subscriber was read: the hold lapsed; try again"),
                ))
            }
            _ => {}
        }
        if Instant::now() >= deadline {
            let at = position.map_or_else(
                || "nothing applied yet".to_string(),
                |p| format!("tick {p}"),
            );
            return Err(ReplicaError::new(
                ErrorKind::TimedOut,
                format!(
                    "replay did not reach tick {tick} within {} s (the subscriber is at {at}): is replay running and not paused? `ferry CONFIG status` says",
                    wait.as_secs_f64()
                ),
            ));
        }
        tokio::time::sleep(POLL).await;
    }
    let stx = subscriber
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .start()
        .await
        .context("starting the subscriber's read")?;
    let position = if lock_position {
        store::lock_position(&stx, queue).await?.0
    } else {
        store::position(&stx, queue).await?
    };
    if position != Some(tick) {
        return Err(ReplicaError::new(
            ErrorKind::TimedOut,
            format!("replay moved past tick {tick} while the subscriber's read began: try again"),
        ));
    }
    let states = store::tables(&stx, queue).await?;
    for table in tables {
        match states.iter().find(|t| &t.table == table) {
            Some(t) if t.state == TableState::Ok => {}
            Some(t) => {
                return Err(ReplicaError::invalid_input(format!(
                    "table {table} is {} on the subscriber: compare it once it is ok (`ferry CONFIG wait-sync`)",
                    t.state
                ))
                .about(table))
            }
            None => {
                return Err(ReplicaError::invalid_input(format!(
                    "table {table} is not replicated on this subscriber (`ferry CONFIG subscriber tables` lists those that are)"
                ))
                .about(table))
            }
        }
    }
    Ok(stx)
}
