//! The subscriber's store: the only code that reads or writes `ferry.subscriber_position`,
//! `ferry.subscriber_table`, `ferry.subscriber_seq` and `ferry.subscriber_stash` (see
//! `sql/subscriber/`).
//!
//! A table's state is parsed once, into [`TableState`], and changes only through the
//! transitions here, each of which names the state it leaves in its `where` clause, so a
//! transition that races with another (a `resync` during a copy, say) changes nothing:
//!
//! ```text
//!  add ──▶ InCopy ──register_copy──▶ Copying(snapshot) ──record_copied──▶ CatchingUp(snapshot) ──mark_ok──▶ Ok
//!            ▲                            │  ▲  register_copy again                                   │
//!            │                            └──┘  (a copy cut short)                                    │
//!            └──────────────────────────── resync / send_all_to_copy ◀───────────────────────────────┘
//! ```
//!
//! Copies run beside the batch stream. A table is `Copying` from the moment a copy recorded
//! its snapshot (under the position's row lock, so between two batches); from then on every
//! batch keeps the table's events its copy cannot contain in the stash ([`stash_events`]), and
//! the first batch to find the table `CatchingUp` applies them first ([`stashed_events`]).
//!
//! The position (the tick of the last batch applied here) is written in the same
//! transaction as each batch's changes; [`batch_step`] is the one rule comparing it with a
//! batch or with the queue's record of the consumer.

use tokio_postgres::types::Type;
use tokio_postgres::{GenericClient, Transaction};

use crate::error::{ReplicaError, ResultExt};
use crate::names::RelName;
use crate::prepared::{self, Prepared};
use crate::snapshot::Snapshot;

/// A replicated table's state on the subscriber.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TableState {
    /// Waiting for its initial copy: replay skips its events, which the copy will contain
    /// (a copy's snapshot is taken after every batch applied so far).
    InCopy,
    /// A copy reads (or read, and was cut short) under this provider snapshot: replay keeps
    /// the events of transactions it does not see in the stash, to be applied after the copy.
    /// Stored as `in-copy` with the snapshot.
    Copying(Snapshot),
    /// Copied under this provider snapshot: events of transactions it saw are skipped.
    CatchingUp(Snapshot),
    /// Every event is applied.
    Ok,
}

impl TableState {
    /// The name stored in `subscriber_table.state` and shown by `subscriber tables`.
    pub fn name(&self) -> &'static str {
        match self {
            TableState::InCopy | TableState::Copying(_) => "in-copy",
            TableState::CatchingUp(_) => "catching-up",
            TableState::Ok => "ok",
        }
    }

    /// The state stored as `state` with `copy_snapshot`; anything else is corrupt.
    fn parse(state: &str, copy_snapshot: Option<&str>) -> Result<TableState, String> {
        match (state, copy_snapshot) {
            ("in-copy", None) => Ok(TableState::InCopy),
            ("in-copy", Some(snapshot)) => Ok(TableState::Copying(snapshot.parse()?)),
            ("catching-up", Some(snapshot)) => Ok(TableState::CatchingUp(snapshot.parse()?)),
            ("catching-up", None) => Err("catching-up without the copy's snapshot".into()),
            ("ok", _) => Ok(TableState::Ok),
            (other, _) => Err(format!("unknown state {other:?}")),
        }
    }

    /// Whether an event of transaction `txid` is applied to a table in this state.
    pub fn applies(&self, txid: i64) -> bool {
        match self {
            TableState::InCopy | TableState::Copying(_) => false,
            TableState::CatchingUp(copy) => !copy.sees(txid),
            TableState::Ok => true,
        }
    }

    /// Whether an event of transaction `txid` is kept in the stash: the table's copy runs
    /// under a snapshot that does not see the transaction.
    pub fn keeps(&self, txid: i64) -> bool {
        match self {
            TableState::Copying(copy) => !copy.sees(txid),
            _ => false,
        }
    }

    /// Whether the table waits for its copy (none has finished since it was added or sent back).
    pub fn in_copy(&self) -> bool {
        matches!(self, TableState::InCopy | TableState::Copying(_))
    }
}

impl std::fmt::Display for TableState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl serde::Serialize for TableState {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.name())
    }
}

/// A replicated table as stored on the subscriber.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StoredTable {
    /// The table.
    pub table: RelName,
    /// Its state.
    pub state: TableState,
    /// Keep the rows already here when copying (`subscriber add --skip-truncate`).
    pub skip_truncate: bool,
}

/// The tables added for `queue` here, by name.
pub async fn tables(
    client: &impl GenericClient,
    queue: &str,
) -> Result<Vec<StoredTable>, ReplicaError> {
    tables_prepared(client, None, queue).await
}

/// [`tables`], through the statement `prepared` keeps for it when given (replay reads the
/// table states at every batch).
pub async fn tables_prepared(
    client: &impl GenericClient,
    prepared: Option<&Prepared>,
    queue: &str,
) -> Result<Vec<StoredTable>, ReplicaError> {
    let rows = prepared::query(
        client,
        prepared,
        r#"select "table_schema", "table_name", "state", "copy_snapshot", "skip_truncate"
             from "ferry"."subscriber_table" where "queue_name" = $1 order by 1, 2"#,
        &[(&queue, Type::TEXT)],
    )
    .await
    .context("reading the subscriber's tables")?;
    rows.iter()
        .map(|r| {
            let table = RelName::new(r.get::<_, String>(0), r.get::<_, String>(1));
            let state = TableState::parse(r.get(2), r.get(3)).map_err(|e| {
                ReplicaError::corrupt(format!("the stored state of {table} cannot be read: {e}"))
            })?;
            Ok(StoredTable {
                table,
                state,
                skip_truncate: r.get(4),
            })
        })
        .collect()
}

/// Locks `table`'s state for recording a copy's snapshot, without waiting: `false` when the
/// table is no longer waiting for a copy. Another session holding the state (a copy of a
/// replay killed while its TRUNCATE waited for a lock: its session lives on until the lock
/// comes) is an error to try again later, so that the position's row lock, taken next, is
/// never held while waiting for it.
pub async fn lock_for_copy(
    stx: &Transaction<'_>,
    queue: &str,
    table: &RelName,
) -> Result<bool, ReplicaError> {
    let locked = stx
        .query_opt(
            r#"select 1 from "ferry"."subscriber_table"
                where "queue_name" = $1 and "table_schema" = $2 and "table_name" = $3
                  and "state" = 'in-copy'
                  for update nowait"#,
            &[&queue, &table.schema, &table.name],
        )
        .await;
    match locked {
        Ok(row) => Ok(row.is_some()),
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE) => {
            Err(ReplicaError::new(
                crate::error::ErrorKind::Db,
                format!("another session holds the state of {table} (a copy of an earlier replay, still waiting for a lock on the table?); the copy is tried again later"),
            )
            .about(table))
        }
        Err(e) => Err(e).with_context(|| format!("locking the state of {table}")),
    }
}

/// `InCopy` or `Copying` → `Copying(snapshot)`: a copy of `table` is about to read under
/// `snapshot`. Call it in a transaction that holds the position's row lock
/// ([`lock_position`]) from before `snapshot` was taken until it commits: no batch is being
/// applied then, so every batch applied before saw only transactions the snapshot sees, and
/// every batch after reads the snapshot and keeps what it does not see. `false` when the
/// table is no longer waiting for a copy.
pub async fn register_copy(
    stx: &Transaction<'_>,
    queue: &str,
    table: &RelName,
    snapshot: &Snapshot,
) -> Result<bool, ReplicaError> {
    // Events kept for an earlier attempt are of transactions committed before the batches
    // applied so far, all of which this snapshot sees: the new copy holds them, they go.
    let changed: i64 = stx
        .query_one(
            r#"with changed as (
                   update "ferry"."subscriber_table" set "copy_snapshot" = $4
                    where "queue_name" = $1 and "table_schema" = $2 and "table_name" = $3
                      and "state" = 'in-copy'
                   returning 1),
               forgotten as (
                   delete from "ferry"."subscriber_stash"
                    where "queue_name" = $1 and "table_schema" = $2 and "table_name" = $3
                      and exists (select 1 from changed))
               select count(*) from changed"#,
            &[&queue, &table.schema, &table.name, &snapshot.to_string()],
        )
        .await
        .with_context(|| format!("recording the snapshot of the copy of {table}"))?
        .get(0);
    Ok(changed == 1)
}

/// Locks `table`'s state for its copy under `snapshot`, in the copy's transaction. `None`
/// when the table is no longer `Copying(snapshot)` (removed, sent back to copy, copied
/// meanwhile); otherwise whether to keep the rows already here.
pub async fn claim_for_copy(
    stx: &Transaction<'_>,
    queue: &str,
    table: &RelName,
    snapshot: &Snapshot,
) -> Result<Option<bool>, ReplicaError> {
    Ok(stx
        .query_opt(
            r#"select "skip_truncate" from "ferry"."subscriber_table"
                where "queue_name" = $1 and "table_schema" = $2 and "table_name" = $3
                  and "state" = 'in-copy' and "copy_snapshot" = $4
                  for update"#,
            &[&queue, &table.schema, &table.name, &snapshot.to_string()],
        )
        .await
        .with_context(|| format!("locking the state of {table}"))?
        .map(|row| row.get(0)))
}

/// `Copying(snapshot)` → `CatchingUp(snapshot)`: the copy of `rows` rows under `snapshot`
/// is in this transaction.
pub async fn record_copied(
    stx: &Transaction<'_>,
    queue: &str,
    table: &RelName,
    snapshot: &Snapshot,
    rows: u64,
) -> Result<(), ReplicaError> {
    let changed = stx
        .execute(
            r#"update "ferry"."subscriber_table"
                  set "state" = 'catching-up', "copied_rows" = $5, "state_changed" = now()
                where "queue_name" = $1 and "table_schema" = $2 and "table_name" = $3
                  and "state" = 'in-copy' and "copy_snapshot" = $4"#,
            &[
                &queue,
                &table.schema,
                &table.name,
                &snapshot.to_string(),
                &(rows as i64),
            ],
        )
        .await
        .with_context(|| format!("recording the copy of {table}"))?;
    expect_one(changed, table, "in-copy", "catching-up")
}

/// How far a running copy has got, as replay last recorded it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct CopyProgress {
    /// Rows copied so far.
    pub rows_done: i64,
    /// Bytes of rows (COPY text) copied so far.
    pub bytes_done: i64,
    /// Rows the provider's statistics expect (`None` when it has none: never analyzed).
    pub rows_expected: Option<i64>,
    /// Seconds since the copy started.
    pub elapsed_secs: f64,
    /// Seconds between the copy's start and this record: the rate's time base.
    pub recorded_after_secs: f64,
}

impl CopyProgress {
    /// Rows copied per second so far.
    pub fn rows_per_sec(&self) -> Option<f64> {
        (self.recorded_after_secs > 0.0).then(|| self.rows_done as f64 / self.recorded_after_secs)
    }

    /// Seconds left at the rate so far, when the rows expected are known.
    pub fn eta_secs(&self) -> Option<f64> {
        let (expected, rate) = (self.rows_expected?, self.rows_per_sec()?);
        (rate > 0.0).then(|| {
            let left = (expected - self.rows_done).max(0) as f64 / rate;
            (left - (self.elapsed_secs - self.recorded_after_secs)).max(0.0)
        })
    }
}

impl std::fmt::Display for CopyProgress {
    /// `copied 523000 of ~1000000 rows (52%), 48.2 MB, 42000 rows/s, eta 11 s`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "copied {}", self.rows_done)?;
        match self.rows_expected {
            Some(expected) if expected > 0 => write!(
                f,
                " of ~{expected} rows ({:.0}%)",
                (self.rows_done as f64 * 100.0 / expected as f64).min(100.0)
            )?,
            _ => write!(f, " rows")?,
        }
        write!(f, ", {:.1} MB", self.bytes_done as f64 / 1e6)?;
        if let Some(rate) = self.rows_per_sec() {
            write!(f, ", {rate:.0} rows/s")?;
        }
        if let Some(eta) = self.eta_secs() {
            write!(f, ", eta {eta:.0} s")?;
        }
        Ok(())
    }
}

/// Records how far the copy of `table` has got (from a session other than the copy's):
/// `elapsed` since the copy started.
pub async fn record_copy_progress(
    client: &impl GenericClient,
    queue: &str,
    table: &RelName,
    rows_done: u64,
    bytes_done: u64,
    rows_expected: Option<u64>,
    elapsed: std::time::Duration,
) -> Result<(), ReplicaError> {
    client
        .execute(
            r#"insert into "ferry"."subscriber_copy_progress" as p
                      ("queue_name", "table_schema", "table_name", "started_at", "updated_at",
                       "rows_done", "bytes_done", "rows_expected")
               values ($1, $2, $3, now() - make_interval(secs => $4), now(), $5, $6, $7)
               on conflict ("queue_name", "table_schema", "table_name") do update
                  set "started_at" = excluded."started_at", "updated_at" = excluded."updated_at",
                      "rows_done" = excluded."rows_done", "bytes_done" = excluded."bytes_done",
                      "rows_expected" = excluded."rows_expected""#,
            &[
                &queue,
                &table.schema,
                &table.name,
                &elapsed.as_secs_f64(),
                &(rows_done as i64),
                &(bytes_done as i64),
                &rows_expected.map(|n| n as i64),
            ],
        )
        .await
        .with_context(|| format!("recording the progress of the copy of {table}"))?;
    Ok(())
}

/// Removes the progress of `table`'s copy, in the copy's transaction.
pub async fn forget_copy_progress(
    stx: &Transaction<'_>,
    queue: &str,
    table: &RelName,
) -> Result<(), ReplicaError> {
    stx.execute(
        r#"delete from "ferry"."subscriber_copy_progress"
            where "queue_name" = $1 and "table_schema" = $2 and "table_name" = $3"#,
        &[&queue, &table.schema, &table.name],
    )
    .await
    .with_context(|| format!("ending the progress of the copy of {table}"))?;
    Ok(())
}

/// The progress of the copies of `queue`'s tables still `in-copy` here, by table.
pub async fn copy_progress(
    client: &impl GenericClient,
    queue: &str,
) -> Result<Vec<(RelName, CopyProgress)>, ReplicaError> {
    let rows = client
        .query(
            r#"select p."table_schema", p."table_name", p."rows_done", p."bytes_done",
                      p."rows_expected",
                      extract(epoch from now() - p."started_at")::float8,
                      extract(epoch from p."updated_at" - p."started_at")::float8
                 from "ferry"."subscriber_copy_progress" p
                 join "ferry"."subscriber_table" t using ("queue_name", "table_schema", "table_name")
                where p."queue_name" = $1 and t."state" = 'in-copy'
                order by 1, 2"#,
            &[&queue],
        )
        .await
        .context("reading the copies' progress")?;
    Ok(rows
        .iter()
        .map(|r| {
            (
                RelName::new(r.get::<_, String>(0), r.get::<_, String>(1)),
                CopyProgress {
                    rows_done: r.get(2),
                    bytes_done: r.get(3),
                    rows_expected: r.get(4),
                    elapsed_secs: r.get(5),
                    recorded_after_secs: r.get(6),
                },
            )
        })
        .collect())
}

/// `CatchingUp` → `Ok`, in the transaction of the batch whose tick saw everything the copy
/// saw. `false` when the table is no longer catching up (a `resync` or `remove` committed
/// since the batch read the states): it is left as that left it.
pub async fn mark_ok(
    stx: &Transaction<'_>,
    queue: &str,
    table: &RelName,
) -> Result<bool, ReplicaError> {
    let changed = stx
        .execute(
            r#"update "ferry"."subscriber_table" set "state" = 'ok', "state_changed" = now()
                where "queue_name" = $1 and "table_schema" = $2 and "table_name" = $3
                  and "state" = 'catching-up'"#,
            &[&queue, &table.schema, &table.name],
        )
        .await
        .with_context(|| format!("marking {table} ok"))?;
    Ok(changed == 1)
}

/// A transition that found its table in another state than the one it leaves although the
/// transaction making it holds the state's lock: a broken invariant.
fn expect_one(changed: u64, table: &RelName, from: &str, to: &str) -> Result<(), ReplicaError> {
    if changed == 1 {
        Ok(())
    } else {
        Err(ReplicaError::corrupt(format!(
            "{table} was not {from} when it was to become {to}"
        )))
    }
}

/// Every table of `queue` here back to `InCopy` (the consumer had to be registered anew:
/// events before that are lost to it), forgetting the snapshots of copies and the events
/// kept for them. Returns how many tables were not waiting for a copy before.
pub async fn send_all_to_copy(
    client: &impl GenericClient,
    queue: &str,
) -> Result<u64, ReplicaError> {
    let rows = client
        .query(
            r#"with forgotten as (
                   delete from "ferry"."subscriber_stash" where "queue_name" = $1),
               changed as (
                   update "ferry"."subscriber_table" t
                      set "state" = 'in-copy', "copy_snapshot" = null, "copied_rows" = null,
                          "state_changed" = case when t."state" = 'in-copy'
                                                 then t."state_changed" else now() end
                     from "ferry"."subscriber_table" before
                    where t."queue_name" = $1
                      and (before."queue_name", before."table_schema", before."table_name")
                          = (t."queue_name", t."table_schema", t."table_name")
                      and (t."state" <> 'in-copy' or t."copy_snapshot" is not null)
                   returning before."state")
               select count(*) filter (where "state" <> 'in-copy') from changed"#,
            &[&queue],
        )
        .await
        .context("sending tables back to in-copy")?;
    Ok(rows[0].get::<_, i64>(0) as u64)
}

/// Adds `table` for `queue` (`InCopy`) and protects it from writers other than replay
/// (`ferry.subscriber_add_table`). `true` when new.
pub async fn add_table(
    client: &impl GenericClient,
    queue: &str,
    table: &RelName,
    skip_truncate: bool,
) -> Result<bool, ReplicaError> {
    let added: i32 = client
        .query_one(
            r#"select "ferry"."subscriber_add_table"($1, $2, $3, $4)"#,
            &[&queue, &table.schema, &table.name, &skip_truncate],
        )
        .await
        .with_context(|| format!("adding {table} on the subscriber"))?
        .get(0);
    Ok(added == 1)
}

/// Stops replicating `table` here and lifts its protection. `true` when it was added.
pub async fn remove_table(
    client: &impl GenericClient,
    queue: &str,
    table: &RelName,
) -> Result<bool, ReplicaError> {
    let what = format!("removing {table} on the subscriber");
    call_table_function(client, "subscriber_remove_table", queue, table, &what).await
}

/// Any state → `InCopy` for one table: replay copies it again. `true` when it is added here.
pub async fn resync_table(
    client: &impl GenericClient,
    queue: &str,
    table: &RelName,
) -> Result<bool, ReplicaError> {
    let what = format!("resyncing {table}");
    call_table_function(client, "subscriber_resync_table", queue, table, &what).await
}

/// Calls `ferry.<function>(queue, schema, name)`, which returns 1 when it changed the table's
/// registration and 0 when the table is not added here.
async fn call_table_function(
    client: &impl GenericClient,
    function: &str,
    queue: &str,
    table: &RelName,
    what: &str,
) -> Result<bool, ReplicaError> {
    let done: i32 = client
        .query_one(
            &format!(r#"select "ferry"."{function}"($1, $2, $3)"#),
            &[&queue, &table.schema, &table.name],
        )
        .await
        .context(what)?
        .get(0);
    Ok(done == 1)
}

/// The sequences kept in step here for `queue`.
pub async fn seqs(client: &impl GenericClient, queue: &str) -> Result<Vec<RelName>, ReplicaError> {
    let rows = client
        .query_typed(
            r#"select "seq_schema", "seq_name" from "ferry"."subscriber_seq"
                where "queue_name" = $1 order by 1, 2"#,
            &[(&queue, Type::TEXT)],
        )
        .await
        .context("listing the subscriber's sequences")?;
    Ok(rows
        .iter()
        .map(|r| RelName::new(r.get::<_, String>(0), r.get::<_, String>(1)))
        .collect())
}

/// Keeps `seq` in step here for `queue`. `true` when new.
pub async fn add_seq(
    client: &impl GenericClient,
    queue: &str,
    seq: &RelName,
) -> Result<bool, ReplicaError> {
    let added = client
        .execute(
            r#"insert into "ferry"."subscriber_seq" ("queue_name", "seq_schema", "seq_name")
               values ($1, $2, $3) on conflict do nothing"#,
            &[&queue, &seq.schema, &seq.name],
        )
        .await
        .with_context(|| format!("adding sequence {seq} on the subscriber"))?;
    Ok(added == 1)
}

/// Stops keeping `seq` in step. `true` when it was added.
pub async fn remove_seq(
    client: &impl GenericClient,
    queue: &str,
    seq: &RelName,
) -> Result<bool, ReplicaError> {
    let removed = client
        .execute(
            r#"delete from "ferry"."subscriber_seq"
                where "queue_name" = $1 and "seq_schema" = $2 and "seq_name" = $3"#,
            &[&queue, &seq.schema, &seq.name],
        )
        .await
        .with_context(|| format!("removing sequence {seq} on the subscriber"))?;
    Ok(removed == 1)
}

/// Records that this subscriber replicates `queue` as `consumer` (no position yet). Running
/// it again changes nothing.
pub async fn record_queue(
    client: &impl GenericClient,
    queue: &str,
    consumer: &str,
) -> Result<(), ReplicaError> {
    client
        .execute(
            r#"insert into "ferry"."subscriber_position" ("queue_name", "consumer")
               values ($1, $2) on conflict ("queue_name") do nothing"#,
            &[&queue, &consumer],
        )
        .await
        .context("recording the queue on the subscriber")?;
    Ok(())
}

/// Takes `table` on as already identical to the provider's at this side's position (a
/// switchover: no copy): registered `ok` for `queue` and protected.
pub async fn adopt_table(
    client: &impl GenericClient,
    queue: &str,
    table: &RelName,
) -> Result<(), ReplicaError> {
    client
        .execute(
            r#"insert into "ferry"."subscriber_table" ("queue_name", "table_schema", "table_name", "state")
               values ($1, $2, $3, 'ok')
               on conflict ("queue_name", "table_schema", "table_name") do update
                  set "state" = 'ok', "copy_snapshot" = null, "copied_rows" = null,
                      "state_changed" = now()"#,
            &[&queue, &table.schema, &table.name],
        )
        .await
        .with_context(|| format!("taking {table} on as ok"))?;
    client
        .execute(
            r#"select "ferry"."subscriber_protect"(to_regclass($1), $2)"#,
            &[&table.quoted(), &queue],
        )
        .await
        .with_context(|| format!("protecting {table}"))?;
    Ok(())
}

/// Records that this side replicates `queue` as `consumer` and has applied it up to `tick`
/// (a switchover: the tick the consumer was registered at).
pub async fn set_position(
    client: &impl GenericClient,
    queue: &str,
    consumer: &str,
    tick: i64,
) -> Result<(), ReplicaError> {
    client
        .execute(
            r#"insert into "ferry"."subscriber_position" ("queue_name", "consumer", "last_tick_id")
               values ($1, $2, $3)
               on conflict ("queue_name") do update
                  set "consumer" = excluded."consumer", "last_tick_id" = excluded."last_tick_id",
                      "paused" = false, "last_error" = null, "last_error_at" = null,
                      "updated" = now()"#,
            &[&queue, &consumer, &tick],
        )
        .await
        .context("recording the position")?;
    Ok(())
}

/// Forgets `queue` on this side: its tables (their protection lifted), sequences, copy
/// progress and position. Returns how many tables it had.
pub async fn forget_queue(client: &impl GenericClient, queue: &str) -> Result<u64, ReplicaError> {
    let tables = tables(client, queue).await?;
    for table in &tables {
        remove_table(client, queue, &table.table).await?;
    }
    client
        .batch_execute(&format!(
            r#"delete from "ferry"."subscriber_seq" where "queue_name" = {q};
               delete from "ferry"."subscriber_copy_progress" where "queue_name" = {q};
               delete from "ferry"."subscriber_peer" where "queue_name" = {q};
               delete from "ferry"."subscriber_position" where "queue_name" = {q};"#,
            q = crate::names::quote_literal(queue)
        ))
        .await
        .with_context(|| format!("forgetting queue \"{queue}\" on the subscriber"))?;
    Ok(tables.len() as u64)
}

/// Where a switchover or failover moved `queue`'s provider to, if it did (a connection
/// string without its password). `None` also when the store is not installed (yet).
pub async fn provider_location(
    client: &impl GenericClient,
    queue: &str,
) -> Result<Option<String>, ReplicaError> {
    let installed: bool = client
        .query_one(
            "select exists (select 1 from pg_attribute
                             where attrelid = to_regclass('\"ferry\".\"subscriber_position\"')
                               and attname = 'provider_location' and not attisdropped)",
            &[],
        )
        .await
        .context("looking for the provider's location")?
        .get(0);
    if !installed {
        return Ok(None);
    }
    Ok(client
        .query_opt(
            r#"select "provider_location" from "ferry"."subscriber_position" where "queue_name" = $1"#,
            &[&queue],
        )
        .await
        .context("reading the provider's location")?
        .and_then(|row| row.get(0)))
}

/// Records that `queue`'s provider is now at `location` (`None`: where the config says).
pub async fn set_provider_location(
    client: &impl GenericClient,
    queue: &str,
    location: Option<&str>,
) -> Result<(), ReplicaError> {
    client
        .execute(
            r#"update "ferry"."subscriber_position" set "provider_location" = $2 where "queue_name" = $1"#,
            &[&queue, &location],
        )
        .await
        .context("recording the provider's location")?;
    Ok(())
}

/// The other subscribers of `queue` as the provider last listed them: (consumer, location).
pub async fn peers(
    client: &impl GenericClient,
    queue: &str,
) -> Result<Vec<(String, String)>, ReplicaError> {
    let rows = client
        .query(
            r#"select "consumer", "location" from "ferry"."subscriber_peer" where "queue_name" = $1 order by 1"#,
            &[&queue],
        )
        .await
        .context("reading the other subscribers")?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// Replaces the list of `queue`'s other subscribers.
pub async fn record_peers(
    client: &mut tokio_postgres::Client,
    queue: &str,
    peers: &[(String, String)],
) -> Result<(), ReplicaError> {
    let tx = client
        .transaction()
        .await
        .context("recording the other subscribers")?;
    tx.execute(
        r#"delete from "ferry"."subscriber_peer" where "queue_name" = $1"#,
        &[&queue],
    )
    .await
    .context("recording the other subscribers")?;
    for (consumer, location) in peers {
        tx.execute(
            r#"insert into "ferry"."subscriber_peer" ("queue_name", "consumer", "location") values ($1, $2, $3)"#,
            &[&queue, consumer, location],
        )
        .await
        .context("recording the other subscribers")?;
    }
    tx.commit().await.context("recording the other subscribers")
}

/// Whether this subscriber replicates `queue` (its store is installed and the queue
/// recorded).
pub async fn has_queue(client: &impl GenericClient, queue: &str) -> Result<bool, ReplicaError> {
    Ok(client
        .query_one(
            r#"select exists (select 1 from "ferry"."subscriber_position" where "queue_name" = $1)"#,
            &[&queue],
        )
        .await
        .context("reading the subscriber's queues")?
        .get(0))
}

/// The tick of the last batch applied here for `queue` (`None` before the first batch, or
/// after every table was sent back to copy).
pub async fn position(
    client: &impl GenericClient,
    queue: &str,
) -> Result<Option<i64>, ReplicaError> {
    Ok(client
        .query_opt(
            r#"select "last_tick_id" from "ferry"."subscriber_position" where "queue_name" = $1"#,
            &[&queue],
        )
        .await
        .context("reading the subscriber's position")?
        .and_then(|row| row.get(0)))
}

/// The position for `queue`, and whether replay is paused, locked until the batch's
/// transaction ends: no other replay can apply a batch meanwhile, and a pause made now waits
/// for this batch and holds the next.
pub async fn lock_position(
    stx: &Transaction<'_>,
    queue: &str,
) -> Result<(Option<i64>, bool), ReplicaError> {
    lock_position_prepared(stx, None, queue).await
}

/// [`lock_position`], through the statement `prepared` keeps for it when given (replay, at
/// every batch).
pub async fn lock_position_prepared(
    stx: &Transaction<'_>,
    prepared: Option<&Prepared>,
    queue: &str,
) -> Result<(Option<i64>, bool), ReplicaError> {
    let row = prepared::query(
        stx,
        prepared,
        r#"select "last_tick_id", "paused" from "ferry"."subscriber_position"
            where "queue_name" = $1 for update"#,
        &[(&queue, Type::TEXT)],
    )
    .await
    .context("reading the subscriber's position")?
    .into_iter()
    .next()
    .ok_or_else(|| {
            ReplicaError::needs_setup(format!(
                "ferry is not installed on the subscriber for queue \"{queue}\": run `ferry CONFIG subscriber install`"
            ))
        })?;
    Ok((row.get(0), row.get(1)))
}

/// Records `tick` as the position, in the batch's transaction (through the statement
/// `prepared` keeps for it).
pub async fn record_position(
    stx: &Transaction<'_>,
    prepared: &Prepared,
    queue: &str,
    tick: i64,
) -> Result<(), ReplicaError> {
    prepared::query(
        stx,
        Some(prepared),
        r#"update "ferry"."subscriber_position" set "last_tick_id" = $2, "updated" = now()
            where "queue_name" = $1"#,
        &[(&queue, Type::TEXT), (&tick, Type::INT8)],
    )
    .await
    .context("recording the subscriber's position")?;
    Ok(())
}

/// Forgets the position for `queue`: only right when every table of the queue here is
/// waiting for its copy (events before the copies do not matter to them).
pub async fn forget_position(client: &impl GenericClient, queue: &str) -> Result<(), ReplicaError> {
    client
        .execute(
            r#"update "ferry"."subscriber_position" set "last_tick_id" = null, "updated" = now()
                where "queue_name" = $1"#,
            &[&queue],
        )
        .await
        .context("resetting the subscriber's position")?;
    Ok(())
}

/// Pauses (or resumes) replay of `queue` here: while paused it applies and copies nothing and
/// keeps its position. `false` when the queue is not set up here.
pub async fn set_paused(
    client: &impl GenericClient,
    queue: &str,
    paused: bool,
) -> Result<bool, ReplicaError> {
    let changed = client
        .execute(
            r#"update "ferry"."subscriber_position" set "paused" = $2 where "queue_name" = $1"#,
            &[&queue, &paused],
        )
        .await
        .context("recording the pause")?;
    Ok(changed == 1)
}

/// What replay reads at the start of each round, in one round trip: whether it is paused,
/// and where a switchover or failover moved the provider (see [`provider_location`]; the
/// store must be installed, as replay checks at start). Through the statement `prepared`
/// keeps for it.
pub async fn round_flags(
    client: &impl GenericClient,
    prepared: &Prepared,
    queue: &str,
) -> Result<(bool, Option<String>), ReplicaError> {
    Ok(prepared::query(
        client,
        Some(prepared),
        r#"select "paused", "provider_location" from "ferry"."subscriber_position" where "queue_name" = $1"#,
        &[(&queue, Type::TEXT)],
    )
    .await
    .context("reading the pause")?
    .first()
    .map_or((false, None), |row| (row.get(0), row.get(1))))
}

/// Records the error holding replay of `queue` up (`None`: clears it, work goes on), for
/// `status` and `ferry.stat_subscription`.
pub async fn record_error(
    client: &impl GenericClient,
    queue: &str,
    error: Option<&str>,
) -> Result<(), ReplicaError> {
    client
        .execute(
            r#"update "ferry"."subscriber_position"
                  set "last_error" = $2::text,
                      "last_error_at" = case when $2::text is null then null else now() end
                where "queue_name" = $1"#,
            &[&queue, &error],
        )
        .await
        .context("recording replay's last error")?;
    Ok(())
}

/// The subscriber's record of replay of one queue: position, pause, last error.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ReplayRecord {
    /// The tick of the last batch applied.
    pub applied_tick: Option<i64>,
    /// Seconds since that batch was applied.
    pub applied_secs_ago: f64,
    /// Whether replay is paused.
    pub paused: bool,
    /// The error holding replay up now.
    pub last_error: Option<String>,
    /// Seconds since that error was recorded.
    pub last_error_secs_ago: Option<f64>,
}

/// The subscriber's record of replay of `queue`; `None` when the queue is not set up here.
pub async fn replay_record(
    client: &impl GenericClient,
    queue: &str,
) -> Result<Option<ReplayRecord>, ReplicaError> {
    Ok(client
        .query_opt(
            r#"select "last_tick_id", extract(epoch from now() - "updated")::float8, "paused",
                      "last_error", extract(epoch from now() - "last_error_at")::float8
                 from "ferry"."subscriber_position" where "queue_name" = $1"#,
            &[&queue],
        )
        .await
        .context("reading replay's record")?
        .map(|r| ReplayRecord {
            applied_tick: r.get(0),
            applied_secs_ago: r.get(1),
            paused: r.get(2),
            last_error: r.get(3),
            last_error_secs_ago: r.get(4),
        }))
}

/// Seconds since each table of `queue` here entered its state, by table.
pub async fn state_ages(
    client: &impl GenericClient,
    queue: &str,
) -> Result<Vec<(RelName, f64)>, ReplicaError> {
    let rows = client
        .query(
            r#"select "table_schema", "table_name", extract(epoch from now() - "state_changed")::float8
                 from "ferry"."subscriber_table" where "queue_name" = $1 order by 1, 2"#,
            &[&queue],
        )
        .await
        .context("reading the tables' state times")?;
    Ok(rows
        .iter()
        .map(|r| {
            (
                RelName::new(r.get::<_, String>(0), r.get::<_, String>(1)),
                r.get(2),
            )
        })
        .collect())
}

/// What to do with a batch from tick `prev` to tick `cur`, given the subscriber's position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchStep {
    /// The batch starts where the subscriber is (or the subscriber has no position yet):
    /// apply it.
    Apply,
    /// The subscriber has this batch already (a stop hit after its commit and before the
    /// provider's finish): only finish it on the provider.
    FinishOnly,
    /// The batch does not start at the subscriber's position (`recorded`): nothing may be
    /// applied until the queue's record of the consumer is reconciled with it.
    OutOfStep {
        /// The tick the subscriber has applied up to.
        recorded: i64,
    },
}

/// The one rule for a batch against the subscriber's position (`recorded`): used under the
/// position's lock before applying, and at start-up against the consumer's open batch.
pub fn batch_step(recorded: Option<i64>, prev: i64, cur: i64) -> BatchStep {
    match recorded {
        Some(at) if at == cur => BatchStep::FinishOnly,
        Some(at) if at != prev => BatchStep::OutOfStep { recorded: at },
        _ => BatchStep::Apply,
    }
}

/// The schemas and the names of `tables`, as two arrays for `unnest`.
fn name_arrays<'a>(tables: &[&'a RelName]) -> (Vec<&'a str>, Vec<&'a str>) {
    tables
        .iter()
        .map(|t| (t.schema.as_str(), t.name.as_str()))
        .unzip()
}

/// An event kept in the stash for a table whose copy runs: its place (the tick of the batch
/// that kept it, its position in that batch) and the event as the queue held it.
#[derive(Debug, Clone)]
pub struct StashedEvent {
    /// The tick of the batch that kept it.
    pub tick: i64,
    /// Its position among the events that batch kept.
    pub pos: i32,
    /// The table it changes.
    pub table: RelName,
    /// The event.
    pub event: ferry_queue::Event,
}

/// Keeps `events` in the stash, in the batch's transaction (see the module documentation).
pub async fn stash_events(
    stx: &Transaction<'_>,
    queue: &str,
    events: &[StashedEvent],
) -> Result<(), ReplicaError> {
    if events.is_empty() {
        return Ok(());
    }
    let mut ticks = Vec::with_capacity(events.len());
    let mut positions = Vec::with_capacity(events.len());
    let mut schemas = Vec::with_capacity(events.len());
    let mut names = Vec::with_capacity(events.len());
    let mut ids = Vec::with_capacity(events.len());
    let mut times = Vec::with_capacity(events.len());
    let mut txids = Vec::with_capacity(events.len());
    let mut types = Vec::with_capacity(events.len());
    let mut datas = Vec::with_capacity(events.len());
    let mut extras: [Vec<Option<&str>>; 4] = Default::default();
    for e in events {
        ticks.push(e.tick);
        positions.push(e.pos);
        schemas.push(e.table.schema.as_str());
        names.push(e.table.name.as_str());
        ids.push(e.event.id);
        times.push(e.event.time);
        txids.push(e.event.txid);
        types.push(e.event.ev_type.as_deref());
        datas.push(e.event.data.as_deref());
        for (list, extra) in extras.iter_mut().zip(&e.event.extra) {
            list.push(extra.as_deref());
        }
    }
    stx.execute(
        r#"insert into "ferry"."subscriber_stash"
               ("queue_name", "stash_tick", "stash_pos", "table_schema", "table_name", "ev_id",
                "ev_time", "ev_txid", "ev_type", "ev_data", "ev_extra1", "ev_extra2",
                "ev_extra3", "ev_extra4")
           select $1, * from unnest($2::bigint[], $3::int4[], $4::text[], $5::text[],
                                    $6::bigint[], $7::timestamptz[], $8::bigint[], $9::text[],
                                    $10::text[], $11::text[], $12::text[], $13::text[],
                                    $14::text[])"#,
        &[
            &queue, &ticks, &positions, &schemas, &names, &ids, &times, &txids, &types, &datas,
            &extras[0], &extras[1], &extras[2], &extras[3],
        ],
    )
    .await
    .context("keeping events for tables being copied")?;
    Ok(())
}

/// Up to `limit` stashed events of `queue` for `tables` (ones the batch found copied: the
/// caller's list, not the states now, which a copy's commit may change meanwhile), after
/// place `after`, in the order they came.
pub async fn stashed_events(
    stx: &Transaction<'_>,
    queue: &str,
    tables: &[&RelName],
    after: Option<(i64, i32)>,
    limit: i64,
) -> Result<Vec<StashedEvent>, ReplicaError> {
    let (after_tick, after_pos) = after.unwrap_or((i64::MIN, i32::MIN));
    let (schemas, names) = name_arrays(tables);
    let rows = stx
        .query(
            r#"select s."stash_tick", s."stash_pos", s."table_schema", s."table_name",
                      s."ev_id", s."ev_time", s."ev_txid", s."ev_type", s."ev_data",
                      s."ev_extra1", s."ev_extra2", s."ev_extra3", s."ev_extra4"
                 from "ferry"."subscriber_stash" s
                where s."queue_name" = $1
                  and (s."stash_tick", s."stash_pos") > ($2, $3)
                  and (s."table_schema", s."table_name")
                      in (select * from unnest($5::text[], $6::text[]))
                order by s."stash_tick", s."stash_pos"
                limit $4"#,
            &[&queue, &after_tick, &after_pos, &limit, &schemas, &names],
        )
        .await
        .context("reading the events kept for copied tables")?;
    Ok(rows
        .iter()
        .map(|r| StashedEvent {
            tick: r.get(0),
            pos: r.get(1),
            table: RelName::new(r.get::<_, String>(2), r.get::<_, String>(3)),
            event: ferry_queue::Event {
                id: r.get(4),
                time: r.get(5),
                txid: r.get(6),
                retry: None,
                ev_type: r.get(7),
                data: r.get(8),
                extra: [r.get(9), r.get(10), r.get(11), r.get(12)],
            },
        })
        .collect())
}

/// Deletes the stashed events of `queue` for `tables` up to place `upto`: the ones
/// [`stashed_events`] handed out for the same tables, in the same transaction.
pub async fn forget_stashed(
    stx: &Transaction<'_>,
    queue: &str,
    tables: &[&RelName],
    upto: (i64, i32),
) -> Result<(), ReplicaError> {
    let (schemas, names) = name_arrays(tables);
    stx.execute(
        r#"delete from "ferry"."subscriber_stash" s
            where s."queue_name" = $1 and (s."stash_tick", s."stash_pos") <= ($2, $3)
              and (s."table_schema", s."table_name")
                  in (select * from unnest($4::text[], $5::text[]))"#,
        &[&queue, &upto.0, &upto.1, &schemas, &names],
    )
    .await
    .context("forgetting the events kept for copied tables")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_progress_says_how_far_and_how_long() {
        let progress = CopyProgress {
            rows_done: 250_000,
            bytes_done: 12_500_000,
            rows_expected: Some(1_000_000),
            elapsed_secs: 5.0,
            recorded_after_secs: 5.0,
        };
        assert_eq!(progress.rows_per_sec(), Some(50_000.0));
        assert_eq!(progress.eta_secs(), Some(15.0));
        assert_eq!(
            progress.to_string(),
            "copied 250000 of ~1000000 rows (25%), 12.5 MB, 50000 rows/s, eta 15 s"
        );
        // recorded a second ago: a second less to go; past the estimate: none left
        let older = CopyProgress {
            elapsed_secs: 6.0,
            ..progress.clone()
        };
        assert_eq!(older.eta_secs(), Some(14.0));
        let unknown = CopyProgress {
            rows_expected: None,
            rows_done: 2_000_000,
            ..progress
        };
        assert_eq!(unknown.eta_secs(), None);
        assert_eq!(
            unknown.to_string(),
            "copied 2000000 rows, 12.5 MB, 400000 rows/s"
        );
    }

    #[test]
    fn states_parse_once_and_print_their_stored_name() {
        for (name, snapshot) in [
            ("in-copy", None),
            ("in-copy", Some("5:9:7")),
            ("catching-up", Some("5:9:7")),
            ("ok", None),
        ] {
            let state = TableState::parse(name, snapshot).unwrap();
            assert_eq!(state.name(), name);
            assert_eq!(
                serde_json::to_string(&state).unwrap(),
                format!("\"{name}\"")
            );
        }
        assert!(TableState::parse("catching-up", None).is_err());
        assert!(TableState::parse("catching-up", Some("garbage")).is_err());
        assert!(TableState::parse("copying", None).is_err());
    }

    #[test]
    fn which_events_a_state_applies() {
        assert!(!TableState::InCopy.applies(3));
        assert!(
            !TableState::InCopy.keeps(3),
            "no copy yet: the copy will see it"
        );
        let copying = TableState::Copying("5:9:7".parse().unwrap());
        assert!(!copying.applies(4) && !copying.applies(7));
        assert!(!copying.keeps(4), "seen by the copy");
        assert!(copying.keeps(7), "running when the copy was taken");
        assert!(copying.keeps(9), "started after the copy");
        assert!(!TableState::Ok.keeps(9));
        assert!(TableState::Ok.applies(3));
        let catching_up = TableState::CatchingUp("5:9:7".parse().unwrap());
        assert!(!catching_up.applies(4), "seen by the copy");
        assert!(catching_up.applies(7), "running when the copy was taken");
        assert!(catching_up.applies(9), "started after the copy");
    }

    #[test]
    fn a_batch_against_the_position() {
        assert_eq!(batch_step(None, 4, 5), BatchStep::Apply);
        assert_eq!(batch_step(Some(4), 4, 5), BatchStep::Apply);
        assert_eq!(batch_step(Some(5), 4, 5), BatchStep::FinishOnly);
        assert_eq!(
            batch_step(Some(3), 4, 5),
            BatchStep::OutOfStep { recorded: 3 }
        );
        assert_eq!(
            batch_step(Some(9), 4, 5),
            BatchStep::OutOfStep { recorded: 9 }
        );
    }
}
