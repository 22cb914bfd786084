//! The provider side: installing, and registering the tables and sequences a queue carries.

use ferry_queue::{Component, InstallReport, Migration};
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, GenericClient};

use crate::catalog::parse_name;
use crate::error::{ReplicaError, ResultExt};
use crate::names::RelName;

/// The provider's catalog: registered tables and sequences, capture triggers.
pub const PROVIDER: Component = Component {
    name: "provider",
    migrations: &[
        Migration {
            version: 1,
            sql: include_str!("../../../sql/provider/0001_schema.sql"),
        },
        Migration {
            version: 2,
            sql: include_str!("../../../sql/provider/0002_execute.sql"),
        },
        Migration {
            version: 3,
            sql: include_str!("../../../sql/provider/0003_subscribers.sql"),
        },
        Migration {
            version: 4,
            sql: include_str!("../../../sql/provider/0004_failover.sql"),
        },
    ],
    functions: include_str!("../../../sql/provider/functions.sql"),
};

/// What `provider install` did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ProviderInstall {
    /// The queue schema.
    pub queue: InstallReport,
    /// The provider catalog.
    pub provider: InstallReport,
    /// Whether the queue was created now (`false`: it existed).
    pub queue_created: bool,
    /// Whether partitions attached, detached and created are captured (the event trigger
    /// `ferry_partition_ddl` exists; `provider install` creates it when its role is a
    /// superuser).
    pub partition_ddl_capture: bool,
}

/// Installs (or upgrades) the queue and the provider catalog and creates `queue`; as a
/// superuser, also the event trigger capturing partitions attached and detached. Running it
/// again changes nothing.
pub async fn install(client: &mut Client, queue: &str) -> Result<ProviderInstall, ReplicaError> {
    let queue_report = ferry_queue::install(client).await?;
    let provider = ferry_queue::install_component(client, &PROVIDER).await?;
    let queue_created = ferry_queue::create_queue(client, queue).await?;
    let superuser: bool = client
        .query_one(
            "select rolsuper from pg_roles where rolname = current_user",
            &[],
        )
        .await
        .context("looking at the provider role")?
        .get(0);
    if superuser {
        client
            .execute(
                r#"select "ferry"."provider_enable_partition_ddl_capture"()"#,
                &[],
            )
            .await
            .context("creating the partition DDL capture")?;
    }
    Ok(ProviderInstall {
        queue: queue_report,
        provider,
        queue_created,
        partition_ddl_capture: partition_ddl_capture(client).await?,
    })
}

/// Whether partitions attached, detached and created are captured: the event trigger
/// `ferry_partition_ddl` exists and is enabled.
pub async fn partition_ddl_capture(client: &impl GenericClient) -> Result<bool, ReplicaError> {
    Ok(client
        .query_one(
            "select exists (select 1 from pg_event_trigger
                             where evtname = 'ferry_partition_ddl' and evtenabled <> 'D')",
            &[],
        )
        .await
        .context("looking for the partition DDL capture")?
        .get(0))
}

/// The partitioned tables `queue` captures.
pub async fn partitioned_tables(
    client: &impl GenericClient,
    queue: &str,
) -> Result<Vec<RelName>, ReplicaError> {
    let rows = client
        .query(
            r#"select p."table_schema", p."table_name" from "ferry"."provider_table" p
                where p."queue_name" = $1
                  and (select relkind from pg_class
                        where oid = to_regclass(format('%I.%I', p."table_schema", p."table_name"))) = 'p'
                order by 1, 2"#,
            &[&queue],
        )
        .await
        .context("listing the queue's partitioned tables")?;
    Ok(rows
        .iter()
        .map(|r| RelName::new(r.get::<_, String>(0), r.get::<_, String>(1)))
        .collect())
}

/// Fails with a clear message unless the provider catalog is installed.
pub async fn require_installed(client: &Client) -> Result<(), ReplicaError> {
    let Some(version) = ferry_queue::installed_version_of(client, PROVIDER.name).await? else {
        return Err(ReplicaError::needs_setup(
            "ferry is not installed on the provider: run `ferry CONFIG provider install`",
        ));
    };
    let queue = ferry_queue::installed_version_of(client, ferry_queue::COMPONENT)
        .await?
        .unwrap_or(0);
    if version < PROVIDER.latest_version() || queue < ferry_queue::latest_version() {
        return Err(ReplicaError::needs_setup(format!(
            "the provider's ferry schema is older than this ferry (provider version {version} of {}, queue version {queue} of {}): run `ferry CONFIG provider install` (it upgrades in place)",
            PROVIDER.latest_version(),
            ferry_queue::latest_version()
        )));
    }
    Ok(())
}

/// What `--all` means on the provider: every user table (`tables`) or sequence.
pub async fn candidates(
    client: &impl GenericClient,
    sequences: bool,
) -> Result<Vec<RelName>, ReplicaError> {
    let kind: i8 = if sequences { b'S' as i8 } else { b'r' as i8 };
    let rows = client
        .query(
            r#"select table_schema, table_name from "ferry"."provider_candidates"($1)"#,
            &[&kind],
        )
        .await
        .context("listing the provider's tables")?;
    Ok(rows
        .iter()
        .map(|r| RelName::new(r.get::<_, String>(0), r.get::<_, String>(1)))
        .collect())
}

/// What `provider add --all` leaves out, with the reason: partitions (their partitioned
/// table carries their rows), foreign tables, tables of extensions.
pub async fn skipped(client: &impl GenericClient) -> Result<Vec<(RelName, String)>, ReplicaError> {
    let rows = client
        .query(
            r#"select table_schema, table_name, reason from "ferry"."provider_skipped"()"#,
            &[],
        )
        .await
        .context("listing the tables --all leaves out")?;
    Ok(rows
        .iter()
        .map(|r| {
            (
                RelName::new(r.get::<_, String>(0), r.get::<_, String>(1)),
                r.get(2),
            )
        })
        .collect())
}

/// Partitions of the queue's partitioned tables created after their `provider add`: their
/// rows are captured, a TRUNCATE of one alone is not until the root is added again. Each as
/// (root, partition).
pub async fn uncovered_partitions(
    client: &impl GenericClient,
    queue: &str,
) -> Result<Vec<(RelName, RelName)>, ReplicaError> {
    let rows = client
        .query(
            r#"select root_schema, root_name, part_schema, part_name
                 from "ferry"."provider_uncovered_partitions"($1)"#,
            &[&queue],
        )
        .await
        .context("looking for partitions created since their table was added")?;
    Ok(rows
        .iter()
        .map(|r| {
            (
                RelName::new(r.get::<_, String>(0), r.get::<_, String>(1)),
                RelName::new(r.get::<_, String>(2), r.get::<_, String>(3)),
            )
        })
        .collect())
}

/// Registers a table with `queue` and creates its capture triggers. Returns its name and
/// whether it is new. A table without a primary key is refused, saying what to do.
pub async fn add_table(
    client: &impl GenericClient,
    queue: &str,
    table: &str,
) -> Result<(RelName, bool), ReplicaError> {
    let name = parse_name(client, table).await?;
    let added: i32 = client
        .query_one(
            r#"select "ferry"."provider_add_table"($1, $2)"#,
            &[&queue, &name.quoted()],
        )
        .await
        .map_err(|e| adding_error(e, &format!("table {name}"), queue))?
        .get(0);
    Ok((name, added == 1))
}

/// How a plain table's changes are captured (partition and inheritance trees are always
/// captured per row).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaptureMode {
    /// One trigger call per statement, reading its transition tables: the default, and far
    /// cheaper for statements that change many rows.
    Statement,
    /// One trigger call per changed row: cheaper for single-row statements.
    Row,
}

impl CaptureMode {
    /// Its name in `ferry.provider_capture_table`.
    fn as_sql(self) -> &'static str {
        match self {
            CaptureMode::Statement => "statement",
            CaptureMode::Row => "row",
        }
    }
}

/// [`add_table`], capturing a plain table the way `mode` says (switching an added table's
/// triggers over, in one transaction). Returns its name, whether it is new, and the mode
/// its triggers have now (`row` for a partition or inheritance tree whatever was asked).
pub async fn capture_table(
    client: &impl GenericClient,
    queue: &str,
    table: &str,
    mode: CaptureMode,
) -> Result<(RelName, bool, String), ReplicaError> {
    let name = parse_name(client, table).await?;
    let added: i32 = client
        .query_one(
            r#"select "ferry"."provider_capture_table"($1, $2, $3)"#,
            &[&queue, &name.quoted(), &mode.as_sql()],
        )
        .await
        .map_err(|e| adding_error(e, &format!("table {name}"), queue))?
        .get(0);
    // a statement of its own: the one above saw the catalog as it was before its triggers
    let installed = installed_mode(client, queue, &name)
        .await?
        .unwrap_or_default();
    Ok((name, added == 1, installed))
}

/// How `table` is captured into `queue` here (`row`, `statement`; `None`: not captured).
async fn installed_mode(
    client: &impl GenericClient,
    queue: &str,
    table: &RelName,
) -> Result<Option<String>, ReplicaError> {
    Ok(client
        .query_one(
            r#"select "ferry"."installed_capture_mode"($1, to_regclass($2))"#,
            &[&queue, &table.quoted()],
        )
        .await
        .with_context(|| format!("reading how {table} is captured"))?
        .get(0))
}

/// How each of `tables` is captured into `queue` here (tables without capture left out): what
/// a switchover carries over to the node that captures next.
pub async fn capture_modes(
    client: &impl GenericClient,
    queue: &str,
    tables: &[RelName],
) -> Result<Vec<(RelName, CaptureMode)>, ReplicaError> {
    let mut modes = Vec::with_capacity(tables.len());
    for table in tables {
        match installed_mode(client, queue, table).await?.as_deref() {
            Some("row") => modes.push((table.clone(), CaptureMode::Row)),
            Some("statement") => modes.push((table.clone(), CaptureMode::Statement)),
            _ => {}
        }
    }
    Ok(modes)
}

/// The error of adding `what` ("table public.t") to `queue`: that it does not exist, said
/// with the name as ferry prints names everywhere, or the database's error.
fn adding_error(error: tokio_postgres::Error, what: &str, queue: &str) -> ReplicaError {
    if error.code() == Some(&SqlState::UNDEFINED_TABLE) {
        ReplicaError::invalid_input(format!("{what} does not exist on the provider"))
    } else {
        ReplicaError::db(format!("adding {what} to queue \"{queue}\""), error)
    }
}

/// Stops capturing a table. Returns its name and whether it was registered.
pub async fn remove_table(
    client: &impl GenericClient,
    queue: &str,
    table: &str,
) -> Result<(RelName, bool), ReplicaError> {
    let name = parse_name(client, table).await?;
    let removed: i32 = client
        .query_one(
            r#"select "ferry"."provider_remove_table"($1, $2, $3)"#,
            &[&queue, &name.schema, &name.name],
        )
        .await
        .with_context(|| format!("removing {name} from queue \"{queue}\""))?
        .get(0);
    Ok((name, removed == 1))
}

/// Registers a sequence with `queue`. Returns its name and whether it is new.
pub async fn add_seq(
    client: &impl GenericClient,
    queue: &str,
    seq: &str,
) -> Result<(RelName, bool), ReplicaError> {
    let name = parse_name(client, seq).await?;
    let added: i32 = client
        .query_one(
            r#"select "ferry"."provider_add_seq"($1, $2)"#,
            &[&queue, &name.quoted()],
        )
        .await
        .map_err(|e| adding_error(e, &format!("sequence {name}"), queue))?
        .get(0);
    Ok((name, added == 1))
}

/// Unregisters a sequence. Returns its name and whether it was registered.
pub async fn remove_seq(
    client: &impl GenericClient,
    queue: &str,
    seq: &str,
) -> Result<(RelName, bool), ReplicaError> {
    let name = parse_name(client, seq).await?;
    let removed: i32 = client
        .query_one(
            r#"select "ferry"."provider_remove_seq"($1, $2, $3)"#,
            &[&queue, &name.schema, &name.name],
        )
        .await
        .with_context(|| format!("removing sequence {name} from queue \"{queue}\""))?
        .get(0);
    Ok((name, removed == 1))
}

/// The tables registered with `queue`, by name.
pub async fn tables(
    client: &impl GenericClient,
    queue: &str,
) -> Result<Vec<RelName>, ReplicaError> {
    let rows = client
        .query(
            r#"select "table_schema", "table_name" from "ferry"."provider_table"
                where "queue_name" = $1 order by 1, 2"#,
            &[&queue],
        )
        .await
        .context("listing the provider's tables")?;
    Ok(rows
        .iter()
        .map(|r| RelName::new(r.get::<_, String>(0), r.get::<_, String>(1)))
        .collect())
}

/// The sequences registered with `queue`, by name.
pub async fn seqs(client: &impl GenericClient, queue: &str) -> Result<Vec<RelName>, ReplicaError> {
    let rows = client
        .query(
            r#"select "seq_schema", "seq_name" from "ferry"."provider_seq"
                where "queue_name" = $1 order by 1, 2"#,
            &[&queue],
        )
        .await
        .context("listing the provider's sequences")?;
    Ok(rows
        .iter()
        .map(|r| RelName::new(r.get::<_, String>(0), r.get::<_, String>(1)))
        .collect())
}

/// A provider sequence's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeqValue {
    /// The sequence.
    pub seq: RelName,
    /// Its last_value.
    pub last_value: i64,
    /// Whether last_value was handed out already.
    pub is_called: bool,
    /// Its increment (negative for descending sequences).
    pub increment: i64,
}

/// Records where `consumer`'s subscriber database is (`location`, a connection string
/// without its password).
pub async fn record_subscriber(
    client: &impl GenericClient,
    queue: &str,
    consumer: &str,
    location: &str,
) -> Result<(), ReplicaError> {
    client
        .execute(
            r#"insert into "ferry"."provider_subscriber" ("queue_name", "consumer", "location")
               values ($1, $2, $3)
               on conflict ("queue_name", "consumer") do update
                  set "location" = excluded."location", "updated" = now()"#,
            &[&queue, &consumer, &location],
        )
        .await
        .with_context(|| format!("recording where consumer \"{consumer}\" is"))?;
    Ok(())
}

/// Where the subscribers of `queue` are: (consumer, location), of consumers registered on
/// the queue.
pub async fn subscribers(
    client: &impl GenericClient,
    queue: &str,
) -> Result<Vec<(String, String)>, ReplicaError> {
    let rows = client
        .query(
            r#"select s."consumer", s."location" from "ferry"."provider_subscriber" s
                where s."queue_name" = $1
                  and exists (select 1 from "ferry"."get_consumer_info"($1, s."consumer"))
                order by 1"#,
            &[&queue],
        )
        .await
        .context("reading where the subscribers are")?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// Records that `queue` here was made by a failover from the provider at `old_location`,
/// whose tick `old_tick` was the last applied here.
pub async fn record_failover(
    client: &impl GenericClient,
    queue: &str,
    old_location: &str,
    old_tick: i64,
) -> Result<(), ReplicaError> {
    client
        .execute(
            r#"insert into "ferry"."provider_failover" ("queue_name", "old_location", "old_tick")
               values ($1, $2, $3)
               on conflict ("queue_name") do update
                  set "old_location" = excluded."old_location", "old_tick" = excluded."old_tick",
                      "failed_over_at" = now()"#,
            &[&queue, &old_location, &old_tick],
        )
        .await
        .context("recording the failover")?;
    Ok(())
}

/// Where `queue` here came from by a failover: (old provider's location, its last tick
/// applied here), if it did.
pub async fn failover_origin(
    client: &impl GenericClient,
    queue: &str,
) -> Result<Option<(String, i64)>, ReplicaError> {
    Ok(client
        .query_opt(
            r#"select "old_location", "old_tick" from "ferry"."provider_failover" where "queue_name" = $1"#,
            &[&queue],
        )
        .await
        .context("reading the failover's record")?
        .map(|r| (r.get(0), r.get(1))))
}

/// Forgets how `queue` here came to be (the old provider has rejoined).
pub async fn forget_failover(client: &impl GenericClient, queue: &str) -> Result<(), ReplicaError> {
    client
        .execute(
            r#"delete from "ferry"."provider_failover" where "queue_name" = $1"#,
            &[&queue],
        )
        .await
        .context("forgetting the failover")?;
    Ok(())
}

/// Forgets where `consumer` is.
pub async fn forget_subscriber(
    client: &impl GenericClient,
    queue: &str,
    consumer: &str,
) -> Result<(), ReplicaError> {
    client
        .execute(
            r#"delete from "ferry"."provider_subscriber" where "queue_name" = $1 and "consumer" = $2"#,
            &[&queue, &consumer],
        )
        .await
        .context("forgetting a subscriber's location")?;
    Ok(())
}

/// Current values of the sequences registered with `queue`.
pub async fn seq_values(
    client: &impl GenericClient,
    queue: &str,
) -> Result<Vec<SeqValue>, ReplicaError> {
    let rows = client
        .query_typed(
            r#"select seq_schema, seq_name, last_value, is_called, increment
                 from "ferry"."provider_seq_values"($1)"#,
            &[(&queue, tokio_postgres::types::Type::TEXT)],
        )
        .await
        .context("reading the provider's sequences")?;
    Ok(rows
        .iter()
        .map(|r| SeqValue {
            seq: RelName::new(r.get::<_, String>(0), r.get::<_, String>(1)),
            last_value: r.get(2),
            is_called: r.get(3),
            increment: r.get(4),
        })
        .collect())
}
