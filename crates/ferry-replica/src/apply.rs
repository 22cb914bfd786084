//! Applying one batch to the subscriber: every event of the batch, the sequences, and the
//! batch's tick as the new position, in ONE subscriber transaction; then the batch is
//! finished on the provider. A batch whose tick is already recorded is only finished, so a
//! crash between the subscriber's commit and the provider's finish repeats nothing.

use std::collections::{BTreeMap, HashMap};

use ferry_queue::{Batch, BatchCursor, Event};
use serde::de::IgnoredAny;
use tokio_postgres::{Client, Statement, Transaction};

use crate::catalog::{table_shape, TableShape};
use crate::error::{ReplicaError, ResultExt};
use crate::names::{quote_ident, RelName};
use crate::provider::{self, SeqValue};
use crate::snapshot::Snapshot;
use crate::subscriber;

/// Events read from the provider per round trip.
const PAGE_SIZE: i32 = 1000;

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
}

impl Applier {
    /// Applies `batch` of `queue` and finishes it on the provider.
    pub async fn apply_batch(
        &mut self,
        provider: &mut Client,
        subscriber: &mut Client,
        queue: &str,
        batch: &Batch,
    ) -> Result<BatchOutcome, ReplicaError> {
        let stx = subscriber
            .transaction()
            .await
            .context("starting the batch's subscriber transaction")?;
        stx.batch_execute("set local ferry.replay = 'on'")
            .await
            .context("starting the batch's subscriber transaction")?;
        let position: Option<i64> = stx
            .query_opt(
                r#"select "last_tick_id" from "ferry"."subscriber_position"
                    where "queue_name" = $1 for update"#,
                &[&queue],
            )
            .await
            .context("reading the subscriber's position")?
            .ok_or_else(|| {
                ReplicaError::refused(format!(
                    "ferry is not installed on the subscriber for queue \"{queue}\": run `ferry CONFIG subscriber install`"
                ))
            })?
            .get(0);
        if position == Some(batch.cur_tick.id) {
            drop(stx);
            ferry_queue::finish_batch(&*provider, batch.id).await?;
            return Ok(BatchOutcome::AlreadyApplied);
        }
        if position.is_some_and(|p| p != batch.prev_tick.id) {
            tracing::warn!(
                queue,
                batch = batch.id,
                recorded_tick = position,
                batch_start_tick = batch.prev_tick.id,
                "the subscriber's position is not where this batch starts (was the consumer registered again?)"
            );
        }

        let ptx = provider
            .transaction()
            .await
            .context("starting the batch's provider transaction")?;
        let tables = self.table_states(&stx, queue).await?;
        let mut applied = 0;
        let mut skipped = 0;
        let mut cursor = BatchCursor::open(&ptx, batch.id).await?;
        loop {
            let page = cursor.next_page(PAGE_SIZE).await?;
            if page.is_empty() {
                break;
            }
            for event in &page {
                let target = event.extra[0].as_deref().and_then(|key| tables.get(key));
                let apply = match target {
                    None => false,
                    Some((_, TableState::InCopy)) => false,
                    Some((_, TableState::CatchingUp(copy))) => !copy.sees(event.txid),
                    Some((_, TableState::Ok)) => true,
                };
                if apply {
                    let (table, _) = target.expect("checked above");
                    self.apply_event(&stx, table, event).await?;
                    applied += 1;
                } else {
                    skipped += 1;
                }
            }
        }
        drop(cursor);
        let tables_ok = self
            .mark_caught_up(&ptx, &stx, queue, batch, &tables)
            .await?;
        let seq_values = provider::seq_values(&ptx, queue).await?;
        ptx.commit()
            .await
            .context("ending the batch's provider transaction")?;
        sync_sequences(&stx, queue, &seq_values).await?;
        stx.execute(
            r#"update "ferry"."subscriber_position" set "last_tick_id" = $2, "updated" = now()
                where "queue_name" = $1"#,
            &[&queue, &batch.cur_tick.id],
        )
        .await
        .context("recording the subscriber's position")?;
        stx.commit()
            .await
            .with_context(|| format!("committing batch {}", batch.id))?;
        ferry_queue::finish_batch(&*provider, batch.id).await?;
        Ok(BatchOutcome::Applied {
            applied,
            skipped,
            tables_ok,
        })
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
                let set = columns
                    .iter()
                    .map(|c| format!("{c} = r.{c}"))
                    .collect::<Vec<_>>()
                    .join(", ");
                (
                    format!(
                        "update {t} as t set {set} from json_populate_record(null::{t}, $1::text::json) r, json_populate_record(null::{t}, $2::text::json) k where {w}",
                        t = table.quoted(),
                        w = key_match(&keys)
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
                        w = key_match(&keys)
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
        let statement = match self.statements.get(&sql) {
            Some(s) => s.clone(),
            None => {
                let s = stx
                    .prepare(&sql)
                    .await
                    .with_context(|| format!("preparing the statements for {table}"))?;
                self.statements.insert(sql.clone(), s.clone());
                s
            }
        };
        let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = params
            .iter()
            .map(|p| p as &(dyn tokio_postgres::types::ToSql + Sync))
            .collect();
        let changed = stx.execute(&statement, &params).await.with_context(|| {
            format!(
                "applying {} of {table} (event {}, transaction {})",
                operation_name(ev_type),
                event.id,
                event.txid
            )
        })?;
        if expect_one && changed != 1 {
            let key = if ev_type == "U" {
                event.extra[1].as_deref()
            } else {
                Some(data)
            };
            return Err(ReplicaError::refused(format!(
                "{} of {table} found {changed} rows with key {} on the subscriber, expected 1: the replica is out of step (`subscriber resync {table}` copies it again)",
                operation_name(ev_type),
                key.unwrap_or("?")
            )));
        }
        Ok(())
    }

    /// The quoted columns of `data` (a row as json) that replay writes: all but those the
    /// subscriber computes. A column the subscriber lacks stops replay, naming it.
    async fn writable_columns(
        &mut self,
        stx: &Transaction<'_>,
        table: &RelName,
        data: &str,
    ) -> Result<Vec<String>, ReplicaError> {
        let names = json_keys(table, data)?;
        let shape = self.shape(stx, table, &names).await?;
        Ok(names
            .iter()
            .filter(|n| shape.column(n).is_some_and(|c| !c.generated))
            .map(|n| quote_ident(n))
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
                )));
            }
            self.shapes.insert(table.clone(), shape);
        }
        Ok(self.shapes.get(table).expect("inserted above"))
    }
}

/// `t."a" = k."a" and t."b" = k."b"`.
fn key_match(keys: &[String]) -> String {
    keys.iter()
        .map(|k| format!("t.{k} = k.{k}"))
        .collect::<Vec<_>>()
        .join(" and ")
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
