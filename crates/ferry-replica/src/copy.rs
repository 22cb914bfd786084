//! The initial copy of a table: the provider's rows under a snapshot that is recorded, so
//! that replay later skips exactly the events the copy already contains.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use ferry_connect::{ConnInfo, Session};
use ferry_daemon::failpoint::{self, failpoint};
use futures_util::{pin_mut, SinkExt, TryStreamExt};
use tokio_postgres::{Client, IsolationLevel, Transaction};

use crate::catalog::table_shape;
use crate::copy_indexes::defer_indexes;
use crate::error::{ErrorKind, ReplicaError, ResultExt};
use crate::names::{quote_ident, RelName};
use crate::progress::CopyReporter;
use crate::session::{enter_replica_mode, open_session};
use crate::snapshot::Snapshot;
use crate::store;
use crate::subscriber::column_problems;

/// Bytes of copied rows sent to the subscriber at a time.
const COPY_BLOCK: usize = 64 << 10;

/// A table the provider's statistics expect to hold fewer rows than this is copied with its
/// indexes maintained row by row: dropping and creating them costs more than it saves there.
const DEFER_INDEXES_FROM_ROWS: u64 = 10_000;

/// What a finished copy left behind.
#[derive(Debug, Clone)]
pub struct CopyDone {
    /// Rows copied.
    pub rows: u64,
    /// The provider snapshot the rows were read under.
    pub snapshot: Snapshot,
    /// The slices it was copied in (1: one stream).
    pub slices: usize,
}

/// Copies `table` from the provider into the subscriber and moves it to `catching-up` with
/// the copy's snapshot, all in one subscriber transaction: a copy cut short leaves the table
/// `in-copy` with its old rows, to be copied again. Batches go on being applied meanwhile (on
/// other sessions): the snapshot is recorded first, between two batches, so that they keep
/// the table's events it does not see (see [`store::register_copy`]). Returns `None` when the
/// table is no longer waiting for a copy. Its progress goes to `reporter`.
/// With `slicing`, a big plain table is copied in slices (see [`Slicing`]).
pub async fn copy_table(
    provider: &mut Client,
    subscriber: &mut Client,
    queue: &str,
    table: &RelName,
    reporter: &mut CopyReporter,
    slicing: Option<&Slicing>,
) -> Result<Option<CopyDone>, ReplicaError> {
    let copied = copy_reported(provider, subscriber, queue, table, reporter, slicing).await;
    reporter.end();
    copied
}

/// How a big table's copy is split: into `slices` ranges of its pages, each read by a provider
/// session of its own importing the copy's snapshot (`pg_export_snapshot`, `SET TRANSACTION
/// SNAPSHOT`) and written by a subscriber session of its own. Only plain tables of at least
/// [`SLICE_MIN_BYTES`] per slice on a provider of PostgreSQL 14 or later (which reads a range
/// of pages without a full scan) are sliced, never with `--skip-truncate`. The price: the
/// table is emptied and its slices committed each on its own, so readers on the subscriber
/// see it fill while it copies (a one-stream copy shows nothing until it commits).
#[derive(Debug, Clone)]
pub struct Slicing {
    /// Slices at most (sessions on each side).
    pub slices: usize,
    /// Where the other slices' provider sessions connect.
    pub provider: ConnInfo,
    /// Where the other slices' subscriber sessions connect.
    pub subscriber: ConnInfo,
    /// Their `application_name`.
    pub application_name: String,
}

/// A slice is at least this big: smaller tables copy in one stream.
pub const SLICE_MIN_BYTES: i64 = 8 << 20;

async fn copy_reported(
    provider: &mut Client,
    subscriber: &mut Client,
    queue: &str,
    table: &RelName,
    reporter: &mut CopyReporter,
    slicing: Option<&Slicing>,
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
    // a big plain table on PostgreSQL 14 or later is read in slices of pages, each by a
    // session of its own sharing the copy's snapshot, and written by as many (not with
    // --skip-truncate: the rows kept would be copied over)
    let ranges = match slicing {
        Some(slicing) if slicing.slices > 1 && !skip_truncate => {
            slice_ranges(&ptx, table, slicing.slices).await?
        }
        _ => Vec::new(),
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
    let progress = Progress::default();
    if let [_, _, ..] = ranges.as_slice() {
        // the table is emptied for good before its slices come, each in a transaction of its
        // own: a copy cut short leaves it in-copy with part of its rows, emptied again by the
        // next copy
        stx.commit()
            .await
            .with_context(|| format!("emptying {table} for its copy"))?;
        let copied = report_while(
            copy_slices(
                &ptx,
                subscriber,
                slicing.expect("ranges come from slicing"),
                table,
                &column_list,
                &ranges,
                &progress,
            ),
            reporter,
            &progress,
            queue,
            table,
            rows_expected,
        )
        .await?;
        let stx = subscriber
            .transaction()
            .await
            .with_context(|| format!("recording the copy of {table}"))?;
        if store::claim_for_copy(&stx, queue, table, &snapshot)
            .await?
            .is_none()
        {
            return Ok(None);
        }
        let done = CopyDone {
            rows: copied,
            snapshot,
            slices: ranges.len(),
        };
        return record_copy(ptx, stx, queue, table, done).await;
    }
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
    // a table emptied here builds its indexes once its rows are in (see copy_indexes), unless
    // the provider's statistics say it is too small for that to pay
    let deferred = if truncated && rows_expected.is_none_or(|n| n >= DEFER_INDEXES_FROM_ROWS) {
        Some(defer_indexes(&stx, table).await?)
    } else {
        None
    };
    let copy_in = format!("copy {} ({column_list}) from stdin{freeze}", table.quoted());
    let rows = report_while(
        stream_slice(&ptx, &stx, &copy_out, &copy_in, table, &progress),
        reporter,
        &progress,
        queue,
        table,
        rows_expected,
    )
    .await?;
    if let Some(deferred) = deferred.filter(|d| d.len() > 0) {
        let started = Instant::now();
        let indexes = deferred.len();
        deferred
            .rebuild(&stx)
            .await
            .map_err(|e| refused_by_subscriber(table, CopyStep::BuildingIndexes, e))?;
        tracing::info!(table = %table, indexes, secs = started.elapsed().as_secs_f64(),
            "indexes built after the copy");
    }
    let done = CopyDone {
        rows,
        snapshot,
        slices: 1,
    };
    record_copy(ptx, stx, queue, table, done).await
}

/// Ends a copy whose rows are in: the provider's transaction ends, and `stx` (holding the
/// table's state) records the table `catching-up` under the copy's snapshot, forgets its
/// progress and commits.
async fn record_copy(
    ptx: Transaction<'_>,
    stx: Transaction<'_>,
    queue: &str,
    table: &RelName,
    done: CopyDone,
) -> Result<Option<CopyDone>, ReplicaError> {
    ptx.commit()
        .await
        .context("ending the copy on the provider")?;
    store::record_copied(&stx, queue, table, &done.snapshot, done.rows).await?;
    store::forget_copy_progress(&stx, queue, table).await?;
    stx.commit()
        .await
        .with_context(|| format!("committing the copy of {table}"))?;
    Ok(Some(done))
}

/// Rows and bytes copied so far, by every slice of a copy.
#[derive(Default)]
struct Progress {
    rows: AtomicU64,
    bytes: AtomicU64,
}

/// How often a running copy's progress is reported.
const REPORT_EVERY: Duration = Duration::from_millis(250);

/// Runs `copy` to its end, reporting `progress` to `reporter` meanwhile.
async fn report_while<T>(
    copy: impl Future<Output = Result<T, ReplicaError>>,
    reporter: &mut CopyReporter,
    progress: &Progress,
    queue: &str,
    table: &RelName,
    rows_expected: Option<u64>,
) -> Result<T, ReplicaError> {
    pin_mut!(copy);
    let mut every = tokio::time::interval(REPORT_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            done = &mut copy => return done,
            _ = every.tick() => {
                let rows = progress.rows.load(Ordering::Relaxed);
                let bytes = progress.bytes.load(Ordering::Relaxed);
                if rows > 0 {
                    reporter.report(queue, table, rows, bytes, rows_expected).await;
                }
            }
        }
    }
}

/// Streams the rows of `copy_out` (in `reader`) into `copy_in` (in `writer`), counting them
/// in `progress`. Returns how many rows the subscriber took.
async fn stream_slice(
    reader: &Transaction<'_>,
    writer: &Transaction<'_>,
    copy_out: &str,
    copy_in: &str,
    table: &RelName,
    progress: &Progress,
) -> Result<u64, ReplicaError> {
    let rows_out = reader
        .copy_out(copy_out)
        .await
        .with_context(|| format!("reading {table} on the provider"))?;
    let sink = writer
        .copy_in(copy_in)
        .await
        .with_context(|| format!("writing {table} on the subscriber"))?;
    pin_mut!(sink);
    pin_mut!(rows_out);
    // the provider sends a message per row; the subscriber gets them in blocks, which saves
    // replay most of its per-row work
    let mut block = BytesMut::with_capacity(COPY_BLOCK);
    while let Some(row) = rows_out
        .try_next()
        .await
        .with_context(|| format!("reading {table} on the provider"))?
    {
        progress.rows.fetch_add(1, Ordering::Relaxed);
        progress
            .bytes
            .fetch_add(row.len() as u64, Ordering::Relaxed);
        block.extend_from_slice(&row);
        if block.len() >= COPY_BLOCK {
            sink.feed(block.split().freeze())
                .await
                .map_err(|e| refused_by_subscriber(table, CopyStep::Writing, e))?;
            failpoint(failpoint::REPLAY_DURING_COPY);
        }
    }
    if !block.is_empty() {
        sink.feed(block.freeze())
            .await
            .map_err(|e| refused_by_subscriber(table, CopyStep::Writing, e))?;
    }
    sink.finish()
        .await
        .map_err(|e| refused_by_subscriber(table, CopyStep::Finishing, e))
}

/// The page ranges `table` is copied in (`[from, to)`, the last open-ended): none when it is
/// not worth slicing or cannot be (see [`Slicing`]). Read in the copy's provider transaction.
async fn slice_ranges(
    ptx: &Transaction<'_>,
    table: &RelName,
    slices: usize,
) -> Result<Vec<(i64, Option<i64>)>, ReplicaError> {
    let row = ptx
        .query_one(
            "select c.relkind = 'r' and current_setting('server_version_num')::int >= 140000,
                    pg_relation_size(c.oid), current_setting('block_size')::int8
               from pg_class c where c.oid = to_regclass($1)",
            &[&table.quoted()],
        )
        .await
        .with_context(|| format!("looking at {table} on the provider"))?;
    let (sliceable, bytes, block_size): (bool, i64, i64) = (row.get(0), row.get(1), row.get(2));
    let slices = (slices as i64).min(bytes / SLICE_MIN_BYTES);
    if !sliceable || slices < 2 {
        return Ok(Vec::new());
    }
    // pages that exist now: rows the snapshot sees are in them; the last slice reads on to
    // the end anyway
    let pages = bytes / block_size;
    Ok((0..slices)
        .map(|i| {
            let from = pages * i / slices;
            let to = (i + 1 < slices).then(|| pages * (i + 1) / slices);
            (from, to)
        })
        .collect())
}

/// Copies `table`, already emptied, in the slices `ranges`: the first through `ptx` and
/// `subscriber`, the others through sessions of their own importing `ptx`'s snapshot, each
/// slice written in a subscriber transaction of its own. Returns the rows copied.
async fn copy_slices(
    ptx: &Transaction<'_>,
    subscriber: &mut Client,
    slicing: &Slicing,
    table: &RelName,
    column_list: &str,
    ranges: &[(i64, Option<i64>)],
    progress: &Progress,
) -> Result<u64, ReplicaError> {
    let snapshot_id: String = ptx
        .query_one("select pg_export_snapshot()", &[])
        .await
        .context("exporting the copy's snapshot")?
        .get(0);
    let mut readers: Vec<Session> = Vec::with_capacity(ranges.len() - 1);
    let mut writers: Vec<Session> = Vec::with_capacity(ranges.len() - 1);
    for _ in 1..ranges.len() {
        readers.push(open_session(&slicing.provider, "provider", &slicing.application_name).await?);
        let writer =
            open_session(&slicing.subscriber, "subscriber", &slicing.application_name).await?;
        enter_replica_mode(writer.client()).await?;
        writers.push(writer);
    }
    let mut reader_txs = Vec::with_capacity(readers.len());
    for reader in &mut readers {
        let tx = reader
            .client_mut()
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .context("starting a slice of the copy on the provider")?;
        tx.batch_execute(&format!("set transaction snapshot '{snapshot_id}'"))
            .await
            .context("taking the copy's snapshot for a slice")?;
        reader_txs.push(tx);
    }
    let copy_in = format!("copy {} ({column_list}) from stdin", table.quoted());
    let copy_out = |(from, to): (i64, Option<i64>)| {
        let pages = match to {
            Some(to) => format!("ctid >= '({from},0)'::tid and ctid < '({to},0)'::tid"),
            None => format!("ctid >= '({from},0)'::tid"),
        };
        format!(
            "copy (select {column_list} from only {} where {pages}) to stdout",
            table.quoted()
        )
    };
    let mut slices = vec![copy_one_slice(
        ptx,
        subscriber,
        copy_out(ranges[0]),
        &copy_in,
        table,
        progress,
    )];
    for ((reader, writer), range) in reader_txs.iter().zip(writers.iter_mut()).zip(&ranges[1..]) {
        slices.push(copy_one_slice(
            reader,
            writer.client_mut(),
            copy_out(*range),
            &copy_in,
            table,
            progress,
        ));
    }
    let rows = futures_util::future::try_join_all(slices).await?;
    for tx in reader_txs {
        tx.commit()
            .await
            .context("ending a slice of the copy on the provider")?;
    }
    Ok(rows.into_iter().sum())
}

/// One slice of a sliced copy: `copy_out` read in `reader`, written in a transaction of its
/// own on `writer`. Returns the rows the subscriber took.
async fn copy_one_slice(
    reader: &Transaction<'_>,
    writer: &mut Client,
    copy_out: String,
    copy_in: &str,
    table: &RelName,
    progress: &Progress,
) -> Result<u64, ReplicaError> {
    let wtx = writer
        .transaction()
        .await
        .context("starting a slice of the copy on the subscriber")?;
    wtx.batch_execute("set local ferry.replay = 'on'")
        .await
        .context("starting a slice of the copy on the subscriber")?;
    let rows = stream_slice(reader, &wtx, &copy_out, copy_in, table, progress).await?;
    wtx.commit()
        .await
        .with_context(|| format!("committing a slice of the copy of {table}"))?;
    Ok(rows)
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
    /// Building the indexes deferred until the rows were in.
    BuildingIndexes,
}

impl std::fmt::Display for CopyStep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CopyStep::Emptying => "emptying",
            CopyStep::Writing => "writing",
            CopyStep::Finishing => "finishing",
            CopyStep::BuildingIndexes => "indexing",
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
