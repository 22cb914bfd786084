//! `ferry CONFIG compare` and `repair`: both sides read at one consistent point while the
//! application keeps writing ([`point`]), each table's rows merged by primary key
//! ([`digest`]); compare reports counts, checksums and the key ranges that differ, repair
//! lists the rows that differ and, asked to, fixes them on the subscriber through replay's
//! own write path, in one transaction at that point (replay waits meanwhile).
//!
//! Memory stays bounded: rows stream a page at a time, fixes go a few hundred at a time.

mod digest;
mod point;

use std::collections::HashMap;
use std::time::Duration;

use ferry_connect::Session;
use serde::Serialize;
use tokio_postgres::Transaction;

use crate::apply::Applier;
use crate::catalog::{table_shape, Column};
use crate::error::{ReplicaError, ResultExt};
use crate::event::{RowChange, TableEvent};
use crate::names::{quote_ident, RelName};
use crate::replay::ReplaySettings;
use crate::session::open_session;

use digest::{
    show_key, step, DigestReader, DigestRow, KeyColumn, KeyOrder, RangeTracker, SideSum, Step,
};
pub use digest::{Difference, KeyRange};

/// Rows fixed per round trip by `repair --apply`.
const FIX_BATCH: usize = 500;

/// How compare and repair wait.
#[derive(Debug, Clone, Copy)]
pub struct PointOptions {
    /// Longest wait for the provider's lock, taken in attempts of at most 100 ms (the
    /// longest a writer of the compared tables is held up by one).
    pub lock_timeout: Duration,
    /// Longest wait for replay to reach the compared tick.
    pub wait: Duration,
}

/// One table compared.
#[derive(Debug, Clone, Serialize)]
pub struct TableComparison {
    /// The table.
    pub table: String,
    /// Rows on the provider.
    pub provider_rows: u64,
    /// Rows on the subscriber.
    pub subscriber_rows: u64,
    /// The provider's checksum (none with `--count-only`).
    pub provider_checksum: Option<String>,
    /// The subscriber's checksum.
    pub subscriber_checksum: Option<String>,
    /// Rows missing, extra or different on the subscriber (with `--count-only`: the
    /// difference of the counts).
    pub rows_differ: u64,
    /// The key ranges holding them (at most 50; `more_ranges` counts the rest).
    pub ranges: Vec<KeyRange>,
    /// Differing key ranges not listed.
    pub more_ranges: u64,
}

impl TableComparison {
    /// Whether both sides hold the same rows (or, counting only, as many).
    pub fn identical(&self) -> bool {
        self.rows_differ == 0
    }
}

/// What compare found.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    /// The tick both sides were read at.
    pub tick: i64,
    /// How long the provider's tables were locked, in milliseconds.
    pub lock_held_ms: f64,
    /// Per table.
    pub tables: Vec<TableComparison>,
}

impl Comparison {
    /// Whether every table is identical.
    pub fn identical(&self) -> bool {
        self.tables.iter().all(TableComparison::identical)
    }
}

/// One table repaired (or looked at).
#[derive(Debug, Clone, Default, Serialize)]
pub struct TableRepair {
    /// The table.
    pub table: String,
    /// Rows on the provider only.
    pub missing: u64,
    /// Rows on the subscriber only.
    pub extra: u64,
    /// Rows with other values on the subscriber.
    pub different: u64,
}

/// What repair found, and whether it fixed it.
#[derive(Debug, Clone, Serialize)]
pub struct Repair {
    /// The tick both sides were read at.
    pub tick: i64,
    /// How long the provider's tables were locked, in milliseconds.
    pub lock_held_ms: f64,
    /// Whether the differences were fixed on the subscriber.
    pub applied: bool,
    /// Per table.
    pub tables: Vec<TableRepair>,
}

/// A row that differs, as repair lists it.
#[derive(Debug, Clone, Serialize)]
pub struct RowDifference<'a> {
    /// The table.
    pub table: &'a RelName,
    /// Its primary key, `name=value,...`.
    pub key: String,
    /// How it differs.
    pub difference: Difference,
}

/// The sessions compare and repair use: one provider session takes the lock and the tick,
/// another reads; one subscriber session reads (and repairs).
struct Sessions {
    locker: Session,
    reader: Session,
    subscriber: Session,
}

/// A table as both sides are read: its key and the replicated columns.
pub(crate) struct Plan {
    table: RelName,
    /// The primary key's column names.
    keys: Vec<String>,
    /// The same, with the order the digests use.
    key_order: Vec<KeyColumn>,
    columns: Vec<Column>,
}

impl Plan {
    fn orders(&self) -> Vec<KeyOrder> {
        self.key_order.iter().map(|k| k.order).collect()
    }
}

/// Opens the three sessions (named `ferry WHAT JOB`) and checks both sides are installed.
async fn open(settings: &ReplaySettings, what: &str) -> Result<Sessions, ReplicaError> {
    let name = format!("ferry {what} {}", settings.job_name);
    let sides = crate::session::open_sides(
        &settings.provider,
        &settings.subscriber,
        &settings.queue,
        &name,
    )
    .await?;
    let (locker, subscriber) = (sides.provider, sides.subscriber);
    let provider = crate::session::provider_for(&settings.provider, sides.moved_to.as_deref())?;
    let reader = open_session(&provider, "provider", &name).await?;
    crate::provider::require_installed(locker.client()).await?;
    crate::subscriber::require_installed(subscriber.client(), &settings.queue).await?;
    Ok(Sessions {
        locker,
        reader,
        subscriber,
    })
}

/// Which tables to compare or repair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tables {
    /// Every table replicated on this subscriber.
    All,
    /// These, as the user typed them (`name`, `schema.name`, quoted identifiers).
    Named(Vec<String>),
}

/// Resolves `tables`, checks each is replicated by the queue and has a primary key, and
/// reads what is compared: the provider's columns (all but generated ones), which the
/// subscriber must have.
async fn plan(
    sessions: &Sessions,
    queue: &str,
    tables: &Tables,
) -> Result<Vec<Plan>, ReplicaError> {
    let tables: Vec<RelName> = match tables {
        Tables::All => crate::store::tables(sessions.subscriber.client(), queue)
            .await?
            .into_iter()
            .map(|t| t.table)
            .collect(),
        Tables::Named(names) => {
            let mut resolved = Vec::new();
            for name in names {
                resolved.push(crate::catalog::parse_name(sessions.locker.client(), name).await?);
            }
            resolved
        }
    };
    if tables.is_empty() {
        return Err(ReplicaError::invalid_input(format!(
            "no table of queue \"{queue}\" is replicated on this subscriber"
        )));
    }
    let replicated = crate::provider::tables(sessions.locker.client(), queue).await?;
    let mut plans = Vec::new();
    for table in &tables {
        if !replicated.contains(table) {
            return Err(ReplicaError::invalid_input(format!(
                "table {table} is not replicated by queue \"{queue}\" (`ferry CONFIG provider tables` lists those that are)"
            ))
            .about(table));
        }
        plans.push(
            plan_table(
                sessions.locker.client(),
                sessions.subscriber.client(),
                table,
            )
            .await?,
        );
    }
    Ok(plans)
}

/// How `table` is compared from `source_client`'s side (the provider's, or whichever side
/// is right) to `target_client`'s: the source's columns (all but generated ones), which the
/// target must have, and its primary key.
pub(crate) async fn plan_table(
    source_client: &tokio_postgres::Client,
    target_client: &tokio_postgres::Client,
    table: &RelName,
) -> Result<Plan, ReplicaError> {
    let source = table_shape(source_client, table).await?.ok_or_else(|| {
        ReplicaError::invalid_input(format!("table {table} does not exist on the provider"))
            .about(table)
    })?;
    let target = table_shape(target_client, table).await?.ok_or_else(|| {
        ReplicaError::schema_mismatch(format!("table {table} does not exist on the subscriber"))
            .about(table)
    })?;
    let columns: Vec<Column> = source
        .columns
        .iter()
        .filter(|c| !c.generated)
        .cloned()
        .collect();
    if let Some(missing) = columns.iter().find(|c| target.column(&c.name).is_none()) {
        return Err(ReplicaError::schema_mismatch(format!(
            "column {} of table {table} is missing on the subscriber",
            quote_ident(&missing.name)
        ))
        .about(table));
    }
    let keys: Vec<String> = source
        .primary_key()
        .into_iter()
        .map(str::to_string)
        .collect();
    if keys.is_empty() {
        return Err(ReplicaError::schema_mismatch(format!(
            "table {table} has no primary key on the provider"
        ))
        .about(table));
    }
    let key_order = keys
        .iter()
        .map(|k| KeyColumn {
            name: k.clone(),
            order: KeyOrder::of(
                &source.column(k).expect("a key column").cast_type,
                &target.column(k).expect("checked above").cast_type,
            ),
        })
        .collect();
    Ok(Plan {
        table: table.clone(),
        keys,
        key_order,
        columns,
    })
}

/// The consistent point (see [`point`]) for `plans`' tables: the tick, the provider's read
/// transaction and the subscriber's (its position locked with `lock_position`). The
/// consumer's hold ends once the subscriber's read has begun, or failed to.
async fn at_one_point<'s>(
    sessions: &'s mut Sessions,
    settings: &ReplaySettings,
    plans: &[Plan],
    lock_position: bool,
    options: PointOptions,
) -> Result<(point::Tick, Transaction<'s>, Transaction<'s>), ReplicaError> {
    let tables: Vec<RelName> = plans.iter().map(|p| p.table.clone()).collect();
    let Sessions {
        locker,
        reader,
        subscriber,
    } = sessions;
    let (tick, ptx) = point::make_tick(
        locker.client_mut(),
        reader.client_mut(),
        &settings.queue,
        &settings.job_name,
        &tables,
        options.lock_timeout,
        options.wait,
    )
    .await?;
    let read = point::subscriber_at(
        subscriber.client_mut(),
        &settings.queue,
        tick.id,
        &tables,
        lock_position,
        options.wait,
    )
    .await;
    let released = ferry_queue::release_consumer(
        locker.client(),
        &settings.queue,
        &settings.job_name,
        tick.id,
    )
    .await;
    let stx = read?;
    released?;
    Ok((tick, ptx, stx))
}

/// Compares `tables` of `settings`' queue on both sides at one tick (see [`point`]):
/// per table counts, checksums and the key ranges that differ; with `count_only`, counts.
pub async fn compare(
    settings: &ReplaySettings,
    tables: &Tables,
    count_only: bool,
    options: PointOptions,
) -> Result<Comparison, ReplicaError> {
    let mut sessions = open(settings, "compare").await?;
    let plans = plan(&sessions, &settings.queue, tables).await?;
    let (tick, ptx, stx) = at_one_point(&mut sessions, settings, &plans, false, options).await?;
    let mut compared = Vec::new();
    for plan in &plans {
        compared.push(if count_only {
            count_table(&ptx, &stx, plan).await?
        } else {
            compare_table(&ptx, &stx, plan).await?
        });
    }
    Ok(Comparison {
        tick: tick.id,
        lock_held_ms: tick.lock_held.as_secs_f64() * 1000.0,
        tables: compared,
    })
}

/// `--count-only`: both sides' row counts.
async fn count_table(
    ptx: &Transaction<'_>,
    stx: &Transaction<'_>,
    plan: &Plan,
) -> Result<TableComparison, ReplicaError> {
    let sql = format!("select count(*) from {}", plan.table.quoted());
    let (p, s) = tokio::join!(ptx.query_one(&sql, &[]), stx.query_one(&sql, &[]));
    let p: i64 = p
        .with_context(|| format!("counting {} on the provider", plan.table))?
        .get(0);
    let s: i64 = s
        .with_context(|| format!("counting {} on the subscriber", plan.table))?
        .get(0);
    Ok(TableComparison {
        table: plan.table.to_string(),
        provider_rows: p as u64,
        subscriber_rows: s as u64,
        provider_checksum: None,
        subscriber_checksum: None,
        rows_differ: p.abs_diff(s),
        ranges: Vec::new(),
        more_ranges: 0,
    })
}

/// Both sides' digests merged: counts, checksums, the key ranges that differ.
async fn compare_table(
    ptx: &Transaction<'_>,
    stx: &Transaction<'_>,
    plan: &Plan,
) -> Result<TableComparison, ReplicaError> {
    let (mut provider_sum, mut subscriber_sum) = (SideSum::default(), SideSum::default());
    let mut ranges = RangeTracker::new(&plan.keys);
    let mut merge = Merge::open(ptx, stx, plan).await?;
    while let Some((p, s, difference)) = merge.next().await? {
        if let Some(p) = &p {
            provider_sum.add(&p.hash);
        }
        if let Some(s) = &s {
            subscriber_sum.add(&s.hash);
        }
        let key = &p.as_ref().or(s.as_ref()).expect("one side has the row").key;
        ranges.key(key, difference.is_some());
    }
    ranges.finish();
    Ok(TableComparison {
        table: plan.table.to_string(),
        provider_rows: provider_sum.rows,
        subscriber_rows: subscriber_sum.rows,
        provider_checksum: Some(provider_sum.checksum()),
        subscriber_checksum: Some(subscriber_sum.checksum()),
        rows_differ: ranges.rows_differ,
        ranges: ranges.ranges,
        more_ranges: ranges.more_ranges,
    })
}

/// The two sides' digests of one table merged by key.
struct Merge<'t> {
    provider: DigestReader<'t>,
    subscriber: DigestReader<'t>,
    orders: Vec<KeyOrder>,
    /// The rows at the front of each side (read ahead by one).
    fronts: (Option<DigestRow>, Option<DigestRow>),
}

/// One key of the merge: the provider's row, the subscriber's, and how they differ.
type Merged = (Option<DigestRow>, Option<DigestRow>, Option<Difference>);

impl<'t> Merge<'t> {
    async fn open(
        ptx: &'t Transaction<'t>,
        stx: &'t Transaction<'t>,
        plan: &Plan,
    ) -> Result<Merge<'t>, ReplicaError> {
        let mut provider =
            DigestReader::open(ptx, "provider", &plan.table, &plan.key_order, &plan.columns)
                .await?;
        let mut subscriber = DigestReader::open(
            stx,
            "subscriber",
            &plan.table,
            &plan.key_order,
            &plan.columns,
        )
        .await?;
        let (p, s) = tokio::join!(provider.next(), subscriber.next());
        Ok(Merge {
            provider,
            subscriber,
            orders: plan.orders(),
            fronts: (p?, s?),
        })
    }

    /// The next key in order; `None` when both sides are done.
    async fn next(&mut self) -> Result<Option<Merged>, ReplicaError> {
        let Some(step) = step(&self.orders, self.fronts.0.as_ref(), self.fronts.1.as_ref()) else {
            return Ok(None);
        };
        Ok(Some(match step {
            Step::Both(difference) => {
                let (p, s) = tokio::join!(self.provider.next(), self.subscriber.next());
                let (p, s) = std::mem::replace(&mut self.fronts, (p?, s?));
                (p, s, difference)
            }
            Step::ProviderOnly => {
                let next = self.provider.next().await?;
                let p = std::mem::replace(&mut self.fronts.0, next);
                (p, None, Some(Difference::Missing))
            }
            Step::SubscriberOnly => {
                let next = self.subscriber.next().await?;
                let s = std::mem::replace(&mut self.fronts.1, next);
                (None, s, Some(Difference::Extra))
            }
        }))
    }
}

/// Lists the rows of `tables` that differ between the sides at one tick (calling `listed`
/// for each) and, with `apply`, fixes them on the subscriber: inserts the missing, deletes
/// the extra, updates the different, with replay's statements in replay's session mode, in
/// one transaction at that tick (replay waits meanwhile).
pub async fn repair(
    settings: &ReplaySettings,
    tables: &Tables,
    apply: bool,
    options: PointOptions,
    mut listed: impl FnMut(&RowDifference<'_>),
) -> Result<Repair, ReplicaError> {
    let mut sessions = open(settings, "repair").await?;
    let plans = plan(&sessions, &settings.queue, tables).await?;
    if apply {
        crate::session::enter_replica_mode(sessions.subscriber.client()).await?;
    }
    let (tick, ptx, stx) = at_one_point(&mut sessions, settings, &plans, apply, options).await?;
    if apply {
        // replay's mark: the write guard lets these writes through
        stx.batch_execute("set local ferry.replay = 'on'")
            .await
            .context("starting the repair")?;
    }
    let repaired = repair_tables(&ptx, &stx, &plans, apply, &mut listed).await?;
    if apply {
        stx.commit()
            .await
            .context("committing the repair on the subscriber")?;
    }
    Ok(Repair {
        tick: tick.id,
        lock_held_ms: tick.lock_held.as_secs_f64() * 1000.0,
        applied: apply,
        tables: repaired,
    })
}

/// Lists the rows of `plans`' tables that differ between the source read in `ptx` and the
/// target read in `stx` (calling `listed` for each) and, with `apply`, fixes them in `stx`
/// through replay's write path (the caller commits it, in replay's session mode with
/// `ferry.replay` on).
pub(crate) async fn repair_tables(
    ptx: &Transaction<'_>,
    stx: &Transaction<'_>,
    plans: &[Plan],
    apply: bool,
    listed: &mut impl FnMut(&RowDifference<'_>),
) -> Result<Vec<TableRepair>, ReplicaError> {
    let mut applier = Applier::default();
    let mut repaired = Vec::new();
    for plan in plans {
        let mut counts = TableRepair {
            table: plan.table.to_string(),
            ..TableRepair::default()
        };
        let mut pending: Vec<(Vec<String>, Difference)> = Vec::new();
        let mut merge = Merge::open(ptx, stx, plan).await?;
        while let Some((p, s, difference)) = merge.next().await? {
            let Some(difference) = difference else {
                continue;
            };
            let key = p.or(s).expect("one side has the row").key;
            match difference {
                Difference::Missing => counts.missing += 1,
                Difference::Extra => counts.extra += 1,
                Difference::Different => counts.different += 1,
            }
            listed(&RowDifference {
                table: &plan.table,
                key: show_key(&plan.keys, &key),
                difference,
            });
            if apply {
                pending.push((key, difference));
                if pending.len() >= FIX_BATCH {
                    fix_rows(ptx, stx, &mut applier, plan, &mut pending).await?;
                }
            }
        }
        fix_rows(ptx, stx, &mut applier, plan, &mut pending).await?;
        repaired.push(counts);
    }
    Ok(repaired)
}

/// Fixes `pending` rows of `plan`'s table on the subscriber (`stx`) from the provider's rows
/// in the compared snapshot (`ptx`): extra rows deleted first (a unique value they hold may
/// be the one a missing row brings), then the missing inserted and the different updated.
async fn fix_rows(
    ptx: &Transaction<'_>,
    stx: &Transaction<'_>,
    applier: &mut Applier,
    plan: &Plan,
    pending: &mut Vec<(Vec<String>, Difference)>,
) -> Result<(), ReplicaError> {
    if pending.is_empty() {
        return Ok(());
    }
    let rows = provider_rows(
        ptx,
        plan,
        pending
            .iter()
            .filter(|(_, d)| *d != Difference::Extra)
            .map(|(k, _)| k),
    )
    .await?;
    let table = plan.table.quoted();
    pending.sort_by_key(|(_, d)| *d != Difference::Extra);
    for (key, difference) in pending.iter() {
        let key_json = key_json(&plan.keys, key);
        let found = rows.get(key);
        let row = || {
            found.ok_or_else(|| {
                ReplicaError::corrupt(format!(
                    "row {} of {} vanished from the provider's snapshot",
                    show_key(&plan.keys, key),
                    plan.table
                ))
            })
        };
        let (change, json_nulls) = match difference {
            Difference::Extra => (RowChange::Delete { old_key: &key_json }, Vec::new()),
            Difference::Missing => {
                let (row, nulls) = row()?;
                (RowChange::Insert { row }, nulls.clone())
            }
            Difference::Different => {
                let (row, nulls) = row()?;
                (
                    RowChange::Update {
                        row,
                        old_key: &key_json,
                    },
                    nulls.clone(),
                )
            }
        };
        let event = TableEvent {
            id: 0,
            txid: 0,
            table: &table,
            change,
            json_nulls,
        };
        applier.apply_event(stx, &plan.table, &event).await?;
    }
    pending.clear();
    Ok(())
}

/// The provider's rows with `keys` (each key's columns as text) in the snapshot of `ptx`, as
/// the capture functions write them: the row as json and the json columns holding JSON null.
async fn provider_rows<'k>(
    ptx: &Transaction<'_>,
    plan: &Plan,
    keys: impl Iterator<Item = &'k Vec<String>>,
) -> Result<HashMap<Vec<String>, (String, Vec<String>)>, ReplicaError> {
    let mut arrays: Vec<Vec<&str>> = vec![Vec::new(); plan.keys.len()];
    for key in keys {
        for (i, v) in key.iter().enumerate() {
            arrays[i].push(v);
        }
    }
    if arrays[0].is_empty() {
        return Ok(HashMap::new());
    }
    let sql = provider_rows_sql(plan);
    let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = arrays
        .iter()
        .map(|a| a as &(dyn tokio_postgres::types::ToSql + Sync))
        .collect();
    let rows = ptx
        .query(sql.as_str(), &params)
        .await
        .with_context(|| format!("reading rows of {} on the provider", plan.table))?;
    let n = plan.keys.len();
    Ok(rows
        .iter()
        .map(|r| {
            let key: Vec<String> = (0..n).map(|i| r.get(i)).collect();
            (key, (r.get(n), r.get(n + 1)))
        })
        .collect())
}

/// The statement reading rows by key text for [`provider_rows`].
fn provider_rows_sql(plan: &Plan) -> String {
    let key_column = |k: &String| {
        plan.columns
            .iter()
            .find(|c| &c.name == k)
            .expect("key columns are columns")
    };
    let key_text: Vec<String> = plan
        .keys
        .iter()
        .map(|k| format!("t.{}::text", quote_ident(k)))
        .collect();
    let key_cols: Vec<String> = plan
        .keys
        .iter()
        .map(|k| format!("t.{}", quote_ident(k)))
        .collect();
    let casts: Vec<String> = plan
        .keys
        .iter()
        .enumerate()
        .map(|(i, k)| format!("u.k{}::{}", i + 1, key_column(k).cast_type))
        .collect();
    let params: Vec<String> = (1..=plan.keys.len())
        .map(|i| format!("${i}::text[]"))
        .collect();
    let aliases: Vec<String> = (1..=plan.keys.len()).map(|i| format!("k{i}")).collect();
    let json_columns: Vec<String> = plan
        .columns
        .iter()
        .filter(|c| matches!(c.type_name.as_str(), "json" | "jsonb"))
        .map(|c| {
            format!(
                "case when t.{}::text = 'null' then {} end",
                quote_ident(&c.name),
                crate::names::quote_literal(&c.name)
            )
        })
        .collect();
    let json_nulls = if json_columns.is_empty() {
        "'{}'::text[]".to_string()
    } else {
        format!(
            "array_remove(array[{}]::text[], null)",
            json_columns.join(", ")
        )
    };
    format!(
        r#"select {key_text}, "ferry"."capture_row_json"(t), {json_nulls} from {table} t where ({key_cols}) in (select {casts} from unnest({params}) u({aliases}))"#,
        key_text = key_text.join(", "),
        table = plan.table.quoted(),
        key_cols = key_cols.join(", "),
        casts = casts.join(", "),
        params = params.join(", "),
        aliases = aliases.join(", ")
    )
}

/// A key as the json object replay's statements read keys from (values as text, which
/// `json_populate_record` reads with each column type's input function).
fn key_json(names: &[String], key: &[String]) -> String {
    let object: serde_json::Map<String, serde_json::Value> = names
        .iter()
        .zip(key)
        .map(|(n, v)| (n.clone(), serde_json::Value::String(v.clone())))
        .collect();
    serde_json::Value::Object(object).to_string()
}
