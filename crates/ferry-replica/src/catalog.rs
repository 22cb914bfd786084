//! What a table looks like on either side: its columns, their types, which are generated, and
//! its primary key, read from the system catalogs.

use tokio_postgres::GenericClient;

use crate::columns::ValueForm;
use crate::error::{ReplicaError, ResultExt};
use crate::names::RelName;

/// A column of a table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    /// Its name.
    pub name: String,
    /// Its type as `format_type` writes it (`numeric(10,2)`, `public.mood[]`).
    pub type_name: String,
    /// Its type by its catalog name, schema-qualified and without modifiers
    /// (`pg_catalog.bpchar`, `pg_catalog."bit"`), for casts: assigning to the column then
    /// applies the modifiers as an insert would. (Not `format_type`'s `character` or `bit`:
    /// in a cast those mean `char(1)` and `bit(1)`, and would cut values short.)
    pub cast_type: String,
    /// How set-wise apply passes its values.
    pub form: ValueForm,
    /// Whether it is computed (`GENERATED ALWAYS AS ... STORED`): never written by replay.
    pub generated: bool,
    /// Whether it is part of the primary key.
    pub in_primary_key: bool,
    /// Whether it is NOT NULL.
    pub not_null: bool,
    /// Its default or generation expression.
    pub default: Option<String>,
    /// Whether it is an identity column.
    pub identity: bool,
}

/// The columns of a table, in column order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableShape {
    /// The table.
    pub table: RelName,
    /// Its columns (dropped ones left out).
    pub columns: Vec<Column>,
    /// Nothing else depends on the order its rows change in while replay writes it (in
    /// `session_replication_role = replica`, where foreign keys, ordinary triggers and rules
    /// do not act): no unique or exclusion constraint but the primary key, no trigger or rule
    /// marked `ENABLE REPLICA` or `ENABLE ALWAYS`. Replay applies such a table's changes
    /// set-wise.
    pub independent: bool,
}

impl TableShape {
    /// The column called `name`.
    pub fn column(&self, name: &str) -> Option<&Column> {
        self.columns.iter().find(|c| c.name == name)
    }

    /// Primary-key column names, in column order.
    pub fn primary_key(&self) -> Vec<&str> {
        self.columns
            .iter()
            .filter(|c| c.in_primary_key)
            .map(|c| c.name.as_str())
            .collect()
    }
}

/// Reads the shape of `table`; `None` when there is no such table.
pub async fn table_shape(
    client: &impl GenericClient,
    table: &RelName,
) -> Result<Option<TableShape>, ReplicaError> {
    // attgenerated exists from PostgreSQL 12 on; read it through jsonb so older servers work
    let rows = client
        .query(
            r#"select a.attname::text,
                      format_type(a.atttypid, a.atttypmod),
                      coalesce(to_jsonb(a) ->> 'attgenerated', '') <> '',
                      coalesce(a.attnum = any (i.indkey::int2[]), false),
                      a.attnotnull,
                      pg_get_expr(d.adbin, d.adrelid),
                      coalesce(to_jsonb(a) ->> 'attidentity', '') <> '',
                      quote_ident(tn.nspname) || '.' || quote_ident(ty.typname),
                      case when ty.typcategory in ('A', 'C') then 'structured'
                           when coalesce(nullif(ty.typbasetype, 0), ty.oid)
                                in ('pg_catalog.json'::regtype, 'pg_catalog.jsonb'::regtype) then 'json'
                           else 'text' end
                 from pg_attribute a
                 join pg_type ty on ty.oid = a.atttypid
                 join pg_namespace tn on tn.oid = ty.typnamespace
                 left join pg_index i on i.indrelid = a.attrelid and i.indisprimary
                 left join pg_attrdef d on d.adrelid = a.attrelid and d.adnum = a.attnum
                where a.attrelid = to_regclass($1) and a.attnum > 0 and not a.attisdropped
                order by a.attnum"#,
            &[&table.quoted()],
        )
        .await
        .with_context(|| format!("reading the columns of {table}"))?;
    if rows.is_empty() {
        let exists: bool = client
            .query_one("select to_regclass($1) is not null", &[&table.quoted()])
            .await
            .with_context(|| format!("looking for {table}"))?
            .get(0);
        if !exists {
            return Ok(None);
        }
    }
    let independent: bool = client
        .query_one(
            r#"select not exists (select 1 from pg_constraint c
                                   where c.conrelid = t.oid and c.contype = 'x')
                  and not exists (select 1 from pg_index i
                                   where i.indrelid = t.oid and i.indisunique and not i.indisprimary)
                  and not exists (select 1 from pg_trigger g
                                   where g.tgrelid = t.oid and not g.tgisinternal
                                     and g.tgenabled in ('A', 'R'))
                  and not exists (select 1 from pg_rewrite r
                                   where r.ev_class = t.oid and r.ev_enabled in ('A', 'R'))
                 from (select to_regclass($1) as oid) t"#,
            &[&table.quoted()],
        )
        .await
        .with_context(|| format!("reading the constraints of {table}"))?
        .get::<_, Option<bool>>(0)
        .unwrap_or(false);
    Ok(Some(TableShape {
        table: table.clone(),
        independent,
        columns: rows
            .iter()
            .map(|r| Column {
                name: r.get(0),
                type_name: r.get(1),
                generated: r.get(2),
                in_primary_key: r.get(3),
                not_null: r.get(4),
                default: r.get(5),
                identity: r.get(6),
                cast_type: r.get(7),
                form: match r.get::<_, &str>(8) {
                    "structured" => ValueForm::Structured,
                    "json" => ValueForm::Json,
                    _ => ValueForm::Text,
                },
            })
            .collect(),
    }))
}

/// Resolves a name as the user typed it (`table`, `schema.table`, `"Odd Schema"."T"`) into its
/// parts, the way PostgreSQL parses identifiers; a bare name means schema `public`.
pub async fn parse_name(client: &impl GenericClient, text: &str) -> Result<RelName, ReplicaError> {
    let parts: Vec<String> = client
        .query_one("select parse_ident($1)", &[&text])
        .await
        .map_err(|e| {
            ReplicaError::invalid_input(format!(
                "{text:?} is not a valid table name: {}",
                e.as_db_error().map(|d| d.message()).unwrap_or("unparsable")
            ))
        })?
        .get(0);
    match parts.as_slice() {
        [name] => Ok(RelName::new("public", name.as_str())),
        [schema, name] => Ok(RelName::new(schema.as_str(), name.as_str())),
        _ => Err(ReplicaError::invalid_input(format!(
            "{text:?}: give a table as NAME or SCHEMA.NAME"
        ))),
    }
}
