//! Sessions of replication: replay's and the admin commands' connections to either side,
//! each set up so that values are written out (COPY, json) and read back the same way on both
//! sides, whatever the servers' defaults.

use ferry_connect::{ConnInfo, Session};

use crate::error::{ReplicaError, ResultExt};

/// Settings every replication session uses, so values are written out (COPY) and read
/// (json_populate_record) the same way on both sides, whatever the servers' defaults.
pub const SESSION_SETTINGS: &str = "set datestyle = 'ISO, YMD'; set intervalstyle = 'postgres'; \
     set extra_float_digits = 3; set bytea_output = 'hex'; set timezone = 'UTC'; \
     set lc_monetary = 'C'";

/// Connects one side (`side` is "provider" or "subscriber", for messages) as
/// `application_name`, with [`SESSION_SETTINGS`].
pub async fn open_session(
    conninfo: &ConnInfo,
    side: &str,
    application_name: &str,
) -> Result<Session, ReplicaError> {
    let session = ferry_connect::connect(conninfo, application_name)
        .await
        .map_err(|e| ReplicaError::connect(side, e))?;
    session
        .client()
        .batch_execute(SESSION_SETTINGS)
        .await
        .with_context(|| format!("setting up the {side} session"))?;
    Ok(session)
}

/// Both sessions of a replication, and where the provider session went.
pub struct Sides {
    /// The provider.
    pub provider: Session,
    /// The subscriber.
    pub subscriber: Session,
    /// Where the provider was found when a switchover or failover moved it (the subscriber's
    /// record), `None` when it is where the config says.
    pub moved_to: Option<String>,
}

/// Connects the subscriber, then the provider: where the subscriber's store says a switchover
/// or failover moved it, else `provider` (the config's).
pub async fn open_sides(
    provider: &ConnInfo,
    subscriber: &ConnInfo,
    queue: &str,
    application_name: &str,
) -> Result<Sides, ReplicaError> {
    let subscriber = open_session(subscriber, "subscriber", application_name).await?;
    let moved_to = crate::store::provider_location(subscriber.client(), queue).await?;
    let target = provider_for(provider, moved_to.as_deref())?;
    let provider = open_session(&target, "provider", application_name).await?;
    Ok(Sides {
        provider,
        subscriber,
        moved_to,
    })
}

/// Where the provider is: `moved_to` (the subscriber's record of a switchover or failover,
/// [`crate::store::provider_location`]) if any, else `configured`.
pub fn provider_for(
    configured: &ConnInfo,
    moved_to: Option<&str>,
) -> Result<ConnInfo, ReplicaError> {
    match moved_to {
        Some(location) => ConnInfo::parse(location)
            .map_err(|e| ReplicaError::connect("provider (as the subscriber records it)", e)),
        None => Ok(configured.clone()),
    }
}

/// Puts replay's subscriber session in `session_replication_role = replica`, as native
/// logical replication applies changes: the subscriber's ordinary triggers, rules and
/// foreign-key actions and checks leave replicated rows alone; triggers marked `ENABLE
/// REPLICA` or `ENABLE ALWAYS` fire. Sets the parameter directly where the role may (a
/// superuser; PostgreSQL 15+ after `GRANT SET ON PARAMETER`), else through
/// `ferry.replica_session()` when a superuser owns it (PostgreSQL 12 to 14). Without either,
/// a [`NeedsSetup`](crate::ErrorKind::NeedsSetup) error says exactly what to grant.
pub async fn enter_replica_mode(client: &tokio_postgres::Client) -> Result<(), ReplicaError> {
    use tokio_postgres::error::SqlState;
    let refused = |e: &tokio_postgres::Error| {
        e.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE)
            || e.code() == Some(&SqlState::UNDEFINED_FUNCTION)
    };
    match client
        .batch_execute("set session_replication_role = replica")
        .await
    {
        Ok(()) => return Ok(()),
        Err(e) if refused(&e) => {}
        Err(e) => {
            return Err(ReplicaError::db(
                "setting session_replication_role".into(),
                e,
            ))
        }
    }
    match client
        .batch_execute(r#"select "ferry"."replica_session"()"#)
        .await
    {
        Ok(()) => return Ok(()),
        Err(e) if refused(&e) => {}
        Err(e) => {
            return Err(ReplicaError::db(
                "calling ferry.replica_session()".into(),
                e,
            ))
        }
    }
    let row = client
        .query_one(
            "select current_user::text, current_setting('server_version_num')::int",
            &[],
        )
        .await
        .context("reading the subscriber role")?;
    let (user, version): (String, i32) = (row.get(0), row.get(1));
    let role = crate::names::quote_ident(&user);
    let grant = if version >= 150000 {
        format!("GRANT SET ON PARAMETER session_replication_role TO {role}")
    } else {
        format!(
            "ALTER FUNCTION ferry.replica_session() OWNER TO postgres; GRANT EXECUTE ON FUNCTION ferry.replica_session() TO {role}"
        )
    };
    Err(ReplicaError::needs_setup(format!(
        "the subscriber role {role} may not set session_replication_role, which replay needs so that the subscriber's own triggers and foreign-key actions leave replicated rows alone: as a superuser, run {grant} (README, \"Privileges\")"
    )))
}
