//! Applying a page of events: each event decoded once ([`QueueEvent`]), skipped or applied as
//! its table's state says, and applied either in event order (one statement per event) or,
//! for independent tables, reduced to each row's net change and applied set-wise. SQL run
//! through the queue runs at its place, in event order only.

use std::collections::HashMap;

use ferry_queue::Event;
use tokio_postgres::Transaction;

use super::pipeline::{run_set_statements, SetOp, SetSql, SetStatement};
use super::{sql, Applier, BatchTables, Mode, Stash};
use crate::catalog::Column;
use crate::columns::{column_arrays, ColumnSpec, ValueForm};
use crate::error::{ErrorKind, ReplicaError, ResultExt};
use crate::event::{QueueEvent, RowChange, TableEvent};
use crate::names::RelName;
use crate::reduce::{Pushed, TableChanges};

/// A table's inserts of one set of columns go in by `COPY` from this many rows on (and when
/// none of the columns is an array or a composite, which only `json_populate_record` reads):
/// the server's multi-row insert path, about twice as fast as an `INSERT` over text arrays
/// for a thousand rows and more. Fewer go by the prepared `INSERT` (planned once per session).
pub(crate) const COPY_IN_FROM_ROWS: usize = 200;

impl Applier {
    /// Applies one page of events: in event order, or with each independent table's changes
    /// reduced to statements that the caller runs after the page (see
    /// [`super::pipeline::send_set_statements`]). Events of tables being copied that their
    /// copy will not contain go to `stash`. Returns (those statements, applied, skipped).
    pub(super) async fn prepare_page(
        &mut self,
        stx: &Transaction<'_>,
        queue: &str,
        tables: &BatchTables,
        page: &[Event],
        mode: Mode,
        stash: &mut Stash,
    ) -> Result<(Vec<SetStatement>, u64, u64), ReplicaError> {
        let mut applied = 0;
        let mut skipped = 0;
        let mut gathered: HashMap<&RelName, TableChanges<'_>> = HashMap::new();
        let events = page
            .iter()
            .map(QueueEvent::decode)
            .collect::<Result<Vec<_>, _>>()?;

        let target = |event: &TableEvent<'_>| {
            tables
                .get(event.table)
                .filter(|(_, state)| state.applies(event.txid))
                .map(|(table, _)| table)
        };
        // the table of an event to keep for after its copy
        let kept = |event: &TableEvent<'_>| {
            tables
                .get(event.table)
                .filter(|(_, state)| state.keeps(event.txid))
                .map(|(table, _)| table)
        };
        let mut at = 0;
        while at < events.len() {
            let event = match &events[at] {
                QueueEvent::Table(event) => event,
                QueueEvent::Execute(execute) => {
                    if mode == Mode::SetWise {
                        // statements gathered before it would run after it
                        return Err(ReplicaError::new(
                            ErrorKind::NeedsEventOrder,
                            format!(
                                "the batch holds file \"{}\" run through the queue",
                                execute.file
                            ),
                        ));
                    }
                    at += 1;
                    crate::execute::run_on_subscriber(stx, queue, execute).await?;
                    // tables may have changed: shapes and statements are read again
                    self.cache.clear();
                    applied += 1;
                    continue;
                }
            };
            at += 1;
            let Some(table) = target(event) else {
                match kept(event) {
                    Some(table) => stash.keep(table, &page[at - 1]),
                    None => skipped += 1,
                }
                continue;
            };
            applied += 1;
            if matches!(event.change, RowChange::Truncate) {
                // one TRUNCATE of the provider (of several tables, or cascaded) is one event
                // per table, in a row: truncated together, as foreign keys between them need
                let mut group = vec![table];
                while let Some(next) = table_event(events.get(at)).filter(|next| {
                    matches!(next.change, RowChange::Truncate) && next.txid == event.txid
                }) {
                    at += 1;
                    match (target(next), kept(next)) {
                        (Some(table), _) => {
                            applied += 1;
                            group.push(table);
                        }
                        (None, Some(table)) => stash.keep(table, &page[at - 1]),
                        (None, None) => skipped += 1,
                    }
                }
                for table in &group {
                    if let Some(changes) = gathered.get_mut(*table) {
                        self.apply_set_wise(stx, table, changes).await?;
                    }
                }
                truncate_tables(stx, &group).await?;
                continue;
            }
            if mode == Mode::EventOrder {
                self.apply_event(stx, table, event).await?;
                continue;
            }
            if !event.json_nulls.is_empty() || !self.is_independent(stx, table).await? {
                // a row holding a JSON null (rare: its statement is its own), or a table others
                // depend on: in event order (after what was gathered for the table, so its own
                // order holds)
                if let Some(changes) = gathered.get_mut(table) {
                    self.apply_set_wise(stx, table, changes).await?;
                }
                self.apply_event(stx, table, event).await?;
                continue;
            }
            let changes = match gathered.entry(table) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => {
                    let shape = self.cache.shape(stx, table, &[]).await?;
                    let key = shape.primary_key().iter().map(|c| c.to_string()).collect();
                    e.insert(TableChanges::new(key))
                }
            };
            match changes
                .push(event.change)
                .map_err(|e| ReplicaError::corrupt(format!("event {} of {table}: {e}", event.id)))?
            {
                Pushed::Reduced => {}
                Pushed::KeyMoved => {
                    self.apply_set_wise(stx, table, changes).await?;
                    self.apply_event(stx, table, event).await?;
                }
            }
        }
        stash.write(stx, queue).await?;
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
        Ok(self.cache.shape(stx, table, &[]).await?.independent)
    }

    /// Applies the changes gathered for `table` now (see [`Applier::plan_set_wise`]).
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
    /// inserts, each one statement over text arrays (per set of columns).
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
        // the rows were parsed when they were reduced: a failure here is ferry's own
        let corrupt = |e: String| ReplicaError::corrupt(format!("{table}: {e}"));
        if !plan.deletes.is_empty() {
            let keys: Vec<Column> = self
                .cache
                .shape(stx, table, &[])
                .await?
                .columns
                .iter()
                .filter(|c| c.in_primary_key)
                .cloned()
                .collect();
            statements.push(SetStatement {
                sql: SetSql::Prepared(
                    self.cache
                        .statement(stx, table, &sql::set_wise_delete(&t, &keys))
                        .await?,
                ),
                arrays: column_arrays(&plan.deletes, &specs(&keys)).map_err(corrupt)?,
                rows: plan.deletes.len(),
                op: SetOp::Deletes,
                table: table.clone(),
            });
        }
        for (groups, op) in [
            (&plan.updates, SetOp::Updates),
            (&plan.inserts, SetOp::Inserts),
        ] {
            for group in groups {
                let columns = self.cache.set_columns(stx, table, group[0]).await?;
                let sql = if op == SetOp::Inserts
                    && group.len() >= COPY_IN_FROM_ROWS
                    && columns.iter().all(|c| c.form != ValueForm::Structured)
                {
                    SetSql::CopyIn(sql::set_wise_copy(&t, &columns))
                } else {
                    let text = if op == SetOp::Updates {
                        sql::set_wise_update(&t, &columns)
                    } else {
                        sql::set_wise_insert(&t, &columns)
                    };
                    SetSql::Prepared(self.cache.statement(stx, table, &text).await?)
                };
                statements.push(SetStatement {
                    sql,
                    arrays: column_arrays(group, &specs(&columns)).map_err(corrupt)?,
                    rows: group.len(),
                    op,
                    table: table.clone(),
                });
            }
        }
        Ok(statements)
    }

    /// Applies one row event (or a TRUNCATE) to `table`: replay's write path, which repair
    /// (`crate::compare`) writes its fixes through too. An update or delete must find
    /// exactly one row.
    pub(crate) async fn apply_event(
        &mut self,
        stx: &Transaction<'_>,
        table: &RelName,
        event: &TableEvent<'_>,
    ) -> Result<(), ReplicaError> {
        let t = table.quoted();
        let (text, params, expect_one): (String, Vec<&str>, bool) = match event.change {
            RowChange::Truncate => return truncate_tables(stx, &[table]).await,
            RowChange::Insert { row } => {
                let columns = self.cache.set_columns(stx, table, row).await?;
                (
                    sql::event_insert(&t, &columns, &event.json_nulls),
                    vec![row],
                    false,
                )
            }
            RowChange::Update { row, old_key } => {
                let columns = self.cache.set_columns(stx, table, row).await?;
                let keys = self.cache.key_columns(stx, table, old_key).await?;
                let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
                (
                    sql::event_update(&t, &columns, &keys, &event.json_nulls),
                    vec![row, old_key],
                    true,
                )
            }
            RowChange::Delete { old_key } => {
                let keys = self.cache.key_columns(stx, table, old_key).await?;
                let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
                (sql::event_delete(&t, &keys), vec![old_key], true)
            }
        };
        let statement = self.cache.statement(stx, table, &text).await?;
        let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = params
            .iter()
            .map(|p| p as &(dyn tokio_postgres::types::ToSql + Sync))
            .collect();
        let changed = stx.execute(&statement, &params).await.map_err(|error| {
            // a lost connection is no refusal (with_cause classifies it as lost)
            let what = if ferry_connect::is_connection_lost(&error) {
                "applying"
            } else {
                "the subscriber refused"
            };
            ReplicaError::with_cause(
                ErrorKind::RowRefused,
                format!(
                    "{what} {} of {table} with key {} (event {}, transaction {})",
                    event.change.describe(),
                    self.row_key(table, event),
                    event.id,
                    event.txid
                ),
                error,
            )
            .about(table)
        })?;
        if expect_one && changed != 1 {
            return Err(ReplicaError::row_refused(format!(
                "{} of {table} found {changed} rows with key {} on the subscriber, expected 1: the replica is out of step (`subscriber resync {table}` copies it again)",
                event.change.describe(),
                self.row_key(table, event)
            ))
            .about(table));
        }
        Ok(())
    }

    /// The primary key of the row `event` changes, as json (`{"id":5}`): the old key of an
    /// update or delete, the new row's key columns of an insert. For messages only.
    fn row_key(&self, table: &RelName, event: &TableEvent<'_>) -> String {
        let Some((json, whole)) = event.change.key_json() else {
            return "(the whole table)".to_string();
        };
        let Ok(row) = serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(json)
        else {
            return "(unknown)".to_string();
        };
        let keys = self
            .cache
            .cached_shape(table)
            .map(|s| s.primary_key())
            .unwrap_or_default();
        let key: serde_json::Map<String, serde_json::Value> = row
            .into_iter()
            .filter(|(name, _)| whole || keys.contains(&name.as_str()))
            .collect();
        serde_json::Value::Object(key).to_string()
    }
}

/// Empties `tables` together, as one TRUNCATE of the provider did. A table that a foreign key
/// of a table outside them refers to cannot be truncated (not even in replica mode): then
/// each is emptied with DELETE, which in replay's replica mode cascades to nothing.
async fn truncate_tables(stx: &Transaction<'_>, tables: &[&RelName]) -> Result<(), ReplicaError> {
    let names: Vec<String> = tables.iter().map(|t| t.quoted()).collect();
    let referenced: bool = stx
        .query_one(
            "select exists (select 1 from pg_constraint c
                             where c.contype = 'f' and c.confrelid = any ($1::text[]::regclass[])
                               and not c.conrelid = any ($1::text[]::regclass[]))",
            &[&names],
        )
        .await
        .context("looking for foreign keys referring to truncated tables")?
        .get(0);
    let text = if referenced {
        names
            .iter()
            .map(|t| format!("delete from {t};"))
            .collect::<String>()
    } else {
        sql::truncate(&names)
    };
    stx.batch_execute(&text).await.map_err(|e| {
        ReplicaError::with_cause(
            ErrorKind::RowRefused,
            format!("the subscriber refused to truncate {}", names.join(", ")),
            e,
        )
        .about(tables[0])
    })
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

/// The row change `event` is, if it is one.
fn table_event<'e, 'a>(event: Option<&'e QueueEvent<'a>>) -> Option<&'e TableEvent<'a>> {
    match event {
        Some(QueueEvent::Table(event)) => Some(event),
        _ => None,
    }
}
