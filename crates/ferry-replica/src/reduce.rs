//! Set-wise apply: the row changes of one table within a page of events, reduced to each
//! row's net change, so that the page costs three statements per table (delete, update,
//! insert) instead of one per event.
//!
//! The reduction is exact for a table that nothing else depends on (no foreign key from or to
//! it, no unique or exclusion constraint but the primary key, no user trigger or rule): its
//! final state after the page is fixed by the last change of each primary key, and whether the
//! row existed before the page by the first. A change that moves a primary key is not
//! reduced: the caller applies what was gathered so far, then that change on its own.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};

use serde_json::value::RawValue;

/// A row change, as events carry it (json text borrowed from the event).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change<'a> {
    /// `I`: the new row.
    Insert { row: &'a str },
    /// `U`: the new row and the old primary key.
    Update { row: &'a str, old_key: &'a str },
    /// `D`: the old primary key.
    Delete { old_key: &'a str },
}

/// What [`TableChanges::push`] did with a change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// Folded into the table's net changes.
    Reduced,
    /// An update that changes the primary key: not taken; apply the gathered changes, then
    /// this one alone, in event order.
    KeyMoved,
}

/// The net change of one primary key over the page.
#[derive(Debug)]
struct Net<'a> {
    /// The row existed before the page (its first change was an update or a delete).
    existed: bool,
    /// It was deleted at some point in the page.
    deleted: bool,
    /// A json object holding its primary key (for deletes).
    key: &'a str,
    /// Its final row, `None` when it ends deleted.
    row: Option<&'a str>,
}

/// The statements a table's page reduces to, in the order they must run.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan<'a> {
    /// Primary keys (json objects) to delete; each must exist.
    pub deletes: Vec<&'a str>,
    /// Final rows of keys that existed and still do; each must exist.
    pub updates: Vec<&'a str>,
    /// Rows to insert (after the deletes).
    pub inserts: Vec<&'a str>,
}

/// The gathered changes of one table.
#[derive(Debug)]
pub struct TableChanges<'a> {
    primary_key: Vec<String>,
    nets: HashMap<String, Net<'a>>,
    /// keys in the order first seen, so statements are built the same way every time
    order: Vec<String>,
}

impl<'a> TableChanges<'a> {
    /// Changes of a table whose primary key is `primary_key` (column names).
    pub fn new(primary_key: Vec<String>) -> Self {
        TableChanges {
            primary_key,
            nets: HashMap::new(),
            order: Vec::new(),
        }
    }

    /// No change gathered.
    pub fn is_empty(&self) -> bool {
        self.nets.is_empty()
    }

    /// Folds one change in. An error means the json lacks a primary-key column or is
    /// malformed.
    pub fn push(&mut self, change: Change<'a>) -> Result<Pushed, String> {
        let (key_text, key_json, row) = match change {
            Change::Insert { row } => (self.key_of(row)?, row, Some(row)),
            Change::Update { row, old_key } => {
                let old = self.key_of(old_key)?;
                if old != self.key_of(row)? {
                    return Ok(Pushed::KeyMoved);
                }
                (old, old_key, Some(row))
            }
            Change::Delete { old_key } => (self.key_of(old_key)?, old_key, None),
        };
        match self.nets.get_mut(&key_text) {
            Some(net) => {
                net.deleted |= row.is_none();
                net.row = row;
            }
            None => {
                let existed = !matches!(change, Change::Insert { .. });
                self.order.push(key_text.clone());
                self.nets.insert(
                    key_text,
                    Net {
                        existed,
                        deleted: row.is_none(),
                        key: key_json,
                        row,
                    },
                );
            }
        }
        Ok(Pushed::Reduced)
    }

    /// The statements the gathered changes come to; the table starts empty again.
    pub fn take_plan(&mut self) -> Plan<'a> {
        let mut plan = Plan::default();
        for key in self.order.drain(..) {
            let net = self
                .nets
                .remove(&key)
                .expect("every ordered key has its net");
            match (net.existed, net.deleted, net.row) {
                (false, _, Some(row)) => plan.inserts.push(row),
                (false, _, None) => {}
                (true, false, Some(row)) => plan.updates.push(row),
                (true, _, None) => plan.deletes.push(net.key),
                (true, true, Some(row)) => {
                    plan.deletes.push(net.key);
                    plan.inserts.push(row);
                }
            }
        }
        plan
    }

    /// The primary-key values of a json row or key, as one comparable text: the values'
    /// json texts, which PostgreSQL renders the same way for the same stored value.
    fn key_of(&self, json: &str) -> Result<String, String> {
        let object: BTreeMap<Cow<'_, str>, &RawValue> =
            serde_json::from_str(json).map_err(|e| format!("malformed event data: {e}"))?;
        let mut key = String::new();
        for column in &self.primary_key {
            let value = object
                .get(column.as_str())
                .ok_or_else(|| format!("primary-key column {column:?} missing from an event"))?;
            key.push_str(value.get());
            key.push('\u{0}');
        }
        Ok(key)
    }
}

/// The top-level keys of a json object, in the object's order, joined by NUL: rows with the
/// same signature can share one statement.
pub fn column_signature(json: &str) -> Result<String, String> {
    let keys: OrderedKeys =
        serde_json::from_str(json).map_err(|e| format!("malformed event data: {e}"))?;
    Ok(keys.0.join("\u{0}"))
}

/// The keys of a json object, in order.
struct OrderedKeys(Vec<String>);

impl<'de> serde::Deserialize<'de> for OrderedKeys {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Keys;
        impl<'de> serde::de::Visitor<'de> for Keys {
            type Value = OrderedKeys;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a json object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<OrderedKeys, A::Error> {
                let mut keys = Vec::new();
                while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                    map.next_value::<serde::de::IgnoredAny>()?;
                    keys.push(key.into_owned());
                }
                Ok(OrderedKeys(keys))
            }
        }
        deserializer.deserialize_map(Keys)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> TableChanges<'static> {
        TableChanges::new(vec!["id".into()])
    }

    #[test]
    fn key_text_ignores_spacing_and_other_columns() {
        let t = table();
        assert_eq!(t.key_of(r#"{"id" : 1}"#), t.key_of(r#"{"x":2,"id":1}"#));
        assert_ne!(t.key_of(r#"{"id":1}"#), t.key_of(r#"{"id":"1"}"#));
        assert!(t.key_of(r#"{"x":1}"#).is_err());
        assert!(t.key_of("not json").is_err());
    }

    #[test]
    fn each_key_comes_to_its_net_change() {
        let mut t = table();
        let changes = [
            Change::Insert {
                row: r#"{"id":1,"v":"a"}"#,
            }, // new, then updated: insert final
            Change::Update {
                row: r#"{"id":1,"v":"b"}"#,
                old_key: r#"{"id" : 1}"#,
            },
            Change::Update {
                row: r#"{"id":2,"v":"c"}"#,
                old_key: r#"{"id" : 2}"#,
            }, // update
            Change::Update {
                row: r#"{"id":2,"v":"d"}"#,
                old_key: r#"{"id" : 2}"#,
            },
            Change::Delete {
                old_key: r#"{"id" : 3}"#,
            }, // delete
            Change::Insert {
                row: r#"{"id":4,"v":"e"}"#,
            }, // nothing
            Change::Delete {
                old_key: r#"{"id" : 4}"#,
            },
            Change::Delete {
                old_key: r#"{"id" : 5}"#,
            }, // delete + insert
            Change::Insert {
                row: r#"{"id":5,"v":"f"}"#,
            },
            Change::Update {
                row: r#"{"id":6,"v":"g"}"#,
                old_key: r#"{"id" : 6}"#,
            }, // delete
            Change::Delete {
                old_key: r#"{"id" : 6}"#,
            },
        ];
        for c in changes {
            assert_eq!(t.push(c), Ok(Pushed::Reduced));
        }
        let plan = t.take_plan();
        assert_eq!(
            plan,
            Plan {
                deletes: vec![r#"{"id" : 3}"#, r#"{"id" : 5}"#, r#"{"id" : 6}"#],
                updates: vec![r#"{"id":2,"v":"d"}"#],
                inserts: vec![r#"{"id":1,"v":"b"}"#, r#"{"id":5,"v":"f"}"#],
            }
        );
        assert!(t.is_empty());
    }

    #[test]
    fn a_moved_key_is_not_reduced() {
        let mut t = table();
        let moved = Change::Update {
            row: r#"{"id":2,"v":"a"}"#,
            old_key: r#"{"id" : 1}"#,
        };
        assert_eq!(t.push(moved), Ok(Pushed::KeyMoved));
        assert!(t.is_empty());
    }

    #[test]
    fn signatures_follow_the_object() {
        assert_eq!(
            column_signature(r#"{"a":1,"b":{"c":2}}"#).unwrap(),
            "a\u{0}b"
        );
        assert_ne!(
            column_signature(r#"{"a":1}"#).unwrap(),
            column_signature(r#"{"a":1,"b":2}"#).unwrap()
        );
    }
}
