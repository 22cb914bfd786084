//! Rows reduced to (primary key, hash of the values), read from both sides in one order and
//! merged: which rows are missing, extra or different, per side a count and a checksum, and
//! the key ranges holding the differences. Memory stays bounded whatever the table's size: the
//! rows stream through a portal a page at a time, and only a bounded number of ranges is kept.
//!
//! Both sides must produce the same order and the same hashes whatever their versions,
//! collations and settings: integer keys (of an integer type on both sides) are ordered by
//! value, through the primary key's index; any other key by its text, byte-wise (`COLLATE
//! "C"`, which is also how Rust orders strings). A row's hash is the md5 of its replicated
//! columns' text, written under the replication session's pinned settings (dates, floats,
//! bytea).

use std::cmp::Ordering;

use serde::Serialize;
use tokio_postgres::{Portal, Row, Transaction};

use crate::catalog::Column;
use crate::error::{ReplicaError, ResultExt};
use crate::names::{quote_ident, RelName};

/// Rows fetched from a portal at a time.
const PAGE_ROWS: i32 = 10_000;
/// Keys (of both sides merged) in one key range of the report.
pub const RANGE_KEYS: u64 = 10_000;
/// Differing key ranges a report lists per table; the rest are counted.
pub const MAX_RANGES: usize = 50;

/// How one key column is ordered, the same way on both sides and in the merge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KeyOrder {
    /// By value: a column of an integer type on both sides.
    Integer,
    /// By its text, byte-wise.
    Text,
}

impl KeyOrder {
    /// The order for a key column of type `provider` on the provider and `subscriber` on
    /// the subscriber (catalog names, as [`Column::cast_type`]).
    pub(crate) fn of(provider: &str, subscriber: &str) -> KeyOrder {
        let integer =
            |t: &str| matches!(t, "pg_catalog.int2" | "pg_catalog.int4" | "pg_catalog.int8");
        if integer(provider) && integer(subscriber) {
            KeyOrder::Integer
        } else {
            KeyOrder::Text
        }
    }
}

/// A key column and its order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct KeyColumn {
    pub name: String,
    pub order: KeyOrder,
}

/// The statement reading `table`'s digest: each row's key columns as text, then the md5 of
/// its `columns` (provider order), ordered by the keys (see [`KeyOrder`]).
pub(crate) fn digest_sql(table: &RelName, keys: &[KeyColumn], columns: &[Column]) -> String {
    let key_text: Vec<String> = keys
        .iter()
        .map(|k| format!("t.{}::text", quote_ident(&k.name)))
        .collect();
    let values: Vec<String> = columns
        .iter()
        .map(|c| format!("t.{}", quote_ident(&c.name)))
        .collect();
    let order: Vec<String> = keys
        .iter()
        .map(|k| match k.order {
            KeyOrder::Integer => format!("t.{}", quote_ident(&k.name)),
            KeyOrder::Text => format!("t.{}::text collate \"C\"", quote_ident(&k.name)),
        })
        .collect();
    format!(
        "select {keys}, md5(row({values})::text) from {table} t order by {order}",
        keys = key_text.join(", "),
        values = values.join(", "),
        table = table.quoted(),
        order = order.join(", ")
    )
}

/// One row of a digest: its key columns' text and the hash of its values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DigestRow {
    pub key: Vec<String>,
    pub hash: String,
}

impl DigestRow {
    fn from_row(row: &Row, keys: usize) -> DigestRow {
        DigestRow {
            key: (0..keys).map(|i| row.get::<_, String>(i)).collect(),
            hash: row.get(keys),
        }
    }
}

/// A digest read a page at a time through a portal of an open transaction.
pub(crate) struct DigestReader<'t> {
    tx: &'t Transaction<'t>,
    portal: Portal,
    keys: usize,
    page: std::vec::IntoIter<Row>,
    done: bool,
    side: &'static str,
}

impl<'t> DigestReader<'t> {
    /// Opens the digest of `table` in `tx` (`side` names it in messages).
    pub(crate) async fn open(
        tx: &'t Transaction<'t>,
        side: &'static str,
        table: &RelName,
        keys: &[KeyColumn],
        columns: &[Column],
    ) -> Result<DigestReader<'t>, ReplicaError> {
        let sql = digest_sql(table, keys, columns);
        let portal = tx
            .bind(sql.as_str(), &[])
            .await
            .with_context(|| format!("reading {table} on the {side}"))?;
        Ok(DigestReader {
            tx,
            portal,
            keys: keys.len(),
            page: Vec::new().into_iter(),
            done: false,
            side,
        })
    }

    /// The next row in key order; `None` at the end.
    pub(crate) async fn next(&mut self) -> Result<Option<DigestRow>, ReplicaError> {
        loop {
            if let Some(row) = self.page.next() {
                return Ok(Some(DigestRow::from_row(&row, self.keys)));
            }
            if self.done {
                return Ok(None);
            }
            let rows = self
                .tx
                .query_portal(&self.portal, PAGE_ROWS)
                .await
                .with_context(|| format!("reading rows on the {}", self.side))?;
            self.done = rows.len() < PAGE_ROWS as usize;
            self.page = rows.into_iter();
        }
    }
}

/// How a row differs between the sides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Difference {
    /// On the provider only.
    Missing,
    /// On the subscriber only.
    Extra,
    /// On both, with other values.
    Different,
}

impl Difference {
    /// `missing`, `extra`, `different`.
    pub fn name(self) -> &'static str {
        match self {
            Difference::Missing => "missing",
            Difference::Extra => "extra",
            Difference::Different => "different",
        }
    }
}

/// What the merge does with the two rows at the front of the sides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    /// Same key: take both (`Some` when their values differ).
    Both(Option<Difference>),
    /// The provider's key comes first: take it, it is missing on the subscriber.
    ProviderOnly,
    /// The subscriber's key comes first: take it, it is extra there.
    SubscriberOnly,
}

/// Orders two keys as the digests do.
fn compare_keys(orders: &[KeyOrder], a: &[String], b: &[String]) -> Ordering {
    for ((order, a), b) in orders.iter().zip(a).zip(b) {
        let by = match order {
            KeyOrder::Integer => match (a.parse::<i64>(), b.parse::<i64>()) {
                (Ok(a), Ok(b)) => a.cmp(&b),
                _ => a.cmp(b),
            },
            KeyOrder::Text => a.cmp(b),
        };
        if by != Ordering::Equal {
            return by;
        }
    }
    Ordering::Equal
}

/// The merge step for the rows at the front of each side (`None`: that side is done), keys
/// ordered by `orders`.
pub(crate) fn step(
    orders: &[KeyOrder],
    provider: Option<&DigestRow>,
    subscriber: Option<&DigestRow>,
) -> Option<Step> {
    match (provider, subscriber) {
        (None, None) => None,
        (Some(_), None) => Some(Step::ProviderOnly),
        (None, Some(_)) => Some(Step::SubscriberOnly),
        (Some(p), Some(s)) => Some(match compare_keys(orders, &p.key, &s.key) {
            Ordering::Less => Step::ProviderOnly,
            Ordering::Greater => Step::SubscriberOnly,
            Ordering::Equal if p.hash == s.hash => Step::Both(None),
            Ordering::Equal => Step::Both(Some(Difference::Different)),
        }),
    }
}

/// A range of keys (in the digest's order) holding differences.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeyRange {
    /// Its first key, `name=value` per key column.
    pub first: String,
    /// Its last key.
    pub last: String,
    /// Rows in it that differ.
    pub rows_differ: u64,
}

/// One side's count and checksum (the wrapping sum of the rows' hashes: order-independent).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct SideSum {
    pub rows: u64,
    pub sum: u64,
}

impl SideSum {
    pub(crate) fn add(&mut self, hash: &str) {
        self.rows += 1;
        let head = hash.get(..16).unwrap_or(hash);
        self.sum = self
            .sum
            .wrapping_add(u64::from_str_radix(head, 16).unwrap_or(0));
    }

    /// The checksum as 16 hex digits.
    pub(crate) fn checksum(&self) -> String {
        format!("{:016x}", self.sum)
    }
}

/// Cuts the merged key sequence into ranges of [`RANGE_KEYS`] and keeps those with
/// differences (at most [`MAX_RANGES`]; the rest are counted).
#[derive(Debug, Default)]
pub(crate) struct RangeTracker {
    names: Vec<String>,
    current: Option<KeyRange>,
    in_current: u64,
    pub ranges: Vec<KeyRange>,
    pub more_ranges: u64,
    pub rows_differ: u64,
}

impl RangeTracker {
    pub(crate) fn new(key_names: &[String]) -> RangeTracker {
        RangeTracker {
            names: key_names.to_vec(),
            ..RangeTracker::default()
        }
    }

    /// Counts the next key of the merge, and whether its row differs.
    pub(crate) fn key(&mut self, key: &[String], differs: bool) {
        if self.in_current == RANGE_KEYS {
            self.close();
        }
        let shown = self.show(key);
        let range = self.current.get_or_insert_with(|| KeyRange {
            first: shown.clone(),
            last: String::new(),
            rows_differ: 0,
        });
        range.last = shown;
        if differs {
            range.rows_differ += 1;
            self.rows_differ += 1;
        }
        self.in_current += 1;
    }

    /// Closes the last range.
    pub(crate) fn finish(&mut self) {
        self.close();
    }

    fn close(&mut self) {
        if let Some(range) = self.current.take() {
            if range.rows_differ > 0 {
                if self.ranges.len() < MAX_RANGES {
                    self.ranges.push(range);
                } else {
                    self.more_ranges += 1;
                }
            }
        }
        self.in_current = 0;
    }

    /// `name=value,...` for a key.
    pub(crate) fn show(&self, key: &[String]) -> String {
        show_key(&self.names, key)
    }
}

/// `name=value,...` for a key (names and values in key order).
pub(crate) fn show_key(names: &[String], key: &[String]) -> String {
    names
        .iter()
        .zip(key)
        .map(|(n, v)| format!("{n}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(key: &[&str], hash: &str) -> DigestRow {
        DigestRow {
            key: key.iter().map(|k| k.to_string()).collect(),
            hash: hash.to_string(),
        }
    }

    #[test]
    fn the_merge_orders_text_keys_byte_wise_as_collate_c_does() {
        let text = [KeyOrder::Text, KeyOrder::Text];
        // "B" < "a" byte-wise (C collation), unlike most linguistic collations
        let p = row(&["B"], "1");
        let s = row(&["a"], "1");
        assert_eq!(step(&text, Some(&p), Some(&s)), Some(Step::ProviderOnly));
        assert_eq!(step(&text, Some(&s), Some(&p)), Some(Step::SubscriberOnly));
        // a prefix comes first, and composite keys compare column by column
        assert_eq!(
            step(
                &text,
                Some(&row(&["ab", "9"], "1")),
                Some(&row(&["abc", "1"], "1"))
            ),
            Some(Step::ProviderOnly)
        );
        assert_eq!(
            step(
                &text,
                Some(&row(&["1", "2"], "x")),
                Some(&row(&["1", "2"], "y"))
            ),
            Some(Step::Both(Some(Difference::Different)))
        );
        assert_eq!(
            step(&text, Some(&row(&["1"], "x")), Some(&row(&["1"], "x"))),
            Some(Step::Both(None))
        );
        assert_eq!(step(&text, None, Some(&s)), Some(Step::SubscriberOnly));
        assert_eq!(step(&text, None, None), None);
    }

    #[test]
    fn integer_keys_order_by_value_on_both_sides_only() {
        let mixed = [KeyOrder::Integer, KeyOrder::Text];
        // 9 < 10 by value (by text "10" < "9"); negative numbers too
        assert_eq!(
            step(
                &mixed,
                Some(&row(&["9", "b"], "1")),
                Some(&row(&["10", "a"], "1"))
            ),
            Some(Step::ProviderOnly)
        );
        assert_eq!(
            step(
                &mixed,
                Some(&row(&["-1", "b"], "1")),
                Some(&row(&["-10", "a"], "1"))
            ),
            Some(Step::SubscriberOnly)
        );
        assert_eq!(
            KeyOrder::of("pg_catalog.int8", "pg_catalog.int4"),
            KeyOrder::Integer
        );
        assert_eq!(
            KeyOrder::of("pg_catalog.int4", "pg_catalog.text"),
            KeyOrder::Text
        );
        assert_eq!(
            KeyOrder::of("pg_catalog.numeric", "pg_catalog.numeric"),
            KeyOrder::Text
        );
    }

    #[test]
    fn ranges_hold_only_differences_and_stay_bounded() {
        let mut ranges = RangeTracker::new(&["id".to_string()]);
        let total = RANGE_KEYS * (MAX_RANGES as u64 + 3);
        for i in 0..total {
            // one difference in every range but the first
            ranges.key(&[i.to_string()], i >= RANGE_KEYS && i % RANGE_KEYS == 7);
        }
        ranges.finish();
        assert_eq!(ranges.rows_differ, MAX_RANGES as u64 + 2);
        assert_eq!(ranges.ranges.len(), MAX_RANGES);
        assert_eq!(ranges.more_ranges, 2);
        let first = &ranges.ranges[0];
        assert_eq!(first.first, format!("id={RANGE_KEYS}"));
        assert_eq!(first.last, format!("id={}", 2 * RANGE_KEYS - 1));
        assert_eq!(first.rows_differ, 1);
    }

    #[test]
    fn checksums_do_not_depend_on_row_order() {
        let (mut a, mut b) = (SideSum::default(), SideSum::default());
        let hashes = [
            "ffffffffffffffff0",
            "0123456789abcdef1",
            "8000000000000000aa",
        ];
        for h in hashes {
            a.add(h);
        }
        for h in hashes.iter().rev() {
            b.add(h);
        }
        assert_eq!(a, b);
        assert_eq!(a.rows, 3);
        assert_ne!(a.checksum(), SideSum::default().checksum());
    }

    #[test]
    fn the_digest_orders_integer_keys_by_value_others_by_text_and_quotes_names() {
        let column = |name: &str| Column {
            name: name.to_string(),
            type_name: "text".into(),
            cast_type: "pg_catalog.text".into(),
            form: crate::columns::ValueForm::Text,
            generated: false,
            in_primary_key: false,
            not_null: false,
            default: None,
            identity: false,
        };
        let key = |name: &str, order| KeyColumn {
            name: name.to_string(),
            order,
        };
        let sql = digest_sql(
            &RelName::new("s", "T"),
            &[key("id", KeyOrder::Integer), key("Part", KeyOrder::Text)],
            &[column("id"), column("Part"), column("v")],
        );
        assert_eq!(
            sql,
            r#"select t."id"::text, t."Part"::text, md5(row(t."id", t."Part", t."v")::text) from "s"."T" t order by t."id", t."Part"::text collate "C""#
        );
    }
}
