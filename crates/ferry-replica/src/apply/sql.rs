//! The statements replay runs on the subscriber, built from a table's name and columns alone:
//! no database needed, so every shape is unit-tested here.
//!
//! Set-wise statements read their rows from text arrays (one per column, see
//! [`crate::columns::column_arrays`]) and cast each value to its column's type by catalog name;
//! arrays and composites come through `json_populate_record`. Event-order statements read
//! one event's json through `json_populate_record`. Table names come quoted
//! ([`RelName::quoted`](crate::names::RelName::quoted)); every column name is quoted here.

use crate::catalog::Column;
use crate::columns::ValueForm;
use crate::names::quote_ident;

/// Where a set-wise statement reads its rows: `unnest` of one text array per column, and
/// `json_populate_record` for the arrays and composites among them.
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

/// Deletes the rows whose primary keys (`keys`, every key column) the arrays hold.
pub(crate) fn set_wise_delete(t: &str, keys: &[Column]) -> String {
    let source = ArraySource::new(t, keys);
    let all: Vec<usize> = (0..keys.len()).collect();
    format!(
        "delete from {t} as t using {from} where {w}",
        from = source.from,
        w = source.key_match(keys, &all)
    )
}

/// Updates rows found by the primary-key columns among `columns` to the arrays' values.
pub(crate) fn set_wise_update(t: &str, columns: &[Column]) -> String {
    let source = ArraySource::new(t, columns);
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
        w = source.key_match(columns, &keys)
    )
}

/// Inserts the arrays' rows (identity columns take the given values).
pub(crate) fn set_wise_insert(t: &str, columns: &[Column]) -> String {
    let source = ArraySource::new(t, columns);
    format!(
        "insert into {t} ({list}) overriding system value select {values} from {from}",
        list = column_list(columns),
        values = source.values.join(", "),
        from = source.from
    )
}

/// Inserts rows sent in `COPY`'s text format (see [`crate::columns::copy_text`]) into
/// `columns`: what [`set_wise_insert`] does, with the server's multi-row insert path (about
/// twice as fast for a thousand rows and more). `COPY` writes identity columns as given, as
/// `overriding system value` does, and applies no rules, which replay's replica mode keeps
/// from acting on inserts anyway.
pub(crate) fn set_wise_copy(t: &str, columns: &[Column]) -> String {
    format!("copy {t} ({}) from stdin", column_list(columns))
}

/// Inserts the row `$1` (json) holds, setting `columns`; those named in `json_nulls` hold the
/// JSON value null (which the row's json cannot tell from SQL NULL).
pub(crate) fn event_insert(t: &str, columns: &[Column], json_nulls: &[String]) -> String {
    let values = columns
        .iter()
        .map(|c| event_value(c, "", json_nulls))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "insert into {t} ({list}) overriding system value select {values} from json_populate_record(null::{t}, $1::text::json)",
        list = column_list(columns)
    )
}

/// Sets `columns` of the row whose primary key (`keys`) `$2` holds to the row `$1` holds
/// (`json_nulls` as for [`event_insert`]).
pub(crate) fn event_update(
    t: &str,
    columns: &[Column],
    keys: &[&str],
    json_nulls: &[String],
) -> String {
    let set = columns
        .iter()
        .map(|c| {
            format!(
                "{} = {}",
                quote_ident(&c.name),
                event_value(c, "r.", json_nulls)
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "update {t} as t set {set} from json_populate_record(null::{t}, $1::text::json) r, json_populate_record(null::{t}, $2::text::json) k where {w}",
        w = key_match(keys, "k")
    )
}

/// Deletes the row whose primary key (`keys`) `$1` holds.
pub(crate) fn event_delete(t: &str, keys: &[&str]) -> String {
    format!(
        "delete from {t} as t using json_populate_record(null::{t}, $1::text::json) k where {w}",
        w = key_match(keys, "k")
    )
}

/// Empties the tables (quoted names) together, cascading to no other table.
pub(crate) fn truncate(tables: &[String]) -> String {
    format!("truncate {} restrict", tables.join(", "))
}

/// The value of column `c` from the row source `prefix` (`r.`, or nothing), or the JSON null
/// of its type when `json_nulls` names it.
fn event_value(c: &Column, prefix: &str, json_nulls: &[String]) -> String {
    if json_nulls.contains(&c.name) {
        format!("'null'::{}", c.cast_type)
    } else {
        format!("{prefix}{}", quote_ident(&c.name))
    }
}

/// `"a", "b"`.
fn column_list(columns: &[Column]) -> String {
    columns
        .iter()
        .map(|c| quote_ident(&c.name))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `t."a" = k."a" and t."b" = k."b"` (for `source` k).
fn key_match(keys: &[&str], source: &str) -> String {
    keys.iter()
        .map(|k| format!("t.{k} = {source}.{k}", k = quote_ident(k)))
        .collect::<Vec<_>>()
        .join(" and ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn column(name: &str, cast_type: &str, form: ValueForm, in_primary_key: bool) -> Column {
        Column {
            name: name.to_string(),
            type_name: cast_type.to_string(),
            cast_type: cast_type.to_string(),
            form,
            generated: false,
            in_primary_key,
            not_null: in_primary_key,
            default: None,
            identity: false,
        }
    }

    const T: &str = r#""app"."Order""#;

    fn columns() -> Vec<Column> {
        vec![
            column("id", "pg_catalog.int8", ValueForm::Text, true),
            column("note", "pg_catalog.text", ValueForm::Text, false),
            column("doc", "pg_catalog.jsonb", ValueForm::Json, false),
        ]
    }

    #[test]
    fn set_wise_copy_names_every_column() {
        assert_eq!(
            set_wise_copy(T, &columns()),
            r#"copy "app"."Order" ("id", "note", "doc") from stdin"#
        );
    }

    #[test]
    fn set_wise_statements_read_one_text_array_per_column() {
        let columns = columns();
        assert_eq!(
            set_wise_insert(T, &columns),
            r#"insert into "app"."Order" ("id", "note", "doc") overriding system value select r.c1::pg_catalog.int8, r.c2::pg_catalog.text, r.c3::pg_catalog.jsonb from unnest($1::text[], $2::text[], $3::text[]) as r(c1, c2, c3)"#
        );
        assert_eq!(
            set_wise_update(T, &columns),
            r#"update "app"."Order" as t set "id" = r.c1::pg_catalog.int8, "note" = r.c2::pg_catalog.text, "doc" = r.c3::pg_catalog.jsonb from unnest($1::text[], $2::text[], $3::text[]) as r(c1, c2, c3) where t."id" = r.c1::pg_catalog.int8"#
        );
        assert_eq!(
            set_wise_delete(T, &columns[..1]),
            r#"delete from "app"."Order" as t using unnest($1::text[]) as r(c1) where t."id" = r.c1::pg_catalog.int8"#
        );
    }

    #[test]
    fn structured_columns_come_through_json_populate_record() {
        let columns = vec![
            column("id", "pg_catalog.int4", ValueForm::Text, true),
            column("tags", "pg_catalog._text", ValueForm::Structured, false),
            column("n", "pg_catalog.numeric", ValueForm::Text, false),
        ];
        assert_eq!(
            set_wise_insert(T, &columns),
            r#"insert into "app"."Order" ("id", "tags", "n") overriding system value select r.c1::pg_catalog.int4, s."tags", r.c2::pg_catalog.numeric from unnest($1::text[], $2::text[], $3::text[]) as r(c1, c2, rest) cross join lateral json_populate_record(null::"app"."Order", r.rest::json) s"#
        );
    }

    #[test]
    fn a_composite_key_matches_every_key_column() {
        let columns = vec![
            column("a", "pg_catalog.int4", ValueForm::Text, true),
            column("v", "pg_catalog.text", ValueForm::Text, false),
            column("b", "pg_catalog.text", ValueForm::Text, true),
        ];
        assert!(set_wise_update(T, &columns)
            .ends_with(r#"where t."a" = r.c1::pg_catalog.int4 and t."b" = r.c3::pg_catalog.text"#));
        assert!(event_delete(T, &["a", "b"]).ends_with(r#"where t."a" = k."a" and t."b" = k."b""#));
    }

    #[test]
    fn event_order_statements_read_the_events_json() {
        let columns = columns();
        assert_eq!(
            event_insert(T, &columns, &[]),
            r#"insert into "app"."Order" ("id", "note", "doc") overriding system value select "id", "note", "doc" from json_populate_record(null::"app"."Order", $1::text::json)"#
        );
        assert_eq!(
            event_update(T, &columns, &["id"], &[]),
            r#"update "app"."Order" as t set "id" = r."id", "note" = r."note", "doc" = r."doc" from json_populate_record(null::"app"."Order", $1::text::json) r, json_populate_record(null::"app"."Order", $2::text::json) k where t."id" = k."id""#
        );
        assert_eq!(
            event_delete(T, &["id"]),
            r#"delete from "app"."Order" as t using json_populate_record(null::"app"."Order", $1::text::json) k where t."id" = k."id""#
        );
        assert_eq!(
            truncate(&[T.to_string(), r#""app"."line""#.to_string()]),
            r#"truncate "app"."Order", "app"."line" restrict"#
        );
    }

    #[test]
    fn json_nulls_are_written_as_the_json_value_null() {
        let columns = columns();
        let nulls = ["doc".to_string()];
        assert_eq!(
            event_insert(T, &columns, &nulls),
            r#"insert into "app"."Order" ("id", "note", "doc") overriding system value select "id", "note", 'null'::pg_catalog.jsonb from json_populate_record(null::"app"."Order", $1::text::json)"#
        );
        assert!(event_update(T, &columns, &["id"], &nulls).contains(
            r#"set "id" = r."id", "note" = r."note", "doc" = 'null'::pg_catalog.jsonb from"#
        ));
    }

    #[test]
    fn awkward_column_names_are_quoted() {
        let columns = vec![
            column("id", "pg_catalog.int4", ValueForm::Text, true),
            column(
                r#"x"; drop table y; --"#,
                "pg_catalog.text",
                ValueForm::Text,
                false,
            ),
        ];
        let sql = event_insert(T, &columns, &[]);
        assert!(sql.contains(r#""x""; drop table y; --""#), "{sql}");
        let sql = set_wise_update(T, &columns);
        assert!(sql.contains(r#""x""; drop table y; --" = r.c2"#), "{sql}");
    }
}
