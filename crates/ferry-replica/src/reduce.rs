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
use std::collections::HashMap;

use serde_json::value::RawValue;

use crate::event::RowChange as Change;

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
    /// Its final row and that row's column signature, `None` when it ends deleted.
    row: Option<(&'a str, u64)>,
}

/// The statements a table's page reduces to, in the order they must run.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan<'a> {
    /// Primary keys (json objects) to delete; each must exist.
    pub deletes: Vec<&'a str>,
    /// Final rows of keys that existed and still do, in groups with the same columns; each
    /// must exist.
    pub updates: Vec<Vec<&'a str>>,
    /// Rows to insert (after the deletes), in groups with the same columns.
    pub inserts: Vec<Vec<&'a str>>,
}

/// The gathered changes of one table.
#[derive(Debug)]
pub struct TableChanges<'a> {
    primary_key: Vec<String>,
    /// where each key's net change is in `nets`
    index: HashMap<String, usize>,
    /// in the order keys were first seen, so statements come out the same every time
    nets: Vec<Net<'a>>,
}

impl<'a> TableChanges<'a> {
    /// Changes of a table whose primary key is `primary_key` (column names).
    pub fn new(primary_key: Vec<String>) -> Self {
        TableChanges {
            primary_key,
            index: HashMap::new(),
            nets: Vec::new(),
        }
    }

    /// No change gathered.
    pub fn is_empty(&self) -> bool {
        self.nets.is_empty()
    }

    /// Folds one row change in. An error means the json lacks a primary-key column or is
    /// malformed, or the change is a truncate (never reduced: the caller applies it in event
    /// order).
    pub fn push(&mut self, change: Change<'a>) -> Result<Pushed, String> {
        let (key_text, key_json, row) = match change {
            Change::Insert { row } => {
                let (key, columns) = self.scan(row)?;
                (key, row, Some((row, columns)))
            }
            Change::Update { row, old_key } => {
                let (old, _) = self.scan(old_key)?;
                let (new, columns) = self.scan(row)?;
                if old != new {
                    return Ok(Pushed::KeyMoved);
                }
                (old, old_key, Some((row, columns)))
            }
            Change::Delete { old_key } => (self.scan(old_key)?.0, old_key, None),
            Change::Truncate => return Err("a truncate is not reduced".into()),
        };
        match self.index.get(&key_text) {
            Some(&at) => {
                let net = &mut self.nets[at];
                net.deleted |= row.is_none();
                net.row = row;
            }
            None => {
                self.index.insert(key_text, self.nets.len());
                self.nets.push(Net {
                    existed: !matches!(change, Change::Insert { .. }),
                    deleted: row.is_none(),
                    key: key_json,
                    row,
                });
            }
        }
        Ok(Pushed::Reduced)
    }

    /// The statements the gathered changes come to; the table starts empty again.
    pub fn take_plan(&mut self) -> Plan<'a> {
        let mut plan = Plan::default();
        let mut updates = Groups::default();
        let mut inserts = Groups::default();
        self.index.clear();
        for net in self.nets.drain(..) {
            match (net.existed, net.deleted, net.row) {
                (false, _, Some(row)) => inserts.add(row),
                (false, _, None) => {}
                (true, false, Some(row)) => updates.add(row),
                (true, _, None) => plan.deletes.push(net.key),
                (true, true, Some(row)) => {
                    plan.deletes.push(net.key);
                    inserts.add(row);
                }
            }
        }
        plan.updates = updates.0.into_iter().map(|(_, g)| g).collect();
        plan.inserts = inserts.0.into_iter().map(|(_, g)| g).collect();
        plan
    }

    /// Reads a json row or key once: its primary-key values as one comparable text (the
    /// values' json texts, which PostgreSQL renders the same way for the same stored value)
    /// and a signature of its column names in order.
    fn scan(&self, json: &str) -> Result<(String, u64), String> {
        let mut seed = RowScan {
            primary_key: &self.primary_key,
            values: vec![None; self.primary_key.len()],
            signature: FNV_OFFSET,
        };
        serde::de::DeserializeSeed::deserialize(
            &mut seed,
            &mut serde_json::Deserializer::from_str(json),
        )
        .map_err(|e| format!("malformed event data: {e}"))?;
        let mut key = String::new();
        for (column, value) in self.primary_key.iter().zip(&seed.values) {
            let value = value
                .ok_or_else(|| format!("primary-key column {column:?} missing from an event"))?;
            key.push_str(value);
            key.push('\u{0}');
        }
        Ok((key, seed.signature))
    }
}

/// Rows grouped by column signature, groups in first-seen order (few groups: a linear search).
#[derive(Default)]
struct Groups<'a>(Vec<(u64, Vec<&'a str>)>);

impl<'a> Groups<'a> {
    fn add(&mut self, (row, signature): (&'a str, u64)) {
        match self.0.iter_mut().find(|(s, _)| *s == signature) {
            Some((_, group)) => group.push(row),
            None => self.0.push((signature, vec![row])),
        }
    }
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// One pass over a json object: the primary-key values (borrowed) and an FNV-1a hash of the
/// column names in order (64 bits over the few column sets one table's events carry: a
/// collision is not a practical concern, and spares an allocation per row).
struct RowScan<'k, 'a> {
    primary_key: &'k [String],
    values: Vec<Option<&'a str>>,
    signature: u64,
}

impl<'de> serde::de::DeserializeSeed<'de> for &mut RowScan<'_, 'de> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> serde::de::Visitor<'de> for &mut RowScan<'_, 'de> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a json object")
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(name) = map.next_key::<Cow<'de, str>>()? {
            for byte in name.bytes().chain([0]) {
                self.signature = (self.signature ^ u64::from(byte)).wrapping_mul(FNV_PRIME);
            }
            match self.primary_key.iter().position(|c| *c == name) {
                Some(at) => self.values[at] = Some(map.next_value::<&'de RawValue>()?.get()),
                None => {
                    map.next_value::<serde::de::IgnoredAny>()?;
                }
            }
        }
        Ok(())
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
        let key = |json| t.scan(json).map(|(key, _)| key);
        assert_eq!(key(r#"{"id" : 1}"#), key(r#"{"x":2,"id":1}"#));
        assert_ne!(key(r#"{"id":1}"#), key(r#"{"id":"1"}"#));
        assert!(key(r#"{"x":1}"#).is_err());
        assert!(key("not json").is_err());
    }

    #[test]
    fn signatures_follow_the_columns() {
        let t = table();
        let columns = |json| t.scan(json).unwrap().1;
        assert_eq!(
            columns(r#"{"id":1,"b":{"c":2}}"#),
            columns(r#"{"id" : 7, "b" : null}"#)
        );
        assert_ne!(columns(r#"{"id":1}"#), columns(r#"{"id":1,"b":2}"#));
        assert_ne!(columns(r#"{"id":1,"b":2}"#), columns(r#"{"b":2,"id":1}"#));
    }

    #[test]
    fn rows_with_other_columns_go_to_their_own_group() {
        let mut t = table();
        for row in [r#"{"id":1}"#, r#"{"id":2,"v":1}"#, r#"{"id":3}"#] {
            t.push(Change::Insert { row }).unwrap();
        }
        let plan = t.take_plan();
        assert_eq!(
            plan.inserts,
            vec![
                vec![r#"{"id":1}"#, r#"{"id":3}"#],
                vec![r#"{"id":2,"v":1}"#]
            ]
        );
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
                updates: vec![vec![r#"{"id":2,"v":"d"}"#]],
                inserts: vec![vec![r#"{"id":1,"v":"b"}"#, r#"{"id":5,"v":"f"}"#]],
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
}
