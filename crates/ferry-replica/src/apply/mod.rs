//! Applying one batch to the subscriber: every event of the batch, the sequences, and the
//! batch's tick as the new position, in ONE subscriber transaction; then the caller finishes
//! the batch on the provider ([`finish_and_next`]). A batch whose tick is already recorded is
//! only finished, so a crash between the subscriber's commit and the provider's finish
//! repeats nothing.
//!
//! A batch of a consumer that keeps up is small: it is read in one statement, sent with the
//! subscriber's BEGIN, and costs a handful of round trips in all; a big one is read through a
//! cursor in a provider transaction, part by part.
//!
//! This module is the batch protocol; [`page`] applies a page of events (set-wise or in event
//! order), [`sql`] builds the statements, [`pipeline`] moves rows without waiting on round
//! trips, [`cache`] keeps statements and shapes, [`sequences`] moves sequences forward.

mod cache;
mod page;
mod pipeline;
mod sequences;
mod sql;

use std::collections::HashMap;

use ferry_daemon::failpoint::{self, failpoint};
use ferry_queue::{Batch, BatchCursor, Event};
use tokio_postgres::{Client, GenericClient, Transaction};

use crate::error::{ErrorKind, ReplicaError, ResultExt};
use crate::names::RelName;
use crate::prepared::Prepared;
use crate::provider;
use crate::snapshot::Snapshot;
use crate::store::{self, BatchStep, TableState};

pub(crate) use sequences::sync_sequences;

use cache::TableCache;
use pipeline::{send_set_statements, ChunkReader, InFlight, CHUNK_EVENTS};

/// What applying a batch did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchOutcome {
    /// The batch's changes are now on the subscriber.
    Applied {
        /// Events applied.
        applied: u64,
        /// Events skipped: of tables not (yet) replicated here, or already in a copy.
        skipped: u64,
        /// Events kept for tables being copied, to be applied after their copy.
        kept: u64,
        /// Events kept by earlier batches, applied with this one (their table's copy is done).
        unstashed: u64,
        /// Tables that became `ok` with this batch.
        tables_ok: u64,
    },
    /// The subscriber had this batch already (a crash hit after its commit); only finished.
    AlreadyApplied,
    /// Replay is paused (`ferry CONFIG pause`): nothing applied, the batch stays open.
    Paused,
    /// The batch does not start at the subscriber's position (`recorded`): nothing applied;
    /// the consumer's position on the queue must be reconciled first.
    OutOfStep {
        /// The tick the subscriber has applied up to.
        recorded: i64,
    },
}

/// How a batch's events reach the subscriber.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Independent tables reduced per page and applied with a few statements each.
    SetWise,
    /// One statement per event, in event order.
    EventOrder,
}

/// The subscriber's tables as one batch sees them, keyed the way events name them
/// (`"schema"."name"`).
type BatchTables = HashMap<String, (RelName, TableState)>;

/// The events a batch keeps for tables being copied (see [`store::stash_events`]), written
/// page by page in the batch's transaction.
pub(crate) struct Stash {
    /// The batch's tick: the first part of each kept event's place.
    tick: i64,
    /// The place of the next event kept.
    next_pos: i32,
    /// Kept and not yet written.
    pending: Vec<store::StashedEvent>,
    /// Kept in all.
    kept: u64,
}

impl Stash {
    fn new(tick: i64) -> Stash {
        Stash {
            tick,
            next_pos: 0,
            pending: Vec::new(),
            kept: 0,
        }
    }

    /// Keeps `event` of `table`.
    pub(crate) fn keep(&mut self, table: &RelName, event: &Event) {
        self.pending.push(store::StashedEvent {
            tick: self.tick,
            pos: self.next_pos,
            table: table.clone(),
            event: event.clone(),
        });
        self.next_pos += 1;
        self.kept += 1;
    }

    /// Writes what was kept since the last call.
    pub(crate) async fn write(
        &mut self,
        stx: &Transaction<'_>,
        queue: &str,
    ) -> Result<(), ReplicaError> {
        store::stash_events(stx, queue, &self.pending).await?;
        self.pending.clear();
        Ok(())
    }
}

/// Most events a batch may hold (judged by the event sequence, and checked) to be read in one
/// statement outside a transaction; bigger ones are read through a cursor, in chunks.
const SMALL_BATCH_EVENTS: i64 = 200;

/// Finishes batch `batch_id` on the provider without waiting for the provider's WAL flush.
/// Safe because the subscriber's position, committed before, is what makes replay exactly
/// once: if a provider crash loses this finish, the batch is handed out again and only
/// finished (its tick is already recorded on the subscriber). Any later durable commit on the
/// provider (a rotation, say) flushes it first.
pub async fn finish(provider: &Client, batch_id: i64) -> Result<(), ReplicaError> {
    provider
        .batch_execute(&format!(
            r#"begin; set local synchronous_commit = off; select "ferry"."finish_batch"({batch_id}); commit;"#
        ))
        .await
        .with_context(|| format!("finishing batch {batch_id}"))
}

/// Finishes batch `batch_id` (as [`finish`]) and asks for `consumer`'s next batch (as
/// [`next_batch`]), in one provider transaction without a flush and in one round trip: the
/// statements are sent together and the provider runs them in order, so the next batch starts
/// where this one ended.
pub async fn finish_and_next(
    provider: &Client,
    batch_id: i64,
    queue: &str,
    consumer: &str,
    max_events: i64,
) -> Result<Option<Batch>, ReplicaError> {
    let finish = format!(
        r#"begin; set local synchronous_commit = off; select "ferry"."finish_batch"({batch_id});"#
    );
    let (finished, next, committed) = tokio::join!(
        provider.batch_execute(&finish),
        ferry_queue::next_batch(provider, queue, consumer, Some(max_events)),
        provider.batch_execute("commit")
    );
    finished.with_context(|| format!("finishing batch {batch_id}"))?;
    let next = next?;
    committed.with_context(|| format!("finishing batch {batch_id}"))?;
    Ok(next)
}

/// `consumer`'s open batch or its next one (as [`ferry_queue::next_batch`]), handed out in a
/// provider transaction that does not wait for its flush, in one round trip. Safe for replay
/// for the reason [`finish`] is: if a provider crash loses the batch's opening, the queue hands
/// out a batch from the consumer's last finished tick again (perhaps spanning more ticks), and
/// the subscriber's position says what of it is applied already.
pub async fn next_batch(
    provider: &Client,
    queue: &str,
    consumer: &str,
    max_events: i64,
) -> Result<Option<Batch>, ReplicaError> {
    let (began, next, committed) = tokio::join!(
        provider.batch_execute("begin; set local synchronous_commit = off"),
        ferry_queue::next_batch(provider, queue, consumer, Some(max_events)),
        provider.batch_execute("commit")
    );
    began.context("asking for the next batch")?;
    let next = next?;
    committed.context("asking for the next batch")?;
    Ok(next)
}

/// Applies batches; keeps prepared statements and table shapes between them. Call
/// [`Applier::forget_tables`] after an error (a shape may have changed) or a reconnect
/// (statements die with the session).
#[derive(Default)]
pub struct Applier {
    cache: TableCache,
    /// The bookkeeping statements of the subscriber session (position, pause, table states).
    prepared: Prepared,
    /// A batch whose set-wise apply failed: tried again, it goes straight to event order.
    event_order_batch: Option<i64>,
}

impl Applier {
    /// Applies `batch` of `queue` to the subscriber; the caller then finishes it on the
    /// provider ([`finish_and_next`] or [`finish`]) when the outcome is `Applied` or
    /// `AlreadyApplied`. Independent tables (see [`crate::catalog::TableShape::independent`])
    /// are applied set-wise; if that fails for any reason but a lost connection, the batch is
    /// applied again in plain event order, which either works or fails with the precise
    /// event, table and key.
    pub async fn apply_batch(
        &mut self,
        provider: &mut Client,
        subscriber: &mut Client,
        queue: &str,
        batch: &Batch,
    ) -> Result<BatchOutcome, ReplicaError> {
        if self.event_order_batch == Some(batch.id) {
            return self
                .apply_batch_in(provider, subscriber, queue, batch, Mode::EventOrder)
                .await;
        }
        match self
            .apply_batch_in(provider, subscriber, queue, batch, Mode::SetWise)
            .await
        {
            Err(error)
                if !(error.is_connection_lost()
                    || provider.is_closed()
                    || subscriber.is_closed()) =>
            {
                if error.kind() == ErrorKind::NeedsEventOrder {
                    tracing::info!(batch = batch.id, reason = %error, "applying the batch in event order");
                } else {
                    tracing::info!(
                        batch = batch.id,
                        error = %ferry_daemon::logging::one_line(&error),
                        "set-wise apply failed; applying the batch again in event order"
                    );
                }
                self.cache.forget_shapes();
                self.event_order_batch = Some(batch.id);
                self.apply_batch_in(provider, subscriber, queue, batch, Mode::EventOrder)
                    .await
            }
            other => other,
        }
    }

    /// Forgets prepared statements and table shapes (after an error: a table may have
    /// changed; after a reconnect: statements die with their session), but not which batch
    /// must go in event order.
    pub fn forget_tables(&mut self) {
        self.cache.clear();
        self.prepared.clear();
    }

    /// The subscriber session's prepared bookkeeping statements, for replay's round.
    pub fn prepared(&self) -> &Prepared {
        &self.prepared
    }

    async fn apply_batch_in(
        &mut self,
        provider: &mut Client,
        subscriber: &mut Client,
        queue: &str,
        batch: &Batch,
        mode: Mode,
    ) -> Result<BatchOutcome, ReplicaError> {
        // a small batch is read while the subscriber's transaction starts (reading it for a
        // batch that turns out applied already costs nothing but the read)
        let small = batch.cur_tick.event_seq - batch.prev_tick.event_seq <= SMALL_BATCH_EVENTS;
        let (stx, read) = tokio::join!(subscriber.transaction(), async {
            if !small {
                return None;
            }
            let provider = &*provider;
            let (events, seq_values) = tokio::join!(
                ferry_queue::small_batch_events(provider, batch.id, SMALL_BATCH_EVENTS),
                provider::seq_values(provider, queue)
            );
            Some((events, seq_values))
        });
        let stx = stx.context("starting the batch's subscriber transaction")?;
        // sent together: one round trip
        let (replay_on, position, tables) = tokio::join!(
            // the batch's commit must be durable before the batch is finished on the
            // provider: with synchronous_commit off a crash could lose an applied batch
            stx.batch_execute(
                "set local ferry.replay = 'on'; \
                 select pg_catalog.set_config('synchronous_commit', 'local', true) \
                  where pg_catalog.current_setting('synchronous_commit') = 'off'"
            ),
            store::lock_position_prepared(&stx, Some(&self.prepared), queue),
            batch_tables(&stx, &self.prepared, queue)
        );
        replay_on.context("starting the batch's subscriber transaction")?;
        let (position, paused) = position?;
        if paused {
            // paused while batches were coming: this one stays open on the provider
            return Ok(BatchOutcome::Paused);
        }
        match store::batch_step(position, batch.prev_tick.id, batch.cur_tick.id) {
            BatchStep::Apply => {}
            BatchStep::FinishOnly => return Ok(BatchOutcome::AlreadyApplied),
            BatchStep::OutOfStep { recorded } => return Ok(BatchOutcome::OutOfStep { recorded }),
        }
        let tables = tables?;
        let mut stash = Stash::new(batch.cur_tick.id);
        // events kept by earlier batches for tables whose copy is done come first
        let unstashed = self.unstash(&stx, queue, &tables, mode, &mut stash).await?;
        let read = match read {
            Some((events, seq_values)) => events?.map(|events| (events, seq_values)),
            None => None,
        };
        let (applied, skipped, tables_ok) = match read {
            Some((events, seq_values)) => {
                let seq_values = seq_values?;
                let (statements, applied, skipped) = self
                    .prepare_page(&stx, queue, &tables, &events, mode, &mut stash)
                    .await?;
                let in_flight = send_set_statements(&stx, statements).await;
                let tables_ok = mark_caught_up(&*provider, &stx, queue, batch, &tables).await?;
                // the position follows the statements without waiting for them: if one
                // fails, so does everything after it, and the transaction never commits
                let (ran, recorded) = tokio::join!(in_flight, async {
                    sequences::sync_sequences(&stx, queue, &seq_values).await?;
                    store::record_position(&stx, &self.prepared, queue, batch.cur_tick.id).await
                });
                ran?;
                recorded?;
                (applied, skipped, tables_ok)
            }
            None => {
                self.apply_through_cursor(provider, &stx, queue, batch, &tables, mode, &mut stash)
                    .await?
            }
        };
        failpoint(failpoint::REPLAY_BEFORE_SUBSCRIBER_COMMIT);
        stx.commit()
            .await
            .with_context(|| format!("committing batch {}", batch.id))?;
        Ok(BatchOutcome::Applied {
            applied,
            skipped,
            kept: stash.kept,
            unstashed,
            tables_ok,
        })
    }

    /// Applies a big batch's events read through a cursor in a provider transaction, chunk by
    /// chunk, and records the position. Returns (applied, skipped, tables that became ok).
    #[allow(clippy::too_many_arguments)]
    async fn apply_through_cursor(
        &mut self,
        provider: &mut Client,
        stx: &Transaction<'_>,
        queue: &str,
        batch: &Batch,
        tables: &BatchTables,
        mode: Mode,
        stash: &mut Stash,
    ) -> Result<(u64, u64, u64), ReplicaError> {
        let ptx = provider
            .transaction()
            .await
            .context("starting the batch's provider transaction")?;
        let mut applied = 0;
        let mut skipped = 0;
        // parts of a chunk's size: the provider sorts a chunk's worth at a time, so the first
        // chunk of a big batch comes at once
        let mut reader = ChunkReader::new(
            BatchCursor::open_in_parts(&ptx, batch.id, CHUNK_EVENTS as i64).await?,
        );
        // Three chunks at a time: the provider reads the next one, replay reduces this one,
        // the subscriber runs the statements of the one before. Those statements are sent
        // (polled once) before this chunk's work starts, so the subscriber runs everything in
        // chunk order; a failure of theirs is reported before anything this chunk did.
        {
            let mut in_flight: Option<InFlight<'_>> = None;
            let mut chunk = reader.next_chunk().await?;
            while !chunk.is_empty() {
                let (ran, next, prepared) = tokio::join!(
                    async {
                        match in_flight.take() {
                            Some(statements) => statements.await,
                            None => Ok(()),
                        }
                    },
                    reader.next_chunk(),
                    self.prepare_page(stx, queue, tables, &chunk, mode, stash)
                );
                ran?;
                let (statements, page_applied, page_skipped) = prepared?;
                applied += page_applied;
                skipped += page_skipped;
                in_flight = Some(send_set_statements(stx, statements).await);
                chunk = next?;
            }
            if let Some(statements) = in_flight.take() {
                statements.await?;
            }
        }
        drop(reader);
        let tables_ok = mark_caught_up(&ptx, stx, queue, batch, tables).await?;
        let seq_values = provider::seq_values(&ptx, queue).await?;
        // the provider's read-only transaction ends while the subscriber records its position
        let (provider_done, subscriber_done) = tokio::join!(ptx.commit(), async {
            sequences::sync_sequences(stx, queue, &seq_values).await?;
            store::record_position(stx, &self.prepared, queue, batch.cur_tick.id).await
        });
        provider_done.context("ending the batch's provider transaction")?;
        subscriber_done?;
        Ok((applied, skipped, tables_ok))
    }

    /// Applies, in the batch's transaction and before its own events, the events earlier
    /// batches kept for tables whose copy is done (`CatchingUp` now: the same rule as for
    /// the batch's events says which the copy holds), in the order they came, and deletes
    /// them. Returns how many were read.
    async fn unstash(
        &mut self,
        stx: &Transaction<'_>,
        queue: &str,
        tables: &BatchTables,
        mode: Mode,
        stash: &mut Stash,
    ) -> Result<u64, ReplicaError> {
        // only the first batch after a copy finds anything: no query otherwise. The tables
        // are the ones this batch found copied: a copy committing meanwhile changes nothing
        // here (its table's kept events wait for the next batch).
        let copied: Vec<&RelName> = tables
            .values()
            .filter(|(_, state)| matches!(state, TableState::CatchingUp(_)))
            .map(|(table, _)| table)
            .collect();
        if copied.is_empty() {
            return Ok(0);
        }
        let mut read = 0;
        let mut after = None;
        loop {
            let page =
                store::stashed_events(stx, queue, &copied, after, CHUNK_EVENTS as i64).await?;
            let Some(last) = page.last() else { break };
            after = Some((last.tick, last.pos));
            read += page.len() as u64;
            let events: Vec<Event> = page.into_iter().map(|e| e.event).collect();
            let (statements, _, _) = self
                .prepare_page(stx, queue, tables, &events, mode, stash)
                .await?;
            send_set_statements(stx, statements).await.await?;
        }
        if let Some(upto) = after {
            store::forget_stashed(stx, queue, &copied, upto).await?;
            tracing::info!(queue, events = read, "events kept during copies applied");
        }
        Ok(read)
    }
}

/// The subscriber's tables of `queue`, keyed the way events name them.
async fn batch_tables(
    stx: &Transaction<'_>,
    prepared: &Prepared,
    queue: &str,
) -> Result<BatchTables, ReplicaError> {
    Ok(store::tables_prepared(stx, Some(prepared), queue)
        .await?
        .into_iter()
        .map(|t| (t.table.quoted(), (t.table, t.state)))
        .collect())
}

/// Marks `ok` the catching-up tables whose copy the batch's tick has fully seen: no later
/// batch can hold an event of a transaction their copy contains. Returns how many.
async fn mark_caught_up(
    provider: &impl GenericClient,
    stx: &Transaction<'_>,
    queue: &str,
    batch: &Batch,
    tables: &BatchTables,
) -> Result<u64, ReplicaError> {
    let catching_up: Vec<(&RelName, &Snapshot)> = tables
        .values()
        .filter_map(|(name, state)| match state {
            TableState::CatchingUp(copy) => Some((name, copy)),
            _ => None,
        })
        .collect();
    if catching_up.is_empty() {
        return Ok(0);
    }
    let tick: Snapshot = ferry_queue::tick_snapshot(provider, queue, batch.cur_tick.id)
        .await?
        .ok_or_else(|| {
            ReplicaError::corrupt(format!(
                "tick {} of queue \"{queue}\" is gone while its batch is open",
                batch.cur_tick.id
            ))
        })?
        .parse()
        .map_err(ReplicaError::corrupt)?;
    let mut became_ok = 0;
    for (table, copy) in catching_up {
        if !tick.sees_all_of(copy) {
            continue;
        }
        if store::mark_ok(stx, queue, table).await? {
            tracing::info!(table = %table, batch = batch.id, "table caught up: ok");
            became_ok += 1;
        }
    }
    Ok(became_ok)
}
