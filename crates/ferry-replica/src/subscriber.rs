//! The subscriber side's commands: installing, and choosing which of the provider's tables
//! and sequences are replicated here. What is stored here is read and written through
//! [`crate::store`].

use std::collections::BTreeMap;

use ferry_queue::{Component, InstallReport, Migration};
use tokio_postgres::{Client, GenericClient};

use crate::catalog::{parse_name, table_shape, TableShape};
use crate::error::{ReplicaError, ResultExt};
use crate::names::{quote_ident, RelName};
use crate::provider;
use crate::store;

/// The subscriber's catalog: position, table states, sequences, write protection.
pub const SUBSCRIBER: Component = Component {
    name: "subscriber",
    migrations: &[
        Migration {
            version: 1,
            sql: include_str!("../../../sql/subscriber/0001_schema.sql"),
        },
        Migration {
            version: 2,
            sql: include_str!("../../../sql/subscriber/0002_operations.sql"),
        },
        Migration {
            version: 3,
            sql: include_str!("../../../sql/subscriber/0003_execute.sql"),
        },
        Migration {
            version: 4,
            sql: include_str!("../../../sql/subscriber/0004_copy_progress.sql"),
        },
        Migration {
            version: 5,
            sql: include_str!("../../../sql/subscriber/0005_locations.sql"),
        },
        Migration {
            version: 6,
            sql: include_str!("../../../sql/subscriber/0006_copy_stash.sql"),
        },
    ],
    functions: include_str!("../../../sql/subscriber/functions.sql"),
};

/// The state shown for a table registered on the provider but not added here.
pub const NOT_ADDED: &str = "-";

/// What `subscriber install` did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SubscriberInstall {
    /// The subscriber catalog.
    pub subscriber: InstallReport,
    /// Whether the consumer was registered on the provider's queue now (`false`: it was).
    pub consumer_registered: bool,
    /// Capture triggers a schema dump of the provider brought here, dropped.
    pub copied_triggers_dropped: Vec<String>,
    /// Such triggers the subscriber role could not drop (it does not own their tables):
    /// the statements their owner should run.
    pub copied_triggers_left: Vec<String>,
}

/// Installs (or upgrades) the subscriber catalog, records `queue` here and registers
/// `consumer` on the provider's queue. Running it again changes nothing.
pub async fn install(
    subscriber: &mut Client,
    provider: &Client,
    queue: &str,
    consumer: &str,
) -> Result<SubscriberInstall, ReplicaError> {
    provider::require_installed(provider).await?;
    let report = ferry_queue::install_component(subscriber, &SUBSCRIBER).await?;
    store::record_queue(&*subscriber, queue, consumer).await?;
    let consumer_registered = ferry_queue::register_consumer(provider, queue, consumer).await?;
    let mut install = SubscriberInstall {
        subscriber: report,
        consumer_registered,
        copied_triggers_dropped: Vec::new(),
        copied_triggers_left: Vec::new(),
    };
    for row in subscriber
        .query(
            r#"select table_schema, table_name, trigger_name, dropped
                 from "ferry"."subscriber_drop_copied_capture_triggers"()"#,
            &[],
        )
        .await
        .context("dropping capture triggers copied from the provider")?
    {
        let table = RelName::new(row.get::<_, String>(0), row.get::<_, String>(1));
        let trigger = quote_ident(row.get(2));
        if row.get(3) {
            install
                .copied_triggers_dropped
                .push(format!("{trigger} on {table}"));
        } else {
            install
                .copied_triggers_left
                .push(format!("DROP TRIGGER {trigger} ON {};", table.quoted()));
        }
    }
    Ok(install)
}

/// Fails with a clear message unless the subscriber is installed for `queue`.
pub async fn require_installed(client: &Client, queue: &str) -> Result<(), ReplicaError> {
    let version = ferry_queue::installed_version_of(client, SUBSCRIBER.name).await?;
    let installed = version.is_some() && store::has_queue(client, queue).await?;
    if !installed {
        return Err(ReplicaError::needs_setup(format!(
            "ferry is not installed on the subscriber for queue \"{queue}\": run `ferry CONFIG subscriber install`"
        )));
    }
    let (version, needed) = (version.unwrap_or(0), SUBSCRIBER.latest_version());
    if version < needed {
        return Err(ReplicaError::needs_setup(format!(
            "the subscriber's ferry schema is version {version}, this ferry needs {needed}: run `ferry CONFIG subscriber install` (it upgrades in place)"
        )));
    }
    Ok(())
}

/// One line of `subscriber tables`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TableStatus {
    /// The table.
    pub table: RelName,
    /// Its state here, or [`NOT_ADDED`] when only the provider has it.
    pub state: String,
    /// While it copies: how far the copy has got.
    pub copy: Option<store::CopyProgress>,
}

/// Every table of the queue: the subscriber's with their states, and the provider's not yet
/// added here with state `-`.
pub async fn table_states(
    subscriber: &Client,
    provider: &Client,
    queue: &str,
) -> Result<Vec<TableStatus>, ReplicaError> {
    let mut all: BTreeMap<RelName, String> = provider::tables(provider, queue)
        .await?
        .into_iter()
        .map(|t| (t, NOT_ADDED.to_string()))
        .collect();
    for t in store::tables(subscriber, queue).await? {
        all.insert(t.table, t.state.name().to_string());
    }
    let mut copies: BTreeMap<RelName, store::CopyProgress> =
        store::copy_progress(subscriber, queue)
            .await?
            .into_iter()
            .collect();
    Ok(all
        .into_iter()
        .map(|(table, state)| TableStatus {
            copy: copies.remove(&table),
            table,
            state,
        })
        .collect())
}

/// How `subscriber add` treats a table.
#[derive(Debug, Clone, Copy, Default)]
pub struct AddOptions {
    /// Create the table here from the provider's definition when it is missing.
    pub create: bool,
    /// Keep the rows already here when copying.
    pub skip_truncate: bool,
}

/// Adds a provider table of `queue` here: replay copies it, then keeps it in step. The table
/// must be registered on the provider; it must exist here with every provider column, unless
/// `create` lets ferry create it. Returns the table and whether it is new here.
pub async fn add_table(
    subscriber: &Client,
    provider: &Client,
    queue: &str,
    table: &str,
    options: AddOptions,
) -> Result<(RelName, bool), ReplicaError> {
    let name = parse_name(provider, table).await?;
    if !provider::tables(provider, queue).await?.contains(&name) {
        return Err(ReplicaError::needs_setup(format!(
            "{name} is not registered on the provider for queue \"{queue}\": run `ferry CONFIG provider add {name}` first"
        )));
    }
    let Some(source) = table_shape(provider, &name).await? else {
        return Err(ReplicaError::schema_mismatch(format!(
            "{name} is registered on the provider but does not exist there any more"
        )));
    };
    let target = match table_shape(subscriber, &name).await? {
        Some(shape) => shape,
        None if options.create => {
            create_table(subscriber, provider, &source).await?;
            table_shape(subscriber, &name)
                .await?
                .expect("table just created")
        }
        None => {
            return Err(ReplicaError::schema_mismatch(format!(
                "table {name} does not exist on the subscriber: create it (pg_dump -s of the provider) or add it with --create"
            )))
        }
    };
    if let Some(problem) = column_problems(&source, &target).into_iter().next() {
        return Err(ReplicaError::schema_mismatch(problem));
    }
    let added = store::add_table(subscriber, queue, &name, options.skip_truncate).await?;
    Ok((name, added))
}

/// Differences between a provider table and its subscriber table that stop replication:
/// a provider column missing here, or a column of another type.
pub fn column_problems(source: &TableShape, target: &TableShape) -> Vec<String> {
    let mut problems = Vec::new();
    for column in &source.columns {
        match target.column(&column.name) {
            None => problems.push(format!(
                "column {} of table {} is missing on the subscriber (add it there, type {})",
                quote_ident(&column.name),
                target.table,
                column.type_name
            )),
            Some(there) if there.type_name != column.type_name => problems.push(format!(
                "column {} of table {} is {} on the subscriber but {} on the provider",
                quote_ident(&column.name),
                target.table,
                there.type_name,
                column.type_name
            )),
            Some(_) => {}
        }
    }
    if target.primary_key().is_empty() {
        problems.push(format!(
            "table {} has no primary key on the subscriber (give it the provider's: {})",
            target.table,
            source.primary_key().join(", ")
        ));
    }
    problems
}

/// Creates a provider table here: its schema if missing, sequences its defaults use, columns
/// with types, defaults and generation expressions, NOT NULL, and the primary key.
async fn create_table(
    subscriber: &Client,
    provider: &Client,
    source: &TableShape,
) -> Result<(), ReplicaError> {
    let table = &source.table;
    let mut ddl = format!(
        "create schema if not exists {};\n",
        quote_ident(&table.schema)
    );
    let sequences = provider
        .query(
            r#"select distinct n.nspname::text, c.relname::text
                 from pg_attrdef d
                 join pg_depend dep on dep.classid = 'pg_attrdef'::regclass and dep.objid = d.oid
                 join pg_class c on c.oid = dep.refobjid and c.relkind = 'S'
                 join pg_namespace n on n.oid = c.relnamespace
                where d.adrelid = to_regclass($1)"#,
            &[&table.quoted()],
        )
        .await
        .with_context(|| format!("reading the sequences {table} uses"))?;
    for seq in &sequences {
        let seq = RelName::new(seq.get::<_, String>(0), seq.get::<_, String>(1));
        ddl.push_str(&format!(
            "create schema if not exists {};\ncreate sequence if not exists {};\n",
            quote_ident(&seq.schema),
            seq.quoted()
        ));
    }
    let mut lines: Vec<String> = source
        .columns
        .iter()
        .map(|c| {
            let mut line = format!("{} {}", quote_ident(&c.name), c.type_name);
            match (&c.default, c.generated, c.identity) {
                (Some(expr), true, _) => {
                    line.push_str(&format!(" generated always as ({expr}) stored"))
                }
                (_, _, true) => line.push_str(" generated by default as identity"),
                (Some(expr), false, false) => line.push_str(&format!(" default {expr}")),
                (None, _, false) => {}
            }
            if c.not_null {
                line.push_str(" not null");
            }
            line
        })
        .collect();
    let pk = source.primary_key();
    if !pk.is_empty() {
        lines.push(format!(
            "primary key ({})",
            pk.iter()
                .map(|c| quote_ident(c))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    ddl.push_str(&format!(
        "create table {} (\n    {}\n);",
        table.quoted(),
        lines.join(",\n    ")
    ));
    subscriber
        .batch_execute(&format!("begin;\n{ddl}\ncommit;"))
        .await
        .with_context(|| format!("creating table {table} on the subscriber"))?;
    tracing::info!(table = %table, "table created on the subscriber");
    Ok(())
}

/// Stops replicating a table here. Returns it and whether it was added.
pub async fn remove_table(
    client: &Client,
    queue: &str,
    table: &str,
) -> Result<(RelName, bool), ReplicaError> {
    let name = parse_name(client, table).await?;
    let removed = store::remove_table(client, queue, &name).await?;
    Ok((name, removed))
}

/// Makes replay copy a table again. Returns it and whether it is added here.
pub async fn resync_table(
    client: &Client,
    queue: &str,
    table: &str,
) -> Result<(RelName, bool), ReplicaError> {
    let name = parse_name(client, table).await?;
    let done = store::resync_table(client, queue, &name).await?;
    Ok((name, done))
}

/// Keeps a provider sequence of `queue` in step here; it must exist on both sides and be
/// registered on the provider. Returns it and whether it is new here.
pub async fn add_seq(
    subscriber: &Client,
    provider: &Client,
    queue: &str,
    seq: &str,
) -> Result<(RelName, bool), ReplicaError> {
    let name = parse_name(provider, seq).await?;
    if !provider::seqs(provider, queue).await?.contains(&name) {
        return Err(ReplicaError::needs_setup(format!(
            "sequence {name} is not registered on the provider for queue \"{queue}\": run `ferry CONFIG provider add-seq {name}` first"
        )));
    }
    let kind: Option<i8> = subscriber
        .query_one(
            "select (select relkind from pg_class where oid = to_regclass($1))",
            &[&name.quoted()],
        )
        .await
        .with_context(|| format!("looking for sequence {name}"))?
        .get(0);
    if kind != Some(b'S' as i8) {
        return Err(ReplicaError::schema_mismatch(format!(
            "sequence {name} does not exist on the subscriber: create it (pg_dump -s of the provider)"
        )));
    }
    let added = store::add_seq(subscriber, queue, &name).await?;
    Ok((name, added))
}

/// The sequences kept in step here for `queue`.
pub async fn seqs(client: &impl GenericClient, queue: &str) -> Result<Vec<RelName>, ReplicaError> {
    store::seqs(client, queue).await
}

/// Stops keeping a sequence in step. Returns it and whether it was added.
pub async fn remove_seq(
    client: &Client,
    queue: &str,
    seq: &str,
) -> Result<(RelName, bool), ReplicaError> {
    let name = parse_name(client, seq).await?;
    let removed = store::remove_seq(client, queue, &name).await?;
    Ok((name, removed))
}

/// What the provider carries for `queue` that this subscriber has not added: (tables, sequences).
pub async fn missing(
    subscriber: &Client,
    provider: &Client,
    queue: &str,
) -> Result<(Vec<RelName>, Vec<RelName>), ReplicaError> {
    let here: Vec<RelName> = store::tables(subscriber, queue)
        .await?
        .into_iter()
        .map(|t| t.table)
        .collect();
    let tables = provider::tables(provider, queue)
        .await?
        .into_iter()
        .filter(|t| !here.contains(t))
        .collect();
    let seqs_here = store::seqs(subscriber, queue).await?;
    let seqs = provider::seqs(provider, queue)
        .await?
        .into_iter()
        .filter(|s| !seqs_here.contains(s))
        .collect();
    Ok((tables, seqs))
}

/// What `subscriber check` found: problems that stop replay, and notes on what acts (or does
/// not act) on replicated rows here.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct CheckReport {
    /// Each would stop replay: tables gone on either side, tables no longer registered on the
    /// provider, missing columns, differing types, no primary key.
    pub problems: Vec<String>,
    /// Worth knowing, stops nothing: triggers that fire (or do not) for replicated changes,
    /// foreign keys to or from tables not replicated here.
    pub notes: Vec<String>,
}

/// Checks this subscriber's tables of `queue` against the provider and looks at the
/// subscriber's own triggers and foreign keys on them.
pub async fn check(
    subscriber: &Client,
    provider: &Client,
    queue: &str,
) -> Result<CheckReport, ReplicaError> {
    let registered = provider::tables(provider, queue).await?;
    let mut report = CheckReport::default();
    let tables: Vec<RelName> = store::tables(subscriber, queue)
        .await?
        .into_iter()
        .map(|t| t.table)
        .collect();
    for name in &tables {
        if !registered.contains(name) {
            report.problems.push(format!(
                "table {name} is not registered on the provider for queue \"{queue}\""
            ));
            continue;
        }
        let Some(source) = table_shape(provider, name).await? else {
            report
                .problems
                .push(format!("table {name} does not exist on the provider"));
            continue;
        };
        let Some(target) = table_shape(subscriber, name).await? else {
            report
                .problems
                .push(format!("table {name} does not exist on the subscriber"));
            continue;
        };
        report.problems.extend(column_problems(&source, &target));
    }
    report.notes = replica_mode_notes(subscriber, &tables).await?;
    let partitioned = provider::partitioned_tables(provider, queue).await?;
    if !partitioned.is_empty() && !provider::partition_ddl_capture(provider).await? {
        let names: Vec<String> = partitioned.iter().map(ToString::to_string).collect();
        report.notes.push(format!(
            "ATTACH and DETACH PARTITION on {} are not captured (no event trigger on the provider): as a superuser there, run select ferry.provider_enable_partition_ddl_capture(); until then, after one run `ferry CONFIG subscriber resync TABLE`",
            names.join(", ")
        ));
    }
    for (root, partition) in provider::uncovered_partitions(provider, queue).await? {
        report.notes.push(format!(
            "partition {partition} of {root} was created after {root} was added: its rows replicate, a TRUNCATE of it alone does not until `ferry CONFIG provider add {root}` runs again"
        ));
    }
    Ok(report)
}

/// What replay's replica mode means for `tables` here: which of their triggers fire for
/// replicated changes and which do not, and foreign keys that reach tables not replicated here
/// (replay neither checks nor cascades them).
async fn replica_mode_notes(
    subscriber: &Client,
    tables: &[RelName],
) -> Result<Vec<String>, ReplicaError> {
    let schemas: Vec<&str> = tables.iter().map(|t| t.schema.as_str()).collect();
    let names: Vec<&str> = tables.iter().map(|t| t.name.as_str()).collect();
    let rows = subscriber
        .query(
            r#"with rel as (
                   select t.schema, t.name, c.oid
                     from unnest($1::text[], $2::text[]) as t(schema, name)
                     join pg_namespace n on n.nspname = t.schema
                     join pg_class c on c.relnamespace = n.oid and c.relname = t.name)
               select 'trigger', r.schema, r.name, g.tgname::text, g.tgenabled::text, null, null
                 from rel r join pg_trigger g on g.tgrelid = r.oid
                where not g.tgisinternal and g.tgname <> 'ferry_protect' and g.tgenabled <> 'D'
               union all
               select 'refers', r.schema, r.name, c.conname::text, null, fn.nspname::text, f.relname::text
                 from rel r join pg_constraint c on c.conrelid = r.oid and c.contype = 'f'
                 join pg_class f on f.oid = c.confrelid
                 join pg_namespace fn on fn.oid = f.relnamespace
                where c.confrelid not in (select oid from rel)
               union all
               select 'referred', r.schema, r.name, c.conname::text, null, fn.nspname::text, f.relname::text
                 from rel r join pg_constraint c on c.confrelid = r.oid and c.contype = 'f'
                 join pg_class f on f.oid = c.conrelid
                 join pg_namespace fn on fn.oid = f.relnamespace
                where c.conrelid not in (select oid from rel)
               order by 2, 3, 1, 4"#,
            &[&schemas, &names],
        )
        .await
        .context("reading the subscriber's triggers and foreign keys")?;
    Ok(rows
        .iter()
        .map(|r| {
            let table = RelName::new(r.get::<_, String>(1), r.get::<_, String>(2));
            let object = quote_ident(r.get(3));
            let other = || RelName::new(r.get::<_, String>(5), r.get::<_, String>(6));
            match (r.get::<_, &str>(0), r.get::<_, Option<&str>>(4)) {
                ("trigger", Some(mode @ ("A" | "R"))) => format!(
                    "trigger {object} on {table} fires for replicated changes (ENABLE {})",
                    if mode == "A" { "ALWAYS" } else { "REPLICA" }
                ),
                ("trigger", _) => format!(
                    "trigger {object} on {table} does not fire for replicated changes (ALTER TABLE ... ENABLE ALWAYS TRIGGER makes it fire)"
                ),
                ("refers", _) => format!(
                    "foreign key {object} of {table} refers to {}, which is not replicated here: replay does not check it",
                    other()
                ),
                _ => format!(
                    "foreign key {object} of {} (not replicated here) refers to {table}: replay's changes to {table} do not cascade to it, and a copy of {table} removes rows it refers to",
                    other()
                ),
            }
        })
        .collect())
}
