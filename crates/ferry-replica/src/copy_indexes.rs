//! The indexes of a table being copied, built once its rows are in rather than row by row:
//! dropped after the copy empties the table and created again from their own definitions
//! before it commits, all inside the copy's one subscriber transaction (which holds the
//! table's ACCESS EXCLUSIVE lock from its TRUNCATE on). So nobody ever sees the table without
//! them, and a copy cut short, or an index that cannot be built (the provider's rows break a
//! unique index only the subscriber has), rolls the drop back with everything else.
//!
//! Building a btree from sorted rows costs a fraction of inserting a million keys one by one
//! (`pg_restore` loads data before indexes for that reason, and so does Londiste 3's copy).
//!
//! Only what a drop and a create bring back exactly is deferred; an index is kept, and
//! maintained during the copy as before, when:
//! - replay's role does not own the table (dropping needs ownership);
//! - the table is partitioned, a partition, or in an inheritance tree (indexes and
//!   constraints there are tied to other tables');
//! - something depends on the index or its constraint (a foreign key, a view grouping by the
//!   primary key), or it belongs to an extension;
//! - it carries what its definition does not: a comment, a security label, `CLUSTER ON`,
//!   `REPLICA IDENTITY USING INDEX`, a statistics target;
//! - it is not valid (a failed `CREATE INDEX CONCURRENTLY`: dropping and building it would
//!   change it);
//! - it lies in a tablespace replay's role may not create in.
//!
//! If the drops fail all the same, they are undone (a savepoint) and the copy goes on with
//! every index kept.

use ferry_daemon::logging::one_line;
use tokio_postgres::Transaction;

use crate::error::{ReplicaError, ResultExt};
use crate::names::RelName;

/// What to drop and how to create each deferrable index of a table: one row per index,
/// `(drop statement, create statements)`. Definitions are read with an empty `search_path`
/// (as `pg_dump` does) so that every name in them is qualified, and created again under the
/// same. Each create first sets `default_tablespace` to the index's tablespace (an index
/// definition does not name it). An index backing a primary key or unique constraint is
/// created from its own definition (which keeps its storage parameters, which the
/// constraint's definition leaves out) and the constraint added on it, with its deferrability;
/// an exclusion constraint, which cannot be added on an index, is added from its definition,
/// so it is deferred only without storage parameters.
const DEFERRABLE_INDEXES: &str = "
select case when c.oid is null
            then pg_catalog.format('drop index %I.%I', n.nspname, ic.relname)
            else pg_catalog.format('alter table %s drop constraint %I', t.oid::pg_catalog.regclass, c.conname) end,
       pg_catalog.format('set local default_tablespace = %L; ', coalesce(ts.spcname, ''))
       || case when c.oid is null then pg_catalog.pg_get_indexdef(i.indexrelid)
               when c.contype = 'x'
               then pg_catalog.format('alter table %s add constraint %I %s', t.oid::pg_catalog.regclass,
                                      c.conname, pg_catalog.pg_get_constraintdef(c.oid))
               else pg_catalog.pg_get_indexdef(i.indexrelid)
                    || pg_catalog.format('; alter table %s add constraint %I %s using index %I%s',
                           t.oid::pg_catalog.regclass, c.conname,
                           case c.contype when 'p' then 'primary key' else 'unique' end, ic.relname,
                           case when c.condeferred then ' deferrable initially deferred'
                                when c.condeferrable then ' deferrable' else '' end) end
  from pg_catalog.pg_index i
  join pg_catalog.pg_class t on t.oid = i.indrelid
  join pg_catalog.pg_class ic on ic.oid = i.indexrelid
  join pg_catalog.pg_namespace n on n.oid = ic.relnamespace
  left join pg_catalog.pg_tablespace ts on ts.oid = ic.reltablespace
  left join pg_catalog.pg_constraint c
         on c.conindid = i.indexrelid and c.conrelid = i.indrelid and c.contype in ('p', 'u', 'x')
 where i.indrelid = pg_catalog.to_regclass($1)
   and pg_catalog.pg_has_role(t.relowner, 'USAGE')
   and t.relkind = 'r' and not t.relispartition and not t.relhassubclass
   and not exists (select 1 from pg_catalog.pg_inherits h where h.inhrelid = t.oid)
   and i.indisvalid and i.indisready and i.indislive
   -- an index in a tablespace replay's role may no longer create in stays as it is
   and (ic.reltablespace = 0 or pg_catalog.has_tablespace_privilege(ic.reltablespace, 'CREATE'))
   and (c.contype is distinct from 'x' or ic.reloptions is null)
   and not i.indisclustered and not i.indisreplident
   -- an index of a constraint other than these (none in core PostgreSQL) is left alone
   and (c.oid is not null
        or not exists (select 1 from pg_catalog.pg_constraint x
                        where x.conindid = i.indexrelid and x.conrelid = i.indrelid))
   -- nothing depends on the index or its constraint but their own parts (the index of a
   -- constraint, the recheck triggers of a deferrable one: internal dependencies, dropped
   -- and created with it)
   and not exists (select 1 from pg_catalog.pg_depend d
                    where d.deptype <> 'i'
                      and ((d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass
                            and d.refobjid = i.indexrelid)
                           or (d.refclassid = 'pg_catalog.pg_constraint'::pg_catalog.regclass
                               and d.refobjid = c.oid)))
   and not exists (select 1 from pg_catalog.pg_depend d
                    where d.classid = 'pg_catalog.pg_class'::pg_catalog.regclass
                      and d.objid = i.indexrelid and d.deptype = 'e')
   and not exists (select 1 from pg_catalog.pg_description d
                    where (d.classoid = 'pg_catalog.pg_class'::pg_catalog.regclass and d.objoid = i.indexrelid)
                       or (d.classoid = 'pg_catalog.pg_constraint'::pg_catalog.regclass and d.objoid = c.oid))
   and not exists (select 1 from pg_catalog.pg_seclabel l
                    where (l.classoid = 'pg_catalog.pg_class'::pg_catalog.regclass and l.objoid = i.indexrelid)
                       or (l.classoid = 'pg_catalog.pg_constraint'::pg_catalog.regclass and l.objoid = c.oid))
   -- a statistics target (-1 up to PostgreSQL 16, null from 17: none set)
   and not exists (select 1 from pg_catalog.pg_attribute a
                    where a.attrelid = i.indexrelid and a.attstattarget >= 0)
 order by c.contype = 'p' desc nulls last, ic.relname";

/// The indexes of a table dropped for its copy, to be created again by [`rebuild`](Self::rebuild).
#[derive(Debug)]
pub(crate) struct DeferredIndexes {
    /// The statements that create them, primary key first.
    creates: Vec<String>,
    /// The transaction's `search_path` and `default_tablespace` before the indexes were
    /// deferred, given back after they are built.
    settings: (String, String),
}

impl DeferredIndexes {
    /// How many indexes wait to be built.
    pub fn len(&self) -> usize {
        self.creates.len()
    }

    /// Creates every deferred index again in the copy's transaction, under the empty
    /// `search_path` their definitions were read with. A unique index the provider's rows
    /// break fails here, as the row would have failed on its way in.
    pub async fn rebuild(self, stx: &Transaction<'_>) -> Result<(), tokio_postgres::Error> {
        if self.creates.is_empty() {
            return Ok(());
        }
        set_search_path(stx, "").await?;
        for create in &self.creates {
            stx.batch_execute(create).await?;
        }
        restore_settings(stx, &self.settings).await
    }
}

/// Sets the transaction's `search_path` until it ends.
async fn set_search_path(stx: &Transaction<'_>, path: &str) -> Result<(), tokio_postgres::Error> {
    stx.execute(
        "select pg_catalog.set_config('search_path', $1, true)",
        &[&path],
    )
    .await
    .map(drop)
}

/// Gives the transaction the `search_path` and `default_tablespace` of `settings` back.
async fn restore_settings(
    stx: &Transaction<'_>,
    (search_path, tablespace): &(String, String),
) -> Result<(), tokio_postgres::Error> {
    stx.execute(
        "select pg_catalog.set_config('search_path', $1, true),
                pg_catalog.set_config('default_tablespace', $2, true)",
        &[search_path, tablespace],
    )
    .await
    .map(drop)
}

/// Drops the deferrable indexes of `table` (see the module's documentation) in `stx`, which
/// must hold the table emptied by TRUNCATE in this same transaction, and says how to build
/// them again. Drops that fail are undone and nothing is deferred.
pub(crate) async fn defer_indexes(
    stx: &Transaction<'_>,
    table: &RelName,
) -> Result<DeferredIndexes, ReplicaError> {
    let what = || format!("deferring the indexes of {table}");
    let settings = stx
        .query_one(
            "select pg_catalog.current_setting('search_path'),
                    pg_catalog.current_setting('default_tablespace')",
            &[],
        )
        .await
        .with_context(what)?;
    set_search_path(stx, "").await.with_context(what)?;
    let rows = stx
        .query(DEFERRABLE_INDEXES, &[&table.quoted()])
        .await
        .with_context(what)?;
    let mut deferred = DeferredIndexes {
        creates: Vec::with_capacity(rows.len()),
        settings: (settings.get(0), settings.get(1)),
    };
    if !rows.is_empty() {
        stx.batch_execute("savepoint \"ferry_defer_indexes\"")
            .await
            .with_context(what)?;
        for row in &rows {
            let (drop, create): (String, String) = (row.get(0), row.get(1));
            if let Err(error) = stx.batch_execute(&drop).await {
                tracing::warn!(table = %table, error = %one_line(&error),
                    "indexes kept during the copy: one could not be dropped");
                deferred.creates.clear();
                stx.batch_execute("rollback to savepoint \"ferry_defer_indexes\"")
                    .await
                    .with_context(what)?;
                break;
            }
            deferred.creates.push(create);
        }
        stx.batch_execute("release savepoint \"ferry_defer_indexes\"")
            .await
            .with_context(what)?;
    }
    restore_settings(stx, &deferred.settings)
        .await
        .with_context(what)?;
    Ok(deferred)
}
