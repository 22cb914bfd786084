//! The copies replay runs beside its batch stream: each table waiting for its copy is copied
//! by a task of its own, on sessions of its own, while batches go on being applied to the
//! tables already copied (how no event is lost meanwhile: [`crate::store::register_copy`]).
//! At most `parallel_copies` run at once; a copy that fails is tried again later, and one
//! table that cannot be copied never holds up the others.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use ferry_connect::{ConnInfo, Session};
use ferry_daemon::logging::one_line as report;
use ferry_daemon::{Remedy, Shutdown};
use tokio::task::JoinHandle;

use crate::copy::{copy_table, CopyDone, Slicing};
use crate::error::ReplicaError;
use crate::names::RelName;
use crate::progress::{CopyGauges, CopyReporter};
use crate::session::{enter_replica_mode, open_session};
use crate::store::StoredTable;

/// A table whose copy the subscriber refused (missing there, a column missing) is tried
/// again after this.
const RETRY_REFUSED: Duration = Duration::from_secs(30);
/// A copy that failed otherwise (a lost connection, a timeout) is tried again after this.
const RETRY_FAILED: Duration = Duration::from_secs(5);

/// How long after `error` a copy is tried again.
fn retry_after(error: &ReplicaError) -> Duration {
    if error.needs_user() {
        RETRY_REFUSED
    } else {
        RETRY_FAILED
    }
}

/// Where and what the copies copy.
#[derive(Clone)]
pub(crate) struct CopyTarget {
    /// The provider as replay's own session found it (where a switchover moved it, say).
    pub provider: ConnInfo,
    /// The subscriber.
    pub subscriber: ConnInfo,
    /// The queue whose tables are copied.
    pub queue: String,
    /// The job's name: the copy's sessions are `ferry replay JOB copy`, its progress
    /// session `ferry replay JOB progress`.
    pub job_name: String,
    /// The gauges of the copy in progress.
    pub gauges: CopyGauges,
    /// Slices a big table's copy is split into at most (`copy_slices`; 1: one stream).
    pub slices: usize,
}

/// How a copy ended, as [`Copies::reap`] hands it back.
pub(crate) struct CopyEnded {
    /// The table.
    pub table: RelName,
    /// What the copy did (`Ok(None)`: the table no longer waited for it).
    pub result: Result<Option<CopyDone>, ReplicaError>,
    /// How long it ran.
    pub elapsed: Duration,
}

/// A copy's provider and subscriber sessions (the subscriber's in replica mode), handed from
/// a copy that ended well to the next, so that a schema of many small tables does not pay two
/// connections per table.
struct CopySessions {
    provider: Session,
    subscriber: Session,
}

/// What a copy's task gives back: how it ended, and its sessions if they can serve again.
type CopyOutput = (Result<Option<CopyDone>, ReplicaError>, Option<CopySessions>);

/// A running copy's task, and when it started.
type RunningCopy = (JoinHandle<CopyOutput>, Instant);

/// The running copies, the sessions idle between copies, and when failed copies may be tried
/// again.
#[derive(Default)]
pub(crate) struct Copies {
    running: HashMap<RelName, RunningCopy>,
    idle: Vec<CopySessions>,
    retry_at: HashMap<RelName, Instant>,
}

impl Copies {
    /// Starts copies of `tables` that wait for one, are not running, and are not waiting to be
    /// tried again, until `limit` run, on idle sessions where there are. Returns how many
    /// started.
    pub fn start(&mut self, tables: &[StoredTable], limit: usize, target: &CopyTarget) -> usize {
        let now = Instant::now();
        let mut started = 0;
        for table in tables.iter().filter(|t| t.state.in_copy()) {
            if self.running.len() >= limit.max(1) {
                break;
            }
            if self.running.contains_key(&table.table)
                || self.retry_at.get(&table.table).is_some_and(|at| *at > now)
            {
                continue;
            }
            tracing::info!(table = %table.table, "copy started");
            // sessions closed while idle (a server restart) are not handed out
            self.idle
                .retain(|s| !s.provider.is_closed() && !s.subscriber.is_closed());
            let task = tokio::spawn(copy_in_task(
                target.clone(),
                table.table.clone(),
                self.idle.pop(),
            ));
            self.running.insert(table.table.clone(), (task, now));
            started += 1;
        }
        if self.running.is_empty() {
            // no copy left to run: idle sessions would only hold connections
            self.idle.clear();
        }
        started
    }

    /// Whether any copy runs.
    pub fn any_running(&self) -> bool {
        !self.running.is_empty()
    }

    /// The copies that have ended since the last call. A failed one is set to be tried again
    /// later (sooner unless the subscriber refused it); the caller reports it.
    pub async fn reap(&mut self) -> Vec<CopyEnded> {
        let finished: Vec<RelName> = self
            .running
            .iter()
            .filter(|(_, (task, _))| task.is_finished())
            .map(|(table, _)| table.clone())
            .collect();
        let mut ended = Vec::with_capacity(finished.len());
        for table in finished {
            let (task, started) = self.running.remove(&table).expect("listed above");
            let result = match task.await {
                Ok((result, sessions)) => {
                    self.idle.extend(sessions);
                    result
                }
                Err(join) => Err(ReplicaError::corrupt(format!(
                    "the copy of {table} ended abnormally: {join}"
                ))),
            };
            match &result {
                Ok(_) => {
                    self.retry_at.remove(&table);
                }
                Err(error) => {
                    self.retry_at
                        .insert(table.clone(), Instant::now() + retry_after(error));
                }
            }
            ended.push(CopyEnded {
                table,
                result,
                elapsed: started.elapsed(),
            });
        }
        ended
    }

    /// Abandons every running copy: its sessions close and its transactions roll back, the
    /// tables stay `in-copy`. The idle sessions close too (the provider may have moved).
    pub fn abandon(&mut self) {
        for (table, (task, _)) in self.running.drain() {
            task.abort();
            tracing::info!(table = %table, "copy abandoned; the table stays in-copy");
        }
        self.idle.clear();
    }

    /// Lets the running copies finish (a graceful stop), unless an immediate stop comes
    /// first, which abandons them.
    pub async fn finish(&mut self, shutdown: &mut Shutdown) {
        if self.running.is_empty() {
            return;
        }
        tracing::info!(
            copies = self.running.len(),
            "waiting for the running copies to finish"
        );
        while self.any_running() {
            tokio::select! {
                biased;
                _ = shutdown.wait_immediate() => {
                    self.abandon();
                    return;
                }
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
            for ended in self.reap().await {
                if let Some(error) = log_ended(ended) {
                    tracing::error!(error = %report(&error), "a copy failed");
                }
            }
        }
    }
}

/// Logs how a copy ended. Returns the error replay must stop for, if any (corrupt data, a
/// broken invariant).
pub(crate) fn log_ended(ended: CopyEnded) -> Option<ReplicaError> {
    match ended.result {
        Ok(Some(done)) => {
            tracing::info!(
                table = %ended.table,
                rows = done.rows,
                slices = done.slices,
                secs = ended.elapsed.as_secs_f64(),
                snapshot = %done.snapshot,
                "copy done: catching-up"
            );
            None
        }
        Ok(None) => None,
        Err(error) if error.remedy() == Remedy::Stop => Some(error),
        // one table that cannot be copied (missing there, a column missing) must not hold up
        // the others: it stays in-copy, its events are kept, it is tried again
        Err(error) => {
            tracing::warn!(
                table = %ended.table,
                error = %report(&error),
                retry_secs = retry_after(&error).as_secs(),
                "copy failed; the table stays in-copy"
            );
            None
        }
    }
}

/// One table's copy, on sessions of its own (`sessions`, or new ones); then a tick, so that the
/// table can become `ok` with the next batch instead of waiting for the queue's next event or
/// idle tick. The sessions are given back when the copy ended without an error.
async fn copy_in_task(
    target: CopyTarget,
    table: RelName,
    sessions: Option<CopySessions>,
) -> CopyOutput {
    let mut sessions = match sessions {
        Some(sessions) => sessions,
        None => match open_copy_sessions(&target).await {
            Ok(sessions) => sessions,
            Err(error) => return (Err(error), None),
        },
    };
    match copy_on(&target, &table, &mut sessions).await {
        Ok(done) => (Ok(done), Some(sessions)),
        Err(error) => (Err(error), None),
    }
}

/// The copy's name in `pg_stat_activity`.
fn copy_application_name(target: &CopyTarget) -> String {
    format!("ferry replay {} copy", target.job_name)
}

/// A provider and a subscriber session for copies, the subscriber's in replica mode.
async fn open_copy_sessions(target: &CopyTarget) -> Result<CopySessions, ReplicaError> {
    let application_name = copy_application_name(target);
    let subscriber = open_session(&target.subscriber, "subscriber", &application_name).await?;
    enter_replica_mode(subscriber.client()).await?;
    let provider = open_session(&target.provider, "provider", &application_name).await?;
    Ok(CopySessions {
        provider,
        subscriber,
    })
}

/// `table`'s copy on `sessions`, then the tick.
async fn copy_on(
    target: &CopyTarget,
    table: &RelName,
    sessions: &mut CopySessions,
) -> Result<Option<CopyDone>, ReplicaError> {
    let application_name = copy_application_name(target);
    let CopySessions {
        provider,
        subscriber,
    } = sessions;
    let mut reporter = CopyReporter::new(
        &target.subscriber,
        &format!("ferry replay {} progress", target.job_name),
        Some(target.gauges.clone()),
    );
    let slicing = (target.slices > 1).then(|| Slicing {
        slices: target.slices,
        provider: target.provider.clone(),
        subscriber: target.subscriber.clone(),
        application_name: application_name.clone(),
    });
    let done = copy_table(
        provider.client_mut(),
        subscriber.client_mut(),
        &target.queue,
        table,
        &mut reporter,
        slicing.as_ref(),
    )
    .await?;
    if done.is_some() {
        ferry_queue::tick(provider.client(), &target.queue).await?;
    }
    Ok(done)
}
