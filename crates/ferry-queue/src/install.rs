//! Installing and upgrading the queue schema. The SQL lives in `sql/queue/` at the top of the
//! repository and is compiled into the binary.

use tokio_postgres::Client;

use crate::error::{QueueError, ResultExt};

/// A versioned step of the queue schema, applied once.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    /// Schema version this step brings the queue to.
    pub version: i32,
    /// The step's SQL.
    pub sql: &'static str,
}

/// A part of what ferry installs in a database (the queue, the provider's or the subscriber's
/// catalog): versioned steps applied once each, and functions re-applied on every install.
#[derive(Debug, Clone, Copy)]
pub struct Component {
    /// The name its versions are recorded under in `"ferry"."schema_migration"`.
    pub name: &'static str,
    /// Its steps, oldest first. Append new ones; never edit a released one.
    pub migrations: &'static [Migration],
    /// Its functions, re-applied on every install so they follow the binary's version.
    pub functions: &'static str,
}

/// The queue: event tables, ticks, consumers and their functions.
pub const QUEUE: Component = Component {
    name: COMPONENT,
    migrations: &[
        Migration {
            version: 1,
            sql: include_str!("../../../sql/queue/0001_schema.sql"),
        },
        Migration {
            version: 2,
            sql: include_str!("../../../sql/queue/0002_hold.sql"),
        },
        Migration {
            version: 3,
            sql: include_str!("../../../sql/queue/0003_hot_subscription.sql"),
        },
        Migration {
            version: 4,
            sql: include_str!("../../../sql/queue/0004_ticker_thresholds.sql"),
        },
    ],
    functions: include_str!("../../../sql/queue/functions.sql"),
};

/// The component name the queue's versions are recorded under.
pub const COMPONENT: &str = "queue";

/// The oldest server ferry supports: 12 (declarative partitioning with partitioned indexes,
/// `pg_sequence_last_value`, and, for replicating partitioned tables, `pg_partition_tree` and
/// `pg_partition_ancestors`). `tests/versions.rs` runs 12 to 18.
pub const MIN_SERVER_VERSION_NUM: i32 = 120000;

/// What an install did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct InstallReport {
    /// The schema version found before, `None` if the queue was not installed.
    pub previous_version: Option<i32>,
    /// The schema version now installed.
    pub version: i32,
}

impl InstallReport {
    /// Whether anything new was applied (functions are refreshed either way).
    pub fn upgraded(&self) -> bool {
        self.previous_version != Some(self.version)
    }
}

/// The queue schema version this binary installs.
pub fn latest_version() -> i32 {
    QUEUE.latest_version()
}

impl Component {
    /// The version this binary installs.
    pub fn latest_version(&self) -> i32 {
        self.migrations.last().map(|m| m.version).unwrap_or(0)
    }
}

/// Installs the queue schema into the connected database, or upgrades it in place; running it
/// again changes nothing. Works for a non-superuser that owns the database (no extension is
/// created). Concurrent installs are serialized by an advisory lock.
pub async fn install(client: &mut Client) -> Result<InstallReport, QueueError> {
    install_component(client, &QUEUE).await
}

/// Installs `component` into the connected database (in schema "ferry"), or upgrades it in
/// place, in one transaction; running it again changes nothing but refreshing its functions.
pub async fn install_component(
    client: &mut Client,
    component: &Component,
) -> Result<InstallReport, QueueError> {
    let name = component.name;
    let server_version: i32 = client
        .query_one("select current_setting('server_version_num')::int", &[])
        .await
        .context("reading the server version")?
        .get(0);
    if server_version < MIN_SERVER_VERSION_NUM {
        return Err(QueueError::server_too_old(server_version));
    }
    let tx = client
        .transaction()
        .await
        .context("starting the install transaction")?;
    tx.execute(
        "select pg_advisory_xact_lock(hashtext('ferry.install'))",
        &[],
    )
    .await
    .context("waiting for other installs")?;
    tx.batch_execute(
        r#"create schema if not exists "ferry";
           create table if not exists "ferry"."schema_migration" (
               "component"     text not null,
               "version"       integer not null,
               "ferry_version" text not null,
               "applied_at"    timestamptz not null default now(),
               primary key ("component", "version"));"#,
    )
    .await
    .context("creating schema \"ferry\"")?;
    let previous: Option<i32> = tx
        .query_one(
            r#"select max("version") from "ferry"."schema_migration" where "component" = $1"#,
            &[&name],
        )
        .await
        .context("reading the installed version")?
        .get(0);
    for migration in component
        .migrations
        .iter()
        .filter(|m| Some(m.version) > previous)
    {
        tx.batch_execute(migration.sql)
            .await
            .with_context(|| format!("applying {name} schema version {}", migration.version))?;
        tx.execute(
            r#"insert into "ferry"."schema_migration" ("component", "version", "ferry_version") values ($1, $2, $3)"#,
            &[&name, &migration.version, &env!("CARGO_PKG_VERSION")],
        )
        .await
        .context("recording the schema version")?;
    }
    tx.batch_execute(component.functions)
        .await
        .with_context(|| format!("installing the {name} functions"))?;
    tx.commit().await.context("committing the install")?;
    Ok(InstallReport {
        previous_version: previous,
        version: component.latest_version(),
    })
}

/// The installed queue schema version, `None` if the queue is not installed.
pub async fn installed_version(client: &Client) -> Result<Option<i32>, QueueError> {
    installed_version_of(client, COMPONENT).await
}

/// The installed version of the component called `name`, `None` if it is not installed.
pub async fn installed_version_of(client: &Client, name: &str) -> Result<Option<i32>, QueueError> {
    let installed: bool = client
        .query_one(
            "select to_regclass('\"ferry\".\"schema_migration\"') is not null",
            &[],
        )
        .await
        .context("looking for the queue schema")?
        .get(0);
    if !installed {
        return Ok(None);
    }
    Ok(client
        .query_one(
            r#"select max("version") from "ferry"."schema_migration" where "component" = $1"#,
            &[&name],
        )
        .await
        .context("reading the installed version")?
        .get(0))
}
