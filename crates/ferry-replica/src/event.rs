//! Queue events decoded, once, into typed row changes: the queue boundary of replay.
//!
//! The format is the one the provider's capture functions write (`sql/provider/functions.sql`,
//! "Row capture", and `ferry.capture_truncate`); change both together:
//!
//! | `ev_type` | `ev_data`                 | `ev_extra1`       | `ev_extra2`               |
//! |-----------|---------------------------|-------------------|---------------------------|
//! | `I`       | the new row as json       | `"schema"."name"` | -                         |
//! | `U`       | the new row as json       | `"schema"."name"` | the old primary key, json |
//! | `D`       | the old primary key, json | `"schema"."name"` | -                         |
//! | `T`       | -                         | `"schema"."name"` | -                         |
//!
//!
//! `EXECUTE` events (`ferry CONFIG execute`, see `"ferry"."provider_execute_start"`) carry SQL
//! to run at their place in the stream: `ev_data` the SQL, `ev_extra1` the file name,
//! `ev_extra2` the md5 of the SQL.
//!
//! For `I` and `U`, `ev_extra3` names the json and jsonb columns that hold the JSON value
//! `null` (a json array, `["doc"]`): the row's json renders that as it renders SQL NULL.
//! Anything else is corrupt: ferry wrote it, so no user action can fix it.

use ferry_queue::Event;

use crate::error::ReplicaError;

/// A row change, its json borrowed from the event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowChange<'a> {
    /// `I`: the new row.
    Insert {
        /// The new row, a json object of every column.
        row: &'a str,
    },
    /// `U`: the new row and the old primary key.
    Update {
        /// The new row, a json object of every column.
        row: &'a str,
        /// The primary key before the update, a json object.
        old_key: &'a str,
    },
    /// `D`: the old primary key.
    Delete {
        /// The primary key of the deleted row, a json object.
        old_key: &'a str,
    },
    /// `T`: the table was truncated.
    Truncate,
}

impl RowChange<'_> {
    /// "an insert", "an update", ...: for messages.
    pub fn describe(&self) -> &'static str {
        match self {
            RowChange::Insert { .. } => "an insert",
            RowChange::Update { .. } => "an update",
            RowChange::Delete { .. } => "a delete",
            RowChange::Truncate => "a truncate",
        }
    }

    /// The json naming the changed row for messages: the old key of an update or delete,
    /// the new row of an insert (`None` for a truncate).
    pub fn key_json(&self) -> Option<(&str, bool)> {
        match self {
            RowChange::Insert { row } => Some((row, false)),
            RowChange::Update { old_key, .. } | RowChange::Delete { old_key } => {
                Some((old_key, true))
            }
            RowChange::Truncate => None,
        }
    }
}

/// A queue event, decoded: a table's row change, or SQL to run at its place in the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueueEvent<'a> {
    /// A change of a replicated table.
    Table(TableEvent<'a>),
    /// A file of SQL run through the queue.
    Execute(ExecuteEvent<'a>),
}

impl<'a> QueueEvent<'a> {
    /// Decodes `event`; an event not of the formats above is corrupt.
    pub fn decode(event: &'a Event) -> Result<QueueEvent<'a>, ReplicaError> {
        if event.ev_type.as_deref() == Some(EXECUTE) {
            let corrupt = |what: &str| {
                ReplicaError::corrupt(format!(
                    "execute event {} (transaction {}) {what}",
                    event.id, event.txid
                ))
            };
            return Ok(QueueEvent::Execute(ExecuteEvent {
                id: event.id,
                txid: event.txid,
                sql: event.data.as_deref().ok_or_else(|| corrupt("has no SQL"))?,
                file: event.extra[0]
                    .as_deref()
                    .ok_or_else(|| corrupt("names no file"))?,
                hash: event.extra[1]
                    .as_deref()
                    .ok_or_else(|| corrupt("has no hash"))?,
            }));
        }
        TableEvent::decode(event).map(QueueEvent::Table)
    }
}

/// The `ev_type` of SQL run through the queue.
pub const EXECUTE: &str = "EXECUTE";

/// SQL run through the queue (`ferry CONFIG execute FILE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExecuteEvent<'a> {
    /// The event's id in its queue.
    pub id: i64,
    /// The transaction that ran it on the provider.
    pub txid: i64,
    /// The SQL.
    pub sql: &'a str,
    /// The file's name: each runs once per node.
    pub file: &'a str,
    /// md5 of the SQL, as the provider recorded it.
    pub hash: &'a str,
}

/// One event of a replicated table, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableEvent<'a> {
    /// The event's id in its queue.
    pub id: i64,
    /// The writing transaction.
    pub txid: i64,
    /// The table as `"schema"."name"`, both parts quoted.
    pub table: &'a str,
    /// What happened to it.
    pub change: RowChange<'a>,
    /// The columns of the row holding the JSON value `null` (not SQL NULL), for inserts and
    /// updates that have any.
    pub json_nulls: Vec<String>,
}

impl<'a> TableEvent<'a> {
    /// Decodes `event`; an event not of the format above is corrupt.
    pub fn decode(event: &'a Event) -> Result<TableEvent<'a>, ReplicaError> {
        let corrupt = |what: &str| {
            ReplicaError::corrupt(format!(
                "event {} (transaction {}) {what}",
                event.id, event.txid
            ))
        };
        let table = event.extra[0]
            .as_deref()
            .ok_or_else(|| corrupt("names no table"))?;
        let data = || event.data.as_deref().ok_or_else(|| corrupt("has no data"));
        let change = match event.ev_type.as_deref() {
            Some("I") => RowChange::Insert { row: data()? },
            Some("U") => RowChange::Update {
                row: data()?,
                old_key: event.extra[1]
                    .as_deref()
                    .ok_or_else(|| corrupt("is an update without its old key"))?,
            },
            Some("D") => RowChange::Delete { old_key: data()? },
            Some("T") => RowChange::Truncate,
            other => return Err(corrupt(&format!("has unknown type {other:?}"))),
        };
        let json_nulls = match (&change, event.extra[2].as_deref()) {
            (RowChange::Insert { .. } | RowChange::Update { .. }, Some(names)) => {
                serde_json::from_str(names)
                    .map_err(|e| corrupt(&format!("names its JSON nulls as {names:?}: {e}")))?
            }
            _ => Vec::new(),
        };
        Ok(TableEvent {
            id: event.id,
            txid: event.txid,
            table,
            change,
            json_nulls,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;
    use crate::error::ErrorKind;

    fn event(ev_type: &str, data: Option<&str>, extra2: Option<&str>) -> Event {
        event_with_nulls(ev_type, data, extra2, None)
    }

    fn event_with_nulls(
        ev_type: &str,
        data: Option<&str>,
        extra2: Option<&str>,
        extra3: Option<&str>,
    ) -> Event {
        Event {
            id: 7,
            time: SystemTime::UNIX_EPOCH,
            txid: 99,
            retry: None,
            ev_type: Some(ev_type.to_string()),
            data: data.map(str::to_string),
            extra: [
                Some(r#""public"."t""#.to_string()),
                extra2.map(str::to_string),
                extra3.map(str::to_string),
                None,
            ],
        }
    }

    #[test]
    fn every_event_type_decodes() {
        let row = r#"{"id":1,"v":"a"}"#;
        let key = r#"{"id":1}"#;
        let cases = [
            (event("I", Some(row), None), RowChange::Insert { row }),
            (
                event("U", Some(row), Some(key)),
                RowChange::Update { row, old_key: key },
            ),
            (
                event("D", Some(key), Some(key)),
                RowChange::Delete { old_key: key },
            ),
            (event("T", None, None), RowChange::Truncate),
        ];
        for (event, change) in &cases {
            let decoded = TableEvent::decode(event).unwrap();
            assert_eq!(decoded.change, *change);
            assert_eq!(decoded.table, r#""public"."t""#);
            assert_eq!((decoded.id, decoded.txid), (7, 99));
        }
    }

    #[test]
    fn json_nulls_are_named_in_extra3() {
        let row = r#"{"id":1,"doc":null,"other":null}"#;
        let insert = event_with_nulls("I", Some(row), None, Some(r#"["doc"]"#));
        assert_eq!(TableEvent::decode(&insert).unwrap().json_nulls, ["doc"]);
        let plain = event("U", Some(row), Some(r#"{"id":1}"#));
        assert!(TableEvent::decode(&plain).unwrap().json_nulls.is_empty());
        let bad = event_with_nulls("I", Some(row), None, Some("doc"));
        assert_eq!(
            TableEvent::decode(&bad).unwrap_err().kind(),
            ErrorKind::Corrupt
        );
    }

    #[test]
    fn execute_events_decode_apart_from_row_changes() {
        let mut execute = event("EXECUTE", Some("alter table t add c int"), Some("abc"));
        execute.extra[0] = Some("add_c.sql".into());
        let QueueEvent::Execute(decoded) = QueueEvent::decode(&execute).unwrap() else {
            panic!("not an execute");
        };
        assert_eq!(
            (decoded.file, decoded.sql, decoded.hash),
            ("add_c.sql", "alter table t add c int", "abc")
        );
        execute.data = None;
        assert_eq!(
            QueueEvent::decode(&execute).unwrap_err().kind(),
            ErrorKind::Corrupt
        );
        let row = event("I", Some("{}"), None);
        assert!(matches!(
            QueueEvent::decode(&row).unwrap(),
            QueueEvent::Table(_)
        ));
    }

    #[test]
    fn a_malformed_event_is_corrupt() {
        let mut no_table = event("I", Some("{}"), None);
        no_table.extra[0] = None;
        for bad in [
            event("X", Some("{}"), None),
            event("I", None, None),
            event("U", Some("{}"), None),
            event("D", None, None),
            no_table,
        ] {
            let error = TableEvent::decode(&bad).unwrap_err();
            assert_eq!(error.kind(), ErrorKind::Corrupt, "{error}");
            assert!(error.to_string().starts_with("event 7 (transaction 99)"));
        }
    }
}
