//! The initial copy of a table: the provider's rows under a snapshot that is recorded, so
//! that replay later skips exactly the events the copy already contains.

use bytes::BytesMut;
use ferry_daemon::failpoint::{self, failpoint};
use futures_util::{pin_mut, SinkExt, TryStreamExt};
use tokio_postgres::{Client, IsolationLevel};

use crate::catalog::table_shape;
use crate::error::{ErrorKind, ReplicaError, ResultExt};
use crate::names::{quote_ident, RelName};
use crate::progress::CopyReporter;
use crate::snapshot::Snapshot;
use crate::store;
use crate::subscriber::column_problems;

/// Bytes of copied rows sent to the subscriber at a time.
const COPY_BLOCK: usize = 64 << 10;

/// What a finished copy left behind.
#[derive(Debug, Clone)]
pub struct CopyDone {
    /// Rows copied.
    pub rows: u64,
    /// The provider snapshot the rows were read under.
    pub snapshot: Snapshot,
}

/// Copies `table` from the provider into the subscriber and moves it to `catching-up` with
/// the copy's snapshot, all in one subscriber transaction: a copy cut short leaves the table
/// `in-copy` with its old rows, to be copied again. Batches go on being applied meanwhile (on
/// other sessions): the snapshot is recorded first, between two batches, so that they keep
/// the table's events it does not see (see [`store::register_copy`]). Returns `None` when the
/// table is no longer waiting for a copy. Its progress goes to `reporter`.
pub async fn copy_table(
    provider: &mut Client,
    subscriber: &mut Client,
    queue: &str,
    table: &RelName,
    reporter: &mut CopyReporter,
) -> Result<Option<CopyDone>, ReplicaError> {
    let copied = copy_reported(provider, subscriber, queue, table, reporter).await;
    reporter.end();
    copied
}

async fn copy_reported(
    provider: &mut Client,
    subscriber: &mut Client,
    queue: &str,
    table: &RelName,
    reporter: &mut CopyReporter,
) -> Result<Option<CopyDone>, ReplicaError> {
    let source = table_shape(provider, table).await?.ok_or_else(|| {
        ReplicaError::schema_mismatch(format!("table {table} does not exist on the provider"))
    })?;
    let target = table_shape(subscriber, table).await?.ok_or_else(|| {
        ReplicaError::schema_mismatch(format!("table {table} does not exist on the subscriber"))
    })?;
    if let Some(problem) = column_problems(&source, &target).into_iter().next() {
        return Err(ReplicaError::schema_mismatch(problem));
    }
    // provider columns, except those the subscriber computes itself
    let columns: Vec<String> = source
        .columns
        .iter()
        .filter(|c| target.column(&c.name).is_some_and(|t| !t.generated))
        .map(|c| quote_ident(&c.name))
        .collect();
    let column_list = columns.join(", ");

    // The snapshot is taken and recorded while this holds the position's row lock: no batch
    // is being applied, every batch applied before holds only transactions it sees, and every
    // batch after it reads it and keeps the table's events it does not see.
    let registration = subscriber
        .transaction()
        .await
        .context("recording the copy's snapshot")?;
    // the table's state first, without waiting, then the position (a batch takes the
    // position and never the state of a table waiting for its copy)
    if !store::lock_for_copy(&registration, queue, table).await? {
        return Ok(None);
    }
    store::lock_position(&registration, queue).await?;
    let ptx = provider
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await
        .context("starting the copy on the provider")?;
    // the first statement fixes the transaction's snapshot: the COPY below reads under it
    let snapshot: Snapshot = ptx
        .query_one("select txid_current_snapshot()::text", &[])
        .await
        .context("taking the copy's snapshot")?
        .get::<_, &str>(0)
        .parse()
        .map_err(ReplicaError::corrupt)?;
    if !store::register_copy(&registration, queue, table, &snapshot).await? {
        return Ok(None);
    }
    registration
        .commit()
        .await
        .context("recording the copy's snapshot")?;

    let stx = subscriber
        .transaction()
        .await
        .context("starting the copy on the subscriber")?;
    stx.batch_execute("set local ferry.replay = 'on'")
        .await
        .context("starting the copy on the subscriber")?;
    let Some(skip_truncate) = store::claim_for_copy(&stx, queue, table, &snapshot).await? else {
        return Ok(None);
    };
    // A table other tables refer to by foreign key cannot be truncated (not even in replica
    // mode) without truncating them too, which would empty tables already copied: it is
    // emptied with DELETE instead, which in replay's replica mode cascades to nothing.
    let truncated = if skip_truncate {
        false
    } else if referenced_by_other_tables(&stx, table).await? {
        stx.batch_execute(&format!("delete from {}", table.quoted()))
            .await
            .map_err(|e| refused_by_subscriber(table, CopyStep::Emptying, e))?;
        false
    } else {
        stx.batch_execute(&format!("truncate {}", table.quoted()))
            .await
            .map_err(|e| refused_by_subscriber(table, CopyStep::Emptying, e))?;
        true
    };

    // a plain table straight (COPY of a table reads it alone, as ONLY would, and skips the
    // executor); a partitioned table through a query over its partitions
    let source_plain: bool = ptx
        .query_one(
            "select relkind = 'r' from pg_class where oid = to_regclass($1)",
            &[&table.quoted()],
        )
        .await
        .with_context(|| format!("looking at {table} on the provider"))?
        .get(0);
    let copy_out = if source_plain {
        format!("copy {} ({column_list}) to stdout", table.quoted())
    } else {
        // a partitioned table is one unit: every partition's rows (not ONLY, which would
        // read the root's own, empty, storage)
        format!(
            "copy (select {column_list} from {}) to stdout",
            table.quoted()
        )
    };
    // what the provider's statistics expect (leaf tables' estimates; none if never analyzed)
    let rows_expected: Option<f64> = ptx
        .query_one(
            "select sum(c.reltuples)::float8 from pg_class c
              where (c.oid = to_regclass($1)
                     or c.oid in (select relid from pg_partition_tree(to_regclass($1))))
                and c.relkind = 'r' and c.reltuples > 0",
            &[&table.quoted()],
        )
        .await
        .with_context(|| format!("looking at {table} on the provider"))?
        .get(0);
    let rows_expected = rows_expected.map(|n| n.round() as u64);
    reporter.start(rows_expected);
    let rows_out = ptx
        .copy_out(&copy_out)
        .await
        .with_context(|| format!("reading {table} on the provider"))?;
    // rows copied into a table emptied in this same transaction can be written frozen (no
    // later pass over them to set hint bits or freeze); partitioned tables refuse FREEZE
    let plain: bool = stx
        .query_one(
            "select relkind = 'r' from pg_class where oid = to_regclass($1)",
            &[&table.quoted()],
        )
        .await
        .with_context(|| format!("looking at {table}"))?
        .get(0);
    let freeze = if plain && truncated {
        " with (freeze)"
    } else {
        ""
    };
    let sink = stx
        .copy_in(&format!(
            "copy {} ({column_list}) from stdin{freeze}",
            table.quoted()
        ))
        .await
        .with_context(|| format!("writing {table} on the subscriber"))?;
    pin_mut!(sink);
    pin_mut!(rows_out);
    // the provider sends a message per row; the subscriber gets them in blocks, which saves
    // replay most of its per-row work
    let mut block = BytesMut::with_capacity(COPY_BLOCK);
    // one message per row
    let (mut rows_read, mut bytes_read) = (0u64, 0u64);
    while let Some(row) = rows_out
        .try_next()
        .await
        .with_context(|| format!("reading {table} on the provider"))?
    {
        rows_read += 1;
        bytes_read += row.len() as u64;
        block.extend_from_slice(&row);
        if block.len() >= COPY_BLOCK {
            sink.feed(block.split().freeze())
                .await
                .map_err(|e| refused_by_subscriber(table, CopyStep::Writing, e))?;
            failpoint(failpoint::REPLAY_DURING_COPY);
            reporter
                .report(queue, table, rows_read, bytes_read, rows_expected)
                .await;
        }
    }
    if !block.is_empty() {
        sink.feed(block.freeze())
            .await
            .map_err(|e| refused_by_subscriber(table, CopyStep::Writing, e))?;
    }
    let rows = sink
        .finish()
        .await
        .map_err(|e| refused_by_subscriber(table, CopyStep::Finishing, e))?;
    ptx.commit()
        .await
        .context("ending the copy on the provider")?;
    store::record_copied(&stx, queue, table, &snapshot, rows).await?;
    store::forget_copy_progress(&stx, queue, table).await?;
    stx.commit()
        .await
        .with_context(|| format!("committing the copy of {table}"))?;
    Ok(Some(CopyDone { rows, snapshot }))
}

/// Whether a foreign key of another table refers to `table` here.
async fn referenced_by_other_tables(
    stx: &tokio_postgres::Transaction<'_>,
    table: &RelName,
) -> Result<bool, ReplicaError> {
    Ok(stx
        .query_one(
            "select exists (select 1 from pg_constraint
                             where confrelid = to_regclass($1) and contype = 'f'
                               and conrelid <> confrelid)",
            &[&table.quoted()],
        )
        .await
        .with_context(|| format!("looking for foreign keys referring to {table}"))?
        .get(0))
}

/// A step of the copy on the subscriber.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CopyStep {
    /// TRUNCATE (or DELETE) before the rows come.
    Emptying,
    /// COPY FROM STDIN, while the rows come.
    Writing,
    /// The end of COPY, where deferred checks run.
    Finishing,
}

impl std::fmt::Display for CopyStep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CopyStep::Emptying => "emptying",
            CopyStep::Writing => "writing",
            CopyStep::Finishing => "finishing",
        })
    }
}

/// The error of `step` of the copy of `table` on the subscriber. A constraint there refusing
/// the provider's rows (a check, a unique index only the subscriber has; foreign keys do not
/// act in replay's replica mode) is a refusal about this table alone (it stays in-copy and the
/// other tables go on) that says what to do; anything else is a database error.
fn refused_by_subscriber(
    table: &RelName,
    step: CopyStep,
    error: tokio_postgres::Error,
) -> ReplicaError {
    let refusal = match error.code() {
        Some(code) if code.code().starts_with("23") => Some(format!(
            "the subscriber refused the copy of {table}: its rows break a constraint there (one the provider does not have, or rows kept there by --skip-truncate); fix that, and the copy is tried again"
        )),
        _ => None,
    };
    match refusal {
        Some(message) => {
            ReplicaError::with_cause(ErrorKind::RowRefused, message, error).about(table)
        }
        None => ReplicaError::db(
            format!("{step} the copy of {table} on the subscriber"),
            error,
        ),
    }
}
