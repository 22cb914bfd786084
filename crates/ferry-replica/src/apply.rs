//! Applying one batch to the subscriber: every event of the batch, the sequences, and the
//! batch's tick as the new position, in ONE subscriber transaction; then the batch is
//! finished on the provider. A batch whose tick is already recorded is only finished, so a
//! crash between the subscriber's commit and the provider's finish repeats nothing.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::task::Poll;

use ferry_daemon::failpoint::{self, failpoint};
use ferry_queue::{Batch, BatchCursor, Event};
use serde::de::IgnoredAny;
use tokio_postgres::{Client, Statement, Transaction};

use crate::catalog::{table_shape, Column, TableShape};
use crate::columns::{column_arrays, ColumnSpec, ValueForm};
use crate::error::{ReplicaError, ResultExt};
use crate::names::{quote_ident, RelName};
use crate::provider::{self, SeqValue};
use crate::reduce::{Change, Pushed, TableChanges};
use crate::snapshot::Snapshot;
use crate::subscriber;

/// Events applied together (and reduced set-wise) at most.
const CHUNK_EVENTS: usize = 5000;
/// Event text held per chunk at most, so that replay's memory stays bounded however wide the
/// rows are (two chunks are alive at a time: one applying, one being read).
const CHUNK_BYTES: usize = 8 << 20;
/// Rows asked for by the first fetch of a batch, before their size is known.
const FIRST_FETCH: i32 = 100;

/// What applying a batch did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchOutcome {
    /// The batch's changes are now on the subscriber.
    Applied {
        /// Events applied.
        applied: u64,
        /// Events skipped: of tables not (yet) replicated here, or already in a copy.
        skipped: u64,
        /// Tables that became `ok` with this batch.
        tables_ok: u64,
    },
    /// The subscriber had this batch already (a crash hit after its commit); only finished.
    AlreadyApplied,
    /// The batch does not start at the subscriber's position (`recorded`): nothing applied;
    /// the consumer's position on the queue must be reconciled first.
    OutOfStep {
        /// The tick the subscriber has applied up to.
        recorded: i64,
    },
}

/// One set-wise statement with its rows.
struct SetStatement {
    statement: Statement,
    /// the rows as text arrays, one per parameter (see [`column_arrays`])
    arrays: Vec<Vec<Option<String>>>,
    rows: usize,
    /// "deletes", "updates" or "inserts": deletes and updates must touch every row
    what: &'static str,
    table: RelName,
}

/// Set-wise statements sent to the subscriber, their results not yet read.
type InFlight<'a> = Pin<Box<dyn Future<Output = Result<(), ReplicaError>> + Send + 'a>>;

/// Sends `statements` pipelined (the server runs them in order) and returns their results
/// to come: every statement is on its way when this returns, so whatever the caller sends
/// next runs after them. The results check that deletes and updates touched every row.
async fn send_set_statements<'a>(
    stx: &'a Transaction<'_>,
    statements: Vec<SetStatement>,
) -> InFlight<'a> {
    let runs = statements.into_iter().map(move |s| async move {
        let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = s
            .arrays
            .iter()
            .map(|a| a as &(dyn tokio_postgres::types::ToSql + Sync))
            .collect();
        let changed = stx
            .execute(&s.statement, &params)
            .await
            .with_context(|| format!("applying {} {} of {} set-wise", s.rows, s.what, s.table))?;
        if s.what != "inserts" && changed != s.rows as u64 {
            return Err(ReplicaError::refused(format!(
                "{} of {}: {changed} of {} rows found on the subscriber",
                s.what, s.table, s.rows
            )));
        }
        Ok(())
    });
    let mut results: InFlight<'a> = Box::pin(async move {
        futures_util::future::try_join_all(runs).await?;
        Ok(())
    });
    // the first poll sends every statement (tokio-postgres sends a query when first polled)
    if let Poll::Ready(done) = futures_util::poll!(&mut results) {
        return Box::pin(std::future::ready(done));
    }
    results
}

/// Runs `statements` pipelined and waits for their results (see [`send_set_statements`]).
async fn run_set_statements(
    stx: &Transaction<'_>,
    statements: Vec<SetStatement>,
) -> Result<(), ReplicaError> {
    send_set_statements(stx, statements).await.await
}

/// Where a set-wise statement reads its rows: `unnest` of one text array per column (see
/// [`column_arrays`]), and `json_populate_record` for the arrays and composites among them.
struct ArraySource {
    /// the FROM item, rows named `r` (and `s` for the structured columns)
    from: String,
    /// the value of each column, in the order given, cast to its type
    values: Vec<String>,
}

impl ArraySource {
    /// The source of `columns` for table `t` (quoted).
    fn new(t: &str, columns: &[Column]) -> ArraySource {
        // unnest's columns: c1, c2, ... for the columns passed as text, rest for the others
        let mut aliases = Vec::new();
        let mut values = Vec::new();
        for c in columns {
            if c.form == ValueForm::Structured {
                values.push(format!("s.{}", quote_ident(&c.name)));
            } else {
                aliases.push(format!("c{}", aliases.len() + 1));
                values.push(format!("r.c{}::{}", aliases.len(), c.cast_type));
            }
        }
        let structured = columns.iter().any(|c| c.form == ValueForm::Structured);
        if structured {
            aliases.push("rest".to_string());
        }
        let placeholders: Vec<String> = (1..=aliases.len())
            .map(|i| format!("${i}::text[]"))
            .collect();
        let mut from = format!(
            "unnest({}) as r({})",
            placeholders.join(", "),
            aliases.join(", ")
        );
        if structured {
            from.push_str(&format!(
                " cross join lateral json_populate_record(null::{t}, r.rest::json) s"
            ));
        }
        ArraySource { from, values }
    }

    /// `t."a" = <value of a> and ...` for the columns at `keys` (positions in the columns).
    fn key_match(&self, columns: &[Column], keys: &[usize]) -> String {
        keys.iter()
            .map(|&k| format!("t.{} = {}", quote_ident(&columns[k].name), self.values[k]))
            .collect::<Vec<_>>()
            .join(" and ")
    }
}

/// The column specs `column_arrays` needs for `columns`.
fn specs(columns: &[Column]) -> Vec<ColumnSpec<'_>> {
    columns
        .iter()
        .map(|c| ColumnSpec {
            name: &c.name,
            form: c.form,
        })
        .collect()
}

/// Finishes batch `batch_id` on the provider without waiting for the provider's WAL flush.
/// Safe because the subscriber's position, committed before, is what makes replay exactly
/// once: if a provider crash loses this finish, the batch is handed out again and only
/// finished (its tick is already recorded on the subscriber). Any later durable commit on the
/// provider (a rotation, say) flushes it first.
async fn finish_without_flush(provider: &Client, batch_id: i64) -> Result<(), ReplicaError> {
    provider
        .batch_execute(&format!(
            r#"begin; set local synchronous_commit = off; select "ferry"."finish_batch"({batch_id}); commit;"#
        ))
        .await
        .with_context(|| format!("finishing batch {batch_id}"))
}

/// Reads a batch's events in chunks bounded by count and by bytes.
struct ChunkReader<'t, 'c> {
    cursor: BatchCursor<'t, 'c>,
    /// rows asked for per fetch, adapted to the rows' size
    fetch: i32,
}

impl ChunkReader<'_, '_> {
    /// The next chunk: at most [`CHUNK_EVENTS`] events and about [`CHUNK_BYTES`] of text;
    /// empty when the batch is done.
    async fn next_chunk(&mut self) -> Result<Vec<Event>, ReplicaError> {
        let mut chunk = Vec::new();
        let mut bytes = 0;
        while chunk.len() < CHUNK_EVENTS && bytes < CHUNK_BYTES {
            let want = self.fetch.min((CHUNK_EVENTS - chunk.len()) as i32);
            let page = self.cursor.next_page(want).await?;
            if page.is_empty() {
                break;
            }
            let page_bytes: usize = page.iter().map(event_bytes).sum();
            bytes += page_bytes;
            // each later fetch aims at a quarter of the budget
            let average = (page_bytes / page.len()).max(1);
            self.fetch = (CHUNK_BYTES / 4 / average).clamp(1, CHUNK_EVENTS) as i32;
            chunk.extend(page);
        }
        Ok(chunk)
    }
}

/// The text an event holds.
fn event_bytes(event: &Event) -> usize {
    event.data.as_ref().map_or(0, String::len)
        + event.extra.iter().flatten().map(String::len).sum::<usize>()
        + 64
}

/// How a batch's events reach the subscriber.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Independent tables reduced per page and applied with a few statements each.
    SetWise,
    /// One statement per event, in event order.
    EventOrder,
}

/// A replicated table as the batch sees it.
enum TableState {
    /// Waiting for its copy: its events are in the copy, or will be.
    InCopy,
    /// Copied under this snapshot: events of transactions it saw are in the copy.
    CatchingUp(Snapshot),
    /// Every event applies.
    Ok,
}

/// Applies batches; keeps prepared statements and table shapes between them. Throw it away
/// after an error (a shape may have changed) or a reconnect (statements die with the session).
#[derive(Default)]
pub struct Applier {
    statements: HashMap<String, Statement>,
    shapes: HashMap<RelName, TableShape>,
    /// A batch whose set-wise apply failed: tried again, it goes straight to event order.
    event_order_batch: Option<i64>,
}

impl Applier {
    /// Applies `batch` of `queue` and finishes it on the provider. Independent tables (see
    /// [`TableShape::independent`]) are applied set-wise; if that fails for any reason but a
    /// lost connection, the batch is applied again in plain event order, which either works or
    /// fails with the precise event, table and key.
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
                tracing::info!(
                    batch = batch.id,
                    error = %ferry_daemon::logging::one_line(&error),
                    "set-wise apply failed; applying the batch again in event order"
                );
                self.shapes.clear();
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
        self.statements.clear();
        self.shapes.clear();
    }

    async fn apply_batch_in(
        &mut self,
        provider: &mut Client,
        subscriber: &mut Client,
        queue: &str,
        batch: &Batch,
        mode: Mode,
    ) -> Result<BatchOutcome, ReplicaError> {
        let stx = subscriber
            .transaction()
            .await
            .context("starting the batch's subscriber transaction")?;
        // sent together: one round trip
        let queue_param: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&queue];
        let (replay_on, position) = tokio::join!(
            // the batch's commit must be durable before the batch is finished on the
            // provider: with synchronous_commit off a crash could lose an applied batch
            stx.batch_execute(
                "set local ferry.replay = 'on'; \
                 select pg_catalog.set_config('synchronous_commit', 'local', true) \
                  where pg_catalog.current_setting('synchronous_commit') = 'off'"
            ),
            stx.query_opt(
                r#"select "last_tick_id" from "ferry"."subscriber_position"
                    where "queue_name" = $1 for update"#,
                &queue_param,
            )
        );
        replay_on.context("starting the batch's subscriber transaction")?;
        let position: Option<i64> = position
            .context("reading the subscriber's position")?
            .ok_or_else(|| {
                ReplicaError::refused(format!(
                    "ferry is not installed on the subscriber for queue \"{queue}\": run `ferry CONFIG subscriber install`"
                ))
            })?
            .get(0);
        if position == Some(batch.cur_tick.id) {
            drop(stx);
            finish_without_flush(provider, batch.id).await?;
            return Ok(BatchOutcome::AlreadyApplied);
        }
        if let Some(recorded) = position.filter(|p| *p != batch.prev_tick.id) {
            return Ok(BatchOutcome::OutOfStep { recorded });
        }

        let (ptx, tables) = tokio::join!(provider.transaction(), self.table_states(&stx, queue));
        let ptx = ptx.context("starting the batch's provider transaction")?;
        let tables = tables?;
        let mut applied = 0;
        let mut skipped = 0;
        // parts of a chunk's size: the provider sorts a chunk's worth at a time, so the first
        // chunk of a big batch comes at once
        let mut reader = ChunkReader {
            cursor: BatchCursor::open_in_parts(&ptx, batch.id, CHUNK_EVENTS as i64).await?,
            fetch: FIRST_FETCH,
        };
        // Three chunks at a time: the provider reads the next one, replay reduces this one,
        // the subscriber runs the statements of the one before. Those statements are sent
        // (polled once) before this chunk's work starts, so the subscriber runs everything in
        // chunk order; a failure of theirs is reported before anything this chunk did.
        {
            let mut in_flight: Option<InFlight<'_>> = None;
            let mut page = reader.next_chunk().await?;
            while !page.is_empty() {
                let (ran, next, prepared) = tokio::join!(
                    async {
                        match in_flight.take() {
                            Some(statements) => statements.await,
                            None => Ok(()),
                        }
                    },
                    reader.next_chunk(),
                    self.prepare_page(&stx, &tables, &page, mode)
                );
                ran?;
                let (statements, page_applied, page_skipped) = prepared?;
                applied += page_applied;
                skipped += page_skipped;
                in_flight = Some(send_set_statements(&stx, statements).await);
                page = next?;
            }
            if let Some(statements) = in_flight.take() {
                statements.await?;
            }
        }
        drop(reader);
        let tables_ok = self
            .mark_caught_up(&ptx, &stx, queue, batch, &tables)
            .await?;
        let seq_values = provider::seq_values(&ptx, queue).await?;
        // the provider's read-only transaction ends while the subscriber records its position
        let (provider_done, subscriber_done) = tokio::join!(ptx.commit(), async {
            sync_sequences(&stx, queue, &seq_values).await?;
            stx.execute(
                r#"update "ferry"."subscriber_position" set "last_tick_id" = $2, "updated" = now()
                    where "queue_name" = $1"#,
                &[&queue, &batch.cur_tick.id],
            )
            .await
            .context("recording the subscriber's position")
        });
        provider_done.context("ending the batch's provider transaction")?;
        subscriber_done?;
        failpoint(failpoint::REPLAY_BEFORE_SUBSCRIBER_COMMIT);
        stx.commit()
            .await
            .with_context(|| format!("committing batch {}", batch.id))?;
        failpoint(failpoint::REPLAY_BEFORE_FINISH);
        finish_without_flush(provider, batch.id).await?;
        Ok(BatchOutcome::Applied {
            applied,
            skipped,
            tables_ok,
        })
    }

    /// Applies one page of events: in event order, or with each independent table's changes
    /// reduced to statements that the caller runs after the page (see
    /// [`send_set_statements`]). Returns (those statements, applied, skipped).
    async fn prepare_page(
        &mut self,
        stx: &Transaction<'_>,
        tables: &HashMap<String, (RelName, TableState)>,
        page: &[Event],
        mode: Mode,
    ) -> Result<(Vec<SetStatement>, u64, u64), ReplicaError> {
        let mut applied = 0;
        let mut skipped = 0;
        let mut gathered: HashMap<&RelName, TableChanges<'_>> = HashMap::new();
        for event in page {
            let target = event.extra[0].as_deref().and_then(|key| tables.get(key));
            let apply = match target {
                None => false,
                Some((_, TableState::InCopy)) => false,
                Some((_, TableState::CatchingUp(copy))) => !copy.sees(event.txid),
                Some((_, TableState::Ok)) => true,
            };
            let Some((table, _)) = target.filter(|_| apply) else {
                skipped += 1;
                continue;
            };
            applied += 1;
            if mode == Mode::EventOrder {
                self.apply_event(stx, table, event).await?;
                continue;
            }
            let change = match change_of(event) {
                Some(change) if self.is_independent(stx, table).await? => change,
                // a truncate, or a table others depend on: in event order (after what was
                // gathered for the table, so its own order holds)
                _ => {
                    if let Some(changes) = gathered.get_mut(table) {
                        self.apply_set_wise(stx, table, changes).await?;
                    }
                    self.apply_event(stx, table, event).await?;
                    continue;
                }
            };
            let changes = match gathered.entry(table) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => {
                    let shape = self.shape(stx, table, &[]).await?;
                    let key = shape.primary_key().iter().map(|c| c.to_string()).collect();
                    e.insert(TableChanges::new(key))
                }
            };
            match changes
                .push(change)
                .map_err(|e| ReplicaError::refused(format!("event {} of {table}: {e}", event.id)))?
            {
                Pushed::Reduced => {}
                Pushed::KeyMoved => {
                    self.apply_set_wise(stx, table, changes).await?;
                    self.apply_event(stx, table, event).await?;
                }
            }
        }
        // every table's statements, to be sent at once: the server runs them in order
        let mut statements = Vec::new();
        for (table, changes) in &mut gathered {
            statements.extend(self.plan_set_wise(stx, table, changes).await?);
        }
        Ok((statements, applied, skipped))
    }

    /// Whether `table` may be applied set-wise (cached with its shape).
    async fn is_independent(
        &mut self,
        stx: &Transaction<'_>,
        table: &RelName,
    ) -> Result<bool, ReplicaError> {
        Ok(self.shape(stx, table, &[]).await?.independent)
    }

    /// Applies the changes gathered for `table`: deletes, then updates, then inserts, each a
    /// single statement over a json array (per set of columns).
    async fn apply_set_wise(
        &mut self,
        stx: &Transaction<'_>,
        table: &RelName,
        changes: &mut TableChanges<'_>,
    ) -> Result<(), ReplicaError> {
        let statements = self.plan_set_wise(stx, table, changes).await?;
        run_set_statements(stx, statements).await
    }

    /// The statements applying the changes gathered for `table`: deletes, then updates, then
    /// inserts, each one statement over a json array (per set of columns).
    async fn plan_set_wise(
        &mut self,
        stx: &Transaction<'_>,
        table: &RelName,
        changes: &mut TableChanges<'_>,
    ) -> Result<Vec<SetStatement>, ReplicaError> {
        let mut statements = Vec::new();
        if changes.is_empty() {
            return Ok(statements);
        }
        let plan = changes.take_plan();
        let t = table.quoted();
        let refused = |e: String| ReplicaError::refused(format!("{table}: {e}"));
        if !plan.deletes.is_empty() {
            let shape = self.shape(stx, table, &[]).await?;
            let keys: Vec<Column> = shape
                .columns
                .iter()
                .filter(|c| c.in_primary_key)
                .cloned()
                .collect();
            let source = ArraySource::new(&t, &keys);
            let all: Vec<usize> = (0..keys.len()).collect();
            let sql = format!(
                "delete from {t} as t using {from} where {w}",
                from = source.from,
                w = source.key_match(&keys, &all)
            );
            statements.push(SetStatement {
                statement: self.statement(stx, table, &sql).await?,
                arrays: column_arrays(&plan.deletes, &specs(&keys)).map_err(refused)?,
                rows: plan.deletes.len(),
                what: "deletes",
                table: table.clone(),
            });
        }
        for (groups, is_update) in [(&plan.updates, true), (&plan.inserts, false)] {
            for group in groups {
                let columns = self.set_columns(stx, table, group[0]).await?;
                let source = ArraySource::new(&t, &columns);
                let sql = if is_update {
                    let set = columns
                        .iter()
                        .zip(&source.values)
                        .map(|(c, v)| format!("{} = {v}", quote_ident(&c.name)))
                        .collect::<Vec<_>>()
                        .join(", ");
                    let keys: Vec<usize> = (0..columns.len())
                        .filter(|&i| columns[i].in_primary_key)
                        .collect();
                    format!(
                        "update {t} as t set {set} from {from} where {w}",
                        from = source.from,
                        w = source.key_match(&columns, &keys)
                    )
                } else {
                    let list = columns
                        .iter()
                        .map(|c| quote_ident(&c.name))
                        .collect::<Vec<_>>()
                        .join(", ");
                    format!(
                        "insert into {t} ({list}) overriding system value select {values} from {from}",
                        values = source.values.join(", "),
                        from = source.from
                    )
                };
                statements.push(SetStatement {
                    statement: self.statement(stx, table, &sql).await?,
                    arrays: column_arrays(group, &specs(&columns)).map_err(refused)?,
                    rows: group.len(),
                    what: if is_update { "updates" } else { "inserts" },
                    table: table.clone(),
                });
            }
        }
        Ok(statements)
    }

    /// The prepared statement for `sql`, prepared once per session.
    async fn statement(
        &mut self,
        stx: &Transaction<'_>,
        table: &RelName,
        sql: &str,
    ) -> Result<Statement, ReplicaError> {
        if let Some(s) = self.statements.get(sql) {
            return Ok(s.clone());
        }
        let s = stx
            .prepare(sql)
            .await
            .with_context(|| format!("preparing the statements for {table}"))?;
        self.statements.insert(sql.to_string(), s.clone());
        Ok(s)
    }

    /// The subscriber's tables, keyed the way events name them.
    async fn table_states(
        &mut self,
        stx: &Transaction<'_>,
        queue: &str,
    ) -> Result<HashMap<String, (RelName, TableState)>, ReplicaError> {
        let mut tables = HashMap::new();
        for t in subscriber::registered_tables(stx, queue).await? {
            let state = match t.state.as_str() {
                "in-copy" => TableState::InCopy,
                "ok" => TableState::Ok,
                _ => TableState::CatchingUp(
                    t.copy_snapshot
                        .as_deref()
                        .unwrap_or_default()
                        .parse()
                        .map_err(|e: String| {
                            ReplicaError::refused(format!("table {}: {e}", t.table))
                        })?,
                ),
            };
            tables.insert(t.table.quoted(), (t.table, state));
        }
        Ok(tables)
    }

    /// Marks `ok` the catching-up tables whose copy the batch's tick has fully seen: no later
    /// batch can hold an event of a transaction their copy contains. Returns how many.
    async fn mark_caught_up(
        &self,
        ptx: &Transaction<'_>,
        stx: &Transaction<'_>,
        queue: &str,
        batch: &Batch,
        tables: &HashMap<String, (RelName, TableState)>,
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
        let tick: Snapshot = ferry_queue::tick_snapshot(ptx, queue, batch.cur_tick.id)
            .await?
            .ok_or_else(|| {
                ReplicaError::refused(format!(
                    "tick {} of queue \"{queue}\" is gone",
                    batch.cur_tick.id
                ))
            })?
            .parse()
            .map_err(ReplicaError::refused)?;
        let mut became_ok = 0;
        for (table, copy) in catching_up {
            if !tick.sees_all_of(copy) {
                continue;
            }
            stx.execute(
                r#"update "ferry"."subscriber_table" set "state" = 'ok', "state_changed" = now()
                    where "queue_name" = $1 and "table_schema" = $2 and "table_name" = $3"#,
                &[&queue, &table.schema, &table.name],
            )
            .await
            .with_context(|| format!("marking {table} ok"))?;
            tracing::info!(table = %table, batch = batch.id, "table caught up: ok");
            became_ok += 1;
        }
        Ok(became_ok)
    }

    /// Applies one row event (or a TRUNCATE) to `table`.
    async fn apply_event(
        &mut self,
        stx: &Transaction<'_>,
        table: &RelName,
        event: &Event,
    ) -> Result<(), ReplicaError> {
        let ev_type = event.ev_type.as_deref().unwrap_or("");
        if ev_type == "T" {
            stx.batch_execute(&format!("truncate {}", table.quoted()))
                .await
                .with_context(|| format!("truncating {table}"))?;
            return Ok(());
        }
        let data = event.data.as_deref().ok_or_else(|| {
            ReplicaError::refused(format!("event {} of {table} has no data", event.id))
        })?;
        let (sql, params, expect_one): (String, Vec<&str>, bool) = match ev_type {
            "I" => {
                let columns = self.writable_columns(stx, table, data).await?;
                let list = columns.join(", ");
                (
                    format!(
                        "insert into {t} ({list}) overriding system value select {list} from json_populate_record(null::{t}, $1::text::json)",
                        t = table.quoted()
                    ),
                    vec![data],
                    false,
                )
            }
            "U" => {
                let key = event.extra[1].as_deref().ok_or_else(|| {
                    ReplicaError::refused(format!(
                        "update event {} of {table} has no key",
                        event.id
                    ))
                })?;
                let columns = self.writable_columns(stx, table, data).await?;
                let keys = self.key_columns(stx, table, key).await?;
                let set = assignments(&columns);
                (
                    format!(
                        "update {t} as t set {set} from json_populate_record(null::{t}, $1::text::json) r, json_populate_record(null::{t}, $2::text::json) k where {w}",
                        t = table.quoted(),
                        w = key_match(&keys, "k")
                    ),
                    vec![data, key],
                    true,
                )
            }
            "D" => {
                let keys = self.key_columns(stx, table, data).await?;
                (
                    format!(
                        "delete from {t} as t using json_populate_record(null::{t}, $1::text::json) k where {w}",
                        t = table.quoted(),
                        w = key_match(&keys, "k")
                    ),
                    vec![data],
                    true,
                )
            }
            other => {
                return Err(ReplicaError::refused(format!(
                    "event {} of {table} has unknown type {other:?}",
                    event.id
                )))
            }
        };
        let statement = self.statement(stx, table, &sql).await?;
        let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = params
            .iter()
            .map(|p| p as &(dyn tokio_postgres::types::ToSql + Sync))
            .collect();
        let changed = match stx.execute(&statement, &params).await {
            Ok(changed) => changed,
            Err(error) => {
                let key = self.row_key(table, event);
                // a lost connection is no refusal
                let what = if ferry_connect::is_connection_lost(&error) {
                    "applying"
                } else {
                    "the subscriber refused"
                };
                return Err(ReplicaError::db(
                    format!(
                        "{what} {} of {table} with key {key} (event {}, transaction {})",
                        operation_name(ev_type),
                        event.id,
                        event.txid
                    ),
                    error,
                )
                .about(table));
            }
        };
        if expect_one && changed != 1 {
            return Err(ReplicaError::refused(format!(
                "{} of {table} found {changed} rows with key {} on the subscriber, expected 1: the replica is out of step (`subscriber resync {table}` copies it again)",
                operation_name(ev_type),
                self.row_key(table, event)
            ))
            .about(table));
        }
        Ok(())
    }

    /// The primary key of the row `event` changes, as json (`{"id":5}`): the old key of an
    /// update or delete, the new row's key columns of an insert. For messages only.
    fn row_key(&self, table: &RelName, event: &Event) -> String {
        let (json, whole) = match event.ev_type.as_deref() {
            Some("U") => (event.extra[1].as_deref(), true),
            Some("D") => (event.data.as_deref(), true),
            _ => (event.data.as_deref(), false),
        };
        let Some(Ok(row)) =
            json.map(serde_json::from_str::<serde_json::Map<String, serde_json::Value>>)
        else {
            return "(unknown)".to_string();
        };
        let keys = self
            .shapes
            .get(table)
            .map(|s| s.primary_key())
            .unwrap_or_default();
        let key: serde_json::Map<String, serde_json::Value> = row
            .into_iter()
            .filter(|(name, _)| whole || keys.contains(&name.as_str()))
            .collect();
        serde_json::Value::Object(key).to_string()
    }

    /// The quoted columns of `data` (a row as json) that replay writes: all but those the
    /// subscriber computes. A column the subscriber lacks stops replay, naming it.
    async fn writable_columns(
        &mut self,
        stx: &Transaction<'_>,
        table: &RelName,
        data: &str,
    ) -> Result<Vec<String>, ReplicaError> {
        Ok(self
            .set_columns(stx, table, data)
            .await?
            .iter()
            .map(|c| quote_ident(&c.name))
            .collect())
    }

    /// The subscriber's columns that `row` (a row as json) sets, in the row's order: all but
    /// those the subscriber computes. A column the subscriber lacks stops replay, naming it.
    async fn set_columns(
        &mut self,
        stx: &Transaction<'_>,
        table: &RelName,
        row: &str,
    ) -> Result<Vec<Column>, ReplicaError> {
        let names = json_keys(table, row)?;
        let shape = self.shape(stx, table, &names).await?;
        Ok(names
            .iter()
            .filter_map(|n| shape.column(n).filter(|c| !c.generated).cloned())
            .collect())
    }

    /// The quoted key columns of `key` (a primary key as json).
    async fn key_columns(
        &mut self,
        stx: &Transaction<'_>,
        table: &RelName,
        key: &str,
    ) -> Result<Vec<String>, ReplicaError> {
        let names = json_keys(table, key)?;
        self.shape(stx, table, &names).await?;
        Ok(names.iter().map(|n| quote_ident(n)).collect())
    }

    /// The subscriber table's shape, read again when `needed` names a column the cached one
    /// lacks; an error names a column that is really missing.
    async fn shape(
        &mut self,
        stx: &Transaction<'_>,
        table: &RelName,
        needed: &[String],
    ) -> Result<&TableShape, ReplicaError> {
        let stale = match self.shapes.get(table) {
            None => true,
            Some(shape) => needed.iter().any(|n| shape.column(n).is_none()),
        };
        if stale {
            let shape = table_shape(stx, table).await?.ok_or_else(|| {
                ReplicaError::refused(format!(
                    "table {table} does not exist on the subscriber any more"
                ))
            })?;
            if let Some(missing) = needed.iter().find(|n| shape.column(n).is_none()) {
                return Err(ReplicaError::refused(format!(
                    "column {} of table {table} is missing on the subscriber: add it there; replay retries this batch",
                    quote_ident(missing)
                ))
                .about(table));
            }
            self.shapes.insert(table.clone(), shape);
        }
        Ok(self.shapes.get(table).expect("inserted above"))
    }
}

/// `"a" = r."a", "b" = r."b"`: every column set from source row r.
fn assignments(columns: &[String]) -> String {
    columns
        .iter()
        .map(|c| format!("{c} = r.{c}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `t."a" = k."a" and t."b" = k."b"` (for `source` k).
fn key_match(keys: &[String], source: &str) -> String {
    keys.iter()
        .map(|k| format!("t.{k} = {source}.{k}"))
        .collect::<Vec<_>>()
        .join(" and ")
}

/// The row change an I, U or D event carries (`None` for anything else, a TRUNCATE say, or an
/// event missing its data).
fn change_of(event: &Event) -> Option<Change<'_>> {
    let data = event.data.as_deref()?;
    match event.ev_type.as_deref()? {
        "I" => Some(Change::Insert { row: data }),
        "U" => Some(Change::Update {
            row: data,
            old_key: event.extra[1].as_deref()?,
        }),
        "D" => Some(Change::Delete { old_key: data }),
        _ => None,
    }
}

fn operation_name(ev_type: &str) -> &'static str {
    match ev_type {
        "I" => "an insert",
        "U" => "an update",
        "D" => "a delete",
        "T" => "a truncate",
        _ => "an event",
    }
}

/// The top-level keys of a json object, sorted.
fn json_keys(table: &RelName, data: &str) -> Result<Vec<String>, ReplicaError> {
    let map: BTreeMap<String, IgnoredAny> = serde_json::from_str(data).map_err(|e| {
        ReplicaError::refused(format!("an event of {table} carries malformed data: {e}"))
    })?;
    Ok(map.into_keys().collect())
}

/// Moves each subscriber sequence of `queue` up to the provider's value (never down).
async fn sync_sequences(
    stx: &Transaction<'_>,
    queue: &str,
    provider_values: &[SeqValue],
) -> Result<(), ReplicaError> {
    if provider_values.is_empty() {
        return Ok(());
    }
    for seq in subscriber::seqs(stx, queue).await? {
        let Some(p) = provider_values.iter().find(|v| v.seq == seq) else {
            continue;
        };
        let row = stx
            .query_one(
                &format!("select last_value, is_called from {}", seq.quoted()),
                &[],
            )
            .await
            .with_context(|| format!("reading sequence {seq}"))?;
        let (last, called): (i64, bool) = (row.get(0), row.get(1));
        // the last value handed out (or about to be) on each side
        let effective = |value: i64, called: bool| if called { value } else { value - p.increment };
        let behind = if p.increment >= 0 {
            effective(p.last_value, p.is_called) > effective(last, called)
        } else {
            effective(p.last_value, p.is_called) < effective(last, called)
        };
        if behind {
            stx.execute(
                "select setval($1::text::regclass, $2, $3)",
                &[&seq.quoted(), &p.last_value, &p.is_called],
            )
            .await
            .with_context(|| format!("moving sequence {seq} forward"))?;
        }
    }
    Ok(())
}
