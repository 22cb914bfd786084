//! What replay keeps between batches: prepared statements (they live as long as the
//! subscriber session) and subscriber table shapes (read again when an event names a column
//! the cached shape lacks).

use std::collections::{BTreeMap, HashMap};

use serde::de::IgnoredAny;
use tokio_postgres::{Statement, Transaction};

use crate::catalog::{table_shape, Column, TableShape};
use crate::error::{ReplicaError, ResultExt};
use crate::names::{quote_ident, RelName};

/// Prepared statements and table shapes of one subscriber session.
#[derive(Default)]
pub(crate) struct TableCache {
    statements: HashMap<String, Statement>,
    shapes: HashMap<RelName, TableShape>,
}

impl TableCache {
    /// Forgets everything (after an error, a table may have changed; after a reconnect,
    /// statements die with their session).
    pub(crate) fn clear(&mut self) {
        self.statements.clear();
        self.shapes.clear();
    }

    /// Forgets the table shapes only.
    pub(crate) fn forget_shapes(&mut self) {
        self.shapes.clear();
    }

    /// The prepared statement for `sql`, prepared once per session.
    pub(crate) async fn statement(
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

    /// The subscriber table's shape, read again when `needed` names a column the cached one
    /// lacks; an error names a column that is really missing.
    pub(crate) async fn shape(
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
                ReplicaError::schema_mismatch(format!(
                    "table {table} does not exist on the subscriber any more"
                ))
                .about(table)
            })?;
            if let Some(missing) = needed.iter().find(|n| shape.column(n).is_none()) {
                return Err(ReplicaError::schema_mismatch(format!(
                    "column {} of table {table} is missing on the subscriber: add it there; replay retries this batch",
                    quote_ident(missing)
                ))
                .about(table));
            }
            self.shapes.insert(table.clone(), shape);
        }
        Ok(self.shapes.get(table).expect("inserted above"))
    }

    /// The cached shape of `table`, if read already (for messages).
    pub(crate) fn cached_shape(&self, table: &RelName) -> Option<&TableShape> {
        self.shapes.get(table)
    }

    /// The subscriber's columns that `row` (a row as json) sets, in the row's order: all but
    /// those the subscriber computes. A column the subscriber lacks stops replay, naming it.
    pub(crate) async fn set_columns(
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

    /// The key columns of `key` (a primary key as json), checked to exist here.
    pub(crate) async fn key_columns(
        &mut self,
        stx: &Transaction<'_>,
        table: &RelName,
        key: &str,
    ) -> Result<Vec<String>, ReplicaError> {
        let names = json_keys(table, key)?;
        self.shape(stx, table, &names).await?;
        Ok(names)
    }
}

/// The top-level keys of a json object, sorted. Events are written by ferry: json that does
/// not parse is corrupt.
fn json_keys(table: &RelName, data: &str) -> Result<Vec<String>, ReplicaError> {
    let map: BTreeMap<String, IgnoredAny> = serde_json::from_str(data).map_err(|e| {
        ReplicaError::corrupt(format!("an event of {table} carries malformed data: {e}"))
    })?;
    Ok(map.into_keys().collect())
}
