//! Names of replicated tables and sequences, and how they are written in SQL and in output.

use std::fmt;

/// A schema-qualified relation name as stored in the catalogs (unquoted parts).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct RelName {
    /// The schema.
    pub schema: String,
    /// The table's or sequence's name.
    pub name: String,
}

impl RelName {
    /// A name from its two parts.
    pub fn new(schema: impl Into<String>, name: impl Into<String>) -> RelName {
        RelName {
            schema: schema.into(),
            name: name.into(),
        }
    }

    /// `"schema"."name"`, both parts always quoted: safe in any SQL text, and the form the
    /// capture trigger writes into each event's extra1.
    pub fn quoted(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
    }
}

/// Shows `schema.name`, quoting a part only when it is not a plain lowercase identifier
/// (`public.table1`, `"My Schema"."x.y"`), so output can be pasted back as input.
impl fmt::Display for RelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}.{}",
            display_ident(&self.schema),
            display_ident(&self.name)
        )
    }
}

/// `"ident"` with embedded quotes doubled.
pub fn quote_ident(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

fn display_ident(ident: &str) -> String {
    let plain = ident
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && ident
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if plain {
        ident.to_string()
    } else {
        quote_ident(ident)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        let plain = RelName::new("public", "table1");
        assert_eq!(plain.to_string(), "public.table1");
        assert_eq!(plain.quoted(), r#""public"."table1""#);
        let odd = RelName::new("My Schema", r#"x"; drop table y; --"#);
        assert_eq!(odd.to_string(), r#""My Schema"."x""; drop table y; --""#);
        assert_eq!(odd.quoted(), r#""My Schema"."x""; drop table y; --""#);
    }
}
