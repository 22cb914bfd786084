//! Rows of one column set, turned into one text array per column: the form set-wise
//! statements read them in (`unnest($1::text[], ...)`, each value cast to its column's type).
//! A cast from text runs the type's input function on the same text `json_populate_record`
//! would hand it, so values arrive exactly as through json, without the subscriber parsing
//! json. Arrays and composites, whose json form is not their text form, still go through
//! `json_populate_record`, in a small json object per row.

use std::borrow::Cow;

use serde::de::{DeserializeSeed, IgnoredAny, MapAccess, Visitor};
use serde_json::value::RawValue;

/// How a column's json value reaches its column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueForm {
    /// As text: a json string unescaped, any other json value as written (what
    /// `json_populate_record` hands a scalar type's input function).
    Text,
    /// As the json it is (json and jsonb columns).
    Json,
    /// Through `json_populate_record` (arrays, composites, domains over them).
    Structured,
}

/// A column of the rows: its name and how its value is passed.
#[derive(Debug, Clone, Copy)]
pub struct ColumnSpec<'a> {
    /// The column's name (as in the json rows).
    pub name: &'a str,
    /// How its value is passed.
    pub form: ValueForm,
}

/// The text arrays for `rows` (json objects holding every column of `columns`): one per column
/// not [`ValueForm::Structured`], in `columns` order, then, if any column is structured, one
/// more holding per row a json object of the structured columns. `None` stands for null.
/// Columns of a row not in `columns` are ignored; a missing one is an error.
pub fn column_arrays(
    rows: &[&str],
    columns: &[ColumnSpec<'_>],
) -> Result<Vec<Vec<Option<String>>>, String> {
    let structured = columns.iter().any(|c| c.form == ValueForm::Structured);
    let mut arrays: Vec<Vec<Option<String>>> = (0..columns.len() + usize::from(structured))
        .map(|_| Vec::with_capacity(rows.len()))
        .collect();
    let mut row_values: Vec<Option<&RawValue>> = vec![None; columns.len()];
    for row in rows {
        row_values.iter_mut().for_each(|v| *v = None);
        let mut scan = RowValues {
            columns,
            values: &mut row_values,
        };
        scan.deserialize(&mut serde_json::Deserializer::from_str(row))
            .map_err(|e| format!("malformed event data: {e}"))?;
        let mut rest = String::new();
        for (at, (column, value)) in columns.iter().zip(&row_values).enumerate() {
            let value =
                value.ok_or_else(|| format!("column {:?} missing from an event", column.name))?;
            match column.form {
                ValueForm::Structured => {
                    rest.push(if rest.is_empty() { '{' } else { ',' });
                    rest.push_str(&serde_json::to_string(column.name).expect("a string"));
                    rest.push(':');
                    rest.push_str(value.get());
                }
                ValueForm::Json => arrays[at].push(non_null(value).map(str::to_string)),
                ValueForm::Text => arrays[at].push(match non_null(value) {
                    None => None,
                    Some(json) if json.starts_with('"') => Some(
                        serde_json::from_str::<String>(json)
                            .map_err(|e| format!("malformed event data: {e}"))?,
                    ),
                    Some(json) => Some(json.to_string()),
                }),
            }
        }
        if structured {
            rest.push('}');
            arrays[columns.len()].push(Some(rest));
        }
    }
    // structured columns have no array of their own
    let mut at = 0;
    arrays.retain(|_| {
        let keep = at >= columns.len() || columns[at].form != ValueForm::Structured;
        at += 1;
        keep
    });
    Ok(arrays)
}

/// The value's json text, `None` for json null.
fn non_null(value: &RawValue) -> Option<&str> {
    Some(value.get()).filter(|v| *v != "null")
}

/// One pass over a json object, keeping the raw values of the wanted columns.
struct RowValues<'c, 'v, 'a> {
    columns: &'c [ColumnSpec<'c>],
    values: &'v mut [Option<&'a RawValue>],
}

impl<'de> DeserializeSeed<'de> for &mut RowValues<'_, '_, 'de> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for &mut RowValues<'_, '_, 'de> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a json object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        // rows list their columns in table order, as `columns` mostly does: look there first
        let mut next = 0;
        while let Some(name) = map.next_key::<Cow<'de, str>>()? {
            let at = if self.columns.get(next).is_some_and(|c| c.name == name) {
                Some(next)
            } else {
                self.columns.iter().position(|c| c.name == name)
            };
            match at {
                Some(at) => {
                    self.values[at] = Some(map.next_value::<&'de RawValue>()?);
                    next = at + 1;
                }
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(())
    }
}

/// The rows of `arrays` (one text array per column, as [`column_arrays`] makes them for
/// columns none of which is [`ValueForm::Structured`]) in `COPY ... FROM STDIN`'s text format:
/// a line per row, values apart by tabs, NULL as `\N`, backslash, tab, newline and carriage
/// return escaped. Each value reaches its column's input function as the text it is, as the
/// set-wise statements' casts pass it.
pub fn copy_text(arrays: &[Vec<Option<String>>]) -> String {
    let rows = arrays.first().map_or(0, Vec::len);
    let size: usize = arrays
        .iter()
        .flatten()
        .map(|v| v.as_ref().map_or(2, String::len) + 1)
        .sum();
    let mut text = String::with_capacity(size + size / 16);
    for row in 0..rows {
        for (at, column) in arrays.iter().enumerate() {
            if at > 0 {
                text.push('\t');
            }
            match &column[row] {
                None => text.push_str("\\N"),
                Some(value) => {
                    for c in value.chars() {
                        match c {
                            '\\' => text.push_str("\\\\"),
                            '\t' => text.push_str("\\t"),
                            '\n' => text.push_str("\\n"),
                            '\r' => text.push_str("\\r"),
                            c => text.push(c),
                        }
                    }
                }
            }
        }
        text.push('\n');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_text_escapes_what_copy_reads_specially() {
        let arrays = vec![
            vec![Some("1".to_string()), Some("2".to_string())],
            vec![Some("a\tb\nc\rd\\e\\N".to_string()), None],
            vec![
                Some(String::new()),
                Some("{\"k\": \"\\u0000\"}".to_string()),
            ],
        ];
        assert_eq!(
            copy_text(&arrays),
            "1\ta\\tb\\nc\\rd\\\\e\\\\N\t\n2\t\\N\t{\"k\": \"\\\\u0000\"}\n"
        );
        assert_eq!(copy_text(&[]), "");
    }

    fn spec(name: &str, form: ValueForm) -> ColumnSpec<'_> {
        ColumnSpec { name, form }
    }

    #[test]
    fn values_become_the_text_json_populate_record_would_read() {
        let rows = [
            r#"{"id":1,"t":"a \"q\" \\ \u00e9","n":1.50,"b":true,"j":"s","x":9}"#,
            r#"{"x":0, "b" : null, "id":2, "t":null, "n":-1e5, "j":{"k":[1, null]}}"#,
        ];
        let columns = [
            spec("id", ValueForm::Text),
            spec("t", ValueForm::Text),
            spec("n", ValueForm::Text),
            spec("b", ValueForm::Text),
            spec("j", ValueForm::Json),
        ];
        let arrays = column_arrays(&rows, &columns).unwrap();
        let text = |v: &[Option<String>]| v.to_vec();
        assert_eq!(text(&arrays[0]), [Some("1".into()), Some("2".into())]);
        assert_eq!(text(&arrays[1]), [Some("a \"q\" \\ é".into()), None]);
        assert_eq!(text(&arrays[2]), [Some("1.50".into()), Some("-1e5".into())]);
        assert_eq!(text(&arrays[3]), [Some("true".into()), None]);
        assert_eq!(
            text(&arrays[4]),
            [Some(r#""s""#.into()), Some(r#"{"k":[1, null]}"#.into())]
        );
        assert_eq!(arrays.len(), 5);
    }

    #[test]
    fn structured_columns_travel_as_one_json_object_per_row() {
        let rows = [
            r#"{"id":1,"a":[1,2],"p":{"x":1,"l":"q"}}"#,
            r#"{"id":2,"a":null,"p":null}"#,
        ];
        let columns = [
            spec("id", ValueForm::Text),
            spec("a", ValueForm::Structured),
            spec("p", ValueForm::Structured),
        ];
        let arrays = column_arrays(&rows, &columns).unwrap();
        assert_eq!(arrays.len(), 2);
        assert_eq!(arrays[0], [Some("1".into()), Some("2".into())]);
        assert_eq!(
            arrays[1],
            [
                Some(r#"{"a":[1,2],"p":{"x":1,"l":"q"}}"#.into()),
                Some(r#"{"a":null,"p":null}"#.into())
            ]
        );
    }

    #[test]
    fn a_missing_column_or_bad_json_is_an_error() {
        let columns = [spec("id", ValueForm::Text), spec("v", ValueForm::Text)];
        assert!(column_arrays(&[r#"{"id":1}"#], &columns)
            .unwrap_err()
            .contains("\"v\""));
        assert!(column_arrays(&["{"], &columns).is_err());
    }
}
